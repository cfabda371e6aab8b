/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/map.c — vqcow-img map: the allocation status of every guest range
 * through the backing chain, with qemu-img map's semantics:
 *
 *  - Each layer answers for a range: DATA (read from a host file), ZERO
 *    (reads as zeroes), OFFSET_VALID (a host offset is known), ALLOCATED
 *    (the layer itself decides the content). qcow2 clusters map as
 *      normal            DATA | OFFSET_VALID
 *      zero + host       ZERO | OFFSET_VALID
 *      zero              ZERO
 *      unallocated subcluster of an allocated cluster   OFFSET_VALID
 *      unallocated       nothing (the backing file decides)
 *      compressed        DATA
 *    A raw layer is always allocated: holes of the file are ZERO, the rest
 *    DATA, at host offset = guest offset.
 *  - An unallocated range of a qcow2 layer reads as zeroes (ZERO, but not
 *    ALLOCATED) when there is no backing file, or when the backing file ends
 *    before the range starts; otherwise the backing layer is asked, one
 *    depth further.
 *  - Like QEMU, when a qcow2 image looks metadata-preallocated (many more
 *    clusters in use than the file has blocks), data ranges are refined by
 *    the host file's holes (SEEK_DATA/SEEK_HOLE): holes read as zeroes.
 *  - Neighbouring ranges merge when depth, flags and the continuity of host
 *    offsets agree.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "compress.h"
#include "qcow2tool.h"

enum {
	ST_DATA = 1u << 0,
	ST_ZERO = 1u << 1,
	ST_OFFSET = 1u << 2,
	ST_ALLOC = 1u << 3,
	ST_RECURSE = 1u << 4,
	ST_EOF = 1u << 5,
};

struct layer {
	char *path;
	bool qcow2;
	int fd; /* the image file */
	uint64_t file_size;
	uint64_t size;        /* virtual size */
	struct qcow2_oimg im; /* qcow2 only */
	bool im_open;
	int data_fd; /* where guest data lives: external data file or fd */
	uint64_t data_size;
	uint8_t *l2;
	uint64_t l2_off; /* cached table, 0 = none */
	int prealloc;    /* -1 not yet known, 0/1 */
	struct layer *backing;
};

struct status {
	unsigned flags;
	uint64_t pnum;
	uint64_t map;
	const struct layer *file; /* the layer whose file holds the data */
	uint64_t l2e;             /* a compressed cluster's L2 entry (DATA without OFFSET) */
};

static void layer_free(struct layer *L)
{
	while (L) {
		struct layer *b = L->backing;

		if (L->im_open)
			qcow2_oimg_close(&L->im);
		if (L->data_fd >= 0 && L->data_fd != L->fd)
			close(L->data_fd);
		if (L->fd >= 0)
			close(L->fd);
		free(L->l2);
		free(L->path);
		free(L);
		L = b;
	}
}

static int layer_open(struct layer **out, const char *path, const char *fmt, unsigned depth,
		      char *err, size_t errlen)
{
	struct layer *L;
	int ret, q;

	*out = NULL;
	if (depth > QCOW2_MAX_CHAIN_DEPTH) /* @depth: backing files above this one */
		return qcow2_seterr(err, errlen, -ELOOP,
				    "backing chain deeper than %u backing files (a loop?)",
				    QCOW2_MAX_CHAIN_DEPTH);
	L = calloc(1, sizeof(*L));
	if (!L)
		return -ENOMEM;
	L->fd = L->data_fd = -1;
	L->prealloc = -1;
	L->path = strdup(path);
	if (!L->path) {
		ret = -ENOMEM;
		goto fail;
	}
	L->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (L->fd < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "could not open '%s': %s", path, strerror(-ret));
		goto fail;
	}
	ret = qcow2_fd_size(L->fd, &L->file_size, NULL);
	if (ret < 0)
		goto fail;
	q = qcow2_probe(L->fd);
	if (q < 0) {
		ret = q;
		goto fail;
	}
	if (fmt && !strcmp(fmt, "raw"))
		q = 0;
	else if (fmt && strcmp(fmt, "qcow2")) {
		qcow2_seterr(err, errlen, 0, "'%s': unsupported format '%s'", path, fmt);
		ret = -ENOTSUP;
		goto fail;
	} else if (fmt && !q) {
		qcow2_seterr(err, errlen, 0, "'%s' is not a qcow2 image (bad magic)", path);
		ret = -EINVAL;
		goto fail;
	}
	L->qcow2 = q;
	L->data_fd = L->fd;
	L->data_size = L->file_size;
	if (!q) {
		/* QEMU's file driver rounds a raw file up to whole sectors */
		L->size = (L->file_size + 511) & ~511ull;
		*out = L;
		return 0;
	}
	{
		struct qcow2_io io = qcow2_fd_io(L->fd);
		char e2[256] = "";

		ret = qcow2_oimg_open(&L->im, &io, path, false, e2, sizeof(e2));
		L->im_open = true;
		if (ret < 0) {
			qcow2_seterr(err, errlen, 0, "'%s': %s", path, e2);
			goto fail;
		}
	}
	L->size = L->im.h.size & ~511ull; /* whole sectors, as QEMU counts them */
	L->l2 = malloc(L->im.h.cluster_size);
	if (!L->l2) {
		ret = -ENOMEM;
		goto fail;
	}
	if (L->im.h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		char *df = qcow2_path_relative(path, L->im.h.data_file);

		if (!df) {
			ret = -ENOMEM;
			goto fail;
		}
		L->data_fd = open(df, O_RDONLY | O_CLOEXEC);
		if (L->data_fd < 0 && L->im.h.data_file[0] != '/')
			/* QEMU opens a relative data file name from its working directory */
			L->data_fd = open(L->im.h.data_file, O_RDONLY | O_CLOEXEC);
		if (L->data_fd < 0) {
			ret = -errno;
			qcow2_seterr(err, errlen, 0, "could not open data file '%s': %s", df,
				     strerror(-ret));
			free(df);
			goto fail;
		}
		free(df);
		ret = qcow2_fd_size(L->data_fd, &L->data_size, NULL);
		if (ret < 0)
			goto fail;
	}
	if (L->im.h.backing_file[0]) {
		char *bp = qcow2_path_relative(path, L->im.h.backing_file);

		if (!bp) {
			ret = -ENOMEM;
			goto fail;
		}
		ret = layer_open(&L->backing, bp,
				 L->im.h.has_backing_fmt ? L->im.h.backing_fmt : NULL, depth + 1,
				 err, errlen);
		free(bp);
		if (ret < 0)
			goto fail;
	}
	*out = L;
	return 0;
fail:
	layer_free(L);
	return ret;
}

/* SEEK_DATA/SEEK_HOLE status of [off, off + len) in a host file (file-posix semantics). */
static void file_status(int fd, uint64_t fsz, uint64_t off, uint64_t len, struct status *st)
{
	off_t d, h;

	st->flags = 0;
	st->pnum = 0;
	st->map = off;
	if (off >= fsz) {
		st->flags = ST_EOF;
		return;
	}
	if (len > fsz - off)
		len = fsz - off;
	d = lseek(fd, (off_t)off, SEEK_DATA);
	if (d < 0) {
		if (errno == ENXIO) {
			st->flags = ST_ZERO; /* trailing hole */
			st->pnum = len;
		} else {
			st->flags = ST_DATA; /* no information: all data */
			st->pnum = len;
		}
	} else if ((uint64_t)d > off) {
		st->flags = ST_ZERO;
		st->pnum = (uint64_t)d - off < len ? (uint64_t)d - off : len;
	} else {
		h = lseek(fd, (off_t)off, SEEK_HOLE);
		st->flags = ST_DATA;
		if (h > (off_t)off)
			st->pnum = (uint64_t)h - off < len ? (uint64_t)h - off : len;
		else
			st->pnum = len;
	}
	st->flags |= ST_OFFSET | ST_ALLOC;
	if (off + st->pnum == fsz)
		st->flags |= ST_EOF;
}

/* QEMU's heuristic: far more clusters in use than the file has blocks allocated. */
static int detect_prealloc(struct layer *L)
{
	const struct qcow2_header_info *h = &L->im.h;
	struct stat st;
	uint64_t real, threshold, end, count = 0;
	uint64_t rb_entries = 1ull << h->refcount_block_bits;
	uint8_t *rb;

	if (fstat(L->fd, &st) < 0)
		return 0;
	real = (uint64_t)st.st_blocks * 512 / h->cluster_size;
	threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
	end = (L->file_size + h->cluster_size - 1) / h->cluster_size;
	rb = malloc(h->cluster_size);
	if (!rb)
		return 0;
	for (uint64_t i = 0; i < h->refcount_table_entries && count < threshold; i++) {
		uint64_t first = i * rb_entries, off = L->im.rt[i] & QCOW2_RTE_OFFSET_MASK;

		if (first >= end)
			break;
		if (!off)
			continue;
		if (off & (h->cluster_size - 1) ||
		    qcow2_pread_full(L->fd, rb, h->cluster_size, off) < 0) {
			count = 0; /* an error: QEMU then assumes no preallocation */
			break;
		}
		for (uint64_t j = 0; j < rb_entries && first + j < end && count < threshold; j++)
			count += qcow2_refcount_get(rb, j, h->refcount_order) != 0;
	}
	free(rb);
	return count >= threshold;
}

static enum qcow2_subcluster_type sc_type(const struct layer *L, uint64_t e, uint64_t bm,
					  unsigned sc)
{
	const struct qcow2_header_info *h = &L->im.h;

	return qcow2_subcluster_type(e, bm, sc, h->extended_l2,
				     (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) != 0);
}

static bool has_host(enum qcow2_subcluster_type t)
{
	return t == QCOW2_SCT_NORMAL || t == QCOW2_SCT_ZERO_ALLOC || t == QCOW2_SCT_UNALLOC_ALLOC;
}

/* Status of [off, off + len) in one qcow2 layer (off < size). */
static int qcow2_status(struct layer *L, uint64_t off, uint64_t len, struct status *st, char *err,
			size_t errlen)
{
	const struct qcow2_header_info *h = &L->im.h;
	uint64_t cs = h->cluster_size, l2_cover = (uint64_t)h->l2_entries << h->cluster_bits;
	uint64_t l1_idx = off / l2_cover, l2_start = l1_idx * l2_cover,
		 l2_end = l2_start + l2_cover;
	unsigned scbits = h->subcluster_bits;
	uint64_t l2_off, pos, host0 = 0;
	enum qcow2_subcluster_type t0;
	int ret;

	memset(st, 0, sizeof(*st));
	st->file = L;
	if (len > L->size - off)
		len = L->size - off;
	if (l2_end > off + len)
		l2_end = off + len;
	l2_off = l1_idx < h->l1_size ? L->im.l1[l1_idx] & QCOW2_L1E_OFFSET_MASK : 0;
	if (!l2_off) {
		st->pnum = l2_end - off;
		return 0;
	}
	if (l2_off & (cs - 1) || l2_off + cs > L->file_size) {
		qcow2_seterr(err, errlen, 0, "'%s': L2 table offset 0x%llx (L1 index %llu) is %s",
			     L->path, (unsigned long long)l2_off, (unsigned long long)l1_idx,
			     l2_off & (cs - 1) ? "not cluster aligned"
					       : "past the end of the file");
		return -EIO;
	}
	if (L->l2_off != l2_off) {
		ret = qcow2_pread_full(L->fd, L->l2, cs, l2_off);
		if (ret < 0) {
			qcow2_seterr(err, errlen, 0, "'%s': reading an L2 table: %s", L->path,
				     strerror(-ret));
			return ret;
		}
		L->l2_off = l2_off;
	}
	if (L->prealloc < 0)
		L->prealloc = detect_prealloc(L);

	/* the first (sub)cluster decides the type; extend while it stays the same */
	pos = off;
	t0 = QCOW2_SCT_INVALID;
	while (pos < l2_end) {
		uint64_t idx = (pos - l2_start) >> h->cluster_bits;
		const uint8_t *p = L->l2 + idx * h->l2_entry_size;
		uint64_t e = qcow2_be64(p), bm = h->extended_l2 ? qcow2_be64(p + 8) : 0;
		unsigned sc = (unsigned)((pos & (cs - 1)) >> scbits);
		uint64_t host = (e & QCOW2_L2E_OFFSET_MASK) + ((uint64_t)sc << scbits);
		uint64_t next = h->extended_l2 && !(e & QCOW2_OFLAG_COMPRESSED)
				    ? ((pos >> scbits) + 1) << scbits
				    : ((pos >> h->cluster_bits) + 1) << h->cluster_bits;
		enum qcow2_subcluster_type t = sc_type(L, e, bm, sc);

		if (t == QCOW2_SCT_INVALID) {
			if (pos == off) {
				qcow2_seterr(
				    err, errlen, 0,
				    "'%s': invalid L2 entry 0x%llx (subcluster bitmap 0x%llx) for "
				    "guest offset 0x%llx",
				    L->path, (unsigned long long)e, (unsigned long long)bm,
				    (unsigned long long)pos);
				return -EIO;
			}
			break;
		}
		if (t == QCOW2_SCT_NORMAL && (e & QCOW2_L2E_OFFSET_MASK & (cs - 1))) {
			if (pos == off) {
				qcow2_seterr(
				    err, errlen, 0,
				    "'%s': cluster offset 0x%llx is not cluster aligned (guest "
				    "offset 0x%llx)",
				    L->path, (unsigned long long)(e & QCOW2_L2E_OFFSET_MASK),
				    (unsigned long long)pos);
				return -EIO;
			}
			break;
		}
		if (pos == off) {
			t0 = t;
			host0 = host + (pos & ((1ull << scbits) - 1));
			if (t == QCOW2_SCT_COMPRESSED) {
				host0 = 0;
				st->l2e = e;
			}
		} else {
			if (t != t0)
				break;
			if (has_host(t) && host != host0 + (pos - off))
				break;
			if (t == QCOW2_SCT_COMPRESSED)
				break; /* each compressed cluster on its own */
		}
		pos = next < l2_end ? next : l2_end;
	}
	st->pnum = pos - off;
	switch (t0) {
	case QCOW2_SCT_NORMAL:
		st->flags = ST_DATA | ST_OFFSET;
		break;
	case QCOW2_SCT_ZERO_ALLOC:
		st->flags = ST_ZERO | ST_OFFSET;
		break;
	case QCOW2_SCT_UNALLOC_ALLOC:
		st->flags = ST_OFFSET;
		break;
	case QCOW2_SCT_ZERO_PLAIN:
		st->flags = ST_ZERO;
		break;
	case QCOW2_SCT_COMPRESSED:
		st->flags = ST_DATA;
		break;
	default:
		st->flags = 0;
		break;
	}
	if (st->flags & ST_OFFSET) {
		st->map = host0;
		if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
			st->map = host0;
	}
	if (L->prealloc == 1 && (st->flags & ST_DATA) && (st->flags & ST_OFFSET))
		st->flags |= ST_RECURSE;
	return 0;
}

/* One layer, with QEMU's generic rules on top of the format's answer. */
static int layer_status(struct layer *L, uint64_t off, uint64_t len, struct status *st, char *err,
			size_t errlen)
{
	int ret;

	if (!L->qcow2) {
		if (len > L->size - off)
			len = L->size - off;
		file_status(L->fd, L->file_size, off, len, st);
		if (off >= L->file_size) {
			/* the rest of a partial last sector reads as zeroes */
			st->flags = ST_ZERO | ST_OFFSET | ST_ALLOC | ST_EOF;
			st->pnum = len;
		}
		st->file = L;
		return 0;
	}
	ret = qcow2_status(L, off, len, st, err, errlen);
	if (ret < 0)
		return ret;
	if (st->flags & (ST_DATA | ST_ZERO)) {
		st->flags |= ST_ALLOC;
	} else if (!L->backing || off >= L->backing->size) {
		st->flags |= ST_ZERO;
	}
	if ((st->flags & ST_RECURSE) && (st->flags & ST_DATA) && !(st->flags & ST_ZERO) &&
	    (st->flags & ST_OFFSET)) {
		struct status fs;

		file_status(L->data_fd, L->data_size, st->map, st->pnum, &fs);
		if ((fs.flags & ST_EOF) && (!fs.pnum || (fs.flags & ST_ZERO))) {
			st->flags |= ST_ZERO;
		} else {
			st->pnum = fs.pnum;
			st->flags |= fs.flags & ST_ZERO;
		}
	}
	return 0;
}

static bool mergeable(const struct qcow2_map_entry *a, const struct qcow2_map_entry *b)
{
	if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
	    a->present != b->present || a->has_offset != b->has_offset)
		return false;
	if (a->has_offset && (a->offset + a->length != b->offset || a->filename != b->filename))
		return false;
	return true;
}

int qcow2_map(const char *path, const char *fmt, qcow2_map_fn *fn, void *opaque,
	      const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	struct layer *top;
	struct qcow2_map_entry cur;
	uint64_t off = 0;
	int ret;

	if (err && errlen)
		err[0] = 0;
	ret = layer_open(&top, path, fmt, 0, err, errlen);
	if (ret < 0)
		return ret;
	memset(&cur, 0, sizeof(cur));
	while (off < top->size) {
		struct qcow2_map_entry next;
		struct layer *L = top;
		struct status st;
		uint64_t bytes = top->size - off;
		unsigned depth = 0;

		for (;;) {
			ret = layer_status(L, off, bytes, &st, err, errlen);
			if (ret < 0)
				goto out;
			if (!st.pnum) {
				qcow2_seterr(err, errlen, 0,
					     "internal error: no progress at 0x%llx",
					     (unsigned long long)off);
				ret = -EIO;
				goto out;
			}
			bytes = st.pnum;
			if (st.flags & (ST_ZERO | ST_DATA))
				break;
			if (!L->backing) {
				st.flags = 0;
				break;
			}
			L = L->backing;
			depth++;
		}
		memset(&next, 0, sizeof(next));
		next.start = off;
		next.length = bytes;
		next.depth = depth;
		next.present = (st.flags & ST_ALLOC) != 0;
		next.zero = (st.flags & ST_ZERO) != 0;
		next.data = (st.flags & ST_DATA) != 0;
		next.has_offset = (st.flags & ST_OFFSET) != 0;
		next.offset = next.has_offset ? st.map : 0;
		next.filename = st.file ? st.file->path : L->path;
		if (cur.length && !mergeable(&cur, &next)) {
			ret = fn(opaque, &cur);
			if (ret)
				goto out;
			cur = next;
		} else if (!cur.length) {
			cur = next;
		} else {
			cur.length += next.length;
		}
		off += bytes;
		if (cb && cb->progress)
			cb->progress(cb->opaque, (double)off / (double)top->size);
	}
	ret = cur.length ? fn(opaque, &cur) : 0;
out:
	layer_free(top);
	return ret;
}

/* ---- reading guest data through the chain (vqcow-img convert) ---- */

struct qcow2_reader {
	struct layer *top;
	struct qcow2_zctx *z;
	uint8_t *cbuf; /* compressed bytes */
	size_t cbuf_len;
	uint8_t *dbuf; /* the last cluster decompressed */
	size_t dbuf_len;
	const struct layer *dlayer; /* ... from this layer */
	uint64_t dl2e;              /* ... and this L2 entry (0 = none) */
};

/* Read the snapshot @sel picks instead of the active state of @L (a qcow2 layer). */
static int layer_use_snapshot(struct layer *L, const struct qcow2_snap_sel *sel, char *err,
			      size_t errlen)
{
	const struct qcow2_header_info *h = &L->im.h;
	const struct qcow2_snapshot_info *sn = NULL;
	struct qcow2_io io = qcow2_fd_io(L->fd);
	uint64_t *l1;
	int ret;

	/* as qemu-img: an ID or name alone matches the ID first, then the name */
	for (int pass = 0; pass < 2 && !sn; pass++) {
		for (uint32_t i = 0; i < h->nb_snapshots && !sn; i++) {
			const struct qcow2_snapshot_info *c = &L->im.snaps[i];
			bool id_ok = !sel->id || (strlen(sel->id) == c->id_len &&
						  !memcmp(sel->id, c->id, c->id_len));
			bool name_ok = !sel->name || (strlen(sel->name) == c->name_len &&
						      !memcmp(sel->name, c->name, c->name_len));

			if (sel->id_or_name) {
				const char *want = pass ? c->name : c->id;
				size_t wlen = pass ? c->name_len : c->id_len;

				if (strlen(sel->id_or_name) == wlen &&
				    !memcmp(sel->id_or_name, want, wlen))
					sn = c;
			} else if (pass == 0 && id_ok && name_ok) {
				sn = c;
			}
		}
	}
	if (!sn)
		return qcow2_seterr(err, errlen, -ENOENT,
				    "'%s': Failed to load snapshot: Can't find snapshot", L->path);
	if (sn->l1_size > QCOW2_MAX_L1_ENTRIES || (sn->l1_table_offset & (h->cluster_size - 1)) ||
	    sn->l1_table_offset + (uint64_t)sn->l1_size * 8 > L->file_size)
		return qcow2_seterr(err, errlen, -EIO,
				    "'%s': the snapshot's L1 table (offset 0x%llx, %u entries) is "
				    "invalid",
				    L->path, (unsigned long long)sn->l1_table_offset, sn->l1_size);
	ret = qcow2_read_table(&io, sn->l1_table_offset, sn->l1_size, &l1);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "'%s': reading the snapshot's L1 table: %s",
				    L->path, strerror(-ret));
	free(L->im.l1);
	L->im.l1 = l1;
	L->im.h.l1_size = sn->l1_size;
	/* a version 2 snapshot records no size: QEMU takes the image's */
	if (sn->disk_size)
		L->size = sn->disk_size & ~511ull;
	return 0;
}

int qcow2_reader_open(struct qcow2_reader **out, const char *path, const char *fmt,
		      const struct qcow2_snap_sel *snap, char *err, size_t errlen)
{
	struct qcow2_reader *r;
	int ret;

	if (err && errlen)
		err[0] = 0;
	*out = NULL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	ret = layer_open(&r->top, path, fmt, 0, err, errlen);
	if (ret < 0) {
		free(r);
		return ret;
	}
	if (snap && !r->top->qcow2)
		ret =
		    qcow2_seterr(err, errlen, -ENOTSUP, "'%s': a raw image has no snapshots", path);
	else if (snap)
		ret = layer_use_snapshot(r->top, snap, err, errlen);
	if (ret < 0) {
		qcow2_reader_close(r);
		return ret;
	}
	*out = r;
	return 0;
}

void qcow2_reader_close(struct qcow2_reader *r)
{
	if (!r)
		return;
	layer_free(r->top);
	qcow2_zctx_free(r->z);
	free(r->cbuf);
	free(r->dbuf);
	free(r);
}

uint64_t qcow2_reader_size(const struct qcow2_reader *r)
{
	return r->top->size;
}

/* Walk down the chain for @off: the status and the layer that answered. */
static int chain_status(struct qcow2_reader *r, uint64_t off, uint64_t len, struct status *st,
			struct layer **which, char *err, size_t errlen)
{
	struct layer *L = r->top;
	int ret;

	if (len > r->top->size - off)
		len = r->top->size - off;
	for (;;) {
		ret = layer_status(L, off, len, st, err, errlen);
		if (ret < 0)
			return ret;
		if (!st->pnum)
			return qcow2_seterr(err, errlen, -EIO,
					    "'%s': internal error: no progress at 0x%llx", L->path,
					    (unsigned long long)off);
		len = st->pnum;
		if ((st->flags & (ST_ZERO | ST_DATA)) || !L->backing)
			break;
		L = L->backing;
	}
	*which = L;
	return 0;
}

int qcow2_reader_status(struct qcow2_reader *r, uint64_t off, uint64_t len, uint64_t *pnum,
			bool *zero, char *err, size_t errlen)
{
	struct layer *L;
	struct status st;
	int ret;

	if (off >= r->top->size || !len)
		return -EINVAL;
	ret = chain_status(r, off, len, &st, &L, err, errlen);
	if (ret < 0)
		return ret;
	*pnum = st.pnum;
	*zero = (st.flags & ST_ZERO) || !(st.flags & ST_DATA);
	return 0;
}

/* Decompress the cluster of @L whose L2 entry is @l2e into r->dbuf. */
static int read_compressed(struct qcow2_reader *r, const struct layer *L, uint64_t l2e, char *err,
			   size_t errlen)
{
	const struct qcow2_header_info *h = &L->im.h;
	uint64_t host = qcow2_compressed_offset(l2e, h->cluster_bits);
	uint64_t clen = qcow2_compressed_len(l2e, h->cluster_bits);
	int ret;

	if (r->dlayer == L && r->dl2e == l2e)
		return 0;
	if (!r->z && !(r->z = qcow2_zctx_new()))
		return -ENOMEM;
	if (r->cbuf_len < clen) {
		free(r->cbuf);
		r->cbuf_len = 0;
		if (!(r->cbuf = malloc(clen)))
			return -ENOMEM;
		r->cbuf_len = clen;
	}
	if (r->dbuf_len < h->cluster_size) {
		free(r->dbuf);
		r->dbuf_len = 0;
		if (!(r->dbuf = malloc(h->cluster_size)))
			return -ENOMEM;
		r->dbuf_len = h->cluster_size;
	}
	r->dlayer = NULL;
	if (host >= L->file_size)
		return qcow2_seterr(
		    err, errlen, -EIO,
		    "'%s': compressed cluster at 0x%llx is past the end of the file", L->path,
		    (unsigned long long)host);
	ret = qcow2_pread_full(L->fd, r->cbuf, clen, host);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "'%s': reading a compressed cluster: %s",
				    L->path, strerror(-ret));
	ret = qcow2_zinflate(r->z, h->compression_type, r->cbuf, clen, r->dbuf, h->cluster_size);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "'%s': compressed cluster at 0x%llx: %s",
				    L->path, (unsigned long long)host,
				    ret == -ENOTSUP ? "compression type not supported by this build"
						    : "cannot decompress (corrupt data)");
	r->dlayer = L;
	r->dl2e = l2e;
	return 0;
}

int qcow2_reader_read(struct qcow2_reader *r, uint64_t off, uint64_t len, void *buf, char *err,
		      size_t errlen)
{
	uint8_t *p = buf;
	int ret;

	if (off > r->top->size || len > r->top->size - off)
		return -EINVAL;
	while (len) {
		struct layer *L;
		struct status st;
		uint64_t n;

		ret = chain_status(r, off, len, &st, &L, err, errlen);
		if (ret < 0)
			return ret;
		n = st.pnum;
		if ((st.flags & ST_ZERO) || !(st.flags & ST_DATA)) {
			memset(p, 0, n);
		} else if (st.flags & ST_OFFSET) {
			ret = qcow2_pread_full(st.file->data_fd, p, n, st.map);
			if (ret < 0)
				return qcow2_seterr(err, errlen, ret, "'%s': read error: %s",
						    st.file->path, strerror(-ret));
		} else {
			/* a compressed cluster of L */
			uint64_t cs = L->im.h.cluster_size, coff = off & (cs - 1);

			ret = read_compressed(r, L, st.l2e, err, errlen);
			if (ret < 0)
				return ret;
			if (n > cs - coff)
				n = cs - coff;
			memcpy(p, r->dbuf + coff, n);
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}
