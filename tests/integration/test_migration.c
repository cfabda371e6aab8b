/* SPDX-License-Identifier: MIT */
/*
 * Live migration on shared storage, with our own front-end: two vqcowd on one
 * qcow2 image, the destination started with --incoming.
 *
 *  - the destination holds no lock while the source serves the guest;
 *  - the source, once the front-end turned dirty logging on (SET_LOG_BASE +
 *    VHOST_F_LOG_ALL), marks the pages it writes, and when its ring stops
 *    (GET_VRING_BASE: the switchover) it writes its metadata back and
 *    releases its locks;
 *  - the destination takes the image when its ring starts and serves the
 *    source's data (metadata read afresh), allocating new clusters;
 *  - a failed migration (the destination gone): the source's ring restarts,
 *    it takes the image back and sees the destination's writes (its own
 *    cached metadata was dropped);
 *  - `qemu-img check` is clean and qemu-io reads every pattern afterwards.
 *
 * "threads": the same source with --io-threads 2, where the queues' threads
 * pop, complete and push, and serve allocated clusters themselves (the qcow2
 * fast path) or hand a request to the main thread and back (a hop):
 *  - with the log on, every page of every buffer a read filled, on the fast
 *    path or through a hop, and the page of its status byte, has its bit set
 *    when the request is in the used ring (the front-end syncs the log after
 *    it saw the completion);
 *  - GET_VRING_BASE of a ring whose fast-path writes are held back in the
 *    daemon (VQCOWD_TEST_FAST_DELAY) replies only once they are in the used
 *    ring, and its base counts exactly them (a completion after the reply
 *    would land in guest memory the front-end already migrated).
 * Both are about the I/O thread's own path: --io-threads-consolidate=off
 * (the QD1 requests would move queue 1 to the main thread, whose path holds
 * no write). "dirty" runs with it on too, queues moving under the rounds.
 */
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

#define CHUNK 65536u

#define CONS_OFF "--io-threads-consolidate=off"
#define CONS_ON  "--io-threads-consolidate=on"

static int write_pattern(struct vqfe *fe, uint64_t off, uint64_t seed)
{
	static uint8_t buf[CHUNK];

	itest_fill(buf, sizeof(buf), seed);
	return vqfe_write(fe, 0, off, buf, sizeof(buf));
}

static bool check_pattern(struct vqfe *fe, uint64_t off, uint64_t seed)
{
	static uint8_t want[CHUNK], got[CHUNK];

	itest_fill(want, sizeof(want), seed);
	return vqfe_read(fe, 0, off, got, sizeof(got)) == 0 && memcmp(want, got, CHUNK) == 0;
}

static unsigned bits(const uint8_t *p, size_t n)
{
	unsigned c = 0;

	for (size_t i = 0; i < n; i++)
		c += (unsigned)__builtin_popcount(p[i]);
	return c;
}

/* A fresh 64 MiB qcow2 image @img (DIR/disk.qcow2) in a new directory @dir
 * ("/tmp/vqcow-mig.XXXXXX", filled in). */
static void new_image(char *dir, char *img, size_t imgsz)
{
	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	snprintf(img, imgsz, "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 64M", img), 0);
}

/* The dirty log of a migration, as QEMU sets it up: shared memory with a bit
 * per page of the front-end's memory regions (SET_LOG_BASE), then
 * VHOST_F_LOG_ALL in SET_FEATURES. */
struct dirty_log {
	uint8_t *map;
	uint64_t size;
	int fd;
};

static void log_start(struct vqfe *fe, struct dirty_log *dl)
{
	uint64_t maxgpa = 0, gpa, size, v;
	struct vqfe_msg_hdr h;

	for (unsigned i = 0; vqfe_region(fe, i, &gpa, &size) == 0; i++)
		if (gpa + size > maxgpa)
			maxgpa = gpa + size;
	dl->size = (maxgpa / 4096 + 7) / 8;
	dl->fd = memfd_create("log", MFD_CLOEXEC);
	CU_ASSERT_FATAL(dl->fd >= 0 && ftruncate(dl->fd, (off_t)dl->size) == 0);
	dl->map = mmap(NULL, dl->size, PROT_READ | PROT_WRITE, MAP_SHARED, dl->fd, 0);
	CU_ASSERT_FATAL(dl->map != MAP_FAILED);
	{
		uint64_t lm[2] = {dl->size, 0};

		CU_ASSERT_EQUAL(vqfe_send_msg(fe, VHOST_USER_SET_LOG_BASE, VHOST_USER_VERSION, lm,
					      sizeof(lm), &dl->fd, 1),
				0);
		CU_ASSERT_EQUAL(vqfe_recv_msg(fe, &h, &v, sizeof(v), 5000), 8);
		CU_ASSERT_EQUAL(h.request, VHOST_USER_SET_LOG_BASE);
	}
	v = vqfe_features(fe) | (1ull << 26);
	CU_ASSERT_EQUAL(vqfe_call(fe, VHOST_USER_SET_FEATURES, &v, 8, NULL, 0, true, NULL, 0), 0);
}

/* After the daemons stopped: the image checks clean; the log and @dir go. */
static void finish(const char *dir, const char *img, struct dirty_log *dl)
{
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	munmap(dl->map, dl->size);
	close(dl->fd);
	tu_sh("rm -rf %s", dir);
}

static void t_handoff(void)
{
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64];
	struct dirty_log dl;
	uint32_t base = 0;

	new_image(dir, img, sizeof(img));
	START(a, .extra = {"--format", "qcow2", "--blk-file", img});
	START(b, .extra = {"--format", "qcow2", "--blk-file", img, "--incoming"});
	CONNECT(fa, a, NULL);
	CU_ASSERT_EQUAL(write_pattern(fa, 0, 1), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 1 * MiB, 2), 0);
	CU_ASSERT(tu_lock_held(img, 101)); /* the source's write lock */

	/* Migration starts: a dirty log, then VHOST_F_LOG_ALL. */
	log_start(fa, &dl);
	CU_ASSERT_EQUAL(bits(dl.map, dl.size), 0);
	CU_ASSERT_EQUAL(write_pattern(fa, 2 * MiB, 3), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 0, 1));
	CU_ASSERT(bits(dl.map, dl.size) >= 2); /* read data, status bytes, used ring */

	/* Switchover: the source's ring stops; it lets the image go. */
	CU_ASSERT_EQUAL(vqfe_vq_stop(fa, 0, &base), 0);
	for (int i = 0; i < 500 && tu_lock_held(img, 101); i++)
		usleep(10000);
	CU_ASSERT(!tu_lock_held(img, 100) && !tu_lock_held(img, 101));
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);

	/* The destination's ring starts: it takes the image. */
	{
		CONNECT(fb, b, NULL);
		/* (taken as the ring starts, before the first request is popped) */
		CU_ASSERT_TRUE(check_pattern(fb, 0, 1));
		CU_ASSERT(tu_lock_held(img, 101));
		CU_ASSERT_TRUE(check_pattern(fb, 1 * MiB, 2));
		CU_ASSERT_TRUE(check_pattern(fb, 2 * MiB, 3));
		CU_ASSERT_EQUAL(write_pattern(fb, 3 * MiB, 4), 0);
		CU_ASSERT_EQUAL(write_pattern(fb, 0, 5), 0);
		/* The migration fails after all: the destination goes away. */
		vqfe_close(fb);
	}
	STOP(b);
	CU_ASSERT(!tu_lock_held(img, 101));

	/* The source's guest resumes: it takes the image back, afresh. */
	CU_ASSERT_EQUAL(vqfe_vq_restart(fa, 0, base), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 3 * MiB, 4));
	CU_ASSERT_TRUE(check_pattern(fa, 0, 5));
	CU_ASSERT_TRUE(check_pattern(fa, 2 * MiB, 3));
	CU_ASSERT_EQUAL(write_pattern(fa, 4 * MiB, 6), 0);
	CU_ASSERT(tu_lock_held(img, 101));
	vqfe_close(fa);
	STOP(a);
	finish(dir, img, &dl);
}

/* Every page of [gpa, gpa + len) marked in @log? */
static bool logged(const uint8_t *log, uint64_t logsz, uint64_t gpa, uint64_t len)
{
	for (uint64_t pg = gpa / 4096; pg <= (gpa + len - 1) / 4096; pg++) {
		if (pg / 8 >= logsz || !(log[pg / 8] & (1u << (pg % 8))))
			return false;
	}
	return true;
}

static void t_threads(void)
{
	enum { NR = 8, NW = 8, LEN = 16384 };
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64], line[512];
	struct vqfe_req req[NR > NW ? NR : NW];
	static uint8_t wbuf[NW][LEN], pat[CHUNK];
	uint64_t sgpa, hits = 0;
	size_t ssize;
	struct vqfe_opts fo;
	struct dirty_log dl;
	uint32_t base = 0;
	uint16_t before;
	FILE *f;

	new_image(dir, img, sizeof(img));
	/* every 4th fast-path write held 500 ms with its ticket */
	setenv("VQCOWD_TEST_FAST_DELAY", "500", 1);
	START(a, .num_queues = 2,
	      .extra = {"--format", "qcow2", "--blk-file", img, "--io-threads", "2", CONS_OFF});
	unsetenv("VQCOWD_TEST_FAST_DELAY");
	itest_fe_opts(&fo);
	fo.num_queues = 2;
	CONNECT(fa, a, &fo);

	/* Allocated on the main thread (hops), then read once there: the
	 * clusters' mappings are published, later requests stay on queue 1's
	 * thread. */
	for (unsigned i = 0; i < 16; i++)
		CU_ASSERT_EQUAL(write_pattern(fa, (uint64_t)i * CHUNK, 10 + i), 0);
	CU_ASSERT_TRUE(check_pattern(fa, 0, 10));
	for (unsigned i = 0; i < 16; i++) {
		static uint8_t got[CHUNK];

		CU_ASSERT_EQUAL(vqfe_read(fa, 1, (uint64_t)i * CHUNK, got, CHUNK), 0);
	}

	/* Migration starts: a dirty log, then VHOST_F_LOG_ALL. */
	log_start(fa, &dl);

	/* Reads into scratch pages: fast on queue 1 (clusters 0-15), and
	 * through a hop (unallocated clusters, zeroes, and a range across two
	 * clusters that are not host-contiguous is not guaranteed to be fast). */
	vqfe_scratch(fa, &sgpa, &ssize);
	CU_ASSERT_FATAL(ssize >= (size_t)NR * LEN + 4096);
	for (unsigned round = 0; round < 2; round++) {
		memset(dl.map, 0, dl.size);
		memset(vqfe_gpa(fa, sgpa, (size_t)NR * LEN), 0xa5, (size_t)NR * LEN);
		for (unsigned i = 0; i < NR; i++) {
			uint64_t off = round ? 32 * MiB + (uint64_t)i * LEN : (uint64_t)i * LEN;

			req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
						   .sector = off / 512,
						   .len = LEN,
						   .data_gpa = sgpa + (uint64_t)i * LEN};
			CU_ASSERT_EQUAL_FATAL(vqfe_submit(fa, 1, &req[i]), 0);
		}
		CU_ASSERT_EQUAL(vqfe_drain(fa, 1), 0);
		for (unsigned i = 0; i < NR; i++) {
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
			CU_ASSERT_TRUE(logged(dl.map, dl.size, sgpa + (uint64_t)i * LEN, LEN));
			/* the status byte, in a descriptor of its own, as Linux
			 * lays requests out */
			CU_ASSERT_TRUE(
			    logged(dl.map, dl.size, vqfe_req_status_gpa(fa, &req[i]), 1));
		}
		if (!round) {
			/* the data really came from the image */
			itest_fill(pat, sizeof(pat), 10);
			CU_ASSERT_EQUAL(memcmp(vqfe_gpa(fa, sgpa, LEN), pat, LEN), 0);
		}
	}

	/* Fast writes in place, one of each four held 500 ms in the daemon;
	 * GET_VRING_BASE right after the kick. */
	before = le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx);
	for (unsigned i = 0; i < NW; i++) {
		itest_fill(wbuf[i], LEN, 100 + i);
		req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
					   .sector = (uint64_t)i * LEN / 512,
					   .buf = wbuf[i],
					   .len = LEN};
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fa, 1, &req[i]), 0);
	}
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fa, 1), true), 0);
	{
		uint64_t t0 = vqfe_now_ns();

		CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fa, 1, &base), 0);
		/* the reply waited for the held writes, which are all in the
		 * used ring now: nothing completes after it */
		CU_ASSERT(vqfe_now_ns() - t0 >= 100000000ull);
		CU_ASSERT_EQUAL((uint16_t)(le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx) - before),
				NW);
		CU_ASSERT_EQUAL((uint16_t)base, le16toh(vqfe_vq_used(vqfe_vq(fa, 1))->idx));
		CU_ASSERT_EQUAL(vqfe_reap(fa, 1, NULL, ~0u), NW);
		for (unsigned i = 0; i < NW; i++)
			CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	}
	/* The ring resumes at that base; the writes read back. */
	CU_ASSERT_EQUAL_FATAL(vqfe_vq_restart(fa, 1, base), 0);
	for (unsigned i = 0; i < NW; i++) {
		static uint8_t got[LEN];

		CU_ASSERT_EQUAL(vqfe_read(fa, 1, (uint64_t)i * LEN, got, LEN), 0);
		CU_ASSERT_EQUAL(memcmp(got, wbuf[i], LEN), 0);
	}
	vqfe_close(fa);
	CU_ASSERT_EQUAL(itest_signal_wait(&a, SIGTERM, 20000), 0);
	/* The threads served the reads and writes above themselves. */
	f = fopen(a.log, "r");
	CU_ASSERT_FATAL(f != NULL);
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "fast path: ");

		if (p)
			hits = strtoull(p + strlen("fast path: "), NULL, 10);
	}
	fclose(f);
	CU_ASSERT(hits >= NR + NW);
	if (hits < NR + NW)
		itest_dump_log(&a);
	STOP(a);
	finish(dir, img, &dl);
}

/*
 * "dirty": the detector of device writes that a migration would lose, with
 * no VM. QEMU copies guest memory while the device runs and trusts the
 * dirty log for what the device wrote; after GET_VRING_BASE of every ring it
 * syncs the log one last time and copies the rest. So:
 *  (1) every page the device changed is marked in the log (read data on the
 *      fast path, through a hop, from compressed, zero and backing clusters,
 *      through io/'s bounce buffers; GET_ID; status bytes; the used ring);
 *  (2) no guest memory changes once GET_VRING_BASE answered for both rings.
 * Guest memory is compared page by page with a snapshot taken once the
 * requests are in the rings but not yet published (vqfe_vq_hold): from then
 * on the front-end itself only writes its avail rings, which are left out.
 * Both rings are stopped the way QEMU stops them at the switchover (ring 0,
 * then ring 1), right after the kick or a moment later, while requests of
 * every kind are in flight on both; then the memory is compared again after
 * a pause. Default threads (the main thread serves queue 0 on the owner's
 * path, an I/O thread queue 1 with the fast path), and --io-threads 1, 2, 3.
 */
#define DQ      2           /* queues */
#define DQSIZE  128         /* descriptors and slots per queue */
#define DBATCH  24          /* requests per queue and round */
#define DROUNDS 24          /* rounds per daemon */
#define DMAXLEN (96 * 1024) /* largest request */

struct mem_snap {
	uint8_t *buf[VQFE_MAX_REGIONS];
	uint64_t gpa[VQFE_MAX_REGIONS], size[VQFE_MAX_REGIONS];
	unsigned n;
};

static void snap_take(struct vqfe *fe, struct mem_snap *s)
{
	for (unsigned i = 0; i < s->n; i++)
		memcpy(s->buf[i], vqfe_gpa(fe, s->gpa[i], s->size[i]), s->size[i]);
}

static void snap_init(struct vqfe *fe, struct mem_snap *s)
{
	memset(s, 0, sizeof(*s));
	while (s->n < VQFE_MAX_REGIONS &&
	       vqfe_region(fe, s->n, &s->gpa[s->n], &s->size[s->n]) == 0) {
		s->buf[s->n] = malloc(s->size[s->n]);
		CU_ASSERT_FATAL(s->buf[s->n] != NULL);
		s->n++;
	}
}

static void snap_free(struct mem_snap *s)
{
	for (unsigned i = 0; i < s->n; i++)
		free(s->buf[i]);
}

/* The avail ring pages: written by the front-end while the device runs. */
static bool fe_page(struct vqfe *fe, uint64_t pg)
{
	for (unsigned q = 0; q < DQ; q++) {
		uint64_t d, a, u, end;

		vqfe_vq_addrs(vqfe_vq(fe, q), &d, &a, &u);
		end = a + 6 + 2ull * DQSIZE;
		if (pg >= a / 4096 && pg <= (end - 1) / 4096)
			return true;
	}
	return false;
}

/* What lies at @gpa, for the failure message. */
static const char *what_at(struct vqfe *fe, struct vqfe_req *reqs, unsigned nreq, uint64_t pg,
			   char *buf, size_t len)
{
	for (unsigned q = 0; q < DQ; q++) {
		uint64_t d, a, u;

		vqfe_vq_addrs(vqfe_vq(fe, q), &d, &a, &u);
		if (pg == u / 4096) {
			snprintf(buf, len, "ring %u's used ring", q);
			return buf;
		}
	}
	for (unsigned i = 0; i < nreq; i++) {
		struct vqfe_req *r = &reqs[i];

		if (vqfe_req_status_gpa(fe, r) / 4096 == pg) {
			snprintf(buf, len, "status page of request type %u sector %llu queue %u",
				 r->type, (unsigned long long)r->sector, r->q);
			return buf;
		}
	}
	snprintf(buf, len, "a data page?");
	return buf;
}

/*
 * Pages that differ between @a and guest memory now (@b NULL) or @b; with
 * @dl, only those not marked in the log count. Returns the count; the first
 * few are printed with @what.
 */
static unsigned snap_diff(struct vqfe *fe, const struct mem_snap *a, const struct mem_snap *b,
			  const struct dirty_log *dl, struct vqfe_req *reqs, unsigned nreq,
			  const char *what, unsigned *changed)
{
	unsigned bad = 0;
	char wbuf[128];

	for (unsigned i = 0; i < a->n; i++) {
		const uint8_t *now = b ? b->buf[i] : vqfe_gpa(fe, a->gpa[i], a->size[i]);

		for (uint64_t off = 0; off < a->size[i]; off += 4096) {
			uint64_t gpa = a->gpa[i] + off, pg = gpa / 4096;
			size_t n = a->size[i] - off < 4096 ? (size_t)(a->size[i] - off) : 4096;

			if (!memcmp(a->buf[i] + off, now + off, n) || fe_page(fe, pg))
				continue;
			if (changed)
				(*changed)++;
			if (dl && pg / 8 < dl->size && (dl->map[pg / 8] & (1u << (pg % 8))))
				continue;
			if (bad++ < 5)
				fprintf(stderr, "  %s: guest page 0x%llx (%s)\n", what,
					(unsigned long long)gpa,
					what_at(fe, reqs, nreq, pg, wbuf, sizeof(wbuf)));
		}
	}
	return bad;
}

/*
 * vqfe_drain of ring @q, and on a failure everything there is to know: the
 * case and round, the front-end's view of the ring, the requests of the round
 * still in flight (type, sector, length, segments, queue), the threads of the
 * daemon (gdb, when installed) and its log.
 */
static int drain_or_tell(struct vqfe *fe, unsigned q, const struct itest_daemon *d,
			 const struct vqfe_req *reqs, unsigned nreq, const char *what,
			 unsigned round)
{
	static const char *const names[] = {
	    [VIRTIO_BLK_T_IN] = "IN",           [VIRTIO_BLK_T_OUT] = "OUT",
	    [VIRTIO_BLK_T_FLUSH] = "FLUSH",     [VIRTIO_BLK_T_GET_ID] = "GET_ID",
	    [VIRTIO_BLK_T_DISCARD] = "DISCARD", [VIRTIO_BLK_T_WRITE_ZEROES] = "WRITE_ZEROES"};
	int rc = vqfe_drain(fe, q);

	if (rc == 0)
		return 0;
	fprintf(stderr, "dirty: %s, round %u: ring %u did not drain: %s\n", what, round, q,
		vqfe_vq_strerror(vqfe_vq(fe, q)));
	for (unsigned i = 0; i < nreq; i++) {
		const struct vqfe_req *r = &reqs[i];
		uint64_t sector = r->sector;

		if (!r->inflight)
			continue;
		if (r->type == VIRTIO_BLK_T_DISCARD || r->type == VIRTIO_BLK_T_WRITE_ZEROES)
			sector = le64toh(
			    ((const struct virtio_blk_discard_write_zeroes *)r->buf)->sector);
		fprintf(stderr,
			"  in flight: queue %u head %u %s sector %llu (offset %llu) len %u segs "
			"%u layout %#x\n",
			r->q, r->head,
			r->type < sizeof(names) / sizeof(names[0]) && names[r->type]
			    ? names[r->type]
			    : "?",
			(unsigned long long)sector, (unsigned long long)sector * 512, r->len,
			r->segs, r->layout);
	}
	if (d->pid > 0)
		tu_sh("gdb -q -batch -p %d -ex 'thread apply all bt' </dev/null 2>/dev/null | "
		      "grep -v '^\\[' >&2",
		      (int)d->pid);
	itest_dump_log(d);
	return rc;
}

/* SET_VRING_ADDR with VHOST_VRING_F_LOG: QEMU's way of asking for the used
 * ring's writes in the log once a migration starts. */
static void log_rings(struct vqfe *fe)
{
	for (unsigned q = 0; q < DQ; q++) {
		struct {
			uint32_t index, flags;
			uint64_t desc, used, avail, log;
		} a;
		uint64_t d, av, u;

		vqfe_vq_addrs(vqfe_vq(fe, q), &d, &av, &u);
		a.index = q;
		a.flags = 1; /* VHOST_VRING_F_LOG */
		a.desc = vqfe_uaddr(fe, d);
		a.used = vqfe_uaddr(fe, u);
		a.avail = vqfe_uaddr(fe, av);
		a.log = u;
		CU_ASSERT_EQUAL(
		    vqfe_call(fe, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0, true, NULL, 0),
		    0);
	}
}

/* A request of the mix, drawn with @rnd (the image: dirty_image()). */
static struct vqfe_req mixed_req(uint64_t *rnd)
{
	static const uint32_t lens[] = {512, 4096, 8192, 12288, 65536, DMAXLEN, 4096 + 512};
	struct vqfe_req r = {0};
	uint64_t x;
	unsigned k;

	*rnd = *rnd * 6364136223846793005ull + 1442695040888963407ull;
	x = *rnd >> 16;
	k = (unsigned)(x % 100);
	r.len = lens[(x >> 8) % (sizeof(lens) / sizeof(lens[0]))];
	/* 0-24M: data, compressed, zero, backing data, backing unallocated
	 * (6 areas of 4M); 32M-48M: written, zeroed, discarded */
	if (k < 55) {
		r.type = VIRTIO_BLK_T_IN;
		r.sector = ((x >> 16) % (24 * MiB - r.len)) / 512;
	} else if (k < 65) {
		r.type = VIRTIO_BLK_T_IN;
		r.sector = (32 * MiB + (x >> 16) % (16 * MiB - r.len)) / 512;
	} else if (k < 80) {
		r.type = VIRTIO_BLK_T_OUT;
		r.sector = (32 * MiB + (x >> 16) % (16 * MiB - r.len)) / 512;
		if (k < 70) /* into the compressed clusters: COW on the owner */
			r.sector = (4 * MiB + (x >> 16) % (4 * MiB - r.len)) / 512;
	} else if (k < 85) {
		r.type = VIRTIO_BLK_T_WRITE_ZEROES;
		r.sector = (32 * MiB + (x >> 16) % (16 * MiB - r.len)) / 512;
	} else if (k < 90) {
		r.type = VIRTIO_BLK_T_DISCARD;
		r.sector = (32 * MiB + ((x >> 16) % (16 * MiB - r.len) & ~(65535ull))) / 512;
	} else if (k < 95) {
		r.type = VIRTIO_BLK_T_GET_ID;
		r.len = VIRTIO_BLK_ID_BYTES;
	} else {
		r.type = VIRTIO_BLK_T_FLUSH;
		r.len = 0;
	}
	/* odd splits: buffers off the O_DIRECT alignment (io/'s bounce copy) */
	if (r.len && (x >> 40) % 4 == 0)
		r.segs = 3;
	if ((x >> 42) % 2)
		r.layout = VQFE_L_INDIRECT;
	if (r.type == VIRTIO_BLK_T_DISCARD || r.type == VIRTIO_BLK_T_WRITE_ZEROES) {
		r.segs = 0;
		r.len = 0; /* built below: one segment */
	}
	return r;
}

static void dirty_image(const char *dir, char *img, size_t imgsz)
{
	CU_ASSERT_EQUAL_FATAL(tu_sh("qemu-img create -q -f qcow2 %s/base.qcow2 64M && "
				    "qemu-io -f qcow2 -c 'write -P 0x5b 12M 4M' %s/base.qcow2 "
				    ">/dev/null",
				    dir, dir),
			      0);
	snprintf(img, imgsz, "%s/disk.qcow2", dir);
	CU_ASSERT_EQUAL_FATAL(
	    tu_sh("qemu-img create -q -f qcow2 -b %s/base.qcow2 -F qcow2 %s 64M && "
		  "qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -c -P 0x22 4M 4M' "
		  "-c 'write -z 8M 4M' -c 'write -P 0x33 32M 8M' %s >/dev/null",
		  dir, img, img),
	    0);
}

/* One daemon (@opt @val: one more option, NULL for none; @cons: an
 * --io-threads-consolidate=on|off, NULL for the default, =on with queues
 * moving after 8 low requests; @inflight: the
 * INFLIGHT_SHMFD region as QEMU's vhost-user-blk uses it, and two memory
 * regions): warm up, start
 * the log, then DROUNDS rounds of (1) and (2). */
static void dirty_run(const char *img, const char *opt, const char *val, const char *cons,
		      bool inflight)
{
	const char *x[3] = {NULL, NULL, NULL};
	unsigned nx = 0;
	static uint8_t wdata[DMAXLEN], got[DMAXLEN];
	static struct vqfe_req reqs[DQ * DBATCH];
	static struct virtio_blk_discard_write_zeroes segs[DQ * DBATCH];
	struct mem_snap s0, s1, s2;
	struct vqfe_opts fo;
	struct dirty_log dl;
	uint64_t rnd = 12345;
	unsigned bad1 = 0, bad2 = 0, changed = 0, nreq = 0;

	char what[128];

	snprintf(what, sizeof(what), "%s %s%s%s%s", opt ? opt : "default options", val ? val : "",
		 cons ? " " : "", cons ? cons : "",
		 inflight ? ", inflight region, two memory regions" : "");
	fprintf(stderr, "dirty: %s\n", what);
	if (opt) {
		x[nx++] = opt;
		x[nx++] = val;
	}
	if (cons)
		x[nx++] = cons;
	if (cons && strcmp(cons, CONS_ON) == 0)
		setenv("VQCOWD_TEST_CONS_RUN", "8", 1);
	START(a, .num_queues = DQ,
	      .extra = {"--format", "qcow2", "--blk-file", img, x[0], x[1], x[2]});
	unsetenv("VQCOWD_TEST_CONS_RUN");
	itest_fe_opts(&fo);
	fo.inflight = inflight;
	fo.num_queues = DQ;
	fo.queue_size = DQSIZE;
	fo.data_size = DMAXLEN;
	if (inflight) {
		/* and guest memory in two regions of one memfd with a hole
		 * between them, as QEMU hands its guest RAM over in several:
		 * a buffer's page is found by the reverse lookup of its region */
		fo.num_regions = 2;
		fo.gpa_hole = 1 * MiB;
	}
	CONNECT(fa, a, &fo);
	itest_fill(wdata, sizeof(wdata), 77);
	/* Warm up: every cluster read on both queues, so queue 1's thread finds
	 * the mappings published (fast path) where it has one. */
	for (unsigned q = 0; q < DQ; q++)
		for (uint64_t off = 0; off < 48 * MiB; off += 65536)
			CU_ASSERT_EQUAL(vqfe_read(fa, q, off, got, 65536), 0);
	log_start(fa, &dl);
	log_rings(fa);
	snap_init(fa, &s0);
	snap_init(fa, &s1);
	snap_init(fa, &s2);
	for (unsigned round = 0; round < DROUNDS; round++) {
		bool stop = round % 2;
		uint32_t base[DQ];

		/* the requests in the rings, not yet published */
		nreq = 0;
		for (unsigned q = 0; q < DQ; q++) {
			vqfe_vq_hold(vqfe_vq(fa, q), true);
			for (unsigned i = 0; i < DBATCH; i++) {
				struct vqfe_req *r = &reqs[nreq];

				*r = mixed_req(&rnd);
				if (r->type == VIRTIO_BLK_T_OUT) {
					r->buf = wdata;
				} else if (r->type == VIRTIO_BLK_T_DISCARD ||
					   r->type == VIRTIO_BLK_T_WRITE_ZEROES) {
					segs[nreq] = (struct virtio_blk_discard_write_zeroes){
					    htole64(r->sector), htole32(128),
					    htole32(r->type == VIRTIO_BLK_T_WRITE_ZEROES &&
							    (rnd >> 20) % 2
							? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
							: 0)};
					r->sector = 0;
					r->buf = &segs[nreq];
					r->len = sizeof(segs[nreq]);
				}
				if (vqfe_submit(fa, q, r) < 0) {
					fprintf(stderr, "dirty: submit: %s\n",
						vqfe_vq_strerror(vqfe_vq(fa, q)));
					CU_FAIL_FATAL("submit");
				}
				nreq++;
			}
		}
		snap_take(fa, &s0);
		memset(dl.map, 0, dl.size);
		for (unsigned q = 0; q < DQ; q++) {
			vqfe_vq_hold(vqfe_vq(fa, q), false);
			CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fa, q), true), 0);
		}
		if (!stop) {
			for (unsigned q = 0; q < DQ; q++)
				CU_ASSERT_EQUAL(drain_or_tell(fa, q, &a, reqs, nreq, what, round),
						0);
			/* (1) */
			bad1 += snap_diff(fa, &s0, NULL, &dl, reqs, nreq, "changed, not logged",
					  &changed);
			continue;
		}
		/* The switchover: ring 0, then ring 1, as QEMU stops them; right
		 * after the kick, or once the threads are busy with the batch. */
		if (round % 4 == 3)
			usleep(200 + (unsigned)(rnd >> 30) % 2000);
		for (unsigned q = 0; q < DQ; q++)
			CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fa, q, &base[q]), 0);
		snap_take(fa, &s1);
		/* (1), up to the replies */
		bad1 += snap_diff(fa, &s0, &s1, &dl, reqs, nreq, "changed, not logged", &changed);
		/* (2): nothing moves after them */
		usleep(100000);
		snap_take(fa, &s2);
		bad2 +=
		    snap_diff(fa, &s1, &s2, NULL, reqs, nreq, "changed after GET_VRING_BASE", NULL);
		for (unsigned q = 0; q < DQ; q++) {
			/* everything popped is in the used ring */
			CU_ASSERT_EQUAL((uint16_t)base[q],
					le16toh(vqfe_vq_used(vqfe_vq(fa, q))->idx));
			/* the rest runs once the ring is back (a failed migration) */
			if (vqfe_vq_restart(fa, q, base[q]) != 0) {
				fprintf(stderr, "dirty: %s, round %u: ring %u: restart: %s\n", what,
					round, q, vqfe_strerror(fa));
				itest_dump_log(&a);
				CU_FAIL_FATAL("ring restart");
			}
		}
		log_rings(fa);
		for (unsigned q = 0; q < DQ; q++) {
			CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fa, q), true), 0);
			CU_ASSERT_EQUAL(drain_or_tell(fa, q, &a, reqs, nreq, what, round), 0);
		}
	}
	for (unsigned i = 0; i < nreq; i++)
		CU_ASSERT_EQUAL(reqs[i].status, VIRTIO_BLK_S_OK);
	fprintf(stderr,
		"dirty: %u pages changed by the device; %u of them not logged; %u "
		"changed after GET_VRING_BASE\n",
		changed, bad1, bad2);
	CU_ASSERT(changed >= DROUNDS * 8);
	CU_ASSERT_EQUAL(bad1, 0);
	CU_ASSERT_EQUAL(bad2, 0);
	snap_free(&s0);
	snap_free(&s1);
	snap_free(&s2);
	vqfe_close(fa);
	CU_ASSERT_EQUAL(itest_signal_wait(&a, SIGTERM, 20000), 0);
	{
		/* The I/O thread served queue 1 itself and through hops. */
		unsigned long long hits = 0, hops = 0, gathered = 0, spread = 0;
		char line[512];
		FILE *f = fopen(a.log, "r");

		CU_ASSERT_FATAL(f != NULL);
		while (fgets(line, sizeof(line), f)) {
			const char *p = strstr(line, "fast path: ");

			if (p)
				sscanf(p, "fast path: %llu hits, %llu hops", &hits, &hops);
			p = strstr(line, "moved to the main thread ");
			if (p)
				sscanf(p, "moved to the main thread %llu times, back %llu",
				       &gathered, &spread);
		}
		fclose(f);
		fprintf(stderr, "dirty: fast path: %llu hits, %llu hops; moved %llu, back %llu\n",
			hits, hops, gathered, spread);
		/* =on: queue 1 moved to the main thread (warm-up) and back (rounds) */
		if (cons && strcmp(cons, CONS_ON) == 0)
			CU_ASSERT(gathered >= 1 && spread >= 1);
		if (!opt || strcmp(val, "1"))
			CU_ASSERT(hits > 0 && hops > 0);
	}
	STOP(a);
	munmap(dl.map, dl.size);
	close(dl.fd);
}

static void t_dirty(void)
{
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64];
	/* the I/O threads' own paths with consolidation off; with it on, the
	 * queue moving to the main thread and back under the rounds */
	static const struct {
		const char *opt, *val, *cons;
		bool inflight;
	} runs[] = {{NULL, NULL, NULL, true},
		    {"--io-threads", "1", NULL, false},
		    {"--io-threads", "2", CONS_OFF, true},
		    {"--io-threads", "3", CONS_OFF, false},
		    {"--poll-ns", "50000", CONS_OFF, false},
		    {"--io-threads", "2", CONS_ON, false}};

	CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
	dirty_image(dir, img, sizeof(img));
	for (unsigned i = 0; i < sizeof(runs) / sizeof(runs[0]); i++)
		dirty_run(img, runs[i].opt, runs[i].val, runs[i].cons, runs[i].inflight);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	tu_sh("rm -rf %s", dir);
}

/*
 * "restart": the switchover called off at once, the way QEMU resumes the
 * source VM when a migration fails right after it stopped the rings: every
 * ring stopped with dirty logging on starts the daemon letting the image go
 * (a write-back, then the locks), and the ring starts again while that runs.
 * The daemon serves the vhost socket from the loop the write-back drives, so
 * the restart is seen in the middle of it: the daemon must come out of it
 * with the image taken back and the ring served (it used to stay parked,
 * never popping the ring again). Each round writes new clusters first, so the
 * write-back has work; one thread, then two queues on two threads.
 */
static void restart_run(const char *img, bool threads)
{
	struct vqfe_opts fo;
	struct dirty_log dl;
	unsigned nq = threads ? 2 : 1, taken = 0;
	char line[512];
	FILE *f;

	fprintf(stderr, "restart: %s\n", threads ? "--io-threads 2, 2 queues" : "one thread");
	START(a, .num_queues = nq,
	      .extra = {"--format", "qcow2", "--blk-file", img, threads ? "--io-threads" : NULL,
			threads ? "2" : NULL});
	itest_fe_opts(&fo);
	fo.num_queues = nq;
	fo.timeout_ms = 5000;
	CONNECT(fa, a, &fo);
	log_start(fa, &dl);
	for (unsigned round = 0; round < 20; round++) {
		static uint8_t buf[CHUNK], got[CHUNK];
		uint32_t base[2];
		uint64_t off = (uint64_t)(round % 16) * 2 * MiB + (threads ? 32 * MiB : 0);
		bool ok = true;

		itest_fill(buf, sizeof(buf), round + 1);
		for (unsigned q = 0; q < nq; q++)
			CU_ASSERT_EQUAL(vqfe_write(fa, q, off + q * CHUNK, buf, CHUNK), 0);
		for (unsigned q = 0; q < nq; q++)
			CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fa, q, &base[q]), 0);
		for (unsigned q = 0; q < nq; q++)
			CU_ASSERT_EQUAL_FATAL(vqfe_vq_restart(fa, q, base[q]), 0);
		for (unsigned q = 0; q < nq && ok; q++) {
			int rc = vqfe_read(fa, q, off + q * CHUNK, got, CHUNK);

			if (rc != 0 || memcmp(got, buf, CHUNK)) {
				fprintf(stderr,
					"restart: round %u: queue %u: read after restart: %s\n",
					round, q, rc ? vqfe_strerror(fa) : "wrong data");
				ok = false;
			}
		}
		CU_ASSERT_TRUE(ok);
		if (!ok) {
			itest_dump_log(&a);
			break;
		}
	}
	vqfe_close(fa);
	f = fopen(a.log, "r");
	CU_ASSERT_FATAL(f != NULL);
	while (fgets(line, sizeof(line), f))
		taken += strstr(line, "a ring started while the image was let go") != NULL;
	fclose(f);
	/* how often the race was hit (it needs the write-back to take a while) */
	fprintf(stderr, "restart: %u of 20 restarts came while the image was let go\n", taken);
	STOP(a);
	munmap(dl.map, dl.size);
	close(dl.fd);
}

static void t_restart(void)
{
	char dir[] = "/tmp/vqcow-mig.XXXXXX", img[64];

	new_image(dir, img, sizeof(img));
	restart_run(img, false);
	restart_run(img, true);
	CU_ASSERT_EQUAL(tu_sh("qemu-img check -q %s", img), 0);
	tu_sh("rm -rf %s", dir);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("migration", NULL, NULL, NULL, itest_teardown);
	const char *skip = itest_vqcowd_only("two daemons on one image with --incoming");

	if (!skip && tu_sh("qemu-img --version >/dev/null 2>&1") != 0)
		skip = "qemu-img not installed";
	tu_add_test(s, "handoff", t_handoff, skip);
	tu_add_test(s, "threads", t_threads, skip);
	tu_add_test(s, "dirty", t_dirty, skip);
	tu_add_test(s, "restart", t_restart, skip);
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.migration", add_suites);
}
