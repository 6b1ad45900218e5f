// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_LOSSES_HPP
#define SPARSEMOE_LOSSES_HPP

/// \file losses.hpp
/// The auxiliary load-balancing losses of Shazeer et al. 2017 (section 4 and appendix A), as plain
/// functions of a Routing, with their gradients.

#include "config.hpp"
#include "gate.hpp"

#include <cmath>

namespace sparsemoe {

/// \addtogroup losses
/// @{

/// CV(v)² = Var(v) / (Mean(v)² + 1e-10) over the E entries of v, with the POPULATION variance
/// (1/E)·Σ(v_i − mean)², as in the original TensorFlow code (unbiased-variance ports are E/(E−1)
/// times larger). An empty v or E = 1 gives 0. O(E).
/// \f[ \operatorname{CV}(v)^2 = \frac{\frac{1}{E}\sum_i (v_i - \bar v)^2}{\bar v^2 + 10^{-10}} \f]
template <typename Derived>
typename Derived::Scalar cv_squared(const Eigen::MatrixBase<Derived>& values) {
  using Scalar = typename Derived::Scalar;
  const Index count = values.size();
  if (count <= 1) return Scalar(0);
  const Scalar mean = values.mean();
  const Scalar variance = (values.array() - mean).square().sum() / static_cast<Scalar>(count);
  return variance / (mean * mean + Scalar(1e-10));
}

namespace detail {

/// ∂CV²/∂v_j is affine in v_j: (2/E)(v_j − m)/D − V·(2m/E)/D² = slope·v_j + offset, with
/// D = m² + 1e-10 (population variance V, mean m). Sets both to 0 for E ≤ 1. O(E), no allocation.
template <typename Derived>
void cv_squared_gradient_affine(const Eigen::MatrixBase<Derived>& values, typename Derived::Scalar& slope,
                                typename Derived::Scalar& offset) {
  using Scalar = typename Derived::Scalar;
  const Index count = values.size();
  slope = offset = Scalar(0);
  if (count <= 1) return;
  const Scalar size = static_cast<Scalar>(count);
  const Scalar mean = values.mean();
  const Scalar variance = (values.array() - mean).square().sum() / size;
  const Scalar denominator = mean * mean + Scalar(1e-10);
  slope = (Scalar(2) / size) / denominator;
  offset = -slope * mean - variance * (Scalar(2) * mean / size) / (denominator * denominator);
}

}  // namespace detail

/// ∂CV²/∂v_j = (2/E)(v_j − m)/D − V·(2m/E)/D², D = m² + 1e-10 (population variance V). O(E).
template <typename Derived>
Vector<typename Derived::Scalar> cv_squared_gradient(const Eigen::MatrixBase<Derived>& values) {
  using Scalar = typename Derived::Scalar;
  Scalar slope, offset;
  detail::cv_squared_gradient_affine(values, slope, offset);
  return (slope * values.array() + offset).matrix();
}

/// Importance_i = Σ_tokens g_i(x), the gate mass each expert receives, summed in `Sum` (the
/// type of `result`: AuxiliaryLosses sums in double whatever the layer's Scalar) and written into
/// `result` (E entries, storage reused). O(T·k).
template <typename Scalar, typename Sum>
void importance(const Routing<Scalar>& routing, Vector<Sum>& result) {
  result.setZero(routing.num_experts());
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    for (Index slot = 0; slot < routing.k(); ++slot) {
      result[routing.expert_ids(token, slot)] += static_cast<Sum>(routing.gates(token, slot));
    }
  }
}

/// Importance_i = Σ_tokens g_i(x) (E entries), summed in double, rounded once to Scalar. O(T·k).
template <typename Scalar>
Vector<Scalar> importance(const Routing<Scalar>& routing) {
  Vector<double> sums;
  importance(routing, sums);
  return sums.cast<Scalar>();
}

/// Tokens routed to each expert, #{x : i ∈ S(x)}, as numbers of type `Sum`, written into
/// `result`. O(T·k).
template <typename Scalar, typename Sum>
void hard_load(const Routing<Scalar>& routing, Vector<Sum>& result) {
  result.setZero(routing.num_experts());
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    for (Index slot = 0; slot < routing.k(); ++slot) result[routing.expert_ids(token, slot)] += Sum(1);
  }
}

/// Tokens routed to each expert, #{x : i ∈ S(x)} (as Scalars). O(T·k).
template <typename Scalar>
Vector<Scalar> hard_load(const Routing<Scalar>& routing) {
  Vector<Scalar> result;
  hard_load(routing, result);
  return result;
}

/// Standard normal CDF Φ(z).
template <typename Scalar>
Scalar normal_cdf(Scalar z) {
  return Scalar(0.5) * std::erfc(-z * Scalar(0.70710678118654752440));
}

/// Standard normal density φ(z).
template <typename Scalar>
Scalar normal_pdf(Scalar z) {
  return Scalar(0.39894228040143267794) * std::exp(Scalar(-0.5) * z * z);
}

namespace detail {

/// Calls visit(token, expert, z, threshold_expert) for every (token, expert) of the smooth load
/// estimator over the tokens for which include(token) holds, with z = (c_i − θ_i)/s_i and
/// θ_i = H[threshold_expert].
template <typename Scalar, typename Include, typename Visit>
void for_each_load_term(const Routing<Scalar>& routing, const Include& include, const Visit& visit) {
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    if (!include(token)) continue;
    const Index kth = routing.kth_expert[token];
    const Index next = routing.next_expert[token];
    const Scalar kth_logit = routing.noisy_logits(token, kth);
    const Scalar next_logit = routing.noisy_logits(token, next);
    for (Index expert = 0; expert < routing.num_experts(); ++expert) {
      // Expert i is in the top k exactly when its noisy logit ranks at or above the k-th one.
      bool chosen = false;
      for (Index slot = 0; slot < routing.k(); ++slot) chosen = chosen || routing.expert_ids(token, slot) == expert;
      const Index threshold_expert = chosen ? next : kth;
      const Scalar threshold = chosen ? next_logit : kth_logit;
      const Scalar z = (routing.clean_logits(token, expert) - threshold) / routing.noise_scale(token, expert);
      visit(token, expert, z, threshold_expert);
    }
  }
}

/// for_each_load_term over every token.
template <typename Scalar, typename Visit>
void for_each_load_term(const Routing<Scalar>& routing, const Visit& visit) {
  for_each_load_term(routing, [](Index) { return true; }, visit);
}

}  // namespace detail

/// Load_i: the paper's smooth estimator Σ_x P(x, i), P(x, i) = Φ((c_i − θ_i)/s_i), θ_i the k-th
/// largest noisy logit among the OTHER experts, when `routing.has_smooth_load()` (training mode
/// and k < E); otherwise the hard count of tokens per expert (see hard_load). Summed in `Sum`
/// (the type of `result`) and written into `result` (E entries, storage reused). O(T·E·k).
template <typename Scalar, typename Sum>
void load(const Routing<Scalar>& routing, Vector<Sum>& result) {
  if (!routing.has_smooth_load()) {
    hard_load(routing, result);
    return;
  }
  result.setZero(routing.num_experts());
  detail::for_each_load_term(
      routing, [&](Index, Index expert, Scalar z, Index) { result[expert] += static_cast<Sum>(normal_cdf(z)); });
}

/// Load_i (E entries): the smooth estimator, or the hard count where it is undefined; summed in
/// double, rounded once to Scalar. O(T·E·k).
template <typename Scalar>
Vector<Scalar> load(const Routing<Scalar>& routing) {
  Vector<double> sums;
  load(routing, sums);
  return sums.cast<Scalar>();
}

/// The auxiliary losses of one batch: L_importance = w_importance·CV(Importance)²,
/// L_load = w_load·CV(Load)².
///
/// \f[ L_{\text{aux}} = w_{\text{importance}} \operatorname{CV}(\operatorname{Importance})^2
///     + w_{\text{load}} \operatorname{CV}(\operatorname{Load})^2 \f]
///
/// Importance and Load are sums over the batch, and CV² divides their spread by their mean: on a
/// nearly balanced batch it magnifies their rounding error by mean/|v_i − mean| (hundreds). So
/// both are summed in double, and CV² and its gradient are formed from those sums in double,
/// whatever the layer's Scalar: O(T·k) extra conversions, nothing else.
template <typename Scalar>
struct AuxiliaryLosses {
  Vector<double> importance;             ///< E: Σ_batch gate values (in double)
  Vector<double> load;                   ///< E: smooth estimate, or the hard count (in double)
  bool smooth_load = false;              ///< whether `load` is the smooth (differentiable) estimate
  Scalar importance_cv_squared = 0;      ///< CV(Importance)²
  Scalar load_cv_squared = 0;            ///< CV(Load)²
  Scalar importance_weight = 0;          ///< w_importance
  Scalar load_weight = 0;                ///< w_load

  /// L_importance = w_importance·CV(Importance)².
  Scalar importance_loss() const { return importance_weight * importance_cv_squared; }
  /// L_load = w_load·CV(Load)².
  Scalar load_loss() const { return load_weight * load_cv_squared; }
  /// L_aux = L_importance + L_load: what backward adds to the caller's loss.
  Scalar total() const { return importance_loss() + load_loss(); }
};

/// Computes both auxiliary losses of `routing` into `losses`, reusing its storage. Throws
/// std::invalid_argument unless both weights are finite and ≥ 0. O(T·E·k).
template <typename Scalar>
void auxiliary_losses(const Routing<Scalar>& routing, Scalar importance_weight, Scalar load_weight,
                      AuxiliaryLosses<Scalar>& losses) {
  const char* function = "sparsemoe::auxiliary_losses";
  detail::require(std::isfinite(importance_weight) && importance_weight >= Scalar(0), function,
                  "importance_weight must be finite and >= 0, got ", importance_weight);
  detail::require(std::isfinite(load_weight) && load_weight >= Scalar(0), function,
                  "load_weight must be finite and >= 0, got ", load_weight);
  importance(routing, losses.importance);
  load(routing, losses.load);
  losses.smooth_load = routing.has_smooth_load();
  losses.importance_cv_squared = static_cast<Scalar>(cv_squared(losses.importance));
  losses.load_cv_squared = static_cast<Scalar>(cv_squared(losses.load));
  losses.importance_weight = importance_weight;
  losses.load_weight = load_weight;
}

/// Computes and returns both auxiliary losses of `routing` (see the overload above).
template <typename Scalar>
AuxiliaryLosses<Scalar> auxiliary_losses(const Routing<Scalar>& routing, Scalar importance_weight,
                                         Scalar load_weight) {
  AuxiliaryLosses<Scalar> losses;
  auxiliary_losses(routing, importance_weight, load_weight, losses);
  return losses;
}

namespace detail {

/// importance_backward with ∂L/∂Importance_e given by `d_importance(e)`. O(T·k).
template <typename Scalar, typename Derivative>
void importance_backward_by(const Routing<Scalar>& routing, const Derivative& d_importance,
                            GateGradients<Scalar>& gradients) {
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    for (Index slot = 0; slot < routing.k(); ++slot) {
      gradients.gates(token, slot) += d_importance(routing.expert_ids(token, slot));
    }
  }
}

/// load_backward with ∂L/∂Load_e given by `d_load(e)`, for the load summed over the tokens for
/// which include(token) holds only. O(T·E·k).
template <typename Scalar, typename Derivative, typename Include>
void load_backward_by(const Routing<Scalar>& routing, const Derivative& d_load, GateGradients<Scalar>& gradients,
                      const Include& include) {
  if (!routing.has_smooth_load()) return;
  for_each_load_term(routing, include, [&](Index token, Index expert, Scalar z, Index threshold_expert) {
    const Scalar scale = routing.noise_scale(token, expert);
    const Scalar slope = d_load(expert) * normal_pdf(z) / scale;
    gradients.clean_logits(token, expert) += slope;
    gradients.noisy_logits(token, threshold_expert) -= slope;
    gradients.noise_scale(token, expert) -= slope * z;
  });
}

/// load_backward with ∂L/∂Load_e given by `d_load(e)`. O(T·E·k).
template <typename Scalar, typename Derivative>
void load_backward_by(const Routing<Scalar>& routing, const Derivative& d_load, GateGradients<Scalar>& gradients) {
  load_backward_by(routing, d_load, gradients, [](Index) { return true; });
}

}  // namespace detail

/// Adds ∂L/∂g(t, j) += ∂L/∂Importance[expert_ids(t, j)] to gradients.gates. O(T·k).
template <typename Scalar>
void importance_backward(const Routing<Scalar>& routing, const Vector<Scalar>& d_importance,
                         GateGradients<Scalar>& gradients) {
  detail::importance_backward_by(routing, [&](Index expert) { return d_importance[expert]; }, gradients);
}

/// Adds the gradient of Σ_i d_load_i·Load_i through the smooth estimator:
/// ∂P/∂c_i = φ(z)/s_i, ∂P/∂θ_i = −φ(z)/s_i (into the noisy logit that θ_i is),
/// ∂P/∂s_i = −φ(z)·z/s_i. Does nothing where the load is the hard count (it has no gradient).
/// O(T·E·k).
template <typename Scalar>
void load_backward(const Routing<Scalar>& routing, const Vector<Scalar>& d_load, GateGradients<Scalar>& gradients) {
  detail::load_backward_by(routing, [&](Index expert) { return d_load[expert]; }, gradients);
}

/// Adds the gradient of losses.total() (times `upstream`) to `gradients`. O(T·E·k), allocates
/// nothing (∂CV²/∂v is affine in v, so no E-vector of derivatives is formed).
template <typename Scalar>
void auxiliary_losses_backward(const Routing<Scalar>& routing, const AuxiliaryLosses<Scalar>& losses,
                               GateGradients<Scalar>& gradients, Scalar upstream = Scalar(1)) {
  double slope, offset;  // of ∂CV²/∂v, formed in double from the double sums
  if (losses.importance_weight != Scalar(0)) {
    const double weight = static_cast<double>(upstream) * static_cast<double>(losses.importance_weight);
    detail::cv_squared_gradient_affine(losses.importance, slope, offset);
    detail::importance_backward_by(
        routing,
        [&](Index expert) { return static_cast<Scalar>(weight * (slope * losses.importance[expert] + offset)); },
        gradients);
  }
  if (losses.load_weight != Scalar(0) && losses.smooth_load) {
    const double weight = static_cast<double>(upstream) * static_cast<double>(losses.load_weight);
    detail::cv_squared_gradient_affine(losses.load, slope, offset);
    detail::load_backward_by(
        routing, [&](Index expert) { return static_cast<Scalar>(weight * (slope * losses.load[expert] + offset)); },
        gradients);
  }
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_LOSSES_HPP
