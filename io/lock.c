/* SPDX-License-Identifier: MIT */
/*
 * io/lock.c — image locks compatible with QEMU's file-posix driver.
 *
 * QEMU describes what a user of a file does with four permissions (consistent
 * read, write, write-unchanged, resize) and, for each, whether it lets others
 * have it too ("shared"). A process announces them with open file description
 * (OFD) byte-range read locks, which any number of holders can share:
 *
 *   byte 100 + i   held: "I use permission i"
 *   byte 200 + i   held: "I do not share permission i"
 *
 * with i = 0 consistent read, 1 write, 2 write unchanged, 3 resize (QEMU's
 * BLK_PERM_* bit numbers; libvirt keeps byte 0 for itself). Nobody ever takes
 * a write lock: conflicts are found by asking (F_OFD_GETLK) whether a write
 * lock on a byte could be taken, i.e. whether any other open file description
 * holds it. Our own locks never conflict with themselves (same description).
 *
 * Changing the set follows QEMU's order, so that two processes starting at
 * the same moment cannot both miss each other:
 *   1. lock the bytes of the old and the new sets together;
 *   2. check: for each permission we want, nobody may hold its "not shared"
 *      byte; for each permission we do not share, nobody may hold its "use"
 *      byte;
 *   3. on success unlock what only the old set needed; on failure unlock
 *      what only the new set needed (back to the old set).
 * The error text is QEMU's: Failed to get "write" lock / Failed to get
 * shared "write" lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "io.h"

#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200
#define NPERMS           4

static const char *const perm_names[NPERMS] = {"consistent read", "write", "write unchanged",
					       "resize"};

const char *io_perm_name(unsigned perm)
{
	for (unsigned i = 0; i < NPERMS; i++)
		if (perm == 1u << i)
			return perm_names[i];
	return "?";
}

static int byte_lock(int fd, int off, short type)
{
	struct flock fl;

	memset(&fl, 0, sizeof(fl));
	fl.l_type = type;
	fl.l_whence = SEEK_SET;
	fl.l_start = off;
	fl.l_len = 1;
	while (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

/* 1 if another open file description holds a lock on byte @off, 0 if not, or -errno. */
static int byte_taken(int fd, int off)
{
	struct flock fl;

	memset(&fl, 0, sizeof(fl));
	fl.l_type = F_WRLCK;
	fl.l_whence = SEEK_SET;
	fl.l_start = off;
	fl.l_len = 1;
	while (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return fl.l_type != F_UNLCK;
}

/*
 * Make the held bytes exactly (@perm, @unshared), starting from what @l says
 * is held. Unlocking never fails in practice; its errors are ignored (the
 * bytes stay recorded as held and are dropped at close).
 */
static int apply(int fd, struct io_lock *l, unsigned perm, unsigned unshared, char *err,
		 size_t errlen)
{
	for (unsigned i = 0; i < NPERMS; i++) {
		unsigned bit = 1u << i;

		for (unsigned k = 0; k < 2; k++) {
			uint8_t *held = k ? &l->unshared : &l->perm;
			unsigned want = k ? unshared : perm;
			int off = (k ? LOCK_SHARED_BASE : LOCK_PERM_BASE) + (int)i;
			int ret;

			if ((want & bit) && !(*held & bit)) {
				ret = byte_lock(fd, off, F_RDLCK);
				if (ret < 0) {
					if (err)
						snprintf(err, errlen, "Failed to lock byte %d: %s",
							 off, strerror(-ret));
					return ret;
				}
				*held |= (uint8_t)bit;
			} else if (!(want & bit) && (*held & bit)) {
				if (byte_lock(fd, off, F_UNLCK) == 0)
					*held &= (uint8_t)~bit;
			}
		}
	}
	return 0;
}

static int check(int fd, unsigned perm, unsigned unshared, char *err, size_t errlen)
{
	for (unsigned i = 0; i < NPERMS; i++) {
		int ret;

		if (!(perm & (1u << i)))
			continue;
		ret = byte_taken(fd, LOCK_SHARED_BASE + (int)i);
		if (ret) {
			if (err && ret > 0)
				snprintf(err, errlen,
					 "Failed to get \"%s\" lock: locked by another process",
					 perm_names[i]);
			else if (err)
				snprintf(err, errlen, "Failed to test byte %d: %s",
					 LOCK_SHARED_BASE + (int)i, strerror(-ret));
			return ret > 0 ? -EAGAIN : ret;
		}
	}
	for (unsigned i = 0; i < NPERMS; i++) {
		int ret;

		if (!(unshared & (1u << i)))
			continue;
		ret = byte_taken(fd, LOCK_PERM_BASE + (int)i);
		if (ret) {
			if (err && ret > 0)
				snprintf(err, errlen,
					 "Failed to get shared \"%s\" lock: locked by another "
					 "process",
					 perm_names[i]);
			else if (err)
				snprintf(err, errlen, "Failed to test byte %d: %s",
					 LOCK_PERM_BASE + (int)i, strerror(-ret));
			return ret > 0 ? -EAGAIN : ret;
		}
	}
	return 0;
}

int io_lock_set(int fd, struct io_lock *l, unsigned perm, unsigned shared, char *err, size_t errlen)
{
	unsigned unshared = ~shared & IO_PERM_ALL;
	unsigned old_perm = l->perm, old_unshared = l->unshared;
	int ret;

	if (err && errlen)
		err[0] = '\0';
	perm &= IO_PERM_ALL;
	if ((perm & ~old_perm) == 0 && (unshared & ~old_unshared) == 0) {
		/* Only giving things up: nothing to check. */
		apply(fd, l, perm, unshared, NULL, 0);
		return 0;
	}
	ret = apply(fd, l, old_perm | perm, old_unshared | unshared, err, errlen);
	if (ret == 0)
		ret = check(fd, perm, unshared, err, errlen);
	if (ret < 0) {
		apply(fd, l, old_perm, old_unshared, NULL, 0);
		return ret;
	}
	apply(fd, l, perm, unshared, NULL, 0);
	return 0;
}

void io_lock_release(int fd, struct io_lock *l)
{
	if (fd >= 0)
		apply(fd, l, 0, 0, NULL, 0);
	l->perm = 0;
	l->unshared = 0;
}

int io_file_lock(struct io_file *f, unsigned perm, unsigned shared, char *err, size_t errlen)
{
	return io_lock_set(f->fd, &f->lock, perm, shared, err, errlen);
}
