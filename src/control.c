/* SPDX-License-Identifier: MIT */
/*
 * The QMP commands of vqcowd (control.h), with QEMU's names, arguments and
 * result shapes (qapi/block-core.json, qapi/block-export.json, qapi/misc.json)
 * wherever the meaning is the same.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blk.h"
#include "control.h"
#include "img.h"
#include "layers.h"
#include "util.h"
#include "vlog.h"

/* the longest dirty bitmap name QEMU accepts (BDRV_BITMAP_MAX_NAME_SIZE) */
#define BM_NAME_MAX 1023u

#define JOB_DEV                                                                                    \
	{                                                                                          \
		"device", QMP_STR, false                                                           \
	}

static int find_node(struct ctl *c, json_t *args, char *err, size_t errlen)
{
	json_t *n = json_object_get(args, "node-name");
	json_t *dev = json_object_get(args, "device");
	const char *name = n ? json_string_value(n) : dev ? json_string_value(dev) : NULL;

	if (name && strcmp(name, c->node_name) == 0)
		return 0;
	snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'",
		 dev ? json_string_value(dev) : "", n ? json_string_value(n) : "");
	return -ENOENT;
}

static int cmd_version(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;

	*ret = json_deep_copy(c->version);
	return *ret ? 0 : -ENOMEM;
}

static int cmd_exports(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;

	*ret = json_pack("[{s:s,s:s,s:s,s:b}]", "id", "export0", "type", "vhost-user-blk",
			 "node-name", c->node_name, "shutting-down", *c->stopping);
	return *ret ? 0 : -ENOMEM;
}

/* QEMU's SnapshotInfo. */
static json_t *snap_info(const struct img_snapshot *sn)
{
	json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:I,s:I,s:I}", "id", sn->id, "name", sn->name,
			      "vm-state-size", (json_int_t)sn->vm_state_size, "date-sec",
			      (json_int_t)sn->date_sec, "date-nsec", (json_int_t)sn->date_nsec,
			      "vm-clock-sec", (json_int_t)(sn->vm_clock_nsec / 1000000000ull),
			      "vm-clock-nsec", (json_int_t)(sn->vm_clock_nsec % 1000000000ull));

	if (o && sn->icount != -1)
		json_object_set_new(o, "icount", json_integer(sn->icount));
	return o;
}

/* ImageInfo of @img and, nested as backing-image, of its chain. */
static json_t *image_info(struct img *img)
{
	struct img *b = img_backing(img);
	const struct img_snapshot *sn;
	unsigned n;
	json_t *o =
	    json_pack("{s:s,s:s,s:I,s:b}", "filename", img->path, "format", img->ops->format,
		      "virtual-size", (json_int_t)img->size, "dirty-flag", 0);

	if (o && img_snapshot_list(img, &sn, &n) == 0 && n) {
		json_t *arr = json_array();

		/* QEMU's "snapshots": a list of SnapshotInfo, only when there are some. */
		for (unsigned i = 0; arr && i < n; i++)
			json_array_append_new(arr, snap_info(&sn[i]));
		json_object_set_new(o, "snapshots", arr);
	}
	if (o && b) {
		json_object_set_new(o, "backing-filename", json_string(b->path));
		json_object_set_new(o, "backing-filename-format", json_string(b->ops->format));
		json_object_set_new(o, "backing-image", image_info(b));
	}
	return o;
}

/* QEMU's "dirty-bitmaps" (BlockDirtyInfo list), only when the node has bitmaps. */
static void add_bitmaps(json_t *o, struct img *img)
{
	struct img_bitmap *bm;
	json_t *a;
	int n = img_bitmaps(img, NULL, 0);

	if (n <= 0)
		return;
	bm = calloc((size_t)n, sizeof(*bm));
	a = json_array();
	if (!bm || !a || img_bitmaps(img, bm, (unsigned)n) != n) {
		free(bm);
		json_decref(a);
		return;
	}
	for (int i = 0; i < n; i++) {
		json_t *e = json_pack("{s:s,s:b,s:b,s:b,s:I,s:I}", "name", bm[i].name, "recording",
				      bm[i].recording, "persistent", bm[i].persistent, "busy", 0,
				      "granularity", (json_int_t)bm[i].granularity, "count",
				      (json_int_t)bm[i].count);

		if (e && bm[i].inconsistent)
			json_object_set_new(e, "inconsistent", json_true());
		json_array_append_new(a, e);
	}
	json_object_set_new(o, "dirty-bitmaps", a);
	free(bm);
}

/* The reads of compressed bytes and the reads that joined one in flight, into @o (if not NULL). */
static void add_zc_reads(json_t *o, const struct img_cache_stats *cs)
{
	if (!o)
		return;
	json_object_set_new(o, "compressed-reads", json_integer((json_int_t)cs->compressed_reads));
	json_object_set_new(o, "compressed-read-joins",
			    json_integer((json_int_t)cs->compressed_joins));
}

/* BlockDeviceInfo of one node. */
static json_t *node_info(struct ctl *c, struct img *img, const char *name, unsigned depth)
{
	struct img_cache_stats cs;
	unsigned bdepth = 0;
	json_t *o;

	for (struct img *b = img_backing(img); b; b = img_backing(b))
		bdepth++;
	o = json_pack("{s:s,s:s,s:b,s:s,s:i,s:b,s:s,s:{s:b,s:b,s:b},s:o,"
		      "s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
		      "file", img->path, "node-name", name, "ro", img->read_only, "drv",
		      img->ops->format, "backing_file_depth", bdepth, "encrypted", 0,
		      "detect_zeroes", "off", "cache", "writeback",
		      depth == 0 ? blk_dev_get_wce(c->blk) : 1, "direct", 1, "no-flush", 0, "image",
		      image_info(img), "bps", 0, "bps_rd", 0, "bps_wr", 0, "iops", 0, "iops_rd", 0,
		      "iops_wr", 0, "write_threshold", 0);
	if (o && img_backing(img))
		json_object_set_new(o, "backing_file", json_string(img_backing(img)->path));
	if (o)
		add_bitmaps(o, img);
	if (o && img_cache_stats(img, &cs) == 0) {
		/* Ours, beside QEMU's keys: the qcow2 metadata caches. */
		json_object_set_new(
		    o, "vqcowd",
		    json_pack("{s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}",
			      "cache", "l2-cache-size", (json_int_t)cs.l2_cache_size,
			      "l2-cache-used", (json_int_t)cs.l2_cache_used, "refcount-cache-size",
			      (json_int_t)cs.refcount_cache_size, "refcount-cache-used",
			      (json_int_t)cs.refcount_cache_used, "cache-entry-size",
			      (json_int_t)cs.cache_entry_size, "l2-hits", (json_int_t)cs.l2_hits,
			      "l2-misses", (json_int_t)cs.l2_misses, "l2-evictions",
			      (json_int_t)cs.l2_evictions, "refcount-hits",
			      (json_int_t)cs.refcount_hits, "refcount-misses",
			      (json_int_t)cs.refcount_misses, "refcount-evictions",
			      (json_int_t)cs.refcount_evictions, "l2-prefetched",
			      (json_int_t)cs.l2_prefetched, "compressed-inflated",
			      (json_int_t)cs.compressed_inflated, "compressed-cache-hits",
			      (json_int_t)cs.compressed_cache_hits));
		add_zc_reads(json_object_get(json_object_get(o, "vqcowd"), "cache"), &cs);
	}
	return o;
}

static int cmd_nodes(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	json_t *a = json_array();
	unsigned depth = 0;
	char name[256];

	if (!a)
		return -ENOMEM;
	for (struct img *i = c->img; i; i = img_backing(i), depth++) {
		/* Backing nodes opened from their overlay's header: NAME-backing1, ... */
		json_array_append_new(
		    a, node_info(c, i, layers_node_name(c, i, depth, name, sizeof(name)), depth));
	}
	*ret = a;
	return 0;
}

/* The device's counters and every queue's, summed now. */
static void stats_sum(struct ctl *c, struct blk_stats *sum)
{
	memset(sum, 0, sizeof(*sum));
	blk_stats_add(c->blk, sum, blk_dev_stats(c->blk));
	for (unsigned i = 0; i < c->nqueues; i++)
		blk_stats_add(c->blk, sum, &c->qstats[i].blk);
}

/* QEMU's BlockLatencyHistogramInfo, or NULL when @type has no histogram. */
static json_t *histogram_json(struct ctl *c, const struct blk_stats *st, int type)
{
	const uint64_t *b;
	int n = blk_dev_histogram(c->blk, type, &b);
	json_t *bounds, *bins;

	if (n < 0)
		return NULL;
	bounds = json_array();
	bins = json_array();
	for (int i = 0; i < n; i++)
		json_array_append_new(bounds, json_integer((json_int_t)b[i]));
	for (int i = 0; i <= n; i++)
		json_array_append_new(bins, json_integer((json_int_t)st->op[type].bins[i]));
	return json_pack("{s:o,s:o}", "boundaries", bounds, "bins", bins);
}

static json_t *stats_json(struct ctl *c, const struct blk_stats *st)
{
	static const char *const pfx[BLK_STAT_N] = {"rd", "wr", "flush", "unmap"};
	json_t *o = json_object();
	char k[64];

	if (!o)
		return NULL;
	for (int i = 0; i < BLK_STAT_N; i++) {
		json_t *h;

		snprintf(k, sizeof(k), "%s_operations", pfx[i]);
		json_object_set_new(o, k, json_integer((json_int_t)st->op[i].ops));
		snprintf(k, sizeof(k), "%s_total_time_ns", pfx[i]);
		json_object_set_new(o, k, json_integer((json_int_t)st->op[i].total_ns));
		snprintf(k, sizeof(k), "failed_%s_operations", pfx[i]);
		json_object_set_new(o, k, json_integer((json_int_t)st->op[i].failed));
		snprintf(k, sizeof(k), "invalid_%s_operations", pfx[i]);
		json_object_set_new(o, k, json_integer((json_int_t)st->op[i].invalid));
		if (i != BLK_STAT_FLUSH) {
			snprintf(k, sizeof(k), "%s_bytes", pfx[i]);
			json_object_set_new(o, k, json_integer((json_int_t)st->op[i].bytes));
			snprintf(k, sizeof(k), "%s_merged", pfx[i]);
			json_object_set_new(o, k, json_integer(0)); /* we never merge */
		}
		/* QEMU 7.2 has rd_, wr_ and flush_latency_histogram (no unmap) */
		if (i != BLK_STAT_DISCARD && (h = histogram_json(c, st, i))) {
			snprintf(k, sizeof(k), "%s_latency_histogram", pfx[i]);
			json_object_set_new(o, k, h);
		}
	}
	json_object_set_new(o, "wr_highest_offset",
			    json_integer((json_int_t)st->wr_highest_offset));
	if (st->last_done_ns) {
		json_object_set_new(o, "idle_time_ns",
				    json_integer((json_int_t)(util_now_ns() - st->last_done_ns)));
	}
	json_object_set_new(o, "account_invalid", json_true());
	json_object_set_new(o, "account_failed", json_true());
	json_object_set_new(o, "timed_stats", json_array());
	return o;
}

/* The qcow2 engine's numbers (caches and activity), or NULL for raw. */
static json_t *engine_json(struct img *img)
{
	struct img_cache_stats cs;

	if (img_cache_stats(img, &cs) < 0)
		return NULL;
	const struct {
		const char *key;
		uint64_t val;
	} f[] = {
	    {"l2-hits", cs.l2_hits},
	    {"l2-misses", cs.l2_misses},
	    {"l2-evictions", cs.l2_evictions},
	    {"refcount-hits", cs.refcount_hits},
	    {"refcount-misses", cs.refcount_misses},
	    {"refcount-evictions", cs.refcount_evictions},
	    {"l2-prefetched", cs.l2_prefetched},
	    {"clusters-allocated", cs.clusters_allocated},
	    {"cow-operations", cs.cow},
	    {"l2-table-copies", cs.l2_cow},
	    {"l2-tables-allocated", cs.l2_tables_allocated},
	    {"refcount-blocks-allocated", cs.refcount_blocks_allocated},
	    {"metadata-writes", cs.metadata_writes},
	    {"metadata-write-bytes", cs.metadata_write_bytes},
	    {"writeback-batches", cs.writeback_batches},
	    {"writeback-side-batches", cs.writeback_side_batches},
	    {"writeback-syncs", cs.writeback_syncs},
	    {"writeback-tail-starts", cs.writeback_tail_starts},
	    {"page-cache-written", cs.page_cache_written},
	    {"link-waits", cs.link_waits},
	    {"link-wait-us", cs.link_wait_us},
	    {"link-wait-syncs", cs.link_wait_syncs},
	    {"link-wait-syncs-max", cs.link_wait_syncs_max},
	    {"early-new-links", cs.early_new_links},
	    {"early-new-ahead", cs.early_new_ahead},
	    {"compressed-inflated", cs.compressed_inflated},
	    {"fast-path-hits", cs.fast_hits},
	    {"fast-path-hops", cs.fast_hops},
	    {"fast-table-size", cs.fast_table_size},
	    {"fast-table-budget", cs.fast_table_budget},
	    {"fast-table-entries", cs.fast_table_entries},
	};
	json_t *o = json_object();

	/* one table, not a json_pack format whose pairs must be counted by hand */
	for (size_t i = 0; o && i < sizeof(f) / sizeof(f[0]); i++) {
		if (json_object_set_new(o, f[i].key, json_integer((json_int_t)f[i].val)) < 0) {
			json_decref(o);
			return NULL;
		}
	}
	return o;
}

static int cmd_blockstats(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	json_t *queues = json_array(), *e, *v, *eng;
	struct blk_stats *sum = malloc(sizeof(*sum));
	struct img_cache_stats cs;

	if (!queues || !sum) {
		json_decref(queues);
		free(sum);
		return -ENOMEM;
	}
	for (unsigned i = 0; i < c->nqueues; i++) {
		const struct ctl_qstat *q = &c->qstats[i];

		if (!q->requests)
			continue; /* 64 queues are offered; list those that worked */
		json_array_append_new(
		    queues,
		    json_pack("{s:i,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "queue", (int)i, "requests",
			      (json_int_t)q->requests, "bytes", (json_int_t)q->bytes, "errors",
			      (json_int_t)q->errors, "rd_operations",
			      (json_int_t)__atomic_load_n(&q->blk.op[0].ops, __ATOMIC_RELAXED),
			      "wr_operations",
			      (json_int_t)__atomic_load_n(&q->blk.op[1].ops, __ATOMIC_RELAXED),
			      "flush_operations",
			      (json_int_t)__atomic_load_n(&q->blk.op[2].ops, __ATOMIC_RELAXED),
			      "unmap_operations",
			      (json_int_t)__atomic_load_n(&q->blk.op[3].ops, __ATOMIC_RELAXED)));
	}
	stats_sum(c, sum);
	v = json_pack("{s:i,s:o}", "in-flight", (int)blk_dev_inflight(c->blk), "queues", queues);
	eng = engine_json(c->img);
	if (eng && img_cache_stats(c->img, &cs) == 0)
		add_zc_reads(eng, &cs);
	if (v && eng)
		json_object_set_new(v, "qcow2", eng);
	else
		json_decref(eng);
	/* One BlockStats for the export's node, whatever query-nodes says:
	 * the node is both the device and the node here. */
	e = json_pack("{s:s,s:s,s:o,s:o}", "device", "", "node-name", c->node_name, "stats",
		      stats_json(c, sum), "vqcowd", v);
	free(sum);
	if (!e)
		return -ENOMEM;
	*ret = json_pack("[o]", e);
	return *ret ? 0 : -ENOMEM;
}

/* Read @key (a list of integers) into @b; false when absent. */
static bool bounds_arg(json_t *args, const char *key, uint64_t *b, unsigned *n)
{
	json_t *a = json_object_get(args, key);
	size_t i;
	json_t *x;

	if (!a)
		return false;
	*n = 0;
	json_array_foreach(a, i, x)
	{
		if (i < BLK_HIST_MAX)
			b[i] = (uint64_t)json_integer_value(x); /* QEMU casts negatives too */
		(*n)++;
	}
	return true;
}

/*
 * QEMU's block-latency-histogram-set (qapi/block.json): only @id removes
 * every histogram; @boundaries resets read, write and flush; the
 * per-type lists take precedence for their type. The I/O threads bin their
 * requests with these boundaries: like every command, this one runs with
 * them parked (watch_done in vqcowd.c; integration.mt sets boundaries under
 * load in the ThreadSanitizer build).
 */
static int cmd_histogram(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	static const char *const key[] = {"boundaries-read", "boundaries-write",
					  "boundaries-flush"};
	static const char *const what[] = {"read ", "write ", "flush "};
	struct ctl *c = opaque;
	json_t *jid = json_object_get(args, "id");
	json_t *jnode = json_object_get(args, "node-name");
	const char *id = jid ? json_string_value(jid) : jnode ? json_string_value(jnode) : "";
	uint64_t all[BLK_HIST_MAX], one[BLK_HIST_MAX];
	unsigned nall = 0, n;
	bool has_all, any = false;

	if (!jid && !jnode) {
		snprintf(err, errlen, "Parameter 'id' is missing");
		return -EINVAL;
	}
	if (strcmp(id, c->node_name) != 0 && strcmp(id, "export0") != 0) {
		snprintf(err, errlen, "Device '%s' not found", id);
		return -ENOENT;
	}
	has_all = bounds_arg(args, "boundaries", all, &nall);
	for (int t = 0; t < 3; t++) {
		const uint64_t *b = all;
		const char *w = "";

		n = nall;
		if (bounds_arg(args, key[t], one, &n)) {
			b = one;
			w = what[t];
		} else if (!has_all) {
			continue;
		}
		any = true;
		if (n > BLK_HIST_MAX || blk_dev_set_histogram(c->blk, t, b, n) < 0) {
			snprintf(err, errlen, "Device '%s' set %sboundaries fail%s", id, w,
				 n > BLK_HIST_MAX ? " (at most 64 boundaries)"
						  : " (they must be ascending and above 0)");
			return -EINVAL;
		}
	}
	if (!any) {
		for (int t = 0; t < BLK_STAT_N; t++)
			blk_dev_set_histogram(c->blk, t, NULL, 0);
	}
	return 0;
}

static int cmd_quit(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;

	vlog(VLOG_INFO, NULL, "qmp: quit");
	c->quit(c->opaque);
	return 0;
}

/* A block_resize whose qcow2 metadata is being written (img_grow returned 1). */
struct resize_op {
	struct img_grow g;
	struct ctl *c;
	struct qmp_pending *p;
	uint64_t size;
};

static void resized(struct ctl *c, uint64_t size)
{
	vlog(VLOG_INFO, NULL, "qmp: block_resize %s to %" PRIu64 " bytes", c->node_name, size);
	c->resized(c->opaque);
}

/* The new size is durable (or failed): tell the guest, then the client, as QEMU does. */
static void resize_done(struct img_grow *g, int res)
{
	struct resize_op *op = g->priv;

	if (res == 0) {
		/* A grow that ends in the final write-back of img_close() comes
		 * after ctl_stop(): the device is gone, no notice then. */
		if (op->c->qmp)
			resized(op->c, op->size);
		qmp_pending_return(op->p, NULL);
	} else {
		vlog(VLOG_ERROR, NULL, "qmp: block_resize %s: %s", op->c->node_name, g->err);
		qmp_pending_error(op->p, "%s", g->err);
	}
	free(op);
}

static void resize_done_quiet(struct img_grow *g, int res)
{
	struct resize_op *op = g->priv;

	if (res == 0 && op->c->qmp)
		resized(op->c, op->size);
	else if (res)
		vlog(VLOG_ERROR, NULL, "qmp: block_resize %s: %s", op->c->node_name, g->err);
	free(op);
}

static int resize_hold(struct ctl *c, uint64_t size);

static int cmd_resize(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	json_int_t size = json_integer_value(json_object_get(args, "size"));
	struct resize_op *op;
	int r;

	r = find_node(c, args, err, errlen);
	if (r < 0)
		return r;
	if (size < 0) {
		snprintf(err, errlen, "Parameter 'size' expects a >0 size");
		return -EINVAL;
	}
	if ((uint64_t)size > c->img->size && img_grow_blocks(c->img))
		return resize_hold(c, (uint64_t)size);
	op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->g.done = resize_done;
	op->g.priv = op;
	op->c = c;
	op->size = (uint64_t)size;
	r = img_grow(c->img, (uint64_t)size, &op->g);
	if (r == 1) {
		op->p = qmp_server_defer(c->qmp);
		if (op->p)
			return QMP_PENDING; /* resize_done() replies */
		/* no memory for the handle: the grow goes on, the reply is now */
		op->g.done = resize_done_quiet;
		return 0;
	}
	if (r < 0)
		snprintf(err, errlen, "%s", op->g.err);
	else
		resized(c, (uint64_t)size);
	free(op);
	return r;
}

/*
 * Internal snapshots. QEMU drains the node, then writes the snapshot: here
 * the handler checks what needs no I/O and replies at once on error;
 * otherwise it queues the operation, asks the daemon to hold new requests
 * back (ctl->hold) and defers its reply. Once the requests in flight ended,
 * the daemon calls ctl_held() outside the loop, which writes the snapshot
 * (img_snapshot: metadata written back, snapshot, engine reopened) and
 * replies. So the snapshot holds exactly the writes completed before it.
 */
struct ctl_op {
	struct ctl_op *next;
	bool create;
	char *device, *id, *name;
	struct qmp_pending *p;
	char bmop; /* persistent dirty bitmaps (bm_start): 'a', 'r', 'c', 'e', 'd'; 0: snapshot;
		    * 'm': block-dirty-bitmap-merge into @name from @srcs (bm_merge) */
	uint32_t granularity;
	bool disabled;
	char **srcs, **snodes; /* 'm': the sources' names and nodes */
	unsigned nsrcs;
	uint64_t size; /* 'z': block_resize that has to load bitmaps first (resize_held) */
};

static void op_free(struct ctl_op *op)
{
	for (unsigned i = 0; i < op->nsrcs; i++) {
		free(op->srcs[i]);
		free(op->snodes[i]);
	}
	free(op->srcs);
	free(op->snodes);
	free(op->device);
	free(op->id);
	free(op->name);
	free(op);
}

/*
 * A held operation whose set-up ran out of memory: freed, and the error
 * replied through its pending handle, or -ENOMEM when there is none yet.
 */
static int op_oom(struct ctl_op *op)
{
	struct qmp_pending *p = op->p;

	op_free(op);
	if (!p)
		return -ENOMEM;
	qmp_pending_error(p, "out of memory");
	return QMP_PENDING;
}

static const char *str_arg(json_t *args, const char *key)
{
	return json_string_value(json_object_get(args, key));
}

/*
 * The image of node @name anywhere in the chain (the bitmap commands take
 * any node's name, as QEMU's do: a backing file's too), or NULL.
 */
static struct img *bm_node(struct ctl *c, const char *name)
{
	unsigned depth = 0;
	char buf[256];

	for (struct img *i = c->img; i; i = img_backing(i), depth++)
		if (strcmp(layers_node_name(c, i, depth, buf, sizeof(buf)), name) == 0)
			return i;
	return NULL;
}

/* Queue @op (its reply deferred already) and hold the device's requests:
 * ctl_held runs the queued operations once nothing is in flight. */
static void op_queue_hold(struct ctl *c, struct ctl_op *op)
{
	struct ctl_op **tail;

	for (tail = &c->ops; *tail; tail = &(*tail)->next)
		;
	*tail = op;
	c->hold(c->opaque);
}

static int snap_start(struct ctl *c, json_t *args, bool create, char *err, size_t errlen)
{
	const char *dev = str_arg(args, "device"), *id = str_arg(args, "id");
	const char *name = str_arg(args, "name");
	struct ctl_op *op;

	if (strcmp(dev, c->node_name) != 0) {
		snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'", dev, dev);
		return -ENOENT;
	}
	if (!create && !id && !name) {
		snprintf(err, errlen, "Name or id must be provided");
		return -EINVAL;
	}
	if (layers_busy(c)) {
		/* QEMU's op blocker: the engine is closed and reopened below */
		snprintf(err, errlen, "Node '%s' is busy: %s", dev, layers_busy(c));
		return -EBUSY;
	}
	if (create && !img_may_write(c->img)) {
		snprintf(err, errlen, "Device '%s' is read only", dev);
		return -EROFS;
	}
	if (create && strcmp(c->img->ops->format, "qcow2") != 0) {
		snprintf(err, errlen,
			 "Block format '%s' used by device '%s' does not support internal "
			 "snapshots",
			 c->img->ops->format, dev);
		return -ENOTSUP;
	}
	if (create && !name[0]) {
		snprintf(err, errlen, "Name is empty");
		return -EINVAL;
	}
	op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->create = create;
	op->device = strdup(dev);
	op->id = id ? strdup(id) : NULL;
	op->name = name ? strdup(name) : NULL;
	op->p = qmp_server_defer(c->qmp);
	if (!op->device || (id && !op->id) || (name && !op->name) || !op->p)
		return op_oom(op);
	vlog(VLOG_INFO, NULL, "qmp: %s internal snapshot %s%s%s: holding requests back",
	     create ? "creating" : "deleting", name ? name : "", name && id ? " id " : "",
	     id ? id : "");
	op_queue_hold(c, op);
	return QMP_PENDING;
}

static int cmd_snap_create(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return snap_start(opaque, args, true, err, errlen);
}

static int cmd_snap_delete(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return snap_start(opaque, args, false, err, errlen);
}

/*
 * Persistent dirty bitmaps, QEMU's block-dirty-bitmap-* commands. They take
 * the snapshots' path (hold requests, then ctl_held outside the loop):
 * img_bitmap_edit stores the bitmaps, closes the engine, changes the file
 * and opens it again, so the on-disk directory is always the crash-safe
 * truth and the engine's bitmap set never changes while it is open.
 * What needs no I/O is checked here, in QEMU's order and with its messages.
 */
/*
 * Non-persistent bitmaps (img/dirty.c) live in memory on the node: every
 * command acts at once, with the I/O threads parked (QMP runs so), without
 * holding requests or touching the file.
 */
static int dbm_add(struct img *img, const char *name, uint32_t granularity, bool disabled,
		   bool persistent, char *err, size_t errlen)
{
	int r = img_dbm_add(img, name, granularity, disabled, persistent);

	if (r == -EEXIST)
		snprintf(err, errlen, "Bitmap already exists: %s", name);
	else if (r < 0)
		snprintf(err, errlen, "Cannot create dirty bitmap '%s': %s", name, strerror(-r));
	else
		vlog(VLOG_INFO, img->path, "qmp: dirty bitmap '%s' added (%s, %u bytes%s)", name,
		     persistent ? "persistent on a read-only node: in memory only"
				: "non-persistent",
		     granularity ? granularity : img_dbm_default_granularity(img),
		     disabled ? ", disabled" : "");
	return r;
}

static int dbm_op(struct img *img, char bmop, const char *name)
{
	struct img_dbm *b = img_dbm_find(img, name);

	switch (bmop) {
	case 'r':
		img_dbm_remove(img, name);
		break;
	case 'c':
		img_dbm_clear(b);
		break;
	case 'e':
	case 'd':
		img_dbm_set_enabled(img, b, bmop == 'e');
		break;
	}
	vlog(VLOG_INFO, img->path, "qmp: dirty bitmap '%s' %s (in memory)", name,
	     bmop == 'r'   ? "removed"
	     : bmop == 'c' ? "cleared"
	     : bmop == 'e' ? "enabled"
			   : "disabled");
	return 0;
}

static int bm_start(struct ctl *c, json_t *args, char bmop, char *err, size_t errlen)
{
	const char *node = str_arg(args, "node"), *name = str_arg(args, "name");
	json_t *g = json_object_get(args, "granularity");
	json_t *pers = json_object_get(args, "persistent");
	struct img_bitmap *bms = NULL;
	struct ctl_op *op;
	struct img *img;
	bool found = false;
	int n;

	if (bmop == 'a' && !name[0]) {
		snprintf(err, errlen, "Bitmap name cannot be empty");
		return -EINVAL;
	}
	img = bm_node(c, node);
	if (!img) {
		if (bmop == 'a')
			snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'", node,
				 node);
		else
			snprintf(err, errlen, "Node '%s' not found", node);
		return -ENOENT;
	}
	if (bmop == 'a' && g &&
	    (json_integer_value(g) < 512 || json_integer_value(g) > 0x80000000ll ||
	     (json_integer_value(g) & (json_integer_value(g) - 1)))) {
		snprintf(err, errlen, "Granularity must be power of 2 and at least 512");
		return -EINVAL;
	}
	n = img_bitmaps(img, NULL, 0);
	if (n > 0) {
		bms = calloc((size_t)n, sizeof(*bms));
		if (!bms)
			return -ENOMEM;
		n = img_bitmaps(img, bms, (unsigned)n);
		for (int i = 0; i < n; i++)
			found = found || strcmp(bms[i].name, name) == 0;
		free(bms);
	}
	if (bmop != 'a' && !found) {
		snprintf(err, errlen, "Dirty bitmap '%s' not found", name);
		return -ENOENT;
	}
	if (bmop == 'a' && found) {
		snprintf(err, errlen, "Bitmap already exists: %s", name);
		return -EEXIST;
	}
	if (bmop == 'a' && !(pers && json_is_true(pers)) && strlen(name) > BM_NAME_MAX) {
		/* QEMU's limit for every dirty bitmap (a persistent one is the
		 * engine's to refuse, as qcow2's constraint in QEMU) */
		snprintf(err, errlen, "Bitmap name too long: %s", name);
		return -EINVAL;
	}
	if (bmop == 'a' && (!(pers && json_is_true(pers)) ||
			    (!img_may_write(img) && strcmp(img->ops->format, "qcow2") == 0)))
		/* non-persistent; or persistent on a read-only node, which
		 * QEMU 7.2 accepts, keeps in memory and loses at close */
		return dbm_add(img, name, g ? (uint32_t)json_integer_value(g) : 0,
			       json_is_true(json_object_get(args, "disabled")),
			       pers && json_is_true(pers), err, errlen);
	if (bmop != 'a' && img_dbm_find(img, name))
		return dbm_op(img, bmop, name);
	if (bmop != 'a' && !img_may_write(img)) {
		/* one in the file of a backing node: QEMU's read-only bitmap */
		if (bmop == 'e' || bmop == 'd')
			return img_bitmap_edit(img, bmop == 'e' ? 'E' : 'D', name, 0, false, err,
					       errlen);
		snprintf(err, errlen, "Bitmap '%s' is readonly and cannot be modified", name);
		return -EPERM;
	}
	if (layers_busy(c) || img != c->img) {
		/* (a backing node writable: the base of a running commit) */
		snprintf(err, errlen, "Node '%s' is busy: %s", node,
			 layers_busy(c) ? layers_busy(c) : "block-commit");
		return -EBUSY;
	}
	if (!img_may_write(img) || strcmp(img->ops->format, "qcow2") != 0) {
		snprintf(err, errlen, "Can't make bitmap '%s' persistent in '%s': %s", name, node,
			 "Block format does not support persistent bitmaps");
		return -ENOTSUP;
	}
	op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->bmop = bmop;
	op->granularity = g ? (uint32_t)json_integer_value(g) : 0;
	op->disabled = json_is_true(json_object_get(args, "disabled"));
	op->device = strdup(node);
	op->name = strdup(name);
	op->p = qmp_server_defer(c->qmp);
	if (!op->device || !op->name || !op->p)
		return op_oom(op);
	vlog(VLOG_INFO, NULL, "qmp: dirty bitmap '%s' (%c): holding requests back", name, bmop);
	op_queue_hold(c, op);
	return QMP_PENDING;
}

static int cmd_bm_add(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return bm_start(opaque, args, 'a', err, errlen);
}

static int cmd_bm_remove(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return bm_start(opaque, args, 'r', err, errlen);
}

static int cmd_bm_clear(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return bm_start(opaque, args, 'c', err, errlen);
}

static int cmd_bm_enable(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return bm_start(opaque, args, 'e', err, errlen);
}

static int cmd_bm_disable(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	return bm_start(opaque, args, 'd', err, errlen);
}

/*
 * block-dirty-bitmap-merge: QEMU's checks and messages (qsd 7.2): the
 * argument's shape (QAPI's, before anything else), the node, the target
 * (found, not inconsistent), each source (its node, found, not
 * inconsistent); the target changes only once all are checked. A merge of
 * non-persistent bitmaps only runs at once, in memory; one that involves a
 * persistent bitmap takes the held-requests path (bm_merge from ctl_held):
 * a disabled one's bits are read from the file there, and a disabled
 * persistent target is rewritten crash-safely (img_bitmap_merge). Merging
 * nothing returns {} (qsd 7.2 dies on an empty list).
 */
/* Bitmap @name of @img into *@out: 0, -ENOENT, -ENOMEM. */
static int bm_get(struct img *img, const char *name, struct img_bitmap *out)
{
	int n = img_bitmaps(img, NULL, 0), r = -ENOENT;
	struct img_bitmap *bms;

	if (n <= 0)
		return n < 0 ? n : -ENOENT;
	bms = calloc((size_t)n, sizeof(*bms));
	if (!bms)
		return -ENOMEM;
	n = img_bitmaps(img, bms, (unsigned)n);
	for (int i = 0; i < n && r; i++)
		if (strcmp(bms[i].name, name) == 0) {
			*out = bms[i];
			r = 0;
		}
	free(bms);
	return r;
}

static int merge_set(void *opaque, uint64_t off, uint64_t len)
{
	img_dbm_set(opaque, off, len);
	return 0;
}

struct merge_to {
	struct img *img;
	const char *name;
};

static int merge_set_persistent(void *opaque, uint64_t off, uint64_t len)
{
	struct merge_to *t = opaque;

	return img_bitmap_set(t->img, t->name, off, len);
}

/* The sources (@srcs[i] on @simgs[i]) ORed into a scratch bitmap of @size bytes at the
 * target's granularity (NULL: -errno in *@ret). */
static struct img_dbm *merge_sources(uint64_t size, uint64_t gran, char **srcs, struct img **simgs,
				     unsigned n, int *ret)
{
	struct img_dbm *tmp = img_dbm_new(size, (uint32_t)gran);

	*ret = tmp ? 0 : -ENOMEM;
	for (unsigned i = 0; tmp && *ret == 0 && i < n; i++) {
		struct img_dbm *s = img_dbm_find(simgs[i], srcs[i]);

		*ret = s ? img_dbm_ranges(s, merge_set, tmp)
			 : img_bitmap_ranges(simgs[i], srcs[i], merge_set, tmp);
	}
	if (*ret < 0) {
		img_dbm_free(tmp);
		tmp = NULL;
	}
	return tmp;
}

static int cmd_bm_merge(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	const char *node = str_arg(args, "node"), *target = str_arg(args, "target");
	json_t *list = json_object_get(args, "bitmaps");
	struct img_bitmap *bms = NULL;
	struct img_bitmap tb;
	struct ctl_op *op = NULL;
	struct img *timg, **simgs = NULL;
	bool engine; /* a persistent bitmap of the engine's takes part */
	size_t n = json_array_size(list);
	char **srcs = NULL;
	int r = -EINVAL;

	(void)ret;
	for (size_t i = 0; i < n; i++) {
		json_t *e = json_array_get(list, i), *v;
		const char *key;

		if (json_is_string(e))
			continue;
		if (!json_is_object(e)) {
			snprintf(
			    err, errlen,
			    "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr");
			return -EINVAL;
		}
		for (const char *const *k = (const char *const[]){"node", "name", NULL}; *k; k++) {
			v = json_object_get(e, *k);
			if (!v) {
				snprintf(err, errlen, "Parameter 'bitmaps[%zu].%s' is missing", i,
					 *k);
				return -EINVAL;
			}
			if (!json_is_string(v)) {
				snprintf(err, errlen,
					 "Invalid parameter type for 'bitmaps[%zu].%s', expected: "
					 "string",
					 i, *k);
				return -EINVAL;
			}
		}
		json_object_foreach(e, key, v)
		{
			if (strcmp(key, "node") && strcmp(key, "name")) {
				snprintf(err, errlen, "Parameter 'bitmaps[%zu].%s' is unexpected",
					 i, key);
				return -EINVAL;
			}
		}
	}
	timg = bm_node(c, node);
	if (!timg) {
		snprintf(err, errlen, "Node '%s' not found", node);
		return -ENOENT;
	}
	r = bm_get(timg, target, &tb);
	if (r < 0) {
		if (r == -ENOENT)
			snprintf(err, errlen, "Dirty bitmap '%s' not found", target);
		goto out;
	}
	r = -EINVAL;
	engine = tb.persistent && !img_dbm_find(timg, target);
	if (engine && !img_may_write(timg)) {
		snprintf(err, errlen, "Bitmap '%s' is readonly and cannot be modified", target);
		r = -EPERM;
		goto out;
	}
	if (tb.inconsistent) {
		snprintf(err, errlen, "Bitmap '%s' is inconsistent and cannot be used", target);
		goto out;
	}
	srcs = calloc(n + 1, sizeof(*srcs));
	simgs = calloc(n + 1, sizeof(*simgs));
	if (!srcs || !simgs) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		json_t *e = json_array_get(list, i);
		const char *name = json_is_string(e) ? json_string_value(e) : str_arg(e, "name");
		struct img_bitmap sb;

		simgs[i] = json_is_string(e) ? timg : bm_node(c, str_arg(e, "node"));
		if (!simgs[i]) {
			snprintf(err, errlen, "Node '%s' not found", str_arg(e, "node"));
			r = -ENOENT;
			goto out;
		}
		r = bm_get(simgs[i], name, &sb);
		if (r < 0) {
			if (r == -ENOENT)
				snprintf(err, errlen, "Dirty bitmap '%s' not found", name);
			goto out;
		}
		r = -EINVAL;
		if (sb.inconsistent) {
			snprintf(err, errlen, "Bitmap '%s' is inconsistent and cannot be used",
				 name);
			goto out;
		}
		if (simgs[i]->size != timg->size) {
			snprintf(err, errlen,
				 "Bitmaps are of different sizes (destination size is %" PRIu64
				 ", source size is %" PRIu64 ") and can't be merged",
				 timg->size, simgs[i]->size);
			goto out;
		}
		engine = engine || (sb.persistent && !img_dbm_find(simgs[i], name));
		srcs[i] = (char *)name; /* (borrowed until we copy them below) */
	}
	if (!n) {
		r = 0;
		goto out;
	}
	if (!engine) {
		struct img_dbm *tmp =
		    merge_sources(timg->size, tb.granularity, srcs, simgs, (unsigned)n, &r);

		if (tmp) {
			r = img_dbm_ranges(tmp, merge_set, img_dbm_find(timg, target));
			img_dbm_free(tmp);
			vlog(VLOG_INFO, timg->path, "qmp: %zu dirty bitmap(s) merged into '%s'", n,
			     target);
		}
		if (r < 0)
			snprintf(err, errlen, "Merging into '%s' failed: %s", target, strerror(-r));
		goto out;
	}
	if (layers_busy(c)) {
		snprintf(err, errlen, "Node '%s' is busy: %s", node, layers_busy(c));
		r = -EBUSY;
		goto out;
	}
	r = -ENOMEM;
	op = calloc(1, sizeof(*op));
	if (!op)
		goto out;
	op->bmop = 'm';
	op->name = strdup(target);
	op->device = strdup(node);
	op->granularity = (uint32_t)tb.granularity;
	op->disabled = !tb.recording;
	op->srcs = calloc(n, sizeof(*op->srcs));
	op->snodes = calloc(n, sizeof(*op->snodes));
	if (!op->name || !op->device || !op->srcs || !op->snodes)
		goto out;
	for (size_t i = 0; i < n; i++) {
		json_t *e = json_array_get(list, i);

		op->srcs[i] = strdup(srcs[i]);
		op->snodes[i] = strdup(json_is_string(e) ? node : str_arg(e, "node"));
		if (!op->srcs[i] || !op->snodes[i]) {
			op->nsrcs++;
			goto out;
		}
		op->nsrcs++;
	}
	op->p = qmp_server_defer(c->qmp);
	if (!op->p)
		goto out;
	vlog(VLOG_INFO, NULL, "qmp: merging into dirty bitmap '%s': holding requests back", target);
	op_queue_hold(c, op);
	op = NULL;
	r = QMP_PENDING;
out:
	if (op)
		op_free(op);
	free(srcs);
	free(simgs);
	free(bms);
	return r;
}

/*
 * block_resize of a qcow2 image with disabled persistent bitmaps: they are
 * loaded and marked in use (synchronous I/O) before the grow, so the grow
 * starts from ctl_held, outside the loop; it then completes as any other
 * (resize_done replies).
 */
static int resize_hold(struct ctl *c, uint64_t size)
{
	struct ctl_op *op = calloc(1, sizeof(*op));

	if (!op)
		return -ENOMEM;
	op->bmop = 'z';
	op->size = size;
	op->p = qmp_server_defer(c->qmp);
	if (!op->p) {
		free(op);
		return -ENOMEM;
	}
	vlog(VLOG_INFO, NULL,
	     "qmp: block_resize with disabled dirty bitmaps: holding requests back");
	op_queue_hold(c, op);
	return QMP_PENDING;
}

static void resize_held(struct ctl *c, struct ctl_op *op)
{
	struct resize_op *r = calloc(1, sizeof(*r));
	int ret;

	if (!r) {
		qmp_pending_error(op->p, "out of memory");
		return;
	}
	r->g.done = resize_done;
	r->g.priv = r;
	r->c = c;
	r->size = op->size;
	r->p = op->p;
	ret = img_grow(c->img, op->size, &r->g);
	if (ret == 1)
		return; /* resize_done() replies */
	if (ret < 0) {
		qmp_pending_error(op->p, "%s", r->g.err);
	} else {
		resized(c, op->size);
		qmp_pending_return(op->p, NULL);
	}
	free(r);
}

/* A merge that involves a persistent bitmap, from ctl_held (no request in flight). */
static void bm_merge(struct ctl *c, struct ctl_op *op)
{
	struct img *timg = bm_node(c, op->device), **simgs = calloc(op->nsrcs + 1, sizeof(*simgs));
	struct img_dbm *tmp = NULL, *t;
	char err[512] = "";
	int r = simgs ? 0 : -ENOMEM;

	/* the nodes again: the chain may have changed while requests drained */
	if (!timg)
		r = -ENOENT;
	for (unsigned i = 0; r == 0 && i < op->nsrcs; i++)
		if (!(simgs[i] = bm_node(c, op->snodes[i])) || simgs[i]->size != timg->size)
			r = -ENOENT;
	t = r == 0 ? img_dbm_find(timg, op->name) : NULL;
	if (r == 0 && !t && timg != c->img)
		r = -ENOENT; /* a persistent target is the engine's: the active node's */
	if (r < 0) {
		free(simgs);
		qmp_pending_error(op->p, "%s",
				  r == -ENOMEM ? "out of memory"
					       : "a node of the merge changed meanwhile");
		return;
	}
	tmp = merge_sources(timg->size, op->granularity, op->srcs, simgs, op->nsrcs, &r);
	free(simgs);
	if (tmp && t) {
		r = img_dbm_ranges(tmp, merge_set, t);
	} else if (tmp && !op->disabled) {
		/* enabled: its bits are in the engine's memory, stored at close */
		struct merge_to to = {c->img, op->name};

		r = img_dbm_ranges(tmp, merge_set_persistent, &to);
	}
	if (tmp && !t && (op->disabled || r == -EBUSY)) {
		/* disabled (or disabled meanwhile): its bits are in the file */
		uint64_t nbytes;
		const uint8_t *bits = img_dbm_bytes(tmp, &nbytes);

		r = img_bitmap_merge(c->img, op->name, bits, nbytes, err, sizeof(err));
	}
	img_dbm_free(tmp);
	if (r == -ENOENT || r == -EUCLEAN)
		qmp_pending_error(op->p, "%s",
				  err[0] ? err : "a bitmap of the merge changed meanwhile");
	else if (r < 0)
		qmp_pending_error(op->p, "Merging into bitmap '%s' on '%s' failed: %s", op->name,
				  op->device, err[0] ? err : strerror(-r));
	else {
		vlog(VLOG_INFO, NULL, "qmp: %u dirty bitmap(s) merged into '%s'", op->nsrcs,
		     op->name);
		qmp_pending_return(op->p, NULL);
	}
}

static void bm_run(struct ctl *c, struct ctl_op *op)
{
	char err[512] = "";
	int r;

	r = img_bitmap_edit(c->img, op->bmop, op->name, op->granularity, op->disabled, err,
			    sizeof(err));
	if (r == -EEXIST || r == -ENOENT || r == -EUCLEAN) {
		qmp_pending_error(op->p, "%s", err);
	} else if (r < 0 && op->bmop == 'a') {
		qmp_pending_error(op->p, "Can't make bitmap '%s' persistent in '%s': %s", op->name,
				  op->device, err[0] ? err : strerror(-r));
	} else if (r < 0) {
		qmp_pending_error(op->p, "Failed to change bitmap '%s' on '%s': %s", op->name,
				  op->device, err[0] ? err : strerror(-r));
	} else {
		vlog(VLOG_INFO, NULL, "qmp: dirty bitmap '%s' %s", op->name,
		     op->bmop == 'a'   ? "added"
		     : op->bmop == 'r' ? "removed"
		     : op->bmop == 'c' ? "cleared"
		     : op->bmop == 'e' ? "enabled"
				       : "disabled");
		qmp_pending_return(op->p, NULL);
	}
}

static void snap_run(struct ctl *c, struct ctl_op *op)
{
	struct img_snapshot sn;
	char err[512] = "";
	int r;

	r = img_snapshot(c->img, op->create, op->id, op->name, &sn, err, sizeof(err));
	if (r == -EEXIST) {
		qmp_pending_error(op->p, "Snapshot with name '%s' already exists on device '%s'",
				  op->name, op->device);
	} else if (r == -ENOENT && !op->create) {
		qmp_pending_error(op->p,
				  "Snapshot with id '%s' and name '%s' does not exist on device "
				  "'%s'",
				  op->id ? op->id : "null", op->name ? op->name : "null",
				  op->device);
	} else if (r < 0) {
		qmp_pending_error(op->p, "Failed to %s snapshot '%s' on device '%s': %s",
				  op->create ? "create" : "delete", op->name ? op->name : op->id,
				  op->device, err[0] ? err : strerror(-r));
	} else if (op->create) {
		vlog(VLOG_INFO, NULL, "qmp: internal snapshot '%s' (id %s) created", sn.name,
		     sn.id);
		qmp_pending_return(op->p, NULL);
	} else {
		json_t *o = snap_info(&sn);

		vlog(VLOG_INFO, NULL, "qmp: internal snapshot '%s' (id %s) deleted", sn.name,
		     sn.id);
		qmp_pending_return(op->p, o);
	}
}

void ctl_held(struct ctl *c)
{
	layers_held(c);
	while (c->ops) {
		struct ctl_op *op = c->ops;

		c->ops = op->next;
		if (op->bmop == 'm')
			bm_merge(c, op);
		else if (op->bmop == 'z')
			resize_held(c, op);
		else if (op->bmop)
			bm_run(c, op);
		else
			snap_run(c, op);
		op_free(op);
	}
}

static const struct qmp_command commands[] = {
    {"query-version", {{NULL}}, cmd_version},
    {"query-block-exports", {{NULL}}, cmd_exports},
    {"query-named-block-nodes", {{"flat", QMP_BOOL, true}, {NULL}}, cmd_nodes},
    {"query-blockstats", {{"query-nodes", QMP_BOOL, true}, {NULL}}, cmd_blockstats},
    {"block-latency-histogram-set",
     {{"id", QMP_STR, true},
      {"node-name", QMP_STR, true},
      {"boundaries", QMP_INT_LIST, true},
      {"boundaries-read", QMP_INT_LIST, true},
      {"boundaries-write", QMP_INT_LIST, true},
      {"boundaries-flush", QMP_INT_LIST, true},
      {NULL}},
     cmd_histogram},
    {"block_resize",
     {{"device", QMP_STR, true}, {"node-name", QMP_STR, true}, {"size", QMP_INT, false}, {NULL}},
     cmd_resize},
    {"block-dirty-bitmap-add",
     {{"node", QMP_STR, false},
      {"name", QMP_STR, false},
      {"granularity", QMP_INT, true},
      {"persistent", QMP_BOOL, true},
      {"disabled", QMP_BOOL, true},
      {NULL}},
     cmd_bm_add},
    {"block-dirty-bitmap-remove",
     {{"node", QMP_STR, false}, {"name", QMP_STR, false}, {NULL}},
     cmd_bm_remove},
    {"block-dirty-bitmap-clear",
     {{"node", QMP_STR, false}, {"name", QMP_STR, false}, {NULL}},
     cmd_bm_clear},
    {"block-dirty-bitmap-enable",
     {{"node", QMP_STR, false}, {"name", QMP_STR, false}, {NULL}},
     cmd_bm_enable},
    {"block-dirty-bitmap-disable",
     {{"node", QMP_STR, false}, {"name", QMP_STR, false}, {NULL}},
     cmd_bm_disable},
    {"block-dirty-bitmap-merge",
     {{"node", QMP_STR, false}, {"target", QMP_STR, false}, {"bitmaps", QMP_LIST, false}, {NULL}},
     cmd_bm_merge},
    {"blockdev-snapshot-internal-sync",
     {{"device", QMP_STR, false}, {"name", QMP_STR, false}, {NULL}},
     cmd_snap_create},
    {"blockdev-snapshot-delete-internal-sync",
     {{"device", QMP_STR, false}, {"id", QMP_STR, true}, {"name", QMP_STR, true}, {NULL}},
     cmd_snap_delete},
    {"blockdev-snapshot-sync",
     {{"device", QMP_STR, true},
      {"node-name", QMP_STR, true},
      {"snapshot-file", QMP_STR, false},
      {"snapshot-node-name", QMP_STR, true},
      {"format", QMP_STR, true},
      {"mode", QMP_STR, true},
      {NULL}},
     layers_snapshot_sync},
    {"block-commit",
     {{"job-id", QMP_STR, true},
      {"device", QMP_STR, false},
      {"base-node", QMP_STR, true},
      {"base", QMP_STR, true},
      {"top-node", QMP_STR, true},
      {"top", QMP_STR, true},
      {"backing-file", QMP_STR, true},
      {"speed", QMP_INT, true},
      {"on-error", QMP_STR, true},
      {"filter-node-name", QMP_STR, true},
      {"auto-finalize", QMP_BOOL, true},
      {"auto-dismiss", QMP_BOOL, true},
      {NULL}},
     layers_commit},
    {"query-block-jobs", {{NULL}}, layers_query_jobs},
    {"block-job-complete", {JOB_DEV, {NULL}}, layers_job_complete},
    {"block-job-cancel", {JOB_DEV, {"force", QMP_BOOL, true}, {NULL}}, layers_job_cancel},
    {"block-job-set-speed", {JOB_DEV, {"speed", QMP_INT, false}, {NULL}}, layers_job_set_speed},
    {"block-job-pause", {JOB_DEV, {NULL}}, layers_job_pause},
    {"block-job-resume", {JOB_DEV, {NULL}}, layers_job_resume},
    {"quit", {{NULL}}, cmd_quit},
    {NULL},
};

void ctl_shutdown_event(struct ctl *c, const char *reason)
{
	if (c->qmp)
		qmp_server_event(c->qmp, "SHUTDOWN",
				 json_pack("{s:b,s:s}", "guest", 0, "reason", reason));
}

void ctl_tick(struct ctl *c)
{
	if (c->qmp)
		layers_tick(c);
}

/* Failures not reported yet, and none reported in the second before @now. */
static bool report_due(struct ctl *c, uint64_t failures, uint64_t now)
{
	if (!c->qmp || failures == c->failures_seen)
		return false;
	/* (else reported later, summed up, when the second is over) */
	return !c->last_event_ns || now - c->last_event_ns >= 1000000000ull;
}

bool ctl_report_due(struct ctl *c)
{
	uint64_t failures;

	if (!c->qmp)
		return false;
	failures = blk_dev_failures(c->blk); /* the cheap test first: every iteration */
	return failures != c->failures_seen && report_due(c, failures, util_now_ns());
}

void ctl_report(struct ctl *c)
{
	static const char *const opname[BLK_STAT_N] = {"read", "write", "write", "write"};
	struct blk_stats *st;
	uint64_t now = util_now_ns(), failures = c->qmp ? blk_dev_failures(c->blk) : 0;
	int k = -1;

	if (!report_due(c, failures, now))
		return;
	st = malloc(sizeof(*st));
	if (!st)
		return;
	stats_sum(c, st);
	for (int i = 0; i < BLK_STAT_N; i++) {
		if (st->op[i].failed != c->failed_seen[i])
			k = i;
	}
	c->last_event_ns = now;
	c->failures_seen = failures;
	for (int i = 0; i < BLK_STAT_N; i++)
		c->failed_seen[i] = st->op[i].failed;
	/* QEMU's BLOCK_IO_ERROR; the error was reported to the guest. */
	if (k >= 0)
		qmp_server_event(c->qmp, "BLOCK_IO_ERROR",
				 json_pack("{s:s,s:s,s:s,s:s,s:b,s:s}", "device", "", "node-name",
					   c->node_name, "operation", opname[k], "action", "report",
					   "nospace", st->last_failed_err == -ENOSPC, "reason",
					   strerror(-st->last_failed_err)));
	free(st);
}

int ctl_start(struct ctl *c, const char *path, int fd)
{
	unsigned maj = 0, min = 0, mic = 0;
	int ret;

	sscanf(VQCOW_VERSION, "%u.%u.%u", &maj, &min, &mic);
	/* QEMU's VersionInfo shape: our version in "qemu", our name in "package". */
	c->version = json_pack("{s:{s:i,s:i,s:i},s:s}", "qemu", "major", maj, "minor", min, "micro",
			       mic, "package", "vqcowd " VQCOW_VERSION);
	if (!c->version)
		return -ENOMEM;
	if (fd >= 0)
		ret = qmp_server_init_fd(&c->qmp, fd, &c->loop, commands, c->version, c);
	else
		ret = qmp_server_init(&c->qmp, path, &c->loop, commands, c->version, c);
	if (ret < 0) {
		json_decref(c->version);
		c->version = NULL;
	}
	return ret;
}

bool ctl_waiting(struct ctl *c)
{
	return layers_waiting(c);
}

void ctl_retired(struct ctl *c)
{
	layers_retired(c);
}

bool ctl_busy(struct ctl *c)
{
	return layers_stop(c);
}

void ctl_stop(struct ctl *c)
{
	while (c->ops) {
		struct ctl_op *op = c->ops;

		c->ops = op->next;
		qmp_pending_error(op->p, "vqcowd is shutting down");
		op_free(op);
	}
	qmp_server_exit(c->qmp);
	c->qmp = NULL;
	layers_exit(c);
	json_decref(c->version);
	c->version = NULL;
}
