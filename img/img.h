/* SPDX-License-Identifier: MIT */
/*
 * img/ — the image layer: one interface over raw files and qcow2 images.
 *
 * Two implementations: raw (img/img_raw.c) and qcow2 (img/img_qcow2.c,
 * built on the qcow2/ mapping engine, which does metadata I/O only; data I/O
 * for qcow2 is issued here in img/ through io/). img/ knows nothing of virtio:
 * its caller (blk/) hands it byte ranges and iovecs.
 *
 * All operations are asynchronous on the io_loop the image was opened on.
 * An operation is described by a struct img_io the caller owns (embedded in
 * its request). Each submitted img_io ends in exactly one call of
 * io->done(io, res): res is 0 or -errno. done() is never called from inside
 * the submitting call (always from the loop), so a caller may submit and then
 * keep touching its request.
 *
 * Ranges are in bytes; the caller (blk/) has already checked they are within
 * img->size and aligned to 512 bytes. Read-only images refuse writes with
 * -EROFS (blk/ checks earlier too).
 *
 * Locks: every file of an open image (the image, a qcow2 external data file,
 * each backing file) holds QEMU-compatible OFD locks (io_lock_set), taken
 * before anything is read from it, so vqcowd, QEMU, qemu-img, qemu-io and
 * qemu-storage-daemon refuse each other as two QEMU processes would. What
 * each file takes (use / does not share), as a QEMU guest device
 * (share-rw=off) takes it:
 *   raw image        read: consistent read / write
 *                    write: consistent read, write / write
 *   qcow2 image and  read: consistent read / write, resize
 *   its data file    write: consistent read, write, resize / write, resize
 *   backing files    consistent read / write, resize (any format, any depth)
 * opts->force_share (read-only opens only; qemu's -U / force-share=on): only
 * consistent read, sharing everything. An image writes only while it holds
 * the write permission (img->perm == IMG_PERM_WRITE): otherwise writes,
 * discards and write-zeroes fail with -EROFS.
 */
#ifndef VQCOW_IMG_H
#define VQCOW_IMG_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io.h"

struct img;
struct img_io;

/*
 * A caller parked by an operation that returned -EAGAIN (img_block_status):
 * @wake(@w) runs later from the loop (never inside the call); call again.
 */
struct img_wait {
	void (*wake)(struct img_wait *w); /* set by the caller */
	void *priv;                       /* the caller's */
};

typedef void img_done_fn(struct img_io *io, int res);

enum img_op {
	IMG_OP_READ = 1,
	IMG_OP_WRITE,
	IMG_OP_FLUSH,
	IMG_OP_DISCARD,
	IMG_OP_WRITE_ZEROES,
};

enum {
	IMG_IO_UNMAP = 1u << 0, /* write_zeroes may deallocate */
	IMG_IO_FULL = 1u << 1,  /* discard: img_discard_full */
};

struct img_io {
	img_done_fn *done; /* set by the caller */
	void *priv;        /* the caller's */

	/* The caller's, optional: the loop (thread) of the submitter. NULL = the
	 * image's loop. With img->any_loop the operation runs there (every I/O,
	 * and done()). Otherwise the operation is submitted on the image's
	 * thread and completes there, and the image may only run CPU work of
	 * the request on @loop's thread (qcow2 inflates compressed clusters
	 * there); @loop must then accept io_post_remote(). */
	struct io_loop *loop;

	/* Set by the submitters; the implementation may read them. */
	uint8_t op;
	unsigned flags;
	struct iovec *iov; /* data buffers (READ/WRITE); may be modified in flight */
	unsigned iovcnt;
	uint64_t off;
	uint64_t len;

	/* Private to the implementation. */
	struct io_cmd cmd;   /* enough for a single-extent request */
	void *impl;          /* implementation's per-request context, if it needs more */
	int err;             /* a result to report later */
	uint8_t stage;       /* implementation's state for multi-step operations */
	uint64_t pos;        /* implementation's progress (bytes done) */
	struct img_io *next; /* implementation's list link (raw: FLUSHes waiting) */
};

/* What an open image may do, and therefore which locks it holds. */
enum img_perm {
	IMG_PERM_NONE = 0, /* no locks at all (inactive image, e.g. handed over in a
			      migration): no writes */
	IMG_PERM_READ,     /* read; nobody else may write */
	IMG_PERM_WRITE,    /* read and write; nobody else may write */
};

/* Metadata cache numbers of a format that has caches (qcow2): sizes in bytes. */
struct img_cache_stats {
	uint64_t l2_cache_size, l2_cache_used, refcount_cache_size, refcount_cache_used;
	uint64_t cache_entry_size;
	uint64_t l2_hits, l2_misses, l2_evictions, refcount_hits, refcount_misses,
	    refcount_evictions, l2_prefetched;
	/* compressed clusters inflated, reads served from inflated clusters kept
	 * (or by a read of the same compressed bytes in flight: joins); reads of
	 * compressed bytes from the file, and the reads that joined one instead */
	uint64_t compressed_inflated, compressed_cache_hits, compressed_reads, compressed_joins;
	/* the engine's activity since open (struct qcow2_cache_stats) */
	uint64_t clusters_allocated, cow, l2_cow, l2_tables_allocated, refcount_blocks_allocated;
	uint64_t metadata_writes, metadata_write_bytes, writeback_batches, writeback_side_batches;
	/* write-back fdatasyncs; waits for linked entries (qcow2_link) and the
	 * fdatasyncs that ended during them, summed and the most in one */
	uint64_t writeback_syncs, link_waits, link_wait_syncs, link_wait_syncs_max;
	uint64_t link_wait_us; /* the time those waits took, summed */
	/* allocations linked at map time (VQCOWD_TEST_EARLY_NEW), and those
	 * whose entries were written by the time their data write ended */
	uint64_t early_new_links, early_new_ahead;
	/* write-back batches started beside the last fdatasync of the one
	 * before (the tail); 1 if a file of the image took a write through the
	 * page cache (no tail from then on) */
	uint64_t writeback_tail_starts, page_cache_written;
	/* requests submitted on other threads (mt_submit): served there (a
	 * cached, allocated mapping) or handed to the image's thread */
	uint64_t fast_hits, fast_hops;
	/* the fast table the owner publishes for them: bytes of its pages and
	 * their array, the most its pages may take, entries set */
	uint64_t fast_table_size, fast_table_budget, fast_table_entries;
};

struct img_grow;

/* An internal snapshot, as QEMU's SnapshotInfo describes it. */
struct img_snapshot {
	char id[128];
	char name[256];
	uint64_t vm_state_size;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	int64_t icount; /* -1: not recorded */
};

struct img_bitmap;

struct img_ops {
	const char *format; /* "raw", "qcow2" */
	void (*submit)(struct img *img, struct img_io *io);
	/* Drain and release; all img_io must have completed. */
	void (*close)(struct img *img);
	/* Optional: human-readable description for logs (e.g. cache stats). */
	void (*describe)(struct img *img, char *buf, size_t len);
	/* Optional: re-read the virtual size (the file or device was resized
	 * outside); update img->size. 0 or -errno. */
	int (*refresh_size)(struct img *img);
	/* Optional: change the locks of every file of the image (img_set_perm). */
	int (*set_perm)(struct img *img, enum img_perm perm, char *err, size_t errlen);
	/* Optional: the image unallocated ranges are read from (NULL = none). */
	struct img *(*backing_of)(struct img *img);
	/* Optional: grow the virtual size to @size bytes (online resize; img_grow
	 * has the contract; called with @size > img->size). */
	int (*grow)(struct img *img, uint64_t size, struct img_grow *g);
	/* Optional: img_grow_blocks. */
	bool (*grow_blocks)(struct img *img);
	/* Optional: persistent dirty bitmaps (img_bitmaps). */
	int (*bitmaps)(struct img *img, struct img_bitmap *out, unsigned max);
	/* Optional: metadata cache numbers (img_cache_stats). */
	int (*cache_stats)(struct img *img, struct img_cache_stats *st);
	/* Optional: the internal snapshots (img_snapshot_list). */
	int (*snapshot_list)(struct img *img, const struct img_snapshot **list, unsigned *n);
	/* Optional: internal snapshots (img_snapshot). */
	int (*snapshot)(struct img *img, bool create, const char *id, const char *name,
			struct img_snapshot *out, char *err, size_t errlen);
	/* Optional: persistent dirty bitmaps changed (img_bitmap_edit). */
	int (*bitmap_edit)(struct img *img, char op, const char *name, uint32_t granularity,
			   bool disabled, char *err, size_t errlen);
	/* Optional: persistent bitmaps' bits (img_bitmap_ranges, img_bitmap_set,
	 * img_bitmap_merge). */
	int (*bitmap_ranges)(struct img *img, const char *name,
			     int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque);
	int (*bitmap_set)(struct img *img, const char *name, uint64_t off, uint64_t len);
	int (*bitmap_merge)(struct img *img, const char *name, const uint8_t *bits, uint64_t nbytes,
			    char *err, size_t errlen);
	/* Optional: become a read-only backing file, or writable again (img_set_writable). */
	int (*set_writable)(struct img *img, bool writable, char *err, size_t errlen);
	/* Optional: img_set_writable(true) of an image opened read-only (img_reopen_rw). */
	int (*reopen_rw)(struct img *img, char *err, size_t errlen);
	/* Optional: another backing image, recorded in the file (img_change_backing). */
	int (*change_backing)(struct img *img, struct img *backing, const char *name,
			      const char *fmt, char *err, size_t errlen);
	/* Optional: allocation status in this layer (img_block_status); NULL = all allocated. */
	int (*block_status)(struct img *img, uint64_t off, uint64_t len, uint64_t *pnum,
			    struct img_wait *w);
	/* Optional: hand the backing image over to the caller (img_take_backing). */
	struct img *(*take_backing)(struct img *img);
};

/*
 * Wraps the opening of files named inside an image (backing files and
 * external data files, and everything they name in turn): vqcowd uses it to
 * open them with the file-system identity of --user, so a hostile image
 * reaches no file that user could not open. enter() returns 0 or -errno (the
 * open then fails with it); leave() undoes it.
 */
struct img_name_guard {
	int (*enter)(void *priv);
	void (*leave)(void *priv);
	void *priv;
};

struct img_opts {
	const char *format; /* NULL = probe, "raw", "qcow2" */
	bool read_only;
	bool direct;               /* O_DIRECT (cache=none); set it: NULL opts mean true */
	uint64_t l2_cache_size;    /* qcow2: bytes, 0 = default (cover the image if sane) */
	uint32_t cache_entry_size; /* qcow2: slice bytes, 0 = default */
	bool allow_corrupt_ro;     /* qcow2: open an image with the corrupt bit read-only */
	bool no_l2_prefetch;       /* qcow2: no background read of the L2 tables after open */
	bool no_cluster_fill;      /* qcow2: a new cluster's first write writes its data only */
	bool blkdev_zero_ahead;    /* qcow2 on a block device: qcow2_opts.blkdev_zero_ahead */
	bool force_share;          /* read-only only: share every permission (qemu -U) */
	bool backing;              /* opened as a backing file (read-only; backing locks) */
	bool inactive; /* incoming migration: take no lock and keep no metadata; the image
			* serves nothing (reads -EIO, writes -EROFS) until img_set_perm(WRITE) */
	const struct img_name_guard *name_guard; /* NULL = open named files as we are */
	/* qcow2: the image's backing file is this already open image (the caller
	 * guarantees it is the file the header names), owned by the new image from a
	 * successful open on; NULL = open what the header names. Used to put a new
	 * overlay over the active image (blockdev-snapshot-sync). */
	struct img *backing_img;
};

struct img {
	const struct img_ops *ops;
	struct io_loop *loop;
	char *path;
	uint64_t size; /* virtual disk size in bytes */
	bool read_only;
	unsigned align; /* data I/O alignment the image wants (O_DIRECT), >= 512 */
	bool supports_discard;
	bool supports_write_zeroes;
	unsigned discard_granularity; /* bytes */
	uint32_t opt_io;              /* preferred I/O size in bytes (0 = not reported) */
	enum img_perm perm;           /* what the locks held allow */
	bool force_share;
	bool backing;
	/* Operations may be submitted from any thread, each on its own loop
	 * (img_io.loop): every I/O of the operation goes to that loop and done()
	 * runs on its thread. Raw images can (no shared state on the data
	 * path); qcow2 cannot (its engine has one owner thread, the image's
	 * loop). Open, close, refresh_size, set_perm and grow stay on the
	 * image's thread with no operation submitted elsewhere running. */
	bool any_loop;
	uint32_t cluster_size; /* the format's cluster size, 0 without clusters (raw) */
	/* Non-persistent dirty bitmaps (img/dirty.c), newest first, and how many
	 * of them are enabled (read by submitters on any thread). */
	struct img_dbm *dbms;
	unsigned dbm_enabled;
	/* When each bitmap of either kind was added (img_bm_born), for QEMU's
	 * listing order; persistent ones found at open have none (oldest). */
	struct img_bmage *bm_ages;
	uint64_t bm_clock;
	/* Operations may be submitted on another loop's thread (from inside
	 * that loop: io_loop_current() == img_io.loop, which must accept
	 * io_post_remote()); done() then runs on that thread. The image serves
	 * what it can there and hands the rest to its own loop and back
	 * (qcow2: cached, allocated clusters are read and written on the
	 * submitter's thread; everything else goes to the engine's owner).
	 * A submission from the image's own thread keeps the img_io.loop
	 * meaning above. Same limits as any_loop for the other operations. */
	bool mt_submit;
};

/*
 * Open @path, probing the format unless opts->format is set: a file starting
 * with the qcow2 magic "QFI\xfb" is qcow2, anything else raw. A backing file
 * (opts->backing) is never probed into qcow2 (-EPERM): its header may have
 * been written by a guest into a raw disk, and its backing file name would
 * reach any host file; its format must come from the image that uses it. @opts may be
 * NULL (probe, read-write, O_DIRECT). On failure
 * returns -errno and, if @err is not NULL, writes a one-line message naming
 * the file and the problem into @err (@errlen bytes).
 */
int img_open(struct img **imgp, struct io_loop *loop, const char *path, const struct img_opts *opts,
	     char *err, size_t errlen);
/* Close an image (all its img_io must have completed). NULL is fine. */
void img_close(struct img *img);

/*
 * Take or give up permissions on an open image at run time (enum img_perm),
 * for every file of the image: the locks are changed first (QEMU's order:
 * take the new bytes, check, then drop the old), and the image writes only
 * while it holds IMG_PERM_WRITE. Backing files hold READ while the image
 * holds READ or WRITE, nothing while it holds NONE.
 * 0; -EAGAIN (another process holds a conflicting lock; @err: "FILE: Failed
 * to get "write" lock: locked by another process"); -EROFS (WRITE on an
 * image opened read-only); -EBUSY (a read-write qcow2 image gives WRITE up
 * only with no request in flight); -ENOTSUP (the format cannot); or another
 * -errno. On failure the image keeps the permission it had.
 * qcow2 (the handoff of live migration on shared storage): giving WRITE up
 * writes all metadata back and drops it (the image is inactive: reads -EIO,
 * flushes succeed); taking WRITE again re-reads header, L1 and refcounts.
 * That drives the loop: never call it from inside a loop callback.
 */
int img_set_perm(struct img *img, enum img_perm perm, char *err, size_t errlen);

/* True if the image may be written now (opened read-write and holding the write lock). */
static inline bool img_may_write(const struct img *img)
{
	return !img->read_only && img->perm == IMG_PERM_WRITE;
}

/*
 * Test seam (vqcowd's VQCOWD_TEST_FAST_DELAY): qcow2 holds every 4th write
 * it serves on a submitter's thread @ms milliseconds after it mapped it, so
 * a test sees the cluster freed and reused under it if the grace period
 * did not wait for it. 0 (the default): off.
 */
void img_test_fast_delay(unsigned ms);

/*
 * Test seam (vqcowd's VQCOWD_TEST_TICKET_HOLD): every 4th fast ticket a
 * submitter's thread takes (qcow2's fast path) sleeps @us microseconds
 * between counting itself in and checking the generation, so that grace
 * periods start in that window. 0 (the default): off.
 */
void img_test_ticket_hold(unsigned us);

/*
 * Test seam (vqcowd's VQCOWD_TEST_ZREAD_FAIL): qcow2 fails every @n-th read
 * of compressed bytes (the owner's and the queue threads') with -EIO
 * without reading: each must fail exactly one request, never the reads
 * that waited for it. 0 (the default): off. img_test_zread_failed(): how
 * many it failed so far.
 */
void img_test_zread_fail(unsigned n);
uint64_t img_test_zread_failed(void);

/* Test seam (vqcowd's VQCOWD_TEST_LINK_DELAY): qcow2_test_link_delay(). */
void img_test_link_delay(unsigned ms);

/* Test seam (vqcowd's VQCOWD_TEST_SC_LINK): qcow2_test_sc_link(). */
void img_test_sc_link(bool on);

/* Test seam (vqcowd's VQCOWD_TEST_WB_HOLD): qcow2_test_wb_hold(). */
void img_test_wb_hold(unsigned ms);
/* Test seam (vqcowd's VQCOWD_TEST_SYNC_DELAY): qcow2_test_sync_delay(). */
void img_test_sync_delay(unsigned ms);

/* For a benchmark to decide (vqcowd's VQCOWD_TEST_EARLY_NEW; off by default):
 * qcow2_early_new(), the early link of new clusters of fresh space. */
void img_early_new(bool on);

/* For benchmarks (vqcowd's VQCOWD_TEST_WB): qcow2_wb_tune(). */
void img_wb_tune(uint32_t bridge, bool whole_slices, uint32_t xtab);

/* One-line description for logs (format, path, size, implementation details). */
void img_describe(struct img *img, char *buf, size_t len);

/*
 * Re-read the image's size after an outside resize (raw: the file or block
 * device size). 0 (img->size updated), -ENOTSUP if the format cannot, or
 * -errno.
 */
int img_refresh_size(struct img *img);

/* Metadata cache numbers; -ENOTSUP for formats without caches (raw). */
int img_cache_stats(struct img *img, struct img_cache_stats *st);

/* The backing image of @img, NULL if none (the chain, for control queries). */
struct img *img_backing(struct img *img);

/* A persistent dirty bitmap (QMP's BlockDirtyInfo). */
struct img_bitmap {
	char name[1024];
	uint64_t granularity; /* bytes */
	uint64_t count;       /* dirty bytes */
	bool recording;       /* enabled: it follows guest writes */
	bool inconsistent;    /* left in use by a crash: not usable */
	bool persistent;      /* stored in the image (qcow2), else in memory only */
};

/*
 * The image's dirty bitmaps in QEMU's order (newest first, of either kind;
 * the persistent ones found at open last): the non-persistent ones and the
 * persistent ones (qcow2 opened read-write; none otherwise). Fills up to
 * @max of @out, returns how many there are.
 */
int img_bitmaps(struct img *img, struct img_bitmap *out, unsigned max);

/*
 * Non-persistent dirty bitmaps (img/dirty.c has the rules): in memory on
 * @img, following every write, write-zeroes and discard submitted to it
 * while enabled, never written to the file, freed by img_close.
 * Changes (add, remove, enable, resize) only on the image's thread with
 * no other submitter running (vqcowd: QMP, its threads parked).
 */
struct img_dbm;
/* QEMU's default granularity for @img: its cluster size within 4..64 KiB, else 64 KiB. */
uint32_t img_dbm_default_granularity(const struct img *img);
/* Add @name (@granularity 0: the default; a power of 2, 512..2^31): 0, -EINVAL, -EEXIST, -ENOMEM.
 * @persistent: asked persistent on a read-only node, listed so, lost at close as QEMU loses it. */
int img_dbm_add(struct img *img, const char *name, uint32_t granularity, bool disabled,
		bool persistent);
/* 0 or -ENOENT. */
int img_dbm_remove(struct img *img, const char *name);
/* NULL if @img has no non-persistent bitmap @name. */
struct img_dbm *img_dbm_find(struct img *img, const char *name);
void img_dbm_set_enabled(struct img *img, struct img_dbm *b, bool enabled);
void img_dbm_clear(struct img_dbm *b);
/* Mark [@off, @off + @len) in every enabled bitmap of @img (any thread). */
void img_dbm_mark(struct img *img, uint64_t off, uint64_t len);
/* Set the granules of [@off, @off + @len) in @b, enabled or not (merge). */
void img_dbm_set(struct img_dbm *b, uint64_t off, uint64_t len);
/* Call @fn for each run of dirty granules, in bytes (the last may reach past the end); stops at
 * the first negative return, which it returns. */
int img_dbm_ranges(const struct img_dbm *b, int (*fn)(void *opaque, uint64_t off, uint64_t len),
		   void *opaque);
/* The node grew to @size: bitmaps cover it, the new part clean. 0 or -ENOMEM. */
int img_dbm_resize(struct img *img, uint64_t size);
/* Fill up to @max of @out (persistent only as img_dbm_add's); returns how many there are. */
int img_dbm_list(struct img *img, struct img_bitmap *out, unsigned max);
uint64_t img_dbm_granularity(const struct img_dbm *b);
bool img_dbm_enabled(const struct img_dbm *b);
void img_dbm_free_all(struct img *img);
/*
 * QEMU lists a node's bitmaps newest first, persistent or not, those loaded
 * from the image at open last (in the format's order). img_bm_born records
 * that bitmap @name (either kind) was added now, img_bm_gone that it went;
 * img_bm_order sorts a listing of @img's bitmaps so.
 */
struct img_bmage;
int img_bm_born(struct img *img, const char *name);
void img_bm_gone(struct img *img, const char *name);
void img_bm_order(const struct img *img, struct img_bitmap *a, unsigned n);
/* A bitmap on no image (block-dirty-bitmap-merge's scratch), for @size bytes; NULL: no memory. */
struct img_dbm *img_dbm_new(uint64_t size, uint32_t granularity);
void img_dbm_free(struct img_dbm *b);
/* The bits (bit i of byte j = granule 8j + i, the qcow2 on-disk order) and their bytes. */
const uint8_t *img_dbm_bytes(const struct img_dbm *b, uint64_t *nbytes);

/*
 * A persistent bitmap's dirty granules as byte ranges (img_dbm_ranges'
 * contract); a disabled one is read from the file synchronously, so call it
 * where blocking is allowed (vqcowd: ctl_held). -ENOENT, -EUCLEAN
 * (inconsistent), -ENOTSUP without persistent bitmaps.
 */
int img_bitmap_ranges(struct img *img, const char *name,
		      int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque);
/* Set [@off, +@len) in the enabled persistent bitmap @name (in memory); -EBUSY when disabled. */
int img_bitmap_set(struct img *img, const char *name, uint64_t off, uint64_t len);
/*
 * OR @bits (img_dbm_bytes' form at @name's granularity) into the persistent
 * bitmap @name in the file, the way img_bitmap_edit changes it (no request
 * in flight; engine closed, file changed crash-safely, engine reopened).
 */
int img_bitmap_merge(struct img *img, const char *name, const uint8_t *bits, uint64_t nbytes,
		     char *err, size_t errlen);

/* An online resize (img_grow): the caller's, alive until done() ran. */
struct img_grow {
	void (*done)(struct img_grow *g, int res); /* set by the caller */
	void *priv;                                /* the caller's */
	char err[512];                             /* why, when it failed */
};

/*
 * Grow the image online to @size bytes (a multiple of 512): a raw file is
 * extended, a raw block device must have been grown already, a qcow2 image
 * gets a larger L1 table and header size (qcow2_grow) while requests run.
 * Returns 0 (done now: img->size is @size), 1 (in progress: @g->done runs
 * later from the loop with 0, img->size then being @size, or -errno with a
 * message in @g->err), or -errno with a message in @g->err: shrinking
 * -EINVAL, read-only -EROFS, formats without it -ENOTSUP.
 */
int img_grow(struct img *img, uint64_t size, struct img_grow *g);

/*
 * True when img_grow would block on synchronous I/O first (a qcow2 image
 * with disabled persistent dirty bitmaps, which must be loaded and marked in
 * use before they can grow): call it from outside the loop then (vqcowd:
 * the held-requests path).
 */
bool img_grow_blocks(struct img *img);

/*
 * Create (@create: named @name) or delete (by @id and/or @name) an internal
 * snapshot; @out describes it. Consistent with respect to completed writes:
 * every request must have ended (-EBUSY otherwise; the caller holds new
 * ones back), then the engine writes all metadata back and closes, the
 * snapshot is written in the crash-safe order, and the engine is opened
 * afresh. Drives the loop: never call it from inside a loop callback.
 * -ENOTSUP for formats without snapshots, -EROFS read-only, -EEXIST /
 * -ENOENT / -EINVAL with QEMU's message in @err. 0 or -errno.
 */
int img_snapshot(struct img *img, bool create, const char *id, const char *name,
		 struct img_snapshot *out, char *err, size_t errlen);

/*
 * Add ('a': @granularity, 0 for QEMU's default; @disabled), remove ('r'),
 * clear ('c'), enable ('e') or disable ('d') the persistent dirty bitmap
 * @name, the way img_snapshot changes snapshots: every request must have
 * ended (-EBUSY otherwise), the engine stores its bitmaps and closes, the
 * file is changed in the crash-safe order (qcow2fmt/snapshot.c), and the
 * engine opens afresh (an enabled bitmap records writes from then on).
 * Drives the loop: never call it from inside a loop callback. -ENOTSUP for
 * formats without bitmaps, -EROFS read-only, QEMU's messages in @err.
 * 'S' stores the enabled ones now and keeps them listed, read-only, with
 * the engine open: the node is about to become a backing file
 * (blockdev-snapshot-sync; a writer again, they record again). 'E'/'D'
 * enable/disable a read-only node's bitmap in memory (QEMU allows that).
 */
int img_bitmap_edit(struct img *img, char op, const char *name, uint32_t granularity, bool disabled,
		    char *err, size_t errlen);

/*
 * The image's internal snapshots (table order), as read at the last open or
 * snapshot operation (no I/O). *@list stays valid until the next snapshot
 * operation or reopen. 0 (*@n may be 0), -ENOTSUP for formats without them.
 */
int img_snapshot_list(struct img *img, const struct img_snapshot **list, unsigned *n);

/*
 * Change the role of an open image between the active layer and a backing
 * file, in place (same file descriptions, cached metadata kept), for
 * external snapshots and block-commit.
 * @writable false: the image becomes a read-only backing file: it writes
 * nothing more and holds a backing file's locks (QEMU's read-only set:
 * consistent read, sharing everything but write and resize). No request
 * may be in flight (-EBUSY) and every write must have been flushed: a qcow2
 * image with metadata left to write back returns -EAGAIN (flush, call
 * again); -ENOTSUP while it holds persistent dirty bitmaps in memory.
 * @writable true: the image takes a writer's locks (the write permission;
 * -EAGAIN with QEMU's message if another process holds a conflicting lock)
 * and writes again; only an image opened read-write (-EROFS otherwise).
 * On failure nothing changed. Never drives the loop. 0 or -errno.
 */
int img_set_writable(struct img *img, bool writable, char *err, size_t errlen);

/*
 * img_set_writable(@img, true) for an image whose file was opened read-only
 * (a backing file of the chain at start-up; block-commit into it, as QEMU
 * reopens its base read-write): the file is opened again read-write in place
 * (io_file_reopen_rw: the writer's locks, -EAGAIN with QEMU's message if
 * another process holds a conflicting one) and a qcow2 engine is opened
 * afresh read-write (header, refcounts, bitmaps read again). No request may
 * be in flight on it (-EBUSY). An image with an external data file:
 * -ENOTSUP. Going back is img_set_writable(false): the locks of a backing
 * file, the descriptor stays read-write. Drives the loop: never call it from
 * a loop callback. On failure the image is as before. 0 or -errno.
 */
int img_reopen_rw(struct img *img, char *err, size_t errlen);

/*
 * Is a prefix of [@off, @off + @len) allocated in @img itself (data or
 * zeroes written here: 1), or read from its backing file (0; so are the
 * zeroes read past the backing file's end or without one, as QEMU's block
 * status says)? *@pnum gets
 * the prefix length. -EAGAIN: metadata must be read first; @w->wake(@w)
 * runs from the loop once it was (or failed), then call again (one parked
 * caller per image at a time). -errno on corrupt or unreadable metadata.
 * Formats without layers (raw) are allocated everywhere.
 */
int img_block_status(struct img *img, uint64_t off, uint64_t len, uint64_t *pnum,
		     struct img_wait *w);

/*
 * Detach and return @img's backing image (the caller owns it from now on;
 * NULL if none). @img must serve no more requests: only closing it is left
 * (the pivot of block-commit closes the overlay and keeps its base).
 */
struct img *img_take_backing(struct img *img);

/*
 * The end of an intermediate block-commit: @img (writable, no request in
 * flight) gets @backing, an image already open, as its backing image, and
 * its file records it as @name with format @fmt (the header rewritten as
 * rebase -u does, made durable before anything else changes). The old
 * backing image is no longer @img's: the caller closes it (after taking
 * the base back from it with img_take_backing). A qcow2 engine is closed and opened afresh around
 * it: drives the loop, never call it from a loop callback. -ENOTSUP for formats without a backing
 * file. On failure the file and @img are as before.
 */
int img_change_backing(struct img *img, struct img *backing, const char *name, const char *fmt,
		       char *err, size_t errlen);

/* ---- the copy loop of block-commit (img/copy.c) ---- */

#define IMG_COPY_GRAN (64u * 1024)   /* dirty tracking granularity */
#define IMG_COPY_MAX  (1024u * 1024) /* bytes per copy at most */

/*
 * Copies what the layers from @top down to (not including) @base hold into
 * @base, plus what the caller marks dirty, one run at a time: see
 * img/copy.c. The caller sets wake (and priv) after img_copy_init; wake is
 * called from the loop when a copy ended (@copy_ended; c_res 0 or -errno
 * with errmsg set; c_len its length) or a parked scan may go on: call
 * img_copy_scan/img_copy_next again then (better posted than from inside
 * wake: the engine may be in the middle of something).
 */
struct img_copy {
	struct img *top, *base;
	uint64_t size;
	void (*wake)(struct img_copy *k, bool copy_ended);
	void *priv;
	/* from here on the base reads as zeroes (a grown base): zeroes are not
	 * written there (default: nowhere; vqcow-img commit sets it, vqcowd's
	 * job does not: QEMU's job writes them and the base's bitmaps see it) */
	uint64_t zero_from;
	/* state, read-only for the caller */
	uint8_t *dirty;  /* atomic bits: img_copy_mark may run on any thread */
	uint64_t ndirty; /* atomic: img_copy_ndirty() */
	uint64_t nchunks, cursor;
	bool scanning; /* the allocation map is still being read */
	uint64_t scan_off;
	bool parked;           /* img_block_status parked the scan: wake comes */
	bool busy;             /* a copy in flight */
	uint64_t copied;       /* bytes copied so far */
	uint64_t c_off, c_len; /* the copy in flight, or the last one */
	int c_res;             /* the last copy's result */
	bool c_writing;
	char errmsg[300];
	void *buf;
	struct iovec iov;
	struct img_io io;
	struct img_wait w;
};

/* Allocate the dirty map (@size bytes) and the buffer. 0 or -ENOMEM. */
int img_copy_init(struct img_copy *k, struct img *top, struct img *base, uint64_t size);
/* Free them (no copy may be in flight, no scan parked). */
void img_copy_free(struct img_copy *k);
/* Mark [@off, @off + @len) to be copied (again): from any thread. */
void img_copy_mark(struct img_copy *k, uint64_t off, uint64_t len);
/* Chunks marked and not taken by a copy yet (ndirty, loaded atomically). */
uint64_t img_copy_ndirty(const struct img_copy *k);
/* Bytes still to copy: dirty, in flight, not scanned yet. */
uint64_t img_copy_remaining(const struct img_copy *k);
/* Read the allocation map on: 1 done, 0 not yet (k->parked: wake comes;
 * else call again from the loop), -errno (errmsg set). */
int img_copy_scan(struct img_copy *k);
/* Start copying the next dirty run of at most @max bytes; false if nothing
 * is dirty or a copy is in flight. */
bool img_copy_next(struct img_copy *k, uint64_t max);

/* Submitters: fill @io's request fields and call img->ops->submit(). */
void img_readv(struct img *img, struct img_io *io, struct iovec *iov, unsigned iovcnt, uint64_t off,
	       uint64_t len);
void img_writev(struct img *img, struct img_io *io, struct iovec *iov, unsigned iovcnt,
		uint64_t off, uint64_t len);
void img_flush(struct img *img, struct img_io *io);
void img_discard(struct img *img, struct img_io *io, uint64_t off, uint64_t len);
void img_write_zeroes(struct img *img, struct img_io *io, uint64_t off, uint64_t len,
		      unsigned flags);
/*
 * Empty [@off, @off + @len) of a qcow2 image as qemu-img commit does when it
 * cannot rebuild the image (QEMU's full discard): the clusters become
 * unallocated, so they read from the backing file again (in a version 2
 * image too), and no dirty bitmap records it. The last, partial cluster of
 * the image goes with a range reaching the end. Other formats: a discard.
 */
void img_discard_full(struct img *img, struct img_io *io, uint64_t off, uint64_t len);

/*
 * Implementations' constructors (used by img_open). Same contract as img_open.
 * Raw: O_DIRECT unless opts->direct is false (and opts non-NULL), regular
 * files and block devices; discard punches holes (-EOPNOTSUPP from the file
 * system is ignored: discard is a hint), write-zeroes uses ZERO_RANGE (or
 * PUNCH_HOLE with IMG_IO_UNMAP), falling back to writing zeroes. A raw image
 * whose format was probed (opts NULL or opts->format NULL) refuses, with
 * -EPERM, a write that would put the qcow2 magic at offset 0.
 * qcow2: img/img_qcow2.c.
 */
/* ---- for the implementations ---- */

enum img_file_role {
	IMG_FILE_RAW,     /* a raw image */
	IMG_FILE_QCOW2,   /* a qcow2 image file or its external data file */
	IMG_FILE_BACKING, /* any file of a backing image */
};

/*
 * Set the locks of @f (named @path in messages) for a file of @role when the
 * image holds @perm (see the table at the top). 0 or -errno with @err set
 * ("PATH: Failed to get ... lock: locked by another process").
 */
int img_file_lock(struct io_file *f, const char *path, enum img_file_role role, enum img_perm perm,
		  bool force_share, char *err, size_t errlen);

/*
 * Open @path for an image (io_file_open) with a message in @err on failure
 * that names the file ("not a regular file or block device" for FIFOs,
 * character devices, directories...). 0 or -errno.
 */
int img_file_open(struct io_file *f, const char *path, unsigned flags, char *err, size_t errlen);

/* io_file_reopen_rw() with the locks of a writer of @role; @err names @path. */
int img_file_reopen_rw(struct io_file *f, const char *path, enum img_file_role role, char *err,
		       size_t errlen);

int img_raw_open(struct img **imgp, struct io_loop *loop, const char *path,
		 const struct img_opts *opts, char *err, size_t errlen);
int img_qcow2_open(struct img **imgp, struct io_loop *loop, const char *path,
		   const struct img_opts *opts, char *err, size_t errlen);

#endif /* VQCOW_IMG_H */
