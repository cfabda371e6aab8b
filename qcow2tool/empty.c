/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/empty.c — empty a qcow2 image after qemu-img commit: every
 * cluster unallocated, reads fall through to the backing file.
 *
 * QEMU 7.2 (qcow2_make_empty -> make_completely_empty) rebuilds the
 * metadata from scratch when the image is v3 with no snapshot, no bitmap,
 * no encryption, no external data file, and the header, the refcount
 * table, one refcount block and the L1 table fit under one refcount block:
 * the dirty bit is set (the refcounts are about to be wrong), the L1 table
 * and clusters 1 .. 2 + L1 clusters are zeroed, the header points at a
 * one-cluster refcount table at cluster 1 and an empty L1 table at cluster
 * 3, the table's first entry at the refcount block at cluster 2, which
 * counts clusters 0 .. 2 + L1 clusters once each; then the dirty bit goes
 * and the file is cut after the L1 table. We do the same, in the same
 * order, so the result is byte for byte qemu-img's; a crash in between
 * leaves the dirty bit set, and opening read-write rebuilds the refcounts
 * (QEMU and vqcow alike) of an image that is empty or still whole. The
 * other images QEMU empties cluster by cluster, with a full discard (every
 * L2 entry cleared, refcounts dropped, snapshots keep theirs): that is the
 * engine's work (img_discard_full), so qcow2_make_empty refuses them with
 * -ENOTSUP and qcow2_make_empty_rebuilds tells the caller beforehand.
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

static int sync_fd(int fd)
{
	return fdatasync(fd) < 0 ? -errno : 0;
}

/* QEMU's condition for make_completely_empty */
static bool rebuildable(const struct qcow2_header_info *h)
{
	uint64_t c = h->cluster_size, l1_clusters = ((uint64_t)h->l1_size * 8 + c - 1) / c;

	return h->version >= 3 && !h->nb_snapshots && !(h->has_bitmaps && h->nb_bitmaps) &&
	       !h->has_crypto && !h->has_data_file &&
	       3 + l1_clusters <= (c * 8) >> h->refcount_order;
}

int qcow2_make_empty_rebuilds(const char *path, char *err, size_t errlen)
{
	struct qcow2_header_info h;
	uint8_t *buf = NULL;
	size_t len;
	int fd, ret;

	if (err && errlen)
		err[0] = '\0';
	ret = qcow2_fd_open_header(path, &fd, &buf, &len, &h, err, errlen);
	if (ret < 0)
		return ret;
	ret = rebuildable(&h);
	free(buf);
	close(fd);
	return ret;
}

int qcow2_make_empty(const char *path, char *err, size_t errlen)
{
	struct qcow2_header_info h;
	uint8_t *buf = NULL, *zero = NULL, b8[20];
	size_t len;
	uint64_t c, l1_clusters, n, incompat;
	int fd, ret;

	if (err && errlen)
		err[0] = '\0';
	ret = qcow2_fd_open_header(path, &fd, &buf, &len, &h, err, errlen);
	if (ret < 0)
		return ret;
	c = h.cluster_size;
	l1_clusters = ((uint64_t)h.l1_size * 8 + c - 1) / c;
	if (!rebuildable(&h)) {
		ret = qcow2_seterr(err, errlen, -ENOTSUP,
				   "%s: an image with snapshots, bitmaps, an external data file or "
				   "in version 2 is emptied by a full discard, not rebuilt",
				   path);
		goto out;
	}
	zero = calloc(1, c);
	if (!zero) {
		ret = -ENOMEM;
		goto out;
	}
	incompat = h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY;
	/* the refcounts are about to be wrong */
	qcow2_put_be64(b8, incompat | QCOW2_INCOMPAT_DIRTY);
	ret = qcow2_pwrite_full(fd, b8, 8, QCOW2_OFF_INCOMPAT);
	if (ret == 0)
		ret = sync_fd(fd);
	for (n = 0; ret == 0 && n < l1_clusters; n++)
		ret = qcow2_pwrite_full(fd, zero, c, h.l1_table_offset + n * c);
	for (n = 1; ret == 0 && n < 3 + l1_clusters; n++)
		ret = qcow2_pwrite_full(fd, zero, c, n * c);
	/* the L1 table at cluster 3, a one-cluster refcount table at cluster 1 */
	qcow2_put_be64(b8, 3 * c);
	qcow2_put_be64(b8 + 8, c);
	qcow2_put_be32(b8 + 16, 1);
	if (ret == 0)
		ret = qcow2_pwrite_full(fd, b8, 20, QCOW2_OFF_L1_TABLE_OFFSET);
	if (ret == 0)
		ret = sync_fd(fd);
	/* its first entry: the refcount block at cluster 2 */
	qcow2_put_be64(b8, 2 * c);
	if (ret == 0)
		ret = qcow2_pwrite_full(fd, b8, 8, c);
	if (ret == 0)
		ret = sync_fd(fd);
	/* header, refcount table and block, L1 table: one reference each */
	for (n = 0; n < 3 + l1_clusters; n++)
		qcow2_refcount_set(zero, n, h.refcount_order, 1);
	if (ret == 0)
		ret = qcow2_pwrite_full(fd, zero, c, 2 * c);
	if (ret == 0)
		ret = sync_fd(fd);
	qcow2_put_be64(b8, incompat);
	if (ret == 0)
		ret = qcow2_pwrite_full(fd, b8, 8, QCOW2_OFF_INCOMPAT);
	if (ret == 0)
		ret = sync_fd(fd);
	if (ret == 0 && ftruncate(fd, (off_t)((3 + l1_clusters) * c)) < 0)
		ret = -errno;
	if (ret < 0 && !err[0])
		qcow2_seterr(err, errlen, ret, "%s: %s", path, strerror(-ret));
out:
	free(buf);
	free(zero);
	close(fd);
	return ret;
}
