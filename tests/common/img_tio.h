/* SPDX-License-Identifier: MIT */
/*
 * tests/common/img_tio.h — a struct img_io that records its completion, for
 * the unit tests of img/ (library vqcow_test_img).
 */
#ifndef VQCOW_TESTS_IMG_TIO_H
#define VQCOW_TESTS_IMG_TIO_H

#include <stdbool.h>

#include "img.h"

struct tio {
	struct img_io io;
	int calls; /* completions seen (must end at 1) */
	int res;   /* the last result */
};

/*
 * Set by a test around its calls into img/: a completion that arrives while
 * it is true (from inside the submitting call) fails the test, since img/
 * promises to complete only from the loop.
 */
extern bool g_in_submit;

/* Zero @t and point its done() at tio_done. */
void tio_init(struct tio *t);
/* The done() of a struct tio: counts, records, checks g_in_submit. */
void tio_done(struct img_io *io, int res);

#endif /* VQCOW_TESTS_IMG_TIO_H */
