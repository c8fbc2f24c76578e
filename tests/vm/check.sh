#!/bin/sh
# `kmodmon check` on a real kernel with loadable modules: real /proc/modules, real depmod
# output, real modprobe. Self-checking: exits non-zero when an expectation fails.
#   cargo xtask vm-run tests/vm/check.sh
. /kmodmon/lib.sh

fails=0
expect() { # DESCRIPTION COMMAND...
    what=$1
    shift
    if "$@"; then
        log "ok: $what"
    else
        log "FAILED: $what"
        fails=$((fails + 1))
    fi
}
# A report line "STATUS  MODULE  ..." exists.
has_line() { # FILE STATUS MODULE
    grep -Eq "^$2 +$3 " "$1"
}

# Loaded by hand; the alias ip_conntrack loads nf_conntrack.
modprobe overlay
modprobe br_netfilter
modprobe ip_conntrack
mkdir -p /etc/modules-load.d /etc/modprobe.d
printf '# k8s\noverlay\nbr-netfilter\nip_conntrack\nnf_conntrack_ipv4\ndummy\n' >/etc/modules-load.d/k8s.conf
# The seed: only in /etc/modules, which nothing on this (busybox init) system reads.
printf 'iptable_nat\niptable_filter\n' >/etc/modules
echo 'blacklist dummy' >/etc/modprobe.d/local.conf

kmodmon check --no-containers >"$OUT/check1.txt"
fact rc.check1 $?
cat "$OUT/check1.txt"
expect "exit 1 with problems" grep -q '^rc.check1=1$' "$OUT/facts.txt"
expect "iptable_nat will not load at boot" has_line "$OUT/check1.txt" will_not_load_at_boot iptable_nat
expect "iptable_filter will not load at boot" has_line "$OUT/check1.txt" will_not_load_at_boot iptable_filter
expect "nf_conntrack_ipv4 is not available on $KVER" has_line "$OUT/check1.txt" not_available nf_conntrack_ipv4
expect "dummy is blacklisted" has_line "$OUT/check1.txt" blacklisted dummy
expect "overlay ok" has_line "$OUT/check1.txt" ok overlay
expect "br-netfilter ok" has_line "$OUT/check1.txt" ok br_netfilter
expect "alias ip_conntrack ok (nf_conntrack loaded)" has_line "$OUT/check1.txt" ok ip_conntrack
expect "kernel $KVER" grep -q "kernel $KVER\$" "$OUT/check1.txt"

kmodmon check --no-containers --json >"$OUT/check1.json"
loaded=$(wc -l </proc/modules)
expect "JSON counts the $loaded lines of /proc/modules" grep -q "\"count\": $loaded\$" "$OUT/check1.json"
vm_export "$OUT/check1.json"

kmodmon check --no-containers --fix --yes >"$OUT/fix.txt"
fact rc.fix $?
cat "$OUT/fix.txt"
expect "--fix wrote kmodmon.conf" grep -qx iptable_nat /etc/modules-load.d/kmodmon.conf
expect "--fix left out the unavailable module" sh -c '! grep -q nf_conntrack_ipv4 /etc/modules-load.d/kmodmon.conf'
expect "--fix exits 1: configured now, but not loaded yet" grep -q '^rc.fix=1$' "$OUT/facts.txt"
expect "after --fix: 2 missing" grep -q '^After the fix: .*2 missing' "$OUT/fix.txt"
expect "--fix says how to load them now" grep -q '^They load at the next boot; to load them now: modprobe -a iptable_filter iptable_nat$' "$OUT/fix.txt"

# Load what is configured, drop the impossible lines: everything is in place.
modprobe -a iptable_nat iptable_filter
printf 'overlay\nbr_netfilter\nip_conntrack\n' >/etc/modules-load.d/k8s.conf
kmodmon check --no-containers >"$OUT/check2.txt"
fact rc.check2 $?
cat "$OUT/check2.txt"
expect "exit 0 once everything is loaded and configured" grep -q '^rc.check2=0$' "$OUT/facts.txt"
expect "iptable_nat ok" has_line "$OUT/check2.txt" ok iptable_nat

# ---- The reboot question: a second kernel's module tree, made the default ----
NEXT="$KVER-next"
# A module line of the next-boot table: "  STATUS  MODULE  ...".
next_has() { # FILE STATUS MODULE
    grep -Eq "^  $2 +$3 " "$1"
}
# Path of a module of the running kernel, relative to its tree.
rel() { # MODULE
    modinfo -n "$1" | sed 's|.*/modules/[^/]*/||'
}
tree=$(modinfo -n dummy | sed 's|/kernel/.*||')
# veth becomes an out-of-tree module of the running kernel, as DKMS installs them.
vethrel=$(rel veth)
mkdir -p "$tree/updates/dkms"
mv "$tree/$vethrel" "$tree/updates/dkms/"
depmod "$KVER"
modprobe veth
echo veth >/etc/modules-load.d/veth.conf
expect "veth loads from updates/dkms/ now" sh -c 'modinfo -n veth | grep -q /updates/dkms/'
# The next kernel's tree: the running one, without its DKMS builds and br_netfilter, with
# overlay compiled in (modules.builtin); then depmod.
next=$(dirname "$tree")/$NEXT
cp -al "$tree" "$next" 2>/dev/null || cp -a "$tree" "$next"
rm -rf "$next/updates"
rm -f "$next/$(rel br_netfilter)" "$next/$(rel overlay)"
for f in "$next"/modules.*; do cp "$f" "$f.new" && mv "$f.new" "$f"; done
echo kernel/fs/overlayfs/overlay.ko >>"$next/modules.builtin"
depmod "$NEXT"
expect "depmod $NEXT: br_netfilter is gone" sh -c "! grep -q br_netfilter '$next/modules.dep'"
expect "the running tree still has br_netfilter" grep -q br_netfilter "$tree/modules.dep"

# systemd-boot style: BLS entries and loader.conf naming the next kernel.
mkdir -p /boot/loader/entries
for k in "$KVER" "$NEXT"; do
    printf 'title Debian %s\nversion %s\nlinux /vmlinuz-%s\noptions root=/dev/vda ro quiet\n' "$k" "$k" "$k" >"/boot/loader/entries/vm-$k.conf"
done
printf 'timeout 3\ndefault vm-%s.conf\n' "$NEXT" >/boot/loader/loader.conf
kmodmon check --next-boot --no-containers >"$OUT/next1.txt"
fact rc.next1 $?
cat "$OUT/next1.txt"
expect "--next-boot exits 1: modules will be lost" grep -q '^rc.next1=1$' "$OUT/facts.txt"
expect "the next kernel is $NEXT" grep -q "^Next boot: kernel $NEXT\$" "$OUT/next1.txt"
expect "chosen by loader.conf, high confidence" grep -q "chosen by:    /boot/loader/loader.conf default vm-$NEXT.conf .*(high confidence)" "$OUT/next1.txt"
expect "veth not available: out of tree" next_has "$OUT/next1.txt" not_available veth
expect "veth's reason names updates/dkms" grep -q "out-of-tree module (updates/dkms/veth.ko" "$OUT/next1.txt"
expect "br_netfilter not available" next_has "$OUT/next1.txt" not_available br_netfilter
expect "overlay now built in" next_has "$OUT/next1.txt" now_builtin overlay
expect "iptable_nat ok" next_has "$OUT/next1.txt" ok iptable_nat
kmodmon check --next-boot --no-containers --json >"$OUT/next1.json"
expect "JSON: source loader_conf" grep -q '"source": "loader_conf"' "$OUT/next1.json"
vm_export "$OUT/next1.json"
kmodmon check --no-containers >"$OUT/check3.txt"
fact rc.check3 $?
expect "plain check: the running kernel is fine, the exit code says the next boot is not" grep -q '^rc.check3=1$' "$OUT/facts.txt"
expect "plain check: Result at the next boot" grep -q "^Result at the next boot ($NEXT): " "$OUT/check3.txt"

# initramfs-tools: nf_conntrack must be in the initramfs; a real image (busybox cpio + gzip)
# of the next tree's networking modules without it, then with it.
mkdir -p /etc/initramfs-tools
echo 'MODULES=most' >/etc/initramfs-tools/initramfs.conf
echo nf_conntrack >/etc/initramfs-tools/modules
( cd / && find "lib/modules/$NEXT/kernel/net" "lib/modules/$NEXT/kernel/lib" -name '*.ko*' ! -name 'nf_conntrack.ko*' | cpio -o -H newc 2>/dev/null | gzip >"/boot/initrd.img-$NEXT" )
kmodmon check --next-boot --no-containers >"$OUT/next2.txt"
cat "$OUT/next2.txt"
expect "nf_conntrack not in the initramfs" next_has "$OUT/next2.txt" not_in_initramfs nf_conntrack
( cd / && find "lib/modules/$NEXT/kernel/net" "lib/modules/$NEXT/kernel/lib" -name '*.ko*' | cpio -o -H newc 2>/dev/null | gzip >"/boot/initrd.img-$NEXT" )
kmodmon check --next-boot --no-containers >"$OUT/next2b.txt"
expect "nf_conntrack in the rebuilt initramfs" next_has "$OUT/next2b.txt" ok nf_conntrack
expect "the image is gzip" grep -q "initrd.img-$NEXT (initramfs-tools; gzip)" "$OUT/next2b.txt"

# GRUB: grub.cfg with GRUB_DEFAULT=saved; grubenv's next_entry (grub-reboot) wins once.
mkdir -p /boot/grub
{
    printf 'if [ "${next_entry}" ] ; then\n   set default="${next_entry}"\n   set next_entry=\n   save_env next_entry\nelse\n   set default="${saved_entry}"\nfi\n'
    for k in "$NEXT" "$KVER"; do
        printf "menuentry 'Debian, with Linux %s' --class debian \$menuentry_id_option 'vm-%s' {\n\tlinux\t/boot/vmlinuz-%s root=/dev/vda ro quiet\n}\n" "$k" "$k" "$k"
    done
} >/boot/grub/grub.cfg
printf '# GRUB Environment Block\nsaved_entry=vm-%s\nnext_entry=vm-%s\n' "$NEXT" "$KVER" >/boot/grub/grubenv
kmodmon check --next-boot --no-containers >"$OUT/next3.txt"
fact rc.next3 $?
cat "$OUT/next3.txt"
expect "GRUB next_entry: the running kernel boots next" grep -q "^Next boot: kernel $KVER, the running kernel\$" "$OUT/next3.txt"
expect "GRUB next_entry named it" grep -q "/boot/grub/grubenv next_entry=vm-$KVER" "$OUT/next3.txt"
expect "nothing is lost booting the running kernel again" grep -q '^rc.next3=0$' "$OUT/facts.txt"
printf '# GRUB Environment Block\nsaved_entry=vm-%s\n' "$NEXT" >/boot/grub/grubenv
kmodmon check --next-boot --all-kernels --no-containers >"$OUT/next4.txt"
fact rc.next4 $?
cat "$OUT/next4.txt"
expect "GRUB saved_entry names $NEXT" grep -q "^Next boot: kernel $NEXT\$" "$OUT/next4.txt"
expect "--all-kernels judges the running kernel too" grep -q "^Installed kernel $KVER: kernel $KVER, the running kernel\$" "$OUT/next4.txt"
expect "--all-kernels exits 1" grep -q '^rc.next4=1$' "$OUT/facts.txt"

vm_export "$OUT/facts.txt"
log "$fails failed"
[ "$fails" -eq 0 ]
