// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_PARALLEL_HPP
#define SPARSEMOE_DETAIL_PARALLEL_HPP

#include "../config.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparsemoe {
namespace detail {

/// Below this much work (in flops, roughly) a loop runs on the calling thread alone: starting
/// and joining an OpenMP team costs more than it saves, and an idle team spinning on a busy
/// machine costs far more.
constexpr double parallel_work_threshold = 131072.0;

/// Calls body(i) for i in [0, count), split statically across the OpenMP team (serially without
/// OpenMP, or when count·work_per_item < parallel_work_threshold). Each i must write only its own
/// outputs, so results never depend on the thread count.
template <typename Body>
void parallel_for(Index count, double work_per_item, const Body& body) {
#ifdef _OPENMP
  const bool worth_it = count > 1 && static_cast<double>(count) * work_per_item >= parallel_work_threshold;
#pragma omp parallel for schedule(static) if (worth_it)
  for (Index i = 0; i < count; ++i) body(i);
#else
  static_cast<void>(work_per_item);
  for (Index i = 0; i < count; ++i) body(i);
#endif
}

/// Like parallel_for, but hands out one i at a time (for work items of uneven cost, listed
/// biggest first so that the last ones to finish are small).
template <typename Body>
void parallel_for_dynamic(Index count, double work_per_item, const Body& body) {
#ifdef _OPENMP
  const bool worth_it = count > 1 && static_cast<double>(count) * work_per_item >= parallel_work_threshold;
#pragma omp parallel for schedule(dynamic, 1) if (worth_it)
  for (Index i = 0; i < count; ++i) body(i);
#else
  static_cast<void>(work_per_item);
  for (Index i = 0; i < count; ++i) body(i);
#endif
}

/// Number of threads a parallel_for started here would use (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Index of the calling thread inside the current team (0 without OpenMP).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Rows per tile of the row-tiled products: fixed by the problem, never by the thread count.
constexpr Index row_tile = 64;

/// Number of tiles of `tile` rows covering `rows` rows.
inline Index tile_count(Index rows, Index tile) { return (rows + tile - 1) / tile; }

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_PARALLEL_HPP
