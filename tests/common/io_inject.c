/* SPDX-License-Identifier: MIT */
/* tests/common/io_inject.c — io_loop_inject() over the loop's fault hook. */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "io_inject.h"

#define INJECT_MAX 32

struct inject {
	uint8_t op; /* IO_OP_NONE = free slot */
	bool every;
	unsigned count;
	int res;
};

/* One table per loop, the hook's opaque pointer. Kept on a list so they stay
 * reachable (no leak report) after their loop is gone. */
struct inject_table {
	struct inject inj[INJECT_MAX];
	struct inject_table *next;
};

static struct inject_table *tables;

/* Count a first submission of @op; the injected result to apply, or 0. */
static int inject_hook(void *opaque, struct io_loop *loop, enum io_op op)
{
	struct inject_table *t = opaque;
	int res = 0;

	for (int i = 0; i < INJECT_MAX; i++) {
		struct inject *s = &t->inj[i];
		int r;

		if (s->op != op)
			continue;
		if (s->every) {
			r = s->res;
		} else if (--s->count == 0) {
			r = s->res;
			s->op = IO_OP_NONE;
		} else {
			continue;
		}
		/* A failure wins over a transfer cap. */
		if (res >= 0)
			res = r;
	}
	return res;
}

/* The table of @loop, set up (empty) on first use. NULL on allocation failure. */
static struct inject_table *table_of(struct io_loop *loop)
{
	struct inject_table *t;
	void *opaque;

	if (io_loop_fault_hook(loop, &opaque) == inject_hook)
		return opaque;
	/* A new loop (maybe at the address of a freed one): a fresh table. */
	t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->next = tables;
	tables = t;
	io_loop_set_fault_hook(loop, inject_hook, t);
	return t;
}

int io_loop_inject(struct io_loop *loop, enum io_op op, unsigned nth, int res)
{
	struct inject_table *t;

	if (op < IO_OP_READV || op > IO_OP_TIMEOUT || res == 0)
		return -EINVAL;
	if (res > 0 && op != IO_OP_READV && op != IO_OP_WRITEV)
		return -EINVAL;
	t = table_of(loop);
	if (!t)
		return -ENOMEM;
	for (int i = 0; i < INJECT_MAX; i++) {
		struct inject *s = &t->inj[i];

		if (s->op != IO_OP_NONE)
			continue;
		s->op = (uint8_t)op;
		s->every = nth == 0;
		s->count = nth;
		s->res = res;
		return 0;
	}
	return -ENOSPC;
}

void io_loop_inject_clear(struct io_loop *loop)
{
	void *opaque;

	if (io_loop_fault_hook(loop, &opaque) == inject_hook)
		memset(((struct inject_table *)opaque)->inj, 0, sizeof(struct inject) * INJECT_MAX);
}
