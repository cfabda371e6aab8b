#!/usr/bin/env bash
# The whole test suite: install dependencies, build twice (release with
# -Werror, and ASan+UBSan), run every test through ctest in both builds, the
# concurrency tests once more in a ThreadSanitizer build (build-tsan); then
# build the libFuzzer targets with clang (build-fuzz) and run each for a short
# bounded time (VQCOW_FUZZ_SECONDS, default 20) after replaying its corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/deps.sh
jobs=$(nproc)
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVQCOW_WERROR=ON >/dev/null
cmake --build build -j"$jobs"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DVQCOW_WERROR=ON -DVQCOW_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
# QEMU's qos-test and a qemu-system-x86_64 with the qtest accelerator, from
# Debian's qemu source (ctest qtest.vhost_user_blk); cached after the first
# build. Its output goes to a log file (the tail is printed on failure); if the
# build is not possible the test is skipped, visibly.
echo "=== QEMU qtest binaries (tests/qtest/build-qemu.sh: first build 3-10 min, then cached)"
bash tests/qtest/build-qemu.sh >/dev/null ||
	echo "=== QEMU qtest binaries not built: qtest.vhost_user_blk will be skipped"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
rc=0
echo "=== ctest (release build)"
(cd build && ctest --output-on-failure -j"$jobs" "$@") || rc=1
echo "=== ctest (ASan+UBSan build)"
(cd build-asan && ctest --output-on-failure -j"$jobs" -LE slow "$@") || rc=1
echo "=== concurrency tests (ThreadSanitizer build: --io-threads)"
# Only what runs several threads: the daemon under integration.mt and
# integration.qmp_mt (QMP operations while the I/O threads serve a qcow2
# image), integration.mt_grow (the fast table grown under them), io/'s
# cross-thread posts and blk/'s held requests resumed on their thread; and
# vqcow-fe bench's thread per queue (frontend.bench_threads; the others above
# drive 2 queues with it too); and integration.migration, whose rings stop
# (GET_VRING_BASE) with requests in flight on the main thread and an I/O
# thread while the dirty log is on; and integration.zread (compressed reads
# handed from an I/O thread to the main thread join reads in flight there and
# are inflated back on their thread, some failing on purpose); and
# integration.requests, whose consolidate test moves an I/O thread's queue to
# the main thread and back (--io-threads-consolidate) with a ring stop, a
# memory-table change and a reconnect while it is moved (integration.mt's
# consolidate runs move them under the stress).
# halt_on_error: a race report ends the process, and the test fails.
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVQCOW_WERROR=ON -DVQCOW_TSAN=ON \
	>/dev/null
cmake --build build-tsan -j"$jobs" --target vqcowd vqcowctl vqcow-fe vqfe-stress test_io test_blk \
	itest_migration itest_requests
(cd build-tsan && TSAN_OPTIONS=halt_on_error=1:exitcode=66 VQCOW_MT_ROUNDS=6 \
	ctest --output-on-failure \
	-R '^(integration\.mt|integration\.qmp_mt|integration\.mt_grow|integration\.daemon|integration\.migration|integration\.zread|integration\.requests|frontend\.bench_threads|unit\.test_io|unit\.test_blk)$' \
	"$@") || rc=1
echo "=== fuzz targets (clang, libFuzzer + ASan + UBSan)"
cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	-DVQCOW_WERROR=ON -DVQCOW_FUZZ=ON -DVQCOW_FUZZ_SECONDS="${VQCOW_FUZZ_SECONDS:-20}" >/dev/null
cmake --build build-fuzz -j"$jobs" --target fuzz
(cd build-fuzz && ctest --output-on-failure -j"$jobs" -L fuzz "$@") || rc=1
exit $rc
