// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISPATCH_HPP
#define SPARSEMOE_DISPATCH_HPP

/// \file dispatch.hpp
/// Top-k selection over one token's logits, and the dispatch plan that groups the tokens of each
/// expert into one contiguous block of rows, optionally under an expert capacity (token
/// dropping, CapacityOptions), with its routing telemetry (RoutingStats).

#include "config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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

/// How an expert capacity is rounded from capacity_factor·T·k/E (CapacityOptions::rounding).
enum class CapacityRounding {
  ceil,   ///< ⌈·⌉: Megatron-LM (get_capacity) and DeepSpeed (_capacity); the default
  floor,  ///< ⌊·⌋: implementations that truncate with int(·)
};

/// Which of the slots that chose an expert the expert keeps when more than C of them did
/// (CapacityOptions::policy). Every policy keeps min(routed, C) slots of each expert; they differ
/// only in which ones.
enum class DropPolicy {
  /// First come, first served in token order: expert e keeps the first C slots that chose it,
  /// scanning tokens ascending (slots ascending within a token, which only matters for a plan of
  /// hand-made ids that name one expert twice in a token). A token's slot index plays no part:
  /// token 3's second choice beats token 9's first choice. This is Megatron-LM's "position"
  /// policy (a cumulative count over tokens; Megatron's own tie order comes from torch.topk and is
  /// not promised), DeepSpeed's top-k gating with drop_policy "position", and, with k = 1,
  /// Switch Transformer's. The default.
  by_position,
  /// Slot-major first come, first served: every token's slot 0 before any token's slot 1, and so
  /// on; token order within one slot. This is GShard's and DeepSpeed's top-2 gating (the second
  /// choices' positions start after all first choices), which protects every token's first
  /// choice. With k = 1 it equals by_position.
  by_slot_then_position,
  /// Highest gate weight first: expert e keeps the C slots with the largest combine weight
  /// (routing.gates(t, j), after any renormalisation and scaling, as the router made it) and
  /// drops the lowest first. Ties (equal weights) drop the later token first (for one token,
  /// the later slot), and NaN weights rank below every number, so the drop set is a function of
  /// the routing alone, deterministic on every platform. This is Megatron-LM's "probs" policy
  /// (its default, with torch.topk's unspecified tie order); V-MoE's batch-prioritized routing
  /// is similar in spirit (it orders tokens by their top-1 weight).
  by_probability,
};

/// Expert capacity: at most C grouped rows per expert, the excess slots dropped (token dropping).
/// Dropless (no capacity) is the default of every call: pass CapacityOptions only to cap.
///
/// C = max(min_capacity, round(factor · T·k / E)), evaluated in double as (T·k / E)·factor, the
/// order of Megatron-LM's get_capacity, then rounded by `rounding` (⌈·⌉ by default, Megatron's
/// rounding). T·k counts every slot, including those the router did not dispatch (id −1), as
/// Megatron counts num_tokens·topk. Binary rounding applies: factor 1.1 with T·k/E = 100 gives
/// C = 111, since the double product is 110.00000000000001 (1.1 is stored slightly above 1.1),
/// exactly as in Megatron; factors that are exact in binary (1.25, 1.5, 2) never do this. Values above T·k
/// are capped at T·k (no expert can receive more), which changes no drop.
///
/// What other stacks use, for comparison: Megatron-LM ⌈(T·k/E)·f⌉ with no minimum unless
/// min_capacity is given; DeepSpeed ⌈(T/E)·f·k⌉ with min_capacity (default 4); the Switch
/// Transformer paper (T/E)·f without a stated rounding, and many ports truncate with int(·)
/// (CapacityRounding::floor), some with a minimum such as 4 (min_capacity = 4). GShard's
/// top-2 uses C = 2·T/E, i.e. factor 1 with k = 2 here.
///
/// A dropped (token, slot) gets no grouped row: row_of_slot(t, j) == −1, it contributes 0 to the
/// output and receives no gradient through the expert path (∂L/∂gate of that slot gets nothing
/// from the expert output, nor does the expert or the token's input through that slot). The
/// ROUTER's record is not edited: expert_ids and gates stay as the router made them, so the
/// other slots keep their gate values (a renormalised top-k keeps its denominator over all k
/// chosen experts, and the kept gates still depend on the dropped expert's probability), and
/// the auxiliary losses (balance, z, importance/load) see the routing before capacity, as
/// Megatron's do. The token's missing share is the residual path's business, outside the layer.
struct CapacityOptions {
  /// f > 0 and finite (std::invalid_argument otherwise). 1.0 makes C the mean load T·k/E
  /// (rounded); the Switch Transformer paper trains with 1.0–2.0, GShard's 2·T/E is 1.0 here with k = 2.
  double factor = 1.0;
  /// Which slots an over-full expert keeps.
  DropPolicy policy = DropPolicy::by_position;
  /// How factor·T·k/E is rounded.
  CapacityRounding rounding = CapacityRounding::ceil;
  /// Lower bound of C (≥ 0); 0 (the default) sets none, as Megatron; DeepSpeed uses 4.
  Index min_capacity = 0;
};

/// Routing telemetry of one dispatch plan, filled by build_dispatch_plan at no extra pass
/// (O(E) on top of the plan), and by MoELayer::forward with the loss total.
struct RoutingStats {
  /// C, the rows each expert may take; −1 when the plan is dropless.
  Index capacity = -1;
  /// max over experts of the slots that chose the expert, before capacity (what a dropless plan
  /// would give it). (max_routed_per_expert · E) / (T·k) is the smallest factor that drops
  /// nothing with CapacityRounding::ceil.
  Index max_routed_per_expert = 0;
  /// max over experts of tokens_per_expert (rows after capacity).
  Index max_rows_per_expert = 0;
  /// rows / E: grouped rows per expert on average (after capacity).
  double mean_rows_per_expert = 0;
  /// Slots the router did not dispatch (expert id −1, e.g. GShard's dropped second expert).
  Index router_dropped_slots = 0;
  /// Slots that chose an expert but were dropped because it was full.
  Index capacity_dropped_slots = 0;
  /// E: capacity_dropped_slots per expert (all 0 when dropless).
  IndexVector capacity_dropped_per_expert;
  /// losses.total() of the forward that built the plan, in double (MoELayer::forward sets it;
  /// build_dispatch_plan alone leaves 0). The terms are in ForwardResult::losses.
  double auxiliary_loss = 0;
};

/// Which grouped rows belong to which expert, built by a stable counting sort of the routing.
///
/// Grouped row r (0 ≤ r < num_rows()) holds token `token_of_row[r]` as its slot `slot_of_row[r]`
/// (the position of the expert in that token's top-k list). Expert e owns rows
/// [offsets[e], offsets[e+1]); inside it, tokens are in ascending order. `row_of_slot(t, j)` is
/// the inverse: the grouped row of token t's j-th choice, or −1 for a slot that is not
/// dispatched: either the router did not dispatch it (expert id −1, e.g. GShard's dropped second
/// expert) or its expert was full (CapacityOptions; then dropped_by_capacity(t, j) is true).
/// Such a slot has no row, contributes nothing to the output and gets no gradient through the
/// expert path.
struct DispatchPlan {
  Index num_tokens = 0;           ///< T
  Index num_experts = 0;          ///< E
  Index k = 0;                    ///< slots per token
  Index rows = 0;                 ///< dispatched slots: T·k − dropped_slots
  /// Slots without a row: not dispatched by the router (id −1) plus dropped by capacity
  /// (stats.router_dropped_slots + stats.capacity_dropped_slots).
  Index dropped_slots = 0;
  IndexVector tokens_per_expert;  ///< E: rows owned by each expert (after capacity: ≤ C)
  IndexVector offsets;            ///< E+1: first row of each expert, offsets[E] = rows
  IndexVector token_of_row;       ///< rows: token of each grouped row
  IndexVector slot_of_row;        ///< rows: slot (0..k-1) of each grouped row
  IndexVector row_of_token_slot;  ///< T·k: grouped row of (token t, slot j) at index t·k + j; −1: not dispatched
  /// T·k: 1 where (token t, slot j), at index t·k + j, chose an expert (id ≥ 0) but was dropped
  /// because the expert was full; 0 elsewhere (all 0 when dropless).
  std::vector<std::uint8_t> capacity_dropped;
  RoutingStats stats;             ///< telemetry (see RoutingStats)
  /// Scratch of DropPolicy::by_probability (T·k), kept for reuse; no meaning outside the builder.
  IndexVector capacity_scratch;

  /// Number of grouped rows (dispatched slots), T·k when nothing is dropped.
  Index num_rows() const { return rows; }
  /// Grouped row of token `token`'s `slot`-th choice, −1 if that slot is not dispatched.
  Index row_of_slot(Index token, Index slot) const { return row_of_token_slot[token * k + slot]; }
  /// Whether token `token`'s `slot`-th choice was dropped because its expert was full.
  bool dropped_by_capacity(Index token, Index slot) const {
    return capacity_dropped[static_cast<std::size_t>(token * k + slot)] != 0;
  }
};

namespace detail {

/// Throws std::invalid_argument (naming `function` and the value) unless `capacity` is usable:
/// factor finite and > 0, min_capacity ≥ 0, policy and rounding among the enumerators.
inline void check_capacity_options(const CapacityOptions& capacity, const char* function) {
  require(std::isfinite(capacity.factor) && capacity.factor > 0.0, function,
          "the capacity factor must be finite and > 0 (leave ForwardOptions::capacity unset for dropless "
          "routing), got ",
          capacity.factor);
  require(capacity.min_capacity >= 0, function, "min_capacity must be >= 0, got ", capacity.min_capacity);
  const auto policy = static_cast<int>(capacity.policy);
  require(policy >= 0 && policy <= static_cast<int>(DropPolicy::by_probability), function,
          "unknown drop policy ", policy);
  const auto rounding = static_cast<int>(capacity.rounding);
  require(rounding >= 0 && rounding <= static_cast<int>(CapacityRounding::floor), function,
          "unknown capacity rounding ", rounding);
}

/// First pass of every plan: sizes, the check of the ids, and the slots that chose each expert
/// (into plan.tokens_per_expert) and that the router did not dispatch. O(T·k + E).
inline void count_routed_slots(const IndexMatrix& expert_ids, Index num_experts, DispatchPlan& plan,
                               const char* function) {
  require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
  plan.num_tokens = expert_ids.rows();
  plan.num_experts = num_experts;
  plan.k = expert_ids.cols();
  plan.tokens_per_expert.setZero(num_experts);
  plan.stats.router_dropped_slots = 0;
  for (Index token = 0; token < plan.num_tokens; ++token) {
    for (Index slot = 0; slot < plan.k; ++slot) {
      const Index expert = expert_ids(token, slot);
      require(expert >= -1 && expert < num_experts, function, "expert id ", expert, " of token ", token,
              " is outside [0, ", num_experts, ") and is not -1 (not dispatched)");
      if (expert < 0) {
        ++plan.stats.router_dropped_slots;
      } else {
        ++plan.tokens_per_expert[expert];
      }
    }
  }
  plan.stats.max_routed_per_expert = plan.tokens_per_expert.maxCoeff();
  plan.stats.capacity_dropped_per_expert.setZero(num_experts);
  plan.stats.capacity_dropped_slots = 0;
  plan.stats.auxiliary_loss = 0;
  plan.capacity_dropped.assign(static_cast<std::size_t>(plan.num_tokens * plan.k), 0);
}

/// Last pass: grouped rows from plan.tokens_per_expert (rows kept per expert) and
/// plan.capacity_dropped, tokens ascending inside each expert; then the stats. O(T·k + E).
inline void place_rows(const IndexMatrix& expert_ids, DispatchPlan& plan) {
  const Index num_experts = plan.num_experts, k = plan.k;
  plan.dropped_slots = plan.stats.router_dropped_slots + plan.stats.capacity_dropped_slots;
  plan.rows = plan.num_tokens * k - plan.dropped_slots;
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
  plan.row_of_token_slot.resize(plan.num_tokens * k);
  for (Index token = 0; token < plan.num_tokens; ++token) {
    for (Index slot = 0; slot < k; ++slot) {
      const Index flat = token * k + slot;
      const Index expert = expert_ids(token, slot);
      if (expert < 0 || plan.capacity_dropped[static_cast<std::size_t>(flat)] != 0) {
        plan.row_of_token_slot[flat] = -1;
        continue;
      }
      const Index row = plan.offsets[expert + 1]++;
      plan.token_of_row[row] = token;
      plan.slot_of_row[row] = slot;
      plan.row_of_token_slot[flat] = row;
    }
  }
  SPARSEMOE_ASSERT(plan.offsets[num_experts] == rows);
  plan.stats.max_rows_per_expert = plan.tokens_per_expert.maxCoeff();
  plan.stats.mean_rows_per_expert = static_cast<double>(rows) / static_cast<double>(num_experts);
}

/// Marks the slot at flat index `flat` (expert `expert`) as dropped by capacity.
inline void drop_by_capacity(DispatchPlan& plan, Index flat, Index expert) {
  plan.capacity_dropped[static_cast<std::size_t>(flat)] = 1;
  ++plan.stats.capacity_dropped_per_expert[expert];
  ++plan.stats.capacity_dropped_slots;
}

}  // namespace detail

/// The expert capacity C of CapacityOptions for T tokens, k slots each and E experts:
/// max(min_capacity, round((T·k / E)·factor)), capped at T·k (see CapacityOptions for the
/// rounding and what other stacks do). Throws std::invalid_argument for a factor ≤ 0 or not
/// finite, a negative min_capacity, E < 1 or negative T or k. O(1).
inline Index expert_capacity(Index num_tokens, Index k, Index num_experts, const CapacityOptions& capacity) {
  const char* function = "sparsemoe::expert_capacity";
  detail::check_capacity_options(capacity, function);
  detail::require(num_experts >= 1 && num_tokens >= 0 && k >= 0, function,
                  "needs T >= 0, k >= 0 and E >= 1, got T = ", num_tokens, ", k = ", k, ", E = ", num_experts);
  const Index slots = num_tokens * k;
  const double mean = (static_cast<double>(slots) / static_cast<double>(num_experts)) * capacity.factor;
  const double rounded = capacity.rounding == CapacityRounding::ceil ? std::ceil(mean) : std::floor(mean);
  const Index value = rounded >= static_cast<double>(slots) ? slots : static_cast<Index>(rounded);
  return std::max(value, capacity.min_capacity);
}

/// Builds into `plan` the dispatch plan of a T×k matrix of expert ids (each in [0, num_experts),
/// or −1 for a slot that is not dispatched) by counting sort: O(T·k + E) time, stable (tokens
/// ascending inside each expert). Dropless: every slot with an id gets a row. Reuses the plan's
/// storage: no allocation when the shapes (and the number of rows) are those of the previous
/// call. Throws std::invalid_argument for an id out of range or num_experts < 1.
inline void build_dispatch_plan(const IndexMatrix& expert_ids, Index num_experts, DispatchPlan& plan) {
  detail::count_routed_slots(expert_ids, num_experts, plan, "sparsemoe::build_dispatch_plan");
  plan.stats.capacity = -1;
  detail::place_rows(expert_ids, plan);
}

/// Builds into `plan` the dispatch plan of `expert_ids` (as the overload above) under an expert
/// capacity: each expert keeps at most C = expert_capacity(T, k, E, capacity) of the slots that
/// chose it, chosen by capacity.policy (DropPolicy); the others are dropped (row −1,
/// plan.dropped_by_capacity(t, j), counted per expert in plan.stats). `gates` (T×k, the routing's
/// combine weights) is read by DropPolicy::by_probability only, but its shape is always checked.
/// The ids and gates are not modified: see CapacityOptions for what a drop means.
///
/// Cost: O(T·k + E) for the position policies; by_probability adds, per over-full expert with n
/// routed slots, one std::nth_element over them (O(n) on average) under the strict order
/// (gate descending, NaN last, then token and slot ascending). No allocation when the shapes (and
/// the number of rows) are those of the previous call. Throws std::invalid_argument for an id
/// out of range, num_experts < 1, gates of another shape, or unusable capacity options (the
/// message names the value).
template <typename Derived>
void build_dispatch_plan(const IndexMatrix& expert_ids, const Eigen::MatrixBase<Derived>& gates, Index num_experts,
                         const CapacityOptions& capacity, DispatchPlan& plan) {
  const char* function = "sparsemoe::build_dispatch_plan";
  detail::check_capacity_options(capacity, function);
  detail::require_shape(gates, expert_ids.rows(), expert_ids.cols(), function, "gates");
  detail::count_routed_slots(expert_ids, num_experts, plan, function);
  const Index tokens = plan.num_tokens, k = plan.k;
  const Index limit = expert_capacity(tokens, k, num_experts, capacity);
  plan.stats.capacity = limit;
  if (plan.stats.max_routed_per_expert > limit) {
    switch (capacity.policy) {
      case DropPolicy::by_position:
      case DropPolicy::by_slot_then_position: {
        // tokens_per_expert becomes the running count of kept slots.
        plan.tokens_per_expert.setZero();
        const bool slot_major = capacity.policy == DropPolicy::by_slot_then_position;
        const Index outer = slot_major ? k : tokens, inner = slot_major ? tokens : k;
        for (Index i = 0; i < outer; ++i) {
          for (Index j = 0; j < inner; ++j) {
            const Index token = slot_major ? j : i, slot = slot_major ? i : j;
            const Index expert = expert_ids(token, slot);
            if (expert < 0) continue;
            if (plan.tokens_per_expert[expert] < limit) {
              ++plan.tokens_per_expert[expert];
            } else {
              detail::drop_by_capacity(plan, token * k + slot, expert);
            }
          }
        }
        break;
      }
      case DropPolicy::by_probability: {
        // Counting sort of the flat slot indices by expert into the scratch, then per over-full
        // expert the `limit` best by (gate descending, NaN last, flat index ascending).
        IndexVector& order = plan.capacity_scratch;
        order.resize(tokens * k);
        IndexVector& cursor = plan.offsets;  // reused: place_rows recomputes the offsets
        cursor.resize(num_experts + 1);
        cursor[0] = 0;
        for (Index e = 0; e < num_experts; ++e) cursor[e + 1] = cursor[e] + plan.tokens_per_expert[e];
        for (Index flat = 0; flat < tokens * k; ++flat) {
          const Index expert = expert_ids(flat / k, flat % k);
          if (expert >= 0) order[cursor[expert]++] = flat;
        }
        const auto keeps_before = [&](Index a, Index b) {
          const auto ga = gates(a / k, a % k), gb = gates(b / k, b % k);
          const bool a_nan = std::isnan(ga), b_nan = std::isnan(gb);
          if (a_nan != b_nan) return b_nan;
          if (!a_nan && ga != gb) return ga > gb;
          return a < b;
        };
        Index first = 0;
        for (Index e = 0; e < num_experts; ++e) {
          const Index routed = plan.tokens_per_expert[e];
          if (routed > limit) {
            Index* begin = order.data() + first;
            std::nth_element(begin, begin + limit, begin + routed, keeps_before);
            for (Index i = limit; i < routed; ++i) detail::drop_by_capacity(plan, begin[i], e);
            plan.tokens_per_expert[e] = limit;
          }
          first += routed;
        }
        break;
      }
    }
  }
  detail::place_rows(expert_ids, plan);
}

/// Builds and returns the dispatch plan of `expert_ids` (see the overloads above).
inline DispatchPlan build_dispatch_plan(const IndexMatrix& expert_ids, Index num_experts) {
  DispatchPlan plan;
  build_dispatch_plan(expert_ids, num_experts, plan);
  return plan;
}

/// Builds and returns the dispatch plan of `expert_ids` under an expert capacity (see above).
template <typename Derived>
DispatchPlan build_dispatch_plan(const IndexMatrix& expert_ids, const Eigen::MatrixBase<Derived>& gates,
                                 Index num_experts, const CapacityOptions& capacity) {
  DispatchPlan plan;
  build_dispatch_plan(expert_ids, gates, num_experts, capacity, plan);
  return plan;
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_DISPATCH_HPP
