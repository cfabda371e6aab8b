/* SPDX-License-Identifier: MIT */
/*
 * vqcowd — the vhost-user-blk daemon: the glue between vhost/ (protocol and
 * rings) and blk/ (virtio-blk semantics over an image), all driven by one
 * io/ loop. The only file that knows both vhost.h and blk.h.
 *
 * Event flow:
 *  - vhost/ asks us to watch fds (listening socket, connection, kick
 *    eventfds): each watch is a multishot io_poll; its completions call the
 *    vhost callback. unwatch cancels the poll; the record is freed when the
 *    final -ECANCELED arrives (so a callback in progress never sees freed
 *    memory, and a reused fd number gets a fresh record).
 *  - queue_kick pops every available element into its slot (struct dreq:
 *    the vq_elem first, then the blk_req) and submits it to blk/. Kicks are
 *    suppressed while popping (vq_disable_notify / vq_enable_notify).
 *  - A request's completion pushes it to the used ring and marks its queue
 *    dirty; a deferred hook (run once per loop iteration) calls vq_notify
 *    once per dirty queue: one interrupt per queue per iteration at most.
 *  - SIGTERM/SIGINT arrive on a signalfd polled by the loop: stop accepting
 *    connections and popping requests, wait for in-flight requests, flush the
 *    image, exit 0. SIGHUP re-reads the image size (outside resize) and, if
 *    it changed, sends a config-change notice to the frontend.
 *
 *  - --io-threads N > 1: N threads serve the queues, queue i on thread
 *    i mod N: thread 0 is the main thread, threads 1..N-1 are I/O threads
 *    (struct iothread, each its own io_loop). A raw image: the queue's
 *    thread does its kick poll, pop, submit, image I/O, push, call. A qcow2
 *    image (img.mt_submit) the same, with or without --qmp: an I/O thread
 *    serves cached, allocated clusters itself and hands the rest to the main
 *    thread, the engine's only owner, and back (img/img_qcow2.c); the main
 *    thread's own queues take the owner's path as with one thread (no hop,
 *    nothing published), so a device that uses one queue runs as with
 *    --io-threads 1, and 2 queues on 2 CPUs keep 2 threads busy, not 3. The
 *    main thread keeps the sockets, signals and the
 *    control path, and parks the I/O threads (pause_all) around each of its
 *    calls into vhost/ and blk/; QMP operations that swap the image under
 *    blk/ or hook its writes (src/layers.c) park them too (ctl.park), and a
 *    request held meanwhile starts again on its queue's thread. HACKING.md,
 *    "I/O threads", has the table and the rules.
 *
 * Backend program conventions (vhost-user.rst): --socket-path or --fd,
 * --print-capabilities prints {"type": "block", "features": [...]} and the
 * protocol features a connection is offered (print_capabilities).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cap-ng.h>
#include <linux/virtio_blk.h>

#include "blk.h"
#include "img.h"
#include "io.h"
#include "util.h"
#include "vhost.h"
#include "vlog.h"

#include "control.h"
#include "sandbox.h"

#define MAX_QUEUES      64
#define MAX_IO_THREADS  MAX_QUEUES /* more threads than queues would idle */
#define MEM_REGIONS_MAX 64         /* guest memory regions registered as io_uring buffers */
/* --io-threads-consolidate without the option (=on|off overrides it; cons_*) */
#define CONSOLIDATE_DEFAULT     true
#define CONSOLIDATE_DEFAULT_STR "on"

#define container_of(p, T, m) ((T *)((char *)(p)-offsetof(T, m)))

/* ---- logging ---- */

/* log/ writes the lines (levels, timestamps or journal priorities, rate limit). */
#define log_err(...)  vlog(VLOG_ERROR, NULL, __VA_ARGS__)
#define log_warn(...) vlog(VLOG_WARN, NULL, __VA_ARGS__)
#define logmsg(...)   vlog(VLOG_INFO, NULL, __VA_ARGS__)
#define log_dbg(...)  vlog(VLOG_DEBUG, NULL, __VA_ARGS__)

/* ---- options ---- */

struct options {
	const char *socket_path;
	int fd;
	const char *blk_file;
	const char *format;
	bool read_only;
	bool force_share;
	bool incoming; /* destination of a live migration: start without the image's locks */
	unsigned num_queues;
	unsigned io_threads; /* 0 = not given */
	unsigned queue_size;
	const char *serial;
	unsigned lbs;
	bool writethrough;
	uint64_t l2_cache_size;
	uint64_t cache_entry_size;
	uint64_t poll_ns;
	uint64_t submit_batch;
	bool no_l2_prefetch;
	bool no_cluster_fill;
	bool blkdev_zero_ahead;
	bool fixed_buffers;
	bool poll_spare;         /* --poll-spare-cpus */
	bool poll_yield;         /* --poll-yield */
	bool consolidate;        /* --io-threads-consolidate[=on|off] (CONSOLIDATE_DEFAULT) */
	bool consolidate_set;    /* given on the command line (a warning if it cannot apply) */
	unsigned poll_hybrid;    /* --poll-hybrid PCT, 0 = off */
	unsigned poll_high_hold; /* --poll-high-hold N, 0 = off */
	unsigned contended;      /* --io-threads-contended PCT, 0 = off (cont_*) */
	bool no_fixed_files;
	bool no_seccomp;
	const char *user;
	const char *group;
	const char *qmp_path;
	int qmp_fd; /* --qmp-fd, -1 = none */
	const char *node_name;
	int log_level; /* enum vlog_level, -1 = not given */
};

static void usage(FILE *f)
{
	fputs(
	    "Usage: vqcowd (--socket-path PATH | --fd N) --blk-file FILE [options]\n"
	    "Serve a disk image (raw or qcow2) over vhost-user-blk.\n"
	    "\n"
	    "  --socket-path PATH          listen on this UNIX socket (mode 0600)\n"
	    "  --fd N                      use this already-listening socket fd\n"
	    "  --blk-file FILE             the image: raw file, block device or qcow2\n"
	    "  --format raw|qcow2          do not probe the format\n"
	    "  --read-only                 export read-only\n"
	    "  --force-share               with --read-only: share the image with writers\n"
	    "                              (no lock against them; qemu-img's -U)\n"
	    "  --incoming                  live-migration destination: open the image without\n"
	    "                              its locks and metadata; take them when the rings start\n"
	    "  --num-queues N              number of virtqueues offered (default and max 64)\n"
	    "  --io-threads N              threads serving the queues, the main thread\n"
	    "                              included (queue i on thread i mod N, thread 0\n"
	    "                              the main one; default: one per queue up to the\n"
	    "                              host's CPUs; max 64)\n"
	    "  --io-threads-consolidate[=on|off]\n"
	    "                              at low load (each queue at most 1 request in\n"
	    "                              flight) the I/O threads hand their queues to the\n"
	    "                              main thread, which polls for all; back when the\n"
	    "                              load rises (default " CONSOLIDATE_DEFAULT_STR ")\n"
	    "  --queue-size Q              largest queue size (power of 2, default 256, max "
	    "1024)\n"
	    "  --serial STR                GET_ID serial (at most 20 bytes)\n"
	    "  --logical-block-size 512|4096\n"
	    "  --writethrough              start with the write cache disabled\n"
	    "  --l2-cache-size BYTES       qcow2 L2 cache budget (suffixes K, M, G)\n"
	    "  --cache-entry-size BYTES    qcow2 metadata cache slice size\n"
	    "  --no-l2-prefetch            qcow2: do not read the L2 tables in the background\n"
	    "  --no-cluster-fill           qcow2: write only the data into a new cluster, not\n"
	    "                              the whole cluster with zeroes\n"
	    "  --blockdev-zero-ahead       qcow2 on a block device that offloads write-zeroes:\n"
	    "                              zero the space ahead of allocation, so that a new\n"
	    "                              cluster's link needs no fdatasync of its data first\n"
	    "  --poll-ns NS                busy-poll before sleeping while at most 4 requests\n"
	    "                              are in flight, as long as events come in time, at\n"
	    "                              most NS ns (default 50000; 0 = off)\n"
	    "  --poll-spare-cpus           I/O threads busy-poll only on the CPUs they leave\n"
	    "                              spare (of the daemon's affinity mask)\n"
	    "  --poll-yield                a busy poll yields its CPU every few spins and\n"
	    "                              ends once another thread took it (the front-end's,\n"
	    "                              e.g. a guest's vCPUs on the same CPUs)\n"
	    "  --poll-hybrid PCT           after submitting file I/O, sleep PCT % of the\n"
	    "                              learnt wait for its completion before polling\n"
	    "                              (0..90, default 0 = off)\n"
	    "  --poll-high-hold N          after a request popped with more than 4 in flight\n"
	    "                              on its thread, busy-poll there only once N requests\n"
	    "                              in a row were popped with at most 4 (default 0 = off)\n"
	    "  --io-threads-contended PCT  an I/O thread that waits for a CPU PCT % of the\n"
	    "                              time or more gives its queues to the main thread\n"
	    "                              until the main thread waits less than PCT/2 %;\n"
	    "                              no busy polling while so (1..100, default 0 = off)\n"
	    "  --submit-batch N            start I/O once N requests are prepared (default 2;\n"
	    "                              0 = once per loop iteration)\n"
	    "  --fixed-buffers             register the guest memory with io_uring (pins all of\n"
	    "                              it; not with balloon, virtio-mem or postcopy)\n"
	    "  --no-fixed-files            do not register the image files with io_uring\n"
	    "  --user U, --group G         switch to this user/group after opening\n"
	    "  --no-seccomp                do not install the system call filter\n"
	    "  --qmp PATH                  serve QMP commands on this UNIX socket (mode 0600)\n"
	    "  --qmp-fd N                  serve QMP on this already-listening socket fd\n"
	    "                              (systemd socket activation)\n"
	    "  --node-name NAME            the image's node name in QMP commands (disk0)\n"
	    "  --log-level LEVEL           error, warn, info (default) or debug (every\n"
	    "                              vhost-user message received)\n"
	    "  --print-capabilities        print capabilities as JSON and exit\n"
	    "  -h, --help, --version\n",
	    f);
}

/* A plain number, or with @suffixes a size as qemu-img writes it (util.h). */
static int parse_u64(const char *s, uint64_t *out, bool suffixes)
{
	return suffixes ? util_parse_size(s, out) : util_parse_uint(s, out);
}

static int bad_value(const char *opt, const char *val, const char *what)
{
	fprintf(stderr, "vqcowd: invalid value '%s' for --%s: %s\n", val, opt, what);
	return 2;
}

/*
 * Test seam (VQCOWD_TEST_CRASH=POINT:N): SIGKILL ourselves the N-th time
 * vhost/ passes crash point POINT (vhost_crash_point_name()), so that tests
 * kill a real daemon at an exact instant of inflight tracking, which no
 * signal sent from outside can hit. Unset (always outside tests), no hook is
 * installed and the points cost a predicted branch each.
 */
static enum vhost_crash_point crash_point;
static unsigned long crash_left;

static void crash_hook(enum vhost_crash_point p)
{
	if (p != crash_point || --crash_left)
		return;
	log_warn("VQCOWD_TEST_CRASH: killed at %s", vhost_crash_point_name(p));
	raise(SIGKILL);
}

/* 0 (armed or not asked for) or -1 after printing why the value is bad. */
static int crash_setup(void)
{
	const char *e = getenv("VQCOWD_TEST_CRASH"), *colon;
	char *end;

	if (!e || !*e)
		return 0;
	colon = strchr(e, ':');
	for (unsigned p = 0; colon && p < VHOST_CRASH_NPOINTS; p++) {
		const char *n = vhost_crash_point_name((enum vhost_crash_point)p);

		if (strlen(n) != (size_t)(colon - e) || strncmp(e, n, strlen(n)) != 0)
			continue;
		errno = 0;
		crash_left = strtoul(colon + 1, &end, 10);
		if (errno || *end || !crash_left)
			break;
		crash_point = (enum vhost_crash_point)p;
		vhost_set_crash_hook(crash_hook);
		log_warn("VQCOWD_TEST_CRASH: armed at %s:%lu (a test seam)", n, crash_left);
		return 0;
	}
	fprintf(stderr,
		"vqcowd: VQCOWD_TEST_CRASH=%s: expected POINT:N, POINT one of "
		"pop-fetched, pop-marked, push-linked, push-used, push-done\n",
		e);
	return -1;
}

/* Protocol features the glue adds to those vhost/ implements (none). */
#define DAEMON_PROTOCOL_FEATURES 0

/* One JSON array member per line: @first says whether a comma goes before. */
static void caps_item(const char *name, bool *first)
{
	printf("%s\n    \"%s\"", *first ? "" : ",", name);
	*first = false;
}

static void print_capabilities(void)
{
	/* docs/interop/vhost-user.json: VHostUserBackendCapabilitiesBlock
	 * ("type", "features": the --read-only and --blk-file conventions);
	 * then, outside that schema (front-ends that read it ignore unknown
	 * members), what a connection is really offered: the protocol features
	 * and vhost/'s own feature bits, from the masks GET_PROTOCOL_FEATURES
	 * and GET_FEATURES answer with (reconnect: inflight-shmfd; live
	 * migration: log-shmfd + log-all). */
	struct vhost_dev_ops ops = {.protocol_features = DAEMON_PROTOCOL_FEATURES};
	uint64_t proto = vhost_ops_protocol_features(&ops);
	bool first = true;

	printf("{\n  \"type\": \"block\",\n  \"features\": [");
	caps_item("read-only", &first);
	caps_item("blk-file", &first);
	printf("\n  ],\n  \"vhost-user-protocol-features\": [");
	first = true;
	for (unsigned b = 0; b < 64; b++) {
		const char *n = vhost_protocol_feature_name(b);

		if ((proto >> b) & 1)
			caps_item(n ? n : "unknown", &first);
	}
	printf("\n  ],\n  \"vhost-features\": [");
	first = true;
	if ((vhost_ops_features(&ops) >> VHOST_FEATURE_LOG_ALL) & 1)
		caps_item("log-all", &first);
	printf("\n  ]\n}\n");
}

/*
 * Parse the command line. Returns -1 to continue, else an exit status
 * (0 after --help/--version/--print-capabilities).
 */
static int parse_args(int argc, char **argv, struct options *o)
{
	enum {
		OPT_SOCKET = 256,
		OPT_FD,
		OPT_BLK_FILE,
		OPT_FORMAT,
		OPT_RO,
		OPT_FORCE_SHARE,
		OPT_NQ,
		OPT_IOTHREADS,
		OPT_QSIZE,
		OPT_SERIAL,
		OPT_LBS,
		OPT_WT,
		OPT_L2,
		OPT_CES,
		OPT_POLL,
		OPT_POLL_SPARE,
		OPT_POLL_YIELD,
		OPT_POLL_HYBRID,
		OPT_POLL_HIGH_HOLD,
		OPT_CONTENDED,
		OPT_CONSOLIDATE,
		OPT_SUBMIT,
		OPT_NOPREFETCH,
		OPT_NOFILL,
		OPT_ZAH,
		OPT_FIXBUF,
		OPT_NOFIXFILE,
		OPT_NOSECCOMP,
		OPT_USER,
		OPT_GROUP,
		OPT_LOGLEVEL,
		OPT_QMP,
		OPT_QMP_FD,
		OPT_NODE,
		OPT_CAPS,
		OPT_INCOMING,
		OPT_HELP,
		OPT_VERSION,
	};
	static const struct option longopts[] = {
	    {"socket-path", required_argument, NULL, OPT_SOCKET},
	    {"fd", required_argument, NULL, OPT_FD},
	    {"blk-file", required_argument, NULL, OPT_BLK_FILE},
	    {"format", required_argument, NULL, OPT_FORMAT},
	    {"read-only", no_argument, NULL, OPT_RO},
	    {"force-share", no_argument, NULL, OPT_FORCE_SHARE},
	    {"num-queues", required_argument, NULL, OPT_NQ},
	    {"io-threads", required_argument, NULL, OPT_IOTHREADS},
	    {"queue-size", required_argument, NULL, OPT_QSIZE},
	    {"serial", required_argument, NULL, OPT_SERIAL},
	    {"logical-block-size", required_argument, NULL, OPT_LBS},
	    {"writethrough", no_argument, NULL, OPT_WT},
	    {"l2-cache-size", required_argument, NULL, OPT_L2},
	    {"cache-entry-size", required_argument, NULL, OPT_CES},
	    {"poll-ns", required_argument, NULL, OPT_POLL},
	    {"poll-spare-cpus", no_argument, NULL, OPT_POLL_SPARE},
	    {"poll-yield", no_argument, NULL, OPT_POLL_YIELD},
	    {"poll-hybrid", required_argument, NULL, OPT_POLL_HYBRID},
	    {"poll-high-hold", required_argument, NULL, OPT_POLL_HIGH_HOLD},
	    {"io-threads-consolidate", optional_argument, NULL, OPT_CONSOLIDATE},
	    {"io-threads-contended", required_argument, NULL, OPT_CONTENDED},
	    {"submit-batch", required_argument, NULL, OPT_SUBMIT},
	    {"no-l2-prefetch", no_argument, NULL, OPT_NOPREFETCH},
	    {"no-cluster-fill", no_argument, NULL, OPT_NOFILL},
	    {"blockdev-zero-ahead", no_argument, NULL, OPT_ZAH},
	    {"fixed-buffers", no_argument, NULL, OPT_FIXBUF},
	    {"no-fixed-files", no_argument, NULL, OPT_NOFIXFILE},
	    {"no-seccomp", no_argument, NULL, OPT_NOSECCOMP},
	    {"user", required_argument, NULL, OPT_USER},
	    {"group", required_argument, NULL, OPT_GROUP},
	    {"log-level", required_argument, NULL, OPT_LOGLEVEL},
	    {"qmp", required_argument, NULL, OPT_QMP},
	    {"qmp-fd", required_argument, NULL, OPT_QMP_FD},
	    {"node-name", required_argument, NULL, OPT_NODE},
	    {"print-capabilities", no_argument, NULL, OPT_CAPS},
	    {"incoming", no_argument, NULL, OPT_INCOMING},
	    {"help", no_argument, NULL, OPT_HELP},
	    {"version", no_argument, NULL, OPT_VERSION},
	    {NULL, 0, NULL, 0},
	};
	uint64_t v;
	int c;

	memset(o, 0, sizeof(*o));
	o->fd = -1;
	o->qmp_fd = -1;
	o->log_level = -1;
	/* QEMU's vhost-user-blk asks for one queue per vCPU unless num-queues
	 * is set on the device, and refuses a back-end offering fewer: offer
	 * enough for guests up to 64 vCPUs. Unused queues cost a small struct
	 * each; rings and request slots are allocated when a queue is set up. */
	o->num_queues = MAX_QUEUES;
	o->queue_size = 256;
	o->submit_batch = 2;
	o->poll_ns = 50000;
	o->consolidate = CONSOLIDATE_DEFAULT;
	o->lbs = 512;
	o->node_name = "disk0";
	opterr = 0;
	optind = 1;
	/* ":" first: a missing value returns ':' (not '?'), so the two errors
	 * can be told apart; -h is --help. */
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_SOCKET:
			if (!*optarg)
				return bad_value("socket-path", optarg, "empty path");
			o->socket_path = optarg;
			break;
		case OPT_FD:
			if (parse_u64(optarg, &v, false) < 0 || v > INT_MAX)
				return bad_value("fd", optarg, "not a file descriptor number");
			if (fcntl((int)v, F_GETFD) < 0)
				return bad_value("fd", optarg, "not an open file descriptor");
			o->fd = (int)v;
			break;
		case OPT_BLK_FILE:
			if (!*optarg)
				return bad_value("blk-file", optarg, "empty path");
			o->blk_file = optarg;
			break;
		case OPT_FORMAT:
			if (strcmp(optarg, "raw") != 0 && strcmp(optarg, "qcow2") != 0)
				return bad_value("format", optarg, "expected raw or qcow2");
			o->format = optarg;
			break;
		case OPT_RO:
			o->read_only = true;
			break;
		case OPT_FORCE_SHARE:
			o->force_share = true;
			break;
		case OPT_INCOMING:
			o->incoming = true;
			break;
		case OPT_NQ:
			if (parse_u64(optarg, &v, false) < 0 || v < 1 || v > MAX_QUEUES)
				return bad_value("num-queues", optarg, "expected 1..64");
			o->num_queues = (unsigned)v;
			break;
		case OPT_IOTHREADS:
			if (parse_u64(optarg, &v, false) < 0 || v < 1 || v > MAX_IO_THREADS)
				return bad_value("io-threads", optarg, "expected 1..64");
			o->io_threads = (unsigned)v;
			break;
		case OPT_QSIZE:
			if (parse_u64(optarg, &v, false) < 0 || v < 2 || v > VQ_MAX_SIZE ||
			    (v & (v - 1)))
				return bad_value("queue-size", optarg,
						 "expected a power of two in 2..1024");
			o->queue_size = (unsigned)v;
			break;
		case OPT_SERIAL:
			if (strlen(optarg) > VIRTIO_BLK_ID_BYTES)
				return bad_value("serial", optarg, "longer than 20 bytes");
			o->serial = optarg;
			break;
		case OPT_LBS:
			if (parse_u64(optarg, &v, false) < 0 || (v != 512 && v != 4096))
				return bad_value("logical-block-size", optarg,
						 "expected 512 or 4096");
			o->lbs = (unsigned)v;
			break;
		case OPT_WT:
			o->writethrough = true;
			break;
		case OPT_L2:
			if (parse_u64(optarg, &v, true) < 0)
				return bad_value("l2-cache-size", optarg, "expected a byte count");
			o->l2_cache_size = v;
			break;
		case OPT_CES:
			if (parse_u64(optarg, &v, true) < 0 || v < 512 || v > (2u << 20) ||
			    (v & (v - 1)))
				return bad_value("cache-entry-size", optarg,
						 "expected a power of two in 512..2M");
			o->cache_entry_size = v;
			break;
		case OPT_POLL:
			if (parse_u64(optarg, &v, false) < 0 || v > 1000000000ull)
				return bad_value("poll-ns", optarg, "expected 0..1000000000");
			o->poll_ns = v;
			break;
		case OPT_SUBMIT:
			if (parse_u64(optarg, &v, false) < 0 || v > 4096)
				return bad_value("submit-batch", optarg, "expected 0..4096");
			o->submit_batch = v;
			break;
		case OPT_NOPREFETCH:
			o->no_l2_prefetch = true;
			break;
		case OPT_NOFILL:
			o->no_cluster_fill = true;
			break;
		case OPT_ZAH:
			o->blkdev_zero_ahead = true;
			break;
		case OPT_FIXBUF:
			o->fixed_buffers = true;
			break;
		case OPT_POLL_SPARE:
			o->poll_spare = true;
			break;
		case OPT_POLL_YIELD:
			o->poll_yield = true;
			break;
		case OPT_CONSOLIDATE:
			/* as QEMU's on|off properties; bare: on */
			if (!optarg || strcmp(optarg, "on") == 0)
				o->consolidate = true;
			else if (strcmp(optarg, "off") == 0)
				o->consolidate = false;
			else
				return bad_value("io-threads-consolidate", optarg,
						 "expected on or off");
			o->consolidate_set = true;
			break;
		case OPT_POLL_HYBRID:
			if (parse_u64(optarg, &v, false) < 0 || v > IO_POLL_HYBRID_PCT_MAX)
				return bad_value("poll-hybrid", optarg, "expected 0..90");
			o->poll_hybrid = (unsigned)v;
			break;
		case OPT_POLL_HIGH_HOLD:
			if (parse_u64(optarg, &v, false) < 0 || v > 1000000)
				return bad_value("poll-high-hold", optarg, "expected 0..1000000");
			o->poll_high_hold = (unsigned)v;
			break;
		case OPT_CONTENDED:
			if (parse_u64(optarg, &v, false) < 0 || v > 100)
				return bad_value("io-threads-contended", optarg, "expected 0..100");
			o->contended = (unsigned)v;
			break;
		case OPT_NOFIXFILE:
			o->no_fixed_files = true;
			break;
		case OPT_NOSECCOMP:
			o->no_seccomp = true;
			break;
		case OPT_USER:
			o->user = optarg;
			break;
		case OPT_GROUP:
			o->group = optarg;
			break;
		case OPT_LOGLEVEL: {
			enum vlog_level l;

			if (vlog_parse_level(optarg, &l) < 0)
				return bad_value("log-level", optarg,
						 "expected error, warn, info or debug");
			o->log_level = (int)l;
			break;
		}
		case OPT_QMP:
			if (!*optarg)
				return bad_value("qmp", optarg, "empty path");
			o->qmp_path = optarg;
			break;
		case OPT_QMP_FD:
			if (parse_u64(optarg, &v, false) < 0 || v > INT_MAX)
				return bad_value("qmp-fd", optarg, "not a file descriptor number");
			if (fcntl((int)v, F_GETFD) < 0)
				return bad_value("qmp-fd", optarg, "not an open file descriptor");
			o->qmp_fd = (int)v;
			break;
		case OPT_NODE:
			if (!*optarg || strlen(optarg) > 127)
				return bad_value("node-name", optarg, "expected 1..127 characters");
			o->node_name = optarg;
			break;
		case OPT_CAPS:
			print_capabilities();
			return 0;
		case OPT_HELP:
			usage(stdout);
			return 0;
		case OPT_VERSION:
			printf("vqcowd %s\n", VQCOW_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		case ':':
			fprintf(stderr, "vqcowd: option %s needs a value\n", argv[optind - 1]);
			return 2;
		case '?':
		default:
			if (optopt && optopt < 256)
				fprintf(stderr, "vqcowd: unknown option: -%c\n", optopt);
			else
				fprintf(stderr, "vqcowd: unknown option: %s\n", argv[optind - 1]);
			return 2;
		}
	}
	if (optind < argc) {
		/* an on|off value goes after '=' (an optional value) */
		bool onoff = strcmp(argv[optind], "on") == 0 || strcmp(argv[optind], "off") == 0;

		fprintf(stderr, "vqcowd: unexpected argument: %s%s%s%s\n", argv[optind],
			onoff ? " (an on|off value goes after '=': --io-threads-consolidate=" : "",
			onoff ? argv[optind] : "", onoff ? ")" : "");
		return 2;
	}
	if ((o->socket_path != NULL) == (o->fd >= 0)) {
		fprintf(stderr, "vqcowd: exactly one of --socket-path and --fd is required\n");
		return 2;
	}
	if (o->qmp_path && o->qmp_fd >= 0) {
		fprintf(stderr, "vqcowd: --qmp and --qmp-fd exclude each other\n");
		return 2;
	}
	if (o->qmp_fd >= 0 && o->qmp_fd == o->fd) {
		fprintf(stderr, "vqcowd: --qmp-fd and --fd name the same descriptor\n");
		return 2;
	}
	if (!o->blk_file) {
		fprintf(stderr, "vqcowd: --blk-file is required\n");
		return 2;
	}
	if (o->force_share && !o->read_only) {
		fprintf(stderr, "vqcowd: --force-share can only be used with --read-only\n");
		return 2;
	}
	return -1;
}

/* ---- the daemon ---- */

/* --poll-ns polls only while at most this many requests are in flight. */
#define POLL_INFLIGHT_MAX 4

/*
 * --io-threads-consolidate: a request popped with at most CONS_QD requests
 * of its queue in flight (itself included) and at most POLL_INFLIGHT_MAX on
 * its thread is "low"; an I/O thread hands its queues to the main thread
 * after cons_run low requests in a row (CONS_RUN; VQCOWD_TEST_CONS_RUN, a
 * test seam) during which the main thread popped no high one, and the main
 * thread gives them back after CONS_SPREAD_RUN high requests in a row.
 */
#define CONS_QD         1
#define CONS_RUN        256
#define CONS_SPREAD_RUN 16

/*
 * --io-threads-contended PCT (cont_*): each thread serving queues reads its
 * own run delay (time runnable but waiting for a CPU: the 2nd field of
 * /proc/thread-self/schedstat) every CONT_WIN_NS or more, at a request it
 * pops (every CONT_CHECK requests it reads the clock). CONT_ON_WINS windows
 * in a row at or above PCT % of the wall time make the thread contended,
 * CONT_OFF_WINS in a row below PCT / 2 % end it. A contended I/O thread
 * hands its queues to the main thread (cons_*: drained, parked, moved);
 * they come back (on high load, CONS_SPREAD_RUN) only once the main thread
 * had CONT_OFF_WINS windows in a row below PCT / 2 % since, and the thread
 * gives them again at the earliest CONT_GAP_NS << cont_backoff after.
 */
#define CONT_WIN_NS      (10 * 1000 * 1000ull)
#define CONT_CHECK       16
#define CONT_ON_WINS     3
#define CONT_OFF_WINS    20
#define CONT_GAP_NS      (250 * 1000 * 1000ull)
#define CONT_QUICK_NS    (2000 * 1000 * 1000ull) /* a give this soon after a return backs off */
#define CONT_BACKOFF_MAX 4

/* A thread's run delay (cont_*): written by that thread only (an I/O
 * thread's also by the main thread while it is parked, cons_move). */
struct cont {
	int fd; /* its /proc/thread-self/schedstat, -1: none */
	unsigned calls;
	uint64_t win_at, win_rd;     /* the window's start: clock, run delay (0: none yet) */
	uint64_t start_at, start_rd; /* when opened (the exit line) */
	unsigned hi, lo;             /* windows in a row at or above PCT, below PCT / 2 */
	bool contended;
	uint64_t npop, nwin, nwin_hi; /* atomic (relaxed): read by the exit line */
};

struct iothread;

struct dreq {
	struct vq_elem elem; /* first: vhost/ hands these out */
	struct blk_req blk;
	/* --io-threads > 1 */
	struct iothread *t; /* the I/O thread that popped it (and pushes it); NULL: main */
};

struct watch {
	struct io_cmd cmd; /* multishot poll */
	struct daemon *d;
	struct iothread *t; /* a kick watch on an I/O thread's loop; NULL: the main loop */
	bool kick;          /* a kick watch on the main loop */
	int qidx;           /* a kick watch: its queue; -1 otherwise */
	int fd;
	bool cancelled;
	void (*cb)(void *arg);
	void *arg;
	struct watch *next;
};

struct dqueue {
	struct vhost_vq *vq; /* NULL when not started */
	bool dirty;          /* pushed since the last notify */
	/* --io-threads > 1: a kick seen on the main thread (a ring started,
	 * the image handed over), passed to the queue's thread. */
	struct io_cmd kick_cmd;
	bool kick_posted; /* atomic: kick_cmd is on its way */
	/* popped and not pushed: written by the thread that serves the queue
	 * (a queue moves only with none, --io-threads-consolidate) */
	unsigned inflight;
	/* A line of its own: the thread serving queue 0 wrote inflight and
	 * dirty on every request into the line from which the one serving
	 * queue 1 read its vq and dirty (200 bytes each, unaligned). */
} __attribute__((aligned(64)));

/*
 * An I/O thread (--io-threads N > 1; id 1..N-1, the main thread is thread
 * 0): its own io_uring loop, serving queues t->id, t->id + N, t->id + 2N...
 * Everything of those queues' data path runs
 * here: the kick poll, vq_pop, the request (a raw image's I/O too), vq_push,
 * the call. Parked (pause_all) whenever the main thread calls into vhost/ or
 * blk/ outside the data path.
 */
struct iothread {
	struct daemon *d;
	unsigned id;
	pthread_t tid;
	bool running;
	struct io_loop *loop;
	struct io_defer defer;
	struct io_cmd pause_cmd, quit_cmd;
	struct io_cmd wake_cmd;    /* to the main thread: this thread drained (main_wake) */
	bool wake_posted;          /* atomic: wake_cmd is on its way */
	bool pause_posted, parked; /* under d->mt_lock */
	struct watch *watches;     /* kick watches on this loop */
	unsigned nq_seen;          /* queues below this may be ours and in use */
	unsigned inflight;         /* popped here, not pushed yet */

	/*
	 * --io-threads-consolidate (cons_*): its queues served by the main
	 * thread (gathered) or by it. gathered changes only on the main
	 * thread with this one parked; giving is this thread's (it stops
	 * popping its queues, drains, and posts move_cmd), returning the main
	 * thread's (the same the other way); the parking orders them.
	 */
	bool gathered;
	bool giving;
	bool returning;
	bool move_posted;
	struct io_cmd move_cmd;
	unsigned low_run; /* low requests popped in a row */
	/* --poll-high-hold: low requests still to pop before polling (poll_hold_popped) */
	unsigned poll_hold;
	uint64_t main_high_at; /* d->main_high when low_run began */
	uint64_t ngather, nspread;
	/* cons_run << backoff low requests before the next try: a move refused
	 * because the main thread would serve too many queues (cons_gather) */
	unsigned backoff;
	/* VQCOWD_TEST_CONS_HOLD (cons_hold, a test seam): when giving began,
	 * the timer that wakes the loop once the hold is over */
	uint64_t giving_at;
	struct io_cmd hold_cmd;
	bool hold_armed, hold_logged;

	/* --io-threads-contended (cont_*) */
	struct cont cont;
	bool cont_give;  /* giving because contended (this thread's) */
	bool cont_moved; /* gathered because contended (main thread's, t parked) */
	unsigned cont_backoff;
	uint64_t cont_back_at; /* when its queues came back from a contended move */
	uint64_t ncont_gather, ncont_spread;
};

struct daemon {
	struct options *o;
	struct io_loop *loop;
	struct vhost_server *srv;
	struct vhost_dev_ops ops;
	struct img *img;
	struct blk_dev *blk;
	struct watch *watches;
	struct dqueue q[MAX_QUEUES];
	unsigned nq_seen; /* queues 0..nq_seen-1 may be in use (started this connection) */
	struct io_defer defer;

	/* --io-threads N: N threads serve the queues, the main thread (thread
	 * 0: queues 0, N, 2N...) and N - 1 I/O threads; the main thread also
	 * keeps the sockets, signals, the control path and the image's engine. */
	unsigned nserve;                 /* N */
	unsigned nthreads;               /* I/O threads: N - 1 */
	struct iothread *threads;        /* thread k is threads[k - 1] */
	bool hop;                        /* the rings run on the main thread only */
	bool rings_mt;                   /* the I/O threads serve rings (N > 1 and !hop) */
	struct io_poll_group poll_group; /* the I/O threads' busy polls (threads_init) */
	pthread_mutex_t mt_lock;
	pthread_cond_t mt_cond;
	/* --io-threads-consolidate (struct iothread's cons_ fields) */
	bool consolidate;
	unsigned cons_run;     /* CONS_RUN */
	uint64_t cons_hold_ns; /* VQCOWD_TEST_CONS_HOLD (cons_hold), 0 = none */
	unsigned ngathered;    /* I/O threads whose queues the main thread serves */
	/* Written by the main thread on every request: a line of their own,
	 * apart from what the I/O threads read on theirs (cons_run, ...).
	 * minflight: popped on the main thread, not pushed yet. */
	unsigned minflight __attribute__((aligned(64)));
	unsigned high_run;   /* high requests the main thread popped in a row */
	unsigned mpoll_hold; /* --poll-high-hold on the main thread (poll_hold_popped) */
	uint64_t main_high; /* high requests the main thread popped (atomic: I/O threads read it) */
	struct cont mcont;  /* the main thread's run delay (--io-threads-contended) */
	bool pausing __attribute__((aligned(64))); /* under mt_lock */
	unsigned pause_depth;                      /* main thread only */
	uint64_t nparks;      /* pause_all() parked the I/O threads (a debug line at exit) */
	bool test_late_posts; /* VQCOWD_TEST_LATE_POSTS (threads_stop), a test seam */
	struct iothread *threads_mem; /* the threads after threads_exit, freed last */

	int sigfd;
	struct io_cmd sig_cmd;
	bool stopping;
	bool flushing;
	struct img_io flush_io;
	int exit_code;
	struct ctl ctl; /* --qmp */
	struct ctl_qstat qstat[MAX_QUEUES];

	/* Image handoff (live migration on shared storage), see handoff(). */
	bool parked;          /* rings are not popped: the image is not ours yet */
	bool release_pending; /* all rings stopped during a migration: let go once drained */
	enum { HO_NONE, HO_RELEASE, HO_TAKE, HO_CTL } handoff; /* asked of main() (loop stopped) */
	bool ctl_hold;          /* --qmp: requests held back for a snapshot (ctl_held) */
	bool ctl_running;       /* ctl_held runs (it drives the loop): no HO_CTL meanwhile */
	unsigned hold_asks;     /* ctl_hold_cb calls: one during ctl_held keeps the hold */
	bool hold_armed;        /* hold_cmd in flight */
	struct io_cmd hold_cmd; /* wakes the main loop while held (I/O threads complete) */
	/* a hold's parts, CLOCK_MONOTONIC ns, for its log line (hold_report) */
	uint64_t hold_t0;      /* requests held back (0: none) */
	uint64_t hold_done;    /* a request ended while held (any thread: atomic) */
	uint64_t hold_drained; /* d_defer saw nothing in flight */

	/* Layers let go of by an external snapshot or commit, closed from main(). */
	struct img *retired[16];
	unsigned nretired;
	bool flushed; /* the final flush ended: the loop stopped for good */
};

/* -- I/O threads: parking and hops -- */

/* The I/O thread this code runs on; NULL on the main thread. */
static __thread struct iothread *cur_thread;

/* The I/O thread that serves queue @idx; NULL: the main thread (thread 0). */
static struct iothread *thread_of(struct daemon *d, unsigned idx)
{
	unsigned k = d->nserve ? idx % d->nserve : 0;

	return k && d->threads ? &d->threads[k - 1] : NULL;
}

/*
 * The I/O thread that serves queue @idx now; NULL: the main thread. Its
 * queues are the main thread's while gathered (--io-threads-consolidate);
 * read on the main thread or on that I/O thread (which is parked whenever
 * gathered changes).
 */
static struct iothread *serve_of(struct daemon *d, unsigned idx)
{
	struct iothread *t = thread_of(d, idx);

	return t && !t->gathered ? t : NULL;
}

/* Queue @idx is in use (started, or popped): its thread looks at it from now on. */
static void queue_seen(struct daemon *d, struct iothread *t, unsigned idx)
{
	if (t && idx >= t->nq_seen)
		t->nq_seen = idx + 1;
	else if (!t && idx >= d->nq_seen)
		d->nq_seen = idx + 1;
}

/* On an I/O thread, posted by pause_all(): stay parked until resume_all(). */
static void pause_done(struct io_cmd *cmd, int res)
{
	struct iothread *t = container_of(cmd, struct iothread, pause_cmd);
	struct daemon *d = t->d;

	(void)res;
	pthread_mutex_lock(&d->mt_lock);
	t->pause_posted = false;
	t->parked = true;
	pthread_cond_broadcast(&d->mt_cond);
	while (d->pausing)
		pthread_cond_wait(&d->mt_cond, &d->mt_lock);
	t->parked = false;
	pthread_mutex_unlock(&d->mt_lock);
}

/*
 * Park every I/O thread between two of its loop iterations (nothing of
 * theirs runs, their in-flight I/O stays in the kernel) and return when all
 * are parked: from then until resume_all() the main thread may touch
 * anything they own (rings, watches on their loops, blk/ config). The mutex
 * orders their earlier writes before, and ours before their next steps.
 * Nests; no-op with one thread.
 */
static void pause_all(struct daemon *d)
{
	bool all;

	if (!d->nthreads || !d->threads || d->pause_depth++ > 0)
		return; /* (!d->threads: gone, threads_exit) */
	d->nparks++;
	pthread_mutex_lock(&d->mt_lock);
	d->pausing = true;
	for (unsigned i = 0; i < d->nthreads; i++) {
		struct iothread *t = &d->threads[i];

		if (t->running && !t->pause_posted && !t->parked) {
			t->pause_posted = true;
			t->pause_cmd.done = pause_done;
			io_post_remote(t->loop, &t->pause_cmd);
		}
	}
	do {
		all = true;
		for (unsigned i = 0; i < d->nthreads; i++) {
			if (d->threads[i].running && !d->threads[i].parked)
				all = false;
		}
		if (!all)
			pthread_cond_wait(&d->mt_cond, &d->mt_lock);
	} while (!all);
	pthread_mutex_unlock(&d->mt_lock);
}

static void resume_all(struct daemon *d)
{
	if (!d->nthreads || !d->threads || --d->pause_depth > 0)
		return;
	pthread_mutex_lock(&d->mt_lock);
	d->pausing = false;
	pthread_cond_broadcast(&d->mt_cond);
	pthread_mutex_unlock(&d->mt_lock);
}

/* -- fd watches -- */

static void watch_unlink(struct watch **head, struct watch *w)
{
	for (struct watch **p = head; *p; p = &(*p)->next) {
		if (*p == w) {
			*p = w->next;
			return;
		}
	}
}

static void watch_done(struct io_cmd *cmd, int res)
{
	struct watch *w = container_of(cmd, struct watch, cmd);
	struct daemon *d = w->d;

	if (res >= 0) {
		if (w->cancelled)
			return;
		if (w->t || w->kick) {
			w->cb(w->arg); /* a kick, on the thread that serves the ring */
			return;
		}
		/* Main thread: vhost/ (socket, wake-ups) or QMP; the I/O
		 * threads are parked meanwhile. */
		pause_all(d);
		w->cb(w->arg); /* may unwatch (even this fd) */
		resume_all(d);
		return;
	}
	/* Final completion of the multishot poll. */
	if (!w->cancelled)
		log_warn("poll on fd %d ended: %s", w->fd, strerror(-res));
	watch_unlink(w->t ? &w->t->watches : &d->watches, w);
	free(w);
}

static struct watch *watch_new(struct daemon *d, struct iothread *t, int fd, void (*cb)(void *arg),
			       void *arg)
{
	struct watch *w = calloc(1, sizeof(*w));

	if (!w)
		return NULL;
	w->d = d;
	w->t = t;
	w->qidx = -1;
	w->fd = fd;
	w->cb = cb;
	w->arg = arg;
	w->cmd.done = watch_done;
	return w;
}

static int watch_events(void *opaque, int fd, unsigned events, void (*cb)(void *arg), void *arg)
{
	struct daemon *d = opaque;
	struct watch *w = watch_new(d, NULL, fd, cb, arg);

	if (!w)
		return -ENOMEM;
	w->next = d->watches;
	d->watches = w;
	io_poll(d->loop, &w->cmd, fd, events);
	return 0;
}

static int d_watch(void *opaque, int fd, vhost_watch_cb *cb, void *arg)
{
	return watch_events(opaque, fd, POLLIN, cb, arg);
}

/* A ring's kick fd: polled by the thread that serves the ring (called with the threads parked). */
static int d_watch_kick(void *opaque, struct vhost_vq *vq, int fd, vhost_watch_cb *cb, void *arg)
{
	struct daemon *d = opaque;
	struct iothread *t;
	struct watch *w;
	int ret;

	t = d->rings_mt ? serve_of(d, vq_index(vq)) : NULL;
	if (!t) {
		/* The main thread serves the ring: a kick needs no parking. */
		ret = watch_events(opaque, fd, POLLIN, cb, arg);
		if (ret == 0) {
			d->watches->kick = true;
			d->watches->qidx = (int)vq_index(vq);
		}
		return ret;
	}
	w = watch_new(d, t, fd, cb, arg);
	if (!w)
		return -ENOMEM;
	w->qidx = (int)vq_index(vq);
	w->next = t->watches;
	t->watches = w;
	io_poll(t->loop, &w->cmd, fd, POLLIN);
	return 0;
}

static bool unwatch_in(struct watch *head, struct io_loop *loop, int fd)
{
	for (struct watch *w = head; w; w = w->next) {
		if (w->fd == fd && !w->cancelled) {
			w->cancelled = true;
			io_cancel(loop, &w->cmd);
			return true;
		}
	}
	return false;
}

static void d_unwatch(void *opaque, int fd)
{
	struct daemon *d = opaque;

	if (unwatch_in(d->watches, d->loop, fd))
		return;
	/* Main thread with the I/O threads parked (or gone, at exit). */
	for (unsigned i = 0; i < d->nthreads && d->threads; i++) {
		if (unwatch_in(d->threads[i].watches, d->threads[i].loop, fd))
			return;
	}
}

/* -- requests -- */

static void main_woken(struct io_cmd *cmd, int res)
{
	struct iothread *t = container_of(cmd, struct iothread, wake_cmd);

	(void)res;
	__atomic_store_n(&t->wake_posted, false, __ATOMIC_RELEASE);
	/* Nothing else: the main loop's iteration runs d_defer, which looks. */
}

/*
 * An I/O thread drained its requests while the main thread waits for all to
 * end (shutdown): wake it, its loop sees no completion of these requests.
 * (A migration handoff waits on GET_VRING_BASE, which vhost/ wakes.)
 */
static void main_wake(struct daemon *d, struct iothread *t)
{
	if (!__atomic_exchange_n(&t->wake_posted, true, __ATOMIC_ACQ_REL)) {
		t->wake_cmd.done = main_woken;
		io_post_remote(d->loop, &t->wake_cmd);
	}
}

/*
 * The used ring, the statistics, the call: on the thread that popped the
 * request (with one thread, the main thread).
 */
static void req_push(struct daemon *d, struct dreq *r, uint32_t used_len)
{
	struct blk_req *breq = &r->blk;
	struct vhost_vq *vq = r->elem.vq;
	unsigned idx = vq_index(vq);

	if (used_len == BLK_REQ_MALFORMED) {
		/* Header or status buffer missing: a broken driver. Drop the
		 * request and the connection. */
		vhost_dev_set_broken(vq_dev(vq), "malformed virtio-blk request");
		used_len = 0;
	}
	vq_push(vq, &r->elem, used_len);
	if (idx < MAX_QUEUES) {
		/* Statistics only: the status byte is in guest memory. */
		bool ok = used_len && breq->status && *breq->status == VIRTIO_BLK_S_OK;

		d->qstat[idx].requests++;
		if (!ok)
			d->qstat[idx].errors++;
		else if (breq->type == VIRTIO_BLK_T_IN || breq->type == VIRTIO_BLK_T_OUT)
			d->qstat[idx].bytes += breq->data_len;
		/* The vq stays valid until disconnected(), which vhost/ calls
		 * only after every popped element was pushed. */
		d->q[idx].vq = vq;
		d->q[idx].dirty = true;
		queue_seen(d, r->t, idx);
		d->q[idx].inflight--;
		if (d->consolidate && serve_of(d, idx) != r->t)
			/* a queue moves only with nothing in flight (cons_gather) */
			log_err("queue %u: a request ended on a thread that does not serve the "
				"queue (--io-threads-consolidate: a bug)",
				idx);
		if (!r->t)
			d->minflight--;
		if (r->t) {
			r->t->inflight--;
			if (!r->t->inflight && d->stopping)
				main_wake(d, r->t);
		}
		/* the drain's end, for hold_report: a thread's last request */
		if ((!r->t || !r->t->inflight) && __atomic_load_n(&d->ctl_hold, __ATOMIC_RELAXED))
			__atomic_store_n(&d->hold_done, util_now_ns(), __ATOMIC_RELAXED);
	}
}

static void req_complete(struct blk_req *breq, uint32_t used_len)
{
	req_push(breq->priv, container_of(breq, struct dreq, blk), used_len);
}

/* Where a queue's requests are counted (blk_req_submit_stats). */
static struct blk_stats *queue_stats(struct daemon *d, struct vhost_vq *vq)
{
	return vq_index(vq) < MAX_QUEUES ? &d->qstat[vq_index(vq)].blk : NULL;
}

/* --io-threads-consolidate: the queue's thread is handing it over (it pops none meanwhile). */
static bool cons_draining(struct daemon *d, unsigned idx)
{
	struct iothread *t = thread_of(d, idx);

	return t && (cur_thread ? t->giving : t->returning);
}

static void cons_popped(struct daemon *d, unsigned idx);
static void cont_popped(struct daemon *d, struct cont *c, unsigned id);

/*
 * --poll-high-hold N: a request popped with more than POLL_INFLIGHT_MAX of
 * its thread's requests in flight (itself included) keeps that thread from
 * busy-polling (d_defer, t_defer) until N requests in a row were popped
 * with at most that many. The in-flight count alone lets a thread at high
 * queue depth poll whenever its count dips between the guest's batches:
 * with a batch of ~30 per kick the next kick comes a whole client turn
 * later, and on CPUs shared with the client the poll only delays it.
 */
static void poll_hold_popped(struct daemon *d)
{
	struct iothread *t = cur_thread;
	unsigned *hold = t ? &t->poll_hold : &d->mpoll_hold;

	if ((t ? t->inflight : d->minflight) > POLL_INFLIGHT_MAX)
		*hold = d->o->poll_high_hold;
	else if (*hold)
		(*hold)--;
}

/*
 * Pop and submit every available element. -EAGAIN when the ring is empty,
 * -EBUSY when the queue is being handed to another thread
 * (--io-threads-consolidate; the mover kicks it once moved).
 */
static int pop_all(struct daemon *d, struct vhost_vq *vq)
{
	struct vq_elem *elem;
	int ret;

	for (;;) {
		struct dreq *r;

		if (d->consolidate && cons_draining(d, vq_index(vq)))
			return -EBUSY;
		ret = vq_pop(vq, &elem);
		if (ret)
			break;
		r = (struct dreq *)elem;

		r->blk.iov = elem->iov;
		r->blk.out_num = elem->out_num;
		r->blk.in_num = elem->in_num;
		r->blk.complete = req_complete;
		r->blk.priv = d;
		r->blk.loop = NULL;
		r->t = NULL;
		if (d->rings_mt && cur_thread) {
			/* the image I/O goes out from this thread (qcow2: a
			 * miss hops to the main thread) */
			r->t = cur_thread;
			r->t->inflight++;
			r->blk.loop = r->t->loop;
		} else if (!d->rings_mt && thread_of(d, vq_index(vq))) {
			/* hop: popped and run on the main thread; the CPU work
			 * of the request (inflate) goes to the queue's thread */
			r->blk.loop = thread_of(d, vq_index(vq))->loop;
		}
		/* (else a queue of the main thread: the image's own loop, as
		 * with one thread; qcow2: the owner's path, no hop, nothing
		 * published for it) */
		if (vq_index(vq) < MAX_QUEUES) {
			d->q[vq_index(vq)].inflight++;
			if (!cur_thread)
				d->minflight++;
			if (cur_thread)
				cont_popped(d, &cur_thread->cont, cur_thread->id);
			else
				cont_popped(d, &d->mcont, 0);
			if (d->consolidate)
				cons_popped(d, vq_index(vq));
			if (d->o->poll_high_hold)
				poll_hold_popped(d);
		}
		/* counted per queue: the queue's thread owns its counters */
		blk_req_submit_stats(d->blk, &r->blk, queue_stats(d, vq));
		if (vhost_dev_is_broken(vq_dev(vq)))
			return -EPIPE;
	}
	return ret;
}

static void kick_posted(struct io_cmd *cmd, int res);

static void d_queue_kick(void *opaque, struct vhost_vq *vq)
{
	struct daemon *d = opaque;

	if (d->stopping || d->parked || __atomic_load_n(&d->ctl_hold, __ATOMIC_ACQUIRE))
		return; /* parked: popped once the image is ours (handoff); held: after ctl_held */
	if (d->rings_mt) {
		unsigned idx = vq_index(vq);
		struct iothread *t = serve_of(d, idx);

		if (cur_thread != t) {
			/* Another thread (the main one: ring started, image
			 * handed over): the queue's thread pops. */
			struct dqueue *q = &d->q[idx];

			if (!__atomic_exchange_n(&q->kick_posted, true, __ATOMIC_ACQ_REL)) {
				q->kick_cmd.done = kick_posted;
				q->kick_cmd.priv = d;
				io_post_remote(t ? t->loop : d->loop, &q->kick_cmd);
			}
			return;
		}
	}
	do {
		vq_disable_notify(vq);
		if (pop_all(d, vq) != -EAGAIN)
			return; /* ring or connection broken: vhost/ drops it */
	} while (vq_enable_notify(vq));
}

static void kick_posted(struct io_cmd *cmd, int res)
{
	struct dqueue *q = container_of(cmd, struct dqueue, kick_cmd);
	struct daemon *d = cmd->priv;

	(void)res;
	if (d->consolidate && serve_of(d, (unsigned)(q - d->q)) != cur_thread) {
		/* the queue moved meanwhile (--io-threads-consolidate): on to
		 * the thread that serves it now, which alone reads q->vq */
		struct iothread *t = serve_of(d, (unsigned)(q - d->q));

		io_post_remote(t ? t->loop : d->loop, &q->kick_cmd);
		return;
	}
	__atomic_store_n(&q->kick_posted, false, __ATOMIC_RELEASE);
	if (q->vq && vq_is_running(q->vq)) {
		queue_seen(d, cur_thread, vq_index(q->vq));
		d_queue_kick(d, q->vq);
	}
}

/* Requests popped and not yet pushed, on every thread. */
static unsigned d_inflight(struct daemon *d)
{
	struct vhost_dev *dev;

	if (!d->nthreads)
		return blk_dev_inflight(d->blk);
	dev = vhost_server_dev(d->srv);
	return (dev ? vhost_dev_inflight(dev) : 0) + blk_dev_inflight(d->blk);
}

/*
 * Requests in flight that have started: d_inflight() but those a paused
 * device holds (blk_dev_held: not started; with I/O threads vhost/ counts
 * them, blk/ does not). What a held QMP operation (ctl->hold) waits for:
 * blockdev-snapshot-sync of a layer with enabled persistent bitmaps asks
 * for one with the device paused, and the requests the queues popped
 * meanwhile stay held until the snapshot ends, so waiting for them too
 * never ended (the command, the guest and SIGTERM hung).
 *
 * Read in this order: the in-flight count first, then the held one. No
 * request is popped while the hold is on (ctl_hold_cb sets it with the
 * threads parked; d_queue_kick and the polls look at it), so a request
 * held by the second read was in flight at the first: a difference of 0
 * means that every request in flight at the second read is held.
 */
static unsigned d_running(struct daemon *d)
{
	unsigned n = d_inflight(d), h;

	if (!d->nthreads)
		return n; /* blk_dev_inflight alone: held ones are not in it */
	h = blk_dev_held(d->blk);
	return n > h ? n - h : 0;
}

/* -- --io-threads-contended: a thread's run delay (cont_*) -- */

/*
 * VQCOWD_TEST_CONT=FILE (a test seam; set before the threads start): every
 * thread's run delay is the share of the wall time since its cont_open that
 * FILE holds now (a percentage, re-read each time), as if it had always been.
 */
static int cont_test_fd = -1;

/* The run delay of @c's thread so far, ns; 0 if it cannot be read. */
static uint64_t cont_read(const struct cont *c)
{
	char buf[96];
	unsigned long long run, wait;
	ssize_t n;

	if (cont_test_fd >= 0) {
		n = pread(cont_test_fd, buf, sizeof(buf) - 1, 0);
		if (n <= 0)
			return 0;
		buf[n] = '\0';
		run = strtoull(buf, NULL, 10);
		return run > 100 ? 0 : run * (util_now_ns() - c->start_at) / 100;
	}
	if (c->fd < 0)
		return 0;
	n = pread(c->fd, buf, sizeof(buf) - 1, 0);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	if (sscanf(buf, "%llu %llu", &run, &wait) != 2)
		return 0;
	return wait;
}

/* On the thread itself (before the system call filter): open its schedstat. */
static void cont_open(struct cont *c)
{
	c->fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
	c->start_at = util_now_ns();
	c->start_rd = cont_read(c);
}

/*
 * The thread of @c popped a request: every CONT_CHECK requests, if its window
 * is CONT_WIN_NS old, the share of it spent waiting for a CPU updates
 * c->contended (--io-threads-contended PCT; off: nothing but the count).
 */
static void cont_popped(struct daemon *d, struct cont *c, unsigned id)
{
	uint64_t now, rd, pct;

	__atomic_store_n(&c->npop, c->npop + 1, __ATOMIC_RELAXED);
	if (!d->o->contended || c->fd < 0 || ++c->calls < CONT_CHECK)
		return;
	c->calls = 0;
	now = util_now_ns();
	if (c->win_at && now - c->win_at < CONT_WIN_NS)
		return;
	rd = cont_read(c);
	if (!c->win_at || rd < c->win_rd) {
		c->win_at = now;
		c->win_rd = rd;
		return;
	}
	pct = (rd - c->win_rd) * 100 / (now - c->win_at);
	c->win_at = now;
	c->win_rd = rd;
	__atomic_store_n(&c->nwin, c->nwin + 1, __ATOMIC_RELAXED);
	if (pct >= d->o->contended) {
		__atomic_store_n(&c->nwin_hi, c->nwin_hi + 1, __ATOMIC_RELAXED);
		c->hi++;
		c->lo = 0;
	} else if (pct * 2 < d->o->contended) {
		c->lo++;
		c->hi = 0;
	} else {
		c->hi = c->lo = 0;
	}
	if (!c->contended && c->hi >= CONT_ON_WINS) {
		c->contended = true;
		log_dbg("thread %u: contended (waited for a CPU %" PRIu64 " %% of the last %u ms)",
			id, pct, (unsigned)(CONT_WIN_NS / 1000000));
	} else if (c->contended && c->lo >= CONT_OFF_WINS) {
		c->contended = false;
		log_dbg("thread %u: no longer contended (%" PRIu64 " %%)", id, pct);
	}
}

/* An exit line per thread serving queues: its run delay (--io-threads-contended's measure). */
static void cont_log(struct cont *c, unsigned id)
{
	uint64_t rd = cont_read(c), wall = util_now_ns() - c->start_at;
	uint64_t npop = __atomic_load_n(&c->npop, __ATOMIC_RELAXED);

	if (c->fd < 0 || rd < c->start_rd || !wall)
		return;
	rd -= c->start_rd;
	logmsg("thread %u: waited for a CPU %" PRIu64 " ms of %" PRIu64 " ms (%" PRIu64
	       " %%), %" PRIu64 " requests (%.2f us each); contended in %" PRIu64 " of %" PRIu64
	       " windows",
	       id, rd / 1000000, wall / 1000000, rd * 100 / wall, npop,
	       npop ? (double)rd / 1000.0 / (double)npop : 0.0,
	       __atomic_load_n(&c->nwin_hi, __ATOMIC_RELAXED),
	       __atomic_load_n(&c->nwin, __ATOMIC_RELAXED));
}

/* -- --io-threads-consolidate: the I/O threads' queues on the main thread at low load -- */

/*
 * Where each request is counted, on the thread that pops it (pop_all):
 * low (at most CONS_QD of its queue in flight, itself included, and at
 * most POLL_INFLIGHT_MAX on the thread) or high. An I/O thread starts
 * handing its queues over (giving: it pops none of them, t_defer posts
 * cons_gather once its requests ended) after cons_run low requests in a
 * row during which the main thread popped no high one (d->main_high
 * unchanged); the main thread, serving them, starts giving them back
 * (returning, cons_spread) after CONS_SPREAD_RUN high requests in a row.
 */
static void cons_popped(struct daemon *d, unsigned idx)
{
	struct iothread *t = cur_thread;
	bool low = d->q[idx].inflight <= CONS_QD;

	if (!t) {
		if (low && d->minflight <= POLL_INFLIGHT_MAX) {
			d->high_run = 0;
			return;
		}
		__atomic_store_n(&d->main_high, d->main_high + 1, __ATOMIC_RELAXED);
		if (d->ngathered && ++d->high_run >= CONS_SPREAD_RUN) {
			d->high_run = 0;
			for (unsigned i = 0; i < d->nthreads; i++) {
				struct iothread *g = &d->threads[i];

				/* moved for contention: back once it is gone here */
				if (g->gathered && (!g->cont_moved || d->mcont.lo >= CONT_OFF_WINS))
					g->returning = true;
			}
		}
		return;
	}
	if (t->cont.contended && !t->giving) {
		uint64_t now = util_now_ns();

		if (now - t->cont_back_at >= CONT_GAP_NS << t->cont_backoff) {
			t->giving = true;
			t->cont_give = true;
			t->low_run = 0;
			if (d->cons_hold_ns)
				t->giving_at = now;
			return;
		}
	}
	if (!low || t->inflight > POLL_INFLIGHT_MAX) {
		t->low_run = 0;
		return;
	}
	if (t->low_run++ == 0) {
		t->main_high_at = __atomic_load_n(&d->main_high, __ATOMIC_RELAXED);
		return;
	}
	if (t->low_run < d->cons_run << t->backoff)
		return;
	t->low_run = 0;
	if (__atomic_load_n(&d->main_high, __ATOMIC_RELAXED) == t->main_high_at) {
		t->giving = true;
		if (d->cons_hold_ns)
			t->giving_at = util_now_ns();
	}
}

static void cons_hold_done(struct io_cmd *cmd, int res)
{
	struct iothread *t = container_of(cmd, struct iothread, hold_cmd);

	(void)res;
	t->hold_armed = false; /* t_defer looks again on this iteration */
}

/*
 * Test seam (VQCOWD_TEST_CONS_HOLD=MS): an I/O thread that drained for a move
 * keeps its drain open until MS ms after it began (it pops none of its
 * queues meanwhile), so that a test can stop a ring, set the memory table or
 * disconnect exactly then. True while held (a timer wakes the loop at the
 * end). Unset (always outside tests), it costs a predicted branch per drain.
 */
static bool cons_hold(struct daemon *d, struct iothread *t)
{
	uint64_t now, held;

	if (!d->cons_hold_ns)
		return false;
	now = util_now_ns();
	held = now - t->giving_at;
	if (held >= d->cons_hold_ns) {
		t->hold_logged = false;
		return false;
	}
	if (!t->hold_logged) {
		t->hold_logged = true;
		log_warn(
		    "VQCOWD_TEST_CONS_HOLD: I/O thread %u drained; its drain held open %" PRIu64
		    " ms",
		    t->id, (d->cons_hold_ns - held) / 1000000);
	}
	if (!t->hold_armed) {
		t->hold_armed = true;
		t->hold_cmd.done = cons_hold_done;
		io_timeout(t->loop, &t->hold_cmd, d->cons_hold_ns - held);
	}
	return true;
}

/*
 * Move the kick watches of @t's queues from its loop to the main loop
 * (@gather) or back, with @t parked: the old watch is cancelled (its final
 * completion frees it on its own loop; a kick it still sees is ignored),
 * the new one polls the same eventfd (a kick not yet read fires it at
 * once). 0, or -ENOMEM with nothing moved.
 */
static int cons_move(struct daemon *d, struct iothread *t, bool gather)
{
	struct watch *from = gather ? t->watches : d->watches, *nws[MAX_QUEUES];
	struct io_loop *from_loop = gather ? t->loop : d->loop;
	unsigned n = 0, k = 0;

	for (struct watch *w = from; w; w = w->next) {
		if (w->cancelled || w->qidx < 0 || thread_of(d, (unsigned)w->qidx) != t)
			continue;
		if (n == MAX_QUEUES ||
		    !(nws[n] = watch_new(d, gather ? NULL : t, w->fd, w->cb, w->arg))) {
			while (n)
				free(nws[--n]);
			return -ENOMEM;
		}
		nws[n]->kick = gather;
		nws[n]->qidx = w->qidx;
		n++;
	}
	for (struct watch *w = from; w; w = w->next) {
		struct watch *nw;

		if (w->cancelled || w->qidx < 0 || thread_of(d, (unsigned)w->qidx) != t)
			continue;
		nw = nws[k++];
		w->cancelled = true;
		io_cancel(from_loop, &w->cmd);
		if (gather) {
			nw->next = d->watches;
			d->watches = nw;
			io_poll(d->loop, &nw->cmd, nw->fd, POLLIN);
		} else {
			nw->next = t->watches;
			t->watches = nw;
			io_poll(t->loop, &nw->cmd, nw->fd, POLLIN);
		}
	}
	t->gathered = gather;
	t->returning = false;
	t->giving = false;
	t->low_run = 0;
	if (gather) {
		d->ngathered++;
		t->ngather++;
		if (t->cont_give) {
			/* back once the main thread saw CONT_OFF_WINS calm windows since */
			uint64_t now = util_now_ns();

			if (t->cont_back_at && now - t->cont_back_at < CONT_QUICK_NS) {
				if (t->cont_backoff < CONT_BACKOFF_MAX)
					t->cont_backoff++;
			} else {
				t->cont_backoff = 0;
			}
			t->cont_moved = true;
			t->ncont_gather++;
			d->mcont.lo = 0;
		}
	} else {
		d->ngathered--;
		t->nspread++;
		if (t->cont_moved) {
			t->cont_moved = false;
			t->ncont_spread++;
			t->cont_back_at = util_now_ns();
		}
		/* its own run delay starts again (t parked: ordered by mt_lock) */
		t->cont.contended = false;
		t->cont.hi = t->cont.lo = 0;
		t->cont.win_at = 0;
	}
	t->cont_give = false;
	return 0;
}

/* Kick @t's running queues on the thread that serves them now (requests not popped meanwhile). */
static void cons_kick(struct daemon *d, struct iothread *t)
{
	struct vhost_dev *dev = vhost_server_dev(d->srv);

	for (unsigned i = t->id; dev && i < vhost_dev_num_queues(dev); i += d->nserve) {
		struct vhost_vq *vq = vhost_dev_vq(dev, i);

		if (vhost_dev_is_broken(dev))
			return;
		if (vq && vq_is_running(vq))
			d_queue_kick(d, vq);
	}
}

/*
 * The started queues the main thread would serve with @t's gathered (t
 * parked: q->vq is set by the thread that serves the queue).
 */
static unsigned cons_main_queues(struct daemon *d, struct iothread *t)
{
	unsigned n = 0;

	for (unsigned i = 0; i < d->nq_seen && i < MAX_QUEUES; i++) {
		if (d->q[i].vq && (!serve_of(d, i) || thread_of(d, i) == t))
			n++;
	}
	return n;
}

/* Main thread: I/O thread @t drained its queues to hand them over (posted by t_defer). */
static void cons_gather(struct io_cmd *cmd, int res)
{
	struct iothread *t = container_of(cmd, struct iothread, move_cmd);
	struct daemon *d = t->d;
	/* not inside another parked operation (a handoff drives the loop) */
	bool ok = d->pause_depth == 0 && !d->stopping && !d->parked && d->handoff == HO_NONE;
	unsigned nq = 0;
	const char *why;

	(void)res;
	if (!d->threads)
		return; /* posted before the thread was joined, run at exit (threads_exit) */
	pause_all(d);
	t->move_posted = false;
	ok = ok && t->giving && !t->inflight && !t->gathered;
	/*
	 * Each of those queues at CONS_QD in flight would be a high load for
	 * the main thread (more than POLL_INFLIGHT_MAX): it would give them
	 * back after CONS_SPREAD_RUN requests and the thread take them again
	 * after cons_run, a move and a park of every thread each time. Not
	 * moved; the thread tries again after twice as many low requests.
	 */
	if (ok && (nq = cons_main_queues(d, t)) * CONS_QD > POLL_INFLIGHT_MAX) {
		ok = false;
		if (t->backoff < 8)
			t->backoff++;
		/* a contended give meets the same refusal until the queues
		 * change: the next try later each time (up to CONT_GAP_NS <<
		 * CONT_BACKOFF_MAX), not a drain and a park every CONT_GAP_NS */
		if (t->cont_give && t->cont_backoff < CONT_BACKOFF_MAX)
			t->cont_backoff++;
		log_dbg("I/O thread %u: its queues stay: the main thread would serve %u", t->id,
			nq);
	} else if (ok) {
		t->backoff = 0;
	}
	why = t->cont_give ? "contended" : "low load";
	ok = ok && cons_move(d, t, true) == 0;
	if (!ok && t->cont_give)
		t->cont_back_at =
		    util_now_ns(); /* the next try CONT_GAP_NS later at the earliest */
	t->giving = false;         /* not moved: it serves them on */
	t->cont_give = false;
	t->low_run = 0;
	resume_all(d);
	if (ok)
		log_dbg("I/O thread %u: its queues moved to the main thread (%s)", t->id, why);
	cons_kick(d, t);
}

/* Main thread, each iteration while it serves I/O threads' queues: give back those asked for once
 * drained. */
static void cons_spread(struct daemon *d)
{
	for (unsigned k = 0; k < d->nthreads; k++) {
		struct iothread *t = &d->threads[k];
		bool busy = d->pause_depth > 0;
		const char *why;
		int ret;

		if (!t->gathered || !t->returning)
			continue;
		for (unsigned i = t->id; i < d->nq_seen && !busy; i += d->nserve)
			busy = d->q[i].inflight > 0;
		if (busy)
			continue;
		pause_all(d);
		why = t->cont_moved ? "load, no longer contended" : "load";
		ret = cons_move(d, t, false);
		if (ret < 0)
			t->returning = false; /* it stays here */
		resume_all(d);
		if (ret == 0)
			log_dbg("I/O thread %u: its queues moved back to it (%s)", t->id, why);
		cons_kick(d, t);
	}
}

static void hold_arm(struct daemon *d);

/*
 * Once per loop iteration (and repeatedly while busy-polling): poll rings if
 * asked, one notification per dirty queue, shutdown progress.
 */
static void d_defer(struct io_defer *def)
{
	struct daemon *d = def->priv;
	/* Offered queues cost nothing until the front-end starts them: look
	 * only at those started on this connection (64 are offered by
	 * default, a 2-vCPU guest uses 2), and with I/O threads at ours only
	 * (queues 0, N, 2N...): the I/O threads look at theirs. */
	/* (--io-threads-consolidate: and those of the I/O threads whose
	 * queues it serves now, serve_of) */
	unsigned nq = d->nq_seen, step = d->rings_mt && !d->ngathered ? d->nserve : 1;
	bool all = step == 1 && d->rings_mt;

	/* --poll-ns: the loop re-runs this hook while it busy-polls, so look
	 * for new requests without waiting for a kick. */
	if (d->o->poll_ns && !d->stopping && !d->parked && !d->ctl_hold) {
		for (unsigned i = 0; i < nq; i += step) {
			if (all && serve_of(d, i))
				continue;
			/* A cheap look first: pop_all() ends with re-arming the
			 * kick, a full barrier, on every call. */
			if (d->q[i].vq && vq_avail_pending(d->q[i].vq))
				pop_all(d, d->q[i].vq);
		}
	}
	for (unsigned i = 0; i < nq; i += step) {
		if (all && serve_of(d, i))
			continue;
		if (d->q[i].dirty) {
			d->q[i].dirty = false;
			if (d->q[i].vq)
				vq_notify(d->q[i].vq);
		}
	}
	/*
	 * Busy-poll only while latency-bound: with few requests in flight a
	 * sleep and wake-up (two per request: the kick and the completion)
	 * cost more than the request itself; with many, completions keep the
	 * loop busy and polling between them would only burn CPU.
	 */
	if (d->o->poll_ns)
		io_loop_set_poll_ns(d->loop, blk_dev_inflight(d->blk) <= POLL_INFLIGHT_MAX &&
						     !d->mpoll_hold && !d->mcont.contended
						 ? d->o->poll_ns
						 : 0);
	ctl_tick(&d->ctl);
	if (ctl_report_due(&d->ctl)) {
		/* --qmp: a BLOCK_IO_ERROR event; it sums the per-queue
		 * counters the I/O threads write (parked only then, not while
		 * an event waits for its second to pass) */
		pause_all(d);
		ctl_report(&d->ctl);
		resume_all(d);
	}
	if (d->nthreads && !d->hold_armed && !d->flushed && ctl_waiting(&d->ctl))
		hold_arm(d); /* the device drains on the I/O threads */
	if (d->release_pending && !d->stopping && d_inflight(d) == 0) {
		d->release_pending = false;
		d->handoff = HO_RELEASE;
		io_loop_stop(d->loop);
	}
	if (d->ctl_hold && d->handoff == HO_NONE && !d->ctl_running && !d->stopping &&
	    d_running(d) == 0) {
		d->handoff = HO_CTL; /* quiesced: main() runs the snapshot */
		if (!d->hold_drained)
			d->hold_drained = util_now_ns();
		io_loop_stop(d->loop);
	}
	if (d->ngathered)
		cons_spread(d);
	/* ctl_busy once only held requests are left: what held them may
	 * never end while stopping (layers_stop ends it), and they run then */
	if (d->stopping && !d->flushing && d_running(d) == 0 && !ctl_busy(&d->ctl) &&
	    d_inflight(d) == 0) {
		d->flushing = true;
		logmsg("no request in flight; flushing the image");
		img_flush(d->img, &d->flush_io);
	}
}

/* The same for an I/O thread's queues. */
static void t_defer(struct io_defer *def)
{
	struct iothread *t = def->priv;
	struct daemon *d = t->d;
	unsigned n = d->nserve;

	if (t->gathered)
		goto out; /* the main thread serves our queues (--io-threads-consolidate) */
	if (d->o->poll_ns && !d->stopping && !d->parked &&
	    !__atomic_load_n(&d->ctl_hold, __ATOMIC_ACQUIRE)) {
		for (unsigned i = t->id; i < t->nq_seen; i += n) {
			if (d->q[i].vq && vq_avail_pending(d->q[i].vq))
				pop_all(d, d->q[i].vq);
		}
	}
	for (unsigned i = t->id; i < t->nq_seen; i += n) {
		if (d->q[i].dirty) {
			d->q[i].dirty = false;
			if (d->q[i].vq)
				vq_notify(d->q[i].vq);
		}
	}
	if (t->giving && !t->inflight && !t->move_posted && !cons_hold(d, t)) {
		/* drained: the main thread takes our queues (cons_gather) */
		t->move_posted = true;
		t->move_cmd.done = cons_gather;
		io_post_remote(d->loop, &t->move_cmd);
	}
out:
	if (d->o->poll_ns && d->rings_mt)
		io_loop_set_poll_ns(t->loop, !t->gathered && t->inflight <= POLL_INFLIGHT_MAX &&
						     !t->poll_hold && !t->cont.contended
						 ? d->o->poll_ns
						 : 0);
}

static void quit_done(struct io_cmd *cmd, int res)
{
	struct iothread *t = container_of(cmd, struct iothread, quit_cmd);

	(void)res;
	io_loop_stop(t->loop);
}

static void *thread_main(void *arg)
{
	struct iothread *t = arg;
	int ret;

	cur_thread = t;
	cont_open(&t->cont); /* before the system call filter */
	/* Tell threads_start() we are past the C library's thread set-up
	 * (set_robust_list, rseq...): the filter may go on now. */
	pthread_mutex_lock(&t->d->mt_lock);
	t->running = true;
	pthread_cond_broadcast(&t->d->mt_cond);
	pthread_mutex_unlock(&t->d->mt_lock);
	ret = io_loop_run(t->loop);
	if (ret < 0)
		log_err("I/O thread %u: event loop failed: %s", t->id, strerror(-ret));
	return NULL;
}

/* The CPUs this process may run on (at least 1). */
static unsigned poll_cpus(void)
{
	cpu_set_t set;
	int n;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && (n = CPU_COUNT(&set)) > 0)
		return (unsigned)n;
	n = (int)sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (unsigned)n : 1;
}

/* Create the loops of the I/O threads (before the image is served). 0 or -errno. */
static int threads_init(struct daemon *d)
{
	unsigned cpus;
	int ret;

	pthread_mutex_init(&d->mt_lock, NULL);
	pthread_cond_init(&d->mt_cond, NULL);
	if (!d->nthreads)
		return 0;
	ret = io_loop_enable_remote(d->loop);
	if (ret < 0)
		return ret;
	d->threads = calloc(d->nthreads, sizeof(*d->threads));
	if (!d->threads)
		return -ENOMEM;
	/*
	 * --poll-spare-cpus: the I/O threads busy-poll only on the CPUs they
	 * leave spare (of those we may run on: the affinity mask, i.e. taskset
	 * or libvirt's pinning), at most one thread per spare CPU at a time.
	 * A poll holds a CPU while the front-end that would end it may wait
	 * for one: 2 threads on 2 CPUs polling cost 1.7x the CPU per 4K QD1
	 * read of not polling, for the same IOPS; not the default, since at
	 * QD32 polling won IOPS on a quiet machine (contrib/bench/RESULTS.md,
	 * "cpuio").
	 */
	cpus = poll_cpus();
	io_poll_group_init(&d->poll_group, cpus > d->nserve ? cpus - d->nserve : 0);
	if (d->rings_mt && d->o->poll_ns && d->o->poll_spare) {
		/* the main thread serves queues too: it polls in the group */
		if (d->poll_group.max < d->nserve)
			io_loop_set_poll_group(d->loop, &d->poll_group);
		logmsg("busy polling: at most %u of the %u threads serving queues at a time (CPUs "
		       "to run on: %u)",
		       d->poll_group.max < d->nserve ? d->poll_group.max : d->nserve, d->nserve,
		       cpus);
	}
	for (unsigned i = 0; i < d->nthreads; i++) {
		struct iothread *t = &d->threads[i];

		t->d = d;
		t->id = i + 1;   /* thread 0 is the main thread */
		t->cont.fd = -1; /* cont_open, on the thread */
		ret = io_loop_init(&t->loop, 256);
		if (ret < 0)
			return ret;
		/* Threads that only inflate (qcow2) never busy-poll: they
		 * would take the CPU the main thread needs. */
		io_loop_set_poll_ns(t->loop, d->rings_mt ? d->o->poll_ns : 0);
		io_loop_set_poll_yield(t->loop, d->o->poll_yield);
		(void)io_loop_set_poll_hybrid(t->loop, d->o->poll_hybrid); /* checked on main's */
		if (d->o->poll_spare && d->poll_group.max < d->nserve)
			io_loop_set_poll_group(t->loop, &d->poll_group);
		io_loop_set_submit_batch(t->loop, (unsigned)d->o->submit_batch);
		/* Each loop registers the image files it uses in its own
		 * io_uring's table (io/: io_loop_set_fixed_files). */
		io_loop_set_fixed_files(t->loop, !d->o->no_fixed_files);
		ret = io_loop_enable_remote(t->loop);
		if (ret < 0)
			return ret;
		t->defer.fn = t_defer;
		t->defer.priv = t;
		io_defer_add(t->loop, &t->defer);
	}
	return 0;
}

/* Start them (after privileges are dropped, before the system call filter). 0 or -errno. */
static int threads_start(struct daemon *d)
{
	for (unsigned i = 0; i < d->nthreads && d->threads; i++) {
		struct iothread *t = &d->threads[i];
		int ret = pthread_create(&t->tid, NULL, thread_main, t);

		if (ret)
			return -ret;
		pthread_mutex_lock(&d->mt_lock);
		while (!t->running)
			pthread_cond_wait(&d->mt_cond, &d->mt_lock);
		pthread_mutex_unlock(&d->mt_lock);
	}
	return 0;
}

/* Stop and join them (nothing in flight any more). */
static void threads_stop(struct daemon *d)
{
	for (unsigned i = 0; i < d->nthreads && d->threads; i++) {
		struct iothread *t = &d->threads[i];

		if (!t->running)
			continue;
		t->quit_cmd.done = quit_done;
		io_post_remote(t->loop, &t->quit_cmd);
		pthread_join(t->tid, NULL);
		t->running = false;
	}
	for (unsigned i = 0; d->test_late_posts && i < d->nthreads && d->threads; i++) {
		/* VQCOWD_TEST_LATE_POSTS (a test seam): what a thread descheduled
		 * between its last request's end and its posts leaves in the main
		 * loop's list once joined, for img_close to run (threads_exit) */
		struct iothread *t = &d->threads[i];

		main_wake(d, t);
		if (!t->move_posted) {
			t->move_posted = true;
			t->move_cmd.done = cons_gather;
			io_post_remote(d->loop, &t->move_cmd);
		}
	}
}

/* Free the loops (after vhost/ let go of the kick watches). */
static void threads_exit(struct daemon *d)
{
	for (unsigned i = 0; i < d->nthreads && d->threads; i++) {
		struct iothread *t = &d->threads[i];

		if (t->loop)
			io_defer_del(t->loop, &t->defer);
		io_loop_exit(t->loop);
		for (struct watch *w = t->watches, *n; w; w = n) {
			n = w->next;
			free(w);
		}
	}
	/* Kept until main() ends (threads_mem): a thread's post to the main
	 * loop (wake_cmd, move_cmd, in struct iothread) may still be in its
	 * list, run by img_close's loop (a write-back timer to cancel): with
	 * d->threads NULL, main_woken touches only its flag and cons_gather
	 * returns. (Freed here, that was a write after free and a crash at exit
	 * after the final flush; VQCOWD_TEST_LATE_POSTS.) */
	d->threads_mem = d->threads;
	d->threads = NULL;
	pthread_cond_destroy(&d->mt_cond);
	pthread_mutex_destroy(&d->mt_lock);
}

/* -- vhost hooks -- */

static int d_get_config(void *opaque, uint8_t *buf, uint32_t off, uint32_t len)
{
	struct daemon *d = opaque;

	return blk_dev_get_config(d->blk, buf, off, len);
}

static int d_set_config(void *opaque, const uint8_t *buf, uint32_t off, uint32_t len)
{
	struct daemon *d = opaque;
	int ret = blk_dev_set_config(d->blk, buf, off, len);

	if (ret == 0)
		logmsg("write cache %s by the driver",
		       blk_dev_get_wce(d->blk) ? "enabled" : "disabled");
	return ret;
}

static void d_features_set(void *opaque, struct vhost_dev *dev, uint64_t features)
{
	struct daemon *d = opaque;

	blk_dev_features_set(d->blk, features); /* WCE rules: blk/ */
	logmsg("features negotiated: 0x%" PRIx64 " (%s)", features,
	       blk_dev_get_wce(d->blk) ? "writeback" : "writethrough");
}

static void d_queue_started(void *opaque, struct vhost_vq *vq)
{
	struct daemon *d = opaque;
	unsigned idx = vq_index(vq);

	if (idx < MAX_QUEUES) {
		d->q[idx].vq = vq;
		if (idx >= d->nq_seen)
			d->nq_seen = idx + 1;
		if (d->rings_mt && thread_of(d, idx))
			queue_seen(d, thread_of(d, idx), idx); /* its thread is parked */
	}
	d->release_pending = false; /* the guest runs here (again) */
	if (d->parked && d->handoff == HO_NONE && !d->stopping) {
		/* The image must be ours before a request is popped: main()
		 * takes its locks outside the loop, then pops what waits. */
		d->handoff = HO_TAKE;
		io_loop_stop(d->loop);
	}
}

/* Every ring of the connection stopped (no ring is running). */
static bool all_rings_stopped(struct vhost_dev *dev)
{
	for (unsigned i = 0; i < vhost_dev_num_queues(dev); i++) {
		struct vhost_vq *vq = vhost_dev_vq(dev, i);

		if (vq && vq_is_running(vq))
			return false;
	}
	return true;
}

static void d_queue_stopped(void *opaque, struct vhost_vq *vq)
{
	struct daemon *d = opaque;
	unsigned idx = vq_index(vq);
	struct vhost_dev *dev = vq_dev(vq);

	if (idx < MAX_QUEUES && d->q[idx].vq == vq) {
		if (d->q[idx].dirty)
			vq_notify(vq);
		d->q[idx].dirty = false;
		d->q[idx].vq = NULL;
	}
	/*
	 * The end of a live migration: with dirty logging on (VHOST_F_LOG_ALL
	 * and a log: only while QEMU migrates) every ring stopped means the
	 * source VM stopped for the switchover. Let the image go once the
	 * requests in flight have ended, so the destination can take it.
	 */
	if (!vhost_dev_is_broken(dev) && vhost_dev_logging(dev) && all_rings_stopped(dev) &&
	    !d->parked && img_may_write(d->img))
		d->release_pending = true;
}

/*
 * --fixed-buffers: register the guest memory regions as io_uring buffers, so
 * single-buffer data requests skip the per-request page pinning. Re-done on
 * every table change, before the rings run on the new table.
 */
static void d_mem_changed(void *opaque, struct vhost_dev *dev)
{
	struct daemon *d = opaque;
	struct iovec iov[MEM_REGIONS_MAX];
	unsigned n;
	int ret;

	if (!d->o->fixed_buffers)
		return;
	n = vhost_dev_mem_regions(dev, iov, MEM_REGIONS_MAX);
	if (n > MEM_REGIONS_MAX)
		ret = -E2BIG;
	else
		ret = io_loop_register_buffers(d->loop, iov, n);
	/* Every loop that moves guest data (the I/O threads are parked). */
	for (unsigned i = 0; ret >= 0 && i < d->nthreads && d->threads; i++)
		ret = io_loop_register_buffers(d->threads[i].loop, iov, n);
	if (ret < 0) {
		io_loop_register_buffers(d->loop, NULL, 0);
		for (unsigned i = 0; i < d->nthreads && d->threads; i++)
			io_loop_register_buffers(d->threads[i].loop, NULL, 0);
		log_warn("cannot register the guest memory (%u regions) as io_uring buffers: %s; "
			 "requests use it by address",
			 n, strerror(-ret));
	} else if (n) {
		logmsg("guest memory registered as %u io_uring buffer(s)",
		       io_loop_fixed_buffers(d->loop));
	}
}

/*
 * vhost/ asks before it drops a connection on the main thread: while the I/O
 * threads run (not parked: the main thread's own rings, a vq_pop or a
 * malformed request of its queues), it must wait for the wake-up, which
 * parks them; within a control callback (parked) it may drop it at once.
 */
static bool d_rings_shared(void *opaque)
{
	struct daemon *d = opaque;

	return d->rings_mt && d->pause_depth == 0;
}

static void d_disconnected(void *opaque, struct vhost_dev *dev)
{
	struct daemon *d = opaque;

	(void)dev;
	if (d->o->fixed_buffers) {
		io_loop_register_buffers(d->loop, NULL, 0);
		for (unsigned i = 0; i < d->nthreads && d->threads; i++)
			io_loop_register_buffers(d->threads[i].loop, NULL, 0);
	}
	blk_dev_driver_gone(d->blk);
	for (unsigned i = 0; i < MAX_QUEUES; i++) {
		d->q[i].vq = NULL;
		d->q[i].dirty = false;
	}
	d->nq_seen = 0;
	for (unsigned i = 0; i < d->nthreads && d->threads; i++)
		d->threads[i].nq_seen = 0;
	logmsg("frontend disconnected%s", d->stopping ? "" : "; waiting for the next one");
}

/* -- shutdown -- */

static void flush_done(struct img_io *io, int res)
{
	struct daemon *d = io->priv;

	if (res < 0) {
		log_err("final flush failed: %s", strerror(-res));
		d->exit_code = 1;
	} else {
		char desc[1024];

		img_describe(d->img, desc, sizeof(desc));
		logmsg("image flushed; exiting (%s)", desc);
		if (d->consolidate) {
			unsigned long long g = 0, sp = 0;

			for (unsigned i = 0; i < d->nthreads; i++) {
				g += d->threads[i].ngather;
				sp += d->threads[i].nspread;
			}
			logmsg("--io-threads-consolidate: I/O threads' queues moved to the main "
			       "thread %llu times, back %llu times",
			       g, sp);
		}
		cont_log(&d->mcont, 0);
		if (d->rings_mt) {
			unsigned long long cg = 0, cs = 0;

			for (unsigned i = 0; i < d->nthreads; i++) {
				cont_log(&d->threads[i].cont, d->threads[i].id);
				cg += d->threads[i].ncont_gather;
				cs += d->threads[i].ncont_spread;
			}
			if (d->o->contended)
				logmsg("--io-threads-contended %u: queues moved to the main thread "
				       "for contention %llu times, back %llu times",
				       d->o->contended, cg, cs);
		}
		if (d->nthreads)
			log_dbg("I/O threads parked %llu times", (unsigned long long)d->nparks);
		if (getenv("VQCOWD_TEST_ZREAD_FAIL"))
			log_warn("VQCOWD_TEST_ZREAD_FAIL: %llu reads of compressed bytes failed",
				 (unsigned long long)img_test_zread_failed());
	}
	d->flushed = true;
	io_loop_stop(d->loop);
}

/* The image size changed (@why: SIGHUP, QMP): tell the driver. */
static void size_changed(struct daemon *d, const char *why)
{
	struct vhost_dev *dev;
	int ret;

	if (!blk_dev_update_capacity(d->blk)) {
		logmsg("%s: image size unchanged (%" PRIu64 " bytes)", why, d->img->size);
		return;
	}
	logmsg("%s: image size is now %" PRIu64 " bytes", why, d->img->size);
	dev = vhost_server_dev(d->srv);
	if (dev) {
		ret = vhost_dev_config_changed(dev);
		if (ret < 0)
			log_warn("cannot send a config-change notice: %s", strerror(-ret));
		else
			logmsg("config-change notice sent to the frontend");
	}
}

/* SIGHUP: the image may have been resized outside; tell the driver. */
static void check_resize(struct daemon *d)
{
	int ret = img_refresh_size(d->img);

	if (ret == -ENOTSUP) {
		log_warn("SIGHUP: online resize works for raw images only; this image is %s (its "
			 "size is in its header: grow it with QMP block_resize)",
			 d->img->ops->format);
		return;
	}
	if (ret < 0) {
		log_warn("SIGHUP: cannot re-read the image size: %s", strerror(-ret));
		return;
	}
	size_changed(d, "SIGHUP");
}

static void ctl_resized(void *opaque)
{
	struct daemon *d = opaque;

	/* the capacity the I/O threads check, a config change: parked (a
	 * qcow2 grow ends in a completion on the loop, not in the handler) */
	pause_all(d);
	size_changed(d, "block_resize");
	resume_all(d);
}

static void ctl_park(void *opaque, bool on)
{
	struct daemon *d = opaque;

	if (on)
		pause_all(d);
	else
		resume_all(d);
}

static void ctl_set_active(void *opaque, struct img *img)
{
	struct daemon *d = opaque;

	d->img = img;
}

static bool ctl_retire(void *opaque, struct img *img)
{
	struct daemon *d = opaque;

	if (d->nretired < sizeof(d->retired) / sizeof(d->retired[0])) {
		d->retired[d->nretired++] = img;
		io_loop_stop(d->loop);
		return true;
	}
	log_warn("too many layers to close at once: %s stays open", img->path);
	return false;
}

static void ctl_kick(void *opaque)
{
	struct daemon *d = opaque;
	struct vhost_dev *dev = vhost_server_dev(d->srv);

	for (unsigned i = 0; dev && !d->parked && i < vhost_dev_num_queues(dev); i++) {
		struct vhost_vq *vq = vhost_dev_vq(dev, i);

		if (vq && vq_is_running(vq))
			d_queue_kick(d, vq);
	}
}

/* Close the layers an external snapshot or commit let go of (the loop is stopped). */
static void close_retired(struct daemon *d)
{
	while (d->nretired) {
		struct img *img = d->retired[--d->nretired];

		logmsg("closing %s (no longer in the chain)", img->path);
		img_close(img);
	}
	ctl_retired(&d->ctl);
}

/* Stop taking requests; the defer hook flushes and ends the loop. */
static void start_stopping(struct daemon *d)
{
	d->stopping = true;
	vhost_server_stop_accepting(d->srv);
}

/*
 * While requests are held back for a snapshot, or the device drains for an
 * external snapshot or the end of a commit job (ctl_waiting), wake the
 * main loop every millisecond so that d_defer sees the last one end: with
 * I/O threads the completions do not run on the main loop.
 */
static bool hold_waits(struct daemon *d)
{
	return (__atomic_load_n(&d->ctl_hold, __ATOMIC_ACQUIRE) && !d->stopping) ||
	       (d->nthreads && ctl_waiting(&d->ctl));
}

static void hold_tick(struct io_cmd *cmd, int res)
{
	struct daemon *d = container_of(cmd, struct daemon, hold_cmd);

	(void)res;
	d->hold_armed = false;
	if (hold_waits(d) && !d->flushed) {
		d->hold_armed = true;
		io_timeout(d->loop, &d->hold_cmd, 1000000);
	}
}

static void hold_arm(struct daemon *d)
{
	if (!d->hold_armed) {
		d->hold_cmd.done = hold_tick;
		d->hold_armed = true;
		io_timeout(d->loop, &d->hold_cmd, 1000000);
	}
}

static void ctl_hold_cb(void *opaque)
{
	struct daemon *d = opaque;

	/* d_defer stops the loop once drained; I/O threads read it in
	 * d_queue_kick, set while they are parked: none is popping then */
	pause_all(d);
	d->hold_asks++;
	if (!d->hold_t0) { /* the first of the operations held together */
		d->hold_t0 = util_now_ns();
		d->hold_drained = 0;
		__atomic_store_n(&d->hold_done, 0, __ATOMIC_RELAXED);
	}
	__atomic_store_n(&d->ctl_hold, true, __ATOMIC_RELEASE);
	resume_all(d);
	hold_arm(d);
}

static void ctl_quit(void *opaque)
{
	struct daemon *d = opaque;

	if (!d->stopping) {
		start_stopping(d);
		ctl_shutdown_event(&d->ctl, "host-qmp-quit");
	}
}

static void sig_done(struct io_cmd *cmd, int res)
{
	struct daemon *d = container_of(cmd, struct daemon, sig_cmd);
	struct signalfd_siginfo si;
	ssize_t n;

	if (res < 0)
		return; /* final call (cancelled at exit) */
	pause_all(d);   /* resize, stop: blk/ and vhost/ outside the data path */
	while ((n = read(d->sigfd, &si, sizeof(si))) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGHUP) {
			check_resize(d);
			continue;
		}
		if (d->stopping) {
			logmsg("signal %u: already shutting down", si.ssi_signo);
			continue;
		}
		logmsg("signal %u: stopping (in flight: %u)", si.ssi_signo, d_inflight(d));
		start_stopping(d);
		ctl_shutdown_event(&d->ctl, "host-signal");
	}
	resume_all(d);
}

/* -- privileges -- */

static int lookup_ids(const struct options *o, uid_t *uid, gid_t *gid)
{
	uint64_t v;

	*uid = (uid_t)-1;
	*gid = (gid_t)-1;
	if (o->user) {
		struct passwd *pw = getpwnam(o->user);

		if (pw) {
			*uid = pw->pw_uid;
			*gid = pw->pw_gid;
		} else if (parse_u64(o->user, &v, false) == 0 && v < UINT32_MAX) {
			*uid = (uid_t)v;
			*gid = getgid();
		} else {
			fprintf(stderr, "vqcowd: unknown user '%s'\n", o->user);
			return -ENOENT;
		}
	}
	if (o->group) {
		struct group *gr = getgrnam(o->group);

		if (gr) {
			*gid = gr->gr_gid;
		} else if (parse_u64(o->group, &v, false) == 0 && v < UINT32_MAX) {
			*gid = (gid_t)v;
		} else {
			fprintf(stderr, "vqcowd: unknown group '%s'\n", o->group);
			return -ENOENT;
		}
		if (!o->user)
			*uid = getuid();
	}
	return 0;
}

/* Drop every capability (and switch ids if asked). 0 or -1. */
static int drop_privileges(const struct options *o, uid_t uid, gid_t gid)
{
	int ret;

	if (o->fixed_buffers) {
		/* io_uring counts registered buffers against RLIMIT_MEMLOCK once
		 * CAP_IPC_LOCK is gone: lift it while we still may. */
		struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};

		if (setrlimit(RLIMIT_MEMLOCK, &rl) < 0 && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 &&
		    rl.rlim_cur != RLIM_INFINITY)
			log_warn("--fixed-buffers: RLIMIT_MEMLOCK stays at %llu KiB; guest memory "
				 "beyond it is used by address",
				 (unsigned long long)rl.rlim_cur / 1024);
	}
	capng_clear(CAPNG_SELECT_BOTH);
	if (o->user || o->group) {
		ret =
		    capng_change_id((int)uid, (int)gid, CAPNG_DROP_SUPP_GRP | CAPNG_CLEAR_BOUNDING);
		if (ret < 0) {
			log_err("cannot switch to uid %u gid %u (libcap-ng error %d)",
				(unsigned)uid, (unsigned)gid, ret);
			return -1;
		}
		logmsg("switched to uid %u gid %u; all capabilities dropped", (unsigned)uid,
		       (unsigned)gid);
	} else {
		ret = capng_apply(CAPNG_SELECT_BOTH);
		if (ret < 0) {
			/* Without CAP_SETPCAP the bounding set cannot be changed. */
			ret = capng_apply(CAPNG_SELECT_CAPS);
			if (ret < 0) {
				log_err("cannot drop capabilities (libcap-ng error %d)", ret);
				return -1;
			}
			logmsg("all capabilities dropped (bounding set unchanged)");
		} else {
			logmsg("all capabilities dropped (effective, permitted, "
			       "inheritable, bounding)");
		}
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		log_warn("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	return 0;
}

/*
 * Files named inside the image (backing and data files) are opened with the
 * file-system identity --user will have (uid, gid, no supplementary groups),
 * so a hostile image cannot make root open /etc/shadow for its guest to read.
 * A non-zero fsuid also clears the file-system capabilities (DAC override).
 */
struct name_ids {
	uid_t uid;
	gid_t gid;
	gid_t *groups; /* saved supplementary groups */
	int ngroups;
};

static int name_enter(void *priv)
{
	struct name_ids *n = priv;

	n->ngroups = getgroups(0, NULL);
	if (n->ngroups < 0)
		return -errno;
	n->groups = calloc((size_t)n->ngroups + 1, sizeof(gid_t));
	if (!n->groups)
		return -ENOMEM;
	if (getgroups(n->ngroups, n->groups) < 0 || setgroups(0, NULL) < 0)
		goto fail;
	setfsgid(n->gid);
	setfsuid(n->uid);
	if ((uid_t)setfsuid((uid_t)-1) != n->uid || (gid_t)setfsgid((gid_t)-1) != n->gid) {
		errno = EPERM;
		goto fail;
	}
	return 0;
fail:
	free(n->groups);
	n->groups = NULL;
	return -errno;
}

static void name_leave(void *priv)
{
	struct name_ids *n = priv;

	setfsuid(geteuid());
	setfsgid(getegid());
	if (setgroups((size_t)n->ngroups, n->groups) < 0)
		log_warn("cannot restore the supplementary groups: %s", strerror(errno));
	free(n->groups);
	n->groups = NULL;
}

/*
 * Cheap checks before the (possibly slow) image open: the socket's directory
 * must exist and the path fit a sockaddr_un. 0 or -1 (message logged).
 */
static int check_socket_path(const char *path)
{
	struct sockaddr_un sa;
	char dir[PATH_MAX];
	const char *slash;
	struct stat st;

	if (!path)
		return 0;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		log_err("cannot listen on %s: path longer than %zu bytes", path,
			sizeof(sa.sun_path) - 1);
		return -1;
	}
	slash = strrchr(path, '/');
	if (!slash)
		return 0; /* the current directory */
	snprintf(dir, sizeof(dir), "%.*s", slash == path ? 1 : (int)(slash - path), path);
	if (stat(dir, &st) < 0) {
		log_err("cannot listen on %s: directory %s: %s", path, dir, strerror(errno));
		return -1;
	}
	if (!S_ISDIR(st.st_mode)) {
		log_err("cannot listen on %s: %s is not a directory", path, dir);
		return -1;
	}
	return 0;
}

/* ---- main ---- */

/*
 * Image handoff between two daemons on one image (live migration on shared
 * storage). States: active (image locked for writing, metadata cached,
 * rings popped) and parked (no lock, nothing cached, rings not popped).
 *   --incoming: parked from the start (the source holds the locks).
 *   active -> parked: every ring stopped while VHOST_F_LOG_ALL is on (the
 *     source's switchover) and no request in flight: the metadata is
 *     written back and dropped, the locks released (HO_RELEASE).
 *   parked -> active: a ring starts (the destination's VM runs, or the
 *     source's resumes after a failed migration): the locks are taken and
 *     header, L1 and refcounts re-read, then the waiting requests popped
 *     (HO_TAKE). The source may still be letting go: a lock conflict is
 *     retried for up to 10 s; if it still fails the requests are served and
 *     fail (never written without the lock).
 * img_set_perm drives the loop, so this runs in main() with the loop stopped.
 */
static void kick_running(struct daemon *d)
{
	struct vhost_dev *dev = vhost_server_dev(d->srv);

	for (unsigned i = 0; dev && i < vhost_dev_num_queues(dev); i++) {
		struct vhost_vq *vq = vhost_dev_vq(dev, i);

		if (vq && vq_is_running(vq))
			d_queue_kick(d, vq); /* requests waiting since the ring started */
	}
}

/*
 * How long the guest's requests were held back for a QMP operation, in
 * parts: the drain (the requests in flight at the hold ending), how long
 * after the last of them ended the main loop noticed (a loop that sleeps
 * through the drain shows here: 4.5 s once, see hold_tick), and the
 * operation itself. integration.qmp_snapshot reads this line.
 */
static void hold_report(struct daemon *d)
{
	uint64_t end = util_now_ns(), t0 = d->hold_t0, drained = d->hold_drained;
	uint64_t last = __atomic_load_n(&d->hold_done, __ATOMIC_RELAXED);

	if (!t0)
		return; /* no hold was asked (ctl_hold_cb sets it) */
	d->hold_t0 = 0;
	if (drained < t0)
		drained = t0;
	if (last < t0)
		last = t0; /* nothing was in flight */
	if (last > drained)
		last = drained;
	vlog(VLOG_INFO, NULL,
	     "qmp: requests held %.1f ms: drained in %.1f ms, noticed %.1f ms after the last "
	     "request ended; the operation %.1f ms",
	     (double)(end - t0) / 1e6, (double)(drained - t0) / 1e6, (double)(drained - last) / 1e6,
	     (double)(end - drained) / 1e6);
}

static void handoff_parked(struct daemon *d)
{
	enum img_perm want = d->o->read_only ? IMG_PERM_READ : IMG_PERM_WRITE;
	struct vhost_dev *dev = vhost_server_dev(d->srv);
	char err[512] = "";
	int ret, tries = 0;

	if (d->handoff == HO_CTL) {
		unsigned asks = d->hold_asks;

		/*
		 * --qmp snapshot: no request in flight, new ones held back. The
		 * operation drives the main loop (an engine closed and opened),
		 * whose d_defer would see the hold on and nothing in flight and
		 * ask for HO_CTL again: ctl_running keeps it from that, so
		 * ctl_held runs once. A hold asked meanwhile (a completion that
		 * queued more held work, e.g. a commit job's end) stays on:
		 * d_defer asks for HO_CTL again at the next drain.
		 */
		d->handoff = HO_NONE;
		d->ctl_running = true;
		ctl_held(&d->ctl);
		d->ctl_running = false;
		if (d->hold_asks != asks)
			return;
		__atomic_store_n(&d->ctl_hold, false, __ATOMIC_RELEASE);
		hold_report(d);
		kick_running(d);
		return;
	}

	if (d->handoff == HO_RELEASE) {
		d->handoff = HO_NONE;
		if (!dev || !all_rings_stopped(dev) || d_inflight(d))
			return; /* the guest runs here again */
		/*
		 * Parked from here on: img_set_perm drives the main loop (the
		 * write-back, the reserve given back), which serves the vhost
		 * socket and the kicks. A ring started meanwhile (the front-end
		 * resumes the VM: a failed or cancelled migration) must find the
		 * daemon parked, so that d_queue_started asks for HO_TAKE, and a
		 * kick must not pop requests onto an image being let go. Set
		 * after the release, the ring restarted during it was served by
		 * a parked daemon: never popped (integration.migration 'dirty').
		 */
		d->parked = true;
		ret = img_set_perm(d->img, IMG_PERM_NONE, err, sizeof(err));
		if (ret < 0) {
			log_err("migration: cannot let the image go: %s",
				err[0] ? err : strerror(-ret));
			if (d->handoff == HO_TAKE)
				return; /* a ring started meanwhile: main() takes it */
			d->parked = false;
			kick_running(d); /* the kicks ignored meanwhile */
			return;
		}
		logmsg("migration: rings stopped; image flushed, metadata dropped, locks released");
		if (d->handoff == HO_TAKE) /* the loop stopped: main() takes it back next */
			logmsg("migration: a ring started while the image was let go");
		return;
	}
	d->handoff = HO_NONE;
	if (!dev || all_rings_stopped(dev))
		return; /* started and stopped again while letting go: stay parked */
	for (;;) {
		ret = img_set_perm(d->img, want, err, sizeof(err));
		if (ret != -EAGAIN || ++tries > 100)
			break;
		if (tries == 1)
			logmsg("migration: %s; waiting for the other side to let the image go",
			       err);
		usleep(100 * 1000);
	}
	d->parked = false;
	if (ret < 0) {
		log_err("migration: cannot take the image: %s; requests will fail",
			err[0] ? err : strerror(-ret));
	} else {
		logmsg("image active: locks taken, metadata read afresh");
	}
	kick_running(d);
}

static void handoff(struct daemon *d)
{
	pause_all(d);
	handoff_parked(d);
	resume_all(d);
}

int main(int argc, char **argv)
{
	struct options o;
	struct daemon d;
	struct img_opts iopts;
	char cwd[4096];
	struct name_ids nids = {0};
	struct img_name_guard name_guard = {name_enter, name_leave, &nids};
	struct blk_opts bopts;
	char err[512], desc[512];
	sigset_t mask;
	uid_t uid;
	gid_t gid;
	int ret;

	ret = parse_args(argc, argv, &o);
	if (ret >= 0)
		return ret;
	vlog_init("vqcowd");
	if (check_socket_path(o.socket_path) < 0)
		return 1;
	if (crash_setup() < 0)
		return 2;
	if (o.log_level >= 0) {
		vlog_set_level((enum vlog_level)o.log_level);
	} else {
		const char *e = getenv("VQCOW_VHOST_DEBUG");

		if (e && *e && strcmp(e, "0") != 0) {
			vlog_set_level(VLOG_DEBUG);
			log_warn("VQCOW_VHOST_DEBUG is deprecated: use --log-level debug");
		}
	}
	if (lookup_ids(&o, &uid, &gid) < 0)
		return 2;

	memset(&d, 0, sizeof(d));
	d.o = &o;
	d.sigfd = -1;
	if (o.io_threads) {
		d.nserve = o.io_threads;
	} else {
		/* Default: one thread per queue, up to the host's CPUs. */
		long cpus = sysconf(_SC_NPROCESSORS_ONLN);

		d.nserve = cpus > 1 ? (unsigned)(cpus < MAX_IO_THREADS ? cpus : MAX_IO_THREADS) : 1;
	}
	if (d.nserve > o.num_queues)
		d.nserve = o.num_queues; /* a thread without a queue would idle */
	d.nthreads = d.nserve - 1;       /* the main thread serves queues 0, N, 2N... */

	/* Signals go to a signalfd on the loop; nothing else may see them. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
		log_err("sigprocmask: %s", strerror(errno));
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);

	ret = io_loop_init(&d.loop, 256);
	if (ret < 0) {
		log_err("cannot create the io_uring loop: %s", strerror(-ret));
		return 1;
	}
	io_loop_set_poll_ns(d.loop, o.poll_ns);
	io_loop_set_poll_yield(d.loop, o.poll_yield);
	if (io_loop_set_poll_hybrid(d.loop, o.poll_hybrid) < 0)
		log_warn("--poll-hybrid: this kernel's io_uring waits take no timeout; polling as "
			 "without it");
	io_loop_set_submit_batch(d.loop, (unsigned)o.submit_batch);
	io_loop_set_fixed_files(d.loop, !o.no_fixed_files);

	memset(&iopts, 0, sizeof(iopts));
	iopts.format = o.format;
	iopts.read_only = o.read_only;
	iopts.force_share = o.force_share;
	iopts.inactive = o.incoming;
	nids.uid = uid;
	nids.gid = gid;
	if ((o.user || o.group) && uid != 0 && geteuid() == 0)
		iopts.name_guard = &name_guard;
	iopts.direct = true;
	iopts.l2_cache_size = o.l2_cache_size;
	iopts.cache_entry_size = (uint32_t)o.cache_entry_size;
	iopts.no_l2_prefetch = o.no_l2_prefetch;
	iopts.no_cluster_fill = o.no_cluster_fill;
	iopts.blkdev_zero_ahead = o.blkdev_zero_ahead;
	ret = img_open(&d.img, d.loop, o.blk_file, &iopts, err, sizeof(err));
	if (ret < 0) {
		/* A file we may read but not write: say how to serve it anyway. */
		bool hint = (ret == -EACCES || ret == -EPERM || ret == -EROFS) && !o.read_only &&
			    access(o.blk_file, R_OK) == 0;

		log_err("%s%s", err[0] ? err : strerror(-ret),
			hint ? "; to export it read-only, pass --read-only" : "");
		goto exit_loop;
	}
	img_describe(d.img, desc, sizeof(desc));
	logmsg("image: %s", desc);
	/* Rings on the I/O threads for every image that takes requests there
	 * (raw: any loop; qcow2: submitted anywhere, the owner behind), with
	 * or without --qmp: the control path parks the threads around every
	 * change of the device (src/layers.c, ctl_park). */
	d.hop = !d.img->any_loop && !d.img->mt_submit;
	d.rings_mt = d.nthreads && !d.hop;
	d.consolidate = o.consolidate && d.rings_mt;
	if (o.consolidate && o.consolidate_set && !d.consolidate)
		log_warn("--io-threads-consolidate: ignored, no I/O thread serves queues");
	if (o.contended && d.rings_mt && !d.consolidate)
		log_warn("--io-threads-contended: no queue moves with --io-threads-consolidate=off "
			 "(a contended thread only stops busy-polling)");
	d.cons_run = CONS_RUN;
	d.mcont.fd = -1; /* cont_open, before the threads start */
	if (getenv("VQCOWD_TEST_CONT")) {
		/* a test seam: see cont_read() */
		cont_test_fd = open(getenv("VQCOWD_TEST_CONT"), O_RDONLY | O_CLOEXEC);
		log_warn("VQCOWD_TEST_CONT: run delays from %s (a test seam)%s",
			 getenv("VQCOWD_TEST_CONT"), cont_test_fd < 0 ? ": cannot open it" : "");
	}
	if (getenv("VQCOWD_TEST_CONS_RUN")) {
		/* a test seam: move queues after this many low requests */
		d.cons_run = (unsigned)strtoul(getenv("VQCOWD_TEST_CONS_RUN"), NULL, 10);
		if (d.cons_run < 2)
			d.cons_run = 2;
		log_warn("VQCOWD_TEST_CONS_RUN: queues move after %u requests (a test seam)",
			 d.cons_run);
	}
	if (d.consolidate && getenv("VQCOWD_TEST_CONS_HOLD")) {
		/* a test seam: see cons_hold() */
		d.cons_hold_ns = strtoull(getenv("VQCOWD_TEST_CONS_HOLD"), NULL, 10) * 1000000ull;
		log_warn("VQCOWD_TEST_CONS_HOLD: a drain for a move held open %" PRIu64
			 " ms (a test seam)",
			 d.cons_hold_ns / 1000000);
	}
	if (getenv("VQCOWD_TEST_LATE_POSTS")) {
		/* a test seam: see threads_stop() */
		d.test_late_posts = true;
		log_warn("VQCOWD_TEST_LATE_POSTS: the I/O threads' posts left for the exit (a "
			 "test seam)");
	}
	if (getenv("VQCOWD_TEST_FAST_DELAY")) {
		/* a test seam: see img_test_fast_delay() */
		img_test_fast_delay((unsigned)strtoul(getenv("VQCOWD_TEST_FAST_DELAY"), NULL, 10));
		log_warn("VQCOWD_TEST_FAST_DELAY: fast-path writes held back (a test seam)");
	}
	if (getenv("VQCOWD_TEST_TICKET_HOLD")) {
		/* a test seam: see img_test_ticket_hold() */
		img_test_ticket_hold(
		    (unsigned)strtoul(getenv("VQCOWD_TEST_TICKET_HOLD"), NULL, 10));
		log_warn("VQCOWD_TEST_TICKET_HOLD: fast tickets held as they are taken (a test "
			 "seam)");
	}
	if (getenv("VQCOWD_TEST_ZREAD_FAIL")) {
		/* a test seam: see img_test_zread_fail() */
		img_test_zread_fail((unsigned)strtoul(getenv("VQCOWD_TEST_ZREAD_FAIL"), NULL, 10));
		log_warn("VQCOWD_TEST_ZREAD_FAIL: reads of compressed bytes fail (a test seam)");
	}
	if (getenv("VQCOWD_TEST_LINK_DELAY")) {
		/* a test seam: see img_test_link_delay() */
		img_test_link_delay((unsigned)strtoul(getenv("VQCOWD_TEST_LINK_DELAY"), NULL, 10));
		log_warn("VQCOWD_TEST_LINK_DELAY: early-link batches held back (a test seam)");
	}
	if (getenv("VQCOWD_TEST_SC_LINK")) {
		/* a test seam: see img_test_sc_link() */
		img_test_sc_link(true);
		log_warn("VQCOWD_TEST_SC_LINK: clusters written whole linked per subcluster "
			 "(a test seam)");
	}
	if (getenv("VQCOWD_TEST_WB_HOLD")) {
		/* a test seam: see img_test_wb_hold() */
		img_test_wb_hold((unsigned)strtoul(getenv("VQCOWD_TEST_WB_HOLD"), NULL, 10));
		log_warn(
		    "VQCOWD_TEST_WB_HOLD: write-back batches' L2 writes held back (a test seam)");
	}
	if (getenv("VQCOWD_TEST_SYNC_DELAY")) {
		/* a test seam: see img_test_sync_delay() */
		img_test_sync_delay((unsigned)strtoul(getenv("VQCOWD_TEST_SYNC_DELAY"), NULL, 10));
		log_warn("VQCOWD_TEST_SYNC_DELAY: write-back fdatasyncs held back (a test seam)");
	}
	if (getenv("VQCOWD_TEST_EARLY_NEW") && strcmp(getenv("VQCOWD_TEST_EARLY_NEW"), "0")) {
		/* for a quiet benchmark to decide: see img_early_new() */
		img_early_new(true);
		log_warn("VQCOWD_TEST_EARLY_NEW: new clusters of fresh space linked at map time "
			 "(off by default)");
	}
	if (getenv("VQCOWD_TEST_WB")) {
		/* benchmarks: see img_wb_tune() */
		const char *v = getenv("VQCOWD_TEST_WB"), *x = strstr(v, ",xtab");
		uint32_t bridge = (uint32_t)strtoul(v, NULL, 10);

		img_wb_tune(bridge, strstr(v, ",whole") != NULL,
			    !x            ? 0
			    : x[5] == '=' ? (uint32_t)strtoul(x + 6, NULL, 10)
					  : bridge);
		log_warn("VQCOWD_TEST_WB=%s: write-back tuned (for benchmarks)", v);
	}
	ret = threads_init(&d);
	if (ret < 0) {
		log_err("cannot set up %u I/O threads: %s", d.nthreads, strerror(-ret));
		goto exit_threads;
	}
	if (!o.format)
		logmsg("format probed as %s; pass --format to skip probing", d.img->ops->format);

	memset(&bopts, 0, sizeof(bopts));
	bopts.serial = o.serial;
	bopts.logical_block_size = o.lbs;
	bopts.num_queues = (uint16_t)o.num_queues;
	bopts.queue_size = (uint16_t)o.queue_size;
	bopts.read_only = o.read_only;
	bopts.writeback = !o.writethrough;
	ret = blk_dev_init(&d.blk, d.img, &bopts);
	if (ret < 0) {
		log_err("cannot set up the virtio-blk device: %s", strerror(-ret));
		goto exit_threads;
	}
	d.flush_io.done = flush_done;
	d.flush_io.priv = &d;

	d.ops.features = blk_dev_features(d.blk);
	d.ops.protocol_features = DAEMON_PROTOCOL_FEATURES;
	d.ops.num_queues = (uint16_t)o.num_queues;
	d.ops.max_queue_size = (uint16_t)o.queue_size;
	d.ops.elem_size = sizeof(struct dreq);
	d.ops.watch = d_watch;
	d.ops.watch_kick = d_watch_kick;
	d.ops.unwatch = d_unwatch;
	d.ops.get_config = d_get_config;
	d.ops.set_config = d_set_config;
	d.ops.features_set = d_features_set;
	d.ops.queue_started = d_queue_started;
	d.ops.queue_stopped = d_queue_stopped;
	d.ops.queue_kick = d_queue_kick;
	d.ops.disconnected = d_disconnected;
	d.ops.mem_changed = d_mem_changed;
	d.ops.rings_shared = d_rings_shared;

	d.sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (d.sigfd < 0) {
		ret = -errno;
		log_err("signalfd: %s", strerror(errno));
		goto exit_blk;
	}
	d.sig_cmd.done = sig_done;
	io_poll(d.loop, &d.sig_cmd, d.sigfd, POLLIN);

	d.defer.fn = d_defer;
	d.defer.priv = &d;
	io_defer_add(d.loop, &d.defer);

	ret = vhost_server_init(&d.srv, o.socket_path, o.fd, &d.ops, &d);
	if (ret == -EADDRINUSE && o.socket_path) {
		log_err("cannot listen on %s: another process (a running vqcowd?) is listening on "
			"this socket",
			o.socket_path);
		goto del_defer;
	}
	if (ret < 0) {
		log_err("cannot listen on %s: %s", o.socket_path ? o.socket_path : "--fd",
			strerror(-ret));
		goto del_defer;
	}
	if (o.socket_path && (o.user || o.group)) {
		/* Let the unprivileged user's frontend (and ourselves) reach it. */
		if (chown(o.socket_path, uid, gid) < 0)
			log_warn("chown %s: %s", o.socket_path, strerror(errno));
	}
	if (o.qmp_path || o.qmp_fd >= 0) {
		d.ctl.node_name = o.node_name;
		d.ctl.file = o.blk_file;
		d.ctl.img = d.img;
		d.ctl.blk = d.blk;
		d.ctl.stopping = &d.stopping;
		d.ctl.qstats = d.qstat;
		d.ctl.nqueues = o.num_queues;
		d.ctl.quit = ctl_quit;
		d.ctl.resized = ctl_resized;
		d.ctl.hold = ctl_hold_cb;
		d.ctl.img_opts = &iopts;
		d.ctl.park = ctl_park;
		d.ctl.cwd = getcwd(cwd, sizeof(cwd));
		d.ctl.set_active = ctl_set_active;
		d.ctl.retire = ctl_retire;
		d.ctl.kick = ctl_kick;
		d.ctl.opaque = &d;
		d.ctl.loop.watch = watch_events;
		d.ctl.loop.unwatch = d_unwatch;
		d.ctl.loop.opaque = &d;
		ret = ctl_start(&d.ctl, o.qmp_path, o.qmp_fd);
		if (ret < 0 && o.qmp_fd >= 0) {
			log_err("--qmp-fd %d: %s", o.qmp_fd,
				ret == -ENOTCONN ? "not a listening stream socket"
						 : strerror(-ret));
			goto exit_srv;
		}
		if (ret < 0) {
			log_err("cannot listen on %s (--qmp): %s", o.qmp_path,
				ret == -EADDRINUSE ? "another process is listening on it"
						   : strerror(-ret));
			goto exit_srv;
		}
		if (o.qmp_path && (o.user || o.group)) {
			if (chown(o.qmp_path, uid, gid) < 0)
				log_warn("chown %s: %s", o.qmp_path, strerror(errno));
		}
		if (o.qmp_path)
			logmsg("QMP on %s (node %s)", o.qmp_path, o.node_name);
		else
			logmsg("QMP on fd %d (node %s)", o.qmp_fd, o.node_name);
	}
	if (drop_privileges(&o, uid, gid) < 0) {
		ret = -EPERM;
		goto exit_srv;
	}
	if (geteuid() == 0 && !o.user)
		log_warn("running as root (uid 0): pass --user (and --group) to serve as an "
			 "unprivileged user once the image and the socket are open");
	/* After the privileges are gone (capabilities are per thread), before
	 * the filter (installed on every thread at once; no clone after it). */
	d.exit_code = 0;
	d.parked = o.incoming; /* before the I/O threads read it */
	cont_open(&d.mcont);   /* before the system call filter */
	if (o.contended && d.mcont.fd < 0 && cont_test_fd < 0)
		log_warn(
		    "--io-threads-contended: cannot read /proc/thread-self/schedstat (%s): off",
		    strerror(errno));
	ret = threads_start(&d);
	if (ret < 0) {
		log_err("cannot start the I/O threads: %s", strerror(-ret));
		goto exit_srv;
	}
	if (o.no_seccomp) {
		logmsg("system call filter off (--no-seccomp)");
	} else {
		ret = sandbox_install(err, sizeof(err));
		if (ret < 0) {
			log_err("%s; --no-seccomp runs without it", err);
			goto exit_srv;
		}
		logmsg("system call filter installed (seccomp allow-list)");
	}
	if (getenv("VQCOWD_TEST_FORBIDDEN_CALL")) {
		/* Test hook (integration.seccomp): a call the filter must stop. */
		char *const args[] = {"true", NULL};

		execve("/nonexistent/vqcowd-seccomp-test", args, environ);
		log_err("test hook: execve was not stopped: %s", strerror(errno));
	}
	/* before "serving", which tests and scripts wait for as the sign of a
	 * daemon ready and done saying how it runs */
	if (d.consolidate)
		logmsg("--io-threads-consolidate: at low load the I/O threads' queues move to the "
		       "main thread");
	logmsg("serving %s on %s (%u queue%s of up to %u, %s)", o.blk_file,
	       o.socket_path ? o.socket_path : "the given fd", o.num_queues,
	       o.num_queues > 1 ? "s" : "", o.queue_size,
	       o.read_only || d.img->read_only ? "read-only" : "read-write");
	if (d.nthreads)
		logmsg(
		    "%u threads serve the queues, the main thread and %u I/O thread%s (queue i on "
		    "thread i mod %u, thread 0 the main thread); %s",
		    d.nserve, d.nthreads, d.nthreads > 1 ? "s" : "", d.nserve,
		    d.hop ? "rings, metadata and I/O on the main thread, inflate on the I/O threads"
		    : d.img->any_loop
			? "each thread serves its queues' rings and image I/O"
			: "each thread serves its queues' rings; the I/O threads serve cached "
			  "clusters and hand the rest to the main thread, which owns the metadata");

	if (o.incoming)
		logmsg("incoming migration: the image stays unlocked until the rings start");
	for (;;) {
		ret = io_loop_run(d.loop);
		if (ret >= 0 && d.nretired) {
			close_retired(&d);
			if (d.handoff == HO_NONE && !d.flushed)
				continue;
		}
		if (ret < 0 || d.handoff == HO_NONE)
			break;
		handoff(&d);
	}
	if (ret < 0) {
		log_err("event loop failed: %s", strerror(-ret));
		d.exit_code = 1;
	} else if (!d.stopping) {
		log_err("event loop ended unexpectedly");
		d.exit_code = 1;
	}
	ret = d.exit_code ? -EIO : 0;

exit_srv:
	threads_stop(&d);
	ctl_stop(&d.ctl);
	vhost_server_exit(d.srv);
del_defer:
	io_defer_del(d.loop, &d.defer);
	io_cancel(d.loop, &d.sig_cmd);
	if (d.hold_armed)
		io_cancel(d.loop, &d.hold_cmd);
exit_blk:
	blk_dev_exit(d.blk);
exit_threads:
	threads_exit(&d);
	img_close(d.img);
exit_loop:
	/* Remaining polls (cancelled or not) are abandoned with the loop. */
	io_loop_exit(d.loop);
	for (struct watch *w = d.watches, *n; w; w = n) {
		n = w->next;
		free(w);
	}
	free(d.threads_mem); /* (threads_exit) */
	if (d.sigfd >= 0)
		close(d.sigfd);
	vlog_flush();
	return ret < 0 ? 1 : 0;
}
