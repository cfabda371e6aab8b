/* SPDX-License-Identifier: MIT */
/*
 * integration.sidebatch — a write the guest saw complete survives a kill -9
 * when part of it was linked by a side batch (qcow2/writeback.c,
 * side_start: a link batch started beside the batch in flight) and part of
 * it went in place through an entry that the batch in flight is writing.
 *
 * Extended L2, 64 KiB clusters: guest clusters 255 and 256 (their entries
 * in two L2 slices, X and Y) are allocated first. The batches' L2 writes
 * are held back (VQCOWD_TEST_WB_HOLD; side batches are not held). A writes
 * subclusters 30-31 of cluster 255 (an early link in X: the batch M that
 * takes X is held). Then R writes the last 4 KiB of cluster 255 (in place
 * through A's entry, which M has not written) and the first 4 KiB of
 * cluster 256 (an early link in Y: a side batch S writes Y at once, beside
 * M). R must not complete before M wrote X: a side batch's waiters also
 * wait for the batch beside it. vqcowd kills itself as the first of A and R
 * completes (VQCOWD_TEST_CRASH=push-done:3); both of R's parts must then
 * read back, and Y's entry must be on disk (the side batch ran while M was
 * held: the test is not vacuous); `qemu-img check` finds leaks at most.
 */
#include <CUnit/CUnit.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define CS 65536u
#define SC 2048u
/* qcow2/writeback.c's line as a batch is held (VQCOWD_TEST_WB_HOLD) */
#define HELD "a write-back batch holds its L2 writes"

static void run_round(unsigned queues, unsigned q, unsigned round)
{
	static uint8_t p[SC], a[2 * SC], r[4 * SC], got[4 * SC];
	/* per-subcluster links for clusters written whole (VQCOWD_TEST_SC_LINK):
	 * A and R link early */
	static const char *const env[] = {"VQCOWD_TEST_WB_HOLD=1500",
					  "VQCOWD_TEST_CRASH=push-done:3", "VQCOWD_TEST_SC_LINK=1",
					  NULL};
	struct itest_crash c;
	struct vqfe_req req[2];
	uint64_t c1 = 256ull * CS, roff = c1 - 2 * SC;
	unsigned held;
	bool rdone;

	itest_crash_start(&c, "sidebatch", "cluster_size=65536,extended_l2=on", 32, queues, env);
	struct vqfe *fe = c.fe;

	/* clusters 255 and 256, allocated by this engine (subcluster 0 and 10) */
	itest_fill(p, sizeof(p), 1);
	CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, q, c1 - CS, p, SC), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, q, c1 + 10 * SC, p, SC), 0);
	itest_fill(a, sizeof(a), 2);
	itest_fill(r, sizeof(r), 3);

	/* A: an early link in X; its batch is held */
	memset(req, 0, sizeof(req));
	req[0].type = req[1].type = VIRTIO_BLK_T_OUT;
	req[0].sector = roff / 512;
	req[0].buf = a;
	req[0].len = sizeof(a);
	held = itest_log_count(&c.d, HELD);
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, q, &req[0]), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, q), true), 0);
	/* M started and held: its line in the log (a loaded machine may take a while) */
	if (!itest_wait_log(&c.d, HELD, held, 10000)) {
		itest_dump_log(&c.d);
		CU_FAIL_FATAL("no write-back batch held after A");
	}
	/* R: in place through A's entry, then an early link in Y */
	req[1].sector = roff / 512;
	req[1].buf = r;
	req[1].len = sizeof(r);
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, q, &req[1]), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, q), true), 0);

	/* the daemon kills itself as the first of A and R completes */
	rdone = itest_crash_end(&c, q, roff, got, sizeof(got)) == &req[1];
	if (memcmp(got, r, 2 * SC)) {
		fprintf(stderr,
			"round %u: %s completed, and R's part in place through A's entry is "
			"lost after the kill (reads 0x%02x...)\n",
			round, rdone ? "R" : "A", got[0]);
		CU_FAIL("a completed write does not read back");
	}
	if (memcmp(got + 2 * SC, r + 2 * SC, 2 * SC)) {
		fprintf(stderr, "round %u: R's early-linked part reads 0x%02x...: no side batch?\n",
			round, got[2 * SC]);
		CU_FAIL("the side batch did not write its slice while the other batch was held");
	}
}

static void t_one_thread(void)
{
	for (unsigned round = 0; round < 3; round++)
		run_round(1, 0, round);
}

static void t_io_thread(void)
{
	for (unsigned round = 0; round < 2; round++)
		run_round(2, 1, round);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("sidebatch", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("vqcowd's write-back hold seam");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "in_place_beside_side_batch", t_one_thread, skip);
	tu_add_test(s, "in_place_beside_side_batch_io_thread", t_io_thread, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.sidebatch", add_suites);
}
