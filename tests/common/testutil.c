/* SPDX-License-Identifier: MIT */
/* tests/common/testutil.c — helpers shared by the unit tests (testutil.h). */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

bool tu_on_tmpfs(const char *dir)
{
	struct statfs s;

	return statfs(dir, &s) == 0 && s.f_type == TMPFS_MAGIC;
}

const char *tu_test_dir(void)
{
	const char *env = getenv("VQCOW_TEST_DIR");

	if (env && *env)
		return env;
	return tu_on_tmpfs(".") ? "/var/tmp" : ".";
}

int tu_mkdtemp(char *buf, size_t len, const char *prefix)
{
	if ((size_t)snprintf(buf, len, "%s/%s.XXXXXX", tu_test_dir(), prefix) >= len)
		return -ENAMETOOLONG;
	return mkdtemp(buf) ? 0 : -errno;
}

int tu_sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

bool tu_lock_held(const char *path, int off)
{
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off, .l_len = 1};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	bool held;

	CU_ASSERT_FATAL(fd >= 0);
	CU_ASSERT_FATAL(fcntl(fd, F_OFD_GETLK, &fl) == 0);
	held = fl.l_type != F_UNLCK;
	close(fd);
	return held;
}

bool tu_img_check_leaks_ok(const char *img, int wait_ms)
{
	int n;

	for (int waited = 0;; waited += 100) {
		n = tu_sh("qemu-img check -q '%s' >/dev/null 2>&1", img);
		if (n != 1 || waited >= wait_ms)
			break;
		usleep(100000);
	}
	if (n == 0 || n == 3)
		return true;
	fprintf(stderr, "qemu-img check %s: exit %d\n", img, n);
	tu_sh("qemu-img check '%s' >&2", img);
	return false;
}

int tu_img_read(const char *img, const char *fmt, uint64_t off, void *buf, size_t len)
{
	char raw[4096];
	FILE *f;
	size_t got = 0;

	snprintf(raw, sizeof(raw), "%s.tu-read", img);
	if (tu_sh("qemu-img convert -U -f %s -O raw '%s' '%s'", fmt, img, raw) != 0) {
		fprintf(stderr, "%s: qemu-img convert failed\n", img);
		return -1;
	}
	f = fopen(raw, "rb");
	if (f && fseeko(f, (off_t)off, SEEK_SET) == 0)
		got = fread(buf, 1, len, f);
	if (f)
		fclose(f);
	unlink(raw);
	if (got != len) {
		fprintf(stderr, "%s: %zu of %zu bytes at %llu read\n", img, got, len,
			(unsigned long long)off);
		return -1;
	}
	return 0;
}

int tu_count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		return -1;
	while ((e = readdir(d)))
		n++;
	closedir(d);
	return n;
}

char *tu_path(const char *dir, const char *name)
{
	static char bufs[4][1024];
	static int k;
	char *b = bufs[k++ % 4];

	snprintf(b, sizeof(bufs[0]), "%s/%s", dir, name);
	return b;
}

uint64_t tu_xorshift64(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

unsigned tu_lcg(unsigned *state)
{
	*state = *state * 1103515245u + 12345u;
	return *state >> 8;
}

#define MAX_SKIPS 32
static struct {
	const char *name, *why;
} skips[MAX_SKIPS];
static unsigned nskips;

CU_pTest tu_add_test(CU_pSuite s, const char *name, CU_TestFunc fn, const char *skip)
{
	CU_pTest t = CU_add_test(s, name, fn);

	if (!t || !skip)
		return t;
	CU_set_test_active(t, CU_FALSE);
	CU_set_fail_on_inactive(CU_FALSE); /* a skip, not a failure */
	if (nskips < MAX_SKIPS) {
		skips[nskips].name = name;
		skips[nskips].why = skip;
	}
	nskips++;
	return t;
}

unsigned tu_report_skips(void)
{
	for (unsigned i = 0; i < nskips && i < MAX_SKIPS; i++)
		fprintf(stderr, "SKIP: %s: %s\n", skips[i].name, skips[i].why);
	return nskips;
}

unsigned tu_cunit_run(void)
{
	unsigned failed;

	CU_basic_set_mode(CU_BRM_VERBOSE);
	CU_basic_run_tests();
	tu_report_skips();
	failed = CU_get_number_of_failures() + CU_get_number_of_suites_failed();
	CU_cleanup_registry();
	return failed;
}
