/* SPDX-License-Identifier: MIT */
/*
 * src/sandbox.c — the seccomp allow-list installed after start-up.
 *
 * What the daemon does once it serves, and so what is allowed:
 *  - image I/O: io_uring_enter/register (and _setup for later rings), plus
 *    the synchronous calls io/ and the formats use: read/write and their
 *    positioned and vector forms, fallocate, fsync/fdatasync, ftruncate,
 *    lseek, fstat/newfstatat/statx, fstatfs (file system type), fcntl (flags,
 *    OFD locks), flock,
 *    fadvise64, close, unlink (our socket at exit); ioctl only BLKGETSIZE64/BLKSSZGET/BLKPBSZGET
 * (block device sizes on SIGHUP) and TCGETS (isatty);
 *  - reopening files (openat: images re-opened for migration and snapshots);
 *  - connections: accept4, recvmsg/sendmsg, sendto/recvfrom, shutdown,
 *    getsockopt (no socket(), connect() or bind(): nothing new is reached);
 *  - guest memory tables: mmap/munmap/mremap/mprotect/madvise of the memfds
 *    received, brk (malloc), memfd_create (the inflight area, GET_INFLIGHT_FD);
 *  - eventfds (eventfd2), signals (the signalfd is read; rt_sigreturn for
 *    our own handler, rt_sigprocmask), futex (also the I/O threads' mutex
 *    and condition variable), clock_gettime/nanosleep,
 *    getrandom, getpid/gettid, tgkill on ourselves (abort), exit/exit_group;
 *  - sysinfo: glibc's qsort (write-back sorts its batch, prefetch its tables)
 *    calls sysconf(_SC_PHYS_PAGES) the first time it sorts more than 1 KiB.
 * The I/O threads (--io-threads) are started before the filter, which is
 * installed on all threads at once (TSYNC): no thread is created after it,
 * and a thread's exit (munmap/madvise of its stack, exit) is on the list.
 * Not allowed, among everything else: execve, ptrace, fork/clone, kill,
 * socket/connect/bind, mount, setuid and friends, rt_sigaction (nobody can
 * replace the SIGSYS handler), prctl, personality, process_vm_*.
 *
 * A forbidden call gets SIGSYS (SCMP_ACT_TRAP) rather than EPERM: a call
 * outside this list is either a missing entry (a bug we want to see at
 * once, named in the log, not a mysterious EPERM deep in some path) or code
 * that is not ours (then continuing is the wrong answer). The handler writes
 * one line and _exits with 159, rather than SCMP_ACT_KILL_PROCESS, whose
 * core dump could hold guest memory and which leaves no line in our log.
 *
 * Sanitizer builds (VQCOW_SANITIZE) also allow what the ASan/LSan runtime
 * does at exit or on a report (LeakSanitizer stops the world with a clone()d
 * tracer thread and ptrace; reports read /proc and the ELF files), but still
 * not execve (the symbolizer then falls back to addresses).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <linux/fs.h>
#include <seccomp.h>
#include <termios.h>

#include "sandbox.h"

static const char *const allowed[] = {
    /* I/O and files */
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "lseek",
    "close",
    "openat",
    "open",
    "fstat",
    "newfstatat",
    "fstatfs",
    "statfs",
    "statx",
    "fcntl",
    "flock",
    "fallocate",
    "ftruncate",
    "fsync",
    "fdatasync",
    "fadvise64",
    "unlink",
    "unlinkat",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    /* connections */
    "accept4",
    "accept",
    "recvmsg",
    "sendmsg",
    "recvfrom",
    "sendto",
    "shutdown",
    "getsockopt",
    /* memory */
    "mmap",
    "memfd_create",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    /* events, signals, time */
    "eventfd2",
    "poll",
    "ppoll",
    "rt_sigreturn",
    "rt_sigprocmask",
    "futex",
    "sched_yield",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "restart_syscall",
    /* process */
    "getrandom",
    "getpid",
    "gettid",
    "exit",
    "exit_group",
    /* glibc's qsort asks sysconf(_SC_PHYS_PAGES) once, for arrays > 1 KiB */
    "sysinfo",
#ifdef VQCOW_SANITIZE
    /* the ASan/LSan/UBSan runtime: reports, leak check at exit */
    "clone",
    "clone3",
    "ptrace",
    "wait4",
    "waitid",
    "prctl",
    "getdents",
    "getdents64",
    "readlink",
    "readlinkat",
    "sched_getaffinity",
    "sigaltstack",
    "rt_sigaction",
    "getppid",
    "pipe2",
    "dup",
    "dup2",
    "dup3",
    "set_robust_list",
    "rseq",
    "uname",
    "getrlimit",
    "prlimit64",
    "setrlimit",
    "process_vm_readv",
    "lstat",
    "stat",
    "access",
    "faccessat",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "kill",
#endif
};

static void sigsys_handler(int sig, siginfo_t *si, void *uc)
{
	/* Async-signal-safe only: format the number by hand, write, _exit. */
	static const char head[] = "vqcowd: error: seccomp: forbidden system call ";
	static const char tail[] = " stopped; exiting (scmp_sys_resolver NUMBER names it; "
				   "--no-seccomp turns the filter off)\n";
	char num[16];
	int n = si->si_syscall, i = (int)sizeof(num);
	ssize_t w;

	(void)sig;
	(void)uc;
	do {
		num[--i] = (char)('0' + n % 10);
		n /= 10;
	} while (n > 0 && i > 0);
	w = write(STDERR_FILENO, head, sizeof(head) - 1);
	w = write(STDERR_FILENO, num + i, sizeof(num) - (size_t)i);
	w = write(STDERR_FILENO, tail, sizeof(tail) - 1);
	(void)w;
	_exit(SANDBOX_EXIT_STATUS);
}

int sandbox_install(char *err, unsigned errlen)
{
	struct sigaction sa;
	scmp_filter_ctx ctx;
	int ret;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = sigsys_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSYS, &sa, NULL) < 0) {
		ret = -errno;
		snprintf(err, errlen, "seccomp: SIGSYS handler: %s", strerror(errno));
		return ret;
	}
	ctx = seccomp_init(SCMP_ACT_TRAP);
	if (!ctx) {
		snprintf(err, errlen, "seccomp: cannot create a filter");
		return -ENOMEM;
	}
	for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++) {
		int nr = seccomp_syscall_resolve_name(allowed[i]);

		if (nr == __NR_SCMP_ERROR)
			continue; /* not on this architecture (open on arm64...) */
		ret = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
		if (ret < 0) {
			snprintf(err, errlen, "seccomp: rule for %s: %s", allowed[i],
				 strerror(-ret));
			goto release;
		}
	}
	/* ioctl: block device geometry and isatty only */
	{
		static const unsigned long reqs[] = {BLKGETSIZE64, BLKSSZGET, BLKPBSZGET, TCGETS};

		for (size_t i = 0; i < sizeof(reqs) / sizeof(reqs[0]); i++) {
			ret = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1,
					       SCMP_A1(SCMP_CMP_EQ, reqs[i]));
			if (ret < 0) {
				snprintf(err, errlen, "seccomp: ioctl rule: %s", strerror(-ret));
				goto release;
			}
		}
	}
	/* tgkill: only to ourselves (abort() raising SIGABRT) */
	ret = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1,
			       SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid()));
	if (ret < 0) {
		snprintf(err, errlen, "seccomp: tgkill rule: %s", strerror(-ret));
		goto release;
	}
#ifdef VQCOW_SANITIZE
	seccomp_attr_set(ctx, SCMP_FLTATR_CTL_LOG, 1);
#endif
	/* On every thread at once: the I/O threads (--io-threads) are
	 * started before the filter, so it needs no clone. */
	ret = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
	if (ret < 0) {
		snprintf(err, errlen, "seccomp: thread sync: %s", strerror(-ret));
		goto release;
	}
	ret = seccomp_load(ctx);
	if (ret < 0)
		snprintf(err, errlen, "seccomp: cannot load the filter: %s", strerror(-ret));
release:
	seccomp_release(ctx);
	return ret;
}
