/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of img/img.c and img/img_raw.c over a real io/ loop on a
 * temporary file (in $VQCOW_TEST_DIR, else the current directory unless it is
 * tmpfs, else /var/tmp), with io/'s fault injection for the error paths.
 */
#include <CUnit/Basic.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/virtio_blk.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "blk.h"
#include "img.h"
#include "img_tio.h"
#include "io.h"
#include "io_inject.h"
#include "testutil.h"

#define IMG_SIZE (4u << 20)
#define MAX_ITER 100000

static char g_dir[512];
static char g_path[600];
static struct io_loop *g_loop;
static void run_until(const int *calls, int want)
{
	for (int i = 0; i < MAX_ITER && *calls < want; i++) {
		int r = io_loop_run_once(g_loop, true);

		CU_ASSERT_FATAL(r >= 0);
	}
	CU_ASSERT_EQUAL(*calls, want);
}

static void pick_dir(void)
{
	snprintf(g_dir, sizeof(g_dir), "%s", tu_test_dir());
}

static uint8_t pat(uint64_t off)
{
	return (uint8_t)((off * 13) ^ (off >> 9));
}

/* Create g_path: IMG_SIZE bytes of pattern (or @head at the start). */
static void make_file(const void *head, size_t head_len)
{
	static uint8_t buf[65536];
	int fd;

	snprintf(g_path, sizeof(g_path), "%s/test_img_raw.XXXXXX", g_dir);
	fd = mkstemp(g_path);
	CU_ASSERT_FATAL(fd >= 0);
	for (uint64_t off = 0; off < IMG_SIZE; off += sizeof(buf)) {
		for (size_t i = 0; i < sizeof(buf); i++)
			buf[i] = pat(off + i);
		if (off == 0 && head)
			memcpy(buf, head, head_len);
		CU_ASSERT_FATAL(pwrite(fd, buf, sizeof(buf), (off_t)off) == (ssize_t)sizeof(buf));
	}
	close(fd);
}

static struct img *open_img(bool ro)
{
	struct img_opts o = {.read_only = ro, .direct = true};
	struct img *img = NULL;
	char err[256];
	int ret;

	ret = img_open(&img, g_loop, g_path, &o, err, sizeof(err));
	if (ret < 0)
		fprintf(stderr, "img_open: %s\n", err);
	CU_ASSERT_EQUAL_FATAL(ret, 0);
	return img;
}

static int do_rw(struct img *img, bool write, void *buf, size_t len, uint64_t off)
{
	struct tio t;
	struct iovec iov = {buf, len};

	tio_init(&t);
	g_in_submit = true;
	if (write)
		img_writev(img, &t.io, &iov, 1, off, len);
	else
		img_readv(img, &t.io, &iov, 1, off, len);
	g_in_submit = false;
	CU_ASSERT_EQUAL(t.calls, 0);
	run_until(&t.calls, 1);
	return t.res;
}

static int do_op(struct img *img, uint8_t op, uint64_t off, uint64_t len, unsigned flags)
{
	struct tio t;

	tio_init(&t);
	g_in_submit = true;
	switch (op) {
	case IMG_OP_FLUSH:
		img_flush(img, &t.io);
		break;
	case IMG_OP_DISCARD:
		img_discard(img, &t.io, off, len);
		break;
	default:
		img_write_zeroes(img, &t.io, off, len, flags);
		break;
	}
	g_in_submit = false;
	CU_ASSERT_EQUAL(t.calls, 0);
	run_until(&t.calls, 1);
	return t.res;
}

static bool all_zero(const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (b[i])
			return false;
	return true;
}

static bool is_pattern(const uint8_t *b, size_t n, uint64_t off)
{
	for (size_t i = 0; i < n; i++)
		if (b[i] != pat(off + i))
			return false;
	return true;
}

static void test_open_probe(void)
{
	struct img *img = NULL;
	struct img_opts o = {.direct = true};
	char err[256], desc[256];
	static const uint8_t magic[4] = {'Q', 'F', 'I', 0xfb};

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_STRING_EQUAL(img->ops->format, "raw");
	CU_ASSERT_EQUAL(img->size, IMG_SIZE);
	CU_ASSERT(img->align >= 512);
	CU_ASSERT_FALSE(img->read_only);
	CU_ASSERT(img->supports_discard);
	CU_ASSERT(img->supports_write_zeroes);
	CU_ASSERT_PTR_EQUAL(img->loop, g_loop);
	img_describe(img, desc, sizeof(desc));
	CU_ASSERT_PTR_NOT_NULL(strstr(desc, "raw"));
	CU_ASSERT_PTR_NOT_NULL(strstr(desc, g_path));
	img_close(img);

	/* NULL opts: probe, read-write */
	CU_ASSERT_EQUAL(img_open(&img, g_loop, g_path, NULL, err, sizeof(err)), 0);
	img_close(img);

	/* unknown format name */
	o.format = "vmdk";
	err[0] = 0;
	CU_ASSERT_EQUAL(img_open(&img, g_loop, g_path, &o, err, sizeof(err)), -EINVAL);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "vmdk"));
	unlink(g_path);

	/* missing file: -ENOENT, message names it */
	err[0] = 0;
	CU_ASSERT_EQUAL(img_open(&img, g_loop, g_path, NULL, err, sizeof(err)), -ENOENT);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, g_path));

	/* a directory is not an image */
	o.format = "raw";
	CU_ASSERT(img_open(&img, g_loop, g_dir, &o, err, sizeof(err)) < 0);

	/* qcow2 magic goes to the qcow2 driver (which refuses this garbage header,
	 * or is absent), unless raw is forced */
	make_file(magic, sizeof(magic));
	err[0] = 0;
	CU_ASSERT(img_open(&img, g_loop, g_path, NULL, err, sizeof(err)) < 0);
	CU_ASSERT(err[0] != 0);
	o.format = "raw";
	CU_ASSERT_EQUAL_FATAL(img_open(&img, g_loop, g_path, &o, err, sizeof(err)), 0);
	CU_ASSERT_STRING_EQUAL(img->ops->format, "raw");
	img_close(img);
	unlink(g_path);
}

static void test_rw_flush(void)
{
	struct img *img;
	uint8_t *buf = io_alloc_aligned(65536);

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 65536, 8192), 0);
	CU_ASSERT(is_pattern(buf, 65536, 8192));
	memset(buf, 0x77, 4096);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 1 << 20), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_FLUSH, 0, 0, 0), 0);
	memset(buf, 0, 8192);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 8192, (1 << 20) - 4096), 0);
	CU_ASSERT(is_pattern(buf, 4096, (1 << 20) - 4096));
	for (int i = 4096; i < 8192; i++)
		CU_ASSERT_EQUAL_FATAL(buf[i], 0x77);
	/* 512-byte aligned but not 4 KiB aligned (bounce / buffered path in io/) */
	memset(buf + 512, 0x33, 512);
	CU_ASSERT_EQUAL(do_rw(img, true, buf + 512, 512, 512 * 3), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 2048, 0), 0);
	CU_ASSERT(is_pattern(buf, 1536, 0));
	CU_ASSERT(buf[1536] == 0x33 && buf[2047] == 0x33);
	/* beyond the end: refused */
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, IMG_SIZE - 512), -EINVAL);
	img_close(img);
	unlink(g_path);
	io_free_aligned(buf);
}

static void test_discard_zeroes(void)
{
	struct img *img;
	uint8_t *buf = io_alloc_aligned(1 << 20);
	struct stat st;

	make_file(NULL, 0);
	img = open_img(false);
	/* discard punches a hole: reads back zeroes, size unchanged */
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_DISCARD, 65536, 65536, 0), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 3 * 65536, 0), 0);
	CU_ASSERT(is_pattern(buf, 65536, 0));
	CU_ASSERT(all_zero(buf + 65536, 65536));
	CU_ASSERT(is_pattern(buf + 131072, 65536, 131072));
	/* write zeroes without and with UNMAP */
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 262144, 4096, 0), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 270336, 8192, IMG_IO_UNMAP), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 32768, 258048), 0);
	CU_ASSERT(is_pattern(buf, 4096, 258048));
	CU_ASSERT(all_zero(buf + 4096, 4096));
	CU_ASSERT(is_pattern(buf + 8192, 4096, 266240));
	CU_ASSERT(all_zero(buf + 12288, 8192));
	CU_ASSERT(is_pattern(buf + 20480, 12288, 278528));
	CU_ASSERT_EQUAL(stat(g_path, &st), 0);
	CU_ASSERT_EQUAL(st.st_size, IMG_SIZE);

	/* file system refuses fallocate: discard is a hint (OK, data kept);
	 * write zeroes falls back to writing a zero buffer, in several chunks */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 0, -EOPNOTSUPP), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_DISCARD, 0, 4096, 0), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 1 << 20, 600 * 1024, IMG_IO_UNMAP), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 2 << 20, 1024, 0), 0);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 0), 0);
	CU_ASSERT(is_pattern(buf, 4096, 0));
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 1 << 20, 1 << 20), 0);
	CU_ASSERT(all_zero(buf, 600 * 1024));
	CU_ASSERT(is_pattern(buf + 600 * 1024, 4096, (1 << 20) + 600 * 1024));
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 2 << 20), 0);
	CU_ASSERT(all_zero(buf, 1024));
	CU_ASSERT(is_pattern(buf + 1024, 3072, (2 << 20) + 1024));
	img_close(img);
	unlink(g_path);
	io_free_aligned(buf);
}

static void test_injected_errors(void)
{
	struct img *img;
	uint8_t *buf = io_alloc_aligned(65536);

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, -EIO), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 0), -EIO);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 0), 0); /* fires once */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_WRITEV, 1, -ENOSPC), 0);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), -ENOSPC);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FDATASYNC, 1, -EIO), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_FLUSH, 0, 0, 0), -EIO);
	/* a real error from fallocate is reported, not hidden by fallbacks */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 1, -EIO), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 0, 4096, 0), -EIO);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 1, -EIO), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_DISCARD, 0, 4096, 0), -EIO);
	/* fallback write fails in its second chunk */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_FALLOCATE, 1, -EOPNOTSUPP), 0);
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_WRITEV, 2, -EIO), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 0, 512 * 1024, 0), -EIO);
	io_loop_inject_clear(g_loop);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 256 * 1024), 0);
	CU_ASSERT(is_pattern(buf, 4096, 256 * 1024)); /* second chunk not written */
	/* short transfers are invisible */
	CU_ASSERT_EQUAL(io_loop_inject(g_loop, IO_OP_READV, 1, 4096), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 65536, 1 << 20), 0);
	CU_ASSERT(is_pattern(buf, 65536, 1 << 20));
	io_loop_inject_clear(g_loop);
	img_close(img);
	unlink(g_path);
	io_free_aligned(buf);
}

static void test_read_only(void)
{
	struct img *img;
	uint8_t *buf = io_alloc_aligned(4096);

	make_file(NULL, 0);
	img = open_img(true);
	CU_ASSERT(img->read_only);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 0), 0);
	CU_ASSERT(is_pattern(buf, 4096, 0));
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), -EROFS);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_DISCARD, 0, 4096, 0), -EROFS);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 0, 4096, 0), -EROFS);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_FLUSH, 0, 0, 0), 0);
	img_close(img);
	/* the file itself was opened O_RDONLY: a read-only file opens fine */
	CU_ASSERT_EQUAL(chmod(g_path, 0400), 0);
	if (geteuid() != 0) {
		img = open_img(true);
		img_close(img);
	}
	unlink(g_path);
	io_free_aligned(buf);
}

/* Is QEMU's lock byte @off (100..203) of the image held by another open file description? */
static bool lock_bytes_held(int off)
{
	return tu_lock_held(g_path, off);
}

/*
 * Image locks and img_set_perm(): a read-write raw image holds bytes 100,
 * 101 and 201 (uses read and write, does not share write), a second
 * read-write open is refused, and the permission can be given up and taken
 * back at run time; without WRITE nothing is written (-EROFS).
 */
static void test_perm(void)
{
	struct img_opts o = {.direct = true};
	struct img *img, *other = NULL;
	uint8_t *buf = io_alloc_aligned(4096);
	char err[256];

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_EQUAL(img->perm, IMG_PERM_WRITE);
	CU_ASSERT(lock_bytes_held(100) && lock_bytes_held(101) && lock_bytes_held(201));
	CU_ASSERT(!lock_bytes_held(102) && !lock_bytes_held(103) && !lock_bytes_held(200) &&
		  !lock_bytes_held(203));
	CU_ASSERT_EQUAL(img_open(&other, g_loop, g_path, &o, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "Failed to get \"write\" lock"));
	CU_ASSERT_PTR_NOT_NULL(strstr(err, g_path));
	o.read_only = true;
	CU_ASSERT_EQUAL(img_open(&other, g_loop, g_path, &o, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_PTR_NOT_NULL(strstr(err, "Failed to get shared \"write\" lock"));
	o.force_share = true;
	CU_ASSERT_EQUAL_FATAL(img_open(&other, g_loop, g_path, &o, err, sizeof(err)), 0);
	img_close(other);

	/* give up write: writes fail, the bytes go, a reader may join */
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_READ, err, sizeof(err)), 0);
	CU_ASSERT(!lock_bytes_held(101) && lock_bytes_held(100) && lock_bytes_held(201));
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), -EROFS);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 0), 0);
	/* nothing at all (an inactive image): a writer may open it meanwhile */
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_NONE, err, sizeof(err)), 0);
	CU_ASSERT(!lock_bytes_held(100) && !lock_bytes_held(201));
	o.read_only = false;
	o.force_share = false;
	CU_ASSERT_EQUAL_FATAL(img_open(&other, g_loop, g_path, &o, err, sizeof(err)), 0);
	/* ... and then we cannot take write back */
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_WRITE, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_EQUAL(img->perm, IMG_PERM_NONE);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), -EROFS);
	img_close(other);
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_WRITE, err, sizeof(err)), 0);
	memset(buf, 0x5a, 4096);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), 0);
	img_close(img);
	CU_ASSERT(!lock_bytes_held(100) && !lock_bytes_held(101) && !lock_bytes_held(201));

	/* read-only: no write permission to take */
	img = open_img(true);
	CU_ASSERT_EQUAL(img_set_perm(img, IMG_PERM_WRITE, err, sizeof(err)), -EROFS);
	img_close(img);
	unlink(g_path);
	io_free_aligned(buf);
}

static void test_refresh_size(void)
{
	struct img *img;
	struct blk_dev *dev;
	struct blk_opts o = {.logical_block_size = 512};

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_EQUAL_FATAL(blk_dev_init(&dev, img, &o), 0);
	CU_ASSERT_EQUAL(img_refresh_size(img), 0);
	CU_ASSERT_EQUAL(img->size, IMG_SIZE);
	CU_ASSERT_FALSE(blk_dev_update_capacity(dev));
	CU_ASSERT_EQUAL(truncate(g_path, 2 * IMG_SIZE), 0);
	CU_ASSERT_EQUAL(img_refresh_size(img), 0);
	CU_ASSERT_EQUAL(img->size, 2 * IMG_SIZE);
	CU_ASSERT(blk_dev_update_capacity(dev));
	blk_dev_exit(dev);
	img_close(img);
	unlink(g_path);
}

/* A probed raw image refuses a qcow2 header in its first bytes. */
static void test_probed_magic_guard(void)
{
	static const uint8_t magic[4] = {'Q', 'F', 'I', 0xfb};
	struct img *img;
	struct img_opts o = {.direct = true, .format = "raw"};
	char err[256];
	uint8_t *buf = io_alloc_aligned(4096);
	struct iovec iov[2];
	struct tio t;

	make_file(NULL, 0);
	img = open_img(false); /* probed */
	memset(buf, 0, 4096);
	memcpy(buf, magic, 4);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 0), -EPERM);
	/* split over iovecs */
	iov[0] = (struct iovec){buf, 2};
	iov[1] = (struct iovec){buf + 2, 510};
	tio_init(&t);
	img_writev(img, &t.io, iov, 2, 0, 512);
	run_until(&t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EPERM);
	/* elsewhere, or other bytes in sector 0: fine */
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 4096), 0);
	buf[0] = 'q';
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 512, 0), 0);
	img_close(img);
	/* --format raw: the user asked for it */
	buf[0] = 'Q';
	CU_ASSERT_EQUAL_FATAL(img_open(&img, g_loop, g_path, &o, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 512, 0), 0);
	img_close(img);
	unlink(g_path);
	io_free_aligned(buf);
}

/* Can this process attach a loop device (root, and one is free)? */
static const char *no_loop_device(void)
{
	if (geteuid() != 0)
		return "attaching a loop device needs root";
	if (tu_sh("losetup -f >/dev/null 2>&1") != 0)
		return "no free loop device (losetup -f)";
	return NULL;
}

/* A block device (loop device over a temp file), when root can make one. */
static void test_blockdev(void)
{
	char cmd[700], dev[64] = "";
	struct img *img;
	struct img_opts o = {.direct = true};
	char err[256], desc[256];
	uint8_t *buf = io_alloc_aligned(65536);
	FILE *p;

	make_file(NULL, 0);
	snprintf(cmd, sizeof(cmd), "losetup -f --show '%s' 2>/dev/null", g_path);
	p = geteuid() == 0 ? popen(cmd, "r") : NULL;
	if (p) {
		if (!fgets(dev, sizeof(dev), p))
			dev[0] = '\0';
		pclose(p);
	}
	dev[strcspn(dev, "\n")] = '\0';
	if (strncmp(dev, "/dev/loop", 9) != 0) {
		CU_FAIL("losetup failed although a loop device was free at start-up");
		unlink(g_path);
		io_free_aligned(buf);
		return;
	}
	CU_ASSERT_EQUAL_FATAL(img_open(&img, g_loop, dev, &o, err, sizeof(err)), 0);
	CU_ASSERT_EQUAL(img->size, IMG_SIZE);
	img_describe(img, desc, sizeof(desc));
	CU_ASSERT_PTR_NOT_NULL(strstr(desc, "block device"));
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 65536, 65536), 0);
	CU_ASSERT(is_pattern(buf, 65536, 65536));
	memset(buf, 0x99, 4096);
	CU_ASSERT_EQUAL(do_rw(img, true, buf, 4096, 8192), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_FLUSH, 0, 0, 0), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 65536, 4096, 0), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_WRITE_ZEROES, 131072, 4096, IMG_IO_UNMAP), 0);
	CU_ASSERT_EQUAL(do_op(img, IMG_OP_DISCARD, 262144, 65536, 0), 0);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 8192), 0);
	CU_ASSERT_EQUAL(buf[0], 0x99);
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 65536), 0);
	CU_ASSERT(all_zero(buf, 4096));
	CU_ASSERT_EQUAL(do_rw(img, false, buf, 4096, 131072), 0);
	CU_ASSERT(all_zero(buf, 4096));
	img_close(img);
	snprintf(cmd, sizeof(cmd), "losetup -d '%s'", dev);
	CU_ASSERT_EQUAL(system(cmd), 0);
	unlink(g_path);
	io_free_aligned(buf);
}

/* blk/ over a raw image on the real loop: a writethrough write, then a read. */
struct breq {
	struct blk_req req;
	struct iovec iov[3];
	int calls;
	uint32_t used;
};

static void breq_done(struct blk_req *req, uint32_t used)
{
	struct breq *b = (struct breq *)req;

	b->calls++;
	b->used = used;
}

/* One request through blk_req_submit, run to its completion on the loop:
 * the header (@type, @sector), @len bytes of @data (device-readable for
 * VIRTIO_BLK_T_OUT, else writable), the status byte @st; b->used: the used
 * length. */
static void blk_do(struct blk_dev *dev, struct breq *b, uint32_t type, uint64_t sector,
		   uint8_t *data, size_t len, uint8_t *st)
{
	uint8_t hdr[16] = {0};
	uint32_t t = htole32(type);
	uint64_t s = htole64(sector);
	bool out = type == VIRTIO_BLK_T_OUT;

	memcpy(hdr, &t, 4);
	memcpy(hdr + 8, &s, 8);
	memset(b, 0, sizeof(*b));
	*st = 0xff;
	b->iov[0] = (struct iovec){hdr, 16};
	b->iov[1] = (struct iovec){data, len};
	b->iov[2] = (struct iovec){st, 1};
	b->req.iov = b->iov;
	b->req.out_num = out ? 2 : 1;
	b->req.in_num = out ? 1 : 2;
	b->req.complete = breq_done;
	blk_req_submit(dev, &b->req);
	run_until(&b->calls, 1);
}

static void test_blk_over_raw(void)
{
	struct img *img;
	struct blk_dev *dev;
	struct blk_opts o = {.logical_block_size = 512, .queue_size = 128, .writeback = false};
	uint8_t *data = io_alloc_aligned(8192);
	uint8_t st = 0xff;
	struct breq b;

	make_file(NULL, 0);
	img = open_img(false);
	CU_ASSERT_EQUAL_FATAL(blk_dev_init(&dev, img, &o), 0);
	memset(data, 0xc3, 8192);
	blk_do(dev, &b, VIRTIO_BLK_T_OUT, 16, data, 8192, &st);
	CU_ASSERT_EQUAL(st, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(b.used, 1);

	memset(data, 0, 8192);
	blk_do(dev, &b, VIRTIO_BLK_T_IN, 15, data, 1024, &st);
	CU_ASSERT_EQUAL(st, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(b.used, 1025);
	CU_ASSERT(is_pattern(data, 512, 15 * 512));
	CU_ASSERT(data[512] == 0xc3 && data[1023] == 0xc3);
	CU_ASSERT_EQUAL(blk_dev_inflight(dev), 0);
	blk_dev_exit(dev);
	img_close(img);
	unlink(g_path);
	io_free_aligned(data);
}

/*
 * FLUSHes from several threads (I/O threads' queues on one raw image): one
 * fdatasync of the file in flight at a time, a FLUSH sent while one runs
 * waits for the next. Each thread's loop has a fault hook that holds every
 * fdatasync's submission for 3 ms and counts the ones held at once: with a
 * FLUSH per thread going straight to fdatasync, the threads' syncs overlap
 * in every round (the barrier starts them together).
 */
#define SQ_THREADS 4
#define SQ_ROUNDS  8
#define SQ_PER     2 /* FLUSHes a thread sends at once per round */

static struct img *g_sq_img;
static pthread_barrier_t g_sq_barrier;
static int g_sq_active, g_sq_overlaps, g_sq_started;

static int sq_hook(void *opaque, struct io_loop *loop, enum io_op op)
{
	(void)opaque;
	(void)loop;
	if (op != IO_OP_FDATASYNC)
		return 0;
	if (__atomic_add_fetch(&g_sq_active, 1, __ATOMIC_SEQ_CST) > 1)
		__atomic_add_fetch(&g_sq_overlaps, 1, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&g_sq_started, 1, __ATOMIC_SEQ_CST);
	usleep(3000);
	__atomic_sub_fetch(&g_sq_active, 1, __ATOMIC_SEQ_CST);
	return 0;
}

struct sq_thread {
	pthread_t tid;
	unsigned idx;
	int bad;   /* a FLUSH or write failed, or completed twice */
	int early; /* a FLUSH completed with no fdatasync started after it was sent */
};

struct sq_tio {
	struct img_io io;
	int calls, res;
};

static void sq_done(struct img_io *io, int res)
{
	struct sq_tio *t = (struct sq_tio *)io;

	t->calls++;
	t->res = res;
}

static void *sq_main(void *arg)
{
	struct sq_thread *t = arg;
	struct io_loop *loop = NULL;
	uint8_t *buf = io_alloc_aligned(4096);

	if (!buf || io_loop_init(&loop, 64) < 0 || io_loop_enable_remote(loop) < 0) {
		t->bad++;
		for (int r = 0; r < SQ_ROUNDS; r++)
			pthread_barrier_wait(&g_sq_barrier);
		goto out;
	}
	io_loop_set_fault_hook(loop, sq_hook, NULL);
	for (int r = 0; r < SQ_ROUNDS; r++) {
		struct sq_tio w = {0}, f[SQ_PER];
		struct iovec iov = {buf, 4096};
		int sent[SQ_PER], left = SQ_PER + 1;

		/* a write on this thread, then FLUSHes with every other thread */
		memset(buf, 0x40 + t->idx, 4096);
		w.io.done = sq_done;
		w.io.loop = loop;
		img_writev(g_sq_img, &w.io, &iov, 1, (uint64_t)(t->idx * SQ_ROUNDS + r) * 4096,
			   4096);
		pthread_barrier_wait(&g_sq_barrier);
		for (int i = 0; i < SQ_PER; i++) {
			memset(&f[i], 0, sizeof(f[i]));
			f[i].io.done = sq_done;
			f[i].io.loop = loop;
			sent[i] = __atomic_load_n(&g_sq_started, __ATOMIC_SEQ_CST);
			img_flush(g_sq_img, &f[i].io);
		}
		for (int it = 0; it < MAX_ITER && left; it++) {
			if (io_loop_run_once(loop, true) < 0)
				break;
			left = !w.calls;
			for (int i = 0; i < SQ_PER; i++) {
				if (f[i].calls && sent[i] >= 0) {
					if (__atomic_load_n(&g_sq_started, __ATOMIC_SEQ_CST) <=
					    sent[i])
						t->early++;
					sent[i] = -1;
				}
				left += !f[i].calls;
			}
		}
		if (w.calls != 1 || w.res != 0)
			t->bad++;
		for (int i = 0; i < SQ_PER; i++)
			if (f[i].calls != 1 || f[i].res != 0)
				t->bad++;
	}
	io_loop_exit(loop);
out:
	io_free_aligned(buf);
	return NULL;
}

static void test_flush_threads(void)
{
	struct sq_thread t[SQ_THREADS];
	uint8_t *buf = io_alloc_aligned(4096);

	make_file(NULL, 0);
	g_sq_img = open_img(false);
	g_sq_active = g_sq_overlaps = g_sq_started = 0;
	CU_ASSERT_FATAL(g_sq_img->any_loop);
	CU_ASSERT_EQUAL_FATAL(pthread_barrier_init(&g_sq_barrier, NULL, SQ_THREADS), 0);
	for (unsigned i = 0; i < SQ_THREADS; i++) {
		t[i] = (struct sq_thread){.idx = i};
		CU_ASSERT_EQUAL_FATAL(pthread_create(&t[i].tid, NULL, sq_main, &t[i]), 0);
	}
	for (unsigned i = 0; i < SQ_THREADS; i++) {
		pthread_join(t[i].tid, NULL);
		CU_ASSERT_EQUAL(t[i].bad, 0);
		CU_ASSERT_EQUAL(t[i].early, 0);
	}
	pthread_barrier_destroy(&g_sq_barrier);
	CU_ASSERT_EQUAL(g_sq_overlaps, 0);
	/* a thread's second FLUSH of a round always waits: it rides the next sync */
	CU_ASSERT(g_sq_started > 0);
	CU_ASSERT(g_sq_started < SQ_THREADS * SQ_ROUNDS * SQ_PER);
	/* every thread's writes are there */
	for (unsigned i = 0; i < SQ_THREADS; i++)
		for (int r = 0; r < SQ_ROUNDS; r++) {
			CU_ASSERT_EQUAL(
			    do_rw(g_sq_img, false, buf, 4096, (uint64_t)(i * SQ_ROUNDS + r) * 4096),
			    0);
			CU_ASSERT(buf[0] == 0x40 + i && buf[4095] == 0x40 + i);
		}
	img_close(g_sq_img);
	g_sq_img = NULL;
	unlink(g_path);
	io_free_aligned(buf);
}

int main(void)
{
	CU_pSuite s;
	int failed;

	pick_dir();
	if (io_loop_init(&g_loop, 64) < 0) {
		fprintf(stderr, "io_uring unavailable: skipping\n");
		return 77;
	}
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("img_raw", NULL, NULL);
	CU_add_test(s, "open and probe", test_open_probe);
	CU_add_test(s, "read, write, flush", test_rw_flush);
	CU_add_test(s, "FLUSHes from several threads: one fdatasync at a time", test_flush_threads);
	CU_add_test(s, "discard and write zeroes", test_discard_zeroes);
	CU_add_test(s, "injected errors", test_injected_errors);
	CU_add_test(s, "read-only", test_read_only);
	CU_add_test(s, "locks and img_set_perm", test_perm);
	CU_add_test(s, "blk over raw", test_blk_over_raw);
	CU_add_test(s, "refresh size", test_refresh_size);
	tu_add_test(s, "block device", test_blockdev, no_loop_device());
	CU_add_test(s, "probed raw: no qcow2 header in sector 0", test_probed_magic_guard);
	failed = (int)tu_cunit_run();
	io_loop_exit(g_loop);
	return failed ? 1 : 0;
}
