#!/usr/bin/env bash
# Build the Vagrant lab's box locally (as root, on Debian): Debian bookworm by
# debootstrap, booted by direct kernel boot (Debian's stock kernel and initrd,
# taken from the rootfs), and the wheelhouse the VMs install leaseagent from.
# Needs: debootstrap, e2fsprogs, qemu-utils, the Debian mirror (apt's), and
# PyPI (or pip's configured index) for the wheelhouse. Nothing is downloaded
# by the VMs later: they have no network but the lab's.
#
#   deploy/vagrant/build-box.sh [--force]
#
# Writes into $LEASEAGENT_VAGRANT_DIR (default /var/tmp/leaseagent-vagrant):
#   rootfs/                  the debootstrap tree (kept: a rebuild reuses it unless --force)
#   box/box.img metadata.json Vagrantfile   the libvirt box, added as "leaseagent-bookworm"
#   vmlinuz initrd.img       the kernel and initrd the Vagrantfile boots
#   wheelhouse/              leaseagent's wheel and its pinned dependencies
# The image is one ext4 filesystem without a partition table (root=/dev/vda).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
src="$(cd "$here/../.." && pwd)"
out="${LEASEAGENT_VAGRANT_DIR:-/var/tmp/leaseagent-vagrant}"
box_name="leaseagent-bookworm"
force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) echo "build-box.sh: unknown argument: $1 (usage: build-box.sh [--force])" >&2; exit 2 ;;
esac

die() {
    echo "build-box.sh: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
for tool in debootstrap mkfs.ext4 qemu-img vagrant; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install --no-install-recommends debootstrap e2fsprogs qemu-utils vagrant vagrant-libvirt)"
done
key="$(gem contents vagrant 2>/dev/null | grep '/keys/vagrant.pub$' || true)"
[ -n "$key" ] || key="$(find /usr/share/rubygems-integration /usr/lib/ruby -path '*vagrant*/keys/vagrant.pub' 2>/dev/null | head -n 1)"
[ -f "$key" ] || die "vagrant's insecure public key (keys/vagrant.pub) not found in the vagrant gem"

mkdir -p "$out"
rootfs="$out/rootfs"
start=$(date +%s)

# Everything a VM of either role needs, so the VMs never reach a mirror.
packages=(
    linux-image-amd64 initramfs-tools systemd-sysv udev dbus kmod procps iproute2
    ifupdown isc-dhcp-client netbase openssh-server sudo rsync ca-certificates
    python3 python3-venv docker.io iptables ipset busybox-static
    # Debian's kernel enables AppArmor: without apparmor_parser, dockerd cannot load its
    # docker-default profile and every `docker run` fails (exit 127 in check.sh before).
    apparmor
    etcd-server etcd-client tcpdump wireguard-tools
)
# A cached rootfs is used only if it holds every package above.
missing=0
if [ -e "$rootfs/vmlinuz" ]; then
    for pkg in "${packages[@]}"; do
        chroot "$rootfs" dpkg-query -W -f="\${Status}" "$pkg" 2>/dev/null | grep -q 'ok installed' || missing=1
    done
fi
if [ "$force" = 1 ] || [ "$missing" = 1 ] || [ ! -e "$rootfs/vmlinuz" ]; then
    rm -rf "$rootfs"
    echo "build-box.sh: debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
        bookworm "$rootfs" http://deb.debian.org/debian >"$out/debootstrap.log" 2>&1 \
        || die "debootstrap failed; the last lines of $out/debootstrap.log: $(tail -n 3 "$out/debootstrap.log" | tr '\n' ' ')"
fi

echo "build-box.sh: configuring the rootfs"
cat >"$rootfs/etc/fstab" <<'EOF'
/dev/vda / ext4 defaults,errors=remount-ro 0 1
EOF
# eth0: vagrant-libvirt's management network (DHCP, vagrant ssh); vagrant writes eth1.
cat >"$rootfs/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
echo leaseagent-box >"$rootfs/etc/hostname"
# Every VM makes its own machine-id and ssh host keys at first boot.
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs"/etc/ssh/ssh_host_*
mkdir -p "$rootfs/etc/systemd/system/ssh.service.d"
cat >"$rootfs/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -e /etc/ssh/ssh_host_ed25519_key || ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
# An ed25519 host key only: making an RSA key takes minutes under TCG.
echo 'HostKey /etc/ssh/ssh_host_ed25519_key' >"$rootfs/etc/ssh/sshd_config.d/host-key.conf"
# The role decides what runs: provision.sh enables etcd or docker.
chroot "$rootfs" systemctl disable etcd.service docker.service docker.socket containerd.service >/dev/null 2>&1 || true
chroot "$rootfs" systemctl enable ssh.service systemd-timesyncd.service >/dev/null 2>&1 || true
# Vagrant's user: the insecure key (vagrant replaces it at the first `vagrant up`), sudo without a password.
if ! chroot "$rootfs" id vagrant >/dev/null 2>&1; then
    chroot "$rootfs" useradd -m -s /bin/bash vagrant
fi
install -d -m 0700 -o 1000 -g 1000 "$rootfs/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$rootfs/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
# A root shell on the serial console (virsh console) for when ssh does not come up.
mkdir -p "$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %I $TERM
EOF
chroot "$rootfs" apt-get clean

echo "build-box.sh: image"
cp -L "$rootfs/vmlinuz" "$out/vmlinuz"
cp -L "$rootfs/initrd.img" "$out/initrd.img"
mkdir -p "$out/box"
rm -f "$out/box/box.raw"
mkfs.ext4 -q -F -L leaseagent -d "$rootfs" "$out/box/box.raw" 6G
qemu-img convert -O qcow2 "$out/box/box.raw" "$out/box/box.img"
rm -f "$out/box/box.raw"
cat >"$out/box/metadata.json" <<'EOF'
{"provider": "libvirt", "format": "qcow2", "virtual_size": 6}
EOF
cat >"$out/box/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider "libvirt" do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
tar -C "$out/box" -czf "$out/$box_name.box" metadata.json Vagrantfile box.img
vagrant box add --force --name "$box_name" "$out/$box_name.box" >/dev/null \
    || die "vagrant box add $out/$box_name.box failed"
# vagrant-libvirt uploads the box into the storage pool once; a new box must replace it.
if command -v virsh >/dev/null && virsh -c qemu:///system pool-info leaseagent >/dev/null 2>&1; then
    for vol in $(virsh -c qemu:///system vol-list leaseagent 2>/dev/null | awk -v n="$box_name" 'index($1, n) == 1 {print $1}'); do
        virsh -c qemu:///system vol-delete --pool leaseagent "$vol" >/dev/null || true
    done
fi

echo "build-box.sh: wheelhouse"
rm -rf "$out/wheelhouse"
mkdir -p "$out/wheelhouse"
# The README's wheelhouse ("Installing offline"): the pinned dependencies, setuptools and
# wheel, for CPython 3.11 (bookworm's); the VMs run install.sh --wheelhouse /wheelhouse.
pip_log="$out/wheelhouse.log"
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "the wheelhouse needs Python 3.11 (bookworm's) on this machine; $(python3 --version) found"
python3 -m pip wheel -q --disable-pip-version-check -c "$src/deploy/constraints.txt" \
    -w "$out/wheelhouse" "$src" 'setuptools>=68' wheel >"$pip_log" 2>&1 \
    || die "pip wheel failed; see $pip_log"
ls "$out/wheelhouse"/leaseagent-*.whl >/dev/null 2>&1 || die "no leaseagent wheel in $out/wheelhouse: $pip_log"

echo "build-box.sh: done in $(( $(date +%s) - start )) s: box $box_name, kernel $out/vmlinuz, wheelhouse $out/wheelhouse"
