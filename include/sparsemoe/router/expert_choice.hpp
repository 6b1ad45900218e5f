// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_EXPERT_CHOICE_HPP
#define SPARSEMOE_ROUTER_EXPERT_CHOICE_HPP

/// \file expert_choice.hpp
/// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
/// the experts pick their tokens instead of the tokens picking experts. ExpertChoiceLayer
/// (expert_choice.hpp one level up) runs it with experts.

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../dispatch.hpp"
#include "../parameters.hpp"
#include "../router.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// Options of ExpertChoiceRouter: how many tokens each expert takes.
struct ExpertChoiceRouterOptions {
  /// f > 0 and finite: each expert takes C = ⌈(T/E)·f⌉ of the T tokens of a batch (capped at T),
  /// so that on average a token is processed by f experts. Zhou et al. train with f = 2, the
  /// compute of top-2 token choice. Ignored when `capacity` is set.
  double capacity_factor = 2.0;
  /// An explicit C ≥ 1 for every batch, in place of the factor (capped at T for a batch of fewer
  /// tokens).
  std::optional<Index> capacity;
  /// Throw on a non-finite logit (default). Off: NaN scores rank below every number.
  bool check_finite = true;
};

/// The tokens each expert takes, in C = min(T, ⌈(T/E)·f⌉) (f = options.capacity_factor,
/// evaluated in double as (T/E)·f and rounded up, so that a factor that is exact in binary gives
/// exactly T·f/E when E divides T·f) or C = min(T, options.capacity) when set; 0 when T = 0.
/// Throws std::invalid_argument naming the value for T < 0, E < 1, a factor ≤ 0 or not finite,
/// or an explicit capacity ≤ 0. O(1).
inline Index expert_choice_capacity(Index num_tokens, Index num_experts, const ExpertChoiceRouterOptions& options) {
  const char* function = "sparsemoe::expert_choice_capacity";
  detail::require(num_tokens >= 0 && num_experts >= 1, function, "needs T >= 0 and E >= 1, got T = ", num_tokens,
                  ", E = ", num_experts);
  if (options.capacity) {
    detail::require(*options.capacity >= 1, function, "the explicit capacity must be >= 1, got ", *options.capacity);
    return std::min(*options.capacity, num_tokens);
  }
  detail::require(std::isfinite(options.capacity_factor) && options.capacity_factor > 0.0, function,
                  "the capacity factor must be finite and > 0, got ", options.capacity_factor);
  const double mean = static_cast<double>(num_tokens) / static_cast<double>(num_experts) * options.capacity_factor;
  const double rounded = std::ceil(mean);
  return rounded >= static_cast<double>(num_tokens) ? num_tokens : static_cast<Index>(rounded);
}

/// What an ExpertChoiceRouter decided for a batch of T tokens over E experts. It is a TopKRouting
/// with k = E in which slot i of a token stands for expert i: expert_ids(t, i) = i when expert i
/// took token t and −1 otherwise, gates(t, i) = S(t, i) when taken and 0 otherwise. So a token
/// has between 0 and E dispatched slots, and build_dispatch_plan(expert_ids, E) groups each
/// expert's C tokens into one block of rows, ascending by token. Memory: O(T·E).
template <typename Scalar>
struct ExpertChoiceRouting : TopKRouting<Scalar> {
  /// C: the tokens each expert took in this batch (every expert takes exactly C).
  Index capacity = 0;
  /// T: the number of experts that took each token (0..E).
  IndexVector experts_per_token;
  /// Tokens taken by no expert: their output is 0 (the residual path's business).
  Index unrouted_tokens = 0;
  /// E×T scratch of the selection (each expert's tokens by rank), reused from call to call.
  IndexMatrix selection_scratch;
};

/// Expert-choice router over E experts for tokens of width d (Zhou et al. 2022).
///
/// z = x·W_r (T×E), S = softmax(z) over the experts of each token (routing.scores). Each expert i
/// takes the C tokens of largest S(t, i) in its column (C: expert_choice_capacity), ties toward
/// the lower token index (NaN last); a token can be taken by any number of experts from 0 to E.
/// The combine weight of expert i for token t is S(t, i): the layer's output is
/// y_t = Σ_{i took t} S(t, i)·E_i(x_t).
///
/// Backward: ∂S(t, i) = ∂L/∂gates(t, i) where i took t (0 elsewhere), plus the direct
/// upstream.scores; through the softmax ∂z_ti = S_ti·(∂S_ti − Σ_m S_tm·∂S_tm), plus the direct
/// upstream.logits; then ∂W_r += xᵀ·∂z and ∂x += ∂z·W_rᵀ. Selection has no gradient.
///
/// Parameters: W_r d×E (zero-initialised; see initialize_uniform). Scores are computed in Scalar
/// (float or double, never below float). Cost of route: 2·T·d·E flops for the logits, O(T·E)
/// for the softmax and, on average, O(T·E) for the selection (one std::nth_element per expert);
/// backward 4·T·d·E flops. Results are bitwise identical for any thread count.
///
/// \tparam Scalar_ float or double.
template <typename Scalar_>
class ExpertChoiceRouter : public LinearRouterParameters<Scalar_> {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = ExpertChoiceRouterOptions;
  /// The parameter gradients (W_r; the bias stays empty).
  using Gradients = RouterGradients<Scalar>;

  /// Builds a router; throws std::invalid_argument naming the value unless d ≥ 1,
  /// 1 ≤ E < 2^32, the factor is finite and > 0 and an explicit capacity is ≥ 1.
  ExpertChoiceRouter(Index input_dim, Index num_experts, const Options& options = {}) : options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::ExpertChoiceRouter";
    detail::require(input_dim >= 1, function, "input_dim must be >= 1, got ", input_dim);
    detail::require(num_experts >= 1 && num_experts <= Index(0xFFFFFFFF), function,
                    "num_experts must be in [1, 2^32), got ", num_experts);
    expert_choice_capacity(0, num_experts, options);  // checks the factor and the capacity
    this->allocate_parameters(input_dim, num_experts, false);
  }

  /// Slots per token of the routing record: E (slot i stands for expert i).
  Index k() const { return this->num_experts(); }
  /// The options the router was built with.
  const Options& options() const { return options_; }
  /// C for a batch of `num_tokens` tokens (expert_choice_capacity with this router's options).
  Index capacity(Index num_tokens) const { return expert_choice_capacity(num_tokens, this->num_experts(), options_); }

  /// None: this router has no state without a gradient.
  std::vector<TensorView<Scalar>> state() { return {}; }

  /// Routes the T×d batch `input` into `routing`, reusing its storage (no allocation when T
  /// repeats). Throws std::invalid_argument if the input has the wrong width or (with
  /// check_finite) a logit is not finite, naming the token row, the expert and the value.
  void route(ConstMatrixRef<Scalar> input, ExpertChoiceRouting<Scalar>& routing) const {
    const char* function = "sparsemoe::ExpertChoiceRouter::route";
    detail::require(input.cols() == this->input_dim(), function, "input must have ", this->input_dim(),
                    " columns (the router's input_dim), got ", input.rows(), "x", input.cols());
    const Index tokens = input.rows();
    const Index experts = this->num_experts();
    const Index capacity = this->capacity(tokens);
    routing.capacity = capacity;
    routing.expert_ids.setConstant(tokens, experts, -1);
    routing.gates.setZero(tokens, experts);
    routing.logits.resize(tokens, experts);
    routing.scores.resize(tokens, experts);
    routing.group_scores.resize(0, 0);
    routing.selected_groups.resize(0, 0);
    routing.input_jitter.resize(0, 0);
    routing.jittered_input.resize(0, 0);
    routing.selection_scratch.resize(experts, tokens);
    detail::linear_logits(input, this->weight_, this->bias_, routing.logits);
    if (options_.check_finite) detail::require_finite_logits(routing.logits, function);
    detail::parallel_for(tokens, static_cast<double>(4 * experts), [&](Index token) {
      detail::softmax_row(routing.logits.row(token).data(), experts, routing.scores.row(token).data());
    });
    // Expert i writes only column i of expert_ids and gates and row i of the scratch.
    detail::parallel_for(experts, 8.0 * static_cast<double>(tokens), [&](Index expert) {
      Index* order = routing.selection_scratch.row(expert).data();
      for (Index token = 0; token < tokens; ++token) order[token] = token;
      const auto ranks_first = [&](Index a, Index b) {
        const Scalar score_a = routing.scores(a, expert), score_b = routing.scores(b, expert);
        if (detail::ranks_before(score_a, score_b)) return true;
        return !detail::ranks_before(score_b, score_a) && a < b;
      };
      std::nth_element(order, order + capacity, order + tokens, ranks_first);
      for (Index rank = 0; rank < capacity; ++rank) {
        routing.expert_ids(order[rank], expert) = expert;
        routing.gates(order[rank], expert) = routing.scores(order[rank], expert);
      }
    });
    routing.experts_per_token.resize(tokens);
    routing.unrouted_tokens = 0;
    for (Index token = 0; token < tokens; ++token) {
      const Index taken = (routing.expert_ids.row(token).array() >= 0).count();
      routing.experts_per_token[token] = taken;
      if (taken == 0) ++routing.unrouted_tokens;
    }
  }

  /// Backward through the router (see the class comment): ADDS ∂L/∂W_r to `parameter_gradients`
  /// and ∂L/∂x to `d_input` (T×d); leaves the total ∂L/∂z in parameter_gradients.logits (T×E,
  /// resized). `upstream.gates` (T×E) holds ∂L/∂S(t, i) of the taken pairs (entries of pairs that
  /// were not taken are ignored). Throws std::invalid_argument on a shape mismatch.
  /// Cost: 4·T·d·E flops + O(T·E).
  void backward(const ExpertChoiceRouting<Scalar>& routing, ConstMatrixRef<Scalar> input,
                const TopKRoutingGradient<Scalar>& upstream, Gradients& parameter_gradients,
                MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::ExpertChoiceRouter::backward";
    detail::require_backward_shapes(function, routing, input, upstream, parameter_gradients, d_input, this->input_dim(),
                                    this->num_experts(), k(), false);
    const Index tokens = routing.num_tokens();
    const Index experts = this->num_experts();
    parameter_gradients.logits.resize(tokens, experts);
    detail::parallel_for(tokens, static_cast<double>(8 * experts), [&](Index token) {
      Scalar* dz = parameter_gradients.logits.row(token).data();
      for (Index expert = 0; expert < experts; ++expert) {
        const bool taken = routing.expert_ids(token, expert) >= 0;
        dz[expert] = upstream.scores(token, expert) + (taken ? upstream.gates(token, expert) : Scalar(0));
      }
      detail::softmax_backward_row(routing.scores.row(token).data(), upstream.logits.row(token).data(), experts, dz);
    });
    detail::linear_backward(routing, input, this->weight_, parameter_gradients, d_input);
  }

 private:
  Options options_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_EXPERT_CHOICE_HPP
