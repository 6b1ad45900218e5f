// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_LAYER_ROUTER_HPP
#define SPARSEMOE_LAYER_ROUTER_HPP

/// \file layer_router.hpp
/// How MoELayer talks to its router: RouterTraits<RouterT> names the router's records and runs
/// its stages (route, loss terms, backward, checks). The layer's kernels never see which router
/// ran: they read only the T×k expert ids (−1: slot not dispatched) and gate weights.
///
/// Two families are adapted here: NoisyTopKGate (Shazeer et al. 2017, with the CV² importance and
/// load losses) and every top-k router of router.hpp (SoftmaxTopKRouter, SigmoidTopKRouter,
/// SwitchRouter, GShardRouter, with the Switch/GShard balance loss and the router z-loss). A new
/// router either fills a TopKRouting (then it needs nothing here) or gets a specialisation of
/// RouterTraits with the members documented on the primary template.

#include "balance_losses.hpp"
#include "config.hpp"
#include "gate.hpp"
#include "layer_options.hpp"
#include "losses.hpp"
#include "parameters.hpp"
#include "router.hpp"

#include <cstdint>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// The loss terms of a top-k router's batch: balance = α·E·Σ_i f_i·P_i (balance_loss) and
/// z = c·(1/T)·Σ_t (logsumexp_i z_ti)² (z_loss), with the weights and variant forward used.
template <typename Scalar>
struct TopKRouterLosses {
  Scalar balance = 0;                ///< the weighted balance loss (0 when its weight is 0)
  Scalar z = 0;                      ///< the weighted z-loss (0 when its weight is 0)
  double balance_weight = 0;         ///< α (ForwardOptions::balance_loss_weight)
  double z_weight = 0;               ///< c (ForwardOptions::z_loss_weight)
  BalanceLossOptions balance_options;  ///< the balance loss's variant
  BalanceLossWorkspace workspace;    ///< scratch of balance_loss, reused across forwards

  /// The auxiliary loss that backward differentiates: balance + z.
  Scalar total() const { return balance + z; }
};

/// Upstream gradients of a top-k routing as the layer accumulates them, with the scratch of the
/// balance loss's backward (reused across calls).
template <typename Scalar>
struct TopKLayerRoutingGradient : TopKRoutingGradient<Scalar> {
  BalanceLossWorkspace balance_workspace;  ///< scratch of balance_loss_backward
};

/// MoELayer's view of a router. The primary template serves every router whose route() fills a
/// TopKRouting (the Router concept of router.hpp). Members (all static):
///
/// | member | meaning |
/// | --- | --- |
/// | `Routing`, `RoutingGradient`, `Losses`, `Gradients` | the router's record, the upstream gradients the layer accumulates (`.gates`, T×k), the loss record (`total()`), the parameter gradients (`tensors()`, `set_zero()`) |
/// | `prefix` | the name prefix of the router's tensors in MoELayer::tensors() |
/// | `route(router, x, mode, step, routing)` | the router's decisions |
/// | `compute_losses(routing, options, losses)`, `losses_backward(routing, losses, gradient)` | the auxiliary loss terms and their gradient |
/// | `backward(router, routing, x, gradient, parameter_gradients, d_x)` | ADDS ∂L/∂parameters and ∂L/∂x |
/// | `make_gradients(router)`, `check_gradients(router, gradients, function)` | zero gradients; their shapes |
/// | `check_router(router, d, E, k, function)` | the router still has the layer's sizes |
/// | `check_routing(router, routing, losses, T, function)` | a routing that backward may read (every shape it indexes) |
template <typename RouterT, typename Enable = void>
struct RouterTraits {
  /// The router's scalar.
  using Scalar = typename RouterT::Scalar;
  /// What route() fills: a TopKRouting.
  using Routing = TopKRouting<Scalar>;
  /// The upstream gradients the layer accumulates for backward.
  using RoutingGradient = TopKLayerRoutingGradient<Scalar>;
  /// The balance and z-loss record of one forward.
  using Losses = TopKRouterLosses<Scalar>;
  /// The router's parameter gradients (RouterGradients).
  using Gradients = typename RouterT::Gradients;
  /// Prefix of the router's tensors in MoELayer::tensors(): "router.weight", "router.bias".
  static constexpr const char* prefix = "router.";

  /// router.route(input, {mode, step, token_offset}, routing).
  static void route(const RouterT& router, ConstMatrixRef<Scalar> input, Mode mode, std::uint64_t step,
                    Routing& routing, std::uint64_t token_offset = 0) {
    RouteOptions options;
    options.mode = mode;
    options.step = step;
    options.token_offset = token_offset;
    router.route(input, options, routing);
  }

  /// The balance loss (ForwardOptions::balance_loss_weight, balance_loss) and the z-loss
  /// (ForwardOptions::z_loss_weight) of `routing`; a weight of 0 skips its term.
  static void compute_losses(const Routing& routing, const ForwardOptions& options, Losses& losses) {
    losses.balance_weight = options.balance_loss_weight;
    losses.z_weight = options.z_loss_weight;
    losses.balance_options = options.balance_loss;
    losses.balance = options.balance_loss_weight != 0.0
                         ? balance_loss(routing, options.balance_loss_weight, options.balance_loss, losses.workspace)
                         : Scalar(0);
    losses.z = options.z_loss_weight != 0.0 ? z_loss(routing, options.z_loss_weight) : Scalar(0);
  }

  /// Adds the gradients of both terms, with the weights forward used, to `gradient`.
  static void losses_backward(const Routing& routing, const Losses& losses, RoutingGradient& gradient) {
    if (losses.balance_weight != 0.0) {
      balance_loss_backward(routing, losses.balance_weight, losses.balance_options, gradient, gradient.balance_workspace);
    }
    if (losses.z_weight != 0.0) z_loss_backward(routing, losses.z_weight, gradient);
  }

  /// router.backward: ADDS ∂L/∂W_r (and ∂L/∂b_r) and ∂L/∂x.
  static void backward(const RouterT& router, const Routing& routing, ConstMatrixRef<Scalar> input,
                       RoutingGradient& gradient, Gradients& parameter_gradients, MatrixRef<Scalar> d_input) {
    router.backward(routing, input, gradient, parameter_gradients, d_input);
  }

  /// Zero gradients shaped like the router's parameters.
  static Gradients make_gradients(const RouterT& router) { return router.make_gradients(); }

  /// Throws std::invalid_argument unless `gradients` has the shapes of the router's parameters.
  static void check_gradients(const RouterT& router, Gradients& gradients, const char* function) {
    detail::require_shape(gradients.weight, router.input_dim(), router.num_experts(), function,
                          "gradients of router.weight");
    const Index bias_size = router_bias_size(router, 0);
    detail::require(gradients.bias.size() == bias_size, function, "gradients of router.bias has ",
                    gradients.bias.size(), " entries, the router ", bias_size);
  }

  /** @{ */
  /// Entries of the router's bias: router.bias().size() where the router has bias() (every
  /// LinearRouterParameters router; allocates nothing, as backward must not), else the bias of
  /// router.make_gradients(). Call with 0: the first overload wins where it compiles.
  template <typename R>
  static auto router_bias_size(const R& router, int) -> decltype(static_cast<Index>(router.bias().size())) {
    return static_cast<Index>(router.bias().size());
  }
  template <typename R>
  static Index router_bias_size(const R& router, long) {
    return static_cast<Index>(router.make_gradients().bias.size());
  }
  /** @} */

  /// Throws std::invalid_argument unless the router has the layer's d, E and k.
  static void check_router(const RouterT& router, Index input_dim, Index num_experts, Index k, const char* function) {
    detail::require(router.input_dim() == input_dim && router.num_experts() == num_experts && router.k() == k,
                    function, "the router has d=", router.input_dim(), ", E=", router.num_experts(), ", k=", router.k(),
                    " but the layer d=", input_dim, ", E=", num_experts, ", k=", k);
  }

  /// Throws std::invalid_argument unless every shape of `routing` that backward indexes is that
  /// of a batch of `tokens` tokens.
  static void check_routing(const RouterT& router, const Routing& routing, const Losses&, Index tokens,
                            const char* function) {
    const Index experts = router.num_experts(), k = router.k();
    detail::require_shape(routing.expert_ids, tokens, k, function, "result.routing.expert_ids");
    detail::require_shape(routing.gates, tokens, k, function, "result.routing.gates");
    detail::require_shape(routing.logits, tokens, experts, function, "result.routing.logits");
    detail::require_shape(routing.scores, tokens, experts, function, "result.routing.scores");
    if (routing.group_scores.size() > 0 || routing.selected_groups.size() > 0) {
      detail::require(routing.group_scores.rows() == tokens && routing.selected_groups.rows() == tokens, function,
                      "result.routing.group_scores/selected_groups must have ", tokens, " rows");
      bool valid = true;
      for (Index i = 0; valid && i < routing.selected_groups.size(); ++i) {
        valid = routing.selected_groups.data()[i] >= 0 && routing.selected_groups.data()[i] < routing.group_scores.cols();
      }
      detail::require(valid, function, "result.routing.selected_groups holds a group id out of range");
    }
    const Index jitter_rows = routing.jittered() ? tokens : 0, jitter_cols = routing.jittered() ? router.input_dim() : 0;
    detail::require_shape(routing.input_jitter, jitter_rows, jitter_cols, function, "result.routing.input_jitter");
    detail::require_shape(routing.jittered_input, jitter_rows, jitter_cols, function, "result.routing.jittered_input");
  }
};

/// The gradients of NoisyTopKGate's parameters inside MoEGradients: ∂L/∂W_g and ∂L/∂W_noise.
template <typename Scalar>
struct NoisyTopKGateGradients {
  Matrix<Scalar> gate_weight;   ///< ∂L/∂W_g, d×E
  Matrix<Scalar> noise_weight;  ///< ∂L/∂W_noise, d×E

  /// "gate_weight", "noise_weight": the names of NoisyTopKGate::tensors().
  std::vector<TensorView<Scalar>> tensors() {
    return {make_tensor_view("gate_weight", gate_weight), make_tensor_view("noise_weight", noise_weight)};
  }
  /// Sets both to zero.
  void set_zero() {
    gate_weight.setZero();
    noise_weight.setZero();
  }
};

/// MoELayer's view of the noisy top-k gate of Shazeer et al.\ 2017: its Routing, GateGradients
/// and AuxiliaryLosses (CV² of Importance and Load, weighted by ForwardOptions::importance_weight
/// and load_weight). The tensors keep their historical prefix "gate.".
template <typename Scalar>
struct RouterTraits<NoisyTopKGate<Scalar>> {
  /// The gate.
  using Router = NoisyTopKGate<Scalar>;
  /// What the gate's route() fills.
  using Routing = sparsemoe::Routing<Scalar>;
  /// The upstream gradients of the gate's outputs.
  using RoutingGradient = GateGradients<Scalar>;
  /// CV² of Importance and Load.
  using Losses = AuxiliaryLosses<Scalar>;
  /// ∂L/∂W_g and ∂L/∂W_noise.
  using Gradients = NoisyTopKGateGradients<Scalar>;
  /// Prefix of the gate's tensors in MoELayer::tensors(): "gate.gate_weight", "gate.noise_weight".
  static constexpr const char* prefix = "gate.";

  /// gate.route(input, mode, step, routing, token_offset).
  static void route(const Router& gate, ConstMatrixRef<Scalar> input, Mode mode, std::uint64_t step, Routing& routing,
                    std::uint64_t token_offset = 0) {
    gate.route(input, mode, step, routing, token_offset);
  }

  /// auxiliary_losses with ForwardOptions::importance_weight and load_weight.
  static void compute_losses(const Routing& routing, const ForwardOptions& options, Losses& losses) {
    auxiliary_losses(routing, static_cast<Scalar>(options.importance_weight), static_cast<Scalar>(options.load_weight),
                     losses);
  }

  /// auxiliary_losses_backward: adds the gradient of losses.total() to `gradient`.
  static void losses_backward(const Routing& routing, const Losses& losses, RoutingGradient& gradient) {
    auxiliary_losses_backward(routing, losses, gradient);
  }

  /// gate.backward: ADDS ∂L/∂W_g, ∂L/∂W_noise and ∂L/∂x.
  static void backward(const Router& gate, const Routing& routing, ConstMatrixRef<Scalar> input,
                       RoutingGradient& gradient, Gradients& parameter_gradients, MatrixRef<Scalar> d_input) {
    gate.backward(routing, input, gradient, parameter_gradients.gate_weight, parameter_gradients.noise_weight, d_input);
  }

  /// Zero d×E gradients of W_g and W_noise.
  static Gradients make_gradients(const Router& gate) {
    Gradients gradients;
    gradients.gate_weight = Matrix<Scalar>::Zero(gate.input_dim(), gate.num_experts());
    gradients.noise_weight = Matrix<Scalar>::Zero(gate.input_dim(), gate.num_experts());
    return gradients;
  }

  /// Throws std::invalid_argument unless both gradients are d×E.
  static void check_gradients(const Router& gate, Gradients& gradients, const char* function) {
    detail::require_shape(gradients.gate_weight, gate.input_dim(), gate.num_experts(), function, "gradients.gate_weight");
    detail::require_shape(gradients.noise_weight, gate.input_dim(), gate.num_experts(), function,
                          "gradients.noise_weight");
  }

  /// Throws std::invalid_argument unless W_g and W_noise are d×E and the gate's k is the layer's.
  static void check_router(const Router& gate, Index input_dim, Index num_experts, Index k, const char* function) {
    detail::require_shape(gate.gate_weight(), input_dim, num_experts, function, "the gate's gate_weight");
    detail::require_shape(gate.noise_weight(), input_dim, num_experts, function, "the gate's noise_weight");
    detail::require(gate.k() == k, function, "the gate has k=", gate.k(), ", the layer k=", k);
  }

  /// Throws std::invalid_argument unless `routing` and `losses` have every shape backward indexes
  /// for `tokens` tokens, every expert id is dispatched and the load statistics are consistent.
  static void check_routing(const Router& gate, const Routing& routing, const Losses& losses, Index tokens,
                            const char* function) {
    const Index experts = gate.num_experts(), k = gate.k();
    detail::require_shape(routing.expert_ids, tokens, k, function, "result.routing.expert_ids");
    detail::require_shape(routing.gates, tokens, k, function, "result.routing.gates");
    detail::require_shape(routing.clean_logits, tokens, experts, function, "result.routing.clean_logits");
    detail::require_shape(routing.noisy_logits, tokens, experts, function, "result.routing.noisy_logits");
    const Index noise_rows = routing.noisy() ? tokens : 0, noise_cols = routing.noisy() ? experts : 0;
    detail::require_shape(routing.noise, noise_rows, noise_cols, function, "result.routing.noise");
    detail::require_shape(routing.raw_noise, noise_rows, noise_cols, function, "result.routing.raw_noise");
    detail::require_shape(routing.noise_scale, noise_rows, noise_cols, function, "result.routing.noise_scale");
    detail::require(losses.importance.size() == experts && losses.load.size() == experts, function,
                    "result.losses must have ", experts, " importance and load entries, got ", losses.importance.size(),
                    " and ", losses.load.size());
    detail::require(!losses.smooth_load || routing.has_smooth_load(), function,
                    "result.losses uses the smooth load, which the routing does not define");
    bool valid = true;
    for (Index i = 0; valid && i < routing.expert_ids.size(); ++i) {
      valid = routing.expert_ids.data()[i] >= 0;  // the noisy gate dispatches every slot
    }
    detail::require(valid, function, "result.routing.expert_ids holds -1, which the noisy top-k gate never emits");
    if (routing.has_smooth_load()) {
      valid = routing.kth_expert.size() == tokens && routing.next_expert.size() == tokens;
      for (Index token = 0; valid && token < tokens; ++token) {
        valid = routing.kth_expert[token] >= 0 && routing.kth_expert[token] < experts &&
                routing.next_expert[token] >= 0 && routing.next_expert[token] < experts;
      }
      detail::require(valid, function, "result.routing.kth_expert/next_expert are not ", tokens,
                      " expert ids in range");
    }
  }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_LAYER_ROUTER_HPP
