/* SPDX-License-Identifier: MIT */
/*
 * Tests of the vqcowd command line and life cycle (no frontend): option
 * errors (one line, non-zero exit), --print-capabilities, --version, a
 * missing image, listening on --socket-path and --fd, SIGTERM drain -> exit
 * 0 with the socket removed, SIGHUP size refresh, capabilities dropped,
 * --user/--group.
 *
 * The daemon binary is found next to this test in the build tree
 * (<build>/tests/unit/../../src/vqcowd) or in $VQCOWD; missing => failure
 * (it is ours: a build problem, never a reason to skip).
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

static char g_vqcowd[4096];
static char g_dir[64];
static char g_img[512];
static char g_sock[100];

/* Run vqcowd with @argv (NULL-terminated, without argv[0]); capture output. */
static int run(const char *const *args, char *out, size_t outlen, char *err, size_t errlen)
{
	int po[2], pe[2], status;
	const char *argv[32];
	unsigned n = 0;
	pid_t pid;
	ssize_t k;

	argv[n++] = g_vqcowd;
	for (; *args && n < 31; args++)
		argv[n++] = *args;
	argv[n] = NULL;
	CU_ASSERT_FATAL(pipe(po) == 0 && pipe(pe) == 0);
	pid = fork();
	CU_ASSERT_FATAL(pid >= 0);
	if (pid == 0) {
		dup2(po[1], 1);
		dup2(pe[1], 2);
		close(po[0]);
		close(pe[0]);
		execv(g_vqcowd, (char **)argv);
		_exit(127);
	}
	close(po[1]);
	close(pe[1]);
	k = read(po[0], out, outlen - 1);
	out[k > 0 ? k : 0] = '\0';
	k = read(pe[0], err, errlen - 1);
	err[k > 0 ? k : 0] = '\0';
	close(po[0]);
	close(pe[0]);
	CU_ASSERT_FATAL(waitpid(pid, &status, 0) == pid);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static unsigned count_lines(const char *s)
{
	unsigned n = 0;

	for (; *s; s++)
		n += *s == '\n';
	return n;
}

static void expect_error(const char *const *args, const char *needle)
{
	char out[4096], err[4096];
	int rc = run(args, out, sizeof(out), err, sizeof(err));

	CU_ASSERT_NOT_EQUAL(rc, 0);
	CU_ASSERT_EQUAL(count_lines(err), 1);
	CU_ASSERT_EQUAL(out[0], '\0');
	if (needle && !strstr(err, needle)) {
		fprintf(stderr, "expected '%s' in: %s", needle, err);
		CU_FAIL("error message");
	}
}

static void test_info_options(void)
{
	char out[4096], err[4096];
	const char *caps[] = {"--print-capabilities", NULL};
	const char *ver[] = {"--version", NULL};
	const char *help[] = {"--help", NULL};

	CU_ASSERT_EQUAL(run(caps, out, sizeof(out), err, sizeof(err)), 0);
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"type\": \"block\""));
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"read-only\""));
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"blk-file\""));
	/* reconnect and live migration */
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"inflight-shmfd\""));
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"log-shmfd\""));
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"log-all\""));
	CU_ASSERT_EQUAL(run(ver, out, sizeof(out), err, sizeof(err)), 0);
	CU_ASSERT(strncmp(out, "vqcowd ", 7) == 0);
	CU_ASSERT_EQUAL(run(help, out, sizeof(out), err, sizeof(err)), 0);
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "--socket-path"));
}

static void test_bad_options(void)
{
	const char *s = g_sock, *i = g_img;
	const char *a1[] = {NULL};
	const char *a2[] = {"--socket-path", s, NULL};
	const char *a3[] = {"--socket-path", s, "--fd", "0", "--blk-file", i, NULL};
	const char *a4[] = {"--socket-path", s, "--blk-file", i, "--queue-size", "100", NULL};
	const char *a5[] = {"--socket-path", s, "--blk-file", i, "--num-queues", "0", NULL};
	const char *a6[] = {"--socket-path",        s,      "--blk-file", i,
			    "--logical-block-size", "1024", NULL};
	const char *a7[] = {"--socket-path",         s,   "--blk-file", i, "--serial",
			    "123456789012345678901", NULL};
	const char *a8[] = {"--socket-path", s, "--blk-file", i, "--format", "vmdk", NULL};
	const char *a9[] = {"--socket-path", s, "--blk-file", i, "--bogus", NULL};
	const char *a10[] = {"--socket-path", s, "--blk-file", i, "--fd", "x", NULL};
	const char *a11[] = {"--socket-path", s, "--blk-file", "/nonexistent/img", NULL};
	const char *a12[] = {"--socket-path", s, "--blk-file", i, "--user", "no-such-user-x", NULL};
	const char *a13[] = {"--socket-path", s, "--blk-file", i, "--poll-ns", "-5", NULL};
	const char *a14[] = {"--socket-path", s, "--blk-file", i, "stray", NULL};
	const char *a15[] = {"--fd", "999", "--blk-file", i, NULL};
	const char *a16[] = {"--socket-path", s, "--blk-file", i, "--num-queues", NULL};
	const char *a17[] = {"--socket-path", s, "--blk-file", i, "--poll-hybrid", "91", NULL};
	const char *a18[] = {
	    "--socket-path", s, "--blk-file", i, "--io-threads-consolidate=1", NULL};
	const char *a20[] = {"--socket-path", s, "--blk-file", i, "--poll-high-hold", "x", NULL};
	const char *a19[] = {"--socket-path", s,   "--blk-file", i, "--io-threads-consolidate",
			     "off",           NULL};

	expect_error(a1, "--socket-path");
	expect_error(a2, "--blk-file");
	expect_error(a3, "exactly one");
	expect_error(a4, "queue-size");
	expect_error(a5, "num-queues");
	expect_error(a6, "logical-block-size");
	expect_error(a7, "serial");
	expect_error(a8, "format");
	expect_error(a9, "--bogus");
	expect_error(a10, "fd");
	expect_error(a11, "/nonexistent/img");
	expect_error(a12, "no-such-user-x");
	expect_error(a13, "poll-ns");
	expect_error(a14, "stray");
	expect_error(a15, "fd");
	expect_error(a16, "num-queues");
	expect_error(a17, "poll-hybrid");
	expect_error(a20, "poll-high-hold");
	expect_error(a18, "--io-threads-consolidate: expected on or off");
	/* the value of an on|off option goes after '=': say so */
	expect_error(a19, "--io-threads-consolidate=off");
}

struct daemon_proc {
	pid_t pid;
	char log[600];
};

static void start(struct daemon_proc *d, const char *const *args, int keep_fd)
{
	const char *argv[32];
	unsigned n = 0;
	int fd;

	snprintf(d->log, sizeof(d->log), "%s/daemon.log", g_dir);
	argv[n++] = g_vqcowd;
	for (; *args && n < 31; args++)
		argv[n++] = *args;
	argv[n] = NULL;
	unlink(d->log); /* no stale "serving" from the previous run */
	d->pid = fork();
	CU_ASSERT_FATAL(d->pid >= 0);
	if (d->pid == 0) {
		fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		dup2(fd, 2);
		dup2(fd, 1);
		if (keep_fd >= 0 && keep_fd != 3) {
			dup2(keep_fd, 3);
			close(keep_fd);
		}
		execv(g_vqcowd, (char **)argv);
		_exit(127);
	}
}

static bool log_has(const struct daemon_proc *d, const char *needle)
{
	char buf[8192];
	ssize_t n;
	int fd = open(d->log, O_RDONLY);

	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return strstr(buf, needle) != NULL;
}

static bool wait_log(const struct daemon_proc *d, const char *needle)
{
	for (int i = 0; i < 500; i++) {
		if (log_has(d, needle))
			return true;
		usleep(10000);
	}
	return false;
}

static int stop(struct daemon_proc *d, int sig)
{
	int status = 0;

	kill(d->pid, sig);
	for (int i = 0; i < 500; i++) {
		pid_t r = waitpid(d->pid, &status, WNOHANG);

		if (r == d->pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		usleep(10000);
	}
	kill(d->pid, SIGKILL);
	waitpid(d->pid, &status, 0);
	CU_FAIL("daemon did not exit");
	return -1;
}

static int connect_sock(const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void test_socket_lifecycle(void)
{
	struct daemon_proc d;
	struct stat st;
	const char *args[] = {"--socket-path", g_sock, "--blk-file", g_img, "--serial", "x", NULL};
	int c;

	start(&d, args, -1);
	CU_ASSERT_FATAL(wait_log(&d, "serving"));
	CU_ASSERT(log_has(&d, "capabilities dropped"));
	CU_ASSERT_EQUAL(stat(g_sock, &st), 0);
	CU_ASSERT(S_ISSOCK(st.st_mode));
	CU_ASSERT_EQUAL(st.st_mode & 0777, 0600);
	c = connect_sock(g_sock);
	CU_ASSERT(c >= 0);
	CU_ASSERT(wait_log(&d, "connected"));
	/* the frontend goes away: the daemon keeps listening */
	close(c);
	CU_ASSERT(wait_log(&d, "disconnected"));
	c = connect_sock(g_sock);
	CU_ASSERT(c >= 0);
	/* SIGHUP re-reads the size */
	kill(d.pid, SIGHUP);
	CU_ASSERT(wait_log(&d, "SIGHUP: image size unchanged (16777216 bytes)"));
	CU_ASSERT_EQUAL(truncate(g_img, 32 << 20), 0);
	kill(d.pid, SIGHUP);
	CU_ASSERT(wait_log(&d, "SIGHUP: image size is now 33554432 bytes"));
	CU_ASSERT_EQUAL(truncate(g_img, 16 << 20), 0);
	if (c >= 0)
		close(c);
	CU_ASSERT_EQUAL(stop(&d, SIGTERM), 0);
	CU_ASSERT(log_has(&d, "image flushed"));
	CU_ASSERT_NOT_EQUAL(stat(g_sock, &st), 0); /* removed */

	/* SIGINT works the same */
	start(&d, args, -1);
	CU_ASSERT_FATAL(wait_log(&d, "serving"));
	CU_ASSERT_EQUAL(stop(&d, SIGINT), 0);
}

/*
 * --io-threads-consolidate[=on|off]: bare and =on turn it on, =off off (the
 * default is CONSOLIDATE_DEFAULT); with one thread it is ignored, with a
 * warning only when asked for.
 */
static void test_consolidate_switch(void)
{
	static const struct {
		const char *opt, *threads;
		bool on, warn;
	} cases[] = {
	    {"--io-threads-consolidate", "2", true, false},
	    {"--io-threads-consolidate=on", "2", true, false},
	    {"--io-threads-consolidate=off", "2", false, false},
	    {"--io-threads-consolidate=on", "1", false, true},
	    {"--io-threads-consolidate=off", "1", false, false},
	    {NULL, "1", false, false},
	};

	for (unsigned k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		struct daemon_proc d;
		const char *args[] = {"--socket-path", g_sock,           "--blk-file", g_img,
				      "--io-threads",  cases[k].threads, cases[k].opt, NULL};

		start(&d, args, -1);
		CU_ASSERT_FATAL(wait_log(&d, "serving"));
		if (log_has(&d, "at low load the I/O threads' queues move") != cases[k].on ||
		    log_has(&d, "--io-threads-consolidate: ignored") != cases[k].warn) {
			fprintf(stderr, "%s --io-threads %s: on %d, warning %d expected\n",
				cases[k].opt ? cases[k].opt : "(none)", cases[k].threads,
				cases[k].on, cases[k].warn);
			CU_FAIL("--io-threads-consolidate");
		}
		CU_ASSERT_EQUAL(stop(&d, SIGTERM), 0);
	}
}

static void test_listen_fd(void)
{
	struct daemon_proc d;
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	const char *args[] = {"--fd", "3", "--blk-file", g_img, "--read-only", NULL};
	int lfd, c;

	lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", g_sock);
	unlink(g_sock);
	CU_ASSERT_FATAL(bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0);
	CU_ASSERT_FATAL(listen(lfd, 1) == 0);
	start(&d, args, lfd);
	close(lfd);
	CU_ASSERT_FATAL(wait_log(&d, "serving"));
	CU_ASSERT(log_has(&d, "read-only"));
	c = connect_sock(g_sock);
	CU_ASSERT(c >= 0);
	CU_ASSERT(wait_log(&d, "connected"));
	if (c >= 0)
		close(c);
	CU_ASSERT_EQUAL(stop(&d, SIGTERM), 0);
	unlink(g_sock);
}

static void test_user_switch(void)
{
	struct daemon_proc d;
	const char *args[] = {"--socket-path", g_sock,    "--blk-file", g_img, "--user",
			      "65534",         "--group", "65534",      NULL};
	char path[64], line[256];
	bool uid_ok = false, caps_ok = false;
	FILE *f;
	struct stat st;

	start(&d, args, -1);
	CU_ASSERT_FATAL(wait_log(&d, "serving"));
	CU_ASSERT(log_has(&d, "switched to uid 65534 gid 65534"));
	snprintf(path, sizeof(path), "/proc/%d/status", (int)d.pid);
	f = fopen(path, "r");
	CU_ASSERT_FATAL(f != NULL);
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, "Uid:", 4) == 0)
			uid_ok = strstr(line, "65534\t65534\t65534\t65534") != NULL;
		if (strncmp(line, "CapEff:", 7) == 0)
			caps_ok = strstr(line, "0000000000000000") != NULL;
	}
	fclose(f);
	CU_ASSERT(uid_ok);
	CU_ASSERT(caps_ok);
	/* the socket belongs to the new user so its frontend can connect */
	CU_ASSERT_EQUAL(stat(g_sock, &st), 0);
	CU_ASSERT_EQUAL(st.st_uid, 65534);
	CU_ASSERT_EQUAL(stop(&d, SIGTERM), 0);
}

static bool find_vqcowd(void)
{
	char self[4096];
	const char *env = getenv("VQCOWD");
	ssize_t n;

	if (env && *env) {
		snprintf(g_vqcowd, sizeof(g_vqcowd), "%s", env);
		return access(g_vqcowd, X_OK) == 0;
	}
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0)
		return false;
	self[n] = '\0';
	snprintf(g_vqcowd, sizeof(g_vqcowd), "%s/../../src/vqcowd", dirname(self));
	return access(g_vqcowd, X_OK) == 0;
}

int main(void)
{
	CU_pSuite s;
	int failed, fd;
	char tmpl[] = "/tmp/vqcowd-test.XXXXXX";

	if (!find_vqcowd()) {
		fprintf(stderr, "FAIL: vqcowd binary not found (%s)\n", g_vqcowd);
		return 1;
	}
	if (!mkdtemp(tmpl))
		return 1;
	snprintf(g_dir, sizeof(g_dir), "%s", tmpl);
	chmod(g_dir, 0755);
	snprintf(g_img, sizeof(g_img), "%s/disk.raw", g_dir);
	snprintf(g_sock, sizeof(g_sock), "%s/vqcowd.sock", g_dir);
	fd = open(g_img, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || ftruncate(fd, 16 << 20) < 0)
		return 1;
	close(fd);

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("vqcowd", NULL, NULL);
	CU_add_test(s, "info options", test_info_options);
	CU_add_test(s, "bad options", test_bad_options);
	CU_add_test(s, "socket life cycle", test_socket_lifecycle);
	CU_add_test(s, "listening fd", test_listen_fd);
	CU_add_test(s, "consolidate switch", test_consolidate_switch);
	tu_add_test(s, "user switch", test_user_switch,
		    geteuid() != 0 ? "--user needs root to switch users" : NULL);
	failed = (int)tu_cunit_run();
	unlink(g_img);
	unlink(g_sock);
	{
		char log[600];

		snprintf(log, sizeof(log), "%s/daemon.log", g_dir);
		unlink(log);
	}
	rmdir(g_dir);
	return failed ? 1 : 0;
}
