/* SPDX-License-Identifier: MIT */
/*
 * io/ — the io_uring event loop and file I/O.
 *
 * Knows nothing of virtio or qcow2. One struct io_loop per I/O thread; every
 * event the daemon waits for is a completion on that loop's ring: readiness of
 * the vhost-user socket and of kick eventfds (poll), file reads and writes,
 * fallocate, fdatasync and timers.
 *
 * Contract of a command (struct io_cmd):
 *  - The caller embeds a struct io_cmd in its own request structure, sets
 *    ->done (and ->priv if it likes) and calls one of the io_*() submitters.
 *  - Each submitted command ends in exactly one call of ->done(cmd, res), from
 *    io_loop_run*() — never from inside the submitter itself, so callers may
 *    submit while holding half-built state.
 *  - res is the full transfer length (readv/writev), 0 (fsync, fallocate,
 *    timeout expiry), the poll revents mask (poll) or -errno.
 *  - Short reads/writes are advanced and resubmitted inside io/ until the full
 *    length is done; a read hitting EOF completes the rest with zeroes only for
 *    files opened with IO_FILE_ZERO_EOF, else -EIO.
 *  - A full submission queue is submitted and retried, never reported; -EAGAIN
 *    from the kernel is retried; -EINTR likewise.
 *  - Submitting a command that is still in flight is a programming error
 *    (io/ aborts); zero-initialise command structs before first use.
 *  - While a command is in flight, the command struct and the iovec array it
 *    was given belong to io/ (the iovec array may be modified while advancing
 *    over short transfers) and the data buffers must stay valid.
 *
 * O_DIRECT: struct io_file knows the file's direct-I/O alignment. readv/writev
 * pass the caller's iovecs to the kernel as they are when every base and length
 * (and the offset) is aligned; otherwise io/ uses an aligned bounce buffer for
 * that command (copy in before a write, copy out after a read). A write whose
 * offset or total length is off-alignment goes instead through a buffered
 * (non-O_DIRECT) twin fd of the same file (opened on first need via
 * /proc/self/fd), which keeps exact file-size semantics; the kernel keeps page
 * cache and direct I/O coherent and io_fdatasync() covers both. Callers must
 * still not have two writes in flight that touch the same alignment block.
 *
 * Limits: one command moves at most INT_MAX bytes and at most 65535 iovecs
 * (-EINVAL otherwise); more than 1024 iovecs go through a bounce buffer.
 *
 * Threading: a loop and everything submitted on it belong to one thread. The
 * one exception is io_post_remote(): any thread may post a command to a loop
 * that enabled it, and the command's done() then runs on the loop's thread.
 */
#ifndef VQCOW_IO_H
#define VQCOW_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct io_loop;
struct io_cmd;

typedef void io_done_fn(struct io_cmd *cmd, int res);

enum io_op {
	IO_OP_NONE = 0,
	IO_OP_READV,
	IO_OP_WRITEV,
	IO_OP_FDATASYNC,
	IO_OP_FALLOCATE,
	IO_OP_POLL,
	IO_OP_TIMEOUT,
	IO_OP_CANCEL,
	IO_OP_POST,
};

/* OFD lock bytes held on a file (io_lock_set); zero = none. */
struct io_lock {
	uint8_t perm;     /* IO_PERM_* whose "use" byte (100 + i) is held */
	uint8_t unshared; /* IO_PERM_* whose "not shared" byte (200 + i) is held */
};

/* Loops that may have files registered at once (more are fine: by fd). */
#define IO_FIXED_LOOPS 32

struct io_file {
	int fd;
	unsigned align; /* O_DIRECT alignment of offsets, lengths, buffers (1 if buffered) */
	unsigned flags; /* IO_FILE_* */
	uint64_t size;  /* size at open time (bytes) */
	/* A block device's write-zeroes offload, read from sysfs at open
	 * (queue/write_zeroes_max_bytes; the whole disk's for a partition):
	 * > 0 where the device zeroes a range without being sent the zeroes
	 * (fallocate PUNCH_HOLE there never falls back to writing them);
	 * 0 for a regular file, no offload, or unknown. */
	uint64_t wz_max;
	int bfd; /* private: buffered (non-O_DIRECT) twin fd, or -1 (0 = none too) */
	/* private: nonzero once a write may have gone through the page cache
	 * (the buffered twin fd, or a file without O_DIRECT); atomic */
	int pc_written;
	/* private: another handle of the same file whose fdatasyncs cover this
	 * one's writes: marked page-cache written too (io_file_pc_share) */
	struct io_file *pc_peer;
	/* private: the first fdatasync error after such a write, sticky (0 =
	 * none; io_file_sync_error); atomic */
	int sync_err;
	/* private to io/: per loop (by the loop's fixed-file id), its registered
	 * slot + 1, 0 = not tried, -1 = the loop's table refused it */
	int fixed[IO_FIXED_LOOPS];
	struct io_lock lock; /* image locks held through fd (io_file_lock) */
};

enum {
	IO_FILE_RDONLY = 1u << 0,
	IO_FILE_DIRECT = 1u << 1,   /* opened with O_DIRECT */
	IO_FILE_ZERO_EOF = 1u << 2, /* reads past EOF return zeroes (e.g. backing files) */
	IO_FILE_BLOCKDEV = 1u << 3,
	/* Do not use fallocate(FALLOC_FL_ZERO_RANGE): the file is on a FUSE
	 * file system, where the kernel passes the mode on and the server may
	 * ignore it (GlusterFS 10.3 allocates and answers 0 without zeroing).
	 * Callers zero another way (PUNCH_HOLE, or writing zeroes). */
	IO_FILE_NO_ZERO_RANGE = 1u << 4,
};

struct io_cmd {
	io_done_fn *done; /* set by the caller; called exactly once */
	void *priv;       /* the caller's */

	/* Private to io/ from here on. */
	struct io_cmd *next;
	struct io_loop *loop;
	struct io_file *file;
	int fd;
	uint8_t op;
	uint8_t state;
	uint16_t iovcnt;
	uint32_t poll_events;
	int mode;
	struct iovec *iov;
	uint64_t off;
	uint64_t len;
	uint64_t xfer;
	void *bounce;
	uint64_t ns;
	struct io_cmd *target; /* IO_OP_CANCEL */
	uint64_t ts[2];        /* __kernel_timespec storage for timeouts */
	struct iovec iov1;     /* the iovec of io_read()/io_write() */
	uint64_t boff;         /* file offset of the bounce buffer */
	uint64_t blen;         /* length of the bounce transfer */
	uint32_t cap;          /* injected cap on each kernel transfer (0 = none) */
	int res;               /* result of a locally completed command */
	uint8_t flags;
	int8_t bclass; /* bounce size class, -1 = allocated for this command */
};

/* ---- loop life cycle ---- */

/*
 * Create a loop with a ring of @entries SQEs (0 = 128; clamped to 4096) and a
 * CQ four times as large. Any number of commands may be submitted: at most
 * one CQ's worth is in the kernel at a time, the rest wait inside io/ in
 * submission order. 0 or -errno (e.g. -ENOSYS/-EPERM without io_uring).
 */
int io_loop_init(struct io_loop **loopp, unsigned entries);

/*
 * Destroy the loop. All commands must have completed (or be abandoned polls,
 * whose done() is then never called). Safe on NULL.
 */
void io_loop_exit(struct io_loop *loop);

/*
 * Run until io_loop_stop() is called: submit, wait, reap, run deferred hooks.
 * Also returns when nothing is in flight any more (nothing could wake it).
 * Returns 0, or -errno if the ring itself fails.
 */
int io_loop_run(struct io_loop *loop);

/*
 * One iteration: submit pending SQEs, reap completions (waiting for at least
 * one if @wait and something is in flight), call their done()s, then the
 * deferred hooks. Returns the number of completions handled (CQEs reaped,
 * including intermediate ones such as short transfers) or -errno; -EBUSY if
 * called from inside a done() or hook. For tests and tools.
 */
int io_loop_run_once(struct io_loop *loop, bool wait);

/* Make io_loop_run() return after the current iteration. Callable from done(). */
void io_loop_stop(struct io_loop *loop);

/* The loop whose io_loop_run_once() runs on the calling thread (its callbacks
 * run there), or NULL outside any. */
struct io_loop *io_loop_current(void);

/* Number of submitted commands that have not yet completed. */
unsigned io_loop_inflight(const struct io_loop *loop);

/*
 * Deferred work: a hook runs once per loop iteration, after completions were
 * handled and before the loop sleeps ("before sleep"). Used to batch
 * used-ring notifications. The struct is the caller's and stays registered
 * until io_defer_del().
 */
struct io_defer {
	void (*fn)(struct io_defer *d);
	void *priv;
	struct io_defer *next; /* private */
};
void io_defer_add(struct io_loop *loop, struct io_defer *d);
void io_defer_del(struct io_loop *loop, struct io_defer *d);

/*
 * Adaptive busy polling before sleeping, bounded by @max_ns per wait (0 =
 * off, the default). While polling, the loop re-runs the deferred hooks, which
 * may return work by submitting commands. How long a wait polls is learnt
 * from the waits themselves, one window per kind of event that ended the
 * previous wait (io_poll_kind: what comes next depends on it): each wait is
 * timed from its start to the event that ends it, and its window adapted
 * by io_poll_window_update. Every window starts at @max_ns when a new bound
 * is set; setting 0 pauses polling and keeps what was learnt.
 */
void io_loop_set_poll_ns(struct io_loop *loop, uint64_t max_ns);

enum io_poll_kind {
	IO_POLL_AFTER_OTHER,  /* a hook's work (a guest's request), an fd event, a timer */
	IO_POLL_AFTER_FILE,   /* a file read, write, fdatasync or fallocate completed */
	IO_POLL_AFTER_REMOTE, /* an io_post_remote() arrived from another thread */
	IO_POLL_KINDS
};

/*
 * One kind's window, adapted after a wait of @waited ns (bound @max): kept
 * if the event came inside it; grown if it came later but within @max, to
 * twice the wait (at least double the window, at least
 * IO_POLL_WINDOW_MIN_NS, at most @max); closed (0) if it came after @max:
 * polling for it only burns a CPU, which on a full machine the thread that
 * produces the event may need. A closed window still times its waits and
 * reopens on one within @max; and since a sleep's own wake-up can exceed
 * @max on a busy machine, it probes at @max after 1, 2, 4 ...
 * IO_POLL_BACKOFF_MAX waits (doubling while probes fail). Public for tests,
 * as is the getter of a loop's current window of @kind (bounded by the
 * current @max_ns).
 */
#define IO_POLL_WINDOW_MIN_NS 2000
#define IO_POLL_BACKOFF_MAX   64
struct io_poll_window {
	uint64_t ns;      /* how long the next wait of this kind polls */
	unsigned skip;    /* closed: waits left before it probes at the bound */
	unsigned backoff; /* waits to skip after the next failed poll */
};
void io_poll_window_update(struct io_poll_window *w, uint64_t waited, uint64_t max);
uint64_t io_loop_poll_window(const struct io_loop *loop, enum io_poll_kind kind);

/*
 * Hybrid polling, off (0) by default: the wait that follows a file I/O's
 * submission (reads, writes, fdatasync, fallocate), if it would busy-poll,
 * first sleeps @pct % (at most IO_POLL_HYBRID_PCT_MAX) of the wait learnt
 * for a file completion, in io_uring_enter with a timeout (a CQE ends the
 * sleep at once), then polls the rest of its window; later waits with the
 * I/O still in flight poll as before. The learnt wait is a moving mean
 * (io_poll_hybrid_learn) of those waits that a file completion ended within
 * the bound;
 * nothing is slept until one was timed, nor when the sleep would be under
 * IO_POLL_HYBRID_MIN_NS or not end before the window (io_poll_hybrid_sleep).
 * The CPU a poll burns while the disk works is spared, for at most a
 * wake-up's latency when the completion comes during the sleep.
 * -EOPNOTSUPP if the kernel's io_uring_enter takes no timeout (EXT_ARG).
 * The rules and the learnt mean are public for tests.
 */
#define IO_POLL_HYBRID_PCT_MAX 90
#define IO_POLL_HYBRID_MIN_NS  8000
int io_loop_set_poll_hybrid(struct io_loop *loop, unsigned pct);
void io_poll_hybrid_learn(uint64_t *mean, uint64_t waited);
uint64_t io_poll_hybrid_sleep(uint64_t mean, unsigned pct, uint64_t window);
uint64_t io_loop_poll_hybrid_mean(const struct io_loop *loop);
uint64_t io_loop_poll_hybrid_sleeps(const struct io_loop *loop);
uint64_t io_loop_poll_hybrid_woken(const struct io_loop *loop);
uint64_t io_loop_poll_hybrid_slept_ns(const struct io_loop *loop);

/*
 * Loops on several threads that busy-poll share CPUs: a poll holds one, and
 * a thread that polls while the thread it waits for (a front-end, another
 * loop) has no CPU to run on only delays it. A group lets at most @max of
 * its loops poll at a time; a loop that finds the group full sleeps at once
 * (its windows unchanged: the next sleep tries again). @max 0: none polls. The struct
 * is the caller's and must outlive the loops that use it.
 */
struct io_poll_group {
	unsigned max;
	unsigned active; /* atomic: loops polling now */
};
void io_poll_group_init(struct io_poll_group *g, unsigned max);
void io_loop_set_poll_group(struct io_loop *loop, struct io_poll_group *g);
/* Take a place in the group (false: full) and give it back: what a loop does
 * around each poll; public for tests. */
bool io_poll_group_enter(struct io_poll_group *g);
void io_poll_group_leave(struct io_poll_group *g);

/*
 * Polite polling, off (false) by default: a busy poll yields its CPU
 * (sched_yield) every few spins, and once a yield gave the CPU away (another
 * thread runnable on it ran: the yield took more than
 * IO_POLL_YIELD_GAVE_NS) it ends and the loop sleeps until its event. A
 * poll then takes only a CPU nobody else wants: where the front-end's
 * threads (a TCG or an overcommitted KVM guest's vCPUs) need the CPUs the
 * loops would spin on, they get them at once instead of after the poll
 * window. Such a wait does not teach the windows (io_poll_window_update):
 * it says nothing of how long the event takes. io_loop_poll_gave() counts
 * them (also on the debug line at exit).
 */
#define IO_POLL_YIELD_GAVE_NS 5000
void io_loop_set_poll_yield(struct io_loop *loop, bool on);
uint64_t io_loop_poll_gave(const struct io_loop *loop);

/*
 * Early submission: hand prepared SQEs to the kernel as soon as @n of them
 * are waiting, instead of all at once when the iteration ends (0, the
 * default). With n = 2 no submission is large enough for the kernel to plug
 * the block queue, so the device starts on the first request while later
 * ones are still being prepared; this costs more io_uring_enter calls. On a
 * virtio disk, 32 random 4K reads submitted in one call ran at 0.85x of the
 * same reads submitted two at a time (contrib/bench/RESULTS.md).
 */
void io_loop_set_submit_batch(struct io_loop *loop, unsigned n);

/* SQEs prepared but not yet handed to the kernel (for tests). */
unsigned io_loop_sq_waiting(struct io_loop *loop);

/*
 * Registered files (on by default): a file's first read, write, fdatasync or
 * fallocate on a loop registers its fd in the loop's file table (64 slots),
 * and its SQEs then name the slot (IOSQE_FIXED_FILE), which spares the kernel
 * a file-table lookup and reference per request. io_file_close() removes the
 * registration from every loop; io_loop_exit() forgets the files still
 * registered with it. Each io_uring has its own table, so a file used by
 * several loops (threads) is registered with each of them, by the thread
 * that runs the loop, on its first use there; up to IO_FIXED_LOOPS loops at
 * a time take part (the others use files by fd). When the kernel or the
 * table refuses, the file is simply used by fd. io_file_close() and
 * io_file_reopen_rw() call into every loop holding the file: no loop may be
 * using the file at that point (the caller's rule anyway). Turn it off
 * before the first I/O with io_loop_set_fixed_files(loop, false).
 */
void io_loop_set_fixed_files(struct io_loop *loop, bool on);

/* Is @f registered with @loop, and how many SQEs named a registered file (for tests)? */
bool io_file_is_fixed(const struct io_file *f, const struct io_loop *loop);
uint64_t io_loop_fixed_file_uses(const struct io_loop *loop);

/*
 * Registered buffers: pin the memory of @iov[0 .. @n) in the kernel
 * (IORING_REGISTER_BUFFERS) so that a read or write whose data is one buffer
 * inside one of these ranges goes out as READ_FIXED/WRITE_FIXED, without the
 * per-request page pinning of O_DIRECT. Replaces any previous set (the
 * kernel keeps the old pages pinned until requests already submitted with
 * them complete); @n = 0 only drops the set. Ranges over 1 GiB are split into
 * 1 GiB pieces (the kernel's limit per buffer); at most 64 pieces.
 *
 * The pages stay pinned until the set is replaced or dropped: the caller must
 * replace it before the memory is unmapped or its pages are given back
 * (e.g. guest memory that is ballooned or hot-unplugged), otherwise requests
 * would move data to or from the old pages. Costs: the whole range is faulted
 * in and counted against RLIMIT_MEMLOCK (without CAP_IPC_LOCK).
 *
 * 0 or -errno (-E2BIG: too many pieces; -ENOMEM: memlock limit; -EOPNOTSUPP,
 * -EFAULT: the kernel refuses this memory). On error no buffers are
 * registered and every request goes by address as before.
 */
int io_loop_register_buffers(struct io_loop *loop, const struct iovec *iov, unsigned n);

/* Number of registered buffer pieces (0 = none) and of requests that used them (tests). */
unsigned io_loop_fixed_buffers(const struct io_loop *loop);
uint64_t io_loop_fixed_buffer_uses(const struct io_loop *loop);

/* ---- files ---- */

/*
 * Open @path for I/O. @flags: IO_FILE_RDONLY, IO_FILE_DIRECT (O_DIRECT; falls
 * back to buffered I/O with a logged warning only if the filesystem refuses
 * O_DIRECT with -EINVAL), IO_FILE_ZERO_EOF. Fills *f (fd, alignment, size).
 * Only regular files and block devices: anything else is -EINVAL (opened
 * non-blocking first, so a FIFO cannot hang it; never a controlling tty).
 * No locks are taken (io_file_lock). 0 or -errno.
 */
int io_file_open(struct io_file *f, const char *path, unsigned flags);

/*
 * Wrap an already-open regular file or block device fd (takes ownership; on
 * failure the fd is closed). O_DIRECT is taken from the fd's own flags; @flags
 * adds IO_FILE_ZERO_EOF / IO_FILE_RDONLY. 0 or -errno.
 */
int io_file_from_fd(struct io_file *f, int fd, unsigned flags);

void io_file_close(struct io_file *f);

/*
 * A file opened read-only (IO_FILE_RDONLY) becomes read-write in place: the
 * same file (device and inode) is opened again O_RDWR, the new description
 * takes the locks "uses @perm, shares @shared" (io_lock_set: our old
 * description is not counted against it), and replaces the old one, whose
 * locks go with it (f->fd changes: no command may be in flight or queued on
 * @f, and it is unregistered from its loop's fixed files). On failure (-EAGAIN: a conflicting lock,
 * @err in QEMU's words; -ESTALE: the path names another file now) the file stays read-only with its
 * locks. A file already read-write only changes its locks.
 */
int io_file_reopen_rw(struct io_file *f, const char *path, unsigned perm, unsigned shared,
		      char *err, size_t errlen);

/*
 * A second open file description of @f's file (through /proc/self/fd: the
 * same inode), read-write and buffered, for fallocate and fdatasync of its
 * own: Linux reports a writeback error once per open file description
 * (errseq), so an fdatasync through @nf never takes an error that one
 * through @f must report. No locks (those of @f stay @f's). 0 or -errno;
 * io_file_close(@nf) when done.
 */
int io_file_reopen(const struct io_file *f, struct io_file *nf);

/* Current size in bytes (fstat / BLKGETSIZE64). 0 or -errno. */
int io_file_get_size(struct io_file *f, uint64_t *size);

/* Cut or extend a regular file to @size bytes (ftruncate; f->size is left
 * to the caller). 0 or -errno. */
int io_file_truncate(struct io_file *f, uint64_t size);

/*
 * Synchronous I/O for open time and tools (never on the request path).
 * Handles alignment with a bounce buffer and short transfers. 0 or -errno.
 * A read past EOF fills zeroes.
 */
int io_file_pread_sync(struct io_file *f, void *buf, size_t len, uint64_t off);
int io_file_pwrite_sync(struct io_file *f, const void *buf, size_t len, uint64_t off);
int io_file_sync(struct io_file *f);

/*
 * A failed fdatasync of a file that took writes through the page cache is
 * sticky: that call and every later fdatasync of @f (io_fdatasync,
 * io_file_sync, on any thread) fail with its error. Linux marks the pages
 * whose writeback failed clean (their data is lost, the page cache no
 * longer says so) and reports the error once per open file description
 * (errseq: file_check_and_advance_wb_err), so a later fdatasync, or one
 * running at the same time on the same fd, returns 0 although the data
 * never reached the disk. QEMU does the same (file-posix's
 * page_cache_inconsistent). A file written with O_DIRECT only keeps
 * retrying: a failed O_DIRECT write is reported by the write itself.
 * Returns the sticky error, 0 if none.
 */
int io_file_sync_error(const struct io_file *f);

/*
 * Whether @f may have taken writes through the page cache (then an error
 * of two fdatasyncs in flight at once may reach only one of them: a caller
 * that counts on both keeps them apart).
 */
bool io_file_pc_written(const struct io_file *f);
/*
 * @f and @peer are two handles of the same file, and the caller syncs @peer
 * for the writes made through @f (qcow2: data through a second handle of the
 * image, the write-back's fdatasyncs through the first): a write through
 * @f's page cache marks @peer page-cache written too (io_file_pc_written), so
 * that @peer's failed fdatasync is sticky and no two of its syncs run at once
 * where one may miss a writeback error. Set after both are open.
 */
void io_file_pc_share(struct io_file *f, struct io_file *peer);

/* ---- image locks (QEMU-compatible; io/lock.c) ---- */

/*
 * Permissions as QEMU's block layer names them (the same bit numbers). A user
 * of a file holds OFD read locks on byte 100 + i for each permission i it
 * uses and on byte 200 + i for each permission it does not share; QEMU,
 * qemu-img, qemu-io, qemu-storage-daemon and vqcow's tools all refuse each
 * other by these bytes. See io/lock.c for the protocol.
 */
enum {
	IO_PERM_CONSISTENT_READ = 1u << 0,
	IO_PERM_WRITE = 1u << 1,
	IO_PERM_WRITE_UNCHANGED = 1u << 2,
	IO_PERM_RESIZE = 1u << 3,
	IO_PERM_ALL = 0xfu,
};

/*
 * Change the locks @fd holds (recorded in *@l, zero-initialised = none) to
 * "uses @perm, shares @shared" (IO_PERM_* masks), checking that no other
 * open file description conflicts. Can be called again at any time to take
 * or give up permissions (e.g. the write permission around a migration);
 * giving up never fails. Locks vanish when the fd is closed.
 * Returns 0; -EAGAIN when another process holds a conflicting lock (@err:
 * 'Failed to get "write" lock: locked by another process' or 'Failed to get
 * shared "write" lock: ...', QEMU's words); another -errno when the file
 * system refuses the lock calls (@err names the byte and the error). On
 * failure the locks held before the call are kept.
 */
int io_lock_set(int fd, struct io_lock *l, unsigned perm, unsigned shared, char *err,
		size_t errlen);

/* Drop every lock byte recorded in *@l (@fd < 0: just forget them). */
void io_lock_release(int fd, struct io_lock *l);

/* io_lock_set() on an io_file's fd (io_file_close() releases them). */
int io_file_lock(struct io_file *f, unsigned perm, unsigned shared, char *err, size_t errlen);

/* "consistent read", "write", "write unchanged", "resize" for one IO_PERM_* bit. */
const char *io_perm_name(unsigned perm);

/* ---- asynchronous commands ---- */

void io_readv(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	      unsigned iovcnt, uint64_t off);
void io_writev(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	       unsigned iovcnt, uint64_t off);
/* Single-buffer convenience forms; the iovec lives inside cmd. */
void io_read(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, void *buf, size_t len,
	     uint64_t off);
void io_write(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, const void *buf,
	      size_t len, uint64_t off);
void io_fdatasync(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f);
/* @mode as fallocate(2): 0, FALLOC_FL_KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE... */
void io_fallocate(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, int mode,
		  uint64_t off, uint64_t len);

/*
 * Poll @fd for @events (POLLIN...). Multishot: done() is called every time
 * the fd becomes ready with res = revents, until io_cancel() (then done() gets
 * -ECANCELED once, the final call) or an error. The callback must drain the
 * fd (e.g. read the eventfd) or it will fire again.
 * Exception to "exactly once": a multishot poll completes many times and ends
 * with one final call whose res is negative.
 */
void io_poll(struct io_loop *loop, struct io_cmd *cmd, int fd, uint32_t events);

/* One-shot timer: done(cmd, 0) after @ns nanoseconds, or -ECANCELED. */
void io_timeout(struct io_loop *loop, struct io_cmd *cmd, uint64_t ns);

/*
 * Cancel the in-flight @target (poll or timeout). @target's done() runs with
 * -ECANCELED (or its normal result if it raced). Fire and forget: io/ uses an
 * internal command for the cancel request itself.
 */
void io_cancel(struct io_loop *loop, struct io_cmd *target);

/*
 * Post: complete @cmd with done(cmd, 0) from the loop, without the kernel and
 * without a file. For work that must go on "from the loop": a request that
 * may not complete inside its own submitter, or a long run of steps that
 * needs no I/O and should let other commands run in between.
 *
 * Contract (that of every command): exactly one done() per io_post(), never
 * from inside io_post() itself, counted by io_loop_inflight() until then.
 * Posts complete in the order they were made, in the same loop iteration as
 * the completions reaped before them (a post made outside the loop runs on
 * the next iteration, which does not sleep while a post waits); a post made
 * by a done() that itself ran as a post waits for the next iteration, so a
 * command that re-posts itself cannot keep the loop from reaping.
 * res is always 0: the fault hook (below) is not consulted for posts.
 */
void io_post(struct io_loop *loop, struct io_cmd *cmd);

/*
 * Cross-thread posts (vqcowd's I/O threads hand requests to each other with
 * them). io_loop_enable_remote(), called once on @loop's own thread, creates
 * an eventfd the loop polls (a multishot poll that io_loop_inflight() counts
 * as one command; it keeps io_loop_run() from returning for lack of work).
 * 0 or -errno.
 *
 * io_post_remote() may then be called from ANY thread: @cmd->done(@cmd, 0)
 * runs on @loop's thread, from its loop, in the order the posts were made
 * (per posting thread; posts from several threads interleave in the order
 * they took the loop's lock). Everything the posting thread wrote before the
 * call is visible to done() (a mutex orders them). The command belongs to
 * @loop from the call until done() runs; it must not be in flight anywhere
 * else. The target is woken only when its list goes from empty to
 * non-empty: one eventfd write per batch of posts.
 */
int io_loop_enable_remote(struct io_loop *loop);
void io_post_remote(struct io_loop *loop, struct io_cmd *cmd);

/* ---- fault hook ---- */

/*
 * A hook the loop consults at the first submission of every caller command
 * (io/'s own resubmissions of short transfers and retries do not count), to
 * make it misbehave on purpose: the seam fault injection plugs into (the
 * tests' injector, tests/common/io_inject.c). Called from the submitting
 * function with the command's @op; it returns what the command meets:
 *   0:   nothing, the command goes on normally.
 *   < 0: the command completes with it (a negative errno) without reaching
 *        the kernel: nothing is read or written. done() still runs from
 *        io_loop_run*(), never from the submitter. For a poll this is its
 *        final call. Exception: -EAGAIN or -EINTR on readv/writev/fdatasync/
 *        fallocate is a transient failure: the first kernel round trip of
 *        the command yields it, io/ retries and the command then completes
 *        normally.
 *   > 0: readv/writev: each kernel transfer of that command is capped to that
 *        many bytes (rounded down to the file's alignment, at least one
 *        alignment unit, and to the first remaining iovec), so io/ sees short
 *        transfers and must advance and resubmit; the command still completes
 *        with its full length. Ignored for other ops.
 * The hook must not submit or run the loop. NULL @fn removes it (the default).
 */
typedef int (*io_fault_fn)(void *opaque, struct io_loop *loop, enum io_op op);
void io_loop_set_fault_hook(struct io_loop *loop, io_fault_fn fn, void *opaque);

/* The hook set on @loop (NULL if none); its opaque pointer in *@opaque if @opaque. */
io_fault_fn io_loop_fault_hook(const struct io_loop *loop, void **opaque);

/* ---- helpers ---- */

/* Total byte length of an iovec array. */
size_t io_iov_len(const struct iovec *iov, unsigned iovcnt);

/*
 * Build in @dst (room for @dst_max entries) the part of @src covering
 * [@skip, @skip + @len). Returns the number of entries used, or -EINVAL if
 * @src is too short or -E2BIG if @dst_max is too small.
 */
int io_iov_slice(struct iovec *dst, unsigned dst_max, const struct iovec *src, unsigned src_cnt,
		 size_t skip, size_t len);

/* Fill [@skip, @skip + @len) of the iovec array with zeroes. */
void io_iov_memset(const struct iovec *iov, unsigned iovcnt, size_t skip, int c, size_t len);

/* Copy between a flat buffer and an iovec array at byte offset @skip. */
size_t io_iov_to_buf(const struct iovec *iov, unsigned iovcnt, size_t skip, void *buf, size_t len);
size_t io_iov_from_buf(const struct iovec *iov, unsigned iovcnt, size_t skip, const void *buf,
		       size_t len);

/* Allocate / free a buffer aligned for O_DIRECT (4096-byte alignment). NULL on failure. */
void *io_alloc_aligned(size_t len);
void io_free_aligned(void *p);

#endif /* VQCOW_IO_H */
