/* SPDX-License-Identifier: MIT */
/*
 * img/img_raw.c — raw images (regular files and block devices) over io/.
 *
 * One io_cmd per request (the one inside struct img_io). Multi-step
 * operations (write-zeroes fallbacks) re-use it step after step; io->stage
 * says which step is in flight and io->pos how far the zero writes got.
 *
 *   READ/WRITE     readv/writev at the same offset (O_DIRECT unless disabled)
 *   FLUSH          fdatasync, one at a time per image across threads (below)
 *   DISCARD        fallocate(PUNCH_HOLE|KEEP_SIZE); EOPNOTSUPP is ignored
 *                  (a discard is a hint)
 *   WRITE_ZEROES   UNMAP: PUNCH_HOLE|KEEP_SIZE, else ZERO_RANGE|KEEP_SIZE;
 *                  on EOPNOTSUPP the next method is tried (and remembered):
 *                  punch -> zero range -> writing a zero buffer in chunks
 *
 * Errors found at submit time (writes on a read-only image) are reported
 * through io_post() so done() still runs from the loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "img.h"
#include "vlog.h"

#define ZERO_BUF_SIZE (256u * 1024)

enum raw_stage {
	RAW_ST_RW = 1,
	RAW_ST_FLUSH,
	RAW_ST_SYNC_START, /* posted to its loop: lead the next fdatasync */
	RAW_ST_SYNCED,     /* posted to its loop: covered by another's fdatasync (err) */
	RAW_ST_DISCARD,
	RAW_ST_WZ_PUNCH,
	RAW_ST_WZ_ZERO_RANGE,
	RAW_ST_WZ_WRITE,
	RAW_ST_ERROR,
};

struct raw_img {
	struct img img;
	struct io_file file;
	void *zero_buf;     /* ZERO_BUF_SIZE zero bytes; NULL when read-only */
	bool no_punch_hole; /* PUNCH_HOLE returned EOPNOTSUPP once */
	bool no_zero_range; /* ZERO_RANGE returned EOPNOTSUPP once */
	bool blockdev;
	bool probed; /* format was probed, not given: guard sector 0 */
	bool warned_magic;
	/*
	 * FLUSH: one fdatasync of the file in flight at a time, whichever thread
	 * (I/O threads' queues) sends it. Several at once on one description
	 * would each report a writeback error only to whichever is reaped
	 * first, and the later ones gain nothing. A FLUSH arriving while one
	 * runs waits for the next, which starts after it arrived (the one
	 * running may have passed the writes it must cover): the first of them
	 * leads it on its own loop, the rest ride it (sync_riders) and complete
	 * with its result on their loops. Under sync_mu.
	 */
	pthread_mutex_t sync_mu;
	bool sync_running;
	struct img_io *sync_riders;                 /* covered by the one in flight */
	struct img_io *sync_next, **sync_next_tail; /* arrived meanwhile: the next one's */
};

static struct raw_img *to_raw(struct img *img)
{
	return (struct raw_img *)img;
}

/* The loop of @io: its own (any_loop: raw images serve every I/O thread), else the image's. */
static struct io_loop *loop_of(struct raw_img *r, struct img_io *io)
{
	return io->loop ? io->loop : r->img.loop;
}

/* The "known unsupported" flags are set by whichever thread found out. */
#define FLAG_GET(p) __atomic_load_n(&(p), __ATOMIC_RELAXED)
#define FLAG_SET(p) __atomic_store_n(&(p), true, __ATOMIC_RELAXED)

static bool is_unsupported(int res)
{
	return res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS;
}

static void raw_fail_later(struct raw_img *r, struct img_io *io, int err)
{
	io->err = err;
	io->stage = RAW_ST_ERROR;
	io_post(loop_of(r, io), &io->cmd);
}

static void raw_write_zero_chunk(struct raw_img *r, struct img_io *io)
{
	uint64_t n = io->len - io->pos;

	if (n > ZERO_BUF_SIZE)
		n = ZERO_BUF_SIZE;
	io->stage = RAW_ST_WZ_WRITE;
	io_write(loop_of(r, io), &io->cmd, &r->file, r->zero_buf, (size_t)n, io->off + io->pos);
}

/* Start the best write-zeroes method not yet known to fail. */
static void raw_write_zeroes(struct raw_img *r, struct img_io *io)
{
	if ((io->flags & IMG_IO_UNMAP) && !FLAG_GET(r->no_punch_hole) &&
	    io->stage < RAW_ST_WZ_PUNCH) {
		io->stage = RAW_ST_WZ_PUNCH;
		io_fallocate(loop_of(r, io), &io->cmd, &r->file,
			     FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, io->off, io->len);
		return;
	}
	if (!FLAG_GET(r->no_zero_range) && !(r->file.flags & IO_FILE_NO_ZERO_RANGE) &&
	    io->stage < RAW_ST_WZ_ZERO_RANGE) {
		io->stage = RAW_ST_WZ_ZERO_RANGE;
		io_fallocate(loop_of(r, io), &io->cmd, &r->file,
			     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, io->off, io->len);
		return;
	}
	io->pos = 0;
	raw_write_zero_chunk(r, io);
}

/* Complete @io with @res on its own loop (from a done() on loop @cur). */
static void raw_post_result(struct raw_img *r, struct img_io *io, int res, struct io_loop *cur)
{
	struct io_loop *l = loop_of(r, io);

	io->err = res;
	io->stage = RAW_ST_SYNCED;
	if (l == cur)
		io_post(l, &io->cmd);
	else
		io_post_remote(l, &io->cmd);
}

static void raw_sync_start(struct raw_img *r, struct img_io *io)
{
	io->stage = RAW_ST_FLUSH;
	io_fdatasync(loop_of(r, io), &io->cmd, &r->file);
}

/* A FLUSH: lead an fdatasync now, or wait for the next one (sync_mu's comment). */
static void raw_flush(struct raw_img *r, struct img_io *io)
{
	pthread_mutex_lock(&r->sync_mu);
	if (r->sync_running) {
		io->next = NULL;
		*r->sync_next_tail = io;
		r->sync_next_tail = &io->next;
		pthread_mutex_unlock(&r->sync_mu);
		return;
	}
	r->sync_running = true;
	pthread_mutex_unlock(&r->sync_mu);
	raw_sync_start(r, io);
}

/* @io's fdatasync ended with @res: its riders complete, the next one starts. */
static void raw_sync_done(struct raw_img *r, struct img_io *io, int res)
{
	struct io_loop *cur = loop_of(r, io);
	struct img_io *riders, *next;

	pthread_mutex_lock(&r->sync_mu);
	riders = r->sync_riders;
	next = r->sync_next;
	r->sync_riders = next ? next->next : NULL;
	r->sync_next = NULL;
	r->sync_next_tail = &r->sync_next;
	r->sync_running = next != NULL;
	pthread_mutex_unlock(&r->sync_mu);
	while (riders) {
		struct img_io *n = riders->next;

		raw_post_result(r, riders, res, cur);
		riders = n;
	}
	if (next) {
		struct io_loop *l = loop_of(r, next);

		if (l == cur) {
			raw_sync_start(r, next);
		} else {
			next->stage = RAW_ST_SYNC_START;
			io_post_remote(l, &next->cmd);
		}
	}
	io->done(io, res < 0 ? res : 0);
}

static void raw_cmd_done(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;
	struct raw_img *r = io->impl;

	switch (io->stage) {
	case RAW_ST_ERROR:
	case RAW_ST_SYNCED:
		res = io->err;
		break;
	case RAW_ST_FLUSH:
		raw_sync_done(r, io, res);
		return;
	case RAW_ST_SYNC_START:
		raw_sync_start(r, io);
		return;
	case RAW_ST_DISCARD:
		if (is_unsupported(res)) {
			FLAG_SET(r->no_punch_hole);
			res = 0;
		}
		break;
	case RAW_ST_WZ_PUNCH:
		if (is_unsupported(res)) {
			FLAG_SET(r->no_punch_hole);
			raw_write_zeroes(r, io);
			return;
		}
		break;
	case RAW_ST_WZ_ZERO_RANGE:
		if (is_unsupported(res)) {
			FLAG_SET(r->no_zero_range);
			raw_write_zeroes(r, io);
			return;
		}
		break;
	case RAW_ST_WZ_WRITE:
		if (res >= 0) {
			io->pos += (uint64_t)res;
			if (io->pos < io->len) {
				raw_write_zero_chunk(r, io);
				return;
			}
		}
		break;
	default:
		break;
	}
	io->done(io, res < 0 ? res : 0);
}

static void raw_step(struct raw_img *r, struct img_io *io)
{
	struct io_loop *loop = loop_of(r, io);

	switch (io->op) {
	case IMG_OP_READ:
		io->stage = RAW_ST_RW;
		io_readv(loop, &io->cmd, &r->file, io->iov, io->iovcnt, io->off);
		return;
	case IMG_OP_WRITE:
		io->stage = RAW_ST_RW;
		io_writev(loop, &io->cmd, &r->file, io->iov, io->iovcnt, io->off);
		return;
	case IMG_OP_FLUSH:
		raw_flush(r, io);
		return;
	case IMG_OP_DISCARD:
		if (FLAG_GET(r->no_punch_hole)) {
			/* Known unsupported: complete as a no-op (still from the loop). */
			raw_fail_later(r, io, 0);
			return;
		}
		io->stage = RAW_ST_DISCARD;
		io_fallocate(loop, &io->cmd, &r->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			     io->off, io->len);
		return;
	case IMG_OP_WRITE_ZEROES:
		io->stage = 0;
		raw_write_zeroes(r, io);
		return;
	default:
		raw_fail_later(r, io, -EINVAL);
		return;
	}
}

/*
 * A raw image whose format was probed must not let the guest write a qcow2
 * header into its first bytes: the next probe would open it as qcow2 and
 * follow a guest-chosen backing file name on the host. (QEMU refuses the
 * same for probed raw images.) Explicit --format raw allows it.
 */
static bool writes_format_magic(struct raw_img *r, const struct img_io *io)
{
	static const uint8_t magic[4] = {'Q', 'F', 'I', 0xfb};
	uint8_t head[sizeof(magic)];
	size_t got = 0;

	if (!r->probed || io->op != IMG_OP_WRITE || io->off >= sizeof(magic))
		return false;
	for (unsigned i = 0; i < io->iovcnt && got < sizeof(head) - io->off; i++) {
		size_t n = io->iov[i].iov_len;

		if (n > sizeof(head) - io->off - got)
			n = sizeof(head) - io->off - got;
		memcpy(head + io->off + got, io->iov[i].iov_base, n);
		got += n;
	}
	if (io->off + got < sizeof(magic))
		return false;
	return memcmp(head + io->off, magic + io->off, sizeof(magic) - io->off) == 0;
}

static void raw_submit(struct img *img, struct img_io *io)
{
	struct raw_img *r = to_raw(img);
	bool write =
	    io->op == IMG_OP_WRITE || io->op == IMG_OP_DISCARD || io->op == IMG_OP_WRITE_ZEROES;

	io->impl = r;
	io->cmd.done = raw_cmd_done;
	io->cmd.priv = io;
	if (write && !img_may_write(img)) {
		raw_fail_later(r, io, -EROFS);
		return;
	}
	if (io->op != IMG_OP_FLUSH && (io->off > img->size || io->len > img->size - io->off)) {
		raw_fail_later(r, io, -EINVAL);
		return;
	}
	if (writes_format_magic(r, io)) {
		if (!r->warned_magic) {
			vlog(
			    VLOG_WARN, img->path,
			    "refused a write of a qcow2 header to the first sector of a probed raw "
			    "image (use --format raw to allow it)");
			r->warned_magic = true;
		}
		raw_fail_later(r, io, -EPERM);
		return;
	}
	raw_step(r, io);
}

static void raw_close(struct img *img)
{
	struct raw_img *r = to_raw(img);

	io_file_close(&r->file);
	if (r->zero_buf)
		io_free_aligned(r->zero_buf);
	pthread_mutex_destroy(&r->sync_mu);
	free(img->path);
	free(r);
}

static void raw_describe(struct img *img, char *buf, size_t len)
{
	struct raw_img *r = to_raw(img);

	snprintf(buf, len, "raw %s%s, %llu bytes, %s (align %u)%s",
		 r->blockdev ? "block device " : "", img->path, (unsigned long long)img->size,
		 (r->file.flags & IO_FILE_DIRECT) ? "O_DIRECT" : "buffered", img->align,
		 img->read_only ? ", read-only" : "");
}

/*
 * The disk size of a raw file: its length rounded up to 512 bytes, as QEMU's
 * file driver does. The partial last sector reads what the file has, then
 * zeroes (IO_FILE_ZERO_EOF); writing it extends the file.
 */
static uint64_t raw_size(uint64_t file_size)
{
	return (file_size + 511) & ~511ull;
}

static int raw_refresh_size(struct img *img)
{
	struct raw_img *r = to_raw(img);
	uint64_t size;
	int ret;

	ret = io_file_get_size(&r->file, &size);
	if (ret < 0)
		return ret;
	img->size = raw_size(size);
	return 0;
}

static int raw_grow(struct img *img, uint64_t size, struct img_grow *g)
{
	struct raw_img *r = to_raw(img);
	char *err = g->err;
	size_t errlen = sizeof(g->err);
	int ret;

	if (r->blockdev) {
		/* A device is grown outside (lvextend...): take what it has now. */
		ret = raw_refresh_size(img);
		if (ret == 0 && img->size < size) {
			snprintf(err, errlen,
				 "%s: the block device has %" PRIu64 " bytes; grow it first",
				 img->path, img->size);
			return -EINVAL;
		}
		return ret;
	}
	if (ftruncate(r->file.fd, (off_t)size) < 0) {
		ret = -errno;
		snprintf(err, errlen, "%s: cannot grow the file to %" PRIu64 " bytes: %s",
			 img->path, size, strerror(errno));
		return ret;
	}
	return raw_refresh_size(img);
}

static int raw_set_perm(struct img *img, enum img_perm perm, char *err, size_t errlen)
{
	struct raw_img *r = to_raw(img);
	int ret;

	ret = img_file_lock(&r->file, img->path, img->backing ? IMG_FILE_BACKING : IMG_FILE_RAW,
			    perm, img->force_share, err, errlen);
	if (ret == 0)
		img->perm = perm;
	return ret;
}

/* See img_set_writable: a raw file only changes its locks (and gets its zero buffer). */
static int raw_set_writable(struct img *img, bool writable, char *err, size_t errlen)
{
	struct raw_img *r = to_raw(img);
	bool was_backing = img->backing;
	enum img_perm perm = writable ? IMG_PERM_WRITE : IMG_PERM_READ;
	int ret;

	if (writable && (r->file.flags & IO_FILE_RDONLY)) {
		if (err)
			snprintf(err, errlen,
				 "%s: opened read-only (reopening a backing file read-write is "
				 "not supported)",
				 img->path);
		return -EROFS;
	}
	if (writable && !r->zero_buf) {
		r->zero_buf = io_alloc_aligned(ZERO_BUF_SIZE);
		if (!r->zero_buf)
			return -ENOMEM;
		memset(r->zero_buf, 0, ZERO_BUF_SIZE);
	}
	img->backing = !writable;
	ret = img_file_lock(&r->file, img->path, img->backing ? IMG_FILE_BACKING : IMG_FILE_RAW,
			    perm, img->force_share, err, errlen);
	if (ret < 0) {
		img->backing = was_backing;
		return ret;
	}
	img->perm = perm;
	img->read_only = !writable;
	return 0;
}

/* See img_reopen_rw: the file opened read-write in place, with a writer's locks. */
static int raw_reopen_rw(struct img *img, char *err, size_t errlen)
{
	struct raw_img *r = to_raw(img);
	bool was_backing = img->backing;
	int ret;

	if (!(r->file.flags & IO_FILE_RDONLY))
		return raw_set_writable(img, true, err, errlen);
	if (img->force_share) {
		if (err)
			snprintf(err, errlen,
				 "%s: force-share can only be used with read-only images",
				 img->path);
		return -EINVAL;
	}
	if (!r->zero_buf) {
		r->zero_buf = io_alloc_aligned(ZERO_BUF_SIZE);
		if (!r->zero_buf)
			return -ENOMEM;
		memset(r->zero_buf, 0, ZERO_BUF_SIZE);
	}
	img->backing = false;
	ret = img_file_reopen_rw(&r->file, img->path, IMG_FILE_RAW, err, errlen);
	if (ret < 0) {
		img->backing = was_backing;
		return ret;
	}
	img->perm = IMG_PERM_WRITE;
	img->read_only = false;
	return 0;
}

static const struct img_ops raw_ops = {
    .format = "raw",
    .submit = raw_submit,
    .close = raw_close,
    .describe = raw_describe,
    .refresh_size = raw_refresh_size,
    .grow = raw_grow,
    .set_perm = raw_set_perm,
    .set_writable = raw_set_writable,
    .reopen_rw = raw_reopen_rw,
};

/* Block device discard granularity from sysfs; 0 = no discard. */
static unsigned blockdev_discard_granularity(dev_t rdev)
{
	char path[96];
	unsigned long v = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_granularity", major(rdev),
		 minor(rdev));
	f = fopen(path, "re");
	if (!f)
		return 4096; /* unknown: let the kernel decide per request */
	if (fscanf(f, "%lu", &v) != 1)
		v = 0;
	fclose(f);
	return v > (1ul << 30) ? (1u << 30) : (unsigned)v;
}

int img_raw_open(struct img **imgp, struct io_loop *loop, const char *path,
		 const struct img_opts *opts, char *err, size_t errlen)
{
	struct raw_img *r;
	struct stat st;
	bool read_only = opts ? opts->read_only : false;
	bool direct = opts ? opts->direct : true;
	unsigned flags = 0;
	uint64_t size;
	int ret;

	if (err && errlen)
		err[0] = '\0';
	r = calloc(1, sizeof(*r));
	if (!r) {
		ret = -ENOMEM;
		goto err_msg;
	}
	pthread_mutex_init(&r->sync_mu, NULL);
	r->sync_next_tail = &r->sync_next;
	r->img.path = strdup(path);
	if (!r->img.path) {
		ret = -ENOMEM;
		goto free_raw;
	}
	if (read_only)
		flags |= IO_FILE_RDONLY;
	if (direct)
		flags |= IO_FILE_DIRECT;
	ret = img_file_open(&r->file, path, flags | IO_FILE_ZERO_EOF, err, errlen);
	if (ret < 0)
		goto free_path;
	if (fstat(r->file.fd, &st) < 0) {
		ret = -errno;
		goto close_file;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		ret = -EINVAL;
		if (err)
			snprintf(err, errlen, "%s: not a regular file or block device", path);
		goto close_file;
	}
	r->img.backing = opts && opts->backing;
	r->img.force_share = opts && opts->force_share;
	ret = raw_set_perm(&r->img,
			   opts && opts->inactive ? IMG_PERM_NONE
			   : read_only            ? IMG_PERM_READ
						  : IMG_PERM_WRITE,
			   err, errlen);
	if (ret < 0)
		goto close_file;
	r->blockdev = S_ISBLK(st.st_mode);
	r->probed = !opts || !opts->format;
	ret = io_file_get_size(&r->file, &size);
	if (ret < 0)
		goto close_file;
	if (!read_only) {
		r->zero_buf = io_alloc_aligned(ZERO_BUF_SIZE);
		if (!r->zero_buf) {
			ret = -ENOMEM;
			goto close_file;
		}
		memset(r->zero_buf, 0, ZERO_BUF_SIZE);
	}

	r->img.ops = &raw_ops;
	r->img.loop = loop;
	r->img.any_loop = true;
	r->img.size = raw_size(size);
	r->img.read_only = read_only;
	r->img.align = r->file.align > 512 ? r->file.align : 512;
	if (r->blockdev) {
		r->img.discard_granularity = blockdev_discard_granularity(st.st_rdev);
		r->img.supports_discard = r->img.discard_granularity != 0;
	} else {
		r->img.discard_granularity = st.st_blksize > 0 ? (unsigned)st.st_blksize : 4096;
		r->img.supports_discard = true;
	}
	r->img.supports_write_zeroes = true;
	r->img.opt_io = 0;
	*imgp = &r->img;
	return 0;

close_file:
	io_file_close(&r->file);
free_path:
	free(r->img.path);
free_raw:
	pthread_mutex_destroy(&r->sync_mu);
	free(r);
err_msg:
	if (err && !err[0])
		snprintf(err, errlen, "%s: %s", path, strerror(-ret));
	return ret;
}
