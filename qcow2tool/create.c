/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/create.c — create qcow2 and raw images (vqcow-img create).
 *
 * Layout of a new qcow2 image (all clusters in use, refcount 1 each):
 *
 *   cluster 0          header, header extensions (backing format, feature
 *                      name table), end marker, backing file name
 *   1 .. rt            refcount table (covers every refcount block)
 *   rt+1 .. rb         refcount blocks (cover every cluster of the image)
 *   rb+1 .. l1         active L1 table
 *   l1+1 .. l2         L2 tables          (preallocation != off)
 *   l2+1 .. end        data clusters      (preallocation != off)
 *
 * The number of refcount blocks depends on the total cluster count, which
 * depends on the number of refcount blocks and table clusters: iterate to the
 * fixpoint. Everything is written before the header, then fdatasync: a crash
 * during create leaves a file without a valid header, never a half-valid image.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qcow2tool.h"

#define CREATE_CHUNK (1u << 20) /* zero-writing chunk for preallocation=full */

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

static unsigned log2u(uint64_t v)
{
	return (unsigned)__builtin_ctzll(v);
}

static void progress(const struct qcow2_tool_cb *cb, double f)
{
	if (cb && cb->progress)
		cb->progress(cb->opaque, f);
}

/* Fill [off, off + len) with zeroes by writing. 0 or -errno. */
static int write_zeroes(int fd, uint64_t off, uint64_t len, const struct qcow2_tool_cb *cb,
			uint64_t *done, uint64_t total)
{
	void *z = calloc(1, CREATE_CHUNK);
	int ret = 0;

	if (!z)
		return -ENOMEM;
	while (len && !ret) {
		size_t n = len < CREATE_CHUNK ? (size_t)len : CREATE_CHUNK;

		ret = qcow2_pwrite_full(fd, z, n, off);
		off += n;
		len -= n;
		*done += n;
		progress(cb, total ? (double)*done / (double)total : 1.0);
	}
	free(z);
	return ret;
}

/*
 * Preallocate the data range [off, off + len) as @mode says (FALLOC:
 * fallocate, FULL: write zeroes), then make everything written so far
 * durable. 0 or -errno with @err set.
 */
static int preallocate_and_sync(int fd, enum qcow2_prealloc mode, uint64_t off, uint64_t len,
				const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	uint64_t done = 0;
	int ret;

	if (len && mode == QCOW2_PREALLOC_FALLOC) {
		if (fallocate(fd, 0, (off_t)off, (off_t)len) < 0) {
			ret = -errno;
			return qcow2_seterr(err, errlen, ret, "fallocate failed: %s",
					    strerror(-ret));
		}
	} else if (len && mode == QCOW2_PREALLOC_FULL) {
		ret = write_zeroes(fd, off, len, cb, &done, len);
		if (ret < 0)
			return qcow2_seterr(err, errlen, ret, "writing zeroes failed: %s",
					    strerror(-ret));
	}
	if (fdatasync(fd) < 0) {
		ret = -errno;
		return qcow2_seterr(err, errlen, ret, "fdatasync failed: %s", strerror(-ret));
	}
	return 0;
}

int qcow2_create_raw(const char *path, uint64_t size, enum qcow2_prealloc prealloc,
		     const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	int fd, ret;

	if (prealloc == QCOW2_PREALLOC_METADATA) {
		qcow2_seterr(err, errlen, 0,
			     "preallocation=metadata is not supported for raw images");
		return -EINVAL;
	}
	if (size > (uint64_t)INT64_MAX) {
		qcow2_seterr(err, errlen, 0, "size %llu too large", (unsigned long long)size);
		return -EFBIG;
	}
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "cannot create: %s", strerror(-ret));
		return ret;
	}
	if (ftruncate(fd, (off_t)size) < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "cannot set the size: %s", strerror(-ret));
		goto out_unlink;
	}
	ret = preallocate_and_sync(fd, prealloc, 0, size, cb, err, errlen);
	if (ret < 0)
		goto out_unlink;
	close(fd);
	return 0;
out_unlink:
	close(fd);
	unlink(path);
	return ret;
}

/* ---- qcow2 ---- */

struct layout {
	unsigned cluster_bits;
	uint64_t cs;
	unsigned refcount_order;
	unsigned l2_bits;
	uint64_t l1_size; /* entries */
	uint64_t l1_clusters;
	uint64_t nl2;      /* preallocated L2 tables */
	uint64_t ndata;    /* preallocated data clusters */
	uint64_t nrt, nrb; /* refcount table clusters, refcount blocks */
	uint64_t rt_off, rb_off, l1_off, l2_off, data_off, end;
	uint64_t total; /* clusters in use */
};

static int compute_layout(struct layout *L, uint64_t size, bool prealloc, char *err, size_t errlen)
{
	uint64_t rb_entries = L->cs * 8 >> L->refcount_order;
	uint64_t fixed;

	L->l1_size = qcow2_l1_entries_for(size, L->cluster_bits, L->l2_bits);
	if (L->l1_size > QCOW2_MAX_L1_ENTRIES) {
		qcow2_seterr(
		    err, errlen, 0,
		    "image size %llu is too large for cluster_size %llu (the L1 table would "
		    "need %llu entries, the limit is %u)",
		    (unsigned long long)size, (unsigned long long)L->cs,
		    (unsigned long long)L->l1_size, QCOW2_MAX_L1_ENTRIES);
		return -EFBIG;
	}
	L->l1_clusters = div_up(L->l1_size * 8, L->cs);
	L->nl2 = prealloc ? L->l1_size : 0;
	L->ndata = prealloc ? div_up(size, L->cs) : 0;
	fixed = 1 + L->l1_clusters + L->nl2 + L->ndata;
	L->nrt = 1;
	L->nrb = 1;
	for (int i = 0; i < 64; i++) {
		uint64_t total = fixed + L->nrt + L->nrb;
		uint64_t nrb = div_up(total, rb_entries);
		uint64_t nrt = div_up(nrb * 8, L->cs);

		if (nrb == L->nrb && nrt == L->nrt)
			break;
		L->nrb = nrb;
		L->nrt = nrt;
	}
	if (L->nrt * L->cs > QCOW2_MAX_REFTABLE_BYTES) {
		qcow2_seterr(
		    err, errlen, 0,
		    "the refcount table would need %llu bytes (limit %u): use larger clusters "
		    "or less preallocation",
		    (unsigned long long)(L->nrt * L->cs), QCOW2_MAX_REFTABLE_BYTES);
		return -EFBIG;
	}
	L->total = fixed + L->nrt + L->nrb;
	L->rt_off = L->cs;
	L->rb_off = L->rt_off + L->nrt * L->cs;
	L->l1_off = L->rb_off + L->nrb * L->cs;
	L->l2_off = L->l1_off + L->l1_clusters * L->cs;
	L->data_off = L->l2_off + L->nl2 * L->cs;
	L->end = L->data_off + L->ndata * L->cs;
	if (L->end / L->cs != L->total || L->end >= QCOW2_MAX_HOST_OFFSET) {
		qcow2_seterr(err, errlen, 0, "image too large");
		return -EFBIG;
	}
	return 0;
}

static int write_metadata(int fd, const struct layout *L, bool extl2, char *err, size_t errlen)
{
	uint64_t rb_entries = L->cs * 8 >> L->refcount_order;
	uint8_t *buf;
	uint64_t i;
	int ret = 0;

	buf = malloc(L->cs);
	if (!buf)
		return -ENOMEM;
	/* refcount blocks: clusters [0, total) have refcount 1 */
	for (i = 0; i < L->nrb && !ret; i++) {
		uint64_t first = i * rb_entries;

		memset(buf, 0, L->cs);
		for (uint64_t j = 0; j < rb_entries && first + j < L->total; j++)
			qcow2_refcount_set(buf, j, L->refcount_order, 1);
		ret = qcow2_pwrite_full(fd, buf, L->cs, L->rb_off + i * L->cs);
	}
	/* refcount table, one cluster at a time */
	for (i = 0; i < L->nrt && !ret; i++) {
		uint64_t per = L->cs / 8;

		memset(buf, 0, L->cs);
		for (uint64_t j = 0; j < per && i * per + j < L->nrb; j++)
			qcow2_put_be64(buf + j * 8, L->rb_off + (i * per + j) * L->cs);
		ret = qcow2_pwrite_full(fd, buf, L->cs, L->rt_off + i * L->cs);
	}
	/* L1 table */
	for (i = 0; i < L->l1_clusters && !ret; i++) {
		uint64_t per = L->cs / 8;

		memset(buf, 0, L->cs);
		if (L->nl2)
			for (uint64_t j = 0; j < per && i * per + j < L->l1_size; j++)
				qcow2_put_be64(buf + j * 8, (L->l2_off + (i * per + j) * L->cs) |
								QCOW2_OFLAG_COPIED);
		ret = qcow2_pwrite_full(fd, buf, L->cs, L->l1_off + i * L->cs);
	}
	/* preallocated L2 tables: every guest cluster mapped to its data cluster */
	for (i = 0; i < L->nl2 && !ret; i++) {
		uint64_t per = 1ull << L->l2_bits;
		unsigned esz = extl2 ? 16 : 8;

		memset(buf, 0, L->cs);
		for (uint64_t j = 0; j < per && i * per + j < L->ndata; j++)
			qcow2_put_be64(buf + j * esz,
				       (L->data_off + (i * per + j) * L->cs) | QCOW2_OFLAG_COPIED);
		/*
		 * With extended L2 the subcluster bitmap stays 0: the clusters are
		 * reserved but unallocated (they read from the backing file or as
		 * zeroes), as QEMU does.
		 */
		ret = qcow2_pwrite_full(fd, buf, L->cs, L->l2_off + i * L->cs);
	}
	free(buf);
	if (ret < 0)
		qcow2_seterr(err, errlen, 0, "writing metadata failed: %s", strerror(-ret));
	return ret;
}

static const struct {
	uint8_t type, bit;
	const char *name;
} feature_names[] = {
    {QCOW2_FEAT_INCOMPAT, 0, "dirty bit"},
    {QCOW2_FEAT_INCOMPAT, 1, "corrupt bit"},
    {QCOW2_FEAT_INCOMPAT, 2, "external data file"},
    {QCOW2_FEAT_INCOMPAT, 3, "compression type"},
    {QCOW2_FEAT_INCOMPAT, 4, "extended L2 entries"},
    {QCOW2_FEAT_COMPAT, 0, "lazy refcounts"},
    {QCOW2_FEAT_AUTOCLEAR, 0, "bitmaps"},
    {QCOW2_FEAT_AUTOCLEAR, 1, "raw external data"},
};
#define N_FEATURES (sizeof(feature_names) / sizeof(feature_names[0]))

/* Build cluster 0 in @buf (cs bytes, zeroed). 0 or -EINVAL if it does not fit. */
static int build_header(uint8_t *buf, const struct layout *L, uint64_t size, int version,
			bool extl2, bool lazy, int ctype, const char *backing,
			const char *backing_fmt, char *err, size_t errlen)
{
	struct qcow2_header_disk *h = (void *)buf;
	uint32_t hlen = version >= 3 ? QCOW2_HEADER_V3_LEN : QCOW2_HEADER_V2_LEN;
	size_t blen = backing ? strlen(backing) : 0;
	size_t flen = backing_fmt ? strlen(backing_fmt) : 0;
	uint64_t need, off;
	bool features = version >= 3;

	need = hlen + (flen ? 8 + ((flen + 7) & ~7ull) : 0) + 8 + blen;
	if (features && need + 8 + N_FEATURES * 48 > L->cs)
		features = false; /* optional: leave it out of small clusters */
	if (features)
		need += 8 + N_FEATURES * 48;
	if (need > L->cs) {
		qcow2_seterr(
		    err, errlen, 0,
		    "the header, its extensions and the backing file name (%llu bytes) do not "
		    "fit in one %llu-byte cluster",
		    (unsigned long long)need, (unsigned long long)L->cs);
		return -EINVAL;
	}
	qcow2_put_be32(&h->magic, QCOW2_MAGIC);
	qcow2_put_be32(&h->version, (uint32_t)version);
	qcow2_put_be32(&h->cluster_bits, L->cluster_bits);
	qcow2_put_be64(&h->size, size);
	qcow2_put_be32(&h->l1_size, (uint32_t)L->l1_size);
	qcow2_put_be64(&h->l1_table_offset, L->l1_off);
	qcow2_put_be64(&h->refcount_table_offset, L->rt_off);
	qcow2_put_be32(&h->refcount_table_clusters, (uint32_t)L->nrt);
	if (version >= 3) {
		qcow2_put_be64(&h->incompatible_features,
			       (extl2 ? QCOW2_INCOMPAT_EXTL2 : 0) |
				   (ctype ? QCOW2_INCOMPAT_COMPRESSION : 0));
		h->compression_type = (uint8_t)ctype;
		qcow2_put_be64(&h->compatible_features, lazy ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
		qcow2_put_be32(&h->refcount_order, L->refcount_order);
		qcow2_put_be32(&h->header_length, hlen);
	}
	off = hlen;
	if (flen) {
		qcow2_put_be32(buf + off, QCOW2_EXT_BACKING_FORMAT);
		qcow2_put_be32(buf + off + 4, (uint32_t)flen);
		memcpy(buf + off + 8, backing_fmt, flen);
		off += 8 + ((flen + 7) & ~7ull);
	}
	if (features) {
		qcow2_put_be32(buf + off, QCOW2_EXT_FEATURE_TABLE);
		qcow2_put_be32(buf + off + 4, (uint32_t)(N_FEATURES * 48));
		off += 8;
		for (size_t i = 0; i < N_FEATURES; i++, off += 48) {
			buf[off] = feature_names[i].type;
			buf[off + 1] = feature_names[i].bit;
			memcpy(buf + off + 2, feature_names[i].name, strlen(feature_names[i].name));
		}
	}
	off += 8; /* end marker (zeroes) */
	if (blen) {
		qcow2_put_be64(&h->backing_file_offset, off);
		qcow2_put_be32(&h->backing_file_size, (uint32_t)blen);
		memcpy(buf + off, backing, blen);
	}
	return 0;
}

/* Open the backing file to learn its format (if not given) and size. */
static int probe_backing(const char *path, const struct qcow2_create_opts *o, char *fmt_out,
			 size_t fmtlen, uint64_t *size, char *err, size_t errlen)
{
	struct qcow2_image_info info;
	char *full, perr[256] = "";
	int ret;

	if (o->backing_fmt && strcmp(o->backing_fmt, "qcow2") && strcmp(o->backing_fmt, "raw")) {
		qcow2_seterr(err, errlen, 0, "unsupported backing file format '%s' (qcow2 or raw)",
			     o->backing_fmt);
		return -ENOTSUP;
	}
	full = qcow2_path_relative(path, o->backing_file);
	if (!full)
		return -ENOMEM;
	ret = qcow2_info(full, o->backing_fmt, &info, perr, sizeof(perr));
	if (ret < 0) {
		qcow2_seterr(err, errlen, 0, "could not open backing file '%s': %s", full, perr);
		free(full);
		return ret;
	}
	free(full);
	snprintf(fmt_out, fmtlen, "%s", info.format);
	*size = info.virtual_size;
	qcow2_image_info_free(&info);
	return 0;
}

int qcow2_create(const char *path, const struct qcow2_create_opts *o,
		 const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	struct layout L;
	uint64_t size = o->size, cs = o->cluster_size ? o->cluster_size : 65536;
	unsigned refbits = o->refcount_bits ? o->refcount_bits : 16;
	int version = o->version ? o->version : 3;
	char bfmt[16] = "";
	uint8_t *hdr = NULL;
	int fd, ret;

	memset(&L, 0, sizeof(L));
	if (err && errlen)
		err[0] = 0;
	/* ---- validate the combination before touching the file system ---- */
	if (version != 2 && version != 3) {
		qcow2_seterr(err, errlen, 0, "invalid compat level (0.10 or 1.1)");
		return -EINVAL;
	}
	if (!is_pow2(cs) || cs < 512 || cs > QCOW2_MAX_CLUSTER_SIZE) {
		qcow2_seterr(err, errlen, 0,
			     "cluster size must be a power of two between 512 and 2M (got %llu)",
			     (unsigned long long)cs);
		return -EINVAL;
	}
	if (!is_pow2(refbits) || refbits > 64) {
		qcow2_seterr(err, errlen, 0,
			     "refcount_bits must be a power of two up to 64 (got %u)", refbits);
		return -EINVAL;
	}
	if (version == 2 && refbits != 16) {
		qcow2_seterr(
		    err, errlen, 0,
		    "different refcount widths than 16 bits require compatibility level 1.1");
		return -EINVAL;
	}
	if (version == 2 && o->extended_l2) {
		qcow2_seterr(err, errlen, 0,
			     "extended L2 entries are only supported with compat=1.1");
		return -EINVAL;
	}
	if (version == 2 && o->lazy_refcounts) {
		qcow2_seterr(err, errlen, 0, "lazy refcounts only supported with compat=1.1");
		return -EINVAL;
	}
	if (o->extended_l2 && cs < (1u << QCOW2_MIN_CLUSTER_BITS_EXTL2)) {
		qcow2_seterr(
		    err, errlen, 0,
		    "extended L2 entries are only supported with cluster sizes of at least "
		    "%u bytes",
		    1u << QCOW2_MIN_CLUSTER_BITS_EXTL2);
		return -EINVAL;
	}
	if (o->compression_type != QCOW2_COMPRESSION_ZLIB &&
	    o->compression_type != QCOW2_COMPRESSION_ZSTD) {
		qcow2_seterr(err, errlen, 0, "unknown compression type %d", o->compression_type);
		return -EINVAL;
	}
	if (version == 2 && o->compression_type != QCOW2_COMPRESSION_ZLIB) {
		qcow2_seterr(err, errlen, 0,
			     "Non-zlib compression type is only supported with compatibility "
			     "level 1.1 and above (use version=v3 or greater)");
		return -EINVAL;
	}
	if (o->backing_fmt && !o->backing_file) {
		qcow2_seterr(err, errlen, 0, "a backing format was given without a backing file");
		return -EINVAL;
	}
	if (o->backing_file) {
		uint64_t bsize;

		if (!o->backing_file[0] || strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME) {
			qcow2_seterr(err, errlen, 0, "backing file name must be 1..%u bytes",
				     QCOW2_MAX_BACKING_NAME);
			return -EINVAL;
		}
		if (o->prealloc != QCOW2_PREALLOC_OFF && !o->extended_l2) {
			qcow2_seterr(
			    err, errlen, 0,
			    "backing file and preallocation can only be used at the same time "
			    "if extended_l2 is on");
			return -EINVAL;
		}
		ret = probe_backing(path, o, bfmt, sizeof(bfmt), &bsize, err, errlen);
		if (ret < 0)
			return ret;
		if (!o->backing_fmt) {
			/*
			 * As qemu-img (since 6.1): never record a probed format. A
			 * guest may have written a qcow2 header into its raw disk;
			 * recorded as qcow2, that header's backing file name would
			 * then reach any file on the host. Same message, and the
			 * same hint, as qemu-img.
			 */
			return qcow2_seterr(err, errlen, -EINVAL,
					    "Backing file specified without backing format\n"
					    "Detected format of %s.",
					    bfmt);
		}
		if (!o->size_set)
			size = bsize;
	} else if (!o->size_set) {
		qcow2_seterr(err, errlen, 0, "image creation needs a size parameter");
		return -EINVAL;
	}
	if (size > (1ull << 62)) {
		qcow2_seterr(err, errlen, 0, "image size %llu is too large",
			     (unsigned long long)size);
		return -EFBIG;
	}
	size = (size + 511) & ~511ull;
	L.cluster_bits = log2u(cs);
	L.cs = cs;
	L.refcount_order = log2u(refbits);
	L.l2_bits = L.cluster_bits - (o->extended_l2 ? 4 : 3);
	ret = compute_layout(&L, size, o->prealloc != QCOW2_PREALLOC_OFF, err, errlen);
	if (ret < 0)
		return ret;
	hdr = calloc(1, cs);
	if (!hdr)
		return -ENOMEM;
	ret = build_header(hdr, &L, size, version, o->extended_l2, o->lazy_refcounts,
			   o->compression_type, o->backing_file, o->backing_file ? bfmt : NULL, err,
			   errlen);
	if (ret < 0)
		goto out_free;

	/* ---- write ---- */
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | (o->overwrite ? 0 : O_EXCL), 0644);
	if (fd < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "cannot create: %s", strerror(-ret));
		goto out_free;
	}
	if ((o->overwrite && ftruncate(fd, 0) < 0) || ftruncate(fd, (off_t)L.end) < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "cannot set the file size: %s", strerror(-ret));
		goto out_unlink;
	}
	ret = write_metadata(fd, &L, o->extended_l2, err, errlen);
	if (ret < 0)
		goto out_unlink;
	ret = preallocate_and_sync(fd, o->prealloc, L.data_off, L.ndata * L.cs, cb, err, errlen);
	if (ret < 0)
		goto out_unlink;
	/* the header last: until here the file is not a qcow2 image */
	ret = qcow2_pwrite_full(fd, hdr, cs, 0);
	if (ret == 0 && fdatasync(fd) < 0)
		ret = -errno;
	if (ret < 0) {
		qcow2_seterr(err, errlen, 0, "writing the header failed: %s", strerror(-ret));
		goto out_unlink;
	}
	close(fd);
	free(hdr);
	return 0;
out_unlink:
	close(fd);
	unlink(path);
out_free:
	free(hdr);
	return ret;
}
