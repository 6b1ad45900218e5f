# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# Shared helpers for scripts/run-example, scripts/run-tests, scripts/compare-routers, scripts/bench,
# scripts/bench-phases and .ci/run.
# Source it; do not execute it.
#
#   sparsemoe_repo_root             prints the repository root
#   sparsemoe_ensure_deps [pkg...]  installs (Debian/Ubuntu, apt) whichever of the
#                                   build dependencies plus the extra pkgs are missing
#   sparsemoe_build_example NAME    builds examples/NAME.cpp in $BUILD_DIR, prints its path
#   sparsemoe_build_bench DIR [ARGS] configures DIR as scripts/bench does (Release, -march=native,
#                                   benchmarks only, plus the cmake ARGS) and builds bench_moe there

# Everything needed to configure, build and run the whole test suite
# (tests, examples, benchmarks, consumer tests incl. pkg-config, the MPI tests) with g++.
SPARSEMOE_DEPS=(
  cmake
  ninja-build
  g++
  libeigen3-dev
  libxsmm-dev
  libxxhash-dev
  nlohmann-json3-dev
  libgtest-dev
  libbenchmark-dev
  libomp-dev
  pkg-config
  libopenmpi-dev
  openmpi-bin
)

sparsemoe_repo_root() {
  # scripts/lib/deps.sh -> repository root
  (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
}

sparsemoe_log() {
  printf '[sparsemoe] %s\n' "$*" >&2
}

# True if the Debian package is installed (not merely known or half-removed).
sparsemoe_pkg_installed() {
  local status
  status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ "$status" == "install ok installed" ]]
}

# shellcheck disable=SC2120  # extra packages are optional
sparsemoe_ensure_deps() {
  local wanted=("${SPARSEMOE_DEPS[@]}" "$@")
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    sparsemoe_log "not a Debian/Ubuntu system (no dpkg-query/apt-get): not installing anything."
    sparsemoe_log "make sure these (or their equivalents) are available: ${wanted[*]}"
    return 0
  fi

  local present=() missing=() pkg
  for pkg in "${wanted[@]}"; do
    if sparsemoe_pkg_installed "$pkg"; then
      present+=("$pkg")
    else
      missing+=("$pkg")
    fi
  done

  if ((${#present[@]})); then
    sparsemoe_log "already installed: ${present[*]}"
  fi
  if ((${#missing[@]} == 0)); then
    sparsemoe_log "all build dependencies present"
    return 0
  fi

  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      sparsemoe_log "missing packages: ${missing[*]}"
      sparsemoe_log "not root and sudo is not available; install them as root and rerun."
      return 1
    fi
  fi

  sparsemoe_log "installing: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"

  for pkg in "${missing[@]}"; do
    if ! sparsemoe_pkg_installed "$pkg"; then
      sparsemoe_log "package $pkg is still not installed"
      return 1
    fi
  done
  sparsemoe_log "installed: ${missing[*]}"
}

# Configures $BUILD_DIR (default build/release: Ninja, Release, $CXX when set) and builds the
# example examples/NAME.cpp there; its messages go to stderr, and the executable's path to stdout.
sparsemoe_build_example() {
  local name=$1
  local build_dir=${BUILD_DIR:-build/release}
  local cmake_args=(-S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release)
  if [[ -n "${CXX:-}" ]]; then
    cmake_args+=("-DCMAKE_CXX_COMPILER=$CXX")
  fi
  sparsemoe_log "configuring $build_dir (Release)"
  cmake "${cmake_args[@]}" >&2
  sparsemoe_log "building $name"
  cmake --build "$build_dir" --target "$name" >&2
  printf '%s\n' "$build_dir/examples/$name"
}

# Configures DIR for the benchmarks (Release, -march=native: the FMA probe and the kernels use the
# host's widest vectors; Ninja when present; tests, examples and install off) with the extra cmake
# arguments, and builds bench_moe there (DIR/bench/bench_moe). Quiet: messages go to stderr.
sparsemoe_build_bench() {
  local dir=$1; shift
  local generator=()
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  sparsemoe_log "configuring $dir (Release, -march=native $*)"
  cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-march=native \
    -DSPARSEMOE_BUILD_TESTS=OFF -DSPARSEMOE_BUILD_EXAMPLES=OFF -DSPARSEMOE_BUILD_BENCHMARKS=ON \
    -DSPARSEMOE_INSTALL=OFF "$@" >/dev/null
  sparsemoe_log "building bench_moe in $dir"
  cmake --build "$dir" --target bench_moe >/dev/null
}
