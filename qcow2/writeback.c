/* SPDX-License-Identifier: MIT */
/*
 * qcow2/writeback.c — batched metadata write-back in durability order.
 *
 * THE ordering function of the engine. A batch takes a snapshot (copies) of
 * all dirty metadata when it starts and writes it in phases:
 *
 *   P1   refcount slices (new refcount blocks included), the slices of
 *        new L2 tables (no L1 entry on disk names them yet) and, after a
 *        refcount table relocation, the whole new table -> fdatasync (image
 *        and external data file: the data of every acknowledged write is
 *        durable from here on)
 *   P1B  dirty refcount table sectors, or the header's refcount table
 *        pointer after a relocation                 -> fdatasync
 *   P2   L2 slices of linked tables                 (no sync of its own)
 *   P3   L1 sectors, or after an online grow the whole new L1 table at
 *        its new place                              -> fdatasync if P4
 *   P4   after an online grow: the header's size, l1_size and
 *        l1_table_offset (the header's whole first sector, as on disk
 *        but those fields: hdr_item)
 *   and the last phase that wrote something        -> fdatasync
 *
 * P2 needs no sync before P3: the tables L1 entries newly name were written
 * in P1, before its sync, and a linked table's entries need only what P1's
 * sync gave them. After a failed batch (wb_strict, until a durable batch
 * succeeds) new tables go in P2 again and P2 is synced before P3, since an
 * L1 entry naming one may be written already. Sequential syncs a batch
 * costs: P1, (P1B), (P3 of a grow), the last; a link batch (below) skips
 * the last and often P1.
 *
 * The last sync: the batch's links (qcow2_link waiters) are let go when it
 * starts (their entries are written; a process death keeps them); flushes,
 * decrements and a grow's end wait for it.
 *
 * The tail: nor does the next batch wait for that sync. When a batch's last
 * fdatasync starts, the batch becomes q->wb_tail (one at a time) and the
 * next batch may start beside it. Why that is safe:
 *  - every write of the tail has completed (a sync starts only after its
 *    phase's writes ended), so no slice, sector or header is written by
 *    both at once, and every fdatasync the next batch issues comes after
 *    those writes completed and covers them as well: for the next batch's
 *    own order (refcounts before entries, tables before L1, a relocated
 *    table before its users) the tail's writes count as written before
 *    its P1, which is where they would be if it had waited;
 *  - nothing the next batch writes needs the tail durable first: its L2
 *    entries need refcounts that are durable already (rc_durable only
 *    moves after a P1 sync that ended) or its own P1 sync; an L2 slice of
 *    a table whose L1 entry is the tail's unsynced P3 write is unreachable
 *    if power fails first (a leak at most, as for a side batch); the
 *    next batch cannot hold decrements the tail makes durable (they are
 *    applied to the refcounts only in the tail's finish(), after its sync);
 *    after a grow, its L1 writes go to the new table, which the old header
 *    does not name: unreachable again, never a stale pointer;
 *  - a FLUSH that arrives goes to the next batch, never a link-mode one:
 *    its P1 sync and its last sync come after the tail's writes and cover
 *    every write acknowledged before it; FLUSHes, decrements and a grow's
 *    end taken by the tail still complete only after the tail's own sync;
 *  - a tail that fails puts its items back for a later batch by offset
 *    (slice_back: its slices may be held by the next batch now) and turns
 *    wb_strict on; only a durable batch started after the last failure
 *    turns it off again (wb_fail_seq), not the tail ending after a failure
 *    of the batch beside it, nor the other way round;
 *  - no tail while the image file or its data file may have taken
 *    writes through the page cache (io_file_pc_written: the buffered twin
 *    fd of io/, a file system without O_DIRECT; img/'s second handle of
 *    the image, that data goes through, counts on q->file:
 *    io_file_pc_share): Linux reports a writeback
 *    error once per open file (errseq), so of two fdatasyncs in flight on
 *    one fd only one may see it, and that one may be the next batch's
 *    while the tail's returns 0 and answers its FLUSHes; one at a time,
 *    the first failure is sticky in io/ and fails every later sync;
 *  - a side batch never runs beside a tail (side_start needs q->batch),
 *    and one still running beside the batch that became the tail keeps
 *    the next batch from starting (wb_start), as before.
 *
 * Why it is safe: an L2 entry is set (alloc_finish) only after its data write
 * completed and after its cluster's refcount was raised in the cache, i.e.
 * before the snapshot, so P1's copy has the refcount and P1's fdatasync covers
 * the data; P2 (or P1 for a new table, unreachable until P3) then writes the
 * entry. New L2 tables are written in P1 and linked from L1 in P3. A refcount block is linked from
 * the table (P1B) only after P1 wrote it. Decrements taken by the batch are applied only after P3
 * (alloc.c). Empty phases are skipped, except P1's fdatasync (a flush needs it
 * for in-place data writes). A grow's header (P4) is written only in the
 * batch that wrote its new L1 table (P3), and such a batch never runs in link
 * mode (its last phase is synced); the old L1 clusters are released after it
 * (resize.c).
 *
 * Dirty spans: a slice whose changes were marked by range
 * (q2_slice_dirty_range: the entries a request linked, in eighths of the
 * slice) goes out as the span from its first to its last dirty eighth,
 * widened to the file's O_DIRECT alignment, not whole: the clean parts of a
 * slice hold the bytes on disk (the same argument as for clean slices
 * below), so the span links nothing but what changed. A linked 4K write
 * then costs one 512-byte sector of L2 table instead of a 4 KiB slice.
 *
 * Gaps bridged: within one phase, the gap between two dirty spans of the
 * same cluster (one L2 table, one refcount block), when at most bridge_max
 * bytes, is filled with the rest of their slices and copies of the clean
 * cached slices in between, when every slice of the gap is cached,
 * READY, clean, not suspect and not under write-back, so the two runs merge
 * into one write: a batch costs one write per table it touches instead of
 * one per dirty slice (random writes into a growing image dirty one slice per
 * request). A clean READY slice holds exactly the bytes on disk (every change
 * to a slice's buffer marks it dirty in the same step, and a slice leaves
 * the dirty state only when a batch takes its copy), so a filler rewrites
 * what is there already: it links nothing new and needs no order of its own.
 * A filler changed after the snapshot is dirty and goes out with the next
 * batch; one evicted and reloaded while its write is in flight reads the
 * same bytes either way. A failed batch marks its cached fillers dirty too
 * (a failed write may have left anything in their place).
 *
 * Across tables (qcow2_wb_tune's @xtab, VQCOWD_TEST_WB=...,xtab[=GAP]; off
 * by default): also the gap, up to @xtab bytes, between a dirty span at the
 * end of one table (block) and one at the start of the next cluster, when
 * that cluster is a table of the same cache too: growing images get their L2 tables next to
 * each other (metadata comes from the cursor), and an extended-L2 image has
 * twice as many tables for the same clusters (16-byte entries), so a link
 * batch of ~6 entries touches ~4.4 of a 2 GiB image's 8 tables against ~3.4
 * of a plain image's 4: one write per table. Only two dirty spans of
 * adjacent clusters: both clusters are live tables (a dirty slice is written
 * back, so its table is one), and every slice of the gap is one of theirs,
 * never a clean slice still cached of a cluster freed since (q2_cache_forget
 * leaves a pinned one), whose bytes the cluster may no longer hold.
 *
 * Entries changed after the snapshot stay dirty for the next batch. Slices
 * being written are not evicted (a reload could read the old bytes). A failed
 * batch re-marks everything it took as dirty, puts its decrements back and
 * fails the flushes waiting on it; later batches retry.
 *
 * Triggers: qcow2_flush(), many dirty slices or pending decrements (or a
 * cache past its soft limit), and a periodic timer while anything is dirty.
 *
 * One batch at a time, but for side batches: a link batch of L2 slices only,
 * started while a batch is in flight for the slices it is not writing
 * (side_start: the conditions that keep that safe, and what its waiters
 * wait for). No batch starts while a side batch runs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum item_kind {
	IT_SLICE = 1,
	IT_RT_FULL,
	IT_RT_SECTOR,
	IT_HDR_RT,
	IT_L1_SECTOR,
	IT_L1_FULL,
	IT_HDR_L1,
	IT_FILL, /* a clean cached slice bridging a gap between dirty ones */
};

/*
 * Largest gap bridged, in bytes: the write grows by at most this much.
 * qcow2_wb_tune() changes it (and turns the dirty spans off) for benchmarks.
 */
static uint32_t bridge_max = QCOW2_WB_BRIDGE_DEFAULT;
static bool wb_span_off;
/* Largest gap bridged across two tables (blocks) next to each other in the
 * file (0: none, the default). */
static uint32_t xtab_max;

/* A grow's header write: size, crypt_method, l1_size, l1_table_offset. */
_Static_assert(QCOW2_OFF_L1_TABLE_OFFSET == QCOW2_OFF_SIZE + 16, "header field order");

enum phase {
	PH_P1 = 0,
	PH_P1B,
	PH_P2,
	PH_P3,
	PH_P4,
	PH_N,
};

struct wb_item {
	uint64_t off;
	uint64_t len;
	size_t stage_off; /* copy in the stage buffer */
	struct q2_slice *slice;
	struct q2_cache *cache; /* IT_FILL, IT_SLICE: the cache its slice came from */
	uint64_t index;         /* sector index */
	uint32_t skip;          /* IT_SLICE: bytes of the slice before @off (not written) */
	uint8_t kind;
	bool newtab;  /* IT_SLICE: a new L2 table's, written in P1 */
	bool written; /* IT_SLICE, IT_FILL: written; the slice may be evicted since */
};

struct wb_run {
	struct io_cmd cmd;
	struct q2_batch *b;
	size_t iov_first;
	unsigned iovcnt;
	uint64_t off;
};

struct q2_batch {
	struct qcow2 *q;
	int phase;
	bool syncing;
	int err;
	unsigned pending;
	struct wb_item *items;
	size_t nitems, cap_items;
	size_t ph_first[PH_N + 1];
	uint8_t *stage;
	size_t stage_used, stage_cap;
	struct wb_run *runs;
	size_t cap_runs;
	struct iovec *iov;
	size_t cap_iov;
	struct io_cmd sync_cmd[2];
	struct io_cmd delay_cmd; /* the sync delay seam */
	struct q2_u64v decs;
	struct qcow2_flush *flushes;
	struct qcow2_flush *links; /* qcow2_link() waiters */
	bool link_mode;            /* only links wait: skip the final syncs */
	bool rc_nosync;            /* link mode, refcounts it links to already durable */
	bool incomplete;           /* some dirty metadata could not be taken */
	bool rc_synced;            /* its refcount phases were synced */
	uint64_t gen;              /* q->meta_gen when the snapshot was taken */
	bool side;                 /* a side batch: L2 slices only, beside q->batch */
	bool held;                 /* its L2 writes were held back (test seam) */
	struct io_cmd hold_cmd;
	uint64_t base_gen;  /* side: the gen of the batch it runs beside */
	uint64_t rc_seq;    /* its number (q->rc_seq) */
	bool grow_hdr;      /* it carries a grow's header write (P4) */
	bool strict;        /* L2 tables synced before L1 (after a failure) */
	bool tail;          /* q->wb_tail: only its last sync is left */
	unsigned p1_tables; /* new L2 tables' slices in P1 */
};

static void phase_run(struct q2_batch *b);
static bool link_due(const struct qcow2 *q);

/* Nothing written in the phases after the current one. */
static bool last_phase(const struct q2_batch *b)
{
	return b->ph_first[b->phase + 1] == b->ph_first[PH_N];
}

/* Test seam (qcow2_test_link_delay): early links' batches start this late. */
static unsigned test_link_delay_ms;
/* Test seam (qcow2_test_wb_hold): batches (not side batches) write L2 this late. */
static unsigned test_wb_hold_ms;

static void hold_done(struct io_cmd *cmd, int res)
{
	(void)res;
	phase_run(cmd->priv);
}

/* Test seam (qcow2_test_sync_delay): every fdatasync starts this late. */
static unsigned test_sync_delay_ms;
/* Test seam (qcow2_test_wb_nomem): item_add() calls until one fails (0: none). */
static unsigned test_nomem_left;

static bool bit_get(const uint8_t *m, uint64_t i)
{
	return m[i / 8] & (1u << (i % 8));
}

static void bit_set(uint8_t *m, uint64_t i)
{
	m[i / 8] |= (uint8_t)(1u << (i % 8));
}

void q2_wb_mark_l1(struct qcow2 *q, uint32_t idx)
{
	uint64_t sec = (uint64_t)idx * 8 / 512;

	if (!bit_get(q->l1_dirty, sec)) {
		bit_set(q->l1_dirty, sec);
		q->l1_ndirty++;
	}
}

void q2_wb_mark_rt(struct qcow2 *q, uint64_t idx)
{
	uint64_t sec = idx * 8 / 512;

	if (!bit_get(q->rt_dirty, sec)) {
		bit_set(q->rt_dirty, sec);
		q->rt_ndirty++;
	}
}

static bool has_work(const struct qcow2 *q)
{
	return q->l2c.ndirty || q->rcc.ndirty || q->l1_ndirty || q->rt_ndirty || q->rt_relocated ||
	       q->l1_relocated || q->hdr_dirty || q->dec_pending.n || q->flush_next ||
	       q->link_next || q->link_want;
}

/* ---- building a batch ---- */

static int stage_reserve(struct q2_batch *b, size_t len, size_t *off)
{
	size_t need = (b->stage_used + 511) & ~(size_t)511;

	if (need + len > b->stage_cap) {
		size_t ncap = b->stage_cap ? b->stage_cap : 65536;
		uint8_t *ns;

		while (ncap < need + len)
			ncap *= 2;
		ns = io_alloc_aligned(ncap);
		if (!ns)
			return -ENOMEM;
		if (b->stage_used)
			memcpy(ns, b->stage, b->stage_used);
		io_free_aligned(b->stage);
		b->stage = ns;
		b->stage_cap = ncap;
	}
	*off = need;
	b->stage_used = need + len;
	return 0;
}

static struct wb_item *item_add(struct q2_batch *b, uint8_t kind, uint64_t off, uint64_t len)
{
	struct wb_item *it;
	size_t so;

	if (__builtin_expect(__atomic_load_n(&test_nomem_left, __ATOMIC_RELAXED) != 0, 0) &&
	    __atomic_sub_fetch(&test_nomem_left, 1, __ATOMIC_RELAXED) == 0)
		return NULL; /* the test seam: as if out of memory */
	if (b->nitems == b->cap_items) {
		size_t ncap = b->cap_items ? b->cap_items * 2 : 64;
		struct wb_item *ni = realloc(b->items, ncap * sizeof(*ni));

		if (!ni)
			return NULL;
		b->items = ni;
		b->cap_items = ncap;
	}
	if (stage_reserve(b, (size_t)len, &so) < 0)
		return NULL;
	it = &b->items[b->nitems++];
	memset(it, 0, sizeof(*it));
	it->kind = kind;
	it->off = off;
	it->len = len;
	it->stage_off = so;
	return it;
}

/*
 * A write of the header's first sector (IT_HDR_RT in P1B, IT_HDR_L1 in P4),
 * its fields not yet patched in: the whole O_DIRECT-aligned sector, as on
 * disk (as an earlier phase of this batch left it), never a few bytes. A
 * shorter write is off the alignment, and io/ would take it through the page
 * cache, which makes the file page-cache written for good
 * (io_file_pc_written: no tail, every failed fdatasync sticky). The sector
 * is read now, synchronously (a grow or a refcount table relocation: rare):
 * no write-back write is in flight while a batch is built (a tail's writes
 * all completed, side batches write L2 slices only), and nothing else writes
 * the header while the engine is open but the corrupt bit (q2_corrupt, its
 * write maybe in flight: the field is taken from memory then). NULL when out
 * of memory or the read failed (the caller leaves the change for a later
 * batch).
 */
static struct wb_item *hdr_item(struct q2_batch *b, uint8_t kind)
{
	struct qcow2 *q = b->q;
	uint32_t len = q->file->align > 512 && q->file->align <= q->cs ? q->file->align : 512;
	uint8_t *sec = io_alloc_aligned(len);
	struct wb_item *it = NULL;
	size_t prev = SIZE_MAX;

	if (!sec)
		return NULL;
	for (size_t i = 0; i < b->nitems; i++)
		if ((b->items[i].kind == IT_HDR_RT || b->items[i].kind == IT_HDR_L1) &&
		    b->items[i].off == 0 && b->items[i].len == len)
			prev = i;
	if (prev != SIZE_MAX)
		memcpy(sec, b->stage + b->items[prev].stage_off, len);
	else if (io_file_pread_sync(q->file, sec, len, 0) < 0)
		goto out;
	if (q->corrupt && q->h.version >= 3 && !q->read_only)
		qcow2_put_be64(sec + QCOW2_OFF_INCOMPAT, q->h.incompatible_features);
	it = item_add(b, kind, 0, len);
	if (it)
		memcpy(b->stage + it->stage_off, sec, len);
out:
	io_free_aligned(sec);
	return it;
}

/*
 * The bytes [*lo, *hi) of a slice that hold its dirty eighths (@dmask),
 * widened to the image file's O_DIRECT alignment: the rest of the slice is
 * on disk as cached (a clean part of a slice holds the bytes on disk: every
 * change marks its part dirty in the same step), so a batch writes only what
 * changed (and the clean parts between, which rewrite what is there).
 */
static void dirty_span(const struct qcow2 *q, const struct q2_cache *c, uint8_t dmask, uint32_t *lo,
		       uint32_t *hi)
{
	uint32_t g = c->slice_size / 8, a = q->file->align > g ? q->file->align : g;

	if (!dmask || wb_span_off || a >= c->slice_size) {
		*lo = 0;
		*hi = c->slice_size;
		return;
	}
	*lo = (uint32_t)__builtin_ctz(dmask) * g / a * a;
	*hi = ((8u - (uint32_t)__builtin_clz((uint32_t)dmask << 24)) * g + a - 1) / a * a;
	if (*hi > c->slice_size)
		*hi = c->slice_size;
}

/* take_slices(): @s stays in @c's dirty list, appended at **@keep. */
static void keep_slice(struct q2_cache *c, struct q2_slice *s, struct q2_slice ***keep)
{
	**keep = s;
	*keep = &s->dnext;
	c->ndirty++;
}

enum take { TAKE_ALL, TAKE_NEW, TAKE_OLD };

/* The dirty slices of @c (TAKE_NEW: only new L2 tables', TAKE_OLD: the others). */
static int take_slices(struct q2_batch *b, struct q2_cache *c, enum take which)
{
	struct q2_slice *s = c->dirty, **keep = &c->dirty;

	c->dirty = NULL;
	c->ndirty = 0;
	while (s) {
		struct q2_slice *next = s->dnext;
		struct wb_item *it;

		s->dnext = NULL;
		if (s->dirty && which != TAKE_ALL && s->newtab != (which == TAKE_NEW)) {
			/* another phase's: stays on the dirty list */
			keep_slice(c, s, &keep);
			s = next;
			continue;
		}
		if (b->side && (s->wb || s->fill)) {
			/* written by the batch in flight: left for a later batch */
			keep_slice(c, s, &keep);
			b->incomplete = true;
			s = next;
			continue;
		}
		s->in_dlist = false;
		if (s->dirty) {
			uint32_t lo, hi;

			it = item_add(b, IT_SLICE, s->off, c->slice_size);
			if (!it) {
				b->incomplete = true;
				/* keep it dirty for the next try, in the kept list (not
				 * q2_slice_dirty(): at the head, a slice kept after it
				 * would overwrite it while *keep is still c->dirty) */
				s->in_dlist = true;
				keep_slice(c, s, &keep);
				s = next;
				continue;
			}
			memcpy(b->stage + it->stage_off, s->buf, c->slice_size);
			it->slice = s;
			it->cache = c;
			it->newtab = s->newtab;
			if (s->newtab)
				b->p1_tables++;
			s->newtab = false;
			/* only the dirty span, at the file's O_DIRECT alignment */
			dirty_span(b->q, c, s->dmask, &lo, &hi);
			it->skip = lo;
			it->stage_off += lo;
			it->off += lo;
			it->len = hi - lo;
			s->dirty = false;
			s->dmask = 0;
			s->wb = true;
			s->wb_side = b->side;
		}
		s = next;
	}
	return 0;
}

static void put_table_be(uint8_t *dst, const uint64_t *src, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		qcow2_put_be64(dst + i * 8, src[i]);
}

static int cmp_item(const void *a, const void *b)
{
	const struct wb_item *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

static void sort_items(struct q2_batch *b, size_t first)
{
	if (b->nitems - first > 1)
		qsort(b->items + first, b->nitems - first, sizeof(*b->items), cmp_item);
}

/* A cached slice whose buffer equals the bytes on disk at its offset. */
static bool fillable(const struct q2_slice *s)
{
	return s && !s->dirty && !s->wb && !s->fill && !s->suspect && s->state == Q2_SL_READY;
}

/*
 * Bridge the gaps between the sorted dirty spans of @c in items [@first,
 * nitems) (see the header comment), then sort again. Only gaps inside one
 * cluster, of at most bridge_max bytes, with every whole slice between them
 * fillable: the two spans grow to their slices' edges (their snapshots hold
 * the whole slices; a clean part is the bytes on disk) and copies of the
 * clean cached slices between them fill the rest.
 */
static void bridge(struct q2_batch *b, struct q2_cache *c, size_t first)
{
	struct qcow2 *q = b->q;
	size_t last = b->nitems;
	bool added = false;

	for (size_t i = first; i + 1 < last; i++) {
		struct wb_item *x = &b->items[i], *y = &b->items[i + 1];
		uint64_t end = x->off + x->len, next = y->off, o;
		uint64_t xend, ystart; /* the end of x's slice, the start of y's */

		if (x->kind != IT_SLICE || y->kind != IT_SLICE || end >= next)
			continue;
		/* one table, or with xtab_max the next cluster: x and y are dirty
		 * spans of live tables (blocks), so every slice of the gap is
		 * theirs, never a cached slice of a cluster freed since */
		if ((x->off >> q->cb) == (next >> q->cb)
			? next - end > bridge_max
			: (x->off >> q->cb) + 1 != (next >> q->cb) || next - end > xtab_max)
			continue;
		xend = x->off - x->skip + c->slice_size;
		ystart = y->off - y->skip;
		for (o = xend; o < ystart; o += c->slice_size)
			if (!fillable(q2_cache_peek(c, o)))
				break;
		if (o < ystart)
			continue;
		/* x and y's snapshots hold their whole slices */
		x->len = xend - x->off;
		y->stage_off -= y->skip;
		y->off = ystart;
		y->len += y->skip;
		y->skip = 0;
		for (o = xend; o < ystart; o += c->slice_size) {
			struct q2_slice *s = q2_cache_peek(c, o);
			struct wb_item *it = item_add(b, IT_FILL, o, c->slice_size);

			if (!it)
				break;    /* no memory: the gap stays, both runs still go out */
			x = &b->items[i]; /* item_add may have moved the array */
			memcpy(b->stage + it->stage_off, s->buf, c->slice_size);
			it->cache = c;
			it->slice = s; /* kept cached until written (a side batch must not
					* write it meanwhile: take_slices' caller checks) */
			s->fill = true;
			q->n_wb_fill++;
			added = true;
		}
	}
	if (added)
		sort_items(b, first);
}

/*
 * build(): something of phase @from or before could not be taken (no
 * memory). Later phases may count on it (an L1 entry on its new table, a
 * table sector on its new refcount block, L2 entries on their refcounts),
 * so this batch ends before them; what is left stays dirty for the next.
 */
static bool build_cut(struct q2_batch *b, enum phase from)
{
	if (!b->incomplete)
		return false;
	for (int p = from + 1; p <= PH_N; p++)
		b->ph_first[p] = b->nitems;
	return true;
}

static void build(struct q2_batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t nsec;

	b->nitems = 0;
	b->stage_used = 0;

	/* P1: refcount slices, new L2 tables (nothing on disk links them before
	 * P3, so they need no order of their own: P1's sync orders them before
	 * the L1 entries, and P2 needs no sync for that), relocated refcount
	 * table */
	b->ph_first[PH_P1] = 0;
	b->p1_tables = 0;
	take_slices(b, &q->rcc, TAKE_ALL);
	sort_items(b, b->ph_first[PH_P1]);
	bridge(b, &q->rcc, b->ph_first[PH_P1]);
	if (!b->strict)
		take_slices(b, &q->l2c, TAKE_NEW);
	if (q->rt_relocated) {
		struct wb_item *it =
		    item_add(b, IT_RT_FULL, q->rt_offset, (uint64_t)q->rt_clusters << q->cb);

		if (it) {
			put_table_be(b->stage + it->stage_off, q->rt, q->rt_entries);
			q->rt_relocated = false;
			memset(q->rt_dirty, 0, q->rt_entries * 8 / 512 / 8 + 1);
			q->rt_ndirty = 0;
		} else {
			b->incomplete = true;
		}
	}
	sort_items(b, b->ph_first[PH_P1]);
	if (build_cut(b, PH_P1))
		return;

	/* P1B: header pointer after a relocation, else dirty table sectors */
	b->ph_first[PH_P1B] = b->nitems;
	for (size_t i = b->ph_first[PH_P1]; i < b->ph_first[PH_P1B]; i++) {
		if (b->items[i].kind == IT_RT_FULL) {
			struct wb_item *it = hdr_item(b, IT_HDR_RT);

			if (it) {
				uint8_t *p = b->stage + it->stage_off;

				qcow2_put_be64(p + QCOW2_OFF_REFCOUNT_TABLE_OFFSET, q->rt_offset);
				qcow2_put_be32(p + QCOW2_OFF_REFCOUNT_TABLE_OFFSET + 8,
					       q->rt_clusters);
			} else {
				/* the next batch writes the table and its pointer again */
				q->rt_relocated = true;
				b->incomplete = true;
			}
			break;
		}
	}
	nsec = q->rt_entries * 8 / 512;
	for (uint64_t sec = 0; q->rt_ndirty && sec < nsec; sec++) {
		struct wb_item *it;

		if (!bit_get(q->rt_dirty, sec))
			continue;
		it = item_add(b, IT_RT_SECTOR, q->rt_offset + sec * 512, 512);
		if (!it) {
			b->incomplete = true;
			break;
		}
		it->index = sec;
		put_table_be(b->stage + it->stage_off, q->rt + sec * 64, 64);
		q->rt_dirty[sec / 8] &= (uint8_t) ~(1u << (sec % 8));
		q->rt_ndirty--;
	}

	/* P2: L2 slices */
	b->ph_first[PH_P2] = b->nitems;
	if (build_cut(b, PH_P1B))
		return;
	take_slices(b, &q->l2c, b->strict ? TAKE_ALL : TAKE_OLD);
	sort_items(b, b->ph_first[PH_P2]);
	bridge(b, &q->l2c, b->ph_first[PH_P2]);

	/* P3: L1 sectors, or the whole table after a grow moved it */
	b->ph_first[PH_P3] = b->nitems;
	if (build_cut(b, PH_P2))
		return;
	if (q->l1_relocated) {
		uint64_t len = (((uint64_t)q->l1_size * 8 + q->cs - 1) >> q->cb) << q->cb;
		struct wb_item *it = item_add(b, IT_L1_FULL, q->h.l1_table_offset, len);

		if (it) {
			memset(b->stage + it->stage_off, 0, (size_t)len);
			put_table_be(b->stage + it->stage_off, q->l1, q->l1_size);
			q->l1_relocated = false;
			memset(q->l1_dirty, 0, ((uint64_t)q->l1_size * 8 + 511) / 512 / 8 + 1);
			q->l1_ndirty = 0;
		} else {
			b->incomplete = true;
		}
	}
	nsec = ((uint64_t)q->l1_size * 8 + 511) / 512;
	for (uint64_t sec = 0; !q->l1_relocated && q->l1_ndirty && sec < nsec; sec++) {
		uint64_t first = sec * 64, n = q->l1_size - first;
		struct wb_item *it;

		if (!bit_get(q->l1_dirty, sec))
			continue;
		if (n > 64)
			n = 64;
		/* the whole sector, zeroes past the last entry (as QEMU writes
		 * it): a shorter write is off the O_DIRECT alignment, and io/
		 * would take it through the page cache, which makes the file
		 * page-cache written for good (no tail, every failed sync sticky) */
		it = item_add(b, IT_L1_SECTOR, q->h.l1_table_offset + sec * 512, 512);
		if (!it) {
			b->incomplete = true;
			break;
		}
		it->index = sec;
		put_table_be(b->stage + it->stage_off, q->l1 + first, n);
		memset(b->stage + it->stage_off + n * 8, 0, 512 - n * 8);
		q->l1_dirty[sec / 8] &= (uint8_t) ~(1u << (sec % 8));
		q->l1_ndirty--;
	}

	/* P4: a grow's header fields, once its L1 table is in this batch or on disk */
	b->ph_first[PH_P4] = b->nitems;
	if (build_cut(b, PH_P3))
		return;
	if (q->hdr_dirty && !q->l1_relocated) {
		struct wb_item *it = hdr_item(b, IT_HDR_L1);

		if (it) {
			uint8_t *p = b->stage + it->stage_off + QCOW2_OFF_SIZE;

			qcow2_put_be64(p, q->h.size);
			qcow2_put_be32(p + 8, q->h.crypt_method);
			qcow2_put_be32(p + 12, q->l1_size);
			qcow2_put_be64(p + 16, q->h.l1_table_offset);
			q->hdr_dirty = false;
			b->grow_hdr = true;
		} else {
			b->incomplete = true;
		}
	}
	b->ph_first[PH_N] = b->nitems;
}

/* ---- running it ---- */

static void finish(struct q2_batch *b);

static void phase_next(struct q2_batch *b)
{
	if (b->err) {
		finish(b);
		return;
	}
	b->phase++;
	b->syncing = false;
	if (b->phase == PH_P2 && b->rc_synced && !b->incomplete && b->rc_seq > b->q->rc_durable)
		b->q->rc_durable = b->rc_seq;
	if (b->phase >= PH_N) {
		finish(b);
		return;
	}
	phase_run(b);
}

static void sync_done(struct io_cmd *cmd, int res)
{
	struct q2_batch *b = cmd->priv;

	if (res < 0 && !b->err)
		b->err = res;
	if (--b->pending)
		return;
	b->q->n_syncs_done++;
	phase_next(b);
}

static void sync_issue(struct q2_batch *b)
{
	struct qcow2 *q = b->q;

	b->pending = 1;
	b->sync_cmd[0].done = sync_done;
	b->sync_cmd[0].priv = b;
	if (b->phase == PH_P1 && q->data_file != q->file) {
		b->pending = 2;
		b->sync_cmd[1].done = sync_done;
		b->sync_cmd[1].priv = b;
		io_fdatasync(q->loop, &b->sync_cmd[1], q->data_file);
	}
	io_fdatasync(q->loop, &b->sync_cmd[0], q->file);
}

static void sync_delayed(struct io_cmd *cmd, int res)
{
	(void)res;
	sync_issue(cmd->priv);
}

/* A qcow2_link() waiter is let go: count the syncs it waited for. */
static void link_release(struct qcow2 *q, struct qcow2_flush *l, int err)
{
	uint64_t n = q->n_syncs_done - l->mark;

	q->n_link_waits++;
	q->n_link_wait_ns += q2_now_ns() - l->t0;
	q->n_link_wait_syncs += n;
	if (n > q->n_link_wait_max)
		q->n_link_wait_max = n;
	l->next = NULL;
	l->done(l, err);
}

static void sync_start(struct q2_batch *b)
{
	struct qcow2 *q = b->q;
	unsigned delay = __atomic_load_n(&test_sync_delay_ms, __ATOMIC_RELAXED);
	struct qcow2_flush *l = NULL;

	b->syncing = true;
	q->n_syncs++;
	/* The last sync of a batch that wrote something: its links are
	 * written (what a process death needs), so they go now, not after it. */
	if (b->nitems && last_phase(b) && !b->side && !b->incomplete) {
		l = b->links;
		b->links = NULL;
		if (!b->incomplete) {
			if (b->gen > q->meta_written_gen)
				q->meta_written_gen = b->gen;
			/* and the side batches beside it (as finish() does) */
			if (q->side_done_gen > q->meta_written_gen)
				q->meta_written_gen = q->side_done_gen;
		}
	}
	/* Nor does the next batch wait for it: it becomes the tail (the header
	 * comment says why that is safe), unless a file may have taken writes
	 * through the page cache (io_file_pc_written): a writeback error is
	 * then reported to one fdatasync of the file only, possibly to the
	 * next batch's instead of the tail's, and the tail's FLUSHes would be
	 * answered by a sync that missed it. Apart, the first one to fail
	 * makes every later one fail (io_file_sync_error). */
	if (last_phase(b) && !b->side && q->batch == b && !q->wb_tail &&
	    !io_file_pc_written(q->file) &&
	    (q->data_file == q->file || !io_file_pc_written(q->data_file))) {
		q->batch = NULL;
		q->wb_tail = b;
		b->tail = true;
		q->side_done_gen = 0; /* it was this batch's (folded in above) */
	}
	if (delay) {
		b->pending = 1;
		b->delay_cmd.done = sync_delayed;
		b->delay_cmd.priv = b;
		io_timeout(q->loop, &b->delay_cmd, (uint64_t)delay * 1000000ull);
	} else {
		sync_issue(b);
	}
	while (l) {
		struct qcow2_flush *next = l->next;

		link_release(q, l, 0);
		l = next;
	}
	if (b->tail && !q->batch &&
	    (q->wb_wanted || q->flush_next || q->link_next || link_due(q))) {
		q->wb_wanted = false;
		q2_wb_kick(q);
	}
}

/*
 * After a phase's writes: is an fdatasync due before the next phase? For
 * power loss, refcounts (and new L2 tables) before the L2 entries (P1:
 * none when every cluster the L2 entries link was reserved by a batch that
 * synced them already, no new refcount block or table is written), the
 * refcount table before what its new blocks count (P1B), a grow's new L1
 * table before the header naming it (P3). L2 slices (P2) need none before
 * L1: the tables L1 entries link are written in P1 (after a failure, in
 * strict mode, P2 holds them and is synced). The last phase's sync makes a
 * batch durable; link mode skips it (a process death keeps every
 * completed write).
 */
static bool sync_needed(const struct q2_batch *b)
{
	if (b->phase == PH_P1)
		return !(b->link_mode && b->rc_nosync);
	if (last_phase(b))
		return !b->link_mode;
	switch (b->phase) {
	case PH_P2:
		return b->strict;
	case PH_P3:
		return true; /* P4 follows: the header names the new L1 table */
	default:
		return true;
	}
}

static void write_done(struct io_cmd *cmd, int res)
{
	struct wb_run *r = cmd->priv;
	struct q2_batch *b = r->b;

	if (res < 0 && !b->err)
		b->err = res;
	if (--b->pending)
		return;
	/* the slices of this phase are on disk (not durable yet, but readable) */
	for (size_t i = b->ph_first[b->phase]; i < b->ph_first[b->phase + 1]; i++) {
		struct wb_item *it = &b->items[i];

		if (!it->slice || b->err)
			continue;
		it->written = true;
		if (it->kind == IT_FILL) {
			it->slice->fill = false;
		} else {
			it->slice->wb = false;
			it->slice->wb_side = false;
		}
	}
	if (b->err) {
		finish(b);
		return;
	}
	if (!sync_needed(b)) {
		phase_next(b);
		return;
	}
	if (b->phase == PH_P1)
		b->rc_synced = true;
	sync_start(b);
}

static int ensure_runs(struct q2_batch *b, size_t n)
{
	if (n > b->cap_runs) {
		struct wb_run *nr = realloc(b->runs, n * sizeof(*nr));

		if (!nr)
			return -ENOMEM;
		memset(nr + b->cap_runs, 0, (n - b->cap_runs) * sizeof(*nr));
		b->runs = nr;
		b->cap_runs = n;
	}
	if (n > b->cap_iov) {
		struct iovec *ni = realloc(b->iov, n * sizeof(*ni));

		if (!ni)
			return -ENOMEM;
		b->iov = ni;
		b->cap_iov = n;
	}
	return 0;
}

static void phase_run(struct q2_batch *b)
{
	struct qcow2 *q = b->q;
	size_t first = b->ph_first[b->phase], last = b->ph_first[b->phase + 1], nruns = 0;

	if (b->phase == PH_P2 && first < last && !b->side && !b->held) {
		unsigned hold = __atomic_load_n(&test_wb_hold_ms, __ATOMIC_RELAXED);

		if (hold) {
			/* integration.sidebatch waits for this line */
			Q2_LOG(q, WARN, "test seam: a write-back batch holds its L2 writes %u ms",
			       hold);
			b->held = true;
			b->hold_cmd.done = hold_done;
			b->hold_cmd.priv = b;
			io_timeout(q->loop, &b->hold_cmd, (uint64_t)hold * 1000000ull);
			return;
		}
	}
	if (first == last) {
		if (b->phase == PH_P1 && (!b->link_mode || !b->rc_nosync)) {
			/* always: data written in place must become durable (or, in
			 * link mode, refcounts an earlier link batch wrote unsynced) */
			b->rc_synced = true;
			sync_start(b);
		} else {
			phase_next(b);
		}
		return;
	}
	if (ensure_runs(b, last - first) < 0) {
		b->err = -ENOMEM;
		finish(b);
		return;
	}
	/* merge host-contiguous items into one writev each */
	for (size_t i = first; i < last; i++) {
		struct wb_item *it = &b->items[i];
		struct wb_run *r;

		if (nruns) {
			r = &b->runs[nruns - 1];
			struct wb_item *prev = &b->items[i - 1];

			if (prev->off + prev->len == it->off && r->iovcnt < 256) {
				b->iov[i - first] =
				    (struct iovec){b->stage + it->stage_off, it->len};
				r->iovcnt++;
				continue;
			}
		}
		r = &b->runs[nruns++];
		r->b = b;
		r->iov_first = i - first;
		r->iovcnt = 1;
		r->off = it->off;
		b->iov[i - first] = (struct iovec){b->stage + it->stage_off, it->len};
	}
	b->pending = (unsigned)nruns;
	for (size_t k = 0; k < nruns; k++) {
		struct wb_run *r = &b->runs[k];

		r->cmd.done = write_done;
		r->cmd.priv = r;
		q->n_meta_writes++;
		for (unsigned j = 0; j < r->iovcnt; j++)
			q->n_meta_bytes += b->iov[r->iov_first + j].iov_len;
		io_writev(q->loop, &r->cmd, q->file, &b->iov[r->iov_first], r->iovcnt, r->off);
	}
}

static void timer_arm(struct qcow2 *q);

/* An early link waits for a batch (and the test seam does not hold it back). */
static bool link_due(const struct qcow2 *q)
{
	return q->link_want && !__atomic_load_n(&test_link_delay_ms, __ATOMIC_RELAXED);
}

static void link_defer_arm(struct qcow2 *q);

/* A side batch wrote its slices (side_start: what that covers). */
static void side_written(struct qcow2 *q, const struct q2_batch *b)
{
	if (b->incomplete)
		return;
	if (q->batch) { /* the batch it ran beside, still in flight */
		if (b->gen > q->side_done_gen)
			q->side_done_gen = b->gen;
	} else if (q->meta_written_gen >= b->base_gen && b->gen > q->meta_written_gen) {
		q->meta_written_gen = b->gen;
	}
}

/*
 * finish() of a failed batch: the slice of @it is dirty again. One not
 * written yet is still held by its wb or fill flag, which go; one written
 * by an earlier phase was let go then and may have been evicted (what was
 * written is what a read finds) or be held by another batch now, so it is
 * looked up again by its offset, never through the old pointer.
 */
static void slice_back(struct wb_item *it)
{
	struct q2_slice *s = it->slice;

	if (it->written) {
		s = q2_cache_peek(it->cache, it->off - it->skip);
		if (s)
			q2_slice_dirty(s);
		return;
	}
	if (it->kind == IT_FILL) {
		s->fill = false;
	} else {
		s->wb = false;
		s->wb_side = false;
	}
	q2_slice_dirty(s);
}

/*
 * finish() of a batch short of memory (build: not b->side): what it left
 * out is still dirty, so its FLUSH and qcow2_link() waiters wait for the
 * next batch, which starts at once; one that took nothing made no progress
 * and fails them (-ENOMEM) instead of retrying for ever.
 */
static int requeue(struct qcow2 *q, const struct q2_batch *b, struct qcow2_flush **f,
		   struct qcow2_flush **l)
{
	struct qcow2_flush **heads[2] = {&q->flush_next, &q->link_next};
	struct qcow2_flush **lists[2] = {f, l};

	if (!b->nitems)
		return -ENOMEM;
	for (int i = 0; i < 2; i++) {
		struct qcow2_flush **pp = lists[i];

		if (!*pp)
			continue;
		while (*pp)
			pp = &(*pp)->next;
		*pp = *heads[i];
		*heads[i] = *lists[i];
		*lists[i] = NULL;
	}
	return 0;
}

static void batch_free(struct q2_batch *b)
{
	free(b->items);
	io_free_aligned(b->stage);
	free(b->runs);
	free(b->iov);
	free(b->decs.v);
	free(b);
}

static void finish(struct q2_batch *b)
{
	struct qcow2 *q = b->q;

	struct qcow2_flush *f = b->flushes, *l = b->links;
	int err = b->err;

	if (err) {
		/* Put everything back for a later batch. A new L2 table's slices
		 * go back as any others: its L1 entry may be written already, so
		 * until a durable batch started after this failure succeeds,
		 * batches sync L2 before L1. */
		q->wb_strict = true;
		q->wb_fail_seq = q->rc_seq;
		for (size_t i = 0; i < b->nitems; i++) {
			struct wb_item *it = &b->items[i];

			switch (it->kind) {
			case IT_SLICE:
			case IT_FILL:
				slice_back(it);
				break;
			case IT_RT_FULL:
			case IT_HDR_RT:
				q->rt_relocated = true;
				break;
			case IT_RT_SECTOR:
				if (!q->rt_relocated && it->off == q->rt_offset + it->index * 512)
					q2_wb_mark_rt(q, it->index * 64);
				break;
			case IT_L1_SECTOR:
				if (it->index * 64 < q->l1_size)
					q2_wb_mark_l1(q, (uint32_t)(it->index * 64));
				break;
			case IT_L1_FULL:
				q->l1_relocated = true;
				break;
			case IT_HDR_L1:
				q->hdr_dirty = true;
				break;
			}
		}
		for (size_t i = 0; i < b->decs.n; i++)
			q2_u64v_push(&q->dec_pending, b->decs.v[i]);
		b->decs.n = 0;
		if (q->wb_err != err)
			Q2_LOG(q, ERROR, "metadata write-back failed: %s (will retry)",
			       strerror(-err));
		q->wb_err = err;
	} else {
		q->wb_err = 0;
		if (!b->side)
			q->batches++;
		if (!b->side && !b->link_mode && !b->incomplete && b->rc_seq > q->wb_fail_seq)
			q->wb_strict = false;
		if (b->side) {
			side_written(q, b);
		} else if (!b->incomplete) {
			if (b->gen > q->meta_written_gen)
				q->meta_written_gen = b->gen;
			/* and the side batches beside it, everything after its snapshot */
			if (q->side_done_gen > q->meta_written_gen)
				q->meta_written_gen = q->side_done_gen;
		}
		if (b->link_mode || b->incomplete) {
			/* the pointer removals are written, not durable yet; or,
			 * short of memory, some are in what it left dirty (their
			 * clusters would be freed and reused while an entry on
			 * disk still names them): a later batch takes them */
			for (size_t i = 0; i < b->decs.n; i++)
				q2_u64v_push(&q->dec_pending, b->decs.v[i]);
			b->decs.n = 0;
		} else {
			q2_dec_durable(q, &b->decs);
		}
	}
	if (b->grow_hdr) {
		b->grow_hdr = false;
		if (!err)
			q2_grow_written(q);
		q2_grow_done(q, err);
	}
	b->flushes = NULL;
	b->links = NULL;
	if (!err && b->incomplete && !b->side && (f || l))
		err = requeue(q, b, &f, &l);
	if (b->side) {
		q->side = NULL;
		q->side_spare = b;
		if (err)
			q->side_done_gen = 0;
		if (l && !err && (q->batch || q->meta_written_gen < b->base_gen)) {
			/* its waiters may also need what the batch beside it writes:
			 * they wait for it, or, when it did not write everything
			 * (it failed), for the next batch */
			struct qcow2_flush **pp = q->batch ? &q->batch->links : &q->link_next;

			while (*pp)
				pp = &(*pp)->next;
			*pp = l;
			l = NULL;
			if (!q->batch)
				q->wb_wanted = true;
		}
	} else if (b->tail) {
		/* q->batch, if any, is the batch started beside it */
		q->wb_tail = NULL;
		b->tail = false;
		if (!q->batch_spare)
			q->batch_spare = b;
		else
			batch_free(b);
	} else {
		q->batch = NULL;
		if (!q->batch_spare)
			q->batch_spare = b;
		else
			batch_free(b); /* the tail's went back first */
		q->side_done_gen = 0;
	}
	while (f) {
		struct qcow2_flush *next = f->next;

		f->next = NULL;
		f->done(f, err);
		f = next;
	}
	while (l) {
		struct qcow2_flush *next = l->next;

		link_release(q, l, err);
		l = next;
	}
	if (!q->batch && (q->wb_wanted || q->flush_next || q->link_next || link_due(q))) {
		q->wb_wanted = false;
		if (!err || q->flush_next || q->link_next || link_due(q))
			q2_wb_kick(q);
	}
	if (q->batch && (q->link_want || q->link_next))
		link_defer_arm(q); /* another side batch, perhaps */
	q2_cache_trim(&q->l2c);
	q2_cache_trim(&q->rcc);
	q2_wb_maybe(q);
	timer_arm(q);
}

static void wb_start(struct qcow2 *q)
{
	struct q2_batch *b;

	if (q->batch || q->side) {
		q->wb_wanted = true;
		return;
	}
	if (q->read_only && !q->flush_next && !q->link_next && !q->link_want)
		return;
	b = q->batch_spare;
	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b) {
			Q2_LOG(q, ERROR, "out of memory for metadata write-back");
			return;
		}
		b->q = q;
	}
	q->batch_spare = NULL;
	q->batch = b;
	if (q->wb_tail)
		q->n_tail_starts++;
	b->side = false;
	b->tail = false;
	b->held = false;
	b->err = 0;
	b->phase = PH_P1;
	b->syncing = false;
	b->flushes = q->flush_next;
	q->flush_next = NULL;
	b->links = q->link_next;
	q->link_next = NULL;
	/* Durable unless only qcow2_link() waiters asked for this batch; the
	 * timer and a pile of decrements (freed clusters are reused only once
	 * their pointer removal is durable) make it durable anyway, so a
	 * guest that never flushes still gets both. */
	b->link_mode = (b->links || q->link_want) && !b->flushes && !q->wb_durable_wanted &&
		       q->dec_pending.n < 4096 && !q->l1_relocated && !q->hdr_dirty;
	q->wb_durable_wanted = false;
	q->link_want = false;
	b->gen = q->meta_gen;
	b->rc_seq = ++q->rc_seq;
	b->incomplete = false;
	b->rc_synced = false;
	b->grow_hdr = false;
	b->strict = q->wb_strict;
	/* the decrements whose pointer removal this batch makes durable */
	{
		struct q2_u64v t = b->decs;

		b->decs = q->dec_pending;
		q->dec_pending = t;
		q->dec_pending.n = 0;
	}
	if (q->read_only) {
		memset(b->ph_first, 0, sizeof(b->ph_first));
		b->nitems = 0;
	} else {
		build(b);
	}
	/* Link mode may skip the refcount sync when what it links needs only
	 * refcounts an earlier batch synced, and no refcount block is linked. */
	b->rc_nosync = b->link_mode && q->link_need <= q->rc_durable &&
		       b->ph_first[PH_P1B] == b->ph_first[PH_P2] && !b->p1_tables;
	phase_run(b);
}

void qcow2_wb_tune(uint32_t bridge, bool whole_slices, uint32_t xtab)
{
	bridge_max = bridge;
	wb_span_off = whole_slices;
	xtab_max = xtab;
}

void qcow2_test_link_delay(unsigned ms)
{
	__atomic_store_n(&test_link_delay_ms, ms, __ATOMIC_RELAXED);
}

void qcow2_test_wb_hold(unsigned ms)
{
	__atomic_store_n(&test_wb_hold_ms, ms, __ATOMIC_RELAXED);
}

void qcow2_test_sync_delay(unsigned ms)
{
	__atomic_store_n(&test_sync_delay_ms, ms, __ATOMIC_RELAXED);
}

void qcow2_test_wb_nomem(unsigned nth)
{
	__atomic_store_n(&test_nomem_left, nth, __ATOMIC_RELAXED);
}

static void link_post_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	(void)res;
	q->link_posted = false;
	if (q->link_want)
		q2_wb_kick(q);
}

/*
 * A side batch: a link batch that starts while a batch is in flight
 * (instead of after it), so that an early-linked write waits for about one
 * metadata write, not for the rest of the batch in flight and then its own.
 * It takes L2 slices only, in link mode (no sync), and only where that
 * cannot reorder anything (HACKING.md, "Side batches"):
 *  - never a slice under write-back or being written as a gap filler by the
 *    batch in flight (two writes of the same bytes in flight at once could
 *    land in either order): such a slice stays dirty for a later batch, and
 *    the side batch is then incomplete. A complete one holds every L2 change
 *    made after that batch's snapshot (a meta_gen bump since: base_gen <
 *    gen); an incomplete one only those in the slices it took;
 *  - no L1 change is dirty or in the batch in flight (P3, P4): every L2
 *    table it writes is already linked from an L1 entry that was written;
 *  - every cluster an entry links has a durable refcount (link_need <=
 *    rc_durable): no refcount write needs to precede it, on any crash;
 *  - one side batch at a time, and no batch starts while one runs (wb_start):
 *    a durable batch built after it finds its writes complete, so its
 *    fdatasync covers them before it releases any cluster whose pointer
 *    removal the side batch wrote (decrements are never a side batch's).
 * Its waiters (side_covers: generations in (base_gen, gen], and, when it is
 * incomplete, only those whose changes are all in one slice it took)
 * complete when it and the batch beside it have both ended: a request may
 * also depend on an entry that batch is writing (an in-place part of the
 * same request); if that batch failed, they wait for the next one.
 */
static bool side_covers(struct qcow2 *q, const struct q2_batch *b, uint64_t gen, uint64_t slice)
{
	struct q2_slice *s;

	if (gen <= b->base_gen || gen > b->gen)
		return false;
	if (!b->incomplete)
		return true;
	s = slice ? q2_cache_peek(&q->l2c, slice) : NULL;
	return s && s->wb && s->wb_side;
}

static bool side_start(struct qcow2 *q)
{
	struct q2_batch *m = q->batch, *b;
	struct qcow2_flush **pp;
	struct q2_slice *s;

	if (!m || q->side || q->read_only || q->closing || !q->l2c.ndirty ||
	    q->meta_gen <= m->gen || q->link_need > q->rc_durable || q->l1_ndirty ||
	    q->l1_relocated || q->hdr_dirty || m->ph_first[PH_P3] != m->ph_first[PH_N])
		return false;
	for (s = q->l2c.dirty; s; s = s->dnext)
		if (!s->wb && !s->fill)
			break;
	if (!s)
		return false; /* nothing it could take */
	b = q->side_spare;
	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b)
			return false;
		b->q = q;
	}
	q->side_spare = NULL;
	q->side = b;
	b->side = true;
	b->err = 0;
	b->phase = PH_P2;
	b->syncing = false;
	b->flushes = NULL;
	b->links = NULL;
	b->link_mode = true;
	b->rc_nosync = true;
	b->gen = q->meta_gen;
	b->base_gen = m->gen;
	b->rc_seq = 0;
	b->incomplete = false;
	b->rc_synced = false;
	b->grow_hdr = false;
	b->decs.n = 0;
	b->nitems = 0;
	b->stage_used = 0;
	b->ph_first[PH_P1] = b->ph_first[PH_P1B] = b->ph_first[PH_P2] = 0;
	b->strict = false;
	b->p1_tables = 0;
	take_slices(b, &q->l2c, TAKE_OLD); /* a new table goes with its L1 entry */
	sort_items(b, 0);
	bridge(b, &q->l2c, 0);
	b->ph_first[PH_P3] = b->ph_first[PH_P4] = b->ph_first[PH_N] = b->nitems;
	if (!b->incomplete)
		q->link_want = false;
	/* the waiters it covers */
	for (pp = &q->link_next; *pp;) {
		struct qcow2_flush *f = *pp;

		if (side_covers(q, b, f->gen, f->slice)) {
			*pp = f->next;
			f->next = b->links;
			b->links = f;
		} else {
			pp = &f->next;
		}
	}
	q->n_side_batches++;
	phase_run(b);
	return true;
}

static void link_defer_run(struct io_defer *d)
{
	struct qcow2 *q = d->priv;

	io_defer_del(q->loop, d);
	q->link_deferred = false;
	if (!q->link_want && !q->link_next)
		return;
	if (!q->batch)
		q2_wb_kick(q);
	else if (!side_start(q))
		q->wb_wanted = true;
}

static void link_defer_arm(struct qcow2 *q)
{
	if (q->link_deferred)
		return;
	q->link_deferred = true;
	q->link_defer.fn = link_defer_run;
	q->link_defer.priv = q;
	io_defer_add(q->loop, &q->link_defer);
}

/*
 * An early link (mapping.c) set L2 entries whose request will wait for them:
 * start a link batch at the end of this loop iteration (a deferred hook, so
 * the requests mapped in this iteration share it, and its writes go to the
 * kernel in the same io_uring_enter as their data writes: one block plug,
 * one doorbell, and no extra loop iteration before they start), or right
 * after the batch in flight.
 */
void q2_wb_link_soon(struct qcow2 *q)
{
	unsigned delay = __atomic_load_n(&test_link_delay_ms, __ATOMIC_RELAXED);

	q->link_want = true;
	if (!delay) {
		if (q->batch)
			q->wb_wanted = true; /* unless a side batch takes it */
		link_defer_arm(q);
		return;
	}
	if (q->link_posted)
		return;
	/* test seam: nothing but the timer (or a waiter's qcow2_link) starts it */
	q->link_posted = true;
	q->link_cmd.done = link_post_done;
	q->link_cmd.priv = q;
	io_timeout(q->loop, &q->link_cmd, (uint64_t)delay * 1000000ull);
}

void q2_wb_kick(struct qcow2 *q)
{
	if (q->batch) {
		q->wb_wanted = true;
		return;
	}
	if (has_work(q))
		wb_start(q);
}

static void timer_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	q->timer_armed = false;
	if (res == -ECANCELED || q->closing)
		return;
	q->wb_durable_wanted = true;
	q2_wb_kick(q);
	timer_arm(q);
}

static void timer_arm(struct qcow2 *q)
{
	if (q->timer_armed || q->closing || q->read_only || !has_work(q))
		return;
	q->timer_armed = true;
	q->timer_cmd.done = timer_done;
	q->timer_cmd.priv = q;
	io_timeout(q->loop, &q->timer_cmd, (uint64_t)q->writeback_ms * 1000000ull);
}

/* True if @c can hold @bytes of metadata without ever evicting. */
static bool cache_covers(const struct q2_cache *c, uint64_t bytes)
{
	return (uint64_t)c->soft_max * c->slice_size >= bytes;
}

void q2_wb_maybe(struct qcow2 *q)
{
	/*
	 * Dirty slices are written back early only to keep clean, evictable
	 * slices around. A cache that can hold all the metadata of its kind
	 * never evicts: its dirty slices wait for a flush or the timer, so a
	 * workload that dirties every slice (subcluster allocation on an
	 * extended-L2 image) does not write back, and fdatasync, non-stop.
	 */
	uint64_t l2_bytes = ((q->size + (q->cs << q->l2_bits) - 1) >> (q->cb + q->l2_bits))
			    << q->cb;
	uint64_t rc_bytes = ((q2_host_end(q) >> q->cb >> q->rb_bits) + 1) << q->cb;
	size_t dirty = 0, limit = 0;
	bool bounded = false;

	if (!cache_covers(&q->l2c, l2_bytes)) {
		dirty += q->l2c.ndirty;
		limit += q->l2c.soft_max;
		bounded = true;
	}
	if (!cache_covers(&q->rcc, rc_bytes)) {
		dirty += q->rcc.ndirty;
		limit += q->rcc.soft_max;
		bounded = true;
	}
	limit /= 2;
	if (limit < 64)
		limit = 64;
	if ((bounded && dirty > limit) || q->dec_pending.n >= 4096 || q2_cache_over(&q->l2c) ||
	    q2_cache_over(&q->rcc)) {
		q2_wb_kick(q);
		return;
	}
	timer_arm(q);
}

void qcow2_flush(struct qcow2 *q, struct qcow2_flush *f)
{
	struct qcow2_flush **pp = &q->flush_next;

	while (*pp)
		pp = &(*pp)->next;
	f->next = NULL;
	*pp = f;
	if (q->batch)
		q->wb_wanted = true;
	else
		wb_start(q);
}

/*
 * A dirty slice goes out with the next batch (any batch started from now on
 * has a generation >= the current one); one only under write-back with the
 * batch in flight (one batch at a time), whose generation covers every
 * change it took; any other is on disk as cached.
 */
uint64_t q2_wb_slice_gen(const struct qcow2 *q, const struct q2_slice *s)
{
	if (s->dirty)
		return q->meta_gen;
	if (s->wb && s->wb_side && q->side)
		return q->side->gen;
	if (s->wb && q->batch)
		return q->batch->gen;
	return 0;
}

uint64_t qcow2_meta_gen(const struct qcow2 *q)
{
	return q->meta_gen;
}

int qcow2_link(struct qcow2 *q, uint64_t gen, struct qcow2_flush *f)
{
	return qcow2_link_slice(q, gen, 0, f);
}

int qcow2_link_slice(struct qcow2 *q, uint64_t gen, uint64_t slice, struct qcow2_flush *f)
{
	struct qcow2_flush **pp = &q->link_next;

	if (gen <= q->meta_written_gen)
		return 0;
	f->gen = gen;
	f->slice = slice;
	f->mark = q->n_syncs_done;
	f->t0 = q2_now_ns();
	if (q->batch && q->batch->gen >= gen && !q->batch->incomplete) {
		/* the batch in flight took it (an early link, or an in-place
		 * write through an entry it is writing): wait for that one */
		pp = &q->batch->links;
		while (*pp)
			pp = &(*pp)->next;
		f->next = NULL;
		*pp = f;
		return 1;
	}
	if (q->side && side_covers(q, q->side, gen, slice)) {
		/* the side batch holds the changes (side_start) */
		f->next = q->side->links;
		q->side->links = f;
		return 1;
	}
	if (q->batch && slice && gen > q->batch->gen) {
		const struct q2_slice *s = q2_cache_peek(&q->l2c, slice);

		if (!s || (!s->dirty && !s->wb)) {
			/* changed after the snapshot of the batch in flight and
			 * written since: by a side batch, whose waiters also wait
			 * for the batch beside it */
			pp = &q->batch->links;
			while (*pp)
				pp = &(*pp)->next;
			f->next = NULL;
			*pp = f;
			return 1;
		}
	}
	while (*pp)
		pp = &(*pp)->next;
	f->next = NULL;
	*pp = f;
	if (q->batch) {
		q->wb_wanted = true;
		link_defer_arm(q); /* a side batch may take it */
	} else {
		wb_start(q);
	}
	return 1;
}

static bool busy(const struct qcow2 *q)
{
	return q->batch || q->side || q->wb_tail || q->link_posted || q->link_deferred ||
	       q->dec_running || q->grace_running || q->dec_apply.n || q->prealloc_busy ||
	       q->wake_armed || q->corrupt_hdr_busy || q->punch_busy || q->zah_busy;
}

int q2_wb_close(struct qcow2 *q)
{
	int err = 0;

	for (int round = 0; round < 100000; round++) {
		int ret;

		if (!q->batch && !q->read_only && has_work(q)) {
			wb_start(q);
			if (q->batch && q->batch->err)
				err = q->batch->err;
		}
		if (!busy(q))
			break;
		ret = io_loop_run_once(q->loop, true);
		if (ret < 0) {
			err = ret;
			break;
		}
		if (q->wb_err)
			err = q->wb_err;
		if (q->wb_err && !q->batch && !q->side && has_work(q) && round > 3)
			break; /* keeps failing */
	}
	q->closing = true;
	if (q->timer_armed) {
		io_cancel(q->loop, &q->timer_cmd);
		for (int i = 0; i < 1000 && q->timer_armed; i++)
			if (io_loop_run_once(q->loop, true) < 0)
				break;
	}
	if (!err && q->wb_err)
		err = q->wb_err;
	return err;
}

void q2_wb_exit(struct qcow2 *q)
{
	struct q2_batch *b = q->batch_spare;

	if (q->link_deferred) {
		io_defer_del(q->loop, &q->link_defer);
		q->link_deferred = false;
	}
	if (q->batch || q->side || q->wb_tail) /* abandoned (loop failure): its commands
						* can no longer complete */
		return;
	for (int i = 0; i < 2; i++, b = q->side_spare)
		if (b)
			batch_free(b);
	q->batch_spare = q->side_spare = NULL;
}

int qcow2_set_read_only(struct qcow2 *q, bool read_only)
{
	if (!read_only) {
		if (!q->rw_open)
			return -EROFS;
		q->read_only = false;
		q->gave_back = false;
		q2_zah_start(q, q->zah_want);
		if (q2_bitmap_frozen(q)) { /* its bitmaps stored for a read-only node */
			int ret = q2_bitmap_thaw(q);

			if (ret < 0) {
				q->read_only = true;
				return ret;
			}
		}
		return 0;
	}
	if (q->read_only)
		return 0;
	if (q2_bitmap_tracking(q))
		return -ENOTSUP;
	/* Reserved clusters go back first; their refcounts are then written back. */
	if (q->resv_next < q->resv_end) {
		q2_resv_release(q);
		return -EAGAIN;
	}
	if (q->zah_busy)
		q2_zah_stop(q, false); /* cut short: -EAGAIN for one step at most */
	if (q->tokens || has_work(q) || busy(q))
		return -EAGAIN;
	/* what is free goes back to the file system, while we hold the write lock */
	if (q2_alloc_give_back(q) < 0)
		return -EAGAIN;
	q2_zah_forget(q);
	q->read_only = true;
	return 0;
}
