/* SPDX-License-Identifier: MIT */
/*
 * vhost/log.c — dirty page logging for live migration (vhost-user.rst
 * "Migration", VHOST_F_LOG_ALL + VHOST_USER_PROTOCOL_F_LOG_SHMFD).
 *
 * The front-end hands us a shared bitmap (SET_LOG_BASE: fd, size, offset);
 * while VHOST_F_LOG_ALL is negotiated every guest page the device writes gets
 * its bit set: bit (gpa / 4096) % 8 of byte (gpa / 4096) / 8, with an atomic
 * OR (the front-end clears bits concurrently while it syncs).
 *
 * What the device writes, and where it is marked:
 *  - the device-writable buffers of a request (read data, written by io_uring
 *    before the completion; the status byte): vq_push, before the used entry
 *    that hands them back is written. The buffers are the element's writable
 *    iovecs as vq_pop made them (vq->wiovs), not elem->iov: its consumer
 *    changes those (blk/ strips the status byte off the last one, io/
 *    advances over a short transfer), and a page written before such a change
 *    would otherwise go unmarked. Their guest-physical addresses come from
 *    the memory table (reverse lookup of each iovec's host address; an iovec
 *    into a replaced table that can no longer be found marks the whole log);
 *  - the used ring (entries, idx, flags, avail_event) when the ring's
 *    SET_VRING_ADDR carried VHOST_VRING_F_LOG: at log_guest_addr + offset,
 *    right after each write.
 * Each mark comes after the write it covers (a seq_cst atomic OR also orders
 * the earlier stores before it), so a front-end that sees the bit and then
 * copies the page copies the new contents.
 *
 * When logging is off the hot path tests dev->log_on once per push.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vhost_int.h"

static void log_unmap(struct vhost_dev *dev)
{
	if (dev->log_map)
		munmap(dev->log_map, dev->log_map_len);
	dev->log_map = NULL;
	dev->log_map_len = 0;
	dev->log = NULL;
	dev->log_size = 0;
}

void vhost_log_update(struct vhost_dev *dev)
{
	dev->log_on = dev->log && ((dev->features >> VHOST_F_LOG_ALL) & 1);
}

bool vhost_dev_logging(const struct vhost_dev *dev)
{
	return dev->log_on;
}

int vhost_log_set_base(struct vhost_dev *dev, const struct vu_log_msg *m, int fd)
{
	long pagesz = sysconf(_SC_PAGESIZE);
	uint64_t size = m->mmap_size, off = m->mmap_offset, aligned, skip;
	struct stat st;
	void *p;

	if (size == 0 || size > VHOST_LOG_MAX_SIZE || off > UINT64_MAX - size) {
		vhost_warn("SET_LOG_BASE: bad log size %llu / offset %llu",
			   (unsigned long long)size, (unsigned long long)off);
		return -EINVAL;
	}
	if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < off + size) {
		/* Touching a page past the end of the file would be SIGBUS. */
		vhost_warn("SET_LOG_BASE: log fd smaller than offset %llu + size %llu",
			   (unsigned long long)off, (unsigned long long)size);
		return -EINVAL;
	}
	aligned = off & ~(uint64_t)(pagesz - 1);
	skip = off - aligned;
	p = mmap(NULL, size + skip, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)aligned);
	if (p == MAP_FAILED) {
		int err = errno;

		vhost_warn("SET_LOG_BASE: mmap of %llu bytes failed: %s", (unsigned long long)size,
			   strerror(err));
		return -err;
	}
	/* A new log (QEMU resizes it when guest memory grows) replaces the old. */
	log_unmap(dev);
	dev->log_map = p;
	dev->log_map_len = size + skip;
	dev->log = (uint8_t *)p + skip;
	dev->log_size = size;
	dev->log_warned = false;
	vhost_log_update(dev);
	vhost_info("dirty log: %llu bytes (guest memory up to %llu MiB)", (unsigned long long)size,
		   (unsigned long long)(size << 15 >> 20));
	return 0;
}

int vhost_log_set_fd(struct vhost_dev *dev, int fd)
{
	vhost_close_fd(&dev->log_fd);
	dev->log_fd = fd;
	return 0;
}

void vhost_log_free(struct vhost_dev *dev)
{
	log_unmap(dev);
	dev->log_on = false;
	vhost_close_fd(&dev->log_fd);
}

/* Mark every page of the guest-physical range [gpa, gpa + len). */
static void log_range(struct vhost_dev *dev, uint64_t gpa, uint64_t len)
{
	uint64_t first, last;

	if (!len)
		return;
	first = gpa >> VHOST_LOG_PAGE_SHIFT;
	last = (gpa + (len - 1)) >> VHOST_LOG_PAGE_SHIFT;
	if (gpa + (len - 1) < gpa || (last >> 3) >= dev->log_size) {
		/* The front-end sizes the log to cover all guest memory; a
		 * write beyond it cannot be reported (say so once per log). */
		if (!__atomic_exchange_n(&dev->log_warned, true, __ATOMIC_RELAXED))
			vhost_warn("dirty log of %llu bytes does not cover guest address 0x%llx",
				   (unsigned long long)dev->log_size,
				   (unsigned long long)(gpa + len - 1));
		if (gpa + (len - 1) < gpa || (first >> 3) >= dev->log_size)
			return;
		last = (dev->log_size << 3) - 1;
	}
	for (uint64_t pg = first; pg <= last; pg++)
		__atomic_fetch_or(&dev->log[pg >> 3], (uint8_t)(1u << (pg & 7)), __ATOMIC_SEQ_CST);
	__atomic_store_n(&dev->log_kick_pending, true, __ATOMIC_RELAXED);
}

/* Everything dirty: the fallback when a written buffer's address is unknown. */
static void log_all(struct vhost_dev *dev)
{
	for (uint64_t i = 0; i < dev->log_size; i++)
		__atomic_fetch_or(&dev->log[i], (uint8_t)0xff, __ATOMIC_SEQ_CST);
	__atomic_store_n(&dev->log_kick_pending, true, __ATOMIC_RELAXED);
}

/* Guest-physical address of our address @p (in the current memory table). */
static bool host_to_gpa(const struct vhost_dev *dev, const void *p, size_t len, uint64_t *gpa)
{
	const uint8_t *b = p;

	for (unsigned i = 0; i < dev->mem.nregions; i++) {
		const struct vhost_mem_region *r = &dev->mem.r[i];

		if (b >= r->host && (uint64_t)(b - r->host) < r->size &&
		    len <= r->size - (uint64_t)(b - r->host)) {
			*gpa = r->gpa + (uint64_t)(b - r->host);
			return true;
		}
	}
	return false;
}

void vhost_log_elem(struct vhost_vq *vq, const struct vq_elem *elem)
{
	struct vhost_dev *dev = vq->dev;
	/* The device-writable iovecs as vq_pop handed them out, not elem->iov,
	 * which the consumer may have changed (a stripped status byte, an
	 * advance over a short read): every byte the device may have written. */
	const struct iovec *w = vq->wiovs + (size_t)elem->head * VQ_MAX_IOV;

	for (unsigned i = 0; i < elem->in_num; i++) {
		uint64_t gpa;

		if (!w[i].iov_len)
			continue;
		if (!host_to_gpa(dev, w[i].iov_base, w[i].iov_len, &gpa)) {
			/* The buffer belongs to a memory table replaced while the
			 * request was in flight: mark everything rather than lose it. */
			vhost_warn("vring %u: written buffer no longer in the memory table: "
				   "marking all of guest memory dirty",
				   vq->idx);
			log_all(dev);
			return;
		}
		log_range(dev, gpa, w[i].iov_len);
	}
}

void vhost_log_used(struct vhost_vq *vq, const void *base, const void *p, size_t len)
{
	if (!(vq->addr.flags & VU_VRING_F_LOG))
		return;
	log_range(vq->dev, vq->addr.log + (uint64_t)((const uint8_t *)p - (const uint8_t *)base),
		  len);
}

void vhost_log_kick(struct vhost_dev *dev)
{
	/* Several data threads may notify at once: one of them kicks. */
	if (!__atomic_exchange_n(&dev->log_kick_pending, false, __ATOMIC_RELAXED))
		return;
	if (dev->log_fd >= 0) {
		uint64_t one = 1;
		ssize_t n = write(dev->log_fd, &one, sizeof(one));

		(void)n; /* EAGAIN: the counter is saturated, a signal is pending anyway */
	}
}
