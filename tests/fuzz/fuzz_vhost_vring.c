/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target: the split-virtqueue descriptor walker of vhost/vring.c
 * over guest memory the fuzzer controls. The rings are set up through the
 * test library (tests/common/vhost_test.h: the code paths SET_MEM_TABLE and
 * SET_VRING_* use), then vq_pop/vq_push/vq_notify run as the device would.
 *
 * Input (mkcorpus.py writes seeds in this layout):
 *   byte 0     features: bit 0 EVENT_IDX, bit 1 INDIRECT_DESC; bit 2: complete
 *              the elements in reverse order at the end instead of at once
 *   byte 1     log2 of the queue size (0..10; larger values wrap)
 *   bytes 2-3  SET_VRING_BASE (last_avail), little endian
 *   bytes 4-5  a second avail->idx the "guest" publishes after the first
 *              round of pops (phase two), little endian
 *   bytes 6-   guest memory, FVM_GUEST bytes at most (the rest is zero)
 *
 * Guest memory: one memfd seen as three regions with a hole, so buffers can
 * cross regions and point into unmapped space:
 *   gpa [0, 32K) -> memfd [0, 32K);  gpa [32K, 64K) -> memfd [32K, 64K);
 *   gpa [128K, 160K) -> memfd [64K, 96K).
 * Rings: descriptor table at gpa 0, avail at 0x4000, used at 0x5000.
 *
 * Checked beyond "no crash, no sanitizer report": every iovec of a popped
 * element lies inside one region of our mapping; a head is never handed out
 * twice while in flight; element iovec counts stay within VQ_MAX_IOV; the
 * used index moves by exactly the number of pushes.
 */
#include <endian.h>
#include <errno.h>
#include <linux/virtio_ring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_vhost.h"
#include "vhost.h"
#include "vlog.h"
#include "vhost_test.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define die(...)                                                                                   \
	do {                                                                                       \
		fprintf(stderr, "fuzz_vhost_vring: " __VA_ARGS__);                                 \
		fputc('\n', stderr);                                                               \
		abort();                                                                           \
	} while (0)

#define KiB        1024u
#define FVM_GUEST  (96u * KiB)
#define UVA        0x7f0000000000ull
#define DESC_GPA   0x0000u
#define AVAIL_GPA  0x4000u
#define USED_GPA   0x5000u
#define F_EVENTIDX (1ull << VIRTIO_RING_F_EVENT_IDX)
#define F_INDIRECT (1ull << VIRTIO_RING_F_INDIRECT_DESC)
#define F_VERSION1 (1ull << 32)

struct felem {
	struct vq_elem elem;
	uint64_t tag;
};

static uint8_t *g_mem;
static int g_memfd = -1;

static struct vq_elem *held[VQ_MAX_SIZE];
static unsigned nheld;
static bool reverse;
static unsigned pushes;

static int f_watch(void *opaque, int fd, vhost_watch_cb *cb, void *arg)
{
	return 0;
}

static void f_unwatch(void *opaque, int fd)
{
}

static void check_elem(struct vhost_vq *vq, const struct vq_elem *e)
{
	struct iovec regs[8];
	unsigned nr = vhost_dev_mem_regions(vq_dev(vq), regs, 8);
	int bad;

	if ((unsigned)e->out_num + e->in_num > VQ_MAX_IOV)
		die("element with %u + %u iovecs", e->out_num, e->in_num);
	if (e->head >= vq_size(vq))
		die("head %u beyond the queue size %u", e->head, vq_size(vq));
	for (unsigned i = 0; i < nheld; i++)
		if (held[i]->head == e->head)
			die("head %u handed out twice", e->head);
	bad = fuzz_elem_outside(e, regs, nr < 8 ? nr : 8, false);
	if (bad >= 0)
		die("iovec %d (%p + %zu) outside every memory region", bad, e->iov[bad].iov_base,
		    e->iov[bad].iov_len);
}

static void push(struct vhost_vq *vq, struct vq_elem *e)
{
	uint32_t len = 1;

	for (unsigned i = e->out_num; i < (unsigned)e->out_num + e->in_num; i++)
		len += (uint32_t)e->iov[i].iov_len;
	vq_push(vq, e, len);
	pushes++;
}

static void f_kick(void *opaque, struct vhost_vq *vq)
{
	struct vq_elem *e;
	int ret;

	vq_disable_notify(vq);
	for (;;) {
		while ((ret = vq_pop(vq, &e)) == 0) {
			check_elem(vq, e);
			if (reverse && nheld < VQ_MAX_SIZE)
				held[nheld++] = e;
			else
				push(vq, e);
		}
		if (ret != -EAGAIN || !vq_enable_notify(vq))
			break;
	}
	vq_notify(vq);
}

static const struct vhost_dev_ops f_ops = {
    .num_queues = 1,
    .max_queue_size = VQ_MAX_SIZE,
    .elem_size = sizeof(struct felem),
    .watch = f_watch,
    .unwatch = f_unwatch,
    .queue_kick = f_kick,
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	fuzz_quiet_logs();
	g_memfd = memfd_create("fuzz-vring", MFD_CLOEXEC);
	if (g_memfd < 0 || ftruncate(g_memfd, FVM_GUEST) < 0)
		die("memfd: %s", strerror(errno));
	g_mem = mmap(NULL, FVM_GUEST, PROT_READ | PROT_WRITE, MAP_SHARED, g_memfd, 0);
	if (g_mem == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t features = F_VERSION1;
	struct vhost_dev *dev;
	struct vhost_vq *vq;
	struct vring_used *used = (struct vring_used *)(g_mem + USED_GPA);
	uint16_t used_before;
	unsigned num;

	if (size < 6)
		return 0;
	if (data[0] & 1)
		features |= F_EVENTIDX;
	if (data[0] & 2)
		features |= F_INDIRECT;
	reverse = data[0] & 4;
	num = 1u << (data[1] % 11);
	memset(g_mem, 0, FVM_GUEST);
	memcpy(g_mem, data + 6, size - 6 < FVM_GUEST ? size - 6 : FVM_GUEST);
	nheld = 0;
	pushes = 0;

	dev = vhost_test_dev_new(&f_ops, NULL);
	if (!dev)
		die("no device");
	if (vhost_test_set_features(dev, features) < 0 ||
	    vhost_test_add_region(dev, dup(g_memfd), 0, 32 * KiB, UVA, 0) < 0 ||
	    vhost_test_add_region(dev, dup(g_memfd), 32 * KiB, 32 * KiB, UVA + 32 * KiB, 32 * KiB) <
		0 ||
	    vhost_test_add_region(dev, dup(g_memfd), 128 * KiB, 32 * KiB, UVA + 128 * KiB,
				  64 * KiB) < 0)
		die("set-up of the memory table failed");
	if (vhost_test_vring_setup(dev, 0, num, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
				   (uint16_t)(data[2] | data[3] << 8)) < 0)
		die("ring set-up failed");
	vq = vhost_dev_vq(dev, 0);
	used_before = le16toh(used->idx);
	/* starting pops what is already available (queue_kick) */
	if (vhost_test_vring_start(dev, 0, eventfd(0, EFD_CLOEXEC), eventfd(0, EFD_CLOEXEC)) < 0)
		die("ring start failed");
	/* phase two: the guest publishes more (or moves avail->idx wildly) */
	if (!vhost_dev_is_broken(dev)) {
		struct vring_avail *avail = (struct vring_avail *)(g_mem + AVAIL_GPA);

		__atomic_store_n(&avail->idx, (uint16_t)(data[4] | data[5] << 8), __ATOMIC_RELEASE);
		if (vq_avail_pending(vq))
			f_kick(NULL, vq);
	}
	while (nheld)
		push(vq, held[--nheld]);
	vq_notify(vq);
	if (!vhost_dev_is_broken(dev) && (uint16_t)(le16toh(used->idx) - used_before) != pushes)
		die("used->idx moved by %u for %u pushes",
		    (unsigned)(uint16_t)(le16toh(used->idx) - used_before), pushes);
	if (vhost_dev_inflight(dev))
		die("%u elements still in flight after pushing all", vhost_dev_inflight(dev));
	vhost_test_vring_stop(dev, 0);
	vhost_test_dev_free(dev);
	return 0;
}
