# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# Shared helpers for scripts/run-example, scripts/run-tests, scripts/compare-routers and .ci/run.
# Source it; do not execute it.
#
#   sparsemoe_repo_root             prints the repository root
#   sparsemoe_ensure_deps [pkg...]  installs (Debian/Ubuntu, apt) whichever of the
#                                   build dependencies plus the extra pkgs are missing
#   sparsemoe_build_example NAME    builds examples/NAME.cpp in $BUILD_DIR, prints its path

# Everything needed to configure, build and run the whole test suite
# (tests, examples, benchmarks, consumer tests incl. pkg-config) with g++.
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
