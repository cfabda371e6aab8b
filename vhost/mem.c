/* SPDX-License-Identifier: MIT */
/*
 * vhost/mem.c — the memory table: mapping the front-end's regions and
 * translating guest-physical and front-end-virtual addresses.
 *
 * Invariants:
 *  - every region has size > 0, and gpa + size, uva + size do not overflow;
 *  - guest-physical ranges of two regions never overlap;
 *  - a translation never returns more bytes than remain in its region;
 *  - a mapping that in-flight elements may still point into is not unmapped
 *    before the connection's in-flight count drops to zero (retired list).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vhost_int.h"

/* Unmap now, or keep the mapping until nothing is in flight. 0 or -ENOMEM. */
static int mem_retire(struct vhost_dev *dev, void *addr, size_t len)
{
	struct vhost_mem *m = &dev->mem;

	if (DEV_INFLIGHT(dev) == 0) {
		munmap(addr, len);
		return 0;
	}
	if (m->nretired == m->retired_cap) {
		unsigned cap = m->retired_cap ? 2 * m->retired_cap : 16;
		struct vhost_mem_retired *r = realloc(m->retired, cap * sizeof(*r));

		if (!r)
			return -ENOMEM;
		m->retired = r;
		m->retired_cap = cap;
	}
	m->retired[m->nretired].addr = addr;
	m->retired[m->nretired].len = len;
	m->nretired++;
	return 0;
}

/* Make room to retire @n more mappings (so that retiring cannot fail). */
static int mem_reserve_retired(struct vhost_dev *dev, unsigned n)
{
	struct vhost_mem *m = &dev->mem;
	struct vhost_mem_retired *r;
	unsigned cap;

	if (DEV_INFLIGHT(dev) == 0 || m->nretired + n <= m->retired_cap)
		return 0;
	cap = m->nretired + n + 16;
	r = realloc(m->retired, cap * sizeof(*r));
	if (!r)
		return -ENOMEM;
	m->retired = r;
	m->retired_cap = cap;
	return 0;
}

void vhost_mem_release_retired(struct vhost_dev *dev)
{
	struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nretired; i++)
		munmap(m->retired[i].addr, m->retired[i].len);
	m->nretired = 0;
}

/*
 * Map one region from @fd (always closed here). 0 or -errno; on error the
 * table is unchanged.
 */
int vhost_mem_add(struct vhost_dev *dev, const struct vu_mem_region *reg, int fd)
{
	struct vhost_mem *m = &dev->mem;
	struct vhost_mem_region *r;
	long page = sysconf(_SC_PAGESIZE);
	uint64_t aligned, delta;
	struct stat st;
	void *addr;
	size_t len;
	int ret;

	if (m->nregions >= VHOST_MAX_MEM_SLOTS) {
		vhost_warn("memory table full (%u regions)", m->nregions);
		ret = -ENOSPC;
		goto close_fd;
	}
	if (reg->size == 0 || reg->guest_addr > UINT64_MAX - reg->size ||
	    reg->user_addr > UINT64_MAX - reg->size ||
	    reg->mmap_offset > (uint64_t)INT64_MAX - reg->size || reg->size > SIZE_MAX / 2) {
		vhost_warn("bad memory region gpa 0x%llx size 0x%llx uva 0x%llx off 0x%llx",
			   (unsigned long long)reg->guest_addr, (unsigned long long)reg->size,
			   (unsigned long long)reg->user_addr,
			   (unsigned long long)reg->mmap_offset);
		ret = -EINVAL;
		goto close_fd;
	}
	for (unsigned i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *o = &m->r[i];

		if (reg->guest_addr < o->gpa + o->size && o->gpa < reg->guest_addr + reg->size) {
			vhost_warn("memory region at gpa 0x%llx overlaps another",
				   (unsigned long long)reg->guest_addr);
			ret = -EINVAL;
			goto close_fd;
		}
	}
	/* Accessing a MAP_SHARED page beyond the end of a file raises SIGBUS:
	 * only map regular files (memfd, tmpfs, hugetlbfs) large enough. The
	 * front-end could still shrink the file later; that is its own guest. */
	if (fstat(fd, &st) < 0) {
		ret = -errno;
		goto close_fd;
	}
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < reg->mmap_offset + reg->size) {
		vhost_warn("memory region fd is not a regular file covering offset 0x%llx + 0x%llx",
			   (unsigned long long)reg->mmap_offset, (unsigned long long)reg->size);
		ret = -EINVAL;
		goto close_fd;
	}

	aligned = reg->mmap_offset & ~(uint64_t)(page - 1);
	delta = reg->mmap_offset - aligned;
	len = (size_t)(reg->size + delta);
	addr =
	    mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, (off_t)aligned);
	if (addr == MAP_FAILED && errno == EINVAL) {
		/* hugetlbfs wants huge-page aligned offsets: map from 0. */
		delta = reg->mmap_offset;
		len = (size_t)(reg->size + delta);
		addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
	}
	if (addr == MAP_FAILED) {
		ret = -errno;
		vhost_warn("mmap of memory region failed: %s", strerror(-ret));
		goto close_fd;
	}
	close(fd);
	/* Guest memory has no place in our core dumps. */
	madvise(addr, len, MADV_DONTDUMP);

	r = &m->r[m->nregions++];
	r->gpa = reg->guest_addr;
	r->size = reg->size;
	r->uva = reg->user_addr;
	r->map_addr = addr;
	r->map_len = len;
	r->host = (uint8_t *)addr + delta;
	return 0;

close_fd:
	close(fd);
	return ret;
}

/*
 * REM_MEM_REG: the region is identified by guest address, user address and
 * size (mmap_offset is ignored). 0, -ENOENT or -ENOMEM.
 */
int vhost_mem_remove(struct vhost_dev *dev, const struct vu_mem_region *reg)
{
	struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nregions; i++) {
		struct vhost_mem_region *r = &m->r[i];

		if (r->gpa != reg->guest_addr || r->size != reg->size || r->uva != reg->user_addr)
			continue;
		if (mem_retire(dev, r->map_addr, r->map_len) < 0)
			return -ENOMEM;
		memmove(r, r + 1, (m->nregions - i - 1) * sizeof(*r));
		m->nregions--;
		return 0;
	}
	return -ENOENT;
}

/* Drop every region (SET_MEM_TABLE replaces the table). 0 or -ENOMEM (table unchanged). */
int vhost_mem_clear(struct vhost_dev *dev)
{
	struct vhost_mem *m = &dev->mem;

	if (mem_reserve_retired(dev, m->nregions) < 0)
		return -ENOMEM;
	for (unsigned i = 0; i < m->nregions; i++)
		mem_retire(dev, m->r[i].map_addr, m->r[i].map_len);
	m->nregions = 0;
	return 0;
}

/* Unmap everything (the connection is gone and nothing is in flight). */
void vhost_mem_free(struct vhost_dev *dev)
{
	struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nregions; i++)
		munmap(m->r[i].map_addr, m->r[i].map_len);
	m->nregions = 0;
	vhost_mem_release_retired(dev);
	free(m->retired);
	m->retired = NULL;
	m->retired_cap = 0;
}

unsigned vhost_dev_mem_regions(const struct vhost_dev *dev, struct iovec *iov, unsigned max)
{
	const struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nregions && i < max; i++) {
		iov[i].iov_base = m->r[i].host;
		iov[i].iov_len = (size_t)m->r[i].size;
	}
	return m->nregions;
}

void *vhost_gpa_to_host(const struct vhost_dev *dev, uint64_t gpa, uint64_t *len)
{
	const struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *r = &m->r[i];
		uint64_t off;

		if (gpa < r->gpa)
			continue;
		off = gpa - r->gpa;
		if (off >= r->size)
			continue;
		if (*len > r->size - off)
			*len = r->size - off;
		return r->host + off;
	}
	return NULL;
}

void *vhost_uva_to_host(const struct vhost_dev *dev, uint64_t uva, uint64_t len)
{
	const struct vhost_mem *m = &dev->mem;

	for (unsigned i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *r = &m->r[i];
		uint64_t off;

		if (uva < r->uva)
			continue;
		off = uva - r->uva;
		if (off >= r->size || len > r->size - off)
			continue;
		return r->host + off;
	}
	return NULL;
}

bool vhost_gpa_mapped(const struct vhost_dev *dev, uint64_t gpa, uint64_t len)
{
	if (len && gpa > UINT64_MAX - (len - 1))
		return false;
	while (len) {
		uint64_t chunk = len;

		if (!vhost_gpa_to_host(dev, gpa, &chunk))
			return false;
		len -= chunk;
		gpa += chunk;
	}
	return true;
}

int vhost_gpa_read(const struct vhost_dev *dev, uint64_t gpa, void *buf, size_t len)
{
	uint8_t *out = buf;

	if (len && gpa > UINT64_MAX - (len - 1))
		return -EFAULT;
	while (len) {
		uint64_t chunk = len;
		void *p = vhost_gpa_to_host(dev, gpa, &chunk);

		if (!p)
			return -EFAULT;
		memcpy(out, p, chunk);
		out += chunk;
		len -= chunk;
		gpa += chunk;
	}
	return 0;
}
