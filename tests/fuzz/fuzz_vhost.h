/* SPDX-License-Identifier: MIT */
/*
 * tests/fuzz/fuzz_vhost.h — what the vhost fuzz targets (fuzz_vhost_msg.c,
 * fuzz_vhost_vring.c) share: quiet logs, and the check of every element the
 * ring code hands out.
 */
#ifndef VQCOW_FUZZ_VHOST_H
#define VQCOW_FUZZ_VHOST_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>

#include "vhost.h"
#include "vlog.h"

static inline void fuzz_drop_line(enum vlog_level level, const char *line, void *opaque)
{
}

/* Logs cost time and say nothing a crash report does not: dropped, unless
 * FUZZ_LOG is set (then everything, at debug level, on stderr). */
static inline void fuzz_quiet_logs(void)
{
	if (getenv("FUZZ_LOG"))
		vlog_set_level(VLOG_DEBUG);
	else
		vlog_set_sink(fuzz_drop_line, NULL);
}

/*
 * Every iovec of @e must lie inside one of the @nr regions @regs, and is
 * touched at both ends (a bad translation faults here); with @poison, the
 * first byte of each device-writable one is written too. Returns the index
 * of the first iovec outside every region (the later ones untouched), or -1.
 */
static inline int fuzz_elem_outside(const struct vq_elem *e, const struct iovec *regs, unsigned nr,
				    bool poison)
{
	for (unsigned i = 0; i < (unsigned)e->out_num + e->in_num; i++) {
		uintptr_t b = (uintptr_t)e->iov[i].iov_base, len = e->iov[i].iov_len;
		bool in = false;

		for (unsigned k = 0; k < nr && !in; k++) {
			uintptr_t rb = (uintptr_t)regs[k].iov_base;

			in = b >= rb && len <= regs[k].iov_len && b - rb <= regs[k].iov_len - len;
		}
		if (!in)
			return (int)i;
		if (len) {
			volatile uint8_t *p = e->iov[i].iov_base;

			(void)p[0];
			(void)p[len - 1];
			if (poison && i >= e->out_num)
				p[0] = 0x5a;
		}
	}
	return -1;
}

#endif /* VQCOW_FUZZ_VHOST_H */
