/* SPDX-License-Identifier: MIT */
/*
 * Internal snapshots (image.h): create, delete and revert to, synchronously,
 * over the caller's struct qcow2_io, with nothing else using the image.
 *
 * Refcount semantics (the qcow2 spec, and what every checker counts): a
 * cluster's refcount is the number of L1 walks (the active table and each
 * snapshot's) that reach it, so a snapshot raises by one the refcount of
 * every L2 table its L1 table names and of every cluster those L2 tables
 * name, even where L2 tables are shared. COPIED (bit 63) in the active
 * tables says "refcount exactly 1: write in place".
 *
 * Crash safety (a kill or power loss at any point leaks at most):
 *  - create writes the L1 copy and the new snapshot table first, into
 *    clusters nothing names and whose refcount is 0 on disk; then the
 *    refcount raises are made durable (refcount blocks, then the refcount
 *    table for new blocks, each followed by a sync) before anything that
 *    needs them is written: the COPIED changes, the header; delete's
 *    raises (its new table) are durable before the table is written;
 *  - create clears COPIED in the active tables (synced) before the header
 *    names the new snapshot, so no writer can overwrite what it shares;
 *  - delete first commits the table without the snapshot (header synced),
 *    then sets COPIED where the refcount will be 1 (synced: harmless while
 *    the refcount is still higher, the snapshot being gone), then lowers the
 *    refcounts;
 *  - the header's snapshot count and table offset are one 12-byte write
 *    inside one sector;
 *  - when new clusters lie past the refcount table's reach, the table grows
 *    as the engine grows it (qcow2_reftable_layout, qcow2/alloc.c): new
 *    refcount blocks at the end of everything, describing themselves and
 *    the new table after them; the blocks written and synced, then the whole
 *    new table, synced, then the header's table offset and size (one 12-byte
 *    write inside one sector), synced; only then is the old table's
 *    refcount lowered. A crash before the header write leaves the old table
 *    and clusters past the end of what it describes (nothing counts them, or
 *    a leak); after it, the old table's clusters leaked at most.
 * A crash can leave clusters whose refcount is too high (leaks) and COPIED
 * flags that disagree with such a refcount; `qemu-img check -r all` (or
 * `-r leaks`, for most windows) repairs both; no refcount is ever too low.
 *
 * The writes of a delete, and what a crash after each leaves (qemu-img
 * check; "leaks" = refcount above the use, repaired by -r leaks):
 *  1. the refcount blocks raising the new table's clusters, sync: leaks;
 *  2. the new table, sync: leaks (nothing names it);
 *  3. the header (count, offset), sync: the snapshot is gone; what only it
 *     held, the old table and everything it shared leak (COPIED still clear
 *     in the active tables, which agrees with those refcounts);
 *  4. the active L2 tables (then the L1 table) with COPIED set where the
 *     refcount will be 1, sync: on those clusters COPIED set at a refcount
 *     of 2 that is a leak: "ERROR OFLAG_COPIED" for qemu-img check, but
 *     harmless (the cluster is used once) and gone after -r leaks;
 *  5. the refcount blocks lowered, one by one, sync: each block written
 *     makes its clusters exact.
 * Steps 4 and 5 change a COPIED flag and a refcount in two clusters: no
 * order passes from "COPIED clear, 2" to "COPIED set, 1" without one of
 * "set, 2" or "clear, 1" on disk in between; "set, 2" on a leak is the one
 * -r leaks repairs and that no writer can misuse. An apply (revert):
 *  1. the refcount blocks raising what the snapshot names, sync: leaks;
 *  2. the snapshot's L2 tables where a COPIED flag disagrees with the
 *     refcounts (none, normally: nothing the snapshot names drops to 1),
 *     then the new active L1 table in place, sync: reverted; the old active
 *     tables' clusters leak;
 *  3. the refcount blocks lowered, sync: exact.
 * A failed create's undo (below) lowers the raises before setting COPIED
 * again: a crash between leaves "COPIED clear, 1" (an ERROR for qemu-img
 * check, repaired by -r all; writes there copy, harmlessly); the other
 * order would leave "set, 2" on a leak: an ERROR too.
 *
 * Failure (an error returned, not a crash: ENOSPC, EIO): a create that fails
 * before the header names its snapshot leaves the image as it was. Until its
 * refcounts reach the disk nothing is to undo; after that it lowers them
 * again and restores COPIED (create_undo), so that `qemu-img check` finds no
 * error (COPIED set on a cluster whose refcount is 2 is one, and a write in
 * place there would be wrong once a snapshot did share it). Once the header
 * write succeeded, nothing is undone (the snapshot may be named): a later
 * failure leaks the old table at most, and the snapshot is reported made.
 * A delete that fails before its header write leaves the image as it was
 * but for the new table's clusters (leaked); after it, the snapshot is gone
 * and the delete reports success once COPIED agrees with the refcounts on
 * disk again (settle: the lowerings not written leak, COPIED set where the
 * failure kept a refcount at 2 is cleared again). An apply that fails
 * before it tries to write its L1 table lowers its raises again (the active
 * layer as it was); once it tried (a failed write may have left any part of
 * the table on disk), it settles as the delete does and reports success.
 * Only a second failure (during settle or the undo) returns an error with
 * such a window left: leaks and COPIED disagreeing, as after a crash.
 */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image.h"

struct sctx {
	struct qcow2_oimg *im;
	const struct qcow2_io *io;
	uint64_t cs;
	unsigned cb, order, rbb;
	uint64_t nrb;      /* refcount table entries */
	uint8_t **rb;      /* refcount blocks read or created, by table index */
	uint8_t *rb_dirty; /* by table index */
	bool rt_dirty;
	uint64_t rt_new_off; /* a grown table not yet named by the header (0: none) */
	uint64_t rt_new_cl;  /* its clusters */
	uint64_t next;       /* allocation cursor (cluster index) */
	uint64_t limit;      /* clusters the file can hold (UINT64_MAX: it grows) */
	uint64_t *freed;     /* clusters whose refcount dropped to 0 */
	size_t nfreed, freed_cap;
	uint64_t to_one; /* refcounts lowered to exactly 1 (COPIED may now be set) */
	/* fix_copied wrote the L1 table, or tried to: a failed write may have
	 * reached the disk in part (EIO, a short write), so it counts too */
	bool l1_written;
	struct {
		uint64_t off;
		uint8_t *buf;
	} * l2c; /* L2 tables read, kept for the next walk (up to L2C_BYTES) */
	size_t l2n, l2cap;
	char *err;
	size_t errlen;
};

#define FAIL(c, ret, ...) qcow2_seterr((c)->err, (c)->errlen, ret, __VA_ARGS__)

static int bmd_front(struct sctx *c, uint64_t *front);

static int ctx_init(struct sctx *c, struct qcow2_oimg *im, char *err, size_t errlen)
{
	memset(c, 0, sizeof(*c));
	c->im = im;
	c->io = &im->io;
	c->cb = im->h.cluster_bits;
	c->cs = 1ull << c->cb;
	c->order = im->h.refcount_order;
	c->rbb = im->h.refcount_block_bits;
	c->nrb = im->h.refcount_table_entries;
	c->err = err;
	c->errlen = errlen;
	c->next = (im->file_size + c->cs - 1) >> c->cb;
	c->limit = UINT64_MAX;
	c->rb = calloc(c->nrb ? c->nrb : 1, sizeof(*c->rb));
	c->rb_dirty = calloc(c->nrb ? c->nrb : 1, 1);
	if (!c->rb || !c->rb_dirty)
		return -ENOMEM;
	/*
	 * A block device: its size is not the end of what is in use (that
	 * put every new cluster past the device's end); allocate from one past
	 * the last cluster with a refcount, and never past the device.
	 */
	if (c->io->fixed_size) {
		c->limit = im->file_size >> c->cb;
		return bmd_front(c, &c->next);
	}
	return 0;
}

static void ctx_free(struct sctx *c)
{
	for (size_t i = 0; i < c->l2n; i++)
		free(c->l2c[i].buf);
	free(c->l2c);
	for (uint64_t i = 0; c->rb && i < c->nrb; i++)
		free(c->rb[i]);
	free(c->freed);
	free(c->rb);
	free(c->rb_dirty);
}

/* The refcount block of table index @idx (NULL: none there). */
static int rblock(struct sctx *c, uint64_t idx, uint8_t **out)
{
	uint64_t off;
	int ret;

	*out = NULL;
	if (idx >= c->nrb)
		return 0;
	if (c->rb[idx]) {
		*out = c->rb[idx];
		return 0;
	}
	off = c->im->rt[idx] & QCOW2_RTE_OFFSET_MASK;
	if (!off)
		return 0;
	if ((off & (c->cs - 1)) || (c->im->rt[idx] & QCOW2_RTE_RESERVED_MASK))
		return FAIL(c, -EIO, "refcount table entry %" PRIu64 " is invalid", idx);
	c->rb[idx] = malloc(c->cs);
	if (!c->rb[idx])
		return -ENOMEM;
	ret = qcow2_io_read(c->io, c->rb[idx], c->cs, off);
	if (ret < 0) {
		free(c->rb[idx]);
		c->rb[idx] = NULL;
		return FAIL(c, ret, "reading the refcount block at 0x%" PRIx64 ": %s", off,
			    strerror(-ret));
	}
	*out = c->rb[idx];
	return 0;
}

static int rc_get(struct sctx *c, uint64_t cl, uint64_t *v)
{
	uint8_t *b;
	int ret = rblock(c, cl >> c->rbb, &b);

	*v = 0;
	if (ret < 0 || !b)
		return ret;
	*v = qcow2_refcount_get(b, cl & ((1ull << c->rbb) - 1), c->order);
	return 0;
}

static int rc_add(struct sctx *c, uint64_t cl, int delta)
{
	uint64_t idx = cl >> c->rbb, v;
	uint8_t *b;
	int ret = rblock(c, idx, &b);

	if (ret < 0)
		return ret;
	if (!b)
		return FAIL(c, -EIO, "cluster %" PRIu64 " is in use but has no refcount block", cl);
	v = qcow2_refcount_get(b, cl & ((1ull << c->rbb) - 1), c->order);
	if (delta < 0 && v == 0)
		return FAIL(c, -EIO,
			    "cluster %" PRIu64 " is in use but its refcount is 0 (run 'qemu-img "
			    "check -r all')",
			    cl);
	if (delta > 0 && v >= qcow2_refcount_max(c->order))
		return FAIL(c, -EOVERFLOW,
			    "refcount of cluster %" PRIu64 " would overflow (refcount_bits=%u)", cl,
			    1u << c->order);
	qcow2_refcount_set(b, cl & ((1ull << c->rbb) - 1), c->order, delta < 0 ? v - 1 : v + 1);
	c->rb_dirty[idx] = 1;
	if (delta < 0 && v == 2)
		c->to_one++;
	if (delta < 0 && v == 1) {
		if (c->nfreed == c->freed_cap) {
			size_t cap = c->freed_cap ? 2 * c->freed_cap : 256;
			uint64_t *p = realloc(c->freed, cap * sizeof(*p));

			if (!p)
				return 0; /* only the hole punch is lost */
			c->freed = p;
			c->freed_cap = cap;
		}
		c->freed[c->nfreed++] = cl;
	}
	return 0;
}

static int rc_add_range(struct sctx *c, uint64_t off, uint64_t len, int delta)
{
	if (!len)
		return 0;
	for (uint64_t k = off >> c->cb; k <= (off + len - 1) >> c->cb; k++) {
		int ret = rc_add(c, k, delta);

		if (ret < 0)
			return ret;
	}
	return 0;
}

/*
 * Grow the refcount table in memory so that table index @need is covered:
 * new refcount blocks at cluster @a (the cursor, past the old reach) and
 * the new table after them, all with refcount 1 in those new blocks (see
 * the header comment for the order rc_flush writes them in). A table grown
 * before and not yet written is given up (its clusters back to 0).
 */
static int rt_grow(struct sctx *c, uint64_t a, uint64_t need)
{
	uint64_t entries, nb, nt, *rt;
	uint8_t **rb, *rbd;
	int ret;

	ret = qcow2_reftable_layout(c->cb, c->rbb, c->nrb, need, a, &entries, &nb, &nt);
	if (ret < 0)
		return FAIL(c, ret, "the refcount table would exceed %u bytes",
			    QCOW2_MAX_REFTABLE_BYTES);
	if (a > c->limit || nb + nt > c->limit - a)
		return FAIL(c, -ENOSPC,
			    "no room on the device (%" PRIu64 " bytes) for a larger refcount table",
			    c->im->file_size);
	rt = realloc(c->im->rt, entries * sizeof(*rt));
	if (!rt)
		return -ENOMEM;
	c->im->rt = rt;
	rb = realloc(c->rb, entries * sizeof(*rb));
	if (!rb)
		return -ENOMEM;
	c->rb = rb;
	rbd = realloc(c->rb_dirty, entries);
	if (!rbd)
		return -ENOMEM;
	c->rb_dirty = rbd;
	for (uint64_t i = c->nrb; i < entries; i++) {
		rt[i] = 0;
		rb[i] = NULL;
		rbd[i] = 0;
	}
	c->nrb = entries;
	for (uint64_t k = 0; k < nb; k++) {
		uint64_t idx = (a >> c->rbb) + k;

		rb[idx] = calloc(1, c->cs);
		if (!rb[idx])
			return -ENOMEM;
		rbd[idx] = 1;
		rt[idx] = (a + k) << c->cb;
	}
	for (uint64_t k = a; k < a + nb + nt; k++)
		qcow2_refcount_set(rb[k >> c->rbb], k & ((1ull << c->rbb) - 1), c->order, 1);
	if (c->rt_new_cl) {
		ret = rc_add_range(c, c->rt_new_off, c->rt_new_cl << c->cb, -1);
		if (ret < 0)
			return ret;
	}
	c->rt_new_off = (a + nb) << c->cb;
	c->rt_new_cl = nt;
	c->rt_dirty = true;
	c->next = a + nb + nt;
	return 0;
}

/*
 * Reserve @n contiguous free clusters past the end of everything (refcount 1
 * in memory; durable at the next rc_flush). A missing refcount block is
 * created in the first cluster it is needed for, describing itself. On a
 * block device, -ENOSPC where the clusters (or a grown refcount table,
 * rt_grow) would pass its end: before anything is written.
 */
static int alloc(struct sctx *c, uint64_t n, uint64_t *off)
{
	for (;;) {
		uint64_t s = c->next, k;

		if (s > c->limit || n > c->limit - s)
			return FAIL(c, -ENOSPC,
				    "no room for %" PRIu64 " more clusters on the device (%" PRIu64
				    " bytes)",
				    n, c->im->file_size);

		for (k = s; k < s + n; k++) {
			uint64_t idx = k >> c->rbb, v;
			uint8_t *b;
			int ret;

			if (idx >= c->nrb) {
				ret = rt_grow(c, k, idx);
				if (ret < 0)
					return ret;
				break; /* the cursor moved past the new area */
			}
			ret = rblock(c, idx, &b);
			if (ret < 0)
				return ret;
			if (!b) {
				b = calloc(1, c->cs);
				if (!b)
					return -ENOMEM;
				c->rb[idx] = b;
				c->rb_dirty[idx] = 1;
				c->im->rt[idx] = k << c->cb;
				c->rt_dirty = true;
				qcow2_refcount_set(b, k & ((1ull << c->rbb) - 1), c->order, 1);
				c->next = k + 1;
				break;
			}
			ret = rc_get(c, k, &v);
			if (ret < 0)
				return ret;
			if (v) {
				c->next = k + 1;
				break;
			}
		}
		if (k < s + n)
			continue;
		for (k = s; k < s + n; k++) {
			int ret = rc_add(c, k, 1);

			if (ret < 0)
				return ret;
		}
		c->next = s + n;
		*off = s << c->cb;
		return 0;
	}
}

static int sync_io(struct sctx *c)
{
	int ret = qcow2_io_sync(c->io);

	return ret < 0 ? FAIL(c, ret, "sync: %s", strerror(-ret)) : 0;
}

/*
 * Give the file system back the clusters freed (refcount 0, durable: call
 * after the last rc_flush), in runs, through @punch (may be NULL).
 */
static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void punch_freed(struct sctx *c, const struct qcow2_snap_punch *punch)
{
	uint64_t start = 0, len = 0;

	if (!punch || !punch->fn || !c->nfreed)
		return;
	qsort(c->freed, c->nfreed, sizeof(*c->freed), cmp_u64);
	for (size_t i = 0; i < c->nfreed; i++) {
		uint64_t v;

		/* still free (nothing allocated it again since) */
		if (rc_get(c, c->freed[i], &v) < 0 || v)
			continue;
		if (len && c->freed[i] == start + len) {
			len++;
			continue;
		}
		if (len)
			punch->fn(punch->opaque, start << c->cb, len << c->cb);
		start = c->freed[i];
		len = 1;
	}
	if (len)
		punch->fn(punch->opaque, start << c->cb, len << c->cb);
}

/* Write the changed refcount blocks, then sync. */
static int rb_flush(struct sctx *c)
{
	bool any = false;
	int ret;

	for (uint64_t i = 0; i < c->nrb; i++) {
		if (!c->rb_dirty[i])
			continue;
		ret = qcow2_io_write(c->io, c->rb[i], c->cs, c->im->rt[i] & QCOW2_RTE_OFFSET_MASK);
		if (ret < 0)
			return FAIL(c, ret, "writing a refcount block: %s", strerror(-ret));
		c->rb_dirty[i] = 0;
		any = true;
	}
	return any ? sync_io(c) : 0;
}

/*
 * A grown table (rt_grow): the whole table at its new place, sync, then the
 * header names it (offset and clusters: 12 bytes in one sector), sync; then
 * the old table's clusters are lowered (in memory: the caller writes them).
 */
static int rt_switch(struct sctx *c)
{
	uint64_t len = c->rt_new_cl << c->cb, old_off = c->im->h.refcount_table_offset;
	uint64_t old_len = (uint64_t)c->im->h.refcount_table_clusters << c->cb;
	uint8_t *t = calloc(1, len), hdr[12];
	int ret;

	if (!t)
		return -ENOMEM;
	for (uint64_t i = 0; i < c->nrb; i++)
		qcow2_put_be64(t + i * 8, c->im->rt[i]);
	ret = qcow2_io_write(c->io, t, len, c->rt_new_off);
	free(t);
	if (ret < 0)
		return FAIL(c, ret, "writing the new refcount table: %s", strerror(-ret));
	ret = sync_io(c);
	if (ret < 0)
		return ret;
	qcow2_put_be64(hdr, c->rt_new_off);
	qcow2_put_be32(hdr + 8, (uint32_t)c->rt_new_cl);
	ret = qcow2_io_write(c->io, hdr, sizeof(hdr), QCOW2_OFF_REFCOUNT_TABLE_OFFSET);
	if (ret < 0)
		return FAIL(c, ret, "writing the header: %s", strerror(-ret));
	ret = sync_io(c);
	if (ret < 0)
		return ret;
	/* the header as the image has it now (a bitmap edit rewrites it from hbuf) */
	if (c->im->hlen >= QCOW2_OFF_REFCOUNT_TABLE_OFFSET + sizeof(hdr))
		memcpy(c->im->hbuf + QCOW2_OFF_REFCOUNT_TABLE_OFFSET, hdr, sizeof(hdr));
	c->im->h.refcount_table_offset = c->rt_new_off;
	c->im->h.refcount_table_clusters = (uint32_t)c->rt_new_cl;
	c->im->h.refcount_table_entries = c->nrb;
	c->rt_new_off = c->rt_new_cl = 0;
	c->rt_dirty = false;
	return rc_add_range(c, old_off, old_len, -1);
}

/*
 * Write the changed refcount blocks, sync; then a grown table and the header
 * (rt_switch) and the old table's release, or the changed table entries in
 * place, sync.
 */
static int rc_flush(struct sctx *c)
{
	int ret = rb_flush(c);

	if (ret < 0)
		return ret;
	if (c->rt_new_cl) {
		ret = rt_switch(c);
		return ret < 0 ? ret : rb_flush(c);
	}
	if (!c->rt_dirty)
		return 0;
	{
		size_t len = (size_t)c->nrb * 8;
		uint8_t *t = malloc(len ? len : 1);

		if (!t)
			return -ENOMEM;
		for (uint64_t i = 0; i < c->nrb; i++)
			qcow2_put_be64(t + i * 8, c->im->rt[i]);
		ret = qcow2_io_write(c->io, t, len, c->im->h.refcount_table_offset);
		free(t);
		if (ret < 0)
			return FAIL(c, ret, "writing the refcount table: %s", strerror(-ret));
	}
	c->rt_dirty = false;
	return sync_io(c);
}

static bool l2_ok(struct sctx *c, uint64_t l2)
{
	return !(l2 & (c->cs - 1)) && l2 < c->im->file_size;
}

/*
 * L2 tables are read one at a time, synchronously (a 1 TiB image with 2048
 * L2 tables spent 0.65 s reading them per walk), and create and delete walk
 * them twice (refcounts, then COPIED): the tables read are kept, up to
 * L2C_BYTES, so the second walk reads only what did not fit.
 */
#define L2C_BYTES (32u << 20)

static int l2_find(struct sctx *c, uint64_t off)
{
	for (size_t i = 0; i < c->l2n; i++)
		if (c->l2c[i].off == off)
			return (int)i;
	return -1;
}

static int l2_read(struct sctx *c, uint8_t *buf, uint64_t off)
{
	int i = l2_find(c, off), ret;

	if (i >= 0) {
		memcpy(buf, c->l2c[i].buf, c->cs);
		return 0;
	}
	ret = qcow2_io_read(c->io, buf, c->cs, off);
	if (ret < 0)
		return FAIL(c, ret, "reading the L2 table at 0x%" PRIx64 ": %s", off,
			    strerror(-ret));
	if ((c->l2n + 1) * c->cs <= L2C_BYTES) {
		uint8_t *copy;

		if (c->l2n == c->l2cap) {
			size_t cap = c->l2cap ? 2 * c->l2cap : 64;
			void *p = realloc(c->l2c, cap * sizeof(*c->l2c));

			if (!p)
				return 0; /* not kept: read again */
			c->l2c = p;
			c->l2cap = cap;
		}
		copy = malloc(c->cs);
		if (copy) {
			memcpy(copy, buf, c->cs);
			c->l2c[c->l2n].off = off;
			c->l2c[c->l2n++].buf = copy;
		}
	}
	return 0;
}

/*
 * Write bytes [@lo, @hi) of the L2 table @buf at @off, in whole sectors (a
 * table QEMU wrote slice by slice keeps its holes), and the kept copy.
 */
static int l2_write(struct sctx *c, const uint8_t *buf, uint64_t off, uint64_t lo, uint64_t hi)
{
	int i = l2_find(c, off), ret;

	lo &= ~511ull;
	hi = (hi + 511) & ~511ull;
	if (hi > c->cs)
		hi = c->cs;
	ret = qcow2_io_write(c->io, buf + lo, hi - lo, off + lo);

	if (ret < 0) {
		if (i >= 0) { /* unknown content now: forget it */
			free(c->l2c[i].buf);
			c->l2c[i] = c->l2c[--c->l2n];
		}
		return FAIL(c, ret, "writing the L2 table at 0x%" PRIx64 ": %s", off,
			    strerror(-ret));
	}
	if (i >= 0)
		memcpy(c->l2c[i].buf, buf, c->cs);
	return 0;
}

/*
 * Change by @delta, in memory, the refcount of every L2 table the L1 table
 * @l1 (@n entries) names and of every cluster those tables name.
 */
static int walk_refs(struct sctx *c, const uint64_t *l1, uint32_t n, int delta)
{
	const struct qcow2_header_info *h = &c->im->h;
	uint8_t *l2 = malloc(c->cs);
	int ret = 0;

	if (!l2)
		return -ENOMEM;
	for (uint32_t i = 0; i < n && ret == 0; i++) {
		uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;

		if (!off)
			continue;
		if (!l2_ok(c, off)) {
			ret = FAIL(c, -EIO, "L1 entry %u: invalid L2 table offset 0x%" PRIx64, i,
				   off);
			break;
		}
		ret = l2_read(c, l2, off);
		if (ret < 0)
			break;
		for (uint64_t j = 0; j < c->cs / h->l2_entry_size && ret == 0; j++) {
			uint64_t e = qcow2_be64(l2 + j * h->l2_entry_size);

			switch (qcow2_cluster_type(e, h->extended_l2, false)) {
			case QCOW2_CT_COMPRESSED:
				ret = rc_add_range(c, qcow2_compressed_offset(e, c->cb),
						   qcow2_compressed_len(e, c->cb), delta);
				break;
			case QCOW2_CT_NORMAL:
			case QCOW2_CT_ZERO_ALLOC:
				if (e & QCOW2_L2E_OFFSET_MASK)
					ret =
					    rc_add(c, (e & QCOW2_L2E_OFFSET_MASK) >> c->cb, delta);
				break;
			default:
				break;
			}
		}
		if (ret == 0)
			ret = rc_add(c, off >> c->cb, delta);
	}
	free(l2);
	return ret;
}

/*
 * Make COPIED in the active tables (@l1, @n entries, stored at @l1_off) say
 * what the refcounts in memory say; write the L2 tables that change, then
 * the L1 table if it changed (or @force), then sync.
 */
static int fix_copied(struct sctx *c, uint64_t *l1, uint32_t n, uint64_t l1_off, bool force)
{
	const struct qcow2_header_info *h = &c->im->h;
	uint8_t *l2 = malloc(c->cs);
	bool l1_changed = force;
	int ret = 0;

	if (!l2)
		return -ENOMEM;
	for (uint32_t i = 0; i < n && ret == 0; i++) {
		uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK, v, ne, lo = c->cs, hi = 0;

		if (!off)
			continue;
		ret = l2_read(c, l2, off);
		if (ret < 0)
			break;
		for (uint64_t j = 0; j < c->cs / h->l2_entry_size && ret == 0; j++) {
			uint8_t *p = l2 + j * h->l2_entry_size;
			uint64_t e = qcow2_be64(p);
			enum qcow2_cluster_type t = qcow2_cluster_type(e, h->extended_l2, false);

			if ((t != QCOW2_CT_NORMAL && t != QCOW2_CT_ZERO_ALLOC) ||
			    !(e & QCOW2_L2E_OFFSET_MASK))
				continue;
			ret = rc_get(c, (e & QCOW2_L2E_OFFSET_MASK) >> c->cb, &v);
			ne = v == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
			if (ret == 0 && ne != e) {
				qcow2_put_be64(p, ne);
				if (lo > j * h->l2_entry_size)
					lo = j * h->l2_entry_size;
				hi = (j + 1) * h->l2_entry_size;
			}
		}
		if (ret == 0 && hi)
			ret = l2_write(c, l2, off, lo, hi);
		if (ret == 0)
			ret = rc_get(c, off >> c->cb, &v);
		ne = v == 1 ? l1[i] | QCOW2_OFLAG_COPIED : l1[i] & ~QCOW2_OFLAG_COPIED;
		if (ret == 0 && ne != l1[i]) {
			l1[i] = ne;
			l1_changed = true;
		}
	}
	free(l2);
	if (ret == 0 && l1_changed) {
		uint8_t *t = malloc((size_t)n * 8 + 1);

		if (!t)
			return -ENOMEM;
		for (uint32_t i = 0; i < n; i++)
			qcow2_put_be64(t + (size_t)i * 8, l1[i]);
		c->l1_written = true; /* from here the disk may hold any part of it */
		ret = qcow2_io_write(c->io, t, (size_t)n * 8, l1_off);
		free(t);
		if (ret < 0)
			ret = FAIL(c, ret, "writing the L1 table: %s", strerror(-ret));
	}
	return ret < 0 ? ret : sync_io(c);
}

/*
 * Forget the refcount changes that did not reach the disk (the blocks whose
 * write failed or was not tried): the blocks are read again when needed, so
 * that the refcounts in memory are those on disk. Only where nothing was
 * allocated since the last rc_flush (no new block or table to forget).
 */
static int rb_forget(struct sctx *c)
{
	if (c->rt_dirty || c->rt_new_cl)
		return FAIL(c, -EIO, "refcount table changes not written");
	for (uint64_t i = 0; i < c->nrb; i++) {
		if (!c->rb_dirty[i])
			continue;
		free(c->rb[i]);
		c->rb[i] = NULL;
		c->rb_dirty[i] = 0;
	}
	c->nfreed = 0; /* nothing freed on disk: nothing to punch */
	return 0;
}

/*
 * After a failure between an operation's commit and its last refcount
 * write (delete, apply): make COPIED in the active tables @l1 (at @l1_off)
 * say what the refcounts on disk say. The refcounts not written stay
 * higher than the use (leaks); COPIED set where a lowering did not reach
 * the disk, or clear where it did, would be an error for `qemu-img check`
 * (and the first a write in place where a higher refcount may mean
 * shared). 0: the image is consistent, leaks at most.
 */
static int settle(struct sctx *c, uint64_t *l1, uint32_t n, uint64_t l1_off)
{
	int ret = rb_forget(c);

	return ret < 0 ? ret : fix_copied(c, l1, n, l1_off, true);
}

/*
 * Add to @err, the message of a failed operation, what its recovery said:
 * @pre, the recovery's own message @rerr (or @rret's strerror), @post.
 */
static void err_cat(char *err, size_t errlen, const char *pre, const char *rerr, int rret,
		    const char *post)
{
	size_t l;

	if (!err || !errlen)
		return;
	l = strnlen(err, errlen - 1);
	snprintf(err + l, errlen - l, "%s%s%s", pre, rerr[0] ? rerr : strerror(-rret), post);
}

static bool same(const char *s, size_t len, const char *want)
{
	return want && strlen(want) == len && memcmp(s, want, len) == 0;
}

/* QEMU's lookup: both given, both must match; else the one given. -1: none. */
static int find(const struct qcow2_oimg *im, const char *id, const char *name)
{
	for (uint32_t i = 0; i < im->h.nb_snapshots; i++) {
		const struct qcow2_snapshot_info *s = &im->snaps[i];

		if (id && !same(s->id, s->id_len, id))
			continue;
		if (name && !same(s->name, s->name_len, name))
			continue;
		if (id || name)
			return (int)i;
	}
	return -1;
}

static void describe(const struct qcow2_snapshot_info *s, struct qcow2_snap_desc *d)
{
	memset(d, 0, sizeof(*d));
	snprintf(d->id, sizeof(d->id), "%.*s", (int)s->id_len, s->id);
	snprintf(d->name, sizeof(d->name), "%.*s", (int)s->name_len, s->name);
	d->vm_state_size = s->vm_state_size;
	d->date_sec = s->date_sec;
	d->date_nsec = s->date_nsec;
	d->vm_clock_nsec = s->vm_clock_nsec;
	d->disk_size = s->disk_size;
	d->icount = -1;
	if (s->extra_data_size >= 24) {
		const uint8_t *x = (const uint8_t *)s->id - s->extra_data_size;

		d->icount = (int64_t)qcow2_be64(x + 16);
	}
}

/* Serialize the table without entry @skip (-1: none) plus @add (NULL: none). */
static int build_table(struct sctx *c, int skip, const struct qcow2_snap_desc *add, uint32_t add_l1,
		       uint64_t add_l1_off, uint8_t **out, uint64_t *len, uint32_t *count)
{
	const struct qcow2_oimg *im = c->im;
	uint64_t n = 0, cap = im->snapbuf_len + 512;
	uint8_t *b;
	uint32_t cnt = 0;

	if (add)
		cap += 40 + 24 + strlen(add->id) + strlen(add->name) + 8;
	b = calloc(1, cap);
	if (!b)
		return -ENOMEM;
	for (uint32_t i = 0; i < im->h.nb_snapshots; i++) {
		const struct qcow2_snapshot_info *s = &im->snaps[i];
		const uint8_t *start = (const uint8_t *)s->id - s->extra_data_size - 40;

		if ((int)i == skip)
			continue;
		memcpy(b + n, start, s->raw_len);
		n += s->entry_len;
		cnt++;
	}
	if (add) {
		uint8_t *e = b + n;
		size_t il = strlen(add->id), nl = strlen(add->name);

		qcow2_put_be64(e, add_l1_off);
		qcow2_put_be32(e + 8, add_l1);
		qcow2_put_be16(e + 12, (uint16_t)il);
		qcow2_put_be16(e + 14, (uint16_t)nl);
		qcow2_put_be32(e + 16, add->date_sec);
		qcow2_put_be32(e + 20, add->date_nsec);
		qcow2_put_be64(e + 24, add->vm_clock_nsec);
		qcow2_put_be32(e + 32, 0); /* vm_state_size: no VM state */
		qcow2_put_be32(e + 36, 24);
		qcow2_put_be64(e + 40, 0); /* vm_state_size_large */
		qcow2_put_be64(e + 48, im->h.size);
		qcow2_put_be64(e + 56, (uint64_t)add->icount);
		memcpy(e + 64, add->id, il);
		memcpy(e + 64 + il, add->name, nl);
		n += (64 + il + nl + 7) & ~7ull;
		cnt++;
	}
	*out = b;
	*len = n;
	*count = cnt;
	return 0;
}

/*
 * Write @tab (@len bytes, @count entries) to new clusters and make the
 * header name it. Refcount raises in memory become durable first.
 */
static int commit_table(struct sctx *c, const uint8_t *tab, uint64_t len, uint32_t count)
{
	uint64_t off = 0;
	uint8_t hdr[12];
	int ret;

	if (len) {
		ret = alloc(c, (len + c->cs - 1) >> c->cb, &off);
		if (ret < 0)
			return ret;
	}
	ret = rc_flush(c);
	if (ret < 0)
		return ret;
	if (len) {
		ret = qcow2_io_write(c->io, tab, len, off);
		if (ret < 0)
			return FAIL(c, ret, "writing the snapshot table: %s", strerror(-ret));
		ret = sync_io(c);
		if (ret < 0)
			return ret;
	}
	qcow2_put_be32(hdr, count);
	qcow2_put_be64(hdr + 4, off);
	ret = qcow2_io_write(c->io, hdr, sizeof(hdr),
			     offsetof(struct qcow2_header_disk, nb_snapshots));
	if (ret < 0)
		return FAIL(c, ret, "writing the header: %s", strerror(-ret));
	return sync_io(c);
}

static int open_rw(struct qcow2_oimg *im, const struct qcow2_io *io, const char *name, char *err,
		   size_t errlen)
{
	int ret = qcow2_oimg_open(im, io, name, true, err, errlen);

	if (ret < 0)
		return ret == -ENOTSUP ? qcow2_seterr(err, errlen, ret, "not a qcow2 image") : ret;
	if (im->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "internal snapshots are not supported with an external data "
				    "file");
	if (im->h.incompatible_features & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))
		return qcow2_seterr(err, errlen, -EUCLEAN,
				    "the image is dirty or marked corrupt; repair it first "
				    "('qemu-img check -r all')");
	return 0;
}

int qcow2_snapshot_list_io(const struct qcow2_io *io, const char *name,
			   struct qcow2_snap_desc **out, uint32_t *n, char *err, size_t errlen)
{
	struct qcow2_oimg im;
	int ret = qcow2_oimg_open(&im, io, name, false, err, errlen);

	*out = NULL;
	*n = 0;
	if (ret == 0 && im.h.nb_snapshots) {
		*out = calloc(im.h.nb_snapshots, sizeof(**out));
		if (!*out)
			ret = -ENOMEM;
		for (uint32_t i = 0; ret == 0 && i < im.h.nb_snapshots; i++)
			describe(&im.snaps[i], &(*out)[i]);
		if (ret == 0)
			*n = im.h.nb_snapshots;
	}
	qcow2_oimg_close(&im);
	return ret;
}

/*
 * A create that failed after its refcount raises began to reach the disk and
 * before the header named the snapshot: lower again (in memory) what it
 * raised (the active table's walk, the L1 copy's and the new table's
 * clusters), write the refcounts back, then make COPIED say again what the
 * refcounts say (the L1 table written whatever it holds in memory). The
 * image is then as before, but for refcount blocks or a refcount table the
 * allocation added (leaked at most). A crash in the middle leaves raises
 * (leaks) and COPIED flags missing (harmless): never a refcount too low.
 */
static int create_undo(struct sctx *c, uint64_t l1_off, uint64_t l1_bytes, uint64_t tab_off,
		       uint64_t tlen)
{
	struct qcow2_oimg *im = c->im;
	int ret = walk_refs(c, im->l1, im->h.l1_size, -1);

	if (ret == 0)
		ret = rc_add_range(c, l1_off, l1_bytes, -1);
	if (ret == 0)
		ret = rc_add_range(c, tab_off, tlen, -1);
	if (ret == 0)
		ret = rc_flush(c);
	if (ret == 0)
		ret = fix_copied(c, im->l1, im->h.l1_size, im->h.l1_table_offset, true);
	return ret;
}

int qcow2_snapshot_create_io(const struct qcow2_io *io, const char *name,
			     struct qcow2_snap_desc *sn, unsigned flags, char *err, size_t errlen)
{
	struct qcow2_oimg im;
	struct sctx c = {0};
	uint64_t l1_off = 0, l1_bytes, tlen, tab_off = 0, old_off, old_len, max_id = 0;
	uint8_t *tab = NULL, *l1c = NULL, hdr[12];
	uint32_t cnt;
	bool undo = false;
	int ret;

	ret = open_rw(&im, io, name, err, errlen);
	if (ret < 0)
		goto out;
	if ((flags & QCOW2_SNAP_UNIQUE_NAME) && !sn->name[0]) {
		ret = qcow2_seterr(err, errlen, -EINVAL, "Name is empty");
		goto out;
	}
	if ((flags & QCOW2_SNAP_UNIQUE_NAME) && find(&im, NULL, sn->name) >= 0) {
		ret = qcow2_seterr(err, errlen, -EEXIST, "Snapshot with name '%s' already exists",
				   sn->name);
		goto out;
	}
	if (im.h.nb_snapshots >= QCOW2_MAX_SNAPSHOTS) {
		ret = qcow2_seterr(err, errlen, -EFBIG, "Too many snapshots");
		goto out;
	}
	/* QEMU's ID: one more than the largest numeric ID. */
	for (uint32_t i = 0; i < im.h.nb_snapshots; i++) {
		char idb[32];
		uint64_t v;

		snprintf(idb, sizeof(idb), "%.*s", (int)im.snaps[i].id_len, im.snaps[i].id);
		v = strtoull(idb, NULL, 10);
		if (v > max_id)
			max_id = v;
	}
	if (!sn->id[0])
		snprintf(sn->id, sizeof(sn->id), "%" PRIu64, max_id + 1);
	sn->disk_size = im.h.size;
	ret = ctx_init(&c, &im, err, errlen);
	if (ret < 0)
		goto out;
	/*
	 * 1. In memory: the L1 copy's clusters, every raise the snapshot
	 * brings, the new table and its clusters. Nothing is written yet, so
	 * a failure here (no room, a refcount that would overflow) changes
	 * nothing.
	 */
	l1_bytes = (uint64_t)im.h.l1_size * 8;
	if (l1_bytes) {
		ret = alloc(&c, (l1_bytes + c.cs - 1) >> c.cb, &l1_off);
		if (ret < 0)
			goto out;
	}
	ret = walk_refs(&c, im.l1, im.h.l1_size, 1);
	if (ret < 0)
		goto out;
	ret = build_table(&c, -1, sn, im.h.l1_size, l1_off, &tab, &tlen, &cnt);
	if (ret < 0)
		goto out;
	if (tlen) {
		ret = alloc(&c, (tlen + c.cs - 1) >> c.cb, &tab_off);
		if (ret < 0)
			goto out;
	}
	/*
	 * 2. The L1 copy (COPIED means nothing outside the active table) and
	 * the new table, into clusters nothing names and whose refcount is 0
	 * on disk: a failure here leaves the image as it was.
	 */
	l1c = malloc(l1_bytes + 1);
	if (!l1c) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i < im.h.l1_size; i++)
		qcow2_put_be64(l1c + (size_t)i * 8, im.l1[i] & ~QCOW2_OFLAG_COPIED);
	if (l1_bytes) {
		ret = qcow2_io_write(io, l1c, l1_bytes, l1_off);
		if (ret < 0) {
			ret = qcow2_seterr(err, errlen, ret, "writing the snapshot's L1 table: %s",
					   strerror(-ret));
			goto out;
		}
	}
	if (tlen) {
		ret = qcow2_io_write(io, tab, tlen, tab_off);
		if (ret < 0) {
			ret = qcow2_seterr(err, errlen, ret, "writing the snapshot table: %s",
					   strerror(-ret));
			goto out;
		}
	}
	/*
	 * 3. The raises durable (their sync covers the L1 copy and the table
	 * too). From here until the header names the snapshot, a failure
	 * undoes them (create_undo).
	 */
	undo = true;
	ret = rc_flush(&c);
	if (ret < 0)
		goto out;
	/* 4. Writes to anything shared must copy from now on. */
	ret = fix_copied(&c, im.l1, im.h.l1_size, im.h.l1_table_offset, false);
	if (ret < 0)
		goto out;
	/* 5. The header names the table (count and offset: 12 bytes in one sector). */
	old_off = im.h.snapshots_offset;
	old_len = im.h.nb_snapshots ? im.snapbuf_len : 0;
	qcow2_put_be32(hdr, cnt);
	qcow2_put_be64(hdr + 4, tab_off);
	ret =
	    qcow2_io_write(io, hdr, sizeof(hdr), offsetof(struct qcow2_header_disk, nb_snapshots));
	if (ret < 0) {
		ret = qcow2_seterr(err, errlen, ret, "writing the header: %s", strerror(-ret));
		goto out;
	}
	/* written: from here the snapshot may be named, nothing is undone */
	undo = false;
	ret = sync_io(&c);
	if (ret < 0)
		goto out;
	/* 6. The old table is free (a failure only leaks it: the snapshot is made). */
	if (rc_add_range(&c, old_off, old_len, -1) == 0)
		rc_flush(&c);
	ret = 0;
out:
	if (undo) {
		char uerr[300] = "";
		int uret;

		c.err = uerr;
		c.errlen = sizeof(uerr);
		uret = create_undo(&c, l1_off, l1_bytes, tab_off, tlen);
		if (uret < 0)
			err_cat(err, errlen, "; undoing the refcount changes: ", uerr, uret, "");
	}
	free(tab);
	free(l1c);
	ctx_free(&c);
	qcow2_oimg_close(&im);
	return ret;
}

int qcow2_snapshot_delete_io(const struct qcow2_io *io, const char *name, const char *id,
			     const char *sname, struct qcow2_snap_desc *out,
			     const struct qcow2_snap_punch *punch, char *err, size_t errlen)
{
	struct qcow2_oimg im;
	struct sctx c = {0};
	uint64_t tlen, old_off, old_len, *sl1 = NULL;
	const struct qcow2_snapshot_info *s;
	uint8_t *tab = NULL;
	uint32_t cnt;
	int ret, i;

	ret = open_rw(&im, io, name, err, errlen);
	if (ret < 0)
		goto out;
	i = find(&im, id, sname);
	if (i < 0) {
		ret = qcow2_seterr(err, errlen, -ENOENT,
				   "Snapshot with id '%s' and name '%s' does not exist",
				   id ? id : "(null)", sname ? sname : "(null)");
		goto out;
	}
	s = &im.snaps[i];
	if (out)
		describe(s, out);
	ret = ctx_init(&c, &im, err, errlen);
	if (ret < 0)
		goto out;
	ret = qcow2_read_table(io, s->l1_table_offset, s->l1_size, &sl1);
	if (ret < 0) {
		ret = qcow2_seterr(err, errlen, ret, "reading the snapshot's L1 table: %s",
				   strerror(-ret));
		goto out;
	}
	/* 1. The table without it, and the header: the snapshot is gone. */
	ret = build_table(&c, i, NULL, 0, 0, &tab, &tlen, &cnt);
	if (ret < 0)
		goto out;
	old_off = im.h.snapshots_offset;
	old_len = im.snapbuf_len;
	ret = commit_table(&c, tab, tlen, cnt);
	if (ret < 0)
		goto out;
	/* 2. What it held, its L1 table and the old table: lowered in memory. */
	ret = walk_refs(&c, sl1, s->l1_size, -1);
	if (ret == 0)
		ret = rc_add_range(&c, s->l1_table_offset, (uint64_t)s->l1_size * 8, -1);
	if (ret == 0)
		ret = rc_add_range(&c, old_off, old_len, -1);
	/* 3. COPIED where the active table is the only user now (only a refcount
	 * lowered to 1 can make it so), then the refcounts. */
	if (ret == 0 && c.to_one)
		ret = fix_copied(&c, im.l1, im.h.l1_size, im.h.l1_table_offset, false);
	if (ret == 0)
		ret = rc_flush(&c);
	if (ret == 0) {
		punch_freed(&c, punch);
	} else {
		/*
		 * The snapshot is gone (the header was written): a failure
		 * from here leaks what was not lowered, once COPIED agrees
		 * with the refcounts on disk again; the delete is done.
		 */
		char serr[300] = "";
		char *e = c.err;
		int sret;

		c.err = serr;
		c.errlen = sizeof(serr);
		sret = settle(&c, im.l1, im.h.l1_size, im.h.l1_table_offset);
		if (sret == 0)
			ret = 0;
		else
			err_cat(e, errlen,
				" (the snapshot is deleted; COPIED flags not repaired: ", serr,
				sret, ")");
	}
out:
	free(tab);
	free(sl1);
	ctx_free(&c);
	qcow2_oimg_close(&im);
	return ret;
}

int qcow2_snapshot_apply_io(const struct qcow2_io *io, const char *name, const char *id_or_name,
			    char *err, size_t errlen)
{
	struct qcow2_oimg im;
	struct sctx c = {0};
	uint64_t *sl1 = NULL, *nl1 = NULL;
	const struct qcow2_snapshot_info *s;
	int ret, i;

	ret = open_rw(&im, io, name, err, errlen);
	if (ret < 0)
		goto out;
	i = find(&im, id_or_name, NULL);
	if (i < 0)
		i = find(&im, NULL, id_or_name);
	if (i < 0) {
		ret = qcow2_seterr(err, errlen, -ENOENT, "Can't find snapshot");
		goto out;
	}
	s = &im.snaps[i];
	if (im.h.has_bitmaps && im.h.nb_bitmaps) {
		/* QEMU 7.2 refuses it too, even for disabled bitmaps: they would
		 * not describe the reverted content. */
		ret = qcow2_seterr(err, errlen, -EBUSY, "Device has active dirty bitmaps");
		goto out;
	}
	if (s->l1_size > im.h.l1_size || (s->disk_size && s->disk_size != im.h.size)) {
		ret = qcow2_seterr(err, errlen, -ENOTSUP,
				   "the snapshot has another disk size than the image; reverting "
				   "across a resize is not supported");
		goto out;
	}
	ret = ctx_init(&c, &im, err, errlen);
	if (ret < 0)
		goto out;
	ret = qcow2_read_table(io, s->l1_table_offset, s->l1_size, &sl1);
	if (ret < 0) {
		ret = qcow2_seterr(err, errlen, ret, "reading the snapshot's L1 table: %s",
				   strerror(-ret));
		goto out;
	}
	nl1 = calloc((size_t)im.h.l1_size + 1, 8);
	if (!nl1) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint32_t k = 0; k < s->l1_size; k++)
		nl1[k] = sl1[k] & ~QCOW2_OFLAG_COPIED;
	/* 1. Raise what the snapshot names (durable), 2. lower what the
	 * active table named (in memory), 3. the new active table with its
	 * COPIED flags, 4. the lowered refcounts. */
	ret = walk_refs(&c, sl1, s->l1_size, 1);
	if (ret == 0)
		ret = rc_flush(&c);
	if (ret < 0)
		goto out; /* raises written in part at most: leaks */
	ret = walk_refs(&c, im.l1, im.h.l1_size, -1);
	if (ret == 0)
		ret = fix_copied(&c, nl1, im.h.l1_size, im.h.l1_table_offset, true);
	if (ret == 0)
		ret = rc_flush(&c);
	if (ret < 0) {
		/*
		 * Reverted once the new L1 table is written (or its write
		 * tried: a failed write may have left part of it on disk, so
		 * settle writes it whole again): the old active
		 * tables' lowerings not written leak, COPIED made to agree with
		 * the refcounts on disk, and the apply is done. Before that,
		 * the raises (all durable) are lowered again and the active
		 * layer stays as it was (a crash in between leaks at most: a
		 * cluster the active tables name that the undo lowers is the
		 * snapshot's too, and stays at 2 or more).
		 */
		char serr[300] = "";
		char *e = c.err;
		bool applied = c.l1_written;
		int sret;

		c.err = serr;
		c.errlen = sizeof(serr);
		if (applied) {
			sret = settle(&c, nl1, im.h.l1_size, im.h.l1_table_offset);
		} else {
			sret = rb_forget(&c);
			if (sret == 0)
				sret = walk_refs(&c, sl1, s->l1_size, -1);
			if (sret == 0)
				sret = rc_flush(&c);
			if (sret == 0)
				sret = fix_copied(&c, im.l1, im.h.l1_size, im.h.l1_table_offset,
						  false);
		}
		if (sret == 0 && applied) {
			ret = 0;
		} else if (sret < 0) {
			err_cat(e, errlen,
				applied ? "; reverted, but COPIED flags not repaired: "
					: "; not reverted; undoing the refcount raises: ",
				serr, sret, "");
		}
	}
out:
	free(sl1);
	free(nl1);
	ctx_free(&c);
	qcow2_oimg_close(&im);
	return ret;
}

/*
 * ---- persistent dirty bitmaps, offline (qcow2_bitmap_edit_io) ----
 *
 * The same allocator and refcount write-back as the snapshots above, and
 * the same shape: everything new goes to new clusters (a new, all-zero
 * bitmap table for a bitmap added or cleared; a new directory for every
 * change), written before their refcount raises (nothing names them yet,
 * and a crash then never leaves a refcount past the end of the file), then
 * the raises are made durable and synced, then the first cluster is rewritten
 * with the bitmaps extension naming the new directory (or without it, and
 * with autoclear bit 0 clear, once the last bitmap is gone) and synced; only
 * then are the old directory and what the change dropped released. A crash
 * at any point leaves the old or the new directory, and leaks at most.
 */
#define BMD_LEN      24u
#define BMD_IN_USE   1u
#define BMD_AUTO     2u
#define BMD_MAX_DIR  (64ull << 20) /* QEMU's limit on the directory size */
#define BMD_MAX_N    65535u
#define BMD_MAX_NAME 1023u
#define BMD_TE_MASK  0x00fffffffffffe00ull

static uint64_t bmd_entry_len(const uint8_t *e)
{
	return (BMD_LEN + qcow2_be32(e + 20) + qcow2_be16(e + 18) + 7) & ~7ull;
}

/* The directory as on disk, checked entry by entry (NULL, 0 without bitmaps). */
static int bmd_read(struct sctx *c, uint8_t **dir, uint64_t *len)
{
	const struct qcow2_header_info *h = &c->im->h;
	uint64_t pos = 0;
	uint32_t i;
	int ret;

	*dir = NULL;
	*len = 0;
	if (h->version < 3 || !h->has_bitmaps || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	if (!h->bitmap_directory_size || h->bitmap_directory_size > BMD_MAX_DIR ||
	    h->bitmap_directory_offset > c->im->file_size ||
	    h->bitmap_directory_size > c->im->file_size - h->bitmap_directory_offset)
		return FAIL(c, -EINVAL,
			    "the bitmap directory (0x%" PRIx64 ", %" PRIu64 " bytes) is invalid",
			    h->bitmap_directory_offset, h->bitmap_directory_size);
	*dir = malloc(h->bitmap_directory_size);
	if (!*dir)
		return -ENOMEM;
	ret = qcow2_io_read(c->io, *dir, h->bitmap_directory_size, h->bitmap_directory_offset);
	if (ret < 0)
		return FAIL(c, ret, "reading the bitmap directory: %s", strerror(-ret));
	for (i = 0; i < h->nb_bitmaps; i++) {
		const uint8_t *e = *dir + pos;

		if (h->bitmap_directory_size - pos < BMD_LEN || !qcow2_be16(e + 18) ||
		    bmd_entry_len(e) > h->bitmap_directory_size - pos)
			return FAIL(c, -EINVAL, "bitmap directory entry %u is invalid", i);
		pos += bmd_entry_len(e);
	}
	if (pos != h->bitmap_directory_size)
		return FAIL(c, -EINVAL, "the bitmap directory size does not match its entries");
	*len = pos;
	return 0;
}

/* Byte offset of the entry named @name in @dir, or -1. */
static int64_t bmd_find(const uint8_t *dir, uint64_t len, const char *name)
{
	size_t nl = strlen(name);

	for (uint64_t pos = 0; pos < len; pos += bmd_entry_len(dir + pos)) {
		const uint8_t *e = dir + pos;

		if (qcow2_be16(e + 18) == nl && !memcmp(e + BMD_LEN + qcow2_be32(e + 20), name, nl))
			return (int64_t)pos;
	}
	return -1;
}

static uint32_t bmd_count(const uint8_t *dir, uint64_t len)
{
	uint32_t n = 0;

	for (uint64_t pos = 0; pos < len; pos += bmd_entry_len(dir + pos))
		n++;
	return n;
}

/* A new all-zero bitmap table for granularity 2^@gbits; its offset and size into @e. */
static int bmd_new_table(struct sctx *c, unsigned gbits, uint8_t *e)
{
	uint64_t bits = ((c->im->h.size & ~511ull) + (1ull << gbits) - 1) >> gbits;
	uint64_t n = ((bits + 7) / 8 + c->cs - 1) >> c->cb, off;
	uint8_t *z;
	int ret;

	if (!n)
		n = 1;
	ret = alloc(c, (n * 8 + c->cs - 1) >> c->cb, &off);
	if (ret < 0)
		return ret;
	z = calloc(1, n * 8);
	if (!z)
		return -ENOMEM;
	ret = qcow2_io_write(c->io, z, n * 8, off);
	free(z);
	if (ret < 0)
		return FAIL(c, ret, "writing a bitmap table: %s", strerror(-ret));
	qcow2_put_be64(e, off);
	qcow2_put_be32(e + 8, (uint32_t)n);
	return 0;
}

/*
 * Merge (op 'm'): a new table and new data clusters for the entry @e (its
 * old table still named there): each chunk is the old bits (read, or all
 * ones) ORed with @bits (@nbytes bytes, one bit per granule of the entry's
 * granularity, as on disk), the bits past the disk cleared; all-zero chunks
 * get no cluster. Written before their refcounts, like every new cluster.
 */
static int bmd_merge_table(struct sctx *c, uint8_t *e, const uint8_t *bits, uint64_t nbytes)
{
	unsigned gbits = e[17];
	uint64_t dbits = ((c->im->h.size & ~511ull) + (1ull << gbits) - 1) >> gbits;
	uint64_t n = ((dbits + 7) / 8 + c->cs - 1) >> c->cb, toff;
	uint64_t old_off = qcow2_be64(e), *t = NULL, *nt = NULL;
	uint32_t old_n = qcow2_be32(e + 8);
	uint8_t *buf = NULL;
	int ret;

	if (!n)
		n = 1;
	ret = qcow2_read_table(c->io, old_off, old_n, &t);
	if (ret < 0)
		return FAIL(c, ret, "reading a bitmap table: %s", strerror(-ret));
	buf = malloc(c->cs);
	nt = calloc(n, 8);
	ret = -ENOMEM;
	if (!buf || !nt)
		goto out;
	for (uint64_t k = 0; k < n; k++) {
		uint64_t te = k < old_n ? t[k] : 0, d = te & BMD_TE_MASK, base = k << c->cb;
		bool any = false;

		memset(buf, (!d && (te & 1)) ? 0xff : 0, c->cs);
		if (d) {
			ret = qcow2_io_read(c->io, buf, c->cs, d);
			if (ret < 0) {
				ret = FAIL(c, ret, "reading bitmap data: %s", strerror(-ret));
				goto out;
			}
		}
		for (uint64_t i = 0; i < c->cs && base + i < nbytes; i++)
			buf[i] |= bits[base + i];
		for (uint64_t b = 0; b < c->cs * 8; b++) /* tail bits past the disk */
			if (base * 8 + b >= dbits)
				buf[b / 8] &= (uint8_t) ~(1u << (b % 8));
		for (uint64_t i = 0; i < c->cs && !any; i++)
			any = buf[i] != 0;
		if (!any)
			continue;
		ret = alloc(c, 1, &d);
		if (ret == 0) {
			ret = qcow2_io_write(c->io, buf, c->cs, d);
			if (ret < 0)
				ret = FAIL(c, ret, "writing bitmap data: %s", strerror(-ret));
		}
		if (ret < 0)
			goto out;
		qcow2_put_be64(&nt[k], d);
	}
	ret = alloc(c, (n * 8 + c->cs - 1) >> c->cb, &toff);
	if (ret == 0) {
		ret = qcow2_io_write(c->io, nt, n * 8, toff);
		if (ret < 0)
			ret = FAIL(c, ret, "writing a bitmap table: %s", strerror(-ret));
	}
	if (ret < 0)
		goto out;
	qcow2_put_be64(e, toff);
	qcow2_put_be32(e + 8, (uint32_t)n);
out:
	free(t);
	free(nt);
	free(buf);
	return ret;
}

/*
 * Offline resize (qcow2tool/resize.c) keeps the bitmaps valid around the
 * header's size change, since a consistent bitmap's table must match the
 * disk size: 'U' marks every bitmap in use (a new directory; refused if one
 * already is: an inconsistent bitmap cannot be resized, as in QEMU), then
 * the size changes, then 'F' gives every in-use bitmap a table for the
 * header's size (the old entries, the new part clean; the data clusters
 * stay, now named by the new table) and clears in_use (a new directory
 * again); the old tables are released after the switch. A crash in between
 * leaves the bitmaps in use (inconsistent), as qemu-img resize does, never
 * wrong.
 */
struct bmd_old {
	struct {
		uint64_t off, len;
	} * v;
	size_t n;
};

static int bmd_all_in_use(struct sctx *c, uint8_t *nd, uint64_t len)
{
	for (uint64_t pos = 0; pos < len; pos += bmd_entry_len(nd + pos)) {
		uint8_t *e = nd + pos;
		uint32_t f = qcow2_be32(e + 12);

		if (f & BMD_IN_USE) {
			uint16_t nl = qcow2_be16(e + 18);

			return FAIL(c, -EUCLEAN, "Bitmap '%.*s' is inconsistent and cannot be used",
				    nl < 256 ? nl : 256,
				    (const char *)e + BMD_LEN + qcow2_be32(e + 20));
		}
		qcow2_put_be32(e + 12, f | BMD_IN_USE);
	}
	return 0;
}

static int bmd_fit_all(struct sctx *c, uint8_t *nd, uint64_t len, struct bmd_old *old)
{
	for (uint64_t pos = 0; pos < len; pos += bmd_entry_len(nd + pos)) {
		uint8_t *e = nd + pos;
		uint32_t f = qcow2_be32(e + 12), old_n = qcow2_be32(e + 8);
		unsigned gbits = e[17];
		uint64_t bits = ((c->im->h.size & ~511ull) + (1ull << gbits) - 1) >> gbits;
		uint64_t n = ((bits + 7) / 8 + c->cs - 1) >> c->cb, toff, old_off = qcow2_be64(e);
		uint64_t *t = NULL;
		uint8_t *nt;
		void *v;
		int ret;

		if (!(f & BMD_IN_USE))
			continue;
		if (!n)
			n = 1;
		qcow2_put_be32(e + 12, f & ~BMD_IN_USE);
		if (n == old_n)
			continue;
		ret = qcow2_read_table(c->io, old_off, old_n, &t);
		if (ret < 0)
			return FAIL(c, ret, "reading a bitmap table: %s", strerror(-ret));
		nt = calloc(n, 8);
		if (!nt) {
			free(t);
			return -ENOMEM;
		}
		for (uint64_t k = 0; k < n && k < old_n; k++)
			qcow2_put_be64(nt + k * 8, t[k]);
		free(t);
		ret = alloc(c, (n * 8 + c->cs - 1) >> c->cb, &toff);
		if (ret == 0) {
			ret = qcow2_io_write(c->io, nt, n * 8, toff);
			if (ret < 0)
				ret = FAIL(c, ret, "writing a bitmap table: %s", strerror(-ret));
		}
		free(nt);
		if (ret < 0)
			return ret;
		v = realloc(old->v, (old->n + 1) * sizeof(*old->v));
		if (!v)
			return -ENOMEM;
		old->v = v;
		old->v[old->n].off = old_off;
		old->v[old->n].len = (uint64_t)old_n * 8;
		old->n++;
		qcow2_put_be64(e, toff);
		qcow2_put_be32(e + 8, (uint32_t)n);
	}
	return 0;
}

/* Release a bitmap's table and data clusters (after the commit: errors only leak). */
static void bmd_release(struct sctx *c, const uint8_t *e)
{
	uint64_t off = qcow2_be64(e), *t = NULL;
	uint32_t n = qcow2_be32(e + 8);
	char *err = c->err;

	c->err = NULL;
	if (off && !(off & (c->cs - 1)) && n && (uint64_t)n * 8 <= BMD_MAX_DIR &&
	    qcow2_read_table(c->io, off, n, &t) == 0) {
		for (uint32_t i = 0; i < n; i++) {
			uint64_t d = t[i] & BMD_TE_MASK;

			if (d && !(d & (c->cs - 1)) && d < c->im->file_size)
				rc_add_range(c, d, c->cs, -1);
		}
		rc_add_range(c, off, (uint64_t)n * 8, -1);
	}
	free(t);
	c->err = err;
}

/*
 * Rewrite the first cluster: the header, every extension but the bitmaps
 * one (byte for byte), the bitmaps extension for @n entries at @doff (none
 * when @n is 0), the end marker, the backing file name; autoclear bit 0 set
 * with bitmaps, clear without. One write of the bytes that change, synced.
 */
static int bmd_header(struct sctx *c, uint32_t n, uint64_t dsize, uint64_t doff)
{
	const struct qcow2_header_info *h = &c->im->h;
	const uint8_t *hb = c->im->hbuf;
	size_t hl = c->im->hlen, in = h->header_length, pos = h->header_length, old_end;
	uint64_t ac;
	uint8_t *buf;
	int ret;

	buf = calloc(1, c->cs);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, hb, h->header_length);
	ret = FAIL(c, -ENOSPC, "the header extensions do not fit in the first cluster");
	while (in + 8 <= hl) {
		uint32_t type = qcow2_be32(hb + in), len = qcow2_be32(hb + in + 4);
		size_t sz = 8 + (((size_t)len + 7) & ~(size_t)7);

		if (type == QCOW2_EXT_END)
			break;
		if (sz > hl - in)
			goto out;
		if (type != QCOW2_EXT_BITMAPS) {
			if (pos + sz > c->cs)
				goto out;
			memcpy(buf + pos, hb + in, sz);
			pos += sz;
		}
		in += sz;
	}
	old_end = in + 8;
	if (n) {
		if (pos + 32 > c->cs)
			goto out;
		qcow2_put_be32(buf + pos, QCOW2_EXT_BITMAPS);
		qcow2_put_be32(buf + pos + 4, 24);
		qcow2_put_be32(buf + pos + 8, n);
		qcow2_put_be64(buf + pos + 16, dsize);
		qcow2_put_be64(buf + pos + 24, doff);
		pos += 32;
	}
	pos += 8; /* end marker (zeroes) */
	if (h->backing_file_offset) {
		if (h->backing_file_offset + h->backing_file_size > hl) {
			ret =
			    FAIL(c, -ENOTSUP, "the backing file name is not in the first cluster");
			goto out;
		}
		if (h->backing_file_offset + h->backing_file_size > old_end)
			old_end = h->backing_file_offset + h->backing_file_size;
		if (pos + h->backing_file_size > c->cs)
			goto out;
		memcpy(buf + pos, hb + h->backing_file_offset, h->backing_file_size);
		qcow2_put_be64(buf + offsetof(struct qcow2_header_disk, backing_file_offset), pos);
		pos += h->backing_file_size;
	}
	ac = h->autoclear_features;
	ac = n ? ac | QCOW2_AUTOCLEAR_BITMAPS : ac & ~(uint64_t)QCOW2_AUTOCLEAR_BITMAPS;
	qcow2_put_be64(buf + QCOW2_OFF_AUTOCLEAR, ac);
	ret = qcow2_io_write(c->io, buf, pos > old_end ? pos : old_end, 0);
	if (ret < 0)
		ret = FAIL(c, ret, "writing the header: %s", strerror(-ret));
	else
		ret = sync_io(c);
out:
	free(buf);
	return ret;
}

/*
 * One past the last cluster with a refcount: where the bitmap edit starts
 * allocating. Not the end of the file: vqcowd preallocates ahead of its
 * allocation front (fallocate, so the file is longer than what it uses),
 * and an edit after every online command would otherwise leave that tail
 * unused each time. Everything past this cluster is free by definition
 * (nothing may point at a cluster whose refcount is 0).
 */
static int bmd_front(struct sctx *c, uint64_t *front)
{
	*front = 0;
	for (uint64_t idx = c->nrb; idx-- > 0;) {
		uint8_t *b;
		int ret = rblock(c, idx, &b);

		if (ret < 0)
			return ret;
		if (!b)
			continue;
		for (uint64_t e = 1ull << c->rbb; e-- > 0;)
			if (qcow2_refcount_get(b, e, c->order)) {
				*front = (idx << c->rbb) + e + 1;
				return 0;
			}
	}
	return 0;
}

static int bmd_edit(const struct qcow2_io *io, const char *name, char op, const char *bname,
		    uint32_t granularity, bool disabled, const uint8_t *bits, uint64_t nbytes,
		    char *err, size_t errlen)
{
	struct qcow2_oimg im;
	struct sctx c = {0};
	uint8_t *dir = NULL, *nd = NULL, *drop = NULL, ne[BMD_LEN];
	struct bmd_old fit = {0};
	uint64_t len = 0, nlen = 0, doff = 0, old_off, old_len;
	size_t bl = strlen(bname);
	int64_t at;
	int ret;

	/* (open_rw's checks but the snapshots' one: bitmaps live in the image file,
	 * so an external data file is no obstacle, as in QEMU) */
	ret = qcow2_oimg_open(&im, io, name, true, err, errlen);
	if (ret == -ENOTSUP)
		ret = qcow2_seterr(err, errlen, ret, "not a qcow2 image");
	else if (ret == 0 &&
		 (im.h.incompatible_features & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)))
		ret = qcow2_seterr(err, errlen, -EUCLEAN,
				   "the image is dirty or marked corrupt; repair it first "
				   "('qemu-img check -r all')");
	if (ret < 0)
		goto out;
	ret = ctx_init(&c, &im, err, errlen);
	if (ret == 0)
		ret = bmd_front(&c, &c.next);
	if (ret == 0)
		ret = bmd_read(&c, &dir, &len);
	if (ret < 0)
		goto out;
	old_off = im.h.bitmap_directory_offset;
	old_len = len;
	at = bmd_find(dir, len, bname);
	nd = malloc(len + BMD_LEN + bl + 8);
	if (!nd) {
		ret = -ENOMEM;
		goto out;
	}
	if (op == 'U' || op == 'F') {
		if (!len) {
			ret = 0;
			goto out;
		}
		memcpy(nd, dir, len);
		nlen = len;
		ret = op == 'U' ? bmd_all_in_use(&c, nd, nlen) : bmd_fit_all(&c, nd, nlen, &fit);
		if (ret < 0)
			goto out;
	} else if (op == 'a') {
		unsigned gbits = 0;

		if (!granularity) /* QEMU's default: the cluster size within 4 KiB..64 KiB */
			granularity = c.cs < 4096 ? 4096 : c.cs > 65536 ? 65536 : (uint32_t)c.cs;
		while ((1ull << gbits) < granularity)
			gbits++;
		/* QEMU's order: name, granularity, what the format can store, existence */
		if (!bl) {
			ret = qcow2_seterr(err, errlen, -EINVAL, "Bitmap name cannot be empty");
			goto out;
		}
		if ((1ull << gbits) != granularity || gbits < 9 || gbits > 31) {
			ret = qcow2_seterr(err, errlen, -EINVAL,
					   "Granularity must be power of 2 and at least 512");
			goto out;
		}
		if (bl > BMD_MAX_NAME) {
			ret = qcow2_seterr(err, errlen, -EINVAL,
					   "Name length exceeds maximum (%u characters)",
					   BMD_MAX_NAME);
			goto out;
		}
		if (im.h.version < 3) {
			ret = qcow2_seterr(err, errlen, -ENOTSUP,
					   "Cannot store dirty bitmaps in qcow2 v2 files");
			goto out;
		}
		if (bmd_count(dir, len) >= BMD_MAX_N) {
			ret =
			    qcow2_seterr(err, errlen, -ENOSPC,
					 "Maximum number of persistent bitmaps is already reached");
			goto out;
		}
		if (at >= 0) {
			ret =
			    qcow2_seterr(err, errlen, -EEXIST, "Bitmap already exists: %s", bname);
			goto out;
		}
		if (len) /* (without a directory yet dir is NULL) */
			memcpy(nd, dir, len);
		memset(ne, 0, sizeof(ne));
		ret = bmd_new_table(&c, gbits, ne);
		if (ret < 0)
			goto out;
		qcow2_put_be32(ne + 12, disabled ? 0 : BMD_AUTO);
		ne[16] = 1; /* dirty tracking bitmap */
		ne[17] = (uint8_t)gbits;
		qcow2_put_be16(ne + 18, (uint16_t)bl);
		memcpy(nd + len, ne, BMD_LEN);
		memcpy(nd + len + BMD_LEN, bname, bl);
		nlen = len + ((BMD_LEN + bl + 7) & ~(size_t)7);
		memset(nd + len + BMD_LEN + bl, 0, nlen - len - BMD_LEN - bl);
	} else {
		uint8_t *e;
		uint64_t el;

		if (at < 0) {
			ret = qcow2_seterr(err, errlen, -ENOENT, "Dirty bitmap '%s' not found",
					   bname);
			goto out;
		}
		e = dir + at;
		el = bmd_entry_len(e);
		if (op != 'r' && (qcow2_be32(e + 12) & BMD_IN_USE)) {
			ret = qcow2_seterr(err, errlen, -EUCLEAN,
					   "Bitmap '%s' is inconsistent and cannot be used", bname);
			goto out;
		}
		memcpy(nd, dir, len);
		nlen = len;
		e = nd + at;
		if (op == 'r') {
			drop = dir + at;
			memmove(e, e + el, len - at - el);
			nlen = len - el;
		} else if (op == 'c') {
			drop = dir + at;
			ret = bmd_new_table(&c, e[17], e);
			if (ret < 0)
				goto out;
		} else if (op == 'm') {
			drop = dir + at;
			ret = bmd_merge_table(&c, e, bits, nbytes);
			if (ret < 0)
				goto out;
		} else if (op == 'e' || op == 'd') {
			uint32_t f = qcow2_be32(e + 12);

			qcow2_put_be32(e + 12, op == 'e' ? f | BMD_AUTO : f & ~BMD_AUTO);
		} else {
			ret = qcow2_seterr(err, errlen, -EINVAL, "unknown bitmap operation");
			goto out;
		}
	}
	if (nlen) {
		ret = alloc(&c, (nlen + c.cs - 1) >> c.cb, &doff);
		if (ret < 0)
			goto out;
	}
	/*
	 * New clusters first (nothing names them yet; written before their
	 * refcounts, so a crash never leaves a refcount past the end of the
	 * file, a leak qemu-img check does not see), then the raises.
	 */
	if (nlen) {
		ret = qcow2_io_write(io, nd, nlen, doff);
		if (ret < 0) {
			ret = FAIL(&c, ret, "writing the bitmap directory: %s", strerror(-ret));
			goto out;
		}
	}
	ret = rc_flush(&c); /* raises durable before anything names the new clusters */
	if (ret == 0)
		ret = sync_io(&c);
	if (ret == 0)
		ret = bmd_header(&c, bmd_count(nd, nlen), nlen, doff);
	if (ret < 0)
		goto out;
	/* committed: release the old directory and what the change dropped */
	if (old_len) {
		char *e2 = c.err;

		c.err = NULL;
		rc_add_range(&c, old_off, old_len, -1);
		c.err = e2;
	}
	if (drop)
		bmd_release(&c, drop);
	for (size_t i = 0; i < fit.n; i++) {
		char *e2 = c.err;

		c.err = NULL;
		rc_add_range(&c, fit.v[i].off, fit.v[i].len, -1);
		c.err = e2;
	}
	ret = rc_flush(&c);
out:
	free(fit.v);
	free(dir);
	free(nd);
	ctx_free(&c);
	qcow2_oimg_close(&im);
	return ret;
}

int qcow2_bitmap_edit_io(const struct qcow2_io *io, const char *name, char op, const char *bname,
			 uint32_t granularity, bool disabled, char *err, size_t errlen)
{
	if (op == 'm')
		return qcow2_seterr(err, errlen, -EINVAL, "unknown bitmap operation");
	return bmd_edit(io, name, op, bname, granularity, disabled, NULL, 0, err, errlen);
}

int qcow2_bitmap_merge_io(const struct qcow2_io *io, const char *name, const char *bname,
			  const uint8_t *bits, uint64_t nbytes, char *err, size_t errlen)
{
	return bmd_edit(io, name, 'm', bname, 0, false, bits, nbytes, err, errlen);
}

int qcow2_used_end_io(const struct qcow2_io *io, const char *name, uint64_t *end, char *err,
		      size_t errlen)
{
	struct qcow2_oimg im;
	struct sctx c = {0};
	uint64_t front = 0;
	int ret;

	*end = 0;
	ret = qcow2_oimg_open(&im, io, name, false, err, errlen);
	if (ret == 0)
		ret = ctx_init(&c, &im, err, errlen);
	if (ret == 0)
		ret = bmd_front(&c, &front);
	if (ret == 0)
		*end = front << c.cb;
	ctx_free(&c);
	qcow2_oimg_close(&im);
	return ret;
}
