/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/compress.c — qcow2 compressed clusters, both ways.
 *
 * Inflate, zlib: with libdeflate (VQCOW_HAVE_LIBDEFLATE builds) a cluster is
 * inflated in one call over the whole buffer: its size is known, which is what
 * libdeflate is made for, and it is 2-3x faster than zlib's streaming inflate.
 * libdeflate stops at the final block (trailing bytes are ignored) and must
 * produce exactly one cluster; a stream it refuses (corrupt, or one that goes
 * on past the cluster or ends without a final block once a cluster came out,
 * which QEMU accepts) is retried with zlib, so what reads back is what QEMU
 * reads. zstd: one or more frames.
 * The compressed data ends somewhere inside its last 512-byte sector and may
 * be followed by garbage (or by another cluster's data): decompression stops
 * as soon as a full cluster came out, and fails if the input runs out first.
 *
 * Deflate, zlib: zlib itself (libdeflate always uses a 32 KiB window, which
 * QEMU's -12 inflate refuses), default level, as QEMU writes. zstd: one frame
 * at the default level, as QEMU.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef VQCOW_HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif
#ifdef VQCOW_HAVE_ZSTD
#include <zstd.h>
#endif

#include "compress.h"
#include "format.h"

struct qcow2_zctx {
	z_stream zs; /* inflate */
	bool zs_init;
	z_stream zd; /* deflate */
	bool zd_init;
#ifdef VQCOW_HAVE_LIBDEFLATE
	struct libdeflate_decompressor *ld;
#endif
#ifdef VQCOW_HAVE_ZSTD
	ZSTD_DCtx *zstd_d;
	ZSTD_CCtx *zstd_c;
#endif
};

struct qcow2_zctx *qcow2_zctx_new(void)
{
	return calloc(1, sizeof(struct qcow2_zctx));
}

void qcow2_zctx_free(struct qcow2_zctx *z)
{
	if (!z)
		return;
	if (z->zs_init)
		inflateEnd(&z->zs);
	if (z->zd_init)
		deflateEnd(&z->zd);
#ifdef VQCOW_HAVE_LIBDEFLATE
	if (z->ld)
		libdeflate_free_decompressor(z->ld);
#endif
#ifdef VQCOW_HAVE_ZSTD
	ZSTD_freeDCtx(z->zstd_d);
	ZSTD_freeCCtx(z->zstd_c);
#endif
	free(z);
}

int qcow2_compression_supported(int type)
{
	if (type == QCOW2_COMPRESSION_ZLIB)
		return 1;
#ifdef VQCOW_HAVE_ZSTD
	if (type == QCOW2_COMPRESSION_ZSTD)
		return 1;
#endif
	return 0;
}

static int inflate_zlib(struct qcow2_zctx *z, const void *src, size_t srclen, void *dst,
			size_t dstlen)
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
static int inflate_libdeflate(struct qcow2_zctx *z, const void *src, size_t srclen, void *dst,
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
static int inflate_zstd(struct qcow2_zctx *z, const void *src, size_t srclen, void *dst,
			size_t dstlen)
{
	ZSTD_inBuffer in = {src, srclen, 0};
	ZSTD_outBuffer out = {dst, dstlen, 0};

	if (!z->zstd_d) {
		z->zstd_d = ZSTD_createDCtx();
		if (!z->zstd_d)
			return -ENOMEM;
	}
	ZSTD_DCtx_reset(z->zstd_d, ZSTD_reset_session_only);
	while (out.pos < out.size) {
		size_t ipos = in.pos, opos = out.pos;
		size_t r = ZSTD_decompressStream(z->zstd_d, &out, &in);

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

int qcow2_zinflate(struct qcow2_zctx *z, int type, const void *src, size_t srclen, void *dst,
		   size_t dstlen)
{
	if (type == QCOW2_COMPRESSION_ZLIB) {
#ifdef VQCOW_HAVE_LIBDEFLATE
		int ret = inflate_libdeflate(z, src, srclen, dst, dstlen);

		if (ret <= 0)
			return ret;
#endif
		return inflate_zlib(z, src, srclen, dst, dstlen);
	}
#ifdef VQCOW_HAVE_ZSTD
	if (type == QCOW2_COMPRESSION_ZSTD)
		return inflate_zstd(z, src, srclen, dst, dstlen);
#endif
	return -ENOTSUP;
}

static ssize_t deflate_zlib(struct qcow2_zctx *z, const void *src, size_t srclen, void *dst,
			    size_t dstlen)
{
	int ret;

	if (!z->zd_init) {
		if (deflateInit2(&z->zd, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
				 Z_DEFAULT_STRATEGY) != Z_OK)
			return -ENOMEM;
		z->zd_init = true;
	} else if (deflateReset(&z->zd) != Z_OK) {
		return -EIO;
	}
	z->zd.next_in = (Bytef *)(uintptr_t)src;
	z->zd.avail_in = (uInt)srclen;
	z->zd.next_out = dst;
	z->zd.avail_out = (uInt)dstlen;
	ret = deflate(&z->zd, Z_FINISH);
	if (ret != Z_STREAM_END)
		return -ENOSPC; /* Z_OK / Z_BUF_ERROR: the output buffer ran out */
	return (ssize_t)(dstlen - z->zd.avail_out);
}

#ifdef VQCOW_HAVE_ZSTD
static ssize_t deflate_zstd(struct qcow2_zctx *z, const void *src, size_t srclen, void *dst,
			    size_t dstlen)
{
	ZSTD_inBuffer in = {src, srclen, 0};
	ZSTD_outBuffer out = {dst, dstlen, 0};
	size_t r;

	if (!z->zstd_c) {
		z->zstd_c = ZSTD_createCCtx();
		if (!z->zstd_c)
			return -ENOMEM;
	}
	ZSTD_CCtx_reset(z->zstd_c, ZSTD_reset_session_only);
	do {
		r = ZSTD_compressStream2(z->zstd_c, &out, &in, ZSTD_e_end);
		if (ZSTD_isError(r))
			return -EIO;
		if (r && out.pos == out.size)
			return -ENOSPC;
	} while (r);
	return (ssize_t)out.pos;
}
#endif

ssize_t qcow2_zdeflate(struct qcow2_zctx *z, int type, const void *src, size_t srclen, void *dst,
		       size_t dstlen)
{
	if (type == QCOW2_COMPRESSION_ZLIB)
		return deflate_zlib(z, src, srclen, dst, dstlen);
#ifdef VQCOW_HAVE_ZSTD
	if (type == QCOW2_COMPRESSION_ZSTD)
		return deflate_zstd(z, src, srclen, dst, dstlen);
#endif
	return -ENOTSUP;
}
