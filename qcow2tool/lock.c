/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/lock.c — the image locks of the offline tools (vqcow-img), taken as
 * qemu-img 7.2 takes them for the same command, so that a tool refuses an
 * image a QEMU process or vqcowd is writing, and the reverse. The lock bytes
 * themselves are io/'s (io_lock_set).
 *
 * What qemu-img holds (use / does not share), measured on its OFD locks:
 *   info   qcow2 image: nothing / write, resize; no other file. raw: nothing.
 *   check, map (READ)
 *          image: consistent read / write, resize (raw: nothing unshared);
 *          external data file: consistent read / resize;
 *          each backing file: as its image (qcow2: / write, resize; raw:
 *          sharing everything), its data file as above.
 *   check -r (WRITE)
 *          image: + write, resize; data file: + write, resize; backing as READ.
 *   convert's source (CONVERT): as READ, but a raw image too keeps writers
 *          out (consistent read / write, resize); its destination holds write
 *          and shares everything (a qcow2 reader, which refuses writers, is
 *          refused; a raw one is not), as WRITE on a raw image.
 *   -U (force share, read-only modes only): consistent read (READ) or nothing
 *          (INFO), sharing everything, on every file.
 *
 * The locks are taken on descriptors of their own, kept open until
 * qcow2_unlock_image(); the tools open the files again for their work.
 * Files that cannot be opened here are skipped: the tool reports them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format.h"
#include "io.h"
#include "qcow2tool.h"

static void seterr(char *err, size_t errlen, const char *fmt, const char *a, const char *b)
{
	if (err && errlen)
		snprintf(err, errlen, fmt, a, b);
}

/*
 * Lock @fd (named @path in messages; NULL for the image itself, which the
 * tool's message already names) and keep it in @lk. 0 or -errno (+@err);
 * @fd is owned either way.
 */
static int keep_locked(struct qcow2_locks *lk, int fd, const char *path, unsigned use,
		       unsigned shared, char *err, size_t errlen)
{
	struct qcow2_lock_fd *n;
	char msg[256];
	int ret;

	n = realloc(lk->files, (lk->n + 1) * sizeof(*n));
	if (!n) {
		close(fd);
		return -ENOMEM;
	}
	lk->files = n;
	n = &lk->files[lk->n];
	memset(n, 0, sizeof(*n));
	n->fd = fd;
	lk->n++;
	ret = io_lock_set(fd, &n->lock, use, shared, msg, sizeof(msg));
	if (ret < 0 && path)
		seterr(err, errlen, "%s: %s", path, msg);
	else if (ret < 0)
		seterr(err, errlen, "%s%s", msg, "");
	return ret;
}

static int open_ro(const char *path)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))) {
		close(fd);
		return -EINVAL;
	}
	return fd;
}

/* Read and parse the qcow2 header of @fd. 0, -ENOTSUP (not qcow2) or -errno. */
static int read_header(int fd, struct qcow2_header_info *h)
{
	struct stat st;
	size_t len;
	void *buf;
	int ret;

	ret = qcow2_probe(fd);
	if (ret <= 0)
		return ret < 0 ? ret : -ENOTSUP;
	if (fstat(fd, &st) < 0)
		return -errno;
	len = QCOW2_MAX_CLUSTER_SIZE;
	if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < len)
		len = (size_t)st.st_size;
	buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	ret = qcow2_pread_full(fd, buf, len, 0);
	if (ret == 0)
		ret = qcow2_header_parse(buf, len, S_ISREG(st.st_mode) ? (uint64_t)st.st_size : len,
					 h, NULL, 0);
	free(buf);
	return ret;
}

static int lock_one(struct qcow2_locks *lk, const char *path, const char *fmt, unsigned depth,
		    enum qcow2_lock_mode mode, bool force_share, char *err, size_t errlen)
{
	const unsigned cr = IO_PERM_CONSISTENT_READ, w = IO_PERM_WRITE, rs = IO_PERM_RESIZE;
	struct qcow2_header_info *h = NULL;
	bool qcow2;
	unsigned use, shared;
	int fd, ret;

	if (depth > QCOW2_MAX_CHAIN_DEPTH)
		return 0;
	fd = open_ro(path);
	if (fd < 0)
		return 0; /* the tool itself reports it */
	if (fmt) {
		qcow2 = !strcmp(fmt, "qcow2");
	} else {
		ret = qcow2_probe(fd);
		qcow2 = ret > 0;
	}
	if (qcow2) {
		h = calloc(1, sizeof(*h));
		if (!h) {
			close(fd);
			return -ENOMEM;
		}
		if (read_header(fd, h) < 0) {
			/* not readable as qcow2: the tool says why; lock it as the image anyway */
			free(h);
			h = NULL;
		}
	}
	/* the image (or backing file) itself */
	if (mode == QCOW2_LOCK_INFO) {
		use = 0;
		shared = force_share || !qcow2 ? IO_PERM_ALL : IO_PERM_ALL & ~(w | rs);
	} else if (force_share) {
		use = cr;
		shared = IO_PERM_ALL;
	} else if (!qcow2) {
		use = mode == QCOW2_LOCK_RESIZE && depth == 0  ? cr | w | rs
		      : mode == QCOW2_LOCK_WRITE && depth == 0 ? cr | w
							       : cr;
		/* qemu-img convert refuses writers of a raw source; check and map do not */
		shared = mode == QCOW2_LOCK_CONVERT && depth == 0 ? IO_PERM_ALL & ~(w | rs)
								  : IO_PERM_ALL;
	} else {
		use = mode >= QCOW2_LOCK_WRITE && depth == 0 ? cr | w | rs : cr;
		shared = IO_PERM_ALL & ~(w | rs);
	}
	if (use || shared != IO_PERM_ALL)
		ret = keep_locked(lk, fd, depth ? path : NULL, use, shared, err, errlen);
	else {
		close(fd);
		ret = 0;
	}
	if (ret < 0 || !h || mode == QCOW2_LOCK_INFO)
		goto out;

	/* its external data file */
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		char *df = qcow2_path_relative(path, h->data_file);

		if (!df) {
			ret = -ENOMEM;
			goto out;
		}
		fd = open_ro(df);
		if (fd == -ENOENT && h->data_file[0] != '/') {
			free(df);
			df = strdup(h->data_file); /* qemu-img: relative to the working directory */
			fd = df ? open_ro(df) : -ENOMEM;
		}
		if (fd >= 0) {
			if (force_share)
				ret = keep_locked(lk, fd, df, cr, IO_PERM_ALL, err, errlen);
			else
				ret = keep_locked(
				    lk, fd, df,
				    mode >= QCOW2_LOCK_WRITE && depth == 0 ? cr | w | rs : cr,
				    IO_PERM_ALL & ~rs, err, errlen);
		}
		free(df);
		if (ret < 0)
			goto out;
	}

	/* its backing file */
	if (h->backing_file[0]) {
		char *bp = qcow2_path_relative(path, h->backing_file);

		if (!bp) {
			ret = -ENOMEM;
			goto out;
		}
		ret = lock_one(lk, bp, h->has_backing_fmt ? h->backing_fmt : NULL, depth + 1, mode,
			       force_share, err, errlen);
		free(bp);
	}
out:
	free(h);
	return ret;
}

int qcow2_lock_image(struct qcow2_locks *lk, const char *path, const char *fmt,
		     enum qcow2_lock_mode mode, bool force_share, char *err, size_t errlen)
{
	int ret;

	memset(lk, 0, sizeof(*lk));
	if (err && errlen)
		err[0] = '\0';
	if (force_share && mode >= QCOW2_LOCK_WRITE) {
		seterr(err, errlen, "%s: force-share can only be used with read-only images%s",
		       path, "");
		return -EINVAL;
	}
	ret = lock_one(lk, path, fmt, 0, mode, force_share, err, errlen);
	if (ret < 0)
		qcow2_unlock_image(lk);
	return ret;
}

void qcow2_unlock_image(struct qcow2_locks *lk)
{
	for (unsigned i = 0; i < lk->n; i++) {
		io_lock_release(lk->files[i].fd, &lk->files[i].lock);
		close(lk->files[i].fd);
	}
	free(lk->files);
	lk->files = NULL;
	lk->n = 0;
}
