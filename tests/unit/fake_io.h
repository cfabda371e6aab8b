/* SPDX-License-Identifier: MIT */
/*
 * tests/unit/fake_io.h — a fake io/ for unit tests of the qcow2 engine.
 *
 * fake_io.c implements io.h over in-memory files: commands complete from
 * io_loop_run_once() (FIFO, or shuffled), every write, fallocate and
 * fdatasync is recorded with its data when it completes, failures can be
 * injected (io_loop_inject) and crash images can be rebuilt from the record
 * (fake_crash_image): what the fdatasyncs ended before a point made durable,
 * plus any subset of the other writes completed or in flight at that point.
 *
 * Durability as a disk gives it: an fdatasync makes durable what had
 * completed when it was *submitted*; a write that completes while the sync
 * is in flight may or may not be durable when the sync ends, and a write in
 * flight at a crash may or may not have reached the disk.
 */
#ifndef VQCOW_TESTS_FAKE_IO_H
#define VQCOW_TESTS_FAKE_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"
#include "io_inject.h"

enum fake_log_type {
	FAKE_WRITE = 1, /* data written (also ZERO_RANGE / PUNCH_HOLE: zeroes) */
	FAKE_FSYNC,
	FAKE_SIZE, /* size change only (fallocate mode 0 past EOF) */
};

struct fake_log {
	uint8_t type;
	int file;
	uint64_t off, len;
	uint8_t *data; /* FAKE_WRITE: the bytes */
	/* Record entries (completed commands) when it was submitted: an
	 * FAKE_FSYNC covers the writes among the first @sub entries, no
	 * later one; a write was in flight from entry @sub to its own. */
	size_t sub;
};

/* Load @path (a real file) into memory; io_file_open() of @path then uses it. Returns its id. */
int fake_file_load(const char *path);
/*
 * Make file @id a block device for the io_files opened on it from now:
 * IO_FILE_BLOCKDEV, io_file.wz_max = @wz_max (its write-zeroes offload; 0:
 * none, and fallocate PUNCH_HOLE|KEEP_SIZE then fails with -EOPNOTSUPP as
 * the kernel's does without a fallback). Its size stays fixed for the engine
 * (host_limit); what it held before is whatever the test put there.
 */
void fake_set_blockdev(int id, uint64_t wz_max);
/* Write the in-memory file back to @path, sparse (zero blocks are holes). 0 or -errno. */
int fake_file_save(int id, const char *path);
/* Write @len bytes at @b (a crash image) to @path, sparse as well. 0 or -errno. */
int fake_buf_save(const uint8_t *b, uint64_t len, const char *path);
/* Forget an in-memory file (its log entries stay). */
void fake_file_drop(int id);
/* The id of an io_file opened through the fake. */
int fake_file_id(const struct io_file *f);
/* Current in-memory contents. */
const uint8_t *fake_file_data(int id, uint64_t *size);

/* Forget the record; the current contents become the base for crash images. */
void fake_log_reset(void);
size_t fake_log_count(void);
const struct fake_log *fake_log_get(size_t i);

/* Complete pending commands in a random order (seeded) instead of FIFO. */
void fake_set_shuffle(unsigned seed);

/*
 * Rebuild the file @id as a crash would leave it after the first @upto
 * record entries: every write an FSYNC among them covers (the writes
 * completed before that FSYNC was submitted: its @sub), then each other
 * write completed or in flight at that point (submitted before entry @upto)
 * kept with probability 1/2 (seeded by @seed; seed 0 keeps none: only what
 * the syncs ended so far made durable). malloc'd buffer in *out (size *len).
 */
int fake_crash_image(int id, size_t upto, unsigned seed, uint8_t **out, uint64_t *len);

/*
 * Reads (io_read/io_readv) performed on the fake files since the last
 * fake_reads_reset(), in completion order (injected failures and empty
 * reads excluded).
 */
struct fake_read {
	int file;
	uint64_t off, len;
};
size_t fake_read_count(void);
const struct fake_read *fake_read_get(size_t i);
void fake_reads_reset(void);

/*
 * Hold the @nth command of @op submitted from now (1 = the next) for @iters
 * loop iterations before it completes (an injected result still applies):
 * a write or fdatasync kept in flight while the test does other things.
 * 0, -EINVAL or -ENOSPC.
 */
int fake_hold(enum io_op op, unsigned nth, unsigned iters);

/*
 * Hold every fdatasync submitted from now for @iters loop iterations (0: no
 * longer): syncs stay in flight while the writes submitted after them
 * complete, as a slow disk cache flush does.
 */
void fake_set_sync_hold(unsigned iters);

/*
 * io_file_reopen() fails with @err from now (0: succeeds again), as opening
 * /proc/self/fd/N of a root's device node does after --user dropped the
 * privileges.
 */
void fake_set_reopen_err(int err);

/* What io_file_pc_written() says of every file (false by default). */
void fake_set_pc_written(bool on);

/*
 * Run deferred hooks (io_defer_add) at the end of each loop iteration, as
 * io/loop.c does; off by default (the hooks are registered but never run).
 */
void fake_set_defers(bool on);

/* Number of commands submitted and not completed. */
unsigned fake_pending(void);

#endif /* VQCOW_TESTS_FAKE_IO_H */
