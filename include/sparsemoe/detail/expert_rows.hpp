// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_EXPERT_ROWS_HPP
#define SPARSEMOE_DETAIL_EXPERT_ROWS_HPP

#include "../config.hpp"
#include "../expert.hpp"
#include "gemm.hpp"
#include "parallel.hpp"

#include <vector>

namespace sparsemoe {
namespace detail {

/// Experts over rows grouped by expert: expert e owns rows [offsets[e], offsets[e+1]) of
/// `grouped_input` (rows×d); writes pre (rows×p) and output (rows×d). One expert per work item,
/// each writing only its own rows, so results do not depend on the thread count.
/// Cost: 2·rows·d·(p + h) flops.
template <typename ExpertT>
void grouped_experts_forward(const std::vector<ExpertT>& experts, const IndexVector& offsets,
                             ConstMatrixRef<typename ExpertT::Scalar> grouped_input,
                             MatrixRef<typename ExpertT::Scalar> pre, MatrixRef<typename ExpertT::Scalar> output) {
  using Scalar = typename ExpertT::Scalar;
  const Index count = static_cast<Index>(experts.size());
  const Index width = grouped_input.cols();
  const double work = 2.0 * static_cast<double>(grouped_input.rows() / std::max<Index>(count, 1) + 1) *
                      static_cast<double>(width * (pre.cols() + experts.front().hidden_dim()));
  parallel_for_dynamic(count, work, [&](Index e) {
    const ExpertT& expert = experts[static_cast<std::size_t>(e)];
    const Index first = offsets[e];
    const Index rows = offsets[e + 1] - first;
    if (rows == 0) return;
    Matrix<Scalar> hidden(rows, expert.hidden_dim());
    expert_forward(expert, grouped_input.middleRows(first, rows), pre.middleRows(first, rows), hidden,
                   output.middleRows(first, rows));
  });
}

/// Backward of grouped_experts_forward with row r's output scaled by gate_of_row[r]: given the
/// unscaled ∂L/∂y of each row, writes d_grouped_input (rows×d), d_gate_of_row[r] =
/// ⟨∂L/∂y_r, E(x_r)⟩ when d_gate_of_row is not null, and ADDS each expert's parameter gradients
/// into gradients[e]. Cost: about twice the forward.
template <typename ExpertT>
void grouped_experts_backward(const std::vector<ExpertT>& experts, const IndexVector& offsets,
                              ConstMatrixRef<typename ExpertT::Scalar> grouped_input,
                              ConstMatrixRef<typename ExpertT::Scalar> pre,
                              ConstMatrixRef<typename ExpertT::Scalar> grouped_d_output,
                              const Vector<typename ExpertT::Scalar>& gate_of_row,
                              MatrixRef<typename ExpertT::Scalar> d_grouped_input,
                              Vector<typename ExpertT::Scalar>* d_gate_of_row, std::vector<ExpertT>& gradients) {
  using Scalar = typename ExpertT::Scalar;
  const Index count = static_cast<Index>(experts.size());
  const Index width = grouped_input.cols();
  const double work = 4.0 * static_cast<double>(grouped_input.rows() / std::max<Index>(count, 1) + 1) *
                      static_cast<double>(width * (pre.cols() + experts.front().hidden_dim()));
  parallel_for_dynamic(count, work, [&](Index e) {
    const ExpertT& expert = experts[static_cast<std::size_t>(e)];
    ExpertT& gradient = gradients[static_cast<std::size_t>(e)];
    const Index first = offsets[e];
    const Index rows = offsets[e + 1] - first;
    if (rows == 0) return;
    const auto x = grouped_input.middleRows(first, rows);
    const auto a = pre.middleRows(first, rows);
    const auto dy = grouped_d_output.middleRows(first, rows);
    Matrix<Scalar> hidden(rows, expert.hidden_dim());
    expert.activate(a, hidden);
    if (d_gate_of_row != nullptr) {
      Matrix<Scalar> out(rows, width);
      gemm(operand(hidden), operand(expert.w2()), out.data(), out.outerStride(), Scalar(1), false);
      if (expert.b2().size() > 0) out.rowwise() += expert.b2().transpose();
      for (Index r = 0; r < rows; ++r) (*d_gate_of_row)[first + r] = out.row(r).dot(dy.row(r));
    }
    Matrix<Scalar> d_out = dy;
    for (Index r = 0; r < rows; ++r) d_out.row(r) *= gate_of_row[first + r];
    gemm(operand(hidden, Op::transpose), operand(d_out), gradient.w2().data(), gradient.w2().outerStride(), Scalar(1),
         true);
    if (gradient.b2().size() > 0) gradient.b2() += d_out.colwise().sum().transpose();
    Matrix<Scalar> d_hidden(rows, expert.hidden_dim());
    gemm(operand(d_out), operand(expert.w2(), Op::transpose), d_hidden.data(), d_hidden.outerStride(), Scalar(1),
         false);
    Matrix<Scalar> d_pre(rows, expert.pre_activation_width());
    expert.activation_backward(a, d_hidden, d_pre);
    gemm(operand(x, Op::transpose), operand(d_pre), gradient.w1().data(), gradient.w1().outerStride(), Scalar(1),
         true);
    if (gradient.b1().size() > 0) gradient.b1() += d_pre.colwise().sum().transpose();
    gemm(operand(d_pre), operand(expert.w1(), Op::transpose), d_grouped_input.row(first).data(),
         d_grouped_input.outerStride(), Scalar(1), false);
  });
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_EXPERT_ROWS_HPP
