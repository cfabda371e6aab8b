/* SPDX-License-Identifier: MIT */
/*
 * io/ files: open with O_DIRECT and alignment discovery, sizes, synchronous
 * helpers for open time and tools.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "io_internal.h"
#include "vlog.h"

/* statfs(2) f_type of FUSE mounts (linux/magic.h) */
#ifndef FUSE_SUPER_MAGIC
#define FUSE_SUPER_MAGIC 0x65735546
#endif

/* glibc 2.36 predates the direct-I/O alignment fields of struct statx. */
#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif
#define STATX_DIO_MEM_ALIGN_OFF    0x98 /* __u32 stx_dio_mem_align */
#define STATX_DIO_OFFSET_ALIGN_OFF 0x9c /* __u32 stx_dio_offset_align */
#define IO_DEFAULT_ALIGN           4096u

static bool is_pow2(unsigned long x)
{
	return x && !(x & (x - 1));
}

/*
 * Direct-I/O alignment of @fd: statx(STATX_DIOALIGN) when the kernel fills it
 * in, else the logical block size of a block device, else 4096. Returns 0 if
 * the kernel says the file does not support direct I/O at all.
 */
static unsigned dio_align(int fd, bool blockdev)
{
	unsigned char stx[256] __attribute__((aligned(8)));
	unsigned align = 0;

	memset(stx, 0, sizeof(stx));
	if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, (struct statx *)stx) == 0) {
		uint32_t mask, mem, offa;

		memcpy(&mask, stx, sizeof(mask));
		memcpy(&mem, stx + STATX_DIO_MEM_ALIGN_OFF, sizeof(mem));
		memcpy(&offa, stx + STATX_DIO_OFFSET_ALIGN_OFF, sizeof(offa));
		if (mask & STATX_DIOALIGN) {
			if (mem == 0 || offa == 0)
				return 0;
			align = mem > offa ? mem : offa;
		}
	}
	if (!align && blockdev) {
		int ssz = 0;

		if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
			align = (unsigned)ssz;
	}
	if (!align || !is_pow2(align))
		align = IO_DEFAULT_ALIGN;
	return align;
}

/*
 * A block device's queue/write_zeroes_max_bytes (sysfs); a partition has no
 * queue/ of its own: its disk's (the parent directory). 0 when unknown.
 */
static uint64_t write_zeroes_max(dev_t rdev)
{
	static const char *const rel[] = {"queue", "../queue"};

	for (unsigned i = 0; i < 2; i++) {
		char path[128];
		unsigned long long v = 0;
		FILE *fp;
		int n;

		snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/%s/write_zeroes_max_bytes",
			 major(rdev), minor(rdev), rel[i]);
		fp = fopen(path, "re");
		if (!fp)
			continue;
		n = fscanf(fp, "%llu", &v);
		fclose(fp);
		return n == 1 ? (uint64_t)v : 0;
	}
	return 0;
}

static int file_setup(struct io_file *f, int fd, unsigned flags, const char *name)
{
	struct stat st;
	int fl, ret;

	f->fd = fd;
	f->bfd = -1;
	memset(f->fixed, 0, sizeof(f->fixed));
	memset(&f->lock, 0, sizeof(f->lock));
	f->flags = flags & (IO_FILE_RDONLY | IO_FILE_ZERO_EOF);
	f->align = 1;
	f->size = 0;
	f->pc_written = 0;
	f->pc_peer = NULL;
	f->sync_err = 0;
	f->wz_max = 0;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		f->flags |= IO_FILE_BLOCKDEV;
		f->wz_max = write_zeroes_max(st.st_rdev);
	} else if (!S_ISREG(st.st_mode))
		return -EINVAL;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -errno;
	if ((fl & O_ACCMODE) == O_RDONLY)
		f->flags |= IO_FILE_RDONLY;
	if (fl & O_DIRECT) {
		unsigned align = dio_align(fd, f->flags & IO_FILE_BLOCKDEV);

		if (align) {
			f->flags |= IO_FILE_DIRECT;
			f->align = align;
		} else if (fcntl(fd, F_SETFL, fl & ~O_DIRECT) == 0) {
			vlog(VLOG_WARN, "io", "%s: no direct I/O support, using buffered I/O",
			     name);
		} else {
			return -errno;
		}
	}
	if (!(f->flags & IO_FILE_BLOCKDEV)) {
		struct statfs sfs;

		if (fstatfs(fd, &sfs) == 0 && sfs.f_type == FUSE_SUPER_MAGIC) {
			f->flags |= IO_FILE_NO_ZERO_RANGE;
			vlog(VLOG_INFO, "io",
			     "%s: on a FUSE file system: zeroing without FALLOC_FL_ZERO_RANGE",
			     name);
		}
	}
	if (!(f->flags & (IO_FILE_DIRECT | IO_FILE_RDONLY)))
		f->pc_written = 1; /* every write goes through the page cache */
	ret = io_file_get_size(f, &f->size);
	if (ret < 0)
		return ret;
	/* The buffered twin is opened by path (/proc/self/fd): open it now,
	 * while we may (vqcowd drops to --user after opening its files, and
	 * that user need not have access to the image itself). Failing here
	 * is not fatal: the first unaligned write tries again. */
	if ((f->flags & (IO_FILE_DIRECT | IO_FILE_RDONLY)) == IO_FILE_DIRECT)
		io_file_open_buffered(f);
	return 0;
}

int io_file_open(struct io_file *f, const char *path, unsigned flags)
{
	/*
	 * O_NONBLOCK: a FIFO (or a device that waits for a carrier) named by a
	 * hostile image must not hang the open; anything that is not a regular
	 * file or block device is refused right after (file_setup). O_NOCTTY:
	 * never acquire a terminal.
	 */
	int oflags =
	    O_CLOEXEC | O_NONBLOCK | O_NOCTTY | ((flags & IO_FILE_RDONLY) ? O_RDONLY : O_RDWR);
	int fd, fl, ret;

	f->fd = -1;
	f->bfd = -1;
	fd = open(path, oflags | ((flags & IO_FILE_DIRECT) ? O_DIRECT : 0));
	if (fd < 0 && errno == EINVAL && (flags & IO_FILE_DIRECT)) {
		vlog(VLOG_WARN, "io", "%s: O_DIRECT refused (EINVAL), using buffered I/O", path);
		fd = open(path, oflags);
	}
	if (fd < 0)
		return -errno;
	ret = file_setup(f, fd, flags, path);
	if (ret < 0)
		goto err_close;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		ret = -errno;
		goto err_close;
	}
	return 0;

err_close:
	if (f->bfd > 0)
		close(f->bfd);
	f->bfd = -1;
	close(fd);
	f->fd = -1;
	return ret;
}

int io_file_from_fd(struct io_file *f, int fd, unsigned flags)
{
	int ret = file_setup(f, fd, flags, "fd");

	if (ret < 0) {
		close(fd);
		f->fd = -1;
	}
	return ret;
}

void io_file_close(struct io_file *f)
{
	io_loop_file_closing(f);
	io_lock_release(f->fd, &f->lock);
	if (f->bfd > 0)
		close(f->bfd);
	if (f->fd >= 0)
		close(f->fd);
	f->bfd = -1;
	f->fd = -1;
}

int io_file_reopen_rw(struct io_file *f, const char *path, unsigned perm, unsigned shared,
		      char *err, size_t errlen)
{
	struct io_lock nl = {0}, old = f->lock;
	struct stat a, b;
	int fd, fl, ret;

	if (err && errlen)
		err[0] = '\0';
	if (!(f->flags & IO_FILE_RDONLY))
		return io_file_lock(f, perm, shared, err, errlen);
	fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK |
			    ((f->flags & IO_FILE_DIRECT) ? O_DIRECT : 0));
	if (fd < 0) {
		ret = -errno;
		if (err)
			snprintf(err, errlen, "Could not reopen file: %s", strerror(-ret));
		return ret;
	}
	if (fstat(fd, &a) < 0 || fstat(f->fd, &b) < 0 || a.st_dev != b.st_dev ||
	    a.st_ino != b.st_ino) {
		if (err)
			snprintf(err, errlen, "Could not reopen file: it was replaced");
		close(fd);
		return -ESTALE;
	}
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	/* our own old description must not look like another user: it shares
	 * everything while the new one checks and takes its locks */
	io_lock_set(f->fd, &f->lock, old.perm, IO_PERM_ALL, NULL, 0);
	ret = io_lock_set(fd, &nl, perm, shared, err, errlen);
	if (ret < 0) {
		close(fd);
		if (io_lock_set(f->fd, &f->lock, old.perm, IO_PERM_ALL & ~old.unshared, NULL, 0) <
		    0)
			vlog(VLOG_WARN, "io", "%s: could not restore the read-only locks", path);
		return ret;
	}
	/* the old description, and its locks, go */
	io_loop_file_closing(f);
	io_lock_release(f->fd, &f->lock);
	close(f->fd);
	f->fd = fd;
	f->lock = nl;
	f->flags &= ~IO_FILE_RDONLY;
	if (f->flags & IO_FILE_DIRECT)
		io_file_open_buffered(f);
	else
		io_file_pc_write(f); /* as file_setup() says of a writable one */
	return 0;
}

int io_file_reopen(const struct io_file *f, struct io_file *nf)
{
	char path[64];

	if (f->flags & IO_FILE_RDONLY)
		return -EBADF;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", f->fd);
	return io_file_open(nf, path, 0);
}

int io_file_open_buffered(struct io_file *f)
{
	char path[64];
	int fd;

	int cur;

	/* bfd 0 counts as "not open": a zeroed struct must not write to stdin.
	 * I/O threads of a raw image may get here at once: the first to
	 * publish its fd wins, the others close theirs. */
	cur = __atomic_load_n(&f->bfd, __ATOMIC_ACQUIRE);
	if (cur > 0)
		return 0;
	if (f->flags & IO_FILE_RDONLY)
		return -EBADF;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", f->fd);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fd == 0) {
		int fd2 = fcntl(fd, F_DUPFD_CLOEXEC, 3);

		close(fd);
		if (fd2 < 0)
			return -errno;
		fd = fd2;
	}
	if (!__atomic_compare_exchange_n(&f->bfd, &cur, fd, false, __ATOMIC_ACQ_REL,
					 __ATOMIC_ACQUIRE))
		close(fd);
	return 0;
}

int io_file_truncate(struct io_file *f, uint64_t size)
{
	if (ftruncate(f->fd, (off_t)size) < 0)
		return -errno;
	return 0;
}

int io_file_get_size(struct io_file *f, uint64_t *size)
{
	struct stat st;

	if (f->flags & IO_FILE_BLOCKDEV) {
		uint64_t sz;

		if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0)
			return -errno;
		*size = sz;
		return 0;
	}
	if (fstat(f->fd, &st) < 0)
		return -errno;
	*size = (uint64_t)st.st_size;
	return 0;
}

static bool aligned(const struct io_file *f, uintptr_t a, uint64_t b, uint64_t c)
{
	uint64_t m = f->align - 1;

	return !((a | b | c) & m);
}

/* pread until @len is done; zero-fill from EOF on. 0 or -errno. */
static int pread_full(const struct io_file *f, char *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(f->fd, buf + done, len - done, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		done += (size_t)n;
		/* A short O_DIRECT read ending off-alignment stopped at EOF. */
		if (n == 0 || (f->align > 1 && (n & (f->align - 1)))) {
			memset(buf + done, 0, len - done);
			return 0;
		}
	}
	return 0;
}

static int pwrite_full(int fd, const char *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		done += (size_t)n;
	}
	return 0;
}

static bool range_ok(size_t len, uint64_t off)
{
	return len <= (size_t)SSIZE_MAX && off <= (uint64_t)INT64_MAX - len;
}

int io_file_pread_sync(struct io_file *f, void *buf, size_t len, uint64_t off)
{
	uint64_t a0, a1;
	char *b;
	int ret;

	if (!range_ok(len, off))
		return -EINVAL;
	if (len == 0)
		return 0;
	if (aligned(f, (uintptr_t)buf, len, off))
		return pread_full(f, buf, len, off);
	a0 = off & ~(uint64_t)(f->align - 1);
	a1 = (off + len + f->align - 1) & ~(uint64_t)(f->align - 1);
	b = io_alloc_align(a1 - a0, f->align);
	if (!b)
		return -ENOMEM;
	ret = pread_full(f, b, a1 - a0, a0);
	if (ret == 0)
		memcpy(buf, b + (off - a0), len);
	io_free_aligned(b);
	return ret;
}

int io_file_pwrite_sync(struct io_file *f, const void *buf, size_t len, uint64_t off)
{
	char *b;
	int ret;

	if (f->flags & IO_FILE_RDONLY)
		return -EBADF;
	if (!range_ok(len, off))
		return -EINVAL;
	if (len == 0)
		return 0;
	if (aligned(f, (uintptr_t)buf, len, off))
		return pwrite_full(f->fd, buf, len, off);
	if (!aligned(f, 0, len, off)) {
		/* Offset or length off-alignment: the buffered twin fd. */
		ret = io_file_open_buffered(f);
		if (ret < 0)
			return ret;
		io_file_pc_write(f);
		return pwrite_full(f->bfd, buf, len, off);
	}
	b = io_alloc_align(len, f->align);
	if (!b)
		return -ENOMEM;
	memcpy(b, buf, len);
	ret = pwrite_full(f->fd, b, len, off);
	io_free_aligned(b);
	return ret;
}

int io_file_sync(struct io_file *f)
{
	return io_file_sync_done(f, fsync(f->fd) < 0 ? -errno : 0);
}

int io_file_sync_error(const struct io_file *f)
{
	return __atomic_load_n(&f->sync_err, __ATOMIC_ACQUIRE);
}

bool io_file_pc_written(const struct io_file *f)
{
	return __atomic_load_n(&f->pc_written, __ATOMIC_ACQUIRE) != 0;
}

void io_file_pc_share(struct io_file *f, struct io_file *peer)
{
	f->pc_peer = peer;
	if (io_file_pc_written(f))
		io_file_pc_write(peer);
}

int io_file_sync_done(struct io_file *f, int res)
{
	int none = 0;

	if (res >= 0) {
		int e = __atomic_load_n(&f->sync_err, __ATOMIC_ACQUIRE);

		return e ? e : res;
	}
	if (res == -EAGAIN || res == -EINTR || !__atomic_load_n(&f->pc_written, __ATOMIC_ACQUIRE))
		return res; /* O_DIRECT only: a later fdatasync may be believed */
	if (__atomic_compare_exchange_n(&f->sync_err, &none, res, false, __ATOMIC_ACQ_REL,
					__ATOMIC_ACQUIRE))
		vlog(VLOG_ERROR, "io",
		     "fdatasync failed (%s) after writes through the page cache: their data may "
		     "be lost, and a later fdatasync would not say so; every later one fails",
		     strerror(-res));
	return res;
}
