/* SPDX-License-Identifier: MIT */
/*
 * Integration test harness: starts a vhost-user-blk back-end on a temporary
 * raw image and gives the tests its socket, pid and image file.
 *
 * Back-end selection:
 *  - default: vqcowd, whose path is argv[1] (CMake passes $<TARGET_FILE:vqcowd>)
 *    or $VQCOWD;
 *  - VQCOW_TEST_BACKEND=qsd: qemu-storage-daemon with a vhost-user-blk export
 *    (the reference implementation, to check the tests themselves). Checks of
 *    vqcowd-specific behaviour are skipped there (itest_is_qsd()).
 * A back-end that does not start is a test failure, never a skip.
 */
#ifndef TESTS_INTEGRATION_ITEST_H
#define TESTS_INTEGRATION_ITEST_H

#include <CUnit/CUnit.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vqfe.h"

struct itest_opts {
	uint64_t img_size;   /* default 32 MiB */
	unsigned num_queues; /* default 1 */
	bool read_only;
	const char *serial;   /* vqcowd only */
	unsigned lbs;         /* logical block size, 0 = default */
	bool writethrough;    /* vqcowd only */
	bool fill_random;     /* fill the image with random bytes first */
	const char *extra[8]; /* extra vqcowd arguments, NULL-terminated */
};

struct itest_daemon {
	pid_t pid;
	char dir[PATH_MAX];
	char sock[PATH_MAX + 16];
	char img[PATH_MAX + 16];
	char log[PATH_MAX + 16];
	uint64_t img_size;
};

/* Parse argv/env; call first in main(). Returns false on a usage problem. */
bool itest_init(int argc, char **argv);
bool itest_is_qsd(void);
const char *itest_vqcowd_path(void);

/*
 * Create the temp dir and image, start the back-end, wait for its socket.
 * 0 or -1 (message on stderr, and the daemon's log is printed).
 */
int itest_start(struct itest_daemon *d, const struct itest_opts *o);
/* Start a new back-end on the socket and image of @d, whose back-end is gone
 * (e.g. killed and reaped by itest_alive()); its log is appended to d->log.
 * 0 or -1 as itest_start. */
int itest_restart(struct itest_daemon *d, const struct itest_opts *o);
/* Send @sig and wait up to @timeout_ms. Returns the exit status (0..255),
 * 128+signal if killed by one, or -1 on timeout (it is then SIGKILLed). */
int itest_signal_wait(struct itest_daemon *d, int sig, int timeout_ms);
/* Wait up to @timeout_ms for the back-end to end by itself: its exit status
 * (128 + N after signal N), or -1 if it still runs (it is left running). */
int itest_wait_exit(struct itest_daemon *d, int timeout_ms);
/* Wait up to @timeout_ms for the back-end to die by SIGKILL (a crash seam
 * such as VQCOWD_TEST_CRASH, or a kill -9 from elsewhere): true if it did.
 * Otherwise it says on stderr what happened instead (still running, or its
 * exit status), prints the daemon's log and returns false; a back-end still
 * running is left to itest_teardown. */
bool itest_wait_killed(struct itest_daemon *d, int timeout_ms);
/* SIGTERM + wait, then remove the temp dir. Returns the exit status. */
int itest_stop(struct itest_daemon *d);
/* Is the daemon still running? */
bool itest_alive(struct itest_daemon *d);
/* Number of open fds of the daemon (/proc/PID/fd), or -1. */
int itest_fd_count(const struct itest_daemon *d);
/* pread the image file (O_DIRECT-safe: plain buffered read after the daemon flushed). */
int itest_pread(const struct itest_daemon *d, void *buf, size_t len, uint64_t off);
/* Print the daemon's log to stderr (on failures). */
void itest_dump_log(const struct itest_daemon *d);
/* Lines of the daemon's log that contain @what. */
unsigned itest_log_count(const struct itest_daemon *d, const char *what);
/* Wait up to @timeout_ms (polling every millisecond) until more than @n lines
 * of the daemon's log contain @what: true if they do. */
bool itest_wait_log(const struct itest_daemon *d, const char *what, unsigned n, int timeout_ms);

/* Options for a vqfe connection with the harness's timeout. */
void itest_fe_opts(struct vqfe_opts *o);
/* Connect with @o (NULL: defaults). NULL on failure (message on stderr). */
struct vqfe *itest_connect(const struct itest_daemon *d, const struct vqfe_opts *o);

/* Deterministic pseudo-random fill. */
void itest_fill(void *buf, size_t len, uint64_t seed);

/* Per-test teardown for CU_add_suite_with_setup_and_teardown: kills and
 * cleans up any daemon a failed test left behind (a fatal assertion skips
 * the test's own itest_stop). */
void itest_teardown(void);

/* @why with qemu-storage-daemon as the back-end, NULL with vqcowd: the skip
 * reason for tu_add_test() (tests/common/testutil.h) of a test that checks
 * vqcowd-specific behaviour. */
const char *itest_vqcowd_only(const char *why);

/*
 * Run a CUnit registry built by @add_suites; returns the process exit code:
 * 1 on any failure, 77 when every test was skipped, else 0. Skipped tests
 * (tu_add_test) are named and counted in the closing line.
 */
int itest_run(const char *name, void (*add_suites)(void));

/* ---- shorthands for the test files ---- */

#define MiB (1024ull * 1024)

/* Start a back-end with the given itest_opts fields or fail the test. */
#define START(d, ...)                                                                              \
	struct itest_daemon d;                                                                     \
	do {                                                                                       \
		struct itest_opts o_ = {__VA_ARGS__};                                              \
		if (itest_start(&d, &o_) < 0)                                                      \
			CU_FAIL_FATAL("back-end did not start");                                   \
	} while (0)

/* Connect with @opts (NULL: defaults) or dump the log, stop and fail the test. */
#define CONNECT(fe, d, opts)                                                                       \
	struct vqfe *fe = itest_connect(&(d), opts);                                               \
	do {                                                                                       \
		if (!fe) {                                                                         \
			itest_dump_log(&(d));                                                      \
			itest_stop(&(d));                                                          \
			CU_FAIL_FATAL("cannot connect to the back-end");                           \
		}                                                                                  \
	} while (0)

/* Stop it, asserting a clean exit. */
#define STOP(d) CU_ASSERT_EQUAL(itest_stop(&(d)), 0)

/* ---- a kill -9 round on a fresh qcow2 (integration.earlylink, .sidebatch) ---- */

struct itest_crash {
	struct itest_daemon d;
	struct vqfe *fe;
	char img[PATH_MAX + 32]; /* the image, in a temp dir of its own */
};

/*
 * `qemu-img create -o @create_opts` of a @size_mib MiB qcow2 in
 * /tmp/vqcow-@name.XXXXXX; vqcowd started on it with @queues queues and as
 * many I/O threads (--io-threads), the environment @env ("NAME=VALUE"
 * strings, NULL-terminated: the test seams) set for its start only; then
 * connected with inflight tracking (the crash points of VQCOWD_TEST_CRASH
 * are those of inflight tracking). Any failure fails the test (fatal).
 */
void itest_crash_start(struct itest_crash *c, const char *name, const char *create_opts,
		       unsigned size_mib, unsigned queues, const char *const *env);
/*
 * After the requests that fire the crash seam were submitted on queue @q:
 * waits (10 s) until the daemon killed itself, reaps the one request the
 * guest saw complete (fatal unless exactly one, status OK expected) and
 * returns it; closes the connection; `qemu-img check` of the image, as the
 * dead process left it, must find leaks at most; @len bytes at @off of the
 * image are read into @got (fatal on failure); the image's dir and the
 * harness's temp dir are removed.
 */
struct vqfe_req *itest_crash_end(struct itest_crash *c, unsigned q, uint64_t off, void *got,
				 size_t len);

#endif /* TESTS_INTEGRATION_ITEST_H */
