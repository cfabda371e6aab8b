/* SPDX-License-Identifier: MIT */
/*
 * tests/common/io_inject.h — fault injection for unit tests.
 *
 * Implemented twice: over the real loop's fault hook (io_loop_set_fault_hook,
 * tests/common/io_inject.c, library vqcow_test_io) and inside the fake io/ of
 * the engine tests (tests/unit/fake_io.c), so a test reads the same either way.
 */
#ifndef VQCOW_TESTS_IO_INJECT_H
#define VQCOW_TESTS_IO_INJECT_H

#include "io.h"

/*
 * Make a future command of @op misbehave.
 *
 * @op:  IO_OP_READV (also io_read), IO_OP_WRITEV (also io_write),
 *       IO_OP_FDATASYNC, IO_OP_FALLOCATE, IO_OP_POLL or IO_OP_TIMEOUT.
 * @nth: 1 = the next command of @op submitted after this call, 2 = the one
 *       after it, and so on; each injection fires once. 0 = every later
 *       command of @op until io_loop_inject_clear().
 *       Only first submissions count (io/'s internal resubmissions of short
 *       transfers do not).
 * @res: what the command meets, as io_fault_fn in io.h describes: < 0 an
 *       error (-EAGAIN/-EINTR on readv/writev/fdatasync/fallocate: a
 *       transient one io/ must retry), > 0 (readv/writev only) a cap on each
 *       kernel transfer. 0, or > 0 for other ops: -EINVAL.
 * Several injections may be armed at once (up to 32); each counts commands
 * independently, and a failure wins over a transfer cap. Returns 0, -EINVAL
 * (bad @op/@res), -ENOSPC (table full) or -ENOMEM.
 */
int io_loop_inject(struct io_loop *loop, enum io_op op, unsigned nth, int res);

/* Disarm every injection of io_loop_inject(). */
void io_loop_inject_clear(struct io_loop *loop);

#endif /* VQCOW_TESTS_IO_INJECT_H */
