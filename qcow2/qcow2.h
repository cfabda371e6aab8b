/* SPDX-License-Identifier: MIT */
/*
 * qcow2/qcow2.h — the qcow2 mapping engine.
 *
 * The engine owns an image's metadata (header, L1 table, L2 tables, refcount
 * table and blocks) and does METADATA I/O only, through io/. It maps guest
 * ranges to extents; the caller (img/img_qcow2.c) does the data I/O.
 *
 * Threading: everything runs on the one io_loop given at open; the engine is
 * not thread-safe.
 *
 * Asynchrony and waiters: a mapping step that needs metadata that is not
 * cached (an L2 or refcount slice), or that touches a guest cluster another
 * request is allocating, returns -EAGAIN after parking the caller's struct
 * qcow2_waiter. Later (always from the loop, never from inside the call)
 * the engine sets w->err and calls w->wake(w): err == 0 means "run the step
 * again" (steps are idempotent: a re-run sees the new state), err < 0 means
 * the metadata needed could not be read (fail the request).
 *
 * Read path:  t = qcow2_io_begin(); qcow2_map_read() -> extents (a prefix of
 *             the range); do the data I/O; qcow2_io_end(t).
 * Write path: t = qcow2_io_begin(); qcow2_map_write() ->
 *             INPLACE: write the data at the host offset; no metadata changes.
 *             ALLOC:   a token is held: fill the COW head/tail (read the OLD
 *                      content with qcow2_map_read, which still sees the old
 *                      mapping), zero what must be zero, write the data, then
 *                      qcow2_alloc_finish(res) links it (or undoes it on error).
 *             qcow2_io_end(t) after the data I/O.
 * The begin/end ticket is what keeps a cluster that is freed (discard, COW of
 * a compressed cluster...) from being reused while data I/O that mapped it
 * is still in flight.
 *
 * Durability (one function, writeback.c, enforces it): data -> new refcount
 * blocks and refcount updates -> fdatasync -> refcount table entries (or the
 * header's refcount table pointer) -> fdatasync -> L2 slices -> fdatasync ->
 * L1 entries -> fdatasync. Refcount decrements are applied only after the
 * batch that removed the last pointer completed (and after in-flight data I/O
 * that may use the cluster ended). Invariant: nothing on disk ever points at
 * a cluster whose on-disk refcount is too low; a crash can only leak.
 * Metadata is written back in batches: on qcow2_flush(), when half the
 * caches are dirty, and every writeback_ms (5 s) while anything is dirty. A
 * write into an allocated cluster needs no metadata I/O at all.
 *
 * Allocation: at the end of the file (fresh space, preallocated with
 * fallocate in chunks of size/16 clamped to 4..64 MiB, reads as zeroes) or
 * from clusters freed earlier (punched, so they read as zeroes too when the
 * file system can punch). The refcount table grows when needed; new refcount
 * blocks describe themselves.
 *
 * Corruption: an invalid entry found while mapping is logged once (naming the
 * file), the corrupt bit is set in the header (read-write v3 images), every
 * later write fails with -EIO; reads of undamaged ranges go on.
 */
#ifndef VQCOW_QCOW2_H
#define VQCOW_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "format.h"
#include "image.h"
#include "io.h"

struct qcow2;
struct qcow2_flush;

struct qcow2_waiter {
	void (*wake)(struct qcow2_waiter *w); /* set by the caller */
	void *priv;                           /* the caller's */
	int err;                              /* set by the engine before wake() */
	struct qcow2_waiter *next;            /* private */
};

struct qcow2_opts {
	bool read_only;
	bool allow_corrupt_ro;        /* open an image with the corrupt bit (read-only only) */
	uint64_t l2_cache_size;       /* bytes; 0 = cover the whole image up to 256 MiB */
	uint64_t refcount_cache_size; /* bytes; 0 = a quarter of the L2 cache, 256 KiB..32 MiB */
	uint32_t cache_entry_size;    /* slice bytes (power of two, 512..cluster); 0 = 4 KiB */
	uint32_t writeback_ms;        /* periodic metadata write-back; 0 = 5000 ms */
	bool no_l2_prefetch;          /* do not read all L2 tables in the background after open */
	bool no_early_link;           /* extended L2: link subclusters after their data only */
	/*
	 * A block device whose write-zeroes the kernel offloads (io_file.wz_max
	 * > 0): zero the space ahead of the allocation cursor in large ranges,
	 * each made durable by an fdatasync of its own, and count what is
	 * handed out of a zeroed range as fresh space (its link needs no
	 * fdatasync of its data first: qcow2/alloc.c, "Zero-ahead"). Off: a
	 * device has no fresh space, every link of a new cluster syncs first.
	 */
	bool blkdev_zero_ahead;
	/*
	 * Optional: zero-ahead's file description, the caller's to keep across
	 * engine opens over the same file (a reopen after --user dropped the
	 * privileges may not open the device again). The engine opens it
	 * (io_file_reopen of its file) if not @open and leaves it open at close;
	 * the caller closes it. NULL: each engine opens and closes its own.
	 */
	struct qcow2_zah_keep *zah_keep;
};

/* See qcow2_opts.zah_keep. */
struct qcow2_zah_keep {
	struct io_file file;
	bool open;
};

/*
 * Open the engine on @file (an open image file; the engine does not own it).
 * Reads and validates the header, extensions, L1 table, refcount table and
 * snapshot table synchronously, with the format code's readers
 * (qcow2fmt/image.h) over @file through io/'s synchronous calls. A
 * read-write open of an image whose dirty bit is set (lazy refcounts)
 * first repairs it with the format's checker (qcow2fmt/check.c, as
 * `vqcow-img check -r all` does) over the same @file; a read-only open
 * serves it as it is. When the L2 cache can hold every L2 table the
 * L1 table references (and not opts->no_l2_prefetch), it then starts reading
 * them into the cache in the background (large reads on @loop; open does not
 * wait; qcow2_close waits for them). Refuses (with a message naming @path and the
 * problem in @err): invalid headers, encryption, unknown incompatible
 * features, the corrupt bit (unless allow_corrupt_ro and read-only), a dirty
 * image the repair could not make clean, zstd without
 * zstd support. A read-write open clears autoclear bits we do not maintain;
 * it keeps the bitmaps bit: persistent dirty bitmaps are loaded and
 * validated (refusing the open when they are invalid or use features we do
 * not know), the enabled ones are marked in use, follow every guest write
 * and are stored at qcow2_close() (bitmap.c).
 * Returns 0 or -errno.
 */
int qcow2_open(struct qcow2 **qp, struct io_loop *loop, struct io_file *file, const char *path,
	       const struct qcow2_opts *opts, char *err, size_t errlen);

/*
 * Store the enabled dirty bitmaps, write back dirty metadata (driving the loop with
 * io_loop_run_once(), so do not call it from inside a loop callback) and release the engine. All
 * I/O must have ended. Returns 0 or the first write-back error (the engine is released anyway).
 * NULL is fine.
 */
int qcow2_close(struct qcow2 *q);

/* The parsed header (geometry, backing file name, data file name...). */
const struct qcow2_header_info *qcow2_header(const struct qcow2 *q);

/* Virtual size in bytes (the header's size rounded up to 512). */
uint64_t qcow2_size(const struct qcow2 *q);

/*
 * Tell the engine about the external data file (required before I/O when the
 * image has one; the engine fdatasyncs it in write-back) and the backing
 * image's size (UINT64_MAX = no backing image; default). Ranges beyond the
 * backing size are known to read as zeroes (saves COW reads).
 */
void qcow2_set_data_file(struct qcow2 *q, struct io_file *data_file);
void qcow2_set_backing_size(struct qcow2 *q, uint64_t size);

/* True once corruption was detected (or the image was opened with the corrupt bit). */
bool qcow2_is_corrupt(const struct qcow2 *q);

/* One line: geometry, cache sizes and hit rates. */
void qcow2_describe(const struct qcow2 *q, char *buf, size_t len);

/* The metadata caches, as numbers (control queries). */
struct qcow2_cache_stats {
	uint64_t entry_size;      /* slice bytes */
	uint64_t l2_max, l2_used; /* slices: budget, held now */
	uint64_t l2_hits, l2_misses, l2_evictions;
	uint64_t rc_max, rc_used; /* refcount slices: budget, held now */
	uint64_t rc_hits, rc_misses, rc_evictions;
	uint64_t l2_prefetched; /* L2 slices read by the background prefetch */
	/* Activity since open. */
	uint64_t clusters_alloc;   /* clusters allocated (refcount 0 -> 1), data and metadata */
	uint64_t cow;              /* allocating writes that read old content for a head or tail */
	uint64_t l2_cow;           /* L2 tables shared with a snapshot, copied before a write */
	uint64_t l2_new, rb_new;   /* L2 tables and refcount blocks allocated */
	uint64_t meta_writes;      /* metadata writes of the write-back (one per writev) */
	uint64_t meta_write_bytes; /* and their bytes */
	uint64_t wb_batches;       /* write-back batches completed (side batches apart) */
	uint64_t wb_side_batches;  /* side batches started beside one in flight */
	uint64_t wb_syncs;         /* fdatasync steps of the write-back (both files: one) */
	/* qcow2_link() calls that had to wait, the fdatasync steps that ended
	 * while they waited (summed; the most one wait saw) */
	uint64_t link_waits, link_wait_syncs, link_wait_syncs_max;
	uint64_t link_wait_us; /* the time those waits took, summed */
	/* allocations linked at map time (qcow2_early_new), and those whose
	 * entries were written by the time their data write ended */
	uint64_t early_new, early_new_ahead;
	/* batches started beside a batch's last fdatasync (the tail); 1 if the
	 * image file or its data file took a write through the page cache
	 * since open (io_file_pc_written: no tail from then on), else 0 */
	uint64_t wb_tail_starts, pc_written;
};
void qcow2_cache_stats(const struct qcow2 *q, struct qcow2_cache_stats *st);

/*
 * Grow the virtual size to @size bytes (a multiple of 512) while requests
 * run (resize.c has the order of the writes). The new size and L1 table are
 * in effect, for every request mapped from then on, when @f->done runs
 * (from the loop) with 0: they are durable then. @f->done < 0: writing them
 * failed; the new size stays in effect in memory and later write-back
 * batches retry. Returns 0 (@size is the size already), 1 (@f->done comes
 * later), or -errno with a message naming the file in @err, without
 * changing anything: -EINVAL (not a multiple of 512), -ENOTSUP (shrinking,
 * a v2 image with snapshots), -EROFS, -EIO (corrupt), -EBUSY (a resize is
 * still being written; an inconsistent persistent dirty bitmap), -EFBIG (L1
 * table or a bitmap too large), -ENOSPC, -ENOMEM.
 * Persistent dirty bitmaps grow with the disk (new part clean): held in
 * memory and in use on disk until qcow2_close stores them for the new size.
 * A disabled one is loaded and marked in use first, with synchronous I/O:
 * when qcow2_grow_blocks() says so, call it where blocking is allowed.
 */
int qcow2_grow(struct qcow2 *q, uint64_t size, struct qcow2_flush *f, char *err, size_t errlen);

/* True when qcow2_grow would do synchronous I/O first (disabled persistent bitmaps to load). */
bool qcow2_grow_blocks(const struct qcow2 *q);

/* A persistent dirty bitmap, as QMP's BlockDirtyInfo shows it. */
struct qcow2_bitmap_info {
	char name[1024];
	uint64_t granularity; /* bytes */
	uint64_t count;       /* dirty bytes */
	bool recording;       /* enabled: it follows guest writes */
	bool inconsistent;    /* in use on disk when opened (left by a crash): not usable */
};

/*
 * The image's persistent dirty bitmaps (read-write opens; none read-only),
 * the last of the directory first as QEMU lists them: fills up to @max of
 * @out and returns how many there are.
 */
int qcow2_bitmaps(const struct qcow2 *q, struct qcow2_bitmap_info *out, unsigned max);

/* ---- data I/O tickets ---- */

/* Start of a data I/O that will map host clusters; returns a ticket for qcow2_io_end(). */
unsigned qcow2_io_begin(struct qcow2 *q);
void qcow2_io_end(struct qcow2 *q, unsigned ticket);

/*
 * Data I/O the engine does not see: other threads reading and writing
 * clusters they mapped without it (img/img_qcow2.c's fast path, with its own
 * tickets). A grace period waits for that too: when one starts, the engine
 * calls @flip(@priv) on its loop, which moves the caller's tickets to a new
 * generation and returns true if none of the previous one is in flight;
 * otherwise the caller calls qcow2_ext_io_idle() on the engine's loop once
 * the last of them ended. NULL @x: none.
 */
struct qcow2_ext_io {
	bool (*flip)(void *priv);
	void *priv;
};
void qcow2_set_ext_io(struct qcow2 *q, const struct qcow2_ext_io *x);
void qcow2_ext_io_idle(struct qcow2 *q);

/* ---- mapping ---- */

enum qcow2_map_type {
	QCOW2_MAP_DATA = 1,   /* host: offset in the data file (image or external) */
	QCOW2_MAP_ZERO,       /* reads as zeroes */
	QCOW2_MAP_UNALLOC,    /* read from the backing image (zeroes if none / beyond it) */
	QCOW2_MAP_COMPRESSED, /* host/clen: compressed bytes; coff: offset in the cluster */
};

struct qcow2_extent {
	uint8_t type;  /* enum qcow2_map_type */
	uint64_t off;  /* guest offset */
	uint64_t len;  /* bytes */
	uint64_t host; /* DATA: host offset of @off; COMPRESSED: offset of the compressed data */
	uint32_t clen; /* COMPRESSED: bytes of compressed data to read (clamped to the file) */
	uint32_t coff; /* COMPRESSED: offset of @off inside the decompressed cluster */
	uint8_t flags; /* QCOW2_EXT_* */
};

/* A DATA extent of whole clusters (no extended L2) whose L2 entries allow a
 * write in place (COPIED, or an external data file). qcow2_map_write() also
 * refuses a cluster that overlaps metadata (a corrupt entry): check
 * qcow2_is_metadata() before writing there. */
#define QCOW2_EXT_INPLACE 1u
/* A ZERO extent not allocated in this image: it reads zeroes because the
 * image has no backing file or the range lies beyond the backing file's
 * end (block status: not allocated here, as QEMU says). */
#define QCOW2_EXT_UNALLOC 2u

/* Does [@host, @host + @len) of the image file overlap the engine's metadata? */
bool qcow2_is_metadata(const struct qcow2 *q, uint64_t host, uint64_t len);

/*
 * Map [@off, @off + @len) (inside the virtual size) for reading. Fills up to
 * @max extents covering a prefix of the range (adjacent DATA extents that
 * are host-contiguous are merged, as are ZERO and UNALLOC runs). No data I/O.
 * Returns the number of extents (>= 1), -EAGAIN (parked on @w), -EIO (the
 * metadata of this range is corrupt or unreadable) or -EINVAL (bad range).
 */
int qcow2_map_read(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_extent *ext,
		   unsigned max, struct qcow2_waiter *w);

/*
 * The same for what is known without waiting: only the L2 slice of @off, and
 * only if it is cached and has no bad entry (nothing is flagged corrupt, no
 * I/O). Returns the number of extents (0: nothing known).
 */
int qcow2_map_read_cached(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_extent *ext,
			  unsigned max);

enum qcow2_wmap {
	QCOW2_WRITE_INPLACE = 1, /* write the data at a->host; nothing else to do */
	QCOW2_WRITE_ALLOC,       /* token held: COW, write, qcow2_alloc_finish() */
};

/*
 * A write mapping / allocation token. The caller embeds it (e.g. in its
 * request context) and must keep it alive until qcow2_alloc_finish().
 */
struct qcow2_alloc {
	/* Filled by qcow2_map_write(). */
	uint64_t off, len;  /* guest range of the data covered (a prefix of the request) */
	uint64_t host;      /* host offset (data file) for guest @off */
	uint64_t cow_start; /* guest start of the range to write: head = [cow_start, off) */
	uint64_t cow_end;   /* guest end: tail = [off + len, cow_end) */
	bool head_zero;     /* the head's old content is zeroes: no need to read it */
	bool tail_zero;     /* same for the tail */
	bool fresh;         /* the host range of [cow_start, cow_end) already reads as zeroes */
	/*
	 * Set by qcow2_map_write() (and qcow2_alloc_finish()): the request must
	 * not complete before qcow2_link(link_gen) says the L2 entries reaching
	 * this range are written (0: nothing to wait for). An in-place write can
	 * need it too: its entry may have been changed by a request whose batch
	 * has not written it yet.
	 */
	uint64_t link_gen;
	/* The host offset of the L2 slice holding the one entry link_gen is
	 * about (set with it), for qcow2_link_slice(). */
	uint64_t link_slice;
	/* Set by the caller before qcow2_alloc_finish(): the whole new cluster
	 * was written, zeroes outside [cow_start, cow_end) (extended L2). */
	bool rest_zero;

	/* Private to the engine. */
	struct qcow2_alloc *next;
	struct qcow2_waiter *waiters; /* writers waiting for this range */
	void *l2_slice;
	void *rc_slice;
	uint64_t first_cluster; /* guest cluster index */
	uint32_t nclusters;
	uint32_t sc_mask_first, sc_mask_last; /* extended L2: subclusters written */
	uint8_t kind;
	bool new_host;  /* clusters were reserved (refcounts raised) */
	bool early;     /* extended L2: its bits were set at map time (mapping.c) */
	bool early_new; /* new clusters of fresh space linked at map time (mapping.c) */
};

/*
 * Map [@off, @off + @len) for writing. Returns QCOW2_WRITE_INPLACE (a->off,
 * a->len, a->host set; nothing held), QCOW2_WRITE_ALLOC (token held, all of
 * @a's public fields set), -EAGAIN (parked on @w), -EIO (corrupt image or
 * corrupt metadata for this range), -EROFS (read-only), -ENOSPC (the image
 * cannot grow), -EINVAL (bad range).
 */
int qcow2_map_write(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_alloc *a,
		    struct qcow2_waiter *w);

/*
 * End an allocation: @res == 0 links the new L2 entries (in memory; written
 * back later), res < 0 releases the reserved clusters. Wakes writers waiting
 * on the range. Never fails, never blocks.
 */
void qcow2_alloc_finish(struct qcow2 *q, struct qcow2_alloc *a, int res);

/* ---- discard and write-zeroes (metadata operations) ---- */

enum qcow2_zaction {
	QCOW2_Z_DONE = 1, /* handled in metadata */
	QCOW2_Z_SKIP,  /* nothing to do (already reads as wanted, or a partial-cluster discard) */
	QCOW2_Z_WRITE, /* the caller must write zeroes there through the write path */
};

/*
 * Discard (@zero false) or write zeroes (@zero true; @unmap allows freeing)
 * a prefix of [@off, @off + @len). *@done_len receives the prefix length and
 * the return value says what happened to it (enum qcow2_zaction), or
 * -EAGAIN (parked), -EIO, -EROFS. Freed clusters are released only after the
 * change is durable and no in-flight I/O uses them.
 * With an external data file, QCOW2_Z_DONE for a discard means the caller
 * may punch the range in the data file.
 */
int qcow2_zero_step(struct qcow2 *q, uint64_t off, uint64_t len, bool zero, bool unmap,
		    uint64_t *done_len, struct qcow2_waiter *w);

/*
 * Full discard of a prefix of [@off, @off + @len) (QEMU's full_discard, as
 * qemu-img commit empties a top image it cannot rebuild): every cluster
 * becomes unallocated, whatever the image version, so reads fall through to
 * the backing file again; refcounts are dropped (a cluster an internal
 * snapshot shares keeps its copy; a shared L2 table is copied first). The
 * image's last, partial cluster goes too. Returns as qcow2_zero_step (never
 * QCOW2_Z_WRITE); with an external data file, QCOW2_Z_DONE means the caller
 * may punch the range there. Not recorded in dirty bitmaps: the caller does
 * not call qcow2_bitmap_mark for it.
 */
int qcow2_discard_full_step(struct qcow2 *q, uint64_t off, uint64_t len, uint64_t *done_len,
			    struct qcow2_waiter *w);

/*
 * Record a guest write, write-zeroes or discard of [@off, @off + @len) in
 * every enabled persistent dirty bitmap (every granule the range touches).
 * Call it once per such request, before its I/O starts. Cheap; never fails
 * (out of memory leaves the bitmap in use on disk, i.e. inconsistent).
 */
void qcow2_bitmap_mark(struct qcow2 *q, uint64_t off, uint64_t len);

/*
 * True while the engine records writes in a dirty bitmap (an enabled
 * persistent one: qcow2_bitmap_mark must see every write, on the engine's
 * thread). Cheap (a load), for a caller deciding whether a write may bypass
 * the engine's request path. Non-persistent bitmaps are not the engine's:
 * img/ marks them (img_dbm_mark) in img_writev and friends before the
 * format sees the request, on any thread, so they never need the engine.
 */
bool qcow2_has_enabled_bitmaps(const struct qcow2 *q);
/* Store the tracked bitmaps now and keep them listed, read-only (a node
 * becoming a backing file); synchronous, outside the loop's callbacks. */
int qcow2_bitmap_freeze(struct qcow2 *q);
/* A read-only node's bitmap enabled or disabled in memory (QEMU allows it:
 * nothing is recorded or stored); -EBUSY on a writer. */
int qcow2_bitmap_ro_enable(struct qcow2 *q, const char *name, bool enable);

/*
 * Decompress one compressed cluster: @src/@srclen the compressed bytes as
 * read (trailing garbage allowed), @dst/@dstlen the cluster (cluster size).
 * Synchronous CPU work. 0, -EIO (corrupt data) or -ENOMEM.
 */
int qcow2_decompress(struct qcow2 *q, const void *src, size_t srclen, void *dst, size_t dstlen);

/*
 * The same on any thread, without the engine: @type is the image's
 * compression type (qcow2_header(q)->compression_type, read on the engine's
 * thread). Each thread gets its own decompressor, freed when it ends. For
 * callers that inflate on the thread that asked for the data (vqcowd's I/O
 * threads); the engine's state is not touched.
 */
int qcow2_decompress_type(int type, const void *src, size_t srclen, void *dst, size_t dstlen);

/* ---- flush ---- */

struct qcow2_flush {
	void (*done)(struct qcow2_flush *f, int res); /* set by the caller */
	void *priv;
	struct qcow2_flush *next; /* private */
	uint64_t gen, slice;      /* private (qcow2_link) */
	uint64_t mark;            /* private */
	uint64_t t0;              /* private (qcow2_link: when the wait began) */
};

/*
 * Make every write that completed before this call durable, with the
 * metadata that reaches it. @f->done runs later from the loop (never inside
 * this call) with 0 or -errno.
 */
void qcow2_flush(struct qcow2 *q, struct qcow2_flush *f);

/*
 * Process death (vqcowd killed, the guest keeps running and reconnects):
 * every write the guest saw complete must read back afterwards, so the
 * metadata that reaches it must have been WRITTEN (a completed pwrite; the
 * page cache keeps it through a process death) before the guest's
 * completion; no fdatasync is needed for that.
 *
 * qcow2_meta_gen() is a counter bumped whenever a request changes L2/L1
 * entries (qcow2_alloc_finish() with res >= 0, qcow2_zero_step() returning
 * QCOW2_Z_DONE); read it after the request's last such step.
 * qcow2_link(@gen) returns 0 if every change up to @gen is written already,
 * else 1: @f is queued and @f->done runs (from the loop) once a write-back
 * batch wrote them, or with -errno. That batch keeps the power-loss order
 * (refcounts written and fdatasync'ed before any L2 entry pointing at their
 * clusters is written, L2 tables synced before the L1 entries linking them)
 * but skips the syncs a process death does not need: the final ones. What
 * it wrote becomes durable at the next qcow2_flush().
 */
uint64_t qcow2_meta_gen(const struct qcow2 *q);
int qcow2_link(struct qcow2 *q, uint64_t gen, struct qcow2_flush *f);
/*
 * The same, for a request whose changes up to @gen it depends on are all
 * in the L2 slice at host offset @slice (its qcow2_alloc.link_slice; 0:
 * unknown, as qcow2_link): it may then complete with a side batch that
 * wrote that slice (writeback.c) even when other changes are not written.
 */
int qcow2_link_slice(struct qcow2 *q, uint64_t gen, uint64_t slice, struct qcow2_flush *f);

/*
 * Test seam (img_test_link_delay): the batch an early link (extended L2,
 * mapping.c) starts begins @ms milliseconds late, so a request that
 * completed without waiting for its entry shows as a lost write after a
 * kill -9. 0 (the default): at once.
 */
void qcow2_test_link_delay(unsigned ms);

/*
 * Test seam (img_test_sc_link): extended-L2 clusters written whole by their
 * first write are linked subcluster by subcluster, as with a backing file,
 * so that later writes into them take the early link (mapping.c) as
 * clusters of fresh space do with --no-cluster-fill. false (the default):
 * linked whole.
 */
void qcow2_test_sc_link(bool on);

/*
 * The early link of new clusters of fresh space (img_early_new, vqcowd's
 * VQCOWD_TEST_EARLY_NEW; off by default, for a quiet benchmark to decide):
 * qcow2_map_write() links such a cluster in the cache when it maps it, so
 * its L2 entry is written by a link batch beside its data write instead of
 * after it (the request still completes only when both are written). The
 * argument: the comment above early_new_link() in mapping.c.
 */
void qcow2_early_new(bool on);

/*
 * The caller writes every new host cluster whole (img/img_qcow2.c's fill:
 * zeroes around the data in the same write), as far as it can tell at open:
 * an early link of a new cluster then sets all its subclusters' allocation
 * bits at once (extended L2), as qcow2_alloc_finish() would after the write.
 */
void qcow2_set_fills_whole(struct qcow2 *q, bool on);

/*
 * Test seam (img_test_wb_hold): a write-back batch that is not a side batch
 * (writeback.c) holds its L2 writes back @ms milliseconds, so side batches
 * run beside it. 0 (the default): no hold.
 */
void qcow2_test_wb_hold(unsigned ms);

/*
 * Test seam (img_test_sync_delay): every fdatasync of the write-back starts
 * @ms milliseconds late, as on a slow disk, so the number of syncs a write
 * waits for one after another shows in its latency. 0 (the default): none.
 */
void qcow2_test_sync_delay(unsigned ms);

/*
 * Test seam (unit.test_qcow2_engine only): the @nth allocation of an item
 * while a write-back batch (or side batch) is built from now on fails, as if
 * out of memory (1 = the next); once. 0 (the default): none.
 */
void qcow2_test_wb_nomem(unsigned nth);

/*
 * Test seam (unit.test_qcow2_engine only): the @nth new cache slice (a new
 * L2 table's or refcount block's, q2_cache_new) from now on fails, as if out
 * of memory (1 = the next); once. 0 (the default): none.
 */
void qcow2_test_cache_nomem(unsigned nth);

/*
 * For benchmarks (img_wb_tune, vqcowd's VQCOWD_TEST_WB=BRIDGE[,whole][,xtab[=GAP]]),
 * before any image opens: the largest gap between two dirty spans of one table a
 * batch bridges (QCOW2_WB_BRIDGE_DEFAULT), whether it writes
 * whole slices instead of their dirty spans, and the largest gap it bridges
 * between spans of two tables next to each other in the file (0, the
 * default: none; ",xtab" alone: BRIDGE).
 */
void qcow2_wb_tune(uint32_t bridge, bool whole_slices, uint32_t xtab);
#define QCOW2_WB_BRIDGE_DEFAULT (64u << 10)

/* ---- internal snapshots ---- */

/*
 * Create (@op 'c', @sn->name; @sn->id set on return) or delete (@op 'd', by
 * @id and/or @name; @sn receives what it was) an internal snapshot of the
 * image in @file, synchronously through io/'s sync calls. No engine may be
 * open on @file: the caller closes it (qcow2_close writes everything back),
 * calls this, and opens it again, so that the engine's tables, caches and
 * bitmaps are read afresh. Names must be unique and non-empty (QMP's rule).
 * The on-disk order makes a crash at any point leak at most
 * (qcow2fmt/snapshot.c). 0 or -errno with @err set.
 */
struct qcow2_freed;
int qcow2_snapshot_file(struct io_file *file, const char *path, char op, struct qcow2_snap_desc *sn,
			const char *id, const char *name, struct qcow2_freed **freed, char *err,
			size_t errlen);

/*
 * What a delete freed, and what the closed engine left unpunched
 * (qcow2_take_unpunched; *@freed of qcow2_snapshot_file, in and out, NULL
 * when nothing: clusters whose refcount is 0, durably) handed to the engine opened again
 * on the file: it punches them (a hole, when the file system can), in the
 * background on its loop, and then allocates data from them as from the
 * clusters it frees itself. The guest's requests are not held for it.
 * Takes @freed (frees it); @q may be NULL (the reopen failed: the clusters
 * stay allocated in the file, refcount 0, which no checker counts).
 */
void qcow2_adopt_freed(struct qcow2 *q, struct qcow2_freed *freed);

/*
 * qcow2_close() for a snapshot edit: without waiting for the punches still
 * queued (2048 scattered ones held the next command ~0.9 s), and handing
 * out in *@freed (NULL: none) the free clusters the engine knew of, punched
 * or not, durable with refcount 0 once it returns. Pass them to
 * qcow2_snapshot_file(), which keeps those below the end of what is in use
 * (still free: the edit allocates past it) and adds what a delete frees,
 * for the next engine (qcow2_adopt_freed).
 */
int qcow2_close_free(struct qcow2 *q, struct qcow2_freed **freed);

/*
 * Edit the persistent dirty bitmaps of the image in @file (qcow2fmt/image.h,
 * qcow2_bitmap_edit_io: @op 'a', 'r', 'c', 'e', 'd'), under the same rules as
 * qcow2_snapshot_file: no engine open on @file meanwhile. 0 or -errno.
 */
int qcow2_bitmap_file(struct io_file *file, const char *path, char op, const char *name,
		      uint32_t granularity, bool disabled, char *err, size_t errlen);

/*
 * Merge @bits (@nbytes bytes, one bit per granule of the bitmap's
 * granularity, on-disk bit order) into the persistent bitmap @name of the
 * image in @file (qcow2fmt/image.h, qcow2_bitmap_merge_io), under the same
 * rules as qcow2_bitmap_file: no engine open on @file meanwhile. 0 or -errno.
 */
int qcow2_bitmap_merge_file(struct io_file *file, const char *path, const char *name,
			    const uint8_t *bits, uint64_t nbytes, char *err, size_t errlen);

/*
 * The dirty granules of the persistent bitmap @name, as byte ranges in
 * order (the last may reach past the end), passed to @fn until it returns
 * < 0 (returned). An enabled bitmap's bits come from memory; a disabled
 * one's are read from the file, synchronously (call it where blocking I/O
 * is allowed: vqcowd's held-requests path). -ENOENT, -EUCLEAN (in use on
 * disk: inconsistent), -EIO, -ENOMEM.
 */
int qcow2_bitmap_ranges(struct qcow2 *q, const char *name,
			int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque);

/*
 * Set the granules of [@off, @off + @len) in the enabled persistent bitmap
 * @name (merge into it; stored with its other bits at close). -ENOENT, or
 * -EBUSY when @name is not one the engine holds in memory (disabled: use
 * qcow2_bitmap_merge_file with the engine closed).
 */
int qcow2_bitmap_set(struct qcow2 *q, const char *name, uint64_t off, uint64_t len);

/*
 * The snapshot table as on disk now (read synchronously through io/: open
 * time only, like qcow2_open). *@out (malloc'd) gets *@n entries. 0 or -errno.
 */
int qcow2_snapshot_list(struct qcow2 *q, struct qcow2_snap_desc **out, uint32_t *n);

/*
 * Stop or resume writing (the external snapshot's old active layer becomes
 * a read-only backing file; block-commit writes into it again). Going
 * read-only needs a quiet engine: no request in flight (the caller's
 * duty), nothing left to write back. It gives back the clusters reserved
 * ahead and returns -EAGAIN while anything is left: the caller flushes
 * (qcow2_flush) and calls again. Then the space of what is free goes back
 * to the file system (the file cut after its last cluster in use, free
 * clusters below punched; -EAGAIN while the punches run). -ENOTSUP while
 * persistent dirty bitmaps are held in memory (enabled ones, or any after
 * qcow2_grow: they would have to be stored, and only qcow2_close does
 * that). Going read-write again: only an engine opened read-write (-EROFS
 * otherwise); its allocation state is the one it left (after the cut).
 * The locks are the caller's (img/).
 * 0 or -errno.
 */
int qcow2_set_read_only(struct qcow2 *q, bool read_only);

#endif /* VQCOW_QCOW2_H */
