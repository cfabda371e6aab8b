/* SPDX-License-Identifier: MIT */
/*
 * vqfe — a vhost-user-blk test front-end: plays QEMU plus the guest's
 * virtio-blk driver without a VM.
 *
 * It speaks only the wire protocol (QEMU docs/interop/vhost-user.rst, virtio
 * 1.2 split virtqueues, virtio-blk requests) and depends on nothing of vqcow,
 * so the same tests run against vqcowd and against qemu-storage-daemon.
 *
 * Objects:
 *  - struct vqfe: one connection. Owns the "guest memory" (memfd regions, each
 *    mapped at its own address with a guard gap so that guest-physical and
 *    our virtual addresses never coincide), the socket, the backend channel
 *    (socketpair given with SET_BACKEND_REQ_FD) and the virtqueues.
 *  - struct vqfe_vq: one split virtqueue, driver side: descriptor free list,
 *    avail ring producer, used ring consumer, kick/call eventfds, EVENT_IDX.
 *  - struct vqfe_req: one virtio-blk request, owned by the caller from submit
 *    until it is returned by a completion call. Each queue has preallocated
 *    request slots (header, status, indirect table and data buffer in guest
 *    memory), so submitting allocates nothing.
 *
 * Guest memory layout (per region bump allocation, planned before mapping):
 *  region 0: all rings, then the slots whose index % num_regions == 0, then
 *  the first half of the scratch area at its very end; region 1 starts with
 *  the second half of the scratch area. With gpa_hole == 0 the scratch area
 *  is therefore contiguous in guest-physical space and straddles the region
 *  0/1 boundary (tests use it to cross regions inside one descriptor).
 *  Slots are spread round-robin over the regions.
 *
 * Invariants: a descriptor index is either on the free list or part of
 * exactly one in-flight chain; the shadow chain (not the shared table, which
 * a hostile peer could scribble on) is what is freed on completion. A used
 * element whose id is not an in-flight head, or whose len exceeds the
 * chain's writable bytes, is counted in fe->proto_errors and reported as
 * -EPROTO; it never frees anything.
 *
 * Threading: one struct vqfe is used by one thread, except that after the
 * set-up the queues may be driven each by its own thread, as a guest's vCPUs
 * drive theirs: the set-up thread calls vqfe_set_threaded(fe, true) before it
 * starts them, and from then on a queue's thread alone calls vqfe_submit,
 * vqfe_reap, vqfe_vq_kick and vqfe_vq_wait on its queue (its errors are in
 * vqfe_vq_strerror, not vqfe_strerror), while the set-up thread may serve
 * the backend channel (vqfe_backend_poll) and nothing else; the queues'
 * waits then watch the socket for a hang-up only. After joining them, the
 * set-up thread clears the mode and has the whole struct again (e.g. to stop
 * the rings with vqfe_vq_stop).
 *
 * Return contract: functions returning int give 0 (or a count) on success
 * and -errno on failure; vqfe_strerror(fe) then has a one-line explanation.
 * -ECONNRESET means the back-end closed the connection.
 */
#ifndef TESTS_FRONTEND_VQFE_H
#define TESTS_FRONTEND_VQFE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>

/* ---- vhost-user wire constants (vhost-user.rst) ---- */

enum vqfe_msg_type {
	VHOST_USER_GET_FEATURES = 1,
	VHOST_USER_SET_FEATURES = 2,
	VHOST_USER_SET_OWNER = 3,
	VHOST_USER_RESET_OWNER = 4,
	VHOST_USER_SET_MEM_TABLE = 5,
	VHOST_USER_SET_LOG_BASE = 6,
	VHOST_USER_SET_LOG_FD = 7,
	VHOST_USER_SET_VRING_NUM = 8,
	VHOST_USER_SET_VRING_ADDR = 9,
	VHOST_USER_SET_VRING_BASE = 10,
	VHOST_USER_GET_VRING_BASE = 11,
	VHOST_USER_SET_VRING_KICK = 12,
	VHOST_USER_SET_VRING_CALL = 13,
	VHOST_USER_SET_VRING_ERR = 14,
	VHOST_USER_GET_PROTOCOL_FEATURES = 15,
	VHOST_USER_SET_PROTOCOL_FEATURES = 16,
	VHOST_USER_GET_QUEUE_NUM = 17,
	VHOST_USER_SET_VRING_ENABLE = 18,
	VHOST_USER_SET_BACKEND_REQ_FD = 21,
	VHOST_USER_GET_CONFIG = 24,
	VHOST_USER_SET_CONFIG = 25,
	VHOST_USER_GET_INFLIGHT_FD = 31,
	VHOST_USER_SET_INFLIGHT_FD = 32,
	VHOST_USER_GET_MAX_MEM_SLOTS = 36,
	VHOST_USER_ADD_MEM_REG = 37,
	VHOST_USER_REM_MEM_REG = 38,
};

/* Back-end -> front-end messages on the backend channel. */
#define VHOST_USER_BACKEND_CONFIG_CHANGE_MSG 2

#define VHOST_USER_VERSION         0x1u
#define VHOST_USER_VERSION_MASK    0x3u
#define VHOST_USER_REPLY_MASK      0x4u
#define VHOST_USER_NEED_REPLY_MASK 0x8u

#define VHOST_USER_F_PROTOCOL_FEATURES 30

#define VHOST_USER_PROTOCOL_F_MQ                  0
#define VHOST_USER_PROTOCOL_F_REPLY_ACK           3
#define VHOST_USER_PROTOCOL_F_BACKEND_REQ         5
#define VHOST_USER_PROTOCOL_F_CONFIG              9
#define VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD      12
#define VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS 15

/* Bit 8 of the SET_VRING_KICK/CALL payload: no fd follows. */
#define VHOST_USER_VRING_NOFD_MASK 0x100u

#define VQFE_MAX_REGIONS 8
#define VQFE_MAX_QUEUES  64
#define VQFE_MAX_FDS     8
/* Largest payload we send or accept (SET_MEM_TABLE with 8 regions is 264). */
#define VQFE_MAX_PAYLOAD 4096

/* Message header: native byte order (vhost-user.rst "Header"). */
struct vqfe_msg_hdr {
	uint32_t request;
	uint32_t flags;
	uint32_t size;
};
_Static_assert(sizeof(struct vqfe_msg_hdr) == 12, "vhost-user header is 12 bytes");

/* "Memory region description": guest address, size, user address, mmap offset. */
struct vqfe_mem_region {
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t mmap_offset;
};
_Static_assert(sizeof(struct vqfe_mem_region) == 32, "memory region is 32 bytes");

/* "Virtio device config space" payload header (then size bytes). */
struct vqfe_config_hdr {
	uint32_t offset;
	uint32_t size;
	uint32_t flags;
};
_Static_assert(sizeof(struct vqfe_config_hdr) == 12, "config header is 12 bytes");

/* virtio_blk_config up to write_zeroes_may_unmap + padding (virtio 1.2 5.2.4). */
#define VQFE_BLK_CONFIG_LEN 60

/* ---- options ---- */

struct vqfe_opts {
	unsigned num_queues;     /* virtqueues to set up (default 1) */
	unsigned queue_size;     /* descriptors per queue, power of 2 (default 128) */
	unsigned slots;          /* request slots per queue (default queue_size, max queue_size) */
	size_t data_size;        /* data buffer bytes per slot (default 128 KiB) */
	size_t scratch_size;     /* scratch area for tests (default 1 MiB) */
	unsigned num_regions;    /* memory regions 1..8 (default 1) */
	bool separate_fds;       /* one memfd per region (default: one memfd, regions at offsets) */
	uint64_t gpa_hole;       /* guest-physical gap between regions (default 0: contiguous) */
	bool add_mem_reg;        /* ADD_MEM_REG per region instead of SET_MEM_TABLE */
	bool no_event_idx;       /* do not negotiate VIRTIO_RING_F_EVENT_IDX */
	bool no_indirect;        /* do not negotiate VIRTIO_RING_F_INDIRECT_DESC */
	bool no_reply_ack;       /* do not negotiate REPLY_ACK */
	bool no_backend_req;     /* no backend channel */
	bool no_mq;              /* do not negotiate protocol MQ / skip GET_QUEUE_NUM */
	bool no_enable;          /* leave rings disabled (no SET_VRING_ENABLE) */
	uint64_t features_clear; /* virtio feature bits not to negotiate */
	bool poll;               /* busy-poll used rings; ask for no interrupts */
	int timeout_ms;          /* replies and completions (default 10000) */
	unsigned config_len;     /* GET_CONFIG length (default VQFE_BLK_CONFIG_LEN) */
	bool manual;             /* connect only: the caller drives the protocol */
	bool quiet;              /* vqfe_open: do not print the error to stderr */
	uint16_t ring_base;      /* initial avail/used index of every ring (test index wrap) */
	bool inflight; /* negotiate INFLIGHT_SHMFD: GET/SET_INFLIGHT_FD before the rings */
};

/* Fill @o with defaults. */
void vqfe_opts_init(struct vqfe_opts *o);

/* ---- requests ---- */

/* Descriptor layout bits for struct vqfe_req.layout. */
enum {
	VQFE_L_HDR_SPLIT = 1u << 0,  /* header split over two non-adjacent descriptors (7+9) */
	VQFE_L_MERGE = 1u << 1,      /* OUT: header+data in one descriptor; IN: data+status */
	VQFE_L_INDIRECT = 1u << 2,   /* whole chain in one indirect table */
	VQFE_L_NO_STATUS = 1u << 3,  /* hostile: no status descriptor at all */
	VQFE_L_STATUS_RO = 1u << 4,  /* hostile: status descriptor not device-writable */
	VQFE_L_SHORT_HDR = 1u << 5,  /* hostile: header descriptor only 8 bytes */
	VQFE_L_STATUS_BIG = 1u << 6, /* status descriptor 16 bytes (status is its last byte) */
};

enum vqfe_dir {
	VQFE_DIR_AUTO = 0, /* from the type: OUT/DISCARD/WRITE_ZEROES read, IN/GET_ID write */
	VQFE_DIR_NONE,
	VQFE_DIR_OUT, /* data is device-readable */
	VQFE_DIR_IN,  /* data is device-writable */
};

struct vqfe_req {
	/* in: set by the caller */
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
	void *buf;    /* data (OUT: copied to guest memory; IN: copied back); may be NULL */
	uint32_t len; /* data bytes (<= opts.data_size unless data_gpa is set) */
	enum vqfe_dir dir;
	unsigned layout;   /* VQFE_L_* */
	unsigned segs;     /* data descriptors (default 1; bytes split as evenly as possible) */
	uint64_t data_gpa; /* nonzero: data lives here (e.g. scratch) instead of the slot */
	bool nocopy;       /* bench: do not copy @buf in or out */
	void *user;
	/* out: set on completion */
	uint8_t status;      /* status byte written by the device (0xff if untouched) */
	uint32_t used_len;   /* used element len */
	uint32_t expect_len; /* writable bytes in the chain (data IN + status) */
	int err;             /* 0, or -EPROTO for a bad used element */
	uint64_t t_submit;   /* CLOCK_MONOTONIC ns at submit */
	uint64_t t_done;     /* CLOCK_MONOTONIC ns when reaped */
	/* private */
	unsigned q;
	unsigned slot;
	uint16_t head;
	bool inflight;
};

struct vqfe;
struct vqfe_vq;

/* ---- connection ---- */

/*
 * Connect to the UNIX socket @path and (unless opts->manual) run the whole
 * set-up: features, protocol features, queue number, backend channel,
 * SET_OWNER, GET_CONFIG, SET_FEATURES, memory table, vrings, enable.
 * @opts may be NULL (defaults). 0 and *fep, or -errno (then *fep is NULL and
 * the error text has been printed to stderr, prefixed "vqfe: ", unless
 * opts->quiet).
 */
int vqfe_open(struct vqfe **fep, const char *path, const struct vqfe_opts *opts);

/* Close the connection and free everything. NULL is fine. */
void vqfe_close(struct vqfe *fe);

/* Last error text; vqfe_strerror(NULL): why the last vqfe_open failed. */
const char *vqfe_strerror(const struct vqfe *fe);
/* Queues on their own threads from now on (@on) or no more (see "Threading"). */
void vqfe_set_threaded(struct vqfe *fe, bool on);

/* Socket fd (for raw tricks) and backend-channel fd (-1 if none). */
int vqfe_sock(const struct vqfe *fe);
int vqfe_backend_fd(const struct vqfe *fe);

/* Steps of the set-up, for opts->manual users (each 0 or -errno). */
int vqfe_negotiate(struct vqfe *fe); /* GET/SET features + protocol, queue num, backend, owner */
int vqfe_get_config(struct vqfe *fe, void *buf, uint32_t off, uint32_t len);
int vqfe_set_config(struct vqfe *fe, const void *buf, uint32_t off, uint32_t len);
int vqfe_set_mem(struct vqfe *fe);              /* SET_MEM_TABLE or ADD_MEM_REG per region */
int vqfe_vq_setup(struct vqfe *fe, unsigned q); /* NUM, BASE, ADDR, KICK, CALL (+ENABLE) */
int vqfe_vq_enable(struct vqfe *fe, unsigned q, bool on);
/* Run vqfe_set_mem and vqfe_vq_setup for all queues. */
int vqfe_start(struct vqfe *fe);
/*
 * After the back-end died (or closed the connection): connect to @path again
 * and set everything up again with the same guest memory, rings, requests in
 * flight and (INFLIGHT_SHMFD) the same inflight region, each ring restarting
 * at its used index as QEMU does after a back-end death. Requests not yet
 * completed stay in flight: a back-end that tracks them completes them.
 */
int vqfe_reconnect(struct vqfe *fe, const char *path);
/* The inflight region (NULL if INFLIGHT_SHMFD is not in use) and its size. */
void *vqfe_inflight_region(const struct vqfe *fe, uint64_t *size);

/* Negotiated state. */
uint64_t vqfe_features(const struct vqfe *fe);          /* virtio features acked */
uint64_t vqfe_dev_features(const struct vqfe *fe);      /* offered by the back-end */
uint64_t vqfe_protocol_features(const struct vqfe *fe); /* acked */
uint64_t vqfe_dev_protocol_features(const struct vqfe *fe);
uint64_t vqfe_queue_num(const struct vqfe *fe);     /* GET_QUEUE_NUM answer (0 if not asked) */
uint64_t vqfe_max_mem_slots(const struct vqfe *fe); /* GET_MAX_MEM_SLOTS answer (0 if not asked) */
bool vqfe_has_feature(const struct vqfe *fe, unsigned bit);
/* Config read during set-up (zeroed where the back-end gave nothing). */
const struct virtio_blk_config *vqfe_config(const struct vqfe *fe);
/* Re-read the config space (GET_CONFIG) into vqfe_config(). */
int vqfe_refresh_config(struct vqfe *fe);
/* Capacity in 512-byte sectors and in bytes. */
uint64_t vqfe_capacity(const struct vqfe *fe);
const struct vqfe_opts *vqfe_get_opts(const struct vqfe *fe);

/* ---- raw messages ---- */

/*
 * Send one message: header {@request, @flags, @size} then @size bytes of
 * @payload, with @nfds fds as SCM_RIGHTS. @flags is sent as given (so a bad
 * version can be sent). 0 or -errno.
 */
int vqfe_send_msg(struct vqfe *fe, uint32_t request, uint32_t flags, const void *payload,
		  uint32_t size, const int *fds, unsigned nfds);
/* Send @len raw bytes (no header added) with optional fds. */
int vqfe_send_raw(struct vqfe *fe, const void *buf, size_t len, const int *fds, unsigned nfds);
/*
 * Receive one message into @hdr and up to @max payload bytes (the rest is
 * discarded; hdr->size is the announced size). Waits up to @timeout_ms.
 * Returns payload bytes stored, -ETIMEDOUT, -ECONNRESET on EOF, -errno.
 */
int vqfe_recv_msg(struct vqfe *fe, struct vqfe_msg_hdr *hdr, void *payload, uint32_t max,
		  int timeout_ms);
/*
 * Send a request and, if it solicits a reply or (REPLY_ACK negotiated and
 * @ack) an ack, receive and check it. For an ack, a nonzero u64 is -EIO.
 * @reply gets up to @reply_max bytes. Returns reply payload bytes (0 for no
 * reply) or -errno.
 */
int vqfe_call(struct vqfe *fe, uint32_t request, const void *payload, uint32_t size, const int *fds,
	      unsigned nfds, bool ack, void *reply, uint32_t reply_max);
/* Convenience: u64 payload request expecting a u64 reply. */
int vqfe_call_u64(struct vqfe *fe, uint32_t request, uint64_t *val);

/*
 * Wait until the back-end closes the connection: returns 0 on EOF,
 * -ETIMEDOUT if it is still open after @timeout_ms. Any message received
 * meanwhile is discarded.
 */
int vqfe_wait_disconnect(struct vqfe *fe, int timeout_ms);
bool vqfe_is_disconnected(const struct vqfe *fe);

/* Backend channel: handle pending messages (config change: counted, acked
 * if NEED_REPLY). Waits up to @timeout_ms for the first one. Returns the
 * number of messages handled or -errno. */
int vqfe_backend_poll(struct vqfe *fe, int timeout_ms);
unsigned vqfe_config_changes(const struct vqfe *fe);

/* ---- guest memory ---- */

/* Our pointer for [@gpa, @gpa+@len) if inside one region, else NULL. */
void *vqfe_gpa(const struct vqfe *fe, uint64_t gpa, size_t len);
/* Copy to/from guest memory, crossing regions if needed. 0 or -EFAULT. */
int vqfe_mem_write(struct vqfe *fe, uint64_t gpa, const void *buf, size_t len);
int vqfe_mem_read(const struct vqfe *fe, uint64_t gpa, void *buf, size_t len);
/* Scratch area: [*gpa, *gpa + *size). Straddles the region 0/1 boundary when
 * there are >= 2 regions and gpa_hole == 0. */
void vqfe_scratch(const struct vqfe *fe, uint64_t *gpa, size_t *size);
/* Region @i: guest-physical start and size, or -EINVAL. */
int vqfe_region(const struct vqfe *fe, unsigned i, uint64_t *gpa, uint64_t *size);
/* Translate our pointer back to a user address as sent to the back-end. */
uint64_t vqfe_uaddr(const struct vqfe *fe, uint64_t gpa);

/* ---- virtqueue (driver side) ---- */

struct vqfe_vq *vqfe_vq(struct vqfe *fe, unsigned q);
unsigned vqfe_num_queues(const struct vqfe *fe);
/* Shared ring structures (for hostile tests). */
struct vring_desc *vqfe_vq_desc(struct vqfe_vq *vq);
struct vring_avail *vqfe_vq_avail(struct vqfe_vq *vq);
struct vring_used *vqfe_vq_used(struct vqfe_vq *vq);
uint16_t vqfe_vq_size(const struct vqfe_vq *vq);
/* Guest-physical addresses of the desc table, avail and used rings. */
void vqfe_vq_addrs(const struct vqfe_vq *vq, uint64_t *desc, uint64_t *avail, uint64_t *used);
/* Requests submitted and not yet reaped. */
unsigned vqfe_vq_inflight(const struct vqfe_vq *vq);
/* Last error of an operation on this queue (the only error text of a queue's
 * own thread in threaded mode; "no error" if none). */
const char *vqfe_vq_strerror(const struct vqfe_vq *vq);

/*
 * Hostile/raw: take @n descriptors off the free list (their indices in @ids),
 * for the caller to fill in vqfe_vq_desc(). Give them back with
 * vqfe_vq_put_desc (only once the back-end can no longer use them).
 */
int vqfe_vq_get_desc(struct vqfe_vq *vq, unsigned n, uint16_t *ids);
void vqfe_vq_put_desc(struct vqfe_vq *vq, unsigned n, const uint16_t *ids);
/* Put @head on the avail ring (barrier, then avail->idx++). No kick. */
void vqfe_vq_publish(struct vqfe_vq *vq, uint16_t head);
/* Hostile: set avail->idx to @idx directly. */
void vqfe_vq_set_avail_idx(struct vqfe_vq *vq, uint16_t idx);
/* Hold publication: while held, submitted requests fill the avail ring but
 * avail->idx stays put, so the back-end sees none of them; releasing the
 * hold publishes them all with one index store (a batch a polling back-end
 * cannot see half of). */
void vqfe_vq_hold(struct vqfe_vq *vq, bool hold);
/* Kick if the device wants it (EVENT_IDX / NO_NOTIFY), or always if @force. */
int vqfe_vq_kick(struct vqfe_vq *vq, bool force);
/*
 * Raw consumer: next used element, 1 and *id, *len; or 0 if none. Does not
 * touch request bookkeeping (use for raw chains only).
 */
int vqfe_vq_pop_used(struct vqfe_vq *vq, uint32_t *id, uint32_t *len);
/* Wait for a call notification (or just poll when opts.poll) on queue @q
 * up to @timeout_ms: 0, -ETIMEDOUT, -ECONNRESET. */
int vqfe_vq_wait(struct vqfe *fe, unsigned q, int timeout_ms);
/* Wait until any queue has used elements: 0, -ETIMEDOUT, -ECONNRESET. */
int vqfe_wait_any(struct vqfe *fe, int timeout_ms);
/* Notifications counted on the call eventfd of queue @q so far. */
uint64_t vqfe_vq_calls(struct vqfe *fe, unsigned q);
/* Kicks sent on queue @q. */
uint64_t vqfe_vq_kicks(const struct vqfe_vq *vq);

/*
 * GET_VRING_BASE for queue @q: stops the ring; *base = the back-end's next
 * avail index. The reply comes only after in-flight requests completed.
 */
int vqfe_vq_stop(struct vqfe *fe, unsigned q, uint32_t *base);
/* Restart a stopped ring: SET_VRING_NUM/BASE(@base)/ADDR/KICK/CALL/ENABLE. */
int vqfe_vq_restart(struct vqfe *fe, unsigned q, uint32_t base);

/* ---- virtio-blk requests ---- */

/*
 * Build @r's chain in a free slot of queue @q and make it available (no
 * kick). -EAGAIN if no slot or not enough descriptors, -EINVAL for a request
 * that does not fit the slot. @r belongs to vqfe until reaped.
 */
int vqfe_submit(struct vqfe *fe, unsigned q, struct vqfe_req *r);
/*
 * Reap up to @max completed requests of queue @q into @done (non-blocking).
 * Returns the count or -errno (-EPROTO: a bad used element, see fe invariants).
 */
int vqfe_reap(struct vqfe *fe, unsigned q, struct vqfe_req **done, unsigned max);
/* Guest-physical address of @r's status byte (valid from vqfe_submit until
 * its slot is reused by a later submit). */
uint64_t vqfe_req_status_gpa(const struct vqfe *fe, const struct vqfe_req *r);
/* Kick, then wait until every request in flight on queue @q is reaped. */
int vqfe_drain(struct vqfe *fe, unsigned q);
/* Submit, kick, wait for @r. 0 (look at r->status) or -errno. */
int vqfe_run(struct vqfe *fe, unsigned q, struct vqfe_req *r);

/* Synchronous helpers on queue @q; return the status byte (>= 0) or -errno. */
int vqfe_read(struct vqfe *fe, unsigned q, uint64_t off, void *buf, uint32_t len);
int vqfe_write(struct vqfe *fe, unsigned q, uint64_t off, const void *buf, uint32_t len);
int vqfe_flush(struct vqfe *fe, unsigned q);
int vqfe_get_id(struct vqfe *fe, unsigned q, char id[VIRTIO_BLK_ID_BYTES + 1]);
/* DISCARD or WRITE_ZEROES of [@off, @off+@len) in one segment with @flags. */
int vqfe_discard_wz(struct vqfe *fe, unsigned q, uint32_t type, uint64_t off, uint64_t len,
		    uint32_t flags);

/* Monotonic clock in ns. */
uint64_t vqfe_now_ns(void);

#endif /* TESTS_FRONTEND_VQFE_H */
