/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target: opening, validating and repairing a qcow2 image file.
 * The input is the whole image file. It goes through what vqcowd and
 * vqcow-img do with an image they are given:
 *   1. qcow2_header_parse() on the first bytes (pure header/extension
 *      validation), and qcow2_snapshot_parse() on every snapshot entry it
 *      leads to;
 *   2. on an in-memory image (struct qcow2_io over a buffer): the
 *      synchronous open (qcow2_oimg_open: header, L1, refcount and snapshot
 *      tables), the check (vqcow-img check: L1/L2 tables, refcount table and
 *      blocks, snapshots and their tables, bitmaps), then a repair
 *      (vqcow-img check -r all) on a copy that may grow to 16 MiB;
 *   3. from a memfd, the engine's read-only open (vqcowd): header, L1, refcount and
 *      snapshot tables, bitmaps, the background L2 prefetch over io_uring,
 *      then read mappings of the start of the disk (L2 slices loaded and
 *      their entries checked), and close.
 * The seeds (corpus/fuzz_qcow2_open) are small images made by qemu-img.
 *
 * Checked beyond "no crash, no sanitizer report, no hang": an error return
 * always comes with a message; a header that parsed has sane derived values;
 * a repair that reports success leaves an image the check finds clean;
 * mapped extents are contiguous, non-empty and inside the disk; a parked map
 * is woken; nothing is left in flight after close; the read-only open leaves
 * the file byte for byte as it was; and the engine maps every range of an
 * image the checker finds free of corruption (the checker and the engine
 * must agree; one known difference is left out, see offline()).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format.h"
#include "image.h"
#include "io.h"
#include "qcow2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define die(...)                                                                                   \
	do {                                                                                       \
		fprintf(stderr, "fuzz_qcow2_open: " __VA_ARGS__);                                  \
		fputc('\n', stderr);                                                               \
		abort();                                                                           \
	} while (0)

static struct io_loop *g_loop;
static int g_fd = -1;

static void quiet_msg(void *opaque, enum qcow2_msg_level level, const char *text)
{
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	g_fd = memfd_create("fuzz-qcow2", MFD_CLOEXEC);
	if (g_fd < 0)
		die("memfd: %s", strerror(errno));
	/* The engine needs an io_uring loop; without one only steps 1-2 run. */
	if (io_loop_init(&g_loop, 64) < 0)
		g_loop = NULL;
	return 0;
}

static void parse_header(const uint8_t *data, size_t size)
{
	static struct qcow2_header_info h;
	char err[512] = "";
	int ret = qcow2_header_parse(data, size, size, &h, err, sizeof(err));

	if (ret == -ENOBUFS)
		return; /* cannot happen with the whole file, but is allowed */
	if (ret < 0) {
		if (!err[0])
			die("qcow2_header_parse: %d without a message", ret);
		return;
	}
	if (h.cluster_size != 1u << h.cluster_bits || h.cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
	    h.cluster_bits > QCOW2_MAX_CLUSTER_BITS || h.l2_entries != 1u << h.l2_bits ||
	    h.refcount_bits != 1u << h.refcount_order || h.l1_size < h.l1_needed)
		die("inconsistent header info after a successful parse");
	/* the snapshot table, as the tools walk it */
	if (h.nb_snapshots && h.snapshots_offset < size) {
		uint64_t off = h.snapshots_offset;

		for (uint32_t i = 0; i < h.nb_snapshots && off < size; i++) {
			struct qcow2_snapshot_info si;

			if (qcow2_snapshot_parse(data + off, size - off, h.version, &si, err,
						 sizeof(err)) < 0)
				break;
			if (si.raw_len > size - off || si.entry_len < si.raw_len)
				die("snapshot entry %u: length %u beyond the %zu bytes given", i,
				    si.raw_len, (size_t)(size - off));
			off += si.entry_len;
		}
	}
}

/* ---- an in-memory image file ---- */

#define MEM_MAX (16u << 20) /* a repair may append; beyond this, writes fail */

struct memfile {
	uint8_t *buf;
	size_t len, cap;
};

static int mem_read(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct memfile *m = opaque;
	size_t n = off < m->len ? m->len - off : 0;

	if (n > len)
		n = len;
	if (n)
		memcpy(buf, m->buf + off, n);
	memset((uint8_t *)buf + n, 0, len - n); /* past EOF: zeroes */
	return 0;
}

static int mem_write(void *opaque, const void *buf, size_t len, uint64_t off)
{
	struct memfile *m = opaque;

	if (off > MEM_MAX || len > MEM_MAX - off)
		return -EFBIG;
	if (off + len > m->cap) {
		size_t cap = off + len + (64u << 10);
		uint8_t *b = realloc(m->buf, cap);

		if (!b)
			return -ENOMEM;
		m->buf = b;
		m->cap = cap;
	}
	if (off > m->len)
		memset(m->buf + m->len, 0, off - m->len);
	memcpy(m->buf + off, buf, len);
	if (off + len > m->len)
		m->len = off + len;
	return 0;
}

static int mem_sync(void *opaque)
{
	return 0;
}

static int mem_size(void *opaque, uint64_t *size)
{
	*size = ((struct memfile *)opaque)->len;
	return 0;
}

/* Returns true when the check ran and found no corruption (leaks allowed). */
static bool offline(const uint8_t *data, size_t size)
{
	struct memfile m = {.buf = malloc(size ? size : 1), .len = size, .cap = size ? size : 1};
	struct qcow2_io ro = {.read = mem_read, .size = mem_size, .opaque = &m};
	struct qcow2_io rw = {mem_read, mem_write, mem_sync, mem_size, &m, false};
	struct qcow2_tool_cb cb = {.msg = quiet_msg};
	struct qcow2_check_result res;
	struct qcow2_oimg im;
	char err[512] = "";
	bool clean = false, partial_l2 = false;
	int ret;

	if (!m.buf)
		die("out of memory");
	memcpy(m.buf, data, size);
	memset(&im, 0, sizeof(im));
	ret = qcow2_oimg_open(&im, &ro, "fuzz.qcow2", false, err, sizeof(err));
	if (ret < 0 && ret != -ENOTSUP && !err[0])
		die("qcow2_oimg_open: %d without a message", ret);
	/*
	 * A known difference: an L2 table that starts inside the file but ends
	 * past it is fine for the checker (as for qemu-img check; reads past
	 * the end give zeroes) while the engine refuses it (its metadata reads
	 * fail past the end of the file). Such images are left out of the
	 * checker-vs-engine comparison below until the two agree.
	 */
	for (uint32_t i = 0; ret == 0 && i < im.h.l1_size; i++) {
		uint64_t l2 = im.l1[i] & QCOW2_L1E_OFFSET_MASK;

		if (l2 && l2 < size && l2 + im.h.cluster_size > size)
			partial_l2 = true;
	}
	qcow2_oimg_close(&im);

	memset(&res, 0, sizeof(res));
	err[0] = 0;
	ret = qcow2_check_io(&ro, "fuzz.qcow2", 0, &res, &cb, err, sizeof(err));
	if (ret < 0 && ret != -ENOTSUP && !err[0])
		die("qcow2_check_io: %d without a message", ret);
	clean = ret == 0 && !res.check_errors && !res.corruptions && !partial_l2;
	if (ret < 0 || (!res.corruptions && !res.leaks))
		goto out;

	/* repair (-r all), then the image must check clean */
	memset(&res, 0, sizeof(res));
	err[0] = 0;
	ret = qcow2_check_io(&rw, "fuzz.qcow2", QCOW2_CHECK_FIX_LEAKS | QCOW2_CHECK_FIX_ERRORS,
			     &res, &cb, err, sizeof(err));
	if (ret < 0 && !err[0])
		die("repair: %d without a message", ret);
	if (ret == 0 && !res.check_errors && !res.corruptions) {
		memset(&res, 0, sizeof(res));
		err[0] = 0;
		ret = qcow2_check_io(&ro, "fuzz.qcow2", 0, &res, &cb, err, sizeof(err));
		if (ret < 0 || res.check_errors || res.corruptions || res.leaks)
			die("the repair reported success but a new check finds %d: %llu "
			    "corruptions, "
			    "%llu leaks, %llu check errors (%s)",
			    ret, (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
			    (unsigned long long)res.check_errors, err);
	}
out:
	free(m.buf);
	return clean;
}

static void woken(struct qcow2_waiter *w)
{
	*(bool *)w->priv = true;
}

/* Run the loop until @flag is set or nothing is in flight; false if never set. */
static bool run_until(bool *flag)
{
	for (unsigned i = 0; i < 10000 && !*flag; i++) {
		if (!io_loop_inflight(g_loop))
			break;
		if (io_loop_run_once(g_loop, true) < 0)
			die("io_loop_run_once failed");
	}
	return *flag;
}

/* Map the start of the disk as a read would: the L2 tables are loaded and checked. */
static void map_some(struct qcow2 *q, bool clean)
{
	uint64_t size = qcow2_size(q), off = 0;

	for (unsigned step = 0; step < 256 && off < size; step++) {
		struct qcow2_extent ext[16];
		bool woke = false;
		struct qcow2_waiter w = {.wake = woken, .priv = &woke};
		int n = qcow2_map_read(q, off, size - off, ext, 16, &w);

		if (n == -EAGAIN) {
			if (!run_until(&woke))
				die("map_read parked at %llu and was never woken",
				    (unsigned long long)off);
			continue;
		}
		if (n < 0 && clean)
			die("the checker finds no corruption but mapping offset %llu fails: %d",
			    (unsigned long long)off, n);
		if (n < 0)
			return; /* -EIO: this range is corrupt; the engine said so */
		if (n == 0 || n > 16)
			die("map_read returned %d extents", n);
		for (int i = 0; i < n; i++) {
			if (ext[i].off != off || ext[i].len == 0 || ext[i].len > size - off ||
			    ext[i].type < QCOW2_MAP_DATA || ext[i].type > QCOW2_MAP_COMPRESSED)
				die("bad extent %d at %llu: off %llu len %llu type %u", i,
				    (unsigned long long)off, (unsigned long long)ext[i].off,
				    (unsigned long long)ext[i].len, ext[i].type);
			off += ext[i].len;
		}
	}
}

static void engine_open(bool clean)
{
	struct qcow2_opts o = {.read_only = true, .l2_cache_size = 1u << 20};
	struct io_file f;
	struct qcow2 *q = NULL;
	char err[512] = "";
	bool never = false;
	int fd, ret;

	if (!g_loop)
		return;
	fd = dup(g_fd);
	if (fd < 0 || io_file_from_fd(&f, fd, IO_FILE_RDONLY) < 0)
		die("io_file_from_fd failed");
	ret = qcow2_open(&q, g_loop, &f, "fuzz.qcow2", &o, err, sizeof(err));
	if (ret < 0) {
		if (!err[0])
			die("qcow2_open: %d without a message", ret);
	} else {
		run_until(&never); /* let the background L2 prefetch read what it wants */
		map_some(q, clean);
		qcow2_close(q);
	}
	if (io_loop_inflight(g_loop))
		die("%u commands still in flight after close", io_loop_inflight(g_loop));
	io_file_close(&f);
}

/* A read-only open must leave the file exactly as it was. */
static void check_unchanged(const uint8_t *data, size_t size)
{
	static uint8_t buf[1u << 20];
	struct stat st;
	size_t off = 0;

	if (fstat(g_fd, &st) < 0 || (uint64_t)st.st_size != size)
		die("the read-only open changed the file size to %lld (was %zu)",
		    (long long)st.st_size, size);
	while (off < size) {
		size_t n = size - off < sizeof(buf) ? size - off : sizeof(buf);

		if (pread(g_fd, buf, n, (off_t)off) != (ssize_t)n)
			die("pread of the memfd failed");
		if (memcmp(buf, data + off, n) != 0)
			die("the read-only open wrote into the image near offset %zu", off);
		off += n;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	bool clean;

	if (ftruncate(g_fd, 0) < 0 || pwrite(g_fd, data, size, 0) != (ssize_t)size)
		die("memfd write failed");
	parse_header(data, size);
	clean = offline(data, size);
	engine_open(clean);
	check_unchanged(data, size);
	return 0;
}
