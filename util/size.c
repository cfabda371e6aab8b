/* SPDX-License-Identifier: MIT */
/* util/size.c — the one size parser (util.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* The multiplier of a size suffix, or 0 if @c is not one. */
static uint64_t suffix_mul(char c)
{
	switch (c) {
	case 'b':
	case 'B':
		return 1;
	case 'k':
	case 'K':
		return 1ull << 10;
	case 'm':
	case 'M':
		return 1ull << 20;
	case 'g':
	case 'G':
		return 1ull << 30;
	case 't':
	case 'T':
		return 1ull << 40;
	case 'p':
	case 'P':
		return 1ull << 50;
	case 'e':
	case 'E':
		return 1ull << 60;
	default:
		return 0;
	}
}

int util_parse_size(const char *s, uint64_t *out)
{
	char *end;
	uint64_t val, frac = 0, mul;
	bool has_frac = false;
	unsigned __int128 r;

	if (!s)
		return -EINVAL;
	/* The integral part: decimal (strtoull skips white space, takes '+'). */
	errno = 0;
	val = strtoull(s, &end, 10);
	if (end == s)
		return -EINVAL;
	if (errno == ERANGE)
		return -ERANGE;
	if (memchr(s, '-', (size_t)(end - s)))
		return -EINVAL; /* strtoull would negate */
	if (val == 0 && (*end == 'x' || *end == 'X')) {
		/* "0x...": hexadecimal, without a fraction. */
		errno = 0;
		val = strtoull(s, &end, 16);
		if (errno == ERANGE)
			return -ERANGE;
		if (*end == '.')
			return -EINVAL;
	} else if (*end == '.') {
		/* A fraction: ".5", or "." alone as in "1.k"; no exponent. */
		const char *f = end;
		double d;

		errno = 0;
		d = strtod(f, &end);
		if (end == f || errno == ERANGE) {
			end = (char *)f + 1;
		} else if (memchr(f, 'e', (size_t)(end - f)) || memchr(f, 'E', (size_t)(end - f))) {
			return -EINVAL;
		} else if (d >= 1.0) {
			/* .999... rounded up to 1 in a double: the largest
			 * fraction, which rounds to a whole unit below. */
			has_frac = true;
			frac = UINT64_MAX;
		} else {
			/* A 0.64 fixed-point fraction. */
			frac = (uint64_t)(d * 0x1p64);
			has_frac = frac != 0;
		}
	}
	mul = suffix_mul(*end);
	if (mul)
		end++;
	else
		mul = 1;
	if (*end)
		return -EINVAL;
	if (mul == 1) {
		if (has_frac)
			return -EINVAL; /* fractional bytes */
		*out = val;
		return 0;
	}
	/* val * mul + frac * mul, rounded to the nearest byte (halves up). */
	r = (unsigned __int128)val * mul;
	if (has_frac) {
		unsigned __int128 fm = (unsigned __int128)frac * mul;

		r += fm >> 64;
		r += ((uint64_t)fm >> 63) & 1;
	}
	if (r > UINT64_MAX)
		return -ERANGE;
	*out = (uint64_t)r;
	return 0;
}

int util_parse_uint(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!s || *s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	if (*end)
		return -EINVAL;
	*out = v;
	return 0;
}
