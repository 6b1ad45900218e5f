// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ACTIVATION_HPP
#define SPARSEMOE_ACTIVATION_HPP

/// \file activation.hpp
/// Element-wise activations for the experts. Each is a small stateless type with
///  - `name`: a stable identifier (used in checkpoints),
///  - `value(a)` and `derivative(a)` on one scalar, the reference definitions,
///  - `apply(block)`: act applied in place over a block (the hot path, vectorised by Eigen where
///    Eigen has a vectorised kernel),
///  - `multiply_by_derivative(pre_activation, gradient)`: gradient ⊙= act'(pre_activation).

#include "config.hpp"

#include <cmath>

namespace sparsemoe {

/// \addtogroup experts
/// @{

/// ReLU: max(a, 0); derivative 1 for a > 0, else 0 (0 at a = 0).
struct Relu {
  /// Stable identifier, stored in checkpoints ("expert:relu").
  static constexpr const char* name = "relu";
  /// act(a) of one scalar: the reference definition. O(1).
  template <typename Scalar>
  static Scalar value(Scalar a) { return a > Scalar(0) ? a : Scalar(0); }
  /// act'(a) of one scalar. O(1).
  template <typename Scalar>
  static Scalar derivative(Scalar a) { return a > Scalar(0) ? Scalar(1) : Scalar(0); }
  /// block ← act(block), element-wise, in place (vectorised where Eigen has the kernel). O(size).
  template <typename Scalar>
  static void apply(MatrixRef<Scalar> block) { block = block.cwiseMax(Scalar(0)); }
  /// gradient ← gradient ⊙ act'(pre_activation), element-wise; both have the same shape. O(size).
  template <typename Scalar>
  static void multiply_by_derivative(ConstMatrixRef<Scalar> pre_activation, MatrixRef<Scalar> gradient) {
    gradient = (pre_activation.array() > Scalar(0)).select(gradient, Scalar(0));
  }
};

/// SiLU (swish): a·sigmoid(a); derivative sigmoid(a)·(1 + a·(1 − sigmoid(a))).
struct Silu {
  /// Stable identifier, stored in checkpoints ("expert:silu").
  static constexpr const char* name = "silu";
  /// act(a) of one scalar: the reference definition. O(1).
  template <typename Scalar>
  static Scalar value(Scalar a) { return a / (Scalar(1) + std::exp(-a)); }
  /// act'(a) of one scalar. O(1).
  template <typename Scalar>
  static Scalar derivative(Scalar a) {
    const Scalar sigmoid = Scalar(1) / (Scalar(1) + std::exp(-a));
    return sigmoid * (Scalar(1) + a * (Scalar(1) - sigmoid));
  }
  /// block ← act(block), element-wise, in place (vectorised where Eigen has the kernel). O(size).
  template <typename Scalar>
  static void apply(MatrixRef<Scalar> block) {
    block.array() = block.array() / (Scalar(1) + (-block.array()).exp());
  }
  /// gradient ← gradient ⊙ act'(pre_activation), element-wise; both have the same shape. O(size).
  template <typename Scalar>
  static void multiply_by_derivative(ConstMatrixRef<Scalar> pre_activation, MatrixRef<Scalar> gradient) {
    const auto sigmoid = (Scalar(1) + (-pre_activation.array()).exp()).inverse();
    gradient.array() *= sigmoid * (Scalar(1) + pre_activation.array() * (Scalar(1) - sigmoid));
  }
};

/// GELU, tanh approximation (Hendrycks & Gimpel 2016; the form GPT-2 and BERT use):
/// 0.5·a·(1 + tanh(u)), u = √(2/π)·(a + 0.044715·a³).
struct GeluTanh {
  /// Stable identifier, stored in checkpoints ("expert:gelu_tanh").
  static constexpr const char* name = "gelu_tanh";
  /// act(a) of one scalar: the reference definition. O(1).
  template <typename Scalar>
  static Scalar value(Scalar a) {
    return Scalar(0.5) * a * (Scalar(1) + std::tanh(inner(a)));
  }
  /// act'(a) of one scalar. O(1).
  template <typename Scalar>
  static Scalar derivative(Scalar a) {
    const Scalar t = std::tanh(inner(a));
    const Scalar du = Scalar(sqrt_2_over_pi) * (Scalar(1) + Scalar(3 * cubic) * a * a);
    return Scalar(0.5) * (Scalar(1) + t) + Scalar(0.5) * a * (Scalar(1) - t * t) * du;
  }
  /// block ← act(block), element-wise, in place (vectorised where Eigen has the kernel). O(size).
  template <typename Scalar>
  static void apply(MatrixRef<Scalar> block) {
    auto a = block.array();
    a = Scalar(0.5) * a * (Scalar(1) + (Scalar(sqrt_2_over_pi) * (a + Scalar(cubic) * a.cube())).tanh());
  }
  /// gradient ← gradient ⊙ act'(pre_activation), element-wise; both have the same shape. O(size).
  template <typename Scalar>
  static void multiply_by_derivative(ConstMatrixRef<Scalar> pre_activation, MatrixRef<Scalar> gradient) {
    const auto a = pre_activation.array();
    const auto t = (Scalar(sqrt_2_over_pi) * (a + Scalar(cubic) * a.cube())).tanh();
    const auto du = Scalar(sqrt_2_over_pi) * (Scalar(1) + Scalar(3 * cubic) * a.square());
    gradient.array() *= Scalar(0.5) * (Scalar(1) + t) + Scalar(0.5) * a * (Scalar(1) - t.square()) * du;
  }

 private:
  static constexpr double sqrt_2_over_pi = 0.79788456080286535587989211986876;
  static constexpr double cubic = 0.044715;
  template <typename Scalar>
  static Scalar inner(Scalar a) { return Scalar(sqrt_2_over_pi) * (a + Scalar(cubic) * a * a * a); }
};

/// GELU, exact erf form: a·Φ(a) = 0.5·a·(1 + erf(a/√2)); derivative Φ(a) + a·φ(a).
struct GeluErf {
  /// Stable identifier, stored in checkpoints ("expert:gelu_erf").
  static constexpr const char* name = "gelu_erf";
  /// act(a) of one scalar: the reference definition. O(1).
  template <typename Scalar>
  static Scalar value(Scalar a) {
    return Scalar(0.5) * a * (Scalar(1) + std::erf(a * Scalar(inv_sqrt_2)));
  }
  /// act'(a) of one scalar. O(1).
  template <typename Scalar>
  static Scalar derivative(Scalar a) {
    const Scalar cdf = Scalar(0.5) * (Scalar(1) + std::erf(a * Scalar(inv_sqrt_2)));
    const Scalar pdf = Scalar(inv_sqrt_2pi) * std::exp(Scalar(-0.5) * a * a);
    return cdf + a * pdf;
  }
  /// block ← act(block), element-wise, in place (vectorised where Eigen has the kernel). O(size).
  template <typename Scalar>
  static void apply(MatrixRef<Scalar> block) {
    block = block.unaryExpr([](Scalar a) { return value(a); });
  }
  /// gradient ← gradient ⊙ act'(pre_activation), element-wise; both have the same shape. O(size).
  template <typename Scalar>
  static void multiply_by_derivative(ConstMatrixRef<Scalar> pre_activation, MatrixRef<Scalar> gradient) {
    gradient.array() *= pre_activation.unaryExpr([](Scalar a) { return derivative(a); }).array();
  }

 private:
  static constexpr double inv_sqrt_2 = 0.70710678118654752440084436210485;
  static constexpr double inv_sqrt_2pi = 0.39894228040143267793994605993438;
};

/// The GELU used when none is named: the tanh form.
using Gelu = GeluTanh;

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ACTIVATION_HPP
