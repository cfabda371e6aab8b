/* SPDX-License-Identifier: MIT */
/*
 * The daemon's QMP commands (--qmp): the glue between qmp/ (protocol) and the
 * image and device vqcowd serves. vqcowd.c fills a struct ctl and calls
 * ctl_start(); everything QMP-specific lives in control.c.
 */
#ifndef VQCOWD_CONTROL_H
#define VQCOWD_CONTROL_H

#include <stdbool.h>

#include "qmp.h"

#include <stdint.h>

struct img;
struct blk_dev;

/* Per-virtqueue counters the daemon keeps (query-blockstats "vqcowd" section). */
struct ctl_qstat {
	uint64_t requests; /* completed requests of any type */
	uint64_t bytes;    /* data bytes of completed reads and writes */
	uint64_t errors;   /* completed with a status other than OK */
};

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
	void *opaque;
	struct qmp_loop_ops loop;

	/* Private. */
	struct qmp_server *qmp;
	json_t *version;
};

/* Listen on @path. 0 or -errno (-EADDRINUSE: a live socket is there). */
int ctl_start(struct ctl *c, const char *path);
void ctl_stop(struct ctl *c);

#endif /* VQCOWD_CONTROL_H */
