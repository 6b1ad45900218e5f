// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of NoisyTopKGate and Routing (gate.hpp), over float and double. References:
//   * logits, raw noise and noise scale: naive loops in double, softplus written here;
//   * expert ids, kth_expert, next_expert: a full sort in double of (noisy logit descending,
//     NaN last, index ascending) per token; gates: a softmax in double over the chosen logits;
//   * the noise: per-expert mean and standard deviation over many samples against 0 and s (a
//     statistical test, several standard errors), selection frequencies, correlations;
//   * backward: central finite differences in double of a scalar loss built from the public
//     route(), importance(), load() and auxiliary_losses(), with the noise sample held fixed;
//   * argument checks: std::invalid_argument naming the function and the sizes / token row.
#include <sparsemoe/gate.hpp>
#include <sparsemoe/losses.hpp>

#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using reference::MatrixD;
using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::NoisyTopKGate;
using sparsemoe::Routing;

template <typename Scalar>
class Gate : public ::testing::Test {};

// Runs the enclosed region's OpenMP loops on one thread (restored on exit). Used only where a
// test makes thousands of tiny reference calls (finite differences, per-step sampling): thread
// start-up would dominate, and badly so on a loaded machine. Results never depend on the thread
// count (RoutingDoesNotDependOnThreadCount checks that).
class SerialRegion {
 public:
#ifdef _OPENMP
  SerialRegion() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SerialRegion() { omp_set_num_threads(saved_); }

 private:
  int saved_;
#else
  SerialRegion() {}  // user-provided: no unused-variable warning at the call sites
#endif
};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Gate, Scalars, reference::ScalarNames);

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
NoisyTopKGate<Scalar> make_gate(Index dim, Index experts, Index k, std::uint64_t seed, double epsilon = 0.01,
                                double weight_scale = 1.0) {
  NoisyTopKGate<Scalar> gate(dim, experts, k, static_cast<Scalar>(epsilon), seed);
  gate.gate_weight() = reference::uniform<Scalar>(dim, experts, seed * 3 + 1, -weight_scale, weight_scale);
  gate.noise_weight() = reference::uniform<Scalar>(dim, experts, seed * 3 + 2, -weight_scale, weight_scale);
  return gate;
}

// Same shape and bitwise equal entries (shapes first: Eigen's == asserts on a shape mismatch).
template <typename A, typename B>
bool same(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && a == b;
}

template <typename Scalar>
bool identical(const Routing<Scalar>& a, const Routing<Scalar>& b);

const char* mode_name(Mode mode) { return mode == Mode::training ? "training" : "evaluation"; }

// Checks every field of `r` against the independent references. Assumes finite logits.
template <typename Scalar>
void expect_routing_matches_reference(const NoisyTopKGate<Scalar>& gate, const Mat<Scalar>& input,
                                      const Routing<Scalar>& r, Mode mode, std::uint64_t step) {
  const double tol = reference::tolerance<Scalar>();
  const Index tokens = input.rows();
  const Index experts = gate.num_experts();
  const Index k = gate.k();
  const bool training = mode == Mode::training;
  const bool smooth = training && k < experts;

  ASSERT_EQ(r.expert_ids.rows(), tokens);
  ASSERT_EQ(r.expert_ids.cols(), k);
  ASSERT_EQ(r.gates.rows(), tokens);
  ASSERT_EQ(r.gates.cols(), k);
  ASSERT_EQ(r.clean_logits.rows(), tokens);
  ASSERT_EQ(r.clean_logits.cols(), experts);
  ASSERT_EQ(r.noisy_logits.rows(), tokens);
  ASSERT_EQ(r.noisy_logits.cols(), experts);
  EXPECT_EQ(r.num_tokens(), tokens);
  EXPECT_EQ(r.k(), k);
  EXPECT_EQ(r.num_experts(), experts);
  EXPECT_EQ(r.noisy(), training);
  EXPECT_EQ(r.has_smooth_load(), smooth);
  const Index noise_rows = training ? tokens : 0;
  const Index noise_cols = training ? experts : 0;
  ASSERT_EQ(r.raw_noise.rows(), noise_rows);
  ASSERT_EQ(r.raw_noise.cols(), noise_cols);
  ASSERT_EQ(r.noise_scale.rows(), noise_rows);
  ASSERT_EQ(r.noise_scale.cols(), noise_cols);
  ASSERT_EQ(r.noise.rows(), noise_rows);
  ASSERT_EQ(r.noise.cols(), noise_cols);
  ASSERT_EQ(r.kth_expert.size(), smooth ? tokens : 0);
  ASSERT_EQ(r.next_expert.size(), smooth ? tokens : 0);

  // Logits: naive products in double.
  const MatrixD clean = reference::matmul(input, gate.gate_weight());
  EXPECT_TRUE(reference::all_close(r.clean_logits, clean, 10 * tol)) << "clean_logits";
  if (training) {
    const MatrixD raw = reference::matmul(input, gate.noise_weight());
    EXPECT_TRUE(reference::all_close(r.raw_noise, raw, 10 * tol)) << "raw_noise";
    MatrixD scale(tokens, experts), noisy(tokens, experts);
    for (Index t = 0; t < tokens; ++t) {
      for (Index e = 0; e < experts; ++e) {
        scale(t, e) = reference::softplus(raw(t, e)) + static_cast<double>(gate.noise_epsilon());
        noisy(t, e) = clean(t, e) + static_cast<double>(r.noise(t, e)) * scale(t, e);
        // The documented noise address: (noise_seed, step, token, expert).
        ASSERT_EQ(r.noise(t, e), static_cast<Scalar>(sparsemoe::detail::standard_normal(
                                     gate.noise_seed(), step, static_cast<std::uint64_t>(t),
                                     static_cast<std::uint64_t>(e))))
            << "noise (" << t << ", " << e << ")";
      }
    }
    EXPECT_TRUE(reference::all_close(r.noise_scale, scale, 10 * tol)) << "noise_scale";
    EXPECT_TRUE(reference::all_close(r.noisy_logits, noisy, 20 * tol)) << "noisy_logits";
  } else {
    EXPECT_TRUE(same(r.noisy_logits, r.clean_logits)) << "evaluation: noisy_logits must equal clean_logits";
  }

  // Top-k, kth/next and gates against a full sort of the stored noisy logits.
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> h = reference::row(r.noisy_logits, t);
    const std::vector<Index> ranked = reference::ranking(h);
    std::vector<double> chosen;
    for (Index j = 0; j < k; ++j) {
      ASSERT_EQ(r.expert_ids(t, j), ranked[static_cast<std::size_t>(j)]) << "token " << t << " slot " << j;
      chosen.push_back(h[static_cast<std::size_t>(ranked[static_cast<std::size_t>(j)])]);
    }
    if (smooth) {
      EXPECT_EQ(r.kth_expert[t], ranked[static_cast<std::size_t>(k - 1)]) << "kth_expert of token " << t;
      EXPECT_EQ(r.next_expert[t], ranked[static_cast<std::size_t>(k)]) << "next_expert of token " << t;
    }
    const std::vector<double> g = reference::softmax(chosen);
    double sum = 0;
    for (Index j = 0; j < k; ++j) {
      EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, j)), g[static_cast<std::size_t>(j)], 10 * tol))
          << "gate (" << t << ", " << j << ")";
      sum += static_cast<double>(r.gates(t, j));
    }
    EXPECT_NEAR(sum, 1.0, 10 * tol) << "gates of token " << t << " must sum to 1";
  }
}

struct Shape {
  Index tokens, dim, experts, k;
};

std::string describe(const Shape& s) {
  return "T=" + std::to_string(s.tokens) + " d=" + std::to_string(s.dim) + " E=" + std::to_string(s.experts) +
         " k=" + std::to_string(s.k);
}

// Covers k = 1, k = E, E = 1, several row tiles (T > 64) and the top-k buffer sizes around its
// 65-entry stack (k + 1 = 65 and 66 in training).
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> list{{1, 1, 1, 1},   {5, 3, 1, 1},   {17, 4, 5, 1},  {17, 4, 5, 3},
                                       {17, 4, 5, 5},  {70, 8, 8, 2},  {130, 16, 16, 4}, {3, 5, 70, 66},
                                       {4, 3, 80, 80}, {2, 3, 67, 64}, {2, 3, 67, 65}, {0, 4, 5, 2}};
  return list;
}

TYPED_TEST(Gate, RouteMatchesBruteForceInEvaluation) {
  using Scalar = TypeParam;
  std::uint64_t seed = 10;
  for (const Shape& s : shapes()) {
    SCOPED_TRACE(describe(s));
    const auto gate = make_gate<Scalar>(s.dim, s.experts, s.k, ++seed);
    const auto input = reference::uniform<Scalar>(s.tokens, s.dim, seed + 1000);
    const auto r = gate.route(input, Mode::evaluation);
    expect_routing_matches_reference(gate, input, r, Mode::evaluation, 0);
  }
}

TYPED_TEST(Gate, RouteMatchesBruteForceInTraining) {
  using Scalar = TypeParam;
  std::uint64_t seed = 20;
  for (const Shape& s : shapes()) {
    for (std::uint64_t step : {std::uint64_t{0}, std::uint64_t{7}, std::uint64_t{0xFFFFFFFF}}) {
      SCOPED_TRACE(describe(s) + " step " + std::to_string(step));
      const auto gate = make_gate<Scalar>(s.dim, s.experts, s.k, ++seed);
      const auto input = reference::uniform<Scalar>(s.tokens, s.dim, seed + 1000);
      const auto r = gate.route(input, Mode::training, step);
      expect_routing_matches_reference(gate, input, r, Mode::training, step);
    }
  }
}

TYPED_TEST(Gate, DefaultParametersAndAccessors) {
  using Scalar = TypeParam;
  const NoisyTopKGate<Scalar> gate(6, 4, 2, Scalar(0.25), 99);
  EXPECT_EQ(gate.input_dim(), 6);
  EXPECT_EQ(gate.num_experts(), 4);
  EXPECT_EQ(gate.k(), 2);
  EXPECT_EQ(gate.noise_epsilon(), Scalar(0.25));
  EXPECT_EQ(gate.noise_seed(), 99u);
  EXPECT_TRUE(gate.check_finite());
  // Zero-initialised ("no signal and some noise").
  EXPECT_TRUE(gate.gate_weight() == Mat<Scalar>::Zero(6, 4));
  EXPECT_TRUE(gate.noise_weight() == Mat<Scalar>::Zero(6, 4));
  // With zero weights every clean logit is 0: evaluation picks experts 0..k-1 with gates 1/k.
  const auto r = gate.route(reference::uniform<Scalar>(9, 6, 1), Mode::evaluation);
  for (Index t = 0; t < 9; ++t) {
    EXPECT_EQ(r.expert_ids(t, 0), 0);
    EXPECT_EQ(r.expert_ids(t, 1), 1);
    EXPECT_NEAR(static_cast<double>(r.gates(t, 0)), 0.5, reference::tolerance<Scalar>());
    EXPECT_NEAR(static_cast<double>(r.gates(t, 1)), 0.5, reference::tolerance<Scalar>());
  }
}

TYPED_TEST(Gate, InitializeUniform) {
  using Scalar = TypeParam;
  NoisyTopKGate<Scalar> a(16, 5, 2), b(16, 5, 2), c(16, 5, 2);
  a.initialize_uniform(7);
  b.initialize_uniform(7);
  c.initialize_uniform(8);
  const double bound = 1.0 / std::sqrt(16.0);
  EXPECT_TRUE(a.gate_weight() == b.gate_weight());
  EXPECT_TRUE(a.noise_weight() == b.noise_weight());
  EXPECT_FALSE(a.gate_weight() == c.gate_weight());
  EXPECT_FALSE(a.gate_weight() == a.noise_weight());
  for (const auto* m : {&a.gate_weight(), &a.noise_weight()}) {
    EXPECT_LE(static_cast<double>(m->cwiseAbs().maxCoeff()), bound);
    EXPECT_GT(static_cast<double>(m->cwiseAbs().maxCoeff()), 0.5 * bound);  // spread over the range
  }
  auto views = a.tensors();
  ASSERT_EQ(views.size(), 2u);
  EXPECT_EQ(views[0].name, "gate_weight");
  EXPECT_EQ(views[0].data, a.gate_weight().data());
  EXPECT_EQ(views[1].name, "noise_weight");
  EXPECT_EQ(views[1].data, a.noise_weight().data());
  EXPECT_EQ(views[1].rows, 16);
  EXPECT_EQ(views[1].cols, 5);
}

// --- ties --------------------------------------------------------------------------------------

TYPED_TEST(Gate, ExactTiesBreakToLowerId) {
  using Scalar = TypeParam;
  // Small integers: every product and sum is exact, so equal columns give bitwise equal logits
  // whatever the summation order, and the small range makes many further exact ties.
  const Index dim = 4, experts = 7, tokens = 60;
  Mat<Scalar> weight = reference::integers<Scalar>(dim, experts, 5, -2, 2);
  weight.col(3) = weight.col(1);
  weight.col(5) = weight.col(0);
  weight.col(6) = weight.col(1);
  const Mat<Scalar> input = reference::integers<Scalar>(tokens, dim, 6, -3, 3);
  for (Index k : {1, 2, 3, 4, 7}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    NoisyTopKGate<Scalar> gate(dim, experts, k);
    gate.gate_weight() = weight;
    const auto r = gate.route(input, Mode::evaluation);
    expect_routing_matches_reference(gate, input, r, Mode::evaluation, 0);
    Index boundary_ties = 0;
    for (Index t = 0; t < tokens; ++t) {
      // Explicitly: a tied pair inside the top-k is in ascending id order, and an expert left out
      // with the same logit as the k-th chosen one has a larger id.
      for (Index j = 0; j + 1 < k; ++j) {
        if (r.noisy_logits(t, r.expert_ids(t, j)) == r.noisy_logits(t, r.expert_ids(t, j + 1))) {
          EXPECT_LT(r.expert_ids(t, j), r.expert_ids(t, j + 1));
        }
      }
      const Index last = r.expert_ids(t, k - 1);
      for (Index e = 0; e < experts; ++e) {
        bool chosen = false;
        for (Index j = 0; j < k; ++j) chosen = chosen || r.expert_ids(t, j) == e;
        if (!chosen && r.noisy_logits(t, e) == r.noisy_logits(t, last)) {
          EXPECT_GT(e, last) << "token " << t;
          ++boundary_ties;
        }
      }
    }
    if (k < experts) {
      EXPECT_GT(boundary_ties, 0) << "the data must contain ties at the top-k boundary";
    }
  }
}

TYPED_TEST(Gate, DuplicatedColumnsGiveEqualGates) {
  using Scalar = TypeParam;
  // Expert 2 duplicates expert 4 and dominates: for k = 2 both are chosen, 2 first, equal gates.
  NoisyTopKGate<Scalar> gate(2, 5, 2);
  gate.gate_weight() << 1, 0, 3, 0, 3, 0, 1, 1, 1, 1;
  Mat<Scalar> input(3, 2);
  input << 1, 0, 2, 1, 0.5, 0.25;
  const auto r = gate.route(input, Mode::evaluation);
  for (Index t = 0; t < 3; ++t) {
    EXPECT_EQ(r.expert_ids(t, 0), 2);
    EXPECT_EQ(r.expert_ids(t, 1), 4);
    EXPECT_NEAR(static_cast<double>(r.gates(t, 0)), 0.5, reference::tolerance<Scalar>());
    EXPECT_NEAR(static_cast<double>(r.gates(t, 1)), 0.5, reference::tolerance<Scalar>());
  }
}

TYPED_TEST(Gate, LargeLogitsGiveFiniteGates) {
  using Scalar = TypeParam;
  // Logits far beyond exp's range (exp(±2000) overflows / underflows in float and double): the
  // softmax must subtract the maximum and still give the softmax of the differences.
  for (double offset : {2000.0, -2000.0, 1e6}) {
    NoisyTopKGate<Scalar> gate(1, 5, 3, Scalar(0.01), 9);
    gate.gate_weight() << Scalar(offset), Scalar(offset + 0.5), Scalar(offset - 1), Scalar(offset + 1.5),
        Scalar(offset - 0.25);
    const Mat<Scalar> input = Mat<Scalar>::Ones(4, 1);
    for (Mode mode : {Mode::evaluation, Mode::training}) {
      SCOPED_TRACE(std::string(mode_name(mode)) + " offset " + std::to_string(offset));
      const auto r = gate.route(input, mode, 3);
      expect_routing_matches_reference(gate, input, r, mode, 3);
      EXPECT_TRUE(r.gates.allFinite());
    }
  }
}

TYPED_TEST(Gate, RouteIntoReusedRoutingMatchesFreshRoute) {
  using Scalar = TypeParam;
  // The overload that writes into an existing Routing must not depend on what it held: other T,
  // other mode, other E and k (from another gate), previous smooth-load fields.
  const auto gate = make_gate<Scalar>(5, 8, 3, 500);
  const auto other = make_gate<Scalar>(5, 4, 4, 501);
  Routing<Scalar> reused;
  other.route(reference::uniform<Scalar>(20, 5, 502), Mode::training, 1, reused);
  struct Call {
    Index tokens;
    Mode mode;
    std::uint64_t step;
  };
  std::uint64_t seed = 510;
  for (const Call& c : {Call{70, Mode::training, 2}, Call{5, Mode::evaluation, 0}, Call{130, Mode::training, 3},
                        Call{0, Mode::training, 4}, Call{9, Mode::training, 5}, Call{9, Mode::evaluation, 5},
                        Call{70, Mode::training, 2}}) {
    SCOPED_TRACE("T=" + std::to_string(c.tokens) + " " + mode_name(c.mode));
    const auto input = reference::uniform<Scalar>(c.tokens, 5, ++seed);
    gate.route(input, c.mode, c.step, reused);
    expect_routing_matches_reference(gate, input, reused, c.mode, c.step);
    EXPECT_TRUE(identical(reused, gate.route(input, c.mode, c.step)));
  }
}

// --- noise -------------------------------------------------------------------------------------

TYPED_TEST(Gate, EvaluationHasNoNoise) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(5, 6, 2, 3);
  const auto input = reference::uniform<Scalar>(40, 5, 4);
  const auto r0 = gate.route(input, Mode::evaluation, 0);
  const auto r9 = gate.route(input, Mode::evaluation, 9);
  EXPECT_FALSE(r0.noisy());
  EXPECT_FALSE(r0.has_smooth_load());
  EXPECT_EQ(r0.noise.size(), 0);
  EXPECT_EQ(r0.noise_scale.size(), 0);
  EXPECT_EQ(r0.raw_noise.size(), 0);
  EXPECT_TRUE(same(r0.noisy_logits, r0.clean_logits));
  // The step only selects the noise sample: evaluation ignores it.
  EXPECT_TRUE(same(r0.expert_ids, r9.expert_ids));
  EXPECT_TRUE(same(r0.gates, r9.gates));
  EXPECT_TRUE(same(r0.noisy_logits, r9.noisy_logits));
}

TYPED_TEST(Gate, NoiseScaleIsSoftplusPlusEpsilonAtExtremes) {
  using Scalar = TypeParam;
  // d = 1, x = 1: the raw noise is the noise weight itself, from far negative to far positive.
  const std::vector<double> raw{-100, -30, -5, -0.5, 0, 0.5, 5, 30, 100};
  const Index experts = static_cast<Index>(raw.size());
  for (double epsilon : {1e-2, 0.5, 1e-6}) {
    NoisyTopKGate<Scalar> gate(1, experts, 3, static_cast<Scalar>(epsilon), 5);
    for (Index e = 0; e < experts; ++e) gate.noise_weight()(0, e) = static_cast<Scalar>(raw[static_cast<std::size_t>(e)]);
    const Mat<Scalar> input = Mat<Scalar>::Ones(2, 1);
    const auto r = gate.route(input, Mode::training, 1);
    for (Index t = 0; t < 2; ++t) {
      for (Index e = 0; e < experts; ++e) {
        const double expected = reference::softplus(raw[static_cast<std::size_t>(e)]) + static_cast<double>(static_cast<Scalar>(epsilon));
        EXPECT_TRUE(reference::close(static_cast<double>(r.noise_scale(t, e)) / expected, 1.0,
                                     10 * reference::tolerance<Scalar>()))
            << "raw " << raw[static_cast<std::size_t>(e)] << " epsilon " << epsilon << ": " << r.noise_scale(t, e)
            << " vs " << expected;
        EXPECT_GT(r.noise_scale(t, e), Scalar(0));
      }
    }
  }
}

TYPED_TEST(Gate, NoiseHasMeanZeroAndStdScalePerExpert) {
  using Scalar = TypeParam;
  // T = 20000 copies of one input row: per expert, H − c over the tokens is s·n with n ~ N(0, 1).
  const Index dim = 3, experts = 5, tokens = 20000;
  const auto gate = make_gate<Scalar>(dim, experts, 2, 31, 0.01, 1.5);
  const Mat<Scalar> row = reference::uniform<Scalar>(1, dim, 32);
  const Mat<Scalar> input = row.replicate(tokens, 1);
  const auto r = gate.route(input, Mode::training, 5);
  const MatrixD c = reference::matmul(row, gate.gate_weight());
  const MatrixD raw = reference::matmul(row, gate.noise_weight());
  const double n = static_cast<double>(tokens);
  std::vector<std::vector<double>> samples(static_cast<std::size_t>(experts));
  for (Index e = 0; e < experts; ++e) {
    const double s = reference::softplus(raw(0, e)) + static_cast<double>(gate.noise_epsilon());
    auto& x = samples[static_cast<std::size_t>(e)];
    for (Index t = 0; t < tokens; ++t) x.push_back(static_cast<double>(r.noisy_logits(t, e)) - c(0, e));
    double mean = 0;
    for (double v : x) mean += v;
    mean /= n;
    double var = 0;
    for (double v : x) var += (v - mean) * (v - mean);
    const double sd = std::sqrt(var / (n - 1));
    EXPECT_NEAR(mean, 0.0, 5.0 * s / std::sqrt(n)) << "expert " << e << " (s = " << s << ")";
    EXPECT_NEAR(sd, s, 5.0 * s / std::sqrt(2.0 * n)) << "expert " << e << " (s = " << s << ")";
  }
  // Experts draw independent noise: pairwise correlations ~ 0.
  for (Index a = 0; a < experts; ++a) {
    for (Index b = a + 1; b < experts; ++b) {
      const auto& x = samples[static_cast<std::size_t>(a)];
      const auto& y = samples[static_cast<std::size_t>(b)];
      double mx = 0, my = 0;
      for (Index t = 0; t < tokens; ++t) {
        mx += x[static_cast<std::size_t>(t)];
        my += y[static_cast<std::size_t>(t)];
      }
      mx /= n;
      my /= n;
      double sxy = 0, sxx = 0, syy = 0;
      for (std::size_t t = 0; t < x.size(); ++t) {
        sxy += (x[t] - mx) * (y[t] - my);
        sxx += (x[t] - mx) * (x[t] - mx);
        syy += (y[t] - my) * (y[t] - my);
      }
      EXPECT_LT(std::abs(sxy / std::sqrt(sxx * syy)), 5.0 / std::sqrt(n)) << "experts " << a << ", " << b;
    }
  }
}

TYPED_TEST(Gate, NoiseAcrossStepsHasMeanZeroAndStdScale) {
  using Scalar = TypeParam;
  // One token routed at 4000 steps: the step alone must give fresh N(0, s²) noise.
  const Index dim = 2, experts = 3, steps = 4000;
  const auto gate = make_gate<Scalar>(dim, experts, 1, 41);
  const Mat<Scalar> input = reference::uniform<Scalar>(1, dim, 42);
  const MatrixD c = reference::matmul(input, gate.gate_weight());
  const MatrixD raw = reference::matmul(input, gate.noise_weight());
  std::vector<double> sum(experts, 0.0), sum_sq(experts, 0.0);
  const SerialRegion serial;
  for (Index step = 0; step < steps; ++step) {
    const auto r = gate.route(input, Mode::training, static_cast<std::uint64_t>(step));
    for (Index e = 0; e < experts; ++e) {
      const double d = static_cast<double>(r.noisy_logits(0, e)) - c(0, e);
      sum[static_cast<std::size_t>(e)] += d;
      sum_sq[static_cast<std::size_t>(e)] += d * d;
    }
  }
  const double n = static_cast<double>(steps);
  for (Index e = 0; e < experts; ++e) {
    const double s = reference::softplus(raw(0, e)) + static_cast<double>(gate.noise_epsilon());
    const double mean = sum[static_cast<std::size_t>(e)] / n;
    const double sd = std::sqrt((sum_sq[static_cast<std::size_t>(e)] - n * mean * mean) / (n - 1));
    EXPECT_NEAR(mean, 0.0, 5.0 * s / std::sqrt(n)) << "expert " << e;
    EXPECT_NEAR(sd, s, 5.0 * s / std::sqrt(2.0 * n)) << "expert " << e;
  }
}

TYPED_TEST(Gate, EqualCleanLogitsAreChosenUniformly) {
  using Scalar = TypeParam;
  // Zero weights: every expert has c = 0 and the same s, so the noise alone picks; each expert
  // must be in the top k with probability k/E (no bias towards low ids).
  const Index experts = 5, k = 2, tokens = 20000;
  const NoisyTopKGate<Scalar> gate(3, experts, k, Scalar(0.01), 77);
  const auto r = gate.route(reference::uniform<Scalar>(tokens, 3, 78), Mode::training, 3);
  std::vector<double> count(experts, 0.0), first(experts, 0.0);
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) count[static_cast<std::size_t>(r.expert_ids(t, j))] += 1;
    first[static_cast<std::size_t>(r.expert_ids(t, 0))] += 1;
  }
  const double p = static_cast<double>(k) / experts, q = 1.0 / experts, n = static_cast<double>(tokens);
  for (Index e = 0; e < experts; ++e) {
    EXPECT_NEAR(count[static_cast<std::size_t>(e)], n * p, 5.0 * std::sqrt(n * p * (1 - p))) << "expert " << e;
    EXPECT_NEAR(first[static_cast<std::size_t>(e)], n * q, 5.0 * std::sqrt(n * q * (1 - q))) << "expert " << e;
  }
}

// --- determinism -------------------------------------------------------------------------------

template <typename Scalar>
bool identical(const Routing<Scalar>& a, const Routing<Scalar>& b) {
  return same(a.expert_ids, b.expert_ids) && same(a.gates, b.gates) && same(a.clean_logits, b.clean_logits) &&
         same(a.noisy_logits, b.noisy_logits) && same(a.raw_noise, b.raw_noise) &&
         same(a.noise_scale, b.noise_scale) && same(a.noise, b.noise) && same(a.kth_expert, b.kth_expert) &&
         same(a.next_expert, b.next_expert);
}

template <typename Scalar>
double fraction_equal(const Mat<Scalar>& a, const Mat<Scalar>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols() || a.size() == 0) return 1.0;  // fails the callers' checks
  return static_cast<double>((a.array() == b.array()).count()) / static_cast<double>(a.size());
}

TYPED_TEST(Gate, SameSeedAndStepGiveBitwiseIdenticalRouting) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(6, 8, 3, 50);
  const auto twin = make_gate<Scalar>(6, 8, 3, 50);  // another object, same weights and seed
  const auto input = reference::uniform<Scalar>(150, 6, 51);
  const auto a = gate.route(input, Mode::training, 12);
  EXPECT_TRUE(identical(a, gate.route(input, Mode::training, 12)));
  EXPECT_TRUE(identical(a, twin.route(input, Mode::training, 12)));
  // A different step, or a different seed, gives a different noise sample.
  const auto next_step = gate.route(input, Mode::training, 13);
  EXPECT_LT(fraction_equal(a.noise, next_step.noise), 0.01);
  EXPECT_TRUE(same(a.clean_logits, next_step.clean_logits));
  EXPECT_FALSE(a.expert_ids == next_step.expert_ids);
  NoisyTopKGate<Scalar> other_seed(6, 8, 3, gate.noise_epsilon(), 51);
  other_seed.gate_weight() = gate.gate_weight();
  other_seed.noise_weight() = gate.noise_weight();
  EXPECT_LT(fraction_equal(a.noise, other_seed.route(input, Mode::training, 12).noise), 0.01);
}

TYPED_TEST(Gate, RoutingDoesNotDependOnThreadCount) {
#ifdef _OPENMP
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(70, 9, 3, 60);
  const auto input = reference::uniform<Scalar>(300, 70, 61);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto serial = gate.route(input, Mode::training, 4);
  const auto serial_eval = gate.route(input, Mode::evaluation, 4);
  omp_set_num_threads(4);
  const auto parallel = gate.route(input, Mode::training, 4);
  const auto parallel_eval = gate.route(input, Mode::evaluation, 4);
  omp_set_num_threads(saved);
  EXPECT_TRUE(identical(serial, parallel));
  EXPECT_TRUE(identical(serial_eval, parallel_eval));
#else
  GTEST_SKIP() << "built without OpenMP";
#endif
}

TYPED_TEST(Gate, StridedAndColumnMajorInputsRouteLikeContiguousOnes) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(5, 6, 2, 70);
  const Mat<Scalar> wide = reference::uniform<Scalar>(90, 9, 71);
  const Mat<Scalar> input = wide.middleCols(2, 5);  // contiguous copy
  const auto strided = gate.route(wide.middleCols(2, 5), Mode::training, 3);
  expect_routing_matches_reference(gate, input, strided, Mode::training, 3);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> column_major = input;
  const auto from_column_major = gate.route(column_major, Mode::training, 3);
  expect_routing_matches_reference(gate, input, from_column_major, Mode::training, 3);
}

// --- argument checks ---------------------------------------------------------------------------

TYPED_TEST(Gate, ConstructorRejectsBadSizes) {
  using Scalar = TypeParam;
  using G = NoisyTopKGate<Scalar>;
  EXPECT_INVALID_ARGUMENT_WITH(G(0, 4, 2), "NoisyTopKGate", "input_dim", "0");
  EXPECT_INVALID_ARGUMENT_WITH(G(-3, 4, 2), "NoisyTopKGate", "input_dim", "-3");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, 0, 1), "NoisyTopKGate", "num_experts", "0");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, -1, 1), "NoisyTopKGate", "num_experts", "-1");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, 4, 0), "NoisyTopKGate", "k", "4", "0");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, 4, 5), "NoisyTopKGate", "k", "4", "5");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, 4, -2), "NoisyTopKGate", "k", "4", "-2");
  EXPECT_INVALID_ARGUMENT_WITH(G(5, 1, 2), "NoisyTopKGate", "k", "1", "2");
  EXPECT_NO_THROW(G(1, 1, 1));
  EXPECT_NO_THROW(G(5, 4, 4));
}

TYPED_TEST(Gate, ConstructorRejectsBadNoiseEpsilon) {
  using Scalar = TypeParam;
  using G = NoisyTopKGate<Scalar>;
  for (Scalar bad : {Scalar(0), Scalar(-0.0), Scalar(-0.01), std::numeric_limits<Scalar>::quiet_NaN(),
                     std::numeric_limits<Scalar>::infinity(), -std::numeric_limits<Scalar>::infinity()}) {
    SCOPED_TRACE("epsilon " + std::to_string(static_cast<double>(bad)));
    EXPECT_INVALID_ARGUMENT_WITH(G(5, 4, 2, bad), "NoisyTopKGate", "noise_epsilon");
  }
  EXPECT_NO_THROW(G(5, 4, 2, std::numeric_limits<Scalar>::denorm_min()));
}

TYPED_TEST(Gate, RouteRejectsWrongInputWidthAndHugeStep) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(4, 6, 2, 80);
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    SCOPED_TRACE(mode_name(mode));
    EXPECT_INVALID_ARGUMENT_WITH(gate.route(Mat<Scalar>::Ones(3, 5), mode), "NoisyTopKGate::route", "4", "3x5");
    EXPECT_INVALID_ARGUMENT_WITH(gate.route(Mat<Scalar>::Ones(3, 3), mode), "NoisyTopKGate::route", "4", "3x3");
    EXPECT_INVALID_ARGUMENT_WITH(gate.route(Mat<Scalar>::Ones(2, 0), mode), "NoisyTopKGate::route", "4", "2x0");
    EXPECT_INVALID_ARGUMENT_WITH(gate.route(Mat<Scalar>::Ones(3, 4), mode, std::uint64_t{1} << 32),
                                 "NoisyTopKGate::route", "step", std::to_string(std::uint64_t{1} << 32));
  }
  EXPECT_NO_THROW(gate.route(Mat<Scalar>::Ones(3, 4), Mode::training, 0xFFFFFFFFu));
}

TYPED_TEST(Gate, NonFiniteInputNamesTheTokenRow) {
  using Scalar = TypeParam;
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  const auto gate = make_gate<Scalar>(4, 6, 2, 90);
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    for (Scalar bad : {nan, inf, -inf}) {
      SCOPED_TRACE(std::string(mode_name(mode)) + " value " + std::to_string(static_cast<double>(bad)));
      Mat<Scalar> input = reference::uniform<Scalar>(8, 4, 91);
      input(5, 2) = bad;
      input(7, 0) = bad;  // a later bad row: the first one is named
      try {
        (void)gate.route(input, mode, 1);
        ADD_FAILURE() << "expected std::invalid_argument";
      } catch (const std::invalid_argument& error) {
        EXPECT_TRUE(reference::message_contains(error, {"NoisyTopKGate::route", "token row 5"}));
        EXPECT_EQ(std::string(error.what()).find("token row 7"), std::string::npos) << error.what();
      }
    }
  }
  // Finite input whose logits overflow.
  NoisyTopKGate<Scalar> ones(4, 3, 1);
  ones.gate_weight().setOnes();
  Mat<Scalar> huge = Mat<Scalar>::Zero(3, 4);
  huge.row(2).setConstant(std::numeric_limits<Scalar>::max() / 2);
  EXPECT_INVALID_ARGUMENT_WITH(ones.route(huge, Mode::evaluation), "token row 2");
  // A non-finite weight poisons every row: the first one is named.
  auto poisoned = make_gate<Scalar>(4, 6, 2, 92);
  poisoned.gate_weight()(1, 3) = nan;
  EXPECT_INVALID_ARGUMENT_WITH(poisoned.route(reference::uniform<Scalar>(4, 4, 93), Mode::evaluation),
                               "token row 0");
}

TYPED_TEST(Gate, UncheckedNonFiniteLogitsStillGiveValidDistinctIds) {
  using Scalar = TypeParam;
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  const Index experts = 6;
  for (Index k : {1, 3, 5, 6}) {
    NoisyTopKGate<Scalar> gate(3, experts, k, Scalar(0.01), 3);
    gate.gate_weight() << 1, -1, 0, 2, 0.5, -3,  //
        0.25, 0.5, -0.5, 1, -1, 0.75,            //
        -1, 2, 1, 0.5, 0.25, 1;
    gate.noise_weight() = reference::uniform<Scalar>(3, experts, 4);
    gate.set_check_finite(false);
    EXPECT_FALSE(gate.check_finite());
    Mat<Scalar> input(6, 3);
    input << 0.5, -1, 0.25,  // finite
        nan, 1, 1,           // all logits NaN
        inf, 1, 1,           // logits +inf, -inf and NaN (inf·0) mixed with nothing finite
        -inf, 1, 1,          //
        0, inf, 0,           // +inf / -inf / NaN
        1, 0.5, -0.5;        // finite
    for (Mode mode : {Mode::evaluation, Mode::training}) {
      SCOPED_TRACE(std::string(mode_name(mode)) + " k=" + std::to_string(k));
      Routing<Scalar> r;
      ASSERT_NO_THROW(r = gate.route(input, mode, 2));
      for (Index t = 0; t < input.rows(); ++t) {
        const std::vector<Index> ranked = reference::ranking(reference::row(r.noisy_logits, t));
        std::set<Index> seen;
        for (Index j = 0; j < k; ++j) {
          const Index id = r.expert_ids(t, j);
          EXPECT_GE(id, 0);
          EXPECT_LT(id, experts);
          seen.insert(id);
          EXPECT_EQ(id, ranked[static_cast<std::size_t>(j)]) << "token " << t << " slot " << j;
        }
        EXPECT_EQ(static_cast<Index>(seen.size()), k) << "ids of token " << t << " must be distinct";
        if (r.has_smooth_load()) {
          EXPECT_EQ(r.kth_expert[t], ranked[static_cast<std::size_t>(k - 1)]);
          EXPECT_EQ(r.next_expert[t], ranked[static_cast<std::size_t>(k)]);
        }
      }
      // The finite rows are unaffected by their neighbours.
      for (Index t : {Index{0}, Index{5}}) {
        const std::vector<double> h = reference::row(r.noisy_logits, t);
        std::vector<double> chosen;
        for (Index j = 0; j < k; ++j) chosen.push_back(h[static_cast<std::size_t>(r.expert_ids(t, j))]);
        const auto g = reference::softmax(chosen);
        for (Index j = 0; j < k; ++j)
          EXPECT_TRUE(reference::close(static_cast<double>(r.gates(t, j)), g[static_cast<std::size_t>(j)],
                                       10 * reference::tolerance<Scalar>()));
      }
    }
  }
}

TYPED_TEST(Gate, BackwardRejectsMismatchedShapes) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(4, 5, 2, 95);
  const auto input = reference::uniform<Scalar>(6, 4, 96);
  const auto r = gate.route(input, Mode::training, 1);
  Mat<Scalar> dwg = Mat<Scalar>::Zero(4, 5), dwn = Mat<Scalar>::Zero(4, 5), dx = Mat<Scalar>::Zero(6, 4);
  {
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    Mat<Scalar> bad = Mat<Scalar>::Zero(4, 6);
    EXPECT_INVALID_ARGUMENT_WITH(gate.backward(r, input, g, bad, dwn, dx), "NoisyTopKGate::backward",
                                 "d_gate_weight", "4x5", "4x6");
  }
  {
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    Mat<Scalar> bad = Mat<Scalar>::Zero(5, 4);
    EXPECT_INVALID_ARGUMENT_WITH(gate.backward(r, input, g, dwg, dwn, bad), "NoisyTopKGate::backward", "d_input");
  }
  {
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    g.gates.resize(6, 3);
    EXPECT_INVALID_ARGUMENT_WITH(gate.backward(r, input, g, dwg, dwn, dx), "NoisyTopKGate::backward",
                                 "gradients.gates");
  }
  {
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    EXPECT_INVALID_ARGUMENT_WITH(gate.backward(r, reference::uniform<Scalar>(5, 4, 1), g, dwg, dwn, dx),
                                 "NoisyTopKGate::backward", "input");
  }
  {
    const auto other = make_gate<Scalar>(4, 5, 3, 95);
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    EXPECT_INVALID_ARGUMENT_WITH(other.backward(r, input, g, dwg, dwn, dx), "NoisyTopKGate::backward", "k=2",
                                 "k=3");
  }
}

// --- backward by finite differences --------------------------------------------------------------

// Fixed coefficients of the scalar test loss
//   L = Σ_{t,j} a(t,j)·gates(t,j) + Σ_i b_i·Load_i + Σ_i c_i·Importance_i
//       + auxiliary_losses(w_importance, w_load).total()
// of a routed batch. Everything goes through the public API.
struct LossCoefficients {
  MatrixD a;          // T×k
  Eigen::VectorXd b;  // E
  Eigen::VectorXd c;  // E
  double w_importance = 0.3;
  double w_load = 0.7;
};

template <typename Scalar>
double loss_of(const Routing<Scalar>& r, const LossCoefficients& q) {
  double total = 0;
  for (Index t = 0; t < r.num_tokens(); ++t)
    for (Index j = 0; j < r.k(); ++j) total += q.a(t, j) * static_cast<double>(r.gates(t, j));
  const auto load = sparsemoe::load(r);
  const auto importance = sparsemoe::importance(r);
  for (Index i = 0; i < r.num_experts(); ++i)
    total += q.b[i] * static_cast<double>(load[i]) + q.c[i] * static_cast<double>(importance[i]);
  total += static_cast<double>(sparsemoe::auxiliary_losses(r, static_cast<Scalar>(q.w_importance),
                                                           static_cast<Scalar>(q.w_load))
                                   .total());
  return total;
}

// Smallest gap between consecutive sorted noisy logits over all tokens (a perturbation smaller
// than this cannot reorder the experts, so the loss is smooth there).
template <typename Scalar>
double smallest_gap(const Routing<Scalar>& r) {
  double gap = std::numeric_limits<double>::infinity();
  for (Index t = 0; t < r.num_tokens(); ++t) {
    std::vector<double> h = reference::row(r.noisy_logits, t);
    std::sort(h.begin(), h.end());
    for (std::size_t i = 1; i < h.size(); ++i) gap = std::min(gap, h[i] - h[i - 1]);
  }
  return gap;
}

// Central differences in double of loss_of(route(input)) with respect to every entry of `target`
// (a reference into the gate's weights or into the input), at fixed step (fixed noise sample).
MatrixD finite_difference(const NoisyTopKGate<double>& gate, MatrixD& input, MatrixD& target, Mode mode,
                          std::uint64_t step, const LossCoefficients& q) {
  const SerialRegion serial;
  MatrixD fd(target.rows(), target.cols());
  for (Index i = 0; i < target.rows(); ++i) {
    for (Index j = 0; j < target.cols(); ++j) {
      const double saved = target(i, j);
      const double h = 1e-6 * std::max(1.0, std::abs(saved));
      target(i, j) = saved + h;
      const double plus = loss_of(gate.route(input, mode, step), q);
      target(i, j) = saved - h;
      const double minus = loss_of(gate.route(input, mode, step), q);
      target(i, j) = saved;
      fd(i, j) = (plus - minus) / (2 * h);
    }
  }
  return fd;
}

template <typename Scalar>
void check_backward_against_finite_differences(Index tokens, Index dim, Index experts, Index k, Mode mode,
                                               std::uint64_t seed) {
  const double tol = std::is_same<Scalar, float>::value ? 2e-3 : 1e-6;
  const std::uint64_t step = 17;
  // Draw weights and inputs (representable in Scalar) until no two noisy logits of a token are
  // closer than 1e-3: finite differences then never cross a change of the top-k set or order.
  NoisyTopKGate<double> reference_gate(dim, experts, k, 0.01, seed);
  MatrixD input;
  bool found = false;
  for (std::uint64_t attempt = 0; attempt < 200 && !found; ++attempt) {
    reference_gate.gate_weight() = reference::uniform<Scalar>(dim, experts, seed + 10 * attempt + 1).template cast<double>();
    reference_gate.noise_weight() =
        reference::uniform<Scalar>(dim, experts, seed + 10 * attempt + 2, -0.7, 0.7).template cast<double>();
    input = reference::uniform<Scalar>(tokens, dim, seed + 10 * attempt + 3).template cast<double>();
    found = experts == 1 || smallest_gap(reference_gate.route(input, mode, step)) > 1e-3;
  }
  ASSERT_TRUE(found) << "could not draw inputs away from top-k ties";

  LossCoefficients q;
  q.a = reference::uniform<double>(tokens, k, seed + 5, -1, 1);
  q.b = reference::uniform<double>(experts, 1, seed + 6, -1, 1);
  q.c = reference::uniform<double>(experts, 1, seed + 7, -1, 1);

  // Analytic gradient in Scalar, through the public backward functions.
  NoisyTopKGate<Scalar> gate(dim, experts, k, Scalar(0.01), seed);
  gate.gate_weight() = reference_gate.gate_weight().template cast<Scalar>();
  gate.noise_weight() = reference_gate.noise_weight().template cast<Scalar>();
  const Mat<Scalar> x = input.template cast<Scalar>();
  const Routing<Scalar> r = gate.route(x, mode, step);
  auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
  g.gates = q.a.template cast<Scalar>();
  const sparsemoe::Vector<Scalar> b = q.b.template cast<Scalar>();
  const sparsemoe::Vector<Scalar> c = q.c.template cast<Scalar>();
  sparsemoe::load_backward(r, b, g);
  sparsemoe::importance_backward(r, c, g);
  const auto losses = sparsemoe::auxiliary_losses(r, static_cast<Scalar>(q.w_importance), static_cast<Scalar>(q.w_load));
  sparsemoe::auxiliary_losses_backward(r, losses, g);
  // Start from non-zero gradients: backward must add to them.
  const Mat<Scalar> dwg0 = reference::uniform<Scalar>(dim, experts, seed + 8);
  const Mat<Scalar> dwn0 = reference::uniform<Scalar>(dim, experts, seed + 9);
  const Mat<Scalar> dx0 = reference::uniform<Scalar>(tokens, dim, seed + 10);
  Mat<Scalar> dwg = dwg0, dwn = dwn0, dx = dx0;
  gate.backward(r, x, g, dwg, dwn, dx);

  const MatrixD fd_wg = finite_difference(reference_gate, input, reference_gate.gate_weight(), mode, step, q);
  const MatrixD fd_wn = finite_difference(reference_gate, input, reference_gate.noise_weight(), mode, step, q);
  const MatrixD fd_x = finite_difference(reference_gate, input, input, mode, step, q);
  EXPECT_TRUE(reference::gradient_close(Mat<Scalar>(dwg - dwg0), fd_wg, tol, "d_gate_weight"));
  EXPECT_TRUE(reference::gradient_close(Mat<Scalar>(dx - dx0), fd_x, tol, "d_input"));
  if (mode == Mode::training) {
    EXPECT_TRUE(reference::gradient_close(Mat<Scalar>(dwn - dwn0), fd_wn, tol, "d_noise_weight"));
  } else {
    EXPECT_TRUE(dwn == dwn0) << "evaluation: d_noise_weight must not change";
    EXPECT_TRUE(fd_wn.isZero(0.0));
  }
}

TYPED_TEST(Gate, BackwardMatchesFiniteDifferences) {
  using Scalar = TypeParam;
  struct Case {
    Shape shape;
    Mode mode;
  };
  const std::vector<Case> cases{
      {{5, 4, 6, 2}, Mode::training},   {{5, 4, 6, 2}, Mode::evaluation}, {{6, 3, 4, 1}, Mode::training},
      {{6, 3, 4, 4}, Mode::training},   {{4, 3, 1, 1}, Mode::training},   {{70, 3, 5, 2}, Mode::training},
      {{3, 70, 4, 3}, Mode::training},  {{3, 70, 4, 2}, Mode::evaluation}, {{1, 2, 3, 2}, Mode::training},
      // One-column / one-row last tiles (d = 65, T = 65), and a one-column gradient (E = 1).
      {{2, 65, 3, 2}, Mode::training},  {{65, 2, 3, 1}, Mode::training},  {{65, 3, 1, 1}, Mode::evaluation},
  };
  std::uint64_t seed = 1000;
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c.shape) + " " + mode_name(c.mode));
    seed += 100;
    check_backward_against_finite_differences<Scalar>(c.shape.tokens, c.shape.dim, c.shape.experts, c.shape.k,
                                                      c.mode, seed);
  }
}

TYPED_TEST(Gate, BackwardIntoStridedBlocksMatchesContiguous) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(5, 4, 2, 300);
  const Mat<Scalar> wide_input = reference::uniform<Scalar>(9, 8, 301);
  const Mat<Scalar> input = wide_input.middleCols(1, 5);
  const auto r = gate.route(input, Mode::training, 2);
  auto g0 = sparsemoe::GateGradients<Scalar>::zeros(r);
  g0.gates = reference::uniform<Scalar>(9, 2, 302);
  g0.noise_scale = reference::uniform<Scalar>(9, 4, 303);
  auto g1 = g0;
  Mat<Scalar> dwg = Mat<Scalar>::Zero(5, 4), dwn = Mat<Scalar>::Zero(5, 4), dx = Mat<Scalar>::Zero(9, 5);
  gate.backward(r, input, g0, dwg, dwn, dx);
  // The same into blocks of larger matrices, from a strided input view.
  Mat<Scalar> big_wg = Mat<Scalar>::Constant(7, 9, Scalar(3)), big_wn = big_wg, big_x = Mat<Scalar>::Constant(11, 8, Scalar(3));
  gate.backward(r, wide_input.middleCols(1, 5), g1, big_wg.block(1, 2, 5, 4), big_wn.block(2, 3, 5, 4),
                big_x.block(1, 2, 9, 5));
  const double tol = reference::tolerance<Scalar>();
  EXPECT_TRUE(reference::all_close(Mat<Scalar>(big_wg.block(1, 2, 5, 4).array() - Scalar(3)), dwg, 10 * tol));
  EXPECT_TRUE(reference::all_close(Mat<Scalar>(big_wn.block(2, 3, 5, 4).array() - Scalar(3)), dwn, 10 * tol));
  EXPECT_TRUE(reference::all_close(Mat<Scalar>(big_x.block(1, 2, 9, 5).array() - Scalar(3)), dx, 10 * tol));
  // Nothing outside the blocks was written.
  Mat<Scalar> outside = big_wg;
  outside.block(1, 2, 5, 4).setConstant(Scalar(3));
  EXPECT_TRUE(outside == Mat<Scalar>::Constant(7, 9, Scalar(3)));
  outside = big_wn;
  outside.block(2, 3, 5, 4).setConstant(Scalar(3));
  EXPECT_TRUE(outside == Mat<Scalar>::Constant(7, 9, Scalar(3)));
  outside = big_x;
  outside.block(1, 2, 9, 5).setConstant(Scalar(3));
  EXPECT_TRUE(outside == Mat<Scalar>::Constant(11, 8, Scalar(3)));
}

TYPED_TEST(Gate, EmptyBatch) {
  using Scalar = TypeParam;
  const auto gate = make_gate<Scalar>(4, 5, 2, 400);
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    const Mat<Scalar> input(0, 4);
    const auto r = gate.route(input, mode, 1);
    EXPECT_EQ(r.num_tokens(), 0);
    EXPECT_EQ(r.num_experts(), 5);
    auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
    Mat<Scalar> dwg = Mat<Scalar>::Ones(4, 5), dwn = Mat<Scalar>::Ones(4, 5), dx(0, 4);
    gate.backward(r, input, g, dwg, dwn, dx);
    EXPECT_TRUE(dwg == Mat<Scalar>::Ones(4, 5));
    EXPECT_TRUE(dwn == Mat<Scalar>::Ones(4, 5));
  }
}

TEST(NoisyTopKGate, TokenOffsetKeysTheNoiseByGlobalRow) {
  // A batch routed in two parts, each with its first global row as the offset, draws the noise
  // of the whole batch; offset 0 on the second part draws other noise.
  NoisyTopKGate<double> gate(10, 6, 2, 0.01, 77);
  gate.initialize_uniform(3);
  const Mat<double> input = reference::uniform<double>(300, 10, 4);
  Routing<double> whole, head, tail, unkeyed;
  gate.route(input, Mode::training, 5, whole);
  gate.route(input.topRows(128), Mode::training, 5, head, 0);
  gate.route(input.bottomRows(172), Mode::training, 5, tail, 128);
  gate.route(input.bottomRows(172), Mode::training, 5, unkeyed);
  EXPECT_TRUE(head.noise == whole.noise.topRows(128));
  EXPECT_TRUE(tail.noise == whole.noise.bottomRows(172));
  EXPECT_TRUE(tail.expert_ids == whole.expert_ids.bottomRows(172));
  EXPECT_FALSE(unkeyed.noise == whole.noise.bottomRows(172));
}

}  // namespace
