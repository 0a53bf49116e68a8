#!/usr/bin/env bash
# Install leaseagent on a host (as root):
#   /opt/leaseagent/                          a venv holding the package (from a wheel or a source dir)
#   /usr/local/bin/leaseagent, leasectl       symlinks into that venv
#   /etc/systemd/system/leaseagent.service    the unit
#   /etc/systemd/system/docker.service.d/leaseagent.conf   only with --docker
#   /etc/default/leaseagent                   the example settings, only if there is none yet
#   /etc/leaseagent/                          mode 0700, for etcd credentials (files, never flags)
#   /usr/share/doc/leaseagent/README.md       what the unit's Documentation= points at
#
# Idempotent: a second run leaves the same tree (and never overwrites
# /etc/default/leaseagent, which is the operator's). `systemctl daemon-reload`
# runs only when systemd is running and --root is /. Nothing is started or
# enabled: that is the operator's call (`systemctl enable --now leaseagent`).
#
# Usage: install.sh [--root DIR] [--source DIR | --wheel FILE] [--docker] [--no-venv]
#   --root DIR     install under DIR instead of / (a staging tree or a test); the venv's
#                  scripts then name DIR in their #! line, so only use it for images
#                  that are mounted at / later, or with --no-venv
#   --source DIR   the source tree to install (default: the one holding this script)
#   --wheel FILE   a built wheel to install instead
#   --docker       also install the docker.service drop-in
#   --no-venv      skip the venv (the files and symlinks only)
set -euo pipefail

usage() {
    echo "usage: install.sh [--root DIR] [--source DIR | --wheel FILE] [--docker] [--no-venv]" >&2
    exit 2
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here="$(cd "$(dirname "$0")" && pwd)"
source_dir="$(dirname "$here")"
root=/
wheel=""
docker=0
venv=1

while [ "$#" -gt 0 ]; do
    case "$1" in
        --root|--prefix) [ "$#" -ge 2 ] || usage; root="$2"; shift 2 ;;
        --source) [ "$#" -ge 2 ] || usage; source_dir="$2"; shift 2 ;;
        --wheel) [ "$#" -ge 2 ] || usage; wheel="$2"; shift 2 ;;
        --docker) docker=1; shift ;;
        --no-venv) venv=0; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
done

[ -d "$root" ] || die "--root $root: no such directory"
root="$(cd "$root" && pwd)"
if [ "$root" = / ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or give --root DIR to stage the files elsewhere)"
fi
# Under --root /, "$root/etc" would be "//etc": strip the trailing slash once.
dest="${root%/}"
[ -f "$source_dir/systemd/leaseagent.service" ] || die "--source $source_dir: not a leaseagent source tree"
if [ -n "$wheel" ] && [ ! -f "$wheel" ]; then
    die "--wheel $wheel: no such file"
fi

opt=/opt/leaseagent
if [ "$venv" = 1 ]; then
    command -v python3 >/dev/null || die "python3 not found (apt-get install --no-install-recommends python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "leaseagent needs Python 3.11 or newer; $(python3 --version) found"
    if [ ! -x "$dest$opt/bin/python" ]; then
        python3 -m venv "$dest$opt"
    fi
    pip=("$dest$opt/bin/pip" install -q --disable-pip-version-check)
    if [ -f "$source_dir/deploy/constraints.txt" ]; then
        pip+=(-c "$source_dir/deploy/constraints.txt")
    fi
    if [ -n "$wheel" ]; then
        "${pip[@]}" "$wheel"
    else
        "${pip[@]}" "$source_dir"
    fi
fi

install -d -m 0755 "$dest/usr/local/bin" "$dest/etc/systemd/system" "$dest/etc/default" \
    "$dest/usr/share/doc/leaseagent"
for cmd in leaseagent leasectl; do
    # Absolute targets without the root prefix: right once the tree is mounted at /.
    ln -sfn "$opt/bin/$cmd" "$dest/usr/local/bin/$cmd"
done
install -m 0644 "$source_dir/systemd/leaseagent.service" "$dest/etc/systemd/system/leaseagent.service"
if [ "$docker" = 1 ]; then
    install -d -m 0755 "$dest/etc/systemd/system/docker.service.d"
    install -m 0644 "$source_dir/systemd/docker.service.d/leaseagent.conf" \
        "$dest/etc/systemd/system/docker.service.d/leaseagent.conf"
fi
if [ ! -e "$dest/etc/default/leaseagent" ]; then
    install -m 0644 "$source_dir/deploy/leaseagent.default" "$dest/etc/default/leaseagent"
fi
install -d -m 0700 "$dest/etc/leaseagent"
# install -d leaves an existing directory's mode alone: credentials must not be readable.
chmod 0700 "$dest/etc/leaseagent"
install -m 0644 "$source_dir/README.md" "$dest/usr/share/doc/leaseagent/README.md"

if [ "$root" = / ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
note=""
[ "$venv" = 1 ] || note=" (without the venv)"
echo "install.sh: installed under $root$note"
