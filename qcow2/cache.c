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
 * Memory: entries come from slab chunks, one mapping each holding n buffers
 * followed by their n 64-byte descriptors. The first chunk has 16 entries,
 * each next one twice as many up to a 2 MiB mapping (2 MiB aligned and
 * MADV_HUGEPAGE-advised, so a slice's descriptor and buffer share one TLB
 * entry), and below the soft limit no chunk is larger than what the limit
 * still allows: a small image pays for what it caches. q2_cache_trim() puts
 * entries back on their chunk's spare list (no longer counted) and unmaps a
 * chunk once all of its entries are spare. Loads use io commands from a
 * small pool (as many as loads were ever in flight at once), not one per entry.
 *
 * Lookup: open addressing with linear probing over (offset, entry) slots,
 * at most half full, deletion by backward shift (no tombstones): a hit reads
 * one slot line, then the entry's first line and its buffer.
 *
 * A plain cache: it knows nothing of L1/L2 semantics or of write-back. What
 * it needs from its owner comes as hooks given at q2_cache_init() (struct
 * q2_cache_hooks): the loop and file slices load from, a check run on every
 * slice that becomes READY from disk bytes (load or insert), the deferred
 * wake-up of parked waiters, and a "write back soon" call when every entry
 * is busy. The generation counter (gen) lets a reader of on-disk slices that
 * runs outside the cache (prefetch.c) know whether its data may be stale.
 */
#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"
#include "vlog.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SPARE_POISON(p, n)   ASAN_POISON_MEMORY_REGION(p, n)
#define SPARE_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SPARE_POISON(p, n)   ((void)(p), (void)(n))
#define SPARE_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

_Static_assert(sizeof(struct q2_slice) == 64, "a slice descriptor is one cache line");

#define HUGE_SZ     (2u << 20)
#define CHUNK_FIRST 16u /* entries of the first chunk */
#define CHUNK_OVER  16u /* entries of a chunk allocated past the soft limit */

struct q2_chunk {
	uint8_t *mem; /* the mapping: buffers, then descriptors */
	size_t bytes; /* its length */
	struct q2_slice *desc;
	struct q2_slice *spare; /* entries not counted, linked by next */
	uint32_t n, nspare;
};

struct q2_load {
	struct io_cmd cmd;
	struct q2_slice *s;
	struct q2_load *next;
};

/* ---- memory ---- */

static size_t page_size(void)
{
	long p = sysconf(_SC_PAGESIZE);

	return p > 0 ? (size_t)p : 4096;
}

/*
 * An anonymous zeroed mapping of *bytes (rounded up to pages; to 2 MiB
 * multiples too when @round_huge and at least 1 MiB). Mappings of 2 MiB or
 * more are 2 MiB aligned and advised for huge pages (advice failure is
 * harmless). NULL on failure.
 */
static void *map_mem(size_t *bytes, bool round_huge)
{
	size_t pg = page_size(), len = (*bytes + pg - 1) & ~(pg - 1), extra;
	uint8_t *p, *a;

	if (round_huge && len >= HUGE_SZ / 2)
		len = (len + HUGE_SZ - 1) & ~((size_t)HUGE_SZ - 1);
	extra = len >= HUGE_SZ ? HUGE_SZ : 0;
	p = mmap(NULL, len + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	a = p;
	if (extra) {
		a = (uint8_t *)(((uintptr_t)p + HUGE_SZ - 1) & ~((uintptr_t)HUGE_SZ - 1));
		if (a > p)
			munmap(p, (size_t)(a - p));
		if (p + len + extra > a + len)
			munmap(a + len, (size_t)(p + len + extra - (a + len)));
#ifdef MADV_HUGEPAGE
		(void)madvise(a, len, MADV_HUGEPAGE);
#endif
	}
	*bytes = len;
	return a;
}

static void unmap_mem(void *p, size_t bytes)
{
	if (p)
		munmap(p, bytes);
}

/* ---- hash ---- */

static size_t hash_home(const struct q2_cache *c, uint64_t off)
{
	uint64_t x = (off >> c->slice_bits) * 0x9e3779b97f4a7c15ull;

	return (size_t)(x >> (64 - c->hbits));
}

/* Replace the table by one of 2^@bits slots (> hused * 2). 0 or -ENOMEM. */
static int hash_resize(struct q2_cache *c, unsigned bits)
{
	size_t n = (size_t)1 << bits, bytes = n * sizeof(struct q2_hslot);
	struct q2_hslot *old = c->hash, *t = map_mem(&bytes, true);
	size_t on = old ? c->hmask + 1 : 0, obytes = c->hbytes;

	if (!t)
		return -ENOMEM;
	c->hash = t;
	c->hbytes = bytes;
	c->hbits = bits;
	c->hmask = n - 1;
	for (size_t i = 0; i < on; i++) {
		size_t h;

		if (!old[i].s)
			continue;
		for (h = hash_home(c, old[i].off); t[h].s; h = (h + 1) & c->hmask)
			;
		t[h] = old[i];
	}
	unmap_mem(old, obytes);
	return 0;
}

/* @s (not in the table, key s->off absent) enters; the table has room. */
static void hash_insert(struct q2_cache *c, struct q2_slice *s)
{
	size_t h = hash_home(c, s->off);

	while (c->hash[h].s)
		h = (h + 1) & c->hmask;
	c->hash[h].off = s->off;
	c->hash[h].s = s;
	c->hused++;
}

static struct q2_slice *hash_find(const struct q2_cache *c, uint64_t off)
{
	const struct q2_hslot *t = c->hash;

	for (size_t h = hash_home(c, off);; h = (h + 1) & c->hmask) {
		if (!t[h].s)
			return NULL;
		if (t[h].off == off)
			return t[h].s;
	}
}

/* Remove @s (in the table) and shift later members of its run back. */
static void hash_remove(struct q2_cache *c, struct q2_slice *s)
{
	struct q2_hslot *t = c->hash;
	size_t i = hash_home(c, s->off), j;

	while (t[i].s != s)
		i = (i + 1) & c->hmask;
	for (j = i;;) {
		size_t k;

		j = (j + 1) & c->hmask;
		if (!t[j].s)
			break;
		k = hash_home(c, t[j].off);
		/* t[j] may move to i unless its home lies cyclically in (i, j] */
		if (i <= j ? (k <= i || k > j) : (k <= i && k > j)) {
			t[i] = t[j];
			i = j;
		}
	}
	t[i].s = NULL;
	t[i].off = 0;
	c->hused--;
}

/* ---- chunks ---- */

static void chunk_unmap(struct q2_cache *c, size_t ci)
{
	struct q2_chunk *k = c->chunks[ci];

	SPARE_UNPOISON(k->mem, k->bytes);
	c->mem_bytes -= k->bytes;
	c->nspare -= k->nspare;
	unmap_mem(k->mem, k->bytes);
	free(k);
	c->chunks[ci] = NULL;
}

/* Map a chunk of @n entries, all spare. 0 or -ENOMEM. */
static int chunk_new(struct q2_cache *c, size_t n)
{
	size_t ci, bufs = n * c->slice_size, bytes;
	struct q2_chunk *k;

	for (ci = 0; ci < c->nchunks && c->chunks[ci]; ci++)
		;
	if (ci == c->chunks_cap) {
		size_t ncap = c->chunks_cap ? c->chunks_cap * 2 : 16;
		struct q2_chunk **na = realloc(c->chunks, ncap * sizeof(*na));

		if (!na)
			return -ENOMEM;
		c->chunks = na;
		c->chunks_cap = ncap;
	}
	k = calloc(1, sizeof(*k));
	if (!k)
		return -ENOMEM;
	bytes = bufs + n * sizeof(struct q2_slice);
	k->mem = map_mem(&bytes, false);
	if (!k->mem) {
		free(k);
		return -ENOMEM;
	}
	k->bytes = bytes;
	k->n = (uint32_t)n;
	k->desc = (struct q2_slice *)(k->mem + bufs); /* bufs: a multiple of 512 */
	for (size_t i = n; i-- > 0;) {
		struct q2_slice *s = &k->desc[i];

		s->buf = k->mem + i * c->slice_size;
		s->cache = c;
		s->chunk = (uint32_t)ci;
		s->next = k->spare;
		k->spare = s;
	}
	k->nspare = (uint32_t)n;
	SPARE_POISON(k->mem, bufs);
	if (ci == c->nchunks)
		c->nchunks++;
	c->chunks[ci] = k;
	c->chunk_hint = ci;
	c->nspare += n;
	c->mem_bytes += bytes;
	return 0;
}

/* A spare entry, mapping a new chunk if there is none. NULL on ENOMEM. */
static struct q2_slice *spare_take(struct q2_cache *c)
{
	struct q2_chunk *k = NULL;
	struct q2_slice *s;

	if (!c->nspare) {
		size_t n = c->chunk_next, max = HUGE_SZ / (c->slice_size + sizeof(struct q2_slice));

		if (max < 1)
			max = 1;
		if (c->count < c->soft_max) {
			if (n > c->soft_max - c->count)
				n = c->soft_max - c->count;
		} else if (n > CHUNK_OVER) {
			n = CHUNK_OVER;
		}
		if (n > max)
			n = max;
		if (chunk_new(c, n) < 0)
			return NULL;
		if (c->count < c->soft_max && c->chunk_next < max)
			c->chunk_next *= 2;
	}
	if (c->chunk_hint < c->nchunks && c->chunks[c->chunk_hint] &&
	    c->chunks[c->chunk_hint]->nspare)
		k = c->chunks[c->chunk_hint];
	for (size_t i = 0; !k && i < c->nchunks; i++) {
		if (c->chunks[i] && c->chunks[i]->nspare) {
			k = c->chunks[i];
			c->chunk_hint = i;
		}
	}
	if (!k)
		return NULL; /* nspare lied: cannot happen */
	s = k->spare;
	k->spare = s->next;
	k->nspare--;
	c->nspare--;
	s->next = NULL;
	SPARE_UNPOISON(s->buf, c->slice_size);
	return s;
}

/* Give back a counted entry (not in the hash, not on the free list). */
static void spare_put(struct q2_cache *c, struct q2_slice *s)
{
	size_t ci = s->chunk;
	struct q2_chunk *k = c->chunks[ci];
	size_t i = s->idx;

	c->all[i] = c->all[c->count - 1];
	c->all[i]->idx = (uint32_t)i;
	c->count--;
	if (c->hand >= c->count)
		c->hand = 0;
	*s = (struct q2_slice){.buf = s->buf, .cache = c, .chunk = (uint32_t)ci};
	SPARE_POISON(s->buf, c->slice_size);
	s->next = k->spare;
	k->spare = s;
	k->nspare++;
	c->nspare++;
	if (k->nspare == k->n)
		chunk_unmap(c, ci);
}

/* ---- life cycle ---- */

int q2_cache_init(struct q2_cache *c, const struct q2_cache_hooks *hooks, uint8_t type,
		  uint32_t slice_size, size_t soft_max)
{
	memset(c, 0, sizeof(*c));
	if (slice_size < 512 || (slice_size & (slice_size - 1)) || !hooks->wake)
		return -EINVAL;
	c->hooks = *hooks;
	c->type = type;
	c->slice_size = slice_size;
	c->slice_bits = (uint32_t)__builtin_ctz(slice_size);
	c->soft_max = soft_max < 8 ? 8 : soft_max;
	c->chunk_next = CHUNK_FIRST;
	return hash_resize(c, 6); /* 64 slots; grows with the entries */
}

void q2_cache_exit(struct q2_cache *c)
{
	while (c->loads) {
		struct q2_load *l = c->loads;

		c->loads = l->next;
		free(l);
	}
	for (size_t i = 0; i < c->nchunks; i++)
		if (c->chunks[i])
			chunk_unmap(c, i);
	free(c->chunks);
	free(c->all);
	unmap_mem(c->hash, c->hbytes);
	memset(c, 0, sizeof(*c));
}

static bool evictable(const struct q2_slice *s)
{
	return s->state == Q2_SL_READY && !s->dirty && !s->wb && !s->fill && !s->pins &&
	       !s->waiters;
}

static void release(struct q2_cache *c, struct q2_slice *s)
{
	c->gen++;
	hash_remove(c, s);
	s->state = 0;
	s->suspect = false;
	s->newtab = false;
	s->refbit = false;
	s->next = c->free;
	c->free = s;
}

/* A free entry: a free one, a new one below the soft limit, a victim, or a new one anyway. */
static struct q2_slice *get_entry(struct q2_cache *c)
{
	struct q2_slice *s;

	if (c->free) {
		s = c->free;
		c->free = s->next;
		s->next = NULL;
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
			s->newtab = false;
			c->evictions++;
			c->gen++;
			return s;
		}
		/* Everything is busy: grow past the soft limit, write back soon. */
		if (c->hooks.pressure)
			c->hooks.pressure(c->hooks.opaque);
	}
	/* a new counted entry: the table stays at most half full */
	if ((c->count + 1) * 2 > c->hmask + 1 && hash_resize(c, c->hbits + 1) < 0)
		return NULL;
	if (c->count == c->cap) {
		size_t ncap = c->cap ? c->cap * 2 : 64;
		struct q2_slice **na = realloc(c->all, ncap * sizeof(*na));

		if (!na)
			return NULL;
		c->all = na;
		c->cap = ncap;
	}
	s = spare_take(c);
	if (!s)
		return NULL;
	s->idx = (uint32_t)c->count;
	c->all[c->count++] = s;
	return s;
}

static void load_done(struct io_cmd *cmd, int res)
{
	struct q2_load *l = cmd->priv;
	struct q2_slice *s = l->s;
	struct q2_cache *c = s->cache;

	l->s = NULL;
	l->next = c->loads;
	c->loads = l;
	if (res < 0) {
		vlog(VLOG_ERROR, c->hooks.name, "reading %s slice at 0x%llx failed: %s",
		     c->type == Q2_CACHE_L2 ? "L2" : "refcount", (unsigned long long)s->off,
		     strerror(-res));
		c->hooks.wake(c->hooks.opaque, &s->waiters, res);
		release(c, s);
		return;
	}
	s->state = Q2_SL_READY;
	s->refbit = true;
	if (c->hooks.loaded)
		c->hooks.loaded(c->hooks.opaque, s);
	c->hooks.wake(c->hooks.opaque, &s->waiters, 0);
}

int q2_cache_get(struct q2_cache *c, uint64_t off, struct q2_slice **sp, struct qcow2_waiter *w)
{
	struct q2_slice *s = hash_find(c, off);
	struct q2_load *l;

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
	l = c->loads;
	if (!l) {
		l = calloc(1, sizeof(*l)); /* the pool grows to the most loads in flight */
		if (!l)
			return -ENOMEM;
	} else {
		c->loads = l->next;
	}
	s = get_entry(c);
	if (!s) {
		l->next = c->loads;
		c->loads = l;
		return -ENOMEM;
	}
	s->off = off;
	s->state = Q2_SL_LOADING;
	s->dirty = false;
	s->dmask = 0;
	s->pins = 0;
	hash_insert(c, s);
	w->next = NULL;
	s->waiters = w;
	l->s = s;
	l->next = NULL;
	l->cmd.done = load_done;
	l->cmd.priv = l;
	io_read(c->hooks.loop, &l->cmd, c->hooks.file, s->buf, c->slice_size, off);
	return -EAGAIN;
}

struct q2_slice *q2_cache_peek(struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s = hash_find(c, off);

	return s && s->state == Q2_SL_READY ? s : NULL;
}

/* Test seam (qcow2_test_cache_nomem): q2_cache_new() calls until one fails (0: none). */
static unsigned test_new_nomem_left;

void qcow2_test_cache_nomem(unsigned nth)
{
	__atomic_store_n(&test_new_nomem_left, nth, __ATOMIC_RELAXED);
}

struct q2_slice *q2_cache_new(struct q2_cache *c, uint64_t off)
{
	struct q2_slice *s;

	if (__builtin_expect(__atomic_load_n(&test_new_nomem_left, __ATOMIC_RELAXED) != 0, 0) &&
	    __atomic_sub_fetch(&test_new_nomem_left, 1, __ATOMIC_RELAXED) == 0)
		return NULL; /* the test seam: as if out of memory */
	s = hash_find(c, off);
	c->gen++;
	if (s) {
		/* A stale copy of a freed cluster (only ever clean & idle). */
		if (s->state != Q2_SL_READY || s->pins || s->wb || s->fill || s->waiters)
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
	s->newtab = false;
	q2_slice_dirty(s);
	return s;
}

void q2_slice_dirty(struct q2_slice *s)
{
	q2_slice_dirty_range(s, 0, s->cache->slice_size);
}

void q2_slice_dirty_range(struct q2_slice *s, uint32_t off, uint32_t len)
{
	struct q2_cache *c = s->cache;
	uint32_t g = c->slice_size / 8;

	if (len)
		s->dmask |=
		    (uint8_t)(((2u << ((off + len - 1) / g)) - 1) & ~((1u << (off / g)) - 1));
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

void q2_cache_trim(struct q2_cache *c)
{
	if (c->count <= c->soft_max)
		return;
	/* unused entries first */
	while (c->free && c->count > c->soft_max) {
		struct q2_slice *s = c->free;

		c->free = s->next;
		spare_put(c, s);
	}
	for (size_t i = 0; i < c->count && c->count > c->soft_max;) {
		struct q2_slice *s = c->all[i];

		if (!evictable(s)) {
			i++;
			continue;
		}
		hash_remove(c, s);
		c->gen++;
		spare_put(c, s); /* all[i] now holds another entry: look at it again */
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
	s->dmask = 0;
	s->pins = 0;
	s->waiters = NULL;
	memcpy(s->buf, data, c->slice_size);
	s->state = Q2_SL_READY;
	s->refbit = true;
	s->suspect = false;
	s->newtab = false;
	if (c->hooks.loaded)
		c->hooks.loaded(c->hooks.opaque, s);
	hash_insert(c, s);
	return 1;
}
