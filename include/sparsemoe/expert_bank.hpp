// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_EXPERT_BANK_HPP
#define SPARSEMOE_EXPERT_BANK_HPP

/// \file expert_bank.hpp
/// A bank of N experts of one shape and the expert-compute stage over rows grouped by expert,
/// forward and backward, with every input and output passed explicitly: the unit that an MoE
/// layer (or an expert-parallel layer, which holds only its own share of the experts) runs
/// between grouping and combining.

#include "config.hpp"
#include "detail/expert_kernels.hpp"
#include "detail/expert_tiles.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "dispatch.hpp"
#include "expert.hpp"
#include "packed_experts.hpp"
#include "parameters.hpp"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Scratch memory of ExpertBank::forward, reusable across calls: a forward of the same shape
/// into the same workspace allocates nothing. Not shared between threads.
template <typename Scalar>
struct ExpertBankForwardWorkspace {
  std::vector<Matrix<Scalar>> hidden;        ///< per OpenMP thread, tile×h
  std::vector<Matrix<Scalar>> pre;           ///< per OpenMP thread, tile×p (when no pre-activations are kept)
  std::vector<detail::ExpertTile> tiles;     ///< this call's row tiles
  std::vector<Index> expert_order;           ///< experts by descending row count
  /** @{ */
  /// Per expert, W1 and W2 packed for this call (only for experts with at least
  /// ExpertBank::pack_rows_threshold rows, whose GEMMs then stream contiguous panels).
  std::vector<detail::PackedWeight<Scalar>> packed_w1, packed_w2;
  /** @} */
  std::vector<char> packed_this_call;        ///< per expert: packed_w1/w2 hold its current weights
  Matrix<Scalar> split_pre;                  ///< rows×p, small batches without kept pre-activations
  Matrix<Scalar> split_hidden;               ///< rows×h, small batches
  std::vector<detail::ColumnTile> column_tiles;  ///< small batches: this call's column tiles

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    std::size_t total = static_cast<std::size_t>(split_pre.size() + split_hidden.size());
    for (const auto& block : hidden) total += static_cast<std::size_t>(block.size());
    for (const auto& block : pre) total += static_cast<std::size_t>(block.size());
    total *= sizeof(Scalar);
    for (const auto& packed : packed_w1) total += packed.bytes();
    for (const auto& packed : packed_w2) total += packed.bytes();
    return total;
  }
};

/// Scratch memory of ExpertBank::backward, reusable across calls of the same shape. Not shared
/// between threads.
template <typename Scalar>
struct ExpertBankBackwardWorkspace {
  Matrix<Scalar> hidden;                                     ///< rows×h: act(pre), recomputed
  Matrix<Scalar> d_pre;                                      ///< rows×p: ∂L/∂pre
  std::vector<Matrix<Scalar>> d_hidden;                      ///< per OpenMP thread, tile×h
  std::vector<detail::PackedWeight<Scalar>> w1_transposed;   ///< per expert, W1ᵀ packed (p×d)
  std::vector<detail::PackedWeight<Scalar>> w2_transposed;   ///< per expert, W2ᵀ packed (d×h)
  std::vector<detail::ExpertTile> tiles;                     ///< this call's row tiles
  std::vector<Index> expert_order;                           ///< experts by descending row count
  std::vector<detail::GradientTile> gradient_tiles;          ///< this call's weight-gradient tiles
  /// Per OpenMP thread, (grouped rows)×gradient_column_tile: the ∂pre or ∂Y columns of one
  /// weight-gradient tile copied contiguous (libxsmm backend only; empty otherwise).
  std::vector<Matrix<Scalar>> gradient_columns;

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    std::size_t total = static_cast<std::size_t>(hidden.size() + d_pre.size()) * sizeof(Scalar);
    for (const auto& block : d_hidden) total += static_cast<std::size_t>(block.size()) * sizeof(Scalar);
    for (const auto& block : gradient_columns) total += static_cast<std::size_t>(block.size()) * sizeof(Scalar);
    for (const auto& packed : w1_transposed) total += packed.bytes();
    for (const auto& packed : w2_transposed) total += packed.bytes();
    return total;
  }
};

/// The row layout of a DispatchPlan as an ExpertBank takes it: plan.offsets (E+1 entries; expert
/// e owns grouped rows [offsets[e], offsets[e+1])). O(1), no copy.
inline const IndexVector& bank_offsets(const DispatchPlan& plan) { return plan.offsets; }

/// Fills `offsets` (resized to N+1) from the row counts of N experts: offsets[0] = 0,
/// offsets[e+1] = offsets[e] + counts[e]. Throws std::invalid_argument naming the expert if a
/// count is negative. O(N); allocates nothing when `offsets` already has N+1 entries.
inline void bank_offsets_from_counts(const Eigen::Ref<const IndexVector>& counts, IndexVector& offsets) {
  offsets.resize(counts.size() + 1);
  offsets[0] = 0;
  for (Index e = 0; e < counts.size(); ++e) {
    detail::require(counts[e] >= 0, "sparsemoe::bank_offsets_from_counts", "expert ", e, " has a negative row count ",
                    counts[e]);
    offsets[e + 1] = offsets[e] + counts[e];
  }
}

/// N experts of one shape (d, h, p and bias sizes) and the expert-compute stage over rows
/// grouped by expert: E_e(x) = act(x·W1_e + b1_e)·W2_e + b2_e for every grouped row x of expert
/// e, forward and backward, with all data passed explicitly.
///
/// The row layout is `offsets` (N+1 Index values, offsets[0] = 0, non-decreasing, offsets[N] =
/// rows): expert e owns grouped rows [offsets[e], offsets[e+1]). A DispatchPlan's offsets are
/// exactly this (bank_offsets()); rows received from elsewhere (an all-to-all exchange) need only
/// their counts per expert (bank_offsets_from_counts()). The bank never sees tokens or slots.
///
/// Work is cut into tiles of row_tile rows of one expert, biggest experts first, handed out by a
/// dynamic OpenMP schedule; each tile runs two single-threaded GEMMs with the bias and an
/// element-wise activation fused into the output blocks of the first. A forward on few rows of
/// one expert (column_split_rows) is cut by weight columns instead. Experts with at least
/// pack_rows_threshold rows get their weights packed into the workspace first (forward), and
/// backward packs W1ᵀ and W2ᵀ of every expert with rows. Tiles depend on the layout only, never
/// on the thread count: results are bitwise identical for any number of threads. Each expert's
/// rows are cut the same way whatever the other experts hold, so a bank holding some of a layer's
/// experts (one process of an expert-parallel layer) gives those experts' rows the bits the whole
/// layer gives them, except where the column split (decided per call, from all of the call's
/// rows) applies to one call and not to the other: then the two agree up to rounding.
///
/// A second bank can run in the same schedule as a **companion** (ForwardCompanion,
/// BackwardCompanion): its row tiles are handed out first, in the same dynamic loop as this
/// bank's, so that neither waits for the other. MoELayer runs its shared expert this way, as a
/// one-expert bank over the T token rows (offsets {0, T}, input the token matrix itself: no copy).
/// A companion always runs in row tiles over its weights as stored (never packed, never split
/// by columns): meant for big, regular work such as a shared expert over every token.
///
/// Cost: forward 2·rows·d·(p + h) flops; backward about twice that, plus packing W1ᵀ and W2ᵀ of
/// the experts that have rows (O(d·(p + h)) each).
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT an expert type modelling the contract of expert.hpp.
template <typename Scalar_, typename ExpertT>
class ExpertBank {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type.
  using ExpertType = ExpertT;
  /// Scratch of forward.
  using ForwardWorkspace = ExpertBankForwardWorkspace<Scalar>;
  /// Scratch of backward.
  using BackwardWorkspace = ExpertBankBackwardWorkspace<Scalar>;
  static_assert(std::is_same<typename ExpertT::Scalar, Scalar>::value, "ExpertT::Scalar must be the bank's Scalar");

  /// The shapes every expert of the bank has (and keeps: forward and backward check them).
  struct Shape {
    Index input_dim = 0;             ///< d
    Index hidden_dim = 0;            ///< h
    Index pre_activation_width = 0;  ///< p (h, or 2h for SwiGLU)
    Index b1_size = 0;               ///< entries of b1 (0: no bias)
    Index b2_size = 0;               ///< entries of b2 (0: no bias)
  };

  /// Rows of one expert tile (fixed, so results do not depend on the thread count).
  static constexpr Index row_tile = 128;
  /// Columns of one weight-gradient tile in backward.
  static constexpr Index gradient_column_tile = 128;
  /// A forward without PackedExperts packs the W1 and W2 of each expert that has at least this
  /// many rows into its workspace first: packing costs about as much as the GEMMs gain on
  /// ~240 rows (bench/NOTES.md), and fewer rows are better served from the weights as stored.
  static constexpr Index pack_rows_threshold = 256;
  /// A forward with at most this many grouped rows, all of at most column_split_max_experts
  /// experts, splits expert work by columns, so that all threads stream the one expert's
  /// weights. Fixed by the problem, never by the thread count.
  static constexpr Index column_split_rows = 256;
  /// See column_split_rows: the column split applies when at most this many experts have rows.
  static constexpr Index column_split_max_experts = 1;
  /// Columns of one tile of the column split (a multiple of the 64-column weight panels).
  static constexpr Index column_tile = 256;

  /// Another bank's forward run in the same schedule (its row tiles first); see the class
  /// comment. Its fields mean what the same-named arguments of forward() mean.
  struct ForwardCompanion {
    const ExpertBank* bank;                   ///< the companion bank (same d)
    Eigen::Ref<const IndexVector> offsets;    ///< its layout, N_c + 1 entries
    ConstMatrixRef<Scalar> input;             ///< its rows, rows_c×d
    Matrix<Scalar>* pre_activations;          ///< rows_c×p_c kept for backward, or null
    Matrix<Scalar>* output;                   ///< rows_c×d, resized
    ForwardWorkspace* workspace;              ///< its own scratch
  };

  /// Another bank's backward run in the same schedule (its row tiles and weight-gradient tiles
  /// first); see the class comment. Its fields mean what the same-named arguments of backward()
  /// mean.
  struct BackwardCompanion {
    const ExpertBank* bank;                    ///< the companion bank (same d)
    Eigen::Ref<const IndexVector> offsets;     ///< its layout, N_c + 1 entries
    ConstMatrixRef<Scalar> input;              ///< its rows, rows_c×d
    ConstMatrixRef<Scalar> pre_activations;    ///< rows_c×p_c, as its forward kept them
    /// rows_c×d: in ∂L/∂y rows, out gate·∂L/∂y (written through a const companion, hence mutable).
    mutable MatrixRef<Scalar> d_output;
    Eigen::Ref<const Vector<Scalar>> gate_of_row;  ///< rows_c entries, or empty (gate 1)
    Matrix<Scalar>* d_input;                   ///< rows_c×d, resized
    Vector<Scalar>* d_gate_of_row;             ///< rows_c (or 0 when gate_of_row is empty), resized
    std::vector<ExpertT>* gradients;           ///< N_c expert-shaped gradients, ADDED to
    BackwardWorkspace* workspace;              ///< its own scratch
  };

  /// A bank of no experts (num_experts() = 0): nothing to run; assign a real bank to it.
  ExpertBank() = default;

  /// Takes `experts` (N ≥ 1, all of the first one's shapes). Throws std::invalid_argument naming
  /// the first expert whose shapes differ, or when `experts` is empty.
  explicit ExpertBank(std::vector<ExpertT> experts) : experts_(std::move(experts)) {
    const char* function = "sparsemoe::ExpertBank";
    detail::require(!experts_.empty(), function, "a bank needs at least one expert");
    const ExpertT& first = experts_.front();
    shape_ = {first.input_dim(), first.hidden_dim(), first.pre_activation_width(), first.b1().size(),
              first.b2().size()};
    require_expert_shapes(function);
  }

  /// N zero experts of width d and hidden width h (ExpertT(d, h)). Throws std::invalid_argument
  /// unless N ≥ 1 (and ExpertT's own checks of d and h).
  ExpertBank(Index num_experts, Index input_dim, Index hidden_dim)
      : ExpertBank(std::vector<ExpertT>(static_cast<std::size_t>(checked_count(num_experts)),
                                        ExpertT(input_dim, hidden_dim))) {}

  /// N, the number of experts.
  Index num_experts() const { return static_cast<Index>(experts_.size()); }
  /// d, the width of every row in and out.
  Index input_dim() const { return shape_.input_dim; }
  /// h, every expert's hidden width.
  Index hidden_dim() const { return shape_.hidden_dim; }
  /// p, every expert's pre-activation width (h, or 2h for SwiGLU).
  Index pre_activation_width() const { return shape_.pre_activation_width; }
  /// The shapes every expert has.
  const Shape& shape() const { return shape_; }

  /** @{ */
  /// Expert `index`, 0 ≤ index < N (std::out_of_range otherwise; keep its shapes).
  ExpertT& expert(Index index) { return experts_.at(static_cast<std::size_t>(index)); }
  const ExpertT& expert(Index index) const { return experts_.at(static_cast<std::size_t>(index)); }
  /** @} */
  /// All N experts.
  const std::vector<ExpertT>& experts() const { return experts_; }

  /// Every parameter tensor: expert{first_index}.w1, expert{first_index}.b1, …, then the next
  /// expert's (names as MoELayer::tensors() gives them; a bank that holds experts
  /// first_index … first_index + N − 1 of a bigger layer names them as that layer does).
  std::vector<TensorView<Scalar>> tensors(Index first_index = 0) {
    std::vector<TensorView<Scalar>> list;
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      append_tensor_views(list, "expert" + std::to_string(first_index + static_cast<Index>(e)) + ".",
                          experts_[e].tensors());
    }
    return list;
  }

  /// N zero gradients shaped like the experts (for backward's `gradients`).
  std::vector<ExpertT> make_gradients() const {
    return std::vector<ExpertT>(experts_.size(), ExpertT(input_dim(), hidden_dim()));
  }

  /// Whether `expert`'s tensors have this bank's shapes.
  bool fits(const ExpertT& expert) const {
    return expert.w1().rows() == shape_.input_dim && expert.w1().cols() == shape_.pre_activation_width &&
           expert.w2().rows() == shape_.hidden_dim && expert.w2().cols() == shape_.input_dim &&
           expert.b1().size() == shape_.b1_size && expert.b2().size() == shape_.b2_size;
  }

  /// Throws std::invalid_argument (naming `function` and the expert) unless every expert still
  /// has the bank's shapes (they are reachable through non-const references). O(N).
  void require_expert_shapes(const char* function) const {
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      const ExpertT& expert = experts_[e];
      detail::require(fits(expert), function, "expert ", e, " has been resized: w1 ", expert.w1().rows(), "x",
                      expert.w1().cols(), ", b1 ", expert.b1().size(), ", w2 ", expert.w2().rows(), "x",
                      expert.w2().cols(), ", b2 ", expert.b2().size(), "; the layer needs w1 ", shape_.input_dim, "x",
                      shape_.pre_activation_width, ", b1 ", shape_.b1_size, ", w2 ", shape_.hidden_dim, "x",
                      shape_.input_dim, ", b2 ", shape_.b2_size);
    }
  }

  /// The experts' current W1 and W2 packed for the GEMM backend, for forward's `packed`.
  /// O(N·d·(p + h)) time and memory; parallel over experts. It is a copy: pack again after the
  /// weights change.
  PackedExperts<Scalar> pack() const {
    PackedExperts<Scalar> packed;
    packed.experts_.resize(experts_.size());
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      const ExpertT& expert = experts_[static_cast<std::size_t>(e)];
      auto& entry = packed.experts_[static_cast<std::size_t>(e)];
      entry.w1 = detail::PackedWeight<Scalar>(expert.w1());
      entry.b1 = expert.b1();
      entry.w2 = detail::PackedWeight<Scalar>(expert.w2());
      entry.b2 = expert.b2();
    });
    return packed;
  }

  /// Forward of the expert stage: expert_output row r = E_e(grouped_input row r) for every row r
  /// of expert e, e = 0 … N−1.
  ///
  /// \param offsets the layout, N+1 entries (see the class comment).
  /// \param grouped_input rows×d, rows = offsets[N], each expert's rows contiguous.
  /// \param pre_activations when not null, resized to rows×p and filled with x·W1 + b1 of every
  ///   row (what backward needs); when null, kept in the workspace per tile only.
  /// \param expert_output resized to rows×d.
  /// \param workspace scratch, kept from call to call.
  /// \param packed when not null, the GEMMs read these packed weights and biases (from pack() of
  ///   a bank with these experts, or MoELayer::pack_experts()) instead of the experts'.
  ///
  /// Throws std::invalid_argument, before any work, on a bad layout, shapes other than these, or
  /// packed weights of other shapes. Cost: 2·rows·d·(p + h) flops.
  void forward(const Eigen::Ref<const IndexVector>& offsets, ConstMatrixRef<Scalar> grouped_input,
               Matrix<Scalar>* pre_activations, Matrix<Scalar>& expert_output, ForwardWorkspace& workspace,
               const PackedExperts<Scalar>* packed = nullptr) const {
    forward_impl(offsets, grouped_input, pre_activations, expert_output, workspace, packed, nullptr);
  }

  /// forward(), with `companion`'s rows run first in the same schedule (see the class comment).
  void forward(const Eigen::Ref<const IndexVector>& offsets, ConstMatrixRef<Scalar> grouped_input,
               Matrix<Scalar>* pre_activations, Matrix<Scalar>& expert_output, ForwardWorkspace& workspace,
               const PackedExperts<Scalar>* packed, const ForwardCompanion& companion) const {
    forward_impl(offsets, grouped_input, pre_activations, expert_output, workspace, packed, &companion);
  }

  /// Backward of the expert stage, for rows whose output entered the loss as g_r·E_e(x_r), g_r =
  /// gate_of_row[r] (the combine weight of row r; 1 for every row when gate_of_row is empty):
  ///
  ///  - d_gate_of_row[r] = ⟨∂L/∂y_r, E_e(x_r)⟩ (∂L/∂g_r; not computed when gate_of_row is empty),
  ///  - d_grouped_input row r = ∂L/∂x_r through the expert,
  ///  - ∂L/∂(W1_e, b1_e, W2_e, b2_e) ADDED to gradients[e], accumulated from grouped_input (never
  ///    from tokens): ∂W1 += Xᵀ·∂pre, ∂b1 += Σ ∂pre, ∂W2 += hiddenᵀ·(g ⊙ ∂Y), ∂b2 += Σ g ⊙ ∂Y.
  ///
  /// \param offsets the layout of the forward.
  /// \param grouped_input rows×d, as given to forward.
  /// \param pre_activations rows×p, as forward kept them.
  /// \param grouped_d_output rows×d: on entry ∂L/∂y_r, the unscaled gradient of each row's
  ///   share of the output; on return g_r·∂L/∂y_r = ∂L/∂E_e(x_r) (scaled in place: no copy).
  /// \param gate_of_row rows entries, or empty for gates of 1.
  /// \param d_grouped_input resized to rows×d.
  /// \param d_gate_of_row resized to rows (0 when gate_of_row is empty).
  /// \param gradients N expert-shaped gradients (make_gradients()), ADDED to.
  /// \param workspace scratch, kept from call to call.
  ///
  /// The weight gradients are reduced in tiles of gradient_column_tile columns of one expert, each
  /// over the expert's rows in order: no two threads touch one element and the sum order is fixed.
  /// Throws std::invalid_argument, before any work, on a bad layout or shapes. Cost: about
  /// 4·rows·d·(p + h) flops, plus packing W1ᵀ and W2ᵀ of every expert with rows.
  void backward(const Eigen::Ref<const IndexVector>& offsets, ConstMatrixRef<Scalar> grouped_input,
                ConstMatrixRef<Scalar> pre_activations, MatrixRef<Scalar> grouped_d_output,
                const Eigen::Ref<const Vector<Scalar>>& gate_of_row, Matrix<Scalar>& d_grouped_input,
                Vector<Scalar>& d_gate_of_row,
                std::vector<ExpertT>& gradients, BackwardWorkspace& workspace) const {
    backward_impl({this, offsets, grouped_input, pre_activations, grouped_d_output, gate_of_row, &d_grouped_input,
                   &d_gate_of_row, &gradients, &workspace},
                  nullptr);
  }

  /// backward(), with `companion`'s rows and weight gradients run first in the same schedule.
  void backward(const Eigen::Ref<const IndexVector>& offsets, ConstMatrixRef<Scalar> grouped_input,
                ConstMatrixRef<Scalar> pre_activations, MatrixRef<Scalar> grouped_d_output,
                const Eigen::Ref<const Vector<Scalar>>& gate_of_row, Matrix<Scalar>& d_grouped_input,
                Vector<Scalar>& d_gate_of_row,
                std::vector<ExpertT>& gradients, BackwardWorkspace& workspace,
                const BackwardCompanion& companion) const {
    backward_impl({this, offsets, grouped_input, pre_activations, grouped_d_output, gate_of_row, &d_grouped_input,
                   &d_gate_of_row, &gradients, &workspace},
                  &companion);
  }

 private:
  using Weights = detail::ExpertWeights<Scalar, ExpertT>;

  static Index checked_count(Index num_experts) {
    detail::require(num_experts >= 1, "sparsemoe::ExpertBank", "num_experts must be >= 1, got ", num_experts);
    return num_experts;
  }

  /// Throws unless `offsets` is a layout of this bank's N experts over `rows` rows.
  void require_layout(const Eigen::Ref<const IndexVector>& offsets, Index rows, const char* function,
                      const char* what) const {
    detail::require(offsets.size() == num_experts() + 1, function, what, " offsets has ", offsets.size(),
                    " entries, expected num_experts + 1 = ", num_experts() + 1);
    detail::require(offsets[0] == 0, function, what, " offsets[0] must be 0, got ", offsets[0]);
    for (Index e = 0; e < num_experts(); ++e) {
      detail::require(offsets[e + 1] >= offsets[e], function, what, " offsets must not decrease, but offsets[", e + 1,
                      "] = ", offsets[e + 1], " < offsets[", e, "] = ", offsets[e]);
    }
    detail::require(offsets[num_experts()] == rows, function, what, " offsets[N] = ", offsets[num_experts()],
                    " but the grouped rows number ", rows);
  }

  void require_forward(const Eigen::Ref<const IndexVector>& offsets, const ConstMatrixRef<Scalar>& input,
                       const PackedExperts<Scalar>* packed, const char* function, const char* what) const {
    detail::require(num_experts() > 0, function, "the ", what, " bank holds no experts");
    require_expert_shapes(function);
    detail::require(input.cols() == input_dim(), function, what, " grouped_input must have ", input_dim(),
                    " columns, got ", input.rows(), "x", input.cols());
    require_layout(offsets, input.rows(), function, what);
    if (!packed) return;
    bool shapes_match = packed->num_experts() == num_experts();
    for (std::size_t e = 0; shapes_match && e < packed->experts_.size(); ++e) {
      const auto& entry = packed->experts_[e];
      shapes_match = entry.w1.rows() == input_dim() && entry.w1.cols() == pre_activation_width() &&
                     entry.w2.rows() == hidden_dim() && entry.w2.cols() == input_dim() &&
                     entry.b1.size() == shape_.b1_size && entry.b2.size() == shape_.b2_size;
    }
    detail::require(shapes_match, function, "the packed experts do not have the shapes of the bank's ", num_experts(),
                    " experts");
  }

  /// Average flops of one of `tiles` tiles sharing the expert forward of `rows` rows.
  double tile_flops(Index rows, std::size_t tiles) const {
    const double total = 2.0 * static_cast<double>(rows) * static_cast<double>(input_dim()) *
                         static_cast<double>(pre_activation_width() + hidden_dim());
    return tiles == 0 ? 0.0 : total / static_cast<double>(tiles);
  }

  Weights weights_of(Index e, const PackedExperts<Scalar>* packed, const ForwardWorkspace& workspace) const {
    const auto index = static_cast<std::size_t>(e);
    const ExpertT& expert = experts_[index];
    if (packed) {
      const auto& entry = packed->experts_[index];
      return {&expert, &entry.w1, &entry.b1, &entry.w2, &entry.b2};
    }
    if (workspace.packed_this_call[index]) {
      return {&expert, &workspace.packed_w1[index], &expert.b1(), &workspace.packed_w2[index], &expert.b2()};
    }
    return {&expert, nullptr, &expert.b1(), nullptr, &expert.b2()};
  }

  /// Sizes the per-thread tile buffers of a row-tiled forward.
  void prepare_row_tiles(bool keep_pre, ForwardWorkspace& workspace) const {
    const auto threads = static_cast<std::size_t>(detail::max_threads());
    workspace.hidden.resize(threads);
    workspace.pre.resize(keep_pre ? 0 : threads);
    for (auto& block : workspace.hidden) block.resize(row_tile, hidden_dim());
    for (auto& block : workspace.pre) block.resize(row_tile, pre_activation_width());
  }

  /// One row tile of forward: both GEMMs of one expert over tile.rows rows.
  void forward_tile(const detail::ExpertTile& tile, const ConstMatrixRef<Scalar>& input,
                    Matrix<Scalar>* pre_activations, Matrix<Scalar>& output, ForwardWorkspace& workspace,
                    const PackedExperts<Scalar>* packed) const {
    const auto thread = static_cast<std::size_t>(detail::thread_index());
    auto hidden = workspace.hidden[thread].topRows(tile.rows);
    auto pre = pre_activations ? pre_activations->middleRows(tile.first_row, tile.rows)
                               : workspace.pre[thread].topRows(tile.rows);
    auto out = output.middleRows(tile.first_row, tile.rows);
    const ExpertT& expert = experts_[static_cast<std::size_t>(tile.expert)];
    const Weights weights = weights_of(tile.expert, packed, workspace);
    detail::expert_first_layer(expert, weights, input.middleRows(tile.first_row, tile.rows), pre, hidden, 0,
                               pre_activation_width());
    if (!detail::activation_is_elementwise<ExpertT>::value) expert.activate(pre, hidden);
    detail::expert_second_layer(weights, hidden, out, 0, input_dim());
  }

  /// Prepares a companion's forward: output, tiles and per-thread buffers; its weights as stored.
  void prepare_companion_forward(const ForwardCompanion& companion) const {
    ForwardWorkspace& workspace = *companion.workspace;
    companion.output->resize(companion.input.rows(), input_dim());
    if (companion.pre_activations) companion.pre_activations->resize(companion.input.rows(), pre_activation_width());
    detail::make_expert_tiles(companion.offsets, row_tile, workspace.expert_order, workspace.tiles);
    workspace.packed_this_call.assign(experts_.size(), 0);
    prepare_row_tiles(companion.pre_activations != nullptr, workspace);
  }

  void forward_impl(const Eigen::Ref<const IndexVector>& offsets, const ConstMatrixRef<Scalar>& grouped_input,
                    Matrix<Scalar>* pre_activations, Matrix<Scalar>& expert_output, ForwardWorkspace& workspace,
                    const PackedExperts<Scalar>* packed, const ForwardCompanion* companion) const {
    const char* function = "sparsemoe::ExpertBank::forward";
    require_forward(offsets, grouped_input, packed, function, "the");
    if (companion) {
      detail::require(companion->bank && companion->output && companion->workspace &&
                          companion->bank->input_dim() == input_dim(),
                      function, "the companion needs a bank of width ", input_dim(), ", an output and a workspace");
      companion->bank->require_forward(companion->offsets, companion->input, nullptr, function, "the companion's");
    }
    const Index rows = offsets[num_experts()];
    expert_output.resize(rows, input_dim());
    if (pre_activations) pre_activations->resize(rows, pre_activation_width());
    detail::make_expert_tiles(offsets, row_tile, workspace.expert_order, workspace.tiles);
    pack_large_experts(offsets, packed == nullptr, workspace);
    Index companion_tiles = 0;
    double companion_tile_flops = 0;
    if (companion) {
      const ExpertBank& other = *companion->bank;
      other.prepare_companion_forward(*companion);
      companion_tiles = static_cast<Index>(companion->workspace->tiles.size());
      companion_tile_flops = 2.0 * static_cast<double>(row_tile * input_dim()) *
                             static_cast<double>(other.pre_activation_width() + other.hidden_dim());
    }
    const auto companion_tile = [&](Index index) {
      ForwardWorkspace& other = *companion->workspace;
      companion->bank->forward_tile(other.tiles[static_cast<std::size_t>(index)], companion->input,
                                    companion->pre_activations, *companion->output, other, nullptr);
    };
    Index experts_used = 0;
    for (Index e = 0; e < num_experts(); ++e) experts_used += detail::rows_of_expert(offsets, e) > 0;
    if (rows <= column_split_rows && experts_used <= column_split_max_experts) {
      forward_by_columns(offsets, grouped_input, pre_activations, expert_output, workspace, packed);
      detail::parallel_for_dynamic(companion_tiles, companion_tile_flops, companion_tile);
      return;
    }
    prepare_row_tiles(pre_activations != nullptr, workspace);
    const Index own_tiles = static_cast<Index>(workspace.tiles.size());
    const double work = (tile_flops(rows, 1) + static_cast<double>(companion_tiles) * companion_tile_flops) /
                        static_cast<double>(std::max<Index>(1, own_tiles + companion_tiles));
    detail::parallel_for_dynamic(companion_tiles + own_tiles, work, [&](Index index) {
      if (index < companion_tiles) {
        companion_tile(index);
        return;
      }
      forward_tile(workspace.tiles[static_cast<std::size_t>(index - companion_tiles)], grouped_input, pre_activations,
                   expert_output, workspace, packed);
    });
  }

  /// Forward for small batches: phase 1, tiles (expert, column_tile columns of W1) give pre and
  /// hidden of all the expert's rows; after them (and, for a non-element-wise activation, an
  /// activation pass per expert), phase 2, tiles (expert, column_tile columns of W2).
  void forward_by_columns(const Eigen::Ref<const IndexVector>& offsets, const ConstMatrixRef<Scalar>& grouped_input,
                          Matrix<Scalar>* pre_activations, Matrix<Scalar>& expert_output, ForwardWorkspace& workspace,
                          const PackedExperts<Scalar>* packed) const {
    const Index rows = offsets[num_experts()];
    workspace.split_hidden.resize(rows, hidden_dim());
    workspace.split_pre.resize(pre_activations ? 0 : rows, pre_activation_width());
    Matrix<Scalar>& pre_all = pre_activations ? *pre_activations : workspace.split_pre;
    auto& tiles = workspace.column_tiles;
    const auto make_tiles = [&](Index width) {
      tiles.clear();
      for (const Index expert : workspace.expert_order) {
        if (detail::rows_of_expert(offsets, expert) == 0) continue;
        for (Index c = 0; c < width; c += column_tile) tiles.push_back({expert, c, std::min(column_tile, width - c)});
      }
    };
    const auto run = [&](Index width, bool first) {
      make_tiles(width);
      detail::parallel_for_dynamic(static_cast<Index>(tiles.size()), tile_flops(rows, tiles.size()), [&](Index index) {
        const detail::ColumnTile& tile = tiles[static_cast<std::size_t>(index)];
        const Index first_row = offsets[tile.expert], count = detail::rows_of_expert(offsets, tile.expert);
        const Weights weights = weights_of(tile.expert, packed, workspace);
        auto hidden = workspace.split_hidden.middleRows(first_row, count);
        if (first) {
          auto pre = pre_all.middleRows(first_row, count);
          detail::expert_first_layer(*weights.expert, weights, grouped_input.middleRows(first_row, count), pre, hidden,
                                     tile.first_column, tile.columns);
        } else {
          auto output = expert_output.middleRows(first_row, count);
          detail::expert_second_layer(weights, hidden, output, tile.first_column, tile.columns);
        }
      });
    };
    run(pre_activation_width(), true);
    if (!detail::activation_is_elementwise<ExpertT>::value) {
      // About one operation per pre-activation of the expert's rows.
      const double work = static_cast<double>(rows) * static_cast<double>(pre_activation_width()) /
                          static_cast<double>(num_experts());
      detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
        const Index first_row = offsets[e], count = detail::rows_of_expert(offsets, e);
        experts_[static_cast<std::size_t>(e)].activate(pre_all.middleRows(first_row, count),
                                                       workspace.split_hidden.middleRows(first_row, count));
      });
    }
    run(input_dim(), false);
  }

  /// Packs W1 and W2 of every expert with at least pack_rows_threshold rows into the workspace
  /// (when `enabled`), marking them in workspace.packed_this_call. Parallel over experts.
  void pack_large_experts(const Eigen::Ref<const IndexVector>& offsets, bool enabled,
                          ForwardWorkspace& workspace) const {
    const auto experts = experts_.size();
    workspace.packed_this_call.assign(experts, 0);
    if (!enabled) return;
    workspace.packed_w1.resize(experts);
    workspace.packed_w2.resize(experts);
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(pre_activation_width() + hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      if (detail::rows_of_expert(offsets, e) < pack_rows_threshold) return;
      const auto index = static_cast<std::size_t>(e);
      workspace.packed_w1[index].assign(experts_[index].w1(), detail::Op::none);
      workspace.packed_w2[index].assign(experts_[index].w2(), detail::Op::none);
      workspace.packed_this_call[index] = 1;
    });
  }

  /// Checks one backward's arguments (this bank's, or a companion's) before any work.
  void require_backward(const BackwardCompanion& call, const char* function, const char* what) const {
    require_forward(call.offsets, call.input, nullptr, function, what);
    const Index rows = call.input.rows();
    detail::require(call.pre_activations.rows() == rows && call.pre_activations.cols() == pre_activation_width(),
                    function, what, " pre_activations must be ", rows, "x", pre_activation_width(), ", got ",
                    call.pre_activations.rows(), "x", call.pre_activations.cols());
    detail::require(call.d_output.rows() == rows && call.d_output.cols() == input_dim(), function, what,
                    " grouped_d_output must be ", rows, "x", input_dim(), ", got ", call.d_output.rows(), "x",
                    call.d_output.cols());
    detail::require(call.gate_of_row.size() == rows || call.gate_of_row.size() == 0, function, what,
                    " gate_of_row has ", call.gate_of_row.size(), " entries, expected ", rows, " (or 0)");
    detail::require(static_cast<Index>(call.gradients->size()) == num_experts(), function, what, " gradients has ",
                    call.gradients->size(), " experts, the bank ", num_experts());
    for (const ExpertT& gradient : *call.gradients) {
      detail::require(fits(gradient), function, "an expert gradient is ", gradient.input_dim(), "x",
                      gradient.hidden_dim(), " or has resized tensors, expected ", input_dim(), "x", hidden_dim());
    }
  }

  /// Sizes one backward's outputs and scratch, and lists its row tiles.
  void prepare_backward(const BackwardCompanion& call, bool pack_weights) const {
    BackwardWorkspace& workspace = *call.workspace;
    const Index rows = call.input.rows();
    workspace.hidden.resize(rows, hidden_dim());
    workspace.d_pre.resize(rows, pre_activation_width());
    call.d_input->resize(rows, input_dim());
    call.d_gate_of_row->resize(call.gate_of_row.size() > 0 ? rows : 0);
    if (pack_weights) pack_transposed_weights(call.offsets, workspace);
    detail::make_expert_tiles(call.offsets, row_tile, workspace.expert_order, workspace.tiles);
    const auto threads = static_cast<std::size_t>(detail::max_threads());
    workspace.d_hidden.resize(threads);
    for (auto& block : workspace.d_hidden) block.resize(row_tile, hidden_dim());
#ifdef SPARSEMOE_WITH_LIBXSMM
    // Room for all of the call's rows, not just the most one expert has: the routing moves from
    // step to step while the total stays (T·k, or E·C with capacity), so a steady state never
    // grows these. Grow-only: a later call with fewer rows allocates nothing.
    workspace.gradient_columns.resize(threads);
    for (auto& block : workspace.gradient_columns) {
      if (block.rows() < rows) block.resize(rows, gradient_column_tile);
    }
#endif
  }

  /// One row tile of backward: ∂hidden = ∂Y·W2ᵀ (unscaled), the gate's ⟨∂Y, E(x)⟩, then times g:
  /// ∂Y in place, ∂pre and the ∂X rows; the recomputed hidden rows are kept for the weight
  /// gradients. `packed`: W1ᵀ and W2ᵀ from the workspace (else the weights as stored).
  ///
  /// For an element-wise activation the element-wise work runs on each output block of the
  /// ∂hidden product while it is in cache (recompute hidden, add the block's share of
  /// ⟨∂hidden, hidden⟩ to the gate's gradient, scale by g, ∂pre = act'(pre) ⊙ g·∂hidden) instead
  /// of in passes over the whole tile after it: the blocks are fixed by the shapes, so the sums
  /// keep their order for any thread count. Other activations (SwiGLU) run the passes.
  void backward_tile(const detail::ExpertTile& tile, const BackwardCompanion& call, bool packed) const {
    const auto no_epilogue = [](Index, Index, Index, Index) {};
    BackwardWorkspace& workspace = *call.workspace;
    const auto expert_index = static_cast<std::size_t>(tile.expert);
    const ExpertT& expert = experts_[expert_index];
    auto d_hidden = workspace.d_hidden[static_cast<std::size_t>(detail::thread_index())].topRows(tile.rows);
    auto d_out = call.d_output.middleRows(tile.first_row, tile.rows);
    const auto pre = call.pre_activations.middleRows(tile.first_row, tile.rows);
    auto hidden = workspace.hidden.middleRows(tile.first_row, tile.rows);
    auto d_pre = workspace.d_pre.middleRows(tile.first_row, tile.rows);
    const Eigen::Ref<const Vector<Scalar>>& gates = call.gate_of_row;
    const bool gated = gates.size() > 0;
    Vector<Scalar>& d_gates = *call.d_gate_of_row;
    if (gated) {
      // ⟨∂Y, b2⟩ first; the blocks of ⟨∂hidden, hidden⟩ are added to it.
      for (Index r = 0; r < tile.rows; ++r) {
        d_gates[tile.first_row + r] = expert.b2().size() > 0 ? d_out.row(r).dot(expert.b2().transpose()) : Scalar(0);
      }
    }
    // Rows [row, row + rows) × columns [col, col + width) of ∂hidden (hidden already there): add
    // their share of ⟨∂hidden, hidden⟩ to each row's gate gradient, then scale them by the gate.
    const auto gate_block = [&](Index row, Index rows, Index col, Index width) {
      if (!gated) return;
      for (Index r = row; r < row + rows; ++r) {
        const Index grouped_row = tile.first_row + r;
        d_gates[grouped_row] += d_hidden.row(r).segment(col, width).dot(hidden.row(r).segment(col, width));
        d_hidden.row(r).segment(col, width) *= gates[grouped_row];
      }
    };
    constexpr bool fused = detail::activation_is_elementwise<ExpertT>::value;
    const auto elementwise = [&](Index row, Index rows, Index col, Index width) {
      if constexpr (fused) {
        const auto pre_block = pre.block(row, col, rows, width);
        expert.activate(pre_block, hidden.block(row, col, rows, width));
        gate_block(row, rows, col, width);
        expert.activation_backward(pre_block, d_hidden.block(row, col, rows, width), d_pre.block(row, col, rows, width));
      } else {
        static_cast<void>(row), static_cast<void>(rows), static_cast<void>(col), static_cast<void>(width);
      }
    };
    if (packed) {
      detail::gemm_packed(detail::operand(d_out), workspace.w2_transposed[expert_index], d_hidden.data(),
                          d_hidden.outerStride(), false, elementwise);
    } else {
      detail::gemm(detail::operand(d_out), detail::operand(expert.w2(), detail::Op::transpose), d_hidden.data(),
                   d_hidden.outerStride(), Scalar(1), false);
      elementwise(0, tile.rows, 0, hidden_dim());
    }
    if (gated) {
      for (Index r = 0; r < tile.rows; ++r) d_out.row(r) *= gates[tile.first_row + r];
    }
    if constexpr (!fused) {
      expert.activate(pre, hidden);
      gate_block(0, tile.rows, 0, hidden_dim());
      expert.activation_backward(pre, d_hidden, d_pre);
    }
    Matrix<Scalar>& d_input = *call.d_input;
    if (packed) {
      detail::gemm_packed(detail::operand(d_pre), workspace.w1_transposed[expert_index],
                          d_input.row(tile.first_row).data(), d_input.outerStride(), false, no_epilogue);
    } else {
      detail::gemm(detail::operand(d_pre), detail::operand(expert.w1(), detail::Op::transpose),
                   d_input.row(tile.first_row).data(), d_input.outerStride(), Scalar(1), false);
    }
  }

  /// Lists the weight-gradient tiles of one backward: per expert with rows, W1's columns then
  /// W2's, gradient_column_tile at a time.
  void make_gradient_tiles(const BackwardCompanion& call) const {
    auto& tiles = call.workspace->gradient_tiles;
    tiles.clear();
    for (Index expert = 0; expert < num_experts(); ++expert) {
      if (detail::rows_of_expert(call.offsets, expert) == 0) continue;
      for (Index c = 0; c < pre_activation_width(); c += gradient_column_tile) tiles.push_back({expert, true, c});
      for (Index c = 0; c < input_dim(); c += gradient_column_tile) tiles.push_back({expert, false, c});
    }
  }

  /// ∂W1 += Xᵀ·∂pre, ∂b1 += Σ ∂pre (first layer) or ∂W2 += hiddenᵀ·∂out, ∂b2 += Σ ∂out over
  /// the tile's columns and all of its expert's rows, in row order. With libxsmm the tile's
  /// ∂pre or ∂out columns are first copied into a contiguous block: its kernels then read rows of
  /// 128 scalars one after the other instead of one row of the full matrix apart (p or d scalars:
  /// a new page every row or two), which measured faster than the copy costs (bench/NOTES.md);
  /// the kernel and its order of operations are the same, so are the bits.
  void gradient_tile(const detail::GradientTile& tile, const BackwardCompanion& call) const {
    ExpertT& gradient = (*call.gradients)[static_cast<std::size_t>(tile.expert)];
    const Index first_row = call.offsets[tile.expert];
    const Index rows = detail::rows_of_expert(call.offsets, tile.expert);
    Matrix<Scalar>& weight = tile.first_layer ? gradient.w1() : gradient.w2();
    Vector<Scalar>& bias = tile.first_layer ? gradient.b1() : gradient.b2();
    const auto accumulate = [&](const auto& left, const auto& right) {
      const Index columns = std::min(gradient_column_tile, right.cols() - tile.first_column);
      const auto right_block = right.block(first_row, tile.first_column, rows, columns);
      detail::ConstOperand<Scalar> right_operand = detail::operand(right_block);
#ifdef SPARSEMOE_WITH_LIBXSMM
      if (right_operand.stride != columns) {  // not contiguous already (the slice of a wider matrix)
        Matrix<Scalar>& buffer = call.workspace->gradient_columns[static_cast<std::size_t>(detail::thread_index())];
        Eigen::Map<Matrix<Scalar>> copy(buffer.data(), rows, columns);  // row stride = columns
        copy = right_block;
        right_operand = detail::operand(copy);
      }
#endif
      detail::gemm(detail::operand(left.middleRows(first_row, rows), detail::Op::transpose), right_operand,
                   weight.data() + tile.first_column, weight.outerStride(), Scalar(1), true);
      if (bias.size() > 0) bias.segment(tile.first_column, columns) += right_block.colwise().sum().transpose();
    };
    if (tile.first_layer) {
      accumulate(call.input, call.workspace->d_pre);
    } else {
      accumulate(call.workspace->hidden, call.d_output);
    }
  }

  void backward_impl(const BackwardCompanion& own, const BackwardCompanion* companion) const {
    const char* function = "sparsemoe::ExpertBank::backward";
    require_backward(own, function, "the");
    if (companion) {
      detail::require(companion->bank && companion->d_input && companion->d_gate_of_row &&
                          companion->gradients && companion->workspace && companion->bank->input_dim() == input_dim(),
                      function, "the companion needs a bank of width ", input_dim(),
                      ", gates, outputs, gradients and a workspace");
      companion->bank->require_backward(*companion, function, "the companion's");
    }
    prepare_backward(own, true);
    Index companion_tiles = 0;
    double companion_tile_flops = 0;
    if (companion) {
      const ExpertBank& other = *companion->bank;
      other.prepare_backward(*companion, false);
      companion_tiles = static_cast<Index>(companion->workspace->tiles.size());
      companion_tile_flops = 4.0 * static_cast<double>(row_tile * input_dim()) *
                             static_cast<double>(other.pre_activation_width() + other.hidden_dim());
    }
    const Index rows = own.input.rows();
    const Index own_tiles = static_cast<Index>(own.workspace->tiles.size());
    const double work = (2 * tile_flops(rows, 1) + static_cast<double>(companion_tiles) * companion_tile_flops) /
                        static_cast<double>(std::max<Index>(1, own_tiles + companion_tiles));
    detail::parallel_for_dynamic(companion_tiles + own_tiles, work, [&](Index index) {
      if (index < companion_tiles) {
        companion->bank->backward_tile(companion->workspace->tiles[static_cast<std::size_t>(index)], *companion, false);
        return;
      }
      backward_tile(own.workspace->tiles[static_cast<std::size_t>(index - companion_tiles)], own, true);
    });

    make_gradient_tiles(own);
    Index companion_gradient_tiles = 0;
    if (companion) {
      companion->bank->make_gradient_tiles(*companion);
      companion_gradient_tiles = static_cast<Index>(companion->workspace->gradient_tiles.size());
    }
    const auto all_gradient_tiles = companion_gradient_tiles + static_cast<Index>(own.workspace->gradient_tiles.size());
    detail::parallel_for_dynamic(
        all_gradient_tiles, tile_flops(rows, static_cast<std::size_t>(all_gradient_tiles)), [&](Index index) {
          if (index < companion_gradient_tiles) {
            companion->bank->gradient_tile(companion->workspace->gradient_tiles[static_cast<std::size_t>(index)],
                                           *companion);
            return;
          }
          gradient_tile(own.workspace->gradient_tiles[static_cast<std::size_t>(index - companion_gradient_tiles)], own);
        });
  }

  /// W1ᵀ and W2ᵀ of every expert that has rows, packed for the backward products (parallel
  /// over experts; storage reused from call to call).
  void pack_transposed_weights(const Eigen::Ref<const IndexVector>& offsets, BackwardWorkspace& workspace) const {
    workspace.w1_transposed.resize(experts_.size());
    workspace.w2_transposed.resize(experts_.size());
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(pre_activation_width() + hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      if (detail::rows_of_expert(offsets, e) == 0) return;
      const auto index = static_cast<std::size_t>(e);
      workspace.w1_transposed[index].assign(experts_[index].w1(), detail::Op::transpose);
      workspace.w2_transposed[index].assign(experts_[index].w2(), detail::Op::transpose);
    });
  }

  std::vector<ExpertT> experts_;
  Shape shape_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_EXPERT_BANK_HPP
