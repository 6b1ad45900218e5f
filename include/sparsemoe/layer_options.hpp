// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_LAYER_OPTIONS_HPP
#define SPARSEMOE_LAYER_OPTIONS_HPP

/// \file layer_options.hpp
/// The sizes of an MoELayer (MoEConfig) and the settings of one forward pass (ForwardOptions).

#include "balance_losses.hpp"
#include "config.hpp"
#include "dispatch.hpp"

#include <cstdint>
#include <optional>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Sizes and settings of an MoELayer.
struct MoEConfig {
  Index input_dim = 0;           ///< d: token width (input and output)
  Index hidden_dim = 0;          ///< h: hidden width of each expert
  Index num_experts = 0;         ///< E
  Index k = 0;                   ///< experts per token, 1 ≤ k ≤ E
  double noise_epsilon = 1e-2;   ///< ε added to the noise scale softplus(x·W_noise)
  std::uint64_t seed = 0;        ///< seeds the initial parameters and the training noise
  /// h_s: hidden width of one always-on shared expert added to every token's output
  /// (DeepSeekMoE, Qwen2-MoE; DeepSeek's n shared experts of width I are one of width n·I);
  /// 0 = none. Not scaled by the routed gates or the router's routed scale.
  Index shared_hidden_dim = 0;
  /// Scale the shared expert's output by σ(x·w_shared), w_shared a learned d-vector (Qwen2-MoE's
  /// shared_expert_gate); needs shared_hidden_dim > 0.
  bool shared_expert_gate = false;
};

/// Per-call settings of MoELayer::forward.
struct ForwardOptions {
  /// Training adds gate noise and keeps the cache for backward; evaluation routes on the clean
  /// logits.
  Mode mode = Mode::evaluation;
  /// Index of the training noise sample, < 2^32. Unset (the default), a training-mode forward
  /// takes the layer's next training step (MoELayer::training_step(), which it then advances), so
  /// every call draws fresh noise. Set it to pin the sample, e.g. to replay a step exactly.
  std::optional<std::uint64_t> step;
  /// Keep the cache in evaluation mode too, so that backward differentiates the noise-free routing
  /// (Load is then the hard count, which has no gradient). Training mode always keeps it.
  bool keep_cache = false;
  /// NoisyTopKGate: w_importance of CV(Importance)² (the paper uses 0.1).
  double importance_weight = 0.1;
  /// NoisyTopKGate: w_load of CV(Load)² (the paper uses 0.1).
  double load_weight = 0.1;
  /// Top-k routers (router.hpp): α of the Switch/GShard balance loss α·E·Σ_i f_i·P_i
  /// (balance_loss; 0.01 in Switch, GShard, Mixtral and OLMoE).
  double balance_loss_weight = 0.01;
  /// Top-k routers: how f is counted and over which tokens (balance_loss's variants).
  BalanceLossOptions balance_loss;
  /// Top-k routers: coefficient of the ST-MoE router z-loss (z_loss; OLMoE trains with 0.001).
  double z_loss_weight = 0.0;
  /// Expert capacity (token dropping). Unset (the default): dropless, every dispatched slot gets
  /// a row. Set: each expert takes at most C = max(min_capacity, ⌈(T·k/E)·factor⌉) rows (the
  /// rounding is configurable), keeping the slots that capacity->policy prefers; a dropped slot
  /// contributes 0 to the output and gets no gradient through the expert path, while the
  /// router's record (ids, gates, auxiliary losses) stays as the router made it. Applies in both
  /// modes: leave it unset in evaluation calls for dropless inference. Drop counts are in
  /// result.plan.stats. See CapacityOptions (dispatch.hpp) for the semantics and what other
  /// stacks do. Throws std::invalid_argument (in forward) for a factor ≤ 0 or not finite.
  std::optional<CapacityOptions> capacity;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_LAYER_OPTIONS_HPP
