/* SPDX-License-Identifier: MIT */
/*
 * vhost/msg.c — vhost-user front-end messages: one table says, per type, the
 * payload size range, the number of fds and whether an explicit reply is
 * sent; vhost_msg_dispatch() is the one place that checks a message against
 * it, closes fds nobody consumed and sends replies / REPLY_ACK acks.
 *
 * Error policy (one place, vhost_msg_dispatch):
 *  - header invalid (version, reply bit, payload too big): disconnect
 *    (vhost_msg_validate_hdr, called by the receive state machine);
 *  - size or fd count outside the table's range: disconnect;
 *  - unknown or unsupported type: fds closed, payload ignored, a line
 *    logged; with need_reply a failure ack is sent; a known type the
 *    front-end expects an explicit reply to (GET_INFLIGHT_FD, GET_STATUS...)
 *    closes the connection (such replies have no failure form, and silence
 *    would leave the front-end waiting forever); otherwise it is ignored;
 *  - handler failure: with need_reply a failure ack (the front-end decides);
 *    without it the front-end would go on with a state we did not accept,
 *    so the connection is dropped. Messages with an explicit reply that fail
 *    drop the connection, except GET_CONFIG (replied with size 0, as
 *    vhost-user.rst allows front-ends to detect).
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "vhost_int.h"

/* Handler result: the reply is sent later (GET_VRING_BASE waiting for a drain). */
#define VU_DEFERRED 1

struct msg_spec {
	const char *name;
	uint32_t min_size, max_size;
	uint8_t min_fds, max_fds;
	bool reply; /* explicit reply with the same request code */
	int (*handle)(struct vhost_dev *dev, struct vu_msg *msg);
};

/* Transport bits the device model may not offer through us: NOTIFY_ON_EMPTY (24),
 * ACCESS_PLATFORM (33), RING_PACKED (34), IN_ORDER (35), NOTIFICATION_DATA
 * (38) — none is implemented here. VHOST_F_LOG_ALL (26) is vhost/'s own. */
#define VHOST_UNSUPPORTED_FEATURES                                                                 \
	((1ull << 24) | (1ull << 33) | (1ull << 34) | (1ull << 35) | (1ull << 38))

uint64_t vhost_ops_features(const struct vhost_dev_ops *ops)
{
	return (ops->features & ~VHOST_UNSUPPORTED_FEATURES) |
	       (1ull << VHOST_USER_F_PROTOCOL_FEATURES) | (1ull << 32 /* VIRTIO_F_VERSION_1 */) |
	       (1ull << VHOST_F_LOG_ALL) | (1ull << VIRTIO_RING_F_INDIRECT_DESC) |
	       (1ull << VIRTIO_RING_F_EVENT_IDX);
}

uint64_t vhost_ops_protocol_features(const struct vhost_dev_ops *ops)
{
	return ops->protocol_features | (1ull << VU_PROTO_F_MQ) | (1ull << VU_PROTO_F_LOG_SHMFD) |
	       (1ull << VU_PROTO_F_RESET_DEVICE) | (1ull << VU_PROTO_F_INFLIGHT_SHMFD) |
	       (1ull << VU_PROTO_F_REPLY_ACK) | (1ull << VU_PROTO_F_BACKEND_REQ) |
	       (1ull << VU_PROTO_F_CONFIG) | (1ull << VU_PROTO_F_CONFIGURE_MEM_SLOTS);
}

const char *vhost_protocol_feature_name(unsigned bit)
{
	/* vhost-user.rst "Protocol features", lower case with dashes (the
	 * names vhost-user.json uses for its enums). */
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

	return bit < sizeof(names) / sizeof(names[0]) ? names[bit] : NULL;
}

uint64_t vhost_offered_features(const struct vhost_dev *dev)
{
	return vhost_ops_features(dev->ops);
}

uint64_t vhost_offered_proto_features(const struct vhost_dev *dev)
{
	return vhost_ops_protocol_features(dev->ops);
}

void vhost_msg_close_fds(struct vu_msg *msg)
{
	for (unsigned i = 0; i < msg->nfds; i++) {
		if (msg->fds[i] >= 0)
			close(msg->fds[i]);
		msg->fds[i] = -1;
	}
	msg->nfds = 0;
}

/* Take fd @i out of the message (the handler now owns it). */
static int take_fd(struct vu_msg *msg, unsigned i)
{
	int fd = msg->fds[i];

	msg->fds[i] = -1;
	return fd;
}

int vhost_msg_validate_hdr(const struct vu_hdr *hdr)
{
	if ((hdr->flags & VU_FLAG_VERSION_MASK) != VU_VERSION) {
		vhost_warn("bad message version (flags 0x%x)", hdr->flags);
		return -EPROTO;
	}
	if (hdr->flags & VU_FLAG_REPLY) {
		vhost_warn("front-end sent a reply (request %u)", hdr->request);
		return -EPROTO;
	}
	if (hdr->size > VU_MAX_PAYLOAD) {
		vhost_warn("message %u payload too large (%u bytes)", hdr->request, hdr->size);
		return -EPROTO;
	}
	return 0;
}

static struct vhost_vq *msg_vq(struct vhost_dev *dev, uint32_t index)
{
	if (index >= dev->nvqs) {
		vhost_warn("ring index %u out of range (%u rings)", index, dev->nvqs);
		return NULL;
	}
	return &dev->vqs[index];
}

static void reply_u64(struct vu_msg *msg, uint64_t v)
{
	msg->p.u64 = v;
	msg->hdr.size = sizeof(uint64_t);
}

/* ---- handlers ---- */

static int h_get_features(struct vhost_dev *dev, struct vu_msg *msg)
{
	reply_u64(msg, vhost_offered_features(dev));
	return 0;
}

static int h_set_features(struct vhost_dev *dev, struct vu_msg *msg)
{
	uint64_t f = msg->p.u64;

	if (f & ~vhost_offered_features(dev)) {
		vhost_warn("SET_FEATURES with bits not offered: 0x%llx",
			   (unsigned long long)(f & ~vhost_offered_features(dev)));
		return -EINVAL;
	}
	dev->features = f;
	vhost_log_update(dev); /* VHOST_F_LOG_ALL: dirty logging on or off */
	/* vhost-user.rst: without VHOST_USER_F_PROTOCOL_FEATURES rings are
	 * enabled as soon as they start; with it they wait for SET_VRING_ENABLE. */
	if (!(f & (1ull << VHOST_USER_F_PROTOCOL_FEATURES))) {
		for (unsigned i = 0; i < dev->nvqs; i++)
			dev->vqs[i].enabled = true;
	}
	/* EVENT_IDX changes the ring sizes. */
	vhost_vq_remap_all(dev);
	if (dev->ops->features_set && !dev->dead)
		dev->ops->features_set(dev->opaque, dev, f);
	return 0;
}

static int h_get_protocol_features(struct vhost_dev *dev, struct vu_msg *msg)
{
	reply_u64(msg, vhost_offered_proto_features(dev));
	return 0;
}

static int h_set_protocol_features(struct vhost_dev *dev, struct vu_msg *msg)
{
	if (msg->p.u64 & ~vhost_offered_proto_features(dev)) {
		vhost_warn("SET_PROTOCOL_FEATURES with bits not offered");
		return -EINVAL;
	}
	dev->proto_features = msg->p.u64;
	return 0;
}

static int h_set_owner(struct vhost_dev *dev, struct vu_msg *msg)
{
	dev->owner = true;
	return 0;
}

/*
 * RESET_OWNER (deprecated) / RESET_DEVICE: "disable all rings and reset all
 * internal device state to the initial state, ready to be reinitialized; the
 * back-end retains ownership" (vhost-user.rst). Rings stop at once (nothing
 * more is popped); the state is reset only once every popped element has
 * been pushed, so no completion lands in a ring the front-end set up anew:
 * like GET_VRING_BASE, the socket pauses until then and a REPLY_ACK ack is
 * sent after the reset (vhost_dev_reset_finish).
 */
static int h_reset(struct vhost_dev *dev, struct vu_msg *msg)
{
	for (unsigned i = 0; i < dev->nvqs && !dev->dead; i++) {
		struct vhost_vq *vq = &dev->vqs[i];

		vhost_vq_stop(vq);
		vq->enabled = false;
		vhost_vq_update_running(vq);
	}
	if (dev->dead)
		return -EIO;
	if (DEV_INFLIGHT(dev)) {
		dev->reset_pending = true;
		dev->reset_ack = msg->hdr.flags & VU_FLAG_NEED_REPLY;
		dev->reset_request = msg->hdr.request;
		vhost_dev_pause(dev);
		return VU_DEFERRED;
	}
	vhost_dev_reset_state(dev);
	return 0;
}

/* Forget every ring's and the device's negotiated state (nothing in flight). */
void vhost_dev_reset_state(struct vhost_dev *dev)
{
	for (unsigned i = 0; i < dev->nvqs; i++) {
		struct vhost_vq *vq = &dev->vqs[i];

		vhost_vq_stop(vq);
		vhost_vq_release_fds(vq);
		vq->enabled = false;
		vq->num = 0;
		vq->addr_set = false;
		vq->desc = NULL;
		vq->avail = NULL;
		vq->used = NULL;
		vq->used_push = NULL;
		vq->last_avail = 0;
		vq->used_idx = 0;
		vq->signalled_used = 0;
		vq->signalled_valid = false;
		vq->pushed = false;
		vq->notify_disabled = false;
		vq->drain_pending = false;
	}
	dev->features = 0;
	vhost_log_free(dev);
	/* QEMU drops its inflight buffer on a device reset and gets a new one. */
	vhost_inflight_unmap(dev);
}

/* A deferred reset whose rings have drained: reset, then ack if asked to. */
void vhost_dev_reset_finish(struct vhost_dev *dev)
{
	struct vu_hdr hdr = {.request = dev->reset_request,
			     .flags = VU_VERSION | VU_FLAG_REPLY,
			     .size = sizeof(uint64_t)};
	uint64_t zero = 0;

	dev->reset_pending = false;
	vhost_dev_reset_state(dev);
	if (dev->reset_ack)
		vhost_dev_send(dev, &hdr, &zero);
}

/* Tell the device model, before any ring runs on the new table. */
static void mem_changed(struct vhost_dev *dev)
{
	if (dev->ops->mem_changed)
		dev->ops->mem_changed(dev->opaque, dev);
}

static int h_set_mem_table(struct vhost_dev *dev, struct vu_msg *msg)
{
	const struct vu_mem_table *t = &msg->p.mem;
	int ret = 0;

	if (t->nregions > VU_MEM_TABLE_MAX || t->nregions != msg->nfds ||
	    msg->hdr.size < 8 + t->nregions * sizeof(struct vu_mem_region)) {
		vhost_warn("SET_MEM_TABLE: %u regions, %u fds, %u bytes", t->nregions, msg->nfds,
			   msg->hdr.size);
		return -EINVAL;
	}
	if (vhost_mem_clear(dev) < 0)
		return -ENOMEM;
	for (unsigned i = 0; i < t->nregions; i++) {
		int r = vhost_mem_add(dev, &t->regions[i], take_fd(msg, i));

		if (r < 0 && ret == 0)
			ret = r;
	}
	if (ret < 0)
		vhost_mem_clear(dev); /* all or nothing; the new mappings are unused */
	mem_changed(dev);
	vhost_vq_remap_all(dev);
	return ret;
}

static int h_get_max_mem_slots(struct vhost_dev *dev, struct vu_msg *msg)
{
	reply_u64(msg, VHOST_MAX_MEM_SLOTS);
	return 0;
}

static int h_add_mem_reg(struct vhost_dev *dev, struct vu_msg *msg)
{
	int ret = vhost_mem_add(dev, &msg->p.memreg.region, take_fd(msg, 0));

	if (ret < 0)
		return ret;
	mem_changed(dev);
	vhost_vq_remap_all(dev);
	return 0;
}

static int h_rem_mem_reg(struct vhost_dev *dev, struct vu_msg *msg)
{
	/* Older front-ends attach the region's fd: the dispatcher closes it. */
	int ret = vhost_mem_remove(dev, &msg->p.memreg.region);

	if (ret < 0) {
		vhost_warn("REM_MEM_REG: no region at gpa 0x%llx",
			   (unsigned long long)msg->p.memreg.region.guest_addr);
		return ret;
	}
	mem_changed(dev);
	vhost_vq_remap_all(dev);
	return 0;
}

static int h_set_vring_num(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vhost_vq *vq = msg_vq(dev, msg->p.state.index);

	return vq ? vhost_vq_set_num(vq, msg->p.state.num) : -EINVAL;
}

static int h_set_vring_addr(struct vhost_dev *dev, struct vu_msg *msg)
{
	const struct vu_vring_addr *a = &msg->p.addr;
	struct vhost_vq *vq = msg_vq(dev, a->index);

	if (!vq)
		return -EINVAL;
	/* VHOST_VRING_F_LOG: used-ring writes are logged at log (log_guest_addr)
	 * while VHOST_F_LOG_ALL is on (log.c). */
	vq->addr = *a;
	vq->addr_set = true;
	if (vhost_vq_map(vq) < 0) {
		vhost_vq_update_running(vq);
		return -EFAULT;
	}
	vhost_vq_update_running(vq);
	return 0;
}

static int h_set_vring_base(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vhost_vq *vq = msg_vq(dev, msg->p.state.index);

	if (!vq)
		return -EINVAL;
	if (vq->started || msg->p.state.num > UINT16_MAX) {
		vhost_warn("vring %u: SET_VRING_BASE %u refused", vq->idx, msg->p.state.num);
		return -EINVAL;
	}
	vq->last_avail = (uint16_t)msg->p.state.num;
	return 0;
}

/* Stop the ring; reply once its in-flight elements have been pushed. */
static int h_get_vring_base(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vhost_vq *vq = msg_vq(dev, msg->p.state.index);

	if (!vq)
		return -EINVAL;
	vhost_vq_stop(vq);
	if (dev->dead)
		return -EIO;
	if (vq->inflight) {
		vq->drain_pending = true;
		vhost_dev_pause(dev);
		return VU_DEFERRED;
	}
	vhost_vq_signal(vq);
	vhost_vq_log_stop(vq);
	msg->p.state.num = vq->last_avail;
	msg->hdr.size = sizeof(msg->p.state);
	return 0;
}

/*
 * Parse the u64 of SET_VRING_KICK/CALL/ERR; *fd = the fd or -1 with the no-fd
 * flag. NULL for a bad payload or ring, with the fd (if any) closed.
 */
static struct vhost_vq *vring_fd_msg(struct vhost_dev *dev, struct vu_msg *msg, int *fd)
{
	uint64_t v = msg->p.u64;
	bool nofd = v & VU_VRING_NOFD_MASK;
	struct vhost_vq *vq;

	*fd = -1;
	if ((v & ~(uint64_t)(VU_VRING_IDX_MASK | VU_VRING_NOFD_MASK)) ||
	    msg->nfds != (nofd ? 0u : 1u)) {
		vhost_warn("vring fd message: bad payload 0x%llx with %u fd(s)",
			   (unsigned long long)v, msg->nfds);
		return NULL;
	}
	if (!nofd)
		*fd = take_fd(msg, 0);
	vq = msg_vq(dev, v & VU_VRING_IDX_MASK);
	if (!vq)
		vhost_close_fd(fd);
	return vq;
}

/* vring_fd_msg for CALL and ERR: the fd must be an eventfd (we write it). */
static struct vhost_vq *vring_signal_fd_msg(struct vhost_dev *dev, struct vu_msg *msg, int *fd,
					    const char *what)
{
	struct vhost_vq *vq = vring_fd_msg(dev, msg, fd);

	if (vq && *fd >= 0 && vhost_eventfd_take(*fd, what, (int)vq->idx) < 0) {
		*fd = -1;
		return NULL;
	}
	return vq;
}

static int h_set_vring_kick(struct vhost_dev *dev, struct vu_msg *msg)
{
	int fd;
	struct vhost_vq *vq = vring_fd_msg(dev, msg, &fd);

	if (!vq)
		return -EINVAL;
	if (fd < 0) {
		vhost_warn("vring %u: polling mode (no kick fd) not supported", vq->idx);
		return -ENOTSUP;
	}
	return vhost_vq_start(vq, fd);
}

static int h_set_vring_call(struct vhost_dev *dev, struct vu_msg *msg)
{
	int fd;
	struct vhost_vq *vq = vring_signal_fd_msg(dev, msg, &fd, "call");

	if (!vq)
		return -EINVAL;
	vhost_close_fd(&vq->call_fd);
	vq->call_fd = fd;
	/* Signal the new fd once, as libvhost-user does: completions pushed
	 * while there was no call fd (or one the front-end had already stopped
	 * listening to, around a reconnect) must not stay unseen by the driver.
	 * A spurious interrupt only makes it look at an unchanged used ring. */
	if (fd >= 0) {
		uint64_t one = 1;
		ssize_t n = write(fd, &one, sizeof(one));

		(void)n; /* EAGAIN: the counter is saturated, a signal is pending anyway */
	}
	return 0;
}

static int h_set_vring_err(struct vhost_dev *dev, struct vu_msg *msg)
{
	int fd;
	struct vhost_vq *vq = vring_signal_fd_msg(dev, msg, &fd, "error");

	if (!vq)
		return -EINVAL;
	vhost_close_fd(&vq->err_fd);
	vq->err_fd = fd;
	return 0;
}

static int h_get_queue_num(struct vhost_dev *dev, struct vu_msg *msg)
{
	reply_u64(msg, dev->nvqs);
	return 0;
}

static int h_set_vring_enable(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vhost_vq *vq = msg_vq(dev, msg->p.state.index);

	if (!vq || msg->p.state.num > 1)
		return -EINVAL;
	vq->enabled = msg->p.state.num;
	vhost_vq_update_running(vq);
	return 0;
}

static bool config_range_ok(const struct vu_msg *msg)
{
	const struct vu_config *c = &msg->p.config;

	return c->size <= VU_CONFIG_MAX && msg->hdr.size >= VU_CONFIG_HDR_SIZE + c->size &&
	       (uint64_t)c->offset + c->size <= VU_CONFIG_MAX;
}

static int h_get_config(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vu_config *c = &msg->p.config;
	int ret = -ENOTSUP;

	if (config_range_ok(msg) && dev->ops->get_config)
		ret = dev->ops->get_config(dev->opaque, c->region, c->offset, c->size);
	if (ret < 0) {
		/* Failure is signalled by a reply without payload. */
		vhost_warn("GET_CONFIG offset %u size %u failed", c->offset, c->size);
		msg->hdr.size = 0;
		return 0;
	}
	msg->hdr.size = VU_CONFIG_HDR_SIZE + c->size;
	return 0;
}

static int h_set_config(struct vhost_dev *dev, struct vu_msg *msg)
{
	struct vu_config *c = &msg->p.config;

	if (!config_range_ok(msg) || !dev->ops->set_config)
		return -EINVAL;
	return dev->ops->set_config(dev->opaque, c->region, c->offset, c->size);
}

static int h_set_backend_req_fd(struct vhost_dev *dev, struct vu_msg *msg)
{
	vhost_close_fd(&dev->backend_fd);
	dev->backend_fd = take_fd(msg, 0);
	return 0;
}

/* GET_INFLIGHT_FD: a fresh shared region; the reply carries its fd. */
static int h_get_inflight_fd(struct vhost_dev *dev, struct vu_msg *msg)
{
	int fd, ret = vhost_inflight_get(dev, &msg->p.inflight, &fd);

	if (ret < 0)
		return ret;
	msg->p.inflight.pad = 0;
	msg->hdr.flags = VU_VERSION | VU_FLAG_REPLY;
	msg->hdr.size = sizeof(msg->p.inflight);
	vhost_dev_send_fd(dev, &msg->hdr, &msg->p, fd);
	close(fd);          /* the mapping keeps the region; the front-end has its copy */
	return VU_DEFERRED; /* replied */
}

/* SET_LOG_BASE (LOG_SHMFD): map the log; the reply tells the front-end it is in use. */
static int h_set_log_base(struct vhost_dev *dev, struct vu_msg *msg)
{
	int ret = vhost_log_set_base(dev, &msg->p.log, msg->fds[0]);

	if (ret < 0)
		return ret;
	reply_u64(msg, 0);
	return 0;
}

static int h_set_log_fd(struct vhost_dev *dev, struct vu_msg *msg)
{
	int fd = take_fd(msg, 0);

	/* written on every dirty-log kick, from any data thread */
	if (vhost_eventfd_take(fd, "log", -1) < 0)
		return -EINVAL;
	return vhost_log_set_fd(dev, fd);
}

static int h_set_inflight_fd(struct vhost_dev *dev, struct vu_msg *msg)
{
	return vhost_inflight_set(dev, &msg->p.inflight, msg->fds[0]);
}

#define U64   sizeof(uint64_t)
#define STATE sizeof(struct vu_vring_state)
static const struct msg_spec msg_table[VU_MSG_MAX] = {
    [VU_GET_FEATURES] = {"GET_FEATURES", 0, 0, 0, 0, true, h_get_features},
    [VU_SET_FEATURES] = {"SET_FEATURES", U64, U64, 0, 0, false, h_set_features},
    [VU_SET_OWNER] = {"SET_OWNER", 0, 0, 0, 0, false, h_set_owner},
    [VU_RESET_OWNER] = {"RESET_OWNER", 0, 0, 0, 0, false, h_reset},
    [VU_SET_MEM_TABLE] = {"SET_MEM_TABLE", 8, sizeof(struct vu_mem_table), 0, VU_MEM_TABLE_MAX,
			  false, h_set_mem_table},
    [VU_SET_VRING_NUM] = {"SET_VRING_NUM", STATE, STATE, 0, 0, false, h_set_vring_num},
    [VU_SET_VRING_ADDR] = {"SET_VRING_ADDR", sizeof(struct vu_vring_addr),
			   sizeof(struct vu_vring_addr), 0, 0, false, h_set_vring_addr},
    [VU_SET_VRING_BASE] = {"SET_VRING_BASE", STATE, STATE, 0, 0, false, h_set_vring_base},
    [VU_GET_VRING_BASE] = {"GET_VRING_BASE", STATE, STATE, 0, 0, true, h_get_vring_base},
    [VU_SET_VRING_KICK] = {"SET_VRING_KICK", U64, U64, 0, 1, false, h_set_vring_kick},
    [VU_SET_VRING_CALL] = {"SET_VRING_CALL", U64, U64, 0, 1, false, h_set_vring_call},
    [VU_SET_VRING_ERR] = {"SET_VRING_ERR", U64, U64, 0, 1, false, h_set_vring_err},
    [VU_GET_PROTOCOL_FEATURES] = {"GET_PROTOCOL_FEATURES", 0, 0, 0, 0, true,
				  h_get_protocol_features},
    [VU_SET_PROTOCOL_FEATURES] = {"SET_PROTOCOL_FEATURES", U64, U64, 0, 0, false,
				  h_set_protocol_features},
    [VU_GET_QUEUE_NUM] = {"GET_QUEUE_NUM", 0, 0, 0, 0, true, h_get_queue_num},
    [VU_SET_VRING_ENABLE] = {"SET_VRING_ENABLE", STATE, STATE, 0, 0, false, h_set_vring_enable},
    [VU_SET_BACKEND_REQ_FD] = {"SET_BACKEND_REQ_FD", 0, 0, 1, 1, false, h_set_backend_req_fd},
    [VU_GET_CONFIG] = {"GET_CONFIG", VU_CONFIG_HDR_SIZE, sizeof(struct vu_config), 0, 0, true,
		       h_get_config},
    [VU_SET_CONFIG] = {"SET_CONFIG", VU_CONFIG_HDR_SIZE, sizeof(struct vu_config), 0, 0, false,
		       h_set_config},
    [VU_RESET_DEVICE] = {"RESET_DEVICE", 0, 0, 0, 0, false, h_reset},
    [VU_GET_MAX_MEM_SLOTS] = {"GET_MAX_MEM_SLOTS", 0, 0, 0, 0, true, h_get_max_mem_slots},
    [VU_ADD_MEM_REG] = {"ADD_MEM_REG", sizeof(struct vu_mem_reg_msg), sizeof(struct vu_mem_reg_msg),
			1, 1, false, h_add_mem_reg},
    [VU_REM_MEM_REG] = {"REM_MEM_REG", sizeof(struct vu_mem_reg_msg), sizeof(struct vu_mem_reg_msg),
			0, 1, false, h_rem_mem_reg},
    [VU_GET_INFLIGHT_FD] = {"GET_INFLIGHT_FD", VU_INFLIGHT_MSG_MIN, sizeof(struct vu_inflight_msg),
			    0, 0, true, h_get_inflight_fd},
    /* With LOG_SHMFD (the only form we offer) QEMU waits for a reply. */
    [VU_SET_LOG_BASE] = {"SET_LOG_BASE", sizeof(struct vu_log_msg), sizeof(struct vu_log_msg), 1, 1,
			 true, h_set_log_base},
    [VU_SET_LOG_FD] = {"SET_LOG_FD", 0, 0, 1, 1, false, h_set_log_fd},
    [VU_SET_INFLIGHT_FD] = {"SET_INFLIGHT_FD", VU_INFLIGHT_MSG_MIN, sizeof(struct vu_inflight_msg),
			    1, 1, false, h_set_inflight_fd},
    /* Known but not implemented (no handler): named for the log; those the
     * front-end expects an explicit reply to close the connection. */
    [VU_SEND_RARP] = {"SEND_RARP", 0, 0, 0, 0, false, NULL},
    [VU_NET_SET_MTU] = {"NET_SET_MTU", 0, 0, 0, 0, false, NULL},
    [VU_IOTLB_MSG] = {"IOTLB_MSG", 0, 0, 0, 0, false, NULL},
    [VU_SET_VRING_ENDIAN] = {"SET_VRING_ENDIAN", 0, 0, 0, 0, false, NULL},
    [VU_CREATE_CRYPTO_SESSION] = {"CREATE_CRYPTO_SESSION", 0, 0, 0, 0, true, NULL},
    [VU_CLOSE_CRYPTO_SESSION] = {"CLOSE_CRYPTO_SESSION", 0, 0, 0, 0, false, NULL},
    [VU_POSTCOPY_ADVISE] = {"POSTCOPY_ADVISE", 0, 0, 0, 0, true, NULL},
    [VU_POSTCOPY_LISTEN] = {"POSTCOPY_LISTEN", 0, 0, 0, 0, false, NULL},
    [VU_POSTCOPY_END] = {"POSTCOPY_END", 0, 0, 0, 0, false, NULL},
    [VU_GPU_SET_SOCKET] = {"GPU_SET_SOCKET", 0, 0, 0, 0, false, NULL},
    [VU_VRING_KICK] = {"VRING_KICK", 0, 0, 0, 0, false, NULL},
    [VU_SET_STATUS] = {"SET_STATUS", 0, 0, 0, 0, false, NULL},
    [VU_GET_STATUS] = {"GET_STATUS", 0, 0, 0, 0, true, NULL},
    [VU_GET_SHARED_OBJECT] = {"GET_SHARED_OBJECT", 0, 0, 0, 0, true, NULL},
    [VU_SET_DEVICE_STATE_FD] = {"SET_DEVICE_STATE_FD", 0, 0, 0, 0, true, NULL},
    [VU_CHECK_DEVICE_STATE] = {"CHECK_DEVICE_STATE", 0, 0, 0, 0, true, NULL},
};
#undef U64
#undef STATE

static void send_ack(struct vhost_dev *dev, uint32_t request, int ret)
{
	struct vu_hdr hdr = {
	    .request = request, .flags = VU_VERSION | VU_FLAG_REPLY, .size = sizeof(uint64_t)};
	uint64_t v = ret < 0 ? (uint64_t)-ret : 0;

	vhost_dev_send(dev, &hdr, &v);
}

void vhost_msg_dispatch(struct vhost_dev *dev, struct vu_msg *msg)
{
	uint32_t req = msg->hdr.request;
	bool need_reply = msg->hdr.flags & VU_FLAG_NEED_REPLY;
	const struct msg_spec *spec = req < VU_MSG_MAX ? &msg_table[req] : NULL;
	int ret;

	if (vlog_enabled(VLOG_DEBUG))
		vhost_dbg("<- %s (%u) flags 0x%x size %u fds %u",
			  spec && spec->name ? spec->name : "?", req, msg->hdr.flags, msg->hdr.size,
			  msg->nfds);
	if (!spec || !spec->handle) {
		const char *name = spec && spec->name ? spec->name : "unknown message";

		vhost_msg_close_fds(msg);
		if (spec && spec->reply) {
			/* The front-end waits for a reply whose payload we cannot
			 * fill (and which has no failure form; REPLY_ACK does not
			 * apply to it): never leave it waiting. A correct one sends
			 * these only after negotiating a feature we did not offer. */
			vhost_warn("%s (%u) not supported and it expects a reply: closing the "
				   "connection",
				   name, req);
			vhost_dev_kill(dev);
		} else if (need_reply) {
			vhost_warn("%s (%u) not supported: refused", name, req);
			send_ack(dev, req, -ENOTSUP);
		} else {
			vhost_warn("%s (%u) not supported: ignored", name, req);
		}
		return;
	}
	if (msg->hdr.size < spec->min_size || msg->hdr.size > spec->max_size) {
		vhost_warn("%s: bad payload size %u: closing the connection", spec->name,
			   msg->hdr.size);
		vhost_msg_close_fds(msg);
		vhost_dev_kill(dev);
		return;
	}
	if (msg->nfds < spec->min_fds || msg->nfds > spec->max_fds) {
		/* Log before closing them: closing resets the count. */
		vhost_warn("%s: unexpected number of fds (%u): closing the connection", spec->name,
			   msg->nfds);
		vhost_msg_close_fds(msg);
		vhost_dev_kill(dev);
		return;
	}
	/* Handlers may read the whole fixed-size struct: zero what was not sent. */
	memset(msg->p.bytes + msg->hdr.size, 0, sizeof(msg->p) - msg->hdr.size);

	ret = spec->handle(dev, msg);
	vhost_msg_close_fds(msg);
	if (dev->dead || ret == VU_DEFERRED)
		return;
	if (spec->reply) {
		if (ret < 0) {
			vhost_warn("%s failed: %s: closing the connection", spec->name,
				   strerror(-ret));
			vhost_dev_kill(dev);
			return;
		}
		msg->hdr.flags = VU_VERSION | VU_FLAG_REPLY;
		vhost_dev_send(dev, &msg->hdr, &msg->p);
		return;
	}
	if (need_reply) {
		if (ret < 0)
			vhost_warn("%s failed: %s", spec->name, strerror(-ret));
		send_ack(dev, req, ret);
		return;
	}
	if (ret < 0) {
		vhost_warn("%s failed without a way to report it: %s: closing the connection",
			   spec->name, strerror(-ret));
		vhost_dev_kill(dev);
	}
}
