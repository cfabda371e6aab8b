/* SPDX-License-Identifier: MIT */
/* Integration test harness; see itest.h. */
#include "itest.h"

#include <CUnit/Basic.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

static const char *vqcowd_path;
static bool use_qsd;

/* Daemons started and not stopped yet: a fatal assertion jumps over the
 * test's itest_stop() (and its stack frame), so copies of pid and temp dir
 * are kept here and reaped after each test and at exit. */
#define MAX_LIVE 16
static struct {
	pid_t pid;
	char dir[PATH_MAX];
} live[MAX_LIVE];

static int live_find(const char *dir)
{
	for (int i = 0; i < MAX_LIVE; i++)
		if (live[i].dir[0] && !strcmp(live[i].dir, dir))
			return i;
	return -1;
}

static void live_set(const struct itest_daemon *d)
{
	int i = live_find(d->dir);

	for (int k = 0; i < 0 && k < MAX_LIVE; k++)
		if (!live[k].dir[0])
			i = k;
	if (i < 0 || !d->dir[0])
		return;
	live[i].pid = d->pid;
	snprintf(live[i].dir, sizeof(live[i].dir), "%s", d->dir);
}

static void live_del(const struct itest_daemon *d)
{
	int i = live_find(d->dir);

	if (i >= 0)
		live[i].dir[0] = 0;
}

static void rm_rf(const char *dir);

/* Kill and clean up whatever a test left behind. */
static void reap_leftovers(void)
{
	for (int i = 0; i < MAX_LIVE; i++) {
		if (!live[i].dir[0])
			continue;
		if (live[i].pid > 0) {
			kill(live[i].pid, SIGKILL);
			waitpid(live[i].pid, NULL, 0);
		}
		if (!getenv("ITEST_KEEP"))
			rm_rf(live[i].dir);
		live[i].dir[0] = 0;
	}
}

/* Is @prog an executable in $PATH? */
static bool in_path(const char *prog)
{
	const char *path = getenv("PATH");
	char buf[PATH_MAX];

	while (path && *path) {
		const char *end = strchr(path, ':');
		size_t n = end ? (size_t)(end - path) : strlen(path);

		snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, path, prog);
		if (n && access(buf, X_OK) == 0)
			return true;
		path = end ? end + 1 : NULL;
	}
	return false;
}

/*
 * Extra vqcowd arguments from $VQCOWD_EXTRA (split at spaces; for running a
 * whole suite again with an option, see tests/integration/CMakeLists.txt).
 * Fills at most @max entries of @argv; returns how many.
 */
static int env_args(char **argv, int max)
{
	static char buf[512];
	const char *e = getenv("VQCOWD_EXTRA");
	int n = 0;

	if (!e || !*e)
		return 0;
	snprintf(buf, sizeof(buf), "%s", e);
	for (char *save = NULL, *t = strtok_r(buf, " ", &save); t && n < max;
	     t = strtok_r(NULL, " ", &save))
		argv[n++] = t;
	return n;
}

bool itest_init(int argc, char **argv)
{
	const char *be = getenv("VQCOW_TEST_BACKEND");

	signal(SIGPIPE, SIG_IGN);
	use_qsd = be && !strcmp(be, "qsd");
	if (use_qsd && !in_path("qemu-storage-daemon")) {
		fprintf(stderr,
			"SKIP: VQCOW_TEST_BACKEND=qsd but qemu-storage-daemon is missing\n");
		exit(77);
	}
	vqcowd_path = argc > 1 ? argv[1] : getenv("VQCOWD");
	if (!use_qsd && (!vqcowd_path || access(vqcowd_path, X_OK))) {
		fprintf(stderr, "itest: vqcowd not found (argv[1] or $VQCOWD): %s\n",
			vqcowd_path ? vqcowd_path : "(unset)");
		return false;
	}
	return true;
}

bool itest_is_qsd(void)
{
	return use_qsd;
}

const char *itest_vqcowd_path(void)
{
	return vqcowd_path;
}

void itest_fill(void *buf, size_t len, uint64_t seed)
{
	uint8_t *p = buf;
	uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;

	for (size_t i = 0; i < len; i++) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		p[i] = (uint8_t)(s >> 24);
	}
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void itest_dump_log(const struct itest_daemon *d)
{
	char line[512];
	FILE *f = fopen(d->log, "r");

	if (!f)
		return;
	fprintf(stderr, "---- back-end log (%s) ----\n", d->log);
	while (fgets(line, sizeof(line), f))
		fputs(line, stderr);
	fprintf(stderr, "----\n");
	fclose(f);
}

unsigned itest_log_count(const struct itest_daemon *d, const char *what)
{
	char line[1024];
	unsigned n = 0;
	FILE *f = fopen(d->log, "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		n += strstr(line, what) != NULL;
	fclose(f);
	return n;
}

bool itest_wait_log(const struct itest_daemon *d, const char *what, unsigned n, int timeout_ms)
{
	uint64_t deadline = now_ms() + (uint64_t)timeout_ms;

	for (;;) {
		if (itest_log_count(d, what) > n)
			return true;
		if (now_ms() >= deadline)
			return false;
		usleep(1000);
	}
}

/* Does the back-end's log contain @what? */
static bool log_has(const struct itest_daemon *d, const char *what)
{
	return itest_log_count(d, what) > 0;
}

static int make_image(struct itest_daemon *d, const struct itest_opts *o)
{
	int fd = open(d->img, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
	int rc = 0;

	if (fd < 0)
		return -1;
	if (ftruncate(fd, (off_t)d->img_size) < 0)
		rc = -1;
	if (!rc && o->fill_random) {
		size_t chunk = 1 << 20;
		uint8_t *buf = malloc(chunk);

		for (uint64_t off = 0; buf && off < d->img_size; off += chunk) {
			size_t n = d->img_size - off < chunk ? (size_t)(d->img_size - off) : chunk;

			itest_fill(buf, n, off + 77);
			if (pwrite(fd, buf, n, (off_t)off) != (ssize_t)n) {
				rc = -1;
				break;
			}
		}
		if (!buf)
			rc = -1;
		free(buf);
	}
	close(fd);
	return rc;
}

static bool sock_ready(const char *path)
{
	struct stat st;

	/* connecting would take the back-end's single connection slot: only
	 * check that the socket file exists (itest_connect retries refusals) */
	return stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

static int spawn(struct itest_daemon *d, const struct itest_opts *o, bool append);

int itest_start(struct itest_daemon *d, const struct itest_opts *o)
{
	struct itest_opts def = {0};
	const char *tmp = getenv("TMPDIR");

	if (!o)
		o = &def;
	memset(d, 0, sizeof(*d));
	d->pid = -1;
	snprintf(d->dir, sizeof(d->dir), "%s/vqcow-itest.XXXXXX", tmp ? tmp : "/tmp");
	if (!mkdtemp(d->dir)) {
		perror("itest: mkdtemp");
		return -1;
	}
	snprintf(d->sock, sizeof(d->sock), "%s/sock", d->dir);
	snprintf(d->img, sizeof(d->img), "%s/disk.img", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/daemon.log", d->dir);
	d->img_size = o->img_size ? o->img_size : 32ull << 20;
	if (make_image(d, o) < 0) {
		perror("itest: image");
		return -1;
	}
	return spawn(d, o, false);
}

int itest_restart(struct itest_daemon *d, const struct itest_opts *o)
{
	struct itest_opts def = {0};

	if (d->pid > 0) {
		fprintf(stderr, "itest: restart while the back-end still runs\n");
		return -1;
	}
	/* the dead one's socket file: the new one's must be waited for */
	unlink(d->sock);
	/* After a SIGKILL the kernel keeps the dead daemon's image locks until
	 * its io_uring is torn down: a start in that window is refused (exit 1
	 * before listening) and is simply retried, as a supervisor would. */
	for (int tries = 0; tries < 100; tries++) {
		if (spawn(d, o ? o : &def, true) == 0)
			return 0;
		if (d->pid > 0)
			return -1; /* it did not exit: a real failure */
		usleep(50000);
	}
	itest_dump_log(d);
	return -1;
}

/* Start the back-end on d's socket and image, its output to d->log. */
static int spawn(struct itest_daemon *d, const struct itest_opts *o, bool append)
{
	char *argv[40];
	char nq[32], lbs[64], qsd_file[PATH_MAX + 128], qsd_export[PATH_MAX + 256];
	int argc = 0;
	uint64_t deadline;

	snprintf(nq, sizeof(nq), "%u", o->num_queues ? o->num_queues : 1);
	if (use_qsd) {
		argv[argc++] = "qemu-storage-daemon";
		argv[argc++] = "--blockdev";
		snprintf(qsd_file, sizeof(qsd_file),
			 "driver=file,node-name=f,filename=%s,cache.direct=on,aio=io_uring",
			 d->img);
		argv[argc++] = qsd_file;
		argv[argc++] = "--blockdev";
		argv[argc++] = "driver=raw,node-name=d,file=f";
		argv[argc++] = "--export";
		snprintf(lbs, sizeof(lbs), ",logical-block-size=%u", o->lbs);
		snprintf(qsd_export, sizeof(qsd_export),
			 "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=%s,"
			 "writable=%s,num-queues=%s%s",
			 d->sock, o->read_only ? "off" : "on", nq, o->lbs ? lbs : "");
		argv[argc++] = qsd_export;
	} else {
		argv[argc++] = (char *)vqcowd_path;
		argv[argc++] = "--socket-path";
		argv[argc++] = d->sock;
		argv[argc++] = "--blk-file";
		argv[argc++] = d->img;
		argv[argc++] = "--num-queues";
		argv[argc++] = nq;
		if (o->read_only)
			argv[argc++] = "--read-only";
		if (o->serial) {
			argv[argc++] = "--serial";
			argv[argc++] = (char *)o->serial;
		}
		if (o->lbs) {
			snprintf(lbs, sizeof(lbs), "%u", o->lbs);
			argv[argc++] = "--logical-block-size";
			argv[argc++] = lbs;
		}
		if (o->writethrough)
			argv[argc++] = "--writethrough";
		for (unsigned i = 0; i < 8 && o->extra[i]; i++)
			argv[argc++] = (char *)o->extra[i];
		argc += env_args(argv + argc, 8);
	}
	argv[argc] = NULL;
	d->pid = fork();
	if (d->pid < 0) {
		perror("itest: fork");
		return -1;
	}
	if (d->pid > 0)
		live_set(d);
	if (d->pid == 0) {
		int fd = open(d->log, O_CREAT | O_WRONLY | (append ? O_APPEND : O_TRUNC), 0600);

		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		execvp(argv[0], argv);
		fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	deadline = now_ms() + 10000;
	while (now_ms() < deadline) {
		int st;

		if (sock_ready(d->sock))
			return 0;
		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			fprintf(stderr, "itest: back-end exited (status %#x) before listening\n",
				st);
			d->pid = -1;
			live_set(d);
			if (!append) /* itest_restart retries */
				itest_dump_log(d);
			return -1;
		}
		usleep(10000);
	}
	fprintf(stderr, "itest: back-end did not create %s\n", d->sock);
	itest_dump_log(d);
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	d->pid = -1;
	live_set(d);
	return -1;
}

bool itest_alive(struct itest_daemon *d)
{
	int st;

	if (d->pid <= 0)
		return false;
	if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
		fprintf(stderr, "itest: back-end died (status %#x)\n", st);
		itest_dump_log(d);
		d->pid = -1;
		live_set(d);
		return false;
	}
	return true;
}

int itest_wait_exit(struct itest_daemon *d, int timeout_ms)
{
	uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
	int st;

	if (d->pid <= 0)
		return -1;
	while (now_ms() < deadline) {
		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			d->pid = -1;
			live_set(d);
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		}
		usleep(2000);
	}
	return -1;
}

bool itest_wait_killed(struct itest_daemon *d, int timeout_ms)
{
	int st = itest_wait_exit(d, timeout_ms);

	if (st == 128 + SIGKILL)
		return true;
	if (st < 0)
		fprintf(stderr, "itest: back-end still running after %d ms (no kill)\n",
			timeout_ms);
	else
		fprintf(stderr, "itest: back-end ended with status %d, not by SIGKILL\n", st);
	itest_dump_log(d);
	return false;
}

int itest_signal_wait(struct itest_daemon *d, int sig, int timeout_ms)
{
	uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
	int st;

	if (d->pid <= 0)
		return -1;
	kill(d->pid, sig);
	while (now_ms() < deadline) {
		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			d->pid = -1;
			live_set(d);
			if (WIFEXITED(st))
				return WEXITSTATUS(st);
			return 128 + WTERMSIG(st);
		}
		usleep(5000);
	}
	fprintf(stderr, "itest: back-end still running %d ms after signal %d\n", timeout_ms, sig);
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	d->pid = -1;
	live_set(d);
	return -1;
}

static void rm_rf(const char *dir)
{
	DIR *dp = opendir(dir);
	struct dirent *e;
	char p[PATH_MAX + 300];

	if (!dp)
		return;
	while ((e = readdir(dp))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
		unlink(p);
	}
	closedir(dp);
	rmdir(dir);
}

int itest_stop(struct itest_daemon *d)
{
	const char *expect = getenv("VQCOWD_EXPECT_LOG");
	int rc = 0;

	live_del(d);
	if (d->pid > 0) {
		rc = itest_signal_wait(d, SIGTERM, 20000);
		if (rc != 0)
			itest_dump_log(d);
	}
	/* A variant run (VQCOWD_EXTRA) proves it took effect by a log line. */
	if (expect && *expect && !use_qsd && d->dir[0] && log_has(d, "front-end connected") &&
	    !log_has(d, expect)) {
		fprintf(stderr, "itest: the back-end log lacks \"%s\"\n", expect);
		itest_dump_log(d);
		rc = 1;
	}
	if (d->dir[0] && !getenv("ITEST_KEEP"))
		rm_rf(d->dir);
	d->dir[0] = 0;
	return rc;
}

int itest_fd_count(const struct itest_daemon *d)
{
	char p[64];
	DIR *dp;
	struct dirent *e;
	int n = 0;

	snprintf(p, sizeof(p), "/proc/%d/fd", (int)d->pid);
	dp = opendir(p);
	if (!dp)
		return -1;
	while ((e = readdir(dp)))
		if (e->d_name[0] != '.')
			n++;
	closedir(dp);
	return n;
}

int itest_pread(const struct itest_daemon *d, void *buf, size_t len, uint64_t off)
{
	int fd = open(d->img, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pread(fd, buf, len, (off_t)off);
	close(fd);
	return n == (ssize_t)len ? 0 : -EIO;
}

void itest_fe_opts(struct vqfe_opts *o)
{
	vqfe_opts_init(o);
	o->timeout_ms = 20000;
}

struct vqfe *itest_connect(const struct itest_daemon *d, const struct vqfe_opts *o)
{
	struct vqfe_opts def;
	struct vqfe *fe = NULL;

	if (!o) {
		itest_fe_opts(&def);
		o = &def;
	}
	struct vqfe_opts q;
	uint64_t deadline = now_ms() + 5000;

	/* the socket file appears at bind(), a moment before listen() */
	q = *o;
	q.quiet = true;
	while (vqfe_open(&fe, d->sock, &q) == -ECONNREFUSED && now_ms() < deadline)
		usleep(10000);
	if (!fe && !o->quiet)
		fprintf(stderr, "itest: connect: %s\n", vqfe_strerror(NULL));
	return fe;
}

void itest_crash_start(struct itest_crash *c, const char *name, const char *create_opts,
		       unsigned size_mib, unsigned queues, const char *const *env)
{
	char dir[PATH_MAX], nq[16], var[64];
	struct itest_opts o = {.num_queues = queues};
	struct vqfe_opts fo;
	size_t i;
	int rc;

	memset(c, 0, sizeof(*c));
	snprintf(dir, sizeof(dir), "/tmp/vqcow-%s.XXXXXX", name);
	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(c->img, sizeof(c->img), "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-img create -q -f qcow2 -o %s %s %uM", create_opts, c->img, size_mib), 0);
	snprintf(nq, sizeof(nq), "%u", queues);
	o.extra[0] = "--format";
	o.extra[1] = "qcow2";
	o.extra[2] = "--blk-file";
	o.extra[3] = c->img;
	o.extra[4] = "--io-threads";
	o.extra[5] = nq;
	for (i = 0; env && env[i]; i++) {
		const char *eq = strchr(env[i], '=');

		CU_ASSERT_FATAL(eq && (size_t)(eq - env[i]) < sizeof(var));
		snprintf(var, sizeof(var), "%.*s", (int)(eq - env[i]), env[i]);
		CU_ASSERT_EQUAL_FATAL(setenv(var, eq + 1, 1), 0);
	}
	rc = itest_start(&c->d, &o);
	for (i = 0; env && env[i]; i++) {
		snprintf(var, sizeof(var), "%.*s", (int)strcspn(env[i], "="), env[i]);
		unsetenv(var);
	}
	if (rc < 0)
		CU_FAIL_FATAL("back-end did not start");
	itest_fe_opts(&fo);
	fo.num_queues = queues;
	fo.inflight = true;
	c->fe = itest_connect(&c->d, &fo);
	if (!c->fe) {
		itest_dump_log(&c->d);
		itest_stop(&c->d);
		CU_FAIL_FATAL("cannot connect to the back-end");
	}
}

struct vqfe_req *itest_crash_end(struct itest_crash *c, unsigned q, uint64_t off, void *got,
				 size_t len)
{
	struct vqfe_req *done[2];
	int n;

	if (!itest_wait_killed(&c->d, 10000))
		CU_FAIL_FATAL("no kill at the crash point");
	n = vqfe_reap(c->fe, q, done, 2);
	CU_ASSERT_EQUAL_FATAL(n, 1);
	CU_ASSERT_EQUAL(done[0]->status, VIRTIO_BLK_S_OK);
	vqfe_close(c->fe);
	c->fe = NULL;
	/* the file, as the dead process left it (the page cache) */
	CU_ASSERT(tu_img_check_leaks_ok(c->img, 10000)); /* a kill may leak, never more */
	CU_ASSERT_EQUAL_FATAL(tu_img_read(c->img, "qcow2", off, got, len), 0);
	tu_sh("rm -rf \"$(dirname %s)\"", c->img);
	itest_stop(&c->d); /* the harness's temp dir */
	return done[0];
}

void itest_teardown(void)
{
	reap_leftovers();
}

const char *itest_vqcowd_only(const char *why)
{
	return use_qsd ? why : NULL;
}

int itest_run(const char *name, void (*add_suites)(void))
{
	unsigned failed, ran, nskips;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	atexit(reap_leftovers);
	add_suites();
	CU_basic_set_mode(CU_BRM_VERBOSE);
	CU_basic_run_tests();
	failed = CU_get_number_of_failures() + CU_get_number_of_suites_failed() +
		 CU_get_number_of_tests_failed();
	ran = CU_get_number_of_tests_run();
	nskips = tu_report_skips();
	fprintf(stderr, "%s (%s): %u tests run, %u failures, %u skipped\n", name,
		use_qsd ? "qemu-storage-daemon" : "vqcowd", ran, CU_get_number_of_failures(),
		nskips);
	CU_cleanup_registry();
	if (failed)
		return 1;
	return ran == 0 && nskips ? 77 : 0;
}
