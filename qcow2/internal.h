/* SPDX-License-Identifier: MIT */
/*
 * qcow2/internal.h — engine internals shared by the engine's .c files.
 *
 * Files, from the top down (a file calls only files below it, except
 * alloc.c and writeback.c, which call each other: write-back drives the
 * deferred refcount decrements, allocation asks for write-back):
 *   qcow2.c      open/close: builds the engine, gives the caches their hooks
 *   prefetch.c   background L2 prefetch after open
 *   bitmap.c     persistent dirty bitmaps (load, mark in use, record writes, store)
 *   mapping.c    map_read, map_write, alloc_finish, zero_step, L2 validation
 *   alloc.c      cluster allocation, refcount updates, deferred decrements
 *   writeback.c  batched metadata write-back in durability order, flush
 *   resize.c     online growth: new L1 table, size switch (qcow2_grow)
 *   compress.c   decompression of compressed clusters
 *   cache.c      L2 and refcount slice caches (load, evict, dirty lists);
 *                a plain cache: what it needs from the engine comes as hooks
 *   core.c       metadata set (overlap checks), corruption state, L1 entry
 *                check, deferred wake-ups, qcow2_io over the engine's file
 *
 * Slice cache invariants:
 *  - A slice is in the hash while LOADING or READY; its buffer holds the
 *    on-disk (big-endian) bytes.
 *  - A dirty slice, a slice with a write-back in flight (wb), a pinned slice
 *    and a LOADING slice are never evicted. The cache may grow past its soft
 *    limit when nothing is evictable; write-back then brings it back.
 *  - New metadata clusters (L2 tables, refcount blocks) get every slice
 *    instantiated in the cache, zero-filled and dirty, so nothing depends on
 *    what the disk held there before.
 */
#ifndef VQCOW_QCOW2_INTERNAL_H
#define VQCOW_QCOW2_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "image.h"
#include "qcow2.h"
#include "vlog.h"

enum q2_slice_state {
	Q2_SL_LOADING = 1,
	Q2_SL_READY,
};

enum q2_cache_type {
	Q2_CACHE_L2 = 0,
	Q2_CACHE_RC = 1,
};

/*
 * A cache entry. The fields a lookup hit and its caller touch (off, buf,
 * state, refbit, suspect, pins) share the first cache line; descriptors live
 * in arrays inside the cache's slab chunks (cache.c), 64-byte aligned, next to
 * their buffers. Never allocated elsewhere.
 */
struct q2_slice {
	uint64_t off; /* host offset of the slice */
	void *buf;    /* slice_size bytes, on-disk format */
	struct q2_cache *cache;
	struct q2_slice *dnext; /* dirty list */
	struct qcow2_waiter *waiters;
	struct q2_slice *next; /* free list (cache->free) or chunk spare list */
	uint32_t pins;
	uint32_t idx;   /* position in cache->all */
	uint32_t chunk; /* index in cache->chunks */
	uint8_t state;
	uint8_t dmask; /* dirty eighths of buf (q2_slice_dirty_range; all: q2_slice_dirty) */
	bool dirty : 1;
	bool in_dlist : 1;
	bool wb : 1;      /* copied into a write-back batch whose write is in flight */
	bool wb_side : 1; /* ... that batch being the side batch (writeback.c) */
	bool fill : 1;    /* copied as a gap filler into a batch whose write is in flight */
	bool refbit : 1;  /* clock */
	bool suspect : 1; /* L2: an entry failed load-time validation */
	bool newtab : 1;  /* L2: a new table no batch wrote yet (writeback.c: P1) */
} __attribute__((aligned(64)));

struct q2_chunk;
struct q2_load;
struct io_loop;
struct io_file;

/*
 * What a cache needs from its owner, copied at q2_cache_init(). The cache
 * calls no other part of the engine.
 */
struct q2_cache_hooks {
	struct io_loop *loop; /* slices load through this loop ... */
	struct io_file *file; /* ... from this file */
	const char *name;     /* for log lines (the image path); must outlive the cache */
	/* A slice became READY from on-disk bytes (load or insert): check it (may set
	 * s->suspect). NULL: no check. */
	void (*loaded)(void *opaque, struct q2_slice *s);
	/* Wake every waiter parked on *list with @err, deferred (never from inside
	 * the call); empties *list. Required. */
	void (*wake)(void *opaque, struct qcow2_waiter **list, int err);
	/* Every entry is busy: the cache grows past its soft limit; write back soon.
	 * NULL: nothing to do. */
	void (*pressure)(void *opaque);
	void *opaque;
};

/* A hash slot: the key next to the entry, so a probe reads no descriptor. */
struct q2_hslot {
	uint64_t off;
	struct q2_slice *s; /* NULL: empty */
};

/*
 * Entries and buffers come from slab chunks (cache.c): on demand, small first
 * and growing geometrically up to 2 MiB mappings (huge-page advised). An entry
 * is "counted" (in count and all[]) while in the hash or on the free list;
 * trimmed entries go back to their chunk's spare list and a chunk whose
 * entries are all spare is unmapped.
 */
struct q2_cache {
	struct q2_cache_hooks hooks;
	uint8_t type; /* Q2_CACHE_L2 or Q2_CACHE_RC (log lines) */
	uint32_t slice_size;
	uint32_t slice_bits; /* log2(slice_size) */
	size_t soft_max;     /* entries */
	size_t count;        /* entries counted (in the hash or on the free list) */
	size_t cap;
	struct q2_slice **all;
	size_t hand;
	struct q2_slice *free; /* unused counted entries (buffers kept), linked by next */
	struct q2_hslot *hash; /* open addressing, linear probing, load <= 1/2 */
	size_t hmask;
	size_t hused;  /* slots in use */
	size_t hbytes; /* bytes mapped for hash */
	unsigned hbits;
	struct q2_chunk **chunks; /* NULL slots: unmapped chunks */
	size_t nchunks, chunks_cap;
	size_t nspare;          /* spare entries over all chunks */
	size_t chunk_next;      /* entries of the next chunk (grows geometrically) */
	size_t chunk_hint;      /* a chunk that may have spare entries */
	size_t mem_bytes;       /* bytes mapped for chunks (buffers + descriptors) */
	struct q2_load *loads;  /* idle load commands */
	struct q2_slice *dirty; /* dirty list (in_dlist) */
	size_t ndirty;
	uint64_t hits, misses, evictions;
	/*
	 * Bumped whenever a slice leaves the hash (eviction, release, forget,
	 * trim) and on q2_cache_new(): a read of on-disk slices issued at an
	 * older generation may be stale (see prefetch.c).
	 */
	uint64_t gen;
};

/* A growable list of host offsets (refcount decrements, free clusters). */
struct q2_u64v {
	uint64_t *v;
	size_t n, cap;
};

struct q2_batch;

struct q2_zk {
	uint64_t c;    /* host cluster index + 1 (0: empty) */
	uint32_t mask; /* subclusters known to hold zeroes */
};
struct q2_pf;
struct q2_bitmaps;

struct qcow2 {
	struct io_loop *loop;
	struct io_file *file;      /* the image file: metadata (and data unless external) */
	struct io_file *data_file; /* where data lives (== file unless external) */
	char *path;
	struct qcow2_header_info h;
	bool read_only;
	bool rw_open; /* opened read-write: qcow2_set_read_only(false) may return to it */
	bool extl2;
	bool ext_data; /* external data file */
	bool data_raw; /* autoclear raw external data bit kept */
	uint32_t cb;   /* cluster_bits */
	uint64_t cs;   /* cluster size */
	uint32_t l2_bits;
	uint32_t l2e_size; /* 8 or 16 */
	uint32_t sc_bits;  /* subcluster bits (== cb without extended L2) */
	uint32_t slice_size;
	uint32_t sl2_bits; /* log2(L2 entries per slice) */
	uint32_t rc_order;
	uint32_t rb_bits;      /* log2(refcounts per refcount block) */
	uint32_t src_bits;     /* log2(refcounts per slice) */
	uint64_t size;         /* virtual size rounded up to 512 */
	uint64_t backing_size; /* UINT64_MAX = no backing */

	uint64_t *l1; /* host order */
	uint32_t l1_size;
	uint8_t *l1_dirty; /* one bit per 512-byte sector of the L1 table */
	uint64_t l1_ndirty;
	uint64_t *rt; /* refcount table, host order */
	uint64_t rt_entries;
	uint64_t rt_offset;
	uint32_t rt_clusters;
	uint8_t *rt_dirty; /* one bit per 512-byte sector */
	uint64_t rt_ndirty;
	bool rt_relocated; /* whole table + header pointer must be written */
	uint8_t *l1_bad;   /* bitmap: L1 entries whose L2 table sits on other metadata */
	uint8_t *
	    rt_bad; /* bitmap: refcount blocks sitting on other metadata (or grown: see rt_bad_n) */
	uint64_t rt_bad_n; /* entries covered by rt_bad */

	struct q2_cache l2c, rcc;
	bool l2c_auto, rcc_auto; /* sized by default (q2_cache_defaults): they follow a grow */

	/* Metadata clusters (sorted cluster indices) for overlap checks. */
	struct q2_u64v meta;

	/* Allocation */
	uint64_t fresh_start; /* cluster index; never-handed-out clusters at or after it are zero */
	uint64_t cursor;      /* next candidate cluster at the end */
	uint64_t host_limit;  /* clusters available (block devices), else max */
	struct q2_u64v freelist; /* freed cluster indices (bit 63: known zero) */
	/*
	 * Clusters reserved ahead for data (alloc.c): refcount already 1 in the
	 * cache, raised by write-back batch number resv_seq; handed out from
	 * resv_next up to resv_end. Once that batch synced its refcounts
	 * (rc_durable >= resv_seq), linking one needs no refcount sync.
	 */
	uint64_t resv_next, resv_end, resv_seq;
	bool resv_fresh; /* the reserve was fresh (zero-ahead) when taken */
	/*
	 * Zero-ahead on a block device (alloc.c, qcow2_opts.blkdev_zero_ahead):
	 * clusters [zah_lo, zah_ok) were zeroed and the zeroing synced while at
	 * or after the cursor (never handed out since), so they are fresh when
	 * the cursor hands them out; [zah_blo, zah_bhi) is being zeroed or
	 * synced (zah_busy): the cursor may not enter it meanwhile.
	 */
	bool zah_want, zah_on, zah_busy;
	bool zah_stop;            /* the range in flight ends at its next step, nothing fresh */
	uint64_t zah_t0;          /* when the step or sync in flight was submitted (ns) */
	uint64_t zah_min_rate;    /* bytes/s: zeroing slower turns zero-ahead off (0: never) */
	uint64_t zah_slack_ns;    /* ... beyond this much time (per judgement) */
	uint64_t zah_judge_bytes; /* bytes zeroed before the rate is judged */
	uint64_t zah_win_ns, zah_win_bytes; /* zeroing (steps and syncs) since the last */
	uint64_t zah_step_bytes;            /* bytes zeroed by one fallocate */
	uint64_t zah_lo, zah_ok, zah_blo, zah_bhi;
	uint64_t zah_bpos, zah_bstep; /* zeroed up to; the step in flight ends at */
	uint64_t zah_ranges;          /* ranges zeroed (tests) */
	struct io_cmd zah_cmd;
	/* zah_cmd's file: a description of its own (io_file_reopen), so that its
	 * fdatasync takes no writeback error the write-back's must see; the
	 * caller's (qcow2_opts.zah_keep, kept across engine opens) or zah_file */
	struct io_file *zah_fp;
	struct qcow2_zah_keep *zah_keep;
	struct io_file zah_file;
	bool zah_file_open;
	uint64_t rc_seq;       /* number of the last write-back batch built */
	uint64_t rc_durable;   /* refcount raises of batches up to here are durable */
	uint64_t link_need;    /* batch whose refcount raises the linked entries need */
	struct q2_u64v punchq; /* freed clusters waiting for their hole punch */
	size_t punchq_pos;
	bool punch_busy, no_punch;
	bool punch_hold; /* closing for an edit: no new punch (qcow2_close_free) */
	bool gave_back;  /* going read-only: q2_alloc_give_back ran */
	uint64_t punch_c, punch_n;
	struct io_cmd punch_cmd;
	/*
	 * Preallocation and backing (alloc.c): fresh space below prealloc_ok has
	 * blocks (a fallocate covering it succeeded); metadata clusters are only
	 * handed out there. prealloc_end: end of what was asked for (>= ok).
	 */
	uint64_t prealloc_end;                 /* bytes */
	uint64_t prealloc_ok;                  /* bytes */
	uint64_t prealloc_start, prealloc_len; /* the fallocate in flight */
	bool prealloc_busy;
	bool prealloc_punching;  /* giving back what a failed fallocate took */
	bool prealloc_need_only; /* the one in flight asked for no more than needed */
	unsigned prealloc_fails; /* failures since the last success */
	int prealloc_err;        /* the last failure */
	bool no_prealloc;        /* no optional chunks (unsupported, block device, ...) */
	bool no_backing;         /* fallocate unsupported: metadata goes to holes */
	struct qcow2_waiter *space_waiters; /* parked until the fallocate/punch ends */
	struct io_cmd prealloc_cmd;

	struct qcow2_alloc *tokens; /* active allocations */
	struct q2_l2cow *l2cow;     /* copy of a shared L2 table in progress */
	struct qcow2_zctx *zctx;    /* decompressor (compress.c over qcow2fmt/compress.c) */

	/* Refcount decrements, by stage */
	struct q2_u64v dec_pending; /* pointer removed in memory */
	struct q2_u64v dec_grace;   /* durable; waiting for older data I/O to end */
	struct q2_u64v dec_apply;   /* ready to apply */
	size_t dec_apply_pos;
	bool dec_running;
	struct qcow2_waiter dec_waiter;
	unsigned gen;
	unsigned active[2];
	bool grace_running;
	struct qcow2_ext_io ext; /* other threads' data I/O (qcow2_set_ext_io) */
	bool ext_busy;           /* the running grace period waits for it too */
	struct q2_u64v dec_wait; /* in the running grace period */

	/* Write-back */
	struct q2_batch *batch;       /* NULL when idle */
	struct q2_batch *batch_spare; /* reused allocation */
	struct q2_batch *side;        /* a link batch beside it (writeback.c), or NULL */
	struct q2_batch *side_spare;
	struct q2_batch *wb_tail; /* a batch whose last fdatasync runs beside q->batch, or NULL */
	uint64_t side_done_gen;   /* side batches beside this batch wrote all up to here */
	struct qcow2_flush *flush_next; /* waiting for the next batch */
	struct qcow2_flush *link_next;  /* qcow2_link(): waiting for the next batch */
	uint64_t meta_gen;              /* bumped by every L2/L1 change a request made */
	uint64_t meta_written_gen;      /* changes up to here are written (completed) */
	bool wb_durable_wanted;         /* the next batch syncs fully (timer) */
	bool wb_wanted;                 /* start another batch when this one ends */
	bool wb_strict; /* a batch failed: L2 tables go in P2, synced before L1 (writeback.c) */
	uint64_t wb_fail_seq; /* q->rc_seq when a batch last failed: older ones keep wb_strict */
	bool link_want;       /* an early-linked write waits: next batch is link mode */
	bool link_posted;     /* link_cmd armed (test delay): start a link batch then */
	struct io_cmd link_cmd;
	bool link_deferred; /* link_defer added: start a link batch this iteration */
	struct io_defer link_defer;
	/*
	 * Extended L2 without a backing file (mapping.c, "Early link"): host
	 * clusters this engine allocated whose unallocated subclusters hold
	 * zeroes in the file (the whole-cluster first write, or fresh space).
	 * Direct-mapped by host cluster index, lossy (a miss only costs the
	 * early link); NULL until first needed.
	 */
	struct q2_zk *zk;
	bool no_early_link; /* qcow2_opts.no_early_link (tests: the strict data -> L2 order) */
	/* early_new_link() (mapping.c): tokens whose new clusters are linked
	 * already, and whether the last q2_alloc_clusters() took a freed one */
	uint32_t early_new_live;
	bool alloc_from_free;
	bool fills_whole; /* qcow2_set_fills_whole(): the caller writes new clusters whole */
	uint64_t batches;
	struct io_cmd timer_cmd;
	bool timer_armed;
	bool closing;
	uint32_t writeback_ms;
	int wb_err; /* last write-back error (sticky until a batch succeeds) */

	/* Corruption */
	bool corrupt;
	uint8_t corrupt_hdr_busy; /* 1 writing the header, 2 syncing */
	struct io_cmd corrupt_cmd;
	uint8_t corrupt_buf[8];

	/* Deferred wake-ups (never call wake() from inside a map call) */
	struct qcow2_waiter *wake_head, *wake_tail;
	struct io_cmd wake_cmd;
	bool wake_armed;

	/* Background L2 prefetch after open (prefetch.c); NULL when none ran */
	struct q2_pf *pf;
	uint64_t n_l2_prefetched; /* slices inserted by the prefetch */

	/* Persistent dirty bitmaps (bitmap.c); NULL when none are maintained */
	struct q2_bitmaps *bms;

	/*
	 * Online growth (resize.c): the switch happened in memory; the batch
	 * that writes the whole L1 table at h.l1_table_offset (l1_relocated)
	 * and then the header's size and L1 fields (hdr_dirty) makes it
	 * durable; the old L1 clusters are released after it.
	 */
	bool l1_relocated;
	bool hdr_dirty;
	uint64_t l1_old_off, l1_old_len; /* old L1 clusters to release (bytes) */
	uint64_t grow_size;
	struct qcow2_flush *grow_f; /* the caller's completion; NULL when idle */
	struct qcow2_waiter grow_w;

	/* Per-type counters (describe, qcow2_cache_stats) */
	uint64_t n_alloc, n_cow, n_l2_new, n_rb_new;
	uint64_t n_data_cow;                  /* allocations that copy a head or tail */
	uint64_t n_meta_writes, n_meta_bytes; /* write-back writes (writevs) and bytes */
	uint64_t n_wb_fill;      /* clean cached slices written to bridge gaps (writeback.c) */
	uint64_t n_side_batches; /* side batches started (writeback.c) */
	uint64_t n_tail_starts;  /* batches started beside a batch's last fdatasync (writeback.c) */
	uint64_t n_early_links;  /* subcluster allocations linked at map time (mapping.c) */
	uint64_t n_early_new;    /* allocations of fresh space linked at map time (mapping.c) */
	uint64_t n_early_new_ahead; /* and their entries written when the data write ended */
	uint64_t n_syncs;           /* write-back fdatasync steps started (writeback.c) */
	uint64_t n_syncs_done;      /* and ended */
	uint64_t n_link_waits, n_link_wait_syncs, n_link_wait_max; /* qcow2_link() waits */
	uint64_t n_link_wait_ns;                                   /* ... and their time */
};

/* ---- core.c ---- */
__attribute__((format(printf, 2, 3))) void q2_corrupt(struct qcow2 *q, const char *fmt, ...);
bool q2_meta_overlaps(const struct qcow2 *q, uint64_t host, uint64_t len);
/*
 * Clusters [lo, hi) known to hold no metadata, from the last lookup: an L2
 * slice's entries mostly point into one such run (preallocated images: all
 * of them), so checking them one after another skips the binary search.
 * Valid only while the metadata set does not change (one q2_l2_validate).
 */
struct q2_meta_gap {
	uint64_t lo, hi;
};
bool q2_meta_overlaps_cluster(const struct qcow2 *q, uint64_t cluster, struct q2_meta_gap *gap);
int q2_meta_add(struct qcow2 *q, uint64_t cluster);
void q2_meta_del(struct qcow2 *q, uint64_t cluster);
int q2_u64v_push(struct q2_u64v *v, uint64_t x);
void q2_u64v_free(struct q2_u64v *v);
/* True if sorted @m holds @x. */
bool q2_u64v_has(const struct q2_u64v *m, uint64_t x);
/* Queue a wake-up of @w with @err, delivered from the loop. */
void q2_wake_later(struct qcow2 *q, struct qcow2_waiter *w, int err);
void q2_wake_list_later(struct qcow2 *q, struct qcow2_waiter **list, int err);
/* Largest host offset we accept in an entry (file end or allocation frontier). */
uint64_t q2_host_end(const struct qcow2 *q);
/*
 * The format code's I/O interface (qcow2fmt/image.h) over @f: io/'s
 * synchronous calls (io_file_pread_sync & co). Open time only (open, the
 * dirty-image repair, bitmap loading), never on the request path.
 */
struct qcow2_io q2_file_io(struct io_file *f);
/*
 * Check L1 entry @i (< l1_size): NULL with *off = its L2 table's host offset
 * (0 = no table), or what is wrong with it.
 */
const char *q2_l1_check(const struct qcow2 *q, uint32_t i, uint64_t *off);

/* ---- cache.c ---- */
/*
 * An empty cache of up to @soft_max (at least 8) slices of @slice_size (a
 * power of two >= 512) bytes; memory is taken as entries are needed. @hooks
 * is copied. 0, -EINVAL or -ENOMEM. q2_cache_exit() frees everything (no load
 * in flight).
 */
int q2_cache_init(struct q2_cache *c, const struct q2_cache_hooks *hooks, uint8_t type,
		  uint32_t slice_size, size_t soft_max);
void q2_cache_exit(struct q2_cache *c);
/*
 * Find the slice at @off: 0 with *sp set (READY), -EAGAIN (load started or in
 * progress, @w parked), or -errno.
 */
int q2_cache_get(struct q2_cache *c, uint64_t off, struct q2_slice **sp, struct qcow2_waiter *w);
/* The slice at @off if cached and READY, else NULL (no load). */
struct q2_slice *q2_cache_peek(struct q2_cache *c, uint64_t off);
/* Create a zero-filled dirty READY slice at @off (no I/O). NULL on ENOMEM. */
struct q2_slice *q2_cache_new(struct q2_cache *c, uint64_t off);
void q2_slice_dirty(struct q2_slice *s);
/* Only bytes [@off, @off + @len) of the slice's buffer changed (write-back writes less). */
void q2_slice_dirty_range(struct q2_slice *s, uint32_t off, uint32_t len);
/* Drop a clean, unpinned slice (e.g. its cluster was freed). */
void q2_cache_forget(struct q2_cache *c, uint64_t off);
size_t q2_cache_over(const struct q2_cache *c);
/* Free clean, idle entries until the cache is back within its soft limit. */
void q2_cache_trim(struct q2_cache *c);
/*
 * Insert a clean READY copy of @data (slice_size bytes, on-disk format) at
 * @off unless a slice at @off is present in any state (then untouched).
 * Never evicts. 1 inserted, 0 present, -ENOSPC (at the soft limit), -ENOMEM.
 */
int q2_cache_insert(struct q2_cache *c, uint64_t off, const void *data);

/* ---- prefetch.c ---- */
/*
 * Background L2 prefetch: when the L2 cache covers every L2 table the L1
 * table references, read them all (whole tables, host-adjacent ones
 * coalesced into reads of up to 1 MiB, at most 4 in flight) and insert the
 * slices that are not cached. Data of a read is dropped when the L2 cache's
 * generation changed or the L1 entry moved while it was in flight. Errors
 * are logged once and ignored. Started at the end of qcow2_open().
 */
int q2_l2_prefetch_start(struct qcow2 *q);
/* Issue no more prefetch reads (in-flight ones still complete). */
void q2_l2_prefetch_stop(struct qcow2 *q);
/* True while prefetch reads are in flight. */
bool q2_l2_prefetch_busy(const struct qcow2 *q);
/* Free the prefetch state (no reads in flight). */
void q2_l2_prefetch_exit(struct qcow2 *q);

/* ---- alloc.c ---- */
/*
 * Reserve up to @n host clusters, contiguous, refcount raised to 1 in the
 * cache. @meta: for metadata (taken from the end, never the free list).
 * Returns the number reserved (>= 1) with *host and *fresh set, -EAGAIN
 * (parked), or -errno.
 */
int q2_alloc_clusters(struct qcow2 *q, uint32_t n, bool meta, uint64_t *host, bool *fresh,
		      struct qcow2_waiter *w);
/* Give the clusters reserved ahead and never handed out back (close). */
void q2_resv_release(struct qcow2 *q);
/* Zero-ahead on a block device (alloc.c): turn it on (@on, where the device
 * offloads write-zeroes) and start the first range; forget the zeroed range
 * (going read-only); cut the range in flight short at its next step, and
 * turn zero-ahead off if @off (close; going read-only keeps it on, in case
 * it does not happen). */
void q2_zah_start(struct qcow2 *q, bool on);
void q2_zah_forget(struct qcow2 *q);
void q2_zah_stop(struct qcow2 *q, bool off);
/* Close zero-ahead's file description (close, once no zeroing runs). */
void q2_zah_close(struct qcow2 *q);
/* Undo a reservation that was never linked (refcount back to 0 now). */
void q2_alloc_release(struct qcow2 *q, uint64_t host, uint32_t n);
/* The cached refcount slice holding @host's refcount, or NULL. */
struct q2_slice *q2_rc_slice(struct qcow2 *q, uint64_t host);
/* Ensure the refcount slice for @host is cached: 0, -EAGAIN or -errno. */
int q2_rc_prepare(struct qcow2 *q, uint64_t host, struct qcow2_waiter *w);
/* Queue a deferred decrement of every cluster overlapping [host, host + len). */
void q2_dec_range(struct qcow2 *q, uint64_t host, uint64_t len);
/* mapping.c: [host, host + len) loses its pointer: forget what q->zk knows. */
void q2_zk_forget(struct qcow2 *q, uint64_t host, uint64_t len);
/* Called by write-back when a batch (that took @decs) is durable. */
void q2_dec_durable(struct qcow2 *q, struct q2_u64v *decs);
void q2_alloc_exit(struct qcow2 *q);
/*
 * Clusters @c .. @c + @n - 1 were freed while the engine was closed
 * (refcount 0, durable): punch them, then reuse them like clusters freed
 * here. Those at or past the cursor (handed out from there anyway) or on
 * metadata are skipped. Returns how many were taken.
 */
uint64_t q2_alloc_adopt(struct qcow2 *q, uint64_t c, uint64_t n);
/*
 * The engine goes read-only, quiet and written back (qcow2_set_read_only):
 * give the file system back the space of what is free (the reserve just
 * released, the preallocated tail). -EAGAIN while its punches run.
 */
int q2_alloc_give_back(struct qcow2 *q);
/*
 * Move the free clusters below the cursor (waiting for their punch, or on
 * the free list) to @out: the engine forgets them (they stay free).
 */
int q2_alloc_take_free(struct qcow2 *q, struct q2_u64v *out);

/* ---- writeback.c ---- */
void q2_wb_kick(struct qcow2 *q);      /* start a batch soon if there is work */
void q2_wb_link_soon(struct qcow2 *q); /* a link batch from the loop (early link) */
/* The qcow2_link() generation after which L2 slice @s's entries are written (0: they are). */
uint64_t q2_wb_slice_gen(const struct qcow2 *q, const struct q2_slice *s);
void q2_wb_maybe(struct qcow2 *q); /* start one if thresholds are exceeded */
void q2_wb_mark_l1(struct qcow2 *q, uint32_t idx);
void q2_wb_mark_rt(struct qcow2 *q, uint64_t idx);
int q2_wb_close(struct qcow2 *q);
void q2_wb_exit(struct qcow2 *q);

/* ---- resize.c ---- */
/* A batch that carried the header's new size and L1 fields finished with @err (0: durable). */
void q2_grow_done(struct qcow2 *q, int err);
/* That batch succeeded: queue the release of the old L1 clusters. */
void q2_grow_written(struct qcow2 *q);

/* ---- qcow2.c ---- */
/* The default cache budgets (bytes) for a disk of @size (qcow2_open, set_size). */
void q2_cache_defaults(const struct qcow2 *q, uint64_t size, uint64_t *l2_bytes,
		       uint64_t *rc_bytes);
/* Highest cluster index with a non-zero refcount on disk + 1 (0 if none), via sync reads. */
int q2_scan_highest_used(struct qcow2 *q, uint64_t *out);

/* ---- mapping.c ---- */
/* Validate an L2 slice after loading: sets s->suspect. */
void q2_l2_validate(struct qcow2 *q, struct q2_slice *s);
void q2_mapping_exit(struct qcow2 *q);

/* ---- bitmap.c ---- */
/*
 * Read-write v3 opens with a consistent bitmaps extension (autoclear bit 0):
 * read and validate the directory and tables (@hbuf/@hlen: the header
 * cluster as read), load the enabled bitmaps, add every bitmap cluster to
 * q->meta. Sets q->bms (left NULL when there is nothing to maintain).
 * 0 or -errno with a message naming the file and the problem in @err.
 */
int q2_bitmap_open(struct qcow2 *q, const void *hbuf, size_t hlen, char *err, size_t errlen);
/* Mark the enabled bitmaps in use on disk (before any guest write). 0 or -errno. */
int q2_bitmap_start(struct qcow2 *q, char *err, size_t errlen);
/*
 * At close, before the final write-back: store the enabled bitmaps in new
 * clusters, switch the directory, queue the old clusters' release.
 * 0 or -errno (the bitmaps then stay in use on disk).
 */
int q2_bitmap_store(struct qcow2 *q);
void q2_bitmap_exit(struct qcow2 *q);
/*
 * Growing the disk to @size (resize.c, before the switch): _check refuses
 * what cannot grow (an inconsistent bitmap: -EBUSY with QEMU's message; a
 * bitmap too large: -EFBIG) without I/O; _need_load tells whether
 * q2_bitmap_grow will do synchronous I/O (a disabled bitmap to load and
 * mark in use); q2_bitmap_grow makes every consistent bitmap cover @size in
 * memory (stored at close). 0 or -errno with @err set.
 */
int q2_bitmap_grow_check(struct qcow2 *q, uint64_t size, char *err, size_t errlen);
bool q2_bitmap_need_load(const struct qcow2 *q);
int q2_bitmap_grow(struct qcow2 *q, uint64_t size, char *err, size_t errlen);
/* Enabled bitmaps follow guest writes (they must be stored before writing stops). */
bool q2_bitmap_tracking(const struct qcow2 *q);
bool q2_bitmap_frozen(const struct qcow2 *q);
int q2_bitmap_thaw(struct qcow2 *q);

/* ---- compress.c ---- */
void q2_compress_exit(struct qcow2 *q);

/* CLOCK_MONOTONIC now, in ns (the prefetch's log line, zero-ahead's rate). */
static inline uint64_t q2_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- small helpers ---- */
static inline uint64_t q2_l2_entry(const struct q2_slice *s, uint32_t i, uint64_t *bitmap,
				   bool extl2)
{
	const uint8_t *b = (const uint8_t *)s->buf + (size_t)i * (extl2 ? 16 : 8);

	if (bitmap)
		*bitmap = extl2 ? qcow2_be64(b + 8) : 0;
	return qcow2_be64(b);
}

static inline void q2_l2_set(struct q2_slice *s, uint32_t i, uint64_t e, uint64_t bitmap,
			     bool extl2)
{
	uint8_t *b = (uint8_t *)s->buf + (size_t)i * (extl2 ? 16 : 8);

	qcow2_put_be64(b, e);
	if (extl2)
		qcow2_put_be64(b + 8, bitmap);
}

/* One log line tagged with the image path; lvl is ERROR, WARN, INFO or DEBUG. */
#define Q2_LOG(q, lvl, fmt, ...) vlog(VLOG_##lvl, (q)->path, fmt, ##__VA_ARGS__)

#endif /* VQCOW_QCOW2_INTERNAL_H */
