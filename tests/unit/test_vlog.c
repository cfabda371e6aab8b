/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of log/: level names and filtering, the per-call-site rate limit
 * (burst, the count of suppressed lines reported with the next line after the
 * interval and by vlog_flush), and the two output forms on stderr: journal
 * priority prefixes when JOURNAL_STREAM names stderr, timestamps otherwise.
 */
#include <CUnit/Basic.h>
#include <fcntl.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vlog.h"
#include "testutil.h"

static char g_buf[65536];
static size_t g_len;
static unsigned g_lines;

static void sink(enum vlog_level level, const char *line, void *opaque)
{
	int n = snprintf(g_buf + g_len, sizeof(g_buf) - g_len, "%d|%s\n", (int)level, line);

	if (n > 0 && (size_t)n < sizeof(g_buf) - g_len)
		g_len += (size_t)n;
	g_lines++;
}

static void capture(void)
{
	g_len = 0;
	g_buf[0] = 0;
	g_lines = 0;
	vlog_set_sink(sink, NULL);
	vlog_set_rate_limit(VLOG_BURST, VLOG_INTERVAL_MS);
	vlog_set_level(VLOG_INFO);
}

static void test_levels(void)
{
	enum vlog_level l;

	CU_ASSERT_EQUAL(vlog_parse_level("error", &l), 0);
	CU_ASSERT_EQUAL(l, VLOG_ERROR);
	CU_ASSERT_EQUAL(vlog_parse_level("warn", &l), 0);
	CU_ASSERT_EQUAL(l, VLOG_WARN);
	CU_ASSERT_EQUAL(vlog_parse_level("warning", &l), 0);
	CU_ASSERT_EQUAL(l, VLOG_WARN);
	CU_ASSERT_EQUAL(vlog_parse_level("info", &l), 0);
	CU_ASSERT_EQUAL(l, VLOG_INFO);
	CU_ASSERT_EQUAL(vlog_parse_level("debug", &l), 0);
	CU_ASSERT_EQUAL(l, VLOG_DEBUG);
	CU_ASSERT_NOT_EQUAL(vlog_parse_level("verbose", &l), 0);
	CU_ASSERT_NOT_EQUAL(vlog_parse_level("", &l), 0);

	capture();
	vlog(VLOG_DEBUG, NULL, "hidden %d", 1);
	vlog(VLOG_INFO, "tag", "shown %d", 2);
	vlog_set_level(VLOG_ERROR);
	CU_ASSERT_FALSE(vlog_enabled(VLOG_WARN));
	vlog(VLOG_WARN, NULL, "hidden %d", 3);
	vlog(VLOG_ERROR, NULL, "shown %d", 4);
	vlog_set_level(VLOG_DEBUG);
	vlog(VLOG_DEBUG, NULL, "shown %d", 5);
	CU_ASSERT_STRING_EQUAL(g_buf, "2|tag: shown 2\n0|shown 4\n3|shown 5\n");
	vlog_set_sink(NULL, NULL);
}

static void test_rate_limit(void)
{
	capture();
	/* one call site, a storm: VLOG_BURST lines, the rest counted */
	for (int i = 0; i < 1000; i++)
		vlog(VLOG_WARN, "vhost", "storm %d", i);
	/* another call site is not affected */
	vlog(VLOG_INFO, NULL, "other site");
	CU_ASSERT_EQUAL(g_lines, VLOG_BURST + 1);
	CU_ASSERT_PTR_NOT_NULL(strstr(g_buf, "1|vhost: storm 9\n"));
	CU_ASSERT_PTR_NULL(strstr(g_buf, "storm 10\n"));
	vlog_flush();
	CU_ASSERT_EQUAL(g_lines, VLOG_BURST + 2);
	CU_ASSERT_PTR_NOT_NULL(strstr(
	    g_buf, "1|990 similar messages suppressed (rate limit); the last: vhost: storm 999\n"));
	vlog_flush(); /* reported once */
	CU_ASSERT_EQUAL(g_lines, VLOG_BURST + 2);

	/* interleaved sites are counted each on its own (no slot stealing) */
	capture();
	for (int i = 0; i < 100; i++) {
		vlog(VLOG_INFO, NULL, "site a %d", i);
		vlog(VLOG_INFO, "x", "site b %d", i);
		vlog(VLOG_WARN, NULL, "site c%s", "");
	}
	CU_ASSERT_EQUAL(g_lines, 3 * VLOG_BURST);

	/* after the interval the site logs again, the count comes first */
	capture();
	vlog_set_rate_limit(2, 100);
	for (int i = 0; i < 5; i++)
		vlog(VLOG_ERROR, NULL, "burst %d", i);
	usleep(150000);
	vlog(VLOG_ERROR, NULL, "burst %d", 5);
	CU_ASSERT_STRING_EQUAL(g_buf,
			       "0|burst 0\n0|burst 1\n"
			       "0|3 similar messages suppressed (rate limit); the last: burst 4\n"
			       "0|burst 5\n");
	/* debug lines are never limited */
	capture();
	vlog_set_level(VLOG_DEBUG);
	for (int i = 0; i < 100; i++)
		vlog(VLOG_DEBUG, NULL, "debug %d", i);
	CU_ASSERT_EQUAL(g_lines, 100);
	/* burst 0: no limit */
	capture();
	vlog_set_rate_limit(0, 0);
	for (int i = 0; i < 100; i++)
		vlog(VLOG_INFO, NULL, "unlimited %d", i);
	CU_ASSERT_EQUAL(g_lines, 100);
	vlog_set_sink(NULL, NULL);
	vlog_set_rate_limit(VLOG_BURST, VLOG_INTERVAL_MS);
}

/* Run @fn with stderr redirected to a file; return what it wrote. */
static char *stderr_of(void (*fn)(void))
{
	static char out[4096];
	char path[] = "/tmp/vlog-XXXXXX";
	int fd = mkstemp(path), saved = dup(STDERR_FILENO);
	ssize_t n;

	unlink(path);
	fflush(stderr);
	dup2(fd, STDERR_FILENO);
	fn();
	dup2(saved, STDERR_FILENO);
	close(saved);
	n = pread(fd, out, sizeof(out) - 1, 0);
	close(fd);
	out[n > 0 ? n : 0] = 0;
	return out;
}

static void emit_two(void)
{
	struct stat st;
	char env[64];

	/* not the journal: JOURNAL_STREAM names another stream */
	setenv("JOURNAL_STREAM", "1:1", 1);
	vlog_init("prog");
	vlog(VLOG_WARN, "vhost", "plain %d", 1);
	/* the journal: JOURNAL_STREAM names our stderr */
	fstat(STDERR_FILENO, &st);
	snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)st.st_dev,
		 (unsigned long long)st.st_ino);
	setenv("JOURNAL_STREAM", env, 1);
	vlog_init("prog");
	vlog(VLOG_ERROR, NULL, "journal %d", 2);
	vlog(VLOG_INFO, NULL, "journal %d", 3);
	unsetenv("JOURNAL_STREAM");
	vlog_init("prog");
}

static void test_output_forms(void)
{
	regex_t re;
	char *out;

	vlog_set_sink(NULL, NULL);
	vlog_set_level(VLOG_INFO);
	vlog_set_rate_limit(VLOG_BURST, VLOG_INTERVAL_MS);
	out = stderr_of(emit_two);
	CU_ASSERT_EQUAL_FATAL(
	    regcomp(&re,
		    "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3} "
		    "prog: warn: vhost: plain 1\n"
		    "<3>prog: journal 2\n"
		    "<6>prog: journal 3\n$",
		    REG_EXTENDED),
	    0);
	if (regexec(&re, out, 0, NULL, 0) != 0) {
		fprintf(stderr, "got:\n%s", out);
		CU_FAIL("output form");
	}
	regfree(&re);
}

int main(void)
{
	CU_pSuite s;
	int failed;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("vlog", NULL, NULL);
	CU_add_test(s, "levels", test_levels);
	CU_add_test(s, "rate limit", test_rate_limit);
	CU_add_test(s, "journal and timestamps", test_output_forms);
	failed = (int)tu_cunit_run();
	return failed ? 1 : 0;
}
