/* SPDX-License-Identifier: MIT */
/*
 * blk/blk.c — virtio-blk request processing and config space.
 *
 * Virtio 1.2, 5.2.6 "Device Operation": a request is
 *     le32 type; le32 reserved; le64 sector; u8 data[]; u8 status;
 * where the header is device-readable and the status byte is the last
 * device-writable byte. Everything here is transport-free: the caller hands
 * us an iovec array and a completion callback (see blk.h).
 */
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <linux/virtio_blk.h>

#include "blk.h"
#include "io.h" /* iovec helpers */
#include "vlog.h"

#define SECTOR_SHIFT 9
#define SECTOR_SIZE  512u
#define BLK_HDR_SIZE 16u
#define BLK_SEG_SIZE 16u /* struct virtio_blk_discard_write_zeroes */
#define CONFIG_MAX   4096u
/* io/ moves at most INT_MAX bytes per command; used_len is 32-bit. */
#define BLK_MAX_RW_BYTES (0x7fffffffu & ~4095u)

_Static_assert(sizeof(struct virtio_blk_outhdr) == BLK_HDR_SIZE, "virtio-blk header is 16 bytes");
_Static_assert(sizeof(struct virtio_blk_discard_write_zeroes) == BLK_SEG_SIZE,
	       "discard/write-zeroes segment is 16 bytes");

/*
 * Virtio 1.2, 5.2.4 "Device configuration layout" (all fields little-endian),
 * up to the write-zeroes fields. Our own copy so the layout does not depend on
 * the installed kernel headers; bytes after it (secure erase, zoned) read as 0.
 */
struct blk_config {
	uint64_t capacity;
	uint32_t size_max;
	uint32_t seg_max;
	struct {
		uint16_t cylinders;
		uint8_t heads;
		uint8_t sectors;
	} geometry;
	uint32_t blk_size;
	uint8_t physical_block_exp;
	uint8_t alignment_offset;
	uint16_t min_io_size;
	uint32_t opt_io_size;
	uint8_t wce;
	uint8_t unused;
	uint16_t num_queues;
	uint32_t max_discard_sectors;
	uint32_t max_discard_seg;
	uint32_t discard_sector_alignment;
	uint32_t max_write_zeroes_sectors;
	uint32_t max_write_zeroes_seg;
	uint8_t write_zeroes_may_unmap;
	uint8_t unused1[3];
} __attribute__((packed));
_Static_assert(sizeof(struct blk_config) == 60, "virtio_blk_config up to write_zeroes_may_unmap");
_Static_assert(offsetof(struct blk_config, wce) == 32, "wce offset");
_Static_assert(offsetof(struct blk_config, num_queues) == 34, "num_queues offset");

struct blk_dev {
	struct img *img;
	char serial[VIRTIO_BLK_ID_BYTES]; /* zero padded, not terminated */
	uint32_t lbs;                     /* logical block size in bytes */
	uint32_t lbs_sectors;             /* lbs / 512 */
	uint16_t num_queues;
	uint32_t seg_max;
	bool read_only;
	bool wce;          /* writeback */
	bool wce_config;   /* the configured mode (blk_opts.writeback) */
	bool wce_pending;  /* the next negotiation with CONFIG_WCE sets wce_config */
	uint64_t capacity; /* in 512-byte sectors, a multiple of lbs_sectors */
	/*
	 * atomic: requests of every thread. Alone on its cache line (the
	 * padding keeps it so whatever calloc's alignment): each thread's add
	 * and subtract took from the other threads the line they read img,
	 * capacity and read_only from on every request.
	 */
	char inflight_pad0[64];
	unsigned inflight;
	char inflight_pad1[64];
	struct blk_stats stats;
	uint64_t failures; /* blk_dev_failures(): atomic, touched only on the failure path */
	struct {
		bool on;
		uint32_t n; /* boundaries: n + 1 bins */
		uint32_t gen;
		uint64_t bound[BLK_HIST_MAX];
	} hist[BLK_STAT_N];
	unsigned paused;      /* blk_dev_pause depth (changes with no other thread running) */
	struct blk_req *held; /* atomic: requests that arrived while paused, newest first */
	unsigned nheld;       /* atomic: how many (blk_dev_held) */
	blk_write_hook_fn *wr_hook;
	void *wr_hook_priv;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * A blk_stats has one writer, the thread that completes its requests, and is
 * read by whoever sums it (query-blockstats on the main thread): relaxed
 * atomic stores and loads, plain moves on x86-64 and arm64, no
 * read-modify-write, no fence; the sum sees each counter whole.
 */
#define STAT_ADD(x, v) __atomic_store_n(&(x), (x) + (v), __ATOMIC_RELAXED)
#define STAT_SET(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define STAT_GET(x)    __atomic_load_n(&(x), __ATOMIC_RELAXED)

static void account(struct blk_dev *dev, struct blk_req *req, int err)
{
	struct blk_stats *st;
	uint64_t lat, now;
	int k;

	switch (req->type) {
	case VIRTIO_BLK_T_IN:
		k = BLK_STAT_READ;
		break;
	case VIRTIO_BLK_T_OUT:
	case VIRTIO_BLK_T_WRITE_ZEROES:
		k = BLK_STAT_WRITE;
		break;
	case VIRTIO_BLK_T_FLUSH:
		k = BLK_STAT_FLUSH;
		break;
	case VIRTIO_BLK_T_DISCARD:
		k = BLK_STAT_DISCARD;
		break;
	default:
		return;
	}
	st = req->stats ? req->stats : &dev->stats;
	if (err < 0 && req->state == BLK_REQ_IDLE) {
		STAT_ADD(st->op[k].invalid, 1); /* refused before any I/O */
		return;
	}
	if (err < 0) {
		STAT_ADD(st->op[k].failed, 1);
		STAT_SET(st->last_failed_err, err);
		__atomic_fetch_add(&dev->failures, 1, __ATOMIC_RELAXED);
		return;
	}
	now = now_ns();
	lat = now - req->t0;
	STAT_SET(st->last_done_ns, now);
	STAT_ADD(st->op[k].ops, 1);
	STAT_ADD(st->op[k].bytes, req->data_len);
	STAT_ADD(st->op[k].total_ns, lat);
	if (dev->hist[k].on) {
		/* the bin: how many boundaries are <= lat (binary search) */
		uint32_t lo = 0, hi = dev->hist[k].n;

		if (st->hist_gen[k] != dev->hist[k].gen) {
			for (unsigned i = 0; i <= BLK_HIST_MAX; i++)
				STAT_SET(st->op[k].bins[i], 0);
			STAT_SET(st->hist_gen[k], dev->hist[k].gen);
		}
		while (lo < hi) {
			uint32_t mid = (lo + hi) / 2;

			if (dev->hist[k].bound[mid] <= lat)
				lo = mid + 1;
			else
				hi = mid;
		}
		STAT_ADD(st->op[k].bins[lo], 1);
	}
	if (req->type == VIRTIO_BLK_T_OUT && req->data_len &&
	    (req->sector << SECTOR_SHIFT) + req->data_len > st->wr_highest_offset)
		STAT_SET(st->wr_highest_offset, (req->sector << SECTOR_SHIFT) + req->data_len);
}

int blk_dev_set_histogram(struct blk_dev *dev, int type, const uint64_t *bounds, unsigned n)
{
	if (type < 0 || type >= BLK_STAT_N || n > BLK_HIST_MAX)
		return -EINVAL;
	for (unsigned i = 0; i < n; i++) {
		if (bounds[i] <= (i ? bounds[i - 1] : 0))
			return -EINVAL;
	}
	if (n)
		memcpy(dev->hist[type].bound, bounds, n * sizeof(*bounds));
	dev->hist[type].on = bounds != NULL;
	dev->hist[type].n = bounds ? n : 0;
	dev->hist[type].gen++;
	memset(dev->stats.op[type].bins, 0, sizeof(dev->stats.op[type].bins));
	dev->stats.hist_gen[type] = dev->hist[type].gen;
	return 0;
}

uint64_t blk_dev_failures(const struct blk_dev *dev)
{
	return __atomic_load_n(&dev->failures, __ATOMIC_RELAXED);
}

int blk_dev_histogram(const struct blk_dev *dev, int type, const uint64_t **bounds)
{
	if (type < 0 || type >= BLK_STAT_N || !dev->hist[type].on)
		return -1;
	*bounds = dev->hist[type].bound;
	return (int)dev->hist[type].n;
}

void blk_stats_add(const struct blk_dev *dev, struct blk_stats *sum, const struct blk_stats *s)
{
	for (int k = 0; k < BLK_STAT_N; k++) {
		sum->op[k].ops += STAT_GET(s->op[k].ops);
		sum->op[k].bytes += STAT_GET(s->op[k].bytes);
		sum->op[k].total_ns += STAT_GET(s->op[k].total_ns);
		sum->op[k].failed += STAT_GET(s->op[k].failed);
		sum->op[k].invalid += STAT_GET(s->op[k].invalid);
		if (STAT_GET(s->hist_gen[k]) == dev->hist[k].gen) {
			for (uint32_t i = 0; i <= dev->hist[k].n; i++)
				sum->op[k].bins[i] += STAT_GET(s->op[k].bins[i]);
		}
		sum->hist_gen[k] = dev->hist[k].gen;
	}
	if (STAT_GET(s->wr_highest_offset) > sum->wr_highest_offset)
		sum->wr_highest_offset = STAT_GET(s->wr_highest_offset);
	if (STAT_GET(s->last_done_ns) > sum->last_done_ns)
		sum->last_done_ns = STAT_GET(s->last_done_ns);
	if (STAT_GET(s->last_failed_err))
		sum->last_failed_err = STAT_GET(s->last_failed_err);
}

const struct blk_stats *blk_dev_stats(const struct blk_dev *dev)
{
	return &dev->stats;
}

/* ---- status ---- */

uint8_t blk_status_from_errno(int err)
{
	switch (err) {
	case 0:
		return VIRTIO_BLK_S_OK;
	case -ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
	case -EOPNOTSUPP:
#endif
		return VIRTIO_BLK_S_UNSUPP;
	default:
		return VIRTIO_BLK_S_IOERR;
	}
}

/* The one exit of every well-formed request. */
static void req_finish(struct blk_req *req, int err)
{
	struct blk_dev *dev = req->dev;

	account(dev, req, err);
	*req->status = blk_status_from_errno(err);
	req->state = BLK_REQ_IDLE;
	/* release: what the request did (the write hook) comes before the
	 * count a drain waits on (blk_dev_inflight) */
	__atomic_fetch_sub(&dev->inflight, 1, __ATOMIC_RELEASE);
	req->complete(req, req->in_len + 1);
}

static bool is_write_type(uint32_t type)
{
	return type == VIRTIO_BLK_T_OUT || type == VIRTIO_BLK_T_WRITE_ZEROES;
}

static void req_io_done(struct img_io *io, int res)
{
	struct blk_req *req = io->priv;
	struct blk_dev *dev = req->dev;

	if (dev->wr_hook && req->state == BLK_REQ_IO &&
	    (io->op == IMG_OP_WRITE || io->op == IMG_OP_WRITE_ZEROES || io->op == IMG_OP_DISCARD))
		dev->wr_hook(dev->wr_hook_priv, io->off, io->len);
	if (res == 0 && req->state == BLK_REQ_IO && is_write_type(req->type) && !dev->wce) {
		/* Writethrough: the write is not complete until it is stable. */
		req->state = BLK_REQ_WT_FLUSH;
		img_flush(dev->img, &req->io);
		return;
	}
	if (res == 0 && req->type == VIRTIO_BLK_T_IN)
		req->in_len = (uint32_t)req->data_len;
	if (res < 0 && res != -EROFS && res != -ENOTSUP && res != -EOPNOTSUPP) {
		/* The guest sees only IOERR: say here what failed and why
		 * (rate-limited per call site by vlog). */
		static const char *const ops[] = {"?",     "read",    "write",
						  "flush", "discard", "write-zeroes"};

		vlog(VLOG_ERROR, "blk", "%s of %llu bytes at offset %llu failed: %s",
		     io->op < sizeof(ops) / sizeof(ops[0]) ? ops[io->op] : "?",
		     (unsigned long long)io->len, (unsigned long long)io->off, strerror(-res));
	}
	req_finish(req, res);
}

/* ---- request parsing ---- */

/*
 * Copy the header out, locate the status byte and strip both from the iovec
 * array in place. Returns false if the request is malformed.
 */
static bool req_parse(struct blk_req *req, struct virtio_blk_outhdr *hdr, struct iovec **out_iov,
		      unsigned *out_cnt, struct iovec **in_iov, unsigned *in_cnt)
{
	struct iovec *iov = req->iov;
	unsigned skip = 0;
	size_t rest = BLK_HDR_SIZE;

	if (!iov || req->in_num == 0)
		return false;
	if (io_iov_to_buf(iov, req->out_num, 0, hdr, sizeof(*hdr)) != sizeof(*hdr))
		return false;

	struct iovec *last = &iov[req->out_num + req->in_num - 1];
	if (last->iov_len < 1)
		return false;
	req->status = (uint8_t *)last->iov_base + last->iov_len - 1;
	last->iov_len--;
	*in_iov = &iov[req->out_num];
	*in_cnt = req->in_num - (last->iov_len == 0 ? 1 : 0);

	/* Strip the header from the device-readable side. */
	while (rest > 0) {
		if (iov[skip].iov_len <= rest) {
			rest -= iov[skip].iov_len;
			skip++;
		} else {
			iov[skip].iov_base = (uint8_t *)iov[skip].iov_base + rest;
			iov[skip].iov_len -= rest;
			rest = 0;
		}
	}
	*out_iov = &iov[skip];
	*out_cnt = req->out_num - skip;
	return true;
}

/* Range of @bytes at @sector: 512-multiple, lbs-aligned start, within capacity. */
static int check_range(const struct blk_dev *dev, uint64_t sector, uint64_t bytes)
{
	uint64_t nsec = bytes >> SECTOR_SHIFT;

	if (bytes & (SECTOR_SIZE - 1))
		return -EINVAL;
	if (sector % dev->lbs_sectors)
		return -EINVAL;
	if (sector > dev->capacity || nsec > dev->capacity - sector)
		return -ERANGE;
	return 0;
}

static int submit_rw(struct blk_dev *dev, struct blk_req *req, struct iovec *iov, unsigned cnt,
		     bool write)
{
	uint64_t len = io_iov_len(iov, cnt);
	int ret;

	if (write && dev->read_only)
		return -EROFS;
	ret = check_range(dev, req->sector, len);
	if (ret < 0)
		return ret;
	if (len > BLK_MAX_RW_BYTES)
		return -EINVAL;
	req->data_len = len;
	req->data_iov = iov;
	req->data_cnt = cnt;
	if (len == 0) {
		req_finish(req, 0);
		return 0;
	}
	req->state = BLK_REQ_IO;
	if (write)
		img_writev(dev->img, &req->io, iov, cnt, req->sector << SECTOR_SHIFT, len);
	else
		img_readv(dev->img, &req->io, iov, cnt, req->sector << SECTOR_SHIFT, len);
	return 0;
}

static int submit_get_id(struct blk_dev *dev, struct blk_req *req, struct iovec *iov, unsigned cnt)
{
	/* Virtio 1.2 5.2.6: the ID string is 20 bytes, zero padded. A shorter
	 * buffer gets what fits. */
	req->in_len = (uint32_t)io_iov_from_buf(iov, cnt, 0, dev->serial, sizeof(dev->serial));
	req_finish(req, 0);
	return 0;
}

static int submit_discard_wz(struct blk_dev *dev, struct blk_req *req, struct iovec *iov,
			     unsigned cnt)
{
	struct virtio_blk_discard_write_zeroes seg;
	bool wz = req->type == VIRTIO_BLK_T_WRITE_ZEROES;
	uint64_t len = io_iov_len(iov, cnt);
	uint64_t sector;
	uint32_t nsec, flags, max;
	int ret;

	if (wz ? !dev->img->supports_write_zeroes : !dev->img->supports_discard)
		return -ENOTSUP;
	/* We advertise max_{discard,write_zeroes}_seg = 1. */
	if (len > BLK_SEG_SIZE)
		return -ENOTSUP;
	if (io_iov_to_buf(iov, cnt, 0, &seg, sizeof(seg)) != sizeof(seg))
		return -EINVAL;
	sector = le64toh(seg.sector);
	nsec = le32toh(seg.num_sectors);
	flags = le32toh(seg.flags);
	/* 5.2.6.2: the device MUST set UNSUPP for a discard with the unmap flag
	 * or for unknown flags. */
	if (flags & ~(wz ? (uint32_t)VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0u))
		return -ENOTSUP;
	if (dev->read_only)
		return -EROFS;
	max = wz ? BLK_MAX_WRITE_ZEROES_SECTORS : BLK_MAX_DISCARD_SECTORS;
	if (nsec > max)
		return -EINVAL;
	ret = check_range(dev, sector, (uint64_t)nsec << SECTOR_SHIFT);
	if (ret < 0)
		return ret;
	if (nsec == 0) {
		req_finish(req, 0);
		return 0;
	}
	req->data_len = (uint64_t)nsec << SECTOR_SHIFT; /* for the statistics */
	req->state = BLK_REQ_IO;
	if (wz)
		img_write_zeroes(dev->img, &req->io, sector << SECTOR_SHIFT,
				 (uint64_t)nsec << SECTOR_SHIFT,
				 (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ? IMG_IO_UNMAP : 0);
	else
		img_discard(dev->img, &req->io, sector << SECTOR_SHIFT,
			    (uint64_t)nsec << SECTOR_SHIFT);
	return 0;
}

/*
 * Paused: keep @req (submitted on this thread's loop, if any) for
 * blk_dev_resume. Several threads may hold requests at once: a lock-free
 * push; the list is newest first.
 */
static void hold(struct blk_dev *dev, struct blk_req *req)
{
	struct blk_req *head = __atomic_load_n(&dev->held, __ATOMIC_RELAXED);

	req->held_loop = io_loop_current();
	__atomic_fetch_add(&dev->nheld, 1, __ATOMIC_RELEASE);
	do {
		req->held_next = head;
	} while (!__atomic_compare_exchange_n(&dev->held, &head, req, true, __ATOMIC_RELEASE,
					      __ATOMIC_RELAXED));
}

void blk_req_submit(struct blk_dev *dev, struct blk_req *req)
{
	blk_req_submit_stats(dev, req, NULL);
}

void blk_req_submit_stats(struct blk_dev *dev, struct blk_req *req, struct blk_stats *stats)
{
	struct virtio_blk_outhdr hdr;
	struct iovec *out_iov = NULL, *in_iov = NULL;
	unsigned out_cnt = 0, in_cnt = 0;
	int ret;

	req->stats = stats;
	if (dev->paused) {
		hold(dev, req);
		return;
	}
	req->dev = dev;
	req->state = BLK_REQ_IDLE;
	req->in_len = 0;
	req->data_len = 0;
	req->data_iov = NULL;
	req->data_cnt = 0;
	req->status = NULL;
	req->io.done = req_io_done;
	req->io.priv = req;
	req->io.loop = req->loop;
	req->t0 = now_ns();

	if (!req_parse(req, &hdr, &out_iov, &out_cnt, &in_iov, &in_cnt)) {
		req->complete(req, BLK_REQ_MALFORMED);
		return;
	}
	__atomic_fetch_add(&dev->inflight, 1, __ATOMIC_RELAXED);
	req->type = le32toh(hdr.type);
	req->sector = le64toh(hdr.sector);

	switch (req->type) {
	case VIRTIO_BLK_T_IN:
		ret = submit_rw(dev, req, in_iov, in_cnt, false);
		break;
	case VIRTIO_BLK_T_OUT:
		ret = submit_rw(dev, req, out_iov, out_cnt, true);
		break;
	case VIRTIO_BLK_T_FLUSH:
		req->state = BLK_REQ_IO;
		img_flush(dev->img, &req->io);
		ret = 0;
		break;
	case VIRTIO_BLK_T_GET_ID:
		ret = submit_get_id(dev, req, in_iov, in_cnt);
		break;
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES:
		ret = submit_discard_wz(dev, req, out_iov, out_cnt);
		break;
	default:
		ret = -ENOTSUP;
		break;
	}
	if (ret < 0)
		req_finish(req, ret);
}

unsigned blk_dev_held(const struct blk_dev *dev)
{
	return __atomic_load_n(&dev->nheld, __ATOMIC_ACQUIRE);
}

unsigned blk_dev_inflight(const struct blk_dev *dev)
{
	return __atomic_load_n(&dev->inflight, __ATOMIC_ACQUIRE);
}

bool blk_dev_any_thread(const struct blk_dev *dev)
{
	return dev->img->any_loop;
}

void blk_dev_pause(struct blk_dev *dev)
{
	dev->paused++;
}

/* On the thread that held it: the request starts (or is held again). */
static void held_resubmit(struct io_cmd *cmd, int res)
{
	struct blk_req *req = cmd->priv;

	(void)res;
	blk_req_submit_stats(req->dev, req, req->stats);
}

void blk_dev_resume(struct blk_dev *dev)
{
	struct blk_req *r, *fifo = NULL;
	struct io_loop *here = io_loop_current();

	if (!dev->paused || --dev->paused)
		return;
	/* arrival order: the list is newest first */
	r = __atomic_exchange_n(&dev->held, NULL, __ATOMIC_ACQUIRE);
	while (r) {
		struct blk_req *next = r->held_next;

		r->held_next = fifo;
		fifo = r;
		r = next;
		__atomic_fetch_sub(&dev->nheld, 1, __ATOMIC_RELEASE);
	}
	for (r = fifo; r; r = fifo) {
		fifo = r->held_next;
		if (r->held_loop && r->held_loop != here) {
			/* its queue's thread: the request starts and ends there */
			r->dev = dev;
			r->held_cmd.done = held_resubmit;
			r->held_cmd.priv = r;
			io_post_remote(r->held_loop, &r->held_cmd);
		} else {
			blk_req_submit_stats(dev, r, r->stats);
		}
	}
}

void blk_dev_set_img(struct blk_dev *dev, struct img *img)
{
	dev->img = img;
}

struct img *blk_dev_img(const struct blk_dev *dev)
{
	return dev->img;
}

void blk_dev_set_write_hook(struct blk_dev *dev, blk_write_hook_fn *fn, void *priv)
{
	dev->wr_hook = fn;
	dev->wr_hook_priv = priv;
}

/* ---- device ---- */

static uint64_t capacity_of(const struct blk_dev *dev)
{
	uint64_t sectors = dev->img->size >> SECTOR_SHIFT;

	return sectors - sectors % dev->lbs_sectors;
}

int blk_dev_init(struct blk_dev **devp, struct img *img, const struct blk_opts *opts)
{
	struct blk_dev *dev;
	uint32_t lbs = opts->logical_block_size ? opts->logical_block_size : 512;
	uint32_t qsize = opts->queue_size ? opts->queue_size : 256;

	if (lbs != 512 && lbs != 4096)
		return -EINVAL;
	if (qsize > 1024 || !img)
		return -EINVAL;
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return -ENOMEM;
	dev->img = img;
	if (opts->serial)
		memcpy(dev->serial, opts->serial, strnlen(opts->serial, sizeof(dev->serial)));
	dev->lbs = lbs;
	dev->lbs_sectors = lbs / SECTOR_SIZE;
	dev->num_queues = opts->num_queues ? opts->num_queues : 1;
	dev->seg_max = qsize > 2 ? qsize - 2 : 1;
	if (dev->seg_max > BLK_MAX_SEG)
		dev->seg_max = BLK_MAX_SEG;
	dev->read_only = opts->read_only || img->read_only;
	dev->wce = opts->writeback;
	dev->wce_config = opts->writeback;
	dev->wce_pending = true;
	dev->capacity = capacity_of(dev);
	*devp = dev;
	return 0;
}

void blk_dev_exit(struct blk_dev *dev)
{
	free(dev);
}

bool blk_dev_get_wce(const struct blk_dev *dev)
{
	return dev->wce;
}

void blk_dev_set_wce(struct blk_dev *dev, bool writeback)
{
	dev->wce = writeback;
}

/*
 * Virtio 1.2, 5.2.5.1 "Driver Requirements: Device Initialization":
 *   "If neither VIRTIO_BLK_F_CONFIG_WCE nor VIRTIO_BLK_F_FLUSH are
 *    negotiated, the driver MAY deduce the presence of a writethrough cache.
 *    If VIRTIO_BLK_F_CONFIG_WCE was not negotiated but VIRTIO_BLK_F_FLUSH
 *    was, the driver SHOULD assume presence of a writeback cache."
 * So without CONFIG_WCE the device is writeback iff FLUSH was negotiated:
 * a driver that believes in a writethrough cache never flushes. With
 * CONFIG_WCE the driver reads (and may write) the mode in config space: a
 * new driver starts from the configured mode, and a later negotiation by the
 * same driver (the transport stopping and restarting its queues while the
 * driver keeps running) must not undo what it wrote into wce, or it would
 * skip flushes it needs.
 */
void blk_dev_features_set(struct blk_dev *dev, uint64_t features)
{
	if (features & (1ull << VIRTIO_BLK_F_CONFIG_WCE)) {
		if (dev->wce_pending) {
			dev->wce = dev->wce_config;
			dev->wce_pending = false;
		}
	} else {
		dev->wce = (features & (1ull << VIRTIO_BLK_F_FLUSH)) != 0;
	}
}

void blk_dev_driver_gone(struct blk_dev *dev)
{
	dev->wce_pending = true;
}

bool blk_dev_update_capacity(struct blk_dev *dev)
{
	uint64_t cap = capacity_of(dev);

	if (cap == dev->capacity)
		return false;
	dev->capacity = cap;
	return true;
}

uint64_t blk_dev_features(const struct blk_dev *dev)
{
	uint64_t f = 0;

	f |= 1ull << VIRTIO_BLK_F_SEG_MAX;
	f |= 1ull << VIRTIO_BLK_F_BLK_SIZE;
	f |= 1ull << VIRTIO_BLK_F_TOPOLOGY;
	f |= 1ull << VIRTIO_BLK_F_MQ;
	f |= 1ull << VIRTIO_BLK_F_FLUSH;
	f |= 1ull << VIRTIO_BLK_F_CONFIG_WCE;
	if (dev->read_only) {
		f |= 1ull << VIRTIO_BLK_F_RO;
	} else {
		if (dev->img->supports_discard)
			f |= 1ull << VIRTIO_BLK_F_DISCARD;
		if (dev->img->supports_write_zeroes)
			f |= 1ull << VIRTIO_BLK_F_WRITE_ZEROES;
	}
	return f;
}

static unsigned log2_u32(uint32_t v)
{
	unsigned n = 0;

	while (v > 1) {
		v >>= 1;
		n++;
	}
	return n;
}

static void config_build(const struct blk_dev *dev, struct blk_config *c)
{
	const struct img *img = dev->img;
	uint32_t phys = dev->lbs;
	uint32_t dgran;
	unsigned exp;

	/* Physical block = the image's preferred alignment when it is a
	 * power of two above the logical block size (bounded). */
	if (img->align > phys && (img->align & (img->align - 1)) == 0 && img->align <= (1u << 16))
		phys = img->align;
	exp = log2_u32(phys / dev->lbs);
	dgran = img->discard_granularity > dev->lbs ? img->discard_granularity : dev->lbs;
	if (dgran > (1u << 30))
		dgran = 1u << 30;

	memset(c, 0, sizeof(*c));
	c->capacity = htole64(dev->capacity);
	c->size_max = 0; /* VIRTIO_BLK_F_SIZE_MAX not offered */
	c->seg_max = htole32(dev->seg_max);
	c->blk_size = htole32(dev->lbs);
	c->physical_block_exp = (uint8_t)exp;
	c->alignment_offset = 0;
	c->min_io_size = htole16((uint16_t)(1u << exp));
	c->opt_io_size = htole32(img->opt_io / dev->lbs);
	c->wce = dev->wce ? 1 : 0;
	c->num_queues = htole16(dev->num_queues);
	c->max_discard_sectors = htole32(BLK_MAX_DISCARD_SECTORS);
	c->max_discard_seg = htole32(1);
	c->discard_sector_alignment = htole32(dgran / SECTOR_SIZE);
	c->max_write_zeroes_sectors = htole32(BLK_MAX_WRITE_ZEROES_SECTORS);
	c->max_write_zeroes_seg = htole32(1);
	c->write_zeroes_may_unmap = img->supports_discard ? 1 : 0;
}

int blk_dev_get_config(struct blk_dev *dev, uint8_t *buf, uint32_t off, uint32_t len)
{
	struct blk_config c;

	if (off > CONFIG_MAX || len > CONFIG_MAX - off)
		return -EINVAL;
	config_build(dev, &c);
	for (uint32_t i = 0; i < len; i++) {
		uint32_t at = off + i;

		buf[i] = at < sizeof(c) ? ((const uint8_t *)&c)[at] : 0;
	}
	return 0;
}

int blk_dev_set_config(struct blk_dev *dev, const uint8_t *buf, uint32_t off, uint32_t len)
{
	struct blk_config c;
	const uint32_t wce_at = offsetof(struct blk_config, wce);
	bool touches_wce = false;
	uint8_t wce = 0;

	if (off > CONFIG_MAX || len > CONFIG_MAX - off)
		return -EINVAL;
	config_build(dev, &c);
	for (uint32_t i = 0; i < len; i++) {
		uint32_t at = off + i;
		uint8_t cur = at < sizeof(c) ? ((const uint8_t *)&c)[at] : 0;

		if (at == wce_at) {
			touches_wce = true;
			wce = buf[i];
		} else if (buf[i] != cur) {
			return -EINVAL;
		}
	}
	if (touches_wce) {
		/* 5.2.4: 0 = writethrough, 1 = writeback. */
		if (wce > 1)
			return -EINVAL;
		dev->wce = wce == 1;
	}
	return 0;
}
