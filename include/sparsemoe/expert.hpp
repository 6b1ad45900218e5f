// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_EXPERT_HPP
#define SPARSEMOE_EXPERT_HPP

/// \file expert.hpp
/// Feed-forward experts. Every expert type models the same contract, which MoELayer relies on:
///  - `Scalar`, `input_dim()` = d, `hidden_dim()` = h, `pre_activation_width()` = p;
///  - `w1()` (d×p) and `b1()` (p, or empty for no bias), `w2()` (h×d) and `b2()` (d, or empty);
///  - `activate(pre, hidden)`: rows×p pre-activations → rows×h hidden values;
///  - `activation_backward(pre, d_hidden, d_pre)`: rows×h → rows×p;
///  - `tensors()`: the parameters as named views, in a fixed order; `set_zero()`;
///  - a constructor (d, h) that zero-initialises, and `initialize_uniform(seed)`;
///  - optionally `static constexpr bool activation_is_elementwise`: true when hidden column j
///    depends on pre column j only (p = h), so activate() and activation_backward() may run on
///    column blocks (the layer then fuses them into the GEMMs' output tiles, forward and
///    backward). Missing means false.
/// E(x) = activate(x·W1 + b1)·W2 + b2, so one expert is two GEMMs over a block of rows.

#include "activation.hpp"
#include "config.hpp"
#include "detail/expert_kernels.hpp"
#include "detail/gemm.hpp"
#include "parameters.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup experts
/// @{

/// Two-layer feed-forward expert E(x) = act(x·W1 + b1)·W2 + b2 (Shazeer et al.\ 2017 use ReLU).
/// W1: d×h, b1: h, W2: h×d, b2: d. Parameters: 2·d·h + h + d.
/// `Activation` is one of Relu, Silu, GeluTanh, GeluErf (activation.hpp) or a type like them.
///
/// \tparam Scalar_ float or double.
/// \tparam Activation_ the element-wise activation, a type with the members of Relu.
template <typename Scalar_, typename Activation_ = Relu>
class Expert {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The element-wise activation act (Relu, Silu, GeluTanh, GeluErf, or a type like them).
  using Activation = Activation_;
  /// activate() works column by column, so it may run on any column block of pre and hidden.
  static constexpr bool activation_is_elementwise = true;

  /// A zero expert; throws std::invalid_argument unless d ≥ 1 and h ≥ 1.
  Expert(Index input_dim, Index hidden_dim) {
    detail::check_scalar<Scalar>();
    detail::require(input_dim >= 1 && hidden_dim >= 1, "sparsemoe::Expert",
                    "input_dim and hidden_dim must be >= 1, got input_dim=", input_dim, ", hidden_dim=", hidden_dim);
    w1_ = Matrix<Scalar>::Zero(input_dim, hidden_dim);
    b1_ = Vector<Scalar>::Zero(hidden_dim);
    w2_ = Matrix<Scalar>::Zero(hidden_dim, input_dim);
    b2_ = Vector<Scalar>::Zero(input_dim);
  }

  /// Token width d.
  Index input_dim() const { return w1_.rows(); }
  /// Hidden width h.
  Index hidden_dim() const { return w1_.cols(); }
  /// Width of the pre-activation block, p = h.
  Index pre_activation_width() const { return w1_.cols(); }

  /** @{ */
  /// W1, d×h (keep its shape: the layer checks it before every call).
  Matrix<Scalar>& w1() { return w1_; }
  const Matrix<Scalar>& w1() const { return w1_; }
  /** @} */
  /** @{ */
  /// b1, h entries.
  Vector<Scalar>& b1() { return b1_; }
  const Vector<Scalar>& b1() const { return b1_; }
  /** @} */
  /** @{ */
  /// W2, h×d.
  Matrix<Scalar>& w2() { return w2_; }
  const Matrix<Scalar>& w2() const { return w2_; }
  /** @} */
  /** @{ */
  /// b2, d entries.
  Vector<Scalar>& b2() { return b2_; }
  const Vector<Scalar>& b2() const { return b2_; }
  /** @} */

  /// PyTorch's nn.Linear default: every weight and bias of a layer with fan-in f drawn from
  /// U(−1/√f, 1/√f) (f = d for W1, b1; f = h for W2, b2), as a function of `seed` only.
  void initialize_uniform(std::uint64_t seed) {
    const Scalar first_bound = Scalar(1) / std::sqrt(static_cast<Scalar>(input_dim()));
    const Scalar second_bound = Scalar(1) / std::sqrt(static_cast<Scalar>(hidden_dim()));
    detail::fill_uniform(w1_.data(), w1_.size(), first_bound, seed, 0);
    detail::fill_uniform(b1_.data(), b1_.size(), first_bound, seed, 1);
    detail::fill_uniform(w2_.data(), w2_.size(), second_bound, seed, 2);
    detail::fill_uniform(b2_.data(), b2_.size(), second_bound, seed, 3);
  }

  /// hidden = act(pre), element-wise; both rows×h.
  void activate(ConstMatrixRef<Scalar> pre, MatrixRef<Scalar> hidden) const {
    hidden = pre;
    Activation::template apply<Scalar>(hidden);
  }

  /// d_pre = d_hidden ⊙ act'(pre); all rows×h.
  void activation_backward(ConstMatrixRef<Scalar> pre, ConstMatrixRef<Scalar> d_hidden, MatrixRef<Scalar> d_pre) const {
    d_pre = d_hidden;
    Activation::template multiply_by_derivative<Scalar>(pre, d_pre);
  }

  /// W1, b1, W2, b2, in that order.
  std::vector<TensorView<Scalar>> tensors() {
    return {make_tensor_view("w1", w1_), make_tensor_view("b1", b1_), make_tensor_view("w2", w2_),
            make_tensor_view("b2", b2_)};
  }

  /// Sets every parameter to zero (used for gradient accumulators).
  void set_zero() {
    w1_.setZero();
    b1_.setZero();
    w2_.setZero();
    b2_.setZero();
  }

 private:
  Matrix<Scalar> w1_;
  Vector<Scalar> b1_;
  Matrix<Scalar> w2_;
  Vector<Scalar> b2_;
};

/// Gated expert of current LLMs (Shazeer 2020, "GLU Variants Improve Transformer"):
/// E(x) = (silu(x·W_gate) ⊙ (x·W_up))·W_down, no biases.
/// Stored in the common contract as W1 = [W_gate | W_up] (d×2h) and W2 = W_down (h×d), with b1
/// and b2 empty. Parameters: 3·d·h.
///
/// \tparam Scalar_ float or double.
template <typename Scalar_>
class SwiGluExpert {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// activate() pairs column j with column h + j, so it needs whole rows of pre.
  static constexpr bool activation_is_elementwise = false;

  /// A zero expert; throws std::invalid_argument unless d ≥ 1 and h ≥ 1.
  SwiGluExpert(Index input_dim, Index hidden_dim) {
    detail::check_scalar<Scalar>();
    detail::require(input_dim >= 1 && hidden_dim >= 1, "sparsemoe::SwiGluExpert",
                    "input_dim and hidden_dim must be >= 1, got input_dim=", input_dim, ", hidden_dim=", hidden_dim);
    w1_ = Matrix<Scalar>::Zero(input_dim, 2 * hidden_dim);
    w2_ = Matrix<Scalar>::Zero(hidden_dim, input_dim);
  }

  /// Token width d.
  Index input_dim() const { return w1_.rows(); }
  /// Hidden width h (W1 has 2h columns).
  Index hidden_dim() const { return w2_.rows(); }
  /// Width of the pre-activation block, p = 2h (gate half, then up half).
  Index pre_activation_width() const { return w1_.cols(); }

  /** @{ */
  /// [W_gate | W_up], d×2h.
  Matrix<Scalar>& w1() { return w1_; }
  const Matrix<Scalar>& w1() const { return w1_; }
  /** @} */
  /** @{ */
  /// Empty: no bias.
  Vector<Scalar>& b1() { return no_bias_; }
  const Vector<Scalar>& b1() const { return no_bias_; }
  /** @} */
  /** @{ */
  /// W_down, h×d.
  Matrix<Scalar>& w2() { return w2_; }
  const Matrix<Scalar>& w2() const { return w2_; }
  /** @} */
  /** @{ */
  /// Empty: no bias.
  Vector<Scalar>& b2() { return no_bias_; }
  const Vector<Scalar>& b2() const { return no_bias_; }
  /** @} */

  /// W_gate (d×h), the first half of w1(): the gate projection of SwiGLU (not the router, whose
  /// weight the layer calls gate_weight for the noisy gate).
  auto gate_projection() { return w1_.leftCols(hidden_dim()); }
  /// W_up (d×h), the second half of w1().
  auto up_projection() { return w1_.rightCols(hidden_dim()); }

  /// U(−1/√d, 1/√d) for W_gate and W_up, U(−1/√h, 1/√h) for W_down, as a function of `seed` only.
  void initialize_uniform(std::uint64_t seed) {
    detail::fill_uniform(w1_.data(), w1_.size(), Scalar(1) / std::sqrt(static_cast<Scalar>(input_dim())), seed, 0);
    detail::fill_uniform(w2_.data(), w2_.size(), Scalar(1) / std::sqrt(static_cast<Scalar>(hidden_dim())), seed, 2);
  }

  /// hidden = silu(pre_gate) ⊙ pre_up; pre is rows×2h, hidden rows×h.
  void activate(ConstMatrixRef<Scalar> pre, MatrixRef<Scalar> hidden) const {
    if (pre.rows() == 0) return;  // column blocks of an empty (null) block are not formed
    const Index h = hidden_dim();
    hidden = pre.leftCols(h);
    Silu::apply<Scalar>(hidden);
    hidden.array() *= pre.rightCols(h).array();
  }

  /// d_pre_gate = d_hidden ⊙ pre_up ⊙ silu'(pre_gate), d_pre_up = d_hidden ⊙ silu(pre_gate).
  void activation_backward(ConstMatrixRef<Scalar> pre, ConstMatrixRef<Scalar> d_hidden, MatrixRef<Scalar> d_pre) const {
    if (pre.rows() == 0) return;
    const Index h = hidden_dim();
    auto d_gate = d_pre.leftCols(h);
    auto d_up = d_pre.rightCols(h);
    d_up = pre.leftCols(h);
    Silu::apply<Scalar>(d_up);
    d_up.array() *= d_hidden.array();
    d_gate.array() = d_hidden.array() * pre.rightCols(h).array();
    Silu::multiply_by_derivative<Scalar>(pre.leftCols(h), d_gate);
  }

  /// W1 = [W_gate | W_up], W2 = W_down, in that order.
  std::vector<TensorView<Scalar>> tensors() {
    return {make_tensor_view("w1", w1_), make_tensor_view("w2", w2_)};
  }

  /// Sets every parameter to zero.
  void set_zero() {
    w1_.setZero();
    w2_.setZero();
  }

 private:
  Matrix<Scalar> w1_;
  Matrix<Scalar> w2_;
  Vector<Scalar> no_bias_;
};

/// One expert over a block of rows, through the library's single-threaded GEMM:
/// pre = x·W1 + b1 (rows×p), hidden = activate(pre) (rows×h), output = hidden·W2 + b2 (rows×d).
/// `pre` and `hidden` may be caller-owned workspace; nothing is allocated.
/// Cost: 2·rows·d·(p + h) flops.
template <typename ExpertT>
void expert_forward(const ExpertT& expert, ConstMatrixRef<typename ExpertT::Scalar> input,
                    MatrixRef<typename ExpertT::Scalar> pre, MatrixRef<typename ExpertT::Scalar> hidden,
                    MatrixRef<typename ExpertT::Scalar> output) {
  using Scalar = typename ExpertT::Scalar;
  SPARSEMOE_ASSERT(input.cols() == expert.input_dim() && pre.rows() == input.rows() && output.rows() == input.rows());
  if (input.rows() == 0) return;
  detail::gemm(detail::operand(input), detail::operand(expert.w1()), pre.data(), pre.outerStride(), Scalar(1), false);
  if (expert.b1().size() > 0) pre.rowwise() += expert.b1().transpose();
  expert.activate(pre, hidden);
  detail::gemm(detail::operand(hidden), detail::operand(expert.w2()), output.data(), output.outerStride(), Scalar(1),
               false);
  if (expert.b2().size() > 0) output.rowwise() += expert.b2().transpose();
}

/// E(x) for every row of a rows×d block, as a new rows×d matrix (allocates its workspace).
/// Throws std::invalid_argument on a width mismatch.
///
/// A reference path for one expert: MoELayer does not call either overload. The layer runs the
/// same math through its own tiled kernels (bias and an element-wise activation fused into each
/// GEMM output tile, weights packed into panels for experts with many rows, column tiles for
/// small batches), so its results equal these up to floating-point rounding.
template <typename ExpertT>
Matrix<typename ExpertT::Scalar> expert_forward(const ExpertT& expert,
                                                ConstMatrixRef<typename ExpertT::Scalar> input) {
  using Scalar = typename ExpertT::Scalar;
  detail::require(input.cols() == expert.input_dim(), "sparsemoe::expert_forward", "input must have ",
                  expert.input_dim(), " columns, got ", input.rows(), "x", input.cols());
  Matrix<Scalar> pre(input.rows(), expert.pre_activation_width());
  Matrix<Scalar> hidden(input.rows(), expert.hidden_dim());
  Matrix<Scalar> output(input.rows(), expert.input_dim());
  expert_forward(expert, input, pre, hidden, output);
  return output;
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_EXPERT_HPP
