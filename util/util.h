/* SPDX-License-Identifier: MIT */
/*
 * util/ — small helpers shared by the programs in src/ (vqcowd, vqcow-img).
 * Knows nothing of the other modules and includes nothing of ours; only
 * src/ and tests/ link it.
 */
#ifndef VQCOW_UTIL_H
#define VQCOW_UTIL_H

#include <stdint.h>

/*
 * Parse a byte count the way qemu-img 7.2 does (qemu_strtosz with bytes as
 * the default unit), so command lines users wrote for qemu-img work as is:
 *   - a decimal integer, optionally preceded by white space or '+';
 *     "0x..." is hexadecimal (no fraction then);
 *   - an optional fraction ("1.5G", "1.k"), allowed only with a suffix
 *     other than B; no exponent;
 *   - an optional suffix, case-insensitive: B (bytes), K, M, G, T, P, E
 *     (powers of 1024); nothing may follow it.
 * The result is rounded to the nearest byte (halves up).
 * 0 and *@out set, -EINVAL (not a size) or -ERANGE (above UINT64_MAX); the
 * caller checks its own bounds.
 */
int util_parse_size(const char *s, uint64_t *out);

/*
 * Parse a plain decimal integer: digits only (no sign, space or suffix).
 * 0 and *@out set, -EINVAL or -ERANGE.
 */
int util_parse_uint(const char *s, uint64_t *out);

#endif /* VQCOW_UTIL_H */
