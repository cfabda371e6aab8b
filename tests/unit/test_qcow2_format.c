/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of qcow2fmt/format.h: qcow2_header_parse() on a hand-built valid
 * header and on one mutation per field (each must be refused with a message
 * naming the field), header extensions, snapshot entries, refcount packing
 * for every width, compressed cluster descriptors.
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"
#include "testutil.h"

#define CS    65536u
#define FSIZE (0x40000u)

static uint8_t g_buf[CS];
static struct qcow2_header_info g_h;
static char g_err[512];

/* A valid v3 image: header, refcount table at 0x10000, refcount block at
 * 0x20000, L1 (2 entries) at 0x30000; 1 GiB; feature name table. */
static size_t build(unsigned version)
{
	uint8_t *b = g_buf;
	size_t off;

	memset(b, 0, sizeof(g_buf));
	qcow2_put_be32(b + 0, QCOW2_MAGIC);
	qcow2_put_be32(b + 4, version);
	qcow2_put_be32(b + 20, 16);
	qcow2_put_be64(b + 24, 1ull << 30);
	qcow2_put_be32(b + 36, 2);
	qcow2_put_be64(b + 40, 0x30000);
	qcow2_put_be64(b + 48, 0x10000);
	qcow2_put_be32(b + 56, 1);
	if (version == 2)
		return 72;
	qcow2_put_be32(b + 96, 4);
	qcow2_put_be32(b + 100, 112);
	off = 112;
	/* feature name table: two entries */
	qcow2_put_be32(b + off, QCOW2_EXT_FEATURE_TABLE);
	qcow2_put_be32(b + off + 4, 96);
	b[off + 8] = QCOW2_FEAT_INCOMPAT;
	b[off + 9] = 0;
	strcpy((char *)b + off + 10, "dirty bit");
	b[off + 56] = QCOW2_FEAT_INCOMPAT;
	b[off + 57] = 9;
	strcpy((char *)b + off + 58, "frobnication");
	off += 8 + 96;
	qcow2_put_be32(b + off, QCOW2_EXT_END);
	return off + 8;
}

static int parse(void)
{
	return qcow2_header_parse(g_buf, sizeof(g_buf), FSIZE, &g_h, g_err, sizeof(g_err));
}

static void test_valid(void)
{
	build(3);
	CU_ASSERT_EQUAL_FATAL(parse(), 0);
	CU_ASSERT_EQUAL(g_h.version, 3);
	CU_ASSERT_EQUAL(g_h.cluster_size, CS);
	CU_ASSERT_EQUAL(g_h.l2_entries, CS / 8);
	CU_ASSERT_EQUAL(g_h.refcount_bits, 16);
	CU_ASSERT_EQUAL(g_h.refcount_block_bits, 15);
	CU_ASSERT_EQUAL(g_h.refcount_table_entries, CS / 8);
	CU_ASSERT_EQUAL(g_h.l1_needed, 2);
	CU_ASSERT_EQUAL(g_h.feature_table_len, 2);
	CU_ASSERT_EQUAL(g_h.ext_end, 112 + 8 + 96 + 8);
	CU_ASSERT_FALSE(g_h.extended_l2);
	build(2);
	CU_ASSERT_EQUAL_FATAL(parse(), 0);
	CU_ASSERT_EQUAL(g_h.version, 2);
	CU_ASSERT_EQUAL(g_h.header_length, 72);
	CU_ASSERT_EQUAL(g_h.refcount_order, 4);
}

struct mut {
	const char *name;
	unsigned version;
	unsigned off;
	unsigned width; /* 4 or 8 (1 for a byte) */
	uint64_t val;
	int ret;
	const char *want; /* in the message */
};

static const struct mut muts[] = {
    {"magic", 3, 0, 4, 0x514649fa, -EINVAL, "magic"},
    {"version 1", 3, 4, 4, 1, -EINVAL, "version"},
    {"version 4", 3, 4, 4, 4, -ENOTSUP, "version"},
    {"cluster_bits 8", 3, 20, 4, 8, -EINVAL, "cluster_bits"},
    {"cluster_bits 22", 3, 20, 4, 22, -EINVAL, "cluster_bits"},
    {"cluster_bits huge", 3, 20, 4, 0xffffffff, -EINVAL, "cluster_bits"},
    {"size 2^63", 3, 24, 8, 1ull << 63, -EINVAL, "size"},
    {"size beyond L1", 3, 24, 8, 1ull << 40, -EINVAL, "l1_size"},
    {"crypt AES", 3, 32, 4, 1, -ENOTSUP, "crypt"},
    {"crypt LUKS", 3, 32, 4, 2, -ENOTSUP, "encrypt"},
    {"crypt 7", 3, 32, 4, 7, -EINVAL, "crypt_method"},
    {"l1_size 0", 3, 36, 4, 0, -EINVAL, "l1_size"},
    {"l1_size huge", 3, 36, 4, 0x10000000, -EINVAL, "l1_size"},
    {"l1_size past EOF", 3, 36, 4, 0x10000, -EINVAL, "L1 table"},
    {"l1 offset unaligned", 3, 40, 8, 0x30200, -EINVAL, "l1_table_offset"},
    {"l1 offset past EOF", 3, 40, 8, 0x40000, -EINVAL, "L1 table"},
    {"l1 offset 0", 3, 40, 8, 0, -EINVAL, "l1_table_offset"},
    {"l1 on refcount table", 3, 40, 8, 0x10000, -EINVAL, "overlaps"},
    {"reftable unaligned", 3, 48, 8, 0x10008, -EINVAL, "refcount_table_offset"},
    {"reftable 0", 3, 48, 8, 0, -EINVAL, "refcount_table_offset"},
    {"reftable past EOF", 3, 48, 8, 0x40000, -EINVAL, "refcount table"},
    {"reftable clusters 0", 3, 56, 4, 0, -EINVAL, "refcount_table_clusters"},
    {"reftable clusters huge", 3, 56, 4, 0x1000000, -EINVAL, "refcount_table_clusters"},
    {"nb_snapshots huge", 3, 60, 4, 0x7fffffff, -EINVAL, "nb_snapshots"},
    {"snapshots unaligned", 3, 64, 8, 0x20008, -EINVAL, "snapshots_offset"},
    {"snapshots past EOF", 3, 60, 4, 1, -EINVAL, "snapshot"}, /* offset 0 */
    {"unknown incompat bit", 3, 72, 8, 1ull << 5, -ENOTSUP, "incompatible feature bit 5"},
    {"named incompat bit", 3, 72, 8, 1ull << 9, -ENOTSUP, "frobnication"},
    {"incompat bit 63", 3, 72, 8, 1ull << 63, -ENOTSUP, "bit 63"},
    {"data file bit without name", 3, 72, 8, QCOW2_INCOMPAT_DATA_FILE, -EINVAL, "data file"},
    {"compression bit, no field", 3, 72, 8, QCOW2_INCOMPAT_COMPRESSION, -EINVAL, "compression"},
    {"extl2 small clusters", 3, 20, 4, 12, 0, NULL}, /* checked with the bit below */
    {"raw data without data file", 3, 88, 8, QCOW2_AUTOCLEAR_DATA_FILE_RAW, -EINVAL, "data file"},
    {"refcount_order 7", 3, 96, 4, 7, -EINVAL, "refcount_order"},
    {"header_length 100", 3, 100, 4, 100, -EINVAL, "header_length"},
    {"header_length 105", 3, 100, 4, 105, -EINVAL, "header_length"},
    {"header_length huge", 3, 100, 4, 0x20000, -EINVAL, "header_length"},
    {"v2 size past L1", 2, 24, 8, 1ull << 35, -EINVAL, "l1_size"},
};

static void put(unsigned off, unsigned width, uint64_t v)
{
	if (width == 8)
		qcow2_put_be64(g_buf + off, v);
	else if (width == 4)
		qcow2_put_be32(g_buf + off, (uint32_t)v);
	else
		g_buf[off] = (uint8_t)v;
}

static void test_mutations(void)
{
	for (size_t i = 0; i < sizeof(muts) / sizeof(muts[0]); i++) {
		const struct mut *m = &muts[i];
		int ret;

		if (!m->want)
			continue;
		build(m->version);
		put(m->off, m->width, m->val);
		ret = parse();
		if (ret != m->ret || !strstr(g_err, m->want)) {
			fprintf(stderr, "case '%s': ret %d (want %d), message '%s' (want '%s')\n",
				m->name, ret, m->ret, g_err, m->want);
			CU_FAIL("mutation not refused as expected");
		}
	}
}

static void test_features(void)
{
	/* extended L2 needs >= 16 KiB clusters */
	build(3);
	put(20, 4, 12);
	put(72, 8, QCOW2_INCOMPAT_EXTL2);
	put(36, 4, 0x1000);
	CU_ASSERT_EQUAL(qcow2_header_parse(g_buf, 4096, 0x1000000, &g_h, g_err, sizeof(g_err)),
			-EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "extended L2"));
	/* valid extended L2 (half as many entries per table: 4 L1 entries) */
	build(3);
	put(72, 8, QCOW2_INCOMPAT_EXTL2);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	put(36, 4, 4);
	CU_ASSERT_EQUAL(parse(), 0);
	CU_ASSERT_TRUE(g_h.extended_l2);
	CU_ASSERT_EQUAL(g_h.l2_entry_size, 16);
	CU_ASSERT_EQUAL(g_h.l2_entries, CS / 16);
	CU_ASSERT_EQUAL(g_h.subcluster_bits, 11);
	/* zstd: bit + field */
	build(3);
	put(100, 4, 112);
	put(104, 1, 1);
	CU_ASSERT_EQUAL(parse(), -EINVAL); /* field without the bit */
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "compression_type"));
	put(72, 8, QCOW2_INCOMPAT_COMPRESSION);
	CU_ASSERT_EQUAL(parse(), 0);
	CU_ASSERT_EQUAL(g_h.compression_type, QCOW2_COMPRESSION_ZSTD);
	put(104, 1, 7);
	CU_ASSERT_EQUAL(parse(), -ENOTSUP);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "compression_type 7"));
	/* the dirty and corrupt bits are reported, not refused */
	build(3);
	put(72, 8, QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
	CU_ASSERT_EQUAL(parse(), 0);
	CU_ASSERT_EQUAL(g_h.incompatible_features, QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
	/* short buffer: ask for the first cluster */
	build(3);
	CU_ASSERT_EQUAL(qcow2_header_parse(g_buf, 4096, FSIZE, &g_h, g_err, sizeof(g_err)),
			-ENOBUFS);
	CU_ASSERT_EQUAL(g_h.cluster_size, CS);
	/* file too short */
	CU_ASSERT_EQUAL(qcow2_header_parse(g_buf, 50, 50, &g_h, g_err, sizeof(g_err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "too short"));
}

static size_t ext_at(size_t off, uint32_t type, const void *data, uint32_t len)
{
	qcow2_put_be32(g_buf + off, type);
	qcow2_put_be32(g_buf + off + 4, len);
	if (data)
		memcpy(g_buf + off + 8, data, len);
	return off + 8 + ((len + 7) & ~7u);
}

static void test_extensions(void)
{
	size_t off;
	uint8_t bm[24] = {0}, cr[16] = {0};

	/* backing file + format + data file name (with the bit) */
	build(3);
	off = ext_at(112, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
	off = ext_at(off, QCOW2_EXT_DATA_FILE, "data.raw", 8);
	off = ext_at(off, 0x12345678, "unknown", 7);
	off = ext_at(off, QCOW2_EXT_END, NULL, 0);
	memcpy(g_buf + off, "base.qcow2", 10);
	put(8, 8, off);
	put(16, 4, 10);
	put(72, 8, QCOW2_INCOMPAT_DATA_FILE);
	CU_ASSERT_EQUAL_FATAL(parse(), 0);
	CU_ASSERT_STRING_EQUAL(g_h.backing_file, "base.qcow2");
	CU_ASSERT_STRING_EQUAL(g_h.backing_fmt, "qcow2");
	CU_ASSERT_STRING_EQUAL(g_h.data_file, "data.raw");
	CU_ASSERT_EQUAL(g_h.unknown_extensions, 1);
	/* backing name too long / outside the cluster / inside the extensions */
	put(16, 4, 1024);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "backing_file_size"));
	put(16, 4, 10);
	put(8, 8, CS - 4);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "backing"));
	put(8, 8, 0x7ffffffffff0ull);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "backing"));
	put(8, 8, 120);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "extension"));

	/* an extension running past the cluster */
	build(3);
	ext_at(112, QCOW2_EXT_FEATURE_TABLE, NULL, 0x7ffffff0);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "extension"));
	/* duplicate backing format */
	build(3);
	off = ext_at(112, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
	off = ext_at(off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
	ext_at(off, QCOW2_EXT_END, NULL, 0);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "twice"));
	/* bitmaps extension: wrong length, then bad fields */
	build(3);
	off = ext_at(112, QCOW2_EXT_BITMAPS, bm, 16);
	ext_at(off, QCOW2_EXT_END, NULL, 0);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "bitmaps"));
	build(3);
	qcow2_put_be32(bm, 1);
	qcow2_put_be64(bm + 8, 64);
	qcow2_put_be64(bm + 16, 0x20100);
	off = ext_at(112, QCOW2_EXT_BITMAPS, bm, 24);
	ext_at(off, QCOW2_EXT_END, NULL, 0);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "bitmap_directory_offset"));
	qcow2_put_be64(bm + 16, 0x20000);
	ext_at(112, QCOW2_EXT_BITMAPS, bm, 24);
	CU_ASSERT_EQUAL(parse(), 0);
	CU_ASSERT_TRUE(g_h.has_bitmaps);
	/* encryption header extension without encryption */
	build(3);
	off = ext_at(112, QCOW2_EXT_CRYPTO, cr, 16);
	ext_at(off, QCOW2_EXT_END, NULL, 0);
	CU_ASSERT_EQUAL(parse(), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_err, "encryption"));
	/* a v2 image with a backing format extension */
	build(2);
	off = ext_at(72, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
	off = ext_at(off, QCOW2_EXT_END, NULL, 0);
	memcpy(g_buf + off, "b.raw", 5);
	put(8, 8, off);
	put(16, 4, 5);
	CU_ASSERT_EQUAL(parse(), 0);
	CU_ASSERT_STRING_EQUAL(g_h.backing_fmt, "raw");
	CU_ASSERT_STRING_EQUAL(g_h.backing_file, "b.raw");
}

static void test_snapshot_entry(void)
{
	uint8_t e[128] = {0};
	struct qcow2_snapshot_info sn;
	char err[256];

	qcow2_put_be64(e, 0x50000);
	qcow2_put_be32(e + 8, 2);
	qcow2_put_be16(e + 12, 1);
	qcow2_put_be16(e + 14, 5);
	qcow2_put_be32(e + 36, 16);
	qcow2_put_be64(e + 40, 4096);
	qcow2_put_be64(e + 48, 1ull << 30);
	memcpy(e + 56, "1snap1", 6);
	CU_ASSERT_EQUAL_FATAL(qcow2_snapshot_parse(e, sizeof(e), 3, &sn, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(sn.l1_table_offset, 0x50000);
	CU_ASSERT_EQUAL(sn.l1_size, 2);
	CU_ASSERT_EQUAL(sn.vm_state_size, 4096);
	CU_ASSERT_EQUAL(sn.disk_size, 1ull << 30);
	CU_ASSERT_EQUAL(sn.entry_len, 64);
	CU_ASSERT_EQUAL(sn.raw_len, 62);
	CU_ASSERT(memcmp(sn.name, "snap1", 5) == 0);
	/* QEMU writes no padding after the last entry: 62 bytes are enough */
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, 62, 3, &sn, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(sn.entry_len, 64);
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, 61, 3, &sn, err, sizeof(err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "runs past"));
	/* v3 needs 16 bytes of extra data */
	qcow2_put_be32(e + 36, 8);
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, sizeof(e), 3, &sn, err, sizeof(err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "extra_data_size"));
	qcow2_put_be32(e + 36, 0xfffffff0);
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, sizeof(e), 3, &sn, err, sizeof(err)), -EINVAL);
	qcow2_put_be32(e + 36, 16);
	qcow2_put_be16(e + 12, 0xffff);
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, sizeof(e), 3, &sn, err, sizeof(err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "past the snapshot table"));
	CU_ASSERT_EQUAL(qcow2_snapshot_parse(e, 20, 3, &sn, err, sizeof(err)), -EINVAL);
}

static void test_refcounts(void)
{
	uint8_t blk[512];

	for (unsigned order = 0; order <= 6; order++) {
		uint64_t n = 512 * 8 >> order, max = qcow2_refcount_max(order);

		memset(blk, 0, sizeof(blk));
		for (uint64_t i = 0; i < n; i++)
			qcow2_refcount_set(blk, i, order, (i * 7 + 3) & max);
		for (uint64_t i = 0; i < n; i++)
			CU_ASSERT_EQUAL(qcow2_refcount_get(blk, i, order), (i * 7 + 3) & max);
	}
	/* sub-byte widths start from the least significant bit */
	memset(blk, 0, sizeof(blk));
	qcow2_refcount_set(blk, 0, 0, 1);
	qcow2_refcount_set(blk, 3, 1, 2);
	CU_ASSERT_EQUAL(blk[0], 0x81);
	memset(blk, 0, sizeof(blk));
	qcow2_refcount_set(blk, 1, 4, 0x1234);
	CU_ASSERT_EQUAL(blk[2], 0x12);
	CU_ASSERT_EQUAL(blk[3], 0x34);
}

static void test_compressed_desc(void)
{
	for (unsigned cb = 9; cb <= 21; cb++) {
		uint64_t off = 0x123456789ull & ((1ull << (62 - (cb - 8))) - 1) & ~0ull;
		uint64_t len = (1ull << cb) / 2 + 77, e;

		off &= QCOW2_MAX_HOST_OFFSET - 1;
		e = qcow2_compressed_entry(off, len, cb);
		CU_ASSERT((e & QCOW2_OFLAG_COMPRESSED) != 0);
		CU_ASSERT((e & QCOW2_OFLAG_COPIED) == 0);
		CU_ASSERT_EQUAL(qcow2_compressed_offset(e, cb), off);
		CU_ASSERT(qcow2_compressed_len(e, cb) >= len);
		CU_ASSERT(qcow2_compressed_len(e, cb) < len + 512);
	}
	CU_ASSERT_EQUAL(qcow2_sc_range(0, 32), 0xffffffffu);
	CU_ASSERT_EQUAL(qcow2_sc_range(3, 2), 0x18u);
	CU_ASSERT_EQUAL(qcow2_l1_entries_for(1ull << 30, 16, 13), 2);
	CU_ASSERT_EQUAL(qcow2_l1_entries_for((1ull << 30) + 1, 16, 13), 3);
	CU_ASSERT_EQUAL(qcow2_l1_entries_for(UINT64_MAX, 9, 6), 1ull << 49);
}

/* Random damage to a valid header with extensions: never a crash or an
 * out-of-bounds access (run under ASan), always a clean result. */
static void test_fuzz(void)
{
	unsigned seed = 4242;
	int accepted = 0, refused = 0;

	for (int it = 0; it < 20000; it++) {
		size_t len, end = build(it % 5 ? 3 : 2);
		uint64_t fsize;
		int flips = 1 + (int)((seed >> 16) % 6), ret;

		for (int f = 0; f < flips; f++) {
			seed = seed * 1103515245u + 12345u;
			/* mostly the header and extension area, sometimes anywhere */
			size_t at = (seed >> 8) % (seed % 4 ? end + 16 : sizeof(g_buf));

			g_buf[at] ^= (uint8_t)(1u << ((seed >> 4) % 8));
			if (seed % 7 == 0)
				g_buf[at] = (uint8_t)(seed >> 20);
		}
		seed = seed * 1103515245u + 12345u;
		len = seed % 3 ? sizeof(g_buf) : (seed >> 8) % sizeof(g_buf);
		fsize = seed % 5 ? FSIZE : (seed >> 4) % (2 * FSIZE);
		ret = qcow2_header_parse(g_buf, len, fsize, &g_h, g_err, sizeof(g_err));
		if (ret == 0) {
			accepted++;
			CU_ASSERT(g_h.cluster_size >= 512 && g_h.cluster_size <= (2u << 20));
			CU_ASSERT(g_h.l1_size >= g_h.l1_needed);
			CU_ASSERT(strlen(g_h.backing_file) <= QCOW2_MAX_BACKING_NAME);
		} else {
			refused++;
			CU_ASSERT(ret == -EINVAL || ret == -ENOTSUP || ret == -ENOBUFS);
			CU_ASSERT(g_err[0] != '\0');
		}
	}
	CU_ASSERT(accepted > 0);
	CU_ASSERT(refused > 0);
}

int main(void)
{
	CU_pSuite s;
	unsigned fails;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("qcow2_format", NULL, NULL);
	CU_add_test(s, "valid headers", test_valid);
	CU_add_test(s, "one bad field at a time", test_mutations);
	CU_add_test(s, "feature bits", test_features);
	CU_add_test(s, "header extensions", test_extensions);
	CU_add_test(s, "snapshot entries", test_snapshot_entry);
	CU_add_test(s, "refcount widths", test_refcounts);
	CU_add_test(s, "compressed descriptors", test_compressed_desc);
	CU_add_test(s, "random damage", test_fuzz);
	fails = tu_cunit_run();
	return fails ? 1 : 0;
}
