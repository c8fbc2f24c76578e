# Scenario 2: a runc container that declares KERNEL_MODULES=ip_vs,ip_vs_wrr and has
# CAP_SYS_MODULE loads them with modprobe. Its cgroup is /docker/<64 hex>, as Docker makes
# it. Checked: every load and load_attempt carries the container's cgroup (path and id) and
# its ID (runtime docker).
. /kmodmon/lib.sh
trap vm_finish EXIT

ID=$(ctr_id loader)
fact ctr.loader.id "$ID"
CTR_ENV="KERNEL_MODULES=ip_vs,ip_vs_wrr" ctr_start loader "/docker/$ID" "SYS_MODULE" || exit 1
kmodmon_start || exit 1
snapshot before
step ctr_modprobe ctr_exec loader modprobe ip_vs_wrr
snapshot loaded
kmodmon_stop
ctr_stop loader
