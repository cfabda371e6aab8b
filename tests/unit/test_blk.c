/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of blk/blk.c against a FAKE image: its ops vtable queues every
 * submitted img_io, and the test completes them on demand (with the data of
 * an in-memory disk, or with an injected error). Covers every row of the
 * status table, split headers, GET_ID, config space, WCE and writethrough
 * flushes, and used_len values.
 */
#include <CUnit/Basic.h>
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <linux/virtio_blk.h>

#include "blk.h"
#include "testutil.h"

#define DISK_SECTORS 2048 /* 1 MiB */
#define DISK_SIZE    (DISK_SECTORS * 512)
#define MAXQ         16

/* ---- fake image ---- */

struct fake_img {
	struct img img;
	uint8_t disk[DISK_SIZE];
	struct img_io *q[MAXQ];
	unsigned nq;
	unsigned ops[8]; /* submissions per IMG_OP_* */
	uint8_t log[32]; /* op order */
	unsigned nlog;
	bool in_submit;
	pthread_t submit_tid; /* the thread of the last submission */
};

static struct fake_img g_fake;

static void fake_submit(struct img *img, struct img_io *io)
{
	struct fake_img *f = (struct fake_img *)img;

	CU_ASSERT_FATAL(f->nq < MAXQ);
	CU_ASSERT(io->op >= IMG_OP_READ && io->op <= IMG_OP_WRITE_ZEROES);
	f->q[f->nq++] = io;
	f->submit_tid = pthread_self();
	f->ops[io->op]++;
	if (f->nlog < sizeof(f->log))
		f->log[f->nlog++] = io->op;
}

static void fake_close(struct img *img)
{
	(void)img;
}

static const struct img_ops fake_ops = {
    .format = "fake",
    .submit = fake_submit,
    .close = fake_close,
};

static void fake_reset(bool read_only)
{
	memset(&g_fake, 0, sizeof(g_fake));
	g_fake.img.ops = &fake_ops;
	g_fake.img.size = DISK_SIZE;
	g_fake.img.read_only = read_only;
	g_fake.img.align = 4096;
	g_fake.img.supports_discard = true;
	g_fake.img.supports_write_zeroes = true;
	g_fake.img.discard_granularity = 65536;
	g_fake.img.opt_io = 65536;
	for (unsigned i = 0; i < DISK_SIZE; i++)
		g_fake.disk[i] = (uint8_t)(i * 7 + (i >> 9));
}

/* Complete the oldest queued img_io: with @err if non-zero, else do the work. */
static void fake_complete_one(int err)
{
	struct img_io *io;

	CU_ASSERT_FATAL(g_fake.nq > 0);
	io = g_fake.q[0];
	memmove(&g_fake.q[0], &g_fake.q[1], (g_fake.nq - 1) * sizeof(g_fake.q[0]));
	g_fake.nq--;
	if (!err) {
		size_t done = 0;

		CU_ASSERT_FATAL(io->off + io->len <= DISK_SIZE || io->op == IMG_OP_FLUSH);
		switch (io->op) {
		case IMG_OP_READ:
		case IMG_OP_WRITE:
			for (unsigned i = 0; i < io->iovcnt; i++) {
				uint8_t *d = g_fake.disk + io->off + done;

				if (io->op == IMG_OP_READ)
					memcpy(io->iov[i].iov_base, d, io->iov[i].iov_len);
				else
					memcpy(d, io->iov[i].iov_base, io->iov[i].iov_len);
				done += io->iov[i].iov_len;
			}
			CU_ASSERT_EQUAL(done, io->len);
			break;
		case IMG_OP_DISCARD:
		case IMG_OP_WRITE_ZEROES:
			memset(g_fake.disk + io->off, 0, io->len);
			break;
		default:
			break;
		}
	}
	io->done(io, err);
}

static void fake_complete_all(void)
{
	for (int i = 0; i < 32 && g_fake.nq > 0; i++)
		fake_complete_one(0);
}

/* ---- requests ---- */

struct treq {
	struct blk_req req;
	struct iovec iov[8];
	int calls;
	uint32_t used;
};

static void tcomplete(struct blk_req *req, uint32_t used_len)
{
	struct treq *t = (struct treq *)req;

	CU_ASSERT_EQUAL(t->calls, 0);
	t->calls++;
	t->used = used_len;
}

static struct blk_hdr_buf {
	uint8_t hdr[16];
} g_hdr;

static uint8_t g_status;
static uint8_t g_buf[4][8192];

static void make_hdr(uint8_t *h, uint32_t type, uint64_t sector)
{
	uint32_t t = htole32(type), r = 0;
	uint64_t s = htole64(sector);

	memcpy(h, &t, 4);
	memcpy(h + 4, &r, 4);
	memcpy(h + 8, &s, 8);
}

/* Standard layout: [hdr] [out data...] | [in data...] [status]. */
static void treq_init(struct treq *t, uint32_t type, uint64_t sector)
{
	memset(t, 0, sizeof(*t));
	make_hdr(g_hdr.hdr, type, sector);
	t->iov[0].iov_base = g_hdr.hdr;
	t->iov[0].iov_len = 16;
	t->req.iov = t->iov;
	t->req.out_num = 1;
	t->req.in_num = 0;
	t->req.complete = tcomplete;
	g_status = 0xee;
}

static void add_out(struct treq *t, void *buf, size_t len)
{
	CU_ASSERT_FATAL(t->req.in_num == 0);
	t->iov[t->req.out_num].iov_base = buf;
	t->iov[t->req.out_num].iov_len = len;
	t->req.out_num++;
}

static void add_in(struct treq *t, void *buf, size_t len)
{
	unsigned i = t->req.out_num + t->req.in_num;

	t->iov[i].iov_base = buf;
	t->iov[i].iov_len = len;
	t->req.in_num++;
}

static void add_status(struct treq *t)
{
	add_in(t, &g_status, 1);
}

static struct blk_dev *dev_new(bool ro, uint32_t lbs, bool wce)
{
	struct blk_opts o = {
	    .serial = "vqcow-serial",
	    .logical_block_size = lbs,
	    .num_queues = 2,
	    .queue_size = 128,
	    .read_only = ro,
	    .writeback = wce,
	};
	struct blk_dev *dev = NULL;

	CU_ASSERT_EQUAL_FATAL(blk_dev_init(&dev, &g_fake.img, &o), 0);
	return dev;
}

static void seg_make(uint8_t *seg, uint64_t sector, uint32_t n, uint32_t flags)
{
	uint64_t s = htole64(sector);
	uint32_t nn = htole32(n), ff = htole32(flags);

	memcpy(seg, &s, 8);
	memcpy(seg + 8, &nn, 4);
	memcpy(seg + 12, &ff, 4);
}

/* Submit and expect synchronous completion with @status and @used. */
static void expect_now(struct blk_dev *dev, struct treq *t, uint8_t status, uint32_t used)
{
	unsigned nq = g_fake.nq;

	blk_req_submit(dev, &t->req);
	CU_ASSERT_EQUAL(t->calls, 1);
	CU_ASSERT_EQUAL(g_status, status);
	CU_ASSERT_EQUAL(t->used, used);
	CU_ASSERT_EQUAL(g_fake.nq, nq); /* no image I/O */
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
}

/* ---- tests ---- */

static void test_read_ok(void)
{
	struct treq t;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	treq_init(&t, VIRTIO_BLK_T_IN, 2);
	add_in(&t, g_buf[0], 512);
	add_in(&t, g_buf[1], 1024);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL(t.calls, 0); /* asynchronous */
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 1);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_READ);
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 1024);
	CU_ASSERT_EQUAL(g_fake.q[0]->len, 1536);
	CU_ASSERT_EQUAL(g_fake.q[0]->iovcnt, 2);
	fake_complete_all();
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1537);
	CU_ASSERT(memcmp(g_buf[0], g_fake.disk + 1024, 512) == 0);
	CU_ASSERT(memcmp(g_buf[1], g_fake.disk + 1536, 1024) == 0);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
	blk_dev_exit(dev);
}

/* ---- pause, swap and the write hook (external snapshots, block-commit) ---- */

static uint64_t g_hook_off[8], g_hook_len[8];
static unsigned g_hooks;

static void hook(void *priv, uint64_t off, uint64_t len)
{
	CU_ASSERT_PTR_EQUAL(priv, &g_hooks);
	if (g_hooks < 8) {
		g_hook_off[g_hooks] = off;
		g_hook_len[g_hooks] = len;
	}
	g_hooks++;
}

static void test_pause_swap_hook(void)
{
	struct treq a, b, r;
	struct blk_dev *dev;
	uint8_t hdr_a[16];

	fake_reset(false);
	dev = dev_new(false, 512, true);
	/* paused (twice): requests are held, not started, not counted */
	blk_dev_pause(dev);
	blk_dev_pause(dev);
	treq_init(&a, VIRTIO_BLK_T_OUT, 8);
	add_out(&a, g_buf[0], 4096);
	add_status(&a);
	blk_req_submit(dev, &a.req);
	/* a held request is parsed when it starts: each needs its own header */
	memcpy(hdr_a, g_hdr.hdr, sizeof(hdr_a));
	a.iov[0].iov_base = hdr_a;
	treq_init(&b, VIRTIO_BLK_T_OUT, 16);
	add_out(&b, g_buf[1], 1024);
	add_status(&b);
	blk_req_submit(dev, &b.req);
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
	CU_ASSERT_EQUAL(a.calls + b.calls, 0);
	blk_dev_resume(dev); /* pauses nest */
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	/* the image under the device changes while nothing is in flight */
	blk_dev_set_img(dev, &g_fake.img);
	CU_ASSERT_PTR_EQUAL(blk_dev_img(dev), &g_fake.img);
	blk_dev_set_write_hook(dev, hook, &g_hooks);
	g_hooks = 0;
	blk_dev_resume(dev); /* started in arrival order */
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 2);
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 8 * 512);
	CU_ASSERT_EQUAL(g_fake.q[1]->off, 16 * 512);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 2);
	/* the hook sees a write when it ended, before the guest does; a failed one too */
	fake_complete_one(0);
	CU_ASSERT_EQUAL(g_hooks, 1);
	CU_ASSERT_EQUAL(g_hook_off[0], 8 * 512);
	CU_ASSERT_EQUAL(g_hook_len[0], 4096);
	CU_ASSERT_EQUAL(a.calls, 1);
	fake_complete_one(-EIO);
	CU_ASSERT_EQUAL(g_hooks, 2);
	CU_ASSERT_EQUAL(g_hook_off[1], 16 * 512);
	CU_ASSERT_EQUAL(g_hook_len[1], 1024);
	CU_ASSERT_EQUAL(b.calls, 1);
	/* reads are not reported */
	treq_init(&r, VIRTIO_BLK_T_IN, 0);
	add_in(&r, g_buf[2], 512);
	add_status(&r);
	blk_req_submit(dev, &r.req);
	fake_complete_all();
	CU_ASSERT_EQUAL(r.calls, 1);
	CU_ASSERT_EQUAL(g_hooks, 2);
	/* resume without a pause is harmless; no hook: nothing called */
	blk_dev_resume(dev);
	blk_dev_set_write_hook(dev, NULL, NULL);
	treq_init(&a, VIRTIO_BLK_T_OUT, 8);
	add_out(&a, g_buf[0], 512);
	add_status(&a);
	blk_req_submit(dev, &a.req);
	CU_ASSERT_EQUAL(g_fake.nq, 1);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_hooks, 2);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
	blk_dev_exit(dev);
}

/*
 * A request held on another thread's loop (an I/O thread that popped it)
 * starts again on that thread when the device resumes, not on the caller's.
 */
struct xthread {
	struct io_loop *loop;
	struct blk_dev *dev;
	struct treq *t;
	struct io_cmd submit, quit;
	pthread_t tid;
	int ready; /* atomic */
};

static void xt_submit(struct io_cmd *cmd, int res)
{
	struct xthread *x = cmd->priv;

	(void)res;
	blk_req_submit(x->dev, &x->t->req); /* paused: held, on this loop */
	__atomic_store_n(&x->ready, 2, __ATOMIC_RELEASE);
}

static void xt_quit(struct io_cmd *cmd, int res)
{
	struct xthread *x = cmd->priv;

	(void)res;
	io_loop_stop(x->loop);
}

static void *xt_main(void *arg)
{
	struct xthread *x = arg;

	CU_ASSERT_EQUAL(io_loop_enable_remote(x->loop), 0);
	__atomic_store_n(&x->ready, 1, __ATOMIC_RELEASE);
	io_loop_run(x->loop);
	return NULL;
}

static void test_resume_on_thread(void)
{
	struct xthread x = {0};
	struct treq a;

	fake_reset(false);
	x.dev = dev_new(false, 512, true);
	x.t = &a;
	CU_ASSERT_EQUAL_FATAL(io_loop_init(&x.loop, 8), 0);
	CU_ASSERT_EQUAL_FATAL(pthread_create(&x.tid, NULL, xt_main, &x), 0);
	while (__atomic_load_n(&x.ready, __ATOMIC_ACQUIRE) < 1)
		;
	blk_dev_pause(x.dev);
	treq_init(&a, VIRTIO_BLK_T_OUT, 8);
	add_out(&a, g_buf[0], 4096);
	add_status(&a);
	x.submit.done = xt_submit;
	x.submit.priv = &x;
	io_post_remote(x.loop, &x.submit);
	while (__atomic_load_n(&x.ready, __ATOMIC_ACQUIRE) < 2)
		;
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	CU_ASSERT_EQUAL(blk_dev_inflight(x.dev), 0);
	blk_dev_resume(x.dev); /* from this thread: posted to the holder's */
	x.quit.done = xt_quit;
	x.quit.priv = &x;
	io_post_remote(x.loop, &x.quit); /* after the resubmission */
	pthread_join(x.tid, NULL);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT(pthread_equal(g_fake.submit_tid, x.tid));
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 8 * 512);
	CU_ASSERT_EQUAL(blk_dev_inflight(x.dev), 1);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(a.calls, 1);
	CU_ASSERT_EQUAL(blk_dev_inflight(x.dev), 0);
	io_loop_exit(x.loop);
	blk_dev_exit(x.dev);
}

static void test_write_ok(void)
{
	struct treq t;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	memset(g_buf[0], 0xab, 4096);
	treq_init(&t, VIRTIO_BLK_T_OUT, 8);
	add_out(&t, g_buf[0], 4096);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_WRITE);
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 4096);
	fake_complete_all();
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1);
	CU_ASSERT_EQUAL(g_fake.ops[IMG_OP_FLUSH], 0); /* writeback: no flush */
	CU_ASSERT(g_fake.disk[4096] == 0xab && g_fake.disk[8191] == 0xab);
	CU_ASSERT(g_fake.disk[8192] != 0xab || g_fake.disk[8193] != 0xab);
	blk_dev_exit(dev);
}

/* Header over three iovecs; header and data sharing one; data and status sharing one. */
static void test_split_header(void)
{
	struct treq t;
	struct blk_dev *dev;
	uint8_t hdr[16];
	static uint8_t mixed_out[4 + 512 - 9]; /* header tail + data */
	static uint8_t mixed_in[512 + 1];

	fake_reset(false);
	dev = dev_new(false, 512, true);
	make_hdr(hdr, VIRTIO_BLK_T_OUT, 4);
	memset(&t, 0, sizeof(t));
	t.req.complete = tcomplete;
	t.req.iov = t.iov;
	t.iov[0] = (struct iovec){hdr, 5};
	t.iov[1] = (struct iovec){hdr + 5, 7};
	memcpy(mixed_out, hdr + 12, 4);
	memset(mixed_out + 4, 0x5a, sizeof(mixed_out) - 4);
	t.iov[2] = (struct iovec){mixed_out, sizeof(mixed_out)};
	memset(g_buf[0], 0x5a, 9);
	t.iov[3] = (struct iovec){g_buf[0], 9};
	t.req.out_num = 4;
	t.iov[4] = (struct iovec){mixed_in, 1};
	t.req.in_num = 1;
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_WRITE);
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 2048);
	CU_ASSERT_EQUAL(g_fake.q[0]->len, 512);
	CU_ASSERT_EQUAL(g_fake.q[0]->iovcnt, 2);
	/* stripped in place */
	CU_ASSERT_PTR_EQUAL(g_fake.q[0]->iov[0].iov_base, mixed_out + 4);
	fake_complete_all();
	CU_ASSERT_EQUAL(mixed_in[0], VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1);
	for (int i = 0; i < 512; i++)
		CU_ASSERT_EQUAL_FATAL(g_fake.disk[2048 + i], 0x5a);

	/* Read whose data and status share the last buffer. */
	memset(&t, 0, sizeof(t));
	make_hdr(hdr, VIRTIO_BLK_T_IN, 1);
	t.req.complete = tcomplete;
	t.req.iov = t.iov;
	t.iov[0] = (struct iovec){hdr, 16};
	t.iov[1] = (struct iovec){mixed_in, sizeof(mixed_in)};
	t.req.out_num = 1;
	t.req.in_num = 1;
	mixed_in[512] = 0xee;
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->len, 512);
	fake_complete_all();
	CU_ASSERT_EQUAL(mixed_in[512], VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 513);
	CU_ASSERT(memcmp(mixed_in, g_fake.disk + 512, 512) == 0);
	blk_dev_exit(dev);
}

static void expect_malformed(struct blk_dev *dev, struct treq *t)
{
	blk_req_submit(dev, &t->req);
	CU_ASSERT_EQUAL(t->calls, 1);
	CU_ASSERT_EQUAL(t->used, BLK_REQ_MALFORMED);
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
}

static void test_malformed(void)
{
	struct treq t;
	struct blk_dev *dev;
	uint8_t zero_len_status[1];

	fake_reset(false);
	dev = dev_new(false, 512, true);

	/* no header at all */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	t.req.out_num = 0;
	add_status(&t);
	expect_malformed(dev, &t);
	CU_ASSERT_EQUAL(g_status, 0xee); /* untouched */

	/* header 15 bytes over two iovecs */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	t.iov[0].iov_len = 10;
	add_out(&t, g_hdr.hdr + 10, 5);
	add_status(&t);
	expect_malformed(dev, &t);

	/* no writable buffer */
	treq_init(&t, VIRTIO_BLK_T_FLUSH, 0);
	expect_malformed(dev, &t);

	/* last writable buffer empty */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 512);
	add_in(&t, zero_len_status, 0);
	expect_malformed(dev, &t);

	/* NULL iov */
	memset(&t, 0, sizeof(t));
	t.req.complete = tcomplete;
	t.req.out_num = 1;
	t.req.in_num = 1;
	expect_malformed(dev, &t);
	blk_dev_exit(dev);
}

static void test_rw_ioerr(void)
{
	struct treq t;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);

	/* length not a multiple of 512 */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 511);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 513);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);

	/* beyond capacity */
	treq_init(&t, VIRTIO_BLK_T_IN, DISK_SECTORS);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
	add_in(&t, g_buf[0], 1024);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_OUT, UINT64_MAX);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_OUT, UINT64_MAX >> 9);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);

	/* the last sector is fine */
	treq_init(&t, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 513);

	/* zero-length read: OK, no I/O */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 1);
	blk_dev_exit(dev);

	/* 4096-byte logical blocks: sector must be a multiple of 8 */
	dev = dev_new(false, 4096, true);
	treq_init(&t, VIRTIO_BLK_T_IN, 1);
	add_in(&t, g_buf[0], 4096);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_OUT, 4);
	add_out(&t, g_buf[0], 4096);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	treq_init(&t, VIRTIO_BLK_T_IN, 8);
	add_in(&t, g_buf[0], 4096);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL(g_fake.nq, 1);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 4097);
	blk_dev_exit(dev);
}

static void test_read_only(void)
{
	struct treq t;
	struct blk_dev *dev;
	uint8_t seg[16];

	fake_reset(false);
	dev = dev_new(true, 512, true);
	CU_ASSERT(blk_dev_features(dev) & (1ull << VIRTIO_BLK_F_RO));
	CU_ASSERT_FALSE(blk_dev_features(dev) & (1ull << VIRTIO_BLK_F_DISCARD));

	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);

	seg_make(seg, 0, 8, 0);
	treq_init(&t, VIRTIO_BLK_T_DISCARD, 0);
	add_out(&t, seg, 16);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);

	treq_init(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
	add_out(&t, seg, 16);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);

	/* reads and flushes still work */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	treq_init(&t, VIRTIO_BLK_T_FLUSH, 0);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_FLUSH);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1);
	CU_ASSERT_EQUAL(g_fake.ops[IMG_OP_WRITE], 0);
	blk_dev_exit(dev);

	/* a read-only image makes a read-only device */
	fake_reset(true);
	dev = dev_new(false, 512, true);
	CU_ASSERT(blk_dev_features(dev) & (1ull << VIRTIO_BLK_F_RO));
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_IOERR, 1);
	blk_dev_exit(dev);
}

static void dwz(struct blk_dev *dev, uint32_t type, uint8_t *segs, size_t len, uint8_t status)
{
	struct treq t;

	treq_init(&t, type, 0);
	add_out(&t, segs, len);
	add_status(&t);
	expect_now(dev, &t, status, 1);
}

static void test_discard_write_zeroes(void)
{
	struct treq t;
	struct blk_dev *dev;
	uint8_t segs[48];

	fake_reset(false);
	dev = dev_new(false, 512, true);
	for (int k = 0; k < 2; k++) {
		uint32_t type = k ? VIRTIO_BLK_T_WRITE_ZEROES : VIRTIO_BLK_T_DISCARD;
		uint32_t max = k ? BLK_MAX_WRITE_ZEROES_SECTORS : BLK_MAX_DISCARD_SECTORS;

		/* more than one segment */
		seg_make(segs, 0, 8, 0);
		seg_make(segs + 16, 16, 8, 0);
		dwz(dev, type, segs, 32, VIRTIO_BLK_S_UNSUPP);
		/* short segment */
		dwz(dev, type, segs, 8, VIRTIO_BLK_S_IOERR);
		/* unknown flags */
		seg_make(segs, 0, 8, 2);
		dwz(dev, type, segs, 16, VIRTIO_BLK_S_UNSUPP);
		/* above the maximum */
		seg_make(segs, 0, max + 1, 0);
		dwz(dev, type, segs, 16, VIRTIO_BLK_S_IOERR);
		/* out of range */
		seg_make(segs, DISK_SECTORS - 4, 8, 0);
		dwz(dev, type, segs, 16, VIRTIO_BLK_S_IOERR);
		seg_make(segs, UINT64_MAX - 2, 8, 0);
		dwz(dev, type, segs, 16, VIRTIO_BLK_S_IOERR);
	}
	/* UNMAP on DISCARD */
	seg_make(segs, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	dwz(dev, VIRTIO_BLK_T_DISCARD, segs, 16, VIRTIO_BLK_S_UNSUPP);

	/* valid discard, segment split over two iovecs */
	seg_make(segs, 16, 8, 0);
	treq_init(&t, VIRTIO_BLK_T_DISCARD, 999);
	add_out(&t, segs, 10);
	add_out(&t, segs + 10, 6);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_DISCARD);
	CU_ASSERT_EQUAL(g_fake.q[0]->off, 16 * 512);
	CU_ASSERT_EQUAL(g_fake.q[0]->len, 8 * 512);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1);

	/* write zeroes with and without UNMAP */
	for (int unmap = 0; unmap < 2; unmap++) {
		seg_make(segs, 32, 16, unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0);
		treq_init(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
		add_out(&t, segs, 16);
		add_status(&t);
		blk_req_submit(dev, &t.req);
		CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
		CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_WRITE_ZEROES);
		CU_ASSERT_EQUAL(g_fake.q[0]->off, 32 * 512);
		CU_ASSERT_EQUAL(g_fake.q[0]->len, 16 * 512);
		CU_ASSERT_EQUAL(g_fake.q[0]->flags, unmap ? IMG_IO_UNMAP : 0u);
		fake_complete_all();
		CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
		CU_ASSERT_EQUAL(g_fake.disk[32 * 512], 0);
	}
	/* the maximum itself is accepted (range permitting): 0 sectors is a no-op */
	seg_make(segs, 0, 0, 0);
	dwz(dev, VIRTIO_BLK_T_WRITE_ZEROES, segs, 16, VIRTIO_BLK_S_OK);
	blk_dev_exit(dev);

	/* an image without discard support: UNSUPP, and not offered */
	fake_reset(false);
	g_fake.img.supports_discard = false;
	dev = dev_new(false, 512, true);
	CU_ASSERT_FALSE(blk_dev_features(dev) & (1ull << VIRTIO_BLK_F_DISCARD));
	CU_ASSERT(blk_dev_features(dev) & (1ull << VIRTIO_BLK_F_WRITE_ZEROES));
	seg_make(segs, 0, 8, 0);
	dwz(dev, VIRTIO_BLK_T_DISCARD, segs, 16, VIRTIO_BLK_S_UNSUPP);
	blk_dev_exit(dev);
}

static void test_unknown_type(void)
{
	static const uint32_t types[] = {2, 3, 10, 14, 99, 0x80000000u, 0x80000001u};
	struct treq t;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		treq_init(&t, types[i], 0);
		add_in(&t, g_buf[0], 512);
		add_status(&t);
		expect_now(dev, &t, VIRTIO_BLK_S_UNSUPP, 1);
	}
	blk_dev_exit(dev);
}

static void test_get_id(void)
{
	struct treq t;
	struct blk_dev *dev;
	struct blk_opts o = {.serial = "0123456789abcdefghijXYZ"};

	fake_reset(false);
	dev = dev_new(false, 512, true);
	memset(g_buf[0], 0xff, 64);
	treq_init(&t, VIRTIO_BLK_T_GET_ID, 0);
	add_in(&t, g_buf[0], 20);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 21);
	CU_ASSERT(memcmp(g_buf[0], "vqcow-serial\0\0\0\0\0\0\0\0", 20) == 0);

	/* larger buffer: still 20 bytes */
	memset(g_buf[0], 0xff, 64);
	treq_init(&t, VIRTIO_BLK_T_GET_ID, 0);
	add_in(&t, g_buf[0], 64);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 21);
	CU_ASSERT_EQUAL(g_buf[0][20], 0xff);

	/* shorter buffer, split: what fits */
	memset(g_buf[0], 0xff, 64);
	treq_init(&t, VIRTIO_BLK_T_GET_ID, 0);
	add_in(&t, g_buf[0], 3);
	add_in(&t, g_buf[0] + 10, 2);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 6);
	CU_ASSERT(memcmp(g_buf[0], "vqc", 3) == 0);
	CU_ASSERT(memcmp(g_buf[0] + 10, "ow", 2) == 0);
	CU_ASSERT_EQUAL(g_buf[0][3], 0xff);

	/* no buffer at all: just the status */
	treq_init(&t, VIRTIO_BLK_T_GET_ID, 0);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 1);
	blk_dev_exit(dev);

	/* a long serial is cut at 20 bytes, no terminator */
	CU_ASSERT_EQUAL_FATAL(blk_dev_init(&dev, &g_fake.img, &o), 0);
	treq_init(&t, VIRTIO_BLK_T_GET_ID, 0);
	add_in(&t, g_buf[0], 32);
	add_status(&t);
	expect_now(dev, &t, VIRTIO_BLK_S_OK, 21);
	CU_ASSERT(memcmp(g_buf[0], "0123456789abcdefghij", 20) == 0);
	blk_dev_exit(dev);
}

static uint32_t rd32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static void test_config(void)
{
	struct blk_dev *dev;
	uint8_t c[128];
	uint64_t cap;
	uint16_t v16;
	uint64_t f;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	memset(c, 0xcc, sizeof(c));
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 0, sizeof(c)), 0);
	memcpy(&cap, c, 8);
	CU_ASSERT_EQUAL(le64toh(cap), DISK_SECTORS);
	CU_ASSERT_EQUAL(rd32(c + 8), 0);    /* size_max */
	CU_ASSERT_EQUAL(rd32(c + 12), 126); /* seg_max = queue_size - 2 */
	CU_ASSERT_EQUAL(rd32(c + 20), 512); /* blk_size */
	CU_ASSERT_EQUAL(c[24], 3);          /* physical_block_exp: 4096 / 512 */
	CU_ASSERT_EQUAL(c[25], 0);          /* alignment_offset */
	memcpy(&v16, c + 26, 2);
	CU_ASSERT_EQUAL(le16toh(v16), 8);   /* min_io_size in logical blocks */
	CU_ASSERT_EQUAL(rd32(c + 28), 128); /* opt_io_size: 64 KiB / 512 */
	CU_ASSERT_EQUAL(c[32], 1);          /* wce */
	memcpy(&v16, c + 34, 2);
	CU_ASSERT_EQUAL(le16toh(v16), 2); /* num_queues */
	CU_ASSERT_EQUAL(rd32(c + 36), BLK_MAX_DISCARD_SECTORS);
	CU_ASSERT_EQUAL(rd32(c + 40), 1);   /* max_discard_seg */
	CU_ASSERT_EQUAL(rd32(c + 44), 128); /* discard_sector_alignment */
	CU_ASSERT_EQUAL(rd32(c + 48), BLK_MAX_WRITE_ZEROES_SECTORS);
	CU_ASSERT_EQUAL(rd32(c + 52), 1); /* max_write_zeroes_seg */
	CU_ASSERT_EQUAL(c[56], 1);        /* write_zeroes_may_unmap */
	for (int i = 57; i < 128; i++)
		CU_ASSERT_EQUAL(c[i], 0);

	/* partial read at an offset */
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 20, 4), 0);
	CU_ASSERT_EQUAL(rd32(c), 512);
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 4096, 1), -EINVAL);
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, UINT32_MAX, 2), -EINVAL);

	f = blk_dev_features(dev);
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_SEG_MAX));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_BLK_SIZE));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_TOPOLOGY));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_MQ));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_FLUSH));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_CONFIG_WCE));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_DISCARD));
	CU_ASSERT(f & (1ull << VIRTIO_BLK_F_WRITE_ZEROES));
	CU_ASSERT_FALSE(f & (1ull << VIRTIO_BLK_F_RO));
	CU_ASSERT_FALSE(f & (1ull << VIRTIO_BLK_F_SIZE_MAX));

	/* capacity follows the image */
	CU_ASSERT_FALSE(blk_dev_update_capacity(dev));
	g_fake.img.size = DISK_SIZE / 2 + 100;
	CU_ASSERT(blk_dev_update_capacity(dev));
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 0, 8), 0);
	memcpy(&cap, c, 8);
	CU_ASSERT_EQUAL(le64toh(cap), DISK_SECTORS / 2);
	blk_dev_exit(dev);

	/* 4096 logical blocks; seg_max capped at 1022 */
	{
		struct blk_opts o = {.logical_block_size = 4096, .queue_size = 1024};

		g_fake.img.size = DISK_SIZE - 512; /* capacity rounds down to 4 KiB */
		CU_ASSERT_EQUAL_FATAL(blk_dev_init(&dev, &g_fake.img, &o), 0);
		CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 0, 60), 0);
		memcpy(&cap, c, 8);
		CU_ASSERT_EQUAL(le64toh(cap), DISK_SECTORS - 8);
		CU_ASSERT_EQUAL(rd32(c + 12), 1022);
		CU_ASSERT_EQUAL(rd32(c + 20), 4096);
		CU_ASSERT_EQUAL(c[24], 0);
		CU_ASSERT_EQUAL(c[32], 0); /* writethrough by default */
		memcpy(&v16, c + 34, 2);
		CU_ASSERT_EQUAL(le16toh(v16), 1);
		blk_dev_exit(dev);
	}
	/* bad options */
	{
		struct blk_opts o = {.logical_block_size = 1024};

		CU_ASSERT_EQUAL(blk_dev_init(&dev, &g_fake.img, &o), -EINVAL);
		o.logical_block_size = 512;
		o.queue_size = 2048;
		CU_ASSERT_EQUAL(blk_dev_init(&dev, &g_fake.img, &o), -EINVAL);
	}
}

static void test_wce(void)
{
	struct treq t;
	struct blk_dev *dev;
	uint8_t b, seg[16];
	uint8_t c[4];

	fake_reset(false);
	dev = dev_new(false, 512, false); /* writethrough */
	CU_ASSERT_FALSE(blk_dev_get_wce(dev));

	/* OUT: write, then flush, then completion */
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_WRITE);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(t.calls, 0);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_FLUSH);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(t.used, 1);

	/* the flush fails: IOERR */
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(0);
	fake_complete_one(-EIO);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_IOERR);

	/* the write fails: no flush */
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(-ENOSPC);
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_IOERR);

	/* WRITE_ZEROES is a write too */
	seg_make(seg, 0, 8, 0);
	treq_init(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
	add_out(&t, seg, 16);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(0);
	CU_ASSERT_EQUAL_FATAL(g_fake.nq, 1);
	CU_ASSERT_EQUAL(g_fake.q[0]->op, IMG_OP_FLUSH);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(t.calls, 1);

	/* reads are not flushed */
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_fake.nq, 0);

	/* guest turns the write cache on through config space */
	b = 1;
	CU_ASSERT_EQUAL(blk_dev_set_config(dev, &b, 32, 1), 0);
	CU_ASSERT(blk_dev_get_wce(dev));
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 32, 1), 0);
	CU_ASSERT_EQUAL(c[0], 1);
	g_fake.nlog = 0;
	treq_init(&t, VIRTIO_BLK_T_OUT, 0);
	add_out(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(0);
	CU_ASSERT_EQUAL(t.calls, 1);
	CU_ASSERT_EQUAL(g_fake.nq, 0);
	CU_ASSERT_EQUAL(g_fake.nlog, 1);

	/* other fields are read-only; same values may be written back */
	b = 0x55;
	CU_ASSERT_EQUAL(blk_dev_set_config(dev, &b, 20, 1), -EINVAL);
	CU_ASSERT_EQUAL(blk_dev_get_config(dev, c, 31, 4), 0);
	c[1] = 0; /* wce off, rest unchanged */
	CU_ASSERT_EQUAL(blk_dev_set_config(dev, c, 31, 4), 0);
	CU_ASSERT_FALSE(blk_dev_get_wce(dev));
	b = 2;
	CU_ASSERT_EQUAL(blk_dev_set_config(dev, &b, 32, 1), -EINVAL);
	CU_ASSERT_EQUAL(blk_dev_set_config(dev, &b, 5000, 1), -EINVAL);
	blk_dev_set_wce(dev, true);
	CU_ASSERT(blk_dev_get_wce(dev));
	blk_dev_exit(dev);
}

/*
 * Virtio 1.2, 5.2.5.1 through blk_dev_features_set(): one row per step of a
 * device's life, the write cache mode expected after it.
 */
#define FL (1ull << VIRTIO_BLK_F_FLUSH)
#define CW (1ull << VIRTIO_BLK_F_CONFIG_WCE)
static void test_wce_negotiation(void)
{
	enum { NEG, DRIVER_SET, GONE };
	static const struct {
		bool configured; /* blk_opts.writeback */
		struct {
			int what; /* NEG: negotiate arg; DRIVER_SET: config wce = arg */
			uint64_t arg;
			bool wce; /* expected afterwards */
		} step[6];
		unsigned n;
	} rows[] = {
	    /* no CONFIG_WCE: writeback iff FLUSH, whatever was configured */
	    {true, {{NEG, 0, false}, {NEG, FL, true}}, 2},
	    {false, {{NEG, FL, true}, {NEG, 0, false}}, 2},
	    /* CONFIG_WCE: the configured mode on the first negotiation */
	    {true, {{NEG, FL | CW, true}}, 1},
	    {false, {{NEG, FL | CW, false}}, 1},
	    /* a renegotiation by the same driver keeps what it wrote into wce */
	    {false, {{NEG, FL | CW, false}, {DRIVER_SET, 1, true}, {NEG, FL | CW, true}}, 3},
	    /* a new driver starts from the configured mode again */
	    {false,
	     {{NEG, FL | CW, false}, {DRIVER_SET, 1, true}, {GONE, 0, true}, {NEG, FL | CW, false}},
	     4},
	    /* a negotiation without CONFIG_WCE leaves the next one with it pending */
	    {true, {{NEG, 0, false}, {NEG, FL | CW, true}}, 2},
	};

	fake_reset(false);
	for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) {
		struct blk_dev *dev = dev_new(false, 512, rows[r].configured);

		CU_ASSERT_EQUAL(blk_dev_get_wce(dev), rows[r].configured);
		for (unsigned i = 0; i < rows[r].n; i++) {
			uint8_t b = (uint8_t)rows[r].step[i].arg;

			switch (rows[r].step[i].what) {
			case NEG:
				blk_dev_features_set(dev, rows[r].step[i].arg);
				break;
			case DRIVER_SET:
				CU_ASSERT_EQUAL(blk_dev_set_config(dev, &b, 32, 1), 0);
				break;
			case GONE:
				blk_dev_driver_gone(dev);
				break;
			}
			if (blk_dev_get_wce(dev) != rows[r].step[i].wce)
				fprintf(stderr, "row %zu step %u: wce %d\n", r, i,
					blk_dev_get_wce(dev));
			CU_ASSERT_EQUAL(blk_dev_get_wce(dev), rows[r].step[i].wce);
		}
		blk_dev_exit(dev);
	}
}
#undef FL
#undef CW

static void test_image_errors(void)
{
	struct treq t;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(-EIO);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_IOERR);
	CU_ASSERT_EQUAL(t.used, 1); /* nothing reported written */

	treq_init(&t, VIRTIO_BLK_T_FLUSH, 0);
	add_status(&t);
	blk_req_submit(dev, &t.req);
	fake_complete_one(-ENOTSUP);
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_UNSUPP);

	/* several in flight, completed out of order of type */
	{
		struct treq a, b;

		treq_init(&a, VIRTIO_BLK_T_FLUSH, 0);
		add_status(&a);
		blk_req_submit(dev, &a.req);
		treq_init(&b, VIRTIO_BLK_T_IN, 0);
		b.iov[1] = (struct iovec){g_buf[1], 512};
		b.iov[2] = (struct iovec){g_buf[2], 1};
		b.req.in_num = 2;
		blk_req_submit(dev, &b.req);
		CU_ASSERT_EQUAL(blk_dev_inflight(dev), 2);
		fake_complete_one(0);
		CU_ASSERT_EQUAL(a.calls, 1);
		CU_ASSERT_EQUAL(blk_dev_inflight(dev), 1);
		fake_complete_one(-EIO);
		CU_ASSERT_EQUAL(b.calls, 1);
		CU_ASSERT_EQUAL(g_buf[2][0], VIRTIO_BLK_S_IOERR);
		CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
	}
	blk_dev_exit(dev);
}

static bool io_len_below(const struct iovec *iov, unsigned n, size_t min)
{
	size_t total = 0;

	for (unsigned i = 0; i < n; i++)
		total += iov[i].iov_len;
	return total < min;
}

/*
 * Hostile layouts: random iovec splits, lengths, types, sectors and
 * segments (fixed seed). Invariants: exactly one completion; MALFORMED or a
 * valid status byte at the last writable byte; used_len never above the
 * writable bytes; image I/O only inside the disk (fake_complete_one checks).
 */
static void test_random_layouts(void)
{
	static const size_t lens[] = {0, 1, 3, 5, 8, 15, 16, 17, 24, 32, 511, 512, 513, 1024, 4096};
	static const uint32_t types[] = {0, 1, 4, 8, 11, 13, 2, 14, 0xffffffffu};
	static uint8_t pool[64 * 1024];
	unsigned seed = 12345;
	struct blk_dev *devs[2];

	fake_reset(false);
	devs[0] = dev_new(false, 512, true);
	devs[1] = dev_new(false, 4096, false);
	for (int iter = 0; iter < 4000; iter++) {
		struct treq t;
		struct blk_dev *dev = devs[iter & 1];
		unsigned out_num, in_num, n;
		size_t at = 0, in_total = 0;
		uint8_t hdr[16], seg[16];
		uint64_t sectors[] = {0, 1, 7, 8, DISK_SECTORS - 1, DISK_SECTORS, UINT64_MAX, 0};
		uint8_t *status_at = NULL;

		seed = seed * 1103515245u + 12345u;
		out_num = (seed >> 8) % 5;
		in_num = (seed >> 12) % 5;
		sectors[7] = (seed >> 3) % DISK_SECTORS;
		make_hdr(hdr, types[(seed >> 16) % 9], sectors[(seed >> 20) % 8]);
		seg_make(seg, sectors[(seed >> 23) % 8], (seed >> 4) % 64, (seed >> 27) % 3);
		memset(&t, 0, sizeof(t));
		t.req.iov = t.iov;
		t.req.complete = tcomplete;
		t.req.out_num = out_num;
		t.req.in_num = in_num;
		for (n = 0; n < out_num + in_num; n++) {
			size_t len;

			seed = seed * 1103515245u + 12345u;
			len = lens[(seed >> 9) % 15];
			if (at + len > sizeof(pool))
				at = 0;
			t.iov[n].iov_base = pool + at;
			t.iov[n].iov_len = len;
			at += len;
			if (n >= out_num)
				in_total += len;
		}
		/* header then segment bytes across the readable buffers */
		{
			uint8_t bytes[32];
			size_t k = 0;

			memcpy(bytes, hdr, 16);
			memcpy(bytes + 16, seg, 16);
			for (n = 0; n < out_num && k < 32; n++)
				for (size_t j = 0; j < t.iov[n].iov_len && k < 32; j++)
					((uint8_t *)t.iov[n].iov_base)[j] = bytes[k++];
		}
		if (in_num && t.iov[out_num + in_num - 1].iov_len)
			status_at = (uint8_t *)t.iov[out_num + in_num - 1].iov_base +
				    t.iov[out_num + in_num - 1].iov_len - 1;
		blk_req_submit(dev, &t.req);
		for (int k = 0; k < 4 && g_fake.nq; k++)
			fake_complete_one((seed >> 5) % 7 == 0 ? -EIO : 0);
		CU_ASSERT_EQUAL_FATAL(t.calls, 1);
		CU_ASSERT_EQUAL_FATAL(g_fake.nq, 0);
		if (t.used == BLK_REQ_MALFORMED) {
			CU_ASSERT(status_at == NULL || out_num == 0 ||
				  io_len_below(t.iov, out_num, 16));
			continue;
		}
		CU_ASSERT_PTR_NOT_NULL_FATAL(status_at);
		CU_ASSERT(*status_at <= VIRTIO_BLK_S_UNSUPP);
		CU_ASSERT(t.used >= 1 && t.used <= in_total);
	}
	CU_ASSERT_EQUAL(blk_dev_inflight(devs[0]), 0);
	CU_ASSERT_EQUAL(blk_dev_inflight(devs[1]), 0);
	blk_dev_exit(devs[0]);
	blk_dev_exit(devs[1]);
}

/*
 * Latency histograms: requests of a known latency class (the fake image
 * completes them when told: at once, or after 30 ms) land in their bins,
 * counted in the blk_stats they were submitted with; sums see them all;
 * a new set empties the bins; bad boundaries are refused.
 */
static void read_after(struct blk_dev *dev, struct blk_stats *st, long ms)
{
	struct treq t;

	treq_init(&t, VIRTIO_BLK_T_IN, 0);
	add_in(&t, g_buf[0], 512);
	add_status(&t);
	blk_req_submit_stats(dev, &t.req, st);
	if (ms)
		nanosleep(&(struct timespec){.tv_nsec = ms * 1000000}, NULL);
	fake_complete_all();
	CU_ASSERT_EQUAL(g_status, VIRTIO_BLK_S_OK);
}

static void test_histograms(void)
{
	static const uint64_t b[2] = {20000000, 10000000000ull}; /* 20 ms, 10 s */
	static const uint64_t bad[][2] = {{0, 5}, {5, 5}, {6, 5}};
	static struct blk_stats q1, sum;
	const uint64_t *got;
	struct blk_dev *dev;

	fake_reset(false);
	dev = dev_new(false, 512, true);
	CU_ASSERT_EQUAL(blk_dev_histogram(dev, BLK_STAT_READ, &got), -1);
	CU_ASSERT_EQUAL(blk_dev_set_histogram(dev, BLK_STAT_READ, b, 2), 0);
	CU_ASSERT_EQUAL(blk_dev_histogram(dev, BLK_STAT_READ, &got), 2);
	CU_ASSERT_EQUAL(got[1], b[1]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		CU_ASSERT_EQUAL(blk_dev_set_histogram(dev, BLK_STAT_WRITE, bad[i], 2), -EINVAL);
	CU_ASSERT_EQUAL(blk_dev_set_histogram(dev, BLK_STAT_WRITE, b, BLK_HIST_MAX + 1), -EINVAL);
	CU_ASSERT_EQUAL(blk_dev_histogram(dev, BLK_STAT_WRITE, &got), -1);

	read_after(dev, NULL, 0);
	read_after(dev, &q1, 0);
	read_after(dev, &q1, 30);
	CU_ASSERT_EQUAL(blk_dev_stats(dev)->op[BLK_STAT_READ].bins[0], 1);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].ops, 2);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].bins[0], 1);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].bins[1], 1);
	CU_ASSERT(q1.op[BLK_STAT_READ].total_ns >= 30000000);
	memset(&sum, 0, sizeof(sum));
	blk_stats_add(dev, &sum, blk_dev_stats(dev));
	blk_stats_add(dev, &sum, &q1);
	CU_ASSERT_EQUAL(sum.op[BLK_STAT_READ].ops, 3);
	CU_ASSERT_EQUAL(sum.op[BLK_STAT_READ].bins[0], 2);
	CU_ASSERT_EQUAL(sum.op[BLK_STAT_READ].bins[1], 1);
	CU_ASSERT_EQUAL(sum.op[BLK_STAT_READ].bins[2], 0);

	/* A new set: old bins no longer count, anywhere. */
	CU_ASSERT_EQUAL(blk_dev_set_histogram(dev, BLK_STAT_READ, b, 1), 0);
	memset(&sum, 0, sizeof(sum));
	blk_stats_add(dev, &sum, &q1);
	CU_ASSERT_EQUAL(sum.op[BLK_STAT_READ].bins[0] + sum.op[BLK_STAT_READ].bins[1], 0);
	read_after(dev, &q1, 0);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].bins[0], 1);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].bins[1], 0);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].ops, 3); /* the counters themselves go on */
	/* Removed: nothing binned. */
	CU_ASSERT_EQUAL(blk_dev_set_histogram(dev, BLK_STAT_READ, NULL, 0), 0);
	read_after(dev, &q1, 0);
	CU_ASSERT_EQUAL(q1.op[BLK_STAT_READ].bins[0], 1);
	blk_dev_exit(dev);
}

static void test_status_from_errno(void)
{
	CU_ASSERT_EQUAL(blk_status_from_errno(0), VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(blk_status_from_errno(-EIO), VIRTIO_BLK_S_IOERR);
	CU_ASSERT_EQUAL(blk_status_from_errno(-ENOSPC), VIRTIO_BLK_S_IOERR);
	CU_ASSERT_EQUAL(blk_status_from_errno(-EROFS), VIRTIO_BLK_S_IOERR);
	CU_ASSERT_EQUAL(blk_status_from_errno(-EINVAL), VIRTIO_BLK_S_IOERR);
	CU_ASSERT_EQUAL(blk_status_from_errno(-ENOTSUP), VIRTIO_BLK_S_UNSUPP);
	CU_ASSERT_EQUAL(blk_status_from_errno(-EOPNOTSUPP), VIRTIO_BLK_S_UNSUPP);
}

int main(void)
{
	CU_pSuite s;
	int failed;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("blk", NULL, NULL);
	CU_add_test(s, "read ok", test_read_ok);
	CU_add_test(s, "write ok", test_write_ok);
	CU_add_test(s, "pause, swap, write hook", test_pause_swap_hook);
	CU_add_test(s, "held requests resume on their thread", test_resume_on_thread);
	CU_add_test(s, "split header and shared buffers", test_split_header);
	CU_add_test(s, "malformed requests", test_malformed);
	CU_add_test(s, "read/write IOERR rows", test_rw_ioerr);
	CU_add_test(s, "read-only export", test_read_only);
	CU_add_test(s, "discard and write-zeroes rows", test_discard_write_zeroes);
	CU_add_test(s, "unknown types", test_unknown_type);
	CU_add_test(s, "GET_ID", test_get_id);
	CU_add_test(s, "config space and features", test_config);
	CU_add_test(s, "WCE and writethrough", test_wce);
	CU_add_test(s, "WCE after feature negotiation (5.2.5.1)", test_wce_negotiation);
	CU_add_test(s, "image errors", test_image_errors);
	CU_add_test(s, "random layouts", test_random_layouts);
	CU_add_test(s, "status from errno", test_status_from_errno);
	CU_add_test(s, "latency histograms, per-queue stats", test_histograms);
	failed = (int)tu_cunit_run();
	return failed ? 1 : 0;
}
