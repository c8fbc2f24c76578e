# Scenario 4: failed attempts, each an attempt event with the right errno and no load/unload:
#   a corrupt .ko                                   -> ENOEXEC
#   loading ip_vs again                             -> EEXIST
#   unloading ip_vs while ip_vs_wrr uses it         -> EAGAIN (EWOULDBLOCK)
#   a container without CAP_SYS_MODULE (Docker's default capabilities):
#     insmod ip_vs_rr                               -> EPERM
#     rmmod ip_vs_wrr                               -> EPERM
. /kmodmon/lib.sh
trap vm_finish EXIT

step preload modprobe ip_vs_wrr
printf 'this is not an ELF module\n' >/tmp/bogus.ko
head -c 4096 /dev/zero >>/tmp/bogus.ko
ID=$(ctr_id nocap)
fact ctr.nocap.id "$ID"
ctr_start nocap "/docker/$ID" "" || exit 1
fact path.ip_vs "$(modpath ip_vs)"
fact path.ip_vs_rr "$(modpath ip_vs_rr)"

kmodmon_start || exit 1
snapshot before
step corrupt insmod /tmp/bogus.ko
step duplicate insmod "$(modpath ip_vs)"
step in_use busybox rmmod ip_vs
step nocap_insmod ctr_exec nocap insmod "$(modpath ip_vs_rr)"
step nocap_rmmod ctr_exec nocap rmmod ip_vs_wrr
snapshot after
kmodmon_stop
ctr_stop nocap
