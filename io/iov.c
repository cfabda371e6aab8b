/* SPDX-License-Identifier: MIT */
/*
 * iovec helpers and aligned allocation.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io_internal.h"

size_t io_iov_len(const struct iovec *iov, unsigned iovcnt)
{
	size_t len = 0;

	for (unsigned i = 0; i < iovcnt; i++)
		len += iov[i].iov_len;
	return len;
}

int io_iov_slice(struct iovec *dst, unsigned dst_max, const struct iovec *src, unsigned src_cnt,
		 size_t skip, size_t len)
{
	unsigned i = 0, n = 0;

	/* Find the entry holding byte @skip. */
	while (i < src_cnt && skip >= src[i].iov_len) {
		skip -= src[i].iov_len;
		i++;
	}
	while (len > 0) {
		size_t chunk;

		if (i >= src_cnt)
			return -EINVAL;
		chunk = src[i].iov_len - skip;
		if (chunk > len)
			chunk = len;
		if (chunk > 0) {
			if (n >= dst_max)
				return -E2BIG;
			dst[n].iov_base = (char *)src[i].iov_base + skip;
			dst[n].iov_len = chunk;
			n++;
			len -= chunk;
		}
		skip = 0;
		i++;
	}
	return (int)n;
}

void io_iov_memset(const struct iovec *iov, unsigned iovcnt, size_t skip, int c, size_t len)
{
	for (unsigned i = 0; i < iovcnt && len > 0; i++) {
		size_t chunk;

		if (skip >= iov[i].iov_len) {
			skip -= iov[i].iov_len;
			continue;
		}
		chunk = iov[i].iov_len - skip;
		if (chunk > len)
			chunk = len;
		memset((char *)iov[i].iov_base + skip, c, chunk);
		len -= chunk;
		skip = 0;
	}
}

/* Copy between [@skip, @skip + @len) of @iov and @buf, in the direction @to_iov says. */
static size_t iov_copy(const struct iovec *iov, unsigned iovcnt, size_t skip, char *buf, size_t len,
		       bool to_iov)
{
	size_t done = 0;

	for (unsigned i = 0; i < iovcnt && done < len; i++) {
		char *base = iov[i].iov_base;
		size_t chunk;

		if (skip >= iov[i].iov_len) {
			skip -= iov[i].iov_len;
			continue;
		}
		chunk = iov[i].iov_len - skip;
		if (chunk > len - done)
			chunk = len - done;
		if (to_iov)
			memcpy(base + skip, buf + done, chunk);
		else
			memcpy(buf + done, base + skip, chunk);
		done += chunk;
		skip = 0;
	}
	return done;
}

size_t io_iov_to_buf(const struct iovec *iov, unsigned iovcnt, size_t skip, void *buf, size_t len)
{
	return iov_copy(iov, iovcnt, skip, buf, len, false);
}

size_t io_iov_from_buf(const struct iovec *iov, unsigned iovcnt, size_t skip, const void *buf,
		       size_t len)
{
	return iov_copy(iov, iovcnt, skip, (char *)buf, len, true);
}

void *io_alloc_align(size_t len, size_t align)
{
	void *p = NULL;

	if (align < IO_BOUNCE_MIN)
		align = IO_BOUNCE_MIN;
	if (len == 0)
		len = 1;
	if (posix_memalign(&p, align, len) != 0)
		return NULL;
	return p;
}

void *io_alloc_aligned(size_t len)
{
	return io_alloc_align(len, IO_BOUNCE_MIN);
}

void io_free_aligned(void *p)
{
	free(p);
}
