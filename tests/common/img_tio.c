/* SPDX-License-Identifier: MIT */
/* tests/common/img_tio.c — completion recorder for img/ unit tests (img_tio.h). */
#include <CUnit/CUnit.h>
#include <string.h>

#include "img_tio.h"

bool g_in_submit;

void tio_done(struct img_io *io, int res)
{
	struct tio *t = (struct tio *)io;

	CU_ASSERT_FALSE(g_in_submit); /* never from inside the submitter */
	t->calls++;
	t->res = res;
}

void tio_init(struct tio *t)
{
	memset(t, 0, sizeof(*t));
	t->io.done = tio_done;
}
