/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of vhost/ split virtqueues: rings built by the test in memfd
 * "guest memory", set up through vhost_test.h (the code paths SET_MEM_TABLE
 * and SET_VRING_* use), then driven with vq_pop/vq_push/vq_notify.
 *
 * Guest memory: one 4 MiB memfd mapped by the test; the device sees it as two
 * adjacent regions (gpa 0..2M at file offset 0, gpa 2M..4M at offset 2M), so
 * buffers can span regions. Front-end virtual addresses are UVA + gpa.
 */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <linux/virtio_ring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost.h"
#include "vhost_test.h"
#include "testutil.h"

#define MEM_SIZE   (4u << 20)
#define REGION     (2u << 20)
#define UVA        0x7f0000000000ull
#define NUM        16
#define DESC_GPA   0x1000
#define AVAIL_GPA  0x2000
#define USED_GPA   0x3000
#define DATA_GPA   0x10000
#define EVENT_IDX  (1ull << VIRTIO_RING_F_EVENT_IDX)
#define INDIRECT   (1ull << VIRTIO_RING_F_INDIRECT_DESC)
#define PROTO_FEAT (1ull << 30)

struct relem {
	struct vq_elem elem;
	char tag[40];
};

static uint8_t *g_mem; /* the test's ("guest's") view */
static int g_memfd = -1;
static struct vhost_dev *g_dev;
static struct vhost_vq *g_vq;
static int g_kicks;
static int g_callfd = -1; /* our dup of the call eventfd */
static uint16_t g_avail;  /* driver's avail idx */
static int g_fds_before;

static int t_watch(void *opaque, int fd, vhost_watch_cb *cb, void *arg)
{
	return 0;
}

static void t_unwatch(void *opaque, int fd)
{
}

static void t_kick(void *opaque, struct vhost_vq *vq)
{
	g_kicks++;
}

static const struct vhost_dev_ops g_ops = {
    .features = 0,
    .num_queues = 2,
    .max_queue_size = 256,
    .elem_size = sizeof(struct relem),
    .watch = t_watch,
    .unwatch = t_unwatch,
    .queue_kick = t_kick,
};

static struct vring_desc *desc_tab(void)
{
	return (struct vring_desc *)(g_mem + DESC_GPA);
}

static struct vring_avail *avail(void)
{
	return (struct vring_avail *)(g_mem + AVAIL_GPA);
}

static struct vring_used *used(void)
{
	return (struct vring_used *)(g_mem + USED_GPA);
}

static void set_desc(struct vring_desc *t, unsigned i, uint64_t addr, uint32_t len, uint16_t flags,
		     uint16_t next)
{
	t[i].addr = htole64(addr);
	t[i].len = htole32(len);
	t[i].flags = htole16(flags);
	t[i].next = htole16(next);
}

static void post(uint16_t head)
{
	avail()->ring[g_avail % NUM] = htole16(head);
	g_avail++;
	__atomic_store_n(&avail()->idx, htole16(g_avail), __ATOMIC_RELEASE);
}

/* Fresh device + ring 0 with @features; started. */
static void setup(uint64_t features)
{
	int kick, call;

	g_fds_before = tu_count_fds();
	kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	call = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	memset(g_mem, 0, MEM_SIZE);
	g_avail = 0;
	g_kicks = 0;
	g_dev = vhost_test_dev_new(&g_ops, NULL);
	CU_ASSERT_FATAL(g_dev != NULL);
	CU_ASSERT_EQUAL(vhost_test_set_features(g_dev, features | (1ull << 32)), 0);
	CU_ASSERT_EQUAL(vhost_test_add_region(g_dev, dup(g_memfd), 0, REGION, UVA, 0), 0);
	CU_ASSERT_EQUAL(
	    vhost_test_add_region(g_dev, dup(g_memfd), REGION, REGION, UVA + REGION, REGION), 0);
	CU_ASSERT_EQUAL(vhost_test_vring_setup(g_dev, 0, NUM, UVA + DESC_GPA, UVA + AVAIL_GPA,
					       UVA + USED_GPA, 0),
			0);
	g_callfd = dup(call);
	CU_ASSERT_EQUAL(vhost_test_vring_start(g_dev, 0, kick, call), 0);
	g_vq = vhost_dev_vq(g_dev, 0);
	CU_ASSERT_FATAL(g_vq != NULL);
	CU_ASSERT_TRUE(vq_is_running(g_vq));
	CU_ASSERT_EQUAL(g_kicks, 1); /* started: the glue is told to look */
}

static void teardown(void)
{
	vhost_test_dev_free(g_dev);
	g_dev = NULL;
	close(g_callfd);
	g_callfd = -1;
	CU_ASSERT_EQUAL(tu_count_fds(), g_fds_before);
}

static uint64_t calls(void)
{
	uint64_t v = 0;

	if (read(g_callfd, &v, sizeof(v)) != sizeof(v))
		return 0;
	return v;
}

/* Expect the next pop to break the ring; @inflight elements stay out. */
static void expect_broken_n(unsigned inflight)
{
	struct vq_elem *e = NULL;
	int ret = vq_pop(g_vq, &e);

	CU_ASSERT_TRUE(ret < 0 && ret != -EAGAIN);
	CU_ASSERT_PTR_NULL(e);
	CU_ASSERT_TRUE(vhost_dev_is_broken(g_dev));
	CU_ASSERT_EQUAL(vq_inflight(g_vq), inflight);
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), -EIO);
}

static void expect_broken(void)
{
	expect_broken_n(0);
}

static void test_basic_chain(void)
{
	struct vq_elem *e;

	setup(0);
	memcpy(g_mem + DATA_GPA, "request-header", 14);
	set_desc(desc_tab(), 3, DATA_GPA, 14, VRING_DESC_F_NEXT, 5);
	set_desc(desc_tab(), 5, DATA_GPA + 0x1000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 7);
	set_desc(desc_tab(), 7, DATA_GPA + 0x2000, 1, VRING_DESC_F_WRITE, 0);
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), -EAGAIN);
	post(3);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->head, 3);
	CU_ASSERT_EQUAL(e->out_num, 1);
	CU_ASSERT_EQUAL(e->in_num, 2);
	CU_ASSERT_PTR_EQUAL(e->vq, g_vq);
	CU_ASSERT_EQUAL(e->iov[0].iov_len, 14);
	CU_ASSERT_EQUAL(memcmp(e->iov[0].iov_base, "request-header", 14), 0);
	CU_ASSERT_EQUAL(e->iov[1].iov_len, 512);
	CU_ASSERT_EQUAL(e->iov[2].iov_len, 1);
	/* Zero copy: writing through the iovec lands in guest memory. */
	*(uint8_t *)e->iov[2].iov_base = 0x5a;
	CU_ASSERT_EQUAL(g_mem[DATA_GPA + 0x2000], 0x5a);
	CU_ASSERT_EQUAL(vq_inflight(g_vq), 1);
	CU_ASSERT_EQUAL(vhost_dev_inflight(g_dev), 1);
	/* The element lives in its preallocated slot; the caller's part follows it. */
	strcpy(((struct relem *)e)->tag, "mine");
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), -EAGAIN);

	vq_push(g_vq, e, 513);
	CU_ASSERT_EQUAL(le16toh(used()->idx), 1);
	CU_ASSERT_EQUAL(le32toh(used()->ring[0].id), 3);
	CU_ASSERT_EQUAL(le32toh(used()->ring[0].len), 513);
	CU_ASSERT_EQUAL(vq_inflight(g_vq), 0);
	/* The same head may be reused once pushed. */
	post(3);
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	CU_ASSERT_EQUAL(le16toh(used()->idx), 2);
	/* A stopped ring hands out nothing and reports last_avail. */
	CU_ASSERT_EQUAL(vhost_test_vring_stop(g_dev, 0), 2);
	post(3);
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), -EAGAIN);
	CU_ASSERT_FALSE(vhost_dev_is_broken(g_dev));
	teardown();
}

static void test_loop(void)
{
	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 1);
	set_desc(desc_tab(), 1, DATA_GPA, 16, VRING_DESC_F_NEXT, 2);
	set_desc(desc_tab(), 2, DATA_GPA, 16, VRING_DESC_F_NEXT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_self_loop(void)
{
	setup(0);
	set_desc(desc_tab(), 4, DATA_GPA, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 4);
	post(4);
	expect_broken();
	teardown();
}

static void test_full_length_chain_ok(void)
{
	struct vq_elem *e;

	/* A chain using every descriptor (NUM) is legal; one more would loop. */
	setup(0);
	for (unsigned i = 0; i < NUM; i++)
		set_desc(desc_tab(), i, DATA_GPA + i * 64, 64, i + 1 < NUM ? VRING_DESC_F_NEXT : 0,
			 (uint16_t)(i + 1));
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->out_num, NUM);
	vq_push(g_vq, e, 0);
	teardown();
}

static void test_out_of_range(void)
{
	setup(0);
	set_desc(desc_tab(), 0, MEM_SIZE, 16, 0, 0);
	post(0);
	expect_broken();
	teardown();

	/* Starts inside, runs past the end of guest memory. */
	setup(0);
	set_desc(desc_tab(), 0, MEM_SIZE - 8, 16, 0, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_overflow(void)
{
	setup(0);
	set_desc(desc_tab(), 0, UINT64_MAX - 10, 100, 0, 0);
	post(0);
	expect_broken();
	teardown();

	setup(INDIRECT);
	set_desc(desc_tab(), 0, UINT64_MAX - 15, 32, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_bad_head(void)
{
	setup(0);
	post(NUM);
	expect_broken();
	teardown();
}

static void test_bad_next(void)
{
	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, VRING_DESC_F_NEXT, NUM);
	post(0);
	expect_broken();
	teardown();
}

static void test_avail_jump(void)
{
	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	g_avail = NUM + 1;
	avail()->idx = htole16(g_avail);
	expect_broken();
	teardown();
}

static void test_avail_full_ok(void)
{
	struct vq_elem *e[NUM];

	/* Exactly NUM buffers outstanding is fine. */
	setup(0);
	for (unsigned i = 0; i < NUM; i++) {
		set_desc(desc_tab(), i, DATA_GPA + i * 16, 16, 0, 0);
		post((uint16_t)i);
	}
	for (unsigned i = 0; i < NUM; i++)
		CU_ASSERT_EQUAL(vq_pop(g_vq, &e[i]), 0);
	CU_ASSERT_EQUAL(vq_inflight(g_vq), NUM);
	/* Completion out of order. */
	for (unsigned i = NUM; i-- > 0;)
		vq_push(g_vq, e[i], 0);
	CU_ASSERT_EQUAL(le16toh(used()->idx), NUM);
	CU_ASSERT_EQUAL(le32toh(used()->ring[0].id), NUM - 1);
	CU_ASSERT_EQUAL(vq_inflight(g_vq), 0);
	teardown();
}

static void test_duplicate_head(void)
{
	struct vq_elem *e;

	setup(0);
	set_desc(desc_tab(), 2, DATA_GPA, 16, 0, 0);
	post(2);
	post(2);
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), 0);
	expect_broken_n(1);
	/* Pushing the element of a broken connection is still safe. */
	vq_push(g_vq, e, 0);
	CU_ASSERT_EQUAL(vq_inflight(g_vq), 0);
	teardown();
}

static void test_read_after_write(void)
{
	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
	set_desc(desc_tab(), 1, DATA_GPA, 16, 0, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect(void)
{
	struct vring_desc *ind = (struct vring_desc *)(g_mem + 0x8000);
	struct vq_elem *e;

	setup(INDIRECT);
	set_desc(ind, 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 2);
	set_desc(ind, 2, DATA_GPA + 0x100, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
	set_desc(ind, 1, DATA_GPA + 0x2000, 1, VRING_DESC_F_WRITE, 0);
	/* The WRITE flag on the indirect descriptor itself is ignored. */
	set_desc(desc_tab(), 6, 0x8000, 3 * 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE, 0);
	post(6);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->head, 6);
	CU_ASSERT_EQUAL(e->out_num, 1);
	CU_ASSERT_EQUAL(e->in_num, 2);
	CU_ASSERT_EQUAL(e->iov[1].iov_len, 4096);
	vq_push(g_vq, e, 4097);
	CU_ASSERT_EQUAL(le32toh(used()->ring[0].id), 6);
	teardown();
}

/* The spec asks no alignment of an indirect table: one at an odd address works. */
static void test_indirect_misaligned(void)
{
	struct vring_desc ind[2];
	struct vq_elem *e;

	setup(INDIRECT);
	memcpy(g_mem + DATA_GPA, "misaligned-table", 16);
	set_desc(ind, 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 1);
	set_desc(ind, 1, DATA_GPA + 0x100, 512, VRING_DESC_F_WRITE, 0);
	memcpy(g_mem + 0x8001, ind, sizeof(ind));
	set_desc(desc_tab(), 2, 0x8001, 2 * 16, VRING_DESC_F_INDIRECT, 0);
	post(2);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->out_num, 1);
	CU_ASSERT_EQUAL(e->in_num, 1);
	CU_ASSERT_EQUAL(e->iov[0].iov_len, 16);
	CU_ASSERT_EQUAL(memcmp(e->iov[0].iov_base, "misaligned-table", 16), 0);
	CU_ASSERT_EQUAL(e->iov[1].iov_len, 512);
	vq_push(g_vq, e, 513);
	CU_ASSERT_FALSE(vhost_dev_is_broken(g_dev));
	teardown();
}

static void test_indirect_without_feature(void)
{
	setup(0);
	set_desc((struct vring_desc *)(g_mem + 0x8000), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 0, 0x8000, 16, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect_nested(void)
{
	struct vring_desc *ind = (struct vring_desc *)(g_mem + 0x8000);

	setup(INDIRECT);
	set_desc(ind, 0, 0x9000, 16, VRING_DESC_F_INDIRECT, 0);
	set_desc((struct vring_desc *)(g_mem + 0x9000), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 0, 0x8000, 16, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect_bad_len(void)
{
	static const uint32_t lens[] = {0, 8, 24, 16 * 1025};

	for (unsigned i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		setup(INDIRECT);
		set_desc((struct vring_desc *)(g_mem + 0x8000), 0, DATA_GPA, 16, 0, 0);
		set_desc(desc_tab(), 0, 0x8000, lens[i], VRING_DESC_F_INDIRECT, 0);
		post(0);
		expect_broken();
		teardown();
	}
}

static void test_indirect_with_next(void)
{
	setup(INDIRECT);
	set_desc((struct vring_desc *)(g_mem + 0x8000), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 0, 0x8000, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
	set_desc(desc_tab(), 1, DATA_GPA, 16, 0, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect_in_chain(void)
{
	setup(INDIRECT);
	set_desc((struct vring_desc *)(g_mem + 0x8000), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 1);
	set_desc(desc_tab(), 1, 0x8000, 16, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect_loop_and_next(void)
{
	struct vring_desc *ind = (struct vring_desc *)(g_mem + 0x8000);

	setup(INDIRECT);
	memcpy(g_mem + DATA_GPA, "misaligned-table", 16);
	set_desc(ind, 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 1);
	set_desc(ind, 1, DATA_GPA, 16, VRING_DESC_F_NEXT, 0);
	set_desc(desc_tab(), 0, 0x8000, 32, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();

	setup(INDIRECT);
	set_desc(ind, 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 2); /* table has 2 entries */
	set_desc(desc_tab(), 0, 0x8000, 32, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();

	/* Indirect table outside guest memory. */
	setup(INDIRECT);
	set_desc(desc_tab(), 0, MEM_SIZE - 16, 32, VRING_DESC_F_INDIRECT, 0);
	post(0);
	expect_broken();
	teardown();
}

static void test_indirect_max(void)
{
	struct vring_desc *ind = (struct vring_desc *)(g_mem + 0x20000);
	struct vq_elem *e;

	/* VQ_MAX_IOV descriptors in one indirect table: the largest legal chain. */
	setup(INDIRECT);
	for (unsigned i = 0; i < VQ_MAX_IOV; i++)
		set_desc(ind, i, DATA_GPA + i, 1, i + 1 < VQ_MAX_IOV ? VRING_DESC_F_NEXT : 0,
			 (uint16_t)(i + 1));
	set_desc(desc_tab(), 0, 0x20000, 16 * VQ_MAX_IOV, VRING_DESC_F_INDIRECT, 0);
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->out_num, VQ_MAX_IOV);
	vq_push(g_vq, e, 0);
	teardown();
}

static void test_multi_region(void)
{
	struct vring_desc *ind;
	struct vq_elem *e;

	setup(INDIRECT);
	for (unsigned i = 0; i < 200; i++)
		g_mem[REGION - 100 + i] = (uint8_t)i;
	set_desc(desc_tab(), 0, REGION - 100, 200, 0, 0);
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL_FATAL(e->out_num, 2);
	CU_ASSERT_EQUAL(e->iov[0].iov_len, 100);
	CU_ASSERT_EQUAL(e->iov[1].iov_len, 100);
	CU_ASSERT_EQUAL(((uint8_t *)e->iov[0].iov_base)[99], 99);
	CU_ASSERT_EQUAL(((uint8_t *)e->iov[1].iov_base)[0], 100);
	CU_ASSERT_EQUAL(((uint8_t *)e->iov[1].iov_base)[99], 199);
	vq_push(g_vq, e, 0);

	/* An indirect table that itself straddles the two regions. */
	ind = (struct vring_desc *)(g_mem + REGION - 16);
	set_desc(ind, 0, DATA_GPA, 10, VRING_DESC_F_NEXT, 1);
	set_desc(ind, 1, DATA_GPA + 0x100, 20, VRING_DESC_F_WRITE, 0);
	set_desc(desc_tab(), 1, REGION - 16, 32, VRING_DESC_F_INDIRECT, 0);
	post(1);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->out_num, 1);
	CU_ASSERT_EQUAL(e->in_num, 1);
	CU_ASSERT_EQUAL(e->iov[1].iov_len, 20);
	vq_push(g_vq, e, 20);
	CU_ASSERT_FALSE(vhost_dev_is_broken(g_dev));
	teardown();
}

static void test_zero_length_desc(void)
{
	struct vq_elem *e;

	/* A zero-length buffer maps to nothing (its address is never used). */
	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, VRING_DESC_F_NEXT, 1);
	set_desc(desc_tab(), 1, UINT64_MAX, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
	set_desc(desc_tab(), 2, DATA_GPA, 1, VRING_DESC_F_WRITE, 0);
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	CU_ASSERT_EQUAL(e->out_num, 1);
	CU_ASSERT_EQUAL(e->in_num, 1);
	vq_push(g_vq, e, 1);
	teardown();
}

static void test_bad_ring_setup(void)
{
	struct vhost_dev *dev;
	int before = tu_count_fds();

	dev = vhost_test_dev_new(&g_ops, NULL);
	CU_ASSERT_FATAL(dev != NULL);
	CU_ASSERT_EQUAL(vhost_test_add_region(dev, dup(g_memfd), 0, REGION, UVA, 0), 0);
	/* Rings must lie in one region, be aligned, and sizes be powers of 2. */
	CU_ASSERT_NOT_EQUAL(vhost_test_vring_setup(dev, 0, NUM, UVA + REGION - 16, UVA + AVAIL_GPA,
						   UVA + USED_GPA, 0),
			    0);
	CU_ASSERT_NOT_EQUAL(vhost_test_vring_setup(dev, 0, NUM, UVA + DESC_GPA + 8, UVA + AVAIL_GPA,
						   UVA + USED_GPA, 0),
			    0);
	CU_ASSERT_NOT_EQUAL(
	    vhost_test_vring_setup(dev, 0, 12, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA, 0),
	    0);
	CU_ASSERT_NOT_EQUAL(
	    vhost_test_vring_setup(dev, 0, 512, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA, 0),
	    0);
	/* Kick before the ring maps: refused, fd closed. */
	CU_ASSERT_NOT_EQUAL(vhost_test_vring_start(dev, 0, eventfd(0, 0), -1), 0);
	/* Overlapping, empty, overflowing and short-file regions are refused. */
	CU_ASSERT_NOT_EQUAL(vhost_test_add_region(dev, dup(g_memfd), 4096, 4096, UVA, 0), 0);
	CU_ASSERT_NOT_EQUAL(vhost_test_add_region(dev, dup(g_memfd), REGION, 0, UVA, 0), 0);
	CU_ASSERT_NOT_EQUAL(
	    vhost_test_add_region(dev, dup(g_memfd), UINT64_MAX - 4095, 8192, UVA, 0), 0);
	CU_ASSERT_NOT_EQUAL(
	    vhost_test_add_region(dev, dup(g_memfd), REGION, MEM_SIZE, UVA + REGION, REGION), 0);
	CU_ASSERT_NOT_EQUAL(vhost_test_add_region(dev, eventfd(0, 0), REGION, 4096, UVA, 0), 0);
	vhost_test_dev_free(dev);
	CU_ASSERT_EQUAL(tu_count_fds(), before);
}

static void test_event_idx_notify(void)
{
	uint16_t *used_event, *avail_event;
	struct vq_elem *e;

	setup(EVENT_IDX);
	used_event = &avail()->ring[NUM];
	avail_event = (uint16_t *)&used()->ring[NUM];
	for (unsigned i = 0; i < 4; i++)
		set_desc(desc_tab(), i, DATA_GPA, 16, VRING_DESC_F_WRITE, 0);

	/* Nothing pushed: no signal. */
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 0);

	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	/* The device asks to be kicked for the next buffer. */
	CU_ASSERT_EQUAL(le16toh(*avail_event), 1);
	vq_push(g_vq, e, 1);
	*used_event = htole16(0);
	vq_notify(g_vq); /* first notification after start: always */
	CU_ASSERT_EQUAL(calls(), 1);
	vq_notify(g_vq); /* nothing new */
	CU_ASSERT_EQUAL(calls(), 0);

	/* used idx goes 1 -> 2; driver wants an interrupt only after entry 5. */
	post(1);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 1);
	*used_event = htole16(5);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 0);

	/* used_event = 2: crossing from 2 to 3 is the event. */
	post(2);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 1);
	*used_event = htole16(2);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 1);

	/* Two pushes in one batch (3 -> 5) with used_event 3: crossed. */
	post(0);
	post(1);
	{
		struct vq_elem *a, *b;

		CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &a), 0);
		CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &b), 0);
		vq_push(g_vq, a, 1);
		vq_push(g_vq, b, 1);
	}
	*used_event = htole16(3);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 1);
	/* NO_INTERRUPT is ignored with EVENT_IDX: used_event rules. */
	avail()->flags = htole16(VRING_AVAIL_F_NO_INTERRUPT);
	post(2);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 1);
	*used_event = htole16(5);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 1);
	/* The counts of the ring's "vring 0: ... calls" line: 6 requests, 5
	 * decisions (the notifies with nothing pushed are none), 4 calls. */
	{
		uint64_t c[5];

		vhost_test_vring_counts(g_dev, 0, c);
		CU_ASSERT_EQUAL(c[0], 6);
		CU_ASSERT_EQUAL(c[3], 5);
		CU_ASSERT_EQUAL(c[4], 4);
	}
	teardown();
}

static void test_event_idx_suppress_kicks(void)
{
	uint16_t *avail_event;
	struct vq_elem *e;

	setup(EVENT_IDX);
	avail_event = (uint16_t *)&used()->ring[NUM];
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 1, DATA_GPA, 16, 0, 0);
	vq_disable_notify(g_vq);
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	/* While disabled, avail_event does not move. */
	CU_ASSERT_EQUAL(le16toh(*avail_event), 0);
	vq_push(g_vq, e, 0);
	CU_ASSERT_FALSE(vq_enable_notify(g_vq));
	CU_ASSERT_EQUAL(le16toh(*avail_event), 1);
	vq_disable_notify(g_vq);
	post(1);
	CU_ASSERT_TRUE(vq_enable_notify(g_vq)); /* arrived meanwhile: pop again */
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	teardown();
}

/* vq_avail_pending: a plain look at avail->idx that never moves avail_event. */
static void test_avail_pending(void)
{
	uint16_t *avail_event;
	struct vq_elem *e;

	setup(EVENT_IDX);
	avail_event = (uint16_t *)&used()->ring[NUM];
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	set_desc(desc_tab(), 1, DATA_GPA, 16, 0, 0);
	CU_ASSERT_FALSE(vq_avail_pending(g_vq));
	post(0);
	CU_ASSERT_TRUE(vq_avail_pending(g_vq));
	CU_ASSERT_EQUAL(le16toh(*avail_event), 0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	CU_ASSERT_FALSE(vq_avail_pending(g_vq));
	/* Popping until empty armed the kick at the next buffer... */
	CU_ASSERT_EQUAL(vq_pop(g_vq, &e), -EAGAIN);
	CU_ASSERT_EQUAL(le16toh(*avail_event), 1);
	/* ...and a pending check does not touch it. */
	post(1);
	CU_ASSERT_TRUE(vq_avail_pending(g_vq));
	CU_ASSERT_EQUAL(le16toh(*avail_event), 1);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	teardown();
	/* A ring that is not running has nothing pending. */
	setup(EVENT_IDX);
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	post(0);
	CU_ASSERT_TRUE(vq_avail_pending(g_vq));
	CU_ASSERT_EQUAL(vhost_test_vring_stop(g_dev, 0), 0);
	CU_ASSERT_FALSE(vq_avail_pending(g_vq));
	teardown();
}

static void test_no_interrupt(void)
{
	struct vq_elem *e;

	setup(0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	avail()->flags = htole16(VRING_AVAIL_F_NO_INTERRUPT);
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 0);
	avail()->flags = 0;
	post(0);
	CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
	vq_push(g_vq, e, 0);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 1);
	vq_notify(g_vq);
	CU_ASSERT_EQUAL(calls(), 0);

	/* Kick suppression without EVENT_IDX: VRING_USED_F_NO_NOTIFY. */
	vq_disable_notify(g_vq);
	CU_ASSERT_TRUE(le16toh(used()->flags) & VRING_USED_F_NO_NOTIFY);
	CU_ASSERT_FALSE(vq_enable_notify(g_vq));
	CU_ASSERT_FALSE(le16toh(used()->flags) & VRING_USED_F_NO_NOTIFY);
	teardown();
}

static void test_wraparound(void)
{
	struct vq_elem *e;

	/* Indexes are free-running u16: start near the wrap. */
	setup(0);
	vhost_test_vring_stop(g_dev, 0);
	CU_ASSERT_EQUAL(vhost_test_vring_setup(g_dev, 0, NUM, UVA + DESC_GPA, UVA + AVAIL_GPA,
					       UVA + USED_GPA, 65534),
			0);
	used()->idx = htole16(65534);
	g_avail = 65534;
	avail()->idx = htole16(g_avail);
	CU_ASSERT_EQUAL(vhost_test_vring_start(g_dev, 0, eventfd(0, EFD_NONBLOCK), -1), 0);
	set_desc(desc_tab(), 0, DATA_GPA, 16, 0, 0);
	for (unsigned i = 0; i < 4; i++) {
		post(0);
		CU_ASSERT_EQUAL_FATAL(vq_pop(g_vq, &e), 0);
		vq_push(g_vq, e, 7);
	}
	CU_ASSERT_EQUAL(le16toh(used()->idx), 2);
	CU_ASSERT_EQUAL(vhost_test_vring_stop(g_dev, 0), 2);
	CU_ASSERT_FALSE(vhost_dev_is_broken(g_dev));
	teardown();
}

/* ---- randomized hostile rings ---- */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
	return tu_xorshift64(&g_rng);
}

/* A guest address: mostly plausible, sometimes hostile. */
static uint64_t rnd_addr(void)
{
	switch (rnd() % 16) {
	case 0:
		return rnd();
	case 1:
		return MEM_SIZE - rnd() % 64;
	case 2:
	case 3:
		return REGION - rnd() % 64;
	default:
		return rnd() % MEM_SIZE;
	}
}

static uint32_t rnd_len(void)
{
	switch (rnd() % 16) {
	case 0:
		return (uint32_t)rnd();
	case 1:
		return 0;
	default:
		return (uint32_t)(rnd() % 8192);
	}
}

/* Random descriptors; @hostile in 0..3 raises the odds of invalid ones. */
static void rnd_descs(struct vring_desc *t, unsigned n, unsigned hostile)
{
	for (unsigned i = 0; i < n; i++) {
		uint16_t flags = VRING_DESC_F_NEXT;
		uint16_t next = (uint16_t)(i + 1);
		uint32_t len = rnd_len();
		uint64_t addr = rnd_addr();

		if (i + 1 == n || rnd() % 4 == 0)
			flags = 0;
		if (i >= n / 2)
			flags |= VRING_DESC_F_WRITE;
		if (rnd() % 8 < hostile)
			flags ^= (uint16_t)(1u << (rnd() % 3));
		if (rnd() % 8 < hostile)
			next = (uint16_t)(rnd() % (n + 2));
		if (rnd() % 16 < hostile) {
			flags = VRING_DESC_F_INDIRECT;
			len = (uint32_t)(16 * (1 + rnd() % 8));
			addr = 0x8000 + (rnd() % 64) * 16;
		}
		if (hostile == 0) {
			addr = DATA_GPA + rnd() % 0x1000;
			len = len % 4096 + 1;
		}
		set_desc(t, i, addr, len, flags, next);
	}
}

struct range {
	uintptr_t lo, hi;
};

/* Mappings of the guest memfd in this process (the test's and vhost's). */
static unsigned guest_maps(struct range *r, unsigned max)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	unsigned n = 0;

	if (!f)
		return 0;
	while (n < max && fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;

		if (strstr(line, "/memfd:guest") && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
			r[n].lo = lo;
			r[n].hi = hi;
			n++;
		}
	}
	fclose(f);
	return n;
}

static bool iov_in_guest(const struct iovec *v, const struct range *r, unsigned n)
{
	uintptr_t b = (uintptr_t)v->iov_base;

	for (unsigned i = 0; i < n; i++) {
		if (b >= r[i].lo && b < r[i].hi && v->iov_len <= r[i].hi - b)
			return true;
	}
	return false;
}

static void test_random_rings(void)
{
	struct range maps[8];
	unsigned popped = 0, broken = 0;

	for (unsigned iter = 0; iter < 150; iter++) {
		struct vq_elem *held[NUM];
		unsigned nheld = 0, nmaps;
		int ret;

		setup((rnd() % 2 ? INDIRECT : 0) | (rnd() % 2 ? EVENT_IDX : 0));
		nmaps = guest_maps(maps, 8);
		CU_ASSERT_EQUAL(nmaps, 3);
		unsigned hostile = (unsigned)(rnd() % 4);

		rnd_descs(desc_tab(), NUM, hostile);
		/* Indirect tables where random descriptors may point. */
		for (unsigned k = 0; k < 4; k++)
			rnd_descs((struct vring_desc *)(g_mem + 0x8000 + (rnd() % 64) * 16),
				  (unsigned)(1 + rnd() % 8), hostile);
		for (unsigned k = 0; k < 1 + rnd() % 6; k++)
			post((uint16_t)(rnd() % 16 >= hostile ? rnd() % NUM : rnd()));
		if (rnd() % 16 < hostile) {
			g_avail = (uint16_t)rnd();
			avail()->idx = htole16(g_avail);
		}
		while (nheld < NUM && (ret = vq_pop(g_vq, &held[nheld])) == 0) {
			struct vq_elem *e = held[nheld++];

			popped++;
			CU_ASSERT_TRUE(e->head < NUM);
			CU_ASSERT_TRUE(e->out_num + e->in_num <= VQ_MAX_IOV);
			for (unsigned i = 0; i < (unsigned)e->out_num + e->in_num; i++) {
				CU_ASSERT_TRUE(e->iov[i].iov_len > 0);
				CU_ASSERT_TRUE(iov_in_guest(&e->iov[i], maps, nmaps));
			}
		}
		if (vhost_dev_is_broken(g_dev))
			broken++;
		CU_ASSERT_EQUAL(vq_inflight(g_vq), nheld);
		while (nheld)
			vq_push(g_vq, held[--nheld], (uint32_t)rnd());
		CU_ASSERT_EQUAL(vhost_dev_inflight(g_dev), 0);
		teardown();
	}
	printf("(%u popped, %u broken) ", popped, broken);
	/* Both outcomes were exercised. */
	CU_ASSERT_TRUE(popped > 10);
	CU_ASSERT_TRUE(broken > 10);
}

int main(void)
{
	CU_pSuite s;
	int failed;

	g_memfd = memfd_create("guest", MFD_CLOEXEC);
	if (g_memfd < 0 || ftruncate(g_memfd, MEM_SIZE) < 0) {
		perror("memfd");
		return 1;
	}
	g_mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g_memfd, 0);
	if (g_mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("vhost_ring", NULL, NULL);
	CU_add_test(s, "basic chain, push, reuse, stop", test_basic_chain);
	CU_add_test(s, "descriptor loop", test_loop);
	CU_add_test(s, "self loop", test_self_loop);
	CU_add_test(s, "chain of queue size is legal", test_full_length_chain_ok);
	CU_add_test(s, "address out of range", test_out_of_range);
	CU_add_test(s, "address + length overflow", test_overflow);
	CU_add_test(s, "head index out of range", test_bad_head);
	CU_add_test(s, "next index out of range", test_bad_next);
	CU_add_test(s, "avail idx jumps", test_avail_jump);
	CU_add_test(s, "avail ring full, out-of-order push", test_avail_full_ok);
	CU_add_test(s, "duplicate head in flight", test_duplicate_head);
	CU_add_test(s, "readable after writable", test_read_after_write);
	CU_add_test(s, "indirect", test_indirect);
	CU_add_test(s, "indirect table at an odd address", test_indirect_misaligned);
	CU_add_test(s, "avail pending check", test_avail_pending);
	CU_add_test(s, "indirect without feature", test_indirect_without_feature);
	CU_add_test(s, "indirect inside indirect", test_indirect_nested);
	CU_add_test(s, "indirect bad lengths", test_indirect_bad_len);
	CU_add_test(s, "indirect with NEXT", test_indirect_with_next);
	CU_add_test(s, "indirect inside a chain", test_indirect_in_chain);
	CU_add_test(s, "indirect loop / next / range", test_indirect_loop_and_next);
	CU_add_test(s, "indirect of VQ_MAX_IOV entries", test_indirect_max);
	CU_add_test(s, "buffers spanning regions", test_multi_region);
	CU_add_test(s, "zero-length descriptor", test_zero_length_desc);
	CU_add_test(s, "bad ring / region setup", test_bad_ring_setup);
	CU_add_test(s, "EVENT_IDX notify decisions", test_event_idx_notify);
	CU_add_test(s, "EVENT_IDX kick suppression", test_event_idx_suppress_kicks);
	CU_add_test(s, "NO_INTERRUPT / NO_NOTIFY", test_no_interrupt);
	CU_add_test(s, "index wraparound", test_wraparound);
	CU_add_test(s, "randomized hostile rings", test_random_rings);
	failed = (int)tu_cunit_run();
	return failed ? 1 : 0;
}
