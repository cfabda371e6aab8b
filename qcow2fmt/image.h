/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/image.h — a qcow2 image read, checked and repaired synchronously
 * through an I/O interface the caller provides (struct qcow2_io).
 *
 * The format code does no I/O of its own: the offline tool gives it a plain
 * fd (pread/pwrite/fdatasync, qcow2tool/), the engine gives it its io/ file
 * at open time (io_file_*_sync, qcow2/qcow2.c). So the same table reader,
 * snapshot loader and checker serve both, and the online engine never does
 * I/O around io/.
 *
 * Image files are hostile input: every table offset, size and entry is
 * validated before use; a malformed image yields -EINVAL/-EFBIG/-EIO and a
 * one-line message naming the field, never a crash.
 *
 * Check and repair follow qemu-img check (exit codes, counts), so qemu-img
 * can serve as the oracle in tests. Invariants kept by the repair
 * (qcow2_check_io with QCOW2_CHECK_FIX_*):
 *  - leaks are fixed by lowering refcounts to the computed reference count;
 *  - with QCOW2_CHECK_FIX_ERRORS, refcounts that are too low (or a damaged
 *    refcount structure) make the whole refcount structure be rebuilt into
 *    clusters past the end of everything referenced; the new table is made
 *    durable (sync) before the header points at it, and the header is
 *    rewritten last, so a crash mid-repair leaves the old structure in use;
 *  - COPIED flags are set iff the refcount is exactly 1 (active L1/L2 only);
 *  - the dirty bit (and the corrupt bit) are cleared only when the image is
 *    left without corruptions.
 */
#ifndef VQCOW_QCOW2FMT_IMAGE_H
#define VQCOW_QCOW2FMT_IMAGE_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"

/* ---- the I/O interface ---- */

/*
 * How the format code reaches an image file: synchronous, whole transfers.
 * Every op returns 0 or -errno. A read past the end of the file fills the
 * rest with zeroes. @write and @sync are needed only by a repair.
 */
struct qcow2_io {
	int (*read)(void *opaque, void *buf, size_t len, uint64_t off);
	int (*write)(void *opaque, const void *buf, size_t len, uint64_t off);
	int (*sync)(void *opaque); /* written data durable */
	int (*size)(void *opaque, uint64_t *size);
	void *opaque;
	/* the file cannot grow (a block device): edits allocate below its
	 * size and fail with -ENOSPC when that is full */
	bool fixed_size;
};

static inline int qcow2_io_read(const struct qcow2_io *io, void *buf, size_t len, uint64_t off)
{
	return io->read(io->opaque, buf, len, off);
}

static inline int qcow2_io_write(const struct qcow2_io *io, const void *buf, size_t len,
				 uint64_t off)
{
	return io->write ? io->write(io->opaque, buf, len, off) : -EBADF;
}

static inline int qcow2_io_sync(const struct qcow2_io *io)
{
	return io->sync ? io->sync(io->opaque) : -EBADF;
}

/* ---- messages and progress ---- */

enum qcow2_msg_level {
	QCOW2_MSG_INFO = 0,  /* e.g. "Leaked cluster 5 refcount=2 reference=1" */
	QCOW2_MSG_ERROR = 1, /* e.g. "ERROR cluster 5 refcount=0 reference=1" */
	QCOW2_MSG_REPAIR = 2 /* e.g. "Repairing cluster 5 refcount=2 reference=1" */
};

struct qcow2_tool_cb {
	/* One message line (no trailing newline). May be NULL. */
	void (*msg)(void *opaque, enum qcow2_msg_level level, const char *line);
	/* Progress of a long operation in [0, 1]. May be NULL. */
	void (*progress)(void *opaque, double fraction);
	void *opaque;
};

/* printf-style message through @cb (nothing if @cb or cb->msg is NULL). */
void qcow2_tool_msg(const struct qcow2_tool_cb *cb, enum qcow2_msg_level level, const char *fmt,
		    ...) __attribute__((format(printf, 3, 4)));

/* ---- reading ---- */

/* Read an 8-byte entry table (L1, refcount table) into host order (malloc'd). 0 or -errno. */
int qcow2_read_table(const struct qcow2_io *io, uint64_t off, uint64_t n, uint64_t **out);

/*
 * The one snapshot table reader: read and decode the table @h describes in
 * a file of @file_size bytes. Every entry is checked by
 * qcow2_snapshot_parse(); nothing is read past the end of the file or past
 * QCOW2_MAX_SNAPSHOTS_BYTES. Snapshot L1 tables are not looked at. On
 * success *buf is the raw table (malloc'd), *used the bytes up to the end of
 * the last entry (its padding need not exist), *snaps h->nb_snapshots
 * decoded entries pointing into *buf (malloc'd; all NULL/0 without
 * snapshots). 0 or -errno with @err set.
 */
int qcow2_snapshots_read(const struct qcow2_io *io, const struct qcow2_header_info *h,
			 uint64_t file_size, uint8_t **buf, uint64_t *used,
			 struct qcow2_snapshot_info **snaps, char *err, size_t errlen);

/*
 * An image opened synchronously: the validated header, the active L1 table
 * and the refcount table in host byte order, and the decoded snapshot
 * table. Opening validates what qcow2_header_parse() validates plus the
 * snapshot table entries; it does not look at L2 tables, refcount blocks or
 * snapshot L1 tables (their users validate those as they walk them).
 */
struct qcow2_oimg {
	struct qcow2_io io; /* the caller's; it keeps owning what io.opaque names */
	bool writable;
	char *path;
	uint64_t file_size;
	uint8_t *hbuf; /* the first cluster (or the whole file if shorter) */
	size_t hlen;
	struct qcow2_header_info h;
	uint64_t *l1;                      /* h.l1_size entries, host order */
	uint64_t *rt;                      /* h.refcount_table_entries, host order */
	uint8_t *snapbuf;                  /* raw snapshot table */
	uint64_t snapbuf_len;              /* bytes of the snapshot table actually used */
	struct qcow2_snapshot_info *snaps; /* h.nb_snapshots decoded entries (point into snapbuf) */
};

/*
 * Open the image behind @io (@name for messages; @writable: a repair may
 * write). 0, -ENOTSUP if not qcow2 (bad magic), or -errno with @err set.
 * qcow2_oimg_close() also after a failed open.
 */
int qcow2_oimg_open(struct qcow2_oimg *im, const struct qcow2_io *io, const char *name,
		    bool writable, char *err, size_t errlen);
void qcow2_oimg_close(struct qcow2_oimg *im);

/* ---- check / repair ---- */

enum {
	QCOW2_CHECK_FIX_LEAKS = 1u << 0,  /* -r leaks */
	QCOW2_CHECK_FIX_ERRORS = 1u << 1, /* -r all (with FIX_LEAKS) */
};

struct qcow2_check_result {
	uint64_t corruptions;  /* remaining after repair */
	uint64_t leaks;        /* remaining after repair */
	uint64_t check_errors; /* internal errors (I/O, memory): check incomplete */
	uint64_t corruptions_fixed;
	uint64_t leaks_fixed;
	uint64_t image_end_offset; /* end of the last cluster in use */
	uint64_t total_clusters;   /* guest clusters */
	uint64_t allocated_clusters;
	uint64_t fragmented_clusters;
	uint64_t compressed_clusters;
	bool dirty_cleared; /* the dirty bit was set and has been cleared */
};

/*
 * Check the qcow2 image behind @io (@name for messages): walk the active
 * L1/L2 tables, every snapshot's L1/L2 tables, the snapshot table, the
 * refcount table and blocks, bitmaps; compute every cluster's reference
 * count and compare it with the stored refcount. Reports (through cb->msg)
 * corruptions (refcount too low, including 0 for a used cluster; metadata
 * overlapping other uses; entries beyond the end of the file; misaligned
 * entries; wrong COPIED flags) and leaks (refcount too high). @flags:
 * QCOW2_CHECK_FIX_*; @io must be writable when a fix is requested.
 *
 * When fixes were made, the image is checked again (as qemu-img does) and
 * *res describes what is left: corruptions/leaks remaining, plus the
 * corruptions_fixed/leaks_fixed of the repair pass.
 *
 * Returns 0 when the check ran (look at *res: check_errors non-zero means some
 * part could not be examined), -ENOTSUP if it is not a qcow2 image, or
 * another -errno when it could not be done (I/O error, a repair that needs
 * -r all, failed writes); @err then says why and res->check_errors is
 * non-zero. A repair succeeded iff the call returned 0 and
 * res->check_errors == 0 && res->corruptions == 0.
 */
int qcow2_check_io(const struct qcow2_io *io, const char *name, unsigned flags,
		   struct qcow2_check_result *res, const struct qcow2_tool_cb *cb, char *err,
		   size_t errlen);

/* ---- internal snapshots (snapshot.c) ---- */

/* One snapshot, decoded (list, delete) or to create. */
struct qcow2_snap_desc {
	char id[128];   /* create: "" = QEMU's choice (largest numeric ID + 1), set on return */
	char name[256]; /* create: the name (QEMU's limit: 255 bytes) */
	uint64_t vm_state_size;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t disk_size; /* virtual size when taken (0: not recorded) */
	int64_t icount;     /* -1: not recorded */
};

/*
 * Snapshot operations on an image nothing else uses meanwhile (the offline
 * tool with the write lock, or the engine closed: see qcow2_snapshot_file in
 * qcow2/qcow2.h), synchronous over @io, in an order that makes a crash at
 * any point leak clusters at most (snapshot.c's header comment). @name names
 * the image in messages. Error messages follow QEMU's ("Snapshot with name
 * 'x' already exists", "Snapshot with id 'x' and name 'y' does not exist").
 * Internal snapshots are refused with an external data file (as QEMU does)
 * and on dirty or corrupt images. 0 or -errno with @err set.
 *
 * create: a new snapshot of the active L1 table, named @sn->name, with
 *         @sn's date, VM clock and icount; @sn->id is set. With
 *         QCOW2_SNAP_UNIQUE_NAME (QMP's rule) an empty or existing name is
 *         refused; without it (qemu-img's) both are allowed.
 * delete: the snapshot with ID @id and/or name @sname (either may be NULL);
 *         @out (may be NULL) receives what it was; once the lowered
 *         refcounts are durable, the clusters it freed go to @punch (may be
 *         NULL), as QEMU discards them.
 * apply:  make the snapshot with ID or name @id_or_name the active state
 *         (qemu-img snapshot -a); refused across a resize and, as QEMU
 *         refuses it, on an image with persistent dirty bitmaps.
 * list:   *@out (malloc'd) gets the *@n snapshots, table order.
 */
#define QCOW2_SNAP_UNIQUE_NAME 1u
int qcow2_snapshot_create_io(const struct qcow2_io *io, const char *name,
			     struct qcow2_snap_desc *sn, unsigned flags, char *err, size_t errlen);
/* Give freed host ranges back to the file system (a hole punch); errors are ignored. */
struct qcow2_snap_punch {
	void (*fn)(void *opaque, uint64_t off, uint64_t len);
	void *opaque;
};
int qcow2_snapshot_delete_io(const struct qcow2_io *io, const char *name, const char *id,
			     const char *sname, struct qcow2_snap_desc *out,
			     const struct qcow2_snap_punch *punch, char *err, size_t errlen);
int qcow2_snapshot_apply_io(const struct qcow2_io *io, const char *name, const char *id_or_name,
			    char *err, size_t errlen);
int qcow2_snapshot_list_io(const struct qcow2_io *io, const char *name,
			   struct qcow2_snap_desc **out, uint32_t *n, char *err, size_t errlen);

/*
 * Persistent dirty bitmaps on an image nothing else uses meanwhile (same
 * rules as the snapshot operations above), in QEMU's on-disk form. @op:
 * 'a' add @bname (granularity @granularity, 0: QEMU's default, the cluster
 * size within 4 KiB..64 KiB; enabled unless @disabled: it records writes
 * once an engine opens the image), 'r' remove, 'c' clear (all bits zero),
 * 'e' enable, 'd' disable. Adding to an image without a bitmaps extension
 * creates it (and sets autoclear bit 0); removing the last one removes it.
 * The crash-safe order is in snapshot.c. Errors with QEMU's messages:
 * -EEXIST "Bitmap already exists: x", -ENOENT "Dirty bitmap 'x' not found",
 * -EUCLEAN (clear/enable/disable an in-use, i.e. inconsistent, bitmap),
 * -EINVAL (name, granularity). 0 or -errno with @err set.
 * For an offline resize, @bname ignored: 'U' marks every bitmap in use
 * (-EUCLEAN if one already is), 'F' gives every in-use bitmap a table for
 * the header's size and clears in_use (snapshot.c has the order).
 */
int qcow2_bitmap_edit_io(const struct qcow2_io *io, const char *name, char op, const char *bname,
			 uint32_t granularity, bool disabled, char *err, size_t errlen);

/*
 * Merge into the persistent bitmap @bname (QMP block-dirty-bitmap-merge with
 * this target): @bits (@nbytes bytes, one bit per granule of @bname's
 * granularity, bit i of byte j = granule 8j + i, as on disk) are ORed into
 * its bits, written copy-on-write in the order of qcow2_bitmap_edit_io (new
 * data clusters and table, new directory, one header write, old ones
 * released). -ENOENT, -EUCLEAN (in use) as there. 0 or -errno with @err set.
 */
int qcow2_bitmap_merge_io(const struct qcow2_io *io, const char *name, const char *bname,
			  const uint8_t *bits, uint64_t nbytes, char *err, size_t errlen);

/*
 * *@end: the byte offset one past the last cluster with a non-zero refcount
 * (everything after it is free). A writer that closed the image may cut the
 * file there: vqcowd preallocates ahead of what it uses, and its online
 * bitmap commands close and reopen the image each time. 0 or -errno.
 */
int qcow2_used_end_io(const struct qcow2_io *io, const char *name, uint64_t *end, char *err,
		      size_t errlen);

#endif /* VQCOW_QCOW2FMT_IMAGE_H */
