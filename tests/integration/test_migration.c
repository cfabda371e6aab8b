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
 */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define CHUNK 65536u

static bool lock_held(const char *path, off_t off)
{
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	bool held;

	if (fd < 0)
		return false;
	held = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
	close(fd);
	return held;
}

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

static void t_handoff(void)
{
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64];
	struct vqfe_msg_hdr h;
	uint64_t maxgpa = 0, gpa, size, v, logsz;
	uint32_t base = 0;
	uint8_t *log;
	int logfd;

	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, sizeof(img), "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 64M", img), 0);

	START(a, .extra = {"--format", "qcow2", "--blk-file", img});
	START(b, .extra = {"--format", "qcow2", "--blk-file", img, "--incoming"});
	CONNECT(fa, a, NULL);
	CU_ASSERT_EQUAL(write_pattern(fa, 0, 1), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 1 * MiB, 2), 0);
	CU_ASSERT(lock_held(img, 101)); /* the source's write lock */

	/* Migration starts: a dirty log, then VHOST_F_LOG_ALL. */
	for (unsigned i = 0; vqfe_region(fa, i, &gpa, &size) == 0; i++)
		if (gpa + size > maxgpa)
			maxgpa = gpa + size;
	logsz = (maxgpa / 4096 + 7) / 8;
	logfd = memfd_create("log", MFD_CLOEXEC);
	CU_ASSERT_FATAL(logfd >= 0 && ftruncate(logfd, (off_t)logsz) == 0);
	log = mmap(NULL, logsz, PROT_READ | PROT_WRITE, MAP_SHARED, logfd, 0);
	CU_ASSERT_FATAL(log != MAP_FAILED);
	{
		uint64_t lm[2] = {logsz, 0};

		CU_ASSERT_EQUAL(vqfe_send_msg(fa, VHOST_USER_SET_LOG_BASE, VHOST_USER_VERSION, lm,
					      sizeof(lm), &logfd, 1),
				0);
		CU_ASSERT_EQUAL(vqfe_recv_msg(fa, &h, &v, sizeof(v), 5000), 8);
		CU_ASSERT_EQUAL(h.request, VHOST_USER_SET_LOG_BASE);
	}
	v = vqfe_features(fa) | (1ull << 26);
	CU_ASSERT_EQUAL(vqfe_call(fa, VHOST_USER_SET_FEATURES, &v, 8, NULL, 0, true, NULL, 0), 0);
	CU_ASSERT_EQUAL(bits(log, logsz), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 2 * MiB, 3), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 0, 1));
	CU_ASSERT(bits(log, logsz) >= 2); /* read data, status bytes, used ring */

	/* Switchover: the source's ring stops; it lets the image go. */
	CU_ASSERT_EQUAL(vqfe_vq_stop(fa, 0, &base), 0);
	for (int i = 0; i < 500 && lock_held(img, 101); i++)
		usleep(10000);
	CU_ASSERT(!lock_held(img, 100) && !lock_held(img, 101));
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);

	/* The destination's ring starts: it takes the image. */
	{
		CONNECT(fb, b, NULL);
		/* (taken as the ring starts, before the first request is popped) */
		CU_ASSERT_TRUE(check_pattern(fb, 0, 1));
		CU_ASSERT(lock_held(img, 101));
		CU_ASSERT_TRUE(check_pattern(fb, 1 * MiB, 2));
		CU_ASSERT_TRUE(check_pattern(fb, 2 * MiB, 3));
		CU_ASSERT_EQUAL(write_pattern(fb, 3 * MiB, 4), 0);
		CU_ASSERT_EQUAL(write_pattern(fb, 0, 5), 0);
		/* The migration fails after all: the destination goes away. */
		vqfe_close(fb);
	}
	STOP(b);
	CU_ASSERT(!lock_held(img, 101));

	/* The source's guest resumes: it takes the image back, afresh. */
	CU_ASSERT_EQUAL(vqfe_vq_restart(fa, 0, base), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 3 * MiB, 4));
	CU_ASSERT_TRUE(check_pattern(fa, 0, 5));
	CU_ASSERT_TRUE(check_pattern(fa, 2 * MiB, 3));
	CU_ASSERT_EQUAL(write_pattern(fa, 4 * MiB, 6), 0);
	CU_ASSERT(lock_held(img, 101));
	vqfe_close(fa);
	STOP(a);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	munmap(log, logsz);
	close(logfd);
	tu_sh("rm -rf %s", dir);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("migration", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("two daemons on one image with --incoming");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "handoff", t_handoff, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.migration", add_suites);
}
