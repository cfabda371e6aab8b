/* SPDX-License-Identifier: MIT */
/*
 * src/layers.c — external snapshots and the active-layer commit job.
 *
 * blockdev-snapshot-sync: the device is paused (new requests are held, not
 * refused: blk_dev_pause), the requests in flight finish on the old layer,
 * the old layer is flushed and becomes a read-only backing file in place
 * (img_set_writable: its write lock goes, QEMU's read-only lock set stays),
 * the new overlay is opened over it (img_opts.backing_img: the very same
 * open image is its backing) and put under the device, and the held requests
 * start on it. The guest sees a pause of a drain and a flush. Persistent
 * dirty bitmaps the old layer tracks are stored into its file first, as
 * QEMU stores them at its read-only reopen (held path, layers_held ->
 * img_bitmap_edit 'S'), and stay listed there, read-only (writable and
 * recording again if a block-commit makes the node a writer).
 *
 * block-commit of the active layer (QEMU's mirror-style "active commit"):
 * the base takes the write permission again (img_set_writable; a base
 * opened read-only at start-up is reopened read-write first, with the
 * device held, from layers_held: img_reopen_rw); a base smaller than top
 * (block_resize while an overlay was active) is grown to top's size first,
 * as QEMU's commit and mirror jobs do (job_grow, img_grow); every
 * chunk allocated above the base (img_block_status of each layer) is marked
 * dirty, and so is every range a guest write, write-zeroes or discard
 * touched once it ended (blk_dev_set_write_hook, from the job's start on).
 * One copy at a time (so two copies of a chunk never race) takes the next
 * dirty run, clears it, reads it through the chain from the active layer and
 * writes it into the base. With nothing dirty left the job is READY (event
 * BLOCK_JOB_READY) and keeps following the guest's writes. block-job-complete
 * pauses the device, copies what is still dirty, flushes the base and puts
 * it under the device (writable, holding the write lock); the layers above
 * it are closed. block-job-cancel (and a failed copy) pauses, lets the copy
 * in flight end, flushes the base and makes it a read-only backing file
 * again.
 *
 * Intermediate commit (top below the active layer): the same copy, from
 * top, of what top and the layers down to the base hold (no write hook:
 * the guest writes above top); no READY: with nothing left the base is
 * flushed and, with the device held (layers_held -> drop_top), the layer
 * above top records the base as its backing file (img_change_backing: the
 * header rewritten and synced, the in-memory chain relinked), top leaves
 * the chain and is closed, the base becomes read-only again.
 *
 * Threads (vqcowd --io-threads, the rings on the queues' threads): every
 * change of blk/'s device (pause, resume, the image under it, the write
 * hook) is made with the I/O threads parked (c->park); requests held while
 * paused start again on the thread that popped them (blk_dev_resume); the
 * write hook runs on the thread that completed the write, marks the dirty
 * map atomically (img_copy_mark) and wakes the job with one post; drains are
 * polled from ctl_tick, which the daemon runs every millisecond while
 * layers_waiting() says one is awaited.
 *
 * Crash safety: the job never writes the layers above the base (but the
 * header of the layer above top, last, in an intermediate commit), and writes
 * the base only through the qcow2 engine (its durability order), with data
 * the layers above hold too: a kill -9 at any point leaves every file
 * consistent and the chain reading what the guest wrote.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blk.h"
#include "control.h"
#include "img.h"
#include "layers.h"
#include "qcow2tool.h"
#include "util.h"
#include "vlog.h"

#define NAMES_MAX   64
#define DRAIN_NS    30000000000ull /* give up a pause after 30 s */
#define MAX_FLUSHES 20
#define SETTLE_NS   10000000000ull /* and more flushes for up to 10 s */
#define RL_SLICE_NS 100000000ull   /* rate limit slice: 100 ms */

enum jstat {
	JS_CREATED,
	JS_RUNNING,
	JS_PAUSED,
	JS_READY,
	JS_STANDBY,
	JS_WAITING,
	JS_PENDING,
	JS_ABORTING,
	JS_CONCLUDED,
	JS_NULL,
};

static const char *const jstat_name[] = {"created", "running", "paused",   "ready",     "standby",
					 "waiting", "pending", "aborting", "concluded", "null"};

struct node_name {
	struct img *img;
	char *name;
};

/* blockdev-snapshot-sync in progress (the device is paused). */
struct snap {
	struct qmp_pending *reply;
	struct img *old;
	char *file, *name;
	bool created;
	bool flushing;
	bool store_held; /* enabled persistent bitmaps to store from layers_held */
	bool stored;
	unsigned flushes;
	uint64_t t0;
	struct img_io fio;
	int flush_res;
	struct io_cmd post;
	struct ctl *c;
};

/* END_DROP: an intermediate commit copied everything (layers_held drops top) */
enum jend { END_NONE, END_PIVOT, END_CANCEL, END_FAIL, END_STOP, END_DROP };

struct cjob {
	struct ctl *c;
	struct cjob *next_ended; /* struct layers' ended list */
	char *id;
	struct img *top, *base;
	uint64_t size;
	struct img_copy k; /* the copy loop (img/copy.c) */
	uint64_t speed;    /* bytes/s, 0 = unlimited */
	enum jstat status;
	bool was_ready; /* BLOCK_JOB_READY sent: in sync from then on (QEMU's "ready") */
	bool user_paused;
	bool posted, timer_armed;
	bool timer_cancelled;       /* io_cancel sent for the rate-limit timer */
	bool paused_dev;            /* we paused the device (ending) */
	bool cancel_ready;          /* cancelled while ready without force: ends as completed */
	struct qmp_pending *reopen; /* the reply, while the base is reopened (layers_held) */
	bool inter;                 /* intermediate commit: top is below the active layer */
	bool drop_held;             /* END_DROP: waiting for layers_held */
	struct img *above;          /* inter: the layer whose backing file is top */
	char *backing_name;         /* inter: the base's name written into above's header */
	enum jend end;
	int end_stage; /* 0 draining, 1 flushing, 2 done */
	unsigned flushes;
	uint64_t end_t0;
	int error;
	char errmsg[256];
	/* rate limit: bytes copied since rl_t0 */
	uint64_t rl_t0, rl_bytes;
	struct io_cmd post, timer, fpost;
	struct img_io fio;
	int flush_res;
	/* the base grown to top's size first, as QEMU's commit and mirror do
	 * (k.busy while the grow is in flight: every end path waits for it) */
	struct img_grow grow;
	bool grown;
	bool held_grow; /* the grow blocks (img_grow_blocks): from layers_held */
};

struct layers {
	struct node_name names[NAMES_MAX];
	unsigned nnames;
	unsigned auto_seq;
	struct snap *snap;
	struct cjob *job;
	/* the write hook on another thread: job_kick posted to the job's loop */
	struct io_loop *hook_loop;
	struct io_cmd hook_cmd;
	bool hook_posted; /* atomic */
	/* finished jobs whose dropped layers are still open: reported once closed */
	struct cjob *ended;
};

/* The chain as it was at start-up gets its names the first time we look. */
static struct layers *get(struct ctl *c)
{
	struct layers *L = c->layers;
	unsigned depth = 0;

	if (L)
		return L;
	L = calloc(1, sizeof(*L));
	if (!L)
		return NULL;
	for (struct img *i = c->img; i && L->nnames < NAMES_MAX; i = img_backing(i), depth++) {
		char buf[300];

		if (depth)
			snprintf(buf, sizeof(buf), "%s-backing%u", c->node_name, depth);
		L->names[L->nnames].img = i;
		L->names[L->nnames].name = strdup(depth ? buf : c->node_name);
		if (!L->names[L->nnames].name)
			break;
		L->nnames++;
	}
	c->layers = L;
	return L;
}

static const char *name_of(struct layers *L, struct img *img)
{
	for (unsigned i = 0; i < L->nnames; i++)
		if (L->names[i].img == img)
			return L->names[i].name;
	return NULL;
}

static struct img *find_name(struct ctl *c, struct layers *L, const char *name)
{
	for (struct img *i = c->img; i; i = img_backing(i)) {
		const char *n = name_of(L, i);

		if (n && strcmp(n, name) == 0)
			return i;
	}
	return NULL;
}

static void name_drop(struct layers *L, struct img *img)
{
	for (unsigned i = 0; i < L->nnames; i++) {
		if (L->names[i].img == img) {
			free(L->names[i].name);
			L->names[i] = L->names[--L->nnames];
			return;
		}
	}
}

const char *layers_node_name(struct ctl *c, struct img *img, unsigned depth, char *buf, size_t len)
{
	struct layers *L = get(c);
	const char *n = L ? name_of(L, img) : NULL;

	if (n)
		return n;
	if (!depth)
		return c->node_name;
	snprintf(buf, len, "%s-backing%u", c->node_name, depth);
	return buf;
}

static const char *sarg(json_t *args, const char *k)
{
	return json_string_value(json_object_get(args, k));
}

/* QEMU's rule for node names: a letter, then letters, digits, '-', '.', '_'; < 32 bytes. */
static bool valid_node_name(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 31 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z')))
		return false;
	for (size_t i = 1; i < n; i++) {
		char ch = s[i];

		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_'))
			return false;
	}
	return true;
}

/*
 * The device (blk/) changes only with the I/O threads parked (c->park):
 * they pop, submit and complete requests and run the write hook. A held
 * request starts again on its queue's thread (blk_dev_resume).
 */
static void park(struct ctl *c)
{
	if (c->park)
		c->park(c->opaque, true);
}

static void unpark(struct ctl *c)
{
	if (c->park)
		c->park(c->opaque, false);
}

static void dev_pause(struct ctl *c)
{
	park(c);
	blk_dev_pause(c->blk);
	unpark(c);
}

static void dev_resume(struct ctl *c)
{
	park(c);
	blk_dev_resume(c->blk);
	unpark(c);
}

static void set_hook(struct ctl *c, blk_write_hook_fn *fn, void *priv)
{
	park(c);
	blk_dev_set_write_hook(c->blk, fn, priv);
	unpark(c);
}

/* @img under the device, the active layer (no request in flight: paused, drained). */
static void set_active(struct ctl *c, struct img *img)
{
	park(c);
	blk_dev_set_img(c->blk, img);
	c->img = img;
	c->set_active(c->opaque, img);
	unpark(c);
}

static void resume_dev(struct ctl *c)
{
	dev_resume(c);
	c->kick(c->opaque); /* requests held meanwhile, and rings that waited */
}

/* ---- blockdev-snapshot-sync ---- */

static void snap_end(struct ctl *c, int ret, const char *msg)
{
	struct layers *L = c->layers;
	struct snap *s = L->snap;

	L->snap = NULL;
	if (ret < 0) {
		vlog(VLOG_WARN, NULL, "qmp: blockdev-snapshot-sync %s failed: %s", s->file, msg);
		if (s->created)
			unlink(s->file);
		if (s->reply)
			qmp_pending_error(s->reply, "%s", msg);
	} else if (s->reply) {
		qmp_pending_return(s->reply, NULL);
	}
	resume_dev(c);
	free(s->file);
	free(s->name);
	free(s);
}

/*
 * Flush again before a layer becomes read-only (img_set_writable said
 * -EAGAIN/-EBUSY)? The engine can stay busy in the background after a
 * flush ended (punching the released data reserve, a preallocation in
 * flight), longer than MAX_FLUSHES quick flushes on a loaded machine: so
 * at least MAX_FLUSHES of them, and more until SETTLE_NS after @t0.
 */
static bool flush_again(unsigned flushes, uint64_t t0)
{
	return flushes < MAX_FLUSHES || util_now_ns() - t0 < SETTLE_NS;
}

static void snap_flushed(struct img_io *io, int res);

static void snap_flush(struct snap *s)
{
	s->flushing = true;
	s->flushes++;
	s->fio.done = snap_flushed;
	s->fio.priv = s;
	img_flush(s->old, &s->fio);
}

static void snap_after_flush(struct io_cmd *cmd, int res);

/* The flush request itself still counts as in flight until its done() returned. */
static void snap_flushed(struct img_io *io, int res)
{
	struct snap *s = io->priv;

	s->flush_res = res;
	s->post.done = snap_after_flush;
	s->post.priv = s;
	io_post(s->old->loop, &s->post);
}

static void snap_after_flush(struct io_cmd *cmd, int unused)
{
	struct snap *s = cmd->priv;
	struct ctl *c = s->c;
	int res = s->flush_res;
	struct img_opts o;
	struct img *ov;
	char err[512] = "", msg[600];
	int ret;

	s->flushing = false;
	if (res < 0) {
		snprintf(msg, sizeof(msg), "%s: flush failed: %s", s->old->path, strerror(-res));
		snap_end(c, res, msg);
		return;
	}
	ret = img_set_writable(s->old, false, err, sizeof(err));
	/* -EBUSY: a request's completion ran before the image let go of it */
	if ((ret == -EAGAIN || ret == -EBUSY) && flush_again(s->flushes, s->t0)) {
		snap_flush(s);
		return;
	}
	if (ret == -ENOTSUP && !s->stored) {
		/* enabled persistent bitmaps: stored into the file first, as QEMU
		 * does at the read-only reopen, outside the loop (layers_held) */
		s->store_held = true;
		c->hold(c->opaque);
		return;
	}
	if (ret < 0) {
		snap_end(c, ret, err[0] ? err : strerror(-ret));
		return;
	}
	o = *c->img_opts;
	o.format = "qcow2";
	o.read_only = false;
	o.backing = false;
	o.inactive = false;
	o.force_share = false;
	o.backing_img = s->old;
	ret = img_open(&ov, s->old->loop, s->file, &o, err, sizeof(err));
	if (ret == 0 && ov->size != s->old->size) {
		snprintf(err, sizeof(err),
			 "%s: virtual size %" PRIu64 " differs from %s's (%" PRIu64 ")", s->file,
			 ov->size, s->old->path, s->old->size);
		img_take_backing(ov);
		c->retire(c->opaque, ov);
		ret = -EINVAL;
	}
	if (ret < 0) {
		char e2[512];

		if (img_set_writable(s->old, true, e2, sizeof(e2)) < 0)
			vlog(VLOG_ERROR, NULL, "qmp: %s stays read-only: %s", s->old->path, e2);
		snap_end(c, ret, err[0] ? err : strerror(-ret));
		return;
	}
	c->layers->names[c->layers->nnames].img = ov;
	c->layers->names[c->layers->nnames].name = s->name;
	c->layers->nnames++;
	c->node_name = s->name;
	s->name = NULL;
	set_active(c, ov);
	vlog(VLOG_INFO, NULL, "qmp: external snapshot: %s (node %s) is the active layer over %s",
	     ov->path, c->node_name, s->old->path);
	s->created = false;
	snap_end(c, 0, NULL);
}

static void snap_tick(struct ctl *c, struct snap *s)
{
	if (s->flushing || s->store_held)
		return;
	if (blk_dev_inflight(c->blk)) {
		if (util_now_ns() - s->t0 > DRAIN_NS)
			snap_end(c, -ETIMEDOUT, "requests in flight did not end within 30 s");
		return;
	}
	snap_flush(s);
}

int layers_snapshot_sync(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct layers *L = get(c);
	const char *dev = sarg(args, "device"), *node = sarg(args, "node-name");
	const char *file = sarg(args, "snapshot-file"), *sname = sarg(args, "snapshot-node-name");
	const char *fmt = sarg(args, "format"), *mode = sarg(args, "mode");
	const char *want = node ? node : dev;
	struct img *img;
	struct snap *s;
	bool existing;
	char autoname[32];
	int r;

	if (!L)
		return -ENOMEM;
	img = want ? find_name(c, L, want) : NULL;
	if (!img) {
		snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'", dev ? dev : "",
			 node ? node : "");
		return -ENOENT;
	}
	if (c->ops) { /* an internal snapshot waits for the device to drain */
		snprintf(err, errlen, "Node '%s' is busy: an internal snapshot is being taken",
			 want);
		return -EBUSY;
	}
	if (img != c->img) {
		const char *above = c->node_name;

		for (struct img *i = c->img; i; i = img_backing(i)) {
			if (img_backing(i) == img) {
				above = name_of(L, i) ? name_of(L, i) : c->node_name;
				break;
			}
		}
		snprintf(err, errlen, "Node '%s' is busy: node is used as backing hd of '%s'", want,
			 above);
		return -EBUSY;
	}
	if (L->snap || L->job) {
		snprintf(err, errlen, "Node '%s' is busy: block device is in use by block job: %s",
			 want, L->job ? "commit" : "snapshot");
		return -EBUSY;
	}
	if (fmt && strcmp(fmt, "qcow2") != 0) {
		snprintf(err, errlen, "Format '%s' is not supported for the overlay (only qcow2)",
			 fmt);
		return -ENOTSUP;
	}
	if (mode && strcmp(mode, "existing") != 0 && strcmp(mode, "absolute-paths") != 0) {
		snprintf(err, errlen, "Parameter 'mode' does not accept value '%s'", mode);
		return -EINVAL;
	}
	existing = mode && strcmp(mode, "existing") == 0;
	if (!existing && strcmp(file, img->path) == 0) {
		snprintf(err, errlen,
			 "Error: Trying to create an image with the same filename as the backing "
			 "file");
		return -EINVAL;
	}
	if (node && !sname) {
		snprintf(err, errlen, "New overlay node-name missing");
		return -EINVAL;
	}
	if (sname && !valid_node_name(sname)) {
		snprintf(err, errlen, "Invalid node-name: '%s'", sname);
		return -EINVAL;
	}
	if (sname && find_name(c, L, sname)) {
		snprintf(err, errlen, "Duplicate nodes with node-name='%s'", sname);
		return -EEXIST;
	}
	if (L->nnames >= NAMES_MAX) {
		snprintf(err, errlen, "Too many layers (%u)", NAMES_MAX);
		return -ENOSPC;
	}
	if (!img_may_write(img)) {
		snprintf(err, errlen, "Node '%s' is read-only", want);
		return -EROFS;
	}
	if (!sname) {
		/* QEMU names anonymous nodes "#blockN" */
		snprintf(autoname, sizeof(autoname), "#block%u", 100 + L->auto_seq++);
		sname = autoname;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->c = c;
	s->old = img;
	s->file = strdup(file);
	s->name = strdup(sname);
	if (!s->file || !s->name) {
		r = -ENOMEM;
		goto fail;
	}
	if (!existing) {
		struct qcow2_create_opts co = {0};
		char *abs = NULL;

		/* mode absolute-paths: the backing file name is absolute (no
		 * realpath: readlink is not on the seccomp list; cwd was taken
		 * at start-up) */
		if (img->path[0] != '/' && c->cwd && asprintf(&abs, "%s/%s", c->cwd, img->path) < 0)
			abs = NULL;

		co.size = img->size;
		co.size_set = true;
		co.backing_file = abs ? abs : img->path;
		co.backing_fmt = img->ops->format;
		r = qcow2_create(file, &co, NULL, err, errlen);
		free(abs);
		if (r < 0)
			goto fail;
		s->created = true;
	}
	s->reply = qmp_server_defer(c->qmp);
	if (!s->reply) {
		r = -ENOMEM;
		goto fail;
	}
	s->t0 = util_now_ns();
	L->snap = s;
	dev_pause(c);
	vlog(VLOG_INFO, NULL, "qmp: blockdev-snapshot-sync %s over %s: draining", file, img->path);
	snap_tick(c, s);
	return QMP_PENDING;

fail:
	if (s->created)
		unlink(file);
	free(s->file);
	free(s->name);
	free(s);
	if (r == -ENOMEM && !err[0])
		snprintf(err, errlen, "out of memory");
	return r;
}

/* ---- the commit job ---- */

static json_t *job_event_data(struct cjob *j)
{
	uint64_t len = j->k.copied + img_copy_remaining(&j->k);
	uint64_t off = j->k.copied;

	if (j->inter) {
		/* QEMU's commit job counts the whole image, allocated or not */
		uint64_t left = len - j->k.copied;

		len = j->size;
		off = left < len ? len - left : 0;
	}
	return json_pack("{s:s,s:s,s:I,s:I,s:I}", "type", "commit", "device", j->id, "len",
			 (json_int_t)len, "offset", (json_int_t)off, "speed", (json_int_t)j->speed);
}

static void set_status(struct cjob *j, enum jstat st)
{
	if (j->status == st)
		return;
	j->status = st;
	if (j->c->qmp)
		qmp_server_event(j->c->qmp, "JOB_STATUS_CHANGE",
				 json_pack("{s:s,s:s}", "id", j->id, "status", jstat_name[st]));
}

static void job_free(struct cjob *j)
{
	img_copy_free(&j->k);
	free(j->id);
	free(j->backing_name);
	free(j);
}

static void job_run(struct cjob *j);

static void post_done(struct io_cmd *cmd, int res)
{
	struct cjob *j = cmd->priv;

	(void)res;
	j->posted = false;
	job_run(j);
}

static void job_kick(struct cjob *j)
{
	if (j->posted || j->k.busy || j->timer_armed)
		return;
	j->posted = true;
	j->post.done = post_done;
	j->post.priv = j;
	io_post(j->top->loop, &j->post);
}

static void timer_done(struct io_cmd *cmd, int res)
{
	struct cjob *j = cmd->priv;

	(void)res;
	j->timer_armed = false;
	j->timer_cancelled = false;
	job_run(j);
}

/* On the job's loop: a guest write ended on another thread (write_hook). */
static void hook_kicked(struct io_cmd *cmd, int res)
{
	struct layers *L = cmd->priv;

	(void)res;
	__atomic_store_n(&L->hook_posted, false, __ATOMIC_RELEASE);
	/* the job that posted may be gone: whichever runs now looks */
	if (L->job && !L->job->reopen)
		job_kick(L->job);
}

/*
 * blk/'s write hook: a guest write, write-zeroes or discard ended, on the
 * thread that completed it (an I/O thread's, or the job's loop). The mark
 * is atomic (img_copy_mark); the job runs on its loop, woken by one post
 * at a time. Never called once set_hook(NULL) returned (the threads were
 * parked), so @j is alive here; the post outlives it (L's).
 */
static void write_hook(void *priv, uint64_t off, uint64_t len)
{
	struct cjob *j = priv;
	struct layers *L = j->c->layers;

	img_copy_mark(&j->k, off, len);
	if (io_loop_current() == j->top->loop) {
		job_kick(j);
		return;
	}
	if (!__atomic_exchange_n(&L->hook_posted, true, __ATOMIC_ACQ_REL)) {
		L->hook_cmd.done = hook_kicked;
		L->hook_cmd.priv = L;
		io_post_remote(L->hook_loop, &L->hook_cmd);
	}
}

static void job_end_step(struct cjob *j);

static void job_fail(struct cjob *j, int err, const char *what)
{
	if (!j->error) {
		j->error = err;
		snprintf(j->errmsg, sizeof(j->errmsg), "%s", what);
		vlog(VLOG_WARN, NULL, "qmp: job %s: %s", j->id, what);
	}
	if (!j->end || j->end == END_PIVOT || j->end == END_DROP) {
		j->end = END_FAIL;
		j->end_t0 = util_now_ns();
		if (!j->paused_dev) {
			dev_pause(j->c);
			j->paused_dev = true;
		}
	}
}

/* From img/copy.c: a copy ended (c_res), or the parked scan may go on. */
static void copy_wake(struct img_copy *k, bool copy_ended)
{
	struct cjob *j = k->priv;

	if (copy_ended && k->c_res < 0)
		job_fail(j, k->c_res, k->errmsg);
	else if (copy_ended)
		j->rl_bytes += k->c_len;
	job_kick(j);
}

/* On the job's loop: the base's grow ended (its new size durable, or failed). */
static void grow_done(struct img_grow *g, int res)
{
	struct cjob *j = g->priv;

	j->k.busy = false;
	if (res < 0) {
		char msg[600];

		snprintf(msg, sizeof(msg), "growing %s to %" PRIu64 " bytes: %s", j->base->path,
			 j->size, g->err[0] ? g->err : strerror(-res));
		job_fail(j, res, msg);
	} else
		vlog(VLOG_INFO, NULL, "qmp: job %s: %s grown to %" PRIu64 " bytes", j->id,
		     j->base->path, j->size);
	job_kick(j);
}

/*
 * The job's first step: a base smaller than top (the disk grown online while
 * an overlay was active) grows to top's size, as QEMU's commit and mirror
 * jobs truncate their target. The new range reads zeroes in the base
 * already, but what the layers above hold there is copied all the same,
 * zeroes too (as write-zeroes), as QEMU writes them: the base's enabled
 * bitmaps record them as QEMU's do. Returns true when the copy may go on.
 */
static bool job_grow(struct cjob *j)
{
	int r;

	if (j->grown)
		return true;
	j->grown = true;
	if (j->base->size >= j->size)
		return true;
	j->grow.done = grow_done;
	j->grow.priv = j;
	j->k.busy = true;
	r = img_grow(j->base, j->size, &j->grow);
	if (r == 1)
		return false; /* grow_done() goes on */
	j->k.busy = false;
	if (r < 0) {
		grow_done(&j->grow, r);
		return false;
	}
	vlog(VLOG_INFO, NULL, "qmp: job %s: %s grown to %" PRIu64 " bytes", j->id, j->base->path,
	     j->size);
	return true;
}

static void job_run(struct cjob *j)
{
	struct ctl *c = j->c;
	uint64_t now;
	int r;

	if (j->k.busy || j->posted || j->timer_armed)
		return;
	if (j->end == END_CANCEL || j->end == END_FAIL || j->end == END_STOP) {
		job_end_step(j);
		return;
	}
	if (j->user_paused && !j->end) {
		set_status(j, JS_PAUSED);
		return;
	}
	if (j->status == JS_PAUSED || j->status == JS_CREATED)
		set_status(j, j->was_ready ? JS_READY : JS_RUNNING);
	if (!job_grow(j))
		return;
	if (j->k.scanning) {
		r = img_copy_scan(&j->k);
		if (r < 0) {
			job_fail(j, r, j->k.errmsg);
			job_end_step(j);
			return;
		}
		if (r == 0) {
			if (!j->k.parked)
				job_kick(j); /* a batch done: let the loop breathe */
			return;
		}
	}
	if (!img_copy_ndirty(&j->k) && j->inter) {
		/* no READY: an intermediate commit completes by itself */
		if (!j->end) {
			j->end = END_DROP;
			j->end_t0 = util_now_ns();
		}
		job_end_step(j);
		return;
	}
	if (!img_copy_ndirty(&j->k)) {
		if (!j->was_ready) {
			set_status(j, JS_READY);
			j->was_ready = true;
			vlog(VLOG_INFO, NULL, "qmp: job %s ready (%" PRIu64 " bytes copied)", j->id,
			     j->k.copied);
			if (c->qmp)
				qmp_server_event(c->qmp, "BLOCK_JOB_READY", job_event_data(j));
		}
		if (j->end == END_PIVOT)
			job_end_step(j);
		return;
	}
	if (j->speed && !j->end) {
		/* QEMU's way: a quota per 100 ms slice; what a copy took beyond it
		 * is paid from the next slices */
		uint64_t quota = j->speed / 10 ? j->speed / 10 : 1;

		now = util_now_ns();
		if (now - j->rl_t0 >= RL_SLICE_NS) {
			uint64_t slices = (now - j->rl_t0) / RL_SLICE_NS;
			uint64_t paid = slices * quota;

			j->rl_bytes = j->rl_bytes > paid ? j->rl_bytes - paid : 0;
			j->rl_t0 += slices * RL_SLICE_NS;
		}
		if (j->rl_bytes >= quota) {
			j->timer_armed = true;
			j->timer.done = timer_done;
			j->timer.priv = j;
			io_timeout(j->top->loop, &j->timer, j->rl_t0 + RL_SLICE_NS - now);
			return;
		}
	}
	img_copy_next(&j->k, IMG_COPY_MAX);
}

/* The end of a job as QEMU 7.2 reports it (JOB_STATUS_CHANGE, then the block job event). */
static void job_events_end(struct cjob *j, bool cancelled)
{
	struct ctl *c = j->c;
	json_t *d = job_event_data(j);

	if (j->end == END_PIVOT || j->end == END_DROP)
		set_status(j, JS_WAITING);
	set_status(j, cancelled || j->end == END_FAIL ? JS_ABORTING : JS_PENDING);
	if (d && j->end == END_FAIL)
		json_object_set_new(d, "error", json_string(j->errmsg));
	if (c->qmp)
		qmp_server_event(c->qmp, cancelled ? "BLOCK_JOB_CANCELLED" : "BLOCK_JOB_COMPLETED",
				 d);
	else
		json_decref(d);
	set_status(j, JS_CONCLUDED);
	set_status(j, JS_NULL);
}

/*
 * A job that let go of @top ends: QEMU closes the nodes it dropped before it
 * sends BLOCK_JOB_COMPLETED, so a client that sees the event may take their
 * locks. The daemon closes them from main(); the events go out then
 * (layers_retired), or now if they stay open.
 */
static void job_end_retiring(struct cjob *j, struct img *top)
{
	struct ctl *c = j->c;

	if (c->retire(c->opaque, top)) {
		j->next_ended = c->layers->ended;
		c->layers->ended = j;
		return;
	}
	job_events_end(j, false);
	job_free(j);
}

void layers_retired(struct ctl *c)
{
	struct layers *L = c->layers;

	while (L && L->ended) {
		struct cjob *j = L->ended;

		L->ended = j->next_ended;
		job_events_end(j, false);
		job_free(j);
	}
}

static void end_after_flush(struct io_cmd *cmd, int unused);

/* The flush request itself still counts as in flight until its done() returned. */
static void end_flushed(struct img_io *io, int res)
{
	struct cjob *j = io->priv;

	j->flush_res = res;
	j->fpost.done = end_after_flush;
	j->fpost.priv = j;
	io_post(j->top->loop, &j->fpost);
}

static void end_after_flush(struct io_cmd *cmd, int unused)
{
	struct cjob *j = cmd->priv;
	struct ctl *c = j->c;
	int res = j->flush_res;
	char err[512] = "";
	int r;

	if (res < 0 && (j->end == END_PIVOT || j->end == END_DROP)) {
		char msg[300];

		snprintf(msg, sizeof(msg), "flushing %s: %s", j->base->path, strerror(-res));
		j->end_stage = 0;
		job_fail(j, res, msg);
		job_end_step(j);
		return;
	}
	if (j->end == END_DROP) {
		/* the base holds what top held: drop top, outside the loop */
		j->drop_held = true;
		c->hold(c->opaque);
		return;
	}
	if (j->end == END_PIVOT) {
		struct img *top = j->top, *above = top;

		while (img_backing(above) != j->base)
			above = img_backing(above);
		set_hook(c, NULL, NULL);
		img_take_backing(above);
		for (struct img *l = top; l; l = img_backing(l))
			name_drop(c->layers, l);
		set_active(c, j->base);
		c->node_name = name_of(c->layers, j->base);
		if (!c->node_name)
			c->node_name = "disk0";
		vlog(VLOG_INFO, NULL, "qmp: job %s completed: %s is the active layer again", j->id,
		     j->base->path);
		j->end_stage = 2;
		c->layers->job = NULL;
		resume_dev(c);
		job_end_retiring(j, top);
		return;
	}
	/* cancelled, failed or stopping: the base becomes a read-only backing file again */
	r = img_set_writable(j->base, false, err, sizeof(err));
	if ((r == -EAGAIN || r == -EBUSY) && flush_again(++j->flushes, j->end_t0)) {
		img_flush(j->base, &j->fio);
		return;
	}
	if (r < 0)
		vlog(VLOG_ERROR, NULL, "qmp: job %s: %s stays writable: %s", j->id, j->base->path,
		     err);
	set_hook(c, NULL, NULL);
	c->layers->job = NULL;
	if (j->end != END_STOP) {
		vlog(VLOG_INFO, NULL, "qmp: job %s %s", j->id,
		     j->end == END_FAIL ? "failed" : "cancelled");
		job_events_end(j, j->end == END_CANCEL && !j->cancel_ready);
	}
	if (j->paused_dev)
		resume_dev(c);
	job_free(j);
}

/* Ending: wait for the device to drain and the copy in flight, then flush the base. */
static void job_end_step(struct cjob *j)
{
	struct ctl *c = j->c;

	/* nothing of ours may be pending in io/ or the engine when the job is freed */
	if (j->end_stage || j->k.busy || j->posted || j->k.parked)
		return;
	if (j->timer_armed) {
		if (!j->timer_cancelled) {
			j->timer_cancelled = true;
			io_cancel(j->top->loop, &j->timer); /* timer_done() comes back here */
		}
		return;
	}
	if (j->end != END_DROP && blk_dev_inflight(c->blk)) {
		if (util_now_ns() - j->end_t0 > DRAIN_NS && j->end == END_PIVOT) {
			j->end = END_NONE;
			dev_resume(c);
			j->paused_dev = false;
			vlog(VLOG_WARN, NULL,
			     "qmp: job %s: requests did not drain in 30 s; not completed", j->id);
		}
		return; /* layers_tick calls again */
	}
	if (j->end == END_PIVOT && (img_copy_ndirty(&j->k) || j->k.scanning)) {
		job_run(j);
		return;
	}
	j->end_stage = 1;
	j->fio.done = end_flushed;
	j->fio.priv = j;
	img_flush(j->base, &j->fio);
}

static struct cjob *find_job(struct ctl *c, json_t *args, char *err, size_t errlen)
{
	struct layers *L = get(c);
	const char *id = sarg(args, "device");

	if (L && L->job && !L->job->reopen && id && strcmp(L->job->id, id) == 0)
		return L->job;
	snprintf(err, errlen, "Block job '%s' not found", id ? id : "");
	return NULL;
}

static int verb_error(struct cjob *j, const char *verb, char *err, size_t errlen)
{
	snprintf(err, errlen, "Job '%s' in state '%s' cannot accept command verb '%s'", j->id,
		 jstat_name[j->status], verb);
	return -EBUSY;
}

/* The base is writable: the job is created and starts. */
static void job_start(struct cjob *j)
{
	struct ctl *c = j->c;

	j->rl_t0 = util_now_ns();
	if (!j->inter) { /* guest writes do not reach the layers below the active one */
		c->layers->hook_loop = j->top->loop;
		set_hook(c, write_hook, j);
	}
	set_status(j, JS_CREATED);
	set_status(j, JS_RUNNING);
	vlog(VLOG_INFO, NULL, "qmp: job %s: committing %s into %s", j->id, j->top->path,
	     j->base->path);
	job_kick(j);
}

int layers_commit(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct layers *L = get(c);
	const char *dev = sarg(args, "device"), *id = sarg(args, "job-id");
	const char *topn = sarg(args, "top-node"), *basen = sarg(args, "base-node");
	const char *topf = sarg(args, "top"), *basef = sarg(args, "base");
	const char *onerr = sarg(args, "on-error");
	json_t *speed = json_object_get(args, "speed");
	json_t *af = json_object_get(args, "auto-finalize"),
	       *ad = json_object_get(args, "auto-dismiss");
	const char *bfile = sarg(args, "backing-file");
	struct img *top, *base = NULL, *above = NULL;
	struct cjob *j;
	int r;

	if (!L)
		return -ENOMEM;
	top = dev ? find_name(c, L, dev) : NULL;
	if (top && top != c->img) {
		snprintf(err, errlen, "Need a root block node");
		return -EINVAL;
	}
	if (!top) {
		snprintf(err, errlen, "Cannot find device='%s' nor node-name='%s'", dev ? dev : "",
			 dev ? dev : "");
		return -ENOENT;
	}
	if (c->ops) { /* an internal snapshot waits for the device to drain */
		snprintf(err, errlen, "Node '%s' is busy: an internal snapshot is being taken",
			 dev);
		return -EBUSY;
	}
	if (topn && topf) {
		snprintf(err, errlen, "'top-node' and 'top' are mutually exclusive");
		return -EINVAL;
	}
	if (topn || topf) {
		/* top below the active layer: an intermediate commit */
		struct img *t = NULL;

		for (struct img *l = c->img; l; above = l, l = img_backing(l)) {
			const char *n = name_of(L, l);

			if (topn ? (n && strcmp(n, topn) == 0) : strcmp(l->path, topf) == 0) {
				t = l;
				break;
			}
		}
		if (!t && topn) {
			snprintf(err, errlen, "'%s' is not in this backing file chain", topn);
			return -ENOENT;
		}
		if (!t) {
			snprintf(err, errlen, "Top image file %s not found", topf);
			return -ENOENT;
		}
		top = t;
		if (top == c->img)
			above = NULL;
	}
	if (basen && basef) {
		snprintf(err, errlen,
			 "'base' and 'base-node' cannot be specified at the same time");
		return -EINVAL;
	}
	for (struct img *l = img_backing(top); l; l = img_backing(l)) {
		const char *n = name_of(L, l);

		if (basen   ? (n && strcmp(n, basen) == 0)
		    : basef ? strcmp(l->path, basef) == 0
			    : !img_backing(l)) {
			base = l;
			break;
		}
	}
	if (!img_backing(top)) {
		snprintf(err, errlen, "Top image file %s has no backing file", top->path);
		return -EINVAL;
	}
	if (!base) {
		if (basen)
			snprintf(err, errlen, "Cannot find device='' nor node-name='%s'", basen);
		else
			snprintf(err, errlen, "Can't find '%s' in the backing chain", basef);
		return -ENOENT;
	}
	if (bfile && !above) {
		snprintf(err, errlen,
			 "backing-file cannot be used with an active layer commit (nothing above "
			 "the base remains)");
		return -EINVAL;
	}
	if (onerr && strcmp(onerr, "report") != 0) {
		snprintf(err, errlen, "on-error '%s' is not supported (only 'report')", onerr);
		return -ENOTSUP;
	}
	if ((af && !json_is_true(af)) || (ad && !json_is_true(ad))) {
		snprintf(err, errlen, "auto-finalize and auto-dismiss must be true");
		return -ENOTSUP;
	}
	if (speed && json_integer_value(speed) < 0) {
		snprintf(err, errlen, "Parameter 'speed' expects a non-negative value");
		return -EINVAL;
	}
	if (!id)
		id = name_of(L, c->img);
	if (L->job || L->snap) {
		snprintf(err, errlen, "Node '%s' is busy: block device is in use by block job: %s",
			 name_of(L, c->img), L->job ? "commit" : "snapshot");
		return -EBUSY;
	}
	j = calloc(1, sizeof(*j));
	if (!j)
		return -ENOMEM;
	j->c = c;
	j->top = top;
	j->base = base;
	j->size = top->size;
	j->id = strdup(id);
	if (img_copy_init(&j->k, top, base, j->size) < 0 || !j->id) {
		job_free(j);
		return -ENOMEM;
	}
	j->k.wake = copy_wake;
	j->k.priv = j;
	if (above) {
		j->inter = true;
		j->above = above;
		/* as QEMU: the base's file name unless backing-file says otherwise;
		 * made absolute (the header must not depend on our cwd) */
		if (bfile)
			j->backing_name = strdup(bfile);
		else if (base->path[0] != '/' && c->cwd &&
			 asprintf(&j->backing_name, "%s/%s", c->cwd, base->path) < 0)
			j->backing_name = NULL;
		else if (base->path[0] == '/' || !c->cwd)
			j->backing_name = strdup(base->path);
		if (!j->backing_name) {
			job_free(j);
			return -ENOMEM;
		}
	}
	j->speed = speed ? (uint64_t)json_integer_value(speed) : 0;
	j->status = JS_NULL;
	r = img_set_writable(base, true, err, errlen);
	if (r == 0 && base->size < j->size && img_grow_blocks(base)) {
		/* its grow loads disabled bitmaps with synchronous I/O: not on
		 * the job's loop but from layers_held(), as block_resize does */
		j->held_grow = true;
		r = -EROFS;
	}
	if (r == -EROFS) {
		/* Opened read-only (a backing file at start-up): QEMU reopens the
		 * base read-write for the job. That reopens its engine, which
		 * drives the loop: with the device held, from layers_held(). */
		err[0] = '\0';
		j->reopen = qmp_server_defer(c->qmp);
		if (!j->reopen) {
			job_free(j);
			return -ENOMEM;
		}
		L->job = j;
		vlog(VLOG_INFO, NULL, "qmp: job %s: %s %s: holding requests back", j->id,
		     j->held_grow ? "growing" : "reopening read-write", base->path);
		c->hold(c->opaque);
		return QMP_PENDING;
	}
	if (r < 0) {
		job_free(j);
		return r;
	}
	L->job = j;
	job_start(j);
	return 0;
}

/*
 * The end of an intermediate commit, with the device held and no request in
 * flight: the layer above top records the base as its backing file (header
 * rewritten and made durable first: a crash before leaves the old chain,
 * which reads the same, after it the new one), then top (and the layers
 * between it and the base) leave the chain and are closed.
 */
static void drop_top(struct cjob *j)
{
	struct ctl *c = j->c;
	struct img *above = j->above, *top = j->top, *below = top;
	bool above_ro = !img_may_write(above);
	char err[512] = "", e2[512] = "";
	int r = 0;

	j->drop_held = false;
	while (img_backing(below) != j->base)
		below = img_backing(below);
	/* the base is a backing file again first: a layer's locks reach its
	 * backing image (READ), which must then not be the writer it is now */
	r = img_set_writable(j->base, false, err, sizeof(err));
	if (r == -ENOTSUP) {
		/* persistent bitmaps held in memory (the enabled ones, every one
		 * after a grow): stored for the base's size first, as QEMU stores
		 * them at its read-only reopen (copy-on-write: a crash leaves
		 * them in use or stored, at worst leaked clusters); we are held */
		err[0] = '\0';
		r = img_bitmap_edit(j->base, 'S', NULL, 0, false, err, sizeof(err));
		if (r == 0)
			r = img_set_writable(j->base, false, err, sizeof(err));
	}
	if ((r == -EAGAIN || r == -EBUSY) && flush_again(++j->flushes, j->end_t0)) {
		/* metadata left to write back: flush again, then come back here */
		j->end_stage = 0;
		job_end_step(j);
		return;
	}
	if (r == 0 && above_ro)
		r = img_reopen_rw(above, err, sizeof(err));
	if (r == 0)
		r = img_change_backing(above, j->base, j->backing_name, j->base->ops->format, err,
				       sizeof(err));
	if (above_ro && img_set_writable(above, false, e2, sizeof(e2)) < 0)
		vlog(VLOG_ERROR, NULL, "qmp: job %s: %s stays writable: %s", j->id, above->path,
		     e2);
	if (r < 0) {
		char msg[600];

		snprintf(msg, sizeof(msg), "changing the backing file of %s: %s", above->path,
			 err[0] ? err : strerror(-r));
		job_fail(j, r, msg);
		/* the base becomes read-only again from end_after_flush */
		j->end_stage = 1;
		j->fio.done = end_flushed;
		j->fio.priv = j;
		img_flush(j->base, &j->fio);
		return;
	}
	img_take_backing(below);
	for (struct img *l = top; l; l = img_backing(l))
		name_drop(c->layers, l);
	vlog(VLOG_INFO, NULL, "qmp: job %s completed: %s is the backing file of %s", j->id,
	     j->base->path, above->path);
	j->end_stage = 2;
	c->layers->job = NULL;
	job_end_retiring(j, top);
}

void layers_held(struct ctl *c)
{
	struct layers *L = c->layers;
	struct cjob *j = L ? L->job : NULL;
	struct qmp_pending *p;
	char err[512] = "";
	int r;

	if (L && L->snap && L->snap->store_held) {
		struct snap *s = L->snap;

		/* (store_held stays set while the store drives the loop: snap_tick waits) */
		r = img_bitmap_edit(s->old, 'S', NULL, 0, false, err, sizeof(err));
		s->store_held = false;
		s->stored = true;
		if (r < 0)
			snap_end(c, r, err[0] ? err : strerror(-r));
		else { /* nothing in flight, written back: on with the snapshot */
			s->flush_res = 0;
			s->post.priv = s;
			snap_after_flush(&s->post, 0);
		}
		return;
	}
	if (j && j->drop_held) {
		drop_top(j);
		return;
	}
	if (!j || !j->reopen)
		return;
	p = j->reopen;
	j->reopen = NULL;
	r = j->held_grow ? 0 : img_reopen_rw(j->base, err, sizeof(err));
	if (r < 0) {
		vlog(VLOG_WARN, NULL, "qmp: job %s: %s", j->id, err[0] ? err : strerror(-r));
		L->job = NULL;
		job_free(j);
		qmp_pending_error(p, "%s", err[0] ? err : strerror(-r));
		return;
	}
	if (j->base->size < j->size && img_grow_blocks(j->base)) {
		/* the grow's first step blocks (disabled bitmaps loaded): here,
		 * outside the loop; job_run waits for grow_done (k.busy) */
		j->grown = true;
		j->grow.done = grow_done;
		j->grow.priv = j;
		j->k.busy = true;
		job_start(j);
		r = img_grow(j->base, j->size, &j->grow);
		if (r < 1)
			grow_done(&j->grow, r);
	} else
		job_start(j);
	qmp_pending_return(p, NULL);
}

bool layers_waiting(struct ctl *c)
{
	struct layers *L = c->layers;

	return L && (L->snap || (L->job && L->job->end && !L->job->end_stage));
}

const char *layers_busy(struct ctl *c)
{
	struct layers *L = c->layers;

	if (L && L->job)
		return "block device is in use by block job: commit";
	if (L && L->snap)
		return "an external snapshot is being taken";
	return NULL;
}

int layers_query_jobs(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct layers *L = get(c);
	struct cjob *j = L ? L->job : NULL;
	json_t *a = json_array(), *o;

	if (!a)
		return -ENOMEM;
	if (j && !j->reopen) {
		o = job_event_data(j);
		if (o) {
			json_object_set_new(o, "busy", json_boolean(j->k.busy));
			json_object_set_new(o, "paused", json_boolean(j->status == JS_PAUSED));
			json_object_set_new(o, "io-status", json_string("ok"));
			json_object_set_new(o, "ready", json_boolean(j->was_ready));
			json_object_set_new(o, "status", json_string(jstat_name[j->status]));
			json_object_set_new(o, "auto-finalize", json_true());
			json_object_set_new(o, "auto-dismiss", json_true());
			json_array_append_new(a, o);
		}
	}
	*ret = a;
	return 0;
}

int layers_job_complete(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct cjob *j = find_job(c, args, err, errlen);

	if (!j)
		return -ENOENT;
	if (j->end || !j->was_ready || j->user_paused)
		return verb_error(j, "complete", err, errlen);
	j->end = END_PIVOT;
	j->end_t0 = util_now_ns();
	dev_pause(c);
	j->paused_dev = true;
	vlog(VLOG_INFO, NULL, "qmp: job %s: completing (pivot to %s)", j->id, j->base->path);
	job_end_step(j);
	return 0;
}

int layers_job_cancel(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct cjob *j = find_job(c, args, err, errlen);
	json_t *force = json_object_get(args, "force");

	if (!j)
		return -ENOENT;
	if (j->end)
		return 0; /* already ending (QEMU ignores a second cancel) */
	/* QEMU's mirror: cancelling a job in sync without force ends it as completed,
	 * the target holding a point-in-time copy (here: the base, not pivoted). */
	j->cancel_ready = j->was_ready && !(force && json_is_true(force));
	j->end = END_CANCEL;
	j->end_t0 = util_now_ns();
	dev_pause(c);
	j->paused_dev = true;
	job_end_step(j);
	return 0;
}

int layers_job_set_speed(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct cjob *j = find_job(c, args, err, errlen);
	json_int_t sp = json_integer_value(json_object_get(args, "speed"));

	if (!j)
		return -ENOENT;
	if (sp < 0) {
		snprintf(err, errlen, "Parameter 'speed' expects a non-negative value");
		return -EINVAL;
	}
	j->speed = (uint64_t)sp;
	j->rl_t0 = util_now_ns();
	j->rl_bytes = 0;
	return 0;
}

int layers_job_pause(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct cjob *j = find_job(c, args, err, errlen);

	if (!j)
		return -ENOENT;
	if (j->user_paused) {
		snprintf(err, errlen, "Job is already paused");
		return -EBUSY;
	}
	if (j->end)
		return verb_error(j, "pause", err, errlen);
	j->user_paused = true;
	set_status(j, JS_PAUSED); /* the copy in flight ends, no other starts */
	return 0;
}

int layers_job_resume(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	struct ctl *c = opaque;
	struct cjob *j = find_job(c, args, err, errlen);

	if (!j)
		return -ENOENT;
	if (!j->user_paused) {
		snprintf(err, errlen, "Can't resume a job that was not paused");
		return -EINVAL;
	}
	j->user_paused = false;
	set_status(j, j->was_ready ? JS_READY : JS_RUNNING);
	job_kick(j);
	return 0;
}

void layers_tick(struct ctl *c)
{
	struct layers *L = c->layers;

	if (!L)
		return;
	if (L->snap)
		snap_tick(c, L->snap);
	if (L->job && L->job->end && !L->job->end_stage)
		job_end_step(L->job);
}

bool layers_stop(struct ctl *c)
{
	struct layers *L = c->layers;
	struct cjob *j;

	if (!L)
		return false;
	if (L->snap && L->snap->store_held) {
		/* the bitmaps' store waits for a hold that is never granted
		 * while stopping (d_defer): the snapshot fails, the layer stays
		 * the active one (still writable: img_set_writable refused) and
		 * the requests held meanwhile start again */
		L->snap->store_held = false;
		snap_end(c, -ECANCELED, "the daemon is stopping");
	}
	j = L->job;
	if (j && j->reopen) {
		/* not started yet: the base was not reopened */
		qmp_pending_error(j->reopen, "the daemon is stopping");
		L->job = NULL;
		job_free(j);
		j = NULL;
	}
	if (j && j->drop_held) {
		/* stopping before top was dropped: the chain stays as it was */
		j->drop_held = false;
		j->end = END_STOP;
		j->end_stage = 1;
		j->fio.done = end_flushed;
		j->fio.priv = j;
		img_flush(j->base, &j->fio);
	}
	if (j && !j->end) {
		j->end = END_STOP;
		j->end_t0 = util_now_ns();
		set_hook(c, NULL, NULL);
	}
	return L->snap || L->job;
}

void layers_exit(struct ctl *c)
{
	struct layers *L = c->layers;

	if (!L)
		return;
	for (unsigned i = 0; i < L->nnames; i++)
		free(L->names[i].name);
	if (L->job && L->job->reopen)
		qmp_pending_error(L->job->reopen, "the daemon is stopping");
	if (L->job)
		job_free(L->job);
	while (L->ended) {
		struct cjob *j = L->ended;

		L->ended = j->next_ended;
		job_free(j);
	}
	free(L);
	c->layers = NULL;
}
