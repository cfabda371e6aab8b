/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the qcow2 engine (qcow2/qcow2.h) over a fake io/
 * (tests/unit/fake_io.c: in-memory files, every write and fdatasync
 * recorded, failure injection, shuffled completions, crash images):
 *
 *  - durability order: no L2 write reaches the disk before an fdatasync
 *    that follows the writes of the data and of the refcounts it points at;
 *    every crash image (all writes up to an fdatasync plus any subset of
 *    the later ones) is consistent: nothing points at a cluster whose
 *    refcount is 0;
 *  - injected write / fdatasync failures: requests fail, the image never
 *    gets corrupt, a later flush recovers;
 *  - corruption handling: bad L2 entries fail reads with -EIO, set the
 *    corrupt bit and fail writes;
 *  - slice cache eviction with a tiny cache;
 *  - concurrent allocations of one cluster are serialised;
 *  - freed clusters are not reused while data I/O that mapped them runs;
 *  - extended L2: a write into the subclusters of a zeroed or reused
 *    cluster never shows the cluster's old bytes in any crash image;
 *  - persistent dirty bitmaps: marked in use at open, stored at close; every
 *    crash image keeps them reachable only through clusters with a refcount,
 *    the enabled one in use or complete, the disabled one untouched;
 *  - the L2 prefetch after open: large coalesced reads, no misses after
 *    it, never overwriting a slice changed meanwhile, off when the cache
 *    is too small or opts say so, read failures ignored.
 *
 * Images are created with qemu-img (skipped, exit 77, without it) and
 * checked with `qemu-img check` at the end.
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "fake_io.h"
#include "internal.h"
#include "qcow2.h"
#include "testutil.h"

static struct io_loop *g_loop;
static char g_dir[700];
static unsigned g_seed = 777;

static unsigned rnd(void)
{
	return tu_lcg(&g_seed);
}

static char *P(const char *name)
{
	return tu_path(g_dir, name);
}

static void run(void)
{
	CU_ASSERT_FATAL(io_loop_run_once(g_loop, true) >= 0);
}

/* ---- an engine instance on a fresh image ---- */

struct eng {
	struct io_file file;
	struct qcow2 *q;
	int id;
	char path[1024];
};

static int g_nimg;

static void eng_open_path(struct eng *e, const char *path, const struct qcow2_opts *o)
{
	char err[512], copy[1024];
	int ret;

	snprintf(copy, sizeof(copy), "%s", path);
	snprintf(e->path, sizeof(e->path), "%s", copy);
	path = e->path;
	CU_ASSERT_EQUAL_FATAL(io_file_open(&e->file, path, o && o->read_only ? IO_FILE_RDONLY : 0),
			      0);
	e->id = fake_file_id(&e->file);
	ret = qcow2_open(&e->q, g_loop, &e->file, path, o, err, sizeof(err));
	if (ret)
		fprintf(stderr, "qcow2_open: %s\n", err);
	CU_ASSERT_EQUAL_FATAL(ret, 0);
}

static void eng_create(struct eng *e, const char *opts, uint64_t size, const struct qcow2_opts *o)
{
	char name[64];

	snprintf(name, sizeof(name), "img%d.qcow2", g_nimg++);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o %s %s %llu", opts, P(name),
				    (unsigned long long)size),
			      0);
	eng_open_path(e, P(name), o);
	fake_log_reset();
}

static void eng_close(struct eng *e)
{
	qcow2_close(e->q);
	e->q = NULL;
	io_file_close(&e->file);
}

/* Save the in-memory image and run qemu-img check; returns its exit code. */
static int eng_qemu_check(struct eng *e)
{
	int ret;

	CU_ASSERT_EQUAL(fake_file_save(e->id, e->path), 0);
	ret = tu_sh("qemu-img check -q %s", e->path);
	if (ret != 0)
		tu_sh("qemu-img check %s >&2", e->path);
	fake_file_drop(e->id);
	return ret;
}

/* The same, where a test may leak clusters: qemu-img check finds leaks at most. */
static void eng_qemu_check_leaky(struct eng *e)
{
	int ret = eng_qemu_check(e);

	CU_ASSERT(ret == 0 || ret == 3); /* leaks are allowed, corruption is not */
}

struct waitf {
	struct qcow2_waiter w;
	int woken;
	int err;
};

static void wake_fn(struct qcow2_waiter *w)
{
	struct waitf *f = (struct waitf *)w;

	f->woken++;
	f->err = w->err;
}

static void wait_init(struct waitf *f)
{
	memset(f, 0, sizeof(*f));
	f->w.wake = wake_fn;
}

static void wait_woken(struct waitf *f)
{
	for (int i = 0; i < 100000 && !f->woken; i++)
		run();
	CU_ASSERT_FATAL(f->woken);
	f->woken = 0;
}

struct cmdf {
	struct io_cmd cmd;
	int done, res;
};

static void cmd_done(struct io_cmd *c, int res)
{
	struct cmdf *f = (struct cmdf *)c;

	f->done++;
	f->res = res;
}

static int do_write_data(struct eng *e, const void *buf, uint64_t len, uint64_t host)
{
	struct cmdf c;

	memset(&c, 0, sizeof(c));
	c.cmd.done = cmd_done;
	io_write(g_loop, &c.cmd, &e->file, buf, len, host);
	while (!c.done)
		run();
	return c.res < 0 ? c.res : 0;
}

static int do_zero_range(struct eng *e, uint64_t host, uint64_t len)
{
	struct cmdf c;

	memset(&c, 0, sizeof(c));
	c.cmd.done = cmd_done;
	io_fallocate(g_loop, &c.cmd, &e->file, 0x10 /* ZERO_RANGE */ | 0x01, host, len);
	while (!c.done)
		run();
	return c.res < 0 ? c.res : 0;
}

/* Read guest range through the engine (no backing: UNALLOC reads zero). */
static int eng_read(struct eng *e, uint64_t off, uint64_t len, uint8_t *buf)
{
	uint64_t done = 0;

	while (done < len) {
		struct qcow2_extent x[8];
		struct waitf wf;
		unsigned t;
		int n;

		wait_init(&wf);
		t = qcow2_io_begin(e->q);
		n = qcow2_map_read(e->q, off + done, len - done, x, 8, &wf.w);
		if (n == -EAGAIN) {
			qcow2_io_end(e->q, t);
			wait_woken(&wf);
			if (wf.err)
				return wf.err;
			continue;
		}
		if (n < 0) {
			qcow2_io_end(e->q, t);
			return n;
		}
		for (int i = 0; i < n; i++) {
			uint8_t *p = buf + (x[i].off - off);

			if (x[i].type == QCOW2_MAP_DATA) {
				struct cmdf c;

				memset(&c, 0, sizeof(c));
				c.cmd.done = cmd_done;
				io_read(g_loop, &c.cmd, &e->file, p, x[i].len, x[i].host);
				while (!c.done)
					run();
				if (c.res < 0) {
					qcow2_io_end(e->q, t);
					return c.res;
				}
			} else if (x[i].type == QCOW2_MAP_COMPRESSED) {
				qcow2_io_end(e->q, t);
				return -ENOTSUP;
			} else {
				memset(p, 0, x[i].len);
			}
			done += x[i].len;
		}
		qcow2_io_end(e->q, t);
	}
	return 0;
}

/*
 * Write guest range: in place, or allocate (COW head/tail read through the
 * engine, zero range when not fresh), like img/img_qcow2.c does.
 */
static int eng_write(struct eng *e, uint64_t off, uint64_t len, const uint8_t *buf)
{
	uint64_t done = 0;

	while (done < len) {
		struct qcow2_alloc a;
		struct waitf wf;
		unsigned t;
		int ret;

		wait_init(&wf);
		t = qcow2_io_begin(e->q);
		ret = qcow2_map_write(e->q, off + done, len - done, &a, &wf.w);
		if (ret == -EAGAIN) {
			qcow2_io_end(e->q, t);
			wait_woken(&wf);
			if (wf.err)
				return wf.err;
			continue;
		}
		if (ret < 0) {
			qcow2_io_end(e->q, t);
			return ret;
		}
		if (ret == QCOW2_WRITE_INPLACE) {
			ret = do_write_data(e, buf + (a.off - off), a.len, a.host);
		} else {
			uint64_t head = a.off - a.cow_start, tail = a.cow_end - a.off - a.len;
			uint64_t total = a.cow_end - a.cow_start;
			uint8_t *b = malloc(total);

			ret = 0;
			if (head && !a.head_zero)
				ret = eng_read(e, a.cow_start, head, b);
			else
				memset(b, 0, head);
			if (!ret && tail && !a.tail_zero)
				ret = eng_read(e, a.off + a.len, tail, b + head + a.len);
			else if (!ret)
				memset(b + head + a.len, 0, tail);
			memcpy(b + head, buf + (a.off - off), a.len);
			if (!ret && !a.fresh)
				ret = do_zero_range(e, a.host - head, total);
			if (!ret)
				ret = do_write_data(e, b, total, a.host - head);
			free(b);
			qcow2_alloc_finish(e->q, &a, ret);
		}
		qcow2_io_end(e->q, t);
		if (ret < 0)
			return ret;
		done += a.len;
	}
	return 0;
}

struct flushf {
	struct qcow2_flush f;
	int done, res;
	size_t syncs;    /* fdatasyncs logged when it ended */
	bool after_sync; /* it ended from an fdatasync's completion */
};

static size_t fsyncs_logged(void);

static void flush_done(struct qcow2_flush *f, int res)
{
	struct flushf *x = (struct flushf *)f;

	x->done++;
	x->res = res;
	x->syncs = fsyncs_logged();
	x->after_sync = fake_log_count() && fake_log_get(fake_log_count() - 1)->type == FAKE_FSYNC;
}

static int eng_flush(struct eng *e)
{
	struct flushf f;

	memset(&f, 0, sizeof(f));
	f.f.done = flush_done;
	qcow2_flush(e->q, &f.f);
	CU_ASSERT_EQUAL(f.done, 0); /* never inside the call */
	for (int i = 0; i < 100000 && !f.done; i++)
		run();
	CU_ASSERT_EQUAL(f.done, 1);
	return f.res;
}

static int eng_zero(struct eng *e, uint64_t off, uint64_t len, bool zero, bool unmap)
{
	uint64_t done = 0;

	while (done < len) {
		struct waitf wf;
		uint64_t dl = 0;
		int ret;

		wait_init(&wf);
		ret = qcow2_zero_step(e->q, off + done, len - done, zero, unmap, &dl, &wf.w);
		if (ret == -EAGAIN) {
			wait_woken(&wf);
			continue;
		}
		if (ret < 0)
			return ret;
		if (ret == QCOW2_Z_WRITE) {
			uint8_t *z = calloc(1, dl);

			ret = eng_write(e, off + done, dl, z);
			free(z);
			if (ret < 0)
				return ret;
		}
		done += dl;
	}
	return 0;
}

/* ---- image consistency checker (crash images) ---- */

struct chk {
	const uint8_t *b;
	uint64_t size;
	struct qcow2_header_info h;
	uint64_t *rt;
};

static uint64_t rd64(const struct chk *c, uint64_t off)
{
	return off + 8 <= c->size ? qcow2_be64(c->b + off) : 0;
}

static uint64_t refcount(const struct chk *c, uint64_t host)
{
	uint64_t cl = host >> c->h.cluster_bits, rti = cl >> c->h.refcount_block_bits;
	uint64_t rb, idx = cl & ((1ull << c->h.refcount_block_bits) - 1);
	uint8_t tmp[8] = {0};
	unsigned order = c->h.refcount_order;
	uint64_t byte;

	if (rti >= c->h.refcount_table_entries)
		return 0;
	rb = c->rt[rti] & QCOW2_RTE_OFFSET_MASK;
	if (!rb)
		return 0;
	byte = order >= 3 ? idx << (order - 3) : idx >> (3 - order);
	if (rb + byte + 8 > c->size) {
		if (rb + byte >= c->size)
			return 0;
		memcpy(tmp, c->b + rb + byte, c->size - rb - byte);
	} else {
		memcpy(tmp, c->b + rb + byte, 8);
	}
	/* re-index relative to the copied bytes */
	return qcow2_refcount_get(tmp, order >= 3 ? 0 : idx & ((8u >> order) - 1), order);
}

/* 0 if consistent, else -1 with a message. */
static int check_image(const uint8_t *b, uint64_t size, char *why, size_t wlen)
{
	struct chk c = {.b = b, .size = size};
	char msg[200];
	uint64_t cs;
	int bad = 0;

	if (qcow2_header_parse(b, size < (2u << 20) ? size : (2u << 20), size, &c.h, msg,
			       sizeof(msg)) < 0) {
		snprintf(why, wlen, "header: %s", msg);
		return -1;
	}
	cs = c.h.cluster_size;
	c.rt = calloc(c.h.refcount_table_entries, 8);
	for (uint64_t i = 0; i < c.h.refcount_table_entries; i++)
		c.rt[i] = rd64(&c, c.h.refcount_table_offset + i * 8);
	for (uint64_t i = 0; i < c.h.refcount_table_entries && !bad; i++) {
		uint64_t rb = c.rt[i] & QCOW2_RTE_OFFSET_MASK;

		if (rb && refcount(&c, rb) == 0) {
			snprintf(why, wlen, "refcount block 0x%llx has refcount 0",
				 (unsigned long long)rb);
			bad = 1;
		}
	}
	for (uint64_t o = 0; o < c.h.refcount_table_clusters * cs && !bad; o += cs)
		if (refcount(&c, c.h.refcount_table_offset + o) == 0) {
			snprintf(why, wlen, "refcount table has refcount 0");
			bad = 1;
		}
	for (uint64_t o = 0; o < (uint64_t)c.h.l1_size * 8 && !bad; o += cs)
		if (refcount(&c, c.h.l1_table_offset + o) == 0) {
			snprintf(why, wlen, "L1 table cluster 0x%llx has refcount 0",
				 (unsigned long long)(c.h.l1_table_offset + o));
			bad = 1;
		}
	for (uint32_t i = 0; i < c.h.l1_size && !bad; i++) {
		uint64_t l2 = rd64(&c, c.h.l1_table_offset + i * 8ull) & QCOW2_L1E_OFFSET_MASK;

		if (!l2)
			continue;
		if (l2 + cs > size || refcount(&c, l2) == 0) {
			snprintf(why, wlen, "L2 table 0x%llx (L1 %u) %s", (unsigned long long)l2, i,
				 l2 + cs > size ? "past EOF" : "has refcount 0");
			bad = 1;
			break;
		}
		for (uint32_t j = 0; j < c.h.l2_entries && !bad; j++) {
			uint64_t e = rd64(&c, l2 + (uint64_t)j * c.h.l2_entry_size), d;

			if (e & QCOW2_OFLAG_COMPRESSED)
				d = qcow2_compressed_offset(e, c.h.cluster_bits) & ~(cs - 1);
			else
				d = e & QCOW2_L2E_OFFSET_MASK;
			if (d && refcount(&c, d) == 0) {
				snprintf(why, wlen,
					 "data cluster 0x%llx (L1 %u L2 %u) has refcount 0",
					 (unsigned long long)d, i, j);
				bad = 1;
			}
		}
	}
	free(c.rt);
	return bad ? -1 : 0;
}

/* Every crash image of the record so far is consistent. */
static void check_crash_images(struct eng *e, unsigned samples)
{
	size_t n = fake_log_count(), nsync = 0, stride;
	char why[256];

	for (size_t i = 0; i < n; i++)
		nsync += fake_log_get(i)->type == FAKE_FSYNC;
	stride = nsync / 48 + 1; /* about 50 points per record at most */
	for (size_t i = 0, k = 0; i <= n; i++) {
		bool sync_point = i == n || fake_log_get(i)->type == FAKE_FSYNC;

		if (sync_point && i < n && k++ % stride)
			continue;
		if (!sync_point && rnd() % (8 * stride))
			continue;
		for (unsigned s = 0; s <= samples; s++) {
			uint8_t *img;
			uint64_t len;

			CU_ASSERT_EQUAL_FATAL(
			    fake_crash_image(e->id, i, s ? rnd() | 1 : 0, &img, &len), 0);
			if (check_image(img, len, why, sizeof(why)) < 0) {
				fprintf(stderr,
					"crash image after record entry %zu (seed sample %u): %s\n",
					i, s, why);
				CU_FAIL("inconsistent crash image");
				free(img);
				return;
			}
			free(img);
		}
	}
}

/*
 * The writes of file @id the fdatasyncs among the first @at record entries
 * made durable: those before the entry returned (an fdatasync covers what
 * had completed when it was submitted, fake_log.sub).
 */
static size_t synced_before(int id, size_t at)
{
	size_t durable = 0;

	for (size_t j = 0; j < at && j < fake_log_count(); j++) {
		const struct fake_log *x = fake_log_get(j);

		if (x->type == FAKE_FSYNC && x->file == id && x->sub > durable)
			durable = x->sub;
	}
	return durable;
}

/*
 * The explicit order rule: each L2 slice write that links a data cluster is
 * submitted after an fdatasync ended that was submitted after the last write
 * of that data cluster (and after the last refcount-block write raising its
 * refcount) completed; in a new table, written before the L1 entry naming
 * it (writeback.c's P1), that fdatasync ended before the L1 entry's write
 * was submitted (a write in flight may reach the disk at any time).
 * With the early link off: it lets allocation bits of a linked extended-L2
 * cluster go out before the data (test_early_link checks it instead), and
 * the link batches it starts keep the refcount order, not the data's.
 */
static void check_l2_order(struct eng *e)
{
	const struct qcow2_header_info *h = qcow2_header(e->q);
	size_t n = fake_log_count();
	uint64_t cs = h->cluster_size, fsize;
	const uint8_t *img = fake_file_data(e->id, &fsize);
	uint64_t l1off = h->l1_table_offset;
	size_t checked = 0;

	for (size_t i = 0; i < n; i++) {
		const struct fake_log *l = fake_log_get(i);
		bool is_l2 = false;
		size_t at = i;         /* the write that makes the entry reachable */
		size_t reach = l->sub; /* from when it may be on disk */

		if (l->type != FAKE_WRITE || l->file != e->id)
			continue;
		/* is it inside an active L2 table (per the final L1)? */
		for (uint32_t k = 0; k < h->l1_size; k++) {
			uint64_t t = qcow2_be64(img + l1off + k * 8ull) & QCOW2_L1E_OFFSET_MASK;
			uint64_t lo = l1off + k * 8ull;

			if (!t || l->off < t || l->off >= t + cs)
				continue;
			is_l2 = true;
			/* a new table is reached once the L1 entry naming it is
			 * written, maybe after the table (writeback.c: P1) */
			at = SIZE_MAX;
			for (size_t j = 0; j < n && (at == SIZE_MAX || j < i); j++) {
				const struct fake_log *x = fake_log_get(j);

				if (x->type == FAKE_WRITE && x->file == e->id && x->off <= lo &&
				    lo + 8 <= x->off + x->len &&
				    (qcow2_be64(x->data + (lo - x->off)) & QCOW2_L1E_OFFSET_MASK) ==
					t)
					at = j;
			}
			if (at == SIZE_MAX || at < i)
				at = i;
			if (fake_log_get(at)->sub > reach)
				reach = fake_log_get(at)->sub;
		}
		if (!is_l2)
			continue;
		for (uint64_t p = 0; p + 8 <= l->len; p += h->l2_entry_size) {
			uint64_t ent = qcow2_be64(l->data + p), d = ent & QCOW2_L2E_OFFSET_MASK;
			size_t last_data = SIZE_MAX;

			if (!d || (ent & QCOW2_OFLAG_COMPRESSED))
				continue;
			for (size_t j = 0; j < i; j++) {
				const struct fake_log *x = fake_log_get(j);

				if (x->file == e->id && x->type == FAKE_WRITE && x->off < d + cs &&
				    d < x->off + x->len)
					last_data = j;
			}
			checked++;
			if (last_data == SIZE_MAX)
				continue; /* written before the record started */
			if (synced_before(e->id, reach) <= last_data) {
				fprintf(stderr,
					"L2 write #%zu (reachable from entry %zu) links cluster "
					"0x%llx whose data (#%zu) was not synced before\n",
					i, reach, (unsigned long long)d, last_data);
				CU_FAIL("L2 written before its data was durable");
				return;
			}
		}
	}
	CU_ASSERT(checked > 0);
}

/* ---- tests ---- */

static void fill(uint8_t *b, uint64_t n, unsigned tag)
{
	for (uint64_t i = 0; i < n; i++)
		b[i] = (uint8_t)(tag + i / 512);
}

static void workload(struct eng *e, uint8_t *model, uint64_t size, unsigned ops, unsigned max_io,
		     bool tolerate_errors)
{
	uint8_t *buf = malloc(max_io);

	for (unsigned i = 0; i < ops; i++) {
		uint64_t len = ((rnd() % (max_io / 512)) + 1) * 512;
		uint64_t off = (rnd() % ((size - len) / 512 + 1)) * 512;
		unsigned k = rnd() % 10;
		int ret;

		if (k < 6) {
			fill(buf, len, rnd());
			ret = eng_write(e, off, len, buf);
			if (!tolerate_errors)
				CU_ASSERT_EQUAL(ret, 0);
			if (ret == 0)
				memcpy(model + off, buf, len);
		} else if (k < 8) {
			ret = eng_read(e, off, len, buf);
			if (!tolerate_errors) {
				CU_ASSERT_EQUAL(ret, 0);
				CU_ASSERT(ret != 0 || memcmp(buf, model + off, len) == 0);
			}
		} else if (k < 9) {
			ret = eng_zero(e, off, len, true, rnd() % 2);
			if (!tolerate_errors)
				CU_ASSERT_EQUAL(ret, 0);
			if (ret == 0)
				memset(model + off, 0, len);
		} else {
			ret = eng_flush(e);
			if (!tolerate_errors)
				CU_ASSERT_EQUAL(ret, 0);
		}
	}
	free(buf);
}

/* The guest reads back @model, in 1 MiB steps (images up to 1 GiB: one buffer of
 * the whole would cost a page fault per 4 KiB). */
static void verify(struct eng *e, const uint8_t *model, uint64_t size)
{
	const uint64_t step = 1u << 20;
	uint8_t *buf = malloc(step);
	bool same = true;

	for (uint64_t off = 0; off < size && same; off += step) {
		uint64_t n = size - off < step ? size - off : step;

		CU_ASSERT_EQUAL(eng_read(e, off, n, buf), 0);
		same = memcmp(buf, model + off, n) == 0;
	}
	CU_ASSERT(same);
	free(buf);
}

/*
 * The end of a write-back test that may leak: a FLUSH succeeds, the guest
 * reads back @model (its first @size bytes; NULL: not checked), every crash
 * image of the record is consistent (check_crash_images with @samples random
 * subsets per point), the engine is not corrupt; then it is closed and
 * qemu-img check finds leaks at most (exit 0 or 3), never corruption.
 */
static void wb_end_leaky(struct eng *e, const uint8_t *model, uint64_t size, unsigned samples)
{
	CU_ASSERT_EQUAL(eng_flush(e), 0);
	if (model)
		verify(e, model, size);
	check_crash_images(e, samples);
	CU_ASSERT_FALSE(qcow2_is_corrupt(e->q));
	eng_close(e);
	eng_qemu_check_leaky(e);
}

static void order_case_o(const char *opts, const struct qcow2_opts *o, uint64_t size, unsigned ops,
			 unsigned max_io, unsigned shuffle, bool expect_fill)
{
	struct eng e;
	uint8_t *model = calloc(1, size);
	struct qcow2_opts strict = o ? *o : (struct qcow2_opts){0};

	strict.no_early_link = true;
	fake_set_shuffle(shuffle);
	eng_create(&e, opts, size, &strict);
	workload(&e, model, size, ops, max_io, false);
	/* gaps between dirty slices bridged with clean ones (writeback.c) */
	if (expect_fill)
		CU_ASSERT(e.q->n_wb_fill > 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	verify(&e, model, size);
	check_l2_order(&e);
	check_crash_images(&e, 2);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	fake_set_shuffle(0);
	free(model);
}

static void order_case(const char *opts, uint64_t size, unsigned ops, unsigned max_io,
		       unsigned shuffle)
{
	order_case_o(opts, NULL, size, ops, max_io, shuffle, false);
}

static void test_order_64k(void)
{
	order_case("cluster_size=65536", 32ull << 20, 150, 192 << 10, 0);
}

static void test_order_small_shuffled(void)
{
	/* 512-byte clusters: new L2 tables, new refcount blocks, table growth */
	order_case("cluster_size=512,refcount_bits=16", 2ull << 20, 200, 16 << 10, 99);
	/* every fdatasync in flight for 3 loop iterations: writes complete
	 * beside it (it covers only what completed before it was submitted) */
	fake_set_sync_hold(3);
	order_case("cluster_size=512,refcount_bits=16", 2ull << 20, 200, 16 << 10, 41);
	fake_set_sync_hold(0);
}

static void test_order_extl2(void)
{
	order_case("cluster_size=16384,extended_l2=on,refcount_bits=4", 8ull << 20, 150, 48 << 10,
		   7);
}

/*
 * Many slices per L2 table (1 KiB slices of 16 KiB tables) and writes
 * spread over several tables: batches bridge the gaps between dirty slices
 * with clean cached ones; the order and every crash image stay right.
 */
static void test_order_bridged(void)
{
	struct qcow2_opts o = {.cache_entry_size = 1024};

	order_case_o("cluster_size=16384", &o, 64ull << 20, 200, 16 << 10, 0, true);
	order_case_o("cluster_size=16384,refcount_bits=16", &o, 64ull << 20, 200, 16 << 10, 5,
		     true);
	order_case_o("cluster_size=16384,extended_l2=on", &o, 64ull << 20, 200, 16 << 10, 11, true);
}

/*
 * Extended L2, no backing file: writes into unallocated subclusters of a
 * cluster this engine wrote whole (or took fresh) set their allocation bits
 * at map time (mapping.c, early link). Every crash image stays consistent
 * (refcounts before the entries pointing at their clusters), the data reads
 * back, qemu-img check is clean; with the option off nothing is linked early.
 */
static void test_early_link(void)
{
	static const char *const optss[] = {
	    "cluster_size=16384,extended_l2=on",
	    "cluster_size=65536,extended_l2=on,refcount_bits=4",
	};

	for (unsigned k = 0; k < 2; k++) {
		struct eng e;
		uint64_t size = 16ull << 20;
		uint8_t *model = calloc(1, size);

		eng_create(&e, optss[k], size, NULL);
		workload(&e, model, size, 300, 16 << 10, false);
		CU_ASSERT(e.q->n_early_links > 0);
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		verify(&e, model, size);
		check_crash_images(&e, 2);
		eng_close(&e);
		CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
		free(model);
	}
	{
		struct eng e;
		struct qcow2_opts o = {.no_early_link = true};
		uint64_t size = 8ull << 20;
		uint8_t *model = calloc(1, size);

		eng_create(&e, "cluster_size=16384,extended_l2=on", size, &o);
		workload(&e, model, size, 100, 16 << 10, false);
		CU_ASSERT_EQUAL(e.q->n_early_links, 0);
		verify(&e, model, size);
		eng_close(&e);
		free(model);
	}
}

/*
 * Map and write a new cluster's first write of @len bytes at guest @off the
 * way img/img_qcow2.c does with its whole-cluster fill: the cluster written
 * whole (zeroes around the data, one write) and a->rest_zero set, or, with
 * !@pad, only [cow_start, cow_end) (the --no-cluster-fill shape). Returns
 * the qcow2_alloc kind's mapping result (QCOW2_WRITE_ALLOC expected).
 */
static int pad_write(struct eng *e, uint64_t off, uint64_t len, uint8_t pat, bool pad)
{
	struct qcow2_alloc a;
	struct waitf wf;
	uint8_t *b;
	uint64_t c0;
	int ret;

	do {
		wait_init(&wf);
		ret = qcow2_map_write(e->q, off, len, &a, &wf.w);
		if (ret == -EAGAIN)
			wait_woken(&wf);
	} while (ret == -EAGAIN);
	if (ret != QCOW2_WRITE_ALLOC)
		return ret;
	CU_ASSERT(a.new_host);
	CU_ASSERT_EQUAL(a.len, len);
	c0 = a.host - (a.off & 65535);
	b = calloc(1, 65536);
	memset(b + (off & 65535), pat, len);
	if (pad) {
		ret = do_write_data(e, b, 65536, c0);
		a.rest_zero = true;
	} else {
		ret = do_write_data(e, b + (a.cow_start & 65535), a.cow_end - a.cow_start,
				    c0 + (a.cow_start & 65535));
	}
	free(b);
	qcow2_alloc_finish(e->q, &a, ret);
	return ret < 0 ? ret : QCOW2_WRITE_ALLOC;
}

/* The L2 bitmap of guest cluster @gc (its slice cached by a map before). */
static uint64_t l2_bitmap(struct eng *e, uint64_t gc)
{
	static uint8_t raw[4096] __attribute__((aligned(4096)));
	uint64_t l2, bm = 0;
	struct cmdf c;

	CU_ASSERT_EQUAL_FATAL(eng_flush(e), 0);
	l2 = e->q->l1[0] & QCOW2_L1E_OFFSET_MASK;
	CU_ASSERT_FATAL(l2 != 0);
	memset(&c, 0, sizeof(c));
	c.cmd.done = cmd_done;
	io_read(g_loop, &c.cmd, &e->file, raw, sizeof(raw), l2); /* the file, not the cache */
	while (!c.done)
		run();
	CU_ASSERT_EQUAL_FATAL(c.res, (int)sizeof(raw));
	for (int i = 8; i < 16; i++)
		bm = bm << 8 | raw[gc * 16 + i];
	return bm;
}

/*
 * Extended L2: a new cluster written whole by its first write (the caller's
 * fill, a->rest_zero) in an image with no backing file is linked with every
 * subcluster allocated (32 allocation bits, no zero bit), so later writes into
 * it are in place; the subclusters nobody wrote read zeroes and qemu-img
 * check is clean. With a backing file, or a first write that did not write
 * the cluster whole, only the subclusters written are allocated, and the
 * next write into another subcluster allocates (the backing file's data
 * stays visible there).
 */
static void test_whole_sc(void)
{
	static const struct {
		bool backing, pad;
		uint64_t bits; /* the L2 bitmap after the first write */
	} cases[] = {
	    {false, true, 0xffffffffull},
	    {false, false, 0x3ull << 4},
	    {true, true, 0x3ull << 4},
	};

	for (unsigned k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		uint8_t *buf = malloc(65536), want[65536];
		struct qcow2_alloc a;
		struct waitf wf;
		struct eng e;
		int ret;

		eng_create(&e, "cluster_size=65536,extended_l2=on", 16ull << 20, NULL);
		if (cases[k].backing)
			qcow2_set_backing_size(e.q, 16ull << 20);
		CU_ASSERT_EQUAL(pad_write(&e, 3 * 65536 + 8192, 4096, 0xa5, cases[k].pad),
				QCOW2_WRITE_ALLOC);
		CU_ASSERT_EQUAL(l2_bitmap(&e, 3), cases[k].bits);
		/* the next write into another subcluster of that cluster */
		wait_init(&wf);
		do {
			ret = qcow2_map_write(e.q, 3 * 65536 + 40960, 4096, &a, &wf.w);
			if (ret == -EAGAIN)
				wait_woken(&wf);
		} while (ret == -EAGAIN);
		CU_ASSERT_EQUAL(ret, cases[k].bits == 0xffffffffull ? QCOW2_WRITE_INPLACE
								    : QCOW2_WRITE_ALLOC);
		if (ret == QCOW2_WRITE_ALLOC)
			qcow2_alloc_finish(e.q, &a, -EIO); /* not written: left as it was */
		if (!cases[k].backing) {
			memset(want, 0, sizeof(want));
			memset(want + 8192, 0xa5, 4096);
			CU_ASSERT_EQUAL(eng_read(&e, 3 * 65536, 65536, buf), 0);
			CU_ASSERT(memcmp(buf, want, sizeof(want)) == 0);
		}
		eng_close(&e);
		if (!cases[k].backing) {
			CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
		} else {
			fake_file_drop(e.id);
		}
		free(buf);
	}
}

/* Two independent 64-bit hashes of @len bytes, a word at a time (FNV-1a's
 * step, and a multiply-rotate one). */
static void img_hash(const uint8_t *b, uint64_t len, uint64_t h[2])
{
	h[0] = 0xcbf29ce484222325ull ^ len;
	h[1] = 0x9e3779b97f4a7c15ull + len;
	for (uint64_t i = 0; i < len; i += 8) {
		uint64_t w = 0;

		memcpy(&w, b + i, len - i < 8 ? len - i : 8);
		h[0] = (h[0] ^ w) * 0x100000001b3ull;
		h[1] = (h[1] ^ w) * 0xff51afd7ed558ccdull;
		h[1] = (h[1] << 29) | (h[1] >> 35);
	}
}

/*
 * Every crash image of the record (every write and fdatasync, three subsets
 * of the unsynced writes each) is consistent, and qemu-img check finds at
 * most leaks in it. Many are the same bytes (seed 0, only what the syncs
 * made durable, stays the same from one fdatasync to the next; a subset of
 * no unsynced write is that image too): qemu-img checks each distinct
 * image once (by two 64-bit hashes of its bytes), check_image every one.
 */
static void check_every_crash_point(struct eng *e)
{
	size_t n = fake_log_count(), nseen = 0, total = 0;
	uint64_t(*seen)[2] = calloc(3 * (n + 1), sizeof(*seen));
	char why[256], *path = P("crash.qcow2");

	CU_ASSERT_FATAL(seen != NULL);
	for (size_t i = 0; i <= n; i++) {
		for (unsigned s = 0; s < 3; s++) {
			uint8_t *img;
			uint64_t len, h[2];
			bool dup = false;
			int r;

			CU_ASSERT_EQUAL_FATAL(
			    fake_crash_image(e->id, i, s ? rnd() | 1 : 0, &img, &len), 0);
			total++;
			if (check_image(img, len, why, sizeof(why)) < 0) {
				fprintf(stderr, "crash image after record entry %zu: %s\n", i, why);
				CU_FAIL("inconsistent crash image");
			}
			img_hash(img, len, h);
			for (size_t k = 0; k < nseen && !dup; k++)
				dup = seen[k][0] == h[0] && seen[k][1] == h[1];
			if (dup) {
				free(img);
				continue;
			}
			seen[nseen][0] = h[0];
			seen[nseen++][1] = h[1];
			CU_ASSERT_EQUAL_FATAL(fake_buf_save(img, len, path), 0);
			free(img);
			r = tu_sh("qemu-img check -q %s 2>/dev/null", path);
			if (r != 0 && r != 3) {
				tu_sh("qemu-img check %s >&2", path);
				CU_FAIL("qemu-img check of a crash image");
			}
		}
	}
	fprintf(stderr, "%zu crash images, %zu distinct checked by qemu-img\n", total, nseen);
	free(seen);
	unlink(path);
}

/* The L2 slice writes of the record inside [tbl, tbl + cs), in order. */
static size_t table_writes(struct eng *e, uint64_t tbl, uint64_t cs, const struct fake_log **w,
			   size_t max)
{
	size_t k = 0;

	for (size_t i = 0; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type == FAKE_WRITE && l->file == e->id && l->off >= tbl &&
		    l->off < tbl + cs && k < max)
			w[k++] = l;
	}
	return k;
}

/*
 * The batch shapes of bridging, on one L2 table of 16 slices: slices 1, 4,
 * 9 and 14 dirty, 6 evicted, 12 being loaded. One write carries 1-4 (2 and
 * 3 the cached bytes, byte for byte), 9 and 14 go alone (their gaps hold a
 * slice that is not cached or not READY). Slice 3, changed after the batch
 * took its copy, goes out with the next batch with its new bytes. Every
 * crash point of both batches is consistent.
 */
static void bridge_case(const char *opts)
{
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	const struct fake_log *w[16];
	struct q2_slice *s;
	struct qcow2_extent x[8];
	uint8_t buf[4096], *before;
	struct flushf f;
	struct waitf wf;
	struct eng e;
	uint64_t ss, span, tbl, cs, dl, fill0;
	unsigned t;
	int n;

	eng_create(&e, opts, 1ull << 30, &o);
	ss = e.q->slice_size;
	cs = e.q->cs;
	CU_ASSERT_EQUAL_FATAL(cs / ss, 16);
	span = (ss / e.q->l2e_size) << e.q->cb; /* guest bytes per slice */
	/* one allocated cluster under every slice of table 0 */
	for (unsigned k = 0; k < 16; k++) {
		memset(buf, 'a' + k, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, k * span, sizeof(buf), buf), 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	tbl = e.q->l1[0] & QCOW2_L1E_OFFSET_MASK;
	CU_ASSERT_EQUAL_FATAL(e.q->l2c.ndirty, 0);
	fake_log_reset();
	fill0 = e.q->n_wb_fill;
	/* dirty 1, 4, 9, 14: zero flag on their (kept) clusters, no I/O */
	for (unsigned i = 0; i < 4; i++) {
		static const unsigned dirty[4] = {1, 4, 9, 14};

		dl = 0;
		wait_init(&wf);
		CU_ASSERT_EQUAL(qcow2_zero_step(e.q, dirty[i] * span, cs, true, false, &dl, &wf.w),
				QCOW2_Z_DONE);
	}
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 4);
	/* 6 evicted; 12 evicted and loading again */
	q2_cache_forget(&e.q->l2c, tbl + 6 * ss);
	q2_cache_forget(&e.q->l2c, tbl + 12 * ss);
	CU_ASSERT_PTR_NULL(q2_cache_peek(&e.q->l2c, tbl + 6 * ss));
	wait_init(&wf);
	t = qcow2_io_begin(e.q);
	CU_ASSERT_EQUAL(qcow2_map_read(e.q, 12 * span, 4096, x, 8, &wf.w), -EAGAIN);
	qcow2_io_end(e.q, t);
	/* what slices 1-4 hold when the batch takes them */
	before = malloc(4 * ss);
	for (unsigned k = 1; k <= 4; k++) {
		s = q2_cache_peek(&e.q->l2c, tbl + k * ss);
		CU_ASSERT_PTR_NOT_NULL_FATAL(s);
		memcpy(before + (k - 1) * ss, s->buf, ss);
	}
	memset(&f, 0, sizeof(f));
	f.f.done = flush_done;
	qcow2_flush(e.q, &f.f);
	CU_ASSERT_PTR_NOT_NULL(e.q->batch);
	/* slice 3 (a filler of this batch) changes while the batch is in flight */
	wait_init(&wf);
	dl = 0;
	CU_ASSERT_EQUAL(qcow2_zero_step(e.q, 3 * span, cs, true, false, &dl, &wf.w), QCOW2_Z_DONE);
	for (int i = 0; i < 100000 && !f.done; i++)
		run();
	CU_ASSERT_EQUAL_FATAL(f.done, 1);
	CU_ASSERT_EQUAL(f.res, 0);
	CU_ASSERT_EQUAL(e.q->n_wb_fill - fill0, 2);
	n = (int)table_writes(&e, tbl, cs, w, 16);
	CU_ASSERT_EQUAL_FATAL(n, 3);
	CU_ASSERT_EQUAL(w[0]->off, tbl + ss);
	CU_ASSERT_EQUAL(w[0]->len, 4 * ss);
	CU_ASSERT(memcmp(w[0]->data, before, 4 * ss) == 0);
	CU_ASSERT_EQUAL(w[1]->off, tbl + 9 * ss);
	CU_ASSERT_EQUAL(w[1]->len, ss);
	CU_ASSERT_EQUAL(w[2]->off, tbl + 14 * ss);
	CU_ASSERT_EQUAL(w[2]->len, ss);
	s = q2_cache_peek(&e.q->l2c, tbl + 3 * ss);
	CU_ASSERT_FATAL(s != NULL);
	CU_ASSERT_TRUE(s->dirty);
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 1);
	/* the load of 12 ends; the next batch writes slice 3 alone, its new bytes */
	for (int i = 0; i < 1000 && fake_pending(); i++)
		run();
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	n = (int)table_writes(&e, tbl, cs, w, 16);
	CU_ASSERT_EQUAL_FATAL(n, 4);
	CU_ASSERT_EQUAL(w[3]->off, tbl + 3 * ss);
	CU_ASSERT_EQUAL(w[3]->len, ss);
	CU_ASSERT(memcmp(w[3]->data, s->buf, ss) == 0);
	/* the file's table equals every cached slice */
	{
		uint64_t fsize;
		const uint8_t *img = fake_file_data(e.id, &fsize);

		for (unsigned k = 0; k < 16; k++) {
			s = q2_cache_peek(&e.q->l2c, tbl + k * ss);
			if (k == 6)
				CU_ASSERT_PTR_NULL(s);
			if (s)
				CU_ASSERT(memcmp(img + tbl + k * ss, s->buf, ss) == 0);
		}
	}
	check_every_crash_point(&e);
	/* zeroed where the zero flag was set, the data elsewhere */
	for (unsigned k = 0; k < 16; k++) {
		bool zeroed = k == 1 || k == 3 || k == 4 || k == 9 || k == 14;

		CU_ASSERT_EQUAL(eng_read(&e, k * span, sizeof(buf), buf), 0);
		CU_ASSERT_EQUAL(buf[0], zeroed ? 0 : 'a' + k);
		CU_ASSERT_EQUAL(buf[4095], zeroed ? 0 : 'a' + k);
	}
	free(before);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/*
 * A bridged write that fails: its fillers are marked dirty as well as the
 * dirty slices it carried (the failed write may have left anything in their
 * place), and the next batch writes all of them.
 */
static void bridge_fail_case(const char *opts)
{
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	const struct fake_log *w[16];
	uint8_t buf[4096];
	struct waitf wf;
	struct eng e;
	uint64_t ss, span, tbl, cs, dl;
	int n;

	eng_create(&e, opts, 1ull << 30, &o);
	ss = e.q->slice_size;
	cs = e.q->cs;
	CU_ASSERT_EQUAL_FATAL(cs / ss, 16);
	span = (ss / e.q->l2e_size) << e.q->cb;
	for (unsigned k = 0; k < 16; k++) {
		memset(buf, 'a' + k, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, k * span, sizeof(buf), buf), 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	tbl = e.q->l1[0] & QCOW2_L1E_OFFSET_MASK;
	for (unsigned k = 1; k <= 4; k += 3) {
		dl = 0;
		wait_init(&wf);
		CU_ASSERT_EQUAL(qcow2_zero_step(e.q, k * span, cs, true, false, &dl, &wf.w),
				QCOW2_Z_DONE);
	}
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 2);
	fake_log_reset();
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_WRITEV, 1, -EIO), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), -EIO);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 4);
	for (unsigned k = 1; k <= 4; k++) {
		struct q2_slice *s = q2_cache_peek(&e.q->l2c, tbl + k * ss);

		CU_ASSERT_FATAL(s != NULL);
		CU_ASSERT_TRUE(s->dirty);
	}
	fake_log_reset();
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 0);
	n = (int)table_writes(&e, tbl, cs, w, 16);
	CU_ASSERT_EQUAL_FATAL(n, 1);
	CU_ASSERT_EQUAL(w[0]->off, tbl + ss);
	CU_ASSERT_EQUAL(w[0]->len, 4 * ss);
	for (unsigned k = 1; k <= 4; k++)
		CU_ASSERT(memcmp(w[0]->data + (k - 1) * ss,
				 q2_cache_peek(&e.q->l2c, tbl + k * ss)->buf, ss) == 0);
	for (unsigned k = 0; k < 16; k++) {
		bool zeroed = k == 1 || k == 4;

		CU_ASSERT_EQUAL(eng_read(&e, k * span, sizeof(buf), buf), 0);
		CU_ASSERT_EQUAL(buf[0], zeroed ? 0 : 'a' + k);
	}
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/*
 * A batch writes only the dirty part of a slice, at the file's O_DIRECT
 * alignment: new clusters linked in two slices of one table, bridged
 * (one write from the first span's start to the second's
 * end, the slices between copied) and with bridging off (two writes of one
 * alignment unit each, holding the new entries). The file's table then
 * equals the cache, and the data reads back.
 */
static void span_case(const char *opts, uint32_t bridge)
{
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	const struct fake_log *w[16];
	uint8_t buf[4096];
	struct eng e;
	uint64_t ss, span, tbl, cs, unit, fsize;
	const uint8_t *img;
	int n;

	qcow2_wb_tune(bridge, false, 0);
	eng_create(&e, opts, 1ull << 30, &o);
	ss = e.q->slice_size;
	cs = e.q->cs;
	unit = e.file.align > ss / 8 ? e.file.align : ss / 8;
	span = (ss / e.q->l2e_size) << e.q->cb;
	memset(buf, 'x', sizeof(buf));
	for (unsigned k = 0; k < 16; k++) /* every slice of the table cached */
		CU_ASSERT_EQUAL(eng_write(&e, k * span, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	tbl = e.q->l1[0] & QCOW2_L1E_OFFSET_MASK;
	fake_log_reset();
	/* entry 100 of slice 2 (a new cluster), entry 3 of slice 5 */
	for (unsigned k = 0; k < 2; k++) {
		uint64_t g = k ? 5 * span + 3 * cs : 2 * span + 100 * cs;

		memset(buf, 'a' + k, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, g, sizeof(buf), buf), 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	n = (int)table_writes(&e, tbl, cs, w, 16);
	{
		uint64_t a0 = (2 * ss + 100 * e.q->l2e_size) / unit * unit;
		uint64_t a1 = (5 * ss + 3 * e.q->l2e_size) / unit * unit;

		if (bridge) {
			CU_ASSERT_EQUAL_FATAL(n, 1);
			CU_ASSERT_EQUAL(w[0]->off, tbl + a0);
			CU_ASSERT_EQUAL(w[0]->len, a1 + unit - a0);
		} else {
			CU_ASSERT_EQUAL_FATAL(n, 2);
			CU_ASSERT_EQUAL(w[0]->off, tbl + a0);
			CU_ASSERT_EQUAL(w[0]->len, unit);
			CU_ASSERT_EQUAL(w[1]->off, tbl + a1);
			CU_ASSERT_EQUAL(w[1]->len, unit);
		}
	}
	img = fake_file_data(e.id, &fsize);
	for (unsigned k = 0; k < 16; k++) {
		struct q2_slice *s = q2_cache_peek(&e.q->l2c, tbl + k * ss);

		if (s)
			CU_ASSERT(memcmp(img + tbl + k * ss, s->buf, ss) == 0);
	}
	check_every_crash_point(&e);
	CU_ASSERT_EQUAL(eng_read(&e, 2 * span + 100 * cs, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(buf[0], 'a');
	CU_ASSERT_EQUAL(eng_read(&e, 5 * span + 3 * cs, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(buf[4095], 'b');
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_wb_tune(QCOW2_WB_BRIDGE_DEFAULT, false, 0);
}

static void test_dirty_spans(void)
{
	span_case("cluster_size=65536", 64 << 10);
	span_case("cluster_size=65536", 0);
	span_case("cluster_size=65536,extended_l2=on", 64 << 10);
	span_case("cluster_size=65536,extended_l2=on", 0);
}

/*
 * Bridging across tables (qcow2_wb_tune's cross_tables): a growing image's
 * L2 tables 1, 2 and 3 lie next to each other in the file (metadata from
 * the cursor, after table 0 and its data reserve). New clusters linked at
 * the end of table 1 and the start of table 2 go out in one write with the
 * switch, in two without; at the end of table 1 and the start of table 3
 * (gap within a raised limit), in two either way: only spans of
 * adjacent clusters are bridged, since a slice of a cluster between them
 * need not be a live table's. The file's tables equal the cache, every
 * crash point is consistent, the data reads back.
 */
static void xtab_case(const char *opts, bool xtab, unsigned far)
{
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	const struct fake_log *w[16];
	uint8_t buf[4096];
	struct eng e;
	uint64_t ss, span, tg, cs, unit, fsize, t[4], nsl, g0, g1;
	const uint8_t *img;
	int n;

	qcow2_wb_tune(QCOW2_WB_BRIDGE_DEFAULT, false, !xtab ? 0 : far ? 256u << 10 : 4096);
	eng_create(&e, opts, 2ull << 30, &o);
	ss = e.q->slice_size;
	cs = e.q->cs;
	unit = e.file.align > ss / 8 ? e.file.align : ss / 8;
	span = (ss / e.q->l2e_size) << e.q->cb; /* guest bytes per slice */
	tg = (cs / e.q->l2e_size) << e.q->cb;   /* guest bytes per table */
	nsl = cs / ss;
	memset(buf, 'x', sizeof(buf));
	for (unsigned k = 0; k < 4; k++) /* tables 0..3, in this order */
		CU_ASSERT_EQUAL(eng_write(&e, k * tg, sizeof(buf), buf), 0);
	for (unsigned k = 1; k < 4; k++) /* every slice of tables 1..3 cached */
		for (uint64_t j = 1; j < nsl; j++)
			CU_ASSERT_EQUAL(eng_write(&e, k * tg + j * span, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	for (unsigned k = 0; k < 4; k++)
		t[k] = e.q->l1[k] & QCOW2_L1E_OFFSET_MASK;
	CU_ASSERT_EQUAL_FATAL(t[2], t[1] + cs);
	CU_ASSERT_EQUAL_FATAL(t[3], t[2] + cs);
	fake_log_reset();
	/* an entry in the last unit but one of table 1, one in the second unit
	 * of table 2 (or 3): spans not contiguous (those merge anyway) */
	g0 = 2 * tg - (unit / e.q->l2e_size + 1) * cs;
	g1 = (far ? 3 : 2) * tg + (unit / e.q->l2e_size + 1) * cs;
	memset(buf, 'a', sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, g0, sizeof(buf), buf), 0);
	memset(buf, 'b', sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, g1, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	n = (int)table_writes(&e, t[1], 3 * cs, w, 16);
	{
		uint64_t a0 = t[1] + cs - 2 * unit, a1 = t[far ? 3 : 2] + unit;

		if (xtab && !far) {
			CU_ASSERT_EQUAL_FATAL(n, 1);
			CU_ASSERT_EQUAL(w[0]->off, a0);
			CU_ASSERT_EQUAL(w[0]->len, a1 + unit - w[0]->off);
		} else {
			CU_ASSERT_EQUAL_FATAL(n, 2);
			CU_ASSERT_EQUAL(w[0]->off, a0);
			CU_ASSERT_EQUAL(w[0]->len, unit);
			CU_ASSERT_EQUAL(w[1]->off, a1);
			CU_ASSERT_EQUAL(w[1]->len, unit);
		}
	}
	img = fake_file_data(e.id, &fsize);
	for (unsigned k = 1; k < 4; k++)
		for (uint64_t j = 0; j < nsl; j++) {
			struct q2_slice *s = q2_cache_peek(&e.q->l2c, t[k] + j * ss);

			if (s)
				CU_ASSERT(memcmp(img + t[k] + j * ss, s->buf, ss) == 0);
		}
	check_every_crash_point(&e);
	CU_ASSERT_EQUAL(eng_read(&e, g0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(buf[0], 'a');
	CU_ASSERT_EQUAL(eng_read(&e, g1, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(buf[4095], 'b');
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_wb_tune(QCOW2_WB_BRIDGE_DEFAULT, false, 0);
}

static void test_bridge_xtab(void)
{
	for (unsigned far = 0; far < 2; far++)
		for (unsigned x = 0; x < 2; x++) {
			xtab_case("cluster_size=65536", x, far);
			xtab_case("cluster_size=65536,extended_l2=on", x, far);
		}
}

static void test_bridge_shapes(void)
{
	bridge_case("cluster_size=65536");
	bridge_case("cluster_size=65536,extended_l2=on");
	bridge_fail_case("cluster_size=65536");
	bridge_fail_case("cluster_size=65536,extended_l2=on");
}

/*
 * Online grow (qcow2_grow) under writes: data written before, during and
 * after reads back, every crash image on the way is consistent (the new L1
 * table and its refcounts are durable before the header points at it, the
 * old table is released only after), and qemu-img check is clean.
 */
/*
 * The header's first sector is only ever written whole, 512-aligned, its
 * bytes as on disk but the grow's fields (size, crypt_method, l1_size,
 * l1_table_offset: 24-47) and a relocated refcount table's (48-59): a
 * shorter write goes through the page cache (io/'s buffered twin), which
 * turns write-back's tail off for the rest of the session. The number of
 * header writes in the log since @from.
 */
static size_t hdr_writes_whole(const struct eng *e, size_t from, const uint8_t *hdr0)
{
	size_t n = 0;

	for (size_t i = from; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type != FAKE_WRITE || l->file != e->id || l->off >= 512)
			continue;
		n++;
		CU_ASSERT_EQUAL(l->off, 0);
		CU_ASSERT(l->len >= 512 && l->len % 512 == 0);
		for (uint64_t k = 0; k < 512 && k < l->len; k++)
			if (k < QCOW2_OFF_SIZE || k >= QCOW2_OFF_REFCOUNT_TABLE_OFFSET + 12)
				CU_ASSERT_EQUAL_FATAL(l->data[k], hdr0[k]);
	}
	return n;
}

static void grow_case(const char *opts, uint64_t size, uint64_t size2, unsigned shuffle,
		      unsigned after)
{
	uint8_t *model = calloc(1, size2), hdr0[512];
	struct flushf f;
	struct eng e;
	char err[256];
	size_t from;
	uint64_t fsize;
	int ret;

	fake_set_shuffle(shuffle);
	eng_create(&e, opts, size, NULL);
	workload(&e, model, size, 60, 16 << 10, false);
	memcpy(hdr0, fake_file_data(e.id, &fsize), sizeof(hdr0));
	from = fake_log_count();
	memset(&f, 0, sizeof(f));
	f.f.done = flush_done;
	ret = qcow2_grow(e.q, size2, &f.f, err, sizeof(err));
	CU_ASSERT_EQUAL(ret, 1);
	CU_ASSERT_EQUAL(f.done, 0); /* never inside the call */
	/* requests while the new table and header are being written */
	workload(&e, model, size, 20, 16 << 10, false);
	for (int i = 0; i < 100000 && !f.done; i++)
		run();
	CU_ASSERT_EQUAL(f.done, 1);
	CU_ASSERT_EQUAL(f.res, 0);
	CU_ASSERT_EQUAL(qcow2_size(e.q), size2);
	CU_ASSERT_EQUAL(qcow2_grow(e.q, size2 - 512, &f.f, err, sizeof(err)), -ENOTSUP);
	CU_ASSERT_EQUAL(qcow2_grow(e.q, size2 + 100, &f.f, err, sizeof(err)), -EINVAL);
	workload(&e, model, size2, after, 16 << 10, false);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	verify(&e, model, size2);
	CU_ASSERT(hdr_writes_whole(&e, from, hdr0) >= 1); /* the grow's */
	if (after > 120) /* the case written past the refcount table's reach: it moved */
		CU_ASSERT_NOT_EQUAL(e.q->rt_offset,
				    qcow2_be64(hdr0 + QCOW2_OFF_REFCOUNT_TABLE_OFFSET));
	check_crash_images(&e, 2);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	fake_set_shuffle(0);
	free(model);
}

static void test_grow_l1(void)
{
	/* 512-byte clusters: a 1 MiB disk has a 32-entry L1; 8 MiB needs 256 (4 clusters) */
	grow_case("cluster_size=512,refcount_bits=16", 1ull << 20, 8ull << 20, 0, 120);
	grow_case("cluster_size=512,refcount_bits=64", 1ull << 20, 8ull << 20, 31, 120);
	/* and past what the refcount table covers (64 entries of 64 clusters:
	 * 2 MiB): the table moves after the grow, its pointer in the header's
	 * first sector written whole too */
	grow_case("cluster_size=512,refcount_bits=64", 1ull << 20, 32ull << 20, 7, 400);
}

static void test_grow_header_only(void)
{
	/* 64 KiB clusters: one L1 entry maps 512 MiB, only the header changes */
	grow_case("cluster_size=65536", 4ull << 20, 12ull << 20, 5, 120);
}

/* ---- how many fdatasyncs, one after another, a linked write waits for ---- */

static size_t fsyncs_logged(void)
{
	size_t n = 0;

	for (size_t i = 0; i < fake_log_count(); i++)
		n += fake_log_get(i)->type == FAKE_FSYNC;
	return n;
}

/*
 * The fake completes, per loop iteration, the commands submitted before it,
 * in order (and logs each before its callback runs): the iterations before
 * @f's last in which an fdatasync ended, and the last if an fdatasync's
 * completion ended @f, are the syncs it waited for one after another (a
 * sync that ends in the last iteration before the write that ends @f ran
 * beside it).
 */
static unsigned wait_chain(struct flushf *f)
{
	unsigned chain = 0;

	for (int i = 0; i < 10000 && !f->done; i++) {
		size_t before = fsyncs_logged();

		run();
		chain += f->done ? f->after_sync : fsyncs_logged() > before;
	}
	CU_ASSERT_EQUAL(f->done, 1);
	CU_ASSERT_EQUAL(f->res, 0);
	return chain;
}

/* Allocate the cluster under guest offset @off and wait for its link. */
static unsigned write_linked(struct eng *e, uint64_t off)
{
	uint8_t buf[4096];
	struct flushf f;

	memset(buf, (int)(off >> 16) | 1, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(e, off, sizeof(buf), buf), 0);
	memset(&f, 0, sizeof(f));
	f.f.done = flush_done;
	if (!qcow2_link(e->q, qcow2_meta_gen(e->q), &f.f))
		return 0;
	return wait_chain(&f);
}

/*
 * An allocating write, done, waits (qcow2_link) only until its L2 entry is
 * written, never for the last fdatasync of the batch that writes it (a
 * FLUSH's batch, or a grow's, lets its links go when that sync starts), and
 * a new L2 table costs no sync of its own (written with the refcounts).
 * Nor does a write that arrives during a batch wait for that batch's last
 * sync: the next batch starts beside it (the tail, writeback.c).
 * Before 73b3b72: 2, 0, 2, 3, 3 syncs in a row in the cases below; then 1,
 * 0, 1, 2, 3; with the tail 1, 0, 1, 1, 2 (the last: a write during a grow
 * still waits for the grow's L1 table and its sync).
 */
static void test_link_chain(void)
{
	struct flushf fl, g;
	struct eng e;
	char err[256];
	uint64_t c = 65536;

	eng_create(&e, "cluster_size=65536", 64ull << 30, NULL);
	/* a new L2 table: refcounts synced before the entry, the table before L1 */
	CU_ASSERT_EQUAL(write_linked(&e, 0), 1);
	/* the reserve's refcounts are durable: nothing to sync */
	CU_ASSERT_EQUAL(write_linked(&e, 1 * c), 0);

	/* a FLUSH's batch takes a write's entry: it waits for the refcount
	 * sync (power-loss order), not for the L2 table's */
	memset(&fl, 0, sizeof(fl));
	fl.f.done = flush_done;
	{
		uint8_t buf[4096] = {7};
		struct flushf f;

		CU_ASSERT_EQUAL(eng_write(&e, 2 * c, sizeof(buf), buf), 0);
		memset(&f, 0, sizeof(f));
		f.f.done = flush_done;
		qcow2_flush(e.q, &fl.f);
		CU_ASSERT_EQUAL(qcow2_link(e.q, qcow2_meta_gen(e.q), &f.f), 1);
		CU_ASSERT(wait_chain(&f) <= 1);
	}
	for (int i = 0; i < 10000 && !fl.done; i++)
		run();
	CU_ASSERT_EQUAL(fl.done, 1);
	/* a write that comes while a FLUSH's batch runs (a new L2 table: P1,
	 * P3 written) waits for that batch but its last sync */
	{
		uint8_t buf[4096] = {9};

		CU_ASSERT_EQUAL(eng_write(&e, 1ull << 30, sizeof(buf), buf), 0);
	}
	memset(&fl, 0, sizeof(fl));
	fl.f.done = flush_done;
	qcow2_flush(e.q, &fl.f);
	CU_ASSERT_EQUAL(write_linked(&e, 3 * c), 1);
	for (int i = 0; i < 10000 && !fl.done; i++)
		run();
	CU_ASSERT_EQUAL(fl.done, 1);

	/* an online grow: new L1 table, then the header (each synced) */
	memset(&g, 0, sizeof(g));
	g.f.done = flush_done;
	CU_ASSERT_EQUAL(qcow2_grow(e.q, 2048ull << 30, &g.f, err, sizeof(err)), 1);
	CU_ASSERT_EQUAL(write_linked(&e, 4 * c), 2);
	CU_ASSERT(write_linked(&e, 5 * c) <= 1);
	for (int i = 0; i < 10000 && !g.done; i++)
		run();
	CU_ASSERT_EQUAL(g.done, 1);
	CU_ASSERT_EQUAL(g.res, 0);
	CU_ASSERT_EQUAL(write_linked(&e, 6 * c), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT(e.q->n_tail_starts >= 2); /* the FLUSH's and the grow's */
	check_crash_images(&e, 3);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/* ---- the next batch beside a batch's last fdatasync (the tail) ---- */

struct tailf {
	struct qcow2_flush f;
	int done, res;
	size_t logn;    /* record entries when it ended */
	uint8_t *model; /* what the guest had written when it was sent */
	uint64_t size;  /* the disk size then */
	unsigned seq;   /* writes sent before it */
};

static void tail_flush_done(struct qcow2_flush *f, int res)
{
	struct tailf *x = (struct tailf *)f;

	x->done = 1;
	x->res = res;
	x->logn = fake_log_count();
}

/*
 * Guest [off, off + len) of crash image @img (freed here) into @got, read
 * through qemu-img, the oracle; @path and @raw are the scratch files.
 */
static void crash_image_read(uint8_t *img, uint64_t ilen, const char *path, const char *raw,
			     uint64_t off, uint64_t len, uint8_t *got)
{
	FILE *f;

	CU_ASSERT_EQUAL_FATAL(fake_buf_save(img, ilen, path), 0);
	free(img);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -f qcow2 -O raw %s %s", path, raw), 0);
	f = fopen(raw, "rb");
	CU_ASSERT_FATAL(f != NULL);
	CU_ASSERT_FATAL(fseek(f, (long)off, SEEK_SET) == 0);
	CU_ASSERT_EQUAL(fread(got, 1, len, f), len);
	fclose(f);
}

/* The guest view of the crash image after record entry @upto, synced writes only. */
static void crash_guest_view(struct eng *e, size_t upto, uint8_t *out, uint64_t size)
{
	char *path = P("tail.qcow2"), *raw = P("tail.raw");
	uint8_t *img;
	uint64_t len;

	CU_ASSERT_EQUAL_FATAL(fake_crash_image(e->id, upto, 0, &img, &len), 0);
	crash_image_read(img, len, path, raw, 0, size, out);
	unlink(path);
	unlink(raw);
}

/* ---- the early link of new clusters of fresh space (qcow2_early_new) ---- */

static bool all_zero(const uint8_t *p, uint64_t n);

struct enw {
	struct qcow2_alloc a;
	struct cmdf c;
	uint8_t *b;
	unsigned t;
};

/*
 * Map the first write of @len bytes of @pat at guest @off into a new cluster
 * and submit its whole-cluster write (zeroes around the data, as
 * img/img_qcow2.c's fill), held @hold loop iterations in the fake; the
 * allocation ends in enw_end(). Returns the mapping result.
 */
static int enw_start(struct eng *e, struct enw *w, uint64_t off, uint64_t len, uint8_t pat,
		     unsigned hold)
{
	uint64_t cs = qcow2_header(e->q)->cluster_size;
	struct waitf wf;
	int ret;

	memset(w, 0, sizeof(*w));
	for (;;) {
		wait_init(&wf);
		w->t = qcow2_io_begin(e->q);
		ret = qcow2_map_write(e->q, off, len, &w->a, &wf.w);
		if (ret != -EAGAIN)
			break;
		qcow2_io_end(e->q, w->t);
		wait_woken(&wf);
	}
	if (ret != QCOW2_WRITE_ALLOC) {
		qcow2_io_end(e->q, w->t);
		return ret;
	}
	CU_ASSERT(w->a.new_host);
	w->b = calloc(1, cs);
	memset(w->b + (off & (cs - 1)), pat, len);
	if (hold)
		CU_ASSERT_EQUAL(fake_hold(IO_OP_WRITEV, 1, hold), 0);
	w->c.cmd.done = cmd_done;
	io_write(g_loop, &w->c.cmd, &e->file, w->b, cs, w->a.host - (w->a.off & (cs - 1)));
	return ret;
}

static int enw_end(struct eng *e, struct enw *w)
{
	int ret;

	while (!w->c.done)
		run();
	ret = w->c.res < 0 ? w->c.res : 0;
	w->a.rest_zero = true;
	qcow2_alloc_finish(e->q, &w->a, ret);
	qcow2_io_end(e->q, w->t);
	free(w->b);
	return ret;
}

/*
 * Eight new clusters written one after another, each data write as slow as
 * a few metadata writes (held 6 loop iterations), the reserve's refcounts
 * durable: with the early link each L2 entry is written beside its data
 * write, so no request waits for a link batch after its data (0 link waits);
 * without it every one does (8). Returns the waits; *batches: write-back
 * batches started meanwhile. Data, crash images and qemu-img check as usual.
 */
static unsigned early_new_waits(const char *opts, bool on, uint64_t *batches)
{
	uint8_t buf[4096];
	unsigned waits = 0;
	uint64_t b0, n0, na0, cs, w0, wns0;
	struct eng e;

	fake_set_defers(true);
	qcow2_early_new(on);
	eng_create(&e, opts, 64ull << 20, NULL);
	cs = qcow2_header(e.q)->cluster_size;
	memset(buf, 1, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	b0 = e.q->batches;
	n0 = e.q->n_early_new;
	na0 = e.q->n_early_new_ahead;
	w0 = e.q->n_link_waits;
	wns0 = e.q->n_link_wait_ns;
	for (unsigned k = 1; k <= 8; k++) {
		struct enw w;
		struct flushf f;

		CU_ASSERT_EQUAL_FATAL(
		    enw_start(&e, &w, 3 * k * cs + 4096, 4096, (uint8_t)(0x40 + k), 6),
		    QCOW2_WRITE_ALLOC);
		CU_ASSERT_EQUAL(w.a.early_new, on);
		CU_ASSERT_EQUAL(enw_end(&e, &w), 0);
		memset(&f, 0, sizeof(f));
		f.f.done = flush_done;
		if (qcow2_link_slice(e.q, w.a.link_gen, w.a.link_slice, &f.f)) {
			waits++;
			for (int i = 0; i < 10000 && !f.done; i++)
				run();
			CU_ASSERT_EQUAL(f.done, 1);
			CU_ASSERT_EQUAL(f.res, 0);
		}
	}
	*batches = e.q->batches - b0;
	/* query-blockstats' link-waits and link-wait-us: the waits, and time in them */
	CU_ASSERT_EQUAL(e.q->n_link_waits - w0, waits);
	CU_ASSERT_EQUAL(e.q->n_link_wait_ns > wns0, waits > 0);
	CU_ASSERT_EQUAL(e.q->n_early_new - n0, on ? 8 : 0);
	CU_ASSERT_EQUAL(e.q->n_early_new_ahead - na0, on ? 8 : 0); /* query-blockstats' */
	for (unsigned k = 1; k <= 8; k++) {
		uint8_t got[4096], want[4096];

		memset(want, 0x40 + (int)k, sizeof(want));
		CU_ASSERT_EQUAL(eng_read(&e, 3 * k * cs + 4096, sizeof(got), got), 0);
		CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
		memset(want, 0, sizeof(want));
		CU_ASSERT_EQUAL(eng_read(&e, 3 * k * cs, sizeof(got), got), 0);
		CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	check_crash_images(&e, 2);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_early_new(false);
	fake_set_defers(false);
	return waits;
}

static void test_early_new_waits(void)
{
	static const char *const optss[] = {
	    "cluster_size=65536",
	    "cluster_size=65536,extended_l2=on",
	};

	for (unsigned k = 0; k < 2; k++) {
		uint64_t bon, boff;

		CU_ASSERT_EQUAL(early_new_waits(optss[k], true, &bon), 0);
		CU_ASSERT_EQUAL(early_new_waits(optss[k], false, &boff), 8);
		fprintf(stderr, "early new link, %s: batches for 8 new clusters %llu (off: %llu)\n",
			optss[k], (unsigned long long)bon, (unsigned long long)boff);
		CU_ASSERT(bon <= 8);
	}
}

/*
 * The hazard of the early link: once a new cluster's entry is in the cached
 * slice, a second write into the same cluster (another 4K block) must not go
 * in place while the first one's data and fill are in flight (the fill's
 * zeroes would land over it): it waits for the allocation to end, then
 * writes in place. Meanwhile a read of the cluster reads zeroes, and every
 * crash image (the entry written, the data not) shows the cluster as zeroes
 * or with the first write's data, nothing else. Fails without the guard in
 * qcow2_map_write(): the second write's block reads back as zeroes.
 */
static void early_new_hazard(const char *opts, bool fills_whole)
{
	uint8_t buf[4096], got[4096], want[4096];
	uint64_t cs, c;
	struct waitf wf;
	struct qcow2_alloc a2;
	struct enw w;
	struct eng e;
	unsigned t2;
	bool parked = false;
	int ret;

	fake_set_defers(true);
	qcow2_early_new(true);
	eng_create(&e, opts, 16ull << 20, NULL);
	qcow2_set_fills_whole(e.q, fills_whole);
	cs = qcow2_header(e.q)->cluster_size;
	c = 5 * cs;
	memset(buf, 1, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL_FATAL(enw_start(&e, &w, c, 4096, 0x11, 40), QCOW2_WRITE_ALLOC);
	CU_ASSERT_FATAL(w.a.early_new);
	if (e.q->extl2) {
		/* all 32 bits at once where the caller writes the cluster whole */
		uint64_t soff = w.a.link_slice, bm;
		struct q2_slice *sl = q2_cache_peek(&e.q->l2c, soff);

		CU_ASSERT_PTR_NOT_NULL_FATAL(sl);
		q2_l2_entry(sl, (uint32_t)((c / cs) & ((1u << e.q->sl2_bits) - 1)), &bm, true);
		CU_ASSERT_EQUAL(bm, fills_whole ? 0xffffffffull : 0x3ull);
	}
	for (int i = 0; i < 5; i++)
		run(); /* the link batch writes the entry; the data write stays in flight */
	CU_ASSERT(e.q->meta_written_gen >= w.a.link_gen);
	/* a read meanwhile: what the guest had (zeroes) */
	memset(want, 0, sizeof(want));
	CU_ASSERT_EQUAL(eng_read(&e, c + 8192, sizeof(got), got), 0);
	CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
	/* a crash now (entry written, data maybe not): zeroes or the data */
	for (unsigned s = 1; s <= 4; s++) {
		char *path = P("enw.qcow2"), *raw = P("enw.raw");
		uint8_t *img, *view = malloc(cs);
		uint64_t len;

		CU_ASSERT_EQUAL_FATAL(
		    fake_crash_image(e.id, fake_log_count(), s * 7919, &img, &len), 0);
		crash_image_read(img, len, path, raw, c, cs, view);
		for (uint64_t o = 0; o < cs; o += 4096) {
			bool zero = all_zero(view + o, 4096);

			memset(want, 0x11, sizeof(want));
			CU_ASSERT(zero || (o == 0 && memcmp(view, want, 4096) == 0));
		}
		unlink(path);
		unlink(raw);
		free(view);
	}
	/* the second write, into another block of the same cluster */
	memset(buf, 0x22, sizeof(buf));
	wait_init(&wf);
	t2 = qcow2_io_begin(e.q);
	ret = qcow2_map_write(e.q, c + 8192, sizeof(buf), &a2, &wf.w);
	if (ret == -EAGAIN) {
		parked = true;
	} else {
		/* what a write mapped in place would do: under the fill */
		CU_ASSERT_EQUAL(ret, QCOW2_WRITE_INPLACE);
		if (ret == QCOW2_WRITE_INPLACE)
			CU_ASSERT_EQUAL(do_write_data(&e, buf, sizeof(buf), a2.host), 0);
	}
	CU_ASSERT(parked);
	CU_ASSERT_EQUAL(enw_end(&e, &w), 0);
	if (parked) {
		wait_woken(&wf);
		ret = qcow2_map_write(e.q, c + 8192, sizeof(buf), &a2, &wf.w);
		CU_ASSERT_EQUAL_FATAL(ret, QCOW2_WRITE_INPLACE);
		CU_ASSERT_EQUAL(do_write_data(&e, buf, sizeof(buf), a2.host), 0);
	}
	qcow2_io_end(e.q, t2);
	CU_ASSERT_EQUAL(eng_read(&e, c + 8192, sizeof(got), got), 0);
	CU_ASSERT(memcmp(got, buf, sizeof(got)) == 0);
	memset(want, 0x11, sizeof(want));
	CU_ASSERT_EQUAL(eng_read(&e, c, sizeof(got), got), 0);
	CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	check_crash_images(&e, 2);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_early_new(false);
	fake_set_defers(false);
}

/*
 * The early link of a new cluster past the end of the file (no
 * preallocation: fallocate unsupported here): the link batch writes the
 * entry while the data write, which would extend the file over the
 * cluster, is still in flight. A process death then (every completed write
 * in the file) leaves an entry pointing past the end of the file, which
 * qemu-img check counts as an error, not a leak ("counting reference for
 * region exceeding the end of the file"). The early link must only take
 * clusters inside the file.
 */
static void test_early_new_past_eof(void)
{
	uint8_t buf[4096];
	char *path = P("enweof.qcow2");
	const uint8_t *d;
	uint64_t cs, c, size;
	struct enw w;
	struct eng e;

	fake_set_defers(true);
	qcow2_early_new(true);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 0, -EOPNOTSUPP), 0);
	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	cs = qcow2_header(e.q)->cluster_size;
	memset(buf, 1, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	c = 5 * cs;
	CU_ASSERT_EQUAL_FATAL(enw_start(&e, &w, c, 4096, 0x11, 40), QCOW2_WRITE_ALLOC);
	for (int i = 0; i < 5; i++)
		run(); /* a link batch may write the entry; the data write stays in flight */
	d = fake_file_data(e.id, &size);
	CU_ASSERT(!w.a.early_new); /* the cluster lies past the end of the file */
	CU_ASSERT_EQUAL_FATAL(fake_buf_save(d, size, path), 0);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", path), 0);
	unlink(path);
	CU_ASSERT_EQUAL(enw_end(&e, &w), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	io_loop_inject_clear(g_loop);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_early_new(false);
	fake_set_defers(false);
}

static void test_early_new_hazard(void)
{
	early_new_hazard("cluster_size=65536", true);
	early_new_hazard("cluster_size=65536,extended_l2=on", false);
	early_new_hazard("cluster_size=65536,extended_l2=on", true);
}

/*
 * Random writes, reads, zeroes, discards and flushes with the early link of
 * new clusters on (plain, extended L2, small clusters with new tables and
 * refcount blocks, completions shuffled): the data reads back, every crash
 * image keeps every data cluster's refcount (the raise before the entry),
 * qemu-img check is clean.
 */
static void test_early_new_workload(void)
{
	static const char *const optss[] = {
	    "cluster_size=65536",
	    "cluster_size=16384,extended_l2=on",
	    "cluster_size=512,refcount_bits=16",
	};

	for (unsigned k = 0; k < 3; k++) {
		uint64_t size = k == 2 ? 2ull << 20 : 16ull << 20;
		uint8_t *model = calloc(1, size);
		struct eng e;

		fake_set_defers(true);
		fake_set_shuffle(k + 3);
		qcow2_early_new(true);
		eng_create(&e, optss[k], size, NULL);
		qcow2_set_fills_whole(e.q, k == 1); /* extended L2: all bits at map time */
		workload(&e, model, size, 300, 16 << 10, false);
		CU_ASSERT(e.q->n_early_new > 0);
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		verify(&e, model, size);
		check_crash_images(&e, 2);
		eng_close(&e);
		CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
		qcow2_early_new(false);
		fake_set_shuffle(0);
		fake_set_defers(false);
		free(model);
	}
}

/*
 * Allocating writes that arrive while a FLUSH's batch (or a grow's) runs, so
 * that the next batch starts beside that batch's last fdatasync: with @link
 * each write waits for its link (a link-mode batch beside the tail), else a
 * second FLUSH follows them (a durable batch beside the tail). Checked: the
 * overlap happened; without links (no early link either), the data ->
 * refcount -> L2 -> L1 order (check_l2_order: link batches keep the
 * refcount order only); every crash image at every write and fdatasync of
 * the record, three subsets of the unsynced writes each, consistent and
 * passing qemu-img check (leaks only); the image as of each FLUSH's
 * completion, with nothing after the last sync before it, reads back
 * everything written before that FLUSH was sent (but for the sectors
 * written again since: either is right); the data reads back.
 * @delay: fdatasyncs held back (qcow2_test_sync_delay: in the fake, until
 * the loop is otherwise idle), so the next batch runs its writes and syncs
 * before the tail's sync ends. @hold: instead, every fdatasync stays in
 * flight for that many loop iterations (fake_set_sync_hold) once submitted,
 * so that writes complete while it runs, which it need not cover (the
 * crash images include the state where they are not durable); the crash
 * images are then checked at every fdatasync and some writes, three subsets
 * each, by check_image only (no qemu-img: the test's time).
 */
static void tail_case(const char *opts, uint64_t size, uint64_t size2, unsigned shuffle,
		      unsigned delay, unsigned hold, bool link)
{
	enum { ROUNDS = 6 };
	struct tailf fl[2 * ROUNDS], g;
	struct qcow2_opts o = {.no_early_link = !link};
	uint8_t *model = calloc(1, size2), *view = malloc(size2);
	unsigned *wseq = calloc(size2 / 512, sizeof(*wseq)), seq = 0; /* last write per sector */
	uint64_t cur = size;
	unsigned nfl = 0;
	char err[256];
	struct eng e;

	fake_set_shuffle(shuffle);
	qcow2_test_sync_delay(delay);
	fake_set_sync_hold(hold);
	eng_create(&e, opts, size, &o);
	memset(fl, 0, sizeof(fl));
	for (unsigned r = 0; r < ROUNDS; r++) {
		struct tailf *f1 = &fl[nfl++], *f2 = NULL;
		uint8_t buf[4096];
		uint64_t off = (rnd() % (cur / 4096)) * 4096;

		fill(buf, sizeof(buf), rnd());
		CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
		memcpy(model + off, buf, sizeof(buf));
		seq++;
		for (uint64_t k = 0; k < sizeof(buf); k += 512)
			wseq[(off + k) / 512] = seq;
		f1->seq = seq;
		f1->f.done = tail_flush_done;
		f1->model = malloc(cur);
		memcpy(f1->model, model, cur);
		f1->size = cur;
		qcow2_flush(e.q, &f1->f);
		if (r == ROUNDS / 2) {
			memset(&g, 0, sizeof(g));
			g.f.done = tail_flush_done;
			CU_ASSERT_EQUAL(qcow2_grow(e.q, size2, &g.f, err, sizeof(err)), 1);
		}
		/* writes while that batch runs */
		for (unsigned k = 0; k < 3; k++) {
			struct flushf lf;

			off = (rnd() % (cur / 4096)) * 4096;
			fill(buf, sizeof(buf), rnd());
			CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
			memcpy(model + off, buf, sizeof(buf));
			seq++;
			for (uint64_t j = 0; j < sizeof(buf); j += 512)
				wseq[(off + j) / 512] = seq;
			memset(&lf, 0, sizeof(lf));
			lf.f.done = flush_done;
			if (link && qcow2_link(e.q, qcow2_meta_gen(e.q), &lf.f))
				wait_chain(&lf);
		}
		if (!link) {
			f2 = &fl[nfl++];
			f2->seq = seq;
			f2->f.done = tail_flush_done;
			f2->model = malloc(cur);
			memcpy(f2->model, model, cur);
			f2->size = cur;
			qcow2_flush(e.q, &f2->f);
		}
		for (int i = 0; i < 100000 && (!f1->done || (f2 && !f2->done)); i++)
			run();
		CU_ASSERT_EQUAL(f1->done, 1);
		CU_ASSERT_EQUAL(f1->res, 0);
		CU_ASSERT(!f2 || (f2->done == 1 && f2->res == 0));
		if (r == ROUNDS / 2) {
			for (int i = 0; i < 100000 && !g.done; i++)
				run();
			CU_ASSERT_EQUAL(g.done, 1);
			CU_ASSERT_EQUAL(g.res, 0);
			cur = size2;
		}
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT(e.q->n_tail_starts > 0);
	verify(&e, model, size2);
	if (!link)
		check_l2_order(&e);
	if (hold)
		check_crash_images(&e, 3); /* every sync point, no qemu-img: cheaper */
	else
		check_every_crash_point(&e);
	for (unsigned r = 0; r < nfl; r++) {
		crash_guest_view(&e, fl[r].logn, view, fl[r].size);
		for (uint64_t k = 0; k < fl[r].size; k += 512) {
			if (wseq[k / 512] > fl[r].seq || !memcmp(view + k, fl[r].model + k, 512))
				continue;
			fprintf(stderr,
				"tail: FLUSH %u (ended at record entry %zu) returned before "
				"guest sector %llu was durable\n",
				r, fl[r].logn, (unsigned long long)(k / 512));
			CU_FAIL("FLUSH returned before acknowledged writes were durable");
			break;
		}
		free(fl[r].model);
	}
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	qcow2_test_sync_delay(0);
	fake_set_sync_hold(0);
	fake_set_shuffle(0);
	free(model);
	free(view);
	free(wseq);
}

/*
 * A FLUSH sent while a batch's last fdatasync runs (the tail), after an
 * in-place write (no metadata) completed beside that sync: the sync was
 * submitted before the write completed and need not cover it, so the FLUSH
 * must not end with it (it goes to the next batch, whose syncs come after
 * the write). The image as of the FLUSH's completion, nothing after the
 * syncs ended then, reads the write. A fake that counted an fdatasync as
 * covering what completed before it *ended* could not tell (before
 * fake_io.c's durability model, a mutation answering such a FLUSH with the
 * tail's sync passed here).
 */
static void tail_inplace_case(unsigned shuffle)
{
	const uint64_t size = 8ull << 20, c = 65536;
	uint8_t a[4096], b[4096], *view = malloc(size);
	struct tailf f1, f2;
	struct eng e;

	fake_set_shuffle(shuffle);
	eng_create(&e, "cluster_size=65536", size, NULL);
	fill(a, sizeof(a), 1);
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(a), a), 0); /* cluster 0 allocated */
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	fake_set_sync_hold(8);
	/* a batch with metadata to write (a new cluster), for a FLUSH */
	fill(b, sizeof(b), 2);
	CU_ASSERT_EQUAL(eng_write(&e, 4 * c, sizeof(b), b), 0);
	memset(&f1, 0, sizeof(f1));
	f1.f.done = tail_flush_done;
	qcow2_flush(e.q, &f1.f);
	for (int i = 0; i < 1000 && !e.q->wb_tail && !f1.done; i++)
		run();
	CU_ASSERT_FATAL(e.q->wb_tail != NULL); /* its last sync runs */
	/* in place, while that sync runs */
	fill(a, sizeof(a), 3);
	CU_ASSERT_EQUAL(eng_write(&e, 4096, sizeof(a), a), 0);
	CU_ASSERT_FATAL(e.q->wb_tail != NULL && !f1.done); /* it completed beside the sync */
	memset(&f2, 0, sizeof(f2));
	f2.f.done = tail_flush_done;
	qcow2_flush(e.q, &f2.f);
	for (int i = 0; i < 10000 && (!f1.done || !f2.done); i++)
		run();
	CU_ASSERT(f1.done == 1 && f1.res == 0);
	CU_ASSERT(f2.done == 1 && f2.res == 0);
	crash_guest_view(&e, f2.logn, view, size);
	if (memcmp(view + 4096, a, sizeof(a))) {
		fprintf(stderr,
			"tail: a FLUSH ended (record entry %zu) before an in-place write "
			"that completed beside the tail's fdatasync was durable\n",
			f2.logn);
		CU_FAIL("FLUSH answered by an fdatasync submitted before the write completed");
	}
	CU_ASSERT(memcmp(view + 4 * c, b, sizeof(b)) == 0);
	check_crash_images(&e, 3); /* consistent, the in-flight states included */
	fake_set_sync_hold(0);
	fake_set_shuffle(0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(view);
}

static void test_tail(void)
{
	/* 512-byte clusters: new L2 tables and refcount blocks all the time,
	 * and a grow that moves the L1 table */
	const char *small = "cluster_size=512,refcount_bits=16";

	tail_case(small, 1ull << 20, 4ull << 20, 0, 1, 0, true);
	tail_case(small, 1ull << 20, 4ull << 20, 13, 1, 0, true);
	tail_case(small, 1ull << 20, 4ull << 20, 21, 1, 0, false);
	tail_case("cluster_size=16384,extended_l2=on", 4ull << 20, 16ull << 20, 3, 1, 0, true);
	/* syncs in flight while the next batch's writes (and the guest's)
	 * complete: a sync covers only what completed before it started */
	tail_case(small, 1ull << 20, 4ull << 20, 0, 0, 4, true);
	tail_case("cluster_size=16384,extended_l2=on", 4ull << 20, 16ull << 20, 5, 0, 3, false);
	tail_inplace_case(0);
	tail_inplace_case(9);
}

/*
 * A file that may have taken writes through the page cache
 * (io_file_pc_written): the next batch never starts beside the tail's
 * fdatasync, so no two fdatasyncs of the image are in flight at once (a
 * writeback error reaches one fdatasync of a file only). The same load on
 * an O_DIRECT-only file does start batches beside the tail.
 */
static void test_tail_pc_written(void)
{
	struct qcow2_opts o = {.no_early_link = true};

	for (int pc = 0; pc < 2; pc++) {
		uint8_t *model = calloc(1, 1 << 20);
		struct tailf f1, f2;
		uint8_t buf[4096];
		struct eng e;

		fake_set_pc_written(pc);
		qcow2_test_sync_delay(1);
		eng_create(&e, "cluster_size=512,refcount_bits=16", 1ull << 20, &o);
		for (unsigned r = 0; r < 6; r++) {
			uint64_t off = (rnd() % 256) * 4096;

			fill(buf, sizeof(buf), rnd());
			CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
			memcpy(model + off, buf, sizeof(buf));
			memset(&f1, 0, sizeof(f1));
			f1.f.done = tail_flush_done;
			qcow2_flush(e.q, &f1.f);
			for (unsigned k = 0; k < 3; k++) { /* while that batch runs */
				off = (rnd() % 256) * 4096;
				fill(buf, sizeof(buf), rnd());
				CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
				memcpy(model + off, buf, sizeof(buf));
			}
			memset(&f2, 0, sizeof(f2));
			f2.f.done = tail_flush_done;
			qcow2_flush(e.q, &f2.f);
			for (int i = 0; i < 100000 && (!f1.done || !f2.done); i++)
				run();
			CU_ASSERT(f1.done == 1 && f1.res == 0);
			CU_ASSERT(f2.done == 1 && f2.res == 0);
		}
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		CU_ASSERT(pc ? e.q->n_tail_starts == 0 : e.q->n_tail_starts > 0);
		verify(&e, model, 1 << 20);
		qcow2_test_sync_delay(0);
		fake_set_pc_written(false);
		eng_close(&e);
		CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
		free(model);
	}
}

/*
 * The L1 table goes out in whole 512-byte sectors, zeroes past its last
 * entry, as QEMU writes it (and as the refcount table's sectors go): a
 * shorter write (an image under 32 GiB with 64 KiB clusters has fewer than
 * 64 L1 entries) is off the O_DIRECT alignment, so io/ took it through the
 * page cache, which marked the image file page-cache written for good
 * (io_file_pc_written): no batch beside the tail from then on (1 tail start
 * in 381 batches of 4K writes with a FLUSH every 16 on a 4 GiB image, 448
 * in 783 on a 64 GiB one), and every failed fdatasync sticky.
 */
static void test_l1_sectors(void)
{
	uint8_t buf[4096];
	struct eng e;
	size_t n = 0;

	eng_create(&e, "cluster_size=65536", 64ull << 20, NULL);
	fake_log_reset();
	fill(buf, sizeof(buf), 3);
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	for (size_t i = 0; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);
		uint64_t l1 = e.q->h.l1_table_offset;

		if (l->type != FAKE_WRITE || l->file != e.id || l->off >= l1 + 512 ||
		    l->off + l->len <= l1)
			continue;
		n++;
		CU_ASSERT_EQUAL(l->off % 512, 0);
		CU_ASSERT_EQUAL(l->len % 512, 0);
		for (uint64_t k = 8; k < l->len; k++)
			CU_ASSERT_EQUAL_FATAL(l->data[k], 0); /* one entry: the rest zeroes */
	}
	CU_ASSERT_EQUAL(n, 1); /* the L1 entry of the new table */
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/*
 * At close a writer gives back the tail it preallocated and did not use
 * (qcow2_close, give_back_tail: io_file_truncate). The fake io/ cuts its
 * in-memory file there as ftruncate would (before, the engine called
 * ftruncate on the fake's fd: "giving back the unused tail: Bad file
 * descriptor", and the tail stayed).
 */
static void test_close_tail(void)
{
	uint8_t buf[65536];
	uint64_t before = 0, after = 0;
	struct eng e;

	eng_create(&e, "cluster_size=65536", 1ull << 30, NULL);
	fill(buf, sizeof(buf), 5);
	for (uint64_t i = 0; i < 4; i++)
		CU_ASSERT_EQUAL(eng_write(&e, i << 24, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	fake_file_data(e.id, &before);
	eng_close(&e);
	fake_file_data(e.id, &after);
	CU_ASSERT(after < before);
	CU_ASSERT_EQUAL(after % 65536, 0);
	/* header, L1, refcount table and block, L2 table, 4 data clusters */
	CU_ASSERT(after >= 9 * 65536 && after <= 16 * 65536);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

static void fail_case(enum io_op op, unsigned nth)
{
	const uint64_t size = 8ull << 20;
	uint8_t *model = calloc(1, size);
	struct eng e;

	eng_create(&e, "cluster_size=4096", size, NULL);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, op, nth, -EIO), 0);
	workload(&e, model, size, 60, 32 << 10, true);
	eng_flush(&e); /* may fail */
	io_loop_inject_clear(g_loop);
	/* the image recovers: a flush now succeeds */
	wb_end_leaky(&e, NULL, 0, 1);
	free(model);
}

static void test_write_failures(void)
{
	for (unsigned n = 1; n <= 40; n += 3)
		fail_case(IO_OP_WRITEV, n);
}

static void test_sync_failures(void)
{
	for (unsigned n = 1; n <= 6; n++)
		fail_case(IO_OP_FDATASYNC, n);
}

/* ---- write-back failure paths: out of memory, eviction, close ---- */

/*
 * The guest bytes [@off, @off + @len) (inside one cluster) of the image
 * bytes @b, through its L1 and L2 tables (no extended L2, not compressed);
 * unallocated reads zero.
 */
static void img_guest_read(const uint8_t *b, uint64_t size, uint64_t off, uint8_t *buf,
			   uint64_t len)
{
	struct chk c = {.b = b, .size = size};
	char msg[200];
	uint64_t cs, l1i, t = 0, d = 0;

	memset(buf, 0, len);
	CU_ASSERT_EQUAL_FATAL(qcow2_header_parse(b, size < (2u << 20) ? size : (2u << 20), size,
						 &c.h, msg, sizeof(msg)),
			      0);
	cs = c.h.cluster_size;
	l1i = off >> (c.h.cluster_bits + c.h.l2_bits);
	if (l1i < c.h.l1_size)
		t = rd64(&c, c.h.l1_table_offset + l1i * 8) & QCOW2_L1E_OFFSET_MASK;
	if (t)
		d = rd64(&c, t + ((off >> c.h.cluster_bits) & (c.h.l2_entries - 1)) * 8) &
		    QCOW2_L2E_OFFSET_MASK;
	if (d && d + (off & (cs - 1)) + len <= size)
		memcpy(buf, b + d + (off & (cs - 1)), len);
}

static bool all_zero(const uint8_t *p, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/*
 * Every L1 entry the record writes that names a table it did not name before
 * comes after a write of that table's bytes (not a zeroing) and after an
 * fdatasync following the last such write: nothing on disk names an L2 table
 * never written (no grow in the record: the L1 table stays where it is).
 */
static void check_l1_order(struct eng *e)
{
	const struct qcow2_header_info *h = qcow2_header(e->q);
	uint64_t cs = h->cluster_size, l1off = h->l1_table_offset, l1len = h->l1_size * 8ull;
	size_t n = fake_log_count();
	uint64_t *l1 = calloc(h->l1_size, 8), blen;
	uint8_t *base;

	CU_ASSERT_EQUAL_FATAL(fake_crash_image(e->id, 0, 0, &base, &blen), 0);
	for (uint32_t k = 0; k < h->l1_size; k++)
		if (l1off + k * 8ull + 8 <= blen)
			l1[k] = qcow2_be64(base + l1off + k * 8ull) & QCOW2_L1E_OFFSET_MASK;
	for (size_t i = 0; i < n; i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type != FAKE_WRITE || l->file != e->id || l->off + l->len <= l1off ||
		    l->off >= l1off + l1len)
			continue;
		for (uint32_t k = 0; k < h->l1_size; k++) {
			uint64_t lo = l1off + k * 8ull, t;
			size_t last_w = SIZE_MAX, synced;

			if (lo < l->off || lo + 8 > l->off + l->len || !l->data)
				continue;
			t = qcow2_be64(l->data + (lo - l->off)) & QCOW2_L1E_OFFSET_MASK;
			if (!t || t == l1[k]) {
				l1[k] = t;
				continue;
			}
			l1[k] = t;
			for (size_t j = 0; j < i; j++) {
				const struct fake_log *x = fake_log_get(j);
				uint64_t a, z;

				if (x->file != e->id)
					continue;
				if (x->type != FAKE_WRITE || !x->data || x->off >= t + cs ||
				    t >= x->off + x->len)
					continue;
				a = x->off > t ? x->off : t;
				z = x->off + x->len < t + cs ? x->off + x->len : t + cs;
				if (!all_zero(x->data + (a - x->off), z - a))
					last_w = j;
			}
			/* the syncs ended before the L1 write was submitted */
			synced = synced_before(e->id, l->sub);
			if (last_w == SIZE_MAX || synced <= last_w) {
				fprintf(stderr,
					"L1 write #%zu names L2 table 0x%llx: its last write #%zu, "
					"durable before the L1 write: the first %zu entries\n",
					i, (unsigned long long)t, last_w, synced);
				CU_FAIL(
				    "an L1 entry names an L2 table not written and synced before");
				goto out;
			}
		}
	}
out:
	free(base);
	free(l1);
}

/* Guest offsets the out-of-memory cases write (64 KiB clusters, 2 GiB). */
static const uint64_t nomem_offs[] = {
    3 * 65536,                /* a new cluster in the first table */
    (512ull << 20) + 65536,   /* a new table */
    (1ull << 30) + 7 * 65536, /* another new table */
    9 * 65536,                /* the first table again */
    (1536ull << 20) + 2 * 65536 + 4096,
};
#define NOMEM_N (sizeof(nomem_offs) / sizeof(nomem_offs[0]))

/* How many of the writes above a crash now loses (@durable: a power loss, else a process death). */
static unsigned nomem_lost(struct eng *e, bool durable)
{
	uint8_t *img = NULL, got[4096], want[4096];
	const uint8_t *b;
	uint64_t len;
	unsigned lost = 0;

	if (durable) {
		CU_ASSERT_EQUAL_FATAL(fake_crash_image(e->id, fake_log_count(), 0, &img, &len), 0);
		b = img;
	} else {
		b = fake_file_data(e->id, &len); /* the file as it is */
	}
	for (unsigned k = 0; k < NOMEM_N; k++) {
		memset(want, 0x40 + (int)k, sizeof(want));
		img_guest_read(b, len, nomem_offs[k], got, sizeof(got));
		lost += memcmp(got, want, sizeof(got)) != 0;
	}
	free(img);
	return lost;
}

struct nomem_wait {
	struct qcow2_flush f;
	struct eng *e;
	bool durable; /* a FLUSH: what a power loss keeps; a link: a process death */
	int done, res;
	unsigned lost; /* writes a crash right when it ended would lose */
};

static void nomem_done(struct qcow2_flush *f, int res)
{
	struct nomem_wait *w = (struct nomem_wait *)f;

	w->done++;
	w->res = res;
	if (res == 0)
		w->lost = nomem_lost(w->e, w->durable);
}

/*
 * A write-back batch short of memory (qcow2_test_wb_nomem: its @nth item
 * cannot be allocated) with five allocating writes dirty, two of them in new
 * L2 tables: a FLUSH and a linked write (qcow2_link) waiting on it, the
 * FLUSH's batch first if @flush_first, else the link's. A waiter that
 * succeeds has every write on disk at that moment (a link: in the file; a
 * FLUSH: past an fdatasync); no L1 entry names a table not written and
 * synced before (e8d6ecf: one left out of P1 was named by P3 all the same);
 * what was left out goes with the next batch; every crash image is
 * consistent; qemu-img check finds at most leaks.
 */
static void nomem_case(const struct qcow2_opts *o, unsigned nth, bool flush_first)
{
	uint8_t buf[4096];
	struct nomem_wait fl, lk;
	struct eng e;

	eng_create(&e, "cluster_size=65536", 2ull << 30, o);
	memset(buf, 1, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	fake_log_reset();
	for (unsigned k = 0; k < NOMEM_N; k++) {
		memset(buf, 0x40 + (int)k, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, nomem_offs[k], sizeof(buf), buf), 0);
	}
	memset(&fl, 0, sizeof(fl));
	memset(&lk, 0, sizeof(lk));
	fl.f.done = lk.f.done = nomem_done;
	fl.e = lk.e = &e;
	fl.durable = true;
	CU_ASSERT_EQUAL(e.q->batch, NULL);
	qcow2_test_wb_nomem(nth);
	if (flush_first)
		qcow2_flush(e.q, &fl.f);
	CU_ASSERT_EQUAL(qcow2_link(e.q, qcow2_meta_gen(e.q), &lk.f), 1);
	if (!flush_first)
		qcow2_flush(e.q, &fl.f);
	for (int i = 0; i < 10000 && !(fl.done && lk.done); i++)
		run();
	qcow2_test_wb_nomem(0);
	CU_ASSERT_EQUAL(fl.done, 1);
	CU_ASSERT_EQUAL(lk.done, 1);
	if (fl.lost || lk.lost)
		fprintf(stderr, "nomem %u%s: a crash when the %s ended loses %u writes\n", nth,
			flush_first ? " (flush first)" : "", fl.lost ? "FLUSH" : "link",
			fl.lost ? fl.lost : lk.lost);
	CU_ASSERT(fl.res < 0 || fl.lost == 0);
	CU_ASSERT(lk.res < 0 || lk.lost == 0);
	/* the rest goes with the next batch */
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(nomem_lost(&e, true), 0);
	for (unsigned k = 0; k < NOMEM_N; k++) {
		uint8_t got[4096];

		memset(buf, 0x40 + (int)k, sizeof(buf));
		CU_ASSERT_EQUAL(eng_read(&e, nomem_offs[k], sizeof(got), got), 0);
		CU_ASSERT(memcmp(got, buf, sizeof(buf)) == 0);
	}
	check_l1_order(&e);
	wb_end_leaky(&e, NULL, 0, 0);
}

/*
 * The same during an online grow (its batch writes the new L1 table in P3
 * and the header naming it in P4): the grow ends with the batch that wrote
 * its header, or fails; every crash image is consistent, everything reads
 * back, qemu-img check finds at most leaks.
 */
static void nomem_grow_case(const struct qcow2_opts *o, unsigned nth)
{
	const uint64_t size = 1ull << 30, size2 = 2048ull << 30;
	uint8_t *model = calloc(1, size);
	struct flushf g;
	struct eng e;
	char err[256];

	eng_create(&e, "cluster_size=65536", size, o);
	workload(&e, model, size, 30, 16 << 10, false);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	fake_log_reset();
	workload(&e, model, size, 10, 16 << 10, false); /* dirty, no flush */
	memset(&g, 0, sizeof(g));
	g.f.done = flush_done;
	qcow2_test_wb_nomem(nth);
	CU_ASSERT_EQUAL(qcow2_grow(e.q, size2, &g.f, err, sizeof(err)), 1);
	for (int i = 0; i < 100000 && !g.done; i++)
		run();
	qcow2_test_wb_nomem(0);
	CU_ASSERT_EQUAL(g.done, 1);
	CU_ASSERT(g.res == 0 || g.res == -ENOMEM);
	wb_end_leaky(&e, model, size, 0);
	free(model);
}

static void test_wb_nomem(void)
{
	/* whole tables as slices: a handful of items, so the failures reach
	 * every phase (refcounts, new tables, L2, L1) */
	struct qcow2_opts big = {.cache_entry_size = 65536};

	for (unsigned nth = 1; nth <= 7; nth++) {
		nomem_case(&big, nth, true);
		nomem_case(&big, nth, false);
	}
	/* 4 KiB slices: about 50 items, most of them refcounts in P1, then
	 * the new tables, L2, L1 */
	for (unsigned nth = 1; nth <= 55; nth += nth < 41 ? 20 : 3)
		nomem_case(NULL, nth, nth & 1);
	for (unsigned nth = 1; nth <= 8; nth++)
		nomem_grow_case(&big, nth);
}

/*
 * A batch short of memory that leaves out the L2 slice of a pointer removal
 * (a discard) must not make the removal's decrement count as durable: the
 * cluster's refcount would be lowered (and the cluster punched and reused)
 * while the L2 entry on disk still points at it, and a later batch's P1
 * could write the refcount 0 before its P2 writes the removal. Every crash
 * image must stay consistent (no entry naming a cluster of refcount 0), and
 * the reused cluster must not show up under the discarded guest cluster.
 */
static void run_idle(struct eng *e);
static void crash_reads_either(struct eng *e, size_t from, uint64_t off, uint64_t len,
			       const uint8_t *before, const uint8_t *want);

static void test_wb_nomem_decs(void)
{
	const uint64_t size = 16ull << 20, cs = 65536;
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	uint8_t *a = malloc(cs), *b = malloc(cs), *zero = calloc(1, cs), *got = malloc(cs);
	struct eng e;
	size_t from;

	memset(a, 0x11, cs);
	memset(b, 0x77, cs);
	eng_create(&e, "cluster_size=65536", size, &o);
	CU_ASSERT_EQUAL(eng_write(&e, 0, cs, a), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	from = fake_log_count();
	CU_ASSERT_EQUAL(eng_zero(&e, 0, cs, false, true), 0); /* discard */
	/* the FLUSH's batch: its first item, the discard's L2 slice, fails */
	qcow2_test_wb_nomem(1);
	CU_ASSERT_EQUAL(eng_flush(&e), -ENOMEM); /* it took nothing */
	qcow2_test_wb_nomem(0);
	run_idle(&e);
	/* another guest cluster, maybe on the freed host cluster */
	CU_ASSERT_EQUAL(eng_write(&e, 2 * cs, cs, b), 0);
	for (int i = 0; i < 3; i++) {
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		run_idle(&e);
	}
	CU_ASSERT_EQUAL(eng_read(&e, 0, cs, got), 0);
	CU_ASSERT(all_zero(got, cs));
	CU_ASSERT_EQUAL(eng_read(&e, 2 * cs, cs, got), 0);
	CU_ASSERT(memcmp(got, b, cs) == 0);
	/* the discarded cluster reads what it held or zeroes, never b */
	crash_reads_either(&e, from, 0, cs, a, zero);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(a);
	free(b);
	free(zero);
	free(got);
}

/*
 * A side batch beside a held batch (qcow2_test_wb_hold, the fake's deferred
 * hooks on), as in integration.sidebatch: 64 MiB, 64 KiB clusters, 4 KiB
 * slices (A: [0, 32 MiB), B: [32, 64 MiB)), both tables' clusters linked and
 * durable. A FLUSH's batch takes slice B (side_w[0]) and is held before its
 * L2 write; then B is dirtied again (side_w[1]) and A (side_w[2]), so the
 * dirty list is A, B, and a link of the last write waits (lk). The next
 * loop iteration lets the held batch write B and starts a side batch for A.
 */
static const uint64_t side_w[3] = {(32ull << 20) + 3 * 65536, (40ull << 20), 5 * 65536};

static void side_setup(struct eng *e, struct flushf *fl, struct flushf *lk)
{
	uint8_t *buf = malloc(65536);

	fake_set_defers(true);
	eng_create(e, "cluster_size=65536", 64ull << 20, NULL);
	memset(buf, 1, 65536);
	CU_ASSERT_EQUAL(eng_write(e, 0, 65536, buf), 0);
	CU_ASSERT_EQUAL(eng_write(e, 32ull << 20, 65536, buf), 0);
	CU_ASSERT_EQUAL(eng_flush(e), 0);
	fake_log_reset();
	qcow2_test_wb_hold(1000);
	memset(buf, 0x60, 65536);
	CU_ASSERT_EQUAL(eng_write(e, side_w[0], 65536, buf), 0);
	memset(fl, 0, sizeof(*fl));
	fl->f.done = flush_done;
	qcow2_flush(e->q, &fl->f);
	while (fake_pending()) /* P1 and its sync; then P2 waits on the hold timer */
		run();
	CU_ASSERT_PTR_NOT_NULL_FATAL(e->q->batch);
	for (int k = 1; k < 3; k++) {
		memset(buf, 0x60 + k, 65536);
		CU_ASSERT_EQUAL(eng_write(e, side_w[k], 65536, buf), 0);
	}
	CU_ASSERT_EQUAL(fl->done, 0);
	memset(lk, 0, sizeof(*lk));
	lk->f.done = flush_done;
	free(buf);
}

/* How many of side_w the image bytes (@durable: a power loss, else all written) lack. */
static unsigned side_lost(struct eng *e, bool durable)
{
	uint8_t *img, got[4096];
	uint64_t len;
	unsigned lost = 0;

	if (durable) {
		CU_ASSERT_EQUAL_FATAL(fake_crash_image(e->id, fake_log_count(), 0, &img, &len), 0);
	} else {
		const uint8_t *cur = fake_file_data(e->id, &len);

		img = malloc(len);
		memcpy(img, cur, len);
	}
	for (unsigned k = 0; k < 3; k++) {
		uint8_t want[4096];

		memset(want, 0x60 + (int)k, sizeof(want));
		img_guest_read(img, len, side_w[k], got, sizeof(got));
		lost += memcmp(got, want, sizeof(got)) != 0;
	}
	free(img);
	return lost;
}

/* After the close: each write reads back from the saved image reopened; qemu-img check. */
static void side_reopen_check(struct eng *e)
{
	uint8_t got[4096], want[4096];

	fake_set_defers(false);
	eng_qemu_check_leaky(e);
	eng_open_path(e, e->path, NULL);
	for (unsigned k = 0; k < 3; k++) {
		memset(want, 0x60 + (int)k, sizeof(want));
		CU_ASSERT_EQUAL(eng_read(e, side_w[k], sizeof(got), got), 0);
		CU_ASSERT(memcmp(got, want, sizeof(got)) == 0);
	}
	eng_close(e);
	fake_file_drop(e->id);
}

/*
 * A side batch out of memory for slice A (qcow2_test_wb_nomem) keeps A in the
 * dirty list, behind which it keeps B (under write-back by the batch beside
 * it): 4949572 (A went back at the head of the list, B then overwrote the
 * head: A was lost from the list, marked in it, never written again, and
 * the linked write completed without its entry).
 */
static void test_side_nomem(void)
{
	struct flushf fl, lk;
	struct eng e;

	side_setup(&e, &fl, &lk);
	qcow2_test_wb_nomem(1);
	CU_ASSERT_EQUAL(qcow2_link(e.q, qcow2_meta_gen(e.q), &lk.f), 1);
	run(); /* the held batch writes B; the side batch fails to take A */
	qcow2_test_wb_nomem(0);
	qcow2_test_wb_hold(0);
	CU_ASSERT(e.q->n_side_batches > 0);
	for (int i = 0; i < 10000 && !(fl.done && lk.done); i++)
		run();
	CU_ASSERT_EQUAL(fl.done, 1);
	CU_ASSERT_EQUAL(fl.res, 0);
	CU_ASSERT_EQUAL(lk.done, 1);
	CU_ASSERT_EQUAL(lk.res, 0);
	/* the linked write is in the file when its link ends */
	CU_ASSERT_EQUAL(side_lost(&e, false), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(side_lost(&e, true), 0);
	check_crash_images(&e, 1);
	eng_close(&e);
	side_reopen_check(&e);
}

/*
 * A failing close while a side batch's write is in flight (fake_hold keeps
 * it 40 loop iterations): the batch beside it failed (an injected write
 * error), so write-back keeps failing, but the close waits for the side
 * batch before it frees the engine: 4ff436c (it gave up after 4 rounds and
 * the write completed into freed memory: ASan). The next batch then writes
 * everything: each write reads back after the close.
 */
static void test_side_close(void)
{
	struct flushf fl, lk;
	struct eng e;

	side_setup(&e, &fl, &lk);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_WRITEV, 1, -EIO), 0); /* the held batch's */
	CU_ASSERT_EQUAL(fake_hold(IO_OP_WRITEV, 2, 40), 0);                /* the side batch's */
	CU_ASSERT_EQUAL(qcow2_link(e.q, qcow2_meta_gen(e.q), &lk.f), 1);
	run(); /* the held batch writes B (it fails), the side batch takes A */
	qcow2_test_wb_hold(0);
	CU_ASSERT_PTR_NOT_NULL(e.q->side);
	run();
	CU_ASSERT_EQUAL(fl.done, 1);
	CU_ASSERT_EQUAL(fl.res, -EIO);
	CU_ASSERT_PTR_NOT_NULL(e.q->side);
	CU_ASSERT_PTR_NULL(e.q->batch);
	qcow2_close(e.q); /* may report the failure; must not free the engine under the write */
	e.q = NULL;
	io_loop_inject_clear(g_loop);
	for (int i = 0; i < 100 && fake_pending(); i++)
		run();
	CU_ASSERT_EQUAL(fake_pending(), 0);
	CU_ASSERT_EQUAL(lk.done, 1);
	CU_ASSERT_EQUAL(lk.res, 0);
	check_crash_images(&e, 1);
	io_file_close(&e.file);
	side_reopen_check(&e);
}

/*
 * A batch that fails after a phase wrote a slice puts it back by its offset
 * (slice_back), never through the pointer it kept: the slice may have been
 * evicted meanwhile and its entry reused. Staged: 64 KiB clusters, 512 B
 * slices (4 MiB of guest each) in a 16-slice cache; a FLUSH's batch writes
 * slice X (P2); its last fdatasync fails and is held (fake_hold) while a
 * read of an uncached slice Z evicts X (the clock hand set on it, the only
 * victim) and reuses its entry, Z's load held in flight; then the batch
 * fails, and a second FLUSH's batch runs before Z's load ends. a71dae5:
 * before, the failed batch marked the reused entry dirty through the old
 * pointer, and the second batch wrote X's bytes (the entry's buffer, not
 * loaded yet) over Z's slice on disk: Z's writes read X's data, qemu-img
 * check finds clusters referenced twice.
 */
static void test_wb_fail_evicted(void)
{
	const uint64_t size = 256ull << 20, reg = 4ull << 20;
	struct qcow2_opts o = {
	    .l2_cache_size = 8192, .cache_entry_size = 512, .no_l2_prefetch = true};
	uint8_t *model = calloc(1, size), buf[4096];
	struct flushf fl, fl2;
	struct q2_slice *x;
	struct qcow2_extent ext[8];
	struct waitf wf;
	uint64_t table, zoff = 0, xoff = 0;
	unsigned t;
	int ret;

	struct eng e;

	eng_create(&e, "cluster_size=65536", size, &o);
	for (uint64_t off = 0; off < size; off += reg) {
		memset(buf, (int)(off / reg) + 1, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
		memcpy(model + off, buf, sizeof(buf));
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	table = e.q->l1[0] & QCOW2_L1E_OFFSET_MASK;
	/* X: region 0's slice, dirtied by a new cluster there */
	memset(buf, 0xee, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 65536, sizeof(buf), buf), 0);
	memcpy(model + 65536, buf, sizeof(buf));
	x = q2_cache_peek(&e.q->l2c, table);
	CU_ASSERT_PTR_NOT_NULL_FATAL(x);
	CU_ASSERT_FATAL(x->dirty);
	xoff = x->off;
	/* Z: a region whose slice is not cached */
	for (uint64_t off = reg; off < size && !zoff; off += reg)
		if (!q2_cache_peek(&e.q->l2c, table + (off >> 16) * 8))
			zoff = off;
	CU_ASSERT_FATAL(zoff != 0);
	fake_log_reset();
	/* the batch's syncs: P1's, then the last (fails, held 30 iterations) */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FDATASYNC, 2, -EIO), 0);
	CU_ASSERT_EQUAL(fake_hold(IO_OP_FDATASYNC, 2, 30), 0);
	memset(&fl, 0, sizeof(fl));
	fl.f.done = flush_done;
	qcow2_flush(e.q, &fl.f);
	for (int i = 0; i < 100 && (x->wb || x->dirty); i++)
		run(); /* P1, its sync, X written in P2 */
	CU_ASSERT_FATAL(!x->wb && !x->dirty && x->off == xoff);
	CU_ASSERT_EQUAL_FATAL(fl.done, 0);
	/* evict X for Z: the only victim the clock finds first */
	CU_ASSERT_PTR_NULL_FATAL(e.q->l2c.free);
	CU_ASSERT_FATAL(e.q->l2c.count >= e.q->l2c.soft_max);
	e.q->l2c.hand = x->idx;
	x->refbit = false;
	CU_ASSERT_EQUAL(fake_hold(IO_OP_READV, 1, 60), 0);
	wait_init(&wf);
	t = qcow2_io_begin(e.q);
	ret = qcow2_map_read(e.q, zoff, sizeof(buf), ext, 8, &wf.w);
	qcow2_io_end(e.q, t);
	CU_ASSERT_EQUAL_FATAL(ret, -EAGAIN);
	CU_ASSERT_PTR_NULL(q2_cache_peek(&e.q->l2c, xoff));            /* X evicted, */
	CU_ASSERT_EQUAL(x->off, table + (zoff >> 16) * 8 / 512 * 512); /* its entry Z's */
	for (int i = 0; i < 100 && !fl.done; i++)
		run();
	CU_ASSERT_EQUAL(fl.done, 1);
	CU_ASSERT_EQUAL(fl.res, -EIO);
	io_loop_inject_clear(g_loop);
	/* the next batch, while Z's load is still in flight */
	CU_ASSERT_EQUAL(wf.woken, 0);
	memset(&fl2, 0, sizeof(fl2));
	fl2.f.done = flush_done;
	qcow2_flush(e.q, &fl2.f);
	for (int i = 0; i < 200 && !(fl2.done && wf.woken); i++)
		run();
	CU_ASSERT_EQUAL(fl2.done, 1);
	CU_ASSERT_EQUAL(fl2.res, 0);
	CU_ASSERT_EQUAL(wf.woken, 1);
	wb_end_leaky(&e, model, size, 1);
	free(model);
}

/*
 * A full file system: the fallocate that backs a new L2 table fails. The
 * write must fail (not be acknowledged and lost at write-back); a failed
 * optional chunk is retried for what the metadata needs only.
 */
static void test_prealloc_enospc(void)
{
	const uint64_t size = 64ull << 20;
	uint8_t data[4096], buf[4096];
	struct eng e;

	memset(data, 0x5a, sizeof(data));
	eng_create(&e, "cluster_size=4096", size, NULL);
	/* every fallocate fails: chunk, punch, the L2 table alone: the write fails */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 0, -ENOSPC), 0);
	CU_ASSERT_EQUAL(eng_write(&e, 0, 4096, data), -ENOSPC);
	io_loop_inject_clear(g_loop);
	/* space again: the same write works and survives */
	CU_ASSERT_EQUAL(eng_write(&e, 0, 4096, data), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_FALSE(qcow2_is_corrupt(e.q));
	CU_ASSERT_EQUAL(eng_read(&e, 0, 4096, buf), 0);
	CU_ASSERT(memcmp(buf, data, 4096) == 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);

	/* only the first (chunk) fallocate fails: retried for the L2 table, the write works */
	eng_create(&e, "cluster_size=4096", size, NULL);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 1, -ENOSPC), 0);
	CU_ASSERT_EQUAL(eng_write(&e, 8ull << 20, 4096, data), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(eng_read(&e, 8ull << 20, 4096, buf), 0);
	CU_ASSERT(memcmp(buf, data, 4096) == 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

static void test_read_failure(void)
{
	const uint64_t size = 64ull << 20;
	struct qcow2_opts o = {.l2_cache_size = 8192, .cache_entry_size = 512};
	uint8_t buf[4096], data[4096];
	struct eng e;

	eng_create(&e, "cluster_size=65536", size, &o);
	memset(data, 0xab, sizeof(data));
	CU_ASSERT_EQUAL(eng_write(&e, 40ull << 20, 4096, data), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	eng_open_path(&e, e.path, &o);
	/* the L2 slice load fails: the read fails, nothing else */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	CU_ASSERT_EQUAL(eng_read(&e, 40ull << 20, 4096, buf), -EIO);
	CU_ASSERT_EQUAL(eng_read(&e, 40ull << 20, 4096, buf), 0);
	CU_ASSERT(memcmp(buf, data, 4096) == 0);
	CU_ASSERT_FALSE(qcow2_is_corrupt(e.q));
	eng_close(&e);
}

static void test_cache_eviction(void)
{
	const uint64_t size = 256ull << 20;
	struct qcow2_opts o = {.l2_cache_size = 8192, .cache_entry_size = 512};
	uint8_t buf[512];
	struct eng e;

	/* 16 slices of 64 entries (4 MiB each) for 64 slices of image */
	eng_create(&e, "cluster_size=65536", size, &o);
	for (uint64_t off = 0; off < size; off += 4ull << 20) {
		memset(buf, (int)(off >> 22) + 1, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, off + 1024, 512, buf), 0);
		if ((off >> 22) % 8 == 7)
			CU_ASSERT_EQUAL(eng_flush(&e), 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	for (int pass = 0; pass < 2; pass++) {
		for (uint64_t off = 0; off < size; off += 4ull << 20) {
			CU_ASSERT_EQUAL(eng_read(&e, off + 1024, 512, buf), 0);
			CU_ASSERT_EQUAL(buf[0], (uint8_t)((off >> 22) + 1));
			CU_ASSERT_EQUAL(buf[511], (uint8_t)((off >> 22) + 1));
		}
	}
	CU_ASSERT(e.q->l2c.evictions > 0);
	CU_ASSERT(e.q->l2c.count <= e.q->l2c.soft_max + 4);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/*
 * Early write-back is for caches that must evict: one that holds all the L2
 * tables (and refcount blocks) keeps dirty slices until a flush; one that
 * cannot writes back once half of it is dirty.
 */
static void dirty_case(uint64_t l2_cache_size, bool expect_early)
{
	const uint64_t size = 1ull << 30, stride = 4ull << 20; /* one 512 B slice each */
	/* A small refcount cache: under the old rule (half of both caches
	 * dirty) the 256 dirty L2 slices alone would start a write-back. */
	struct qcow2_opts o = {.l2_cache_size = l2_cache_size,
			       .refcount_cache_size = 8192,
			       .cache_entry_size = 512,
			       .writeback_ms = 600000,
			       .no_l2_prefetch = true};
	uint8_t buf[512];
	struct eng e;

	eng_create(&e, "cluster_size=65536", size, &o);
	for (uint64_t off = 0; off < size; off += stride) {
		memset(buf, (int)(off / stride) + 1, sizeof(buf));
		CU_ASSERT_EQUAL(eng_write(&e, off, sizeof(buf), buf), 0);
	}
	/* (no idle loop turn here: the fake io fires the 600 s timer when idle) */
	if (expect_early) {
		CU_ASSERT(e.q->batches > 0 || e.q->batch != NULL);
	} else {
		CU_ASSERT(e.q->batches == 0 && e.q->batch == NULL);
		CU_ASSERT_EQUAL(e.q->l2c.ndirty, size / stride);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT(e.q->batches > 0);
	CU_ASSERT_EQUAL(e.q->l2c.ndirty, 0);
	for (uint64_t off = 0; off < size; off += stride) {
		CU_ASSERT_EQUAL(eng_read(&e, off, sizeof(buf), buf), 0);
		CU_ASSERT_EQUAL(buf[0], (uint8_t)(off / stride + 1));
	}
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

static void test_dirty_covering(void)
{
	dirty_case(0, false); /* default: covers the image's 256 slices */
}

static void test_dirty_bounded(void)
{
	dirty_case(64 << 10, true); /* 128 slices for 256 */
}

static void test_concurrent_alloc(void)
{
	struct qcow2_alloc a, b;
	struct waitf wa, wb;
	uint8_t buf[65536];
	struct eng e;
	uint64_t n0;
	int ret;

	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	wait_init(&wa);
	wait_init(&wb);
	/* bring the L2 slice in */
	do {
		ret = qcow2_map_write(e.q, 5 * 65536, 4096, &a, &wa.w);
		if (ret == -EAGAIN)
			wait_woken(&wa);
	} while (ret == -EAGAIN);
	CU_ASSERT_EQUAL_FATAL(ret, QCOW2_WRITE_ALLOC);
	n0 = e.q->n_alloc;
	/* a second writer of the same cluster waits for the first */
	ret = qcow2_map_write(e.q, 5 * 65536 + 8192, 4096, &b, &wb.w);
	CU_ASSERT_EQUAL(ret, -EAGAIN);
	for (int i = 0; i < 10; i++)
		run();
	CU_ASSERT_EQUAL(wb.woken, 0);
	memset(buf, 1, sizeof(buf));
	CU_ASSERT_EQUAL(do_write_data(&e, buf, 65536, a.host - a.off % 65536), 0);
	qcow2_alloc_finish(e.q, &a, 0);
	CU_ASSERT_EQUAL(wb.woken, 0); /* never from inside the call */
	wait_woken(&wb);
	ret = qcow2_map_write(e.q, 5 * 65536 + 8192, 4096, &b, &wb.w);
	CU_ASSERT_EQUAL(ret, QCOW2_WRITE_INPLACE);
	CU_ASSERT_EQUAL(b.host, a.host + 8192);
	CU_ASSERT_EQUAL(e.q->n_alloc, n0);
	/* an aborted allocation leaves the cluster unallocated */
	do {
		ret = qcow2_map_write(e.q, 9 * 65536, 4096, &a, &wa.w);
		if (ret == -EAGAIN)
			wait_woken(&wa);
	} while (ret == -EAGAIN);
	CU_ASSERT_EQUAL_FATAL(ret, QCOW2_WRITE_ALLOC);
	qcow2_alloc_finish(e.q, &a, -EIO);
	{
		struct qcow2_extent x;

		CU_ASSERT_EQUAL(qcow2_map_read(e.q, 9 * 65536, 65536, &x, 1, &wa.w), 1);
		CU_ASSERT_EQUAL(x.type, QCOW2_MAP_ZERO);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	eng_qemu_check_leaky(&e);
}

static void test_grace(void)
{
	uint8_t buf[65536];
	struct qcow2_extent x;
	struct waitf wf;
	struct eng e;
	uint64_t old, host2;
	unsigned t;

	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	memset(buf, 7, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, 65536, buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	wait_init(&wf);
	t = qcow2_io_begin(e.q);
	CU_ASSERT_EQUAL(qcow2_map_read(e.q, 0, 65536, &x, 1, &wf.w), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	old = x.host;
	/* discard it while the "read" is in flight, make that durable */
	CU_ASSERT_EQUAL(eng_zero(&e, 0, 65536, false, false), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* a new allocation must not get the cluster the read still uses */
	CU_ASSERT_EQUAL(eng_write(&e, 1 << 20, 65536, buf), 0);
	CU_ASSERT_EQUAL(qcow2_map_read(e.q, 1 << 20, 65536, &x, 1, &wf.w), 1);
	CU_ASSERT_NOT_EQUAL(x.host, old);
	qcow2_io_end(e.q, t);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* now it is free: the next allocation reuses it */
	CU_ASSERT_EQUAL(eng_write(&e, 2 << 20, 65536, buf), 0);
	CU_ASSERT_EQUAL(qcow2_map_read(e.q, 2 << 20, 65536, &x, 1, &wf.w), 1);
	host2 = x.host;
	CU_ASSERT_EQUAL(host2, old);
	CU_ASSERT_EQUAL(eng_read(&e, 2 << 20, 65536, buf), 0);
	CU_ASSERT_EQUAL(buf[0], 7);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/* Point the L2 entry of guest cluster @gc at @val (in memory and in the file). */
static void poke_l2(struct eng *e, uint64_t gc, uint64_t val)
{
	const struct qcow2_header_info *h = qcow2_header(e->q);
	uint64_t fsize, l2;
	const uint8_t *img = fake_file_data(e->id, &fsize);
	uint8_t b[8];

	l2 = qcow2_be64(img + h->l1_table_offset + (gc >> h->l2_bits) * 8) & QCOW2_L1E_OFFSET_MASK;
	CU_ASSERT_FATAL(l2 != 0);
	qcow2_put_be64(b, val);
	CU_ASSERT_EQUAL(
	    io_file_pwrite_sync(&e->file, b, 8, l2 + (gc & ((1ull << h->l2_bits) - 1)) * 8), 0);
}

static void test_corrupt(void)
{
	uint8_t buf[65536];
	struct eng e;
	uint64_t fsize;
	const uint8_t *img;

	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	memset(buf, 3, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, 65536, buf), 0);
	CU_ASSERT_EQUAL(eng_write(&e, 65536, 65536, buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	/* cluster 0 points past the end of the file, cluster 1 at the L1 table */
	eng_open_path(&e, e.path, NULL);
	poke_l2(&e, 0, QCOW2_OFLAG_COPIED | (1ull << 40));
	poke_l2(&e, 1, QCOW2_OFLAG_COPIED | qcow2_header(e.q)->l1_table_offset);
	eng_close(&e);
	eng_open_path(&e, e.path, NULL);
	CU_ASSERT_FALSE(qcow2_is_corrupt(e.q));
	/* reading the pointer into metadata is harmless; writing it is refused */
	CU_ASSERT_EQUAL(eng_read(&e, 65536, 4096, buf), 0);
	CU_ASSERT_EQUAL(eng_write(&e, 65536, 4096, buf), -EIO);
	CU_ASSERT_TRUE(qcow2_is_corrupt(e.q));
	/* the pointer past EOF fails reads */
	CU_ASSERT_EQUAL(eng_read(&e, 0, 4096, buf), -EIO);
	/* other clusters still read */
	CU_ASSERT_EQUAL(eng_read(&e, 1 << 20, 4096, buf), 0);
	/* every write fails now */
	CU_ASSERT_EQUAL(eng_write(&e, 2 << 20, 4096, buf), -EIO);
	for (int i = 0; i < 10; i++)
		run();
	img = fake_file_data(e.id, &fsize);
	CU_ASSERT(qcow2_be64(img + QCOW2_OFF_INCOMPAT) & QCOW2_INCOMPAT_CORRUPT);
	eng_close(&e);
	/* it is refused now, except read-only with allow_corrupt_ro */
	{
		struct io_file f;
		struct qcow2 *q;
		struct qcow2_opts ro = {.read_only = true, .allow_corrupt_ro = true};
		char err[512];

		CU_ASSERT_EQUAL(io_file_open(&f, e.path, 0), 0);
		CU_ASSERT_EQUAL(qcow2_open(&q, g_loop, &f, e.path, NULL, err, sizeof(err)),
				-EUCLEAN);
		CU_ASSERT_PTR_NOT_NULL(strstr(err, "corrupt"));
		CU_ASSERT_EQUAL(qcow2_open(&q, g_loop, &f, e.path, &ro, err, sizeof(err)), 0);
		qcow2_close(q);
		io_file_close(&f);
	}
}

/*
 * A hostile image: a compressed L2 entry whose data lies in a metadata
 * cluster (here the first refcount block, refcount 1). Discarding (or
 * overwriting) the guest cluster would lower that cluster's refcount to 0
 * and free it: the free list then hands the refcount block out for guest
 * data. The engine must refuse instead (corrupt, -EIO), as it does for a
 * standard entry pointing at metadata.
 */
static void test_corrupt_compressed(void)
{
	const uint64_t cs = 65536;
	uint8_t buf[4096];
	uint64_t fsize, rb;
	const uint8_t *img;
	struct eng e;

	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	memset(buf, 3, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	eng_open_path(&e, e.path, NULL);
	img = fake_file_data(e.id, &fsize);
	rb = qcow2_be64(img + qcow2_header(e.q)->refcount_table_offset) & QCOW2_RTE_OFFSET_MASK;
	CU_ASSERT_FATAL(rb != 0);
	poke_l2(&e, 0, QCOW2_OFLAG_COMPRESSED | rb); /* one sector at the block */
	eng_close(&e);
	eng_open_path(&e, e.path, NULL);
	CU_ASSERT_EQUAL(eng_zero(&e, 0, cs, false, true), -EIO);
	CU_ASSERT_TRUE(qcow2_is_corrupt(e.q));
	for (int i = 0; i < 3; i++) {
		eng_flush(&e);
		run_idle(&e);
	}
	CU_ASSERT_EQUAL(e.q->freelist.n + e.q->punchq.n, 0);
	eng_close(&e);
}

static void test_readonly(void)
{
	struct qcow2_opts o = {.read_only = true};
	struct qcow2_alloc a;
	struct waitf wf;
	struct eng e, e2;
	uint64_t dl;

	eng_create(&e, "cluster_size=65536", 16ull << 20, NULL);
	eng_close(&e);
	eng_open_path(&e2, e.path, &o);
	wait_init(&wf);
	CU_ASSERT_EQUAL(qcow2_map_write(e2.q, 0, 4096, &a, &wf.w), -EROFS);
	CU_ASSERT_EQUAL(qcow2_zero_step(e2.q, 0, 65536, false, false, &dl, &wf.w), -EROFS);
	CU_ASSERT_EQUAL(eng_flush(&e2), 0);
	eng_close(&e2);
}

static void test_discard_reuse_and_zero(void)
{
	const uint64_t size = 16ull << 20;
	uint8_t *model = calloc(1, size), buf[4096];
	struct eng e;

	eng_create(&e, "cluster_size=65536", size, NULL);
	memset(model, 0x11, 4 << 20);
	CU_ASSERT_EQUAL(eng_write(&e, 0, 4 << 20, model), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* discard 2 MiB, write zeroes (keeping allocation) on 1 MiB */
	CU_ASSERT_EQUAL(eng_zero(&e, 0, 2 << 20, false, false), 0);
	memset(model, 0, 2 << 20);
	CU_ASSERT_EQUAL(eng_zero(&e, 2 << 20, 1 << 20, true, false), 0);
	memset(model + (2 << 20), 0, 1 << 20);
	/* partial writes into zeroed-but-allocated clusters */
	memset(buf, 0x22, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, (2 << 20) + 512, 4096, buf), 0);
	memcpy(model + (2 << 20) + 512, buf, 4096);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* freed clusters come back */
	CU_ASSERT_EQUAL(eng_write(&e, 8 << 20, 1 << 20, model + (3 << 20)), 0);
	memcpy(model + (8 << 20), model + (3 << 20), 1 << 20);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	verify(&e, model, size);
	CU_ASSERT(e.q->freelist.n < 32);
	check_crash_images(&e, 1);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(model);
}

/*
 * Every crash image of the record from entry @from on (all writes up to an
 * fdatasync, then random subsets of the later ones: a superset of what a
 * process death leaves) is consistent, and guest [off, off + len) reads,
 * sector by sector, @before (what it read before the write in flight) or
 * @want (that write): never anything else, in particular not what a
 * subcluster held before a discard or write-zeroes. The image is read back
 * through qemu-img, the oracle.
 */
static void run_idle(struct eng *e);

/*
 * Crash image @i of the record (sample @s: 0 all writes up to the entry,
 * else a random subset of the later ones), checked for consistency (a
 * CU_FAIL if not), then guest [off, off + len) into @got (crash_image_read).
 * False if the image was inconsistent.
 */
static bool crash_read_guest(struct eng *e, size_t i, unsigned s, const char *path, const char *raw,
			     uint64_t off, uint64_t len, uint8_t *got)
{
	char why[256];
	uint8_t *img;
	uint64_t ilen;
	bool ok = true;

	CU_ASSERT_EQUAL_FATAL(fake_crash_image(e->id, i, s ? rnd() | 1 : 0, &img, &ilen), 0);
	if (check_image(img, ilen, why, sizeof(why)) < 0) {
		fprintf(stderr, "crash image after record entry %zu: %s\n", i, why);
		CU_FAIL("inconsistent crash image");
		ok = false;
	}
	crash_image_read(img, ilen, path, raw, off, len, got);
	return ok;
}

static void crash_reads_either(struct eng *e, size_t from, uint64_t off, uint64_t len,
			       const uint8_t *before, const uint8_t *want)
{
	size_t n = fake_log_count();
	char *path = P("zo.qcow2"), *raw = P("zo.raw");
	uint8_t *got = malloc(len);
	unsigned bad = 0;

	for (size_t i = from; i <= n && !bad; i++) {
		for (unsigned s = 0; s < 6 && !bad; s++) {
			crash_read_guest(e, i, s, path, raw, off, len, got);
			for (uint64_t k = 0; k < len; k += 512) {
				if (!memcmp(got + k, before + k, 512) ||
				    !memcmp(got + k, want + k, 512))
					continue;
				fprintf(stderr,
					"crash image after record entry %zu (sample %u): guest "
					"0x%llx reads neither what it read before nor the "
					"write in flight (0x%02x)\n",
					i, s, (unsigned long long)(off + k), got[k]);
				bad++;
				break;
			}
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
	unlink(path);
	unlink(raw);
	free(got);
}

/*
 * Extended L2, no backing file: a cluster zeroed without unmap keeps its
 * host cluster and old bytes (allocation bits cleared, zero bits set). A
 * later write into its subclusters must never let their allocation bits
 * reach the file before their data (an early link may only do that where
 * the host bytes are known zeroes): every crash image reads what it read
 * before the write (zeroes) or the write, never the old bytes. Cases: a
 * partial-cluster discard (a hint: nothing changes, the write goes in
 * place), a whole cluster zeroed, the same after the engine was reopened,
 * and a whole cluster freed and its host cluster reused for another guest
 * cluster.
 */
static void stale_case(unsigned variant)
{
	const uint64_t size = 4ull << 20, cs = 16384, sc = cs / 32;
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	uint8_t old[2048], neu[2048], before[2048], zero[2048] = {0};
	uint64_t g = 3 * cs, w = g + 5 * sc; /* guest cluster 3, subclusters 5..8 */
	struct eng e;
	size_t from;

	memset(old, 0xa5, sizeof(old));
	fill(neu, sizeof(neu), 0x31);
	eng_create(&e, "cluster_size=16384,extended_l2=on", size, &o);
	/* the cluster: allocated by this engine with subcluster 0, then 5..8 */
	CU_ASSERT_EQUAL(eng_write(&e, g, sc, neu), 0);
	CU_ASSERT_EQUAL(eng_write(&e, w, sizeof(old), old), 0);
	if (variant == 3) {
		/* the whole cluster freed; its host cluster reused by cluster 7 */
		CU_ASSERT_EQUAL(eng_zero(&e, g, cs, false, true), 0);
		for (int i = 0; i < 4; i++) {
			CU_ASSERT_EQUAL(eng_flush(&e), 0);
			run_idle(&e);
		}
		g = 7 * cs;
		w = g + 5 * sc;
		CU_ASSERT_EQUAL(eng_write(&e, g, sc, neu), 0);
	} else {
		/* 0: subclusters discarded, 1: the cluster zeroed, 2: and reopened */
		int zr = variant ? eng_zero(&e, g, cs, true, false)
				 : eng_zero(&e, w, sizeof(old), false, true);

		CU_ASSERT_EQUAL(zr, 0);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	if (variant == 2) {
		char path[1024];

		snprintf(path, sizeof(path), "%s", e.path);
		eng_close(&e);
		CU_ASSERT_EQUAL_FATAL(fake_file_save(e.id, path), 0);
		fake_file_drop(e.id);
		eng_open_path(&e, path, &o);
		CU_ASSERT_EQUAL(eng_write(&e, g, sc, neu), 0); /* the cluster known again? */
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
	}
	CU_ASSERT_EQUAL(eng_read(&e, w, sizeof(before), before), 0);
	if (variant)
		CU_ASSERT(memcmp(before, zero, sizeof(before)) == 0);
	from = fake_log_count();
	CU_ASSERT_EQUAL(eng_write(&e, w, sizeof(neu), neu), 0);
	crash_reads_either(&e, from, w, sizeof(neu), before, neu);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

static void test_stale_subclusters(void)
{
	for (unsigned v = 0; v < 4; v++)
		stale_case(v);
}

/*
 * Extended L2, no backing file: the subclusters of a new cluster that its
 * first write did not cover are linked allocated (a cluster written whole,
 * test_whole_sc) or known zero for a later early link (mapping.c, q->zk)
 * only where they read zeroes in every crash image, power loss included.
 * Here the cluster is a freed one reused (old bytes in it, no punch), its
 * refcount made durable by a batch that ran while its data write was in
 * flight (the timer's, another request's FLUSH), so the request's link
 * batch skips the refcount sync (rc_nosync) and writes the L2 entry with no
 * fdatasync after the fill: a crash image may hold the entry and not the
 * fill. Every crash image must read, around the 4 KiB written, zeroes (what
 * the guest read before), never the old cluster's bytes. (The 4 KiB itself,
 * never flushed, may read them after a power loss, as with QEMU, which
 * orders only COW data before the L2 entry.)
 * !@extl2: a standard image, whose new cluster is written whole (the COW
 * head and tail as zeroes) and linked whole in any case: the same holds.
 * @sc_link (qcow2_test_sc_link): the first write linked per subcluster, and
 * a second one, into another subcluster (an early link where the first
 * write's fill counts as zeroes), is the one checked.
 */
static int map_once(struct eng *e, uint64_t off, uint64_t len, struct qcow2_extent *x);

static void whole_reused_case(bool sc_link, bool extl2, bool punch)
{
	const uint64_t size = 4ull << 20, cs = 65536;
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	uint8_t *old = malloc(cs), *zero = calloc(1, cs), *want = calloc(1, cs);
	uint64_t g = 7 * cs, off = g + 8192, old_host;
	struct qcow2_extent x;
	struct qcow2_alloc a;
	struct flushf lk;
	struct waitf wf;
	struct eng e;
	size_t from;
	int ret;

	memset(old, 0xa5, cs);
	memset(want + 8192, 0x3c, 4096);
	eng_create(&e, extl2 ? "cluster_size=65536,extended_l2=on" : "cluster_size=65536", size,
		   &o);
	qcow2_test_sc_link(sc_link);
	/* guest cluster 3 full of old bytes, then freed: its host cluster
	 * goes to the free list, bytes and all (no hole punching here), or
	 * (@punch) punched first */
	CU_ASSERT_EQUAL(eng_write(&e, 3 * cs, cs, old), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	while ((ret = map_once(&e, 3 * cs, cs, &x)) == -EAGAIN)
		;
	CU_ASSERT_EQUAL_FATAL(ret, 1);
	old_host = x.host;
	if (!punch)
		CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 0, -EOPNOTSUPP), 0);
	CU_ASSERT_EQUAL(eng_zero(&e, 3 * cs, cs, false, true), 0);
	for (int i = 0; i < 4; i++) {
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		run_idle(&e);
	}
	io_loop_inject_clear(g_loop);
	from = fake_log_count();
	do {
		wait_init(&wf);
		ret = qcow2_map_write(e.q, off, 4096, &a, &wf.w);
		if (ret == -EAGAIN)
			wait_woken(&wf);
	} while (ret == -EAGAIN);
	CU_ASSERT_EQUAL_FATAL(ret, QCOW2_WRITE_ALLOC);
	CU_ASSERT(a.new_host);
	/* the freed cluster, reused: fresh only when punched */
	CU_ASSERT_EQUAL(a.fresh, punch);
	CU_ASSERT_EQUAL(a.host - (a.off & (cs - 1)), old_host);
	/* a batch while the data write is in flight: the refcount durable
	 * (punched: none, so that only the free list's own order, the link
	 * batch's P1 sync, can put the punch on disk before the entry) */
	if (!punch)
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* the data written whole, zeroes around it (alloc_write's fill) */
	ret = do_write_data(&e, want, cs, a.host - (a.off & (cs - 1)));
	CU_ASSERT_EQUAL(ret, 0);
	a.rest_zero = true;
	qcow2_alloc_finish(e.q, &a, ret);
	/* the request waits for its entry: a link batch */
	memset(&lk, 0, sizeof(lk));
	lk.f.done = flush_done;
	if (qcow2_link(e.q, a.link_gen, &lk.f))
		wait_chain(&lk);
	if (sc_link) {
		/* a second write into the cluster, another subcluster */
		uint8_t *before = malloc(cs);

		CU_ASSERT_EQUAL(eng_read(&e, g, cs, before), 0);
		CU_ASSERT(memcmp(before, want, cs) == 0);
		memset(want + 32768, 0x4b, 4096);
		from = fake_log_count();
		CU_ASSERT_EQUAL(eng_write(&e, g + 32768, 4096, want + 32768), 0);
		memset(&lk, 0, sizeof(lk));
		lk.f.done = flush_done;
		if (qcow2_link(e.q, qcow2_meta_gen(e.q), &lk.f))
			wait_chain(&lk);
		/* past the first write (its own data may be lost: never
		 * flushed): what the second one did not write reads zeroes */
		crash_reads_either(&e, from, g + 16384, cs - 16384, before + 16384, want + 16384);
		free(before);
	} else {
		/* around the write (its own bytes may be lost: never flushed) */
		crash_reads_either(&e, from, g, 8192, zero, want);
		crash_reads_either(&e, from, off + 4096, cs - 12288, zero, want + 12288);
	}
	qcow2_test_sc_link(false);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(old);
	free(zero);
	free(want);
}

static void test_whole_reused(void)
{
	whole_reused_case(false, true, false);
	whole_reused_case(true, true, false);
	whole_reused_case(false, false, false);
	/* punched: counted as fresh space (linked whole, known zero, no COW
	 * zeroing); the punch (a write of zeroes in the fake's record) must be
	 * durable before any entry naming the cluster is: the link batch syncs
	 * P1 because the free list's allocation asked for it (alloc.c) */
	whole_reused_case(false, true, true);
	whole_reused_case(false, false, true);
}

/*
 * A cluster zeroed with its host cluster kept (write-zeroes without unmap:
 * the zero flag, or extended L2's zero bits, over its old bytes), durable.
 * A write into part of it allocates in place (TK_META_ZERO, TK_META_SC):
 * the data with zeroes around it (the COW head and tail), then the entry
 * changes (flag or bits cleared). Its link batch links no new cluster, so
 * it may skip P1's fdatasync (rc_nosync); every crash image must still
 * read zeroes around the 4 KiB written (what the guest read before), never
 * the old bytes (the 4 KiB itself, never flushed, may: as with QEMU, which
 * orders COW data before the L2 entry).
 */
static void zero_alloc_case(bool extl2)
{
	const uint64_t size = 4ull << 20, cs = 65536;
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	uint8_t *old = malloc(cs), *zero = calloc(1, cs), *want = calloc(1, cs), *b;
	uint64_t g = 3 * cs, off = g + 8192 + 512, head, total;
	struct qcow2_alloc a;
	struct flushf lk;
	struct waitf wf;
	struct eng e;
	size_t from;
	int ret;

	memset(old, 0xa5, cs);
	memset(want + (off - g), 0x3c, 4096);
	eng_create(&e, extl2 ? "cluster_size=65536,extended_l2=on" : "cluster_size=65536", size,
		   &o);
	CU_ASSERT_EQUAL(eng_write(&e, g, cs, old), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(eng_zero(&e, g, cs, true, false), 0);
	for (int i = 0; i < 2; i++) {
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		run_idle(&e);
	}
	from = fake_log_count();
	do {
		wait_init(&wf);
		ret = qcow2_map_write(e.q, off, 4096, &a, &wf.w);
		if (ret == -EAGAIN)
			wait_woken(&wf);
	} while (ret == -EAGAIN);
	CU_ASSERT_EQUAL_FATAL(ret, QCOW2_WRITE_ALLOC);
	CU_ASSERT_FALSE(a.new_host); /* in place: the zeroed cluster's own */
	CU_ASSERT(a.cow_start < a.off);
	/* as alloc_write: zero the range (not fresh), then data and fill */
	head = a.off - a.cow_start;
	total = a.cow_end - a.cow_start;
	b = calloc(1, total);
	memcpy(b + head, want + (off - g), 4096);
	ret = do_zero_range(&e, a.host - head, total);
	if (!ret)
		ret = do_write_data(&e, b, total, a.host - head);
	CU_ASSERT_EQUAL(ret, 0);
	free(b);
	qcow2_alloc_finish(e.q, &a, ret);
	memset(&lk, 0, sizeof(lk));
	lk.f.done = flush_done;
	if (qcow2_link(e.q, a.link_gen, &lk.f))
		wait_chain(&lk);
	crash_reads_either(&e, from, g, off - g, zero, want);
	crash_reads_either(&e, from, off + 4096, g + cs - off - 4096, zero + (off + 4096 - g),
			   want + (off + 4096 - g));
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(old);
	free(zero);
	free(want);
}

static void test_zero_alloc(void)
{
	zero_alloc_case(false);
	zero_alloc_case(true);
}

/*
 * A qcow2 on a block device (fake_set_blockdev) whose space past the image
 * holds old bytes (STALE: another image's, a deleted file's). No cluster of
 * a device is fresh space, so a new cluster's link waits for an fdatasync
 * of its data first (P1), unless zero-ahead (qcow2_opts.blkdev_zero_ahead,
 * alloc.c) zeroed its range and made that durable before the cursor handed
 * it out. Variants:
 *   0  zero-ahead off: every link of a new cluster syncs first
 *   1  on: the links past the first range's start sync nothing (but the
 *      reserve's refcounts once); reopened, the next range starts past
 *      the used space and the data written before reads back
 *   2  on, but the device refuses the zeroing (-EOPNOTSUPP: it claims the
 *      offload and has none): off again, links sync as in 0
 *   3  on, the zeroing held in flight: allocations past the margin park
 *      until it and its sync ended
 *   4  on, the zeroing slower than the rate guard: the range it zeroed is
 *      fresh (durable zeroes), no further range is zeroed
 * Every variant: no write of ours lands in a zeroed range before its
 * zeroing's sync ended (the record), the data reads back, qemu-img check is
 * clean; in 0 and 1, every crash image (power loss: the syncs' writes, any
 * subset of the others) reads the guest's bytes or zeroes, never STALE.
 */
#define STALE 0xa5

static unsigned blk_write_link(struct eng *e, uint64_t off, uint8_t tag, uint8_t *model)
{
	uint8_t buf[4096];
	struct flushf f;

	memset(buf, tag, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(e, off, sizeof(buf), buf), 0);
	memcpy(model + off, buf, sizeof(buf));
	memset(&f, 0, sizeof(f));
	f.f.done = flush_done;
	if (!qcow2_link(e->q, qcow2_meta_gen(e->q), &f.f))
		return 0;
	return wait_chain(&f);
}

/* Every crash image of the record: consistent, and no guest byte reads STALE. */
static void blk_crash_images(struct eng *e, uint64_t size)
{
	size_t n = fake_log_count(), nsync = 0, stride;
	char *path = P("blk-crash.qcow2"), *raw = P("blk-crash.raw");
	uint8_t *got = malloc(size);
	unsigned bad = 0, images = 0;

	for (size_t i = 0; i < n; i++)
		nsync += fake_log_get(i)->type == FAKE_FSYNC;
	stride = nsync / 12 + 1;
	for (size_t i = 0, k = 0; i <= n && !bad; i++) {
		bool sync_point = i == n || fake_log_get(i)->type == FAKE_FSYNC;

		if (sync_point && i < n && k++ % stride)
			continue;
		if (!sync_point && rnd() % (16 * stride))
			continue;
		for (unsigned s = 0; s < 3 && !bad; s++) {
			if (!crash_read_guest(e, i, s, path, raw, 0, size, got))
				bad++;
			images++;
			for (uint64_t b = 0; b < size && !bad; b++) {
				if (got[b] != STALE)
					continue;
				fprintf(
				    stderr,
				    "crash image after record entry %zu (sample %u): guest 0x%llx "
				    "reads the device's old bytes\n",
				    i, s, (unsigned long long)b);
				bad++;
			}
		}
	}
	CU_ASSERT_EQUAL(bad, 0);
	CU_ASSERT(images > 6);
	unlink(path);
	unlink(raw);
	free(got);
}

/*
 * The record: no write into the range [@lo, @hi) (bytes) that zero-ahead
 * zeroed (its one zeroing there) before the fdatasync that made the zeroing
 * durable ended, nor while it ran. Returns the zeroings of that range seen.
 */
static unsigned blk_zero_order(uint64_t lo, uint64_t hi)
{
	size_t n = fake_log_count(), z = SIZE_MAX, synced = SIZE_MAX;
	unsigned zeroings = 0, early = 0;

	for (size_t i = 0; i < n; i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type == FAKE_WRITE && l->off == lo && l->off + l->len == hi) {
			z = i;
			zeroings++;
		} else if (l->type == FAKE_FSYNC && z != SIZE_MAX && synced == SIZE_MAX &&
			   l->sub > z) {
			synced = i;
		} else if (l->type == FAKE_WRITE && l->off < hi && l->off + l->len > lo &&
			   (synced == SIZE_MAX || l->sub <= synced)) {
			if (++early == 1 && z != SIZE_MAX)
				fprintf(stderr,
					"record entry %zu: a write at 0x%llx before the zeroing of "
					"its range was durable\n",
					i, (unsigned long long)l->off);
		}
	}
	if (zeroings)
		CU_ASSERT_EQUAL(early, 0);
	return zeroings;
}

/* A qcow2 of @size on a device of @dev bytes (fake_set_blockdev) whose space
 * past the image holds STALE; its name in @name. */
static void blk_image(char *name, size_t len, uint64_t size, uint64_t dev)
{
	const uint64_t cs = 65536;
	uint8_t *stale = malloc(cs);
	int fd, id;
	off_t end;

	CU_ASSERT_FATAL(stale != NULL);
	snprintf(name, len, "blk%d.qcow2", g_nimg++);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o cluster_size=65536 %s %llu",
				    P(name), (unsigned long long)size),
			      0);
	fd = open(P(name), O_WRONLY);
	CU_ASSERT_FATAL(fd >= 0);
	end = lseek(fd, 0, SEEK_END);
	memset(stale, STALE, cs);
	for (uint64_t off = (uint64_t)end; off < dev; off += cs)
		CU_ASSERT_FATAL(pwrite(fd, stale, cs, (off_t)off) == (ssize_t)cs);
	close(fd);
	free(stale);
	id = fake_file_load(P(name));
	CU_ASSERT_FATAL(id >= 0);
	fake_set_blockdev(id, 1ull << 30);
}

static void blkdev_case(unsigned variant)
{
	const uint64_t size = 32ull << 20, dev = 48ull << 20, cs = 65536;
	struct qcow2_opts o = {
	    .writeback_ms = 600000, .no_l2_prefetch = true, .blkdev_zero_ahead = variant != 0};
	uint8_t *model = calloc(1, size);
	unsigned nw = 200, late = 0, order[512];
	uint64_t zlo = 0, zhi = 0;
	char name[64];
	struct eng e;

	/* the device: a new image, then the old bytes of whatever was there */
	blk_image(name, sizeof(name), size, dev);
	if (variant == 2)
		CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 1, -EOPNOTSUPP), 0);
	if (variant == 3)
		CU_ASSERT_EQUAL(fake_hold(IO_OP_FALLOCATE, 1, 400), 0);
	fake_log_reset();
	eng_open_path(&e, P(name), &o);
	CU_ASSERT_EQUAL(e.q->zah_on, variant != 0);
	CU_ASSERT_EQUAL(e.q->zah_busy, variant != 0);
	if (variant != 4)
		e.q->zah_min_rate = 0; /* the fake's zeroing is slow: no rate guard */
	else                           /* every zeroing too slow, judged at once */
		e.q->zah_min_rate = UINT64_MAX, e.q->zah_slack_ns = 0, e.q->zah_judge_bytes = 0;
	zlo = e.q->zah_blo << 16;
	zhi = e.q->zah_bhi << 16;
	if (variant)
		CU_ASSERT(zlo > 0 && zhi == dev);
	/* growing 4 KiB writes into distinct clusters, in random order, each
	 * waiting for its link (qcow2_link) as a guest's write does */
	for (unsigned i = 0; i < 512; i++)
		order[i] = i;
	for (unsigned i = 511; i > 0; i--) {
		unsigned j = rnd() % (i + 1), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (unsigned i = 0; i < nw; i++) {
		uint8_t tag = (uint8_t)(i % 0x7f + 1); /* never STALE, never 0 */
		unsigned chain =
		    blk_write_link(&e, (uint64_t)order[i] * cs + (i % 16) * 4096, tag, model);

		if (i >= nw / 2)
			late += chain;
		if (i % 64 == 63)
			CU_ASSERT_EQUAL(eng_flush(&e), 0);
	}
	verify(&e, model, size);
	if (variant == 1 || variant == 3 || variant == 4) {
		/* past the first reserve (cut at the range): fresh, no P1 sync */
		CU_ASSERT(late <= 2);
		CU_ASSERT_EQUAL(e.q->zah_ranges, 1);
		CU_ASSERT_EQUAL(e.q->zah_on, variant != 4);
		CU_ASSERT_EQUAL(blk_zero_order(zlo, zhi), 1);
	} else {
		/* no fresh space: every link of a new cluster synced its data */
		CU_ASSERT(late >= nw / 2);
		CU_ASSERT_EQUAL(e.q->zah_ranges, 0);
		CU_ASSERT(!e.q->zah_on);
		CU_ASSERT_EQUAL(blk_zero_order(zlo, zhi), 0);
	}
	if (variant <= 1) /* off, on (the others: the same as one of them, or slower) */
		blk_crash_images(&e, size);
	if (variant == 1) {
		/* reopened: the next range starts past the used space, nothing
		 * written before is zeroed, and the growth goes on */
		uint64_t used;

		eng_close(&e);
		fake_log_reset();
		eng_open_path(&e, P(name), &o);
		CU_ASSERT_EQUAL(q2_scan_highest_used(e.q, &used), 0);
		CU_ASSERT(e.q->zah_busy);
		CU_ASSERT(e.q->zah_blo >= used + 64);
		e.q->zah_min_rate = 0;
		zlo = e.q->zah_blo << 16;
		zhi = e.q->zah_bhi << 16;
		for (unsigned i = nw; i < nw + 100; i++)
			blk_write_link(&e, (uint64_t)order[i] * cs, (uint8_t)(i % 0x7f + 1), model);
		verify(&e, model, size);
		CU_ASSERT_EQUAL(blk_zero_order(zlo, zhi), 1);
	}
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
	free(model);
}

static void test_blkdev_zero_ahead(void)
{
	for (unsigned v = 0; v < 5; v++)
		blkdev_case(v);
}

static void blk_zah_settle(struct eng *e)
{
	for (int i = 0; i < 100000 && e->q->zah_busy; i++)
		CU_ASSERT_FATAL(io_loop_run_once(g_loop, true) >= 0);
	CU_ASSERT(!e->q->zah_busy);
}

/*
 * Zero-ahead's edges:
 *  - a corrupt image starts no range, and a range in flight when the image
 *    turns corrupt is cut short: nothing of it counts as fresh;
 *  - close (and a migration handoff, which closes the engine) waits for one
 *    step of the zeroing at most (ZAH_STEP_BYTES, 64 MiB), never for the
 *    whole range: a 160 MiB device closed at once sees one 64 MiB zeroing
 *    and no sync of it, and the image is clean;
 *  - an engine reopened over the same file (snapshot, handoff) when the
 *    device can no longer be opened (--user): zero-ahead keeps the caller's
 *    description (qcow2_opts.zah_keep) and stays on; without one it is off;
 *  - the rate guard judges ZAH_JUDGE_BYTES at least: one small range,
 *    however slow (a loaded machine), does not turn zero-ahead off.
 */
static void test_blkdev_zah_edges(void)
{
	const uint64_t size = 32ull << 20, cs = 65536;
	struct qcow2_opts o = {
	    .writeback_ms = 600000, .no_l2_prefetch = true, .blkdev_zero_ahead = true};
	struct qcow2_zah_keep keep = {0};
	uint64_t zlo, zbytes = 0;
	unsigned zwrites = 0;
	char name[64], err[256];
	struct eng e;

	/* corrupt: the range in flight ends unfresh, none starts */
	blk_image(name, sizeof(name), size, 48ull << 20);
	eng_open_path(&e, P(name), &o);
	CU_ASSERT_FATAL(e.q->zah_busy);
	e.q->zah_min_rate = 0;
	e.q->corrupt = true;
	blk_zah_settle(&e);
	CU_ASSERT_EQUAL(e.q->zah_ranges, 0);
	CU_ASSERT_EQUAL(e.q->zah_ok, e.q->zah_lo);
	q2_zah_forget(e.q);
	q2_zah_start(e.q, true);
	CU_ASSERT(!e.q->zah_busy);
	e.q->corrupt = false;
	eng_close(&e);

	/* close at once: one step zeroed, no sync of it, nothing else */
	blk_image(name, sizeof(name), size, 160ull << 20);
	fake_log_reset();
	eng_open_path(&e, P(name), &o);
	CU_ASSERT_FATAL(e.q->zah_busy);
	zlo = e.q->zah_blo * cs;
	CU_ASSERT((e.q->zah_bhi - e.q->zah_blo) * cs > (64ull << 20) * 2);
	eng_close(&e);
	for (size_t i = 0; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type == FAKE_WRITE && l->off >= zlo)
			zwrites++, zbytes += l->len;
	}
	CU_ASSERT_EQUAL(zwrites, 1);
	CU_ASSERT_EQUAL(zbytes, 64ull << 20);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);

	/* going read-only: -EAGAIN until the step in flight ended, no more */
	blk_image(name, sizeof(name), size, 160ull << 20);
	fake_log_reset();
	eng_open_path(&e, P(name), &o);
	CU_ASSERT_FATAL(e.q->zah_busy);
	e.q->zah_min_rate = 0;
	zlo = e.q->zah_blo * cs;
	CU_ASSERT_EQUAL(qcow2_set_read_only(e.q, true), -EAGAIN);
	blk_zah_settle(&e);
	CU_ASSERT_EQUAL(e.q->zah_ranges, 0);
	CU_ASSERT(e.q->zah_on); /* (in case the switch does not happen) */
	CU_ASSERT_EQUAL(qcow2_set_read_only(e.q, true), 0);
	zwrites = 0, zbytes = 0;
	for (size_t i = 0; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type == FAKE_WRITE && l->off >= zlo)
			zwrites++, zbytes += l->len;
	}
	CU_ASSERT_EQUAL(zwrites, 1);
	CU_ASSERT_EQUAL(zbytes, 64ull << 20);
	eng_close(&e);

	/* reopened with the device out of reach: the kept description serves */
	blk_image(name, sizeof(name), size, 48ull << 20);
	o.zah_keep = &keep;
	eng_open_path(&e, P(name), &o);
	CU_ASSERT(keep.open);
	CU_ASSERT(e.q->zah_on);
	e.q->zah_min_rate = UINT64_MAX; /* every zeroing too slow */
	e.q->zah_slack_ns = 0;
	blk_zah_settle(&e);
	CU_ASSERT_EQUAL(e.q->zah_ranges, 1);
	/* the rate guard: one 47 MiB range, however slow, is not judged alone */
	CU_ASSERT(e.q->zah_on);
	CU_ASSERT_EQUAL(qcow2_close(e.q), 0);
	fake_set_reopen_err(-EACCES);
	CU_ASSERT_EQUAL_FATAL(qcow2_open(&e.q, g_loop, &e.file, e.path, &o, err, sizeof(err)), 0);
	CU_ASSERT(e.q->zah_on);
	CU_ASSERT(e.q->zah_busy);
	blk_zah_settle(&e);
	CU_ASSERT_EQUAL(qcow2_close(e.q), 0);
	o.zah_keep = NULL;
	CU_ASSERT_EQUAL_FATAL(qcow2_open(&e.q, g_loop, &e.file, e.path, &o, err, sizeof(err)), 0);
	CU_ASSERT(!e.q->zah_on); /* its own description: cannot be opened */
	fake_set_reopen_err(0);
	eng_close(&e);
	CU_ASSERT(keep.open);
	io_file_close(&keep.file);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/*
 * Zero-ahead and an invalid refcount table entry past the used space (a
 * reserved bit set): q2_scan_highest_used skips it, so clusters it counts
 * may be in use above the cursor; alloc_cursor would mark the image corrupt
 * on reaching them (rc_locate) without touching a byte. Zero-ahead must not
 * zero them first: it stays off, and nothing is written where that entry
 * counts. 512 B clusters: a refcount block counts 128 KiB, so the table's
 * entry 8 counts [1 MiB, 1.125 MiB), inside the first range zero-ahead
 * would take (from 64 clusters past the used space to the device's end).
 */
static void test_blkdev_zah_bad_rt(void)
{
	const uint64_t size = 32ull << 20, dev = 48ull << 20, span = 128ull << 10;
	const uint64_t bad_lo = 8 * span, bad_hi = bad_lo + span;
	struct qcow2_opts o = {
	    .writeback_ms = 600000, .no_l2_prefetch = true, .blkdev_zero_ahead = true};
	uint8_t *stale = malloc(span), b[8];
	unsigned hits = 0;
	char name[64];
	struct eng e;
	uint64_t rt;
	int fd, id;
	off_t end;

	CU_ASSERT_FATAL(stale != NULL);
	snprintf(name, sizeof(name), "blk%d.qcow2", g_nimg++);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o cluster_size=512 %s %llu",
				    P(name), (unsigned long long)size),
			      0);
	fd = open(P(name), O_RDWR);
	CU_ASSERT_FATAL(fd >= 0);
	end = lseek(fd, 0, SEEK_END);
	CU_ASSERT_FATAL(end > 0 && (uint64_t)end < bad_lo);
	memset(stale, STALE, span);
	for (uint64_t off = (uint64_t)end; off < dev;) {
		uint64_t n = dev - off < span ? dev - off : span;

		CU_ASSERT_FATAL(pwrite(fd, stale, n, (off_t)off) == (ssize_t)n);
		off += n;
	}
	CU_ASSERT_FATAL(pread(fd, b, 8, 48) == 8); /* refcount_table_offset */
	rt = qcow2_be64(b);
	qcow2_put_be64(b, bad_lo | 1);
	CU_ASSERT_FATAL(pwrite(fd, b, 8, (off_t)(rt + 8 * 8)) == 8);
	close(fd);
	id = fake_file_load(P(name));
	CU_ASSERT_FATAL(id >= 0);
	fake_set_blockdev(id, 1ull << 30);
	fake_log_reset();
	eng_open_path(&e, P(name), &o);
	CU_ASSERT(e.q->rt_entries > 8);
	CU_ASSERT(!e.q->zah_on);
	CU_ASSERT(!e.q->zah_busy);
	eng_close(&e);
	for (size_t i = 0; i < fake_log_count(); i++) {
		const struct fake_log *l = fake_log_get(i);

		if (l->type == FAKE_WRITE && l->off < bad_hi && l->off + l->len > bad_lo)
			hits++;
	}
	CU_ASSERT_EQUAL(hits, 0);
	fake_file_drop(id);
	free(stale);
}

/*
 * A new L2 table whose slices cannot all be created (out of memory after
 * the first: qcow2_test_cache_nomem): the write that needed it fails, and
 * the slices made so far (new, dirty, zeroes) must never reach the file
 * over what the cluster holds next. The cluster was given back to the free
 * list at once, so the next data allocation took it and the guest's data
 * went there; the stale slice's write-back then overwrote it (guest
 * 0x50000 read zeroes, not 0x5a). Now the cluster is freed only after a
 * batch wrote those slices (a deferred decrement), and every read and
 * crash image holds the guest's data.
 */
static void test_l2_new_nomem(void)
{
	const uint64_t size = 1ull << 30, cs = 65536, far = 512ull << 20;
	struct qcow2_opts o = {.writeback_ms = 600000, .no_l2_prefetch = true};
	uint8_t buf[4096], got[4096];
	struct eng e;

	eng_create(&e, "cluster_size=65536", size, &o);
	memset(buf, 0x11, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 0, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	/* guest 512 MiB needs the second L2 table: its second slice fails */
	qcow2_test_cache_nomem(2);
	CU_ASSERT_EQUAL(eng_write(&e, far, sizeof(buf), buf), -ENOMEM);
	qcow2_test_cache_nomem(0);
	/* a new data cluster, at once (no batch in between) */
	memset(buf, 0x5a, sizeof(buf));
	CU_ASSERT_EQUAL(eng_write(&e, 5 * cs, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	for (int i = 0; i < 4; i++) {
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		run_idle(&e);
	}
	CU_ASSERT_EQUAL(eng_read(&e, 5 * cs, sizeof(got), got), 0);
	if (memcmp(got, buf, sizeof(got)))
		fprintf(stderr, "l2 new nomem: guest 0x%llx reads 0x%02x, not 0x5a\n",
			(unsigned long long)(5 * cs), got[0]);
	CU_ASSERT(memcmp(got, buf, sizeof(got)) == 0);
	/* and the table can be made now */
	CU_ASSERT_EQUAL(eng_write(&e, far, sizeof(buf), buf), 0);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	CU_ASSERT_EQUAL(eng_read(&e, far, sizeof(got), got), 0);
	CU_ASSERT(memcmp(got, buf, sizeof(got)) == 0);
	CU_ASSERT_EQUAL(eng_read(&e, 5 * cs, sizeof(got), got), 0);
	CU_ASSERT(memcmp(got, buf, sizeof(got)) == 0);
	check_crash_images(&e, 1);
	eng_close(&e);
	CU_ASSERT_EQUAL(eng_qemu_check(&e), 0);
}

/* Random damage to L1/L2/refcount structures: errors are fine, crashes,
 * hangs and sanitizer reports are not. */
static void test_damage(void)
{
	const uint64_t size = 8ull << 20;
	uint8_t *model = calloc(1, size);

	for (int it = 0; it < 25; it++) {
		struct qcow2_header_info hcopy, *h = &hcopy;
		uint64_t fsize, l2, rb;
		const uint8_t *img;
		struct eng e;

		eng_create(&e,
			   it % 3 == 0 ? "cluster_size=16384,extended_l2=on" : "cluster_size=4096",
			   size, NULL);
		workload(&e, model, size, 30, 32 << 10, true);
		CU_ASSERT_EQUAL(eng_flush(&e), 0);
		hcopy = *qcow2_header(e.q);
		img = fake_file_data(e.id, &fsize);
		l2 = qcow2_be64(img + h->l1_table_offset) & QCOW2_L1E_OFFSET_MASK;
		rb = qcow2_be64(img + h->refcount_table_offset) & QCOW2_RTE_OFFSET_MASK;
		eng_close(&e);
		for (int k = 0; k < 12; k++) {
			uint64_t base = k % 3 == 0 ? h->l1_table_offset : k % 3 == 1 ? l2 : rb;
			uint64_t at = base + (rnd() % 512) * 8;
			uint8_t b[8];

			if (!base || at + 8 > fsize)
				continue;
			memcpy(b, img + at, 8);
			b[rnd() % 8] ^= (uint8_t)(1u << (rnd() % 8));
			if (rnd() % 4 == 0)
				qcow2_put_be64(b, ((uint64_t)rnd() << 40) | ((uint64_t)rnd() << 9));
			{
				struct io_file f;

				CU_ASSERT_EQUAL_FATAL(io_file_open(&f, e.path, 0), 0);
				io_file_pwrite_sync(&f, b, 8, at);
			}
		}
		{
			struct qcow2_opts o = {0};
			char err[512];

			CU_ASSERT_EQUAL_FATAL(io_file_open(&e.file, e.path, 0), 0);
			if (qcow2_open(&e.q, g_loop, &e.file, e.path, &o, err, sizeof(err)) < 0)
				continue;
		}
		workload(&e, model, size, 60, 32 << 10, true);
		eng_flush(&e);
		eng_close(&e);
	}
	free(model);
}

/* ---- L2 prefetch after open ---- */

/* A qemu-img image with metadata preallocated (every L2 table allocated). */
static char *pf_image(uint64_t size)
{
	char name[64], *path;

	snprintf(name, sizeof(name), "img%d.qcow2", g_nimg++);
	path = P(name);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o "
				    "cluster_size=4096,preallocation=metadata %s %llu",
				    path, (unsigned long long)size),
			      0);
	return path;
}

static void run_idle(struct eng *e)
{
	for (int i = 0; i < 1000 && (fake_pending() || q2_l2_prefetch_busy(e->q)); i++)
		run();
	CU_ASSERT_EQUAL(fake_pending(), 0);
	CU_ASSERT_FALSE(q2_l2_prefetch_busy(e->q));
}

/* Map [off, off + len) once: the number of extents, or -EAGAIN (waits for the load). */
static int map_once(struct eng *e, uint64_t off, uint64_t len, struct qcow2_extent *x)
{
	struct waitf wf;
	int n;

	wait_init(&wf);
	n = qcow2_map_read(e->q, off, len, x, 1, &wf.w);
	if (n == -EAGAIN)
		wait_woken(&wf);
	return n;
}

/* Map the whole image: true if every slice was cached (no -EAGAIN) and all is DATA. */
static bool map_all_cached(struct eng *e, uint64_t size)
{
	bool ok = true;

	for (uint64_t off = 0; off < size;) {
		struct qcow2_extent x;
		int n = map_once(e, off, size - off, &x);

		if (n == -EAGAIN) {
			ok = false;
			continue;
		}
		CU_ASSERT_EQUAL_FATAL(n, 1);
		CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
		off += x.len;
	}
	return ok;
}

static void test_prefetch_covering(void)
{
	const uint64_t size = 16ull << 20, cs = 4096;
	struct qcow2_opts o = {.read_only = true, .cache_entry_size = 512};
	char *path = pf_image(size);
	uint64_t fsize, l1off, newoff, l1[8];
	const uint8_t *img;
	struct io_file f;
	uint8_t *tabs;
	size_t big = 0;
	struct eng e;

	/* move the 8 L2 tables next to each other at the end of the file */
	CU_ASSERT_EQUAL_FATAL(io_file_open(&f, path, 0), 0);
	img = fake_file_data(fake_file_id(&f), &fsize);
	l1off = qcow2_be64(img + 40);
	CU_ASSERT_EQUAL_FATAL(qcow2_be32(img + 36), 8);
	newoff = (fsize + cs - 1) & ~(cs - 1);
	tabs = malloc(8 * cs);
	for (int i = 0; i < 8; i++) {
		uint64_t t = qcow2_be64(img + l1off + i * 8) & QCOW2_L1E_OFFSET_MASK;

		CU_ASSERT_FATAL(t != 0);
		memcpy(tabs + i * cs, img + t, cs);
		qcow2_put_be64(&l1[i], (newoff + i * cs) | QCOW2_OFLAG_COPIED);
	}
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&f, tabs, 8 * cs, newoff), 0);
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&f, l1, sizeof(l1), l1off), 0);
	io_file_close(&f);
	free(tabs);

	/* read-only open: the prefetch starts, open does not wait for it */
	fake_reads_reset();
	eng_open_path(&e, path, &o);
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 0);
	CU_ASSERT(fake_pending() >= 1);
	run_idle(&e);
	/* one read of all 8 adjacent tables */
	for (size_t i = 0; i < fake_read_count(); i++) {
		const struct fake_read *r = fake_read_get(i);

		if (r->len > 512) {
			big++;
			CU_ASSERT_EQUAL(r->off, newoff);
			CU_ASSERT_EQUAL(r->len, 8 * cs);
		}
	}
	CU_ASSERT_EQUAL(big, 1);
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 8 * cs / 512);
	/* every mapping now comes from the cache: no miss, no read */
	fake_reads_reset();
	CU_ASSERT_TRUE(map_all_cached(&e, size));
	CU_ASSERT_EQUAL(e.q->l2c.misses, 0);
	CU_ASSERT_EQUAL(fake_read_count(), 0);
	{
		char d[512];

		qcow2_describe(e.q, d, sizeof(d));
		CU_ASSERT_PTR_NOT_NULL(strstr(d, "prefetched 64"));
	}
	eng_close(&e);
	fake_file_drop(e.id);
}

static void test_prefetch_dirty_inflight(void)
{
	const uint64_t size = 32ull << 20; /* 16 L2 tables, each its own read */
	struct qcow2_extent x;
	struct waitf wf;
	uint64_t dl = 0, t5 = 8ull << 20; /* the 5th table's first cluster */
	struct eng e;
	int ret;

	eng_open_path(&e, pf_image(size), NULL);
	CU_ASSERT_EQUAL(fake_pending(), 4); /* at most 4 prefetch reads in flight */
	/* discard needs the slice of table 5: its load is queued after reads 1-4 */
	wait_init(&wf);
	ret = qcow2_zero_step(e.q, t5, 4096, false, false, &dl, &wf.w);
	CU_ASSERT_EQUAL_FATAL(ret, -EAGAIN);
	/* reads 1-4 and the load complete; the read of table 5 is issued */
	run();
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 4);
	CU_ASSERT_TRUE(q2_l2_prefetch_busy(e.q));
	CU_ASSERT_EQUAL(fake_pending(), 5); /* reads 5-8 and the wake-up */
	/* dirty the slice while the prefetch read of its table is in flight */
	ret = qcow2_zero_step(e.q, t5, 4096, false, false, &dl, &wf.w);
	CU_ASSERT_EQUAL(ret, QCOW2_Z_DONE);
	run_idle(&e);
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 15); /* all but table 5 */
	/* the discard is still there; the rest of the slice maps as before */
	CU_ASSERT_EQUAL(map_once(&e, t5, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_ZERO);
	CU_ASSERT_EQUAL(map_once(&e, t5 + 4096, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	CU_ASSERT_EQUAL(eng_flush(&e), 0);
	eng_close(&e);
	eng_qemu_check_leaky(&e);
}

static void test_prefetch_stale(void)
{
	const uint64_t size = 32ull << 20;
	struct qcow2_extent x;
	struct waitf wf;
	uint64_t t5 = 8ull << 20, soff;
	struct eng e;

	eng_open_path(&e, pf_image(size), NULL);
	soff = e.q->l1[4] & QCOW2_L1E_OFFSET_MASK;
	wait_init(&wf);
	CU_ASSERT_EQUAL_FATAL(qcow2_map_read(e.q, t5, 4096, &x, 1, &wf.w), -EAGAIN);
	run(); /* reads 1-4 and the load of table 5 end; reads 5-8 are issued */
	CU_ASSERT_PTR_NOT_NULL(q2_cache_peek(&e.q->l2c, soff));
	/* the slice leaves the cache (as after a write-back and an eviction) */
	q2_cache_forget(&e.q->l2c, soff);
	CU_ASSERT_PTR_NULL(q2_cache_peek(&e.q->l2c, soff));
	run_idle(&e);
	/* reads 5-8 were issued before: their (maybe stale) data is dropped */
	CU_ASSERT_PTR_NULL(q2_cache_peek(&e.q->l2c, soff));
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 12);
	CU_ASSERT_EQUAL(map_once(&e, t5, 4096, &x), -EAGAIN);
	CU_ASSERT_EQUAL(map_once(&e, t5, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	eng_close(&e);
	fake_file_drop(e.id);
}

/* No prefetch (cache too small or switched off): nothing read, slices load on demand. */
static void prefetch_none(const struct qcow2_opts *o)
{
	const uint64_t size = 64ull << 20; /* 32 tables = 128 KiB */
	struct qcow2_extent x;
	struct eng e;

	fake_reads_reset();
	eng_open_path(&e, pf_image(size), o);
	CU_ASSERT_EQUAL(fake_pending(), 0);
	run_idle(&e);
	CU_ASSERT_EQUAL(fake_read_count(), 0);
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 0);
	CU_ASSERT_PTR_NULL(e.q->pf);
	CU_ASSERT_EQUAL(map_once(&e, 40ull << 20, 4096, &x), -EAGAIN);
	CU_ASSERT_EQUAL(fake_read_count(), 1);
	CU_ASSERT_EQUAL(map_once(&e, 40ull << 20, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	eng_close(&e);
	fake_file_drop(e.id);
}

static void test_prefetch_small_cache(void)
{
	struct qcow2_opts o = {.l2_cache_size = 64 << 10}; /* 16 slices for 32 tables */

	prefetch_none(&o);
}

static void test_prefetch_off(void)
{
	struct qcow2_opts o = {.no_l2_prefetch = true};

	prefetch_none(&o);
}

static void test_prefetch_read_failure(void)
{
	const uint64_t size = 32ull << 20;
	struct qcow2_extent x;
	struct eng e;

	/* the first prefetch read (table 1) fails */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	eng_open_path(&e, pf_image(size), NULL);
	run_idle(&e);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(e.q->n_l2_prefetched, 15);
	CU_ASSERT_FALSE(qcow2_is_corrupt(e.q));
	/* table 1 loads on demand and maps fine */
	CU_ASSERT_EQUAL(map_once(&e, 4096, 4096, &x), -EAGAIN);
	CU_ASSERT_EQUAL(map_once(&e, 4096, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	/* the others come from the cache */
	CU_ASSERT_EQUAL(map_once(&e, 30ull << 20, 4096, &x), 1);
	CU_ASSERT_EQUAL(x.type, QCOW2_MAP_DATA);
	eng_close(&e);
	fake_file_drop(e.id);
}

/* ---- the slice cache on its own (slab chunks, open-addressed hash) ---- */

/* Structural invariants of a cache: entry positions, hash slots, accounting. */
static void cache_check(struct q2_cache *c)
{
	size_t used = 0, chunks = 0;

	CU_ASSERT_FATAL(c->count <= c->cap);
	for (size_t i = 0; i < c->count; i++) {
		CU_ASSERT_EQUAL_FATAL(c->all[i]->idx, i);
		CU_ASSERT_PTR_EQUAL_FATAL(c->all[i]->cache, c);
	}
	for (size_t h = 0; h <= c->hmask; h++) {
		if (!c->hash[h].s)
			continue;
		used++;
		CU_ASSERT_EQUAL_FATAL(c->hash[h].off, c->hash[h].s->off);
		CU_ASSERT_FATAL(c->hash[h].s->state != 0);
	}
	CU_ASSERT_EQUAL(used, c->hused);
	CU_ASSERT(c->hused <= c->count);
	CU_ASSERT(c->hused * 2 <= c->hmask + 1);
	for (size_t i = 0; i < c->nchunks; i++)
		chunks += c->chunks[i] != NULL;
	CU_ASSERT(c->count == 0 || chunks > 0);
	CU_ASSERT(c->mem_bytes > 0 || chunks == 0);
}

static size_t cache_chunks(const struct q2_cache *c)
{
	size_t n = 0;

	for (size_t i = 0; i < c->nchunks; i++)
		n += c->chunks[i] != NULL;
	return n;
}

static void fill_pattern(uint8_t *b, size_t len, uint64_t key)
{
	for (size_t i = 0; i < len; i += 8)
		qcow2_put_be64(b + i, key * 0x100000001b3ull + i);
}

static bool has_pattern(const uint8_t *b, size_t len, uint64_t key)
{
	for (size_t i = 0; i < len; i += 8)
		if (qcow2_be64(b + i) != key * 0x100000001b3ull + i)
			return false;
	return true;
}

/*
 * A refcount-type cache of 2000 x 4 KiB slices (several chunks, some of a
 * full 2 MiB): fill, evict, grow past the limit when all is busy, trim,
 * reuse freed entries, exit (ASan checks leaks and stray accesses).
 */
static void test_cache_slab(void)
{
	const size_t max = 2000, ss = 4096;
	const uint64_t base = 1ull << 30;
	uint8_t *data = malloc(ss);
	struct q2_slice *s;
	struct q2_cache c;
	struct eng e;
	size_t mem, chunks;

	CU_ASSERT_PTR_NOT_NULL_FATAL(data);
	eng_create(&e, "cluster_size=65536", 64ull << 20, NULL);
	CU_ASSERT_EQUAL_FATAL(q2_cache_init(&c, &e.q->rcc.hooks, Q2_CACHE_RC, ss, max), 0);
	CU_ASSERT_EQUAL(c.mem_bytes, 0); /* nothing up front */
	for (size_t i = 0; i < max; i++) {
		fill_pattern(data, ss, i);
		CU_ASSERT_EQUAL_FATAL(q2_cache_insert(&c, base + i * ss, data), 1);
		if (i == 0)
			CU_ASSERT(c.mem_bytes <= 16 * (ss + 64) + 4096); /* a small first chunk */
	}
	CU_ASSERT_EQUAL(q2_cache_insert(&c, base, data), 0);
	CU_ASSERT_EQUAL(q2_cache_insert(&c, base + max * ss, data), -ENOSPC);
	CU_ASSERT_EQUAL(c.count, max);
	CU_ASSERT_EQUAL(c.nspare, 0); /* chunks capped by the soft limit */
	chunks = cache_chunks(&c);
	CU_ASSERT(chunks >= 7);
	CU_ASSERT(c.mem_bytes <= max * (ss + 64) + chunks * 4096);
	cache_check(&c);
	for (size_t i = 0; i < max; i++) {
		s = q2_cache_peek(&c, base + i * ss);
		CU_ASSERT_PTR_NOT_NULL_FATAL(s);
		CU_ASSERT_EQUAL(s->off, base + i * ss);
		CU_ASSERT(((uintptr_t)s->buf & 511) == 0);
		CU_ASSERT(((uintptr_t)s & 63) == 0);
		CU_ASSERT_FATAL(has_pattern(s->buf, ss, i));
	}
	CU_ASSERT_PTR_NULL(q2_cache_peek(&c, base + max * ss));

	/* at the limit: a new slice evicts a clean one (CLOCK) */
	s = q2_cache_new(&c, base + max * ss);
	CU_ASSERT_PTR_NOT_NULL_FATAL(s);
	CU_ASSERT_EQUAL(c.evictions, 1);
	CU_ASSERT_EQUAL(c.count, max);
	CU_ASSERT(s->dirty && s->in_dlist);
	CU_ASSERT_EQUAL(c.ndirty, 1);
	for (size_t i = 0; i < ss; i++)
		CU_ASSERT_FATAL(((uint8_t *)s->buf)[i] == 0);
	{
		size_t gone = 0;

		for (size_t i = 0; i < max; i++)
			gone += q2_cache_peek(&c, base + i * ss) == NULL;
		CU_ASSERT_EQUAL(gone, 1);
	}

	/* everything pinned: new slices grow the cache past its limit */
	for (size_t i = 0; i < c.count; i++)
		c.all[i]->pins++;
	for (size_t i = 1; i <= 100; i++) {
		s = q2_cache_new(&c, base + (max + i) * ss);
		CU_ASSERT_PTR_NOT_NULL_FATAL(s);
		fill_pattern(s->buf, ss, max + i);
	}
	CU_ASSERT_EQUAL(c.evictions, 1);
	CU_ASSERT_EQUAL(c.count, max + 100);
	CU_ASSERT_EQUAL(q2_cache_over(&c), 100);
	cache_check(&c);
	mem = c.mem_bytes;
	CU_ASSERT(mem <= (max + 100 + 16) * (ss + 64) + cache_chunks(&c) * 4096);

	/* trim while all is busy frees nothing */
	q2_cache_trim(&c);
	CU_ASSERT_EQUAL(c.count, max + 100);
	/* clean and unpinned: trim goes back to the limit and unmaps whole chunks */
	for (size_t i = 0; i < c.count; i++) {
		if (c.all[i]->pins)
			c.all[i]->pins--;
		c.all[i]->dirty = false;
		c.all[i]->in_dlist = false;
		c.all[i]->dnext = NULL;
	}
	c.dirty = NULL;
	c.ndirty = 0;
	q2_cache_trim(&c);
	CU_ASSERT_EQUAL(c.count, max);
	CU_ASSERT_EQUAL(q2_cache_over(&c), 0);
	CU_ASSERT(c.mem_bytes < mem);
	CU_ASSERT(c.nspare < 100);
	cache_check(&c);
	{
		size_t found = 0;

		for (size_t i = 0; i <= max + 100; i++) {
			s = q2_cache_peek(&c, base + i * ss);
			if (!s)
				continue;
			found++;
			if (i != max)
				CU_ASSERT_FATAL(has_pattern(s->buf, ss, i));
		}
		CU_ASSERT_EQUAL(found, max);
	}

	/* forgotten entries are reused (free list) without growing */
	mem = c.mem_bytes;
	for (size_t i = 0, n = 0; n < 10 && i <= max + 100; i++) {
		if (q2_cache_peek(&c, base + i * ss)) {
			q2_cache_forget(&c, base + i * ss);
			CU_ASSERT_PTR_NULL(q2_cache_peek(&c, base + i * ss));
			n++;
		}
	}
	CU_ASSERT_EQUAL(c.count, max);
	for (size_t i = 0; i < 10; i++) {
		fill_pattern(data, ss, 5000 + i);
		CU_ASSERT_EQUAL(q2_cache_insert(&c, base + (5000 + i) * ss, data), 1);
	}
	CU_ASSERT_EQUAL(q2_cache_insert(&c, base + 6000 * ss, data), -ENOSPC);
	CU_ASSERT_EQUAL(c.mem_bytes, mem);
	for (size_t i = 0; i < 10; i++) {
		s = q2_cache_peek(&c, base + (5000 + i) * ss);
		CU_ASSERT_PTR_NOT_NULL_FATAL(s);
		CU_ASSERT(has_pattern(s->buf, ss, 5000 + i));
	}
	cache_check(&c);
	q2_cache_exit(&c);
	CU_ASSERT_PTR_NULL(c.hash);
	CU_ASSERT_EQUAL(c.mem_bytes, 0);
	free(data);
	eng_close(&e);
	fake_file_drop(e.id);
}

/*
 * Offsets whose home slots form one long run across the end of the table:
 * every lookup stays right while they are removed one by one in a random
 * order (backward-shift deletion) and added again.
 */
static void test_cache_collisions(void)
{
	enum { N = 200 };
	const size_t ss = 512;
	const unsigned bits = 9; /* 512 slots for 200 entries */
	uint64_t off[N];
	bool in[N];
	uint8_t data[512];
	struct q2_cache c;
	struct eng e;
	size_t n = 0;

	eng_create(&e, "cluster_size=65536", 64ull << 20, NULL);
	for (uint64_t k = 1; n < N; k++) {
		uint64_t h = (k * 0x9e3779b97f4a7c15ull) >> (64 - bits);

		if (h >= (1u << bits) - 4 || h < 4)
			off[n++] = k * ss;
	}
	CU_ASSERT_EQUAL_FATAL(q2_cache_init(&c, &e.q->rcc.hooks, Q2_CACHE_RC, ss, 1000), 0);
	for (size_t i = 0; i < N; i++) {
		fill_pattern(data, ss, off[i]);
		CU_ASSERT_EQUAL_FATAL(q2_cache_insert(&c, off[i], data), 1);
		in[i] = true;
	}
	CU_ASSERT_EQUAL_FATAL(c.hbits, bits);
	cache_check(&c);
	for (int round = 0; round < 3; round++) {
		for (size_t r = 0; r < N; r++) {
			size_t i = rnd() % N;

			if (in[i]) {
				q2_cache_forget(&c, off[i]);
			} else {
				fill_pattern(data, ss, off[i]);
				CU_ASSERT_EQUAL(q2_cache_insert(&c, off[i], data), 1);
			}
			in[i] = !in[i];
			for (size_t j = 0; j < N; j++) {
				struct q2_slice *s = q2_cache_peek(&c, off[j]);

				CU_ASSERT_FATAL((s != NULL) == in[j]);
				if (s)
					CU_ASSERT_FATAL(s->off == off[j] &&
							has_pattern(s->buf, ss, off[j]));
			}
		}
		cache_check(&c);
	}
	CU_ASSERT_EQUAL(c.hbits, bits);
	q2_cache_exit(&c);
	eng_close(&e);
	fake_file_drop(e.id);
}

/* Loads: waiters parked on a LOADING slice, hits/misses, a failed load retried. */
static void test_cache_loads(void)
{
	const size_t ss = 4096;
	struct waitf w1, w2, w3;
	struct q2_slice *s = NULL;
	const uint8_t *img;
	uint64_t isize;
	struct q2_cache c;
	struct eng e;

	eng_create(&e, "cluster_size=65536", 64ull << 20, NULL);
	img = fake_file_data(e.id, &isize);
	CU_ASSERT_FATAL(isize >= 3 * 65536);
	CU_ASSERT_EQUAL_FATAL(q2_cache_init(&c, &e.q->rcc.hooks, Q2_CACHE_RC, ss, 16), 0);
	wait_init(&w1);
	wait_init(&w2);
	wait_init(&w3);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 0, &s, &w1.w), -EAGAIN);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 0, &s, &w2.w), -EAGAIN);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 65536, &s, &w3.w), -EAGAIN);
	CU_ASSERT_EQUAL(c.misses, 2);
	CU_ASSERT_PTR_NULL(q2_cache_peek(&c, 0)); /* LOADING */
	wait_woken(&w1);
	wait_woken(&w2);
	wait_woken(&w3);
	CU_ASSERT(w1.err == 0 && w2.err == 0 && w3.err == 0);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 0, &s, &w1.w), 0);
	CU_ASSERT_PTR_NOT_NULL_FATAL(s);
	CU_ASSERT(memcmp(s->buf, img, ss) == 0);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 65536, &s, &w1.w), 0);
	CU_ASSERT(memcmp(s->buf, img + 65536, ss) == 0);
	CU_ASSERT_EQUAL(c.hits, 2);
	CU_ASSERT_EQUAL(c.misses, 2);
	/* a failed load wakes its waiter with the error and leaves nothing behind */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 131072, &s, &w1.w), -EAGAIN);
	wait_woken(&w1);
	CU_ASSERT_EQUAL(w1.err, -EIO);
	CU_ASSERT_PTR_NULL(q2_cache_peek(&c, 131072));
	cache_check(&c);
	CU_ASSERT_EQUAL(q2_cache_get(&c, 131072, &s, &w1.w), -EAGAIN);
	wait_woken(&w1);
	CU_ASSERT_EQUAL(w1.err, 0);
	s = q2_cache_peek(&c, 131072);
	CU_ASSERT_PTR_NOT_NULL_FATAL(s);
	CU_ASSERT(memcmp(s->buf, img + 131072, ss) == 0);
	CU_ASSERT_EQUAL(c.count, 3); /* the failed load's entry was reused */
	cache_check(&c);
	q2_cache_exit(&c);
	eng_close(&e);
	fake_file_drop(e.id);
}

/* ---- persistent dirty bitmaps (bitmap.c) ---- */

struct bmchk {
	uint64_t dir_off, dir_size;
	uint32_t nb;
	bool valid; /* extension present and autoclear bit 0 set */
};

static bool bm_find(const struct chk *c, struct bmchk *o)
{
	memset(o, 0, sizeof(*o));
	if (!c->h.has_bitmaps)
		return false;
	o->dir_off = c->h.bitmap_directory_offset;
	o->dir_size = c->h.bitmap_directory_size;
	o->nb = c->h.nb_bitmaps;
	o->valid = (c->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) != 0;
	return true;
}

/*
 * Bitmap structures of a crash image: while the extension counts (autoclear
 * bit 0), the directory, every table and data cluster has a refcount; the
 * bitmap "on" is in use or holds every bit of @want (bits of granularity
 * @gbits, @nwant of them); the bitmap "off" is never in use and keeps
 * @off_table. 0 or -1 with a message.
 */
static int check_bitmaps(const uint8_t *b, uint64_t size, const uint8_t *want, uint64_t nwant,
			 uint64_t off_table, char *why, size_t wlen)
{
	struct chk c = {.b = b, .size = size};
	struct bmchk bm;
	char msg[200];
	uint64_t cs, pos = 0;
	int bad = 0;

	if (qcow2_header_parse(b, size < (2u << 20) ? size : (2u << 20), size, &c.h, msg,
			       sizeof(msg)) < 0) {
		snprintf(why, wlen, "header: %s", msg);
		return -1;
	}
	if (!bm_find(&c, &bm) || !bm.valid)
		return 0; /* ignored by every reader: nothing to check */
	cs = c.h.cluster_size;
	c.rt = calloc(c.h.refcount_table_entries, 8);
	for (uint64_t i = 0; i < c.h.refcount_table_entries; i++)
		c.rt[i] = rd64(&c, c.h.refcount_table_offset + i * 8);
	if (refcount(&c, bm.dir_off) == 0) {
		snprintf(why, wlen, "bitmap directory 0x%llx has refcount 0",
			 (unsigned long long)bm.dir_off);
		bad = 1;
	}
	for (uint32_t n = 0; n < bm.nb && !bad; n++) {
		const uint8_t *e = b + bm.dir_off + pos;
		uint64_t toff = qcow2_be64(e);
		uint32_t tsize = qcow2_be32(e + 8), flags = qcow2_be32(e + 12);
		uint32_t nsize = qcow2_be16(e + 18), extra = qcow2_be32(e + 20);
		bool on = nsize == 2 && !memcmp(e + 24 + extra, "on", 2);
		bool off = nsize == 3 && !memcmp(e + 24 + extra, "off", 3);

		pos += (24 + extra + nsize + 7) & ~7u;
		if (refcount(&c, toff) == 0) {
			snprintf(why, wlen, "bitmap %u table 0x%llx has refcount 0", n,
				 (unsigned long long)toff);
			bad = 1;
			break;
		}
		if (off && ((flags & 1) || toff != off_table)) {
			snprintf(why, wlen, "disabled bitmap touched (flags 0x%x, table 0x%llx)",
				 flags, (unsigned long long)toff);
			bad = 1;
			break;
		}
		for (uint32_t k = 0; k < tsize && !bad; k++) {
			uint64_t te = rd64(&c, toff + k * 8ull), d = te & 0x00fffffffffffe00ull;

			if (d && refcount(&c, d) == 0) {
				snprintf(why, wlen, "bitmap %u data cluster 0x%llx has refcount 0",
					 n, (unsigned long long)d);
				bad = 1;
			}
			if (!on || (flags & 1) || !want)
				continue;
			for (uint64_t bit = k * cs * 8; bit < (k + 1) * cs * 8 && bit < nwant;
			     bit++) {
				bool set =
				    d ? (b[d + (bit - k * cs * 8) / 8] >> (bit % 8)) & 1 : (te & 1);

				if (((want[bit / 8] >> (bit % 8)) & 1) && !set) {
					snprintf(why, wlen,
						 "bitmap 'on' is not in use but bit %llu is clear",
						 (unsigned long long)bit);
					bad = 1;
					break;
				}
			}
		}
	}
	free(c.rt);
	return bad ? -1 : 0;
}

/* Table offset of the bitmap named @name in the image at @path (0 if none). */
static uint64_t bm_table_of(int id, const char *name)
{
	uint64_t size, pos = 0;
	const uint8_t *b = fake_file_data(id, &size);
	struct chk c = {.b = b, .size = size};
	struct bmchk bm;
	char msg[200];

	if (qcow2_header_parse(b, size < (2u << 20) ? size : (2u << 20), size, &c.h, msg,
			       sizeof(msg)) < 0 ||
	    !bm_find(&c, &bm))
		return 0;
	for (uint32_t n = 0; n < bm.nb; n++) {
		const uint8_t *e = b + bm.dir_off + pos;
		uint32_t nsize = qcow2_be16(e + 18), extra = qcow2_be32(e + 20);

		if (nsize == strlen(name) && !memcmp(e + 24 + extra, name, nsize))
			return qcow2_be64(e);
		pos += (24 + extra + nsize + 7) & ~7u;
	}
	return 0;
}

/*
 * Open (bitmaps marked in use), record writes, close (bitmaps stored):
 * every crash image of the whole record keeps the bitmap structures
 * reachable only through clusters with a refcount, the enabled bitmap in
 * use or complete, the disabled one untouched; the final image is clean
 * for qemu-img with the bitmaps consistent. With @fail_sync, the first
 * fdatasync of the close fails: the bitmaps stay in use, nothing breaks.
 */
static void bitmap_case(bool fail_sync)
{
	const uint64_t size = 64ull << 20;
	const unsigned gbits = 12;
	uint64_t nbits = size >> gbits, off_table, n_open;
	uint8_t *want = calloc(1, nbits / 8);
	char name[64], why[256];
	struct eng e;
	int ret;

	snprintf(name, sizeof(name), "img%d.qcow2", g_nimg++);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o cluster_size=4096 %s %llu && "
				    "qemu-io -c 'write 0 64k' %s >/dev/null && "
				    "qemu-img bitmap --add -g 4096 %s on && "
				    "qemu-img bitmap --add %s off && qemu-io -c 'write 1M 4k' %s "
				    ">/dev/null && qemu-img bitmap --disable %s off",
				    P(name), (unsigned long long)size, P(name), P(name), P(name),
				    P(name), P(name)),
			      0);
	fake_log_reset();
	eng_open_path(&e, P(name), NULL);
	off_table = bm_table_of(e.id, "off");
	CU_ASSERT_FATAL(off_table != 0);
	n_open = fake_log_count();
	CU_ASSERT(n_open >= 3); /* autoclear off, directory, autoclear on (and syncs) */
	for (int i = 0; i < 40; i++) {
		uint64_t off = (rnd() % (size / 512)) * 512, len = (rnd() % 64 + 1) * 512;

		if (off + len > size)
			len = size - off;
		qcow2_bitmap_mark(e.q, off, len);
		for (uint64_t bit = off >> gbits; bit <= (off + len - 1) >> gbits; bit++)
			want[bit / 8] |= (uint8_t)(1u << (bit % 8));
	}
	if (fail_sync)
		CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FDATASYNC, 1, -EIO), 0);
	ret = qcow2_close(e.q);
	e.q = NULL;
	io_loop_inject_clear(g_loop);
	CU_ASSERT(fail_sync ? ret < 0 : ret == 0);
	io_file_close(&e.file);
	/* every crash point: before the close, "on" must be in use */
	for (size_t i = 0; i <= fake_log_count(); i++) {
		for (unsigned sd = 0; sd <= 2; sd++) {
			uint8_t *img;
			uint64_t len;

			if (sd &&
			    fake_log_get(i < fake_log_count() ? i : i - 1)->type == FAKE_FSYNC)
				continue;
			CU_ASSERT_EQUAL_FATAL(
			    fake_crash_image(e.id, i, sd ? rnd() | 1 : 0, &img, &len), 0);
			if (check_image(img, len, why, sizeof(why)) < 0 ||
			    check_bitmaps(img, len, i >= n_open ? want : NULL, nbits, off_table,
					  why, sizeof(why)) < 0) {
				fprintf(stderr,
					"bitmaps: crash image after record entry %zu/%zu: %s\n", i,
					fake_log_count(), why);
				CU_FAIL("inconsistent crash image (bitmaps)");
				free(img);
				goto out;
			}
			free(img);
		}
	}
	CU_ASSERT_EQUAL(fake_file_save(e.id, e.path), 0);
	ret = tu_sh("qemu-img check -q %s", e.path);
	CU_ASSERT(ret == 0 || (fail_sync && ret == 3));
	ret = tu_sh("qemu-img info --output=json %s | grep -q '\"in-use\"'", e.path);
	CU_ASSERT_EQUAL(ret, fail_sync ? 0 : 1); /* grep: 0 found, 1 not found */
out:
	fake_file_drop(e.id);
	free(want);
}

static void test_bitmaps_store(void)
{
	bitmap_case(false);
}

static void test_bitmaps_store_sync_failure(void)
{
	bitmap_case(true);
}

int main(void)
{
	CU_pSuite suite;
	unsigned fails;

	if (tu_sh("qemu-img --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "qemu-img not found: skipping\n");
		return 77;
	}
	if (tu_mkdtemp(g_dir, sizeof(g_dir), "q2eng") < 0)
		return 1;
	io_loop_init(&g_loop, 64);
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	suite = CU_add_suite("qcow2_engine", NULL, NULL);
	CU_add_test(suite, "durability order, 64k clusters", test_order_64k);
	CU_add_test(suite, "durability order, 512 B clusters, shuffled", test_order_small_shuffled);
	CU_add_test(suite, "durability order, extended L2", test_order_extl2);
	CU_add_test(suite, "durability order, gaps bridged", test_order_bridged);
	CU_add_test(suite, "early link: extended L2 subclusters", test_early_link);
	CU_add_test(suite, "extended L2: a cluster written whole is allocated whole",
		    test_whole_sc);
	CU_add_test(suite, "write-back: gaps bridged with clean slices", test_bridge_shapes);
	CU_add_test(suite, "write-back: only the dirty span of a slice", test_dirty_spans);
	CU_add_test(suite, "write-back: gaps bridged across adjacent tables", test_bridge_xtab);
	CU_add_test(suite, "online grow: new L1 table, crash images", test_grow_l1);
	CU_add_test(suite, "online grow: header only", test_grow_header_only);
	CU_add_test(suite, "linked writes: fdatasyncs waited for in a row", test_link_chain);
	CU_add_test(suite, "the next batch beside the last fdatasync: every crash point",
		    test_tail);
	CU_add_test(suite, "no batch beside the last fdatasync after page-cache writes",
		    test_tail_pc_written);
	CU_add_test(suite, "the L1 table is written in whole sectors", test_l1_sectors);
	CU_add_test(suite, "close gives back the unused tail", test_close_tail);
	CU_add_test(suite, "injected write failures", test_write_failures);
	CU_add_test(suite, "injected fdatasync failures", test_sync_failures);
	CU_add_test(suite, "write-back out of memory", test_wb_nomem);
	CU_add_test(suite, "write-back out of memory: a removal left out keeps its decrement",
		    test_wb_nomem_decs);
	CU_add_test(suite, "side batch out of memory", test_side_nomem);
	CU_add_test(suite, "failing close, side batch in flight", test_side_close);
	CU_add_test(suite, "failed batch, written slice evicted", test_wb_fail_evicted);
	CU_add_test(suite, "metadata read failure", test_read_failure);
	CU_add_test(suite, "full file system: metadata backing", test_prealloc_enospc);
	CU_add_test(suite, "slice cache eviction", test_cache_eviction);
	CU_add_test(suite, "covering cache: no early write-back", test_dirty_covering);
	CU_add_test(suite, "bounded cache: early write-back", test_dirty_bounded);
	CU_add_test(suite, "concurrent allocation of one cluster", test_concurrent_alloc);
	CU_add_test(suite, "freed cluster not reused during I/O", test_grace);
	CU_add_test(suite, "corruption detection", test_corrupt);
	CU_add_test(suite, "corruption: a compressed entry into metadata is never freed",
		    test_corrupt_compressed);
	CU_add_test(suite, "read-only", test_readonly);
	CU_add_test(suite, "discard, zero, reuse", test_discard_reuse_and_zero);
	CU_add_test(suite, "extended L2: discarded subclusters never read old data",
		    test_stale_subclusters);
	CU_add_test(suite, "extended L2: a reused cluster is not linked whole before its fill",
		    test_whole_reused);
	CU_add_test(suite, "a zeroed cluster written in place: its fill synced before its entry",
		    test_zero_alloc);
	CU_add_test(suite, "a block device: zero-ahead counts zeroed space as fresh",
		    test_blkdev_zero_ahead);
	CU_add_test(suite,
		    "a block device: zero-ahead leaves clusters of an invalid refcount table "
		    "entry alone",
		    test_blkdev_zah_bad_rt);
	CU_add_test(suite,
		    "a block device: zero-ahead on a corrupt image, at close, reopened, "
		    "judged",
		    test_blkdev_zah_edges);
	CU_add_test(suite, "a new L2 table short of memory: its cluster freed after its slices",
		    test_l2_new_nomem);
	CU_add_test(suite, "early link of new clusters: no link wait after the data",
		    test_early_new_waits);
	CU_add_test(suite,
		    "early link of new clusters: a write into the cluster waits for the fill",
		    test_early_new_hazard);
	CU_add_test(suite, "early link of new clusters: not past the end of the file",
		    test_early_new_past_eof);
	CU_add_test(suite, "early link of new clusters: workload, crash images",
		    test_early_new_workload);
	CU_add_test(suite, "damaged tables", test_damage);
	CU_add_test(suite, "L2 prefetch: covering cache, read-only", test_prefetch_covering);
	CU_add_test(suite, "L2 prefetch: slice dirtied during its read",
		    test_prefetch_dirty_inflight);
	CU_add_test(suite, "L2 prefetch: stale read dropped", test_prefetch_stale);
	CU_add_test(suite, "L2 prefetch: cache too small", test_prefetch_small_cache);
	CU_add_test(suite, "L2 prefetch: switched off", test_prefetch_off);
	CU_add_test(suite, "L2 prefetch: read failure", test_prefetch_read_failure);
	CU_add_test(suite, "slice cache: slab chunks, limit, trim, reuse", test_cache_slab);
	CU_add_test(suite, "slice cache: colliding offsets", test_cache_collisions);
	CU_add_test(suite, "slice cache: loads and waiters", test_cache_loads);
	CU_add_test(suite, "dirty bitmaps: stored at close, every crash point", test_bitmaps_store);
	CU_add_test(suite, "dirty bitmaps: fdatasync failure at close",
		    test_bitmaps_store_sync_failure);
	fails = tu_cunit_run();
	io_loop_exit(g_loop);
	if (!fails)
		tu_sh("rm -rf %s", g_dir);
	return fails ? 1 : 0;
}
