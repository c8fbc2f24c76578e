# Scenario 3: an autoload from inside a container. ip_tables is loaded beforehand (as on any
# host using iptables); in the container, `iptables-legacy -t nat -L` asks the kernel for the
# nat table, the kernel requests iptable_nat, and its modprobe (a usermode helper in the root
# cgroup) loads it with its dependencies. Checked: a request event for iptable_nat in the
# container's cgroup with its ID, then loads by the kernel's modprobe outside any container.
. /kmodmon/lib.sh
trap vm_finish EXIT

step preload modprobe ip_tables
ID=$(ctr_id nat)
fact ctr.nat.id "$ID"
ctr_start nat "/docker/$ID" "NET_ADMIN" || exit 1
kmodmon_start || exit 1
snapshot before
step ctr_iptables ctr_exec nat iptables-legacy -t nat -L -n
snapshot loaded
kmodmon_stop
ctr_stop nat
