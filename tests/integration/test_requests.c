/* SPDX-License-Identifier: MIT */
/*
 * Integration: virtio-blk requests through a real back-end (vqcowd, or
 * qemu-storage-daemon with VQCOW_TEST_BACKEND=qsd) driven by vqfe.
 *
 * Covered: config space and features; IN/OUT data equals what was written
 * and the bytes in the image file; every descriptor layout (split header,
 * merged header/data and data/status, many segments, indirect tables, a
 * 16-byte status buffer); buffers crossing memory regions, separate memfds,
 * ADD_MEM_REG, a guest-physical hole; EVENT_IDX on and off with 32 requests
 * in flight; four queues at once; every error status of the status table
 * (../../shared/DESIGN.md, blk/blk.h); GET_ID; FLUSH; DISCARD and
 * WRITE_ZEROES (+UNMAP); the WCE toggle through SET_CONFIG; malformed
 * requests drop the connection and the next one works; with
 * --io-threads-consolidate, the I/O thread's queue moved to the main thread
 * and back under QD1 and QD32 loads, a ring stopped and restarted, the
 * memory table set again and the connection reset while it is moved.
 */
#include <CUnit/Basic.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

static uint8_t *xmalloc(size_t n)
{
	uint8_t *p = malloc(n);

	if (!p)
		abort();
	return p;
}

/* Run one request; assert transport success; return the status byte. */
static int run(struct vqfe *fe, unsigned q, struct vqfe_req *r)
{
	int rc = vqfe_run(fe, q, r);

	if (rc < 0) {
		fprintf(stderr, "vqfe_run: %s\n", vqfe_strerror(fe));
		CU_FAIL("request failed at the transport level");
		return -1;
	}
	return r->status;
}

static bool file_equals(const struct itest_daemon *d, uint64_t off, const void *buf, size_t len)
{
	uint8_t *f = xmalloc(len);
	bool eq = itest_pread(d, f, len, off) == 0 && memcmp(f, buf, len) == 0;

	free(f);
	return eq;
}

static bool all_zero(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

/* ---- config ---- */

static void t_config(void)
{
	START(d, .img_size = 32 * MiB, .num_queues = 2);
	struct vqfe_opts o;
	itest_fe_opts(&o);
	o.num_queues = 2;
	CONNECT(fe, d, &o);
	const struct virtio_blk_config *c = vqfe_config(fe);
	uint64_t f = vqfe_features(fe);
	uint8_t buf[16];

	CU_ASSERT((f >> 32) & 1);
	CU_ASSERT((f >> VHOST_USER_F_PROTOCOL_FEATURES) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_FLUSH) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_BLK_SIZE) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_SEG_MAX) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_MQ) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_DISCARD) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_WRITE_ZEROES) & 1);
	CU_ASSERT((f >> VIRTIO_BLK_F_CONFIG_WCE) & 1);
	CU_ASSERT((f >> VIRTIO_RING_F_INDIRECT_DESC) & 1);
	CU_ASSERT((f >> VIRTIO_RING_F_EVENT_IDX) & 1);
	CU_ASSERT_FALSE((f >> VIRTIO_BLK_F_RO) & 1);
	CU_ASSERT((vqfe_protocol_features(fe) >> VHOST_USER_PROTOCOL_F_CONFIG) & 1);
	CU_ASSERT((vqfe_protocol_features(fe) >> VHOST_USER_PROTOCOL_F_MQ) & 1);
	CU_ASSERT((vqfe_protocol_features(fe) >> VHOST_USER_PROTOCOL_F_REPLY_ACK) & 1);
	CU_ASSERT(vqfe_queue_num(fe) >= 2);
	CU_ASSERT_EQUAL(vqfe_capacity(fe), 32 * MiB / 512);
	CU_ASSERT_EQUAL(le32toh(c->blk_size), 512);
	CU_ASSERT_EQUAL(le16toh(c->num_queues), 2);
	CU_ASSERT(le32toh(c->seg_max) >= 1);
	CU_ASSERT(le32toh(c->seg_max) <= 1024);
	CU_ASSERT(le32toh(c->max_discard_sectors) >= 1);
	CU_ASSERT_EQUAL(le32toh(c->max_discard_seg), 1);
	CU_ASSERT(le32toh(c->max_write_zeroes_sectors) >= 1);
	CU_ASSERT_EQUAL(le32toh(c->max_write_zeroes_seg), 1);
	if (!itest_is_qsd())
		CU_ASSERT_EQUAL(c->wce, 1); /* writeback unless --writethrough */
	/* a partial read of the config space at an offset (libvhost-user, under
	 * qemu-storage-daemon, ignores the offset) */
	if (!itest_is_qsd()) {
		CU_ASSERT_EQUAL(vqfe_get_config(fe, buf, 8, 8), 0);
		CU_ASSERT_EQUAL(memcmp(buf, (const uint8_t *)c + 8, 8), 0);
	}
	vqfe_close(fe);
	STOP(d);
}

static void t_config_lbs4096(void)
{
	START(d, .img_size = 8 * MiB, .lbs = 4096);
	CONNECT(fe, d, NULL);
	const struct virtio_blk_config *c = vqfe_config(fe);
	uint8_t *buf = xmalloc(8192);
	struct vqfe_req r = {.type = VIRTIO_BLK_T_IN, .sector = 1, .buf = buf, .len = 4096};

	CU_ASSERT_EQUAL(le32toh(c->blk_size), 4096);
	CU_ASSERT_EQUAL(vqfe_capacity(fe), 8 * MiB / 512); /* still 512-byte sectors */
	/* sector not aligned to the logical block size -> IOERR */
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_IOERR);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT, .sector = 4, .buf = buf, .len = 4096};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_IOERR);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .sector = 8, .buf = buf, .len = 8192};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(r.used_len, 8193);
	free(buf);
	vqfe_close(fe);
	STOP(d);
}

/* ---- data ---- */

static void t_rw_file(void)
{
	START(d, .img_size = 16 * MiB, .fill_random = true);
	CONNECT(fe, d, NULL);
	size_t len = 1 * MiB;
	uint8_t *w = xmalloc(len), *r = xmalloc(len), *f = xmalloc(len);

	/* what the image held before is what we read */
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 3 * MiB, r, (uint32_t)len), 0);
	CU_ASSERT_EQUAL(itest_pread(&d, f, len, 3 * MiB), 0);
	CU_ASSERT_EQUAL(memcmp(r, f, len), 0);
	/* write at a 512-aligned, not 4K-aligned offset; read back; flush; file */
	itest_fill(w, len, 1);
	CU_ASSERT_EQUAL(vqfe_write(fe, 0, 512 * 7, w, (uint32_t)len), 0);
	memset(r, 0, len);
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 512 * 7, r, (uint32_t)len), 0);
	CU_ASSERT_EQUAL(memcmp(r, w, len), 0);
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(&d, 512 * 7, w, len));
	/* the last sector of the device */
	itest_fill(w, 512, 2);
	CU_ASSERT_EQUAL(vqfe_write(fe, 0, 16 * MiB - 512, w, 512), 0);
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 16 * MiB - 512, r, 512), 0);
	CU_ASSERT_EQUAL(memcmp(r, w, 512), 0);
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(&d, 16 * MiB - 512, w, 512));
	free(w);
	free(r);
	free(f);
	vqfe_close(fe);
	STOP(d);
}

static const struct {
	unsigned layout, segs;
} layouts[] = {
    {0, 1},
    {0, 4},
    {0, 33},
    {VQFE_L_HDR_SPLIT, 1},
    {VQFE_L_MERGE, 1},
    {VQFE_L_MERGE, 3},
    {VQFE_L_INDIRECT, 1},
    {VQFE_L_INDIRECT | VQFE_L_HDR_SPLIT, 5},
    {VQFE_L_INDIRECT | VQFE_L_MERGE, 2},
    {VQFE_L_INDIRECT | VQFE_L_MERGE | VQFE_L_HDR_SPLIT, 7},
    {VQFE_L_INDIRECT, 100},
};

/* Write then read with one layout; compare data, file and used lengths. */
static void layout_roundtrip(struct itest_daemon *d, struct vqfe *fe, unsigned layout,
			     unsigned segs, uint64_t off, uint32_t len, uint64_t seed)
{
	uint8_t *w = xmalloc(len), *r = xmalloc(len);
	struct vqfe_req q = {.type = VIRTIO_BLK_T_OUT,
			     .sector = off / 512,
			     .buf = w,
			     .len = len,
			     .layout = layout,
			     .segs = segs};

	itest_fill(w, len, seed);
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(q.used_len, 1);
	if (q.status || q.used_len != 1)
		fprintf(stderr, "layout %#x segs %u: OUT status %u used_len %u\n", layout, segs,
			q.status, q.used_len);
	memset(r, 0xaa, len);
	q = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
			      .sector = off / 512,
			      .buf = r,
			      .len = len,
			      .layout = layout,
			      .segs = segs};
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(q.used_len, len + 1);
	CU_ASSERT_EQUAL(memcmp(r, w, len), 0);
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(d, off, w, len));
	if (memcmp(r, w, len))
		fprintf(stderr, "layout %#x segs %u: data differs\n", layout, segs);
	free(w);
	free(r);
}

static void t_layouts(void)
{
	START(d, .img_size = 16 * MiB);
	CONNECT(fe, d, NULL);

	for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++)
		layout_roundtrip(&d, fe, layouts[i].layout, layouts[i].segs, (i + 1) * 256 * 1024,
				 64 * 1024 + 512 * (uint32_t)i, i + 10);
	vqfe_close(fe);
	STOP(d);
}

static void t_layouts_no_event_idx_no_indirect_negotiated(void)
{
	START(d, .img_size = 8 * MiB);
	struct vqfe_opts o;
	itest_fe_opts(&o);
	o.no_event_idx = true;
	o.no_indirect = true;
	CONNECT(fe, d, &o);

	CU_ASSERT_FALSE(vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX));
	CU_ASSERT_FALSE(vqfe_has_feature(fe, VIRTIO_RING_F_INDIRECT_DESC));
	layout_roundtrip(&d, fe, VQFE_L_HDR_SPLIT, 9, 1 * MiB, 36 * 1024, 5);
	layout_roundtrip(&d, fe, VQFE_L_MERGE, 2, 2 * MiB, 4096, 6);
	vqfe_close(fe);
	STOP(d);
}

/* A data buffer crossing the region 0/1 boundary inside one descriptor. */
static void cross_region_rw(struct itest_daemon *d, struct vqfe *fe, uint64_t off, unsigned segs)
{
	uint64_t sgpa, r0gpa, r0size;
	size_t ssize;
	uint32_t len = 64 * 1024;
	uint8_t *w = xmalloc(len), *r = xmalloc(len);
	struct vqfe_req q;

	vqfe_scratch(fe, &sgpa, &ssize);
	CU_ASSERT_EQUAL_FATAL(vqfe_region(fe, 0, &r0gpa, &r0size), 0);
	/* the scratch area straddles the boundary */
	CU_ASSERT_FATAL(sgpa < r0gpa + r0size && sgpa + ssize > r0gpa + r0size);
	itest_fill(w, len, off);
	q = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
			      .sector = off / 512,
			      .buf = w,
			      .len = len,
			      .segs = segs,
			      .data_gpa = r0gpa + r0size - len / 2 - 512};
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	memset(r, 0, len);
	q = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
			      .sector = off / 512,
			      .buf = r,
			      .len = len,
			      .segs = segs,
			      .data_gpa = r0gpa + r0size - len / 2 + 1024};
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(q.used_len, len + 1);
	CU_ASSERT_EQUAL(memcmp(r, w, len), 0);
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(d, off, w, len));
	free(w);
	free(r);
}

static void t_regions(void)
{
	START(d, .img_size = 16 * MiB);
	struct vqfe_opts o;

	/* two regions of one memfd, contiguous guest-physical addresses */
	itest_fe_opts(&o);
	o.num_regions = 2;
	o.slots = 16;
	{
		CONNECT(fe, d, &o);
		cross_region_rw(&d, fe, 1 * MiB, 1);
		cross_region_rw(&d, fe, 2 * MiB, 3);
		for (unsigned i = 0; i < 4; i++) /* slots alternate between the regions */
			layout_roundtrip(&d, fe, i & 1 ? VQFE_L_INDIRECT : 0, 2, (4 + i) * MiB,
					 128 * 1024, i);
		vqfe_close(fe);
	}
	/* three regions, one memfd each, given with ADD_MEM_REG */
	o.num_regions = 3;
	o.separate_fds = true;
	o.add_mem_reg = true;
	{
		CONNECT(fe, d, &o);
		CU_ASSERT(vqfe_max_mem_slots(fe) >= 3);
		cross_region_rw(&d, fe, 3 * MiB, 2);
		for (unsigned i = 0; i < 6; i++)
			layout_roundtrip(&d, fe, VQFE_L_INDIRECT, 1, (8 + i) * MiB, 64 * 1024,
					 i + 100);
		vqfe_close(fe);
	}
	/* a 1 GiB hole in guest-physical space between the regions */
	o.num_regions = 2;
	o.separate_fds = false;
	o.add_mem_reg = false;
	o.gpa_hole = 1ull << 30;
	{
		CONNECT(fe, d, &o);
		uint64_t g1, s1;

		CU_ASSERT_EQUAL(vqfe_region(fe, 1, &g1, &s1), 0);
		CU_ASSERT(g1 >= (1ull << 30));
		for (unsigned i = 0; i < 4; i++)
			layout_roundtrip(&d, fe, 0, 1, (12 + i) * MiB, 64 * 1024, i + 200);
		vqfe_close(fe);
	}
	STOP(d);
}

/* 32 requests in flight on one queue, one kick, with or without EVENT_IDX. */
static void depth_roundtrip(bool event_idx)
{
	START(d, .img_size = 16 * MiB);
	struct vqfe_opts o;
	enum { DEPTH = 32, LEN = 16 * 1024 };
	struct vqfe_req req[DEPTH];
	uint8_t *w = xmalloc(DEPTH * LEN), *r = xmalloc(DEPTH * LEN);

	itest_fe_opts(&o);
	o.no_event_idx = !event_idx;
	o.slots = DEPTH;
	CONNECT(fe, d, &o);
	CU_ASSERT_EQUAL(vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX), event_idx);
	itest_fill(w, DEPTH * LEN, event_idx);
	for (int round = 0; round < 2; round++) {
		for (unsigned i = 0; i < DEPTH; i++) {
			/* shuffled offsets, alternating layouts */
			unsigned blk = (i * 7) % DEPTH;

			req[i] =
			    (struct vqfe_req){.type = round ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT,
					      .sector = (uint64_t)blk * LEN / 512,
					      .buf = (round ? r : w) + (size_t)blk * LEN,
					      .len = LEN,
					      .layout = i % 3 == 0 ? VQFE_L_INDIRECT : 0,
					      .segs = 1 + i % 4};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &req[i]), 0);
		}
		CU_ASSERT_EQUAL(vqfe_vq_inflight(vqfe_vq(fe, 0)), DEPTH);
		CU_ASSERT_EQUAL(vqfe_drain(fe, 0), 0);
		for (unsigned i = 0; i < DEPTH; i++) {
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
			CU_ASSERT_EQUAL(req[i].used_len, round ? LEN + 1u : 1u);
			CU_ASSERT_FALSE(req[i].inflight);
		}
	}
	CU_ASSERT_EQUAL(memcmp(r, w, DEPTH * LEN), 0);
	CU_ASSERT(vqfe_vq_calls(fe, 0) >= 1);
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(&d, 0, w, DEPTH * LEN));
	free(w);
	free(r);
	vqfe_close(fe);
	STOP(d);
}

static void t_depth_event_idx(void)
{
	depth_roundtrip(true);
}

static void t_depth_no_event_idx(void)
{
	depth_roundtrip(false);
}

/* Rings that start near the 16-bit index wrap (SET_VRING_BASE 65520). */
static void t_index_wrap(void)
{
	enum { DEPTH = 8, LEN = 4096, ROUNDS = 5 };
	START(d, .img_size = 4 * MiB);
	struct vqfe_opts o;
	struct vqfe_req req[DEPTH];
	uint8_t *w = xmalloc(DEPTH * LEN * ROUNDS), *r = xmalloc(DEPTH * LEN * ROUNDS);

	itest_fe_opts(&o);
	o.slots = DEPTH;
	o.queue_size = 16;
	o.ring_base = 65520;
	CONNECT(fe, d, &o);
	itest_fill(w, DEPTH * LEN * ROUNDS, 13);
	for (unsigned round = 0; round < 2 * ROUNDS; round++) {
		bool rd = round >= ROUNDS;
		unsigned base = (round % ROUNDS) * DEPTH;

		for (unsigned i = 0; i < DEPTH; i++) {
			req[i] = (struct vqfe_req){.type = rd ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT,
						   .sector = (uint64_t)(base + i) * LEN / 512,
						   .buf = (rd ? r : w) + (size_t)(base + i) * LEN,
						   .len = LEN,
						   .layout = i & 1 ? VQFE_L_INDIRECT : 0};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &req[i]), 0);
		}
		if (vqfe_drain(fe, 0) < 0) {
			fprintf(stderr, "round %u: %s\n", round, vqfe_strerror(fe));
			CU_FAIL_FATAL("requests across the index wrap did not complete");
		}
		for (unsigned i = 0; i < DEPTH; i++)
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	}
	/* 80 requests from 65520: the indices wrapped */
	CU_ASSERT(le16toh(vqfe_vq_used(vqfe_vq(fe, 0))->idx) < 100);
	CU_ASSERT_EQUAL(memcmp(r, w, DEPTH * LEN * ROUNDS), 0);
	free(w);
	free(r);
	vqfe_close(fe);
	STOP(d);
}

/* One 8 MiB request in 64 segments (indirect), and one of 255 segments. */
static void t_big_request(void)
{
	START(d, .img_size = 16 * MiB);
	struct vqfe_opts o;
	uint32_t len = 8 * MiB;
	uint8_t *w = xmalloc(len), *r = xmalloc(len);
	struct vqfe_req q;

	itest_fe_opts(&o);
	o.data_size = len;
	o.slots = 2;
	CONNECT(fe, d, &o);
	itest_fill(w, len, 21);
	q = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
			      .sector = 2048,
			      .buf = w,
			      .len = len,
			      .segs = 64,
			      .layout = VQFE_L_INDIRECT};
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	q = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
			      .sector = 2048,
			      .buf = r,
			      .len = len,
			      .segs = 64,
			      .layout = VQFE_L_INDIRECT};
	CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(q.used_len, len + 1);
	CU_ASSERT_EQUAL(memcmp(r, w, len), 0);
	/* as many segments as an indirect table of ours holds (header, status) */
	if (le32toh(vqfe_config(fe)->seg_max) >= 254) {
		memset(r, 0, len);
		q = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
				      .sector = 2048,
				      .buf = r,
				      .len = 254 * 4096,
				      .segs = 254,
				      .layout = VQFE_L_INDIRECT};
		CU_ASSERT_EQUAL(run(fe, 0, &q), VIRTIO_BLK_S_OK);
		CU_ASSERT_EQUAL(memcmp(r, w, 254 * 4096), 0);
	}
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	CU_ASSERT(file_equals(&d, 1 * MiB, w, len));
	free(w);
	free(r);
	vqfe_close(fe);
	STOP(d);
}

/* A driver that polls asks for no interrupts; the device SHOULD NOT send any
 * (virtio 1.2 2.7.10: NO_INTERRUPT without EVENT_IDX; with EVENT_IDX only
 * when used->idx crosses used_event, which we leave at the ring start). */
static void suppressed(bool event_idx)
{
	enum { DEPTH = 8, ROUNDS = 4 };
	START(d, .img_size = 4 * MiB);
	struct vqfe_opts o;
	struct vqfe_req req[DEPTH];
	uint8_t buf[4096];
	uint64_t calls;

	itest_fe_opts(&o);
	o.poll = true;
	o.no_event_idx = !event_idx;
	o.slots = DEPTH;
	CONNECT(fe, d, &o);
	for (unsigned round = 0; round < ROUNDS; round++) {
		for (unsigned i = 0; i < DEPTH; i++) {
			req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
						   .sector = i * 8,
						   .buf = buf,
						   .len = sizeof(buf)};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &req[i]), 0);
		}
		CU_ASSERT_EQUAL_FATAL(vqfe_drain(fe, 0), 0);
		for (unsigned i = 0; i < DEPTH; i++)
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	}
	/* with EVENT_IDX, the first completion crosses used_event (0); vqcowd and
	 * libvhost-user (qemu-storage-daemon) also signal once when they get the
	 * call fd (so nothing pushed around a reconnect stays unseen) */
	calls = vqfe_vq_calls(fe, 0);
	if (calls > (event_idx ? 1u : 0u) + 1u)
		fprintf(stderr, "%llu notifications\n", (unsigned long long)calls);
	CU_ASSERT(calls <= (event_idx ? 1u : 0u) + 1u);
	vqfe_close(fe);
	STOP(d);
}

static void t_suppressed_no_interrupt(void)
{
	suppressed(false);
}

static void t_suppressed_event_idx(void)
{
	suppressed(true);
}

static void t_multiqueue(void)
{
	enum { NQ = 4, DEPTH = 8, LEN = 32 * 1024 };
	START(d, .img_size = 16 * MiB, .num_queues = NQ);
	struct vqfe_opts o;
	struct vqfe_req req[NQ][DEPTH];
	uint8_t *w = xmalloc(NQ * DEPTH * LEN), *r = xmalloc(NQ * DEPTH * LEN);
	unsigned left = 0;

	itest_fe_opts(&o);
	o.num_queues = NQ;
	o.slots = DEPTH;
	o.num_regions = 2;
	CONNECT(fe, d, &o);
	itest_fill(w, NQ * DEPTH * LEN, 42);
	for (unsigned q = 0; q < NQ; q++)
		for (unsigned i = 0; i < DEPTH; i++) {
			size_t k = (size_t)q * DEPTH + i;

			req[q][i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
						      .sector = k * LEN / 512,
						      .buf = w + k * LEN,
						      .len = LEN};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, q, &req[q][i]), 0);
			left++;
		}
	for (unsigned q = 0; q < NQ; q++)
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, q), false), 0);
	while (left) {
		int got = 0;

		for (unsigned q = 0; q < NQ; q++) {
			int n = vqfe_reap(fe, q, NULL, ~0u);

			CU_ASSERT_FATAL(n >= 0);
			got += n;
		}
		left -= (unsigned)got;
		if (left && !got)
			CU_ASSERT_EQUAL_FATAL(vqfe_wait_any(fe, 20000), 0);
	}
	for (unsigned q = 0; q < NQ; q++)
		for (unsigned i = 0; i < DEPTH; i++)
			CU_ASSERT_EQUAL(req[q][i].status, VIRTIO_BLK_S_OK);
	/* read everything back through another queue than the one that wrote it */
	for (unsigned q = 0; q < NQ; q++)
		CU_ASSERT_EQUAL(vqfe_read(fe, (q + 1) % NQ, (uint64_t)q * DEPTH * LEN,
					  r + (size_t)q * DEPTH * LEN, DEPTH * LEN),
				0);
	CU_ASSERT_EQUAL(memcmp(r, w, NQ * DEPTH * LEN), 0);
	for (unsigned q = 0; q < NQ; q++)
		CU_ASSERT_EQUAL(vqfe_flush(fe, q), 0);
	CU_ASSERT(file_equals(&d, 0, w, NQ * DEPTH * LEN));
	free(w);
	free(r);
	vqfe_close(fe);
	STOP(d);
}

/* ---- status table ---- */

static void expect(struct vqfe *fe, struct vqfe_req *r, int status, const char *what)
{
	int st = run(fe, 0, r);

	if (st != status)
		fprintf(stderr, "%s: status %d, expected %d\n", what, st, status);
	CU_ASSERT_EQUAL(st, status);
	/* nothing was written into guest buffers for a refused request (QEMU
	 * counts the whole writable size instead) */
	if (status != VIRTIO_BLK_S_OK && !itest_is_qsd())
		CU_ASSERT_EQUAL(r->used_len, 1);
}

static void t_status_rw(void)
{
	START(d, .img_size = 8 * MiB);
	CONNECT(fe, d, NULL);
	uint64_t cap = vqfe_capacity(fe);
	uint8_t *buf = xmalloc(8192);
	struct vqfe_req r;

	memset(buf, 0x5a, 8192);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .buf = buf, .len = 100};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "IN of 100 bytes");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT, .sector = 8, .buf = buf, .len = 1000};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "OUT of 1000 bytes");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .sector = cap, .buf = buf, .len = 512};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "IN at capacity");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .sector = cap - 1, .buf = buf, .len = 1024};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "IN across the end");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT, .sector = cap - 1, .buf = buf, .len = 1024};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "OUT across the end");
	r = (struct vqfe_req){
	    .type = VIRTIO_BLK_T_OUT, .sector = 1ull << 62, .buf = buf, .len = 512};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "OUT at sector 2^62");
	r = (struct vqfe_req){
	    .type = VIRTIO_BLK_T_IN, .sector = UINT64_MAX, .buf = buf, .len = 512};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "IN at sector 2^64-1");
	/* none of the refused writes reached the file */
	{
		uint8_t *f = xmalloc(8192);

		CU_ASSERT_EQUAL(itest_pread(&d, f, 8192, 0), 0);
		CU_ASSERT(all_zero(f, 8192));
		CU_ASSERT_EQUAL(itest_pread(&d, f, 512, cap * 512 - 512), 0);
		CU_ASSERT(all_zero(f, 512));
		free(f);
	}
	/* the connection is fine afterwards */
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .sector = cap - 2, .buf = buf, .len = 1024};
	expect(fe, &r, VIRTIO_BLK_S_OK, "IN of the last two sectors");
	CU_ASSERT_EQUAL(r.used_len, 1025);
	free(buf);
	vqfe_close(fe);
	STOP(d);
}

static void t_read_only(void)
{
	START(d, .img_size = 8 * MiB, .read_only = true, .fill_random = true);
	CONNECT(fe, d, NULL);
	uint8_t *buf = xmalloc(4096), *f = xmalloc(4096);
	struct virtio_blk_discard_write_zeroes seg = {htole64(0), htole32(8), 0};
	struct vqfe_req r;

	CU_ASSERT(vqfe_has_feature(fe, VIRTIO_BLK_F_RO));
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN, .buf = buf, .len = 4096};
	expect(fe, &r, VIRTIO_BLK_S_OK, "IN on read-only");
	CU_ASSERT_EQUAL(itest_pread(&d, f, 4096, 0), 0);
	CU_ASSERT_EQUAL(memcmp(buf, f, 4096), 0);
	memset(buf, 0, 4096);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT, .buf = buf, .len = 4096};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "OUT on read-only");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = &seg, .len = sizeof(seg)};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "DISCARD on read-only");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = &seg, .len = sizeof(seg)};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "WRITE_ZEROES on read-only");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH};
	expect(fe, &r, VIRTIO_BLK_S_OK, "FLUSH on read-only");
	/* the file is untouched */
	CU_ASSERT_EQUAL(itest_pread(&d, buf, 4096, 0), 0);
	CU_ASSERT_EQUAL(memcmp(buf, f, 4096), 0);
	free(buf);
	free(f);
	vqfe_close(fe);
	STOP(d);
}

static void t_discard_write_zeroes(void)
{
	START(d, .img_size = 16 * MiB, .fill_random = true);
	CONNECT(fe, d, NULL);
	const struct virtio_blk_config *c = vqfe_config(fe);
	uint64_t cap = vqfe_capacity(fe);
	uint8_t *buf = xmalloc(64 * 1024);
	struct virtio_blk_discard_write_zeroes seg[2];
	struct vqfe_req r;

#define SEG(i, s, n, f)                                                                            \
	seg[i] = (struct virtio_blk_discard_write_zeroes){htole64(s), htole32(n), htole32(f)}
	/* WRITE_ZEROES without and with UNMAP: zeroes in the device and the file */
	SEG(0, 2048, 128, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_OK, "WRITE_ZEROES");
	CU_ASSERT_EQUAL(r.used_len, 1);
	SEG(0, 4096, 128, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_OK, "WRITE_ZEROES+UNMAP");
	for (uint64_t s = 2048; s <= 4096; s += 2048) {
		memset(buf, 1, 64 * 1024);
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, s * 512, buf, 64 * 1024), 0);
		CU_ASSERT(all_zero(buf, 64 * 1024));
		CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
		CU_ASSERT_EQUAL(itest_pread(&d, buf, 64 * 1024, s * 512), 0);
		CU_ASSERT(all_zero(buf, 64 * 1024));
	}
	/* the sectors around were not touched */
	{
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, 2047 * 512, buf, 512), 0);
		CU_ASSERT_FALSE(all_zero(buf, 512));
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, 2176 * 512, buf, 512), 0);
		CU_ASSERT_FALSE(all_zero(buf, 512));
	}
	/* DISCARD of one segment */
	SEG(0, 8192, 128, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_OK, "DISCARD");
	/* two segments -> UNSUPP */
	SEG(0, 0, 8, 0);
	SEG(1, 64, 8, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 32};
	expect(fe, &r, VIRTIO_BLK_S_UNSUPP, "DISCARD with 2 segments");
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 32};
	expect(fe, &r, VIRTIO_BLK_S_UNSUPP, "WRITE_ZEROES with 2 segments");
	/* unknown flags, UNMAP on DISCARD -> UNSUPP */
	SEG(0, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_UNSUPP, "DISCARD with UNMAP");
	SEG(0, 0, 8, 0x2);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_UNSUPP, "WRITE_ZEROES with flag 0x2");
	SEG(0, 0, 8, 0x80000000u);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_UNSUPP, "DISCARD with flag 0x80000000");
	/* above the advertised maximum / beyond capacity -> IOERR */
	SEG(0, 0, le32toh(c->max_discard_sectors) + 1, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "DISCARD above max_discard_sectors");
	SEG(0, 0, le32toh(c->max_write_zeroes_sectors) + 1, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "WRITE_ZEROES above max_write_zeroes_sectors");
	SEG(0, cap - 4, 8, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "DISCARD across the end");
	SEG(0, cap, 8, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "WRITE_ZEROES at capacity");
	SEG(0, UINT64_MAX - 3, 8, 0);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 16};
	expect(fe, &r, VIRTIO_BLK_S_IOERR, "WRITE_ZEROES wrapping around");
	if (!itest_is_qsd()) {
		/* a short segment (8 of 16 bytes) -> IOERR (blk/blk.h) */
		SEG(0, 0, 8, 0);
		r = (struct vqfe_req){.type = VIRTIO_BLK_T_WRITE_ZEROES, .buf = seg, .len = 8};
		expect(fe, &r, VIRTIO_BLK_S_IOERR, "WRITE_ZEROES with a short segment");
		r = (struct vqfe_req){.type = VIRTIO_BLK_T_DISCARD};
		expect(fe, &r, VIRTIO_BLK_S_IOERR, "DISCARD without a segment");
	}
	/* nothing was zeroed at sector 0 by the refused requests */
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 0, buf, 4096), 0);
	CU_ASSERT_FALSE(all_zero(buf, 4096));
#undef SEG
	free(buf);
	vqfe_close(fe);
	STOP(d);
}

static void t_unknown_type(void)
{
	static const uint32_t types[] = {2,  3,  5,    7,           9,           10,         12,
					 14, 15, 0x42, 0x80000000u, 0x80000001u, 0xffffffffu};
	START(d, .img_size = 4 * MiB);
	CONNECT(fe, d, NULL);
	uint8_t buf[512];

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		struct vqfe_req r = {.type = types[i]};
		char what[64];

		/* QEMU 7.2 knows SECURE_ERASE and strips the legacy BARRIER bit */
		if ((types[i] == 14 || types[i] >= 0x80000000u) && itest_is_qsd())
			continue;
		snprintf(what, sizeof(what), "type %#x", types[i]);
		expect(fe, &r, VIRTIO_BLK_S_UNSUPP, what);
		/* also with a device-writable data buffer in front of the status */
		r = (struct vqfe_req){.type = types[i], .buf = buf, .len = 512, .dir = VQFE_DIR_IN};
		expect(fe, &r, VIRTIO_BLK_S_UNSUPP, what);
	}
	vqfe_close(fe);
	STOP(d);
}

static void t_get_id_flush(void)
{
	const char *serial = "vqcow-serial-0123456"; /* exactly 20 bytes */
	START(d, .img_size = 4 * MiB, .serial = serial);
	CONNECT(fe, d, NULL);
	char id[VIRTIO_BLK_ID_BYTES + 1];
	struct vqfe_req r;

	r = (struct vqfe_req){.type = VIRTIO_BLK_T_GET_ID, .buf = id, .len = VIRTIO_BLK_ID_BYTES};
	memset(id, 0, sizeof(id));
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(r.used_len, VIRTIO_BLK_ID_BYTES + 1);
	if (!itest_is_qsd())
		CU_ASSERT_STRING_EQUAL(id, serial);
	/* with the id split over two buffers and the status merged */
	memset(id, 0, sizeof(id));
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_GET_ID,
			      .buf = id,
			      .len = VIRTIO_BLK_ID_BYTES,
			      .segs = 2,
			      .layout = VQFE_L_MERGE | VQFE_L_INDIRECT};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	if (!itest_is_qsd())
		CU_ASSERT_STRING_EQUAL(id, serial);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(r.used_len, 1);
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH,
			      .layout = VQFE_L_INDIRECT | VQFE_L_HDR_SPLIT};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	/* the status is the last byte of a 16-byte writable buffer */
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH, .layout = VQFE_L_STATUS_BIG};
	CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
	if (!itest_is_qsd()) /* QEMU reports the whole buffer (16) */
		CU_ASSERT_EQUAL(r.used_len, 1);
	{
		uint8_t buf[512] = {0};

		r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
				      .sector = 8,
				      .buf = buf,
				      .len = 512,
				      .layout = VQFE_L_STATUS_BIG};
		CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_OK);
		/* for IN, the 15 bytes before the status are data: 527 bytes -> IOERR */
		r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
				      .sector = 8,
				      .buf = buf,
				      .len = 512,
				      .layout = VQFE_L_STATUS_BIG};
		CU_ASSERT_EQUAL(run(fe, 0, &r), VIRTIO_BLK_S_IOERR);
	}
	vqfe_close(fe);
	STOP(d);
	if (!itest_is_qsd()) {
		/* a shorter serial: NUL-padded */
		START(d2, .img_size = 4 * MiB, .serial = "abc");
		CONNECT(fe2, d2, NULL);
		memset(id, 0x77, sizeof(id));
		CU_ASSERT_EQUAL(vqfe_get_id(fe2, 0, id), VIRTIO_BLK_S_OK);
		CU_ASSERT_STRING_EQUAL(id, "abc");
		vqfe_close(fe2);
		STOP(d2);
	}
}

static void t_wce(void)
{
	START(d, .img_size = 4 * MiB);
	CONNECT(fe, d, NULL);
	uint8_t v, buf[4096];
	uint64_t cap = vqfe_capacity(fe), bogus = 12345;
	uint32_t off = (uint32_t)offsetof(struct virtio_blk_config, wce);
	int rc;

	itest_fill(buf, sizeof(buf), 9);
	v = 0;
	CU_ASSERT_EQUAL(vqfe_set_config(fe, &v, off, 1), 0);
	CU_ASSERT_EQUAL(vqfe_refresh_config(fe), 0);
	CU_ASSERT_EQUAL(vqfe_config(fe)->wce, 0);
	/* writethrough: the write is in the file when it completes */
	CU_ASSERT_EQUAL(vqfe_write(fe, 0, 8192, buf, sizeof(buf)), 0);
	if (!itest_is_qsd())
		CU_ASSERT(file_equals(&d, 8192, buf, sizeof(buf)));
	v = 1;
	CU_ASSERT_EQUAL(vqfe_set_config(fe, &v, off, 1), 0);
	CU_ASSERT_EQUAL(vqfe_refresh_config(fe), 0);
	CU_ASSERT_EQUAL(vqfe_config(fe)->wce, 1);
	/* capacity is read-only: refused (nack) or ignored, never applied */
	rc = vqfe_set_config(fe, &bogus, 0, 8);
	CU_ASSERT(rc == 0 || rc == -EIO);
	if (!vqfe_is_disconnected(fe) && vqfe_refresh_config(fe) == 0)
		CU_ASSERT_EQUAL(vqfe_capacity(fe), cap);
	vqfe_close(fe);
	STOP(d);
	if (!itest_is_qsd()) {
		START(d2, .img_size = 4 * MiB, .writethrough = true);
		CONNECT(fe2, d2, NULL);
		CU_ASSERT_EQUAL(vqfe_config(fe2)->wce, 0);
		CU_ASSERT_EQUAL(vqfe_write(fe2, 0, 0, buf, sizeof(buf)), 0);
		CU_ASSERT(file_equals(&d2, 0, buf, sizeof(buf)));
		vqfe_close(fe2);
		STOP(d2);
	}
}

/* A malformed request makes the back-end drop the connection (vqcowd), and
 * the next connection works. */
static void t_malformed_requests(void)
{
	static const struct {
		unsigned layout;
		const char *what;
	} bad[] = {
	    {VQFE_L_SHORT_HDR, "8-byte header"},
	    {VQFE_L_NO_STATUS, "no status descriptor"},
	    {VQFE_L_STATUS_RO, "status not device-writable"},
	    {VQFE_L_SHORT_HDR | VQFE_L_INDIRECT, "8-byte header, indirect"},
	};
	START(d, .img_size = 4 * MiB);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		CONNECT(fe, d, NULL);
		uint8_t buf[512];
		/* a header may span descriptors: with data after a short header, the
		 * data would complete it, so the short-header cases carry none */
		bool short_hdr = bad[i].layout & VQFE_L_SHORT_HDR;
		struct vqfe_req r = {.type = short_hdr ? VIRTIO_BLK_T_FLUSH : VIRTIO_BLK_T_OUT,
				     .buf = buf,
				     .len = short_hdr ? 0 : 512,
				     .layout = bad[i].layout};

		memset(buf, 0xee, sizeof(buf));
		CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r), 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 0), true), 0);
		if (!itest_is_qsd()) {
			int rc = vqfe_wait_disconnect(fe, 5000);

			if (rc)
				fprintf(stderr, "%s: connection not dropped\n", bad[i].what);
			CU_ASSERT_EQUAL(rc, 0);
		}
		vqfe_close(fe);
		CU_ASSERT_FATAL(itest_alive(&d));
		/* nothing was written */
		CU_ASSERT_EQUAL(itest_pread(&d, buf, 512, 0), 0);
		CU_ASSERT(all_zero(buf, 512));
	}
	{
		CONNECT(fe, d, NULL);
		uint8_t w[4096], r[4096];

		itest_fill(w, sizeof(w), 3);
		CU_ASSERT_EQUAL(vqfe_write(fe, 0, 0, w, sizeof(w)), 0);
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, 0, r, sizeof(r)), 0);
		CU_ASSERT_EQUAL(memcmp(w, r, sizeof(w)), 0);
		vqfe_close(fe);
	}
	STOP(d);
}

/*
 * The main thread serves queue 0 beside an I/O thread (--io-threads 2): a
 * malformed request on queue 0 while queue 1's writes are in flight on the
 * I/O thread drops the connection without tearing the rings down under that
 * thread (vhost/ waits for the main thread's wake-up, which parks it:
 * ops->rings_shared), every round; then the daemon serves both queues.
 */
static void t_malformed_beside_thread(void)
{
	enum { DEPTH = 16, LEN = 64 * 1024 };
	static uint8_t w[DEPTH][LEN];
	START(d, .img_size = 4 * MiB, .num_queues = 2, .extra = {"--io-threads", "2"});
	struct vqfe_opts o;

	itest_fe_opts(&o);
	o.num_queues = 2;
	o.slots = DEPTH + 1;
	for (unsigned round = 0; round < 4; round++) {
		CONNECT(fe, d, &o);
		struct vqfe_req req[DEPTH],
		    bad = {.type = VIRTIO_BLK_T_FLUSH, .layout = VQFE_L_SHORT_HDR};

		for (unsigned i = 0; i < DEPTH; i++) {
			itest_fill(w[i], LEN, 50 + round * DEPTH + i);
			req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
						   .sector = (uint64_t)i * LEN / 512,
						   .buf = w[i],
						   .len = LEN};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 1, &req[i]), 0);
		}
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), false), 0);
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &bad), 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 0), true), 0);
		CU_ASSERT_EQUAL(vqfe_wait_disconnect(fe, 5000), 0);
		vqfe_close(fe);
		CU_ASSERT_FATAL(itest_alive(&d));
	}
	{
		CONNECT(fe, d, &o);
		uint8_t wb[4096], rb[4096];

		for (unsigned q = 0; q < 2; q++) {
			itest_fill(wb, sizeof(wb), 7 + q);
			CU_ASSERT_EQUAL(vqfe_write(fe, q, 8192 * q, wb, sizeof(wb)), 0);
			CU_ASSERT_EQUAL(vqfe_read(fe, 1 - q, 8192 * q, rb, sizeof(rb)), 0);
			CU_ASSERT_EQUAL(memcmp(wb, rb, sizeof(wb)), 0);
		}
		vqfe_close(fe);
	}
	STOP(d);
}

/* How many times the log says @what, waiting up to 3 s for at least @want. */
static unsigned log_count(const struct itest_daemon *d, const char *what, unsigned want)
{
	unsigned n = 0;

	for (int tries = 0; tries < 300; tries++) {
		char line[1024];
		FILE *f = fopen(d->log, "r");

		n = 0;
		while (f && fgets(line, sizeof(line), f))
			n += strstr(line, what) != NULL;
		if (f)
			fclose(f);
		if (n >= want)
			break;
		usleep(10000);
	}
	return n;
}

#define GATHERED "its queues moved to the main thread"
#define SPREAD   "its queues moved back to it"

/* QD1 on both queues (one request at a time, alternating): writes of block i of each queue's area,
 * verified. */
static void qd1_rw(struct vqfe *fe, unsigned n, uint64_t seed)
{
	uint8_t w[4096], r[4096];

	for (unsigned i = 0; i < n; i++) {
		for (unsigned q = 0; q < 2; q++) {
			uint64_t off = (q * 256ull + i % 256) * 4096;

			itest_fill(w, sizeof(w), seed + q * 1000 + i);
			CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, q, off, w, sizeof(w)), 0);
			CU_ASSERT_EQUAL_FATAL(vqfe_read(fe, q, off, r, sizeof(r)), 0);
			CU_ASSERT_FATAL(memcmp(w, r, sizeof(w)) == 0);
		}
	}
}

/* 32 writes in flight at once on queue 1 (queue 1's blocks 0..31), then read back through queue 0.
 * They are published with one index store (vqfe_vq_hold): a polling daemon would otherwise pop
 * each as it comes, and a slow frontend (ASan, a loaded CI machine) would show it one at a time,
 * low load, where the test wants high. */
static void qd32_rw(struct vqfe *fe, uint64_t seed)
{
	enum { DEPTH = 32, LEN = 4096 };
	static uint8_t w[DEPTH][LEN];
	uint8_t r[LEN];
	struct vqfe_req req[DEPTH];

	vqfe_vq_hold(vqfe_vq(fe, 1), true);
	for (unsigned i = 0; i < DEPTH; i++) {
		itest_fill(w[i], LEN, seed + i);
		req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
					   .sector = (256ull + i) * LEN / 512,
					   .buf = w[i],
					   .len = LEN};
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 1, &req[i]), 0);
	}
	vqfe_vq_hold(vqfe_vq(fe, 1), false);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), true), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_drain(fe, 1), 0);
	for (unsigned i = 0; i < DEPTH; i++) {
		CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
		CU_ASSERT_EQUAL_FATAL(vqfe_read(fe, 0, (256ull + i) * LEN, r, LEN), 0);
		CU_ASSERT(memcmp(w[i], r, LEN) == 0);
	}
}

/*
 * --io-threads-consolidate (src/vqcowd.c, cons_*): queue 1's I/O thread
 * hands it to the main thread after a run of QD1 requests
 * (VQCOWD_TEST_CONS_RUN=8, a test seam) and takes it back under 32 in
 * flight; meanwhile, with it moved: its ring stopped and restarted
 * (GET_VRING_BASE: the kick watch then goes to the main loop), the memory
 * table set again, the connection dropped and made anew. Every request
 * verified; the log counts the moves.
 */
static void t_consolidate(void)
{
	setenv("VQCOWD_TEST_CONS_RUN", "8", 1);
	START(d, .img_size = 4 * MiB, .num_queues = 2,
	      .extra = {"--io-threads", "2", "--io-threads-consolidate", "--log-level", "debug"});
	unsetenv("VQCOWD_TEST_CONS_RUN");
	struct vqfe_opts o;
	unsigned g = 0, s = 0;

	itest_fe_opts(&o);
	o.num_queues = 2;
	o.slots = 40;
	for (unsigned conn = 0; conn < 2; conn++) {
		CONNECT(fe, d, &o);
		uint32_t base = 0;

		/* low load: moved to the main thread (a new connection finds it
		 * there: the move outlives the connection) */
		qd1_rw(fe, 32, 100 + conn);
		g += conn == 0;
		CU_ASSERT_EQUAL_FATAL(log_count(&d, GATHERED, g), g);
		/* its ring stopped and restarted while moved */
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fe, 1, &base), 0);
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_restart(fe, 1, base), 0);
		qd1_rw(fe, 8, 200 + conn);
		CU_ASSERT_EQUAL(log_count(&d, SPREAD, s), s); /* still moved */
		/* the memory table again while moved */
		CU_ASSERT_EQUAL_FATAL(vqfe_set_mem(fe), 0);
		qd1_rw(fe, 8, 300 + conn);
		/* load: back on its thread, then moved again */
		qd32_rw(fe, 400 + conn);
		s++;
		CU_ASSERT_EQUAL_FATAL(log_count(&d, SPREAD, s), s);
		qd32_rw(fe, 500 + conn);
		qd1_rw(fe, 32, 600 + conn);
		g++;
		CU_ASSERT_EQUAL_FATAL(log_count(&d, GATHERED, g), g);
		/* the connection goes (a reset) with it moved: the next one starts so */
		vqfe_close(fe);
		CU_ASSERT_FATAL(itest_alive(&d));
	}
	{
		CONNECT(fe, d, &o);
		qd32_rw(fe, 700);
		s++;
		CU_ASSERT_EQUAL(log_count(&d, SPREAD, s), s);
		qd1_rw(fe, 64, 800);
		vqfe_close(fe);
	}
	/* no request ended on a thread its queue had left (req_push) */
	CU_ASSERT_EQUAL(log_count(&d, "a request ended on a thread that does not serve", 0), 0);
	STOP(d);
}

/*
 * A ring stop, SET_MEM_TABLE, a disconnect, SET_VRING_ENABLE 0 (enabled again
 * after the move) and SET_VRING_ENABLE 0 then 1 (both before the move: the
 * kick watch made anew on the draining thread, the ring's start kick
 * refused there) exactly while queue 1's I/O
 * thread drains to hand it over (--io-threads-consolidate): the drain is held
 * open 1 s (VQCOWD_TEST_CONS_HOLD, a test seam) after the 8th QD1 write
 * popped in a row started it (VQCOWD_TEST_CONS_RUN=8); 4 more writes go into
 * the ring meanwhile (the thread pops none while draining), then the event.
 * The queue must still move once, no request may be lost (the 4 complete
 * once the ring runs again: on the main thread, after the move; with the
 * connection gone they go with it), none completed twice (vqfe: a used id
 * not in flight is -EPROTO; the used index counts each request once), none
 * may end on a thread its queue left (req_push's log line), and the queue is
 * served afterwards: QD1 (on the main thread), QD32 (back on its thread),
 * every block read back. A fresh daemon per event.
 */
enum drain_event {
	DRAIN_RING_STOP,
	DRAIN_MEM_TABLE,
	DRAIN_DISCONNECT,
	DRAIN_DISABLE,
	DRAIN_REENABLE
};

static void drain_case(enum drain_event ev)
{
	static const char *const names[] = {"ring stop", "SET_MEM_TABLE", "disconnect",
					    "SET_VRING_ENABLE 0", "SET_VRING_ENABLE 0 and 1"};
	enum { LOW = 8, MORE = 4, LEN = 4096 };
	static uint8_t w[LOW + MORE][LEN];
	uint8_t r[LEN];
	struct vqfe_req req[MORE];
	struct vqfe_opts o;
	uint16_t used0;

	fprintf(stderr, "consolidate_drain: %s while the I/O thread drains\n", names[ev]);
	setenv("VQCOWD_TEST_CONS_RUN", "8", 1);
	setenv("VQCOWD_TEST_CONS_HOLD", "1000", 1);
	START(
	    d, .img_size = 4 * MiB, .num_queues = 2,
	    .extra = {"--io-threads", "2", "--io-threads-consolidate=on", "--log-level", "debug"});
	unsetenv("VQCOWD_TEST_CONS_RUN");
	unsetenv("VQCOWD_TEST_CONS_HOLD");
	itest_fe_opts(&o);
	o.num_queues = 2;
	o.slots = 40;
	CONNECT(fe, d, &o);
	/* LOW QD1 writes on queue 1: the LOW-th popped starts the drain */
	for (unsigned i = 0; i < LOW; i++) {
		itest_fill(w[i], LEN, 7000 + ev * 100 + i);
		CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, 1, (512ull + i) * LEN, w[i], LEN), 0);
	}
	CU_ASSERT_EQUAL_FATAL(log_count(&d, "its drain held open", 1), 1);
	CU_ASSERT_EQUAL(log_count(&d, GATHERED, 0), 0); /* not moved yet */
	/* requests that arrive while it drains: not popped by it */
	used0 = le16toh(vqfe_vq_used(vqfe_vq(fe, 1))->idx);
	CU_ASSERT_EQUAL(used0, LOW);
	for (unsigned i = 0; i < MORE; i++) {
		itest_fill(w[LOW + i], LEN, 7000 + ev * 100 + LOW + i);
		req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
					   .sector = (512ull + LOW + i) * LEN / 512,
					   .buf = w[LOW + i],
					   .len = LEN};
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 1, &req[i]), 0);
	}
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), true), 0);
	usleep(20000);
	CU_ASSERT_EQUAL(le16toh(vqfe_vq_used(vqfe_vq(fe, 1))->idx), used0);
	if (ev == DRAIN_RING_STOP) {
		uint32_t base = 0;

		CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fe, 1, &base), 0);
		/* the ring stopped where the thread stopped popping */
		CU_ASSERT_EQUAL(base, LOW);
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 0), 0); /* still held */
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_restart(fe, 1, base), 0);
	} else if (ev == DRAIN_DISABLE) {
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_enable(fe, 1, false), 0);
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 0), 0); /* still held */
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_enable(fe, 1, true), 0);
	} else if (ev == DRAIN_REENABLE) {
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_enable(fe, 1, false), 0);
		CU_ASSERT_EQUAL_FATAL(vqfe_vq_enable(fe, 1, true), 0);
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 0), 0); /* still held */
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
	} else if (ev == DRAIN_MEM_TABLE) {
		CU_ASSERT_EQUAL_FATAL(vqfe_set_mem(fe), 0);
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
	} else {
		vqfe_close(fe);
		fe = NULL;
		CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
		CU_ASSERT_FATAL(itest_alive(&d));
		CONNECT(fe2, d, &o);
		fe = fe2;
		/* those 4 went with the connection: written now */
		for (unsigned i = 0; i < MORE; i++)
			CU_ASSERT_EQUAL(
			    vqfe_write(fe, 1, (512ull + LOW + i) * LEN, w[LOW + i], LEN), 0);
		used0 = 0;
	}
	if (ev != DRAIN_DISCONNECT) {
		/* the 4 run once the queue is served again, each once */
		CU_ASSERT_EQUAL_FATAL(vqfe_drain(fe, 1), 0);
		for (unsigned i = 0; i < MORE; i++)
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
		CU_ASSERT_EQUAL(le16toh(vqfe_vq_used(vqfe_vq(fe, 1))->idx), (uint16_t)(LOW + MORE));
	}
	/* every block, through both queues */
	for (unsigned i = 0; i < LOW + MORE; i++) {
		for (unsigned q = 0; q < 2; q++) {
			CU_ASSERT_EQUAL_FATAL(vqfe_read(fe, q, (512ull + i) * LEN, r, LEN), 0);
			CU_ASSERT(memcmp(w[i], r, LEN) == 0);
		}
	}
	/* served afterwards: moved once, on the main thread at QD1, back under load */
	qd1_rw(fe, 4, 7500 + ev);
	CU_ASSERT_EQUAL(log_count(&d, GATHERED, 1), 1);
	qd32_rw(fe, 7600 + ev);
	CU_ASSERT_EQUAL(log_count(&d, SPREAD, 1), 1);
	qd1_rw(fe, 2, 7700 + ev); /* (fewer than 8 on queue 1: no new drain) */
	vqfe_close(fe);
	CU_ASSERT_EQUAL(log_count(&d, "a request ended on a thread that does not serve", 0), 0);
	STOP(d);
}

static void t_consolidate_drain(void)
{
	drain_case(DRAIN_RING_STOP);
	drain_case(DRAIN_MEM_TABLE);
	drain_case(DRAIN_DISCONNECT);
	drain_case(DRAIN_DISABLE);
	drain_case(DRAIN_REENABLE);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("requests", NULL, NULL, NULL, itest_teardown);

	CU_add_test(s, "config", t_config);
	CU_add_test(s, "config_lbs4096", t_config_lbs4096);
	CU_add_test(s, "rw_file", t_rw_file);
	CU_add_test(s, "layouts", t_layouts);
	CU_add_test(s, "layouts_plain_ring", t_layouts_no_event_idx_no_indirect_negotiated);
	CU_add_test(s, "regions", t_regions);
	CU_add_test(s, "depth_event_idx", t_depth_event_idx);
	CU_add_test(s, "depth_no_event_idx", t_depth_no_event_idx);
	CU_add_test(s, "multiqueue", t_multiqueue);
	CU_add_test(s, "index_wrap", t_index_wrap);
	CU_add_test(s, "suppressed_no_interrupt", t_suppressed_no_interrupt);
	CU_add_test(s, "suppressed_event_idx", t_suppressed_event_idx);
	CU_add_test(s, "big_request", t_big_request);
	CU_add_test(s, "status_rw", t_status_rw);
	CU_add_test(s, "read_only", t_read_only);
	CU_add_test(s, "discard_write_zeroes", t_discard_write_zeroes);
	CU_add_test(s, "unknown_type", t_unknown_type);
	CU_add_test(s, "get_id_flush", t_get_id_flush);
	CU_add_test(s, "wce", t_wce);
	CU_add_test(s, "malformed_requests", t_malformed_requests);
	tu_add_test(s, "malformed_beside_thread", t_malformed_beside_thread,
		    itest_vqcowd_only("the main thread serving a queue beside an I/O thread"));
	tu_add_test(s, "consolidate", t_consolidate,
		    itest_vqcowd_only("vqcowd's --io-threads-consolidate"));
	tu_add_test(s, "consolidate_drain", t_consolidate_drain,
		    itest_vqcowd_only("vqcowd's --io-threads-consolidate"));
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.requests", add_suites);
}
