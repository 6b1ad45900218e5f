// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISTRIBUTED_LOSSES_HPP
#define SPARSEMOE_DISTRIBUTED_LOSSES_HPP

/// \file losses.hpp
/// The balance loss and the z-loss of a top-k router over the GLOBAL batch, when every rank of an
/// MPI communicator holds some of its tokens: each rank's per-expert statistics are summed over
/// the ranks (sum_over_ranks), so the values and gradients are those of one process running the
/// concatenated batch. Needs MPI (link sparsemoe::mpi).

#include "../balance_losses.hpp"
#include "../config.hpp"
#include "../router.hpp"
#include "collectives.hpp"

#include <mpi.h>

#include <cmath>
#include <vector>

namespace sparsemoe {

/// \addtogroup distributed
/// @{

/// The loss terms of a top-k router over the global batch (all ranks' tokens), with what their
/// backward needs: balance = α·E·Σ_i f_i·P_i and z = c·(1/T)·Σ_t (logsumexp_i z_ti)², f, P and T
/// taken over every rank's tokens (see balance_loss and z_loss for the terms and variants).
/// Made by distributed_topk_losses; the same on every rank.
template <typename Scalar>
struct DistributedTopKLosses {
  Scalar balance = 0;                  ///< the weighted balance loss of the global batch (0 when its weight is 0)
  Scalar z = 0;                        ///< the weighted z-loss of the global batch (0 when its weight is 0)
  double balance_weight = 0;           ///< α
  double z_weight = 0;                 ///< c
  BalanceLossOptions balance_options;  ///< the balance loss's variant
  Index global_tokens = 0;             ///< T: tokens over all ranks
  /// Sequences over all ranks (BalanceLossOptions::sequence_length > 0; each rank's token count
  /// must then be a multiple of the length, so that no sequence straddles two ranks); 1 otherwise.
  Index global_sequences = 0;
  /// E: slots routed to each expert over all ranks, as the balance loss counts them (only with
  /// sequence_length 0; per-sequence counts are local and recounted by backward).
  Vector<double> global_counts;
  std::vector<double> statistics;      ///< scratch: this rank's statistics, then their sums
  std::vector<double> scratch;         ///< scratch of sum_over_ranks

  /// The auxiliary loss that backward differentiates: balance + z.
  Scalar total() const { return balance + z; }
};

/// Computes into `losses` the balance loss (weight `balance_weight`, variant `balance_options`)
/// and the z-loss (weight `z_weight`) of the batch formed by every rank's `routing`, in rank
/// order. A weight of 0 skips its term. Collective over `comm`: first the argument checks of all
/// ranks agree (a non-finite weight, or a rank whose token count sequence_length does not divide,
/// makes every rank throw std::invalid_argument), then one sum_over_ranks of 3 + 2·E doubles
/// (this rank's token count, sequence count, Σ (logsumexp)² or Σ over its sequences of
/// Σ_i f_i·P_i, slot counts and score sums). The sums over ranks are added in rank order, so
/// the values equal one process's up to the order of the additions (the same bits on every
/// rank). Cost O(T·E) per rank plus the collective.
template <typename Scalar>
void distributed_topk_losses(const TopKRouting<Scalar>& routing, double balance_weight,
                             const BalanceLossOptions& balance_options, double z_weight, MPI_Comm comm,
                             DistributedTopKLosses<Scalar>& losses) {
  const char* function = "sparsemoe::distributed_topk_losses";
  const Index tokens = routing.num_tokens();
  const Index experts = routing.num_experts();
  detail::check_on_all_ranks(comm, function, [&] {
    detail::require_balance_arguments(function, tokens, balance_weight, balance_options);
    detail::require(std::isfinite(z_weight), function, "z_weight must be finite, got ", z_weight);
  });
  losses.balance_weight = balance_weight;
  losses.z_weight = z_weight;
  losses.balance_options = balance_options;
  const Index length = balance_options.sequence_length;
  const double slots = balance_options.counts == BalanceCounts::first_slot ? 1.0 : static_cast<double>(routing.k());
  // [T, sequences, Σ lse², Σ over local sequences of counts·sums/(slots·L²), counts (E), sums (E)]
  std::vector<double>& statistics = losses.statistics;
  statistics.assign(static_cast<std::size_t>(4 + 2 * experts), 0.0);
  statistics[0] = static_cast<double>(tokens);
  statistics[1] = length > 0 ? static_cast<double>(tokens / length) : 0.0;
  if (z_weight != 0.0) statistics[2] = detail::sum_squared_logsumexp(routing);
  Vector<double> counts, sums;
  if (balance_weight != 0.0 && length > 0) {
    for (Index first = 0; first < tokens; first += length) {
      detail::count_balance_slots(routing, balance_options.counts, first, length, counts);
      detail::sum_balance_scores(routing, balance_options.normalize_scores, first, length, sums);
      statistics[3] += counts.dot(sums) / (slots * static_cast<double>(length) * static_cast<double>(length));
    }
  } else if (balance_weight != 0.0) {
    detail::count_balance_slots(routing, balance_options.counts, 0, tokens, counts);
    detail::sum_balance_scores(routing, balance_options.normalize_scores, 0, tokens, sums);
    for (Index e = 0; e < experts; ++e) {
      statistics[static_cast<std::size_t>(4 + e)] = counts[e];
      statistics[static_cast<std::size_t>(4 + experts + e)] = sums[e];
    }
  }
  sum_over_ranks(statistics.data(), static_cast<Index>(statistics.size()), comm, losses.scratch);
  losses.global_tokens = static_cast<Index>(statistics[0]);
  losses.global_sequences = length > 0 ? static_cast<Index>(statistics[1]) : 1;
  const double total_tokens = statistics[0];
  losses.z = z_weight != 0.0 && total_tokens > 0 ? static_cast<Scalar>(z_weight * statistics[2] / total_tokens)
                                                 : Scalar(0);
  losses.global_counts = Eigen::Map<const Vector<double>>(statistics.data() + 4, experts);
  losses.balance = Scalar(0);
  if (balance_weight == 0.0 || total_tokens == 0) return;
  double total = statistics[3];
  if (length == 0) {
    const Eigen::Map<const Vector<double>> global_sums(statistics.data() + 4 + experts, experts);
    total = losses.global_counts.dot(global_sums) / (slots * total_tokens * total_tokens);
  }
  losses.balance = static_cast<Scalar>(balance_weight * static_cast<double>(experts) * total /
                                       static_cast<double>(losses.global_sequences));
}

/// Adds the gradients of losses.total() (both terms, with the weights of the forward) to this
/// rank's `gradient.scores` and `gradient.logits` (T×E each, this rank's tokens): exactly the
/// rows of the gradient that balance_loss_backward and z_loss_backward give one process for the
/// concatenated batch, since they depend on the global batch only through the counts and the
/// token and sequence counts that `losses` holds. Local: no communication. Throws
/// std::invalid_argument when a gradient is not T×E. O(T·E).
template <typename Scalar>
void distributed_topk_losses_backward(const TopKRouting<Scalar>& routing, const DistributedTopKLosses<Scalar>& losses,
                                      TopKRoutingGradient<Scalar>& gradient) {
  const char* function = "sparsemoe::distributed_topk_losses_backward";
  const Index tokens = routing.num_tokens();
  const Index experts = routing.num_experts();
  detail::require_shape(gradient.scores, tokens, experts, function, "gradient.scores");
  detail::require_shape(gradient.logits, tokens, experts, function, "gradient.logits");
  if (tokens == 0 || losses.global_tokens == 0) return;
  if (losses.z_weight != 0.0) {
    detail::add_z_loss_gradient(routing, 2.0 * losses.z_weight / static_cast<double>(losses.global_tokens), gradient);
  }
  if (losses.balance_weight == 0.0) return;
  const BalanceLossOptions& options = losses.balance_options;
  const double slots = options.counts == BalanceCounts::first_slot ? 1.0 : static_cast<double>(routing.k());
  const Index length = options.sequence_length > 0 ? options.sequence_length : losses.global_tokens;
  const double weight = losses.balance_weight * static_cast<double>(experts) /
                        (static_cast<double>(losses.global_sequences) * slots * static_cast<double>(length) *
                         static_cast<double>(length));
  if (options.sequence_length == 0) {
    detail::add_balance_gradient(routing, losses.global_counts, weight, options.normalize_scores, 0, tokens, gradient);
    return;
  }
  Vector<double> counts;
  for (Index first = 0; first < tokens; first += length) {
    detail::count_balance_slots(routing, options.counts, first, length, counts);
    detail::add_balance_gradient(routing, counts, weight, options.normalize_scores, first, length, gradient);
  }
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_DISTRIBUTED_LOSSES_HPP
