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

vm_export "$OUT/facts.txt"
log "$fails failed"
[ "$fails" -eq 0 ]
