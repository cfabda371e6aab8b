/* SPDX-License-Identifier: MIT */
/* log/vlog.c — levels, journal or timestamped stderr lines, per-site rate limit. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vlog.h"

#define LINE_MAX_LEN 1024
#define SITES        256 /* rate-limit slots, hashed on the format pointer */
#define PROBE        8   /* slots a site may use; the least recent one is taken over */

static const char *g_prog = "vqcow";
static enum vlog_level g_level = VLOG_INFO;
static bool g_journal;
static unsigned g_burst = VLOG_BURST, g_interval_ms = VLOG_INTERVAL_MS;
static vlog_sink_fn *g_sink;
static void *g_sink_opaque;
/* The rate limit's slots and the lines: vqcowd's I/O threads log too. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static struct site {
	const char *key;     /* format string of the call site */
	uint64_t window_ms;  /* start of the current interval */
	unsigned count;      /* lines written in this interval */
	unsigned suppressed; /* lines dropped since the last report */
	enum vlog_level level;
	char last[160]; /* the last line dropped */
} g_sites[SITES];

static const char *const level_name[] = {"error", "warn", "info", "debug"};
/* syslog priorities: LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG */
static const int level_prio[] = {3, 4, 6, 7};

/* Is stderr the journal? JOURNAL_STREAM is "DEV:INO" of the stream systemd gave us. */
static bool stderr_is_journal(void)
{
	const char *e = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
		return false;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void vlog_init(const char *prog)
{
	if (prog && *prog)
		g_prog = prog;
	g_journal = stderr_is_journal();
	tzset(); /* reads /etc/localtime now, not after a sandbox is in place */
}

void vlog_set_level(enum vlog_level level)
{
	g_level = level;
}

enum vlog_level vlog_get_level(void)
{
	return g_level;
}

bool vlog_enabled(enum vlog_level level)
{
	return level <= g_level;
}

int vlog_parse_level(const char *s, enum vlog_level *level)
{
	static const struct {
		const char *name;
		enum vlog_level level;
	} names[] = {{"error", VLOG_ERROR},
		     {"warn", VLOG_WARN},
		     {"warning", VLOG_WARN},
		     {"info", VLOG_INFO},
		     {"debug", VLOG_DEBUG}};

	for (size_t i = 0; s && i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i].name) == 0) {
			*level = names[i].level;
			return 0;
		}
	}
	return -EINVAL;
}

void vlog_set_sink(vlog_sink_fn *sink, void *opaque)
{
	g_sink = sink;
	g_sink_opaque = opaque;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Write one finished line @text (no newline) at @level. */
static void emit(enum vlog_level level, const char *text)
{
	char line[LINE_MAX_LEN + 128];
	size_t n = 0;
	ssize_t w;

	if (g_sink) {
		g_sink(level, text, g_sink_opaque);
		return;
	}
	if (g_journal) {
		n = (size_t)snprintf(line, sizeof(line), "<%d>%s: ", level_prio[level], g_prog);
	} else {
		struct timespec ts;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &ts);
		localtime_r(&ts.tv_sec, &tm);
		n = strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
		n += (size_t)snprintf(line + n, sizeof(line) - n,
				      ".%03ld %s: %s: ", ts.tv_nsec / 1000000, g_prog,
				      level_name[level]);
	}
	if (n >= sizeof(line))
		n = sizeof(line) - 1;
	n += (size_t)snprintf(line + n, sizeof(line) - n, "%s\n", text);
	if (n >= sizeof(line)) {
		n = sizeof(line) - 1;
		line[n - 1] = '\n';
	}
	do {
		w = write(STDERR_FILENO, line, n);
	} while (w < 0 && errno == EINTR);
}

static void report_suppressed(struct site *s)
{
	char text[LINE_MAX_LEN];

	if (!s->suppressed)
		return;
	snprintf(text, sizeof(text), "%u similar message%s suppressed (rate limit); the last: %s",
		 s->suppressed, s->suppressed > 1 ? "s" : "", s->last);
	s->suppressed = 0;
	emit(s->level, text);
}

/*
 * The slot of call site @key: open addressing over PROBE slots; when they are
 * all taken by other sites, the one that logged least recently is reported
 * and reused.
 */
static struct site *find_site(const char *key, uint64_t t)
{
	uint64_t h = (uint64_t)(uintptr_t)key * 0x9e3779b97f4a7c15ull;
	unsigned base = (unsigned)(h >> 56) % SITES;
	struct site *victim = NULL;

	for (unsigned i = 0; i < PROBE; i++) {
		struct site *s = &g_sites[(base + i) % SITES];

		if (s->key == key)
			return s;
		if (!s->key) {
			victim = s;
			break;
		}
		if (!victim || s->window_ms < victim->window_ms)
			victim = s;
	}
	report_suppressed(victim);
	memset(victim, 0, sizeof(*victim));
	victim->key = key;
	victim->window_ms = t;
	return victim;
}

void vlogv(enum vlog_level level, const char *tag, const char *fmt, va_list ap)
{
	char text[LINE_MAX_LEN];
	size_t n = 0;
	struct site *s = NULL;

	if (level > g_level)
		return;
	pthread_mutex_lock(&g_lock);
	if (level < VLOG_DEBUG && g_burst) {
		uint64_t t = now_ms();

		s = find_site(fmt, t);
		if (t - s->window_ms >= g_interval_ms) {
			report_suppressed(s);
			s->window_ms = t;
			s->count = 0;
		}
		if (s->count >= g_burst) {
			s->suppressed++;
			s->level = level;
			if (tag)
				n = (size_t)snprintf(s->last, sizeof(s->last), "%s: ", tag);
			if (n < sizeof(s->last))
				vsnprintf(s->last + n, sizeof(s->last) - n, fmt, ap);
			pthread_mutex_unlock(&g_lock);
			return;
		}
		s->count++;
	}
	if (tag)
		n = (size_t)snprintf(text, sizeof(text), "%s: ", tag);
	if (n < sizeof(text))
		vsnprintf(text + n, sizeof(text) - n, fmt, ap);
	emit(level, text);
	pthread_mutex_unlock(&g_lock);
}

void vlog(enum vlog_level level, const char *tag, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlogv(level, tag, fmt, ap);
	va_end(ap);
}

void vlog_set_rate_limit(unsigned burst, unsigned interval_ms)
{
	pthread_mutex_lock(&g_lock);
	g_burst = burst;
	g_interval_ms = interval_ms;
	memset(g_sites, 0, sizeof(g_sites));
	pthread_mutex_unlock(&g_lock);
}

void vlog_flush(void)
{
	pthread_mutex_lock(&g_lock);
	for (unsigned i = 0; i < SITES; i++)
		report_suppressed(&g_sites[i]);
	pthread_mutex_unlock(&g_lock);
}
