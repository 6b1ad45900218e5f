// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of SwitchRouter and GShardRouter (router/switch.hpp), over float and double.
// References (router_reference.hpp, reference_gate.hpp):
//   * logits: naive products in double (of x ⊙ m with jitter); scores: softmax in double;
//   * ids: brute force over all 1- and 2-subsets of the stored scores; gates: p, or p/(p₁ + p₂);
//   * the random parts: the documented Philox address re-derived in the test (jitter
//     m = 1 − ε + 2ε·u(seed, step, token, column); GShard keeps the second slot iff
//     u(seed, step, token, 0) < 2·g₂), plus statistics: the jitter's mean and variance, GShard's
//     dispatch count against Σ min(1, 2·g₂) within 5 standard deviations;
//   * backward: 5-point central differences in double through W_r, b_r and the input, with the
//     jitter / drop sample fixed by (seed, step) and a guard against changed decisions;
//   * determinism for a fixed (seed, step), over 1/2/3 OpenMP threads, and argument errors.
#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>
#include <sparsemoe/router/switch.hpp>

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
using router_reference::philox_uniform;
using router_reference::same;
using sparsemoe::GShardRouter;
using sparsemoe::GShardRouterOptions;
using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::RouteOptions;
using sparsemoe::SwitchRouter;
using sparsemoe::SwitchRouterOptions;
using sparsemoe::TopKRouting;
using sparsemoe::TopKRoutingGradient;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class SwitchRouters : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SwitchRouters, Scalars, reference::ScalarNames);

SwitchRouterOptions switch_options(double epsilon, std::uint64_t seed = 1, bool bias = false) {
  SwitchRouterOptions o;
  o.jitter_epsilon = epsilon;
  o.seed = seed;
  o.use_bias = bias;
  return o;
}

GShardRouterOptions gshard_options(std::uint64_t seed = 1, bool bias = false, bool random = true) {
  GShardRouterOptions o;
  o.seed = seed;
  o.use_bias = bias;
  o.random_second_expert = random;
  return o;
}

template <typename Router>
void randomize(Router& router, std::uint64_t seed, double weight_scale = 2.0) {
  using Scalar = typename Router::Scalar;
  router.weight() = reference::uniform<Scalar>(router.input_dim(), router.num_experts(), seed, -weight_scale, weight_scale);
  if (router.bias().size() > 0) router.bias() = reference::uniform<Scalar>(router.num_experts(), 1, seed + 1);
}

struct Shape {
  Index tokens, dim, experts;
};

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> list{{7, 5, 6}, {70, 4, 8}, {1, 1, 2}, {0, 3, 4}, {9, 3, 3}};
  return list;
}

// ---------------------------------------------------------------------------------------------
// Switch.
// ---------------------------------------------------------------------------------------------

template <typename Scalar>
void expect_switch_matches_reference(const SwitchRouter<Scalar>& router, const Mat<Scalar>& input,
                                     const RouteOptions& route, const TopKRouting<Scalar>& r) {
  const double tol = reference::tolerance<Scalar>();
  const Index tokens = input.rows(), experts = router.num_experts(), dim = router.input_dim();
  const bool jitter = route.mode == Mode::training && router.options().jitter_epsilon > 0;
  ASSERT_EQ(r.expert_ids.rows(), tokens);
  ASSERT_EQ(r.expert_ids.cols(), 1);
  ASSERT_EQ(r.gates.cols(), 1);
  ASSERT_EQ(r.scores.cols(), experts);
  EXPECT_EQ(r.jittered(), jitter);
  ASSERT_EQ(r.input_jitter.rows(), jitter ? tokens : 0);
  ASSERT_EQ(r.jittered_input.cols(), jitter ? dim : 0);
  EXPECT_EQ(r.group_scores.size(), 0);
  Mat<Scalar> seen = input;
  if (jitter) {
    const double epsilon = router.options().jitter_epsilon;
    for (Index t = 0; t < tokens; ++t) {
      for (Index c = 0; c < dim; ++c) {
        const double u = philox_uniform(router.options().seed, route.step, static_cast<std::uint64_t>(t),
                                        static_cast<std::uint64_t>(c));
        const auto m = static_cast<Scalar>(1.0 - epsilon + 2.0 * epsilon * u);
        ASSERT_EQ(r.input_jitter(t, c), m) << "jitter (" << t << ", " << c << ")";
        ASSERT_EQ(r.jittered_input(t, c), input(t, c) * m);
        seen(t, c) = input(t, c) * m;
      }
    }
  }
  const MatrixD z = router_reference::logits(seen, router.weight(), router.bias());
  EXPECT_TRUE(reference::all_close(r.logits, z, 10 * tol)) << "logits";
  for (Index t = 0; t < tokens; ++t) {
    const auto p = router_reference::softmax(reference::row(r.logits, t));
    for (Index e = 0; e < experts; ++e)
      EXPECT_TRUE(reference::close(static_cast<double>(r.scores(t, e)), p[static_cast<std::size_t>(e)], 10 * tol));
    const auto ids = router_reference::brute_force_top_k(reference::row(r.scores, t), 1);
    ASSERT_EQ(r.expert_ids(t, 0), ids[0]) << "token " << t;
    EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, 0)), p[static_cast<std::size_t>(ids[0])], 10 * tol));
  }
}

TYPED_TEST(SwitchRouters, SwitchMatchesReference) {
  using Scalar = TypeParam;
  std::uint64_t seed = 40;
  for (const Shape& s : shapes()) {
    for (const double epsilon : {0.0, 0.1}) {
      for (const bool bias : {false, true}) {
        SCOPED_TRACE("T=" + std::to_string(s.tokens) + " E=" + std::to_string(s.experts) +
                     " epsilon=" + std::to_string(epsilon) + (bias ? " bias" : ""));
        SwitchRouter<Scalar> router(s.dim, s.experts, switch_options(epsilon, ++seed, bias));
        randomize(router, seed);
        EXPECT_EQ(router.k(), 1);
        const auto input = reference::uniform<Scalar>(s.tokens, s.dim, seed + 100);
        for (const RouteOptions route : {RouteOptions{Mode::evaluation, 3}, RouteOptions{Mode::training, 3},
                                         RouteOptions{Mode::training, 0xFFFFFFFFu}}) {
          TopKRouting<Scalar> r;
          router.route(input, route, r);
          expect_switch_matches_reference(router, input, route, r);
        }
      }
    }
  }
}

TYPED_TEST(SwitchRouters, JitterStatisticsAndDeterminism) {
  using Scalar = TypeParam;
  const double epsilon = 0.2;
  SwitchRouter<Scalar> router(50, 4, switch_options(epsilon, 9));
  randomize(router, 1);
  const auto input = reference::uniform<Scalar>(400, 50, 2);
  TopKRouting<Scalar> a, b, c, d, eval;
  router.route(input, RouteOptions{Mode::training, 7}, a);
  const double n = static_cast<double>(a.input_jitter.size());
  const double mean = a.input_jitter.template cast<double>().mean();
  const double variance = (a.input_jitter.template cast<double>().array() - 1.0).square().mean();
  // U(1 − ε, 1 + ε): mean 1, variance ε²/3.
  EXPECT_NEAR(mean, 1.0, 5 * epsilon / std::sqrt(3.0 * n));
  EXPECT_NEAR(variance, epsilon * epsilon / 3, 0.05 * epsilon * epsilon / 3);
  EXPECT_GE(static_cast<double>(a.input_jitter.minCoeff()), 1 - epsilon - 1e-7);
  EXPECT_LE(static_cast<double>(a.input_jitter.maxCoeff()), 1 + epsilon + 1e-7);
  // A fixed (seed, step) gives the same bits; another step or seed other draws.
  router.route(input, RouteOptions{Mode::training, 7}, b);
  EXPECT_TRUE(same(a.input_jitter, b.input_jitter));
  EXPECT_TRUE(same(a.logits, b.logits));
  EXPECT_TRUE(same(a.expert_ids, b.expert_ids));
  router.route(input, RouteOptions{Mode::training, 8}, c);
  EXPECT_FALSE(same(a.input_jitter, c.input_jitter));
  SwitchRouter<Scalar> other_seed(50, 4, switch_options(epsilon, 10));
  other_seed.weight() = router.weight();
  other_seed.route(input, RouteOptions{Mode::training, 7}, d);
  EXPECT_FALSE(same(a.input_jitter, d.input_jitter));
  // Evaluation: no jitter, the plain logits.
  router.route(input, RouteOptions{Mode::evaluation, 7}, eval);
  EXPECT_FALSE(eval.jittered());
  SwitchRouter<Scalar> plain(50, 4);
  plain.weight() = router.weight();
  TopKRouting<Scalar> plain_routing;
  plain.route(input, RouteOptions{Mode::training, 7}, plain_routing);
  EXPECT_TRUE(same(eval.logits, plain_routing.logits));
  EXPECT_TRUE(same(eval.expert_ids, plain_routing.expert_ids));
}

TYPED_TEST(SwitchRouters, TiesGoToTheLowerId) {
  using Scalar = TypeParam;
  SwitchRouter<Scalar> switch_router(1, 5);
  GShardRouter<Scalar> gshard(1, 5, gshard_options(3));
  const std::vector<double> z{0, 3, 1, 3, 3};
  for (Index e = 0; e < 5; ++e) {
    switch_router.weight()(0, e) = static_cast<Scalar>(z[static_cast<std::size_t>(e)]);
    gshard.weight()(0, e) = static_cast<Scalar>(z[static_cast<std::size_t>(e)]);
  }
  TopKRouting<Scalar> r;
  switch_router.route(Mat<Scalar>::Ones(3, 1), RouteOptions{}, r);
  EXPECT_EQ(r.expert_ids(0, 0), 1);
  // Equal top two: g₂ = 1/2, so 2·g₂ = 1 and the second expert is always kept.
  for (std::uint64_t step = 0; step < 50; ++step) {
    gshard.route(Mat<Scalar>::Ones(3, 1), RouteOptions{Mode::training, step}, r);
    for (Index t = 0; t < 3; ++t) {
      ASSERT_EQ(r.expert_ids(t, 0), 1);
      ASSERT_EQ(r.expert_ids(t, 1), 3);
      EXPECT_EQ(r.gates(t, 0), Scalar(0.5));
      EXPECT_EQ(r.gates(t, 1), Scalar(0.5));
    }
  }
  // Zero-initialised routers: experts 0 (and 1).
  SwitchRouter<Scalar> zero_switch(2, 4);
  GShardRouter<Scalar> zero_gshard(2, 4);
  zero_switch.route(Mat<Scalar>::Ones(1, 2), RouteOptions{}, r);
  EXPECT_EQ(r.expert_ids(0, 0), 0);
  EXPECT_EQ(r.gates(0, 0), Scalar(0.25));
  zero_gshard.route(Mat<Scalar>::Ones(1, 2), RouteOptions{}, r);
  EXPECT_EQ(r.expert_ids(0, 0), 0);
  EXPECT_EQ(r.expert_ids(0, 1), 1);
}

// ---------------------------------------------------------------------------------------------
// GShard.
// ---------------------------------------------------------------------------------------------

// Checks `r` against the references; returns how many second slots were dispatched.
template <typename Scalar>
Index expect_gshard_matches_reference(const GShardRouter<Scalar>& router, const Mat<Scalar>& input,
                                      const RouteOptions& route, const TopKRouting<Scalar>& r) {
  const double tol = reference::tolerance<Scalar>();
  const Index tokens = input.rows(), experts = router.num_experts();
  const bool sample = route.mode == Mode::training && router.options().random_second_expert;
  EXPECT_EQ(r.expert_ids.rows(), tokens);
  EXPECT_EQ(r.expert_ids.cols(), 2);
  EXPECT_FALSE(r.jittered());
  const MatrixD z = router_reference::logits(input, router.weight(), router.bias());
  EXPECT_TRUE(reference::all_close(r.logits, z, 10 * tol)) << "logits";
  Index kept = 0, near_boundary = 0;
  for (Index t = 0; t < tokens; ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    const auto p = router_reference::softmax(reference::row(r.logits, t));
    for (Index e = 0; e < experts; ++e)
      EXPECT_TRUE(reference::close(static_cast<double>(r.scores(t, e)), p[static_cast<std::size_t>(e)], 10 * tol));
    const auto ids = router_reference::brute_force_top_k(reference::row(r.scores, t), 2);
    const double p1 = p[static_cast<std::size_t>(ids[0])], p2 = p[static_cast<std::size_t>(ids[1])];
    const double g1 = p1 / (p1 + p2), g2 = p2 / (p1 + p2);
    EXPECT_EQ(r.expert_ids(t, 0), ids[0]);
    EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, 0)), g1, 10 * tol)) << "g1 is never renormalised";
    bool keep = true;
    if (sample) {
      const double u = philox_uniform(router.options().seed, route.step, static_cast<std::uint64_t>(t), 0);
      keep = u < 2 * g2;
      if (std::abs(u - 2 * g2) < 1e-5) {
        ++near_boundary;  // rounding of g₂ may decide either way
        keep = r.expert_ids(t, 1) >= 0;
      }
    }
    if (keep) {
      EXPECT_EQ(r.expert_ids(t, 1), ids[1]);
      EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, 1)), g2, 10 * tol));
      ++kept;
    } else {
      EXPECT_EQ(r.expert_ids(t, 1), -1);
      EXPECT_EQ(r.gates(t, 1), Scalar(0));
    }
  }
  EXPECT_LE(near_boundary, 2 + tokens / 1000);
  return kept;
}

TYPED_TEST(SwitchRouters, GShardMatchesReference) {
  using Scalar = TypeParam;
  std::uint64_t seed = 60;
  for (const Shape& s : shapes()) {
    for (const bool bias : {false, true}) {
      SCOPED_TRACE("T=" + std::to_string(s.tokens) + " E=" + std::to_string(s.experts) + (bias ? " bias" : ""));
      GShardRouter<Scalar> router(s.dim, s.experts, gshard_options(++seed, bias));
      randomize(router, seed);
      EXPECT_EQ(router.k(), 2);
      const auto input = reference::uniform<Scalar>(s.tokens, s.dim, seed + 100);
      for (const RouteOptions route : {RouteOptions{Mode::evaluation, 3}, RouteOptions{Mode::training, 3},
                                       RouteOptions{Mode::training, 4}}) {
        TopKRouting<Scalar> r;
        router.route(input, route, r);
        const Index kept = expect_gshard_matches_reference(router, input, route, r);
        if (route.mode == Mode::evaluation) {
          EXPECT_EQ(kept, s.tokens);
        }
      }
      GShardRouter<Scalar> always(s.dim, s.experts, gshard_options(seed, bias, false));
      always.weight() = router.weight();
      always.bias() = router.bias();
      TopKRouting<Scalar> r;
      always.route(input, RouteOptions{Mode::training, 3}, r);
      EXPECT_EQ(expect_gshard_matches_reference(always, input, RouteOptions{Mode::training, 3}, r), s.tokens);
    }
  }
}

TYPED_TEST(SwitchRouters, GShardDropRateMatchesItsProbability) {
  using Scalar = TypeParam;
  const Index tokens = 20000;
  GShardRouter<Scalar> router(6, 8, gshard_options(2024));
  randomize(router, 5, 1.0);
  const auto input = reference::uniform<Scalar>(tokens, 6, 6);
  TopKRouting<Scalar> r;
  router.route(input, RouteOptions{Mode::training, 11}, r);
  double expected = 0, variance = 0;
  for (Index t = 0; t < tokens; ++t) {
    const double p1 = static_cast<double>(r.scores(t, r.expert_ids(t, 0)));
    double p2 = -1;
    for (Index e = 0; e < 8; ++e)
      if (e != r.expert_ids(t, 0)) p2 = std::max(p2, static_cast<double>(r.scores(t, e)));
    const double keep = std::min(1.0, 2 * p2 / (p1 + p2));
    expected += keep;
    variance += keep * (1 - keep);
  }
  Index kept = 0;
  for (Index t = 0; t < tokens; ++t) kept += r.expert_ids(t, 1) >= 0 ? 1 : 0;
  // Not a degenerate case: a good share is dropped, a good share kept.
  EXPECT_GT(expected, 0.3 * tokens);
  EXPECT_LT(expected, 0.95 * tokens);
  EXPECT_NEAR(static_cast<double>(kept), expected, 5 * std::sqrt(variance));
  // Deterministic for a fixed (seed, step); another step drops other tokens.
  TopKRouting<Scalar> again, next;
  router.route(input, RouteOptions{Mode::training, 11}, again);
  EXPECT_TRUE(same(again.expert_ids, r.expert_ids));
  EXPECT_TRUE(same(again.gates, r.gates));
  router.route(input, RouteOptions{Mode::training, 12}, next);
  Index differ = 0;
  for (Index t = 0; t < tokens; ++t) differ += (next.expert_ids(t, 1) >= 0) != (r.expert_ids(t, 1) >= 0) ? 1 : 0;
  EXPECT_GT(differ, tokens / 20);
}

TYPED_TEST(SwitchRouters, RejectsBadArgumentsNamingTheValue) {
  using Scalar = TypeParam;
  EXPECT_INVALID_ARGUMENT_WITH(SwitchRouter<Scalar>(3, 4, switch_options(1.0)), "SwitchRouter",
                               "jitter_epsilon must be in [0, 1)", "got 1");
  EXPECT_INVALID_ARGUMENT_WITH(SwitchRouter<Scalar>(3, 4, switch_options(-0.5)), "got -0.5");
  EXPECT_INVALID_ARGUMENT_WITH(SwitchRouter<Scalar>(3, 4, switch_options(std::nan(""))), "jitter_epsilon", "nan");
  EXPECT_INVALID_ARGUMENT_WITH(SwitchRouter<Scalar>(3, 0), "num_experts must be >= 1", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(SwitchRouter<Scalar>(0, 3), "input_dim must be >= 1", "got 0");
  EXPECT_INVALID_ARGUMENT_WITH(GShardRouter<Scalar>(3, 1), "GShardRouter", "num_experts must be >= 2", "got 1");
  SwitchRouter<Scalar> switch_router(3, 4, switch_options(0.1));
  GShardRouter<Scalar> gshard(3, 4);
  TopKRouting<Scalar> r;
  const RouteOptions far{Mode::training, std::uint64_t{1} << 32};
  EXPECT_INVALID_ARGUMENT_WITH(switch_router.route(Mat<Scalar>::Zero(2, 3), far, r), "step must be < 2^32",
                               "got 4294967296");
  EXPECT_INVALID_ARGUMENT_WITH(gshard.route(Mat<Scalar>::Zero(2, 3), far, r), "GShardRouter::route", "step");
  EXPECT_INVALID_ARGUMENT_WITH(gshard.route(Mat<Scalar>::Zero(2, 2), RouteOptions{}, r), "input must have 3 columns");
  Mat<Scalar> input = Mat<Scalar>::Zero(3, 3);
  input(1, 2) = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_INVALID_ARGUMENT_WITH(switch_router.route(input, RouteOptions{Mode::training, 1}, r),
                               "non-finite router logit", "token row 1");
  EXPECT_INVALID_ARGUMENT_WITH(gshard.route(input, RouteOptions{}, r), "non-finite router logit", "token row 1");
  // A routing without jitter fed to backward with a mismatched upstream.
  input(1, 2) = 0;
  gshard.route(input, RouteOptions{}, r);
  TopKRoutingGradient<Scalar> up;
  up.set_zero(r);
  up.scores.resize(3, 5);
  auto grads = gshard.make_gradients();
  Mat<Scalar> dx = Mat<Scalar>::Zero(3, 3);
  EXPECT_INVALID_ARGUMENT_WITH(gshard.backward(r, input, up, grads, dx), "upstream.scores must be 3x4");
  // A Switch routing is not a GShard routing.
  switch_router.route(input, RouteOptions{}, r);
  up.set_zero(r);
  EXPECT_INVALID_ARGUMENT_WITH(gshard.backward(r, input, up, grads, dx), "routing has E=4, k=1");
}

TYPED_TEST(SwitchRouters, ReusesStorageAndListsTensors) {
  using Scalar = TypeParam;
  SwitchRouter<Scalar> router(5, 4, switch_options(0.1, 1, true));
  randomize(router, 3);
  ASSERT_EQ(router.tensors().size(), 2u);
  EXPECT_EQ(router.tensors()[1].name, "bias");
  EXPECT_TRUE(router.state().empty());
  EXPECT_EQ(router.make_gradients().tensors().size(), 2u);
  const auto input = reference::uniform<Scalar>(30, 5, 4);
  TopKRouting<Scalar> r;
  router.route(input, RouteOptions{Mode::training, 1}, r);
  const void* before[] = {r.expert_ids.data(), r.gates.data(), r.logits.data(), r.scores.data(), r.input_jitter.data(),
                          r.jittered_input.data()};
  router.route(input, RouteOptions{Mode::training, 2}, r);
  const void* after[] = {r.expert_ids.data(), r.gates.data(), r.logits.data(), r.scores.data(), r.input_jitter.data(),
                         r.jittered_input.data()};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(before[i], after[i]) << i;
  GShardRouter<Scalar> gshard(5, 4);
  EXPECT_EQ(gshard.tensors().size(), 1u);
  gshard.initialize_uniform(1);
  EXPECT_FALSE(gshard.weight().isZero());
}

TYPED_TEST(SwitchRouters, BitwiseIdenticalAcrossThreadCounts) {
  using Scalar = TypeParam;
  SwitchRouter<Scalar> switch_router(130, 16, switch_options(0.05, 3, true));
  randomize(switch_router, 4, 0.3);
  router_checks::expect_router_deterministic(switch_router, RouteOptions{Mode::training, 17}, 1200);
  GShardRouter<Scalar> gshard(130, 16, gshard_options(5, true));
  randomize(gshard, 6, 0.3);
  router_checks::expect_router_deterministic(gshard, RouteOptions{Mode::training, 17}, 1200);
}

TYPED_TEST(SwitchRouters, TokenOffsetKeysTheDrawsByGlobalRow) {
  // A batch routed in two parts, each with RouteOptions::token_offset = its first global row,
  // draws what the whole batch draws (jitter, GShard's second-expert samples); offset 0 on the
  // second part draws otherwise. The split is at a multiple of the 64-row tile, so the logits
  // are bitwise too.
  using Scalar = TypeParam;
  const auto input = reference::uniform<Scalar>(300, 20, 8);
  SwitchRouter<Scalar> switch_router(20, 5, switch_options(0.2, 3));
  randomize(switch_router, 4);
  GShardRouter<Scalar> gshard(20, 5, gshard_options(5));
  randomize(gshard, 6);
  TopKRouting<Scalar> whole, tail, unkeyed;
  const auto route = [&](const auto& router) {  // the whole batch, its tail with and without the offset
    router.route(input, RouteOptions{Mode::training, 9}, whole);
    router.route(input.bottomRows(172), RouteOptions{Mode::training, 9, 128}, tail);
    router.route(input.bottomRows(172), RouteOptions{Mode::training, 9, 0}, unkeyed);
  };
  route(switch_router);
  EXPECT_TRUE(tail.input_jitter == whole.input_jitter.bottomRows(172));
  EXPECT_TRUE(tail.expert_ids == whole.expert_ids.bottomRows(172));
  EXPECT_FALSE(unkeyed.input_jitter == whole.input_jitter.bottomRows(172));
  route(gshard);
  EXPECT_TRUE(tail.expert_ids == whole.expert_ids.bottomRows(172));
  EXPECT_TRUE(tail.gates == whole.gates.bottomRows(172));
  EXPECT_FALSE(unkeyed.expert_ids == whole.expert_ids.bottomRows(172));
}

// ---------------------------------------------------------------------------------------------
// Gradients (double).
// ---------------------------------------------------------------------------------------------

TEST(SwitchRouterGradient, MatchesFiniteDifferences) {
  sparsemoe::BalanceLossOptions top1;
  top1.counts = sparsemoe::BalanceCounts::first_slot;
  for (const double epsilon : {0.0, 0.3}) {
    for (const bool bias : {false, true}) {
      SCOPED_TRACE("epsilon " + std::to_string(epsilon) + (bias ? " bias" : ""));
      SwitchRouter<double> router(5, 6, switch_options(epsilon, 8, bias));
      randomize(router, 81);
      router_checks::expect_router_gradients(router, RouteOptions{Mode::training, 2}, 6, 82, top1);
      router_checks::expect_router_gradients(router, RouteOptions{Mode::evaluation, 2}, 6, 83,
                                             sparsemoe::BalanceLossOptions{});
    }
  }
}

TEST(GShardRouterGradient, MatchesFiniteDifferencesWithDroppedSlots) {
  sparsemoe::BalanceLossOptions top1;
  top1.counts = sparsemoe::BalanceCounts::first_slot;
  for (const bool bias : {false, true}) {
    SCOPED_TRACE(bias ? "bias" : "no bias");
    GShardRouter<double> router(5, 6, gshard_options(12, bias));
    randomize(router, 91);
    const RouteOptions training{Mode::training, 4};
    // The data must contain both a dropped and a dispatched second slot.
    TopKRouting<double> r;
    router.route(reference::uniform<double>(8, 5, 92), training, r);
    Index dropped = 0;
    for (Index t = 0; t < 8; ++t) dropped += r.expert_ids(t, 1) < 0 ? 1 : 0;
    EXPECT_GT(dropped, 0);
    EXPECT_LT(dropped, 8);
    router_checks::expect_router_gradients(router, training, 8, 92, top1);
    router_checks::expect_router_gradients(router, RouteOptions{Mode::evaluation, 4}, 8, 93,
                                           sparsemoe::BalanceLossOptions{});
  }
}

}  // namespace
