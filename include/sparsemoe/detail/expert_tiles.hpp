// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_EXPERT_TILES_HPP
#define SPARSEMOE_DETAIL_EXPERT_TILES_HPP

/// \file expert_tiles.hpp
/// The tile schedule of the expert work: how grouped rows (or weight columns) are cut into the
/// units that the OpenMP loops hand out. The tiles depend only on the row counts, never on the
/// thread count, which is what keeps results bitwise identical for any number of threads.

#include "../config.hpp"

#include <algorithm>
#include <vector>

namespace sparsemoe {
namespace detail {

/// A block of consecutive grouped rows of one expert: the unit of parallel expert work.
struct ExpertTile {
  Index expert;
  Index first_row;
  Index rows;
};

/// A block of columns of one expert's W1 or W2, over all of the expert's rows: the unit of
/// parallel expert work for small batches.
struct ColumnTile {
  Index expert;
  Index first_column;
  Index columns;
};

/// A block of columns of one expert's weight gradient (of W1 when first_layer, else of W2): the
/// unit of parallel work of the weight-gradient phase of backward.
struct GradientTile {
  Index expert;
  bool first_layer;
  Index first_column;
};

/// Rows of expert `e` in a layout of N+1 offsets (expert e owns rows [offsets[e], offsets[e+1])).
template <typename Offsets>
Index rows_of_expert(const Offsets& offsets, Index e) {
  return offsets[e + 1] - offsets[e];
}

/// Tiles of at most `tile_rows` rows per expert over the layout `offsets` (N+1 entries), biggest
/// experts first (ties: lower id), so that the last tiles handed out are small. Reuses
/// `expert_order` and `tiles`. O(N log N + tiles).
template <typename Offsets>
void make_expert_tiles(const Offsets& offsets, Index tile_rows, std::vector<Index>& expert_order,
                       std::vector<ExpertTile>& tiles) {
  const Index experts = static_cast<Index>(offsets.size()) - 1;
  expert_order.resize(static_cast<std::size_t>(experts));
  for (Index e = 0; e < experts; ++e) expert_order[static_cast<std::size_t>(e)] = e;
  std::sort(expert_order.begin(), expert_order.end(), [&](Index a, Index b) {
    const Index count_a = rows_of_expert(offsets, a);
    const Index count_b = rows_of_expert(offsets, b);
    return count_a != count_b ? count_a > count_b : a < b;
  });
  tiles.clear();
  for (const Index expert : expert_order) {
    const Index count = rows_of_expert(offsets, expert);
    for (Index first = 0; first < count; first += tile_rows) {
      tiles.push_back({expert, offsets[expert] + first, std::min(tile_rows, count - first)});
    }
  }
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_EXPERT_TILES_HPP
