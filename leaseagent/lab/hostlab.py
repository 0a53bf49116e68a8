"""The systemd lab: hosts booted with a real systemd, installed by the README's own steps.

    la-<name>-ul      underlay: bridge ul0 (10.250.0.1/24), as the namespace lab's
    la-<name>-etcd    etcd at 10.250.0.2:2379 (a process of the lab, as there)
    la-<name>-h<i>    host i's network namespace: eth0 10.250.0.<10+i>/24 and a default
                      route, forwarding off (Docker turns it on, and so sets its FORWARD
                      policy to DROP); in it, machine <name>-h<i>: systemd-nspawn
                      booting the cached Debian root filesystem (leaseagent.lab.machines)

Each host is installed by the commands of the README's "Install on a real
host" section, read from README.md at run time (`install_steps`) and run in
the host as they stand, with three kinds of exceptions, all listed here:

- lines the lab does instead: `apt-get` (the root filesystem has the
  packages; `check_packages` proves each one named is in it) and `git clone`
  (the lab copies the source tree to /usr/src/leaseagent, the path the
  README clones to);
- the README's example values for etcd's address, the underlay interface
  and the wheelhouse, replaced by the lab's (`SUBSTITUTIONS`);
- the network config, "once per cluster", runs on host 1 only.

The hosts have no network but the lab's underlay: they take the README's
offline install (`install.sh --wheelhouse DIR`), and the online one's block is
left out in full; the lab's wheelhouse (leaseagent.lab.rootfs) is
bind-mounted read-only at that DIR. The lab adds one drop-in of its own, WatchdogSec=5 instead of the
unit's 30, so the watchdog check takes seconds; and its containers: the
busybox image (`docker import`) and `docker run --restart always`.

`check` then proves, on the hosts as installed (`CHECKS`): Docker's FORWARD
policy is DROP; every host's containers reach a container on every other
host; `systemctl restart leaseagent` loses no ping of a flood across it and
stops no container; a SIGSTOPped agent is killed by the watchdog and
restarted; a configuration error exits 2, is not restarted (not even when a
docker command runs), and Docker and its containers keep running; a host
that reboots comes back on its own subnet.

Clean-up (`down`, from the name alone, also after a crash: leaseagent.lab.teardown)
stops each nspawn by PID (an orderly poweroff, SIGKILL after a grace),
then unmounts the hosts' roots, removes their cgroups and the namespaces.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from leaseagent.lab import docker, machines, rootfs, teardown
from leaseagent.lab.errors import LabError, LabExists
from leaseagent.lab.etcd import Etcd
from leaseagent.lab.machines import Machine
from leaseagent.lab.probes import parse_ping_summary
from leaseagent.lab.state import STATE_ROOT, StateDir
from leaseagent.lab.topology import ETCD_IP, ETCD_PORTS, Host, Topology

log = logging.getLogger("leaseagent.lab")

SOURCE = Path(__file__).resolve().parents[2]
README_SECTION = "## Install on a real host"
SOURCE_IN_HOST = "/usr/src/leaseagent"  # where the README clones the repository
ETCD_URL = f"http://{ETCD_IP}:{ETCD_PORTS[0]}"
# The README's example values -> the lab's.
SUBSTITUTIONS = (
    ("http://10.0.0.10:2379", ETCD_URL),
    ("LEASEAGENT_IFACE=eth1", "LEASEAGENT_IFACE=eth0"),
)
# The lab's one change to the shipped unit: the watchdog fires in seconds, not 30.
WATCHDOG_SEC = 5
WATCHDOG_DROPIN = ("/etc/systemd/system/leaseagent.service.d/lab-watchdog.conf",
                   f"# deploy/lab hosts: a short watchdog for its SIGSTOP check\n"
                   f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n")
CONTAINERS = ("c1", "c2")

DEFAULT_NAME = "hosts"


# ---------------------------------------------------------------- the README's steps


@dataclass
class Step:
    """One fenced block of the README's install section, as the lab runs it."""

    number: int
    text: str  # as the README has it
    once: bool  # the network config: on one host only
    skipped: list[str] = field(default_factory=list)  # lines the lab does itself

    @property
    def script(self) -> str:
        """The block with the lab's values, its skipped lines commented out."""
        lines = []
        for line in self.text.splitlines():
            if line in self.skipped:
                lines.append(f"# (the lab does this itself) {line}")
                continue
            for example, ours in SUBSTITUTIONS:
                line = line.replace(example, ours)
            lines.append(line)
        return "\n".join(lines) + "\n"


WHEELHOUSE_RE = re.compile(r"install\.sh\b.*--wheelhouse[= ](\S+)")


def wheelhouse_dir(steps: Sequence[Step]) -> str:
    """Where the README's offline install (`install.sh --wheelhouse DIR`) reads the
    wheels: the lab bind-mounts its wheelhouse there (its hosts have no network)."""
    for step in steps:
        m = WHEELHOUSE_RE.search(step.text)
        if m:
            return m.group(1)
    raise LabError("README's install steps have no offline install (install.sh --wheelhouse "
                   "DIR), and the lab's hosts have no network")


def install_steps(readme: Path = SOURCE / "README.md") -> list[Step]:
    """The fenced blocks of README.md's "Install on a real host" (up to its first
    subsection), in order."""
    text = readme.read_text()
    start = re.search(rf"^{re.escape(README_SECTION)}$", text, flags=re.M)
    if start is None:
        raise LabError(f"{readme}: no section {README_SECTION!r}")
    section = text[start.start():]
    end = re.search(r"\n##+ ", section[len(README_SECTION):])
    if end:
        section = section[: len(README_SECTION) + end.start()]
    blocks = re.findall(r"^( *)```[a-z]*\n(.*?)^\1```", section, flags=re.S | re.M)
    texts = ["\n".join(line[len(indent):] if line.startswith(indent) else line
                       for line in body.splitlines()) for indent, body in blocks]
    has_offline = any(WHEELHOUSE_RE.search(t) for t in texts)
    steps = []
    for i, block in enumerate(texts, 1):
        lines = block.splitlines()
        if has_offline and re.search(r"install\.sh\b", block) and not WHEELHOUSE_RE.search(block):
            skipped = lines  # the online install: the hosts take the offline one
        else:
            skipped = [line for line in lines
                       if line.lstrip().startswith(("apt-get", "git clone"))]
        steps.append(Step(i, block, once="leasectl config set" in block, skipped=skipped))
    if not steps:
        raise LabError(f"{readme}: no commands in {README_SECTION!r}")
    return steps


def apt_packages(steps: Sequence[Step]) -> list[str]:
    """The packages the README's `apt-get install` lines name."""
    names = []
    for step in steps:
        for line in step.skipped:
            for part in line.split("&&"):
                words = part.split()
                if words[:2] == ["apt-get", "install"]:
                    names += [w for w in words[2:] if not w.startswith("-")]
    return names


def check_packages(steps: Sequence[Step]) -> None:
    """LabError unless the root filesystem has every package the README installs (git
    aside: the lab copies the source instead of cloning it)."""
    missing = [p for p in apt_packages(steps) if p != "git" and p not in rootfs.PACKAGES]
    if missing:
        raise LabError(f"README's install step needs {', '.join(missing)}, which the hosts' "
                       "root filesystem lacks (leaseagent.lab.rootfs.PACKAGES)")


def source_files(source: Path = SOURCE) -> list[Path]:
    """The source tree's files as a clone would have them (tracked and new ones, not
    ignored ones), relative to `source`."""
    try:
        out = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "-co",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return [Path(p.decode()) for p in out.split(b"\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", "build"}
        return [p.relative_to(source) for p in source.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(source).parts)]


# ---------------------------------------------------------------- the lab


@dataclass
class Timing:
    rootfs: float = 0.0  # getting the root filesystem and the wheelhouse (0-ish: cached)
    boot: dict[int, float] = field(default_factory=dict)  # spawn -> systemd running
    install: dict[int, float] = field(default_factory=dict)  # README's steps, containers
    up: float = 0.0

    def lines(self) -> list[str]:
        out = [f"root filesystem and wheelhouse ready in {self.rootfs:.1f}s"]
        out += [f"h{i}: booted in {self.boot[i]:.1f}s, installed by the README's steps in "
                f"{self.install.get(i, 0):.1f}s" for i in sorted(self.boot)]
        out.append(f"up in {self.up:.1f}s")
        return out


class HostLab:
    """A systemd lab by name: `up`, `check`, `down` (a context manager downs on exit)."""

    def __init__(self, name: str = DEFAULT_NAME, *, state_root: Path = STATE_ROOT) -> None:
        self.topology = Topology(name)
        self.name = name
        self.state = StateDir(state_root, name)
        self.etcd = Etcd(self.state.etcd_dir, ns=self.topology.etcd_ns, host=str(ETCD_IP),
                         ports=[ETCD_PORTS], log_level="info")
        self.hosts: dict[int, Host] = {}
        self.machines: dict[int, Machine] = {}
        self.timing = Timing()
        self._steps: list[Step] | None = None

    @property
    def steps(self) -> list[Step]:
        """The README's install steps (read when first needed: `down` needs no README)."""
        if self._steps is None:
            self._steps = install_steps()
        return self._steps

    @steps.setter
    def steps(self, steps: list[Step]) -> None:
        self._steps = steps

    def __enter__(self) -> HostLab:
        return self

    def __exit__(self, *exc: object) -> None:
        for warning in self.down():
            log.warning("%s", warning)

    # ---------------------------------------------------------------- up

    def up(self, hosts: int = 3, *, timeout: float = 180) -> None:
        """Underlay, etcd, then `hosts` machines booted and installed (in parallel)."""
        if not 2 <= hosts <= 20:
            raise LabError("hosts: 2..20 (the checks send traffic between two)")
        why = machines.unavailable()
        if why:
            raise LabError(why)
        leftovers = self.topology.present()
        if leftovers or self.state.exists():
            raise LabExists(f"lab {self.name!r} exists ({', '.join(leftovers) or self.state.path}); "
                            f"run: deploy/lab hosts down --name {self.name}")
        check_packages(self.steps)
        started = time.monotonic()
        image = rootfs.rootfs()
        wheels = rootfs.wheelhouse(SOURCE)
        self.timing.rootfs = time.monotonic() - started
        self.state.create()
        self._save(image, wheels, hosts)
        self.topology.make_underlay()
        self.etcd.start(timeout=30)
        for i in range(1, hosts + 1):
            host = self.topology.host(i, self.state.host_dir(i))
            host.dir.mkdir(parents=True)
            self.topology.make_host(host, forwarding=False)
            m = self._machine(host, image, wheels, wheelhouse_dir(self.steps))
            self._stage(m)
        boot_started = time.monotonic()
        for m in self.machines.values():
            m.start()
        for i, m in self.machines.items():
            m.wait_booted(timeout=timeout)
            self.timing.boot[i] = time.monotonic() - boot_started
        # Host 1 first: it sets the network config the others wait for.
        self._install(1, timeout=timeout)
        with ThreadPoolExecutor(max_workers=max(1, hosts - 1)) as pool:
            for f in [pool.submit(self._install, i, timeout=timeout) for i in self.machines
                      if i != 1]:
                f.result()
        self.timing.up = time.monotonic() - started

    def _machine(self, host: Host, image: Path, wheels: Path, wheels_in_host: str) -> Machine:
        m = Machine(name=f"{self.name}-{host.name}", ns=host.ns, dir=host.dir, rootfs=image,
                    binds_ro=[(wheels, wheels_in_host)])
        self.hosts[host.index] = host
        self.machines[host.index] = m
        return m

    @property
    def _state_file(self) -> Path:
        return self.state.path / "hosts.json"

    def _save(self, image: Path, wheels: Path, hosts: int) -> None:
        self._state_file.write_text(json.dumps(
            {"kind": "systemd hosts", "rootfs": str(image), "wheels": str(wheels),
             "wheels_in_host": wheelhouse_dir(self.steps), "hosts": hosts}) + "\n")

    @classmethod
    def load(cls, name: str = DEFAULT_NAME, *, state_root: Path = STATE_ROOT) -> HostLab:
        """The lab `up` built (possibly in another process)."""
        lab = cls(name, state_root=state_root)
        try:
            doc = json.loads(lab._state_file.read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no systemd lab {name!r} ({lab._state_file}: {exc})") from exc
        for i in range(1, int(doc["hosts"]) + 1):
            lab._machine(lab.topology.host(i, lab.state.host_dir(i)), Path(doc["rootfs"]),
                         Path(doc["wheels"]), doc["wheels_in_host"])
        lab.etcd.attach()
        return lab

    def _stage(self, m: Machine) -> None:
        """What the lab puts on a host's disk before its first boot: the source tree
        where the README clones it, its name, the watchdog drop-in."""
        dest = m.root_upper(SOURCE_IN_HOST)
        for rel in source_files():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SOURCE / rel, target, follow_symlinks=False)
        # The image has the build machine's; a host's name is its machine's.
        m.root_upper("/etc/hostname").parent.mkdir(parents=True, exist_ok=True)
        m.root_upper("/etc/hostname").write_text(f"{m.name}\n")
        path, content = WATCHDOG_DROPIN
        dropin = m.root_upper(path)
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(content)

    def _install(self, i: int, *, timeout: float) -> None:
        """The README's steps on host i, then its containers."""
        m = self.machines[i]
        started = time.monotonic()
        for step in self.steps:
            if step.once and i != 1:
                continue
            log.info("h%d: README step %d", i, step.number)
            out = m.sh(step.script, timeout=timeout)
            log.debug("h%d: step %d:\n%s", i, step.number, out)
        # The image: the host's own busybox-static, as leaseagent.lab.docker makes it.
        applets = " ".join(docker.APPLETS)
        m.sh("img=$(mktemp -d) && mkdir \"$img/bin\" && cp /bin/busybox \"$img/bin/\" && "
             f"for a in {applets}; do ln -s busybox \"$img/bin/$a\"; done && "
             f"tar -C \"$img\" -c . | docker import - {docker.IMAGE} >/dev/null && rm -r \"$img\"")
        for c in CONTAINERS:
            m.exec(["docker", "run", "-d", "--restart", "always", "--stop-timeout", "1",
                    "--name", c, "--hostname", f"h{i}-{c}", docker.IMAGE, "sleep", "1000000000"])
        self.timing.install[i] = time.monotonic() - started

    # ---------------------------------------------------------------- queries

    def network(self) -> IPv4Network:
        """The cluster network of the README's network config."""
        for step in self.steps:
            m = re.search(r'"Network":\s*"([^"]+)"', step.text)
            if m:
                return IPv4Network(m.group(1))
        raise LabError("README's install steps set no network config")

    def subnet(self, i: int) -> IPv4Interface:
        """FLANNEL_SUBNET of host i's subnet.env."""
        text = self.machines[i].exec(["cat", "/run/leaseagent/subnet.env"]).stdout
        m = re.search(r"^FLANNEL_SUBNET=(\S+)$", text, flags=re.M)
        if not m:
            raise LabError(f"h{i}: no FLANNEL_SUBNET in subnet.env")
        return IPv4Interface(m.group(1))

    def container_ip(self, i: int, c: str) -> IPv4Address:
        out = self.machines[i].exec(
            ["docker", "inspect", "-f", "{{.NetworkSettings.Networks.bridge.IPAddress}}", c])
        ip = IPv4Address(out.stdout.strip())
        if ip not in self.network():
            raise LabError(f"h{i} {c}: {ip} is outside {self.network()}")
        return ip

    def containers_state(self, i: int) -> dict[str, tuple[str, int]]:
        """Each container's (start time, restart count): a stopped container changes both."""
        out = self.machines[i].exec(
            ["docker", "inspect", "-f", "{{.Name}} {{.State.StartedAt}} {{.RestartCount}} "
             "{{.State.Running}}", *CONTAINERS]).stdout
        state = {}
        for line in out.splitlines():
            name, started, count, running = line.split()
            state[name.lstrip("/")] = (started if running == "true" else "not running",
                                       int(count))
        return state

    def unit(self, i: int, unit: str, *props: str) -> dict[str, str]:
        out = self.machines[i].exec(["systemctl", "show", unit, *(f"-p{p}" for p in props)])
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def ping(self, i: int, c: str, ip: IPv4Address, *, count: int = 1,
             interval: float = 1.0) -> tuple[int, int]:
        """(sent, received) of `ping` from container c of host i."""
        if ip not in self.network():
            raise LabError(f"{ip} is not a container address of the lab")
        r = self.machines[i].exec(
            ["docker", "exec", c, "ping", "-q", "-c", str(count), "-i", f"{interval:g}",
             "-W", "1", str(ip)], check=False, timeout=count * interval + 30)
        return parse_ping_summary(r.stdout)

    def wait_reachable(self, *, timeout: float = 30) -> dict[tuple[int, int], bool]:
        """Every host's c1 -> every other host's c1, until all reach or `timeout`."""
        targets = {i: self.container_ip(i, CONTAINERS[0]) for i in self.machines}
        deadline = time.monotonic() + timeout
        result: dict[tuple[int, int], bool] = {}
        while True:
            for i in self.machines:
                for j, ip in targets.items():
                    if i != j and not result.get((i, j)):
                        result[(i, j)] = self.ping(i, CONTAINERS[0], ip)[1] == 1
            if all(result.values()) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    # ---------------------------------------------------------------- down

    def down(self) -> list[str]:
        return teardown.down(self.topology, self.state)


# ---------------------------------------------------------------- the check


@dataclass
class Result:
    name: str
    ok: bool
    detail: str
    seconds: float


def _wait(what: str, predicate: Callable[[], bool], *, timeout: float,
          interval: float = 0.2) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise LabError(f"{what}: not after {timeout:.0f}s")
        time.sleep(interval)
    return time.monotonic() - started


def _clear_docker_start_limit(m: Machine) -> None:
    """Debian's docker.service allows 3 starts in 60 s (StartLimitBurst=3): the boot, the
    README's `systemctl restart docker` and the checks start Docker more often than that
    within a minute, so a check that starts it clears the count first."""
    m.exec(["systemctl", "reset-failed", "docker.service"])


def check_forward_policy(lab: HostLab) -> str:
    policies = {i: m.exec(["iptables", "-S", "FORWARD"]).stdout.splitlines()[0]
                for i, m in lab.machines.items()}
    wrong = {i: p for i, p in policies.items() if p != "-P FORWARD DROP"}
    if wrong:
        raise LabError(f"FORWARD policy not DROP: {wrong}")
    return "-P FORWARD DROP on every host (Docker's)"


def check_cross_host(lab: HostLab) -> str:
    result = lab.wait_reachable(timeout=30)
    failed = [f"h{i}->h{j}" for (i, j), ok in result.items() if not ok]
    if failed:
        raise LabError(f"not reached: {', '.join(failed)}")
    return f"{len(result)}/{len(result)} host pairs, container to container"


def check_status_line(lab: HostLab) -> str:
    """Each agent's STATUS= (`systemctl status`) counts every other host as a peer."""
    want = len(lab.machines) - 1
    texts = {i: lab.unit(i, "leaseagent", "StatusText")["StatusText"] for i in lab.machines}
    wrong = {i: t for i, t in texts.items()
             if not (m := re.search(r"\b(\d+) peers?\b", t)) or int(m.group(1)) != want}
    if wrong:
        raise LabError(f"STATUS= does not say {want} peers: {wrong}")
    return f"{texts[1]!r} (and so on every host)"


def check_journal(lab: HostLab) -> str:
    """The agent's journal lines carry the journal's timestamp only (not a second one of
    the agent's own)."""
    stamped = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d")
    for i in lab.machines:
        lines = lab.machines[i].exec(["journalctl", "-u", "leaseagent", "-o", "cat", "-n", "50",
                                      "_COMM=leaseagent"]).stdout.splitlines()
        if not lines:
            raise LabError(f"h{i}: no journal lines of the agent")
        twice = [line for line in lines if stamped.match(line)]
        if twice:
            raise LabError(f"h{i}: {len(twice)}/{len(lines)} journal lines carry a timestamp "
                           f"of their own, e.g. {twice[0][:100]!r}")
    return f"one timestamp per line (the journal's), e.g. {lines[-1][:80]!r}"


def check_restart(lab: HostLab, *, duration: float = 8.0, interval: float = 0.02) -> str:
    """A ping flood both ways between h1 and h2 across `systemctl restart leaseagent` on h1."""
    m1 = lab.machines[1]
    docker_pid = lab.unit(1, "docker", "MainPID")["MainPID"]
    agent_pid = lab.unit(1, "leaseagent", "MainPID")["MainPID"]
    containers = lab.containers_state(1)
    count = int(duration / interval)
    floods = {}
    for src, dst in ((1, 2), (2, 1)):
        ip = lab.container_ip(dst, CONTAINERS[0])
        floods[(src, dst)] = subprocess.Popen(
            lab.machines[src].exec_argv(["docker", "exec", CONTAINERS[0], "ping", "-q", "-c",
                                         str(count), "-i", f"{interval:g}", str(ip)]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(duration / 4)
    started = time.monotonic()
    m1.exec(["systemctl", "restart", "leaseagent"], timeout=120)
    restarted = time.monotonic() - started
    if any(proc.poll() is not None for proc in floods.values()):
        raise LabError(f"a ping flood ended before the restart did ({restarted:.1f}s)")
    lost = {}
    for pair, proc in floods.items():
        out, _ = proc.communicate(timeout=duration + 60)
        sent, received = parse_ping_summary(out)
        if sent < count:
            raise LabError(f"flood h{pair[0]}->h{pair[1]}: only {sent}/{count} sent: {out}")
        lost[pair] = sent - received
    new_agent = lab.unit(1, "leaseagent", "MainPID")["MainPID"]
    problems = []
    if new_agent == agent_pid:
        problems.append("the agent was not restarted")
    if any(lost.values()):
        problems.append(f"pings lost: {lost}")
    if lab.unit(1, "docker", "MainPID")["MainPID"] != docker_pid:
        problems.append("dockerd was restarted")
    if lab.containers_state(1) != containers:
        problems.append(f"containers restarted: {containers} -> {lab.containers_state(1)}")
    if problems:
        raise LabError("; ".join(problems))
    return (f"restart took {restarted:.1f}s; {2 * count} pings at {interval * 1000:.0f} ms "
            f"across it, 0 lost; dockerd and {len(containers)} containers untouched")


def check_watchdog(lab: HostLab) -> str:
    before = lab.unit(1, "leaseagent", "MainPID", "NRestarts")
    docker_pid = lab.unit(1, "docker", "MainPID")["MainPID"]
    containers = lab.containers_state(1)
    lab.machines[1].exec(["kill", "-STOP", before["MainPID"]])
    started = time.monotonic()

    def restarted() -> bool:
        now = lab.unit(1, "leaseagent", "MainPID", "ActiveState", "SubState", "NRestarts")
        return (now["MainPID"] not in ("0", before["MainPID"]) and now["SubState"] == "running"
                and int(now["NRestarts"]) > int(before["NRestarts"]))

    _wait("watchdog restart", restarted, timeout=WATCHDOG_SEC + 60)
    took = time.monotonic() - started
    journal = lab.machines[1].exec(["journalctl", "-u", "leaseagent", "-o", "cat",
                                    "--since", "-2min"]).stdout
    if "Watchdog timeout" not in journal:
        raise LabError("restarted, but the journal has no watchdog timeout")
    if lab.unit(1, "docker", "MainPID")["MainPID"] != docker_pid:
        raise LabError("dockerd was restarted")
    if lab.containers_state(1) != containers:
        raise LabError("containers restarted")
    return (f"SIGSTOP -> watchdog kill and restart in {took:.1f}s (WatchdogSec={WATCHDOG_SEC}, "
            "the lab's drop-in); dockerd and containers untouched")


def check_config_error(lab: HostLab) -> str:
    m1 = lab.machines[1]
    docker_pid = lab.unit(1, "docker", "MainPID")["MainPID"]
    containers = lab.containers_state(1)
    bad = "LEASEAGENT_LEASE_TTL=ten"
    m1.sh(f"echo {shlex.quote(bad)} >>/etc/default/leaseagent")
    try:
        r = m1.exec(["systemctl", "restart", "leaseagent"], check=False, timeout=120)
        if r.returncode == 0:
            raise LabError(f"systemctl restart succeeded with {bad}")
        state = lab.unit(1, "leaseagent", "ExecMainStatus", "ActiveState", "NRestarts")
        if state["ExecMainStatus"] != "2" or state["ActiveState"] != "failed":
            raise LabError(f"after {bad}: {state}, not exit 2 and failed")
        # A docker command (which may socket-activate docker) and RestartSec twice over.
        m1.exec(["docker", "ps", "-q"])
        time.sleep(5)
        after = lab.unit(1, "leaseagent", "ExecMainStatus", "ActiveState", "NRestarts")
        if after != state:
            raise LabError(f"the failed agent was started again: {state} -> {after}")
        line = m1.exec(["journalctl", "-u", "leaseagent", "-o", "cat", "-n", "30"]).stdout
        error = next((x for x in reversed(line.splitlines()) if "ten" in x), "")
        if lab.unit(1, "docker", "ActiveState", "MainPID") != {"ActiveState": "active",
                                                              "MainPID": docker_pid}:
            raise LabError("Docker did not keep running")
        if lab.containers_state(1) != containers:
            raise LabError("containers restarted")
        sent, received = lab.ping(2, CONTAINERS[0], lab.container_ip(1, CONTAINERS[0]),
                                  count=3, interval=0.2)
        if received != sent:
            raise LabError(f"h2 -> h1 while the agent is down: {received}/{sent}")
        # Docker stopped, then started by its socket (a docker command): the failed agent
        # stays as it is.
        m1.exec(["systemctl", "stop", "docker.service"], timeout=120)
        _clear_docker_start_limit(m1)
        m1.exec(["docker", "ps", "-q"], timeout=120)
        time.sleep(3)
        if lab.unit(1, "docker", "ActiveState")["ActiveState"] != "active":
            raise LabError("docker ps did not start Docker through its socket")
        again = lab.unit(1, "leaseagent", "ExecMainStatus", "ActiveState", "NRestarts")
        if again != state:
            raise LabError(f"Docker's socket activation started the failed agent: {state} -> "
                           f"{again}")
    finally:
        m1.sh(f"sed -i '/^{bad}$/d' /etc/default/leaseagent")
        m1.exec(["systemctl", "reset-failed", "leaseagent"], check=False)
        m1.exec(["systemctl", "start", "leaseagent"], timeout=120)
    _wait("h1: containers back", lambda: all(
        s[0] != "not running" for s in lab.containers_state(1).values()), timeout=60)
    return (f"{bad}: exit 2, failed, not restarted; Docker, its containers and the overlay "
            "kept running; Docker stopped and socket-activated by `docker ps` left the agent "
            f"failed; journal: {error.strip()[:160]}")


def check_docker_alone(lab: HostLab) -> str:
    """Docker restarted while the agent is stopped: it comes up on its own (on the options
    the agent left) and does not start the agent."""
    m1 = lab.machines[1]
    m1.exec(["systemctl", "stop", "leaseagent"], timeout=60)
    try:
        _clear_docker_start_limit(m1)
        started = time.monotonic()
        m1.exec(["systemctl", "restart", "docker"], timeout=120)
        took = time.monotonic() - started
        agent = lab.unit(1, "leaseagent", "ActiveState")["ActiveState"]
        if agent != "inactive":
            raise LabError(f"restarting Docker made the stopped agent {agent}")
        _wait("h1: containers back", lambda: all(
            s[0] != "not running" for s in lab.containers_state(1).values()), timeout=60)
        docker0 = m1.exec(["ip", "-4", "-o", "addr", "show", "docker0"]).stdout.split()[3]
        if IPv4Interface(docker0) != lab.subnet(1):
            raise LabError(f"Docker came back on {docker0}, not the agent's {lab.subnet(1)}")
    finally:
        m1.exec(["systemctl", "start", "leaseagent"], timeout=120)
    sent, received = lab.ping(2, CONTAINERS[0], lab.container_ip(1, CONTAINERS[0]), count=3,
                              interval=0.2)
    if received != sent:
        raise LabError(f"h2 -> h1 after Docker's restart: {received}/{sent}")
    return (f"`systemctl restart docker` with the agent stopped: {took:.1f}s, docker0 on "
            f"{docker0}, the agent left stopped; started again, h2 reaches h1")


def check_reboot(lab: HostLab) -> str:
    i = 2
    m = lab.machines[i]
    subnet = lab.subnet(i)
    down = m.reboot()
    started = time.monotonic()
    m.wait_booted(timeout=120)
    booted = time.monotonic() - started
    _wait(f"h{i}: leaseagent active after the reboot",
          lambda: lab.unit(i, "leaseagent", "ActiveState")["ActiveState"] == "active",
          timeout=120)
    after = lab.subnet(i)
    if after != subnet:
        raise LabError(f"h{i} rebooted onto {after}, not its own {subnet}")
    _wait(f"h{i}: containers back", lambda: all(
        s[0] != "not running" for s in lab.containers_state(i).values()), timeout=60)
    reach = lab.wait_reachable(timeout=30)
    failed = [f"h{a}->h{b}" for (a, b), ok in reach.items() if not ok]
    if failed:
        raise LabError(f"after the reboot, not reached: {', '.join(failed)}")
    return (f"h{i} rebooted (shutdown {down:.1f}s, boot {booted:.1f}s) and took back "
            f"{subnet.network}; its containers are back and reach every host")


CHECKS: tuple[tuple[str, Callable[[HostLab], str]], ...] = (
    ("forward policy", check_forward_policy),
    ("cross-host pings", check_cross_host),
    ("status line", check_status_line),
    ("journal", check_journal),
    ("restart, 0 pings lost", check_restart),
    ("watchdog", check_watchdog),
    ("config error", check_config_error),
    ("docker without the agent", check_docker_alone),
    ("reboot", check_reboot),
)


def check(lab: HostLab, names: Sequence[str] | None = None) -> list[Result]:
    """Run the checks (all, or those named) in order; one Result each. A failed check
    does not stop the others."""
    results = []
    for name, fn in CHECKS:
        if names is not None and name not in names:
            continue
        started = time.monotonic()
        try:
            detail, ok = fn(lab), True
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            detail, ok = str(exc), False
        results.append(Result(name, ok, detail, time.monotonic() - started))
        log.info("%s: %s (%.1fs) %s", name, "ok" if ok else "FAILED",
                 results[-1].seconds, detail)
    return results


