/* SPDX-License-Identifier: MIT */
/*
 * qcow2 through the image interface (img/img_qcow2.c over the qcow2/
 * engine and a real io/ loop), with qemu-img as the oracle:
 *
 *   qemu-img create (cluster sizes 512 B..2 MiB, refcount widths, version 2,
 *   extended L2, backing files, compressed images, snapshots, external data
 *   files) -> random writes / reads / discards / write-zeroes / flushes
 *   through img_*(), every read checked against an in-memory model ->
 *   close -> `qemu-img check` must be clean and `qemu-img compare` against
 *   a raw file holding the model must match.
 *
 * Without qemu-img the whole suite is skipped (exit 77).
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

#include "img.h"
#include "img_tio.h"
#include "io.h"
#include "io_inject.h"
#include "testutil.h"

#define MAX_ITER 10000000

static char g_dir[700];
static struct io_loop *g_loop;
static unsigned g_seed = 12345;

static unsigned rnd(void)
{
	return tu_lcg(&g_seed);
}

static void run_until_all(struct tio *t, int n)
{
	for (int it = 0; it < MAX_ITER; it++) {
		int done = 0;

		for (int i = 0; i < n; i++)
			done += t[i].calls;
		if (done >= n)
			break;
		CU_ASSERT_FATAL(io_loop_run_once(g_loop, true) >= 0);
	}
	for (int i = 0; i < n; i++)
		CU_ASSERT_EQUAL(t[i].calls, 1);
}

static void pick_dir(void)
{
	int ret = tu_mkdtemp(g_dir, sizeof(g_dir), "q2img");

	if (ret < 0) {
		errno = -ret;
		perror("mkdtemp");
		exit(1);
	}
}

static char *P(const char *name)
{
	return tu_path(g_dir, name);
}

/* ---- a workload against a model ---- */

struct wl {
	const char *name;
	const char *create; /* qemu-img create -o options */
	uint64_t size;
	bool backing;                 /* image gets a qcow2 backing file with data */
	bool backing_raw;             /* a raw backing file, half the size of the image */
	bool v2_backing_discard_noop; /* v2 + backing: discards are no-ops */
	bool compressed;              /* start from a compressed image */
	bool snapshot;                /* take an internal snapshot midway (qemu-img) */
	bool datafile;                /* external data file */
	int ops;
	unsigned max_io; /* bytes */
	bool zeroes;     /* use write zeroes / discard */
};

static uint8_t *g_model;

static void fill(uint8_t *b, size_t n)
{
	unsigned v = rnd();

	for (size_t i = 0; i < n; i++) {
		if ((i & 511) == 0)
			v = rnd();
		b[i] = (uint8_t)(v >> ((i & 3) * 8));
	}
}

static struct img *open_img(const char *path, bool ro)
{
	struct img_opts o = {.direct = true, .read_only = ro};
	struct img *img = NULL;
	char err[512];
	int ret = img_open(&img, g_loop, path, &o, err, sizeof(err));

	if (ret < 0)
		fprintf(stderr, "open %s: %s\n", path, err);
	CU_ASSERT_EQUAL_FATAL(ret, 0);
	return img;
}

static int do_io(struct img *img, int op, uint8_t *buf, uint64_t off, uint64_t len, unsigned flags)
{
	struct tio t;
	struct iovec iov[3];
	unsigned n = 0;

	tio_init(&t);
	if (buf) {
		/* split the buffer into up to 3 iovecs on 512-byte boundaries */
		uint64_t a = len > 1024 ? (rnd() % (len / 512)) * 512 : len, rest = len - a;
		uint64_t b2 = rest > 512 ? (rnd() % (rest / 512)) * 512 : rest;

		iov[n++] = (struct iovec){buf, a};
		if (b2)
			iov[n++] = (struct iovec){buf + a, b2};
		if (rest - b2)
			iov[n++] = (struct iovec){buf + a + b2, rest - b2};
		if (a == 0) {
			iov[0] = (struct iovec){buf, len};
			n = 1;
		}
	}
	g_in_submit = true;
	switch (op) {
	case IMG_OP_READ:
		img_readv(img, &t.io, iov, n, off, len);
		break;
	case IMG_OP_WRITE:
		img_writev(img, &t.io, iov, n, off, len);
		break;
	case IMG_OP_FLUSH:
		img_flush(img, &t.io);
		break;
	case IMG_OP_DISCARD:
		img_discard(img, &t.io, off, len);
		break;
	case IMG_OP_WRITE_ZEROES:
		img_write_zeroes(img, &t.io, off, len, flags);
		break;
	}
	g_in_submit = false;
	run_until_all(&t, 1);
	return t.res;
}

static void apply_discard(const struct wl *w, uint64_t cs, uint64_t off, uint64_t len)
{
	uint64_t s = (off + cs - 1) / cs * cs, e = (off + len) / cs * cs;

	if (w->v2_backing_discard_noop)
		return;
	if (e > s)
		memset(g_model + s, 0, e - s);
}

/* Requests in flight at once on disjoint ranges, checked against g_model. */
enum { B_WRITE, B_READ, B_ZERO };
#define BATCH_MAX 48

struct batch {
	int n;
	struct tio t[BATCH_MAX];
	uint8_t *bufs[BATCH_MAX];
	struct iovec iov[BATCH_MAX];
	uint64_t offs[BATCH_MAX], lens[BATCH_MAX];
	int kind[BATCH_MAX];
};

/* Does [off, off + len) overlap a request of @b? */
static bool batch_clash(const struct batch *b, uint64_t off, uint64_t len)
{
	for (int j = 0; j < b->n; j++)
		if (off < b->offs[j] + b->lens[j] && b->offs[j] < off + len)
			return true;
	return false;
}

/* Add a request of @kind on [off, off + len) to @b (a write's data filled in). */
static void batch_add(struct batch *b, uint64_t off, uint64_t len, int kind)
{
	int n = b->n++;

	b->offs[n] = off;
	b->lens[n] = len;
	b->kind[n] = kind;
	b->bufs[n] = io_alloc_aligned(len);
	if (kind == B_WRITE)
		fill(b->bufs[n], len);
	tio_init(&b->t[n]);
	b->iov[n] = (struct iovec){b->bufs[n], len};
}

/*
 * Submit every request of @b at once (write zeroes with or without UNMAP, at
 * random) and run them all to completion: each must succeed; writes and
 * write zeroes go into g_model, reads must match it.
 */
static void batch_run(struct img *img, struct batch *b, const char *name, const char *what)
{
	g_in_submit = true;
	for (int i = 0; i < b->n; i++) {
		if (b->kind[i] == B_WRITE)
			img_writev(img, &b->t[i].io, &b->iov[i], 1, b->offs[i], b->lens[i]);
		else if (b->kind[i] == B_READ)
			img_readv(img, &b->t[i].io, &b->iov[i], 1, b->offs[i], b->lens[i]);
		else
			img_write_zeroes(img, &b->t[i].io, b->offs[i], b->lens[i],
					 rnd() % 2 ? IMG_IO_UNMAP : 0);
	}
	g_in_submit = false;
	run_until_all(b->t, b->n);
	for (int i = 0; i < b->n; i++) {
		CU_ASSERT_EQUAL(b->t[i].res, 0);
		if (b->kind[i] == B_WRITE)
			memcpy(g_model + b->offs[i], b->bufs[i], b->lens[i]);
		else if (b->kind[i] == B_ZERO)
			memset(g_model + b->offs[i], 0, b->lens[i]);
		else if (memcmp(b->bufs[i], g_model + b->offs[i], b->lens[i]) != 0) {
			fprintf(stderr, "%s: %s read mismatch at %llu+%llu\n", name, what,
				(unsigned long long)b->offs[i], (unsigned long long)b->lens[i]);
			CU_FAIL("read mismatch");
		}
		io_free_aligned(b->bufs[i]);
	}
}

/* Several requests in flight at once (overlap-free writes and reads). */
static void batch_ops(struct img *img, const struct wl *w, uint64_t cs)
{
	struct batch b = {0};

	for (int i = 0; i < 8; i++) {
		uint64_t len = ((rnd() % (w->max_io / 512)) + 1) * 512;
		uint64_t off = (rnd() % ((w->size - len) / 512 + 1)) * 512;

		if (batch_clash(&b, off, len))
			continue;
		batch_add(&b, off, len, rnd() % 3 != 0 ? B_WRITE : B_READ);
	}
	batch_run(img, &b, w->name, "concurrent");
	(void)cs;
}

static void workload(struct img *img, const struct wl *w, uint64_t cs, int ops)
{
	uint8_t *buf = io_alloc_aligned(w->max_io);

	for (int i = 0; i < ops; i++) {
		unsigned kind = rnd() % 100;
		bool trace = getenv("VQCOW_TEST_TRACE") != NULL;
		uint64_t len = ((rnd() % (w->max_io / 512)) + 1) * 512;
		uint64_t off;
		int ret;

		if (rnd() % 4 == 0 && len > cs)
			len = len / cs * cs; /* cluster multiples */
		off = (rnd() % ((w->size - len) / 512 + 1)) * 512;
		if (rnd() % 3 == 0)
			off = off / cs * cs;
		if (off + len > w->size)
			off = w->size - len;
		if (trace)
			fprintf(stderr, "op %d kind %u off %llu len %llu\n", i, kind,
				(unsigned long long)off, (unsigned long long)len);
		if (kind < 40) {
			fill(buf, len);
			ret = do_io(img, IMG_OP_WRITE, buf, off, len, 0);
			CU_ASSERT_EQUAL(ret, 0);
			if (ret == 0)
				memcpy(g_model + off, buf, len);
		} else if (kind < 75) {
			ret = do_io(img, IMG_OP_READ, buf, off, len, 0);
			CU_ASSERT_EQUAL(ret, 0);
			if (ret == 0 && memcmp(buf, g_model + off, len) != 0) {
				uint64_t k = 0;

				while (buf[k] == g_model[off + k])
					k++;
				fprintf(stderr, "%s: op %d read mismatch at %llu (req %llu+%llu)\n",
					w->name, i, (unsigned long long)(off + k),
					(unsigned long long)off, (unsigned long long)len);
				CU_FAIL("read mismatch");
				break;
			}
		} else if (kind < 82 && w->zeroes) {
			ret = do_io(img, IMG_OP_WRITE_ZEROES, NULL, off, len,
				    rnd() % 2 ? IMG_IO_UNMAP : 0);
			CU_ASSERT_EQUAL(ret, 0);
			memset(g_model + off, 0, len);
		} else if (kind < 88 && w->zeroes) {
			ret = do_io(img, IMG_OP_DISCARD, NULL, off, len, 0);
			CU_ASSERT_EQUAL(ret, 0);
			apply_discard(w, cs, off, len);
		} else if (kind < 92) {
			ret = do_io(img, IMG_OP_FLUSH, NULL, 0, 0, 0);
			CU_ASSERT_EQUAL(ret, 0);
		} else {
			batch_ops(img, w, cs);
		}
	}
	io_free_aligned(buf);
}

static void verify_all(struct img *img, const struct wl *w)
{
	uint64_t chunk = 1 << 20;
	uint8_t *buf = io_alloc_aligned(chunk);

	for (uint64_t off = 0; off < w->size; off += chunk) {
		uint64_t len = w->size - off < chunk ? w->size - off : chunk;

		CU_ASSERT_EQUAL(do_io(img, IMG_OP_READ, buf, off, len, 0), 0);
		if (memcmp(buf, g_model + off, len) != 0) {
			uint64_t k = 0;

			while (buf[k] == g_model[off + k])
				k++;
			fprintf(stderr, "%s: full read mismatch at %llu (got %02x want %02x)\n",
				w->name, (unsigned long long)(off + k), buf[k], g_model[off + k]);
			CU_FAIL("full read mismatch");
			break;
		}
	}
	io_free_aligned(buf);
}

static void save_model(const char *path, uint64_t size)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_EQUAL(write(fd, g_model, size), (ssize_t)size);
	close(fd);
}

/* qemu-img check finds @img_path clean, and compare finds it equal to the
 * model (saved to @raw); their reports go to stderr when they do not. */
static void check_vs_model(const char *img_path, const char *raw, uint64_t size)
{
	int ret;

	save_model(raw, size);
	ret = tu_sh("qemu-img check -q %s", img_path);
	if (ret != 0)
		tu_sh("qemu-img check %s >&2", img_path);
	CU_ASSERT_EQUAL(ret, 0);
	ret = tu_sh("qemu-img compare -q -f qcow2 -F raw %s %s", img_path, raw);
	if (ret != 0)
		tu_sh("qemu-img compare -f qcow2 -F raw %s %s >&2", img_path, raw);
	CU_ASSERT_EQUAL(ret, 0);
}

static void load_file(const char *path, uint64_t size)
{
	int fd = open(path, O_RDONLY);

	CU_ASSERT_FATAL(fd >= 0);
	memset(g_model, 0, size);
	CU_ASSERT(read(fd, g_model, size) >= 0);
	close(fd);
}

static uint64_t cluster_of(const char *create)
{
	const char *p = strstr(create, "cluster_size=");

	if (!p)
		return 65536;
	p += strlen("cluster_size=");
	uint64_t v = strtoull(p, NULL, 10);
	char unit = p[strspn(p, "0123456789")];

	if (unit == 'k' || unit == 'K')
		v <<= 10;
	else if (unit == 'm' || unit == 'M')
		v <<= 20;
	return v;
}

static void same_cluster_rounds(struct img *img, const struct wl *w, uint64_t cs, int rounds);

static void run_wl(const struct wl *w0)
{
	struct wl wcopy = *w0, *w = &wcopy;
	const char *only = getenv("VQCOW_TEST_ONLY"), *ops = getenv("VQCOW_TEST_OPS");

	if (only && strcmp(only, w->name) != 0)
		return;
	if (ops)
		w->ops = atoi(ops);
	char *img_path = P("t.qcow2"), *raw = P("t.raw");
	uint64_t cs = cluster_of(w->create);
	struct img *img;

	tu_sh("rm -f %s/*", g_dir);
	g_model = calloc(1, w->size);
	CU_ASSERT_FATAL(g_model != NULL);
	if (w->backing_raw) {
		char *b = P("base.raw");

		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f raw %s %llu", b,
					    (unsigned long long)(w->size / 2)),
				      0);
		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-io -f raw -c 'write -P 0x6b 0 %llu' -c 'write -P "
					    "0x6c %llu 64k' %s >/dev/null",
					    (unsigned long long)(w->size / 2 - 65536),
					    (unsigned long long)(w->size / 2 - 65536), b),
				      0);
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-img create -q -f qcow2 -o %s -b base.raw -F raw %s %llu", w->create,
			  img_path, (unsigned long long)w->size),
		    0);
		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -O raw %s %s", img_path, raw), 0);
		load_file(raw, w->size);
	} else if (w->backing) {
		char *b = P("base.qcow2");

		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o %s %s %llu", w->create,
					    b, (unsigned long long)w->size),
				      0);
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-io -f qcow2 -c 'write -P 0x5a 0 %llu' -c 'write -P "
			  "0x33 %llu %llu' %s >/dev/null",
			  (unsigned long long)(w->size / 2), (unsigned long long)(w->size / 4),
			  (unsigned long long)(w->size / 8), b),
		    0);
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-img create -q -f qcow2 -o %s -b base.qcow2 -F qcow2 %s", w->create,
			  img_path),
		    0);
		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -O raw %s %s", img_path, raw), 0);
		load_file(raw, w->size);
	} else if (w->compressed) {
		char *src = P("src.qcow2");

		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-img create -q -f qcow2 %s %llu", src, (unsigned long long)w->size),
		    0);
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-io -f qcow2 -c 'write -P 0x71 0 %llu' -c 'write -P "
			  "0x72 %llu 4k' %s >/dev/null",
			  (unsigned long long)(w->size / 2),
			  (unsigned long long)(w->size / 2 + 12288), src),
		    0);
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-img convert -c -O qcow2 -o %s %s %s", w->create, src, img_path), 0);
		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -O raw %s %s", img_path, raw), 0);
		load_file(raw, w->size);
	} else if (w->datafile) {
		CU_ASSERT_EQUAL_FATAL(
		    tu_sh("qemu-img create -q -f qcow2 -o %s,data_file=%s %s %llu", w->create,
			  P("t.data"), img_path, (unsigned long long)w->size),
		    0);
	} else {
		CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o %s %s %llu", w->create,
					    img_path, (unsigned long long)w->size),
				      0);
	}

	img = open_img(img_path, false);
	CU_ASSERT_EQUAL(img->size, w->size);
	workload(img, w, cs, w->ops / 2);
	if (w->snapshot) {
		img_close(img);
		CU_ASSERT_EQUAL(tu_sh("qemu-img snapshot -c snap1 %s", img_path), 0);
		save_model(P("snap.raw"), w->size);
		img = open_img(img_path, false);
	}
	workload(img, w, cs, w->ops - w->ops / 2);
	same_cluster_rounds(img, w, cs, 20);
	verify_all(img, w);
	img_close(img);

	/* re-open and read everything once more */
	img = open_img(img_path, true);
	verify_all(img, w);
	img_close(img);

	check_vs_model(img_path, raw, w->size);
	if (w->snapshot) {
		/* the snapshot still holds what it held */
		CU_ASSERT_EQUAL(tu_sh("qemu-img convert -l snapshot.name=snap1 -O raw %s %s",
				      img_path, P("snapout.raw")),
				0);
		CU_ASSERT_EQUAL(tu_sh("cmp -s %s %s", P("snap.raw"), P("snapout.raw")), 0);
	}
	free(g_model);
	g_model = NULL;
}

/*
 * Many requests at once on distinct blocks of the same few clusters: writes,
 * reads and write-zeroes that all need the same clusters' allocation or
 * subcluster changes, so they queue behind each other's tokens.
 */
static void same_cluster_rounds(struct img *img, const struct wl *w, uint64_t cs, int rounds)
{
	enum { N = 48 };
	uint64_t window = 4 * cs < 65536 ? 65536 : 4 * cs;

	if (window > w->size)
		window = w->size;

	for (int round = 0; round < rounds; round++) {
		uint64_t base = (rnd() % (w->size / window)) * window;
		/* 0,1 write, 2 read, 3 write zeroes */
		static const int kinds[4] = {B_WRITE, B_WRITE, B_READ, B_ZERO};
		struct batch b = {0};

		for (int i = 0; i < N * 4 && b.n < N; i++) {
			uint64_t len = ((rnd() % 8) + 1) * 512;
			uint64_t off = base + (rnd() % ((window - len) / 512 + 1)) * 512;

			if (batch_clash(&b, off, len))
				continue;
			batch_add(&b, off, len, kinds[rnd() % 4]);
		}
		batch_run(img, &b, w->name, "same-cluster");
	}
}

#define SZ (16ull << 20)

/* The workloads, one CUnit test each (named by .label), in this order. */
static const struct {
	const char *label;
	struct wl w;
} workloads[] = {
    {"default",
     {"default", "cluster_size=65536", SZ, .ops = 300, .max_io = 256 << 10, .zeroes = true}},
    {"small clusters",
     {"c512", "cluster_size=512", 4ull << 20, .ops = 300, .max_io = 16 << 10, .zeroes = true}},
    {"4k refcount 1",
     {"c4k-rc1", "cluster_size=4096,refcount_bits=1", SZ, .ops = 300, .max_io = 64 << 10,
      .zeroes = true}},
    {"refcount 64",
     {"rc64", "cluster_size=65536,refcount_bits=64", SZ, .ops = 200, .max_io = 256 << 10,
      .zeroes = true}},
    {"2M clusters",
     {"c2m", "cluster_size=2M", 32ull << 20, .ops = 150, .max_io = 1 << 20, .zeroes = true}},
    {"version 2",
     {"v2", "compat=0.10,cluster_size=65536", SZ, .ops = 300, .max_io = 256 << 10, .zeroes = true}},
    {"extended L2",
     {"extl2", "extended_l2=on,cluster_size=65536", SZ, .ops = 300, .max_io = 128 << 10,
      .zeroes = true}},
    {"extended L2 + backing",
     {"extl2-backing", "extended_l2=on,cluster_size=32768", SZ, .backing = true, .ops = 300,
      .max_io = 128 << 10, .zeroes = true}},
    {"backing",
     {"backing", "cluster_size=65536", SZ, .backing = true, .ops = 300, .max_io = 256 << 10,
      .zeroes = true}},
    {"v2 + backing",
     {"v2-backing", "compat=0.10,cluster_size=4096", SZ, .backing = true,
      .v2_backing_discard_noop = true, .ops = 300, .max_io = 64 << 10, .zeroes = true}},
    {"short raw backing",
     {"raw-backing-short", "cluster_size=65536", SZ, .backing_raw = true, .ops = 300,
      .max_io = 256 << 10, .zeroes = true}},
    {"extended L2 + short raw backing",
     {"extl2-raw-backing-short", "cluster_size=65536,extended_l2=on", SZ, .backing_raw = true,
      .ops = 300, .max_io = 128 << 10, .zeroes = true}},
    {"compressed",
     {"compressed", "cluster_size=65536", SZ, .compressed = true, .ops = 300, .max_io = 256 << 10,
      .zeroes = true}},
    {"compressed zstd",
     {"compressed-zstd", "cluster_size=65536,compression_type=zstd", SZ, .compressed = true,
      .ops = 200, .max_io = 256 << 10, .zeroes = true}},
    {"snapshot",
     {"snapshot", "cluster_size=65536", SZ, .snapshot = true, .ops = 300, .max_io = 256 << 10,
      .zeroes = true}},
    {"external data file",
     {"datafile", "cluster_size=65536", SZ, .datafile = true, .ops = 300, .max_io = 256 << 10,
      .zeroes = true}},
    /* 512-byte clusters, 64-bit refcounts: a refcount block covers 64 clusters
     * and a refcount table cluster 64 blocks: the table must grow. */
    {"refcount table growth",
     {"reftable-growth", "cluster_size=512,refcount_bits=64", 8ull << 20, .ops = 200,
      .max_io = 256 << 10, .zeroes = false}},
};

/* CUnit passes no argument: each call runs the next row (tests run in the
 * order they were added, one per row). */
static size_t g_next_workload;

static void test_workload(void)
{
	run_wl(&workloads[g_next_workload++].w);
}

/*
 * The last cluster of a disk whose size is not a multiple of the cluster
 * size, over a backing file (raw or qcow2; shorter than, as long as, or
 * longer than the disk): a write there needs copy-on-write of a range that
 * ends past the disk's end (and maybe past the backing file's), which must
 * read as zeroes. Three writes per image: one sector at the disk's end (a
 * GPT backup header), one across the boundary into the last cluster,
 * write-zeroes of the last cluster's first sector; @first says which comes
 * first (and allocates the cluster). The result must read back
 * the same here and in qemu-img/qemu-io, and pass qemu-img check.
 */
static void tail_case(const char *create, const char *bfmt, uint64_t size, uint64_t bsize,
		      unsigned first)
{
	char *img_path = P("t.qcow2"), *raw = P("t.raw");
	uint64_t cs = cluster_of(create), last = size / cs * cs;
	uint8_t *buf = io_alloc_aligned(4096), *rd = io_alloc_aligned(size);
	struct img *img;

	CU_ASSERT_FATAL(buf && rd);
	tu_sh("rm -f %s/*", g_dir);
	g_model = calloc(1, size);
	CU_ASSERT_FATAL(g_model != NULL);
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-img create -q -f %s %s %llu", bfmt, P("base"), (unsigned long long)bsize),
	    0);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-io -f %s -c 'write -P 0x6b 0 %llu' %s >/dev/null", bfmt,
				    (unsigned long long)bsize, P("base")),
			      0);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o %s -b base -F %s %s %llu",
				    create, bfmt, img_path, (unsigned long long)size),
			      0);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -O raw %s %s", img_path, raw), 0);
	load_file(raw, size);

	img = open_img(img_path, false);
	CU_ASSERT_EQUAL(img->size, size);
	for (unsigned i = 0; i < 3; i++) {
		/* the request that comes first allocates the last cluster */
		switch ((first + i) % 3) {
		case 0: /* the disk's last sector */
			memset(buf, 0xe1, 512);
			CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE, buf, size - 512, 512, 0), 0);
			memcpy(g_model + size - 512, buf, 512);
			break;
		case 1: /* across the boundary into the last cluster */
			memset(buf, 0xe2, 1024);
			CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE, buf, last - 512, 1024, 0), 0);
			memcpy(g_model + last - 512, buf, 1024);
			break;
		case 2: /* the last cluster's first sector */
			CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE_ZEROES, NULL, last, 512, 0), 0);
			memset(g_model + last, 0, 512);
			break;
		}
	}
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_FLUSH, NULL, 0, 0, 0), 0);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_READ, rd, 0, size, 0), 0);
	CU_ASSERT(memcmp(rd, g_model, size) == 0);
	img_close(img);

	check_vs_model(img_path, raw, size);
	/* qemu-io sees each written sector as written (each is one byte value) */
	CU_ASSERT_EQUAL(tu_sh("out=$(qemu-io -f qcow2 -c 'read -P %u %llu 512' -c 'read -P %u %llu "
			      "512' -c 'read -P %u %llu 512' %s 2>&1) && ! echo \"$out\" | grep -q "
			      "Pattern && [ $(echo \"$out\" | grep -c '^read 512/512') = 3 ]",
			      g_model[size - 512], (unsigned long long)(size - 512),
			      g_model[last - 512], (unsigned long long)(last - 512), g_model[last],
			      (unsigned long long)last, img_path),
			0);
	free(g_model);
	g_model = NULL;
	io_free_aligned(buf);
	io_free_aligned(rd);
}

static void test_partial_last_cluster(void)
{
	static const char *const creates[] = {"cluster_size=65536",
					      "cluster_size=65536,extended_l2=on"};
	static const char *const fmts[] = {"raw", "qcow2"};
	/* 1 MiB + 512 (the example), 1 MiB + 1 KiB */
	static const uint64_t sizes[] = {1049088, 1049600};

	for (unsigned k = 0; k < 2 * 2 * 2 * 4 * 3; k++) {
		unsigned c = k % 2, f = k / 2 % 2, z = k / 4 % 2, b = k / 8 % 4, first = k / 32;
		uint64_t size = sizes[z];
		/* backing file shorter (by a sector; by half), as long, longer */
		uint64_t bsizes[] = {size - 512, size / 2, size, 2 * size};
		unsigned before = CU_get_number_of_failures();

		tail_case(creates[c], fmts[f], size, bsizes[b], first);
		if (CU_get_number_of_failures() != before)
			fprintf(stderr,
				"partial last cluster: %s, size %llu, %s backing of %llu bytes, "
				"first write %u failed\n",
				creates[c], (unsigned long long)size, fmts[f],
				(unsigned long long)bsizes[b], first);
	}
}

/* Clusters inflated so far by @img, as its describe line says (0 when it says nothing). */
static unsigned long long inflated(struct img *img)
{
	char d[2048];
	const char *p;

	img_describe(img, d, sizeof(d));
	p = strstr(d, " compressed clusters inflated");
	if (!p)
		return 0;
	while (p > d && p[-1] >= '0' && p[-1] <= '9')
		p--;
	return strtoull(p, NULL, 10);
}

#define ZC_SIZE (1u << 20) /* 16 clusters of 64 KiB: as many as the inflate cache keeps */

/* Read [off, off + len) in @n parallel 4K reads and compare with @want. */
static void zc_read(struct img *img, uint8_t *buf, const uint8_t *want, uint64_t off, unsigned n)
{
	struct tio t[64];
	struct iovec iov[64];

	CU_ASSERT_FATAL(n <= 64);
	g_in_submit = true;
	for (unsigned i = 0; i < n; i++) {
		tio_init(&t[i]);
		iov[i] = (struct iovec){buf + i * 4096, 4096};
		img_readv(img, &t[i].io, &iov[i], 1, off + i * 4096ull, 4096);
	}
	g_in_submit = false;
	run_until_all(t, (int)n);
	for (unsigned i = 0; i < n; i++)
		CU_ASSERT_EQUAL(t[i].res, 0);
	CU_ASSERT(memcmp(buf, want + off, n * 4096ull) == 0);
}

/*
 * The inflate cache: a sequential 4K read of a compressed image inflates each
 * cluster once, and so do 16 parallel reads of one cluster; a write into a
 * compressed cluster (its COW head and tail read through the cache) and
 * writes over every cluster leave the data right (qemu-img compare).
 */
static void inflate_case(const char *create)
{
	char *src = P("zc-src.raw"), *img_path = P("zc.qcow2"), *want_path = P("zc-want.raw");
	uint8_t *want = aligned_alloc(4096, ZC_SIZE), *buf = aligned_alloc(4096, 64 * 4096);
	struct img_cache_stats st;
	struct img *img;
	int fd;

	CU_ASSERT_FATAL(want && buf);
	tu_sh("rm -f %s/*", g_dir);
	for (unsigned c = 0; c < ZC_SIZE / 65536; c++) {
		memset(want + c * 65536, 0x10 + c, 65536);
		fill(want + c * 65536 + (c % 16) * 4096, 4096);
	}
	fd = open(src, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_EQUAL(write(fd, want, ZC_SIZE), (ssize_t)ZC_SIZE);
	close(fd);
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-img convert -c -f raw -O qcow2 -o %s %s %s", create, src, img_path), 0);

	img = open_img(img_path, false);
	CU_ASSERT_EQUAL(inflated(img), 0);
	/* every cluster is compressed (qemu-img convert -c keeps a cluster that
	 * does not shrink as it is): the first pass inflates 16 */
	for (uint64_t off = 0; off < ZC_SIZE; off += 4096)
		zc_read(img, buf, want, off, 1);
	CU_ASSERT_EQUAL(inflated(img), ZC_SIZE / 65536);
	/* the same numbers for the control socket (query-named-block-nodes) */
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st), 0);
	CU_ASSERT_EQUAL(st.compressed_inflated, ZC_SIZE / 65536);
	CU_ASSERT_EQUAL(st.compressed_cache_hits, ZC_SIZE / 4096 - ZC_SIZE / 65536);
	CU_ASSERT_EQUAL(st.compressed_reads, ZC_SIZE / 65536);
	CU_ASSERT_EQUAL(st.compressed_joins, 0);
	img_close(img);

	/* 64 reads in flight over 4 clusters: each cluster inflated once, its
	 * compressed bytes read once (the other 15 reads wait for them) */
	img = open_img(img_path, false);
	zc_read(img, buf, want, 5 * 65536, 64);
	CU_ASSERT_EQUAL(inflated(img), 4);
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st), 0);
	CU_ASSERT_EQUAL(st.compressed_reads, 4);
	CU_ASSERT_EQUAL(st.compressed_joins, 60);
	CU_ASSERT_EQUAL(st.compressed_cache_hits, 60);

	/* a 4K write into compressed cluster 3: its COW reads come from the cache */
	fill(want + 3 * 65536 + 8192, 4096);
	CU_ASSERT_EQUAL(
	    do_io(img, IMG_OP_WRITE, want + 3 * 65536 + 8192, 3 * 65536 + 8192, 4096, 0), 0);
	zc_read(img, buf, want, 3 * 65536, 16);
	/* every cluster rewritten in part, then read back */
	for (unsigned c = 0; c < ZC_SIZE / 65536; c++) {
		uint64_t off = c * 65536ull + (c * 7 % 16) * 4096;

		fill(want + off, 4096);
		CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE, want + off, off, 4096, 0), 0);
	}
	for (uint64_t off = 0; off < ZC_SIZE; off += 64 * 4096)
		zc_read(img, buf, want, off, 64);
	img_close(img);

	fd = open(want_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_EQUAL(write(fd, want, ZC_SIZE), (ssize_t)ZC_SIZE);
	close(fd);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img_path), 0);
	CU_ASSERT_EQUAL(tu_sh("qemu-img compare -q -f qcow2 -F raw %s %s", img_path, want_path), 0);
	free(want);
	free(buf);
}

static void test_inflate_cache(void)
{
	inflate_case("cluster_size=65536");
	inflate_case("cluster_size=65536,compression_type=zstd");
}

/* Start @n 4K reads at @offs[i] (into @buf, 4K each) at once, run them to their end. */
static void zc_burst(struct img *img, struct tio *t, uint8_t *buf, const uint64_t *offs, unsigned n)
{
	struct iovec iov[64];

	CU_ASSERT_FATAL(n <= 64);
	g_in_submit = true;
	for (unsigned i = 0; i < n; i++) {
		tio_init(&t[i]);
		iov[i] = (struct iovec){buf + i * 4096, 4096};
		img_readv(img, &t[i].io, &iov[i], 1, offs[i], 4096);
	}
	g_in_submit = false;
	run_until_all(t, (int)n);
}

/*
 * Reads of a compressed cluster whose bytes are on their way wait for them
 * (img/img_qcow2.c, comp_issue()); when that read fails, its own request
 * fails and every waiter reads the bytes itself, failing only if its own
 * read fails: never all of them for one failed read. Also more clusters in
 * flight than inflated clusters kept (reads then go uncached).
 */
static void test_inflate_join_fail(void)
{
	const unsigned ncl = 32;
	char *src = P("zj-src.raw"), *img_path = P("zj.qcow2");
	uint8_t *want = aligned_alloc(4096, ncl * 65536ull), *buf = aligned_alloc(4096, 64 * 4096);
	struct img_cache_stats st0, st;
	uint64_t offs[64];
	struct tio t[64];
	struct img *img;
	unsigned nfail;
	int fd;

	CU_ASSERT_FATAL(want && buf);
	tu_sh("rm -f %s/*", g_dir);
	for (unsigned c = 0; c < ncl; c++) {
		memset(want + c * 65536ull, 0x20 + c, 65536);
		fill(want + c * 65536ull + (c % 16) * 4096, 4096);
	}
	fd = open(src, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_EQUAL(write(fd, want, ncl * 65536ull), (ssize_t)(ncl * 65536ull));
	close(fd);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img convert -c -f raw -O qcow2 %s %s", src, img_path), 0);
	img = open_img(img_path, true);
	/* the L2 slice loaded first: the injections below hit compressed reads only */
	zc_read(img, buf, want, 0, 1);

	/* the leader's read fails: it fails, its 15 waiters read again and succeed */
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st0), 0);
	for (unsigned i = 0; i < 16; i++)
		offs[i] = 65536 + i * 4096ull;
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	zc_burst(img, t, buf, offs, 16);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(t[0].res, -EIO);
	for (unsigned i = 1; i < 16; i++) {
		CU_ASSERT_EQUAL(t[i].res, 0);
		CU_ASSERT(memcmp(buf + i * 4096, want + offs[i], 4096) == 0);
	}
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st), 0);
	CU_ASSERT_EQUAL(st.compressed_reads - st0.compressed_reads, 16);
	CU_ASSERT_EQUAL(st.compressed_joins - st0.compressed_joins, 15);
	/* nothing kept of the failed read: read whole, right */
	zc_read(img, buf, want, 65536, 16);

	/* the leader's read and the second waiter's own read fail: those two fail */
	for (unsigned i = 0; i < 16; i++)
		offs[i] = 2 * 65536 + i * 4096ull;
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 3, -EIO), 0);
	zc_burst(img, t, buf, offs, 16);
	io_loop_inject_clear(g_loop);
	nfail = 0;
	for (unsigned i = 0; i < 16; i++) {
		if (t[i].res == 0) {
			CU_ASSERT(memcmp(buf + i * 4096, want + offs[i], 4096) == 0);
		} else {
			CU_ASSERT_EQUAL(t[i].res, -EIO);
		}
		nfail += t[i].res != 0;
	}
	CU_ASSERT_EQUAL(t[0].res, -EIO);
	CU_ASSERT_EQUAL(nfail, 2);

	/* 64 reads over all 32 clusters: more clusters in flight than entries
	 * (16 of 64 KiB), so some go uncached; all right, and fewer reads */
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st0), 0);
	for (unsigned i = 0; i < 64; i++)
		offs[i] = (i % ncl) * 65536ull + (i / ncl) * 4096ull;
	zc_burst(img, t, buf, offs, 64);
	for (unsigned i = 0; i < 64; i++) {
		CU_ASSERT_EQUAL(t[i].res, 0);
		CU_ASSERT(memcmp(buf + i * 4096, want + offs[i], 4096) == 0);
	}
	CU_ASSERT_EQUAL_FATAL(img_cache_stats(img, &st), 0);
	CU_ASSERT(st.compressed_joins - st0.compressed_joins >= 15);
	CU_ASSERT(st.compressed_reads - st0.compressed_reads <= 49);
	CU_ASSERT_EQUAL(st.compressed_reads - st0.compressed_reads + st.compressed_cache_hits -
			    st0.compressed_cache_hits,
			64);
	img_close(img);
	CU_ASSERT_EQUAL(tu_sh("qemu-img compare -q -f qcow2 -F raw %s %s", img_path, src), 0);
	free(want);
	free(buf);
}

/*
 * A dirty image (lazy refcounts, qemu-io aborted after writing: refcounts
 * stale, dirty bit set) is repaired when opened read-write, through the
 * engine's own file (the checker's I/O interface over io/): the open
 * succeeds, the data reads back, and afterwards qemu-img check is clean and
 * the dirty bit is clear. Opened read-only, it is served as it is.
 */
static void test_dirty_repair(void)
{
	const char *img_path = P("dirty.qcow2");
	const uint64_t size = 16ull << 20, len = 1 << 20;
	uint8_t *buf = io_alloc_aligned(len), *want = malloc(len);
	struct img *img;
	uint8_t inc[8];
	FILE *f;

	CU_ASSERT_FATAL(buf && want);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on %s %llu",
				    img_path, (unsigned long long)size),
			      0);
	/* qemu-io dies of SIGABRT: no exit status to look at */
	tu_sh("qemu-io -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0x33 8M 64k' -c abort %s "
	      ">/dev/null 2>&1",
	      img_path);
	CU_ASSERT_NOT_EQUAL_FATAL(tu_sh("qemu-img check -q %s >/dev/null 2>&1", img_path), 0);

	img = open_img(img_path, true); /* read-only: no repair, data served */
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_READ, buf, 0, len, 0), 0);
	memset(want, 0x5a, len);
	CU_ASSERT(memcmp(buf, want, len) == 0);
	img_close(img);

	img = open_img(img_path, false); /* read-write: repaired first */
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_READ, buf, 0, len, 0), 0);
	CU_ASSERT(memcmp(buf, want, len) == 0);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_READ, buf, 8ull << 20, 65536, 0), 0);
	memset(want, 0x33, 65536);
	CU_ASSERT(memcmp(buf, want, 65536) == 0);
	img_close(img);

	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img_path), 0);
	f = fopen(img_path, "rb");
	CU_ASSERT_PTR_NOT_NULL_FATAL(f);
	CU_ASSERT_EQUAL(fseek(f, 72, SEEK_SET), 0);
	CU_ASSERT_EQUAL(fread(inc, 1, 8, f), 8);
	fclose(f);
	CU_ASSERT_EQUAL(inc[7] & 1, 0); /* incompatible_features: dirty bit clear */
	io_free_aligned(buf);
	free(want);
}

/*
 * The backing chain limit (QCOW2_MAX_CHAIN_DEPTH = 16, shared with
 * vqcow-img map): an image with 16 backing files below it opens, one with 17
 * is refused (-ELOOP) with a message.
 */
static void test_chain_depth(void)
{
	struct img_opts o = {.direct = true, .read_only = true};
	struct img *img = NULL;
	char err[512] = "";

	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 1M", P("chain0.qcow2")), 0);
	for (int i = 1; i <= 17; i++) {
		char below[32];

		snprintf(below, sizeof(below), "chain%d.qcow2", i - 1);
		CU_ASSERT_EQUAL_FATAL(tu_sh("cd %s && qemu-img create -q -f qcow2 -b %s -F qcow2 "
					    "chain%d.qcow2",
					    g_dir, below, i),
				      0);
	}
	img = open_img(P("chain16.qcow2"), true);
	img_close(img);
	img = NULL;
	CU_ASSERT_EQUAL(img_open(&img, g_loop, P("chain17.qcow2"), &o, err, sizeof(err)), -ELOOP);
	CU_ASSERT_PTR_NULL(img);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "backing file")); /* the nested reason is cut short */
}

/*
 * Data goes through a second handle on the image (the one that reads zeroes
 * past EOF); a write of it off the O_DIRECT alignment goes through that
 * handle's page cache (io/'s buffered twin). The write-back syncs the
 * image's own handle: a failed fdatasync after such a write must stay
 * failed (Linux reports a writeback error once, the data is gone), so the
 * FLUSH after a failed one fails too, as it does for a file without O_DIRECT
 * (unit.test_io "sync sticky"). It did not: the page-cache write marked only
 * the data handle (io_file_pc_written), which the engine never syncs, so
 * the next FLUSH's fdatasync said 0.
 */
static void test_sync_sticky_data(void)
{
	uint8_t *buf = io_alloc_aligned(65536);
	struct img *img;

	CU_ASSERT_FATAL(buf != NULL);
	memset(buf, 0x5a, 65536);
	/* every cluster allocated: no L1 or L2 write (the L1 table's 8-byte
	 * entries go through the image handle's page cache themselves) */
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-img create -q -f qcow2 -o preallocation=metadata %s 1M", P("sticky.qcow2")),
	    0);
	img = open_img(P("sticky.qcow2"), false);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE, buf, 0, 65536, 0), 0);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_FLUSH, NULL, 0, 0, 0), 0);
	/* in place, 100 bytes at byte 1: off any alignment, the page cache */
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_WRITE, buf, 1, 100, 0), 0);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FDATASYNC, 1, -EIO), 0);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_FLUSH, NULL, 0, 0, 0), -EIO);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(do_io(img, IMG_OP_FLUSH, NULL, 0, 0, 0), -EIO);
	img_close(img);
	io_free_aligned(buf);
}

/*
 * A backing chain that comes back to one of its files is refused as a loop
 * by name, read-write or read-only, before the backing file's lock meets
 * the image's own (QEMU: "Failed to get shared "write" lock ... another
 * process"): an image naming itself, and two naming each other.
 */
static void test_chain_loop(void)
{
	static const char *const names[] = {"loop-self.qcow2", "loop-c.qcow2"};

	CU_ASSERT_EQUAL_FATAL(tu_sh("cd %s && qemu-img create -q -f qcow2 loop-self.qcow2 1M && "
				    "qemu-img rebase -u -b loop-self.qcow2 -F qcow2 "
				    "loop-self.qcow2 && "
				    "qemu-img create -q -f qcow2 loop-b.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -b loop-b.qcow2 -F qcow2 "
				    "loop-c.qcow2 && "
				    "qemu-img rebase -u -b loop-c.qcow2 -F qcow2 loop-b.qcow2",
				    g_dir),
			      0);
	for (unsigned i = 0; i < 2; i++) {
		for (int ro = 0; ro <= 1; ro++) {
			struct img_opts o = {.direct = true, .read_only = ro};
			struct img *img = NULL;
			char err[512] = "";

			CU_ASSERT_EQUAL(img_open(&img, g_loop, P(names[i]), &o, err, sizeof(err)),
					-ELOOP);
			CU_ASSERT_PTR_NULL(img);
			CU_ASSERT_PTR_NOT_NULL(strstr(err, "(a loop)"));
			CU_ASSERT_PTR_NOT_NULL(
			    strstr(err, i == 0 ? "is the image itself" : "further up"));
			CU_ASSERT_PTR_NULL(strstr(err, "lock"));
		}
	}
}

/*
 * qcow2 locks: the image file uses read, write, resize and shares neither
 * write nor resize (100, 101, 103, 201, 203); its backing file uses read
 * and shares neither (100, 201, 203). img_set_perm on a read-only image
 * drops and retakes them along the chain; a read-write image gives write
 * up (its metadata written back and dropped) and takes it back.
 */
static void test_locks(void)
{
	char err[512] = "";
	struct img *img;

	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f raw %s 1M", P("lk-base.raw")), 0);
	CU_ASSERT_EQUAL_FATAL(tu_sh("cd %s && qemu-img create -q -f qcow2 -b lk-base.raw -F raw "
				    "lk-top.qcow2",
				    g_dir),
			      0);
	img = open_img(P("lk-top.qcow2"), false);
	CU_ASSERT(tu_lock_held(P("lk-top.qcow2"), 100) && tu_lock_held(P("lk-top.qcow2"), 101) &&
		  !tu_lock_held(P("lk-top.qcow2"), 102) && tu_lock_held(P("lk-top.qcow2"), 103));
	CU_ASSERT(!tu_lock_held(P("lk-top.qcow2"), 200) && tu_lock_held(P("lk-top.qcow2"), 201) &&
		  !tu_lock_held(P("lk-top.qcow2"), 202) && tu_lock_held(P("lk-top.qcow2"), 203));
	CU_ASSERT(tu_lock_held(P("lk-base.raw"), 100) && !tu_lock_held(P("lk-base.raw"), 101) &&
		  tu_lock_held(P("lk-base.raw"), 201) && tu_lock_held(P("lk-base.raw"), 203));
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_READ, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(img->perm, IMG_PERM_READ);
	CU_ASSERT(tu_lock_held(P("lk-top.qcow2"), 100) && !tu_lock_held(P("lk-top.qcow2"), 101));
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_WRITE, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(img->perm, IMG_PERM_WRITE);
	CU_ASSERT(tu_lock_held(P("lk-top.qcow2"), 101));
	img_close(img);
	CU_ASSERT(!tu_lock_held(P("lk-top.qcow2"), 100) && !tu_lock_held(P("lk-base.raw"), 100));

	img = open_img(P("lk-top.qcow2"), true);
	CU_ASSERT(tu_lock_held(P("lk-top.qcow2"), 100) && !tu_lock_held(P("lk-top.qcow2"), 101) &&
		  !tu_lock_held(P("lk-top.qcow2"), 103) && tu_lock_held(P("lk-top.qcow2"), 201));
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_NONE, err, sizeof(err)), 0);
	CU_ASSERT(!tu_lock_held(P("lk-top.qcow2"), 100) && !tu_lock_held(P("lk-top.qcow2"), 201) &&
		  !tu_lock_held(P("lk-base.raw"), 100) && !tu_lock_held(P("lk-base.raw"), 201));
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_READ, err, sizeof(err)), 0);
	CU_ASSERT(tu_lock_held(P("lk-top.qcow2"), 100) && tu_lock_held(P("lk-base.raw"), 201));
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_WRITE, err, sizeof(err)), -EROFS);
	img_close(img);
}

static bool same(const uint8_t *a, uint8_t v, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (a[i] != v)
			return false;
	}
	return true;
}

/*
 * Live migration on shared storage: two opens of one image (two daemons).
 * The destination opens it inactive (no lock, nothing served: reads -EIO,
 * writes -EROFS, flush 0) while the source writes; the source gives up
 * write (metadata written back, dropped, locks released, `qemu-img check`
 * clean); the destination takes it (fresh metadata: sees the source's new
 * clusters) and allocates; the source cannot take it back while the
 * destination holds it, and after the destination lets go it sees the
 * destination's clusters (its own old cache was dropped). Both sides' data
 * verified with qemu-io afterwards; the image is clean; with a backing file.
 */
static void test_handoff(void)
{
	struct img_opts io = {.direct = true, .inactive = true};
	char err[512] = "";
	struct img *src, *dst = NULL;
	uint8_t *buf = io_alloc_aligned(65536);
	int ret;

	CU_ASSERT_FATAL(buf != NULL);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f raw %s 4M", P("ho-base.raw")), 0);
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-io -f raw -c 'write -P 0x11 0 4M' %s >/dev/null", P("ho-base.raw")), 0);
	CU_ASSERT_EQUAL_FATAL(tu_sh("cd %s && qemu-img create -q -f qcow2 -o cluster_size=65536 "
				    "-b ho-base.raw -F raw ho.qcow2",
				    g_dir),
			      0);
	src = open_img(P("ho.qcow2"), false);
	memset(buf, 0xa1, 65536);
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_WRITE, buf, 0, 65536, 0), 0);

	ret = img_open(&dst, g_loop, P("ho.qcow2"), &io, err, sizeof(err));
	if (ret < 0)
		fprintf(stderr, "inactive open: %s\n", err);
	CU_ASSERT_EQUAL_FATAL(ret, 0);
	CU_ASSERT_EQUAL(dst->perm, IMG_PERM_NONE);
	CU_ASSERT_EQUAL(dst->size, src->size);
	CU_ASSERT(tu_lock_held(P("ho.qcow2"), 101)); /* still the source's */
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_READ, buf, 0, 65536, 0), -EIO);
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_WRITE, buf, 65536, 65536, 0), -EROFS);
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_FLUSH, NULL, 0, 0, 0), 0);
	/* The destination cannot take it while the source holds it. */
	CU_ASSERT_EQUAL(img_set_perm(dst, IMG_PERM_WRITE, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_EQUAL(dst->perm, IMG_PERM_NONE);

	/* Source: allocate another cluster (cached L2/refcounts), then let go. */
	memset(buf, 0xa2, 65536);
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_WRITE, buf, 3 * 65536, 65536, 0), 0);
	CU_ASSERT_EQUAL(img_set_perm(src, IMG_PERM_NONE, err, sizeof(err)), 0);
	CU_ASSERT(!tu_lock_held(P("ho.qcow2"), 100) && !tu_lock_held(P("ho.qcow2"), 101) &&
		  !tu_lock_held(P("ho-base.raw"), 100));
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_WRITE, buf, 0, 65536, 0), -EROFS);
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_READ, buf, 0, 65536, 0), -EIO);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", P("ho.qcow2")), 0);

	/* Destination: take it, see the source's data, allocate. */
	CU_ASSERT_EQUAL(img_set_perm(dst, IMG_PERM_WRITE, err, sizeof(err)), 0);
	CU_ASSERT(tu_lock_held(P("ho.qcow2"), 101) && tu_lock_held(P("ho-base.raw"), 100));
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_READ, buf, 0, 65536, 0), 0);
	CU_ASSERT(same(buf, 0xa1, 65536));
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_READ, buf, 3 * 65536, 65536, 0), 0);
	CU_ASSERT(same(buf, 0xa2, 65536));
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_READ, buf, 5 * 65536, 65536, 0), 0);
	CU_ASSERT(same(buf, 0x11, 65536)); /* backing */
	memset(buf, 0xb1, 65536);
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_WRITE, buf, 7 * 65536, 65536, 0), 0);
	memset(buf, 0xb2, 4096);
	CU_ASSERT_EQUAL(do_io(dst, IMG_OP_WRITE, buf, 0, 4096, 0), 0);
	CU_ASSERT_EQUAL(img_set_perm(src, IMG_PERM_WRITE, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_EQUAL(src->perm, IMG_PERM_NONE);

	/* Back to the source (a failed migration resumes there). */
	CU_ASSERT_EQUAL(img_set_perm(dst, IMG_PERM_NONE, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(img_set_perm(src, IMG_PERM_WRITE, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_READ, buf, 7 * 65536, 65536, 0), 0);
	CU_ASSERT(same(buf, 0xb1, 65536));
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_READ, buf, 0, 4096, 0), 0);
	CU_ASSERT(same(buf, 0xb2, 4096));
	memset(buf, 0xc1, 65536);
	CU_ASSERT_EQUAL(do_io(src, IMG_OP_WRITE, buf, 9 * 65536, 65536, 0), 0);
	img_close(dst);
	img_close(src);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", P("ho.qcow2")), 0);
	/* Every read succeeds (6 lines) and none fails verification. */
	CU_ASSERT_EQUAL(
	    tu_sh("out=$(qemu-io -f qcow2 -c 'read -P 0xb2 0 4k' -c 'read -P 0xa1 4k 60k' "
		  "-c 'read -P 0xa2 192k 64k' -c 'read -P 0xb1 448k 64k' "
		  "-c 'read -P 0xc1 576k 64k' -c 'read -P 0x11 640k 64k' %s) && "
		  "! echo \"$out\" | grep -q Pattern && "
		  "test $(echo \"$out\" | grep -c '^read ') -eq 6",
		  P("ho.qcow2")),
	    0);
	io_free_aligned(buf);
}

int main(void)
{
	CU_pSuite s;
	unsigned fails;

	if (tu_sh("qemu-img --version >/dev/null 2>&1") != 0 ||
	    tu_sh("qemu-io --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "qemu-img/qemu-io not found: skipping\n");
		return 77;
	}
	if (getenv("VQCOW_TEST_SEED"))
		g_seed = (unsigned)strtoul(getenv("VQCOW_TEST_SEED"), NULL, 0);
	pick_dir();
	if (io_loop_init(&g_loop, 256) < 0) {
		fprintf(stderr, "no io_uring: skipping\n");
		return 77;
	}
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("qcow2_img", NULL, NULL);
	for (size_t i = 0; i < sizeof(workloads) / sizeof(workloads[0]); i++)
		CU_add_test(s, workloads[i].label, test_workload);
	CU_add_test(s, "partial last cluster + backing", test_partial_last_cluster);
	CU_add_test(s, "dirty image repaired at open", test_dirty_repair);
	CU_add_test(s, "inflate cache (zlib, zstd)", test_inflate_cache);
	CU_add_test(s, "inflate: reads join one in flight, its failure", test_inflate_join_fail);
	CU_add_test(s, "backing chain depth limit", test_chain_depth);
	CU_add_test(s, "backing chain loop", test_chain_loop);
	CU_add_test(s, "a failed FLUSH after a page-cache data write stays failed",
		    test_sync_sticky_data);
	CU_add_test(s, "locks and img_set_perm", test_locks);
	CU_add_test(s, "image handoff (migration)", test_handoff);
	fails = tu_cunit_run();
	io_loop_exit(g_loop);
	if (!fails)
		tu_sh("rm -rf %s", g_dir);
	return fails ? 1 : 0;
}
