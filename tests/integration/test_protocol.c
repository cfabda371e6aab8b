/* SPDX-License-Identifier: MIT */
/*
 * Integration: the vhost-user protocol life of a real back-end, driven by vqfe.
 *
 * Covered: GET_VRING_BASE (reply after in-flight requests completed, base =
 * avail index, restart with SET_VRING_BASE); ring enable/disable; protocol
 * feature subsets; reconnect after a clean disconnect, after a disconnect
 * with requests in flight and after the front-end process is SIGKILLed in
 * the middle of I/O; one connection at a time; malformed messages and hostile
 * descriptors drop the connection (vqcowd) while the daemon keeps accepting;
 * no fd leak in the daemon across all of that (/proc/PID/fd); SIGTERM with
 * requests in flight completes them and exits 0; config-change message on
 * the backend channel after a resize (SIGHUP).
 */
#include <CUnit/Basic.h>
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "itest.h"
#include "testutil.h"

/* One write + read-back through a fresh connection: the daemon still serves. */
static bool serves(struct itest_daemon *d, uint64_t seed)
{
	struct vqfe *fe = itest_connect(d, NULL);
	uint8_t w[8192], r[8192];
	bool ok;

	if (!fe)
		return false;
	itest_fill(w, sizeof(w), seed);
	ok = vqfe_write(fe, 0, 1 * MiB, w, sizeof(w)) == 0 &&
	     vqfe_read(fe, 0, 1 * MiB, r, sizeof(r)) == 0 && memcmp(w, r, sizeof(w)) == 0;
	if (!ok)
		fprintf(stderr, "serves: %s\n", vqfe_strerror(fe));
	vqfe_close(fe);
	return ok;
}

/* Wait until the daemon's fd count is back to @want (disconnects are async). */
static int fds_settle(const struct itest_daemon *d, int want)
{
	int n = -1;

	for (int i = 0; i < 300; i++) {
		n = itest_fd_count(d);
		if (n == want)
			break;
		usleep(10000);
	}
	return n;
}

/* The daemon's fd count once it is stable (two equal reads 50 ms apart). */
static int fds_stable(const struct itest_daemon *d)
{
	int a = itest_fd_count(d), b;

	for (int i = 0; i < 40; i++) {
		usleep(50000);
		b = itest_fd_count(d);
		if (a == b)
			break;
		a = b;
	}
	return a;
}

/* Put @n writes of @len bytes each in queue 0 (not kicked), back to back from
 * offset 0, the data from @w; each submission must succeed. */
static void submit_writes(struct vqfe *fe, struct vqfe_req *req, uint8_t *w, unsigned n,
			  uint32_t len)
{
	for (unsigned i = 0; i < n; i++) {
		req[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
					   .sector = (uint64_t)i * len / 512,
					   .buf = w + (size_t)i * len,
					   .len = len};
		CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &req[i]), 0);
	}
}

/* ---- GET_VRING_BASE, ring states ---- */

static void t_get_vring_base(void)
{
	enum { N = 32, LEN = 64 * 1024 };
	START(d, .img_size = 16 * MiB);
	struct vqfe_opts o;
	struct vqfe_req req[N];
	uint8_t *w = malloc(N * LEN), *r = malloc(N * LEN);
	uint32_t base = 0;

	itest_fe_opts(&o);
	o.slots = N;
	CONNECT(fe, d, &o);
	struct vqfe_vq *vq = vqfe_vq(fe, 0);

	itest_fill(w, N * LEN, 5);
	submit_writes(fe, req, w, N, LEN);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
	if (itest_is_qsd()) /* libvhost-user answers at once: stop an idle ring there */
		CU_ASSERT_EQUAL(vqfe_drain(fe, 0), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_vq_stop(fe, 0, &base), 0);
	/* the reply came after everything the back-end took was completed */
	CU_ASSERT_EQUAL(base, N);
	CU_ASSERT_EQUAL(le16toh(vqfe_vq_used(vq)->idx), base);
	if (!itest_is_qsd())
		CU_ASSERT_EQUAL(vqfe_reap(fe, 0, NULL, ~0u), N);
	for (unsigned i = 0; i < N; i++)
		CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	/* a stopped ring takes nothing: a request made available now stays */
	{
		struct vqfe_req x = {.type = VIRTIO_BLK_T_FLUSH};

		CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &x), 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
		usleep(200000);
		CU_ASSERT_EQUAL(vqfe_reap(fe, 0, NULL, ~0u), 0);
		/* restart at the back-end's base: the pending request is processed */
		int rc = vqfe_vq_restart(fe, 0, base);

		if (rc)
			fprintf(stderr, "get_vring_base: restart: %s\n", vqfe_strerror(fe));
		CU_ASSERT_EQUAL_FATAL(rc, 0);
		CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
		CU_ASSERT_EQUAL(vqfe_drain(fe, 0), 0);
		CU_ASSERT_EQUAL(x.status, VIRTIO_BLK_S_OK);
	}
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 0, r, N * LEN), 0);
	CU_ASSERT_EQUAL(memcmp(r, w, N * LEN), 0);
	/* again: stop an idle ring, base = avail index */
	CU_ASSERT_EQUAL(vqfe_vq_stop(fe, 0, &base), 0);
	CU_ASSERT_EQUAL(base, le16toh(vqfe_vq_avail(vq)->idx));
	free(w);
	free(r);
	vqfe_close(fe);
	STOP(d);
}

static void t_ring_enable(void)
{
	START(d, .img_size = 4 * MiB, .num_queues = 2);
	struct vqfe_opts o;

	itest_fe_opts(&o);
	o.num_queues = 2;
	o.no_enable = true; /* rings started (kick fd) but disabled */
	CONNECT(fe, d, &o);
	struct vqfe_req x = {.type = VIRTIO_BLK_T_FLUSH};

	CU_ASSERT_EQUAL(vqfe_submit(fe, 1, &x), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), true), 0);
	usleep(200000);
	if (!itest_is_qsd()) /* libvhost-user processes disabled rings */
		CU_ASSERT_EQUAL(vqfe_reap(fe, 1, NULL, ~0u), 0);
	CU_ASSERT_EQUAL(vqfe_vq_enable(fe, 1, true), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 1), true), 0);
	CU_ASSERT_EQUAL(vqfe_drain(fe, 1), 0);
	CU_ASSERT_EQUAL(x.status, VIRTIO_BLK_S_OK);
	vqfe_close(fe);
	STOP(d);
}

static void t_feature_subsets(void)
{
	START(d, .img_size = 4 * MiB, .num_queues = 2);
	struct vqfe_opts o;
	uint8_t w[4096], r[4096];

	for (int v = 0; v < 4; v++) {
		itest_fe_opts(&o);
		o.no_reply_ack = v & 1;
		o.no_backend_req = v & 2;
		o.no_mq = v == 3;
		o.num_queues = v == 3 ? 1 : 2;
		CONNECT(fe, d, &o);
		CU_ASSERT_EQUAL(vqfe_backend_fd(fe) < 0, (v & 2) != 0);
		itest_fill(w, sizeof(w), (uint64_t)v);
		CU_ASSERT_EQUAL(vqfe_write(fe, o.num_queues - 1, 4096ull * (unsigned)v, w, 4096),
				0);
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, 4096ull * (unsigned)v, r, 4096), 0);
		CU_ASSERT_EQUAL(memcmp(w, r, 4096), 0);
		vqfe_close(fe);
	}
	STOP(d);
}

/* ---- reconnects ---- */

static void t_reconnect(void)
{
	START(d, .img_size = 8 * MiB, .num_queues = 2);
	struct vqfe_opts o;
	uint8_t a[65536], b[65536], r[65536];

	itest_fill(a, sizeof(a), 1);
	itest_fill(b, sizeof(b), 2);
	{
		CONNECT(fe, d, NULL);
		CU_ASSERT_EQUAL(vqfe_write(fe, 0, 0, a, sizeof(a)), 0);
		vqfe_close(fe);
	}
	itest_fe_opts(&o);
	o.num_queues = 2;
	o.num_regions = 2;
	{
		CONNECT(fe, d, &o);
		CU_ASSERT_EQUAL(vqfe_read(fe, 1, 0, r, sizeof(r)), 0);
		CU_ASSERT_EQUAL(memcmp(a, r, sizeof(r)), 0);
		CU_ASSERT_EQUAL(vqfe_write(fe, 1, 0, b, sizeof(b)), 0);
		vqfe_close(fe);
	}
	{
		CONNECT(fe, d, NULL);
		CU_ASSERT_EQUAL(vqfe_read(fe, 0, 0, r, sizeof(r)), 0);
		CU_ASSERT_EQUAL(memcmp(b, r, sizeof(r)), 0);
		vqfe_close(fe);
	}
	STOP(d);
}

/* Close the connection with 32 requests in flight; the next one works. */
static void t_disconnect_inflight(void)
{
	enum { N = 32, LEN = 128 * 1024 };
	START(d, .img_size = 16 * MiB);
	struct vqfe_opts o;
	static struct vqfe_req req[N];
	static uint8_t w[LEN];

	itest_fe_opts(&o);
	o.slots = N;
	for (int round = 0; round < 3; round++) {
		CONNECT(fe, d, &o);

		for (unsigned i = 0; i < N; i++) {
			req[i] =
			    (struct vqfe_req){.type = i & 1 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT,
					      .sector = (uint64_t)i * LEN / 512,
					      .buf = w,
					      .len = LEN};
			CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &req[i]), 0);
		}
		CU_ASSERT_EQUAL(vqfe_vq_kick(vqfe_vq(fe, 0), true), 0);
		if (round == 1)
			usleep(1000);
		vqfe_close(fe);
		CU_ASSERT_FATAL(itest_alive(&d));
	}
	CU_ASSERT(serves(&d, 3));
	STOP(d);
}

/* A front-end process SIGKILLed in the middle of I/O. */
static void t_kill_frontend_mid_io(void)
{
	int baseline, pfd[2];
	pid_t pid;
	char c;

	START(d, .img_size = 32 * MiB, .num_queues = 2);

	CU_ASSERT(serves(&d, 1));
	baseline = fds_stable(&d);
	for (int round = 0; round < 3; round++) {
		CU_ASSERT_FATAL(pipe(pfd) == 0);
		pid = fork();
		CU_ASSERT_FATAL(pid >= 0);
		if (pid == 0) {
			/* child: queue depth 32 on two queues, forever */
			struct vqfe_opts o;
			static struct vqfe_req req[2][32];
			struct vqfe *fe;
			uint64_t n = 0;

			close(pfd[0]);
			itest_fe_opts(&o);
			o.num_queues = 2;
			o.slots = 32;
			o.num_regions = 2;
			fe = itest_connect(&d, &o);
			if (!fe)
				_exit(1);
			for (unsigned q = 0; q < 2; q++)
				for (unsigned i = 0; i < 32; i++) {
					req[q][i] = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
								      .len = 64 * 1024,
								      .nocopy = true,
								      .sector = (n++ % 400) * 128};
					if (vqfe_submit(fe, q, &req[q][i]) < 0)
						_exit(2);
				}
			vqfe_vq_kick(vqfe_vq(fe, 0), false);
			vqfe_vq_kick(vqfe_vq(fe, 1), false);
			if (write(pfd[1], "r", 1) != 1)
				_exit(3);
			for (;;) {
				for (unsigned q = 0; q < 2; q++) {
					struct vqfe_req *done[32];
					int k = vqfe_reap(fe, q, done, 32);

					if (k < 0)
						_exit(4);
					for (int i = 0; i < k; i++) {
						done[i]->sector = (n++ % 400) * 128;
						done[i]->type =
						    n & 1 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
						if (vqfe_submit(fe, q, done[i]) < 0)
							_exit(5);
					}
					vqfe_vq_kick(vqfe_vq(fe, q), false);
				}
				if (vqfe_wait_any(fe, 10000) < 0)
					_exit(6);
			}
		}
		close(pfd[1]);
		CU_ASSERT_EQUAL(read(pfd[0], &c, 1), 1);
		close(pfd[0]);
		usleep(50000 + 50000 * (unsigned)round);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		CU_ASSERT_FATAL(itest_alive(&d));
		CU_ASSERT(serves(&d, (uint64_t)round + 10));
	}
	if (!itest_is_qsd())
		CU_ASSERT_EQUAL(fds_settle(&d, baseline), baseline);
	STOP(d);
}

/* vqcowd serves one front-end at a time; the next waits in the backlog. */
static void t_one_at_a_time(void)
{
	struct vqfe_opts o;
	struct vqfe_msg_hdr h;
	uint64_t feat = 0;

	START(d, .img_size = 4 * MiB);
	CONNECT(fe1, d, NULL);
	itest_fe_opts(&o);
	o.manual = true;
	CONNECT(fe2, d, &o);
	CU_ASSERT_EQUAL(
	    vqfe_send_msg(fe2, VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, NULL, 0, NULL, 0), 0);
	CU_ASSERT_EQUAL(vqfe_recv_msg(fe2, &h, &feat, sizeof(feat), 300), -ETIMEDOUT);
	/* the first one still works */
	CU_ASSERT_EQUAL(vqfe_flush(fe1, 0), 0);
	vqfe_close(fe1);
	/* now the second one is answered */
	CU_ASSERT_EQUAL(vqfe_recv_msg(fe2, &h, &feat, sizeof(feat), 5000), 8);
	CU_ASSERT_EQUAL(h.request, VHOST_USER_GET_FEATURES);
	CU_ASSERT(feat & (1ull << 32) ? 1 : 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_negotiate(fe2), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_start(fe2), 0);
	CU_ASSERT_EQUAL(vqfe_flush(fe2, 0), 0);
	vqfe_close(fe2);
	STOP(d);
}

/* ---- malformed messages ---- */

enum verdict {
	DROP,         /* the connection must be closed */
	DROP_OR_NACK, /* closed, or a nonzero REPLY_ACK and the connection kept */
};

struct bad_msg {
	const char *what;
	enum verdict v;
	bool setup;       /* negotiate (and set the memory table) first */
	uint32_t request; /* 0: raw bytes in payload */
	uint32_t flags;   /* 0: VERSION | NEED_REPLY */
	uint32_t size;    /* announced size (UINT32_MAX: payload length) */
	uint8_t payload[320];
	uint32_t len; /* bytes of payload actually sent */
	int nfds;     /* eventfds sent along */
};

/* Run one bad message on a fresh connection and judge the back-end's reaction. */
static void bad_message(struct itest_daemon *d, const struct bad_msg *m)
{
	struct vqfe_opts o;
	struct vqfe *fe;
	int fds[8], rc;
	struct vqfe_msg_hdr h;
	uint64_t ack = 0;

	itest_fe_opts(&o);
	o.manual = true;
	fe = itest_connect(d, &o);
	CU_ASSERT_FATAL(fe != NULL);
	if (m->setup) {
		CU_ASSERT_EQUAL_FATAL(vqfe_negotiate(fe), 0);
		CU_ASSERT_EQUAL_FATAL(vqfe_set_mem(fe), 0);
		{
			/* ring 0 has a size: its addresses are checked when given */
			uint32_t st[2] = {0, 128};

			CU_ASSERT_EQUAL_FATAL(vqfe_call(fe, VHOST_USER_SET_VRING_NUM, st,
							sizeof(st), NULL, 0, true, NULL, 0),
					      0);
		}
	}
	for (int i = 0; i < m->nfds; i++)
		fds[i] = eventfd(0, EFD_CLOEXEC);
	if (m->request) {
		uint8_t buf[sizeof(h) + sizeof(m->payload)];

		h.request = m->request;
		h.flags = m->flags ? m->flags : VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK;
		h.size = m->size == UINT32_MAX ? m->len : m->size;
		memcpy(buf, &h, sizeof(h));
		memcpy(buf + sizeof(h), m->payload, m->len);
		rc = vqfe_send_raw(fe, buf, sizeof(h) + m->len, fds, (unsigned)m->nfds);
		if (m->len < h.size) /* a truncated message is known so at EOF only */
			shutdown(vqfe_sock(fe), SHUT_WR);
	} else {
		rc = vqfe_send_raw(fe, m->payload, m->len, fds, (unsigned)m->nfds);
		shutdown(vqfe_sock(fe), SHUT_WR);
	}
	for (int i = 0; i < m->nfds; i++)
		close(fds[i]);
	if (rc == 0 && m->v == DROP_OR_NACK) {
		rc = vqfe_recv_msg(fe, &h, &ack, sizeof(ack), 5000);
		if (rc >= 0) {
			/* an answer: it must be a refusal, and the connection usable */
			if (ack == 0)
				fprintf(stderr, "%s: accepted\n", m->what);
			CU_ASSERT(ack != 0);
			CU_ASSERT(h.flags & VHOST_USER_REPLY_MASK ? 1 : 0);
		} else {
			if (rc != -ECONNRESET)
				fprintf(stderr, "%s: %s\n", m->what, vqfe_strerror(fe));
			CU_ASSERT_EQUAL(rc, -ECONNRESET);
		}
	} else if (rc == 0 && !itest_is_qsd()) {
		rc = vqfe_wait_disconnect(fe, 5000);
		if (rc)
			fprintf(stderr, "%s: connection kept\n", m->what);
		CU_ASSERT_EQUAL(rc, 0);
	} else if (rc == -ECONNRESET) {
		rc = 0;
	}
	vqfe_close(fe);
	CU_ASSERT_FATAL(itest_alive(d));
}

static void put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static struct bad_msg msgs[32];
static unsigned nmsgs;

/* Append a message; returns it for the payload to be filled in. */
static struct bad_msg *msg(const char *what, enum verdict v, uint32_t request, uint32_t flags,
			   uint32_t size, uint32_t len, int nfds)
{
	struct bad_msg *b = &msgs[nmsgs++];

	memset(b, 0, sizeof(*b));
	b->what = what;
	b->v = v;
	/* a NACK needs REPLY_ACK: negotiate (and set a memory table) first */
	b->setup = v == DROP_OR_NACK;
	b->request = request;
	b->flags = flags;
	b->size = size;
	b->len = len;
	b->nfds = nfds;
	return b;
}

static void t_malformed_messages(void)
{
	struct bad_msg *b;
	int baseline;
	START(d, .img_size = 4 * MiB, .num_queues = 2);

	CU_ASSERT(serves(&d, 1));
	baseline = fds_stable(&d);
	nmsgs = 0;
	msg("version 0", DROP, VHOST_USER_GET_FEATURES, 0x8, 0, 0, 0);
	msg("version 2", DROP, VHOST_USER_GET_FEATURES, 0x2, 0, 0, 0);
	msg("reply flag from the front-end", DROP, VHOST_USER_GET_FEATURES, 0x5, 0, 0, 0);
	msg("SET_FEATURES with 4 bytes", DROP, VHOST_USER_SET_FEATURES, 0x1, UINT32_MAX, 4, 0);
	msg("SET_FEATURES with 16 bytes", DROP, VHOST_USER_SET_FEATURES, 0x1, UINT32_MAX, 16, 0);
	msg("announced size 256 MiB", DROP, VHOST_USER_SET_OWNER, 0x1, 256u << 20, 64, 0);
	b = msg("truncated header", DROP, 0, 0, 0, 6, 0);
	b->payload[0] = 1;
	b->payload[4] = 1;
	msg("truncated payload", DROP, VHOST_USER_SET_FEATURES, 0x1, 8, 3, 0);
	b = msg("garbage", DROP, 0, 0, 0, 320, 0);
	itest_fill(b->payload, sizeof(b->payload), 99);
	/* memory table: 9 regions; fewer fds than regions; size mismatch; bad fd */
	b = msg("SET_MEM_TABLE with 9 regions", DROP_OR_NACK, VHOST_USER_SET_MEM_TABLE, 0,
		UINT32_MAX, 8 + 9 * 32, 8);
	put32(b->payload, 9);
	for (int i = 0; i < 9; i++) {
		put64(b->payload + 8 + 32 * i, (uint64_t)i << 20);
		put64(b->payload + 16 + 32 * i, 4096);
		put64(b->payload + 24 + 32 * i, 0x7f0000000000ull + ((uint64_t)i << 20));
	}
	b = msg("SET_MEM_TABLE without fds", DROP_OR_NACK, VHOST_USER_SET_MEM_TABLE, 0, UINT32_MAX,
		8 + 32, 0);
	put32(b->payload, 1);
	put64(b->payload + 16, 4096);
	b = msg("SET_MEM_TABLE size/nregions mismatch", DROP_OR_NACK, VHOST_USER_SET_MEM_TABLE, 0,
		UINT32_MAX, 8 + 32, 1);
	put32(b->payload, 2);
	put64(b->payload + 16, 4096);
	b = msg("SET_MEM_TABLE of 1 TiB on an eventfd", DROP_OR_NACK, VHOST_USER_SET_MEM_TABLE, 0,
		UINT32_MAX, 8 + 32, 1);
	put32(b->payload, 1);
	put64(b->payload + 16, 1ull << 40); /* mmap of an eventfd fails */
	put64(b->payload + 24, 0x7f0000000000ull);
	/* vrings: bad index, bad sizes, addresses outside memory, fds */
	b = msg("SET_VRING_NUM index 200", DROP_OR_NACK, VHOST_USER_SET_VRING_NUM, 0, UINT32_MAX, 8,
		0);
	put32(b->payload, 200);
	put32(b->payload + 4, 128);
	b = msg("SET_VRING_NUM 3", DROP_OR_NACK, VHOST_USER_SET_VRING_NUM, 0, UINT32_MAX, 8, 0);
	put32(b->payload + 4, 3);
	b = msg("SET_VRING_NUM 65536", DROP_OR_NACK, VHOST_USER_SET_VRING_NUM, 0, UINT32_MAX, 8, 0);
	put32(b->payload + 4, 65536);
	b = msg("SET_VRING_ADDR outside memory", DROP_OR_NACK, VHOST_USER_SET_VRING_ADDR, 0,
		UINT32_MAX, 40, 0);
	put64(b->payload + 8, 0x10);
	put64(b->payload + 16, 0x20);
	put64(b->payload + 24, 0x30);
	b = msg("SET_VRING_KICK index 100 with an fd", DROP_OR_NACK, VHOST_USER_SET_VRING_KICK, 0,
		UINT32_MAX, 8, 1);
	put64(b->payload, 100);
	msg("SET_VRING_CALL with 3 fds", DROP_OR_NACK, VHOST_USER_SET_VRING_CALL, 0, UINT32_MAX, 8,
	    3);
	b = msg("SET_VRING_BASE index 64", DROP_OR_NACK, VHOST_USER_SET_VRING_BASE, 0, UINT32_MAX,
		8, 0);
	put32(b->payload, 64);
	b = msg("ADD_MEM_REG without fd", DROP_OR_NACK, VHOST_USER_ADD_MEM_REG, 0, UINT32_MAX, 40,
		0);
	put64(b->payload + 16, 4096);
	b = msg("GET_CONFIG of 8 KiB", DROP_OR_NACK, VHOST_USER_GET_CONFIG, 0, 12 + 8192, 12, 0);
	put32(b->payload + 4, 8192);
	msg("unknown request 999", DROP_OR_NACK, 999, 0, 0, 0, 0);
	msg("SET_OWNER with 2 fds", DROP_OR_NACK, VHOST_USER_SET_OWNER, 0, 0, 0, 2);
	for (unsigned i = 0; i < nmsgs; i++) {
		const struct bad_msg *m = &msgs[i];

		if (itest_is_qsd() && m->v == DROP_OR_NACK)
			continue; /* libvhost-user panics without closing or replying */
		bad_message(&d, m);
		if (!serves(&d, i)) {
			fprintf(stderr, "not serving after '%s'\n", m->what);
			CU_FAIL("daemon does not serve after a malformed message");
		}
	}
	if (!itest_is_qsd())
		CU_ASSERT_EQUAL(fds_settle(&d, baseline), baseline);
	STOP(d);
}

/* ---- hostile descriptors ---- */

enum hostile {
	H_LOOP,
	H_NEXT_OOR,
	H_ADDR_OOR,
	H_LEN_WRAP,
	H_ITABLE_LEN,
	H_ITABLE_NEXT,
	H_NESTED_INDIRECT,
	H_AVAIL_JUMP,
	H_HEAD_OOR,
	H_READ_AFTER_WRITE,
	H_LONG_CHAIN,
	H_ITABLE_OOR,
	H_COUNT,
};

static const char *const hostile_name[H_COUNT] = {
    "descriptor loop",
    "next out of range",
    "address outside memory",
    "length wrapping the address space",
    "indirect table length not a multiple of 16",
    "indirect next beyond the table",
    "nested indirect",
    "avail idx jumps by more than the queue size",
    "avail head out of range",
    "readable after writable",
    "chain longer than any limit (2048 in an indirect table)",
    "indirect table outside memory",
};

static void hostile(struct itest_daemon *d, enum hostile h)
{
	struct vqfe_opts o;
	struct vqfe *fe;
	struct vqfe_vq *vq;
	struct vring_desc *t;
	uint64_t sgpa, hdr_gpa, st_gpa, data_gpa;
	size_t ssize;
	uint16_t id[4];
	struct virtio_blk_outhdr hdr = {htole32(VIRTIO_BLK_T_IN), 0, 0};
	int rc;

	itest_fe_opts(&o);
	o.num_regions = 2;
	o.scratch_size = 2 * MiB;
	fe = itest_connect(d, &o);
	CU_ASSERT_FATAL(fe != NULL);
	vq = vqfe_vq(fe, 0);
	t = vqfe_vq_desc(vq);
	/* one good request first: the ring is started */
	CU_ASSERT_EQUAL(vqfe_flush(fe, 0), 0);
	vqfe_scratch(fe, &sgpa, &ssize);
	hdr_gpa = sgpa;
	st_gpa = sgpa + 64;
	data_gpa = sgpa + 4096;
	CU_ASSERT_EQUAL(vqfe_mem_write(fe, hdr_gpa, &hdr, sizeof(hdr)), 0);
	CU_ASSERT_EQUAL_FATAL(vqfe_vq_get_desc(vq, 3, id), 0);
#define D(i, a, l, f, n)                                                                           \
	do {                                                                                       \
		t[id[i]].addr = htole64(a);                                                        \
		t[id[i]].len = htole32(l);                                                         \
		t[id[i]].flags = htole16(f);                                                       \
		t[id[i]].next = htole16(n);                                                        \
	} while (0)
	switch (h) {
	case H_LOOP:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, id[1]);
		D(1, data_gpa, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, id[2]);
		D(2, st_gpa, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, id[1]);
		vqfe_vq_publish(vq, id[0]);
		break;
	case H_NEXT_OOR:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, vqfe_vq_size(vq) + 5);
		vqfe_vq_publish(vq, id[0]);
		break;
	case H_ADDR_OOR:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, id[1]);
		D(1, 0x7ff000000000ull, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, id[2]);
		D(2, st_gpa, 1, VRING_DESC_F_WRITE, 0);
		vqfe_vq_publish(vq, id[0]);
		break;
	case H_LEN_WRAP:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, id[1]);
		D(1, UINT64_MAX - 255, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, id[2]);
		D(2, st_gpa, 1, VRING_DESC_F_WRITE, 0);
		vqfe_vq_publish(vq, id[0]);
		break;
	case H_ITABLE_LEN:
	case H_ITABLE_NEXT:
	case H_NESTED_INDIRECT:
	case H_LONG_CHAIN:
	case H_ITABLE_OOR: {
		uint64_t tgpa = sgpa + 8192;
		struct vring_desc it[3] = {
		    {htole64(hdr_gpa), htole32(16), htole16(VRING_DESC_F_NEXT), htole16(1)},
		    {htole64(data_gpa), htole32(512),
		     htole16(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE), htole16(2)},
		    {htole64(st_gpa), htole32(1), htole16(VRING_DESC_F_WRITE), 0},
		};
		uint32_t tlen = sizeof(it);

		if (h == H_ITABLE_LEN)
			tlen = 24;
		if (h == H_ITABLE_NEXT)
			it[1].next = htole16(7);
		if (h == H_NESTED_INDIRECT)
			it[1] = (struct vring_desc){
			    htole64(tgpa), htole32(sizeof(it)),
			    htole16(VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT), htole16(2)};
		if (h == H_LONG_CHAIN) {
			/* 2048 entries: header, 2046 x 512 bytes of data, status */
			struct vring_desc e;

			tlen = 2048 * 16;
			for (uint32_t k = 0; k < 2048; k++) {
				if (k == 0)
					e = it[0];
				else if (k == 2047)
					e = it[2];
				else
					e = (struct vring_desc){
					    htole64(sgpa + 65536 + 512ull * (k % 1024)),
					    htole32(512),
					    htole16(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE), 0};
				e.next = htole16((uint16_t)(k + 1));
				if (k == 2047)
					e.next = 0;
				CU_ASSERT_EQUAL(vqfe_mem_write(fe, tgpa + 16ull * k, &e, 16), 0);
			}
		} else {
			CU_ASSERT_EQUAL(vqfe_mem_write(fe, tgpa, it, sizeof(it)), 0);
		}
		if (h == H_ITABLE_OOR)
			tgpa = 0x7ff000000000ull;
		D(0, tgpa, tlen, VRING_DESC_F_INDIRECT, 0);
		vqfe_vq_publish(vq, id[0]);
		break;
	}
	case H_AVAIL_JUMP:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, id[1]);
		D(1, st_gpa, 1, VRING_DESC_F_WRITE, 0);
		vqfe_vq_publish(vq, id[0]);
		vqfe_vq_set_avail_idx(
		    vq, (uint16_t)(le16toh(vqfe_vq_avail(vq)->idx) + vqfe_vq_size(vq) + 1));
		break;
	case H_HEAD_OOR:
		vqfe_vq_publish(vq, (uint16_t)(vqfe_vq_size(vq) + 3));
		break;
	case H_READ_AFTER_WRITE:
		D(0, hdr_gpa, 16, VRING_DESC_F_NEXT, id[1]);
		D(1, st_gpa, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, id[2]);
		D(2, data_gpa, 512, 0, 0);
		vqfe_vq_publish(vq, id[0]);
		break;
	default:
		break;
	}
#undef D
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
	if (!itest_is_qsd()) {
		rc = vqfe_wait_disconnect(fe, 5000);
		if (rc) {
			uint32_t uid, ulen;

			fprintf(stderr, "%s: connection kept", hostile_name[h]);
			if (vqfe_vq_pop_used(vq, &uid, &ulen) == 1)
				fprintf(stderr, " (used id %u len %u)", uid, ulen);
			fprintf(stderr, "\n");
		}
		CU_ASSERT_EQUAL(rc, 0);
	} else {
		usleep(100000);
	}
	vqfe_close(fe);
	CU_ASSERT_FATAL(itest_alive(d));
}

static void t_hostile_descriptors(void)
{
	int baseline;
	START(d, .img_size = 4 * MiB);

	CU_ASSERT(serves(&d, 1));
	baseline = fds_stable(&d);
	for (int h = 0; h < H_COUNT; h++) {
		hostile(&d, (enum hostile)h);
		if (!serves(&d, (uint64_t)h)) {
			fprintf(stderr, "not serving after '%s'\n", hostile_name[h]);
			CU_FAIL("daemon does not serve after hostile descriptors");
		}
	}
	if (!itest_is_qsd())
		CU_ASSERT_EQUAL(fds_settle(&d, baseline), baseline);
	STOP(d);
}

/* ---- fds, signals, resize ---- */

static void t_fd_leak(void)
{
	START(d, .img_size = 8 * MiB, .num_queues = 4);
	struct vqfe_opts o;
	int baseline;

	CU_ASSERT(serves(&d, 1));
	baseline = fds_stable(&d);
	CU_ASSERT(baseline > 0);
	for (unsigned i = 0; i < 16; i++) {
		itest_fe_opts(&o);
		o.num_queues = 1 + i % 4;
		o.num_regions = 1 + i % 3;
		o.separate_fds = i & 1;
		o.add_mem_reg = i & 2;
		o.no_backend_req = i & 4;
		{
			CONNECT(fe, d, &o);
			for (unsigned q = 0; q < o.num_queues; q++)
				CU_ASSERT_EQUAL(vqfe_flush(fe, q), 0);
			/* mid-life: a connection holds more fds than the idle daemon */
			if (i == 0)
				CU_ASSERT(itest_fd_count(&d) > baseline);
			vqfe_close(fe);
		}
	}
	CU_ASSERT_EQUAL(fds_settle(&d, baseline), baseline);
	STOP(d);
}

static void t_sigterm_inflight(void)
{
	enum { N = 32, LEN = 128 * 1024 };
	struct vqfe_opts o;
	static struct vqfe_req req[N];
	static uint8_t w[N * LEN], f[N * LEN];
	unsigned done = 0;
	int rc;

	START(d, .img_size = 16 * MiB, .writethrough = true);
	itest_fe_opts(&o);
	o.slots = N;
	CONNECT(fe, d, &o);
	struct vqfe_vq *vq = vqfe_vq(fe, 0);
	uint16_t *avail_event = (uint16_t *)&vqfe_vq_used(vq)->ring[vqfe_vq_size(vq)];

	CU_ASSERT(vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX));
	itest_fill(w, sizeof(w), 8);
	submit_writes(fe, req, w, N, LEN);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
	/* wait until the daemon has taken all of them (EVENT_IDX: avail_event) */
	for (int i = 0; i < 2000 && le16toh(__atomic_load_n(avail_event, __ATOMIC_ACQUIRE)) != N;
	     i++)
		usleep(1000);
	kill(d.pid, SIGTERM);
	/* every request it took completes before the connection goes away */
	while (done < N) {
		rc = vqfe_reap(fe, 0, NULL, ~0u);
		CU_ASSERT_FATAL(rc >= 0);
		done += (unsigned)rc;
		if (done < N && vqfe_vq_wait(fe, 0, 10000) < 0)
			break;
	}
	done += (unsigned)vqfe_reap(fe, 0, NULL, ~0u);
	CU_ASSERT_EQUAL(done, N);
	for (unsigned i = 0; i < N; i++)
		CU_ASSERT_EQUAL(req[i].status, VIRTIO_BLK_S_OK);
	CU_ASSERT_EQUAL(vqfe_wait_disconnect(fe, 10000), 0);
	CU_ASSERT_EQUAL(itest_signal_wait(&d, 0, 10000), 0);
	CU_ASSERT_EQUAL(itest_pread(&d, f, sizeof(f), 0), 0);
	CU_ASSERT_EQUAL(memcmp(f, w, sizeof(f)), 0);
	vqfe_close(fe);
	itest_stop(&d);
}

static void t_resize_config_change(void)
{
	uint8_t w[4096], r[4096];

	START(d, .img_size = 4 * MiB);
	CONNECT(fe, d, NULL);
	CU_ASSERT_FATAL(vqfe_backend_fd(fe) >= 0);
	CU_ASSERT_EQUAL(vqfe_capacity(fe), 4 * MiB / 512);
	CU_ASSERT_EQUAL(truncate(d.img, 6 * MiB), 0);
	kill(d.pid, SIGHUP);
	CU_ASSERT(vqfe_backend_poll(fe, 5000) >= 1);
	CU_ASSERT_EQUAL(vqfe_config_changes(fe), 1);
	CU_ASSERT_EQUAL(vqfe_refresh_config(fe), 0);
	CU_ASSERT_EQUAL(vqfe_capacity(fe), 6 * MiB / 512);
	itest_fill(w, sizeof(w), 4);
	CU_ASSERT_EQUAL(vqfe_write(fe, 0, 6 * MiB - 4096, w, 4096), 0);
	CU_ASSERT_EQUAL(vqfe_read(fe, 0, 6 * MiB - 4096, r, 4096), 0);
	CU_ASSERT_EQUAL(memcmp(w, r, 4096), 0);
	/* SIGHUP without a size change: no message */
	kill(d.pid, SIGHUP);
	CU_ASSERT_EQUAL(vqfe_backend_poll(fe, 300), 0);
	CU_ASSERT_EQUAL(vqfe_config_changes(fe), 1);
	vqfe_close(fe);
	STOP(d);
}

/*
 * --print-capabilities lists exactly the protocol features a connection is
 * offered (GET_PROTOCOL_FEATURES) and "log-all" exactly when GET_FEATURES
 * offers VHOST_F_LOG_ALL. Names from vhost-user.rst "Protocol features".
 */
static void t_print_capabilities(void)
{
	static const char *const names[] = {
	    "mq",
	    "log-shmfd",
	    "rarp",
	    "reply-ack",
	    "net-mtu",
	    "backend-req",
	    "cross-endian",
	    "crypto-session",
	    "pagefault",
	    "config",
	    "backend-send-fd",
	    "host-notifier",
	    "inflight-shmfd",
	    "reset-device",
	    "inband-notifications",
	    "configure-mem-slots",
	    "status",
	    "xen-mmap",
	    "shared-object",
	    "device-state",
	};
	char cmd[512], out[4096], quoted[64];
	size_t n = 0;
	FILE *p;

	snprintf(cmd, sizeof(cmd), "'%s' --print-capabilities", itest_vqcowd_path());
	p = popen(cmd, "r");
	CU_ASSERT_FATAL(p != NULL);
	while (n < sizeof(out) - 1) {
		size_t k = fread(out + n, 1, sizeof(out) - 1 - n, p);

		if (!k)
			break;
		n += k;
	}
	out[n] = 0;
	CU_ASSERT_EQUAL(pclose(p), 0);
	CU_ASSERT_EQUAL(
	    tu_sh("printf '%%s' '%s' | python3 -c 'import json,sys; json.load(sys.stdin)'", out),
	    0);
	START(d);
	CONNECT(fe, d, NULL);
	for (unsigned b = 0; b < sizeof(names) / sizeof(names[0]); b++) {
		bool offered = (vqfe_dev_protocol_features(fe) >> b) & 1;

		snprintf(quoted, sizeof(quoted), "\"%s\"", names[b]);
		if (offered != (strstr(out, quoted) != NULL)) {
			fprintf(stderr, "protocol feature %s: offered %d, listed %d\n", names[b],
				offered, !offered);
			CU_FAIL("--print-capabilities protocol features");
		}
	}
	CU_ASSERT_EQUAL(vqfe_dev_protocol_features(fe) >> 20, 0); /* no bit we cannot name */
	CU_ASSERT_EQUAL(((vqfe_dev_features(fe) >> 26) & 1) != 0,
			strstr(out, "\"log-all\"") != NULL);
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"inflight-shmfd\""));
	CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"log-shmfd\""));
	vqfe_close(fe);
	STOP(d);
}

static void add_suites(void)
{
	CU_pSuite s =
	    CU_add_suite_with_setup_and_teardown("protocol", NULL, NULL, NULL, itest_teardown);

	CU_add_test(s, "get_vring_base", t_get_vring_base);
	CU_add_test(s, "ring_enable", t_ring_enable);
	CU_add_test(s, "feature_subsets", t_feature_subsets);
	CU_add_test(s, "reconnect", t_reconnect);
	CU_add_test(s, "disconnect_inflight", t_disconnect_inflight);
	/* qemu-storage-daemon 7.2 aborts here at random: "vhost_user_server_ref:
	 * Assertion `!server->wait_idle' failed" (util/vhost-user-server.c) */
	tu_add_test(s, "kill_frontend_mid_io", t_kill_frontend_mid_io,
		    itest_vqcowd_only("qemu-storage-daemon 7.2 aborts (known bug)"));
	CU_add_test(s, "one_at_a_time", t_one_at_a_time);
	CU_add_test(s, "malformed_messages", t_malformed_messages);
	CU_add_test(s, "hostile_descriptors", t_hostile_descriptors);
	CU_add_test(s, "fd_leak", t_fd_leak);
	tu_add_test(s, "sigterm_inflight", t_sigterm_inflight,
		    itest_vqcowd_only("qemu-storage-daemon 7.2 drops in-flight requests on "
				      "SIGTERM"));
	tu_add_test(s, "print_capabilities", t_print_capabilities,
		    itest_vqcowd_only("--print-capabilities of vqcowd"));
	tu_add_test(s, "resize_config_change", t_resize_config_change,
		    itest_vqcowd_only("resize on SIGHUP is vqcowd's own"));
}

int main(int argc, char **argv)
{
	if (!itest_init(argc, argv))
		return 1;
	return itest_run("integration.protocol", add_suites);
}
