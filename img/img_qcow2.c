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
 * Inflated clusters: a read of a compressed cluster inflates all of it, so
 * the last few inflated clusters are kept (struct zc_ent, LRU, at most
 * ZC_BUDGET bytes and ZC_MAX clusters, at least 2) and a sequential read in
 * 4K steps inflates each cluster once. An entry is keyed by the compressed
 * data's host range (offset and length): those bytes never change while an L2
 * entry points at them (a write to a compressed cluster allocates a new one
 * and the old one is freed only once no read is in flight on it), and every
 * data write or zeroing that touches a cached range drops the entry anyway, so
 * space freed and reused can never be served from the cache; all are dropped
 * when the engine is opened again after a handoff. The check is
 * made when a read is mapped (a hit needs no I/O); a read of a cluster whose
 * compressed bytes are already on their way waits for them (a filling entry,
 * see comp_issue()) instead of reading them again.
 * The queues' threads keep their own (struct fzc_ent: the fast path's
 * compressed reads), keyed also by the fast ticket's generation.
 *
 * One pooled context (struct q2req) per request in flight, kept on a free
 * list: no malloc per I/O once warm. A request is a state machine (enum
 * rq_state, the table above step()): map a prefix of what is left, issue the
 * I/O for it, continue when that I/O is done. A step that has to wait for
 * metadata parks the context's waiter and re-runs from the map when woken
 * (mapping steps are idempotent).
 *
 * Writes: INPLACE extents are written where they are. ALLOC (a token from
 * qcow2_map_write) runs: read the COW head/tail's old content (through the
 * same read steps as a guest read, which still see the old mapping) unless
 * it is known to be zero (or lies past the disk's end) -> one write of head
 * + data + tail, where a head or tail that must read as zero is written from
 * a zero buffer, and a new host cluster is written whole (fresh space too;
 * with extended L2 also its subclusters outside the token: see alloc_write)
 * -> qcow2_alloc_finish(). So every data cluster is written blocks in the
 * file system, never unwritten (fallocated) extents that each later 4K write
 * would convert. Clusters over PAD_MAX keep the old way: nothing written
 * where fresh space reads zero, a ZERO_RANGE first where it is not. Zero
 * data (write-zeroes and discard go through qcow2_zero_step(); parts it
 * cannot do in metadata become writes without a data buffer) zeroes the host
 * range if it is not fresh (fallocate ZERO_RANGE; written zero buffers only
 * if the file system supports neither ZERO_RANGE nor PUNCH_HOLE), then
 * writes a COW head/tail that holds old content.
 *
 * Files: metadata I/O goes through the engine's handle of the image (reads
 * past EOF fail: a truncated table is an error); data I/O through a second
 * handle that reads zeroes past EOF (fresh clusters may lie beyond the end of
 * the file until written), or through the external data file. Backing images
 * are opened read-only through img_open() (raw or qcow2, relative names
 * against the image's directory, up to QCOW2_MAX_CHAIN_DEPTH levels: a loop is refused).
 *
 * Completion: every request ends in exactly one io->done(), from complete(),
 * always from the loop: a request starts from an io_post(), and a run of
 * steps that need no I/O is posted again after MAX_TURNS steps, so long
 * metadata-only ranges let other requests run and never recurse.
 *
 * Threads (img.mt_submit): a request submitted on another loop's thread
 * (vqcowd's I/O threads) is served there when the fast table knows its
 * clusters (fast_try: no lock, no hop; see struct fslot for the table, the
 * tickets and why a freed cluster is never reused under such a request),
 * otherwise handed to this image's loop, the engine's one owner (hop_in),
 * run as above, and its done() posted back (hop_back).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>

#include "img.h"
#include "qcow2.h"
#include "vlog.h"

#define Q2_MAX_EXT    16
#define ZERO_BUF_SIZE (64u * 1024)
#define PAD_MAX       (256u * 1024) /* clusters up to this size are written whole (pad) */
#define MAX_TURNS     64            /* steps without I/O before a request lets others run */
#define ZC_MAX        16            /* inflated clusters kept, at most */
#define ZC_BUDGET     (1u << 20)    /* bytes of inflated clusters kept (at least 2 clusters) */

/* What a request waits for: the transition table is above step(). */
enum rq_state {
	RQ_IDLE = 0, /* on the free list */
	RQ_START,
	RQ_READ_MAP,
	RQ_READ_IO,
	RQ_WRITE_MAP,
	RQ_INPLACE,
	RQ_COW_MAP,
	RQ_COW_IO,
	RQ_ZEROING,
	RQ_WRITING,
	RQ_ZERO_MAP,
	RQ_PUNCH,
	RQ_FLUSH,
};

struct q2img;
struct q2req;
struct zc_ent;

/* One I/O part of a read: a data, backing or compressed extent in flight. */
struct q2sub {
	struct q2req *r;
	struct io_cmd cmd;
	struct img_io bio; /* backing read */
	struct iovec *iov;
	unsigned iov_cap;
	unsigned iovcnt;
	void *cbuf;             /* compressed bytes (a compressed extent), else NULL */
	uint32_t cskip, cavail; /* where they start in cbuf (comp_span), how many arrived */
	void *ibuf;             /* inflated on the requester's thread (remote inflate), else NULL */
	int ires;               /* its result */
	uint8_t ctype;          /* compression type, for the requester's thread */
	uint64_t chost;
	uint32_t clen, coff;
	uint64_t len;
	uint64_t skip;       /* offset of this extent in the read's iovec */
	struct zc_ent *ze;   /* compressed: the entry its bytes fill (it leads), else NULL */
	struct q2sub *znext; /* a waiter: the next one of the entry it joined */
};

/* A range of old content to read for copy-on-write, into the bounce buffer. */
struct cow_range {
	uint64_t off;
	struct iovec iov;
};

struct q2req {
	struct q2img *m;
	struct img_io *io;
	struct q2req *next_free;
	uint8_t state; /* enum rq_state */
	struct qcow2_waiter w;
	struct qcow2_flush flush;
	struct io_cmd cmd;  /* post, writes, fallocate */
	struct io_cmd cmd2; /* second write (head and tail of zero data) */
	unsigned pending;   /* I/O parts in flight */
	int err;            /* their first error */
	unsigned turns;     /* steps since the last I/O */
	uint64_t link_gen;  /* qcow2_meta_gen() after this request's last L2 change */

	/* the one L2 slice those changes are in (0: several, unknown) */
	uint64_t link_slice;

	/* read: [rd_off, rd_off + rd_len) into rd_iov (the guest's, or a COW range) */
	uint64_t rd_off, rd_len, rd_done;
	struct iovec *rd_iov;
	unsigned rd_iovcnt;
	unsigned rd_ticket;
	struct qcow2_extent ext[Q2_MAX_EXT];
	struct q2sub sub[Q2_MAX_EXT];

	/* write: [wr_off, wr_off + wr_len) from wr_iov (NULL: zero data) */
	uint64_t wr_off, wr_len, wr_done;
	struct iovec *wr_iov;
	unsigned wr_iovcnt;
	unsigned wr_ticket;
	struct qcow2_alloc a;    /* the mapped prefix being written */
	void *bounce;            /* COW head at 0, tail at cluster size (or both at once) */
	uint8_t *tail_buf;       /* where the COW tail is in bounce */
	struct cow_range cow[2]; /* COW ranges to read into bounce */
	unsigned cow_n, cow_i;
	struct iovec *wiov;
	unsigned wiov_cap;
	uint64_t zr_off, zr_len; /* zeroing in progress */
	uint8_t zr_mode;         /* 0 ZERO_RANGE, 1 PUNCH_HOLE, 2 zero writes */

	/* write zeroes / discard */
	uint64_t z_done, z_len;

	/* --io-threads: submitted on another thread (its done() runs there) */
	bool remote;
	struct q2req *mut_next, **mut_pprev; /* on m->muts: a write-type request in flight */
	bool mut;
	uint64_t pub_off, pub_len, pub_host; /* new clusters it wrote, published at its end */
};

/*
 * The fast path (requests submitted on other threads, img.mt_submit).
 *
 * The owner (the image's loop, which runs the engine) publishes what it
 * learnt from mapping in a table indexed by guest cluster (m->ft: pages of
 * 512 entries, allocated by the owner on first use, kept until close; at
 * most ft_maxpages, the L2 cache's budget, or an eighth of it when the
 * disk's tables do not fit the cache: ft_budget; its reach, ft_n, follows
 * an online grow: ft_grow): a normal data cluster (FE_DATA,
 * FE_RW if it is written in place: COPIED, or an external data file) or a
 * compressed one (FE_COMP: offset and length of its compressed bytes) or
 * one that reads as zeroes (FE_ZERO: a zero cluster, or an unallocated one
 * without a backing file; reads only, filled on the thread). A
 * thread reads an entry with one atomic load and, on a hit, does the read,
 * the inflate or the in-place write itself. Anything else goes to the owner
 * (hop_in) and comes back (hop_back).
 *
 * An entry is only ever true or absent: the owner clears the range of every
 * write-type request (write, write-zeroes, discard: the only operations
 * that change mappings while the engine is open) when it starts, before
 * the engine changes an L2 entry, and publishes nothing inside the range of
 * another such request in flight (m->muts); everything is cleared before
 * the engine closes (snapshots, bitmaps, handoff, close). A cluster freed
 * by such a change is reused only after a grace period (qcow2/alloc.c),
 * which also waits for the fast tickets (struct fslot.active): a thread
 * takes its ticket before it loads an entry (fast_ticket: generation,
 * increment, generation again, all sequentially consistent), the owner
 * clears entries before it starts the grace period (fast_flip: new
 * generation, then the counters), so either the thread sees the entry
 * cleared or the owner sees its ticket. The thread that ends the last
 * ticket of the old generation wakes the owner (fast_wake).
 */
#define FT_BITS         9 /* entries per page */
#define FT_MAX_CLUSTERS (1ull << 27)
#define FT_MISS_SHARE   8  /* the L2 cache's budget / this, when the disk's tables do not fit it */
#define FSLOTS          64 /* threads with a fast path, per image */
#define FBUFS           64 /* cluster buffers kept per thread, at most ... */
#define FBUF_BUDGET     (8u << 20) /* ... and at most this many bytes (at least 4) */
#define FE_DATA         (1ull << 63)
#define FE_RW           (1ull << 62)
#define FE_COMP         (1ull << 61)
#define FE_ZERO         (1ull << 60) /* alone: the cluster reads as zeroes */
#define FE_HOST_MASK    ((1ull << 56) - 1)
#define FE_CHOST_BITS   41
#define FE_CLEN_MAX     (1ull << 20)

enum { FM_READ = 1, FM_WRITE = 2 };

struct fslot;

struct fzc_ent;

/* A request served on its submitter's thread. */
struct q2fast {
	struct io_cmd cmd;
	struct fslot *s;
	struct img_io *io;
	struct q2fast *next; /* free list; or the waiters of a cluster being inflated */
	void *cbuf, *ibuf;   /* compressed: its bytes, inflated */
	struct fzc_ent *ze;  /* compressed: the cache entry it fills */
	uint32_t coff;
	uint32_t cskip, clen; /* compressed: where its bytes start in cbuf, how many */
	unsigned ticket;
	uint64_t host;                              /* a delayed write (test seam) */
	void (*zdone)(struct io_cmd *cmd, int res); /* a read failed on purpose (test seam) */
};

/*
 * A thread's inflated clusters (struct fslot.zc, LRU, as many as the owner
 * keeps): a sequential read of a compressed image served on the threads
 * inflates each cluster once per thread, not 16 times, and the reads of a
 * cluster whose bytes are already on their way wait for them (waiters)
 * instead of reading them again. The thread's own, no lock.
 *
 * Why an entry never serves a freed and reused host range: it is keyed by
 * the compressed bytes' host range (offset, length) and by the generation of
 * the fast ticket it was read under (fgen) and the engine's epoch (fepoch,
 * bumped when the engine opens: a handoff, a snapshot), and only an exact
 * match serves. Those bytes never change while an L2 entry points at them
 * (a write to the cluster allocates a new one). For them to be reused, the
 * owner clears the table entry that names them, then (fast_flip) moves to a
 * new generation, and waits for the old one's tickets before the cluster
 * is freed: the thread that read them held a ticket of generation g and
 * loaded the entry after taking it, so the flip that guards their reuse
 * comes after, and from then on the thread's tickets are of another
 * generation, which no entry of g matches. A flip (any write that frees
 * clusters) thus empties the caches of every thread, which is cheap:
 * read-mostly images rarely flip. (A corrupt image whose data cluster
 * overlaps compressed bytes may be served the bytes from before a write to
 * that overlap; the owner's cache, zc_drop, is no better with a thread.)
 */
enum { FZ_EMPTY = 0, FZ_FILLING, FZ_VALID };

struct fzc_ent {
	uint64_t host;
	uint32_t clen;
	uint8_t state;
	unsigned gen, epoch;
	uint64_t last;          /* LRU tick */
	void *buf;              /* one cluster, allocated on first use */
	struct q2fast *waiters; /* FZ_FILLING: served when it is inflated */
};

/* One submitting thread (claimed by its loop on its first request). */
struct fslot {
	struct io_loop *loop; /* atomic: set once by its thread */
	struct q2img *m;
	unsigned active[2];      /* atomic: fast requests in flight, by generation */
	unsigned inflight;       /* atomic: submitted here, not done (fast or hopped) */
	uint64_t n_fast, n_hops; /* atomic (relaxed): statistics */
	bool wake_posted;        /* atomic: wake_cmd on its way to the owner */
	struct io_cmd wake_cmd;
	uint64_t n_inflated, n_zc_hits;  /* atomic (relaxed): compressed clusters, reads of them */
	uint64_t n_zc_reads, n_zc_joins; /* atomic (relaxed): of compressed bytes, joined one */
	/* this thread's only */
	struct q2fast *free;
	void *bufs[FBUFS];
	unsigned nbufs;
	unsigned nwrites;   /* fast writes (test seam) */
	struct fzc_ent *zc; /* inflated clusters (zc_n), allocated on first use */
	uint64_t zc_tick;
} __attribute__((aligned(64)));

/* Test seam (img_test_fast_delay): hold every 4th fast write this long. */
static unsigned test_delay_ms;

void img_test_fast_delay(unsigned ms)
{
	__atomic_store_n(&test_delay_ms, ms, __ATOMIC_RELAXED);
}

/* Test seam (img_test_ticket_hold): hold fast tickets this long as they are taken. */
static unsigned test_ticket_hold_us;

void img_test_ticket_hold(unsigned us)
{
	__atomic_store_n(&test_ticket_hold_us, us, __ATOMIC_RELAXED);
}

/* Test seam (img_test_zread_fail): fail every n-th read of compressed bytes. */
static unsigned test_zfail_n;
static uint64_t test_zfail_seen, test_zfail_done;

void img_test_zread_fail(unsigned n)
{
	__atomic_store_n(&test_zfail_n, n, __ATOMIC_RELAXED);
}

uint64_t img_test_zread_failed(void)
{
	return __atomic_load_n(&test_zfail_done, __ATOMIC_RELAXED);
}

/* Any thread: is this read of compressed bytes one to fail (img_test_zread_fail)? */
static bool zread_fails(void)
{
	unsigned n = __atomic_load_n(&test_zfail_n, __ATOMIC_RELAXED);

	if (!n || __atomic_add_fetch(&test_zfail_seen, 1, __ATOMIC_RELAXED) % n)
		return false;
	__atomic_add_fetch(&test_zfail_done, 1, __ATOMIC_RELAXED);
	return true;
}

void img_test_link_delay(unsigned ms)
{
	qcow2_test_link_delay(ms);
}

void img_test_sc_link(bool on)
{
	qcow2_test_sc_link(on);
}

void img_early_new(bool on)
{
	qcow2_early_new(on);
}

void img_test_wb_hold(unsigned ms)
{
	qcow2_test_wb_hold(ms);
}

void img_test_sync_delay(unsigned ms)
{
	qcow2_test_sync_delay(ms);
}

void img_wb_tune(uint32_t bridge, bool whole_slices, uint32_t xtab)
{
	qcow2_wb_tune(bridge, whole_slices, xtab);
}

/*
 * One inflated cluster: the compressed bytes at [host, host + clen) inflate
 * to buf (ZC_VALID), or are on their way there (ZC_FILLING: the read that
 * claimed the entry leads, sub->ze; later reads of the same bytes wait on
 * its waiters, served when it is inflated). A filling entry is never a
 * victim; zc_drop() on it only marks it dropped: no more waiters, not kept
 * afterwards, but those already waiting are served (the comment above
 * comp_issue()).
 */
enum { ZC_EMPTY = 0, ZC_FILLING, ZC_VALID };

struct zc_ent {
	uint64_t host;
	uint64_t last; /* LRU tick */
	uint32_t clen;
	uint8_t state;                  /* ZC_* */
	bool dropped;                   /* ZC_FILLING: written over meanwhile */
	void *buf;                      /* one cluster, allocated on first use */
	struct q2sub *waiters, **wtail; /* ZC_FILLING: reads served when it is inflated */
};

struct q2img {
	struct img img;
	struct io_file file;
	struct io_file dfile;
	bool has_dfile;   /* external data file (in dfile) */
	char *dfile_name; /* its path (messages) */
	bool own_dfile;   /* dfile is open: the external data file, or the image again for data */
	bool data_raw;
	struct qcow2 *q;      /* NULL while inactive (no write lock: nothing cached) */
	struct qcow2_opts qo; /* engine options, for re-opening it on activation */
	/* zero-ahead's description of a block device (qcow2_opts.zah_keep):
	 * opened here, before --user drops the privileges, kept across engines */
	struct qcow2_zah_keep zah_keep;
	struct img *backing;
	struct q2req *free_reqs;
	unsigned nreqs;
	unsigned inflight;
	void **bounce_free; /* 2 * cluster-sized aligned buffers */
	unsigned nbounce, bounce_cap;
	struct zc_ent zc[ZC_MAX]; /* inflated clusters */
	uint64_t zc_tick;
	uint64_t n_inflated, n_zc_hits;  /* clusters inflated, reads served by zc (hits, joins) */
	uint64_t n_zc_reads, n_zc_joins; /* reads of compressed bytes, reads that joined one */
	struct img_snapshot *snaps;      /* the snapshot table, as of the last (re)open */
	unsigned nsnaps;
	void *zero_buf; /* zero writes: max(cs, ZERO_BUF_SIZE) bytes (zero_buf_get) */
	bool no_zero_range, no_punch;
	bool pad; /* allocating writes carry their zeroes, new clusters whole (alloc_write) */
	struct qcow2_waiter st_w; /* img_block_status's parked caller */
	struct img_wait *st_user;
	struct q2req *muts; /* write-type requests in flight (owner) */

	/*
	 * The fast path (see struct fslot). What the threads read on every
	 * request lies between two cache lines of padding, so that no line
	 * the owner writes on every request of its own (zc, its tick and
	 * counters, inflight, muts above) holds any of it, whatever the
	 * allocation's alignment: with zc_n beside zc_tick, every read the
	 * owner served from its cache took the line from a thread that was
	 * looking up its own.
	 */
	char fast_pad0[64];
	uint64_t cs;
	unsigned cb;        /* cluster bits */
	unsigned zc_n;      /* entries used (zc, fslot.zc): ZC_BUDGET / cluster size, 2..ZC_MAX */
	uint64_t **ft;      /* atomic: pages of atomic entries (owner allocates) */
	uint64_t ft_n;      /* atomic: guest clusters covered (grows with the disk: ft_grow) */
	uint64_t ft_len;    /* page pointers in m->ft */
	uint64_t ***ft_old; /* m->ft arrays replaced by a grow, kept until close */
	unsigned ft_nold;
	uint64_t slice_cl; /* guest clusters per L2 slice (publish_slice) */
	size_t ft_npages, ft_maxpages;
	uint64_t ft_entries;      /* entries set (owner; query-blockstats' fast-table-entries) */
	unsigned fmode;           /* atomic: FM_READ, FM_WRITE */
	unsigned fgen;            /* atomic: generation of the fast tickets */
	unsigned fepoch;          /* atomic: engine (re)opened: the threads' zc is stale */
	bool ext_wait;            /* atomic: the engine's grace period waits for them */
	uint8_t ctype;            /* atomic: compression type, for the threads */
	bool extl2;               /* extended L2 entries: no fast path */
	unsigned remote_inflight; /* atomic: submitted on threads without a slot, not done */
	unsigned nclaimed;        /* atomic: slots claimed (0: nothing to publish for) */
	struct fslot *slots;      /* FSLOTS */
	char fast_pad1[64];
	struct qcow2_ext_io ext;
};

static void step(struct q2req *r, int res);

/* ---- inflated clusters ---- */

static void *zc_find(struct q2img *m, uint64_t host, uint32_t clen)
{
	for (unsigned i = 0; i < m->zc_n; i++) {
		struct zc_ent *e = &m->zc[i];

		if (e->state == ZC_VALID && e->host == host && e->clen == clen) {
			e->last = ++m->zc_tick;
			return e->buf;
		}
	}
	return NULL;
}

/* The entry filling with these bytes that a read may still wait on, or NULL. */
static struct zc_ent *zc_filling(struct q2img *m, uint64_t host, uint32_t clen)
{
	for (unsigned i = 0; i < m->zc_n; i++) {
		struct zc_ent *e = &m->zc[i];

		if (e->state == ZC_FILLING && !e->dropped && e->host == host && e->clen == clen)
			return e;
	}
	return NULL;
}

/*
 * Claim an entry to fill with the bytes at [host, host + clen): a free one,
 * else the least recently used valid one; never one being filled. NULL: all
 * are being filled, or no memory (the read then goes uncached).
 */
static struct zc_ent *zc_claim(struct q2img *m, uint64_t host, uint32_t clen)
{
	struct zc_ent *v = NULL;

	for (unsigned i = 0; i < m->zc_n; i++) {
		struct zc_ent *e = &m->zc[i];

		if (e->state == ZC_FILLING)
			continue;
		if (e->state == ZC_EMPTY) {
			v = e;
			break;
		}
		if (!v || e->last < v->last)
			v = e;
	}
	if (!v)
		return NULL;
	v->state = ZC_EMPTY;
	if (!v->buf)
		v->buf = io_alloc_aligned(m->cs);
	if (!v->buf)
		return NULL;
	v->host = host;
	v->clen = clen;
	v->state = ZC_FILLING;
	v->dropped = false;
	v->last = ++m->zc_tick;
	v->waiters = NULL;
	v->wtail = &v->waiters;
	return v;
}

/* Host range [off, off + len) of the image is about to be written: drop what it overlaps. */
static void zc_drop(struct q2img *m, uint64_t off, uint64_t len)
{
	for (unsigned i = 0; i < m->zc_n; i++) {
		struct zc_ent *e = &m->zc[i];

		if (e->state == ZC_EMPTY || off >= e->host + e->clen || e->host >= off + len)
			continue;
		if (e->state == ZC_FILLING)
			e->dropped = true; /* its waiters are still served: see comp_issue() */
		else
			e->state = ZC_EMPTY;
	}
}

static struct io_file *data_file(struct q2img *m)
{
	return m->own_dfile ? &m->dfile : &m->file;
}

/* ---- the fast path: the owner's side ---- */

/*
 * Any thread. The reach first, then the array: ft_grow() publishes a larger
 * array before the larger reach, so a thread that sees the new reach sees
 * an array that long (an older array serves the old reach).
 */
static uint64_t *ft_page(struct q2img *m, uint64_t gc)
{
	uint64_t **ft;

	if (gc >= __atomic_load_n(&m->ft_n, __ATOMIC_ACQUIRE))
		return NULL;
	ft = __atomic_load_n(&m->ft, __ATOMIC_ACQUIRE);
	return ft ? __atomic_load_n(&ft[gc >> FT_BITS], __ATOMIC_ACQUIRE) : NULL;
}

/* Owner: publish entry @e of guest cluster @gc (dropped if out of budget). */
static void ft_store(struct q2img *m, uint64_t gc, uint64_t e)
{
	uint64_t *pg;

	if (gc >= m->ft_n)
		return;
	if (!m->ft) {
		uint64_t **ft = calloc((size_t)((m->ft_n >> FT_BITS) + 1), sizeof(*ft));

		if (!ft)
			return;
		m->ft_len = (m->ft_n >> FT_BITS) + 1;
		__atomic_store_n(&m->ft, ft, __ATOMIC_RELEASE);
	}
	pg = m->ft[gc >> FT_BITS];
	if (!pg) {
		if (m->ft_npages >= m->ft_maxpages)
			return;
		pg = calloc(1u << FT_BITS, sizeof(*pg));
		if (!pg)
			return;
		m->ft_npages++;
		__atomic_store_n(&m->ft[gc >> FT_BITS], pg, __ATOMIC_RELEASE);
	}
	if (!__atomic_exchange_n(&pg[gc & ((1u << FT_BITS) - 1)], e, __ATOMIC_SEQ_CST))
		m->ft_entries++; /* every entry stored is non-zero */
}

/* Owner: forget the guest clusters [off, off + len) touches. */
static void ft_clear(struct q2img *m, uint64_t off, uint64_t len)
{
	uint64_t gc, end;

	if (!m->ft || !len)
		return;
	gc = off >> m->cb;
	end = ((off + len - 1) >> m->cb) + 1;
	if (end > m->ft_n)
		end = m->ft_n;
	while (gc < end) {
		uint64_t *pg = m->ft[gc >> FT_BITS];
		uint64_t pend = ((gc >> FT_BITS) + 1) << FT_BITS;

		if (pend > end)
			pend = end;
		for (; pg && gc < pend; gc++) {
			if (__atomic_exchange_n(&pg[gc & ((1u << FT_BITS) - 1)], 0,
						__ATOMIC_SEQ_CST))
				m->ft_entries--;
		}
		gc = pend;
	}
}

static void ft_clear_all(struct q2img *m)
{
	ft_clear(m, 0, m->ft_n << m->cb);
}

/* Owner: does a write-type request other than @self cover a cluster of [off, off + len)? */
static bool mut_overlaps(struct q2img *m, uint64_t off, uint64_t len, const struct q2req *self)
{
	uint64_t a = off >> m->cb, b = (off + len - 1) >> m->cb;

	for (struct q2req *o = m->muts; o; o = o->mut_next) {
		if (o != self && o->io->len && a <= (o->io->off + o->io->len - 1) >> m->cb &&
		    o->io->off >> m->cb <= b)
			return true;
	}
	return false;
}

static bool bitmaps_recording(struct q2img *m)
{
	struct qcow2_bitmap_info *all;
	bool rec = false;
	int n = qcow2_bitmaps(m->q, NULL, 0);

	if (n <= 0)
		return false;
	all = calloc((size_t)n, sizeof(*all));
	if (!all)
		return true;
	qcow2_bitmaps(m->q, all, (unsigned)n);
	for (int i = 0; i < n; i++)
		rec = rec || all[i].recording;
	free(all);
	return rec;
}

/*
 * Owner: what the threads may do. Reads while the engine is open (not with
 * extended L2 entries: a cluster's subclusters may differ); in-place writes
 * also need the write permission, a sound image and no recording dirty
 * bitmap (a fast write would not mark it).
 */
static void fast_mode_update(struct q2img *m)
{
	unsigned mode = 0;

	if (m->q && !m->extl2 && !qcow2_is_corrupt(m->q)) {
		mode = FM_READ;
		if (img_may_write(&m->img) && !bitmaps_recording(m))
			mode |= FM_WRITE;
	}
	__atomic_store_n(&m->fmode, mode, __ATOMIC_SEQ_CST);
}

/* Owner, before the engine closes or the image changes hands: nothing is fast. */
static void fast_off(struct q2img *m)
{
	__atomic_store_n(&m->fmode, 0, __ATOMIC_SEQ_CST);
	ft_clear_all(m);
}

/* At close, every thread done with the image: what the fast path allocated. */
static void fast_free(struct q2img *m)
{
	for (unsigned i = 0; m->slots && i < FSLOTS; i++) {
		struct fslot *s = &m->slots[i];

		/* a wake-up still on its way to our loop */
		while (__atomic_load_n(&s->wake_posted, __ATOMIC_SEQ_CST) &&
		       io_loop_run_once(m->img.loop, true) >= 0)
			;
		while (s->free) {
			struct q2fast *f = s->free;

			s->free = f->next;
			free(f);
		}
		for (unsigned k = 0; k < s->nbufs; k++)
			io_free_aligned(s->bufs[k]);
		for (unsigned k = 0; s->zc && k < m->zc_n; k++)
			io_free_aligned(s->zc[k].buf);
		free(s->zc);
	}
	free(m->slots);
	if (m->ft) {
		for (uint64_t p = 0; p < m->ft_len; p++)
			free(m->ft[p]);
		free(m->ft);
	}
	for (unsigned i = 0; i < m->ft_nold; i++)
		free(m->ft_old[i]); /* their pages are m->ft's */
	free(m->ft_old);
}

/*
 * Compressed clusters inflated, reads served from inflated clusters (or by
 * a read of their bytes in flight), reads of compressed bytes and reads that
 * joined one in flight: all threads (st->), and the owner's alone (@own).
 */
struct zc_count {
	uint64_t inflated, hits, reads, joins;
};

static void zc_counts(struct q2img *m, struct zc_count *st, struct zc_count *own)
{
	*own = (struct zc_count){m->n_inflated, m->n_zc_hits, m->n_zc_reads, m->n_zc_joins};
	*st = *own;
	for (unsigned i = 0; m->slots && i < FSLOTS; i++) {
		struct fslot *s = &m->slots[i];

		st->inflated += __atomic_load_n(&s->n_inflated, __ATOMIC_RELAXED);
		st->hits += __atomic_load_n(&s->n_zc_hits, __ATOMIC_RELAXED);
		st->reads += __atomic_load_n(&s->n_zc_reads, __ATOMIC_RELAXED);
		st->joins += __atomic_load_n(&s->n_zc_joins, __ATOMIC_RELAXED);
	}
}

/* Requests other threads served themselves, and those they handed to the owner. */
static void fast_counts(struct q2img *m, uint64_t *hits, uint64_t *hops)
{
	*hits = *hops = 0;
	for (unsigned i = 0; m->slots && i < FSLOTS; i++) {
		*hits += __atomic_load_n(&m->slots[i].n_fast, __ATOMIC_RELAXED);
		*hops += __atomic_load_n(&m->slots[i].n_hops, __ATOMIC_RELAXED);
	}
}

/* Requests in flight: the owner's and those of other threads. */
static unsigned busy_count(struct q2img *m)
{
	unsigned n = m->inflight + __atomic_load_n(&m->remote_inflight, __ATOMIC_ACQUIRE);

	for (unsigned i = 0; m->slots && i < FSLOTS; i++)
		n += __atomic_load_n(&m->slots[i].inflight, __ATOMIC_ACQUIRE);
	return n;
}

/* The slot of the thread of @loop, if it claimed one (see slot_of). */
static struct fslot *slot_find(struct q2img *m, struct io_loop *loop)
{
	for (unsigned i = 0; i < FSLOTS; i++) {
		struct io_loop *l = __atomic_load_n(&m->slots[i].loop, __ATOMIC_ACQUIRE);

		if (l == loop)
			return &m->slots[i];
		if (!l)
			break;
	}
	return NULL;
}

/*
 * A request submitted on another thread ends (on that thread). Counted in
 * its slot's own cache line: a shared counter would bounce between the
 * threads' CPUs twice per request.
 */
static void remote_end(struct q2img *m, struct fslot *s)
{
	__atomic_fetch_sub(s ? &s->inflight : &m->remote_inflight, 1, __ATOMIC_RELEASE);
}

static bool fast_flip(void *priv);

/*
 * The table's budget, in pages of 4 KiB (512 entries, as many as an L2 slice
 * of 4 KiB holds), for a disk of @nclusters, from the L2 cache's stats @c:
 * as many entries as the L2 cache holds when the whole disk's L2 entries fit
 * it, since the threads then hit the table as often as the owner hits the
 * cache. When they do not fit (a miss-bound image: reads across a disk
 * whose tables are larger than the cache), the table would only be a second
 * copy of the slices loaded first, hit as rarely as the cache is (its share
 * of the tables), and would double the daemon's memory for it: 1/8 of the
 * L2 cache's budget then, enough for a working set of that size. At least
 * 512 pages (2 MiB) either way.
 */
static size_t ft_budget(uint64_t nclusters, const struct qcow2_cache_stats *c)
{
	uint64_t cache = c->l2_max * c->entry_size;
	size_t n = (size_t)(cache / 4096);

	if (nclusters * sizeof(uint64_t) > cache)
		n /= FT_MISS_SHARE;
	return n < 512 ? 512 : n;
}

/* At open: the slots, the table's reach and budget. */
static int fast_init(struct q2img *m, const struct qcow2_header_info *h)
{
	struct qcow2_cache_stats c;

	m->slots = aligned_alloc(64, FSLOTS * sizeof(*m->slots));
	if (!m->slots)
		return -ENOMEM;
	memset(m->slots, 0, FSLOTS * sizeof(*m->slots));
	for (unsigned i = 0; i < FSLOTS; i++)
		m->slots[i].m = m;
	m->cb = h->cluster_bits;
	m->extl2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
	m->ft_n = (qcow2_size(m->q) + m->cs - 1) >> m->cb;
	if (m->ft_n > FT_MAX_CLUSTERS)
		m->ft_n = FT_MAX_CLUSTERS;
	qcow2_cache_stats(m->q, &c);
	m->ft_maxpages = ft_budget((qcow2_size(m->q) + m->cs - 1) >> m->cb, &c);
	m->slice_cl = c.entry_size / sizeof(uint64_t);
	m->ext.flip = fast_flip;
	m->ext.priv = m;
	return 0;
}

/*
 * Owner, the disk grew to @size (its new size is durable, and the guest
 * learns it next): the table reaches it too, so the threads serve the new
 * range as the old. No need to park them: the pages stay where they are
 * (the owner clears an entry in the one page every array shares), a longer
 * array of page pointers is published before the longer reach (ft_page),
 * and the array it replaces is kept until close, as a thread may still be
 * reading it (it serves the old reach, and a page added since is absent
 * there, which is a miss). Tickets and the grace period are untouched: no
 * entry changes. Out of memory: the old reach stays (the new range hops).
 * Its budget follows the L2 cache's, which grows too when it was sized by
 * default (q2_cache_defaults); a smaller one (the disk's tables no longer
 * fit a cache sized by the user) keeps the pages it has and adds none.
 */
static void ft_grow(struct q2img *m, uint64_t size)
{
	uint64_t n = (size + m->cs - 1) >> m->cb, len;

	if (m->q) {
		struct qcow2_cache_stats c;

		qcow2_cache_stats(m->q, &c);
		m->ft_maxpages = ft_budget(n, &c); /* the L2 cache grew with the disk */
	}
	if (n > FT_MAX_CLUSTERS)
		n = FT_MAX_CLUSTERS;
	if (n <= m->ft_n)
		return;
	len = (n >> FT_BITS) + 1;
	if (m->ft && len > m->ft_len) {
		uint64_t **ft = calloc((size_t)len, sizeof(*ft));
		uint64_t ***old = realloc(m->ft_old, (m->ft_nold + 1) * sizeof(*old));

		if (old)
			m->ft_old = old;
		if (!ft || !old) {
			free(ft);
			return;
		}
		memcpy(ft, m->ft, (size_t)m->ft_len * sizeof(*ft));
		m->ft_old[m->ft_nold++] = m->ft;
		m->ft_len = len;
		__atomic_store_n(&m->ft, ft, __ATOMIC_RELEASE);
	}
	__atomic_store_n(&m->ft_n, n, __ATOMIC_RELEASE);
}

/* Owner: a new engine (open, reopen): nothing known yet, its ticket hook set. */
static void fast_engine(struct q2img *m)
{
	ft_clear_all(m);
	__atomic_add_fetch(&m->fepoch, 1, __ATOMIC_SEQ_CST);
	__atomic_store_n(&m->ext_wait, false, __ATOMIC_SEQ_CST);
	if (m->q) {
		__atomic_store_n(&m->ctype, (uint8_t)qcow2_header(m->q)->compression_type,
				 __ATOMIC_RELAXED);
		qcow2_set_ext_io(m->q, &m->ext);
	}
	fast_mode_update(m);
}

/* Owner: publish what a read mapped (DATA, COMPRESSED and zero extents). */
static void publish_read(struct q2img *m, const struct qcow2_extent *x, int n)
{
	for (int i = 0; i < n; i++, x++) {
		uint64_t gc = x->off >> m->cb, last = (x->off + x->len - 1) >> m->cb;

		if (x->type == QCOW2_MAP_DATA && !mut_overlaps(m, x->off, x->len, NULL)) {
			for (; gc <= last; gc++) {
				uint64_t host = x->host + (gc << m->cb) - x->off;
				uint64_t *pg = ft_page(m, gc);
				uint64_t cur = pg ? __atomic_load_n(&pg[gc & ((1u << FT_BITS) - 1)],
								    __ATOMIC_RELAXED)
						  : 0;

				/* in place as qcow2_map_write() would allow it: not over metadata
				 */
				bool rw = (x->flags & QCOW2_EXT_INPLACE) &&
					  (m->has_dfile || !qcow2_is_metadata(m->q, host, m->cs));
				uint64_t e = FE_DATA | host | (rw ? FE_RW : 0);

				if ((host & (m->cs - 1)) || host > FE_HOST_MASK)
					break;
				if (cur != e)
					ft_store(m, gc, e);
			}
		} else if ((x->type == QCOW2_MAP_ZERO ||
			    (x->type == QCOW2_MAP_UNALLOC && !m->backing)) &&
			   !mut_overlaps(m, x->off, x->len, NULL)) {
			/* as read_extent() fills them */
			for (; gc <= last; gc++) {
				uint64_t *pg = ft_page(m, gc);

				if (!pg || __atomic_load_n(&pg[gc & ((1u << FT_BITS) - 1)],
							   __ATOMIC_RELAXED) != FE_ZERO)
					ft_store(m, gc, FE_ZERO);
			}
		} else if (x->type == QCOW2_MAP_COMPRESSED && gc == last &&
			   x->host < (1ull << FE_CHOST_BITS) && x->clen < FE_CLEN_MAX &&
			   !mut_overlaps(m, x->off, x->len, NULL)) {
			ft_store(m, gc, FE_COMP | x->host | ((uint64_t)x->clen << FE_CHOST_BITS));
		}
	}
}

/*
 * Owner, after a read mapped guest @off for a thread: publish the rest of its
 * L2 slice too (what the engine knows without waiting), so the threads' next
 * reads nearby (a sequential read, the first touches of a random one) need
 * no hop of their own. Not once the table is out of budget (every miss
 * would map the slice again), unless the slice's first page is there: the
 * read's own entries may have taken the last page of the budget (a disk
 * whose table fits its budget exactly would keep that page sparse).
 */
static void publish_slice(struct q2img *m, uint64_t off)
{
	struct qcow2_extent x[32];
	uint64_t span = m->slice_cl << m->cb, pos = off & ~(span - 1), end = pos + span;

	if (!m->slice_cl || (m->ft_npages >= m->ft_maxpages && !ft_page(m, pos >> m->cb)))
		return;
	if (end > qcow2_size(m->q))
		end = qcow2_size(m->q);
	while (pos < end) {
		int n = qcow2_map_read_cached(m->q, pos, end - pos, x, 32);

		if (n <= 0)
			break;
		publish_read(m, x, n);
		pos = x[n - 1].off + x[n - 1].len;
	}
}

/*
 * Owner: publish guest [off, off + len) as written in place at @host: an
 * in-place write mapping of @r (its own range excepted), as it is mapped.
 * (The new clusters a request allocated are published at its end from the
 * engine's mapping then: publish_linked.)
 */
static void publish_inplace(struct q2img *m, struct q2req *r, uint64_t off, uint64_t len,
			    uint64_t host0)
{
	uint64_t gc = off >> m->cb, last = (off + len - 1) >> m->cb;

	if (!len || !__atomic_load_n(&m->fmode, __ATOMIC_RELAXED) || mut_overlaps(m, off, len, r))
		return;
	for (; gc <= last; gc++) {
		uint64_t host = host0 + (gc << m->cb) - off;

		if ((host & (m->cs - 1)) || host > FE_HOST_MASK)
			return;
		ft_store(m, gc, FE_DATA | FE_RW | host);
	}
}

/*
 * Owner, a write-type request that allocated guest [off, off + len) ends:
 * publish what the engine maps there now, not what the request allocated.
 * A discard or write-zeroes of those clusters that started after the request
 * linked them may have removed (and freed) them and completed already, while
 * the request went on with the rest of its range; it is no longer on
 * m->muts then, and a table entry of the allocation would let a thread write
 * a freed (or reused) host cluster in place: its write lost, or another
 * cluster's data overwritten (integration.fastpub). While another write-type
 * request on those clusters is in flight nothing is published (publish_read:
 * mut_overlaps); with none, the cached L2 entries are final until one starts,
 * which clears the table first.
 */
static void publish_linked(struct q2img *m, uint64_t off, uint64_t len)
{
	struct qcow2_extent x[8];
	uint64_t pos = off, end = off + len;

	if (!(__atomic_load_n(&m->fmode, __ATOMIC_RELAXED) & FM_READ))
		return;
	while (pos < end) {
		int n = qcow2_map_read_cached(m->q, pos, end - pos, x, 8);

		if (n <= 0)
			break;
		publish_read(m, x, n);
		pos = x[n - 1].off + x[n - 1].len;
	}
}

/*
 * Owner, a grace period starts (qcow2_ext_io.flip): fast tickets count in a
 * new generation from now on; true if none of the old one is in flight.
 */
static bool fast_flip(void *priv)
{
	struct q2img *m = priv;
	unsigned old = __atomic_load_n(&m->fgen, __ATOMIC_RELAXED) & 1;

	__atomic_store_n(&m->fgen, __atomic_load_n(&m->fgen, __ATOMIC_RELAXED) + 1,
			 __ATOMIC_SEQ_CST);
	__atomic_store_n(&m->ext_wait, true, __ATOMIC_SEQ_CST);
	for (unsigned i = 0; i < FSLOTS; i++) {
		if (__atomic_load_n(&m->slots[i].active[old], __ATOMIC_SEQ_CST))
			return false;
	}
	__atomic_store_n(&m->ext_wait, false, __ATOMIC_SEQ_CST);
	return true;
}

/* Owner: a thread ended the last fast ticket of the old generation it saw. */
static void fast_wake(struct io_cmd *cmd, int res)
{
	struct fslot *s = cmd->priv;
	struct q2img *m = s->m;
	unsigned old = (__atomic_load_n(&m->fgen, __ATOMIC_RELAXED) & 1) ^ 1;

	(void)res;
	__atomic_store_n(&s->wake_posted, false, __ATOMIC_SEQ_CST);
	if (!__atomic_load_n(&m->ext_wait, __ATOMIC_SEQ_CST))
		return;
	for (unsigned i = 0; i < FSLOTS; i++) {
		if (__atomic_load_n(&m->slots[i].active[old], __ATOMIC_SEQ_CST))
			return;
	}
	__atomic_store_n(&m->ext_wait, false, __ATOMIC_SEQ_CST);
	if (m->q)
		qcow2_ext_io_idle(m->q);
}

/*
 * Where to read the compressed bytes [host, host + clen) from, into a
 * buffer of 2 clusters: widened to the file's O_DIRECT alignment when that
 * stays inside the file and the buffer, so io/ reads them straight into it
 * (no bounce buffer, no copy); *skip is where they start in the buffer.
 * Returns the length to read from *start.
 */
static size_t comp_span(struct q2img *m, uint64_t host, uint32_t clen, uint64_t *start,
			uint32_t *skip)
{
	uint64_t a = m->file.align > 1 ? m->file.align : 1;
	uint64_t s = host & ~(a - 1), end = (host + clen + a - 1) & ~(a - 1);

	if (a > 1 && end - s <= 2 * m->cs && end <= m->file.size) {
		*start = s;
		*skip = (uint32_t)(host - s);
		return (size_t)(end - s);
	}
	*start = host;
	*skip = 0;
	return clen;
}

/* How many of the compressed bytes a read of comp_span() (@res: its result) brought. */
static size_t comp_avail(int res, uint32_t skip, uint32_t clen)
{
	size_t n = res > 0 && (size_t)res > skip ? (size_t)res - skip : 0;

	return n < clen ? n : clen;
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
	r->state = RQ_IDLE;
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

/* ---- what step() waits for: completions ---- */

/* On the submitter's thread: a request handed to the owner is done. */
static void hop_back(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;
	struct q2img *m = io->impl;

	(void)res;
	remote_end(m, slot_find(m, io->loop));
	io->done(io, io->err);
}

/* The end of a request on the owner: done() here, or back on its submitter's thread. */
static void io_finish(struct q2img *m, struct img_io *io, bool remote, int err)
{
	if (!remote) {
		io->done(io, err < 0 ? err : 0);
		return;
	}
	io->err = err < 0 ? err : 0;
	io->impl = m;
	io->cmd.done = hop_back;
	io->cmd.priv = io;
	io_post_remote(io->loop, &io->cmd);
}

static void complete_now(struct q2req *r, int err)
{
	struct q2img *m = r->m;
	struct img_io *io = r->io;
	bool remote = r->remote;

	if (r->mut) {
		*r->mut_pprev = r->mut_next;
		if (r->mut_next)
			r->mut_next->mut_pprev = r->mut_pprev;
		r->mut = false;
		/* Its new clusters are linked (complete() waited for qcow2_link):
		 * the threads may write them in place, as qcow2_map_write() would
		 * now map them, without a second hop per cluster. */
		if (err >= 0 && r->pub_len)
			publish_linked(m, r->pub_off, r->pub_len);
	}
	if (err == -EIO && m->q && qcow2_is_corrupt(m->q))
		fast_mode_update(m); /* no more fast writes */
	m->inflight--;
	req_put(m, r);
	io_finish(m, io, remote, err);
}

static void link_done(struct qcow2_flush *f, int res)
{
	complete_now(f->priv, res);
}

/*
 * The one exit of a request: io->done() exactly once, always from the loop.
 * A write, write-zeroes or discard that changed L2 entries completes only
 * once those are written (qcow2_link): a guest that saw it complete must
 * read it back after a process death of ours (kill -9, crash, restart).
 */
static void complete(struct q2req *r, int err)
{
	if (err >= 0 && r->link_gen) {
		r->flush.done = link_done;
		r->flush.priv = r;
		if (qcow2_link_slice(r->m->q, r->link_gen, r->link_slice, &r->flush))
			return;
	}
	complete_now(r, err);
}

/* One I/O part of a step ended; the last one moves the request on. */
static void part_done(struct q2req *r, int res)
{
	int err;

	if (res < 0 && !r->err)
		r->err = res;
	if (--r->pending)
		return;
	err = r->err;
	r->err = 0;
	step(r, err);
}

static void cmd_done(struct io_cmd *cmd, int res)
{
	part_done(cmd->priv, res);
}

static void posted(struct io_cmd *cmd, int res)
{
	step(cmd->priv, res);
}

static void engine_wake(struct qcow2_waiter *w)
{
	step(w->priv, w->err);
}

static void flush_done(struct qcow2_flush *f, int res)
{
	step(f->priv, res);
}

/*
 * Compressed reads on the owner. A read of a compressed cluster that is not
 * inflated already either waits for the same bytes already on their way
 * (zc_filling(): it joins the entry's waiters, no I/O of its own) or reads
 * them itself (comp_issue()), into a cache entry it claims and leads
 * (sub->ze; uncached when every entry is being filled). When they arrive
 * they are inflated once (comp_done()), copied into the buffers of the
 * leader and of every waiter, and all of them complete (comp_end()). So
 * the 16 4K reads of a cluster read from a sequential 4K stream read its
 * compressed bytes once, as the threads' fzc_try() does.
 *
 * Why a waiter gets the right bytes: it mapped its guest cluster to the
 * same host range as the leader, and holds its own ticket (qcow2_io_begin),
 * as the leader does until its bytes arrived: a cluster is freed and reused
 * only after every ticket taken before the free ended, so those bytes are
 * the compressed cluster each of them mapped. A request that starts after
 * a write to the guest cluster completed maps the new cluster, never these
 * bytes. A data write or zeroing of the host range itself (zc_drop(): only
 * a corrupt image overlaps compressed bytes with data) marks a filling entry
 * dropped: nothing joins it any more and it is not kept, and those already
 * waiting, which started before that write, get what the read brought.
 *
 * A failed read or inflate fails the leader with its result; every waiter
 * then reads the bytes itself (comp_retry(), uncached and unjoinable) and
 * fails only if its own attempt does.
 *
 * Remote inflate. A request submitted from another thread (img_io.loop set:
 * vqcowd's I/O threads hand qcow2 requests to the image's thread) has the
 * CPU work of a compressed cluster done back on that thread: the compressed
 * bytes read here go there (inflate_remote), are inflated into the entry's
 * buffer (untouched here while it is being filled) or a bounce buffer, and
 * copied into the request's buffers, and come back here (inflate_back),
 * where the waiters are served. The engine is not touched there.
 */
static void sub_cmd_done(struct io_cmd *cmd, int res);

/* Test seam: a read of compressed bytes failed on purpose (zread_fails()). */
static void zfail_sub(struct io_cmd *cmd, int res)
{
	(void)res;
	sub_cmd_done(cmd, -EIO);
}

/* Read the compressed bytes of @sub; @cache: into an entry it claims (others may join). */
static int comp_issue(struct q2sub *sub, bool cache)
{
	struct q2img *m = sub->r->m;
	uint64_t start;
	size_t rlen;

	sub->cbuf = bounce_get(m);
	if (!sub->cbuf)
		return -ENOMEM;
	sub->ze = cache ? zc_claim(m, sub->chost, sub->clen) : NULL;
	sub->ibuf = NULL;
	sub->cmd.done = sub_cmd_done;
	sub->cmd.priv = sub;
	m->n_zc_reads++;
	rlen = comp_span(m, sub->chost, sub->clen, &start, &sub->cskip);
	if (zread_fails()) {
		sub->cmd.done = zfail_sub;
		io_post(m->img.loop, &sub->cmd);
		return 0;
	}
	io_read(m->img.loop, &sub->cmd, &m->file, sub->cbuf, rlen, start);
	return 0;
}

/* A waiter whose leader failed reads the bytes itself (its part is still pending). */
static void comp_retry(struct q2sub *w)
{
	int ret = comp_issue(w, false);

	if (ret < 0)
		part_done(w->r, ret);
}

/*
 * The compressed read @sub led ended: @ret 0 with the cluster inflated at
 * @buf (already copied into the leader's buffers if @copied), or -errno.
 * Every copy is made before any request moves on (a done() may claim the
 * entry again).
 */
static void comp_end(struct q2sub *sub, int ret, const uint8_t *buf, bool copied)
{
	struct q2req *r = sub->r;
	struct q2img *m = r->m;
	struct zc_ent *e = sub->ze;
	struct q2sub *w = NULL;

	if (e) {
		w = e->waiters;
		e->waiters = NULL;
		e->wtail = &e->waiters;
		e->state = ret >= 0 && !e->dropped ? ZC_VALID : ZC_EMPTY;
		e->dropped = false;
		sub->ze = NULL;
	}
	if (ret >= 0) {
		if (!copied)
			io_iov_from_buf(r->rd_iov, r->rd_iovcnt, (size_t)sub->skip, buf + sub->coff,
					(size_t)sub->len);
		for (struct q2sub *x = w; x; x = x->znext)
			io_iov_from_buf(x->r->rd_iov, x->r->rd_iovcnt, (size_t)x->skip,
					buf + x->coff, (size_t)x->len);
	}
	bounce_put(m, sub->cbuf);
	sub->cbuf = NULL;
	if (!e)
		bounce_put(m, sub->ibuf); /* uncached: a bounce buffer (or NULL) */
	sub->ibuf = NULL;
	while (w) {
		struct q2sub *next = w->znext;

		w->znext = NULL;
		if (ret >= 0)
			part_done(w->r, 0);
		else
			comp_retry(w);
		w = next;
	}
	part_done(r, ret);
}

static void inflate_back(struct io_cmd *cmd, int res)
{
	struct q2sub *sub = cmd->priv;
	struct q2img *m = sub->r->m;

	(void)res;
	if (sub->ires < 0)
		vlog(VLOG_ERROR, m->img.path, "compressed cluster data is corrupt");
	else
		m->n_inflated++;
	comp_end(sub, sub->ires, sub->ibuf, true);
}

static void inflate_remote(struct io_cmd *cmd, int res)
{
	struct q2sub *sub = cmd->priv;
	struct q2req *r = sub->r;
	uint64_t cs = r->m->cs;

	(void)res;
	sub->ires = qcow2_decompress_type(sub->ctype, (uint8_t *)sub->cbuf + sub->cskip,
					  sub->cavail, sub->ibuf, cs);
	if (sub->ires == 0)
		io_iov_from_buf(r->rd_iov, r->rd_iovcnt, (size_t)sub->skip,
				(uint8_t *)sub->ibuf + sub->coff, (size_t)sub->len);
	cmd->done = inflate_back;
	io_post_remote(r->m->img.loop, cmd);
}

/* The compressed bytes of the read @sub leads arrived (@res: the read's result). */
static void comp_done(struct q2sub *sub, int res)
{
	struct q2req *r = sub->r;
	struct q2img *m = r->m;
	uint8_t *buf;
	int ret;

	if (res < 0) {
		comp_end(sub, res, NULL, false);
		return;
	}
	sub->cavail = (uint32_t)comp_avail(res, sub->cskip, sub->clen);
	/* uncached: another read may have inflated the cluster since */
	if (!sub->ze && (buf = zc_find(m, sub->chost, sub->clen))) {
		m->n_zc_hits++;
		comp_end(sub, 0, buf, false);
		return;
	}
	buf = sub->ze ? sub->ze->buf : (sub->ibuf = bounce_get(m));
	if (!buf) {
		comp_end(sub, -ENOMEM, NULL, false);
		return;
	}
	sub->ibuf = buf;
	if (r->io->loop && r->io->loop != m->img.loop) {
		sub->ctype = (uint8_t)qcow2_header(m->q)->compression_type;
		sub->ires = 0;
		sub->cmd.done = inflate_remote;
		sub->cmd.priv = sub;
		io_post_remote(r->io->loop, &sub->cmd);
		return;
	}
	ret = qcow2_decompress(m->q, (uint8_t *)sub->cbuf + sub->cskip, sub->cavail, buf, m->cs);
	if (ret < 0)
		vlog(VLOG_ERROR, m->img.path, "compressed cluster data is corrupt");
	else
		m->n_inflated++;
	comp_end(sub, ret < 0 ? ret : 0, buf, false);
}

static void sub_done(struct q2sub *sub, int res)
{
	if (sub->cbuf)
		comp_done(sub, res);
	else
		part_done(sub->r, res);
}

static void sub_cmd_done(struct io_cmd *cmd, int res)
{
	sub_done(cmd->priv, res);
}

static void sub_bio_done(struct img_io *io, int res)
{
	sub_done(io->priv, res);
}

/* ---- what step() issues ---- */

static void post(struct q2req *r)
{
	r->turns = 0;
	r->cmd.done = posted;
	r->cmd.priv = r;
	io_post(r->m->img.loop, &r->cmd);
}

static int iov_reserve(struct iovec **iov, unsigned *cap, unsigned n)
{
	if (*cap < n) {
		struct iovec *ni = realloc(*iov, n * sizeof(*ni));

		if (!ni)
			return -ENOMEM;
		*iov = ni;
		*cap = n;
	}
	return 0;
}

/* Slice the read's iovec for [rel, rel + len) into sub->iov. */
static int sub_slice(struct q2req *r, struct q2sub *sub, uint64_t rel, uint64_t len)
{
	int n;

	if (iov_reserve(&sub->iov, &sub->iov_cap, r->rd_iovcnt) < 0)
		return -ENOMEM;
	n = io_iov_slice(sub->iov, sub->iov_cap, r->rd_iov, r->rd_iovcnt, (size_t)rel, (size_t)len);
	if (n < 0)
		return n;
	sub->iovcnt = (unsigned)n;
	return 0;
}

/* Issue the read of one extent at @rel in the read's iovec (zero extents: filled here). */
static int read_extent(struct q2req *r, const struct qcow2_extent *x, struct q2sub *sub,
		       uint64_t rel)
{
	struct q2img *m = r->m;
	int ret;

	sub->len = x->len;
	sub->skip = rel;
	if (x->type == QCOW2_MAP_ZERO || (x->type == QCOW2_MAP_UNALLOC && !m->backing)) {
		io_iov_memset(r->rd_iov, r->rd_iovcnt, (size_t)rel, 0, (size_t)x->len);
		return 0;
	}
	if (x->type == QCOW2_MAP_COMPRESSED) {
		uint8_t *buf = zc_find(m, x->host, x->clen);
		struct zc_ent *e;

		if (buf) {
			m->n_zc_hits++;
			io_iov_from_buf(r->rd_iov, r->rd_iovcnt, (size_t)rel, buf + x->coff,
					(size_t)x->len);
			return 0;
		}
		if (x->clen > 2 * m->cs)
			return -EIO;
		sub->chost = x->host;
		sub->clen = x->clen;
		sub->coff = x->coff;
		e = zc_filling(m, x->host, x->clen);
		if (e) {
			/* the same bytes are on their way: wait for them */
			sub->znext = NULL;
			*e->wtail = sub;
			e->wtail = &sub->znext;
			m->n_zc_joins++;
			m->n_zc_hits++;
		} else {
			ret = comp_issue(sub, true);
			if (ret < 0)
				return ret;
		}
		r->pending++;
		return 0;
	}
	if (x->type != QCOW2_MAP_DATA && x->type != QCOW2_MAP_UNALLOC)
		return -EIO;
	ret = sub_slice(r, sub, rel, x->len);
	if (ret < 0)
		return ret;
	r->pending++;
	if (x->type == QCOW2_MAP_DATA) {
		sub->cmd.done = sub_cmd_done;
		sub->cmd.priv = sub;
		io_readv(m->img.loop, &sub->cmd, data_file(m), sub->iov, sub->iovcnt, x->host);
	} else {
		sub->bio.done = sub_bio_done;
		sub->bio.priv = sub;
		/* A qcow2 backing file inflates on the requester's thread too; a
		 * raw one would move its I/O there, so not that. */
		sub->bio.loop = m->backing->any_loop ? NULL : r->io->loop;
		img_readv(m->backing, &sub->bio, sub->iov, sub->iovcnt, x->off, x->len);
	}
	return 0;
}

/*
 * Map a prefix of what is left of the read and issue its extents; what a
 * thread's read (a miss that hopped here) mapped is published, and the rest
 * of its slice too. Not for the owner's own reads (the main thread's
 * queues): mapping the slice again on every read doubled the CPU per 4K
 * read of a preallocated image with 2 queues, for no hop saved (a thread's
 * miss publishes what it needs). Returns
 * the I/O parts in flight (r->rd_ticket held; r->err may hold an error to
 * report when they are done), 0 if it was all filled here, -EAGAIN (parked)
 * or -errno.
 */
static int read_map(struct q2req *r)
{
	struct qcow2 *q = r->m->q;
	uint64_t rel = r->rd_done;
	int n, ret = 0;

	r->rd_ticket = qcow2_io_begin(q);
	n = qcow2_map_read(q, r->rd_off + rel, r->rd_len - rel, r->ext, Q2_MAX_EXT, &r->w);
	if (n > 0 && r->state == RQ_READ_MAP && r->remote &&
	    __atomic_load_n(&r->m->nclaimed, __ATOMIC_RELAXED) &&
	    (__atomic_load_n(&r->m->fmode, __ATOMIC_RELAXED) & FM_READ)) {
		publish_read(r->m, r->ext, n);
		publish_slice(r->m, r->rd_off + rel);
	}
	r->pending = 0;
	r->err = 0;
	for (int i = 0; i < n && ret == 0; i++) {
		ret = read_extent(r, &r->ext[i], &r->sub[i], rel);
		rel += r->ext[i].len;
	}
	r->rd_done = rel;
	if (n >= 0 && r->pending) {
		r->err = ret;
		return (int)r->pending;
	}
	qcow2_io_end(q, r->rd_ticket);
	return n < 0 ? n : ret;
}

static void read_range(struct q2req *r, uint64_t off, uint64_t len, struct iovec *iov,
		       unsigned iovcnt)
{
	r->rd_off = off;
	r->rd_len = len;
	r->rd_done = 0;
	r->rd_iov = iov;
	r->rd_iovcnt = iovcnt;
}

/* The image's zero buffer: max(cluster size, ZERO_BUF_SIZE) aligned zero bytes, or NULL. */
static void *zero_buf_get(struct q2img *m)
{
	size_t len = m->cs > ZERO_BUF_SIZE ? (size_t)m->cs : ZERO_BUF_SIZE;

	if (!m->zero_buf) {
		m->zero_buf = io_alloc_aligned(len);
		if (m->zero_buf)
			memset(m->zero_buf, 0, len);
	}
	return m->zero_buf;
}

/* Zero [zr_off, zr_off + zr_len) of the data file: ZERO_RANGE, PUNCH_HOLE, zero writes. */
static int zero_issue(struct q2req *r)
{
	struct q2img *m = r->m;
	struct io_file *f = data_file(m);

	zc_drop(m, r->zr_off, r->zr_len);
	/* IO_FILE_NO_ZERO_RANGE: FUSE, where ZERO_RANGE may not zero */
	r->zr_mode =
	    m->no_zero_range || (f->flags & IO_FILE_NO_ZERO_RANGE) ? (m->no_punch ? 2 : 1) : 0;
	if (r->zr_mode == 2 && !zero_buf_get(m))
		return -ENOMEM;
	r->cmd.done = cmd_done;
	r->cmd.priv = r;
	r->pending = 1;
	if (r->zr_mode < 2)
		io_fallocate(m->img.loop, &r->cmd, f,
			     (r->zr_mode ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) |
				 FALLOC_FL_KEEP_SIZE,
			     r->zr_off, r->zr_len);
	else
		io_write(m->img.loop, &r->cmd, f, m->zero_buf,
			 r->zr_len < ZERO_BUF_SIZE ? (size_t)r->zr_len : ZERO_BUF_SIZE, r->zr_off);
	return 0;
}

/*
 * A zeroing command ended with @res: 1 if the zeroing goes on (the file
 * system cannot do this method: the next one; or the next chunk of zero
 * writes), 0 if it is complete, or -errno.
 */
static int zero_more(struct q2req *r, int res)
{
	struct q2img *m = r->m;
	int ret;

	if ((res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS) && r->zr_mode < 2) {
		if (r->zr_mode == 0)
			m->no_zero_range = true;
		else
			m->no_punch = true;
		ret = zero_issue(r);
		return ret < 0 ? ret : 1;
	}
	if (res < 0)
		return res;
	if (r->zr_mode == 2 && r->zr_len > ZERO_BUF_SIZE) {
		r->zr_off += ZERO_BUF_SIZE;
		r->zr_len -= ZERO_BUF_SIZE;
		ret = zero_issue(r);
		return ret < 0 ? ret : 1;
	}
	r->zr_len = 0;
	return 0;
}

/* Write an in-place prefix: its data, or zeroes. */
static int inplace_issue(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2_alloc *a = &r->a;
	int n;

	if (!r->wr_iov) {
		r->zr_off = a->host;
		r->zr_len = a->len;
		return zero_issue(r);
	}
	r->zr_len = 0;
	zc_drop(m, a->host, a->len);
	if (iov_reserve(&r->wiov, &r->wiov_cap, r->wr_iovcnt) < 0)
		return -ENOMEM;
	n = io_iov_slice(r->wiov, r->wiov_cap, r->wr_iov, r->wr_iovcnt,
			 (size_t)(a->off - r->wr_off), (size_t)a->len);
	if (n < 0)
		return n;
	r->cmd.done = cmd_done;
	r->cmd.priv = r;
	r->pending = 1;
	if ((unsigned)n == r->wr_iovcnt && a->len == r->wr_len)
		io_writev(m->img.loop, &r->cmd, data_file(m), r->wr_iov, r->wr_iovcnt, a->host);
	else
		io_writev(m->img.loop, &r->cmd, data_file(m), r->wiov, (unsigned)n, a->host);
	return 0;
}

/* Add a COW range to read; what lies past the disk's end is zeroes, not read. */
static void cow_add(struct q2req *r, uint64_t off, uint64_t len, uint8_t *buf)
{
	uint64_t size = r->m->img.size;

	if (off + len > size) {
		/*
		 * The last cluster of a disk whose size is not a multiple of
		 * the cluster size: the guest never sees the part past the end.
		 */
		uint64_t in = off < size ? size - off : 0;

		memset(buf + in, 0, (size_t)(len - in));
		len = in;
	}
	if (len)
		r->cow[r->cow_n++] = (struct cow_range){off, {buf, (size_t)len}};
}

/* Plan the COW reads of a new allocation: none, head and/or tail, or both in one. */
static int cow_plan(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2_alloc *a = &r->a;
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	bool rhead = head && !a->head_zero, rtail = tail && !a->tail_zero;

	r->cow_n = r->cow_i = 0;
	r->rd_done = r->rd_len = 0; /* COW_MAP starts with the first range */
	if (!rhead && !rtail)
		return 0;
	r->bounce = bounce_get(m);
	if (!r->bounce)
		return -ENOMEM;
	r->tail_buf = (uint8_t *)r->bounce + m->cs;
	if (rhead && rtail && a->cow_end - a->cow_start <= m->cs) {
		/* one read for both (the data part in between is overwritten) */
		r->tail_buf = (uint8_t *)r->bounce + (a->off + a->len - a->cow_start);
		cow_add(r, a->cow_start, a->cow_end - a->cow_start, r->bounce);
		return 0;
	}
	if (rhead)
		cow_add(r, a->cow_start, head, r->bounce);
	if (rtail)
		cow_add(r, a->off + a->len, tail, r->tail_buf);
	return 0;
}

/*
 * Write an allocation. Zero data: the head and tail apart, if they hold
 * anything (the range was zeroed, or is fresh). Data: one writev of head +
 * data + tail, where a head or tail that must read as zeroes is written from
 * the zero buffer (one write instead of a ZERO_RANGE and a write), and, with
 * m->pad, a new host cluster is written whole: the head and tail of fresh
 * space as zeroes too, and with extended L2 the subclusters outside the
 * token's range as well (they stay unallocated in the L2 entry, so their host
 * bytes are never read; the token locks the whole guest cluster, whose entry
 * is linked only when this write ends, so nothing else writes that host
 * cluster meanwhile). A written cluster is one written extent: later writes
 * into it are overwrites, not conversions of unwritten (fallocated) extents,
 * which cost ext4 half its 4K random-write throughput.
 * Returns the commands issued (0: none needed, fresh space) or -errno.
 */
static int alloc_write(struct q2req *r)
{
	struct q2img *m = r->m;
	struct qcow2_alloc *a = &r->a;
	struct io_file *f = data_file(m);
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	uint64_t hhost = a->host - head, pre = 0, post = 0, zh = 0, zt = 0;
	bool whead = head && !a->head_zero, wtail = tail && !a->tail_zero;
	unsigned k = 0;
	void *zb = NULL;
	int n;

	r->cmd.done = cmd_done;
	r->cmd.priv = r;
	r->cmd2.done = cmd_done;
	r->cmd2.priv = r;
	r->pending = 0;
	if (iov_reserve(&r->wiov, &r->wiov_cap, r->wr_iovcnt + 4) < 0)
		return -ENOMEM;
	if (!r->wr_iov) {
		/* zero data: zeroed or fresh already */
		zc_drop(m, hhost, head + a->len + tail);
		if (whead) {
			r->pending++;
			r->wiov[0] = (struct iovec){r->bounce, head};
			io_writev(m->img.loop, &r->cmd, f, &r->wiov[0], 1, hhost);
		}
		if (wtail) {
			r->pending++;
			r->wiov[1] = (struct iovec){r->tail_buf, tail};
			io_writev(m->img.loop, &r->cmd2, f, &r->wiov[1], 1, a->host + a->len);
		}
		return (int)r->pending;
	}
	if (m->pad) {
		zh = whead ? 0 : head;
		zt = wtail ? 0 : tail;
		if (a->new_host) {
			pre = a->cow_start & (m->cs - 1);
			post = (m->cs - (a->cow_end & (m->cs - 1))) & (m->cs - 1);
			a->rest_zero = true; /* whole-cluster links rely on it */
		}
	}
	if (pre + zh || zt + post) {
		zb = zero_buf_get(m);
		if (!zb)
			return -ENOMEM;
	}
	zc_drop(m, hhost - pre, pre + head + a->len + tail + post);
	/* pre + head < cs and tail + post < cs: the zero buffer covers either */
	if (pre && whead)
		r->wiov[k++] = (struct iovec){zb, pre};
	if (whead)
		r->wiov[k++] = (struct iovec){r->bounce, head};
	else if (pre + zh)
		r->wiov[k++] = (struct iovec){zb, pre + zh};
	n = io_iov_slice(r->wiov + k, r->wiov_cap - k, r->wr_iov, r->wr_iovcnt,
			 (size_t)(a->off - r->wr_off), (size_t)a->len);
	if (n < 0)
		return n;
	k += (unsigned)n;
	if (wtail)
		r->wiov[k++] = (struct iovec){r->tail_buf, tail};
	if (zt + post)
		r->wiov[k++] = (struct iovec){zb, wtail ? post : zt + post};
	r->pending = 1;
	io_writev(m->img.loop, &r->cmd, f, r->wiov, k, (whead || zh ? hhost : a->host) - pre);
	return 1;
}

/*
 * The COW data is in: zero the host range first if some of it must read as
 * zeroes and it is not fresh, unless the write carries its zeroes (m->pad).
 */
static int alloc_fill(struct q2req *r)
{
	struct qcow2_alloc *a = &r->a;
	uint64_t head = a->off - a->cow_start, tail = a->cow_end - (a->off + a->len);
	bool need = (head && a->head_zero) || (tail && a->tail_zero) || !r->wr_iov;
	int ret;

	if (a->fresh || !need || (r->wr_iov && r->m->pad)) {
		r->state = RQ_WRITING;
		return alloc_write(r);
	}
	r->state = RQ_ZEROING;
	r->zr_off = a->host - head;
	r->zr_len = a->cow_end - a->cow_start;
	ret = zero_issue(r);
	return ret < 0 ? ret : 1;
}

/*
 * Owner: does what @r maps go into the fast table? A thread's request, and
 * the owner's own once a thread serves the image too (the main thread's
 * queues beside I/O threads': its writes cleared the entries of their
 * clusters when they started, and a thread's next write to them would hop).
 * Not while no thread ever submitted (one thread, or only the main thread's
 * queues in use: nothing to publish for).
 */
static bool publishing(struct q2img *m, const struct q2req *r)
{
	return r->remote || __atomic_load_n(&m->nclaimed, __ATOMIC_RELAXED);
}

/* A mapped write prefix ends: link (or undo) its allocation, give back its ticket. */
static void write_end(struct q2req *r, int err)
{
	struct q2img *m = r->m;

	if (r->state != RQ_INPLACE) {
		if (err >= 0 && r->a.new_host && publishing(m, r)) {
			/* whole new clusters, written in place from now on */
			r->pub_off = r->a.cow_start;
			r->pub_len = r->a.cow_end - r->a.cow_start;
			r->pub_host = r->a.host - (r->a.off - r->a.cow_start);
		}
		qcow2_alloc_finish(m->q, &r->a, err);
	}
	/* the L2 entries reaching it (linked by this request, early at map
	 * time, or by another one whose batch has not written them yet) */
	if (err >= 0 && r->a.link_gen) {
		r->link_slice =
		    r->link_gen && r->link_slice != r->a.link_slice ? 0 : r->a.link_slice;
		if (r->a.link_gen > r->link_gen)
			r->link_gen = r->a.link_gen;
	}
	qcow2_io_end(m->q, r->wr_ticket);
	bounce_put(m, r->bounce);
	r->bounce = NULL;
	if (err >= 0)
		r->wr_done += r->a.len;
}

static void write_range(struct q2req *r, uint64_t off, uint64_t len, struct iovec *iov,
			unsigned iovcnt)
{
	r->wr_off = off;
	r->wr_len = len;
	r->wr_done = 0;
	r->wr_iov = iov;
	r->wr_iovcnt = iovcnt;
}

/* ---- the step function ---- */

static bool holds_write(uint8_t state)
{
	return state == RQ_INPLACE || state == RQ_COW_MAP || state == RQ_COW_IO ||
	       state == RQ_ZEROING || state == RQ_WRITING;
}

/*
 * The request driver: one struct q2req per request in flight, moved by one
 * function, step(r, res). Each state names what the request waits for;
 * whatever it waited for (an io/ command or all parts of a split one, a
 * read of the backing image, a metadata load, a flush, a post) calls step()
 * with the result (0 or -errno). step() then issues the next I/O and returns,
 * parks on the engine's waiter (a *_MAP state stays and is re-run when
 * woken: mapping is idempotent), or moves on at once.
 *
 *   START     --posted-->        READ_MAP | WRITE_MAP | ZERO_MAP | FLUSH,
 *                                or done (-EROFS, -EINVAL, nothing to do)
 *   READ_MAP  --mapped-->        READ_IO (parts issued) | READ_MAP (all
 *                                zero-filled here, more left) | done
 *   READ_IO   --parts done-->    READ_MAP
 *   WRITE_MAP --in place-->      INPLACE
 *             --allocated-->     COW_MAP (the token's head and tail)
 *             --range written--> done (write) | ZERO_MAP (zeroes, discard)
 *   INPLACE   --written-->       WRITE_MAP
 *   COW_MAP   --mapped-->        COW_IO | COW_MAP (as READ_MAP, on the old
 *                                content of the head and tail, unless zero)
 *             --all copied-->    ZEROING (some of it must read as zeroes) |
 *                                WRITING
 *   COW_IO    --parts done-->    COW_MAP
 *   ZEROING   --zeroed-->        WRITING
 *   WRITING   --written-->       WRITE_MAP (qcow2_alloc_finish links it;
 *                                fresh zero data: nothing to write)
 *   ZERO_MAP  --zero step-->     WRITE_MAP (zeroes to write) | PUNCH |
 *                                ZERO_MAP | done
 *   PUNCH     --punched-->       ZERO_MAP
 *   FLUSH     --flushed-->       done
 *
 *   *_MAP     --metadata miss--> the same state, parked on r->w
 *   *_MAP     --MAX_TURNS steps without I/O--> the same state, posted
 *   INPLACE, ZEROING --method unsupported / next chunk--> the same state
 *   any       --error-->         done (an allocation in progress is undone)
 *   IDLE      (on the free list: a step here is a bug, logged and ignored)
 *
 * A mapped write prefix (INPLACE, COW_MAP, COW_IO, ZEROING, WRITING) holds the
 * engine's ticket r->wr_ticket from its mapping to its end; an allocating
 * one (all but INPLACE) also holds the token r->a. READ_IO and COW_IO hold
 * r->rd_ticket while their parts are in flight.
 */
static void step(struct q2req *r, int res)
{
	struct q2img *m = r->m;
	struct img_io *io = r->io;
	uint64_t dl = 0;
	int ret;

	for (;;) {
		switch (r->state) {
		case RQ_START:
			res = res < 0 ? res : r->err;
			if (res == 0 && !m->q) {
				/* Inactive (handed over): the metadata is another
				 * process's; everything was flushed when we let go. */
				if (io->op == IMG_OP_FLUSH)
					goto done;
				res = -EIO;
			}
			if (res < 0)
				goto fail;
			if (io->op != IMG_OP_FLUSH && io->len == 0)
				goto done;
			switch (io->op) {
			case IMG_OP_READ:
				read_range(r, io->off, io->len, io->iov, io->iovcnt);
				r->state = RQ_READ_MAP;
				continue;
			case IMG_OP_WRITE:
				write_range(r, io->off, io->len, io->iov, io->iovcnt);
				r->state = RQ_WRITE_MAP;
				continue;
			case IMG_OP_DISCARD:
			case IMG_OP_WRITE_ZEROES:
				r->z_done = 0;
				r->state = RQ_ZERO_MAP;
				continue;
			case IMG_OP_FLUSH:
				r->state = RQ_FLUSH;
				r->flush.done = flush_done;
				r->flush.priv = r;
				qcow2_flush(m->q, &r->flush);
				return;
			default:
				res = -EINVAL;
				goto fail;
			}

		case RQ_READ_MAP:
		case RQ_COW_MAP:
			if (res < 0)
				goto fail;
			if (r->rd_done >= r->rd_len) {
				if (r->state == RQ_READ_MAP)
					goto done;
				if (r->cow_i < r->cow_n) {
					struct cow_range *c = &r->cow[r->cow_i++];

					read_range(r, c->off, c->iov.iov_len, &c->iov, 1);
					continue;
				}
				ret = alloc_fill(r); /* -> ZEROING or WRITING */
				if (ret < 0) {
					res = ret;
					goto fail;
				}
				if (ret > 0)
					return;
				continue; /* nothing to write: fresh space */
			}
			if (++r->turns > MAX_TURNS) {
				post(r);
				return;
			}
			ret = read_map(r);
			if (ret == -EAGAIN)
				return;
			if (ret < 0) {
				res = ret;
				goto fail;
			}
			if (ret > 0) {
				r->turns = 0;
				r->state = r->state == RQ_READ_MAP ? RQ_READ_IO : RQ_COW_IO;
				return;
			}
			continue; /* all zero-filled: map the rest */

		case RQ_READ_IO:
		case RQ_COW_IO:
			if (res < 0)
				goto fail;
			qcow2_io_end(m->q, r->rd_ticket);
			r->state = r->state == RQ_READ_IO ? RQ_READ_MAP : RQ_COW_MAP;
			continue;

		case RQ_WRITE_MAP:
			if (res < 0)
				goto fail;
			if (r->wr_done >= r->wr_len) {
				if (io->op == IMG_OP_WRITE)
					goto done;
				r->z_done += r->wr_len;
				r->state = RQ_ZERO_MAP;
				continue;
			}
			if (++r->turns > MAX_TURNS) {
				post(r);
				return;
			}
			r->wr_ticket = qcow2_io_begin(m->q);
			ret = qcow2_map_write(m->q, r->wr_off + r->wr_done, r->wr_len - r->wr_done,
					      &r->a, &r->w);
			if (ret < 0) {
				qcow2_io_end(m->q, r->wr_ticket);
				if (ret == -EAGAIN)
					return;
				res = ret;
				goto fail;
			}
			r->turns = 0;
			if (ret == QCOW2_WRITE_INPLACE) {
				if (publishing(m, r))
					publish_inplace(m, r, r->a.off, r->a.len, r->a.host);
				r->state = RQ_INPLACE;
				ret = inplace_issue(r);
				if (ret < 0) {
					res = ret;
					goto fail;
				}
				return;
			}
			r->state = RQ_COW_MAP;
			ret = cow_plan(r);
			if (ret < 0) {
				res = ret;
				goto fail;
			}
			continue;

		case RQ_INPLACE:
		case RQ_ZEROING:
			if (r->zr_len) {
				/* zeroing: the next method or chunk, or done */
				res = zero_more(r, res);
				if (res > 0)
					return;
			}
			if (res < 0)
				goto fail;
			if (r->state == RQ_INPLACE) {
				write_end(r, 0);
				r->state = RQ_WRITE_MAP;
				continue;
			}
			r->state = RQ_WRITING;
			ret = alloc_write(r);
			if (ret < 0) {
				res = ret;
				goto fail;
			}
			if (ret > 0)
				return;
			continue; /* nothing to write: fresh space */

		case RQ_WRITING:
			if (res < 0)
				goto fail;
			write_end(r, 0);
			r->state = RQ_WRITE_MAP;
			continue;

		case RQ_ZERO_MAP:
			if (res < 0)
				goto fail;
			if (r->z_done >= io->len)
				goto done;
			if (++r->turns > MAX_TURNS) {
				post(r);
				return;
			}
			if (io->flags & IMG_IO_FULL)
				ret = qcow2_discard_full_step(m->q, io->off + r->z_done,
							      io->len - r->z_done, &dl, &r->w);
			else
				ret =
				    qcow2_zero_step(m->q, io->off + r->z_done, io->len - r->z_done,
						    io->op == IMG_OP_WRITE_ZEROES,
						    (io->flags & IMG_IO_UNMAP) != 0, &dl, &r->w);
			if (ret == -EAGAIN)
				return;
			if (ret < 0) {
				res = ret;
				goto fail;
			}
			if (ret == QCOW2_Z_DONE) {
				r->link_gen = qcow2_meta_gen(m->q);
				r->link_slice = 0;
			}
			if (ret == QCOW2_Z_WRITE) {
				write_range(r, io->off + r->z_done, dl, NULL, 0);
				r->state = RQ_WRITE_MAP;
				continue;
			}
			if (ret == QCOW2_Z_DONE && m->has_dfile &&
			    (io->op == IMG_OP_DISCARD || m->data_raw)) {
				/* external data file: give the space back, keep a raw one raw */
				bool zr = io->op == IMG_OP_WRITE_ZEROES &&
					  !(io->flags & IMG_IO_UNMAP) &&
					  !(m->dfile.flags & IO_FILE_NO_ZERO_RANGE);

				r->z_len = dl;
				r->state = RQ_PUNCH;
				r->turns = 0;
				r->cmd.done = cmd_done;
				r->cmd.priv = r;
				r->pending = 1;
				io_fallocate(m->img.loop, &r->cmd, &m->dfile,
					     (zr ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) |
						 FALLOC_FL_KEEP_SIZE,
					     io->off + r->z_done, dl);
				return;
			}
			r->z_done += dl;
			continue;

		case RQ_PUNCH:
			/* a discard is a hint; a data file that cannot punch is fine */
			if (res < 0 && res != -EOPNOTSUPP && res != -ENOTSUP && res != -ENOSYS)
				goto fail;
			res = 0;
			r->z_done += r->z_len;
			r->state = RQ_ZERO_MAP;
			continue;

		case RQ_FLUSH:
			goto done;

		case RQ_IDLE:
		default:
			/*
			 * A completion for a context on the free list (or a state
			 * that does not exist): a bug. Its img_io is gone; say so
			 * and leave it alone rather than complete someone else's.
			 */
			vlog(VLOG_ERROR, m->img.path, "request driver stepped in state %u (res %d)",
			     r->state, res);
			return;
		}
	}

fail:
	if (r->state == RQ_READ_IO || r->state == RQ_COW_IO)
		qcow2_io_end(m->q, r->rd_ticket);
	if (holds_write(r->state))
		write_end(r, res);
done:
	complete(r, res);
}

/* ---- request entry ---- */

static void nomem_done(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;

	(void)res;
	io->done(io, -ENOMEM);
}

static void submit_owner(struct q2img *m, struct img_io *io, bool remote);

/* ---- the fast path: the submitter's side ---- */

/* This thread's slot (claimed on its first request), or NULL: all taken. */
static struct fslot *slot_of(struct q2img *m, struct io_loop *loop)
{
	for (unsigned i = 0; i < FSLOTS; i++) {
		struct fslot *s = &m->slots[i];
		struct io_loop *l = __atomic_load_n(&s->loop, __ATOMIC_ACQUIRE);

		if (l == loop)
			return s;
		if (!l && __atomic_compare_exchange_n(&s->loop, &l, loop, false, __ATOMIC_ACQ_REL,
						      __ATOMIC_ACQUIRE)) {
			__atomic_fetch_add(&m->nclaimed, 1, __ATOMIC_RELAXED);
			return s;
		}
		if (l == loop)
			return s;
	}
	return NULL;
}

static void fast_ticket_end(struct q2img *m, struct fslot *s, unsigned t);

/* Test seam (img_test_ticket_hold): every 4th ticket of a thread waits between its two reads. */
static void ticket_hold(unsigned us)
{
	static _Thread_local unsigned n;

	if (n++ % 4 == 0)
		usleep(us);
}

/*
 * A fast ticket of the current generation (see struct fslot), which is *gen.
 * An increment that landed in a generation the owner flipped away from
 * meanwhile is given back as a ticket is (fast_ticket_end): the owner's flip
 * may have counted it, and then waits for a wake-up that only the end of an
 * old-generation ticket posts (a bare decrement left its grace period, so
 * every later reuse of freed clusters, waiting for ever, and the write-back
 * at close with it: integration.fastpub "ticket_retry").
 */
static unsigned fast_ticket(struct q2img *m, struct fslot *s, unsigned *gen)
{
	for (;;) {
		unsigned g = __atomic_load_n(&m->fgen, __ATOMIC_SEQ_CST);
		unsigned hold = __atomic_load_n(&test_ticket_hold_us, __ATOMIC_RELAXED);

		__atomic_fetch_add(&s->active[g & 1], 1, __ATOMIC_SEQ_CST);
		if (hold)
			ticket_hold(hold);
		if (__atomic_load_n(&m->fgen, __ATOMIC_SEQ_CST) == g) {
			*gen = g;
			return g & 1;
		}
		fast_ticket_end(m, s, g & 1);
	}
}

static void fast_ticket_end(struct q2img *m, struct fslot *s, unsigned t)
{
	if (__atomic_sub_fetch(&s->active[t], 1, __ATOMIC_SEQ_CST) == 0 &&
	    (__atomic_load_n(&m->fgen, __ATOMIC_SEQ_CST) & 1) != t &&
	    __atomic_load_n(&m->ext_wait, __ATOMIC_SEQ_CST) &&
	    !__atomic_exchange_n(&s->wake_posted, true, __ATOMIC_SEQ_CST)) {
		s->wake_cmd.done = fast_wake;
		s->wake_cmd.priv = s;
		io_post_remote(m->img.loop, &s->wake_cmd);
	}
}

static uint64_t ft_load(struct q2img *m, uint64_t gc)
{
	uint64_t *pg = ft_page(m, gc);

	return pg ? __atomic_load_n(&pg[gc & ((1u << FT_BITS) - 1)], __ATOMIC_SEQ_CST) : 0;
}

static void *fbuf_get(struct q2img *m, struct fslot *s)
{
	return s->nbufs ? s->bufs[--s->nbufs] : io_alloc_aligned(2 * m->cs);
}

/*
 * Kept for the next requests, as many as a queue depth of compressed reads
 * uses at once (a bytes buffer and an inflate buffer each; freeing and
 * allocating them per read costs page faults), within FBUF_BUDGET.
 */
static void fbuf_put(struct q2img *m, struct fslot *s, void *b)
{
	if (!b)
		return;
	if (s->nbufs < FBUFS && (s->nbufs < 4 || (s->nbufs + 1) * 2 * m->cs <= FBUF_BUDGET))
		s->bufs[s->nbufs++] = b;
	else
		io_free_aligned(b);
}

/* Test seam: a read of compressed bytes failed on purpose (zread_fails()). */
static void zfail_fast(struct io_cmd *cmd, int res)
{
	struct q2fast *f = cmd->priv;

	(void)res;
	f->zdone(cmd, -EIO);
}

/* Read the compressed bytes [host, host + clen) into @f->cbuf (comp_span); f->cmd.done set. */
static void comp_read(struct q2img *m, struct q2fast *f, uint64_t host, uint32_t clen)
{
	struct fslot *s = f->s;
	uint64_t start;
	size_t len = comp_span(m, host, clen, &start, &f->cskip);

	__atomic_store_n(&s->n_zc_reads, s->n_zc_reads + 1, __ATOMIC_RELAXED);
	f->clen = clen;
	if (zread_fails()) {
		f->zdone = f->cmd.done;
		f->cmd.done = zfail_fast;
		io_post(f->io->loop, &f->cmd);
		return;
	}
	io_read(f->io->loop, &f->cmd, &m->file, f->cbuf, len, start);
}

/* Inflate what comp_read() read (@res: its result) into @out. */
static int comp_inflate(struct q2img *m, struct q2fast *f, int res, void *out)
{
	if (res < 0)
		return res;
	return qcow2_decompress_type(__atomic_load_n(&m->ctype, __ATOMIC_RELAXED),
				     (uint8_t *)f->cbuf + f->cskip,
				     comp_avail(res, f->cskip, f->clen), out, m->cs);
}

/* The one end of a fast request. */
static void fast_end(struct q2fast *f, int res)
{
	struct fslot *s = f->s;
	struct q2img *m = s->m;
	struct img_io *io = f->io;

	fast_ticket_end(m, s, f->ticket);
	fbuf_put(m, s, f->cbuf);
	fbuf_put(m, s, f->ibuf);
	f->cbuf = f->ibuf = NULL;
	f->next = s->free;
	s->free = f;
	remote_end(m, s);
	io->done(io, res < 0 ? res : 0);
}

static void fast_done(struct io_cmd *cmd, int res)
{
	struct q2fast *f = cmd->priv;
	struct fslot *s = f->s;
	struct q2img *m = s->m;

	if (res >= 0 && f->cbuf) {
		res = comp_inflate(m, f, res, f->ibuf);
		if (res < 0) {
			vlog(VLOG_ERROR, m->img.path, "compressed cluster data is corrupt");
		} else {
			__atomic_store_n(&s->n_inflated, s->n_inflated + 1, __ATOMIC_RELAXED);
			io_iov_from_buf(f->io->iov, f->io->iovcnt, 0, (uint8_t *)f->ibuf + f->coff,
					(size_t)f->io->len);
		}
	}
	fast_end(f, res);
}

/* A read served from an inflated cluster (copied at submission) ends. */
static void fast_hit_done(struct io_cmd *cmd, int res)
{
	(void)res;
	fast_end(cmd->priv, 0);
}

/*
 * A waiter of a cache entry whose read failed (@res) reads the bytes itself,
 * uncached (it still holds its ticket: they are still the cluster's), and
 * fails only if that read fails.
 */
static void fzc_retry(struct q2img *m, struct fslot *s, struct q2fast *w, uint64_t host,
		      uint32_t clen, int res)
{
	w->cbuf = fbuf_get(m, s);
	w->ibuf = fbuf_get(m, s);
	if (!w->cbuf || !w->ibuf) {
		fast_end(w, res);
		return;
	}
	w->cmd.done = fast_done;
	w->cmd.priv = w;
	comp_read(m, w, host, clen);
}

/* The compressed bytes of a cache entry arrived: inflate, serve its readers. */
static void fzc_filled(struct io_cmd *cmd, int res)
{
	struct q2fast *f = cmd->priv, *w;
	struct fslot *s = f->s;
	struct q2img *m = s->m;
	struct fzc_ent *e = f->ze;
	uint64_t host = e->host;
	uint32_t clen = e->clen;

	if (res >= 0) {
		res = comp_inflate(m, f, res, e->buf);
		if (res < 0)
			vlog(VLOG_ERROR, m->img.path, "compressed cluster data is corrupt");
		else
			__atomic_store_n(&s->n_inflated, s->n_inflated + 1, __ATOMIC_RELAXED);
	}
	fbuf_put(m, s, f->cbuf);
	f->cbuf = NULL;
	f->ze = NULL;
	e->state = res < 0 ? FZ_EMPTY : FZ_VALID;
	w = e->waiters;
	e->waiters = NULL;
	f->next = w;
	/* done() of one may submit more, never inflate more here: e stays put.
	 * A failure fails the leader; each waiter tries again (fzc_retry). */
	for (w = f; w;) {
		struct q2fast *next = w->next;

		if (res >= 0)
			io_iov_from_buf(w->io->iov, w->io->iovcnt, 0, (uint8_t *)e->buf + w->coff,
					(size_t)w->io->len);
		if (res >= 0 || w == f)
			fast_end(w, res);
		else
			fzc_retry(m, s, w, host, clen, res);
		w = next;
	}
}

/*
 * A 4K read of compressed cluster [host, host + clen) with a ticket of
 * generation @gen: served from the thread's inflated clusters, or waiting
 * for the same bytes already on their way, or reading them into a new
 * entry. False: no entry free (all being filled), read it uncached.
 */
static bool fzc_try(struct q2img *m, struct fslot *s, struct q2fast *f, uint64_t host,
		    uint32_t clen, unsigned gen)
{
	unsigned epoch = __atomic_load_n(&m->fepoch, __ATOMIC_ACQUIRE);
	struct img_io *io = f->io;
	struct fzc_ent *v = NULL;

	if (!s->zc && !(s->zc = calloc(m->zc_n, sizeof(*s->zc))))
		return false;
	for (unsigned i = 0; i < m->zc_n; i++) {
		struct fzc_ent *e = &s->zc[i];
		bool live = e->state != FZ_EMPTY && e->gen == gen && e->epoch == epoch;

		if (live && e->host == host && e->clen == clen) {
			__atomic_store_n(&s->n_zc_hits, s->n_zc_hits + 1, __ATOMIC_RELAXED);
			e->last = ++s->zc_tick;
			if (e->state == FZ_FILLING) {
				__atomic_store_n(&s->n_zc_joins, s->n_zc_joins + 1,
						 __ATOMIC_RELAXED);
				f->next = e->waiters;
				e->waiters = f;
				return true;
			}
			io_iov_from_buf(io->iov, io->iovcnt, 0, (uint8_t *)e->buf + f->coff,
					(size_t)io->len);
			f->cmd.done = fast_hit_done;
			f->cmd.priv = f;
			io_post(io->loop, &f->cmd); /* done() never inside submit */
			return true;
		}
		if (e->state == FZ_FILLING)
			continue;
		/* a victim: empty or stale first, then the least recently used */
		if (!live)
			e->last = 0;
		if (!v || e->last < v->last)
			v = e;
	}
	if (!v || (!v->buf && !(v->buf = io_alloc_aligned(m->cs))) || !(f->cbuf = fbuf_get(m, s)))
		return false;
	*v = (struct fzc_ent){host, clen, FZ_FILLING, gen, epoch, ++s->zc_tick, v->buf, NULL};
	f->ze = v;
	f->cmd.done = fzc_filled;
	f->cmd.priv = f;
	comp_read(m, f, host, clen);
	return true;
}

/* Test seam: a fast write held back with its ticket, now issued. */
static void fast_delayed(struct io_cmd *cmd, int res)
{
	struct q2fast *f = cmd->priv;
	struct img_io *io = f->io;

	(void)res;
	f->cmd.done = fast_done;
	io_writev(io->loop, &f->cmd, data_file(f->s->m), io->iov, io->iovcnt, f->host);
}

/*
 * A read or write whose clusters are all in the table (host-contiguous; a
 * write only to clusters written in place; a compressed one read within its
 * cluster): issue it here. False: the owner must do it.
 */
static bool fast_try(struct q2img *m, struct fslot *s, struct img_io *io)
{
	unsigned mode = __atomic_load_n(&m->fmode, __ATOMIC_ACQUIRE);
	uint64_t first, last, e0, host;
	struct q2fast *f;
	unsigned t, gen;

	if (!(mode & FM_READ) || !io->len ||
	    (io->op != IMG_OP_READ && (io->op != IMG_OP_WRITE || !(mode & FM_WRITE))))
		return false;
	first = io->off >> m->cb;
	last = (io->off + io->len - 1) >> m->cb;
	if (last - first >= 16 || last >= __atomic_load_n(&m->ft_n, __ATOMIC_ACQUIRE))
		return false;
	f = s->free;
	if (!f) {
		f = calloc(1, sizeof(*f));
		if (!f)
			return false;
		f->s = s;
	} else {
		s->free = f->next;
	}
	t = fast_ticket(m, s, &gen);
	e0 = ft_load(m, first);
	if (e0 & FE_COMP) {
		uint64_t chost = e0 & ((1ull << FE_CHOST_BITS) - 1);
		uint32_t clen = (uint32_t)((e0 >> FE_CHOST_BITS) & (FE_CLEN_MAX - 1));

		if (io->op != IMG_OP_READ || first != last || clen > 2 * m->cs)
			goto miss;
		f->coff = (uint32_t)(io->off & (m->cs - 1));
		f->ticket = t;
		f->io = io;
		if (fzc_try(m, s, f, chost, clen, gen))
			return true;
		f->cbuf = fbuf_get(m, s);
		f->ibuf = fbuf_get(m, s);
		if (!f->cbuf || !f->ibuf)
			goto miss;
		f->coff = (uint32_t)(io->off & (m->cs - 1));
		f->ticket = t;
		f->io = io;
		f->cmd.done = fast_done;
		f->cmd.priv = f;
		comp_read(m, f, chost, clen);
		return true;
	}
	if (e0 == FE_ZERO) {
		/* every cluster reads as zeroes: no I/O, done from the loop */
		if (io->op != IMG_OP_READ)
			goto miss;
		for (uint64_t gc = first + 1; gc <= last; gc++)
			if (ft_load(m, gc) != FE_ZERO)
				goto miss;
		io_iov_memset(io->iov, io->iovcnt, 0, 0, (size_t)io->len);
		f->ticket = t;
		f->io = io;
		f->cmd.done = fast_hit_done;
		f->cmd.priv = f;
		io_post(io->loop, &f->cmd);
		return true;
	}
	if (!(e0 & FE_DATA) || (io->op == IMG_OP_WRITE && !(e0 & FE_RW)))
		goto miss;
	host = e0 & FE_HOST_MASK;
	for (uint64_t gc = first + 1; gc <= last; gc++) {
		uint64_t e = ft_load(m, gc);

		if (!(e & FE_DATA) || (io->op == IMG_OP_WRITE && !(e & FE_RW)) ||
		    (e & FE_HOST_MASK) != host + ((gc - first) << m->cb))
			goto miss;
	}
	host += io->off & (m->cs - 1);
	f->ticket = t;
	f->io = io;
	f->cmd.done = fast_done;
	f->cmd.priv = f;
	if (io->op == IMG_OP_READ) {
		io_readv(io->loop, &f->cmd, data_file(m), io->iov, io->iovcnt, host);
	} else if (__atomic_load_n(&test_delay_ms, __ATOMIC_RELAXED) && ++s->nwrites % 4 == 0) {
		f->host = host;
		f->cmd.done = fast_delayed;
		io_timeout(io->loop, &f->cmd,
			   __atomic_load_n(&test_delay_ms, __ATOMIC_RELAXED) * 1000000ull);
	} else {
		io_writev(io->loop, &f->cmd, data_file(m), io->iov, io->iovcnt, host);
	}
	return true;

miss:
	fast_ticket_end(m, s, t);
	fbuf_put(m, s, f->cbuf);
	fbuf_put(m, s, f->ibuf);
	f->cbuf = f->ibuf = NULL;
	f->next = s->free;
	s->free = f;
	return false;
}

/* On the owner: a request submitted on another thread arrives. */
static void hop_in(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;

	(void)res;
	submit_owner(io->impl, io, true);
}

static void q2_submit(struct img *img, struct img_io *io)
{
	struct q2img *m = (struct q2img *)img;
	struct fslot *s;

	if (!io->loop || io->loop == img->loop || io_loop_current() != io->loop) {
		submit_owner(m, io, false);
		return;
	}
	/* On another loop's thread: serve it here if the table knows its clusters. */
	s = slot_of(m, io->loop);
	__atomic_fetch_add(s ? &s->inflight : &m->remote_inflight, 1, __ATOMIC_SEQ_CST);
	if (s && fast_try(m, s, io)) {
		__atomic_store_n(&s->n_fast, s->n_fast + 1, __ATOMIC_RELAXED);
		return;
	}
	if (s)
		__atomic_store_n(&s->n_hops, s->n_hops + 1, __ATOMIC_RELAXED);
	io->impl = m;
	io->cmd.done = hop_in;
	io->cmd.priv = io;
	io_post_remote(img->loop, &io->cmd);
}

static void nomem_finish(struct io_cmd *cmd, int res)
{
	struct img_io *io = cmd->priv;

	(void)res;
	io_finish(io->impl, io, true, -ENOMEM);
}

/*
 * The engine's path, on the owner. @remote: submitted on another thread
 * (hop_in, already from the loop), which gets done() back (io_finish).
 */
static void submit_owner(struct q2img *m, struct img_io *io, bool remote)
{
	struct img *img = &m->img;
	struct q2req *r = req_get(m);
	bool write =
	    io->op == IMG_OP_WRITE || io->op == IMG_OP_DISCARD || io->op == IMG_OP_WRITE_ZEROES;

	if (!r) {
		/* no context: fail through the io's own command, still from the loop */
		io->cmd.done = remote ? nomem_finish : nomem_done;
		io->cmd.priv = io;
		io->impl = m;
		io_post(img->loop, &io->cmd);
		return;
	}
	m->inflight++;
	r->io = io;
	r->remote = remote;
	r->mut = false;
	if (write) {
		/* It may change mappings: its clusters are not fast until it ends. */
		ft_clear(m, io->off, io->len);
		r->mut = true;
		r->mut_next = m->muts;
		r->mut_pprev = &m->muts;
		if (m->muts)
			m->muts->mut_pprev = &r->mut_next;
		m->muts = r;
	}
	r->state = RQ_START;
	r->w.wake = engine_wake;
	r->w.priv = r;
	r->pending = 0;
	r->err = 0;
	r->link_gen = 0;
	r->link_slice = 0;
	r->pub_len = 0;
	io->impl = r;
	/* the one entry of write-type requests (write, write-zeroes, discard) */
	if (write && !img_may_write(img))
		r->err = -EROFS;
	else if (io->op != IMG_OP_FLUSH && (io->off > img->size || io->len > img->size - io->off))
		r->err = -EINVAL;
	else if (write && !(io->flags & IMG_IO_FULL))
		qcow2_bitmap_mark(m->q, io->off, io->len);
	/* always start from the loop: done() must never run inside submit */
	if (remote) {
		r->turns = 0;
		step(r, 0); /* from hop_in: the loop already */
		return;
	}
	post(r);
}

/* ---- open / close ---- */

static void q2_close(struct img *img)
{
	struct q2img *m = (struct q2img *)img;
	int ret;

	fast_off(m);
	ret = qcow2_close(m->q);
	if (ret < 0)
		vlog(VLOG_ERROR, img->path, "writing metadata back at close failed: %s",
		     strerror(-ret));
	img_close(m->backing);
	if (m->zah_keep.open)
		io_file_close(&m->zah_keep.file);
	io_file_close(&m->file);
	if (m->own_dfile)
		io_file_close(&m->dfile);
	req_free_all(m);
	free(m->dfile_name);
	for (unsigned i = 0; i < ZC_MAX; i++)
		io_free_aligned(m->zc[i].buf);
	io_free_aligned(m->zero_buf);
	fast_free(m);
	free(m->snaps);
	free(img->path);
	free(m);
}

static void q2_describe(struct img *img, char *buf, size_t len)
{
	struct q2img *m = (struct q2img *)img;
	struct zc_count zc, zown;
	uint64_t hits, hops;
	size_t n;

	if (m->q)
		qcow2_describe(m->q, buf, len);
	else
		snprintf(buf, len, "qcow2 (inactive: no lock held, no metadata cached)");
	n = strlen(buf);
	zc_counts(m, &zc, &zown);
	if ((zc.inflated || zc.hits || zc.reads) && n + 1 < len) {
		snprintf(
		    buf + n, len - n,
		    ", %llu compressed clusters inflated, %llu reads from them, %llu compressed "
		    "reads (owner %llu), %llu joined one in flight (owner %llu)",
		    (unsigned long long)zc.inflated, (unsigned long long)zc.hits,
		    (unsigned long long)zc.reads, (unsigned long long)zown.reads,
		    (unsigned long long)zc.joins, (unsigned long long)zown.joins);
		n = strlen(buf);
	}
	fast_counts(m, &hits, &hops);
	if ((hits || hops) && n + 1 < len) {
		snprintf(buf + n, len - n, ", fast path: %llu hits, %llu hops",
			 (unsigned long long)hits, (unsigned long long)hops);
		n = strlen(buf);
	}
	if (m->backing && n + 16 < len) {
		snprintf(buf + n, len - n, ", backing: ");
		n = strlen(buf);
		img_describe(m->backing, buf + n, len - n);
	}
}

/* Locks of every file of the image for @perm (see q2_set_perm); undone on failure. */
static int lock_all(struct q2img *m, enum img_perm perm, enum img_perm old, char *err,
		    size_t errlen)
{
	struct img *img = &m->img;
	enum img_file_role role = img->backing ? IMG_FILE_BACKING : IMG_FILE_QCOW2;
	int ret;

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
	return 0;

undo_dfile:
	if (m->has_dfile)
		img_file_lock(&m->dfile, m->dfile_name, role, old, img->force_share, NULL, 0);
undo_file:
	img_file_lock(&m->file, img->path, role, old, img->force_share, NULL, 0);
	return ret;
}

static void snap_copy(struct img_snapshot *o, const struct qcow2_snap_desc *s)
{
	snprintf(o->id, sizeof(o->id), "%s", s->id);
	snprintf(o->name, sizeof(o->name), "%s", s->name);
	o->vm_state_size = s->vm_state_size;
	o->date_sec = s->date_sec;
	o->date_nsec = s->date_nsec;
	o->vm_clock_nsec = s->vm_clock_nsec;
	o->icount = s->icount;
}

/* Read the snapshot table (after an engine open: synchronous I/O, outside the loop). */
static void snaps_reload(struct q2img *m)
{
	struct qcow2_snap_desc *l = NULL;
	uint32_t n = 0;

	free(m->snaps);
	m->snaps = NULL;
	m->nsnaps = 0;
	if (!m->q || qcow2_snapshot_list(m->q, &l, &n) < 0 || !n) {
		free(l);
		return;
	}
	m->snaps = calloc(n, sizeof(*m->snaps));
	for (uint32_t i = 0; m->snaps && i < n; i++)
		snap_copy(&m->snaps[i], &l[i]);
	if (m->snaps)
		m->nsnaps = n;
	free(l);
}

static int q2_snapshot_list(struct img *img, const struct img_snapshot **list, unsigned *n)
{
	struct q2img *m = (struct q2img *)img;

	*list = m->snaps;
	*n = m->nsnaps;
	return 0;
}

/*
 * Open the engine afresh: header, L1, refcount and snapshot tables, bitmaps
 * are read again from the file (another process may have changed them while
 * we did not hold the write lock).
 */
static int engine_open(struct q2img *m, bool read_only, char *err, size_t errlen)
{
	struct qcow2_opts qo = m->qo;
	int ret;

	qo.read_only = read_only;
	ret = qcow2_open(&m->q, m->img.loop, &m->file, m->img.path, &qo, err, errlen);
	if (ret < 0) {
		m->q = NULL;
		return ret;
	}
	if (m->has_dfile)
		qcow2_set_data_file(m->q, &m->dfile);
	if (m->backing)
		qcow2_set_backing_size(m->q, m->backing->size);
	qcow2_set_fills_whole(m->q, m->pad);
	m->img.size = qcow2_size(m->q);
	/* another process may have rewritten the file meanwhile */
	zc_drop(m, 0, UINT64_MAX);
	snaps_reload(m);
	fast_engine(m);
	return 0;
}

/* -EBUSY, saying how many requests are still in flight. */
static int busy_err(struct q2img *m, char *err, size_t errlen)
{
	if (err)
		snprintf(err, errlen, "%s: %u request(s) still in flight", m->img.path,
			 busy_count(m));
	return -EBUSY;
}

/*
 * With nothing in flight: the fast path off, the engine written back and
 * closed (its free clusters in *@freed if not NULL, for the next engine).
 * -errno with @err set if the write-back failed; closed either way.
 */
static int engine_stop(struct q2img *m, struct qcow2_freed **freed, char *err, size_t errlen)
{
	int ret;

	fast_off(m);
	ret = freed ? qcow2_close_free(m->q, freed) : qcow2_close(m->q);
	m->q = NULL;
	if (ret < 0 && err)
		snprintf(err, errlen, "%s: writing metadata back failed: %s", m->img.path,
			 strerror(-ret));
	return ret;
}

/*
 * After an edit of the closed image (@ret its result): the engine opened
 * again read-write. A failure to reopen is logged, and is the result if
 * the edit itself succeeded.
 */
static int engine_restart(struct q2img *m, int ret, const char *what, char *err, size_t errlen)
{
	char rerr[300] = "";
	int r2 = engine_open(m, false, rerr, sizeof(rerr));

	if (r2 < 0) {
		vlog(VLOG_ERROR, m->img.path, "reopening the image after %s failed: %s", what,
		     rerr);
		if (ret == 0) {
			if (err)
				snprintf(err, errlen, "%s", rerr);
			ret = r2;
		}
	}
	return ret;
}

/*
 * Locks of the image file and its external data file (same role), then the
 * backing image: READ while we hold READ or WRITE, nothing while NONE.
 *
 * Live migration on shared storage hands the image from one process to
 * another. Giving up WRITE (a read-write image): every request must have
 * ended (-EBUSY otherwise); the engine writes all dirty metadata back and
 * stores its bitmaps (qcow2_close) and is released, so nothing of the
 * image's metadata stays cached; then the locks go. The image is then
 * inactive: reads fail (-EIO), writes -EROFS, flushes succeed (nothing is
 * unwritten). Taking WRITE again: the locks first, then the engine is
 * opened afresh (header, L1, refcounts re-read). READ on an inactive image
 * only takes the locks (the engine stays closed until WRITE). The engine
 * drives the loop while it closes/opens: never call this from inside a loop
 * callback.
 */
static int q2_set_perm(struct img *img, enum img_perm perm, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	enum img_perm old = img->perm;
	bool release = m->q && !img->read_only && old == IMG_PERM_WRITE && perm != IMG_PERM_WRITE;
	/* A read-only image opened inactive gets its (read-only) engine with READ. */
	bool take = !m->q && (perm == IMG_PERM_WRITE || (img->read_only && perm == IMG_PERM_READ));
	int ret;

	if (release) {
		if (busy_count(m))
			return busy_err(m, err, errlen);
		ret = engine_stop(m, NULL, err, errlen);
		if (ret < 0) {
			/* Still ours: keep serving it as before. */
			engine_open(m, false, NULL, 0);
			return ret;
		}
	}
	ret = lock_all(m, perm, old, err, errlen);
	if (ret < 0) {
		if (release)
			engine_open(m, false, NULL, 0);
		return ret;
	}
	img->perm = perm;
	if (take) {
		ret = engine_open(m, img->read_only, err, errlen);
		if (ret < 0) {
			lock_all(m, old, perm, NULL, 0);
			img->perm = old;
			return ret;
		}
	}
	fast_mode_update(m);
	return 0;
}

/*
 * Internal snapshot (img_snapshot): with no request in flight, the engine
 * writes everything back and closes (as a flush would make it durable), the
 * snapshot is written on the file (qcow2_snapshot_file), and the engine is
 * opened afresh on the result (tables, caches, bitmaps read again).
 */
static int q2_snapshot(struct img *img, bool create, const char *id, const char *name,
		       struct img_snapshot *out, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	struct qcow2_freed *freed = NULL;
	struct qcow2_snap_desc sn;
	int ret;

	if (!m->q) {
		snprintf(err, errlen, "%s: the image is inactive", img->path);
		return -EIO;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	memset(&sn, 0, sizeof(sn));
	if (create) {
		struct timespec ts;

		snprintf(sn.name, sizeof(sn.name), "%s", name);
		clock_gettime(CLOCK_REALTIME, &ts);
		sn.date_sec = (uint32_t)ts.tv_sec;
		sn.date_nsec = (uint32_t)(ts.tv_nsec / 1000 * 1000); /* QEMU: microseconds */
		sn.icount = -1;
		/* qemu-storage-daemon records its virtual clock, which without a
		 * guest is the host's: the same instant as the date. */
		sn.vm_clock_nsec = (uint64_t)sn.date_sec * 1000000000ull + sn.date_nsec;
	}
	ret = engine_stop(m, &freed, err, errlen); /* free clusters: to the next engine */
	if (ret == 0)
		ret = qcow2_snapshot_file(&m->file, img->path, create ? 'c' : 'd', &sn, id, name,
					  &freed, err, errlen);
	ret = engine_restart(m, ret, "a snapshot", err, errlen);
	qcow2_adopt_freed(m->q, freed); /* punched and reused in the background */
	snap_copy(out, &sn);
	return ret;
}

/* Persistent dirty bitmaps changed the way q2_snapshot changes snapshots. */
static int q2_bitmap_edit(struct img *img, char op, const char *name, uint32_t granularity,
			  bool disabled, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	int ret;

	if (!m->q) {
		snprintf(err, errlen, "%s: the image is inactive", img->path);
		return -EIO;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	if (op == 'E' || op == 'D') { /* a read-only node's, in memory */
		ret = qcow2_bitmap_ro_enable(m->q, name, op == 'E');
		if (ret < 0)
			snprintf(err, errlen, "%s: bitmap '%s': %s", img->path, name,
				 strerror(-ret));
		return ret;
	}
	if (op == 'S') { /* store the tracked ones now: the node becomes read-only */
		ret = qcow2_bitmap_freeze(m->q);
		if (ret < 0)
			snprintf(err, errlen, "%s: storing the persistent dirty bitmaps: %s",
				 img->path, strerror(-ret));
		return ret;
	}
	ret = engine_stop(m, NULL, err, errlen);
	if (ret == 0)
		ret = qcow2_bitmap_file(&m->file, img->path, op, name, granularity, disabled, err,
					errlen);
	return engine_restart(m, ret, "a bitmap change", err, errlen);
}

/* A merge into a disabled persistent bitmap: the same path with the bits. */
static int q2_bitmap_merge(struct img *img, const char *name, const uint8_t *bits, uint64_t nbytes,
			   char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	int ret;

	if (!m->q) {
		snprintf(err, errlen, "%s: the image is inactive", img->path);
		return -EIO;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	ret = engine_stop(m, NULL, err, errlen);
	if (ret == 0)
		ret = qcow2_bitmap_merge_file(&m->file, img->path, name, bits, nbytes, err, errlen);
	return engine_restart(m, ret, "a bitmap merge", err, errlen);
}

/*
 * The external snapshot's old active layer becomes a backing file (and
 * block-commit's base a writer again) without closing anything: the same
 * file descriptions change their locks, the engine stops or resumes
 * writing. Locks first when taking the write permission (nothing changes
 * if another process holds a conflicting lock), the engine first when
 * giving it up (nothing is written once the lock is gone).
 */
static int q2_set_writable(struct img *img, bool writable, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	bool was_backing = img->backing, was_ro = img->read_only;
	int ret;

	if (writable == !img->read_only && img->backing == !writable)
		return 0;
	if (!m->q || img->perm == IMG_PERM_NONE) {
		if (err)
			snprintf(err, errlen, "%s: image is inactive", img->path);
		return -EBUSY;
	}
	if (writable) {
		if (m->file.flags & IO_FILE_RDONLY) {
			if (err)
				snprintf(
				    err, errlen,
				    "%s: opened read-only (reopening a backing file read-write "
				    "is not supported)",
				    img->path);
			return -EROFS;
		}
		img->backing = false;
		ret = lock_all(m, IMG_PERM_WRITE, img->perm, err, errlen);
		if (ret == 0)
			ret = qcow2_set_read_only(m->q, false);
		if (ret < 0) {
			img->backing = was_backing;
			lock_all(m, img->perm, IMG_PERM_WRITE, NULL, 0);
			if (err && ret == -EROFS)
				snprintf(err, errlen, "%s: the engine was opened read-only",
					 img->path);
			return ret;
		}
		img->perm = IMG_PERM_WRITE;
		img->read_only = false;
		fast_mode_update(m);
		return 0;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	__atomic_store_n(&m->fmode, __atomic_load_n(&m->fmode, __ATOMIC_RELAXED) & ~FM_WRITE,
			 __ATOMIC_SEQ_CST);
	ret = qcow2_set_read_only(m->q, true);
	if (ret < 0) {
		fast_mode_update(m);
		if (err && ret == -ENOTSUP)
			snprintf(
			    err, errlen,
			    "%s: persistent dirty bitmaps held in memory (enabled ones, or any "
			    "after a resize) cannot be kept on a layer that becomes read-only",
			    img->path);
		else if (err && ret == -EAGAIN)
			snprintf(err, errlen, "%s: metadata left to write back (flush first)",
				 img->path);
		return ret;
	}
	img->read_only = true;
	img->backing = true;
	ret = lock_all(m, IMG_PERM_READ, img->perm, err, errlen);
	if (ret < 0) {
		/* cannot happen when only giving permissions up; stay a writer */
		img->read_only = was_ro;
		img->backing = was_backing;
		qcow2_set_read_only(m->q, false);
		fast_mode_update(m);
		return ret;
	}
	img->perm = IMG_PERM_READ;
	fast_mode_update(m);
	return 0;
}

static void st_wake(struct qcow2_waiter *w)
{
	struct q2img *m = w->priv;
	struct img_wait *u = m->st_user;

	m->st_user = NULL;
	if (u)
		u->wake(u);
}

/* Allocated in this layer (zeroes it synthesizes past its backing file are not). */
static bool ext_alloc(const struct qcow2_extent *x)
{
	return x->type != QCOW2_MAP_UNALLOC && !(x->flags & QCOW2_EXT_UNALLOC);
}

static int q2_block_status(struct img *img, uint64_t off, uint64_t len, uint64_t *pnum,
			   struct img_wait *w)
{
	struct q2img *m = (struct q2img *)img;
	struct qcow2_extent x[8];
	int n;

	if (!m->q)
		return -EIO;
	if (m->st_user)
		return -EBUSY;
	m->st_w.wake = st_wake;
	m->st_w.priv = m;
	n = qcow2_map_read(m->q, off, len, x, 8, &m->st_w);
	if (n == -EAGAIN) {
		m->st_user = w;
		return n;
	}
	if (n < 0)
		return n;
	{
		bool alloc = ext_alloc(&x[0]);
		uint64_t end = x[0].off + x[0].len;

		for (int i = 1; i < n && ext_alloc(&x[i]) == alloc; i++)
			end = x[i].off + x[i].len;
		*pnum = end - off;
		return alloc;
	}
}

static struct img *q2_take_backing(struct img *img)
{
	struct q2img *m = (struct q2img *)img;
	struct img *b = m->backing;

	m->backing = NULL;
	return b;
}

static struct img *q2_backing_of(struct img *img)
{
	return ((struct q2img *)img)->backing;
}

static int q2_cache_stats(struct img *img, struct img_cache_stats *st)
{
	struct q2img *m = (struct q2img *)img;
	struct qcow2_cache_stats c;
	struct zc_count zc, zown;

	if (!m->q)
		return -EAGAIN; /* inactive (handed over): nothing cached */
	qcow2_cache_stats(m->q, &c);
	st->cache_entry_size = c.entry_size;
	st->l2_cache_size = c.l2_max * c.entry_size;
	st->l2_cache_used = c.l2_used * c.entry_size;
	st->refcount_cache_size = c.rc_max * c.entry_size;
	st->refcount_cache_used = c.rc_used * c.entry_size;
	st->l2_hits = c.l2_hits;
	st->l2_misses = c.l2_misses;
	st->l2_evictions = c.l2_evictions;
	st->refcount_hits = c.rc_hits;
	st->refcount_misses = c.rc_misses;
	st->refcount_evictions = c.rc_evictions;
	st->l2_prefetched = c.l2_prefetched;
	zc_counts(m, &zc, &zown);
	st->compressed_inflated = zc.inflated;
	st->compressed_cache_hits = zc.hits;
	st->compressed_reads = zc.reads;
	st->compressed_joins = zc.joins;
	st->clusters_allocated = c.clusters_alloc;
	st->cow = c.cow;
	st->l2_cow = c.l2_cow;
	st->l2_tables_allocated = c.l2_new;
	st->refcount_blocks_allocated = c.rb_new;
	st->metadata_writes = c.meta_writes;
	st->metadata_write_bytes = c.meta_write_bytes;
	st->writeback_batches = c.wb_batches;
	st->writeback_side_batches = c.wb_side_batches;
	st->writeback_syncs = c.wb_syncs;
	st->link_waits = c.link_waits;
	st->link_wait_us = c.link_wait_us;
	st->link_wait_syncs = c.link_wait_syncs;
	st->link_wait_syncs_max = c.link_wait_syncs_max;
	st->early_new_links = c.early_new;
	st->early_new_ahead = c.early_new_ahead;
	st->writeback_tail_starts = c.wb_tail_starts;
	st->page_cache_written = c.pc_written;
	fast_counts(m, &st->fast_hits, &st->fast_hops);
	st->fast_table_size = (uint64_t)m->ft_npages * (sizeof(uint64_t) << FT_BITS) +
			      (m->ft ? m->ft_len * sizeof(*m->ft) : 0);
	st->fast_table_budget = (uint64_t)m->ft_maxpages * (sizeof(uint64_t) << FT_BITS);
	st->fast_table_entries = m->ft_entries;
	return 0;
}

/* ---- persistent dirty bitmaps ---- */

static int q2_bitmaps(struct img *img, struct img_bitmap *out, unsigned max)
{
	struct q2img *m = (struct q2img *)img;
	struct qcow2_bitmap_info *all;
	int n;

	if (!m->q)
		return 0;
	n = qcow2_bitmaps(m->q, NULL, 0);
	if (n <= 0 || !max)
		return n;
	all = calloc((size_t)n, sizeof(*all));
	if (!all)
		return -ENOMEM;
	qcow2_bitmaps(m->q, all, (unsigned)n);
	for (unsigned i = 0; i < (unsigned)n && i < max; i++) {
		snprintf(out[i].name, sizeof(out[i].name), "%s", all[i].name);
		out[i].granularity = all[i].granularity;
		out[i].count = all[i].count;
		out[i].recording = all[i].recording;
		out[i].inconsistent = all[i].inconsistent;
	}
	free(all);
	return n;
}

static int q2_bitmap_ranges(struct img *img, const char *name,
			    int (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque)
{
	struct q2img *m = (struct q2img *)img;

	return m->q ? qcow2_bitmap_ranges(m->q, name, fn, opaque) : -ENOENT;
}

static int q2_bitmap_set(struct img *img, const char *name, uint64_t off, uint64_t len)
{
	struct q2img *m = (struct q2img *)img;

	return m->q ? qcow2_bitmap_set(m->q, name, off, len) : -ENOENT;
}

/* ---- online grow ---- */

struct q2grow {
	struct qcow2_flush f;
	struct q2img *m;
	struct img_grow *g;
	uint64_t size;
};

static void grow_done(struct qcow2_flush *f, int res)
{
	struct q2grow *x = f->priv;
	struct img_grow *g = x->g;

	if (res == 0) {
		x->m->img.size = x->size;
		ft_grow(x->m, x->size);
	} else
		snprintf(g->err, sizeof(g->err), "%s: writing the new size failed: %s",
			 x->m->img.path, strerror(-res));
	free(x);
	g->done(g, res);
}

static bool q2_grow_blocks(struct img *img)
{
	struct q2img *m = (struct q2img *)img;

	return m->q && qcow2_grow_blocks(m->q);
}

static int q2_grow(struct img *img, uint64_t size, struct img_grow *g)
{
	struct q2img *m = (struct q2img *)img;
	struct q2grow *x;
	uint64_t dsize;
	int ret;

	if (!m->q) {
		snprintf(g->err, sizeof(g->err), "%s: the image is inactive (no write lock held)",
			 img->path);
		return -EROFS;
	}
	/* An external data file grows with the image, as QEMU grows it. */
	if (m->has_dfile && m->own_dfile && io_file_get_size(&m->dfile, &dsize) == 0 &&
	    dsize < size && !(m->dfile.flags & IO_FILE_BLOCKDEV) &&
	    ftruncate(m->dfile.fd, (off_t)size) < 0) {
		ret = -errno;
		snprintf(g->err, sizeof(g->err), "%s: cannot grow the data file %s: %s", img->path,
			 m->dfile_name ? m->dfile_name : "?", strerror(errno));
		return ret;
	}
	x = calloc(1, sizeof(*x));
	if (!x) {
		snprintf(g->err, sizeof(g->err), "%s: out of memory", img->path);
		return -ENOMEM;
	}
	x->f.done = grow_done;
	x->f.priv = x;
	x->m = m;
	x->g = g;
	x->size = size;
	ret = qcow2_grow(m->q, size, &x->f, g->err, sizeof(g->err));
	if (ret != 1) {
		free(x);
		if (ret == 0) {
			img->size = size;
			ft_grow(m, size);
		}
	}
	return ret;
}

/*
 * See img_reopen_rw. The read-only engine (nothing to write back) closes,
 * the file is opened again read-write with a writer's locks, and the engine
 * opens afresh read-write; on failure the read-only engine comes back.
 */
static int q2_reopen_rw(struct img *img, char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	bool was_backing = img->backing;
	char rerr[300] = "";
	int ret;

	if (!(m->file.flags & IO_FILE_RDONLY))
		return q2_set_writable(img, true, err, errlen);
	if (!m->q || img->perm == IMG_PERM_NONE) {
		if (err)
			snprintf(err, errlen, "%s: image is inactive", img->path);
		return -EBUSY;
	}
	if (m->has_dfile) {
		if (err)
			snprintf(err, errlen,
				 "%s: reopening an image with an external data file read-write is "
				 "not supported",
				 img->path);
		return -ENOTSUP;
	}
	if (img->force_share) {
		if (err)
			snprintf(err, errlen,
				 "%s: force-share can only be used with read-only images",
				 img->path);
		return -EINVAL;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	img->backing = false;
	ret = img_file_reopen_rw(&m->file, img->path, IMG_FILE_QCOW2, err, errlen);
	if (ret < 0) {
		img->backing = was_backing;
		return ret;
	}
	/* the second handle on the same file that data goes through (no locks) */
	if (m->own_dfile) {
		ret = io_file_reopen_rw(&m->dfile, img->path, 0, IO_PERM_ALL, NULL, 0);
		if (ret < 0) {
			if (err)
				snprintf(err, errlen, "%s: Could not reopen file: %s", img->path,
					 strerror(-ret));
			img->backing = was_backing;
			lock_all(m, IMG_PERM_READ, IMG_PERM_WRITE, NULL, 0);
			return ret;
		}
	}
	fast_off(m);
	ret = qcow2_close(m->q);
	m->q = NULL;
	if (ret == 0)
		ret = engine_open(m, false, err, errlen);
	if (ret < 0) {
		/* back to what it was: a read-only backing file */
		img->backing = was_backing;
		lock_all(m, IMG_PERM_READ, IMG_PERM_WRITE, NULL, 0);
		if (!m->q && engine_open(m, true, rerr, sizeof(rerr)) < 0)
			vlog(VLOG_ERROR, img->path, "reopening read-only failed: %s", rerr);
		return ret;
	}
	img->perm = IMG_PERM_WRITE;
	img->read_only = false;
	return 0;
}

/*
 * See img_change_backing. The engine writes everything back and closes (as
 * for an internal snapshot), the first cluster is read and rewritten with
 * the new name and format (qcow2_header_set_backing: every other extension
 * kept) and made durable, then the engine opens afresh over the new backing.
 */
static int q2_change_backing(struct img *img, struct img *nb, const char *name, const char *fmt,
			     char *err, size_t errlen)
{
	struct q2img *m = (struct q2img *)img;
	struct qcow2_header_info h;
	uint8_t *buf = NULL, *out = NULL;
	uint64_t fsize = 0;
	size_t hlen, len, outlen = 0;
	int ret;

	if (!m->q || !img_may_write(img)) {
		if (err)
			snprintf(err, errlen, "%s: not writable", img->path);
		return -EROFS;
	}
	if (busy_count(m))
		return busy_err(m, err, errlen);
	ret = engine_stop(m, NULL, err, errlen);
	if (ret < 0)
		goto reopen;
	ret = io_file_get_size(&m->file, &fsize);
	hlen = fsize < QCOW2_MAX_CLUSTER_SIZE ? (size_t)fsize : QCOW2_MAX_CLUSTER_SIZE;
	hlen = (hlen + 4095) & ~(size_t)4095;
	buf = ret == 0 ? io_alloc_aligned(hlen) : NULL;
	out = ret == 0 ? io_alloc_aligned(hlen) : NULL;
	if (ret == 0 && (!buf || !out))
		ret = -ENOMEM;
	if (ret == 0)
		ret = io_file_pread_sync(&m->file, buf, hlen, 0);
	if (ret < 0) {
		if (err)
			snprintf(err, errlen, "%s: reading the header: %s", img->path,
				 strerror(-ret));
		goto reopen;
	}
	ret = qcow2_header_parse(buf, hlen, fsize, &h, err, errlen);
	if (ret < 0)
		goto reopen;
	len = h.cluster_size < hlen ? h.cluster_size : hlen;
	ret =
	    qcow2_header_set_backing(buf, len, &h, name, fmt, out, &outlen, img->path, err, errlen);
	if (ret < 0)
		goto reopen;
	ret = io_file_pwrite_sync(&m->file, out, outlen, 0);
	if (ret == 0)
		ret = io_file_sync(&m->file);
	if (ret < 0) {
		if (err)
			snprintf(err, errlen, "%s: writing the header: %s", img->path,
				 strerror(-ret));
		goto reopen;
	}
	m->backing = nb;
reopen:
	io_free_aligned(buf);
	io_free_aligned(out);
	return engine_restart(m, ret, "changing the backing file", err, errlen);
}

static const struct img_ops q2_ops = {
    .format = "qcow2",
    .submit = q2_submit,
    .close = q2_close,
    .describe = q2_describe,
    .set_perm = q2_set_perm,
    .backing_of = q2_backing_of,
    .cache_stats = q2_cache_stats,
    .grow = q2_grow,
    .snapshot = q2_snapshot,
    .bitmap_edit = q2_bitmap_edit,
    .snapshot_list = q2_snapshot_list,
    .bitmaps = q2_bitmaps,
    .grow_blocks = q2_grow_blocks,
    .bitmap_ranges = q2_bitmap_ranges,
    .bitmap_set = q2_bitmap_set,
    .bitmap_merge = q2_bitmap_merge,
    .set_writable = q2_set_writable,
    .reopen_rw = q2_reopen_rw,
    .change_backing = q2_change_backing,
    .block_status = q2_block_status,
    .take_backing = q2_take_backing,
};

static __thread int open_depth;
/* The files of the chain being opened, by depth (open_depth): a backing
 * file that is one of them is a loop, found before its lock conflicts with
 * our own (which would read "locked by another process"). */
static __thread struct {
	dev_t dev;
	ino_t ino;
} chain_ids[QCOW2_MAX_CHAIN_DEPTH + 1];

/* -ELOOP if NAME, the backing file of PATH (open on FD), is a file of the
 * chain being opened; FD's identity recorded at this depth. */
static int chain_loop(const char *path, const char *name, int fd, char *err, size_t errlen)
{
	struct stat self, st;

	if (fstat(fd, &self) < 0)
		self.st_dev = 0, self.st_ino = 0;
	chain_ids[open_depth].dev = self.st_dev;
	chain_ids[open_depth].ino = self.st_ino;
	if (stat(name, &st) < 0 || (st.st_dev == 0 && st.st_ino == 0))
		return 0; /* the open of NAME says what is wrong */
	for (int i = 0; i <= open_depth; i++) {
		if (chain_ids[i].dev != st.st_dev || chain_ids[i].ino != st.st_ino)
			continue;
		if (err)
			snprintf(err, errlen, "%s: backing file %s is %s (a loop)", path, name,
				 i == open_depth ? "the image itself"
						 : "an image further up the chain");
		return -ELOOP;
	}
	return 0;
}

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
	if (opts && opts->inactive)
		perm = IMG_PERM_NONE; /* incoming migration: the source holds the locks */
	ret = img_file_lock(&m->file, path, role, perm, m->img.force_share, err, errlen);
	if (ret < 0)
		goto close_file;
	/* Inactive: look at the image (geometry, data file, backing file) without
	 * writing anything; the engine is opened for real on activation. */
	qo.read_only = read_only || perm == IMG_PERM_NONE;
	if (opts) {
		qo.allow_corrupt_ro = opts->allow_corrupt_ro;
		qo.l2_cache_size = opts->l2_cache_size;
		qo.cache_entry_size = opts->cache_entry_size;
		qo.no_l2_prefetch = opts->no_l2_prefetch;
		qo.blkdev_zero_ahead = opts->blkdev_zero_ahead;
	}
	if (qo.blkdev_zero_ahead && (m->file.flags & IO_FILE_BLOCKDEV) && m->file.wz_max > 0 &&
	    !(m->file.flags & IO_FILE_RDONLY)) {
		/* (if this fails, the engine says so and runs without zero-ahead) */
		m->zah_keep.open = io_file_reopen(&m->file, &m->zah_keep.file) == 0;
		qo.zah_keep = &m->zah_keep;
	}
	m->qo = qo;
	m->qo.read_only = read_only;
	if (perm == IMG_PERM_NONE)
		qo.no_l2_prefetch = true;
	ret = qcow2_open(&m->q, loop, &m->file, path, &qo, err, errlen);
	if (ret < 0)
		goto close_file;
	h = qcow2_header(m->q);
	m->cs = h->cluster_size;
	m->pad = m->cs <= PAD_MAX && !(opts && opts->no_cluster_fill);
	qcow2_set_fills_whole(m->q, m->pad);

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
		 * The write-back syncs the first handle for both: a write through
		 * this one's page cache (off the O_DIRECT alignment) counts there.
		 */
		m->own_dfile = true;
		io_file_pc_share(&m->dfile, &m->file);
	}
	if (h->backing_file[0] && opts && opts->backing_img) {
		m->backing = opts->backing_img;
		qcow2_set_backing_size(m->q, m->backing->size);
	} else if (h->backing_file[0]) {
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
		ret = chain_loop(path, name, m->file.fd, err, errlen);
		if (ret < 0)
			goto close_dfile;
		bo.format = h->has_backing_fmt ? h->backing_fmt : NULL;
		bo.read_only = true;
		bo.backing = true;
		bo.force_share = m->img.force_share;
		bo.direct = direct;
		if (opts) {
			bo.l2_cache_size = opts->l2_cache_size;
			bo.cache_entry_size = opts->cache_entry_size;
			bo.no_l2_prefetch = opts->no_l2_prefetch;
			bo.no_cluster_fill = opts->no_cluster_fill;
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
			vlog(VLOG_WARN, path,
			     "backing file %s has no recorded format: probed as %s", name,
			     m->backing->ops->format);
		qcow2_set_backing_size(m->q, m->backing->size);
		free(name);
		name = NULL;
	}
	m->zc_n = (unsigned)(ZC_BUDGET / m->cs);
	m->zc_n = m->zc_n < 2 ? 2 : m->zc_n > ZC_MAX ? ZC_MAX : m->zc_n;
	ret = fast_init(m, h);
	if (ret < 0)
		goto close_dfile;

	m->img.ops = &q2_ops;
	m->img.loop = loop;
	m->img.size = qcow2_size(m->q);
	m->img.perm = perm;
	if (perm == IMG_PERM_NONE) {
		if (m->backing)
			img_set_perm(m->backing, IMG_PERM_NONE, NULL, 0);
		/* Nothing of the metadata is kept: it is re-read on activation. */
		qcow2_close(m->q);
		m->q = NULL;
	}
	fast_engine(m);
	m->img.mt_submit = true;
	m->img.align = m->file.align > 512 ? m->file.align : 512;
	if (m->own_dfile && m->dfile.align > m->img.align)
		m->img.align = m->dfile.align;
	m->img.supports_discard = true;
	m->img.supports_write_zeroes = true;
	m->img.discard_granularity = (unsigned)m->cs;
	m->img.opt_io = m->cs <= (1u << 20) ? (uint32_t)m->cs : 0;
	m->img.cluster_size = (uint32_t)m->cs;
	snaps_reload(m);
	*imgp = &m->img;
	return 0;

close_dfile:
	if (m->own_dfile)
		io_file_close(&m->dfile);
close_q:
	qcow2_close(m->q);
close_file:
	if (m->zah_keep.open)
		io_file_close(&m->zah_keep.file);
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
