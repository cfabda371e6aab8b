/* SPDX-License-Identifier: MIT */
/*
 * src/layers.h — the image chain under the export, changed online: external
 * snapshots (blockdev-snapshot-sync) and the active-layer commit job
 * (block-commit, query-block-jobs, block-job-*), with QEMU's names. The
 * QMP handlers live in layers.c; control.c lists them in its table.
 */
#ifndef VQCOWD_LAYERS_H
#define VQCOWD_LAYERS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

struct ctl;
struct img;

int layers_snapshot_sync(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_commit(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_query_jobs(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_job_complete(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_job_cancel(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_job_set_speed(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_job_pause(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);
int layers_job_resume(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);

/*
 * The node name of @img, an image of the chain under the export (@depth
 * below the active layer): the name it was given (--node-name, or a
 * snapshot-node-name), else NODE-backingN as the chain was at start-up.
 */
const char *layers_node_name(struct ctl *c, struct img *img, unsigned depth, char *buf, size_t len);

/*
 * Why the chain must not change under another operation now (an internal
 * snapshot): QEMU's op-blocker reason while a commit job runs, or an
 * external snapshot in progress; NULL when nothing is.
 */
const char *layers_busy(struct ctl *c);

/* Something waits for the device to drain (ctl_waiting): an external snapshot, a job ending. */
bool layers_waiting(struct ctl *c);

/*
 * The layers a finished job let go of are closed (their locks given up):
 * now its end is reported, as QEMU reports it after the nodes went.
 */
void layers_retired(struct ctl *c);

/* Once per loop iteration (from ctl_tick): drive what waits for the device to drain. */
void layers_tick(struct ctl *c);

/* From ctl_held() (no request in flight, outside the loop): a block-commit
 * whose base was opened read-only reopens it read-write and starts. */
void layers_held(struct ctl *c);

/*
 * The daemon stops: the job stops copying (the base keeps what it got: the
 * chain reads the same). True while I/O of ours is still in flight or the
 * device is paused: the daemon must keep its loop running until false.
 */
bool layers_stop(struct ctl *c);

/* Free what is left (after the loop ended). */
void layers_exit(struct ctl *c);

#endif /* VQCOWD_LAYERS_H */
