# SPDX-License-Identifier: MIT
# shellcheck shell=bash
#
# gnuplot for the plot scripts (scripts/plot-training, scripts/plot-routing). Source it; do not
# execute it.
#
#   sparsemoe_ensure_gnuplot NAME   installs gnuplot-nox with apt-get (through sudo when not
#                                   root) if gnuplot is missing; NAME prefixes its messages
#   sparsemoe_gnuplot_terminal W H  prints a PNG terminal of W×H pixels: pngcairo when gnuplot
#                                   has it, else png

sparsemoe_ensure_gnuplot() {
  local name=$1
  if command -v gnuplot >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    printf '[%s] %s\n' "$name" "gnuplot is missing and apt-get is not available: install gnuplot and rerun" >&2
    exit 1
  fi
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      printf '[%s] %s\n' "$name" "gnuplot is missing; not root and no sudo: run 'apt-get install gnuplot-nox' as root" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  printf '[%s] %s\n' "$name" "installing gnuplot-nox" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gnuplot-nox
  if ! command -v gnuplot >/dev/null 2>&1; then
    printf '[%s] %s\n' "$name" "gnuplot still not found after installing gnuplot-nox" >&2
    exit 1
  fi
}

sparsemoe_gnuplot_terminal() {
  if gnuplot -e "set terminal pngcairo" >/dev/null 2>&1; then
    printf "pngcairo size %s,%s font 'sans,11'" "$1" "$2"
  else
    printf 'png size %s,%s' "$1" "$2"
  fi
}
