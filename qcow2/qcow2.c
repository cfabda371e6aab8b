/* SPDX-License-Identifier: MIT */
/*
 * qcow2/qcow2.c — engine open/close: builds the engine (tables, metadata
 * set, caches with their hooks, allocation frontier) and tears it down.
 *
 * Open (synchronous, open time only; the only synchronous I/O of the engine,
 * and it goes through io/'s io_file_*_sync): header + extensions
 * (qcow2fmt/format.c), a dirty image repaired first by the format's checker
 * over the engine's own file (qcow2fmt/check.c through struct qcow2_io), L1
 * table and refcount table (qcow2fmt's table reader), snapshot table (every
 * entry and its L1 table's placement), then the set of metadata clusters:
 * header, L1, refcount table, refcount blocks, active L2 tables, snapshot
 * table, snapshot L1 tables. Refcount blocks or L2 tables that land on other
 * metadata are remembered as bad; using them later is reported as corruption.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "image.h"
#include "internal.h"
#include "vlog.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void meta_sort(struct q2_u64v *m)
{
	size_t j = 0;

	qsort(m->v, m->n, sizeof(uint64_t), cmp_u64);
	for (size_t i = 0; i < m->n; i++)
		if (!j || m->v[j - 1] != m->v[i])
			m->v[j++] = m->v[i];
	m->n = j;
}

static int meta_push_range(struct q2_u64v *m, uint64_t off, uint64_t len, uint32_t cb)
{
	if (!len)
		return 0;
	for (uint64_t c = off >> cb; c <= (off + len - 1) >> cb; c++)
		if (q2_u64v_push(m, c) < 0)
			return -ENOMEM;
	return 0;
}

/* ---- the caches' hooks ---- */

static void l2_loaded(void *opaque, struct q2_slice *s)
{
	q2_l2_validate(opaque, s);
}

static void cache_wake(void *opaque, struct qcow2_waiter **list, int err)
{
	q2_wake_list_later(opaque, list, err);
}

static void cache_pressure(void *opaque)
{
	q2_wb_kick(opaque);
}

/* ---- open ---- */

/*
 * Read the snapshot table (the format's reader) and check each snapshot's
 * L1 table placement; add the table's clusters and the snapshot L1 tables
 * to @m.
 */
static int load_snapshots(struct qcow2 *q, struct q2_u64v *m, uint64_t fsize, char *err,
			  size_t errlen)
{
	const struct qcow2_header_info *h = &q->h;
	struct qcow2_io fio = q2_file_io(q->file);
	struct qcow2_snapshot_info *sn = NULL;
	uint8_t *buf = NULL;
	uint64_t used;
	char msg[300];
	int ret;

	ret = qcow2_snapshots_read(&fio, h, fsize, &buf, &used, &sn, msg, sizeof(msg));
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "%s: %s", q->path, msg);
	for (uint32_t i = 0; i < h->nb_snapshots && ret == 0; i++) {
		if (sn[i].l1_table_offset & (q->cs - 1) || !sn[i].l1_table_offset)
			ret = qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: snapshot %u: L1 table offset 0x%llx not cluster aligned", q->path,
			    i, (unsigned long long)sn[i].l1_table_offset);
		else if (sn[i].l1_size > QCOW2_MAX_L1_ENTRIES)
			ret = qcow2_seterr(err, errlen, -EINVAL,
					   "%s: snapshot %u: L1 size %u too large", q->path, i,
					   sn[i].l1_size);
		else if (sn[i].l1_table_offset > fsize ||
			 (uint64_t)sn[i].l1_size * 8 > fsize - sn[i].l1_table_offset)
			ret = qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: snapshot %u: L1 table extends past the end of the file", q->path,
			    i);
		else if (meta_push_range(m, sn[i].l1_table_offset, (uint64_t)sn[i].l1_size * 8,
					 q->cb) < 0)
			ret = -ENOMEM;
	}
	if (ret == 0)
		ret = meta_push_range(m, h->snapshots_offset, used, q->cb);
	free(buf);
	free(sn);
	return ret;
}

/* Highest cluster index with a non-zero refcount + 1 (0 if none), via sync reads. */
int q2_scan_highest_used(struct qcow2 *q, uint64_t *out)
{
	uint64_t per = 1ull << q->rb_bits;
	uint8_t *blk;
	int ret = 0;

	*out = 0;
	blk = io_alloc_aligned(q->cs);
	if (!blk)
		return -ENOMEM;
	for (uint64_t i = q->rt_entries; i-- > 0;) {
		uint64_t rb = q->rt[i] & QCOW2_RTE_OFFSET_MASK;

		if (!rb || (q->rt[i] & QCOW2_RTE_RESERVED_MASK) || (rb & (q->cs - 1)))
			continue;
		ret = io_file_pread_sync(q->file, blk, q->cs, rb);
		if (ret < 0)
			break;
		for (uint64_t j = per; j-- > 0;) {
			if (qcow2_refcount_get(blk, j, q->rc_order)) {
				*out = i * per + j + 1;
				goto done;
			}
		}
	}
done:
	io_free_aligned(blk);
	return ret;
}

static int build_meta(struct qcow2 *q, uint64_t fsize, char *err, size_t errlen)
{
	struct q2_u64v fixed = {0};
	int ret = -ENOMEM;

	/* header, L1, refcount table, snapshots */
	if (q2_u64v_push(&fixed, 0) < 0 ||
	    meta_push_range(&fixed, q->h.l1_table_offset, (uint64_t)q->l1_size * 8, q->cb) < 0 ||
	    meta_push_range(&fixed, q->rt_offset, (uint64_t)q->rt_clusters << q->cb, q->cb) < 0)
		goto out;
	ret = load_snapshots(q, &fixed, fsize, err, errlen);
	if (ret < 0)
		goto out;
	meta_sort(&fixed);
	/* refcount blocks that sit on other metadata are unusable */
	for (uint64_t i = 0; i < q->rt_entries; i++) {
		uint64_t rb = q->rt[i] & QCOW2_RTE_OFFSET_MASK;

		if (!rb || (rb & (q->cs - 1)) || (q->rt[i] & QCOW2_RTE_RESERVED_MASK))
			continue;
		if (q2_u64v_has(&fixed, rb >> q->cb)) {
			q->rt_bad[i / 8] |= (uint8_t)(1u << (i % 8));
			continue;
		}
		ret = q2_u64v_push(&q->meta, rb >> q->cb);
		if (ret < 0)
			goto out;
	}
	for (size_t i = 0; i < fixed.n; i++) {
		ret = q2_u64v_push(&q->meta, fixed.v[i]);
		if (ret < 0)
			goto out;
	}
	meta_sort(&q->meta);
	/* active L2 tables on other metadata are bad (reported when used) */
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t l2 = q->l1[i] & QCOW2_L1E_OFFSET_MASK;

		if (!l2 || (l2 & (q->cs - 1)))
			continue;
		if (q2_u64v_has(&q->meta, l2 >> q->cb))
			q->l1_bad[i / 8] |= (uint8_t)(1u << (i % 8));
	}
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t l2 = q->l1[i] & QCOW2_L1E_OFFSET_MASK;

		if (!l2 || (q->l1[i] & QCOW2_L1E_RESERVED_MASK) || (l2 & (q->cs - 1)) ||
		    (q->l1_bad[i / 8] & (1u << (i % 8))))
			continue;
		ret = q2_u64v_push(&q->meta, l2 >> q->cb);
		if (ret < 0)
			goto out;
	}
	meta_sort(&q->meta);
	ret = 0;
out:
	q2_u64v_free(&fixed);
	return ret;
}

/* Free the caches, tables and the engine itself (open failure and close). */
static void free_engine(struct qcow2 *q)
{
	q2_bitmap_exit(q);
	q2_cache_exit(&q->l2c);
	q2_cache_exit(&q->rcc);
	free(q->l1);
	free(q->rt);
	free(q->l1_dirty);
	free(q->rt_dirty);
	free(q->l1_bad);
	free(q->rt_bad);
	q2_u64v_free(&q->meta);
	free(q->path);
	free(q);
}

/* The refcount cache for an L2 cache of @l2_bytes: a quarter of it, 256 KiB..32 MiB. */
static uint64_t rc_default(const struct qcow2 *q, uint64_t l2_bytes)
{
	uint64_t rc = l2_bytes / 4;

	if (rc > (32ull << 20))
		rc = 32ull << 20;
	if (rc < (256u << 10))
		rc = 256u << 10;
	return rc < 16ull * q->slice_size ? 16ull * q->slice_size : rc;
}

/*
 * By default the L2 cache covers the whole disk's L2 tables, up to 256 MiB
 * (entries are allocated on demand: small images stay small), and the
 * refcount cache is rc_default()'s; an online grow raises both
 * (qcow2/resize.c set_size), as if the image had been opened at its new size.
 */
void q2_cache_defaults(const struct qcow2 *q, uint64_t size, uint64_t *l2_bytes, uint64_t *rc_bytes)
{
	uint64_t clusters = (size + q->cs - 1) >> q->cb, l2 = clusters * q->l2e_size;

	if (l2 > (256ull << 20))
		l2 = 256ull << 20;
	if (l2 < 16ull * q->slice_size)
		l2 = 16ull * q->slice_size;
	*l2_bytes = l2;
	*rc_bytes = rc_default(q, l2);
}

int qcow2_open(struct qcow2 **qp, struct io_loop *loop, struct io_file *file, const char *path,
	       const struct qcow2_opts *opts, char *err, size_t errlen)
{
	struct qcow2_opts defaults = {0};
	struct qcow2_io fio = q2_file_io(file);
	struct qcow2 *q;
	uint8_t *hbuf = NULL;
	uint64_t fsize, hlen, l2_bytes, rc_bytes, used;
	char msg[256];
	bool repaired = false;
	int ret;

	if (err && errlen)
		err[0] = '\0';
	if (!opts)
		opts = &defaults;
	q = calloc(1, sizeof(*q));
	if (!q)
		return qcow2_seterr(err, errlen, -ENOMEM, "%s: out of memory", path);
	q->loop = loop;
	q->file = file;
	q->data_file = file;
	q->read_only = opts->read_only || (file->flags & IO_FILE_RDONLY);
	q->rw_open = !q->read_only;
	q->backing_size = UINT64_MAX;
	q->writeback_ms = opts->writeback_ms ? opts->writeback_ms : 5000;
	q->path = strdup(path);
	if (!q->path) {
		ret = -ENOMEM;
		goto fail;
	}

	ret = io_file_get_size(file, &fsize);
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: %s", path, strerror(-ret));
		goto fail;
	}
	file->size = fsize;
reread:
	hlen = fsize < QCOW2_MAX_CLUSTER_SIZE ? fsize : QCOW2_MAX_CLUSTER_SIZE;
	io_free_aligned(hbuf);
	hbuf = io_alloc_aligned(hlen ? hlen : 512);
	if (!hbuf) {
		ret = -ENOMEM;
		goto fail;
	}
	ret = io_file_pread_sync(file, hbuf, hlen, 0);
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: reading the header: %s", path, strerror(-ret));
		goto fail;
	}
	ret = qcow2_header_parse(hbuf, hlen, fsize, &q->h, msg, sizeof(msg));
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: %s", path, msg);
		goto fail;
	}
	if (q->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		if (!(opts->allow_corrupt_ro && q->read_only)) {
			ret = qcow2_seterr(
			    err, errlen, -EUCLEAN,
			    "%s: the image is marked corrupt (corrupt bit set); repair "
			    "it with 'vqcow-img check -r all %s' or open it read-only "
			    "allowing corrupt images",
			    path, path);
			goto fail;
		}
		q->corrupt = true;
	}
	if ((q->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) && !q->read_only) {
		/* lazy refcounts were not written back: rebuild them first */
		if (!repaired) {
			struct qcow2_check_result res;

			memset(&res, 0, sizeof(res));
			vlog(VLOG_WARN, path,
			     "dirty bit set (lazy refcounts): repairing refcounts as "
			     "'vqcow-img check -r all' does");
			ret = qcow2_check_io(&fio, path,
					     QCOW2_CHECK_FIX_LEAKS | QCOW2_CHECK_FIX_ERRORS, &res,
					     NULL, msg, sizeof(msg));
			if (ret == 0 && !res.check_errors && !res.corruptions) {
				repaired = true;
				ret = io_file_get_size(file, &fsize);
				if (ret < 0)
					goto fail;
				file->size = fsize;
				goto reread;
			}
			ret =
			    qcow2_seterr(err, errlen, ret < 0 ? ret : -EUCLEAN,
					 "%s: the image is dirty (dirty bit set) and the automatic "
					 "repair failed (%s); run 'vqcow-img check -r all %s'",
					 path, ret < 0 ? msg : "corruptions remain", path);
			goto fail;
		}
		ret = qcow2_seterr(err, errlen, -EUCLEAN,
				   "%s: the image is dirty (lazy refcounts were not written back; "
				   "dirty bit set): repair it with 'vqcow-img check -r all %s'",
				   path, path);
		goto fail;
	}
	if (q->h.compression_type == QCOW2_COMPRESSION_ZSTD) {
#ifndef VQCOW_HAVE_ZSTD
		ret =
		    qcow2_seterr(err, errlen, -ENOTSUP,
				 "%s: zstd compression type is not supported by this build", path);
		goto fail;
#endif
	}

	q->cb = q->h.cluster_bits;
	q->cs = 1ull << q->cb;
	q->extl2 = q->h.extended_l2;
	q->ext_data = (q->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) != 0;
	q->data_raw = q->ext_data && (q->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW);
	q->l2_bits = q->h.l2_bits;
	q->l2e_size = q->h.l2_entry_size;
	q->sc_bits = q->h.subcluster_bits;
	q->rc_order = q->h.refcount_order;
	q->rb_bits = q->h.refcount_block_bits;
	/* QEMU counts whole sectors of a qcow2 image: a partial last one is not there */
	q->size = q->h.size & ~511ull;
	q->l1_size = q->h.l1_size;

	q->no_early_link = opts->no_early_link;
	q->slice_size = opts->cache_entry_size ? opts->cache_entry_size : 4096;
	if (q->slice_size & (q->slice_size - 1) || q->slice_size < 512) {
		ret = qcow2_seterr(err, errlen, -EINVAL,
				   "%s: cache entry size %u must be a power of two >= 512", path,
				   q->slice_size);
		goto fail;
	}
	if (q->slice_size > q->cs)
		q->slice_size = (uint32_t)q->cs;
	{
		uint32_t lg = (uint32_t)__builtin_ctz(q->slice_size);

		q->sl2_bits = lg - (q->extl2 ? 4 : 3);
		q->src_bits = lg + 3 - q->rc_order;
	}

	ret = qcow2_read_table(&fio, q->h.l1_table_offset, q->l1_size, &q->l1);
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: reading the L1 table: %s", path,
			     strerror(-ret));
		goto fail;
	}
	q->rt_offset = q->h.refcount_table_offset;
	q->rt_clusters = q->h.refcount_table_clusters;
	q->rt_entries = q->h.refcount_table_entries;
	ret = qcow2_read_table(&fio, q->rt_offset, q->rt_entries, &q->rt);
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s: reading the refcount table: %s", path,
			     strerror(-ret));
		goto fail;
	}
	q->l1_dirty = calloc(((uint64_t)q->l1_size * 8 + 511) / 512 / 8 + 1, 1);
	q->rt_dirty = calloc(q->rt_entries * 8 / 512 / 8 + 1, 1);
	q->l1_bad = calloc(q->l1_size / 8 + 1, 1);
	q->rt_bad = calloc(q->rt_entries / 8 + 1, 1);
	if (!q->l1_dirty || !q->rt_dirty || !q->l1_bad || !q->rt_bad) {
		ret = -ENOMEM;
		goto fail;
	}
	q->rt_bad_n = q->rt_entries;
	ret = build_meta(q, fsize, err, errlen);
	if (ret < 0) {
		if (err && !err[0])
			qcow2_seterr(err, errlen, ret, "%s: %s", path, strerror(-ret));
		goto fail;
	}

	/* Caches: the options' sizes, or q2_cache_defaults' (which follow a grow). */
	q->l2c_auto = !opts->l2_cache_size;
	q->rcc_auto = !opts->refcount_cache_size && !opts->l2_cache_size; /* else l2's quarter */
	q2_cache_defaults(q, q->size, &l2_bytes, &rc_bytes);
	if (opts->l2_cache_size) {
		l2_bytes = opts->l2_cache_size;
		if (l2_bytes < 16ull * q->slice_size)
			l2_bytes = 16ull * q->slice_size;
		rc_bytes = rc_default(q, l2_bytes);
	}
	if (opts->refcount_cache_size) {
		rc_bytes = opts->refcount_cache_size;
		if (rc_bytes < 16ull * q->slice_size)
			rc_bytes = 16ull * q->slice_size;
	}
	{
		struct q2_cache_hooks hooks = {
		    .loop = q->loop,
		    .file = q->file,
		    .name = q->path,
		    .loaded = l2_loaded,
		    .wake = cache_wake,
		    .pressure = cache_pressure,
		    .opaque = q,
		};

		ret = q2_cache_init(&q->l2c, &hooks, Q2_CACHE_L2, q->slice_size,
				    l2_bytes / q->slice_size);
		hooks.loaded = NULL; /* refcount slices have no load-time check */
		if (ret == 0)
			ret = q2_cache_init(&q->rcc, &hooks, Q2_CACHE_RC, q->slice_size,
					    rc_bytes / q->slice_size);
	}
	if (ret < 0)
		goto fail;

	/* Allocation frontier */
	q->fresh_start = (fsize + q->cs - 1) >> q->cb;
	q->host_limit = QCOW2_MAX_HOST_OFFSET >> q->cb;
	if (file->flags & IO_FILE_BLOCKDEV) {
		q->host_limit = fsize >> q->cb;
		q->fresh_start = q->host_limit; /* device contents are unknown */
		q->no_prealloc = true;
		q->no_backing = true; /* a device has all its space */
	}
	if (!q->read_only) {
		ret = q2_scan_highest_used(q, &used);
		if (ret < 0) {
			qcow2_seterr(err, errlen, ret, "%s: reading refcount blocks: %s", path,
				     strerror(-ret));
			goto fail;
		}
		q->cursor = (file->flags & IO_FILE_BLOCKDEV) ? used : q->fresh_start;
		if (used > q->cursor)
			q->cursor = used;
	}
	q->prealloc_end = fsize;
	q->prealloc_ok = q->fresh_start << q->cb;

	/* A writer must clear the autoclear bits it does not maintain. */
	if (!q->read_only && q->h.version >= 3) {
		uint64_t keep = q->data_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0;

		ret = q2_bitmap_open(q, hbuf, hlen, err, errlen);
		if (ret < 0)
			goto fail;
		if (q->bms)
			keep |= QCOW2_AUTOCLEAR_BITMAPS;

		if (q->h.autoclear_features & ~keep) {
			uint8_t b[8];

			q->h.autoclear_features &= keep;
			qcow2_put_be64(b, q->h.autoclear_features);
			ret = io_file_pwrite_sync(file, b, 8, QCOW2_OFF_AUTOCLEAR);
			if (ret == 0)
				ret = io_file_sync(file);
			if (ret < 0) {
				qcow2_seterr(err, errlen, ret, "%s: updating the header: %s", path,
					     strerror(-ret));
				goto fail;
			}
		}
		ret = q2_bitmap_start(q, err, errlen);
		if (ret < 0)
			goto fail;
	} else if (q->h.version >= 3 && q2_bitmap_open(q, hbuf, hlen, err, errlen) < 0) {
		/* read-only: listed, never tracked nor written; only a warning if invalid */
		if (err && errlen)
			err[0] = '\0';
	}
	q->sc_bits = q->extl2 ? q->cb - 5 : q->cb;
	io_free_aligned(hbuf);
	/* Background reads of every L2 table when the cache holds them all (optional). */
	if (!opts->no_l2_prefetch && q2_l2_prefetch_start(q) < 0)
		Q2_LOG(q, WARN, "out of memory for the L2 prefetch: loading L2 slices on demand");
	q->zah_keep = opts->zah_keep;
	if (!q->read_only)
		q2_zah_start(q, opts->blkdev_zero_ahead);
	*qp = q;
	return 0;

fail:
	if (err && !err[0])
		qcow2_seterr(err, errlen, ret, "%s: %s", path, strerror(-ret));
	io_free_aligned(hbuf);
	free_engine(q);
	return ret;
}

static struct qcow2_freed *take_free(struct qcow2 *q);
static uint64_t give_back_tail(struct io_file *file, const char *path);

static int close_engine(struct qcow2 *q, struct qcow2_freed **freed)
{
	int ret, bret;

	if (!q)
		return 0;
	q2_l2_prefetch_stop(q);
	q2_zah_stop(q, true); /* waits for the zeroing's step in flight at most */
	q->punch_hold = freed != NULL;
	bret = q2_bitmap_store(q);
	if (!q->read_only)
		q2_resv_release(q);
	ret = q2_wb_close(q);
	if (!ret)
		ret = bret;
	q->closing = true;
	/* let a pending corrupt-bit header write, wake-ups and prefetch reads finish */
	while (q->corrupt_hdr_busy || q->wake_armed || q->prealloc_busy || q->punch_busy ||
	       q->zah_busy || q2_l2_prefetch_busy(q)) {
		if (io_loop_run_once(q->loop, true) < 0)
			break;
	}
	if (!q->zah_busy)
		q2_zah_close(q); /* (else its command is abandoned, as others are) */
	if (freed)
		*freed = take_free(q);
	q2_l2_prefetch_exit(q);
	q2_wb_exit(q);
	q2_mapping_exit(q);
	q2_compress_exit(q);
	q2_alloc_exit(q);
	free_engine(q);
	return ret;
}

int qcow2_close(struct qcow2 *q)
{
	/* A writer gives back the tail it preallocated and did not use
	 * (reserves of up to 64 MiB, alloc.c): nothing past the last cluster
	 * with a refcount is referenced, and the file ends where QEMU's would.
	 * Not a block device: it has no tail to cut (ftruncate fails there). */
	bool trim = q && !q->read_only && !q->corrupt && !(q->file->flags & IO_FILE_BLOCKDEV);
	struct io_file *file = q ? q->file : NULL;
	char *path = trim ? strdup(q->path) : NULL;
	int ret = close_engine(q, NULL);

	if (ret == 0 && path)
		give_back_tail(file, path);
	free(path);
	return ret;
}

int qcow2_close_free(struct qcow2 *q, struct qcow2_freed **freed)
{
	*freed = NULL;
	return close_engine(q, freed);
}

const struct qcow2_header_info *qcow2_header(const struct qcow2 *q)
{
	return &q->h;
}

uint64_t qcow2_size(const struct qcow2 *q)
{
	return q->size;
}

void qcow2_set_data_file(struct qcow2 *q, struct io_file *data_file)
{
	q->data_file = data_file ? data_file : q->file;
}

void qcow2_set_fills_whole(struct qcow2 *q, bool on)
{
	q->fills_whole = on;
}

void qcow2_set_backing_size(struct qcow2 *q, uint64_t size)
{
	q->backing_size = size;
}

void qcow2_cache_stats(const struct qcow2 *q, struct qcow2_cache_stats *st)
{
	st->entry_size = q->slice_size;
	st->l2_max = q->l2c.soft_max;
	st->l2_used = q->l2c.count;
	st->l2_hits = q->l2c.hits;
	st->l2_misses = q->l2c.misses;
	st->l2_evictions = q->l2c.evictions;
	st->rc_max = q->rcc.soft_max;
	st->rc_used = q->rcc.count;
	st->rc_hits = q->rcc.hits;
	st->rc_misses = q->rcc.misses;
	st->rc_evictions = q->rcc.evictions;
	st->l2_prefetched = q->n_l2_prefetched;
	st->clusters_alloc = q->n_alloc;
	st->cow = q->n_data_cow;
	st->l2_cow = q->n_cow;
	st->l2_new = q->n_l2_new;
	st->rb_new = q->n_rb_new;
	st->meta_writes = q->n_meta_writes;
	st->meta_write_bytes = q->n_meta_bytes;
	st->wb_batches = q->batches;
	st->wb_side_batches = q->n_side_batches;
	st->wb_syncs = q->n_syncs;
	st->link_waits = q->n_link_waits;
	st->link_wait_syncs = q->n_link_wait_syncs;
	st->link_wait_us = q->n_link_wait_ns / 1000;
	st->link_wait_syncs_max = q->n_link_wait_max;
	st->early_new = q->n_early_new;
	st->early_new_ahead = q->n_early_new_ahead;
	st->wb_tail_starts = q->n_tail_starts;
	st->pc_written = io_file_pc_written(q->file) ||
			 (q->data_file != q->file && io_file_pc_written(q->data_file));
}

void qcow2_describe(const struct qcow2 *q, char *buf, size_t len)
{
	uint64_t l2h = q->l2c.hits, l2m = q->l2c.misses;

	snprintf(buf, len,
		 "qcow2 v%u %s, %llu bytes, cluster %llu%s, refcount %u bits, L2 cache %zu/%zu "
		 "slices of %u (hit %llu miss %llu prefetched %llu), refcount cache %zu/%zu%s%s",
		 q->h.version, q->path, (unsigned long long)q->size, (unsigned long long)q->cs,
		 q->extl2 ? " (extended L2)" : "", 1u << q->rc_order, q->l2c.count, q->l2c.soft_max,
		 q->slice_size, (unsigned long long)l2h, (unsigned long long)l2m,
		 (unsigned long long)q->n_l2_prefetched, q->rcc.count, q->rcc.soft_max,
		 q->read_only ? ", read-only" : "", q->corrupt ? ", CORRUPT" : "");
}

/*
 * Around an edit of the closed image (internal snapshot, bitmap): give back
 * the tail the engine preallocated and did not use. Each such command closes
 * and reopens the engine; the edit appends its new clusters at the end of the
 * file and the reopened engine allocates past that, so without this the file
 * grew by a preallocation chunk per command. Nothing past the last cluster
 * with a refcount is referenced. Then re-read the size.
 */
static uint64_t give_back_tail(struct io_file *file, const char *path)
{
	struct qcow2_io fio = q2_file_io(file);
	uint64_t end = 0, size = 0;
	char msg[300] = "";
	int ret;

	if (qcow2_used_end_io(&fio, path, &end, msg, sizeof(msg)) < 0)
		end = 0;
	/* a block device has no tail to give back (ftruncate fails there) */
	if (end && !(file->flags & IO_FILE_BLOCKDEV) && io_file_get_size(file, &size) == 0 &&
	    size > end && (ret = io_file_truncate(file, end)) < 0)
		vlog(VLOG_WARN, path, "giving back the unused tail: %s", strerror(-ret));
	if (io_file_get_size(file, &file->size) < 0)
		file->size = 0; /* re-read at the next open anyway */
	return end;             /* 0: unknown */
}

/* The runs of clusters a delete freed, for the reopened engine. */
struct qcow2_freed {
	unsigned cb;
	size_t n, cap;
	uint64_t *run; /* pairs: first cluster, count */
};

/* qcow2_snapshot_delete_io's punch hook: note the run (the engine punches it later). */
static void note_freed(void *opaque, uint64_t off, uint64_t len)
{
	struct qcow2_freed *f = opaque;

	if (f->n == f->cap) {
		size_t cap = f->cap ? 2 * f->cap : 64;
		uint64_t *p = realloc(f->run, cap * 2 * sizeof(*p));

		if (!p)
			return; /* not punched, not reused: refcount 0, no harm */
		f->run = p;
		f->cap = cap;
	}
	f->run[2 * f->n] = off >> f->cb;
	f->run[2 * f->n + 1] = len >> f->cb;
	f->n++;
}

int qcow2_snapshot_file(struct io_file *file, const char *path, char op, struct qcow2_snap_desc *sn,
			const char *id, const char *name, struct qcow2_freed **freed, char *err,
			size_t errlen)
{
	struct qcow2_io fio = q2_file_io(file);
	struct qcow2_snap_punch punch = {note_freed, NULL};
	struct qcow2_freed *f = *freed;
	uint64_t end;
	char msg[300] = "";
	int ret;

	*freed = NULL;
	end = give_back_tail(file, path);
	if (f) {
		/* carried from the closed engine: keep what lies below the end of
		 * what is in use (the edit allocates only past it) */
		size_t k = 0;

		for (size_t i = 0; i < f->n; i++) {
			uint64_t c = f->run[2 * i], n = f->run[2 * i + 1], e = end >> f->cb;

			if (c >= e)
				continue;
			f->run[2 * k] = c;
			f->run[2 * k + 1] = c + n > e ? e - c : n;
			k++;
		}
		f->n = k;
	}
	if (op == 'c') {
		ret = qcow2_snapshot_create_io(&fio, path, sn, QCOW2_SNAP_UNIQUE_NAME, msg,
					       sizeof(msg));
	} else {
		/*
		 * The freed clusters are not punched here, while the guest's
		 * requests wait: the reopened engine punches them in the
		 * background and reuses them (qcow2_adopt_freed).
		 */
		if (!f)
			f = calloc(1, sizeof(*f));
		if (f && !f->cb) {
			uint8_t b[4];

			/* cluster_bits, read back by the delete anyway */
			if (fio.read(fio.opaque, b, 4, 20) == 0 && qcow2_be32(b) >= 9 &&
			    qcow2_be32(b) <= 21)
				f->cb = qcow2_be32(b);
		}
		if (f)
			punch.opaque = f;
		ret = qcow2_snapshot_delete_io(&fio, path, id, name, sn, f && f->cb ? &punch : NULL,
					       msg, sizeof(msg));
	}
	if (ret < 0)
		qcow2_seterr(err, errlen, ret, "%s", msg[0] ? msg : strerror(-ret));
	/* failed too: a create writes its L1 copy and table past the end of
	 * what is in use before anything names them (their refcounts 0 again
	 * once it undid its raises); the cut follows the refcounts on disk */
	give_back_tail(file, path);
	if (f && f->n) {
		*freed = f;
		f = NULL;
	}
	qcow2_adopt_freed(NULL, f);
	return ret;
}

/* The free clusters below the cursor, punched or not, for the next engine. */
static struct qcow2_freed *take_free(struct qcow2 *q)
{
	struct q2_u64v v = {0};
	struct qcow2_freed *f = NULL;

	if (q2_alloc_take_free(q, &v) < 0 || !v.n)
		goto out;
	f = calloc(1, sizeof(*f));
	if (!f)
		goto out;
	f->cb = q->cb;
	for (size_t i = 0; i < v.n; i++) {
		if (f->n && f->run[2 * (f->n - 1)] + f->run[2 * (f->n - 1) + 1] == v.v[i])
			f->run[2 * (f->n - 1) + 1]++;
		else
			note_freed(f, v.v[i] << q->cb, q->cs);
	}
out:
	q2_u64v_free(&v);
	return f;
}

void qcow2_adopt_freed(struct qcow2 *q, struct qcow2_freed *f)
{
	uint64_t total = 0;

	if (!f)
		return;
	for (size_t i = 0; q && i < f->n; i++) {
		if (f->cb == q->cb)
			total += q2_alloc_adopt(q, f->run[2 * i], f->run[2 * i + 1]);
	}
	if (q)
		Q2_LOG(q, DEBUG,
		       "%llu clusters freed while closed (%zu runs): punched, then reused",
		       (unsigned long long)total, f->n);
	free(f->run);
	free(f);
}

int qcow2_bitmap_file(struct io_file *file, const char *path, char op, const char *name,
		      uint32_t granularity, bool disabled, char *err, size_t errlen)
{
	struct qcow2_io fio = q2_file_io(file);
	char msg[300] = "";
	int ret;

	give_back_tail(file, path);
	ret = qcow2_bitmap_edit_io(&fio, path, op, name, granularity, disabled, msg, sizeof(msg));
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s", msg[0] ? msg : strerror(-ret));
		return ret;
	}
	give_back_tail(file, path);
	return ret;
}

int qcow2_bitmap_merge_file(struct io_file *file, const char *path, const char *name,
			    const uint8_t *bits, uint64_t nbytes, char *err, size_t errlen)
{
	struct qcow2_io fio = q2_file_io(file);
	char msg[300] = "";
	int ret;

	give_back_tail(file, path);
	ret = qcow2_bitmap_merge_io(&fio, path, name, bits, nbytes, msg, sizeof(msg));
	if (ret < 0) {
		qcow2_seterr(err, errlen, ret, "%s", msg[0] ? msg : strerror(-ret));
		return ret;
	}
	give_back_tail(file, path);
	return ret;
}

int qcow2_snapshot_list(struct qcow2 *q, struct qcow2_snap_desc **out, uint32_t *n)
{
	struct qcow2_io fio = q2_file_io(q->file);
	char msg[300];

	return qcow2_snapshot_list_io(&fio, q->path, out, n, msg, sizeof(msg));
}
