// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Expert-choice routing (router/expert_choice.hpp) and ExpertChoiceLayer (expert_choice.hpp):
//   * the router against a naive reference: logits and a softmax in double, each expert's C
//     tokens by a full sort of its column of the stored scores (score descending, token
//     ascending), the capacity by integer arithmetic;
//   * exact ties go to the lower token index; unrouted tokens and per-token counts are reported;
//     no expert ever takes more than C tokens;
//   * the layer's output against y_t = Σ_{i took t} S(t, i)·E_i(x_t) with naive experts;
//   * every gradient (input, router weight, every expert tensor) by central finite differences
//     in double;
//   * bitwise identical forward and backward for 1, 2 and 3 OpenMP threads;
//   * bad input rejected with std::invalid_argument naming the value.
#include <sparsemoe/expert_choice.hpp>
#include <sparsemoe/moe_layer.hpp>
#include <sparsemoe/router/softmax_top_k.hpp>

#include "gradient_check.hpp"
#include "planned_reference.hpp"
#include "reference_gate.hpp"
#include "router_reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using planned_reference::MatrixD;
using planned_reference::random_matrix;
using planned_reference::throws_naming;
using sparsemoe::ExpertChoiceRouter;
using sparsemoe::ExpertChoiceRouterOptions;
using sparsemoe::ExpertChoiceRouting;
using sparsemoe::Index;
using sparsemoe::Mode;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class ExpertChoice : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ExpertChoice, Scalars, reference::ScalarNames);

ExpertChoiceRouterOptions with_factor(double factor) {
  ExpertChoiceRouterOptions options;
  options.capacity_factor = factor;
  return options;
}

/// Expert e's C tokens by a full sort of its column of `scores`: score descending, then token
/// ascending.
template <typename Scores>
std::vector<Index> reference_choice(const Scores& scores, Index expert, Index capacity) {
  std::vector<Index> tokens(static_cast<std::size_t>(scores.rows()));
  std::iota(tokens.begin(), tokens.end(), Index(0));
  std::sort(tokens.begin(), tokens.end(), [&](Index a, Index b) {
    const double sa = static_cast<double>(scores(a, expert)), sb = static_cast<double>(scores(b, expert));
    return sa != sb ? sa > sb : a < b;
  });
  tokens.resize(static_cast<std::size_t>(capacity));
  return tokens;
}

/// Checks a routing against the reference: scores, each expert's tokens, gates, counts.
template <typename Scalar>
void expect_routing_matches_reference(const ExpertChoiceRouter<Scalar>& router, const Mat<Scalar>& x,
                                      const ExpertChoiceRouting<Scalar>& r, Index capacity) {
  const Index tokens = x.rows(), experts = router.num_experts();
  ASSERT_EQ(r.capacity, capacity);
  ASSERT_EQ(r.expert_ids.rows(), tokens);
  ASSERT_EQ(r.expert_ids.cols(), experts);
  const MatrixD z = reference::matmul(x, router.weight());
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> p = reference::softmax(reference::row(z, t));
    for (Index e = 0; e < experts; ++e) {
      EXPECT_TRUE(reference::close(r.scores(t, e), p[static_cast<std::size_t>(e)], reference::tolerance<Scalar>()));
    }
  }
  std::vector<Index> per_token(static_cast<std::size_t>(tokens), 0);
  for (Index e = 0; e < experts; ++e) {
    std::vector<bool> taken(static_cast<std::size_t>(tokens), false);
    for (const Index t : reference_choice(r.scores, e, capacity)) taken[static_cast<std::size_t>(t)] = true;
    Index count = 0;
    for (Index t = 0; t < tokens; ++t) {
      const bool is_taken = taken[static_cast<std::size_t>(t)];
      EXPECT_EQ(r.expert_ids(t, e), is_taken ? e : -1) << "token " << t << ", expert " << e;
      EXPECT_EQ(r.gates(t, e), is_taken ? r.scores(t, e) : Scalar(0)) << "token " << t << ", expert " << e;
      count += is_taken ? 1 : 0;
      per_token[static_cast<std::size_t>(t)] += is_taken ? 1 : 0;
    }
    EXPECT_EQ(count, capacity) << "expert " << e;
  }
  Index unrouted = 0;
  ASSERT_EQ(r.experts_per_token.size(), tokens);
  for (Index t = 0; t < tokens; ++t) {
    EXPECT_EQ(r.experts_per_token[t], per_token[static_cast<std::size_t>(t)]) << "token " << t;
    unrouted += per_token[static_cast<std::size_t>(t)] == 0 ? 1 : 0;
  }
  EXPECT_EQ(r.unrouted_tokens, unrouted);
}

TYPED_TEST(ExpertChoice, RouterMatchesANaiveReference) {
  using Scalar = TypeParam;
  struct Case {
    Index tokens, dim, experts;
    double factor;
    Index capacity;  // expected: ⌈T·f/E⌉ capped at T
  };
  // f = 1.5: ⌈37·1.5/6⌉ = ⌈9.25⌉ = 10; f = 2: ⌈70·2/8⌉ = 18; f = 0.25: ⌈9·0.25/4⌉ = ⌈0.5625⌉ = 1;
  // f = 8 with E = 3: ⌈5·8/3⌉ = 14, capped at T = 5; E = 1; T = 0.
  const std::vector<Case> cases{{37, 5, 6, 1.5, 10}, {70, 4, 8, 2.0, 18}, {9, 3, 4, 0.25, 1},
                                {5, 3, 3, 8.0, 5},   {6, 2, 1, 1.0, 6},   {0, 3, 4, 2.0, 0}};
  for (const Case& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.tokens) + " E=" + std::to_string(c.experts));
    ExpertChoiceRouter<Scalar> router(c.dim, c.experts, with_factor(c.factor));
    router.weight() = reference::uniform<Scalar>(c.dim, c.experts, 11, -2.0, 2.0);
    const Mat<Scalar> x = reference::uniform<Scalar>(c.tokens, c.dim, 12);
    ExpertChoiceRouting<Scalar> r;
    router.route(x, r);
    expect_routing_matches_reference(router, x, r, c.capacity);
  }
}

TEST(ExpertChoiceCapacity, RoundsUpAndCapsAtT) {
  // ⌈T·f/E⌉ by integer arithmetic, for factors exact in binary (num/den).
  for (Index tokens : {0, 1, 7, 10, 64, 1000}) {
    for (Index experts : {1, 3, 4, 16}) {
      for (const auto& [num, den] : std::vector<std::pair<Index, Index>>{{1, 1}, {2, 1}, {5, 4}, {1, 8}, {3, 1}}) {
        const double factor = static_cast<double>(num) / static_cast<double>(den);
        const Index expected = std::min(tokens, (tokens * num + experts * den - 1) / (experts * den));
        EXPECT_EQ(sparsemoe::expert_choice_capacity(tokens, experts, with_factor(factor)), expected)
            << "T=" << tokens << " E=" << experts << " f=" << factor;
      }
    }
  }
  ExpertChoiceRouterOptions explicit_capacity;
  explicit_capacity.capacity = 7;
  EXPECT_EQ(sparsemoe::expert_choice_capacity(100, 4, explicit_capacity), 7);
  EXPECT_EQ(sparsemoe::expert_choice_capacity(5, 4, explicit_capacity), 5);  // C ≤ T
  EXPECT_EQ(sparsemoe::expert_choice_capacity(0, 4, explicit_capacity), 0);
}

TYPED_TEST(ExpertChoice, TiesGoToTheLowerTokenIndex) {
  using Scalar = TypeParam;
  const Index tokens = 10, experts = 4;
  // W_r = 0: every score is 1/E, so each expert takes tokens 0 … C−1 and the rest are unrouted.
  ExpertChoiceRouter<Scalar> router(3, experts, with_factor(1.0));  // C = ⌈10/4⌉ = 3
  ExpertChoiceRouting<Scalar> r;
  router.route(reference::uniform<Scalar>(tokens, 3, 21), r);
  for (Index t = 0; t < tokens; ++t) {
    for (Index e = 0; e < experts; ++e) EXPECT_EQ(r.expert_ids(t, e), t < 3 ? e : -1) << t << ", " << e;
    EXPECT_EQ(r.experts_per_token[t], t < 3 ? experts : 0);
  }
  EXPECT_EQ(r.unrouted_tokens, tokens - 3);
  // Duplicated rows have bitwise equal scores: of two equal candidates at the boundary, the lower
  // token index wins. Rows 2, 5 and 8 are copies; each expert's choice must match the full sort.
  router.weight() = reference::uniform<Scalar>(3, experts, 22, -2.0, 2.0);
  Mat<Scalar> x = reference::uniform<Scalar>(tokens, 3, 23);
  x.row(5) = x.row(2);
  x.row(8) = x.row(2);
  for (Index capacity = 1; capacity <= tokens; ++capacity) {
    ExpertChoiceRouterOptions options;
    options.capacity = capacity;
    ExpertChoiceRouter<Scalar> fixed(3, experts, options);
    fixed.weight() = router.weight();
    fixed.route(x, r);
    expect_routing_matches_reference(fixed, x, r, capacity);
  }
}

// L = Σ A ⊙ gates + Σ B ⊙ scores + Σ C ⊙ logits: backward's ∂W_r and ∂x against central finite
// differences (the gates carry the selection; the scores and logits the direct upstream terms).
TEST(ExpertChoiceRouter, BackwardMatchesFiniteDifferences) {
  const Index tokens = 11, dim = 4, experts = 3;
  ExpertChoiceRouter<double> router(dim, experts, with_factor(1.5));
  router.initialize_uniform(61);
  MatrixD x = random_matrix(tokens, dim, 62);
  const MatrixD a = random_matrix(tokens, experts, 63), b = random_matrix(tokens, experts, 64);
  const MatrixD c = random_matrix(tokens, experts, 65);
  ExpertChoiceRouting<double> routing;
  router.route(x, routing);
  const sparsemoe::IndexMatrix ids = routing.expert_ids;
  bool selection_changed = false;
  const auto loss = [&] {
    ExpertChoiceRouting<double> r;
    router.route(x, r);
    selection_changed = selection_changed || r.expert_ids != ids;
    return (a.array() * r.gates.array()).sum() + (b.array() * r.scores.array()).sum() +
           (c.array() * r.logits.array()).sum();
  };
  sparsemoe::TopKRoutingGradient<double> upstream;
  upstream.set_zero(routing);
  upstream.gates = a;
  upstream.scores = b;
  upstream.logits = c;
  auto gradients = router.make_gradients();
  MatrixD d_x = MatrixD::Zero(tokens, dim);
  router.backward(routing, x, upstream, gradients, d_x);
  const auto weight_check = sparsemoe_test::check_gradient(loss, router.weight(), gradients.weight);
  EXPECT_LT(weight_check.worst_relative_error, 1e-7) << weight_check;
  const auto input_check = sparsemoe_test::check_gradient(loss, x, d_x);
  EXPECT_LT(input_check.worst_relative_error, 1e-7) << input_check;
  EXPECT_FALSE(selection_changed);
  EXPECT_GT(routing.unrouted_tokens + (routing.experts_per_token.array() > 1).count(), 0);
}

TEST(ExpertChoiceRouter, RejectsBadOptionsAndInput) {
  for (const double factor : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    EXPECT_TRUE(throws_naming([&] { ExpertChoiceRouter<float>(3, 4, with_factor(factor)); }, {"capacity factor"}))
        << factor;
  }
  for (const Index capacity : {Index(0), Index(-2)}) {
    ExpertChoiceRouterOptions options;
    options.capacity = capacity;
    EXPECT_TRUE(throws_naming([&] { ExpertChoiceRouter<float>(3, 4, options); },
                              {"capacity must be >= 1", std::to_string(capacity)}));
  }
  EXPECT_TRUE(throws_naming([] { ExpertChoiceRouter<float>(0, 4); }, {"input_dim", "0"}));
  EXPECT_TRUE(throws_naming([] { ExpertChoiceRouter<float>(3, 0); }, {"num_experts", "0"}));
  ExpertChoiceRouter<double> router(3, 4);
  router.initialize_uniform(1);
  ExpertChoiceRouting<double> r;
  EXPECT_TRUE(throws_naming([&] { router.route(MatrixD::Zero(5, 2), r); }, {"3 columns", "5x2"}));
  MatrixD x = random_matrix(6, 3, 2);
  x(4, 1) = std::nan("");
  EXPECT_TRUE(throws_naming([&] { router.route(x, r); }, {"non-finite", "token row 4"}));
}

// ---------------------------------------------------------------------------------------------
// The layer.

using ExpertD = planned_reference::ExpertD;
using LayerD = sparsemoe::ExpertChoiceLayer<double, ExpertD>;

sparsemoe::ExpertChoiceConfig layer_config(Index d, Index h, Index experts, double factor, std::uint64_t seed) {
  auto config = planned_reference::layer_sizes<sparsemoe::ExpertChoiceConfig>(d, h, experts, seed);
  config.router.capacity_factor = factor;
  return config;
}

TEST(ExpertChoiceLayer, ForwardMatchesANaiveReference) {
  const Index d = 6, h = 5, experts = 5, tokens = 40;
  const LayerD layer(layer_config(d, h, experts, 1.0, 3));  // C = 8
  const MatrixD x = random_matrix(tokens, d, 4);
  const auto result = layer.forward(x);
  const Index capacity = 8;
  ASSERT_EQ(result.routing.capacity, capacity);
  EXPECT_TRUE(result.cache.empty());
  const MatrixD z = reference::matmul(x, layer.router().weight());
  std::vector<std::vector<bool>> taken(static_cast<std::size_t>(experts));
  for (Index e = 0; e < experts; ++e) {
    EXPECT_EQ(result.tokens_per_expert()[e], capacity);
    taken[static_cast<std::size_t>(e)].assign(static_cast<std::size_t>(tokens), false);
    for (const Index t : reference_choice(result.routing.scores, e, capacity)) {
      taken[static_cast<std::size_t>(e)][static_cast<std::size_t>(t)] = true;
    }
  }
  Index unrouted = 0;
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> p = reference::softmax(reference::row(z, t));
    std::vector<double> y(static_cast<std::size_t>(d), 0.0);
    bool any = false;
    for (Index e = 0; e < experts; ++e) {
      if (!taken[static_cast<std::size_t>(e)][static_cast<std::size_t>(t)]) continue;
      any = true;
      const std::vector<double> out = planned_reference::naive_expert(layer.expert(e), x, t);
      const double gate = p[static_cast<std::size_t>(e)];
      for (Index i = 0; i < d; ++i) y[static_cast<std::size_t>(i)] += gate * out[static_cast<std::size_t>(i)];
    }
    unrouted += any ? 0 : 1;
    for (Index i = 0; i < d; ++i) EXPECT_NEAR(result.output(t, i), y[static_cast<std::size_t>(i)], 1e-12);
    if (!any) {
      EXPECT_EQ(result.output.row(t).squaredNorm(), 0.0) << "unrouted token " << t;
    }
  }
  EXPECT_EQ(result.routing.unrouted_tokens, unrouted);
  EXPECT_GT(unrouted, 0);  // with f = 1 some tokens are left out
}

TEST(ExpertChoiceLayer, GradientsMatchFiniteDifferences) {
  for (const double factor : {1.0, 2.0}) {
    SCOPED_TRACE("capacity factor " + std::to_string(factor));
    LayerD layer(layer_config(5, 4, 4, factor, 31));
    const auto forward = [&](const MatrixD& x) {
      sparsemoe::PlannedForwardOptions options;
      options.mode = Mode::training;
      return layer.forward(x, options);
    };
    const auto names = planned_reference::expect_gradients_match(layer, 12, 5, 32, forward);
    ASSERT_GE(names.size(), 2u);
    EXPECT_EQ(names[1], "router.weight");
    EXPECT_EQ(names[2], "expert0.w1");
  }
}

// With C = T (capacity factor E) every expert takes every token, and expert choice is the dense
// MoE: the same output, ∂x and gradients (under the same names) as MoELayer with the softmax
// router at k = E and the same weights, a different code path.
TEST(ExpertChoiceLayer, WithCapacityTIsTheDenseMoE) {
  const Index d = 5, h = 4, experts = 3, tokens = 17;
  LayerD choice(layer_config(d, h, experts, static_cast<double>(experts), 71));
  sparsemoe::SoftmaxTopKRouterOptions dense_options;
  dense_options.k = experts;
  sparsemoe::SoftmaxTopKRouter<double> router(d, experts, dense_options);
  router.weight() = choice.router().weight();
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = experts;
  config.k = experts;
  sparsemoe::MoELayer<double, ExpertD, sparsemoe::SoftmaxTopKRouter<double>> dense(config, router);
  for (Index e = 0; e < experts; ++e) dense.expert(e) = choice.expert(e);
  const MatrixD x = random_matrix(tokens, d, 72), d_y = random_matrix(tokens, d, 73);
  sparsemoe::PlannedForwardOptions choice_options;
  choice_options.mode = Mode::training;
  sparsemoe::ForwardOptions dense_forward;
  dense_forward.mode = Mode::training;
  dense_forward.balance_loss_weight = 0;
  const auto a = choice.forward(x, choice_options);
  const auto b = dense.forward(x, dense_forward);
  EXPECT_EQ(a.routing.capacity, tokens);
  EXPECT_EQ(a.routing.unrouted_tokens, 0);
  EXPECT_TRUE(reference::all_close(a.output, b.output, 1e-12));
  auto choice_gradients = choice.make_gradients();
  auto dense_gradients = dense.make_gradients();
  EXPECT_TRUE(reference::all_close(choice.backward(a, d_y, choice_gradients),
                                        dense.backward(b, d_y, dense_gradients), 1e-12));
  const auto ours = choice_gradients.tensors();
  const auto theirs = dense_gradients.tensors();
  ASSERT_EQ(ours.size(), theirs.size());
  for (std::size_t t = 0; t < ours.size(); ++t) {
    EXPECT_EQ(ours[t].name, theirs[t].name);
    EXPECT_TRUE(reference::all_close(ours[t].matrix(), theirs[t].matrix(), 1e-12)) << ours[t].name;
  }
}

TEST(ExpertChoiceLayer, BitwiseIdenticalForAnyThreadCount) {
  using Layer = sparsemoe::ExpertChoiceLayer<float, sparsemoe::SwiGluExpert<float>>;
  Layer layer(layer_config(16, 24, 8, 2.0, 41));
  const sparsemoe::Matrix<float> x = random_matrix(4096, 16, 42).cast<float>();
  const sparsemoe::Matrix<float> d_y = random_matrix(4096, 16, 43).cast<float>();
  planned_reference::expect_bitwise_across_threads([&] {
    sparsemoe::PlannedForwardOptions options;
    options.mode = Mode::training;
    const auto result = layer.forward(x, options);
    auto gradients = layer.make_gradients();
    const sparsemoe::Matrix<float> d_x = layer.backward(result, d_y, gradients);
    std::vector<MatrixD> list{result.output.cast<double>(), d_x.cast<double>(),
                              result.routing.expert_ids.cast<double>()};
    planned_reference::append_tensors(list, gradients.tensors());
    return list;
  });
}

TEST(ExpertChoiceLayer, ReusedResultAndWorkspaceGiveTheSameResults) {
  const LayerD layer(layer_config(6, 5, 4, 1.5, 51));
  LayerD::Result result;
  LayerD::Workspace workspace;
  sparsemoe::PlannedForwardOptions options;
  options.mode = Mode::training;
  auto gradients = layer.make_gradients();
  MatrixD d_x;
  for (std::uint64_t round = 0; round < 3; ++round) {
    const MatrixD x = random_matrix(30 + static_cast<Index>(round), 6, 52 + round);
    layer.forward(x, options, result, workspace);
    const auto fresh = layer.forward(x, options);
    EXPECT_TRUE(router_reference::same(result.output, fresh.output));
    gradients.set_zero();
    layer.backward(result, MatrixD::Ones(x.rows(), 6), gradients, d_x, workspace);
    auto fresh_gradients = layer.make_gradients();
    EXPECT_TRUE(router_reference::same(d_x, layer.backward(fresh, MatrixD::Ones(x.rows(), 6), fresh_gradients)));
  }
}

// Edge shapes: an empty batch, one token, one expert (which then takes ⌈T·f⌉ capped at T).
TEST(ExpertChoiceLayer, EmptyBatchOneTokenAndOneExpert) {
  sparsemoe::PlannedForwardOptions options;
  options.mode = Mode::training;
  for (const auto& [tokens, experts] : std::vector<std::pair<Index, Index>>{{0, 3}, {1, 3}, {7, 1}}) {
    SCOPED_TRACE("T=" + std::to_string(tokens) + " E=" + std::to_string(experts));
    const LayerD layer(layer_config(4, 3, experts, 2.0, 81));
    const MatrixD x = random_matrix(tokens, 4, 82);
    const auto result = layer.forward(x, options);
    ASSERT_EQ(result.output.rows(), tokens);
    EXPECT_EQ(result.routing.capacity, std::min<Index>(tokens, (2 * tokens + experts - 1) / experts));
    for (Index t = 0; t < tokens; ++t) {
      std::vector<double> y(4, 0.0);
      for (Index e = 0; e < experts; ++e) {
        if (result.routing.expert_ids(t, e) < 0) continue;
        const std::vector<double> out = planned_reference::naive_expert(layer.expert(e), x, t);
        for (Index i = 0; i < 4; ++i) y[static_cast<std::size_t>(i)] += result.routing.scores(t, e) * out[static_cast<std::size_t>(i)];
      }
      for (Index i = 0; i < 4; ++i) EXPECT_NEAR(result.output(t, i), y[static_cast<std::size_t>(i)], 1e-12);
    }
    auto gradients = layer.make_gradients();
    const MatrixD d_x = layer.backward(result, MatrixD::Ones(tokens, 4), gradients);
    EXPECT_EQ(d_x.rows(), tokens);
    EXPECT_TRUE(d_x.allFinite());
  }
}

TEST(ExpertChoiceLayer, RejectsBadInput) {
  EXPECT_TRUE(throws_naming([] { LayerD(layer_config(4, 3, 2, 0.0, 1)); }, {"capacity factor", "0"}));
  EXPECT_TRUE(throws_naming([] { LayerD(layer_config(4, 0, 2, 1.0, 1)); }, {"hidden_dim"}));
  const LayerD layer(layer_config(4, 3, 2, 1.0, 1));
  EXPECT_TRUE(throws_naming([&] { layer.forward(MatrixD::Zero(3, 5)); }, {"4 columns", "3x5"}));
  MatrixD x = random_matrix(5, 4, 2);
  x(3, 2) = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(throws_naming([&] { layer.forward(x); }, {"non-finite", "row 3", "column 2", "inf"}));
  auto gradients = layer.make_gradients();
  const auto evaluation = layer.forward(random_matrix(5, 4, 3));
  EXPECT_TRUE(throws_naming([&] { layer.backward(evaluation, MatrixD::Zero(5, 4), gradients); }, {"no cache"}));
  sparsemoe::PlannedForwardOptions options;
  options.mode = Mode::training;
  auto result = layer.forward(random_matrix(5, 4, 3), options);
  EXPECT_TRUE(throws_naming([&] { layer.backward(result, MatrixD::Zero(4, 4), gradients); }, {"d_output", "4x4"}));
  result.plan.token_of_row[0] = (result.plan.token_of_row[0] + 1) % 5;
  EXPECT_TRUE(throws_naming([&] { layer.backward(result, MatrixD::Zero(5, 4), gradients); }, {"disagree"}));
}

}  // namespace
