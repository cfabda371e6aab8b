/* SPDX-License-Identifier: MIT */
/*
 * vhost/vring.c — split virtqueues (virtio 1.2 §2.7): ring mapping, pop, push,
 * notification suppression.
 *
 * The guest is hostile. Invariants kept here:
 *  - ring pointers (desc/avail/used) are non-NULL only if the whole ring lies
 *    in one mapped region, correctly aligned, for the current queue size;
 *  - every descriptor is read once into a local copy before it is checked;
 *  - a chain visits at most `num` descriptors of the descriptor table, or at
 *    most len/16 of an indirect table (loops end there), and yields at most
 *    VQ_MAX_IOV iovecs, each clamped to the region its address falls in;
 *  - a head index is in flight at most once (busy[]), so slots never alias;
 *  - the used ring is written only while the connection is alive.
 * Any violation marks the connection broken (vhost_dev_set_broken).
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vhost_int.h"

#define LOAD16(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD32(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD64(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE16(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

static bool has_feature(const struct vhost_dev *dev, unsigned bit)
{
	return (dev->features >> bit) & 1;
}

static uint16_t *avail_event_ptr(struct vhost_vq *vq)
{
	/* avail_event sits right after used->ring[num] (virtio 1.2 §2.7.8). */
	return (uint16_t *)&vq->used->ring[vq->num];
}

/* Dirty-log a write into the used ring at @p (ring mapped at @base). One
 * predictable branch while logging is off. */
static inline void used_written(struct vhost_vq *vq, const void *base, const void *p, size_t len)
{
	if (__builtin_expect(vq->dev->log_on, 0))
		vhost_log_used(vq, base, p, len);
}

static void avail_event_store(struct vhost_vq *vq)
{
	STORE16(avail_event_ptr(vq), htole16(vq->last_avail));
	used_written(vq, vq->used, avail_event_ptr(vq), sizeof(uint16_t));
}

static void used_flags_store(struct vhost_vq *vq, uint16_t f)
{
	STORE16(&vq->used->flags, htole16(f));
	used_written(vq, vq->used, &vq->used->flags, sizeof(uint16_t));
}

static uint16_t *used_event_ptr(struct vhost_vq *vq)
{
	/* used_event sits right after avail->ring[num]. */
	return &vq->avail->ring[vq->num];
}

void vhost_vq_init(struct vhost_dev *dev, struct vhost_vq *vq, unsigned idx)
{
	memset(vq, 0, sizeof(*vq));
	vq->dev = dev;
	vq->idx = idx;
	vq->kick_fd = -1;
	vq->call_fd = -1;
	vq->err_fd = -1;
}

static void vq_free_slots(struct vhost_vq *vq)
{
	free(vq->slots);
	free(vq->busy);
	if (vq->iovs)
		munmap(vq->iovs, vq->iovs_len);
	vq->slots = NULL;
	vq->busy = NULL;
	vq->iovs = NULL;
	vq->wiovs = NULL;
	vq->iovs_len = 0;
	vq->slots_num = 0;
}

void vhost_vq_free(struct vhost_vq *vq)
{
	vhost_vq_log_counts(vq); /* a ring the front-end left without GET_VRING_BASE */
	vhost_vq_release_fds(vq);
	vq_free_slots(vq);
}

void vhost_vq_release_fds(struct vhost_vq *vq)
{
	const struct vhost_dev_ops *ops = vq->dev->ops;

	if (vq->kick_watched) {
		ops->unwatch(vq->dev->opaque, vq->kick_fd);
		vq->kick_watched = false;
	}
	vhost_close_fd(&vq->kick_fd);
	vhost_close_fd(&vq->call_fd);
	vhost_close_fd(&vq->err_fd);
}

/* SET_VRING_NUM: queue size, power of 2 (split rings), ring stopped and drained. */
int vhost_vq_set_num(struct vhost_vq *vq, uint32_t num)
{
	const struct vhost_dev_ops *ops = vq->dev->ops;
	uint32_t max = ops->max_queue_size ? ops->max_queue_size : VQ_MAX_SIZE;
	size_t stride, iovs_len;
	void *iovs;

	if (max > VQ_MAX_SIZE)
		max = VQ_MAX_SIZE;
	if (num == 0 || num > max || (num & (num - 1))) {
		vhost_warn("vring %u: bad size %u (max %u, power of 2)", vq->idx, num, max);
		return -EINVAL;
	}
	if (vq->started || vq->inflight) {
		vhost_warn("vring %u: size change while started or with requests in flight",
			   vq->idx);
		return -EBUSY;
	}
	if (num != vq->slots_num) {
		vq_free_slots(vq);
		stride = ops->elem_size < sizeof(struct vq_elem) ? sizeof(struct vq_elem)
								 : ops->elem_size;
		stride = (stride + 15) & ~(size_t)15;
		vq->slots = calloc(num, stride);
		vq->busy = calloc(num, sizeof(bool));
		/* 2 x VQ_MAX_IOV iovecs per slot (iovs, then wiovs): reserved
		 * address space, touched lazily. */
		iovs_len = 2 * (size_t)num * VQ_MAX_IOV * sizeof(struct iovec);
		iovs = mmap(NULL, iovs_len, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (!vq->slots || !vq->busy || iovs == MAP_FAILED) {
			if (iovs != MAP_FAILED)
				munmap(iovs, iovs_len);
			vq_free_slots(vq);
			return -ENOMEM;
		}
		vq->iovs = iovs;
		vq->wiovs = vq->iovs + (size_t)num * VQ_MAX_IOV;
		vq->iovs_len = iovs_len;
		vq->stride = stride;
		vq->slots_num = (uint16_t)num;
	}
	vq->num = (uint16_t)num;
	return vhost_vq_map(vq);
}

/*
 * Translate the ring addresses (front-end virtual) for the current size. Not
 * having addresses or a size yet is not an error (pointers stay NULL). 0, or
 * -EFAULT/-EINVAL if the addresses do not map (pointers NULL).
 */
int vhost_vq_map(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;
	uint64_t ev = has_feature(dev, VIRTIO_RING_F_EVENT_IDX) ? 2 : 0;
	uint64_t n = vq->num;
	void *desc, *avail, *used;

	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	if (!vq->addr_set || !vq->num) {
		vq->used_push = NULL;
		return 0;
	}
	desc = vhost_uva_to_host(dev, vq->addr.desc, 16 * n);
	avail = vhost_uva_to_host(dev, vq->addr.avail, 4 + 2 * n + ev);
	used = vhost_uva_to_host(dev, vq->addr.used, 4 + 8 * n + ev);
	if (!desc || !avail || !used) {
		vhost_warn("vring %u: ring addresses not in guest memory", vq->idx);
		return -EFAULT;
	}
	if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3)) {
		vhost_warn("vring %u: misaligned ring", vq->idx);
		return -EINVAL;
	}
	vq->desc = desc;
	vq->avail = avail;
	vq->used = used;
	vq->used_push = used;
	return 0;
}

/*
 * After the memory table or the features changed: re-translate every ring.
 * A started ring that no longer maps pauses (not running) until a later
 * change maps it again: front-ends remove regions before adding their
 * replacements (ADD/REM_MEM_REG), so a ring can be unmapped for a moment.
 */
void vhost_vq_remap_all(struct vhost_dev *dev)
{
	for (unsigned i = 0; i < dev->nvqs; i++) {
		struct vhost_vq *vq = &dev->vqs[i];

		vhost_vq_map(vq);
		vhost_vq_update_running(vq);
	}
}

static void kick_cb(void *arg)
{
	struct vhost_vq *vq = arg;
	struct vhost_dev *dev = vq->dev;
	uint64_t v;
	ssize_t n;

	vhost_dev_enter(dev);
	n = read(vq->kick_fd, &v, sizeof(v));
	if (n != (ssize_t)sizeof(v) && !(n < 0 && (errno == EAGAIN || errno == EINTR))) {
		/* Only an eventfd reads exactly 8 bytes or EAGAIN. */
		vhost_dev_set_broken(dev, "kick fd is not an eventfd");
	} else if (vq->running) {
		vq->n_kick_wakes++;
		vq->n_kicks += n == (ssize_t)sizeof(v) ? v : 0;
		dev->ops->queue_kick(dev->opaque, vq);
	}
	vhost_dev_leave(dev); /* may free dev */
}

/*
 * Watch the ring's kick fd where the device model serves the ring
 * (ops->watch_kick: the queue's I/O thread), else with ops->watch. 0, or
 * -EIO with the connection marked broken.
 */
static int kick_watch(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;
	const struct vhost_dev_ops *ops = dev->ops;

	if ((ops->watch_kick ? ops->watch_kick(dev->opaque, vq, vq->kick_fd, kick_cb, vq)
			     : ops->watch(dev->opaque, vq->kick_fd, kick_cb, vq)) < 0) {
		vhost_dev_set_broken(dev, "cannot watch the kick fd");
		return -EIO;
	}
	vq->kick_watched = true;
	return 0;
}

/* Start or stop processing according to started/enabled/mapped/alive. */
void vhost_vq_update_running(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;
	const struct vhost_dev_ops *ops = dev->ops;
	bool want = vq->started && vq->enabled && vq->desc && !dev->dead;

	if (want == vq->running)
		return;
	if (want) {
		if (!vq->kick_watched && vq->kick_fd >= 0 && kick_watch(vq) < 0)
			return;
		vq->running = true;
		vq->notify_disabled = false;
		if (has_feature(dev, VIRTIO_RING_F_EVENT_IDX))
			avail_event_store(vq);
		if (ops->queue_started)
			ops->queue_started(dev->opaque, vq);
		/* Buffers may already be waiting (reconnect, enable after kick). */
		if (vq->running)
			ops->queue_kick(dev->opaque, vq);
	} else {
		if (vq->kick_watched) {
			ops->unwatch(dev->opaque, vq->kick_fd);
			vq->kick_watched = false;
		}
		vq->running = false;
		if (ops->queue_stopped)
			ops->queue_stopped(dev->opaque, vq);
	}
}

/*
 * SET_VRING_KICK: take @kick_fd (consumed) and start the ring. 0 or -errno
 * (the fd is closed on error).
 */
int vhost_vq_start(struct vhost_vq *vq, int kick_fd)
{
	struct vhost_dev *dev = vq->dev;

	if (!vq->desc) {
		vhost_warn("vring %u: kick before the ring was set up", vq->idx);
		close(kick_fd);
		return -EINVAL;
	}
	/* A file or device that always polls readable and reads 8 bytes (a
	 * memfd, /dev/zero) would make the loop spin on it forever. */
	if (vhost_eventfd_take(kick_fd, "kick", (int)vq->idx) < 0)
		return -EINVAL;
	if (vq->kick_watched) {
		dev->ops->unwatch(dev->opaque, vq->kick_fd);
		vq->kick_watched = false;
	}
	vhost_close_fd(&vq->kick_fd);
	vq->kick_fd = kick_fd;
	if (!vq->started) {
		int ret;

		/* Resume where the used ring stands; SET_VRING_BASE gave last_avail
		 * (with inflight tracking: used->idx + the requests left in flight). */
		vq->used_idx = le16toh(LOAD16(&vq->used->idx));
		ret = vhost_inflight_start(vq);
		if (ret < 0)
			return ret;
		/* Where the ring resumes (a migration's destination: what the
		 * source's GET_VRING_BASE answered) is worth a line: a wrong
		 * index runs guest requests twice or never. */
		vhost_info("vring %u starts: next avail index %u, used index %u%s", vq->idx,
			   vq->last_avail, vq->used_idx, vq->resubmit_n ? " (resubmitting)" : "");
		vq->started = true;
		vq->signalled_valid = false;
		vq->pushed = false;
		vhost_vq_update_running(vq);
	} else if (vq->running) {
		/* A new kick fd for a running ring: watched where the ring is
		 * served, as at the start (not on the main loop, where every
		 * kick would park the I/O threads). */
		if (kick_watch(vq) < 0)
			return -EIO;
	}
	return 0;
}

/* Stop the ring (GET_VRING_BASE, RESET_OWNER): no more pops; the kick fd is dropped. */
void vhost_vq_stop(struct vhost_vq *vq)
{
	vq->started = false;
	vhost_vq_update_running(vq);
	if (vq->kick_watched) {
		vq->dev->ops->unwatch(vq->dev->opaque, vq->kick_fd);
		vq->kick_watched = false;
	}
	vhost_close_fd(&vq->kick_fd);
}

/* GET_VRING_BASE answered: say where the ring stopped (its counterpart is
 * the "starts" line of the next vhost_vq_start, on this or another daemon). */
void vhost_vq_log_stop(struct vhost_vq *vq)
{
	vhost_info("vring %u stopped: next avail index %u, used index %u", vq->idx, vq->last_avail,
		   vq->used_idx);
	vhost_vq_log_counts(vq);
}

/*
 * What the ring cost in notifications since it started (or since the last
 * such line): the driver's kicks (each an exit of a guest vCPU: with
 * EVENT_IDX a back-end that keeps popping asks for none), the wake-ups of
 * the kick fd they caused, requests, and the calls sent (each an interrupt
 * the front-end injects) of the signal decisions made. Called with the
 * ring's thread parked (GET_VRING_BASE, the device's end); once per run.
 */
void vhost_vq_log_counts(struct vhost_vq *vq)
{
	if (!vq->n_pops && !vq->n_kick_wakes && !vq->n_calls)
		return;
	vhost_info("vring %u: %llu requests, %llu kicks in %llu kick wake-ups, %llu calls of %llu "
		   "signal decisions",
		   vq->idx, (unsigned long long)vq->n_pops, (unsigned long long)vq->n_kicks,
		   (unsigned long long)vq->n_kick_wakes, (unsigned long long)vq->n_calls,
		   (unsigned long long)vq->n_signal_asks);
	vq->n_pops = vq->n_kicks = vq->n_kick_wakes = vq->n_calls = vq->n_signal_asks = 0;
}

/* ---- descriptor chains ---- */

struct chain {
	struct iovec *iov;
	unsigned niov;
	unsigned out, in;
};

static void desc_load(struct vring_desc *d, const struct vring_desc *src)
{
	d->addr = le64toh(LOAD64(&src->addr));
	d->len = le32toh(LOAD32(&src->len));
	d->flags = le16toh(LOAD16(&src->flags));
	d->next = le16toh(LOAD16(&src->next));
}

/* Map one descriptor's buffer to iovecs (several if it spans regions). */
static int chain_add(struct vhost_dev *dev, struct chain *c, const struct vring_desc *d,
		     const char **why)
{
	bool write = d->flags & VRING_DESC_F_WRITE;
	uint64_t gpa = d->addr, left = d->len;

	if (write) {
		c->in++;
	} else if (c->in) {
		*why = "device-readable descriptor after a device-writable one";
		return -EINVAL;
	}
	if (left && gpa > UINT64_MAX - (left - 1)) {
		*why = "descriptor address + length overflows";
		return -EINVAL;
	}
	if (!write)
		c->out++;
	while (left) {
		uint64_t chunk = left;
		void *p = vhost_gpa_to_host(dev, gpa, &chunk);

		if (!p) {
			*why = "descriptor address outside guest memory";
			return -EFAULT;
		}
		if (c->niov >= VQ_MAX_IOV) {
			*why = "too many buffers in one chain";
			return -E2BIG;
		}
		c->iov[c->niov].iov_base = p;
		c->iov[c->niov].iov_len = chunk;
		c->niov++;
		gpa += chunk;
		left -= chunk;
	}
	return 0;
}

/*
 * Walk the chain starting at @head. Fills @c; the out/in split is derived
 * from the iovec positions. 0 or -errno with *why set.
 */
static int chain_walk(struct vhost_vq *vq, uint16_t head, struct chain *c, unsigned *out_iov,
		      const char **why)
{
	struct vhost_dev *dev = vq->dev;
	const struct vring_desc *table = vq->desc;
	unsigned table_num = vq->num, count = 0, i = head;
	uint64_t ind_gpa = 0;
	bool indirect = false;
	struct vring_desc d;
	int ret;

	*out_iov = 0;
	desc_load(&d, &table[head]);
	if (d.flags & VRING_DESC_F_INDIRECT) {
		uint64_t len = d.len;

		if (!has_feature(dev, VIRTIO_RING_F_INDIRECT_DESC)) {
			*why = "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC";
			return -EINVAL;
		}
		if (d.flags & VRING_DESC_F_NEXT) {
			*why = "descriptor with both INDIRECT and NEXT";
			return -EINVAL;
		}
		if (len == 0 || len % sizeof(struct vring_desc) ||
		    len / sizeof(struct vring_desc) > VQ_MAX_IOV) {
			*why = "bad indirect table length";
			return -EINVAL;
		}
		if (d.addr > UINT64_MAX - (len - 1)) {
			*why = "indirect table address + length overflows";
			return -EINVAL;
		}
		ind_gpa = d.addr;
		table_num = (unsigned)(len / sizeof(struct vring_desc));
		/* Fast path: the table is contiguous in our address space. */
		table = vhost_gpa_to_host(dev, ind_gpa, &len);
		if (!table || (len != table_num * sizeof(struct vring_desc) &&
			       !vhost_gpa_mapped(dev, ind_gpa, d.len))) {
			*why = "indirect table outside guest memory";
			return -EFAULT;
		}
		/* The spec puts no alignment on indirect tables (QEMU reads them with
		 * memcpy), but our single loads of each field need it: a table that
		 * spans regions or is not 8-byte aligned is copied descriptor by
		 * descriptor. */
		if (len != table_num * sizeof(struct vring_desc) || ((uintptr_t)table & 7))
			table = NULL;
		indirect = true;
		i = 0;
		if (table)
			desc_load(&d, &table[0]);
		else if (vhost_gpa_read(dev, ind_gpa, &d, sizeof(d)) < 0)
			goto ind_fault;
		else {
			struct vring_desc raw = d;

			desc_load(&d, &raw);
		}
	}
	for (;;) {
		if (++count > table_num) {
			*why = "descriptor chain loops or is too long";
			return -ELOOP;
		}
		if (d.flags & VRING_DESC_F_INDIRECT) {
			*why = indirect ? "nested indirect descriptor"
					: "indirect descriptor inside a chain";
			return -EINVAL;
		}
		ret = chain_add(dev, c, &d, why);
		if (ret < 0)
			return ret;
		if (!(d.flags & VRING_DESC_F_WRITE))
			*out_iov = c->niov;
		if (!(d.flags & VRING_DESC_F_NEXT))
			return 0;
		i = d.next;
		if (i >= table_num) {
			*why = "next index out of range";
			return -EINVAL;
		}
		if (!indirect || table) {
			desc_load(&d, &table[i]);
		} else {
			struct vring_desc raw;

			if (vhost_gpa_read(dev, ind_gpa + (uint64_t)i * sizeof(raw), &raw,
					   sizeof(raw)) < 0)
				goto ind_fault;
			desc_load(&d, &raw);
		}
	}
ind_fault:
	*why = "indirect table outside guest memory";
	return -EFAULT;
}

static bool vq_usable(const struct vhost_vq *vq)
{
	return vq->running && !vq->dev->dead && !vq->dev->broken;
}

/* The driver's avail->idx; acquire: ring entries and descriptors are read after it. */
static inline uint16_t avail_idx_load(const struct vhost_vq *vq)
{
	return le16toh(__atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE));
}

int vq_pop(struct vhost_vq *vq, struct vq_elem **elemp)
{
	struct vhost_dev *dev = vq->dev;
	bool event_idx = has_feature(dev, VIRTIO_RING_F_EVENT_IDX);
	const char *why = NULL;
	struct vq_elem *elem;
	struct chain c;
	uint16_t avail_idx, head;
	unsigned out_iov;
	bool resubmit = false;
	int ret;

	if (dev->broken || dev->dead || __atomic_load_n(&dev->remote_broken, __ATOMIC_ACQUIRE))
		return -EIO;
	if (!vq_usable(vq))
		return -EAGAIN;
	if (vq->resubmit_pos < vq->resubmit_n) {
		/* Left in flight by a back-end that died: handed out again first,
		 * in fetch order; already marked in the region and counted in
		 * last_avail. */
		head = vq->resubmit[vq->resubmit_pos++];
		resubmit = true;
		if (vq->busy[head]) {
			why = "resubmitted head index already in flight";
			ret = -EINVAL;
			goto broken;
		}
		goto walk;
	}
	avail_idx = avail_idx_load(vq);
	if (avail_idx == vq->last_avail) {
		if (!event_idx || vq->notify_disabled)
			return -EAGAIN;
		/* Ask for a kick at the next buffer, then look again so a buffer
		 * added meanwhile (the driver saw the old avail_event) is not
		 * left without a kick. */
		avail_event_store(vq);
		atomic_thread_fence(memory_order_seq_cst);
		avail_idx = avail_idx_load(vq);
		if (avail_idx == vq->last_avail)
			return -EAGAIN;
	}
	if ((uint16_t)(avail_idx - vq->last_avail) > vq->num) {
		why = "avail index moved more than the queue size";
		ret = -EINVAL;
		goto broken;
	}
	/* virtio 1.2 §2.7.13.2: read avail->idx before the ring entries and
	 * descriptors it covers. */
	atomic_thread_fence(memory_order_acquire);
	head = le16toh(LOAD16(&vq->avail->ring[vq->last_avail & (vq->num - 1)]));
	if (head >= vq->num) {
		why = "head index out of range";
		ret = -EINVAL;
		goto broken;
	}
	if (vq->busy[head]) {
		why = "head index already in flight";
		ret = -EINVAL;
		goto broken;
	}
walk:
	c.iov = vq->iovs + (size_t)head * VQ_MAX_IOV;
	c.niov = 0;
	c.out = 0;
	c.in = 0;
	ret = chain_walk(vq, head, &c, &out_iov, &why);
	if (ret < 0)
		goto broken;

	elem = (struct vq_elem *)(vq->slots + (size_t)head * vq->stride);
	elem->head = head;
	elem->out_num = (uint16_t)out_iov;
	elem->in_num = (uint16_t)(c.niov - out_iov);
	elem->pad = 0;
	elem->vq = vq;
	elem->iov = c.iov;
	/* What the device may write, kept for the dirty log (vhost_log_elem)
	 * whatever the consumer does to elem->iov meanwhile. */
	memcpy(vq->wiovs + (size_t)head * VQ_MAX_IOV, c.iov + out_iov,
	       (size_t)elem->in_num * sizeof(struct iovec));
	vq->busy[head] = true;
	vq->inflight++;
	__atomic_fetch_add(&dev->inflight, 1, __ATOMIC_ACQ_REL);
	if (resubmit) {
		*elemp = elem;
		return 0;
	}
	vq->last_avail++;
	vq->n_pops++;
	/* Marked in flight before the element is handed out (and before the
	 * next pop): a kill from here on resubmits it. */
	if (vq->track) {
		VHOST_CRASH_POINT(VHOST_CRASH_POP_FETCHED);
		vhost_inflight_pop(vq, head);
		VHOST_CRASH_POINT(VHOST_CRASH_POP_MARKED);
	}
	if (event_idx && !vq->notify_disabled)
		avail_event_store(vq);
	*elemp = elem;
	return 0;

broken:
	vhost_warn("vring %u: %s", vq->idx, why);
	vhost_dev_set_broken(dev, why);
	return ret;
}

void vq_push(struct vhost_vq *vq, struct vq_elem *elem, uint32_t len)
{
	struct vhost_dev *dev = vq->dev;
	uint16_t head = elem->head;
	unsigned left;

	if (elem->vq != vq || head >= vq->slots_num || !vq->busy[head] ||
	    (uint8_t *)elem != vq->slots + (size_t)head * vq->stride) {
		vhost_err("vring %u: push of an element that is not in flight (bug)", vq->idx);
		return;
	}
	if (!dev->dead && vq->used_push) {
		struct vring_used *used = vq->used_push;
		struct vring_used_elem *u = &used->ring[vq->used_idx & (vq->num - 1)];
		bool log = dev->log_on;

		if (vq->track) {
			vhost_inflight_push_begin(vq, head);
			VHOST_CRASH_POINT(VHOST_CRASH_PUSH_LINKED);
		}
		/* Migration: the buffers the device wrote are dirty before the
		 * used entry handing them back exists (log.c). */
		if (__builtin_expect(log, 0))
			vhost_log_elem(vq, elem);
		__atomic_store_n(&u->id, htole32(head), __ATOMIC_RELAXED);
		__atomic_store_n(&u->len, htole32(len), __ATOMIC_RELAXED);
		if (__builtin_expect(log, 0))
			vhost_log_used(vq, used, u, sizeof(*u));
		vq->used_idx++;
		/* The entry must be visible before the index that publishes it. */
		__atomic_store_n(&used->idx, htole16(vq->used_idx), __ATOMIC_RELEASE);
		if (__builtin_expect(log, 0))
			vhost_log_used(vq, used, &used->idx, sizeof(used->idx));
		if (vq->track) {
			VHOST_CRASH_POINT(VHOST_CRASH_PUSH_USED);
			vhost_inflight_push_end(vq, head, vq->used_idx);
			VHOST_CRASH_POINT(VHOST_CRASH_PUSH_DONE);
		}
		vq->pushed = true;
	}
	/* Only now may the mappings written above go (they are unmapped at the
	 * next safe point once nothing is in flight). */
	vq->busy[head] = false;
	vq->inflight--;
	left = __atomic_sub_fetch(&dev->inflight, 1, __ATOMIC_ACQ_REL);
	if ((vq->drain_pending && vq->inflight == 0) ||
	    (left == 0 && (dev->dead || dev->mem.nretired || dev->reset_pending)))
		vhost_dev_wake(dev);
}

/* Decide per the EVENT_IDX / NO_INTERRUPT rules and signal the call fd. */
void vhost_vq_signal(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;
	bool need;

	if (!vq->pushed || dev->dead || !vq->avail)
		return;
	if (__builtin_expect(__atomic_load_n(&dev->log_kick_pending, __ATOMIC_RELAXED), 0))
		vhost_log_kick(dev); /* SET_LOG_FD: the log changed */
	if (vq->call_fd < 0)
		return; /* keep `pushed`: a call fd may come (interrupt unmasked) */
	/* Our used->idx store must be visible before we read the driver's
	 * suppression state (virtio 1.2 §2.7.10). */
	atomic_thread_fence(memory_order_seq_cst);
	if (has_feature(dev, VIRTIO_RING_F_EVENT_IDX)) {
		uint16_t old = vq->signalled_used, new = vq->used_idx;
		bool valid = vq->signalled_valid;
		uint16_t event = le16toh(LOAD16(used_event_ptr(vq)));

		vq->signalled_used = new;
		vq->signalled_valid = true;
		need = !valid || vring_need_event(event, new, old);
	} else {
		need = !(le16toh(LOAD16(&vq->avail->flags)) & VRING_AVAIL_F_NO_INTERRUPT);
	}
	vq->pushed = false;
	vq->n_signal_asks++;
	if (need) {
		uint64_t one = 1;
		ssize_t n = write(vq->call_fd, &one, sizeof(one));

		vq->n_calls++;
		(void)n; /* EAGAIN: the counter is saturated, a signal is pending anyway */
	}
}

void vq_notify(struct vhost_vq *vq)
{
	vhost_vq_signal(vq);
}

void vq_disable_notify(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;

	if (vq->notify_disabled || !vq_usable(vq))
		return;
	vq->notify_disabled = true;
	if (!has_feature(dev, VIRTIO_RING_F_EVENT_IDX)) {
		uint16_t f = le16toh(LOAD16(&vq->used->flags));

		used_flags_store(vq, f | VRING_USED_F_NO_NOTIFY);
	}
}

bool vq_enable_notify(struct vhost_vq *vq)
{
	struct vhost_dev *dev = vq->dev;
	uint16_t avail_idx;

	if (!vq_usable(vq))
		return false;
	vq->notify_disabled = false;
	if (has_feature(dev, VIRTIO_RING_F_EVENT_IDX)) {
		avail_event_store(vq);
	} else {
		uint16_t f = le16toh(LOAD16(&vq->used->flags));

		used_flags_store(vq, f & ~VRING_USED_F_NO_NOTIFY);
	}
	/* The driver reads our suppression state after publishing avail->idx;
	 * we read avail->idx after publishing it: full barrier in between. */
	atomic_thread_fence(memory_order_seq_cst);
	avail_idx = avail_idx_load(vq);
	return avail_idx != vq->last_avail;
}

bool vq_avail_pending(const struct vhost_vq *vq)
{
	if (!vq_usable(vq))
		return false;
	return avail_idx_load(vq) != vq->last_avail;
}

/* ---- accessors ---- */

unsigned vq_index(const struct vhost_vq *vq)
{
	return vq->idx;
}

struct vhost_dev *vq_dev(struct vhost_vq *vq)
{
	return vq->dev;
}

bool vq_is_running(const struct vhost_vq *vq)
{
	return vq_usable(vq);
}

uint16_t vq_size(const struct vhost_vq *vq)
{
	return vq->num;
}

unsigned vq_inflight(const struct vhost_vq *vq)
{
	return vq->inflight;
}

void vq_set_priv(struct vhost_vq *vq, void *priv)
{
	vq->priv = priv;
}

void *vq_priv(const struct vhost_vq *vq)
{
	return vq->priv;
}
