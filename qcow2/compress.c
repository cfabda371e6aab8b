/* SPDX-License-Identifier: MIT */
/*
 * qcow2/compress.c — decompression of compressed clusters for the engine.
 *
 * The codecs live in qcow2fmt/compress.c, shared with the offline tool (which
 * also compresses, for vqcow-img convert -c). One decompressor per engine
 * (synchronous, single thread), created lazily.
 */
#include <errno.h>
#include <pthread.h>

#include "compress.h"
#include "internal.h"

/* qcow2_decompress_type(): one decompressor per thread, freed at its end. */
static pthread_key_t zkey;
static pthread_once_t zkey_once = PTHREAD_ONCE_INIT;

static void zkey_free(void *z)
{
	qcow2_zctx_free(z);
}

static void zkey_init(void)
{
	if (pthread_key_create(&zkey, zkey_free) != 0)
		zkey = (pthread_key_t)-1;
}

int qcow2_decompress_type(int type, const void *src, size_t srclen, void *dst, size_t dstlen)
{
	struct qcow2_zctx *z;

	pthread_once(&zkey_once, zkey_init);
	if (zkey == (pthread_key_t)-1)
		return -ENOMEM;
	z = pthread_getspecific(zkey);
	if (!z) {
		z = qcow2_zctx_new();
		if (!z)
			return -ENOMEM;
		if (pthread_setspecific(zkey, z) != 0) {
			qcow2_zctx_free(z);
			return -ENOMEM;
		}
	}
	return qcow2_zinflate(z, type, src, srclen, dst, dstlen);
}

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
