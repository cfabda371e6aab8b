/* SPDX-License-Identifier: MIT */
/*
 * qcow2/alloc.c — host cluster allocation and refcount updates.
 *
 * Allocation takes a cluster freed earlier (free list, one at a time) or
 * clusters at the allocation cursor (contiguous runs within one refcount
 * slice). Metadata clusters always come from the cursor. Clusters at or after
 * fresh_start that were never handed out read as zeroes (holes or space we
 * preallocated with fallocate: qcow2_alloc.fresh), which spares zeroing COW
 * regions before a write of zero data; a data write still fills a new
 * cluster whole with its zeroes (img/img_qcow2.c, alloc_write), so that the
 * file system holds written blocks there rather than unwritten extents.
 * A cursor cluster without a refcount block gets a new, self-describing block
 * placed at that very cluster; a cursor past the refcount table's reach grows
 * the table: new blocks and the new table are laid out at the cursor, the
 * header is switched to it by write-back (writeback.c), the old table freed.
 * Everything here only changes the cache; write-back makes it durable.
 *
 * Decrements (a pointer to a cluster was removed) go through three stages:
 *   dec_pending  the removal exists in memory only
 *   dec_grace    the removal is durable (its write-back batch completed);
 *                waiting until data I/O that started before it has ended
 *                (two-generation counter of qcow2_io_begin/end tickets,
 *                and of other threads' tickets through qcow2_ext_io)
 *   dec_apply    refcounts are lowered in the cache; a cluster reaching 0 is
 *                punched (hole, when the file system supports it) and then
 *                joins the free list.
 * So a freed cluster cannot be reused while anything on disk or in flight
 * still refers to it.
 */
#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "internal.h"

#define FREE_ZERO (1ull << 63) /* free-list flag: the cluster was punched */

struct rc_loc {
	uint64_t rti;   /* refcount table index */
	uint64_t block; /* refcount block offset (0 = none) */
	uint64_t slice; /* slice offset */
	uint32_t idx;   /* entry index inside the slice */
};

static bool rt_is_bad(const struct qcow2 *q, uint64_t rti)
{
	return rti < q->rt_bad_n && (q->rt_bad[rti / 8] & (1u << (rti % 8)));
}

/* Locate the refcount of cluster @c. -EIO on a corrupt refcount table entry. */
static int rc_locate(struct qcow2 *q, uint64_t c, struct rc_loc *l)
{
	uint64_t e, inblk;

	l->rti = c >> q->rb_bits;
	l->block = 0;
	if (l->rti >= q->rt_entries)
		return 0;
	e = q->rt[l->rti];
	l->block = e & QCOW2_RTE_OFFSET_MASK;
	if (!l->block)
		return 0;
	if ((e & QCOW2_RTE_RESERVED_MASK) || (l->block & (q->cs - 1)) ||
	    l->block + q->cs > q2_host_end(q) || rt_is_bad(q, l->rti)) {
		q2_corrupt(q, "refcount table entry %llu (0x%llx) is invalid",
			   (unsigned long long)l->rti, (unsigned long long)e);
		return -EIO;
	}
	inblk = c & ((1ull << q->rb_bits) - 1);
	l->slice = l->block + ((inblk >> q->src_bits) << __builtin_ctz(q->slice_size));
	l->idx = (uint32_t)(inblk & ((1ull << q->src_bits) - 1));
	return 0;
}

int q2_rc_prepare(struct qcow2 *q, uint64_t host, struct qcow2_waiter *w)
{
	struct q2_slice *s;
	struct rc_loc l;
	int ret = rc_locate(q, host >> q->cb, &l);

	if (ret < 0 || !l.block)
		return ret;
	return q2_cache_get(&q->rcc, l.slice, &s, w);
}

struct q2_slice *q2_rc_slice(struct qcow2 *q, uint64_t host)
{
	struct rc_loc l;

	if (rc_locate(q, host >> q->cb, &l) < 0 || !l.block)
		return NULL;
	return q2_cache_peek(&q->rcc, l.slice);
}

/*
 * Preallocation and backing.
 *
 * Fresh space is preallocated (fallocate mode 0) in chunks ahead of the
 * allocation front, so data writes rarely allocate blocks and never-written
 * parts of fresh clusters read as zeroes (unwritten extents, which the data
 * path converts with one whole-cluster write per new cluster). Metadata clusters (L2 tables,
 * refcount blocks, refcount tables) are handed out only where a fallocate
 * succeeded (below prealloc_ok): their write-back happens after the guest
 * saw its writes complete, and must not then fail for want of space. An
 * allocation that needs backing parks until a fallocate covering it ends.
 *
 * Near a full file system a fallocate fails part-way and ext4 keeps what it
 * got. So: optional chunks are sized from the free space (at most half of
 * what exceeds PREALLOC_RESERVE), a failed chunk is given back (punched) beyond the allocation
 * front, and after a failure the next fallocate asks only for what is needed; if that fails too,
 * the allocations waiting for it fail with the error (the guest sees a failed write, not a lost
 * one). While the punch runs, no cluster is handed out at the front (a write there could land
 * before it).
 */

/* Free space optional chunks never take (metadata fallocates still may). */
#define PREALLOC_RESERVE (32ull << 20)

static uint64_t chunk_default(const struct qcow2 *q)
{
	uint64_t chunk = q->size / 16;

	/*
	 * Large chunks: a fallocate waits for in-flight direct I/O on some file
	 * systems (ext4), so fewer of them keep the write pipeline full.
	 */
	if (chunk > (64ull << 20))
		chunk = 64ull << 20;
	if (chunk < (4ull << 20))
		chunk = 4ull << 20;
	if (chunk < 4 * q->cs)
		chunk = 4 * q->cs;
	return chunk;
}

/* Bytes an unprivileged user may still allocate on the image's file system. */
static uint64_t fs_avail(const struct qcow2 *q)
{
	struct statfs st;

	if (fstatfs(q->file->fd, &st) < 0)
		return UINT64_MAX; /* unknown: do not limit */
	return (uint64_t)st.f_bavail * (uint64_t)st.f_bsize;
}

static void prealloc_wake(struct qcow2 *q, int err)
{
	q->prealloc_busy = false;
	q->prealloc_punching = false;
	q2_wake_list_later(q, &q->space_waiters, err);
}

static void prealloc_punched(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	if (res < 0 && res != -EOPNOTSUPP && res != -ENOTSUP && res != -ENOSYS)
		Q2_LOG(q, WARN, "giving back preallocated space failed: %s", strerror(-res));
	prealloc_wake(q, q->prealloc_need_only ? q->prealloc_err : 0);
}

static void prealloc_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;
	uint64_t start = q->prealloc_start, end = start + q->prealloc_len, front;

	if (res == 0) {
		q->prealloc_fails = 0;
		if (end > q->prealloc_ok)
			q->prealloc_ok = end;
		prealloc_wake(q, 0);
		return;
	}
	if (res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS) {
		/* no fallocate here: go on without preallocation and backing */
		q->no_prealloc = true;
		q->no_backing = true;
		q->prealloc_end = q->prealloc_ok;
		prealloc_wake(q, 0);
		return;
	}
	q->prealloc_err = res;
	if (!q->prealloc_fails++)
		Q2_LOG(q, WARN,
		       "preallocating %llu bytes at 0x%llx failed (%s); giving back what it took",
		       (unsigned long long)q->prealloc_len, (unsigned long long)start,
		       strerror(-res));
	/* what is past the front was never handed out: give it back */
	front = q->cursor << q->cb;
	if (front < start)
		front = start;
	q->prealloc_end = q->prealloc_ok > front ? q->prealloc_ok : front;
	if (front >= end || q->no_punch) {
		prealloc_wake(q, q->prealloc_need_only ? res : 0);
		return;
	}
	q->prealloc_punching = true;
	q->prealloc_cmd.done = prealloc_punched;
	io_fallocate(q->loop, &q->prealloc_cmd, q->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		     front, end - front);
}

/*
 * Start a fallocate from prealloc_ok: an optional chunk sized from the free
 * space, and at least up to @need (bytes, 0 = nothing needed).
 */
static void prealloc_submit(struct qcow2 *q, uint64_t need)
{
	uint64_t start = q->prealloc_ok, chunk = 0, end, avail;

	if (!q->no_prealloc && !q->prealloc_fails) {
		chunk = chunk_default(q);
		avail = fs_avail(q);
		avail = avail > PREALLOC_RESERVE ? avail - PREALLOC_RESERVE : 0;
		if (chunk > avail / 2)
			chunk = avail / 2 & ~(q->cs - 1); /* leave the rest to others */
		if (chunk < 4 * q->cs)
			chunk = 0;
	}
	end = (q->cursor << q->cb) + chunk;
	if (end < need)
		end = need;
	if (end <= start)
		return;
	q->prealloc_busy = true;
	q->prealloc_need_only = end == need;
	q->prealloc_start = start;
	q->prealloc_len = end - start;
	q->prealloc_cmd.done = prealloc_done;
	q->prealloc_cmd.priv = q;
	/* Data may go to the optional part meanwhile; metadata waits for the result. */
	if (end > q->prealloc_end)
		q->prealloc_end = end;
	io_fallocate(q->loop, &q->prealloc_cmd, q->file, 0, start, end - start);
}

static void prealloc_maybe(struct qcow2 *q)
{
	uint64_t front = q->cursor << q->cb;

	if (q->no_prealloc || q->prealloc_busy || q->read_only || q->ext_data)
		return;
	if (front + chunk_default(q) / 2 <= q->prealloc_ok)
		return;
	prealloc_submit(q, 0);
}

static void park(struct qcow2 *q, struct qcow2_waiter *w)
{
	w->next = q->space_waiters;
	q->space_waiters = w;
}

/*
 * Metadata clusters [c, c + n) are about to be handed out: 0 if their space
 * is allocated (or that is not our concern), -EAGAIN with @w parked until a
 * fallocate covering them ends.
 */
static int backing(struct qcow2 *q, uint64_t c, uint64_t n, struct qcow2_waiter *w)
{
	uint64_t end = (c + n) << q->cb;

	if (q->no_backing || end <= q->prealloc_ok)
		return 0;
	park(q, w);
	if (!q->prealloc_busy)
		prealloc_submit(q, end);
	return -EAGAIN;
}

/*
 * Zero-ahead on a block device (qcow2_opts.blkdev_zero_ahead).
 *
 * A device has no fresh space: its old contents are unknown, so every link
 * of a new cluster waits for an fdatasync of its data and fill (P1) before
 * the entry, or after a power loss the entry could show the device's old
 * bytes where the guest never wrote (607b40c). Where the device offloads
 * write-zeroes (io_file.wz_max > 0: the kernel sends no zeroes), the range
 * ahead of the cursor is zeroed in large chunks instead (fallocate
 * PUNCH_HOLE|KEEP_SIZE on a block device: write-zeroes that may unmap and
 * never falls back to writing zeroes, -EOPNOTSUPP instead), each zeroing
 * made durable by an fdatasync of its own (both through a file description
 * of their own, zah_file: Linux reports a writeback error to one fdatasync
 * per description, and the write-back's must never miss one, writeback.c
 * "no tail" after page-cache writes); only then do its clusters count
 * as fresh (zah_lo..zah_ok), and the cursor hands them out as fresh space:
 * after a power loss such a cluster reads the zeroes or what was written
 * into it since, never older bytes.
 *
 * Why that holds: the range starts at or after the cursor when it is
 * submitted, and the cursor never moves back on a device (going read-only
 * forgets the zeroed range: zah_forget), so nothing was handed out in it
 * and nothing references it: its clusters have refcount 0 (everything past
 * the cursor has, alloc_cursor skips nothing there), no metadata lies there
 * (checked: q2_meta_overlaps, else zero-ahead turns off), and no I/O of ours
 * runs in it. While the zeroing and its sync run, the cursor may not enter
 * the range (zah_wait: an allocation there parks, one before it is cut
 * short), so no write of ours races the zeroing. Clusters handed out of the
 * range are fresh once: freed later, they come back through the free list
 * with its own flag.
 *
 * Off the request path: the first range is started at open, a cluster
 * margin (ZAH_MARGIN) past the cursor so that metadata and a first small
 * reserve need not wait; the next one when less than half a chunk of zeroed
 * space is left ahead. An allocation parks only if the cursor catches up
 * with a range still in flight. A range is zeroed in steps of
 * ZAH_STEP_BYTES, one after the other, then synced: close, a migration
 * handoff (close) and going read-only (q2_zah_stop) cut a range short at
 * its next step, so they wait for one step (or the range's sync) at most,
 * never for a whole range on a slow device; a range cut short counts
 * nothing fresh (its zeroes were never synced). A corrupt image starts no
 * range and cuts the one in flight short.
 *
 * A device that answers the zeroing with an error, or zeroes slower than
 * ZAH_MIN_RATE (beyond ZAH_SLACK_NS: it writes the zeroes after all, which
 * costs the disk's bandwidth), turns zero-ahead off, the links then syncing
 * as before, until the image goes read-only and back (qcow2_set_read_only
 * asks q2_zah_start again). The rate is judged over at least
 * ZAH_JUDGE_BYTES of zeroing (steps and syncs, across ranges): over less,
 * the time is mostly the syncs' and the worker threads' latency, which a
 * loaded machine stretches, not the device's bandwidth (a 76 MiB range on
 * a loop device took > 173 ms at load 11 and turned it off).
 */
#define ZAH_MARGIN      64u            /* clusters between the cursor and a new range */
#define ZAH_MIN_RATE    (1ull << 30)   /* bytes per second, zeroing and sync together */
#define ZAH_CHUNK_BYTES (1ull << 30)   /* bytes zeroed per range */
#define ZAH_STEP_BYTES  (64ull << 20)  /* bytes zeroed per fallocate */
#define ZAH_JUDGE_BYTES (256ull << 20) /* bytes zeroed before the rate is judged */
#define ZAH_SLACK_NS    100000000ull   /* beside ZAH_MIN_RATE: the sync's own latency */

static uint64_t zah_chunk(const struct qcow2 *q)
{
	uint64_t n = ZAH_CHUNK_BYTES >> q->cb;

	return n < 1024 ? 1024 : n;
}

/* Turn zero-ahead off if the zeroing judged so far was too slow. */
static void zah_judge(struct qcow2 *q)
{
	uint64_t ns = q->zah_win_ns, bytes = q->zah_win_bytes;

	if (!q->zah_min_rate || bytes < q->zah_judge_bytes)
		return;
	q->zah_win_ns = q->zah_win_bytes = 0;
	if ((double)ns <= (double)q->zah_slack_ns + (double)bytes * 1e9 / (double)q->zah_min_rate)
		return;
	q->zah_on = false;
	Q2_LOG(q, INFO,
	       "zeroing %llu MiB ahead took %llu ms: the device does not offload it; "
	       "zero-ahead off",
	       (unsigned long long)(bytes >> 20), (unsigned long long)(ns / 1000000));
}

/* The range in flight ended: @res < 0 failed; @fresh: zeroed and synced. */
static void zah_end(struct qcow2 *q, int res, bool fresh)
{
	q->zah_busy = false;
	q->zah_stop = false;
	if (res < 0) {
		q->zah_on = false;
		Q2_LOG(q, WARN, "zeroing ahead on the device failed (%s): new clusters sync first",
		       strerror(-res));
	} else if (fresh) {
		if (q->zah_ok == q->zah_blo && q->zah_ok > q->zah_lo)
			q->zah_ok = q->zah_bhi; /* contiguous with the range still ahead */
		else
			q->zah_lo = q->zah_blo, q->zah_ok = q->zah_bhi;
		q->zah_ranges++;
		zah_judge(q);
	}
	q2_wake_list_later(q, &q->space_waiters, 0);
}

static void zah_synced(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	if (res >= 0)
		q->zah_win_ns += q2_now_ns() - q->zah_t0;
	zah_end(q, res, res >= 0);
}

static void zah_zeroed(struct io_cmd *cmd, int res);

/* Zero the next step of the range in flight. */
static void zah_step(struct qcow2 *q)
{
	uint64_t n = q->zah_step_bytes >> q->cb;

	if (!n)
		n = 1;
	q->zah_bstep = q->zah_bhi - q->zah_bpos > n ? q->zah_bpos + n : q->zah_bhi;
	q->zah_cmd.done = zah_zeroed;
	q->zah_cmd.priv = q;
	q->zah_t0 = q2_now_ns();
	io_fallocate(q->loop, &q->zah_cmd, q->zah_fp, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		     q->zah_bpos << q->cb, (q->zah_bstep - q->zah_bpos) << q->cb);
}

static void zah_zeroed(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;

	if (res < 0) {
		zah_end(q, res, false);
		return;
	}
	q->zah_win_ns += q2_now_ns() - q->zah_t0;
	q->zah_win_bytes += (q->zah_bstep - q->zah_bpos) << q->cb;
	q->zah_bpos = q->zah_bstep;
	if (q->zah_stop || q->corrupt) {
		zah_end(q, 0, false); /* cut short: never synced, nothing fresh */
		return;
	}
	if (q->zah_bpos < q->zah_bhi) {
		zah_step(q);
		return;
	}
	/* the zeroes durable before any cluster of them counts as fresh */
	q->zah_cmd.done = zah_synced;
	q->zah_t0 = q2_now_ns();
	io_fdatasync(q->loop, &q->zah_cmd, q->zah_fp);
}

/*
 * Is every refcount table entry that counts clusters of [@lo, @hi) empty or
 * valid (as rc_locate checks it)? q2_scan_highest_used skips an invalid one,
 * so the cursor may lie below clusters in use that such an entry counts:
 * alloc_cursor stops there, marking the image corrupt (rc_locate), without
 * touching them, and no zeroing may reach them first.
 */
static bool zah_rt_valid(const struct qcow2 *q, uint64_t lo, uint64_t hi)
{
	for (uint64_t rti = lo >> q->rb_bits; rti <= (hi - 1) >> q->rb_bits && rti < q->rt_entries;
	     rti++) {
		uint64_t e = q->rt[rti], b = e & QCOW2_RTE_OFFSET_MASK;

		if (b && ((e & QCOW2_RTE_RESERVED_MASK) || (b & (q->cs - 1)) ||
			  b + q->cs > q2_host_end(q) || rt_is_bad(q, rti)))
			return false;
	}
	return true;
}

/* Start zeroing the next range when the zeroed space ahead runs short. */
static void zah_maybe(struct qcow2 *q)
{
	uint64_t chunk, lo, hi;

	if (!q->zah_on || q->zah_busy || q->read_only || q->closing || q->corrupt)
		return;
	chunk = zah_chunk(q);
	if (q->zah_ok >= q->cursor + chunk / 2)
		return;
	lo = q->zah_ok >= q->cursor + ZAH_MARGIN ? q->zah_ok : q->cursor + ZAH_MARGIN;
	hi = lo + chunk < q->host_limit ? lo + chunk : q->host_limit;
	if (lo >= hi)
		return;
	if (q2_meta_overlaps(q, lo << q->cb, (hi - lo) << q->cb)) {
		/* refcount 0 past the cursor, yet metadata: leave it to alloc_cursor */
		q->zah_on = false;
		Q2_LOG(q, WARN, "metadata past the allocation cursor: zero-ahead off");
		return;
	}
	if (!zah_rt_valid(q, lo, hi)) {
		q->zah_on = false;
		Q2_LOG(q, WARN,
		       "invalid refcount table entry past the allocation cursor: zero-ahead off");
		return;
	}
	q->zah_busy = true;
	q->zah_stop = false;
	q->zah_blo = lo;
	q->zah_bhi = hi;
	q->zah_bpos = lo;
	zah_step(q);
}

void q2_zah_start(struct qcow2 *q, bool on)
{
	struct qcow2_zah_keep *k = q->zah_keep;

	q->zah_want = on;
	q->zah_min_rate = ZAH_MIN_RATE;
	q->zah_slack_ns = ZAH_SLACK_NS;
	q->zah_judge_bytes = ZAH_JUDGE_BYTES;
	q->zah_step_bytes = ZAH_STEP_BYTES;
	q->zah_on = on && (q->file->flags & IO_FILE_BLOCKDEV) && q->file->wz_max > 0 &&
		    !q->ext_data && !q->read_only;
	if (q->zah_on && !q->zah_file_open) {
		/* the caller's description if it kept one open: after --user
		 * dropped the privileges the device may not open again */
		int ret = k && k->open ? 0 : io_file_reopen(q->file, k ? &k->file : &q->zah_file);

		if (ret < 0) {
			q->zah_on = false;
			Q2_LOG(q, WARN, "zero-ahead off: opening the device again: %s",
			       strerror(-ret));
		} else {
			if (k)
				k->open = true;
			q->zah_fp = k ? &k->file : &q->zah_file;
			q->zah_file_open = true;
		}
	}
	zah_maybe(q);
}

void q2_zah_close(struct qcow2 *q)
{
	if (q->zah_file_open && q->zah_fp == &q->zah_file)
		io_file_close(&q->zah_file);
	q->zah_file_open = false;
}

void q2_zah_stop(struct qcow2 *q, bool off)
{
	if (off)
		q->zah_on = false;
	if (q->zah_busy)
		q->zah_stop = true;
}

void q2_zah_forget(struct qcow2 *q)
{
	/* going read-only: another writer may use the device before we write again */
	q->zah_lo = q->zah_ok = 0;
}

/*
 * Clusters [c, c + n) are about to be handed out at the cursor: -EAGAIN
 * with @w parked while a zeroing runs over any of them.
 */
static int zah_wait(struct qcow2 *q, uint64_t c, uint64_t n, struct qcow2_waiter *w)
{
	if (!q->zah_busy || c + n <= q->zah_blo || c >= q->zah_bhi)
		return 0;
	park(q, w);
	return -EAGAIN;
}

/* How many of @k clusters at @c to hand out so that they are all fresh or all not. */
static uint64_t zah_cut(const struct qcow2 *q, uint64_t c, uint64_t k)
{
	if (q->zah_busy && c < q->zah_blo && c + k > q->zah_blo)
		k = q->zah_blo - c;
	if (q->zah_ok > q->zah_lo) {
		if (c < q->zah_lo && c + k > q->zah_lo)
			k = q->zah_lo - c;
		else if (c >= q->zah_lo && c < q->zah_ok && c + k > q->zah_ok)
			k = q->zah_ok - c;
	}
	return k;
}

static bool zah_fresh(const struct qcow2 *q, uint64_t c, uint64_t k)
{
	return c >= q->zah_lo && c + k <= q->zah_ok;
}

/* Create refcount block for table index @rti at cluster @c (all slices new, dirty). */
static int new_refblock(struct qcow2 *q, uint64_t rti, uint64_t c, uint64_t *rt)
{
	uint64_t off = c << q->cb;

	for (uint64_t s = 0; s < q->cs; s += q->slice_size)
		if (!q2_cache_new(&q->rcc, off + s))
			return -ENOMEM;
	rt[rti] = off;
	q->n_rb_new++;
	return q2_meta_add(q, c);
}

/* Set refcount of @c to @v; its slice must be cached. */
static int rc_set(struct qcow2 *q, uint64_t c, uint64_t v)
{
	struct rc_loc l;
	struct q2_slice *s;
	int ret = rc_locate(q, c, &l);

	if (ret < 0)
		return ret;
	if (!l.block)
		return -EIO;
	s = q2_cache_peek(&q->rcc, l.slice);
	if (!s)
		return -EAGAIN;
	qcow2_refcount_set(s->buf, l.idx, q->rc_order, v);
	q2_slice_dirty(s);
	return 0;
}

/*
 * Grow the refcount table so that index @need is covered, laying out new
 * refcount blocks and the new table at the cursor (whose own index is past
 * the old table, so every block needed there is new and nothing is loaded).
 */
static int grow_reftable(struct qcow2 *q, uint64_t need, struct qcow2_waiter *w)
{
	uint64_t old = q->rt_entries, a = q->cursor;
	uint64_t new_entries, t, b, *nrt;
	uint8_t *ndirty;
	int ret;

	/* the layout the offline edits use too (qcow2fmt/snapshot.c) */
	ret = qcow2_reftable_layout(q->cb, q->rb_bits, old, need, a, &new_entries, &b, &t);
	if (ret < 0) {
		Q2_LOG(q, ERROR, "refcount table would exceed %u bytes: image full",
		       QCOW2_MAX_REFTABLE_BYTES);
		return ret;
	}
	if (a + b + t > q->host_limit)
		return -ENOSPC;
	ret = zah_wait(q, a, b + t, w);
	if (ret < 0)
		return ret;
	ret = backing(q, a, b + t, w);
	if (ret < 0)
		return ret;
	nrt = calloc(new_entries, sizeof(*nrt));
	ndirty = calloc(new_entries * 8 / 512 / 8 + 1, 1);
	if (!nrt || !ndirty) {
		free(nrt);
		free(ndirty);
		return -ENOMEM;
	}
	memcpy(nrt, q->rt, old * sizeof(*nrt));
	for (uint64_t k = 0; k < b; k++) {
		ret = new_refblock(q, (a >> q->rb_bits) + k, a + k, nrt);
		if (ret < 0)
			goto undo;
	}
	/* swap in, then set refcounts of the new area through the new table */
	{
		uint64_t *ort = q->rt, ooff = q->rt_offset, ocl = q->rt_clusters;

		q->rt = nrt;
		q->rt_entries = new_entries;
		q->rt_offset = a + b;
		q->rt_offset <<= q->cb;
		q->rt_clusters = (uint32_t)t;
		free(q->rt_dirty);
		q->rt_dirty = ndirty;
		q->rt_relocated = true;
		free(ort);
		q->cursor = a + b + t;
		for (uint64_t c = a; c < a + b + t; c++) {
			ret = rc_set(q, c, 1);
			if (ret < 0)
				return ret; /* cannot happen: slices were just created */
			if (c >= a + b && q2_meta_add(q, c) < 0)
				return -ENOMEM;
		}
		q2_dec_range(q, ooff, ocl << q->cb);
	}
	Q2_LOG(q, INFO, "refcount table grown to %llu entries at 0x%llx",
	       (unsigned long long)new_entries, (unsigned long long)q->rt_offset);
	return 0;
undo:
	free(nrt);
	free(ndirty);
	return ret;
}

/*
 * Data clusters reserved ahead at a time (see alloc_data): 64 MiB worth,
 * between 256 and 4096 clusters, where the file system has room for four
 * times that beyond PREALLOC_RESERVE; else 256. Each reserve costs the link
 * batch that first needs it an fdatasync, which every write waiting on that
 * batch waits for: with 256 clusters of 64 KiB, 35-54 a second of 1.3-3.7 ms
 * each on a growing image at QD32 (contrib/bench/RESULTS.md). Metadata
 * clusters go past the reserve and need preallocated space there, hence the
 * room check.
 */
static uint32_t resv_clusters(const struct qcow2 *q)
{
	uint64_t n = (64ull << 20) >> q->cb, avail;

	if (n <= 256)
		return 256;
	if (n > 4096)
		n = 4096;
	avail = fs_avail(q);
	if (avail < PREALLOC_RESERVE || avail - PREALLOC_RESERVE < 4 * (n << q->cb))
		return 256;
	return (uint32_t)n;
}

static int alloc_cursor(struct qcow2 *q, uint32_t n, bool meta, uint64_t *host, bool *fresh,
			struct qcow2_waiter *w);

/*
 * Data clusters at the end of the file come from a reserve: resv_clusters()
 * at a time get their refcount raised (in the cache) before any of them is
 * handed out, so one write-back batch makes the refcounts of the whole
 * reserve durable (one fdatasync), and linking each cluster afterwards is a
 * single L2 write that is safe on its own (qcow2_link(): nothing on disk ever
 * points at a cluster whose refcount is 0 on disk). A crash leaks what is
 * left of the reserve; a clean close gives it back (q2_resv_release).
 */
static int alloc_data(struct qcow2 *q, uint32_t n, uint64_t *host, bool *fresh,
		      struct qcow2_waiter *w)
{
	uint64_t k;

	if (q->resv_next >= q->resv_end) {
		uint64_t h;
		bool f;
		uint32_t r = resv_clusters(q);
		int ret = alloc_cursor(q, n > r ? n : r, false, &h, &f, w);

		if (ret < 0)
			return ret;
		q->resv_next = h >> q->cb;
		q->resv_end = q->resv_next + (uint64_t)ret;
		q->resv_fresh = f;
		/* The next batch writes these refcounts; the first link batch that
		 * needs them syncs them (one fdatasync for the whole reserve). */
		q->resv_seq = q->rc_seq + 1;
	}
	k = q->resv_end - q->resv_next;
	if (k > n)
		k = n;
	*host = q->resv_next << q->cb;
	*fresh = q->resv_next >= q->fresh_start || q->resv_fresh;
	q->resv_next += k;
	if (q->resv_seq > q->link_need)
		q->link_need = q->resv_seq;
	return (int)k;
}

void q2_resv_release(struct qcow2 *q)
{
	if (q->resv_next < q->resv_end)
		q2_alloc_release(q, q->resv_next << q->cb, (uint32_t)(q->resv_end - q->resv_next));
	q->resv_next = q->resv_end = 0;
}

int q2_alloc_clusters(struct qcow2 *q, uint32_t n, bool meta, uint64_t *host, bool *fresh,
		      struct qcow2_waiter *w)
{
	struct q2_slice *s;
	struct rc_loc l;
	int ret;

	if (q->read_only)
		return -EROFS;
	q->alloc_from_free = false;
	/* reuse a freed cluster first (data only) */
	while (!meta && q->freelist.n) {
		uint64_t v = q->freelist.v[q->freelist.n - 1], c = v & ~FREE_ZERO;

		ret = rc_locate(q, c, &l);
		if (ret < 0)
			return ret;
		if (!l.block) {
			q->freelist.n--;
			continue;
		}
		ret = q2_cache_get(&q->rcc, l.slice, &s, w);
		if (ret < 0)
			return ret;
		q->freelist.n--;
		if (qcow2_refcount_get(s->buf, l.idx, q->rc_order) != 0)
			continue; /* taken meanwhile (cannot happen) */
		if (q2_meta_overlaps(q, c << q->cb, q->cs)) {
			q2_corrupt(q, "free cluster 0x%llx holds metadata (refcount 0)",
				   (unsigned long long)(c << q->cb));
			return -EIO;
		}
		qcow2_refcount_set(s->buf, l.idx, q->rc_order, 1);
		q2_slice_dirty(s);
		*host = c << q->cb;
		*fresh = (v & FREE_ZERO) != 0;
		q->alloc_from_free = true;
		q->n_alloc++;
		q->link_need = q->rc_seq + 1; /* linking it needs the next batch's sync */
		return 1;
	}
	if (!meta)
		return alloc_data(q, n, host, fresh, w);
	ret = alloc_cursor(q, n, meta, host, fresh, w);
	if (ret > 0)
		q->link_need = q->rc_seq + 1;
	return ret;
}

/* Clusters at the allocation cursor (refcounts raised in the cache). */
static int alloc_cursor(struct qcow2 *q, uint32_t n, bool meta, uint64_t *host, bool *fresh,
			struct qcow2_waiter *w)
{
	struct q2_slice *s;
	struct rc_loc l;
	int ret;

	for (;;) {
		uint64_t c = q->cursor, k;

		if (c >= q->host_limit)
			return -ENOSPC;
		if (q->prealloc_punching) {
			/* space past the front is being given back: wait for it */
			park(q, w);
			return -EAGAIN;
		}
		ret = zah_wait(q, c, 1, w);
		if (ret < 0)
			return ret;
		ret = rc_locate(q, c, &l);
		if (ret < 0)
			return ret;
		if (l.rti >= q->rt_entries) {
			ret = grow_reftable(q, l.rti, w);
			if (ret < 0)
				return ret;
			continue;
		}
		if (!l.block) {
			ret = backing(q, c, 1, w);
			if (ret < 0)
				return ret;
			ret = new_refblock(q, l.rti, c, q->rt);
			if (ret < 0)
				return ret;
			q2_wb_mark_rt(q, l.rti);
			q->cursor++;
			ret = rc_set(q, c, 1);
			if (ret < 0)
				return ret;
			continue;
		}
		ret = q2_cache_get(&q->rcc, l.slice, &s, w);
		if (ret < 0)
			return ret;
		if (qcow2_refcount_get(s->buf, l.idx, q->rc_order) != 0) {
			q->cursor++;
			continue;
		}
		for (k = 0; k < n && c + k < q->host_limit && l.idx + k < (1ull << q->src_bits);
		     k++) {
			if (qcow2_refcount_get(s->buf, l.idx + k, q->rc_order) != 0)
				break;
		}
		k = zah_cut(q, c, k);
		if (q2_meta_overlaps(q, c << q->cb, k << q->cb)) {
			/* metadata with refcount 0: the refcounts are wrong */
			q2_corrupt(q, "cluster 0x%llx with refcount 0 holds metadata",
				   (unsigned long long)(c << q->cb));
			return -EIO;
		}
		if (meta) {
			ret = backing(q, c, k, w);
			if (ret < 0)
				return ret;
		}
		for (uint64_t i = 0; i < k; i++)
			qcow2_refcount_set(s->buf, l.idx + i, q->rc_order, 1);
		q2_slice_dirty(s);
		q->cursor = c + k;
		*host = c << q->cb;
		*fresh = c >= q->fresh_start || zah_fresh(q, c, k);
		q->n_alloc += k;
		prealloc_maybe(q);
		zah_maybe(q);
		return (int)k;
	}
}

void q2_alloc_release(struct qcow2 *q, uint64_t host, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		uint64_t c = (host >> q->cb) + i;

		if (rc_set(q, c, 0) < 0) {
			/* slice gone (cannot happen while pinned): decrement the slow way */
			q2_dec_range(q, c << q->cb, q->cs);
			continue;
		}
		q2_u64v_push(&q->freelist, c);
	}
}

void q2_dec_range(struct qcow2 *q, uint64_t host, uint64_t len)
{
	if (!len)
		return;
	q2_zk_forget(q, host, len);
	for (uint64_t c = host >> q->cb; c <= (host + len - 1) >> q->cb; c++)
		if (q2_u64v_push(&q->dec_pending, c) < 0)
			Q2_LOG(q, WARN, "out of memory: cluster 0x%llx leaks",
			       (unsigned long long)(c << q->cb));
	if (q->dec_pending.n >= 4096)
		q2_wb_kick(q);
}

static void append(struct q2_u64v *dst, struct q2_u64v *src)
{
	if (!dst->n) {
		struct q2_u64v t = *dst;

		*dst = *src;
		*src = t;
		src->n = 0;
		return;
	}
	for (size_t i = 0; i < src->n; i++)
		q2_u64v_push(dst, src->v[i]);
	src->n = 0;
}

static void run_apply(struct qcow2 *q);
static void start_grace(struct qcow2 *q);

static void grace_done(struct qcow2 *q)
{
	q->grace_running = false;
	append(&q->dec_apply, &q->dec_wait);
	run_apply(q);
	start_grace(q);
}

static void start_grace(struct qcow2 *q)
{
	unsigned old;

	if (q->grace_running || !q->dec_grace.n)
		return;
	q->grace_running = true;
	append(&q->dec_wait, &q->dec_grace);
	old = q->gen & 1;
	q->gen++;
	q->ext_busy = q->ext.flip && !q->ext.flip(q->ext.priv);
	if (q->active[old] == 0 && !q->ext_busy)
		grace_done(q);
}

unsigned qcow2_io_begin(struct qcow2 *q)
{
	unsigned t = q->gen & 1;

	q->active[t]++;
	return t;
}

void qcow2_io_end(struct qcow2 *q, unsigned t)
{
	q->active[t & 1]--;
	if (q->grace_running && (t & 1) != (q->gen & 1) && q->active[t & 1] == 0 && !q->ext_busy)
		grace_done(q);
}

void qcow2_set_ext_io(struct qcow2 *q, const struct qcow2_ext_io *x)
{
	q->ext = x ? *x : (struct qcow2_ext_io){0};
}

void qcow2_ext_io_idle(struct qcow2 *q)
{
	if (!q->grace_running || !q->ext_busy)
		return;
	q->ext_busy = false;
	if (q->active[(q->gen & 1) ^ 1] == 0)
		grace_done(q);
}

void q2_dec_durable(struct qcow2 *q, struct q2_u64v *decs)
{
	append(&q->dec_grace, decs);
	start_grace(q);
}

static void dec_wake(struct qcow2_waiter *w)
{
	struct qcow2 *q = w->priv;

	q->dec_running = false;
	if (w->err < 0) {
		/* could not read a refcount block: these clusters leak */
		Q2_LOG(q, WARN, "cannot lower a refcount (%s): cluster 0x%llx leaks",
		       strerror(-w->err),
		       (unsigned long long)(q->dec_apply.v[q->dec_apply_pos] << q->cb));
		q->dec_apply_pos++;
	}
	run_apply(q);
}

static void punch_next(struct qcow2 *q);

static void punch_done(struct io_cmd *cmd, int res)
{
	struct qcow2 *q = cmd->priv;
	uint64_t flag = res == 0 ? FREE_ZERO : 0;

	q->punch_busy = false;
	if (res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS || res == -EINVAL)
		q->no_punch = true;
	for (uint64_t i = 0; i < q->punch_n; i++)
		q2_u64v_push(&q->freelist, (q->punch_c + i) | flag);
	q->punch_n = 0;
	punch_next(q);
}

/* Give freed clusters' space back (hole), then put them on the free list. */
static void punch_next(struct qcow2 *q)
{
	size_t i = q->punchq_pos;
	uint64_t c, n = 1;

	if (q->punch_busy || q->punch_hold)
		return;
	if (i >= q->punchq.n) {
		q->punchq.n = q->punchq_pos = 0;
		return;
	}
	c = q->punchq.v[i++];
	/* runs of at most 32 MiB: a close waits for the punch in flight
	 * (one of 256 MiB took 0.2 s) */
	while (i < q->punchq.n && q->punchq.v[i] == c + n && n < 4096 &&
	       ((n + 1) << q->cb) <= (32ull << 20)) {
		n++;
		i++;
	}
	q->punchq_pos = i;
	if (q->no_punch || q->closing) {
		for (uint64_t k = 0; k < n; k++)
			q2_u64v_push(&q->freelist, c + k);
		punch_next(q);
		return;
	}
	q->punch_busy = true;
	q->punch_c = c;
	q->punch_n = n;
	q->punch_cmd.done = punch_done;
	q->punch_cmd.priv = q;
	io_fallocate(q->loop, &q->punch_cmd, q->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		     c << q->cb, n << q->cb);
}

static void freed(struct qcow2 *q, uint64_t c)
{
	uint64_t off = c << q->cb;

	q2_meta_del(q, c);
	for (uint64_t s = 0; s < q->cs; s += q->slice_size) {
		q2_cache_forget(&q->l2c, off + s);
		q2_cache_forget(&q->rcc, off + s);
	}
	if (q->no_punch || (q->file->flags & IO_FILE_BLOCKDEV))
		q2_u64v_push(&q->freelist, c);
	else
		q2_u64v_push(&q->punchq, c);
}

int q2_alloc_take_free(struct qcow2 *q, struct q2_u64v *out)
{
	int ret = 0;

	for (size_t i = q->punchq_pos; i < q->punchq.n && ret == 0; i++)
		ret = q2_u64v_push(out, q->punchq.v[i]);
	for (size_t i = 0; i < q->freelist.n && ret == 0; i++)
		ret = q2_u64v_push(out, q->freelist.v[i] & ~FREE_ZERO);
	q->punchq.n = q->punchq_pos = 0;
	q->freelist.n = 0;
	return ret;
}

uint64_t q2_alloc_adopt(struct qcow2 *q, uint64_t c, uint64_t n)
{
	uint64_t taken = 0;

	if (q->read_only)
		return 0;
	for (uint64_t k = c; k < c + n && k < q->cursor; k++) {
		if (q2_meta_overlaps(q, k << q->cb, q->cs))
			continue;
		if (q2_u64v_push((q->no_punch || (q->file->flags & IO_FILE_BLOCKDEV)) ? &q->freelist
										      : &q->punchq,
				 k) < 0)
			break;
		taken++;
	}
	punch_next(q);
	return taken;
}

/*
 * Going read-only (a layer becomes a backing file: the end of a block-commit
 * that did not pivot to its base, an external snapshot's old layer): the
 * engine will not allocate again before it is made writable, so the space of
 * what is free goes back now, not at a close that only a writer does
 * (qcow2_close): the reserve of data clusters just released (q2_resv_release:
 * up to 64 MiB, fallocated) and the preallocated tail. The caller made it
 * quiet and flushed, so every refcount is written back and synced: a cluster
 * whose refcount on disk is 0 is referenced by nothing, and its release is
 * durable, the rule for reusing freed clusters (a crash meanwhile leaks no
 * more than before). The file is cut after the last cluster with a refcount
 * (read from disk, as at open), and the free clusters below it that were
 * never punched (the reserve, when metadata landed after it) are punched
 * through the punch queue. The allocation state follows the cut as an open
 * would set it, for a later qcow2_set_read_only(false): cursor, fresh space,
 * preallocation at the new end. Once per read-only transition (gave_back);
 * -EAGAIN while the punches run (the caller flushes and calls again).
 */
int q2_alloc_give_back(struct qcow2 *q)
{
	uint64_t used = 0, size = 0;
	size_t k = 0;

	if (q->gave_back)
		return q->punch_busy ? -EAGAIN : 0;
	q->gave_back = true;
	if (q->ext_data || (q->file->flags & IO_FILE_BLOCKDEV) || q->corrupt ||
	    q2_scan_highest_used(q, &used) < 0 || used > q->cursor)
		return 0;
	if (io_file_get_size(q->file, &size) == 0 && size > (used << q->cb)) {
		int ret = io_file_truncate(q->file, used << q->cb);

		if (ret < 0) {
			Q2_LOG(q, WARN, "giving back the unused tail: %s", strerror(-ret));
			return 0;
		}
		q->file->size = used << q->cb;
		q->prealloc_ok = q->prealloc_end = used << q->cb;
		if (q->fresh_start > used)
			q->fresh_start = used;
		q->cursor = used;
	}
	/* free clusters past the cut are the cursor's again; those below it are punched */
	for (size_t i = 0; i < q->freelist.n; i++) {
		uint64_t v = q->freelist.v[i], c = v & ~FREE_ZERO;

		if (c >= q->cursor)
			continue;
		if ((v & FREE_ZERO) || q->no_punch || q2_u64v_push(&q->punchq, c) < 0)
			q->freelist.v[k++] = v;
	}
	q->freelist.n = k;
	punch_next(q);
	return q->punch_busy ? -EAGAIN : 0;
}

static void run_apply(struct qcow2 *q)
{
	if (q->dec_running)
		return;
	while (q->dec_apply_pos < q->dec_apply.n) {
		uint64_t c = q->dec_apply.v[q->dec_apply_pos], rc;
		struct q2_slice *s;
		struct rc_loc l;
		int ret;

		ret = rc_locate(q, c, &l);
		if (ret == 0 && !l.block) {
			q2_corrupt(q, "freeing cluster 0x%llx that has no refcount block",
				   (unsigned long long)(c << q->cb));
			ret = -EIO;
		}
		if (ret == 0) {
			q->dec_waiter.wake = dec_wake;
			q->dec_waiter.priv = q;
			ret = q2_cache_get(&q->rcc, l.slice, &s, &q->dec_waiter);
			if (ret == -EAGAIN) {
				q->dec_running = true;
				return;
			}
		}
		q->dec_apply_pos++;
		if (ret < 0)
			continue;
		rc = qcow2_refcount_get(s->buf, l.idx, q->rc_order);
		if (rc == 0) {
			q2_corrupt(q, "refcount of cluster 0x%llx would drop below zero",
				   (unsigned long long)(c << q->cb));
			continue;
		}
		qcow2_refcount_set(s->buf, l.idx, q->rc_order, rc - 1);
		q2_slice_dirty(s);
		if (rc == 1)
			freed(q, c);
	}
	q->dec_apply.n = 0;
	q->dec_apply_pos = 0;
	punch_next(q);
	q2_wb_maybe(q);
}

void q2_alloc_exit(struct qcow2 *q)
{
	free(q->freelist.v);
	free(q->dec_pending.v);
	free(q->dec_grace.v);
	free(q->dec_apply.v);
	free(q->dec_wait.v);
	free(q->punchq.v);
	memset(&q->freelist, 0, sizeof(q->freelist));
}
