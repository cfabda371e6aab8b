/* SPDX-License-Identifier: MIT */
/*
 * vqfe — vhost-user-blk test front-end. See vqfe.h for the model.
 *
 * Written from QEMU docs/interop/vhost-user.rst (message formats, set-up
 * order, REPLY_ACK, backend channel) and the virtio 1.2 specification
 * (2.7 split virtqueues, 5.2 block device).
 */
#include "vqfe.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE        4096u
#define GUARD       (64u * 1024)
#define SLOT_PREFIX (2 * PAGE)
#define SLOT_SUFFIX PAGE
/* Slot prefix: indirect table in the first page, small buffers in the second. */
#define SLOT_ITABLE  0u
#define SLOT_HDR     (PAGE + 0u)
#define SLOT_HDR_A   (PAGE + 64u)
#define SLOT_HDR_B   (PAGE + 256u)
#define SLOT_STATUS  (PAGE + 512u)
#define SLOT_HDR_MRG (SLOT_PREFIX - 16u)
#define MAX_CHAIN    (PAGE / sizeof(struct vring_desc)) /* 256 */
#define HDR_SPLIT_A  7u

/* Our feature wish list (virtio 1.2 5.2.3 and 6). */
#define WANT_FEATURES                                                                              \
	((1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX) |                        \
	 (1ull << VIRTIO_BLK_F_GEOMETRY) | (1ull << VIRTIO_BLK_F_RO) |                             \
	 (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_FLUSH) |                          \
	 (1ull << VIRTIO_BLK_F_TOPOLOGY) | (1ull << VIRTIO_BLK_F_CONFIG_WCE) |                     \
	 (1ull << VIRTIO_BLK_F_MQ) | (1ull << VIRTIO_BLK_F_DISCARD) |                              \
	 (1ull << VIRTIO_BLK_F_WRITE_ZEROES) | (1ull << VIRTIO_RING_F_INDIRECT_DESC) |             \
	 (1ull << VIRTIO_RING_F_EVENT_IDX) | (1ull << 32 /* VIRTIO_F_VERSION_1 */))
#define F_VERSION_1 32

struct region {
	uint64_t gpa;
	uint64_t size;
	uint64_t off; /* mmap offset in fd */
	int fd;       /* memfd (shared between regions unless separate_fds) */
	uint8_t *va;
};

struct slot {
	uint64_t base; /* prefix start (gpa) */
	uint64_t data; /* data buffer (gpa, page aligned) */
	uint64_t status_gpa;
	uint64_t data_gpa; /* data actually used by the request */
	struct vqfe_req *req;
};

struct vqfe_vq {
	struct vqfe *fe;
	unsigned idx;
	uint16_t num;
	uint64_t desc_gpa, avail_gpa, used_gpa;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t *used_event;  /* avail->ring[num], written by us */
	uint16_t *avail_event; /* after used->ring[num], written by the device */
	uint16_t avail_idx;    /* shadow of avail->idx */
	bool hold;             /* publish fills the ring only; vqfe_vq_hold(false) stores idx */
	uint16_t kicked_idx;   /* avail_idx at the last kick decision */
	uint16_t last_used;
	uint16_t free_head;
	unsigned num_free;
	uint16_t *next;      /* shadow descriptor links (free list and chains) */
	uint16_t *chain_len; /* per head */
	struct slot **head_slot;
	struct slot *slots;
	unsigned nslots;
	unsigned *free_slots;
	unsigned nfree_slots;
	unsigned inflight;
	int kick_fd;
	int call_fd;
	uint64_t kicks;
	uint64_t calls;
	bool setup;
	char err[256]; /* the last error of this queue's operations (vqfe_vq_strerror) */
};

struct vqfe {
	struct vqfe_opts o;
	int sock;
	int backend; /* our end of the backend channel, -1 if none */
	bool disconnected;
	uint64_t dev_features, features;
	uint64_t dev_proto, proto;
	uint64_t queue_num, max_mem_slots;
	unsigned config_changes;
	unsigned proto_errors;
	struct virtio_blk_config cfg;
	unsigned nregions;
	struct region reg[VQFE_MAX_REGIONS];
	uint8_t *va_base;
	size_t va_len;
	uint64_t scratch_gpa;
	size_t scratch_size;
	struct vqfe_vq vq[VQFE_MAX_QUEUES];
	/* INFLIGHT_SHMFD: the region the back-end gave us (kept across reconnects) */
	int inflight_fd;
	void *inflight_map;
	uint64_t inflight_size;
	bool keep_fd; /* recv_exact: keep the first fd received in got_fd */
	int got_fd;
	bool threaded; /* vqfe_set_threaded: each queue on its own thread */
	char err[256];
};

/* ---- small helpers ---- */

__attribute__((format(printf, 3, 4))) static int seterr(struct vqfe *fe, int rc, const char *fmt,
							...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(fe->err, sizeof(fe->err), fmt, ap);
	va_end(ap);
	return rc;
}

/*
 * An error of an operation on queue @vq: its text goes to vq->err and,
 * unless the queues run on their own threads (vqfe_set_threaded), to fe->err
 * as every other error, so that single-threaded users keep vqfe_strerror.
 */
__attribute__((format(printf, 4, 5))) static int qerr(struct vqfe *fe, struct vqfe_vq *vq, int rc,
						      const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(vq->err, sizeof(vq->err), fmt, ap);
	va_end(ap);
	if (!fe->threaded)
		snprintf(fe->err, sizeof(fe->err), "%s", vq->err);
	return rc;
}

/* The connection's end, seen by the queues' threads too (vqfe_set_threaded). */
static void set_gone(struct vqfe *fe, bool gone)
{
	__atomic_store_n(&fe->disconnected, gone, __ATOMIC_RELAXED);
}

static bool is_gone(const struct vqfe *fe)
{
	return __atomic_load_n(&fe->disconnected, __ATOMIC_RELAXED);
}

uint64_t vqfe_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

static bool is_pow2(unsigned v)
{
	return v && !(v & (v - 1));
}

void vqfe_opts_init(struct vqfe_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->num_queues = 1;
	o->queue_size = 128;
	o->data_size = 128 * 1024;
	o->scratch_size = 1024 * 1024;
	o->num_regions = 1;
	o->timeout_ms = 10000;
	o->config_len = VQFE_BLK_CONFIG_LEN;
}

/* Error text of the last failed vqfe_open (its struct is gone by then). */
static __thread char open_err[256];

const char *vqfe_strerror(const struct vqfe *fe)
{
	if (!fe)
		return open_err[0] ? open_err : "no error";
	return fe->err[0] ? fe->err : "no error";
}

const char *vqfe_vq_strerror(const struct vqfe_vq *vq)
{
	return vq->err[0] ? vq->err : "no error";
}

void vqfe_set_threaded(struct vqfe *fe, bool on)
{
	fe->threaded = on;
}

int vqfe_sock(const struct vqfe *fe)
{
	return fe->sock;
}

int vqfe_backend_fd(const struct vqfe *fe)
{
	return fe->backend;
}

uint64_t vqfe_features(const struct vqfe *fe)
{
	return fe->features;
}

uint64_t vqfe_dev_features(const struct vqfe *fe)
{
	return fe->dev_features;
}

uint64_t vqfe_protocol_features(const struct vqfe *fe)
{
	return fe->proto;
}

uint64_t vqfe_dev_protocol_features(const struct vqfe *fe)
{
	return fe->dev_proto;
}

uint64_t vqfe_queue_num(const struct vqfe *fe)
{
	return fe->queue_num;
}

uint64_t vqfe_max_mem_slots(const struct vqfe *fe)
{
	return fe->max_mem_slots;
}

bool vqfe_has_feature(const struct vqfe *fe, unsigned bit)
{
	return bit < 64 && (fe->features >> bit) & 1;
}

const struct virtio_blk_config *vqfe_config(const struct vqfe *fe)
{
	return &fe->cfg;
}

uint64_t vqfe_capacity(const struct vqfe *fe)
{
	return le64toh(fe->cfg.capacity);
}

const struct vqfe_opts *vqfe_get_opts(const struct vqfe *fe)
{
	return &fe->o;
}

unsigned vqfe_config_changes(const struct vqfe *fe)
{
	return fe->config_changes;
}

bool vqfe_is_disconnected(const struct vqfe *fe)
{
	return is_gone(fe);
}

/* ---- guest memory ---- */

static struct region *find_region(const struct vqfe *fe, uint64_t gpa)
{
	for (unsigned i = 0; i < fe->nregions; i++) {
		const struct region *r = &fe->reg[i];

		if (gpa >= r->gpa && gpa - r->gpa < r->size)
			return (struct region *)r;
	}
	return NULL;
}

void *vqfe_gpa(const struct vqfe *fe, uint64_t gpa, size_t len)
{
	struct region *r = find_region(fe, gpa);

	if (!r || len > r->size - (gpa - r->gpa))
		return NULL;
	return r->va + (gpa - r->gpa);
}

uint64_t vqfe_uaddr(const struct vqfe *fe, uint64_t gpa)
{
	struct region *r = find_region(fe, gpa);

	return r ? (uint64_t)(uintptr_t)(r->va + (gpa - r->gpa)) : 0;
}

static int mem_copy(const struct vqfe *fe, uint64_t gpa, void *buf, size_t len, bool to_guest)
{
	uint8_t *p = buf;

	while (len) {
		struct region *r = find_region(fe, gpa);
		size_t n;

		if (!r)
			return -EFAULT;
		n = r->size - (gpa - r->gpa);
		if (n > len)
			n = len;
		if (to_guest)
			memcpy(r->va + (gpa - r->gpa), p, n);
		else
			memcpy(p, r->va + (gpa - r->gpa), n);
		p += n;
		gpa += n;
		len -= n;
	}
	return 0;
}

int vqfe_mem_write(struct vqfe *fe, uint64_t gpa, const void *buf, size_t len)
{
	return mem_copy(fe, gpa, (void *)buf, len, true);
}

int vqfe_mem_read(const struct vqfe *fe, uint64_t gpa, void *buf, size_t len)
{
	return mem_copy(fe, gpa, buf, len, false);
}

void vqfe_scratch(const struct vqfe *fe, uint64_t *gpa, size_t *size)
{
	*gpa = fe->scratch_gpa;
	*size = fe->scratch_size;
}

int vqfe_region(const struct vqfe *fe, unsigned i, uint64_t *gpa, uint64_t *size)
{
	if (i >= fe->nregions)
		return -EINVAL;
	*gpa = fe->reg[i].gpa;
	*size = fe->reg[i].size;
	return 0;
}

/* Planned placement: (region, offset). */
struct place {
	unsigned r;
	uint64_t off;
};

static struct place plan_alloc(uint64_t *used, unsigned r, uint64_t size)
{
	struct place p = {r, align_up(used[r], PAGE)};

	used[r] = p.off + size;
	return p;
}

static uint64_t place_gpa(const struct vqfe *fe, struct place p)
{
	return fe->reg[p.r].gpa + p.off;
}

/*
 * Lay out rings, slots and scratch over the regions, create the memfd(s)
 * and map every region at its own address with guard gaps between them.
 */
static int mem_create(struct vqfe *fe)
{
	const struct vqfe_opts *o = &fe->o;
	unsigned n = o->num_regions, k = 0;
	uint64_t used[VQFE_MAX_REGIONS] = {0};
	struct place rings[VQFE_MAX_QUEUES][3];
	struct place *slotp = NULL, scr_a = {0, 0}, scr_b = {0, 0};
	size_t slot_size = SLOT_PREFIX + align_up(o->data_size, PAGE) + SLOT_SUFFIX;
	size_t half = align_up(o->scratch_size / 2, PAGE);
	bool split_scratch = n >= 2 && o->gpa_hole == 0;
	uint64_t total = 0, gpa = 0;
	int rc;

	fe->nregions = n;
	slotp = calloc((size_t)o->num_queues * o->slots, sizeof(*slotp));
	if (!slotp)
		return seterr(fe, -ENOMEM, "out of memory");
	for (unsigned q = 0; q < o->num_queues; q++) {
		rings[q][0] = plan_alloc(used, 0, 16ull * o->queue_size);
		rings[q][1] = plan_alloc(used, 0, 6ull + 2ull * o->queue_size);
		rings[q][2] = plan_alloc(used, 0, 6ull + 8ull * o->queue_size);
	}
	for (unsigned q = 0; q < o->num_queues; q++)
		for (unsigned s = 0; s < o->slots; s++)
			slotp[q * o->slots + s] = plan_alloc(used, k++ % n, slot_size);
	if (split_scratch) {
		scr_a = plan_alloc(used, 0, half);
		/* region 1 must start with the second half: shift its slots */
		for (unsigned i = 0; i < o->num_queues * o->slots; i++)
			if (slotp[i].r == 1)
				slotp[i].off += half;
		used[1] += half;
		scr_b = (struct place){1, 0};
	} else {
		scr_a = plan_alloc(used, 0, 2 * half);
	}
	for (unsigned i = 0; i < n; i++) {
		struct region *r = &fe->reg[i];

		r->size = align_up(used[i] ? used[i] : PAGE, PAGE);
		r->gpa = gpa;
		r->off = o->separate_fds ? 0 : total;
		r->fd = -1;
		gpa += r->size + o->gpa_hole;
		total += r->size;
	}
	/* map: one PROT_NONE reservation, regions MAP_FIXED inside with guards */
	fe->va_len = total + (size_t)(n + 1) * GUARD;
	fe->va_base =
	    mmap(NULL, fe->va_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (fe->va_base == MAP_FAILED) {
		fe->va_base = NULL;
		rc = seterr(fe, -errno, "mmap reserve: %s", strerror(errno));
		goto err_free_plan;
	}
	{
		uint8_t *p = fe->va_base + GUARD;
		int shared_fd = -1;

		for (unsigned i = 0; i < n; i++) {
			struct region *r = &fe->reg[i];

			if (o->separate_fds || i == 0) {
				int fd = memfd_create("vqfe-guest", MFD_CLOEXEC);

				if (fd < 0) {
					rc =
					    seterr(fe, -errno, "memfd_create: %s", strerror(errno));
					goto err_free_plan;
				}
				if (ftruncate(fd, (off_t)(o->separate_fds ? r->size : total)) < 0) {
					rc = seterr(fe, -errno, "ftruncate: %s", strerror(errno));
					close(fd);
					goto err_free_plan;
				}
				shared_fd = fd;
				r->fd = fd;
			} else {
				r->fd = shared_fd;
			}
			r->va = mmap(p, r->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
				     r->fd, (off_t)r->off);
			if (r->va == MAP_FAILED) {
				r->va = NULL;
				rc = seterr(fe, -errno, "mmap region %u: %s", i, strerror(errno));
				goto err_free_plan;
			}
			p += r->size + GUARD;
		}
	}
	fe->scratch_gpa = place_gpa(fe, scr_a);
	fe->scratch_size = 2 * half;
	(void)scr_b;
	for (unsigned q = 0; q < o->num_queues; q++) {
		struct vqfe_vq *vq = &fe->vq[q];

		vq->desc_gpa = place_gpa(fe, rings[q][0]);
		vq->avail_gpa = place_gpa(fe, rings[q][1]);
		vq->used_gpa = place_gpa(fe, rings[q][2]);
		for (unsigned s = 0; s < o->slots; s++) {
			struct slot *sl = &vq->slots[s];

			sl->base = place_gpa(fe, slotp[q * o->slots + s]);
			sl->data = sl->base + SLOT_PREFIX;
		}
	}
	free(slotp);
	return 0;

err_free_plan:
	free(slotp);
	return rc;
}

static void mem_destroy(struct vqfe *fe)
{
	int last_fd = -1;

	for (unsigned i = 0; i < fe->nregions; i++) {
		if (fe->reg[i].fd >= 0 && fe->reg[i].fd != last_fd) {
			close(fe->reg[i].fd);
			last_fd = fe->reg[i].fd;
		}
		fe->reg[i].fd = -1;
	}
	if (fe->va_base)
		munmap(fe->va_base, fe->va_len);
	fe->va_base = NULL;
}

/* ---- messages ---- */

static int send_all(struct vqfe *fe, int sock, const void *buf, size_t len, const int *fds,
		    unsigned nfds)
{
	const uint8_t *p = buf;
	union {
		char buf[CMSG_SPACE(sizeof(int) * VQFE_MAX_FDS)];
		struct cmsghdr align;
	} u;

	if (nfds > VQFE_MAX_FDS)
		return seterr(fe, -EINVAL, "too many fds");
	while (len || nfds) {
		struct iovec iov = {(void *)p, len};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
		ssize_t n;

		if (nfds) {
			struct cmsghdr *c;

			memset(&u, 0, sizeof(u));
			mh.msg_control = u.buf;
			mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
			c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
			memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
		}
		n = sendmsg(sock, &mh, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EPIPE || errno == ECONNRESET) {
				set_gone(fe, true);
				return seterr(fe, -ECONNRESET, "send: peer closed the connection");
			}
			return seterr(fe, -errno, "send: %s", strerror(errno));
		}
		nfds = 0;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int vqfe_send_raw(struct vqfe *fe, const void *buf, size_t len, const int *fds, unsigned nfds)
{
	return send_all(fe, fe->sock, buf, len, fds, nfds);
}

int vqfe_send_msg(struct vqfe *fe, uint32_t request, uint32_t flags, const void *payload,
		  uint32_t size, const int *fds, unsigned nfds)
{
	uint8_t buf[sizeof(struct vqfe_msg_hdr) + VQFE_MAX_PAYLOAD];
	struct vqfe_msg_hdr h = {request, flags, size};

	if (size > VQFE_MAX_PAYLOAD)
		return seterr(fe, -EINVAL, "payload too big");
	memcpy(buf, &h, sizeof(h));
	if (size)
		memcpy(buf + sizeof(h), payload, size);
	return send_all(fe, fe->sock, buf, sizeof(h) + size, fds, nfds);
}

static int wait_readable(int fd, int timeout_ms)
{
	struct pollfd p = {fd, POLLIN, 0};
	int rc;

	do
		rc = poll(&p, 1, timeout_ms);
	while (rc < 0 && errno == EINTR);
	if (rc < 0)
		return -errno;
	return rc ? 0 : -ETIMEDOUT;
}

/* Read exactly @len bytes (closing any fds that come along). */
static int recv_exact(struct vqfe *fe, int sock, void *buf, size_t len, int timeout_ms)
{
	uint8_t *p = buf;

	while (len) {
		union {
			char buf[CMSG_SPACE(sizeof(int) * VQFE_MAX_FDS)];
			struct cmsghdr align;
		} u;
		struct iovec iov = {p, len};
		struct msghdr mh = {.msg_iov = &iov,
				    .msg_iovlen = 1,
				    .msg_control = u.buf,
				    .msg_controllen = sizeof(u.buf)};
		ssize_t n;
		int rc = wait_readable(sock, timeout_ms);

		if (rc == -ETIMEDOUT)
			return seterr(fe, rc, "timed out waiting for the back-end");
		if (rc < 0)
			return seterr(fe, rc, "poll: %s", strerror(-rc));
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			if (errno == ECONNRESET) {
				if (sock == fe->sock)
					set_gone(fe, true);
				return seterr(fe, -ECONNRESET, "connection reset by the back-end");
			}
			return seterr(fe, -errno, "recv: %s", strerror(errno));
		}
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				size_t nf = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				int fds[VQFE_MAX_FDS];

				memcpy(fds, CMSG_DATA(c), nf * sizeof(int));
				for (size_t i = 0; i < nf && i < VQFE_MAX_FDS; i++) {
					if (fe->keep_fd && fe->got_fd < 0)
						fe->got_fd = fds[i];
					else
						close(fds[i]);
				}
			}
		}
		if (n == 0) {
			if (sock == fe->sock)
				set_gone(fe, true);
			return seterr(fe, -ECONNRESET, "the back-end closed the connection");
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int recv_msg_on(struct vqfe *fe, int sock, struct vqfe_msg_hdr *hdr, void *payload,
		       uint32_t max, int timeout_ms)
{
	uint8_t discard[256];
	uint32_t left, got;
	int rc;

	rc = recv_exact(fe, sock, hdr, sizeof(*hdr), timeout_ms);
	if (rc < 0)
		return rc;
	got = hdr->size < max ? hdr->size : max;
	if (hdr->size > 1u << 20)
		return seterr(fe, -EPROTO, "message %u announces %u payload bytes", hdr->request,
			      hdr->size);
	rc = recv_exact(fe, sock, payload, got, timeout_ms);
	if (rc < 0)
		return rc;
	for (left = hdr->size - got; left;) {
		uint32_t n = left < sizeof(discard) ? left : (uint32_t)sizeof(discard);

		rc = recv_exact(fe, sock, discard, n, timeout_ms);
		if (rc < 0)
			return rc;
		left -= n;
	}
	return (int)got;
}

int vqfe_recv_msg(struct vqfe *fe, struct vqfe_msg_hdr *hdr, void *payload, uint32_t max,
		  int timeout_ms)
{
	return recv_msg_on(fe, fe->sock, hdr, payload, max, timeout_ms);
}

static bool has_reply(uint32_t request)
{
	switch (request) {
	case VHOST_USER_GET_FEATURES:
	case VHOST_USER_GET_PROTOCOL_FEATURES:
	case VHOST_USER_GET_VRING_BASE:
	case VHOST_USER_GET_QUEUE_NUM:
	case VHOST_USER_GET_CONFIG:
	case VHOST_USER_GET_MAX_MEM_SLOTS:
	case VHOST_USER_GET_INFLIGHT_FD:
		return true;
	default:
		return false;
	}
}

static bool reply_ack_on(const struct vqfe *fe)
{
	return (fe->proto >> VHOST_USER_PROTOCOL_F_REPLY_ACK) & 1;
}

int vqfe_call(struct vqfe *fe, uint32_t request, const void *payload, uint32_t size, const int *fds,
	      unsigned nfds, bool ack, void *reply, uint32_t reply_max)
{
	bool want_reply = has_reply(request);
	bool want_ack = !want_reply && ack && reply_ack_on(fe);
	uint32_t flags = VHOST_USER_VERSION | (want_ack ? VHOST_USER_NEED_REPLY_MASK : 0);
	struct vqfe_msg_hdr h;
	uint64_t ackval = 0;
	int rc;

	rc = vqfe_send_msg(fe, request, flags, payload, size, fds, nfds);
	if (rc < 0)
		return rc;
	if (!want_reply && !want_ack)
		return 0;
	rc = vqfe_recv_msg(fe, &h, want_ack ? (void *)&ackval : reply,
			   want_ack ? (uint32_t)sizeof(ackval) : reply_max, fe->o.timeout_ms);
	if (rc < 0)
		return rc;
	if (h.request != request)
		return seterr(fe, -EPROTO, "reply to %u has request %u", request, h.request);
	if ((h.flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION ||
	    !(h.flags & VHOST_USER_REPLY_MASK))
		return seterr(fe, -EPROTO, "reply to %u has flags %#x", request, h.flags);
	if (want_ack) {
		if (h.size != sizeof(uint64_t))
			return seterr(fe, -EPROTO, "ack of %u has size %u", request, h.size);
		if (ackval)
			return seterr(fe, -EIO, "back-end refused message %u (ack %llu)", request,
				      (unsigned long long)ackval);
		return 0;
	}
	return rc;
}

int vqfe_call_u64(struct vqfe *fe, uint32_t request, uint64_t *val)
{
	int rc = vqfe_call(fe, request, NULL, 0, NULL, 0, false, val, sizeof(*val));

	if (rc >= 0 && rc != (int)sizeof(*val))
		return seterr(fe, -EPROTO, "reply to %u has %d bytes, not 8", request, rc);
	return rc < 0 ? rc : 0;
}

static int call_u64_arg(struct vqfe *fe, uint32_t request, uint64_t val, const int *fds,
			unsigned nfds)
{
	int rc = vqfe_call(fe, request, &val, sizeof(val), fds, nfds, true, NULL, 0);

	return rc < 0 ? rc : 0;
}

static int call_state(struct vqfe *fe, uint32_t request, uint32_t index, uint32_t num)
{
	uint32_t st[2] = {index, num};
	int rc = vqfe_call(fe, request, st, sizeof(st), NULL, 0, true, NULL, 0);

	return rc < 0 ? rc : 0;
}

int vqfe_wait_disconnect(struct vqfe *fe, int timeout_ms)
{
	uint64_t deadline = vqfe_now_ns() + (uint64_t)timeout_ms * 1000000ull;

	if (is_gone(fe))
		return 0;
	for (;;) {
		uint8_t buf[512];
		int64_t left = (int64_t)(deadline - vqfe_now_ns());
		ssize_t n;
		int rc;

		if (left <= 0)
			return seterr(fe, -ETIMEDOUT, "the back-end kept the connection open");
		rc = wait_readable(fe->sock, (int)(left / 1000000) + 1);
		if (rc == -ETIMEDOUT)
			continue;
		if (rc < 0)
			return rc;
		n = recv(fe->sock, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno == ECONNRESET)) {
			set_gone(fe, true);
			return 0;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return seterr(fe, -errno, "recv: %s", strerror(errno));
	}
}

int vqfe_backend_poll(struct vqfe *fe, int timeout_ms)
{
	int handled = 0;

	if (fe->backend < 0)
		return seterr(fe, -ENOTCONN, "no backend channel");
	for (;;) {
		struct vqfe_msg_hdr h;
		uint8_t payload[256];
		int rc = wait_readable(fe->backend, handled ? 0 : timeout_ms);

		if (rc == -ETIMEDOUT)
			return handled;
		if (rc < 0)
			return rc;
		rc = recv_msg_on(fe, fe->backend, &h, payload, sizeof(payload), 1000);
		if (rc < 0)
			return rc;
		if (h.request == VHOST_USER_BACKEND_CONFIG_CHANGE_MSG)
			fe->config_changes++;
		if (h.flags & VHOST_USER_NEED_REPLY_MASK) {
			uint8_t buf[sizeof(struct vqfe_msg_hdr) + 8] = {0};
			struct vqfe_msg_hdr rh = {h.request,
						  VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 8};

			memcpy(buf, &rh, sizeof(rh));
			/* payload u64 0: success */
			rc = send_all(fe, fe->backend, buf, sizeof(buf), NULL, 0);
			if (rc < 0)
				return rc;
		}
		handled++;
	}
}

/* ---- set-up ---- */

int vqfe_negotiate(struct vqfe *fe)
{
	const struct vqfe_opts *o = &fe->o;
	uint64_t want, acked;
	int rc;

	rc = vqfe_call_u64(fe, VHOST_USER_GET_FEATURES, &fe->dev_features);
	if (rc < 0)
		return rc;
	if (!((fe->dev_features >> F_VERSION_1) & 1))
		return seterr(fe, -ENOTSUP, "back-end does not offer VIRTIO_F_VERSION_1");
	if ((fe->dev_features >> VHOST_USER_F_PROTOCOL_FEATURES) & 1) {
		rc = vqfe_call_u64(fe, VHOST_USER_GET_PROTOCOL_FEATURES, &fe->dev_proto);
		if (rc < 0)
			return rc;
		want = (1ull << VHOST_USER_PROTOCOL_F_CONFIG) |
		       (1ull << VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS);
		if (o->inflight)
			want |= 1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD;
		if (!o->no_mq)
			want |= 1ull << VHOST_USER_PROTOCOL_F_MQ;
		if (!o->no_reply_ack)
			want |= 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK;
		if (!o->no_backend_req)
			want |= 1ull << VHOST_USER_PROTOCOL_F_BACKEND_REQ;
		acked = fe->dev_proto & want;
		/* not acknowledged itself: REPLY_ACK is not in force yet */
		rc = vqfe_send_msg(fe, VHOST_USER_SET_PROTOCOL_FEATURES, VHOST_USER_VERSION, &acked,
				   sizeof(acked), NULL, 0);
		if (rc < 0)
			return rc;
		fe->proto = acked;
	}
	if ((fe->proto >> VHOST_USER_PROTOCOL_F_MQ) & 1) {
		rc = vqfe_call_u64(fe, VHOST_USER_GET_QUEUE_NUM, &fe->queue_num);
		if (rc < 0)
			return rc;
		if (o->num_queues > fe->queue_num)
			return seterr(fe, -EINVAL, "back-end has %llu queues, %u wanted",
				      (unsigned long long)fe->queue_num, o->num_queues);
	}
	if ((fe->proto >> VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS) & 1) {
		rc = vqfe_call_u64(fe, VHOST_USER_GET_MAX_MEM_SLOTS, &fe->max_mem_slots);
		if (rc < 0)
			return rc;
		if (fe->max_mem_slots < fe->nregions)
			return seterr(fe, -EINVAL, "back-end has %llu memory slots, %u needed",
				      (unsigned long long)fe->max_mem_slots, fe->nregions);
	}
	if ((fe->proto >> VHOST_USER_PROTOCOL_F_BACKEND_REQ) & 1) {
		int sv[2];

		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
			return seterr(fe, -errno, "socketpair: %s", strerror(errno));
		rc =
		    vqfe_call(fe, VHOST_USER_SET_BACKEND_REQ_FD, NULL, 0, &sv[1], 1, true, NULL, 0);
		close(sv[1]);
		if (rc < 0) {
			close(sv[0]);
			return rc;
		}
		fe->backend = sv[0];
	}
	rc = vqfe_call(fe, VHOST_USER_SET_OWNER, NULL, 0, NULL, 0, true, NULL, 0);
	if (rc < 0)
		return rc;
	if ((fe->proto >> VHOST_USER_PROTOCOL_F_CONFIG) & 1) {
		rc = vqfe_refresh_config(fe);
		if (rc < 0)
			return rc;
	}
	fe->features = fe->dev_features & (WANT_FEATURES & ~o->features_clear);
	if (o->no_event_idx)
		fe->features &= ~(1ull << VIRTIO_RING_F_EVENT_IDX);
	if (o->no_indirect)
		fe->features &= ~(1ull << VIRTIO_RING_F_INDIRECT_DESC);
	if (fe->dev_features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES))
		fe->features |= 1ull << VHOST_USER_F_PROTOCOL_FEATURES;
	rc = call_u64_arg(fe, VHOST_USER_SET_FEATURES, fe->features, NULL, 0);
	if (rc < 0)
		return rc;
	return 0;
}

int vqfe_get_config(struct vqfe *fe, void *buf, uint32_t off, uint32_t len)
{
	uint8_t msg[sizeof(struct vqfe_config_hdr) + 256] = {0};
	struct vqfe_config_hdr ch = {off, len, 0};
	int rc;

	if (len > 256)
		return seterr(fe, -EINVAL, "config length %u too big", len);
	memcpy(msg, &ch, sizeof(ch));
	rc = vqfe_call(fe, VHOST_USER_GET_CONFIG, msg, (uint32_t)sizeof(ch) + len, NULL, 0, false,
		       msg, sizeof(msg));
	if (rc < 0)
		return rc;
	if (rc != (int)(sizeof(ch) + len))
		return seterr(fe, -EIO, "GET_CONFIG(%u, %u) answered with %d bytes", off, len, rc);
	memcpy(&ch, msg, sizeof(ch));
	if (ch.size != len || ch.offset != off)
		return seterr(fe, -EPROTO, "GET_CONFIG reply for (%u, %u)", ch.offset, ch.size);
	memcpy(buf, msg + sizeof(ch), len);
	return 0;
}

int vqfe_set_config(struct vqfe *fe, const void *buf, uint32_t off, uint32_t len)
{
	uint8_t msg[sizeof(struct vqfe_config_hdr) + 256] = {0};
	struct vqfe_config_hdr ch = {off, len, 0};
	int rc;

	if (len > 256)
		return seterr(fe, -EINVAL, "config length %u too big", len);
	memcpy(msg, &ch, sizeof(ch));
	memcpy(msg + sizeof(ch), buf, len);
	rc = vqfe_call(fe, VHOST_USER_SET_CONFIG, msg, (uint32_t)sizeof(ch) + len, NULL, 0, true,
		       NULL, 0);
	return rc < 0 ? rc : 0;
}

int vqfe_refresh_config(struct vqfe *fe)
{
	uint8_t buf[256] = {0};
	uint32_t len = fe->o.config_len;
	int rc;

	if (len > sizeof(buf))
		len = sizeof(buf);
	rc = vqfe_get_config(fe, buf, 0, len);
	if (rc < 0)
		return rc;
	memset(&fe->cfg, 0, sizeof(fe->cfg));
	memcpy(&fe->cfg, buf, len < sizeof(fe->cfg) ? len : sizeof(fe->cfg));
	return 0;
}

int vqfe_set_mem(struct vqfe *fe)
{
	int rc;

	if (fe->o.add_mem_reg) {
		if (!((fe->proto >> VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS) & 1))
			return seterr(fe, -ENOTSUP, "CONFIGURE_MEM_SLOTS not negotiated");
		for (unsigned i = 0; i < fe->nregions; i++) {
			struct region *r = &fe->reg[i];
			struct {
				uint64_t padding;
				struct vqfe_mem_region reg;
			} m = {0, {r->gpa, r->size, (uint64_t)(uintptr_t)r->va, r->off}};

			rc = vqfe_call(fe, VHOST_USER_ADD_MEM_REG, &m, sizeof(m), &r->fd, 1, true,
				       NULL, 0);
			if (rc < 0)
				return rc;
		}
		return 0;
	}
	{
		struct {
			uint32_t nregions;
			uint32_t padding;
			struct vqfe_mem_region reg[VQFE_MAX_REGIONS];
		} m;
		int fds[VQFE_MAX_REGIONS];

		memset(&m, 0, sizeof(m));
		m.nregions = fe->nregions;
		for (unsigned i = 0; i < fe->nregions; i++) {
			struct region *r = &fe->reg[i];

			m.reg[i] = (struct vqfe_mem_region){r->gpa, r->size,
							    (uint64_t)(uintptr_t)r->va, r->off};
			fds[i] = r->fd;
		}
		rc = vqfe_call(fe, VHOST_USER_SET_MEM_TABLE, &m,
			       (uint32_t)(8 + fe->nregions * sizeof(struct vqfe_mem_region)), fds,
			       fe->nregions, true, NULL, 0);
	}
	return rc < 0 ? rc : 0;
}

static int vq_send_rings(struct vqfe *fe, struct vqfe_vq *vq, uint32_t base)
{
	struct {
		uint32_t index, flags;
		uint64_t desc, used, avail, log;
	} a = {vq->idx,
	       0,
	       vqfe_uaddr(fe, vq->desc_gpa),
	       vqfe_uaddr(fe, vq->used_gpa),
	       vqfe_uaddr(fe, vq->avail_gpa),
	       0};
	int rc;

	_Static_assert(sizeof(a) == 40, "vring address payload is 40 bytes");
	rc = call_state(fe, VHOST_USER_SET_VRING_NUM, vq->idx, vq->num);
	if (rc < 0)
		return rc;
	rc = call_state(fe, VHOST_USER_SET_VRING_BASE, vq->idx, base);
	if (rc < 0)
		return rc;
	rc = vqfe_call(fe, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0, true, NULL, 0);
	if (rc < 0)
		return rc;
	rc = call_u64_arg(fe, VHOST_USER_SET_VRING_KICK, vq->idx, &vq->kick_fd, 1);
	if (rc < 0)
		return rc;
	rc = call_u64_arg(fe, VHOST_USER_SET_VRING_CALL, vq->idx, &vq->call_fd, 1);
	if (rc < 0)
		return rc;
	if (!fe->o.no_enable && (fe->features >> VHOST_USER_F_PROTOCOL_FEATURES) & 1) {
		rc = vqfe_vq_enable(fe, vq->idx, true);
		if (rc < 0)
			return rc;
	}
	vq->setup = true;
	return 0;
}

int vqfe_vq_enable(struct vqfe *fe, unsigned q, bool on)
{
	return call_state(fe, VHOST_USER_SET_VRING_ENABLE, q, on ? 1 : 0);
}

int vqfe_vq_setup(struct vqfe *fe, unsigned q)
{
	struct vqfe_vq *vq;

	if (q >= fe->o.num_queues)
		return seterr(fe, -EINVAL, "queue %u not configured", q);
	vq = &fe->vq[q];
	if (fe->o.poll && !vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX))
		vq->avail->flags = htole16(VRING_AVAIL_F_NO_INTERRUPT);
	return vq_send_rings(fe, vq, vq->avail_idx);
}

/*
 * INFLIGHT_SHMFD (vhost-user.rst "Inflight I/O tracking"), as QEMU does it
 * before the memory table and the rings: the first time, GET_INFLIGHT_FD
 * for our queues and keep the region; every time (after a reconnect too),
 * SET_INFLIGHT_FD with that same region.
 */
static int inflight_setup(struct vqfe *fe)
{
	struct {
		uint64_t mmap_size, mmap_offset;
		uint16_t num_queues, queue_size;
		uint32_t pad;
	} m = {0, 0, (uint16_t)fe->o.num_queues, (uint16_t)fe->o.queue_size, 0};
	int rc;

	_Static_assert(sizeof(m) == 24, "inflight description is 24 bytes");
	if (!((fe->proto >> VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) & 1))
		return 0;
	if (fe->inflight_fd < 0) {
		fe->keep_fd = true;
		fe->got_fd = -1;
		rc = vqfe_call(fe, VHOST_USER_GET_INFLIGHT_FD, &m, sizeof(m), NULL, 0, false, &m,
			       sizeof(m));
		fe->keep_fd = false;
		if (rc >= 0 && (rc != (int)sizeof(m) || fe->got_fd < 0 || !m.mmap_size))
			rc =
			    seterr(fe, -EPROTO, "GET_INFLIGHT_FD reply: %d bytes, fd %d, size %llu",
				   rc, fe->got_fd, (unsigned long long)m.mmap_size);
		if (rc < 0) {
			if (fe->got_fd >= 0)
				close(fe->got_fd);
			return rc;
		}
		fe->inflight_map = mmap(NULL, m.mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
					fe->got_fd, (off_t)m.mmap_offset);
		if (fe->inflight_map == MAP_FAILED) {
			fe->inflight_map = NULL;
			close(fe->got_fd);
			return seterr(fe, -errno, "mmap inflight region: %s", strerror(errno));
		}
		fe->inflight_fd = fe->got_fd;
		fe->inflight_size = m.mmap_size;
		/* the region is ours now: offset 0 from here on */
		if (m.mmap_offset) {
			munmap(fe->inflight_map, m.mmap_size);
			fe->inflight_map = NULL;
			return seterr(fe, -ENOTSUP, "inflight region at offset %llu",
				      (unsigned long long)m.mmap_offset);
		}
	}
	m.mmap_size = fe->inflight_size;
	m.mmap_offset = 0;
	m.num_queues = (uint16_t)fe->o.num_queues;
	m.queue_size = (uint16_t)fe->o.queue_size;
	rc = vqfe_call(fe, VHOST_USER_SET_INFLIGHT_FD, &m, sizeof(m), &fe->inflight_fd, 1, true,
		       NULL, 0);
	return rc < 0 ? rc : 0;
}

void *vqfe_inflight_region(const struct vqfe *fe, uint64_t *size)
{
	if (size)
		*size = fe->inflight_size;
	return fe->inflight_map;
}

int vqfe_reconnect(struct vqfe *fe, const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int rc;

	if (fe->sock >= 0)
		close(fe->sock);
	if (fe->backend >= 0)
		close(fe->backend);
	fe->sock = fe->backend = -1;
	set_gone(fe, false);
	fe->proto = fe->dev_proto = 0;
	if (strlen(path) >= sizeof(sa.sun_path))
		return seterr(fe, -ENAMETOOLONG, "socket path too long");
	strcpy(sa.sun_path, path);
	fe->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fe->sock < 0)
		return seterr(fe, -errno, "socket: %s", strerror(errno));
	if (connect(fe->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return seterr(fe, -errno, "connect %s: %s", path, strerror(errno));
	rc = vqfe_negotiate(fe);
	if (rc < 0)
		return rc;
	rc = inflight_setup(fe);
	if (rc == 0)
		rc = vqfe_set_mem(fe);
	/* as QEMU after a back-end death: the rings restart at the used index */
	for (unsigned q = 0; rc == 0 && q < fe->o.num_queues; q++)
		rc = vq_send_rings(fe, &fe->vq[q], le16toh(fe->vq[q].used->idx));
	return rc;
}

int vqfe_start(struct vqfe *fe)
{
	int rc = inflight_setup(fe);

	if (rc == 0)
		rc = vqfe_set_mem(fe);

	for (unsigned q = 0; rc == 0 && q < fe->o.num_queues; q++)
		rc = vqfe_vq_setup(fe, q);
	return rc;
}

int vqfe_vq_stop(struct vqfe *fe, unsigned q, uint32_t *base)
{
	uint32_t st[2] = {q, 0}, rep[2] = {0, 0};
	int rc;

	rc = vqfe_call(fe, VHOST_USER_GET_VRING_BASE, st, sizeof(st), NULL, 0, false, rep,
		       sizeof(rep));
	if (rc < 0)
		return rc;
	if (rc != (int)sizeof(rep))
		return seterr(fe, -EPROTO, "GET_VRING_BASE reply has %d bytes", rc);
	if (rep[0] != q)
		return seterr(fe, -EPROTO, "GET_VRING_BASE reply for ring %u, not %u", rep[0], q);
	*base = rep[1];
	if (q < fe->o.num_queues)
		fe->vq[q].setup = false;
	return 0;
}

int vqfe_vq_restart(struct vqfe *fe, unsigned q, uint32_t base)
{
	if (q >= fe->o.num_queues)
		return seterr(fe, -EINVAL, "queue %u not configured", q);
	return vq_send_rings(fe, &fe->vq[q], base);
}

/* ---- virtqueues ---- */

static void vq_free(struct vqfe_vq *vq)
{
	free(vq->next);
	free(vq->chain_len);
	free(vq->head_slot);
	free(vq->slots);
	free(vq->free_slots);
	if (vq->kick_fd >= 0)
		close(vq->kick_fd);
	if (vq->call_fd >= 0)
		close(vq->call_fd);
	vq->kick_fd = vq->call_fd = -1;
}

static int vq_alloc(struct vqfe *fe, unsigned q)
{
	struct vqfe_vq *vq = &fe->vq[q];
	unsigned num = fe->o.queue_size, ns = fe->o.slots;

	vq->fe = fe;
	vq->idx = q;
	vq->num = (uint16_t)num;
	vq->kick_fd = vq->call_fd = -1;
	vq->next = calloc(num, sizeof(*vq->next));
	vq->chain_len = calloc(num, sizeof(*vq->chain_len));
	vq->head_slot = calloc(num, sizeof(*vq->head_slot));
	vq->slots = calloc(ns, sizeof(*vq->slots));
	vq->free_slots = calloc(ns, sizeof(*vq->free_slots));
	if (!vq->next || !vq->chain_len || !vq->head_slot || !vq->slots || !vq->free_slots)
		return seterr(fe, -ENOMEM, "out of memory");
	vq->nslots = ns;
	vq->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	vq->call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (vq->kick_fd < 0 || vq->call_fd < 0)
		return seterr(fe, -errno, "eventfd: %s", strerror(errno));
	return 0;
}

/* After mem_create: bind ring pointers and initialise the free lists. */
static void vq_bind(struct vqfe *fe, unsigned q)
{
	struct vqfe_vq *vq = &fe->vq[q];

	vq->desc = vqfe_gpa(fe, vq->desc_gpa, 16u * vq->num);
	vq->avail = vqfe_gpa(fe, vq->avail_gpa, 6u + 2u * vq->num);
	vq->used = vqfe_gpa(fe, vq->used_gpa, 6u + 8u * vq->num);
	vq->used_event = &vq->avail->ring[vq->num];
	vq->avail_event = (uint16_t *)&vq->used->ring[vq->num];
	for (unsigned i = 0; i < vq->num; i++)
		vq->next[i] = (uint16_t)(i + 1 < vq->num ? i + 1 : 0);
	/* as after a migration: both indices at ring_base, SET_VRING_BASE says so */
	vq->avail_idx = vq->kicked_idx = vq->last_used = fe->o.ring_base;
	vq->avail->idx = htole16(fe->o.ring_base);
	vq->used->idx = htole16(fe->o.ring_base);
	/* the event indices too, or the first kick would be suppressed */
	*vq->avail_event = htole16(fe->o.ring_base);
	*vq->used_event = htole16(fe->o.ring_base);
	vq->free_head = 0;
	vq->num_free = vq->num;
	for (unsigned s = 0; s < vq->nslots; s++)
		vq->free_slots[s] = vq->nslots - 1 - s;
	vq->nfree_slots = vq->nslots;
}

struct vqfe_vq *vqfe_vq(struct vqfe *fe, unsigned q)
{
	return q < fe->o.num_queues ? &fe->vq[q] : NULL;
}

unsigned vqfe_num_queues(const struct vqfe *fe)
{
	return fe->o.num_queues;
}

struct vring_desc *vqfe_vq_desc(struct vqfe_vq *vq)
{
	return vq->desc;
}

struct vring_avail *vqfe_vq_avail(struct vqfe_vq *vq)
{
	return vq->avail;
}

struct vring_used *vqfe_vq_used(struct vqfe_vq *vq)
{
	return vq->used;
}

uint16_t vqfe_vq_size(const struct vqfe_vq *vq)
{
	return vq->num;
}

void vqfe_vq_addrs(const struct vqfe_vq *vq, uint64_t *desc, uint64_t *avail, uint64_t *used)
{
	*desc = vq->desc_gpa;
	*avail = vq->avail_gpa;
	*used = vq->used_gpa;
}

unsigned vqfe_vq_inflight(const struct vqfe_vq *vq)
{
	return vq->inflight;
}

uint64_t vqfe_vq_kicks(const struct vqfe_vq *vq)
{
	return vq->kicks;
}

int vqfe_vq_get_desc(struct vqfe_vq *vq, unsigned n, uint16_t *ids)
{
	if (n > vq->num_free)
		return -EAGAIN;
	for (unsigned i = 0; i < n; i++) {
		ids[i] = vq->free_head;
		vq->free_head = vq->next[vq->free_head];
	}
	vq->num_free -= n;
	return 0;
}

void vqfe_vq_put_desc(struct vqfe_vq *vq, unsigned n, const uint16_t *ids)
{
	for (unsigned i = 0; i < n; i++) {
		vq->next[ids[i]] = vq->free_head;
		vq->free_head = ids[i];
	}
	vq->num_free += n;
}

void vqfe_vq_publish(struct vqfe_vq *vq, uint16_t head)
{
	vq->avail->ring[vq->avail_idx & (vq->num - 1)] = htole16(head);
	vq->avail_idx++;
	/* virtio 2.7.13: the ring entry must be visible before the index */
	if (!vq->hold)
		__atomic_store_n(&vq->avail->idx, htole16(vq->avail_idx), __ATOMIC_RELEASE);
}

void vqfe_vq_hold(struct vqfe_vq *vq, bool hold)
{
	vq->hold = hold;
	if (!hold)
		__atomic_store_n(&vq->avail->idx, htole16(vq->avail_idx), __ATOMIC_RELEASE);
}

void vqfe_vq_set_avail_idx(struct vqfe_vq *vq, uint16_t idx)
{
	vq->avail_idx = idx;
	__atomic_store_n(&vq->avail->idx, htole16(idx), __ATOMIC_RELEASE);
}

int vqfe_vq_kick(struct vqfe_vq *vq, bool force)
{
	uint16_t new_idx = vq->avail_idx, old = vq->kicked_idx;
	uint64_t one = 1;
	bool need;

	/* the avail->idx store must be visible before we read the device's
	 * suppression state (virtio 2.7.13.4, "memory barrier") */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (force)
		need = true;
	else if (new_idx == old)
		need = false;
	else if (vqfe_has_feature(vq->fe, VIRTIO_RING_F_EVENT_IDX))
		need = vring_need_event(le16toh(__atomic_load_n(vq->avail_event, __ATOMIC_RELAXED)),
					new_idx, old);
	else
		need = !(le16toh(__atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED)) &
			 VRING_USED_F_NO_NOTIFY);
	vq->kicked_idx = new_idx;
	if (!need)
		return 0;
	if (write(vq->kick_fd, &one, sizeof(one)) != sizeof(one))
		return qerr(vq->fe, vq, -errno, "kick: %s", strerror(errno));
	vq->kicks++;
	return 0;
}

int vqfe_vq_pop_used(struct vqfe_vq *vq, uint32_t *id, uint32_t *len)
{
	uint16_t idx = le16toh(__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE));
	struct vring_used_elem *e;

	if (idx == vq->last_used)
		return 0;
	e = &vq->used->ring[vq->last_used & (vq->num - 1)];
	*id = le32toh(e->id);
	*len = le32toh(e->len);
	vq->last_used++;
	if (vqfe_has_feature(vq->fe, VIRTIO_RING_F_EVENT_IDX) && !vq->fe->o.poll)
		__atomic_store_n(vq->used_event, htole16(vq->last_used), __ATOMIC_RELAXED);
	return 1;
}

static bool used_pending(struct vqfe_vq *vq)
{
	return le16toh(__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE)) != vq->last_used;
}

static void drain_call(struct vqfe_vq *vq)
{
	uint64_t v;

	if (read(vq->call_fd, &v, sizeof(v)) == sizeof(v))
		vq->calls += v;
}

uint64_t vqfe_vq_calls(struct vqfe *fe, unsigned q)
{
	drain_call(&fe->vq[q]);
	return fe->vq[q].calls;
}

/*
 * Has the socket been closed by the peer? (non-blocking check) With the
 * queues on their own threads it looks for the hang-up only, never at the
 * data: the socket's messages are the set-up thread's.
 */
static bool sock_gone(struct vqfe *fe)
{
	struct pollfd p = {fe->sock, fe->threaded ? POLLRDHUP : POLLIN | POLLRDHUP, 0};
	char c;

	if (is_gone(fe))
		return true;
	if (poll(&p, 1, 0) <= 0)
		return false;
	if (p.revents & (POLLHUP | POLLRDHUP | POLLERR)) {
		set_gone(fe, true);
		return true;
	}
	if (p.revents & POLLIN) {
		ssize_t n = recv(fe->sock, &c, 1, MSG_PEEK | MSG_DONTWAIT);

		if (n == 0 || (n < 0 && errno == ECONNRESET)) {
			set_gone(fe, true);
			return true;
		}
	}
	return false;
}

/*
 * Wait until a queue in @mask has used elements (see vqfe_wait_any). Errors
 * are the first queue's (qerr). With the queues on their own threads, the
 * socket is watched for a hang-up only and the backend channel not at all:
 * both belong to the set-up thread then.
 */
static int wait_queues(struct vqfe *fe, uint64_t mask, int timeout_ms)
{
	uint64_t deadline = vqfe_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	struct pollfd p[VQFE_MAX_QUEUES + 2];
	unsigned qs[VQFE_MAX_QUEUES];
	unsigned nq = 0, spins = 0;
	struct vqfe_vq *vq0;

	for (unsigned q = 0; q < fe->o.num_queues; q++)
		if ((mask >> q) & 1)
			qs[nq++] = q;
	if (!nq)
		return seterr(fe, -EINVAL, "no queue to wait on");
	vq0 = &fe->vq[qs[0]];
	for (;;) {
		int64_t left;
		int n = 0, rc;

		for (unsigned i = 0; i < nq; i++) {
			struct vqfe_vq *vq = &fe->vq[qs[i]];

			if (vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX) && !fe->o.poll) {
				__atomic_store_n(vq->used_event, htole16(vq->last_used),
						 __ATOMIC_RELAXED);
				/* used_event store before re-reading used->idx */
				__atomic_thread_fence(__ATOMIC_SEQ_CST);
			}
			if (used_pending(vq))
				return 0;
		}
		if (fe->o.poll) {
			if ((++spins & 0x3ff) == 0) {
				if (sock_gone(fe))
					return qerr(fe, vq0, -ECONNRESET,
						    "the back-end closed the connection");
				if ((int64_t)(deadline - vqfe_now_ns()) <= 0)
					return qerr(fe, vq0, -ETIMEDOUT,
						    "no completion within %d ms", timeout_ms);
			}
#if defined(__x86_64__) || defined(__i386__)
			__builtin_ia32_pause();
#endif
			continue;
		}
		left = (int64_t)(deadline - vqfe_now_ns());
		if (left <= 0)
			return qerr(fe, vq0, -ETIMEDOUT,
				    "no completion within %d ms (queue %u: avail %u, used %u, "
				    "reaped %u, in flight %u, kicks %llu, calls %llu)",
				    timeout_ms, qs[0], vq0->avail_idx, le16toh(vq0->used->idx),
				    vq0->last_used, vq0->inflight, (unsigned long long)vq0->kicks,
				    (unsigned long long)vq0->calls);
		for (unsigned i = 0; i < nq; i++)
			p[n++] = (struct pollfd){fe->vq[qs[i]].call_fd, POLLIN, 0};
		p[n++] =
		    (struct pollfd){fe->sock, fe->threaded ? POLLRDHUP : POLLIN | POLLRDHUP, 0};
		if (!fe->threaded && fe->backend >= 0)
			p[n++] = (struct pollfd){fe->backend, POLLIN, 0};
		rc = poll(p, (nfds_t)n, (int)(left / 1000000) + 1);
		if (rc < 0 && errno != EINTR)
			return qerr(fe, vq0, -errno, "poll: %s", strerror(errno));
		if (rc <= 0)
			continue;
		for (unsigned i = 0; i < nq; i++)
			if (p[i].revents)
				drain_call(&fe->vq[qs[i]]);
		if (p[nq].revents && sock_gone(fe))
			return qerr(fe, vq0, -ECONNRESET, "the back-end closed the connection");
		if (p[nq].revents & POLLIN) {
			/* an unsolicited message: read and drop it */
			struct vqfe_msg_hdr h;
			uint8_t buf[64];

			rc = vqfe_recv_msg(fe, &h, buf, sizeof(buf), 100);
			if (rc == -ECONNRESET)
				return rc;
		}
		if (!fe->threaded && fe->backend >= 0 && p[nq + 1].revents) {
			rc = vqfe_backend_poll(fe, 0);
			if (rc < 0) {
				/* backend channel closed: stop watching it */
				close(fe->backend);
				fe->backend = -1;
			}
		}
	}
}

int vqfe_vq_wait(struct vqfe *fe, unsigned q, int timeout_ms)
{
	if (q >= fe->o.num_queues)
		return seterr(fe, -EINVAL, "queue %u not configured", q);
	return wait_queues(fe, 1ull << q, timeout_ms);
}

int vqfe_wait_any(struct vqfe *fe, int timeout_ms)
{
	uint64_t mask = fe->o.num_queues >= 64 ? ~0ull : (1ull << fe->o.num_queues) - 1;

	return wait_queues(fe, mask, timeout_ms);
}

/* ---- virtio-blk requests ---- */

struct chain {
	unsigned n;
	uint32_t wlen; /* writable bytes */
	struct {
		uint64_t addr;
		uint32_t len;
		uint16_t flags;
	} d[MAX_CHAIN];
};

static int chain_add(struct chain *c, uint64_t addr, uint32_t len, bool write)
{
	if (c->n >= MAX_CHAIN)
		return -EINVAL;
	c->d[c->n].addr = addr;
	c->d[c->n].len = len;
	c->d[c->n].flags = write ? VRING_DESC_F_WRITE : 0;
	if (write)
		c->wlen += len;
	c->n++;
	return 0;
}

static enum vqfe_dir req_dir(const struct vqfe_req *r)
{
	if (r->dir != VQFE_DIR_AUTO)
		return r->dir;
	switch (r->type) {
	case VIRTIO_BLK_T_IN:
	case VIRTIO_BLK_T_GET_ID:
		return VQFE_DIR_IN;
	case VIRTIO_BLK_T_OUT:
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES:
	case VIRTIO_BLK_T_SECURE_ERASE:
		return VQFE_DIR_OUT;
	default:
		return VQFE_DIR_NONE;
	}
}

static int build_chain(struct vqfe *fe, struct vqfe_vq *vq, struct slot *sl, struct vqfe_req *r,
		       struct chain *c)
{
	struct virtio_blk_outhdr h = {htole32(r->type), htole32(r->ioprio), htole64(r->sector)};
	enum vqfe_dir dir = req_dir(r);
	bool merge = r->layout & VQFE_L_MERGE;
	uint64_t dgpa = r->data_gpa ? r->data_gpa : sl->data;
	unsigned segs = r->segs ? r->segs : 1;
	uint64_t st;
	uint32_t off = 0;
	int rc = 0;

	if (dir == VQFE_DIR_NONE || r->len == 0)
		segs = 0;
	if (!r->data_gpa && r->len > fe->o.data_size)
		return qerr(fe, vq, -EINVAL, "request of %u bytes > slot data size %zu", r->len,
			    fe->o.data_size);
	if (segs > r->len)
		segs = r->len;
	if (merge && r->data_gpa)
		return qerr(fe, vq, -EINVAL, "VQFE_L_MERGE needs slot data");
	sl->data_gpa = dgpa;
	if (r->len && dir != VQFE_DIR_NONE && r->buf && !r->nocopy && dir == VQFE_DIR_OUT) {
		rc = vqfe_mem_write(fe, dgpa, r->buf, r->len);
		if (rc < 0)
			return qerr(fe, vq, rc, "data outside guest memory");
	}
	/* header */
	if (merge && dir == VQFE_DIR_OUT && segs) {
		uint32_t first = r->len / segs + (r->len % segs ? 1 : 0);

		memcpy(vqfe_gpa(fe, sl->base + SLOT_HDR_MRG, 16), &h, 16);
		rc |= chain_add(c, sl->base + SLOT_HDR_MRG, 16 + first, false);
		off = first;
	} else if (r->layout & VQFE_L_HDR_SPLIT) {
		memcpy(vqfe_gpa(fe, sl->base + SLOT_HDR_A, HDR_SPLIT_A), &h, HDR_SPLIT_A);
		memcpy(vqfe_gpa(fe, sl->base + SLOT_HDR_B, 16 - HDR_SPLIT_A),
		       (uint8_t *)&h + HDR_SPLIT_A, 16 - HDR_SPLIT_A);
		rc |= chain_add(c, sl->base + SLOT_HDR_A, HDR_SPLIT_A, false);
		rc |= chain_add(c, sl->base + SLOT_HDR_B, 16 - HDR_SPLIT_A, false);
	} else {
		memcpy(vqfe_gpa(fe, sl->base + SLOT_HDR, 16), &h, 16);
		rc |=
		    chain_add(c, sl->base + SLOT_HDR, r->layout & VQFE_L_SHORT_HDR ? 8 : 16, false);
	}
	/* data segments: the remainder spread over the first ones */
	for (unsigned i = (off ? 1 : 0); i < segs; i++) {
		uint32_t n = r->len / segs + (i < r->len % segs ? 1 : 0);
		bool last = i + 1 == segs;

		if (merge && dir == VQFE_DIR_IN && last && !(r->layout & VQFE_L_NO_STATUS)) {
			/* data + status in one descriptor */
			st = dgpa + off + n;
			*(uint8_t *)vqfe_gpa(fe, st, 1) = 0xff;
			sl->status_gpa = st;
			rc |= chain_add(c, dgpa + off, n + 1, true);
			off += n;
			goto done;
		}
		rc |= chain_add(c, dgpa + off, n, dir == VQFE_DIR_IN);
		off += n;
	}
	/* status */
	st = sl->base + SLOT_STATUS;
	memset(vqfe_gpa(fe, st, 16), 0xff, 16);
	if (r->layout & VQFE_L_STATUS_BIG) {
		sl->status_gpa = st + 15;
		rc |= chain_add(c, st, 16, true);
	} else {
		sl->status_gpa = st;
		if (!(r->layout & VQFE_L_NO_STATUS))
			rc |= chain_add(c, st, 1, !(r->layout & VQFE_L_STATUS_RO));
	}
done:
	if (rc)
		return qerr(fe, vq, -EINVAL, "chain longer than %zu descriptors", MAX_CHAIN);
	return 0;
}

int vqfe_submit(struct vqfe *fe, unsigned q, struct vqfe_req *r)
{
	struct vqfe_vq *vq;
	struct slot *sl;
	struct chain c;
	uint16_t head;
	unsigned s;
	int rc;

	if (q >= fe->o.num_queues)
		return seterr(fe, -EINVAL, "queue %u not configured", q);
	vq = &fe->vq[q];
	if (!vq->nfree_slots)
		return -EAGAIN;
	s = vq->free_slots[vq->nfree_slots - 1];
	sl = &vq->slots[s];
	c.n = 0;
	c.wlen = 0;
	rc = build_chain(fe, vq, sl, r, &c);
	if (rc < 0)
		return rc;
	if (r->layout & VQFE_L_INDIRECT) {
		struct vring_desc *t = vqfe_gpa(fe, sl->base + SLOT_ITABLE, PAGE);

		if (!vq->num_free)
			return -EAGAIN;
		for (unsigned i = 0; i < c.n; i++) {
			t[i].addr = htole64(c.d[i].addr);
			t[i].len = htole32(c.d[i].len);
			t[i].flags = htole16(c.d[i].flags | (i + 1 < c.n ? VRING_DESC_F_NEXT : 0));
			t[i].next = htole16((uint16_t)(i + 1));
		}
		head = vq->free_head;
		vq->desc[head].addr = htole64(sl->base + SLOT_ITABLE);
		vq->desc[head].len = htole32((uint32_t)(c.n * sizeof(struct vring_desc)));
		vq->desc[head].flags = htole16(VRING_DESC_F_INDIRECT);
		vq->desc[head].next = 0;
		vq->free_head = vq->next[head];
		vq->num_free--;
		vq->chain_len[head] = 1;
	} else {
		uint16_t i;

		if (c.n > vq->num_free)
			return -EAGAIN;
		head = i = vq->free_head;
		for (unsigned k = 0; k < c.n; k++) {
			bool more = k + 1 < c.n;

			vq->desc[i].addr = htole64(c.d[k].addr);
			vq->desc[i].len = htole32(c.d[k].len);
			vq->desc[i].flags = htole16(c.d[k].flags | (more ? VRING_DESC_F_NEXT : 0));
			vq->desc[i].next = htole16(more ? vq->next[i] : 0);
			if (more)
				i = vq->next[i];
		}
		vq->free_head = vq->next[i];
		vq->num_free -= c.n;
		vq->chain_len[head] = (uint16_t)c.n;
	}
	vq->nfree_slots--;
	sl->req = r;
	vq->head_slot[head] = sl;
	r->q = q;
	r->slot = s;
	r->head = head;
	r->expect_len = c.wlen;
	r->status = 0xff;
	r->used_len = 0;
	r->err = 0;
	r->inflight = true;
	r->t_submit = vqfe_now_ns();
	vq->inflight++;
	vqfe_vq_publish(vq, head);
	return 0;
}

static void complete_one(struct vqfe *fe, struct vqfe_vq *vq, uint16_t head, uint32_t len)
{
	struct slot *sl = vq->head_slot[head];
	struct vqfe_req *r = sl->req;
	uint16_t i = head;

	r->used_len = len;
	r->status = *(volatile uint8_t *)vqfe_gpa(fe, sl->status_gpa, 1);
	if (len > r->expect_len) {
		__atomic_fetch_add(&fe->proto_errors, 1, __ATOMIC_RELAXED);
		r->err = -EPROTO;
	}
	if (r->len && r->buf && !r->nocopy && req_dir(r) == VQFE_DIR_IN)
		vqfe_mem_read(fe, sl->data_gpa, r->buf, r->len);
	/* free the chain along the shadow links */
	for (unsigned k = 1; k < vq->chain_len[head]; k++)
		i = vq->next[i];
	vq->next[i] = vq->free_head;
	vq->free_head = head;
	vq->num_free += vq->chain_len[head];
	vq->chain_len[head] = 0;
	vq->head_slot[head] = NULL;
	sl->req = NULL;
	vq->free_slots[vq->nfree_slots++] = (unsigned)(sl - vq->slots);
	vq->inflight--;
	r->inflight = false;
	r->t_done = vqfe_now_ns();
}

uint64_t vqfe_req_status_gpa(const struct vqfe *fe, const struct vqfe_req *r)
{
	if (r->q >= fe->o.num_queues || r->slot >= fe->vq[r->q].nslots)
		return 0;
	return fe->vq[r->q].slots[r->slot].status_gpa;
}

int vqfe_reap(struct vqfe *fe, unsigned q, struct vqfe_req **done, unsigned max)
{
	struct vqfe_vq *vq = &fe->vq[q];
	uint16_t idx = le16toh(__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE));
	unsigned n = 0;

	if ((uint16_t)(idx - vq->last_used) > vq->num) {
		__atomic_fetch_add(&fe->proto_errors, 1, __ATOMIC_RELAXED);
		return qerr(fe, vq, -EPROTO, "queue %u: used idx jumped from %u to %u", q,
			    vq->last_used, idx);
	}
	while (n < max && idx != vq->last_used) {
		struct vring_used_elem *e = &vq->used->ring[vq->last_used & (vq->num - 1)];
		uint32_t id = le32toh(e->id), len = le32toh(e->len);
		struct vqfe_req *r;

		if (id >= vq->num || !vq->head_slot[id]) {
			__atomic_fetch_add(&fe->proto_errors, 1, __ATOMIC_RELAXED);
			vq->last_used++;
			return qerr(fe, vq, -EPROTO, "queue %u: used id %u is not in flight", q,
				    id);
		}
		r = vq->head_slot[id]->req;
		complete_one(fe, vq, (uint16_t)id, len);
		vq->last_used++;
		if (done)
			done[n] = r;
		n++;
	}
	if (vqfe_has_feature(fe, VIRTIO_RING_F_EVENT_IDX) && !fe->o.poll)
		__atomic_store_n(vq->used_event, htole16(vq->last_used), __ATOMIC_RELAXED);
	return (int)n;
}

int vqfe_drain(struct vqfe *fe, unsigned q)
{
	struct vqfe_vq *vq = &fe->vq[q];
	int rc = vqfe_vq_kick(vq, false);

	while (rc == 0 && vq->inflight) {
		rc = vqfe_reap(fe, q, NULL, ~0u);
		if (rc < 0)
			return rc;
		rc = 0;
		if (vq->inflight)
			rc = vqfe_vq_wait(fe, q, fe->o.timeout_ms);
	}
	return rc;
}

int vqfe_run(struct vqfe *fe, unsigned q, struct vqfe_req *r)
{
	int rc;

	if (q >= fe->o.num_queues)
		return seterr(fe, -EINVAL, "queue %u not configured", q);
	rc = vqfe_submit(fe, q, r);
	if (rc == -EAGAIN) {
		rc = vqfe_drain(fe, q);
		if (rc == 0)
			rc = vqfe_submit(fe, q, r);
		if (rc == -EAGAIN)
			rc = seterr(fe, rc, "request needs more descriptors than the queue has");
	}
	if (rc < 0)
		return rc;
	rc = vqfe_vq_kick(&fe->vq[q], false);
	while (rc == 0 && r->inflight) {
		rc = vqfe_reap(fe, q, NULL, ~0u);
		if (rc < 0)
			return rc;
		rc = r->inflight ? vqfe_vq_wait(fe, q, fe->o.timeout_ms) : 0;
	}
	if (rc == 0 && r->err)
		rc = seterr(fe, r->err, "bad used element: len %u, chain has %u writable bytes",
			    r->used_len, r->expect_len);
	return rc;
}

static int rw_chunks(struct vqfe *fe, unsigned q, uint32_t type, uint64_t off, void *buf,
		     uint32_t len)
{
	uint8_t *p = buf;
	uint32_t chunk = (uint32_t)(fe->o.data_size & ~511ull);

	if (!chunk)
		chunk = (uint32_t)fe->o.data_size;
	do {
		uint32_t n = len < chunk ? len : chunk;
		struct vqfe_req r = {.type = type, .sector = off / 512, .buf = p, .len = n};
		int rc = vqfe_run(fe, q, &r);

		if (rc < 0)
			return rc;
		if (r.status != VIRTIO_BLK_S_OK)
			return r.status;
		p += n;
		off += n;
		len -= n;
	} while (len);
	return 0;
}

int vqfe_read(struct vqfe *fe, unsigned q, uint64_t off, void *buf, uint32_t len)
{
	return rw_chunks(fe, q, VIRTIO_BLK_T_IN, off, buf, len);
}

int vqfe_write(struct vqfe *fe, unsigned q, uint64_t off, const void *buf, uint32_t len)
{
	return rw_chunks(fe, q, VIRTIO_BLK_T_OUT, off, (void *)buf, len);
}

int vqfe_flush(struct vqfe *fe, unsigned q)
{
	struct vqfe_req r = {.type = VIRTIO_BLK_T_FLUSH};
	int rc = vqfe_run(fe, q, &r);

	return rc < 0 ? rc : r.status;
}

int vqfe_get_id(struct vqfe *fe, unsigned q, char id[VIRTIO_BLK_ID_BYTES + 1])
{
	struct vqfe_req r = {.type = VIRTIO_BLK_T_GET_ID, .buf = id, .len = VIRTIO_BLK_ID_BYTES};
	int rc;

	memset(id, 0, VIRTIO_BLK_ID_BYTES + 1);
	rc = vqfe_run(fe, q, &r);
	id[VIRTIO_BLK_ID_BYTES] = 0;
	return rc < 0 ? rc : r.status;
}

int vqfe_discard_wz(struct vqfe *fe, unsigned q, uint32_t type, uint64_t off, uint64_t len,
		    uint32_t flags)
{
	struct virtio_blk_discard_write_zeroes seg = {
	    htole64(off / 512), htole32((uint32_t)(len / 512)), htole32(flags)};
	struct vqfe_req r = {.type = type, .buf = &seg, .len = sizeof(seg)};
	int rc = vqfe_run(fe, q, &r);

	return rc < 0 ? rc : r.status;
}

/* ---- open/close ---- */

int vqfe_open(struct vqfe **fep, const char *path, const struct vqfe_opts *opts)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct vqfe *fe;
	int rc;

	*fep = NULL;
	fe = calloc(1, sizeof(*fe));
	if (!fe)
		return -ENOMEM;
	if (opts)
		fe->o = *opts;
	else
		vqfe_opts_init(&fe->o);
	fe->sock = fe->backend = -1;
	fe->inflight_fd = fe->got_fd = -1;
	for (unsigned i = 0; i < VQFE_MAX_REGIONS; i++)
		fe->reg[i].fd = -1;
	for (unsigned q = 0; q < VQFE_MAX_QUEUES; q++)
		fe->vq[q].kick_fd = fe->vq[q].call_fd = -1;
	if (!fe->o.timeout_ms)
		fe->o.timeout_ms = 10000;
	if (!fe->o.config_len)
		fe->o.config_len = VQFE_BLK_CONFIG_LEN;
	if (!fe->o.slots || fe->o.slots > fe->o.queue_size)
		fe->o.slots = fe->o.queue_size;
	if (!fe->o.num_regions)
		fe->o.num_regions = 1;
	if (fe->o.num_queues < 1 || fe->o.num_queues > VQFE_MAX_QUEUES ||
	    !is_pow2(fe->o.queue_size) || fe->o.queue_size > 32768 ||
	    fe->o.num_regions > VQFE_MAX_REGIONS || fe->o.data_size > (1u << 30)) {
		rc = seterr(fe, -EINVAL, "bad options (queues, queue size, regions or data size)");
		goto err;
	}
	for (unsigned q = 0; q < fe->o.num_queues; q++) {
		rc = vq_alloc(fe, q);
		if (rc < 0)
			goto err;
	}
	rc = mem_create(fe);
	if (rc < 0)
		goto err;
	for (unsigned q = 0; q < fe->o.num_queues; q++)
		vq_bind(fe, q);
	if (strlen(path) >= sizeof(sa.sun_path)) {
		rc = seterr(fe, -ENAMETOOLONG, "socket path too long");
		goto err;
	}
	strcpy(sa.sun_path, path);
	fe->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fe->sock < 0) {
		rc = seterr(fe, -errno, "socket: %s", strerror(errno));
		goto err;
	}
	if (connect(fe->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		rc = seterr(fe, -errno, "connect %s: %s", path, strerror(errno));
		goto err;
	}
	*fep = fe;
	if (fe->o.manual)
		return 0;
	rc = vqfe_negotiate(fe);
	if (rc == 0)
		rc = vqfe_start(fe);
	if (rc < 0) {
		*fep = NULL;
		goto err;
	}
	return 0;

err:
	snprintf(open_err, sizeof(open_err), "%s", fe->err[0] ? fe->err : strerror(-rc));
	if (!fe->o.quiet)
		fprintf(stderr, "vqfe: %s\n", open_err);
	vqfe_close(fe);
	return rc;
}

void vqfe_close(struct vqfe *fe)
{
	if (!fe)
		return;
	if (fe->sock >= 0)
		close(fe->sock);
	if (fe->backend >= 0)
		close(fe->backend);
	for (unsigned q = 0; q < VQFE_MAX_QUEUES; q++)
		vq_free(&fe->vq[q]);
	if (fe->inflight_map)
		munmap(fe->inflight_map, fe->inflight_size);
	if (fe->inflight_fd >= 0)
		close(fe->inflight_fd);
	mem_destroy(fe);
	free(fe);
}
