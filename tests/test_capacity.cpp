// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Expert capacity (token dropping) and routing telemetry (issue 11, items 5 and 6):
//   * expert_capacity against hand-computed values (⌈·⌉ and ⌊·⌋, min_capacity, the cap at T·k,
//     Megatron's binary rounding), and std::invalid_argument naming the value for a factor ≤ 0
//     or not finite (builder, expert_capacity and MoELayer::forward);
//   * build_dispatch_plan with capacity against a naive reference written here from the
//     definitions (per expert, the list of slots that chose it, sorted by the policy's priority
//     with std::sort, the first C kept), over random ids with −1 slots and gates with many ties
//     and NaN, for every policy, rounding and minimum, reusing one plan: drop set, rows,
//     capacity never exceeded, and every telemetry field;
//   * MoELayer with capacity: the router's record (ids, gates, losses) equal to a dropless
//     forward's; the output equal to a naive per-token loop over the kept slots (a token with
//     every slot dropped gets exactly 0); ∂L/∂gate of every dropped slot exactly 0;
//     every gradient by central finite differences in double, the drop set held fixed (softmax
//     router renormalised, so the kept gates still depend on the dropped expert's probability;
//     the noisy top-k gate); bitwise identical results for 1, 2 and 3 threads; backward
//     rejecting a plan whose capacity drops were edited; telemetry against naive counts
//     (GShard: router drops and capacity drops together).
#include "gradient_check.hpp"
#include "planned_reference.hpp"
#include "reference_gate.hpp"
#include "router_reference.hpp"

#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using sparsemoe::CapacityOptions;
using sparsemoe::CapacityRounding;
using sparsemoe::DispatchPlan;
using sparsemoe::DropPolicy;
using sparsemoe::Index;
using sparsemoe::IndexMatrix;
using sparsemoe::Mode;
using MatrixD = sparsemoe::Matrix<double>;
using ExpertD = sparsemoe::Expert<double, sparsemoe::Silu>;
using planned_reference::naive_expert;
using planned_reference::random_matrix;

constexpr DropPolicy all_policies[] = {DropPolicy::by_position, DropPolicy::by_slot_then_position,
                                       DropPolicy::by_probability};

const char* policy_name(DropPolicy policy) {
  switch (policy) {
    case DropPolicy::by_position: return "by_position";
    case DropPolicy::by_slot_then_position: return "by_slot_then_position";
    case DropPolicy::by_probability: return "by_probability";
  }
  return "?";
}

CapacityOptions capacity_options(double factor, DropPolicy policy, CapacityRounding rounding = CapacityRounding::ceil,
                                 Index min_capacity = 0) {
  CapacityOptions options;
  options.factor = factor;
  options.policy = policy;
  options.rounding = rounding;
  options.min_capacity = min_capacity;
  return options;
}

// ---------------------------------------------------------------------------------------------
// The naive reference
// ---------------------------------------------------------------------------------------------

/// What a capacity plan must be, derived from the definitions alone.
struct ReferenceDrops {
  Index capacity = 0;
  std::vector<char> dropped;        // T·k, t·k + j: dropped by capacity
  std::vector<Index> routed;        // E: slots that chose the expert
  std::vector<Index> kept;          // E
  std::vector<Index> dropped_per_expert;
  Index router_dropped = 0;
  Index capacity_dropped = 0;
};

/// C = max(min, round((T·k / E)·f)), capped at T·k.
Index reference_capacity(Index tokens, Index k, Index experts, const CapacityOptions& o) {
  const double mean = static_cast<double>(tokens * k) / static_cast<double>(experts) * o.factor;
  double c = o.rounding == CapacityRounding::ceil ? std::ceil(mean) : std::floor(mean);
  c = std::min(c, static_cast<double>(tokens * k));
  return std::max(static_cast<Index>(c), o.min_capacity);
}

/// Per expert, the slots that chose it sorted by the policy's priority (std::sort on a full
/// key); the first C are kept.
ReferenceDrops reference_drops(const IndexMatrix& ids, const MatrixD& gates, Index experts, const CapacityOptions& o) {
  const Index tokens = ids.rows(), k = ids.cols();
  ReferenceDrops ref;
  ref.capacity = reference_capacity(tokens, k, experts, o);
  ref.dropped.assign(static_cast<std::size_t>(tokens * k), 0);
  ref.routed.assign(static_cast<std::size_t>(experts), 0);
  ref.kept = ref.routed;
  ref.dropped_per_expert = ref.routed;
  for (Index t = 0; t < tokens; ++t)
    for (Index j = 0; j < k; ++j)
      if (ids(t, j) < 0) ++ref.router_dropped;
  for (Index e = 0; e < experts; ++e) {
    std::vector<std::pair<Index, Index>> slots;  // (token, slot)
    for (Index t = 0; t < tokens; ++t)
      for (Index j = 0; j < k; ++j)
        if (ids(t, j) == e) slots.emplace_back(t, j);
    const auto before = [&](const std::pair<Index, Index>& a, const std::pair<Index, Index>& b) {
      switch (o.policy) {
        case DropPolicy::by_position: return a < b;
        case DropPolicy::by_slot_then_position:
          return std::make_pair(a.second, a.first) < std::make_pair(b.second, b.first);
        case DropPolicy::by_probability: {
          const double ga = gates(a.first, a.second), gb = gates(b.first, b.second);
          // Larger first; NaN below every number; equal (or both NaN): earlier token, then slot.
          const int rank_a = std::isnan(ga) ? 1 : 0, rank_b = std::isnan(gb) ? 1 : 0;
          if (rank_a != rank_b) return rank_a < rank_b;
          if (rank_a == 0 && ga != gb) return ga > gb;
          return a < b;
        }
      }
      return false;
    };
    std::sort(slots.begin(), slots.end(), before);
    const auto index = static_cast<std::size_t>(e);
    ref.routed[index] = static_cast<Index>(slots.size());
    for (std::size_t i = 0; i < slots.size(); ++i) {
      if (static_cast<Index>(i) < ref.capacity) {
        ++ref.kept[index];
      } else {
        ref.dropped[static_cast<std::size_t>(slots[i].first * k + slots[i].second)] = 1;
        ++ref.dropped_per_expert[index];
        ++ref.capacity_dropped;
      }
    }
  }
  return ref;
}

/// Checks `plan` against the reference: drop set, rows (kept slots, tokens ascending in each
/// expert), capacity never exceeded, and the telemetry.
::testing::AssertionResult check_capacity_plan(const DispatchPlan& plan, const IndexMatrix& ids, Index experts,
                                               const ReferenceDrops& ref) {
  const Index tokens = ids.rows(), k = ids.cols();
  const auto fail = [] { return ::testing::AssertionFailure(); };
  if (plan.num_tokens != tokens || plan.k != k || plan.num_experts != experts) return fail() << "sizes";
  if (plan.stats.capacity != ref.capacity)
    return fail() << "capacity " << plan.stats.capacity << ", expected " << ref.capacity;
  if (static_cast<Index>(plan.capacity_dropped.size()) != tokens * k || plan.row_of_token_slot.size() != tokens * k)
    return fail() << "per-slot vector sizes";
  Index rows = 0, max_routed = 0, max_rows = 0;
  for (Index e = 0; e < experts; ++e) {
    const auto i = static_cast<std::size_t>(e);
    if (plan.tokens_per_expert[e] > ref.capacity)
      return fail() << "expert " << e << " has " << plan.tokens_per_expert[e] << " rows, capacity " << ref.capacity;
    if (plan.tokens_per_expert[e] != ref.kept[i])
      return fail() << "tokens_per_expert[" << e << "] = " << plan.tokens_per_expert[e] << ", expected " << ref.kept[i];
    if (plan.stats.capacity_dropped_per_expert[e] != ref.dropped_per_expert[i])
      return fail() << "capacity_dropped_per_expert[" << e << "] = " << plan.stats.capacity_dropped_per_expert[e]
                    << ", expected " << ref.dropped_per_expert[i];
    if (plan.offsets[e] != rows) return fail() << "offsets[" << e << "]";
    for (Index t = 0; t < tokens; ++t) {
      for (Index j = 0; j < k; ++j) {
        if (ids(t, j) != e || ref.dropped[static_cast<std::size_t>(t * k + j)]) continue;
        if (plan.token_of_row[rows] != t || plan.slot_of_row[rows] != j || plan.row_of_slot(t, j) != rows)
          return fail() << "row " << rows << " of expert " << e << " is not (" << t << ", " << j << ")";
        ++rows;
      }
    }
    max_routed = std::max(max_routed, ref.routed[i]);
    max_rows = std::max(max_rows, ref.kept[i]);
  }
  if (plan.offsets[experts] != rows || plan.num_rows() != rows) return fail() << "rows " << plan.num_rows();
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) {
      const bool dropped = ref.dropped[static_cast<std::size_t>(t * k + j)] != 0;
      if (plan.dropped_by_capacity(t, j) != dropped)
        return fail() << "(" << t << ", " << j << ") dropped_by_capacity " << plan.dropped_by_capacity(t, j)
                      << ", expected " << dropped;
      if ((dropped || ids(t, j) < 0) && plan.row_of_slot(t, j) != -1)
        return fail() << "(" << t << ", " << j << ") is not dispatched but has row " << plan.row_of_slot(t, j);
    }
  }
  const auto& s = plan.stats;
  if (s.router_dropped_slots != ref.router_dropped || s.capacity_dropped_slots != ref.capacity_dropped ||
      plan.dropped_slots != ref.router_dropped + ref.capacity_dropped)
    return fail() << "drop counts " << s.router_dropped_slots << " + " << s.capacity_dropped_slots << " = "
                  << plan.dropped_slots << ", expected " << ref.router_dropped << " + " << ref.capacity_dropped;
  if (s.max_routed_per_expert != max_routed || s.max_rows_per_expert != max_rows)
    return fail() << "max routed/rows " << s.max_routed_per_expert << "/" << s.max_rows_per_expert << ", expected "
                  << max_routed << "/" << max_rows;
  if (s.mean_rows_per_expert != static_cast<double>(rows) / static_cast<double>(experts))
    return fail() << "mean rows " << s.mean_rows_per_expert;
  return ::testing::AssertionSuccess();
}

/// T×k ids, k distinct experts per token in random order, about one slot in `minus_one_every`
/// replaced by −1 (0: none).
IndexMatrix random_ids(Index tokens, Index experts, Index k, std::mt19937_64& rng, unsigned minus_one_every = 0) {
  IndexMatrix ids(tokens, k);
  std::vector<Index> perm(static_cast<std::size_t>(experts));
  for (Index t = 0; t < tokens; ++t) {
    for (Index e = 0; e < experts; ++e) perm[static_cast<std::size_t>(e)] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (Index j = 0; j < k; ++j) {
      ids(t, j) = perm[static_cast<std::size_t>(j)];
      if (minus_one_every > 0 && rng() % minus_one_every == 0) ids(t, j) = -1;
    }
  }
  return ids;
}

/// Gates from a palette of 5 values (many exact ties) with an occasional NaN.
MatrixD palette_gates(Index tokens, Index k, std::mt19937_64& rng, bool with_nan) {
  const double palette[] = {0.1, 0.25, 0.5, 0.25, 0.75};
  MatrixD gates(tokens, k);
  for (Index i = 0; i < gates.size(); ++i) {
    gates.data()[i] = palette[rng() % 5];
    if (with_nan && rng() % 13 == 0) gates.data()[i] = std::numeric_limits<double>::quiet_NaN();
  }
  return gates;
}

// ---------------------------------------------------------------------------------------------
// expert_capacity and the checks of the options
// ---------------------------------------------------------------------------------------------

TEST(ExpertCapacity, HandComputedValues) {
  const auto c = [](Index t, Index k, Index e, double f, CapacityRounding r = CapacityRounding::ceil, Index min = 0) {
    return sparsemoe::expert_capacity(t, k, e, capacity_options(f, DropPolicy::by_position, r, min));
  };
  EXPECT_EQ(c(10, 2, 4, 1.0), 5);                                  // T·k/E = 5
  EXPECT_EQ(c(10, 2, 4, 1.25), 7);                                 // 6.25 → 7
  EXPECT_EQ(c(10, 2, 4, 1.25, CapacityRounding::floor), 6);        // 6.25 → 6
  EXPECT_EQ(c(10, 2, 4, 1.25, CapacityRounding::ceil, 8), 8);      // minimum
  EXPECT_EQ(c(10, 2, 4, 1.25, CapacityRounding::ceil, 4), 7);      // minimum below C
  EXPECT_EQ(c(10, 1, 3, 1.0), 4);                                  // 3.33 → 4
  EXPECT_EQ(c(10, 1, 3, 1.0, CapacityRounding::floor), 3);
  EXPECT_EQ(c(3, 1, 8, 0.5, CapacityRounding::floor), 0);          // floor may give 0: everything dropped
  EXPECT_EQ(c(3, 1, 8, 0.5, CapacityRounding::floor, 4), 4);
  EXPECT_EQ(c(20, 1, 2, 1.1), 11);    // 10 · 1.1 rounds to 11 exactly
  EXPECT_EQ(c(200, 1, 2, 1.1), 111);  // Megatron too: ceil(100 · 1.1) = ceil(110.00000000000001) = 111
  EXPECT_EQ(c(0, 2, 4, 1.0), 0);
  EXPECT_EQ(c(0, 2, 4, 1.0, CapacityRounding::ceil, 4), 4);
  EXPECT_EQ(c(10, 2, 4, 1e300), 20);                               // capped at T·k
  EXPECT_EQ(c(10, 2, 4, std::numeric_limits<double>::max()), 20);
  EXPECT_EQ(c(1000, 8, 64, 1.0), 125);
  EXPECT_EQ(c(1000, 8, 64, 1.0 + 1e-13), 126);
  EXPECT_EQ(c(1000, 8, 64, 1.0 + 1e-13, CapacityRounding::floor), 125);
}

TEST(ExpertCapacity, UnusableFactorsAreRejectedNamingTheValue) {
  const IndexMatrix ids = IndexMatrix::Zero(4, 1);
  const MatrixD gates = MatrixD::Ones(4, 1);
  struct Bad {
    double factor;
    const char* shown;
  };
  for (const Bad& bad : {Bad{0.0, "got 0"}, Bad{-0.0, "got -0"}, Bad{-1.5, "got -1.5"},
                         Bad{std::numeric_limits<double>::quiet_NaN(), "nan"},
                         Bad{std::numeric_limits<double>::infinity(), "got inf"},
                         Bad{-std::numeric_limits<double>::infinity(), "got -inf"}}) {
    SCOPED_TRACE(bad.shown);
    const CapacityOptions o = capacity_options(bad.factor, DropPolicy::by_position);
    EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, gates, 3, o), "build_dispatch_plan",
                                 "capacity factor", bad.shown);
    EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::expert_capacity(4, 1, 3, o), "expert_capacity", bad.shown);
  }
  CapacityOptions o = capacity_options(1.0, DropPolicy::by_position);
  o.min_capacity = -3;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, gates, 3, o), "min_capacity", "-3");
  o = capacity_options(1.0, static_cast<DropPolicy>(7));
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, gates, 3, o), "drop policy", "7");
  o = capacity_options(1.0, DropPolicy::by_probability);
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, MatrixD::Ones(4, 2), 3, o), "gates", "4x1",
                               "4x2");
  IndexMatrix bad_ids = ids;
  bad_ids(2, 0) = 3;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(bad_ids, gates, 3, o), "expert id 3", "token 2");
}

TEST(ExpertCapacity, ForwardRejectsAnUnusableFactorBeforeAnyWork) {
  sparsemoe::MoELayer<float> layer({/*d*/ 4, /*h*/ 3, /*E*/ 3, /*k*/ 2});
  const sparsemoe::Matrix<float> x = sparsemoe::Matrix<float>::Random(5, 4);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  for (const double factor : {0.0, -2.0, std::numeric_limits<double>::quiet_NaN(),
                              std::numeric_limits<double>::infinity()}) {
    options.capacity = capacity_options(factor, DropPolicy::by_probability);
    const std::uint64_t step = layer.training_step();
    EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x, options), "MoELayer::forward", "capacity factor");
    EXPECT_EQ(layer.training_step(), step) << "a rejected call must not take a training step";
  }
  options.capacity = capacity_options(1.0, DropPolicy::by_probability);
  EXPECT_NO_THROW(layer.forward(x, options));
}

// ---------------------------------------------------------------------------------------------
// build_dispatch_plan with capacity against the naive reference
// ---------------------------------------------------------------------------------------------

TEST(CapacityPlan, MatchesTheNaiveReferenceForEveryPolicy) {
  std::mt19937_64 rng(2026);
  DispatchPlan plan;  // reused across every case: leftovers of a previous plan must not matter
  int cases = 0, cases_with_drops = 0;
  for (const Index tokens : {0, 1, 7, 50, 333}) {
    for (const Index experts : {1, 3, 8}) {
      for (const Index k : {Index{1}, Index{2}, experts}) {
        if (k > experts) continue;
        for (const unsigned minus_one_every : {0u, 5u}) {
          const IndexMatrix ids = random_ids(tokens, experts, k, rng, minus_one_every);
          const MatrixD gates = palette_gates(tokens, k, rng, minus_one_every > 0);
          for (const double factor : {0.1, 0.5, 1.0, 1.25, 3.0}) {
            for (const DropPolicy policy : all_policies) {
              for (const CapacityRounding rounding : {CapacityRounding::ceil, CapacityRounding::floor}) {
                for (const Index min_capacity : {Index{0}, Index{4}}) {
                  const CapacityOptions o = capacity_options(factor, policy, rounding, min_capacity);
                  sparsemoe::build_dispatch_plan(ids, gates, experts, o, plan);
                  const ReferenceDrops ref = reference_drops(ids, gates, experts, o);
                  ASSERT_TRUE(check_capacity_plan(plan, ids, experts, ref))
                      << "T=" << tokens << " E=" << experts << " k=" << k << " -1 every " << minus_one_every
                      << " f=" << factor << " " << policy_name(policy) << " floor=" << (rounding == CapacityRounding::floor)
                      << " min=" << min_capacity;
                  ++cases;
                  cases_with_drops += ref.capacity_dropped > 0;
                }
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(cases_with_drops, cases / 4) << "the cases must exercise drops";
}

TEST(CapacityPlan, PoliciesDifferAsDocumented) {
  // Expert 0 is every token's choice: slot 0 for tokens 0..2, slot 1 for tokens 3..5, C = 3
  // (T·k/E = 6·2/4 = 3). Gates rise with the token.
  IndexMatrix ids(6, 2);
  ids << 0, 1, 0, 2, 0, 3, 1, 0, 2, 0, 3, 0;
  MatrixD gates(6, 2);
  gates << 0.5, 0.5, 0.6, 0.4, 0.7, 0.3, 0.9, 0.8, 0.2, 0.95, 0.1, 0.95;
  const auto kept_tokens_of_expert_0 = [&](DropPolicy policy) {
    const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, gates, 4, capacity_options(1.0, policy));
    std::vector<Index> kept;
    for (Index r = plan.offsets[0]; r < plan.offsets[1]; ++r) kept.push_back(plan.token_of_row[r]);
    return kept;
  };
  // Token order: tokens 0, 1, 2 (all slot 0 here).
  EXPECT_EQ(kept_tokens_of_expert_0(DropPolicy::by_position), (std::vector<Index>{0, 1, 2}));
  // Highest gate: 0.95 (tokens 4 and 5), 0.8 (token 3); listed in token order.
  EXPECT_EQ(kept_tokens_of_expert_0(DropPolicy::by_probability), (std::vector<Index>{3, 4, 5}));
  // With tokens' slot-1 choices before other tokens' slot-0 choices, position and slot-major
  // differ:
  ids << 1, 0, 2, 0, 3, 0, 0, 1, 0, 2, 0, 3;
  const DispatchPlan position = sparsemoe::build_dispatch_plan(ids, gates, 4, capacity_options(1.0, DropPolicy::by_position));
  const DispatchPlan slot_major =
      sparsemoe::build_dispatch_plan(ids, gates, 4, capacity_options(1.0, DropPolicy::by_slot_then_position));
  // Expert 0 is the second choice of tokens 0..2 and the first of tokens 3..5.
  for (Index t = 0; t < 3; ++t) {
    EXPECT_FALSE(position.dropped_by_capacity(t, 1)) << t;   // came first
    EXPECT_TRUE(position.dropped_by_capacity(t + 3, 0)) << t;
    EXPECT_TRUE(slot_major.dropped_by_capacity(t, 1)) << t;  // every first choice beats them
    EXPECT_FALSE(slot_major.dropped_by_capacity(t + 3, 0)) << t;
  }
}

TEST(CapacityPlan, TiesDropTheLaterTokenAndNaNFirst) {
  // Every token picks expert 0 with the same gate, except token 1 with NaN; C = 2.
  IndexMatrix ids = IndexMatrix::Zero(5, 1);
  MatrixD gates = MatrixD::Constant(5, 1, 0.5);
  gates(1, 0) = std::numeric_limits<double>::quiet_NaN();
  const CapacityOptions o = capacity_options(2.0, DropPolicy::by_probability);  // (5/5)·2 = 2 with E = 5
  const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, gates, 5, o);
  EXPECT_EQ(plan.stats.capacity, 2);
  EXPECT_FALSE(plan.dropped_by_capacity(0, 0));
  EXPECT_TRUE(plan.dropped_by_capacity(1, 0));  // NaN ranks last
  EXPECT_FALSE(plan.dropped_by_capacity(2, 0));
  EXPECT_TRUE(plan.dropped_by_capacity(3, 0));  // a tie: the later tokens go
  EXPECT_TRUE(plan.dropped_by_capacity(4, 0));
  // -0 and +0 tie too.
  gates << 0.0, -0.0, 0.0, -0.0, 0.0;
  const DispatchPlan zeros = sparsemoe::build_dispatch_plan(ids, gates, 5, o);
  for (Index t = 0; t < 5; ++t) EXPECT_EQ(zeros.dropped_by_capacity(t, 0), t >= 2) << t;
}

TEST(CapacityPlan, RepeatedIdWithinATokenKeepsSlotOrder) {
  // Not produced by the routers, accepted by the plan: the earlier slot wins a tie.
  IndexMatrix ids(3, 2);
  ids << 1, 1, 0, 1, 1, 0;
  const MatrixD gates = MatrixD::Constant(3, 2, 0.5);
  for (const DropPolicy policy : all_policies) {
    SCOPED_TRACE(policy_name(policy));
    const CapacityOptions o = capacity_options(0.5, policy);  // (6/2)·0.5 = 1.5 → 2
    const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, gates, 2, o);
    EXPECT_TRUE(check_capacity_plan(plan, ids, 2, reference_drops(ids, gates, 2, o)));
    EXPECT_EQ(plan.tokens_per_expert[1], 2);
  }
}

TEST(CapacityPlan, LargeCapacityEqualsTheDroplessPlan) {
  std::mt19937_64 rng(7);
  const IndexMatrix ids = random_ids(200, 8, 3, rng, 6);
  const MatrixD gates = palette_gates(200, 3, rng, false);
  const DispatchPlan dropless = sparsemoe::build_dispatch_plan(ids, 8);
  EXPECT_EQ(dropless.stats.capacity, -1);
  EXPECT_EQ(dropless.stats.capacity_dropped_slots, 0);
  for (const DropPolicy policy : all_policies) {
    const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, gates, 8, capacity_options(8.0, policy));
    EXPECT_EQ(plan.stats.capacity, 200 * 3);
    EXPECT_EQ(plan.stats.capacity_dropped_slots, 0);
    EXPECT_EQ(plan.token_of_row, dropless.token_of_row);
    EXPECT_EQ(plan.slot_of_row, dropless.slot_of_row);
    EXPECT_EQ(plan.row_of_token_slot, dropless.row_of_token_slot);
    EXPECT_EQ(plan.dropped_slots, dropless.dropped_slots);
  }
}

// ---------------------------------------------------------------------------------------------
// MoELayer with capacity
// ---------------------------------------------------------------------------------------------

sparsemoe::MoEConfig layer_config(Index d, Index h, Index experts, Index k, std::uint64_t seed) {
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = experts;
  config.k = k;
  config.seed = seed;
  return config;
}



sparsemoe::SoftmaxTopKRouter<double> renormalised_router(Index d, Index experts, Index k, std::uint64_t seed) {
  sparsemoe::SoftmaxTopKRouterOptions o;
  o.k = k;
  o.normalize_top_k = true;
  o.scale = 1.5;
  sparsemoe::SoftmaxTopKRouter<double> router(d, experts, o);
  router.initialize_uniform(seed);
  return router;
}

using SoftmaxLayer = sparsemoe::MoELayer<double, ExpertD, sparsemoe::SoftmaxTopKRouter<double>>;

TEST(LayerWithCapacity, RouterRecordUnchangedAndDroppedSlotsContributeExactlyZero) {
  const Index d = 6, h = 5, experts = 4, k = 2, tokens = 64;
  SoftmaxLayer layer(layer_config(d, h, experts, k, 3), renormalised_router(d, experts, k, 4));
  const MatrixD x = random_matrix(tokens, d, 5);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.balance_loss_weight = 0.05;
  options.z_loss_weight = 0.01;
  const auto dropless = layer.forward(x, options);
  for (const DropPolicy policy : all_policies) {
    for (const double factor : {0.5, 0.05}) {
      SCOPED_TRACE(std::string(policy_name(policy)) + " factor " + std::to_string(factor));
      options.capacity = capacity_options(factor, policy);
      const auto result = layer.forward(x, options);
      // The router's record is the router's: ids, gates (renormalised over all k) and losses.
      EXPECT_TRUE(router_reference::same(result.routing.gates, dropless.routing.gates));
      EXPECT_EQ(result.routing.expert_ids, dropless.routing.expert_ids);
      EXPECT_EQ(result.losses.total(), dropless.losses.total());
      EXPECT_EQ(result.stats().auxiliary_loss, static_cast<double>(result.losses.total()));
      const ReferenceDrops ref =
          reference_drops(result.routing.expert_ids, result.routing.gates, experts, *options.capacity);
      ASSERT_TRUE(check_capacity_plan(result.plan, result.routing.expert_ids, experts, ref));
      ASSERT_GT(ref.capacity_dropped, 0) << "the test needs drops";
      Index fully_dropped = 0;
      for (Index t = 0; t < tokens; ++t) {
        std::vector<double> y(static_cast<std::size_t>(d), 0.0);
        bool any_kept = false;
        for (Index j = 0; j < k; ++j) {
          if (ref.dropped[static_cast<std::size_t>(t * k + j)]) continue;
          any_kept = true;
          const std::vector<double> out = naive_expert(layer.expert(result.routing.expert_ids(t, j)), x, t);
          for (Index i = 0; i < d; ++i) y[static_cast<std::size_t>(i)] += result.routing.gates(t, j) * out[static_cast<std::size_t>(i)];
        }
        for (Index i = 0; i < d; ++i) EXPECT_NEAR(result.output(t, i), y[static_cast<std::size_t>(i)], 1e-12) << t;
        if (!any_kept) {
          ++fully_dropped;
          EXPECT_TRUE((result.output.row(t).array() == 0.0).all()) << "token " << t << " lost every slot";
        }
      }
      if (factor < 0.1) {
        EXPECT_GT(fully_dropped, 0) << "factor 0.05 leaves tokens without any expert";
      }
    }
  }
}

TEST(LayerWithCapacity, DroppedSlotsGetNoGateGradientFromTheExperts) {
  const Index d = 6, h = 5, experts = 4, k = 2, tokens = 40;
  SoftmaxLayer layer(layer_config(d, h, experts, k, 8), renormalised_router(d, experts, k, 9));
  const MatrixD x = random_matrix(tokens, d, 10);
  const MatrixD d_y = random_matrix(tokens, d, 11);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.balance_loss_weight = 0.1;  // writes ∂/∂scores, never ∂/∂gates
  options.z_loss_weight = 0.01;       // writes ∂/∂logits
  for (const DropPolicy policy : all_policies) {
    SCOPED_TRACE(policy_name(policy));
    options.capacity = capacity_options(0.5, policy);
    SoftmaxLayer::Result result;
    sparsemoe::ForwardWorkspace<double> workspace;
    layer.forward(x, options, result, workspace);
    ASSERT_GT(result.stats().capacity_dropped_slots, 0);
    SoftmaxLayer::BackwardWorkspaceType backward_workspace;
    auto gradients = layer.make_gradients();
    MatrixD d_x;
    layer.backward(result, d_y, gradients, d_x, backward_workspace);
    const MatrixD& d_gates = backward_workspace.routing_gradient.gates;
    Index kept_nonzero = 0;
    for (Index t = 0; t < tokens; ++t) {
      for (Index j = 0; j < k; ++j) {
        if (result.plan.dropped_by_capacity(t, j)) {
          EXPECT_EQ(d_gates(t, j), 0.0) << "dropped (" << t << ", " << j << ")";
        } else {
          kept_nonzero += d_gates(t, j) != 0.0;
        }
      }
    }
    EXPECT_EQ(kept_nonzero, tokens * k - result.stats().capacity_dropped_slots);
  }
}

/// Every gradient of L = Σ(W ⊙ y) + losses.total() against finite differences, with the routing
/// and the drop set held fixed (an input whose perturbations change either is redrawn).
template <typename Layer>
void check_gradients_with_capacity(Layer& layer, const sparsemoe::ForwardOptions& options, Index tokens,
                                   const std::string& label) {
  SCOPED_TRACE(label);
  const Index d = layer.input_dim();
  const MatrixD output_weight = random_matrix(tokens, d, 22);
  bool checked = false;
  for (std::uint64_t attempt = 0; attempt < 30 && !checked; ++attempt) {
    MatrixD x = random_matrix(tokens, d, 200 + attempt);
    const auto result = layer.forward(x, options);
    ASSERT_FALSE(result.cache.empty());
    if (result.stats().capacity_dropped_slots == 0) continue;
    const IndexMatrix ids = result.routing.expert_ids;
    const std::vector<std::uint8_t> dropped = result.plan.capacity_dropped;
    bool decisions_changed = false;
    const auto loss = [&] {
      const auto r = layer.forward(x, options);
      decisions_changed = decisions_changed || r.routing.expert_ids != ids || r.plan.capacity_dropped != dropped;
      return (output_weight.array() * r.output.array()).sum() + r.losses.total();
    };
    auto gradients = layer.make_gradients();
    const MatrixD d_x = layer.backward(result, output_weight, gradients);
    const auto checks = planned_reference::check_every_gradient(layer, loss, x, d_x, gradients);
    if (decisions_changed) continue;  // too close to a routing or drop boundary: another input
    checked = true;
    for (const auto& [name, check] : checks) {
      EXPECT_LT(check.worst_relative_error, 1e-6) << name << ": " << check;
      if (name == "input") {
        EXPECT_GT(check.max_abs_analytic, 1e-4) << name << " gradient is (nearly) zero";
      }
    }
  }
  EXPECT_TRUE(checked) << "no input with drops away from decision boundaries in 30 draws";
}

TEST(LayerWithCapacity, GradientsMatchFiniteDifferencesWithTheDropSetFixed) {
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 3;
  options.balance_loss_weight = 0.1;
  options.z_loss_weight = 0.01;
  for (const DropPolicy policy : all_policies) {
    options.capacity = capacity_options(0.5, policy);  // T·k/E = 12·2/4 = 6 → C = 3
    SoftmaxLayer layer(layer_config(5, 4, 4, 2, 21), renormalised_router(5, 4, 2, 31));
    check_gradients_with_capacity(layer, options, 12, std::string("softmax renormalised, ") + policy_name(policy));
  }
  // The noisy top-k gate (training noise pinned by the step; the smooth load has a gradient).
  sparsemoe::MoELayer<double, ExpertD> noisy(layer_config(5, 4, 4, 2, 23));
  noisy.gate().initialize_uniform(24);
  options.importance_weight = 0.1;
  options.load_weight = 0.1;
  options.capacity = capacity_options(0.5, DropPolicy::by_probability);
  check_gradients_with_capacity(noisy, options, 12, "noisy top-k gate, by_probability");
}

TEST(LayerWithCapacity, BitwiseIdenticalForAnyThreadCount) {
  sparsemoe::SoftmaxTopKRouterOptions o;
  o.k = 4;
  o.normalize_top_k = true;
  sparsemoe::SoftmaxTopKRouter<float> router(32, 16, o);
  router.initialize_uniform(40);
  sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>, sparsemoe::SoftmaxTopKRouter<float>> layer(
      layer_config(32, 48, 16, 4, 41), router);
  const sparsemoe::Matrix<float> x = random_matrix(700, 32, 42).cast<float>();
  const sparsemoe::Matrix<float> d_y = random_matrix(700, 32, 43).cast<float>();
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 1;
  for (const DropPolicy policy : all_policies) {
    SCOPED_TRACE(policy_name(policy));
    options.capacity = capacity_options(0.8, policy);
    std::vector<sparsemoe::Matrix<float>> outputs, d_xs, d_weights;
    std::vector<std::vector<std::uint8_t>> drops;
    for (const int threads : router_reference::thread_counts()) {
      router_reference::ScopedThreads scope(threads);
      const auto result = layer.forward(x, options);
      ASSERT_GT(result.stats().capacity_dropped_slots, 0);
      auto gradients = layer.make_gradients();
      d_xs.push_back(layer.backward(result, d_y, gradients));
      outputs.push_back(result.output);
      d_weights.push_back(gradients.weight);
      drops.push_back(result.plan.capacity_dropped);
    }
    for (std::size_t i = 1; i < outputs.size(); ++i) {
      EXPECT_EQ(drops[i], drops[0]);
      EXPECT_TRUE(router_reference::same(outputs[i], outputs[0]));
      EXPECT_TRUE(router_reference::same(d_xs[i], d_xs[0]));
      EXPECT_TRUE(router_reference::same(d_weights[i], d_weights[0]));
    }
  }
}

TEST(LayerWithCapacity, BackwardRejectsEditedCapacityDrops) {
  SoftmaxLayer layer(layer_config(5, 4, 4, 2, 50), renormalised_router(5, 4, 2, 51));
  const MatrixD x = random_matrix(20, 5, 52);
  const MatrixD d_y = random_matrix(20, 5, 53);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.capacity = capacity_options(0.5, DropPolicy::by_position);
  const auto result = layer.forward(x, options);
  ASSERT_GT(result.stats().capacity_dropped_slots, 0);
  auto gradients = layer.make_gradients();
  EXPECT_NO_THROW(layer.backward(result, d_y, gradients));
  Index dropped_flat = -1, kept_flat = -1;
  for (Index i = 0; i < 40; ++i) {
    if (result.plan.capacity_dropped[static_cast<std::size_t>(i)]) dropped_flat = i;
    else kept_flat = i;
  }
  const auto expect_rejected = [&](auto edit, const char* what) {
    SCOPED_TRACE(what);
    auto edited = result;
    edit(edited);
    EXPECT_INVALID_ARGUMENT_WITH(layer.backward(edited, d_y, gradients), "disagree");
  };
  expect_rejected([&](auto& r) { r.plan.capacity_dropped[static_cast<std::size_t>(dropped_flat)] = 0; },
                  "a dropped slot unmarked");
  expect_rejected([&](auto& r) { r.plan.capacity_dropped[static_cast<std::size_t>(kept_flat)] = 1; },
                  "a kept slot marked dropped");
  expect_rejected([&](auto& r) { ++r.plan.stats.capacity_dropped_slots; }, "capacity drop count");
  expect_rejected([&](auto& r) { ++r.plan.stats.router_dropped_slots; }, "router drop count");
  auto resized = result;
  resized.plan.capacity_dropped.pop_back();
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(resized, d_y, gradients), "result.plan");
}

TEST(LayerWithCapacity, TelemetryMatchesNaiveCounts) {
  // GShard: the router drops second experts (id −1) and capacity drops more.
  sparsemoe::GShardRouterOptions o;
  o.seed = 6;
  sparsemoe::GShardRouter<double> router(5, 6, o);
  router.initialize_uniform(60);
  sparsemoe::MoELayer<double, ExpertD, sparsemoe::GShardRouter<double>> layer(layer_config(5, 4, 6, 2, 61), router);
  const MatrixD x = random_matrix(90, 5, 62);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 2;
  options.balance_loss_weight = 0.02;
  const auto dropless = layer.forward(x, options);
  const IndexMatrix& ids = dropless.routing.expert_ids;
  Index router_dropped = 0;
  std::vector<Index> routed(6, 0);
  for (Index t = 0; t < 90; ++t)
    for (Index j = 0; j < 2; ++j)
      if (ids(t, j) < 0) ++router_dropped;
      else ++routed[static_cast<std::size_t>(ids(t, j))];
  ASSERT_GT(router_dropped, 0);
  const auto& s0 = dropless.stats();
  EXPECT_EQ(s0.capacity, -1);
  EXPECT_EQ(s0.router_dropped_slots, router_dropped);
  EXPECT_EQ(s0.capacity_dropped_slots, 0);
  EXPECT_EQ(s0.capacity_dropped_per_expert, sparsemoe::IndexVector::Zero(6));
  EXPECT_EQ(s0.max_routed_per_expert, *std::max_element(routed.begin(), routed.end()));
  EXPECT_EQ(s0.max_rows_per_expert, s0.max_routed_per_expert);
  EXPECT_EQ(s0.mean_rows_per_expert, static_cast<double>(180 - router_dropped) / 6.0);
  EXPECT_EQ(s0.auxiliary_loss, dropless.losses.total());
  EXPECT_GT(s0.auxiliary_loss, 0.0);
  for (Index e = 0; e < 6; ++e) EXPECT_EQ(dropless.tokens_per_expert()[e], routed[static_cast<std::size_t>(e)]);

  options.capacity = capacity_options(0.75, DropPolicy::by_slot_then_position);  // C = ⌈30·0.75⌉ = 23
  const auto result = layer.forward(x, options);
  ASSERT_EQ(result.routing.expert_ids, ids);
  const ReferenceDrops ref = reference_drops(ids, result.routing.gates, 6, *options.capacity);
  ASSERT_GT(ref.capacity_dropped, 0);
  EXPECT_EQ(ref.capacity, 23);
  EXPECT_TRUE(check_capacity_plan(result.plan, ids, 6, ref));
  const auto& s = result.stats();
  EXPECT_EQ(s.router_dropped_slots, router_dropped);
  EXPECT_EQ(s.capacity_dropped_slots, ref.capacity_dropped);
  EXPECT_EQ(result.plan.dropped_slots, router_dropped + ref.capacity_dropped);
  EXPECT_EQ(result.plan.num_rows(), 180 - router_dropped - ref.capacity_dropped);
  EXPECT_EQ(s.max_routed_per_expert, s0.max_routed_per_expert);
  EXPECT_EQ(s.max_rows_per_expert, 23);
  EXPECT_EQ(s.auxiliary_loss, dropless.losses.total());
  for (Index e = 0; e < 6; ++e) {
    const auto i = static_cast<std::size_t>(e);
    EXPECT_EQ(s.capacity_dropped_per_expert[e], std::max<Index>(routed[i] - 23, 0)) << e;
    EXPECT_EQ(result.tokens_per_expert()[e], std::min<Index>(routed[i], 23)) << e;
  }
  // A training step through the plan with both kinds of drop.
  auto gradients = layer.make_gradients();
  const MatrixD d_x = layer.backward(result, random_matrix(90, 5, 63), gradients);
  EXPECT_TRUE(d_x.allFinite());
}

}  // namespace
