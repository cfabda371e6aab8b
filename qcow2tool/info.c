/* SPDX-License-Identifier: MIT */
/*
 * qcow2tool/info.c — qcow2_info(): describe an image (vqcow-img info). See
 * qcow2tool.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2tool.h"

/* ---- qcow2_info ---- */

static char *strndup_safe(const char *s, size_t n)
{
	char *d = malloc(n + 1);

	if (!d)
		return NULL;
	memcpy(d, s, n);
	d[n] = 0;
	/* keep output printable */
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)d[i] < 0x20)
			d[i] = '?';
	return d;
}

void qcow2_image_info_free(struct qcow2_image_info *info)
{
	for (unsigned i = 0; i < info->nb_snapshots; i++) {
		free(info->snapshots[i].id);
		free(info->snapshots[i].name);
	}
	free(info->snapshots);
	free(info->backing_file);
	free(info->backing_fmt);
	free(info->full_backing_file);
	free(info->data_file);
	memset(info, 0, sizeof(*info));
}

static int info_qcow2(const char *path, int fd, struct qcow2_image_info *in, char *err,
		      size_t errlen)
{
	struct qcow2_io io = qcow2_fd_io(fd);
	struct qcow2_oimg im;
	const struct qcow2_header_info *h;
	int ret;

	ret = qcow2_oimg_open(&im, &io, path, false, err, errlen);
	if (ret < 0)
		goto out_close;
	h = &im.h;
	snprintf(in->format, sizeof(in->format), "qcow2");
	in->virtual_size = h->size & ~511ull; /* whole sectors, as QEMU counts them */
	in->cluster_size = h->cluster_size;
	in->version = (int)h->version;
	in->refcount_bits = h->refcount_bits;
	in->extended_l2 = h->extended_l2;
	in->lazy_refcounts = (h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0;
	in->corrupt = (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) != 0;
	in->dirty = (h->incompatible_features & QCOW2_INCOMPAT_DIRTY) != 0;
	in->compression_type = h->compression_type;
	ret = -ENOMEM;
	if (h->backing_file[0]) {
		in->backing_file = strdup(h->backing_file);
		in->full_backing_file = qcow2_path_relative(path, h->backing_file);
		if (!in->backing_file || !in->full_backing_file)
			goto out_close;
	}
	if (h->has_backing_fmt && !(in->backing_fmt = strdup(h->backing_fmt)))
		goto out_close;
	if (in->full_backing_file) {
		/* as qemu-img: an image whose backing file is missing cannot be used */
		int bfd = open(in->full_backing_file, O_RDONLY | O_CLOEXEC);

		if (bfd < 0) {
			ret = -errno;
			qcow2_seterr(err, errlen, 0, "could not open backing file '%s': %s",
				     in->full_backing_file, strerror(-ret));
			goto out_close;
		}
		close(bfd);
	}
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		char *df;
		int dfd;

		if (!(in->data_file = strdup(h->data_file)))
			goto out_close;
		df = qcow2_path_relative(path, h->data_file);
		if (!df)
			goto out_close;
		dfd = open(df, O_RDONLY | O_CLOEXEC);
		if (dfd < 0 && h->data_file[0] != '/')
			dfd = open(h->data_file, O_RDONLY | O_CLOEXEC); /* QEMU: relative to cwd */
		if (dfd < 0) {
			ret = -errno;
			qcow2_seterr(err, errlen, 0, "could not open data file '%s': %s",
				     h->data_file, strerror(-ret));
			free(df);
			goto out_close;
		}
		close(dfd);
		free(df);
		in->data_file_raw = (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
	}
	if (h->nb_snapshots) {
		in->snapshots = calloc(h->nb_snapshots, sizeof(*in->snapshots));
		if (!in->snapshots)
			goto out_close;
		in->nb_snapshots = h->nb_snapshots;
		for (uint32_t i = 0; i < h->nb_snapshots; i++) {
			const struct qcow2_snapshot_info *s = &im.snaps[i];
			struct qcow2_info_snapshot *d = &in->snapshots[i];
			const uint8_t *extra = (const uint8_t *)s->id - s->extra_data_size;

			d->id = strndup_safe(s->id, s->id_len);
			d->name = strndup_safe(s->name, s->name_len);
			if (!d->id || !d->name)
				goto out_close;
			d->vm_state_size = s->vm_state_size;
			d->date_sec = s->date_sec;
			d->date_nsec = s->date_nsec;
			d->vm_clock_nsec = s->vm_clock_nsec;
			d->disk_size = s->disk_size;
			if (s->extra_data_size >=
			    offsetof(struct qcow2_snapshot_extra, icount) + 8) {
				d->icount = qcow2_be64(
				    extra + offsetof(struct qcow2_snapshot_extra, icount));
				d->has_icount = d->icount != UINT64_MAX;
			}
		}
	}
	ret = 0;
out_close:
	qcow2_oimg_close(&im);
	return ret;
}

int qcow2_info(const char *path, const char *fmt, struct qcow2_image_info *info, char *err,
	       size_t errlen)
{
	int fd, ret, q;
	uint64_t alloc;

	memset(info, 0, sizeof(*info));
	if (err && errlen)
		err[0] = 0;
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		qcow2_seterr(err, errlen, 0, "unknown format '%s' (qcow2 or raw)", fmt);
		return -EINVAL;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		qcow2_seterr(err, errlen, 0, "%s", strerror(-ret));
		return ret;
	}
	ret = qcow2_fd_size(fd, &info->file_size, &alloc);
	if (ret < 0) {
		qcow2_seterr(err, errlen, 0, "not a regular file or block device");
		goto out_fd;
	}
	info->actual_size = alloc;
	q = qcow2_probe(fd);
	if (q < 0) {
		ret = q;
		qcow2_seterr(err, errlen, 0, "cannot read: %s", strerror(-ret));
		goto out_fd;
	}
	if (fmt && !strcmp(fmt, "raw"))
		q = 0;
	else if (fmt && !q) {
		qcow2_seterr(err, errlen, 0, "not a qcow2 image (bad magic)");
		ret = -EINVAL;
		goto out_fd;
	}
	if (!q) {
		snprintf(info->format, sizeof(info->format), "raw");
		/* QEMU's file driver rounds a raw file up to whole sectors */
		info->virtual_size = (info->file_size + 511) & ~511ull;
		ret = 0;
		goto out_fd;
	}
	ret = info_qcow2(path, fd, info, err, errlen);
	if (ret < 0)
		qcow2_image_info_free(info);
out_fd:
	close(fd);
	return ret;
}
