/* SPDX-License-Identifier: MIT */
/*
 * tests/common/testutil.h — helpers shared by the unit and integration tests (library
 * vqcow_test_util; depends on nothing of ours). Names start with tu_.
 */
#ifndef VQCOW_TESTS_TESTUTIL_H
#define VQCOW_TESTS_TESTUTIL_H

#include <CUnit/CUnit.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Is @dir on tmpfs (which refuses O_DIRECT)? */
bool tu_on_tmpfs(const char *dir);

/*
 * The directory for test files that need O_DIRECT: $VQCOW_TEST_DIR if set
 * and not empty, else "." unless it is on tmpfs, else /var/tmp.
 */
const char *tu_test_dir(void);

/*
 * A fresh directory "<tu_test_dir()>/<prefix>.XXXXXX" (mkdtemp), its path in
 * @buf (@len bytes). 0 or -errno.
 */
int tu_mkdtemp(char *buf, size_t len, const char *prefix);

/* Run a shell command built like printf: its exit status, -1 if it did not exit. */
int tu_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * `qemu-img check -q @img` accepting what a crash may leave: true when it
 * finds nothing or leaked clusters only (exit 0 or 3). An exit 1 (the check
 * could not run: most often the image's lock, still held by a killed
 * process until the kernel has torn down its io_uring, which keeps the
 * file open a little after the process is reaped) is retried every 100 ms
 * for up to @wait_ms; anything else (2: corruption) fails at once. When it
 * returns false, the full `qemu-img check` report went to stderr.
 */
bool tu_img_check_leaks_ok(const char *img, int wait_ms);

/*
 * Read guest bytes [@off, @off + @len) of image @img (format @fmt) as QEMU
 * sees them: `qemu-img convert -U` to a raw file beside @img
 * ("<img>.tu-read"), then read and removed. 0, or -1 with a message on
 * stderr (conversion failed, or the image is shorter).
 */
int tu_img_read(const char *img, const char *fmt, uint64_t off, void *buf, size_t len);

/* Entries of /proc/self/fd (a baseline to compare with: it counts the
 * directory's own fd too), -1 if it cannot be read. */
int tu_count_fds(void);

/*
 * Does another open file description hold byte @off of @path locked (QEMU's
 * image locks: 100 + perm used, 200 + perm not shared)? Probed from a new
 * read-only one with F_OFD_GETLK; a failed probe fails the test (fatal).
 */
bool tu_lock_held(const char *path, int off);

/* "@dir/@name" in one of four rotating static buffers (valid for four calls). */
char *tu_path(const char *dir, const char *name);

/* Deterministic pseudo-random numbers: a 64-bit xorshift and a 32-bit LCG
 * (>> 8), each advancing the caller's state. */
uint64_t tu_xorshift64(uint64_t *state);
unsigned tu_lcg(unsigned *state);

/*
 * Visible skips for CUnit, which has none per test (and counts a test that
 * returns early as passed, so a test must never skip itself). Register with
 * @skip = NULL to run the test, or with the reason it cannot run here (no
 * root, no loop device...): it is then registered inactive (not run, listed
 * in CUnit's "Inactive" column, not a failure) and tu_report_skips() names
 * it. Decide at registration, from a cheap probe.
 */
CU_pTest tu_add_test(CU_pSuite s, const char *name, CU_TestFunc fn, const char *skip);
/* Print "SKIP: test: reason" for each skipped test (call after the run). Returns how many. */
unsigned tu_report_skips(void);

/*
 * Run the CUnit registry the caller built (verbose), name the skipped tests
 * (tu_report_skips), clean up and return the number of failed assertions
 * plus failed suite set-ups: 0 = all passed.
 */
unsigned tu_cunit_run(void);

#endif /* VQCOW_TESTS_TESTUTIL_H */
