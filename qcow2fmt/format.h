/* SPDX-License-Identifier: MIT */
/*
 * qcow2fmt/format.h — the qcow2 on-disk format (QEMU docs/interop/qcow2.txt),
 * big-endian accessors and a pure header parser/validator.
 *
 * Nothing here does I/O: the header parser works on a buffer the caller read
 * (the first cluster of the file), and the entry helpers (the one L2-entry
 * classifier among them) decode values the caller loaded. Shared by the
 * engine (qcow2/) and the offline tool (qcow2tool/); image.h adds what needs
 * reading, over an I/O interface the caller provides.
 *
 * Summary of the format (our words; the spec is the source of truth):
 *  - The file is cut into clusters of 1 << cluster_bits bytes (512 B..2 MiB
 *    here). All numbers are big-endian.
 *  - Cluster 0 holds the header, then header extensions (type, length, data
 *    padded to 8), terminated by an end marker (type 0), then optionally the
 *    backing file name; all of it inside the first cluster.
 *  - Guest offsets map through a two-level table: the L1 table (contiguous,
 *    l1_size entries of 8 bytes) points at L2 tables (one cluster each) whose
 *    entries describe one guest cluster each (8 bytes, or 16 bytes with
 *    extended L2 entries, which add a bitmap for 32 subclusters).
 *  - Host clusters are reference counted through a two-level structure: the
 *    refcount table (contiguous, refcount_table_clusters clusters of 8-byte
 *    entries) points at refcount blocks (one cluster each) holding
 *    cluster_size * 8 / refcount_bits counters of refcount_bits = 1 <<
 *    refcount_order bits.
 *  - Internal snapshots: a table of variable-length entries, each naming an
 *    L1 table; clusters shared with snapshots have refcount > 1 and the
 *    active tables' COPIED flag (bit 63) clear, so writes to them copy.
 */
#ifndef VQCOW_QCOW2_FORMAT_H
#define VQCOW_QCOW2_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- big-endian accessors (unaligned-safe) ---- */

static inline uint16_t qcow2_be16(const void *p)
{
	const uint8_t *b = p;

	return (uint16_t)((unsigned)b[0] << 8 | b[1]);
}

static inline uint32_t qcow2_be32(const void *p)
{
	const uint8_t *b = p;

	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static inline uint64_t qcow2_be64(const void *p)
{
	const uint8_t *b = p;

	return (uint64_t)qcow2_be32(b) << 32 | qcow2_be32(b + 4);
}

static inline void qcow2_put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;

	b[0] = (uint8_t)(v >> 8);
	b[1] = (uint8_t)v;
}

static inline void qcow2_put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;

	b[0] = (uint8_t)(v >> 24);
	b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8);
	b[3] = (uint8_t)v;
}

static inline void qcow2_put_be64(void *p, uint64_t v)
{
	qcow2_put_be32(p, (uint32_t)(v >> 32));
	qcow2_put_be32((uint8_t *)p + 4, (uint32_t)v);
}

/* ---- header ---- */

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

#define QCOW2_HEADER_V2_LEN 72u  /* version 2: exactly this long */
#define QCOW2_HEADER_V3_MIN 104u /* version 3: at least this, multiple of 8 */
#define QCOW2_HEADER_V3_LEN 112u /* what we write: up to compression_type + padding */

#define QCOW2_MIN_CLUSTER_BITS       9u
#define QCOW2_MAX_CLUSTER_BITS       21u /* 2 MiB, QEMU's implementation limit too */
#define QCOW2_MIN_CLUSTER_BITS_EXTL2 14u /* extended L2 needs >= 16 KiB clusters */
#define QCOW2_MAX_CLUSTER_SIZE       (1u << QCOW2_MAX_CLUSTER_BITS)

#define QCOW2_MAX_REFCOUNT_ORDER 6u /* 64-bit refcounts */
#define QCOW2_V2_REFCOUNT_ORDER  4u /* version 2 is always 16-bit */

#define QCOW2_MAX_BACKING_NAME     1023u       /* bytes, not NUL-terminated on disk */
#define QCOW2_MAX_DATA_FILE_NAME   1023u       /* our limit for the data file name */
#define QCOW2_MAX_BACKING_FMT      31u         /* our limit for the format name */
#define QCOW2_MAX_L1_BYTES         (32u << 20) /* QEMU's limit: 32 MiB of L1 table */
#define QCOW2_MAX_L1_ENTRIES       (QCOW2_MAX_L1_BYTES / 8u)
#define QCOW2_MAX_REFTABLE_BYTES   (8u << 20) /* QEMU's limit: 8 MiB of refcount table */
#define QCOW2_MAX_SNAPSHOTS        65536u
#define QCOW2_MAX_SNAPSHOTS_BYTES  (64u << 20) /* whole snapshot table */
#define QCOW2_MAX_SNAPSHOT_EXTRA   1024u       /* extra data per snapshot entry */
#define QCOW2_MAX_BITMAPS          65535u
#define QCOW2_MAX_BITMAP_DIR_BYTES (64u << 20)

/* Host offsets stored in L1/L2 entries are limited to 56 bits (64 PiB). */
#define QCOW2_MAX_HOST_OFFSET (1ull << 56)

enum {
	QCOW2_CRYPT_NONE = 0,
	QCOW2_CRYPT_AES = 1,
	QCOW2_CRYPT_LUKS = 2,
};

enum {
	QCOW2_COMPRESSION_ZLIB = 0,
	QCOW2_COMPRESSION_ZSTD = 1,
};

/* incompatible_features: an unknown set bit makes the image unopenable. */
#define QCOW2_INCOMPAT_DIRTY       (1ull << 0) /* refcounts may be stale (lazy refcounts) */
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1) /* do not write (except to repair) */
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2) /* guest data in an external file */
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3) /* compression_type field is non-zero */
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4) /* extended (128-bit) L2 entries */
#define QCOW2_INCOMPAT_KNOWN       0x1full

/* compatible_features: unknown bits may be ignored. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)

/*
 * autoclear_features: a writer must clear the bits it does not maintain
 * before its first write.
 */
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << 0) /* bitmaps extension consistent */
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1) /* data file is a valid raw image */
#define QCOW2_AUTOCLEAR_KNOWN         0x3ull

/*
 * The header as stored (all fields big-endian; read them with qcow2_be*()).
 * Version 2 ends at incompatible_features (72 bytes); version 3 has at least
 * 104 bytes; fields at or beyond header_length are absent and read as 0.
 */
struct qcow2_header_disk {
	uint32_t magic;
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size; /* virtual disk size, bytes */
	uint32_t crypt_method;
	uint32_t l1_size; /* entries */
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	/* version 3 from here */
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	/* optional additional fields */
	uint8_t compression_type;
	uint8_t padding[7];
} __attribute__((packed));

_Static_assert(sizeof(struct qcow2_header_disk) == QCOW2_HEADER_V3_LEN, "qcow2 header size");
_Static_assert(offsetof(struct qcow2_header_disk, incompatible_features) == QCOW2_HEADER_V2_LEN,
	       "qcow2 v2 header size");
_Static_assert(offsetof(struct qcow2_header_disk, compression_type) == QCOW2_HEADER_V3_MIN,
	       "qcow2 v3 minimal header size");

/* Byte offsets of header fields, for single-field updates (e.g. the corrupt bit). */
#define QCOW2_OFF_SIZE                  offsetof(struct qcow2_header_disk, size)
#define QCOW2_OFF_L1_SIZE               offsetof(struct qcow2_header_disk, l1_size)
#define QCOW2_OFF_L1_TABLE_OFFSET       offsetof(struct qcow2_header_disk, l1_table_offset)
#define QCOW2_OFF_REFCOUNT_TABLE_OFFSET offsetof(struct qcow2_header_disk, refcount_table_offset)
#define QCOW2_OFF_REFCOUNT_TABLE_CLUSTERS                                                          \
	offsetof(struct qcow2_header_disk, refcount_table_clusters)
#define QCOW2_OFF_INCOMPAT  offsetof(struct qcow2_header_disk, incompatible_features)
#define QCOW2_OFF_COMPAT    offsetof(struct qcow2_header_disk, compatible_features)
#define QCOW2_OFF_AUTOCLEAR offsetof(struct qcow2_header_disk, autoclear_features)

/* ---- header extensions ---- */

#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau /* string: backing file format name */
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u /* array of struct qcow2_feature_name */
#define QCOW2_EXT_BITMAPS        0x23852875u /* struct qcow2_bitmaps_ext */
#define QCOW2_EXT_CRYPTO         0x0537be77u /* struct qcow2_crypto_ext (LUKS only) */
#define QCOW2_EXT_DATA_FILE      0x44415441u /* string: external data file name */

/* Every extension: this header, then @len bytes of data padded to 8 bytes. */
struct qcow2_ext_disk {
	uint32_t type;
	uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_ext_disk) == 8, "qcow2 extension header size");

enum {
	QCOW2_FEAT_INCOMPAT = 0,
	QCOW2_FEAT_COMPAT = 1,
	QCOW2_FEAT_AUTOCLEAR = 2,
};

/* Feature name table entry; name padded with zeroes, not always terminated. */
struct qcow2_feature_name {
	uint8_t type; /* QCOW2_FEAT_* */
	uint8_t bit;  /* 0..63 */
	char name[46];
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_feature_name) == 48, "qcow2 feature name entry size");

struct qcow2_bitmaps_ext {
	uint32_t nb_bitmaps; /* >= 1 */
	uint32_t reserved;   /* zero */
	uint64_t bitmap_directory_size;
	uint64_t bitmap_directory_offset; /* cluster aligned */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_bitmaps_ext) == 24, "qcow2 bitmaps extension size");

struct qcow2_crypto_ext {
	uint64_t offset; /* cluster aligned */
	uint64_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_crypto_ext) == 16, "qcow2 crypto extension size");

/* ---- L1 table entries ---- */

#define QCOW2_OFLAG_COPIED     (1ull << 63) /* refcount exactly 1 (active tables only) */
#define QCOW2_OFLAG_COMPRESSED (1ull << 62) /* L2 only */
#define QCOW2_OFLAG_ZERO       (1ull << 0)  /* L2 standard entry, v3 without extended L2 */

#define QCOW2_L1E_OFFSET_MASK   0x00fffffffffffe00ull /* bits 9..55 */
#define QCOW2_L1E_RESERVED_MASK 0x7f000000000001ffull

/* ---- L2 table entries ---- */

#define QCOW2_L2E_OFFSET_MASK 0x00fffffffffffe00ull /* standard: bits 9..55 */
/* standard entry reserved bits 1..8 and 56..61 (bit 0 is ZERO, reserved with extended L2) */
#define QCOW2_L2E_STD_RESERVED_MASK 0x3f000000000001feull

/*
 * Compressed cluster descriptor (bit 62 set), with x = 62 - (cluster_bits - 8):
 *   bits 0..x-1  host byte offset of the compressed data (not aligned; bits
 *                beyond 55 must be 0),
 *   bits x..61   number of additional 512-byte sectors after the one holding
 *                the offset.
 * The data occupies [offset, (offset & ~511) + (nsect + 1) * 512): decompress
 * until a full cluster came out; the tail may be garbage or another cluster.
 */
static inline unsigned qcow2_compressed_shift(unsigned cluster_bits)
{
	return 62u - (cluster_bits - 8u);
}

static inline uint64_t qcow2_compressed_offset(uint64_t l2e, unsigned cluster_bits)
{
	return l2e & ((1ull << qcow2_compressed_shift(cluster_bits)) - 1);
}

static inline uint64_t qcow2_compressed_nsect(uint64_t l2e, unsigned cluster_bits)
{
	return (l2e >> qcow2_compressed_shift(cluster_bits)) & ((1ull << (cluster_bits - 8u)) - 1);
}

/* Bytes from the host offset to the end of the last sector of compressed data. */
static inline uint64_t qcow2_compressed_len(uint64_t l2e, unsigned cluster_bits)
{
	uint64_t off = qcow2_compressed_offset(l2e, cluster_bits);

	return (qcow2_compressed_nsect(l2e, cluster_bits) + 1) * 512 - (off & 511);
}

/* Build a compressed entry (COPIED clear, as the spec requires). @len >= 1. */
static inline uint64_t qcow2_compressed_entry(uint64_t host_off, uint64_t len,
					      unsigned cluster_bits)
{
	uint64_t nsect = ((host_off & 511) + len + 511) / 512 - 1;

	return QCOW2_OFLAG_COMPRESSED | nsect << qcow2_compressed_shift(cluster_bits) | host_off;
}

/*
 * Extended L2 entries: 16 bytes, the standard 64-bit entry (bit 0 reserved)
 * followed by a 64-bit bitmap for the 32 equal subclusters of the cluster:
 *   bits 0..31   subcluster i allocated (data at host offset + i * sc_size)
 *   bits 32..63  subcluster i - 32 reads as zeroes (alloc bit must be clear)
 * Unallocated, non-zero subclusters read from the backing file (or zeroes).
 * Compressed clusters have no subclusters: their bitmap is reserved (0).
 */
#define QCOW2_SUBCLUSTERS   32u
#define QCOW2_SC_ALLOC(i)   (1ull << (i))
#define QCOW2_SC_ZERO(i)    (1ull << (32 + (i)))
#define QCOW2_SC_ALLOC_MASK 0x00000000ffffffffull
#define QCOW2_SC_ZERO_MASK  0xffffffff00000000ull

/* Subclusters [first, first + n) as a 32-bit mask (n >= 1, first + n <= 32). */
static inline uint32_t qcow2_sc_range(unsigned first, unsigned n)
{
	return (uint32_t)((n >= 32 ? 0xffffffffull : ((1ull << n) - 1)) << first);
}

/*
 * The one L2-entry classifier (shared by the engine's mapping, the checker
 * and vqcow-img map). It decodes what an entry says, nothing more: whether
 * the entry is valid (reserved bits, alignment, bounds) is checked by its
 * user. @data_file: the image has an external data file, where an entry
 * without an offset but with COPIED set maps the cluster at the same offset.
 */
enum qcow2_cluster_type {
	QCOW2_CT_UNALLOCATED = 0, /* no host cluster: the backing file decides */
	QCOW2_CT_ZERO_PLAIN,      /* standard entry: reads as zeroes, no host cluster */
	QCOW2_CT_ZERO_ALLOC,      /* standard entry: reads as zeroes, host cluster kept */
	QCOW2_CT_NORMAL,          /* a host cluster (with extended L2: see the bitmap) */
	QCOW2_CT_COMPRESSED,
};

static inline enum qcow2_cluster_type qcow2_cluster_type(uint64_t e, bool extl2, bool data_file)
{
	if (e & QCOW2_OFLAG_COMPRESSED)
		return QCOW2_CT_COMPRESSED;
	if ((e & QCOW2_OFLAG_ZERO) && !extl2)
		return (e & QCOW2_L2E_OFFSET_MASK) ? QCOW2_CT_ZERO_ALLOC : QCOW2_CT_ZERO_PLAIN;
	if (!(e & QCOW2_L2E_OFFSET_MASK))
		return data_file && (e & QCOW2_OFLAG_COPIED) ? QCOW2_CT_NORMAL
							     : QCOW2_CT_UNALLOCATED;
	return QCOW2_CT_NORMAL;
}

/* What one subcluster (the whole cluster without extended L2) reads as. */
enum qcow2_subcluster_type {
	QCOW2_SCT_NORMAL = 0,    /* data at the host offset */
	QCOW2_SCT_ZERO_ALLOC,    /* zeroes; the cluster has a host offset */
	QCOW2_SCT_UNALLOC_ALLOC, /* backing file; the cluster has a host offset (extended L2) */
	QCOW2_SCT_ZERO_PLAIN,    /* zeroes; no host offset */
	QCOW2_SCT_UNALLOC_PLAIN, /* backing file; no host offset */
	QCOW2_SCT_COMPRESSED,    /* the whole cluster is compressed */
	QCOW2_SCT_INVALID,       /* the bitmap contradicts itself or the entry */
};

/* Subcluster @sc (< 32; ignored without extended L2) of entry @e with bitmap @bm. */
static inline enum qcow2_subcluster_type qcow2_subcluster_type(uint64_t e, uint64_t bm, unsigned sc,
							       bool extl2, bool data_file)
{
	switch (qcow2_cluster_type(e, extl2, data_file)) {
	case QCOW2_CT_COMPRESSED:
		return QCOW2_SCT_COMPRESSED;
	case QCOW2_CT_ZERO_PLAIN:
		return QCOW2_SCT_ZERO_PLAIN;
	case QCOW2_CT_ZERO_ALLOC:
		return QCOW2_SCT_ZERO_ALLOC;
	case QCOW2_CT_NORMAL:
		if (!extl2)
			return QCOW2_SCT_NORMAL;
		if ((bm >> 32) & bm & QCOW2_SC_ALLOC_MASK)
			return QCOW2_SCT_INVALID;
		if (bm & QCOW2_SC_ZERO(sc))
			return QCOW2_SCT_ZERO_ALLOC;
		if (bm & QCOW2_SC_ALLOC(sc))
			return QCOW2_SCT_NORMAL;
		return QCOW2_SCT_UNALLOC_ALLOC;
	case QCOW2_CT_UNALLOCATED:
		break;
	}
	if (!extl2)
		return QCOW2_SCT_UNALLOC_PLAIN;
	if (bm & QCOW2_SC_ALLOC_MASK)
		return QCOW2_SCT_INVALID;
	if (bm & QCOW2_SC_ZERO(sc))
		return QCOW2_SCT_ZERO_PLAIN;
	return QCOW2_SCT_UNALLOC_PLAIN;
}

/* ---- refcounts ---- */

#define QCOW2_RTE_OFFSET_MASK   0xfffffffffffffe00ull /* bits 9..63 */
#define QCOW2_RTE_RESERVED_MASK 0x1ffull

/*
 * Refcount of entry @idx of a refcount block (or slice) at @blk, for
 * refcount_bits = 1 << @order. Sub-byte widths pack from the least
 * significant bit of each byte; wider ones are big-endian.
 */
static inline uint64_t qcow2_refcount_get(const void *blk, uint64_t idx, unsigned order)
{
	const uint8_t *b = blk;

	switch (order) {
	case 0:
	case 1:
	case 2: {
		unsigned bits = 1u << order, per = 8u / bits;

		return (b[idx / per] >> ((idx % per) * bits)) & ((1u << bits) - 1);
	}
	case 3:
		return b[idx];
	case 4:
		return qcow2_be16(b + idx * 2);
	case 5:
		return qcow2_be32(b + idx * 4);
	default:
		return qcow2_be64(b + idx * 8);
	}
}

/* Store @v (must fit in refcount_bits) at entry @idx. */
static inline void qcow2_refcount_set(void *blk, uint64_t idx, unsigned order, uint64_t v)
{
	uint8_t *b = blk;

	switch (order) {
	case 0:
	case 1:
	case 2: {
		unsigned bits = 1u << order, per = 8u / bits, sh = (unsigned)(idx % per) * bits;
		unsigned mask = ((1u << bits) - 1) << sh;

		b[idx / per] = (uint8_t)((b[idx / per] & ~mask) | (((unsigned)v << sh) & mask));
		break;
	}
	case 3:
		b[idx] = (uint8_t)v;
		break;
	case 4:
		qcow2_put_be16(b + idx * 2, (uint16_t)v);
		break;
	case 5:
		qcow2_put_be32(b + idx * 4, (uint32_t)v);
		break;
	default:
		qcow2_put_be64(b + idx * 8, v);
		break;
	}
}

/* Largest refcount for @order. */
static inline uint64_t qcow2_refcount_max(unsigned order)
{
	return order >= 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
}

/*
 * Where a grown refcount table goes, for the engine (qcow2/alloc.c) and the
 * offline edits (snapshot.c) alike. @a is the first free cluster past
 * everything in use, and its refcount block index (@a >> @rbb) is past the
 * old table's @old entries, so every block the new area needs is new. The
 * new table has at least twice the old entries and covers index @need,
 * rounded up to whole clusters (at most QCOW2_MAX_REFTABLE_BYTES); the new
 * area is *@nb refcount blocks at @a, @a + 1, ... (describing the whole new
 * area, themselves included), then the table's *@nt clusters; *@entries is
 * the new table's entry count. 0, or -ENOSPC (the table would exceed its
 * limit, or @a is not past the old reach).
 */
int qcow2_reftable_layout(unsigned cluster_bits, unsigned rbb, uint64_t old, uint64_t need,
			  uint64_t a, uint64_t *entries, uint64_t *nb, uint64_t *nt);

/* ---- snapshot table ---- */

/*
 * Snapshot table entry: this fixed part, then extra_data_size bytes of extra
 * data (struct qcow2_snapshot_extra, possibly shorter or longer), the ID
 * string, the name string, padding to a multiple of 8. Version 3 requires
 * extra data up to disk_size (16 bytes).
 *
 * The padding only places the next entry: QEMU neither writes nor allocates
 * it after the last entry, and the table is usually the last thing in the
 * file, so the file may end right after the last name. Bounds checks use the
 * unpadded length (raw_len); the next entry starts entry_len bytes on.
 */
struct qcow2_snapshot_disk {
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint16_t id_str_size;
	uint16_t name_size;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint32_t vm_state_size; /* ignored when extra has vm_state_size_large */
	uint32_t extra_data_size;
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_snapshot_disk) == 40, "qcow2 snapshot entry size");

struct qcow2_snapshot_extra {
	uint64_t vm_state_size_large;
	uint64_t disk_size;
	uint64_t icount; /* QEMU >= 5.2; optional */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_snapshot_extra) == 24, "qcow2 snapshot extra size");

/* One decoded snapshot table entry. */
struct qcow2_snapshot_info {
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint64_t vm_state_size;
	uint64_t disk_size; /* 0 if absent (v2) */
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint32_t extra_data_size;
	uint16_t id_len, name_len;
	const char *id;     /* points into the caller's buffer, not terminated */
	const char *name;   /* likewise */
	uint32_t raw_len;   /* bytes of the entry without the padding */
	uint32_t entry_len; /* raw_len rounded up to 8: offset of the next entry */
};

/* ---- decoded header ---- */

/*
 * What qcow2_header_parse() fills. Numbers are in host order; derived values
 * are precomputed. Strings are NUL-terminated copies.
 */
struct qcow2_header_info {
	uint32_t version;       /* 2 or 3 */
	uint32_t header_length; /* 72 for v2 */
	uint32_t cluster_bits;
	uint32_t cluster_size;
	uint64_t size;         /* virtual disk size, bytes */
	uint32_t crypt_method; /* always 0 after a successful parse */

	uint32_t l1_size; /* entries */
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;

	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;  /* 4 for v2 */
	uint8_t compression_type; /* QCOW2_COMPRESSION_* */

	/* derived */
	bool extended_l2;
	uint32_t l2_entry_size;   /* 8, or 16 with extended L2 */
	uint32_t l2_bits;         /* log2(entries per L2 table) */
	uint32_t l2_entries;      /* entries per L2 table */
	uint32_t subcluster_bits; /* log2(subcluster size) (= cluster_bits without extended L2) */
	uint32_t refcount_bits;   /* 1 << refcount_order */
	uint32_t refcount_block_bits;    /* log2(entries per refcount block) */
	uint64_t refcount_table_entries; /* refcount_table_clusters * cluster_size / 8 */
	uint64_t l1_needed;              /* L1 entries needed to cover size */

	/* backing file (header fields) */
	uint64_t backing_file_offset; /* 0 = none */
	uint32_t backing_file_size;
	char backing_file[QCOW2_MAX_BACKING_NAME + 1]; /* "" = none */

	/* header extensions */
	uint32_t ext_end; /* offset just past the end marker (or the last extension) */
	bool has_backing_fmt;
	char backing_fmt[QCOW2_MAX_BACKING_FMT + 1];
	bool has_data_file;
	char data_file[QCOW2_MAX_DATA_FILE_NAME + 1];
	uint32_t feature_table_offset; /* byte offset of the table's data in the header buffer, 0 =
					  none */
	uint32_t feature_table_len;    /* entries */
	bool has_bitmaps;
	uint32_t nb_bitmaps;
	uint64_t bitmap_directory_size;
	uint64_t bitmap_directory_offset;
	bool has_crypto;
	uint64_t crypto_offset, crypto_length;
	uint32_t unknown_extensions; /* count of unknown (ignored) extensions */
};

/*
 * Parse and validate a qcow2 header with its extensions and backing file name.
 *
 * @buf/@len: the start of the image file. It must hold the whole first
 *     cluster or the whole file if that is shorter; reading
 *     QCOW2_MAX_CLUSTER_SIZE bytes (or up to EOF) is always enough.
 * @file_size: current size of the image file in bytes; table offsets must lie
 *     inside it (pass UINT64_MAX when unknown to skip those checks).
 * @out: filled on success (and partly on failure).
 * @err/@errlen: on failure a one-line message naming the field and the
 *     problem (without the file name); may be NULL.
 *
 * Checks: magic, version 2/3, header_length (v3: >= 104, multiple of 8,
 * within the first cluster), cluster_bits 9..21 (>= 14 with extended L2),
 * unknown incompatible bits (named from the feature table when present),
 * crypt_method (any encryption is refused), refcount_order 0..6 (4 for v2),
 * compression type, size vs L1 size and the 32 MiB L1 limit, alignment and
 * in-file placement of the L1 table, refcount table (8 MiB limit) and
 * snapshot table (count limit), overlaps of these with the header and each
 * other, the backing file name (length <= 1023, inside the first cluster
 * after the extensions), and every header extension (bounds, duplicates,
 * lengths, the fields of known ones). The dirty and corrupt bits are only
 * reported (in incompatible_features); deciding about them is the caller's.
 *
 * Returns 0, -EINVAL (invalid image: message set), -ENOTSUP (valid but uses
 * something we do not support: encryption, unknown incompatible features,
 * unknown compression type; message set), or -ENOBUFS if @len is shorter
 * than min(cluster size, @file_size) (out->cluster_size is set: read more and
 * call again).
 */
int qcow2_header_parse(const void *buf, size_t len, uint64_t file_size,
		       struct qcow2_header_info *out, char *err, size_t errlen);

/*
 * The first cluster with another backing file name and format (qemu-img
 * rebase -u, and the end of an intermediate block-commit). @buf holds the
 * first @len bytes of the image (@len <= the cluster size, enough for the
 * header and its extensions), @h its parse; @backing NULL or "" removes the
 * backing file, @backing_fmt NULL omits the format extension. Every other
 * extension is kept byte for byte (unknown ones too, as the spec asks), the
 * backing format extension goes first, then the end marker and the name.
 * Fills @out (@len bytes) and *@outlen: the bytes to write at offset 0 (at
 * least as far as the old header used, so stale bytes of a longer old name
 * go too). 0, -EINVAL (names too long, an extension running past @len) or
 * -ENOSPC (does not fit in the first cluster), with a message naming @path.
 */
int qcow2_header_set_backing(const uint8_t *buf, size_t len, const struct qcow2_header_info *h,
			     const char *backing, const char *backing_fmt, uint8_t *out,
			     size_t *outlen, const char *path, char *err, size_t errlen);

/*
 * Look up a feature's name in the feature name table of the header buffer
 * @buf that @info was parsed from (or our built-in names for the known
 * bits). Writes a NUL-terminated name into @name (@namelen bytes). Returns
 * true if a name was found.
 */
bool qcow2_feature_name(const void *buf, const struct qcow2_header_info *info, unsigned type,
			unsigned bit, char *name, size_t namelen);

/*
 * Decode one snapshot table entry at @buf (@len bytes available; the
 * entry's trailing padding need not be among them).
 * @version: the image version (v3 requires 16 bytes of extra data).
 * Fills @out (strings point into @buf). Returns 0 or -EINVAL with a message
 * naming the field in @err.
 */
int qcow2_snapshot_parse(const void *buf, size_t len, unsigned version,
			 struct qcow2_snapshot_info *out, char *err, size_t errlen);

/*
 * Number of L1 entries needed to cover @size bytes with @cluster_bits and
 * @l2_bits (entries per L2 table, log2). Never overflows.
 */
static inline uint64_t qcow2_l1_entries_for(uint64_t size, unsigned cluster_bits, unsigned l2_bits)
{
	unsigned shift = cluster_bits + l2_bits;
	uint64_t n = size >> shift;

	return n + ((size & ((1ull << shift) - 1)) != 0);
}

/* ---- helpers shared by the engine and the tool ---- */

/*
 * The longest backing chain opened or walked (the image itself plus up to
 * this many backing files); deeper chains, and loops, are refused.
 */
#define QCOW2_MAX_CHAIN_DEPTH 16u

/*
 * The one error formatter: printf @fmt into @err (@errlen bytes; nothing if
 * @err is NULL or @errlen 0) and return @ret, so a failure reads
 * "return qcow2_seterr(err, errlen, -EINVAL, ...)".
 */
int qcow2_seterr(char *err, size_t errlen, int ret, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/*
 * The one backing/data file name resolver: @name relative to the directory
 * of @image (as QEMU resolves a relative backing file name), or a copy of
 * @name if it is absolute or @image has no directory part. malloc'd; NULL on
 * ENOMEM.
 */
char *qcow2_path_relative(const char *image, const char *name);

#endif /* VQCOW_QCOW2_FORMAT_H */
