/* SPDX-License-Identifier: MIT */
/*
 * img/dirty.c — non-persistent dirty bitmaps (QMP block-dirty-bitmap-add
 * with "persistent": false, QEMU's default).
 *
 * A bitmap lives in memory on the node (struct img) it was added to and
 * never touches the file: adding or removing one changes nothing on disk and
 * needs no quiescing. It follows every write, write-zeroes and discard
 * submitted through img_writev / img_write_zeroes / img_discard from the
 * moment it exists (img_dbm_mark, called before the operation is handed to
 * the format: a superset of what landed, as QEMU marks even failed
 * requests), and is gone when the image is closed. The format's engine is
 * closed and reopened by some commands (internal snapshots, persistent
 * bitmap edits): these bitmaps are not the engine's, so they survive that.
 *
 * Threads: the list changes (add, remove) and the bit array is replaced
 * (resize) only on the image's thread with every other submitter parked
 * (vqcowd runs QMP between pause_all and resume_all); marking may run on any
 * thread that submits to the image (raw images on the queues' threads), so
 * bits are set with atomic ORs and read with atomic loads; clear and merge
 * run with submitters parked or no request in flight.
 *
 * A persistent bitmap added to a read-only node (a backing file) is one of
 * these too, flagged persistent: QEMU 7.2 accepts it there, lists it as
 * persistent and loses it when the node closes, with a warning; so do we
 * (img_dbm_free_all).
 *
 * Bits: one per granule of the node's size, in 64-bit words; the last granule
 * may reach past the end, and counts whole, as QEMU counts it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img.h"
#include "vlog.h"

struct img_dbm {
	struct img_dbm *next;
	char *name;
	uint32_t gbits;
	bool enabled;
	bool persistent; /* asked for on a read-only node: never stored (QEMU's loss) */
	uint64_t nbits;
	uint64_t *words;
};

static uint64_t nwords(uint64_t nbits)
{
	return (nbits + 63) / 64;
}

static uint64_t bits_for(uint64_t size, uint32_t gbits)
{
	return (size + (1ull << gbits) - 1) >> gbits;
}

static void dbm_free(struct img_dbm *b)
{
	if (!b)
		return;
	free(b->name);
	free(b->words);
	free(b);
}

struct img_bmage {
	struct img_bmage *next;
	char *name;
	uint64_t seq;
};

static struct img_bmage *age_find(const struct img *img, const char *name)
{
	for (struct img_bmage *a = img->bm_ages; a; a = a->next)
		if (strcmp(a->name, name) == 0)
			return a;
	return NULL;
}

int img_bm_born(struct img *img, const char *name)
{
	struct img_bmage *a = age_find(img, name);

	if (!a) {
		a = calloc(1, sizeof(*a));
		if (!a || !(a->name = strdup(name))) {
			free(a);
			return -ENOMEM;
		}
		a->next = img->bm_ages;
		img->bm_ages = a;
	}
	a->seq = ++img->bm_clock;
	return 0;
}

void img_bm_gone(struct img *img, const char *name)
{
	for (struct img_bmage **p = &img->bm_ages; *p; p = &(*p)->next) {
		struct img_bmage *a = *p;

		if (strcmp(a->name, name) == 0) {
			*p = a->next;
			free(a->name);
			free(a);
			return;
		}
	}
}

void img_bm_order(const struct img *img, struct img_bitmap *a, unsigned n)
{
	uint64_t *seq = calloc(n ? n : 1, sizeof(*seq));

	if (!seq)
		return; /* the kinds' own orders */
	for (unsigned i = 0; i < n; i++) {
		const struct img_bmage *g = age_find(img, a[i].name);

		seq[i] = g ? g->seq : 0;
	}
	/* stable insertion sort, newest first: few bitmaps per node */
	for (unsigned i = 1; i < n; i++) {
		struct img_bitmap t = a[i];
		uint64_t s = seq[i];
		unsigned j = i;

		for (; j > 0 && seq[j - 1] < s; j--) {
			a[j] = a[j - 1];
			seq[j] = seq[j - 1];
		}
		a[j] = t;
		seq[j] = s;
	}
	free(seq);
}

struct img_dbm *img_dbm_find(struct img *img, const char *name)
{
	for (struct img_dbm *b = img->dbms; b; b = b->next)
		if (strcmp(b->name, name) == 0)
			return b;
	return NULL;
}

uint32_t img_dbm_default_granularity(const struct img *img)
{
	/* QEMU: the cluster size within 4 KiB..64 KiB, 64 KiB without clusters */
	if (!img->cluster_size)
		return 65536;
	return img->cluster_size < 4096    ? 4096
	       : img->cluster_size > 65536 ? 65536
					   : img->cluster_size;
}

int img_dbm_add(struct img *img, const char *name, uint32_t granularity, bool disabled,
		bool persistent)
{
	struct img_dbm *b, **tail;
	uint32_t gbits = 0;

	if (!granularity)
		granularity = img_dbm_default_granularity(img);
	while ((1ull << gbits) < granularity)
		gbits++;
	if ((1ull << gbits) != granularity || gbits < 9 || gbits > 31)
		return -EINVAL;
	if (img_dbm_find(img, name))
		return -EEXIST;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->name = strdup(name);
	b->gbits = gbits;
	b->enabled = !disabled;
	b->persistent = persistent;
	b->nbits = bits_for(img->size, gbits);
	b->words = calloc(nwords(b->nbits) ? nwords(b->nbits) : 1, 8);
	if (!b->name || !b->words || img_bm_born(img, name) < 0) {
		dbm_free(b);
		return -ENOMEM;
	}
	/* the newest first, as QEMU lists them */
	tail = &img->dbms;
	b->next = *tail;
	*tail = b;
	if (b->enabled)
		__atomic_add_fetch(&img->dbm_enabled, 1, __ATOMIC_RELAXED);
	return 0;
}

int img_dbm_remove(struct img *img, const char *name)
{
	for (struct img_dbm **p = &img->dbms; *p; p = &(*p)->next) {
		struct img_dbm *b = *p;

		if (strcmp(b->name, name) != 0)
			continue;
		*p = b->next;
		if (b->enabled)
			__atomic_sub_fetch(&img->dbm_enabled, 1, __ATOMIC_RELAXED);
		img_bm_gone(img, name);
		dbm_free(b);
		return 0;
	}
	return -ENOENT;
}

void img_dbm_set_enabled(struct img *img, struct img_dbm *b, bool enabled)
{
	if (b->enabled == enabled)
		return;
	b->enabled = enabled;
	if (enabled)
		__atomic_add_fetch(&img->dbm_enabled, 1, __ATOMIC_RELAXED);
	else
		__atomic_sub_fetch(&img->dbm_enabled, 1, __ATOMIC_RELAXED);
}

void img_dbm_clear(struct img_dbm *b)
{
	memset(b->words, 0, nwords(b->nbits) * 8);
}

void img_dbm_free_all(struct img *img)
{
	for (struct img_dbm *b = img->dbms; b; b = b->next)
		if (b->persistent)
			/* QEMU 7.2 drops them so, with this warning */
			vlog(VLOG_WARN, img->path,
			     "Lost persistent bitmaps during inactivation of node: No write access "
			     "('%s' was added to a read-only node)",
			     b->name);
	while (img->dbms) {
		struct img_dbm *b = img->dbms;

		img->dbms = b->next;
		dbm_free(b);
	}
	img->dbm_enabled = 0;
	while (img->bm_ages) {
		struct img_bmage *a = img->bm_ages;

		img->bm_ages = a->next;
		free(a->name);
		free(a);
	}
}

/* Set bits [first, last] of @w atomically. */
static void set_range(uint64_t *w, uint64_t first, uint64_t last)
{
	while (first <= last) {
		uint64_t i = first / 64, lo = first % 64;
		uint64_t hi = last / 64 == i ? last % 64 : 63;
		uint64_t m = (hi == 63 ? ~0ull : ((1ull << (hi + 1)) - 1)) & ~((1ull << lo) - 1);

		if ((__atomic_load_n(&w[i], __ATOMIC_RELAXED) & m) != m)
			__atomic_fetch_or(&w[i], m, __ATOMIC_RELAXED);
		first = i * 64 + hi + 1;
	}
}

void img_dbm_mark(struct img *img, uint64_t off, uint64_t len)
{
	if (!len)
		return;
	for (struct img_dbm *b = img->dbms; b; b = b->next) {
		uint64_t first = off >> b->gbits, last = (off + len - 1) >> b->gbits;

		if (!b->enabled || first >= b->nbits)
			continue;
		if (last >= b->nbits)
			last = b->nbits - 1;
		set_range(b->words, first, last);
	}
}

void img_dbm_set(struct img_dbm *b, uint64_t off, uint64_t len)
{
	uint64_t first, last;

	if (!len)
		return;
	first = off >> b->gbits;
	last = (off + len - 1) >> b->gbits;
	if (first >= b->nbits)
		return;
	if (last >= b->nbits)
		last = b->nbits - 1;
	set_range(b->words, first, last);
}

int img_dbm_ranges(const struct img_dbm *b, int (*fn)(void *opaque, uint64_t off, uint64_t len),
		   void *opaque)
{
	uint64_t n = nwords(b->nbits), start = 0;
	bool in = false;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t w = __atomic_load_n(&b->words[i], __ATOMIC_RELAXED);

		if ((!in && !w) || (in && w == ~0ull))
			continue;
		for (unsigned k = 0; k < 64; k++) {
			bool set = (w >> k) & 1;
			uint64_t bit = i * 64 + k;

			if (set && !in) {
				start = bit;
				in = true;
			} else if (!set && in) {
				int r = fn(opaque, start << b->gbits, (bit - start) << b->gbits);

				if (r < 0)
					return r;
				in = false;
			}
		}
	}
	if (in)
		return fn(opaque, start << b->gbits, (n * 64 - start) << b->gbits);
	return 0;
}

int img_dbm_resize(struct img *img, uint64_t size)
{
	for (struct img_dbm *b = img->dbms; b; b = b->next) {
		uint64_t nb = bits_for(size, b->gbits), *w;

		if (nb <= b->nbits)
			continue;
		w = calloc(nwords(nb), 8);
		if (!w)
			return -ENOMEM;
		memcpy(w, b->words, nwords(b->nbits) * 8);
		free(b->words);
		b->words = w;
		b->nbits = nb;
	}
	return 0;
}

int img_dbm_list(struct img *img, struct img_bitmap *out, unsigned max)
{
	unsigned n = 0;

	for (struct img_dbm *b = img->dbms; b; b = b->next, n++) {
		uint64_t ones = 0;

		if (n >= max)
			continue;
		for (uint64_t i = 0; i < nwords(b->nbits); i++)
			ones += (uint64_t)__builtin_popcountll(
			    __atomic_load_n(&b->words[i], __ATOMIC_RELAXED));
		snprintf(out[n].name, sizeof(out[n].name), "%s", b->name);
		out[n].granularity = 1ull << b->gbits;
		out[n].count = ones << b->gbits;
		out[n].recording = b->enabled;
		out[n].inconsistent = false;
		out[n].persistent = b->persistent;
	}
	return (int)n;
}

struct img_dbm *img_dbm_new(uint64_t size, uint32_t granularity)
{
	struct img_dbm *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	while ((1ull << b->gbits) < granularity)
		b->gbits++;
	b->nbits = bits_for(size, b->gbits);
	b->words = calloc(nwords(b->nbits) ? nwords(b->nbits) : 1, 8);
	if (!b->words) {
		free(b);
		return NULL;
	}
	return b;
}

void img_dbm_free(struct img_dbm *b)
{
	dbm_free(b);
}

const uint8_t *img_dbm_bytes(const struct img_dbm *b, uint64_t *nbytes)
{
	_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
		       "the words' bytes are the on-disk bit order only on little-endian hosts");
	*nbytes = (b->nbits + 7) / 8;
	return (const uint8_t *)b->words;
}

uint64_t img_dbm_granularity(const struct img_dbm *b)
{
	return 1ull << b->gbits;
}

bool img_dbm_enabled(const struct img_dbm *b)
{
	return b->enabled;
}
