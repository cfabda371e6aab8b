/* SPDX-License-Identifier: MIT */
/*
 * Live migration on shared storage, with our own front-end: two vqcowd on one
 * qcow2 image, the destination started with --incoming.
 *
 *  - the destination holds no lock while the source serves the guest;
 *  - the source, once the front-end turned dirty logging on (SET_LOG_BASE +
 *    VHOST_F_LOG_ALL), marks the pages it writes, and when its ring stops
 *    (GET_VRING_BASE: the switchover) it writes its metadata back and
 *    releases its locks;
 *  - the destination takes the image when its ring starts and serves the
 *    source's data (metadata read afresh), allocating new clusters;
 *  - a failed migration (the destination gone): the source's ring restarts,
 *    it takes the image back and sees the destination's writes (its own
 *    cached metadata was dropped);
 *  - `qemu-img check` is clean and qemu-io reads every pattern afterwards.
 *
 * "threads": the same source with --io-threads 2, where the queues' threads
 * pop, complete and push, and serve allocated clusters themselves (the qcow2
 * fast path) or hand a request to the main thread and back (a hop):
 *  - with the log on, every page of every buffer a read filled, on the fast
 *    path or through a hop, and the page of its status byte, has its bit set
 *    when the request is in the used ring (the front-end syncs the log after
 *    it saw the completion);
 *  - GET_VRING_BASE of a ring whose fast-path writes are held back in the
 *    daemon (VQCOWD_TEST_FAST_DELAY) replies only once they are in the used
 *    ring, and its base counts exactly them (a completion after the reply
 *    would land in guest memory the front-end already migrated).
 */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define CHUNK 65536u

static int write_pattern(struct vqfe *fe, uint64_t off, uint64_t seed)
{
	static uint8_t buf[CHUNK];

	itest_fill(buf, sizeof(buf), seed);
	return vqfe_write(fe, 0, off, buf, sizeof(buf));
}

static bool check_pattern(struct vqfe *fe, uint64_t off, uint64_t seed)
{
	static uint8_t want[CHUNK], got[CHUNK];

	itest_fill(want, sizeof(want), seed);
	return vqfe_read(fe, 0, off, got, sizeof(got)) == 0 && memcmp(want, got, CHUNK) == 0;
}

static unsigned bits(const uint8_t *p, size_t n)
{
	unsigned c = 0;

	for (size_t i = 0; i < n; i++)
		c += (unsigned)__builtin_popcount(p[i]);
	return c;
}

/* A fresh 64 MiB qcow2 image @img (DIR/disk.qcow2) in a new directory @dir
 * ("/tmp/vqcow-mig.XXXXXX", filled in). */
static void new_image(char *dir, char *img, size_t imgsz)
{
	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, imgsz, "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 64M", img), 0);
}

/* The dirty log of a migration, as QEMU sets it up: shared memory with a bit
 * per page of the front-end's memory regions (SET_LOG_BASE), then
 * VHOST_F_LOG_ALL in SET_FEATURES. */
struct dirty_log {
	uint8_t *map;
	uint64_t size;
	int fd;
};

static void log_start(struct vqfe *fe, struct dirty_log *dl)
{
	uint64_t maxgpa = 0, gpa, size, v;
	struct vqfe_msg_hdr h;

	for (unsigned i = 0; vqfe_region(fe, i, &gpa, &size) == 0; i++)
		if (gpa + size > maxgpa)
			maxgpa = gpa + size;
	dl->size = (maxgpa / 4096 + 7) / 8;
	dl->fd = memfd_create("log", MFD_CLOEXEC);
	CU_ASSERT_FATAL(dl->fd >= 0 && ftruncate(dl->fd, (off_t)dl->size) == 0);
	dl->map = mmap(NULL, dl->size, PROT_READ | PROT_WRITE, MAP_SHARED, dl->fd, 0);
	CU_ASSERT_FATAL(dl->map != MAP_FAILED);
	{
		uint64_t lm[2] = {dl->size, 0};

		CU_ASSERT_EQUAL(vqfe_send_msg(fe, VHOST_USER_SET_LOG_BASE, VHOST_USER_VERSION, lm,
					      sizeof(lm), &dl->fd, 1),
				0);
		CU_ASSERT_EQUAL(vqfe_recv_msg(fe, &h, &v, sizeof(v), 5000), 8);
		CU_ASSERT_EQUAL(h.request, VHOST_USER_SET_LOG_BASE);
	}
	v = vqfe_features(fe) | (1ull << 26);
	CU_ASSERT_EQUAL(vqfe_call(fe, VHOST_USER_SET_FEATURES, &v, 8, NULL, 0, true, NULL, 0), 0);
}

/* After the daemons stopped: the image checks clean; the log and @dir go. */
static void finish(const char *dir, const char *img, struct dirty_log *dl)
{
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	munmap(dl->map, dl->size);
	close(dl->fd);
	tu_sh("rm -rf %s", dir);
}

static void t_handoff(void)
{
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64];
	struct dirty_log dl;
	uint32_t base = 0;

	new_image(dir, img, sizeof(img));
	START(a, .extra = {"--format", "qcow2", "--blk-file", img});
	START(b, .extra = {"--format", "qcow2", "--blk-file", img, "--incoming"});
	CONNECT(fa, a, NULL);
	CU_ASSERT_EQUAL(write_pattern(fa, 0, 1), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 1 * MiB, 2), 0);
	CU_ASSERT(tu_lock_held(img, 101)); /* the source's write lock */

	/* Migration starts: a dirty log, then VHOST_F_LOG_ALL. */
	log_start(fa, &dl);
	CU_ASSERT_EQUAL(bits(dl.map, dl.size), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 2 * MiB, 3), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 0, 1));
	CU_ASSERT(bits(dl.map, dl.size) >= 2); /* read data, status bytes, used ring */

	/* Switchover: the source's ring stops; it lets the image go. */
	CU_ASSERT_EQUAL(vqfe_vq_stop(fa, 0, &base), 0);
	for (int i = 0; i < 500 && tu_lock_held(img, 101); i++)
		usleep(10000);
	CU_ASSERT(!tu_lock_held(img, 100) && !tu_lock_held(img, 101));
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);

	/* The destination's ring starts: it takes the image. */
	{
		CONNECT(fb, b, NULL);
		/* (taken as the ring starts, before the first request is popped) */
		CU_ASSERT_TRUE(check_pattern(fb, 0, 1));
		CU_ASSERT(tu_lock_held(img, 101));
		CU_ASSERT_TRUE(check_pattern(fb, 1 * MiB, 2));
		CU_ASSERT_TRUE(check_pattern(fb, 2 * MiB, 3));
		CU_ASSERT_EQUAL(write_pattern(fb, 3 * MiB, 4), 0);
		CU_ASSERT_EQUAL(write_pattern(fb, 0, 5), 0);
		/* The migration fails after all: the destination goes away. */
		vqfe_close(fb);
	}
	STOP(b);
	CU_ASSERT(!tu_lock_held(img, 101));

	/* The source's guest resumes: it takes the image back, afresh. */
	CU_ASSERT_EQUAL(vqfe_vq_restart(fa, 0, base), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 3 * MiB, 4));
	CU_ASSERT_TRUE(check_pattern(fa, 0, 5));
	CU_ASSERT_TRUE(check_pattern(fa, 2 * MiB, 3));
	CU_ASSERT_EQUAL(write_pattern(fa, 4 * MiB, 6), 0);
	CU_ASSERT(tu_lock_held(img, 101));
	vqfe_close(fa);
	STOP(a);
	finish(dir, img, &dl);
}

/* Every page of [gpa, gpa + len) marked in @log? */
static bool logged(const uint8_t *log, uint64_t logsz, uint64_t gpa, uint64_t len)
{
	for (uint64_t pg = gpa / 4096; pg <= (gpa + len - 1) / 4096; pg++) {
		if (pg / 8 >= logsz || !(log[pg / 8] & (1u << (pg % 8))))
			return false;
	}
	return true;
}

static void t_threads(void)
{
	enum { NR = 8, NW = 8, LEN = 16384 };
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64], line[512];
	struct vqfe_req req[NR > NW ? NR : NW];
	static uint8_t wbuf[NW][LEN], pat[CHUNK];
	uint64_t sgpa, hits = 0;
	size_t ssize;
	struct vqfe_opts fo;
	struct dirty_log dl;
	uint32_t base = 0;
	uint16_t before;
	FILE *f;

	new_image(dir, img, sizeof(img));
	/* every 4th fast-path write held 500 ms with its ticket */
	setenv("VQCOWD_TEST_FAST_DELAY", "500", 1);
	START(a, .num_queues = 2,
	      .extra = {"--format", "qcow2", "--blk-file", img, "--io-threads", "2"});
	unsetenv("VQCOWD_TEST_FAST_DELAY");
	itest_fe_opts(&fo);
	fo.num_queues = 2;
	CONNECT(fa, a, &fo);

	/* Allocated on the main thread (hops), then read once there: the
	 * clusters' mappings are published, later requests stay on queue 1's
	 * thread. */
	for (unsigned i = 0; i < 16; i++)
		CU_ASSERT_EQUAL(write_pattern(fa, (uint64_t)i * CHUNK, 10 + i), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 0, 10));
	for (unsigned i = 0; i < 16; i++) {
		static uint8_t got[CHUNK];

		CU_ASSERT_EQUAL(vqfe_read(fa, 1, (uint64_t)i * CHUNK, got, CHUNK), 0);
	}

	/* Migration starts: a dirty log, then VHOST_F_LOG_ALL. */
	log_start(fa, &dl);

	/* Reads into scratch pages: fast on queue 1 (clusters 0-15), and
	 * through a hop (unallocated clusters, zeroes, and a range across two
	 * clusters that are not host-contiguous is not guaranteed to be fast). */
	vqfe_scratch(fa, &sgpa, &ssize);
	CU_ASSERT_FATAL(ssize >= (size_t)NR * LEN + 4096);
	for (unsigned round = 0; round < 2; round++) {
		memset(dl.map, 0, dl.size);
		memset(vqfe_gpa(fa, sgpa, (size_t)NR * LEN), 0xa5, (size_t)NR * LEN);
		for (unsigned i = 0; i < NR; i++) {
			uint64_t off = round ? 32 * MiB + (uint64_t)i * LEN : (uint64_t)i * LEN;

			req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
						   .sector = off / 512,
						   .len = LEN,
						   .data_gpa = sgpa + (uint64_t)i * LEN};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fa, 1, &req[i]), 0);
		}
		CU_ASSERT_EQUAL(vqfe_drain(fa, 1), 0);
		for (unsigned i = 0; i < NR; i++) {
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
			CU_ASSERT_TRUE(logged(dl.map, dl.size, sgpa + (uint64_t)i * LEN, LEN));
			/* the status byte, in a descriptor of its own, as Linux
			 * lays requests out */
			CU_ASSERT_TRUE(
			    logged(dl.map, dl.size, vqfe_req_status_gpa(fa, &req[i]), 1));
		}
		if (!round) {
			/* the data really came from the image */
			itest_fill(pat, sizeof(pat), 10);
			CU_ASSERT_EQUAL(memcmp(vqfe_gpa(fa, sgpa, LEN), pat, LEN), 0);
		}
	}

	/* Fast writes in place, one of each four held 500 ms in the daemon;
	 * GET_VRING_BASE right after the kick. */
	before = le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx);
	for (unsigned i = 0; i < NW; i++) {
		itest_fill(wbuf[i], LEN, 100 + i);
		req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
					   .sector = (uint64_t)i * LEN / 512,
					   .buf = wbuf[i],
					   .len = LEN};
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fa, 1, &req[i]), 0);
	}
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fa, 1), true), 0);
	{
		uint64_t t0 = vqfe_now_ns();

		CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fa, 1, &base), 0);
		/* the reply waited for the held writes, which are all in the
		 * used ring now: nothing completes after it */
		CU_ASSERT(vqfe_now_ns() - t0 >= 100000000ull);
		CU_ASSERT_EQUAL((uint16_t)(le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx) - before),
				NW);
		CU_ASSERT_EQUAL((uint16_t)base, le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx));
		CU_ASSERT_EQUAL(vqfe_reap(fa, 1, NULL, ~0u), NW);
		for (unsigned i = 0; i < NW; i++)
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	}
	/* The ring resumes at that base; the writes read back. */
	CU_ASSERT_EQUAL_FATAL(vqfe_vq_restart(fa, 1, base), 0);
	for (unsigned i = 0; i < NW; i++) {
		static uint8_t got[LEN];

		CU_ASSERT_EQUAL(vqfe_read(fa, 1, (uint64_t)i * LEN, got, LEN), 0);
		CU_ASSERT_EQUAL(memcmp(got, wbuf[i], LEN), 0);
	}
	vqfe_close(fa);
	CU_ASSERT_EQUAL(itest_signal_wait(&a, SIGTERM, 20000), 0);
	/* The threads served the reads and writes above themselves. */
	f = fopen(a.log, "r");
	CU_ASSERT_FATAL(f != NULL);
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "fast path: ");

		if (p)
			hits = strtoull(p + strlen("fast path: "), NULL, 10);
	}
	fclose(f);
	CU_ASSERT(hits >= NR + NW);
	if (hits < NR + NW)
		itest_dump_log(&a);
	STOP(a);
	finish(dir, img, &dl);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("migration", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("two daemons on one image with --incoming");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "handoff", t_handoff, skip);
	tu_add_test(s, "threads", t_threads, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.migration", add_suites);
}
