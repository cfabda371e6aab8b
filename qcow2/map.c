/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include "offline.h"
int qcow2_map(const char *path, const char *fmt, qcow2_map_fn *fn, void *opaque,
	      const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	return -ENOSYS;
}
