/* SPDX-License-Identifier: MIT */
/*
 * img/img.c — format probing and the img_* submitters.
 */
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "img.h"

static const uint8_t qcow2_magic[4] = {'Q', 'F', 'I', 0xfb};

/* Read the first bytes of @path. 0 (with *qcow2 set) or -errno. */
static int probe(const char *path, bool *qcow2)
{
	uint8_t buf[sizeof(qcow2_magic)];
	struct stat st;
	ssize_t n;
	int fd;

	/* A FIFO must not hang us; only files and block devices are images. */
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))) {
		close(fd);
		return -EINVAL;
	}
	do {
		n = pread(fd, buf, sizeof(buf), 0);
	} while (n < 0 && errno == EINTR);
	if (n < 0) {
		int e = -errno;

		close(fd);
		return e;
	}
	close(fd);
	*qcow2 = n == (ssize_t)sizeof(buf) && memcmp(buf, qcow2_magic, sizeof(buf)) == 0;
	return 0;
}

int img_open(struct img **imgp, struct io_loop *loop, const char *path, const struct img_opts *opts,
	     char *err, size_t errlen)
{
	bool qcow2 = false;
	int ret;

	if (err && errlen)
		err[0] = '\0';
	if (opts && opts->format) {
		if (strcmp(opts->format, "raw") == 0)
			return img_raw_open(imgp, loop, path, opts, err, errlen);
		if (strcmp(opts->format, "qcow2") == 0)
			return img_qcow2_open(imgp, loop, path, opts, err, errlen);
		if (err)
			snprintf(err, errlen, "%s: unknown image format '%s' (raw or qcow2)", path,
				 opts->format);
		return -EINVAL;
	}
	ret = probe(path, &qcow2);
	if (ret < 0) {
		if (err)
			snprintf(err, errlen, "%s: %s", path,
				 ret == -EINVAL ? "not a regular file or block device"
						: strerror(-ret));
		return ret;
	}
	if (qcow2 && opts && opts->backing) {
		/*
		 * A backing file whose format the image does not record is
		 * probed (as QEMU does) but never into qcow2: a guest can write
		 * a qcow2 header into a raw disk that later becomes a backing
		 * file, and that header's backing file name could reach any
		 * file on the host (vqcowd opens chains before dropping root).
		 */
		if (err)
			snprintf(err, errlen,
				 "%s: has a qcow2 header but its format is not recorded; vqcowd "
				 "does not probe a backing file as qcow2 (record it: qemu-img "
				 "rebase -u -b BACKING -F qcow2 IMAGE)",
				 path);
		return -EPERM;
	}
	if (qcow2)
		return img_qcow2_open(imgp, loop, path, opts, err, errlen);
	return img_raw_open(imgp, loop, path, opts, err, errlen);
}

int img_set_perm(struct img *img, enum img_perm perm, char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = '\0';
	if (perm == img->perm)
		return 0;
	if (perm == IMG_PERM_WRITE && img->read_only)
		return -EROFS;
	if (!img->ops->set_perm)
		return -ENOTSUP;
	return img->ops->set_perm(img, perm, err, errlen);
}

/* The lock bytes a file of @role uses and shares when the image holds @perm. */
static int lock_bits(const char *path, enum img_file_role role, enum img_perm perm,
		     bool force_share, unsigned *use, unsigned *shared, char *err, size_t errlen)
{
	const unsigned cr = IO_PERM_CONSISTENT_READ, w = IO_PERM_WRITE, rs = IO_PERM_RESIZE;

	*use = 0;
	*shared = IO_PERM_ALL;
	if (force_share && perm == IMG_PERM_WRITE) {
		if (err)
			snprintf(err, errlen,
				 "%s: force-share can only be used with read-only images", path);
		return -EINVAL;
	}
	if (perm == IMG_PERM_NONE) {
		/* nothing */
	} else if (force_share) {
		*use = cr;
	} else if (role == IMG_FILE_BACKING) {
		*use = cr;
		*shared = IO_PERM_ALL & ~(w | rs);
	} else if (role == IMG_FILE_RAW) {
		/* A guest device shares resize (an outside resize is picked up on SIGHUP). */
		*use = perm == IMG_PERM_WRITE ? cr | w : cr;
		*shared = IO_PERM_ALL & ~w;
	} else {
		/* qcow2 grows its file, and its metadata must not change under it. */
		*use = perm == IMG_PERM_WRITE ? cr | w | rs : cr;
		*shared = IO_PERM_ALL & ~(w | rs);
	}
	return 0;
}

int img_file_lock(struct io_file *f, const char *path, enum img_file_role role, enum img_perm perm,
		  bool force_share, char *err, size_t errlen)
{
	unsigned use, shared;
	char msg[256];
	int ret;

	ret = lock_bits(path, role, perm, force_share, &use, &shared, err, errlen);
	if (ret < 0)
		return ret;
	ret = io_file_lock(f, use, shared, msg, sizeof(msg));
	if (ret < 0 && err)
		snprintf(err, errlen, "%s: %s", path, msg[0] ? msg : strerror(-ret));
	return ret;
}

int img_file_reopen_rw(struct io_file *f, const char *path, enum img_file_role role, char *err,
		       size_t errlen)
{
	unsigned use, shared;
	char msg[256];
	int ret;

	ret = lock_bits(path, role, IMG_PERM_WRITE, false, &use, &shared, err, errlen);
	if (ret < 0)
		return ret;
	ret = io_file_reopen_rw(f, path, use, shared, msg, sizeof(msg));
	if (ret < 0 && err)
		snprintf(err, errlen, "%s: %s", path, msg[0] ? msg : strerror(-ret));
	return ret;
}

int img_file_open(struct io_file *f, const char *path, unsigned flags, char *err, size_t errlen)
{
	struct stat st;
	int ret;

	ret = io_file_open(f, path, flags);
	if (ret < 0 && err) {
		if (ret == -EINVAL && stat(path, &st) == 0 && !S_ISREG(st.st_mode) &&
		    !S_ISBLK(st.st_mode))
			snprintf(err, errlen, "%s: not a regular file or block device", path);
		else
			snprintf(err, errlen, "%s: %s", path, strerror(-ret));
	}
	return ret;
}

int img_set_writable(struct img *img, bool writable, char *err, size_t errlen)
{
	if (!img->ops->set_writable) {
		if (err)
			snprintf(err, errlen, "%s: format %s cannot change to %s", img->path,
				 img->ops->format, writable ? "read-write" : "read-only");
		return -ENOTSUP;
	}
	return img->ops->set_writable(img, writable, err, errlen);
}

int img_block_status(struct img *img, uint64_t off, uint64_t len, uint64_t *pnum,
		     struct img_wait *w)
{
	if (off >= img->size)
		return -EINVAL;
	if (len > img->size - off)
		len = img->size - off;
	if (!img->ops->block_status) {
		*pnum = len;
		return 1;
	}
	return img->ops->block_status(img, off, len, pnum, w);
}

int img_reopen_rw(struct img *img, char *err, size_t errlen)
{
	if (!img->ops->reopen_rw)
		return img_set_writable(img, true, err, errlen);
	return img->ops->reopen_rw(img, err, errlen);
}

int img_change_backing(struct img *img, struct img *backing, const char *name, const char *fmt,
		       char *err, size_t errlen)
{
	if (!img->ops->change_backing) {
		if (err)
			snprintf(err, errlen, "%s: format %s has no backing file", img->path,
				 img->ops->format);
		return -ENOTSUP;
	}
	return img->ops->change_backing(img, backing, name, fmt, err, errlen);
}

struct img *img_take_backing(struct img *img)
{
	return img->ops->take_backing ? img->ops->take_backing(img) : NULL;
}

void img_close(struct img *img)
{
	if (!img)
		return;
	img_dbm_free_all(img);
	img->ops->close(img);
}

void img_describe(struct img *img, char *buf, size_t len)
{
	if (!len)
		return;
	if (img->ops->describe) {
		img->ops->describe(img, buf, len);
		return;
	}
	snprintf(buf, len, "%s %s, %llu bytes%s", img->ops->format, img->path ? img->path : "?",
		 (unsigned long long)img->size, img->read_only ? ", read-only" : "");
}

int img_refresh_size(struct img *img)
{
	int r;

	if (!img->ops->refresh_size)
		return -ENOTSUP;
	r = img->ops->refresh_size(img);
	if (r == 0)
		r = img_dbm_resize(img, img->size);
	return r;
}

int img_cache_stats(struct img *img, struct img_cache_stats *st)
{
	if (!img->ops->cache_stats)
		return -ENOTSUP;
	return img->ops->cache_stats(img, st);
}

int img_bitmaps(struct img *img, struct img_bitmap *out, unsigned max)
{
	int n = img_dbm_list(img, NULL, 0), p = 0;
	struct img_bitmap *all;

	if (img->ops->bitmaps)
		p = img->ops->bitmaps(img, NULL, 0);
	if (p < 0)
		return p;
	if (!max || n + p == 0)
		return n + p;
	/* both kinds, then QEMU's order over them */
	all = calloc((size_t)(n + p), sizeof(*all));
	if (!all)
		return -ENOMEM;
	n = img_dbm_list(img, all, (unsigned)n);
	if (p)
		p = img->ops->bitmaps(img, all + n, (unsigned)p);
	if (p < 0) {
		free(all);
		return p;
	}
	for (int i = n; i < n + p; i++)
		all[i].persistent = true;
	img_bm_order(img, all, (unsigned)(n + p));
	memcpy(out, all, sizeof(*all) * ((unsigned)(n + p) < max ? (unsigned)(n + p) : max));
	free(all);
	return n + p;
}

int img_bitmap_ranges(struct img *img, const char *name,
		      int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque)
{
	return img->ops->bitmap_ranges ? img->ops->bitmap_ranges(img, name, fn, opaque) : -ENOTSUP;
}

int img_bitmap_set(struct img *img, const char *name, uint64_t off, uint64_t len)
{
	return img->ops->bitmap_set ? img->ops->bitmap_set(img, name, off, len) : -ENOTSUP;
}

int img_bitmap_merge(struct img *img, const char *name, const uint8_t *bits, uint64_t nbytes,
		     char *err, size_t errlen)
{
	if (!img->ops->bitmap_merge) {
		snprintf(err, errlen, "Block format '%s' does not support persistent bitmaps",
			 img->ops->format);
		return -ENOTSUP;
	}
	return img->ops->bitmap_merge(img, name, bits, nbytes, err, errlen);
}

struct img *img_backing(struct img *img)
{
	return img->ops->backing_of ? img->ops->backing_of(img) : NULL;
}

int img_snapshot_list(struct img *img, const struct img_snapshot **list, unsigned *n)
{
	*list = NULL;
	*n = 0;
	return img->ops->snapshot_list ? img->ops->snapshot_list(img, list, n) : -ENOTSUP;
}

int img_bitmap_edit(struct img *img, char op, const char *name, uint32_t granularity, bool disabled,
		    char *err, size_t errlen)
{
	int r;

	if (!img->ops->bitmap_edit) {
		snprintf(err, errlen, "Block format '%s' does not support persistent bitmaps",
			 img->ops->format);
		return -ENOTSUP;
	}
	if (!img_may_write(img) && op != 'E' && op != 'D') {
		snprintf(err, errlen, "%s: the image is read-only", img->path);
		return -EROFS;
	}
	r = img->ops->bitmap_edit(img, op, name, granularity, disabled, err, errlen);
	if (r == 0 && op == 'a')
		img_bm_born(img, name); /* (out of memory: listed as if found at open) */
	else if (r == 0 && op == 'r')
		img_bm_gone(img, name);
	return r;
}

int img_snapshot(struct img *img, bool create, const char *id, const char *name,
		 struct img_snapshot *out, char *err, size_t errlen)
{
	memset(out, 0, sizeof(*out));
	if (!img->ops->snapshot) {
		snprintf(err, errlen, "%s: the %s format does not support internal snapshots",
			 img->path, img->ops->format);
		return -ENOTSUP;
	}
	if (!img_may_write(img)) {
		snprintf(err, errlen, "%s: the image is read-only", img->path);
		return -EROFS;
	}
	return img->ops->snapshot(img, create, id, name, out, err, errlen);
}

bool img_grow_blocks(struct img *img)
{
	return img->ops->grow_blocks && img->ops->grow_blocks(img);
}

int img_grow(struct img *img, uint64_t size, struct img_grow *g)
{
	char *err = g->err;
	size_t errlen = sizeof(g->err);

	if (size % 512) {
		snprintf(err, errlen, "%s: the new size must be a multiple of 512 bytes",
			 img->path);
		return -EINVAL;
	}
	err[0] = '\0';
	if (size < img->size) {
		snprintf(err, errlen,
			 "%s: shrinking is not supported (%" PRIu64 " < %" PRIu64 " bytes)",
			 img->path, size, img->size);
		return -EINVAL;
	}
	if (img->read_only) {
		snprintf(err, errlen, "%s: the image is read-only", img->path);
		return -EROFS;
	}
	if (!img->ops->grow) {
		snprintf(err, errlen, "%s: online resize of a %s image is not supported yet",
			 img->path, img->ops->format);
		return -ENOTSUP;
	}
	if (size == img->size)
		return 0;
	/* the bitmaps first: marks past the old end start once the size changed */
	if (img_dbm_resize(img, size) < 0) {
		snprintf(err, errlen, "%s: out of memory growing the dirty bitmaps", img->path);
		return -ENOMEM;
	}
	return img->ops->grow(img, size, g);
}

static void io_setup(struct img_io *io, uint8_t op, unsigned flags, struct iovec *iov,
		     unsigned iovcnt, uint64_t off, uint64_t len)
{
	io->op = op;
	io->flags = flags;
	io->iov = iov;
	io->iovcnt = iovcnt;
	io->off = off;
	io->len = len;
	io->err = 0;
	io->stage = 0;
	io->pos = 0;
}

void img_readv(struct img *img, struct img_io *io, struct iovec *iov, unsigned iovcnt, uint64_t off,
	       uint64_t len)
{
	io_setup(io, IMG_OP_READ, 0, iov, iovcnt, off, len);
	img->ops->submit(img, io);
}

void img_writev(struct img *img, struct img_io *io, struct iovec *iov, unsigned iovcnt,
		uint64_t off, uint64_t len)
{
	io_setup(io, IMG_OP_WRITE, 0, iov, iovcnt, off, len);
	if (__atomic_load_n(&img->dbm_enabled, __ATOMIC_RELAXED))
		img_dbm_mark(img, off, len);
	img->ops->submit(img, io);
}

void img_flush(struct img *img, struct img_io *io)
{
	io_setup(io, IMG_OP_FLUSH, 0, NULL, 0, 0, 0);
	img->ops->submit(img, io);
}

void img_discard(struct img *img, struct img_io *io, uint64_t off, uint64_t len)
{
	io_setup(io, IMG_OP_DISCARD, 0, NULL, 0, off, len);
	if (__atomic_load_n(&img->dbm_enabled, __ATOMIC_RELAXED))
		img_dbm_mark(img, off, len);
	img->ops->submit(img, io);
}

void img_discard_full(struct img *img, struct img_io *io, uint64_t off, uint64_t len)
{
	io_setup(io, IMG_OP_DISCARD, IMG_IO_FULL, NULL, 0, off, len);
	img->ops->submit(img, io);
}

void img_write_zeroes(struct img *img, struct img_io *io, uint64_t off, uint64_t len,
		      unsigned flags)
{
	io_setup(io, IMG_OP_WRITE_ZEROES, flags, NULL, 0, off, len);
	if (__atomic_load_n(&img->dbm_enabled, __ATOMIC_RELAXED))
		img_dbm_mark(img, off, len);
	img->ops->submit(img, io);
}
