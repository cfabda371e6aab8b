/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of util/: the size parser shared by vqcowd and vqcow-img.
 *
 * The expected values are what QEMU 7.2's parser (qemu_strtosz, bytes as the
 * default unit) gives, as measured with `qemu-io -c "write -z 0 SIZE"` and
 * `qemu-img create`: fractions round to the nearest byte, hex is accepted,
 * leading white space and '+' too, trailing characters are not. One row
 * deliberately differs: where a long fraction like .999999999999999999999
 * rounds to 1.0 in a double, QEMU's conversion to a 0.64 fixed-point value
 * overflows (undefined behaviour; 0 on x86-64, so "3.999...k" gives 3072)
 * while we give the nearest byte (4096).
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"
#include "testutil.h"

static const struct {
	const char *in;
	int ret;
	uint64_t out;
} size_rows[] = {
    {"0", 0, 0},
    {"1", 0, 1},
    {"512", 0, 512},
    {"1k", 0, 1024},
    {"1K", 0, 1024},
    {"1m", 0, 1ull << 20},
    {"1M", 0, 1ull << 20},
    {"1G", 0, 1ull << 30},
    {"1T", 0, 1ull << 40},
    {"1P", 0, 1ull << 50},
    {"1E", 0, 1ull << 60},
    {"15E", 0, 15ull << 60},
    {"512b", 0, 512},
    {"512B", 0, 512},
    {"1.5G", 0, 1610612736},
    {"1.5K", 0, 1536},
    {"1.1k", 0, 1126},
    {"0.1k", 0, 102},
    {"1.5m", 0, 1572864},
    {"1.25M", 0, 1310720},
    {"1.5e", 0, 3ull << 59},
    {"0.001K", 0, 1},
    {"0.0001K", 0, 0},
    {"1.9999999999999k", 0, 2048},
    {"1.0000000001K", 0, 1024},
    {"1.50000000000000000000000000000001k", 0, 1536},
    {"3.999999999999999999999k", 0, 4096},
    {"1.", 0, 1},
    {"1.k", 0, 1024},
    {"0.k", 0, 0},
    {"1.0", 0, 1},
    {"0.0", 0, 0},
    {"1.0b", 0, 1},
    {"00012", 0, 12},
    {"010", 0, 10},
    {"00.5k", 0, 512},
    {"0x10", 0, 16},
    {"0X10", 0, 16},
    {"0x1000", 0, 4096},
    {"0x10k", 0, 16384},
    {"+1", 0, 1},
    {" 1", 0, 1},
    {"\t1K", 0, 1024},
    {"18446744073709551615", 0, UINT64_MAX},
    {"", -EINVAL, 0},
    {"1.5", -EINVAL, 0},
    {"0.5", -EINVAL, 0},
    {"1.5B", -EINVAL, 0},
    {"1.2b", -EINVAL, 0},
    {"1e3", -EINVAL, 0},
    {"1.5e3", -EINVAL, 0},
    {"1KiB", -EINVAL, 0},
    {"1kb", -EINVAL, 0},
    {"1K ", -EINVAL, 0},
    {"1 K", -EINVAL, 0},
    {".5G", -EINVAL, 0},
    {".k", -EINVAL, 0},
    {"-1", -EINVAL, 0},
    {"++1", -EINVAL, 0},
    {"0x", -EINVAL, 0},
    {"0xg", -EINVAL, 0},
    {"0x1.8k", -EINVAL, 0},
    {"1.5.5", -EINVAL, 0},
    {"1..5", -EINVAL, 0},
    {"1.xk", -EINVAL, 0},
    {"abc", -EINVAL, 0},
    {"k", -EINVAL, 0},
    {"18446744073709551616", -ERANGE, 0},
    {"16E", -ERANGE, 0},
    {"16384P", -ERANGE, 0},
    {"16.5E", -ERANGE, 0},
    {"15.5E", 0, 0xf8ull << 56},
};

static void test_parse_size(void)
{
	for (size_t i = 0; i < sizeof(size_rows) / sizeof(size_rows[0]); i++) {
		uint64_t v = 0xdeadbeef;
		int ret = util_parse_size(size_rows[i].in, &v);

		if (ret != size_rows[i].ret || (ret == 0 && v != size_rows[i].out))
			fprintf(stderr, "util_parse_size(\"%s\") = %d, %llu\n", size_rows[i].in,
				ret, (unsigned long long)v);
		CU_ASSERT_EQUAL(ret, size_rows[i].ret);
		/* *out is untouched on error */
		CU_ASSERT_EQUAL(v, ret == 0 ? size_rows[i].out : 0xdeadbeef);
	}
	CU_ASSERT_EQUAL(util_parse_size(NULL, &(uint64_t){0}), -EINVAL);
}

static const struct {
	const char *in;
	int ret;
	uint64_t out;
} uint_rows[] = {
    {"0", 0, 0},
    {"123", 0, 123},
    {"007", 0, 7},
    {"18446744073709551615", 0, UINT64_MAX},
    {"", -EINVAL, 0},
    {"-1", -EINVAL, 0},
    {"+1", -EINVAL, 0},
    {" 1", -EINVAL, 0},
    {" -1", -EINVAL, 0},
    {"1 ", -EINVAL, 0},
    {"1k", -EINVAL, 0},
    {"0x10", -EINVAL, 0},
    {"18446744073709551616", -ERANGE, 0},
};

static void test_parse_uint(void)
{
	for (size_t i = 0; i < sizeof(uint_rows) / sizeof(uint_rows[0]); i++) {
		uint64_t v = 0xdeadbeef;
		int ret = util_parse_uint(uint_rows[i].in, &v);

		if (ret != uint_rows[i].ret || (ret == 0 && v != uint_rows[i].out))
			fprintf(stderr, "util_parse_uint(\"%s\") = %d, %llu\n", uint_rows[i].in,
				ret, (unsigned long long)v);
		CU_ASSERT_EQUAL(ret, uint_rows[i].ret);
		CU_ASSERT_EQUAL(v, ret == 0 ? uint_rows[i].out : 0xdeadbeef);
	}
}

int main(void)
{
	CU_pSuite s;
	unsigned fails;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("util", NULL, NULL);
	CU_add_test(s, "size parser (qemu-img's syntax)", test_parse_size);
	CU_add_test(s, "plain numbers", test_parse_uint);
	fails = tu_cunit_run();
	return fails ? 1 : 0;
}
