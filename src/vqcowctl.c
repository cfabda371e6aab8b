/* SPDX-License-Identifier: MIT */
/*
 * vqcowctl — a small QMP client for vqcowd's control socket (--qmp).
 *
 *   vqcowctl -s PATH [--json] version | stats [--watch [SEC]] | histogram [US...] |
 *                             resize SIZE | quit | raw JSON
 *                             | snapshot create|delete NAME | snapshot list
 *                             | bitmap add|remove|clear|enable|disable NAME
 *                             | bitmap merge TARGET SOURCE...
 *                             | commit [SPEED] [--top NODE] [--base NODE]
 *
 * Speaks plain QMP (greeting, qmp_capabilities, one command), so it also
 * works against qemu-storage-daemon for the commands they share. Exit status:
 * 0 success, 1 the command failed (the error is printed), 2 usage or
 * connection problems.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "util.h"

#define MAX_REPLY (16u << 20)

static bool opt_json;
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void usage(FILE *f)
{
	fputs(
	    "Usage: vqcowctl -s PATH [--json] COMMAND [ARGS]\n"
	    "Talk to vqcowd's QMP control socket (vqcowd --qmp PATH).\n"
	    "\n"
	    "Commands:\n"
	    "  version              the daemon's version (query-version)\n"
	    "  stats                I/O statistics per request type and per queue\n"
	    "                       (query-blockstats)\n"
	    "  stats --watch [SEC] [--interval SEC] [--count N]\n"
	    "                       every SEC seconds (default 1), like iostat: reads and\n"
	    "                       writes per second, MiB/s, average latency (ms), flushes\n"
	    "                       and discards per second; --json: one object per line;\n"
	    "                       ends after N lines, on Ctrl-C (status 0) or when the\n"
	    "                       daemon goes away (status 2)\n"
	    "  histogram [BOUNDARY...]\n"
	    "                       latency histograms for reads, writes and flushes with\n"
	    "                       bins between these boundaries (microseconds, ascending;\n"
	    "                       block-latency-histogram-set); none: remove them. stats\n"
	    "                       shows the bins\n"
	    "  resize SIZE          grow the image online to SIZE (block_resize; a number with\n"
	    "                       an optional suffix K, M, G, T, P, E, as qemu-img); the guest\n"
	    "                       is told the new size\n"
	    "  snapshot create NAME take an internal snapshot of a qcow2 image online\n"
	    "                       (blockdev-snapshot-internal-sync): it holds every write\n"
	    "                       completed before it\n"
	    "  snapshot delete NAME delete it (blockdev-snapshot-delete-internal-sync)\n"
	    "  snapshot list        the internal snapshots (query-named-block-nodes)\n"
	    "  snapshot external FILE [NAME]\n"
	    "                       external snapshot (blockdev-snapshot-sync): a new qcow2\n"
	    "                       overlay FILE (node NAME) becomes the active layer, the\n"
	    "                       image a read-only backing file (copy it: a backup)\n"
	    "  bitmap add|remove|clear|enable|disable NAME [--granularity N] [--persistent]\n"
	    "         [--disabled]  a dirty bitmap (block-dirty-bitmap-add, -remove, -clear,\n"
	    "                       -enable, -disable); add: --granularity in bytes (a power\n"
	    "                       of two >= 512, suffixes as SIZE), --persistent (stored in\n"
	    "                       the qcow2 file; without it the bitmap lives in vqcowd's\n"
	    "                       memory until it exits), --disabled (not recording)\n"
	    "  bitmap merge TARGET SOURCE...\n"
	    "                       OR the SOURCE bitmaps into TARGET\n"
	    "                       (block-dirty-bitmap-merge)\n"
	    "  commit [SPEED] [--top NODE] [--base NODE]\n"
	    "                       fold the active layer into its base (block-commit, SPEED\n"
	    "                       bytes/s, default unlimited), wait until it is in sync,\n"
	    "                       then pivot (block-job-complete): the base is active again.\n"
	    "                       --top NODE below the active layer: an intermediate commit\n"
	    "                       (top-node) of NODE into --base NODE (base-node; default:\n"
	    "                       its backing file), waited for until NODE left the chain\n"
	    "  jobs                 the block jobs (query-block-jobs)\n"
	    "  quit                 stop the daemon as SIGTERM does (quit)\n"
	    "  raw JSON             send one QMP command as written, e.g.\n"
	    "                       vqcowctl -s /run/vm1.qmp raw '{\"execute\": "
	    "\"query-named-block-nodes\"}'\n"
	    "\n"
	    "Options:\n"
	    "  -s, --socket PATH    the QMP socket (required)\n"
	    "  --node NAME          node for resize, histogram, snapshot, bitmap and commit\n"
	    "                       (default: the exported node)\n"
	    "  --top NODE, --base NODE\n"
	    "                       for commit\n"
	    "  --json               print the command's JSON result (scripts)\n"
	    "  --timeout SEC        wait at most SEC seconds for a reply (default 30)\n"
	    "  -h, --help, --version\n"
	    "\n"
	    "Exit status: 0 done, 1 the daemon returned an error, 2 usage or connection error.\n",
	    f);
}

struct conn {
	int fd;
	char *buf;
	size_t len, cap;
};

/* Read one JSON object (one line) from the daemon; events are skipped. */
static json_t *conn_read(struct conn *c)
{
	for (;;) {
		char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
		ssize_t n;

		if (nl) {
			json_error_t e;
			size_t linelen = (size_t)(nl - c->buf) + 1;
			json_t *j = json_loadb(c->buf, linelen, 0, &e);

			memmove(c->buf, c->buf + linelen, c->len - linelen);
			c->len -= linelen;
			if (!j) {
				fprintf(stderr, "vqcowctl: bad JSON from the daemon: %s\n", e.text);
				return NULL;
			}
			if (json_object_get(j, "event")) {
				json_decref(j);
				continue;
			}
			return j;
		}
		if (c->len + 4096 > c->cap) {
			size_t cap = c->cap ? c->cap * 2 : 65536;
			char *p;

			if (cap > MAX_REPLY) {
				fprintf(stderr, "vqcowctl: reply larger than %u bytes\n",
					MAX_REPLY);
				return NULL;
			}
			p = realloc(c->buf, cap);
			if (!p)
				return NULL;
			c->buf = p;
			c->cap = cap;
		}
		n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "vqcowctl: %s\n",
				n == 0            ? "connection closed by the daemon"
				: errno == EAGAIN ? "timed out waiting for the daemon"
						  : strerror(errno));
			return NULL;
		}
		c->len += (size_t)n;
	}
}

static int conn_send(struct conn *c, const char *text)
{
	size_t len = strlen(text), off = 0;

	while (off < len) {
		ssize_t n = send(c->fd, text + off, len - off, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "vqcowctl: send: %s\n",
				errno == EPIPE || errno == ECONNRESET
				    ? "connection closed by the daemon"
				    : strerror(errno));
			return -1;
		}
		off += (size_t)n;
	}
	return send(c->fd, "\n", 1, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

/*
 * Run one command (@text, a JSON object). Returns the reply's "return" value
 * (new reference), or NULL: an error was printed, *@failed says whether the
 * daemon refused (1) or the connection failed (2).
 */
static json_t *execute(struct conn *c, const char *text, int *failed)
{
	json_t *r = NULL, *ret, *err;

	*failed = 2;
	if (conn_send(c, text) < 0 || !(r = conn_read(c)))
		return NULL;
	err = json_object_get(r, "error");
	if (err) {
		fprintf(stderr, "vqcowctl: error: %s (%s)\n",
			json_string_value(json_object_get(err, "desc")),
			json_string_value(json_object_get(err, "class")));
		json_decref(r);
		*failed = 1;
		return NULL;
	}
	ret = json_object_get(r, "return");
	if (!ret) {
		fprintf(stderr, "vqcowctl: reply without return or error\n");
		json_decref(r);
		return NULL;
	}
	json_incref(ret);
	json_decref(r);
	return ret;
}

static json_t *execute_cmd(struct conn *c, json_t *cmd, int *failed)
{
	char *text = json_dumps(cmd, JSON_COMPACT);
	json_t *r;

	json_decref(cmd);
	if (!text) {
		*failed = 2;
		return NULL;
	}
	r = execute(c, text, failed);
	free(text);
	return r;
}

static void print_json(json_t *j)
{
	char *t = json_dumps(j, JSON_INDENT(2) | JSON_ENCODE_ANY);

	if (t)
		printf("%s\n", t);
	free(t);
}

static uint64_t num(json_t *o, const char *key)
{
	json_int_t v = json_integer_value(json_object_get(o, key));

	return v > 0 ? (uint64_t)v : 0;
}

static uint64_t num_at(json_t *a, size_t i)
{
	json_int_t v = json_integer_value(json_array_get(a, i));

	return v > 0 ? (uint64_t)v : 0;
}

static void print_stats(json_t *ret)
{
	static const char *const types[] = {"rd", "wr", "flush", "unmap"};
	static const char *const names[] = {"read", "write", "flush", "discard"};
	size_t i;
	json_t *e;

	json_array_foreach(ret, i, e)
	{
		json_t *s = json_object_get(e, "stats");
		json_t *v = json_object_get(e, "vqcowd");
		json_t *q;
		size_t j;

		printf("node %s\n", json_string_value(json_object_get(e, "node-name")));
		printf("  %-8s %12s %16s %12s %8s %8s\n", "type", "operations", "bytes",
		       "avg lat us", "failed", "invalid");
		for (j = 0; j < 4; j++) {
			char k[64];
			uint64_t ops, bytes = 0, ns, failed, invalid;

			snprintf(k, sizeof(k), "%s_operations", types[j]);
			ops = num(s, k);
			snprintf(k, sizeof(k), "%s_bytes", types[j]);
			bytes = num(s, k);
			snprintf(k, sizeof(k), "%s_total_time_ns", types[j]);
			ns = num(s, k);
			snprintf(k, sizeof(k), "failed_%s_operations", types[j]);
			failed = num(s, k);
			snprintf(k, sizeof(k), "invalid_%s_operations", types[j]);
			invalid = num(s, k);
			printf("  %-8s %12" PRIu64 " %16" PRIu64 " %12.1f %8" PRIu64 " %8" PRIu64
			       "\n",
			       names[j], ops, bytes, ops ? (double)ns / (double)ops / 1000.0 : 0.0,
			       failed, invalid);
		}
		for (j = 0; j < 3; j++) {
			char k[64];
			json_t *h, *b, *x;
			size_t n;

			snprintf(k, sizeof(k), "%s_latency_histogram", types[j]);
			h = json_object_get(s, k);
			if (!h)
				continue;
			b = json_object_get(h, "boundaries");
			printf("  %s latency (us):", names[j]);
			json_array_foreach(json_object_get(h, "bins"), n, x)
			{
				double lo = n ? (double)num_at(b, n - 1) / 1000.0 : 0;

				if (n < json_array_size(b))
					printf(" [%g,%g): %" PRIu64, lo,
					       (double)num_at(b, n) / 1000.0,
					       (uint64_t)json_integer_value(x));
				else
					printf(" [%g,inf): %" PRIu64, lo,
					       (uint64_t)json_integer_value(x));
			}
			printf("\n");
		}
		if (!v)
			continue;
		printf("  in flight: %" PRIu64 "\n", num(v, "in-flight"));
		json_array_foreach(json_object_get(v, "queues"), j, q)
		{
			printf("  queue %3" PRIu64 ": %12" PRIu64 " requests %16" PRIu64
			       " bytes %8" PRIu64 " errors\n",
			       num(q, "queue"), num(q, "requests"), num(q, "bytes"),
			       num(q, "errors"));
		}
		if ((q = json_object_get(v, "qcow2"))) {
			const char *key;
			json_t *x;
			int col = 0;

			printf("  qcow2:");
			json_object_foreach(q, key, x)
			{
				printf("%s%s %" PRIu64, col++ % 4 ? ", " : "\n    ", key,
				       (uint64_t)json_integer_value(x));
			}
			printf("\n");
		}
	}
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The first node's counters: ops, bytes, total ns for rd, wr, flush, unmap. */
static int sample(struct conn *c, uint64_t v[4][3], int *failed)
{
	static const char *const types[] = {"rd", "wr", "flush", "unmap"};
	json_t *r = execute(c, "{\"execute\": \"query-blockstats\"}", failed);
	json_t *s = json_object_get(json_array_get(r, 0), "stats");
	char k[64];

	if (!s) {
		if (r)
			fprintf(stderr, "vqcowctl: no statistics in the reply\n");
		json_decref(r);
		return -1;
	}
	for (int i = 0; i < 4; i++) {
		snprintf(k, sizeof(k), "%s_operations", types[i]);
		v[i][0] = num(s, k);
		snprintf(k, sizeof(k), "%s_bytes", types[i]);
		v[i][1] = num(s, k);
		snprintf(k, sizeof(k), "%s_total_time_ns", types[i]);
		v[i][2] = num(s, k);
	}
	json_decref(r);
	return 0;
}

/* stats --watch: per-interval rates from the counters' differences. */
static int watch_stats(struct conn *c, uint64_t interval, uint64_t count)
{
	uint64_t a[4][3], b[4][3];
	double ta, tb;
	int failed = 2;

	struct sigaction sa = {.sa_handler = on_sigint}; /* no SA_RESTART: sleep ends */

	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	if (sample(c, a, &failed) < 0)
		return failed;
	ta = now_s();
	for (uint64_t n = 0; !count || n < count; n++) {
		double dt, rate[4], mib[2] = {0, 0}, lat[4];

		for (unsigned left = (unsigned)interval; left && !interrupted;)
			left = sleep(left);
		if (interrupted)
			return 0;
		if (sample(c, b, &failed) < 0)
			return interrupted ? 0 : failed;
		tb = now_s();
		dt = tb - ta > 0 ? tb - ta : 1;
		for (int i = 0; i < 4; i++) {
			uint64_t ops = b[i][0] - a[i][0];

			rate[i] = (double)ops / dt;
			lat[i] = ops ? (double)(b[i][2] - a[i][2]) / (double)ops / 1e6 : 0;
			if (i < 2)
				mib[i] = (double)(b[i][1] - a[i][1]) / dt / 1048576.0;
		}
		if (opt_json) {
			printf("{\"interval_s\": %.3f, \"read\": {\"iops\": %.1f, \"mib_s\": %.2f, "
			       "\"lat_ms\": %.3f}, \"write\": {\"iops\": %.1f, \"mib_s\": %.2f, "
			       "\"lat_ms\": %.3f}, \"flush\": {\"iops\": %.1f, \"lat_ms\": %.3f}, "
			       "\"discard\": {\"iops\": %.1f, \"lat_ms\": %.3f}}\n",
			       dt, rate[0], mib[0], lat[0], rate[1], mib[1], lat[1], rate[2],
			       lat[2], rate[3], lat[3]);
		} else {
			if (n % 20 == 0)
				printf("%9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "r/s", "rMiB/s",
				       "r_await", "w/s", "wMiB/s", "w_await", "flush/s", "f_await",
				       "discard/s");
			printf("%9.1f %9.2f %9.3f %9.1f %9.2f %9.3f %9.1f %9.3f %9.1f\n", rate[0],
			       mib[0], lat[0], rate[1], mib[1], lat[1], rate[2], lat[2], rate[3]);
		}
		fflush(stdout);
		memcpy(a, b, sizeof(a));
		ta = tb;
	}
	return 0;
}

/* The job "commit" in query-block-jobs' answer @jobs, NULL if none. */
static json_t *find_commit_job(json_t *jobs)
{
	size_t i;
	json_t *v;

	json_array_foreach(jobs, i, v)
	{
		const char *id = json_string_value(json_object_get(v, "device"));

		if (id && strcmp(id, "vqcowctl-commit") == 0)
			return v;
	}
	return NULL;
}

/*
 * commit: block-commit of the exported node, wait until the job is ready,
 * block-job-complete, wait until it is gone. Returns query-block-exports'
 * first entry (the active node now), or NULL with *@failed set.
 */
/* Is node @name in query-named-block-nodes' answer? 1, 0, or -1 (*@failed set). */
static int node_exists(struct conn *c, const char *name, int *failed)
{
	json_t *r = execute(c, "{\"execute\": \"query-named-block-nodes\"}", failed), *v;
	size_t i;
	int found = 0;

	if (!r)
		return -1;
	json_array_foreach(r, i, v)
	{
		const char *n = json_string_value(json_object_get(v, "node-name"));

		if (n && strcmp(n, name) == 0)
			found = 1;
	}
	json_decref(r);
	return found;
}

static json_t *do_commit(struct conn *c, const char *node, uint64_t speed, const char *top,
			 const char *base, int *failed)
{
	json_t *e = NULL, *r, *j, *args;
	const char *n = node;
	bool completing = false, intermediate;

	if (!n) {
		e = execute(c, "{\"execute\": \"query-block-exports\"}", failed);
		n = json_string_value(json_object_get(json_array_get(e, 0), "node-name"));
		if (!n) {
			if (e)
				fprintf(stderr, "vqcowctl: no export; use --node\n");
			json_decref(e);
			return NULL;
		}
	}
	/* a top below the active layer: QEMU's intermediate commit, no READY */
	intermediate = top && strcmp(top, n) != 0;
	args = json_pack("{s:s,s:s,s:I}", "device", n, "job-id", "vqcowctl-commit", "speed",
			 (json_int_t)speed);
	if (args && top)
		json_object_set_new(args, "top-node", json_string(top));
	if (args && base)
		json_object_set_new(args, "base-node", json_string(base));
	r = execute_cmd(c, json_pack("{s:s,s:o}", "execute", "block-commit", "arguments", args),
			failed);
	json_decref(e);
	if (!r)
		return NULL;
	json_decref(r);
	for (;;) {
		usleep(200 * 1000);
		r = execute(c, "{\"execute\": \"query-block-jobs\"}", failed);
		if (!r)
			return NULL;
		j = find_commit_job(r);
		if (!j && completing) {
			json_decref(r);
			break;
		}
		if (!j && intermediate) {
			/* it ended by itself: done if top left the chain */
			int there = node_exists(c, top, failed);

			json_decref(r);
			if (there < 0)
				return NULL;
			if (there) {
				fprintf(stderr,
					"vqcowctl: the commit job ended and %s is still in "
					"the chain (cancelled or failed: see the daemon's log)\n",
					top);
				*failed = 1;
				return NULL;
			}
			break;
		}
		if (!j) {
			fprintf(stderr, "vqcowctl: the commit job ended before it was in sync "
					"(cancelled or failed: see the daemon's log)\n");
			json_decref(r);
			*failed = 1;
			return NULL;
		}
		if (!completing && json_is_true(json_object_get(j, "ready"))) {
			json_t *x;

			json_decref(r);
			x = execute(c,
				    "{\"execute\": \"block-job-complete\", \"arguments\": "
				    "{\"device\": \"vqcowctl-commit\"}}",
				    failed);
			if (!x)
				return NULL;
			json_decref(x);
			completing = true;
			continue;
		}
		json_decref(r);
	}
	r = execute(c, "{\"execute\": \"query-block-exports\"}", failed);
	j = r ? json_incref(json_array_get(r, 0)) : NULL;
	json_decref(r);
	if (!j)
		*failed = 2;
	return j;
}

int main(int argc, char **argv)
{
	enum {
		OPT_JSON = 256,
		OPT_NODE,
		OPT_TIMEOUT,
		OPT_VERSION,
		OPT_WATCH,
		OPT_INTERVAL,
		OPT_COUNT,
		OPT_GRAN,
		OPT_PERSISTENT,
		OPT_DISABLED,
		OPT_TOP,
		OPT_BASE
	};
	static const struct option longopts[] = {
	    {"socket", required_argument, NULL, 's'},
	    {"json", no_argument, NULL, OPT_JSON},
	    {"node", required_argument, NULL, OPT_NODE},
	    {"timeout", required_argument, NULL, OPT_TIMEOUT},
	    {"watch", no_argument, NULL, OPT_WATCH},
	    {"interval", required_argument, NULL, OPT_INTERVAL},
	    {"count", required_argument, NULL, OPT_COUNT},
	    {"granularity", required_argument, NULL, OPT_GRAN},
	    {"persistent", no_argument, NULL, OPT_PERSISTENT},
	    {"disabled", no_argument, NULL, OPT_DISABLED},
	    {"top", required_argument, NULL, OPT_TOP},
	    {"base", required_argument, NULL, OPT_BASE},
	    {"help", no_argument, NULL, 'h'},
	    {"version", no_argument, NULL, OPT_VERSION},
	    {NULL, 0, NULL, 0},
	};
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct conn c = {.fd = -1};
	const char *path = NULL, *node = NULL, *cmd, *top = NULL, *base = NULL;
	uint64_t timeout = 30, size = 0, interval = 1, count = 0;
	bool watch = false, persistent = false, disabled = false;
	uint64_t granularity = 0;
	json_t *r = NULL;
	int opt, failed = 2, status = 2;

	while ((opt = getopt_long(argc, argv, "s:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 's':
			path = optarg;
			break;
		case OPT_JSON:
			opt_json = true;
			break;
		case OPT_NODE:
			node = optarg;
			break;
		case OPT_TOP:
			top = optarg;
			break;
		case OPT_BASE:
			base = optarg;
			break;
		case OPT_WATCH:
			watch = true;
			break;
		case OPT_INTERVAL:
			if (util_parse_uint(optarg, &interval) < 0 || interval == 0 ||
			    interval > 3600) {
				fprintf(stderr, "vqcowctl: invalid --interval '%s' (1..3600)\n",
					optarg);
				return 2;
			}
			break;
		case OPT_COUNT:
			if (util_parse_uint(optarg, &count) < 0 || count == 0) {
				fprintf(stderr, "vqcowctl: invalid --count '%s'\n", optarg);
				return 2;
			}
			break;
		case OPT_TIMEOUT:
			if (util_parse_uint(optarg, &timeout) < 0 || timeout == 0 ||
			    timeout > 86400) {
				fprintf(stderr, "vqcowctl: invalid --timeout '%s'\n", optarg);
				return 2;
			}
			break;
		case OPT_GRAN:
			if (util_parse_size(optarg, &granularity) < 0 || granularity == 0 ||
			    granularity > UINT32_MAX) {
				fprintf(stderr, "vqcowctl: invalid --granularity '%s'\n", optarg);
				return 2;
			}
			break;
		case OPT_PERSISTENT:
			persistent = true;
			break;
		case OPT_DISABLED:
			disabled = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case OPT_VERSION:
			printf("vqcowctl %s\n", VQCOW_VERSION);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!path || optind >= argc) {
		fprintf(stderr, "vqcowctl: %s\n", !path ? "-s PATH is required" : "no command");
		usage(stderr);
		return 2;
	}
	cmd = argv[optind++];
	if (strcmp(cmd, "resize") == 0) {
		if (optind + 1 != argc || util_parse_size(argv[optind], &size) < 0 ||
		    size > INT64_MAX) {
			fprintf(stderr, "vqcowctl: resize needs one SIZE (e.g. 20G)\n");
			return 2;
		}
	} else if (strcmp(cmd, "commit") == 0) {
		if (optind + 1 < argc ||
		    (optind + 1 == argc &&
		     (util_parse_size(argv[optind], &size) < 0 || size > INT64_MAX))) {
			fprintf(stderr, "vqcowctl: commit [SPEED] [--top NODE] [--base NODE]\n");
			return 2;
		}
	} else if (top || base) {
		fprintf(stderr, "vqcowctl: --top and --base are for commit\n");
		return 2;
	} else if (strcmp(cmd, "jobs") == 0) {
		if (optind != argc) {
			fprintf(stderr, "vqcowctl: jobs takes no argument\n");
			return 2;
		}
	} else if (strcmp(cmd, "snapshot") == 0 && optind < argc &&
		   strcmp(argv[optind], "external") == 0) {
		if (optind + 2 != argc && optind + 3 != argc) {
			fprintf(stderr, "vqcowctl: snapshot external FILE [NAME]\n");
			return 2;
		}
	} else if (strcmp(cmd, "snapshot") == 0) {
		if (!(optind + 1 == argc && strcmp(argv[optind], "list") == 0) &&
		    !(optind + 2 == argc && (strcmp(argv[optind], "create") == 0 ||
					     strcmp(argv[optind], "delete") == 0))) {
			fprintf(stderr, "vqcowctl: snapshot create NAME | delete NAME | list\n");
			return 2;
		}
	} else if (strcmp(cmd, "bitmap") == 0) {
		static const char *const ops[] = {"add", "remove", "clear", "enable", "disable"};
		bool known = false;

		for (size_t i = 0; optind + 2 == argc && i < sizeof(ops) / sizeof(ops[0]); i++)
			known = known || strcmp(argv[optind], ops[i]) == 0;
		if (optind + 3 <= argc && strcmp(argv[optind], "merge") == 0)
			known = true;
		if (!known) {
			fprintf(stderr, "vqcowctl: bitmap add|remove|clear|enable|disable NAME | "
					"merge TARGET SOURCE...\n");
			return 2;
		}
		if (strcmp(argv[optind], "add") != 0 && (granularity || persistent || disabled)) {
			fprintf(stderr, "vqcowctl: --granularity, --persistent and --disabled are "
					"for bitmap add\n");
			return 2;
		}
	} else if (strcmp(cmd, "raw") == 0) {
		if (optind + 1 != argc) {
			fprintf(stderr, "vqcowctl: raw needs one JSON argument\n");
			return 2;
		}
	} else if (strcmp(cmd, "stats") == 0 && watch && optind + 1 == argc) {
		/* stats --watch INTERVAL, as iostat takes it */
		if (util_parse_uint(argv[optind], &interval) < 0 || interval == 0 ||
		    interval > 3600) {
			fprintf(stderr, "vqcowctl: invalid interval '%s' (1..3600)\n",
				argv[optind]);
			return 2;
		}
	} else if (strcmp(cmd, "histogram") == 0) {
		for (int i = optind; i < argc; i++) {
			uint64_t us;

			if (util_parse_uint(argv[i], &us) < 0 || us == 0 ||
			    us > UINT64_MAX / 1000) {
				fprintf(stderr, "vqcowctl: invalid boundary '%s' (microseconds)\n",
					argv[i]);
				return 2;
			}
		}
	} else if (strcmp(cmd, "version") == 0 || strcmp(cmd, "stats") == 0 ||
		   strcmp(cmd, "quit") == 0) {
		if (optind != argc) {
			fprintf(stderr, "vqcowctl: %s takes no arguments\n", cmd);
			return 2;
		}
	} else {
		fprintf(stderr, "vqcowctl: unknown command '%s' (see --help)\n", cmd);
		return 2;
	}

	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "vqcowctl: socket path too long: %s\n", path);
		return 2;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	c.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c.fd < 0 || connect(c.fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		fprintf(stderr, "vqcowctl: cannot connect to %s: %s\n", path, strerror(errno));
		goto out;
	}
	{
		struct timeval tv = {.tv_sec = (time_t)timeout};

		setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	}
	r = conn_read(&c); /* the greeting */
	if (!r || !json_object_get(r, "QMP")) {
		fprintf(stderr, "vqcowctl: %s does not greet as a QMP server\n", path);
		goto out;
	}
	json_decref(r);
	r = execute(&c, "{\"execute\": \"qmp_capabilities\"}", &failed);
	if (!r)
		goto out;
	json_decref(r);
	r = NULL;

	if (watch && strcmp(cmd, "stats") != 0) {
		fprintf(stderr, "vqcowctl: --watch goes with stats\n");
		goto out;
	}
	if (watch) {
		status = watch_stats(&c, interval, count);
		goto out;
	}
	if (strcmp(cmd, "version") == 0) {
		r = execute(&c, "{\"execute\": \"query-version\"}", &failed);
	} else if (strcmp(cmd, "stats") == 0) {
		r = execute(&c, "{\"execute\": \"query-blockstats\"}", &failed);
	} else if (strcmp(cmd, "quit") == 0) {
		r = execute(&c, "{\"execute\": \"quit\"}", &failed);
	} else if (strcmp(cmd, "raw") == 0) {
		r = execute(&c, argv[optind], &failed);
	} else if (strcmp(cmd, "histogram") == 0) {
		json_t *e = execute(&c, "{\"execute\": \"query-block-exports\"}", &failed);
		const char *n =
		    node ? node
			 : json_string_value(json_object_get(json_array_get(e, 0), "node-name"));
		json_t *b = json_array(), *m;

		for (int i = optind; i < argc; i++) {
			uint64_t us = 0;

			util_parse_uint(argv[i], &us);
			json_array_append_new(b, json_integer((json_int_t)(us * 1000)));
		}
		m = json_pack("{s:s,s:{s:s}}", "execute", "block-latency-histogram-set",
			      "arguments", "id", n ? n : "");
		if (optind < argc)
			json_object_set_new(json_object_get(m, "arguments"), "boundaries", b);
		else
			json_decref(b);
		r = execute_cmd(&c, m, &failed);
		json_decref(e);
	} else if (strcmp(cmd, "jobs") == 0) {
		r = execute(&c, "{\"execute\": \"query-block-jobs\"}", &failed);
	} else if (strcmp(cmd, "commit") == 0) {
		r = do_commit(&c, node, size, top, base, &failed);
	} else if (strcmp(cmd, "snapshot") == 0 && strcmp(argv[optind], "external") == 0) {
		json_t *e = NULL, *a;
		const char *n = node;

		if (!n) {
			e = execute(&c, "{\"execute\": \"query-block-exports\"}", &failed);
			n = json_string_value(json_object_get(json_array_get(e, 0), "node-name"));
		}
		if (n) {
			/* without NAME the overlay gets QEMU's anonymous "#blockN" (device form) */
			a = json_pack("{s:s,s:s,s:s}",
				      n == node || optind + 3 == argc ? "node-name" : "device", n,
				      "snapshot-file", argv[optind + 1], "format", "qcow2");
			if (optind + 3 == argc)
				json_object_set_new(a, "snapshot-node-name",
						    json_string(argv[optind + 2]));
			else if (n == node)
				json_object_set_new(a, "snapshot-node-name",
						    json_string("overlay"));
			r = execute_cmd(&c,
					json_pack("{s:s,s:o}", "execute", "blockdev-snapshot-sync",
						  "arguments", a),
					&failed);
		} else if (e) {
			fprintf(stderr, "vqcowctl: no export; use --node\n");
		}
		json_decref(e);
	} else if (strcmp(cmd, "snapshot") == 0 || strcmp(cmd, "bitmap") == 0) {
		json_t *e = NULL;
		const char *n = node;

		if (!n) {
			e = execute(&c, "{\"execute\": \"query-block-exports\"}", &failed);
			n = json_string_value(json_object_get(json_array_get(e, 0), "node-name"));
			if (!n) {
				if (e)
					fprintf(stderr, "vqcowctl: no export; use --node\n");
				json_decref(e);
				goto out;
			}
		}
		if (strcmp(cmd, "bitmap") == 0) {
			char name[40];
			json_t *a = json_pack("{s:s,s:s}", "node", n, "name", argv[optind + 1]);

			snprintf(name, sizeof(name), "block-dirty-bitmap-%s", argv[optind]);
			if (a && strcmp(argv[optind], "merge") == 0) {
				json_t *l = json_array();

				json_object_del(a, "name");
				json_object_set_new(a, "target", json_string(argv[optind + 1]));
				for (int i = optind + 2; l && i < argc; i++)
					json_array_append_new(l, json_string(argv[i]));
				json_object_set_new(a, "bitmaps", l);
			}
			if (a && granularity)
				json_object_set_new(a, "granularity",
						    json_integer((json_int_t)granularity));
			if (a && persistent)
				json_object_set_new(a, "persistent", json_true());
			if (a && disabled)
				json_object_set_new(a, "disabled", json_true());
			r = execute_cmd(&c, json_pack("{s:s,s:o}", "execute", name, "arguments", a),
					&failed);
		} else if (strcmp(argv[optind], "list") == 0) {
			json_t *l =
			    execute(&c, "{\"execute\": \"query-named-block-nodes\"}", &failed);
			size_t i;
			json_t *v;

			json_array_foreach(l, i, v)
			{
				const char *nn = json_string_value(json_object_get(v, "node-name"));

				if (nn && strcmp(nn, n) == 0) {
					r = json_object_get(json_object_get(v, "image"),
							    "snapshots");
					r = r ? json_incref(r) : json_array();
				}
			}
			if (l && !r)
				fprintf(stderr, "vqcowctl: no node '%s'\n", n);
			json_decref(l);
		} else {
			bool create = strcmp(argv[optind], "create") == 0;

			r = execute_cmd(&c,
					json_pack("{s:s,s:{s:s,s:s}}", "execute",
						  create ? "blockdev-snapshot-internal-sync"
							 : "blockdev-snapshot-delete-internal-sync",
						  "arguments", "device", n, "name",
						  argv[optind + 1]),
					&failed);
		}
		json_decref(e);
	} else { /* resize */
		if (!node) {
			json_t *e = execute(&c, "{\"execute\": \"query-block-exports\"}", &failed);
			const char *n =
			    json_string_value(json_object_get(json_array_get(e, 0), "node-name"));

			if (!n) {
				if (e)
					fprintf(stderr,
						"vqcowctl: no export to resize; use --node\n");
				json_decref(e);
				goto out;
			}
			r = execute_cmd(&c,
					json_pack("{s:s,s:{s:s,s:I}}", "execute", "block_resize",
						  "arguments", "node-name", n, "size",
						  (json_int_t)size),
					&failed);
			json_decref(e);
		} else {
			r = execute_cmd(&c,
					json_pack("{s:s,s:{s:s,s:I}}", "execute", "block_resize",
						  "arguments", "node-name", node, "size",
						  (json_int_t)size),
					&failed);
		}
	}
	if (!r) {
		status = failed;
		goto out;
	}
	status = 0;
	if (opt_json) {
		print_json(r);
	} else if (strcmp(cmd, "version") == 0) {
		json_t *q = json_object_get(r, "qemu");

		printf("%s (%" PRIu64 ".%" PRIu64 ".%" PRIu64 ")\n",
		       json_string_value(json_object_get(r, "package")), num(q, "major"),
		       num(q, "minor"), num(q, "micro"));
	} else if (strcmp(cmd, "stats") == 0) {
		print_stats(r);
	} else if (strcmp(cmd, "resize") == 0) {
		printf("resized to %" PRIu64 " bytes\n", size);
	} else if (strcmp(cmd, "histogram") == 0) {
		printf(optind < argc ? "latency histograms set\n" : "latency histograms removed\n");
	} else if (strcmp(cmd, "raw") == 0) {
		print_json(r);
	} else if (strcmp(cmd, "snapshot") == 0 && strcmp(argv[optind], "list") == 0) {
		size_t i;
		json_t *v;

		printf("%-10s%-17s%20s\n", "ID", "TAG", "DATE");
		json_array_foreach(r, i, v)
		{
			time_t t = (time_t)num(v, "date-sec");
			char date[32] = "";
			struct tm tm;

			if (localtime_r(&t, &tm))
				strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
			printf("%-9s %-16s %20s\n", json_string_value(json_object_get(v, "id")),
			       json_string_value(json_object_get(v, "name")), date);
		}
	} else if (strcmp(cmd, "jobs") == 0) {
		size_t i;
		json_t *v;

		printf("%-16s%-8s%-11s%22s%12s%6s\n", "ID", "TYPE", "STATUS", "OFFSET/LEN", "SPEED",
		       "READY");
		json_array_foreach(r, i, v)
		{
			char ol[48];

			snprintf(ol, sizeof(ol), "%" PRIu64 "/%" PRIu64, num(v, "offset"),
				 num(v, "len"));
			printf("%-15s %-7s %-10s %21s %11" PRIu64 " %5s\n",
			       json_string_value(json_object_get(v, "device")),
			       json_string_value(json_object_get(v, "type")),
			       json_string_value(json_object_get(v, "status")), ol, num(v, "speed"),
			       json_is_true(json_object_get(v, "ready")) ? "yes" : "no");
		}
	} else if (strcmp(cmd, "commit") == 0 && top &&
		   json_string_value(json_object_get(r, "node-name")) &&
		   strcmp(top, json_string_value(json_object_get(r, "node-name"))) != 0) {
		printf("committed: %s left the chain; %s is the active layer\n", top,
		       json_string_value(json_object_get(r, "node-name")));
	} else if (strcmp(cmd, "commit") == 0) {
		printf("committed: %s is the active layer again\n",
		       json_string_value(json_object_get(r, "node-name")));
	} else if (strcmp(cmd, "snapshot") == 0 && strcmp(argv[optind], "external") == 0) {
		printf("external snapshot: %s is the active layer\n", argv[optind + 1]);
	} else if (strcmp(cmd, "bitmap") == 0) {
		const char *op = argv[optind];

		if (strcmp(op, "merge") == 0)
			printf("bitmaps merged into '%s'\n", argv[optind + 1]);
		else
			printf("bitmap '%s' %s\n", argv[optind + 1],
			       strcmp(op, "add") == 0      ? "added"
			       : strcmp(op, "remove") == 0 ? "removed"
			       : strcmp(op, "clear") == 0  ? "cleared"
			       : strcmp(op, "enable") == 0 ? "enabled"
							   : "disabled");
	} else if (strcmp(cmd, "snapshot") == 0) {
		printf("snapshot '%s' %s\n", argv[optind + 1],
		       strcmp(argv[optind], "create") == 0 ? "created" : "deleted");
	}
out:
	json_decref(r);
	if (c.fd >= 0)
		close(c.fd);
	free(c.buf);
	return status;
}
