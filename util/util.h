/* SPDX-License-Identifier: MIT */
/*
 * util/ — small helpers below every layer: the size parser of the programs
 * in src/ (vqcowd, vqcow-img), and the listening UNIX sockets that vhost/ and
 * qmp/ serve on. Knows nothing of the other modules and includes nothing of
 * ours.
 */
#ifndef VQCOW_UTIL_H
#define VQCOW_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

/*
 * Parse a byte count the way qemu-img 7.2 does (qemu_strtosz with bytes as
 * the default unit), so command lines users wrote for qemu-img work as is:
 *   - a decimal integer, optionally preceded by white space or '+';
 *     "0x..." is hexadecimal (no fraction then);
 *   - an optional fraction ("1.5G", "1.k"), allowed only with a suffix
 *     other than B; no exponent;
 *   - an optional suffix, case-insensitive: B (bytes), K, M, G, T, P, E
 *     (powers of 1024); nothing may follow it.
 * The result is rounded to the nearest byte (halves up).
 * 0 and *@out set, -EINVAL (not a size) or -ERANGE (above UINT64_MAX); the
 * caller checks its own bounds.
 */
int util_parse_size(const char *s, uint64_t *out);

/*
 * Parse a plain decimal integer: digits only (no sign, space or suffix).
 * 0 and *@out set, -EINVAL or -ERANGE.
 */
int util_parse_uint(const char *s, uint64_t *out);

/* A listening socket this process created at a path (util_unix_listen). */
struct util_sock {
	dev_t dev; /* the socket inode: unlink at exit only while it is ours */
	ino_t ino;
	bool replaced_stale; /* a dead process's socket was at the path */
};

/*
 * Create a listening UNIX stream socket at @path (non-blocking, close-on-exec,
 * mode 0600). The path appears only once the socket listens: it is bound and
 * put into listen() under a temporary name in the same directory, then
 * renamed to @path without replacing anything, so a client that connects as
 * soon as it sees the path is never refused. A socket already at @path is
 * replaced only if nobody has listened on it for about a second (a process
 * killed with SIGKILL accepts for a few milliseconds more); this may sleep up
 * to 1.3 s. Returns the fd and fills @out, or -EADDRINUSE (someone listens
 * there), -EEXIST (@path is not a socket), -ENAMETOOLONG, -errno.
 */
int util_unix_listen(const char *path, struct util_sock *out);

/* Unlink @path if it is still the socket @own describes: 0, -ESTALE (another
 * process replaced it: left in place) or -errno. */
int util_unix_unlink_own(const char *path, const struct util_sock *own);

/* Check that @fd (inherited: systemd socket activation) is a listening
 * stream socket and make it non-blocking and close-on-exec. 0, -ENOTCONN
 * (not a listening stream socket) or -errno. */
int util_adopt_listener(int fd);

/* CLOCK_MONOTONIC now, in ns: the clock of the programs' timeouts and logs. */
static inline uint64_t util_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif /* VQCOW_UTIL_H */
