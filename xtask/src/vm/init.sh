#!/bin/sh
# PID 1 of the kmodmon test VM (packed by xtask/src/vm/initramfs.rs).
# The kernel console is ttyS1 (the host keeps it as console.log); everything here and in the
# script goes to ttyS0, which the host reads. Lines starting with KMODMON-VM- are the
# protocol (xtask/src/vm/protocol.rs).
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/ttyS0 2>&1
stty -F /dev/ttyS0 -onlcr 2>/dev/null

need() {
    "$@" || echo "KMODMON-VM-INIT-ERROR failed: $*"
}
mkdir -p /dev/pts /dev/shm
need mount -t devpts devpts /dev/pts
need mount -t tmpfs tmpfs /dev/shm
need mount -t tmpfs -o mode=755 tmpfs /run
need mount -t tmpfs -o mode=1777 tmpfs /tmp
need mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
need mount -t cgroup2 cgroup2 /sys/fs/cgroup
need mount -t bpf bpf /sys/fs/bpf
need mount -t securityfs securityfs /sys/kernel/security
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done
hostname kmodmon-vm
ip link set lo up 2>/dev/null

[ -f /kmodmon/env ] && . /kmodmon/env
echo "KMODMON-VM-BOOTED release=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
mkdir -p /tmp/work
cd /tmp/work || exit 1
# Debian's busybox-static runs its own applets before searching PATH: make the module tools
# kmod's, as on a real system (`busybox modprobe` still reaches busybox's).
for tool in modprobe insmod rmmod lsmod depmod modinfo; do
    eval "$tool() { /usr/sbin/$tool \"\$@\"; }"
done
(. /kmodmon/run.sh)
rc=$?
echo "KMODMON-VM-RESULT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
