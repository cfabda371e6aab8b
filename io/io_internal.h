/* SPDX-License-Identifier: MIT */
/*
 * io/ internals shared between loop.c, file.c and iov.c. Not for other modules.
 */
#ifndef VQCOW_IO_INTERNAL_H
#define VQCOW_IO_INTERNAL_H

#include "io.h"

/* Readv/writev larger than this many iovecs go through a bounce buffer. */
#define IO_IOV_MAX 1024

/* Bounce buffer size classes: 4 KiB << k for k in [0, IO_BOUNCE_CLASSES). */
#define IO_BOUNCE_MIN     4096u
#define IO_BOUNCE_CLASSES 9 /* up to 1 MiB */
#define IO_BOUNCE_KEEP    8 /* free buffers kept per class */

/*
 * Open (once) the buffered twin fd of an O_DIRECT file, used for writes whose
 * offset or length is not aligned. 0 or -errno.
 */
int io_file_open_buffered(struct io_file *f);

/* An fdatasync of @f ended with @res: what its caller gets (the sticky
 * error of io_file_sync_error, set here on a failure after page-cache
 * writes). Any thread. */
int io_file_sync_done(struct io_file *f, int res);

/* A write through the page cache is about to be issued on @f. */
static inline void io_file_pc_write(struct io_file *f)
{
	if (!__atomic_load_n(&f->pc_written, __ATOMIC_RELAXED)) {
		__atomic_store_n(&f->pc_written, 1, __ATOMIC_RELEASE);
		if (f->pc_peer)
			__atomic_store_n(&f->pc_peer->pc_written, 1, __ATOMIC_RELEASE);
	}
}

/* Drop @f's registered-file slot, if any (io_file_close). */
void io_loop_file_closing(struct io_file *f);

/* Allocate @len bytes aligned to max(@align, 4096); free with io_free_aligned(). */
void *io_alloc_align(size_t len, size_t align);

#endif /* VQCOW_IO_INTERNAL_H */
