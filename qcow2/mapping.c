/* SPDX-License-Identifier: MIT */
/*
 * qcow2/mapping.c — guest-to-host mapping for reads and writes, allocation
 * tokens, discard and write-zeroes.
 *
 * Every step is idempotent: it either completes (changing state) or parks
 * the caller's waiter and returns -EAGAIN without having changed anything
 * the re-run would trip over.
 *
 * Entry validity: an L2 slice is checked once when loaded (q2_l2_validate);
 * slices with a bad entry are "suspect" and their entries are re-checked on
 * every use. Invalid entries (reserved bits, misaligned, past the end of the
 * file, allocated-and-zero subclusters...) fail reads and writes of their
 * cluster with -EIO and mark the image corrupt; entries pointing at metadata
 * can be read but writing them is refused the same way.
 *
 * Locks: a write that needs metadata changes holds a token on its guest
 * clusters; other metadata-changing steps on those clusters wait for it.
 * Reads and in-place writes never wait: an allocation in progress does not
 * change the mapping they see until qcow2_alloc_finish().
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum entry_check {
	E_OK = 0,
	E_META = 1, /* points at metadata: reading is harmless, writing is not */
	E_BAD = 2,
};

enum token_kind {
	TK_NEW_STD = 1, /* new clusters, standard L2 entries */
	TK_NEW_SC,      /* extended L2: new cluster, only the written subclusters allocated */
	TK_NEW_FULL,    /* extended L2: new cluster replacing a compressed/shared one */
	TK_META_ZERO,   /* standard: preallocated zero cluster written in place */
	TK_META_SC,     /* extended L2: unallocated subclusters of an allocated cluster */
};

#define SC_ALL 0xffffffffu

static inline uint32_t slice_lg(const struct qcow2 *q)
{
	return (uint32_t)__builtin_ctz(q->slice_size);
}

/*
 * Check one L2 entry. *why names the problem. @gap, when not NULL, carries
 * the metadata-free run of the previous entry's check (q2_l2_validate).
 */
static int entry_check_gap(const struct qcow2 *q, uint64_t e, uint64_t bm, const char **why,
			   struct q2_meta_gap *gap)
{
	uint64_t host;

	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t off = qcow2_compressed_offset(e, q->cb);

		if (q->ext_data) {
			*why = "compressed cluster in an image with an external data file";
			return E_BAD;
		}
		if (q->extl2 && bm) {
			*why = "compressed cluster with a non-zero subcluster bitmap";
			return E_BAD;
		}
		if (off >= QCOW2_MAX_HOST_OFFSET || off >= q2_host_end(q)) {
			*why = "compressed cluster offset past the end of the file";
			return E_BAD;
		}
		/* its host clusters are freed when it is discarded or rewritten */
		if (q2_meta_overlaps(q, off, qcow2_compressed_len(e, q->cb))) {
			*why = "compressed cluster overlaps metadata";
			return E_META;
		}
		return E_OK;
	}
	if (e & (QCOW2_L2E_STD_RESERVED_MASK | (q->extl2 ? QCOW2_OFLAG_ZERO : 0))) {
		*why = "reserved bits set in an L2 entry";
		return E_BAD;
	}
	if ((e & QCOW2_OFLAG_ZERO) && q->h.version < 3) {
		*why = "zero flag in a version 2 image";
		return E_BAD;
	}
	host = e & QCOW2_L2E_OFFSET_MASK;
	if (host & (q->cs - 1)) {
		*why = "cluster offset not aligned to the cluster size";
		return E_BAD;
	}
	if (q->extl2) {
		if ((bm & QCOW2_SC_ALLOC_MASK) & (bm >> 32)) {
			*why = "subcluster both allocated and zero";
			return E_BAD;
		}
		if ((bm & QCOW2_SC_ALLOC_MASK) && !host &&
		    !(q->ext_data && (e & QCOW2_OFLAG_COPIED))) {
			*why = "allocated subclusters without a cluster offset";
			return E_BAD;
		}
	}
	if (!host || q->ext_data)
		return E_OK;
	/* Only the start must be inside the file, as for qemu-img check: with
	 * extended L2 entries QEMU writes just the allocated subclusters of a new
	 * cluster, so the file may end inside the last one; data reads past the
	 * end of the file return zeroes (the data handle has IO_FILE_ZERO_EOF). */
	if (host >= q2_host_end(q)) {
		*why = "cluster offset past the end of the file";
		return E_BAD;
	}
	if (gap ? q2_meta_overlaps_cluster(q, host >> q->cb, gap)
		: q2_meta_overlaps(q, host, q->cs)) {
		*why = "data cluster overlaps metadata";
		return E_META;
	}
	return E_OK;
}

static int entry_check(const struct qcow2 *q, uint64_t e, uint64_t bm, const char **why)
{
	return entry_check_gap(q, e, bm, why, NULL);
}

void q2_l2_validate(struct qcow2 *q, struct q2_slice *s)
{
	uint32_t n = q->slice_size / q->l2e_size;
	struct q2_meta_gap gap = {1, 0}; /* empty: the first check searches */
	const char *why;

	s->suspect = false;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t bm, e = q2_l2_entry(s, i, &bm, q->extl2);

		if (!e && !bm)
			continue;
		if (entry_check_gap(q, e, bm, &why, &gap) != E_OK) {
			s->suspect = true;
			return;
		}
	}
}

/* Is the cluster allocated (standard descriptor)? */
static inline bool std_allocated(const struct qcow2 *q, uint64_t e)
{
	return (e & QCOW2_L2E_OFFSET_MASK) || (q->ext_data && (e & QCOW2_OFLAG_COPIED));
}

enum { SC_BACKING = 0, SC_DATA, SC_ZEROES };

/*
 * What subcluster @sc of a checked, non-compressed entry (e, bm) reads as,
 * through the format's one classifier: SC_DATA (host data), SC_ZEROES, or
 * SC_BACKING (unallocated: the backing file or zeroes). Without extended L2
 * the whole cluster is subcluster 0.
 */
static inline int sc_state(const struct qcow2 *q, uint64_t e, uint64_t bm, unsigned sc)
{
	switch (qcow2_subcluster_type(e, bm, sc, q->extl2, q->ext_data)) {
	case QCOW2_SCT_ZERO_ALLOC:
	case QCOW2_SCT_ZERO_PLAIN:
		return SC_ZEROES;
	case QCOW2_SCT_UNALLOC_ALLOC:
	case QCOW2_SCT_UNALLOC_PLAIN:
		return SC_BACKING;
	default:
		return SC_DATA; /* NORMAL; a checked entry is never INVALID here */
	}
}

/*
 * Locate the L2 slice of guest cluster @gc. Returns 1 if the L2 table is not
 * allocated, 0 with *soff and *idx set, or -EIO (corrupt L1 entry).
 */
static int l2_locate(struct qcow2 *q, uint64_t gc, uint64_t *soff, uint32_t *idx)
{
	uint64_t l1i = gc >> q->l2_bits, off, l2i;
	const char *why;

	if (l1i >= q->l1_size) {
		q2_corrupt(q, "guest cluster %llu beyond the L1 table", (unsigned long long)gc);
		return -EIO;
	}
	why = q2_l1_check(q, (uint32_t)l1i, &off);
	if (why) {
		q2_corrupt(q, "L1 entry %llu (0x%llx) is invalid (%s)", (unsigned long long)l1i,
			   (unsigned long long)q->l1[l1i], why);
		return -EIO;
	}
	if (!off)
		return 1;
	l2i = gc & ((1ull << q->l2_bits) - 1);
	*soff = off + ((l2i >> q->sl2_bits) << slice_lg(q));
	*idx = (uint32_t)(l2i & ((1ull << q->sl2_bits) - 1));
	return 0;
}

/* ---- read mapping ---- */

/* Append an extent, merging with the previous one. false if @max is reached. */
static bool emit_f(struct qcow2_extent *ext, unsigned *n, unsigned max, uint8_t type, uint64_t off,
		   uint64_t len, uint64_t host, uint8_t flags)
{
	if (*n) {
		struct qcow2_extent *p = &ext[*n - 1];

		if (p->type == type && p->off + p->len == off && p->flags == flags &&
		    (type == QCOW2_MAP_ZERO || type == QCOW2_MAP_UNALLOC ||
		     (type == QCOW2_MAP_DATA && p->host + p->len == host))) {
			p->len += len;
			return true;
		}
	}
	if (*n >= max)
		return false;
	ext[*n] = (struct qcow2_extent){
	    .type = type, .off = off, .len = len, .host = host, .flags = flags};
	(*n)++;
	return true;
}

static bool emit(struct qcow2_extent *ext, unsigned *n, unsigned max, uint8_t type, uint64_t off,
		 uint64_t len, uint64_t host)
{
	return emit_f(ext, n, max, type, off, len, host, 0);
}

static bool writable_in_place(const struct qcow2 *q, uint64_t e);

/* Unallocated range: backing data up to the backing file's size, zeroes after. */
static bool emit_unalloc(const struct qcow2 *q, struct qcow2_extent *ext, unsigned *n, unsigned max,
			 uint64_t off, uint64_t len)
{
	uint64_t bs = q->backing_size;

	if (bs == UINT64_MAX || off >= bs)
		return emit_f(ext, n, max, QCOW2_MAP_ZERO, off, len, 0, QCOW2_EXT_UNALLOC);
	if (off + len <= bs)
		return emit(ext, n, max, QCOW2_MAP_UNALLOC, off, len, 0);
	if (!emit(ext, n, max, QCOW2_MAP_UNALLOC, off, bs - off, 0))
		return false;
	return emit_f(ext, n, max, QCOW2_MAP_ZERO, bs, off + len - bs, 0, QCOW2_EXT_UNALLOC);
}

/*
 * Map [pos, pos + len) inside one guest cluster with entry (e, bm). Returns
 * the bytes covered (a prefix if extents ran out), 0 if none fit.
 */
static uint64_t map_cluster(const struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t pos,
			    uint64_t len, struct qcow2_extent *ext, unsigned *n, unsigned max)
{
	uint64_t co = pos & (q->cs - 1), host = e & QCOW2_L2E_OFFSET_MASK, done = 0;

	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t coff = qcow2_compressed_offset(e, q->cb);
		uint64_t clen = qcow2_compressed_len(e, q->cb), end = q->file->size;

		/*
		 * The sector count rounds the data up to 512 bytes, but QEMU writes
		 * only the compressed bytes: the last compressed cluster of a file
		 * may end short of its last sector. Read up to the end of the file
		 * as it was at open (we never write compressed data); the rest was
		 * never part of the stream. A short read past EOF would fail.
		 */
		if (coff + clen > end)
			clen = end > coff ? end - coff : 0;
		if (*n >= max)
			return 0;
		ext[*n] = (struct qcow2_extent){.type = QCOW2_MAP_COMPRESSED,
						.off = pos,
						.len = len,
						.host = coff,
						.clen = (uint32_t)clen,
						.coff = (uint32_t)co};
		(*n)++;
		return len;
	}
	if (!q->extl2) {
		int state = sc_state(q, e, bm, 0);
		bool ok;

		if (state == SC_ZEROES)
			ok = emit(ext, n, max, QCOW2_MAP_ZERO, pos, len, 0);
		else if (state == SC_DATA)
			ok = emit_f(ext, n, max, QCOW2_MAP_DATA, pos, len, host + co,
				    writable_in_place(q, e) ? QCOW2_EXT_INPLACE : 0);
		else
			ok = emit_unalloc(q, ext, n, max, pos, len);
		return ok ? len : 0;
	}
	while (done < len) {
		uint64_t p = co + done;
		unsigned sc = (unsigned)(p >> q->sc_bits);
		uint64_t run_end = ((uint64_t)(sc + 1)) << q->sc_bits;
		int state = sc_state(q, e, bm, sc);
		bool ok;

		/* extend over following subclusters in the same state */
		while (run_end < co + len && run_end < q->cs) {
			unsigned s2 = (unsigned)(run_end >> q->sc_bits);
			int st2 = sc_state(q, e, bm, s2);

			if (st2 != state)
				break;
			run_end += 1ull << q->sc_bits;
		}
		if (run_end > co + len)
			run_end = co + len;
		if (state == SC_DATA)
			ok = emit(ext, n, max, QCOW2_MAP_DATA, pos + done, run_end - p, host + p);
		else if (state == SC_ZEROES)
			ok = emit(ext, n, max, QCOW2_MAP_ZERO, pos + done, run_end - p, 0);
		else
			ok = emit_unalloc(q, ext, n, max, pos + done, run_end - p);
		if (!ok)
			break;
		done = run_end - co;
	}
	return done;
}

/* @w NULL (peek): the first slice only, if cached and sound; never waits, never flags. */
static int map_read(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_extent *ext,
		    unsigned max, struct qcow2_waiter *w)
{
	uint64_t pos = off, end = off + len;
	unsigned n = 0;

	if (!len || !max || off >= q->size || len > q->size - off)
		return -EINVAL;
	while (pos < end) {
		uint64_t gc = pos >> q->cb, soff, piece, got, bm, e;
		struct q2_slice *s;
		uint32_t idx;
		int ret;

		ret = l2_locate(q, gc, &soff, &idx);
		if (ret < 0)
			return n ? (int)n : ret;
		if (ret == 1) {
			/* no L2 table: the rest of its range is unallocated */
			uint64_t tend = ((gc >> q->l2_bits) + 1) << (q->l2_bits + q->cb);

			piece = (tend < end ? tend : end) - pos;
			if (!emit_unalloc(q, ext, &n, max, pos, piece))
				break;
			pos += piece;
			continue;
		}
		s = q2_cache_peek(&q->l2c, soff);
		if (!w && (!s || s->suspect))
			break;
		if (!s) {
			if (n)
				break;
			ret = q2_cache_get(&q->l2c, soff, &s, w);
			if (ret < 0)
				return ret;
		}
		s->refbit = true;
		/* walk the entries of this slice */
		for (;;) {
			e = q2_l2_entry(s, idx, &bm, q->extl2);
			if (s->suspect) {
				const char *why;

				if (entry_check(q, e, bm, &why) == E_BAD) {
					q2_corrupt(q,
						   "L2 entry for guest offset 0x%llx (0x%llx): %s",
						   (unsigned long long)(gc << q->cb),
						   (unsigned long long)e, why);
					return n ? (int)n : -EIO;
				}
			}
			piece = ((gc + 1) << q->cb) - pos;
			if (piece > end - pos)
				piece = end - pos;
			got = map_cluster(q, e, bm, pos, piece, ext, &n, max);
			pos += got;
			if (got < piece || pos >= end)
				return (int)n;
			gc++;
			idx++;
			if (idx >= (1u << q->sl2_bits))
				break;
		}
		if (!w)
			break;
	}
	return (int)n;
}

int qcow2_map_read(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_extent *ext,
		   unsigned max, struct qcow2_waiter *w)
{
	return map_read(q, off, len, ext, max, w);
}

int qcow2_map_read_cached(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_extent *ext,
			  unsigned max)
{
	if (!len || !max || off >= q->size || len > q->size - off)
		return 0;
	return map_read(q, off, len, ext, max, NULL);
}
/* ---- locks and tokens ---- */

static struct qcow2_alloc *lock_find(struct qcow2 *q, uint64_t c0, uint64_t c1)
{
	for (struct qcow2_alloc *a = q->tokens; a; a = a->next)
		if (a->first_cluster < c1 && c0 < a->first_cluster + a->nclusters)
			return a;
	return NULL;
}

/* Park @w on a token overlapping [c0, c1); true if parked. */
static bool lock_wait(struct qcow2 *q, uint64_t c0, uint64_t c1, struct qcow2_waiter *w)
{
	struct qcow2_alloc *a = lock_find(q, c0, c1);

	if (!a)
		return false;
	w->next = a->waiters;
	a->waiters = w;
	return true;
}

/* Clusters in [c0, c0 + n) before the first one locked by another token. */
static uint64_t lock_free_prefix(struct qcow2 *q, uint64_t c0, uint64_t n)
{
	for (struct qcow2_alloc *a = q->tokens; a; a = a->next)
		if (a->first_cluster < c0 + n && c0 < a->first_cluster + a->nclusters)
			n = a->first_cluster > c0 ? a->first_cluster - c0 : 0;
	return n;
}

/* ---- L2 table allocation and copy-on-write ---- */

struct q2_l2cow {
	bool busy, ready;
	int err;
	uint32_t l1i;
	void *buf;
	struct io_cmd cmd;
	struct qcow2_waiter *waiters;
	struct qcow2 *q;
};

static struct q2_l2cow *l2cow_get(struct qcow2 *q);

static int new_l2_table(struct qcow2 *q, uint32_t l1i, const void *copy_from,
			struct qcow2_waiter *w)
{
	uint64_t host;
	bool fresh;
	int ret;

	ret = q2_alloc_clusters(q, 1, true, &host, &fresh, w);
	if (ret < 0)
		return ret;
	for (uint64_t o = 0; o < q->cs; o += q->slice_size) {
		struct q2_slice *s = q2_cache_new(&q->l2c, host + o);

		if (!s) {
			/*
			 * The slices made so far are dirty and will be written
			 * to the cluster: give it back only after a batch wrote
			 * them (a deferred decrement), or the data of whoever
			 * takes it from the free list next would be overwritten.
			 */
			if (o)
				q2_dec_range(q, host, q->cs);
			else
				q2_alloc_release(q, host, 1);
			return -ENOMEM;
		}
		if (copy_from) {
			memcpy(s->buf, (const uint8_t *)copy_from + o, q->slice_size);
			q2_l2_validate(q, s);
		}
		s->newtab = true; /* no L1 entry on disk reaches it yet */
	}
	if (q2_meta_add(q, host >> q->cb) < 0) {
		q2_dec_range(q, host, q->cs); /* the same: its slices go out first */
		return -ENOMEM;
	}
	q->l1[l1i] = host | QCOW2_OFLAG_COPIED;
	q2_wb_mark_l1(q, l1i);
	q->n_l2_new++;
	return 0;
}

static void l2cow_read_done(struct io_cmd *cmd, int res)
{
	struct q2_l2cow *c = cmd->priv;

	c->ready = true;
	c->err = res < 0 ? res : 0;
	q2_wake_list_later(c->q, &c->waiters, 0);
}

/* Copy the shared L2 table of L1 entry @l1i to a new cluster. */
static int l2_cow(struct qcow2 *q, uint32_t l1i, struct qcow2_waiter *w)
{
	struct q2_l2cow *c = l2cow_get(q);
	uint64_t old = q->l1[l1i] & QCOW2_L1E_OFFSET_MASK;
	int ret;

	if (!c)
		return -ENOMEM;
	if (c->busy && (c->l1i != l1i || !c->ready)) {
		w->next = c->waiters;
		c->waiters = w;
		return -EAGAIN;
	}
	if (!c->busy) {
		c->busy = true;
		c->ready = false;
		c->l1i = l1i;
		w->next = NULL;
		c->waiters = w;
		c->cmd.done = l2cow_read_done;
		c->cmd.priv = c;
		io_read(q->loop, &c->cmd, q->file, c->buf, q->cs, old);
		return -EAGAIN;
	}
	if (c->err) {
		ret = c->err;
		Q2_LOG(q, ERROR, "reading the shared L2 table at 0x%llx failed: %s",
		       (unsigned long long)old, strerror(-ret));
		goto out;
	}
	ret = new_l2_table(q, l1i, c->buf, w);
	if (ret == -EAGAIN)
		return ret; /* the copy stays ready for the re-run */
	if (ret == 0) {
		q2_dec_range(q, old, q->cs);
		q->n_cow++;
	}
out:
	c->busy = false;
	c->ready = false;
	q2_wake_list_later(q, &c->waiters, 0);
	return ret;
}

static struct q2_l2cow *l2cow_get(struct qcow2 *q)
{
	struct q2_l2cow *c = q->l2cow;

	if (c)
		return c;
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->buf = io_alloc_aligned(q->cs);
	if (!c->buf) {
		free(c);
		return NULL;
	}
	c->q = q;
	q->l2cow = c;
	return c;
}

void q2_mapping_exit(struct qcow2 *q)
{
	free(q->zk);
	q->zk = NULL;
	if (q->l2cow) {
		io_free_aligned(q->l2cow->buf);
		free(q->l2cow);
		q->l2cow = NULL;
	}
}

/*
 * Make the L2 table of guest cluster @gc writable (allocated, not shared).
 * 0 with *soff and *idx set, -EAGAIN, or -errno.
 */
static int l2_writable(struct qcow2 *q, uint64_t gc, uint64_t *soff, uint32_t *idx,
		       struct qcow2_waiter *w)
{
	uint32_t l1i = (uint32_t)(gc >> q->l2_bits);
	int ret = l2_locate(q, gc, soff, idx);

	if (ret < 0)
		return ret;
	if (ret == 1) {
		ret = new_l2_table(q, l1i, NULL, w);
		if (ret < 0)
			return ret;
		return l2_locate(q, gc, soff, idx);
	}
	if (!(q->l1[l1i] & QCOW2_OFLAG_COPIED)) {
		ret = l2_cow(q, l1i, w);
		if (ret < 0)
			return ret;
		return l2_locate(q, gc, soff, idx);
	}
	return 0;
}

/*
 * The L2 slice of guest cluster @gc, ready for a metadata change: no
 * allocation in flight on @gc, the L2 table the image's own (copied if it
 * was shared), the slice cached. 0 with *sp and *idx set, -EAGAIN (@w
 * parked) or -errno.
 */
static int l2_slice_for_change(struct qcow2 *q, uint64_t gc, struct q2_slice **sp, uint32_t *idx,
			       struct qcow2_waiter *w)
{
	uint64_t soff;
	int ret;

	if (lock_wait(q, gc, gc + 1, w))
		return -EAGAIN;
	ret = l2_writable(q, gc, &soff, idx, w);
	if (ret < 0)
		return ret;
	return q2_cache_get(&q->l2c, soff, sp, w);
}

/* Does the old content of guest range [off, off + len) inside cluster (e, bm) read as zeroes? */
static bool reads_zero(const struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t off, uint64_t len)
{
	bool beyond_backing = q->backing_size == UINT64_MAX || off >= q->backing_size;

	if (!len)
		return true;
	if (e & QCOW2_OFLAG_COMPRESSED)
		return false;
	/* without extended L2, sc_bits == cluster bits: one "subcluster" */
	for (uint64_t p = off & (q->cs - 1); p < (off & (q->cs - 1)) + len;
	     p = ((p >> q->sc_bits) + 1) << q->sc_bits) {
		int state = sc_state(q, e, bm, (unsigned)(p >> q->sc_bits));

		if (state == SC_DATA || (state == SC_BACKING && !beyond_backing))
			return false;
	}
	return true;
}

/* Statistics: an allocation whose head or tail keeps old content to copy. */
static void count_cow(struct qcow2 *q, const struct qcow2_alloc *a)
{
	if ((a->cow_start < a->off && !a->head_zero) ||
	    (a->cow_end > a->off + a->len && !a->tail_zero))
		q->n_data_cow++;
}

static void token_pin(struct qcow2 *q, struct qcow2_alloc *a, struct q2_slice *l2s, uint64_t host)
{
	a->l2_slice = l2s;
	l2s->pins++;
	a->rc_slice = NULL;
	if (a->new_host && !q->ext_data) {
		/* the refcount slice (cached: the allocation just used it), for a release */
		struct q2_slice *s = q2_rc_slice(q, host);

		if (s) {
			s->pins++;
			a->rc_slice = s;
		}
	}
	a->waiters = NULL;
	a->next = q->tokens;
	q->tokens = a;
}

/* A standard, allocated cluster we own alone (or in an external data file). */
static bool writable_in_place(const struct qcow2 *q, uint64_t e)
{
	return !(e & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO)) && std_allocated(q, e) &&
	       ((e & QCOW2_OFLAG_COPIED) || q->ext_data);
}

/* Subclusters [first, last] of a cluster as a mask. */
static uint32_t sc_mask(unsigned first, unsigned last)
{
	return qcow2_sc_range(first, last - first + 1);
}

/* ---- early link (extended L2, no backing file) ---- */

/* Test seam: qcow2_test_sc_link(). */
static bool test_sc_link;

void qcow2_test_sc_link(bool on)
{
	__atomic_store_n(&test_sc_link, on, __ATOMIC_RELAXED);
}

#define ZK_BITS 15

static struct q2_zk *zk_slot(const struct qcow2 *q, uint64_t host)
{
	uint64_t c = host >> q->cb;

	return &q->zk[(c * 0x9e3779b97f4a7c15ull) >> (64 - ZK_BITS)];
}

/* Host cluster @host's unallocated subclusters @mask hold zeroes (0: unknown). */
static void zk_set(struct qcow2 *q, uint64_t host, uint32_t mask)
{
	struct q2_zk *z;

	if (!q->zk) {
		if (!mask || !q->extl2 || q->ext_data || q->backing_size != UINT64_MAX)
			return;
		q->zk = calloc(1u << ZK_BITS, sizeof(*q->zk));
		if (!q->zk)
			return; /* only the early link is lost */
	}
	z = zk_slot(q, host);
	if (mask) {
		z->c = (host >> q->cb) + 1;
		z->mask = mask;
	} else if (z->c == (host >> q->cb) + 1) {
		z->c = 0;
	}
}

/* Which of @mask is known zero; those bits are forgotten (data goes there). */
static uint32_t zk_take(struct qcow2 *q, uint64_t host, uint32_t mask)
{
	struct q2_zk *z;
	uint32_t known;

	if (!q->zk)
		return 0;
	z = zk_slot(q, host);
	if (z->c != (host >> q->cb) + 1)
		return 0;
	known = z->mask & mask;
	z->mask &= ~mask;
	return known;
}

void q2_zk_forget(struct qcow2 *q, uint64_t host, uint64_t len)
{
	if (!q->zk || !len)
		return;
	for (uint64_t c = host >> q->cb; c <= (host + len - 1) >> q->cb; c++)
		zk_set(q, c << q->cb, 0);
}

/*
 * A write into unallocated subclusters of an allocated cluster (TK_META_SC):
 * set their allocation bits now, before the data is written, so that the
 * write-back batch writing the entry runs beside the data write instead of
 * after it (the request still completes only once both are written:
 * a->link_gen). Safe only where the subclusters read exactly the same with
 * the bits set before the data lands as without them, so that whatever a
 * process death or a power loss leaves (entry written, data not) reads as
 * before the write, which was never completed:
 *  - no backing file: an unallocated subcluster reads zeroes, not the
 *    backing file's data; no external data file (its clusters are not ours
 *    to have filled);
 *  - the host bytes of those subclusters are zeroes in the file: this
 *    engine took the cluster from fresh space (zeroes whether or not its
 *    fill is durable; a reused cluster's fill is not enough: the link
 *    batch of its entry may skip the fdatasync after it, rc_nosync in
 *    writeback.c) and nothing has written them since (q->zk: set when the
 *    allocating write ended, forgotten for every subcluster any later
 *    allocation maps, for a cluster whose pointer is removed, and at
 *    close). A subcluster that was allocated once and then discarded or
 *    zeroed keeps its old bytes: it is never known zero again;
 *  - the write covers whole subclusters (no COW head or tail: nothing of
 *    the old content is copied, and nothing else writes them meanwhile: the
 *    token holds the guest cluster, and an in-place write that sees the new
 *    bits writes only its own guest data, as it may beside any write);
 *  - the cluster is ours alone (COPIED, in a COPIED L2 table: no snapshot
 *    shares it); compressed clusters never take this path (TK_NEW_FULL).
 * A zero subcluster (zero bit) reads zeroes either way; the bits change as
 * qcow2_alloc_finish() would change them. Fresh space reads zeroes after a
 * power loss too, so that cannot expose older bytes either.
 */
static void early_link(struct qcow2 *q, struct qcow2_alloc *a, struct q2_slice *s, uint32_t idx,
		       uint64_t host)
{
	uint32_t m = a->sc_mask_first;
	uint32_t known = zk_take(q, host, m);
	uint64_t bm, e;

	if (known != m || q->no_early_link || q->backing_size != UINT64_MAX || q->ext_data ||
	    a->cow_start != a->off || a->cow_end != a->off + a->len)
		return;
	e = q2_l2_entry(s, idx, &bm, q->extl2);
	q2_l2_set(s, idx, e, (bm | m) & ~((uint64_t)m << 32), q->extl2);
	q2_slice_dirty_range(s, idx * q->l2e_size, q->l2e_size);
	q->meta_gen++;
	a->link_gen = q->meta_gen;
	a->link_slice = s->off;
	a->early = true;
	q->n_early_links++;
	q2_wb_link_soon(q);
}

/* Switch: qcow2_early_new(). */
static bool early_new_on;

void qcow2_early_new(bool on)
{
	__atomic_store_n(&early_new_on, on, __ATOMIC_RELAXED);
}

/* The subclusters token @a writes in its @i-th cluster (extended L2). */
static uint32_t alloc_sc_mask(const struct qcow2_alloc *a, uint32_t i)
{
	return i == 0 ? a->sc_mask_first : i == a->nclusters - 1 ? a->sc_mask_last : SC_ALL;
}

/* A token of new clusters linked at map time overlapping guest clusters [c0, c1). */
static struct qcow2_alloc *early_new_find(struct qcow2 *q, uint64_t c0, uint64_t c1)
{
	for (struct qcow2_alloc *a = q->tokens; a; a = a->next)
		if (a->early_new && a->first_cluster < c1 && c0 < a->first_cluster + a->nclusters)
			return a;
	return NULL;
}

/*
 * The early link of new clusters of fresh space (qcow2_early_new(), off by
 * default): link them in the cache now, at map time, so that the link batch
 * writing their L2 entries (q2_wb_link_soon: started at the end of this loop
 * iteration) runs beside the data write instead of after it. The request
 * still completes only when its data write ended and its entries are
 * written (a->link_gen, qcow2_link: the reconnect rule), so what changes is
 * only the order of two writes that are both in flight before the guest
 * sees a completion: the L2 entry may reach the file (and the disk) before
 * the data and fill.
 *
 * The order of writes, with the switch on, for such a cluster:
 *   refcount raise (the reserve's, in the cache since alloc_data; P1 of a
 *   batch, synced there unless an earlier batch made it durable:
 *   link_need <= rc_durable) -> L2 entry (P2 of the link batch, or P1 of a
 *   new table linked in P3)  ||  data + fill (one writev, alloc_write)
 *   -> the guest's completion (both ended).
 * Without it: data + fill -> (qcow2_alloc_finish) -> L2 entry -> completion.
 * The refcount still reaches the disk before the entry: the raise was made
 * (and link_need raised) before the entry was set, so every batch that takes
 * the entry takes or follows the raise, and writes or syncs it first as for
 * any link (a side batch only runs when link_need <= rc_durable).
 *
 * Why a crash (process death or power loss) at any point leaks clusters but
 * shows nothing the guest did not have: the entry points at a cluster whose
 * bytes, until the data write lands, are fresh space's (never handed out
 * since the file grew past it: a hole, an unwritten extent or past the end
 * of the file, all read as zeroes; never a reused freed cluster, whose old
 * bytes would show: q->alloc_from_free) or the fill's zeroes, and the guest
 * range had zeroes before (a guest cluster never allocated: entry 0, no
 * backing file, no external data file, no COW head or tail to copy), so a
 * crash shows the old contents (zeroes) or the new data of a write that was
 * never acknowledged; the cluster's refcount is durable before the entry
 * (above). With extended L2 and a caller that writes new clusters whole
 * (qcow2_set_fills_whole: img_qcow2.c's fill), all 32 allocation bits go
 * early, as qcow2_alloc_finish() would set them after the write: every
 * subcluster reads the fill's zeroes, fresh space's zeroes (also where a
 * write without data or a failed one wrote nothing) or the data; otherwise
 * only the written subclusters' bits go early and the rest (all 32 for a
 * cluster written whole after all) are set when the write ends. A crash before the entry is written
 * leaks the reserved cluster, as today; a failed data write keeps the
 * cluster linked (its range is undefined, the rest reads zeroes).
 *
 * Concurrency (the hazard): the entry is in the cached slice while the data
 * write and its fill are in flight; a write into the same cluster that took
 * the in-place path would go under the fill and be overwritten by it. So
 * qcow2_map_write() never maps a write in place into a cluster of such a
 * token: it parks on the token (early_new_find) and maps again when the
 * allocation ended (qcow2_alloc_finish wakes it). Discard, write-zeroes and
 * other allocations of the cluster park on the token already
 * (l2_slice_for_change, lock_free_prefix); a partial write-zeroes goes
 * through the write path. The I/O threads never see the entry before the
 * request completes: the request is on m->muts (img_qcow2.c) from submit to
 * completion, and nothing overlapping one is published to the fast table.
 * A read may map the cluster meanwhile and reads zeroes or the new data of
 * a write in flight, as a read beside any write. Nothing is freed or
 * remapped here, so the ticket rule is untouched.
 */
static void early_new_link(struct qcow2 *q, struct qcow2_alloc *a, struct q2_slice *s, uint32_t idx)
{
	uint64_t host0 = (a->host - (a->off & (q->cs - 1))) & ~(q->cs - 1);
	/* extended L2, a cluster the caller writes whole: all its bits now */
	bool whole = q->fills_whole && !__atomic_load_n(&test_sc_link, __ATOMIC_RELAXED);

	if (!__atomic_load_n(&early_new_on, __ATOMIC_RELAXED) || q->no_early_link || !a->new_host ||
	    !a->fresh || q->alloc_from_free || q->ext_data || q->backing_size != UINT64_MAX ||
	    !a->head_zero || !a->tail_zero || (a->kind != TK_NEW_STD && a->kind != TK_NEW_SC))
		return;
	/* Only clusters inside the file (a fallocate covering them ended): past
	 * its end, the data write is what extends the file over the cluster, and
	 * a process death between the entry's write and it would leave an entry
	 * past the end of the file, an error for qemu-img check, not a leak
	 * (unit.test_qcow2_engine "early link of new clusters: not past the end of
	 * the file"). */
	if (host0 + ((uint64_t)a->nclusters << q->cb) > q->prealloc_ok)
		return;
	for (uint32_t i = 0; i < a->nclusters; i++) {
		uint64_t bm, e = q2_l2_entry(s, idx + i, &bm, q->extl2);

		if (e || (q->extl2 && bm))
			return; /* never allocated, nothing to copy or release */
	}
	for (uint32_t i = 0; i < a->nclusters; i++) {
		uint32_t m = whole ? SC_ALL : alloc_sc_mask(a, i);

		q2_l2_set(s, idx + i, (host0 + ((uint64_t)i << q->cb)) | QCOW2_OFLAG_COPIED,
			  a->kind == TK_NEW_SC ? m : 0, q->extl2);
	}
	q2_slice_dirty_range(s, idx * q->l2e_size, a->nclusters * q->l2e_size);
	q->meta_gen++;
	a->link_gen = q->meta_gen;
	a->link_slice = s->off;
	a->early_new = true;
	q->early_new_live++;
	q->n_early_new++;
	q2_wb_link_soon(q);
}

/* May [off, off + len) be written or zeroed? 0, -EROFS, -EIO (corrupt) or -EINVAL. */
static int write_check(const struct qcow2 *q, uint64_t off, uint64_t len)
{
	if (q->read_only)
		return -EROFS;
	if (q->corrupt)
		return -EIO;
	if (!len || off >= q->size || len > q->size - off)
		return -EINVAL;
	return 0;
}

int qcow2_map_write(struct qcow2 *q, uint64_t off, uint64_t len, struct qcow2_alloc *a,
		    struct qcow2_waiter *w)
{
	uint64_t gc = off >> q->cb, co = off & (q->cs - 1), end = off + len;
	uint64_t soff, e, bm, host, nmax, k;
	struct q2_slice *s;
	const char *why;
	uint32_t idx, per_slice = 1u << q->sl2_bits;
	bool fresh;
	int ret;

	ret = write_check(q, off, len);
	if (ret < 0)
		return ret;

again:
	ret = l2_locate(q, gc, &soff, &idx);
	if (ret < 0)
		return ret;
	if (ret == 0 && (q->l1[gc >> q->l2_bits] & QCOW2_OFLAG_COPIED)) {
		s = q2_cache_peek(&q->l2c, soff);
		if (!s) {
			ret = q2_cache_get(&q->l2c, soff, &s, w);
			if (ret < 0)
				return ret;
		}
		e = q2_l2_entry(s, idx, &bm, q->extl2);
		if (s->suspect && entry_check(q, e, bm, &why) == E_BAD) {
			q2_corrupt(q, "L2 entry for guest offset 0x%llx (0x%llx): %s",
				   (unsigned long long)(gc << q->cb), (unsigned long long)e, why);
			return -EIO;
		}
		/* ---- fast path: in-place write to allocated clusters ---- */
		if (writable_in_place(q, e)) {
			uint64_t h0 = (e & QCOW2_L2E_OFFSET_MASK) + co, pos = off, cl = gc;
			uint64_t wend = end;
			uint32_t i = idx;

			if (q->early_new_live) {
				/* never under the data and fill of an allocation
				 * whose entry was linked early: early_new_link() */
				uint64_t lastc = (end - 1) >> q->cb, n;
				struct qcow2_alloc *t = early_new_find(q, gc, gc + 1);

				if (t) {
					w->next = t->waiters;
					t->waiters = w;
					return -EAGAIN;
				}
				for (n = 1;
				     gc + n <= lastc && !early_new_find(q, gc + n, gc + n + 1); n++)
					;
				if (gc + n <= lastc)
					wend = (gc + n) << q->cb;
			}

			for (;;) {
				uint64_t cend = (cl + 1) << q->cb, pend = cend < wend ? cend : wend;

				if (q->extl2) {
					uint64_t pco = pos & (q->cs - 1);
					unsigned f = (unsigned)(pco >> q->sc_bits);
					unsigned l =
					    (unsigned)((pco + (pend - pos) - 1) >> q->sc_bits);
					uint32_t m = sc_mask(f, l);

					if (((uint32_t)bm & m) != m) {
						unsigned run = 0;

						while (f + run <= l &&
						       (bm & QCOW2_SC_ALLOC(f + run)))
							run++;
						if (run) {
							uint64_t p2 =
							    (cl << q->cb) +
							    ((uint64_t)(f + run) << q->sc_bits);

							pos = p2 < wend ? p2 : wend;
						}
						break;
					}
				}
				pos = pend;
				if (pos >= wend || s->suspect || ++i >= per_slice)
					break;
				cl++;
				e = q2_l2_entry(s, i, &bm, q->extl2);
				if (!writable_in_place(q, e) ||
				    (e & QCOW2_L2E_OFFSET_MASK) != h0 - co + ((cl - gc) << q->cb))
					break;
			}
			if (pos > off) {
				a->off = off;
				a->len = pos - off;
				a->host = h0;
				/* its entry may be linked but not written yet */
				a->link_gen = q2_wb_slice_gen(q, s);
				a->link_slice = s->off;
				if (!q->ext_data && q2_meta_overlaps(q, h0, a->len)) {
					q2_corrupt(q,
						   "write to guest 0x%llx would overwrite metadata "
						   "at 0x%llx",
						   (unsigned long long)off, (unsigned long long)h0);
					return -EIO;
				}
				return QCOW2_WRITE_INPLACE;
			}
			/* extended L2: the first subcluster is not allocated; below */
		}
	}

	/* ---- slow path: metadata changes ---- */
	ret = l2_slice_for_change(q, gc, &s, &idx, w);
	if (ret < 0)
		return ret;
	e = q2_l2_entry(s, idx, &bm, q->extl2);
	if (s->suspect && entry_check(q, e, bm, &why) != E_OK) {
		q2_corrupt(q, "L2 entry for guest offset 0x%llx (0x%llx): %s",
			   (unsigned long long)(gc << q->cb), (unsigned long long)e, why);
		return -EIO;
	}
	memset(a, 0, offsetof(struct qcow2_alloc, next));
	a->early = false;
	a->early_new = false;
	a->first_cluster = gc;
	a->off = off;
	host = e & QCOW2_L2E_OFFSET_MASK;

	/* In place, metadata only: a preallocated zero cluster, or unallocated subclusters. */
	if (!(e & QCOW2_OFLAG_COMPRESSED) && std_allocated(q, e) &&
	    ((e & QCOW2_OFLAG_COPIED) || q->ext_data)) {
		uint64_t cbase = gc << q->cb, cend = cbase + q->cs;
		uint64_t dend = end < cend ? end : cend;

		if (!q->extl2 && !(e & QCOW2_OFLAG_ZERO))
			goto again; /* the table was just copied: in place now */
		if (q->extl2 && (bm & QCOW2_SC_ALLOC(co >> q->sc_bits)))
			goto again;
		if (!q->extl2) {
			/* preallocated zero cluster */
			a->kind = TK_META_ZERO;
			a->nclusters = 1;
			a->len = dend - off;
			a->host = host + co;
			a->cow_start = cbase;
			a->cow_end = cend;
			a->head_zero = a->tail_zero = true;
			a->fresh = false;
		} else {
			unsigned f = (unsigned)(co >> q->sc_bits);
			unsigned l = (unsigned)((dend - cbase - 1) >> q->sc_bits), last = f;

			while (last < l && !(bm & QCOW2_SC_ALLOC(last + 1)))
				last++;
			if (last < l)
				dend = cbase + ((uint64_t)(last + 1) << q->sc_bits);
			a->kind = TK_META_SC;
			a->nclusters = 1;
			a->sc_mask_first = sc_mask(f, last);
			a->len = dend - off;
			a->host = host + co;
			a->cow_start = cbase + ((uint64_t)f << q->sc_bits);
			a->cow_end = cbase + ((uint64_t)(last + 1) << q->sc_bits);
			a->head_zero = reads_zero(q, e, bm, a->cow_start, off - a->cow_start);
			a->tail_zero = reads_zero(q, e, bm, dend, a->cow_end - dend);
			a->fresh = false;
		}
		a->new_host = false;
		count_cow(q, a);
		token_pin(q, a, s, 0);
		if (a->kind == TK_META_SC)
			early_link(q, a, s, idx, host);
		return QCOW2_WRITE_ALLOC;
	}

	/* New clusters: count the run of clusters that need one, in this slice. */
	nmax = ((end - 1) >> q->cb) - gc + 1;
	if (nmax > per_slice - idx)
		nmax = per_slice - idx;
	if (nmax > 65536)
		nmax = 65536;
	for (k = 1; k < nmax; k++) {
		uint64_t bm2, e2 = q2_l2_entry(s, idx + (uint32_t)k, &bm2, q->extl2);

		if (s->suspect && entry_check(q, e2, bm2, &why) != E_OK)
			break;
		if (q->extl2) {
			/* runs of clusters with the same kind of replacement */
			bool full1 = (e & QCOW2_OFLAG_COMPRESSED) || host;
			bool full2 = (e2 & QCOW2_OFLAG_COMPRESSED) || (e2 & QCOW2_L2E_OFFSET_MASK);

			if (full1 != full2 || (!full2 && (bm2 & QCOW2_SC_ALLOC_MASK)))
				break;
		}
		if (!(e2 & QCOW2_OFLAG_COMPRESSED) && std_allocated(q, e2) &&
		    ((e2 & QCOW2_OFLAG_COPIED) || q->ext_data))
			break; /* allocated and writable: not part of this run */
	}
	nmax = lock_free_prefix(q, gc + 1, k - 1) + 1;
	if (q->ext_data) {
		a->host = (gc << q->cb) + co;
		fresh = false;
		ret = (int)nmax;
		a->new_host = false;
	} else {
		ret = q2_alloc_clusters(q, (uint32_t)nmax, false, &host, &fresh, w);
		if (ret < 0)
			return ret;
		a->host = host + co;
		a->new_host = true;
	}
	a->nclusters = (uint32_t)ret;
	{
		uint64_t cbase = gc << q->cb, rend = (gc + a->nclusters) << q->cb;
		uint64_t dend = end < rend ? end : rend;
		uint64_t lbm, le = q2_l2_entry(s, idx + a->nclusters - 1, &lbm, q->extl2);
		bool full = !q->extl2 || (e & QCOW2_OFLAG_COMPRESSED) ||
			    (e & QCOW2_L2E_OFFSET_MASK) || (e & QCOW2_OFLAG_COPIED);

		a->len = dend - off;
		a->fresh = fresh;
		if (full) {
			a->kind = q->extl2 ? TK_NEW_FULL : TK_NEW_STD;
			a->cow_start = cbase;
			a->cow_end = (dend & (q->cs - 1)) ? ((dend >> q->cb) + 1) << q->cb : dend;
		} else {
			unsigned f = (unsigned)(co >> q->sc_bits);
			unsigned l = (unsigned)(((dend - 1) & (q->cs - 1)) >> q->sc_bits);

			a->kind = TK_NEW_SC;
			a->sc_mask_first = a->nclusters == 1 ? sc_mask(f, l) : sc_mask(f, 31);
			a->sc_mask_last = sc_mask(0, l);
			a->cow_start = cbase + ((uint64_t)f << q->sc_bits);
			a->cow_end = (((dend - 1) >> q->sc_bits) + 1) << q->sc_bits;
		}
		a->head_zero = reads_zero(q, e, bm, a->cow_start, off - a->cow_start);
		a->tail_zero = reads_zero(q, le, lbm, dend, a->cow_end - dend);
	}
	count_cow(q, a);
	token_pin(q, a, s, host);
	early_new_link(q, a, s, idx);
	return QCOW2_WRITE_ALLOC;
}

void qcow2_alloc_finish(struct qcow2 *q, struct qcow2_alloc *a, int res)
{
	struct q2_slice *s = a->l2_slice;
	uint64_t host0 = (a->host - (a->off & (q->cs - 1))) & ~(q->cs - 1);
	uint32_t idx0 = (uint32_t)(a->first_cluster & ((1ull << q->sl2_bits) - 1));
	/*
	 * Extended L2, new clusters written whole by the caller (a->rest_zero:
	 * zeroes outside [cow_start, cow_end), in the same write as the data)
	 * from fresh space (a->fresh), no backing file, no external data file:
	 * every subcluster is linked as allocated, not only those written. The
	 * others read zeroes either way (unallocated: no backing; allocated:
	 * the zeroes just written, or fresh space's own where a power loss
	 * lost them), and later writes into them are plain in-place writes
	 * with no metadata to persist. Not a reused cluster: a link batch may
	 * write this entry with no fdatasync after the fill (its refcount made
	 * durable by a batch that ran while the write was in flight:
	 * rc_nosync), and the cluster's old bytes would then show where the
	 * guest never wrote. With a backing file the bits stay per subcluster
	 * (the others read the backing file).
	 */
	bool whole = a->kind == TK_NEW_SC && a->rest_zero && a->fresh && a->new_host &&
		     !q->ext_data && q->backing_size == UINT64_MAX &&
		     !__atomic_load_n(&test_sc_link, __ATOMIC_RELAXED);

	if (res >= 0 && !a->early && !a->early_new)
		q->meta_gen++; /* L2 entries linked: see qcow2_link() */
	for (struct qcow2_alloc **pp = &q->tokens; *pp; pp = &(*pp)->next) {
		if (*pp == a) {
			*pp = a->next;
			break;
		}
	}
	if (a->early_new) {
		/*
		 * Linked at map time (early_new_link): the entries stay, also
		 * when the write failed (the cluster is in use from the entry's
		 * point of view, which a batch may have written already; the
		 * failed range is undefined, the rest reads zeroes). Extended L2:
		 * a cluster written whole gets all its bits now unless it had
		 * them at map time (qcow2_set_fills_whole), as it would have here
		 * without the early link; this request does not wait for that
		 * change (those subclusters read zeroes either way).
		 */
		q->early_new_live--;
		if (res >= 0 && a->link_gen <= q->meta_written_gen)
			q->n_early_new_ahead++;
		if (res < 0 || a->kind != TK_NEW_SC)
			goto out;
		for (uint32_t i = 0; i < a->nclusters; i++) {
			uint64_t bm, e = q2_l2_entry(s, idx0 + i, &bm, q->extl2);
			uint64_t hc = host0 + ((uint64_t)i << q->cb);
			uint32_t m = alloc_sc_mask(a, i);

			if (bm == SC_ALL) {
				zk_set(q, hc, 0); /* linked whole at map time */
				continue;
			}
			if (whole) {
				q2_l2_set(s, idx0 + i, e, SC_ALL, q->extl2);
				q2_slice_dirty_range(s, (idx0 + i) * q->l2e_size, q->l2e_size);
				q->meta_gen++;
			}
			zk_set(q, hc, !whole ? ~m : 0);
		}
		goto out;
	}
	if (res < 0) {
		if (a->new_host)
			q2_alloc_release(q, host0, a->nclusters);
		/* early: its bits stay set (the range of a failed write is
		 * undefined; the subclusters still read zeroes or some of it) */
		goto out;
	}
	if (a->early)
		goto out; /* linked at map time: early_link() */
	if (!a->fresh && (a->new_host || a->cow_start != a->off || a->cow_end != a->off + a->len) &&
	    q->link_need <= q->rc_seq) {
		/*
		 * A reused cluster's old bytes are on disk under the new data and
		 * fill: the batch that writes this entry must sync them first,
		 * even in link mode whose refcounts a batch that ran while the
		 * write was in flight made durable (rc_nosync), or after a power
		 * loss the entry could show them where the guest never wrote.
		 * The same for a cluster allocated in place (a zero cluster that
		 * kept its host cluster, unallocated subclusters, an external
		 * data file) whose COW head or tail this write filled: its old
		 * bytes would show there (no new refcount: rc_nosync in any case).
		 */
		q->link_need = q->rc_seq + 1;
	}
	for (uint32_t i = 0; i < a->nclusters; i++) {
		uint64_t bm, e = q2_l2_entry(s, idx0 + i, &bm, q->extl2);
		uint64_t hc = host0 + ((uint64_t)i << q->cb), ne = e, nbm = bm;
		uint32_t m = alloc_sc_mask(a, i);

		switch (a->kind) {
		case TK_NEW_STD:
		case TK_NEW_FULL:
		case TK_NEW_SC:
			if (!q->ext_data) {
				if (e & QCOW2_OFLAG_COMPRESSED)
					q2_dec_range(q, qcow2_compressed_offset(e, q->cb),
						     qcow2_compressed_len(e, q->cb));
				else if (e & QCOW2_L2E_OFFSET_MASK)
					q2_dec_range(q, e & QCOW2_L2E_OFFSET_MASK, q->cs);
			}
			ne = hc | QCOW2_OFLAG_COPIED;
			if (a->kind == TK_NEW_FULL || (a->kind == TK_NEW_SC && whole))
				nbm = SC_ALL;
			else if (a->kind == TK_NEW_SC)
				nbm = (bm | m) & ~((uint64_t)m << 32);
			else
				nbm = 0;
			break;
		case TK_META_ZERO:
			ne = (e & ~QCOW2_OFLAG_ZERO) | QCOW2_OFLAG_COPIED;
			break;
		case TK_META_SC:
			nbm = (bm | m) & ~((uint64_t)m << 32);
			break;
		}
		q2_l2_set(s, idx0 + i, ne, nbm, q->extl2);
		/* known zeroes for an early link: fresh space only (the fill of
		 * a reused cluster may not be durable when the bits are) */
		if (a->kind == TK_NEW_SC)
			zk_set(q, hc, !whole && a->fresh ? ~m : 0);
	}
	q2_slice_dirty_range(s, idx0 * q->l2e_size, a->nclusters * q->l2e_size);
	a->link_gen = q->meta_gen;
	a->link_slice = s->off;
out:
	s->pins--;
	if (a->rc_slice)
		((struct q2_slice *)a->rc_slice)->pins--;
	a->l2_slice = a->rc_slice = NULL;
	q2_wake_list_later(q, &a->waiters, 0);
	q2_wb_maybe(q);
}

/* ---- discard / write zeroes ---- */

static int zero_partial(struct qcow2 *q, uint64_t off, uint64_t len, bool zero, uint64_t *done,
			struct qcow2_waiter *w)
{
	struct qcow2_extent x[1];
	int ret;

	if (!zero) {
		*done = len;
		return QCOW2_Z_SKIP;
	}
	ret = qcow2_map_read(q, off, len, x, 1, w);
	if (ret < 0)
		return ret;
	*done = x[0].len;
	return x[0].type == QCOW2_MAP_ZERO ? QCOW2_Z_SKIP : QCOW2_Z_WRITE;
}

static int zero_step(struct qcow2 *q, uint64_t off, uint64_t len, bool zero, bool unmap, bool full,
		     uint64_t *done_len, struct qcow2_waiter *w);

int qcow2_zero_step(struct qcow2 *q, uint64_t off, uint64_t len, bool zero, bool unmap,
		    uint64_t *done_len, struct qcow2_waiter *w)
{
	int ret = zero_step(q, off, len, zero, unmap, false, done_len, w);

	if (ret == QCOW2_Z_DONE)
		q->meta_gen++; /* L2 entries changed: see qcow2_link() */
	return ret;
}

int qcow2_discard_full_step(struct qcow2 *q, uint64_t off, uint64_t len, uint64_t *done_len,
			    struct qcow2_waiter *w)
{
	int ret = zero_step(q, off, len, false, true, true, done_len, w);

	if (ret >= 0 && *done_len > len)
		*done_len = len; /* the last, partial cluster */
	if (ret == QCOW2_Z_DONE)
		q->meta_gen++;
	return ret;
}

static int zero_step(struct qcow2 *q, uint64_t off, uint64_t len, bool zero, bool unmap, bool full,
		     uint64_t *done_len, struct qcow2_waiter *w)
{
	uint64_t gc = off >> q->cb, co = off & (q->cs - 1), n, soff;
	uint32_t idx, per_slice = 1u << q->sl2_bits;
	struct q2_slice *s;
	bool changed = false;
	int ret;

	ret = write_check(q, off, len);
	if (ret < 0)
		return ret;
	*done_len = 0;
	if (full && !co && len < q->cs && off + len == q->size)
		len = q->cs; /* the image's last, partial cluster: all of it, as QEMU */
	if (co || len < q->cs) {
		uint64_t piece = co ? q->cs - co : len;

		if (piece > len)
			piece = len;
		return zero_partial(q, off, piece, zero, done_len, w);
	}
	if (zero && q->h.version < 3)
		return zero_partial(q, off, q->cs, zero, done_len, w);
	n = len >> q->cb;
	ret = l2_locate(q, gc, &soff, &idx);
	if (ret < 0)
		return ret;
	if (ret == 1 && (!zero || q->backing_size == UINT64_MAX || off >= q->backing_size)) {
		/* no L2 table: nothing to discard, reads as zeroes already */
		uint64_t tend = ((gc >> q->l2_bits) + 1) << (q->l2_bits + q->cb);
		uint64_t stop = off + (n << q->cb);

		*done_len = (tend < stop ? tend : stop) - off;
		return QCOW2_Z_SKIP;
	}
	ret = l2_slice_for_change(q, gc, &s, &idx, w);
	if (ret < 0)
		return ret;
	if (n > per_slice - idx)
		n = per_slice - idx;
	n = lock_free_prefix(q, gc + 1, n - 1) + 1;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t bm, e = q2_l2_entry(s, idx + (uint32_t)i, &bm, q->extl2);
		uint64_t host = e & QCOW2_L2E_OFFSET_MASK, ne, nbm, goff = (gc + i) << q->cb;
		bool alloc = (e & QCOW2_OFLAG_COMPRESSED) || std_allocated(q, e);
		bool backing = q->backing_size != UINT64_MAX && goff < q->backing_size;
		bool keep = false;
		const char *why;

		if (s->suspect && entry_check(q, e, bm, &why) != E_OK) {
			if (i == 0) {
				q2_corrupt(q, "L2 entry for guest offset 0x%llx (0x%llx): %s",
					   (unsigned long long)goff, (unsigned long long)e, why);
				return -EIO;
			}
			n = i;
			break;
		}
		if (full) {
			/* unallocated: reads fall through to the backing file again */
			ne = nbm = 0;
		} else if (!zero) {
			bool is_zero = q->extl2 ? (bm & QCOW2_SC_ZERO_MASK) == QCOW2_SC_ZERO_MASK
						: (e & QCOW2_OFLAG_ZERO) != 0;

			if (!alloc && (!backing || is_zero))
				continue; /* reads as zeroes / unallocated already */
			if (backing && q->h.version < 3) {
				/* cannot hide the backing file: a discard is only a hint */
				if (i == 0) {
					*done_len = q->cs;
					return QCOW2_Z_SKIP;
				}
				n = i;
				break;
			}
			ne = backing && !q->extl2 ? QCOW2_OFLAG_ZERO : 0;
			nbm = backing && q->extl2 ? QCOW2_SC_ZERO_MASK : 0;
		} else {
			keep = !unmap && !(e & QCOW2_OFLAG_COMPRESSED) && std_allocated(q, e) &&
			       ((e & QCOW2_OFLAG_COPIED) || q->ext_data);
			if (q->ext_data && std_allocated(q, e))
				keep = true; /* the data file's layout is fixed */
			if (q->extl2) {
				ne = keep ? e : 0;
				nbm = QCOW2_SC_ZERO_MASK;
			} else {
				ne = keep ? (e | QCOW2_OFLAG_ZERO) : QCOW2_OFLAG_ZERO;
				nbm = 0;
			}
		}
		if (ne == e && nbm == bm)
			continue;
		if (!keep && alloc && !q->ext_data) {
			if (e & QCOW2_OFLAG_COMPRESSED)
				q2_dec_range(q, qcow2_compressed_offset(e, q->cb),
					     qcow2_compressed_len(e, q->cb));
			else if (host)
				q2_dec_range(q, host, q->cs);
		}
		q2_l2_set(s, idx + (uint32_t)i, ne, nbm, q->extl2);
		changed = true;
	}
	if (changed) {
		q2_slice_dirty(s);
		q2_wb_maybe(q);
	}
	*done_len = n << q->cb;
	return changed ? QCOW2_Z_DONE : QCOW2_Z_SKIP;
}
