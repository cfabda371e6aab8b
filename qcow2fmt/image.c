/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/image.c — an image opened synchronously through struct qcow2_io
 * (struct qcow2_oimg): the table reader, the snapshot table loader, and the
 * message helper of the checker and the tools. See image.h.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"

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

int qcow2_read_table(const struct qcow2_io *io, uint64_t off, uint64_t n, uint64_t **out)
{
	uint64_t *t;
	int ret;

	*out = NULL;
	if (n > SIZE_MAX / 8)
		return -EFBIG;
	t = malloc(n ? n * 8 : 8);
	if (!t)
		return -ENOMEM;
	ret = qcow2_io_read(io, t, n * 8, off);
	if (ret < 0) {
		free(t);
		return ret;
	}
	for (uint64_t i = 0; i < n; i++)
		t[i] = qcow2_be64(&t[i]);
	*out = t;
	return 0;
}

/*
 * Snapshot table: variable-length entries; read what each one says it needs,
 * never more than QCOW2_MAX_SNAPSHOTS_BYTES in total or past the end of file.
 */
int qcow2_snapshots_read(const struct qcow2_io *io, const struct qcow2_header_info *h,
			 uint64_t file_size, uint8_t **bufp, uint64_t *usedp,
			 struct qcow2_snapshot_info **snapsp, char *err, size_t errlen)
{
	struct qcow2_snapshot_info *snaps = NULL;
	uint64_t avail, cap, used = 0, end = 0;
	uint8_t *buf = NULL;
	int ret;

	*bufp = NULL;
	*usedp = 0;
	*snapsp = NULL;
	if (!h->nb_snapshots)
		return 0;
	avail = file_size > h->snapshots_offset ? file_size - h->snapshots_offset : 0;
	if (avail > QCOW2_MAX_SNAPSHOTS_BYTES)
		avail = QCOW2_MAX_SNAPSHOTS_BYTES;
	snaps = calloc(h->nb_snapshots, sizeof(*snaps));
	cap = avail < 65536 ? avail : 65536;
	buf = malloc(cap ? cap : 1);
	if (!snaps || !buf) {
		ret = qcow2_seterr(err, errlen, -ENOMEM, "snapshot table: out of memory");
		goto fail;
	}
	ret = qcow2_io_read(io, buf, cap, h->snapshots_offset);
	if (ret < 0)
		goto fail_read;
	for (uint32_t i = 0; i < h->nb_snapshots; i++) {
		uint64_t need = used + sizeof(struct qcow2_snapshot_disk);

		if (need <= cap) {
			const struct qcow2_snapshot_disk *d = (const void *)(buf + used);

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
				ret = qcow2_seterr(
				    err, errlen, -EINVAL,
				    "snapshot table: entry %u (at 0x%llx) runs past the %s", i,
				    (unsigned long long)(h->snapshots_offset + used),
				    avail == QCOW2_MAX_SNAPSHOTS_BYTES ? "snapshot table size limit"
								       : "end of the file");
				goto fail;
			}
			nb = realloc(buf, ncap);
			if (!nb) {
				ret = qcow2_seterr(err, errlen, -ENOMEM,
						   "snapshot table: out of memory");
				goto fail;
			}
			buf = nb;
			ret = qcow2_io_read(io, nb + cap, ncap - cap, h->snapshots_offset + cap);
			if (ret < 0)
				goto fail_read;
			cap = ncap;
			i--; /* re-examine the entry with the bigger buffer */
			continue;
		}
		ret = qcow2_snapshot_parse(buf + used, cap - used, h->version, &snaps[i], err,
					   errlen);
		if (ret < 0) {
			char tmp[256];

			snprintf(tmp, sizeof(tmp), "%s", err ? err : "");
			qcow2_seterr(err, errlen, -EINVAL, "snapshot %u: %s", i, tmp);
			goto fail;
		}
		end = used + snaps[i].raw_len;
		used += snaps[i].entry_len;
	}
	*bufp = buf;
	*usedp = end;
	*snapsp = snaps;
	return 0;

fail_read:
	qcow2_seterr(err, errlen, ret, "reading the snapshot table: %s", strerror(-ret));
fail:
	free(buf);
	free(snaps);
	return ret;
}

int qcow2_oimg_open(struct qcow2_oimg *im, const struct qcow2_io *io, const char *name,
		    bool writable, char *err, size_t errlen)
{
	uint8_t magic[4];
	size_t want;
	int ret;

	memset(im, 0, sizeof(*im));
	im->io = *io;
	im->writable = writable;
	im->path = strdup(name ? name : "");
	if (!im->path)
		return -ENOMEM;
	ret = io->size(io->opaque, &im->file_size);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "cannot get the file size: %s",
				    strerror(-ret));
	ret = qcow2_io_read(io, magic, sizeof(magic), 0);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "cannot read the header: %s", strerror(-ret));
	if (im->file_size < sizeof(magic) || qcow2_be32(magic) != QCOW2_MAGIC)
		return qcow2_seterr(err, errlen, -ENOTSUP, "not a qcow2 image (bad magic)");
	want = QCOW2_MAX_CLUSTER_SIZE;
	if (im->file_size < want)
		want = (size_t)im->file_size;
	im->hbuf = malloc(want ? want : 1);
	if (!im->hbuf)
		return -ENOMEM;
	im->hlen = want;
	ret = qcow2_io_read(io, im->hbuf, want, 0);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "cannot read the header: %s", strerror(-ret));
	ret = qcow2_header_parse(im->hbuf, im->hlen, im->file_size, &im->h, err, errlen);
	if (ret < 0)
		return ret == -ENOBUFS ? -EIO : ret;
	ret = qcow2_read_table(io, im->h.l1_table_offset, im->h.l1_size, &im->l1);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "cannot read the L1 table: %s",
				    strerror(-ret));
	ret = qcow2_read_table(io, im->h.refcount_table_offset, im->h.refcount_table_entries,
			       &im->rt);
	if (ret < 0)
		return qcow2_seterr(err, errlen, ret, "cannot read the refcount table: %s",
				    strerror(-ret));
	ret = qcow2_snapshots_read(io, &im->h, im->file_size, &im->snapbuf, &im->snapbuf_len,
				   &im->snaps, err, errlen);
	if (ret < 0)
		return ret;
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
	/* what im->io.opaque names is the caller's */
}
