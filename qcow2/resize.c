/* SPDX-License-Identifier: MIT */
/*
 * qcow2/resize.c — online growth of the virtual size (qcow2_grow).
 *
 * The switch is one step of the engine's single thread: the new L1 table
 * (a larger in-memory copy), the new L1 place, the L1 size and the virtual
 * size change together, between two loop callbacks. A request mapped before
 * saw the old table and size, one mapped after sees the new ones; nothing
 * ever sees a half-switched L1 (mapping reads q->l1 through q, never through
 * a pointer kept across a wait).
 *
 * On disk, the write-back (writeback.c) makes it durable in the power-loss
 * order, in one batch that never runs in link mode:
 *   1. before the switch, the new L1 clusters were reserved at the end of the
 *      file, their refcounts raised in the cache (the allocator grows the
 *      refcount blocks and table as needed);
 *   2. P1 writes those refcounts                      -> fdatasync
 *   3. P3 writes the whole new L1 table at its new place, with every entry
 *      linked since the switch, and zeroes the rest of its clusters
 *                                                     -> fdatasync
 *   4. P4 writes the header's size, l1_size and l1_table_offset: the whole
 *      first sector, read when the batch is built, those 24 bytes patched
 *      (writeback.c hdr_item: through O_DIRECT, never the page cache)
 *                                                     -> fdatasync
 *   5. after that batch, the old L1 clusters go to the deferred decrements
 *      (released after a later durable batch, like every other decrement).
 * A crash before 4 leaves the old header: old size, old L1 table, which had
 * every entry written before the switch; no write past the old end was
 * reported complete before the batch that carried 4 (qcow2_link waits for
 * it). A crash after 4 leaves the new table. Either way at most the new L1
 * clusters (or the old ones) leak.
 *
 * Without L1 growth (the old table already covers the new size) only step 4
 * runs. Refused: shrinking, read-only or corrupt images, a grow already in
 * progress, v2 images with internal snapshots (QEMU refuses them too), an L1
 * table past QEMU's 32 MiB limit, and an inconsistent persistent dirty
 * bitmap (as QEMU). Persistent bitmaps grow with the disk in memory before
 * the switch (q2_bitmap_grow: a disabled one is loaded and marked in use
 * first, synchronously) and are stored for the new size at close.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static uint64_t l1_clusters(const struct qcow2 *q, uint64_t entries)
{
	return (entries * 8 + q->cs - 1) >> q->cb;
}

/* Entries needed to map @size bytes (QEMU's size_to_l1). */
static uint64_t size_to_l1(const struct qcow2 *q, uint64_t size)
{
	uint32_t shift = q->cb + q->l2_bits;

	return (size + (1ull << shift) - 1) >> shift;
}

void q2_grow_done(struct qcow2 *q, int err)
{
	struct qcow2_flush *f = q->grow_f;

	if (!f)
		return;
	q->grow_f = NULL;
	if (err)
		Q2_LOG(q, ERROR, "writing the new size failed: %s (the write-back retries it)",
		       strerror(-err));
	else
		Q2_LOG(q, INFO, "grown to %llu bytes (L1 table: %u entries at 0x%llx)",
		       (unsigned long long)q->size, q->l1_size,
		       (unsigned long long)q->h.l1_table_offset);
	f->done(f, err);
}

void q2_grow_written(struct qcow2 *q)
{
	if (q->l1_old_len) {
		q2_dec_range(q, q->l1_old_off, q->l1_old_len);
		q->l1_old_len = 0;
		q->l1_old_off = 0;
	}
}

/*
 * Set the new size in memory; the header is written by the next batch.
 * Caches sized by default grow to cover it (entries come on demand).
 */
static void set_size(struct qcow2 *q, uint64_t size)
{
	uint64_t l2, rc;

	q2_cache_defaults(q, size, &l2, &rc);
	if (q->l2c_auto && l2 / q->slice_size > q->l2c.soft_max)
		q->l2c.soft_max = l2 / q->slice_size;
	if (q->rcc_auto && rc / q->slice_size > q->rcc.soft_max)
		q->rcc.soft_max = rc / q->slice_size;
	q->size = size;
	q->h.size = size;
	q->h.l1_needed = size_to_l1(q, size);
	q->hdr_dirty = true;
}

/* Reserve the new L1 clusters and switch; 0, -EAGAIN (parked) or -errno. */
static int grow_step(struct qcow2 *q)
{
	uint64_t need = size_to_l1(q, q->grow_size), host, *nl1;
	uint32_t n = (uint32_t)l1_clusters(q, need), old = q->l1_size;
	uint8_t *ndirty, *nbad;
	bool fresh;
	int ret;

	for (;;) {
		ret = q2_alloc_clusters(q, n, true, &host, &fresh, &q->grow_w);
		if (ret < 0)
			return ret;
		if ((uint32_t)ret == n)
			break;
		/* not contiguous here: give them back and look further on */
		q2_alloc_release(q, host, (uint32_t)ret);
	}
	nl1 = calloc(need, sizeof(*nl1));
	ndirty = calloc((need * 8 + 511) / 512 / 8 + 1, 1);
	nbad = calloc(need / 8 + 1, 1);
	if (!nl1 || !ndirty || !nbad) {
		free(nl1);
		free(ndirty);
		free(nbad);
		q2_alloc_release(q, host, n);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (q2_meta_add(q, (host >> q->cb) + i) < 0) {
			while (i--)
				q2_meta_del(q, (host >> q->cb) + i);
			free(nl1);
			free(ndirty);
			free(nbad);
			q2_alloc_release(q, host, n);
			return -ENOMEM;
		}
	}
	/* the switch: one step of the loop's thread */
	if (old) {
		memcpy(nl1, q->l1, (size_t)old * sizeof(*nl1));
		memcpy(nbad, q->l1_bad, old / 8 + 1);
	}
	free(q->l1);
	free(q->l1_dirty);
	free(q->l1_bad);
	q->l1 = nl1;
	q->l1_dirty = ndirty;
	q->l1_ndirty = 0;
	q->l1_bad = nbad;
	if (old) {
		q->l1_old_off = q->h.l1_table_offset;
		q->l1_old_len = l1_clusters(q, old) << q->cb;
	}
	q->l1_size = (uint32_t)need;
	q->h.l1_size = (uint32_t)need;
	q->h.l1_table_offset = host;
	q->l1_relocated = true;
	set_size(q, q->grow_size);
	return 0;
}

static void grow_wake(struct qcow2_waiter *w)
{
	struct qcow2 *q = w->priv;
	int ret = w->err;

	if (!ret)
		ret = grow_step(q);
	if (ret == -EAGAIN)
		return;
	if (ret < 0) {
		q2_grow_done(q, ret);
		return;
	}
	q2_wb_kick(q);
}

int qcow2_grow(struct qcow2 *q, uint64_t size, struct qcow2_flush *f, char *err, size_t errlen)
{
	uint64_t need;
	int ret;

	if (size % 512)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "%s: the new size must be a multiple of 512", q->path);
	if (size < q->size)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "%s: qcow2 doesn't support shrinking images yet", q->path);
	if (q->read_only)
		return qcow2_seterr(err, errlen, -EROFS, "%s: the image is read-only", q->path);
	if (q->corrupt)
		return qcow2_seterr(err, errlen, -EIO, "%s: the image is corrupt", q->path);
	if (q->grow_f || q->l1_relocated || q->hdr_dirty || q->l1_old_len)
		return qcow2_seterr(err, errlen, -EBUSY,
				    "%s: a resize is still in progress (or being retried)",
				    q->path);
	if (q->h.version < 3 && q->h.nb_snapshots)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "%s: Can't resize a v2 image which has snapshots", q->path);
	ret = q2_bitmap_grow_check(q, size, err, errlen);
	if (ret < 0)
		return ret;
	need = size_to_l1(q, size);
	if (need > QCOW2_MAX_L1_ENTRIES || (need << (q->cb + q->l2_bits)) < size)
		return qcow2_seterr(err, errlen, -EFBIG,
				    "%s: the new size needs an L1 table larger than %u bytes",
				    q->path, QCOW2_MAX_L1_BYTES);
	if (need > q->l1_size && l1_clusters(q, need) > (1ull << q->src_bits))
		return qcow2_seterr(err, errlen, -EFBIG,
				    "%s: the new L1 table would need more than %llu contiguous "
				    "clusters",
				    q->path, (unsigned long long)(1ull << q->src_bits));
	if (size == q->size)
		return 0;
	/* the bitmaps cover the new size before it is in effect (bitmap.c) */
	ret = q2_bitmap_grow(q, size, err, errlen);
	if (ret < 0)
		return ret;
	q->grow_f = f;
	if (need <= q->l1_size) {
		set_size(q, size);
		q2_wb_kick(q);
		return 1;
	}
	q->grow_size = size;
	q->grow_w.wake = grow_wake;
	q->grow_w.priv = q;
	ret = grow_step(q);
	if (ret == -EAGAIN)
		return 1;
	if (ret < 0) {
		q->grow_f = NULL;
		return qcow2_seterr(err, errlen, ret, "%s: cannot grow the L1 table: %s", q->path,
				    strerror(-ret));
	}
	q2_wb_kick(q);
	return 1;
}
