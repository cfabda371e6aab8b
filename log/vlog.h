/* SPDX-License-Identifier: MIT */
/*
 * log/ — the logging facility every layer may use (it sits below them all and
 * includes nothing of ours). One process-wide logger writing to stderr.
 *
 * Each line has a level. When stderr is the systemd journal (JOURNAL_STREAM
 * names stderr's device and inode), lines carry a syslog priority prefix
 * ("<4>") and no timestamp, since the journal stamps and classifies them
 * itself; otherwise they start with a local timestamp and the level's name:
 *
 *   2026-12-06 00:40:01.123 vqcowd: warn: vhost: SET_FEATURES with bits not offered
 *
 * Rate limit: a peer can make any message repeat endlessly (a front-end
 * reconnecting in a tight loop), so each call site (keyed by its format
 * string) may log VLOG_BURST lines per VLOG_INTERVAL_MS (by default); further lines are
 * counted, and the count is reported with the site's next line after the
 * interval, or by vlog_flush(). Debug lines are never limited (asked for).
 *
 * Thread-safe: one mutex orders the rate limit's bookkeeping and the lines
 * (each written with one write(2)); a sink (vlog_set_sink) runs under it and
 * must not log. The settings (level, sink, journal) are set before threads
 * start.
 */
#ifndef LOG_VLOG_H
#define LOG_VLOG_H

#include <stdarg.h>
#include <stdbool.h>

enum vlog_level {
	VLOG_ERROR = 0,
	VLOG_WARN = 1,
	VLOG_INFO = 2,
	VLOG_DEBUG = 3,
};

/* Default rate limit: lines per call site per interval. */
#define VLOG_BURST       10
#define VLOG_INTERVAL_MS 5000

/*
 * Set the program name that starts every line (default "vqcow") and look at
 * the environment (JOURNAL_STREAM) and the time zone once, before any
 * sandboxing.
 */
void vlog_init(const char *prog);

/* Lines above @level are dropped. Default VLOG_INFO. */
void vlog_set_level(enum vlog_level level);
enum vlog_level vlog_get_level(void);
/* Would a line of @level be written? (Guards expensive debug formatting.) */
bool vlog_enabled(enum vlog_level level);
/* "error", "warn" (or "warning"), "info", "debug" -> 0, or -EINVAL. */
int vlog_parse_level(const char *s, enum vlog_level *level);

/*
 * Log one line: @tag (may be NULL), e.g. "vhost", then the formatted text.
 * A trailing newline in @fmt is not needed (one is added). The rate limit
 * is keyed on @fmt.
 */
void vlog(enum vlog_level level, const char *tag, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void vlogv(enum vlog_level level, const char *tag, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

/*
 * Change the rate limit (@burst lines per call site per @interval_ms; burst 0
 * turns it off) and forget the counts so far (tests start from a clean
 * state this way).
 */
void vlog_set_rate_limit(unsigned burst, unsigned interval_ms);

/* Report lines still held back by the rate limit (call at exit). */
void vlog_flush(void);

/*
 * Tests: send finished lines (without timestamp, prefix or newline, e.g.
 * "vhost: unsupported message 31") to @sink instead of stderr; NULL restores
 * stderr.
 */
typedef void vlog_sink_fn(enum vlog_level level, const char *line, void *opaque);
void vlog_set_sink(vlog_sink_fn *sink, void *opaque);

#endif /* LOG_VLOG_H */
