/* SPDX-License-Identifier: MIT */
/*
 * qcow2/offline.h — offline (synchronous) qcow2 operations: create, info,
 * check/repair, map. Used by the vqcow-img tool, and by the engine to repair
 * an image whose dirty bit is set (lazy refcounts) before serving it.
 *
 * Everything here is synchronous (pread/pwrite on a plain fd) and must never
 * be called on the request path. Image files are hostile input: every table
 * offset, size and entry is validated before use; a malformed image yields
 * -EINVAL/-EFBIG/-EIO and a one-line message naming the field, never a crash.
 *
 * Semantics follow qemu-img where there is one (create options, check exit
 * codes and counts, map ranges), so qemu-img can serve as the oracle in tests.
 *
 * Invariants kept by the repair code (qcow2_check with QCOW2_CHECK_FIX_*):
 *  - leaks are fixed by lowering refcounts to the computed reference count;
 *  - with QCOW2_CHECK_FIX_ERRORS, refcounts that are too low (or a damaged
 *    refcount structure) make the whole refcount structure be rebuilt into
 *    clusters past the end of everything referenced; the new table is made
 *    durable (fdatasync) before the header points at it, and the header is
 *    rewritten last, so a crash mid-repair leaves the old structure in use;
 *  - COPIED flags are set iff the refcount is exactly 1 (active L1/L2 only);
 *  - the dirty bit (and the corrupt bit) are cleared only when the image is
 *    left without corruptions.
 */
#ifndef VQCOW_QCOW2_OFFLINE_H
#define VQCOW_QCOW2_OFFLINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"

/* ---- callbacks for messages and progress ---- */

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

/* ---- create ---- */

enum qcow2_prealloc {
	QCOW2_PREALLOC_OFF = 0,
	QCOW2_PREALLOC_METADATA, /* L1/L2 tables and data clusters reserved, file sparse */
	QCOW2_PREALLOC_FALLOC,   /* ... and the data clusters fallocate()d */
	QCOW2_PREALLOC_FULL,     /* ... and zeroes written */
};

struct qcow2_create_opts {
	uint64_t size;          /* virtual size in bytes (rounded up to 512); 0 with a backing
				   file = the backing file's size */
	bool size_set;          /* size was given (0 is then a valid size) */
	uint32_t cluster_size;  /* 0 = 65536; power of two in [512, 2 MiB] */
	unsigned refcount_bits; /* 0 = 16; 1..64, power of two; 16 for version 2 */
	int version;            /* 2 (compat=0.10) or 3 (compat=1.1); 0 = 3 */
	bool extended_l2;       /* version 3, cluster_size >= 16 KiB */
	bool lazy_refcounts;    /* version 3 */
	enum qcow2_prealloc prealloc;
	const char *backing_file; /* NULL = none; stored as given */
	const char *backing_fmt;  /* NULL = probe the backing file ("qcow2" or "raw") */
};

/*
 * Create a qcow2 image at @path (which must not exist: O_EXCL). Validates the
 * option combination first (as qemu-img does) and writes nothing if it is
 * invalid. Opens the backing file (relative names resolved against @path's
 * directory) to check it exists and to get its size when opts->size_set is
 * false. On failure the partial file is removed.
 * Returns 0 or -errno; on error a one-line message is written to @err.
 */
int qcow2_create(const char *path, const struct qcow2_create_opts *opts,
		 const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* Create a raw image of @size bytes (prealloc OFF, FALLOC or FULL). 0 or -errno. */
int qcow2_create_raw(const char *path, uint64_t size, enum qcow2_prealloc prealloc,
		     const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* ---- info ---- */

struct qcow2_info_snapshot {
	char *id;
	char *name;
	uint64_t vm_state_size;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t icount;
	bool has_icount;
	uint64_t disk_size; /* 0 if not recorded */
};

struct qcow2_image_info {
	char format[8]; /* "qcow2" or "raw" */
	uint64_t virtual_size;
	uint64_t actual_size; /* allocated bytes on the host (st_blocks * 512) */
	uint64_t file_size;
	/* qcow2 only: */
	uint32_t cluster_size;
	int version; /* 2 or 3 */
	unsigned refcount_bits;
	bool extended_l2;
	bool lazy_refcounts;
	bool corrupt;
	bool dirty;
	int compression_type;    /* 0 zlib, 1 zstd */
	char *backing_file;      /* NULL if none */
	char *backing_fmt;       /* NULL if not recorded */
	char *full_backing_file; /* backing_file resolved against the image's directory */
	char *data_file;         /* external data file name, NULL if none */
	bool data_file_raw;
	unsigned nb_snapshots;
	struct qcow2_info_snapshot *snapshots;
};

/*
 * Describe the image at @path. @fmt: NULL = probe ("qcow2" if the magic
 * matches, else "raw"), or "qcow2"/"raw" to force. The header and the tables
 * needed to describe the image are validated as on open. 0 or -errno (+@err).
 * Free with qcow2_image_info_free().
 */
int qcow2_info(const char *path, const char *fmt, struct qcow2_image_info *info, char *err,
	       size_t errlen);
void qcow2_image_info_free(struct qcow2_image_info *info);

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
 * Check the qcow2 image at @path: walk the active L1/L2 tables, every
 * snapshot's L1/L2 tables, the snapshot table, the refcount table and
 * blocks, bitmaps; compute every cluster's reference count and compare it
 * with the stored refcount. Reports (through cb->msg) corruptions (refcount
 * too low, including 0 for a used cluster; metadata overlapping other uses;
 * entries beyond the end of the file; misaligned entries; wrong COPIED flags)
 * and leaks (refcount too high). @flags: QCOW2_CHECK_FIX_*; the image is
 * opened read-write only when a fix is requested.
 *
 * When fixes were made, the image is checked again (as qemu-img does) and
 * *res describes what is left: corruptions/leaks remaining, plus the
 * corruptions_fixed/leaks_fixed of the repair pass.
 *
 * Returns 0 when the check ran (look at *res: check_errors non-zero means some
 * part could not be examined), -ENOTSUP if @path is not a qcow2 image, or
 * another -errno when it could not be done (image not openable, I/O error,
 * a repair that needs -r all, failed writes); @err then says why and
 * res->check_errors is non-zero. A repair succeeded iff the call returned 0
 * and res->check_errors == 0 && res->corruptions == 0.
 */
int qcow2_check(const char *path, unsigned flags, struct qcow2_check_result *res,
		const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* The same on an already-open fd (read-write if a fix is requested). */
int qcow2_check_fd(int fd, const char *name, unsigned flags, struct qcow2_check_result *res,
		   const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* ---- map ---- */

struct qcow2_map_entry {
	uint64_t start;
	uint64_t length;
	unsigned depth; /* 0 = the image itself, 1 = its backing file, ... */
	bool present;   /* allocated in some layer of the chain */
	bool zero;      /* reads as zeroes */
	bool data;      /* data is read from a host file */
	bool has_offset;
	uint64_t offset;      /* host offset in @filename when has_offset */
	const char *filename; /* the file holding the range (valid during the callback) */
};

typedef int qcow2_map_fn(void *opaque, const struct qcow2_map_entry *e);

/*
 * Walk the guest address space of @path (and its backing chain) and call
 * @fn for each maximal range with the same status, with qemu-img map
 * semantics (ranges merged when the status and the host offsets continue).
 * @fmt as for qcow2_info(). Stops early if @fn returns non-zero (that value
 * is returned). 0 or -errno (+@err).
 */
int qcow2_map(const char *path, const char *fmt, qcow2_map_fn *fn, void *opaque,
	      const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/*
 * ---- internals shared by the offline tools (check.c, create.c, info.c,
 * map.c); not for other modules ----
 *
 * struct qcow2_oimg is an image opened synchronously: the validated header,
 * the active L1 table and the refcount table in host byte order, and the
 * decoded snapshot table. Opening validates what qcow2_header_parse()
 * validates plus the snapshot table entries; it does not look at L2 tables,
 * refcount blocks or snapshot L1 tables (check and map validate those as
 * they walk them).
 */
struct qcow2_oimg {
	int fd;
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

/* Open @path (read-write if @writable). 0, -ENOTSUP if not qcow2 (bad magic), or -errno. */
int qcow2_oimg_open(struct qcow2_oimg *im, const char *path, bool writable, char *err,
		    size_t errlen);
/* Same on an fd the caller keeps owning (@name for messages). */
int qcow2_oimg_open_fd(struct qcow2_oimg *im, int fd, const char *name, bool writable, char *err,
		       size_t errlen);
void qcow2_oimg_close(struct qcow2_oimg *im);

/* Full pread/pwrite; a read past EOF fills zeroes. 0 or -errno. */
int qcow2_pread_full(int fd, void *buf, size_t len, uint64_t off);
int qcow2_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);

/* Read an 8-byte entry table (L1, refcount table) into host order. 0 or -errno. */
int qcow2_read_table(int fd, uint64_t off, uint64_t n, uint64_t **out);

/* Resolve @name (a backing or data file name) against the directory of @image. malloc'd. */
char *qcow2_path_relative(const char *image, const char *name);

/* Probe a file: 1 qcow2 (magic matches), 0 raw, -errno. */
int qcow2_probe(int fd);

/* printf-style message through @cb. */
void qcow2_tool_msg(const struct qcow2_tool_cb *cb, enum qcow2_msg_level level, const char *fmt,
		    ...) __attribute__((format(printf, 3, 4)));

#endif /* VQCOW_QCOW2_OFFLINE_H */
