// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_BALANCE_LOSSES_HPP
#define SPARSEMOE_BALANCE_LOSSES_HPP

/// \file balance_losses.hpp
/// Loss terms on a TopKRouting, each a (value, backward) pair of plain functions: the
/// Switch/GShard load-balancing loss with its variants, and the router z-loss of ST-MoE. The
/// backward functions ADD into a TopKRoutingGradient (scores or logits), which the router's
/// backward then carries to its parameters. Sums are accumulated in double, also for float.

#include "config.hpp"
#include "detail/parallel.hpp"
#include "router.hpp"

#include <algorithm>
#include <cmath>

namespace sparsemoe {

/// \addtogroup losses
/// @{

/// Which slots count as "routed to expert i" in the balance loss's f_i.
enum class BalanceCounts {
  all_slots,  ///< every dispatched slot: f_i = (slots on i) / (T·k) (Switch, Megatron)
  first_slot  ///< the first (highest-scoring) slot only: f_i = (tokens whose slot 0 is i) / T (GShard, DeepSpeed top-2)
};

/// Variants of balance_loss.
struct BalanceLossOptions {
  /// How f is counted.
  BalanceCounts counts = BalanceCounts::all_slots;
  /// 0: statistics over the whole batch. L > 0: sequence-wise, the tokens are T/L consecutive
  /// sequences of L rows each; f and P are computed per sequence, and the per-sequence losses
  /// averaged (DeepSeek-V3's complementary loss). T must be a multiple of L.
  Index sequence_length = 0;
  /// Use p'_ti = p_ti / Σ_j p_tj instead of p_ti in P (DeepSeek-V3 normalises its sigmoid
  /// scores this way; for softmax scores it changes only rounding).
  bool normalize_scores = false;
};

/// Scratch of balance_loss and balance_loss_backward (two E-vectors of double), reused across
/// calls: with it, neither allocates when E repeats.
struct BalanceLossWorkspace {
  Vector<double> counts;      ///< E: slots per expert in the current sequence
  Vector<double> score_sums;  ///< E: Σ_t p_ti over the current sequence
};

namespace detail {

/// The argument checks balance_loss and its backward share.
inline void require_balance_arguments(const char* function, Index tokens, double coefficient,
                                      const BalanceLossOptions& options) {
  require(std::isfinite(coefficient), function, "coefficient must be finite, got ", coefficient);
  require(options.sequence_length >= 0, function, "sequence_length must be >= 0, got ", options.sequence_length);
  require(options.sequence_length == 0 || tokens % options.sequence_length == 0, function, "the ", tokens,
          " tokens do not split into sequences of sequence_length = ", options.sequence_length);
}

/// Adds the slots of tokens [first, first + count) to `counts` (E entries, zeroed first).
template <typename Scalar>
void count_balance_slots(const TopKRouting<Scalar>& routing, BalanceCounts mode, Index first, Index count,
                         Vector<double>& counts) {
  counts.setZero(routing.num_experts());
  const Index slots = mode == BalanceCounts::first_slot ? Index(1) : routing.k();
  for (Index token = first; token < first + count; ++token) {
    for (Index slot = 0; slot < slots; ++slot) {
      const Index expert = routing.expert_ids(token, slot);
      if (expert >= 0) counts[expert] += 1.0;
    }
  }
}

/// Σ_j p_tj in double (the normaliser of normalize_scores).
template <typename Scalar>
double score_row_sum(const TopKRouting<Scalar>& routing, Index token) {
  double sum = 0;
  for (Index expert = 0; expert < routing.num_experts(); ++expert) sum += static_cast<double>(routing.scores(token, expert));
  return sum;
}

/// Writes to `sums` (E entries) Σ_t p_ti over tokens [first, first + count), in double (p'_ti =
/// p_ti/Σ_j p_tj with `normalize`): the P_i of the balance loss times the token count.
template <typename Scalar>
void sum_balance_scores(const TopKRouting<Scalar>& routing, bool normalize, Index first, Index count,
                        Vector<double>& sums) {
  const Index experts = routing.num_experts();
  sums.setZero(experts);
  for (Index token = first; token < first + count; ++token) {
    const double normalizer = normalize ? 1.0 / score_row_sum(routing, token) : 1.0;
    for (Index expert = 0; expert < experts; ++expert) {
      sums[expert] += static_cast<double>(routing.scores(token, expert)) * normalizer;
    }
  }
}

/// Adds weight·counts_i (through p' = p/Σp with `normalize`) to gradient.scores(t, i) for the
/// tokens t of [first, first + length): the balance loss's gradient, given the slot counts of
/// the statistics the loss is defined on (its sequence, or the batch across all workers).
template <typename Scalar>
void add_balance_gradient(const TopKRouting<Scalar>& routing, const Vector<double>& counts, double weight,
                          bool normalize, Index first, Index length, TopKRoutingGradient<Scalar>& gradient) {
  const Index experts = routing.num_experts();
  parallel_for(length, static_cast<double>(4 * experts), [&](Index offset) {
    const Index token = first + offset;
    if (!normalize) {
      for (Index expert = 0; expert < experts; ++expert) {
        gradient.scores(token, expert) += static_cast<Scalar>(weight * counts[expert]);
      }
      return;
    }
    const double sum = score_row_sum(routing, token);
    double weighted = 0;
    for (Index expert = 0; expert < experts; ++expert) {
      weighted += counts[expert] * static_cast<double>(routing.scores(token, expert));
    }
    weighted /= sum;
    for (Index expert = 0; expert < experts; ++expert) {
      gradient.scores(token, expert) += static_cast<Scalar>(weight * (counts[expert] - weighted) / sum);
    }
  });
}

}  // namespace detail

/// The Switch/GShard load-balancing loss α·E·Σ_i f_i·P_i, with f_i the fraction of slots routed
/// to expert i (no gradient) and P_i = (1/T)·Σ_t p_ti the mean score (routing.scores, the softmax
/// or sigmoid probabilities). With sequence_length L, the mean over the T/L sequences of the
/// same loss computed on each. Slots with id −1 are not counted (f_i still divides by T·k).
/// Uniform routing (f_i = P_i = 1/E) gives α.
/// \f[ L = \alpha E \sum_{i=1}^{E} f_i P_i, \qquad P_i = \frac{1}{T} \sum_{t=1}^{T} p_{ti} \f]
///
/// Other forms: Megatron's α·E/(k·T²)·Σ_i(Σ_t p_ti)·count_i is this one; Hugging Face Mixtral's
/// divides the counts by T instead of T·k, so its value is k times this one (and it computes the
/// loss once over all layers' logits concatenated: pass such a concatenated routing here).
/// Under expert or data parallelism the statistics must cover the whole batch the loss is
/// defined on (all-reduce counts and score sums), or the value depends on the number of workers.
/// Returns 0 for T = 0. Throws std::invalid_argument for a non-finite coefficient or a T that
/// sequence_length does not divide. O(T·(E + k)); uses `workspace` (no allocation when E repeats).
template <typename Scalar>
Scalar balance_loss(const TopKRouting<Scalar>& routing, double coefficient, const BalanceLossOptions& options,
                    BalanceLossWorkspace& workspace) {
  const char* function = "sparsemoe::balance_loss";
  const Index tokens = routing.num_tokens();
  detail::require_balance_arguments(function, tokens, coefficient, options);
  if (tokens == 0) return Scalar(0);
  const Index experts = routing.num_experts();
  const Index length = options.sequence_length > 0 ? options.sequence_length : tokens;
  const Index sequences = tokens / length;
  const double slots = options.counts == BalanceCounts::first_slot ? 1.0 : static_cast<double>(routing.k());
  double total = 0;
  for (Index sequence = 0; sequence < sequences; ++sequence) {
    const Index first = sequence * length;
    detail::count_balance_slots(routing, options.counts, first, length, workspace.counts);
    detail::sum_balance_scores(routing, options.normalize_scores, first, length, workspace.score_sums);
    // Σ_i f_i·P_i with f_i = count_i/(L·k), P_i = sum_i/L.
    total += workspace.counts.dot(workspace.score_sums) / (slots * static_cast<double>(length) * static_cast<double>(length));
  }
  return static_cast<Scalar>(coefficient * static_cast<double>(experts) * total /
                             static_cast<double>(sequences));
}

/// balance_loss with a workspace of its own (allocates two E-vectors).
template <typename Scalar>
Scalar balance_loss(const TopKRouting<Scalar>& routing, double coefficient, const BalanceLossOptions& options = {}) {
  BalanceLossWorkspace workspace;
  return balance_loss(routing, coefficient, options, workspace);
}

/// Adds the gradient of balance_loss(routing, coefficient, options) to gradient.scores (T×E):
/// ∂L/∂p_ti = α·E·f_i / (S·L) for the token's sequence (S sequences of L tokens; S = 1, L = T
/// over the whole batch); with normalize_scores, through p' = p/Σp:
/// ∂L/∂p_tj = (a_j − Σ_i a_i·p'_ti) / Σ_i p_ti with a = ∂L/∂p'. f has no gradient. Computed in
/// double, added in Scalar. Throws std::invalid_argument as balance_loss does, or when
/// gradient.scores is not T×E. O(T·(E + k)); no allocation when E repeats.
template <typename Scalar>
void balance_loss_backward(const TopKRouting<Scalar>& routing, double coefficient, const BalanceLossOptions& options,
                           TopKRoutingGradient<Scalar>& gradient, BalanceLossWorkspace& workspace) {
  const char* function = "sparsemoe::balance_loss_backward";
  const Index tokens = routing.num_tokens();
  const Index experts = routing.num_experts();
  detail::require_balance_arguments(function, tokens, coefficient, options);
  detail::require_shape(gradient.scores, tokens, experts, function, "gradient.scores");
  if (tokens == 0) return;
  const Index length = options.sequence_length > 0 ? options.sequence_length : tokens;
  const Index sequences = tokens / length;
  const double slots = options.counts == BalanceCounts::first_slot ? 1.0 : static_cast<double>(routing.k());
  // ∂L/∂p'_ti = α·E/S · f_i/L = weight·count_i.
  const double weight = coefficient * static_cast<double>(experts) /
                        (static_cast<double>(sequences) * slots * static_cast<double>(length) * static_cast<double>(length));
  for (Index sequence = 0; sequence < sequences; ++sequence) {
    const Index first = sequence * length;
    detail::count_balance_slots(routing, options.counts, first, length, workspace.counts);
    detail::add_balance_gradient(routing, workspace.counts, weight, options.normalize_scores, first, length, gradient);
  }
}

/// balance_loss_backward with a workspace of its own (allocates two E-vectors).
template <typename Scalar>
void balance_loss_backward(const TopKRouting<Scalar>& routing, double coefficient, const BalanceLossOptions& options,
                           TopKRoutingGradient<Scalar>& gradient) {
  BalanceLossWorkspace workspace;
  balance_loss_backward(routing, coefficient, options, gradient, workspace);
}

namespace detail {

/// log Σ_i e^{z_ti} of one token, in double (max subtracted).
template <typename Scalar>
double logsumexp_row(const Matrix<Scalar>& logits, Index token) {
  const Index experts = logits.cols();
  double top = static_cast<double>(logits(token, 0));
  for (Index expert = 1; expert < experts; ++expert) top = std::max(top, static_cast<double>(logits(token, expert)));
  double sum = 0;
  for (Index expert = 0; expert < experts; ++expert) sum += std::exp(static_cast<double>(logits(token, expert)) - top);
  return top + std::log(sum);
}

/// Σ_t (log Σ_i e^{z_ti})² over all tokens of `routing`, in double, tokens in order.
template <typename Scalar>
double sum_squared_logsumexp(const TopKRouting<Scalar>& routing) {
  double total = 0;
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    const double lse = logsumexp_row(routing.logits, token);
    total += lse * lse;
  }
  return total;
}

/// Adds scale·lse_t·softmax(z_t)_i to gradient.logits(t, i) for every token: the z-loss's
/// gradient with scale = 2·coefficient/T, T the tokens the loss averages over.
template <typename Scalar>
void add_z_loss_gradient(const TopKRouting<Scalar>& routing, double scale, TopKRoutingGradient<Scalar>& gradient) {
  const Index experts = routing.num_experts();
  parallel_for(routing.num_tokens(), static_cast<double>(8 * experts), [&](Index token) {
    const double lse = logsumexp_row(routing.logits, token);
    for (Index expert = 0; expert < experts; ++expert) {
      const double probability = std::exp(static_cast<double>(routing.logits(token, expert)) - lse);
      gradient.logits(token, expert) += static_cast<Scalar>(scale * lse * probability);
    }
  });
}

}  // namespace detail

/// The router z-loss of ST-MoE (Zoph et al.\ 2022): coefficient·(1/T)·Σ_t (log Σ_i e^{z_ti})²
/// over routing.logits (coefficient is typically 1e-3).
/// \f[ L_z = \frac{c}{T} \sum_{t=1}^{T} \Big(\log \sum_{i=1}^{E} e^{z_{ti}}\Big)^2 \f] Returns 0 for T = 0. Throws
/// std::invalid_argument for a non-finite coefficient. O(T·E), in double; no allocation.
template <typename Scalar>
Scalar z_loss(const TopKRouting<Scalar>& routing, double coefficient) {
  const char* function = "sparsemoe::z_loss";
  detail::require(std::isfinite(coefficient), function, "coefficient must be finite, got ", coefficient);
  const Index tokens = routing.num_tokens();
  if (tokens == 0) return Scalar(0);
  return static_cast<Scalar>(coefficient * detail::sum_squared_logsumexp(routing) / static_cast<double>(tokens));
}

/// Adds the gradient of z_loss(routing, coefficient) to gradient.logits (T×E):
/// ∂L/∂z_ti = coefficient·(2/T)·lse_t·softmax(z_t)_i. Computed in double, added in Scalar.
/// Throws std::invalid_argument for a non-finite coefficient or when gradient.logits is not T×E.
/// O(T·E); no allocation.
template <typename Scalar>
void z_loss_backward(const TopKRouting<Scalar>& routing, double coefficient, TopKRoutingGradient<Scalar>& gradient) {
  const char* function = "sparsemoe::z_loss_backward";
  detail::require(std::isfinite(coefficient), function, "coefficient must be finite, got ", coefficient);
  const Index tokens = routing.num_tokens();
  const Index experts = routing.num_experts();
  detail::require_shape(gradient.logits, tokens, experts, function, "gradient.logits");
  if (tokens == 0) return;
  detail::add_z_loss_gradient(routing, 2.0 * coefficient / static_cast<double>(tokens), gradient);
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_BALANCE_LOSSES_HPP
