/* SPDX-License-Identifier: MIT */
/*
 * integration.fastpub — the fast table never keeps a mapping that an
 * overlapping discard removed (img/img_qcow2.c: a write's new clusters are
 * published when it completes, complete_now).
 *
 * 4 KiB clusters, one L2 table per 2 MiB; the first cluster of table k is
 * allocated beforehand, the last cluster of table k - 1 is not, and the
 * daemon runs with --no-l2-prefetch (table k is not cached). W, 8 KiB on
 * queue 1 (an I/O thread: it hops to the owner), allocates the last cluster
 * of table k - 1 (its first part), then waits for table k to be read to
 * write its second part in place. D, a discard of that new cluster on queue
 * 0 (the owner), is sent a little after W, so that it removes W's fresh
 * mapping and completes while W's second part is still on its way. When W
 * completes it must not publish the cluster it allocated for the threads:
 * D freed it. Then a 4 KiB write to the cluster on queue 1, and a read of
 * it on queue 0 (the owner's path, the L2 entry): the write must read back.
 * Through a stale table entry the thread would write it in place into the
 * freed host cluster (or one already reused by another guest cluster), and
 * the owner would read zeroes.
 */
#include <CUnit/CUnit.h>
#include <endian.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define CS     4096u
#define TABLE  (512ull * CS) /* guest bytes one L2 table maps */
#define TABLES 64u

static void wait_req(struct vqfe *fe, unsigned q, struct vqfe_req *r)
{
	struct vqfe_req *done[8];

	while (r->inflight) {
		int n = vqfe_reap(fe, q, done, 8);

		CU_ASSERT_FATAL(n >= 0);
		if (n == 0 && r->inflight)
			CU_ASSERT_FATAL(vqfe_vq_wait(fe, q, 10000) == 0);
	}
	CU_ASSERT_EQUAL(r->status, 0);
}

static void spin_us(unsigned us)
{
	uint64_t end = vqfe_now_ns() + us * 1000ull;

	while (vqfe_now_ns() < end)
		;
}

static void t_discard_beside_allocating_write(void)
{
	static uint8_t w[2 * CS], p[CS], got[CS];
	char dir[] = "/tmp/vqcow-fastpub.XXXXXX", img[PATH_MAX], cmd[16384];
	struct itest_opts o = {.num_queues = 2};
	struct itest_daemon d;
	struct vqfe_opts fo;
	struct vqfe *fe;
	size_t n = 0;
	unsigned bad = 0;

	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, sizeof(img), "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o cluster_size=%u %s %lluM", CS,
				    img, (unsigned long long)(TABLES * TABLE / MiB)),
			      0);
	n += (size_t)snprintf(cmd + n, sizeof(cmd) - n, "qemu-io -f qcow2");
	for (unsigned k = 1; k < TABLES; k++)
		n += (size_t)snprintf(cmd + n, sizeof(cmd) - n, " -c 'write -P 0x22 %llu %u'",
				      (unsigned long long)(k * TABLE), CS);
	snprintf(cmd + n, sizeof(cmd) - n, " %s >/dev/null", img);
	CU_ASSERT_EQUAL_FATAL(tu_sh("%s", cmd), 0);
	o.extra[0] = "--format";
	o.extra[1] = "qcow2";
	o.extra[2] = "--blk-file";
	o.extra[3] = img;
	o.extra[4] = "--io-threads";
	o.extra[5] = "2";
	o.extra[6] = "--no-l2-prefetch";
	if (itest_start(&d, &o) < 0)
		CU_FAIL_FATAL("back-end did not start");
	itest_fe_opts(&fo);
	fo.num_queues = 2;
	fe = itest_connect(&d, &fo);
	if (!fe) {
		itest_stop(&d);
		CU_FAIL_FATAL("cannot connect");
	}
	/* queue 1's thread claims its slot (the owner publishes from now on) */
	CU_ASSERT_EQUAL_FATAL(vqfe_read(fe, 1, 0, got, CS), 0);

	for (unsigned k = 1; k < TABLES; k++) {
		uint64_t c = k * TABLE - CS; /* the last cluster of table k - 1 */
		struct virtio_blk_discard_write_zeroes seg = {htole64(c / 512), htole32(CS / 512),
							      0};
		struct vqfe_req wr = {0}, dr = {0};

		itest_fill(w, sizeof(w), 100 + k);
		itest_fill(p, sizeof(p), 1000 + k);
		wr.type = VIRTIO_BLK_T_OUT;
		wr.sector = c / 512;
		wr.buf = w;
		wr.len = sizeof(w);
		dr.type = VIRTIO_BLK_T_DISCARD;
		dr.buf = &seg;
		dr.len = sizeof(seg);
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 1, &wr), 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), true), 0);
		spin_us(20 * (k % 16));
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &dr), 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 0), true), 0);
		wait_req(fe, 1, &wr);
		wait_req(fe, 0, &dr);
		/* a write on the thread, read back through the owner */
		CU_ASSERT_EQUAL(vqfe_write(fe, 1, c, p, CS), 0);
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, c, got, CS), 0);
		if (memcmp(got, p, CS)) {
			if (!bad++)
				fprintf(stderr,
					"table %u: a write on queue 1 after W and D does not read "
					"back on queue 0 (0x%02x... for 0x%02x...)\n",
					k, got[0], p[0]);
		}
	}
	fprintf(stderr, "%u of %u rounds lost the write\n", bad, TABLES - 1);
	CU_ASSERT_EQUAL(bad, 0);
	vqfe_close(fe);
	STOP(d);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	tu_sh("rm -rf %s", dir);
}

/*
 * ticket_retry: a thread that counts a fast ticket in just as the owner
 * starts a grace period (fast_flip moves the generation after the thread
 * read it, then reads the thread's count) sees the generation moved and
 * takes its ticket again; the owner may have counted the first increment and
 * waits for the end of an old-generation ticket to wake it. Every 4th ticket
 * of the I/O thread sleeps 300 us in that window (VQCOWD_TEST_TICKET_HOLD)
 * while queue 1 reads allocated clusters at QD1 (the fast path; no other
 * ticket of the thread in flight) and queue 0 writes, discards and flushes
 * (a grace period each). The daemon must still exit on SIGTERM (its
 * write-back waits for the last grace period), and qemu-img check finds the
 * image clean.
 */
struct tr_reader {
	struct vqfe *fe;
	bool stop; /* atomic */
	unsigned reads, errors;
};

static void *tr_reader_main(void *arg)
{
	struct tr_reader *t = arg;
	static uint8_t rd[4096];

	while (!__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE)) {
		uint64_t off = (uint64_t)(t->reads * 37 % 256) * 4096;

		if (vqfe_read(t->fe, 1, off, rd, sizeof(rd)) != 0)
			t->errors++;
		t->reads++;
	}
	return NULL;
}

static void t_ticket_retry(void)
{
	static uint8_t buf[65536];
	char dir[] = "/tmp/vqcow-fastpub.XXXXXX", img[PATH_MAX];
	struct itest_opts o = {.num_queues = 2};
	struct tr_reader tr = {0};
	struct itest_daemon d;
	struct vqfe_opts fo;
	struct vqfe *fe;
	pthread_t tid;
	int rc;

	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, sizeof(img), "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 32M", img), 0);
	o.extra[0] = "--format";
	o.extra[1] = "qcow2";
	o.extra[2] = "--blk-file";
	o.extra[3] = img;
	o.extra[4] = "--io-threads";
	o.extra[5] = "2";
	CU_ASSERT_EQUAL_FATAL(setenv("VQCOWD_TEST_TICKET_HOLD", "300", 1), 0);
	rc = itest_start(&d, &o);
	unsetenv("VQCOWD_TEST_TICKET_HOLD");
	if (rc < 0)
		CU_FAIL_FATAL("back-end did not start");
	itest_fe_opts(&fo);
	fo.num_queues = 2;
	fe = itest_connect(&d, &fo);
	if (!fe) {
		itest_stop(&d);
		CU_FAIL_FATAL("cannot connect");
	}
	itest_fill(buf, sizeof(buf), 7);
	/* queue 1's thread claims its slot, then 1 MiB it reads fast */
	CU_ASSERT_EQUAL_FATAL(vqfe_read(fe, 1, 0, buf, 4096), 0);
	for (uint64_t off = 0; off < MiB; off += sizeof(buf))
		CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, 0, off, buf, sizeof(buf)), 0);
	tr.fe = fe;
	vqfe_set_threaded(fe, true);
	CU_ASSERT_EQUAL_FATAL(pthread_create(&tid, NULL, tr_reader_main, &tr), 0);
	for (unsigned i = 0; i < 300; i++) {
		uint64_t c = 8 * MiB + (i % 16) * sizeof(buf);

		if (vqfe_write(fe, 0, c, buf, sizeof(buf)) ||
		    vqfe_discard_wz(fe, 0, VIRTIO_BLK_T_DISCARD, c, sizeof(buf), 0) ||
		    vqfe_flush(fe, 0)) {
			CU_FAIL("a request on queue 0 failed");
			break;
		}
	}
	__atomic_store_n(&tr.stop, true, __ATOMIC_RELEASE);
	pthread_join(tid, NULL);
	vqfe_set_threaded(fe, false);
	fprintf(stderr, "ticket_retry: %u reads on queue 1\n", tr.reads);
	CU_ASSERT_EQUAL(tr.errors, 0);
	vqfe_close(fe);
	rc = itest_signal_wait(&d, SIGTERM, 20000);
	if (rc != 0) {
		itest_dump_log(&d);
		fprintf(stderr,
			"ticket_retry: exit status %d after SIGTERM (-1: still running after 20 s, "
			"a grace period that never ends)\n",
			rc);
	}
	CU_ASSERT_EQUAL(rc, 0);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	itest_stop(&d);
	tu_sh("rm -rf %s", dir);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("fastpub", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("vqcowd's --io-threads fast path");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1 && "
			   "qemu-io --version >/dev/null 2>&1") != 0)
		skip = "qemu-img or qemu-io not installed";
	tu_add_test(s, "discard_beside_allocating_write", t_discard_beside_allocating_write, skip);
	tu_add_test(s, "ticket_retry", t_ticket_retry, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.fastpub", add_suites);
}
