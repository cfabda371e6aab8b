/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/resize.c — vqcow-img resize: grow a raw or qcow2 image offline.
 *
 * raw: the file is extended (ftruncate); a block device cannot be grown.
 *
 * qcow2, in an order where a crash at any point leaves a consistent image
 * (at worst leaked clusters), the same order the engine keeps online
 * (qcow2/resize.c):
 *   1. when the L1 table must grow: the new table's clusters are taken at
 *      the end of the file, their refcounts raised (in the refcount blocks
 *      that exist, or in new blocks, themselves at the end and counted, with
 *      a larger refcount table when the old one cannot reach them);
 *      refcount blocks written                            -> fsync
 *      refcount table entries, or a moved table and then the header's
 *      refcount table pointer                             -> fsync
 *      the new L1 table (copied, zero-padded)             -> fsync
 *   2. the header's size, l1_size and l1_table_offset: 24 bytes of the first
 *      sector, one write                                  -> fsync
 *   3. the old L1 table's (and a moved refcount table's) clusters released:
 *      refcount blocks written                            -> fsync
 * An external data file is grown to the new size first (as QEMU does).
 * Refused (nothing written): shrinking, sizes that are not a multiple of
 * 512, a v2 image with internal snapshots (QEMU's text), an image with the
 * corrupt or dirty bit, an L1 table past 32 MiB, an inconsistent (in use)
 * persistent dirty bitmap. Persistent bitmaps: marked in use before the grow,
 * their tables fitted to the new size (new part clean) and in_use cleared
 * after it (grow_with_bitmaps), as qemu-img resize leaves them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2tool.h"

struct rblk {
	uint64_t rti; /* refcount table index */
	uint64_t off; /* host offset */
	uint8_t *buf;
	bool dirty;
};

struct rz {
	const char *path;
	struct qcow2_io io;
	uint32_t cb;
	uint64_t cs;
	unsigned rorder;
	uint32_t rb_bits;
	uint64_t file_size;
	uint64_t *rt;
	uint64_t rt_entries;
	uint64_t rt_off;
	uint32_t rt_clusters;
	bool rt_changed, rt_moved;
	uint64_t old_rt_off;
	uint32_t old_rt_clusters;
	uint64_t next; /* next free cluster index at the end of the file */
	struct rblk *blk;
	size_t nblk;
	char *err;
	size_t errlen;
};

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

static int set_rc(struct rz *z, uint64_t c, uint64_t v);

/* The refcount block of table index @rti: cached, read, or (@create) new at the end. */
static int get_block(struct rz *z, uint64_t rti, bool create, struct rblk **out)
{
	uint64_t off;
	struct rblk *nb, *b;
	int ret;

	for (size_t i = 0; i < z->nblk; i++) {
		if (z->blk[i].rti == rti) {
			*out = &z->blk[i];
			return 0;
		}
	}
	off = z->rt[rti] & QCOW2_RTE_OFFSET_MASK;
	if (!off && !create)
		return qcow2_seterr(z->err, z->errlen, -EIO,
				    "%s: no refcount block for table entry %llu", z->path,
				    (unsigned long long)rti);
	if (off && ((off & (z->cs - 1)) || off > z->file_size || z->cs > z->file_size - off))
		return qcow2_seterr(z->err, z->errlen, -EIO,
				    "%s: refcount table entry %llu (0x%llx) is invalid", z->path,
				    (unsigned long long)rti, (unsigned long long)off);
	nb = realloc(z->blk, (z->nblk + 1) * sizeof(*nb));
	if (!nb)
		return -ENOMEM;
	z->blk = nb;
	b = &z->blk[z->nblk];
	memset(b, 0, sizeof(*b));
	b->buf = calloc(1, z->cs);
	if (!b->buf)
		return -ENOMEM;
	b->rti = rti;
	z->nblk++;
	if (off) {
		b->off = off;
		ret = qcow2_io_read(&z->io, b->buf, z->cs, off);
		if (ret < 0)
			return qcow2_seterr(z->err, z->errlen, ret,
					    "%s: reading a refcount block: %s", z->path,
					    strerror(-ret));
		*out = b;
		return 0;
	}
	/* a new block at the end, counted in itself or in another block */
	b->off = z->next++ << z->cb;
	b->dirty = true;
	z->rt[rti] = b->off;
	z->rt_changed = true;
	ret = set_rc(z, b->off >> z->cb, 1);
	if (ret < 0)
		return ret;
	/* z->blk may have moved: find it again */
	return get_block(z, rti, false, out);
}

/* A larger refcount table at the end that covers index @need. */
static int grow_rt(struct rz *z, uint64_t need)
{
	uint64_t per_cl = z->cs / 8,
		 n = z->rt_entries * 2 > need + 1 ? z->rt_entries * 2 : need + 1;
	uint64_t t = div_up(n, per_cl), c, *nrt;

	if ((t << z->cb) > QCOW2_MAX_REFTABLE_BYTES)
		return qcow2_seterr(z->err, z->errlen, -EFBIG,
				    "%s: the refcount table would exceed %u bytes", z->path,
				    QCOW2_MAX_REFTABLE_BYTES);
	n = t * per_cl;
	nrt = calloc(n, sizeof(*nrt));
	if (!nrt)
		return -ENOMEM;
	memcpy(nrt, z->rt, z->rt_entries * sizeof(*nrt));
	free(z->rt);
	if (!z->rt_moved) {
		z->old_rt_off = z->rt_off;
		z->old_rt_clusters = z->rt_clusters;
	} else {
		/* a table of this run that never reached the disk: give it back */
		for (uint64_t k = 0; k < z->rt_clusters; k++) {
			int ret = set_rc(z, (z->rt_off >> z->cb) + k, 0);

			if (ret < 0)
				return ret;
		}
	}
	z->rt = nrt;
	z->rt_entries = n;
	c = z->next;
	z->next += t;
	z->rt_off = c << z->cb;
	z->rt_clusters = (uint32_t)t;
	z->rt_moved = true;
	for (uint64_t k = 0; k < t; k++) {
		int ret = set_rc(z, c + k, 1);

		if (ret < 0)
			return ret;
	}
	return 0;
}

static int set_rc(struct rz *z, uint64_t c, uint64_t v)
{
	uint64_t rti = c >> z->rb_bits, idx = c & ((1ull << z->rb_bits) - 1), cur;
	struct rblk *b;
	int ret;

	if (rti >= z->rt_entries) {
		ret = grow_rt(z, rti);
		if (ret < 0)
			return ret;
	}
	ret = get_block(z, rti, v != 0, &b);
	if (ret < 0)
		return ret;
	cur = qcow2_refcount_get(b->buf, idx, z->rorder);
	if (v == 1 && cur != 0)
		return qcow2_seterr(z->err, z->errlen, -EIO,
				    "%s: cluster 0x%llx past the end of the file has refcount %llu "
				    "(repair the image with check -r all first)",
				    z->path, (unsigned long long)(c << z->cb),
				    (unsigned long long)cur);
	qcow2_refcount_set(b->buf, idx, z->rorder, v);
	b->dirty = true;
	return 0;
}

static int dec_rc(struct rz *z, uint64_t c)
{
	uint64_t rti = c >> z->rb_bits, idx = c & ((1ull << z->rb_bits) - 1), cur;
	struct rblk *b;
	int ret;

	if (rti >= z->rt_entries)
		return 0; /* not counted: nothing to release (the image leaked it) */
	ret = get_block(z, rti, false, &b);
	if (ret < 0)
		return ret;
	cur = qcow2_refcount_get(b->buf, idx, z->rorder);
	if (cur == 0)
		return 0;
	qcow2_refcount_set(b->buf, idx, z->rorder, cur - 1);
	b->dirty = true;
	return 0;
}

static int write_sync(struct rz *z, const void *buf, size_t len, uint64_t off, const char *what)
{
	int ret = qcow2_io_write(&z->io, buf, len, off);

	if (ret >= 0)
		ret = qcow2_io_sync(&z->io);
	if (ret < 0)
		return qcow2_seterr(z->err, z->errlen, ret, "%s: writing %s: %s", z->path, what,
				    strerror(-ret));
	return 0;
}

static int write_blocks(struct rz *z)
{
	int ret;

	for (size_t i = 0; i < z->nblk; i++) {
		if (!z->blk[i].dirty)
			continue;
		ret = qcow2_io_write(&z->io, z->blk[i].buf, z->cs, z->blk[i].off);
		if (ret < 0)
			return qcow2_seterr(z->err, z->errlen, ret,
					    "%s: writing a refcount block: %s", z->path,
					    strerror(-ret));
		z->blk[i].dirty = false;
	}
	ret = qcow2_io_sync(&z->io);
	if (ret < 0)
		return qcow2_seterr(z->err, z->errlen, ret, "%s: fsync: %s", z->path,
				    strerror(-ret));
	return 0;
}

static uint8_t *table_be(const uint64_t *t, uint64_t n, uint64_t bytes)
{
	uint8_t *b = calloc(1, bytes);

	if (b)
		for (uint64_t i = 0; i < n; i++)
			qcow2_put_be64(b + i * 8, t[i]);
	return b;
}

static int grow_qcow2(int fd, const char *path, uint64_t size, bool bm_ready, char *err,
		      size_t errlen)
{
	struct qcow2_oimg im;
	struct rz z;
	const struct qcow2_header_info *h;
	uint64_t need, old_l1_off, old_l1_clusters = 0, l1_off, l1_n = 0;
	uint8_t hdr[24], *buf = NULL;
	char e2[256] = "";
	int ret;

	memset(&z, 0, sizeof(z));
	z.io = qcow2_fd_io(fd);
	ret = qcow2_oimg_open(&im, &z.io, path, true, e2, sizeof(e2));
	if (ret < 0) {
		qcow2_oimg_close(&im);
		return qcow2_seterr(err, errlen, ret, "%s", e2[0] ? e2 : strerror(-ret));
	}
	h = &im.h;
	z.path = path;
	z.err = err;
	z.errlen = errlen;
	z.cb = h->cluster_bits;
	z.cs = h->cluster_size;
	z.rorder = h->refcount_order;
	z.rb_bits = h->refcount_block_bits;
	z.file_size = im.file_size;
	z.rt = im.rt;
	im.rt = NULL;
	z.rt_entries = h->refcount_table_entries;
	z.rt_off = h->refcount_table_offset;
	z.rt_clusters = h->refcount_table_clusters;
	z.next = div_up(im.file_size, z.cs);

	ret = -ENOTSUP;
	if (size % 512) {
		ret = qcow2_seterr(err, errlen, -EINVAL, "The new size must be a multiple of 512");
		goto out;
	}
	if (size < (h->size & ~511ull)) {
		qcow2_seterr(err, errlen, 0, "shrinking is not supported");
		goto out;
	}
	if (h->version < 3 && h->nb_snapshots) {
		qcow2_seterr(err, errlen, 0, "Can't resize a v2 image which has snapshots");
		goto out;
	}
	if (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		ret = qcow2_seterr(err, errlen, -EIO, "%s: the image is marked corrupt", path);
		goto out;
	}
	if (h->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
		ret = qcow2_seterr(err, errlen, -EIO,
				   "%s: the image is dirty (lazy refcounts): repair it with check "
				   "-r all first",
				   path);
		goto out;
	}
	if (h->has_bitmaps && (h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) && h->nb_bitmaps &&
	    !bm_ready) {
		ret = 1; /* the caller marks them in use first (grow_with_bitmaps) */
		goto out;
	}
	need = (size + (1ull << (z.cb + h->l2_bits)) - 1) >> (z.cb + h->l2_bits);
	if (need > QCOW2_MAX_L1_ENTRIES) {
		ret = qcow2_seterr(err, errlen, -EFBIG,
				   "%s: the new size needs an L1 table larger than %u bytes", path,
				   QCOW2_MAX_L1_BYTES);
		goto out;
	}

	/* an external data file covers the disk, as QEMU grows it */
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		char *df = qcow2_path_relative(path, h->data_file);
		struct stat st;
		int dfd;

		if (!df) {
			ret = -ENOMEM;
			goto out;
		}
		dfd = open(df, O_RDWR | O_CLOEXEC);
		if (dfd < 0 || fstat(dfd, &st) < 0 ||
		    (S_ISREG(st.st_mode) && (uint64_t)st.st_size < size &&
		     (ftruncate(dfd, (off_t)size) < 0 || fsync(dfd) < 0))) {
			ret = -errno;
			qcow2_seterr(err, errlen, ret, "%s: growing the data file %s: %s", path, df,
				     strerror(errno));
			if (dfd >= 0)
				close(dfd);
			free(df);
			goto out;
		}
		close(dfd);
		free(df);
	}

	old_l1_off = h->l1_table_offset;
	l1_off = old_l1_off;
	if (need > h->l1_size) {
		/* 1: the new L1 table, counted before anything points at it */
		l1_n = div_up(need * 8, z.cs);
		old_l1_clusters = div_up((uint64_t)h->l1_size * 8, z.cs);
		l1_off = z.next << z.cb;
		z.next += l1_n;
		for (uint64_t k = 0; k < l1_n; k++) {
			ret = set_rc(&z, (l1_off >> z.cb) + k, 1);
			if (ret < 0)
				goto out;
		}
		ret = write_blocks(&z);
		if (ret < 0)
			goto out;
		/* The refcount table, then (if it moved) the header pointing at it. */
		if (z.rt_moved || z.rt_changed) {
			buf = table_be(z.rt, z.rt_entries, (uint64_t)z.rt_clusters << z.cb);
			if (!buf) {
				ret = -ENOMEM;
				goto out;
			}
			ret = write_sync(&z, buf, (size_t)z.rt_clusters << z.cb, z.rt_off,
					 "the refcount table");
			free(buf);
			buf = NULL;
			if (ret < 0)
				goto out;
		}
		if (z.rt_moved) {
			uint8_t ptr[12];

			qcow2_put_be64(ptr, z.rt_off);
			qcow2_put_be32(ptr + 8, z.rt_clusters);
			ret = write_sync(&z, ptr, sizeof(ptr), QCOW2_OFF_REFCOUNT_TABLE_OFFSET,
					 "the header");
			if (ret < 0)
				goto out;
		}
		buf = table_be(im.l1, h->l1_size, l1_n << z.cb);
		if (!buf) {
			ret = -ENOMEM;
			goto out;
		}
		ret = write_sync(&z, buf, (size_t)(l1_n << z.cb), l1_off, "the L1 table");
		free(buf);
		buf = NULL;
		if (ret < 0)
			goto out;
	} else {
		need = h->l1_size;
	}

	/* 2: the switch, one sector */
	qcow2_put_be64(hdr, size);
	qcow2_put_be32(hdr + 8, h->crypt_method);
	qcow2_put_be32(hdr + 12, (uint32_t)need);
	qcow2_put_be64(hdr + 16, l1_off);
	ret = write_sync(&z, hdr, sizeof(hdr), QCOW2_OFF_SIZE, "the header");
	if (ret < 0)
		goto out;

	/* 3: release what the header no longer points at */
	if (l1_n || z.rt_moved) {
		for (uint64_t k = 0; l1_n && k < old_l1_clusters; k++) {
			ret = dec_rc(&z, (old_l1_off >> z.cb) + k);
			if (ret < 0)
				goto out;
		}
		for (uint64_t k = 0; z.rt_moved && k < z.old_rt_clusters; k++) {
			ret = dec_rc(&z, (z.old_rt_off >> z.cb) + k);
			if (ret < 0)
				goto out;
		}
		ret = write_blocks(&z);
		if (ret < 0)
			goto out;
	}
	ret = 0;
out:
	free(buf);
	for (size_t i = 0; i < z.nblk; i++)
		free(z.blk[i].buf);
	free(z.blk);
	free(z.rt);
	qcow2_oimg_close(&im);
	return ret;
}

/*
 * An image with persistent dirty bitmaps: every bitmap marked in use, the
 * grow, then every bitmap given a table for the size the header has now
 * and in_use cleared (qcow2fmt/snapshot.c, ops 'U' and 'F': each a new
 * directory switched by one header write). The last step runs whether the
 * grow succeeded or not, so a refused grow leaves the bitmaps as they were.
 */
static int grow_with_bitmaps(int fd, const char *path, uint64_t size, char *err, size_t errlen)
{
	struct qcow2_io io = qcow2_fd_io(fd);
	char e2[300] = "";
	int ret, r2;

	ret = qcow2_bitmap_edit_io(&io, path, 'U', "", 0, false, err, errlen);
	if (ret < 0)
		return ret;
	ret = grow_qcow2(fd, path, size, true, err, errlen);
	r2 = qcow2_bitmap_edit_io(&io, path, 'F', "", 0, false, e2, sizeof(e2));
	if (r2 < 0 && ret >= 0) {
		qcow2_seterr(err, errlen, r2, "%s: storing the resized bitmaps: %s", path, e2);
		ret = r2;
	}
	return ret;
}

int qcow2_resize(const char *path, const char *fmt, uint64_t size, char *err, size_t errlen)
{
	struct stat st;
	int fd, q, ret;

	if (err && errlen)
		err[0] = '\0';
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		return qcow2_seterr(err, errlen, ret, "Could not open '%s': %s", path,
				    strerror(-ret));
	}
	if (fstat(fd, &st) < 0) {
		ret = -errno;
		goto out;
	}
	q = qcow2_probe(fd);
	if (q < 0) {
		ret = qcow2_seterr(err, errlen, q, "%s: cannot read: %s", path, strerror(-q));
		goto out;
	}
	if (fmt && !strcmp(fmt, "raw"))
		q = 0;
	else if (fmt && !q) {
		ret = qcow2_seterr(err, errlen, -EINVAL, "%s: not a qcow2 image (bad magic)", path);
		goto out;
	}
	if (q) {
		ret = grow_qcow2(fd, path, size, false, err, errlen);
		if (ret == 1)
			ret = grow_with_bitmaps(fd, path, size, err, errlen);
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		ret = qcow2_seterr(err, errlen, -ENOTSUP, "Cannot grow device files");
		goto out;
	}
	if ((uint64_t)st.st_size > size) {
		ret = qcow2_seterr(err, errlen, -ENOTSUP, "shrinking is not supported");
		goto out;
	}
	ret = 0;
	if (ftruncate(fd, (off_t)size) < 0 || fsync(fd) < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, ret, "%s: %s", path, strerror(-ret));
	}
out:
	close(fd);
	return ret;
}
