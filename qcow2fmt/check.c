/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/check.c — consistency check and repair (vqcow-img check, and the
 * engine's repair of a dirty image at open). All I/O goes through the
 * caller's struct qcow2_io. See image.h for the contract.
 *
 * The check follows the semantics of qemu-img check so that the two agree on
 * every image (same exit status, same counts):
 *
 *  1. Compute each host cluster's reference count from everything that points
 *     at it: the header, the active L1 table and its L2 tables and data
 *     clusters, every snapshot's L1/L2 tables and data, the snapshot table,
 *     the refcount table and blocks, bitmaps. Entries are validated on the
 *     way (reserved bits, alignment, regions past the end of the file,
 *     subcluster bitmaps, COPIED on compressed clusters).
 *  2. Compare with the stored refcounts: stored > computed is a leak, stored
 *     < computed a corruption; a stored 0 for a used cluster, or a damaged
 *     refcount table/block, needs the refcount structure rebuilt.
 *  3. Check the COPIED flags of the active L1/L2 entries (set iff refcount 1).
 *
 * Repair (QCOW2_CHECK_FIX_*): leaks lower the refcount in place; with
 * FIX_ERRORS too-low refcounts are raised in place, and a rebuild writes a
 * complete new refcount structure past the end of the file, syncs it, then
 * points the header at it (the old structure is simply no longer referenced).
 * Beyond qemu-img, -r all also neutralises entries nothing can make valid
 * (data clusters misaligned or past the end of the file, L2 tables misaligned
 * or past the end, reserved bits, contradictory subcluster bitmaps), so the
 * image is clean afterwards; the guest data behind such entries was
 * unreadable anyway. Every metadata write is refused if the target cluster is
 * known to hold anything else (header, tables of another kind).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"

/* What a cluster is used as (bitmask per cluster), for overlap reports and write guards. */
enum {
	K_HEADER = 1u << 0,
	K_L1 = 1u << 1,
	K_L2 = 1u << 2,
	K_DATA = 1u << 3,
	K_REFTABLE = 1u << 4,
	K_REFBLOCK = 1u << 5,
	K_SNAPTABLE = 1u << 6,
	K_BITMAP = 1u << 7, /* bitmap directory, tables and data */
};

static const char *kind_name(unsigned k)
{
	switch (k) {
	case K_HEADER:
		return "the header";
	case K_L1:
		return "an L1 table";
	case K_L2:
		return "an L2 table";
	case K_DATA:
		return "guest data";
	case K_REFTABLE:
		return "the refcount table";
	case K_REFBLOCK:
		return "a refcount block";
	case K_SNAPTABLE:
		return "the snapshot table";
	default:
		return "bitmap data";
	}
}

#define RBC_N 64 /* refcount block cache entries */

struct rbc_entry {
	uint64_t off;
	uint8_t *buf;
	bool valid;
	bool dirty;
};

struct chk {
	struct qcow2_oimg *im;
	const struct qcow2_header_info *h;
	const struct qcow2_tool_cb *cb;
	struct qcow2_check_result *res;
	const struct qcow2_io *io; /* the image file */
	uint64_t cs;
	unsigned cbits;
	uint64_t file_size;
	bool data_file;

	uint64_t nb;       /* clusters covered (compared) */
	uint64_t cap;      /* entries allocated in refs/kind/reported */
	uint32_t *refs;    /* computed references */
	uint8_t *kind;     /* K_* per cluster, from counted references */
	uint8_t *meta;     /* K_* per cluster, premarked from the header and L1 tables */
	uint8_t *reported; /* overlap reported for this cluster */
	uint64_t refmax;   /* largest storable refcount (capped to 32 bits) */

	uint8_t *l2buf;
	struct rbc_entry rbc[RBC_N];
	bool rebuild;
	bool rebuild_helps;   /* -r all: a rebuild would also cure refcount overflows */
	bool wrote;           /* something was written: sync before returning */
	bool count_structure; /* count the refcount table and blocks (off while rebuilding) */
};

#define MSG(c, lvl, ...) qcow2_tool_msg((c)->cb, (lvl), __VA_ARGS__)

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

/* Cover clusters [0, n): new entries are zero. 0 or -errno. */
static int grow(struct chk *c, uint64_t n)
{
	uint32_t *r;
	uint8_t *k, *rep, *m;
	uint64_t cap;

	if (n <= c->nb)
		return 0;
	if (n > c->cap) {
		if (n > (SIZE_MAX / sizeof(uint32_t)) / 2 || n > (1ull << 40))
			return -EFBIG;
		cap = n + n / 8 + 16;
		r = realloc(c->refs, cap * sizeof(*r));
		if (!r)
			return -ENOMEM;
		c->refs = r;
		k = realloc(c->kind, cap);
		if (!k)
			return -ENOMEM;
		c->kind = k;
		rep = realloc(c->reported, cap);
		if (!rep)
			return -ENOMEM;
		c->reported = rep;
		m = realloc(c->meta, cap);
		if (!m)
			return -ENOMEM;
		c->meta = m;
		memset(c->meta + c->cap, 0, cap - c->cap);
		memset(c->refs + c->cap, 0, (cap - c->cap) * sizeof(*r));
		memset(c->kind + c->cap, 0, cap - c->cap);
		memset(c->reported + c->cap, 0, cap - c->cap);
		c->cap = cap;
	}
	c->nb = n;
	return 0;
}

/* The region reaches a cluster or more past the end of the file. */
static bool past_eof(const struct chk *c, uint64_t off, uint64_t size)
{
	uint64_t end = off + size;

	if (end < off)
		return true;
	return end > c->file_size && end - c->file_size >= c->cs;
}

static void note_kind(struct chk *c, uint64_t k, unsigned kind)
{
	unsigned have = c->kind[k];
	bool shareable = kind == K_L2 || kind == K_DATA || kind == K_BITMAP;

	if (have && (have != kind || !shareable) && !c->reported[k]) {
		unsigned other = have & ~kind;

		c->reported[k] = 1;
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR cluster %" PRIu64 " (offset 0x%" PRIx64 ") is used as %s and as %s "
		    "(metadata overlap)",
		    k, k << c->cbits, kind_name(other ? other & -other : kind), kind_name(kind));
	}
	c->kind[k] |= (uint8_t)kind;
}

/*
 * Count one reference to every cluster of [off, off + size). A region that
 * goes a cluster or more past the end of the file is a corruption and is not
 * counted. Returns 0 or -errno (internal error, counted in check_errors).
 */
static int inc_refs(struct chk *c, uint64_t off, uint64_t size, unsigned kind)
{
	uint64_t first, last;
	int ret;

	if (!size)
		return 0;
	if (past_eof(c, off, size)) {
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR: counting reference for region exceeding the end of the file by one "
		    "cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
		    off, size);
		c->res->corruptions++;
		return 0;
	}
	first = off >> c->cbits;
	last = (off + size - 1) >> c->cbits;
	ret = grow(c, last + 1);
	if (ret < 0) {
		c->res->check_errors++;
		return ret;
	}
	for (uint64_t k = first; k <= last; k++) {
		if (c->refs[k] >= c->refmax) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR: overflow cluster offset=0x%" PRIx64
			    " (more references than refcount_bits=%u can count)",
			    k << c->cbits, c->h->refcount_bits);
			c->res->corruptions++;
			/* a new refcount structure elsewhere removes this use */
			if ((kind | c->kind[k]) & (K_REFBLOCK | K_REFTABLE))
				c->rebuild_helps = true;
			continue;
		}
		c->refs[k]++;
		note_kind(c, k, kind);
	}
	return 0;
}

/* Mark clusters as @kind without counting (the write guards need to know early). */
static void premark(struct chk *c, uint64_t off, uint64_t size, unsigned kind)
{
	uint64_t first, last;

	if (!size || past_eof(c, off, size))
		return;
	first = off >> c->cbits;
	last = (off + size - 1) >> c->cbits;
	if (grow(c, last + 1) < 0)
		return;
	for (uint64_t k = first; k <= last; k++)
		c->meta[k] |= (uint8_t)kind;
}

/*
 * Metadata that a data cluster or an L2 table at @off must not share its
 * cluster with, judged from the premarked structures the header and the L1
 * tables describe. Refcount blocks are left out: when one collides, which
 * side is wrong is unknown, and rebuilding the refcount structure resolves
 * it without dropping guest data.
 */
static unsigned meta_conflict(const struct chk *c, uint64_t off, unsigned self)
{
	uint64_t k = off >> c->cbits;
	unsigned strong = K_HEADER | K_L1 | K_L2 | K_REFTABLE | K_SNAPTABLE;

	if (k >= c->nb)
		return 0;
	return c->meta[k] & strong & ~self;
}

/* May a table of @kind at @off (one cluster or @len bytes) be rewritten? */
static bool write_ok(struct chk *c, uint64_t off, uint64_t len, unsigned kind)
{
	uint64_t first = off >> c->cbits, last;

	if (!len || off & (c->cs - 1) || off < c->cs || past_eof(c, off, len))
		return false;
	last = (off + len - 1) >> c->cbits;
	for (uint64_t k = first; k <= last; k++)
		if (k >= c->nb || ((c->kind[k] | c->meta[k]) & ~(kind | K_DATA)))
			return false;
	return true;
}

/* ---- stored refcounts ---- */

static int rbc_flush_one(struct chk *c, struct rbc_entry *e)
{
	int ret;

	if (!e->valid || !e->dirty)
		return 0;
	e->dirty = false;
	if (!write_ok(c, e->off, c->cs, K_REFBLOCK)) {
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR: not writing refcount block at 0x%" PRIx64
		    ": it overlaps other metadata",
		    e->off);
		c->res->check_errors++;
		e->valid = false;
		return -EIO;
	}
	ret = qcow2_io_write(c->io, e->buf, c->cs, e->off);
	if (ret < 0) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR: writing refcount block at 0x%" PRIx64 ": %s",
		    e->off, strerror(-ret));
		c->res->check_errors++;
		e->valid = false;
		return ret;
	}
	c->wrote = true;
	return 0;
}

static int rbc_flush(struct chk *c)
{
	int ret = 0;

	for (int i = 0; i < RBC_N; i++) {
		int r = rbc_flush_one(c, &c->rbc[i]);
		if (r < 0 && !ret)
			ret = r;
	}
	return ret;
}

static void rbc_drop(struct chk *c)
{
	for (int i = 0; i < RBC_N; i++)
		c->rbc[i].valid = c->rbc[i].dirty = false;
}

static int rbc_get(struct chk *c, uint64_t off, uint8_t **buf)
{
	struct rbc_entry *e = &c->rbc[(off >> c->cbits) % RBC_N];
	int ret;

	if (e->valid && e->off == off) {
		*buf = e->buf;
		return 0;
	}
	ret = rbc_flush_one(c, e);
	if (ret < 0)
		return ret;
	if (!e->buf && !(e->buf = malloc(c->cs)))
		return -ENOMEM;
	e->valid = false;
	ret = qcow2_io_read(c->io, e->buf, c->cs, off);
	if (ret < 0)
		return ret;
	e->off = off;
	e->valid = true;
	*buf = e->buf;
	return 0;
}

/* Refcount block holding @cluster's refcount: offset, 0 = none, or -EIO (misaligned). */
static int refblock_of(struct chk *c, uint64_t cluster, uint64_t *off)
{
	uint64_t idx = cluster >> c->h->refcount_block_bits;

	*off = 0;
	if (idx >= c->h->refcount_table_entries)
		return 0;
	*off = c->im->rt[idx] & QCOW2_RTE_OFFSET_MASK;
	if (*off & (c->cs - 1))
		return -EIO;
	return 0;
}

static int get_refcount(struct chk *c, uint64_t cluster, uint64_t *v)
{
	uint64_t off;
	uint8_t *buf;
	int ret;

	*v = 0;
	ret = refblock_of(c, cluster, &off);
	if (ret < 0 || !off)
		return ret;
	ret = rbc_get(c, off, &buf);
	if (ret < 0)
		return ret;
	*v = qcow2_refcount_get(buf, cluster & ((1ull << c->h->refcount_block_bits) - 1),
				c->h->refcount_order);
	return 0;
}

static int set_refcount(struct chk *c, uint64_t cluster, uint64_t v)
{
	struct rbc_entry *e;
	uint64_t off;
	uint8_t *buf;
	int ret;

	ret = refblock_of(c, cluster, &off);
	if (ret < 0)
		return ret;
	if (!off)
		return -ENOENT;
	ret = rbc_get(c, off, &buf);
	if (ret < 0)
		return ret;
	if (v > qcow2_refcount_max(c->h->refcount_order))
		v = qcow2_refcount_max(c->h->refcount_order);
	qcow2_refcount_set(buf, cluster & ((1ull << c->h->refcount_block_bits) - 1),
			   c->h->refcount_order, v);
	e = &c->rbc[(off >> c->cbits) % RBC_N];
	e->dirty = true;
	return 0;
}

/* ---- walking the mapping tables ---- */

static enum qcow2_cluster_type cluster_type(const struct chk *c, uint64_t e)
{
	return qcow2_cluster_type(e, c->h->extended_l2, c->data_file);
}

static bool fixing(const struct chk *c, unsigned fix)
{
	return (fix & QCOW2_CHECK_FIX_ERRORS) != 0;
}

/* Count a corruption that -r all repairs right away. */
static void fixed_one(struct chk *c)
{
	c->res->corruptions_fixed++;
}

/* Make entry @i of the L2 table in c->l2buf read as zeroes (v3) / unallocated (v2). */
static void zero_entry(struct chk *c, uint32_t i)
{
	uint8_t *p = c->l2buf + (size_t)i * c->h->l2_entry_size;

	if (c->h->extended_l2) {
		uint64_t bm = qcow2_be64(p + 8);

		bm = (bm | bm << 32) & QCOW2_SC_ZERO_MASK;
		qcow2_put_be64(p, 0);
		qcow2_put_be64(p + 8, bm);
	} else {
		qcow2_put_be64(p, c->h->version >= 3 ? QCOW2_OFLAG_ZERO : 0);
	}
}

static int write_l2(struct chk *c, uint64_t l2_off)
{
	int ret;

	if (!write_ok(c, l2_off, c->cs, K_L2)) {
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR: not writing L2 table at 0x%" PRIx64 ": metadata overlap check failed",
		    l2_off);
		c->res->check_errors++;
		return -EIO;
	}
	ret = qcow2_io_write(c->io, c->l2buf, c->cs, l2_off);
	if (ret < 0) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR: could not write L2 table at 0x%" PRIx64 ": %s",
		    l2_off, strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	c->wrote = true;
	return 0;
}

/*
 * Copy the data cluster at @off to a new cluster past the end of the file
 * (for shares the refcount width cannot express). The new cluster has no
 * refcount yet: the caller's repair rebuilds the refcount structure.
 */
static int copy_cluster(struct chk *c, uint64_t off, uint64_t *noff)
{
	uint64_t dst = div_up(c->file_size, c->cs) << c->cbits;
	uint8_t *buf;
	int ret;

	if (dst + c->cs >= QCOW2_MAX_HOST_OFFSET)
		return -EFBIG;
	buf = malloc(c->cs);
	if (!buf)
		return -ENOMEM;
	ret = qcow2_io_read(c->io, buf, c->cs, off);
	if (ret == 0)
		ret = qcow2_io_write(c->io, buf, c->cs, dst);
	free(buf);
	if (ret < 0) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR: copying cluster 0x%" PRIx64 ": %s", off,
		    strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	c->file_size = dst + c->cs;
	c->wrote = true;
	c->rebuild_helps = true;
	*noff = dst;
	return grow(c, (dst >> c->cbits) + 1);
}

static int walk_l2(struct chk *c, uint64_t l2_off, bool frag, unsigned fix)
{
	const struct qcow2_header_info *h = c->h;
	uint64_t next_contig = 0;
	bool dirty = false;
	int ret;

	ret = qcow2_io_read(c->io, c->l2buf, c->cs, l2_off);
	if (ret < 0) {
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR: I/O error reading the L2 table at 0x%" PRIx64 ": %s", l2_off,
		    strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	for (uint32_t i = 0; i < h->l2_entries; i++) {
		uint8_t *p = c->l2buf + (size_t)i * h->l2_entry_size;
		uint64_t e = qcow2_be64(p);
		uint64_t bm = h->extended_l2 ? qcow2_be64(p + 8) : 0;
		enum qcow2_cluster_type t = cluster_type(c, e);

		if (t != QCOW2_CT_COMPRESSED && (e & QCOW2_L2E_STD_RESERVED_MASK)) {
			MSG(c, QCOW2_MSG_ERROR,
			    "%s found l2 entry with reserved bits set: %" PRIx64,
			    fixing(c, fix) ? "Repairing" : "ERROR", e);
			c->res->corruptions++;
			if (fixing(c, fix)) {
				c->res->corruptions--;
				fixed_one(c);
				e &= ~QCOW2_L2E_STD_RESERVED_MASK;
				qcow2_put_be64(p, e);
				dirty = true;
			}
		}
		switch (t) {
		case QCOW2_CT_COMPRESSED: {
			uint64_t coff, clen;

			if (e & QCOW2_OFLAG_COPIED) {
				MSG(c, QCOW2_MSG_ERROR,
				    "%s: coffset=0x%" PRIx64
				    ": copied flag must never be set for compressed clusters",
				    fixing(c, fix) ? "Repairing" : "ERROR",
				    qcow2_compressed_offset(e, h->cluster_bits));
				e &= ~QCOW2_OFLAG_COPIED;
				c->res->corruptions++;
				if (fixing(c, fix)) {
					c->res->corruptions--;
					fixed_one(c);
					qcow2_put_be64(p, e);
					dirty = true;
				}
			}
			if (c->data_file) {
				MSG(c, QCOW2_MSG_ERROR,
				    "ERROR compressed cluster %u with data file, entry=0x%" PRIx64,
				    i, e);
				c->res->corruptions++;
				continue;
			}
			if (bm) {
				MSG(c, QCOW2_MSG_ERROR,
				    "%s compressed cluster %u with non-zero subcluster allocation "
				    "bitmap, entry=0x%" PRIx64,
				    fixing(c, fix) ? "Repairing" : "ERROR", i, e);
				c->res->corruptions++;
				if (!fixing(c, fix))
					continue;
				c->res->corruptions--;
				fixed_one(c);
				qcow2_put_be64(p + 8, 0);
				dirty = true;
			}
			coff = qcow2_compressed_offset(e, h->cluster_bits);
			clen = qcow2_compressed_len(e, h->cluster_bits);
			if (fixing(c, fix) && past_eof(c, coff, clen)) {
				MSG(c, QCOW2_MSG_REPAIR,
				    "Repairing compressed cluster at 0x%" PRIx64
				    " past the end of the file: now reads as zeroes",
				    coff);
				c->res->corruptions_fixed++;
				zero_entry(c, i);
				dirty = true;
				continue;
			}
			ret = inc_refs(c, coff, clen, K_DATA);
			if (ret < 0)
				return ret;
			if (frag) {
				c->res->allocated_clusters++;
				c->res->compressed_clusters++;
				c->res->fragmented_clusters++; /* as qemu-img counts them */
			}
			break;
		}
		case QCOW2_CT_ZERO_ALLOC:
		case QCOW2_CT_NORMAL: {
			uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
			uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);

			if (alloc & zero) {
				MSG(c, QCOW2_MSG_ERROR,
				    "%s offset=%" PRIx64 ": Allocated cluster has corrupted "
				    "subcluster allocation bitmap",
				    fixing(c, fix) ? "Repairing" : "ERROR", off);
				c->res->corruptions++;
				if (fixing(c, fix)) {
					c->res->corruptions--;
					fixed_one(c);
					bm &= ~((uint64_t)alloc << 32);
					qcow2_put_be64(p + 8, bm);
					dirty = true;
				}
			}
			if (off & (c->cs - 1)) {
				bool has_data =
				    h->extended_l2 ? alloc != 0 : !(e & QCOW2_OFLAG_ZERO);

				c->res->corruptions++;
				MSG(c, QCOW2_MSG_ERROR,
				    "%s offset=%" PRIx64 ": %s cluster is not properly aligned; L2 "
				    "entry corrupted.%s",
				    fixing(c, fix) ? "Repairing" : "ERROR", off,
				    has_data ? "Data" : "Preallocated",
				    fixing(c, fix) && has_data ? " It now reads as zeroes." : "");
				if (fixing(c, fix)) {
					c->res->corruptions--;
					fixed_one(c);
					zero_entry(c, i);
					dirty = true;
					continue;
				}
			} else if (fixing(c, fix) && !c->data_file && past_eof(c, off, c->cs)) {
				MSG(c, QCOW2_MSG_REPAIR,
				    "Repairing data cluster at 0x%" PRIx64
				    " past the end of the file: now reads as zeroes",
				    off);
				c->res->corruptions_fixed++;
				zero_entry(c, i);
				dirty = true;
				continue;
			}
			if (fixing(c, fix) && !c->data_file && meta_conflict(c, off, 0)) {
				MSG(c, QCOW2_MSG_REPAIR,
				    "Repairing data cluster at 0x%" PRIx64
				    ": it overlaps %s; it now reads as zeroes",
				    off,
				    kind_name(meta_conflict(c, off, 0) &
					      -meta_conflict(c, off, 0)));
				c->res->corruptions_fixed++;
				zero_entry(c, i);
				dirty = true;
				continue;
			}
			if (fixing(c, fix) && !c->data_file && (off >> c->cbits) < c->nb &&
			    c->refs[off >> c->cbits] >= c->refmax) {
				uint64_t noff;

				ret = copy_cluster(c, off, &noff);
				if (ret == 0) {
					MSG(c, QCOW2_MSG_REPAIR,
					    "Repairing data cluster at 0x%" PRIx64
					    ": more references than refcount_bits=%u can count; "
					    "copied to 0x%" PRIx64,
					    off, c->h->refcount_bits, noff);
					off = noff;
					e = (e & ~QCOW2_L2E_OFFSET_MASK) | noff |
					    QCOW2_OFLAG_COPIED;
					qcow2_put_be64(p, e);
					dirty = true;
					c->res->corruptions_fixed++;
				}
			}
			if (frag) {
				c->res->allocated_clusters++;
				if (next_contig && off != next_contig)
					c->res->fragmented_clusters++;
				next_contig = off + c->cs;
			}
			if (!c->data_file) {
				ret = inc_refs(c, off, c->cs, K_DATA);
				if (ret < 0)
					return ret;
			}
			break;
		}
		case QCOW2_CT_ZERO_PLAIN:
			break;
		case QCOW2_CT_UNALLOCATED:
			if (bm & QCOW2_SC_ALLOC_MASK) {
				MSG(c, QCOW2_MSG_ERROR,
				    "%s: Unallocated cluster has non-zero subcluster allocation "
				    "map",
				    fixing(c, fix) ? "Repairing" : "ERROR");
				c->res->corruptions++;
				if (fixing(c, fix)) {
					c->res->corruptions--;
					fixed_one(c);
					qcow2_put_be64(p + 8, bm & ~QCOW2_SC_ALLOC_MASK);
					dirty = true;
				}
			}
			break;
		}
	}
	if (dirty)
		return write_l2(c, l2_off);
	return 0;
}

/* Rewrite one 8-byte entry of an L1 table on disk (and in memory for the active one). */
static int write_l1_entry(struct chk *c, uint64_t l1_off, uint32_t l1_size, uint32_t i, uint64_t v,
			  bool active)
{
	uint8_t b[8];
	int ret;

	if (!write_ok(c, l1_off, (uint64_t)l1_size * 8, K_L1)) {
		MSG(c, QCOW2_MSG_ERROR,
		    "ERROR: not writing L1 table at 0x%" PRIx64 ": metadata overlap check failed",
		    l1_off);
		c->res->check_errors++;
		return -EIO;
	}
	qcow2_put_be64(b, v);
	ret = qcow2_io_write(c->io, b, 8, l1_off + (uint64_t)i * 8);
	if (ret < 0) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR: could not write the L1 table: %s", strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	if (active)
		c->im->l1[i] = v;
	c->wrote = true;
	return 0;
}

static int walk_l1(struct chk *c, uint64_t l1_off, uint32_t l1_size, bool active, unsigned fix)
{
	uint64_t *l1 = NULL;
	int ret = 0;

	if (!l1_size)
		return 0;
	ret = inc_refs(c, l1_off, (uint64_t)l1_size * 8, K_L1);
	if (ret < 0)
		return ret;
	if (active) {
		l1 = c->im->l1;
	} else {
		ret = qcow2_read_table(c->io, l1_off, l1_size, &l1);
		if (ret < 0) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR: I/O error reading the L1 table at 0x%" PRIx64, l1_off);
			c->res->check_errors++;
			return ret;
		}
	}
	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t e = l1[i], l2_off;

		if (!e)
			continue;
		if (active && c->cb && c->cb->progress)
			c->cb->progress(c->cb->opaque, (double)i / l1_size * 0.8);
		if (e & QCOW2_L1E_RESERVED_MASK) {
			MSG(c, QCOW2_MSG_ERROR,
			    "%s found L1 entry with reserved bits set: %" PRIx64,
			    fixing(c, fix) ? "Repairing" : "ERROR", e);
			c->res->corruptions++;
			if (fixing(c, fix) &&
			    write_l1_entry(c, l1_off, l1_size, i, e & ~QCOW2_L1E_RESERVED_MASK,
					   active) == 0) {
				c->res->corruptions--;
				fixed_one(c);
				e &= ~QCOW2_L1E_RESERVED_MASK;
				if (!active)
					l1[i] = e;
			}
		}
		l2_off = e & QCOW2_L1E_OFFSET_MASK;
		if (!l2_off) {
			/* flags without a table: qemu-img counts this against cluster 0 */
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR L1 entry %u has flags but no L2 table offset: %" PRIx64, i, e);
			c->res->corruptions++;
			continue;
		}
		if (fixing(c, fix) && (l2_off & (c->cs - 1) || past_eof(c, l2_off, c->cs) ||
				       meta_conflict(c, l2_off, K_L2))) {
			MSG(c, QCOW2_MSG_REPAIR,
			    "Repairing L1 entry %u: L2 table offset 0x%" PRIx64
			    " is %s; its guest clusters are now unallocated",
			    i, l2_off,
			    l2_off & (c->cs - 1)         ? "not cluster aligned"
			    : past_eof(c, l2_off, c->cs) ? "past the end of the file"
							 : "used by other metadata");
			if (write_l1_entry(c, l1_off, l1_size, i, 0, active) == 0) {
				c->res->corruptions_fixed++;
				if (!active)
					l1[i] = 0;
				continue;
			}
		}
		ret = inc_refs(c, l2_off, c->cs, K_L2);
		if (ret < 0)
			break;
		if (l2_off & (c->cs - 1)) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry "
			    "corrupted",
			    l2_off);
			c->res->corruptions++;
		}
		ret = walk_l2(c, l2_off, active, fix);
		if (ret < 0)
			break;
	}
	if (!active)
		free(l1);
	return ret;
}

/* ---- bitmaps ---- */

#define BME_TABLE_OFFSET_MASK 0x00fffffffffffe00ull

static int walk_bitmaps(struct chk *c)
{
	const struct qcow2_header_info *h = c->h;
	uint8_t *dir;
	uint64_t pos = 0;
	int ret;

	if (!h->has_bitmaps || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	ret = inc_refs(c, h->bitmap_directory_offset, h->bitmap_directory_size, K_BITMAP);
	if (ret < 0)
		return ret;
	dir = malloc(h->bitmap_directory_size);
	if (!dir) {
		c->res->check_errors++;
		return -ENOMEM;
	}
	ret = qcow2_io_read(c->io, dir, h->bitmap_directory_size, h->bitmap_directory_offset);
	if (ret < 0) {
		c->res->check_errors++;
		goto out_dir;
	}
	for (uint32_t n = 0; n < h->nb_bitmaps; n++) {
		uint64_t toff, *tbl, elen;
		uint32_t tsize, extra;
		uint16_t nlen;

		/* entries are padded to 8 bytes, the last one too (all within the size) */
		if (pos > h->bitmap_directory_size || h->bitmap_directory_size - pos < 24) {
			MSG(c, QCOW2_MSG_ERROR, "ERROR bitmap directory truncated at entry %u", n);
			c->res->corruptions++;
			break;
		}
		toff = qcow2_be64(dir + pos);
		tsize = qcow2_be32(dir + pos + 8);
		nlen = qcow2_be16(dir + pos + 18);
		extra = qcow2_be32(dir + pos + 20);
		elen = (24 + (uint64_t)extra + nlen + 7) & ~7ull;
		if (elen > h->bitmap_directory_size - pos) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR bitmap %u: directory entry (extra data %u, name length %u) runs "
			    "past the bitmap directory",
			    n, extra, nlen);
			c->res->corruptions++;
			break;
		}
		pos += elen;
		if (toff & (c->cs - 1) || (uint64_t)tsize * 8 > c->file_size) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR bitmap %u: invalid bitmap table (0x%" PRIx64 ", %u entries)", n,
			    toff, tsize);
			c->res->corruptions++;
			continue;
		}
		ret = inc_refs(c, toff, (uint64_t)tsize * 8, K_BITMAP);
		if (ret < 0)
			break;
		ret = qcow2_read_table(c->io, toff, tsize, &tbl);
		if (ret < 0) {
			c->res->check_errors++;
			break;
		}
		for (uint32_t j = 0; j < tsize && ret == 0; j++) {
			uint64_t o = tbl[j] & BME_TABLE_OFFSET_MASK;

			if (o)
				ret = inc_refs(c, o, c->cs, K_BITMAP);
		}
		free(tbl);
		if (ret < 0)
			break;
	}
out_dir:
	free(dir);
	return ret;
}

/* ---- the refcount structure ---- */

static int check_refblocks(struct chk *c)
{
	const struct qcow2_header_info *h = c->h;
	int ret;

	for (uint64_t i = 0; i < h->refcount_table_entries; i++) {
		uint64_t e = c->im->rt[i], off = e & QCOW2_RTE_OFFSET_MASK, cl = off >> c->cbits;

		if (e & QCOW2_RTE_RESERVED_MASK) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR refcount table entry %" PRIu64 " has reserved bits set", i);
			c->res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (off & (c->cs - 1)) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR refcount block %" PRIu64
			    " is not cluster aligned; refcount table "
			    "entry corrupted",
			    i);
			c->res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (off && cl >= c->nb) {
			MSG(c, QCOW2_MSG_ERROR, "ERROR refcount block %" PRIu64 " is outside image",
			    i);
			c->res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (!off)
			continue;
		ret = inc_refs(c, off, c->cs, K_REFBLOCK);
		if (ret < 0)
			return ret;
		if (cl < c->nb && c->refs[cl] != 1) {
			MSG(c, QCOW2_MSG_ERROR, "ERROR refcount block %" PRIu64 " refcount=%u", i,
			    c->refs[cl]);
			c->res->corruptions++;
			c->rebuild = true;
		}
	}
	return 0;
}

static void premark_all(struct chk *c)
{
	const struct qcow2_header_info *h = c->h;

	premark(c, 0, c->cs, K_HEADER);
	premark(c, h->l1_table_offset, (uint64_t)h->l1_size * 8, K_L1);
	for (uint32_t i = 0; i < h->nb_snapshots; i++)
		if (!(c->im->snaps[i].l1_table_offset & (c->cs - 1)))
			premark(c, c->im->snaps[i].l1_table_offset,
				(uint64_t)c->im->snaps[i].l1_size * 8, K_L1);
	for (uint32_t i = 0; i < h->l1_size; i++) {
		uint64_t off = c->im->l1[i] & QCOW2_L1E_OFFSET_MASK;
		if (off && !(off & (c->cs - 1)))
			premark(c, off, c->cs, K_L2);
	}
	premark(c, h->snapshots_offset, c->im->snapbuf_len, K_SNAPTABLE);
	premark(c, h->refcount_table_offset, h->refcount_table_entries * 8, K_REFTABLE);
	for (uint64_t i = 0; i < h->refcount_table_entries; i++) {
		uint64_t off = c->im->rt[i] & QCOW2_RTE_OFFSET_MASK;
		if (off && !(off & (c->cs - 1)))
			premark(c, off, c->cs, K_REFBLOCK);
	}
	if (h->has_bitmaps)
		premark(c, h->bitmap_directory_offset, h->bitmap_directory_size, K_BITMAP);
}

/* Compute every cluster's references (step 1). */
static int calculate(struct chk *c, unsigned fix)
{
	const struct qcow2_header_info *h = c->h;
	int ret;

	memset(c->refs, 0, c->nb * sizeof(*c->refs));
	memset(c->kind, 0, c->nb);
	memset(c->meta, 0, c->nb);
	memset(c->reported, 0, c->nb);
	c->res->allocated_clusters = 0;
	c->res->fragmented_clusters = 0;
	c->res->compressed_clusters = 0;
	premark_all(c);
	/* premarking is only for the write guards: start counting from scratch */
	ret = inc_refs(c, 0, c->cs, K_HEADER);
	if (ret < 0)
		return ret;
	ret = walk_l1(c, h->l1_table_offset, h->l1_size, true, fix);
	if (ret < 0)
		return ret;
	if (c->data_file && h->nb_snapshots) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR %u snapshots in image with data file",
		    h->nb_snapshots);
		c->res->corruptions++;
	}
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		const struct qcow2_snapshot_info *s = &c->im->snaps[i];

		if (s->l1_table_offset & (c->cs - 1)) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR snapshot %.*s (%.*s) l1_offset=%#" PRIx64
			    ": L1 table is not cluster aligned; snapshot table entry corrupted",
			    (int)s->id_len, s->id, (int)s->name_len, s->name, s->l1_table_offset);
			c->res->corruptions++;
			continue;
		}
		if (s->l1_size > QCOW2_MAX_L1_ENTRIES) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR snapshot %.*s (%.*s) l1_size=%#x: L1 table is too large; "
			    "snapshot "
			    "table entry corrupted",
			    (int)s->id_len, s->id, (int)s->name_len, s->name, s->l1_size);
			c->res->corruptions++;
			continue;
		}
		ret = walk_l1(c, s->l1_table_offset, s->l1_size, false, fix);
		if (ret < 0)
			return ret;
	}
	ret = inc_refs(c, h->snapshots_offset, c->im->snapbuf_len, K_SNAPTABLE);
	if (ret < 0)
		return ret;
	ret = walk_bitmaps(c);
	if (ret < 0)
		return ret;
	if (!c->count_structure)
		return 0;
	ret = inc_refs(c, h->refcount_table_offset, h->refcount_table_entries * 8, K_REFTABLE);
	if (ret < 0)
		return ret;
	return check_refblocks(c);
}

/* Compare stored and computed refcounts (step 2). Returns the highest cluster in use. */
static uint64_t compare(struct chk *c, unsigned fix)
{
	uint64_t highest = 0;

	for (uint64_t i = 0; i < c->nb; i++) {
		uint64_t r1, r2 = c->refs[i];
		int ret = get_refcount(c, i, &r1);
		bool fixit = false;

		if (ret < 0) {
			MSG(c, QCOW2_MSG_ERROR, "Can't get refcount for cluster %" PRIu64 ": %s", i,
			    strerror(-ret));
			c->res->check_errors++;
			continue;
		}
		if (r1 || r2)
			highest = i;
		if (r1 == r2)
			continue;
		if (r1 == 0)
			c->rebuild = true;
		else if (r1 > r2 && (fix & QCOW2_CHECK_FIX_LEAKS))
			fixit = true;
		else if (r1 < r2 && (fix & QCOW2_CHECK_FIX_ERRORS))
			fixit = true;
		MSG(c,
		    r1 < r2 && !fixit ? QCOW2_MSG_ERROR
		    : fixit           ? QCOW2_MSG_REPAIR
				      : QCOW2_MSG_INFO,
		    "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
		    fixit     ? "Repairing"
		    : r1 < r2 ? "ERROR"
			      : "Leaked",
		    i, r1, r2);
		if (fixit && set_refcount(c, i, r2) == 0) {
			if (r1 > r2)
				c->res->leaks_fixed++;
			else
				c->res->corruptions_fixed++;
			continue;
		}
		if (r1 < r2)
			c->res->corruptions++;
		else
			c->res->leaks++;
	}
	rbc_flush(c);
	return highest;
}

/*
 * Write a new refcount structure covering the computed references (which
 * must not include the old structure), past everything in use. Durable
 * before the header switches to it.
 */
static int rebuild(struct chk *c)
{
	const struct qcow2_header_info *h = c->h;
	uint64_t rb_entries = 1ull << h->refcount_block_bits;
	uint64_t start = div_up(c->file_size, c->cs), nrb = 1, nrt = 1, total;
	uint8_t *buf = NULL, hdr[12];
	uint64_t *rt = NULL;
	int ret;

	MSG(c, QCOW2_MSG_REPAIR, "Rebuilding refcount structure");
	for (uint64_t i = c->nb; i > start; i--)
		if (c->refs[i - 1]) {
			start = i;
			break;
		}
	for (int i = 0; i < 64; i++) {
		uint64_t t = start + nrb + nrt;
		uint64_t b = div_up(t, rb_entries), r = div_up(b * 8, c->cs);

		if (b == nrb && r == nrt)
			break;
		nrb = b;
		nrt = r;
	}
	total = start + nrb + nrt;
	if (nrt * c->cs > QCOW2_MAX_REFTABLE_BYTES ||
	    (total << c->cbits) >= QCOW2_MAX_HOST_OFFSET || nrt > UINT32_MAX) {
		MSG(c, QCOW2_MSG_ERROR, "ERROR the rebuilt refcount table would be too large");
		c->res->check_errors++;
		return -EFBIG;
	}
	ret = grow(c, total);
	if (ret < 0)
		goto fail;
	for (uint64_t k = start; k < total; k++) {
		c->refs[k] = 1;
		c->kind[k] = k < start + nrb ? K_REFBLOCK : K_REFTABLE;
	}
	ret = -ENOMEM;
	buf = malloc(c->cs);
	rt = calloc(nrt * c->cs / 8, 8);
	if (!buf || !rt)
		goto fail;
	for (uint64_t b = 0; b < nrb; b++) {
		uint64_t off = (start + b) << c->cbits;

		memset(buf, 0, c->cs);
		for (uint64_t j = 0; j < rb_entries; j++) {
			uint64_t k = b * rb_entries + j;
			uint64_t v;

			if (k >= total)
				break;
			v = c->refs[k];
			if (v > qcow2_refcount_max(h->refcount_order))
				v = qcow2_refcount_max(h->refcount_order);
			qcow2_refcount_set(buf, j, h->refcount_order, v);
		}
		ret = qcow2_io_write(c->io, buf, c->cs, off);
		if (ret < 0)
			goto fail;
		rt[b] = off;
	}
	for (uint64_t i = 0; i < nrt * c->cs / 8; i++)
		qcow2_put_be64(&rt[i], rt[i]);
	ret = qcow2_io_write(c->io, rt, nrt * c->cs, (start + nrb) << c->cbits);
	if (ret < 0)
		goto fail;
	ret = qcow2_io_sync(c->io);
	if (ret < 0)
		goto fail;
	/* refcount_table_offset and refcount_table_clusters are adjacent: one write */
	qcow2_put_be64(hdr, (start + nrb) << c->cbits);
	qcow2_put_be32(hdr + 8, (uint32_t)nrt);
	ret = qcow2_io_write(c->io, hdr, sizeof(hdr), QCOW2_OFF_REFCOUNT_TABLE_OFFSET);
	if (ret < 0)
		goto fail;
	ret = qcow2_io_sync(c->io);
	if (ret < 0)
		goto fail;
	c->wrote = true;
	/* the in-memory view follows the header */
	for (uint64_t i = 0; i < nrt * c->cs / 8; i++)
		rt[i] = qcow2_be64(&rt[i]);
	free(c->im->rt);
	c->im->rt = rt;
	c->im->h.refcount_table_offset = (start + nrb) << c->cbits;
	c->im->h.refcount_table_clusters = (uint32_t)nrt;
	c->im->h.refcount_table_entries = nrt * c->cs / 8;
	c->file_size = total << c->cbits;
	rbc_drop(c);
	free(buf);
	return 0;
fail:
	MSG(c, QCOW2_MSG_ERROR, "ERROR rebuilding the refcount structure: %s", strerror(-ret));
	c->res->check_errors++;
	free(buf);
	free(rt);
	return ret;
}

/* Step 3: COPIED flags of the active tables. */
static int check_copied(struct chk *c, unsigned fix)
{
	const struct qcow2_header_info *h = c->h;
	bool repair;

	if (fix & QCOW2_CHECK_FIX_ERRORS)
		repair = true;
	else if (fix & QCOW2_CHECK_FIX_LEAKS)
		repair = !c->res->check_errors && !c->res->corruptions && !c->res->leaks;
	else
		repair = false;

	for (uint32_t i = 0; i < h->l1_size; i++) {
		uint64_t l1e = c->im->l1[i], l2_off = l1e & QCOW2_L1E_OFFSET_MASK, r;
		uint64_t ndirty = 0;
		int ret;

		if (!l2_off)
			continue;
		if (get_refcount(c, l2_off >> c->cbits, &r) == 0 &&
		    (r == 1) != !!(l1e & QCOW2_OFLAG_COPIED)) {
			c->res->corruptions++;
			MSG(c, repair ? QCOW2_MSG_REPAIR : QCOW2_MSG_ERROR,
			    "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64
			    " refcount=%" PRIu64,
			    repair ? "Repairing" : "ERROR", i, l1e, r);
			if (repair) {
				uint64_t v =
				    r == 1 ? l1e | QCOW2_OFLAG_COPIED : l1e & ~QCOW2_OFLAG_COPIED;

				ret = write_l1_entry(c, h->l1_table_offset, h->l1_size, i, v, true);
				if (ret < 0)
					return ret;
				c->res->corruptions--;
				c->res->corruptions_fixed++;
			}
		}
		ret = qcow2_io_read(c->io, c->l2buf, c->cs, l2_off);
		if (ret < 0) {
			MSG(c, QCOW2_MSG_ERROR, "ERROR: Could not read L2 table: %s",
			    strerror(-ret));
			c->res->check_errors++;
			return ret;
		}
		for (uint32_t j = 0; j < h->l2_entries; j++) {
			uint8_t *p = c->l2buf + (size_t)j * h->l2_entry_size;
			uint64_t e = qcow2_be64(p);
			enum qcow2_cluster_type t = cluster_type(c, e);

			if (t != QCOW2_CT_NORMAL && t != QCOW2_CT_ZERO_ALLOC)
				continue;
			if (c->data_file)
				r = 1;
			else if (get_refcount(c, (e & QCOW2_L2E_OFFSET_MASK) >> c->cbits, &r) < 0)
				continue;
			if ((r == 1) == !!(e & QCOW2_OFLAG_COPIED))
				continue;
			c->res->corruptions++;
			MSG(c, repair ? QCOW2_MSG_REPAIR : QCOW2_MSG_ERROR,
			    "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
			    repair ? "Repairing" : "ERROR", e, r);
			if (repair) {
				qcow2_put_be64(p, r == 1 ? e | QCOW2_OFLAG_COPIED
							 : e & ~QCOW2_OFLAG_COPIED);
				ndirty++;
			}
		}
		if (ndirty) {
			ret = write_l2(c, l2_off);
			if (ret < 0)
				return ret;
			c->res->corruptions -= ndirty;
			c->res->corruptions_fixed += ndirty;
		}
	}
	return 0;
}

static int check_refcounts(struct chk *c, unsigned fix)
{
	struct qcow2_check_result pre;
	uint64_t highest;
	int ret;

	c->res->total_clusters = div_up((c->h->size + 511) & ~511ull, c->cs);
	c->rebuild = false;
	c->rebuild_helps = false;
	c->count_structure = true;
	ret = calculate(c, fix);
	if (ret < 0)
		return ret;
	pre = *c->res;
	highest = compare(c, 0);

	if ((c->rebuild || c->rebuild_helps) && (fix & QCOW2_CHECK_FIX_ERRORS)) {
		struct qcow2_check_result old = *c->res, scratch;
		struct qcow2_check_result *saved = c->res;

		/* references without the old refcount structure, then a new one */
		memset(&scratch, 0, sizeof(scratch));
		c->res = &scratch;
		c->count_structure = false;
		ret = calculate(c, 0);
		c->res = saved;
		if (ret < 0) {
			c->res->check_errors++;
			return ret;
		}
		ret = rebuild(c);
		if (ret < 0)
			return ret;
		/* count again against the new structure */
		c->res->corruptions = 0;
		c->res->leaks = 0;
		c->rebuild = false;
		c->count_structure = true;
		ret = calculate(c, 0);
		if (ret < 0)
			return ret;
		memset(&scratch, 0, sizeof(scratch));
		c->res = &scratch;
		highest = compare(c, QCOW2_CHECK_FIX_LEAKS);
		c->res = saved;
		if (c->rebuild)
			MSG(c, QCOW2_MSG_ERROR, "ERROR rebuilt refcount structure is still broken");
		c->res->check_errors += scratch.check_errors;
		if (c->res->corruptions < old.corruptions)
			c->res->corruptions_fixed += old.corruptions - c->res->corruptions;
		if (c->res->leaks < old.leaks)
			c->res->leaks_fixed += old.leaks - c->res->leaks;
		c->res->leaks += scratch.leaks;
		c->res->corruptions += scratch.corruptions;
	} else if (fix) {
		if (c->rebuild) {
			MSG(c, QCOW2_MSG_ERROR,
			    "ERROR need to rebuild refcount structures (use -r all)");
			c->res->check_errors++;
			return -EIO;
		}
		if (c->res->leaks || c->res->corruptions) {
			*c->res = pre;
			highest = compare(c, fix);
		}
	}
	ret = check_copied(c, fix);
	if (ret < 0)
		return ret;
	c->res->image_end_offset = (highest + 1) * c->cs;
	return 0;
}

/* Clear the dirty and corrupt bits (version 3 only has them). */
static int mark_clean(struct chk *c, bool *cleared)
{
	uint64_t inc = c->h->incompatible_features;
	uint8_t b[8];
	int ret;

	*cleared = false;
	if (c->h->version < 3 || !(inc & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)))
		return 0;
	ret = qcow2_io_sync(c->io);
	if (ret < 0)
		return ret;
	*cleared = (inc & QCOW2_INCOMPAT_DIRTY) != 0;
	inc &= ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
	qcow2_put_be64(b, inc);
	ret = qcow2_io_write(c->io, b, 8, QCOW2_OFF_INCOMPAT);
	if (ret < 0)
		return ret;
	ret = qcow2_io_sync(c->io);
	if (ret < 0)
		return ret;
	c->im->h.incompatible_features = inc;
	return 0;
}

static void chk_free(struct chk *c)
{
	free(c->refs);
	free(c->kind);
	free(c->meta);
	free(c->reported);
	free(c->l2buf);
	for (int i = 0; i < RBC_N; i++)
		free(c->rbc[i].buf);
}

static int check_once(struct qcow2_oimg *im, unsigned fix, struct qcow2_check_result *res,
		      const struct qcow2_tool_cb *cb)
{
	struct chk c;
	int ret;

	memset(&c, 0, sizeof(c));
	memset(res, 0, sizeof(*res));
	c.im = im;
	c.h = &im->h;
	c.cb = cb;
	c.res = res;
	c.io = &im->io;
	c.cs = im->h.cluster_size;
	c.cbits = im->h.cluster_bits;
	c.file_size = im->file_size;
	c.data_file = (im->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) != 0;
	c.refmax = qcow2_refcount_max(im->h.refcount_order);
	if (c.refmax > UINT32_MAX)
		c.refmax = UINT32_MAX;
	c.l2buf = malloc(c.cs);
	ret = c.l2buf ? grow(&c, div_up(c.file_size, c.cs)) : -ENOMEM;
	if (ret < 0) {
		res->check_errors++;
		goto out;
	}
	ret = check_refcounts(&c, fix);
	if (fix && !res->check_errors && !res->corruptions && ret == 0) {
		bool cleared;

		ret = mark_clean(&c, &cleared);
		if (ret < 0) {
			res->check_errors++;
		} else {
			res->dirty_cleared = cleared;
			c.wrote = true;
		}
	}
	if (c.wrote) {
		int sret = qcow2_io_sync(c.io);

		if (sret < 0 && !ret) {
			ret = sret;
			res->check_errors++;
		}
	}
	im->file_size = c.file_size > im->file_size ? c.file_size : im->file_size;
out:
	if (cb && cb->progress)
		cb->progress(cb->opaque, 1.0);
	chk_free(&c);
	return ret;
}

int qcow2_check_io(const struct qcow2_io *io, const char *name, unsigned flags,
		   struct qcow2_check_result *res, const struct qcow2_tool_cb *cb, char *err,
		   size_t errlen)
{
	struct qcow2_oimg im;
	int ret;

	memset(res, 0, sizeof(*res));
	if (err && errlen)
		err[0] = 0;
	if (flags & QCOW2_CHECK_FIX_ERRORS)
		flags |= QCOW2_CHECK_FIX_LEAKS;
	ret = qcow2_oimg_open(&im, io, name, flags != 0, err, errlen);
	if (ret < 0) {
		res->check_errors = 1;
		goto out;
	}
	ret = check_once(&im, flags, res, cb);
	if (ret == 0 && flags && (res->corruptions_fixed || res->leaks_fixed)) {
		/* as qemu-img: report what is left after the repair */
		struct qcow2_check_result again;
		uint64_t cf = res->corruptions_fixed, lf = res->leaks_fixed;
		bool dc = res->dirty_cleared;
		char e2[256];

		qcow2_oimg_close(&im);
		ret = qcow2_oimg_open(&im, io, name, false, e2, sizeof(e2));
		if (ret < 0) {
			snprintf(err, errlen, "re-reading the repaired image: %s", e2);
			res->check_errors++;
			goto out;
		}
		ret = check_once(&im, 0, &again, NULL);
		*res = again;
		res->corruptions_fixed = cf;
		res->leaks_fixed = lf;
		res->dirty_cleared = dc;
	}
	if (ret < 0) {
		if (err && errlen && !err[0])
			snprintf(err, errlen, "the check could not be completed: %s",
				 strerror(-ret));
		if (!res->check_errors)
			res->check_errors = 1;
	}
out:
	qcow2_oimg_close(&im);
	return ret;
}
