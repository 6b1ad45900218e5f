// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_EXPERT_KERNELS_HPP
#define SPARSEMOE_DETAIL_EXPERT_KERNELS_HPP

/// \file expert_kernels.hpp
/// The two GEMMs of one expert over one tile, with bias and an element-wise activation fused into
/// each output block of the first GEMM while it is in cache. Free templates over any expert type
/// that models the contract of expert.hpp.

#include "../config.hpp"
#include "gemm.hpp"

#include <type_traits>

namespace sparsemoe {
namespace detail {

/// ExpertT::activation_is_elementwise, or false when the type does not say.
template <typename ExpertT, typename = void>
struct activation_is_elementwise : std::false_type {};
template <typename ExpertT>
struct activation_is_elementwise<ExpertT, std::enable_if_t<ExpertT::activation_is_elementwise>> : std::true_type {};

/// Where one expert's weights come from in one call: packed (w1/w2 non-null: from PackedExperts
/// or a workspace) or, when w1/w2 are null, the expert's own matrices.
template <typename Scalar, typename ExpertT>
struct ExpertWeights {
  const ExpertT* expert;
  const PackedWeight<Scalar>* w1;
  const Vector<Scalar>* b1;
  const PackedWeight<Scalar>* w2;
  const Vector<Scalar>* b2;
};

/// Columns [first_col, first_col + cols) of pre = input·W1 + b1, and for an element-wise
/// activation the same columns of hidden = act(pre), each output block while it is in cache.
/// Cost: 2·rows·d·cols flops.
template <typename Scalar, typename ExpertT, typename Input, typename Pre, typename Hidden>
void expert_first_layer(const ExpertT& expert, const ExpertWeights<Scalar, ExpertT>& weights, const Input& input,
                        Pre& pre, Hidden& hidden, Index first_col, Index cols) {
  const auto epilogue = [&](Index row, Index rows, Index col, Index width) {
    auto pre_tile = pre.block(row, col, rows, width);
    if (weights.b1->size() > 0) pre_tile.rowwise() += weights.b1->segment(col, width).transpose();
    if (activation_is_elementwise<ExpertT>::value) expert.activate(pre_tile, hidden.block(row, col, rows, width));
  };
  if (input.rows() == 0) return;
  if (weights.w1) {
    gemm_packed(operand(input), *weights.w1, pre.data(), pre.outerStride(), false, epilogue, first_col, cols);
    return;
  }
  gemm(operand(input), operand(expert.w1().middleCols(first_col, cols)), pre.data() + first_col, pre.outerStride(),
       Scalar(1), false);
  epilogue(0, input.rows(), first_col, cols);
}

/// Columns [first_col, first_col + cols) of output = hidden·W2 + b2. Cost: 2·rows·h·cols flops.
template <typename Scalar, typename ExpertT, typename Hidden, typename Output>
void expert_second_layer(const ExpertWeights<Scalar, ExpertT>& weights, const Hidden& hidden, Output& output,
                         Index first_col, Index cols) {
  const auto epilogue = [&](Index row, Index rows, Index col, Index width) {
    if (weights.b2->size() > 0) {
      output.block(row, col, rows, width).rowwise() += weights.b2->segment(col, width).transpose();
    }
  };
  if (hidden.rows() == 0) return;
  if (weights.w2) {
    gemm_packed(operand(hidden), *weights.w2, output.data(), output.outerStride(), false, epilogue, first_col, cols);
    return;
  }
  gemm(operand(hidden), operand(weights.expert->w2().middleCols(first_col, cols)), output.data() + first_col,
       output.outerStride(), Scalar(1), false);
  epilogue(0, hidden.rows(), first_col, cols);
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_EXPERT_KERNELS_HPP
