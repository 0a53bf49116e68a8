"""The agent's settings as systemd gives them to it, for leasectl in a plain root shell.

The unit is the one place that says the agent's settings on a host: its
`Environment=` lines (its own defaults, e.g. LEASEAGENT_METRICS_ADDR), then each
`EnvironmentFile=` in order (/etc/default/leaseagent, the operator's), later
ones winning, drop-ins (`leaseagent.service.d/*.conf`, in name order) after the
unit, as systemd reads them. `leasectl` starts from that, and a variable set
in its own environment wins: `leasectl doctor` in a new shell sees the host as
the agent does, without `set -a; . /etc/default/leaseagent`, and nothing here
repeats a default the unit holds.

Only what the unit's syntax needs here is read: `Environment=` assignments
(space-separated, quoted or not), `EnvironmentFile=` paths (a leading `-`: may
be missing), and in the files `KEY=VALUE` lines with `#`/`;` comments and a
value in single or double quotes. A file that cannot be read is skipped, as
systemd skips a `-` one; leasectl then says what is missing itself (no etcd
endpoints: it asks 127.0.0.1:2379).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from leaseagent.core.subnetenv import parse_environment_file

UNIT = Path("/etc/systemd/system/leaseagent.service")  # where install.sh puts it


def unit_files(unit: Path = UNIT) -> list[Path]:
    """The unit, then its drop-ins in the order systemd reads them."""
    dropins = unit.parent / f"{unit.name}.d"
    try:
        found = sorted(p for p in dropins.iterdir() if p.suffix == ".conf")
    except OSError:
        found = []
    return [unit, *found]


def unit_environment(files: Iterable[Path]) -> dict[str, str]:
    """The environment the unit in `files` gives its command: every Environment=, then
    every EnvironmentFile= (each file read when it is named, as systemd applies them
    after all Environment= lines)."""
    env: dict[str, str] = {}
    env_files: list[Path] = []
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key == "Environment":
                try:
                    words = shlex.split(value)
                except ValueError:
                    continue
                for word in words:
                    name, sep, setting = word.partition("=")
                    if sep:
                        env[name] = setting
            elif key == "EnvironmentFile" and value:
                env_files.append(Path(value.removeprefix("-")))
    for path in env_files:
        try:
            env.update(parse_environment_file(path.read_text()))
        except (OSError, UnicodeDecodeError):
            continue
    return env


def host_environment(environ: Mapping[str, str], unit: Path = UNIT) -> dict[str, str]:
    """`environ` over the unit's environment: what leasectl reads its settings from."""
    return {**unit_environment(unit_files(unit)), **environ}
