/* SPDX-License-Identifier: MIT */
/*
 * img/img_qcow2.c — qcow2 images: struct img over the qcow2/ engine.
 *
 * The engine maps guest ranges and owns the metadata; this file does the
 * data I/O through io/: reads of DATA extents from the data file (the image
 * or its external data file), zero-fill of ZERO extents, reads of UNALLOC
 * extents from the backing image (any format, opened with img_open(),
 * read-only), and COMPRESSED extents read then inflated.
 *
 * One pooled context (struct q2req) per request in flight, kept on a free
 * list: no malloc per I/O once warm. A request runs as a loop of steps: map
 * a prefix of what is left, issue the I/O for it, continue when that I/O is
 * done. A step that has to wait for metadata parks the context's waiter and
 * re-runs from the map when woken (mapping steps are idempotent).
 *
 * Writes: INPLACE extents are written where they are. ALLOC (a token from
 * qcow2_map_write) runs: read the COW head/tail's old content (through the
 * read machinery, which still sees the old mapping) unless it is known to be
 * zero -> zero the host range if it is not fresh and some part must read
 * zero (fallocate ZERO_RANGE; never written zero buffers unless the file
 * system supports neither ZERO_RANGE nor PUNCH_HOLE) -> one write of head +
 * data + tail -> qcow2_alloc_finish(). Write-zeroes and discard go through
 * qcow2_zero_step(); parts it cannot do in metadata become writes without a
 * data buffer (zero data).
 *
 * Files: metadata I/O goes through the engine's handle of the image (reads
 * past EOF fail: a truncated table is an error); data I/O through a second
 * handle that reads zeroes past EOF (fresh clusters may lie beyond the end of
 * the file until written), or through the external data file. Backing images
 * are opened read-only through img_open() (raw or qcow2, relative names
 * against the image's directory, up to QCOW2_MAX_CHAIN_DEPTH levels: a loop is refused).
 *
 * Completion: every request ends in exactly one io->done(), always from the
 * loop: a request starts from a zero-length read that io/ completes on the
 * next loop iteration (such "no-op reads" also continue steps that needed no
 * I/O, so long runs never recurse; note they count as READV commands for
 * io_loop_inject()).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img.h"
#include "qcow2.h"

#define Q2_MAX_EXT    16
#define ZERO_BUF_SIZE (64u * 1024)

struct q2img;
struct q2req;

typedef void q2_cont_fn(struct q2req *r, int err);

enum sub_kind {
	SUB_NONE = 0,
	SUB_DATA,
	SUB_BACKING,
	SUB_COMPRESSED,
};

struct q2sub {
	struct q2req *r;
	struct io_cmd cmd;
	struct img_io bio; /* backing read */
	struct iovec *iov;
	unsigned iov_cap;
	unsigned iovcnt;
	uint8_t kind;
	void *cbuf; /* compressed bytes */
	uint32_t clen, coff;
	uint64_t len;
	uint64_t skip; /* offset of this extent in the read job's iovec */
};

enum req_stage {
	RS_READ = 1, /* guest read: a read job on io->iov */
	RS_WRITE,    /* guest write: a write job */
	RS_ZERO,     /* write zeroes / discard loop (zero-data write jobs inside) */
	RS_FLUSH,
};

enum wait_kind {
	W_NONE = 0,
	W_READ, /* read job: re-run rd_step */
	W_WMAP, /* write job: re-run wr_step */
	W_ZERO, /* zero loop: re-run z_step */
};

enum wr_state {
	WS_MAP = 0,
	WS_INPLACE,  /* data (or zeroing) of an in-place extent in flight */
	WS_COW_HEAD, /* reading the COW head (or head and tail together) */
	WS_COW_TAIL, /* reading the COW tail */
	WS_ZEROING,  /* zeroing the host range of an allocation */
	WS_WRITING,  /* writing head + data + tail */
	WS_PUNCH,    /* zero loop: punching the external data file */
};

struct q2req {
	struct q2img *m;
	struct img_io *io;
	struct q2req *next_free;
	struct qcow2_waiter w;
	struct qcow2_flush flush;
	struct io_cmd nop;  /* deferral */
	struct io_cmd cmd;  /* writes, fallocate */
	struct io_cmd cmd2; /* second write (zero-data tail) */
	uint8_t stage;
	uint8_t wait;
	int start_err;

	/* read job */
	uint64_t rd_off, rd_len, rd_done;
	struct iovec *rd_iov;
	unsigned rd_iovcnt;
	uint64_t rd_skip;
	q2_cont_fn *rd_cont;
	unsigned rd_pending;
	unsigned rd_ticket;
	int rd_err;
	struct qcow2_extent ext[Q2_MAX_EXT];
	struct q2sub sub[Q2_MAX_EXT];
	struct iovec rd_one;

	/* write job */
	uint64_t wr_off, wr_len, wr_done;
	struct iovec *wr_iov; /* NULL = zero data */
	unsigned wr_iovcnt;
	q2_cont_fn *wr_cont;
	uint8_t wstate;
	unsigned wr_ticket;
	bool wr_has_ticket;
	bool wr_token;
	struct qcow2_alloc a;
	void *bounce;   /* COW head at 0, tail at cluster size (or both at once) */
	bool cow_joint; /* head and tail read together into bounce */
	struct iovec *wiov;
	unsigned wiov_cap;
	unsigned wr_pending;
	int wr_err;
	uint64_t zr_off, zr_len; /* zeroing in progress */
	uint8_t zr_mode;         /* 0 ZERO_RANGE, 1 PUNCH_HOLE, 2 zero writes */

	/* zero / discard loop */
	uint64_t z_done;
	uint64_t z_step_len;
};

struct q2img {
	struct img img;
	struct io_file file;
	struct io_file dfile;
	bool has_dfile;   /* external data file (in dfile) */
	char *dfile_name; /* its path (messages) */
	bool own_dfile;   /* dfile is open: the external data file, or the image again for data */
	bool data_raw;
	struct qcow2 *q;
	struct img *backing;
	struct q2req *free_reqs;
	unsigned nreqs;
	unsigned inflight;
	void **bounce_free; /* 2 * cluster-sized aligned buffers */
	unsigned nbounce, bounce_cap;
	void *dbuf;     /* one decompressed cluster */
	void *zero_buf; /* last-resort zero writes */
	bool no_zero_range, no_punch;
	uint64_t cs;
};

static void rd_step(struct q2req *r);
static void wr_step(struct q2req *r);
static void z_step(struct q2req *r);

static struct io_file *data_file(struct q2img *m)
{
	return m->own_dfile ? &m->dfile : &m->file;
}

/* ---- pools ---- */

static void *bounce_get(struct q2img *m)
{
	if (m->nbounce)
		return m->bounce_free[--m->nbounce];
	return io_alloc_aligned(2 * m->cs);
}

static void bounce_put(struct q2img *m, void *b)
{
	if (!b)
		return;
	if (m->nbounce == m->bounce_cap) {
		unsigned ncap = m->bounce_cap ? m->bounce_cap * 2 : 16;
		void **nb = realloc(m->bounce_free, ncap * sizeof(*nb));

		if (!nb) {
			io_free_aligned(b);
			return;
		}
		m->bounce_free = nb;
		m->bounce_cap = ncap;
	}
	m->bounce_free[m->nbounce++] = b;
}

static struct q2req *req_get(struct q2img *m)
{
	struct q2req *r = m->free_reqs;

	if (r) {
		m->free_reqs = r->next_free;
		return r;
	}
	r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->m = m;
	for (unsigned i = 0; i < Q2_MAX_EXT; i++)
		r->sub[i].r = r;
	m->nreqs++;
	return r;
}

static void req_put(struct q2img *m, struct q2req *r)
{
	for (unsigned i = 0; i < Q2_MAX_EXT; i++) {
		bounce_put(m, r->sub[i].cbuf);
		r->sub[i].cbuf = NULL;
	}
	bounce_put(m, r->bounce);
	r->bounce = NULL;
	r->io = NULL;
	r->next_free = m->free_reqs;
	m->free_reqs = r;
}

static void req_free_all(struct q2img *m)
{
	while (m->free_reqs) {
		struct q2req *r = m->free_reqs;

		m->free_reqs = r->next_free;
		for (unsigned i = 0; i < Q2_MAX_EXT; i++)
			free(r->sub[i].iov);
		free(r->wiov);
		free(r);
	}
	for (unsigned i = 0; i < m->nbounce; i++)
		io_free_aligned(m->bounce_free[i]);
	free(m->bounce_free);
	m->bounce_free = NULL;
	m->nbounce = 0;
}

/* ---- completion and waiting ---- */

static void req_complete(struct q2req *r, int err)
{
	struct q2img *m = r->m;
	struct img_io *io = r->io;

	m->inflight--;
	req_put(m, r);
	io->done(io, err < 0 ? err : 0);
}

static void engine_wake(struct qcow2_waiter *w)
{
	struct q2req *r = w->priv;
	uint8_t wait = r->wait;

	r->wait = W_NONE;
	switch (wait) {
	case W_READ:
		if (w->err < 0)
			r->rd_cont(r, w->err);
		else
			rd_step(r);
		return;
	case W_WMAP:
		if (w->err < 0)
			r->wr_cont(r, w->err);
		else
			wr_step(r);
		return;
	case W_ZERO:
		if (w->err < 0)
			req_complete(r, w->err);
		else
			z_step(r);
		return;
	default:
		req_complete(r, -EIO);
		return;
	}
}

/* ---- read job: guest range -> iovec, any extent types ---- */

static void rd_continue(struct q2req *r)
{
	struct qcow2 *q = r->m->q;

	qcow2_io_end(q, r->rd_ticket);
	if (r->rd_err) {
		r->rd_cont(r, r->rd_err);
		return;
	}
	if (r->rd_done < r->rd_len) {
		rd_step(r);
		return;
	}
	r->rd_cont(r, 0);
}

static void sub_done(struct q2sub *sub, int res)
{
	struct q2req *r = sub->r;
	struct q2img *m = r->m;

	if (res < 0 && !r->rd_err)
		r->rd_err = res;
	if (sub->kind == SUB_COMPRESSED && res >= 0 && !r->rd_err) {
		int ret = qcow2_decompress(m->q, sub->cbuf, sub->clen, m->dbuf, m->cs);

		if (ret < 0) {
			fprintf(stderr, "vqcow: %s: compressed cluster data is corrupt\n",
				m->img.path);
			r->rd_err = ret;
		} else {
			io_iov_from_buf(r->rd_iov, r->rd_iovcnt, (size_t)(r->rd_skip + sub->skip),
					(uint8_t *)m->dbuf + sub->coff, (size_t)sub->len);
		}
	}
	if (sub->cbuf) {
		bounce_put(m, sub->cbuf);
		sub->cbuf = NULL;
	}
	if (--r->rd_pending == 0)
		rd_continue(r);
}

static void sub_cmd_done(struct io_cmd *cmd, int res)
{
	sub_done(cmd->priv, res);
}

static void sub_bio_done(struct img_io *io, int res)
{
	sub_done(io->priv, res);
}

/* Slice the read job's iovec for [rel, rel + len) into sub->iov. */
static int sub_slice(struct q2req *r, struct q2sub *sub, uint64_t rel, uint64_t len)
{
	int n;

	if (sub->iov_cap < r->rd_iovcnt) {
		struct iovec *ni = realloc(sub->iov, r->rd_iovcnt * sizeof(*ni));

		if (!ni)
			return -ENOMEM;
		sub->iov = ni;
		sub->iov_cap = r->rd_iovcnt;
	}
	n = io_iov_slice(sub->iov, sub->iov_cap, r->rd_iov, r->rd_iovcnt,
			 (size_t)(r->rd_skip + rel), (size_t)len);
	if (n < 0)
		return n;
	sub->iovcnt = (unsigned)n;
	return 0;
}

/* Map a prefix of what is left and issue its I/O. Always called from the loop. */
static void rd_step(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2 *q = m->q;

	for (;;) {
		uint64_t rel = r->rd_done;
		int n;

		r->rd_ticket = qcow2_io_begin(q);
		n = qcow2_map_read(q, r->rd_off + rel, r->rd_len - rel, r->ext, Q2_MAX_EXT, &r->w);
		if (n == -EAGAIN) {
			qcow2_io_end(q, r->rd_ticket);
			r->wait = W_READ;
			return;
		}
		if (n < 0) {
			qcow2_io_end(q, r->rd_ticket);
			r->rd_cont(r, n);
			return;
		}
		r->rd_err = 0;
		r->rd_pending = 1; /* held while issuing */
		for (int i = 0; i < n; i++) {
			struct qcow2_extent *x = &r->ext[i];
			struct q2sub *sub = &r->sub[i];
			int ret = 0;

			sub->len = x->len;
			sub->skip = rel;
			sub->kind = SUB_NONE;
			if (x->type == QCOW2_MAP_ZERO ||
			    (x->type == QCOW2_MAP_UNALLOC && !m->backing)) {
				io_iov_memset(r->rd_iov, r->rd_iovcnt, (size_t)(r->rd_skip + rel),
					      0, (size_t)x->len);
			} else if (x->type == QCOW2_MAP_DATA) {
				ret = sub_slice(r, sub, rel, x->len);
				if (ret == 0) {
					sub->kind = SUB_DATA;
					sub->cmd.done = sub_cmd_done;
					sub->cmd.priv = sub;
					r->rd_pending++;
					io_readv(m->img.loop, &sub->cmd, data_file(m), sub->iov,
						 sub->iovcnt, x->host);
				}
			} else if (x->type == QCOW2_MAP_UNALLOC) {
				ret = sub_slice(r, sub, rel, x->len);
				if (ret == 0) {
					sub->kind = SUB_BACKING;
					sub->bio.done = sub_bio_done;
					sub->bio.priv = sub;
					r->rd_pending++;
					img_readv(m->backing, &sub->bio, sub->iov, sub->iovcnt,
						  x->off, x->len);
				}
			} else if (x->type == QCOW2_MAP_COMPRESSED) {
				sub->cbuf = bounce_get(m);
				if (!sub->cbuf || x->clen > 2 * m->cs) {
					ret = sub->cbuf ? -EIO : -ENOMEM;
				} else {
					sub->kind = SUB_COMPRESSED;
					sub->clen = x->clen;
					sub->coff = x->coff;
					sub->cmd.done = sub_cmd_done;
					sub->cmd.priv = sub;
					r->rd_pending++;
					io_read(m->img.loop, &sub->cmd, &m->file, sub->cbuf,
						x->clen, x->host);
				}
			} else {
				ret = -EIO;
			}
			if (ret < 0 && !r->rd_err)
				r->rd_err = ret;
			rel += x->len;
		}
		r->rd_done = rel;
		if (--r->rd_pending)
			return; /* sub_done() continues */
		/* everything was zero-filled here */
		qcow2_io_end(q, r->rd_ticket);
		if (r->rd_err) {
			r->rd_cont(r, r->rd_err);
			return;
		}
		if (r->rd_done >= r->rd_len) {
			r->rd_cont(r, 0);
			return;
		}
	}
}

static void rd_start(struct q2req *r, uint64_t off, uint64_t len, struct iovec *iov,
		     unsigned iovcnt, uint64_t skip, q2_cont_fn *cont)
{
	uint64_t size = r->m->img.size;

	if (off + len > size) {
		/*
		 * Copy-on-write of the last cluster of a disk whose size is not a
		 * multiple of the cluster size: what lies past the disk's end is
		 * never seen by the guest and reads as zeroes.
		 */
		uint64_t in = off < size ? size - off : 0;

		io_iov_memset(iov, iovcnt, (size_t)(skip + in), 0, (size_t)(len - in));
		len = in;
		if (!len) {
			cont(r, 0);
			return;
		}
	}
	r->rd_off = off;
	r->rd_len = len;
	r->rd_done = 0;
	r->rd_iov = iov;
	r->rd_iovcnt = iovcnt;
	r->rd_skip = skip;
	r->rd_cont = cont;
	rd_step(r);
}

/* ---- write job ---- */

static void wr_io_done(struct io_cmd *cmd, int res);

static void wr_end_ticket(struct q2req *r)
{
	if (r->wr_has_ticket) {
		qcow2_io_end(r->m->q, r->wr_ticket);
		r->wr_has_ticket = false;
	}
}

/* Zero [zr_off, zr_off + zr_len) of the data file: ZERO_RANGE, PUNCH_HOLE, zero writes. */
static void zr_issue(struct q2req *r)
{
	struct q2img *m = r->m;
	struct io_file *f = data_file(m);

	r->cmd.done = wr_io_done;
	r->cmd.priv = r;
	r->wr_pending = 1;
	if (!m->no_zero_range) {
		r->zr_mode = 0;
		io_fallocate(m->img.loop, &r->cmd, f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
			     r->zr_off, r->zr_len);
		return;
	}
	if (!m->no_punch) {
		r->zr_mode = 1;
		io_fallocate(m->img.loop, &r->cmd, f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			     r->zr_off, r->zr_len);
		return;
	}
	r->zr_mode = 2;
	if (!m->zero_buf) {
		m->zero_buf = io_alloc_aligned(ZERO_BUF_SIZE);
		if (!m->zero_buf) {
			io_readv(m->img.loop, &r->cmd, f, NULL, 0, 0);
			r->wr_err = -ENOMEM;
			return;
		}
		memset(m->zero_buf, 0, ZERO_BUF_SIZE);
	}
	io_write(m->img.loop, &r->cmd, f, m->zero_buf,
		 r->zr_len < ZERO_BUF_SIZE ? (size_t)r->zr_len : ZERO_BUF_SIZE, r->zr_off);
}

/* A zeroing command ended: true if the zeroing goes on (fallback or next chunk). */
static bool zr_again(struct q2req *r, int res)
{
	struct q2img *m = r->m;

	if ((res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS) && r->zr_mode < 2) {
		if (r->zr_mode == 0)
			m->no_zero_range = true;
		else
			m->no_punch = true;
		zr_issue(r);
		return true;
	}
	if (res > 0 && r->zr_mode == 2 && (uint64_t)res < r->zr_len) {
		r->zr_off += (uint64_t)res;
		r->zr_len -= (uint64_t)res;
		zr_issue(r);
		return true;
	}
	return false;
}

static void wr_finish(struct q2req *r, int err)
{
	struct q2img *m = r->m;

	if (r->wr_token) {
		qcow2_alloc_finish(m->q, &r->a, err);
		r->wr_token = false;
	}
	wr_end_ticket(r);
	bounce_put(m, r->bounce);
	r->bounce = NULL;
	if (err < 0) {
		r->wr_cont(r, err);
		return;
	}
	r->wr_done += r->a.len;
	wr_step(r);
}

static int wiov_reserve(struct q2req *r, unsigned n)
{
	if (r->wiov_cap < n) {
		struct iovec *ni = realloc(r->wiov, n * sizeof(*ni));

		if (!ni)
			return -ENOMEM;
		r->wiov = ni;
		r->wiov_cap = n;
	}
	return 0;
}

/* Head + data + tail of an allocation, as one writev (two without data). */
static void wr_alloc_write(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2_alloc *a = &r->a;
	struct io_file *f = data_file(m);
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	uint64_t hhost = a->host - head, rel = a->off - r->wr_off;
	bool whead = head && !a->head_zero, wtail = tail && !a->tail_zero;
	uint8_t *tbuf = r->bounce ? (uint8_t *)r->bounce + m->cs : NULL;
	unsigned k = 0;
	int n;

	if (r->cow_joint)
		tbuf = (uint8_t *)r->bounce + (a->off + a->len - a->cow_start);
	r->wstate = WS_WRITING;
	r->wr_err = 0;
	r->cmd.done = wr_io_done;
	r->cmd.priv = r;
	r->cmd2.done = wr_io_done;
	r->cmd2.priv = r;
	if (wiov_reserve(r, r->wr_iovcnt + 2) < 0) {
		wr_finish(r, -ENOMEM);
		return;
	}
	if (!r->wr_iov) {
		/* zero data: zeroed or fresh already; head and tail are apart */
		r->wr_pending = 0;
		if (whead) {
			r->wr_pending++;
			r->wiov[0] = (struct iovec){r->bounce, head};
			io_writev(m->img.loop, &r->cmd, f, &r->wiov[0], 1, hhost);
		}
		if (wtail) {
			r->wr_pending++;
			r->wiov[1] = (struct iovec){tbuf, tail};
			io_writev(m->img.loop, &r->cmd2, f, &r->wiov[1], 1, a->host + a->len);
		}
		if (!r->wr_pending) {
			/* nothing to write (fresh space): continue from the loop, not deeper */
			r->wr_pending = 1;
			io_readv(m->img.loop, &r->cmd, f, NULL, 0, 0);
		}
		return;
	}
	if (whead)
		r->wiov[k++] = (struct iovec){r->bounce, head};
	n = io_iov_slice(r->wiov + k, r->wiov_cap - k, r->wr_iov, r->wr_iovcnt, (size_t)rel,
			 (size_t)a->len);
	if (n < 0) {
		wr_finish(r, n);
		return;
	}
	k += (unsigned)n;
	if (wtail)
		r->wiov[k++] = (struct iovec){tbuf, tail};
	r->wr_pending = 1;
	io_writev(m->img.loop, &r->cmd, f, r->wiov, k, whead ? hhost : a->host);
}

/* Zero the host range if some of it must read as zeroes and it is not fresh. */
static void wr_alloc_zero(struct q2req *r)
{
	struct qcow2_alloc *a = &r->a;
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	bool need = (head && a->head_zero) || (tail && a->tail_zero) || !r->wr_iov;

	if (a->fresh || !need) {
		wr_alloc_write(r);
		return;
	}
	r->wstate = WS_ZEROING;
	r->wr_err = 0;
	r->zr_off = a->host - head;
	r->zr_len = a->cow_end - a->cow_start;
	zr_issue(r);
}

static void wr_cow_tail_done(struct q2req *r, int err)
{
	if (err < 0) {
		wr_finish(r, err);
		return;
	}
	wr_alloc_zero(r);
}

static void wr_cow_head_done(struct q2req *r, int err)
{
	struct qcow2_alloc *a = &r->a;
	uint64_t tail = a->cow_end - (a->off + a->len);

	if (err < 0) {
		wr_finish(r, err);
		return;
	}
	if (tail && !a->tail_zero && !r->cow_joint) {
		r->wstate = WS_COW_TAIL;
		r->rd_one = (struct iovec){(uint8_t *)r->bounce + r->m->cs, tail};
		rd_start(r, a->off + a->len, tail, &r->rd_one, 1, 0, wr_cow_tail_done);
		return;
	}
	wr_alloc_zero(r);
}

static void wr_alloc(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2_alloc *a = &r->a;
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	bool rhead = head && !a->head_zero, rtail = tail && !a->tail_zero;

	r->cow_joint = false;
	if (rhead || rtail) {
		r->bounce = bounce_get(m);
		if (!r->bounce) {
			wr_finish(r, -ENOMEM);
			return;
		}
	}
	if (rhead && rtail && a->cow_end - a->cow_start <= m->cs) {
		/* one read for both (the data part in between is overwritten) */
		r->cow_joint = true;
		r->wstate = WS_COW_HEAD;
		r->rd_one = (struct iovec){r->bounce, a->cow_end - a->cow_start};
		rd_start(r, a->cow_start, a->cow_end - a->cow_start, &r->rd_one, 1, 0,
			 wr_cow_head_done);
		return;
	}
	if (rhead) {
		r->wstate = WS_COW_HEAD;
		r->rd_one = (struct iovec){r->bounce, head};
		rd_start(r, a->cow_start, head, &r->rd_one, 1, 0, wr_cow_head_done);
		return;
	}
	wr_cow_head_done(r, 0);
}

static void wr_io_done(struct io_cmd *cmd, int res)
{
	struct q2req *r = cmd->priv;

	switch (r->wstate) {
	case WS_INPLACE:
	case WS_ZEROING:
		if (r->zr_len && zr_again(r, res))
			return;
		break;
	default:
		break;
	}
	if (res < 0 && !r->wr_err)
		r->wr_err = res;
	if (--r->wr_pending)
		return;
	res = r->wr_err;
	r->wr_err = 0;
	r->zr_len = 0;
	switch (r->wstate) {
	case WS_INPLACE:
	case WS_WRITING:
		wr_finish(r, res);
		return;
	case WS_ZEROING:
		if (res < 0) {
			wr_finish(r, res);
			return;
		}
		wr_alloc_write(r);
		return;
	default:
		wr_finish(r, -EIO);
		return;
	}
}

/* Map a prefix of what is left of the write job and start its I/O. From the loop only. */
static void wr_step(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2 *q = m->q;
	struct qcow2_alloc *a = &r->a;
	uint64_t off = r->wr_off + r->wr_done;
	int ret;

	if (r->wr_done >= r->wr_len) {
		r->wr_cont(r, 0);
		return;
	}
	r->wstate = WS_MAP;
	r->wr_ticket = qcow2_io_begin(q);
	r->wr_has_ticket = true;
	ret = qcow2_map_write(q, off, r->wr_len - r->wr_done, a, &r->w);
	if (ret == -EAGAIN) {
		wr_end_ticket(r);
		r->wait = W_WMAP;
		return;
	}
	if (ret < 0) {
		wr_end_ticket(r);
		r->wr_cont(r, ret);
		return;
	}
	r->wr_token = ret == QCOW2_WRITE_ALLOC;
	if (ret == QCOW2_WRITE_ALLOC) {
		wr_alloc(r);
		return;
	}
	/* in place */
	r->wstate = WS_INPLACE;
	r->wr_err = 0;
	r->zr_len = 0;
	if (!r->wr_iov) {
		r->zr_off = a->host;
		r->zr_len = a->len;
		zr_issue(r);
		return;
	}
	if (wiov_reserve(r, r->wr_iovcnt) < 0) {
		wr_finish(r, -ENOMEM);
		return;
	}
	ret = io_iov_slice(r->wiov, r->wiov_cap, r->wr_iov, r->wr_iovcnt, (size_t)(off - r->wr_off),
			   (size_t)a->len);
	if (ret < 0) {
		wr_finish(r, ret);
		return;
	}
	r->cmd.done = wr_io_done;
	r->cmd.priv = r;
	r->wr_pending = 1;
	if ((unsigned)ret == r->wr_iovcnt && a->len == r->wr_len)
		io_writev(m->img.loop, &r->cmd, data_file(m), r->wr_iov, r->wr_iovcnt, a->host);
	else
		io_writev(m->img.loop, &r->cmd, data_file(m), r->wiov, (unsigned)ret, a->host);
}

static void wr_start(struct q2req *r, uint64_t off, uint64_t len, struct iovec *iov,
		     unsigned iovcnt, q2_cont_fn *cont)
{
	r->wr_off = off;
	r->wr_len = len;
	r->wr_done = 0;
	r->wr_iov = iov;
	r->wr_iovcnt = iovcnt;
	r->wr_cont = cont;
	r->wr_token = false;
	r->wr_has_ticket = false;
	r->bounce = NULL;
	wr_step(r);
}

/* ---- write zeroes / discard ---- */

static void z_write_done(struct q2req *r, int err)
{
	if (err < 0) {
		req_complete(r, err);
		return;
	}
	r->z_done += r->z_step_len;
	z_step(r);
}

static void z_punch_done(struct io_cmd *cmd, int res)
{
	struct q2req *r = cmd->priv;

	/* a discard is a hint; a data file that cannot punch is fine */
	if (res < 0 && res != -EOPNOTSUPP && res != -ENOTSUP && res != -ENOSYS) {
		req_complete(r, res);
		return;
	}
	r->z_done += r->z_step_len;
	z_step(r);
}

static void z_resume(struct io_cmd *cmd, int res)
{
	(void)res;
	z_step(cmd->priv);
}

static void z_step(struct q2req *r)
{
	struct q2img *m = r->m;
	struct img_io *io = r->io;
	bool zero = io->op == IMG_OP_WRITE_ZEROES;

	for (unsigned steps = 0;; steps++) {
		uint64_t off = io->off + r->z_done, dl = 0;
		int ret;

		if (r->z_done >= io->len) {
			req_complete(r, 0);
			return;
		}
		if (steps == 64) {
			/* a long metadata-only range: let other requests run meanwhile */
			r->nop.done = z_resume;
			r->nop.priv = r;
			io_readv(m->img.loop, &r->nop, &m->file, NULL, 0, 0);
			return;
		}
		ret = qcow2_zero_step(m->q, off, io->len - r->z_done, zero,
				      (io->flags & IMG_IO_UNMAP) != 0, &dl, &r->w);
		if (ret == -EAGAIN) {
			r->wait = W_ZERO;
			return;
		}
		if (ret < 0) {
			req_complete(r, ret);
			return;
		}
		r->z_step_len = dl;
		if (ret == QCOW2_Z_WRITE) {
			wr_start(r, off, dl, NULL, 0, z_write_done);
			return;
		}
		if (ret == QCOW2_Z_DONE && m->has_dfile && (!zero || m->data_raw)) {
			/* external data file: give the space back (and keep a raw file raw) */
			r->cmd.done = z_punch_done;
			r->cmd.priv = r;
			io_fallocate(m->img.loop, &r->cmd, &m->dfile,
				     (zero && !(io->flags & IMG_IO_UNMAP) ? FALLOC_FL_ZERO_RANGE
									  : FALLOC_FL_PUNCH_HOLE) |
					 FALLOC_FL_KEEP_SIZE,
				     off, dl);
			return;
		}
		r->z_done += dl;
	}
}

/* ---- request entry ---- */

static void rw_done(struct q2req *r, int err)
{
	req_complete(r, err);
}

static void flush_done(struct qcow2_flush *f, int res)
{
	req_complete(f->priv, res);
}

static void start(struct io_cmd *cmd, int res)
{
	struct q2req *r = cmd->priv;
	struct img_io *io = r->io;

	if (res < 0 || r->start_err) {
		req_complete(r, res < 0 ? res : r->start_err);
		return;
	}
	if (io->op != IMG_OP_FLUSH && io->len == 0) {
		req_complete(r, 0);
		return;
	}
	switch (io->op) {
	case IMG_OP_READ:
		r->stage = RS_READ;
		rd_start(r, io->off, io->len, io->iov, io->iovcnt, 0, rw_done);
		return;
	case IMG_OP_WRITE:
		r->stage = RS_WRITE;
		wr_start(r, io->off, io->len, io->iov, io->iovcnt, rw_done);
		return;
	case IMG_OP_DISCARD:
	case IMG_OP_WRITE_ZEROES:
		r->stage = RS_ZERO;
		r->z_done = 0;
		z_step(r);
		return;
	case IMG_OP_FLUSH:
		r->stage = RS_FLUSH;
		r->flush.done = flush_done;
		r->flush.priv = r;
		qcow2_flush(r->m->q, &r->flush);
		return;
	default:
		req_complete(r, -EINVAL);
		return;
	}
}

static void nomem_done(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;

	(void)res;
	io->done(io, -ENOMEM);
}

static void q2_submit(struct img *img, struct img_io *io)
{
	struct q2img *m = (struct q2img *)img;
	struct q2req *r = req_get(m);
	bool write =
	    io->op == IMG_OP_WRITE || io->op == IMG_OP_DISCARD || io->op == IMG_OP_WRITE_ZEROES;

	if (!r) {
		/* no context: fail through the io's own command, still from the loop */
		io->cmd.done = nomem_done;
		io->cmd.priv = io;
		io_readv(img->loop, &io->cmd, &m->file, NULL, 0, 0);
		return;
	}
	m->inflight++;
	r->io = io;
	r->stage = 0;
	r->wait = W_NONE;
	r->w.wake = engine_wake;
	r->w.priv = r;
	r->start_err = 0;
	io->impl = r;
	if (write && !img_may_write(img))
		r->start_err = -EROFS;
	else if (io->op != IMG_OP_FLUSH && (io->off > img->size || io->len > img->size - io->off))
		r->start_err = -EINVAL;
	else if (write)
		qcow2_bitmap_mark(m->q, io->off, io->len);
	/* always start from the loop: done() must never run inside submit */
	r->nop.done = start;
	r->nop.priv = r;
	io_readv(img->loop, &r->nop, &m->file, NULL, 0, 0);
}

/* ---- open / close ---- */

static void q2_close(struct img *img)
{
	struct q2img *m = (struct q2img *)img;
	int ret;

	ret = qcow2_close(m->q);
	if (ret < 0)
		fprintf(stderr, "vqcow: %s: writing metadata back at close failed: %s\n", img->path,
			strerror(-ret));
	img_close(m->backing);
	io_file_close(&m->file);
	if (m->own_dfile)
		io_file_close(&m->dfile);
	req_free_all(m);
	free(m->dfile_name);
	io_free_aligned(m->dbuf);
	io_free_aligned(m->zero_buf);
	free(img->path);
	free(m);
}

static void q2_describe(struct img *img, char *buf, size_t len)
{
	struct q2img *m = (struct q2img *)img;
	size_t n;

	qcow2_describe(m->q, buf, len);
	n = strlen(buf);
	if (m->backing && n + 16 < len) {
		snprintf(buf + n, len - n, ", backing: ");
		n = strlen(buf);
		img_describe(m->backing, buf + n, len - n);
	}
}

/*
 * Locks of the image file and its external data file (same role), then the
 * backing image: READ while we hold READ or WRITE, nothing while NONE.
 * Leaving WRITE is refused while the engine is open read-write: it may still
 * write metadata back (dropping it cleanly comes with live migration).
 */
static int q2_set_perm(struct img *img, enum img_perm perm, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	enum img_file_role role = img->backing ? IMG_FILE_BACKING : IMG_FILE_QCOW2;
	enum img_perm old = img->perm;
	int ret;

	if (m->q && !img->read_only && old == IMG_PERM_WRITE && perm != IMG_PERM_WRITE)
		return -ENOTSUP;
	ret = img_file_lock(&m->file, img->path, role, perm, img->force_share, err, errlen);
	if (ret < 0)
		return ret;
	if (m->has_dfile) {
		ret = img_file_lock(&m->dfile, m->dfile_name, role, perm, img->force_share, err,
				    errlen);
		if (ret < 0)
			goto undo_file;
	}
	if (m->backing) {
		ret = img_set_perm(
		    m->backing, perm == IMG_PERM_NONE ? IMG_PERM_NONE : IMG_PERM_READ, err, errlen);
		if (ret < 0)
			goto undo_dfile;
	}
	img->perm = perm;
	return 0;

undo_dfile:
	if (m->has_dfile)
		img_file_lock(&m->dfile, m->dfile_name, role, old, img->force_share, NULL, 0);
undo_file:
	img_file_lock(&m->file, img->path, role, old, img->force_share, NULL, 0);
	return ret;
}

static const struct img_ops q2_ops = {
    .format = "qcow2",
    .submit = q2_submit,
    .close = q2_close,
    .describe = q2_describe,
    .set_perm = q2_set_perm,
};

static __thread int open_depth;

static int guard_enter(const struct img_name_guard *g)
{
	return g && g->enter ? g->enter(g->priv) : 0;
}

static void guard_leave(const struct img_name_guard *g)
{
	if (g && g->leave)
		g->leave(g->priv);
}

int img_qcow2_open(struct img **imgp, struct io_loop *loop, const char *path,
		   const struct img_opts *opts, char *err, size_t errlen)
{
	const struct qcow2_header_info *h;
	struct qcow2_opts qo = {0};
	struct q2img *m;
	bool read_only = opts ? opts->read_only : false;
	bool direct = opts ? opts->direct : true;
	unsigned flags = (read_only ? IO_FILE_RDONLY : 0) | (direct ? IO_FILE_DIRECT : 0);
	char *name = NULL;
	const struct img_name_guard *guard = opts ? opts->name_guard : NULL;
	enum img_file_role role;
	enum img_perm perm;
	int ret;

	if (err && errlen)
		err[0] = '\0';
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->img.path = strdup(path);
	if (!m->img.path) {
		ret = -ENOMEM;
		goto free_m;
	}
	ret = img_file_open(&m->file, path, flags, err, errlen);
	if (ret < 0)
		goto free_path;
	/* Locks before the first read: open may write (autoclear bits). */
	m->img.backing = opts && opts->backing;
	m->img.force_share = opts && opts->force_share;
	m->img.read_only = read_only;
	role = m->img.backing ? IMG_FILE_BACKING : IMG_FILE_QCOW2;
	perm = read_only ? IMG_PERM_READ : IMG_PERM_WRITE;
	ret = img_file_lock(&m->file, path, role, perm, m->img.force_share, err, errlen);
	if (ret < 0)
		goto close_file;
	qo.read_only = read_only;
	if (opts) {
		qo.allow_corrupt_ro = opts->allow_corrupt_ro;
		qo.l2_cache_size = opts->l2_cache_size;
		qo.cache_entry_size = opts->cache_entry_size;
		qo.no_l2_prefetch = opts->no_l2_prefetch;
	}
	ret = qcow2_open(&m->q, loop, &m->file, path, &qo, err, errlen);
	if (ret < 0)
		goto close_file;
	h = qcow2_header(m->q);
	m->cs = h->cluster_size;

	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		name = qcow2_path_relative(path, h->data_file);
		if (!name) {
			ret = -ENOMEM;
			goto close_q;
		}
		ret = guard_enter(guard);
		if (ret == 0) {
			ret = io_file_open(&m->dfile, name, flags | IO_FILE_ZERO_EOF);
			if (ret == -ENOENT && h->data_file[0] != '/') {
				/* qemu-img resolves it against the working directory */
				ret =
				    io_file_open(&m->dfile, h->data_file, flags | IO_FILE_ZERO_EOF);
				if (ret == 0) {
					free(name);
					name = strdup(h->data_file);
				}
			}
			guard_leave(guard);
		}
		if (ret < 0) {
			if (err)
				snprintf(err, errlen, "%s: external data file %s: %s", path, name,
					 ret == -EINVAL ? "not a regular file or block device"
							: strerror(-ret));
			goto close_q;
		}
		m->has_dfile = true;
		m->own_dfile = true;
		m->dfile_name = name;
		name = NULL;
		ret = img_file_lock(&m->dfile, m->dfile_name, role, perm, m->img.force_share, err,
				    errlen);
		if (ret < 0)
			goto close_dfile;
		m->data_raw = (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
		qcow2_set_data_file(m->q, &m->dfile);
	} else if (io_file_open(&m->dfile, path, flags | IO_FILE_ZERO_EOF) == 0) {
		/*
		 * Data goes through a second handle that reads zeroes past the end
		 * of the file: clusters allocated in fresh space may lie (partly)
		 * beyond it until written. Metadata reads keep failing there.
		 */
		m->own_dfile = true;
	}
	if (h->backing_file[0]) {
		struct img_opts bo = {0};
		char berr[512];

		if (open_depth >= (int)QCOW2_MAX_CHAIN_DEPTH) {
			ret = -ELOOP;
			if (err)
				snprintf(err, errlen,
					 "%s: backing chain deeper than %u backing files (a loop?)",
					 path, QCOW2_MAX_CHAIN_DEPTH);
			goto close_dfile;
		}
		if (h->has_backing_fmt && strcmp(h->backing_fmt, "raw") != 0 &&
		    strcmp(h->backing_fmt, "qcow2") != 0) {
			ret = -ENOTSUP;
			if (err)
				snprintf(err, errlen,
					 "%s: backing file %s has format '%s' (only raw and qcow2 "
					 "are supported)",
					 path, h->backing_file, h->backing_fmt);
			goto close_dfile;
		}
		name = qcow2_path_relative(path, h->backing_file);
		if (!name) {
			ret = -ENOMEM;
			goto close_dfile;
		}
		bo.format = h->has_backing_fmt ? h->backing_fmt : NULL;
		bo.read_only = true;
		bo.backing = true;
		bo.force_share = m->img.force_share;
		bo.direct = direct;
		if (opts) {
			bo.l2_cache_size = opts->l2_cache_size;
			bo.cache_entry_size = opts->cache_entry_size;
			bo.no_l2_prefetch = opts->no_l2_prefetch;
		}
		/* Deeper files of the chain open inside this guard: theirs is NULL. */
		ret = guard_enter(guard);
		if (ret == 0) {
			open_depth++;
			ret = img_open(&m->backing, loop, name, &bo, berr, sizeof(berr));
			open_depth--;
			guard_leave(guard);
		} else {
			snprintf(berr, sizeof(berr), "%s: %s", name, strerror(-ret));
		}
		if (ret < 0) {
			if (err)
				snprintf(err, errlen, "%s: backing file: %s", path, berr);
			goto close_dfile;
		}
		if (!h->has_backing_fmt)
			fprintf(stderr,
				"vqcow: %s: backing file %s has no recorded format: probed as %s\n",
				path, name, m->backing->ops->format);
		qcow2_set_backing_size(m->q, m->backing->size);
		free(name);
		name = NULL;
	}
	m->dbuf = io_alloc_aligned(m->cs);
	if (!m->dbuf) {
		ret = -ENOMEM;
		goto close_backing;
	}

	m->img.ops = &q2_ops;
	m->img.loop = loop;
	m->img.size = qcow2_size(m->q);
	m->img.perm = perm;
	m->img.align = m->file.align > 512 ? m->file.align : 512;
	if (m->own_dfile && m->dfile.align > m->img.align)
		m->img.align = m->dfile.align;
	m->img.supports_discard = true;
	m->img.supports_write_zeroes = true;
	m->img.discard_granularity = (unsigned)m->cs;
	m->img.opt_io = m->cs <= (1u << 20) ? (uint32_t)m->cs : 0;
	*imgp = &m->img;
	return 0;

close_backing:
	img_close(m->backing);
close_dfile:
	if (m->own_dfile)
		io_file_close(&m->dfile);
close_q:
	qcow2_close(m->q);
close_file:
	io_file_close(&m->file);
free_path:
	free(m->img.path);
free_m:
	free(name);
	free(m->dfile_name);
	free(m);
	if (err && !err[0])
		snprintf(err, errlen, "%s: %s", path, strerror(-ret));
	return ret;
}
