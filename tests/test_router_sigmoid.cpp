// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of SigmoidTopKRouter and update_selection_bias (router/sigmoid_top_k.hpp), over
// float and double. References (router_reference.hpp, reference_gate.hpp):
//   * logits: naive products in double; scores: a logistic in double of the stored logits;
//   * biased scores u = s + β formed in Scalar from the stored scores (as the spec defines them),
//     group scores as the Scalar sum of the two largest u of a full sort, kept groups and expert
//     ids by brute force over every subset, with losing groups excluded or (Hugging Face) zeroed;
//   * gates: c·s/max(Σs + ε, floor) in double from the unbiased scores;
//   * backward: 5-point central differences in double through W_r, b_r and the input (gates,
//     scores, logits, balance loss with normalised scores, z-loss), a zero gradient for β;
//   * the bias update: hand-computed cases for both re-centring conventions.
#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>
#include <sparsemoe/router/sigmoid_top_k.hpp>

#include "gradient_check.hpp"
#include "router_checks.hpp"
#include "router_reference.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using reference::MatrixD;
using router_reference::same;
using sparsemoe::GroupMask;
using sparsemoe::Index;
using sparsemoe::RouteOptions;
using sparsemoe::SigmoidTopKRouter;
using sparsemoe::SigmoidTopKRouterOptions;
using sparsemoe::TopKRouting;
using sparsemoe::TopKRoutingGradient;
using sparsemoe::Vector;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class SigmoidRouter : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SigmoidRouter, Scalars, reference::ScalarNames);

SigmoidTopKRouterOptions options(Index k, bool normalize = true, double scale = 1.0, Index groups = 1,
                                 Index top_groups = 1, GroupMask mask = GroupMask::exclude, bool bias = false) {
  SigmoidTopKRouterOptions o;
  o.k = k;
  o.normalize_top_k = normalize;
  o.scale = scale;
  o.num_groups = groups;
  o.top_groups = top_groups;
  o.group_mask = mask;
  o.use_bias = bias;
  return o;
}

struct Case {
  Index tokens, dim, experts;
  SigmoidTopKRouterOptions options;
  double selection_bias_scale;  // β ~ U(−scale, scale); large values make biased scores negative
};

std::string describe(const Case& c) {
  const auto& o = c.options;
  return "T=" + std::to_string(c.tokens) + " d=" + std::to_string(c.dim) + " E=" + std::to_string(c.experts) +
         " k=" + std::to_string(o.k) + (o.normalize_top_k ? " normalize" : "") + " scale=" + std::to_string(o.scale) +
         " groups=" + std::to_string(o.num_groups) + "/" + std::to_string(o.top_groups) +
         (o.group_mask == GroupMask::zero ? " zero-mask" : "") + (o.use_bias ? " bias" : "") +
         " eps=" + std::to_string(o.normalize_epsilon) + " floor=" + std::to_string(o.normalize_floor) +
         " beta_scale=" + std::to_string(c.selection_bias_scale);
}

const std::vector<Case>& cases() {
  static const std::vector<Case> list{
      {7, 5, 6, options(2), 0.0},
      {7, 5, 6, options(2, false, 2.5), 0.3},
      {7, 5, 6, options(6, true, 2.5, 1, 1, GroupMask::exclude, true), 0.3},
      {70, 4, 8, options(2, true, 1.0, 4, 2), 0.2},
      {9, 4, 12, options(3, true, 2.5, 4, 2, GroupMask::exclude, true), 0.5},
      {9, 4, 12, options(3, true, 2.5, 4, 2, GroupMask::zero), 1.5},
      {9, 4, 12, options(4, false, 1.0, 6, 2, GroupMask::zero, true), 1.5},
      {9, 4, 12, options(2, true, 1.0, 12, 3), 0.5},  // groups of one expert
      {1, 1, 1, options(1), 0.1},
      {0, 3, 4, options(2, true, 1.0, 2, 1), 0.1},
  };
  return list;
}

template <typename Scalar>
SigmoidTopKRouter<Scalar> make_router(const Case& c, std::uint64_t seed) {
  SigmoidTopKRouter<Scalar> router(c.dim, c.experts, c.options);
  router.weight() = reference::uniform<Scalar>(c.dim, c.experts, seed * 7 + 1, -2.0, 2.0);
  if (c.options.use_bias) router.bias() = reference::uniform<Scalar>(c.experts, 1, seed * 7 + 2, -1.0, 1.0);
  if (c.selection_bias_scale > 0) {
    router.selection_bias() =
        reference::uniform<Scalar>(c.experts, 1, seed * 7 + 3, -c.selection_bias_scale, c.selection_bias_scale);
  }
  return router;
}

template <typename Scalar>
void expect_matches_reference(const SigmoidTopKRouter<Scalar>& router, const Mat<Scalar>& input,
                              const TopKRouting<Scalar>& r) {
  const double tol = reference::tolerance<Scalar>();
  const auto& o = router.options();
  const Index tokens = input.rows(), experts = router.num_experts(), k = router.k();
  ASSERT_EQ(r.expert_ids.rows(), tokens);
  ASSERT_EQ(r.expert_ids.cols(), k);
  ASSERT_EQ(r.gates.rows(), tokens);
  ASSERT_EQ(r.gates.cols(), k);
  ASSERT_EQ(r.scores.rows(), tokens);
  ASSERT_EQ(r.scores.cols(), experts);
  const bool grouped = o.num_groups > 1;
  ASSERT_EQ(r.group_scores.rows(), grouped ? tokens : 0);
  ASSERT_EQ(r.selected_groups.cols(), grouped ? o.top_groups : 0);
  const MatrixD z = router_reference::logits(input, router.weight(), router.bias());
  EXPECT_TRUE(reference::all_close(r.logits, z, 10 * tol)) << "logits";
  const Index group_size = experts / o.num_groups;
  for (Index t = 0; t < tokens; ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    std::vector<double> u(static_cast<std::size_t>(experts));
    for (Index e = 0; e < experts; ++e) {
      const double s = router_reference::logistic(static_cast<double>(r.logits(t, e)));
      EXPECT_TRUE(reference::close(static_cast<double>(r.scores(t, e)), s, 10 * tol)) << "score of expert " << e;
      // u in Scalar, from the stored score: the value the spec ranks.
      u[static_cast<std::size_t>(e)] = static_cast<double>(static_cast<Scalar>(r.scores(t, e) + router.selection_bias()[e]));
    }
    std::vector<double> selection = u;
    if (grouped) {
      std::vector<double> group_scores;
      for (Index g = 0; g < o.num_groups; ++g) {
        std::vector<double> members(u.begin() + g * group_size, u.begin() + (g + 1) * group_size);
        std::sort(members.begin(), members.end(), [](double a, double b) { return a > b; });
        group_scores.push_back(members.size() == 1 ? members[0]
                                                   : static_cast<double>(static_cast<Scalar>(members[0]) +
                                                                         static_cast<Scalar>(members[1])));
        EXPECT_EQ(static_cast<double>(r.group_scores(t, g)), group_scores.back()) << "group " << g;
      }
      const auto kept = router_reference::brute_force_top_k(group_scores, o.top_groups);
      for (Index m = 0; m < o.top_groups; ++m) EXPECT_EQ(r.selected_groups(t, m), kept[static_cast<std::size_t>(m)]);
      std::vector<bool> allowed(static_cast<std::size_t>(experts));
      for (Index e = 0; e < experts; ++e) {
        allowed[static_cast<std::size_t>(e)] = std::find(kept.begin(), kept.end(), e / group_size) != kept.end();
        if (o.group_mask == GroupMask::zero && !allowed[static_cast<std::size_t>(e)]) selection[static_cast<std::size_t>(e)] = 0.0;
      }
      const auto ids = o.group_mask == GroupMask::exclude ? router_reference::brute_force_top_k(selection, k, allowed)
                                                          : router_reference::brute_force_top_k(selection, k);
      for (Index j = 0; j < k; ++j) ASSERT_EQ(r.expert_ids(t, j), ids[static_cast<std::size_t>(j)]) << "slot " << j;
    } else {
      const auto ids = router_reference::brute_force_top_k(selection, k);
      for (Index j = 0; j < k; ++j) ASSERT_EQ(r.expert_ids(t, j), ids[static_cast<std::size_t>(j)]) << "slot " << j;
    }
    double sum = 0;
    for (Index j = 0; j < k; ++j) sum += router_reference::logistic(static_cast<double>(r.logits(t, r.expert_ids(t, j))));
    const double denominator = o.normalize_top_k ? std::max(sum + o.normalize_epsilon, o.normalize_floor) : 1.0;
    for (Index j = 0; j < k; ++j) {
      const double s = router_reference::logistic(static_cast<double>(r.logits(t, r.expert_ids(t, j))));
      EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, j)), o.scale * s / denominator, 10 * tol * o.scale))
          << "gate of slot " << j;
    }
  }
}

TYPED_TEST(SigmoidRouter, RouteMatchesBruteForceReference) {
  using Scalar = TypeParam;
  std::uint64_t seed = 300;
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const auto router = make_router<Scalar>(c, ++seed);
    const auto input = reference::uniform<Scalar>(c.tokens, c.dim, seed + 1000);
    TopKRouting<Scalar> r;
    router.route(input, RouteOptions{}, r);
    expect_matches_reference(router, input, r);
  }
}

// d = 1, x = 1: the logits are the weight row.
template <typename Scalar>
TopKRouting<Scalar> route_row(const std::vector<double>& logits, const std::vector<double>& beta,
                              const SigmoidTopKRouterOptions& o) {
  const Index experts = static_cast<Index>(logits.size());
  SigmoidTopKRouter<Scalar> router(1, experts, o);
  for (Index e = 0; e < experts; ++e) {
    router.weight()(0, e) = static_cast<Scalar>(logits[static_cast<std::size_t>(e)]);
    router.selection_bias()[e] = static_cast<Scalar>(beta[static_cast<std::size_t>(e)]);
  }
  TopKRouting<Scalar> r;
  router.route(Mat<Scalar>::Ones(1, 1), RouteOptions{}, r);
  return r;
}

std::vector<Index> ids_of(const sparsemoe::IndexMatrix& ids) {
  std::vector<Index> out;
  for (Index j = 0; j < ids.cols(); ++j) out.push_back(ids(0, j));
  return out;
}

TYPED_TEST(SigmoidRouter, ExactTiesGoToTheLowerId) {
  using Scalar = TypeParam;
  // s = 0.5 everywhere; β makes u = 0.5 or 0.75 exactly.
  const std::vector<double> zero(6, 0.0);
  const std::vector<double> beta{0, 0.25, 0.25, 0, 0.25, 0};
  EXPECT_EQ(ids_of(route_row<Scalar>(zero, beta, options(2)).expert_ids), (std::vector<Index>{1, 2}));
  EXPECT_EQ(ids_of(route_row<Scalar>(zero, beta, options(4)).expert_ids), (std::vector<Index>{1, 2, 4, 0}));
  // Groups {0,1}, {2,3}, {4,5} all score 1.25: the lower groups are kept.
  const auto two = route_row<Scalar>(zero, beta, options(2, true, 1, 3, 2));
  EXPECT_EQ(ids_of(two.selected_groups), (std::vector<Index>{0, 1}));
  EXPECT_EQ(ids_of(two.expert_ids), (std::vector<Index>{1, 2}));
  const auto one = route_row<Scalar>(zero, beta, options(2, true, 1, 3, 1));
  EXPECT_EQ(ids_of(one.selected_groups), (std::vector<Index>{0}));
  EXPECT_EQ(ids_of(one.expert_ids), (std::vector<Index>{1, 0}));
  // Gates ignore β: equal unbiased scores, equal gates summing to 1.
  EXPECT_EQ(one.gates(0, 0), one.gates(0, 1));
  EXPECT_NEAR(static_cast<double>(one.gates(0, 0)), 0.5, 1e-7);
  // Zero-initialised router and bias: the first k experts.
  EXPECT_EQ(ids_of(route_row<Scalar>(zero, zero, options(3)).expert_ids), (std::vector<Index>{0, 1, 2}));
}

TYPED_TEST(SigmoidRouter, SelectionBiasMovesSelectionButNotGates) {
  using Scalar = TypeParam;
  const std::vector<double> z{2, 1, 0, -1};
  EXPECT_EQ(ids_of(route_row<Scalar>(z, {0, 0, 0, 0}, options(2)).expert_ids), (std::vector<Index>{0, 1}));
  const auto r = route_row<Scalar>(z, {0, 0, 0, 1}, options(2, false));
  EXPECT_EQ(ids_of(r.expert_ids), (std::vector<Index>{3, 0}));
  EXPECT_NEAR(static_cast<double>(r.gates(0, 0)), router_reference::logistic(-1), 1e-6);
  EXPECT_NEAR(static_cast<double>(r.gates(0, 1)), router_reference::logistic(2), 1e-6);
}

TYPED_TEST(SigmoidRouter, LosingGroupsExcludedOrZeroedAsHuggingFace) {
  using Scalar = TypeParam;
  // s = 0.5; u = (0.3, −0.4, −0.5, −0.5): group 0 (−0.1) beats group 1 (−1.0).
  const std::vector<double> z(4, 0.0);
  const std::vector<double> beta{-0.2, -0.9, -1.0, -1.0};
  const auto excluded = route_row<Scalar>(z, beta, options(2, true, 1, 2, 1));
  EXPECT_EQ(ids_of(excluded.selected_groups), (std::vector<Index>{0}));
  EXPECT_EQ(ids_of(excluded.expert_ids), (std::vector<Index>{0, 1}));
  // Masked to 0.0, the losing group's experts (0 > −0.4) displace expert 1, lower id first.
  const auto zeroed = route_row<Scalar>(z, beta, options(2, true, 1, 2, 1, GroupMask::zero));
  EXPECT_EQ(ids_of(zeroed.expert_ids), (std::vector<Index>{0, 2}));
  // With positive biased scores both masks agree.
  const std::vector<double> positive{0.2, 0.1, 0.0, 0.0};
  EXPECT_EQ(ids_of(route_row<Scalar>(z, positive, options(2, true, 1, 2, 1, GroupMask::zero)).expert_ids),
            (std::vector<Index>{0, 1}));
  // A group's score is the sum of its top two: group 1 = {0.45, 0.45, 0} beats group 0 = {0.8, 0, 0}.
  const std::vector<double> z6(6, 0.0);
  const std::vector<double> beta6{0.3, -0.5, -0.5, -0.05, -0.05, -0.5};
  const auto top_two = route_row<Scalar>(z6, beta6, options(1, true, 1, 2, 1));
  EXPECT_EQ(ids_of(top_two.selected_groups), (std::vector<Index>{1}));
  EXPECT_EQ(ids_of(top_two.expert_ids), (std::vector<Index>{3}));
  // Random data, exclude mode: every chosen expert lies in a kept group.
  const Case c{200, 6, 16, options(4, true, 2.5, 8, 2), 1.0};
  const auto router = make_router<Scalar>(c, 44);
  TopKRouting<Scalar> r;
  router.route(reference::uniform<Scalar>(c.tokens, c.dim, 45), RouteOptions{}, r);
  for (Index t = 0; t < c.tokens; ++t) {
    for (Index j = 0; j < 4; ++j) {
      const Index group = r.expert_ids(t, j) / 2;
      EXPECT_TRUE(group == r.selected_groups(t, 0) || group == r.selected_groups(t, 1)) << t;
    }
  }
}

TYPED_TEST(SigmoidRouter, RenormalisationEpsilonAndFloor) {
  using Scalar = TypeParam;
  // Logits of −100: σ ≈ 3.7e-44 (a float denormal).
  const std::vector<double> z{-100, -100, -101, -102};
  const std::vector<double> zero(4, 0.0);
  auto o = options(2);
  o.normalize_epsilon = 0;
  const auto exact = route_row<Scalar>(z, zero, o);
  if (std::is_same<Scalar, double>::value) {
    EXPECT_NEAR(static_cast<double>(exact.gates(0, 0) + exact.gates(0, 1)), 1.0, 1e-12);
  }
  // Hugging Face's 1e-20 swamps such a sum: gates ≈ s/1e-20, far below 1.
  const auto hf = route_row<Scalar>(z, zero, options(2));
  EXPECT_LT(static_cast<double>(hf.gates(0, 0)), 1e-20);
  // llama.cpp's clamp: D = 6.1e-5.
  o.normalize_floor = 6.1e-5;
  o.scale = 2.0;
  const auto floored = route_row<Scalar>({0.5, -0.5, -3, -4}, zero, o);
  const double s0 = router_reference::logistic(0.5), s1 = router_reference::logistic(-0.5);
  EXPECT_NEAR(static_cast<double>(floored.gates(0, 0)), 2 * s0 / (s0 + s1), 1e-6);
  // σ(−30) ≈ 9.4e-14 stays a normal float, and so does the clamped gate.
  const auto clamped = route_row<Scalar>({-30, -30, -31, -32}, zero, o);
  EXPECT_NEAR(static_cast<double>(clamped.gates(0, 0)) / (2 * static_cast<double>(clamped.scores(0, 0)) / 6.1e-5),
              1.0, 1e-5);
  // The default epsilon is invisible for ordinary sums.
  const auto ordinary = route_row<Scalar>({0.5, -0.5, -3, -4}, zero, options(2));
  EXPECT_NEAR(static_cast<double>(ordinary.gates(0, 0) + ordinary.gates(0, 1)), 1.0, 1e-6);
}

TYPED_TEST(SigmoidRouter, RejectsBadArgumentsNamingTheValue) {
  using Scalar = TypeParam;
  using Router = SigmoidTopKRouter<Scalar>;
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 4, options(5)), "SigmoidTopKRouter", "num_experts = 4", "got 5");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 10, options(2, true, 1, 4, 1)), "num_groups", "got 4");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, options(2, true, 1, 4, 5)), "top_groups", "got 5");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, options(5, true, 1, 4, 2)), "top_groups * num_experts / num_groups = 4",
                               "got 5");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, options(2, true, -1.0)), "scale", "got -1");
  auto o = options(2);
  o.normalize_epsilon = -1e-3;
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, o), "normalize_epsilon", "got -0.001");
  o = options(2);
  o.normalize_floor = std::numeric_limits<double>::infinity();
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, o), "normalize_floor", "inf");

  const Case c{4, 3, 5, options(2), 0.1};
  auto router = make_router<Scalar>(c, 3);
  TopKRouting<Scalar> r;
  EXPECT_INVALID_ARGUMENT_WITH(router.route(Mat<Scalar>::Zero(4, 4), RouteOptions{}, r), "input must have 3 columns");
  Mat<Scalar> input = reference::uniform<Scalar>(4, 3, 4);
  input(3, 0) = -std::numeric_limits<Scalar>::infinity();
  EXPECT_INVALID_ARGUMENT_WITH(router.route(input, RouteOptions{}, r), "non-finite router logit", "token row 3");
  input(3, 0) = 0;
  router.selection_bias()[2] = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_INVALID_ARGUMENT_WITH(router.route(input, RouteOptions{}, r), "non-finite selection_bias", "nan", "expert 2");
  router.selection_bias().resize(3);
  EXPECT_INVALID_ARGUMENT_WITH(router.route(input, RouteOptions{}, r), "selection_bias must have 5 entries", "got 3");
}

TYPED_TEST(SigmoidRouter, TensorsStateAndGradients) {
  using Scalar = TypeParam;
  auto router = make_router<Scalar>({3, 4, 6, options(2, true, 1, 1, 1, GroupMask::exclude, true), 0.5}, 1);
  const auto tensors = router.tensors();
  ASSERT_EQ(tensors.size(), 2u);
  EXPECT_EQ(tensors[0].name, "weight");
  EXPECT_EQ(tensors[1].name, "bias");
  const auto state = router.state();
  ASSERT_EQ(state.size(), 1u);
  EXPECT_EQ(state[0].name, "selection_bias");
  EXPECT_EQ(state[0].data, router.selection_bias().data());
  EXPECT_EQ(state[0].rows, 6);
  EXPECT_EQ(state[0].cols, 1);
  auto grads = router.make_gradients();
  const auto views = grads.tensors();
  ASSERT_EQ(views.size(), 2u);
  EXPECT_EQ(views[0].name, "weight");
  EXPECT_EQ(views[1].name, "bias");
  const Vector<Scalar> beta = router.selection_bias();
  router.initialize_uniform(8);
  EXPECT_TRUE(same(router.selection_bias(), beta)) << "initialize_uniform must keep the state";
}

TYPED_TEST(SigmoidRouter, BitwiseIdenticalAcrossThreadCounts) {
  const Case c{1200, 130, 16, options(4, true, 2.5, 4, 2, GroupMask::exclude, true), 0.3};
  sparsemoe::BalanceLossOptions balance;
  balance.normalize_scores = true;
  router_checks::expect_router_deterministic(make_router<TypeParam>(c, 11), RouteOptions{}, c.tokens, balance);
}

TEST(SigmoidRouterGradient, MatchesFiniteDifferences) {
  sparsemoe::BalanceLossOptions whole, sequences;
  whole.normalize_scores = true;
  sequences.sequence_length = 2;
  sequences.normalize_scores = true;
  auto floored = options(2, true, 2.5);
  floored.normalize_epsilon = 0;
  floored.normalize_floor = 1.2;  // active for tokens whose two scores sum below 1.2
  const std::vector<std::pair<Case, sparsemoe::BalanceLossOptions>> list{
      {{6, 5, 6, options(2), 0.3}, whole},
      {{6, 5, 6, options(3, false, 2.5), 0.3}, sequences},
      {{6, 5, 6, options(6, true, 2.5, 1, 1, GroupMask::exclude, true), 0.3}, whole},
      {{6, 4, 12, options(3, true, 2.5, 4, 2, GroupMask::exclude, true), 0.5}, sequences},
      {{6, 4, 12, options(3, true, 2.5, 4, 2, GroupMask::zero), 1.5}, whole},
      {{6, 5, 6, floored, 0.3}, whole},
  };
  std::uint64_t seed = 700;
  for (const auto& item : list) {
    const Case& c = item.first;
    SCOPED_TRACE(describe(c));
    auto router = make_router<double>(c, ++seed);
    // The selection bias has no gradient: away from ties the loss does not depend on it. (Even a
    // constant loss gives the 5-point stencil ~ulp(8L)/12h ≈ 1e-11 of rounding, not 0.)
    const auto no_gradient_for_the_selection_bias = [&](auto& loss) {
      const auto beta_check =
          sparsemoe_test::check_gradient(loss, router.selection_bias(), Eigen::VectorXd::Zero(c.experts));
      EXPECT_LT(beta_check.max_abs_error, 1e-9) << "selection_bias: " << beta_check;
    };
    router_checks::expect_router_gradients(router, RouteOptions{}, c.tokens, seed + 1, item.second,
                                           no_gradient_for_the_selection_bias);
  }
}

TEST(SigmoidRouterGradient, FloorIsActiveInTheFloorCase) {
  // Guards the floor case above: some tokens must actually sit under the floor.
  auto floored = options(2, true, 2.5);
  floored.normalize_epsilon = 0;
  floored.normalize_floor = 1.2;
  const Case c{6, 5, 6, floored, 0.3};
  const auto router = make_router<double>(c, 706);
  TopKRouting<double> r;
  router.route(reference::uniform<double>(c.tokens, c.dim, 707), RouteOptions{}, r);
  int under = 0, over = 0;
  for (Index t = 0; t < c.tokens; ++t) {
    const double sum = r.scores(t, r.expert_ids(t, 0)) + r.scores(t, r.expert_ids(t, 1));
    (sum < 1.2 ? under : over) += 1;
  }
  EXPECT_GT(under, 0);
  EXPECT_GT(over, 0);
}

TYPED_TEST(SigmoidRouter, UpdateSelectionBias) {
  using Scalar = TypeParam;
  const double gamma = 0.125;  // exact in binary
  // Loads (3, 1, 2, 2), mean 2: Δ = γ·(−1, +1, 0, 0), already of zero mean.
  Vector<Scalar> bias = Vector<Scalar>::Zero(4);
  sparsemoe::IndexVector loads(4);
  loads << 3, 1, 2, 2;
  sparsemoe::update_selection_bias(bias, loads, gamma, true);
  EXPECT_EQ(bias, (Vector<Scalar>(4) << Scalar(-0.125), Scalar(0.125), Scalar(0), Scalar(0)).finished());
  // Loads (4, 1, 1, 2), mean 2: sign = (−1, +1, +1, 0).
  loads << 4, 1, 1, 2;
  Vector<Scalar> megatron = Vector<Scalar>::Constant(4, Scalar(1));
  sparsemoe::update_selection_bias(megatron, loads, gamma, false);
  EXPECT_EQ(megatron, (Vector<Scalar>(4) << Scalar(0.875), Scalar(1.125), Scalar(1.125), Scalar(1)).finished());
  // torchtitan re-centres Δ: mean(Δ) = γ/4, Δ − γ/4 = γ·(−1.25, 0.75, 0.75, −0.25).
  Vector<Scalar> titan = Vector<Scalar>::Constant(4, Scalar(1));
  sparsemoe::update_selection_bias(titan, loads, gamma, true);
  EXPECT_EQ(titan, (Vector<Scalar>(4) << Scalar(1 - 1.25 * gamma), Scalar(1 + 0.75 * gamma),
                    Scalar(1 + 0.75 * gamma), Scalar(1 - 0.25 * gamma))
                       .finished());
  EXPECT_NEAR(static_cast<double>(titan.sum()), 4.0, 1e-6);
  // Floating loads (all-reduced averages) work the same way.
  Vector<Scalar> from_doubles = Vector<Scalar>::Constant(4, Scalar(1));
  sparsemoe::update_selection_bias(from_doubles, Eigen::Vector4d(4, 1, 1, 2), gamma, true);
  EXPECT_EQ(from_doubles, titan);
  // Balanced loads: nothing moves.
  loads << 2, 2, 2, 2;
  sparsemoe::update_selection_bias(titan, loads, gamma, false);
  EXPECT_NEAR(static_cast<double>(titan.sum()), 4.0, 1e-6);
  // Repeated updates steer the selection away from the overloaded expert.
  const Case c{400, 4, 4, options(1), 0.0};
  auto router = make_router<Scalar>(c, 2);
  const auto input = reference::uniform<Scalar>(c.tokens, c.dim, 3);
  TopKRouting<Scalar> r;
  sparsemoe::IndexVector counts;
  router.route(input, RouteOptions{}, r);
  sparsemoe::count_tokens_per_expert(r, counts);
  const Index spread_before = counts.maxCoeff() - counts.minCoeff();
  for (int step = 0; step < 300; ++step) {
    router.route(input, RouteOptions{}, r);
    sparsemoe::count_tokens_per_expert(r, counts);
    sparsemoe::update_selection_bias(router.selection_bias(), counts, 1e-2, true);
  }
  EXPECT_LT(counts.maxCoeff() - counts.minCoeff(), spread_before / 2) << counts.transpose();
}

TYPED_TEST(SigmoidRouter, UpdateSelectionBiasRejectsBadArguments) {
  using Scalar = TypeParam;
  Vector<Scalar> bias = Vector<Scalar>::Zero(3);
  sparsemoe::IndexVector loads(4);
  loads << 1, 2, 3, 4;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::update_selection_bias(bias, loads, 1e-3, true), "update_selection_bias",
                               "3 entries", "got 4");
  loads.resize(3);
  loads << 1, -2, 3;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::update_selection_bias(bias, loads, 1e-3, true), "got -2", "expert 1");
  loads << 1, 2, 3;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::update_selection_bias(bias, loads, std::nan(""), true), "gamma", "nan");
}

}  // namespace
