/* SPDX-License-Identifier: MIT */
/*
 * Reconnect after a back-end death at the worst instants of inflight
 * tracking (vhost-user.rst "Inflight I/O tracking"), with our own front-end:
 * a real vqcowd is killed (SIGKILL) at an exact point, a new vqcowd is
 * started on the same socket and image, and the front-end reconnects with
 * the SAME inflight region (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every
 * connection) and its rings restarted at the used index, as QEMU does.
 *
 * The instant comes from vqcowd's test seam, VQCOWD_TEST_CRASH=POINT:N: the
 * daemon kills itself the N-th time it passes POINT (vhost/vring.c), which a
 * signal from outside could not hit. Points:
 *   pop-fetched  head taken from the avail ring, not yet marked in flight;
 *   pop-marked   marked in flight, not yet handed to the device model;
 *   push-linked  on the batch list, used element not yet written;
 *   push-used    used->idx published, in-flight flag not yet cleared (the
 *                region's used_idx is one behind the used ring);
 *   push-done    everything of one completion done.
 * Each case first writes and completes two requests, then publishes a batch
 * of BATCH writes (fresh qcow2 clusters, distinct patterns) with one kick,
 * and the daemon dies in the middle of that batch.
 *
 * Asserted, from the front-end's side:
 *  - the region the dead daemon left, brought up to date as the spec says
 *    (a batch left one behind cleared), names in flight exactly the requests
 *    fetched (avail positions below used + in-flight count) and not in the
 *    used ring, in the order they were published (fetch counters);
 *  - after the reconnect every request not in the used ring completes exactly
 *    once (a second completion of a head is a used id not in flight, caught
 *    by vqfe_reap) with status OK, none is lost (vqfe_drain times out), and
 *    no extra used element appears; the new daemon resubmits the in-flight
 *    ones in fetch order (its debug log lists them);
 *  - every write completed, before or after the kill, reads back, and
 *    qemu-img check finds no corruption (the clusters reserved ahead of need
 *    may leak: exit 0 or 3).
 */
#include <CUnit/CUnit.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define BATCH 8u
#define PRE   2u /* requests completed before the batch */
#define BLK   4096u
#define QSIZE 64u

/* The split-ring region of one queue (vhost-user.rst "Inflight I/O tracking"). */
struct desc_state {
	uint8_t inflight;
	uint8_t padding[5];
	uint16_t next;
	uint64_t counter;
};
struct queue_region {
	uint64_t features;
	uint16_t version;
	uint16_t desc_num;
	uint16_t last_batch_head;
	uint16_t used_idx;
	struct desc_state desc[];
};

struct kcase {
	const char *point;
	unsigned hit; /* within the batch: the n-th pop or push of it (1-based) */
	bool push;    /* a push point (hit counts completions) */
};

/* Offset of request i (PRE writes first, then the batch), one per cluster. */
static uint64_t off_of(unsigned i)
{
	return (uint64_t)i * 65536 + 4096 * (i % 3);
}

/* The heads the resubmission lines of the new daemon's log list, in order. */
static unsigned logged_resubmits(const char *log, uint16_t *heads, unsigned max)
{
	char line[1024];
	unsigned n = 0;
	FILE *f = fopen(log, "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "vring 0: resubmit head ");
		unsigned h;

		if (p && sscanf(p, "vring 0: resubmit head %u", &h) == 1 && n < max)
			heads[n++] = (uint16_t)h;
	}
	fclose(f);
	return n;
}

static void run_case(const struct kcase *kc)
{
	char env[64], img[PATH_MAX + 32];
	static uint8_t buf[PRE + BATCH][BLK], got[BLK];
	struct vqfe_req req[BATCH], *done[BATCH];
	uint16_t want[BATCH], logged[BATCH + 1];
	unsigned nwant = 0, ndone = 0, inflight = 0, fetched, hit;
	struct queue_region *qr;
	struct vqfe_opts fo;
	struct vring_used *used;
	uint16_t uidx, ruidx;
	bool completed[BATCH] = {false};
	int n;

	/* every pop and push of the PRE writes passes the point too */
	hit = PRE + kc->hit;
	snprintf(env, sizeof(env), "%s:%u", kc->point, hit);
	{
		char dir[] = "/tmp/vqcow-inflight.XXXXXX";

		CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
		snprintf(img, sizeof(img), "%s/disk.qcow2", dir);
	}
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 64M", img), 0);
	setenv("VQCOWD_TEST_CRASH", env, 1);
	START(d, .extra = {"--format", "qcow2", "--blk-file", img, "--log-level", "debug"});
	unsetenv("VQCOWD_TEST_CRASH");
	itest_fe_opts(&fo);
	fo.inflight = true;
	fo.queue_size = QSIZE;
	CONNECT(fe, d, &fo);
	CU_ASSERT_FATAL(vqfe_inflight_region(fe, NULL) != NULL);
	used = vqfe_vq_used(vqfe_vq(fe, 0));

	for (unsigned i = 0; i < PRE + BATCH; i++)
		itest_fill(buf[i], BLK, 100 + i);
	for (unsigned i = 0; i < PRE; i++)
		CU_ASSERT_EQUAL_FATAL(vqfe_write(fe, 0, off_of(i), buf[i], BLK), 0);

	/* the batch: published together (one avail->idx store: a polling
	 * daemon must not see half of it), one kick */
	memset(req, 0, sizeof(req));
	vqfe_vq_hold(vqfe_vq(fe, 0), true);
	for (unsigned i = 0; i < BATCH; i++) {
		req[i].type = VIRTIO_BLK_T_OUT;
		req[i].sector = off_of(PRE + i) / 512;
		req[i].buf = buf[PRE + i];
		req[i].len = BLK;
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &req[i]), 0);
	}
	vqfe_vq_hold(vqfe_vq(fe, 0), false);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 0), true), 0);

	if (!itest_wait_killed(&d, 10000)) {
		fprintf(stderr, "%s: the daemon did not die by the seam\n", env);
		CU_FAIL_FATAL("no kill at the crash point");
	}

	/* ---- the region the dead daemon left ---- */
	uidx = le16toh(__atomic_load_n(&used->idx, __ATOMIC_ACQUIRE));
	qr = vqfe_inflight_region(fe, NULL);
	CU_ASSERT_EQUAL(qr->version, 1);
	CU_ASSERT_EQUAL(qr->desc_num, QSIZE);
	ruidx = qr->used_idx;
	/* push-used: the region one behind, the case it is about */
	CU_ASSERT_EQUAL((uint16_t)(uidx - ruidx), !strcmp(kc->point, "push-used") ? 1 : 0);
	/* complete the spec's reconnect step on a copy: clear the batch left
	 * behind, then collect what is in flight by counter */
	{
		uint8_t flag[QSIZE];
		uint16_t h = qr->last_batch_head, order[QSIZE];
		unsigned nin = 0;

		for (unsigned i = 0; i < QSIZE; i++)
			flag[i] = qr->desc[i].inflight;
		for (uint16_t k = 0; k < (uint16_t)(uidx - ruidx) && h < QSIZE; k++) {
			flag[h] = 0;
			h = qr->desc[h].next;
		}
		for (unsigned i = 0; i < QSIZE; i++)
			if (flag[i])
				order[nin++] = (uint16_t)i;
		for (unsigned a = 1; a < nin; a++)
			for (unsigned b = a;
			     b > 0 && qr->desc[order[b - 1]].counter > qr->desc[order[b]].counter;
			     b--) {
				uint16_t t = order[b];

				order[b] = order[b - 1];
				order[b - 1] = t;
			}
		/* requests fetched: the used ones and those in flight */
		fetched = (uint16_t)(uidx - PRE) + nin;
		CU_ASSERT(fetched <= BATCH);
		/* completions so far: reap them (each once: vqfe checks) */
		n = vqfe_reap(fe, 0, done, BATCH);
		CU_ASSERT_EQUAL(n, (int)(uint16_t)(uidx - PRE));
		for (int i = 0; i < n; i++) {
			CU_ASSERT_EQUAL(done[i]->status, VIRTIO_BLK_S_OK);
			completed[done[i] - req] = true;
			ndone++;
		}
		/* in flight = the fetched requests not completed, publish order */
		for (unsigned i = 0; i < BATCH && i < fetched; i++)
			if (!completed[i])
				want[nwant++] = req[i].head;
		CU_ASSERT_EQUAL(nin, nwant);
		for (unsigned i = 0; i < nin && i < nwant; i++)
			if (order[i] != want[i]) {
				fprintf(stderr, "%s: in-flight #%u is head %u, want %u\n", env, i,
					order[i], want[i]);
				CU_FAIL("inflight region order");
			}
		inflight = nin;
	}
	/* each point leaves what it is named for */
	if (!strcmp(kc->point, "pop-fetched")) {
		CU_ASSERT_EQUAL(fetched, kc->hit - 1); /* the kc->hit-th is unmarked */
		CU_ASSERT_EQUAL(ndone, 0);
	} else if (!strcmp(kc->point, "pop-marked")) {
		CU_ASSERT_EQUAL(fetched, kc->hit);
		CU_ASSERT_EQUAL(ndone, 0);
	} else {
		CU_ASSERT_EQUAL(fetched, BATCH);
		CU_ASSERT_EQUAL(ndone, !strcmp(kc->point, "push-linked") ? kc->hit - 1 : kc->hit);
	}
	fprintf(stderr, "%s: %u completed, %u in flight, %u not fetched\n", env, ndone, inflight,
		BATCH - fetched);

	/* ---- a new daemon, the same region ---- */
	{
		struct itest_opts o = {
		    .extra = {"--format", "qcow2", "--blk-file", img, "--log-level", "debug"}};

		CU_ASSERT_EQUAL_FATAL(itest_restart(&d, &o), 0);
	}
	n = vqfe_reconnect(fe, d.sock);
	if (n < 0) {
		fprintf(stderr, "reconnect: %s\n", vqfe_strerror(fe));
		itest_dump_log(&d);
		CU_FAIL_FATAL("reconnect");
	}
	/* no kick: the new daemon serves what waits as its ring starts */
	for (int tries = 0; tries < 2000 && ndone < BATCH; tries++) {
		n = vqfe_reap(fe, 0, done, BATCH);
		if (n < 0) {
			fprintf(stderr, "%s: %s\n", env, vqfe_strerror(fe));
			CU_FAIL("a request completed twice or a bad used element");
			break;
		}
		for (int i = 0; i < n; i++) {
			CU_ASSERT_EQUAL(done[i]->status, VIRTIO_BLK_S_OK);
			completed[done[i] - req] = true;
			ndone++;
		}
		if (ndone < BATCH)
			usleep(5000);
	}
	CU_ASSERT_EQUAL(ndone, BATCH);
	usleep(100000); /* nothing more may come */
	CU_ASSERT_EQUAL(le16toh(used->idx), (uint16_t)(PRE + BATCH));
	CU_ASSERT_EQUAL(vqfe_vq_inflight(vqfe_vq(fe, 0)), 0);
	n = (int)logged_resubmits(d.log, logged, BATCH + 1);
	CU_ASSERT_EQUAL(n, (int)inflight);
	for (int i = 0; i < n && i < (int)nwant; i++)
		CU_ASSERT_EQUAL(logged[i], want[i]);

	/* every completed write reads back, through the new daemon */
	for (unsigned i = 0; i < PRE + BATCH; i++) {
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, off_of(i), got, BLK), 0);
		if (memcmp(got, buf[i], BLK) != 0) {
			fprintf(stderr, "%s: write %u does not read back\n", env, i);
			CU_FAIL("data");
		}
	}
	vqfe_close(fe);
	STOP(d);
	/* a kill may leak the clusters reserved ahead (exit 3), never more */
	CU_ASSERT(tu_img_check_leaks_ok(img, 0));
	tu_sh("rm -rf \"$(dirname %s)\"", img);
}

static void t_pop_fetched_first(void)
{
	run_case(&(struct kcase){"pop-fetched", 1, false});
}

static void t_pop_fetched_mid_batch(void)
{
	run_case(&(struct kcase){"pop-fetched", 5, false});
}

static void t_pop_marked_mid_batch(void)
{
	run_case(&(struct kcase){"pop-marked", 4, false});
}

static void t_push_linked_mid_batch(void)
{
	run_case(&(struct kcase){"push-linked", 3, true});
}

static void t_push_used_first(void)
{
	run_case(&(struct kcase){"push-used", 1, true});
}

static void t_push_used_mid_batch(void)
{
	run_case(&(struct kcase){"push-used", 5, true});
}

static void t_push_done_mid_batch(void)
{
	run_case(&(struct kcase){"push-done", 6, true});
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("inflight", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("vqcowd's crash-point seam");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "pop_fetched_first", t_pop_fetched_first, skip);
	tu_add_test(s, "pop_fetched_mid_batch", t_pop_fetched_mid_batch, skip);
	tu_add_test(s, "pop_marked_mid_batch", t_pop_marked_mid_batch, skip);
	tu_add_test(s, "push_linked_mid_batch", t_push_linked_mid_batch, skip);
	tu_add_test(s, "push_used_first", t_push_used_first, skip);
	tu_add_test(s, "push_used_mid_batch", t_push_used_mid_batch, skip);
	tu_add_test(s, "push_done_mid_batch", t_push_done_mid_batch, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.inflight", add_suites);
}
