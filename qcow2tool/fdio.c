/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/fdio.c — the format code's I/O interface over a plain fd
 * (pread/pwrite/fdatasync), file probing and sizes, and qcow2_check() on a
 * path, and opening an image with its header parsed (rebase, empty). The
 * only file of the tool library that does positioned I/O for the
 * format code; create.c and map.c use the full-transfer helpers below.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qcow2tool.h"

int qcow2_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;

	if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
		return -EINVAL;
	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			memset(p, 0, len); /* past EOF */
			return 0;
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

int qcow2_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
		return -EINVAL;
	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

int qcow2_fd_size(int fd, uint64_t *size, uint64_t *allocated)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (allocated)
		*allocated = (uint64_t)st.st_blocks * 512;
	if (S_ISBLK(st.st_mode)) {
		uint64_t b;
		if (ioctl(fd, BLKGETSIZE64, &b) < 0)
			return -errno;
		*size = b;
		return 0;
	}
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	*size = (uint64_t)st.st_size;
	return 0;
}

int qcow2_probe(int fd)
{
	uint8_t m[4];
	ssize_t n;

	do
		n = pread(fd, m, sizeof(m), 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == 4 && qcow2_be32(m) == QCOW2_MAGIC;
}

/* ---- struct qcow2_io over an fd (opaque carries the fd) ---- */

static int fd_of(void *opaque)
{
	return (int)(intptr_t)opaque;
}

static int fdio_read(void *opaque, void *buf, size_t len, uint64_t off)
{
	return qcow2_pread_full(fd_of(opaque), buf, len, off);
}

static int fdio_write(void *opaque, const void *buf, size_t len, uint64_t off)
{
	return qcow2_pwrite_full(fd_of(opaque), buf, len, off);
}

static int fdio_sync(void *opaque)
{
	return fdatasync(fd_of(opaque)) < 0 ? -errno : 0;
}

static int fdio_size(void *opaque, uint64_t *size)
{
	return qcow2_fd_size(fd_of(opaque), size, NULL);
}

struct qcow2_io qcow2_fd_io(int fd)
{
	struct stat st;

	return (struct qcow2_io){
	    .read = fdio_read,
	    .write = fdio_write,
	    .sync = fdio_sync,
	    .size = fdio_size,
	    .opaque = (void *)(intptr_t)fd,
	    .fixed_size = fstat(fd, &st) == 0 && S_ISBLK(st.st_mode),
	};
}

/* ---- check on a path ---- */

int qcow2_check(const char *path, unsigned flags, struct qcow2_check_result *res,
		const struct qcow2_tool_cb *cb, char *err, size_t errlen)
{
	struct qcow2_io io;
	int fd, ret;

	memset(res, 0, sizeof(*res));
	fd = open(path, (flags ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		res->check_errors = 1;
		return qcow2_seterr(err, errlen, ret, "%s", strerror(-ret));
	}
	io = qcow2_fd_io(fd);
	ret = qcow2_check_io(&io, path, flags, res, cb, err, errlen);
	close(fd);
	return ret;
}

/* Freed clusters of a regular file go back to the file system, as QEMU discards them. */
static void punch_fd(void *opaque, uint64_t off, uint64_t len)
{
	int fd = *(int *)opaque;
	struct stat st;

	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
		(void)fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
				(off_t)len);
}

int qcow2_snapshot_tool(const char *path, char op, const char *arg, struct qcow2_snap_desc **list,
			uint32_t *n, char *err, size_t errlen)
{
	struct qcow2_snap_punch punch;
	struct qcow2_snap_desc sn;
	struct qcow2_io io;
	struct timespec ts;
	int fd, ret;

	fd = open(path, (op == 'l' ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		return qcow2_seterr(err, errlen, ret, "%s", strerror(-ret));
	}
	if (qcow2_probe(fd) != 1) {
		close(fd);
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "this image format does not support "
				    "snapshots");
	}
	io = qcow2_fd_io(fd);
	punch.fn = punch_fd;
	punch.opaque = &fd;
	switch (op) {
	case 'l':
		ret = qcow2_snapshot_list_io(&io, path, list, n, err, errlen);
		break;
	case 'c':
		memset(&sn, 0, sizeof(sn));
		snprintf(sn.name, sizeof(sn.name), "%s", arg);
		clock_gettime(CLOCK_REALTIME, &ts);
		sn.date_sec = (uint32_t)ts.tv_sec;
		sn.date_nsec = (uint32_t)(ts.tv_nsec / 1000 * 1000); /* QEMU: microseconds */
		sn.icount = 0;                                       /* what qemu-img records */
		ret = qcow2_snapshot_create_io(&io, path, &sn, 0, err, errlen);
		break;
	case 'd':
		ret = qcow2_snapshot_delete_io(&io, path, NULL, arg, NULL, &punch, err, errlen);
		if (ret == -ENOENT)
			qcow2_seterr(err, errlen, ret, "snapshot not found");
		break;
	case 'a':
		ret = qcow2_snapshot_apply_io(&io, path, arg, err, errlen);
		if (ret == -ENOENT) /* qemu-img's words */
			qcow2_seterr(err, errlen, ret,
				     "Failed to load snapshot: No such file or directory");
		break;
	default:
		ret = qcow2_seterr(err, errlen, -EINVAL, "unknown snapshot operation");
	}
	close(fd);
	return ret;
}

int qcow2_bitmap_tool(const char *path, char op, const char *name, uint32_t granularity, char *err,
		      size_t errlen)
{
	struct qcow2_io io;
	int fd, ret;

	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		return qcow2_seterr(err, errlen, ret, "%s", strerror(-ret));
	}
	if (qcow2_probe(fd) != 1) {
		close(fd);
		if (op != 'a')
			return qcow2_seterr(err, errlen, -ENOENT, "Dirty bitmap '%s' not found",
					    name);
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "Can't store persistent bitmaps to %s: Operation not supported",
				    path);
	}
	io = qcow2_fd_io(fd);
	ret = qcow2_bitmap_edit_io(&io, path, op, name, granularity, false, err, errlen);
	/* (no tail cut here: qemu-img leaves the file length alone offline too) */
	if (close(fd) < 0 && ret == 0)
		ret = qcow2_seterr(err, errlen, -errno, "%s", strerror(errno));
	return ret;
}

int qcow2_fd_open_header(const char *path, int *fdp, uint8_t **bufp, size_t *lenp,
			 struct qcow2_header_info *h, char *err, size_t errlen)
{
	uint8_t *buf = NULL;
	size_t len = 65536;
	struct stat st;
	ssize_t n;
	int fd, ret;

	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return qcow2_seterr(err, errlen, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		ret = qcow2_seterr(err, errlen, -errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	for (;;) {
		free(buf);
		buf = calloc(1, len);
		if (!buf) {
			ret = -ENOMEM;
			goto fail;
		}
		n = pread(fd, buf, len, 0);
		if (n < 0) {
			ret = qcow2_seterr(err, errlen, -errno, "%s: %s", path, strerror(errno));
			goto fail;
		}
		ret = qcow2_header_parse(buf, (size_t)n, (uint64_t)st.st_size, h, err, errlen);
		if (ret == -ENOBUFS && h->cluster_size > len) {
			len = h->cluster_size;
			continue;
		}
		if (ret < 0)
			goto fail;
		break;
	}
	*fdp = fd;
	*bufp = buf;
	*lenp = len;
	return 0;
fail:
	free(buf);
	close(fd);
	return ret;
}
