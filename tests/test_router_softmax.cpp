// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of SoftmaxTopKRouter (router/softmax_top_k.hpp) and the shared records of
// router.hpp, over float and double. References (router_reference.hpp, reference_gate.hpp):
//   * logits: naive products in double; scores: a softmax in double of the stored logits;
//   * expert ids and kept groups: brute force over every k-subset of the stored selection scores
//     (group scores by full sorts), so ties and masks are judged independently of the library;
//   * gates: the closed forms in double (p, renormalised p, softmax of the selected logits) × scale;
//   * backward: 5-point central differences in double of a scalar loss built from every output
//     (gates, scores, logits) plus balance_loss and z_loss, through W_r, b_r and the input, with a
//     guard that fails the test if a perturbation changes the selection;
//   * exact ties, losing groups, argument errors (std::invalid_argument naming the value),
//     bitwise determinism over 1/2/3 OpenMP threads, storage reuse.
#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>
#include <sparsemoe/router/softmax_top_k.hpp>

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
using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::RouteOptions;
using sparsemoe::SoftmaxTopKRouter;
using sparsemoe::SoftmaxTopKRouterOptions;
using sparsemoe::TopKRouting;
using sparsemoe::TopKRoutingGradient;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class SoftmaxRouter : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SoftmaxRouter, Scalars, reference::ScalarNames);

struct Case {
  Index tokens, dim, experts;
  SoftmaxTopKRouterOptions options;
};

SoftmaxTopKRouterOptions options(Index k, bool normalize = false, double scale = 1.0, bool over_selected = false,
                                 bool bias = false, Index groups = 1, Index top_groups = 1) {
  SoftmaxTopKRouterOptions o;
  o.k = k;
  o.normalize_top_k = normalize;
  o.scale = scale;
  o.softmax_over_selected = over_selected;
  o.use_bias = bias;
  o.num_groups = groups;
  o.top_groups = top_groups;
  return o;
}

std::string describe(const Case& c) {
  const auto& o = c.options;
  return "T=" + std::to_string(c.tokens) + " d=" + std::to_string(c.dim) + " E=" + std::to_string(c.experts) +
         " k=" + std::to_string(o.k) + (o.normalize_top_k ? " normalize" : "") + " scale=" + std::to_string(o.scale) +
         (o.softmax_over_selected ? " softmax_over_selected" : "") + (o.use_bias ? " bias" : "") +
         " groups=" + std::to_string(o.num_groups) + "/" + std::to_string(o.top_groups);
}

// k = 1, k = E, E = 1, T = 0, two row tiles (T = 70), groups with k = the reachable experts.
const std::vector<Case>& cases() {
  static const std::vector<Case> list{
      {7, 5, 6, options(2)},
      {7, 5, 6, options(2, true)},
      {7, 5, 6, options(3, true, 2.5)},
      {7, 5, 6, options(2, false, 1.5, true)},
      {7, 5, 6, options(1, false, 1.0, false, true)},
      {7, 5, 6, options(6, true)},
      {70, 4, 8, options(2, false, 1.0, false, false, 4, 2)},
      {9, 4, 12, options(3, true, 2.0, false, false, 4, 2)},
      {9, 4, 12, options(3, false, 1.0, true, true, 3, 1)},
      {9, 4, 12, options(6, false, 16.0, false, true, 6, 3)},
      {1, 1, 1, options(1)},
      {0, 3, 4, options(2, true, 1.0, false, true, 2, 1)},
  };
  return list;
}

template <typename Scalar>
SoftmaxTopKRouter<Scalar> make_router(const Case& c, std::uint64_t seed) {
  SoftmaxTopKRouter<Scalar> router(c.dim, c.experts, c.options);
  router.weight() = reference::uniform<Scalar>(c.dim, c.experts, seed * 7 + 1, -2.0, 2.0);
  if (c.options.use_bias) router.bias() = reference::uniform<Scalar>(c.experts, 1, seed * 7 + 2, -1.0, 1.0);
  return router;
}

// Checks every field of `r` against the independent references.
template <typename Scalar>
void expect_matches_reference(const SoftmaxTopKRouter<Scalar>& router, const Mat<Scalar>& input,
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
  EXPECT_EQ(r.num_tokens(), tokens);
  EXPECT_EQ(r.k(), k);
  EXPECT_EQ(r.num_experts(), experts);
  EXPECT_FALSE(r.jittered());
  const bool grouped = o.num_groups > 1;
  ASSERT_EQ(r.group_scores.rows(), grouped ? tokens : 0);
  ASSERT_EQ(r.group_scores.cols(), grouped ? o.num_groups : 0);
  ASSERT_EQ(r.selected_groups.rows(), grouped ? tokens : 0);
  ASSERT_EQ(r.selected_groups.cols(), grouped ? o.top_groups : 0);

  const MatrixD z = router_reference::logits(input, router.weight(), router.bias());
  EXPECT_TRUE(reference::all_close(r.logits, z, 10 * tol)) << "logits";
  const double scale = o.scale;
  const Index group_size = experts / o.num_groups;
  for (Index t = 0; t < tokens; ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    const std::vector<double> stored_z = reference::row(r.logits, t);
    const std::vector<double> p = router_reference::softmax(stored_z);
    for (Index e = 0; e < experts; ++e) {
      EXPECT_TRUE(reference::close(static_cast<double>(r.scores(t, e)), p[static_cast<std::size_t>(e)], 10 * tol))
          << "score of expert " << e;
    }
    // Selection is judged on the library's own stored scores, so rounding cannot move a tie.
    const std::vector<double> selection = o.softmax_over_selected ? stored_z : reference::row(r.scores, t);
    std::vector<bool> allowed(static_cast<std::size_t>(experts), true);
    if (grouped) {
      const auto group_scores = router_reference::group_scores(selection, o.num_groups, router_reference::GroupScore::max);
      for (Index g = 0; g < o.num_groups; ++g) {
        EXPECT_EQ(static_cast<double>(r.group_scores(t, g)), group_scores[static_cast<std::size_t>(g)]) << "group " << g;
      }
      const auto kept = router_reference::brute_force_top_k(group_scores, o.top_groups);
      for (Index m = 0; m < o.top_groups; ++m) EXPECT_EQ(r.selected_groups(t, m), kept[static_cast<std::size_t>(m)]);
      for (Index e = 0; e < experts; ++e) {
        allowed[static_cast<std::size_t>(e)] = std::find(kept.begin(), kept.end(), e / group_size) != kept.end();
      }
    }
    const auto ids = router_reference::brute_force_top_k(selection, k, allowed);
    for (Index j = 0; j < k; ++j) {
      ASSERT_EQ(r.expert_ids(t, j), ids[static_cast<std::size_t>(j)]) << "slot " << j;
      EXPECT_TRUE(allowed[static_cast<std::size_t>(ids[static_cast<std::size_t>(j)])]) << "a losing group's expert";
    }
    double denominator = 1.0;
    if (o.softmax_over_selected || o.normalize_top_k) {
      denominator = 0;
      for (Index j = 0; j < k; ++j) denominator += p[static_cast<std::size_t>(ids[static_cast<std::size_t>(j)])];
    }
    for (Index j = 0; j < k; ++j) {
      const double expected = p[static_cast<std::size_t>(ids[static_cast<std::size_t>(j)])] / denominator * scale;
      EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, j)), expected, 10 * tol * std::max(1.0, scale)))
          << "gate of slot " << j;
    }
  }
}

TYPED_TEST(SoftmaxRouter, RouteMatchesBruteForceReference) {
  using Scalar = TypeParam;
  std::uint64_t seed = 100;
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const auto router = make_router<Scalar>(c, ++seed);
    const auto input = reference::uniform<Scalar>(c.tokens, c.dim, seed + 1000);
    TopKRouting<Scalar> r;
    router.route(input, RouteOptions{}, r);
    expect_matches_reference(router, input, r);
    // Training mode changes nothing for this router.
    TopKRouting<Scalar> training;
    router.route(input, RouteOptions{Mode::training, 5}, training);
    EXPECT_TRUE(same(training.expert_ids, r.expert_ids));
    EXPECT_TRUE(same(training.gates, r.gates));
  }
}

// d = 1, x = 1: the logits are the weight row itself, so exact ties are easy to write down.
template <typename Scalar>
TopKRouting<Scalar> route_row(const std::vector<double>& logits, const SoftmaxTopKRouterOptions& o) {
  const Index experts = static_cast<Index>(logits.size());
  SoftmaxTopKRouter<Scalar> router(1, experts, o);
  for (Index e = 0; e < experts; ++e) router.weight()(0, e) = static_cast<Scalar>(logits[static_cast<std::size_t>(e)]);
  TopKRouting<Scalar> r;
  router.route(Mat<Scalar>::Ones(2, 1), RouteOptions{}, r);
  return r;
}

std::vector<Index> ids_of(const sparsemoe::IndexMatrix& ids, Index t = 0) {
  std::vector<Index> out;
  for (Index j = 0; j < ids.cols(); ++j) out.push_back(ids(t, j));
  return out;
}

TYPED_TEST(SoftmaxRouter, ExactTiesGoToTheLowerId) {
  using Scalar = TypeParam;
  const std::vector<double> z{0, 3, 1, 3, 3, 1};
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(2)).expert_ids), (std::vector<Index>{1, 3}));
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(4)).expert_ids), (std::vector<Index>{1, 3, 4, 2}));
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(4, false, 1, true)).expert_ids), (std::vector<Index>{1, 3, 4, 2}));
  // Groups {0,1}, {2,3}, {4,5} all score 3: the lower groups are kept.
  const auto two_groups = route_row<Scalar>(z, options(2, false, 1, false, false, 3, 2));
  EXPECT_EQ(ids_of(two_groups.selected_groups), (std::vector<Index>{0, 1}));
  EXPECT_EQ(ids_of(two_groups.expert_ids), (std::vector<Index>{1, 3}));
  const auto one_group = route_row<Scalar>(z, options(2, false, 1, false, false, 3, 1));
  EXPECT_EQ(ids_of(one_group.selected_groups), (std::vector<Index>{0}));
  EXPECT_EQ(ids_of(one_group.expert_ids), (std::vector<Index>{1, 0}));
  // A tie at the k-th place inside the kept groups: experts 1 and 3 tie for the one slot.
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(1, false, 1, false, false, 3, 2)).expert_ids), (std::vector<Index>{1}));
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(2, false, 1, false, false, 3, 3)).expert_ids), (std::vector<Index>{1, 3}));
  // Equal weights give equal gates.
  const auto tied = route_row<Scalar>(z, options(3, true));
  EXPECT_EQ(tied.gates(0, 0), tied.gates(0, 1));
  EXPECT_EQ(tied.gates(0, 1), tied.gates(0, 2));
  // All-equal logits (a zero-initialised router): the first k experts.
  EXPECT_EQ(ids_of(route_row<Scalar>(std::vector<double>(5, 0.0), options(3)).expert_ids), (std::vector<Index>{0, 1, 2}));
}

TYPED_TEST(SoftmaxRouter, LosingGroupsAreNeverChosen) {
  using Scalar = TypeParam;
  // Group 0 = {0, 1} wins on expert 0 alone; experts 2 and 3 beat expert 1 but lose as a group.
  const std::vector<double> z{5, 0.1, 4, 3.9, 1, 1};
  const auto r = route_row<Scalar>(z, options(2, true, 1, false, false, 3, 1));
  EXPECT_EQ(ids_of(r.expert_ids), (std::vector<Index>{0, 1}));
  EXPECT_NEAR(static_cast<double>(r.gates(0, 0) + r.gates(0, 1)), 1.0, 1e-6);
  // Without groups, the global top 2.
  EXPECT_EQ(ids_of(route_row<Scalar>(z, options(2)).expert_ids), (std::vector<Index>{0, 2}));
  // Random data: every chosen expert lies in a kept group (also checked by the reference test).
  const Case c{200, 6, 16, options(4, false, 1, false, false, 8, 2)};
  const auto router = make_router<Scalar>(c, 77);
  TopKRouting<Scalar> routing;
  router.route(reference::uniform<Scalar>(c.tokens, c.dim, 78), RouteOptions{}, routing);
  for (Index t = 0; t < c.tokens; ++t) {
    for (Index j = 0; j < 4; ++j) {
      const Index group = routing.expert_ids(t, j) / 2;
      EXPECT_TRUE(group == routing.selected_groups(t, 0) || group == routing.selected_groups(t, 1)) << t;
    }
  }
}

TYPED_TEST(SoftmaxRouter, SoftmaxOverSelectedEqualsRenormalisedUpToRounding) {
  using Scalar = TypeParam;
  const Case c{50, 6, 10, options(3, true, 2.0)};
  auto renormalised = make_router<Scalar>(c, 3);
  Case over = c;
  over.options.softmax_over_selected = true;
  auto selected = make_router<Scalar>(over, 3);
  const auto input = reference::uniform<Scalar>(c.tokens, c.dim, 4);
  TopKRouting<Scalar> a, b;
  renormalised.route(input, RouteOptions{}, a);
  selected.route(input, RouteOptions{}, b);
  EXPECT_TRUE(same(a.expert_ids, b.expert_ids));
  EXPECT_TRUE(reference::all_close(a.gates, b.gates, 20 * reference::tolerance<Scalar>()));
}

TYPED_TEST(SoftmaxRouter, RejectsBadOptionsNamingTheValue) {
  using Scalar = TypeParam;
  using Router = SoftmaxTopKRouter<Scalar>;
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 4, options(5)), "SoftmaxTopKRouter", "k must be in [1, num_experts = 4]",
                               "got 5");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 4, options(0)), "k must be", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 6, options(1, false, 1, false, false, 4, 1)), "num_groups", "divide",
                               "num_experts = 6", "got 4");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 6, options(1, false, 1, false, false, 3, 4)), "top_groups",
                               "num_groups = 3", "got 4");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 6, options(1, false, 1, false, false, 3, 0)), "top_groups", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 8, options(3, false, 1, false, false, 4, 1)),
                               "k must be <= top_groups * num_experts / num_groups = 2", "got 3");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 4, options(2, false, 0.0)), "scale", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 4, options(2, false, std::nan(""))), "scale", "nan");
  EXPECT_INVALID_ARGUMENT_WITH(Router(0, 4, options(2)), "input_dim", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(Router(3, 0, options(1)), "num_experts", "got 0");
}

TYPED_TEST(SoftmaxRouter, RejectsBadInputNamingTheValue) {
  using Scalar = TypeParam;
  const Case c{5, 3, 4, options(2)};
  auto router = make_router<Scalar>(c, 9);
  TopKRouting<Scalar> r;
  EXPECT_INVALID_ARGUMENT_WITH(router.route(Mat<Scalar>::Zero(5, 2), RouteOptions{}, r), "route",
                               "input must have 3 columns", "5x2");
  Mat<Scalar> input = reference::uniform<Scalar>(5, 3, 10);
  input(2, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_INVALID_ARGUMENT_WITH(router.route(input, RouteOptions{}, r), "non-finite router logit", "nan",
                               "token row 2", "expert 0");
  input(2, 1) = 0;
  router.weight()(0, 3) = std::numeric_limits<Scalar>::infinity();
  EXPECT_INVALID_ARGUMENT_WITH(router.route(input, RouteOptions{}, r), "non-finite router logit", "inf", "expert 3");
  // With the check off, NaN logits still give valid, distinct ids.
  auto unchecked_options = c.options;
  unchecked_options.check_finite = false;
  SoftmaxTopKRouter<Scalar> unchecked(3, 4, unchecked_options);
  unchecked.weight() = router.weight();
  unchecked.route(input, RouteOptions{}, r);
  for (Index t = 0; t < 5; ++t) {
    EXPECT_GE(r.expert_ids(t, 0), 0);
    EXPECT_NE(r.expert_ids(t, 0), r.expert_ids(t, 1));
  }
  // Backward checks its shapes.
  router.weight()(0, 3) = 0;
  router.route(input, RouteOptions{}, r);
  TopKRoutingGradient<Scalar> up;
  up.set_zero(r);
  auto grads = router.make_gradients();
  Mat<Scalar> dx = Mat<Scalar>::Zero(5, 3);
  up.gates.resize(5, 3);
  EXPECT_INVALID_ARGUMENT_WITH(router.backward(r, input, up, grads, dx), "backward", "upstream.gates must be 5x2",
                               "got 5x3");
  up.set_zero(r);
  Mat<Scalar> bad_dx = Mat<Scalar>::Zero(4, 3);
  EXPECT_INVALID_ARGUMENT_WITH(router.backward(r, input, up, grads, bad_dx), "d_input must be 5x3");
  grads.weight.resize(2, 4);
  EXPECT_INVALID_ARGUMENT_WITH(router.backward(r, input, up, grads, dx), "parameter_gradients.weight must be 3x4");
}

TYPED_TEST(SoftmaxRouter, TensorsAndGradientsMatch) {
  using Scalar = TypeParam;
  auto router = make_router<Scalar>({3, 4, 6, options(2, false, 1, false, true)}, 1);
  const auto tensors = router.tensors();
  ASSERT_EQ(tensors.size(), 2u);
  EXPECT_EQ(tensors[0].name, "weight");
  EXPECT_EQ(tensors[0].data, router.weight().data());
  EXPECT_EQ(tensors[0].rows, 4);
  EXPECT_EQ(tensors[0].cols, 6);
  EXPECT_EQ(tensors[1].name, "bias");
  EXPECT_EQ(tensors[1].rows, 6);
  EXPECT_EQ(tensors[1].cols, 1);
  EXPECT_TRUE(router.state().empty());
  auto grads = router.make_gradients();
  const auto views = grads.tensors();
  ASSERT_EQ(views.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(views[i].name, tensors[i].name);
    EXPECT_EQ(views[i].rows, tensors[i].rows);
    EXPECT_EQ(views[i].cols, tensors[i].cols);
    EXPECT_TRUE(views[i].flat().isZero());
  }
  grads.weight.setOnes();
  grads.bias.setOnes();
  grads.set_zero();
  EXPECT_TRUE(grads.weight.isZero());
  EXPECT_TRUE(grads.bias.isZero());
  SoftmaxTopKRouter<Scalar> plain(4, 6);
  EXPECT_EQ(plain.tensors().size(), 1u);
  EXPECT_EQ(plain.make_gradients().tensors().size(), 1u);
  EXPECT_TRUE(plain.weight().isZero());
  plain.initialize_uniform(3);
  const double bound = 1.0 / std::sqrt(4.0);
  EXPECT_FALSE(plain.weight().isZero());
  EXPECT_LE(static_cast<double>(plain.weight().cwiseAbs().maxCoeff()), bound);
}

TYPED_TEST(SoftmaxRouter, ReusesStorage) {
  using Scalar = TypeParam;
  const Case c{40, 5, 8, options(3, true, 1, false, true, 4, 2)};
  const auto router = make_router<Scalar>(c, 5);
  const auto input = reference::uniform<Scalar>(c.tokens, c.dim, 6);
  TopKRouting<Scalar> r;
  router.route(input, RouteOptions{}, r);
  const void* pointers[] = {r.expert_ids.data(), r.gates.data(), r.logits.data(), r.scores.data(),
                            r.group_scores.data(), r.selected_groups.data()};
  TopKRoutingGradient<Scalar> up;
  up.set_zero(r);
  const void* up_pointers[] = {up.gates.data(), up.scores.data(), up.logits.data()};
  auto grads = router.make_gradients();
  Mat<Scalar> dx = Mat<Scalar>::Zero(c.tokens, c.dim);
  router.backward(r, input, up, grads, dx);
  const void* workspace = grads.logits.data();
  router.route(input, RouteOptions{}, r);
  up.set_zero(r);
  router.backward(r, input, up, grads, dx);
  const void* again[] = {r.expert_ids.data(), r.gates.data(), r.logits.data(), r.scores.data(),
                         r.group_scores.data(), r.selected_groups.data()};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(pointers[i], again[i]) << i;
  EXPECT_EQ(up_pointers[0], up.gates.data());
  EXPECT_EQ(up_pointers[1], up.scores.data());
  EXPECT_EQ(up_pointers[2], up.logits.data());
  EXPECT_EQ(workspace, grads.logits.data());
}

TYPED_TEST(SoftmaxRouter, BitwiseIdenticalAcrossThreadCounts) {
  const Case c{1200, 130, 16, options(4, true, 2.0, false, true, 4, 2)};
  router_checks::expect_router_deterministic(make_router<TypeParam>(c, 11), RouteOptions{}, c.tokens);
}

// Finite differences (double) of L = Σ a⊙gates + Σ B⊙scores + Σ C⊙logits + balance + z-loss.
struct GradientCase {
  Case shape;
  sparsemoe::BalanceLossOptions balance;
};

TEST(SoftmaxRouterGradient, MatchesFiniteDifferences) {
  sparsemoe::BalanceLossOptions whole, first_slot, sequences, normalized;
  first_slot.counts = sparsemoe::BalanceCounts::first_slot;
  sequences.sequence_length = 3;
  normalized.normalize_scores = true;
  const std::vector<GradientCase> list{
      {{6, 5, 6, options(2)}, whole},
      {{6, 5, 6, options(2, true)}, first_slot},
      {{6, 5, 6, options(3, true, 2.5)}, sequences},
      {{6, 5, 6, options(2, false, 1.5, true)}, normalized},
      {{6, 5, 6, options(1, false, 1.0, false, true)}, whole},
      {{6, 5, 6, options(6, true, 1.0, false, true)}, sequences},
      {{6, 4, 12, options(3, true, 2.0, false, true, 4, 2)}, whole},
      {{6, 4, 12, options(3, false, 3.0, true, true, 3, 1)}, first_slot},
      {{6, 4, 8, options(2, false, 1.0, false, false, 4, 2)}, sequences},
  };
  std::uint64_t seed = 500;
  for (const GradientCase& gc : list) {
    const Case& c = gc.shape;
    SCOPED_TRACE(describe(c));
    auto router = make_router<double>(c, ++seed);
    router_checks::expect_router_gradients(router, RouteOptions{}, c.tokens, seed + 1, gc.balance);
  }
}

// Each output on its own, so a wrong term cannot hide behind another.
TEST(SoftmaxRouterGradient, EachUpstreamTermSeparately) {
  const Case c{5, 4, 6, options(3, true, 2.0)};
  for (int term = 0; term < 3; ++term) {
    SCOPED_TRACE("term " + std::to_string(term));
    auto router = make_router<double>(c, 900 + static_cast<std::uint64_t>(term));
    const MatrixD input = reference::uniform<double>(c.tokens, c.dim, 910);
    const MatrixD a = reference::uniform<double>(c.tokens, 3, 911);
    const MatrixD b = reference::uniform<double>(c.tokens, 6, 912);
    TopKRouting<double> base;
    router.route(input, RouteOptions{}, base);
    auto loss = [&]() {
      TopKRouting<double> r;
      router.route(input, RouteOptions{}, r);
      if (term == 0) return (a.array() * r.gates.array()).sum();
      if (term == 1) return (b.array() * r.scores.array()).sum();
      return (b.array() * r.logits.array()).sum();
    };
    TopKRoutingGradient<double> up;
    up.set_zero(base);
    if (term == 0) up.gates = a;
    if (term == 1) up.scores = b;
    if (term == 2) up.logits = b;
    auto grads = router.make_gradients();
    MatrixD dx = MatrixD::Zero(c.tokens, c.dim);
    router.backward(base, input, up, grads, dx);
    const auto check = sparsemoe_test::check_gradient(loss, router.weight(), grads.weight);
    EXPECT_LT(check.worst_relative_error, 1e-6) << check;
  }
}

}  // namespace
