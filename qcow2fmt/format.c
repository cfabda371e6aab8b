/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/format.c — header parsing and validation, snapshot entry
 * decoding, the error formatter and the backing/data file name resolver
 * (pure: no I/O; see format.h).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

int qcow2_seterr(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return ret;
}

static const char *const incompat_names[] = {
    "dirty bit", "corrupt bit", "external data file", "compression type", "extended L2 entries",
};

bool qcow2_feature_name(const void *buf, const struct qcow2_header_info *info, unsigned type,
			unsigned bit, char *name, size_t namelen)
{
	const uint8_t *b = buf;

	if (!namelen)
		return false;
	name[0] = '\0';
	if (b && info && info->feature_table_offset) {
		for (uint32_t i = 0; i < info->feature_table_len; i++) {
			const struct qcow2_feature_name *f =
			    (const void *)(b + info->feature_table_offset + i * 48u);
			size_t n;

			if (f->type != type || f->bit != bit)
				continue;
			n = strnlen(f->name, sizeof(f->name));
			if (n >= namelen)
				n = namelen - 1;
			memcpy(name, f->name, n);
			name[n] = '\0';
			/* keep the message printable */
			for (size_t k = 0; k < n; k++)
				if ((unsigned char)name[k] < 0x20 || (unsigned char)name[k] >= 0x7f)
					name[k] = '?';
			return true;
		}
	}
	if (type == QCOW2_FEAT_INCOMPAT &&
	    bit < sizeof(incompat_names) / sizeof(incompat_names[0])) {
		snprintf(name, namelen, "%s", incompat_names[bit]);
		return true;
	}
	return false;
}

/* [off, off + len) lies inside [0, limit). */
static bool inside(uint64_t off, uint64_t len, uint64_t limit)
{
	return off <= limit && len <= limit - off;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

/* Copy a length-counted on-disk string; refuse NUL bytes inside it. */
static bool copy_name(char *dst, const uint8_t *src, size_t n)
{
	if (memchr(src, 0, n))
		return false;
	memcpy(dst, src, n);
	dst[n] = '\0';
	return true;
}

static int parse_extensions(const uint8_t *b, uint32_t start, uint32_t end, uint64_t file_size,
			    struct qcow2_header_info *h, char *err, size_t errlen)
{
	uint32_t off = start;
	bool seen_end = false;

	while (off < end) {
		uint32_t type, elen, padded;

		if (end - off < 8)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "header extension at offset %u: truncated (%u bytes left before %s)",
			    off, end - off,
			    h->backing_file_offset ? "the backing file name"
						   : "the end of the first cluster");
		type = qcow2_be32(b + off);
		elen = qcow2_be32(b + off + 4);
		off += 8;
		if (type == QCOW2_EXT_END) {
			seen_end = true;
			break;
		}
		if (elen > end - off)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "header extension 0x%08x at offset %u: length %u runs past %s", type,
			    off - 8, elen,
			    h->backing_file_offset ? "the backing file name"
						   : "the end of the first cluster");
		padded = (elen + 7u) & ~7u;
		if (padded > end - off)
			padded = end - off; /* padding may be cut by the limit */
		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (h->has_backing_fmt)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "backing format header extension appears twice");
			if (elen == 0 || elen > QCOW2_MAX_BACKING_FMT)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "backing format header extension: bad length %u (1..%u)", elen,
				    QCOW2_MAX_BACKING_FMT);
			if (!copy_name(h->backing_fmt, b + off, elen))
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "backing format header extension contains a NUL byte");
			h->has_backing_fmt = true;
			break;
		case QCOW2_EXT_DATA_FILE:
			if (h->has_data_file)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "external data file name header extension appears twice");
			if (elen == 0 || elen > QCOW2_MAX_DATA_FILE_NAME)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "external data file name header extension: bad length "
				    "%u (1..%u)",
				    elen, QCOW2_MAX_DATA_FILE_NAME);
			if (!copy_name(h->data_file, b + off, elen))
				return qcow2_seterr(err, errlen, -EINVAL,
						    "external data file name contains a NUL byte");
			h->has_data_file = true;
			break;
		case QCOW2_EXT_FEATURE_TABLE:
			if (h->feature_table_offset)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "feature name table header extension appears twice");
			h->feature_table_offset = off;
			h->feature_table_len = elen / (uint32_t)sizeof(struct qcow2_feature_name);
			break;
		case QCOW2_EXT_BITMAPS: {
			const struct qcow2_bitmaps_ext *e = (const void *)(b + off);

			if (h->has_bitmaps)
				return qcow2_seterr(err, errlen, -EINVAL,
						    "bitmaps header extension appears twice");
			if (elen != sizeof(*e))
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "bitmaps header extension: length %u (want %zu)", elen,
				    sizeof(*e));
			h->nb_bitmaps = qcow2_be32(&e->nb_bitmaps);
			h->bitmap_directory_size = qcow2_be64(&e->bitmap_directory_size);
			h->bitmap_directory_offset = qcow2_be64(&e->bitmap_directory_offset);
			if (qcow2_be32(&e->reserved))
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "bitmaps header extension: reserved field not zero");
			if (h->nb_bitmaps == 0 || h->nb_bitmaps > QCOW2_MAX_BITMAPS)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "bitmaps header extension: nb_bitmaps %u (1..%u)",
				    h->nb_bitmaps, QCOW2_MAX_BITMAPS);
			if (h->bitmap_directory_size == 0 ||
			    h->bitmap_directory_size > QCOW2_MAX_BITMAP_DIR_BYTES)
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "bitmaps header extension: bitmap_directory_size %llu "
				    "out of range",
				    (unsigned long long)h->bitmap_directory_size);
			if (h->bitmap_directory_offset & (h->cluster_size - 1) ||
			    h->bitmap_directory_offset == 0 ||
			    !inside(h->bitmap_directory_offset, h->bitmap_directory_size,
				    file_size))
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "bitmaps header extension: bitmap_directory_offset "
				    "0x%llx is %s",
				    (unsigned long long)h->bitmap_directory_offset,
				    h->bitmap_directory_offset & (h->cluster_size - 1) ||
					    h->bitmap_directory_offset == 0
					? "invalid or not cluster aligned"
					: "outside the file");
			h->has_bitmaps = true;
			break;
		}
		case QCOW2_EXT_CRYPTO: {
			const struct qcow2_crypto_ext *e = (const void *)(b + off);

			if (h->has_crypto)
				return qcow2_seterr(err, errlen, -EINVAL,
						    "encryption header extension appears twice");
			if (elen != sizeof(*e))
				return qcow2_seterr(
				    err, errlen, -EINVAL,
				    "encryption header extension: length %u (want %zu)", elen,
				    sizeof(*e));
			h->crypto_offset = qcow2_be64(&e->offset);
			h->crypto_length = qcow2_be64(&e->length);
			h->has_crypto = true;
			break;
		}
		default:
			h->unknown_extensions++;
			break;
		}
		off += padded;
	}
	(void)seen_end;
	h->ext_end = off;
	return 0;
}

int qcow2_header_parse(const void *buf, size_t len, uint64_t file_size,
		       struct qcow2_header_info *out, char *err, size_t errlen)
{
	const uint8_t *b = buf;
	struct qcow2_header_info *h = out;
	uint64_t cs, limit, ext_limit, unknown;
	uint32_t magic;
	int ret;

	memset(h, 0, sizeof(*h));
	if (err && errlen)
		err[0] = '\0';
	if (file_size != UINT64_MAX && file_size < len)
		len = (size_t)file_size;
	if (len < QCOW2_HEADER_V2_LEN)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "file too short for a qcow2 header (%zu bytes, need at least %u)", len,
		    QCOW2_HEADER_V2_LEN);

	magic = qcow2_be32(b);
	if (magic != QCOW2_MAGIC)
		return qcow2_seterr(err, errlen, -EINVAL, "bad magic 0x%08x: not a qcow2 image",
				    magic);

	h->version = qcow2_be32(b + 4);
	if (h->version != 2 && h->version != 3)
		return qcow2_seterr(err, errlen, h->version > 3 ? -ENOTSUP : -EINVAL,
				    "unsupported qcow2 version %u (2 or 3)", h->version);

	h->backing_file_offset = qcow2_be64(b + 8);
	h->backing_file_size = qcow2_be32(b + 16);
	h->cluster_bits = qcow2_be32(b + 20);
	h->size = qcow2_be64(b + 24);
	h->crypt_method = qcow2_be32(b + 32);
	h->l1_size = qcow2_be32(b + 36);
	h->l1_table_offset = qcow2_be64(b + 40);
	h->refcount_table_offset = qcow2_be64(b + 48);
	h->refcount_table_clusters = qcow2_be32(b + 56);
	h->nb_snapshots = qcow2_be32(b + 60);
	h->snapshots_offset = qcow2_be64(b + 64);

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return qcow2_seterr(err, errlen, -EINVAL, "cluster_bits %u out of range (%u..%u)",
				    h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
				    QCOW2_MAX_CLUSTER_BITS);
	cs = 1ull << h->cluster_bits;
	h->cluster_size = (uint32_t)cs;

	/* The whole first cluster must be in the buffer (or the whole file). */
	limit = cs;
	if (file_size < limit)
		limit = file_size;
	if (len < limit) {
		return qcow2_seterr(
		    err, errlen, -ENOBUFS,
		    "header buffer too short (%zu bytes, the first cluster has %llu)", len,
		    (unsigned long long)cs);
	}

	if (h->version == 2) {
		h->header_length = QCOW2_HEADER_V2_LEN;
		h->refcount_order = QCOW2_V2_REFCOUNT_ORDER;
	} else {
		if (len < QCOW2_HEADER_V3_MIN)
			return qcow2_seterr(err, errlen, -EINVAL,
					    "file too short for a version 3 header (%zu bytes)",
					    len);
		h->incompatible_features = qcow2_be64(b + 72);
		h->compatible_features = qcow2_be64(b + 80);
		h->autoclear_features = qcow2_be64(b + 88);
		h->refcount_order = qcow2_be32(b + 96);
		h->header_length = qcow2_be32(b + 100);
		if (h->header_length < QCOW2_HEADER_V3_MIN || h->header_length % 8)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "header_length %u invalid (at least %u and a multiple of 8)",
			    h->header_length, QCOW2_HEADER_V3_MIN);
		if (h->header_length > cs || h->header_length > len)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "header_length %u exceeds the first cluster (%llu bytes)%s",
			    h->header_length, (unsigned long long)cs,
			    h->header_length > len ? " or the file" : "");
		if (h->header_length > offsetof(struct qcow2_header_disk, compression_type))
			h->compression_type =
			    b[offsetof(struct qcow2_header_disk, compression_type)];
	}

	/* Extensions end where the backing file name starts, or with the cluster. */
	ext_limit = limit;
	if (h->backing_file_offset && h->backing_file_offset < ext_limit)
		ext_limit = h->backing_file_offset;
	if (ext_limit < h->header_length) {
		if (h->backing_file_offset)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "backing_file_offset 0x%llx lies inside the header (header_length %u)",
			    (unsigned long long)h->backing_file_offset, h->header_length);
		ext_limit = h->header_length;
	}
	ret = parse_extensions(b, h->header_length, (uint32_t)ext_limit, file_size, h, err, errlen);
	if (ret < 0)
		return ret;

	/* Features */
	unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
	if (unknown) {
		unsigned bit = (unsigned)__builtin_ctzll(unknown);
		char name[64];

		if (qcow2_feature_name(b, h, QCOW2_FEAT_INCOMPAT, bit, name, sizeof(name)))
			return qcow2_seterr(err, errlen, -ENOTSUP,
					    "unsupported incompatible feature bit %u (%s) in "
					    "incompatible_features 0x%llx",
					    bit, name,
					    (unsigned long long)h->incompatible_features);
		return qcow2_seterr(
		    err, errlen, -ENOTSUP,
		    "unknown incompatible feature bit %u in incompatible_features 0x%llx", bit,
		    (unsigned long long)h->incompatible_features);
	}
	if (h->crypt_method != QCOW2_CRYPT_NONE) {
		if (h->crypt_method == QCOW2_CRYPT_AES || h->crypt_method == QCOW2_CRYPT_LUKS)
			return qcow2_seterr(
			    err, errlen, -ENOTSUP,
			    "encrypted images are not supported (crypt_method %u, %s)",
			    h->crypt_method, h->crypt_method == 1 ? "AES" : "LUKS");
		return qcow2_seterr(err, errlen, -EINVAL, "invalid crypt_method %u (encryption)",
				    h->crypt_method);
	}
	if (h->has_crypto)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "encryption header extension present but crypt_method is 0");
	if (h->refcount_order > QCOW2_MAX_REFCOUNT_ORDER)
		return qcow2_seterr(err, errlen, -EINVAL, "refcount_order %u out of range (0..%u)",
				    h->refcount_order, QCOW2_MAX_REFCOUNT_ORDER);
	if (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
		if (h->header_length <= offsetof(struct qcow2_header_disk, compression_type))
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "compression type feature bit set but header_length %u has no "
			    "compression_type field",
			    h->header_length);
		if (h->compression_type == QCOW2_COMPRESSION_ZLIB)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "compression type feature bit set but compression_type is 0 (zlib)");
	} else if (h->compression_type != QCOW2_COMPRESSION_ZLIB) {
		return qcow2_seterr(err, errlen, -EINVAL,
				    "compression_type %u without the compression type feature bit",
				    h->compression_type);
	}
	if (h->compression_type > QCOW2_COMPRESSION_ZSTD)
		return qcow2_seterr(err, errlen, -ENOTSUP,
				    "unknown compression_type %u (0 zlib, 1 zstd)",
				    h->compression_type);
	h->extended_l2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
	if (h->extended_l2 && h->cluster_bits < QCOW2_MIN_CLUSTER_BITS_EXTL2)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "extended L2 entries need cluster_bits >= %u (cluster_bits is %u)",
		    QCOW2_MIN_CLUSTER_BITS_EXTL2, h->cluster_bits);
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		if (!h->has_data_file)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "external data file feature bit set but no data file name extension");
		if (h->nb_snapshots)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "nb_snapshots %u: internal snapshots are not allowed with an "
			    "external data file",
			    h->nb_snapshots);
	} else if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) {
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "raw external data autoclear bit set without an external data file");
	}

	/* Derived geometry */
	h->l2_entry_size = h->extended_l2 ? 16 : 8;
	h->l2_bits = h->cluster_bits - (h->extended_l2 ? 4 : 3);
	h->l2_entries = 1u << h->l2_bits;
	h->subcluster_bits = h->extended_l2 ? h->cluster_bits - 5 : h->cluster_bits;
	h->refcount_bits = 1u << h->refcount_order;
	h->refcount_block_bits = h->cluster_bits + 3 - h->refcount_order;

	/* Virtual size vs L1 table */
	h->l1_needed = qcow2_l1_entries_for(h->size, h->cluster_bits, h->l2_bits);
	if (h->size > (UINT64_MAX >> 1) || h->l1_needed > QCOW2_MAX_L1_ENTRIES)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "size %llu too large for cluster_bits %u (needs %llu L1 entries, limit %u)",
		    (unsigned long long)h->size, h->cluster_bits, (unsigned long long)h->l1_needed,
		    QCOW2_MAX_L1_ENTRIES);
	if (h->l1_size > QCOW2_MAX_L1_ENTRIES)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "l1_size %u exceeds the limit of %u L1 entries", h->l1_size,
				    QCOW2_MAX_L1_ENTRIES);
	if (h->l1_size < h->l1_needed)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "l1_size %u too small for size %llu (needs %llu L1 entries)",
				    h->l1_size, (unsigned long long)h->size,
				    (unsigned long long)h->l1_needed);
	if (h->l1_table_offset & (cs - 1))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "l1_table_offset 0x%llx not cluster aligned",
				    (unsigned long long)h->l1_table_offset);
	if (h->l1_size) {
		uint64_t l1_bytes = (uint64_t)h->l1_size * 8;

		if (h->l1_table_offset == 0)
			return qcow2_seterr(err, errlen, -EINVAL,
					    "l1_table_offset 0 overlaps the header");
		if (!inside(h->l1_table_offset, l1_bytes, file_size))
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "L1 table (l1_table_offset 0x%llx, l1_size %u) extends past "
			    "the end of the file (%llu bytes)",
			    (unsigned long long)h->l1_table_offset, h->l1_size,
			    (unsigned long long)file_size);
		if (h->l1_table_offset >= QCOW2_MAX_HOST_OFFSET)
			return qcow2_seterr(err, errlen, -EINVAL,
					    "l1_table_offset 0x%llx out of range",
					    (unsigned long long)h->l1_table_offset);
	}

	/* Refcount table */
	if (h->refcount_table_offset & (cs - 1))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "refcount_table_offset 0x%llx not cluster aligned",
				    (unsigned long long)h->refcount_table_offset);
	if (h->refcount_table_clusters == 0)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "refcount_table_clusters is 0 (no refcount table)");
	if ((uint64_t)h->refcount_table_clusters > QCOW2_MAX_REFTABLE_BYTES >> h->cluster_bits)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "refcount_table_clusters %u exceeds the limit (%u bytes of refcount table)",
		    h->refcount_table_clusters, QCOW2_MAX_REFTABLE_BYTES);
	h->refcount_table_entries = ((uint64_t)h->refcount_table_clusters << h->cluster_bits) / 8;
	if (h->refcount_table_offset == 0)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "refcount_table_offset 0 overlaps the header");
	if (!inside(h->refcount_table_offset,
		    (uint64_t)h->refcount_table_clusters << h->cluster_bits, file_size) ||
	    h->refcount_table_offset >= QCOW2_MAX_HOST_OFFSET)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "refcount table (refcount_table_offset 0x%llx, %u clusters) extends "
		    "past the end of the file (%llu bytes)",
		    (unsigned long long)h->refcount_table_offset, h->refcount_table_clusters,
		    (unsigned long long)file_size);
	if (overlaps(h->l1_table_offset, (uint64_t)h->l1_size * 8, h->refcount_table_offset,
		     (uint64_t)h->refcount_table_clusters << h->cluster_bits))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "L1 table (0x%llx) overlaps the refcount table (0x%llx)",
				    (unsigned long long)h->l1_table_offset,
				    (unsigned long long)h->refcount_table_offset);

	/* Snapshot table: entries are variable-length, check the start here. */
	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "nb_snapshots %u exceeds the limit of %u snapshots",
				    h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
	if (h->snapshots_offset & (cs - 1))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "snapshots_offset 0x%llx not cluster aligned",
				    (unsigned long long)h->snapshots_offset);
	if (h->nb_snapshots) {
		uint64_t min_len = (uint64_t)h->nb_snapshots * sizeof(struct qcow2_snapshot_disk);

		if (h->snapshots_offset == 0)
			return qcow2_seterr(err, errlen, -EINVAL,
					    "snapshots_offset 0 overlaps the header");
		if (!inside(h->snapshots_offset, min_len, file_size))
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "snapshot table (snapshots_offset 0x%llx, %u snapshots) "
			    "extends past the end of the file",
			    (unsigned long long)h->snapshots_offset, h->nb_snapshots);
	}

	/* Backing file name: after the extensions, inside the first cluster. */
	if (h->backing_file_offset) {
		if (h->backing_file_size > QCOW2_MAX_BACKING_NAME)
			return qcow2_seterr(err, errlen, -EINVAL,
					    "backing_file_size %u too long (at most %u bytes)",
					    h->backing_file_size, QCOW2_MAX_BACKING_NAME);
		if (h->backing_file_offset < h->ext_end ||
		    !inside(h->backing_file_offset, h->backing_file_size, limit))
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "backing file name (backing_file_offset 0x%llx, backing_file_size %u) "
			    "is not inside the first cluster after the header extensions",
			    (unsigned long long)h->backing_file_offset, h->backing_file_size);
		if (!copy_name(h->backing_file, b + h->backing_file_offset, h->backing_file_size))
			return qcow2_seterr(err, errlen, -EINVAL,
					    "backing file name contains a NUL byte");
	}
	if (h->has_data_file && (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
	    (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) && h->backing_file[0])
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "raw external data file cannot be combined with a backing file");
	return 0;
}

int qcow2_snapshot_parse(const void *buf, size_t len, unsigned version,
			 struct qcow2_snapshot_info *out, char *err, size_t errlen)
{
	const uint8_t *b = buf;
	const struct qcow2_snapshot_disk *d = buf;
	uint64_t total;

	memset(out, 0, sizeof(*out));
	if (len < sizeof(*d))
		return qcow2_seterr(err, errlen, -EINVAL,
				    "snapshot entry truncated (%zu bytes left)", len);
	out->l1_table_offset = qcow2_be64(&d->l1_table_offset);
	out->l1_size = qcow2_be32(&d->l1_size);
	out->id_len = qcow2_be16(&d->id_str_size);
	out->name_len = qcow2_be16(&d->name_size);
	out->date_sec = qcow2_be32(&d->date_sec);
	out->date_nsec = qcow2_be32(&d->date_nsec);
	out->vm_clock_nsec = qcow2_be64(&d->vm_clock_nsec);
	out->vm_state_size = qcow2_be32(&d->vm_state_size);
	out->extra_data_size = qcow2_be32(&d->extra_data_size);
	if (out->extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA)
		return qcow2_seterr(err, errlen, -EINVAL,
				    "snapshot extra_data_size %u too large (limit %u)",
				    out->extra_data_size, QCOW2_MAX_SNAPSHOT_EXTRA);
	if (version >= 3 && out->extra_data_size < 16)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "snapshot extra_data_size %u too small for a version 3 image (need 16)",
		    out->extra_data_size);
	/* the padding after the entry need not exist (see format.h) */
	total = sizeof(*d) + (uint64_t)out->extra_data_size + out->id_len + out->name_len;
	if (total > len)
		return qcow2_seterr(
		    err, errlen, -EINVAL,
		    "snapshot entry (id length %u, name length %u, extra %u) runs past the "
		    "snapshot table",
		    out->id_len, out->name_len, out->extra_data_size);
	if (out->extra_data_size >= 8)
		out->vm_state_size = qcow2_be64(b + sizeof(*d));
	if (out->extra_data_size >= 16)
		out->disk_size = qcow2_be64(b + sizeof(*d) + 8);
	out->id = (const char *)b + sizeof(*d) + out->extra_data_size;
	out->name = out->id + out->id_len;
	out->raw_len = (uint32_t)total;
	out->entry_len = (uint32_t)((total + 7) & ~7ull);
	return 0;
}

char *qcow2_path_relative(const char *image, const char *name)
{
	const char *slash;
	size_t dlen, nlen;
	char *p;

	if (name[0] == '/' || !(slash = strrchr(image, '/')))
		return strdup(name);
	dlen = (size_t)(slash - image) + 1;
	nlen = strlen(name);
	p = malloc(dlen + nlen + 1);
	if (!p)
		return NULL;
	memcpy(p, image, dlen);
	memcpy(p + dlen, name, nlen + 1);
	return p;
}

static size_t ext_align8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

int qcow2_header_set_backing(const uint8_t *buf, size_t len, const struct qcow2_header_info *h,
			     const char *backing, const char *backing_fmt, uint8_t *out,
			     size_t *outlen, const char *path, char *err, size_t errlen)
{
	size_t pos, ext, blen = backing ? strlen(backing) : 0;
	size_t flen = backing_fmt ? strlen(backing_fmt) : 0;

	if (blen > QCOW2_MAX_BACKING_NAME)
		return qcow2_seterr(err, errlen, -EINVAL, "%s: backing file name too long", path);
	if (flen > QCOW2_MAX_BACKING_FMT)
		return qcow2_seterr(err, errlen, -EINVAL, "%s: backing format name too long", path);
	if (h->header_length > len)
		return qcow2_seterr(err, errlen, -EINVAL, "%s: header longer than the buffer",
				    path);
	memset(out, 0, len);
	memcpy(out, buf, h->header_length);
	pos = h->header_length;
	if (blen && flen) {
		if (pos + 8 + ext_align8(flen) > len)
			goto toobig;
		qcow2_put_be32(out + pos, QCOW2_EXT_BACKING_FORMAT);
		qcow2_put_be32(out + pos + 4, (uint32_t)flen);
		memcpy(out + pos + 8, backing_fmt, flen);
		pos += 8 + ext_align8(flen);
	}
	/* keep every other extension as it is */
	for (ext = h->header_length; ext + 8 <= len;) {
		uint32_t type = qcow2_be32(buf + ext), elen = qcow2_be32(buf + ext + 4);

		if (type == QCOW2_EXT_END)
			break;
		if (ext + 8 + ext_align8(elen) > len)
			return qcow2_seterr(
			    err, errlen, -EINVAL,
			    "%s: header extension 0x%08x runs past the first cluster", path, type);
		if (type != QCOW2_EXT_BACKING_FORMAT) {
			if (pos + 8 + ext_align8(elen) > len)
				goto toobig;
			memcpy(out + pos, buf + ext, 8 + ext_align8(elen));
			pos += 8 + ext_align8(elen);
		}
		ext += 8 + ext_align8(elen);
	}
	if (pos + 8 + blen > len)
		goto toobig;
	qcow2_put_be32(out + pos, QCOW2_EXT_END);
	qcow2_put_be32(out + pos + 4, 0);
	pos += 8;
	qcow2_put_be64(out + 8, blen ? pos : 0);  /* backing_file_offset */
	qcow2_put_be32(out + 16, (uint32_t)blen); /* backing_file_size */
	if (blen)
		memcpy(out + pos, backing, blen);
	pos += blen;
	if (h->backing_file_offset && h->backing_file_offset + h->backing_file_size > pos &&
	    h->backing_file_offset + h->backing_file_size <= len)
		pos = h->backing_file_offset + h->backing_file_size;
	if (h->ext_end > pos && h->ext_end <= len)
		pos = h->ext_end;
	*outlen = pos;
	return 0;

toobig:
	return qcow2_seterr(err, errlen, -ENOSPC,
			    "%s: the header does not fit in the first cluster", path);
}

int qcow2_reftable_layout(unsigned cluster_bits, unsigned rbb, uint64_t old, uint64_t need,
			  uint64_t a, uint64_t *entries, uint64_t *nb, uint64_t *nt)
{
	uint64_t per_cl = (1ull << cluster_bits) / 8,
		 max_t = QCOW2_MAX_REFTABLE_BYTES >> cluster_bits;
	uint64_t ne = old * 2 > need + 1 ? old * 2 : need + 1, t, b, last;

	if ((a >> rbb) < old)
		return -ENOSPC;
	for (;;) {
		t = (ne + per_cl - 1) / per_cl;
		if (t > max_t)
			t = max_t;
		ne = t * per_cl;
		/* blocks for the new area, themselves and the table included */
		for (b = 0;;) {
			uint64_t x = ((a + b + t - 1) >> rbb) - (a >> rbb) + 1;

			if (x == b)
				break;
			b = x;
		}
		last = (a + b + t - 1) >> rbb;
		if (last < ne && need < ne)
			break;
		if (t == max_t)
			return -ENOSPC;
		ne = (last > need ? last : need) + 1;
	}
	*entries = ne;
	*nb = b;
	*nt = t;
	return 0;
}
