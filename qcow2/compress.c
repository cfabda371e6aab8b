/* SPDX-License-Identifier: MIT */
/*
 * qcow2/compress.c — decompression of compressed clusters for the engine.
 *
 * The codecs live in qcow2fmt/compress.c, shared with the offline tool (which
 * also compresses, for vqcow-img convert -c). One decompressor per engine
 * (synchronous, single thread), created lazily.
 */
#include <errno.h>

#include "compress.h"
#include "internal.h"

int qcow2_decompress(struct qcow2 *q, const void *src, size_t srclen, void *dst, size_t dstlen)
{
	if (!q->zctx)
		q->zctx = qcow2_zctx_new();
	if (!q->zctx)
		return -ENOMEM;
	return qcow2_zinflate(q->zctx, q->h.compression_type, src, srclen, dst, dstlen);
}

void q2_compress_exit(struct qcow2 *q)
{
	qcow2_zctx_free(q->zctx);
	q->zctx = NULL;
}
