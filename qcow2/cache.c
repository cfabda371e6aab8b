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
		(void)pp;
		entry_free(c, s); /* all[i] now holds another entry: look at it again */
	}
}
