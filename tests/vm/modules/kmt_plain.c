// SPDX-License-Identifier: GPL-2.0
// kmodmon test module: does nothing; unsigned (built at test time against the VM kernel's
// headers by xtask/src/vm/testmods.rs), so the kernel taints with E and sig_ok is false.
#include <linux/init.h>
#include <linux/module.h>

static int __init kmt_plain_init(void)
{
	return 0;
}

static void __exit kmt_plain_exit(void)
{
}

module_init(kmt_plain_init);
module_exit(kmt_plain_exit);
MODULE_LICENSE("GPL");
MODULE_VERSION("1.2.3");
MODULE_DESCRIPTION("kmodmon identity test module");
