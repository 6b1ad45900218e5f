// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of balance_losses.hpp (balance_loss, z_loss and their backward functions) and of
// count_tokens_per_expert, over float and double, on TopKRouting records written by hand (no
// router involved). References: the formulas written out per expert and per sequence in double
// (f_i, P_i, Σ f_i·P_i; Megatron's and Hugging Face Mixtral's forms of the same loss; log-sum-exp
// by a naive loop); gradients by 5-point central differences in double with respect to the
// scores (balance loss) and the logits (z-loss).
#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>

#include "gradient_check.hpp"
#include "router_reference.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using reference::MatrixD;
using sparsemoe::BalanceCounts;
using sparsemoe::BalanceLossOptions;
using sparsemoe::Index;
using sparsemoe::TopKRouting;
using sparsemoe::TopKRoutingGradient;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class BalanceLosses : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(BalanceLosses, Scalars, reference::ScalarNames);

// A routing with random distinct ids per token, softmax scores of random logits, and optionally
// some second slots dropped (id −1, gate 0).
template <typename Scalar>
TopKRouting<Scalar> random_routing(Index tokens, Index experts, Index k, std::uint64_t seed, bool drop = false) {
  TopKRouting<Scalar> r;
  r.logits = reference::uniform<Scalar>(tokens, experts, seed, -3.0, 3.0);
  r.scores.resize(tokens, experts);
  r.expert_ids.resize(tokens, k);
  r.gates = Mat<Scalar>::Zero(tokens, k);
  std::mt19937_64 rng(seed + 1);
  for (Index t = 0; t < tokens; ++t) {
    const auto p = reference::softmax(reference::row(r.logits, t));
    for (Index e = 0; e < experts; ++e) r.scores(t, e) = static_cast<Scalar>(p[static_cast<std::size_t>(e)]);
    std::vector<Index> perm(static_cast<std::size_t>(experts));
    for (Index e = 0; e < experts; ++e) perm[static_cast<std::size_t>(e)] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (Index j = 0; j < k; ++j) r.expert_ids(t, j) = perm[static_cast<std::size_t>(j)];
    if (drop && k > 1 && t % 3 == 1) r.expert_ids(t, k - 1) = -1;
  }
  return r;
}

// α·E·(1/S)·Σ_s Σ_i f_i^s·P_i^s, written out.
template <typename Scalar>
double reference_balance(const TopKRouting<Scalar>& r, double alpha, const BalanceLossOptions& o) {
  const Index tokens = r.expert_ids.rows(), k = r.expert_ids.cols(), experts = r.scores.cols();
  if (tokens == 0) return 0;
  const Index length = o.sequence_length > 0 ? o.sequence_length : tokens;
  const Index sequences = tokens / length;
  const Index slots = o.counts == BalanceCounts::first_slot ? 1 : k;
  double total = 0;
  for (Index s = 0; s < sequences; ++s) {
    double sum_fp = 0;
    for (Index i = 0; i < experts; ++i) {
      double count = 0, mean = 0;
      for (Index t = s * length; t < (s + 1) * length; ++t) {
        for (Index j = 0; j < slots; ++j) count += r.expert_ids(t, j) == i ? 1.0 : 0.0;
        double row_sum = 0;
        for (Index e = 0; e < experts; ++e) row_sum += static_cast<double>(r.scores(t, e));
        mean += static_cast<double>(r.scores(t, i)) / (o.normalize_scores ? row_sum : 1.0);
      }
      const double f = count / static_cast<double>(length * slots);
      sum_fp += f * mean / static_cast<double>(length);
    }
    total += sum_fp;
  }
  return alpha * static_cast<double>(experts) * total / static_cast<double>(sequences);
}

template <typename Scalar>
double reference_z_loss(const TopKRouting<Scalar>& r, double coefficient) {
  const Index tokens = r.logits.rows();
  if (tokens == 0) return 0;
  double total = 0;
  for (Index t = 0; t < tokens; ++t) {
    double sum = 0;
    for (Index e = 0; e < r.logits.cols(); ++e) sum += std::exp(static_cast<double>(r.logits(t, e)));
    total += std::log(sum) * std::log(sum);
  }
  return coefficient * total / static_cast<double>(tokens);
}

std::vector<BalanceLossOptions> variants() {
  std::vector<BalanceLossOptions> list;
  for (const BalanceCounts counts : {BalanceCounts::all_slots, BalanceCounts::first_slot}) {
    for (const Index length : {Index(0), Index(3), Index(4), Index(12)}) {
      for (const bool normalize : {false, true}) {
        BalanceLossOptions o;
        o.counts = counts;
        o.sequence_length = length;
        o.normalize_scores = normalize;
        list.push_back(o);
      }
    }
  }
  return list;
}

std::string describe(const BalanceLossOptions& o) {
  return std::string(o.counts == BalanceCounts::first_slot ? "first_slot" : "all_slots") +
         " sequence_length=" + std::to_string(o.sequence_length) + (o.normalize_scores ? " normalize_scores" : "");
}

TYPED_TEST(BalanceLosses, BalanceLossMatchesReference) {
  using Scalar = TypeParam;
  for (const bool drop : {false, true}) {
    const auto r = random_routing<Scalar>(12, 5, 2, 7, drop);
    for (const auto& o : variants()) {
      SCOPED_TRACE(describe(o) + (drop ? " with dropped slots" : ""));
      const double expected = reference_balance(r, 0.3, o);
      EXPECT_TRUE(reference::close(static_cast<double>(sparsemoe::balance_loss(r, 0.3, o)), expected,
                                   10 * reference::tolerance<Scalar>()));
      sparsemoe::BalanceLossWorkspace workspace;
      EXPECT_TRUE(reference::close(static_cast<double>(sparsemoe::balance_loss(r, 0.3, o, workspace)), expected,
                                   10 * reference::tolerance<Scalar>()));
    }
  }
}

TYPED_TEST(BalanceLosses, UniformRoutingGivesTheCoefficient) {
  using Scalar = TypeParam;
  TopKRouting<Scalar> r;
  r.scores = Mat<Scalar>::Constant(8, 4, Scalar(0.25));
  r.logits = Mat<Scalar>::Zero(8, 4);
  r.expert_ids.resize(8, 1);
  for (Index t = 0; t < 8; ++t) r.expert_ids(t, 0) = t % 4;
  EXPECT_NEAR(static_cast<double>(sparsemoe::balance_loss(r, 0.01)), 0.01, 1e-9);
  // All tokens on expert 0 with all the probability there: α·E.
  r.scores.setZero();
  r.scores.col(0).setOnes();
  r.expert_ids.setZero();
  EXPECT_NEAR(static_cast<double>(sparsemoe::balance_loss(r, 0.01)), 0.04, 1e-9);
}

TYPED_TEST(BalanceLosses, OtherWrittenFormsOfTheSameLoss) {
  using Scalar = TypeParam;
  const Index tokens = 10, experts = 6, k = 3;
  const auto r = random_routing<Scalar>(tokens, experts, k, 21);
  const double alpha = 0.01;
  // Megatron: α·E/(k·T²)·Σ_i (Σ_t p_ti)·count_i.
  double megatron = 0;
  // Hugging Face Mixtral: α·E·Σ_slot Σ_i (count of slot j on i / T)·P_i, k times ours.
  double mixtral = 0;
  for (Index i = 0; i < experts; ++i) {
    double probability_sum = 0, count = 0;
    for (Index t = 0; t < tokens; ++t) probability_sum += static_cast<double>(r.scores(t, i));
    for (Index t = 0; t < tokens; ++t)
      for (Index j = 0; j < k; ++j) count += r.expert_ids(t, j) == i ? 1.0 : 0.0;
    megatron += probability_sum * count;
    mixtral += count / static_cast<double>(tokens) * probability_sum / static_cast<double>(tokens);
  }
  megatron *= alpha * static_cast<double>(experts) / (static_cast<double>(k) * tokens * tokens);
  mixtral *= alpha * static_cast<double>(experts);
  const double ours = static_cast<double>(sparsemoe::balance_loss(r, alpha));
  EXPECT_TRUE(reference::close(ours, megatron, 10 * reference::tolerance<Scalar>()));
  EXPECT_TRUE(reference::close(static_cast<double>(k) * ours, mixtral, 10 * reference::tolerance<Scalar>()));
}

TYPED_TEST(BalanceLosses, FloatStatisticsAreAccumulatedInDouble) {
  using Scalar = TypeParam;
  // 2^18 tokens of score 0.1: a float running sum would be off by percents.
  const Index tokens = Index(1) << 18;
  TopKRouting<Scalar> r;
  r.scores = Mat<Scalar>::Constant(tokens, 2, Scalar(0.1));
  r.logits = Mat<Scalar>::Constant(tokens, 2, Scalar(0.1));
  r.expert_ids = sparsemoe::IndexMatrix::Zero(tokens, 1);
  const double p = static_cast<double>(Scalar(0.1));
  // f = (1, 0), P = (p, p): α·E·p.
  EXPECT_NEAR(static_cast<double>(sparsemoe::balance_loss(r, 1.0)), 2 * p, 1e-6 * p);
  const double lse = p + std::log(2.0);
  EXPECT_NEAR(static_cast<double>(sparsemoe::z_loss(r, 1.0)), lse * lse, 1e-6 * lse * lse);
}

TEST(BalanceLossGradient, MatchesFiniteDifferencesInTheScores) {
  for (const bool drop : {false, true}) {
    auto r = random_routing<double>(12, 5, 2, 31, drop);
    for (const auto& o : variants()) {
      SCOPED_TRACE(describe(o) + (drop ? " with dropped slots" : ""));
      TopKRoutingGradient<double> gradient;
      gradient.set_zero(r);
      gradient.scores.setConstant(0.5);  // backward adds
      sparsemoe::balance_loss_backward(r, 0.7, o, gradient);
      gradient.scores.array() -= 0.5;
      EXPECT_TRUE(gradient.gates.isZero());
      EXPECT_TRUE(gradient.logits.isZero());
      const auto check =
          sparsemoe_test::check_gradient([&]() { return sparsemoe::balance_loss(r, 0.7, o); }, r.scores, gradient.scores);
      EXPECT_LT(check.worst_relative_error, 1e-7) << check;
      EXPECT_GT(check.max_abs_analytic, 1e-3);
    }
  }
}

TYPED_TEST(BalanceLosses, ZLossMatchesReference) {
  using Scalar = TypeParam;
  for (const Index tokens : {Index(0), Index(1), Index(9)}) {
    auto r = random_routing<Scalar>(tokens, 7, 2, 41);
    r.logits.array() *= Scalar(10);  // large logits: the log-sum-exp must subtract the max
    EXPECT_TRUE(reference::close(static_cast<double>(sparsemoe::z_loss(r, 1e-3)), reference_z_loss(r, 1e-3),
                                 10 * reference::tolerance<Scalar>()));
  }
  // Logits of 1000 overflow a naive exp; the value stays finite.
  TopKRouting<Scalar> big = random_routing<Scalar>(2, 3, 1, 5);
  big.logits.setConstant(Scalar(1000));
  const double lse = 1000 + std::log(3.0);
  EXPECT_NEAR(static_cast<double>(sparsemoe::z_loss(big, 1.0)), lse * lse, 1e-6 * lse * lse);
}

TEST(ZLossGradient, MatchesFiniteDifferencesInTheLogits) {
  auto r = random_routing<double>(9, 7, 2, 51);
  TopKRoutingGradient<double> gradient;
  gradient.set_zero(r);
  gradient.logits.setConstant(-1.0);
  sparsemoe::z_loss_backward(r, 0.3, gradient);
  gradient.logits.array() += 1.0;
  EXPECT_TRUE(gradient.scores.isZero());
  const auto check = sparsemoe_test::check_gradient([&]() { return sparsemoe::z_loss(r, 0.3); }, r.logits, gradient.logits);
  EXPECT_LT(check.worst_relative_error, 1e-7) << check;
  EXPECT_GT(check.max_abs_analytic, 1e-3);
}

TYPED_TEST(BalanceLosses, EmptyBatch) {
  using Scalar = TypeParam;
  const auto r = random_routing<Scalar>(0, 4, 2, 1);
  EXPECT_EQ(sparsemoe::balance_loss(r, 0.1), Scalar(0));
  EXPECT_EQ(sparsemoe::z_loss(r, 0.1), Scalar(0));
  TopKRoutingGradient<Scalar> gradient;
  gradient.set_zero(r);
  sparsemoe::balance_loss_backward(r, 0.1, BalanceLossOptions{}, gradient);
  sparsemoe::z_loss_backward(r, 0.1, gradient);
  EXPECT_EQ(gradient.scores.rows(), 0);
}

TYPED_TEST(BalanceLosses, RejectsBadArguments) {
  using Scalar = TypeParam;
  const auto r = random_routing<Scalar>(7, 4, 2, 3);
  BalanceLossOptions o;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::balance_loss(r, std::nan(""), o), "balance_loss", "coefficient", "nan");
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::z_loss(r, std::numeric_limits<double>::infinity()), "z_loss",
                               "coefficient", "inf");
  o.sequence_length = 3;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::balance_loss(r, 0.1, o), "7 tokens", "sequence_length = 3");
  o.sequence_length = -1;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::balance_loss(r, 0.1, o), "sequence_length must be >= 0", "got -1");
  TopKRoutingGradient<Scalar> gradient;
  gradient.set_zero(r);
  gradient.scores.resize(7, 3);
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::balance_loss_backward(r, 0.1, BalanceLossOptions{}, gradient),
                               "balance_loss_backward", "gradient.scores must be 7x4", "got 7x3");
  gradient.logits.resize(6, 4);
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::z_loss_backward(r, 0.1, gradient), "z_loss_backward",
                               "gradient.logits must be 7x4");
}

TYPED_TEST(BalanceLosses, CountTokensPerExpertSkipsDroppedSlots) {
  using Scalar = TypeParam;
  const auto r = random_routing<Scalar>(12, 5, 2, 9, true);
  sparsemoe::IndexVector counts;
  sparsemoe::count_tokens_per_expert(r, counts);
  ASSERT_EQ(counts.size(), 5);
  std::vector<Index> expected(5, 0);
  Index dropped = 0;
  for (Index t = 0; t < 12; ++t)
    for (Index j = 0; j < 2; ++j) {
      if (r.expert_ids(t, j) < 0) ++dropped;
      else ++expected[static_cast<std::size_t>(r.expert_ids(t, j))];
    }
  EXPECT_EQ(dropped, 4);
  for (Index e = 0; e < 5; ++e) EXPECT_EQ(counts[e], expected[static_cast<std::size_t>(e)]);
}

}  // namespace
