/* SPDX-License-Identifier: MIT */
/*
 * io/ loop: one io_uring per loop, command submission, completion, retries,
 * bounce buffers, deferred hooks, busy polling and the fault hook.
 *
 * Command state machine (io_cmd.state):
 *
 *   IDLE --submit--> KERNEL   an SQE was prepared (maybe not yet entered)
 *   IDLE --submit--> PENDING  no SQE free / CQ budget used up: on loop->pend_*
 *   IDLE --submit--> LOCAL    completes without the kernel (error found at
 *                             submit time, zero length, failure from the
 *                             fault hook, io_post())
 *   PENDING --next iteration--> KERNEL
 *   KERNEL --CQE--> KERNEL|PENDING  short transfer, -EAGAIN, -EINTR, poll re-arm
 *   KERNEL --CQE--> IDLE             done() called (poll: with F_MORE, done()
 *                                    is called and the state stays KERNEL)
 *   LOCAL --loop iteration--> IDLE   done() called
 *
 * Invariants:
 *  - loop->inflight counts caller commands between submit and their final
 *    done(); internal commands (cancel requests) are not counted.
 *  - loop->kinflight counts prepared SQEs whose final CQE has not been reaped
 *    (internal ones included); it never exceeds the CQ size, so the CQ cannot
 *    overflow from one-shot commands.
 *  - Commands leave PENDING in FIFO order, and arm() never overtakes the
 *    pending list, so an SQE never goes to the kernel before an older one.
 *  - done() is only ever called from io_loop_run_once()/io_loop_run().
 */
#include <errno.h>
#include <limits.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io_internal.h"
#include "vlog.h"

enum cmd_state {
	CMD_IDLE = 0,
	CMD_PENDING,
	CMD_KERNEL,
	CMD_LOCAL,
};

enum {
	CMD_F_INTERNAL = 1u << 0,  /* an io/-owned command (cancel request) */
	CMD_F_CANCEL = 1u << 1,    /* a cancel request for this command is out */
	CMD_F_BUFFERED = 1u << 2,  /* goes through the file's buffered twin fd */
	CMD_F_TRANSIENT = 1u << 3, /* fault hook: next CQE is a NOP standing for ->res */
	CMD_F_HYB = 1u << 4,       /* a file SQE counted in finflight (hybrid polling on) */
};

#define IO_FIXED_FILES   64
#define IO_FIXED_BUFS    64
#define IO_FIXED_BUF_MAX (1ull << 30) /* the kernel's limit per registered buffer */

/* An internal command, on loop->icmd_all for freeing at exit. */
struct icmd {
	struct io_cmd cmd;
	struct icmd *all_next;
};

struct io_loop {
	struct io_uring ring;
	unsigned klimit;    /* max kinflight: the CQ size */
	unsigned inflight;  /* caller commands not yet finished */
	unsigned kinflight; /* SQEs prepared whose final CQE is not reaped */
	bool stop;
	bool running;
	struct io_cmd *pend_head, *pend_tail;
	struct io_cmd *local_head, *local_tail;
	struct io_defer *defers;
	struct io_defer *defer_cursor; /* next hook while running hooks */
	uint64_t poll_max_set;         /* the last non-zero bound set */
	uint64_t poll_ns;              /* the bound of every window (io_loop_set_poll_ns) */
	/* Adaptive busy polling: a window per kind of event that ended the
	 * last wait (poll_kind), learnt from how long the waits after such an
	 * event took (io_poll_window_update). poll_await: a wait is being timed
	 * and its ending event not classified yet (reap does it). */
	struct io_poll_window poll_win[IO_POLL_KINDS];
	enum io_poll_kind poll_kind;
	bool poll_await;
	/* For the debug line at exit: timed waits, those that polled, those
	 * whose poll caught the event, and the time spent polling. */
	uint64_t poll_waits, poll_polled, poll_caught, poll_spent_ns;
	struct io_poll_group *poll_group; /* io_loop_set_poll_group(), or NULL */
	bool poll_yield;                  /* io_loop_set_poll_yield() */
	uint64_t poll_gave;               /* polls a yield ended (the CPU was wanted) */
	uint64_t poll_away_ns;            /* time such yields were away (not polled) */
	/* Hybrid polling (io_loop_set_poll_hybrid): hyb_pct % of hyb_mean_ns,
	 * the learnt wait for a file completion, is slept before polling the
	 * wait that follows a file submission (fsub) with file I/O in flight
	 * (finflight: file SQEs whose CQE is not reaped, counted only while
	 * hybrid polling is on, CMD_F_HYB). For the exit line: sleeps, those a CQE
	 * ended, time slept. hyb_ok: the kernel takes a wait's timeout (EXT_ARG). */
	unsigned hyb_pct;
	bool hyb_ok;
	unsigned finflight;
	bool fsub; /* a file SQE was prepared since the last timed wait began */
	uint64_t hyb_mean_ns;
	uint64_t hyb_sleeps, hyb_woken, hyb_woken_file, hyb_slept_ns;
	unsigned submit_batch; /* submit once this many SQEs wait (0 = per iteration) */
	io_fault_fn fault_fn;  /* io_loop_set_fault_hook() */
	void *fault_opaque;
	void *bfree[IO_BOUNCE_CLASSES];
	unsigned bfree_n[IO_BOUNCE_CLASSES];
	struct icmd *icmd_all;
	struct io_cmd *icmd_free;
	/* Registered files: slot -> file; files_state 0 = table not set up yet,
	 * 1 = set up, -1 = off or refused by the kernel. fid: this loop's index
	 * in every io_file's fixed[] (and in fixed_loops[]), -1 = none left. The
	 * slots are written by the loop's thread and by io_file_close's (with
	 * no I/O on that file anywhere), hence the atomics. */
	int files_state;
	int fid;
	struct io_file *files[IO_FIXED_FILES];
	/* Registered buffers: piece i is buffer index i. */
	unsigned nbufs;
	struct {
		uintptr_t base;
		size_t len;
	} bufs[IO_FIXED_BUFS];
	uint64_t buf_uses;
	uint64_t file_uses; /* SQEs that named a registered file */
	/* Cross-thread posts (io_post_remote): a list other threads append to
	 * under rmtx, and an eventfd the loop polls (wake_cmd) to take it. */
	pthread_mutex_t rmtx;
	struct io_cmd *rhead, *rtail; /* under rmtx */
	int wake_fd;                  /* -1 until io_loop_enable_remote() */
	struct io_cmd wake_cmd;
};

/* ---- life cycle ---- */

/* The loops by fixed-file id, so that closing a file finds every loop holding it. */
static struct io_loop *fixed_loops[IO_FIXED_LOOPS];

static int fid_claim(struct io_loop *loop)
{
	for (int i = 0; i < IO_FIXED_LOOPS; i++) {
		struct io_loop *none = NULL;

		if (__atomic_compare_exchange_n(&fixed_loops[i], &none, loop, false,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			return i;
	}
	return -1;
}

int io_loop_init(struct io_loop **loopp, unsigned entries)
{
	static const unsigned setup_flags[] = {
	    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	    IORING_SETUP_SUBMIT_ALL,
	    0,
	};
	struct io_loop *loop;
	int ret = -EINVAL;

	if (entries == 0)
		entries = 128;
	if (entries > 4096)
		entries = 4096;
	loop = calloc(1, sizeof(*loop));
	if (!loop)
		return -ENOMEM;
	for (size_t i = 0; i < sizeof(setup_flags) / sizeof(setup_flags[0]); i++) {
		struct io_uring_params p;

		memset(&p, 0, sizeof(p));
		p.flags = setup_flags[i] | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
		p.cq_entries = entries * 4;
		ret = io_uring_queue_init_params(entries, &loop->ring, &p);
		if (ret != -EINVAL)
			break;
	}
	if (ret < 0)
		goto err_free;
	loop->klimit = loop->ring.cq.ring_entries;
	loop->hyb_ok = loop->ring.features & IORING_FEAT_EXT_ARG;
	loop->wake_fd = -1;
	loop->fid = fid_claim(loop);
	pthread_mutex_init(&loop->rmtx, NULL);
	*loopp = loop;
	return 0;

err_free:
	free(loop);
	return ret;
}

void io_loop_exit(struct io_loop *loop)
{
	struct icmd *ic, *next;

	if (!loop)
		return;
	if (loop->poll_waits)
		vlog(VLOG_DEBUG, "io",
		     "busy polling: %llu waits timed, %llu polled, %llu caught by the poll, "
		     "%llu us polled, %llu given up to another thread; windows %llu/%llu/%llu ns",
		     (unsigned long long)loop->poll_waits, (unsigned long long)loop->poll_polled,
		     (unsigned long long)loop->poll_caught,
		     (unsigned long long)(loop->poll_spent_ns / 1000),
		     (unsigned long long)loop->poll_gave,
		     (unsigned long long)loop->poll_win[IO_POLL_AFTER_OTHER].ns,
		     (unsigned long long)loop->poll_win[IO_POLL_AFTER_FILE].ns,
		     (unsigned long long)loop->poll_win[IO_POLL_AFTER_REMOTE].ns);
	if (loop->hyb_sleeps)
		vlog(VLOG_DEBUG, "io",
		     "hybrid polling: %llu sleeps, %llu ended by a CQE (%llu of a file I/O), %llu "
		     "us "
		     "slept; file wait learnt %llu ns",
		     (unsigned long long)loop->hyb_sleeps, (unsigned long long)loop->hyb_woken,
		     (unsigned long long)loop->hyb_woken_file,
		     (unsigned long long)(loop->hyb_slept_ns / 1000),
		     (unsigned long long)loop->hyb_mean_ns);
	for (unsigned i = 0; i < IO_FIXED_FILES; i++) {
		struct io_file *f = __atomic_load_n(&loop->files[i], __ATOMIC_ACQUIRE);

		if (f && loop->fid >= 0)
			__atomic_store_n(&f->fixed[loop->fid], 0, __ATOMIC_RELEASE);
	}
	io_uring_queue_exit(&loop->ring);
	if (loop->fid >= 0)
		__atomic_store_n(&fixed_loops[loop->fid], NULL, __ATOMIC_RELEASE);
	if (loop->wake_fd >= 0)
		close(loop->wake_fd);
	pthread_mutex_destroy(&loop->rmtx);
	for (ic = loop->icmd_all; ic; ic = next) {
		next = ic->all_next;
		free(ic);
	}
	for (int k = 0; k < IO_BOUNCE_CLASSES; k++) {
		while (loop->bfree[k]) {
			void *p = loop->bfree[k];

			loop->bfree[k] = *(void **)p;
			io_free_aligned(p);
		}
	}
	free(loop);
}

void io_loop_stop(struct io_loop *loop)
{
	loop->stop = true;
}

unsigned io_loop_inflight(const struct io_loop *loop)
{
	return loop->inflight;
}

void io_loop_set_poll_ns(struct io_loop *loop, uint64_t max_ns)
{
	/* Called on every iteration by hooks that switch polling off and on
	 * (vqcowd: by requests in flight): the windows learnt stay. A new
	 * bound starts every window at it; 0 only pauses them. */
	if (max_ns && max_ns != loop->poll_max_set) {
		loop->poll_max_set = max_ns;
		for (int k = 0; k < IO_POLL_KINDS; k++)
			loop->poll_win[k] = (struct io_poll_window){.ns = max_ns};
	}
	loop->poll_ns = max_ns;
}

uint64_t io_loop_poll_window(const struct io_loop *loop, enum io_poll_kind kind)
{
	uint64_t w = loop->poll_win[kind].ns;

	return w < loop->poll_ns ? w : loop->poll_ns;
}

void io_poll_window_update(struct io_poll_window *w, uint64_t waited, uint64_t max)
{
	uint64_t grown;

	if (w->ns > max)
		w->ns = max;
	/* The event came inside the window: the poll paid, keep it. */
	if (waited <= w->ns) {
		w->backoff = 0;
		return;
	}
	/* Within the bound, after the window (or with none: the sleep's
	 * wake-up included): a longer one would have caught it. Cover twice
	 * this wait, at least double the window, within the bound. */
	if (waited <= max) {
		grown = 2 * waited;
		if (grown < 2 * w->ns)
			grown = 2 * w->ns;
		if (grown < IO_POLL_WINDOW_MIN_NS)
			grown = IO_POLL_WINDOW_MIN_NS;
		w->ns = grown < max ? grown : max;
		w->backoff = 0;
		w->skip = 0;
		return;
	}
	/* Later than any poll may last: polling for it only burns the CPU
	 * (and on a full machine delays whoever must produce it). Close the
	 * window for 1, 2, 4 ... IO_POLL_BACKOFF_MAX waits, then probe once
	 * at the bound: a sleep's own wake-up may exceed the bound on a busy
	 * machine, so a closed window cannot tell fast events from slow. */
	if (w->ns) {
		w->ns = 0;
		w->backoff = w->backoff ? 2 * w->backoff : 1;
		if (w->backoff > IO_POLL_BACKOFF_MAX)
			w->backoff = IO_POLL_BACKOFF_MAX;
		w->skip = w->backoff;
		return;
	}
	if (w->skip && --w->skip == 0)
		w->ns = max;
}

int io_loop_set_poll_hybrid(struct io_loop *loop, unsigned pct)
{
	if (pct > IO_POLL_HYBRID_PCT_MAX)
		return -EINVAL;
	if (pct && !loop->hyb_ok)
		return -EOPNOTSUPP;
	loop->hyb_pct = pct;
	return 0;
}

void io_poll_hybrid_learn(uint64_t *mean, uint64_t waited)
{
	/* A moving mean over ~8 waits: quick to follow the disk, not thrown
	 * by one slow read. */
	if (!*mean)
		*mean = waited;
	else if (waited >= *mean)
		*mean += (waited - *mean) / 8;
	else
		*mean -= (*mean - waited) / 8;
}

uint64_t io_poll_hybrid_sleep(uint64_t mean, unsigned pct, uint64_t window)
{
	uint64_t s = mean * pct / 100;

	/* Shorter than a wake-up, a sleep costs more CPU than it spares; one
	 * that outlasts the window would be a plain sleep with a timer. */
	if (s < IO_POLL_HYBRID_MIN_NS || s >= window)
		return 0;
	return s;
}

uint64_t io_loop_poll_hybrid_mean(const struct io_loop *loop)
{
	return loop->hyb_mean_ns;
}

uint64_t io_loop_poll_hybrid_sleeps(const struct io_loop *loop)
{
	return loop->hyb_sleeps;
}

uint64_t io_loop_poll_hybrid_woken(const struct io_loop *loop)
{
	return loop->hyb_woken;
}

uint64_t io_loop_poll_hybrid_slept_ns(const struct io_loop *loop)
{
	return loop->hyb_slept_ns;
}

void io_poll_group_init(struct io_poll_group *g, unsigned max)
{
	g->max = max;
	__atomic_store_n(&g->active, 0, __ATOMIC_RELAXED);
}

void io_loop_set_poll_group(struct io_loop *loop, struct io_poll_group *g)
{
	loop->poll_group = g;
}

void io_loop_set_poll_yield(struct io_loop *loop, bool on)
{
	loop->poll_yield = on;
}

uint64_t io_loop_poll_gave(const struct io_loop *loop)
{
	return loop->poll_gave;
}

bool io_poll_group_enter(struct io_poll_group *g)
{
	unsigned a = __atomic_load_n(&g->active, __ATOMIC_RELAXED);

	while (a < g->max) {
		if (__atomic_compare_exchange_n(&g->active, &a, a + 1, true, __ATOMIC_RELAXED,
						__ATOMIC_RELAXED))
			return true;
	}
	return false;
}

void io_poll_group_leave(struct io_poll_group *g)
{
	__atomic_fetch_sub(&g->active, 1, __ATOMIC_RELAXED);
}

void io_loop_set_submit_batch(struct io_loop *loop, unsigned n)
{
	loop->submit_batch = n;
}

unsigned io_loop_sq_waiting(struct io_loop *loop)
{
	return io_uring_sq_ready(&loop->ring);
}

/* ---- fault hook ---- */

void io_loop_set_fault_hook(struct io_loop *loop, io_fault_fn fn, void *opaque)
{
	loop->fault_fn = fn;
	loop->fault_opaque = opaque;
}

io_fault_fn io_loop_fault_hook(const struct io_loop *loop, void **opaque)
{
	if (opaque)
		*opaque = loop->fault_opaque;
	return loop->fault_fn;
}

static bool transient(int res)
{
	return res == -EAGAIN || res == -EINTR;
}

/*
 * Ask the fault hook about a first submission of @cmd. Returns the error to
 * complete it with locally, or 0 to go on (maybe with a cap or a transient
 * first result set up in @cmd).
 */
static int fault_apply(struct io_loop *loop, struct io_cmd *cmd)
{
	int res;

	if (!loop->fault_fn)
		return 0;
	res = loop->fault_fn(loop->fault_opaque, loop, (enum io_op)cmd->op);
	if (res > 0) {
		/* A transfer cap: only reads and writes have transfers. */
		if (cmd->op == IO_OP_READV || cmd->op == IO_OP_WRITEV)
			cmd->cap = (uint32_t)res;
		return 0;
	}
	if (res < 0 && transient(res) && cmd->op != IO_OP_POLL && cmd->op != IO_OP_TIMEOUT) {
		cmd->flags |= CMD_F_TRANSIENT;
		cmd->res = res;
		return 0;
	}
	return res;
}

/* ---- bounce buffers ---- */

static void *bounce_get(struct io_loop *loop, uint64_t size, unsigned align, int8_t *bclass)
{
	*bclass = -1;
	if (align <= IO_BOUNCE_MIN) {
		for (int k = 0; k < IO_BOUNCE_CLASSES; k++) {
			uint64_t csize = (uint64_t)IO_BOUNCE_MIN << k;
			void *p;

			if (size > csize)
				continue;
			*bclass = (int8_t)k;
			p = loop->bfree[k];
			if (p) {
				loop->bfree[k] = *(void **)p;
				loop->bfree_n[k]--;
				return p;
			}
			return io_alloc_align(csize, IO_BOUNCE_MIN);
		}
	}
	return io_alloc_align(size, align);
}

static void bounce_put(struct io_loop *loop, void *p, int8_t bclass)
{
	if (bclass >= 0 && bclass < IO_BOUNCE_CLASSES && loop->bfree_n[bclass] < IO_BOUNCE_KEEP) {
		*(void **)p = loop->bfree[bclass];
		loop->bfree[bclass] = p;
		loop->bfree_n[bclass]++;
		return;
	}
	io_free_aligned(p);
}

/* ---- internal commands ---- */

static struct io_cmd *icmd_get(struct io_loop *loop)
{
	struct io_cmd *c = loop->icmd_free;
	struct icmd *ic;

	if (c) {
		loop->icmd_free = c->next;
	} else {
		ic = calloc(1, sizeof(*ic));
		if (!ic)
			return NULL;
		ic->all_next = loop->icmd_all;
		loop->icmd_all = ic;
		c = &ic->cmd;
	}
	memset(c, 0, sizeof(*c));
	c->loop = loop;
	c->flags = CMD_F_INTERNAL;
	c->fd = -1;
	return c;
}

static void icmd_put(struct io_loop *loop, struct io_cmd *c)
{
	c->state = CMD_IDLE;
	c->next = loop->icmd_free;
	loop->icmd_free = c;
}

/* ---- registered files and buffers ---- */

void io_loop_set_fixed_files(struct io_loop *loop, bool on)
{
	if (!on)
		loop->files_state = -1;
	else if (loop->files_state < 0)
		loop->files_state = 0;
}

bool io_file_is_fixed(const struct io_file *f, const struct io_loop *loop)
{
	return loop->fid >= 0 && __atomic_load_n(&f->fixed[loop->fid], __ATOMIC_RELAXED) > 0;
}

/* Register @f with @loop on its first use there; failures leave it used by fd. */
static void file_fix(struct io_loop *loop, struct io_file *f)
{
	unsigned i;

	if (loop->fid < 0 || loop->files_state < 0 ||
	    __atomic_load_n(&f->fixed[loop->fid], __ATOMIC_RELAXED) != 0)
		return;
	__atomic_store_n(&f->fixed[loop->fid], -1, __ATOMIC_RELAXED);
	if (loop->files_state == 0) {
		if (io_uring_register_files_sparse(&loop->ring, IO_FIXED_FILES) < 0) {
			loop->files_state = -1;
			return;
		}
		loop->files_state = 1;
	}
	for (i = 0; i < IO_FIXED_FILES && __atomic_load_n(&loop->files[i], __ATOMIC_ACQUIRE); i++)
		;
	if (i == IO_FIXED_FILES || io_uring_register_files_update(&loop->ring, i, &f->fd, 1) != 1)
		return;
	__atomic_store_n(&loop->files[i], f, __ATOMIC_RELEASE);
	__atomic_store_n(&f->fixed[loop->fid], (int)i + 1, __ATOMIC_RELEASE);
}

uint64_t io_loop_fixed_file_uses(const struct io_loop *loop)
{
	return loop->file_uses;
}

/* Forget @f in every loop's table: on close, or before its fd changes. */
void io_loop_file_closing(struct io_file *f)
{
	int minus_one = -1;

	for (int id = 0; id < IO_FIXED_LOOPS; id++) {
		int k = __atomic_load_n(&f->fixed[id], __ATOMIC_ACQUIRE);
		struct io_loop *loop;

		__atomic_store_n(&f->fixed[id], 0, __ATOMIC_RELAXED);
		if (k <= 0 || k > IO_FIXED_FILES)
			continue;
		loop = __atomic_load_n(&fixed_loops[id], __ATOMIC_ACQUIRE);
		if (!loop || __atomic_load_n(&loop->files[k - 1], __ATOMIC_ACQUIRE) != f)
			continue;
		io_uring_register_files_update(&loop->ring, (unsigned)k - 1, &minus_one, 1);
		__atomic_store_n(&loop->files[k - 1], NULL, __ATOMIC_RELEASE);
	}
}

int io_loop_register_buffers(struct io_loop *loop, const struct iovec *iov, unsigned n)
{
	struct iovec pieces[IO_FIXED_BUFS];
	unsigned np = 0;
	int ret;

	if (loop->nbufs) {
		io_uring_unregister_buffers(&loop->ring);
		loop->nbufs = 0;
	}
	for (unsigned i = 0; i < n; i++) {
		uintptr_t base = (uintptr_t)iov[i].iov_base;
		size_t len = iov[i].iov_len;

		if (base > UINTPTR_MAX - len)
			return -EINVAL;
		while (len) {
			size_t l = len > IO_FIXED_BUF_MAX ? (size_t)IO_FIXED_BUF_MAX : len;

			if (np == IO_FIXED_BUFS)
				return -E2BIG;
			pieces[np].iov_base = (void *)base;
			pieces[np].iov_len = l;
			np++;
			base += l;
			len -= l;
		}
	}
	if (np == 0)
		return 0;
	ret = io_uring_register_buffers(&loop->ring, pieces, np);
	if (ret < 0)
		return ret;
	for (unsigned i = 0; i < np; i++) {
		loop->bufs[i].base = (uintptr_t)pieces[i].iov_base;
		loop->bufs[i].len = pieces[i].iov_len;
	}
	loop->nbufs = np;
	return 0;
}

unsigned io_loop_fixed_buffers(const struct io_loop *loop)
{
	return loop->nbufs;
}

uint64_t io_loop_fixed_buffer_uses(const struct io_loop *loop)
{
	return loop->buf_uses;
}

/* The registered buffer holding all of [@p, @p + @n), or -1. */
static int fixed_buf(const struct io_loop *loop, const void *p, size_t n)
{
	uintptr_t a = (uintptr_t)p;

	for (unsigned i = 0; i < loop->nbufs; i++) {
		uintptr_t o = a - loop->bufs[i].base;

		if (a >= loop->bufs[i].base && o < loop->bufs[i].len && n <= loop->bufs[i].len - o)
			return (int)i;
	}
	return -1;
}

/* ---- submission ---- */

static unsigned cmd_align(const struct io_cmd *cmd)
{
	if (!cmd->file || (cmd->flags & CMD_F_BUFFERED) || cmd->file->align == 0)
		return 1;
	return cmd->file->align;
}

/* Name the file by its registered slot when it has one (not for the buffered twin fd). */
static void sqe_set_file(struct io_uring_sqe *sqe, const struct io_cmd *cmd)
{
	const struct io_file *f = cmd->file;
	int k;

	if (f && cmd->loop->fid >= 0 && (k = f->fixed[cmd->loop->fid]) > 0 && cmd->fd == f->fd) {
		sqe->fd = k - 1;
		sqe->flags |= IOSQE_FIXED_FILE;
		cmd->loop->file_uses++;
	}
}

static void prep_rw(struct io_uring_sqe *sqe, struct io_cmd *cmd)
{
	bool rd = cmd->op == IO_OP_READV;
	uint64_t n;
	int bi;

	if (cmd->bounce) {
		char *p = (char *)cmd->bounce + cmd->xfer;

		n = cmd->blen - cmd->xfer;
		if (cmd->cap) {
			unsigned a = cmd_align(cmd);
			uint64_t cap = cmd->cap / a * a;

			if (cap < a)
				cap = a;
			if (n > cap)
				n = cap;
		}
		if (rd)
			io_uring_prep_read(sqe, cmd->fd, p, (unsigned)n, cmd->boff + cmd->xfer);
		else
			io_uring_prep_write(sqe, cmd->fd, p, (unsigned)n, cmd->boff + cmd->xfer);
	} else if (cmd->cap) {
		unsigned a = cmd_align(cmd);
		uint64_t cap = cmd->cap / a * a;

		if (cap < a)
			cap = a;
		n = cmd->iov[0].iov_len;
		if (n > cap)
			n = cap;
		if (rd)
			io_uring_prep_read(sqe, cmd->fd, cmd->iov[0].iov_base, (unsigned)n,
					   cmd->off + cmd->xfer);
		else
			io_uring_prep_write(sqe, cmd->fd, cmd->iov[0].iov_base, (unsigned)n,
					    cmd->off + cmd->xfer);
	} else if (cmd->iovcnt == 1 && cmd->loop->nbufs &&
		   (bi = fixed_buf(cmd->loop, cmd->iov[0].iov_base, cmd->iov[0].iov_len)) >= 0) {
		n = cmd->iov[0].iov_len;
		if (rd)
			io_uring_prep_read_fixed(sqe, cmd->fd, cmd->iov[0].iov_base, (unsigned)n,
						 cmd->off + cmd->xfer, bi);
		else
			io_uring_prep_write_fixed(sqe, cmd->fd, cmd->iov[0].iov_base, (unsigned)n,
						  cmd->off + cmd->xfer, bi);
		cmd->loop->buf_uses++;
	} else {
		if (rd)
			io_uring_prep_readv(sqe, cmd->fd, cmd->iov, cmd->iovcnt,
					    cmd->off + cmd->xfer);
		else
			io_uring_prep_writev(sqe, cmd->fd, cmd->iov, cmd->iovcnt,
					     cmd->off + cmd->xfer);
	}
	sqe_set_file(sqe, cmd);
}

/* Reads, writes, fdatasync, fallocate: what hybrid polling learns the wait of. */
static bool is_file_op(uint8_t op)
{
	return op == IO_OP_READV || op == IO_OP_WRITEV || op == IO_OP_FDATASYNC ||
	       op == IO_OP_FALLOCATE;
}

/* Prepare an SQE for @cmd. false if there is no room now (SQ or CQ budget). */
static bool prep(struct io_loop *loop, struct io_cmd *cmd)
{
	struct io_uring_sqe *sqe;

	if (loop->kinflight >= loop->klimit)
		return false;
	sqe = io_uring_get_sqe(&loop->ring);
	if (!sqe) {
		/* Full SQ: hand what we have to the kernel and retry once. */
		io_uring_submit(&loop->ring);
		sqe = io_uring_get_sqe(&loop->ring);
		if (!sqe)
			return false;
	}
	switch (cmd->flags & CMD_F_TRANSIENT ? IO_OP_NONE : cmd->op) {
	case IO_OP_READV:
	case IO_OP_WRITEV:
		prep_rw(sqe, cmd);
		break;
	case IO_OP_FDATASYNC:
		io_uring_prep_fsync(sqe, cmd->fd, IORING_FSYNC_DATASYNC);
		sqe_set_file(sqe, cmd);
		break;
	case IO_OP_FALLOCATE:
		io_uring_prep_fallocate(sqe, cmd->fd, cmd->mode, (off_t)cmd->off, (off_t)cmd->len);
		sqe_set_file(sqe, cmd);
		break;
	case IO_OP_POLL:
		io_uring_prep_poll_multishot(sqe, cmd->fd, cmd->poll_events);
		break;
	case IO_OP_TIMEOUT:
		io_uring_prep_timeout(sqe, (struct __kernel_timespec *)cmd->ts, 0, 0);
		break;
	case IO_OP_CANCEL:
		io_uring_prep_cancel(sqe, cmd->target, 0);
		break;
	default:
		io_uring_prep_nop(sqe);
		break;
	}
	io_uring_sqe_set_data(sqe, cmd);
	cmd->state = CMD_KERNEL;
	loop->kinflight++;
	/* Hybrid polling off (the default): no file counting on the data path.
	 * The flag makes the CQE uncount exactly what was counted, whenever
	 * hybrid polling is switched. */
	if (loop->hyb_pct && is_file_op(cmd->op)) {
		cmd->flags |= CMD_F_HYB;
		loop->finflight++;
		loop->fsub = true;
	}
	/* Errors (e.g. -EBUSY) leave the SQEs queued for the iteration's submit. */
	if (loop->submit_batch && io_uring_sq_ready(&loop->ring) >= loop->submit_batch)
		io_uring_submit(&loop->ring);
	return true;
}

/* Append @cmd to the FIFO list (*@head, *@tail). */
static void fifo_push(struct io_cmd **head, struct io_cmd **tail, struct io_cmd *cmd)
{
	cmd->next = NULL;
	if (*tail)
		(*tail)->next = cmd;
	else
		*head = cmd;
	*tail = cmd;
}

static void pend_push(struct io_loop *loop, struct io_cmd *cmd)
{
	cmd->state = CMD_PENDING;
	fifo_push(&loop->pend_head, &loop->pend_tail, cmd);
}

static void pend_unlink(struct io_loop *loop, struct io_cmd *cmd)
{
	struct io_cmd **pp, *prev = NULL;

	for (pp = &loop->pend_head; *pp; prev = *pp, pp = &(*pp)->next) {
		if (*pp != cmd)
			continue;
		*pp = cmd->next;
		if (loop->pend_tail == cmd)
			loop->pend_tail = prev;
		cmd->next = NULL;
		return;
	}
}

/* Send @cmd to the kernel now or queue it behind the pending ones. */
static void arm(struct io_loop *loop, struct io_cmd *cmd)
{
	if (loop->pend_head || !prep(loop, cmd))
		pend_push(loop, cmd);
}

static void flush_pending(struct io_loop *loop)
{
	while (loop->pend_head) {
		struct io_cmd *cmd = loop->pend_head;

		if (!prep(loop, cmd))
			return;
		loop->pend_head = cmd->next;
		if (!loop->pend_head)
			loop->pend_tail = NULL;
		cmd->next = NULL;
	}
}

/* Complete @cmd with @res from the loop, without the kernel. */
static void local_push(struct io_loop *loop, struct io_cmd *cmd, int res)
{
	cmd->res = res;
	cmd->state = CMD_LOCAL;
	fifo_push(&loop->local_head, &loop->local_tail, cmd);
}

static void cmd_start(struct io_loop *loop, struct io_cmd *cmd, uint8_t op, struct io_file *f)
{
	if (cmd->loop == loop && cmd->state != CMD_IDLE) {
		/* A programming error that would corrupt the loop's lists. */
		vlog(VLOG_ERROR, "io", "command %p submitted while in flight", (void *)cmd);
		abort(); /* check:allow-abort: a caller's bug, never input */
	}
	cmd->next = NULL;
	cmd->loop = loop;
	cmd->file = f;
	cmd->fd = f ? f->fd : -1;
	cmd->op = op;
	cmd->state = CMD_IDLE;
	cmd->flags = 0;
	cmd->iovcnt = 0;
	cmd->iov = NULL;
	cmd->off = 0;
	cmd->len = 0;
	cmd->xfer = 0;
	cmd->bounce = NULL;
	cmd->bclass = -1;
	cmd->boff = 0;
	cmd->blen = 0;
	cmd->cap = 0;
	cmd->res = 0;
	cmd->target = NULL;
	loop->inflight++;
}

/* Drop leading empty iovecs. */
static void iov_skip_empty(struct io_cmd *cmd)
{
	while (cmd->iovcnt > 0 && cmd->iov[0].iov_len == 0) {
		cmd->iov++;
		cmd->iovcnt--;
	}
}

/* Advance the command's iovec array in place over @n transferred bytes. */
static void iov_advance(struct io_cmd *cmd, uint64_t n)
{
	while (n > 0 && cmd->iovcnt > 0) {
		if (n >= cmd->iov[0].iov_len) {
			n -= cmd->iov[0].iov_len;
			cmd->iov++;
			cmd->iovcnt--;
		} else {
			cmd->iov[0].iov_base = (char *)cmd->iov[0].iov_base + n;
			cmd->iov[0].iov_len -= n;
			n = 0;
		}
	}
	iov_skip_empty(cmd);
}

/* Choose fd and bounce buffer for a readv/writev. 0 or -errno. */
static int rw_setup(struct io_loop *loop, struct io_cmd *cmd)
{
	struct io_file *f = cmd->file;
	bool wr = cmd->op == IO_OP_WRITEV;
	uint64_t mask = cmd_align(cmd) - 1;
	bool range_ok = !((cmd->off | cmd->len) & mask);
	bool bufs_ok = cmd->iovcnt <= IO_IOV_MAX;
	uint64_t end;
	int ret;

	if (wr && !range_ok) {
		/*
		 * An O_DIRECT write whose offset or length is off-alignment
		 * would need read-modify-write of the edge blocks and could
		 * grow the file past its end; the buffered twin fd gives the
		 * exact semantics. The kernel keeps page cache and direct I/O
		 * coherent, and fdatasync on either fd covers the inode.
		 */
		ret = io_file_open_buffered(f);
		if (ret < 0)
			return ret;
		cmd->fd = __atomic_load_n(&f->bfd, __ATOMIC_ACQUIRE);
		cmd->flags |= CMD_F_BUFFERED;
		io_file_pc_write(f);
		mask = 0;
		range_ok = true;
	}
	for (unsigned i = 0; bufs_ok && mask && i < cmd->iovcnt; i++) {
		if (((uintptr_t)cmd->iov[i].iov_base | cmd->iov[i].iov_len) & mask)
			bufs_ok = false;
	}
	if (range_ok && bufs_ok) {
		iov_skip_empty(cmd);
		return 0;
	}
	cmd->boff = cmd->off & ~mask;
	end = (cmd->off + cmd->len + mask) & ~mask;
	cmd->blen = end - cmd->boff;
	cmd->bounce = bounce_get(loop, cmd->blen, (unsigned)(mask + 1), &cmd->bclass);
	if (!cmd->bounce)
		return -ENOMEM;
	if (wr)
		io_iov_to_buf(cmd->iov, cmd->iovcnt, 0,
			      (char *)cmd->bounce + (cmd->off - cmd->boff), cmd->len);
	return 0;
}

static void rw_submit(struct io_loop *loop, struct io_cmd *cmd, uint8_t op, struct io_file *f,
		      struct iovec *iov, unsigned iovcnt, uint64_t off)
{
	int inj, ret;

	cmd_start(loop, cmd, op, f);
	if (iovcnt > UINT16_MAX) {
		local_push(loop, cmd, -EINVAL);
		return;
	}
	cmd->iov = iov;
	cmd->iovcnt = (uint16_t)iovcnt;
	cmd->off = off;
	for (unsigned i = 0; i < iovcnt && cmd->len <= INT_MAX; i++) {
		/* Summed with a bound: lengths may come from a guest. */
		if (iov[i].iov_len > INT_MAX)
			cmd->len = (uint64_t)INT_MAX + 1;
		else
			cmd->len += iov[i].iov_len;
	}
	if (cmd->len > INT_MAX || off > (uint64_t)INT64_MAX - cmd->len) {
		local_push(loop, cmd, -EINVAL);
		return;
	}
	if (op == IO_OP_WRITEV && (f->flags & IO_FILE_RDONLY)) {
		local_push(loop, cmd, -EBADF);
		return;
	}
	inj = fault_apply(loop, cmd);
	if (inj < 0) {
		local_push(loop, cmd, inj);
		return;
	}
	if (cmd->len == 0) {
		local_push(loop, cmd, 0);
		return;
	}
	file_fix(loop, f);
	ret = rw_setup(loop, cmd);
	if (ret < 0) {
		local_push(loop, cmd, ret);
		return;
	}
	arm(loop, cmd);
}

void io_readv(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	      unsigned iovcnt, uint64_t off)
{
	rw_submit(loop, cmd, IO_OP_READV, f, iov, iovcnt, off);
}

void io_writev(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	       unsigned iovcnt, uint64_t off)
{
	rw_submit(loop, cmd, IO_OP_WRITEV, f, iov, iovcnt, off);
}

void io_read(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, void *buf, size_t len,
	     uint64_t off)
{
	cmd->iov1.iov_base = buf;
	cmd->iov1.iov_len = len;
	rw_submit(loop, cmd, IO_OP_READV, f, &cmd->iov1, 1, off);
}

void io_write(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, const void *buf,
	      size_t len, uint64_t off)
{
	cmd->iov1.iov_base = (void *)buf;
	cmd->iov1.iov_len = len;
	rw_submit(loop, cmd, IO_OP_WRITEV, f, &cmd->iov1, 1, off);
}

void io_fdatasync(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f)
{
	int inj;

	cmd_start(loop, cmd, IO_OP_FDATASYNC, f);
	inj = fault_apply(loop, cmd);
	if (inj < 0) {
		local_push(loop, cmd, inj);
		return;
	}
	file_fix(loop, f);
	arm(loop, cmd);
}

void io_fallocate(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, int mode,
		  uint64_t off, uint64_t len)
{
	int inj;

	cmd_start(loop, cmd, IO_OP_FALLOCATE, f);
	cmd->mode = mode;
	cmd->off = off;
	cmd->len = len;
	if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off) {
		local_push(loop, cmd, -EINVAL);
		return;
	}
	if (f->flags & IO_FILE_RDONLY) {
		local_push(loop, cmd, -EBADF);
		return;
	}
	inj = fault_apply(loop, cmd);
	if (inj < 0) {
		local_push(loop, cmd, inj);
		return;
	}
	file_fix(loop, f);
	arm(loop, cmd);
}

void io_poll(struct io_loop *loop, struct io_cmd *cmd, int fd, uint32_t events)
{
	int inj;

	cmd_start(loop, cmd, IO_OP_POLL, NULL);
	cmd->fd = fd;
	cmd->poll_events = events;
	inj = fault_apply(loop, cmd);
	if (inj < 0) {
		local_push(loop, cmd, inj);
		return;
	}
	arm(loop, cmd);
}

void io_timeout(struct io_loop *loop, struct io_cmd *cmd, uint64_t ns)
{
	int inj;

	cmd_start(loop, cmd, IO_OP_TIMEOUT, NULL);
	cmd->ns = ns;
	cmd->ts[0] = ns / 1000000000u;
	cmd->ts[1] = ns % 1000000000u;
	inj = fault_apply(loop, cmd);
	if (inj < 0) {
		local_push(loop, cmd, inj);
		return;
	}
	arm(loop, cmd);
}

void io_post(struct io_loop *loop, struct io_cmd *cmd)
{
	cmd_start(loop, cmd, IO_OP_POST, NULL);
	local_push(loop, cmd, 0);
}

/* ---- cross-thread posts ---- */

/* The wake eventfd is readable: take what other threads posted, run it this iteration. */
static void remote_take(struct io_cmd *wc, int res)
{
	struct io_loop *loop = wc->priv;
	struct io_cmd *cmd;
	uint64_t v;
	ssize_t n;

	if (res < 0)
		return; /* final call: the loop is going away */
	n = read(loop->wake_fd, &v, sizeof(v));
	(void)n; /* EAGAIN: drained by an earlier wake-up */
	pthread_mutex_lock(&loop->rmtx);
	cmd = loop->rhead;
	loop->rhead = NULL;
	loop->rtail = NULL;
	pthread_mutex_unlock(&loop->rmtx);
	while (cmd) {
		struct io_cmd *next = cmd->next;

		loop->inflight++;
		local_push(loop, cmd, 0);
		cmd = next;
	}
}

int io_loop_enable_remote(struct io_loop *loop)
{
	if (loop->wake_fd >= 0)
		return 0;
	loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (loop->wake_fd < 0)
		return -errno;
	loop->wake_cmd.done = remote_take;
	loop->wake_cmd.priv = loop;
	/* Not through io_poll(): the fault hook must not fail the wake-up. */
	cmd_start(loop, &loop->wake_cmd, IO_OP_POLL, NULL);
	loop->wake_cmd.fd = loop->wake_fd;
	loop->wake_cmd.poll_events = POLLIN;
	arm(loop, &loop->wake_cmd);
	return 0;
}

void io_post_remote(struct io_loop *loop, struct io_cmd *cmd)
{
	bool was_empty;

	/* Only the fields the target thread reads; it counts the command in
	 * its inflight when it takes it (remote_take), on its own thread. */
	cmd->next = NULL;
	cmd->loop = loop;
	cmd->file = NULL;
	cmd->fd = -1;
	cmd->op = IO_OP_POST;
	cmd->flags = 0;
	cmd->bounce = NULL;
	cmd->bclass = -1;
	pthread_mutex_lock(&loop->rmtx);
	was_empty = !loop->rhead;
	if (loop->rtail)
		loop->rtail->next = cmd;
	else
		loop->rhead = cmd;
	loop->rtail = cmd;
	pthread_mutex_unlock(&loop->rmtx);
	if (was_empty) {
		uint64_t one = 1;
		ssize_t n = write(loop->wake_fd, &one, sizeof(one));

		(void)n; /* EAGAIN: the counter is saturated, a wake-up is pending */
	}
}

void io_cancel(struct io_loop *loop, struct io_cmd *target)
{
	struct io_cmd *c;

	if (target->flags & CMD_F_INTERNAL)
		return;
	switch (target->state) {
	case CMD_PENDING:
		/* Not in the kernel (yet or again): finish it here. */
		pend_unlink(loop, target);
		local_push(loop, target, -ECANCELED);
		return;
	case CMD_KERNEL:
		if (target->flags & CMD_F_CANCEL)
			return;
		c = icmd_get(loop);
		if (!c) {
			vlog(VLOG_ERROR, "io", "out of memory for a cancel request");
			return;
		}
		target->flags |= CMD_F_CANCEL;
		c->op = IO_OP_CANCEL;
		c->target = target;
		arm(loop, c);
		return;
	default:
		/* Idle or already completing: nothing to cancel. */
		return;
	}
}

/* ---- completion ---- */

static void finish(struct io_loop *loop, struct io_cmd *cmd, int res)
{
	if (cmd->bounce) {
		bounce_put(loop, cmd->bounce, cmd->bclass);
		cmd->bounce = NULL;
	}
	cmd->state = CMD_IDLE;
	loop->inflight--;
	if (cmd->op == IO_OP_FDATASYNC && cmd->file)
		res = io_file_sync_done(cmd->file, res); /* sticky after page-cache writes */
	cmd->done(cmd, res);
}

/* A readv/writev transferred all it could: copy out, zero-fill, report. */
static void rw_finish(struct io_loop *loop, struct io_cmd *cmd, bool eof)
{
	bool zero_eof = cmd->file->flags & IO_FILE_ZERO_EOF;
	int res = (int)cmd->len;

	if (cmd->op != IO_OP_READV) {
		finish(loop, cmd, res);
		return;
	}
	if (cmd->bounce) {
		uint64_t start = cmd->off - cmd->boff;
		uint64_t n = cmd->xfer > start ? cmd->xfer - start : 0;

		if (n > cmd->len)
			n = cmd->len;
		io_iov_from_buf(cmd->iov, cmd->iovcnt, 0, (char *)cmd->bounce + start, n);
		if (n < cmd->len) {
			if (zero_eof)
				io_iov_memset(cmd->iov, cmd->iovcnt, n, 0, cmd->len - n);
			else
				res = -EIO;
		}
	} else if (eof) {
		if (zero_eof)
			io_iov_memset(cmd->iov, cmd->iovcnt, 0, 0, cmd->len - cmd->xfer);
		else
			res = -EIO;
	}
	finish(loop, cmd, res);
}

static void rw_complete(struct io_loop *loop, struct io_cmd *cmd, int res)
{
	uint64_t total = cmd->bounce ? cmd->blen : cmd->len;
	bool rd = cmd->op == IO_OP_READV;
	unsigned a = cmd_align(cmd);

	if (res == -EAGAIN || res == -EINTR) {
		arm(loop, cmd);
		return;
	}
	if (res < 0) {
		finish(loop, cmd, res);
		return;
	}
	if ((uint64_t)res > total - cmd->xfer) {
		finish(loop, cmd, -EIO);
		return;
	}
	if (res == 0) {
		/* A read at EOF; a write that moves nothing would loop forever. */
		if (rd)
			rw_finish(loop, cmd, true);
		else
			finish(loop, cmd, -EIO);
		return;
	}
	cmd->xfer += (uint64_t)res;
	if (!cmd->bounce)
		iov_advance(cmd, (uint64_t)res);
	if (cmd->xfer == total) {
		rw_finish(loop, cmd, false);
		return;
	}
	/* A short O_DIRECT read that ends off-alignment stopped at EOF. */
	if (rd && a > 1 && ((unsigned)res & (a - 1))) {
		rw_finish(loop, cmd, true);
		return;
	}
	arm(loop, cmd);
}

static void complete(struct io_loop *loop, struct io_cmd *cmd, int res, unsigned cflags)
{
	if (cmd->flags & CMD_F_HYB) { /* one CQE per file SQE */
		cmd->flags &= (uint8_t)~CMD_F_HYB;
		loop->finflight--;
	}
	if (cmd->flags & CMD_F_TRANSIENT) {
		/* The NOP of a fault-hook -EAGAIN/-EINTR: take it as that result. */
		cmd->flags &= (uint8_t)~CMD_F_TRANSIENT;
		res = cmd->res;
	}
	switch (cmd->op) {
	case IO_OP_CANCEL:
		/* 0, -ENOENT (target already done) or -EALREADY: nothing to do. */
		loop->kinflight--;
		icmd_put(loop, cmd);
		return;
	case IO_OP_POLL:
		if (cflags & IORING_CQE_F_MORE) {
			if (res >= 0)
				cmd->done(cmd, res);
			return;
		}
		loop->kinflight--;
		if (res >= 0 && !(cmd->flags & CMD_F_CANCEL)) {
			/* The kernel ended the multishot without an error: re-arm. */
			arm(loop, cmd);
			cmd->done(cmd, res);
			return;
		}
		if (res >= 0) {
			cmd->done(cmd, res);
			res = -ECANCELED;
		}
		finish(loop, cmd, res);
		return;
	case IO_OP_TIMEOUT:
		loop->kinflight--;
		finish(loop, cmd, res == -ETIME ? 0 : res);
		return;
	case IO_OP_FDATASYNC:
	case IO_OP_FALLOCATE:
		loop->kinflight--;
		if (res == -EAGAIN || res == -EINTR)
			arm(loop, cmd);
		else
			finish(loop, cmd, res);
		return;
	case IO_OP_READV:
	case IO_OP_WRITEV:
		loop->kinflight--;
		rw_complete(loop, cmd, res);
		return;
	default:
		loop->kinflight--;
		return;
	}
}

static enum io_poll_kind kind_of(const struct io_loop *loop, const struct io_cmd *cmd)
{
	if (cmd == &loop->wake_cmd)
		return IO_POLL_AFTER_REMOTE;
	switch (cmd->op) {
	case IO_OP_READV:
	case IO_OP_WRITEV:
	case IO_OP_FDATASYNC:
	case IO_OP_FALLOCATE:
		return IO_POLL_AFTER_FILE;
	default:
		return IO_POLL_AFTER_OTHER;
	}
}

static int reap(struct io_loop *loop)
{
	unsigned max = loop->klimit * 2;
	int n = 0;

	while ((unsigned)n < max) {
		struct io_uring_cqe *cqe;
		struct io_cmd *cmd;
		unsigned cflags;
		int res;

		unsigned head;
		bool got = false;

		/* Userspace only: the one io_uring_enter of the iteration is done. */
		io_uring_for_each_cqe(&loop->ring, head, cqe)
		{
			got = true;
			break;
		}
		if (!got)
			break;
		cmd = io_uring_cqe_get_data(cqe);
		res = cqe->res;
		cflags = cqe->flags;
		io_uring_cq_advance(&loop->ring, 1);
		if (!cmd)
			continue;
		if (loop->poll_await) {
			/* The event that ended a timed wait: it keys the next. */
			loop->poll_await = false;
			loop->poll_kind = kind_of(loop, cmd);
		}
		complete(loop, cmd, res, cflags);
		n++;
	}
	return n;
}

static int run_local(struct io_loop *loop)
{
	struct io_cmd *cmd = loop->local_head;
	int n = 0;

	/* Only what is queued now; completions queued by done()s wait a turn. */
	loop->local_head = NULL;
	loop->local_tail = NULL;
	while (cmd) {
		struct io_cmd *next = cmd->next;

		cmd->next = NULL;
		finish(loop, cmd, cmd->res);
		n++;
		cmd = next;
	}
	return n;
}

/* ---- deferred hooks ---- */

void io_defer_add(struct io_loop *loop, struct io_defer *d)
{
	struct io_defer **pp;

	for (pp = &loop->defers; *pp; pp = &(*pp)->next) {
		if (*pp == d)
			return;
	}
	d->next = NULL;
	*pp = d;
}

void io_defer_del(struct io_loop *loop, struct io_defer *d)
{
	struct io_defer **pp;

	for (pp = &loop->defers; *pp; pp = &(*pp)->next) {
		if (*pp != d)
			continue;
		*pp = d->next;
		if (loop->defer_cursor == d)
			loop->defer_cursor = d->next;
		d->next = NULL;
		return;
	}
}

static void run_defers(struct io_loop *loop)
{
	struct io_defer *d;

	for (d = loop->defers; d; d = loop->defer_cursor) {
		loop->defer_cursor = d->next;
		d->fn(d);
	}
	loop->defer_cursor = NULL;
}

/* ---- running ---- */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static bool taskrun_pending(const struct io_loop *loop)
{
	return IO_URING_READ_ONCE(*loop->ring.sq.kflags) & IORING_SQ_TASKRUN;
}

/*
 * Busy-poll the CQ until @deadline, re-running the deferred hooks. 0 if
 * nothing came, 1 if a CQE did, 2 if the hooks or a local completion gave
 * work without one, 3 if a yield gave the CPU away (io_loop_set_poll_yield).
 */
static int busy_poll(struct io_loop *loop, uint64_t deadline)
{
	uint64_t t;

	io_uring_submit(&loop->ring);
	for (;;) {
		/* The clock costs more than a spin: read it every few spins. */
		for (int spin = 0; spin < 8; spin++) {
			if (taskrun_pending(loop))
				io_uring_get_events(&loop->ring);
			if (io_uring_cq_ready(&loop->ring))
				return 1;
			run_defers(loop);
			flush_pending(loop);
			if (loop->local_head || io_uring_sq_ready(&loop->ring))
				return 2;
		}
		t = now_ns();
		if (t >= deadline)
			return 0;
		if (loop->poll_yield) {
			/* Another thread runnable here runs now; back soon
			 * only if none was (the system call's own cost). */
			sched_yield();
			t = now_ns() - t;
			if (t > IO_POLL_YIELD_GAVE_NS) {
				loop->poll_gave++;
				loop->poll_away_ns += t;
				if (taskrun_pending(loop))
					io_uring_get_events(&loop->ring);
				return io_uring_cq_ready(&loop->ring) ? 1 : 3;
			}
		}
	}
}

/*
 * Hybrid polling: with file I/O in flight, sleep the first part of the wait
 * its completion is expected after (io_poll_hybrid_sleep), then let the
 * caller poll the rest of the window. The sleep is io_uring_enter's own
 * timed wait (an hrtimer, no timer slack): a CQE still ends it at once.
 * Hooks do not run meanwhile; a guest's kick is a CQE. 1 if a CQE came
 * during it, else 0; @slept: the time asleep.
 */
static int hybrid_sleep(struct io_loop *loop, uint64_t start, uint64_t w, uint64_t *slept)
{
	uint64_t s = io_poll_hybrid_sleep(loop->hyb_mean_ns, loop->hyb_pct, w);
	struct __kernel_timespec ts;
	struct io_uring_cqe *cqe;

	if (!s)
		return 0;
	/* A CQE already owed (task work: a kick's poll, typically, whose
	 * request the hooks already found) would end the sleep at once, and
	 * the wait with it: take it first. */
	if (taskrun_pending(loop))
		io_uring_get_events(&loop->ring);
	if (io_uring_cq_ready(&loop->ring))
		return 1;
	ts.tv_sec = 0;
	ts.tv_nsec = (long long)s;
	loop->hyb_sleeps++;
	/* -ETIME (the usual end), -EINTR: either way, look at the CQ. */
	(void)io_uring_submit_and_wait_timeout(&loop->ring, &cqe, 1, &ts, NULL);
	*slept = now_ns() - start;
	loop->hyb_slept_ns += *slept;
	if (taskrun_pending(loop))
		io_uring_get_events(&loop->ring);
	if (io_uring_peek_cqe(&loop->ring, &cqe) != 0 || !cqe)
		return 0;
	loop->hyb_woken++;
	if (io_uring_cqe_get_data(cqe) &&
	    is_file_op(((struct io_cmd *)io_uring_cqe_get_data(cqe))->op))
		loop->hyb_woken_file++;
	return 1;
}

/*
 * Busy-poll only while it pays, judged by the waits themselves: the window
 * of this wait is the one learnt after the kind of event that ended the
 * previous wait (a guest's request found by a hook, a file I/O completion,
 * a post from another thread), since that event decides what is awaited
 * now: after a request found, its disk read or its hop to the owner
 * thread; after a completion, the next request or the next I/O. true if
 * there is work without sleeping. @adapt: false when the group
 * kept this wait from polling, which says nothing of the window.
 */
static bool poll_adaptive(struct io_loop *loop, uint64_t start, bool hyb, bool *adapt)
{
	uint64_t w = io_loop_poll_window(loop, loop->poll_kind), slept = 0,
		 away = loop->poll_away_ns;
	int found = 0;

	*adapt = true;
	if (!w)
		return false;
	/* The hybrid sleep first, outside the group: a loop asleep holds no
	 * CPU, so it must not hold the place of a loop that would poll. */
	if (hyb)
		found = hybrid_sleep(loop, start, w, &slept);
	if (!found) {
		/* Its group full: others hold the CPUs a poll would take. Sleep. */
		if (loop->poll_group && !io_poll_group_enter(loop->poll_group)) {
			*adapt = false;
			return false;
		}
		found = busy_poll(loop, start + w);
		if (loop->poll_group)
			io_poll_group_leave(loop->poll_group);
		if (found == 3) {
			/* The CPU was wanted: sleep; the windows learn nothing. */
			found = 0;
			*adapt = false;
		}
	}
	loop->poll_polled++;
	loop->poll_caught += found != 0;
	/* (not the time a yield gave to another thread: it polled nothing) */
	loop->poll_spent_ns += now_ns() - start - slept - (loop->poll_away_ns - away);
	if (found == 2) {
		loop->poll_await = false;
		loop->poll_kind = IO_POLL_AFTER_OTHER;
	}
	return found != 0;
}

/* The loop running on this thread (io_loop_current). */
static __thread struct io_loop *cur_loop;

struct io_loop *io_loop_current(void)
{
	return cur_loop;
}

int io_loop_run_once(struct io_loop *loop, bool wait)
{
	struct io_loop *prev = cur_loop;
	enum io_poll_kind kind = IO_POLL_AFTER_OTHER;
	uint64_t start = 0, max = 0, waited = 0;
	bool block, adapt = false, timed, hyb = false;
	int ret, n;

	if (loop->running)
		return -EBUSY;
	loop->running = true;
	cur_loop = loop;
	flush_pending(loop);
	block = wait && !loop->local_head && loop->kinflight > 0;
	if (block && loop->poll_ns) {
		kind = loop->poll_kind;
		/* The bound this wait polls under: a hook run by the poll may
		 * pause polling (io_loop_set_poll_ns(0): requests found), which
		 * must not read as an event later than any bound. */
		max = loop->poll_ns;
		start = now_ns();
		loop->poll_waits++;
		loop->poll_await = true;
		/* Hybrid: only the wait right after file I/O was submitted, for
		 * which the learnt wait stands; later ones (a read still in
		 * flight after another event) would await it from mid-way. */
		hyb = loop->hyb_pct && loop->finflight && loop->fsub;
		loop->fsub = false;
		block = !poll_adaptive(loop, start, hyb, &adapt);
	}
	ret = io_uring_submit_and_wait(&loop->ring, block ? 1 : 0);
	if (adapt) {
		waited = now_ns() - start;
		io_poll_window_update(&loop->poll_win[kind], waited, max);
	}
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY && ret != -ETIME) {
		loop->poll_await = false;
		loop->running = false;
		cur_loop = prev;
		return ret;
	}
	if (!block && taskrun_pending(loop))
		io_uring_get_events(&loop->ring);
	timed = loop->poll_await;
	n = reap(loop);
	/* Hybrid polling learns how long the wait after a file submission
	 * lasts when a file completion ends it (within the bound: a later one
	 * is not worth polling for anyway). */
	if (hyb && adapt && timed && !loop->poll_await && loop->poll_kind == IO_POLL_AFTER_FILE &&
	    waited <= max)
		io_poll_hybrid_learn(&loop->hyb_mean_ns, waited);
	loop->poll_await = false; /* ended by no CQE (a signal): the kind stays */
	n += run_local(loop);
	run_defers(loop);
	loop->running = false;
	cur_loop = prev;
	return n;
}

int io_loop_run(struct io_loop *loop)
{
	int ret = 0;

	while (!loop->stop) {
		ret = io_loop_run_once(loop, true);
		if (ret < 0)
			break;
		ret = 0;
		/* Nothing could ever wake us up again. */
		if (!loop->kinflight && !loop->pend_head && !loop->local_head &&
		    !io_uring_sq_ready(&loop->ring))
			break;
	}
	loop->stop = false;
	return ret;
}
