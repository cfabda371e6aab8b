// SPDX-License-Identifier: MIT
/*
 * The listening UNIX sockets of the daemon (vhost-user and QMP): created so
 * that the path exists only while something listens on it, never taken over
 * from a live owner, unlinked at exit only while it is still ours.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "util.h"

/* One connect(): 1 someone listens, 0 refused (stale), -errno unknown. A
 * full backlog (EAGAIN) still means a live listener. */
static int connect_probe(const struct sockaddr_un *sa)
{
	int fd, ret;

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0)
		ret = 1;
	else if (errno == EAGAIN || errno == EINPROGRESS)
		ret = 1;
	else if (errno == ECONNREFUSED)
		ret = 0;
	else
		ret = -errno;
	close(fd);
	return ret;
}

/*
 * A process killed with SIGKILL keeps accepting connections for a few
 * milliseconds: io_uring tears its requests down (and drops their file
 * references, the listening socket's among them) asynchronously after the
 * exit. So "live" must hold for about a second before we believe it; a few
 * probes only, each one is a connection the live owner will accept and see
 * closed at once.
 */
static int socket_is_live(const struct sockaddr_un *sa)
{
	unsigned wait_ms = 10;
	int ret;

	for (int i = 0;; i++, wait_ms *= 2) {
		ret = connect_probe(sa);
		if (ret <= 0 || i == 6)
			return ret;
		usleep(wait_ms * 1000); /* 10 ms .. 640 ms: 1.27 s in all */
	}
}

/* The temporary name, in the same directory as @path (so that rename()
 * publishes it atomically). -ENAMETOOLONG if it does not fit. */
static int temp_sock_name(const char *path, char *tmp, size_t size)
{
	const char *slash = strrchr(path, '/');
	int dirlen = slash ? (int)(slash - path) + 1 : 0;
	int n = snprintf(tmp, size, "%.*s.vqcowd-%ld.tmp", dirlen, path, (long)getpid());

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int util_unix_listen(const char *path, struct util_sock *out)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct sockaddr_un tsa = {.sun_family = AF_UNIX};
	size_t len = strlen(path);
	struct stat st;
	int fd, ret;

	out->replaced_stale = false;
	if (len >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, len + 1);
	ret = temp_sock_name(path, tsa.sun_path, sizeof(tsa.sun_path));
	if (ret < 0)
		return ret;
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return -EEXIST;
		/* Never take over a socket another process still serves: its
		 * clients would reach us or nobody, and its exit would unlink
		 * our socket. Replace only a stale one. */
		ret = socket_is_live(&sa);
		if (ret > 0)
			return -EADDRINUSE;
		if (ret < 0)
			return ret;
		if (unlink(path) < 0 && errno != ENOENT)
			return -errno;
		out->replaced_stale = true;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	unlink(tsa.sun_path); /* left by an earlier process with our pid */
	/* Linux creates the socket inode with the socket's mode & ~umask:
	 * restrict it before bind so it is never reachable by others. */
	if (fchmod(fd, 0600) < 0 || bind(fd, (struct sockaddr *)&tsa, sizeof(tsa)) < 0) {
		ret = -errno;
		goto close_fd;
	}
	if (lstat(tsa.sun_path, &st) < 0 || chmod(tsa.sun_path, 0600) < 0 || listen(fd, 16) < 0) {
		ret = -errno;
		goto unlink_tmp;
	}
	/* Publish: never over a socket someone created since the check above. */
	if (renameat2(AT_FDCWD, tsa.sun_path, AT_FDCWD, path, RENAME_NOREPLACE) < 0) {
		ret = -errno;
		if (ret == -EINVAL || ret == -ENOSYS) {
			/* File system without RENAME_NOREPLACE: plain rename. */
			ret = rename(tsa.sun_path, path) < 0 ? -errno : 0;
		}
		if (ret == -EEXIST)
			ret = -EADDRINUSE; /* someone took the path meanwhile */
		if (ret < 0)
			goto unlink_tmp;
	}
	out->dev = st.st_dev;
	out->ino = st.st_ino;
	return fd;

unlink_tmp:
	unlink(tsa.sun_path);
close_fd:
	close(fd);
	return ret;
}

int util_unix_unlink_own(const char *path, const struct util_sock *own)
{
	struct stat st;

	if (lstat(path, &st) < 0)
		return -errno;
	if (!S_ISSOCK(st.st_mode) || st.st_dev != own->dev || st.st_ino != own->ino)
		return -ESTALE;
	return unlink(path) < 0 ? -errno : 0;
}

int util_adopt_listener(int fd)
{
	int acc = 0, type = 0, fl;
	socklen_t len = sizeof(acc);

	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) < 0)
		return errno == ENOTSOCK ? -ENOTCONN : -errno;
	len = sizeof(type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
		return errno == ENOTSOCK ? -ENOTCONN : -errno;
	if (!acc || type != SOCK_STREAM)
		return -ENOTCONN; /* not a listening stream socket */
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	fl = fcntl(fd, F_GETFD);
	if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0)
		return -errno;
	return 0;
}
