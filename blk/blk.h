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
 *
 * complete() may run from inside blk_req_submit() (requests rejected during
 * validation complete at once) or later from the image's io_loop; either way
 * exactly once, and blk/ does not touch the request after calling it.
 *
 * Status semantics (one row per check, in the order they are made):
 *   header (16 bytes, may span iovecs) missing, or no writable byte for the
 *     status, or the last writable iovec empty      -> BLK_REQ_MALFORMED
 *   unknown type                                    -> UNSUPP
 *   IN/OUT: data length not a multiple of 512 or above ~2 GiB
 *     (BLK_MAX_RW_BYTES in blk.c), sector not aligned to the logical block
 *     size, range beyond capacity                   -> IOERR
 *   OUT/DISCARD/WRITE_ZEROES on a read-only device  -> IOERR
 *   DISCARD/WRITE_ZEROES: more than one segment     -> UNSUPP
 *     segment missing or short                      -> IOERR
 *     flag bits other than UNMAP, or UNMAP on DISCARD -> UNSUPP
 *     num_sectors above the advertised maximum, range misaligned or beyond
 *     capacity                                      -> IOERR
 *   image I/O errors: blk_status_from_errno()
 * With the write cache disabled (wce = 0, writethrough), OUT and WRITE_ZEROES
 * are followed by an image flush before they complete.
 *
 * Invariants: blk_dev_inflight() counts submitted-but-not-completed requests;
 * a request's iovec array belongs to blk/ (and the image) until complete().
 */
#ifndef VQCOW_BLK_H
#define VQCOW_BLK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "img.h"

#define BLK_REQ_MALFORMED UINT32_MAX

/* Largest seg_max advertised: VQ_MAX_IOV (1024) minus header and status. */
#define BLK_MAX_SEG 1022
/* Advertised per-request limits for DISCARD and WRITE_ZEROES (512-byte sectors). */
#define BLK_MAX_DISCARD_SECTORS      (1u << 22) /* 2 GiB */
#define BLK_MAX_WRITE_ZEROES_SECTORS (1u << 22)

enum blk_req_state {
	BLK_REQ_IDLE = 0,
	BLK_REQ_IO,       /* image operation in flight */
	BLK_REQ_WT_FLUSH, /* writethrough: flush after a write in flight */
};

struct blk_dev;
struct blk_req;

typedef void blk_complete_fn(struct blk_req *req, uint32_t used_len);

struct blk_req {
	/* Set by the caller before blk_req_submit(). */
	struct iovec *iov; /* out_num readable then in_num writable; may be modified */
	unsigned out_num;
	unsigned in_num;
	blk_complete_fn *complete;
	void *priv;
	/* The loop (thread) the request runs on; NULL = the image's. Another
	 * loop only if the image allows it (img->any_loop): blk_dev_any_thread(). */
	struct io_loop *loop;

	/* Private to blk/. */
	struct blk_dev *dev;
	uint32_t type;
	uint64_t sector;
	uint64_t data_len;      /* bytes of data (IN/OUT) */
	uint8_t *status;        /* where the status byte goes */
	uint32_t in_len;        /* bytes written to guest (without status) */
	uint8_t state;          /* enum blk_req_state */
	struct iovec *data_iov; /* data part of iov (header/status stripped) */
	unsigned data_cnt;
	struct img_io io;
	uint64_t t0;               /* submission time (CLOCK_MONOTONIC ns), for the statistics */
	struct blk_stats *stats;   /* where it is counted (blk_req_submit_stats) */
	struct blk_req *held_next; /* held while the device is paused */
	struct io_loop *held_loop; /* the loop it was submitted on (io_loop_current()) */
	struct io_cmd held_cmd;    /* blk_dev_resume: resubmitted on that loop's thread */
};

struct blk_opts {
	const char *serial;          /* GET_ID string, at most 20 bytes used (NULL = "") */
	uint32_t logical_block_size; /* 512 or 4096 (0 = 512) */
	uint16_t num_queues;         /* reported in config (0 = 1) */
	uint16_t queue_size;         /* largest queue size; seg_max = min(size, 1024) - 2 */
	bool read_only;
	bool writeback; /* initial WCE */
};

/*
 * Create the virtio-blk device over an opened image (blk_dev takes no ownership).
 * 0, -EINVAL for a bad option (logical block size, queue size), -ENOMEM.
 * A read-only image makes the device read-only whatever opts->read_only says.
 */
int blk_dev_init(struct blk_dev **devp, struct img *img, const struct blk_opts *opts);
/* Free the device; no request may be in flight. NULL is fine. */
void blk_dev_exit(struct blk_dev *dev);

/* Current write cache mode (config wce): true = writeback. */
bool blk_dev_get_wce(const struct blk_dev *dev);
void blk_dev_set_wce(struct blk_dev *dev, bool writeback);

/*
 * The driver negotiated @features (the transport's SET_FEATURES; every
 * negotiation, also repeated ones on the same connection). Sets the write
 * cache mode as virtio 1.2 5.2.5.1 requires (see blk.c): without CONFIG_WCE,
 * writeback iff FLUSH was negotiated; with it, the configured mode
 * (blk_opts.writeback) on the first negotiation after blk_dev_init() or
 * blk_dev_driver_gone(), and what the driver set in config space after that.
 */
void blk_dev_features_set(struct blk_dev *dev, uint64_t features);
/* The driver went away (the transport's connection closed): the next driver starts afresh. */
void blk_dev_driver_gone(struct blk_dev *dev);

/*
 * virtio-blk feature bits this device offers: SEG_MAX, BLK_SIZE, TOPOLOGY, MQ,
 * FLUSH, CONFIG_WCE, DISCARD and WRITE_ZEROES (when the image supports them
 * and is writable), RO (read-only). Transport bits are the transport's.
 */
uint64_t blk_dev_features(const struct blk_dev *dev);

/*
 * Config space (struct virtio_blk_config, little-endian). Bytes past the end
 * of the struct read as zero (frontends may ask for a newer, longer layout).
 * 0, or -EINVAL if [off, off + len) exceeds 4096 bytes.
 */
int blk_dev_get_config(struct blk_dev *dev, uint8_t *buf, uint32_t off, uint32_t len);
/*
 * Writable fields: only wce (writeback). Bytes of other fields may be
 * written only with their current value. 0 or -EINVAL.
 */
int blk_dev_set_config(struct blk_dev *dev, const uint8_t *buf, uint32_t off, uint32_t len);

/* Capacity changed (image resized): re-read img->size. Returns true if it changed. */
bool blk_dev_update_capacity(struct blk_dev *dev);

/* Start processing one request. Completion as described above. */
void blk_req_submit(struct blk_dev *dev, struct blk_req *req);
/*
 * The same, counted in @stats instead of the device's own counters (NULL =
 * the device's). A program that completes requests on several threads gives
 * each queue's thread its own blk_stats, so the hot path needs no atomics,
 * and sums them with blk_stats_add() when asked.
 */
void blk_req_submit_stats(struct blk_dev *dev, struct blk_req *req, struct blk_stats *stats);

/* Requests submitted but not yet completed (held ones not counted). */
unsigned blk_dev_inflight(const struct blk_dev *dev);

/*
 * Requests held by a paused device (blk_dev_pause): not started, and not
 * in blk_dev_inflight(). Counted from when blk_req_submit() holds one to
 * when blk_dev_resume() takes it back (a request it posts to another
 * thread is no longer held, though not submitted yet). Acquire order; any
 * thread.
 */
unsigned blk_dev_held(const struct blk_dev *dev);

/*
 * Threads: blk_req_submit() may be called from several threads at once (each
 * request with its own req->loop) when this is true, i.e. when the image
 * takes operations on any loop (img->any_loop). The in-flight count is then
 * atomic, and each thread counts its requests in its own blk_stats
 * (blk_req_submit_stats: one per queue, owned by the queue's thread);
 * everything else (config, WCE, capacity, features, histograms) changes
 * only while no other thread runs requests (the caller's job: vqcowd parks
 * its I/O threads around every control-path call). Otherwise all of blk/
 * runs on the image's thread.
 */
bool blk_dev_any_thread(const struct blk_dev *dev);

/*
 * Changing the image under a running guest (external snapshot, the pivot of
 * block-commit). While paused, blk_req_submit() holds new requests (they
 * are not started, and not counted in blk_dev_inflight()) until
 * blk_dev_resume() starts them in arrival order; the requests already in
 * flight go on. Pauses nest: the device runs again after the last resume.
 * blk_dev_set_img() puts @img under the device (capacity unchanged: the
 * caller's images have the same size); requests still in flight finish on
 * the image they started on, so swap only with none in flight (paused and
 * drained: blk_dev_inflight() loads with acquire order, so once it reads 0
 * everything those requests did, the write hook included, is visible).
 *
 * Threads: requests may be held on several threads at once (each submits
 * on its own loop, blk_dev_any_thread() or not); each is started again on
 * the thread whose loop it was submitted on (io_loop_current() then): at
 * once if that is the thread calling blk_dev_resume(), else posted there
 * (io_post_remote), so a request popped by a queue's thread starts, ends
 * and is pushed on that thread. blk_dev_resume() therefore runs inside a
 * loop callback (or on the one thread of a single-threaded program). The
 * calls below, like every change of the device, run while no other thread
 * submits or completes requests (vqcowd parks its I/O threads around them).
 * The write hook below likewise.
 */
void blk_dev_pause(struct blk_dev *dev);
void blk_dev_resume(struct blk_dev *dev);
void blk_dev_set_img(struct blk_dev *dev, struct img *img);
struct img *blk_dev_img(const struct blk_dev *dev);

/*
 * Called each time a write, write-zeroes or discard of [@off, @off + @len)
 * ended on the image (successfully or not: a failed write may have changed
 * part of the range), before the guest learns of it: block-commit copies
 * what changed in the top image while it runs. NULL @fn = none. @fn runs
 * on the thread that completes the request (any of them): it must be
 * thread-safe when requests run on several threads.
 */
typedef void blk_write_hook_fn(void *priv, uint64_t off, uint64_t len);
void blk_dev_set_write_hook(struct blk_dev *dev, blk_write_hook_fn *fn, void *priv);

/*
 * Request statistics, counted where requests complete, with the meaning of
 * QEMU's BlockDeviceStats: a request that ends with success counts in
 * operations, bytes and total_ns (submission to completion); one that failed
 * in the image I/O in failed; one refused before any I/O (out of range,
 * read-only, malformed segment, unsupported flag) in invalid. Write-zeroes
 * counts as a write, discard as unmap (as QEMU's virtio-blk accounts them).
 * GET_ID and unknown types are not counted.
 */
enum { BLK_STAT_READ, BLK_STAT_WRITE, BLK_STAT_FLUSH, BLK_STAT_DISCARD, BLK_STAT_N };
/*
 * Latency histograms (QEMU's block-latency-histogram-set): per request type,
 * up to BLK_HIST_MAX strictly ascending boundaries b0 < b1 < ... (ns) make
 * the bins [0, b0), [b0, b1), ..., [bN-1, inf). Successful requests only,
 * with the latency total_ns adds up (no extra clock read).
 */
#define BLK_HIST_MAX 64
struct blk_stats {
	struct {
		uint64_t ops, bytes, total_ns, failed, invalid;
		uint64_t bins[BLK_HIST_MAX + 1];
	} op[BLK_STAT_N];
	uint64_t wr_highest_offset; /* end of the highest successful write (bytes) */
	uint64_t last_done_ns;      /* CLOCK_MONOTONIC of the last counted completion (0 = none) */
	int last_failed_err;        /* -errno of the last failed request (0 = none yet) */
	uint32_t hist_gen[BLK_STAT_N]; /* blk_dev_set_histogram() generation the bins count for */
};
const struct blk_stats *blk_dev_stats(const struct blk_dev *dev);

/*
 * Set the latency histogram of request type @type (BLK_STAT_*) to @n
 * boundaries (@n = 0: one bin; @bounds NULL: no histogram); its bins start empty in every blk_stats
 * (each notices the new generation at its next request, and sums skip it).
 * Like every change of the device's configuration, only while no other
 * thread completes requests (blk_dev_any_thread(): vqcowd runs every QMP
 * command with its I/O threads parked), since the threads read the
 * boundaries unlocked to bin each request.
 * 0, or -EINVAL (not ascending, a zero boundary, more than BLK_HIST_MAX).
 */
int blk_dev_set_histogram(struct blk_dev *dev, int type, const uint64_t *bounds, unsigned n);
/* The boundaries of @type's histogram: their number, *@bounds set; -1 = no histogram. */
int blk_dev_histogram(const struct blk_dev *dev, int type, const uint64_t **bounds);

/*
 * Requests that failed in the image I/O so far, whichever blk_stats counted
 * them: a cheap test for a once-per-loop-iteration check (error events).
 */
uint64_t blk_dev_failures(const struct blk_dev *dev);

/* @sum += @s (bins only if @s counts for the device's current histograms). */
void blk_stats_add(const struct blk_dev *dev, struct blk_stats *sum, const struct blk_stats *s);

/* Translate -errno to a virtio-blk status byte (the one place that does). */
uint8_t blk_status_from_errno(int err);

#endif /* VQCOW_BLK_H */
