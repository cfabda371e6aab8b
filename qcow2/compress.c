/* SPDX-License-Identifier: MIT */
/*
 * qcow2/compress.c — decompression of compressed clusters.
 *
 * zlib: raw deflate (no header), window bits 12, as qcow2 writes it. With
 * libdeflate (VQCOW_HAVE_LIBDEFLATE builds) a cluster is inflated in one call
 * over the whole buffer: its size is known, which is what libdeflate is made
 * for, and it is 2-3x faster than zlib's streaming inflate. libdeflate stops
 * at the final block (trailing bytes are ignored) and must produce exactly one
 * cluster; a stream it refuses (corrupt, or one that goes on past the cluster
 * or ends without a final block once a cluster came out, which QEMU accepts)
 * is retried with zlib, so what reads back is what QEMU reads.
 * zstd: one or more frames (VQCOW_HAVE_ZSTD builds only).
 * The compressed data ends somewhere inside its last 512-byte sector and may
 * be followed by garbage (or by another cluster's data): decompression stops
 * as soon as a full cluster came out, and fails if the input runs out first.
 * One decompressor per engine (synchronous, single thread), created lazily.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef VQCOW_HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif
#ifdef VQCOW_HAVE_ZSTD
#include <zstd.h>
#endif

#include "internal.h"

struct q2_zctx {
	z_stream zs;
	bool zs_init;
#ifdef VQCOW_HAVE_LIBDEFLATE
	struct libdeflate_decompressor *ld;
#endif
#ifdef VQCOW_HAVE_ZSTD
	ZSTD_DCtx *zd;
#endif
};

static struct q2_zctx *zctx(struct qcow2 *q)
{
	if (!q->zctx)
		q->zctx = calloc(1, sizeof(struct q2_zctx));
	return q->zctx;
}

static int inflate_zlib(struct q2_zctx *z, const void *src, size_t srclen, void *dst, size_t dstlen)
{
	int ret;

	if (!z->zs_init) {
		if (inflateInit2(&z->zs, -12) != Z_OK)
			return -ENOMEM;
		z->zs_init = true;
	} else if (inflateReset(&z->zs) != Z_OK) {
		return -EIO;
	}
	z->zs.next_in = (Bytef *)(uintptr_t)src;
	z->zs.avail_in = (uInt)srclen;
	z->zs.next_out = dst;
	z->zs.avail_out = (uInt)dstlen;
	ret = inflate(&z->zs, Z_FINISH);
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && z->zs.avail_out == 0)
		return 0;
	return -EIO;
}

#ifdef VQCOW_HAVE_LIBDEFLATE
/* 0, or 1 if libdeflate refused the stream (zlib decides), or -ENOMEM. */
static int inflate_libdeflate(struct q2_zctx *z, const void *src, size_t srclen, void *dst,
			      size_t dstlen)
{
	size_t in_used;

	if (!z->ld) {
		z->ld = libdeflate_alloc_decompressor();
		if (!z->ld)
			return -ENOMEM;
	}
	if (libdeflate_deflate_decompress_ex(z->ld, src, srclen, dst, dstlen, &in_used, NULL) ==
	    LIBDEFLATE_SUCCESS)
		return 0;
	return 1;
}
#endif

#ifdef VQCOW_HAVE_ZSTD
static int inflate_zstd(struct q2_zctx *z, const void *src, size_t srclen, void *dst, size_t dstlen)
{
	ZSTD_inBuffer in = {src, srclen, 0};
	ZSTD_outBuffer out = {dst, dstlen, 0};

	if (!z->zd) {
		z->zd = ZSTD_createDCtx();
		if (!z->zd)
			return -ENOMEM;
	}
	ZSTD_DCtx_reset(z->zd, ZSTD_reset_session_only);
	while (out.pos < out.size) {
		size_t ipos = in.pos, opos = out.pos;
		size_t r = ZSTD_decompressStream(z->zd, &out, &in);

		if (ZSTD_isError(r))
			return -EIO;
		if (out.pos == out.size)
			break;
		if (in.pos == in.size || (in.pos == ipos && out.pos == opos))
			return -EIO;
	}
	return 0;
}
#endif

int qcow2_decompress(struct qcow2 *q, const void *src, size_t srclen, void *dst, size_t dstlen)
{
	struct q2_zctx *z = zctx(q);

	if (!z)
		return -ENOMEM;
	if (q->h.compression_type == QCOW2_COMPRESSION_ZLIB) {
#ifdef VQCOW_HAVE_LIBDEFLATE
		int ret = inflate_libdeflate(z, src, srclen, dst, dstlen);

		if (ret <= 0)
			return ret;
#endif
		return inflate_zlib(z, src, srclen, dst, dstlen);
	}
#ifdef VQCOW_HAVE_ZSTD
	if (q->h.compression_type == QCOW2_COMPRESSION_ZSTD)
		return inflate_zstd(z, src, srclen, dst, dstlen);
#endif
	return -ENOTSUP;
}

void q2_compress_exit(struct qcow2 *q)
{
	struct q2_zctx *z = q->zctx;

	if (!z)
		return;
	if (z->zs_init)
		inflateEnd(&z->zs);
#ifdef VQCOW_HAVE_LIBDEFLATE
	if (z->ld)
		libdeflate_free_decompressor(z->ld);
#endif
#ifdef VQCOW_HAVE_ZSTD
	ZSTD_freeDCtx(z->zd);
#endif
	free(z);
	q->zctx = NULL;
}
