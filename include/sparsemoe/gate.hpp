// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_GATE_HPP
#define SPARSEMOE_GATE_HPP

/// \file gate.hpp
/// Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eqs. 3–5).

#include "config.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "parameters.hpp"
#include "dispatch.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// What the gate decided for a batch of T tokens over E experts, plus everything the backward
/// pass and the load estimator need. Memory: O(T·E).
template <typename Scalar>
struct Routing {
  IndexMatrix expert_ids;        ///< T×k: chosen experts, by descending noisy logit (ties: lower id)
  Matrix<Scalar> gates;          ///< T×k: softmax of the chosen noisy logits; each row sums to 1
  Matrix<Scalar> clean_logits;   ///< T×E: c = x·W_g
  Matrix<Scalar> noisy_logits;   ///< T×E: H = c + n ⊙ s in training, H = c in evaluation
  Matrix<Scalar> raw_noise;      ///< T×E: r = x·W_noise (training only, else empty)
  Matrix<Scalar> noise_scale;    ///< T×E: s = softplus(r) + ε (training only, else empty)
  Matrix<Scalar> noise;          ///< T×E: n ~ N(0, 1), the sample used (training only, else empty)
  IndexVector kth_expert;        ///< T: expert holding the k-th largest H (training with k < E)
  IndexVector next_expert;       ///< T: expert holding the (k+1)-th largest H (training with k < E)

  /// Number of tokens T.
  Index num_tokens() const { return expert_ids.rows(); }
  /// Experts chosen per token, k.
  Index k() const { return expert_ids.cols(); }
  /// Number of experts E.
  Index num_experts() const { return clean_logits.cols(); }
  /// Whether noise was added (training mode).
  bool noisy() const { return noise.cols() > 0; }
  /// Whether the paper's smooth load estimator is defined: noise on and k < E.
  bool has_smooth_load() const { return noisy() && k() < num_experts(); }
};

/// Gradients with respect to the gate's intermediate quantities of one batch, accumulated by
/// the loss backward functions and consumed by NoisyTopKGate::backward.
template <typename Scalar>
struct GateGradients {
  Matrix<Scalar> gates;         ///< T×k: ∂L/∂g for each chosen (token, slot)
  Matrix<Scalar> clean_logits;  ///< T×E: direct ∂L/∂c (not through H)
  Matrix<Scalar> noisy_logits;  ///< T×E: direct ∂L/∂H (not through the softmax)
  Matrix<Scalar> noise_scale;   ///< T×E: direct ∂L/∂s (not through H); empty in evaluation

  /// Shapes every member for `routing` and zeroes it, reusing storage of the same size.
  void set_zero(const Routing<Scalar>& routing) {
    const Index tokens = routing.num_tokens();
    const Index experts = routing.num_experts();
    gates.setZero(tokens, routing.k());
    clean_logits.setZero(tokens, experts);
    noisy_logits.setZero(tokens, experts);
    noise_scale.setZero(routing.noisy() ? tokens : 0, routing.noisy() ? experts : 0);
  }

  /// All zero, shaped for `routing`.
  static GateGradients zeros(const Routing<Scalar>& routing) {
    const Index tokens = routing.num_tokens();
    const Index experts = routing.num_experts();
    GateGradients result;
    result.gates = Matrix<Scalar>::Zero(tokens, routing.k());
    result.clean_logits = Matrix<Scalar>::Zero(tokens, experts);
    result.noisy_logits = Matrix<Scalar>::Zero(tokens, experts);
    result.noise_scale = Matrix<Scalar>::Zero(routing.noisy() ? tokens : 0, routing.noisy() ? experts : 0);
    return result;
  }
};

/// Numerically stable softplus log(1 + eᵃ).
template <typename Scalar>
Scalar softplus(Scalar a) {
  return a > Scalar(0) ? a + std::log1p(std::exp(-a)) : std::log1p(std::exp(a));
}

/// Logistic sigmoid 1 / (1 + e⁻ᵃ), the derivative of softplus.
template <typename Scalar>
Scalar sigmoid(Scalar a) {
  if (a >= Scalar(0)) return Scalar(1) / (Scalar(1) + std::exp(-a));
  const Scalar e = std::exp(a);
  return e / (Scalar(1) + e);
}

/// Noisy top-k gate over E experts for tokens of width d.
///
/// H(x) = x·W_g + n ⊙ (softplus(x·W_noise) + ε), n ~ N(0, I) in training; H(x) = x·W_g in
/// evaluation. G(x) = softmax(KeepTopK(H(x), k)):
/// \f[ H(x) = x W_g + n \odot \big(\operatorname{softplus}(x W_{\text{noise}}) + \varepsilon\big), \qquad
///     G(x) = \operatorname{softmax}\big(\operatorname{KeepTopK}(H(x), k)\big) \f]
/// The noise sample of (token t, expert i) at
/// training step `step` is Philox4x32-10 at (noise_seed, step, t, i) through Box–Muller, t the
/// global row token_offset + the local row (token_offset = 0 by default): the same arguments
/// always give the same routing, whatever the thread count, and a batch routed in parts with
/// the parts' first global rows as offsets draws what the whole batch draws.
///
/// Parameters: W_g and W_noise, both d×E, zero-initialised as the paper recommends ("no signal and
/// some noise"); `initialize_uniform` gives them small random values instead.
/// Thread safety: `route` and `backward` are const and keep no state, so concurrent calls on one
/// gate are safe while nobody modifies its parameters.
///
/// \tparam Scalar_ float or double: parameters, inputs and the routing record.
template <typename Scalar_>
class NoisyTopKGate {
 public:
  /// float or double.
  using Scalar = Scalar_;

  /// Builds a gate; throws std::invalid_argument unless d ≥ 1, E ≥ 1, 1 ≤ k ≤ E and ε > 0 is finite.
  NoisyTopKGate(Index input_dim, Index num_experts, Index k, Scalar noise_epsilon = Scalar(1e-2),
                std::uint64_t noise_seed = 0)
      : k_(k), noise_epsilon_(noise_epsilon), noise_seed_(noise_seed) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::NoisyTopKGate";
    detail::require(input_dim >= 1, function, "input_dim must be >= 1, got ", input_dim);
    detail::require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
    detail::require(k >= 1 && k <= num_experts, function, "k must be in [1, num_experts = ", num_experts,
                    "], got ", k);
    detail::require(num_experts <= Index(0xFFFFFFFF), function, "num_experts must be < 2^32, got ",
                    num_experts);
    detail::require(std::isfinite(noise_epsilon) && noise_epsilon > Scalar(0), function,
                    "noise_epsilon must be finite and > 0, got ", noise_epsilon);
    gate_weight_ = Matrix<Scalar>::Zero(input_dim, num_experts);
    noise_weight_ = Matrix<Scalar>::Zero(input_dim, num_experts);
  }

  /// Token width d.
  Index input_dim() const { return gate_weight_.rows(); }
  /// Number of experts E.
  Index num_experts() const { return gate_weight_.cols(); }
  /// Experts chosen per token.
  Index k() const { return k_; }
  /// ε of the noise scale s = softplus(x·W_noise) + ε.
  Scalar noise_epsilon() const { return noise_epsilon_; }
  /// Key of the Philox noise stream.
  std::uint64_t noise_seed() const { return noise_seed_; }

  /** @{ */
  /// W_g, d×E.
  Matrix<Scalar>& gate_weight() { return gate_weight_; }
  const Matrix<Scalar>& gate_weight() const { return gate_weight_; }
  /** @} */
  /** @{ */
  /// W_noise, d×E.
  Matrix<Scalar>& noise_weight() { return noise_weight_; }
  const Matrix<Scalar>& noise_weight() const { return noise_weight_; }
  /** @} */

  /// Whether `route` throws on a non-finite logit (default: yes). With the check off, non-finite
  /// logits still give valid, distinct expert ids (NaN ranks last), but gates may be NaN.
  bool check_finite() const { return check_finite_; }
  /// Turns the finite-value check of `route` on or off (see check_finite()).
  void set_check_finite(bool enabled) { check_finite_ = enabled; }

  /// Sets W_g and W_noise to U(−1/√d, 1/√d) draws that depend only on `seed`.
  void initialize_uniform(std::uint64_t seed) {
    const Scalar bound = Scalar(1) / std::sqrt(static_cast<Scalar>(input_dim()));
    detail::fill_uniform(gate_weight_.data(), gate_weight_.size(), bound, seed, 0);
    detail::fill_uniform(noise_weight_.data(), noise_weight_.size(), bound, seed, 1);
  }

  /// W_g and W_noise, in that order.
  std::vector<TensorView<Scalar>> tensors() {
    return {make_tensor_view("gate_weight", gate_weight_), make_tensor_view("noise_weight", noise_weight_)};
  }

  /// Routes the T×d batch `input`. Cost: 2·T·d·E flops (4·T·d·E in training) plus O(T·E·k).
  /// Throws std::invalid_argument if input has the wrong width, if `step` ≥ 2^32, or (with
  /// check_finite) if a logit or noise scale is not finite, naming the first bad token row.
  Routing<Scalar> route(ConstMatrixRef<Scalar> input, Mode mode, std::uint64_t step = 0) const {
    Routing<Scalar> routing;
    route(input, mode, step, routing);
    return routing;
  }

  /// Like route(input, mode, step), writing into `routing` and reusing its storage: no
  /// allocation when T, E and the mode are those of the previous call. `token_offset` is the
  /// global row of input's first row, which keys the noise (see the class comment).
  void route(ConstMatrixRef<Scalar> input, Mode mode, std::uint64_t step, Routing<Scalar>& routing,
             std::uint64_t token_offset = 0) const {
    const char* function = "sparsemoe::NoisyTopKGate::route";
    detail::require(input.cols() == input_dim(), function, "input must have ", input_dim(),
                    " columns (the gate's input_dim), got ", input.rows(), "x", input.cols());
    detail::require(step <= 0xFFFFFFFFull, function, "step must be < 2^32, got ", step);
    const Index tokens = input.rows();
    const Index experts = num_experts();
    const bool training = mode == Mode::training;
    const bool smooth_load = training && k_ < experts;
    const Index noise_rows = training ? tokens : 0;
    const Index noise_cols = training ? experts : 0;
    routing.expert_ids.resize(tokens, k_);
    routing.gates.resize(tokens, k_);
    routing.clean_logits.resize(tokens, experts);
    routing.noisy_logits.resize(tokens, experts);
    routing.raw_noise.resize(noise_rows, noise_cols);
    routing.noise_scale.resize(noise_rows, noise_cols);
    routing.noise.resize(noise_rows, noise_cols);
    routing.kth_expert.resize(smooth_load ? tokens : 0);
    routing.next_expert.resize(smooth_load ? tokens : 0);
    const double route_tile_flops = 4.0 * static_cast<double>(detail::row_tile * input_dim() * experts);
    detail::parallel_for(detail::tile_count(tokens, detail::row_tile), route_tile_flops, [&](Index tile) {
      const Index first = tile * detail::row_tile;
      const Index rows = std::min(detail::row_tile, tokens - first);
      const auto x = input.middleRows(first, rows);
      detail::gemm(detail::operand(x), detail::operand(gate_weight_), routing.clean_logits.row(first).data(),
                   experts, Scalar(1), false);
      if (!training) {
        routing.noisy_logits.middleRows(first, rows) = routing.clean_logits.middleRows(first, rows);
        return;
      }
      detail::gemm(detail::operand(x), detail::operand(noise_weight_), routing.raw_noise.row(first).data(),
                   experts, Scalar(1), false);
      for (Index token = first; token < first + rows; ++token) {
        for (Index expert = 0; expert < experts; ++expert) {
          const Scalar scale = softplus(routing.raw_noise(token, expert)) + noise_epsilon_;
          const auto noise = static_cast<Scalar>(detail::standard_normal(
              noise_seed_, step, token_offset + static_cast<std::uint64_t>(token), static_cast<std::uint64_t>(expert)));
          routing.noise_scale(token, expert) = scale;
          routing.noise(token, expert) = noise;
          routing.noisy_logits(token, expert) = routing.clean_logits(token, expert) + noise * scale;
        }
      }
    });
    if (check_finite_) require_finite(routing, function);
    detail::parallel_for(tokens, static_cast<double>(4 * experts * (k_ + 1)),
                         [&](Index token) { select(routing, token, smooth_load); });
  }

  /// Backward through the gate. On entry `gradients` holds the direct gradients of the loss
  /// with respect to the gates (T×k) and, from the load loss, to c, H and s (T×E); on return
  /// gradients.clean_logits holds the total ∂L/∂c and gradients.noise_scale the total ∂L/∂r.
  /// Adds Xᵀ·∂c to d_gate_weight, Xᵀ·∂r to d_noise_weight (both d×E) and ∂c·W_gᵀ + ∂r·W_noiseᵀ to
  /// d_input (T×d). Softmax over the chosen k: ∂H_i = g_i·(∂g_i − Σ_j g_j ∂g_j) for i ∈ S;
  /// ∂H/∂c = 1, ∂H/∂s = n, ∂s/∂r = sigmoid(r). Cost: 4·T·d·E flops (8·T·d·E in training).
  void backward(const Routing<Scalar>& routing, ConstMatrixRef<Scalar> input, GateGradients<Scalar>& gradients,
                MatrixRef<Scalar> d_gate_weight, MatrixRef<Scalar> d_noise_weight, MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::NoisyTopKGate::backward";
    const Index tokens = routing.num_tokens();
    const Index experts = num_experts();
    detail::require(routing.num_experts() == experts && routing.k() == k_, function,
                    "routing has E=", routing.num_experts(), ", k=", routing.k(), " but the gate has E=", experts,
                    ", k=", k_);
    detail::require_shape(input, tokens, input_dim(), function, "input");
    detail::require_shape(gradients.gates, tokens, k_, function, "gradients.gates");
    detail::require_shape(gradients.clean_logits, tokens, experts, function, "gradients.clean_logits");
    detail::require_shape(gradients.noisy_logits, tokens, experts, function, "gradients.noisy_logits");
    detail::require_shape(d_gate_weight, input_dim(), experts, function, "d_gate_weight");
    detail::require_shape(d_noise_weight, input_dim(), experts, function, "d_noise_weight");
    detail::require_shape(d_input, tokens, input_dim(), function, "d_input");
    const bool noisy = routing.noisy();
    if (noisy) detail::require_shape(gradients.noise_scale, tokens, experts, function, "gradients.noise_scale");
    detail::parallel_for(tokens, static_cast<double>(8 * experts + 4 * k_), [&](Index token) {
      Scalar weighted_sum = 0;
      for (Index slot = 0; slot < k_; ++slot) weighted_sum += routing.gates(token, slot) * gradients.gates(token, slot);
      for (Index slot = 0; slot < k_; ++slot) {
        gradients.noisy_logits(token, routing.expert_ids(token, slot)) +=
            routing.gates(token, slot) * (gradients.gates(token, slot) - weighted_sum);
      }
      gradients.clean_logits.row(token) += gradients.noisy_logits.row(token);
      if (noisy) {
        for (Index expert = 0; expert < experts; ++expert) {
          const Scalar d_scale = gradients.noise_scale(token, expert) +
                                 gradients.noisy_logits(token, expert) * routing.noise(token, expert);
          gradients.noise_scale(token, expert) = d_scale * sigmoid(routing.raw_noise(token, expert));
        }
      }
    });
    const Index width = input_dim();
    const double weight_tile_flops = 4.0 * static_cast<double>(detail::row_tile * tokens * experts);
    detail::parallel_for(detail::tile_count(width, detail::row_tile), weight_tile_flops, [&](Index tile) {
      const Index first = tile * detail::row_tile;
      const Index columns = std::min(detail::row_tile, width - first);
      const auto x_columns = detail::operand(input.middleCols(first, columns), detail::Op::transpose);
      detail::gemm(x_columns, detail::operand(gradients.clean_logits), d_gate_weight.row(first).data(),
                   d_gate_weight.outerStride(), Scalar(1), true);
      if (noisy) {
        detail::gemm(x_columns, detail::operand(gradients.noise_scale), d_noise_weight.row(first).data(),
                     d_noise_weight.outerStride(), Scalar(1), true);
      }
    });
    const double input_tile_flops = 4.0 * static_cast<double>(detail::row_tile * width * experts);
    detail::parallel_for(detail::tile_count(tokens, detail::row_tile), input_tile_flops, [&](Index tile) {
      const Index first = tile * detail::row_tile;
      const Index rows = std::min(detail::row_tile, tokens - first);
      Scalar* output = d_input.row(first).data();
      detail::gemm(detail::operand(gradients.clean_logits.middleRows(first, rows)),
                   detail::operand(gate_weight_, detail::Op::transpose), output, d_input.outerStride(), Scalar(1), true);
      if (noisy) {
        detail::gemm(detail::operand(gradients.noise_scale.middleRows(first, rows)),
                     detail::operand(noise_weight_, detail::Op::transpose), output, d_input.outerStride(), Scalar(1),
                     true);
      }
    });
  }

 private:
  void require_finite(const Routing<Scalar>& routing, const char* function) const {
    for (Index token = 0; token < routing.num_tokens(); ++token) {
      const bool logits_finite = routing.noisy_logits.row(token).allFinite();
      const bool scale_finite = routing.noise_scale.size() == 0 || routing.noise_scale.row(token).allFinite();
      detail::require(logits_finite && scale_finite, function, "non-finite ",
                      logits_finite ? "noise scale" : "gate logit", " in token row ", token,
                      " (check the input for NaN/Inf, or the gate weights)");
    }
  }

  /// Top-k, gates and (for the load estimator) the k-th and (k+1)-th experts of one token.
  /// O(E·k), no allocation.
  void select(Routing<Scalar>& routing, Index token, bool smooth_load) const {
    const Index experts = num_experts();
    const Scalar* logits = routing.noisy_logits.row(token).data();
    Index* ids = routing.expert_ids.row(token).data();
    detail::select_top(logits, experts, k_, ids);
    const Scalar top = logits[ids[0]];
    Scalar sum = 0;
    for (Index slot = 0; slot < k_; ++slot) {
      const Scalar weight = std::exp(logits[ids[slot]] - top);
      routing.gates(token, slot) = weight;
      sum += weight;
    }
    routing.gates.row(token) /= sum;
    if (!smooth_load) return;
    routing.kth_expert[token] = ids[k_ - 1];
    Index next = -1;
    for (Index expert = 0; expert < experts; ++expert) {
      if (std::find(ids, ids + k_, expert) != ids + k_) continue;
      if (next < 0 || detail::ranks_before(logits[expert], logits[next])) next = expert;
    }
    routing.next_expert[token] = next;
  }

  Index k_;
  Scalar noise_epsilon_;
  std::uint64_t noise_seed_;
  bool check_finite_ = true;
  Matrix<Scalar> gate_weight_;
  Matrix<Scalar> noise_weight_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_GATE_HPP
