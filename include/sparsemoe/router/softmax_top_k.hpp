// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_SOFTMAX_TOP_K_HPP
#define SPARSEMOE_ROUTER_SOFTMAX_TOP_K_HPP

/// \file softmax_top_k.hpp
/// Softmax top-k routing, the family of Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V2 (with
/// group-limited selection) and GPT-OSS (softmax over the selected logits).

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../parameters.hpp"
#include "../router.hpp"
#include "../dispatch.hpp"
#include "router_kind.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// Options of SoftmaxTopKRouter. The defaults are plain top-k of the softmax without
/// renormalisation (Qwen2-MoE's and OLMoE's default).
struct SoftmaxTopKRouterOptions {
  /// Experts per token, 1 ≤ k ≤ E (and ≤ top_groups·E/num_groups).
  Index k = 2;
  /// Renormalise the k selected probabilities to sum to 1 (Mixtral, Qwen3-MoE: on; Qwen2-MoE,
  /// OLMoE, DeepSeek-V2: off).
  bool normalize_top_k = false;
  /// Routed scaling factor, applied after any renormalisation (DeepSeek-V2's routed_scaling_factor).
  /// Finite and > 0.
  double scale = 1.0;
  /// GPT-OSS: select the top k of the logits z and take the softmax over those k logits alone.
  /// That equals the renormalised top-k of softmax(z) mathematically (the full softmax's
  /// normaliser cancels: e^{z_j}/Σ_S e^{z_l} = p_j/Σ_S p_l), and selects the same experts except
  /// where distinct logits round to equal probabilities; it is not bitwise equal, because the two
  /// round differently. When set, the weights are normalised whatever normalize_top_k says.
  bool softmax_over_selected = false;
  /// Add a learned bias b_r (E) to the logits.
  bool use_bias = false;
  /// Group-limited selection (DeepSeek-V2): the E experts form num_groups groups of E/num_groups
  /// consecutive ids; each token keeps the top_groups groups of largest group score (the largest
  /// selection score in the group) and chooses its k experts inside them only. 1 = off.
  Index num_groups = 1;
  /// Groups kept per token, 1 ≤ top_groups ≤ num_groups.
  Index top_groups = 1;
  /// Throw on a non-finite logit (default). Off: NaN ranks last and gates may be NaN.
  bool check_finite = true;
};

/// The parameter gradients of SoftmaxTopKRouter (W_r, optional b_r).
template <typename Scalar>
using SoftmaxTopKRouterGradients = RouterGradients<Scalar>;

/// Softmax top-k router over E experts for tokens of width d.
///
/// z = x·W_r (+ b_r), p = softmax(z) over the E experts (routing.scores). Selection: the k largest
/// p (the k largest z with softmax_over_selected), ties to the lower id; with groups, only
/// experts of the kept groups compete (the others are never chosen). Gate of slot j with expert
/// e_j, S the selected set, c = scale:
///   - default:                g_j = c·p_{e_j}
///   - normalize_top_k:        g_j = c·p_{e_j} / Σ_{l∈S} p_l   (the sum is ≥ 1/E, so no epsilon)
///   - softmax_over_selected:  g_j = c·e^{z_{e_j}} / Σ_{l∈S} e^{z_l}
///
/// Backward (per token): the gates add c·∂g_j into ∂p_{e_j} (default) or, when normalised,
/// c·q_j·(∂g_j − Σ_l q_l ∂g_l) into ∂z_{e_j} directly (q_j = g_j/c); the softmax maps ∂p to
/// ∂z_i = p_i·(∂p_i − Σ_m p_m ∂p_m); upstream.logits adds to ∂z. Then ∂W_r += xᵀ·∂z,
/// ∂b_r += Σ_t ∂z_t, ∂x += ∂z·W_rᵀ.
///
/// Parameters: W_r d×E (row-major, zero-initialised; see initialize_uniform) and, with use_bias,
/// b_r (E, zero-initialised). Cost of route: 2·T·d·E flops + O(T·E·k); of backward 4·T·d·E flops.
///
/// \tparam Scalar_ float or double: parameters, inputs and the routing record.
template <typename Scalar_>
class SoftmaxTopKRouter : public LinearRouterParameters<Scalar_> {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = SoftmaxTopKRouterOptions;
  /// The parameter gradients, as make_gradients() returns them.
  using Gradients = RouterGradients<Scalar>;

  /// Builds a router; throws std::invalid_argument naming the offending value unless d ≥ 1,
  /// 1 ≤ E < 2^32, 1 ≤ k ≤ E, num_groups ≥ 1 divides E, 1 ≤ top_groups ≤ num_groups,
  /// k ≤ top_groups·E/num_groups and scale is finite and > 0.
  SoftmaxTopKRouter(Index input_dim, Index num_experts, const Options& options = {}) : options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::SoftmaxTopKRouter";
    detail::require(input_dim >= 1, function, "input_dim must be >= 1, got ", input_dim);
    detail::require_group_options(function, num_experts, options.k, options.num_groups, options.top_groups);
    detail::require(std::isfinite(options.scale) && options.scale > 0, function, "scale must be finite and > 0, got ",
                    options.scale);
    scale_ = static_cast<Scalar>(options.scale);
    this->allocate_parameters(input_dim, num_experts, options.use_bias);
  }

  /// Experts chosen per token.
  Index k() const { return options_.k; }
  /// The options the router was built with.
  const Options& options() const { return options_; }
  /// Whether group-limited selection is on (num_groups > 1).
  bool grouped() const { return options_.num_groups > 1; }


  /// None: this router has no state without a gradient.
  std::vector<TensorView<Scalar>> state() { return {}; }

  /// Routes the T×d batch `input` into `routing`, reusing its storage (no allocation when T
  /// repeats). `options` is not used (this router has no random part). Throws
  /// std::invalid_argument if input has the wrong width or (with check_finite) a logit is not
  /// finite, naming the token row, the expert and the value.
  void route(ConstMatrixRef<Scalar> input, const RouteOptions& options, TopKRouting<Scalar>& routing) const {
    static_cast<void>(options);
    const char* function = "sparsemoe::SoftmaxTopKRouter::route";
    detail::require(input.cols() == this->input_dim(), function, "input must have ", this->input_dim(),
                    " columns (the router's input_dim), got ", input.rows(), "x", input.cols());
    const Index tokens = input.rows();
    const Index experts = this->num_experts();
    const Index k = options_.k;
    routing.expert_ids.resize(tokens, k);
    routing.gates.resize(tokens, k);
    routing.logits.resize(tokens, experts);
    routing.scores.resize(tokens, experts);
    routing.group_scores.resize(grouped() ? tokens : 0, grouped() ? options_.num_groups : 0);
    routing.selected_groups.resize(grouped() ? tokens : 0, grouped() ? options_.top_groups : 0);
    routing.input_jitter.resize(0, 0);
    routing.jittered_input.resize(0, 0);
    detail::linear_logits(input, this->weight_, this->bias_, routing.logits);
    if (options_.check_finite) detail::require_finite_logits(routing.logits, function);
    detail::parallel_for(tokens, static_cast<double>(4 * experts * (k + 2)),
                         [&](Index token) { route_token(routing, token); });
  }

  /// Backward through the router (see the class comment for the formulas): ADDS ∂L/∂W_r (and
  /// ∂L/∂b_r) to `parameter_gradients` and ∂L/∂x to `d_input` (T×d); leaves the total ∂L/∂z in
  /// parameter_gradients.logits (T×E, resized). Throws std::invalid_argument on a shape mismatch.
  /// Cost: 4·T·d·E flops + O(T·E).
  void backward(const TopKRouting<Scalar>& routing, ConstMatrixRef<Scalar> input,
                const TopKRoutingGradient<Scalar>& upstream, Gradients& parameter_gradients,
                MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::SoftmaxTopKRouter::backward";
    detail::require_backward_shapes(function, routing, input, upstream, parameter_gradients, d_input, this->input_dim(),
                                    this->num_experts(), k(), options_.use_bias);
    const Index tokens = routing.num_tokens();
    const Index experts = this->num_experts();
    parameter_gradients.logits.resize(tokens, experts);
    detail::parallel_for(tokens, static_cast<double>(6 * experts + 6 * k()), [&](Index token) {
      backward_token(routing, upstream, parameter_gradients.logits, token);
    });
    detail::linear_backward(routing, input, this->weight_, parameter_gradients, d_input);
  }

 private:
  bool normalized() const { return options_.normalize_top_k || options_.softmax_over_selected; }

  /// Σ over the chosen slots of the unnormalised weights: e^{z − z_top} (softmax_over_selected)
  /// or p. Then q_j = weight_j / sum.
  Scalar selected_weight(const TopKRouting<Scalar>& routing, Index token, Index slot) const {
    const Index expert = routing.expert_ids(token, slot);
    if (!options_.softmax_over_selected) return routing.scores(token, expert);
    return std::exp(routing.logits(token, expert) - routing.logits(token, routing.expert_ids(token, 0)));
  }

  Scalar selected_sum(const TopKRouting<Scalar>& routing, Index token) const {
    Scalar sum = 0;
    for (Index slot = 0; slot < options_.k; ++slot) sum += selected_weight(routing, token, slot);
    return sum;
  }

  /// Softmax, (group) selection and gates of one token. O(E·k) (O(E·(k + M)) with groups); no
  /// allocation.
  void route_token(TopKRouting<Scalar>& routing, Index token) const {
    const Index experts = this->num_experts();
    const Scalar* z = routing.logits.row(token).data();
    Scalar* p = routing.scores.row(token).data();
    detail::softmax_row(z, experts, p);

    const Scalar* selection = options_.softmax_over_selected ? z : p;
    Index* ids = routing.expert_ids.row(token).data();
    if (!grouped()) {
      detail::select_top(selection, experts, options_.k, ids);
    } else {
      const Index groups = options_.num_groups;
      const Index group_size = experts / groups;
      Scalar* group_scores = routing.group_scores.row(token).data();
      for (Index group = 0; group < groups; ++group) {
        Scalar best = selection[group * group_size];
        for (Index member = 1; member < group_size; ++member) {
          const Scalar value = selection[group * group_size + member];
          if (detail::ranks_before(value, best)) best = value;
        }
        group_scores[group] = best;
      }
      Index* kept = routing.selected_groups.row(token).data();
      const Index top_groups = options_.top_groups;
      detail::select_top(group_scores, groups, top_groups, kept);
      detail::select_top_by(
          experts, options_.k, [&](Index expert) { return selection[expert]; },
          [&](Index expert) { return std::find(kept, kept + top_groups, expert / group_size) != kept + top_groups; },
          ids);
    }

    if (!normalized()) {
      for (Index slot = 0; slot < options_.k; ++slot) routing.gates(token, slot) = p[ids[slot]] * scale_;
      return;
    }
    const Scalar total = selected_sum(routing, token);
    for (Index slot = 0; slot < options_.k; ++slot) {
      routing.gates(token, slot) = selected_weight(routing, token, slot) / total * scale_;
    }
  }

  /// ∂L/∂z of one token into d_logits.row(token). O(E + k).
  void backward_token(const TopKRouting<Scalar>& routing, const TopKRoutingGradient<Scalar>& upstream,
                      Matrix<Scalar>& d_logits, Index token) const {
    const Index experts = this->num_experts();
    const Index k = options_.k;
    const Scalar* p = routing.scores.row(token).data();
    Scalar* dz = d_logits.row(token).data();
    for (Index expert = 0; expert < experts; ++expert) dz[expert] = upstream.scores(token, expert);
    if (!normalized()) {
      for (Index slot = 0; slot < k; ++slot) {
        const Index expert = routing.expert_ids(token, slot);
        if (expert >= 0) dz[expert] += scale_ * upstream.gates(token, slot);
      }
    }
    detail::softmax_backward_row(p, upstream.logits.row(token).data(), experts, dz);
    if (!normalized()) return;
    const Scalar total = selected_sum(routing, token);
    Scalar weighted = 0;
    for (Index slot = 0; slot < k; ++slot) {
      weighted += selected_weight(routing, token, slot) / total * upstream.gates(token, slot);
    }
    for (Index slot = 0; slot < k; ++slot) {
      const Scalar q = selected_weight(routing, token, slot) / total;
      dz[routing.expert_ids(token, slot)] += scale_ * q * (upstream.gates(token, slot) - weighted);
    }
  }

  Options options_;
  Scalar scale_;
};

/// Checkpoint identity of SoftmaxTopKRouter: kind "softmax_top_k"; options normalize_top_k,
/// scale, softmax_over_selected, use_bias, num_groups, top_groups (k is the layer's, in the
/// checkpoint header; check_finite changes no result and is not recorded).
template <typename Scalar>
struct RouterKind<SoftmaxTopKRouter<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return "softmax_top_k"; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const SoftmaxTopKRouter<Scalar>& router) {
    const SoftmaxTopKRouterOptions& o = router.options();
    return {RouterOption::flag("normalize_top_k", o.normalize_top_k), RouterOption::real("scale", o.scale),
            RouterOption::flag("softmax_over_selected", o.softmax_over_selected),
            RouterOption::flag("use_bias", o.use_bias), RouterOption::integer("num_groups", o.num_groups),
            RouterOption::integer("top_groups", o.top_groups)};
  }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_SOFTMAX_TOP_K_HPP
