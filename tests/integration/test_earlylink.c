/* SPDX-License-Identifier: MIT */
/*
 * integration.earlylink — a write the guest saw complete survives a kill -9
 * when it went in place through an extended-L2 entry that another request
 * linked early (qcow2/mapping.c, early_link) and whose write-back has not
 * happened yet.
 *
 * A write A into unallocated subclusters of an allocated cluster sets their
 * allocation bits at map time; the batch that link starts is held back
 * (VQCOWD_TEST_LINK_DELAY). A write B issued right after A, into the same
 * subclusters, maps them in place, through A's entry. B must not complete
 * before that entry is written (q2_wb_slice_gen). vqcowd kills itself as the
 * first of the two completes (VQCOWD_TEST_CRASH=push-done:2: right after
 * the used ring shows it), and the completed one must then read back (the
 * first sector: A's or B's data, the two overlap), never the zeroes of an
 * unallocated subcluster; `qemu-img check` finds leaks at most. Which of
 * the two completes first varies: each case runs a few rounds. Cases: one
 * thread, and a queue of an I/O thread (its requests hop to the owner).
 */
#include <CUnit/CUnit.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define SC 2048u /* 64 KiB clusters, 32 subclusters */

static bool run_round(unsigned queues, unsigned q, unsigned round)
{
	static uint8_t a[2 * SC], b[512], got[2 * SC];
	/* clusters written whole are linked whole: per subcluster here
	 * (VQCOWD_TEST_SC_LINK), so that A links early (as in fresh clusters
	 * without the fill, where the race is too narrow to show a missing wait
	 * reliably) */
	static const char *const env[] = {"VQCOWD_TEST_LINK_DELAY=1500",
					  "VQCOWD_TEST_CRASH=push-done:2", "VQCOWD_TEST_SC_LINK=1",
					  NULL};
	struct itest_crash c;
	struct vqfe_req req[2];
	uint64_t off = 5 * SC; /* subclusters 5 and 6 of cluster 0 */
	bool bdone;

	itest_crash_start(&c, "earlylink", "cluster_size=65536,extended_l2=on", 16, queues, env);
	struct vqfe *fe = c.fe;

	/* the cluster, allocated by this engine (subcluster 0 written) */
	itest_fill(a, SC, 1);
	CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, q, 0, a, SC), 0);
	itest_fill(a, sizeof(a), 2);
	itest_fill(b, sizeof(b), 3);

	/* A then B, published together, one kick: A maps first (early link),
	 * B after it, in place through A's entry */
	memset(req, 0, sizeof(req));
	req[0].type = req[1].type = VIRTIO_BLK_T_OUT;
	req[0].sector = off / 512;
	req[0].buf = a;
	req[0].len = sizeof(a);
	req[1].sector = off / 512;
	req[1].buf = b;
	req[1].len = sizeof(b);
	vqfe_vq_hold(vqfe_vq(fe, q), true);
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, q, &req[0]), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, q, &req[1]), 0);
	vqfe_vq_hold(vqfe_vq(fe, q), false);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, q), true), 0);

	/* the daemon kills itself as the first of A and B completes */
	bdone = itest_crash_end(&c, q, off, got, sizeof(got)) == &req[1];
	/* the first sector: A's or B's (B overlaps it), the rest A's if A completed */
	if ((memcmp(got, b, sizeof(b)) && memcmp(got, a, sizeof(b))) ||
	    (!bdone && memcmp(got + sizeof(b), a + sizeof(b), sizeof(a) - sizeof(b)))) {
		fprintf(stderr,
			"round %u: write %s, seen complete, is lost after the kill (reads "
			"0x%02x...)\n",
			round, bdone ? "B (in place)" : "A (early link)", got[0]);
		CU_FAIL("a completed write does not read back");
	}
	return bdone;
}

static void run_case(unsigned queues, unsigned q)
{
	unsigned b = 0;

	for (unsigned round = 0; round < 6; round++)
		b += run_round(queues, q, round);
	fprintf(stderr, "%u of 6 rounds: B completed first\n", b);
}

static void t_one_thread(void)
{
	run_case(1, 0);
}

static void t_io_thread(void)
{
	run_case(2, 1);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("earlylink", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("vqcowd's link-delay seam");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "in_place_through_early_link", t_one_thread, skip);
	tu_add_test(s, "in_place_through_early_link_io_thread", t_io_thread, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.earlylink", add_suites);
}
