"""`leasectl doctor` on a lab host, with the flags its agent runs with (one place for the
e2e tests that ask doctor about a lab host)."""

from __future__ import annotations

import subprocess

from leaseagent.lab import Host, Lab, tool

DOCTOR_FLAGS = ("--etcd-endpoints", "--etcd-prefix", "--iface", "--public-ip", "--subnet-file",
                "--state-dir")


def doctor_flags(lab: Lab, host: Host, overrides: dict[str, str] | None = None) -> list[str]:
    """The doctor flags of the host's agent command line, `overrides` replacing some."""
    argv = lab.agent_argv(host)
    flags = {arg: argv[i + 1] for i, arg in enumerate(argv) if arg in DOCTOR_FLAGS}
    flags.update(overrides or {})
    return [x for flag, value in flags.items() for x in (flag, value)]


def doctor(lab: Lab, host: Host, *extra: str, overrides: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """`leasectl doctor` in the host's namespace with the flags its agent runs with."""
    cmd = ["ip", "netns", "exec", host.ns, tool("leasectl"), "doctor", *extra,
           *doctor_flags(lab, host, overrides)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
