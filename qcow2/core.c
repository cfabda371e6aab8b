/* SPDX-License-Identifier: MIT */
/*
 * qcow2/core.c — engine state every part of the engine uses: the set of
 * metadata clusters (overlap checks), the sticky corruption state, the
 * allocation frontier seen by entry checks, the L1 entry check, deferred
 * wake-ups, and the format code's I/O interface over the engine's file. It calls nothing of the
 * engine above it.
 *
 * Invariants:
 *  - q->meta is sorted and holds no duplicates; every cluster holding the
 *    header, an L1 table, the refcount table, a refcount block, an active L2
 *    table, the snapshot table or a snapshot L1 table is in it.
 *  - Corruption is a state, not a return code: once q2_corrupt() ran, the
 *    image stays corrupt until closed (writes fail with -EIO); the corrupt
 *    bit is written to the header once (version 3, read-write, not closing).
 *  - A waiter's wake() never runs from inside the call that parked or
 *    completed it: q2_wake_later() queues it and the loop delivers it.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int q2_u64v_push(struct q2_u64v *v, uint64_t x)
{
	if (v->n == v->cap) {
		size_t ncap = v->cap ? v->cap * 2 : 64;
		uint64_t *nv = realloc(v->v, ncap * sizeof(*nv));

		if (!nv)
			return -ENOMEM;
		v->v = nv;
		v->cap = ncap;
	}
	v->v[v->n++] = x;
	return 0;
}

void q2_u64v_free(struct q2_u64v *v)
{
	free(v->v);
	memset(v, 0, sizeof(*v));
}

/* ---- metadata set ---- */

/* Index of the first element >= x. */
static size_t lower(const struct q2_u64v *m, uint64_t x)
{
	size_t lo = 0, hi = m->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (m->v[mid] < x)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

bool q2_u64v_has(const struct q2_u64v *m, uint64_t x)
{
	size_t i = lower(m, x);

	return i < m->n && m->v[i] == x;
}

bool q2_meta_overlaps(const struct qcow2 *q, uint64_t host, uint64_t len)
{
	uint64_t c0, c1;
	size_t i;

	if (!len)
		return false;
	c0 = host >> q->cb;
	c1 = (host + len - 1) >> q->cb;
	i = lower(&q->meta, c0);
	return i < q->meta.n && q->meta.v[i] <= c1;
}

bool qcow2_is_metadata(const struct qcow2 *q, uint64_t host, uint64_t len)
{
	return q2_meta_overlaps(q, host, len);
}

bool q2_meta_overlaps_cluster(const struct qcow2 *q, uint64_t cluster, struct q2_meta_gap *gap)
{
	size_t i;

	if (cluster >= gap->lo && cluster < gap->hi)
		return false;
	i = lower(&q->meta, cluster);
	if (i < q->meta.n && q->meta.v[i] == cluster)
		return true;
	gap->lo = i ? q->meta.v[i - 1] + 1 : 0;
	gap->hi = i < q->meta.n ? q->meta.v[i] : UINT64_MAX;
	return false;
}

int q2_meta_add(struct qcow2 *q, uint64_t cluster)
{
	size_t i = lower(&q->meta, cluster);
	int ret;

	if (i < q->meta.n && q->meta.v[i] == cluster)
		return 0;
	ret = q2_u64v_push(&q->meta, 0);
	if (ret < 0)
		return ret;
	memmove(&q->meta.v[i + 1], &q->meta.v[i], (q->meta.n - 1 - i) * sizeof(uint64_t));
	q->meta.v[i] = cluster;
	return 0;
}

void q2_meta_del(struct qcow2 *q, uint64_t cluster)
{
	size_t i = lower(&q->meta, cluster);

	if (i < q->meta.n && q->meta.v[i] == cluster) {
		memmove(&q->meta.v[i], &q->meta.v[i + 1], (q->meta.n - 1 - i) * sizeof(uint64_t));
		q->meta.n--;
	}
}

/* ---- corruption ---- */

static void corrupt_hdr_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	if (res < 0)
		Q2_LOG(q, ERROR, "could not set the corrupt bit in the header: %s", strerror(-res));
	if (q->corrupt_hdr_busy == 1 && res >= 0) {
		q->corrupt_hdr_busy = 2;
		io_fdatasync(q->loop, &q->corrupt_cmd, q->file);
		return;
	}
	q->corrupt_hdr_busy = 0;
}

void q2_corrupt(struct qcow2 *q, const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	if (q->corrupt)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	q->corrupt = true;
	Q2_LOG(q, ERROR,
	       "image is corrupt: %s; further writes fail (repair offline: vqcow-img check -r all)",
	       msg);
	if (q->read_only || q->h.version < 3 || q->closing)
		return;
	q->h.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
	qcow2_put_be64(q->corrupt_buf, q->h.incompatible_features);
	q->corrupt_cmd.done = corrupt_hdr_done;
	q->corrupt_cmd.priv = q;
	q->corrupt_hdr_busy = 1;
	io_write(q->loop, &q->corrupt_cmd, q->file, q->corrupt_buf, 8, QCOW2_OFF_INCOMPAT);
}

bool qcow2_is_corrupt(const struct qcow2 *q)
{
	return q->corrupt;
}

uint64_t q2_host_end(const struct qcow2 *q)
{
	uint64_t a = q->file->size, b = q->cursor << q->cb;

	if (q->prealloc_end > a)
		a = q->prealloc_end;
	return a > b ? a : b;
}

/* ---- deferred wake-ups ---- */

static void wake_cmd_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;
	struct qcow2_waiter *w = q->wake_head;

	(void)res;
	q->wake_head = q->wake_tail = NULL;
	q->wake_armed = false;
	while (w) {
		struct qcow2_waiter *next = w->next;

		w->next = NULL;
		w->wake(w);
		w = next;
	}
}

void q2_wake_later(struct qcow2 *q, struct qcow2_waiter *w, int err)
{
	w->err = err;
	w->next = NULL;
	if (q->wake_tail)
		q->wake_tail->next = w;
	else
		q->wake_head = w;
	q->wake_tail = w;
	if (!q->wake_armed) {
		q->wake_armed = true;
		q->wake_cmd.done = wake_cmd_done;
		q->wake_cmd.priv = q;
		io_post(q->loop, &q->wake_cmd);
	}
}

void q2_wake_list_later(struct qcow2 *q, struct qcow2_waiter **list, int err)
{
	struct qcow2_waiter *w = *list, *rev = NULL;

	*list = NULL;
	/* lists are LIFO; wake in arrival order */
	while (w) {
		struct qcow2_waiter *next = w->next;

		w->next = rev;
		rev = w;
		w = next;
	}
	while (rev) {
		struct qcow2_waiter *next = rev->next;

		q2_wake_later(q, rev, err);
		rev = next;
	}
}

/* ---- the format code's I/O interface ---- */

/*
 * The format code's I/O interface over the engine's file: the same
 * synchronous io/ calls the rest of open uses (open time only, never on the
 * request path).
 */
static int file_read(void *opaque, void *buf, size_t len, uint64_t off)
{
	return io_file_pread_sync(opaque, buf, len, off);
}

static int file_write(void *opaque, const void *buf, size_t len, uint64_t off)
{
	return io_file_pwrite_sync(opaque, buf, len, off);
}

static int file_sync(void *opaque)
{
	return io_file_sync(opaque);
}

static int file_size(void *opaque, uint64_t *size)
{
	return io_file_get_size(opaque, size);
}

struct qcow2_io q2_file_io(struct io_file *f)
{
	return (struct qcow2_io){
	    .read = file_read,
	    .write = file_write,
	    .sync = file_sync,
	    .size = file_size,
	    .opaque = f,
	    .fixed_size = (f->flags & IO_FILE_BLOCKDEV) != 0,
	};
}

/* ---- L1 entries ---- */

static bool l1_is_bad(const struct qcow2 *q, uint32_t i)
{
	return q->l1_bad[i / 8] & (1u << (i % 8));
}

const char *q2_l1_check(const struct qcow2 *q, uint32_t i, uint64_t *off)
{
	uint64_t e = q->l1[i];

	*off = e & QCOW2_L1E_OFFSET_MASK;
	if (!*off)
		return NULL;
	if (l1_is_bad(q, i))
		return "L2 table overlaps other metadata";
	if (e & QCOW2_L1E_RESERVED_MASK)
		return "reserved bits set";
	if (*off & (q->cs - 1))
		return "misaligned";
	if (*off + q->cs > q2_host_end(q))
		return "past the end of the file";
	return NULL;
}
