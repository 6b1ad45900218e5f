// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_BF16_EXPERTS_HPP
#define SPARSEMOE_BF16_EXPERTS_HPP

/// \file bf16_experts.hpp
/// Experts' weights held as bfloat16 for serving: fp32 activations and accumulation, half the
/// bytes of weights to stream per forward (docs/serving.md, "bf16 weights").

#include "config.hpp"
#include "detail/bf16_gemm.hpp"
#include "detail/expert_kernels.hpp"
#include "detail/expert_tiles.hpp"
#include "detail/parallel.hpp"
#include "expert_bank.hpp"

#include <algorithm>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace sparsemoe {

template <typename Scalar_, typename ExpertT, typename RouterT>
class MoELayer;

/// \addtogroup layer
/// @{

/// Which kernel Bf16Experts::forward runs.
enum class Bf16Kernel {
  automatic,  ///< AVX-512 when the build has AVX-512F (bf16_vector_kernel_compiled()), else portable
  portable,   ///< the portable C++ kernel (std::fma per element): the same results, slower
};

/// Whether this build has the AVX-512 kernel (compiled with AVX-512F, e.g. -march=native on a
/// machine that has it); without it Bf16Kernel::automatic runs the portable kernel.
constexpr bool bf16_vector_kernel_compiled() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}


/// Scratch memory of Bf16Experts::forward, reusable across calls: once it has seen the largest
/// batch, a forward allocates nothing. Not shared between threads.
struct Bf16ExpertsWorkspace {
  /// An aligned float buffer: Eigen's vectorised activations then split every row the same way,
  /// wherever the buffer lands, so results do not depend on the allocation.
  using Buffer = std::vector<float, Eigen::aligned_allocator<float>>;
  Buffer pre;                                  ///< rows×p pre-activations (capacity only grows)
  Buffer hidden;                               ///< rows×h hidden values (capacity only grows)
  std::vector<detail::ColumnTile> tiles;       ///< this call's column tiles (one expert with rows)
  std::vector<detail::ExpertTile> row_tiles;   ///< this call's row tiles (two or more experts with rows)
  std::vector<Index> expert_order;             ///< experts by descending row count
  std::vector<std::vector<float>> packed_rows;  ///< per OpenMP thread, one expert's rows packed (capacity only grows)

  /// Bytes held by the buffers above.
  std::size_t bytes() const {
    std::size_t total = pre.capacity() + hidden.capacity();
    for (const auto& buffer : packed_rows) total += buffer.capacity();
    return total * sizeof(float);
  }
};

/// A snapshot of N experts with W1 and W2 rounded to bfloat16 (round to nearest even) and the
/// biases kept in fp32, for evaluation-mode forwards that stream half the weight bytes of fp32
/// (MoELayer::bf16_experts(), or Bf16Experts(bank)). Only float experts (ExpertT::Scalar = float).
///
/// forward() computes, for every grouped row x of expert e (fp32 rows in and out):
/// E_e(x) = act(x·Ŵ1_e + b1_e)·Ŵ2_e + b2_e, Ŵ = the bfloat16 weights widened exactly to fp32,
/// each dot product a chain of fp32 FMAs over k in order. It therefore differs from the fp32
/// expert with the weights Ŵ (rounded_expert()) by fp32 accumulation rounding only: tests check
/// |y − y_ref| ≤ 1e-4·(1 + |y_ref|) against a double-precision reference on Ŵ; against the
/// unrounded fp32 weights the difference is the bfloat16 rounding of the weights (relative
/// 2^−9 per weight).
///
/// With two or more experts in use, work is cut into row tiles (up to row_tile rows of one
/// expert, both layers and the activation in one tile, biggest experts first). With one, into
/// column tiles over all of its rows, so that every thread streams part of its weights: first
/// column_tile columns of W1 (bias and an element-wise activation fused), then, after an
/// activation pass for a gated activation, column_tile columns of W2. Tiles depend on the row
/// counts only, and each output element is one tile's, so results are bitwise identical for any
/// thread count, and for both kernels (Bf16Kernel). Memory: 2·d·(p + h) bytes per expert plus
/// the biases.
/// Immutable once made: any number of threads may use one at once. It is a copy: after the
/// weights change, make it again.
template <typename ExpertT>
class Bf16Experts {
 public:
  /// The expert type (its activate() is used; its Scalar must be float).
  using ExpertType = ExpertT;
  static_assert(std::is_same<typename ExpertT::Scalar, float>::value, "bf16 experts serve float experts only");

  /// Columns of one tile when one expert has all the rows (a multiple of the 32-column panels).
  static constexpr Index column_tile = 256;
  /// Rows of one tile when two or more experts have rows.
  static constexpr Index row_tile = 128;

  /// No experts: make one from a bank or a layer instead.
  Bf16Experts() = default;

  /// Rounds the weights of every expert of `bank` to bfloat16. Throws std::invalid_argument if
  /// the bank is empty or an expert has been resized. O(N·d·(p + h)); parallel over experts.
  explicit Bf16Experts(const ExpertBank<float, ExpertT>& bank) {
    const char* function = "sparsemoe::Bf16Experts";
    detail::require(bank.num_experts() > 0, function, "the bank holds no experts");
    bank.require_expert_shapes(function);
    shape_ = bank.shape();
    activation_.emplace(Index(1), shape_.hidden_dim);
    experts_.resize(static_cast<std::size_t>(bank.num_experts()));
    const double work = 2.0 * static_cast<double>(shape_.input_dim * (shape_.pre_activation_width + shape_.hidden_dim));
    detail::parallel_for_dynamic(bank.num_experts(), work, [&](Index e) {
      const ExpertT& expert = bank.expert(e);
      Entry& entry = experts_[static_cast<std::size_t>(e)];
      entry.w1 = detail::Bf16Weight(expert.w1());
      entry.w2 = detail::Bf16Weight(expert.w2());
      entry.b1 = expert.b1();
      entry.b2 = expert.b2();
    });
  }

  /// Whether this holds nothing usable (default-constructed, or made by a layer that is gone).
  bool empty() const { return experts_.empty() || (made_by_layer_ && owner_.expired()); }
  /// N.
  Index num_experts() const { return static_cast<Index>(experts_.size()); }
  /// d.
  Index input_dim() const { return shape_.input_dim; }
  /// h.
  Index hidden_dim() const { return shape_.hidden_dim; }
  /// p (h, or 2h for SwiGLU).
  Index pre_activation_width() const { return shape_.pre_activation_width; }
  /// Bytes one expert's forward streams: 2·d·(p + h) of bfloat16 weights plus 4·(|b1| + |b2|).
  std::size_t expert_bytes() const {
    return static_cast<std::size_t>(2 * shape_.input_dim * (shape_.pre_activation_width + shape_.hidden_dim) +
                                    4 * (shape_.b1_size + shape_.b2_size));
  }
  /// Bytes held (weight panels and biases of all experts).
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const Entry& entry : experts_) {
      total += entry.w1.bytes() + entry.w2.bytes() + static_cast<std::size_t>(entry.b1.size() + entry.b2.size()) * 4;
    }
    return total;
  }

  /// Expert `index` as an fp32 expert with the bfloat16 weights Ŵ (widened exactly) and the
  /// biases: the fp32 layer "on the same rounded weights". Throws std::out_of_range on a bad
  /// index. O(d·(p + h)).
  ExpertT rounded_expert(Index index) const {
    const Entry& entry = experts_.at(static_cast<std::size_t>(index));
    ExpertT expert(shape_.input_dim, shape_.hidden_dim);
    for (Index r = 0; r < entry.w1.rows(); ++r) {
      for (Index c = 0; c < entry.w1.cols(); ++c) expert.w1()(r, c) = entry.w1.value(r, c);
    }
    for (Index r = 0; r < entry.w2.rows(); ++r) {
      for (Index c = 0; c < entry.w2.cols(); ++c) expert.w2()(r, c) = entry.w2.value(r, c);
    }
    expert.b1() = entry.b1;
    expert.b2() = entry.b2;
    return expert;
  }

  /// expert_output row r = E_e(grouped_input row r) (class comment) for every row r of expert e.
  ///
  /// \param offsets the layout, N+1 entries (expert e owns rows [offsets[e], offsets[e+1]),
  ///   as for ExpertBank::forward).
  /// \param grouped_input rows×d fp32, rows = offsets[N].
  /// \param expert_output resized to rows×d.
  /// \param workspace scratch, kept from call to call.
  /// \param kernel Bf16Kernel::automatic (AVX-512 when compiled in) or portable: same results.
  ///
  /// Throws std::invalid_argument, before any work, when this is empty, on a bad layout or an
  /// input of other width. Cost: 2·rows·d·(p + h) flops; streams 2·d·(p + h) bytes of weights
  /// per expert with rows (each 32-column panel once, re-read from cache per 8 rows).
  void forward(const Eigen::Ref<const IndexVector>& offsets, ConstMatrixRef<float> grouped_input,
               Matrix<float>& expert_output, Bf16ExpertsWorkspace& workspace,
               Bf16Kernel kernel = Bf16Kernel::automatic) const {
    const char* function = "sparsemoe::Bf16Experts::forward";
    detail::require(!empty(), function, "no experts (default-constructed, or their layer is gone)");
    detail::require(grouped_input.cols() == input_dim(), function, "grouped_input must have ", input_dim(),
                    " columns, got ", grouped_input.rows(), "x", grouped_input.cols());
    detail::require(offsets.size() == num_experts() + 1, function, "offsets has ", offsets.size(),
                    " entries, expected num_experts + 1 = ", num_experts() + 1);
    detail::require(offsets[0] == 0, function, "offsets[0] must be 0, got ", offsets[0]);
    for (Index e = 0; e < num_experts(); ++e) {
      detail::require(offsets[e + 1] >= offsets[e], function, "offsets must not decrease at expert ", e);
    }
    detail::require(offsets[num_experts()] == grouped_input.rows(), function, "offsets[N] = ", offsets[num_experts()],
                    " but the grouped rows number ", grouped_input.rows());
    const Index rows = grouped_input.rows(), d = input_dim(), h = hidden_dim(), p = pre_activation_width();
    expert_output.resize(rows, d);
    if (rows == 0) return;
    const auto grow = [](Bf16ExpertsWorkspace::Buffer& buffer, Index size) {
      if (buffer.size() < static_cast<std::size_t>(size)) buffer.resize(static_cast<std::size_t>(size));
    };
    grow(workspace.pre, rows * p);
    grow(workspace.hidden, rows * h);
    Eigen::Map<Matrix<float>> pre(workspace.pre.data(), rows, p);
    Eigen::Map<Matrix<float>> hidden(workspace.hidden.data(), rows, h);
    order_experts(offsets, workspace.expert_order);
    Index experts_used = 0, most_rows = 0;
    for (Index e = 0; e < num_experts(); ++e) {
      experts_used += detail::rows_of_expert(offsets, e) > 0;
      most_rows = std::max(most_rows, detail::rows_of_expert(offsets, e));
    }
    // Every thread's packed-rows buffer sized for the largest tile before the loop (which thread
    // takes which tile changes from call to call): a repeated call allocates nothing.
    const Index tile_rows = experts_used >= 2 ? std::min(most_rows, row_tile) : most_rows;
    const Index blocks = (tile_rows + detail::bf16_row_block - 1) / detail::bf16_row_block;
    workspace.packed_rows.resize(static_cast<std::size_t>(detail::max_threads()));
    for (auto& buffer : workspace.packed_rows) {
      const auto size = static_cast<std::size_t>(blocks * detail::bf16_row_block * std::max(d, h));
      if (buffer.size() < size) buffer.resize(size);
    }
    const ExpertT& act = *activation_;
    const bool vector = kernel == Bf16Kernel::automatic;
    constexpr bool elementwise = detail::activation_is_elementwise<ExpertT>::value;
    if (experts_used >= 2) {
      // Row tiles: both layers of one expert over up to row_tile of its rows, in one parallel
      // loop (no barrier between the layers).
      auto& tiles = workspace.row_tiles;
      tiles.clear();
      for (const Index expert : workspace.expert_order) {
        const Index count = detail::rows_of_expert(offsets, expert);
        for (Index r = 0; r < count; r += row_tile) {
          tiles.push_back({expert, offsets[expert] + r, std::min(row_tile, count - r)});
        }
      }
      // Per tile: its flops, and its weight bytes counted as work too (memory-bound when small).
      const double work = static_cast<double>(d * (p + h)) *
                          (2.0 + 2.0 * static_cast<double>(rows) / static_cast<double>(tiles.size()));
      detail::parallel_for_dynamic(static_cast<Index>(tiles.size()), work, [&](Index index) {
        const detail::ExpertTile& tile = tiles[static_cast<std::size_t>(index)];
        const Entry& entry = experts_[static_cast<std::size_t>(tile.expert)];
        std::vector<float>& packed = workspace.packed_rows[static_cast<std::size_t>(detail::thread_index())];
        auto pre_rows = pre.middleRows(tile.first_row, tile.rows);
        auto hidden_rows = hidden.middleRows(tile.first_row, tile.rows);
        detail::bf16_pack_rows(grouped_input.row(tile.first_row).data(), grouped_input.outerStride(), tile.rows, d,
                               packed);
        detail::bf16_gemm(packed.data(), tile.rows, entry.w1, 0, p, pre_rows.data(), p, vector);
        if (entry.b1.size() > 0) pre_rows.rowwise() += entry.b1.transpose();
        act.activate(pre_rows, hidden_rows);
        detail::bf16_pack_rows(hidden_rows.data(), h, tile.rows, h, packed);
        auto out = expert_output.middleRows(tile.first_row, tile.rows);
        detail::bf16_gemm(packed.data(), tile.rows, entry.w2, 0, d, out.data(), out.outerStride(), vector);
        if (entry.b2.size() > 0) out.rowwise() += entry.b2.transpose();
      });
      return;
    }

    // One expert: column tiles, so that every thread streams a share of its weights.
    // Phase 1: pre = X·Ŵ1 + b1 (and hidden = act(pre) for an element-wise activation).
    run_tiles(offsets, p, workspace, [&](const detail::ColumnTile& tile, Index first, Index count) {
      const Entry& entry = experts_[static_cast<std::size_t>(tile.expert)];
      std::vector<float>& packed = workspace.packed_rows[static_cast<std::size_t>(detail::thread_index())];
      detail::bf16_pack_rows(grouped_input.row(first).data(), grouped_input.outerStride(), count, d, packed);
      detail::bf16_gemm(packed.data(), count, entry.w1, tile.first_column, tile.columns,
                        pre.row(first).data() + tile.first_column, p, vector);
      auto pre_block = pre.block(first, tile.first_column, count, tile.columns);
      if (entry.b1.size() > 0) pre_block.rowwise() += entry.b1.segment(tile.first_column, tile.columns).transpose();
      if (elementwise) act.activate(pre_block, hidden.block(first, tile.first_column, count, tile.columns));
    });
    if (!elementwise) {
      const double work = static_cast<double>(rows) * static_cast<double>(p) / static_cast<double>(num_experts());
      detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
        const Index first = offsets[e], count = detail::rows_of_expert(offsets, e);
        if (count > 0) act.activate(pre.middleRows(first, count), hidden.middleRows(first, count));
      });
    }
    // Phase 2: output = hidden·Ŵ2 + b2.
    run_tiles(offsets, d, workspace, [&](const detail::ColumnTile& tile, Index first, Index count) {
      const Entry& entry = experts_[static_cast<std::size_t>(tile.expert)];
      std::vector<float>& packed = workspace.packed_rows[static_cast<std::size_t>(detail::thread_index())];
      detail::bf16_pack_rows(hidden.row(first).data(), h, count, h, packed);
      detail::bf16_gemm(packed.data(), count, entry.w2, tile.first_column, tile.columns,
                        expert_output.row(first).data() + tile.first_column, expert_output.outerStride(), vector);
      if (entry.b2.size() > 0) {
        expert_output.block(first, tile.first_column, count, tile.columns).rowwise() +=
            entry.b2.segment(tile.first_column, tile.columns).transpose();
      }
    });
  }

 private:
  template <typename, typename, typename>
  friend class MoELayer;

  using Shape = typename ExpertBank<float, ExpertT>::Shape;

  struct Entry {
    detail::Bf16Weight w1;  // d×p
    detail::Bf16Weight w2;  // h×d
    Vector<float> b1;
    Vector<float> b2;
  };

  /// Experts by descending row count (ties: lower id), so that the last tiles handed out are small.
  void order_experts(const Eigen::Ref<const IndexVector>& offsets, std::vector<Index>& order) const {
    order.resize(static_cast<std::size_t>(num_experts()));
    for (Index e = 0; e < num_experts(); ++e) order[static_cast<std::size_t>(e)] = e;
    std::sort(order.begin(), order.end(), [&](Index a, Index b) {
      const Index count_a = detail::rows_of_expert(offsets, a), count_b = detail::rows_of_expert(offsets, b);
      return count_a != count_b ? count_a > count_b : a < b;
    });
  }

  /// Lists the tiles (expert with rows, column_tile columns of `width`) and runs `body(tile,
  /// first_row, rows)` on each, dynamically scheduled.
  template <typename Body>
  void run_tiles(const Eigen::Ref<const IndexVector>& offsets, Index width, Bf16ExpertsWorkspace& workspace,
                 const Body& body) const {
    auto& tiles = workspace.tiles;
    tiles.clear();
    Index rows = 0;
    for (const Index expert : workspace.expert_order) {
      const Index count = detail::rows_of_expert(offsets, expert);
      if (count == 0) continue;
      rows += count;
      for (Index c = 0; c < width; c += column_tile) tiles.push_back({expert, c, std::min(column_tile, width - c)});
    }
    if (tiles.empty()) return;
    // Memory-bound for few rows: count the weight bytes as work too, so that one token's
    // tiles are still shared among the threads.
    const double inner = static_cast<double>(width == input_dim() ? hidden_dim() : input_dim());
    const double work = static_cast<double>(column_tile) * inner * (2.0 + 2.0 * static_cast<double>(rows)) /
                        static_cast<double>(std::max<Index>(1, num_experts()));
    detail::parallel_for_dynamic(static_cast<Index>(tiles.size()), work, [&](Index index) {
      const detail::ColumnTile& tile = tiles[static_cast<std::size_t>(index)];
      body(tile, offsets[tile.expert], detail::rows_of_expert(offsets, tile.expert));
    });
  }

  Shape shape_;
  std::vector<Entry> experts_;
  std::optional<ExpertT> activation_;  // ExpertT(1, h): its activate() only
  std::weak_ptr<const void> owner_;    // identity of the layer that made it (made_by_layer_)
  bool made_by_layer_ = false;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_BF16_EXPERTS_HPP
