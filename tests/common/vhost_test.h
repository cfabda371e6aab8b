/* SPDX-License-Identifier: MIT */
/*
 * tests/common/vhost_test.h — test-only entry points (unit tests of the rings).
 *
 * A test device has no server and no socket: the test sets up memory and
 * rings directly (the same code paths SET_MEM_TABLE / SET_VRING_* use) and
 * then drives vq_pop/vq_push/vq_notify. Built into the test library
 * vqcow_test_vhost, never into vqcow_vhost.
 */
#ifndef VQCOW_TESTS_VHOST_TEST_H
#define VQCOW_TESTS_VHOST_TEST_H

#include <stdint.h>

#include "vhost.h"

/* A device without a connection. NULL on allocation failure. */
struct vhost_dev *vhost_test_dev_new(const struct vhost_dev_ops *ops, void *opaque);
/* Free it (ignores in-flight elements). */
void vhost_test_dev_free(struct vhost_dev *dev);
/* As SET_FEATURES (must be a subset of what GET_FEATURES offers). 0 or -errno. */
int vhost_test_set_features(struct vhost_dev *dev, uint64_t features);
/* As ADD_MEM_REG; @fd is consumed. 0 or -errno. */
int vhost_test_add_region(struct vhost_dev *dev, int fd, uint64_t gpa, uint64_t size, uint64_t uva,
			  uint64_t mmap_offset);
/* As SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (front-end virtual addresses). */
int vhost_test_vring_setup(struct vhost_dev *dev, unsigned idx, uint32_t num, uint64_t desc,
			   uint64_t avail, uint64_t used, uint16_t base);
/* As SET_VRING_CALL (call_fd may be -1) then SET_VRING_KICK and SET_VRING_ENABLE(1).
 * Both fds are consumed. 0 or -errno. */
int vhost_test_vring_start(struct vhost_dev *dev, unsigned idx, int kick_fd, int call_fd);
/* As GET_VRING_BASE without the drain: stops the ring, returns last_avail. */
int vhost_test_vring_stop(struct vhost_dev *dev, unsigned idx);
/* Ring @idx's counts (vhost_vq_log_counts): requests, kicks, kick wake-ups,
 * signal decisions, calls. */
void vhost_test_vring_counts(struct vhost_dev *dev, unsigned idx, uint64_t c[5]);

#endif /* VQCOW_TESTS_VHOST_TEST_H */
