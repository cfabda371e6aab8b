/* SPDX-License-Identifier: MIT */
/*
 * qcow2/bitmap.c — persistent dirty bitmaps (qcow2.txt "Bitmaps extension",
 * "Bitmap directory", "Bitmap table", "Dirty tracking bitmaps").
 *
 * What the engine does with them (a read-only open validates and lists
 * them the same way, tracks none and never writes anything; a directory it
 * cannot handle is then only a warning: the open works, nothing listed):
 *
 *  open    The bitmaps extension counts only while autoclear bit 0 is set
 *          (otherwise a program without bitmap support wrote the image: the
 *          extension is ignored and the bit stays clear, as the spec says).
 *          The directory and every bitmap table are read and validated
 *          (bounds, sizes, granularity 9..31, flags, type, name lengths and
 *          uniqueness, table entries, no cluster shared with other metadata
 *          or with another bitmap). A directory we cannot handle (unknown
 *          flags, type, extra data, or simply invalid) refuses the read-write
 *          open with a message naming the image, the bitmap and the problem;
 *          a read-only open still works. Enabled bitmaps ("auto" set, not
 *          "in_use") are TRACKED: their bits are loaded into memory. Disabled
 *          bitmaps and bitmaps already "in_use" (inconsistent, e.g. left by a
 *          crash) are left exactly as they are on disk.
 *  start   Before the first guest write can land (still inside open), the
 *          tracked bitmaps are marked in_use, in QEMU's order:
 *            autoclear bit 0 cleared in the header  -> fsync
 *            directory rewritten in place (flags)   -> fsync
 *            autoclear bit 0 set again               -> fsync
 *          A crash in between leaves either the old directory or the
 *          extension ignored (autoclear clear): never a half-written
 *          directory that claims to be valid.
 *  run     Every write, write-zeroes and discard request sets the bits of
 *          all granules it touches (qcow2_bitmap_mark(), called once per
 *          request before its I/O starts: a superset of what landed).
 *          Nothing is written while the image is open: an in_use bitmap is
 *          by definition not in sync with the file (the spec's "in_use"
 *          semantics). After a crash or kill -9 the tracked bitmaps stay
 *          in_use, which QEMU reports as inconsistent: that is the
 *          documented behaviour, never a silently wrong bitmap.
 *  close   The tracked bitmaps are stored copy-on-write, so nothing on disk
 *          ever points at a cluster with refcount 0 and a crash at any point
 *          leaves either the old state (bitmaps in_use) or the new one:
 *            1. new data clusters (only for non-zero parts; all-zero parts
 *               get table entry 0), new bitmap tables and a new directory
 *               (tracked entries: new table, in_use cleared) are allocated
 *               with the engine's allocator (refcounts raised in the cache)
 *               and written;
 *            2. a metadata flush makes the refcounts and these writes durable
 *               (writeback.c: refcounts -> fdatasync -> ...);
 *            3. the extension's directory offset is switched (one aligned
 *               8-byte header write) -> fsync;
 *            4. the old directory, tables and data clusters are released
 *               through the engine's deferred decrements (written back by
 *               qcow2_close()).
 *          A bitmap that could not be kept (out of memory while marking) or
 *          a store that fails stays in_use on disk: inconsistent, not wrong.
 *
 * Invariants:
 *  - Only TRACKED bitmaps are ever modified, and only their table offset,
 *    table size and flags in the directory; other entries are copied
 *    byte for byte.
 *  - The number of bitmaps and the directory size never change.
 *  - Every cluster of the bitmap structures is in the engine's metadata set
 *    (q->meta) while open, so an L2 entry or an allocation reaching one is
 *    detected as corruption.
 *  - A tracked bitmap's bits live in cluster-sized chunks, one per bitmap
 *    table entry; a NULL chunk is all zeroes. Bits past the virtual size are
 *    always zero (the spec's tail bits).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BM_DIR_ENTRY_LEN 24u /* fixed part of a directory entry */
#define BM_FLAG_IN_USE   (1u << 0)
#define BM_FLAG_AUTO     (1u << 1)
#define BM_FLAG_EXTRA_OK (1u << 2) /* extra_data_compatible */
#define BM_FLAGS_KNOWN   0x7u
#define BM_TYPE_DIRTY    1u
#define BM_MIN_GRAN_BITS 9u /* QEMU's supported range */
#define BM_MAX_GRAN_BITS 31u
#define BM_MAX_NAME      1023u
#define BM_MAX_TABLE     0x8000000u   /* entries per table (QEMU's limit) */
#define BM_MAX_PHYS      0x20000000u  /* bytes of data clusters per bitmap (QEMU's limit) */
#define BM_MAX_TABLES    (256u << 20) /* bytes of all bitmap tables together (ours) */

/* Bitmap table entry: bits 9..55 host offset, bit 0 "all ones" when unallocated. */
#define BM_TE_OFFSET_MASK   0x00fffffffffffe00ull
#define BM_TE_RESERVED_MASK 0xff000000000001feull
#define BM_TE_ALL_ONES      1ull

/*
 * Directory entry as stored (big-endian), followed by extra data, the name
 * (not terminated) and zero padding to a multiple of 8.
 */
struct bm_dir_disk {
	uint64_t table_offset;
	uint32_t table_size; /* entries */
	uint32_t flags;
	uint8_t type;
	uint8_t granularity_bits;
	uint16_t name_size;
	uint32_t extra_data_size;
} __attribute__((packed));
_Static_assert(sizeof(struct bm_dir_disk) == BM_DIR_ENTRY_LEN, "bitmap directory entry size");

struct q2_bm {
	uint32_t pos; /* byte offset of the entry in the directory */
	uint64_t table_off;
	uint32_t table_size;
	uint32_t flags;
	uint8_t gbits;
	bool tracked;     /* bits in memory, in_use on disk, stored at close */
	bool recording;   /* tracked and enabled: follows guest writes */
	bool lost;        /* tracked, but a bit could not be recorded (ENOMEM) */
	bool frozen;      /* tracked, then stored by qcow2_bitmap_freeze: read-only now */
	char name[64];    /* for messages (truncated) */
	uint64_t *table;  /* tracked only: the old table, host order */
	uint64_t *ntable; /* store_one: the new table (big-endian), until the switch */
	uint64_t ntable_off;
	uint64_t nbits;   /* tracked: bits covering the virtual size */
	uint32_t nchunks; /* tracked: table entries needed (chunks of cluster size) */
	uint8_t **chunks; /* tracked: NULL = all zero */
	uint64_t ones;    /* consistent, not tracked: bits set on disk (counted at open) */
};

struct q2_bitmaps {
	uint8_t *dir; /* the directory as on disk */
	uint64_t dir_off, dir_size;
	uint32_t ext_data_off; /* byte offset of the extension's data in the header */
	uint32_t n, ntracked, nrecording;
	uint32_t nfrozen; /* stored by qcow2_bitmap_freeze: the bits stay, listed */
	struct q2_bm *bm;
};

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static int push_range(struct q2_u64v *v, uint64_t off, uint64_t len, uint32_t cb)
{
	for (uint64_t c = off >> cb; c <= (off + len - 1) >> cb; c++)
		if (q2_u64v_push(v, c) < 0)
			return -ENOMEM;
	return 0;
}

/* Byte offset of the bitmaps extension's data in the (already validated) header. */
static uint32_t find_ext(const uint8_t *hbuf, size_t hlen, uint32_t start)
{
	uint32_t off = start;

	while (off + 8 <= hlen) {
		uint32_t type = qcow2_be32(hbuf + off), len = qcow2_be32(hbuf + off + 4);

		if (type == QCOW2_EXT_END)
			break;
		if (type == QCOW2_EXT_BITMAPS)
			return off + 8;
		off += 8 + ((len + 7) & ~7u);
	}
	return 0;
}

/* Virtual size as QEMU counts it for bitmaps: whole 512-byte sectors. */
static uint64_t bm_disk_size(const struct qcow2 *q)
{
	return q->h.size & ~511ull;
}

static void bm_free(struct q2_bitmaps *b)
{
	if (!b)
		return;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (bm->chunks)
			for (uint32_t k = 0; k < bm->nchunks; k++)
				free(bm->chunks[k]);
		free(bm->chunks);
		free(bm->table);
		free(bm->ntable);
	}
	free(b->bm);
	free(b->dir);
	free(b);
}

void q2_bitmap_exit(struct qcow2 *q)
{
	bm_free(q->bms);
	q->bms = NULL;
}

/* Parse and check one directory entry at @pos; fills @bm. */
static int parse_entry(struct qcow2 *q, struct q2_bitmaps *b, uint32_t idx, uint64_t pos,
		       struct q2_bm *bm, uint64_t *entry_len, char *err, size_t errlen)
{
	const uint8_t *e = b->dir + pos;
	uint64_t left = b->dir_size - pos, len, fsize = q->file->size;
	uint32_t extra, name_size;
	const char *path = q->path;

	if (left < BM_DIR_ENTRY_LEN)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "%s: bitmap directory: entry %u truncated (%llu bytes left)",
				    path, idx, (unsigned long long)left);
	bm->pos = (uint32_t)pos;
	bm->table_off = qcow2_be64(e + offsetof(struct bm_dir_disk, table_offset));
	bm->table_size = qcow2_be32(e + offsetof(struct bm_dir_disk, table_size));
	bm->flags = qcow2_be32(e + offsetof(struct bm_dir_disk, flags));
	bm->gbits = e[offsetof(struct bm_dir_disk, granularity_bits)];
	name_size = qcow2_be16(e + offsetof(struct bm_dir_disk, name_size));
	extra = qcow2_be32(e + offsetof(struct bm_dir_disk, extra_data_size));
	len = ((uint64_t)BM_DIR_ENTRY_LEN + extra + name_size + 7) & ~7ull;
	if (name_size == 0 || name_size > BM_MAX_NAME)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "%s: bitmap directory: entry %u has name_size %u (1..%u)", path,
				    idx, name_size, BM_MAX_NAME);
	if (len > left)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "%s: bitmap directory: entry %u (%llu bytes) runs past the directory "
		    "(%llu bytes left)",
		    path, idx, (unsigned long long)len, (unsigned long long)left);
	{
		size_t n = name_size < sizeof(bm->name) - 1 ? name_size : sizeof(bm->name) - 1;

		memcpy(bm->name, e + BM_DIR_ENTRY_LEN + extra, n);
		bm->name[n] = '\0';
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)bm->name[i] < 0x20 || bm->name[i] == 0x7f)
				bm->name[i] = '?';
	}
	for (uint64_t i = BM_DIR_ENTRY_LEN + extra + name_size; i < len; i++)
		if (e[i])
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: bitmap '%s': non-zero padding in the directory entry", path,
			    bm->name);
	*entry_len = len;
	if (bm->flags & ~BM_FLAGS_KNOWN)
		return qcow2_seterr(
		    err, errlen, -ENOTSUP,
		    "%s: bitmap '%s' has unknown flags 0x%x: writing the image could "
		    "corrupt it (open it read-only)",
		    path, bm->name, bm->flags & ~BM_FLAGS_KNOWN);
	if (e[offsetof(struct bm_dir_disk, type)] != BM_TYPE_DIRTY)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "%s: bitmap '%s' has unknown type %u (open it read-only)", path,
				    bm->name, e[offsetof(struct bm_dir_disk, type)]);
	if (extra)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "%s: bitmap '%s' has %u bytes of extra data, which is not "
				    "supported (open it read-only)",
				    path, bm->name, extra);
	if (bm->gbits < BM_MIN_GRAN_BITS || bm->gbits > BM_MAX_GRAN_BITS)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "%s: bitmap '%s' has granularity_bits %u (supported: %u..%u)",
				    path, bm->name, bm->gbits, BM_MIN_GRAN_BITS, BM_MAX_GRAN_BITS);
	if (!bm->table_off || (bm->table_off & (q->cs - 1)) ||
	    bm->table_off >= QCOW2_MAX_HOST_OFFSET)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "%s: bitmap '%s': bitmap table offset 0x%llx is not a valid cluster "
		    "offset",
		    path, bm->name, (unsigned long long)bm->table_off);
	if (bm->table_size == 0 || bm->table_size > BM_MAX_TABLE ||
	    (uint64_t)bm->table_size * q->cs > BM_MAX_PHYS)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "%s: bitmap '%s': bitmap table size %u out of range", path,
				    bm->name, bm->table_size);
	if (bm->table_off > fsize || (uint64_t)bm->table_size * 8 > fsize - bm->table_off)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "%s: bitmap '%s': bitmap table (0x%llx, %u entries) extends past the "
		    "end of the file",
		    path, bm->name, (unsigned long long)bm->table_off, bm->table_size);
	if (q2_meta_overlaps(q, bm->table_off, (uint64_t)bm->table_size * 8))
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "%s: bitmap '%s': bitmap table (0x%llx) overlaps other metadata", path,
		    bm->name, (unsigned long long)bm->table_off);
	/* names must be unique */
	for (uint32_t j = 0; j < idx; j++) {
		const uint8_t *o = b->dir + b->bm[j].pos;

		if (qcow2_be16(o + offsetof(struct bm_dir_disk, name_size)) == name_size &&
		    !memcmp(o + BM_DIR_ENTRY_LEN, e + BM_DIR_ENTRY_LEN + extra, name_size))
			return qcow2_seterr(err, errlen, -EINVAL,
					    "%s: bitmap name '%s' appears twice in the directory",
					    path, bm->name);
	}
	/* an enabled, consistent bitmap must cover the whole disk */
	if (!(bm->flags & BM_FLAG_IN_USE)) {
		uint64_t nbits = div_up(bm_disk_size(q), 1ull << bm->gbits);
		uint64_t need = div_up(div_up(nbits, 8), q->cs);

		if (bm->table_size < need)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: bitmap '%s': bitmap table has %u entries, the disk size "
			    "needs %llu",
			    path, bm->name, bm->table_size, (unsigned long long)need);
		bm->nbits = nbits;
		bm->nchunks = (uint32_t)need;
	}
	return 0;
}

static int count_ones(struct qcow2 *q, struct q2_bm *bm, const uint64_t *t, char *err,
		      size_t errlen);

/* Read and check @bm's table; add its clusters to @clu. Keeps the table if tracked. */
static int load_table(struct qcow2 *q, struct q2_bm *bm, struct q2_u64v *clu, char *err,
		      size_t errlen)
{
	struct qcow2_io fio = q2_file_io(q->file);
	uint64_t *t, fsize = q->file->size;
	int ret;

	ret = qcow2_read_table(&fio, bm->table_off, bm->table_size, &t);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret,
				    "%s: bitmap '%s': reading the bitmap table: %s", q->path,
				    bm->name, strerror(-ret));
	ret = push_range(clu, bm->table_off, (uint64_t)bm->table_size * 8, q->cb);
	for (uint32_t i = 0; ret == 0 && i < bm->table_size; i++) {
		uint64_t e = t[i], off = e & BM_TE_OFFSET_MASK;

		if ((e & BM_TE_RESERVED_MASK) || (off && (e & BM_TE_ALL_ONES)) ||
		    (off & (q->cs - 1)) || off >= fsize) {
			ret =
			    qcow2_seterr(err, errlen, -EINVAL,
					 "%s: bitmap '%s': invalid bitmap table entry %u (0x%llx)",
					 q->path, bm->name, i, (unsigned long long)e);
			break;
		}
		if (off)
			ret = q2_u64v_push(clu, off >> q->cb);
	}
	if (ret == 0 && bm->tracked) {
		bm->table = t;
		t = NULL;
	} else if (ret == 0 && !(bm->flags & BM_FLAG_IN_USE)) {
		ret = count_ones(q, bm, t, err, errlen);
	}
	free(t);
	return ret;
}

static uint64_t popcount(const uint8_t *c, size_t len)
{
	uint64_t n = 0;

	for (size_t i = 0; i < len; i++)
		n += (uint64_t)__builtin_popcount(c[i]);
	return n;
}

static void clear_tail(const struct qcow2 *q, const struct q2_bm *bm, uint32_t k, uint8_t *chunk);

/* A consistent bitmap we leave alone (disabled): count its bits once, at open. */
static int count_ones(struct qcow2 *q, struct q2_bm *bm, const uint64_t *t, char *err,
		      size_t errlen)
{
	uint8_t *c = malloc(q->cs);
	int ret = 0;

	if (!c)
		return -ENOMEM;
	for (uint32_t k = 0; k < bm->nchunks; k++) {
		uint64_t e = t[k], off = e & BM_TE_OFFSET_MASK;

		if (!off && !(e & BM_TE_ALL_ONES))
			continue;
		if (!off) {
			memset(c, 0xff, q->cs);
		} else {
			ret = io_file_pread_sync(q->file, c, q->cs, off);
			if (ret < 0) {
				qcow2_seterr(err, errlen, ret,
					     "%s: bitmap '%s': reading bitmap data: %s", q->path,
					     bm->name, strerror(-ret));
				break;
			}
		}
		clear_tail(q, bm, k, c);
		bm->ones += popcount(c, q->cs);
	}
	free(c);
	return ret;
}

/* Clear the bits of @chunk (chunk index @k of @bm) that lie past the disk. */
static void clear_tail(const struct qcow2 *q, const struct q2_bm *bm, uint32_t k, uint8_t *chunk)
{
	uint64_t bits_per = q->cs * 8, first = (uint64_t)k * bits_per;

	if (first + bits_per <= bm->nbits)
		return;
	for (uint64_t bit = bm->nbits > first ? bm->nbits - first : 0; bit < bits_per; bit++) {
		if (bit % 8 == 0 && bit + 8 <= bits_per) {
			memset(chunk + bit / 8, 0, (size_t)((bits_per - bit) / 8));
			break;
		}
		chunk[bit / 8] &= (uint8_t) ~(1u << (bit % 8));
	}
}

/* Load a tracked bitmap's bits into chunks. */
static int load_bits(struct qcow2 *q, struct q2_bm *bm, char *err, size_t errlen)
{
	bm->chunks = calloc(bm->nchunks, sizeof(*bm->chunks));
	if (!bm->chunks)
		return -ENOMEM;
	for (uint32_t k = 0; k < bm->nchunks; k++) {
		uint64_t e = bm->table[k], off = e & BM_TE_OFFSET_MASK;
		uint8_t *c;
		int ret;

		if (!off && !(e & BM_TE_ALL_ONES))
			continue;
		c = malloc(q->cs);
		if (!c)
			return -ENOMEM;
		bm->chunks[k] = c;
		if (!off) {
			memset(c, 0xff, q->cs);
		} else {
			ret = io_file_pread_sync(q->file, c, q->cs, off);
			if (ret < 0)
				return qcow2_seterr(err, errlen, ret,
						    "%s: bitmap '%s': reading bitmap data: %s",
						    q->path, bm->name, strerror(-ret));
		}
		clear_tail(q, bm, k, c);
	}
	return 0;
}

/* Sort @clu, refuse duplicates and clusters of other metadata, merge into q->meta. */
static int merge_meta(struct qcow2 *q, struct q2_u64v *clu, char *err, size_t errlen)
{
	size_t n0 = q->meta.n;

	qsort(clu->v, clu->n, sizeof(uint64_t), cmp_u64);
	for (size_t i = 0; i < clu->n; i++) {
		uint64_t c = clu->v[i];

		if ((i && clu->v[i - 1] == c) || q2_meta_overlaps(q, c << q->cb, q->cs))
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: bitmaps: cluster 0x%llx is used twice (by a bitmap and "
			    "other metadata or another bitmap)",
			    q->path, (unsigned long long)(c << q->cb));
	}
	for (size_t i = 0; i < clu->n; i++)
		if (q2_u64v_push(&q->meta, clu->v[i]) < 0)
			return -ENOMEM;
	if (q->meta.n > n0)
		qsort(q->meta.v, q->meta.n, sizeof(uint64_t), cmp_u64);
	return 0;
}

int q2_bitmap_open(struct qcow2 *q, const void *hbuf, size_t hlen, char *err, size_t errlen)
{
	const struct qcow2_header_info *h = &q->h;
	struct q2_u64v clu = {0};
	struct q2_bitmaps *b;
	uint64_t pos = 0, table_bytes = 0;
	int ret;

	if (h->version < 3 || !h->has_bitmaps || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->dir_off = h->bitmap_directory_offset;
	b->dir_size = h->bitmap_directory_size;
	b->ext_data_off = find_ext(hbuf, hlen, h->header_length);
	b->bm = calloc(h->nb_bitmaps, sizeof(*b->bm));
	b->dir = malloc(b->dir_size);
	ret = -ENOMEM;
	if (!b->bm || !b->dir)
		goto fail;
	if (!b->ext_data_off) {
		ret = qcow2_seterr(err, errlen, -EINVAL, "%s: bitmaps header extension not found",
				   q->path);
		goto fail;
	}
	ret = io_file_pread_sync(q->file, b->dir, b->dir_size, b->dir_off);
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: reading the bitmap directory: %s", q->path,
			     strerror(-ret));
		goto fail;
	}
	ret = push_range(&clu, b->dir_off, b->dir_size, q->cb);
	for (uint32_t i = 0; ret == 0 && i < h->nb_bitmaps; i++) {
		struct q2_bm *bm = &b->bm[i];
		uint64_t len = 0;

		ret = parse_entry(q, b, i, pos, bm, &len, err, errlen);
		if (ret < 0)
			break;
		b->n = i + 1;
		pos += len;
		table_bytes += (uint64_t)bm->table_size * 8;
		if (table_bytes > BM_MAX_TABLES) {
			ret = qcow2_seterr(err, errlen, -EINVAL,
					   "%s: bitmap tables larger than %u MiB in total", q->path,
					   BM_MAX_TABLES >> 20);
			break;
		}
		/* (a disk smaller than one sector has nothing to track) */
		bm->tracked = (bm->flags & (BM_FLAG_AUTO | BM_FLAG_IN_USE)) == BM_FLAG_AUTO &&
			      bm->nchunks > 0 && !q->read_only;
		/* read-only: listed as QEMU lists them (an "auto" one as recording), never
		 * tracked (counted from the file), never written */
		bm->recording =
		    q->read_only && (bm->flags & (BM_FLAG_AUTO | BM_FLAG_IN_USE)) == BM_FLAG_AUTO;
		ret = load_table(q, bm, &clu, err, errlen);
		if (ret == 0 && bm->tracked) {
			ret = load_bits(q, bm, err, errlen);
			bm->recording = true;
			b->ntracked++;
			b->nrecording++;
		}
	}
	if (ret == 0 && pos != b->dir_size)
		ret = qcow2_seterr(
		    err, errlen, -EINVAL,
		    "%s: bitmap directory size %llu does not match its %u entries (%llu "
		    "bytes)",
		    q->path, (unsigned long long)b->dir_size, h->nb_bitmaps,
		    (unsigned long long)pos);
	if (ret == 0)
		ret = merge_meta(q, &clu, err, errlen);
	if (ret < 0)
		goto fail;
	free(clu.v);
	q->bms = b;
	Q2_LOG(q, INFO,
	       "%u persistent dirty bitmap(s), %u enabled and tracked (the others are left as they "
	       "are)",
	       b->n, b->ntracked);
	return 0;

fail:
	if (ret == -ENOMEM && err && !err[0])
		qcow2_seterr(err, errlen, ret, "%s: out of memory loading the bitmaps", q->path);
	free(clu.v);
	bm_free(b);
	if (q->read_only) { /* a read-only open still works, without listing them */
		Q2_LOG(q, WARN, "persistent dirty bitmaps not listed: %s",
		       err && err[0] ? err : strerror(-ret));
		if (err && errlen)
			err[0] = '\0';
		return 0;
	}
	return ret;
}

static int write_autoclear(struct qcow2 *q, uint64_t v)
{
	uint8_t buf[8];
	int ret;

	qcow2_put_be64(buf, v);
	ret = io_file_pwrite_sync(q->file, buf, 8, QCOW2_OFF_AUTOCLEAR);
	if (ret == 0)
		ret = io_file_sync(q->file);
	return ret;
}

int q2_bitmap_start(struct qcow2 *q, char *err, size_t errlen)
{
	struct q2_bitmaps *b = q->bms;
	uint64_t ac = q->h.autoclear_features;
	int ret;

	if (!b || !b->ntracked)
		return 0;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (bm->tracked)
			qcow2_put_be32(b->dir + bm->pos + offsetof(struct bm_dir_disk, flags),
				       bm->flags | BM_FLAG_IN_USE);
	}
	ret = write_autoclear(q, ac & ~QCOW2_AUTOCLEAR_BITMAPS);
	if (ret == 0) {
		ret = io_file_pwrite_sync(q->file, b->dir, b->dir_size, b->dir_off);
		if (ret == 0)
			ret = io_file_sync(q->file);
		if (ret == 0)
			ret = write_autoclear(q, ac);
	}
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "%s: marking the dirty bitmaps in use: %s",
				    q->path, strerror(-ret));
	return 0;
}

/* ---- marking ---- */

static void set_bits(uint8_t *c, uint64_t first, uint64_t last)
{
	while (first <= last && first % 8) {
		c[first / 8] |= (uint8_t)(1u << (first % 8));
		first++;
	}
	if (first + 8 <= last + 1) {
		uint64_t n = (last + 1 - first) / 8;

		memset(c + first / 8, 0xff, (size_t)n);
		first += n * 8;
	}
	while (first <= last) {
		c[first / 8] |= (uint8_t)(1u << (first % 8));
		first++;
	}
}

/* Set the bits of @bm covering guest bytes [off, off + len). -ENOMEM: not all of them. */
static int bm_set_range(const struct qcow2 *q, struct q2_bm *bm, uint64_t off, uint64_t len)
{
	uint64_t bits_per = q->cs * 8, first, last;

	if (!len)
		return 0;
	first = off >> bm->gbits;
	last = (off + len - 1) >> bm->gbits;
	if (first >= bm->nbits)
		return 0;
	if (last >= bm->nbits)
		last = bm->nbits - 1;
	while (first <= last) {
		uint32_t k = (uint32_t)(first / bits_per);
		uint64_t base = (uint64_t)k * bits_per;
		uint64_t end = last < base + bits_per - 1 ? last : base + bits_per - 1;

		if (!bm->chunks[k]) {
			bm->chunks[k] = calloc(1, q->cs);
			if (!bm->chunks[k])
				return -ENOMEM;
		}
		set_bits(bm->chunks[k], first - base, end - base);
		first = end + 1;
	}
	return 0;
}

void qcow2_bitmap_mark(struct qcow2 *q, uint64_t off, uint64_t len)
{
	struct q2_bitmaps *b = q->bms;

	if (!b || !b->nrecording || !len)
		return;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->recording || bm->lost || !bm->tracked || bm->frozen)
			continue;
		if (bm_set_range(q, bm, off, len) < 0) {
			bm->lost = true;
			Q2_LOG(q, ERROR,
			       "out of memory: bitmap '%s' cannot record writes; it stays marked "
			       "in use (inconsistent)",
			       bm->name);
		}
	}
}

/* ---- store at close ---- */

struct sync_wait {
	struct qcow2_waiter w;
	struct qcow2_flush f;
	bool done;
	int err;
};

static void sync_wake(struct qcow2_waiter *w)
{
	struct sync_wait *s = w->priv;

	s->done = true;
	s->err = w->err;
}

static void sync_flush_done(struct qcow2_flush *f, int res)
{
	struct sync_wait *s = f->priv;

	s->done = true;
	s->err = res;
}

static int run_until(struct qcow2 *q, struct sync_wait *s)
{
	while (!s->done) {
		int ret = io_loop_run_once(q->loop, true);

		if (ret < 0)
			return ret;
	}
	return s->err;
}

/* qcow2_flush and wait for it (outside any loop callback). */
static int flush_sync(struct qcow2 *q)
{
	struct sync_wait s = {0};

	s.f.done = sync_flush_done;
	s.f.priv = &s;
	qcow2_flush(q, &s.f);
	return run_until(q, &s);
}

/* New clusters reserved by the store (released again if it fails). */
struct newc {
	uint64_t host;
	uint32_t n;
};

struct store {
	struct newc *v;
	size_t n, cap;
};

static int store_note(struct store *st, uint64_t host, uint32_t n)
{
	if (st->n == st->cap) {
		size_t cap = st->cap ? st->cap * 2 : 16;
		struct newc *v = realloc(st->v, cap * sizeof(*v));

		if (!v)
			return -ENOMEM;
		st->v = v;
		st->cap = cap;
	}
	st->v[st->n].host = host;
	st->v[st->n].n = n;
	st->n++;
	return 0;
}

/* Reserve @n contiguous metadata clusters (synchronously, driving the loop). */
static int alloc_contig(struct qcow2 *q, struct store *st, uint32_t n, uint64_t *host)
{
	uint64_t start = 0;
	uint32_t have = 0;
	int ret;

	if (!n)
		return -EINVAL;
	while (have < n) {
		struct sync_wait s = {.w = {.wake = sync_wake}};
		uint64_t h;
		bool fresh;

		s.w.priv = &s;
		ret = q2_alloc_clusters(q, n - have, true, &h, &fresh, &s.w);
		if (ret == -EAGAIN) {
			ret = run_until(q, &s);
			if (ret < 0)
				goto fail;
			continue;
		}
		if (ret < 0)
			goto fail;
		if (have && h != start + ((uint64_t)have << q->cb)) {
			/* not adjacent: give back what we have and start over from here */
			q2_alloc_release(q, start, have);
			have = 0;
		}
		if (!have)
			start = h;
		have += (uint32_t)ret;
	}
	ret = store_note(st, start, n);
	if (ret < 0)
		goto fail;
	*host = start;
	return 0;
fail:
	if (have)
		q2_alloc_release(q, start, have);
	return ret;
}

static bool all_zero(const uint8_t *c, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (c[i])
			return false;
	return true;
}

/* Write @len bytes of @data at @host, zero-padded to whole clusters. */
static int write_padded(struct qcow2 *q, const void *data, size_t len, uint64_t host)
{
	size_t full = (size_t)div_up(len, q->cs) << q->cb;
	uint8_t *buf;
	int ret;

	buf = io_alloc_aligned(full);
	if (!buf)
		return -ENOMEM;
	memset(buf + len, 0, full - len);
	memcpy(buf, data, len);
	ret = io_file_pwrite_sync(q->file, buf, full, host);
	io_free_aligned(buf);
	return ret;
}

/* Steps 1 and 2 for one bitmap: data clusters and the new table; entry updated in @dir. */
static int store_one(struct qcow2 *q, struct store *st, struct q2_bm *bm, uint8_t *dir)
{
	uint64_t *tab, thost;
	int ret = 0;

	tab = calloc(bm->nchunks, 8);
	if (!tab)
		return -ENOMEM;
	for (uint32_t k = 0; k < bm->nchunks; k++) {
		uint64_t host;

		if (!bm->chunks[k] || all_zero(bm->chunks[k], q->cs))
			continue;
		ret = alloc_contig(q, st, 1, &host);
		if (ret == 0)
			ret = io_file_pwrite_sync(q->file, bm->chunks[k], q->cs, host);
		if (ret < 0)
			goto out;
		qcow2_put_be64(&tab[k], host);
	}
	ret = alloc_contig(q, st, (uint32_t)div_up((uint64_t)bm->nchunks * 8, q->cs), &thost);
	if (ret == 0)
		ret = write_padded(q, tab, (size_t)bm->nchunks * 8, thost);
	if (ret < 0)
		goto out;
	qcow2_put_be64(dir + bm->pos + offsetof(struct bm_dir_disk, table_offset), thost);
	qcow2_put_be32(dir + bm->pos + offsetof(struct bm_dir_disk, table_size), bm->nchunks);
	qcow2_put_be32(dir + bm->pos + offsetof(struct bm_dir_disk, flags),
		       bm->flags & ~BM_FLAG_IN_USE);
	free(bm->ntable);
	bm->ntable = tab; /* (kept by q2_bitmap_store for a frozen engine) */
	bm->ntable_off = thost;
	tab = NULL;
out:
	free(tab);
	return ret;
}

int q2_bitmap_store(struct qcow2 *q)
{
	struct q2_bitmaps *b = q->bms;
	struct store st = {0};
	uint8_t *dir = NULL, ext_off[8];
	uint64_t dhost;
	uint32_t stored = 0;
	int ret = 0;

	if (!b || !b->ntracked || q->read_only)
		return 0;
	if (q->corrupt) {
		Q2_LOG(q, ERROR, "image is corrupt: dirty bitmaps not stored (they stay in use)");
		return 0;
	}
	dir = malloc(b->dir_size);
	if (!dir) {
		ret = -ENOMEM;
		goto fail;
	}
	memcpy(dir, b->dir, b->dir_size);
	/* 1. data, tables, directory in new clusters */
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->tracked || bm->lost)
			continue;
		ret = store_one(q, &st, bm, dir);
		if (ret < 0)
			goto fail;
		stored++;
	}
	if (!stored)
		goto out;
	ret = alloc_contig(q, &st, (uint32_t)div_up(b->dir_size, q->cs), &dhost);
	if (ret == 0)
		ret = write_padded(q, dir, b->dir_size, dhost);
	if (ret < 0)
		goto fail;
	/* 2. refcounts (and the writes above) durable */
	ret = flush_sync(q);
	if (ret < 0)
		goto fail;
	/* 3. switch the directory: one aligned 8-byte write */
	qcow2_put_be64(ext_off, dhost);
	ret = io_file_pwrite_sync(q->file, ext_off, 8,
				  b->ext_data_off +
				      offsetof(struct qcow2_bitmaps_ext, bitmap_directory_offset));
	if (ret == 0)
		ret = io_file_sync(q->file);
	if (ret < 0) {
		/* unknown whether it landed: keep old and new clusters (a leak at worst) */
		Q2_LOG(q, ERROR, "storing the dirty bitmaps failed (header update: %s)",
		       strerror(-ret));
		goto out;
	}
	/* 4. release what the old directory referenced */
	q2_dec_range(q, b->dir_off, b->dir_size);
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->tracked || bm->lost)
			continue;
		for (uint32_t k = 0; k < bm->table_size; k++) {
			uint64_t off = bm->table[k] & BM_TE_OFFSET_MASK;

			if (off)
				q2_dec_range(q, off, q->cs);
		}
		q2_dec_range(q, bm->table_off, (uint64_t)bm->table_size * 8);
		/* the engine may go on (qcow2_bitmap_freeze): the new table is the truth */
		for (uint32_t k = 0; k < bm->nchunks; k++)
			bm->ntable[k] = qcow2_be64(&bm->ntable[k]);
		free(bm->table);
		bm->table = bm->ntable;
		bm->ntable = NULL;
		bm->table_off = bm->ntable_off;
		bm->table_size = bm->nchunks;
	}
	for (size_t i = 0; i < st.n; i++)
		for (uint32_t k = 0; k < st.v[i].n; k++)
			q2_meta_add(q, (st.v[i].host >> q->cb) + k); /* (ENOMEM: less checking) */
	b->dir_off = dhost;
	for (uint32_t i = 0; i < b->n; i++) /* the directory as now on disk */
		if (b->bm[i].tracked && !b->bm[i].lost)
			qcow2_put_be32(dir + b->bm[i].pos + offsetof(struct bm_dir_disk, flags),
				       b->bm[i].flags & ~BM_FLAG_IN_USE);
	free(b->dir);
	b->dir = dir;
	dir = NULL;
	goto out;

fail:
	Q2_LOG(q, ERROR,
	       "storing the dirty bitmaps failed (%s): they stay marked in use (inconsistent)",
	       strerror(-ret));
	for (size_t i = 0; i < st.n; i++)
		q2_alloc_release(q, st.v[i].host, st.v[i].n);
	st.n = 0;
out:
	free(st.v);
	free(dir);
	return ret;
}

static struct q2_bm *bm_by_name(const struct qcow2 *q, const char *name);

/*
 * The node becomes a read-only backing file (blockdev-snapshot-sync) while
 * it tracks bitmaps: they are stored now, as at close (QEMU stores them when
 * it reopens the node read-only), and stay listed with their bits, read-only
 * (qcow2_bitmap_set refuses them). The store left the new tables and
 * directory in memory, so qcow2_set_read_only(false) can thaw them
 * (q2_bitmap_thaw). Synchronous: drives the loop, outside its callbacks.
 */
int qcow2_bitmap_freeze(struct qcow2 *q)
{
	struct q2_bitmaps *b = q->bms;
	int ret;

	if (!b || !b->ntracked)
		return 0;
	if (q->read_only)
		return -EROFS;
	for (uint32_t i = 0; i < b->n; i++)
		if (b->bm[i].tracked && b->bm[i].lost)
			return -ENOMEM; /* it could not be stored: leave it in use */
	ret = q2_bitmap_store(q);
	if (ret == 0) /* the old clusters' decrements written back too */
		ret = flush_sync(q);
	if (ret < 0)
		return ret;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (bm->tracked && !bm->frozen) {
			bm->frozen = true;
			b->nfrozen++;
		}
	}
	b->ntracked = 0;
	b->nrecording = 0; /* (listed as recording still: QEMU's "enabled") */
	Q2_LOG(q, INFO, "%u persistent dirty bitmap(s) stored: read-only from now on", b->nfrozen);
	return 0;
}

int qcow2_bitmap_ro_enable(struct qcow2 *q, const char *name, bool enable)
{
	struct q2_bm *bm = bm_by_name(q, name);

	if (!bm)
		return -ENOENT;
	if (!q->read_only || (bm->tracked && !bm->frozen))
		return -EBUSY;
	bm->recording = enable; /* (nothing is written: no bit changes) */
	return 0;
}

/*
 * The frozen bitmaps' node becomes a writer again (block-commit into it):
 * QEMU marks them in use in the file and records the writes; so do we,
 * with q2_bitmap_start's order. Their tables, directory and bits in
 * memory are the ones the freeze stored.
 */
int q2_bitmap_thaw(struct qcow2 *q)
{
	struct q2_bitmaps *b = q->bms;
	int ret;

	if (!b || !b->nfrozen)
		return 0;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->frozen)
			continue;
		bm->frozen = false;
		b->ntracked++;
		if (bm->recording)
			b->nrecording++;
	}
	b->nfrozen = 0;
	ret = q2_bitmap_start(q, NULL, 0);
	if (ret < 0) {
		/* unknown what landed: stay tracked (stored at close, or in use) */
		Q2_LOG(q, ERROR, "marking the dirty bitmaps in use failed: %s", strerror(-ret));
		return ret;
	}
	Q2_LOG(q, INFO, "%u persistent dirty bitmap(s) in use again, recording (writable)",
	       b->ntracked);
	return 0;
}

bool q2_bitmap_frozen(const struct qcow2 *q)
{
	return q->bms && q->bms->nfrozen;
}

/* ---- listing ---- */

int qcow2_bitmaps(const struct qcow2 *q, struct qcow2_bitmap_info *out, unsigned max)
{
	const struct q2_bitmaps *b = q->bms;
	unsigned n = 0;

	if (!b)
		return 0;
	/* QEMU lists the last one of the directory first */
	for (uint32_t i = b->n; i-- > 0; n++) {
		const struct q2_bm *bm = &b->bm[i];
		const uint8_t *e = b->dir + bm->pos;
		struct qcow2_bitmap_info *o = &out[n];
		uint32_t extra, name_size;
		uint64_t ones = 0;

		if (n >= max)
			continue;
		extra = qcow2_be32(e + offsetof(struct bm_dir_disk, extra_data_size));
		name_size = qcow2_be16(e + offsetof(struct bm_dir_disk, name_size));
		if (name_size >= sizeof(o->name))
			name_size = sizeof(o->name) - 1;
		memcpy(o->name, e + BM_DIR_ENTRY_LEN + extra, name_size);
		o->name[name_size] = '\0';
		o->granularity = 1ull << bm->gbits;
		o->recording = bm->recording;
		o->inconsistent = !bm->tracked && (bm->flags & BM_FLAG_IN_USE);
		if (bm->tracked) {
			for (uint32_t k = 0; k < bm->nchunks; k++)
				if (bm->chunks[k])
					ones += popcount(bm->chunks[k], q->cs);
		} else {
			ones = bm->ones;
		}
		/* dirty bytes: set bits times the granularity, as QEMU counts */
		o->count = ones << bm->gbits;
	}
	return (int)n;
}

bool q2_bitmap_tracking(const struct qcow2 *q)
{
	return q->bms && q->bms->ntracked;
}

/* The bitmap named @name (full name, from the directory), or NULL. */
static struct q2_bm *bm_by_name(const struct qcow2 *q, const char *name)
{
	const struct q2_bitmaps *b = q->bms;
	size_t nl = strlen(name);

	for (uint32_t i = 0; b && i < b->n; i++) {
		const uint8_t *e = b->dir + b->bm[i].pos;

		if (qcow2_be16(e + offsetof(struct bm_dir_disk, name_size)) == nl &&
		    !memcmp(e + BM_DIR_ENTRY_LEN, name, nl))
			return &b->bm[i];
	}
	return NULL;
}

/* Report the runs of set bits of one chunk (index @k) through @fn; *@run_start carries a run. */
static int chunk_runs(const struct qcow2 *q, const struct q2_bm *bm, uint32_t k, const uint8_t *c,
		      bool last, uint64_t *run_start, bool *in,
		      int (*fn)(void *, uint64_t, uint64_t), void *opaque)
{
	uint64_t bits_per = q->cs * 8, base = (uint64_t)k * bits_per;

	for (uint64_t i = 0; i < bits_per && base + i < bm->nbits; i++) {
		bool set = c && ((c[i / 8] >> (i % 8)) & 1);

		if (set && !*in) {
			*run_start = base + i;
			*in = true;
		} else if (!set && *in) {
			int r = fn(opaque, *run_start << bm->gbits,
				   (base + i - *run_start) << bm->gbits);

			*in = false;
			if (r < 0)
				return r;
		}
	}
	if (last && *in) {
		*in = false;
		return fn(opaque, *run_start << bm->gbits, (bm->nbits - *run_start) << bm->gbits);
	}
	return 0;
}

int qcow2_bitmap_ranges(struct qcow2 *q, const char *name,
			int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque)
{
	struct q2_bm *bm = bm_by_name(q, name);
	struct qcow2_io fio = q2_file_io(q->file);
	uint64_t *t = NULL, run = 0;
	uint8_t *c = NULL;
	bool in = false;
	int ret = 0;

	if (!bm)
		return -ENOENT;
	if (!bm->tracked && (bm->flags & BM_FLAG_IN_USE))
		return -EUCLEAN;
	if (bm->tracked) {
		for (uint32_t k = 0; ret == 0 && k < bm->nchunks; k++)
			ret = chunk_runs(q, bm, k, bm->chunks[k], k + 1 == bm->nchunks, &run, &in,
					 fn, opaque);
		return ret;
	}
	ret = qcow2_read_table(&fio, bm->table_off, bm->table_size, &t);
	if (ret < 0)
		return ret;
	c = malloc(q->cs);
	if (!c) {
		free(t);
		return -ENOMEM;
	}
	for (uint32_t k = 0; ret == 0 && k < bm->nchunks; k++) {
		uint64_t e = t[k], off = e & BM_TE_OFFSET_MASK;
		const uint8_t *p = NULL;

		if (off) {
			ret = io_file_pread_sync(q->file, c, q->cs, off);
			p = c;
		} else if (e & BM_TE_ALL_ONES) {
			memset(c, 0xff, q->cs);
			p = c;
		}
		if (ret == 0)
			ret = chunk_runs(q, bm, k, p, k + 1 == bm->nchunks, &run, &in, fn, opaque);
	}
	free(c);
	free(t);
	return ret;
}

int qcow2_bitmap_set(struct qcow2 *q, const char *name, uint64_t off, uint64_t len)
{
	struct q2_bm *bm = bm_by_name(q, name);

	if (!bm)
		return -ENOENT;
	if (!bm->tracked || bm->lost || bm->frozen)
		return -EBUSY;
	return bm_set_range(q, bm, off, len);
}

bool qcow2_has_enabled_bitmaps(const struct qcow2 *q)
{
	return q->bms && q->bms->nrecording;
}

/*
 * ---- growing the disk (qcow2_grow) ----
 *
 * A bitmap table must cover the disk exactly (QEMU refuses to load one
 * that does not) unless the bitmap is in_use. So before the size changes
 * every consistent bitmap is held in memory and in_use on disk: the
 * enabled ones already are; a disabled one is loaded now (its table and
 * bits read, then marked in_use with q2_bitmap_start's autoclear order,
 * synchronously: the caller runs where blocking is allowed). Its bits then
 * grow with the disk (the new part clean, as QEMU's) and it is stored at
 * close with a table for the new size, its flags (auto clear) kept. A crash
 * before the store leaves it in_use, i.e. inconsistent, as QEMU leaves every
 * bitmap of an image it had open: never a wrong one. An inconsistent bitmap
 * refuses the resize, as in QEMU.
 */
static int load_one(struct qcow2 *q, struct q2_bm *bm, char *err, size_t errlen)
{
	struct q2_bitmaps *b = q->bms;
	struct qcow2_io fio = q2_file_io(q->file);
	uint64_t ac = q->h.autoclear_features;
	int ret;

	ret = qcow2_read_table(&fio, bm->table_off, bm->table_size, &bm->table);
	if (ret == 0)
		ret = load_bits(q, bm, err, errlen);
	if (ret < 0)
		goto fail;
	qcow2_put_be32(b->dir + bm->pos + offsetof(struct bm_dir_disk, flags),
		       bm->flags | BM_FLAG_IN_USE);
	ret = write_autoclear(q, ac & ~QCOW2_AUTOCLEAR_BITMAPS);
	if (ret == 0)
		ret = io_file_pwrite_sync(q->file, b->dir, b->dir_size, b->dir_off);
	if (ret == 0)
		ret = io_file_sync(q->file);
	if (ret == 0)
		ret = write_autoclear(q, ac);
	if (ret < 0) {
		/* unknown what landed: the directory may say in_use; keep it in memory, tracked */
		qcow2_seterr(err, errlen, ret, "%s: marking bitmap '%s' in use: %s", q->path,
			     bm->name, strerror(-ret));
		bm->tracked = true;
		b->ntracked++;
		return ret;
	}
	bm->tracked = true;
	b->ntracked++;
	return 0;
fail:
	qcow2_put_be32(b->dir + bm->pos + offsetof(struct bm_dir_disk, flags), bm->flags);
	if (bm->chunks)
		for (uint32_t k = 0; k < bm->nchunks; k++)
			free(bm->chunks[k]);
	free(bm->chunks);
	bm->chunks = NULL;
	free(bm->table);
	bm->table = NULL;
	if (!err || !err[0])
		qcow2_seterr(err, errlen, ret, "%s: loading bitmap '%s': %s", q->path, bm->name,
			     strerror(-ret));
	return ret;
}

int q2_bitmap_grow_check(struct qcow2 *q, uint64_t size, char *err, size_t errlen)
{
	struct q2_bitmaps *b = q->bms;

	for (uint32_t i = 0; b && i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];
		uint64_t nbits = div_up(size & ~511ull, 1ull << bm->gbits);

		if (!bm->tracked && (bm->flags & BM_FLAG_IN_USE))
			return qcow2_seterr(err, errlen, -EBUSY,
					    "Bitmap '%s' is inconsistent and cannot be used",
					    bm->name);
		if (div_up(div_up(nbits, 8), q->cs) * q->cs > BM_MAX_PHYS)
			return qcow2_seterr(err, errlen, -EFBIG,
					    "%s: bitmap '%s' would need more than %u MiB at %llu "
					    "bytes of granularity",
					    q->path, bm->name, BM_MAX_PHYS >> 20,
					    (unsigned long long)(1ull << bm->gbits));
	}
	return 0;
}

bool qcow2_grow_blocks(const struct qcow2 *q)
{
	return q2_bitmap_need_load(q);
}

bool q2_bitmap_need_load(const struct qcow2 *q)
{
	const struct q2_bitmaps *b = q->bms;

	for (uint32_t i = 0; b && i < b->n; i++)
		if (!b->bm[i].tracked && !(b->bm[i].flags & BM_FLAG_IN_USE) && b->bm[i].nchunks)
			return true;
	return false;
}

int q2_bitmap_grow(struct qcow2 *q, uint64_t size, char *err, size_t errlen)
{
	struct q2_bitmaps *b = q->bms;
	uint8_t ***nc;
	int ret;

	if (!b)
		return 0;
	ret = q2_bitmap_grow_check(q, size, err, errlen);
	for (uint32_t i = 0; ret == 0 && i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->tracked && !(bm->flags & BM_FLAG_IN_USE) && bm->nchunks)
			ret = load_one(q, bm, err, errlen);
	}
	if (ret < 0)
		return ret;
	/* the new chunk arrays first, so that nothing changes on failure */
	nc = calloc(b->n, sizeof(*nc));
	if (!nc)
		return -ENOMEM;
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];
		uint64_t nbits = div_up(size & ~511ull, 1ull << bm->gbits);
		uint64_t need = div_up(div_up(nbits, 8), q->cs);

		if (!bm->tracked || need <= bm->nchunks)
			continue;
		nc[i] = calloc(need, sizeof(**nc));
		if (!nc[i]) {
			while (i--)
				free(nc[i]);
			free(nc);
			return qcow2_seterr(err, errlen, -ENOMEM, "%s: out of memory", q->path);
		}
	}
	for (uint32_t i = 0; i < b->n; i++) {
		struct q2_bm *bm = &b->bm[i];

		if (!bm->tracked)
			continue;
		bm->nbits = div_up(size & ~511ull, 1ull << bm->gbits);
		if (nc[i]) {
			if (bm->nchunks)
				memcpy(nc[i], bm->chunks, bm->nchunks * sizeof(**nc));
			free(bm->chunks);
			bm->chunks = nc[i];
			bm->nchunks = (uint32_t)div_up(div_up(bm->nbits, 8), q->cs);
		}
	}
	free(nc);
	return 0;
}
