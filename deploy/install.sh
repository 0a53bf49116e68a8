#!/usr/bin/env bash
# Install leaseagent on a host (as root), or take it away again:
#   /opt/leaseagent/                          a venv holding the package (from a wheel or a source dir)
#   /usr/local/bin/leaseagent, leasectl       symlinks into that venv
#   /etc/systemd/system/leaseagent.service    the unit
#   /etc/systemd/system/docker.service.d/leaseagent.conf   only with --docker: docker.service's
#                                             own ExecStart= with $DOCKER_NETWORK_OPTIONS added
#   /etc/systemd/system/leaseagent-docker-restart.{path,service}   only with --docker, not
#                                             enabled: restart docker when the subnet changes
#   /etc/default/leaseagent                   the settings, every line commented, only if there is none
#   /etc/leaseagent/                          mode 0700, for etcd credentials (files, never flags)
#   /usr/share/bash-completion/completions/{leasectl,leaseagent}
#   /usr/share/doc/leaseagent/README.md       what the unit's Documentation= points at
#
# Offline: --wheelhouse DIR installs from the wheels in DIR alone and never asks a
# package index (PIP_NO_INDEX, PIP_FIND_LINKS: pip's own variables, which its build of
# the source tree obeys too); DIR needs the package's dependencies as pinned in
# deploy/constraints.txt, and to build this source tree setuptools and wheel (or give
# --wheel). When pip cannot install, one line says what it could not find (the rest of
# pip's words are kept in a file the line names).
#
# Idempotent: a second run leaves the same tree (and never overwrites
# /etc/default/leaseagent, which is the operator's). `systemctl daemon-reload`
# runs only when systemd is running and --root is /. Nothing is started or
# enabled: that is the operator's call (`systemctl enable --now leaseagent`).
#
# --uninstall stops and disables the unit (when systemd runs here) and removes
# every file above but the operator's: /etc/default/leaseagent and /etc/leaseagent/
# stay unless --purge. The kernel state the agent made (device, routes) and its
# lease in etcd are left alone: see the README, "Uninstall".
set -euo pipefail

USAGE="usage: install.sh [--root DIR] [--source DIR | --wheel FILE] [--wheelhouse DIR] [--docker] [--no-venv]
       install.sh --uninstall [--purge] [--root DIR]
  --root DIR     install under DIR instead of / (a staging tree or a test); the venv's
                 scripts then name DIR in their #! line, so only use it for images
                 that are mounted at / later, or with --no-venv
  --source DIR   the source tree to install (default: the one holding this script)
  --wheel FILE   a built wheel to install instead
  --wheelhouse DIR  install offline: every wheel from DIR, no package index asked
  --docker       also install the docker.service drop-in
  --no-venv      skip the venv (the files and symlinks only)
  --uninstall    remove what install.sh installed (not /etc/default/leaseagent, /etc/leaseagent)
  --purge        with --uninstall: those two as well"

usage() {
    echo "$USAGE" >&2
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
wheelhouse=""
docker=0
venv=1
uninstall=0
purge=0

while [ "$#" -gt 0 ]; do
    case "$1" in
        --root|--prefix) [ "$#" -ge 2 ] || usage; root="$2"; shift 2 ;;
        --source) [ "$#" -ge 2 ] || usage; source_dir="$2"; shift 2 ;;
        --wheel) [ "$#" -ge 2 ] || usage; wheel="$2"; shift 2 ;;
        --wheelhouse) [ "$#" -ge 2 ] || usage; wheelhouse="$2"; shift 2 ;;
        --docker) docker=1; shift ;;
        --no-venv) venv=0; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) echo "$USAGE"; exit 0 ;;
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
opt=/opt/leaseagent
live=0
if [ "$root" = / ] && [ -d /run/systemd/system ]; then
    live=1
fi
dropin="$dest/etc/systemd/system/docker.service.d/leaseagent.conf"
completions="$dest/usr/share/bash-completion/completions"

if [ "$uninstall" = 1 ]; then
    if [ "$live" = 1 ] && systemctl cat leaseagent.service >/dev/null 2>&1; then
        systemctl disable --now leaseagent.service
    fi
    if [ "$live" = 1 ] && systemctl cat leaseagent-docker-restart.path >/dev/null 2>&1; then
        systemctl disable --now leaseagent-docker-restart.path
    fi
    rm -f "$dest/usr/local/bin/leaseagent" "$dest/usr/local/bin/leasectl" \
        "$dest/etc/systemd/system/leaseagent.service" "$dropin" \
        "$dest/etc/systemd/system/leaseagent-docker-restart.path" \
        "$dest/etc/systemd/system/leaseagent-docker-restart.service" \
        "$completions/leasectl" "$completions/leaseagent"
    rmdir "$dest/etc/systemd/system/docker.service.d" 2>/dev/null || true
    rm -rf "$dest$opt" "$dest/usr/share/doc/leaseagent"
    if [ "$purge" = 1 ]; then
        rm -rf "$dest/etc/default/leaseagent" "$dest/etc/leaseagent"
        kept=""
    else
        kept=" (kept: /etc/default/leaseagent, /etc/leaseagent/; --purge removes them)"
    fi
    if [ "$live" = 1 ]; then
        systemctl daemon-reload
    fi
    echo "install.sh: uninstalled from $root$kept"
    exit 0
fi

[ -f "$source_dir/systemd/leaseagent.service" ] || die "--source $source_dir: not a leaseagent source tree"
if [ -n "$wheel" ] && [ ! -f "$wheel" ]; then
    die "--wheel $wheel: no such file"
fi
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || die "--wheelhouse $wheelhouse: no such directory"
    wheelhouse="$(cd "$wheelhouse" && pwd)"
fi

# pip install "$@" into the venv; on failure one line saying what pip could not get.
pip_install() {
    local log missing
    log="$(mktemp "${TMPDIR:-/tmp}/leaseagent-install-pip.XXXXXX")"
    if "${pip[@]}" "$@" 2>"$log"; then
        rm -f "$log"
        return 0
    fi
    # pip says "No matching distribution found for NAME" for what it could not get.
    missing="$(sed -n 's/.*No matching distribution found for \(.*\)$/\1/p' "$log" | tail -1)"
    if [ -n "$missing" ] && [ -n "$wheelhouse" ]; then
        die "$missing is not in the wheelhouse $wheelhouse (offline install: it needs every wheel of deploy/constraints.txt's dependencies, and setuptools and wheel to build the source; README, \"Installing offline\"; pip's words: $log)"
    elif [ -n "$missing" ]; then
        die "pip could not get $missing from the package index (offline? give --wheelhouse DIR; README, \"Installing offline\"; pip's words: $log)"
    fi
    die "pip install failed: $(grep -v '^ *$' "$log" | tail -1) (pip's words: $log)"
}

if [ "$venv" = 1 ]; then
    command -v python3 >/dev/null || die "python3 not found (apt-get install --no-install-recommends python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "leaseagent needs Python 3.11 or newer; $(python3 --version) found"
    if [ ! -x "$dest$opt/bin/python" ]; then
        python3 -m venv "$dest$opt"
    fi
    pip=("$dest$opt/bin/pip" install -q --disable-pip-version-check)
    if [ -n "$wheelhouse" ]; then
        # As variables too: pip's build of the source tree (its own pip, for setuptools)
        # reads them, and a pip.conf naming an index does not win over them.
        export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheelhouse"
        pip+=(--no-index --find-links "$wheelhouse")
    fi
    if [ -f "$source_dir/deploy/constraints.txt" ]; then
        pip+=(-c "$source_dir/deploy/constraints.txt")
    fi
    if [ -n "$wheel" ]; then
        pip_install "$wheel"
    else
        pip_install "$source_dir"
    fi
fi

# The command docker.service runs: its unit's ExecStart=, unless a drop-in (not
# ours) replaces it; the last non-empty one wins, as systemd has it.
docker_execstart() {
    local file line value cmd=""
    for file in "$dest/lib/systemd/system/docker.service" "$dest/usr/lib/systemd/system/docker.service" \
        "$dest/etc/systemd/system/docker.service" "$dest"/etc/systemd/system/docker.service.d/*.conf; do
        [ -f "$file" ] || continue
        [ "$file" = "$dropin" ] && continue
        while IFS= read -r line; do
            case "$line" in
                ExecStart=*) value="${line#ExecStart=}"; [ -z "$value" ] || cmd="$value" ;;
            esac
        done <"$file"
    done
    echo "$cmd"
}

install -d -m 0755 "$dest/usr/local/bin" "$dest/etc/systemd/system" "$dest/etc/default" \
    "$dest/usr/share/doc/leaseagent" "$completions"
for cmd in leaseagent leasectl; do
    # Absolute targets without the root prefix: right once the tree is mounted at /.
    ln -sfn "$opt/bin/$cmd" "$dest/usr/local/bin/$cmd"
    install -m 0644 "$source_dir/deploy/leasectl.bash-completion" "$completions/$cmd"
done
install -m 0644 "$source_dir/systemd/leaseagent.service" "$dest/etc/systemd/system/leaseagent.service"
if [ "$docker" = 1 ]; then
    # docker.io only recommends apparmor: on a kernel with AppArmor on (Debian's), a
    # dockerd without apparmor_parser cannot load its docker-default profile and every
    # `docker run` fails (seen in the Vagrant lab's VMs). Checked on the host the
    # install is for: LEASEAGENT_APPARMOR_ENABLED names the kernel's flag file (tests).
    aa_flag="${LEASEAGENT_APPARMOR_ENABLED:-/sys/module/apparmor/parameters/enabled}"
    if [ "$(cat "$aa_flag" 2>/dev/null)" = Y ] && ! PATH="$dest/usr/sbin:$dest/sbin:$PATH" command -v apparmor_parser >/dev/null; then
        echo "install.sh: warning: the kernel has AppArmor on but apparmor_parser is missing: every 'docker run' will fail; install it: apt-get install --no-install-recommends apparmor" >&2
    fi
    # The restart hook: installed, not enabled (restarting docker restarts its containers).
    for hook in leaseagent-docker-restart.path leaseagent-docker-restart.service; do
        install -m 0644 "$source_dir/systemd/$hook" "$dest/etc/systemd/system/$hook"
    done
    install -d -m 0755 "$dest/etc/systemd/system/docker.service.d"
    template="$source_dir/systemd/docker.service.d/leaseagent.conf"
    cmd="$(docker_execstart)"
    if [ -z "$cmd" ]; then
        echo "install.sh: no docker.service found; the drop-in assumes Debian's docker.io" >&2
        install -m 0644 "$template" "$dropin"
    else
        case "$cmd" in
            *"\$DOCKER_NETWORK_OPTIONS"*) ;;
            *) cmd="$cmd \$DOCKER_NETWORK_OPTIONS" ;;
        esac
        tmp="$(mktemp "$dropin.XXXXXX")"
        # The template with its last line, the ExecStart=, made from docker.service's own.
        sed '$d' "$template" >"$tmp"
        printf 'ExecStart=%s\n' "$cmd" >>"$tmp"
        chmod 0644 "$tmp"
        mv "$tmp" "$dropin"
    fi
fi
if [ ! -e "$dest/etc/default/leaseagent" ]; then
    install -m 0644 "$source_dir/deploy/leaseagent.default" "$dest/etc/default/leaseagent"
fi
install -d -m 0700 "$dest/etc/leaseagent"
# install -d leaves an existing directory's mode alone: credentials must not be readable.
chmod 0700 "$dest/etc/leaseagent"
install -m 0644 "$source_dir/README.md" "$dest/usr/share/doc/leaseagent/README.md"

if [ "$live" = 1 ]; then
    systemctl daemon-reload
fi
note=""
[ "$venv" = 1 ] || note=" (without the venv)"
echo "install.sh: installed under $root$note"
