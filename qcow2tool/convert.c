/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/convert.c — vqcow-img convert: copy the guest view of an image
 * (qcow2 or raw, through its backing chain, as qemu-img convert without -B)
 * into a new qcow2 or raw image.
 *
 * Reading goes through the chain reader (map.c: qcow2_reader_*). Ranges the
 * chain knows to read as zeroes are never read, and data that turns out to
 * be zeroes is not written (qemu-img's -S, 4 KiB by default): the output
 * stays sparse. A raw output is a sparse file; a qcow2 output leaves such
 * clusters unallocated (it has no backing file, so they read as zeroes).
 *
 * The qcow2 output is created empty by qcow2_create() (so it gets exactly
 * create's header and options) and then filled append-only, in guest order:
 * data clusters (or compressed clusters, packed at byte granularity as QEMU
 * packs them, several per host cluster), each L2 table when the copy moves
 * past its range. Refcounts are counted in memory. With -c the clusters of
 * each 2 MiB chunk are compressed on up to 4 threads, then placed in order.
 * At the end, in this order: the refcount blocks and table (growing the table if it must),
 * fdatasync, the header if the table moved, fdatasync, the L1 table,
 * fdatasync. Until the L1 table is written nothing on disk points at the new
 * clusters, so a crash leaves an empty image with leaked clusters, never an
 * entry pointing at a cluster whose refcount is 0.
 *
 * The destination is written only under qemu-img's write lock on it.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "compress.h"
#include "qcow2tool.h"

static bool all_zero_4k(const uint8_t *p)
{
	static const uint8_t z[4096];

	return !memcmp(p, z, sizeof(z));
}

#define ZTHREADS 4 /* compression threads at most (QEMU's qcow2 uses 4 too) */
#define CHUNK                                                                                      \
	(2u << 20) /* bytes read at a time (qemu-img's buffer): a multiple of every cluster size   \
		    */

struct qw {
	int fd;
	const char *path;
	uint64_t cs;
	unsigned cbits, esz, rorder;
	uint64_t l2n; /* entries per L2 table */
	bool extl2;
	int ctype;
	uint64_t rmax; /* largest refcount we may store */
	uint64_t l1_off;
	uint32_t l1_size;
	uint64_t *l1;
	uint8_t *l2;
	uint64_t l2_idx; /* L1 index of the table in l2 */
	bool l2_used;
	uint64_t next;       /* next free cluster (index) */
	uint64_t cpos, cend; /* compressed bytes: cursor and end of their clusters (bytes) */
	uint32_t *ref;       /* refcount of each host cluster */
	uint64_t nref;
	uint64_t rt_off, rt_clusters; /* the refcount table create wrote */
	uint64_t *rt;                 /* its entries */
	/* -c: clusters of a chunk are compressed by up to ZTHREADS threads at once */
	unsigned nz;                    /* threads (and codec states) */
	struct qcow2_zctx *z[ZTHREADS]; /* one per thread */
	uint8_t *zout;                  /* compressed clusters of the chunk (cs bytes each) */
	ssize_t *zlen;                  /* their lengths, -ENOSPC: stored plain, 0: none */
};

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return (a + b - 1) / b;
}

static int ref_grow(struct qw *w, uint64_t n)
{
	uint32_t *r;
	uint64_t cap;

	if (n <= w->nref)
		return 0;
	cap = w->nref ? w->nref : 1024;
	while (cap < n)
		cap *= 2;
	r = realloc(w->ref, cap * sizeof(*r));
	if (!r)
		return -ENOMEM;
	memset(r + w->nref, 0, (cap - w->nref) * sizeof(*r));
	w->ref = r;
	w->nref = cap;
	return 0;
}

/* A new cluster with refcount 1; its byte offset in *@off. */
static int alloc_cluster(struct qw *w, uint64_t *off)
{
	int ret = ref_grow(w, w->next + 1);

	if (ret < 0)
		return ret;
	w->ref[w->next] = 1;
	*off = w->next++ << w->cbits;
	if (*off >= QCOW2_MAX_HOST_OFFSET)
		return -EFBIG;
	return 0;
}

/*
 * Write a metadata cluster without its trailing zeroes: the file is new, so
 * they read back as zeroes from the hole (a 2 MiB L2 table mostly empty
 * costs no 2 MiB of disk).
 */
static int write_meta(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
	uint64_t end = len;

	while (end >= 4096 && end % 4096 == 0 && all_zero_4k(buf + end - 4096))
		end -= 4096;
	return end ? qcow2_pwrite_full(fd, buf, end, off) : 0;
}

static int l2_flush(struct qw *w)
{
	uint64_t off;
	int ret;

	if (!w->l2_used)
		return 0;
	ret = alloc_cluster(w, &off);
	if (ret < 0)
		return ret;
	ret = write_meta(w->fd, w->l2, w->cs, off);
	if (ret < 0)
		return ret;
	w->l1[w->l2_idx] = off | QCOW2_OFLAG_COPIED;
	w->l2_used = false;
	return 0;
}

static int l2_set(struct qw *w, uint64_t guest, uint64_t e, uint64_t bm)
{
	uint64_t idx1 = guest >> (w->cbits + __builtin_ctzll(w->l2n));
	uint64_t idx2 = (guest >> w->cbits) & (w->l2n - 1);
	int ret;

	if (idx1 >= w->l1_size)
		return -EIO;
	if (!w->l2_used || w->l2_idx != idx1) {
		ret = l2_flush(w);
		if (ret < 0)
			return ret;
		memset(w->l2, 0, w->cs);
		w->l2_idx = idx1;
		w->l2_used = true;
	}
	qcow2_put_be64(w->l2 + idx2 * w->esz, e);
	if (w->extl2)
		qcow2_put_be64(w->l2 + idx2 * w->esz + 8, bm);
	return 0;
}

/* A data cluster at guest offset @guest (@bm: extended L2's allocation bitmap). */
static int write_cluster(struct qw *w, uint64_t guest, const uint8_t *buf, uint64_t bm,
			 const uint8_t *mask)
{
	uint64_t off, ns = w->cs / 512;
	int ret = alloc_cluster(w, &off);

	if (ret < 0)
		return ret;
	/*
	 * Only the sectors in @mask (NULL: all): the file is new, so what is
	 * not written is a hole and reads as the zeroes it holds (qemu-img's
	 * output is as sparse: QEMU writes no zeroes into a new cluster either).
	 */
	for (uint64_t i = 0; i < ns;) {
		uint64_t e = i;

		if (mask && !mask[i]) {
			i++;
			continue;
		}
		while (e < ns && (!mask || mask[e]))
			e++;
		ret = qcow2_pwrite_full(w->fd, buf + i * 512, (e - i) * 512, off + i * 512);
		if (ret < 0)
			return ret;
		i = e;
	}
	return l2_set(w, guest, off | QCOW2_OFLAG_COPIED, bm);
}

/* Can @len compressed bytes go at @pos without a refcount overflow? */
static bool fits_refcounts(const struct qw *w, uint64_t pos, uint64_t len)
{
	for (uint64_t c = pos >> w->cbits; c <= (pos + len - 1) >> w->cbits; c++)
		if (c < w->nref && w->ref[c] >= w->rmax)
			return false;
	return true;
}

/*
 * One cluster, compressed by compress_chunk() into @z (@len bytes), or
 * stored plain (@len -ENOSPC: it did not fit in cluster_size - 1 bytes, QEMU's
 * rule), at guest offset @guest.
 */
static int write_compressed(struct qw *w, uint64_t guest, const uint8_t *buf, const uint8_t *z,
			    ssize_t len)
{
	uint64_t pos, last;
	int ret;

	if (len == -ENOSPC)
		return write_cluster(w, guest, buf, 0xffffffffull, NULL);
	if (len < 0)
		return (int)len;
	pos = w->cpos;
	if (!pos || (pos + (uint64_t)len > w->cend && w->cend != w->next << w->cbits) ||
	    !fits_refcounts(w, pos, (uint64_t)len)) {
		/* start a new run of clusters */
		pos = w->next << w->cbits;
		w->cend = pos;
	}
	while (pos + (uint64_t)len > w->cend) {
		/* extend the run: the next cluster is free and contiguous */
		ret = ref_grow(w, w->next + 1);
		if (ret < 0)
			return ret;
		w->ref[w->next++] = 0;
		w->cend += w->cs;
	}
	last = (pos + (uint64_t)len - 1) >> w->cbits;
	for (uint64_t c = pos >> w->cbits; c <= last; c++)
		w->ref[c]++;
	if (w->cend >= QCOW2_MAX_HOST_OFFSET)
		return -EFBIG;
	ret = qcow2_pwrite_full(w->fd, z, (size_t)len, pos);
	if (ret < 0)
		return ret;
	w->cpos = pos + (uint64_t)len;
	return l2_set(w, guest, qcow2_compressed_entry(pos, (uint64_t)len, w->cbits), 0);
}

struct zjob {
	struct qw *w;
	const uint8_t *buf; /* the chunk */
	uint64_t nclusters;
	unsigned t; /* this thread's index: clusters t, t + nz, ... */
};

static void *zjob_run(void *opaque)
{
	struct zjob *j = opaque;
	struct qw *w = j->w;

	for (uint64_t c = j->t; c < j->nclusters; c += w->nz)
		if (w->zlen[c])
			w->zlen[c] = qcow2_zdeflate(w->z[j->t], w->ctype, j->buf + c * w->cs, w->cs,
						    w->zout + c * w->cs, w->cs - 1);
	return NULL;
}

/*
 * Compress the clusters of a chunk whose w->zlen is non-zero, spread over
 * the threads (each cluster is independent; the placement stays sequential).
 */
static void compress_chunk(struct qw *w, const uint8_t *buf, uint64_t nclusters)
{
	struct zjob jobs[ZTHREADS];
	pthread_t tid[ZTHREADS];
	bool started[ZTHREADS] = {false};

	for (unsigned t = 0; t < w->nz; t++) {
		jobs[t] = (struct zjob){.w = w, .buf = buf, .nclusters = nclusters, .t = t};
		/* thread 0 is this one; a thread that cannot start is done here too */
		if (t && nclusters > 1)
			started[t] = pthread_create(&tid[t], NULL, zjob_run, &jobs[t]) == 0;
	}
	zjob_run(&jobs[0]);
	for (unsigned t = 1; t < w->nz; t++) {
		if (started[t])
			pthread_join(tid[t], NULL);
		else
			zjob_run(&jobs[t]);
	}
}

static void qw_free(struct qw *w)
{
	free(w->l1);
	free(w->l2);
	free(w->ref);
	free(w->rt);
	free(w->zout);
	free(w->zlen);
	for (unsigned t = 0; t < w->nz; t++)
		qcow2_zctx_free(w->z[t]);
}

/* Load the empty image create wrote: its geometry, L1 and refcounts. */
static int qw_open(struct qw *w, int fd, const char *path, bool compress, char *err, size_t errlen)
{
	struct qcow2_io io = qcow2_fd_io(fd);
	struct qcow2_oimg im;
	const struct qcow2_header_info *h;
	uint8_t *rb = NULL;
	uint64_t rb_entries;
	char e2[256] = "";
	int ret;

	memset(w, 0, sizeof(*w));
	w->fd = fd;
	w->path = path;
	ret = qcow2_oimg_open(&im, &io, path, true, e2, sizeof(e2));
	if (ret < 0) {
		qcow2_oimg_close(&im);
		return qcow2_seterr(err, errlen, ret, "reopening the new image: %s", e2);
	}
	h = &im.h;
	w->cs = h->cluster_size;
	w->cbits = h->cluster_bits;
	w->esz = h->l2_entry_size;
	w->l2n = h->l2_entries;
	w->extl2 = h->extended_l2;
	w->ctype = h->compression_type;
	w->rorder = h->refcount_order;
	w->rmax = qcow2_refcount_max(h->refcount_order);
	if (w->rmax > UINT32_MAX)
		w->rmax = UINT32_MAX;
	w->l1_off = h->l1_table_offset;
	w->l1_size = h->l1_size;
	w->rt_off = h->refcount_table_offset;
	w->rt_clusters = h->refcount_table_clusters;
	w->next = div_up(im.file_size, w->cs);
	w->l1 = calloc(w->l1_size ? w->l1_size : 1, sizeof(uint64_t));
	w->l2 = malloc(w->cs);
	w->rt = calloc(h->refcount_table_entries, sizeof(uint64_t));
	rb = malloc(w->cs);
	if (!w->l1 || !w->l2 || !w->rt || !rb || ref_grow(w, w->next) < 0) {
		ret = -ENOMEM;
		goto out;
	}
	if (compress) {
		long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

		w->nz = ncpu < 1 ? 1 : ncpu > ZTHREADS ? ZTHREADS : (unsigned)ncpu;
		for (unsigned t = 0; t < w->nz; t++)
			if (!(w->z[t] = qcow2_zctx_new())) {
				ret = -ENOMEM;
				goto out;
			}
		w->zout = malloc(CHUNK);
		w->zlen = calloc(CHUNK / w->cs, sizeof(ssize_t));
		if (!w->zout || !w->zlen) {
			ret = -ENOMEM;
			goto out;
		}
	}
	/* the refcounts create wrote (its own metadata clusters) */
	rb_entries = 1ull << h->refcount_block_bits;
	for (uint64_t i = 0; i < h->refcount_table_entries; i++) {
		uint64_t off = im.rt[i] & QCOW2_RTE_OFFSET_MASK;

		w->rt[i] = off;
		if (!off)
			continue;
		ret = qcow2_pread_full(fd, rb, w->cs, off);
		if (ret < 0)
			goto out;
		for (uint64_t j = 0; j < rb_entries && i * rb_entries + j < w->next; j++)
			w->ref[i * rb_entries + j] =
			    (uint32_t)qcow2_refcount_get(rb, j, h->refcount_order);
	}
	ret = 0;
out:
	free(rb);
	qcow2_oimg_close(&im);
	if (ret < 0)
		qcow2_seterr(err, errlen, ret, "reading the new image's metadata: %s",
			     strerror(-ret));
	return ret;
}

/* The refcount structure, then the header, then L1 (see the top of the file). */
static int qw_finish(struct qw *w, char *err, size_t errlen)
{
	uint64_t rb_entries = w->cs * 8 >> w->rorder;
	const uint64_t rt_cap0 = w->rt_clusters * w->cs / 8; /* create's table */
	uint64_t rt_cap = rt_cap0, rt_off = w->rt_off, rt_clusters = w->rt_clusters;
	uint64_t *rt = NULL, nblocks, prev = UINT64_MAX;
	uint8_t *buf = NULL;
	int ret;

	ret = l2_flush(w);
	if (ret < 0)
		goto fail;
	rt = calloc(rt_cap, sizeof(uint64_t));
	if (!rt) {
		ret = -ENOMEM;
		goto fail;
	}
	memcpy(rt, w->rt, rt_cap * sizeof(uint64_t));
	/* blocks for every cluster in use, including themselves and the table */
	while (prev != w->next) {
		prev = w->next;
		nblocks = div_up(w->next, rb_entries);
		if (nblocks > rt_cap) {
			uint64_t ncl = div_up(nblocks * 8, w->cs) + 1, *nrt, off;

			if (ncl * w->cs > QCOW2_MAX_REFTABLE_BYTES) {
				ret = -EFBIG;
				goto fail;
			}
			nrt = calloc(ncl * w->cs / 8, sizeof(uint64_t));
			if (!nrt) {
				ret = -ENOMEM;
				goto fail;
			}
			memcpy(nrt, rt, rt_cap * sizeof(uint64_t));
			free(rt);
			rt = nrt;
			/* the old table is no longer used */
			for (uint64_t c = 0; c < rt_clusters; c++)
				w->ref[(rt_off >> w->cbits) + c] = 0;
			rt_off = w->next << w->cbits;
			for (uint64_t c = 0; c < ncl; c++) {
				ret = alloc_cluster(w, &off);
				if (ret < 0)
					goto fail;
			}
			rt_clusters = ncl;
			rt_cap = ncl * w->cs / 8;
		}
		for (uint64_t i = 0; i < nblocks && i < rt_cap; i++) {
			if (!rt[i]) {
				ret = alloc_cluster(w, &rt[i]);
				if (ret < 0)
					goto fail;
			}
		}
	}
	buf = malloc(w->cs);
	if (!buf) {
		ret = -ENOMEM;
		goto fail;
	}
	nblocks = div_up(w->next, rb_entries);
	for (uint64_t i = 0; i < nblocks; i++) {
		memset(buf, 0, w->cs);
		for (uint64_t j = 0; j < rb_entries && i * rb_entries + j < w->next; j++)
			qcow2_refcount_set(buf, j, w->rorder, w->ref[i * rb_entries + j]);
		/* a block create wrote is rewritten whole: it held other values */
		ret = i < rt_cap0 && w->rt[i] ? qcow2_pwrite_full(w->fd, buf, w->cs, rt[i])
					      : write_meta(w->fd, buf, w->cs, rt[i]);
		if (ret < 0)
			goto fail;
	}
	for (uint64_t c = 0; c < rt_clusters; c++) {
		for (uint64_t j = 0; j < w->cs / 8; j++)
			qcow2_put_be64(buf + j * 8, rt[c * w->cs / 8 + j]);
		ret = qcow2_pwrite_full(w->fd, buf, w->cs, rt_off + c * w->cs);
		if (ret < 0)
			goto fail;
	}
	/* the file ends with its last cluster in use (compressed runs may end early) */
	if (ftruncate(w->fd, (off_t)(w->next << w->cbits)) < 0 || fdatasync(w->fd) < 0) {
		ret = -errno;
		goto fail;
	}
	if (rt_off != w->rt_off) {
		uint8_t hb[12];

		qcow2_put_be64(hb, rt_off);
		qcow2_put_be32(hb + 8, (uint32_t)rt_clusters);
		ret = qcow2_pwrite_full(w->fd, hb, sizeof(hb),
					offsetof(struct qcow2_header_disk, refcount_table_offset));
		if (ret < 0)
			goto fail;
		if (fdatasync(w->fd) < 0) {
			ret = -errno;
			goto fail;
		}
	}
	for (uint32_t i = 0; i < w->l1_size; i++)
		qcow2_put_be64(&w->l1[i], w->l1[i]);
	ret = qcow2_pwrite_full(w->fd, w->l1, (size_t)w->l1_size * 8, w->l1_off);
	if (ret < 0)
		goto fail;
	if (fdatasync(w->fd) < 0) {
		ret = -errno;
		goto fail;
	}
	free(rt);
	free(buf);
	return 0;
fail:
	free(rt);
	free(buf);
	return qcow2_seterr(err, errlen, ret, "'%s': writing the image failed: %s", w->path,
			    ret == -EFBIG ? "the image grew too large" : strerror(-ret));
}

static bool all_zero(const uint8_t *p, size_t n)
{
	static const uint8_t z[256];

	while (n >= sizeof(z)) {
		if (memcmp(p, z, sizeof(z)))
			return false;
		p += sizeof(z);
		n -= sizeof(z);
	}
	return !n || !memcmp(p, z, n);
}

/*
 * Zero detection as qemu-img convert does it (so that both tools leave the
 * same holes): the run of sectors at @buf that are all zero or all data,
 * with data runs ending on a 4 KiB boundary rounded up and zero runs rounded
 * down (a short zero tail is data: the next data run rewrites it anyway).
 * Returns true for data; *@pnum sectors.
 */
static bool sector_run(const uint8_t *buf, uint64_t n, uint64_t *pnum, uint64_t sector)
{
	bool is_zero = all_zero(buf, 512);
	uint64_t i, tail;

	for (i = 1; i < n; i++)
		if (is_zero != all_zero(buf + i * 512, 512))
			break;
	if (i == n) {
		*pnum = i;
		return !is_zero;
	}
	tail = (sector + i) & 7;
	if (tail) {
		if (is_zero && i <= tail)
			is_zero = false;
		if (!is_zero) {
			i += 8 - tail;
			if (i > n)
				i = n;
		} else {
			i -= tail;
		}
	}
	*pnum = i;
	return !is_zero;
}

/*
 * Mark in @wmask the sectors of [@sector, @sector + @n) (data read into @buf)
 * that must be written: zero runs of at least @min sectors are holes, shorter
 * ones are written (qemu-img's is_allocated_sectors_min, applied until @n is
 * used up).
 */
static void mark_data(const uint8_t *buf, uint64_t n, uint64_t sector, uint64_t min, uint8_t *wmask)
{
	while (n) {
		uint64_t pnum, used, checked;

		if (n < min)
			min = n;
		if (!sector_run(buf, n, &pnum, sector)) {
			/* a zero run first: a hole, whatever its length */
			buf += pnum * 512;
			sector += pnum;
			wmask += pnum;
			n -= pnum;
			continue;
		}
		used = checked = pnum;
		while (checked < n) {
			bool data =
			    sector_run(buf + checked * 512, n - checked, &pnum, sector + checked);

			checked += pnum;
			if (data)
				used = checked;
			else if (pnum >= min)
				break;
		}
		memset(wmask, 1, used);
		buf += used * 512;
		sector += used;
		wmask += used;
		n -= used;
	}
}

/* The sectors of @wmask (in [off, off + n)) into a raw file, in runs. */
static int write_raw(int fd, uint64_t off, uint64_t n, const uint8_t *buf, const uint8_t *wmask)
{
	uint64_t ns = n / 512;

	for (uint64_t i = 0; i < ns;) {
		uint64_t e = i;
		int ret;

		if (!wmask[i]) {
			i++;
			continue;
		}
		while (e < ns && wmask[e])
			e++;
		ret = qcow2_pwrite_full(fd, buf + i * 512, (e - i) * 512, off + i * 512);
		if (ret < 0)
			return ret;
		i = e;
	}
	return 0;
}

/*
 * Every cluster of [off, off + n) with a sector to write: a data cluster
 * (extended L2: only the subclusters holding such sectors are allocated; the
 * others read as zeroes, which they are), or with -c the whole cluster
 * compressed unless it is all zeroes (qemu-img's rule for -c).
 */
static int write_qcow2(struct qw *w, const struct qcow2_convert_opts *o, uint64_t off, uint64_t n,
		       uint8_t *buf, const uint8_t *wmask)
{
	uint64_t spc = w->cs / 512; /* sectors per cluster */
	uint64_t sps = w->extl2 ? spc / 32 : spc;
	uint64_t nc = (n + w->cs - 1) / w->cs;
	int ret;

	/* -c: which clusters to write (not all zeroes), compressed in parallel first */
	if (o->compress) {
		for (uint64_t c = 0; c < nc; c++) {
			uint64_t len = n - c * w->cs < w->cs ? n - c * w->cs : w->cs;
			uint8_t *p = buf + c * w->cs;
			bool any = false;

			for (uint64_t s = 0; s < len / 512 && !any; s++)
				any = wmask[c * spc + s];
			if (any && len < w->cs) /* the last, partial cluster */
				memset(p + len, 0, w->cs - len);
			w->zlen[c] = any && !all_zero(p, w->cs) ? 1 : 0;
		}
		compress_chunk(w, buf, nc);
		for (uint64_t c = 0; c < nc; c++) {
			if (!w->zlen[c])
				continue;
			ret = write_compressed(w, off + c * w->cs, buf + c * w->cs,
					       w->zout + c * w->cs, w->zlen[c]);
			if (ret < 0)
				return ret;
		}
		return 0;
	}
	for (uint64_t c = 0; c < nc; c++) {
		uint64_t len = n - c * w->cs < w->cs ? n - c * w->cs : w->cs, bm = 0;
		uint8_t *p = buf + c * w->cs;
		const uint8_t *m = wmask + c * spc;

		for (uint64_t s = 0; s < len / 512; s++)
			if (m[s])
				bm |= 1ull << (s / sps);
		if (!bm)
			continue;
		if (len < w->cs) /* the last, partial cluster */
			memset(p + len, 0, w->cs - len);
		ret =
		    write_cluster(w, off + c * w->cs, p, w->extl2 ? bm : 0, len < w->cs ? NULL : m);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* The destination: created (or truncated, under its lock) and locked for writing. */
static int open_dst(const struct qcow2_convert_opts *o, uint64_t size, struct qcow2_locks *lk,
		    bool *locked, int *fdp, char *err, size_t errlen)
{
	struct stat st;
	int ret, fd;

	*locked = false;
	*fdp = -1;
	if (stat(o->dst, &st) == 0) {
		if (!S_ISREG(st.st_mode))
			return qcow2_seterr(err, errlen, -ENOTSUP,
					    "'%s': the destination must be a regular file", o->dst);
		/* qemu-img refuses an image another process uses: take its lock first */
		ret = qcow2_lock_image(lk, o->dst, "raw", QCOW2_LOCK_WRITE, false, err, errlen);
		if (ret < 0)
			return ret;
		*locked = true;
	}
	if (!strcmp(o->dst_fmt, "qcow2")) {
		struct qcow2_create_opts co = o->create;

		co.size = size;
		co.size_set = true;
		co.overwrite = true;
		ret = qcow2_create(o->dst, &co, NULL, err, errlen);
		if (ret < 0)
			return ret;
		fd = open(o->dst, O_RDWR | O_CLOEXEC);
	} else {
		fd = open(o->dst, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd >= 0 && ftruncate(fd, (off_t)size) < 0) {
			ret = -errno;
			close(fd);
			return qcow2_seterr(err, errlen, ret, "'%s': cannot set the size: %s",
					    o->dst, strerror(-ret));
		}
	}
	if (fd < 0) {
		ret = -errno;
		return qcow2_seterr(err, errlen, ret, "'%s': cannot open: %s", o->dst,
				    strerror(-ret));
	}
	*fdp = fd;
	if (!*locked) {
		ret = qcow2_lock_image(lk, o->dst, "raw", QCOW2_LOCK_WRITE, false, err, errlen);
		if (ret < 0)
			return ret;
		*locked = true;
	}
	return 0;
}

static int check_opts(const struct qcow2_convert_opts *o, char *err, size_t errlen)
{
	if (strcmp(o->dst_fmt, "qcow2") && strcmp(o->dst_fmt, "raw"))
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "Unknown or unsupported output format '%s' (qcow2 or raw)",
				    o->dst_fmt);
	if (!strcmp(o->dst_fmt, "raw") && o->compress)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "Compression not supported for this file format");
	if (o->compress && !qcow2_compression_supported(o->create.compression_type))
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "compression type zstd is not supported by this build");
	if (o->create.backing_file || o->create.backing_fmt)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "convert writes a standalone image: no backing_file or "
				    "backing_fmt option");
	if (o->create.prealloc != QCOW2_PREALLOC_OFF)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "convert supports preallocation=off only");
	if (o->min_sparse % 512)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "Invalid buffer size for sparse output specified (a multiple "
				    "of 512)");
	return 0;
}

/* Same file as a source file? (a raw image converted onto itself would be lost) */
static int same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	if (stat(a, &sa) || stat(b, &sb))
		return 0;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int qcow2_convert(const struct qcow2_convert_opts *o, const struct qcow2_tool_cb *cb, char *err,
		  size_t errlen)
{
	struct qcow2_reader *r = NULL;
	struct qcow2_locks lk = {0};
	struct qw w;
	bool qcow2 = !strcmp(o->dst_fmt, "qcow2"), locked = false, w_open = false;
	uint64_t size, off, align, min_sec = o->min_sparse / 512;
	uint8_t *buf = NULL, *wmask = NULL;
	int fd = -1, ret;

	if (err && errlen)
		err[0] = 0;
	memset(&w, 0, sizeof(w));
	ret = check_opts(o, err, errlen);
	if (ret < 0)
		return ret;
	if (same_file(o->src, o->dst))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "'%s': source and destination are the same file", o->dst);
	ret = qcow2_reader_open(&r, o->src, o->src_fmt, o->snapshot, err, errlen);
	if (ret < 0)
		return ret;
	size = qcow2_reader_size(r);
	ret = open_dst(o, size, &lk, &locked, &fd, err, errlen);
	if (ret < 0)
		goto out;
	if (qcow2) {
		ret = qw_open(&w, fd, o->dst, o->compress, err, errlen);
		w_open = true;
		if (ret < 0)
			goto out;
	}
	buf = malloc(CHUNK);
	wmask = malloc(CHUNK / 512);
	if (!buf || !wmask) {
		ret = -ENOMEM;
		goto out;
	}
	/* zero runs are cut at this alignment (qemu-img: -S rounded down to a power of 2) */
	align = 1;
	while (align * 2 <= min_sec)
		align *= 2;
	for (off = 0; off < size;) {
		uint64_t n = size - off < CHUNK ? size - off : CHUNK, pos;

		/* which sectors to write: data in the chain, zero runs detected */
		memset(wmask, 0, n / 512);
		for (pos = off; pos < off + n;) {
			uint64_t pnum, end;
			bool zero;

			ret = qcow2_reader_status(r, pos, off + n - pos, &pnum, &zero, err, errlen);
			if (ret < 0)
				goto out;
			if ((pos + pnum) & 511) {
				/* a raw file ending inside a sector: the sector is data */
				pnum = ((pos + pnum + 511) & ~511ull) - pos;
				zero = false;
			}
			end = (pos + pnum) / 512 / align * align * 512;
			if (end > pos)
				pnum = end - pos;
			if (zero && o->min_sparse) {
				memset(buf + (pos - off), 0, pnum);
			} else {
				ret =
				    qcow2_reader_read(r, pos, pnum, buf + (pos - off), err, errlen);
				if (ret < 0)
					goto out;
				if (!o->min_sparse || o->compress)
					memset(wmask + (pos - off) / 512, 1, pnum / 512);
				else
					mark_data(buf + (pos - off), pnum / 512, pos / 512, min_sec,
						  wmask + (pos - off) / 512);
			}
			pos += pnum;
		}
		ret = qcow2 ? write_qcow2(&w, o, off, n, buf, wmask)
			    : write_raw(fd, off, n, buf, wmask);
		if (ret < 0) {
			qcow2_seterr(err, errlen, ret, "'%s': write failed: %s", o->dst,
				     strerror(-ret));
			goto out;
		}
		off += n;
		if (cb && cb->progress)
			cb->progress(cb->opaque, (double)off / (double)size);
	}
	if (qcow2) {
		ret = qw_finish(&w, err, errlen);
	} else if (fdatasync(fd) < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, ret, "'%s': fdatasync failed: %s", o->dst,
			     strerror(-ret));
	}
out:
	if (w_open)
		qw_free(&w);
	free(buf);
	free(wmask);
	if (fd >= 0)
		close(fd);
	if (locked)
		qcow2_unlock_image(&lk);
	qcow2_reader_close(r);
	return ret;
}
