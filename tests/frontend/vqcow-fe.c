/* SPDX-License-Identifier: MIT */
/*
 * vqcow-fe — command-line vhost-user-blk front-end (no VM) built on vqfe.
 *
 *   vqcow-fe [options] info SOCK
 *   vqcow-fe [options] read SOCK OFF LEN > file
 *   vqcow-fe [options] write SOCK OFF [LEN] < file
 *   vqcow-fe [options] flush SOCK
 *   vqcow-fe [options] discard SOCK OFF LEN
 *   vqcow-fe [options] write-zeroes SOCK OFF LEN [--unmap]
 *   vqcow-fe [options] get-id SOCK
 *   vqcow-fe [options] set-wce SOCK 0|1
 *   vqcow-fe [options] verify SOCK --size N [--seed S] [--offset O] [--bs B]
 *   vqcow-fe [options] bench SOCK --rw MODE [--bs B] [--iodepth D] [--numjobs J]
 *            [--runtime S] [--size N] [--offset O] [--rwmixread P] [--json] [--poll]
 *            [--threads per-queue|one] [--verify [--seed S]] [--expect FILE]
 *            [--flush-every N]
 *
 * bench drives each of its --numjobs queues from a thread of its own by
 * default (--threads per-queue), as a guest whose vCPUs each drive their own
 * queue (num-queues = vCPUs, fio numjobs = vCPUs); the main thread sets up
 * the connection, serves the backend channel meanwhile and stops the rings
 * (GET_VRING_BASE) once every thread has ended. --threads one drives all
 * queues from the main thread.
 *
 * Exit status: 0 success, 1 error (message on stderr), 2 usage error,
 * 3 the device answered a request with a non-OK status.
 */
#include "vqfe.h"

#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <unistd.h>

struct cli {
	struct vqfe_opts o;
	unsigned queue;
	unsigned layout;
	unsigned segs;
	bool unmap;
	bool json;
	/* verify / bench */
	uint64_t size, offset, seed;
	uint32_t bs;
	bool bs_set;
	const char *rw;
	unsigned rwmixread;
	unsigned iodepth;
	unsigned numjobs;
	double runtime;
	uint64_t number_ios;
	unsigned flush_every;      /* bench: every Nth request of a queue is a FLUSH (0: none) */
	bool one_thread;           /* bench --threads one: one thread drives every queue */
	bool verify;               /* bench --verify (or --expect) */
	const char *expect_path;   /* bench --expect: reads must return this file's bytes */
	const uint8_t *expect_map; /* ... mapped, expect_len bytes */
	size_t expect_len;
};

static const char *prog = "vqcow-fe";

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: %s [options] COMMAND SOCKET [args]\n"
		"Commands:\n"
		"  info SOCK                      features, protocol features, config, capacity\n"
		"  read SOCK OFF LEN              read to stdout\n"
		"  write SOCK OFF [LEN]           write stdin (LEN bytes, default all of it)\n"
		"  flush SOCK | get-id SOCK\n"
		"  discard SOCK OFF LEN | write-zeroes SOCK OFF LEN [--unmap]\n"
		"  set-wce SOCK 0|1               toggle the write cache (SET_CONFIG)\n"
		"  verify SOCK --size N [--seed S] [--offset O] [--bs B]\n"
		"                                 write a pattern, read it back and compare\n"
		"  bench SOCK --rw read|write|randread|randwrite|rw|randrw [--rwmixread P]\n"
		"        [--bs B] [--iodepth D] [--numjobs J] [--runtime SEC] [--number-ios N]\n"
		"        [--size N] [--offset O] [--json] [--poll] [--threads per-queue|one]\n"
		"        [--verify [--seed S]] [--expect FILE] [--flush-every N]\n"
		"        --threads per-queue (default): a thread per queue, as a guest's vCPUs\n"
		"        each drive their own queue; one: the main thread drives all queues\n"
		"        --verify: writes carry verify's pattern (--seed), reads must return it\n"
		"        --expect FILE (read, randread): reads must return FILE's bytes at\n"
		"        their offset (e.g. an image converted to raw by qemu-img)\n"
		"        --flush-every N: every Nth request of a queue is a FLUSH (own stats)\n"
		"Options:\n"
		"  --queues N        virtqueues to set up (default 1; bench: --numjobs)\n"
		"  --queue Q         queue used by single requests (default 0)\n"
		"  --queue-size N    descriptors per queue (power of 2)\n"
		"  --regions N       guest memory regions (1..8)\n"
		"  --separate-fds    one memfd per region\n"
		"  --add-mem-reg     ADD_MEM_REG instead of SET_MEM_TABLE\n"
		"  --no-event-idx, --no-indirect, --no-reply-ack, --no-backend-req\n"
		"  --layout L        comma list: hdr-split, merge, indirect, status-big\n"
		"  --segs N          data descriptors per request\n"
		"  --poll            busy-poll the used rings instead of waiting for calls\n"
		"  --timeout MS      per-request timeout (default 10000)\n"
		"Sizes take K, M, G suffixes (powers of 1024).\n",
		prog);
}

__attribute__((format(printf, 1, 2), noreturn)) static void die_usage(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, " (try --help)\n");
	exit(2);
}

static uint64_t parse_size(const char *s, const char *what)
{
	char *end;
	unsigned long long v;
	uint64_t mul = 1;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *s == '-')
		die_usage("bad %s '%s'", what, s);
	switch (*end) {
	case 'k':
	case 'K':
		mul = 1ull << 10;
		end++;
		break;
	case 'm':
	case 'M':
		mul = 1ull << 20;
		end++;
		break;
	case 'g':
	case 'G':
		mul = 1ull << 30;
		end++;
		break;
	case 't':
	case 'T':
		mul = 1ull << 40;
		end++;
		break;
	default:
		break;
	}
	if (*end == 'i' || *end == 'B' || *end == 'b')
		end++;
	if (*end == 'B')
		end++;
	if (*end || (mul > 1 && v > UINT64_MAX / mul))
		die_usage("bad %s '%s'", what, s);
	return v * mul;
}

static unsigned parse_uint(const char *s, const char *what, unsigned max)
{
	uint64_t v = parse_size(s, what);

	if (v > max)
		die_usage("%s '%s' too large (max %u)", what, s, max);
	return (unsigned)v;
}

/* A byte offset: requests address 512-byte sectors. */
static uint64_t parse_offset(const char *s)
{
	uint64_t v = parse_size(s, "offset");

	if (v % 512)
		die_usage("offset %s is not a multiple of 512", s);
	return v;
}

static unsigned parse_layout(const char *s)
{
	unsigned l = 0;
	char *dup = strdup(s), *save = NULL;

	for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		if (!strcmp(t, "hdr-split"))
			l |= VQFE_L_HDR_SPLIT;
		else if (!strcmp(t, "merge"))
			l |= VQFE_L_MERGE;
		else if (!strcmp(t, "indirect"))
			l |= VQFE_L_INDIRECT;
		else if (!strcmp(t, "status-big"))
			l |= VQFE_L_STATUS_BIG;
		else if (strcmp(t, "default"))
			die_usage("unknown layout '%s'", t);
	}
	free(dup);
	return l;
}

static const char *status_name(int st)
{
	switch (st) {
	case VIRTIO_BLK_S_OK:
		return "OK";
	case VIRTIO_BLK_S_IOERR:
		return "IOERR";
	case VIRTIO_BLK_S_UNSUPP:
		return "UNSUPP";
	default:
		return "?";
	}
}

/* rc from a vqfe_* sync helper: <0 error, >0 device status. */
static int report(struct vqfe *fe, const char *what, int rc)
{
	if (rc < 0) {
		fprintf(stderr, "%s: %s: %s\n", prog, what, vqfe_strerror(fe));
		return 1;
	}
	if (rc > 0) {
		fprintf(stderr, "%s: %s: status %d (%s)\n", prog, what, rc, status_name(rc));
		return 3;
	}
	return 0;
}

/* ---- info ---- */

static int cmd_info(struct vqfe *fe, const struct cli *c)
{
	const struct virtio_blk_config *cfg = vqfe_config(fe);
	uint64_t f = vqfe_features(fe);
	static const struct {
		unsigned bit;
		const char *name;
	} names[] = {
	    {VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"},
	    {VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"},
	    {VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"},
	    {VIRTIO_BLK_F_RO, "RO"},
	    {VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"},
	    {VIRTIO_BLK_F_FLUSH, "FLUSH"},
	    {VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"},
	    {VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"},
	    {VIRTIO_BLK_F_MQ, "MQ"},
	    {VIRTIO_BLK_F_DISCARD, "DISCARD"},
	    {VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"},
	    {VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"},
	    {VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"},
	    {VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"},
	    {32, "VERSION_1"},
	};

	if (c->json) {
		printf(
		    "{\"features\": %" PRIu64 ", \"device_features\": %" PRIu64
		    ", \"protocol_features\": %" PRIu64 ", \"device_protocol_features\": %" PRIu64
		    ", \"queue_num\": %" PRIu64 ", \"max_mem_slots\": %" PRIu64
		    ", \"capacity\": %" PRIu64 ", \"size_max\": %u, \"seg_max\": %u"
		    ", \"blk_size\": %u, \"physical_block_exp\": %u, \"min_io_size\": %u"
		    ", \"opt_io_size\": %u, \"wce\": %u, \"num_queues\": %u"
		    ", \"max_discard_sectors\": %u, \"max_discard_seg\": %u"
		    ", \"discard_sector_alignment\": %u, \"max_write_zeroes_sectors\": %u"
		    ", \"max_write_zeroes_seg\": %u, \"write_zeroes_may_unmap\": %u}\n",
		    f, vqfe_dev_features(fe), vqfe_protocol_features(fe),
		    vqfe_dev_protocol_features(fe), vqfe_queue_num(fe), vqfe_max_mem_slots(fe),
		    vqfe_capacity(fe), le32toh(cfg->size_max), le32toh(cfg->seg_max),
		    le32toh(cfg->blk_size), cfg->physical_block_exp, le16toh(cfg->min_io_size),
		    le32toh(cfg->opt_io_size), cfg->wce, le16toh(cfg->num_queues),
		    le32toh(cfg->max_discard_sectors), le32toh(cfg->max_discard_seg),
		    le32toh(cfg->discard_sector_alignment), le32toh(cfg->max_write_zeroes_sectors),
		    le32toh(cfg->max_write_zeroes_seg), cfg->write_zeroes_may_unmap);
		return 0;
	}
	printf("device features:   %#" PRIx64 "\n", vqfe_dev_features(fe));
	printf("acked features:    %#" PRIx64 " ", f);
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if ((f >> names[i].bit) & 1)
			printf(" %s", names[i].name);
	printf("\nprotocol features: %#" PRIx64 " (offered %#" PRIx64 ")\n",
	       vqfe_protocol_features(fe), vqfe_dev_protocol_features(fe));
	printf("queue num:         %" PRIu64 "\n", vqfe_queue_num(fe));
	printf("max mem slots:     %" PRIu64 "\n", vqfe_max_mem_slots(fe));
	printf("capacity:          %" PRIu64 " sectors (%" PRIu64 " bytes)\n", vqfe_capacity(fe),
	       vqfe_capacity(fe) * 512);
	printf("size_max:          %u\n", le32toh(cfg->size_max));
	printf("seg_max:           %u\n", le32toh(cfg->seg_max));
	printf("blk_size:          %u\n", le32toh(cfg->blk_size));
	printf("topology:          phys_exp %u align %u min_io %u opt_io %u\n",
	       cfg->physical_block_exp, cfg->alignment_offset, le16toh(cfg->min_io_size),
	       le32toh(cfg->opt_io_size));
	printf("wce:               %u\n", cfg->wce);
	printf("num_queues:        %u\n", le16toh(cfg->num_queues));
	printf("discard:           max_sectors %u max_seg %u align %u\n",
	       le32toh(cfg->max_discard_sectors), le32toh(cfg->max_discard_seg),
	       le32toh(cfg->discard_sector_alignment));
	printf("write zeroes:      max_sectors %u max_seg %u may_unmap %u\n",
	       le32toh(cfg->max_write_zeroes_sectors), le32toh(cfg->max_write_zeroes_seg),
	       cfg->write_zeroes_may_unmap);
	(void)c;
	return 0;
}

/* ---- single requests ---- */

static int run_req(struct vqfe *fe, const struct cli *c, struct vqfe_req *r, const char *what)
{
	int rc;

	r->layout |= c->layout;
	if (!r->segs)
		r->segs = c->segs;
	rc = vqfe_run(fe, c->queue, r);
	return report(fe, what, rc < 0 ? rc : r->status);
}

static int cmd_read(struct vqfe *fe, const struct cli *c, uint64_t off, uint64_t len)
{
	size_t chunk = vqfe_get_opts(fe)->data_size;
	uint8_t *buf = malloc(chunk);
	int ret = 0;

	if (!buf)
		return 1;
	while (len && !ret) {
		uint32_t n = (uint32_t)(len < chunk ? len : chunk);
		struct vqfe_req r = {
		    .type = VIRTIO_BLK_T_IN, .sector = off / 512, .buf = buf, .len = n};

		ret = run_req(fe, c, &r, "read");
		if (!ret && fwrite(buf, 1, n, stdout) != n) {
			fprintf(stderr, "%s: write to stdout failed\n", prog);
			ret = 1;
		}
		off += n;
		len -= n;
	}
	free(buf);
	return ret;
}

static int cmd_write(struct vqfe *fe, const struct cli *c, uint64_t off, uint64_t len, bool all)
{
	size_t chunk = vqfe_get_opts(fe)->data_size;
	uint8_t *buf = malloc(chunk);
	int ret = 0;

	if (!buf)
		return 1;
	while ((all || len) && !ret) {
		size_t want = all ? chunk : (len < chunk ? len : chunk);
		size_t n = fread(buf, 1, want, stdin);
		struct vqfe_req r = {
		    .type = VIRTIO_BLK_T_OUT, .sector = off / 512, .buf = buf, .len = (uint32_t)n};

		if (n == 0) {
			if (!all) {
				fprintf(stderr, "%s: stdin ended early\n", prog);
				ret = 1;
			}
			break;
		}
		ret = run_req(fe, c, &r, "write");
		off += n;
		if (!all)
			len -= n;
		if (n < want && all)
			break;
	}
	free(buf);
	return ret;
}

static int cmd_discard_wz(struct vqfe *fe, const struct cli *c, uint32_t type, uint64_t off,
			  uint64_t len)
{
	struct virtio_blk_discard_write_zeroes seg = {
	    htole64(off / 512), htole32((uint32_t)(len / 512)),
	    htole32(c->unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0)};
	struct vqfe_req r = {.type = type, .buf = &seg, .len = sizeof(seg)};

	if (len / 512 > UINT32_MAX)
		die_usage("length too large for one segment");
	return run_req(fe, c, &r, type == VIRTIO_BLK_T_DISCARD ? "discard" : "write-zeroes");
}

static int cmd_get_id(struct vqfe *fe, const struct cli *c)
{
	char id[VIRTIO_BLK_ID_BYTES + 1] = {0};
	struct vqfe_req r = {.type = VIRTIO_BLK_T_GET_ID, .buf = id, .len = VIRTIO_BLK_ID_BYTES};
	int ret = run_req(fe, c, &r, "get-id");

	if (!ret)
		printf("%s\n", id);
	return ret;
}

static int cmd_set_wce(struct vqfe *fe, const char *v)
{
	uint8_t wce;
	int rc;

	if (strcmp(v, "0") && strcmp(v, "1"))
		die_usage("set-wce takes 0 or 1");
	wce = (uint8_t)(v[0] - '0');
	rc = vqfe_set_config(fe, &wce, offsetof(struct virtio_blk_config, wce), 1);
	if (rc == 0)
		rc = vqfe_refresh_config(fe);
	if (rc < 0)
		return report(fe, "set-wce", rc);
	printf("wce: %u\n", vqfe_config(fe)->wce);
	return vqfe_config(fe)->wce == wce ? 0 : 1;
}

/* ---- verify ---- */

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Pattern of the 8-byte word at byte offset @off for @seed. */
static void pattern(uint8_t *buf, size_t len, uint64_t off, uint64_t seed)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t s = seed ^ ((off + i) * 0x9e3779b97f4a7c15ull);
		uint64_t v = splitmix(&s);

		memcpy(buf + i, &v, len - i < 8 ? len - i : 8);
	}
}

static int cmd_verify(struct vqfe *fe, const struct cli *c)
{
	uint64_t cap = vqfe_capacity(fe) * 512;
	uint32_t bs = c->bs_set ? c->bs : (uint32_t)(vqfe_get_opts(fe)->data_size & ~511ull);
	uint8_t *wbuf = malloc(bs), *rbuf = malloc(bs);
	uint64_t size = c->size ? c->size : cap - c->offset;
	int ret = 0;

	if (!wbuf || !rbuf)
		return 1;
	if (c->offset % 512 || size % 512 || c->offset + size > cap || c->offset > cap)
		die_usage("verify range must be 512-aligned and inside the %" PRIu64 "-byte device",
			  cap);
	for (unsigned pass = 0; pass < 2 && !ret; pass++) {
		for (uint64_t off = c->offset; off < c->offset + size && !ret; off += bs) {
			uint32_t n =
			    (uint32_t)(c->offset + size - off < bs ? c->offset + size - off : bs);
			struct vqfe_req r = {
			    .sector = off / 512, .len = n, .buf = pass ? rbuf : wbuf};

			pattern(wbuf, n, off, c->seed);
			r.type = pass ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
			ret = run_req(fe, c, &r, pass ? "verify read" : "verify write");
			if (!ret && pass && memcmp(wbuf, rbuf, n)) {
				size_t i = 0;

				while (wbuf[i] == rbuf[i])
					i++;
				fprintf(stderr, "%s: verify: mismatch at byte %" PRIu64 "\n", prog,
					off + i);
				ret = 1;
			}
		}
		if (!pass && !ret)
			ret = report(fe, "flush", vqfe_flush(fe, c->queue));
	}
	if (!ret)
		printf("verified %" PRIu64 " bytes at offset %" PRIu64 " (seed %" PRIu64 ")\n",
		       size, c->offset, c->seed);
	free(wbuf);
	free(rbuf);
	return ret;
}

/* ---- bench ---- */

/* Log-linear latency histogram: 64 sub-buckets per power of two (<1.6% error). */
#define HIST_SUB  64
#define HIST_BITS 6
#define HIST_N    ((64 - HIST_BITS) * HIST_SUB + HIST_SUB)

struct stats {
	uint64_t ios, bytes, errors;
	uint64_t lat_sum, lat_min, lat_max;
	uint32_t hist[HIST_N];
};

static unsigned hist_idx(uint64_t v)
{
	unsigned msb;

	if (v < HIST_SUB)
		return (unsigned)v;
	msb = 63u - (unsigned)__builtin_clzll(v);
	return (msb - HIST_BITS + 1) * HIST_SUB +
	       (unsigned)((v >> (msb - HIST_BITS)) & (HIST_SUB - 1));
}

static uint64_t hist_val(unsigned idx)
{
	unsigned blk = idx / HIST_SUB, sub = idx % HIST_SUB, msb;

	if (blk == 0)
		return sub;
	msb = blk + HIST_BITS - 1;
	/* middle of the bucket */
	return ((uint64_t)(HIST_SUB + sub) << (msb - HIST_BITS)) +
	       ((1ull << (msb - HIST_BITS)) >> 1);
}

static void stats_add(struct stats *s, uint64_t lat, uint32_t bytes)
{
	s->ios++;
	s->bytes += bytes;
	s->lat_sum += lat;
	if (!s->lat_min || lat < s->lat_min)
		s->lat_min = lat;
	if (lat > s->lat_max)
		s->lat_max = lat;
	s->hist[hist_idx(lat)]++;
}

static void stats_merge(struct stats *d, const struct stats *s)
{
	d->ios += s->ios;
	d->bytes += s->bytes;
	d->errors += s->errors;
	d->lat_sum += s->lat_sum;
	if (s->lat_min && (!d->lat_min || s->lat_min < d->lat_min))
		d->lat_min = s->lat_min;
	if (s->lat_max > d->lat_max)
		d->lat_max = s->lat_max;
	for (unsigned i = 0; i < HIST_N; i++)
		d->hist[i] += s->hist[i];
}

static double pct(const struct stats *s, double p)
{
	uint64_t want, seen = 0;

	if (!s->ios)
		return 0;
	want = (uint64_t)ceil(p / 100.0 * (double)s->ios);
	if (want < 1)
		want = 1;
	for (unsigned i = 0; i < HIST_N; i++) {
		seen += s->hist[i];
		if (seen >= want) {
			uint64_t v = hist_val(i);

			return (double)(v > s->lat_max ? s->lat_max : v);
		}
	}
	return (double)s->lat_max;
}

struct job {
	uint64_t cursor; /* sequential position */
	uint64_t rng;
	uint64_t nops; /* requests prepared (--flush-every) */
};

/* Per queue: what completed on it (its share of the totals). */
struct qstat {
	uint64_t reads, writes, errors, mismatches;
};

/*
 * One driver of queues [q0, q0 + nq): with --threads one, a single one on
 * the main thread drives every queue (waiting on all of them at once); with
 * per-queue (the default, as a guest whose vCPUs each drive their own queue),
 * one thread per queue, each owning its ring, kick and call eventfds,
 * requests, counters and share of --number-ios.
 */
struct worker {
	struct vqfe *fe;
	const struct cli *c;
	unsigned q0, nq;
	bool threaded;
	uint64_t nblocks, t_end;
	uint64_t limit; /* requests to issue at most (UINT64_MAX: no limit) */
	struct vqfe_req *reqs;
	struct job *jobs;
	struct qstat *qs;
	uint8_t *bufs;   /* --verify: a data buffer per request */
	uint8_t *expect; /* --verify: the pattern a read must return */
	struct stats rd, wr, fl;
	uint64_t t_done;
	int ret;
	int done_fd; /* threads: written once at the end */
};

static int stop_flag;   /* a signal: stop issuing */
static int failed_flag; /* a worker failed: the others stop issuing too */

static void on_signal(int sig)
{
	(void)sig;
	__atomic_store_n(&stop_flag, 1, __ATOMIC_RELAXED);
}

static bool is_read_op(const struct cli *c, struct job *j)
{
	if (!strcmp(c->rw, "read") || !strcmp(c->rw, "randread"))
		return true;
	if (!strcmp(c->rw, "write") || !strcmp(c->rw, "randwrite"))
		return false;
	return splitmix(&j->rng) % 100 < c->rwmixread;
}

static void next_op(const struct cli *c, struct job *j, struct vqfe_req *r, uint64_t nblocks)
{
	bool rnd = !strncmp(c->rw, "rand", 4);
	uint64_t blk;

	if (rnd) {
		blk = splitmix(&j->rng) % nblocks;
	} else {
		blk = j->cursor;
		j->cursor = (j->cursor + 1) % nblocks;
	}
	r->type = is_read_op(c, j) ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
	r->sector = (c->offset + blk * c->bs) / 512;
}

/* The error text of an operation on queue @q of @w. */
static const char *werr(const struct worker *w, unsigned q)
{
	return w->threaded ? vqfe_vq_strerror(vqfe_vq(w->fe, q)) : vqfe_strerror(w->fe);
}

static int wfail(struct worker *w, const char *what, unsigned q)
{
	fprintf(stderr, "%s: %s%s\n", prog, what, werr(w, q));
	__atomic_store_n(&failed_flag, 1, __ATOMIC_RELAXED);
	w->ret = 1;
	return 1;
}

/* Pick @r's next operation on queue @q; --verify: a write carries the
 * pattern of its offset, a read gets a buffer to compare. */
static void prepare(struct worker *w, unsigned q, struct vqfe_req *r)
{
	struct job *j = &w->jobs[q - w->q0];

	if (w->c->flush_every && ++j->nops % w->c->flush_every == 0) {
		r->type = VIRTIO_BLK_T_FLUSH;
		r->sector = 0;
		r->len = 0;
		return;
	}
	r->len = w->c->bs;
	next_op(w->c, j, r, w->nblocks);
	if (w->bufs && r->type == VIRTIO_BLK_T_OUT)
		pattern(r->buf, r->len, r->sector * 512, w->c->seed);
}

static void complete(struct worker *w, unsigned q, struct vqfe_req *r)
{
	struct qstat *qs = &w->qs[q - w->q0];
	bool rd = r->type == VIRTIO_BLK_T_IN;
	struct stats *s = rd ? &w->rd : &w->wr;

	if (r->type == VIRTIO_BLK_T_FLUSH) {
		if (r->status != VIRTIO_BLK_S_OK || r->err || r->used_len != 1) {
			w->fl.errors++;
			qs->errors++;
			return;
		}
		stats_add(&w->fl, r->t_done - r->t_submit, 0);
		return;
	}
	if (rd)
		qs->reads++;
	else
		qs->writes++;
	if (r->status != VIRTIO_BLK_S_OK || r->err || r->used_len != (rd ? r->len + 1 : 1)) {
		s->errors++;
		qs->errors++;
		if (qs->errors == 1)
			fprintf(stderr, "%s: request at sector %llu: status %u, used len %u\n",
				prog, (unsigned long long)r->sector, r->status, r->used_len);
		return;
	}
	stats_add(s, r->t_done - r->t_submit, r->len);
	if (w->bufs && rd) {
		const uint8_t *want = w->expect;

		if (w->c->expect_map)
			want = w->c->expect_map + r->sector * 512; /* inside: cmd_bench */
		else
			pattern(w->expect, r->len, r->sector * 512, w->c->seed);
		if (memcmp(want, r->buf, r->len)) {
			size_t i = 0;

			while (want[i] == ((uint8_t *)r->buf)[i])
				i++;
			if (!qs->mismatches)
				fprintf(stderr, "%s: verify: queue %u: mismatch at byte %llu\n",
					prog, q, (unsigned long long)(r->sector * 512 + i));
			qs->mismatches++;
		}
	}
}

static bool stop_now(const struct worker *w, uint64_t issued)
{
	return vqfe_now_ns() >= w->t_end || __atomic_load_n(&stop_flag, __ATOMIC_RELAXED) ||
	       __atomic_load_n(&failed_flag, __ATOMIC_RELAXED) || issued >= w->limit;
}

/* Keep the queues of @w full until the runtime (or the limit) is over,
 * then reap what is in flight. 0 or 1 (the message printed). */
static int run_worker(struct worker *w)
{
	const struct cli *c = w->c;
	unsigned depth = c->iodepth, inflight = 0;
	struct vqfe *fe = w->fe;
	struct vqfe_req *done[256];
	uint64_t issued = 0;
	bool stopping = false;
	int rc;

	/* fill every queue to the requested depth, one kick per queue */
	for (unsigned q = w->q0; q < w->q0 + w->nq; q++) {
		for (unsigned i = 0; i < depth && issued < w->limit; i++) {
			struct vqfe_req *r = &w->reqs[(q - w->q0) * depth + i];

			r->len = c->bs;
			r->layout = c->layout;
			r->segs = c->segs;
			if (w->bufs)
				r->buf = w->bufs + (size_t)((q - w->q0) * depth + i) * c->bs;
			else
				r->nocopy = true;
			prepare(w, q, r);
			rc = vqfe_submit(fe, q, r);
			if (rc == -EAGAIN) {
				fprintf(stderr, "%s: queue %u full at depth %u\n", prog, q, i);
				break;
			}
			if (rc < 0) {
				wfail(w, "submit: ", q);
				goto out;
			}
			inflight++;
			issued++;
		}
		vqfe_vq_kick(vqfe_vq(fe, q), false);
	}
	while (inflight) {
		unsigned got = 0;

		if (!stopping && stop_now(w, issued))
			stopping = true;
		for (unsigned q = w->q0; q < w->q0 + w->nq; q++) {
			unsigned resubmitted = 0;
			int n = vqfe_reap(fe, q, done, sizeof(done) / sizeof(done[0]));

			if (n < 0) {
				wfail(w, "", q);
				goto out;
			}
			got += (unsigned)n;
			for (int i = 0; i < n; i++) {
				struct vqfe_req *r = done[i];

				inflight--;
				complete(w, q, r);
				if (stopping || issued >= w->limit)
					continue;
				prepare(w, q, r);
				rc = vqfe_submit(fe, q, r);
				if (rc < 0) {
					wfail(w, "resubmit: ", q);
					goto out;
				}
				inflight++;
				issued++;
				resubmitted++;
			}
			if (resubmitted)
				vqfe_vq_kick(vqfe_vq(fe, q), false);
		}
		if (!got && inflight) {
			int to = vqfe_get_opts(fe)->timeout_ms;

			rc = w->threaded ? vqfe_vq_wait(fe, w->q0, to) : vqfe_wait_any(fe, to);
			if (rc < 0) {
				wfail(w, "", w->q0);
				goto out;
			}
		}
	}
out:
	w->t_done = vqfe_now_ns();
	return w->ret;
}

static void *worker_thread(void *arg)
{
	struct worker *w = arg;
	uint64_t one = 1;

	run_worker(w);
	if (write(w->done_fd, &one, sizeof(one)) != sizeof(one))
		abort(); /* an eventfd write cannot fail here */
	return NULL;
}

/*
 * The main thread while the queues' threads run: serve the backend channel
 * (config changes are acked, as QEMU's main loop does) until all are done.
 */
static void serve_backend(struct vqfe *fe, int done_fd, unsigned nthreads)
{
	bool backend = vqfe_backend_fd(fe) >= 0;
	uint64_t ended = 0;

	while (ended < nthreads) {
		struct pollfd p[2] = {{done_fd, POLLIN, 0}, {vqfe_backend_fd(fe), POLLIN, 0}};
		uint64_t v;

		if (poll(p, backend ? 2 : 1, -1) < 0)
			continue; /* EINTR: the signal handler set stop_flag */
		if ((p[0].revents & POLLIN) && read(done_fd, &v, sizeof(v)) == sizeof(v))
			ended += v;
		if (backend && p[1].revents && vqfe_backend_poll(fe, 0) < 0)
			backend = false; /* closed: the queues' threads see the socket go */
	}
}

static void print_stats_json(const char *name, const struct stats *s, double secs, bool comma)
{
	printf("\"%s\": {\"ios\": %" PRIu64
	       ", \"iops\": %.1f, \"mib_s\": %.2f, \"errors\": %" PRIu64
	       ", \"lat_us\": {\"mean\": %.2f, \"min\": %.2f, \"p50\": %.2f, \"p90\": %.2f, "
	       "\"p99\": %.2f, \"p99.9\": %.2f, \"max\": %.2f}}%s",
	       name, s->ios, (double)s->ios / secs, (double)s->bytes / secs / 1048576.0, s->errors,
	       s->ios ? (double)s->lat_sum / (double)s->ios / 1000.0 : 0.0,
	       (double)s->lat_min / 1000.0, pct(s, 50) / 1000.0, pct(s, 90) / 1000.0,
	       pct(s, 99) / 1000.0, pct(s, 99.9) / 1000.0, (double)s->lat_max / 1000.0,
	       comma ? ", " : "");
}

static void print_stats_text(const char *name, const struct stats *s, double secs)
{
	if (!s->ios)
		return;
	printf("%-6s IOPS %.0f, %.2f MiB/s, lat us: mean %.1f p50 %.1f p99 %.1f p99.9 %.1f max "
	       "%.1f (%" PRIu64 " ios, %" PRIu64 " errors)\n",
	       name, (double)s->ios / secs, (double)s->bytes / secs / 1048576.0,
	       (double)s->lat_sum / (double)s->ios / 1000.0, pct(s, 50) / 1000.0,
	       pct(s, 99) / 1000.0, pct(s, 99.9) / 1000.0, (double)s->lat_max / 1000.0, s->ios,
	       s->errors);
}

/* What this process (all its threads) used so far: CPU seconds, context switches. */
struct usage {
	double cpu;
	uint64_t vcsw, ivcsw;
};

static struct usage usage_now(void)
{
	struct usage u = {0, 0, 0};
	struct rusage ru;

	if (getrusage(RUSAGE_SELF, &ru))
		return u;
	u.cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
		(double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
	u.vcsw = (uint64_t)ru.ru_nvcsw;
	u.ivcsw = (uint64_t)ru.ru_nivcsw;
	return u;
}

/*
 * GET_VRING_BASE on every queue once the drivers have stopped, as QEMU does
 * when a guest stops: the back-end must have taken exactly what we made
 * available. 0 or 1.
 */
static int stop_rings(struct vqfe *fe, unsigned nq)
{
	for (unsigned q = 0; q < nq; q++) {
		struct vqfe_vq *vq = vqfe_vq(fe, q);
		uint16_t avail = le16toh(vqfe_vq_avail(vq)->idx);
		uint32_t base;

		if (vqfe_vq_stop(fe, q, &base) < 0) {
			fprintf(stderr, "%s: stopping queue %u: %s\n", prog, q, vqfe_strerror(fe));
			return 1;
		}
		if ((uint16_t)base != avail) {
			fprintf(stderr,
				"%s: queue %u stopped at avail index %u, but %u were made "
				"available\n",
				prog, q, base, avail);
			return 1;
		}
	}
	return 0;
}

static int cmd_bench(struct vqfe *fe, struct cli *c)
{
	static const char *modes[] = {"read", "write", "randread", "randwrite", "rw", "randrw"};
	unsigned nq = c->numjobs, depth = c->iodepth;
	bool threads = !c->one_thread && nq > 1;
	unsigned nw = threads ? nq : 1;
	uint64_t cap = vqfe_capacity(fe) * 512, size, nblocks, t0, t_last;
	struct worker *ws = calloc(nw, sizeof(*ws));
	struct vqfe_req *reqs = calloc((size_t)nq * depth, sizeof(*reqs));
	struct job *jobs = calloc(nq, sizeof(*jobs));
	struct qstat *qs = calloc(nq, sizeof(*qs));
	struct stats *rd = calloc(1, sizeof(*rd)), *wr = calloc(1, sizeof(*wr));
	struct stats *all = calloc(1, sizeof(*all)), *fl = calloc(1, sizeof(*fl));
	uint8_t *bufs = NULL, *expect = NULL;
	pthread_t *tids = calloc(nw, sizeof(*tids));
	uint64_t mismatches = 0;
	unsigned started = 0;
	bool known = false;
	int ret = 0, done_fd = -1;
	struct usage u0, u1;
	double secs;

	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
		known |= !strcmp(c->rw, modes[i]);
	if (!known)
		die_usage("unknown --rw '%s'", c->rw);
	if (c->verify) {
		bufs = malloc((size_t)nq * depth * c->bs);
		expect = malloc((size_t)nw * c->bs);
	}
	if (!ws || !reqs || !jobs || !qs || !rd || !wr || !all || !tids ||
	    (c->verify && (!bufs || !expect))) {
		fprintf(stderr, "%s: out of memory\n", prog);
		ret = 1;
		goto out;
	}
	if (c->offset >= cap)
		die_usage("--offset beyond the device (%" PRIu64 " bytes)", cap);
	size = c->size ? c->size : cap - c->offset;
	if (size > cap - c->offset)
		size = cap - c->offset;
	nblocks = size / c->bs;
	if (!nblocks || c->bs % 512 || c->offset % 512)
		die_usage("--bs must be a multiple of 512 and fit in --size");
	if (c->expect_path) {
		struct stat st;
		int fd;

		if (strcmp(c->rw, "read") && strcmp(c->rw, "randread"))
			die_usage("--expect takes --rw read or randread");
		fd = open(c->expect_path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) < 0) {
			fprintf(stderr, "%s: %s: %s\n", prog, c->expect_path, strerror(errno));
			ret = 1;
			if (fd >= 0)
				close(fd);
			goto out;
		}
		if ((uint64_t)st.st_size < c->offset + nblocks * c->bs)
			die_usage("--expect %s is shorter than the range read", c->expect_path);
		c->expect_len = (size_t)st.st_size;
		c->expect_map = mmap(NULL, c->expect_len, PROT_READ, MAP_PRIVATE, fd, 0);
		close(fd);
		if (c->expect_map == MAP_FAILED) {
			fprintf(stderr, "%s: mmap %s: %s\n", prog, c->expect_path, strerror(errno));
			c->expect_map = NULL;
			ret = 1;
			goto out;
		}
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	for (unsigned q = 0; q < nq; q++) {
		jobs[q].rng = c->seed * 0x100000001b3ull + q + 1;
		jobs[q].cursor = nblocks / nq * q;
	}
	u0 = usage_now();
	t0 = vqfe_now_ns();
	for (unsigned i = 0; i < nw; i++) {
		struct worker *w = &ws[i];

		w->fe = fe;
		w->c = c;
		w->threaded = threads;
		w->q0 = threads ? i : 0;
		w->nq = threads ? 1 : nq;
		w->nblocks = nblocks;
		w->t_end = t0 + (uint64_t)(c->runtime * 1e9);
		w->limit = UINT64_MAX;
		if (c->number_ios)
			w->limit =
			    threads ? c->number_ios / nq + (i < c->number_ios % nq) : c->number_ios;
		w->reqs = reqs + (size_t)w->q0 * depth;
		w->jobs = jobs + w->q0;
		w->qs = qs + w->q0;
		if (bufs) {
			w->bufs = bufs + (size_t)w->q0 * depth * c->bs;
			w->expect = expect + (size_t)i * c->bs;
		}
	}
	if (!threads) {
		run_worker(&ws[0]);
	} else {
		done_fd = eventfd(0, EFD_CLOEXEC);
		if (done_fd < 0) {
			fprintf(stderr, "%s: eventfd: %s\n", prog, strerror(errno));
			ret = 1;
			goto out;
		}
		vqfe_set_threaded(fe, true);
		for (; started < nw; started++) {
			int err;

			ws[started].done_fd = done_fd;
			err = pthread_create(&tids[started], NULL, worker_thread, &ws[started]);
			if (err) {
				fprintf(stderr, "%s: pthread_create: %s\n", prog, strerror(err));
				__atomic_store_n(&failed_flag, 1, __ATOMIC_RELAXED);
				ret = 1;
				break;
			}
		}
		serve_backend(fe, done_fd, started);
		for (unsigned i = 0; i < started; i++)
			pthread_join(tids[i], NULL);
		vqfe_set_threaded(fe, false);
	}
	t_last = t0;
	for (unsigned i = 0; i < nw; i++) {
		if (ws[i].t_done > t_last)
			t_last = ws[i].t_done;
		stats_merge(rd, &ws[i].rd);
		stats_merge(wr, &ws[i].wr);
		stats_merge(fl, &ws[i].fl);
		ret |= ws[i].ret;
	}
	secs = (double)(t_last - t0) / 1e9;
	if (secs <= 0)
		secs = 1e-9;
	for (unsigned q = 0; q < nq; q++)
		mismatches += qs[q].mismatches;
	stats_merge(all, rd);
	stats_merge(all, wr);
	/* the rings stop only after every driver has: none is left running */
	if (!ret)
		ret = stop_rings(fe, nq);
	u1 = usage_now();
	if (c->json) {
		printf("{\"rw\": \"%s\", \"bs\": %u, \"iodepth\": %u, \"numjobs\": %u, "
		       "\"runtime_s\": %.3f, \"poll\": %s, \"threads\": \"%s\", \"verify\": %s, "
		       "\"mismatches\": %" PRIu64 ", \"fe_cpu_s\": %.3f, \"fe_csw\": %" PRIu64
		       ", \"fe_ivcsw\": %" PRIu64 ", \"config_changes\": %u, \"queues\": [",
		       c->rw, c->bs, depth, nq, secs, vqfe_get_opts(fe)->poll ? "true" : "false",
		       c->one_thread ? "one" : "per-queue", c->verify ? "true" : "false",
		       mismatches, u1.cpu - u0.cpu, u1.vcsw - u0.vcsw, u1.ivcsw - u0.ivcsw,
		       vqfe_config_changes(fe));
		for (unsigned q = 0; q < nq; q++)
			printf("{\"queue\": %u, \"reads\": %" PRIu64 ", \"writes\": %" PRIu64
			       ", \"errors\": %" PRIu64 ", \"mismatches\": %" PRIu64
			       ", \"kicks\": %" PRIu64 ", \"calls\": %" PRIu64 "}%s",
			       q, qs[q].reads, qs[q].writes, qs[q].errors, qs[q].mismatches,
			       vqfe_vq_kicks(vqfe_vq(fe, q)), vqfe_vq_calls(fe, q),
			       q + 1 < nq ? ", " : "], ");
		print_stats_json("read", rd, secs, true);
		print_stats_json("write", wr, secs, true);
		if (c->flush_every)
			print_stats_json("flush", fl, secs, true);
		print_stats_json("total", all, secs, false);
		printf("}\n");
	} else {
		printf("%s bs=%u iodepth=%u numjobs=%u runtime=%.2fs threads=%s\n", c->rw, c->bs,
		       depth, nq, secs, c->one_thread ? "one" : "per-queue");
		print_stats_text("read", rd, secs);
		print_stats_text("write", wr, secs);
		print_stats_text("flush", fl, secs);
		print_stats_text("total", all, secs);
		for (unsigned q = 0; nq > 1 && q < nq; q++)
			printf("queue %u: %" PRIu64 " reads, %" PRIu64 " writes, %" PRIu64
			       " errors, %" PRIu64 " kicks, %" PRIu64 " calls\n",
			       q, qs[q].reads, qs[q].writes, qs[q].errors,
			       vqfe_vq_kicks(vqfe_vq(fe, q)), vqfe_vq_calls(fe, q));
		if (c->verify)
			printf("verify: %" PRIu64 " mismatches\n", mismatches);
	}
	if (!ret && all->errors)
		ret = 3;
	if (!ret && mismatches)
		ret = 1;
out:
	if (done_fd >= 0)
		close(done_fd);
	free(ws);
	free(tids);
	free(reqs);
	free(jobs);
	free(qs);
	free(bufs);
	free(expect);
	if (c->expect_map)
		munmap((void *)c->expect_map, c->expect_len);
	free(rd);
	free(wr);
	free(all);
	free(fl);
	return ret;
}

/* ---- main ---- */

enum {
	O_QUEUES = 256,
	O_QUEUE,
	O_QUEUE_SIZE,
	O_REGIONS,
	O_SEPARATE_FDS,
	O_ADD_MEM_REG,
	O_NO_EVENT_IDX,
	O_NO_INDIRECT,
	O_NO_REPLY_ACK,
	O_NO_BACKEND_REQ,
	O_LAYOUT,
	O_SEGS,
	O_POLL,
	O_TIMEOUT,
	O_UNMAP,
	O_JSON,
	O_SIZE,
	O_OFFSET,
	O_SEED,
	O_BS,
	O_RW,
	O_RWMIXREAD,
	O_IODEPTH,
	O_NUMJOBS,
	O_RUNTIME,
	O_NUMBER_IOS,
	O_FLUSH_EVERY,
	O_THREADS,
	O_VERIFY,
	O_EXPECT,
	O_HELP,
};

static const struct option longopts[] = {
    {"queues", required_argument, NULL, O_QUEUES},
    {"queue", required_argument, NULL, O_QUEUE},
    {"queue-size", required_argument, NULL, O_QUEUE_SIZE},
    {"regions", required_argument, NULL, O_REGIONS},
    {"separate-fds", no_argument, NULL, O_SEPARATE_FDS},
    {"add-mem-reg", no_argument, NULL, O_ADD_MEM_REG},
    {"no-event-idx", no_argument, NULL, O_NO_EVENT_IDX},
    {"no-indirect", no_argument, NULL, O_NO_INDIRECT},
    {"no-reply-ack", no_argument, NULL, O_NO_REPLY_ACK},
    {"no-backend-req", no_argument, NULL, O_NO_BACKEND_REQ},
    {"layout", required_argument, NULL, O_LAYOUT},
    {"segs", required_argument, NULL, O_SEGS},
    {"poll", no_argument, NULL, O_POLL},
    {"timeout", required_argument, NULL, O_TIMEOUT},
    {"unmap", no_argument, NULL, O_UNMAP},
    {"json", no_argument, NULL, O_JSON},
    {"size", required_argument, NULL, O_SIZE},
    {"offset", required_argument, NULL, O_OFFSET},
    {"seed", required_argument, NULL, O_SEED},
    {"bs", required_argument, NULL, O_BS},
    {"rw", required_argument, NULL, O_RW},
    {"rwmixread", required_argument, NULL, O_RWMIXREAD},
    {"iodepth", required_argument, NULL, O_IODEPTH},
    {"numjobs", required_argument, NULL, O_NUMJOBS},
    {"runtime", required_argument, NULL, O_RUNTIME},
    {"number-ios", required_argument, NULL, O_NUMBER_IOS},
    {"flush-every", required_argument, NULL, O_FLUSH_EVERY},
    {"threads", required_argument, NULL, O_THREADS},
    {"verify", no_argument, NULL, O_VERIFY},
    {"expect", required_argument, NULL, O_EXPECT},
    {"help", no_argument, NULL, O_HELP},
    {NULL, 0, NULL, 0},
};

static unsigned pow2_at_least(unsigned v)
{
	unsigned p = 1;

	while (p < v)
		p <<= 1;
	return p;
}

int main(int argc, char **argv)
{
	struct cli c = {.rw = "randread",
			.rwmixread = 50,
			.iodepth = 1,
			.numjobs = 1,
			.runtime = 10,
			.seed = 1,
			.bs = 4096};
	bool queues_set = false, qsize_set = false, layout_set = false;
	const char *cmd, *sock;
	struct vqfe *fe;
	char **args;
	int nargs, opt, ret;

	vqfe_opts_init(&c.o);
	while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (opt) {
		case O_QUEUES:
			c.o.num_queues = parse_uint(optarg, "--queues", VQFE_MAX_QUEUES);
			queues_set = true;
			break;
		case O_QUEUE:
			c.queue = parse_uint(optarg, "--queue", VQFE_MAX_QUEUES - 1);
			break;
		case O_QUEUE_SIZE:
			c.o.queue_size = parse_uint(optarg, "--queue-size", 32768);
			qsize_set = true;
			break;
		case O_REGIONS:
			c.o.num_regions = parse_uint(optarg, "--regions", VQFE_MAX_REGIONS);
			break;
		case O_SEPARATE_FDS:
			c.o.separate_fds = true;
			break;
		case O_ADD_MEM_REG:
			c.o.add_mem_reg = true;
			break;
		case O_NO_EVENT_IDX:
			c.o.no_event_idx = true;
			break;
		case O_NO_INDIRECT:
			c.o.no_indirect = true;
			break;
		case O_NO_REPLY_ACK:
			c.o.no_reply_ack = true;
			break;
		case O_NO_BACKEND_REQ:
			c.o.no_backend_req = true;
			break;
		case O_LAYOUT:
			c.layout = parse_layout(optarg);
			layout_set = true;
			break;
		case O_SEGS:
			c.segs = parse_uint(optarg, "--segs", 250);
			break;
		case O_POLL:
			c.o.poll = true;
			break;
		case O_TIMEOUT:
			c.o.timeout_ms = (int)parse_uint(optarg, "--timeout", INT_MAX);
			break;
		case O_UNMAP:
			c.unmap = true;
			break;
		case O_JSON:
			c.json = true;
			break;
		case O_SIZE:
			c.size = parse_size(optarg, "--size");
			break;
		case O_OFFSET:
			c.offset = parse_size(optarg, "--offset");
			break;
		case O_SEED:
			c.seed = parse_size(optarg, "--seed");
			break;
		case O_BS:
			c.bs = parse_uint(optarg, "--bs", 1u << 30);
			c.bs_set = true;
			break;
		case O_RW:
			c.rw = optarg;
			break;
		case O_RWMIXREAD:
			c.rwmixread = parse_uint(optarg, "--rwmixread", 100);
			break;
		case O_IODEPTH:
			c.iodepth = parse_uint(optarg, "--iodepth", 4096);
			break;
		case O_NUMJOBS:
			c.numjobs = parse_uint(optarg, "--numjobs", VQFE_MAX_QUEUES);
			break;
		case O_RUNTIME: {
			char *end;

			c.runtime = strtod(optarg, &end);
			if (*end || end == optarg || !(c.runtime > 0))
				die_usage("bad --runtime '%s'", optarg);
			break;
		}
		case O_NUMBER_IOS:
			c.number_ios = parse_size(optarg, "--number-ios");
			break;
		case O_FLUSH_EVERY:
			c.flush_every = parse_uint(optarg, "--flush-every", 1u << 30);
			break;
		case O_THREADS:
			if (!strcmp(optarg, "one"))
				c.one_thread = true;
			else if (!strcmp(optarg, "per-queue"))
				c.one_thread = false;
			else
				die_usage("--threads takes per-queue or one, not '%s'", optarg);
			break;
		case O_VERIFY:
			c.verify = true;
			break;
		case O_EXPECT:
			c.verify = true;
			c.expect_path = optarg;
			break;
		case 'h':
		case O_HELP:
			usage(stdout);
			return 0;
		default:
			fprintf(stderr, "%s: bad option (try --help)\n", prog);
			return 2;
		}
	}
	args = argv + optind;
	nargs = argc - optind;
	if (nargs < 2)
		die_usage("need a command and a socket path");
	cmd = args[0];
	sock = args[1];
	args += 2;
	nargs -= 2;
	if (c.iodepth < 1 || c.numjobs < 1)
		die_usage("--iodepth and --numjobs must be at least 1");
	if (!strcmp(cmd, "bench")) {
		/* like Linux virtio_blk, chains go into indirect tables when offered */
		bool indirect = layout_set ? (c.layout & VQFE_L_INDIRECT) : !c.o.no_indirect;
		unsigned need = indirect ? c.iodepth : c.iodepth * (2 + (c.segs ? c.segs : 1));

		if (!queues_set)
			c.o.num_queues = c.numjobs;
		else if (c.o.num_queues < c.numjobs)
			die_usage("--queues must be at least --numjobs");
		if (c.bs == 0)
			die_usage("--bs must be positive");
		c.o.data_size = c.bs;
		c.o.slots = c.iodepth;
		c.o.scratch_size = 0;
		if (!qsize_set)
			c.o.queue_size = pow2_at_least(need < 128 ? 128 : need);
		if (c.o.queue_size > 32768 || c.o.slots > c.o.queue_size)
			die_usage("--iodepth too large for the queue size");
		if (nargs)
			die_usage("unexpected argument '%s'", args[0]);
	} else if (!strcmp(cmd, "verify")) {
		if (c.bs_set) {
			if (!c.bs || c.bs % 512)
				die_usage("--bs must be a positive multiple of 512");
			c.o.data_size = c.bs;
		}
		if (nargs)
			die_usage("unexpected argument '%s'", args[0]);
	}
	if (c.queue >= c.o.num_queues)
		die_usage("--queue %u but only %u queues", c.queue, c.o.num_queues);
	/* validate the positional arguments before connecting */
	if (!strcmp(cmd, "info") || !strcmp(cmd, "flush") || !strcmp(cmd, "get-id")) {
		if (nargs)
			die_usage("unexpected argument '%s'", args[0]);
	} else if (!strcmp(cmd, "read") || !strcmp(cmd, "discard") ||
		   !strcmp(cmd, "write-zeroes")) {
		if (nargs != 2)
			die_usage("%s takes SOCK OFF LEN", cmd);
	} else if (!strcmp(cmd, "write")) {
		if (nargs < 1 || nargs > 2)
			die_usage("write takes SOCK OFF [LEN]");
	} else if (!strcmp(cmd, "set-wce")) {
		if (nargs != 1)
			die_usage("set-wce takes SOCK 0|1");
	} else if (strcmp(cmd, "bench") && strcmp(cmd, "verify")) {
		die_usage("unknown command '%s'", cmd);
	}
	if (vqfe_open(&fe, sock, &c.o) < 0)
		return 1;
	if (!strcmp(cmd, "bench") && !layout_set &&
	    vqfe_has_feature(fe, VIRTIO_RING_F_INDIRECT_DESC))
		c.layout |= VQFE_L_INDIRECT;
	if (!strcmp(cmd, "info"))
		ret = cmd_info(fe, &c);
	else if (!strcmp(cmd, "read"))
		ret = cmd_read(fe, &c, parse_offset(args[0]), parse_size(args[1], "length"));
	else if (!strcmp(cmd, "write"))
		ret = cmd_write(fe, &c, parse_offset(args[0]),
				nargs > 1 ? parse_size(args[1], "length") : 0, nargs == 1);
	else if (!strcmp(cmd, "flush"))
		ret = report(fe, "flush", vqfe_flush(fe, c.queue));
	else if (!strcmp(cmd, "discard"))
		ret = cmd_discard_wz(fe, &c, VIRTIO_BLK_T_DISCARD, parse_offset(args[0]),
				     parse_size(args[1], "length"));
	else if (!strcmp(cmd, "write-zeroes"))
		ret = cmd_discard_wz(fe, &c, VIRTIO_BLK_T_WRITE_ZEROES, parse_offset(args[0]),
				     parse_size(args[1], "length"));
	else if (!strcmp(cmd, "get-id"))
		ret = cmd_get_id(fe, &c);
	else if (!strcmp(cmd, "set-wce"))
		ret = cmd_set_wce(fe, args[0]);
	else if (!strcmp(cmd, "verify"))
		ret = cmd_verify(fe, &c);
	else
		ret = cmd_bench(fe, &c);
	vqfe_close(fe);
	return ret;
}
