// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTING_HPP
#define SPARSEMOE_ROUTING_HPP

/// \file routing.hpp
/// Top-k selection over one token's logits, and the dispatch plan that groups the tokens of each
/// expert into one contiguous block of rows.

#include "config.hpp"

#include <cmath>

namespace sparsemoe {

/// \addtogroup dispatch
/// @{

namespace detail {

/// Strict ranking used by top-k: a larger value ranks first; NaN ranks below every number
/// (−∞ included), so NaN never displaces a number and ids stay valid and distinct. Equal values
/// (and two NaNs) do not rank before each other: with candidates scanned in increasing index,
/// ties go to the lower index.
template <typename Scalar>
bool ranks_before(Scalar candidate, Scalar incumbent) {
  if (std::isnan(candidate)) return false;
  if (std::isnan(incumbent)) return true;
  return candidate > incumbent;
}

/// Writes to ids[0..count) the indices of the `count` largest of values[0..size), largest first,
/// ties to the lower index, NaN last. O(size·count); no allocation. Requires count ≤ size.
template <typename Scalar>
void select_top(const Scalar* values, Index size, Index count, Index* ids) {
  SPARSEMOE_ASSERT(count <= size);
  if (count == 0) return;
  Index filled = 0;
  for (Index candidate = 0; candidate < size; ++candidate) {
    const Scalar value = values[candidate];
    if (filled == count && !ranks_before(value, values[ids[count - 1]])) continue;
    Index position = filled < count ? filled++ : count - 1;
    while (position > 0 && ranks_before(value, values[ids[position - 1]])) {
      ids[position] = ids[position - 1];
      --position;
    }
    ids[position] = candidate;
  }
}

}  // namespace detail

/// Which grouped rows belong to which expert, built by a stable counting sort of the routing.
///
/// Grouped row r (0 ≤ r < num_rows()) holds token `token_of_row[r]` as its slot `slot_of_row[r]`
/// (the position of the expert in that token's top-k list). Expert e owns rows
/// [offsets[e], offsets[e+1]); inside it, tokens are in ascending order. `row_of_slot(t, j)` is
/// the inverse: the grouped row of token t's j-th choice, or −1 for a slot that is not
/// dispatched (expert id −1, e.g. GShard's dropped second expert): such a slot has no row,
/// contributes nothing to the output and gets no gradient.
struct DispatchPlan {
  Index num_tokens = 0;           ///< T
  Index num_experts = 0;          ///< E
  Index k = 0;                    ///< slots per token
  Index rows = 0;                 ///< dispatched slots: T·k − dropped_slots
  Index dropped_slots = 0;        ///< slots with expert id −1
  IndexVector tokens_per_expert;  ///< E: rows owned by each expert
  IndexVector offsets;            ///< E+1: first row of each expert, offsets[E] = rows
  IndexVector token_of_row;       ///< rows: token of each grouped row
  IndexVector slot_of_row;        ///< rows: slot (0..k-1) of each grouped row
  IndexVector row_of_token_slot;  ///< T·k: grouped row of (token t, slot j) at index t·k + j; −1: not dispatched

  /// Number of grouped rows (dispatched slots), T·k when nothing is dropped.
  Index num_rows() const { return rows; }
  /// Grouped row of token `token`'s `slot`-th choice, −1 if that slot is not dispatched.
  Index row_of_slot(Index token, Index slot) const { return row_of_token_slot[token * k + slot]; }
};

/// Builds into `plan` the dispatch plan of a T×k matrix of expert ids (each in [0, num_experts),
/// or −1 for a slot that is not dispatched) by counting sort: O(T·k + E) time, stable (tokens
/// ascending inside each expert). Reuses the plan's storage: no allocation when the shapes are
/// those of the previous call. Throws std::invalid_argument for an id out of range.
inline void build_dispatch_plan(const IndexMatrix& expert_ids, Index num_experts, DispatchPlan& plan) {
  const char* function = "sparsemoe::build_dispatch_plan";
  detail::require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
  plan.num_tokens = expert_ids.rows();
  plan.num_experts = num_experts;
  plan.k = expert_ids.cols();
  plan.tokens_per_expert.setZero(num_experts);
  plan.dropped_slots = 0;
  for (Index token = 0; token < plan.num_tokens; ++token) {
    for (Index slot = 0; slot < plan.k; ++slot) {
      const Index expert = expert_ids(token, slot);
      detail::require(expert >= -1 && expert < num_experts, function, "expert id ", expert, " of token ", token,
                      " is outside [0, ", num_experts, ") and is not -1 (not dispatched)");
      if (expert < 0) {
        ++plan.dropped_slots;
      } else {
        ++plan.tokens_per_expert[expert];
      }
    }
  }
  plan.rows = plan.num_tokens * plan.k - plan.dropped_slots;
  const Index rows = plan.rows;
  // offsets[e + 1] first serves as the cursor of expert e, ending at the end of e's block.
  plan.offsets.resize(num_experts + 1);
  plan.offsets[0] = 0;
  plan.offsets[1] = 0;
  for (Index expert = 1; expert < num_experts; ++expert) {
    plan.offsets[expert + 1] = plan.offsets[expert] + plan.tokens_per_expert[expert - 1];
  }
  plan.token_of_row.resize(rows);
  plan.slot_of_row.resize(rows);
  plan.row_of_token_slot.resize(plan.num_tokens * plan.k);
  for (Index token = 0; token < plan.num_tokens; ++token) {
    for (Index slot = 0; slot < plan.k; ++slot) {
      const Index expert = expert_ids(token, slot);
      if (expert < 0) {
        plan.row_of_token_slot[token * plan.k + slot] = -1;
        continue;
      }
      const Index row = plan.offsets[expert + 1]++;
      plan.token_of_row[row] = token;
      plan.slot_of_row[row] = slot;
      plan.row_of_token_slot[token * plan.k + slot] = row;
    }
  }
  SPARSEMOE_ASSERT(plan.offsets[num_experts] == rows);
}

/// Builds and returns the dispatch plan of `expert_ids` (see the overload above).
inline DispatchPlan build_dispatch_plan(const IndexMatrix& expert_ids, Index num_experts) {
  DispatchPlan plan;
  build_dispatch_plan(expert_ids, num_experts, plan);
  return plan;
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTING_HPP
