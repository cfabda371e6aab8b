/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the offline qcow2 tools (qcow2tool/qcow2tool.h): create, info,
 * check/repair and map on files made here, without qemu-img (the qemu-img
 * oracle tests are in tests/qcow2). Damage is injected with the format.h
 * helpers. Files live in $VQCOW_TEST_DIR, else the current directory.
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2tool.h"
#include "testutil.h"

static char g_dir[512];
static char g_err[512];

static const char *tpath(const char *name)
{
	static char p[4][700];
	static int i;

	i = (i + 1) % 4;
	snprintf(p[i], sizeof(p[i]), "%s/%s", g_dir, name);
	return p[i];
}

static int suite_init(void)
{
	const char *base = getenv("VQCOW_TEST_DIR");
	char tmpl[512];

	snprintf(tmpl, sizeof(tmpl), "%s/qcow2tool-XXXXXX", base ? base : ".");
	if (!mkdtemp(tmpl))
		return -1;
	snprintf(g_dir, sizeof(g_dir), "%s", tmpl);
	return 0;
}

static int suite_clean(void)
{
	char cmd[700];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
	return system(cmd) == 0 ? 0 : -1;
}

static int make(const char *name, uint64_t size, uint32_t cs, unsigned rb, int version, bool ext,
		enum qcow2_prealloc pre)
{
	struct qcow2_create_opts o = {
	    .size = size,
	    .size_set = true,
	    .cluster_size = cs,
	    .refcount_bits = rb,
	    .version = version,
	    .extended_l2 = ext,
	    .prealloc = pre,
	};

	unlink(tpath(name));
	return qcow2_create(tpath(name), &o, NULL, g_err, sizeof(g_err));
}

static int check(const char *name, unsigned flags, struct qcow2_check_result *r)
{
	return qcow2_check(tpath(name), flags, r, NULL, g_err, sizeof(g_err));
}

static bool clean(const struct qcow2_check_result *r)
{
	return !r->corruptions && !r->leaks && !r->check_errors;
}

/* Read the header and the first refcount block's location. */
static void geometry(const char *name, uint64_t *cs, uint64_t *rt_off, uint64_t *l1_off,
		     unsigned *order)
{
	uint8_t h[112];
	int fd = open(tpath(name), O_RDONLY);

	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_FATAL(pread(fd, h, sizeof(h), 0) == sizeof(h));
	*cs = 1ull << qcow2_be32(h + 20);
	*l1_off = qcow2_be64(h + 40);
	*rt_off = qcow2_be64(h + 48);
	*order = qcow2_be32(h + 4) >= 3 ? qcow2_be32(h + 96) : 4;
	close(fd);
}

/* Set the stored refcount of host cluster @k (covered by the first refcount block). */
static void poke_refcount(const char *name, uint64_t k, uint64_t v)
{
	uint64_t cs, rt, l1, rb;
	unsigned order;
	uint8_t e[8], *blk;
	int fd;

	geometry(name, &cs, &rt, &l1, &order);
	fd = open(tpath(name), O_RDWR);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_FATAL(pread(fd, e, 8, (off_t)rt) == 8);
	rb = qcow2_be64(e) & QCOW2_RTE_OFFSET_MASK;
	blk = malloc(cs);
	CU_ASSERT_FATAL(blk != NULL);
	CU_ASSERT_FATAL(pread(fd, blk, cs, (off_t)rb) == (ssize_t)cs);
	qcow2_refcount_set(blk, k, order, v);
	CU_ASSERT_FATAL(pwrite(fd, blk, cs, (off_t)rb) == (ssize_t)cs);
	free(blk);
	close(fd);
}

static void test_create_info_check(void)
{
	static const struct {
		uint32_t cs;
		unsigned rb;
		int version;
		bool ext;
		enum qcow2_prealloc pre;
	} m[] = {
	    {512, 16, 3, false, QCOW2_PREALLOC_OFF},
	    {4096, 1, 3, false, QCOW2_PREALLOC_METADATA},
	    {65536, 64, 3, true, QCOW2_PREALLOC_FALLOC},
	    {65536, 16, 2, false, QCOW2_PREALLOC_FULL},
	    {2u << 20, 8, 3, true, QCOW2_PREALLOC_METADATA},
	    {16384, 2, 3, true, QCOW2_PREALLOC_OFF},
	};

	for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
		struct qcow2_image_info info;
		struct qcow2_check_result r;
		uint64_t size = 3 * 1024 * 1024 + 4096;

		CU_ASSERT_EQUAL_FATAL(
		    make("a.qcow2", size, m[i].cs, m[i].rb, m[i].version, m[i].ext, m[i].pre), 0);
		CU_ASSERT_EQUAL_FATAL(
		    qcow2_info(tpath("a.qcow2"), NULL, &info, g_err, sizeof(g_err)), 0);
		CU_ASSERT_STRING_EQUAL(info.format, "qcow2");
		CU_ASSERT_EQUAL(info.virtual_size, size);
		CU_ASSERT_EQUAL(info.cluster_size, m[i].cs);
		CU_ASSERT_EQUAL(info.refcount_bits, m[i].rb);
		CU_ASSERT_EQUAL(info.version, m[i].version);
		CU_ASSERT_EQUAL(info.extended_l2, m[i].ext);
		CU_ASSERT_FALSE(info.dirty);
		CU_ASSERT_PTR_NULL(info.backing_file);
		qcow2_image_info_free(&info);
		CU_ASSERT_EQUAL(check("a.qcow2", 0, &r), 0);
		CU_ASSERT_TRUE(clean(&r));
		CU_ASSERT_EQUAL(r.total_clusters, (size + m[i].cs - 1) / m[i].cs);
		if (m[i].pre == QCOW2_PREALLOC_OFF) {
			CU_ASSERT_EQUAL(r.allocated_clusters, 0);
		} else {
			CU_ASSERT_EQUAL(r.allocated_clusters, r.total_clusters);
		}
	}
}

static void test_create_invalid(void)
{
	struct qcow2_create_opts o;
	struct stat st;

	memset(&o, 0, sizeof(o));
	o.size = 1 << 20;
	o.size_set = true;
	o.cluster_size = 4096;
	o.extended_l2 = true; /* needs >= 16 KiB clusters */
	unlink(tpath("bad.qcow2"));
	CU_ASSERT_EQUAL(qcow2_create(tpath("bad.qcow2"), &o, NULL, g_err, sizeof(g_err)), -EINVAL);
	CU_ASSERT(strstr(g_err, "16384") != NULL);
	CU_ASSERT_NOT_EQUAL(stat(tpath("bad.qcow2"), &st), 0);

	memset(&o, 0, sizeof(o));
	o.size = 1 << 20;
	o.size_set = true;
	o.version = 2;
	o.refcount_bits = 8;
	CU_ASSERT_EQUAL(qcow2_create(tpath("bad.qcow2"), &o, NULL, g_err, sizeof(g_err)), -EINVAL);

	memset(&o, 0, sizeof(o));
	o.size = 1ull << 50;
	o.size_set = true;
	o.cluster_size = 512; /* L1 table far beyond the limit */
	CU_ASSERT_EQUAL(qcow2_create(tpath("bad.qcow2"), &o, NULL, g_err, sizeof(g_err)), -EFBIG);

	memset(&o, 0, sizeof(o));
	o.backing_file = "does-not-exist.qcow2";
	CU_ASSERT(qcow2_create(tpath("bad.qcow2"), &o, NULL, g_err, sizeof(g_err)) < 0);
	CU_ASSERT(strstr(g_err, "does-not-exist") != NULL);
	CU_ASSERT_NOT_EQUAL(stat(tpath("bad.qcow2"), &st), 0);

	/* never overwrite */
	CU_ASSERT_EQUAL(make("exists.qcow2", 1 << 20, 0, 0, 0, false, QCOW2_PREALLOC_OFF), 0);
	memset(&o, 0, sizeof(o));
	o.size = 1 << 20;
	o.size_set = true;
	CU_ASSERT_EQUAL(qcow2_create(tpath("exists.qcow2"), &o, NULL, g_err, sizeof(g_err)),
			-EEXIST);
}

static void test_backing_size(void)
{
	struct qcow2_create_opts o;
	struct qcow2_image_info info;

	CU_ASSERT_EQUAL_FATAL(make("base.qcow2", 5 << 20, 0, 0, 0, false, QCOW2_PREALLOC_OFF), 0);
	memset(&o, 0, sizeof(o));
	o.backing_file = "base.qcow2"; /* relative to the new image's directory */
	unlink(tpath("top.qcow2"));
	/* as qemu-img: no backing file without its format (a probe is never recorded) */
	CU_ASSERT_EQUAL(qcow2_create(tpath("top.qcow2"), &o, NULL, g_err, sizeof(g_err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "Backing file specified without backing format"));
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "Detected format of qcow2."));
	CU_ASSERT_EQUAL(access(tpath("top.qcow2"), F_OK), -1);
	o.backing_fmt = "qcow2";
	CU_ASSERT_EQUAL_FATAL(qcow2_create(tpath("top.qcow2"), &o, NULL, g_err, sizeof(g_err)), 0);
	CU_ASSERT_EQUAL_FATAL(qcow2_info(tpath("top.qcow2"), NULL, &info, g_err, sizeof(g_err)), 0);
	CU_ASSERT_EQUAL(info.virtual_size, 5 << 20);
	CU_ASSERT_STRING_EQUAL(info.backing_file, "base.qcow2");
	CU_ASSERT_STRING_EQUAL(info.backing_fmt, "qcow2");
	qcow2_image_info_free(&info);
}

static void test_check_leak(void)
{
	struct qcow2_check_result r;
	uint64_t cs, rt, l1;
	unsigned order;
	int fd;

	CU_ASSERT_EQUAL_FATAL(make("leak.qcow2", 8 << 20, 4096, 16, 3, false, QCOW2_PREALLOC_OFF),
			      0);
	geometry("leak.qcow2", &cs, &rt, &l1, &order);
	fd = open(tpath("leak.qcow2"), O_RDWR);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_EQUAL(ftruncate(fd, (off_t)(l1 + 4 * cs)), 0);
	close(fd);
	poke_refcount("leak.qcow2", (l1 + 2 * cs) / cs, 1);
	CU_ASSERT_EQUAL(check("leak.qcow2", 0, &r), 0);
	CU_ASSERT_EQUAL(r.leaks, 1);
	CU_ASSERT_EQUAL(r.corruptions, 0);
	CU_ASSERT_EQUAL(check("leak.qcow2", QCOW2_CHECK_FIX_LEAKS, &r), 0);
	CU_ASSERT_EQUAL(r.leaks_fixed, 1);
	CU_ASSERT_TRUE(clean(&r));
	CU_ASSERT_EQUAL(check("leak.qcow2", 0, &r), 0);
	CU_ASSERT_TRUE(clean(&r));
}

static void test_check_rebuild(void)
{
	struct qcow2_check_result r;
	uint64_t cs, rt, l1;
	unsigned order;

	CU_ASSERT_EQUAL_FATAL(
	    make("rb.qcow2", 4 << 20, 65536, 16, 3, false, QCOW2_PREALLOC_METADATA), 0);
	geometry("rb.qcow2", &cs, &rt, &l1, &order);
	/* the L1 table's refcount drops to 0: only a rebuild can repair that */
	poke_refcount("rb.qcow2", l1 / cs, 0);
	CU_ASSERT_EQUAL(check("rb.qcow2", 0, &r), 0);
	CU_ASSERT(r.corruptions >= 1);
	/* -r leaks refuses: the structure needs rebuilding */
	CU_ASSERT(check("rb.qcow2", QCOW2_CHECK_FIX_LEAKS, &r) < 0);
	CU_ASSERT(r.check_errors >= 1);
	CU_ASSERT_EQUAL(check("rb.qcow2", QCOW2_CHECK_FIX_LEAKS | QCOW2_CHECK_FIX_ERRORS, &r), 0);
	CU_ASSERT(r.corruptions_fixed >= 1);
	CU_ASSERT_TRUE(clean(&r));
	CU_ASSERT_EQUAL(check("rb.qcow2", 0, &r), 0);
	CU_ASSERT_TRUE(clean(&r));
	CU_ASSERT_EQUAL(r.allocated_clusters, r.total_clusters); /* mapping untouched */
}

static void test_check_dirty(void)
{
	struct qcow2_check_result r;
	struct qcow2_image_info info;
	uint8_t b[8];
	int fd;

	CU_ASSERT_EQUAL_FATAL(make("dirty.qcow2", 1 << 20, 0, 0, 3, false, QCOW2_PREALLOC_OFF), 0);
	fd = open(tpath("dirty.qcow2"), O_RDWR);
	CU_ASSERT_FATAL(fd >= 0);
	qcow2_put_be64(b, QCOW2_INCOMPAT_DIRTY);
	CU_ASSERT(pwrite(fd, b, 8, QCOW2_OFF_INCOMPAT) == 8);
	close(fd);
	CU_ASSERT_EQUAL_FATAL(qcow2_info(tpath("dirty.qcow2"), NULL, &info, g_err, sizeof(g_err)),
			      0);
	CU_ASSERT_TRUE(info.dirty);
	qcow2_image_info_free(&info);
	CU_ASSERT_EQUAL(check("dirty.qcow2", QCOW2_CHECK_FIX_LEAKS | QCOW2_CHECK_FIX_ERRORS, &r),
			0);
	CU_ASSERT_TRUE(r.dirty_cleared);
	CU_ASSERT_EQUAL_FATAL(qcow2_info(tpath("dirty.qcow2"), NULL, &info, g_err, sizeof(g_err)),
			      0);
	CU_ASSERT_FALSE(info.dirty);
	qcow2_image_info_free(&info);
}

static void test_malformed(void)
{
	struct qcow2_image_info info;
	struct qcow2_check_result r;
	uint8_t b[4];
	int fd;

	CU_ASSERT_EQUAL_FATAL(make("m.qcow2", 1 << 20, 0, 0, 3, false, QCOW2_PREALLOC_OFF), 0);
	fd = open(tpath("m.qcow2"), O_RDWR);
	CU_ASSERT_FATAL(fd >= 0);
	qcow2_put_be32(b, 30); /* cluster_bits */
	CU_ASSERT(pwrite(fd, b, 4, 20) == 4);
	close(fd);
	CU_ASSERT(qcow2_info(tpath("m.qcow2"), "qcow2", &info, g_err, sizeof(g_err)) < 0);
	CU_ASSERT(strstr(g_err, "cluster_bits") != NULL);
	CU_ASSERT(check("m.qcow2", 0, &r) < 0);
	CU_ASSERT(r.check_errors > 0);

	/* a truncated file */
	fd = open(tpath("short.qcow2"), O_RDWR | O_CREAT | O_TRUNC, 0644);
	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT(write(fd, "QFI\xfb", 4) == 4);
	close(fd);
	CU_ASSERT(qcow2_info(tpath("short.qcow2"), NULL, &info, g_err, sizeof(g_err)) < 0);
	CU_ASSERT(g_err[0] != 0);
}

struct map_acc {
	int n;
	struct qcow2_map_entry e[8];
};

static int map_cb(void *opaque, const struct qcow2_map_entry *e)
{
	struct map_acc *a = opaque;

	if (a->n < 8)
		a->e[a->n] = *e;
	a->n++;
	return 0;
}

static void test_map(void)
{
	struct map_acc a;

	CU_ASSERT_EQUAL_FATAL(make("map.qcow2", 3 << 20, 65536, 16, 3, false, QCOW2_PREALLOC_OFF),
			      0);
	memset(&a, 0, sizeof(a));
	CU_ASSERT_EQUAL(qcow2_map(tpath("map.qcow2"), NULL, map_cb, &a, NULL, g_err, sizeof(g_err)),
			0);
	CU_ASSERT_EQUAL_FATAL(a.n, 1);
	CU_ASSERT_EQUAL(a.e[0].length, 3 << 20);
	CU_ASSERT_FALSE(a.e[0].present);
	CU_ASSERT_TRUE(a.e[0].zero);
	CU_ASSERT_FALSE(a.e[0].data);

	CU_ASSERT_EQUAL_FATAL(make("mapp.qcow2", 3 << 20, 65536, 16, 3, false, QCOW2_PREALLOC_FULL),
			      0);
	memset(&a, 0, sizeof(a));
	CU_ASSERT_EQUAL(
	    qcow2_map(tpath("mapp.qcow2"), NULL, map_cb, &a, NULL, g_err, sizeof(g_err)), 0);
	CU_ASSERT_EQUAL_FATAL(a.n, 1); /* data clusters are contiguous: one range */
	CU_ASSERT_TRUE(a.e[0].present);
	CU_ASSERT_TRUE(a.e[0].data);
	CU_ASSERT_TRUE(a.e[0].has_offset);
	CU_ASSERT_EQUAL(a.e[0].offset % 65536, 0);
}

/*
 * The backing chain limit (QCOW2_MAX_CHAIN_DEPTH, the daemon's too): an
 * image with that many backing files below it maps, one more is refused.
 */
static void test_map_chain_depth(void)
{
	struct qcow2_create_opts o;
	struct map_acc a;
	char name[32], below[32];

	CU_ASSERT_EQUAL_FATAL(
	    make("chain0.qcow2", 1 << 20, 65536, 16, 3, false, QCOW2_PREALLOC_OFF), 0);
	for (unsigned i = 1; i <= QCOW2_MAX_CHAIN_DEPTH + 1; i++) {
		snprintf(name, sizeof(name), "chain%u.qcow2", i);
		snprintf(below, sizeof(below), "chain%u.qcow2", i - 1);
		memset(&o, 0, sizeof(o));
		o.backing_file = below;
		o.backing_fmt = "qcow2";
		unlink(tpath(name));
		CU_ASSERT_EQUAL_FATAL(qcow2_create(tpath(name), &o, NULL, g_err, sizeof(g_err)), 0);
	}
	snprintf(name, sizeof(name), "chain%u.qcow2", QCOW2_MAX_CHAIN_DEPTH);
	memset(&a, 0, sizeof(a));
	CU_ASSERT_EQUAL(qcow2_map(tpath(name), NULL, map_cb, &a, NULL, g_err, sizeof(g_err)), 0);
	CU_ASSERT_EQUAL(a.n, 1);
	snprintf(name, sizeof(name), "chain%u.qcow2", QCOW2_MAX_CHAIN_DEPTH + 1);
	memset(&a, 0, sizeof(a));
	CU_ASSERT_EQUAL(qcow2_map(tpath(name), NULL, map_cb, &a, NULL, g_err, sizeof(g_err)),
			-ELOOP);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "backing chain"));
}

int main(void)
{
	CU_pSuite s;
	unsigned fails;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("qcow2tool", suite_init, suite_clean);
	CU_add_test(s, "create, info and a clean check", test_create_info_check);
	CU_add_test(s, "invalid create options", test_create_invalid);
	CU_add_test(s, "size from the backing file", test_backing_size);
	CU_add_test(s, "leak found and fixed", test_check_leak);
	CU_add_test(s, "refcount 0 for a used cluster: rebuild", test_check_rebuild);
	CU_add_test(s, "dirty bit cleared by repair", test_check_dirty);
	CU_add_test(s, "malformed headers refused", test_malformed);
	CU_add_test(s, "map", test_map);
	CU_add_test(s, "map: backing chain depth limit", test_map_chain_depth);
	fails = tu_cunit_run();
	return fails ? 1 : 0;
}
