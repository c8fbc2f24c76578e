# Scenario 1 (the seed example): `modprobe ip_vs_wrr` loads it and its dependencies (ip_vs,
# nf_conntrack, nf_defrag_ipv6, nf_defrag_ipv4, libcrc32c, ...); `modprobe -r ip_vs_wrr`
# unloads what it can. Checked in xtask/src/vm/scenarios.rs: one load and one load_attempt
# (result 0) per module that appeared in /proc/modules, one unload and one unload_attempt per
# module that left, nothing else; the kernel's tracepoints agree.
. /kmodmon/lib.sh
trap vm_finish EXIT

kmodmon_start || exit 1
snapshot before
step modprobe modprobe ip_vs_wrr
snapshot loaded
step modprobe_r modprobe -r ip_vs_wrr
snapshot after
kmodmon_stop
