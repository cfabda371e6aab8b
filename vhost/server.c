/* SPDX-License-Identifier: MIT */
/*
 * vhost/server.c — the listening socket, the connection life cycle, the
 * message receive state machine and the deferred-work eventfd.
 *
 * Receiving: the connection socket is non-blocking and read by a state
 * machine (header, then payload), so a message arriving in pieces is simply
 * resumed on the next readable event and a peer that stops mid-message never
 * blocks us. We never read past the current message (exact lengths), so the
 * SCM_RIGHTS fds that come with a message's bytes are attributed to it.
 *
 * Sending: replies are small and the front-end reads them synchronously; a
 * reply that does not fit into the socket buffer at once (peer not reading)
 * breaks the connection instead of blocking.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "vhost_int.h"

void vhost_close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/*
 * A kick, call, error or log fd from the front-end: vhost-user.rst says an
 * eventfd, an anonymous inode (no file type), and we make it non-blocking.
 * Anything else is refused: a file or device that always polls readable
 * would make a kick poll spin, and a pipe the front-end never drains would
 * block the thread that signals it once full (a call fd: a queue's thread,
 * or the main thread, for good). 0, or -EINVAL with @fd closed.
 */
int vhost_eventfd_take(int fd, const char *what, int idx)
{
	struct stat st;
	int fl;

	if (fstat(fd, &st) < 0 || (st.st_mode & S_IFMT) != 0) {
		if (idx >= 0)
			vhost_warn("vring %d: the %s fd is not an eventfd", idx, what);
		else
			vhost_warn("the %s fd is not an eventfd", what);
		close(fd);
		return -EINVAL;
	}
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
		close(fd);
		return -EINVAL;
	}
	return 0;
}

/* ---- connection ---- */

struct vhost_dev *vhost_dev_new(struct vhost_server *srv, const struct vhost_dev_ops *ops,
				void *opaque, int sock)
{
	struct vhost_dev *dev = calloc(1, sizeof(*dev));
	unsigned nvqs = ops->num_queues;

	if (!dev)
		return NULL;
	/* SET_VRING_KICK/CALL/ERR carry an 8-bit ring index. */
	if (nvqs == 0)
		nvqs = 1;
	if (nvqs > 256)
		nvqs = 256;
	dev->vqs = aligned_alloc(_Alignof(struct vhost_vq), nvqs * sizeof(*dev->vqs));
	if (!dev->vqs) {
		free(dev);
		return NULL;
	}
	memset(dev->vqs, 0, nvqs * sizeof(*dev->vqs));
	dev->nvqs = nvqs;
	for (unsigned i = 0; i < nvqs; i++)
		vhost_vq_init(dev, &dev->vqs[i], i);
	dev->srv = srv;
	dev->ops = ops;
	dev->opaque = opaque;
	dev->sock = sock;
	dev->backend_fd = -1;
	dev->log_fd = -1;
	dev->rx_state = VU_RX_HDR;
	return dev;
}

/* Free everything; the caller made sure nothing is in flight (or never will be pushed). */
void vhost_dev_free(struct vhost_dev *dev)
{
	for (unsigned i = 0; i < dev->nvqs; i++)
		vhost_vq_free(&dev->vqs[i]);
	vhost_inflight_unmap(dev);
	vhost_log_free(dev);
	free(dev->vqs);
	vhost_mem_free(dev);
	if (dev->sock_watched)
		dev->ops->unwatch(dev->opaque, dev->sock);
	vhost_close_fd(&dev->sock);
	vhost_close_fd(&dev->backend_fd);
	vhost_msg_close_fds(&dev->rx);
	free(dev);
}

void vhost_dev_wake(struct vhost_dev *dev)
{
	uint64_t one = 1;

	if (dev->srv && dev->srv->wake_fd >= 0) {
		ssize_t n = write(dev->srv->wake_fd, &one, sizeof(one));

		(void)n; /* EAGAIN: already signalled */
	}
}

static void listen_resume(struct vhost_server *srv);

/* The connection is gone and nothing is in flight: tell the glue, free, listen again. */
static void dev_reap(struct vhost_dev *dev)
{
	struct vhost_server *srv = dev->srv;

	if (dev->ops->disconnected)
		dev->ops->disconnected(dev->opaque, dev);
	vhost_dev_free(dev);
	if (srv) {
		srv->dev = NULL;
		listen_resume(srv);
	}
}

void vhost_dev_enter(struct vhost_dev *dev)
{
	__atomic_fetch_add(&dev->busy, 1, __ATOMIC_ACQ_REL);
}

void vhost_dev_leave(struct vhost_dev *dev)
{
	if (__atomic_sub_fetch(&dev->busy, 1, __ATOMIC_ACQ_REL) == 0 && dev->dead &&
	    DEV_INFLIGHT(dev) == 0 && dev->srv)
		dev_reap(dev);
}

/*
 * Drop the connection: close and unwatch the socket, the ring fds and the
 * backend channel; stop all rings. Memory, rings and slots stay until the
 * in-flight elements have been pushed.
 */
void vhost_dev_kill(struct vhost_dev *dev)
{
	if (dev->dead)
		return;
	dev->dead = true;
	dev->broken = true;
	dev->paused = false;
	if (dev->sock_watched) {
		dev->ops->unwatch(dev->opaque, dev->sock);
		dev->sock_watched = false;
	}
	vhost_close_fd(&dev->sock);
	vhost_close_fd(&dev->backend_fd);
	vhost_close_fd(&dev->log_fd);
	vhost_msg_close_fds(&dev->rx);
	for (unsigned i = 0; i < dev->nvqs; i++) {
		struct vhost_vq *vq = &dev->vqs[i];

		vq->drain_pending = false;
		vq->started = false;
		vhost_vq_update_running(vq);
		vhost_vq_release_fds(vq);
	}
	if (DEV_INFLIGHT(dev) == 0)
		vhost_dev_wake(dev); /* reap at the next safe point */
}

void vhost_dev_set_broken(struct vhost_dev *dev, const char *why)
{
	if (dev->srv && (!pthread_equal(pthread_self(), dev->srv->owner) ||
			 (dev->ops->rings_shared && dev->ops->rings_shared(dev->opaque)))) {
		/* A data thread (vq_pop, a malformed request), or the owner's
		 * own data path while other threads serve rings: the socket
		 * and the watches belong to the owner thread, which drops the
		 * connection from wake_cb (with the others parked). Pops stop
		 * at once. */
		const char *none = NULL;

		__atomic_compare_exchange_n(&dev->remote_broken, &none, why ? why : "broken", false,
					    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
		vhost_dev_wake(dev);
		return;
	}
	if (dev->dead)
		return;
	vhost_warn("dropping the connection: %s", why ? why : "broken");
	vhost_dev_kill(dev);
}

bool vhost_dev_is_broken(const struct vhost_dev *dev)
{
	return dev->broken || __atomic_load_n(&dev->remote_broken, __ATOMIC_ACQUIRE);
}

/*
 * Send one reply: the header, its payload and, when @fd >= 0, that fd
 * (SCM_RIGHTS). 0 or -errno; a failed or short send breaks the connection.
 */
static int send_reply(struct vhost_dev *dev, const struct vu_hdr *hdr, const void *payload, int fd)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov[2] = {
	    {.iov_base = (void *)hdr, .iov_len = sizeof(*hdr)},
	    {.iov_base = (void *)payload, .iov_len = hdr->size},
	};
	struct msghdr mh = {.msg_iov = iov, .msg_iovlen = hdr->size ? 2 : 1};
	ssize_t n;

	if (dev->dead || dev->sock < 0)
		return -ENOTCONN;
	if (fd >= 0) {
		struct cmsghdr *c;

		memset(&cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof(cbuf.buf);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	do {
		n = sendmsg(dev->sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	} while (n < 0 && errno == EINTR);
	if (n != (ssize_t)(sizeof(*hdr) + hdr->size)) {
		vhost_dev_set_broken(dev, n < 0 ? "cannot send a reply" : "short reply write");
		return -EIO;
	}
	return 0;
}

int vhost_dev_send(struct vhost_dev *dev, const struct vu_hdr *hdr, const void *payload)
{
	return send_reply(dev, hdr, payload, -1);
}

/* A reply that carries one fd (GET_INFLIGHT_FD). 0 or -errno (connection broken). */
int vhost_dev_send_fd(struct vhost_dev *dev, const struct vu_hdr *hdr, const void *payload, int fd)
{
	return send_reply(dev, hdr, payload, fd);
}

/* Append the fds of every SCM_RIGHTS message; extra ones are closed. -EPROTO on excess. */
static int rx_collect_fds(struct vhost_dev *dev, struct msghdr *mh)
{
	int ret = 0;

	if (mh->msg_flags & MSG_CTRUNC)
		ret = -EPROTO; /* the kernel dropped (closed) fds that did not fit */
	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		size_t n;
		int *fds;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		fds = (int *)CMSG_DATA(c);
		for (size_t i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, &fds[i], sizeof(fd));
			if (dev->rx.nfds < VU_MAX_FDS) {
				dev->rx.fds[dev->rx.nfds++] = fd;
			} else {
				close(fd);
				ret = -EPROTO;
			}
		}
	}
	return ret;
}

/*
 * Advance the receive state machine. 1: a whole message is in dev->rx;
 * 0: need more bytes; -errno: EOF or protocol error (connection must go).
 */
static int rx_step(struct vhost_dev *dev)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov;
	struct msghdr mh;
	ssize_t n;
	int ret;

	for (;;) {
		if (dev->rx_state == VU_RX_HDR) {
			iov.iov_base = (uint8_t *)&dev->rx.hdr + dev->rx_got;
			iov.iov_len = sizeof(dev->rx.hdr) - dev->rx_got;
		} else {
			iov.iov_base = dev->rx.p.bytes + dev->rx_got;
			iov.iov_len = dev->rx.hdr.size - dev->rx_got;
		}
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof(cbuf.buf);
		n = recvmsg(dev->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		ret = rx_collect_fds(dev, &mh);
		if (ret < 0)
			return ret;
		if (n == 0)
			return -ECONNRESET;
		dev->rx_got += (size_t)n;
		if (dev->rx_state == VU_RX_HDR) {
			if (dev->rx_got < sizeof(dev->rx.hdr))
				continue;
			ret = vhost_msg_validate_hdr(&dev->rx.hdr);
			if (ret < 0)
				return ret;
			dev->rx_got = 0;
			if (dev->rx.hdr.size == 0)
				return 1;
			dev->rx_state = VU_RX_PAYLOAD;
		} else if (dev->rx_got == dev->rx.hdr.size) {
			return 1;
		}
	}
}

static void rx_reset(struct vhost_dev *dev)
{
	dev->rx_state = VU_RX_HDR;
	dev->rx_got = 0;
	dev->rx.nfds = 0;
}

/* Read and dispatch messages until the socket is empty, the connection pauses or dies. */
static void sock_process(struct vhost_dev *dev)
{
	while (!dev->dead && !dev->paused) {
		int ret = rx_step(dev);

		if (ret == 0)
			return;
		if (ret < 0) {
			if (ret == -ECONNRESET && dev->rx_state == VU_RX_HDR && dev->rx_got == 0)
				vhost_info("front-end disconnected");
			else
				vhost_warn("dropping the connection: %s", strerror(-ret));
			vhost_dev_kill(dev);
			return;
		}
		vhost_msg_dispatch(dev, &dev->rx);
		rx_reset(dev);
	}
}

static void sock_cb(void *arg)
{
	struct vhost_dev *dev = arg;

	vhost_dev_enter(dev);
	sock_process(dev);
	vhost_dev_leave(dev); /* may free dev */
}

/*
 * Deferred work at a safe point: send GET_VRING_BASE replies whose ring has
 * drained, then resume reading the socket.
 */
void vhost_dev_process_deferred(struct vhost_dev *dev)
{
	bool waiting = false;

	if (dev->dead)
		return;
	for (unsigned i = 0; i < dev->nvqs && !dev->dead; i++) {
		struct vhost_vq *vq = &dev->vqs[i];
		struct vu_vring_state st;
		struct vu_hdr hdr;

		if (!vq->drain_pending)
			continue;
		if (vq->inflight) {
			waiting = true;
			continue;
		}
		vq->drain_pending = false;
		/* The completions must reach the driver before the ring is handed back. */
		vhost_vq_signal(vq);
		vhost_vq_log_stop(vq);
		st.index = vq->idx;
		st.num = vq->last_avail;
		hdr.request = VU_GET_VRING_BASE;
		hdr.flags = VU_VERSION | VU_FLAG_REPLY;
		hdr.size = sizeof(st);
		vhost_dev_send(dev, &hdr, &st);
	}
	if (dev->reset_pending && !dev->dead) {
		if (DEV_INFLIGHT(dev))
			waiting = true;
		else
			vhost_dev_reset_finish(dev);
	}
	if (dev->dead || waiting || !dev->paused)
		return;
	dev->paused = false;
	if (dev->srv && !dev->sock_watched) {
		if (dev->ops->watch(dev->opaque, dev->sock, sock_cb, dev) < 0) {
			vhost_dev_set_broken(dev, "cannot watch the socket");
			return;
		}
		dev->sock_watched = true;
	}
	/* Messages may already be waiting: the watch may only report new ones. */
	if (dev->sock >= 0)
		sock_process(dev);
}

/* Stop reading the socket until the drain completes (GET_VRING_BASE). */
void vhost_dev_pause(struct vhost_dev *dev)
{
	dev->paused = true;
	if (dev->sock_watched) {
		dev->ops->unwatch(dev->opaque, dev->sock);
		dev->sock_watched = false;
	}
}

/* ---- server ---- */

static void listen_cb(void *arg);

static void listen_pause(struct vhost_server *srv)
{
	if (srv->listen_watched) {
		srv->ops->unwatch(srv->opaque, srv->listen_fd);
		srv->listen_watched = false;
	}
}

static void listen_resume(struct vhost_server *srv)
{
	if (srv->listen_watched || !srv->accepting || srv->dev || srv->listen_fd < 0)
		return;
	if (srv->ops->watch(srv->opaque, srv->listen_fd, listen_cb, srv) < 0) {
		vhost_err("cannot watch the listening socket");
		return;
	}
	srv->listen_watched = true;
}

static void listen_cb(void *arg)
{
	struct vhost_server *srv = arg;
	struct vhost_dev *dev;
	int fd;

	if (srv->dev || !srv->accepting) {
		listen_pause(srv);
		return;
	}
	fd = accept4(srv->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
		    errno != ECONNABORTED)
			vhost_err("accept: %s", strerror(errno));
		return;
	}
	dev = vhost_dev_new(srv, srv->ops, srv->opaque, fd);
	if (!dev) {
		close(fd);
		return;
	}
	if (srv->ops->watch(srv->opaque, fd, sock_cb, dev) < 0) {
		vhost_err("cannot watch the connection");
		vhost_dev_free(dev);
		return;
	}
	dev->sock_watched = true;
	srv->dev = dev;
	listen_pause(srv);
	vhost_info("front-end connected");
}

static void wake_cb(void *arg)
{
	struct vhost_server *srv = arg;
	struct vhost_dev *dev = srv->dev;
	uint64_t v;
	ssize_t n = read(srv->wake_fd, &v, sizeof(v));

	(void)n;
	if (!dev)
		return;
	vhost_dev_enter(dev);
	if (__atomic_load_n(&dev->remote_broken, __ATOMIC_ACQUIRE))
		vhost_dev_set_broken(
		    dev, __atomic_exchange_n(&dev->remote_broken, NULL, __ATOMIC_ACQ_REL));
	if (DEV_INFLIGHT(dev) == 0)
		vhost_mem_release_retired(dev);
	vhost_dev_process_deferred(dev);
	vhost_dev_leave(dev); /* reaps a dead, drained connection */
}

/* Create the listening socket at @path (util_unix_listen), naming the path
 * in what we log. */
static int listen_unix(struct vhost_server *srv, const char *path)
{
	int ret = util_unix_listen(path, &srv->sock);

	if (ret == -EEXIST)
		vhost_err("%s exists and is not a socket", path);
	else if (ret < 0 && ret != -EADDRINUSE) /* the caller names EADDRINUSE */
		vhost_warn("%s: cannot listen: %s", path, strerror(-ret));
	else if (ret >= 0 && srv->sock.replaced_stale)
		vhost_info("%s: replaced a stale socket (nobody listened on it)", path);
	return ret;
}

/* Unlink the server's socket file if it is still the one we bound. */
static void unlink_own_socket(const struct vhost_server *srv)
{
	if (util_unix_unlink_own(srv->path, &srv->sock) == -ESTALE)
		vhost_warn("%s is no longer our socket; leaving it in place", srv->path);
}

int vhost_server_init(struct vhost_server **srvp, const char *path, int listen_fd,
		      const struct vhost_dev_ops *ops, void *opaque)
{
	struct vhost_server *srv;
	int ret;

	if (!ops || !ops->watch || !ops->unwatch || !ops->queue_kick || (listen_fd < 0 && !path))
		return -EINVAL;
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	srv->ops = ops;
	srv->opaque = opaque;
	srv->listen_fd = -1;
	srv->owner = pthread_self();
	srv->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (srv->wake_fd < 0) {
		ret = -errno;
		goto free_srv;
	}
	if (listen_fd >= 0) {
		ret = util_adopt_listener(listen_fd);
		if (ret < 0) {
			if (ret == -ENOTCONN)
				vhost_err("fd %d is not a listening stream socket", listen_fd);
			ret = ret == -ENOTCONN ? -EINVAL : ret;
			goto close_wake;
		}
		srv->listen_fd = listen_fd;
	} else {
		srv->path = strdup(path);
		if (!srv->path) {
			ret = -ENOMEM;
			goto close_wake;
		}
		ret = listen_unix(srv, path);
		if (ret < 0)
			goto free_path;
		srv->listen_fd = ret;
	}
	ret = ops->watch(opaque, srv->wake_fd, wake_cb, srv);
	if (ret < 0)
		goto close_listen;
	srv->wake_watched = true;
	srv->accepting = true;
	listen_resume(srv);
	if (!srv->listen_watched) {
		ret = -EIO;
		goto unwatch_wake;
	}
	*srvp = srv;
	return 0;

unwatch_wake:
	ops->unwatch(opaque, srv->wake_fd);
close_listen:
	if (srv->path) {
		unlink_own_socket(srv);
		close(srv->listen_fd);
	}
free_path:
	free(srv->path);
close_wake:
	close(srv->wake_fd);
free_srv:
	free(srv);
	return ret;
}

void vhost_server_exit(struct vhost_server *srv)
{
	if (!srv)
		return;
	if (srv->dev) {
		struct vhost_dev *dev = srv->dev;

		vhost_dev_kill(dev);
		if (DEV_INFLIGHT(dev))
			vhost_warn("exiting with %u request(s) still in flight", DEV_INFLIGHT(dev));
		dev->srv = NULL;
		srv->dev = NULL;
		if (dev->ops->disconnected)
			dev->ops->disconnected(dev->opaque, dev);
		vhost_dev_free(dev);
	}
	srv->accepting = false;
	listen_pause(srv);
	vhost_close_fd(&srv->listen_fd);
	if (srv->path)
		unlink_own_socket(srv);
	if (srv->wake_watched)
		srv->ops->unwatch(srv->opaque, srv->wake_fd);
	vhost_close_fd(&srv->wake_fd);
	free(srv->path);
	free(srv);
}

struct vhost_dev *vhost_server_dev(struct vhost_server *srv)
{
	return srv->dev;
}

void vhost_server_stop_accepting(struct vhost_server *srv)
{
	srv->accepting = false;
	listen_pause(srv);
}

/* ---- device accessors ---- */

uint64_t vhost_dev_features(const struct vhost_dev *dev)
{
	return dev->features;
}

bool vhost_dev_has_feature(const struct vhost_dev *dev, unsigned bit)
{
	return bit < 64 && ((dev->features >> bit) & 1);
}

uint16_t vhost_dev_num_queues(const struct vhost_dev *dev)
{
	return (uint16_t)dev->nvqs;
}

struct vhost_vq *vhost_dev_vq(struct vhost_dev *dev, unsigned idx)
{
	return idx < dev->nvqs ? &dev->vqs[idx] : NULL;
}

unsigned vhost_dev_inflight(const struct vhost_dev *dev)
{
	return DEV_INFLIGHT(dev);
}

int vhost_dev_config_changed(struct vhost_dev *dev)
{
	struct vu_hdr hdr = {
	    .request = VU_BACKEND_CONFIG_CHANGE_MSG,
	    .flags = VU_VERSION,
	    .size = 0,
	};
	ssize_t n;

	if (dev->dead)
		return -ENOTCONN;
	if (!((dev->proto_features >> VU_PROTO_F_BACKEND_REQ) & 1) || dev->backend_fd < 0)
		return -EOPNOTSUPP;
	do {
		n = send(dev->backend_fd, &hdr, sizeof(hdr), MSG_NOSIGNAL | MSG_DONTWAIT);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == (ssize_t)sizeof(hdr) ? 0 : -EIO;
}
