/* SPDX-License-Identifier: MIT */
/*
 * vhost/inflight.c — inflight I/O tracking (vhost-user.rst, "Inflight I/O
 * tracking", split virtqueues; protocol feature INFLIGHT_SHMFD).
 *
 * The front-end keeps a shared buffer across back-end restarts (QEMU keeps it
 * for the device's lifetime and passes it again with SET_INFLIGHT_FD after a
 * reconnect). Per queue it holds a QueueRegionSplit: one DescStateSplit per
 * head index (inflight flag, fetch counter, batch list link) and the used
 * index the region was last brought up to date with. A back-end killed at any
 * instant leaves a region from which the next one resubmits exactly the
 * requests that were popped but never reached the used ring, in the order
 * they were fetched, once each.
 *
 * Rules of the spec and where they are met:
 *  - "When receiving available buffers": desc[i].counter = counter++, then
 *    desc[i].inflight = 1 — vhost_inflight_pop(), called by vq_pop() before
 *    the element is handed out (so before any I/O for it) and before the next
 *    pop. A kill before that store leaves the head unmarked; it is then the
 *    next avail entry after used_idx + (number marked) and is popped again.
 *  - "When supplying used buffers" (batches of one): desc[i].next =
 *    last_batch_head, last_batch_head = i — vhost_inflight_push_begin(),
 *    before the used element is written; then used->idx is increased (in
 *    vq_push); then desc[i].inflight = 0 and used_idx = used->idx —
 *    vhost_inflight_push_end(). A kill between the used->idx store and the
 *    clear leaves used_idx one behind, which the next back-end repairs.
 *  - "When reconnecting": if used_idx != used->idx, clear the inflight flag of
 *    the (used->idx - used_idx) entries of the list at last_batch_head and set
 *    used_idx; resubmit the entries still inflight in counter order —
 *    vhost_inflight_start(), at SET_VRING_KICK; vq_pop() hands the resubmitted
 *    heads out first.
 * Every store to the region is a release store, so the compiler cannot move
 * one past another: a process death stops the stores in program order (the
 * region is shared memory; the CPU's own order is what survives a kill).
 *
 * The region is written by the front-end's former back-ends, i.e. it is
 * untrusted: sizes, head indices, list links and batch sizes are checked;
 * a bad region refuses the ring start (and so drops the connection).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vhost_int.h"

#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define LOAD(p)     __atomic_load_n((p), __ATOMIC_RELAXED)

/* Version of the split-ring region format (vhost-user.rst; libvhost-user). */
#define INFLIGHT_VERSION 1
/* Per-queue regions are aligned like QEMU's/libvhost-user's. */
#define INFLIGHT_ALIGN 64

vhost_crash_fn *vhost_crash_hook;

void vhost_set_crash_hook(vhost_crash_fn *fn)
{
	vhost_crash_hook = fn;
}

const char *vhost_crash_point_name(enum vhost_crash_point point)
{
	static const char *const names[VHOST_CRASH_NPOINTS] = {
	    [VHOST_CRASH_POP_FETCHED] = "pop-fetched", [VHOST_CRASH_POP_MARKED] = "pop-marked",
	    [VHOST_CRASH_PUSH_LINKED] = "push-linked", [VHOST_CRASH_PUSH_USED] = "push-used",
	    [VHOST_CRASH_PUSH_DONE] = "push-done",
	};

	return (unsigned)point < VHOST_CRASH_NPOINTS ? names[point] : NULL;
}

size_t vhost_inflight_queue_size(uint16_t queue_size)
{
	size_t n = sizeof(struct vu_inflight_queue) + sizeof(struct vu_inflight_desc) * queue_size;

	return (n + INFLIGHT_ALIGN - 1) & ~(size_t)(INFLIGHT_ALIGN - 1);
}

static bool qsize_ok(uint16_t qs)
{
	return qs != 0 && qs <= VQ_MAX_SIZE && !(qs & (qs - 1));
}

void vhost_inflight_unmap(struct vhost_dev *dev)
{
	for (unsigned i = 0; i < dev->nvqs; i++) {
		dev->vqs[i].inflight_q = NULL;
		dev->vqs[i].track = NULL;
		free(dev->vqs[i].resubmit);
		dev->vqs[i].resubmit = NULL;
		dev->vqs[i].resubmit_n = dev->vqs[i].resubmit_pos = 0;
	}
	if (dev->inflight_map)
		munmap(dev->inflight_map, dev->inflight_len);
	dev->inflight_map = NULL;
	dev->inflight_len = 0;
	dev->inflight_qs = 0;
}

/* Point each ring at its region in the mapping. */
static void assign(struct vhost_dev *dev, uint8_t *base, uint16_t nq, uint16_t qs)
{
	size_t qsz = vhost_inflight_queue_size(qs);

	dev->inflight_qs = qs;
	for (unsigned i = 0; i < dev->nvqs; i++) {
		dev->vqs[i].inflight_q =
		    i < nq ? (struct vu_inflight_queue *)(base + i * qsz) : NULL;
		dev->vqs[i].track = NULL;
	}
}

int vhost_inflight_get(struct vhost_dev *dev, struct vu_inflight_msg *m, int *fdp)
{
	uint16_t nq = m->num_queues, qs = m->queue_size;
	size_t len;
	void *p;
	int fd;

	*fdp = -1;
	if (nq == 0 || nq > dev->nvqs || !qsize_ok(qs)) {
		vhost_warn("GET_INFLIGHT_FD: %u queues of size %u (have %u queues, max size %u)",
			   nq, qs, dev->nvqs, VQ_MAX_SIZE);
		return -EINVAL;
	}
	len = vhost_inflight_queue_size(qs) * nq;
	fd = memfd_create("vqcow-inflight", MFD_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)len) < 0)
		goto fail;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		goto fail;
	/* A fresh memfd reads as zeroes: every queue starts with version 0 and
	 * nothing in flight. desc_num says which size it was made for. */
	vhost_inflight_unmap(dev);
	dev->inflight_map = p;
	dev->inflight_len = len;
	for (unsigned i = 0; i < nq; i++)
		((struct vu_inflight_queue *)((uint8_t *)p + i * vhost_inflight_queue_size(qs)))
		    ->desc_num = qs;
	assign(dev, p, nq, qs);
	m->mmap_size = len;
	m->mmap_offset = 0;
	*fdp = fd;
	return 0;

fail : {
	int ret = -errno;

	close(fd);
	return ret;
}
}

int vhost_inflight_set(struct vhost_dev *dev, const struct vu_inflight_msg *m, int fd)
{
	uint16_t nq = m->num_queues, qs = m->queue_size;
	struct stat st;
	size_t need;
	void *p;

	if (nq == 0 || nq > dev->nvqs || !qsize_ok(qs)) {
		vhost_warn("SET_INFLIGHT_FD: %u queues of size %u (have %u queues, max size %u)",
			   nq, qs, dev->nvqs, VQ_MAX_SIZE);
		return -EINVAL;
	}
	need = vhost_inflight_queue_size(qs) * nq;
	if (m->mmap_size < need || m->mmap_size > need + (1u << 20) || (m->mmap_offset & 4095) ||
	    m->mmap_offset > (1ull << 40)) {
		vhost_warn("SET_INFLIGHT_FD: region of %llu bytes at %llu, need %zu",
			   (unsigned long long)m->mmap_size, (unsigned long long)m->mmap_offset,
			   need);
		return -EINVAL;
	}
	for (unsigned i = 0; i < dev->nvqs; i++) {
		if (dev->vqs[i].started || dev->vqs[i].inflight) {
			vhost_warn("SET_INFLIGHT_FD while ring %u is started", i);
			return -EBUSY;
		}
	}
	/* A MAP_SHARED page past the end of the file raises SIGBUS when touched
	 * (as in mem.c): only a regular file that covers the region will do. */
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    (uint64_t)st.st_size < m->mmap_offset + m->mmap_size) {
		vhost_warn("SET_INFLIGHT_FD: the fd is not a file covering %llu bytes at %llu",
			   (unsigned long long)m->mmap_size, (unsigned long long)m->mmap_offset);
		return -EINVAL;
	}
	p = mmap(NULL, m->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)m->mmap_offset);
	if (p == MAP_FAILED) {
		vhost_warn("SET_INFLIGHT_FD: cannot map the region: %s", strerror(errno));
		return -EFAULT;
	}
	vhost_inflight_unmap(dev);
	dev->inflight_map = p;
	dev->inflight_len = m->mmap_size;
	assign(dev, p, nq, qs);
	return 0;
}

/* An entry left in flight, as read once from the region. */
struct resub_ent {
	uint64_t counter;
	uint16_t head;
};

static int cmp_counter(const void *a, const void *b)
{
	uint64_t ca = ((const struct resub_ent *)a)->counter;
	uint64_t cb = ((const struct resub_ent *)b)->counter;

	return ca < cb ? -1 : ca > cb;
}

/*
 * Ring start (SET_VRING_KICK, vq->used_idx just read from used->idx): bring
 * the region up to date and collect the requests to resubmit. Sets
 * vq->last_avail to used->idx + (number in flight): the front-end's
 * SET_VRING_BASE after a back-end death is the used index, and the avail
 * entries up to there were all fetched. 0 or -errno (bad region).
 */
int vhost_inflight_start(struct vhost_vq *vq)
{
	struct vu_inflight_queue *q = vq->inflight_q;
	uint16_t num = vq->num, n = 0, uidx = vq->used_idx, qused;
	struct resub_ent *ents;
	uint64_t maxc = 0;

	free(vq->resubmit);
	vq->resubmit = NULL;
	vq->resubmit_n = vq->resubmit_pos = 0;
	vq->track = NULL;
	vq->counter = 0;
	if (!q)
		return 0;
	/* desc_num lies in the shared region, written by the front-end: the
	 * region only has room for the queue size it was made (GET_INFLIGHT_FD)
	 * or described (SET_INFLIGHT_FD) with, whatever desc_num says. */
	if (LOAD(&q->desc_num) != num || num > vq->dev->inflight_qs) {
		vhost_warn(
		    "vring %u: inflight region is for %u entries (room for %u), the ring has "
		    "%u",
		    vq->idx, LOAD(&q->desc_num), vq->dev->inflight_qs, num);
		return -EINVAL;
	}
	if (LOAD(&q->version) == 0) {
		/* Never used: nothing was in flight. */
		memset(q->desc, 0, sizeof(q->desc[0]) * num);
		STORE(&q->last_batch_head, 0);
		STORE(&q->used_idx, uidx);
		STORE(&q->version, INFLIGHT_VERSION);
		vq->track = q;
		return 0;
	}
	if (LOAD(&q->version) != INFLIGHT_VERSION) {
		vhost_warn("vring %u: inflight region version %u unknown", vq->idx,
			   LOAD(&q->version));
		return -EINVAL;
	}
	qused = LOAD(&q->used_idx);
	if (qused != uidx) {
		/* The last batch reached the used ring but its entries were not
		 * cleared yet: clear them now. */
		uint16_t batch = (uint16_t)(uidx - qused), h = LOAD(&q->last_batch_head);

		if (batch > num) {
			vhost_warn("vring %u: inflight region used_idx %u vs used ring %u", vq->idx,
				   qused, uidx);
			return -EINVAL;
		}
		for (uint16_t k = 0; k < batch; k++) {
			if (h >= num) {
				vhost_warn("vring %u: inflight batch list index %u out of range",
					   vq->idx, h);
				return -EINVAL;
			}
			STORE(&q->desc[h].inflight, 0);
			h = LOAD(&q->desc[h].next);
		}
		STORE(&q->used_idx, uidx);
	}
	/* One pass, each flag and counter read once into our own memory: the
	 * front-end may write the region meanwhile, and neither the count nor
	 * the sort may see a second value. */
	ents = malloc(sizeof(*ents) * num);
	if (!ents)
		return -ENOMEM;
	for (uint16_t i = 0; i < num; i++) {
		uint8_t f = LOAD(&q->desc[i].inflight);

		if (f > 1) {
			vhost_warn("vring %u: inflight flag %u of entry %u", vq->idx, f, i);
			free(ents);
			return -EINVAL;
		}
		if (f) {
			ents[n].counter = LOAD(&q->desc[i].counter);
			ents[n].head = i;
			if (ents[n].counter >= maxc)
				maxc = ents[n].counter + 1;
			n++;
		}
	}
	if (n) {
		vq->resubmit = malloc(sizeof(uint16_t) * n);
		if (!vq->resubmit) {
			free(ents);
			return -ENOMEM;
		}
		qsort(ents, n, sizeof(*ents), cmp_counter);
		for (uint16_t k = 0; k < n; k++)
			vq->resubmit[k] = ents[k].head;
		vhost_info("vring %u: resubmitting %u request(s) left in flight", vq->idx, n);
		for (uint16_t k = 0; k < n; k++)
			vhost_dbg("vring %u: resubmit head %u (fetched as #%llu)", vq->idx,
				  ents[k].head, (unsigned long long)ents[k].counter);
	}
	free(ents);
	vq->resubmit_n = n;
	vq->counter = maxc;
	vq->last_avail = (uint16_t)(uidx + n);
	vq->track = q;
	return 0;
}

/* A head was fetched from the avail ring (not a resubmission). */
void vhost_inflight_pop(struct vhost_vq *vq, uint16_t head)
{
	struct vu_inflight_queue *q = vq->track;

	STORE(&q->desc[head].counter, vq->counter);
	vq->counter++;
	STORE(&q->desc[head].inflight, 1);
}

/* Before the used element for @head is written. */
void vhost_inflight_push_begin(struct vhost_vq *vq, uint16_t head)
{
	struct vu_inflight_queue *q = vq->track;

	STORE(&q->desc[head].next, LOAD(&q->last_batch_head));
	STORE(&q->last_batch_head, head);
}

/* After used->idx was increased to @used_idx. */
void vhost_inflight_push_end(struct vhost_vq *vq, uint16_t head, uint16_t used_idx)
{
	struct vu_inflight_queue *q = vq->track;

	STORE(&q->desc[head].inflight, 0);
	STORE(&q->used_idx, used_idx);
}
