/* SPDX-License-Identifier: MIT */
/*
 * qcow2/info.c — synchronous image opening for the offline tools
 * (struct qcow2_oimg) and qcow2_info(). See offline.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "offline.h"

__attribute__((format(printf, 3, 4))) static int seterr(char *err, size_t errlen, const char *fmt,
							...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return 0;
}

void qcow2_tool_msg(const struct qcow2_tool_cb *cb, enum qcow2_msg_level level, const char *fmt,
		    ...)
{
	char line[1024];
	va_list ap;

	if (!cb || !cb->msg)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	cb->msg(cb->opaque, level, line);
}

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

int qcow2_read_table(int fd, uint64_t off, uint64_t n, uint64_t **out)
{
	uint64_t *t;
	int ret;

	*out = NULL;
	if (n > SIZE_MAX / 8)
		return -EFBIG;
	t = malloc(n ? n * 8 : 8);
	if (!t)
		return -ENOMEM;
	ret = qcow2_pread_full(fd, t, n * 8, off);
	if (ret < 0) {
		free(t);
		return ret;
	}
	for (uint64_t i = 0; i < n; i++)
		t[i] = qcow2_be64(&t[i]);
	*out = t;
	return 0;
}

char *qcow2_path_relative(const char *image, const char *name)
{
	const char *slash;
	size_t dlen, nlen;
	char *p;

	if (name[0] == '/' || !(slash = strrchr(image, '/')))
		return strdup(name);
	dlen = (size_t)(slash - image) + 1;
	nlen = strlen(name);
	p = malloc(dlen + nlen + 1);
	if (!p)
		return NULL;
	memcpy(p, image, dlen);
	memcpy(p + dlen, name, nlen + 1);
	return p;
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

static int file_size_of(int fd, uint64_t *size, uint64_t *allocated)
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

/*
 * Snapshot table: variable-length entries; read what each one says it needs,
 * never more than QCOW2_MAX_SNAPSHOTS_BYTES in total or past the end of file.
 */
static int load_snapshots(struct qcow2_oimg *im, char *err, size_t errlen)
{
	const struct qcow2_header_info *h = &im->h;
	uint64_t avail, cap, used = 0, end = 0;
	int ret;

	if (!h->nb_snapshots)
		return 0;
	avail = im->file_size > h->snapshots_offset ? im->file_size - h->snapshots_offset : 0;
	if (avail > QCOW2_MAX_SNAPSHOTS_BYTES)
		avail = QCOW2_MAX_SNAPSHOTS_BYTES;
	im->snaps = calloc(h->nb_snapshots, sizeof(*im->snaps));
	cap = avail < 65536 ? avail : 65536;
	im->snapbuf = malloc(cap ? cap : 1);
	if (!im->snaps || !im->snapbuf)
		return -ENOMEM;
	ret = qcow2_pread_full(im->fd, im->snapbuf, cap, h->snapshots_offset);
	if (ret < 0)
		return ret;
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		uint64_t need = used + sizeof(struct qcow2_snapshot_disk);

		if (need <= cap) {
			const struct qcow2_snapshot_disk *d = (const void *)(im->snapbuf + used);

			/* no padding: the file may end right after the last entry */
			need += (uint64_t)qcow2_be32(&d->extra_data_size) +
				qcow2_be16(&d->id_str_size) + qcow2_be16(&d->name_size);
		}
		if (need > cap) {
			uint64_t ncap = cap * 2 > need ? cap * 2 : need;
			uint8_t *nb;

			if (ncap > avail)
				ncap = avail;
			if (need > ncap) {
				seterr(err, errlen,
				       "snapshot table: entry %u (at 0x%llx) runs past the %s", i,
				       (unsigned long long)(h->snapshots_offset + used),
				       avail == QCOW2_MAX_SNAPSHOTS_BYTES
					   ? "snapshot table size limit"
					   : "end of the file");
				return -EINVAL;
			}
			nb = realloc(im->snapbuf, ncap);
			if (!nb)
				return -ENOMEM;
			im->snapbuf = nb;
			ret = qcow2_pread_full(im->fd, nb + cap, ncap - cap,
					       h->snapshots_offset + cap);
			if (ret < 0)
				return ret;
			cap = ncap;
			i--; /* re-examine the entry with the bigger buffer */
			continue;
		}
		ret = qcow2_snapshot_parse(im->snapbuf + used, cap - used, h->version,
					   &im->snaps[i], err, errlen);
		if (ret < 0) {
			char tmp[256];

			snprintf(tmp, sizeof(tmp), "%s", err ? err : "");
			seterr(err, errlen, "snapshot %u: %s", i, tmp);
			return ret;
		}
		end = used + im->snaps[i].raw_len;
		used += im->snaps[i].entry_len;
	}
	im->snapbuf_len = end;
	return 0;
}

int qcow2_oimg_open_fd(struct qcow2_oimg *im, int fd, const char *name, bool writable, char *err,
		       size_t errlen)
{
	size_t want;
	int ret;

	memset(im, 0, sizeof(*im));
	im->fd = fd;
	im->writable = writable;
	im->path = strdup(name ? name : "");
	if (!im->path)
		return -ENOMEM;
	ret = file_size_of(fd, &im->file_size, NULL);
	if (ret < 0) {
		seterr(err, errlen, "cannot get the file size: %s", strerror(-ret));
		return ret;
	}
	ret = qcow2_probe(fd);
	if (ret < 0) {
		seterr(err, errlen, "cannot read the header: %s", strerror(-ret));
		return ret;
	}
	if (ret == 0) {
		seterr(err, errlen, "not a qcow2 image (bad magic)");
		return -ENOTSUP;
	}
	want = QCOW2_MAX_CLUSTER_SIZE;
	if (im->file_size < want)
		want = (size_t)im->file_size;
	im->hbuf = malloc(want ? want : 1);
	if (!im->hbuf)
		return -ENOMEM;
	im->hlen = want;
	ret = qcow2_pread_full(fd, im->hbuf, want, 0);
	if (ret < 0) {
		seterr(err, errlen, "cannot read the header: %s", strerror(-ret));
		return ret;
	}
	ret = qcow2_header_parse(im->hbuf, im->hlen, im->file_size, &im->h, err, errlen);
	if (ret < 0)
		return ret == -ENOBUFS ? -EIO : ret;
	ret = qcow2_read_table(fd, im->h.l1_table_offset, im->h.l1_size, &im->l1);
	if (ret < 0) {
		seterr(err, errlen, "cannot read the L1 table: %s", strerror(-ret));
		return ret;
	}
	ret = qcow2_read_table(fd, im->h.refcount_table_offset, im->h.refcount_table_entries,
			       &im->rt);
	if (ret < 0) {
		seterr(err, errlen, "cannot read the refcount table: %s", strerror(-ret));
		return ret;
	}
	ret = load_snapshots(im, err, errlen);
	if (ret < 0)
		return ret;
	return 0;
}

int qcow2_oimg_open(struct qcow2_oimg *im, const char *path, bool writable, char *err,
		    size_t errlen)
{
	int fd, ret;

	fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		memset(im, 0, sizeof(*im));
		im->fd = -1;
		seterr(err, errlen, "%s", strerror(-ret));
		return ret;
	}
	ret = qcow2_oimg_open_fd(im, fd, path, writable, err, errlen);
	if (ret < 0) {
		qcow2_oimg_close(im);
		close(fd);
		im->fd = -1;
		return ret;
	}
	return 0;
}

void qcow2_oimg_close(struct qcow2_oimg *im)
{
	free(im->path);
	free(im->hbuf);
	free(im->l1);
	free(im->rt);
	free(im->snapbuf);
	free(im->snaps);
	im->path = NULL;
	im->hbuf = NULL;
	im->l1 = im->rt = NULL;
	im->snapbuf = NULL;
	im->snaps = NULL;
	/* the fd is closed by whoever opened it (qcow2_oimg_open's caller closes im->fd) */
}

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
	struct qcow2_oimg im;
	const struct qcow2_header_info *h;
	int ret;

	ret = qcow2_oimg_open_fd(&im, fd, path, false, err, errlen);
	if (ret < 0)
		goto out_close;
	h = &im.h;
	snprintf(in->format, sizeof(in->format), "qcow2");
	in->virtual_size = h->size;
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
			seterr(err, errlen, "could not open backing file '%s': %s",
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
			seterr(err, errlen, "could not open data file '%s': %s", h->data_file,
			       strerror(-ret));
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
		seterr(err, errlen, "unknown format '%s' (qcow2 or raw)", fmt);
		return -EINVAL;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		seterr(err, errlen, "%s", strerror(-ret));
		return ret;
	}
	ret = file_size_of(fd, &info->file_size, &alloc);
	if (ret < 0) {
		seterr(err, errlen, "not a regular file or block device");
		goto out_fd;
	}
	info->actual_size = alloc;
	q = qcow2_probe(fd);
	if (q < 0) {
		ret = q;
		seterr(err, errlen, "cannot read: %s", strerror(-ret));
		goto out_fd;
	}
	if (fmt && !strcmp(fmt, "raw"))
		q = 0;
	else if (fmt && !q) {
		seterr(err, errlen, "not a qcow2 image (bad magic)");
		ret = -EINVAL;
		goto out_fd;
	}
	if (!q) {
		snprintf(info->format, sizeof(info->format), "raw");
		info->virtual_size = info->file_size;
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
