// SPDX-License-Identifier: GPL-2.0
// kmodmon test module of about 10 MB (a read-only table), to measure identity on a large
// image.
#include <linux/init.h>
#include <linux/module.h>

#define KMT_BIG_BYTES (10 << 20)
static const char kmt_big_table[KMT_BIG_BYTES] __used = { 1 };

static int __init kmt_big_init(void)
{
	return kmt_big_table[0] == 1 ? 0 : -EINVAL;
}

static void __exit kmt_big_exit(void)
{
}

module_init(kmt_big_init);
module_exit(kmt_big_exit);
MODULE_LICENSE("GPL");
MODULE_VERSION("1.0");
MODULE_DESCRIPTION("kmodmon identity test module, 10 MB");
