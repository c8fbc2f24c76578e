# Judge the module, not the file (issue 14, "a renamed file passes"):
# `cargo xtask vm-run --kernel 6.12 tests/vm/enforce-names.sh`; `vm-test` runs it on every
# kernel. Self-checking (exit code).
#
# A container cgroup (/docker/<id>) may load ip_vs and dummy (and their dependencies) only.
# - dummy.ko copied to ip_vs.ko and loaded with finit_module: both names are allowed, yet it
#   is refused (EPERM): the file's name is not the module's (the `denied` event names both);
# - a dummy.ko whose .modinfo says name=dummz: refused (the image names itself twice);
# - `modprobe dummy`: loads; `modprobe veth`: refused, named from the image (on 6.12 kmod
#   decompresses .ko.xz itself and uses init_module: named from the init_module image);
# - where the kernel decompresses (6.12, /sys/module/compression): dummy.ko.xz renamed
#   ip_vs.ko.xz and loaded with MODULE_INIT_COMPRESSED_FILE is refused by the kernel's own name
#   at /sys/module/<name> (the loader sees ENOMEM); the real dummy.ko.xz loads; with a
#   parameter string it is refused (EPERM: parameter handlers run before the kernel names it);
# - the host loads the renamed file (the host is unrestricted).
. /kmodmon/lib.sh
trap 'enf_stop; vm_finish' EXIT

POLICY=/tmp/policy.toml
cat >"$POLICY" <<EOF
mode = "enforce"

[unselected]
allow = ["ip_vs", "dummy"]
EOF
refused_without_bpf_lsm "$POLICY"

MODDIR=/lib/modules/$KVER
DUMMY=$(modpath dummy)
VETH=$(modpath veth)
mkdir -p /tmp/mods
case "$DUMMY" in
*.ko.xz) xzcat "$DUMMY" >/tmp/mods/plain.ko || busybox xzcat "$DUMMY" >/tmp/mods/plain.ko ;;
*) cp "$DUMMY" /tmp/mods/plain.ko ;;
esac
cp /tmp/mods/plain.ko /tmp/mods/ip_vs.ko
mkdir -p /tmp/mods/twice
cp /tmp/mods/plain.ko /tmp/mods/twice/dummy.ko
step patch kmodmon-vm-tool patch /tmp/mods/twice/dummy.ko name=dummy name=dummz
fact compression "$(cat /sys/module/compression 2>/dev/null || echo none)"

enf_start "$POLICY" 1 || exit 1
CG=$(cg_make names)
sleep 1

step renamed in_cgroup "$CG" kmodmon-vm-tool finit /tmp/mods/ip_vs.ko 0
loaded dummy renamed
step twice in_cgroup "$CG" kmodmon-vm-tool finit /tmp/mods/twice/dummy.ko 0
loaded dummy twice
step allowed in_cgroup "$CG" modprobe dummy
loaded dummy allowed
step allowed_unload modprobe -r dummy
step denied in_cgroup "$CG" modprobe veth
loaded veth denied

if [ -e /sys/module/compression ]; then
    cp "$DUMMY" /tmp/mods/ip_vs.ko.xz
    # MODULE_INIT_COMPRESSED_FILE = 4
    in_cgroup "$CG" kmodmon-vm-tool finit /tmp/mods/ip_vs.ko.xz 4 >"$OUT/xz_renamed.out"
    fact rc.xz_renamed "$?"
    cat "$OUT/xz_renamed.out"
    loaded dummy xz_renamed
    step xz_veth in_cgroup "$CG" kmodmon-vm-tool finit "$VETH" 4
    loaded veth xz_veth
    step xz_real in_cgroup "$CG" kmodmon-vm-tool finit "$DUMMY" 4
    loaded dummy xz_real
    step xz_real_unload modprobe -r dummy
    step xz_params in_cgroup "$CG" kmodmon-vm-tool finit "$DUMMY" 4 numdummies=1
    loaded dummy xz_params
fi

# The host is unrestricted: the renamed file loads there.
step host_renamed kmodmon-vm-tool finit /tmp/mods/ip_vs.ko 0
loaded dummy host_renamed
step host_unload modprobe -r dummy
sleep 1
enf_stop

echo "=== facts"
cat "$OUT/facts.txt"
echo "=== enforce.err"
cat "$OUT/enforce.err"
echo "=== denied"
grep '"kind":"denied"' "$OUT/enforce.jsonl" | cut -c1-900

echo "=== checks"
want rc.patch 0
want rc.renamed 1
want loaded.dummy.renamed 0
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"path":"/tmp/mods/ip_vs.ko".*"errno":"EPERM".*"named_by":"image","file_module":"ip_vs"' \
    "the renamed file's denial names the module (dummy), the file and the name it claims (ip_vs)"
want rc.twice 1
want loaded.dummy.twice 0
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"path":"/tmp/mods/twice/dummy.ko".*"modinfo_name":"dummz"' \
    "an image whose .modinfo names another module is refused, both names reported"
want rc.allowed 0
want loaded.dummy.allowed 1
want_nonzero rc.denied
want loaded.veth.denied 0
want_line enforce.jsonl '"kind":"denied".*"module":"veth".*"named_by":"image"' \
    "modprobe veth was judged by the image's own name"
if [ -e /sys/module/compression ]; then
    want rc.xz_renamed 1
    want loaded.dummy.xz_renamed 0
    want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"path":"/tmp/mods/ip_vs.ko.xz".*"errno":"ENOMEM".*"named_by":"kernel","file_module":"ip_vs"' \
        "the renamed compressed file is refused by the kernel's own name (the loader sees ENOMEM)"
    want_line xz_renamed.out "ENOMEM" "the loader saw ENOMEM"
    want rc.xz_veth 1
    want loaded.veth.xz_veth 0
    want_line enforce.jsonl '"kind":"denied".*"module":"veth".*"errno":"ENOMEM".*"named_by":"kernel"' \
        "a compressed veth is refused by the kernel's own name"
    want rc.xz_real 0
    want loaded.dummy.xz_real 1
    want rc.xz_params 1
    want loaded.dummy.xz_params 0
    want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"errno":"EPERM".*"named_by":"unnamed"' \
        "a compressed file with parameters is refused before its parameter handlers run"
else
    echo "enforce-names: this kernel does not decompress modules (no /sys/module/compression): nothing to try there"
fi
want rc.host_renamed 0
want loaded.dummy.host_renamed 1
checks_done
