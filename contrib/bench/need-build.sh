# shellcheck shell=bash
# SPDX-License-Identifier: MIT
#
# Sourced by mq.sh, guest-mq.sh, grow.sh and scale.sh:
#   bench_need_build REPO BUILD TARGET...
# builds the CMake targets (vqcowd, vqcow-fe, vqcow-img) into BUILD when one
# of their binaries is missing, as run.sh does, so the scripts run from a
# fresh clone (after contrib/deps.sh). Nothing is built when VQCOWD /
# VQCOW_FE / VQCOW_IMG name the binaries or NO_BUILD=1.
bench_need_build() {
	local repo=$1 build=$2 t path missing=()
	shift 2
	for t in "$@"; do
		case $t in
		vqcowd) path=${VQCOWD:-$build/src/vqcowd} ;;
		vqcow-fe) path=${VQCOW_FE:-$build/tests/frontend/vqcow-fe} ;;
		vqcow-img) path=${VQCOW_IMG:-$build/src/vqcow-img} ;;
		*) continue ;;
		esac
		[ -x "$path" ] || missing+=("$t")
	done
	[ ${#missing[@]} -gt 0 ] || return 0
	if [ "${NO_BUILD:-0}" = 1 ] || ! command -v cmake >/dev/null; then
		echo "bench: ${missing[*]} not built in $build (NO_BUILD=1 or no cmake)" >&2
		return 0
	fi
	echo "bench: building ${missing[*]} into $build" >&2
	[ -f "$build/CMakeCache.txt" ] ||
		nice cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	nice cmake --build "$build" -j"$(nproc)" --target "${missing[@]}" >&2
}
