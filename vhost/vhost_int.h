/* SPDX-License-Identifier: MIT */
/*
 * vhost/ private header: vhost-user on-wire structures (docs/interop/vhost-user.rst)
 * and the internal state of the server, the connection and the rings.
 *
 * Threading: everything in vhost/ runs on the single thread that runs the
 * glue's event loop (watch callbacks, vq_pop/vq_push/vq_notify).
 *
 * Connection life cycle (struct vhost_dev):
 *
 *   accepted ──(peer input)──> live ──(EOF, error, set_broken)──> dead ──(inflight == 0,
 *   at a safe point)──> reaped (ops->disconnected, memory unmapped, freed; listening again)
 *
 * "dead": the socket, the kick/call/err fds and the backend channel are closed
 * and unwatched, but the memory table, the rings and the element slots stay, so
 * the device model can still complete (vq_push) the elements it holds; those
 * pushes no longer touch the used ring. Reaping happens only at a "safe point"
 * (the end of one of vhost/'s own watch callbacks, never inside a call from the
 * glue such as vq_push), via the server's wake eventfd.
 */
#ifndef VHOST_VHOST_INT_H
#define VHOST_VHOST_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/virtio_ring.h>

#include "vhost.h"
#include "util.h"
#include "vlog.h"

/*
 * Logging goes through log/ (the facility below every layer). Levels: error
 * for our own failures, warn for what a peer did wrong (each such line is
 * followed by a refusal or a dropped connection), info for the connection
 * life cycle, debug for every message received (--log-level debug).
 */
#define vhost_err(...)  vlog(VLOG_ERROR, "vhost", __VA_ARGS__)
#define vhost_warn(...) vlog(VLOG_WARN, "vhost", __VA_ARGS__)
#define vhost_info(...) vlog(VLOG_INFO, "vhost", __VA_ARGS__)
#define vhost_dbg(...)  vlog(VLOG_DEBUG, "vhost", __VA_ARGS__)

/* ---- on-wire: vhost-user messages (vhost-user.rst, "Message specification") ---- */

/*
 *   ------------------------------------
 *   | request | flags | size | payload |
 *   ------------------------------------
 *   u32 request, u32 flags (bits 0-1 version = 0x1, bit 2 reply, bit 3
 *   need_reply), u32 size of the payload. Native endianness (little-endian here).
 */
struct vu_hdr {
	uint32_t request;
	uint32_t flags;
	uint32_t size;
};
_Static_assert(sizeof(struct vu_hdr) == 12, "vhost-user header is 12 bytes");

#define VU_FLAG_VERSION_MASK 0x3u
#define VU_VERSION           0x1u
#define VU_FLAG_REPLY        (1u << 2)
#define VU_FLAG_NEED_REPLY   (1u << 3)

/* Front-end message types. */
enum {
	VU_GET_FEATURES = 1,
	VU_SET_FEATURES = 2,
	VU_SET_OWNER = 3,
	VU_RESET_OWNER = 4,
	VU_SET_MEM_TABLE = 5,
	VU_SET_LOG_BASE = 6,
	VU_SET_LOG_FD = 7,
	VU_SET_VRING_NUM = 8,
	VU_SET_VRING_ADDR = 9,
	VU_SET_VRING_BASE = 10,
	VU_GET_VRING_BASE = 11,
	VU_SET_VRING_KICK = 12,
	VU_SET_VRING_CALL = 13,
	VU_SET_VRING_ERR = 14,
	VU_GET_PROTOCOL_FEATURES = 15,
	VU_SET_PROTOCOL_FEATURES = 16,
	VU_GET_QUEUE_NUM = 17,
	VU_SET_VRING_ENABLE = 18,
	VU_SEND_RARP = 19,
	VU_NET_SET_MTU = 20,
	VU_SET_BACKEND_REQ_FD = 21, /* SET_SLAVE_REQ_FD in older documents */
	VU_IOTLB_MSG = 22,
	VU_SET_VRING_ENDIAN = 23,
	VU_GET_CONFIG = 24,
	VU_SET_CONFIG = 25,
	VU_CREATE_CRYPTO_SESSION = 26,
	VU_CLOSE_CRYPTO_SESSION = 27,
	VU_POSTCOPY_ADVISE = 28,
	VU_POSTCOPY_LISTEN = 29,
	VU_POSTCOPY_END = 30,
	VU_GET_INFLIGHT_FD = 31,
	VU_SET_INFLIGHT_FD = 32,
	VU_GPU_SET_SOCKET = 33,
	VU_RESET_DEVICE = 34,
	VU_VRING_KICK = 35,
	VU_GET_MAX_MEM_SLOTS = 36,
	VU_ADD_MEM_REG = 37,
	VU_REM_MEM_REG = 38,
	VU_SET_STATUS = 39,
	VU_GET_STATUS = 40,
	VU_GET_SHARED_OBJECT = 41,
	VU_SET_DEVICE_STATE_FD = 42,
	VU_CHECK_DEVICE_STATE = 43,
	VU_MSG_MAX = 44, /* table size; anything at or above is unknown */
};

/* Back-end message types (sent on the backend channel). */
#define VU_BACKEND_CONFIG_CHANGE_MSG 2

/* Feature bits. */
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VHOST_F_LOG_ALL                26
#define VU_PROTO_F_MQ                  0
#define VU_PROTO_F_LOG_SHMFD           1
#define VU_PROTO_F_REPLY_ACK           3
#define VU_PROTO_F_BACKEND_REQ         5
#define VU_PROTO_F_CONFIG              9
#define VU_PROTO_F_INFLIGHT_SHMFD      12
#define VU_PROTO_F_RESET_DEVICE        13
#define VU_PROTO_F_CONFIGURE_MEM_SLOTS 15

/* A vring state description: SET_VRING_NUM/BASE, GET_VRING_BASE, SET_VRING_ENABLE. */
struct vu_vring_state {
	uint32_t index;
	uint32_t num;
};
_Static_assert(sizeof(struct vu_vring_state) == 8, "vring state is 8 bytes");

/* A vring address description: SET_VRING_ADDR. Addresses are front-end virtual. */
struct vu_vring_addr {
	uint32_t index;
	uint32_t flags; /* bit 0: VHOST_VRING_F_LOG */
	uint64_t desc;
	uint64_t used;
	uint64_t avail;
	uint64_t log;
};
_Static_assert(sizeof(struct vu_vring_addr) == 40, "vring address is 40 bytes");
#define VU_VRING_F_LOG 1u

/* SET_LOG_BASE with LOG_SHMFD: u64 mmap_size, u64 mmap_offset; one fd. */
struct vu_log_msg {
	uint64_t mmap_size;
	uint64_t mmap_offset;
};
_Static_assert(sizeof(struct vu_log_msg) == 16, "log description is 16 bytes");
/* Dirty log granularity (vhost-user.rst "Migration"): one bit per 4 KiB page. */
#define VHOST_LOG_PAGE_SHIFT 12
/* Largest log accepted: covers 2^(30+3+12) bytes = 32 TiB of guest memory. */
#define VHOST_LOG_MAX_SIZE (1ull << 30)

/* Memory region description (SET_MEM_TABLE entries; ADD/REM_MEM_REG). */
struct vu_mem_region {
	uint64_t guest_addr;
	uint64_t size;
	uint64_t user_addr;
	uint64_t mmap_offset;
};
_Static_assert(sizeof(struct vu_mem_region) == 32, "memory region is 32 bytes");

/* SET_MEM_TABLE: u32 nregions, u32 padding, regions[nregions]; one fd per region. */
#define VU_MEM_TABLE_MAX 8 /* VHOST_MEMORY_BASELINE_NREGIONS */
struct vu_mem_table {
	uint32_t nregions;
	uint32_t padding;
	struct vu_mem_region regions[VU_MEM_TABLE_MAX];
};
_Static_assert(sizeof(struct vu_mem_table) == 8 + 32 * VU_MEM_TABLE_MAX, "memory table");

/* ADD_MEM_REG / REM_MEM_REG: u64 padding, one region. */
struct vu_mem_reg_msg {
	uint64_t padding;
	struct vu_mem_region region;
};
_Static_assert(sizeof(struct vu_mem_reg_msg) == 40, "single memory region is 40 bytes");

/* GET_CONFIG/SET_CONFIG: u32 offset, u32 size, u32 flags, u8 payload[size]. */
#define VU_CONFIG_HDR_SIZE 12
#define VU_CONFIG_MAX      256 /* VHOST_USER_MAX_CONFIG_SIZE */
struct vu_config {
	uint32_t offset;
	uint32_t size;
	uint32_t flags;
	uint8_t region[VU_CONFIG_MAX];
};
_Static_assert(sizeof(struct vu_config) == VU_CONFIG_HDR_SIZE + VU_CONFIG_MAX, "config");

/* SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 index, bit 8 "no fd" (polling). */
#define VU_VRING_IDX_MASK  0xffu
#define VU_VRING_NOFD_MASK (1u << 8)

/*
 * GET_INFLIGHT_FD / SET_INFLIGHT_FD payload (vhost-user.rst "Inflight
 * description"): u64 mmap_size, u64 mmap_offset, u16 num_queues, u16
 * queue_size. QEMU sends it as a C struct (24 bytes with tail padding).
 */
struct vu_inflight_msg {
	uint64_t mmap_size;
	uint64_t mmap_offset;
	uint16_t num_queues;
	uint16_t queue_size;
	uint32_t pad;
};
_Static_assert(sizeof(struct vu_inflight_msg) == 24, "inflight description");
#define VU_INFLIGHT_MSG_MIN 20

/*
 * Shared inflight region, split rings (vhost-user.rst "Inflight I/O
 * tracking"), one per queue:
 *   struct DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; };
 *   struct QueueRegionSplit { u64 features; u16 version; u16 desc_num;
 *                             u16 last_batch_head; u16 used_idx; DescStateSplit desc[]; };
 */
struct vu_inflight_desc {
	uint8_t inflight;
	uint8_t padding[5];
	uint16_t next;
	uint64_t counter;
};
_Static_assert(sizeof(struct vu_inflight_desc) == 16, "DescStateSplit is 16 bytes");
struct vu_inflight_queue {
	uint64_t features;
	uint16_t version;
	uint16_t desc_num;
	uint16_t last_batch_head;
	uint16_t used_idx;
	struct vu_inflight_desc desc[];
};
_Static_assert(sizeof(struct vu_inflight_queue) == 16, "QueueRegionSplit header is 16 bytes");

/* Largest payload accepted at all (bigger => malformed, disconnect). */
#define VU_MAX_PAYLOAD 512
/* Most fds accepted in one message (SET_MEM_TABLE). */
#define VU_MAX_FDS 8

union vu_payload {
	uint64_t u64;
	struct vu_vring_state state;
	struct vu_vring_addr addr;
	struct vu_mem_table mem;
	struct vu_mem_reg_msg memreg;
	struct vu_config config;
	struct vu_inflight_msg inflight;
	struct vu_log_msg log;
	uint8_t bytes[VU_MAX_PAYLOAD];
};

struct vu_msg {
	struct vu_hdr hdr;
	union vu_payload p;
	int fds[VU_MAX_FDS];
	unsigned nfds;
};

/* ---- memory table ---- */

/* Most regions (GET_MAX_MEM_SLOTS reply; SET_MEM_TABLE is limited to 8). */
#define VHOST_MAX_MEM_SLOTS 32

struct vhost_mem_region {
	uint64_t gpa;   /* guest-physical start */
	uint64_t size;  /* bytes; gpa + size and uva + size do not overflow */
	uint64_t uva;   /* front-end virtual start */
	uint8_t *host;  /* our address of gpa */
	void *map_addr; /* what mmap returned */
	size_t map_len;
};

struct vhost_mem {
	unsigned nregions;
	struct vhost_mem_region r[VHOST_MAX_MEM_SLOTS];
	/* Mappings replaced or removed while elements were in flight; unmapped when
	 * the connection's in-flight count reaches zero. Grown on demand
	 * (control path only). */
	unsigned nretired, retired_cap;
	struct vhost_mem_retired {
		void *addr;
		size_t len;
	} * retired;
};

/* ---- rings ---- */

struct vhost_vq {
	struct vhost_dev *dev;
	unsigned idx;
	void *priv;

	uint16_t num; /* 0 until SET_VRING_NUM */
	bool started; /* SET_VRING_KICK .. GET_VRING_BASE */
	bool enabled; /* SET_VRING_ENABLE (or no PROTOCOL_FEATURES) */
	bool running; /* started && enabled && mapped: ops told (queue_started) */
	bool kick_watched;
	bool drain_pending; /* GET_VRING_BASE reply held until inflight == 0 */
	bool notify_disabled;
	bool pushed;          /* pushed since the last vq_notify decision */
	bool signalled_valid; /* EVENT_IDX: signalled_used is meaningful */

	/* SET_VRING_ADDR, front-end virtual. */
	bool addr_set;
	struct vu_vring_addr addr;
	/* Mapped rings (NULL until translated). */
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	/* Where vq_push writes: the last good translation of the used ring. It
	 * survives a transient unmapping (REM_MEM_REG before the replacing
	 * ADD_MEM_REG); its mapping is kept while elements are in flight. */
	struct vring_used *used_push;

	uint16_t last_avail; /* next avail ring entry to pop */
	uint16_t used_idx;   /* shadow of used->idx */
	uint16_t signalled_used;

	int kick_fd;
	int call_fd;
	int err_fd;

	/* Element slots: one per head index, stride bytes each. */
	uint8_t *slots;
	size_t stride;
	uint16_t slots_num; /* slots allocated for this queue size */
	bool *busy;         /* busy[head]: element in flight */
	struct iovec *iovs; /* VQ_MAX_IOV per slot */
	/* VQ_MAX_IOV per slot, in the same mapping: a copy of the element's
	 * device-writable iovecs, made at pop, which the dirty log marks at
	 * push. The consumer may change the iovecs it was handed (blk/ strips
	 * the status byte, io/ advances over a short transfer); the pages the
	 * device may have written are still these. */
	struct iovec *wiovs;
	size_t iovs_len; /* bytes mapped for iovs and wiovs */
	unsigned inflight;

	/* Inflight I/O tracking (inflight.c). inflight_q: this ring's region in
	 * the shared mapping (SET/GET_INFLIGHT_FD); track: the same once the
	 * ring started with it (kept up to date on pop and push). */
	struct vu_inflight_queue *inflight_q;
	struct vu_inflight_queue *track;
	uint64_t counter;   /* next fetch counter */
	uint16_t *resubmit; /* heads left in flight, in fetch order */
	uint16_t resubmit_n, resubmit_pos;
	/* Counts for the "vring N: ... kicks" line (vhost_vq_log_counts),
	 * written by the thread serving the ring: kick fd wake-ups and the
	 * kicks they read (the eventfd's counter), requests popped, signal
	 * decisions (vhost_vq_signal with something pushed) and calls sent. */
	uint64_t n_kick_wakes, n_kicks, n_pops, n_signal_asks, n_calls;
	/* Each ring on its own cache lines (dev->vqs is allocated aligned):
	 * the thread serving a ring writes its indices and inflight on every
	 * request, and packed 240 bytes apart, ring 0's inflight shared a line
	 * with ring 1's dev and idx, which its own thread reads as often. */
} __attribute__((aligned(64)));

/* ---- connection ---- */

enum vu_rx_state {
	VU_RX_HDR,
	VU_RX_PAYLOAD,
};

struct vhost_dev {
	struct vhost_server *srv;
	const struct vhost_dev_ops *ops;
	void *opaque;

	int sock;
	bool sock_watched;
	bool paused; /* GET_VRING_BASE waiting for a drain */
	bool dead;   /* connection gone; waiting for inflight == 0 */
	bool broken;
	bool reset_pending; /* RESET_DEVICE waiting for a drain */
	bool reset_ack;     /* ... and the front-end asked for an ack */
	uint32_t reset_request;
	unsigned busy; /* nesting depth of vhost/'s own callbacks (atomic: data threads) */
	/* vhost_dev_set_broken() called on a data thread: the reason, for the
	 * owner thread to act on (wake_cb); NULL = none. Atomic. */
	const char *remote_broken;

	uint64_t features;       /* acked virtio features */
	uint64_t proto_features; /* acked protocol features */
	bool owner;
	int backend_fd;

	struct vhost_mem mem;
	unsigned inflight;  /* all rings */
	void *inflight_map; /* shared inflight region (INFLIGHT_SHMFD) */
	size_t inflight_len;
	uint16_t inflight_qs; /* the queue size each ring's region was made for */

	/* Receive state machine. */
	enum vu_rx_state rx_state;
	size_t rx_got;
	struct vu_msg rx;

	unsigned nvqs;
	struct vhost_vq *vqs;

	/* Dirty page log (log.c): the bitmap of SET_LOG_BASE, the eventfd of
	 * SET_LOG_FD. log_on: VHOST_F_LOG_ALL negotiated and a log mapped; the
	 * only thing the push/notify paths test when logging is off. */
	bool log_on;
	bool log_kick_pending; /* bits set since the last SET_LOG_FD signal */
	bool log_warned;       /* an address beyond the log was reported */
	uint8_t *log;          /* log[0] covers guest pages 0..7 */
	uint64_t log_size;     /* bytes of bitmap */
	void *log_map;
	size_t log_map_len;
	int log_fd; /* SET_LOG_FD eventfd, -1 if none */
};

struct vhost_server {
	const struct vhost_dev_ops *ops;
	void *opaque;
	char *path;
	struct util_sock sock; /* the socket file we bound at path (unlinked at exit
				only if the path still names it) */
	int listen_fd;
	bool listen_watched;
	bool accepting;
	int wake_fd;     /* eventfd: deferred work (drain replies, reaping) */
	pthread_t owner; /* the thread that runs the socket (vhost_server_init's) */
	bool wake_watched;
	struct vhost_dev *dev;
};

/* In-flight elements of the connection: data threads change it (atomic). */
#define DEV_INFLIGHT(dev) __atomic_load_n(&(dev)->inflight, __ATOMIC_ACQUIRE)

/* ---- internal functions ---- */

/* server.c */
void vhost_dev_wake(struct vhost_dev *dev);
/* Bracket vhost/'s own callbacks; leave() at depth 0 is a safe point that may free @dev. */
void vhost_dev_enter(struct vhost_dev *dev);
void vhost_dev_leave(struct vhost_dev *dev);
int vhost_dev_send(struct vhost_dev *dev, const struct vu_hdr *hdr, const void *payload);
struct vhost_dev *vhost_dev_new(struct vhost_server *srv, const struct vhost_dev_ops *ops,
				void *opaque, int sock);
void vhost_dev_free(struct vhost_dev *dev);
void vhost_dev_kill(struct vhost_dev *dev);
void vhost_dev_process_deferred(struct vhost_dev *dev);
void vhost_dev_pause(struct vhost_dev *dev);
void vhost_close_fd(int *fd);
int vhost_eventfd_take(int fd, const char *what, int idx);

/* msg.c */
void vhost_msg_dispatch(struct vhost_dev *dev, struct vu_msg *msg);
int vhost_msg_validate_hdr(const struct vu_hdr *hdr);
void vhost_msg_close_fds(struct vu_msg *msg);
uint64_t vhost_offered_features(const struct vhost_dev *dev);
uint64_t vhost_offered_proto_features(const struct vhost_dev *dev);
void vhost_dev_reset_state(struct vhost_dev *dev);
void vhost_dev_reset_finish(struct vhost_dev *dev);

/* inflight.c */
extern vhost_crash_fn *vhost_crash_hook;
#define VHOST_CRASH_POINT(p)                                                                       \
	do {                                                                                       \
		if (__builtin_expect(vhost_crash_hook != NULL, 0))                                 \
			vhost_crash_hook(p);                                                       \
	} while (0)
size_t vhost_inflight_queue_size(uint16_t queue_size);
int vhost_inflight_get(struct vhost_dev *dev, struct vu_inflight_msg *m, int *fdp);
int vhost_inflight_set(struct vhost_dev *dev, const struct vu_inflight_msg *m, int fd);
void vhost_inflight_unmap(struct vhost_dev *dev);
int vhost_inflight_start(struct vhost_vq *vq);
void vhost_inflight_pop(struct vhost_vq *vq, uint16_t head);
void vhost_inflight_push_begin(struct vhost_vq *vq, uint16_t head);
void vhost_inflight_push_end(struct vhost_vq *vq, uint16_t head, uint16_t used_idx);
int vhost_dev_send_fd(struct vhost_dev *dev, const struct vu_hdr *hdr, const void *payload, int fd);

/* log.c */
int vhost_log_set_base(struct vhost_dev *dev, const struct vu_log_msg *m, int fd);
int vhost_log_set_fd(struct vhost_dev *dev, int fd);
void vhost_log_update(struct vhost_dev *dev);
void vhost_log_free(struct vhost_dev *dev);
/* Mark the device-writable buffers of @elem dirty (logging on). */
void vhost_log_elem(struct vhost_vq *vq, const struct vq_elem *elem);
/* Mark @len bytes written at @p in the used ring whose start is @base (logging on). */
void vhost_log_used(struct vhost_vq *vq, const void *base, const void *p, size_t len);
void vhost_log_kick(struct vhost_dev *dev);

/* mem.c */
int vhost_mem_add(struct vhost_dev *dev, const struct vu_mem_region *reg, int fd);
int vhost_mem_remove(struct vhost_dev *dev, const struct vu_mem_region *reg);
int vhost_mem_clear(struct vhost_dev *dev);
void vhost_mem_release_retired(struct vhost_dev *dev);
void vhost_mem_free(struct vhost_dev *dev);
/* Translate [gpa, gpa+len) to at most *len bytes of contiguous host memory. NULL if unmapped. */
void *vhost_gpa_to_host(const struct vhost_dev *dev, uint64_t gpa, uint64_t *len);
/* Translate a front-end virtual range; NULL unless the whole range is in one region. */
void *vhost_uva_to_host(const struct vhost_dev *dev, uint64_t uva, uint64_t len);
/* Whether every byte of [gpa, gpa+len) is in some region. */
bool vhost_gpa_mapped(const struct vhost_dev *dev, uint64_t gpa, uint64_t len);
/* Copy @len bytes of guest memory at @gpa (may span regions). 0 or -EFAULT. */
int vhost_gpa_read(const struct vhost_dev *dev, uint64_t gpa, void *buf, size_t len);

/* vring.c */
void vhost_vq_init(struct vhost_dev *dev, struct vhost_vq *vq, unsigned idx);
void vhost_vq_free(struct vhost_vq *vq);
int vhost_vq_set_num(struct vhost_vq *vq, uint32_t num);
int vhost_vq_map(struct vhost_vq *vq);
void vhost_vq_remap_all(struct vhost_dev *dev);
int vhost_vq_start(struct vhost_vq *vq, int kick_fd);
void vhost_vq_stop(struct vhost_vq *vq);
void vhost_vq_log_stop(struct vhost_vq *vq);
void vhost_vq_log_counts(struct vhost_vq *vq);
void vhost_vq_update_running(struct vhost_vq *vq);
void vhost_vq_release_fds(struct vhost_vq *vq);
void vhost_vq_signal(struct vhost_vq *vq);

#endif /* VHOST_VHOST_INT_H */
