/* SPDX-License-Identifier: MIT */
/*
 * vqfe-stress — many queues writing interleaved 4 KiB blocks of the same
 * clusters at once, with verify: the concurrency test of vqcowd's I/O
 * threads (--io-threads), written to catch a multi-queue back-end that
 * allocates or copies-on-write one cluster twice, loses a neighbour's write,
 * or corrupts what a backing file shows through.
 *
 *   vqfe-stress SOCK --size N [--queues Q] [--rounds R] [--seed S]
 *               [--depth D] [--vary-depth] [--mix] [--churn CLUSTER]
 *               [--read-untouched]
 *               [--map FILE] [--forever]
 *               [--until FILE]
 *
 * --vary-depth: the odd rounds' writes keep only 1 request in flight per
 * queue, the even rounds' writes and every read-back D: a load that falls
 * and rises round by round (vqcowd --io-threads-consolidate moves the
 * queues between threads with it).
 *
 * Block b (4 KiB) belongs to queue b % Q, so the 16 blocks of a 64 KiB
 * cluster are written by every queue at the same time; every queue keeps D
 * requests in flight, all queues in step. One block in eight (by a hash of
 * its index) is never touched: it must keep the content it had at the start
 * (the backing file's, for an overlay). Each round writes every other block
 * with a pattern naming (seed, round, block); with --mix, some blocks get
 * WRITE_ZEROES instead (then read as zeroes) and some DISCARD (content
 * unknown until written again). After each round a FLUSH (on a queue
 * chosen by round), and every other round (and at the end) every block is
 * read back, spread over all queues, and compared with what it must hold.
 *
 * --churn CLUSTER (bytes, a multiple of 4 KiB): each round, one cluster in
 * four (by a hash of round and cluster) is DISCARDed whole, by the queue of
 * its first block, while the other queues write its other blocks: the
 * back-end frees the cluster with writes to it in flight, and the next
 * allocations reuse it (a FLUSH follows each such discard, so that the
 * back-end may free it at once; and the clusters discarded in the round
 * before are discarded again before the round, with nothing in flight, so
 * that the round allocates them anew). Those blocks are unknown until written again; a
 * freed cluster reused while a write to it was still in flight shows up as
 * a wrong block elsewhere.
 *
 * --read-untouched: the write rounds also read the untouched blocks (each
 * by its queue, beside the writes to the rest of its cluster) and check
 * them: a compressed cluster is then read, inflated and kept by the queues'
 * threads while other blocks of it are written (copied-on-write elsewhere)
 * or the cluster discarded whole, and must never read back anything but the
 * original content.
 *
 * --map FILE: one line per block at the end: "U" untouched, "Z" zeroes,
 * "D" discarded (unknown), "W <round>" written in that round (the pattern
 * is below, pattern()), so a script can compare the image file itself
 * (after qemu-img convert) block by block. --forever: keep writing until
 * the connection breaks or a signal (the crash test kills the daemon under
 * it); then exit 0 if the failure is a lost connection. --until FILE: keep
 * going, round after round, until FILE exists (a test's QMP operations
 * ran meanwhile), then end as after the last round: every block read back
 * and verified, the map written.
 *
 * Exit: 0 all good, 1 a mismatch or an error, 2 usage.
 */
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vqfe.h"

#define BS     4096u
#define MAXQ   16
#define MAXDEP 64

enum { ST_UNKNOWN = 0, ST_UNTOUCHED, ST_ZERO, ST_WRITTEN, ST_DISCARDED };

struct blk {
	uint8_t st;
	uint32_t round; /* ST_WRITTEN: the round whose pattern it holds */
};

static uint64_t mix64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/* The 4 KiB of block @b written in round @r: 512 little-endian u64 words. */
static void pattern(uint8_t *buf, uint64_t seed, uint32_t r, uint64_t b)
{
	for (unsigned i = 0; i < BS / 8; i++) {
		uint64_t w = htole64((seed << 48) ^ ((uint64_t)r << 32) ^ (b << 9) ^ i);

		memcpy(buf + i * 8, &w, 8);
	}
}

static bool untouched(uint64_t seed, uint64_t b)
{
	return mix64(seed * 0x9e3779b97f4a7c15ull + b) % 8 == 0;
}

struct job {
	unsigned q;
	uint64_t next; /* next block index of this queue's list */
	struct vqfe_req req[MAXDEP];
	uint8_t *buf[MAXDEP];
	struct virtio_blk_discard_write_zeroes seg[MAXDEP];
	unsigned inflight;
	bool flush_due; /* --churn: a FLUSH right after a discard */
};

struct ctx {
	struct vqfe *fe;
	unsigned nq, depth;
	uint64_t nblk, seed;
	bool mix;
	uint64_t cpb; /* --churn: blocks per cluster (0: off) */
	bool rdu;     /* --read-untouched */
	struct blk *map;
	uint8_t *orig; /* content of untouched blocks at the start */
	struct job job[MAXQ];
	uint64_t errors;
};

static int fail(struct ctx *c, const char *what)
{
	fprintf(stderr, "vqfe-stress: %s: %s\n", what, vqfe_strerror(c->fe));
	return -1;
}

/* Submit @r (a slot of @j's) on queue @q, counted in flight there and in
 * @inflight. */
static int submit(struct ctx *c, struct job *j, unsigned q, struct vqfe_req *r, unsigned *inflight)
{
	r->user = j;
	if (vqfe_submit(c->fe, q, r) < 0)
		return fail(c, "submit");
	c->job[q].inflight++;
	(*inflight)++;
	return 0;
}

/* @r: a read of block @b into @buf. */
static void read_req(struct vqfe_req *r, uint8_t *buf, uint64_t b)
{
	r->type = VIRTIO_BLK_T_IN;
	r->buf = buf;
	r->len = BS;
	r->sector = b * (BS / 512);
}

/* Reap everything done on every queue; call @fn for each. */
typedef int done_fn(struct ctx *c, struct job *j, struct vqfe_req *r);

static int reap_all(struct ctx *c, done_fn *fn, unsigned *inflight)
{
	struct vqfe_req *done[MAXDEP];
	unsigned got = 0;

	for (unsigned q = 0; q < c->nq; q++) {
		int n = vqfe_reap(c->fe, q, done, MAXDEP);

		if (n < 0)
			return fail(c, "reap");
		for (int i = 0; i < n; i++) {
			c->job[q].inflight--;
			(*inflight)--;
			if (done[i]->status != VIRTIO_BLK_S_OK || done[i]->err) {
				fprintf(stderr,
					"vqfe-stress: queue %u: request type %u at sector %" PRIu64
					": status %u\n",
					q, done[i]->type, done[i]->sector, done[i]->status);
				c->errors++;
			}
			if (fn && fn(c, &c->job[q], done[i]) < 0)
				return -1;
		}
		got += (unsigned)n;
	}
	if (!got && *inflight && vqfe_wait_any(c->fe, vqfe_get_opts(c->fe)->timeout_ms) < 0)
		return fail(c, "wait");
	return 0;
}

/* Next block of queue @j's list that this pass touches (writes: not untouched). */
static bool next_block(struct ctx *c, struct job *j, bool all, uint64_t *b)
{
	for (;;) {
		uint64_t x = j->next * c->nq + j->q;

		if (x >= c->nblk)
			return false;
		j->next++;
		if (all || c->map[x].st != ST_UNTOUCHED) {
			*b = x;
			return true;
		}
	}
}

/* --churn: is the cluster of block @b discarded whole in @round? */
static bool churned(const struct ctx *c, uint32_t round, uint64_t b)
{
	return c->cpb &&
	       mix64((c->seed << 24) ^ ((uint64_t)round << 44) ^ (b / c->cpb) ^ 0x5bd1e995u) % 4 ==
		   0;
}

static int check_block(struct ctx *c, uint64_t b, const uint8_t *got);

/* A request of a write round done: a read (--read-untouched) is checked. */
static int round_done(struct ctx *c, struct job *j, struct vqfe_req *r)
{
	(void)j;
	if (r->type == VIRTIO_BLK_T_IN)
		check_block(c, r->sector / (BS / 512), r->buf);
	return 0;
}

static int write_round(struct ctx *c, uint32_t round)
{
	unsigned inflight = 0;
	bool more = true;

	for (unsigned q = 0; q < c->nq; q++)
		c->job[q].next = 0;
	/* a cluster discarded whole: nothing of it is known afterwards */
	for (uint64_t b = 0; c->cpb && b < c->nblk; b++)
		if (churned(c, round, b) && c->map[b].st == ST_UNTOUCHED)
			c->map[b].st = ST_DISCARDED;
	/* Last round's discarded clusters, discarded again (nothing in flight):
	 * this round allocates them anew, while clusters it discards are freed. */
	for (uint64_t b = 0; c->cpb && round > 1 && b < c->nblk; b += c->cpb) {
		uint64_t n = b + c->cpb > c->nblk ? c->nblk - b : c->cpb;

		if (!churned(c, round - 1, b))
			continue;
		if (vqfe_discard_wz(c->fe, 0, VIRTIO_BLK_T_DISCARD, b * BS, n * BS, 0) !=
		    VIRTIO_BLK_S_OK)
			return fail(c, "discard");
		for (uint64_t k = b; k < b + n; k++)
			c->map[k].st = ST_DISCARDED;
	}
	if (c->cpb && round > 1 && vqfe_flush(c->fe, 0) != VIRTIO_BLK_S_OK)
		return fail(c, "flush");
	while (more || inflight) {
		more = false;
		for (unsigned q = 0; q < c->nq; q++) {
			struct job *j = &c->job[q];
			bool kicked = false;

			for (unsigned s = 0; s < c->depth && j->inflight < c->depth; s++) {
				struct vqfe_req *r = NULL;
				unsigned slot;
				uint64_t b;
				uint64_t h;

				for (slot = 0; slot < c->depth; slot++) {
					if (!j->req[slot].user) {
						r = &j->req[slot];
						break;
					}
				}
				if (r && j->flush_due) {
					/* the discard made durable at once: the back-end
					 * may free the cluster while writes to it run */
					memset(r, 0, sizeof(*r));
					r->type = VIRTIO_BLK_T_FLUSH;
					j->flush_due = false;
					if (submit(c, j, q, r, &inflight) < 0)
						return -1;
					kicked = true;
					continue;
				}
				if (!r || !next_block(c, j, c->rdu, &b))
					break;
				more = true;
				memset(r, 0, sizeof(*r));
				if (c->map[b].st == ST_UNTOUCHED) {
					/* --read-untouched: checked in round_done */
					read_req(r, j->buf[slot], b);
					if (submit(c, j, q, r, &inflight) < 0)
						return -1;
					kicked = true;
					continue;
				}
				h = mix64((c->seed << 20) ^ ((uint64_t)round << 40) ^ b);
				if (churned(c, round, b) && b % c->cpb == 0) {
					uint64_t n = c->cpb;

					if (b + n > c->nblk)
						n = c->nblk - b;
					j->seg[slot] = (struct virtio_blk_discard_write_zeroes){
					    htole64(b * (BS / 512)),
					    htole32((uint32_t)(n * (BS / 512))), 0};
					r->type = VIRTIO_BLK_T_DISCARD;
					r->buf = &j->seg[slot];
					r->len = sizeof(j->seg[slot]);
					c->map[b].st = ST_DISCARDED;
					j->flush_due = true;
				} else if (c->mix && h % 16 == 1) {
					j->seg[slot] = (struct virtio_blk_discard_write_zeroes){
					    htole64(b * (BS / 512)), htole32(BS / 512), 0};
					r->type = (h >> 8) % 2 ? VIRTIO_BLK_T_WRITE_ZEROES
							       : VIRTIO_BLK_T_DISCARD;
					r->buf = &j->seg[slot];
					r->len = sizeof(j->seg[slot]);
					c->map[b].st = r->type == VIRTIO_BLK_T_DISCARD
							   ? ST_DISCARDED
							   : ST_ZERO;
				} else {
					pattern(j->buf[slot], c->seed, round, b);
					r->type = VIRTIO_BLK_T_OUT;
					r->buf = j->buf[slot];
					r->len = BS;
					r->sector = b * (BS / 512);
					c->map[b] = (struct blk){ST_WRITTEN, round};
				}
				if (churned(c, round, b))
					c->map[b].st = ST_DISCARDED; /* races the discard */
				if (submit(c, j, q, r, &inflight) < 0)
					return -1;
				kicked = true;
			}
			if (kicked)
				vqfe_vq_kick(vqfe_vq(c->fe, q), false);
			else if (j->next * c->nq + j->q < c->nblk)
				more = true;
		}
		if (inflight && reap_all(c, round_done, &inflight) < 0)
			return -1;
		for (unsigned q = 0; q < c->nq; q++) {
			for (unsigned s = 0; s < c->depth; s++) {
				/* A reaped request is no longer in flight: free its slot. */
				struct vqfe_req *r = &c->job[q].req[s];

				if (r->user && !r->inflight)
					r->user = NULL;
			}
		}
	}
	return 0;
}

static int check_block(struct ctx *c, uint64_t b, const uint8_t *got)
{
	uint8_t want[BS];
	const struct blk *m = &c->map[b];

	switch (m->st) {
	case ST_UNTOUCHED:
		memcpy(want, c->orig + b * BS, BS);
		break;
	case ST_ZERO:
		memset(want, 0, BS);
		break;
	case ST_WRITTEN:
		pattern(want, c->seed, m->round, b);
		break;
	default:
		return 0; /* discarded: anything */
	}
	if (memcmp(want, got, BS) == 0)
		return 0;
	if (c->errors++ < 10)
		fprintf(stderr,
			"vqfe-stress: block %" PRIu64 " (byte %" PRIu64 ", state %u round %u) "
			"has the wrong content\n",
			b, b * BS, m->st, m->round);
	return 0;
}

static int read_done(struct ctx *c, struct job *j, struct vqfe_req *r)
{
	(void)j;
	if (c->orig && c->map[r->sector / (BS / 512)].st == ST_UNKNOWN)
		memcpy(c->orig + r->sector / (BS / 512) * BS, r->buf, BS); /* first pass */
	else
		check_block(c, r->sector / (BS / 512), r->buf);
	r->user = NULL;
	return 0;
}

/* Read every block (spread over the queues) and check it; @first: record. */
static int verify_all(struct ctx *c)
{
	unsigned inflight = 0;
	bool more = true;

	for (unsigned q = 0; q < c->nq; q++)
		c->job[q].next = 0;
	while (more || inflight) {
		more = false;
		for (unsigned q = 0; q < c->nq; q++) {
			struct job *j = &c->job[q];
			bool kicked = false;

			for (unsigned slot = 0; slot < c->depth; slot++) {
				struct vqfe_req *r = &j->req[slot];
				uint64_t b;

				if (r->user)
					continue;
				/* Queue q reads the blocks another queue wrote. */
				if (!next_block(c, j, true, &b))
					break;
				more = true;
				memset(r, 0, sizeof(*r));
				read_req(r, j->buf[slot], b);
				if (submit(c, j, (q + 1) % c->nq, r, &inflight) < 0)
					return -1;
				kicked = true;
			}
			if (kicked)
				vqfe_vq_kick(vqfe_vq(c->fe, (q + 1) % c->nq), false);
			else if (j->next * c->nq + j->q < c->nblk)
				more = true;
		}
		if (inflight && reap_all(c, read_done, &inflight) < 0)
			return -1;
	}
	return 0;
}

static int write_map(struct ctx *c, const char *path)
{
	FILE *f = fopen(path, "w");

	if (!f) {
		perror(path);
		return -1;
	}
	for (uint64_t b = 0; b < c->nblk; b++) {
		switch (c->map[b].st) {
		case ST_UNTOUCHED:
			fputs("U\n", f);
			break;
		case ST_ZERO:
			fputs("Z\n", f);
			break;
		case ST_WRITTEN:
			fprintf(f, "W %u\n", c->map[b].round);
			break;
		default:
			fputs("D\n", f);
			break;
		}
	}
	return fclose(f) == 0 ? 0 : -1;
}

static void usage(void)
{
	fputs("usage: vqfe-stress SOCK --size N [--queues Q] [--rounds R] [--seed S] [--depth D]\n"
	      "                   [--vary-depth] [--mix] [--churn CLUSTER] [--read-untouched] "
	      "[--map FILE]\n"
	      "                   [--forever]\n"
	      "                   [--until FILE]\n",
	      stderr);
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"size", required_argument, NULL, 's'},
	    {"queues", required_argument, NULL, 'q'},
	    {"rounds", required_argument, NULL, 'r'},
	    {"seed", required_argument, NULL, 'S'},
	    {"depth", required_argument, NULL, 'd'},
	    {"mix", no_argument, NULL, 'm'},
	    {"churn", required_argument, NULL, 'C'},
	    {"read-untouched", no_argument, NULL, 'R'},
	    {"map", required_argument, NULL, 'M'},
	    {"forever", no_argument, NULL, 'F'},
	    {"until", required_argument, NULL, 'U'},
	    {"vary-depth", no_argument, NULL, 'V'},
	    {NULL, 0, NULL, 0},
	};
	struct ctx c = {.nq = 4, .depth = 8, .seed = 1};
	struct vqfe_opts o;
	const char *map = NULL, *until = NULL;
	uint64_t size = 0;
	unsigned rounds = 6;
	bool forever = false, vary = false;
	unsigned depth;
	int opt, rc = 1;

	while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (opt) {
		case 's':
			size = strtoull(optarg, NULL, 0);
			break;
		case 'q':
			c.nq = (unsigned)strtoul(optarg, NULL, 0);
			break;
		case 'r':
			rounds = (unsigned)strtoul(optarg, NULL, 0);
			break;
		case 'S':
			c.seed = strtoull(optarg, NULL, 0);
			break;
		case 'd':
			c.depth = (unsigned)strtoul(optarg, NULL, 0);
			break;
		case 'm':
			c.mix = true;
			break;
		case 'C':
			c.cpb = strtoull(optarg, NULL, 0) / BS;
			break;
		case 'R':
			c.rdu = true;
			break;
		case 'M':
			map = optarg;
			break;
		case 'F':
			forever = true;
			break;
		case 'U':
			until = optarg;
			break;
		case 'V':
			vary = true;
			break;
		default:
			usage();
			return 2;
		}
	}
	if (optind + 1 != argc || !size || size % BS || !c.nq || c.nq > MAXQ || !c.depth ||
	    c.depth > MAXDEP) {
		usage();
		return 2;
	}
	c.nblk = size / BS;
	depth = c.depth;
	vqfe_opts_init(&o);
	o.num_queues = c.nq;
	o.queue_size = 128;
	o.data_size = BS;
	if (vqfe_open(&c.fe, argv[optind], &o) < 0)
		return 1;
	if (vqfe_capacity(c.fe) * 512 < size) {
		fprintf(stderr, "vqfe-stress: the device is smaller than --size\n");
		goto out;
	}
	c.map = calloc(c.nblk, sizeof(*c.map));
	c.orig = calloc(c.nblk, BS);
	if (!c.map || !c.orig)
		goto out;
	for (unsigned q = 0; q < c.nq; q++) {
		c.job[q].q = q;
		for (unsigned s = 0; s < c.depth; s++) {
			c.job[q].buf[s] = malloc(BS);
			if (!c.job[q].buf[s])
				goto out;
		}
	}
	/* The content before: what untouched blocks must keep. */
	if (verify_all(&c) < 0)
		goto out;
	for (uint64_t b = 0; b < c.nblk; b++)
		c.map[b].st = untouched(c.seed, b) ? ST_UNTOUCHED : ST_UNKNOWN;
	for (uint32_t r = 1; forever || until || r <= rounds; r++) {
		bool last = until ? access(until, F_OK) == 0 : r == rounds;

		c.depth = vary && r % 2 ? 1 : depth;
		if (write_round(&c, r) < 0)
			goto out;
		c.depth = depth;
		if (vqfe_flush(c.fe, r % c.nq) != VIRTIO_BLK_S_OK) {
			fail(&c, "flush");
			goto out;
		}
		if ((r % 2 == 0 || last || c.cpb) && verify_all(&c) < 0)
			goto out;
		if (c.errors)
			break;
		if (until && last) {
			rounds = r;
			break;
		}
	}
	if (map && write_map(&c, map) < 0)
		goto out;
	if (c.errors) {
		fprintf(stderr, "vqfe-stress: %" PRIu64 " error(s)\n", c.errors);
		goto out;
	}
	printf("vqfe-stress: %u queues, %u rounds of %" PRIu64 " blocks: all verified\n", c.nq,
	       rounds, c.nblk);
	rc = 0;
out:
	if (forever && vqfe_is_disconnected(c.fe))
		rc = 0; /* the crash test killed the back-end under us */
	vqfe_close(c.fe);
	c.depth = depth;
	for (unsigned q = 0; q < c.nq; q++)
		for (unsigned s = 0; s < c.depth; s++)
			free(c.job[q].buf[s]);
	free(c.map);
	free(c.orig);
	return rc;
}
