/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target: the vhost-user message path of vhost/ as a front-end
 * reaches it. A real vhost_server (public API, vhost.h) listens on an
 * abstract UNIX socket; every input is one connection. The input is a
 * sequence of records (fuzz_vhost_msg.h documents the encoding; mkcorpus.py
 * writes seeds in it): vhost-user messages sent with sendmsg, each with the
 * number and kind of fds the record asks for (memfd guest memory, eventfds, a
 * pipe), raw bytes (messages in pieces), writes to guest memory, and the
 * device completing or holding the elements it popped.
 *
 * A tiny poll() loop plays the glue (ops->watch). Covered this way: the
 * receive state machine and fd collection (server.c), the message table and
 * every handler (msg.c), memory regions (mem.c) and ring setup, kicks and the
 * descriptor walker (vring.c), GET_VRING_BASE drains, disconnects with
 * elements in flight and the reaping of the connection.
 *
 * Checked beyond "no crash, no sanitizer report": every iovec of a popped
 * element lies inside one of the current memory regions; the connection is
 * reaped once the front-end is gone and nothing is in flight; no fd leaks
 * (the process's fd count is back to its baseline after each input).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fuzz_vhost.h"
#include "fuzz_vhost_msg.h"
#include "vhost.h"
#include "vlog.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define die(...)                                                                                   \
	do {                                                                                       \
		fprintf(stderr, "fuzz_vhost_msg: " __VA_ARGS__);                                   \
		fputc('\n', stderr);                                                               \
		abort();                                                                           \
	} while (0)

/* ---- the glue: a poll() loop for ops->watch ---- */

#define MAX_WATCH 64
static struct watch {
	int fd;
	vhost_watch_cb *cb;
	void *arg;
	bool active;
} watches[MAX_WATCH];

static int g_watch(void *opaque, int fd, vhost_watch_cb *cb, void *arg)
{
	for (unsigned i = 0; i < MAX_WATCH; i++) {
		if (watches[i].active && watches[i].fd == fd)
			die("fd %d watched twice", fd);
	}
	for (unsigned i = 0; i < MAX_WATCH; i++) {
		if (!watches[i].active) {
			watches[i] = (struct watch){.fd = fd, .cb = cb, .arg = arg, .active = true};
			return 0;
		}
	}
	return -ENOSPC;
}

static void g_unwatch(void *opaque, int fd)
{
	for (unsigned i = 0; i < MAX_WATCH; i++) {
		if (watches[i].active && watches[i].fd == fd) {
			watches[i].active = false;
			return;
		}
	}
	die("unwatch of fd %d that is not watched", fd);
}

/* Call the callbacks of readable fds until none is (at most @rounds rounds). */
static void run_loop(unsigned rounds)
{
	for (unsigned r = 0; r < rounds; r++) {
		struct pollfd p[MAX_WATCH];
		unsigned idx[MAX_WATCH], n = 0;
		bool any = false;

		for (unsigned i = 0; i < MAX_WATCH; i++) {
			if (!watches[i].active)
				continue;
			p[n] = (struct pollfd){.fd = watches[i].fd, .events = POLLIN};
			idx[n++] = i;
		}
		if (n == 0 || poll(p, n, 0) <= 0)
			return;
		for (unsigned k = 0; k < n; k++) {
			struct watch *w = &watches[idx[k]];

			/* an earlier callback may have unwatched (or replaced) it */
			if (!p[k].revents || !w->active || w->fd != p[k].fd)
				continue;
			any = true;
			w->cb(w->arg);
		}
		if (!any)
			return;
	}
}

/* ---- the device model: holds popped elements until the input completes them ---- */

struct felem {
	struct vq_elem elem;
	uint64_t tag;
};

#define MAX_HELD 2048
static struct held {
	struct vhost_vq *vq;
	struct vq_elem *elem;
} held[MAX_HELD];
static unsigned nheld;

static unsigned g_pops; /* elements popped by this input (shown with FUZZ_LOG) */
static struct vhost_server *g_srv;
static uint8_t *g_mem; /* our mapping of the guest memory memfd */
static int g_memfd = -1;

/* Every iovec must lie inside one region of the current table. */
static void check_elem(struct vhost_vq *vq, const struct vq_elem *e)
{
	struct iovec regs[64];
	unsigned nr = vhost_dev_mem_regions(vq_dev(vq), regs, 64);
	int bad;

	if (nr > 64)
		nr = 64;
	if ((unsigned)e->out_num + e->in_num > VQ_MAX_IOV)
		die("element with %u + %u iovecs", e->out_num, e->in_num);
	bad = fuzz_elem_outside(e, regs, nr, true);
	if (bad >= 0)
		die("iovec %d (%p + %zu) outside every memory region", bad, e->iov[bad].iov_base,
		    e->iov[bad].iov_len);
}

static void push_held(unsigned i, uint32_t len)
{
	vq_push(held[i].vq, held[i].elem, len);
	vq_notify(held[i].vq);
	held[i] = held[--nheld];
}

static void g_kick(void *opaque, struct vhost_vq *vq)
{
	struct vq_elem *e;

	while (vq_pop(vq, &e) == 0) {
		check_elem(vq, e);
		g_pops++;
		if (nheld == MAX_HELD) {
			vq_push(vq, e, 0);
			continue;
		}
		held[nheld++] = (struct held){vq, e};
	}
	vq_notify(vq);
}

/* Pushing after a stop is allowed (and required): nothing to do here. */
static void g_stopped(void *opaque, struct vhost_vq *vq)
{
}

static int g_get_config(void *opaque, uint8_t *buf, uint32_t off, uint32_t len)
{
	if ((uint64_t)off + len > 60)
		return -EINVAL;
	for (uint32_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(off + i);
	return 0;
}

static int g_set_config(void *opaque, const uint8_t *buf, uint32_t off, uint32_t len)
{
	return (uint64_t)off + len > 60 ? -EINVAL : 0;
}

static void g_disconnected(void *opaque, struct vhost_dev *dev)
{
	for (unsigned i = 0; i < nheld; i++) {
		if (vq_dev(held[i].vq) == dev)
			die("disconnected with element %u still held", i);
	}
}

static const struct vhost_dev_ops g_ops = {
    /* virtio-blk-like device bits: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE,
     * MQ, DISCARD, WRITE_ZEROES */
    .features = (1ull << 1) | (1ull << 2) | (1ull << 6) | (1ull << 9) | (1ull << 10) |
		(1ull << 11) | (1ull << 12) | (1ull << 13) | (1ull << 14),
    .num_queues = 2,
    .max_queue_size = 1024,
    .elem_size = sizeof(struct felem),
    .watch = g_watch,
    .unwatch = g_unwatch,
    .get_config = g_get_config,
    .set_config = g_set_config,
    .queue_stopped = g_stopped,
    .queue_kick = g_kick,
    .disconnected = g_disconnected,
};

/* ---- the front-end side ---- */

static struct sockaddr_un g_addr;
static socklen_t g_addrlen;
static int g_devnull = -1;

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		return -1;
	while ((e = readdir(d)))
		n++;
	closedir(d);
	return n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	int lfd;

	fuzz_quiet_logs();
	g_memfd = memfd_create("fuzz-guest", MFD_CLOEXEC);
	if (g_memfd < 0 || ftruncate(g_memfd, FVM_MEM_SIZE) < 0)
		die("memfd: %s", strerror(errno));
	g_mem = mmap(NULL, FVM_MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g_memfd, 0);
	if (g_mem == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	g_devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	/* abstract address: nothing in the file system to clean up */
	g_addr.sun_family = AF_UNIX;
	g_addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
				(size_t)snprintf(g_addr.sun_path + 1, sizeof(g_addr.sun_path) - 1,
						 "vqcow-fuzz-msg-%d", (int)getpid()));
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&g_addr, g_addrlen) < 0 || listen(lfd, 4) < 0)
		die("listen: %s", strerror(errno));
	if (vhost_server_init(&g_srv, NULL, lfd, &g_ops, NULL) < 0)
		die("vhost_server_init failed");
	return 0;
}

/* Read and drop whatever the back-end sent, closing the fds that came with it. */
static void drain_replies(int cfd)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} cbuf;
	char buf[4096];

	for (;;) {
		struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
		struct msghdr mh = {.msg_iov = &iov,
				    .msg_iovlen = 1,
				    .msg_control = cbuf.buf,
				    .msg_controllen = sizeof(cbuf.buf)};
		ssize_t n = recvmsg(cfd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

		if (n <= 0)
			return;
		/* GET_INFLIGHT_FD's reply carries the shared region's fd */
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t i = 0; i < nfd; i++) {
				int fd;

				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
				close(fd);
			}
		}
	}
}

/* An fd of @kind for message @req (owned by the caller). */
static int make_fd(unsigned kind, uint32_t req)
{
	int p[2];

	if (kind == FVM_FD_AUTO)
		kind = req == FVM_SET_MEM_TABLE || req == FVM_ADD_MEM_REG || req == FVM_REM_MEM_REG
			   ? FVM_FD_MEMFD
		       : req == FVM_SET_BACKEND_REQ_FD ? FVM_FD_PIPE
						       : FVM_FD_EVENTFD;
	switch (kind) {
	case FVM_FD_MEMFD:
		return fcntl(g_memfd, F_DUPFD_CLOEXEC, 0);
	case FVM_FD_EVENTFD: {
		/* already signalled: a kick fd fires at once */
		int fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);

		return fd;
	}
	case FVM_FD_PIPE:
		if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
			return -1;
		close(p[1]);
		return p[0];
	default:
		return fcntl(g_devnull, F_DUPFD_CLOEXEC, 0);
	}
}

/* Send @len bytes with @nfds fds attached; false if the socket is full or gone. */
static bool send_with_fds(int cfd, const uint8_t *buf, size_t len, const int *fds, unsigned nfds)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * FVM_MAX_FDS)];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	ssize_t n;

	if (nfds) {
		struct cmsghdr *c;

		memset(&cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	n = sendmsg(cfd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	return n == (ssize_t)len;
}

static int connect_client(void)
{
	int cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (cfd < 0 || connect(cfd, (struct sockaddr *)&g_addr, g_addrlen) < 0)
		die("connect: %s", strerror(errno));
	run_loop(4); /* accept */
	if (!vhost_server_dev(g_srv))
		die("the server did not accept the connection");
	return cfd;
}

/* Close the front-end, complete what is held, and wait until the connection is reaped. */
static void disconnect_client(int cfd)
{
	close(cfd);
	run_loop(8);
	while (nheld)
		push_held(nheld - 1, 0);
	for (unsigned i = 0; i < 100 && vhost_server_dev(g_srv); i++)
		run_loop(8);
	if (vhost_server_dev(g_srv))
		die("connection not reaped after the front-end left with nothing in flight");
}

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t pos = 0;
	bool can_send = true;
	int baseline = count_fds(), n;
	int cfd = connect_client();

	g_pops = 0;
	while (pos < size) {
		uint8_t ctl = data[pos++];

		if (!(ctl & FVM_ACTION)) {
			/* a message: header, payload, fds */
			unsigned nfds = ctl & FVM_NFDS_MASK, kind = (ctl >> 4) & 7;
			int fds[FVM_MAX_FDS];
			size_t len;
			uint32_t req;
			bool ok;

			if (size - pos < 12)
				break;
			req = get_le32(data + pos);
			len = 12 + get_le32(data + pos + 8);
			if (len > size - pos)
				len = size - pos;
			for (unsigned i = 0; i < nfds; i++)
				fds[i] = make_fd(kind, req);
			ok = can_send && send_with_fds(cfd, data + pos, len, fds, nfds);
			for (unsigned i = 0; i < nfds; i++)
				if (fds[i] >= 0)
					close(fds[i]);
			pos += len;
			can_send = ok;
		} else {
			switch (ctl & ~FVM_ACTION) {
			case FVM_A_PUSH_ALL:
				while (nheld)
					push_held(0, 0);
				break;
			case FVM_A_PUSH_ONE:
				if (size - pos < 4) {
					pos = size;
					break;
				}
				if (nheld)
					push_held(0, get_le32(data + pos));
				pos += 4;
				break;
			case FVM_A_GUEST_WRITE: {
				uint32_t off;
				size_t len;

				if (size - pos < 6) {
					pos = size;
					break;
				}
				off = get_le32(data + pos) % FVM_MEM_SIZE;
				len = get_le16(data + pos + 4);
				pos += 6;
				if (len > size - pos)
					len = size - pos;
				if (len > FVM_MEM_SIZE - off)
					len = FVM_MEM_SIZE - off;
				memcpy(g_mem + off, data + pos, len);
				pos += len;
				break;
			}
			case FVM_A_RAW: {
				size_t len;

				if (size - pos < 2) {
					pos = size;
					break;
				}
				len = get_le16(data + pos);
				pos += 2;
				if (len > size - pos)
					len = size - pos;
				can_send = can_send && send_with_fds(cfd, data + pos, len, NULL, 0);
				pos += len;
				break;
			}
			case FVM_A_RECONNECT:
				drain_replies(cfd);
				disconnect_client(cfd);
				cfd = connect_client();
				can_send = true;
				break;
			default:
				break;
			}
		}
		run_loop(16);
		drain_replies(cfd);
	}
	run_loop(16);
	drain_replies(cfd);
	disconnect_client(cfd);
	memset(g_mem, 0, FVM_MEM_SIZE);
	n = count_fds();
	if (n != baseline)
		die("fd leak: %d fds open after the input, %d before", n, baseline);
	if (getenv("FUZZ_LOG"))
		fprintf(stderr, "fuzz_vhost_msg: %u elements popped\n", g_pops);
	return 0;
}
