/* SPDX-License-Identifier: MIT */
/*
 * The daemon's QMP commands (--qmp): the glue between qmp/ (protocol) and the
 * image and device vqcowd serves. vqcowd.c fills a struct ctl and calls
 * ctl_start(); everything QMP-specific lives in control.c.
 */
#ifndef VQCOWD_CONTROL_H
#define VQCOWD_CONTROL_H

#include <stdbool.h>

#include "blk.h"
#include "qmp.h"

#include <stdint.h>

struct img;
struct img_opts;
struct layers;

/* Per-virtqueue counters the daemon keeps (query-blockstats "vqcowd" section). */
struct ctl_qstat {
	uint64_t requests;    /* completed requests of any type */
	uint64_t bytes;       /* data bytes of completed reads and writes */
	uint64_t errors;      /* completed with a status other than OK */
	struct blk_stats blk; /* blk_req_submit_stats(): this queue's requests */
	/* aligned: each queue's counters are written by the thread serving it,
	 * on every request; unaligned, a queue's last line was its neighbour's
	 * first */
} __attribute__((aligned(64)));

struct ctl {
	/* Filled by vqcowd.c before ctl_start(). */
	const char *node_name;
	const char *file; /* --blk-file as given */
	struct img *img;
	struct blk_dev *blk;
	const bool *stopping;
	const struct ctl_qstat *qstats; /* [nqueues] */
	unsigned nqueues;
	/* Stop the daemon as SIGTERM does. */
	void (*quit)(void *opaque);
	/* The image size changed: update the device and tell the frontend. */
	void (*resized)(void *opaque);
	/*
	 * Hold new requests back; once none is in flight, stop the loop and call
	 * ctl_held() from outside it (snapshots: the image is quiesced there).
	 */
	void (*hold)(void *opaque);
	/*
	 * Park (@on) or resume the I/O threads: between the two, no request is
	 * popped, submitted or completed on another thread, so blk/'s device
	 * (pause, resume, image, write hook, capacity) may change. Nests; QMP
	 * handlers and ctl_held() run parked already. NULL: one thread.
	 */
	void (*park)(void *opaque, bool on);
	/* The working directory at start-up (relative image names), NULL if unknown. */
	const char *cwd;
	/* How the daemon opened its image (external snapshots open overlays alike). */
	const struct img_opts *img_opts;
	/* @img is the active layer now (external snapshot, commit pivot). */
	void (*set_active)(void *opaque, struct img *img);
	/*
	 * Close @img (and its chain) soon, from main(): closing drives the loop.
	 * True: it will be, and main() calls ctl_retired() once it is; false:
	 * it stays open (too many at once).
	 */
	bool (*retire)(void *opaque, struct img *img);
	/* The device resumed: pop what the rings hold. */
	void (*kick)(void *opaque);
	void *opaque;
	struct qmp_loop_ops loop;

	/* Private. */
	struct qmp_server *qmp;
	json_t *version;
	uint64_t failed_seen[4]; /* failed counters already reported */
	uint64_t failures_seen;  /* blk_dev_failures() already reported */
	struct ctl_op *ops;      /* snapshot operations waiting for ctl_held() */
	uint64_t last_event_ns;
	struct layers *layers; /* layers.c: node names, snapshot in progress, the job */
};

/* The daemon stops (@reason: QEMU's ShutdownCause, e.g. "host-qmp-quit"): SHUTDOWN event. */
void ctl_shutdown_event(struct ctl *c, const char *reason);

/* Once per loop iteration: what waits for the device to drain (layers_tick). */
void ctl_tick(struct ctl *c);

/*
 * Once per loop iteration: a BLOCK_IO_ERROR event is due (requests failed
 * since the last one, and none was sent in the last second: a guest can make
 * requests fail at will; the events it causes must not flood the clients).
 * ctl_report() then sends it, summing every queue's counters: with I/O
 * threads, call it with them parked. Only then: parking on every iteration
 * while an event waits for its second to pass stopped the I/O threads over
 * and over (a second after each reported failure).
 */
bool ctl_report_due(struct ctl *c);
void ctl_report(struct ctl *c);

/*
 * Called by the daemon after hold(), outside the loop, with no request in
 * flight: run the operations waiting (internal snapshots) and reply to them.
 * The daemon then pops requests again.
 */
void ctl_held(struct ctl *c);

/*
 * Work waits for requests on other threads to drain (an external snapshot,
 * the end of a commit job): the daemon wakes the loop every millisecond
 * meanwhile, since those completions do not run on it.
 */
bool ctl_waiting(struct ctl *c);

/* From main(), after closing what retire() was given: the job that let it go ends. */
void ctl_retired(struct ctl *c);

/*
 * The daemon stops: background work (a commit job) stops. True while its
 * I/O is in flight or the device is paused for it: keep the loop running.
 */
bool ctl_busy(struct ctl *c);

/*
 * Listen on @path, or serve @fd when >= 0 (a listening socket passed in).
 * 0 or -errno (-EADDRINUSE: a live socket is at @path; -ENOTCONN: @fd is
 * not a listening stream socket).
 */
int ctl_start(struct ctl *c, const char *path, int fd);
void ctl_stop(struct ctl *c);

#endif /* VQCOWD_CONTROL_H */
