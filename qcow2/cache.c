/* SPDX-License-Identifier: MIT */
/*
 * qcow2/cache.c — L2 and refcount slice caches.
 *
 * A slice is a power-of-two piece (default 4 KiB) of an L2 table or a
 * refcount block, keyed by its host offset. Lookups hash the offset; the
 * replacement policy is CLOCK over all entries. Loads are asynchronous
 * (io_read into the slice buffer); requests that need a loading slice park
 * their waiter on it and are woken (through the deferred wake list) when the
 * load ends, with the load's error if it failed (the slice is then dropped,
 * so a later access retries).
 *
 * Entries and their buffers are allocated on demand and kept for reuse; the
 * soft limit is exceeded only when every entry is dirty, pinned, loading or
 * under write-back (write-back is then requested).
 *
 * L2 prefetch (after open, when the L2 cache covers every referenced L2
 * table): whole tables are read in large background reads and their slices
 * inserted as clean READY entries where nothing is cached yet. A slice can
 * change on disk (write-back) and leave the cache while such a read is in
 * flight, so the read's data is used only if the cache generation (bumped
 * whenever a slice leaves the hash, and on q2_cache_new) is unchanged and the
 * L1 entry still points at the table; otherwise it is dropped (always safe).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static size_t hash_off(const struct q2_cache *c, uint64_t off)
{
	uint64_t x = off / c->slice_size;

	x *= 0x9e3779b97f4a7c15ull;
	return (size_t)(x >> 20) & c->hmask;
}

int q2_cache_init(struct q2_cache *c, struct qcow2 *q, uint8_t type, uint32_t slice_size,
		  size_t soft_max)
{
	size_t hsize = 64;

	memset(c, 0, sizeof(*c));
	c->q = q;
	c->type = type;
	c->slice_size = slice_size;
	c->soft_max = soft_max < 8 ? 8 : soft_max;
	while (hsize < c->soft_max * 2 && hsize < (1u << 24))
		hsize <<= 1;
	c->hash = calloc(hsize, sizeof(*c->hash));
	if (!c->hash)
		return -ENOMEM;
	c->hmask = hsize - 1;
	return 0;
}

void q2_cache_exit(struct q2_cache *c)
{
	for (size_t i = 0; i < c->count; i++) {
		io_free_aligned(c->all[i]->buf);
		free(c->all[i]);
	}
	free(c->all);
	free(c->hash);
	memset(c, 0, sizeof(*c));
}

static void hash_insert(struct q2_cache *c, struct q2_slice *s)
{
	size_t h = hash_off(c, s->off);

	s->hnext = c->hash[h];
	c->hash[h] = s;
}

static void hash_remove(struct q2_cache *c, struct q2_slice *s)
{
	struct q2_slice **pp = &c->hash[hash_off(c, s->off)];

	for (; *pp; pp = &(*pp)->hnext) {
		if (*pp == s) {
			*pp = s->hnext;
			s->hnext = NULL;
			return;
		}
	}
}

static struct q2_slice *hash_find(const struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s = c->hash[hash_off(c, off)];

	while (s && s->off != off)
		s = s->hnext;
	return s;
}

static bool evictable(const struct q2_slice *s)
{
	return s->state == Q2_SL_READY && !s->dirty && !s->wb && !s->pins && !s->waiters;
}

static void release(struct q2_cache *c, struct q2_slice *s)
{
	c->gen++;
	hash_remove(c, s);
	s->state = 0;
	s->suspect = false;
	s->refbit = false;
	s->hnext = c->free;
	c->free = s;
}

/* A free entry: a free one, a new one below the soft limit, a victim, or a new one anyway. */
static struct q2_slice *get_entry(struct q2_cache *c)
{
	struct q2_slice *s;

	if (c->free) {
		s = c->free;
		c->free = s->hnext;
		s->hnext = NULL;
		return s;
	}
	if (c->count >= c->soft_max && c->count) {
		/* CLOCK: two sweeps at most */
		for (size_t n = 0; n < 2 * c->count; n++) {
			s = c->all[c->hand];
			c->hand = (c->hand + 1) % c->count;
			if (!evictable(s))
				continue;
			if (s->refbit) {
				s->refbit = false;
				continue;
			}
			hash_remove(c, s);
			s->state = 0;
			s->suspect = false;
			c->evictions++;
			c->gen++;
			return s;
		}
		/* Everything is busy: grow past the soft limit, write back soon. */
		q2_wb_kick(c->q);
	}
	if (c->count == c->cap) {
		size_t ncap = c->cap ? c->cap * 2 : 64;
		struct q2_slice **na = realloc(c->all, ncap * sizeof(*na));

		if (!na)
			return NULL;
		c->all = na;
		c->cap = ncap;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->buf = io_alloc_aligned(c->slice_size);
	if (!s->buf) {
		free(s);
		return NULL;
	}
	s->cache = c;
	s->idx = (uint32_t)c->count;
	c->all[c->count++] = s;
	return s;
}

static void load_done(struct io_cmd *cmd, int res)
{
	struct q2_slice *s = cmd->priv;
	struct q2_cache *c = s->cache;
	struct qcow2 *q = c->q;

	if (res < 0) {
		Q2_LOG(q, "reading %s slice at 0x%llx failed: %s",
		       c->type == Q2_CACHE_L2 ? "L2" : "refcount", (unsigned long long)s->off,
		       strerror(-res));
		q2_wake_list_later(q, &s->waiters, res);
		release(c, s);
		return;
	}
	s->state = Q2_SL_READY;
	s->refbit = true;
	if (c->type == Q2_CACHE_L2)
		q2_l2_validate(q, s);
	q2_wake_list_later(q, &s->waiters, 0);
}

int q2_cache_get(struct q2_cache *c, uint64_t off, struct q2_slice **sp, struct qcow2_waiter *w)
{
	struct q2_slice *s = hash_find(c, off);

	if (s) {
		if (s->state == Q2_SL_READY) {
			s->refbit = true;
			c->hits++;
			*sp = s;
			return 0;
		}
		w->next = s->waiters;
		s->waiters = w;
		return -EAGAIN;
	}
	c->misses++;
	s = get_entry(c);
	if (!s)
		return -ENOMEM;
	s->off = off;
	s->state = Q2_SL_LOADING;
	s->dirty = false;
	s->pins = 0;
	hash_insert(c, s);
	w->next = NULL;
	s->waiters = w;
	s->cmd.done = load_done;
	s->cmd.priv = s;
	io_read(c->q->loop, &s->cmd, c->q->file, s->buf, c->slice_size, off);
	return -EAGAIN;
}

struct q2_slice *q2_cache_peek(struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s = hash_find(c, off);

	return s && s->state == Q2_SL_READY ? s : NULL;
}

struct q2_slice *q2_cache_new(struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s = hash_find(c, off);

	c->gen++;
	if (s) {
		/* A stale copy of a freed cluster (only ever clean & idle). */
		if (s->state != Q2_SL_READY || s->pins || s->wb || s->waiters)
			return NULL;
	} else {
		s = get_entry(c);
		if (!s)
			return NULL;
		s->off = off;
		s->pins = 0;
		hash_insert(c, s);
	}
	memset(s->buf, 0, c->slice_size);
	s->state = Q2_SL_READY;
	s->refbit = true;
	s->suspect = false;
	q2_slice_dirty(s);
	return s;
}

void q2_slice_dirty(struct q2_slice *s)
{
	struct q2_cache *c = s->cache;

	s->dirty = true;
	if (!s->in_dlist) {
		s->in_dlist = true;
		s->dnext = c->dirty;
		c->dirty = s;
		c->ndirty++;
	}
}

void q2_cache_forget(struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s = hash_find(c, off);

	c->gen++;
	if (s && evictable(s))
		release(c, s);
}

size_t q2_cache_over(const struct q2_cache *c)
{
	return c->count > c->soft_max ? c->count - c->soft_max : 0;
}

static void entry_free(struct q2_cache *c, struct q2_slice *s)
{
	size_t i = s->idx;

	c->all[i] = c->all[c->count - 1];
	c->all[i]->idx = (uint32_t)i;
	c->count--;
	if (c->hand >= c->count)
		c->hand = 0;
	io_free_aligned(s->buf);
	free(s);
}

void q2_cache_trim(struct q2_cache *c)
{
	struct q2_slice **pp;

	if (c->count <= c->soft_max)
		return;
	/* unused entries first */
	while (c->free && c->count > c->soft_max) {
		struct q2_slice *s = c->free;

		c->free = s->hnext;
		entry_free(c, s);
	}
	for (size_t i = 0; i < c->count && c->count > c->soft_max;) {
		struct q2_slice *s = c->all[i];

		if (!evictable(s)) {
			i++;
			continue;
		}
		pp = &c->hash[hash_off(c, s->off)];
		hash_remove(c, s);
		c->gen++;
		(void)pp;
		entry_free(c, s); /* all[i] now holds another entry: look at it again */
	}
}

int q2_cache_insert(struct q2_cache *c, uint64_t off, const void *data)
{
	struct q2_slice *s;

	if (hash_find(c, off))
		return 0;
	if (!c->free && c->count >= c->soft_max)
		return -ENOSPC; /* get_entry() would evict */
	s = get_entry(c);
	if (!s)
		return -ENOMEM;
	s->off = off;
	s->dirty = false;
	s->pins = 0;
	s->waiters = NULL;
	memcpy(s->buf, data, c->slice_size);
	s->state = Q2_SL_READY;
	s->refbit = true;
	s->suspect = false;
	if (c->type == Q2_CACHE_L2)
		q2_l2_validate(c->q, s);
	hash_insert(c, s);
	return 1;
}

/* ---- L2 prefetch ---- */

#define PF_READS     4
#define PF_MAX_BYTES (1u << 20)

struct q2_pf_tab {
	uint64_t off; /* host offset of the L2 table */
	uint32_t l1i; /* the L1 entry that pointed at it */
};

struct q2_pf_read {
	struct io_cmd cmd;
	struct q2_pf *pf;
	uint8_t *buf;  /* max_tabs clusters */
	size_t first;  /* index in pf->tab */
	uint32_t ntab; /* tables read */
	uint64_t gen;  /* l2c.gen when the read was issued */
	bool busy;
};

struct q2_pf {
	struct qcow2 *q;
	struct q2_pf_tab *tab; /* sorted by host offset, no duplicates */
	size_t ntab, next;
	uint32_t max_tabs; /* per read */
	unsigned inflight;
	bool stop, logged;
	struct q2_pf_read rd[PF_READS];
};

static int pf_tab_cmp(const void *a, const void *b)
{
	const struct q2_pf_tab *x = a, *y = b;

	if (x->off != y->off)
		return x->off < y->off ? -1 : 1;
	return x->l1i < y->l1i ? -1 : x->l1i > y->l1i;
}

/* The L2 table offset of L1 entry @i if it is usable, else 0 (as mapping.c validates it). */
static uint64_t pf_l1_table(const struct qcow2 *q, uint32_t i)
{
	uint64_t off;

	if (q2_l1_check(q, i, &off) || !off)
		return 0;
	if (off > q->file->size || q->cs > q->file->size - off)
		return 0; /* never read past the end of the file */
	return off;
}

/* Buffers and the table list are freed once the prefetch has ended. */
static void pf_release(struct q2_pf *pf)
{
	for (unsigned i = 0; i < PF_READS; i++) {
		io_free_aligned(pf->rd[i].buf);
		pf->rd[i].buf = NULL;
	}
	free(pf->tab);
	pf->tab = NULL;
	pf->ntab = pf->next = 0;
	pf->stop = true;
}

static void pf_done(struct io_cmd *cmd, int res);

static void pf_issue(struct q2_pf *pf)
{
	struct qcow2 *q = pf->q;

	for (unsigned i = 0; i < PF_READS && !pf->stop && pf->next < pf->ntab; i++) {
		struct q2_pf_read *rd = &pf->rd[i];
		size_t first = pf->next;
		uint32_t n = 1;

		if (rd->busy || !rd->buf)
			continue;
		while (first + n < pf->ntab && n < pf->max_tabs &&
		       pf->tab[first + n].off == pf->tab[first + n - 1].off + q->cs)
			n++;
		pf->next = first + n;
		rd->first = first;
		rd->ntab = n;
		rd->gen = q->l2c.gen;
		rd->busy = true;
		rd->cmd.done = pf_done;
		rd->cmd.priv = rd;
		pf->inflight++;
		io_read(q->loop, &rd->cmd, q->file, rd->buf, (size_t)n << q->cb,
			pf->tab[first].off);
	}
	if (!pf->inflight && (pf->stop || pf->next >= pf->ntab))
		pf_release(pf);
}

static void pf_insert(struct q2_pf *pf, struct q2_pf_read *rd)
{
	struct qcow2 *q = pf->q;
	struct q2_cache *c = &q->l2c;

	if (rd->gen != c->gen)
		return; /* a slice left the cache meanwhile: the data may be stale */
	for (uint32_t k = 0; k < rd->ntab; k++) {
		const struct q2_pf_tab *t = &pf->tab[rd->first + k];

		if (pf_l1_table(q, t->l1i) != t->off)
			continue; /* the L1 entry moved: the table may be free now */
		for (uint64_t o = 0; o < q->cs; o += c->slice_size) {
			int ret =
			    q2_cache_insert(c, t->off + o, rd->buf + ((uint64_t)k << q->cb) + o);

			if (ret < 0) {
				pf->stop = true; /* full (or out of memory): load on demand */
				return;
			}
			q->n_l2_prefetched += (uint64_t)ret;
		}
	}
}

static void pf_done(struct io_cmd *cmd, int res)
{
	struct q2_pf_read *rd = cmd->priv;
	struct q2_pf *pf = rd->pf;
	struct qcow2 *q = pf->q;
	uint64_t len = (uint64_t)rd->ntab << q->cb;

	rd->busy = false;
	pf->inflight--;
	if (res < 0 || (uint64_t)res != len) {
		if (!pf->logged)
			Q2_LOG(q, "prefetching L2 tables at 0x%llx failed: %s (loading on demand)",
			       (unsigned long long)pf->tab[rd->first].off,
			       res < 0 ? strerror(-res) : "short read");
		pf->logged = true;
	} else if (!pf->stop) {
		pf_insert(pf, rd);
	}
	pf_issue(pf);
}

int q2_l2_prefetch_start(struct qcow2 *q)
{
	struct q2_pf *pf;
	size_t n = 0, j = 0, nreads = 0;
	uint64_t need;

	for (uint32_t i = 0; i < q->l1_size; i++)
		if (pf_l1_table(q, i))
			n++;
	need = (uint64_t)n << q->cb;
	if (!n || (uint64_t)q->l2c.soft_max * q->l2c.slice_size < need)
		return 0; /* nothing to read, or the cache cannot hold it all */
	pf = calloc(1, sizeof(*pf));
	if (!pf)
		return -ENOMEM;
	pf->q = q;
	pf->tab = malloc(n * sizeof(*pf->tab));
	if (!pf->tab)
		goto free_pf;
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t off = pf_l1_table(q, i);

		if (off)
			pf->tab[j++] = (struct q2_pf_tab){off, i};
	}
	qsort(pf->tab, n, sizeof(*pf->tab), pf_tab_cmp);
	/* two L1 entries on one table (corrupt image): read it once */
	j = 0;
	for (size_t i = 0; i < n; i++)
		if (!j || pf->tab[j - 1].off != pf->tab[i].off)
			pf->tab[j++] = pf->tab[i];
	pf->ntab = j;
	pf->max_tabs = q->cs >= PF_MAX_BYTES ? 1 : (uint32_t)(PF_MAX_BYTES >> q->cb);
	/* number of reads (bounded by PF_READS) decides how many buffers we need */
	for (size_t i = 0; i < pf->ntab && nreads < PF_READS; nreads++) {
		uint32_t k = 1;

		while (i + k < pf->ntab && k < pf->max_tabs &&
		       pf->tab[i + k].off == pf->tab[i + k - 1].off + q->cs)
			k++;
		i += k;
	}
	for (size_t i = 0; i < nreads; i++) {
		pf->rd[i].pf = pf;
		pf->rd[i].buf = io_alloc_aligned((size_t)pf->max_tabs << q->cb);
		if (!pf->rd[i].buf)
			goto free_bufs;
	}
	q->pf = pf;
	pf_issue(pf);
	return 0;

free_bufs:
	pf_release(pf);
free_pf:
	free(pf->tab);
	free(pf);
	return -ENOMEM;
}

void q2_l2_prefetch_stop(struct qcow2 *q)
{
	if (q->pf)
		q->pf->stop = true;
}

bool q2_l2_prefetch_busy(const struct qcow2 *q)
{
	return q->pf && q->pf->inflight;
}

void q2_l2_prefetch_exit(struct qcow2 *q)
{
	if (!q->pf)
		return;
	pf_release(q->pf);
	free(q->pf);
	q->pf = NULL;
}
