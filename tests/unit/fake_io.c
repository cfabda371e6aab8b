/* SPDX-License-Identifier: MIT */
/*
 * tests/unit/fake_io.c — io.h over in-memory files, recording every write
 * and fdatasync (see fake_io.h). Single-threaded, for unit tests only.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fake_io.h"

#define FAKE_FILES   256
#define FAKE_FD_BASE 10000
#define INJ_MAX      32

struct ffile {
	char path[512];
	uint8_t *data;
	uint64_t size, cap;
	/* Blocks of BLK bytes of data that may not be zero (a bit each, set by
	 * writes, cleared by zeroing a whole block): images grow by
	 * preallocated chunks of up to 64 MiB, mostly zeroes, which the copies
	 * below skip (into calloc'd buffers: pages never touched cost nothing). */
	uint8_t *nz;
	uint8_t *base; /* contents at the last fake_log_reset() */
	uint64_t base_size;
	uint8_t *base_nz; /* nz then */
	bool used;
	bool blockdev;   /* fake_set_blockdev() */
	uint64_t wz_max; /* its write-zeroes offload (0: none) */
};

struct inj {
	uint8_t op;
	bool every;
	unsigned count;
	int res;
};

struct io_loop {
	struct io_cmd *head, *tail; /* submitted, not completed */
	struct io_cmd *timers;      /* timeouts: fire when nothing else is pending */
	unsigned inflight;
	bool running, stop;
	struct inj inj[INJ_MAX];
	struct inj hold[INJ_MAX]; /* fake_hold(): res = the iterations to hold */
	struct io_defer *defers;  /* registered deferred hooks */
	bool run_defers;          /* fake_set_defers() */
};

static struct ffile g_files[FAKE_FILES];
static struct fake_log *g_log;
static size_t g_nlog, g_caplog;
static uint64_t g_logged, g_reset_at; /* entries ever logged; g_logged at the last reset */
static size_t g_span;                 /* the most entries logged while one command was in flight */
static unsigned g_shuffle;
static unsigned g_sync_hold; /* fake_set_sync_hold() */
static struct fake_read *g_reads;
static size_t g_nreads, g_capreads;
static struct io_loop *g_loop;

/* ---- files ---- */

#define BLK 65536u

static bool zero_block(const uint8_t *p, uint64_t n)
{
	static const uint8_t zero[BLK];

	return memcmp(p, zero, n) == 0;
}

static size_t nz_bytes(uint64_t cap)
{
	return (size_t)((cap + BLK - 1) / BLK / 8 + 1);
}

static bool nz_get(const uint8_t *nz, uint64_t blk)
{
	return nz[blk / 8] & (1u << (blk % 8));
}

/* Copy the blocks of @src marked in @nz below @end into @dst (zero elsewhere). */
static void nz_copy(uint8_t *dst, const uint8_t *src, const uint8_t *nz, uint64_t end)
{
	for (uint64_t b = 0; b * BLK < end; b++)
		if (nz_get(nz, b))
			memcpy(dst + b * BLK, src + b * BLK,
			       end - b * BLK < BLK ? end - b * BLK : BLK);
}

/* [@off, @off + @len) of the file's data was written: its bytes may not be zero. */
static void written(struct ffile *f, uint64_t off, uint64_t len)
{
	for (uint64_t b = off / BLK; len && b <= (off + len - 1) / BLK; b++)
		f->nz[b / 8] |= (uint8_t)(1u << (b % 8));
}

/* Zero [@off, @end) of the file's data (below its capacity). */
static void zeroed(struct ffile *f, uint64_t off, uint64_t end)
{
	for (uint64_t b = off / BLK; b * BLK < end; b++) {
		uint64_t lo = b * BLK > off ? b * BLK : off;
		uint64_t hi = (b + 1) * BLK < end ? (b + 1) * BLK : end;

		if (!nz_get(f->nz, b))
			continue; /* zero already */
		memset(f->data + lo, 0, hi - lo);
		if (hi - lo == BLK)
			f->nz[b / 8] &= (uint8_t) ~(1u << (b % 8));
	}
}

/* The base for crash images: the contents now. */
static int base_take(struct ffile *f)
{
	free(f->base);
	free(f->base_nz);
	f->base_size = f->size;
	f->base = calloc(1, f->size + 1);
	f->base_nz = malloc(nz_bytes(f->cap));
	if (!f->base || !f->base_nz)
		return -ENOMEM;
	memcpy(f->base_nz, f->nz, nz_bytes(f->cap));
	nz_copy(f->base, f->data, f->nz, f->size);
	return 0;
}

static int load(const char *path)
{
	int fd, id = -1;
	struct ffile *f;
	off_t sz;

	for (int i = 0; i < FAKE_FILES; i++)
		if (g_files[i].used && strcmp(g_files[i].path, path) == 0)
			return i;
	for (int i = 0; i < FAKE_FILES; i++)
		if (!g_files[i].used) {
			id = i;
			break;
		}
	if (id < 0)
		return -EMFILE;
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	sz = lseek(fd, 0, SEEK_END);
	f = &g_files[id];
	memset(f, 0, sizeof(*f));
	snprintf(f->path, sizeof(f->path), "%s", path);
	f->cap = (uint64_t)sz + 65536;
	f->data = calloc(1, f->cap);
	if (!f->data) {
		close(fd);
		return -ENOMEM;
	}
	if (sz && pread(fd, f->data, (size_t)sz, 0) != sz) {
		close(fd);
		free(f->data);
		return -EIO;
	}
	close(fd);
	f->size = (uint64_t)sz;
	f->nz = calloc(1, nz_bytes(f->cap));
	if (!f->nz) {
		free(f->data);
		return -ENOMEM;
	}
	f->used = true;
	written(f, 0, f->size);
	base_take(f);
	return id;
}

int fake_file_load(const char *path)
{
	return load(path);
}

void fake_set_blockdev(int id, uint64_t wz_max)
{
	g_files[id].blockdev = true;
	g_files[id].wz_max = wz_max;
}

/* Sparse, as `cp --sparse=always`: zero blocks are holes (blocks not in
 * @nz, when given, are zero: not even read). */
static int save_sparse(const uint8_t *b, uint64_t len, const uint8_t *nz, const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int ret = 0;

	if (fd < 0)
		return -errno;
	for (uint64_t off = 0; off < len && !ret; off += BLK) {
		uint64_t n = len - off < BLK ? len - off : BLK;

		if ((!nz || nz_get(nz, off / BLK)) && !zero_block(b + off, n) &&
		    pwrite(fd, b + off, n, (off_t)off) != (ssize_t)n)
			ret = -EIO;
	}
	if (!ret && ftruncate(fd, (off_t)len) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

int fake_file_save(int id, const char *path)
{
	return save_sparse(g_files[id].data, g_files[id].size, g_files[id].nz, path);
}

int fake_buf_save(const uint8_t *b, uint64_t len, const char *path)
{
	return save_sparse(b, len, NULL, path);
}

void fake_file_drop(int id)
{
	struct ffile *f = &g_files[id];

	free(f->data);
	free(f->nz);
	free(f->base);
	free(f->base_nz);
	memset(f, 0, sizeof(*f));
}

int fake_file_id(const struct io_file *f)
{
	return f->fd - FAKE_FD_BASE;
}

const uint8_t *fake_file_data(int id, uint64_t *size)
{
	*size = g_files[id].size;
	return g_files[id].data;
}

static int grow(struct ffile *f, uint64_t end)
{
	if (end > f->cap) {
		uint64_t ncap = f->cap * 2 > end ? f->cap * 2 : end + 65536;
		uint8_t *nd = calloc(1, ncap), *nnz = calloc(1, nz_bytes(ncap));

		if (!nd || !nnz) {
			free(nd);
			free(nnz);
			return -ENOMEM;
		}
		nz_copy(nd, f->data, f->nz, f->cap);
		memcpy(nnz, f->nz, nz_bytes(f->cap));
		free(f->data);
		free(f->nz);
		f->data = nd;
		f->nz = nnz;
		f->cap = ncap;
	}
	if (end > f->size)
		f->size = end;
	return 0;
}

static void log_add(uint8_t type, int file, uint64_t off, uint64_t len, const void *data,
		    size_t sub)
{
	struct fake_log *l;

	if (g_nlog == g_caplog) {
		g_caplog = g_caplog ? g_caplog * 2 : 1024;
		g_log = realloc(g_log, g_caplog * sizeof(*g_log));
	}
	l = &g_log[g_nlog++];
	l->type = type;
	l->file = file;
	l->off = off;
	l->len = len;
	l->sub = sub;
	if (g_nlog - 1 - sub > g_span)
		g_span = g_nlog - 1 - sub;
	g_logged++;
	l->data = NULL;
	if (type == FAKE_WRITE) {
		l->data = malloc(len ? len : 1);
		if (data)
			memcpy(l->data, data, len);
		else
			memset(l->data, 0, len);
	}
}

void fake_log_reset(void)
{
	for (size_t i = 0; i < g_nlog; i++)
		free(g_log[i].data);
	g_nlog = 0;
	g_span = 0;
	g_reset_at = g_logged;
	for (int i = 0; i < FAKE_FILES; i++) {
		struct ffile *f = &g_files[i];

		if (f->used)
			base_take(f);
	}
}

size_t fake_log_count(void)
{
	return g_nlog;
}

const struct fake_log *fake_log_get(size_t i)
{
	return &g_log[i];
}

static void read_add(int file, uint64_t off, uint64_t len)
{
	if (g_nreads == g_capreads) {
		size_t ncap = g_capreads ? g_capreads * 2 : 1024;
		struct fake_read *n = realloc(g_reads, ncap * sizeof(*n));

		if (!n)
			return;
		g_reads = n;
		g_capreads = ncap;
	}
	g_reads[g_nreads++] = (struct fake_read){file, off, len};
}

size_t fake_read_count(void)
{
	return g_nreads;
}

const struct fake_read *fake_read_get(size_t i)
{
	return &g_reads[i];
}

void fake_reads_reset(void)
{
	g_nreads = 0;
}

void fake_set_shuffle(unsigned seed)
{
	g_shuffle = seed;
}

static unsigned rnd(unsigned *s)
{
	*s = *s * 1103515245u + 12345u;
	return *s >> 8;
}

int fake_crash_image(int id, size_t upto, unsigned seed, uint8_t **out, uint64_t *len)
{
	struct ffile *f = &g_files[id];
	size_t durable = 0, end; /* the writes among the first @durable entries are */
	uint64_t size = f->base_size, cap = f->base_size + 65536;
	uint8_t *b;

	if (upto > g_nlog)
		upto = g_nlog;
	/* a sync ended before the crash covers what had completed when it
	 * was submitted (not what completed while it ran) */
	for (size_t i = 0; i < upto; i++)
		if (g_log[i].type == FAKE_FSYNC && g_log[i].file == id && g_log[i].sub > durable)
			durable = g_log[i].sub;
	/* commands in flight at the crash were submitted before it and ended
	 * at most g_span entries after it */
	end = upto + g_span < g_nlog ? upto + g_span + 1 : g_nlog;
	for (size_t i = 0; i < end; i++)
		if (g_log[i].file == id && g_log[i].sub < upto && g_log[i].off + g_log[i].len > cap)
			cap = g_log[i].off + g_log[i].len;
	b = calloc(1, cap);
	if (!b)
		return -ENOMEM;
	nz_copy(b, f->base, f->base_nz, f->base_size); /* calloc'd: the rest is zero */
	/* then any subset of the others: completed, or in flight at the crash
	 * (submitted before entry @upto, completed after it) */
	for (size_t i = 0; i < end; i++) {
		struct fake_log *l = &g_log[i];

		if (l->file != id || l->type == FAKE_FSYNC)
			continue;
		if (i >= upto && l->sub >= upto)
			continue; /* submitted after the crash */
		if (i >= durable && (!seed || rnd(&seed) % 2))
			continue;
		if (l->type == FAKE_WRITE)
			memcpy(b + l->off, l->data, l->len);
		if (l->off + l->len > size)
			size = l->off + l->len;
	}
	*out = b;
	*len = size;
	return 0;
}

unsigned fake_pending(void)
{
	unsigned n = 0;

	if (!g_loop)
		return 0;
	for (struct io_cmd *c = g_loop->head; c; c = c->next)
		n++;
	return n;
}

/* ---- loop ---- */

int io_loop_init(struct io_loop **loopp, unsigned entries)
{
	(void)entries;
	*loopp = calloc(1, sizeof(**loopp));
	if (!*loopp)
		return -ENOMEM;
	g_loop = *loopp;
	return 0;
}

void io_loop_exit(struct io_loop *loop)
{
	if (g_loop == loop)
		g_loop = NULL;
	free(loop);
}

unsigned io_loop_inflight(const struct io_loop *loop)
{
	return loop->inflight;
}

void io_loop_stop(struct io_loop *loop)
{
	loop->stop = true;
}

struct io_loop *io_loop_current(void)
{
	return NULL; /* one thread: nothing is submitted from another loop */
}

void io_defer_add(struct io_loop *loop, struct io_defer *d)
{
	for (struct io_defer *x = loop->defers; x; x = x->next)
		if (x == d)
			return;
	d->next = loop->defers;
	loop->defers = d;
}

void io_defer_del(struct io_loop *loop, struct io_defer *d)
{
	for (struct io_defer **pp = &loop->defers; *pp; pp = &(*pp)->next) {
		if (*pp == d) {
			*pp = d->next;
			d->next = NULL;
			return;
		}
	}
}

void fake_set_sync_hold(unsigned iters)
{
	g_sync_hold = iters;
}

void fake_set_defers(bool on)
{
	if (g_loop)
		g_loop->run_defers = on;
}

/* At the end of an iteration, as io/loop.c does (a hook may delete itself). */
static void run_defers(struct io_loop *loop)
{
	struct io_defer *arr[64];
	size_t n = 0;

	if (!loop->run_defers)
		return;
	for (struct io_defer *d = loop->defers; d && n < 64; d = d->next)
		arr[n++] = d;
	for (size_t i = 0; i < n; i++) {
		bool still = false;

		for (struct io_defer *d = loop->defers; d; d = d->next)
			still |= d == arr[i];
		if (still)
			arr[i]->fn(arr[i]);
	}
}

void io_loop_set_poll_ns(struct io_loop *loop, uint64_t max_ns)
{
	(void)loop;
	(void)max_ns;
}

static struct ffile *file_of(struct io_file *f)
{
	int id = f->fd - FAKE_FD_BASE;

	if (id < 0 || id >= FAKE_FILES || !g_files[id].used)
		return NULL;
	return &g_files[id];
}

/* fake_log.sub of a command submitted when g_logged was @at (0: before the record began). */
static size_t sub_of(uint64_t at)
{
	return at > g_reset_at ? (size_t)(at - g_reset_at) : 0;
}

/* Perform a command; returns its result. */
static int execute(struct io_cmd *c)
{
	struct ffile *f = c->file ? file_of(c->file) : NULL;
	int id = f ? (int)(f - g_files) : -1;
	uint64_t len = 0;

	if (c->res < 0) /* injected */
		return c->res;
	switch (c->op) {
	case IO_OP_READV: {
		uint64_t off = c->off;

		for (unsigned i = 0; i < c->iovcnt; i++)
			len += c->iov[i].iov_len;
		if (!f)
			return -EBADF;
		if (off + len > f->size && !(c->file->flags & IO_FILE_ZERO_EOF))
			return -EIO;
		if (len)
			read_add(id, off, len);
		for (unsigned i = 0; i < c->iovcnt; i++) {
			uint64_t n = c->iov[i].iov_len, have = 0;

			if (off < f->size)
				have = f->size - off < n ? f->size - off : n;
			memcpy(c->iov[i].iov_base, f->data + off, have);
			memset((uint8_t *)c->iov[i].iov_base + have, 0, n - have);
			off += n;
		}
		return (int)len;
	}
	case IO_OP_WRITEV: {
		uint64_t off = c->off;
		uint8_t *tmp;

		for (unsigned i = 0; i < c->iovcnt; i++)
			len += c->iov[i].iov_len;
		if (!f)
			return -EBADF;
		if (c->file->flags & IO_FILE_RDONLY)
			return -EBADF;
		if (grow(f, off + len) < 0)
			return -ENOMEM;
		tmp = malloc(len ? len : 1);
		for (unsigned i = 0; i < c->iovcnt; i++) {
			memcpy(f->data + off, c->iov[i].iov_base, c->iov[i].iov_len);
			off += c->iov[i].iov_len;
		}
		written(f, c->off, len);
		memcpy(tmp, f->data + c->off, len);
		log_add(FAKE_WRITE, id, c->off, len, tmp, sub_of(c->boff));
		free(tmp);
		return (int)len;
	}
	case IO_OP_FDATASYNC:
		if (!f)
			return -EBADF;
		/* it covers what completed before it was submitted */
		log_add(FAKE_FSYNC, id, 0, 0, NULL, sub_of(c->boff));
		return 0;
	case IO_OP_FALLOCATE:
		if (!f)
			return -EBADF;
		if (f->blockdev && c->mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) &&
		    !f->wz_max)
			return -EOPNOTSUPP; /* no write-zeroes offload: no fallback either */
		if (c->mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE)) {
			uint64_t end = c->off + c->len;

			if (end > f->size && (c->mode & FALLOC_FL_KEEP_SIZE))
				end = f->size;
			if (end > c->off) {
				if (grow(f, end) < 0)
					return -ENOMEM;
				zeroed(f, c->off, end);
				log_add(FAKE_WRITE, id, c->off, end - c->off, NULL,
					sub_of(c->boff));
			}
			return 0;
		}
		if (!(c->mode & FALLOC_FL_KEEP_SIZE) && c->off + c->len > f->size) {
			if (grow(f, c->off + c->len) < 0)
				return -ENOMEM;
			log_add(FAKE_SIZE, id, c->off, c->len, NULL, sub_of(c->boff));
		}
		return 0;
	case IO_OP_TIMEOUT:
	case IO_OP_POST:
		return 0;
	default:
		return -EINVAL;
	}
}

static void finish(struct io_loop *loop, struct io_cmd *c, int res)
{
	c->state = 0;
	loop->inflight--;
	c->done(c, res);
}

int io_loop_run_once(struct io_loop *loop, bool wait)
{
	struct io_cmd *list, *c;
	struct io_cmd *arr[4096];
	size_t n = 0;

	if (loop->running)
		return -EBUSY;
	loop->running = true;
	list = loop->head;
	loop->head = loop->tail = NULL;
	if (!list && wait && loop->timers) {
		/* idle: time passes, timers fire */
		list = loop->timers;
		loop->timers = NULL;
	}
	for (c = list; c && n < 4096; c = c->next)
		arr[n++] = c;
	if (c) {
		/* too many: the rest waits for the next iteration */
		arr[n - 1]->next = NULL;
		loop->head = c;
		for (loop->tail = c; loop->tail->next; loop->tail = loop->tail->next)
			;
	}
	if (g_shuffle) {
		for (size_t i = n; i > 1; i--) {
			size_t j = rnd(&g_shuffle) % i;
			struct io_cmd *t = arr[i - 1];

			arr[i - 1] = arr[j];
			arr[j] = t;
		}
		if (!g_shuffle)
			g_shuffle = 1;
	}
	for (size_t i = 0; i < n; i++) {
		c = arr[i];
		c->next = NULL;
		if (c->cap) { /* held (fake_hold): one iteration less, then again */
			c->cap--;
			if (loop->tail)
				loop->tail->next = c;
			else
				loop->head = c;
			loop->tail = c;
			continue;
		}
		finish(loop, c, execute(c));
	}
	loop->running = false;
	run_defers(loop);
	return (int)n;
}

int io_loop_run(struct io_loop *loop)
{
	while (!loop->stop && (loop->head || loop->timers)) {
		int ret = io_loop_run_once(loop, true);

		if (ret < 0)
			return ret;
	}
	loop->stop = false;
	return 0;
}

static int inject_apply(struct io_loop *loop, uint8_t op)
{
	for (int i = 0; i < INJ_MAX; i++) {
		struct inj *j = &loop->inj[i];

		if (j->op != op)
			continue;
		if (j->every)
			return j->res;
		if (--j->count == 0) {
			int res = j->res;

			j->op = IO_OP_NONE;
			return res;
		}
	}
	return 0;
}

int io_loop_inject(struct io_loop *loop, enum io_op op, unsigned nth, int res)
{
	if (res >= 0)
		return -EINVAL;
	for (int i = 0; i < INJ_MAX; i++) {
		if (loop->inj[i].op == IO_OP_NONE) {
			loop->inj[i] = (struct inj){(uint8_t)op, nth == 0, nth, res};
			return 0;
		}
	}
	return -ENOSPC;
}

void io_loop_inject_clear(struct io_loop *loop)
{
	memset(loop->inj, 0, sizeof(loop->inj));
}

int fake_hold(enum io_op op, unsigned nth, unsigned iters)
{
	if (!g_loop || !nth || !iters)
		return -EINVAL;
	for (int i = 0; i < INJ_MAX; i++) {
		if (g_loop->hold[i].op == IO_OP_NONE) {
			g_loop->hold[i] = (struct inj){(uint8_t)op, false, nth, (int)iters};
			return 0;
		}
	}
	return -ENOSPC;
}

/* submit(): the iterations a new command of @op is held (fake_hold), else 0. */
static unsigned hold_apply(struct io_loop *loop, uint8_t op)
{
	for (int i = 0; i < INJ_MAX; i++) {
		struct inj *j = &loop->hold[i];

		if (j->op == op && --j->count == 0) {
			j->op = IO_OP_NONE;
			return (unsigned)j->res;
		}
	}
	return 0;
}

static void submit(struct io_loop *loop, struct io_cmd *cmd, uint8_t op, struct io_file *f)
{
	if (cmd->state)
		abort(); /* resubmitting an in-flight command */
	cmd->state = 1;
	cmd->op = op;
	cmd->file = f;
	cmd->loop = loop;
	cmd->next = NULL;
	/* as in io/loop.c, posts never consult the fault hook */
	cmd->res = op == IO_OP_POST ? 0 : inject_apply(loop, op);
	cmd->cap = op == IO_OP_POST || op == IO_OP_TIMEOUT ? 0 : hold_apply(loop, op);
	if (op == IO_OP_FDATASYNC && g_sync_hold > cmd->cap)
		cmd->cap = g_sync_hold;
	cmd->boff = g_logged; /* the record when it was submitted (fake_log.sub) */
	loop->inflight++;
	if (op == IO_OP_TIMEOUT) {
		cmd->next = loop->timers;
		loop->timers = cmd;
		return;
	}
	if (loop->tail)
		loop->tail->next = cmd;
	else
		loop->head = cmd;
	loop->tail = cmd;
}

void io_post(struct io_loop *loop, struct io_cmd *cmd)
{
	submit(loop, cmd, IO_OP_POST, NULL);
}

void io_readv(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	      unsigned iovcnt, uint64_t off)
{
	cmd->iov = iov;
	cmd->iovcnt = (uint16_t)iovcnt;
	cmd->off = off;
	submit(loop, cmd, IO_OP_READV, f);
}

void io_writev(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, struct iovec *iov,
	       unsigned iovcnt, uint64_t off)
{
	cmd->iov = iov;
	cmd->iovcnt = (uint16_t)iovcnt;
	cmd->off = off;
	submit(loop, cmd, IO_OP_WRITEV, f);
}

void io_read(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, void *buf, size_t len,
	     uint64_t off)
{
	cmd->iov1 = (struct iovec){buf, len};
	io_readv(loop, cmd, f, &cmd->iov1, 1, off);
}

void io_write(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, const void *buf,
	      size_t len, uint64_t off)
{
	cmd->iov1 = (struct iovec){(void *)buf, len};
	io_writev(loop, cmd, f, &cmd->iov1, 1, off);
}

void io_fdatasync(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f)
{
	submit(loop, cmd, IO_OP_FDATASYNC, f);
}

void io_fallocate(struct io_loop *loop, struct io_cmd *cmd, struct io_file *f, int mode,
		  uint64_t off, uint64_t len)
{
	cmd->mode = mode;
	cmd->off = off;
	cmd->len = len;
	submit(loop, cmd, IO_OP_FALLOCATE, f);
}

void io_poll(struct io_loop *loop, struct io_cmd *cmd, int fd, uint32_t events)
{
	(void)fd;
	(void)events;
	cmd->state = 1;
	cmd->loop = loop;
	loop->inflight++;
}

void io_timeout(struct io_loop *loop, struct io_cmd *cmd, uint64_t ns)
{
	cmd->ns = ns;
	submit(loop, cmd, IO_OP_TIMEOUT, NULL);
}

void io_cancel(struct io_loop *loop, struct io_cmd *target)
{
	struct io_cmd **pp;

	for (pp = &loop->timers; *pp; pp = &(*pp)->next) {
		if (*pp == target) {
			*pp = target->next;
			target->next = NULL;
			target->res = -ECANCELED;
			if (loop->tail)
				loop->tail->next = target;
			else
				loop->head = target;
			loop->tail = target;
			return;
		}
	}
}

/* ---- files ---- */

int io_file_open(struct io_file *f, const char *path, unsigned flags)
{
	int id = load(path);

	memset(f, 0, sizeof(*f));
	f->fd = -1;
	f->bfd = -1;
	if (id < 0)
		return id;
	f->fd = FAKE_FD_BASE + id;
	f->align = 1;
	f->flags = flags & (IO_FILE_RDONLY | IO_FILE_ZERO_EOF);
	if (g_files[id].blockdev) {
		f->flags |= IO_FILE_BLOCKDEV;
		f->wz_max = g_files[id].wz_max;
	}
	memset(f->fixed, 0, sizeof(f->fixed));
	f->size = g_files[id].size;
	return 0;
}

static int g_reopen_err;

void fake_set_reopen_err(int err)
{
	g_reopen_err = err;
}

int io_file_reopen(const struct io_file *f, struct io_file *nf)
{
	if (f->flags & IO_FILE_RDONLY)
		return -EBADF;
	if (g_reopen_err)
		return g_reopen_err;
	memset(nf, 0, sizeof(*nf));
	nf->fd = f->fd; /* the same in-memory file */
	nf->bfd = -1;
	nf->align = 1;
	nf->flags = f->flags;
	nf->wz_max = f->wz_max;
	nf->size = f->size;
	return 0;
}

int io_file_from_fd(struct io_file *f, int fd, unsigned flags)
{
	(void)f;
	(void)flags;
	close(fd);
	return -ENOTSUP;
}

void io_file_close(struct io_file *f)
{
	f->fd = -1;
}

int io_file_get_size(struct io_file *f, uint64_t *size)
{
	struct ffile *ff = file_of(f);

	if (!ff)
		return -EBADF;
	*size = ff->size;
	return 0;
}

/* The engine gives back its unused tail at close (and going read-only):
 * the in-memory file is cut there (its bytes past the end zeroed, so a later
 * growth reads zeroes) or extended, as ftruncate does. Not logged: crash
 * images are of what happened before. */
int io_file_truncate(struct io_file *f, uint64_t size)
{
	struct ffile *ff = file_of(f);

	if (!ff)
		return -EBADF;
	if (ff->blockdev)
		return -EINVAL; /* as ftruncate on a block device */
	if (size < ff->size)
		zeroed(ff, size, ff->size);
	else if (grow(ff, size) < 0)
		return -ENOMEM;
	ff->size = size;
	return 0;
}

int io_file_pread_sync(struct io_file *f, void *buf, size_t len, uint64_t off)
{
	struct ffile *ff = file_of(f);
	uint64_t have = 0;

	if (!ff)
		return -EBADF;
	if (off < ff->size)
		have = ff->size - off < len ? ff->size - off : len;
	memcpy(buf, ff->data + off, have);
	memset((uint8_t *)buf + have, 0, len - have);
	return 0;
}

int io_file_pwrite_sync(struct io_file *f, const void *buf, size_t len, uint64_t off)
{
	struct ffile *ff = file_of(f);

	if (!ff)
		return -EBADF;
	if (grow(ff, off + len) < 0)
		return -ENOMEM;
	memcpy(ff->data + off, buf, len);
	written(ff, off, len);
	log_add(FAKE_WRITE, (int)(ff - g_files), off, len, buf, g_nlog);
	return 0;
}

static bool g_pc_written; /* fake_set_pc_written() */

void fake_set_pc_written(bool on)
{
	g_pc_written = on;
}

bool io_file_pc_written(const struct io_file *f)
{
	(void)f;
	return g_pc_written;
}

int io_file_sync(struct io_file *f)
{
	struct ffile *ff = file_of(f);

	if (!ff)
		return -EBADF;
	log_add(FAKE_FSYNC, (int)(ff - g_files), 0, 0, NULL, g_nlog);
	return 0;
}
