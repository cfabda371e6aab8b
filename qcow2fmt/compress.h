/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/compress.h — compression and decompression of qcow2 compressed
 * clusters, shared by the engine (qcow2/, reads) and the offline tool
 * (qcow2tool/, reads and vqcow-img convert -c). Pure computation: no I/O.
 *
 * zlib: raw deflate (no zlib header) with a 4 KiB window (window bits 12),
 * the stream QEMU writes and the only one it reads back: QEMU inflates with
 * window bits -12, so a stream using a larger window would be refused.
 * zstd: one frame, default level (VQCOW_HAVE_ZSTD builds only).
 */
#ifndef VQCOW_QCOW2FMT_COMPRESS_H
#define VQCOW_QCOW2FMT_COMPRESS_H

#include <stddef.h>
#include <sys/types.h>

/* One compressor/decompressor state; not thread safe (one per thread). */
struct qcow2_zctx;

struct qcow2_zctx *qcow2_zctx_new(void);
void qcow2_zctx_free(struct qcow2_zctx *z);

/* true if this build can (de)compress @type (QCOW2_COMPRESSION_*). */
int qcow2_compression_supported(int type);

/*
 * Decompress one cluster: @src/@srclen the compressed bytes as stored (the
 * stream may be followed by unrelated bytes); exactly @dstlen bytes must come
 * out. 0, -EIO (corrupt or short stream), -ENOMEM, -ENOTSUP (type).
 */
int qcow2_zinflate(struct qcow2_zctx *z, int type, const void *src, size_t srclen, void *dst,
		   size_t dstlen);

/*
 * Compress @srclen bytes into @dst (@dstlen bytes). Returns the compressed
 * length, -ENOSPC if the result does not fit (store the cluster
 * uncompressed), -ENOMEM or -ENOTSUP.
 */
ssize_t qcow2_zdeflate(struct qcow2_zctx *z, int type, const void *src, size_t srclen, void *dst,
		       size_t dstlen);

#endif /* VQCOW_QCOW2FMT_COMPRESS_H */
