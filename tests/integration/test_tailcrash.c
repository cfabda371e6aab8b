/* SPDX-License-Identifier: MIT */
/*
 * integration.tailcrash — kill -9 under FLUSH-heavy allocating writes: the
 * write-back's tail (qcow2/writeback.c "The tail": the next batch starts
 * beside a batch's last fdatasync, a FLUSH arriving then goes to the next
 * batch) against a power-loss-free crash of the process.
 *
 * A fresh qcow2 (64 KiB clusters) grows under 4 KiB random writes at queue
 * depth 32 on one queue, every 8th request a FLUSH (as `vqcow-fe bench
 * --flush-every 8`), mostly into clusters never written (a window of fresh
 * clusters per round), some into clusters written before (in place). The
 * fdatasyncs of the write-back are made slow in most rounds
 * (VQCOWD_TEST_SYNC_DELAY: 10 ms in half the rounds, 2 ms in a quarter) so
 * that batches' last syncs run long and the next batch, and the FLUSHes
 * arriving, start beside them. The test
 * kills vqcowd with SIGKILL at a random moment, then, after every kill:
 *  - `qemu-img check` finds leaks at most;
 *  - every write acknowledged before a FLUSH was sent that completed (its
 *    completion seen by the guest, before or after the kill) reads back,
 *    or a write to that block issued after it;
 *  - so does every write acknowledged at all: a process death keeps what
 *    the guest saw complete, flush or not (HACKING.md's invariants: a
 *    completion waits until the metadata reaching it is written, not
 *    synced);
 *  - no block reads anything but zeroes or a write issued to it (each
 *    block written holds a pattern naming the write and the block);
 * then a new vqcowd goes on with the same image. No two writes to one block
 * are in flight at once, so the writes to a block are ordered.
 *
 * What a kill -9 cannot show: the page cache survives it, so a FLUSH that
 * returned before its fdatasyncs ended (say, with a tail's sync) loses
 * nothing here; power loss is the unit test's part (unit.test_qcow2_engine,
 * the fake io/'s crash images, "the next batch beside the last fdatasync").
 *
 * vqcowd only (its sync-delay seam; qemu-storage-daemon would pass too).
 */
#include <CUnit/CUnit.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define BS       4096u
#define CS       65536u
#define SIZE     (128ull * MiB)
#define NBLK     (SIZE / BS)
#define QD       32u
#define FLUSH_N  8u /* every 8th request a FLUSH */
#define ROUNDS   14u
#define WINDOW   (SIZE / ROUNDS / CS)    /* fresh clusters per round */
#define STALL_NS (10000ull * 1000000ull) /* no FLUSH completed within: a stall */

struct model {
	uint64_t durable[NBLK]; /* the write a completed FLUSH covers (0: zeroes) */
	uint64_t acked[NBLK];   /* the last write acknowledged */
	uint64_t issued[NBLK];  /* the last write issued to the block */
	bool busy[NBLK];        /* a write to it in flight */
	/* writes acknowledged, in completion order: (block, id) */
	uint64_t *ack_blk, *ack_id;
	size_t nack, capack, applied; /* applied: acks folded into durable */
	uint64_t next_id;
};

static uint64_t rng_state = 0x7a11c2a5ull;

static uint64_t rnd(void)
{
	uint64_t x = rng_state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	return x ^ (x >> 33);
}

/* Write @id's bytes for block @b: its id, the block, then a fill of both. */
static void pattern(uint64_t id, uint64_t b, uint8_t *p)
{
	uint64_t w[BS / 8];

	w[0] = id;
	w[1] = b;
	for (unsigned i = 2; i < BS / 8; i++)
		w[i] = mix(id * 0x9e3779b97f4a7c15ull + b * 131 + i);
	memcpy(p, w, BS);
}

/* The write whose pattern block @b holds, 0 for zeroes, UINT64_MAX for anything else. */
static uint64_t parse(const uint8_t *p, uint64_t b)
{
	static const uint8_t zero[BS];
	uint8_t want[BS];
	uint64_t id;

	if (!memcmp(p, zero, BS))
		return 0;
	memcpy(&id, p, 8);
	pattern(id, b, want);
	return memcmp(p, want, BS) ? UINT64_MAX : id;
}

static void ack_add(struct model *m, uint64_t b, uint64_t id)
{
	if (m->nack == m->capack) {
		m->capack = m->capack ? m->capack * 2 : 65536;
		m->ack_blk = realloc(m->ack_blk, m->capack * sizeof(*m->ack_blk));
		m->ack_id = realloc(m->ack_id, m->capack * sizeof(*m->ack_id));
		CU_ASSERT_FATAL(m->ack_blk && m->ack_id);
	}
	m->ack_blk[m->nack] = b;
	m->ack_id[m->nack++] = id;
}

/* A FLUSH sent when @upto writes were acknowledged completed: they are durable. */
static void flushed(struct model *m, size_t upto)
{
	for (; m->applied < upto; m->applied++) {
		uint64_t b = m->ack_blk[m->applied], id = m->ack_id[m->applied];

		if (id > m->durable[b])
			m->durable[b] = id;
	}
}

struct slot {
	struct vqfe_req r;
	uint64_t blk, id; /* a write; id 0: a FLUSH */
	size_t acks;      /* a FLUSH: writes acknowledged when it was sent */
	bool used;
};

struct counts {
	unsigned writes, flushes, acked, flushed;
};

/* A completion: record it. false if the back-end failed a request while alive. */
static bool complete(struct model *m, struct slot *s, bool alive, struct counts *c)
{
	bool ok = s->r.status == VIRTIO_BLK_S_OK && !s->r.err;

	if (s->id) {
		m->busy[s->blk] = false;
		if (ok) {
			ack_add(m, s->blk, s->id);
			m->acked[s->blk] = s->id;
			c->acked++;
		}
	} else if (ok) {
		flushed(m, s->acks);
		c->flushed++;
	}
	s->used = false;
	if (!ok && alive) {
		fprintf(stderr, "tailcrash: %s failed (status %u, err %d) while vqcowd ran\n",
			s->id ? "a write" : "a FLUSH", s->r.status, s->r.err);
		return false;
	}
	return true;
}

static unsigned reap(struct vqfe *fe, struct model *m, bool alive, struct counts *c)
{
	struct vqfe_req *done[QD];
	unsigned bad = 0;
	int n;

	while ((n = vqfe_reap(fe, 0, done, QD)) > 0)
		for (int i = 0; i < n; i++)
			bad += !complete(m, (struct slot *)done[i]->user, alive, c);
	return bad;
}

/* A block for the next write of round @round: not in flight. */
static uint64_t pick(struct model *m, unsigned round)
{
	for (;;) {
		uint64_t b;

		if (round == 0 || rnd() % 10 < 7) /* the round's fresh clusters */
			b = (round * WINDOW * (CS / BS)) + rnd() % (WINDOW * (CS / BS));
		else /* anywhere written before (in place, mostly) */
			b = rnd() % (round * WINDOW * (CS / BS));
		if (!m->busy[b])
			return b;
	}
}

static void run_round(struct itest_daemon *d, const char *img, struct model *m, unsigned round)
{
	static struct slot slots[QD];
	static uint8_t buf[SIZE];
	struct counts c = {0};
	struct vqfe_opts fo;
	/* the sync delay: 0, 10, 2, 10 ms, ... */
	unsigned delay_ms = round % 2 ? 10 : round % 4 ? 2 : 0, bad = 0, lost = 0, lost_flushed = 0;
	uint64_t t0, kill_at, nreq = 0, ms;
	char delay[16];
	struct vqfe *fe;

	snprintf(delay, sizeof(delay), "%u", delay_ms);
	setenv("VQCOWD_TEST_SYNC_DELAY", delay, 1);
	{
		struct itest_opts o = {.extra = {"--format", "qcow2", "--blk-file", img}};

		int ret = round == 0 ? itest_start(d, &o) : itest_restart(d, &o);

		CU_ASSERT_FATAL(ret == 0);
	}
	unsetenv("VQCOWD_TEST_SYNC_DELAY");
	itest_fe_opts(&fo);
	fe = itest_connect(d, &fo);
	CU_ASSERT_FATAL(fe != NULL);

	memset(slots, 0, sizeof(slots));
	t0 = vqfe_now_ns();
	kill_at = t0 + (150 + rnd() % 450) * 1000000ull;
	/* Kill at kill_at, but not before a FLUSH and a write completed (the
	 * check below): on a loaded machine the round's first fdatasyncs alone
	 * can outlast kill_at. Nothing completed in STALL_NS is a stall. */
	for (uint64_t now = t0; !bad; now = vqfe_now_ns()) {
		unsigned sent = 0;

		if (now >= t0 + STALL_NS || (now >= kill_at && c.flushed && c.acked))
			break;

		for (unsigned i = 0; i < QD; i++) {
			struct slot *s = &slots[i];

			if (s->used)
				continue;
			memset(&s->r, 0, sizeof(s->r));
			s->r.user = s;
			if (++nreq % FLUSH_N == 0) {
				s->r.type = VIRTIO_BLK_T_FLUSH;
				s->id = 0;
				s->acks = m->nack;
				c.flushes++;
			} else {
				static uint8_t data[BS];

				s->blk = pick(m, round);
				s->id = m->next_id++;
				pattern(s->id, s->blk, data);
				s->r.type = VIRTIO_BLK_T_OUT;
				s->r.sector = s->blk * (BS / 512);
				s->r.buf = data; /* copied to guest memory by the submit */
				s->r.len = BS;
				m->busy[s->blk] = true;
				m->issued[s->blk] = s->id;
				c.writes++;
			}
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &s->r), 0);
			s->used = true;
			sent++;
		}
		if (sent)
			vqfe_vq_kick(vqfe_vq(fe, 0), false);
		if (vqfe_vq_wait(fe, 0, 50) == -ECONNRESET)
			break;
		bad += reap(fe, m, true, &c);
	}
	CU_ASSERT_EQUAL(bad, 0);
	ms = (vqfe_now_ns() - t0) / 1000000;
	kill(d->pid, SIGKILL);
	CU_ASSERT_FATAL(itest_wait_killed(d, 10000));
	/* what the dead daemon completed, the guest saw too */
	reap(fe, m, false, &c);
	vqfe_close(fe);

	CU_ASSERT(tu_img_check_leaks_ok(img, 10000)); /* a kill may leak, never more */
	CU_ASSERT_EQUAL_FATAL(tu_img_read(img, "qcow2", 0, buf, SIZE), 0);
	for (uint64_t b = 0; b < NBLK; b++) {
		uint64_t got = parse(buf + b * BS, b);
		const char *what = NULL;

		if (got == UINT64_MAX || got > m->issued[b])
			what = "garbage";
		else if (got < m->durable[b])
			what = "a write older than the last flushed one";
		else if (got < m->acked[b])
			what = "a write older than the last acknowledged one";
		if (what && lost++ < 10)
			fprintf(stderr,
				"tailcrash round %u (sync delay %u ms): block %llu reads %s "
				"(write %llu; flushed %llu, acknowledged %llu, issued %llu)\n",
				round, delay_ms, (unsigned long long)b, what,
				(unsigned long long)(got == UINT64_MAX ? 0 : got),
				(unsigned long long)m->durable[b], (unsigned long long)m->acked[b],
				(unsigned long long)m->issued[b]);
		lost_flushed += what && got < m->durable[b];
		got = got == UINT64_MAX ? 0 : got;
		m->durable[b] = m->acked[b] = m->issued[b] = got; /* what the disk holds now */
	}
	if (lost_flushed)
		CU_FAIL("a write acknowledged before a completed FLUSH is lost after kill -9");
	if (lost)
		CU_FAIL("a write the guest saw complete is lost after kill -9 (or garbage read)");
	/* the record of the round is folded into durable and issued */
	m->nack = m->applied = 0;
	printf("round %u: sync delay %u ms, killed after %llu ms: %u writes (%u acknowledged), "
	       "%u FLUSHes (%u completed)\n",
	       round, delay_ms, (unsigned long long)ms, c.writes, c.acked, c.flushes, c.flushed);
	/* not vacuous: FLUSHes completed among the writes (else a stall: the
	 * round ran STALL_NS without one) */
	if (!c.flushed || !c.acked)
		fprintf(stderr, "tailcrash round %u: no FLUSH or no write completed in %llu ms\n",
			round, (unsigned long long)ms);
	CU_ASSERT(c.flushed > 0 && c.acked > 0);
}

static void t_tail(void)
{
	static struct model m;
	char dir[] = "/tmp/vqcow-tailcrash.XXXXXX", img[PATH_MAX];
	struct itest_daemon d;

	memset(&m, 0, sizeof(m));
	m.next_id = 1;
	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, sizeof(img), "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 -o cluster_size=%u %s %llu", CS,
				    img, (unsigned long long)SIZE),
			      0);
	for (unsigned round = 0; round < ROUNDS; round++)
		run_round(&d, img, &m, round);
	CU_ASSERT(itest_stop(&d) >= 0); /* the harness's temp dir (the daemon is dead) */
	tu_sh("rm -rf %s", dir);
	free(m.ack_blk);
	free(m.ack_id);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("tailcrash", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("vqcowd's sync-delay seam");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "flushed_writes_survive_kill9_beside_the_tail", t_tail, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.tailcrash", add_suites);
}
