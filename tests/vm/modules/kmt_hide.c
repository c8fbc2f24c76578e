// SPDX-License-Identifier: GPL-2.0
// kmodmon test module: unlinks itself from the kernel's module list in its init function, as a
// rootkit does first. It then no longer shows in /proc/modules, lsmod or /proc/kallsyms
// (which walk that list) but keeps its /sys/module directory; it cannot be unloaded (the
// kernel finds modules to unload on the list). For test VMs only.
#include <linux/init.h>
#include <linux/list.h>
#include <linux/module.h>

static int __init kmt_hide_init(void)
{
	list_del_rcu(&THIS_MODULE->list);
	INIT_LIST_HEAD(&THIS_MODULE->list);
	return 0;
}

module_init(kmt_hide_init);
MODULE_LICENSE("GPL");
MODULE_VERSION("0.0.1");
MODULE_DESCRIPTION("kmodmon hidden-module test (unlinks itself)");
