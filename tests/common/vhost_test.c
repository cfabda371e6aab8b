/* SPDX-License-Identifier: MIT */
/* tests/common/vhost_test.c — a vhost device without a server, for unit tests (vhost_test.h). */
#include <errno.h>
#include <unistd.h>

#include "vhost_int.h" /* the test library may reach inside vhost/ */
#include "vhost_test.h"

struct vhost_dev *vhost_test_dev_new(const struct vhost_dev_ops *ops, void *opaque)
{
	return vhost_dev_new(NULL, ops, opaque, -1);
}

void vhost_test_dev_free(struct vhost_dev *dev)
{
	vhost_dev_free(dev);
}

int vhost_test_set_features(struct vhost_dev *dev, uint64_t features)
{
	if (features & ~vhost_offered_features(dev))
		return -EINVAL;
	dev->features = features;
	if (!(features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES))) {
		for (unsigned i = 0; i < dev->nvqs; i++)
			dev->vqs[i].enabled = true;
	}
	vhost_vq_remap_all(dev);
	return 0;
}

int vhost_test_add_region(struct vhost_dev *dev, int fd, uint64_t gpa, uint64_t size, uint64_t uva,
			  uint64_t mmap_offset)
{
	struct vu_mem_region r = {
	    .guest_addr = gpa, .size = size, .user_addr = uva, .mmap_offset = mmap_offset};
	int ret = vhost_mem_add(dev, &r, fd);

	if (ret < 0)
		return ret;
	vhost_vq_remap_all(dev);
	return 0;
}

int vhost_test_vring_setup(struct vhost_dev *dev, unsigned idx, uint32_t num, uint64_t desc,
			   uint64_t avail, uint64_t used, uint16_t base)
{
	struct vhost_vq *vq = vhost_dev_vq(dev, idx);
	int ret;

	if (!vq)
		return -EINVAL;
	ret = vhost_vq_set_num(vq, num);
	if (ret < 0)
		return ret;
	vq->last_avail = base;
	vq->addr.index = idx;
	vq->addr.desc = desc;
	vq->addr.avail = avail;
	vq->addr.used = used;
	vq->addr_set = true;
	return vhost_vq_map(vq);
}

int vhost_test_vring_start(struct vhost_dev *dev, unsigned idx, int kick_fd, int call_fd)
{
	struct vhost_vq *vq = vhost_dev_vq(dev, idx);

	if (!vq) {
		if (kick_fd >= 0)
			close(kick_fd);
		if (call_fd >= 0)
			close(call_fd);
		return -EINVAL;
	}
	vhost_close_fd(&vq->call_fd);
	vq->call_fd = call_fd;
	vq->enabled = true;
	return vhost_vq_start(vq, kick_fd);
}

void vhost_test_vring_counts(struct vhost_dev *dev, unsigned idx, uint64_t c[5])
{
	struct vhost_vq *vq = vhost_dev_vq(dev, idx);

	c[0] = vq ? vq->n_pops : 0;
	c[1] = vq ? vq->n_kicks : 0;
	c[2] = vq ? vq->n_kick_wakes : 0;
	c[3] = vq ? vq->n_signal_asks : 0;
	c[4] = vq ? vq->n_calls : 0;
}

int vhost_test_vring_stop(struct vhost_dev *dev, unsigned idx)
{
	struct vhost_vq *vq = vhost_dev_vq(dev, idx);

	if (!vq)
		return -EINVAL;
	vhost_vq_stop(vq);
	return vq->last_avail;
}
