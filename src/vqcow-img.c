/* SPDX-License-Identifier: MIT */
/*
 * vqcow-img — offline image tool: create, info, check, map, convert, resize.
 *
 * Command line and output follow qemu-img (so either tool can check the
 * other): `create [-f qcow2|raw] [-o opts] [-b backing] [-F fmt] FILE [SIZE]`,
 * `info [-f fmt] [--output=human|json] FILE`, `check [-f fmt] [-r leaks|all]
 * [--output=human|json] [-q] FILE`, `map [-f fmt] [--output=human|json] FILE`,
 * `convert [-f fmt] [-O fmt] [-o opts] [-c] [-p] [-S size] SRC DST`,
 * `commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] [-r rate] FILE` (...).
 * check exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks
 * only, 63 format without consistency checks.
 *
 * The work is done by qcow2tool/qcow2tool.h; this file parses arguments, prints
 * results and progress (-p: qemu-img's progress lines, one printer: progress_*).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "img.h"
#include "qcow2tool.h"
#include "util.h"
#include "vlog.h"

#define ERRLEN 512

enum output_fmt { OUT_HUMAN, OUT_JSON };

static const char *prog = "vqcow-img";

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: %s COMMAND [options]\n"
	    "\n"
	    "  create [-f qcow2|raw] [-o OPTIONS] [-b BACKING] [-F BACKING_FMT] [-q] [-p] FILE "
	    "[SIZE]\n"
	    "      OPTIONS (comma separated): cluster_size=, "
	    "preallocation=off|metadata|falloc|full,\n"
	    "      extended_l2=on|off, refcount_bits=, backing_file=, backing_fmt=,\n"
	    "      compat=0.10|1.1|v2|v3, lazy_refcounts=on|off, compression_type=zlib|zstd, "
	    "size=\n"
	    "      SIZE accepts the suffixes K, M, G, T, P, E (powers of 1024); without SIZE\n"
	    "      the backing file's size is used.\n"
	    "  info [-f FMT] [-U] [--output=human|json] FILE\n"
	    "  check [-f FMT] [-U] [-r leaks|all] [--output=human|json] [-q] [-p] FILE\n"
	    "      exit status: 0 no errors, 1 check not completed, 2 corruptions,\n"
	    "      3 leaked clusters only, 63 format without consistency checks\n"
	    "  map [-f FMT] [-U] [--output=human|json] FILE\n"
	    "  snapshot [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE\n"
	    "      internal snapshots of a qcow2 image: list, apply (revert to, by ID or\n"
	    "      name), create, delete (by name), as qemu-img snapshot does\n"
	    "      -U, --force-share: open even if another process writes the image\n"
	    "      (read-only commands only; otherwise the image is locked as qemu-img locks it)\n"
	    "  bitmap (--add | --remove | --clear | --enable | --disable)... [-g GRANULARITY]\n"
	    "         [-f qcow2] FILE BITMAP\n"
	    "      persistent dirty bitmaps of a qcow2 image, as qemu-img bitmap: the\n"
	    "      operations in the order given; -g (bytes, a power of two >= 512, suffixes\n"
	    "      as SIZE) with --add only (default: the cluster size within 4K..64K);\n"
	    "      --merge is not supported\n"
	    "  convert [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-c] [-p] [-q] [-S SIZE] [-U]\n"
	    "          [-l snapshot.id=ID,snapshot.name=NAME | -l ID_OR_NAME] SRC DST\n"
	    "      copy SRC (through its backing chain) into a new image DST (overwritten);\n"
	    "      -l copies that internal snapshot of SRC instead of its current state,\n"
	    "      -O output format (default raw), -o create's OPTIONS (not size, backing),\n"
	    "      -c compressed clusters (qcow2; -o compression_type=zlib|zstd),\n"
	    "      -S zero runs of SIZE bytes (default 4k) become holes, 0 writes every byte\n"
	    "  resize [-f FMT] [-q] [--shrink] [--preallocation=off] FILE [+|-]SIZE\n"
	    "      grow the image to SIZE (or by +SIZE); shrinking is refused\n"
	    "  commit [-q] [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-r RATE_LIMIT] FILE\n"
	    "      copy what FILE (and its backing files above BASE) hold into BASE (default:\n"
	    "      FILE's backing file; grown to FILE's size if smaller), then empty FILE;\n"
	    "      -d keeps FILE as it is (-b implies -d), -r bytes per second\n"
	    "  rebase -u [-f FMT] [-b BACKING] [-F BACKING_FMT] [-q] FILE\n"
	    "      change the backing file recorded in FILE's header (-b \"\" or none: no\n"
	    "      backing file); only unsafe mode (-u): the data is not looked at\n"
	    "  -p: show progress (create, check, convert), -q: quiet\n"
	    "\n"
	    "  --help, --version\n",
	    prog);
}

static void errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void errorf(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* The message a tool function left in @err, else the text of its -errno @r. */
static const char *reason(const char *err, int r)
{
	return err[0] ? err : strerror(-r);
}

/* -f FMT, if given, must be qcow2 or raw: true after printing why not. */
static bool bad_fmt(const char *fmt)
{
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		errorf("Unknown or unsupported format '%s'", fmt);
		return true;
	}
	return false;
}

/*
 * ---- progress (-p), the one printer of every long command ----
 * qemu-img's format on stdout: "    (12.34/100%)" ended by '\r', printed at the
 * start, each time it moved by at least 1% and at 100%, then a newline.
 * A command passes progress_cb/&state as its qcow2_tool_cb progress.
 */

struct progress {
	bool on;
	double last; /* last percentage printed, -1 = none */
};

static void progress_print(struct progress *p, double pct)
{
	printf("    (%3.2f/100%%)\r", pct);
	fflush(stdout);
	p->last = pct;
}

static void progress_cb(void *opaque, double fraction)
{
	struct progress *p = opaque;
	double pct;

	if (!p || !p->on)
		return;
	pct = (fraction < 0 ? 0 : fraction > 1 ? 1 : fraction) * 100;
	if (pct == p->last || (pct < p->last + 1 && pct < 100))
		return;
	progress_print(p, pct);
}

/* Start showing progress if @on (-p and not -q). */
static void progress_init(struct progress *p, bool on)
{
	p->on = on;
	p->last = -1;
	if (on)
		progress_print(p, 0);
}

/* End the progress line (@ok: the command completed, so it shows 100%). */
static void progress_end(struct progress *p, bool ok)
{
	if (!p->on)
		return;
	if (ok && p->last < 100)
		progress_print(p, 100);
	printf("\n");
	fflush(stdout);
	p->on = false;
}

/* qemu's size_to_str(): three significant digits and a binary unit. */
static void size_str(uint64_t v, char *buf, size_t len)
{
	static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
	unsigned i = 0;
	double d = (double)v;

	while (d >= 1024 * 0.95 && i < 6) {
		d /= 1024;
		i++;
	}
	if (i == 0)
		snprintf(buf, len, "%" PRIu64 " B", v);
	else
		snprintf(buf, len, "%0.3g %s", d, units[i]);
}

static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c == '\t')
			fputs("\\t", f);
		else if (c < 0x20 || c == 0x7f)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static const char *yesno(bool b)
{
	return b ? "true" : "false";
}

/* ---- create ---- */

static int parse_onoff(const char *key, const char *v, bool *out)
{
	if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes")) {
		*out = true;
		return 0;
	}
	if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no")) {
		*out = false;
		return 0;
	}
	errorf("Parameter '%s' expects 'on' or 'off', not '%s'", key, v);
	return -EINVAL;
}

struct create_args {
	struct qcow2_create_opts o;
	bool raw;
	bool cluster_set, ext_set, refbits_set, compat_set, lazy_set, ctype_set;
	char *strings[8]; /* owned copies (backing names) */
	unsigned nstrings;
};

static char *keep_str(struct create_args *ca, const char *s)
{
	char *d = strdup(s);

	if (d && ca->nstrings < sizeof(ca->strings) / sizeof(ca->strings[0]))
		ca->strings[ca->nstrings++] = d;
	return d;
}

static int create_opt(struct create_args *ca, const char *key, const char *val)
{
	uint64_t v;

	if (!strcmp(key, "size")) {
		if (util_parse_size(val, &v)) {
			errorf("Invalid image size specified: '%s'", val);
			return -EINVAL;
		}
		ca->o.size = v;
		ca->o.size_set = true;
	} else if (!strcmp(key, "cluster_size")) {
		if (util_parse_size(val, &v) || v > UINT32_MAX) {
			errorf("Invalid cluster_size '%s'", val);
			return -EINVAL;
		}
		ca->o.cluster_size = (uint32_t)v;
		ca->cluster_set = true;
	} else if (!strcmp(key, "preallocation")) {
		if (!strcmp(val, "off"))
			ca->o.prealloc = QCOW2_PREALLOC_OFF;
		else if (!strcmp(val, "metadata"))
			ca->o.prealloc = QCOW2_PREALLOC_METADATA;
		else if (!strcmp(val, "falloc"))
			ca->o.prealloc = QCOW2_PREALLOC_FALLOC;
		else if (!strcmp(val, "full"))
			ca->o.prealloc = QCOW2_PREALLOC_FULL;
		else {
			errorf("Invalid preallocation mode: '%s' (off, metadata, falloc or full)",
			       val);
			return -EINVAL;
		}
	} else if (!strcmp(key, "extended_l2")) {
		if (parse_onoff(key, val, &ca->o.extended_l2))
			return -EINVAL;
		ca->ext_set = true;
	} else if (!strcmp(key, "lazy_refcounts")) {
		if (parse_onoff(key, val, &ca->o.lazy_refcounts))
			return -EINVAL;
		ca->lazy_set = true;
	} else if (!strcmp(key, "refcount_bits")) {
		char *end;
		unsigned long n;

		errno = 0;
		n = strtoul(val, &end, 10);
		if (errno || *end || end == val || n == 0 || n > 64 || (n & (n - 1))) {
			errorf("Refcount width must be a power of two and may not exceed 64 bits: "
			       "'%s'",
			       val);
			return -EINVAL;
		}
		ca->o.refcount_bits = (unsigned)n;
		ca->refbits_set = true;
	} else if (!strcmp(key, "compat")) {
		if (!strcmp(val, "0.10") || !strcmp(val, "v2"))
			ca->o.version = 2;
		else if (!strcmp(val, "1.1") || !strcmp(val, "v3"))
			ca->o.version = 3;
		else {
			errorf("Invalid compatibility level: '%s' (0.10, 1.1, v2 or v3)", val);
			return -EINVAL;
		}
		ca->compat_set = true;
	} else if (!strcmp(key, "compression_type")) {
		if (!strcmp(val, "zlib"))
			ca->o.compression_type = QCOW2_COMPRESSION_ZLIB;
		else if (!strcmp(val, "zstd"))
			ca->o.compression_type = QCOW2_COMPRESSION_ZSTD;
		else {
			errorf("Invalid compression_type: '%s' (zlib or zstd)", val);
			return -EINVAL;
		}
		ca->ctype_set = true;
	} else if (!strcmp(key, "backing_file")) {
		if (!(ca->o.backing_file = keep_str(ca, val)))
			return -ENOMEM;
	} else if (!strcmp(key, "backing_fmt")) {
		if (!(ca->o.backing_fmt = keep_str(ca, val)))
			return -ENOMEM;
	} else {
		errorf("Invalid parameter '%s'", key);
		return -EINVAL;
	}
	return 0;
}

/* Parse "k=v,k=v" (",," is a literal comma inside a value). */
static int create_opts_parse(struct create_args *ca, const char *s)
{
	size_t n = strlen(s);
	char *buf = malloc(n + 1);
	size_t i = 0;
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	while (i <= n && !ret) {
		size_t o = 0;
		char *eq;

		/* one item into buf, unescaping ",," */
		while (i < n) {
			if (s[i] == ',') {
				if (i + 1 < n && s[i + 1] == ',') {
					buf[o++] = ',';
					i += 2;
					continue;
				}
				break;
			}
			buf[o++] = s[i++];
		}
		buf[o] = 0;
		i++; /* skip the separator (or the terminator) */
		if (!o)
			continue;
		if (!strcmp(buf, "help") || !strcmp(buf, "?")) {
			usage(stdout);
			ret = -ECANCELED;
			break;
		}
		eq = strchr(buf, '=');
		if (!eq) {
			errorf("Invalid option '%s': expected key=value", buf);
			ret = -EINVAL;
			break;
		}
		*eq = 0;
		ret = create_opt(ca, buf, eq + 1);
	}
	free(buf);
	return ret;
}

static int cmd_create(int argc, char **argv)
{
	static const struct option lopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	struct create_args ca;
	const char *fmt = "qcow2", *file;
	struct progress prog_state;
	struct qcow2_tool_cb cb = {.progress = progress_cb, .opaque = &prog_state};
	char err[ERRLEN] = "";
	bool quiet = false, show_progress = false;
	int c, ret = 1, r;
	unsigned i;

	memset(&ca, 0, sizeof(ca));
	while ((c = getopt_long(argc, argv, "+f:o:b:F:qph", lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'o':
			r = create_opts_parse(&ca, optarg);
			if (r == -ECANCELED) {
				ret = 0;
				goto out_strings;
			}
			if (r)
				goto out_strings;
			break;
		case 'b':
			if (!(ca.o.backing_file = keep_str(&ca, optarg)))
				goto out_strings;
			break;
		case 'F':
			if (!(ca.o.backing_fmt = keep_str(&ca, optarg)))
				goto out_strings;
			break;
		case 'q':
			quiet = true;
			break;
		case 'p':
			show_progress = true;
			break;
		case 'h':
			usage(stdout);
			ret = 0;
			goto out_strings;
		default:
			usage(stderr);
			goto out_strings;
		}
	}
	if (optind >= argc) {
		errorf("Expecting image file name");
		goto out_strings;
	}
	file = argv[optind++];
	if (optind < argc) {
		if (util_parse_size(argv[optind], &ca.o.size)) {
			errorf("Invalid image size specified: '%s'. You may use k, M, G, T, P or E "
			       "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes "
			       "and "
			       "exabytes.",
			       argv[optind]);
			goto out_strings;
		}
		ca.o.size_set = true;
		optind++;
	}
	if (optind < argc) {
		errorf("Unexpected argument: '%s'", argv[optind]);
		goto out_strings;
	}
	if (!strcmp(fmt, "raw")) {
		if (ca.cluster_set || ca.ext_set || ca.refbits_set || ca.compat_set ||
		    ca.lazy_set || ca.ctype_set || ca.o.backing_file || ca.o.backing_fmt) {
			errorf("raw images only support the preallocation and size options");
			goto out_strings;
		}
		if (!ca.o.size_set) {
			errorf("Image creation needs a size parameter");
			goto out_strings;
		}
		progress_init(&prog_state, show_progress && !quiet);
		r = qcow2_create_raw(file, ca.o.size, ca.o.prealloc, &cb, err, sizeof(err));
	} else if (!strcmp(fmt, "qcow2")) {
		progress_init(&prog_state, show_progress && !quiet);
		r = qcow2_create(file, &ca.o, &cb, err, sizeof(err));
	} else {
		errorf("Unknown or unsupported format '%s' (qcow2 or raw)", fmt);
		goto out_strings;
	}
	progress_end(&prog_state, r >= 0);
	if (r < 0) {
		errorf("%s: %s", file, reason(err, r));
		goto out_strings;
	}
	if (!quiet) {
		char sz[64];
		size_str(ca.o.size, sz, sizeof(sz));
		printf("Formatting '%s', fmt=%s", file, fmt);
		if (ca.o.size_set)
			printf(" size=%" PRIu64, ca.o.size);
		if (ca.o.backing_file)
			printf(" backing_file=%s", ca.o.backing_file);
		if (ca.o.backing_fmt)
			printf(" backing_fmt=%s", ca.o.backing_fmt);
		printf("\n");
	}
	ret = 0;
out_strings:
	for (i = 0; i < ca.nstrings; i++)
		free(ca.strings[i]);
	return ret;
}

/* ---- info ---- */

static int parse_output(const char *arg, enum output_fmt *out)
{
	if (!strcmp(arg, "json"))
		*out = OUT_JSON;
	else if (!strcmp(arg, "human"))
		*out = OUT_HUMAN;
	else {
		errorf("--output must be used with human or json as argument.");
		return -EINVAL;
	}
	return 0;
}

static void info_json(const char *file, const struct qcow2_image_info *in)
{
	bool q = !strcmp(in->format, "qcow2");
	unsigned i;

	printf("{\n");
	if (in->nb_snapshots) {
		printf("    \"snapshots\": [\n");
		for (i = 0; i < in->nb_snapshots; i++) {
			const struct qcow2_info_snapshot *s = &in->snapshots[i];
			printf("        {\n");
			if (s->has_icount)
				printf("            \"icount\": %" PRIu64 ",\n", s->icount);
			printf("            \"vm-clock-nsec\": %" PRIu64 ",\n",
			       (uint64_t)(s->vm_clock_nsec % 1000000000u));
			printf("            \"name\": ");
			json_str(stdout, s->name);
			printf(",\n            \"date-sec\": %u,\n", s->date_sec);
			printf("            \"date-nsec\": %u,\n", s->date_nsec);
			printf("            \"vm-clock-sec\": %" PRIu64 ",\n",
			       (uint64_t)(s->vm_clock_nsec / 1000000000u));
			printf("            \"id\": ");
			json_str(stdout, s->id);
			printf(",\n            \"vm-state-size\": %" PRIu64 "\n", s->vm_state_size);
			printf("        }%s\n", i + 1 < in->nb_snapshots ? "," : "");
		}
		printf("    ],\n");
	}
	if (in->backing_fmt) {
		printf("    \"backing-filename-format\": ");
		json_str(stdout, in->backing_fmt);
		printf(",\n");
	}
	printf("    \"virtual-size\": %" PRIu64 ",\n", in->virtual_size);
	printf("    \"filename\": ");
	json_str(stdout, file);
	printf(",\n");
	if (q)
		printf("    \"cluster-size\": %u,\n", in->cluster_size);
	printf("    \"format\": \"%s\",\n", in->format);
	printf("    \"actual-size\": %" PRIu64 ",\n", in->actual_size);
	if (q) {
		printf("    \"format-specific\": {\n");
		printf("        \"type\": \"qcow2\",\n");
		printf("        \"data\": {\n");
		printf("            \"compat\": \"%s\",\n", in->version >= 3 ? "1.1" : "0.10");
		printf("            \"compression-type\": \"%s\",\n",
		       in->compression_type == 1 ? "zstd" : "zlib");
		if (in->version >= 3)
			printf("            \"lazy-refcounts\": %s,\n", yesno(in->lazy_refcounts));
		printf("            \"refcount-bits\": %u", in->refcount_bits);
		if (in->data_file) {
			printf(",\n            \"data-file\": ");
			json_str(stdout, in->data_file);
			printf(",\n            \"data-file-raw\": %s", yesno(in->data_file_raw));
		}
		if (in->version >= 3) {
			printf(",\n            \"corrupt\": %s", yesno(in->corrupt));
			printf(",\n            \"extended-l2\": %s", yesno(in->extended_l2));
		}
		printf("\n        }\n    },\n");
	}
	if (in->full_backing_file && strcmp(in->full_backing_file, in->backing_file)) {
		printf("    \"full-backing-filename\": ");
		json_str(stdout, in->full_backing_file);
		printf(",\n");
	}
	if (in->backing_file) {
		printf("    \"backing-filename\": ");
		json_str(stdout, in->backing_file);
		printf(",\n");
	}
	printf("    \"dirty-flag\": %s\n}\n", yesno(in->dirty));
}

static void clock_str(uint64_t ns, char *buf, size_t len)
{
	uint64_t secs = ns / 1000000000ull;

	snprintf(buf, len, "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64, secs / 3600,
		 (secs / 60) % 60, secs % 60, (ns / 1000000) % 1000);
}

static void info_human(const char *file, const struct qcow2_image_info *in)
{
	char a[64], b[64];
	unsigned i;

	size_str(in->virtual_size, a, sizeof(a));
	size_str(in->actual_size, b, sizeof(b));
	printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\ndisk size: %s\n",
	       file, in->format, a, in->virtual_size, b);
	if (strcmp(in->format, "qcow2"))
		return;
	printf("cluster_size: %u\n", in->cluster_size);
	if (in->backing_file) {
		printf("backing file: %s", in->backing_file);
		if (in->full_backing_file && strcmp(in->full_backing_file, in->backing_file))
			printf(" (actual path: %s)", in->full_backing_file);
		printf("\n");
		if (in->backing_fmt)
			printf("backing file format: %s\n", in->backing_fmt);
	}
	if (in->dirty)
		printf("cleanly shut down: no\n");
	if (in->nb_snapshots) {
		printf("Snapshot list:\n");
		printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
		       "ICOUNT");
		for (i = 0; i < in->nb_snapshots; i++) {
			const struct qcow2_info_snapshot *s = &in->snapshots[i];
			char vms[64], date[32], clk[32], ic[32] = "";
			time_t t = (time_t)s->date_sec;
			struct tm tm;

			size_str(s->vm_state_size, vms, sizeof(vms));
			localtime_r(&t, &tm);
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
			clock_str(s->vm_clock_nsec, clk, sizeof(clk));
			if (s->has_icount)
				snprintf(ic, sizeof(ic), "%" PRIu64, s->icount);
			printf("%-9s %-16s %8s%20s%13s%11s\n", s->id, s->name, vms, date, clk, ic);
		}
	}
	printf("Format specific information:\n");
	printf("    compat: %s\n", in->version >= 3 ? "1.1" : "0.10");
	printf("    compression type: %s\n", in->compression_type == 1 ? "zstd" : "zlib");
	if (in->version >= 3)
		printf("    lazy refcounts: %s\n", yesno(in->lazy_refcounts));
	printf("    refcount bits: %u\n", in->refcount_bits);
	if (in->data_file) {
		printf("    data file: %s\n", in->data_file);
		printf("    data file raw: %s\n", yesno(in->data_file_raw));
	}
	if (in->version >= 3) {
		printf("    corrupt: %s\n", yesno(in->corrupt));
		printf("    extended l2: %s\n", yesno(in->extended_l2));
	}
}

static const struct option common_lopts[] = {
    {"output", required_argument, NULL, 'O'},
    {"help", no_argument, NULL, 'h'},
    {"force-share", no_argument, NULL, 'U'},
    {NULL, 0, NULL, 0},
};

/* What info, check and map take: [-f FMT] [--output=FMT] [-U] FILE (check: -r, -q too). */
struct file_args {
	const char *fmt, *file;
	enum output_fmt out;
	unsigned check_flags; /* -r */
	bool quiet;           /* -q */
	bool force_share;     /* -U */
	bool progress;        /* -p */
};

/*
 * Parse the options in @shortopts (a subset of "+f:r:qhUp") and one file name.
 * 0 = go on, 1 = an error was printed (exit 1), -1 = help was printed (exit 0).
 */
static int parse_file_args(int argc, char **argv, const char *shortopts, struct file_args *a)
{
	int c;

	*a = (struct file_args){.out = OUT_HUMAN};
	while ((c = getopt_long(argc, argv, shortopts, common_lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			a->fmt = optarg;
			break;
		case 'r':
			if (!strcmp(optarg, "leaks"))
				a->check_flags = QCOW2_CHECK_FIX_LEAKS;
			else if (!strcmp(optarg, "all"))
				a->check_flags = QCOW2_CHECK_FIX_LEAKS | QCOW2_CHECK_FIX_ERRORS;
			else {
				errorf(
				    "Unknown option value for -r (expecting 'leaks' or 'all'): %s",
				    optarg);
				return 1;
			}
			break;
		case 'q':
			a->quiet = true;
			break;
		case 'O':
			if (parse_output(optarg, &a->out))
				return 1;
			break;
		case 'U':
			a->force_share = true;
			break;
		case 'p':
			a->progress = true;
			break;
		case 'h':
			usage(stdout);
			return -1;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind + 1 != argc) {
		errorf("Expecting one image file name");
		return 1;
	}
	a->file = argv[optind];
	return 0;
}

/* Take qemu-img's locks for @mode on @a's image; 0, or 1 after printing why not. */
static int lock_file(struct qcow2_locks *locks, const struct file_args *a,
		     enum qcow2_lock_mode mode)
{
	char err[ERRLEN] = "";
	int r = qcow2_lock_image(locks, a->file, a->fmt, mode, a->force_share, err, sizeof(err));

	if (r < 0) {
		errorf("Could not open '%s': %s", a->file, reason(err, r));
		return 1;
	}
	return 0;
}

/* qcow2_info on @a's image: 0, or 1 after printing qemu-img's "Could not open". */
static int open_info(const struct file_args *a, struct qcow2_image_info *info)
{
	char err[ERRLEN] = "";
	int r = qcow2_info(a->file, a->fmt, info, err, sizeof(err));

	if (r < 0) {
		errorf("Could not open '%s': %s", a->file, reason(err, r));
		return 1;
	}
	return 0;
}

static int cmd_info(int argc, char **argv)
{
	struct qcow2_image_info info;
	struct qcow2_locks locks;
	struct file_args a;
	int r;

	r = parse_file_args(argc, argv, "+f:hU", &a);
	if (r)
		return r < 0 ? 0 : 1;
	if (lock_file(&locks, &a, QCOW2_LOCK_INFO))
		return 1;
	r = open_info(&a, &info);
	qcow2_unlock_image(&locks);
	if (r)
		return 1;
	if (a.out == OUT_JSON)
		info_json(a.file, &info);
	else
		info_human(a.file, &info);
	qcow2_image_info_free(&info);
	return 0;
}

/* ---- check ---- */

struct check_ui {
	bool quiet;
	struct progress prog;
};

static void check_msg_cb(void *opaque, enum qcow2_msg_level level, const char *line)
{
	struct check_ui *ui = opaque;

	(void)level;
	if (ui->quiet)
		return;
	/* As qemu-img: findings go to stderr; the summary to stdout. */
	fprintf(stderr, "%s\n", line);
}

static void check_progress_cb(void *opaque, double f)
{
	struct check_ui *ui = opaque;

	progress_cb(&ui->prog, f);
}

static int check_locked(const struct file_args *a);

static int cmd_check(int argc, char **argv)
{
	struct qcow2_locks locks;
	struct file_args a;
	int r;

	r = parse_file_args(argc, argv, "+f:r:qhUp", &a);
	if (r)
		return r < 0 ? 0 : 1;
	if (bad_fmt(a.fmt))
		return 1;
	if (lock_file(&locks, &a, a.check_flags ? QCOW2_LOCK_WRITE : QCOW2_LOCK_READ))
		return 1;
	r = check_locked(&a);
	qcow2_unlock_image(&locks);
	return r;
}

/* check with the locks held. */
static int check_locked(const struct file_args *a)
{
	struct qcow2_check_result res;
	struct check_ui ui;
	struct qcow2_tool_cb cb;
	char err[ERRLEN] = "";
	const char *file = a->file;
	enum output_fmt out = a->out;
	unsigned flags = a->check_flags;
	bool quiet = a->quiet;
	int r;

	{
		/* open it as info does: raw has no checks; a broken qcow2 fails here */
		struct qcow2_image_info info;
		bool raw;

		if (open_info(a, &info))
			return 1;
		raw = !strcmp(info.format, "raw");
		qcow2_image_info_free(&info);
		if (raw) {
			errorf("This image format does not support checks");
			return 63;
		}
	}
	ui.quiet = quiet;
	progress_init(&ui.prog, a->progress && !quiet && out == OUT_HUMAN);
	cb.msg = check_msg_cb;
	cb.progress = check_progress_cb;
	cb.opaque = &ui;
	memset(&res, 0, sizeof(res));
	r = qcow2_check(file, flags, &res, &cb, err, sizeof(err));
	progress_end(&ui.prog, r >= 0);
	if (r < 0) {
		errorf("Check failed: %s: %s", file, reason(err, r));
		return 1;
	}
	if (out == OUT_JSON) {
		printf("{\n");
		if (res.image_end_offset)
			printf("    \"image-end-offset\": %" PRIu64 ",\n", res.image_end_offset);
		if (res.corruptions)
			printf("    \"corruptions\": %" PRIu64 ",\n", res.corruptions);
		if (res.leaks)
			printf("    \"leaks\": %" PRIu64 ",\n", res.leaks);
		if (res.corruptions_fixed)
			printf("    \"corruptions-fixed\": %" PRIu64 ",\n", res.corruptions_fixed);
		if (res.leaks_fixed)
			printf("    \"leaks-fixed\": %" PRIu64 ",\n", res.leaks_fixed);
		printf("    \"total-clusters\": %" PRIu64 ",\n", res.total_clusters);
		printf("    \"check-errors\": %" PRIu64 ",\n", res.check_errors);
		if (res.allocated_clusters)
			printf("    \"allocated-clusters\": %" PRIu64 ",\n",
			       res.allocated_clusters);
		if (res.fragmented_clusters)
			printf("    \"fragmented-clusters\": %" PRIu64 ",\n",
			       res.fragmented_clusters);
		if (res.compressed_clusters)
			printf("    \"compressed-clusters\": %" PRIu64 ",\n",
			       res.compressed_clusters);
		printf("    \"filename\": ");
		json_str(stdout, file);
		printf(",\n    \"format\": \"qcow2\"\n}\n");
	} else if (!quiet) {
		if (res.corruptions_fixed || res.leaks_fixed)
			printf("The following inconsistencies were found and repaired:\n\n"
			       "    %" PRIu64 " leaked clusters\n    %" PRIu64 " corruptions\n\n"
			       "Double checking the fixed image now...\n",
			       res.leaks_fixed, res.corruptions_fixed);
		if (!res.corruptions && !res.leaks && !res.check_errors)
			printf("No errors were found on the image.\n");
		if (res.check_errors)
			printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
			       res.check_errors);
		if (res.corruptions)
			printf("\n%" PRIu64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt "
			       "it.\n",
			       res.corruptions);
		if (res.leaks)
			printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       res.leaks);
		if (res.total_clusters)
			printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, "
			       "%0.2f%% compressed clusters\n",
			       res.allocated_clusters, res.total_clusters,
			       res.allocated_clusters * 100.0 / res.total_clusters,
			       res.allocated_clusters
				   ? res.fragmented_clusters * 100.0 / res.allocated_clusters
				   : 0.0,
			       res.allocated_clusters
				   ? res.compressed_clusters * 100.0 / res.allocated_clusters
				   : 0.0);
		if (res.image_end_offset)
			printf("Image end offset: %" PRIu64 "\n", res.image_end_offset);
	}
	if (res.check_errors)
		return 1;
	if (res.corruptions)
		return 2;
	if (res.leaks)
		return 3;
	return 0;
}

/* ---- snapshot ---- */

/* qemu's size_to_str(): three significant digits and a binary unit. */
static void snap_size_str(uint64_t v, char *buf, size_t len)
{
	static const char *const sfx[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
	int e;
	unsigned i;

	frexp((double)v / (1000.0 / 1024.0), &e);
	i = e > 0 ? (unsigned)(e - 1) / 10 : 0;
	if (i > 6)
		i = 6;
	snprintf(buf, len, "%0.3g %sB", (double)v / (double)(1ull << (i * 10)), sfx[i]);
}

/* The table of qemu-img snapshot -l (and of info). */
static void snap_list_print(const struct qcow2_snap_desc *s, uint32_t n)
{
	printf("Snapshot list:\n");
	printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
	for (uint32_t i = 0; i < n; i++) {
		char size[32], date[32] = "", clk[48], ic[32] = "";
		time_t t = (time_t)s[i].date_sec;
		struct tm tm;
		uint64_t secs = s[i].vm_clock_nsec / 1000000000ull;

		snap_size_str(s[i].vm_state_size, size, sizeof(size));
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(clk, sizeof(clk), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
			 (int)((secs / 60) % 60), (int)(secs % 60),
			 (int)((s[i].vm_clock_nsec / 1000000) % 1000));
		if (s[i].icount != -1)
			snprintf(ic, sizeof(ic), "%" PRId64, s[i].icount);
		printf("%-9s %-16s %8s%20s%13s%11s\n", s[i].id, s[i].name, size, date, clk, ic);
	}
}

static int cmd_snapshot(int argc, char **argv)
{
	static const struct option lopts[] = {
	    {"help", no_argument, NULL, 'h'},
	    {"force-share", no_argument, NULL, 'U'},
	    {NULL, 0, NULL, 0},
	};
	struct file_args a = {.out = OUT_HUMAN};
	struct qcow2_locks locks;
	struct qcow2_snap_desc *list = NULL;
	const char *arg = NULL;
	char err[ERRLEN] = "", op = 0;
	uint32_t n = 0;
	int c, r;

	while ((c = getopt_long(argc, argv, "+la:c:d:qhU", lopts, NULL)) != -1) {
		switch (c) {
		case 'l':
		case 'a':
		case 'c':
		case 'd':
			if (op) {
				errorf("Cannot mix '-l', '-a', '-c', '-d'");
				return 1;
			}
			op = (char)c;
			arg = optarg;
			break;
		case 'q':
			a.quiet = true;
			break;
		case 'U':
			a.force_share = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind + 1 != argc) {
		errorf("Expecting one image file name");
		return 1;
	}
	a.file = argv[optind];
	if (!op)
		return 0; /* as qemu-img: nothing asked, nothing done */
	if (lock_file(&locks, &a, op == 'l' ? QCOW2_LOCK_READ : QCOW2_LOCK_WRITE))
		return 1;
	r = qcow2_snapshot_tool(a.file, op, arg, &list, &n, err, sizeof(err));
	qcow2_unlock_image(&locks);
	if (r < 0) {
		static const char *const verb[] = {
		    ['a'] = "apply", ['c'] = "create", ['d'] = "delete", ['l'] = "list"};

		if (op == 'l')
			errorf("Could not open '%s': %s", a.file, reason(err, r));
		else
			errorf("Could not %s snapshot '%s': %s", verb[(unsigned char)op], arg,
			       reason(err, r));
		return 1;
	}
	if (op == 'l' && n)
		snap_list_print(list, n);
	free(list);
	return 0;
}

/* ---- bitmap ---- */

static int cmd_bitmap(int argc, char **argv)
{
	enum { O_ADD = 256, O_REMOVE, O_CLEAR, O_ENABLE, O_DISABLE, O_MERGE };
	static const struct option lopts[] = {
	    {"help", no_argument, NULL, 'h'},
	    {"add", no_argument, NULL, O_ADD},
	    {"remove", no_argument, NULL, O_REMOVE},
	    {"clear", no_argument, NULL, O_CLEAR},
	    {"enable", no_argument, NULL, O_ENABLE},
	    {"disable", no_argument, NULL, O_DISABLE},
	    {"merge", required_argument, NULL, O_MERGE},
	    {NULL, 0, NULL, 0},
	};
	static const char *const verb[] = {
	    ['a'] = "add", ['r'] = "remove", ['c'] = "clear", ['e'] = "enable", ['d'] = "disable"};
	struct file_args a = {.out = OUT_HUMAN};
	struct qcow2_locks locks;
	char ops[64], err[ERRLEN] = "";
	const char *name;
	size_t nops = 0;
	uint64_t gran = 0;
	bool add = false, has_g = false;
	int c, r = 0;

	while ((c = getopt_long(argc, argv, "+g:f:h", lopts, NULL)) != -1) {
		switch (c) {
		case O_ADD:
		case O_REMOVE:
		case O_CLEAR:
		case O_ENABLE:
		case O_DISABLE:
			if (nops == sizeof(ops)) {
				errorf("too many operations");
				return 1;
			}
			ops[nops++] = "arced"[c - O_ADD];
			add = add || c == O_ADD;
			break;
		case O_MERGE:
			errorf(
			    "--merge is not supported by vqcow-img (use qemu-img bitmap --merge)");
			return 1;
		case 'g':
			if (util_parse_size(optarg, &gran) || gran > UINT32_MAX) {
				errorf(
				    "Invalid granularity specified. You may use k, M, G, T, P or E "
				    "suffixes for");
				errorf("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
				       "exabytes.");
				return 1;
			}
			has_g = true;
			break;
		case 'f':
			a.fmt = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (!nops) {
		errorf("Need at least one of --add, --remove, --clear, --enable, --disable, or "
		       "--merge");
		return 1;
	}
	if (has_g && !add) {
		errorf("granularity only supported with --add");
		return 1;
	}
	if (optind + 2 != argc) {
		errorf("Expecting filename and bitmap name");
		return 1;
	}
	a.file = argv[optind];
	name = argv[optind + 1];
	if (a.fmt && strcmp(a.fmt, "qcow2") != 0 && strcmp(a.fmt, "raw") != 0) {
		errorf("Unknown driver '%s'", a.fmt);
		return 1;
	}
	if (lock_file(&locks, &a, QCOW2_LOCK_WRITE))
		return 1;
	for (size_t i = 0; i < nops && r == 0; i++) {
		if (a.fmt && strcmp(a.fmt, "raw") == 0)
			r = ops[i] == 'a' ? qcow2_seterr(err, sizeof(err), -ENOTSUP,
							 "Can't store persistent bitmaps to %s: "
							 "Operation not supported",
							 a.file)
					  : qcow2_seterr(err, sizeof(err), -ENOENT,
							 "Dirty bitmap '%s' not found", name);
		else
			r = qcow2_bitmap_tool(a.file, ops[i], name, (uint32_t)gran, err,
					      sizeof(err));
		if (r < 0)
			errorf("Operation %s on bitmap %s failed: %s", verb[(unsigned char)ops[i]],
			       name, reason(err, r));
	}
	qcow2_unlock_image(&locks);
	return r < 0;
}

/* ---- map ---- */

struct map_state {
	enum output_fmt out;
	bool first;
};

static int map_cb(void *opaque, const struct qcow2_map_entry *e)
{
	struct map_state *s = opaque;

	if (s->out == OUT_JSON) {
		printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, "
		       "\"present\": %s, \"zero\": %s, \"data\": %s",
		       s->first ? "[" : ",\n", e->start, e->length, e->depth, yesno(e->present),
		       yesno(e->zero), yesno(e->data));
		if (e->has_offset)
			printf(", \"offset\": %" PRIu64, e->offset);
		printf("}");
	} else {
		if (s->first)
			printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
		/* qemu-img prints only ranges with data and a host offset */
		if (e->data && e->has_offset)
			printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start,
			       e->length, e->offset, e->filename ? e->filename : "");
	}
	s->first = false;
	return 0;
}

static int cmd_map(int argc, char **argv)
{
	struct qcow2_locks locks;
	struct map_state s;
	struct progress prog_state;
	struct qcow2_tool_cb cb = {.progress = progress_cb, .opaque = &prog_state};
	char err[ERRLEN] = "";
	struct file_args a;
	int r;

	r = parse_file_args(argc, argv, "+f:hU", &a);
	if (r)
		return r < 0 ? 0 : 1;
	if (lock_file(&locks, &a, QCOW2_LOCK_READ))
		return 1;
	s.out = a.out;
	s.first = true;
	/* no -p: the map itself is on stdout (qemu-img map has none either) */
	progress_init(&prog_state, false);
	r = qcow2_map(a.file, a.fmt, map_cb, &s, &cb, err, sizeof(err));
	progress_end(&prog_state, r >= 0);
	qcow2_unlock_image(&locks);
	if (r < 0) {
		if (!s.first)
			printf("\n");
		errorf("%s: %s", a.file, reason(err, r));
		return 1;
	}
	if (a.out == OUT_JSON)
		printf(s.first ? "[]\n" : "]\n");
	else if (s.first)
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
	return 0;
}

/* ---- convert ---- */

/*
 * -l as qemu-img: "snapshot.id=ID,snapshot.name=NAME" (either or both), or a
 * plain ID or name. The strings point into *@buf (freed by the caller).
 */
static int parse_snapshot_opt(const char *arg, struct qcow2_snap_sel *sel, char **buf)
{
	char *p, *item, *save = NULL;

	*sel = (struct qcow2_snap_sel){0};
	free(*buf);
	*buf = strdup(arg);
	if (!*buf)
		return -ENOMEM;
	if (strncmp(arg, "snapshot.", 9)) {
		sel->id_or_name = *buf;
		return 0;
	}
	for (p = *buf; (item = strtok_r(p, ",", &save)); p = NULL) {
		if (!strncmp(item, "snapshot.id=", 12))
			sel->id = item + 12;
		else if (!strncmp(item, "snapshot.name=", 14))
			sel->name = item + 14;
		else {
			errorf("Failed in parsing snapshot param '%s'", arg);
			return -EINVAL;
		}
	}
	if (!sel->id && !sel->name) {
		errorf("Failed in parsing snapshot param '%s'", arg);
		return -EINVAL;
	}
	return 0;
}

static int cmd_convert(int argc, char **argv)
{
	static const struct option lopts[] = {
	    {"help", no_argument, NULL, 'h'},
	    {"force-share", no_argument, NULL, 'U'},
	    {NULL, 0, NULL, 0},
	};
	struct qcow2_convert_opts co;
	struct qcow2_snap_sel snap = {0};
	char *snap_buf = NULL;
	struct create_args ca;
	struct qcow2_locks locks;
	struct file_args src;
	struct progress prog_state;
	struct qcow2_tool_cb cb = {.progress = progress_cb, .opaque = &prog_state};
	char err[ERRLEN] = "";
	const char *out_fmt = "raw";
	bool quiet = false, show_progress = false, force_share = false;
	uint64_t sparse = 4096;
	int c, ret = 1, r;
	unsigned i;

	memset(&ca, 0, sizeof(ca));
	memset(&co, 0, sizeof(co));
	while ((c = getopt_long(argc, argv, "f:O:o:cpqS:Ul:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			co.src_fmt = optarg;
			break;
		case 'O':
			out_fmt = optarg;
			break;
		case 'o':
			r = create_opts_parse(&ca, optarg);
			if (r == -ECANCELED) {
				ret = 0;
				goto out;
			}
			if (r)
				goto out;
			break;
		case 'c':
			co.compress = true;
			break;
		case 'p':
			show_progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'S':
			if (util_parse_size(optarg, &sparse) || sparse % 512 ||
			    sparse > (1ull << 30)) {
				errorf("Invalid buffer size for sparse output specified: '%s' (a "
				       "multiple of 512 up to 1G)",
				       optarg);
				goto out;
			}
			break;
		case 'U':
			force_share = true;
			break;
		case 'l':
			if (parse_snapshot_opt(optarg, &snap, &snap_buf))
				goto out;
			co.snapshot = &snap;
			break;
		case 'h':
			usage(stdout);
			ret = 0;
			goto out;
		default:
			usage(stderr);
			goto out;
		}
	}
	if (argc - optind != 2) {
		errorf("Expecting one source and one destination file name");
		goto out;
	}
	if (strcmp(out_fmt, "raw") && strcmp(out_fmt, "qcow2")) {
		errorf("Unknown or unsupported output format '%s' (qcow2 or raw)", out_fmt);
		goto out;
	}
	if (!strcmp(out_fmt, "raw") && (ca.cluster_set || ca.ext_set || ca.refbits_set ||
					ca.compat_set || ca.lazy_set || ca.ctype_set)) {
		errorf("raw images only support the preallocation and size options");
		goto out;
	}
	if (co.src_fmt && strcmp(co.src_fmt, "qcow2") && strcmp(co.src_fmt, "raw")) {
		errorf("Unknown or unsupported format '%s' (qcow2 or raw)", co.src_fmt);
		goto out;
	}
	if (ca.o.size_set) {
		errorf("convert takes the size of the source: no size option");
		goto out;
	}
	co.src = argv[optind];
	co.dst = argv[optind + 1];
	co.dst_fmt = out_fmt;
	co.create = ca.o;
	co.min_sparse = sparse;
	/* the source as qemu-img convert holds it: read, nobody else writing (-U: shared) */
	src = (struct file_args){.fmt = co.src_fmt, .file = co.src, .force_share = force_share};
	if (lock_file(&locks, &src, QCOW2_LOCK_CONVERT))
		goto out;
	progress_init(&prog_state, show_progress && !quiet);
	r = qcow2_convert(&co, &cb, err, sizeof(err));
	progress_end(&prog_state, r >= 0);
	qcow2_unlock_image(&locks);
	if (r < 0) {
		errorf("%s", reason(err, r));
		goto out;
	}
	ret = 0;
out:
	for (i = 0; i < ca.nstrings; i++)
		free(ca.strings[i]);
	free(snap_buf);
	return ret;
}

/*
 * resize [-f FMT] [-q] [--shrink] [--preallocation=off] FILE [+|-]SIZE, as
 * qemu-img resize: the last argument is the size (so "-1G" is not an
 * option), relative with + or -; growing only (shrinking is refused, with
 * qemu-img's message when --shrink is missing); qemu-img's locks.
 */
static int cmd_resize(int argc, char **argv)
{
	enum { OPT_SHRINK = 256, OPT_PREALLOC };
	static const struct option lopts[] = {
	    {"help", no_argument, NULL, 'h'},
	    {"shrink", no_argument, NULL, OPT_SHRINK},
	    {"preallocation", required_argument, NULL, OPT_PREALLOC},
	    {NULL, 0, NULL, 0},
	};
	struct qcow2_image_info info;
	struct qcow2_locks locks;
	struct file_args a;
	char err[ERRLEN] = "";
	const char *sz;
	bool shrink = false;
	uint64_t n, total, cur;
	int c, rel = 0, r;

	memset(&a, 0, sizeof(a));
	if (argc < 3) {
		errorf("Not enough arguments");
		fprintf(stderr, "Try '%s --help' for more information\n", prog);
		return 1;
	}
	sz = argv[--argc];
	while ((c = getopt_long(argc, argv, "f:qh", lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			a.fmt = optarg;
			break;
		case 'q':
			a.quiet = true;
			break;
		case OPT_SHRINK:
			shrink = true;
			break;
		case OPT_PREALLOC:
			if (strcmp(optarg, "off")) {
				errorf("--preallocation=%s is not supported (only off)", optarg);
				return 1;
			}
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind != argc - 1) {
		errorf("Expecting image file name");
		return 1;
	}
	a.file = argv[optind];
	if (bad_fmt(a.fmt))
		return 1;
	if (sz[0] == '+' || sz[0] == '-')
		rel = *sz++ == '+' ? 1 : -1;
	if (util_parse_size(sz, &n) < 0) {
		errorf("Parameter 'size' expects a non-negative number below 2^64");
		fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
				"tera-, peta-\nand exabytes, respectively.\n");
		return 1;
	}
	if (lock_file(&locks, &a, QCOW2_LOCK_RESIZE))
		return 1;
	if (open_info(&a, &info))
		goto fail;
	cur = info.virtual_size;
	qcow2_image_info_free(&info);
	if (rel > 0 && n > UINT64_MAX - cur) {
		errorf("Parameter 'size' expects a non-negative number below 2^64");
		goto fail;
	}
	if (rel < 0 && n >= cur) {
		errorf("New image size must be positive");
		goto fail;
	}
	total = rel > 0 ? cur + n : rel < 0 ? cur - n : n;
	if (!total) {
		errorf("New image size must be positive");
		goto fail;
	}
	if (total < cur) {
		if (!shrink) {
			errorf("Use the --shrink option to perform a shrink operation.");
			fprintf(stderr,
				"%s: warning: Shrinking an image will delete all data beyond the "
				"shrunken image's end. Before performing such an operation, make "
				"sure there is no important data there.\n",
				prog);
		} else {
			errorf("shrinking is not supported (the image has %" PRIu64
			       " bytes, %" PRIu64 " asked)",
			       cur, total);
		}
		goto fail;
	}
	r = qcow2_resize(a.file, a.fmt, total, err, sizeof(err));
	qcow2_unlock_image(&locks);
	if (r < 0) {
		errorf("%s", reason(err, r));
		return 1;
	}
	if (!a.quiet)
		printf("Image resized.\n");
	return 0;
fail:
	qcow2_unlock_image(&locks);
	return 1;
}

/*
 * rebase -u [-f FMT] [-b BACKING] [-F BACKING_FMT] [-q] FILE, as qemu-img
 * rebase -u: only the header changes. Without -u (the safe mode, which
 * compares the old and new backing chains) it is refused.
 */
static int cmd_rebase(int argc, char **argv)
{
	static const struct option lopts[] = {{"help", no_argument, NULL, 'h'},
					      {"force-share", no_argument, NULL, 'U'},
					      {NULL, 0, NULL, 0}};
	struct qcow2_image_info info;
	struct qcow2_locks locks;
	struct file_args a;
	const char *backing = NULL, *bfmt = NULL;
	bool unsafe = false;
	char err[ERRLEN] = "";
	int c, r;

	memset(&a, 0, sizeof(a));
	while ((c = getopt_long(argc, argv, "f:b:F:uqpUt:T:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			a.fmt = optarg;
			break;
		case 'b':
			backing = optarg;
			break;
		case 'F':
			bfmt = optarg;
			break;
		case 'u':
			unsafe = true;
			break;
		case 'q':
			a.quiet = true;
			break;
		case 'p':
		case 't':
		case 'T':
			break; /* nothing long to show; the cache modes do not apply */
		case 'U':
			errorf("force-share cannot be used with rebase (it writes)");
			return 1;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind != argc - 1) {
		errorf("Expecting one image file name");
		return 1;
	}
	a.file = argv[optind];
	if (!unsafe) {
		errorf("only unsafe rebase (-u) is supported: the safe mode copies data between "
		       "backing chains");
		return 1;
	}
	if (backing && !backing[0])
		backing = NULL;
	if (backing && !bfmt) {
		errorf("Could not change the backing file to '%s': backing format must be "
		       "specified",
		       backing);
		return 1;
	}
	if (bfmt && strcmp(bfmt, "qcow2") && strcmp(bfmt, "raw")) {
		errorf("Unknown or unsupported format '%s' (qcow2 or raw)", bfmt);
		return 1;
	}
	if (bad_fmt(a.fmt))
		return 1;
	if (lock_file(&locks, &a, QCOW2_LOCK_WRITE))
		return 1;
	if (open_info(&a, &info))
		goto fail;
	r = strcmp(info.format, "qcow2") ? -ENOTSUP : 0;
	qcow2_image_info_free(&info);
	if (r == 0)
		r = qcow2_rebase_unsafe(a.file, backing, backing ? bfmt : NULL, err, sizeof(err));
	if (r < 0) {
		errorf("Could not change the backing file to '%s': %s", backing ? backing : "",
		       r == -ENOTSUP ? "Operation not supported" : reason(err, r));
		goto fail;
	}
	qcow2_unlock_image(&locks);
	return 0;

fail:
	qcow2_unlock_image(&locks);
	return 1;
}

/*
 * commit: qemu-img commit. The images are opened through img/ (the engine,
 * on an io_loop of our own): top read-write with its chain, the base
 * reopened read-write (img_reopen_rw: its write lock), grown to top's size
 * if smaller, then img/copy.c copies what the layers above the base hold,
 * exactly as vqcowd's block-commit job does; the base is flushed and
 * everything closed. Without -d (and without -b, which implies it) top is
 * then emptied as QEMU empties a qcow2 image: rebuilt (qcow2_make_empty)
 * or, with snapshots, bitmaps, a data file or in version 2, every cluster
 * discarded through the engine before it closes (img_discard_full).
 */
struct commit_state {
	int io_res; /* 1 while an img_io or a grow is pending */
	bool woke;
};

static void commit_wake(struct img_copy *k, bool copy_ended)
{
	struct commit_state *st = k->priv;

	(void)copy_ended;
	st->woke = true;
}

static void commit_io_done(struct img_io *io, int res)
{
	((struct commit_state *)io->priv)->io_res = res;
}

static void commit_grow_done(struct img_grow *g, int res)
{
	((struct commit_state *)g->priv)->io_res = res;
}

static int commit_wait(struct io_loop *loop, int *res)
{
	while (*res == 1)
		if (io_loop_run_once(loop, true) < 0)
			return -EIO;
	return *res;
}

/* qemu-img's -b: the name as given, or relative to the top image's directory. */
static bool same_file(const char *path, const char *name, const char *top)
{
	char a[PATH_MAX], b[PATH_MAX], rel[PATH_MAX];
	const char *slash = strrchr(top, '/');

	if (!strcmp(path, name))
		return true;
	if (!realpath(path, a))
		return false;
	if (realpath(name, b) && !strcmp(a, b))
		return true;
	if (name[0] == '/' || !slash)
		return false;
	snprintf(rel, sizeof(rel), "%.*s/%s", (int)(slash - top), top, name);
	return realpath(rel, b) && !strcmp(a, b);
}

static bool lock_error(int r, const char *msg)
{
	return r == -EAGAIN && strstr(msg, "Failed to get");
}

static int cmd_commit(int argc, char **argv)
{
	static const struct option lopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	const char *fmt = NULL, *base_name = NULL, *cache = NULL, *file;
	bool quiet = false, show = false, drop = false, emptied = false;
	uint64_t rate = 0, t0, base_size;
	struct commit_state st = {0};
	struct io_loop *loop = NULL;
	struct img *top = NULL, *base = NULL;
	struct img_copy k;
	struct img_opts o;
	struct img_io io;
	struct img_grow g;
	struct progress p = {0};
	struct qcow2_locks locks;
	char err[ERRLEN] = "";
	int c, r, rc = 1;

	memset(&k, 0, sizeof(k));
	memset(&io, 0, sizeof(io));
	memset(&g, 0, sizeof(g));
	while ((c = getopt_long(argc, argv, "f:t:b:dpqr:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 't':
			cache = optarg;
			break;
		case 'b':
			base_name = optarg;
			drop = true; /* -b implies -d: the images between stay valid */
			break;
		case 'd':
			drop = true;
			break;
		case 'p':
			show = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'r':
			if (util_parse_size(optarg, &rate) < 0) {
				errorf("Invalid rate limit specified");
				return 1;
			}
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (optind != argc - 1) {
		errorf("Expecting one image file name");
		return 1;
	}
	file = argv[optind];
	if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
		errorf("Unknown file format '%s'", fmt);
		return 1;
	}
	if (cache && strcmp(cache, "none") && strcmp(cache, "writeback") &&
	    strcmp(cache, "writethrough") && strcmp(cache, "directsync") &&
	    strcmp(cache, "unsafe")) {
		errorf("Invalid cache option: %s", cache);
		return 1;
	}
	/* the engine's life-cycle lines are not qemu-img's output; warnings stay */
	vlog_init("vqcow-img");
	vlog_set_level(VLOG_WARN);
	r = io_loop_init(&loop, 64);
	if (r < 0) {
		errorf("io_uring: %s", strerror(-r));
		return 1;
	}
	memset(&o, 0, sizeof(o));
	o.format = fmt;
	o.direct = cache && (!strcmp(cache, "none") || !strcmp(cache, "directsync"));
	o.no_l2_prefetch = true;
	r = img_open(&top, loop, file, &o, err, sizeof(err));
	if (r < 0) {
		const char *bf = strstr(err, ": backing file: ");
		const char *lk = strstr(err, ": Failed to get ");

		if (lock_error(r, err) && bf && lk > bf) {
			/* "TOP: backing file: BASE: Failed to get shared "write" lock: ..." */
			const char *what = lk + 2, *end = strstr(what, ": locked by");

			errorf("Could not open '%s': Could not open backing file: %.*s\n"
			       "Is another process using the image [%.*s]?",
			       file, (int)(end ? end - what : (ptrdiff_t)strlen(what)), what,
			       (int)(lk - (bf + 16)), bf + 16);
		} else if (lock_error(r, err))
			errorf("Could not open '%s': Failed to get \"write\" lock\n"
			       "Is another process using the image [%s]?",
			       file, file);
		else
			errorf("Could not open '%s': %s", file, reason(err, r));
		top = NULL;
		goto out;
	}
	if (!img_backing(top)) {
		errorf("Image does not have a backing file");
		goto out;
	}
	for (struct img *l = img_backing(top); l && !base; l = img_backing(l))
		if (!base_name || same_file(l->path, base_name, file))
			base = l;
	if (!base) {
		errorf("Did not find '%s' in the backing chain of '%s'", base_name, file);
		goto out;
	}
	r = img_reopen_rw(base, err, sizeof(err));
	if (r < 0) {
		if (lock_error(r, err))
			errorf("Failed to get \"write\" lock\nIs another process using the image "
			       "[%s]?",
			       base->path);
		else
			errorf("%s", reason(err, r));
		goto out;
	}
	base_size = base->size;
	if (base->size < top->size) {
		/* as qemu-img: the base grows to the top's size (never shrinks) */
		st.io_res = 1;
		g.done = commit_grow_done;
		g.priv = &st;
		r = img_grow(base, top->size, &g);
		if (r == 1)
			r = commit_wait(loop, &st.io_res);
		if (r < 0) {
			errorf("Could not resize '%s': %s", base->path, reason(g.err, r));
			goto out;
		}
	}
	r = img_copy_init(&k, top, base, top->size);
	if (r < 0) {
		errorf("%s", strerror(-r));
		goto out;
	}
	k.wake = commit_wake;
	k.priv = &st;
	k.zero_from = base_size;
	progress_init(&p, show && !quiet);
	t0 = util_now_ns();
	for (;;) {
		uint64_t left;

		if (k.scanning) {
			r = img_copy_scan(&k);
			if (r < 0) {
				progress_end(&p, false);
				errorf("%s", k.errmsg);
				goto out;
			}
			if (r == 0) {
				st.woke = false;
				if (io_loop_run_once(loop, k.parked) < 0)
					goto out;
				continue;
			}
		}
		if (!img_copy_next(&k, IMG_COPY_MAX))
			break;
		while (k.busy)
			if (io_loop_run_once(loop, true) < 0)
				goto out;
		if (k.c_res < 0) {
			progress_end(&p, false);
			errorf("%s", k.errmsg);
			goto out;
		}
		left = img_copy_remaining(&k);
		progress_cb(&p, (double)k.copied / (double)(k.copied + left));
		if (rate) {
			/* qemu-img's -r: bytes per second over the whole run */
			uint64_t due = t0 + (uint64_t)((double)k.copied * 1e9 / (double)rate);
			uint64_t now = util_now_ns();

			if (due > now) {
				struct timespec ts = {(time_t)((due - now) / 1000000000ull),
						      (long)((due - now) % 1000000000ull)};

				nanosleep(&ts, NULL);
			}
		}
	}
	st.io_res = 1;
	io.done = commit_io_done;
	io.priv = &st;
	img_flush(base, &io);
	r = commit_wait(loop, &st.io_res);
	if (r < 0) {
		progress_end(&p, false);
		errorf("flushing '%s': %s", base->path, strerror(-r));
		goto out;
	}
	img_copy_free(&k);
	if (!drop && strcmp(top->ops->format, "qcow2") == 0) {
		r = qcow2_make_empty_rebuilds(file, err, sizeof(err));
		if (r == 0) {
			/*
			 * Snapshots, bitmaps, a data file or version 2: QEMU
			 * discards every cluster (full discard), through the
			 * engine that still holds the top's write lock.
			 */
			st.io_res = 1;
			img_discard_full(top, &io, 0, top->size);
			r = commit_wait(loop, &st.io_res);
			if (r == 0) {
				st.io_res = 1;
				img_flush(top, &io);
				r = commit_wait(loop, &st.io_res);
			}
			if (r < 0) {
				progress_end(&p, false);
				errorf("Could not empty %s: %s", file, strerror(-r));
				goto out;
			}
			emptied = true;
		} else if (r < 0) {
			progress_end(&p, false);
			errorf("Could not empty %s: %s", file, reason(err, r));
			goto out;
		}
	}
	img_close(top);
	top = NULL;
	if (!drop && !emptied) {
		struct file_args a = {0};

		a.file = file;
		a.fmt = "qcow2";
		if (lock_file(&locks, &a, QCOW2_LOCK_WRITE)) {
			progress_end(&p, false);
			goto out;
		}
		r = qcow2_make_empty(file, err, sizeof(err));
		qcow2_unlock_image(&locks);
		if (r < 0) {
			progress_end(&p, false);
			errorf("Could not empty %s: %s", file, reason(err, r));
			goto out;
		}
	}
	progress_end(&p, true);
	if (!quiet)
		printf("Image committed.\n");
	rc = 0;
out:
	img_copy_free(&k);
	img_close(top);
	if (loop)
		io_loop_exit(loop);
	return rc;
}

int main(int argc, char **argv)
{
	const char *cmd;

	if (argc < 2) {
		usage(stderr);
		return 1;
	}
	cmd = argv[1];
	if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
		printf("vqcow-img %s\n", VQCOW_VERSION);
		return 0;
	}
	/* getopt from the sub-command on */
	argc--;
	argv++;
	optind = 1;
	if (!strcmp(cmd, "create"))
		return cmd_create(argc, argv);
	if (!strcmp(cmd, "info"))
		return cmd_info(argc, argv);
	if (!strcmp(cmd, "check"))
		return cmd_check(argc, argv);
	if (!strcmp(cmd, "snapshot"))
		return cmd_snapshot(argc, argv);
	if (!strcmp(cmd, "map"))
		return cmd_map(argc, argv);
	if (!strcmp(cmd, "bitmap"))
		return cmd_bitmap(argc, argv);
	if (!strcmp(cmd, "convert"))
		return cmd_convert(argc, argv);
	if (!strcmp(cmd, "rebase"))
		return cmd_rebase(argc, argv);
	if (!strcmp(cmd, "commit"))
		return cmd_commit(argc, argv);
	if (!strcmp(cmd, "resize"))
		return cmd_resize(argc, argv);
	errorf("Command not found: %s", cmd);
	usage(stderr);
	return 1;
}
