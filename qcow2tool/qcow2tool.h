/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/qcow2tool.h — the offline qcow2 tool library behind vqcow-img:
 * create, info, check/repair, map.
 *
 * Depends on the format code (qcow2fmt/) only, never on the online engine
 * (qcow2/). Everything here is synchronous on plain fds (fdio.c gives the
 * format code a struct qcow2_io over an fd). The daemon calls only
 * qcow2_create (the overlay of an external snapshot, a new file nobody
 * else uses yet). The checker itself lives in qcow2fmt/check.c, shared with the
 * engine's repair of a dirty image; see qcow2fmt/image.h for its invariants.
 *
 * Image files are hostile input: every table offset, size and entry is
 * validated before use; a malformed image yields -EINVAL/-EFBIG/-EIO and a
 * one-line message naming the field, never a crash.
 *
 * Semantics follow qemu-img where there is one (create options, check exit
 * codes and counts, map ranges), so qemu-img can serve as the oracle in tests.
 */
#ifndef VQCOW_QCOW2TOOL_H
#define VQCOW_QCOW2TOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "io.h"

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
	const char *backing_fmt;  /* required with a backing file ("qcow2" or "raw"), as qemu-img */
	int compression_type;     /* QCOW2_COMPRESSION_*; zstd needs version 3 */
	bool overwrite; /* truncate an existing file instead of O_EXCL (convert); the caller
			   holds its write lock. On failure the file is still removed. */
};

/*
 * Create a qcow2 image at @path (which must not exist: O_EXCL). Validates the
 * option combination first (as qemu-img does) and writes nothing if it is
 * invalid. Opens the backing file (relative names resolved against @path's
 * directory) to check it exists and to get its size when opts->size_set is
 * false; a backing file without opts->backing_fmt is refused after that
 * (-EINVAL, "Backing file specified without backing format", then qemu-img's
 * hint line "Detected format of FMT." in @err): a probed format is never
 * recorded. On failure the partial file is removed.
 * Returns 0 or -errno; on error a one-line message is written to @err.
 */
int qcow2_create(const char *path, const struct qcow2_create_opts *opts,
		 const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* Create a raw image of @size bytes (prealloc OFF, FALLOC or FULL). 0 or -errno. */
int qcow2_create_raw(const char *path, uint64_t size, enum qcow2_prealloc prealloc,
		     const struct qcow2_tool_cb *cb, char *err, size_t errlen);

/* ---- rebase ---- */

/*
 * qemu-img rebase -u: record @backing (NULL = none) with the format
 * @backing_fmt (NULL = not recorded) in the header of the qcow2 image at
 * @path, keeping every other header extension. The data is not looked at.
 * The caller holds the write lock. 0 or -errno (+@err).
 */
int qcow2_rebase_unsafe(const char *path, const char *backing, const char *backing_fmt, char *err,
			size_t errlen);

/*
 * qemu-img commit's last step (without -d): empty the qcow2 image at @path
 * (every cluster unallocated) the way QEMU 7.2 does, byte for byte: see
 * qcow2tool/empty.c. -ENOTSUP for images QEMU empties cluster by cluster
 * (snapshots, bitmaps, an external data file, version 2: img_discard_full).
 * The caller holds the write lock. 0 or -errno (+@err).
 */
int qcow2_make_empty(const char *path, char *err, size_t errlen);

/* 1 if qcow2_make_empty can empty @path (QEMU rebuilds it), 0 if QEMU
 * discards cluster by cluster there, -errno (+@err). */
int qcow2_make_empty_rebuilds(const char *path, char *err, size_t errlen);

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

/*
 * Check the qcow2 image at @path (qcow2_check_io() over a plain fd, opened
 * read-write only when a fix is requested). -errno also when @path cannot be
 * opened.
 */
int qcow2_check(const char *path, unsigned flags, struct qcow2_check_result *res,
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

/* ---- reading guest data through the backing chain (map.c) ---- */

/* An image and its backing chain open for reading (what convert reads). */
struct qcow2_reader;

/* An internal snapshot (qemu-img -l): by ID or name (ID first), or by both. */
struct qcow2_snap_sel {
	const char *id_or_name; /* -l NAME */
	const char *id;         /* -l snapshot.id=ID */
	const char *name;       /* -l snapshot.name=NAME */
};

/*
 * Open @path (@fmt as for qcow2_info()) and its backing chain read-only;
 * with @snap, the image's internal snapshot instead of its current state
 * (-ENOENT if there is none such). 0 or -errno (+@err). The caller takes the
 * locks (qcow2_lock_image).
 */
int qcow2_reader_open(struct qcow2_reader **r, const char *path, const char *fmt,
		      const struct qcow2_snap_sel *snap, char *err, size_t errlen);
void qcow2_reader_close(struct qcow2_reader *r);
/* The guest size in bytes (whole sectors, as QEMU counts them). */
uint64_t qcow2_reader_size(const struct qcow2_reader *r);
/*
 * The status of [@off, @off + @len) (@off < size): *@pnum bytes from @off
 * (> 0) that read as zeroes through the chain without reading any data
 * (*@zero true), or that are data somewhere in the chain (*@zero false; they
 * may still contain zeroes). 0 or -errno (+@err).
 */
int qcow2_reader_status(struct qcow2_reader *r, uint64_t off, uint64_t len, uint64_t *pnum,
			bool *zero, char *err, size_t errlen);
/* Read guest bytes through the chain (compressed clusters inflated). 0 or -errno (+@err). */
int qcow2_reader_read(struct qcow2_reader *r, uint64_t off, uint64_t len, void *buf, char *err,
		      size_t errlen);

/* ---- convert (convert.c) ---- */

struct qcow2_convert_opts {
	const char *src, *src_fmt;             /* src_fmt NULL = probe */
	const struct qcow2_snap_sel *snapshot; /* -l: this snapshot of src, NULL = none */
	const char *dst, *dst_fmt;       /* "qcow2" or "raw"; an existing file is overwritten */
	struct qcow2_create_opts create; /* qcow2 output: -o as create (size: the source's) */
	bool compress;                   /* -c: compressed clusters (qcow2 output) */
	uint64_t min_sparse; /* -S: zeroes in runs of this many bytes (a multiple of 512;
				qcow2: whole clusters) are not written; 0 = write all */
};

/*
 * Copy the guest view of o->src (through its backing chain) into a new image
 * o->dst, as qemu-img convert without -B. The caller holds the source's read
 * locks; the destination is written under its write lock, taken here.
 * Progress through @cb. 0 or -errno (+@err).
 */
int qcow2_convert(const struct qcow2_convert_opts *o, const struct qcow2_tool_cb *cb, char *err,
		  size_t errlen);

/* ---- resize (resize.c) ---- */

/*
 * Grow the image at @path (@fmt as for qcow2_info()) to @size bytes, as
 * qemu-img resize does without --shrink and --preallocation: a raw file is
 * extended; a qcow2 image gets the new size in its header and, when its L1
 * table cannot map it, a new L1 table (resize.c has the order of the
 * writes). The caller holds the locks (QCOW2_LOCK_RESIZE) and has checked
 * that @size is not smaller (shrinking is -ENOTSUP here too). 0 or -errno
 * (+@err, a message without the tool's name).
 */
int qcow2_resize(const char *path, const char *fmt, uint64_t size, char *err, size_t errlen);

/* ---- internal snapshots (fdio.c, over qcow2fmt/snapshot.c) ---- */

/*
 * One operation of qemu-img bitmap on the qcow2 image at @path (the caller
 * holds the write lock): @op 'a' add @name (@granularity, 0: QEMU's
 * default), 'r' remove, 'c' clear, 'e' enable, 'd' disable; the crash-safe
 * order and QEMU's messages of qcow2_bitmap_edit_io (qcow2fmt/image.h).
 * 0 or -errno with @err set.
 */
int qcow2_bitmap_tool(const char *path, char op, const char *name, uint32_t granularity, char *err,
		      size_t errlen);

/*
 * qemu-img snapshot on the image at @path (the caller holds the locks):
 * @op 'l' lists (*@list, *@n, malloc'd), 'c' creates @arg (duplicate and
 * empty names allowed, as qemu-img does), 'd' deletes the snapshot NAMED
 * @arg, 'a' reverts to the snapshot with ID or name @arg. 0 or -errno with
 * @err set (-ENOENT: "snapshot not found" for 'd').
 */
int qcow2_snapshot_tool(const char *path, char op, const char *arg, struct qcow2_snap_desc **list,
			uint32_t *n, char *err, size_t errlen);

/* ---- image locks (QEMU-compatible; lock.c) ---- */

enum qcow2_lock_mode {
	QCOW2_LOCK_INFO,    /* qemu-img info: the image only, no read permission */
	QCOW2_LOCK_READ,    /* qemu-img check / map: the whole chain, reading */
	QCOW2_LOCK_CONVERT, /* qemu-img convert's source: as READ, and a raw image keeps
			       writers out too */
	QCOW2_LOCK_WRITE,   /* qemu-img check -r: the image read-write, the chain reading */
	QCOW2_LOCK_RESIZE,  /* qemu-img resize: as WRITE, and a raw image also takes resize */
};

struct qcow2_lock_fd {
	int fd;
	struct io_lock lock;
};

struct qcow2_locks {
	struct qcow2_lock_fd *files;
	unsigned n;
};

/*
 * Take the locks qemu-img takes for @mode on the image at @path (@fmt NULL =
 * probe), its external data file and its backing chain (@force_share: -U).
 * 0; -EAGAIN when another process conflicts (@err: "FILE: Failed to get
 * "write" lock: locked by another process"); -EINVAL for force_share with
 * QCOW2_LOCK_WRITE; another -errno. Files that cannot be opened are skipped
 * (the tool reports them). Release with qcow2_unlock_image() (also after a
 * failure: nothing is held then).
 */
int qcow2_lock_image(struct qcow2_locks *lk, const char *path, const char *fmt,
		     enum qcow2_lock_mode mode, bool force_share, char *err, size_t errlen);
void qcow2_unlock_image(struct qcow2_locks *lk);

/*
 * ---- the plain-fd side, shared by check, create, info and map (fdio.c);
 * not for other modules ----
 */

/* A struct qcow2_io over @fd (pread/pwrite/fdatasync/fstat); the caller keeps @fd. */
struct qcow2_io qcow2_fd_io(int fd);

/* Full pread/pwrite; a read past EOF fills zeroes. 0 or -errno. */
int qcow2_pread_full(int fd, void *buf, size_t len, uint64_t off);
int qcow2_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);

/* Size of a regular file or block device (and its allocated bytes if @allocated). */
int qcow2_fd_size(int fd, uint64_t *size, uint64_t *allocated);

/* Probe a file: 1 qcow2 (magic matches), 0 raw, -errno. */
int qcow2_probe(int fd);

/*
 * Open @path read-write and parse its qcow2 header from the first cluster:
 * *@fdp, and *@bufp (calloc'ed, *@lenp bytes: at least 64 KiB or the whole
 * cluster) for the caller to close and free. -errno with @err set (naming
 * @path) and nothing left open.
 */
int qcow2_fd_open_header(const char *path, int *fdp, uint8_t **bufp, size_t *lenp,
			 struct qcow2_header_info *h, char *err, size_t errlen);

#endif /* VQCOW_QCOW2TOOL_H */
