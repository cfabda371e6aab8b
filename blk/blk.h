/* SPDX-License-Identifier: MIT */
/*
 * blk/ — virtio-blk semantics: request parsing, status, config space.
 *
 * Knows no transport: a request arrives as an iovec array (device-readable
 * buffers first, then device-writable ones) with a completion callback; blk/
 * never sees a virtqueue. The image behind the disk is a struct img.
 *
 * Request life: blk_req_submit() copies the 16-byte header to its own storage,
 * validates it (status table in ../shared/DESIGN.md), issues image I/O and
 * finally, exactly once, writes the status byte (the last byte of the last
 * device-writable buffer) and calls req->complete(req, used_len) with
 * used_len = bytes written into guest buffers + 1. A request whose header or
 * status buffer is missing or too short completes with
 * req->complete(req, BLK_REQ_MALFORMED): the transport must drop the
 * connection.
 */
#ifndef VQCOW_BLK_H
#define VQCOW_BLK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "image.h"

#define BLK_REQ_MALFORMED UINT32_MAX

struct blk_dev;
struct blk_req;

typedef void blk_complete_fn(struct blk_req *req, uint32_t used_len);

struct blk_req {
	/* Set by the caller before blk_req_submit(). */
	struct iovec *iov;   /* out_num readable then in_num writable; may be modified */
	unsigned out_num;
	unsigned in_num;
	blk_complete_fn *complete;
	void *priv;

	/* Private to blk/. */
	struct blk_dev *dev;
	uint32_t type;
	uint64_t sector;
	uint32_t data_len;
	uint8_t *status;     /* where the status byte goes */
	uint32_t in_len;     /* bytes written to guest (without status) */
	struct img_io io;
};

struct blk_opts {
	const char *serial;          /* GET_ID string, at most 20 bytes used */
	uint32_t logical_block_size; /* 512 or 4096 */
	uint16_t num_queues;
	uint16_t queue_size;
	bool read_only;
	bool writeback;              /* initial WCE */
};

/* Create the virtio-blk device over an opened image (blk_dev takes no ownership). */
int blk_dev_init(struct blk_dev **devp, struct img *img, const struct blk_opts *opts);
void blk_dev_exit(struct blk_dev *dev);

/* virtio-blk feature bits this device offers (VIRTIO_BLK_F_*, VIRTIO_F_*). */
uint64_t blk_dev_features(const struct blk_dev *dev);

/* Config space (struct virtio_blk_config, little-endian). 0 or -errno. */
int blk_dev_get_config(struct blk_dev *dev, uint8_t *buf, uint32_t off, uint32_t len);
/* Writable fields: only wce (writeback). 0 or -errno (-EINVAL for others). */
int blk_dev_set_config(struct blk_dev *dev, const uint8_t *buf, uint32_t off, uint32_t len);

/* Capacity changed (image resized): re-read img->size. Returns true if it changed. */
bool blk_dev_update_capacity(struct blk_dev *dev);

/* Start processing one request. Completion as described above. */
void blk_req_submit(struct blk_dev *dev, struct blk_req *req);

/* Requests submitted but not yet completed. */
unsigned blk_dev_inflight(const struct blk_dev *dev);

/* Translate -errno to a virtio-blk status byte (the one place that does). */
uint8_t blk_status_from_errno(int err);

#endif /* VQCOW_BLK_H */
