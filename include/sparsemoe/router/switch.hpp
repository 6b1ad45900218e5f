// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_SWITCH_HPP
#define SPARSEMOE_ROUTER_SWITCH_HPP

/// \file switch.hpp
/// The two classic softmax routers with random parts: Switch Transformer top-1 (Fedus et al.
/// 2021) with optional multiplicative input jitter, and GShard top-2 (Lepikhin et al. 2020) with
/// its randomly dispatched second expert. Both draw their random numbers counter-based from
/// (seed, RouteOptions::step, token, column), so a fixed (seed, step) always routes the same way,
/// whatever the thread count. Capacity limits are not the router's business (the dispatch's).

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

namespace detail {

/// The argument checks the softmax routers with random parts share.
inline void require_random_router(const char* function, Index input_dim, Index num_experts, Index min_experts) {
  require(input_dim >= 1, function, "input_dim must be >= 1, got ", input_dim);
  require(input_dim <= Index(0xFFFFFFFF), function, "input_dim must be < 2^32, got ", input_dim);
  require(num_experts >= min_experts, function, "num_experts must be >= ", min_experts, ", got ", num_experts);
}

/// Throws unless the step fits the 32-bit counter word it is drawn with.
inline void require_route_step(const char* function, std::uint64_t step) {
  require(step <= 0xFFFFFFFFull, function, "step must be < 2^32, got ", step);
}

}  // namespace detail

/// Options of SwitchRouter.
struct SwitchRouterOptions {
  /// ε of the multiplicative input jitter: in training, the router sees x ⊙ m with
  /// m ~ U(1 − ε, 1 + ε) per entry (the experts still get x). 0 = off (the default; the Switch
  /// Transformer paper used 1e-2). 0 ≤ ε < 1.
  double jitter_epsilon = 0.0;
  /// Seed of the jitter: m of (token t, column c) at step s is
  /// 1 − ε + 2ε·u(seed, s, t, c), u the Philox uniform of detail::counter_uniform, t the global
  /// row RouteOptions::token_offset + the local row.
  std::uint64_t seed = 0;
  /// Add a learned bias b_r (E) to the logits.
  bool use_bias = false;
  /// Throw on a non-finite logit (default). Off: NaN ranks last and the gate may be NaN.
  bool check_finite = true;
};

/// The parameter gradients of SwitchRouter (W_r, optional b_r).
template <typename Scalar>
using SwitchRouterGradients = RouterGradients<Scalar>;

/// Switch Transformer top-1 router over E experts for tokens of width d.
///
/// z = x̃·W_r (+ b_r) with x̃ = x ⊙ m in training with jitter (routing.input_jitter = m,
/// routing.jittered_input = x̃) and x̃ = x otherwise; p = softmax(z) (routing.scores); the
/// expert is argmax p, ties to the lower id; its gate is p itself, not renormalised (k = 1).
///
/// Backward: ∂p_e += ∂g for the chosen e, ∂p += upstream.scores, ∂z = p ⊙ (∂p − p·∂p) +
/// upstream.logits; ∂W_r += x̃ᵀ·∂z, ∂b_r += Σ_t ∂z_t, ∂x += (∂z·W_rᵀ) ⊙ m. The jitter sample is
/// held fixed (it is an input of the forward, not a function of the parameters).
///
/// Parameters: W_r d×E (row-major, zero-initialised), b_r (E) with use_bias. Cost of route:
/// 2·T·d·E flops + O(T·E) (+ T·d Philox draws with jitter); of backward 4·T·d·E flops.
///
/// \tparam Scalar_ float or double: parameters, inputs and the routing record.
template <typename Scalar_>
class SwitchRouter : public LinearRouterParameters<Scalar_> {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = SwitchRouterOptions;
  /// The parameter gradients, as make_gradients() returns them.
  using Gradients = RouterGradients<Scalar>;

  /// Builds a router; throws std::invalid_argument naming the offending value unless
  /// 1 ≤ d < 2^32, 1 ≤ E < 2^32 and 0 ≤ jitter_epsilon < 1.
  SwitchRouter(Index input_dim, Index num_experts, const Options& options = {}) : options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::SwitchRouter";
    detail::require_random_router(function, input_dim, num_experts, 1);
    detail::require_group_options(function, num_experts, 1, 1, 1);
    detail::require(options.jitter_epsilon >= 0 && options.jitter_epsilon < 1, function,
                    "jitter_epsilon must be in [0, 1), got ", options.jitter_epsilon);
    this->allocate_parameters(input_dim, num_experts, options.use_bias);
  }

  /// Always 1.
  Index k() const { return 1; }
  /// The options the router was built with.
  const Options& options() const { return options_; }


  /// None: this router has no state without a gradient.
  std::vector<TensorView<Scalar>> state() { return {}; }

  /// Whether route applies input jitter under `options` (training and ε > 0).
  bool jitters(const RouteOptions& options) const {
    return options.mode == Mode::training && options_.jitter_epsilon > 0;
  }

  /// Routes the T×d batch `input` into `routing`, reusing its storage (no allocation when T and
  /// the jitter on/off repeat). Throws std::invalid_argument if input has the wrong width,
  /// options.step ≥ 2^32, or (with check_finite) a logit is not finite, naming the token row,
  /// the expert and the value.
  void route(ConstMatrixRef<Scalar> input, const RouteOptions& options, TopKRouting<Scalar>& routing) const {
    const char* function = "sparsemoe::SwitchRouter::route";
    detail::require(input.cols() == this->input_dim(), function, "input must have ", this->input_dim(),
                    " columns (the router's input_dim), got ", input.rows(), "x", input.cols());
    detail::require_route_step(function, options.step);
    const Index tokens = input.rows();
    const Index experts = this->num_experts();
    const Index width = this->input_dim();
    const bool jitter = jitters(options);
    routing.expert_ids.resize(tokens, 1);
    routing.gates.resize(tokens, 1);
    routing.logits.resize(tokens, experts);
    routing.scores.resize(tokens, experts);
    routing.group_scores.resize(0, 0);
    routing.selected_groups.resize(0, 0);
    routing.input_jitter.resize(jitter ? tokens : 0, jitter ? width : 0);
    routing.jittered_input.resize(jitter ? tokens : 0, jitter ? width : 0);
    if (jitter) {
      const double epsilon = options_.jitter_epsilon;
      detail::parallel_for(tokens, 200.0 * static_cast<double>(width), [&](Index token) {
        for (Index column = 0; column < width; ++column) {
          const double u = detail::counter_uniform(options_.seed, options.step,
                                                   options.token_offset + static_cast<std::uint64_t>(token),
                                                   static_cast<std::uint64_t>(column));
          const auto multiplier = static_cast<Scalar>(1.0 - epsilon + 2.0 * epsilon * u);
          routing.input_jitter(token, column) = multiplier;
          routing.jittered_input(token, column) = input(token, column) * multiplier;
        }
      });
      detail::linear_logits(ConstMatrixRef<Scalar>(routing.jittered_input), this->weight_, this->bias_, routing.logits);
    } else {
      detail::linear_logits(input, this->weight_, this->bias_, routing.logits);
    }
    if (options_.check_finite) detail::require_finite_logits(routing.logits, function);
    detail::parallel_for(tokens, static_cast<double>(8 * experts), [&](Index token) {
      Scalar* p = routing.scores.row(token).data();
      detail::softmax_row(routing.logits.row(token).data(), experts, p);
      detail::select_top(p, experts, Index(1), routing.expert_ids.row(token).data());
      routing.gates(token, 0) = p[routing.expert_ids(token, 0)];
    });
  }

  /// Backward through the router (see the class comment): ADDS ∂L/∂W_r (and ∂L/∂b_r) to
  /// `parameter_gradients` and ∂L/∂x to `d_input` (T×d); leaves the total ∂L/∂z in
  /// parameter_gradients.logits (T×E, resized). Throws std::invalid_argument on a shape mismatch.
  /// Cost: 4·T·d·E flops + O(T·E).
  void backward(const TopKRouting<Scalar>& routing, ConstMatrixRef<Scalar> input,
                const TopKRoutingGradient<Scalar>& upstream, Gradients& parameter_gradients,
                MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::SwitchRouter::backward";
    detail::require_backward_shapes(function, routing, input, upstream, parameter_gradients, d_input, this->input_dim(),
                                    this->num_experts(), Index(1), options_.use_bias);
    const Index tokens = routing.num_tokens();
    const Index experts = this->num_experts();
    parameter_gradients.logits.resize(tokens, experts);
    detail::parallel_for(tokens, static_cast<double>(6 * experts), [&](Index token) {
      Scalar* dz = parameter_gradients.logits.row(token).data();
      for (Index expert = 0; expert < experts; ++expert) dz[expert] = upstream.scores(token, expert);
      dz[routing.expert_ids(token, 0)] += upstream.gates(token, 0);
      detail::softmax_backward_row(routing.scores.row(token).data(), upstream.logits.row(token).data(), experts, dz);
    });
    detail::linear_backward(routing, input, this->weight_, parameter_gradients, d_input);
  }

 private:
  Options options_;
};

/// Checkpoint identity of SwitchRouter: kind "switch"; options jitter_epsilon, seed and
/// use_bias (k is always 1; check_finite changes no result and is not recorded).
template <typename Scalar>
struct RouterKind<SwitchRouter<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return "switch"; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const SwitchRouter<Scalar>& router) {
    const SwitchRouterOptions& o = router.options();
    return {RouterOption::real("jitter_epsilon", o.jitter_epsilon), RouterOption::unsigned_integer("seed", o.seed),
            RouterOption::flag("use_bias", o.use_bias)};
  }
};

/// Options of GShardRouter.
struct GShardRouterOptions {
  /// In training, dispatch the second expert only with probability min(1, 2·g₂) (GShard's
  /// random routing). Off, or in evaluation, the second expert is always dispatched.
  bool random_second_expert = true;
  /// Seed of the second-expert draws: token t at step s is kept when
  /// u(seed, s, t, 0) < 2·g₂, u the Philox uniform of detail::counter_uniform, t the global row
  /// RouteOptions::token_offset + the local row.
  std::uint64_t seed = 0;
  /// Add a learned bias b_r (E) to the logits.
  bool use_bias = false;
  /// Throw on a non-finite logit (default). Off: NaN ranks last and gates may be NaN.
  bool check_finite = true;
};

/// The parameter gradients of GShardRouter (W_r, optional b_r).
template <typename Scalar>
using GShardRouterGradients = RouterGradients<Scalar>;

/// GShard top-2 router over E ≥ 2 experts for tokens of width d.
///
/// z = x·W_r (+ b_r), p = softmax(z) (routing.scores); e₁, e₂ the two largest p (ties to the
/// lower id); g₁ = p₁/(p₁ + p₂), g₂ = p₂/(p₁ + p₂) (p₁ ≥ 1/E, so no epsilon; Mesh TensorFlow
/// adds 1e-9 to the sum). In training with random_second_expert, the second slot is dispatched
/// only when u < 2·g₂, u ~ U[0, 1) drawn from (seed, step, token), i.e. with probability
/// min(1, 2·g₂); otherwise its id is −1 and its gate 0, while g₁ keeps its value (it is not
/// renormalised to 1). The balance loss GShard trains with counts the first slot only
/// (balance_loss with BalanceCounts::first_slot).
///
/// Backward: with q = (g₁, g₂) and ∂g₂ taken as 0 for a dropped slot,
/// ∂z_{e_j} += q_j·(∂g_j − Σ_l q_l ∂g_l) — a dropped second expert still receives gradient
/// through g₁'s denominator; the drop decision itself has none. upstream.scores goes through the
/// full softmax, upstream.logits adds directly; then ∂W_r += xᵀ·∂z, ∂b_r += Σ_t ∂z_t,
/// ∂x += ∂z·W_rᵀ. Backward recovers e₂ of a dropped slot from the stored scores.
///
/// Parameters: W_r d×E (row-major, zero-initialised), b_r (E) with use_bias. Cost of route:
/// 2·T·d·E flops + O(T·E) (+ T Philox draws in training); of backward 4·T·d·E flops.
///
/// \tparam Scalar_ float or double: parameters, inputs and the routing record.
template <typename Scalar_>
class GShardRouter : public LinearRouterParameters<Scalar_> {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = GShardRouterOptions;
  /// The parameter gradients, as make_gradients() returns them.
  using Gradients = RouterGradients<Scalar>;

  /// Builds a router; throws std::invalid_argument naming the offending value unless d ≥ 1 and
  /// 2 ≤ E < 2^32.
  GShardRouter(Index input_dim, Index num_experts, const Options& options = {}) : options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::GShardRouter";
    detail::require_random_router(function, input_dim, num_experts, 2);
    detail::require_group_options(function, num_experts, 2, 1, 1);
    this->allocate_parameters(input_dim, num_experts, options.use_bias);
  }

  /// Always 2.
  Index k() const { return 2; }
  /// The options the router was built with.
  const Options& options() const { return options_; }


  /// None: this router has no state without a gradient.
  std::vector<TensorView<Scalar>> state() { return {}; }

  /// Routes the T×d batch `input` into `routing`, reusing its storage (no allocation when T
  /// repeats). Throws std::invalid_argument if input has the wrong width, options.step ≥ 2^32, or
  /// (with check_finite) a logit is not finite, naming the token row, the expert and the value.
  void route(ConstMatrixRef<Scalar> input, const RouteOptions& options, TopKRouting<Scalar>& routing) const {
    const char* function = "sparsemoe::GShardRouter::route";
    detail::require(input.cols() == this->input_dim(), function, "input must have ", this->input_dim(),
                    " columns (the router's input_dim), got ", input.rows(), "x", input.cols());
    detail::require_route_step(function, options.step);
    const Index tokens = input.rows();
    const Index experts = this->num_experts();
    const bool sample = options.mode == Mode::training && options_.random_second_expert;
    routing.expert_ids.resize(tokens, 2);
    routing.gates.resize(tokens, 2);
    routing.logits.resize(tokens, experts);
    routing.scores.resize(tokens, experts);
    routing.group_scores.resize(0, 0);
    routing.selected_groups.resize(0, 0);
    routing.input_jitter.resize(0, 0);
    routing.jittered_input.resize(0, 0);
    detail::linear_logits(input, this->weight_, this->bias_, routing.logits);
    if (options_.check_finite) detail::require_finite_logits(routing.logits, function);
    detail::parallel_for(tokens, static_cast<double>(12 * experts + 200), [&](Index token) {
      Scalar* p = routing.scores.row(token).data();
      Index* ids = routing.expert_ids.row(token).data();
      detail::softmax_row(routing.logits.row(token).data(), experts, p);
      detail::select_top(p, experts, Index(2), ids);
      const Scalar sum = p[ids[0]] + p[ids[1]];
      routing.gates(token, 0) = p[ids[0]] / sum;
      routing.gates(token, 1) = p[ids[1]] / sum;
      if (!sample) return;
      const double u =
          detail::counter_uniform(options_.seed, options.step, options.token_offset + static_cast<std::uint64_t>(token), 0);
      if (u < 2.0 * static_cast<double>(routing.gates(token, 1))) return;
      ids[1] = -1;
      routing.gates(token, 1) = 0;
    });
  }

  /// Backward through the router (see the class comment): ADDS ∂L/∂W_r (and ∂L/∂b_r) to
  /// `parameter_gradients` and ∂L/∂x to `d_input` (T×d); leaves the total ∂L/∂z in
  /// parameter_gradients.logits (T×E, resized). Throws std::invalid_argument on a shape mismatch.
  /// Cost: 4·T·d·E flops + O(T·E).
  void backward(const TopKRouting<Scalar>& routing, ConstMatrixRef<Scalar> input,
                const TopKRoutingGradient<Scalar>& upstream, Gradients& parameter_gradients,
                MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::GShardRouter::backward";
    detail::require_backward_shapes(function, routing, input, upstream, parameter_gradients, d_input, this->input_dim(),
                                    this->num_experts(), Index(2), options_.use_bias);
    const Index tokens = routing.num_tokens();
    const Index experts = this->num_experts();
    parameter_gradients.logits.resize(tokens, experts);
    detail::parallel_for(tokens, static_cast<double>(10 * experts), [&](Index token) {
      const Scalar* p = routing.scores.row(token).data();
      Scalar* dz = parameter_gradients.logits.row(token).data();
      for (Index expert = 0; expert < experts; ++expert) dz[expert] = upstream.scores(token, expert);
      detail::softmax_backward_row(p, upstream.logits.row(token).data(), experts, dz);
      // The pair the forward chose (the second id may have been dropped to −1).
      Index pair[2];
      detail::select_top(p, experts, Index(2), pair);
      SPARSEMOE_ASSERT(pair[0] == routing.expert_ids(token, 0));
      const Scalar sum = p[pair[0]] + p[pair[1]];
      const Scalar q[2] = {p[pair[0]] / sum, p[pair[1]] / sum};
      const Scalar dg[2] = {upstream.gates(token, 0),
                            routing.expert_ids(token, 1) >= 0 ? upstream.gates(token, 1) : Scalar(0)};
      const Scalar weighted = q[0] * dg[0] + q[1] * dg[1];
      for (int slot = 0; slot < 2; ++slot) dz[pair[slot]] += q[slot] * (dg[slot] - weighted);
    });
    detail::linear_backward(routing, input, this->weight_, parameter_gradients, d_input);
  }

 private:
  Options options_;
};

/// Checkpoint identity of GShardRouter: kind "gshard"; options random_second_expert, seed and
/// use_bias (k is always 2; check_finite changes no result and is not recorded).
template <typename Scalar>
struct RouterKind<GShardRouter<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return "gshard"; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const GShardRouter<Scalar>& router) {
    const GShardRouterOptions& o = router.options();
    return {RouterOption::flag("random_second_expert", o.random_second_expert),
            RouterOption::unsigned_integer("seed", o.seed), RouterOption::flag("use_bias", o.use_bias)};
  }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_SWITCH_HPP
