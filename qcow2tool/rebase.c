/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/rebase.c — qemu-img rebase -u: change the backing file name and
 * format recorded in the header, nothing else (the data is not looked at).
 *
 * The header, its extensions and the backing file name live in the first
 * cluster (the spec puts the name there, and so does every writer). The
 * extensions area is rebuilt (qcow2_header_set_backing in qcow2fmt/, shared
 * with the end of vqcowd's intermediate commit): every extension but the backing format is
 * kept byte for byte (unknown ones too, as the spec asks of a writer that
 * keeps them), the new backing format extension goes first, then the end
 * marker and the name. Written with one pwrite of the sectors that change,
 * then fdatasync: the first cluster is small and a torn write of it could
 * only mix the old and the new name fields, which the length field bounds.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format.h"
#include "qcow2tool.h"

int qcow2_rebase_unsafe(const char *path, const char *backing, const char *backing_fmt, char *err,
			size_t errlen)
{
	struct qcow2_header_info h;
	uint8_t *buf = NULL, *out = NULL;
	size_t len, pos, blen = backing ? strlen(backing) : 0;
	size_t flen = backing_fmt ? strlen(backing_fmt) : 0;
	ssize_t n;
	int fd, ret;

	if (err && errlen)
		err[0] = '\0';
	if (blen > QCOW2_MAX_BACKING_NAME)
		return qcow2_seterr(err, errlen, -EINVAL, "%s: backing file name too long", path);
	if (flen > QCOW2_MAX_BACKING_FMT)
		return qcow2_seterr(err, errlen, -EINVAL, "%s: backing format name too long", path);
	ret = qcow2_fd_open_header(path, &fd, &buf, &len, &h, err, errlen);
	if (ret < 0)
		return ret;
	if (h.cluster_size < len)
		len = h.cluster_size;
	out = calloc(1, len);
	if (!out) {
		ret = -ENOMEM;
		goto out;
	}
	ret = qcow2_header_set_backing(buf, len, &h, backing, backing_fmt, out, &pos, path, err,
				       errlen);
	if (ret < 0)
		goto out;
	n = pwrite(fd, out, pos, 0);
	if (n != (ssize_t)pos) {
		ret = qcow2_seterr(err, errlen, n < 0 ? -errno : -EIO, "%s: writing the header: %s",
				   path, n < 0 ? strerror(errno) : "short write");
		goto out;
	}
	if (fdatasync(fd) < 0) {
		ret = qcow2_seterr(err, errlen, -errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	ret = 0;
out:
	free(buf);
	free(out);
	close(fd);
	return ret;
}
