/* SPDX-License-Identifier: MIT */
/*
 * img/copy.c — the copy loop of block-commit, shared by vqcowd's commit job
 * (src/layers.c) and vqcow-img commit.
 *
 * What the layers from top down to (not including) the base hold is marked
 * dirty in 64 KiB chunks (img_copy_scan: img_block_status of each layer;
 * as in QEMU, the zeroes past a short layer's end count as held by that
 * layer, past the base's end as the base's: it is grown to top's size),
 * and so is whatever the caller marks (img_copy_mark: the guest's writes
 * during an active commit). img_copy_next takes the next dirty run (from a
 * cursor, wrapping, up to a limit), clears it, reads it through top's chain
 * and writes it into the base (an all-zero run as write-zeroes). One copy at
 * a time, so two copies of a chunk never race; a copy that fails marks its
 * run dirty again. Everything ends in the caller's wake(), from the loop.
 * Policy (rate limits, events, when to stop) is the caller's.
 *
 * Threads: the caller may mark from any thread (vqcowd completes guest
 * writes on its I/O threads), so the dirty bits and their count are
 * atomic; everything else runs on the loop. A chunk marked after a copy
 * took it is copied again; the caller's last word (the pivot) comes after
 * every write it must cover has ended and marked.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img.h"

#define SCAN_BATCH 512 /* status calls before yielding to the loop */

static void copy_done(struct img_io *io, int res);

static void parked_wake(struct img_wait *w)
{
	struct img_copy *k = w->priv;

	k->parked = false;
	k->wake(k, false);
}

int img_copy_init(struct img_copy *k, struct img *top, struct img *base, uint64_t size)
{
	k->top = top;
	k->base = base;
	k->size = size;
	k->nchunks = (size + IMG_COPY_GRAN - 1) / IMG_COPY_GRAN;
	k->dirty = calloc((k->nchunks + 7) / 8 + 1, 1);
	k->buf = io_alloc_aligned(IMG_COPY_MAX);
	if (!k->dirty || !k->buf) {
		img_copy_free(k);
		return -ENOMEM;
	}
	k->scanning = true;
	k->zero_from = UINT64_MAX;
	k->w.wake = parked_wake;
	k->w.priv = k;
	return 0;
}

void img_copy_free(struct img_copy *k)
{
	free(k->dirty);
	io_free_aligned(k->buf);
	k->dirty = NULL;
	k->buf = NULL;
}

/*
 * Any thread (the commit job's write hook runs where a guest write ended);
 * the bits and the count are atomic. The count goes up before the bit is
 * set (and back down if it was set already), so it never reads below the
 * bits set: the one clearer (img_copy_next, on the loop) only takes back
 * what a bit it saw counted.
 */
void img_copy_mark(struct img_copy *k, uint64_t off, uint64_t len)
{
	uint64_t first, last;

	if (!len || off >= k->size)
		return;
	if (len > k->size - off)
		len = k->size - off;
	first = off / IMG_COPY_GRAN;
	last = (off + len - 1) / IMG_COPY_GRAN;
	for (uint64_t i = first; i <= last; i++) {
		uint8_t bit = (uint8_t)(1u << (i & 7));

		if (__atomic_load_n(&k->dirty[i >> 3], __ATOMIC_RELAXED) & bit)
			continue;
		__atomic_fetch_add(&k->ndirty, 1, __ATOMIC_RELAXED);
		if (__atomic_fetch_or(&k->dirty[i >> 3], bit, __ATOMIC_RELAXED) & bit)
			__atomic_fetch_sub(&k->ndirty, 1, __ATOMIC_RELAXED);
	}
}

uint64_t img_copy_ndirty(const struct img_copy *k)
{
	return __atomic_load_n(&k->ndirty, __ATOMIC_RELAXED);
}

uint64_t img_copy_remaining(const struct img_copy *k)
{
	uint64_t n = img_copy_ndirty(k) * (uint64_t)IMG_COPY_GRAN + (k->busy ? k->c_len : 0);

	if (k->scanning)
		n += k->size - k->scan_off;
	return n;
}

int img_copy_scan(struct img_copy *k)
{
	if (k->parked)
		return 0;
	for (unsigned n = 0; k->scanning && k->scan_off < k->size; n++) {
		uint64_t step = k->size - k->scan_off;
		bool alloc = false;

		if (n >= SCAN_BATCH)
			return 0;
		for (struct img *l = k->top; l && l != k->base; l = img_backing(l)) {
			uint64_t pnum = 0;
			int r;

			if (k->scan_off >= l->size) {
				/* as QEMU: the zeroes read past a short layer's end
				 * count as allocated there (the base, grown, reads
				 * zeroes past its old end by itself) */
				alloc = true;
				break;
			}
			r = img_block_status(l, k->scan_off, step, &pnum, &k->w);

			if (r == -EAGAIN) {
				k->parked = true; /* wake() comes */
				return 0;
			}
			if (r < 0) {
				snprintf(k->errmsg, sizeof(k->errmsg),
					 "reading the allocation map of %s: %s", l->path,
					 strerror(-r));
				return r;
			}
			if (pnum && pnum < step)
				step = pnum;
			if (r == 1)
				alloc = true;
		}
		if (alloc)
			img_copy_mark(k, k->scan_off, step);
		k->scan_off += step;
	}
	k->scanning = false;
	return 1;
}

/* The next dirty chunk at or after the cursor (wrapping), or UINT64_MAX. */
static uint64_t next_dirty(const struct img_copy *k)
{
	uint64_t nbytes = (k->nchunks + 7) / 8, b = (k->cursor / 8) % nbytes;

	if (!img_copy_ndirty(k))
		return UINT64_MAX;
	for (uint64_t n = 0; n < nbytes; n++, b = (b + 1) % nbytes) {
		uint8_t v = __atomic_load_n(&k->dirty[b], __ATOMIC_RELAXED);

		if (!v)
			continue;
		for (unsigned i = 0; i < 8; i++)
			if (v & (1u << i))
				return b * 8 + i;
	}
	return UINT64_MAX;
}

bool img_copy_next(struct img_copy *k, uint64_t max)
{
	uint64_t i = next_dirty(k), n, lim;

	if (i == UINT64_MAX || k->busy)
		return false;
	lim = max / IMG_COPY_GRAN;
	if (lim < 1)
		lim = 1;
	if (lim > IMG_COPY_MAX / IMG_COPY_GRAN)
		lim = IMG_COPY_MAX / IMG_COPY_GRAN;
	/* only this loop clears bits: one seen set stays set until cleared here */
	for (n = 0;
	     i + n < k->nchunks && n < lim &&
	     (__atomic_load_n(&k->dirty[(i + n) >> 3], __ATOMIC_RELAXED) & (1u << ((i + n) & 7)));
	     n++) {
		__atomic_fetch_and(&k->dirty[(i + n) >> 3], (uint8_t) ~(1u << ((i + n) & 7)),
				   __ATOMIC_RELAXED);
		__atomic_fetch_sub(&k->ndirty, 1, __ATOMIC_RELAXED);
	}
	k->cursor = i + n;
	k->c_off = i * IMG_COPY_GRAN;
	k->c_len = n * IMG_COPY_GRAN;
	if (k->c_len > k->size - k->c_off)
		k->c_len = k->size - k->c_off;
	k->busy = true;
	k->c_writing = false;
	k->c_res = 0;
	k->iov.iov_base = k->buf;
	k->iov.iov_len = k->c_len;
	k->io.done = copy_done;
	k->io.priv = k;
	img_readv(k->top, &k->io, &k->iov, 1, k->c_off, k->c_len);
	return true;
}

static bool all_zero(const void *buf, size_t len)
{
	const uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++)
		if (p[i])
			return false;
	return true;
}

static void copy_done(struct img_io *io, int res)
{
	struct img_copy *k = io->priv;

	if (res < 0) {
		k->busy = false;
		k->c_res = res;
		img_copy_mark(k, k->c_off, k->c_len); /* not copied */
		snprintf(k->errmsg, sizeof(k->errmsg), "%s %s at %" PRIu64 ": %s",
			 k->c_writing ? "writing" : "reading",
			 k->c_writing ? k->base->path : k->top->path, k->c_off, strerror(-res));
		k->wake(k, true);
		return;
	}
	if (!k->c_writing) {
		k->c_writing = true;
		if (all_zero(k->buf, k->c_len) && k->c_off >= k->zero_from) {
			k->busy = false; /* reads as zeroes in the base already */
			k->copied += k->c_len;
			k->wake(k, true);
		} else if (all_zero(k->buf, k->c_len)) {
			/* as QEMU's mirror: zeroes may give the base's clusters back */
			img_write_zeroes(k->base, &k->io, k->c_off, k->c_len, IMG_IO_UNMAP);
		} else
			img_writev(k->base, &k->io, &k->iov, 1, k->c_off, k->c_len);
		return;
	}
	k->busy = false;
	k->copied += k->c_len;
	k->wake(k, true);
}
