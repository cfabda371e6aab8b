/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of qcow2fmt/snapshot.c: internal snapshot create, delete and
 * apply over a struct qcow2_io, with qemu-img / qemu-io as the oracle.
 *
 * Crash at every write: the operation runs on a copy of an image with
 * shared clusters (a snapshot made by qemu-img, then writes), over an I/O
 * that performs the first N writes and fails every later one (and every
 * sync after that), for N = 0, 1, 2, ... until it succeeds. What is left
 * is a process that died after its N-th write. Each result must show no
 * refcount too low in `qemu-img check` (only leaks, or COPIED flags
 * disagreeing with a refcount that is too high); after `-r leaks` no
 * COPIED flag set on a shared cluster (only missing ones, harmless); be
 * clean after `qemu-img check -r all`; and read back: the active image's data, the old
 * snapshot's data and, if it was committed, the new snapshot's data.
 * Persistent bitmap changes likewise: leaks at most, the old or the new
 * bitmaps in qemu-img info, the data intact. Create also on an image whose
 * refcount table must grow for it (512-byte clusters, 64-bit refcounts).
 *
 * Fail at each write: one write fails (-ENOSPC), every other succeeds, and
 * the process goes on: create, delete and apply must leave no `qemu-img
 * check` error at all (leaks only), report failure iff nothing changed for
 * the user, and leave the image usable. Delete and apply run so, and crash
 * after every write, also on an image with two snapshots sharing clusters
 * and compressed clusters (make_two). A failed create's undo, with a crash
 * after each of its writes: repairable, no refcount too low.
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image.h"
#include "testutil.h"

static char dir[256];
static unsigned cbits = 12; /* cluster bits of the image under test */

struct cio {
	int fd;
	long budget; /* writes left; < 0: unlimited */
	bool crashed;
	unsigned writes;
	long fail_at; /* that write (0: the first) fails with -ENOSPC; < 0: none */
	bool failed;
};

/* A failing write (fail_at) writes its first half before it fails. */
static bool g_tear;

static int c_read(void *o, void *buf, size_t len, uint64_t off)
{
	struct cio *c = o;
	ssize_t n = pread(c->fd, buf, len, (off_t)off);

	if (n < 0)
		return -errno;
	if ((size_t)n < len)
		memset((char *)buf + n, 0, len - (size_t)n);
	return 0;
}

static int c_write(void *o, const void *buf, size_t len, uint64_t off)
{
	struct cio *c = o;

	/* with @fail_at, @budget counts the writes after the failure */
	if (c->crashed || (c->budget == 0 && (c->fail_at < 0 || c->failed))) {
		c->crashed = true;
		return -EIO;
	}
	if (c->fail_at >= 0 && c->writes++ == (unsigned long)c->fail_at) {
		c->failed = true;
		/* g_tear: the first half (whole 8-byte entries) reached the file,
		 * as a short write the file system ran out of space in */
		if (g_tear && len >= 16 &&
		    pwrite(c->fd, buf, len / 16 * 8, (off_t)off) != (ssize_t)(len / 16 * 8))
			return -EIO;
		return -ENOSPC; /* a full file system; every other write succeeds */
	}
	if (c->fail_at >= 0) {
		if (c->failed && c->budget > 0)
			c->budget--;
		return pwrite(c->fd, buf, len, (off_t)off) == (ssize_t)len ? 0 : -EIO;
	}
	if (c->budget > 0)
		c->budget--;
	c->writes++;
	return pwrite(c->fd, buf, len, (off_t)off) == (ssize_t)len ? 0 : -EIO;
}

static int c_sync(void *o)
{
	struct cio *c = o;

	return c->crashed ? -EIO : 0;
}

static int c_size(void *o, uint64_t *size)
{
	struct cio *c = o;
	struct stat st;

	if (fstat(c->fd, &st) < 0)
		return -errno;
	*size = (uint64_t)st.st_size;
	return 0;
}

/* Run @op on a copy of @base with @budget writes; 0 when it completed. */
static int run_op(const char *base, const char *work, char op, long budget, unsigned *writes)
{
	struct cio c = {.budget = budget, .fail_at = -1};
	struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
	struct qcow2_snap_desc sn;
	char err[300] = "";
	int ret;

	CU_ASSERT_FATAL(tu_sh("cp %s %s", base, work) == 0);
	c.fd = open(work, O_RDWR);
	CU_ASSERT_FATAL(c.fd >= 0);
	memset(&sn, 0, sizeof(sn));
	if (op == 'c') {
		snprintf(sn.name, sizeof(sn.name), "new");
		sn.icount = -1;
		ret = qcow2_snapshot_create_io(&io, work, &sn, QCOW2_SNAP_UNIQUE_NAME, err,
					       sizeof(err));
	} else if (op == 'd') {
		ret =
		    qcow2_snapshot_delete_io(&io, work, NULL, "keep", &sn, NULL, err, sizeof(err));
	} else {
		ret = qcow2_snapshot_apply_io(&io, work, "keep", err, sizeof(err));
	}
	close(c.fd);
	if (ret < 0 && !c.crashed)
		fprintf(stderr, "op %c failed without a crash: %s\n", op, err);
	CU_ASSERT(ret == 0 || c.crashed);
	*writes = c.writes;
	return ret;
}

/* The image after a crash: no refcount too low, repairable, data intact. */
/*
 * In `qemu-img check` output @path: count the clusters flagged COPIED with a
 * refcount over 1 that are really referenced more than once (not leaks).
 */
static int shared_copied(const char *path, unsigned cb)
{
	uint64_t leaked[4096];
	unsigned nl = 0;
	int bad = 0;
	char line[512];
	FILE *f = fopen(path, "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long cl, rc, ref;

		if (sscanf(line, "Leaked cluster %llu refcount=%llu reference=%llu", &cl, &rc,
			   &ref) == 3 &&
		    ref <= 1 && nl < 4096)
			leaked[nl++] = cl;
	}
	rewind(f);
	while (fgets(line, sizeof(line), f)) {
		unsigned long long e, rc;
		int idx;
		bool found = false;

		if (sscanf(line, "ERROR OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu", &e,
			   &rc) != 2 &&
		    sscanf(line,
			   "ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%llx refcount=%llu",
			   &idx, &e, &rc) != 3)
			continue;
		if (!(e & QCOW2_OFLAG_COPIED) || rc <= 1)
			continue;
		for (unsigned i = 0; i < nl; i++)
			found |= leaked[i] == ((e & QCOW2_L2E_OFFSET_MASK) >> cb);
		bad += !found;
	}
	fclose(f);
	return bad;
}

/*
 * qemu-io reads each "PATTERN RANGE" of the NULL-terminated list of @img
 * and finds PATTERN there: one qemu-io for them all (each read must print
 * its line, none may fail).
 */
static bool reads(const char *img, const char *fmt, ...)
{
	char cmds[1024] = "";
	const char *pr;
	size_t len = 0;
	unsigned n = 0;
	va_list ap;

	va_start(ap, fmt);
	while ((pr = va_arg(ap, const char *)) && len < sizeof(cmds)) {
		len += (size_t)snprintf(cmds + len, sizeof(cmds) - len, " -c 'read -P %s'", pr);
		n++;
	}
	va_end(ap);
	CU_ASSERT_FATAL(len < sizeof(cmds));
	return tu_sh("out=$(qemu-io -f %s -r%s %s 2>&1) && "
		     "[ \"$(echo \"$out\" | grep -c '^read ')\" = %u ] && "
		     "! echo \"$out\" | grep -q failed",
		     fmt, cmds, img, n) == 0;
}

/* A line of the text file @path that contains @what (and not @unless)? */
static bool file_has(const char *path, const char *what, const char *unless, bool at_start)
{
	char line[512];
	bool found = false;
	FILE *f = fopen(path, "r");

	if (!f)
		return false;
	while (!found && fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, what);

		found = p && (!at_start || p == line) && !(unless && strstr(line, unless));
	}
	fclose(f);
	return found;
}

static void verify(const char *work, char op, long n, bool done)
{
	char out[600], list[600], kraw[300], nraw[300];
	bool r;
	int st;

	snprintf(kraw, sizeof(kraw), "%s/k.raw", dir);
	snprintf(nraw, sizeof(nraw), "%s/n.raw", dir);
	snprintf(out, sizeof(out), "%s/check.txt", dir);
	snprintf(list, sizeof(list), "%s/snapshots.txt", dir);
	st = tu_sh("qemu-img check %s >%s 2>&1", work, out);
	r = file_has(out, "ERROR", "OFLAG_COPIED", true);
	if (r)
		fprintf(stderr, "op %c, crash after %ld writes: refcount errors\n", op, n);
	CU_ASSERT(!r);
	/* done: clean; but a create that crashed only while giving back its
	 * old table made its snapshot and reports it (the old table leaked) */
	if (done)
		CU_ASSERT(st == 0 || (n >= 0 && op == 'c' && st == 3));
	/* COPIED set on a cluster whose refcount is over 1 is harmless only
	 * while the cluster is in fact used once (a leak): a write would
	 * otherwise overwrite what a snapshot holds. */
	st = shared_copied(out, cbits);
	if (st)
		fprintf(stderr, "op %c, crash after %ld writes: COPIED set on a shared cluster\n",
			op, n);
	CU_ASSERT(st == 0);
	CU_ASSERT(tu_sh("qemu-img check -r all %s >/dev/null 2>&1", work) == 0);
	CU_ASSERT(tu_sh("qemu-img check %s >/dev/null 2>&1", work) == 0);
	/* Active data: 0x42 in the first MiB (0x41 once reverted), 0x41 in the second. */
	if (op == 'a') {
		bool old = reads(work, "qcow2", "0x42 0 1M", "0 6M 64k", "0x41 1M 1M", NULL);
		bool new = reads(work, "qcow2", "0x41 0 1M", "0x43 6M 64k", "0x41 1M 1M", NULL);

		CU_ASSERT(done ? new : old || new);
	} else {
		CU_ASSERT(reads(work, "qcow2", "0x42 0 1M", "0x41 1M 1M", NULL));
	}
	/* The old snapshot, if it is still listed, holds 0x41 in both. */
	tu_sh("qemu-img snapshot -l %s >%s 2>/dev/null", work, list);
	if (file_has(list, " keep ", NULL, false)) {
		CU_ASSERT(
		    tu_sh("qemu-img convert -O raw -l snapshot.name=keep %s %s", work, kraw) == 0);
		CU_ASSERT(reads(kraw, "raw", "0x41 0 2M", "0x43 6M 64k", NULL));
	}
	if (op == 'd' && done)
		CU_ASSERT(!file_has(list, " keep ", NULL, false));
	if (file_has(list, " new ", NULL, false)) {
		CU_ASSERT(tu_sh("qemu-img convert -O raw -l snapshot.name=new %s %s", work, nraw) ==
			  0);
		CU_ASSERT(reads(nraw, "raw", "0x42 0 1M", "0x41 1M 1M", "0 6M 64k", NULL));
	}
	if (op == 'c' && done)
		CU_ASSERT(file_has(list, " new ", NULL, false));
}

/* The refcount table's offset in the header of @path (0 on error). */
static uint64_t rt_offset(const char *path)
{
	uint8_t b[8];
	int fd = open(path, O_RDONLY);
	ssize_t n = fd < 0 ? -1 : pread(fd, b, 8, QCOW2_OFF_REFCOUNT_TABLE_OFFSET);

	if (fd >= 0)
		close(fd);
	return n == 8 ? qcow2_be64(b) : 0;
}

/*
 * The base image of the per-write tests in @base (its working copy's name
 * in @work; both 300 bytes): 8M with @opts, data, a snapshot "keep", data
 * and a zeroed cluster after it, then @fill (a qemu-io command, or NULL);
 * sets cbits from @opts.
 */
static void make_base(char *base, char *work, const char *opts, const char *fill)
{
	cbits = strstr(opts, "cluster_size=512") ? 9 : 12;
	snprintf(base, 300, "%s/base.qcow2", dir);
	snprintf(work, 300, "%s/work.qcow2", dir);
	CU_ASSERT_FATAL(tu_sh("rm -f %s && qemu-img create -q -f qcow2 -o %s %s 8M && "
			      "qemu-io -c 'write -P 0x41 0 2M' -c 'write -P 0x43 6M 64k' %s "
			      ">/dev/null && qemu-img snapshot -c keep %s && "
			      "qemu-io -c 'write -P 0x42 0 1M' -c 'write -z 6M 64k' %s >/dev/null",
			      base, opts, base, base, base, base) == 0);
	if (fill)
		CU_ASSERT_FATAL(tu_sh("qemu-io -c '%s' %s >/dev/null", fill, base) == 0);
}

/*
 * @opts: qemu-img create options; @fill: a qemu-io command run last (the
 * filler that brings the used end near the refcount table's reach), or
 * NULL; @grows: the operation must grow the refcount table.
 */
static void crash_every_write_on(char op, const char *opts, const char *fill, bool grows)
{
	char base[300], work[300];
	unsigned total = 0, w;
	long n;

	make_base(base, work, opts, fill);
	CU_ASSERT_FATAL(run_op(base, work, op, -1, &total) == 0);
	verify(work, op, -1, true);
	CU_ASSERT((rt_offset(work) != rt_offset(base)) == grows);
	for (n = 0; n <= (long)total; n++) {
		int ret = run_op(base, work, op, n, &w);

		verify(work, op, n, ret == 0);
	}
	fprintf(stderr, "op %c: crashed after each of %u writes: all repairable, data intact\n", op,
		total);
}

/*
 * Create where one write fails (-ENOSPC: a full file system, or a device
 * too small) and every other one succeeds: the write of the snapshot's L1
 * table, of the snapshot table, of the header, of each refcount block, L2
 * table and L1 table, in turn. A failed create must leave the image as
 * consistent as it was: `qemu-img check` without a single error (leaks
 * allowed), no new snapshot, the data and the old snapshot intact; then the
 * image stays usable: a write over clusters the old snapshot shares, check
 * again, every byte where it should be.
 */
static void fail_each_write_on(const char *opts, const char *fill)
{
	char base[300], work[300], out[300], list[300], kraw[300];
	unsigned total = 0, nfailed = 0;
	bool l1_failed = false, table_failed = false, header_failed = false;

	make_base(base, work, opts, fill);
	snprintf(out, sizeof(out), "%s/check.txt", dir);
	snprintf(list, sizeof(list), "%s/snapshots.txt", dir);
	snprintf(kraw, sizeof(kraw), "%s/k.raw", dir);
	CU_ASSERT_FATAL(run_op(base, work, 'c', -1, &total) == 0);
	for (long n = 0; n < (long)total; n++) {
		struct cio c = {.budget = -1, .fail_at = n};
		struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
		struct qcow2_snap_desc sn;
		char err[300] = "";
		bool made, errors;
		int ret, st;

		CU_ASSERT_FATAL(tu_sh("cp %s %s", base, work) == 0);
		c.fd = open(work, O_RDWR);
		CU_ASSERT_FATAL(c.fd >= 0);
		memset(&sn, 0, sizeof(sn));
		snprintf(sn.name, sizeof(sn.name), "new");
		sn.icount = -1;
		ret = qcow2_snapshot_create_io(&io, work, &sn, QCOW2_SNAP_UNIQUE_NAME, err,
					       sizeof(err));
		close(c.fd);
		CU_ASSERT(c.failed);
		CU_ASSERT(ret == 0 || ret == -ENOSPC);
		nfailed += ret < 0;
		l1_failed |= ret < 0 && strstr(err, "writing the snapshot's L1 table");
		table_failed |= ret < 0 && strstr(err, "writing the snapshot table");
		header_failed |= ret < 0 && strstr(err, "writing the header");
		tu_sh("qemu-img snapshot -l %s >%s 2>/dev/null", work, list);
		made = file_has(list, " new ", NULL, false);
		CU_ASSERT(made == (ret == 0));
		/* 0: clean, 3: leaks only */
		st = tu_sh("qemu-img check %s >%s 2>&1", work, out);
		errors = file_has(out, "ERROR", NULL, true) || (st != 0 && st != 3);
		if (errors) {
			fprintf(stderr, "create, write %ld failed (%s): qemu-img check:\n", n, err);
			tu_sh("grep -v '^Leaked' %s | head -5 >&2", out);
		}
		CU_ASSERT(!errors);
		CU_ASSERT(reads(work, "qcow2", "0x42 0 1M", "0x41 1M 1M", "0 6M 64k", NULL));
		/* usable: overwrite clusters "keep" shares, and a new one */
		CU_ASSERT(tu_sh("qemu-io -c 'write -P 0x45 512k 1M' -c 'write -P 0x46 4M 64k' %s "
				">/dev/null 2>&1",
				work) == 0);
		st = tu_sh("qemu-img check %s >%s 2>&1", work, out);
		errors = file_has(out, "ERROR", NULL, true) || (st != 0 && st != 3);
		if (errors)
			fprintf(stderr, "create, write %ld failed: errors after writing on\n", n);
		CU_ASSERT(!errors);
		CU_ASSERT(reads(work, "qcow2", "0x42 0 512k", "0x45 512k 1M", "0x41 1536k 512k",
				"0x46 4M 64k", "0 6M 64k", NULL));
		CU_ASSERT(
		    tu_sh("qemu-img convert -O raw -l snapshot.name=keep %s %s", work, kraw) == 0);
		CU_ASSERT(reads(kraw, "raw", "0x41 0 2M", "0 4M 64k", "0x43 6M 64k", NULL));
		if (made) {
			CU_ASSERT(tu_sh("qemu-img convert -O raw -l snapshot.name=new %s %s", work,
					kraw) == 0);
			CU_ASSERT(reads(kraw, "raw", "0x42 0 1M", "0x41 1M 1M", "0 6M 64k", NULL));
		}
	}
	/* among them the snapshot's L1 table, the snapshot table, the header */
	CU_ASSERT(l1_failed && table_failed && header_failed);
	fprintf(stderr,
		"create: each of %u writes failed in turn (%u creates failed): no errors, image "
		"usable\n",
		total, nfailed);
}

static void test_create_fail(void)
{
	fail_each_write_on("cluster_size=4096", NULL);
}

/* The same where the create grows the refcount table (see test_create_grow_crash). */
static void test_create_grow_fail(void)
{
	fail_each_write_on("cluster_size=512,refcount_bits=64", "write -P 0x44 2M 800k");
}

/*
 * A create whose write @k fails (-ENOSPC) undoes its raises (create_undo:
 * the refcounts lowered, then COPIED set again); the process dies after
 * each write of that undo. No refcount too low; COPIED may disagree with a
 * refcount (clear at 1, between the two steps, or set on a leak), which
 * `qemu-img check -r all` repairs; no new snapshot; the data intact.
 */
static void test_create_undo_crash(void)
{
	char base[300], work[300], out[300], list[300];
	unsigned total = 0, points = 0, clear1 = 0;

	make_base(base, work, "cluster_size=4096", NULL);
	snprintf(out, sizeof(out), "%s/check.txt", dir);
	snprintf(list, sizeof(list), "%s/snapshots.txt", dir);
	CU_ASSERT_FATAL(run_op(base, work, 'c', -1, &total) == 0);
	for (long k = 0; k < (long)total; k++) {
		long undo = -1;

		for (long j = 0; undo < 0 || j < undo; j++) {
			struct cio c = {.budget = undo < 0 ? -1 : j, .fail_at = k};
			struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
			struct qcow2_snap_desc sn;
			char err[300] = "";
			bool bad;
			int ret;

			CU_ASSERT_FATAL(tu_sh("cp %s %s", base, work) == 0);
			c.fd = open(work, O_RDWR);
			CU_ASSERT_FATAL(c.fd >= 0);
			memset(&sn, 0, sizeof(sn));
			snprintf(sn.name, sizeof(sn.name), "new");
			sn.icount = -1;
			ret = qcow2_snapshot_create_io(&io, work, &sn, QCOW2_SNAP_UNIQUE_NAME, err,
						       sizeof(err));
			close(c.fd);
			if (undo < 0) { /* the first run counts the writes after the failure */
				undo = (long)c.writes - k - 1;
				if (ret == 0 || undo <= 0)
					break; /* nothing undone */
				j = -1;
				continue;
			}
			points++;
			tu_sh("qemu-img check %s >%s 2>&1", work, out);
			bad = file_has(out, "ERROR", "OFLAG_COPIED", true) ||
			      shared_copied(out, cbits) != 0;
			clear1 += tu_sh("grep -q '^ERROR OFLAG_COPIED.*refcount=1$' %s", out) == 0;
			if (bad) {
				fprintf(stderr,
					"create, write %ld failed, crash after %ld of its undo:\n",
					k, j);
				tu_sh("grep -v '^Leaked' %s | head -5 >&2", out);
			}
			CU_ASSERT(!bad);
			CU_ASSERT(tu_sh("qemu-img check -r all %s >/dev/null 2>&1 && "
					"qemu-img check %s >/dev/null 2>&1",
					work, work) == 0);
			tu_sh("qemu-img snapshot -l %s >%s 2>/dev/null", work, list);
			CU_ASSERT(!file_has(list, " new ", NULL, false));
			CU_ASSERT(
			    reads(work, "qcow2", "0x42 0 1M", "0x41 1M 1M", "0 6M 64k", NULL));
		}
	}
	CU_ASSERT(points > 0);
	fprintf(stderr,
		"create: %u crash points in the undo of a failed create: no refcount too low, "
		"%u with COPIED clear at refcount 1\n",
		points, clear1);
}

/* 4 KiB clusters: several L2 tables, refcount blocks shared by both. */
static void crash_every_write(char op)
{
	crash_every_write_on(op, "cluster_size=4096", NULL, false);
}

static void test_create_crash(void)
{
	crash_every_write('c');
}

static void test_delete_crash(void)
{
	crash_every_write('d');
}

static void test_apply_crash(void)
{
	crash_every_write('a');
}

/*
 * Create where the new clusters (the L1 copy, the snapshot table) lie past
 * the refcount table's reach: 512-byte clusters with 64-bit refcounts (a
 * refcount block covers 64 clusters, a table cluster 64 blocks: 2 MiB), and
 * the used end 3 clusters short of the 2-cluster table's reach (measured
 * with QEMU 7.2's qemu-img/qemu-io; the test checks the table did move).
 */
static void test_create_grow_crash(void)
{
	crash_every_write_on('c', "cluster_size=512,refcount_bits=64", "write -P 0x44 2M 800k",
			     true);
}

/* As qemu-img: no revert on an image with persistent bitmaps (enabled or not). */
static void test_apply_bitmaps(void)
{
	char img[300], q[300];

	snprintf(img, sizeof(img), "%s/bm.qcow2", dir);
	snprintf(q, sizeof(q), "%s/bmq.qcow2", dir);
	CU_ASSERT_FATAL(tu_sh("qemu-img create -q -f qcow2 %s 8M && qemu-img snapshot -c s %s && "
			      "qemu-img bitmap --add %s b0 && qemu-img bitmap --disable %s b0 && "
			      "cp %s %s && cp %s %s.orig",
			      img, img, img, img, img, q, img, img) == 0);
	CU_ASSERT(tu_sh("qemu-img snapshot -a s %s 2>&1 | grep -q 'Device has active dirty "
			"bitmaps'",
			q) == 0);
	{
		struct cio c = {.budget = -1, .fail_at = -1};
		struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
		char err[300] = "";

		c.fd = open(img, O_RDWR);
		CU_ASSERT_FATAL(c.fd >= 0);
		CU_ASSERT(qcow2_snapshot_apply_io(&io, img, "s", err, sizeof(err)) == -EBUSY);
		CU_ASSERT_STRING_EQUAL(err, "Device has active dirty bitmaps");
		CU_ASSERT(c.writes == 0);
		close(c.fd);
	}
	CU_ASSERT(tu_sh("cmp %s %s.orig", img, img) == 0); /* untouched */
}

/*
 * Persistent bitmap changes (qcow2_bitmap_edit_io), crash after every write:
 * qemu-img check finds leaks at most (clean after -r leaks), qemu-img info
 * opens the image without a warning and lists either the old or the new
 * bitmaps, and the data is intact. @with_bm: the base has bitmap b0 (bits
 * set); otherwise no bitmaps extension at all.
 */
static void bitmap_crash(bool with_bm, char op, const char *name)
{
	char base[300], work[300], old[300], new[300], cur[300];
	unsigned total = 0;
	const char *list = "qemu-img info %s | sed -n '/bitmaps:/,/refcount bits/p' >%s";

	snprintf(base, sizeof(base), "%s/bmbase.qcow2", dir);
	snprintf(work, sizeof(work), "%s/bmwork.qcow2", dir);
	snprintf(old, sizeof(old), "%s/bm.old", dir);
	snprintf(new, sizeof(new), "%s/bm.new", dir);
	snprintf(cur, sizeof(cur), "%s/bm.cur", dir);
	CU_ASSERT_FATAL(tu_sh("rm -f %s && qemu-img create -q -f qcow2 -o cluster_size=4096 %s 8M",
			      base, base) == 0);
	if (with_bm)
		CU_ASSERT_FATAL(tu_sh("qemu-img bitmap --add %s b0", base) == 0);
	CU_ASSERT_FATAL(tu_sh("qemu-io -c 'write -P 0x41 0 1M' %s >/dev/null", base) == 0);
	CU_ASSERT_FATAL(tu_sh(list, base, old) == 0);
	for (long n = -1; n <= (long)total; n++) {
		struct cio c = {.budget = n, .fail_at = -1};
		struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
		char err[300] = "";
		int ret;

		CU_ASSERT_FATAL(tu_sh("cp %s %s", base, work) == 0);
		c.fd = open(work, O_RDWR);
		CU_ASSERT_FATAL(c.fd >= 0);
		if (op == 'm') {
			/* merge: granules 0..3, 9 and the last bit of a 64-byte run */
			static const uint8_t bits[64] = {0x0f, 0x02, [63] = 0x80};

			ret = qcow2_bitmap_merge_io(&io, work, name, bits, sizeof(bits), err,
						    sizeof(err));
		} else {
			ret = qcow2_bitmap_edit_io(&io, work, op, name, 0, false, err, sizeof(err));
		}
		close(c.fd);
		if (ret < 0 && !c.crashed)
			fprintf(stderr, "bitmap op %c failed without a crash: %s\n", op, err);
		CU_ASSERT(ret == 0 || c.crashed);
		if (n < 0) {
			total = c.writes;
			CU_ASSERT_FATAL(tu_sh(list, work, new) == 0);
			if (op != 'c' && op != 'm') /* clear and merge change the bits only */
				CU_ASSERT(tu_sh("cmp -s %s %s", old, new) != 0);
			CU_ASSERT(tu_sh("qemu-img check %s >/dev/null 2>&1", work) == 0);
		}
		if (tu_sh("qemu-img check %s 2>&1 | grep -q '^ERROR'", work) == 0) {
			fprintf(stderr, "bitmap op %c, crash after %ld writes: check errors\n", op,
				n);
			CU_FAIL("errors after a crash");
		}
		CU_ASSERT(tu_sh("qemu-img info %s 2>&1 >/dev/null | grep -q .", work) != 0);
		CU_ASSERT(tu_sh(list, work, cur) == 0);
		CU_ASSERT(tu_sh("cmp -s %s %s || cmp -s %s %s", cur, old, cur, new) == 0);
		if (ret == 0)
			CU_ASSERT(tu_sh("cmp -s %s %s", cur, new) == 0);
		if (tu_sh("qemu-img check -r leaks %s >/dev/null 2>&1 && "
			  "qemu-img check %s >/dev/null 2>&1",
			  work, work) != 0) {
			fprintf(stderr, "bitmap op %c, crash after %ld writes: not repaired\n", op,
				n);
			tu_sh("qemu-img check %s >&2", work);
			CU_FAIL("not repaired by qemu-img check -r leaks");
		}
		CU_ASSERT(reads(work, "qcow2", "0x41 0 1M", NULL));
	}
	fprintf(stderr,
		"bitmap op %c %s: crashed after each of %u writes: old or new, leaks at most\n", op,
		name, total);
}

static void test_bitmap_add_first(void)
{
	bitmap_crash(false, 'a', "n1");
}

static void test_bitmap_add(void)
{
	bitmap_crash(true, 'a', "n1");
}

static void test_bitmap_clear(void)
{
	bitmap_crash(true, 'c', "b0");
}

static void test_bitmap_merge(void)
{
	bitmap_crash(true, 'm', "b0");
}

/* vqcow-img resize's first step: every bitmap marked in use */
static void test_bitmap_all_in_use(void)
{
	bitmap_crash(true, 'U', "");
}

static void test_bitmap_disable(void)
{
	bitmap_crash(true, 'd', "b0");
}

static void test_bitmap_remove_last(void)
{
	bitmap_crash(true, 'r', "b0");
}

/*
 * Delete and apply on an image with two snapshots sharing clusters and
 * compressed clusters (4 KiB clusters): "keep" (0x41 in the first 2M, 16
 * compressed clusters of 0x47 at 3M, 0x43 at 6M), then 0x42 over the first
 * MiB, "s2", then 0x44 over 512k..768k and zeroes at 6M. Clusters of the
 * second MiB and the compressed ones are named by all three (refcount 3),
 * 0x42's by s2 and the active layer, 0x41's first MiB by keep alone. What
 * each holds is exported to raw files first (the oracle the results are
 * compared with byte for byte).
 */
static void make_two(char *base, char *work, const char *opts)
{
	cbits = strstr(opts, "cluster_size=512") ? 9 : 12;
	snprintf(base, 300, "%s/base2.qcow2", dir);
	snprintf(work, 300, "%s/work2.qcow2", dir);
	CU_ASSERT_FATAL(
	    tu_sh("rm -f %s && qemu-img create -q -f qcow2 -o %s %s 8M && "
		  "qemu-io -c 'write -P 0x41 0 2M' -c 'write -c -P 0x47 3M 64k' "
		  "-c 'write -P 0x43 6M 64k' %s >/dev/null && qemu-img snapshot -c keep %s && "
		  "qemu-io -c 'write -P 0x42 0 1M' %s >/dev/null && qemu-img snapshot -c s2 %s && "
		  "qemu-io -c 'write -P 0x44 512k 256k' -c 'write -z 6M 64k' %s >/dev/null && "
		  "qemu-img check -q %s && "
		  "qemu-img convert -O raw %s %s/act.raw && "
		  "qemu-img convert -O raw -l snapshot.name=keep %s %s/keep.raw && "
		  "qemu-img convert -O raw -l snapshot.name=s2 %s %s/s2.raw && "
		  "qemu-img map --output=json %s | "
		  "grep -q '\"start\": 3145728, .*\"data\": true}'",
		  base, opts, base, base, base, base, base, base, base, base, dir, base, dir, base,
		  dir, base) == 0);
}

/* Snapshot @sn of @img (NULL: the active layer) equals @raw (a name in dir). */
static bool holds(const char *img, const char *sn, const char *raw)
{
	char cur[300];

	snprintf(cur, sizeof(cur), "%s/cur.raw", dir);
	if (sn)
		return tu_sh("qemu-img convert -O raw -l snapshot.name=%s %s %s && cmp -s %s %s/%s",
			     sn, img, cur, cur, dir, raw) == 0;
	return tu_sh("qemu-img convert -O raw %s %s && cmp -s %s %s/%s", img, cur, cur, dir, raw) ==
	       0;
}

/*
 * @op ('d' delete, 'a' apply) of snapshot @target on a copy of make_two's
 * image, over an I/O that fails only write @fail_at (-ENOSPC, every other
 * succeeding; < 0: none) or, with @budget >= 0, performs @budget writes and
 * fails every later one and every sync (a crash after write @budget: no
 * undo reaches the disk). The number of writes made into *@writes.
 */
static int run_two(const char *base, const char *work, char op, const char *target, long budget,
		   long fail_at, unsigned *writes, char *err, size_t errlen)
{
	struct cio c = {.budget = budget, .fail_at = fail_at};
	struct qcow2_io io = {c_read, c_write, c_sync, c_size, &c, false};
	struct qcow2_snap_desc sn;
	int ret;

	CU_ASSERT_FATAL(tu_sh("cp %s %s", base, work) == 0);
	c.fd = open(work, O_RDWR);
	CU_ASSERT_FATAL(c.fd >= 0);
	err[0] = 0;
	if (op == 'd')
		ret = qcow2_snapshot_delete_io(&io, work, NULL, target, &sn, NULL, err, errlen);
	else
		ret = qcow2_snapshot_apply_io(&io, work, target, err, errlen);
	close(c.fd);
	if (fail_at >= 0) {
		CU_ASSERT(c.failed);
		CU_ASSERT(ret == 0 || ret == -ENOSPC);
	} else {
		CU_ASSERT(ret == 0 || c.crashed);
	}
	*writes = c.writes;
	return ret;
}

/*
 * Every write of the delete or apply fails in turn (@crash false: the call
 * returns, having undone what it could, and the process goes on), or the
 * process dies after each write (@crash true). Failed: `qemu-img check`
 * finds no ERROR (leaks only); the snapshot is gone (delete) or the active
 * layer reverted (apply) iff the call returned 0, the other snapshots and
 * the active layer hold what they held; the image stays usable (a write
 * over shared clusters, check again). Crashed: no ERROR but COPIED set on a
 * cluster whose refcount is too high only by a leak (two writes in two
 * clusters cannot change a refcount and a COPIED flag at once: see
 * qcow2fmt/snapshot.c), clean after `qemu-img check -r leaks`, the data as
 * after the call or as before it.
 */
static void two_every_write(char op, const char *target, bool crash, const char *opts)
{
	const char *other = strcmp(target, "keep") ? "keep" : "s2";
	char base[300], work[300], out[300], list[300], err[300], pt[40], po[40];
	unsigned total = 0, w, nfailed = 0, ncopied = 0;

	snprintf(pt, sizeof(pt), " %s ", target);
	snprintf(po, sizeof(po), " %s ", other);
	make_two(base, work, opts);
	snprintf(out, sizeof(out), "%s/check.txt", dir);
	snprintf(list, sizeof(list), "%s/snapshots.txt", dir);
	CU_ASSERT_FATAL(run_two(base, work, op, target, -1, -1, &total, err, sizeof(err)) == 0);
	CU_ASSERT(tu_sh("qemu-img check %s >/dev/null 2>&1", work) == 0);
	for (long n = 0; n < (long)total + crash; n++) {
		int ret = run_two(base, work, op, target, crash ? n : -1, crash ? -1 : n, &w, err,
				  sizeof(err));
		bool listed, errors, reverted;
		int st;

		nfailed += ret < 0;
		st = tu_sh("qemu-img check %s >%s 2>&1", work, out);
		if (crash) {
			errors = file_has(out, "ERROR", "OFLAG_COPIED", true) ||
				 shared_copied(out, cbits);
			ncopied += file_has(out, "ERROR OFLAG_COPIED", NULL, true);
		} else {
			errors = file_has(out, "ERROR", NULL, true) || (st != 0 && st != 3);
		}
		if (errors) {
			fprintf(stderr, "%s %s, %s write %ld (ret %d: %s): qemu-img check:\n",
				op == 'd' ? "delete" : "apply", target,
				crash ? "crash after" : "failed", n, ret, err);
			tu_sh("grep -v '^Leaked' %s | head -5 >&2", out);
		}
		CU_ASSERT(!errors);
		if (crash)
			CU_ASSERT(tu_sh("qemu-img check -r leaks %s >/dev/null 2>&1 && "
					"qemu-img check %s >/dev/null 2>&1",
					work, work) == 0);
		tu_sh("qemu-img snapshot -l %s >%s 2>/dev/null", work, list);
		listed = file_has(list, pt, NULL, false);
		CU_ASSERT(file_has(list, po, NULL, false));
		CU_ASSERT(holds(work, other, strcmp(other, "keep") ? "s2.raw" : "keep.raw"));
		CU_ASSERT(!listed ||
			  holds(work, target, strcmp(target, "keep") ? "s2.raw" : "keep.raw"));
		if (op == 'd') {
			CU_ASSERT(crash ? ret < 0 || !listed : listed == (ret < 0));
			CU_ASSERT(holds(work, NULL, "act.raw"));
		} else {
			reverted =
			    holds(work, NULL, strcmp(target, "keep") ? "s2.raw" : "keep.raw");
			CU_ASSERT(listed);
			CU_ASSERT(reverted || holds(work, NULL, "act.raw"));
			CU_ASSERT(crash || reverted == (ret == 0));
			/* not reverted, and all its raises written: lowered again */
			if (!crash && ret < 0 && !strstr(err, "refcount block"))
				CU_ASSERT(st == 0);
		}
		if (crash)
			continue;
		/* usable: overwrite clusters the snapshots share, check, read back */
		CU_ASSERT(tu_sh("qemu-io -c 'write -P 0x45 256k 2M' %s >/dev/null 2>&1 && "
				"qemu-io -r -c 'read -P 0x45 256k 2M' %s | grep -q '^read '",
				work, work) == 0);
		st = tu_sh("qemu-img check %s >%s 2>&1", work, out);
		errors = file_has(out, "ERROR", NULL, true) || (st != 0 && st != 3);
		if (errors)
			fprintf(stderr, "%s %s, write %ld failed: errors after writing on\n",
				op == 'd' ? "delete" : "apply", target, n);
		CU_ASSERT(!errors);
		CU_ASSERT(holds(work, other, strcmp(other, "keep") ? "s2.raw" : "keep.raw"));
	}
	fprintf(stderr,
		"%s %s (%s): %s each of %u writes: %u calls failed, %u results with COPIED on a "
		"leak\n",
		op == 'd' ? "delete" : "apply", target, opts, crash ? "crashed after" : "failed",
		total, nfailed, ncopied);
}

/* 4 KiB clusters: one refcount block, an L2 table per 2 MiB */
#define TWO_4K "cluster_size=4096"
/* 512-byte clusters: a refcount block per 256 clusters, an L2 table per 32 KiB */
#define TWO_512 "cluster_size=512"

static void test_delete_fail(void)
{
	two_every_write('d', "keep", false, TWO_4K);
	two_every_write('d', "s2", false, TWO_4K);
	two_every_write('d', "keep", false, TWO_512);
	two_every_write('d', "s2", false, TWO_512);
}

static void test_apply_fail(void)
{
	two_every_write('a', "keep", false, TWO_4K);
	two_every_write('a', "s2", false, TWO_4K);
	two_every_write('a', "s2", false, TWO_512);
}

/*
 * Each write fails having written its first half: a failed write of the new
 * L1 table may have left part of it on disk, so the apply must not take its
 * refcount raises back (the half-written table names the snapshot's
 * clusters): it writes the table whole again (settle) and is done.
 */
static void test_apply_fail_torn(void)
{
	g_tear = true;
	two_every_write('a', "keep", false, TWO_4K);
	two_every_write('a', "s2", false, TWO_512);
	g_tear = false;
}

static void test_delete_crash_two(void)
{
	two_every_write('d', "keep", true, TWO_4K);
	two_every_write('d', "s2", true, TWO_4K);
	two_every_write('d', "s2", true, TWO_512);
}

static void test_apply_crash_two(void)
{
	two_every_write('a', "keep", true, TWO_4K);
	two_every_write('a', "s2", true, TWO_4K);
	two_every_write('a', "s2", true, TWO_512);
}

int main(void)
{
	const char *skip = NULL;
	CU_pSuite s;
	unsigned fails;

	if (tu_sh("command -v qemu-img >/dev/null && command -v qemu-io >/dev/null") != 0)
		skip = "qemu-img or qemu-io not installed";
	if (tu_mkdtemp(dir, sizeof(dir), "qsnap") < 0)
		return 1;
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("qcow2 snapshots", NULL, NULL);
	tu_add_test(s, "create: crash after every write", test_create_crash, skip);
	tu_add_test(s, "delete: crash after every write", test_delete_crash, skip);
	tu_add_test(s, "apply: crash after every write", test_apply_crash, skip);
	tu_add_test(s, "create growing the refcount table: crash after every write",
		    test_create_grow_crash, skip);
	tu_add_test(s, "create: each write fails in turn, no errors, image usable",
		    test_create_fail, skip);
	tu_add_test(s, "create growing the refcount table: each write fails in turn",
		    test_create_grow_fail, skip);
	tu_add_test(s, "create: a crash after each write of a failed create's undo",
		    test_create_undo_crash, skip);
	tu_add_test(s, "bitmap add (new extension): crash after every write", test_bitmap_add_first,
		    skip);
	tu_add_test(s, "bitmap add: crash after every write", test_bitmap_add, skip);
	tu_add_test(s, "bitmap clear: crash after every write", test_bitmap_clear, skip);
	tu_add_test(s, "bitmap merge: crash after every write", test_bitmap_merge, skip);
	tu_add_test(s, "bitmaps in use (resize): crash after every write", test_bitmap_all_in_use,
		    skip);
	tu_add_test(s, "bitmap disable: crash after every write", test_bitmap_disable, skip);
	tu_add_test(s, "bitmap remove (the last): crash after every write", test_bitmap_remove_last,
		    skip);
	tu_add_test(s, "apply: refused with persistent bitmaps, as qemu-img", test_apply_bitmaps,
		    skip);
	tu_add_test(s, "delete (two snapshots, compressed): each write fails in turn",
		    test_delete_fail, skip);
	tu_add_test(s, "apply (two snapshots, compressed): each write fails in turn",
		    test_apply_fail, skip);
	tu_add_test(s, "apply (two snapshots, compressed): each write fails half written",
		    test_apply_fail_torn, skip);
	tu_add_test(s, "delete (two snapshots, compressed): crash after every write",
		    test_delete_crash_two, skip);
	tu_add_test(s, "apply (two snapshots, compressed): crash after every write",
		    test_apply_crash_two, skip);
	fails = tu_cunit_run();
	tu_sh("rm -rf %s", dir);
	if (skip && !fails)
		return 77;
	return fails ? 1 : 0;
}
