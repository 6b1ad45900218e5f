// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of dispatch.hpp:
//   * detail::select_top against a full std::sort of (value descending, NaN last, index ascending)
//     on random arrays with duplicates, ±inf and NaN;
//   * build_dispatch_plan against a naive reference (for each expert, scan tokens ascending),
//     with the invariants of the plan (offsets are prefix sums, row_of_slot inverts
//     (token_of_row, slot_of_row), tokens ascending inside each expert) and its error checks.
#include <sparsemoe/dispatch.hpp>

#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <vector>

namespace {

using sparsemoe::DispatchPlan;
using sparsemoe::Index;
using sparsemoe::IndexMatrix;

// ---------------------------------------------------------------------------------------------
// select_top
// ---------------------------------------------------------------------------------------------

template <typename Scalar>
class SelectTop : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SelectTop, Scalars, reference::ScalarNames);

// Calls select_top and checks ids[0..count) against the first `count` of a full sort; the
// entries of ids past `count` must stay untouched.
template <typename Scalar>
::testing::AssertionResult select_top_matches_sort(const std::vector<Scalar>& values, Index count) {
  const Index size = static_cast<Index>(values.size());
  constexpr Index sentinel = -12345;
  std::vector<Index> ids(static_cast<std::size_t>(count) + 3, sentinel);
  sparsemoe::detail::select_top(values.data(), size, count, ids.data());
  std::vector<double> as_double(values.begin(), values.end());
  const std::vector<Index> expected = reference::ranking(as_double);
  for (Index j = 0; j < count; ++j) {
    if (ids[static_cast<std::size_t>(j)] != expected[static_cast<std::size_t>(j)]) {
      auto failure = ::testing::AssertionFailure();
      failure << "size " << size << ", count " << count << ": slot " << j << " got id "
              << ids[static_cast<std::size_t>(j)] << ", expected " << expected[static_cast<std::size_t>(j)]
              << "; values:";
      for (double v : as_double) failure << " " << v;
      return failure;
    }
  }
  for (std::size_t j = static_cast<std::size_t>(count); j < ids.size(); ++j) {
    if (ids[j] != sentinel) return ::testing::AssertionFailure() << "wrote past count at " << j;
  }
  return ::testing::AssertionSuccess();
}

TYPED_TEST(SelectTop, MatchesFullSortOnRandomArrays) {
  using Scalar = TypeParam;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> dist(-3, 3);
  for (int trial = 0; trial < 400; ++trial) {
    const Index size = 1 + static_cast<Index>(rng() % 40);
    std::vector<Scalar> values(static_cast<std::size_t>(size));
    for (auto& v : values) v = static_cast<Scalar>(dist(rng));
    for (Index count = 0; count <= size; ++count) {
      ASSERT_TRUE(select_top_matches_sort(values, count)) << "trial " << trial;
    }
  }
}

TYPED_TEST(SelectTop, MatchesFullSortWithDuplicatesInfinitiesAndNaN) {
  using Scalar = TypeParam;
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const std::vector<Scalar> pool{Scalar(0), Scalar(-0.0), Scalar(1), Scalar(1), Scalar(-1), Scalar(2.5),
                                 inf,       -inf,         nan,       std::numeric_limits<Scalar>::max(),
                                 std::numeric_limits<Scalar>::lowest(), std::numeric_limits<Scalar>::denorm_min()};
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 2000; ++trial) {
    const Index size = 1 + static_cast<Index>(rng() % 24);
    std::vector<Scalar> values(static_cast<std::size_t>(size));
    for (auto& v : values) v = pool[rng() % pool.size()];
    for (Index count = 0; count <= size; ++count) {
      ASSERT_TRUE(select_top_matches_sort(values, count)) << "trial " << trial;
    }
  }
}

TYPED_TEST(SelectTop, NaNRanksLastAndIdsStayDistinct) {
  using Scalar = TypeParam;
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  // NaN first, in the middle and last; numbers (−∞ included) must all rank before every NaN.
  const std::vector<Scalar> values{nan, Scalar(3), nan, -inf, Scalar(-7), nan, Scalar(3), nan};
  const Index size = static_cast<Index>(values.size());
  std::vector<Index> ids(values.size());
  sparsemoe::detail::select_top(values.data(), size, size, ids.data());
  const std::vector<Index> expected{1, 6, 4, 3, 0, 2, 5, 7};
  EXPECT_EQ(ids, expected);
  // All NaN: ids are 0..count-1 (ties to the lower index), distinct and in range.
  const std::vector<Scalar> all_nan(9, nan);
  std::vector<Index> nan_ids(5);
  sparsemoe::detail::select_top(all_nan.data(), 9, 5, nan_ids.data());
  EXPECT_EQ(nan_ids, (std::vector<Index>{0, 1, 2, 3, 4}));
}

TYPED_TEST(SelectTop, AllEqualTiesGoToLowerIndex) {
  using Scalar = TypeParam;
  const std::vector<Scalar> values(17, Scalar(0.25));
  for (Index count = 1; count <= 17; ++count) ASSERT_TRUE(select_top_matches_sort(values, count));
}

TYPED_TEST(SelectTop, LargeArrays) {
  using Scalar = TypeParam;
  std::mt19937_64 rng(3);
  for (Index size : {100, 1000, 4096}) {
    std::vector<Scalar> values(static_cast<std::size_t>(size));
    // Few distinct values: many exact ties.
    for (auto& v : values) v = static_cast<Scalar>(static_cast<int>(rng() % 50) - 25);
    for (Index count : {Index{1}, Index{2}, Index{8}, Index{65}, size}) {
      ASSERT_TRUE(select_top_matches_sort(values, count)) << "size " << size;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// build_dispatch_plan
// ---------------------------------------------------------------------------------------------

struct NaiveRow {
  Index token;
  Index slot;
};

// For each expert in order, scan tokens ascending (and slots ascending): the stable grouping.
std::vector<std::vector<NaiveRow>> naive_groups(const IndexMatrix& ids, Index experts) {
  std::vector<std::vector<NaiveRow>> groups(static_cast<std::size_t>(experts));
  for (Index e = 0; e < experts; ++e)
    for (Index t = 0; t < ids.rows(); ++t)
      for (Index j = 0; j < ids.cols(); ++j)
        if (ids(t, j) == e) groups[static_cast<std::size_t>(e)].push_back({t, j});
  return groups;
}

// Checks `plan` (built from `ids`) against the naive reference.
::testing::AssertionResult check_plan(const DispatchPlan& plan, const IndexMatrix& ids, Index experts) {
  const Index tokens = ids.rows();
  const Index k = ids.cols();
  if (plan.num_tokens != tokens || plan.num_experts != experts || plan.k != k || plan.num_rows() != tokens * k)
    return ::testing::AssertionFailure() << "sizes: T=" << plan.num_tokens << " E=" << plan.num_experts
                                         << " k=" << plan.k << " rows=" << plan.num_rows();
  if (plan.tokens_per_expert.size() != experts || plan.offsets.size() != experts + 1 ||
      plan.token_of_row.size() != tokens * k || plan.slot_of_row.size() != tokens * k ||
      plan.row_of_token_slot.size() != tokens * k)
    return ::testing::AssertionFailure() << "vector sizes";
  const auto groups = naive_groups(ids, experts);
  Index row = 0;
  Index running = 0;
  for (Index e = 0; e < experts; ++e) {
    const auto& group = groups[static_cast<std::size_t>(e)];
    const Index count = static_cast<Index>(group.size());
    if (plan.tokens_per_expert[e] != count)
      return ::testing::AssertionFailure() << "tokens_per_expert[" << e << "] = " << plan.tokens_per_expert[e]
                                           << ", expected " << count;
    if (plan.offsets[e] != running)
      return ::testing::AssertionFailure() << "offsets[" << e << "] = " << plan.offsets[e] << ", expected "
                                           << running;
    running += count;
    for (const NaiveRow& expected : group) {
      if (plan.token_of_row[row] != expected.token || plan.slot_of_row[row] != expected.slot)
        return ::testing::AssertionFailure() << "row " << row << " (expert " << e << "): (token, slot) = ("
                                             << plan.token_of_row[row] << ", " << plan.slot_of_row[row]
                                             << "), expected (" << expected.token << ", " << expected.slot << ")";
      ++row;
    }
  }
  if (plan.offsets[experts] != tokens * k)
    return ::testing::AssertionFailure() << "offsets[E] = " << plan.offsets[experts] << ", expected " << tokens * k;
  // row_of_slot inverts (token_of_row, slot_of_row), and every (token, slot) is covered once.
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) {
      const Index r = plan.row_of_slot(t, j);
      if (r < 0 || r >= tokens * k) return ::testing::AssertionFailure() << "row_of_slot out of range";
      if (plan.token_of_row[r] != t || plan.slot_of_row[r] != j)
        return ::testing::AssertionFailure() << "row_of_slot(" << t << ", " << j << ") = " << r
                                             << " maps back to (" << plan.token_of_row[r] << ", "
                                             << plan.slot_of_row[r] << ")";
      if (r < plan.offsets[ids(t, j)] || r >= plan.offsets[ids(t, j) + 1])
        return ::testing::AssertionFailure() << "row " << r << " is outside the block of expert " << ids(t, j);
    }
  }
  // Stability: tokens strictly ascending inside each expert's block (for distinct ids per token).
  for (Index e = 0; e < experts; ++e)
    for (Index r = plan.offsets[e] + 1; r < plan.offsets[e + 1]; ++r)
      if (plan.token_of_row[r] < plan.token_of_row[r - 1])
        return ::testing::AssertionFailure() << "expert " << e << " rows not in token order at row " << r;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult plan_matches_naive(const IndexMatrix& ids, Index experts) {
  return check_plan(sparsemoe::build_dispatch_plan(ids, experts), ids, experts);
}

// T×k ids with k distinct experts per token (a random k-subset in random order).
IndexMatrix random_ids(Index tokens, Index experts, Index k, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  IndexMatrix ids(tokens, k);
  std::vector<Index> perm(static_cast<std::size_t>(experts));
  for (Index t = 0; t < tokens; ++t) {
    std::iota(perm.begin(), perm.end(), Index{0});
    std::shuffle(perm.begin(), perm.end(), rng);
    for (Index j = 0; j < k; ++j) ids(t, j) = perm[static_cast<std::size_t>(j)];
  }
  return ids;
}

TEST(DispatchPlan, MatchesNaiveReference) {
  std::uint64_t seed = 10;
  for (Index tokens : {0, 1, 7, 1000}) {
    for (Index experts : {1, 3, 8}) {
      for (Index k : {Index{1}, Index{2}, experts}) {
        if (k > experts) continue;
        EXPECT_TRUE(plan_matches_naive(random_ids(tokens, experts, k, ++seed), experts))
            << "T=" << tokens << " E=" << experts << " k=" << k;
      }
    }
  }
}

TEST(DispatchPlan, ReusedPlanMatchesNaiveReference) {
  // The overload that writes into an existing plan must give the same plan whatever the plan
  // held before: larger, smaller, other E, other k.
  struct Case {
    Index tokens, experts, k;
  };
  DispatchPlan plan;
  std::uint64_t seed = 50;
  for (const Case& c : {Case{1000, 8, 2}, Case{300, 8, 8}, Case{7, 8, 1}, Case{7, 3, 3}, Case{0, 5, 1},
                        Case{1, 1, 1}, Case{1000, 8, 2}, Case{1000, 8, 2}, Case{33, 16, 4}}) {
    const IndexMatrix ids = random_ids(c.tokens, c.experts, c.k, ++seed);
    sparsemoe::build_dispatch_plan(ids, c.experts, plan);
    EXPECT_TRUE(check_plan(plan, ids, c.experts)) << "T=" << c.tokens << " E=" << c.experts << " k=" << c.k;
  }
}

TEST(DispatchPlan, AllTokensToOneExpert) {
  for (Index target : {0, 4, 7}) {
    IndexMatrix ids = IndexMatrix::Constant(300, 1, target);
    EXPECT_TRUE(plan_matches_naive(ids, 8)) << "target " << target;
    const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, 8);
    EXPECT_EQ(plan.tokens_per_expert[target], 300);
    EXPECT_EQ(plan.tokens_per_expert.sum(), 300);
    for (Index r = 0; r < 300; ++r) EXPECT_EQ(plan.token_of_row[r], r);
  }
  // k = 2: every token picks (5, 2); expert 2 gets all slot-1 rows, expert 5 all slot-0 rows.
  IndexMatrix pairs(50, 2);
  for (Index t = 0; t < 50; ++t) pairs.row(t) << 5, 2;
  EXPECT_TRUE(plan_matches_naive(pairs, 6));
}

TEST(DispatchPlan, SkewedAndEmptyExperts) {
  // Experts 0 and E−1 never used, one expert much heavier than the rest.
  std::mt19937_64 rng(5);
  IndexMatrix ids(257, 2);
  for (Index t = 0; t < ids.rows(); ++t) {
    ids(t, 0) = 3;
    const Index others[] = {1, 2, 4, 5};
    ids(t, 1) = others[rng() % 4];
  }
  EXPECT_TRUE(plan_matches_naive(ids, 7));
}

TEST(DispatchPlan, RepeatedIdWithinAToken) {
  // Not produced by the gate, but accepted by the plan: the two slots are kept in slot order.
  IndexMatrix ids(3, 2);
  ids << 1, 1, 0, 1, 1, 0;
  EXPECT_TRUE(plan_matches_naive(ids, 2));
}

TEST(DispatchPlan, ZeroSlots) {
  const IndexMatrix ids(5, 0);
  const DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, 3);
  EXPECT_EQ(plan.num_rows(), 0);
  EXPECT_EQ(plan.offsets.size(), 4);
  EXPECT_EQ(plan.offsets[3], 0);
  EXPECT_EQ(plan.tokens_per_expert.sum(), 0);
}

TEST(DispatchPlan, OutOfRangeIdThrows) {
  IndexMatrix ids = random_ids(6, 4, 2, 99);
  for (Index bad : {Index{-2}, Index{4}, Index{1000}, std::numeric_limits<Index>::min()}) {
    IndexMatrix broken = ids;
    broken(3, 1) = bad;
    EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(broken, 4), "build_dispatch_plan",
                                 std::to_string(bad), "token 3", "4");
  }
}

// Id −1 marks a slot that is not dispatched (GShard's dropped second expert): it gets no row.
// Reference: for each expert in turn, its (token, slot) pairs in token-major order are its rows.
TEST(DispatchPlan, DroppedSlotsHaveNoRowAndTheRestIsGroupedStably) {
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    const Index tokens = 37, experts = 5, k = 3;
    IndexMatrix ids = random_ids(tokens, experts, k, 300 + seed);
    std::mt19937_64 generator(seed);
    Index dropped = 0;
    for (Index t = 0; t < tokens; ++t) {
      for (Index j = 0; j < k; ++j) {
        if (generator() % 4 == 0) {
          ids(t, j) = -1;
          ++dropped;
        }
      }
    }
    for (Index j = 0; j < k; ++j) ids(5, j) = -1;  // a token with no slot dispatched at all
    dropped = (ids.array() == -1).count();
    const auto plan = sparsemoe::build_dispatch_plan(ids, experts);
    EXPECT_EQ(plan.dropped_slots, dropped);
    EXPECT_EQ(plan.num_rows(), tokens * k - dropped);
    Index row = 0;
    for (Index e = 0; e < experts; ++e) {
      EXPECT_EQ(plan.offsets[e], row);
      for (Index t = 0; t < tokens; ++t) {
        for (Index j = 0; j < k; ++j) {
          if (ids(t, j) != e) continue;
          EXPECT_EQ(plan.row_of_slot(t, j), row);
          EXPECT_EQ(plan.token_of_row[row], t);
          EXPECT_EQ(plan.slot_of_row[row], j);
          ++row;
        }
      }
      EXPECT_EQ(plan.tokens_per_expert[e], row - plan.offsets[e]);
    }
    EXPECT_EQ(row, plan.num_rows());
    for (Index t = 0; t < tokens; ++t) {
      for (Index j = 0; j < k; ++j) {
        if (ids(t, j) == -1) {
          EXPECT_EQ(plan.row_of_slot(t, j), -1);
        }
      }
    }
  }
}

TEST(DispatchPlan, NonPositiveExpertCountThrows) {
  const IndexMatrix ids(0, 1);
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, 0), "build_dispatch_plan", "0");
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::build_dispatch_plan(ids, -2), "build_dispatch_plan", "-2");
}

}  // namespace
