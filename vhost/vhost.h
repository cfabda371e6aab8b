/* SPDX-License-Identifier: MIT */
/*
 * vhost/ — the vhost-user backend protocol and split virtqueues.
 *
 * Knows nothing of virtio-blk, qcow2 or io_uring. The device model above
 * (the daemon's glue) fills struct vhost_dev_ops; vhost/ calls those hooks,
 * which are the only upward calls.
 *
 * Objects:
 *  - struct vhost_server: a listening UNIX socket; accepts one frontend
 *    connection at a time (further ones wait in the backlog until the current
 *    one goes away). After a disconnect, all connection state is dropped and
 *    the next frontend is accepted.
 *  - struct vhost_dev: the state of the current connection (features, memory
 *    table, vrings, backend channel).
 *  - struct vhost_vq: one split virtqueue.
 *
 * Event sources: vhost/ owns no event loop. It asks the glue to watch file
 * descriptors (listening socket, connection socket, kick eventfds) through
 * ops->watch/unwatch; when an fd is readable the glue calls the callback it
 * was given. vhost/ drains kick eventfds itself in that callback.
 *
 * Ring states (vhost-user.rst "Ring states"): a ring is stopped until
 * SET_VRING_KICK, started after; with VHOST_USER_F_PROTOCOL_FEATURES it is
 * also disabled until SET_VRING_ENABLE(1). Buffers are processed only while
 * started and enabled. GET_VRING_BASE stops the ring; its reply is held back
 * until every element popped from that ring has been pushed (in-flight
 * requests drained); socket processing pauses meanwhile.
 *
 * Hostile frontend/guest: every message is validated against a table (payload
 * size, number of fds, reply). Any error on peer input marks the connection
 * broken; it is closed and its fds released, and the server keeps listening.
 * Ring addresses, descriptor addresses and lengths are translated and clamped
 * to the memory regions they fall in; chains are bounded and loops detected.
 *
 * Threading: one owner thread (the one that called vhost_server_init) runs the
 * socket, every message handler and every callback except those of a ring's
 * data path. A ring may be served by another thread (a data thread): vq_pop,
 * vq_push, vq_notify, vq_avail_pending, vq_disable_notify/vq_enable_notify and
 * the kick callback (watch_kick) of that ring run there, one thread per ring.
 * The connection-wide counters they share (in-flight elements, the callback
 * depth, the dirty log and its kick) are atomic; vhost_dev_set_broken() on a
 * data thread only records the reason and wakes the owner, which drops the
 * connection (pops fail at once). Everything else a data thread reads
 * (ring addresses, memory table, features, call fd, log) changes only on the
 * owner thread while no data thread runs: the glue must park its data
 * threads around every owner-thread callback into vhost/ (socket, wake-up)
 * and around every call into vhost/ from outside its data path.
 *
 * Watches: vhost/ drains each watched fd (reads until EAGAIN) in its callback,
 * so edge- or level-triggered watches both work. ops->unwatch may be called
 * from inside the fd's own callback (and for other fds); the glue must not
 * call a callback after unwatch returned. vhost/ never watches an fd twice.
 *
 * Connection end (EOF, protocol error, vhost_dev_set_broken): the socket and
 * the ring/backend fds are closed at once and running rings get
 * queue_stopped; vq_pop fails, but elements already popped stay valid (guest
 * memory stays mapped) and must still be vq_push()ed; such pushes do not touch
 * the ring any more. When the last one is pushed, ops->disconnected is called
 * from a later event-loop callback of vhost/ (never from inside vq_push or
 * another call made by the glue), then all state is freed and the next
 * front-end is accepted. Until then vhost_server_dev() still returns the
 * (broken) device.
 *
 * Memory table changes (SET_MEM_TABLE, REM_MEM_REG) with elements in flight
 * keep the old mappings until nothing is in flight, so iovecs stay valid.
 */
#ifndef VHOST_VHOST_H
#define VHOST_VHOST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct vhost_server;
struct vhost_dev;
struct vhost_vq;

/* Maximum number of iovecs in one element (descriptor chain after translation). */
#define VQ_MAX_IOV 1024
/* Maximum queue size accepted from SET_VRING_NUM. */
#define VQ_MAX_SIZE 1024

/*
 * One popped request: a descriptor chain translated into our address space.
 * The device model embeds this as the FIRST member of its per-request struct;
 * vhost/ preallocates one such struct of ops->elem_size bytes per ring slot.
 */
struct vq_elem {
	uint16_t head;    /* chain head index, unique among in-flight elements */
	uint16_t out_num; /* device-readable iovecs: iov[0 .. out_num) */
	uint16_t in_num;  /* device-writable iovecs: iov[out_num .. out_num + in_num) */
	uint16_t pad;
	struct vhost_vq *vq;
	struct iovec *iov; /* points into vhost/'s storage for this slot */
};

typedef void vhost_watch_cb(void *arg);

struct vhost_dev_ops {
	/* Device feature bits offered (virtio device bits and VIRTIO_F_*); vhost/
	 * adds VHOST_USER_F_PROTOCOL_FEATURES, VERSION_1, RING_INDIRECT_DESC and
	 * RING_EVENT_IDX itself. */
	uint64_t features;
	/* Protocol features offered on top of those vhost/ implements itself
	 * (vhost/ offers MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, BACKEND_REQ,
	 * LOG_SHMFD; and VHOST_F_LOG_ALL: dirty logging for migration, log.c). */
	uint64_t protocol_features;
	uint16_t num_queues;     /* reported by GET_QUEUE_NUM */
	uint16_t max_queue_size; /* largest SET_VRING_NUM accepted (<= VQ_MAX_SIZE) */
	size_t elem_size;        /* bytes per request struct (>= sizeof(struct vq_elem));
				  * slots are 16-byte aligned */

	/* Ask the glue to call @cb(@arg) whenever @fd is readable, until unwatch(fd). 0 or -errno.
	 */
	int (*watch)(void *opaque, int fd, vhost_watch_cb *cb, void *arg);
	/* Stop watching @fd. vhost/ may close @fd right after this returns. */
	void (*unwatch)(void *opaque, int fd);
	/* Optional: watch the kick eventfd of ring @vq (else watch() is used), so
	 * that the glue can poll it on the thread that serves the ring. unwatch()
	 * ends it like any other watch. */
	int (*watch_kick)(void *opaque, struct vhost_vq *vq, int fd, vhost_watch_cb *cb, void *arg);

	/* GET_CONFIG: fill @len bytes of config space starting at @off. 0 or -errno. */
	int (*get_config)(void *opaque, uint8_t *buf, uint32_t off, uint32_t len);
	/* SET_CONFIG: @len bytes at @off (e.g. the WCE byte). 0 or -errno. */
	int (*set_config)(void *opaque, const uint8_t *buf, uint32_t off, uint32_t len);

	/* A new connection is up / features were set (after SET_FEATURES). May be NULL. */
	void (*features_set)(void *opaque, struct vhost_dev *dev, uint64_t features);
	/* Ring became started+enabled (q_started) or stopped/disabled (q_stopped). Also
	 * stopped while its memory is unmapped (REM_MEM_REG) and started again when
	 * it maps, and stopped when the connection ends. Elements popped before a
	 * stop stay valid and must still be pushed. May be NULL. */
	void (*queue_started)(void *opaque, struct vhost_vq *vq);
	void (*queue_stopped)(void *opaque, struct vhost_vq *vq);
	/* The ring has (possibly) new available buffers: pop them. Required. */
	void (*queue_kick)(void *opaque, struct vhost_vq *vq);
	/* The connection is gone (after all its elements were pushed or abandoned). May be NULL. */
	void (*disconnected)(void *opaque, struct vhost_dev *dev);
	/* The memory table changed (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG), after the
	 * change and before any element is popped from the new table; see
	 * vhost_dev_mem_regions(). Not called when the connection ends (disconnected
	 * is, before the memory is unmapped). May be NULL. */
	void (*mem_changed)(void *opaque, struct vhost_dev *dev);
	/* On the owner thread: true while other threads may be using the rings
	 * (the owner serves rings of its own beside them, outside a control
	 * callback): vhost_dev_set_broken() then only records the reason and
	 * wakes the owner, which drops the connection from its wake-up, as for
	 * a data thread. May be NULL (never). */
	bool (*rings_shared)(void *opaque);
};

/* The virtio feature bits (device bits of @ops and vhost/'s own transport
 * bits, VHOST_F_LOG_ALL included) and the vhost-user protocol feature bits a
 * connection with @ops is offered: exactly what GET_FEATURES and
 * GET_PROTOCOL_FEATURES answer. */
uint64_t vhost_ops_features(const struct vhost_dev_ops *ops);
uint64_t vhost_ops_protocol_features(const struct vhost_dev_ops *ops);
/* The name of protocol feature @bit as vhost-user.rst spells it, lower case
 * with dashes ("inflight-shmfd"), or NULL for a bit it does not define. */
const char *vhost_protocol_feature_name(unsigned bit);
/* VHOST_F_LOG_ALL: the virtio feature bit vhost-user uses for dirty logging. */
#define VHOST_FEATURE_LOG_ALL 26

/*
 * Test seam: the instants of inflight tracking (vhost-user.rst "Inflight I/O
 * tracking") at which a kill is the hardest on a restarted back-end. Only
 * rings with an inflight region pass through them. With no hook installed
 * (always, outside tests) each costs one load and a branch predicted not
 * taken; vqcowd installs one only when VQCOWD_TEST_CRASH asks for it.
 */
enum vhost_crash_point {
	VHOST_CRASH_POP_FETCHED, /* head taken from the avail ring, not marked in flight yet */
	VHOST_CRASH_POP_MARKED,  /* marked in flight, not handed to the device model yet */
	VHOST_CRASH_PUSH_LINKED, /* on the batch list, used element not written yet */
	VHOST_CRASH_PUSH_USED,   /* used->idx published, in-flight flag not cleared yet */
	VHOST_CRASH_PUSH_DONE,   /* in-flight flag cleared, region used_idx updated */
	VHOST_CRASH_NPOINTS
};
typedef void vhost_crash_fn(enum vhost_crash_point point);
/* Install @fn (NULL: none), called at every crash point passed. */
void vhost_set_crash_hook(vhost_crash_fn *fn);
/* "pop-fetched", "pop-marked", "push-linked", "push-used", "push-done". */
const char *vhost_crash_point_name(enum vhost_crash_point point);

/* ---- server ---- */

/*
 * Listen on @path, created with mode 0600. A socket file already there is
 * replaced only if it is stale (nobody listens on it: connect() is refused);
 * a live one is refused with -EADDRINUSE, anything that is not a socket with
 * -EEXIST. vhost_server_exit() unlinks @path only if it still names the socket
 * we bound (same device and inode). Or, if @listen_fd >= 0, use that
 * already-listening stream socket (systemd socket activation, --fd), which
 * then belongs to the server (made non-blocking and close-on-exec; not closed
 * on failure). ops->watch, unwatch and queue_kick are required.
 * 0 or -errno.
 */
int vhost_server_init(struct vhost_server **srvp, const char *path, int listen_fd,
		      const struct vhost_dev_ops *ops, void *opaque);

/*
 * Close the current connection (if any; ops->disconnected is called even with
 * elements in flight, which must then never be pushed) and the listening
 * socket; unlink @path if it is still our socket (never an inherited socket's
 * path, nor a socket another process has put there since).
 */
void vhost_server_exit(struct vhost_server *srv);

/* The current connection, or NULL. */
struct vhost_dev *vhost_server_dev(struct vhost_server *srv);

/* Stop accepting new connections (shutdown in progress). */
void vhost_server_stop_accepting(struct vhost_server *srv);

/* ---- device (connection) ---- */

/* Negotiated virtio feature bits. */
uint64_t vhost_dev_features(const struct vhost_dev *dev);
bool vhost_dev_has_feature(const struct vhost_dev *dev, unsigned bit);
uint16_t vhost_dev_num_queues(const struct vhost_dev *dev);
struct vhost_vq *vhost_dev_vq(struct vhost_dev *dev, unsigned idx);

/* Send a config-change notice (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG) over the
 * backend channel. 0, -EOPNOTSUPP (BACKEND_REQ not negotiated or no channel),
 * -ENOTCONN (connection gone) or another -errno from send. Never blocks. */
int vhost_dev_config_changed(struct vhost_dev *dev);

/* Mark the connection broken (e.g. the device model found a malformed request):
 * it is dropped at once (see "Connection end" above). Idempotent. */
void vhost_dev_set_broken(struct vhost_dev *dev, const char *why);
bool vhost_dev_is_broken(const struct vhost_dev *dev);

/*
 * The current memory regions as ranges of our own address space (where
 * element iovecs point): fills up to @max entries of @iov and returns the
 * number of regions (which may exceed @max). Mappings of a replaced table that
 * in-flight elements still use are not included (they stay mapped until
 * those elements are pushed).
 */
unsigned vhost_dev_mem_regions(const struct vhost_dev *dev, struct iovec *iov, unsigned max);

/* Dirty page logging is on: VHOST_F_LOG_ALL negotiated and a log mapped
 * (SET_LOG_BASE) — what QEMU sets up only while it migrates the guest. */
bool vhost_dev_logging(const struct vhost_dev *dev);

/* Number of popped-but-not-pushed elements across all rings. */
unsigned vhost_dev_inflight(const struct vhost_dev *dev);

/* ---- virtqueues ---- */

unsigned vq_index(const struct vhost_vq *vq);
struct vhost_dev *vq_dev(struct vhost_vq *vq);
bool vq_is_running(const struct vhost_vq *vq); /* started and enabled */
uint16_t vq_size(const struct vhost_vq *vq);
unsigned vq_inflight(const struct vhost_vq *vq);

/* Per-queue pointer for the device model. */
void vq_set_priv(struct vhost_vq *vq, void *priv);
void *vq_priv(const struct vhost_vq *vq);

/*
 * Pop the next available chain into its slot and translate it.
 * Returns 0 and *elemp, -EAGAIN if the ring is empty (or not running), -EIO if
 * the connection is already broken, or another -errno if the ring is broken
 * (the connection is then marked broken and no element is returned).
 * With EVENT_IDX, an -EAGAIN return has re-armed the kick (avail_event) and
 * re-checked the ring, so "pop until -EAGAIN" never misses a buffer.
 */
int vq_pop(struct vhost_vq *vq, struct vq_elem **elemp);

/*
 * Has the driver made buffers available that were not popped yet? One plain
 * read of avail->idx: no kick re-arming and no memory barrier, so pollers can
 * call it often. Whenever vq_pop() has returned -EAGAIN with notifications
 * enabled (or vq_enable_notify() returned false), the kick is armed for the
 * next buffer, so a false here needs no further action. False if the ring is
 * not running.
 */
bool vq_avail_pending(const struct vhost_vq *vq);

/*
 * Put @elem on the used ring with @len bytes written to device-writable
 * buffers. The slot is free again on return. Does not notify. Safe after
 * the connection ended (the ring is then left alone). Pushing an element
 * that is not in flight is a bug: logged and ignored.
 */
void vq_push(struct vhost_vq *vq, struct vq_elem *elem, uint32_t len);

/*
 * Signal the call eventfd if the driver wants it (EVENT_IDX / NO_INTERRUPT
 * rules) and anything was pushed since the last notify. Cheap when nothing is
 * pending: call it once per loop iteration per queue.
 */
void vq_notify(struct vhost_vq *vq);

/*
 * Suppress kicks (EVENT_IDX: stop moving avail_event; else set
 * VRING_USED_F_NO_NOTIFY) while the device model is polling the ring, and
 * re-enable them. vq_enable_notify() returns true if buffers became available
 * meanwhile (the caller must then pop again).
 */
void vq_disable_notify(struct vhost_vq *vq);
bool vq_enable_notify(struct vhost_vq *vq);

#endif /* VHOST_VHOST_H */
