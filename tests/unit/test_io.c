/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of io/: a real io_uring loop on real files (O_DIRECT where the
 * filesystem allows it). Files live in $VQCOW_TEST_DIR, else the current
 * directory (the build tree under ctest), else /var/tmp; never on tmpfs if it
 * can be avoided, since tmpfs may refuse O_DIRECT.
 */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "io.h"
#include "io_inject.h"
#include "testutil.h"

#define container_of(p, T, m) ((T *)((char *)(p)-offsetof(T, m)))
#define MAX_ITER              100000

static char g_dir[512];
static bool g_in_submit; /* set around submitter calls: done() must not run then */
static int g_done;       /* total done() calls */

struct tcmd {
	struct io_cmd cmd;
	int calls;
	int res;
	int seq; /* value of g_done when completed */
};

static void tdone(struct io_cmd *c, int res)
{
	struct tcmd *t = container_of(c, struct tcmd, cmd);

	CU_ASSERT_FALSE(g_in_submit);
	t->calls++;
	t->res = res;
	t->seq = ++g_done;
}

static void tinit(struct tcmd *t)
{
	memset(t, 0, sizeof(*t));
	t->cmd.done = tdone;
}

/* Run the loop until *@calls reaches @want (bounded). */
static void run_until(struct io_loop *loop, const int *calls, int want)
{
	for (int i = 0; i < MAX_ITER && *calls < want; i++) {
		int r = io_loop_run_once(loop, true);

		CU_ASSERT_FATAL(r >= 0);
	}
	CU_ASSERT(*calls >= want);
}

static void run_all(struct io_loop *loop)
{
	for (int i = 0; i < MAX_ITER && io_loop_inflight(loop) > 0; i++)
		CU_ASSERT_FATAL(io_loop_run_once(loop, true) >= 0);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
}

static void pick_dir(void)
{
	snprintf(g_dir, sizeof(g_dir), "%s", tu_test_dir());
}

/* Create an empty temp file, open it with @flags and unlink it. */
static int tmp_open(struct io_file *f, unsigned flags, const char *dir)
{
	char path[600];
	int fd, ret;

	snprintf(path, sizeof(path), "%s/test_io.XXXXXX", dir ? dir : g_dir);
	fd = mkstemp(path);
	if (fd < 0)
		return -errno;
	close(fd);
	ret = io_file_open(f, path, flags);
	unlink(path);
	return ret;
}

static void fill(uint8_t *p, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)((i * 131 + seed * 7 + (i >> 9)) ^ seed);
}

/* ---- iov helpers ---- */

static void test_iov_helpers(void)
{
	char a[4], b[0], c[6], d[3];
	struct iovec src[] = {
	    {a, sizeof(a)},
	    {b, 0},
	    {c, sizeof(c)},
	    {d, sizeof(d)},
	};
	struct iovec dst[4];
	char buf[13], flat[13];
	int n;

	CU_ASSERT_EQUAL(io_iov_len(src, 4), 13);
	CU_ASSERT_EQUAL(io_iov_len(src, 0), 0);

	/* Whole array: the empty entry is dropped. */
	n = io_iov_slice(dst, 4, src, 4, 0, 13);
	CU_ASSERT_EQUAL(n, 3);
	CU_ASSERT_PTR_EQUAL(dst[0].iov_base, a);
	CU_ASSERT_EQUAL(dst[2].iov_len, 3);
	/* Empty slice, even at the very end. */
	CU_ASSERT_EQUAL(io_iov_slice(dst, 0, src, 4, 0, 0), 0);
	CU_ASSERT_EQUAL(io_iov_slice(dst, 4, src, 4, 13, 0), 0);
	/* Starting exactly on an entry boundary. */
	n = io_iov_slice(dst, 4, src, 4, 4, 6);
	CU_ASSERT_EQUAL(n, 1);
	CU_ASSERT_PTR_EQUAL(dst[0].iov_base, c);
	CU_ASSERT_EQUAL(dst[0].iov_len, 6);
	/* Inside one entry. */
	n = io_iov_slice(dst, 4, src, 4, 5, 2);
	CU_ASSERT_EQUAL(n, 1);
	CU_ASSERT_PTR_EQUAL(dst[0].iov_base, c + 1);
	CU_ASSERT_EQUAL(dst[0].iov_len, 2);
	/* Spanning three entries with partial ends. */
	n = io_iov_slice(dst, 4, src, 4, 3, 9);
	CU_ASSERT_EQUAL(n, 3);
	CU_ASSERT_PTR_EQUAL(dst[0].iov_base, a + 3);
	CU_ASSERT_EQUAL(dst[0].iov_len, 1);
	CU_ASSERT_EQUAL(dst[1].iov_len, 6);
	CU_ASSERT_PTR_EQUAL(dst[2].iov_base, d);
	CU_ASSERT_EQUAL(dst[2].iov_len, 2);
	/* Too short a source, too small a destination. */
	CU_ASSERT_EQUAL(io_iov_slice(dst, 4, src, 4, 0, 14), -EINVAL);
	CU_ASSERT_EQUAL(io_iov_slice(dst, 4, src, 4, 13, 1), -EINVAL);
	CU_ASSERT_EQUAL(io_iov_slice(dst, 4, src, 4, 20, 1), -EINVAL);
	CU_ASSERT_EQUAL(io_iov_slice(dst, 2, src, 4, 0, 13), -E2BIG);
	CU_ASSERT_EQUAL(io_iov_slice(dst, 4, src, 0, 0, 1), -EINVAL);

	/* to/from buf and memset at offsets. */
	for (int i = 0; i < 13; i++)
		flat[i] = (char)('a' + i);
	CU_ASSERT_EQUAL(io_iov_from_buf(src, 4, 0, flat, 13), 13);
	memset(buf, 0, sizeof(buf));
	CU_ASSERT_EQUAL(io_iov_to_buf(src, 4, 0, buf, 13), 13);
	CU_ASSERT_EQUAL(memcmp(buf, flat, 13), 0);
	CU_ASSERT_EQUAL(io_iov_to_buf(src, 4, 3, buf, 5), 5);
	CU_ASSERT_EQUAL(memcmp(buf, flat + 3, 5), 0);
	/* Asking beyond the end copies what there is. */
	CU_ASSERT_EQUAL(io_iov_to_buf(src, 4, 10, buf, 10), 3);
	CU_ASSERT_EQUAL(io_iov_from_buf(src, 4, 13, flat, 4), 0);
	io_iov_memset(src, 4, 2, 'z', 7);
	CU_ASSERT_EQUAL(io_iov_to_buf(src, 4, 0, buf, 13), 13);
	CU_ASSERT_EQUAL(memcmp(buf, "abzzzzzzzjklm", 13), 0);
	io_iov_memset(src, 4, 11, 0, 100); /* clamps to the end */
	CU_ASSERT_EQUAL(d[1], 0);
	CU_ASSERT_EQUAL(d[2], 0);
	CU_ASSERT_EQUAL(d[0], 'k');

	void *p = io_alloc_aligned(100);
	CU_ASSERT_PTR_NOT_NULL_FATAL(p);
	CU_ASSERT_EQUAL((uintptr_t)p % 4096, 0);
	io_free_aligned(p);
}

/* ---- files ---- */

static void test_open_direct(void)
{
	struct io_file f;
	int ret = tmp_open(&f, IO_FILE_DIRECT, NULL);

	CU_ASSERT_EQUAL_FATAL(ret, 0);
	for (int i = 0; i < IO_FIXED_LOOPS; i++)
		CU_ASSERT_EQUAL(f.fixed[i], 0);
	CU_ASSERT_EQUAL(f.size, 0);
	if (f.flags & IO_FILE_DIRECT) {
		CU_ASSERT(f.align >= 1 && (f.align & (f.align - 1)) == 0);
		fprintf(stderr, "note: O_DIRECT in %s, alignment %u\n", g_dir, f.align);
	} else {
		CU_ASSERT_EQUAL(f.align, 1);
		fprintf(stderr, "note: %s does not do O_DIRECT\n", g_dir);
	}
	io_file_close(&f);
	CU_ASSERT_EQUAL(f.fd, -1);
	CU_ASSERT_EQUAL(io_file_open(&f, "/nonexistent/x", 0), -ENOENT);
}

/* tmpfs may refuse O_DIRECT: open must fall back to buffered I/O and work. */
static void test_open_tmpfs_fallback(void)
{
	struct io_file f;
	char buf[512], out[512];

	CU_ASSERT_EQUAL_FATAL(tmp_open(&f, IO_FILE_DIRECT, "/dev/shm"), 0);
	memset(buf, 0x5a, sizeof(buf));
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&f, buf, sizeof(buf), 0), 0);
	CU_ASSERT_EQUAL(io_file_pread_sync(&f, out, sizeof(out), 0), 0);
	CU_ASSERT_EQUAL(memcmp(buf, out, sizeof(buf)), 0);
	io_file_close(&f);
}

static void test_from_fd(void)
{
	char path[600];
	struct io_file f;
	uint64_t size;
	int fd;

	snprintf(path, sizeof(path), "%s/test_io.XXXXXX", g_dir);
	fd = mkstemp(path);
	CU_ASSERT_FATAL(fd >= 0);
	unlink(path);
	CU_ASSERT_EQUAL(ftruncate(fd, 12345), 0);
	CU_ASSERT_EQUAL_FATAL(io_file_from_fd(&f, fd, IO_FILE_ZERO_EOF), 0);
	CU_ASSERT_EQUAL(f.size, 12345);
	CU_ASSERT_EQUAL(f.align, 1);
	CU_ASSERT(f.flags & IO_FILE_ZERO_EOF);
	CU_ASSERT_FALSE(f.flags & IO_FILE_DIRECT);
	CU_ASSERT_EQUAL(ftruncate(f.fd, 777), 0);
	CU_ASSERT_EQUAL(io_file_get_size(&f, &size), 0);
	CU_ASSERT_EQUAL(size, 777);
	io_file_close(&f);

	/* A pipe is neither a file nor a block device; the fd is closed. */
	int p[2];
	CU_ASSERT_EQUAL_FATAL(pipe(p), 0);
	CU_ASSERT_EQUAL(io_file_from_fd(&f, p[0], 0), -EINVAL);
	CU_ASSERT_EQUAL(fcntl(p[0], F_GETFD), -1);
	close(p[1]);
}

static void test_sync_helpers(void)
{
	struct io_file f;
	uint8_t *buf = malloc(20000), *out = malloc(20000);

	CU_ASSERT_FATAL(buf && out);
	CU_ASSERT_EQUAL_FATAL(tmp_open(&f, IO_FILE_DIRECT, NULL), 0);
	fill(buf, 20000, 1);
	/* Misaligned buffer, offset and length; extends the file exactly. */
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&f, buf + 1, 9999, 3), 0);
	uint64_t size;
	CU_ASSERT_EQUAL(io_file_get_size(&f, &size), 0);
	CU_ASSERT_EQUAL(size, 10002);
	memset(out, 0xff, 20000);
	/* Reading across EOF fills zeroes. */
	CU_ASSERT_EQUAL(io_file_pread_sync(&f, out + 3, 12000, 1), 0);
	CU_ASSERT_EQUAL(out[3], 0);
	CU_ASSERT_EQUAL(out[4], 0);
	CU_ASSERT_EQUAL(memcmp(out + 5, buf + 1, 9999), 0);
	for (int i = 3 + 10001; i < 3 + 12000; i++)
		CU_ASSERT_EQUAL_FATAL(out[i], 0);
	CU_ASSERT_EQUAL(io_file_sync(&f), 0);
	io_file_close(&f);
	free(buf);
	free(out);
}

/* ---- asynchronous I/O ---- */

struct env {
	struct io_loop *loop;
	struct io_file f;
	unsigned a; /* alignment used for "aligned" test buffers */
};

static void env_init(struct env *e, unsigned entries, unsigned flags)
{
	CU_ASSERT_EQUAL_FATAL(io_loop_init(&e->loop, entries), 0);
	CU_ASSERT_EQUAL_FATAL(tmp_open(&e->f, flags, NULL), 0);
	e->a = e->f.align > 512 ? e->f.align : 512;
	g_done = 0;
}

static void env_exit(struct env *e)
{
	CU_ASSERT_EQUAL(io_loop_inflight(e->loop), 0);
	io_file_close(&e->f);
	io_loop_exit(e->loop);
}

/* Submit one write or read and run it to completion; returns its result. */
static int do_rw(struct env *e, bool wr, struct iovec *iov, unsigned cnt, uint64_t off)
{
	struct tcmd t;

	tinit(&t);
	g_in_submit = true;
	if (wr)
		io_writev(e->loop, &t.cmd, &e->f, iov, cnt, off);
	else
		io_readv(e->loop, &t.cmd, &e->f, iov, cnt, off);
	g_in_submit = false;
	CU_ASSERT_EQUAL(t.calls, 0);
	run_until(e->loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.calls, 1);
	return t.res;
}

static void test_roundtrip_direct(void)
{
	struct env e;
	uint8_t *buf, *out;
	struct iovec iov[3], riov[2];

	env_init(&e, 32, IO_FILE_DIRECT);
	buf = io_alloc_aligned(65536);
	out = io_alloc_aligned(65536);
	CU_ASSERT_FATAL(buf && out);
	fill(buf, 65536, 2);
	iov[0] = (struct iovec){buf, 4096};
	iov[1] = (struct iovec){buf + 4096, 32768};
	iov[2] = (struct iovec){buf + 36864, 28672};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 3, 8192), 65536);
	memset(out, 0, 65536);
	riov[0] = (struct iovec){out, 8192};
	riov[1] = (struct iovec){out + 8192, 57344};
	CU_ASSERT_EQUAL(do_rw(&e, false, riov, 2, 8192), 65536);
	CU_ASSERT_EQUAL(memcmp(buf, out, 65536), 0);

	/* Single-buffer forms. */
	struct tcmd t;
	tinit(&t);
	io_read(e.loop, &t.cmd, &e.f, out, 4096, 8192 + 4096);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 4096);
	CU_ASSERT_EQUAL(memcmp(out, buf + 4096, 4096), 0);
	tinit(&t);
	io_write(e.loop, &t.cmd, &e.f, buf, 0, 0); /* empty: completes with 0 */
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);

	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

/* Misaligned buffers, offsets and lengths go through bounce buffers. */
static void test_misaligned(void)
{
	struct env e;
	uint8_t *buf, *out, *ref;
	struct iovec iov[3];
	uint64_t size;

	env_init(&e, 32, IO_FILE_DIRECT);
	buf = io_alloc_aligned(70000);
	out = io_alloc_aligned(70000);
	ref = calloc(1, 70000);
	CU_ASSERT_FATAL(buf && out && ref);

	/* Aligned offset and length, misaligned buffers (bounce, copy in). */
	fill(buf, 70000, 3);
	iov[0] = (struct iovec){buf + 1, 100};
	iov[1] = (struct iovec){buf + 200, 3996};
	iov[2] = (struct iovec){buf + 5000, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 3, 0), 8192);
	memcpy(ref, buf + 1, 100);
	memcpy(ref + 100, buf + 200, 3996);
	memcpy(ref + 4096, buf + 5000, 4096);
	/* Misaligned offset and length (buffered twin), extending the file. */
	fill(buf, 70000, 4);
	iov[0] = (struct iovec){buf + 3, 5000};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 1, 7000), 5000);
	memcpy(ref + 7000, buf + 3, 5000);
	CU_ASSERT_EQUAL(io_file_get_size(&e.f, &size), 0);
	CU_ASSERT_EQUAL(size, 12000);

	/* Aligned read sees both writes. */
	iov[0] = (struct iovec){out, 12288};
	memset(out, 0xee, 12288);
	e.f.flags |= IO_FILE_ZERO_EOF;
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 0), 12288);
	CU_ASSERT_EQUAL(memcmp(out, ref, 12000), 0);
	/* Misaligned read (bounce, copy out), several iovecs. */
	memset(out, 0xee, 70000);
	iov[0] = (struct iovec){out + 1, 33};
	iov[1] = (struct iovec){out + 100, 4000};
	iov[2] = (struct iovec){out + 9000, 777};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 3, 4001), 4810);
	CU_ASSERT_EQUAL(memcmp(out + 1, ref + 4001, 33), 0);
	CU_ASSERT_EQUAL(memcmp(out + 100, ref + 4034, 4000), 0);
	CU_ASSERT_EQUAL(memcmp(out + 9000, ref + 8034, 777), 0);
	CU_ASSERT_EQUAL(out[0], 0xee);
	CU_ASSERT_EQUAL(out[34], 0xee);
	CU_ASSERT_EQUAL(out[9777], 0xee);
	CU_ASSERT_EQUAL(iov[0].iov_len, 33); /* bounce path leaves the iovecs alone */

	/* A large misaligned read (bigger than the bounce classes). */
	uint8_t *big = malloc(2 << 20), *bigout = malloc(2 << 20);
	CU_ASSERT_FATAL(big && bigout);
	fill(big, 2 << 20, 5);
	iov[0] = (struct iovec){big + 1, (2 << 20) - 1};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 1, 65536), (2 << 20) - 1);
	iov[0] = (struct iovec){bigout + 7, (2 << 20) - 7};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 65536), (2 << 20) - 7);
	CU_ASSERT_EQUAL(memcmp(bigout + 7, big + 1, (2 << 20) - 7), 0);
	free(big);
	free(bigout);

	io_free_aligned(buf);
	io_free_aligned(out);
	free(ref);
	env_exit(&e);
}

/* Same on a buffered file: no bounce needed, but the paths must agree. */
static void test_buffered_roundtrip(void)
{
	struct env e;
	uint8_t buf[10000], out[10000];
	struct iovec iov[2];

	env_init(&e, 8, 0);
	CU_ASSERT_EQUAL(e.f.align, 1);
	fill(buf, sizeof(buf), 6);
	iov[0] = (struct iovec){buf + 1, 3000};
	iov[1] = (struct iovec){buf + 5000, 5000};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 2, 11), 8000);
	iov[0] = (struct iovec){out, 8000};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 11), 8000);
	CU_ASSERT_EQUAL(memcmp(out, buf + 1, 3000), 0);
	CU_ASSERT_EQUAL(memcmp(out + 3000, buf + 5000, 5000), 0);
	env_exit(&e);
}

static int do_sync(struct env *e)
{
	struct tcmd t;

	tinit(&t);
	g_in_submit = true;
	io_fdatasync(e->loop, &t.cmd, &e->f);
	g_in_submit = false;
	run_until(e->loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.calls, 1);
	return t.res;
}

/*
 * A failed fdatasync after writes through the page cache is sticky (Linux
 * marks the pages whose writeback failed clean and reports the error once
 * per open file: a retry would say 0 with the data lost); with O_DIRECT
 * writes only, a later fdatasync is believed again.
 */
static void test_sync_sticky(void)
{
	struct env e;
	uint8_t *buf = io_alloc_aligned(8192);
	struct iovec iov;

	CU_ASSERT_FATAL(buf != NULL);
	memset(buf, 0x5a, 8192);
	env_init(&e, 8, IO_FILE_DIRECT);
	if (e.f.flags & IO_FILE_DIRECT) {
		iov = (struct iovec){buf, 4096};
		CU_ASSERT_EQUAL(do_rw(&e, true, &iov, 1, 0), 4096); /* O_DIRECT */
		CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -EIO), 0);
		CU_ASSERT_EQUAL(do_sync(&e), -EIO);
		CU_ASSERT_EQUAL(do_sync(&e), 0);
		CU_ASSERT_EQUAL(io_file_sync(&e.f), 0);
		CU_ASSERT_EQUAL(io_file_sync_error(&e.f), 0);
		/* off alignment: the buffered twin fd, the page cache */
		iov = (struct iovec){buf, 100};
		CU_ASSERT_EQUAL(do_rw(&e, true, &iov, 1, 4097), 100);
		CU_ASSERT_EQUAL(do_sync(&e), 0); /* nothing failed yet */
		CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -EIO), 0);
		CU_ASSERT_EQUAL(do_sync(&e), -EIO);
		CU_ASSERT_EQUAL(do_sync(&e), -EIO);
		CU_ASSERT_EQUAL(io_file_sync(&e.f), -EIO);
		CU_ASSERT_EQUAL(io_file_sync_error(&e.f), -EIO);
		/* the first error stays: a later different one does not replace it */
		CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -ENOSPC), 0);
		CU_ASSERT_EQUAL(do_sync(&e), -ENOSPC);
		CU_ASSERT_EQUAL(do_sync(&e), -EIO);
		/* a transient failure is retried, never sticky (tested above) */
	}
	env_exit(&e);

	/* A file without O_DIRECT: every write goes through the page cache. */
	env_init(&e, 8, 0);
	iov = (struct iovec){buf, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, true, &iov, 1, 0), 4096);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -EAGAIN), 0);
	CU_ASSERT_EQUAL(do_sync(&e), 0); /* transient: retried */
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -ENOSPC), 0);
	CU_ASSERT_EQUAL(do_sync(&e), -ENOSPC);
	CU_ASSERT_EQUAL(do_sync(&e), -ENOSPC);
	CU_ASSERT_EQUAL(io_file_sync(&e.f), -ENOSPC);
	env_exit(&e);
	io_free_aligned(buf);

	/* Opened read-only without O_DIRECT, then read-write (a backing file
	 * that becomes a commit's base): its writes go through the page cache
	 * as well. */
	{
		char path[600];
		struct io_file f;
		int fd;

		snprintf(path, sizeof(path), "%s/test_io.XXXXXX", g_dir);
		fd = mkstemp(path);
		CU_ASSERT_FATAL(fd >= 0);
		close(fd);
		CU_ASSERT_EQUAL_FATAL(io_file_open(&f, path, IO_FILE_RDONLY), 0);
		CU_ASSERT_FALSE(io_file_pc_written(&f));
		CU_ASSERT_EQUAL(io_file_reopen_rw(&f, path, 0, IO_PERM_ALL, NULL, 0), 0);
		CU_ASSERT_TRUE(io_file_pc_written(&f));
		io_file_close(&f);
		unlink(path);
	}
}

static void test_inject_failures(void)
{
	struct env e;
	struct tcmd t[4];
	uint8_t *buf, *out;

	env_init(&e, 16, IO_FILE_DIRECT);
	buf = io_alloc_aligned(3 * 4096);
	out = io_alloc_aligned(3 * 4096);
	CU_ASSERT_FATAL(buf && out);
	memset(buf, 0xab, 3 * 4096);
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&e.f, buf, 3 * 4096, 0), 0);
	fill(buf, 3 * 4096, 7);

	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_WRITEV, 2, -EIO), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -ENOSPC), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 0, 5), -EINVAL);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_READV, 1, 0), -EINVAL);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_CANCEL, 1, -EIO), -EINVAL);
	g_in_submit = true;
	for (int i = 0; i < 3; i++) {
		tinit(&t[i]);
		io_write(e.loop, &t[i].cmd, &e.f, buf + i * 4096, 4096, (uint64_t)i * 4096);
	}
	tinit(&t[3]);
	io_fdatasync(e.loop, &t[3].cmd, &e.f);
	g_in_submit = false;
	CU_ASSERT_EQUAL(io_loop_inflight(e.loop), 4);
	run_all(e.loop);
	CU_ASSERT_EQUAL(t[0].res, 4096);
	CU_ASSERT_EQUAL(t[1].res, -EIO);
	CU_ASSERT_EQUAL(t[2].res, 4096);
	CU_ASSERT_EQUAL(t[3].res, -ENOSPC);
	for (int i = 0; i < 4; i++)
		CU_ASSERT_EQUAL(t[i].calls, 1);
	/* The failed write wrote nothing. */
	CU_ASSERT_EQUAL(io_file_pread_sync(&e.f, out, 3 * 4096, 0), 0);
	CU_ASSERT_EQUAL(memcmp(out, buf, 4096), 0);
	CU_ASSERT_EQUAL(out[4096], 0xab);
	CU_ASSERT_EQUAL(out[8191], 0xab);
	CU_ASSERT_EQUAL(memcmp(out + 8192, buf + 8192, 4096), 0);

	/* Fired once: the next fdatasync works. */
	tinit(&t[0]);
	io_fdatasync(e.loop, &t[0].cmd, &e.f);
	run_until(e.loop, &t[0].calls, 1);
	CU_ASSERT_EQUAL(t[0].res, 0);

	/* nth = 0: every read fails until cleared. */
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_READV, 0, -EIO), 0);
	for (int i = 0; i < 3; i++) {
		tinit(&t[i]);
		io_read(e.loop, &t[i].cmd, &e.f, out, 4096, 0);
	}
	run_all(e.loop);
	for (int i = 0; i < 3; i++)
		CU_ASSERT_EQUAL(t[i].res, -EIO);
	io_loop_inject_clear(e.loop);
	tinit(&t[0]);
	io_read(e.loop, &t[0].cmd, &e.f, out, 4096, 0);
	run_until(e.loop, &t[0].calls, 1);
	CU_ASSERT_EQUAL(t[0].res, 4096);

	/* Fallocate and timeout failures. */
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FALLOCATE, 1, -EOPNOTSUPP), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_TIMEOUT, 1, -EIO), 0);
	tinit(&t[0]);
	tinit(&t[1]);
	io_fallocate(e.loop, &t[0].cmd, &e.f, 0, 0, 4096);
	io_timeout(e.loop, &t[1].cmd, 1000000000ull * 60);
	run_all(e.loop);
	CU_ASSERT_EQUAL(t[0].res, -EOPNOTSUPP);
	CU_ASSERT_EQUAL(t[1].res, -EIO);

	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

/* Forced short transfers must still complete the whole command. */
static void short_case(unsigned flags, bool misalign)
{
	struct env e;
	uint8_t *buf, *out;
	struct iovec iov[4], orig[4];
	size_t total = 7 * 4096;
	unsigned m = misalign ? 1 : 0;

	env_init(&e, 16, flags);
	buf = io_alloc_aligned(total + 16384);
	out = io_alloc_aligned(total + 16384);
	CU_ASSERT_FATAL(buf && out);
	fill(buf, total + 16384, 8);

	iov[0] = (struct iovec){buf + m, 4096};
	iov[1] = (struct iovec){buf + 4096 + 2 * m, 0};
	iov[2] = (struct iovec){buf + 8192 + 3 * m, 3 * 4096};
	iov[3] = (struct iovec){buf + 6 * 4096 + 4 * m, 3 * 4096};
	memcpy(orig, iov, sizeof(iov));
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_WRITEV, 1, 512), 0);
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 4, 4096), (int)total);
	if (!misalign && e.f.align <= 512) {
		/* Proof that the transfers were short: the array was advanced in place. */
		CU_ASSERT_EQUAL(iov[0].iov_len, 512);
		CU_ASSERT_PTR_EQUAL(iov[0].iov_base, buf + 3584);
	}

	memset(out, 0, total + 16384);
	iov[0] = (struct iovec){out, 2 * 4096};
	iov[1] = (struct iovec){out + 2 * 4096, 5 * 4096};
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_READV, 1, 1000), 0);
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 2, 4096), (int)total);
	CU_ASSERT_EQUAL(memcmp(out, orig[0].iov_base, 4096), 0);
	CU_ASSERT_EQUAL(memcmp(out + 4096, orig[2].iov_base, 3 * 4096), 0);
	CU_ASSERT_EQUAL(memcmp(out + 4 * 4096, orig[3].iov_base, 3 * 4096), 0);

	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

/* Injected -EAGAIN/-EINTR are retried; the commands complete normally. */
static void test_transient(void)
{
	struct env e;
	uint8_t *buf, *out;
	struct tcmd t[4];

	env_init(&e, 8, IO_FILE_DIRECT);
	buf = io_alloc_aligned(8192);
	out = io_alloc_aligned(8192);
	CU_ASSERT_FATAL(buf && out);
	fill(buf, 8192, 11);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_WRITEV, 1, -EINTR), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_WRITEV, 1, 4096), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FDATASYNC, 1, -EAGAIN), 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_FALLOCATE, 1, -EINTR), 0);
	for (int i = 0; i < 4; i++)
		tinit(&t[i]);
	io_write(e.loop, &t[0].cmd, &e.f, buf, 8192, 0);
	io_fdatasync(e.loop, &t[1].cmd, &e.f);
	io_fallocate(e.loop, &t[2].cmd, &e.f, 0, 8192, 4096);
	run_all(e.loop);
	CU_ASSERT_EQUAL(t[0].res, 8192);
	CU_ASSERT_EQUAL(t[1].res, 0);
	CU_ASSERT_EQUAL(t[2].res, 0);
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_READV, 1, -EAGAIN), 0);
	io_read(e.loop, &t[3].cmd, &e.f, out + 1, 8000, 5);
	run_all(e.loop);
	CU_ASSERT_EQUAL(t[3].res, 8000);
	CU_ASSERT_EQUAL(memcmp(out + 1, buf + 5, 8000), 0);
	for (int i = 0; i < 4; i++)
		CU_ASSERT_EQUAL(t[i].calls, 1);
	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

static void test_short_direct(void)
{
	short_case(IO_FILE_DIRECT, false);
}

static void test_short_bounce(void)
{
	short_case(IO_FILE_DIRECT, true);
}

static void test_short_buffered(void)
{
	short_case(0, true);
}

/* Reads across EOF: -EIO, or zeroes with IO_FILE_ZERO_EOF. */
static void eof_case(unsigned flags)
{
	struct env e;
	uint8_t *buf, *out;
	struct iovec iov[2];
	const size_t fsize = 10000;

	env_init(&e, 16, flags);
	buf = io_alloc_aligned(16384);
	out = io_alloc_aligned(16384);
	CU_ASSERT_FATAL(buf && out);
	fill(buf, 16384, 9);
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&e.f, buf, fsize, 0), 0);

	/* Aligned read straddling EOF (non-bounce on O_DIRECT). */
	iov[0] = (struct iovec){out, 4096};
	iov[1] = (struct iovec){out + 4096, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 2, 8192), -EIO);
	/* Misaligned read straddling EOF (bounce on O_DIRECT). */
	iov[0] = (struct iovec){out + 1, 2000};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 9000), -EIO);
	/* Entirely past EOF. */
	iov[0] = (struct iovec){out, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 65536), -EIO);
	/* Up to EOF exactly is fine. */
	iov[0] = (struct iovec){out + 3, 1000};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, fsize - 1000), 1000);
	CU_ASSERT_EQUAL(memcmp(out + 3, buf + fsize - 1000, 1000), 0);

	e.f.flags |= IO_FILE_ZERO_EOF;
	memset(out, 0xcc, 16384);
	iov[0] = (struct iovec){out, 4096};
	iov[1] = (struct iovec){out + 4096, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 2, 8192), 8192);
	CU_ASSERT_EQUAL(memcmp(out, buf + 8192, fsize - 8192), 0);
	for (size_t i = fsize - 8192; i < 8192; i++)
		CU_ASSERT_EQUAL_FATAL(out[i], 0);
	memset(out, 0xcc, 16384);
	iov[0] = (struct iovec){out + 1, 2000};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 9000), 2000);
	CU_ASSERT_EQUAL(memcmp(out + 1, buf + 9000, 1000), 0);
	for (size_t i = 1001; i < 2001; i++)
		CU_ASSERT_EQUAL_FATAL(out[i], 0);
	CU_ASSERT_EQUAL(out[2001], 0xcc);
	memset(out, 0xcc, 16384);
	iov[0] = (struct iovec){out, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 65536), 4096);
	for (size_t i = 0; i < 4096; i++)
		CU_ASSERT_EQUAL_FATAL(out[i], 0);
	/* EOF in the middle of short forced transfers. */
	CU_ASSERT_EQUAL(io_loop_inject(e.loop, IO_OP_READV, 1, 512), 0);
	memset(out, 0xcc, 16384);
	iov[0] = (struct iovec){out, 16384};
	CU_ASSERT_EQUAL(do_rw(&e, false, iov, 1, 0), 16384);
	CU_ASSERT_EQUAL(memcmp(out, buf, fsize), 0);
	for (size_t i = fsize; i < 16384; i++)
		CU_ASSERT_EQUAL_FATAL(out[i], 0);

	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

static void test_eof_direct(void)
{
	eof_case(IO_FILE_DIRECT);
}

static void test_eof_buffered(void)
{
	eof_case(0);
}

static void test_fallocate_fdatasync(void)
{
	struct env e;
	uint8_t *buf, *out;
	struct tcmd t;
	const size_t len = 65536;

	env_init(&e, 16, IO_FILE_DIRECT);
	buf = io_alloc_aligned(len);
	out = io_alloc_aligned(len);
	CU_ASSERT_FATAL(buf && out);
	fill(buf, len, 10);
	CU_ASSERT_EQUAL(io_file_pwrite_sync(&e.f, buf, len, 0), 0);

	tinit(&t);
	io_fallocate(e.loop, &t.cmd, &e.f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	memset(buf + 4096, 0, 8192);

	tinit(&t);
	io_fallocate(e.loop, &t.cmd, &e.f, FALLOC_FL_ZERO_RANGE, 20480, 4096);
	run_until(e.loop, &t.calls, 1);
	if (t.res == -EOPNOTSUPP) {
		fprintf(stderr, "note: ZERO_RANGE unsupported here\n");
	} else {
		CU_ASSERT_EQUAL(t.res, 0);
		memset(buf + 20480, 0, 4096);
	}
	/* Plain allocation past EOF grows the file. */
	tinit(&t);
	io_fallocate(e.loop, &t.cmd, &e.f, 0, len, 4096);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	uint64_t size;
	CU_ASSERT_EQUAL(io_file_get_size(&e.f, &size), 0);
	CU_ASSERT_EQUAL(size, len + 4096);

	struct iovec iov = {out, len};
	CU_ASSERT_EQUAL(do_rw(&e, false, &iov, 1, 0), (int)len);
	CU_ASSERT_EQUAL(memcmp(out, buf, len), 0);

	tinit(&t);
	io_fdatasync(e.loop, &t.cmd, &e.f);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	CU_ASSERT_EQUAL(t.calls, 1);

	io_free_aligned(buf);
	io_free_aligned(out);
	env_exit(&e);
}

/* ---- poll, timeouts, cancel ---- */

struct pcmd {
	struct io_cmd cmd;
	int efd;
	int fired;
	int final_calls;
	int final_res;
	bool cancel_in_cb;
	struct io_loop *loop;
};

static void pdone(struct io_cmd *c, int res)
{
	struct pcmd *p = container_of(c, struct pcmd, cmd);
	uint64_t v;

	CU_ASSERT_FALSE(g_in_submit);
	CU_ASSERT_EQUAL(p->final_calls, 0); /* nothing after the final call */
	if (res < 0) {
		p->final_calls++;
		p->final_res = res;
		return;
	}
	CU_ASSERT(res & POLLIN);
	CU_ASSERT_EQUAL(read(p->efd, &v, sizeof(v)), (ssize_t)sizeof(v));
	p->fired++;
	if (p->cancel_in_cb)
		io_cancel(p->loop, c);
}

static void test_poll_multishot(void)
{
	struct io_loop *loop;
	struct pcmd p = {.cmd.done = pdone};
	uint64_t one = 1;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	p.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	p.loop = loop;
	CU_ASSERT_FATAL(p.efd >= 0);
	io_poll(loop, &p.cmd, p.efd, POLLIN);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 1);
	/* Nothing ready: a non-waiting iteration handles nothing. */
	CU_ASSERT_EQUAL(io_loop_run_once(loop, false), 0);
	CU_ASSERT_EQUAL(p.fired, 0);
	for (int i = 1; i <= 4; i++) {
		CU_ASSERT_EQUAL(write(p.efd, &one, sizeof(one)), (ssize_t)sizeof(one));
		run_until(loop, &p.fired, i);
		CU_ASSERT_EQUAL(p.fired, i);
		CU_ASSERT_EQUAL(io_loop_inflight(loop), 1);
	}
	io_cancel(loop, &p.cmd);
	io_cancel(loop, &p.cmd); /* twice is harmless */
	run_until(loop, &p.final_calls, 1);
	CU_ASSERT_EQUAL(p.final_calls, 1);
	CU_ASSERT_EQUAL(p.final_res, -ECANCELED);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
	/* No more calls after the final one. */
	CU_ASSERT_EQUAL(write(p.efd, &one, sizeof(one)), (ssize_t)sizeof(one));
	for (int i = 0; i < 3; i++)
		CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	CU_ASSERT_EQUAL(p.fired, 4);
	CU_ASSERT_EQUAL(p.final_calls, 1);

	/* Cancel from inside the callback; re-use of the same command. */
	uint64_t v;
	CU_ASSERT_EQUAL(read(p.efd, &v, sizeof(v)), (ssize_t)sizeof(v));
	p.fired = 0;
	p.final_calls = 0;
	p.cancel_in_cb = true;
	io_poll(loop, &p.cmd, p.efd, POLLIN);
	CU_ASSERT_EQUAL(write(p.efd, &one, sizeof(one)), (ssize_t)sizeof(one));
	run_until(loop, &p.final_calls, 1);
	CU_ASSERT_EQUAL(p.fired, 1);
	CU_ASSERT_EQUAL(p.final_res, -ECANCELED);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);

	/* An injected poll failure is its final call. */
	p.fired = 0;
	p.final_calls = 0;
	CU_ASSERT_EQUAL(io_loop_inject(loop, IO_OP_POLL, 1, -EBADF), 0);
	io_poll(loop, &p.cmd, p.efd, POLLIN);
	run_until(loop, &p.final_calls, 1);
	CU_ASSERT_EQUAL(p.final_res, -EBADF);

	/* A poll on a closed fd fails with a final negative call. */
	p.final_calls = 0;
	io_poll(loop, &p.cmd, 12345, POLLIN);
	run_until(loop, &p.final_calls, 1);
	CU_ASSERT_EQUAL(p.final_res, -EBADF);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);

	/* An abandoned poll at exit is allowed. */
	p.final_calls = 0;
	p.cancel_in_cb = false;
	io_poll(loop, &p.cmd, p.efd, POLLIN);
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	close(p.efd);
	io_loop_exit(loop);
}

static void test_timeouts(void)
{
	struct io_loop *loop;
	struct tcmd t[3];

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	g_done = 0;
	tinit(&t[0]);
	tinit(&t[1]);
	tinit(&t[2]);
	g_in_submit = true;
	io_timeout(loop, &t[0].cmd, 30 * 1000000ull);
	io_timeout(loop, &t[1].cmd, 1 * 1000000ull);
	io_timeout(loop, &t[2].cmd, 3600 * 1000000000ull);
	g_in_submit = false;
	run_until(loop, &t[0].calls, 1);
	CU_ASSERT_EQUAL(t[1].calls, 1);
	CU_ASSERT_EQUAL(t[0].res, 0);
	CU_ASSERT_EQUAL(t[1].res, 0);
	CU_ASSERT(t[1].seq < t[0].seq);
	CU_ASSERT_EQUAL(t[2].calls, 0);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 1);
	io_cancel(loop, &t[2].cmd);
	run_until(loop, &t[2].calls, 1);
	CU_ASSERT_EQUAL(t[2].res, -ECANCELED);
	CU_ASSERT_EQUAL(t[2].calls, 1);
	/* Cancelling a finished command does nothing. */
	io_cancel(loop, &t[2].cmd);
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	CU_ASSERT_EQUAL(t[2].calls, 1);
	/* Zero timeout completes at once. */
	tinit(&t[0]);
	io_timeout(loop, &t[0].cmd, 0);
	run_until(loop, &t[0].calls, 1);
	CU_ASSERT_EQUAL(t[0].res, 0);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
	io_loop_exit(loop);
}

/* ---- deferred hooks, run/stop ---- */

static char g_order[32];
static int g_norder;
static struct io_loop *g_loop;
static struct io_defer g_hooks[3];
static bool g_hook_saw_done;
static struct tcmd g_hcmd;

static void hook(struct io_defer *d)
{
	int idx = (int)(d - g_hooks);

	if (g_norder < (int)sizeof(g_order) - 1)
		g_order[g_norder++] = (char)('A' + idx);
	if (idx == 0 && g_hcmd.calls == 1)
		g_hook_saw_done = true;
	/* B removes itself after its first run; C is removed by A once. */
	if (idx == 1)
		io_defer_del(g_loop, d);
}

static void test_defer(void)
{
	struct io_loop *loop;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	g_loop = loop;
	g_norder = 0;
	memset(g_order, 0, sizeof(g_order));
	for (int i = 0; i < 3; i++) {
		g_hooks[i].fn = hook;
		io_defer_add(loop, &g_hooks[i]);
	}
	io_defer_add(loop, &g_hooks[0]); /* already there: no double run */
	tinit(&g_hcmd);
	io_timeout(loop, &g_hcmd.cmd, 0);
	run_until(loop, &g_hcmd.calls, 1);
	/* Hooks run after the completions of the same iteration. */
	CU_ASSERT_TRUE(g_hook_saw_done);
	g_norder = 0;
	memset(g_order, 0, sizeof(g_order));
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	CU_ASSERT_STRING_EQUAL(g_order, "AC");
	io_defer_del(loop, &g_hooks[0]);
	io_defer_del(loop, &g_hooks[0]); /* not registered: no-op */
	g_norder = 0;
	memset(g_order, 0, sizeof(g_order));
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	CU_ASSERT_STRING_EQUAL(g_order, "C");
	io_defer_del(loop, &g_hooks[2]);
	io_loop_exit(loop);
}

static void test_defer_first_order(void)
{
	struct io_loop *loop;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	g_loop = loop;
	g_norder = 0;
	memset(g_order, 0, sizeof(g_order));
	io_defer_add(loop, &g_hooks[2]);
	io_defer_add(loop, &g_hooks[0]);
	io_defer_add(loop, &g_hooks[1]);
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	CU_ASSERT_STRING_EQUAL(g_order, "CAB");
	io_defer_del(loop, &g_hooks[0]);
	io_defer_del(loop, &g_hooks[2]);
	io_loop_exit(loop);
}

/* ---- io_post ---- */

struct reposter {
	struct io_cmd cmd;
	int n, stop_at;
};

static void repost_done(struct io_cmd *c, int res)
{
	struct reposter *p = container_of(c, struct reposter, cmd);

	CU_ASSERT_FALSE(g_in_submit);
	CU_ASSERT_EQUAL(res, 0);
	if (++p->n < p->stop_at) {
		g_in_submit = true;
		io_post(c->loop, c);
		g_in_submit = false;
	}
}

static int g_post_faults;

static int post_fault(void *opaque, struct io_loop *loop, enum io_op op)
{
	(void)opaque;
	(void)loop;
	(void)op;
	g_post_faults++;
	return -EIO;
}

static void test_post(void)
{
	struct io_loop *loop;
	struct tcmd t[3], timer;
	struct reposter p = {.cmd.done = repost_done, .stop_at = 4};
	struct timespec a, b;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	/* exactly one done() each, in order, never inside io_post() */
	g_in_submit = true;
	for (int i = 0; i < 3; i++) {
		tinit(&t[i]);
		io_post(loop, &t[i].cmd);
	}
	g_in_submit = false;
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 3);
	for (int i = 0; i < 3; i++)
		CU_ASSERT_EQUAL(t[i].calls, 0);
	CU_ASSERT_EQUAL(io_loop_run_once(loop, true), 3);
	for (int i = 0; i < 3; i++) {
		CU_ASSERT_EQUAL(t[i].calls, 1);
		CU_ASSERT_EQUAL(t[i].res, 0);
	}
	CU_ASSERT(t[0].seq < t[1].seq && t[1].seq < t[2].seq);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
	CU_ASSERT_EQUAL(io_loop_run_once(loop, true), 0);
	for (int i = 0; i < 3; i++)
		CU_ASSERT_EQUAL(t[i].calls, 1);

	/* a post made by a post's done() waits for the next iteration */
	io_post(loop, &p.cmd);
	for (int i = 1; i <= 4; i++) {
		CU_ASSERT_EQUAL(io_loop_run_once(loop, true), 1);
		CU_ASSERT_EQUAL(p.n, i);
	}
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
	p.n = 0;
	io_post(loop, &p.cmd);
	CU_ASSERT_EQUAL(io_loop_run(loop), 0); /* runs them all, then nothing is left */
	CU_ASSERT_EQUAL(p.n, 4);

	/* a waiting post keeps the loop from sleeping on a command in the kernel */
	tinit(&timer);
	io_timeout(loop, &timer.cmd, 10ull * 1000 * 1000 * 1000);
	CU_ASSERT(io_loop_run_once(loop, false) >= 0);
	tinit(&t[0]);
	io_post(loop, &t[0].cmd);
	clock_gettime(CLOCK_MONOTONIC, &a);
	CU_ASSERT(io_loop_run_once(loop, true) >= 1);
	clock_gettime(CLOCK_MONOTONIC, &b);
	CU_ASSERT_EQUAL(t[0].calls, 1);
	CU_ASSERT_EQUAL(timer.calls, 0);
	CU_ASSERT(b.tv_sec - a.tv_sec < 5);
	io_cancel(loop, &timer.cmd);
	run_until(loop, &timer.calls, 1);
	CU_ASSERT_EQUAL(timer.res, -ECANCELED);

	/* the fault hook is not consulted for posts */
	io_loop_set_fault_hook(loop, post_fault, NULL);
	tinit(&t[0]);
	io_post(loop, &t[0].cmd);
	run_until(loop, &t[0].calls, 1);
	CU_ASSERT_EQUAL(t[0].res, 0);
	CU_ASSERT_EQUAL(g_post_faults, 0);
	io_loop_set_fault_hook(loop, NULL, NULL);
	io_loop_exit(loop);
}

struct stopper {
	struct io_cmd cmd;
	int n, stop_at;
	int nested;
};

static void stopper_done(struct io_cmd *c, int res)
{
	struct stopper *s = container_of(c, struct stopper, cmd);

	CU_ASSERT_EQUAL(res, 0);
	s->nested = io_loop_run_once(c->loop, false);
	if (++s->n == s->stop_at)
		io_loop_stop(c->loop);
	else
		io_timeout(c->loop, c, 0);
}

static void test_run_stop(void)
{
	struct io_loop *loop;
	struct stopper s = {.cmd.done = stopper_done, .stop_at = 5};

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	io_timeout(loop, &s.cmd, 0);
	CU_ASSERT_EQUAL(io_loop_run(loop), 0);
	CU_ASSERT_EQUAL(s.n, 5);
	CU_ASSERT_EQUAL(s.nested, -EBUSY);
	/* Nothing in flight: run returns instead of sleeping forever. */
	CU_ASSERT_EQUAL(io_loop_run(loop), 0);
	io_loop_exit(loop);
}

/* ---- backpressure ---- */

static void test_sq_full(void)
{
	enum { N = 300 };
	struct env e;
	struct tcmd *t = calloc(N + 40, sizeof(*t));
	uint8_t *buf;
	struct iovec iov[N];

	CU_ASSERT_FATAL(t != NULL);
	env_init(&e, 4, IO_FILE_DIRECT); /* a tiny ring: 4 SQEs, 16 CQEs */
	buf = io_alloc_aligned((size_t)N * 4096);
	CU_ASSERT_FATAL(buf != NULL);
	for (int i = 0; i < N; i++)
		memset(buf + (size_t)i * 4096, i & 0xff, 4096);
	g_in_submit = true;
	for (int i = 0; i < N; i++) {
		tinit(&t[i]);
		iov[i] = (struct iovec){buf + (size_t)i * 4096, 4096};
		io_writev(e.loop, &t[i].cmd, &e.f, &iov[i], 1, (uint64_t)i * 4096);
	}
	/* Long timers then cancelled: some in the kernel, some still queued. */
	for (int i = N; i < N + 40; i++) {
		tinit(&t[i]);
		io_timeout(e.loop, &t[i].cmd, 3600 * 1000000000ull);
	}
	g_in_submit = false;
	CU_ASSERT_EQUAL(io_loop_inflight(e.loop), N + 40);
	for (int i = N; i < N + 40; i++)
		io_cancel(e.loop, &t[i].cmd);
	run_all(e.loop);
	CU_ASSERT_EQUAL(g_done, N + 40);
	for (int i = 0; i < N; i++) {
		CU_ASSERT_EQUAL(t[i].calls, 1);
		CU_ASSERT_EQUAL(t[i].res, 4096);
	}
	for (int i = N; i < N + 40; i++) {
		CU_ASSERT_EQUAL(t[i].calls, 1);
		CU_ASSERT_EQUAL(t[i].res, -ECANCELED);
	}
	/* Data landed where it belongs. */
	memset(buf, 0, (size_t)N * 4096);
	CU_ASSERT_EQUAL(io_file_pread_sync(&e.f, buf, (size_t)N * 4096, 0), 0);
	for (int i = 0; i < N; i++)
		CU_ASSERT_EQUAL(buf[(size_t)i * 4096 + 100], i & 0xff);
	io_free_aligned(buf);
	free(t);
	env_exit(&e);
}

/* ---- busy polling ---- */

static int g_poll_hook_runs;
static struct tcmd g_poll_cmd;
static struct env *g_poll_env;
static bool g_poll_submit;

static void poll_hook(struct io_defer *d)
{
	g_poll_hook_runs++;
	/* Hooks may hand out new work, also while the loop busy-polls. */
	if (g_poll_submit) {
		g_poll_submit = false;
		tinit(&g_poll_cmd);
		io_fdatasync(g_poll_env->loop, &g_poll_cmd.cmd, &g_poll_env->f);
	}
}

static void test_busy_poll(void)
{
	struct env e;
	struct io_defer d = {.fn = poll_hook};
	uint8_t *buf;
	struct tcmd t;

	env_init(&e, 8, IO_FILE_DIRECT);
	buf = io_alloc_aligned(4096);
	CU_ASSERT_FATAL(buf != NULL);
	memset(buf, 1, 4096);
	io_loop_set_poll_ns(e.loop, 200000);
	io_defer_add(e.loop, &d);
	g_poll_hook_runs = 0;
	tinit(&t);
	io_write(e.loop, &t.cmd, &e.f, buf, 4096, 0);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 4096);
	CU_ASSERT(g_poll_hook_runs >= 1);
	/* A timer longer than the poll budget still fires (we do go to sleep). */
	tinit(&t);
	io_timeout(e.loop, &t.cmd, 5 * 1000000ull);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	g_poll_env = &e;
	g_poll_submit = true;
	tinit(&t);
	io_timeout(e.loop, &t.cmd, 0);
	run_until(e.loop, &t.calls, 1);
	run_until(e.loop, &g_poll_cmd.calls, 1);
	CU_ASSERT_EQUAL(g_poll_cmd.res, 0);
	CU_ASSERT_EQUAL(io_loop_inflight(e.loop), 0);
	io_defer_del(e.loop, &d);
	io_loop_set_poll_ns(e.loop, 0);
	io_free_aligned(buf);
	env_exit(&e);
}

/* A poll group: a loop polls only with a place in it. */
static void test_poll_group(void)
{
	struct io_loop *loop;
	struct io_poll_group g;
	struct io_defer d = {.fn = poll_hook};
	struct tcmd t;

	io_poll_group_init(&g, 1);
	CU_ASSERT_TRUE(io_poll_group_enter(&g));
	CU_ASSERT_FALSE(io_poll_group_enter(&g)); /* full */
	io_poll_group_leave(&g);
	CU_ASSERT_TRUE(io_poll_group_enter(&g));
	CU_ASSERT_FALSE(io_poll_group_enter(&g));

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	g_poll_submit = false;
	io_loop_set_poll_ns(loop, 2000000); /* 2 ms */
	io_loop_set_poll_group(loop, &g);
	io_defer_add(loop, &d);
	/* The place is taken (another thread polls): sleep, no poll. A poll
	 * would re-run the hook thousands of times in 2 ms. */
	g_poll_hook_runs = 0;
	tinit(&t);
	io_timeout(loop, &t.cmd, 5 * 1000000ull);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	CU_ASSERT(g_poll_hook_runs <= 4);
	/* Given back: the next sleep polls again (the window was kept). */
	io_poll_group_leave(&g);
	g_poll_hook_runs = 0;
	tinit(&t);
	io_timeout(loop, &t.cmd, 5 * 1000000ull);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	CU_ASSERT(g_poll_hook_runs > 100);
	CU_ASSERT_EQUAL(__atomic_load_n(&g.active, __ATOMIC_RELAXED), 0); /* given back */
	/* A group of none never polls. */
	io_poll_group_init(&g, 0);
	CU_ASSERT_FALSE(io_poll_group_enter(&g));
	g_poll_hook_runs = 0;
	tinit(&t);
	io_timeout(loop, &t.cmd, 5 * 1000000ull);
	run_until(loop, &t.calls, 1);
	CU_ASSERT(g_poll_hook_runs <= 4);
	io_defer_del(loop, &d);
	io_loop_exit(loop);
}

/* --poll-yield: a thread that spins on the loop's CPU gets it from a poll. */
static bool g_spin_stop; /* atomic: the spinner reads it while the test sets it */

static void *spinner(void *arg)
{
	cpu_set_t *cpu = arg;

	if (pthread_setaffinity_np(pthread_self(), sizeof(*cpu), cpu) != 0)
		return NULL;
	while (!__atomic_load_n(&g_spin_stop, __ATOMIC_RELAXED))
		;
	return NULL;
}

static void test_poll_yield(void)
{
	struct io_loop *loop;
	struct io_defer d = {.fn = poll_hook};
	cpu_set_t old, one;
	pthread_t th;
	struct tcmd t;
	uint64_t gave;
	int cpu = -1;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	CU_ASSERT_EQUAL_FATAL(pthread_getaffinity_np(pthread_self(), sizeof(old), &old), 0);
	for (int i = 0; i < CPU_SETSIZE && cpu < 0; i++)
		if (CPU_ISSET(i, &old))
			cpu = i;
	CU_ASSERT_FATAL(cpu >= 0);
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	CU_ASSERT_EQUAL_FATAL(pthread_setaffinity_np(pthread_self(), sizeof(one), &one), 0);
	g_poll_submit = false;
	/* A window longer than the timers: a poll that spins to the end is
	 * caught by the timer's CQE, and the windows stay open. */
	io_loop_set_poll_ns(loop, 20000000); /* 20 ms */
	io_loop_set_poll_yield(loop, true);
	io_defer_add(loop, &d);
	/* Alone on the CPU (as far as this test goes): the polls keep polling
	 * (others' threads may take a yield on a busy machine: not counted). */
	tinit(&t);
	io_timeout(loop, &t.cmd, 5 * 1000000ull);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	/* A thread that wants the CPU: a poll gives it away at a yield once
	 * the scheduler lets it run (EEVDF: once it is owed CPU time, i.e.
	 * soon after the poll took its share), and the loop sleeps; the
	 * timers still fire. */
	__atomic_store_n(&g_spin_stop, false, __ATOMIC_RELAXED);
	CU_ASSERT_EQUAL_FATAL(pthread_create(&th, NULL, spinner, &one), 0);
	usleep(20000); /* the spinner runs on the CPU */
	gave = io_loop_poll_gave(loop);
	for (int i = 0; i < 100 && io_loop_poll_gave(loop) < gave + 3; i++) {
		tinit(&t);
		io_timeout(loop, &t.cmd, 5 * 1000000ull);
		run_until(loop, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 0);
	}
	CU_ASSERT(io_loop_poll_gave(loop) >= gave + 3);
	/* Off: no poll gives way (it spins its window out). */
	io_loop_set_poll_yield(loop, false);
	gave = io_loop_poll_gave(loop);
	tinit(&t);
	io_timeout(loop, &t.cmd, 5 * 1000000ull);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(io_loop_poll_gave(loop), gave);
	__atomic_store_n(&g_spin_stop, true, __ATOMIC_RELAXED);
	pthread_join(th, NULL);
	CU_ASSERT_EQUAL(pthread_setaffinity_np(pthread_self(), sizeof(old), &old), 0);
	io_defer_del(loop, &d);
	io_loop_exit(loop);
}

/* The window rule alone: kept on a hit, grown within the bound, closed past
 * it with a probe after 1, 2, 4 ... waits. */
static uint64_t win_next(uint64_t ns, uint64_t waited, uint64_t max)
{
	struct io_poll_window w = {.ns = ns};

	io_poll_window_update(&w, waited, max);
	return w.ns;
}

static void test_poll_window(void)
{
	const uint64_t max = 50000;
	struct io_poll_window w = {.ns = max};

	CU_ASSERT_EQUAL(win_next(50000, 10000, max), 50000); /* hit */
	CU_ASSERT_EQUAL(win_next(8000, 8000, max), 8000);
	CU_ASSERT_EQUAL(win_next(50000, 50001, max), 0);  /* past the bound */
	CU_ASSERT_EQUAL(win_next(50000, 120000, max), 0); /* a disk read */
	/* Just after: grown to twice the wait, at least double the window. */
	CU_ASSERT_EQUAL(win_next(0, 12000, max), 24000);
	CU_ASSERT_EQUAL(win_next(10000, 12000, max), 24000);
	CU_ASSERT_EQUAL(win_next(15000, 16000, max), 32000);
	CU_ASSERT_EQUAL(win_next(0, 100, max), IO_POLL_WINDOW_MIN_NS);
	CU_ASSERT_EQUAL(win_next(30000, 45000, max), max); /* within the bound */
	CU_ASSERT_EQUAL(win_next(0, max, max), max);
	/* A window above a lowered bound is cut to it first. */
	CU_ASSERT_EQUAL(win_next(80000, 40000, max), max);
	CU_ASSERT_EQUAL(win_next(80000, 60000, max), 0);
	CU_ASSERT_EQUAL(win_next(5000, 1000, 0), 0); /* off */
	/* Events always past the bound: closed, a probe at the bound after 1,
	 * then 2, 4 ... 64 waits; a polled wait of them costs the bound once
	 * per 65 at most. */
	unsigned polled = 0, waits = 0;
	for (unsigned probe = 1; probe <= 8; probe++) {
		CU_ASSERT_EQUAL(w.ns, max);
		io_poll_window_update(&w, 200000, max);
		polled++;
		waits++;
		unsigned closed = 0;
		while (w.ns == 0 && closed < 1000) {
			io_poll_window_update(&w, 200000, max);
			closed++;
			waits++;
		}
		unsigned want = 1u << (probe - 1);
		CU_ASSERT_EQUAL(closed, want < IO_POLL_BACKOFF_MAX ? want : IO_POLL_BACKOFF_MAX);
	}
	CU_ASSERT(polled * 20 < waits);
	/* A fast event reopens a closed window at once and ends the backoff. */
	io_poll_window_update(&w, 200000, max);
	CU_ASSERT_EQUAL(w.ns, 0);
	io_poll_window_update(&w, 9000, max);
	CU_ASSERT_EQUAL(w.ns, 18000);
	CU_ASSERT_EQUAL(w.backoff, 0);
	io_poll_window_update(&w, 200000, max);
	CU_ASSERT_EQUAL(w.ns, 0);
	CU_ASSERT_EQUAL(w.skip, 1);
}

/* Run a timer of @ns on @loop and return how often the hook ran meanwhile:
 * thousands when the wait busy-polled, a few when it slept. */
static int timed_wait(struct io_loop *loop, uint64_t ns)
{
	struct tcmd t;

	g_poll_hook_runs = 0;
	tinit(&t);
	io_timeout(loop, &t.cmd, ns);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	return g_poll_hook_runs;
}

static void nop_done(struct io_cmd *cmd, int res)
{
	int *calls = cmd->priv;

	CU_ASSERT_EQUAL(res, 0);
	(*calls)++;
}

/* Generous against a loaded machine: a sleep of PA_SHORT must end within
 * the bound, a poll to the bound must run the hook more than 100 times. */
#define PA_BOUND 20000000ull /* 20 ms */
#define PA_LONG  60000000ull
#define PA_SHORT 1000000ull

/*
 * The loop learns its windows from its waits, one per kind of the event
 * that ended the previous wait: a wait past the bound stops polling after
 * that kind (and only that kind), fast waits bring it back.
 */
static void test_poll_adaptive(void)
{
	struct env e;
	struct io_defer d = {.fn = poll_hook};
	struct io_cmd post = {.done = nop_done};
	struct tcmd t;
	uint64_t other;
	int posted = 0;

	env_init(&e, 8, 0);
	g_poll_submit = false;
	io_loop_set_poll_ns(e.loop, PA_BOUND);
	io_defer_add(e.loop, &d);
	for (int k = 0; k < IO_POLL_KINDS; k++)
		CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, (enum io_poll_kind)k), PA_BOUND);
	/* A timer past the bound: the first wait polls to the bound, then sleeps;
	 * the window after a timer (kind "other") closes, the next sleeps. */
	CU_ASSERT(timed_wait(e.loop, PA_LONG) > 100);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER), 0);
	CU_ASSERT(timed_wait(e.loop, PA_LONG) <= 4);
	/* After one wait closed, it probes at the bound (a busy machine's
	 * wake-up alone may exceed it); that probe fails: closed for 2. */
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER), PA_BOUND);
	CU_ASSERT(timed_wait(e.loop, PA_LONG) > 100);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER), 0);
	/* Other kinds keep theirs. */
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_FILE), PA_BOUND);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_REMOTE), PA_BOUND);
	/* Fast events again: the first slept (its window was 0) but was timed,
	 * the window grew to cover it, and the next polls. */
	CU_ASSERT(timed_wait(e.loop, PA_SHORT) <= 4);
	CU_ASSERT(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER) >= PA_SHORT);
	CU_ASSERT(timed_wait(e.loop, PA_SHORT) > 100);
	CU_ASSERT(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER) >= PA_SHORT);
	/* After a file completion, the window of that kind decides. */
	tinit(&t);
	io_fdatasync(e.loop, &t.cmd, &e.f);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	/* (The fdatasync's own wait was of kind "other": its window may have
	 * changed with the disk's speed, but not by what follows.) */
	other = io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER);
	CU_ASSERT(timed_wait(e.loop, PA_LONG) > 100);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_FILE), 0);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER), other);
	/* After a post from another thread (here: this one, through the same
	 * eventfd), that kind's. */
	CU_ASSERT_EQUAL_FATAL(io_loop_enable_remote(e.loop), 0);
	post.priv = &posted;
	io_post_remote(e.loop, &post);
	run_until(e.loop, &posted, 1);
	CU_ASSERT(timed_wait(e.loop, PA_LONG) > 100);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_REMOTE), 0);
	/* Switching polling off and on again (vqcowd does on every iteration)
	 * keeps what was learnt; a new bound starts over. */
	io_loop_set_poll_ns(e.loop, 0);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_OTHER), 0);
	io_loop_set_poll_ns(e.loop, PA_BOUND);
	CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, IO_POLL_AFTER_FILE), 0);
	io_loop_set_poll_ns(e.loop, PA_BOUND / 2);
	for (int k = 0; k < IO_POLL_KINDS; k++)
		CU_ASSERT_EQUAL(io_loop_poll_window(e.loop, (enum io_poll_kind)k), PA_BOUND / 2);
	io_defer_del(e.loop, &d);
	io_loop_set_poll_ns(e.loop, 0);
	CU_ASSERT_EQUAL(io_loop_inflight(e.loop), 1); /* the remote wake-up's poll */
	io_file_close(&e.f);
	io_loop_exit(e.loop);
}

/* Hybrid polling's rules alone: the sleep is a share of the learnt wait,
 * none under the floor or past the window; the mean moves by an eighth. */
static void test_poll_hybrid_rules(void)
{
	uint64_t m = 0;

	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(40000, 50, 50000), 20000);
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(40000, 0, 50000), 0);  /* off */
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(0, 50, 50000), 0);     /* nothing learnt */
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(12000, 50, 50000), 0); /* 6 us: under the floor */
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(16000, 50, 50000), IO_POLL_HYBRID_MIN_NS);
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(40000, 50, 20000), 0); /* outlasts the window */
	CU_ASSERT_EQUAL(io_poll_hybrid_sleep(40000, 90, 50000), 36000);
	io_poll_hybrid_learn(&m, 40000); /* the first wait sets it */
	CU_ASSERT_EQUAL(m, 40000);
	io_poll_hybrid_learn(&m, 48000);
	CU_ASSERT_EQUAL(m, 41000);
	io_poll_hybrid_learn(&m, 33000);
	CU_ASSERT_EQUAL(m, 40000);
	for (int i = 0; i < 100; i++)
		io_poll_hybrid_learn(&m, 20000);
	CU_ASSERT(m >= 20000 && m < 20100); /* follows a faster disk */
}

/*
 * Hybrid polling on a loop: a "file" read (a pipe that another thread
 * writes to after HY_DELAY) is awaited with polling on. The first wait has
 * nothing learnt and polls; once learnt, the wait after each read's
 * submission sleeps half of it first, and a write that comes during the
 * sleep ends it at once. Off (0), never a sleep. Only the wait right after
 * a submission sleeps: not the next one with the read still in flight, nor
 * waits without file I/O in flight (a timer).
 */
#define HY_BOUND 40000000ull /* 40 ms */
#define HY_DELAY 8000000ull  /* 8 ms */

struct hy_writer {
	int fd;
	uint64_t delay_ns;
	int rounds;
};

static void *hy_writer_main(void *arg)
{
	struct hy_writer *w = arg;

	for (int i = 0; i < w->rounds; i++) {
		struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)w->delay_ns};
		char c = 'x';

		nanosleep(&ts, NULL);
		if (write(w->fd, &c, 1) != 1)
			break;
		/* Wait until the loop read it: each round times one read. */
		ts.tv_nsec = 200000;
		for (int j = 0; j < 10000; j++) {
			int n = 0;

			if (ioctl(w->fd, FIONREAD, &n) == 0 && n == 0)
				break;
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

/* Read one byte from @f per round, @rounds times, the writer waiting @delay before each. */
static void hy_reads(struct io_loop *loop, struct io_file *f, int wfd, uint64_t delay, int rounds,
		     int *hook_runs)
{
	struct hy_writer w = {.fd = wfd, .delay_ns = delay, .rounds = rounds};
	pthread_t tid;
	char c;

	*hook_runs = 0;
	CU_ASSERT_EQUAL_FATAL(pthread_create(&tid, NULL, hy_writer_main, &w), 0);
	for (int i = 0; i < rounds; i++) {
		struct tcmd t;

		g_poll_hook_runs = 0;
		tinit(&t);
		c = 0;
		io_read(loop, &t.cmd, f, &c, 1, 0);
		run_until(loop, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 1);
		CU_ASSERT_EQUAL(c, 'x');
		*hook_runs += g_poll_hook_runs;
	}
	pthread_join(tid, NULL);
}

/*
 * Another loop's thread that wants to poll while this loop is in its hybrid
 * sleep: it tries to take the group's one place between @from and @until
 * (well inside the sleep, which a timer ends: hy_timer_fired), and says
 * whether it got it.
 */
struct hy_grab {
	struct io_poll_group *g;
	uint64_t from, until; /* CLOCK_MONOTONIC ns: inside the loop's sleep */
	bool tried, got;
};

static int hy_timer_fired;

static uint64_t hy_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *hy_grab_main(void *arg)
{
	struct hy_grab *gr = arg;
	uint64_t t;

	while ((t = hy_now()) < gr->from)
		sched_yield();
	/* Only inside the sleep: once it ends the loop leaves the group
	 * either way, before its timer's completion runs. */
	while (t < gr->until && !__atomic_load_n(&hy_timer_fired, __ATOMIC_ACQUIRE)) {
		gr->tried = true;
		if (io_poll_group_enter(gr->g)) {
			io_poll_group_leave(gr->g);
			gr->got = true;
			break;
		}
		sched_yield();
		t = hy_now();
	}
	return NULL;
}

static void hy_timer_done(struct io_cmd *cmd, int res)
{
	struct tcmd *t = container_of(cmd, struct tcmd, cmd);

	__atomic_store_n(&hy_timer_fired, 1, __ATOMIC_RELEASE);
	t->calls++;
	t->res = res;
}

static void test_poll_hybrid(void)
{
	struct io_loop *loop;
	struct io_defer d = {.fn = poll_hook};
	struct io_file f;
	int p[2], polled_runs, hyb_runs;
	uint64_t mean, sleeps;
	char c;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	CU_ASSERT_EQUAL_FATAL(pipe(p), 0);
	/* io_file_from_fd takes regular files and devices only: by hand. */
	memset(&f, 0, sizeof(f));
	f.fd = p[0];
	f.bfd = -1;
	f.align = 1;
	g_poll_submit = false;
	io_loop_set_poll_ns(loop, HY_BOUND);
	io_defer_add(loop, &d);
	CU_ASSERT_EQUAL(io_loop_set_poll_hybrid(loop, IO_POLL_HYBRID_PCT_MAX + 1), -EINVAL);
	/* Off: every wait polls (the hook runs thousands of times), nothing is
	 * learnt, nothing slept. */
	hy_reads(loop, &f, p[1], HY_DELAY, 2, &polled_runs);
	CU_ASSERT(polled_runs > 200);
	CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), 0);
	CU_ASSERT_EQUAL(io_loop_poll_hybrid_mean(loop), 0);
	/* On: the first wait learns (no sleep yet), the next ones sleep. */
	if (io_loop_set_poll_hybrid(loop, 50) == -EOPNOTSUPP) {
		printf("  (skipped: io_uring_enter takes no timeout here)\n");
		goto out;
	}
	/* A wait longer than the bound teaches nothing: on a loaded machine
	 * the writer (or this thread) can be held off the CPU past it, so a
	 * few more reads are allowed until one is learnt. */
	for (int t = 0; t < 5 && !io_loop_poll_hybrid_mean(loop); t++)
		hy_reads(loop, &f, p[1], HY_DELAY, 1, &hyb_runs);
	CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), 0);
	mean = io_loop_poll_hybrid_mean(loop);
	CU_ASSERT(mean >= HY_DELAY / 2 && mean <= HY_BOUND);
	/* Every later read's first wait sleeps, but one that starts only as
	 * its write is due (this thread held off the CPU) is past the poll
	 * window and does not: at least 4 sleeps in at most 12 reads. */
	for (int t = 0; t < 3 && io_loop_poll_hybrid_sleeps(loop) < 4; t++)
		hy_reads(loop, &f, p[1], HY_DELAY, 4, &hyb_runs);
	sleeps = io_loop_poll_hybrid_sleeps(loop);
	CU_ASSERT(sleeps >= 4);
	/* Each sleep lasted its share of the mean (the write comes later). */
	CU_ASSERT(io_loop_poll_hybrid_slept_ns(loop) >= sleeps * (HY_DELAY / 4));
	mean = io_loop_poll_hybrid_mean(loop);
	CU_ASSERT(mean >= HY_DELAY / 2 && mean <= HY_BOUND);
	/* The disk gets faster: a completion during the sleep ends it. (How
	 * the mean follows is "hybrid polling rules": here the writer's
	 * wake-ups on a loaded machine decide the waits.) */
	hy_reads(loop, &f, p[1], HY_DELAY / 8, 6, &hyb_runs);
	CU_ASSERT(io_loop_poll_hybrid_sleeps(loop) > sleeps);
	CU_ASSERT(io_loop_poll_hybrid_woken(loop) >= 1);
	/* Only the wait right after the submission sleeps: a timer ends it
	 * (a CQE during the sleep) and the next wait, the read still in
	 * flight, polls without a sleep. The write comes 3 delays later; a
	 * loaded machine can hold this thread off the CPU past it, so the
	 * timer and the read end in one wait: such a try checks nothing and
	 * is repeated (at most 5 tries, one must be clean). */
	{
		int clean = 0;

		io_loop_set_poll_hybrid(loop, IO_POLL_HYBRID_PCT_MAX);
		for (int t = 0; t < 5 && !clean; t++) {
			struct hy_writer w = {.fd = p[1], .delay_ns = 3 * HY_DELAY, .rounds = 1};
			struct tcmd rd, tm;
			pthread_t tid;
			uint64_t s1;

			mean = io_loop_poll_hybrid_mean(loop);
			sleeps = io_loop_poll_hybrid_sleeps(loop);
			tinit(&rd);
			tinit(&tm);
			c = 0;
			io_read(loop, &rd.cmd, &f, &c, 1, 0);
			/* due well inside the first sleep (90 % of the mean) */
			io_timeout(loop, &tm.cmd, mean / 4);
			CU_ASSERT_EQUAL_FATAL(pthread_create(&tid, NULL, hy_writer_main, &w), 0);
			run_until(loop, &tm.calls, 1);
			s1 = io_loop_poll_hybrid_sleeps(loop);
			clean = rd.calls == 0;
			run_until(loop, &rd.calls, 1);
			CU_ASSERT_EQUAL(rd.res, 1);
			pthread_join(tid, NULL);
			if (!clean) {
				printf("  (try %d: the read ended with the timer: not checked)\n",
				       t + 1);
				continue;
			}
			CU_ASSERT_EQUAL(s1, sleeps + 1);
			CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), sleeps + 1);
		}
		CU_ASSERT(clean);
		io_loop_set_poll_hybrid(loop, 50);
	}
	/* A loop in its hybrid sleep holds no place in its poll group: it
	 * held the group's only one while asleep, so another thread could not
	 * poll while no CPU was polling. */
	{
		struct hy_writer w = {.fd = p[1], .delay_ns = 3 * HY_DELAY, .rounds = 1};
		struct io_poll_group g;
		struct hy_grab gr = {.g = &g};
		struct tcmd rd, tm;
		pthread_t tid, gid;

		io_poll_group_init(&g, 1);
		io_loop_set_poll_group(loop, &g);
		io_loop_set_poll_hybrid(loop, IO_POLL_HYBRID_PCT_MAX);
		mean = io_loop_poll_hybrid_mean(loop);
		sleeps = io_loop_poll_hybrid_sleeps(loop);
		gr.from = hy_now() + mean / 8;
		gr.until = gr.from + mean / 2; /* the timer: 3/4 of the mean */
		__atomic_store_n(&hy_timer_fired, 0, __ATOMIC_RELEASE);
		tinit(&rd);
		tinit(&tm);
		tm.cmd.done = hy_timer_done;
		c = 0;
		io_read(loop, &rd.cmd, &f, &c, 1, 0);
		/* due late in the sleep (90 % of the mean): the other thread
		 * has most of it to try */
		io_timeout(loop, &tm.cmd, mean * 3 / 4);
		CU_ASSERT_EQUAL_FATAL(pthread_create(&gid, NULL, hy_grab_main, &gr), 0);
		CU_ASSERT_EQUAL_FATAL(pthread_create(&tid, NULL, hy_writer_main, &w), 0);
		run_until(loop, &tm.calls, 1);
		pthread_join(gid, NULL);
		CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), sleeps + 1);
		if (gr.tried) {
			CU_ASSERT(gr.got);
		} else {
			printf("  (the other thread did not run during the sleep: not checked)\n");
		}
		run_until(loop, &rd.calls, 1);
		CU_ASSERT_EQUAL(rd.res, 1);
		pthread_join(tid, NULL);
		CU_ASSERT_EQUAL(__atomic_load_n(&g.active, __ATOMIC_RELAXED), 0);
		io_loop_set_poll_group(loop, NULL);
		io_loop_set_poll_hybrid(loop, 50);
	}
	/* No file I/O in flight (a timer): no sleep, the wait polls. */
	sleeps = io_loop_poll_hybrid_sleeps(loop);
	CU_ASSERT(timed_wait(loop, PA_SHORT) > 100);
	CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), sleeps);
	/* Off again: no more sleeps. */
	CU_ASSERT_EQUAL(io_loop_set_poll_hybrid(loop, 0), 0);
	hy_reads(loop, &f, p[1], HY_DELAY, 2, &hyb_runs);
	CU_ASSERT_EQUAL(io_loop_poll_hybrid_sleeps(loop), sleeps);
out:
	io_defer_del(loop, &d);
	io_loop_set_poll_ns(loop, 0);
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 0);
	io_file_close(&f);
	close(p[1]);
	io_loop_exit(loop);
}

/*
 * A hook run by the poll that finds work and pauses polling (vqcowd's: more
 * than 4 requests in flight sets the bound to 0) ends that wait early, inside
 * the window: the window is kept. It once read the pause as a bound of 0,
 * closed the window after every such wait, and the loop slept every other
 * wait (0.82x the IOPS of one thread on a preallocated image).
 */
static struct io_loop *g_pause_loop;
static struct tcmd g_pause_cmd;
static int g_pause_at;

static void pause_hook(struct io_defer *d)
{
	(void)d;
	if (g_pause_at && ++g_poll_hook_runs == g_pause_at) {
		g_pause_at = 0;
		io_loop_set_poll_ns(g_pause_loop, 0);
		io_timeout(g_pause_loop, &g_pause_cmd.cmd, 0);
	}
}

static void test_poll_paused_by_hook(void)
{
	struct io_loop *loop;
	struct io_defer d = {.fn = pause_hook};
	struct tcmd t;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	g_pause_loop = loop;
	io_loop_set_poll_ns(loop, PA_BOUND);
	io_defer_add(loop, &d);
	for (int round = 0; round < 3; round++) {
		/* a timer far away keeps the loop waiting; the hook finds work
		 * on its 50th run while the wait polls */
		g_poll_hook_runs = 0;
		g_pause_at = 50;
		tinit(&g_pause_cmd);
		tinit(&t);
		io_timeout(loop, &t.cmd, PA_LONG);
		run_until(loop, &g_pause_cmd.calls, 1);
		CU_ASSERT_EQUAL(g_pause_cmd.res, 0);
		CU_ASSERT(g_poll_hook_runs >= 50); /* it polled */
		/* polling on again, same bound: every window as it was */
		io_loop_set_poll_ns(loop, PA_BOUND);
		for (int k = 0; k < IO_POLL_KINDS; k++)
			CU_ASSERT_EQUAL(io_loop_poll_window(loop, (enum io_poll_kind)k), PA_BOUND);
		g_pause_at = 0;
		io_loop_set_poll_ns(loop, 0); /* the timer's own wait: no poll */
		run_until(loop, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 0);
		io_loop_set_poll_ns(loop, PA_BOUND);
	}
	io_defer_del(loop, &d);
	io_loop_exit(loop);
}

/* ---- early submission ---- */

static void test_submit_batch(void)
{
	enum { N = 40 };
	struct env e;
	struct tcmd t[N];
	uint8_t *buf;

	env_init(&e, 64, IO_FILE_DIRECT);
	buf = io_alloc_aligned((size_t)N * 4096);
	CU_ASSERT_FATAL(buf != NULL);
	for (int i = 0; i < N; i++)
		memset(buf + (size_t)i * 4096, 0x40 + i, 4096);
	/* Default: everything waits for the iteration's single submit. */
	g_in_submit = true;
	for (int i = 0; i < 3; i++) {
		tinit(&t[i]);
		io_write(e.loop, &t[i].cmd, &e.f, buf + (size_t)i * 4096, 4096, (uint64_t)i * 4096);
	}
	g_in_submit = false;
	CU_ASSERT_EQUAL(io_loop_sq_waiting(e.loop), 3);
	run_all(e.loop);
	CU_ASSERT_EQUAL(io_loop_sq_waiting(e.loop), 0);
	/* Batch of 2: every second command goes to the kernel at once. */
	io_loop_set_submit_batch(e.loop, 2);
	g_in_submit = true;
	for (int i = 3; i < N; i++) {
		tinit(&t[i]);
		io_write(e.loop, &t[i].cmd, &e.f, buf + (size_t)i * 4096, 4096, (uint64_t)i * 4096);
		CU_ASSERT_EQUAL(io_loop_sq_waiting(e.loop), (unsigned)(i - 3 + 1) % 2);
	}
	g_in_submit = false;
	run_all(e.loop);
	for (int i = 0; i < N; i++) {
		CU_ASSERT_EQUAL(t[i].calls, 1);
		CU_ASSERT_EQUAL(t[i].res, 4096);
	}
	/* Batch of 1 on reads: each read is in the kernel when io_read returns. */
	io_loop_set_submit_batch(e.loop, 1);
	memset(buf, 0, (size_t)N * 4096);
	g_in_submit = true;
	for (int i = 0; i < N; i++) {
		tinit(&t[i]);
		io_read(e.loop, &t[i].cmd, &e.f, buf + (size_t)i * 4096, 4096, (uint64_t)i * 4096);
		CU_ASSERT_EQUAL(io_loop_sq_waiting(e.loop), 0);
	}
	g_in_submit = false;
	run_all(e.loop);
	for (int i = 0; i < N; i++) {
		CU_ASSERT_EQUAL(t[i].res, 4096);
		CU_ASSERT_EQUAL(buf[(size_t)i * 4096 + 7], 0x40 + i);
	}
	io_loop_set_submit_batch(e.loop, 0);
	io_free_aligned(buf);
	env_exit(&e);
}

/* ---- registered files and buffers ---- */

/* Write @len bytes of @seed at @off through @f and read them back (single-buffer forms). */
static void rw_check(struct io_loop *loop, struct io_file *f, uint8_t *buf, size_t len,
		     uint64_t off, unsigned seed)
{
	struct tcmd t;

	fill(buf, len, seed);
	tinit(&t);
	io_write(loop, &t.cmd, f, buf, len, off);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, (int)len);
	memset(buf, 0, len);
	tinit(&t);
	io_read(loop, &t.cmd, f, buf, len, off);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, (int)len);
	for (size_t i = 0; i < len; i++) {
		uint8_t want = (uint8_t)((i * 131 + seed * 7 + (i >> 9)) ^ seed);

		if (buf[i] != want) {
			CU_FAIL("read back differs");
			break;
		}
	}
}

static void test_fixed_files(void)
{
	enum { NF = 70 };
	struct io_loop *loop, *loop2;
	static struct io_file f[NF];
	struct tcmd t;
	uint8_t *buf;
	int nfixed = 0;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 32), 0);
	buf = io_alloc_aligned(8192);
	CU_ASSERT_FATAL(buf != NULL);
	/* Registered on first use, not at open. */
	CU_ASSERT_EQUAL_FATAL(tmp_open(&f[0], IO_FILE_DIRECT, NULL), 0);
	CU_ASSERT_FALSE(io_file_is_fixed(&f[0], loop));
	rw_check(loop, &f[0], buf, 8192, 0, 1);
	CU_ASSERT_TRUE(io_file_is_fixed(&f[0], loop));
	/* fdatasync and fallocate go through the slot too. */
	tinit(&t);
	io_fdatasync(loop, &t.cmd, &f[0]);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	tinit(&t);
	io_fallocate(loop, &t.cmd, &f[0], 0, 0, 1 << 20);
	run_until(loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, 0);
	/* More files than slots: all work, the first 64 are registered. */
	for (int i = 1; i < NF; i++) {
		CU_ASSERT_EQUAL_FATAL(tmp_open(&f[i], IO_FILE_DIRECT, NULL), 0);
		rw_check(loop, &f[i], buf, 4096, (uint64_t)i * 4096, (unsigned)i + 10);
	}
	for (int i = 0; i < NF; i++)
		nfixed += io_file_is_fixed(&f[i], loop);
	CU_ASSERT_EQUAL(nfixed, 64);
	CU_ASSERT_FALSE(io_file_is_fixed(&f[NF - 1], loop));
	/* Each file still holds its own data (no slot mix-up). */
	for (int i = 1; i < NF; i++) {
		tinit(&t);
		io_read(loop, &t.cmd, &f[i], buf, 4096, (uint64_t)i * 4096);
		run_until(loop, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 4096);
		CU_ASSERT_EQUAL(buf[5], (uint8_t)((5 * 131 + (i + 10) * 7) ^ (i + 10)));
	}
	/* Closing frees the slot for the next file. */
	io_file_close(&f[3]);
	CU_ASSERT_FALSE(io_file_is_fixed(&f[3], loop));
	CU_ASSERT_EQUAL_FATAL(tmp_open(&f[3], IO_FILE_DIRECT, NULL), 0);
	rw_check(loop, &f[3], buf, 4096, 0, 77);
	CU_ASSERT_TRUE(io_file_is_fixed(&f[3], loop));
	for (int i = 1; i < NF; i++)
		io_file_close(&f[i]);
	/* Turned off: used by fd. */
	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop2, 32), 0);
	io_loop_set_fixed_files(loop2, false);
	CU_ASSERT_EQUAL_FATAL(tmp_open(&f[1], IO_FILE_DIRECT, NULL), 0);
	rw_check(loop2, &f[1], buf, 4096, 0, 5);
	CU_ASSERT_FALSE(io_file_is_fixed(&f[1], loop2));
	io_file_close(&f[1]);
	io_loop_exit(loop2);
	/* A file outliving its loop is forgotten by it, then still closes cleanly. */
	io_loop_exit(loop);
	for (int i = 0; i < IO_FIXED_LOOPS; i++)
		CU_ASSERT_EQUAL(f[0].fixed[i], 0);
	io_file_close(&f[0]);
	io_free_aligned(buf);
}

/*
 * How many slots of this process's io_urings hold a file whose path contains
 * @name (/proc/self/fdinfo of a ring: "UserFiles:" then one line per slot in
 * use); -1 when no ring lists its files (an older kernel).
 */
static int ring_file_refs(const char *name)
{
	DIR *d = opendir("/proc/self/fdinfo");
	struct dirent *e;
	int refs = 0;
	bool listed = false;

	if (!d)
		return -1;
	while ((e = readdir(d))) {
		char path[300], line[1024];
		bool in = false;
		FILE *fp;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/fdinfo/%s", e->d_name);
		fp = fopen(path, "r");
		if (!fp)
			continue;
		while (fgets(line, sizeof(line), fp)) {
			if (strncmp(line, "UserFiles:", 10) == 0) {
				in = listed = true;
				continue;
			}
			if (in && line[0] != ' ')
				in = false;
			if (in && strstr(line, name))
				refs++;
		}
		fclose(fp);
	}
	closedir(d);
	return listed ? refs : -1;
}

/* Open a new O_DIRECT file named after @tag in g_dir; its name goes to @name. */
static void named_open(struct io_file *f, const char *tag, char *name, size_t len)
{
	char path[600];
	int fd;

	snprintf(path, sizeof(path), "%s/test_io_%s.XXXXXX", g_dir, tag);
	fd = mkstemp(path);
	CU_ASSERT_FATAL(fd >= 0);
	close(fd);
	CU_ASSERT_EQUAL_FATAL(io_file_open(f, path, IO_FILE_DIRECT), 0);
	unlink(path);
	snprintf(name, len, "%s", strrchr(path, '/') + 1);
}

struct fx_thread {
	struct io_loop *loop;
	struct io_file *f;
	unsigned id;
	int bad;
};

/* A command of fx_thread_main: touches nothing shared (no g_done, no CUnit). */
struct fx_cmd {
	struct io_cmd cmd;
	int calls, res;
};

static void fx_done(struct io_cmd *c, int res)
{
	struct fx_cmd *t = container_of(c, struct fx_cmd, cmd);

	t->calls++;
	t->res = res;
}

static int fx_run(struct io_loop *loop, struct fx_cmd *c)
{
	for (int k = 0; k < MAX_ITER && !c->calls; k++)
		if (io_loop_run_once(loop, true) < 0)
			return -1;
	return c->calls ? c->res : -1;
}

static void *fx_thread_main(void *arg)
{
	struct fx_thread *t = arg;
	uint8_t *buf = io_alloc_aligned(4096);

	t->bad += !buf;
	for (unsigned i = 0; buf && i < 64; i++) {
		uint64_t off = ((uint64_t)t->id * 64 + i) * 4096;
		struct fx_cmd c = {.cmd.done = fx_done};

		memset(buf, (int)(t->id * 64 + i), 4096);
		io_write(t->loop, &c.cmd, t->f, buf, 4096, off);
		t->bad += fx_run(t->loop, &c) != 4096;
		memset(buf, 0xee, 4096);
		c = (struct fx_cmd){.cmd.done = fx_done};
		io_read(t->loop, &c.cmd, t->f, buf, 4096, off);
		t->bad += fx_run(t->loop, &c) != 4096 || buf[0] != (uint8_t)(t->id * 64 + i) ||
			  buf[4095] != (uint8_t)(t->id * 64 + i);
	}
	io_free_aligned(buf);
	return NULL;
}

/*
 * Each io_uring has its own table of registered files: a file used by two
 * loops is registered with both (by the thread running each), under
 * different slots, its requests name the slot on both, and closing it
 * empties both slots in the kernel (no ring keeps the file open).
 */
static void test_fixed_files_loops(void)
{
	enum { NL = IO_FIXED_LOOPS + 2 };
	struct io_loop *a, *b, *many[NL];
	static struct io_file f, g, h;
	char fname[64], gname[64], hname[64];
	struct fx_thread th[2];
	pthread_t tid[2];
	uint64_t ua, ub;
	uint8_t *buf;
	int refs, nfixed = 0;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&a, 32), 0);
	CU_ASSERT_EQUAL_FATAL(io_loop_init(&b, 32), 0);
	buf = io_alloc_aligned(8192);
	CU_ASSERT_FATAL(buf != NULL);
	named_open(&f, "fxf", fname, sizeof(fname));
	named_open(&g, "fxg", gname, sizeof(gname));
	/* g takes b's first slot, so f's slots differ between a and b */
	rw_check(b, &g, buf, 4096, 0, 3);
	CU_ASSERT_TRUE(io_file_is_fixed(&g, b));
	rw_check(a, &f, buf, 8192, 0, 1);
	CU_ASSERT_TRUE(io_file_is_fixed(&f, a));
	CU_ASSERT_FALSE(io_file_is_fixed(&f, b));
	ua = io_loop_fixed_file_uses(a);
	ub = io_loop_fixed_file_uses(b);
	CU_ASSERT_EQUAL(ua, 2);
	/* b reads what a wrote, through its own slot */
	{
		struct tcmd t;

		memset(buf, 0, 8192);
		tinit(&t);
		io_read(b, &t.cmd, &f, buf, 8192, 0);
		run_until(b, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 8192);
		CU_ASSERT_EQUAL(buf[100], (uint8_t)((100 * 131 + 7) ^ 1));
	}
	CU_ASSERT_TRUE(io_file_is_fixed(&f, b));
	CU_ASSERT_TRUE(io_file_is_fixed(&f, a));
	CU_ASSERT_EQUAL(io_loop_fixed_file_uses(b), ub + 1);
	rw_check(b, &f, buf, 4096, 4096, 9);
	rw_check(a, &f, buf, 4096, 8192, 11);
	CU_ASSERT_EQUAL(io_loop_fixed_file_uses(a), ua + 2);
	CU_ASSERT_EQUAL(io_loop_fixed_file_uses(b), ub + 3);
	/* fdatasync through b's slot too */
	{
		struct tcmd t;

		tinit(&t);
		io_fdatasync(b, &t.cmd, &f);
		run_until(b, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 0);
	}
	refs = ring_file_refs(fname);
	if (refs < 0)
		fprintf(stderr, "note: the kernel lists no registered files in fdinfo\n");
	else
		CU_ASSERT_EQUAL(refs, 2);
	/* closing unregisters it from both rings */
	io_file_close(&f);
	CU_ASSERT_FALSE(io_file_is_fixed(&f, a));
	CU_ASSERT_FALSE(io_file_is_fixed(&f, b));
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), 0);
	/* the freed slots are taken again, g is untouched */
	named_open(&h, "fxh", hname, sizeof(hname));
	rw_check(b, &h, buf, 4096, 0, 21);
	CU_ASSERT_TRUE(io_file_is_fixed(&h, b));
	rw_check(b, &g, buf, 4096, 4096, 23);
	CU_ASSERT_TRUE(io_file_is_fixed(&g, b));

	/* Two threads register one file at once, each with its own loop. */
	named_open(&f, "fxt", fname, sizeof(fname));
	for (unsigned i = 0; i < 2; i++) {
		th[i] = (struct fx_thread){.loop = i ? b : a, .f = &f, .id = i};
		CU_ASSERT_EQUAL_FATAL(pthread_create(&tid[i], NULL, fx_thread_main, &th[i]), 0);
	}
	for (unsigned i = 0; i < 2; i++) {
		pthread_join(tid[i], NULL);
		CU_ASSERT_EQUAL(th[i].bad, 0);
	}
	CU_ASSERT_TRUE(io_file_is_fixed(&f, a));
	CU_ASSERT_TRUE(io_file_is_fixed(&f, b));
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), 2);
	/* a loop that ends first forgets the file; the other keeps it, close empties it */
	io_loop_exit(b);
	rw_check(a, &f, buf, 4096, 0, 31);
	CU_ASSERT_TRUE(io_file_is_fixed(&f, a));
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), 1);
	io_file_close(&f);
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), 0);
	io_file_close(&h);
	io_file_close(&g);

	/* More loops than IO_FIXED_LOOPS: the rest use the file by fd, all correctly. */
	named_open(&f, "fxm", fname, sizeof(fname));
	for (int i = 0; i < NL; i++) {
		CU_ASSERT_EQUAL_FATAL(io_loop_init(&many[i], 8), 0);
		rw_check(many[i], &f, buf, 4096, (uint64_t)i * 4096, (unsigned)i + 40);
		nfixed += io_file_is_fixed(&f, many[i]);
	}
	CU_ASSERT(nfixed > 0 && nfixed < NL);
	CU_ASSERT_FALSE(io_file_is_fixed(&f, many[NL - 1]));
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), nfixed);
	io_file_close(&f);
	if (refs >= 0)
		CU_ASSERT_EQUAL(ring_file_refs(fname), 0);
	for (int i = 0; i < NL; i++)
		io_loop_exit(many[i]);
	/* their ids are free again: a new loop registers */
	named_open(&f, "fxn", fname, sizeof(fname));
	CU_ASSERT_EQUAL_FATAL(io_loop_init(&b, 8), 0);
	rw_check(b, &f, buf, 4096, 0, 51);
	CU_ASSERT_TRUE(io_file_is_fixed(&f, b));
	io_file_close(&f);
	io_loop_exit(b);
	io_loop_exit(a);
	io_free_aligned(buf);
}

static void test_fixed_buffers(void)
{
	struct env e;
	struct iovec reg, iov[2], many[65];
	uint8_t *buf, *other;
	uint64_t uses;
	int ret;

	env_init(&e, 32, IO_FILE_DIRECT);
	buf = io_alloc_aligned(65536);
	other = io_alloc_aligned(16384);
	CU_ASSERT_FATAL(buf && other);
	CU_ASSERT_EQUAL(io_loop_fixed_buffers(e.loop), 0);
	reg = (struct iovec){buf, 32768};
	ret = io_loop_register_buffers(e.loop, &reg, 1);
	CU_ASSERT_EQUAL_FATAL(ret, 0);
	CU_ASSERT_EQUAL(io_loop_fixed_buffers(e.loop), 1);
	/* Single buffers inside the range go as READ/WRITE_FIXED. */
	uses = io_loop_fixed_buffer_uses(e.loop);
	rw_check(e.loop, &e.f, buf + 4096, 8192, 16384, 3);
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses + 2);
	/* Outside it, or straddling its end, or several iovecs: by address. */
	uses = io_loop_fixed_buffer_uses(e.loop);
	rw_check(e.loop, &e.f, other, 16384, 0, 4);
	rw_check(e.loop, &e.f, buf + 28672, 8192, 65536, 5);
	fill(buf, 8192, 6);
	iov[0] = (struct iovec){buf, 4096};
	iov[1] = (struct iovec){buf + 4096, 4096};
	CU_ASSERT_EQUAL(do_rw(&e, true, iov, 2, 131072), 8192);
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses);
	/* What the fixed read returns is what the vectored write wrote. */
	memset(buf + 16384, 0, 8192);
	uses = io_loop_fixed_buffer_uses(e.loop);
	{
		struct tcmd t;

		tinit(&t);
		io_read(e.loop, &t.cmd, &e.f, buf + 16384, 8192, 131072);
		run_until(e.loop, &t.calls, 1);
		CU_ASSERT_EQUAL(t.res, 8192);
	}
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses + 1);
	CU_ASSERT_EQUAL(memcmp(buf, buf + 16384, 8192), 0);
	/* Replacing the set: the old range is no longer used. */
	reg = (struct iovec){other, 16384};
	CU_ASSERT_EQUAL(io_loop_register_buffers(e.loop, &reg, 1), 0);
	uses = io_loop_fixed_buffer_uses(e.loop);
	rw_check(e.loop, &e.f, buf, 4096, 0, 7);
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses);
	rw_check(e.loop, &e.f, other + 4096, 4096, 4096, 8);
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses + 2);
	/* Too many pieces: refused, nothing registered, I/O still fine. */
	for (int i = 0; i < 65; i++)
		many[i] = (struct iovec){buf + (size_t)i * 512, 512};
	CU_ASSERT_EQUAL(io_loop_register_buffers(e.loop, many, 65), -E2BIG);
	CU_ASSERT_EQUAL(io_loop_fixed_buffers(e.loop), 0);
	uses = io_loop_fixed_buffer_uses(e.loop);
	rw_check(e.loop, &e.f, other + 4096, 4096, 4096, 9);
	CU_ASSERT_EQUAL(io_loop_fixed_buffer_uses(e.loop), uses);
	/* Dropping the set. */
	CU_ASSERT_EQUAL(io_loop_register_buffers(e.loop, &reg, 1), 0);
	CU_ASSERT_EQUAL(io_loop_register_buffers(e.loop, NULL, 0), 0);
	CU_ASSERT_EQUAL(io_loop_fixed_buffers(e.loop), 0);
	io_free_aligned(buf);
	io_free_aligned(other);
	env_exit(&e);
}

static void test_bad_args(void)
{
	struct env e;
	struct tcmd t;
	struct io_file ro;
	char buf[16];
	struct iovec iov = {buf, 16};

	env_init(&e, 8, 0);
	tinit(&t);
	io_writev(e.loop, &t.cmd, &e.f, &iov, 1, UINT64_MAX - 4);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EINVAL);
	tinit(&t);
	io_writev(e.loop, &t.cmd, &e.f, &iov, 70000, 0);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EINVAL);
	struct iovec huge[2] = {{buf, SIZE_MAX}, {buf, 2}}; /* would wrap the sum */
	tinit(&t);
	io_readv(e.loop, &t.cmd, &e.f, huge, 2, 0);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EINVAL);
	ro = e.f;
	ro.flags |= IO_FILE_RDONLY;
	tinit(&t);
	io_writev(e.loop, &t.cmd, &ro, &iov, 1, 0);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EBADF);
	tinit(&t);
	io_fallocate(e.loop, &t.cmd, &ro, 0, 0, 4096);
	run_until(e.loop, &t.calls, 1);
	CU_ASSERT_EQUAL(t.res, -EBADF);
	env_exit(&e);
}

/* Is byte @off locked by an open file description other than @fd's? */
static bool byte_held(int fd, int off)
{
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1};

	CU_ASSERT_FATAL(fcntl(fd, F_OFD_GETLK, &fl) == 0);
	return fl.l_type != F_UNLCK;
}

/*
 * QEMU's lock protocol between two open file descriptions of one file:
 * bytes 100 + perm and 200 + perm, conflicts both ways, rollback on refusal,
 * giving up and taking back permissions, FIFOs refused without hanging.
 */
static void test_locks(void)
{
	const unsigned cr = IO_PERM_CONSISTENT_READ, w = IO_PERM_WRITE, rs = IO_PERM_RESIZE;
	struct io_file a, b;
	char path[600], err[256];
	int fd, probe;

	snprintf(path, sizeof(path), "%s/test_lock.XXXXXX", g_dir);
	fd = mkstemp(path);
	CU_ASSERT_FATAL(fd >= 0);
	close(fd);
	CU_ASSERT_FATAL(io_file_open(&a, path, 0) == 0);
	CU_ASSERT_FATAL(io_file_open(&b, path, IO_FILE_RDONLY) == 0);
	probe = open(path, O_RDONLY | O_CLOEXEC);
	CU_ASSERT_FATAL(probe >= 0);

	/* a: a qcow2 writer (uses read, write, resize; shares neither write nor resize) */
	CU_ASSERT_EQUAL(io_file_lock(&a, cr | w | rs, IO_PERM_ALL & ~(w | rs), err, sizeof(err)),
			0);
	CU_ASSERT(byte_held(probe, 100) && byte_held(probe, 101) && !byte_held(probe, 102) &&
		  byte_held(probe, 103));
	CU_ASSERT(!byte_held(probe, 200) && byte_held(probe, 201) && !byte_held(probe, 202) &&
		  byte_held(probe, 203));
	/* b: a reader that does not share write: refused, and holds nothing after */
	CU_ASSERT_EQUAL(io_file_lock(&b, cr, IO_PERM_ALL & ~(w | rs), err, sizeof(err)), -EAGAIN);
	CU_ASSERT_STRING_EQUAL(err,
			       "Failed to get shared \"write\" lock: locked by another process");
	CU_ASSERT(b.lock.perm == 0 && b.lock.unshared == 0);
	/* b: a writer: refused on a's "not shared" byte first */
	CU_ASSERT_EQUAL(io_file_lock(&b, cr | w, IO_PERM_ALL, err, sizeof(err)), -EAGAIN);
	CU_ASSERT_STRING_EQUAL(err, "Failed to get \"write\" lock: locked by another process");
	/* b: force-share reader: fine */
	CU_ASSERT_EQUAL(io_file_lock(&b, cr, IO_PERM_ALL, err, sizeof(err)), 0);
	/* a gives up write (keeps read, still not sharing write): b cannot write yet */
	CU_ASSERT_EQUAL(io_file_lock(&a, cr, IO_PERM_ALL & ~(w | rs), err, sizeof(err)), 0);
	CU_ASSERT(!byte_held(probe, 101) && !byte_held(probe, 103) && byte_held(probe, 201));
	/* a gives up everything (an inactive image): b may take write */
	CU_ASSERT_EQUAL(io_file_lock(&a, 0, IO_PERM_ALL, err, sizeof(err)), 0);
	CU_ASSERT(a.lock.perm == 0 && a.lock.unshared == 0);
	/* b was opened read-only: a read lock on a write byte is still fine (announcement only) */
	CU_ASSERT_EQUAL(io_file_lock(&b, cr | w, IO_PERM_ALL & ~w, err, sizeof(err)), 0);
	/* now a cannot take write back, and keeps holding nothing */
	CU_ASSERT_EQUAL(io_file_lock(&a, cr | w | rs, IO_PERM_ALL & ~(w | rs), err, sizeof(err)),
			-EAGAIN);
	CU_ASSERT(a.lock.perm == 0 && a.lock.unshared == 0);
	/* closing b drops its locks */
	io_file_close(&b);
	CU_ASSERT(!byte_held(probe, 101) && !byte_held(probe, 201));
	CU_ASSERT_EQUAL(io_file_lock(&a, cr | w | rs, IO_PERM_ALL & ~(w | rs), err, sizeof(err)),
			0);
	io_file_close(&a);
	CU_ASSERT(!byte_held(probe, 100) && !byte_held(probe, 201));
	close(probe);
	unlink(path);

	/* a FIFO is refused at once, not waited on */
	CU_ASSERT_FATAL(mkfifo(path, 0600) == 0);
	CU_ASSERT_EQUAL(io_file_open(&a, path, IO_FILE_RDONLY), -EINVAL);
	CU_ASSERT_EQUAL(io_file_open(&a, path, 0), -EINVAL);
	unlink(path);
	CU_ASSERT_EQUAL(io_file_open(&a, "/dev/null", IO_FILE_RDONLY), -EINVAL);
}

/* ---- cross-thread posts ---- */

#define RP_THREADS 3
#define RP_PER     2000

struct rpost {
	struct io_cmd cmd;
	unsigned from, seq;
	unsigned calls;
	pthread_t ran_on;
};

struct rposter {
	struct io_loop *loop;
	struct rpost *p;
	unsigned id;
};

static unsigned rp_last[RP_THREADS];
static unsigned rp_done, rp_order_bad;

static void rpost_done(struct io_cmd *cmd, int res)
{
	struct rpost *p = container_of(cmd, struct rpost, cmd);

	CU_ASSERT_EQUAL(res, 0);
	p->calls++;
	p->ran_on = pthread_self();
	/* In order per posting thread. */
	if (p->seq && rp_last[p->from] != p->seq - 1)
		rp_order_bad++;
	rp_last[p->from] = p->seq;
	rp_done++;
}

static void *rposter_main(void *arg)
{
	struct rposter *r = arg;

	for (unsigned i = 0; i < RP_PER; i++) {
		r->p[i].cmd.done = rpost_done;
		r->p[i].from = r->id;
		r->p[i].seq = i;
		io_post_remote(r->loop, &r->p[i].cmd);
		if (i % 64 == 0)
			sched_yield();
	}
	return NULL;
}

static void test_post_remote(void)
{
	struct io_loop *loop;
	struct rposter r[RP_THREADS];
	pthread_t tid[RP_THREADS];
	unsigned bad = 0;

	CU_ASSERT_EQUAL_FATAL(io_loop_init(&loop, 8), 0);
	CU_ASSERT_EQUAL_FATAL(io_loop_enable_remote(loop), 0);
	CU_ASSERT_EQUAL(io_loop_enable_remote(loop), 0); /* idempotent */
	rp_done = 0;
	rp_order_bad = 0;
	for (unsigned i = 0; i < RP_THREADS; i++) {
		r[i].loop = loop;
		r[i].id = i;
		r[i].p = calloc(RP_PER, sizeof(struct rpost));
		CU_ASSERT_FATAL(r[i].p != NULL);
		CU_ASSERT_EQUAL_FATAL(pthread_create(&tid[i], NULL, rposter_main, &r[i]), 0);
	}
	/* The loop sleeps in the kernel until a post wakes it. */
	for (int it = 0; it < 100000 && rp_done < RP_THREADS * RP_PER; it++)
		CU_ASSERT(io_loop_run_once(loop, true) >= 0);
	for (unsigned i = 0; i < RP_THREADS; i++)
		pthread_join(tid[i], NULL);
	CU_ASSERT_EQUAL(rp_done, RP_THREADS * RP_PER);
	CU_ASSERT_EQUAL(rp_order_bad, 0);
	for (unsigned i = 0; i < RP_THREADS; i++) {
		for (unsigned k = 0; k < RP_PER; k++) {
			if (r[i].p[k].calls != 1 ||
			    !pthread_equal(r[i].p[k].ran_on, pthread_self()))
				bad++;
		}
		free(r[i].p);
	}
	CU_ASSERT_EQUAL(bad, 0); /* exactly once each, on the loop's thread */
	/* Only the wake-up poll is left in flight. */
	CU_ASSERT_EQUAL(io_loop_inflight(loop), 1);
	io_loop_exit(loop);
}

int main(void)
{
	CU_pSuite s;
	struct io_loop *probe;
	int failed;

	pick_dir();
	if (io_loop_init(&probe, 4) < 0) {
		fprintf(stderr, "io_uring unavailable: skipping\n");
		return 77;
	}
	io_loop_exit(probe);
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("io", NULL, NULL);
	CU_add_test(s, "iov helpers", test_iov_helpers);
	CU_add_test(s, "open O_DIRECT", test_open_direct);
	tu_add_test(s, "open tmpfs fallback", test_open_tmpfs_fallback,
		    tu_on_tmpfs("/dev/shm") ? NULL : "/dev/shm is not tmpfs");
	CU_add_test(s, "from fd", test_from_fd);
	CU_add_test(s, "sync helpers", test_sync_helpers);
	CU_add_test(s, "round trip O_DIRECT", test_roundtrip_direct);
	CU_add_test(s, "misaligned (bounce)", test_misaligned);
	CU_add_test(s, "buffered round trip", test_buffered_roundtrip);
	CU_add_test(s, "injected failures", test_inject_failures);
	CU_add_test(s, "a failed fdatasync after page-cache writes is sticky", test_sync_sticky);
	CU_add_test(s, "transient errors retried", test_transient);
	CU_add_test(s, "short transfers direct", test_short_direct);
	CU_add_test(s, "short transfers bounce", test_short_bounce);
	CU_add_test(s, "short transfers buffered", test_short_buffered);
	CU_add_test(s, "EOF direct", test_eof_direct);
	CU_add_test(s, "EOF buffered", test_eof_buffered);
	CU_add_test(s, "fallocate + fdatasync", test_fallocate_fdatasync);
	CU_add_test(s, "multishot poll", test_poll_multishot);
	CU_add_test(s, "post", test_post);
	CU_add_test(s, "cross-thread posts", test_post_remote);
	CU_add_test(s, "timeouts", test_timeouts);
	CU_add_test(s, "deferred hooks", test_defer);
	CU_add_test(s, "deferred hook order", test_defer_first_order);
	CU_add_test(s, "run/stop", test_run_stop);
	CU_add_test(s, "SQ full backpressure", test_sq_full);
	CU_add_test(s, "busy polling", test_busy_poll);
	CU_add_test(s, "busy polling group", test_poll_group);
	CU_add_test(s, "poll yield", test_poll_yield);
	CU_add_test(s, "busy polling window rule", test_poll_window);
	CU_add_test(s, "busy polling paused by a hook keeps the window", test_poll_paused_by_hook);
	CU_add_test(s, "busy polling adapts per kind", test_poll_adaptive);
	CU_add_test(s, "hybrid polling rules", test_poll_hybrid_rules);
	CU_add_test(s, "hybrid polling", test_poll_hybrid);
	CU_add_test(s, "early submission", test_submit_batch);
	CU_add_test(s, "registered files", test_fixed_files);
	CU_add_test(s, "registered files, several loops", test_fixed_files_loops);
	CU_add_test(s, "registered buffers", test_fixed_buffers);
	CU_add_test(s, "bad arguments", test_bad_args);
	CU_add_test(s, "QEMU-compatible locks", test_locks);
	failed = (int)tu_cunit_run();
	return failed ? 1 : 0;
}
