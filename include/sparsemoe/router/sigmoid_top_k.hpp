// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_SIGMOID_TOP_K_HPP
#define SPARSEMOE_ROUTER_SIGMOID_TOP_K_HPP

/// \file sigmoid_top_k.hpp
/// Sigmoid top-k routing with a selection bias (DeepSeek-V3), and the auxiliary-loss-free update
/// of that bias.

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

/// What the experts of losing groups get as selection score in group-limited selection.
enum class GroupMask {
  /// They are excluded: never chosen, as if masked to −∞ (DeepSeek-V3's reference code).
  exclude,
  /// Their selection score becomes 0.0 and they still compete (Hugging Face's DeepSeek-V3 port).
  /// This differs from `exclude` only when a kept expert's biased score s + b is negative (or 0):
  /// a masked expert then outranks it (ties to the lower id).
  zero
};

/// Options of SigmoidTopKRouter. The defaults follow DeepSeek-V3 except for k, the groups and
/// the scale (V3: k = 8 of 256, 8 groups, top 4, scale 2.5).
struct SigmoidTopKRouterOptions {
  /// Experts per token, 1 ≤ k ≤ E (and ≤ top_groups·E/num_groups).
  Index k = 2;
  /// Renormalise the k selected (unbiased) scores to sum to 1 (DeepSeek-V3's norm_topk_prob).
  bool normalize_top_k = true;
  /// Added to the sum of the k scores before dividing: D = max(Σ + normalize_epsilon,
  /// normalize_floor). Without it a sum that underflows to 0 (all k logits below about −88 in
  /// float) gives 0/0. Implementations differ: Hugging Face adds 1e-20 (our default; invisible
  /// for any sum above about 1e-4 in double and 1e-13 in float), DeepSeek's reference code adds
  /// nothing (set 0), llama.cpp clamps the sum to at least 6.1e-5 (set normalize_epsilon = 0 and
  /// normalize_floor = 6.1e-5). Finite and ≥ 0.
  double normalize_epsilon = 1e-20;
  /// Lower bound of the denominator (see normalize_epsilon); 0 = none. Finite and ≥ 0. Where the
  /// floor is active, D is constant and passes no gradient.
  double normalize_floor = 0.0;
  /// Routed scaling factor, applied after renormalisation (DeepSeek-V3: 2.5). Finite and > 0.
  double scale = 1.0;
  /// Add a learned bias b_r (E) to the logits (DeepSeek-V3 has none; its selection bias is the
  /// separate, gradient-free selection_bias()).
  bool use_bias = false;
  /// Group-limited selection: num_groups groups of E/num_groups consecutive ids; each token keeps
  /// the top_groups groups with the largest group score = the sum of the two largest biased
  /// scores s + b in the group (the largest alone for groups of one). 1 = off.
  Index num_groups = 1;
  /// Groups kept per token, 1 ≤ top_groups ≤ num_groups.
  Index top_groups = 1;
  /// How losing groups are masked (see GroupMask).
  GroupMask group_mask = GroupMask::exclude;
  /// Throw on a non-finite logit (default). Off: NaN ranks last and gates may be NaN.
  bool check_finite = true;
};

namespace detail {

/// Logistic function 1/(1 + e^{−a}), without overflow for either sign.
template <typename Scalar>
Scalar logistic(Scalar a) {
  if (a >= Scalar(0)) return Scalar(1) / (Scalar(1) + std::exp(-a));
  const Scalar e = std::exp(a);
  return e / (Scalar(1) + e);
}

}  // namespace detail

/// The parameter gradients of SigmoidTopKRouter (W_r, optional b_r; the selection bias has none).
template <typename Scalar>
using SigmoidTopKRouterGradients = RouterGradients<Scalar>;

/// Sigmoid top-k router with a per-expert selection bias (DeepSeek-V3) over E experts for
/// tokens of width d.
///
/// z = x·W_r (+ b_r), s = σ(z) (routing.scores). Selection score u_i = s_i + β_i, with β the
/// selection bias (selection_bias(), E entries, no gradient; see update_selection_bias). With
/// groups, the top_groups groups of largest (top-2 sum of u) are kept, and the others masked
/// (GroupMask). Selection: the k largest u among the candidates, ties to the lower id; the ids
/// are stored by descending (masked) u. Gates come from the UNBIASED scores, c = scale:
///   - normalize_top_k:  g_j = c·s_{e_j} / D,  D = max(Σ_{l∈S} s_l + ε, floor)
///   - otherwise:        g_j = c·s_{e_j}
///
/// Backward (per token): ∂s_{e_j} += c·(∂g_j − Σ_l ∂g_l·s_{e_l}/D)/D when normalised (just
/// c·∂g_j/D where the floor holds D constant; c·∂g_j without normalisation); ∂s += upstream.scores;
/// ∂z = ∂s·s·(1 − s) + upstream.logits. Then ∂W_r += xᵀ·∂z, ∂b_r += Σ_t ∂z_t, ∂x += ∂z·W_rᵀ.
/// The selection bias gets no gradient.
///
/// Parameters: W_r d×E (row-major, zero-initialised) and, with use_bias, b_r (E). State without
/// gradient: the selection bias β (E, zero-initialised), listed by state(). Cost of route:
/// 2·T·d·E flops + O(T·E·k); of backward 4·T·d·E flops.
///
/// \tparam Scalar_ float or double: parameters, inputs and the routing record.
template <typename Scalar_>
class SigmoidTopKRouter : public LinearRouterParameters<Scalar_> {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = SigmoidTopKRouterOptions;
  /// The parameter gradients, as make_gradients() returns them.
  using Gradients = RouterGradients<Scalar>;

  /// Builds a router; throws std::invalid_argument naming the offending value unless d ≥ 1,
  /// 1 ≤ E < 2^32, 1 ≤ k ≤ E, num_groups ≥ 1 divides E, 1 ≤ top_groups ≤ num_groups,
  /// k ≤ top_groups·E/num_groups, scale is finite and > 0, and normalize_epsilon and
  /// normalize_floor are finite and ≥ 0.
  SigmoidTopKRouter(Index input_dim, Index num_experts, const Options& options = {}) : options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::SigmoidTopKRouter";
    detail::require(input_dim >= 1, function, "input_dim must be >= 1, got ", input_dim);
    detail::require_group_options(function, num_experts, options.k, options.num_groups, options.top_groups);
    detail::require(std::isfinite(options.scale) && options.scale > 0, function, "scale must be finite and > 0, got ",
                    options.scale);
    detail::require(std::isfinite(options.normalize_epsilon) && options.normalize_epsilon >= 0, function,
                    "normalize_epsilon must be finite and >= 0, got ", options.normalize_epsilon);
    detail::require(std::isfinite(options.normalize_floor) && options.normalize_floor >= 0, function,
                    "normalize_floor must be finite and >= 0, got ", options.normalize_floor);
    scale_ = static_cast<Scalar>(options.scale);
    epsilon_ = static_cast<Scalar>(options.normalize_epsilon);
    floor_ = static_cast<Scalar>(options.normalize_floor);
    this->allocate_parameters(input_dim, num_experts, options.use_bias);
    selection_bias_ = Vector<Scalar>::Zero(num_experts);
  }

  /// Experts chosen per token.
  Index k() const { return options_.k; }
  /// The options the router was built with.
  const Options& options() const { return options_; }
  /// Whether group-limited selection is on (num_groups > 1).
  bool grouped() const { return options_.num_groups > 1; }

  /** @{ */
  /// β, E entries: added to the scores for selection only, without gradient (update it with
  /// update_selection_bias(); keep its size E and its values finite, which route checks).
  Vector<Scalar>& selection_bias() { return selection_bias_; }
  const Vector<Scalar>& selection_bias() const { return selection_bias_; }
  /** @} */

  /// "selection_bias" (E×1): state a checkpoint keeps, no optimizer updates.
  std::vector<TensorView<Scalar>> state() { return {make_tensor_view("selection_bias", selection_bias_)}; }

  /// Routes the T×d batch `input` into `routing`, reusing its storage (no allocation when T
  /// repeats). `options` is not used (no random part). Throws std::invalid_argument if input has
  /// the wrong width, the selection bias is not E finite values, or (with check_finite) a logit is
  /// not finite, naming the token row, the expert and the value.
  void route(ConstMatrixRef<Scalar> input, const RouteOptions& options, TopKRouting<Scalar>& routing) const {
    static_cast<void>(options);
    const char* function = "sparsemoe::SigmoidTopKRouter::route";
    detail::require(input.cols() == this->input_dim(), function, "input must have ", this->input_dim(),
                    " columns (the router's input_dim), got ", input.rows(), "x", input.cols());
    detail::require(selection_bias_.size() == this->num_experts(), function, "selection_bias must have ",
                    this->num_experts(), " entries, got ", selection_bias_.size());
    for (Index expert = 0; expert < this->num_experts(); ++expert) {
      detail::require(std::isfinite(selection_bias_[expert]), function, "non-finite selection_bias ",
                      selection_bias_[expert], " of expert ", expert);
    }
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

  /// Backward through the router (see the class comment): ADDS ∂L/∂W_r (and ∂L/∂b_r) to
  /// `parameter_gradients` and ∂L/∂x to `d_input` (T×d); leaves the total ∂L/∂z in
  /// parameter_gradients.logits (T×E, resized). Throws std::invalid_argument on a shape mismatch.
  /// Cost: 4·T·d·E flops + O(T·E).
  void backward(const TopKRouting<Scalar>& routing, ConstMatrixRef<Scalar> input,
                const TopKRoutingGradient<Scalar>& upstream, Gradients& parameter_gradients,
                MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::SigmoidTopKRouter::backward";
    detail::require_backward_shapes(function, routing, input, upstream, parameter_gradients, d_input, this->input_dim(),
                                    this->num_experts(), k(), options_.use_bias);
    const Index tokens = routing.num_tokens();
    const Index experts = this->num_experts();
    parameter_gradients.logits.resize(tokens, experts);
    detail::parallel_for(tokens, static_cast<double>(4 * experts + 6 * k()), [&](Index token) {
      backward_token(routing, upstream, parameter_gradients.logits, token);
    });
    detail::linear_backward(routing, input, this->weight_, parameter_gradients, d_input);
  }

 private:
  /// Biased selection score u_i = s_i + β_i of one token.
  Scalar biased(const TopKRouting<Scalar>& routing, Index token, Index expert) const {
    return routing.scores(token, expert) + selection_bias_[expert];
  }

  /// Σ_{l∈S} s_l of one token, and the denominator D = max(Σ + ε, floor).
  Scalar selected_sum(const TopKRouting<Scalar>& routing, Index token) const {
    Scalar sum = 0;
    for (Index slot = 0; slot < options_.k; ++slot) sum += routing.scores(token, routing.expert_ids(token, slot));
    return sum;
  }

  Scalar denominator(Scalar sum) const { return std::max(sum + epsilon_, floor_); }

  /// Scores, (group) selection and gates of one token. O(E·k) (O(E·(k + M)) with groups); no
  /// allocation.
  void route_token(TopKRouting<Scalar>& routing, Index token) const {
    const Index experts = this->num_experts();
    const Index k = options_.k;
    for (Index expert = 0; expert < experts; ++expert) {
      routing.scores(token, expert) = detail::logistic(routing.logits(token, expert));
    }
    Index* ids = routing.expert_ids.row(token).data();
    const auto value = [&](Index expert) { return biased(routing, token, expert); };
    if (!grouped()) {
      detail::select_top_by(experts, k, value, [](Index) { return true; }, ids);
    } else {
      const Index groups = options_.num_groups;
      const Index group_size = experts / groups;
      Scalar* group_scores = routing.group_scores.row(token).data();
      for (Index group = 0; group < groups; ++group) {
        // The two largest biased scores of the group (NaN ranks last), summed.
        Index first = group * group_size;
        Index second = -1;
        for (Index expert = first + 1; expert < (group + 1) * group_size; ++expert) {
          if (detail::ranks_before(value(expert), value(first))) {
            second = first;
            first = expert;
          } else if (second < 0 || detail::ranks_before(value(expert), value(second))) {
            second = expert;
          }
        }
        group_scores[group] = second < 0 ? value(first) : value(first) + value(second);
      }
      Index* kept = routing.selected_groups.row(token).data();
      const Index top_groups = options_.top_groups;
      detail::select_top(group_scores, groups, top_groups, kept);
      const auto in_kept_group = [&](Index expert) {
        return std::find(kept, kept + top_groups, expert / group_size) != kept + top_groups;
      };
      if (options_.group_mask == GroupMask::exclude) {
        detail::select_top_by(experts, k, value, in_kept_group, ids);
      } else {
        detail::select_top_by(
            experts, k, [&](Index expert) { return in_kept_group(expert) ? value(expert) : Scalar(0); },
            [](Index) { return true; }, ids);
      }
    }
    if (!options_.normalize_top_k) {
      for (Index slot = 0; slot < k; ++slot) routing.gates(token, slot) = routing.scores(token, ids[slot]) * scale_;
      return;
    }
    const Scalar total = denominator(selected_sum(routing, token));
    for (Index slot = 0; slot < k; ++slot) {
      routing.gates(token, slot) = routing.scores(token, ids[slot]) / total * scale_;
    }
  }

  /// ∂L/∂z of one token into d_logits.row(token). O(E + k).
  void backward_token(const TopKRouting<Scalar>& routing, const TopKRoutingGradient<Scalar>& upstream,
                      Matrix<Scalar>& d_logits, Index token) const {
    const Index experts = this->num_experts();
    const Index k = options_.k;
    Scalar* ds = d_logits.row(token).data();
    for (Index expert = 0; expert < experts; ++expert) ds[expert] = upstream.scores(token, expert);
    if (!options_.normalize_top_k) {
      for (Index slot = 0; slot < k; ++slot) ds[routing.expert_ids(token, slot)] += scale_ * upstream.gates(token, slot);
    } else {
      const Scalar sum = selected_sum(routing, token);
      const Scalar total = denominator(sum);
      // Where the floor holds, D does not depend on the scores.
      const bool floored = sum + epsilon_ < floor_;
      Scalar weighted = 0;
      if (!floored) {
        for (Index slot = 0; slot < k; ++slot) {
          weighted += upstream.gates(token, slot) * routing.scores(token, routing.expert_ids(token, slot)) / total;
        }
      }
      for (Index slot = 0; slot < k; ++slot) {
        ds[routing.expert_ids(token, slot)] += scale_ * (upstream.gates(token, slot) - weighted) / total;
      }
    }
    for (Index expert = 0; expert < experts; ++expert) {
      const Scalar s = routing.scores(token, expert);
      ds[expert] = ds[expert] * s * (Scalar(1) - s) + upstream.logits(token, expert);
    }
  }

  Options options_;
  Scalar scale_;
  Scalar epsilon_;
  Scalar floor_;
  Vector<Scalar> selection_bias_;
};

/// Checkpoint identity of SigmoidTopKRouter: kind "sigmoid_top_k"; options normalize_top_k,
/// normalize_epsilon, normalize_floor, scale, use_bias, num_groups, top_groups and group_mask
/// (integer: 0 = exclude, 1 = zero). k is the layer's (checkpoint header); check_finite changes
/// no result and is not recorded. The selection bias is state (state()), stored as a tensor.
template <typename Scalar>
struct RouterKind<SigmoidTopKRouter<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return "sigmoid_top_k"; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const SigmoidTopKRouter<Scalar>& router) {
    const SigmoidTopKRouterOptions& o = router.options();
    return {RouterOption::flag("normalize_top_k", o.normalize_top_k),
            RouterOption::real("normalize_epsilon", o.normalize_epsilon),
            RouterOption::real("normalize_floor", o.normalize_floor), RouterOption::real("scale", o.scale),
            RouterOption::flag("use_bias", o.use_bias), RouterOption::integer("num_groups", o.num_groups),
            RouterOption::integer("top_groups", o.top_groups),
            RouterOption::integer("group_mask", o.group_mask == GroupMask::exclude ? 0 : 1)};
  }
};

/// The auxiliary-loss-free balancing update of DeepSeek-V3, applied after each training step:
/// β_i ← β_i + Δ_i with Δ_i = γ·sign(mean load − load_i) (sign(0) = 0), so overloaded experts
/// become less attractive to the selection and underloaded ones more. With `recenter`, Δ is
/// shifted to zero mean first (torchtitan), so Σβ stays constant; without (Megatron), it is not.
/// `tokens_per_expert` holds the loads (E entries, integer or floating, finite and ≥ 0), counted
/// over the whole batch (under data or expert parallelism: summed over all workers first; see
/// count_tokens_per_expert). γ is typically 1e-3. Computed in double. Throws
/// std::invalid_argument naming the value for a size mismatch, a non-finite or negative γ, or a
/// negative or non-finite load. O(E).
template <typename Scalar, typename Loads>
void update_selection_bias(Vector<Scalar>& bias, const Eigen::MatrixBase<Loads>& tokens_per_expert, double gamma,
                           bool recenter) {
  const char* function = "sparsemoe::update_selection_bias";
  const Index experts = bias.size();
  detail::require(tokens_per_expert.size() == experts, function, "tokens_per_expert must have ", experts,
                  " entries (one per expert, as the bias), got ", tokens_per_expert.size());
  detail::require(std::isfinite(gamma) && gamma >= 0, function, "gamma must be finite and >= 0, got ", gamma);
  if (experts == 0) return;
  double mean = 0;
  for (Index expert = 0; expert < experts; ++expert) {
    const double load = static_cast<double>(tokens_per_expert(expert));
    detail::require(std::isfinite(load) && load >= 0, function, "tokens_per_expert must be finite and >= 0, got ",
                    load, " for expert ", expert);
    mean += load;
  }
  mean /= static_cast<double>(experts);
  const auto delta = [&](Index expert) {
    const double load = static_cast<double>(tokens_per_expert(expert));
    return gamma * static_cast<double>((load < mean) - (load > mean));
  };
  double shift = 0;
  if (recenter) {
    for (Index expert = 0; expert < experts; ++expert) shift += delta(expert);
    shift /= static_cast<double>(experts);
  }
  for (Index expert = 0; expert < experts; ++expert) {
    bias[expert] = static_cast<Scalar>(static_cast<double>(bias[expert]) + (delta(expert) - shift));
  }
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_SIGMOID_TOP_K_HPP
