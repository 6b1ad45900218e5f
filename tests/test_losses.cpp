// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of losses.hpp, over float and double:
//   * cv_squared against the closed form Var/(Mean² + 1e-10) (population variance) in double,
//     cv_squared_gradient by central finite differences in double;
//   * importance and hard_load against naive sums; load against a direct per-token evaluation in
//     double of Φ((c_i − θ_i)/s_i), θ_i the k-th largest of the OTHER experts' noisy logits found
//     by sorting; the hard-count fallback (evaluation mode, k = E);
//   * auxiliary_losses against the weighted closed forms, and its argument checks;
//   * importance_backward / load_backward / auxiliary_losses_backward by central finite
//     differences in double on a copy of the Routing (entries of gates, clean_logits,
//     noisy_logits and noise_scale perturbed one at a time, expert ids kept fixed).
#include <sparsemoe/gate.hpp>
#include <sparsemoe/losses.hpp>

#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <random>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::Routing;
using reference::MatrixD;

template <typename Scalar>
class Losses : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Losses, Scalars, reference::ScalarNames);

// A routed batch from a gate with random weights.
template <typename Scalar>
Routing<Scalar> make_routing(Index tokens, Index dim, Index experts, Index k, Mode mode, std::uint64_t seed) {
  sparsemoe::NoisyTopKGate<Scalar> gate(dim, experts, k, Scalar(0.01), seed);
  gate.gate_weight() = reference::uniform<Scalar>(dim, experts, seed + 1, -0.6, 0.6);
  gate.noise_weight() = reference::uniform<Scalar>(dim, experts, seed + 2, -0.6, 0.6);
  const auto input = reference::uniform<Scalar>(tokens, dim, seed + 3);
  return gate.route(input, mode, seed % 1000);
}

template <typename Scalar>
Routing<double> to_double(const Routing<Scalar>& r) {
  Routing<double> out;
  out.expert_ids = r.expert_ids;
  out.gates = r.gates.template cast<double>();
  out.clean_logits = r.clean_logits.template cast<double>();
  out.noisy_logits = r.noisy_logits.template cast<double>();
  out.raw_noise = r.raw_noise.template cast<double>();
  out.noise_scale = r.noise_scale.template cast<double>();
  out.noise = r.noise.template cast<double>();
  out.kth_expert = r.kth_expert;
  out.next_expert = r.next_expert;
  return out;
}

template <typename Scalar>
std::vector<double> as_vector(const sparsemoe::Vector<Scalar>& v) {
  std::vector<double> out(static_cast<std::size_t>(v.size()));
  for (Index i = 0; i < v.size(); ++i) out[static_cast<std::size_t>(i)] = static_cast<double>(v[i]);
  return out;
}

// --- independent references -------------------------------------------------------------------

template <typename Scalar>
std::vector<double> reference_importance(const Routing<Scalar>& r) {
  std::vector<double> out(static_cast<std::size_t>(r.clean_logits.cols()), 0.0);
  for (Index t = 0; t < r.expert_ids.rows(); ++t)
    for (Index j = 0; j < r.expert_ids.cols(); ++j)
      out[static_cast<std::size_t>(r.expert_ids(t, j))] += static_cast<double>(r.gates(t, j));
  return out;
}

// Hard count from a brute-force top-k of the stored noisy logits.
template <typename Scalar>
std::vector<double> reference_hard_load(const Routing<Scalar>& r, Index k) {
  std::vector<double> out(static_cast<std::size_t>(r.clean_logits.cols()), 0.0);
  for (Index t = 0; t < r.noisy_logits.rows(); ++t) {
    const auto ranked = reference::ranking(reference::row(r.noisy_logits, t));
    for (Index j = 0; j < k; ++j) out[static_cast<std::size_t>(ranked[static_cast<std::size_t>(j)])] += 1.0;
  }
  return out;
}

// Σ_t Φ((c_i − θ_i)/s_i), θ_i the k-th largest noisy logit of the other experts (by sorting).
template <typename Scalar>
std::vector<double> reference_smooth_load(const Routing<Scalar>& r, Index k) {
  const Index experts = r.clean_logits.cols();
  std::vector<double> out(static_cast<std::size_t>(experts), 0.0);
  for (Index t = 0; t < r.noisy_logits.rows(); ++t) {
    const std::vector<double> h = reference::row(r.noisy_logits, t);
    for (Index i = 0; i < experts; ++i) {
      const double theta = reference::kth_largest_excluding(h, k, i);
      const double z = (static_cast<double>(r.clean_logits(t, i)) - theta) / static_cast<double>(r.noise_scale(t, i));
      out[static_cast<std::size_t>(i)] += reference::phi_cdf(z);
    }
  }
  return out;
}

template <typename Scalar>
::testing::AssertionResult vector_close(const sparsemoe::Vector<Scalar>& actual, const std::vector<double>& expected,
                                        double tol) {
  if (static_cast<std::size_t>(actual.size()) != expected.size())
    return ::testing::AssertionFailure() << "size " << actual.size() << " vs " << expected.size();
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double a = static_cast<double>(actual[static_cast<Index>(i)]);
    if (!(std::abs(a - expected[i]) <= tol * std::max(1.0, std::abs(expected[i]))))
      return ::testing::AssertionFailure() << "entry " << i << ": " << a << " vs " << expected[i];
  }
  return ::testing::AssertionSuccess();
}

// --- cv_squared ------------------------------------------------------------------------------

TYPED_TEST(Losses, CvSquaredMatchesClosedForm) {
  using Scalar = TypeParam;
  const double tol = reference::tolerance<Scalar>();
  std::mt19937_64 rng(1);
  for (Index size : {2, 3, 8, 64, 257}) {
    for (int trial = 0; trial < 5; ++trial) {
      std::uniform_real_distribution<double> dist(0.2, 3.0);
      sparsemoe::Vector<Scalar> v(size);
      for (Index i = 0; i < size; ++i) v[i] = static_cast<Scalar>(dist(rng));
      const double expected = reference::cv_squared(as_vector(v));
      EXPECT_NEAR(static_cast<double>(sparsemoe::cv_squared(v)), expected, 10 * tol * expected) << "E=" << size;
    }
  }
  // Population, not unbiased variance: {1, 3} has Var = 1, Mean² = 4 (the unbiased form gives 0.5).
  sparsemoe::Vector<Scalar> pair(2);
  pair << Scalar(1), Scalar(3);
  EXPECT_NEAR(static_cast<double>(sparsemoe::cv_squared(pair)), 1.0 / (4.0 + 1e-10), tol);
  // Mean zero: the 1e-10 keeps it finite.
  sparsemoe::Vector<Scalar> centred(4);
  centred << Scalar(1), Scalar(-1), Scalar(0.5), Scalar(-0.5);
  EXPECT_NEAR(static_cast<double>(sparsemoe::cv_squared(centred)), 0.625 / 1e-10, tol * 0.625e10);
  // Constant and all-zero vectors: zero variance.
  EXPECT_EQ(sparsemoe::cv_squared(sparsemoe::Vector<Scalar>::Constant(5, Scalar(2.5))), Scalar(0));
  EXPECT_EQ(sparsemoe::cv_squared(sparsemoe::Vector<Scalar>::Zero(5)), Scalar(0));
  // A row vector expression gives the same value as the column.
  sparsemoe::Vector<Scalar> v(3);
  v << Scalar(1), Scalar(2), Scalar(4);
  EXPECT_NEAR(static_cast<double>(sparsemoe::cv_squared(v.transpose())), reference::cv_squared({1, 2, 4}), tol);
}

TYPED_TEST(Losses, CvSquaredOfOneOrNoExpertIsZero) {
  using Scalar = TypeParam;
  EXPECT_EQ(sparsemoe::cv_squared(sparsemoe::Vector<Scalar>::Constant(1, Scalar(7))), Scalar(0));
  EXPECT_EQ(sparsemoe::cv_squared(sparsemoe::Vector<Scalar>(0)), Scalar(0));
  const auto g1 = sparsemoe::cv_squared_gradient(sparsemoe::Vector<Scalar>::Constant(1, Scalar(7)));
  ASSERT_EQ(g1.size(), 1);
  EXPECT_EQ(g1[0], Scalar(0));
  EXPECT_EQ(sparsemoe::cv_squared_gradient(sparsemoe::Vector<Scalar>(0)).size(), 0);
}

TYPED_TEST(Losses, CvSquaredGradientMatchesFiniteDifferences) {
  using Scalar = TypeParam;
  const double tol = std::is_same<Scalar, float>::value ? 1e-4 : 1e-7;
  std::mt19937_64 rng(2);
  for (Index size : {2, 3, 7, 32}) {
    std::uniform_real_distribution<double> dist(0.1, 4.0);
    Eigen::VectorXd v(size);
    for (Index i = 0; i < size; ++i) v[i] = static_cast<double>(static_cast<Scalar>(dist(rng)));
    const sparsemoe::Vector<Scalar> analytic = sparsemoe::cv_squared_gradient(v.cast<Scalar>().eval());
    MatrixD fd(size, 1);
    for (Index j = 0; j < size; ++j) {
      const double h = 1e-6 * std::max(1.0, std::abs(v[j]));
      Eigen::VectorXd plus = v, minus = v;
      plus[j] += h;
      minus[j] -= h;
      fd(j, 0) = (reference::cv_squared(as_vector(plus)) - reference::cv_squared(as_vector(minus))) / (2 * h);
    }
    EXPECT_TRUE(reference::gradient_close(MatrixD(analytic.template cast<double>()), fd, tol, "dCV2/dv"))
        << "E=" << size;
  }
}

// --- importance and load ---------------------------------------------------------------------

TYPED_TEST(Losses, ImportanceIsNaiveSumOfGates) {
  using Scalar = TypeParam;
  const double tol = reference::tolerance<Scalar>();
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    for (Index k : {1, 2, 5}) {
      const auto r = make_routing<Scalar>(33, 6, 5, k, mode, 100 + static_cast<std::uint64_t>(k));
      EXPECT_TRUE(vector_close(sparsemoe::importance(r), reference_importance(r), 10 * tol));
      // Importance sums to T (each row of gates sums to 1).
      EXPECT_NEAR(static_cast<double>(sparsemoe::importance(r).sum()), 33.0, 33 * 10 * tol);
    }
  }
}

TYPED_TEST(Losses, HardLoadCountsBruteForceTopK) {
  using Scalar = TypeParam;
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    for (Index k : {1, 3, 4}) {
      const auto r = make_routing<Scalar>(50, 5, 4, k, mode, 200 + static_cast<std::uint64_t>(k));
      EXPECT_TRUE(vector_close(sparsemoe::hard_load(r), reference_hard_load(r, k), 0.0));
    }
  }
}

TYPED_TEST(Losses, SmoothLoadMatchesDirectEvaluation) {
  using Scalar = TypeParam;
  // Per-term error of Φ in Scalar is ~ε; summed over T tokens.
  const double per_token = std::is_same<Scalar, float>::value ? 2e-6 : 1e-14;
  struct Case {
    Index tokens, dim, experts, k;
  };
  for (const Case& c : {Case{40, 6, 6, 2}, Case{25, 3, 4, 1}, Case{30, 8, 8, 7}, Case{1, 4, 2, 1},
                        Case{70, 5, 9, 4}}) {
    const auto r = make_routing<Scalar>(c.tokens, c.dim, c.experts, c.k, Mode::training,
                                        300 + static_cast<std::uint64_t>(c.experts * 10 + c.k));
    ASSERT_TRUE(r.has_smooth_load());
    const auto load = sparsemoe::load(r);
    const auto expected = reference_smooth_load(r, c.k);
    for (Index i = 0; i < c.experts; ++i) {
      EXPECT_NEAR(static_cast<double>(load[i]), expected[static_cast<std::size_t>(i)],
                  per_token * static_cast<double>(c.tokens))
          << "expert " << i << " (T=" << c.tokens << " E=" << c.experts << " k=" << c.k << ")";
    }
  }
}

TYPED_TEST(Losses, LoadFallsBackToHardCounts) {
  using Scalar = TypeParam;
  // Evaluation mode (no noise) and k = E (estimator undefined): the hard count.
  const auto eval = make_routing<Scalar>(40, 5, 6, 2, Mode::evaluation, 400);
  EXPECT_FALSE(eval.has_smooth_load());
  EXPECT_TRUE(vector_close(sparsemoe::load(eval), reference_hard_load(eval, 2), 0.0));
  const auto all = make_routing<Scalar>(40, 5, 6, 6, Mode::training, 401);
  EXPECT_FALSE(all.has_smooth_load());
  EXPECT_TRUE(vector_close(sparsemoe::load(all), std::vector<double>(6, 40.0), 0.0));
  const auto single = make_routing<Scalar>(9, 3, 1, 1, Mode::training, 402);
  EXPECT_TRUE(vector_close(sparsemoe::load(single), std::vector<double>(1, 9.0), 0.0));
}

TYPED_TEST(Losses, EmptyBatch) {
  using Scalar = TypeParam;
  for (Mode mode : {Mode::evaluation, Mode::training}) {
    const auto r = make_routing<Scalar>(0, 4, 5, 2, mode, 500);
    EXPECT_TRUE(vector_close(sparsemoe::importance(r), std::vector<double>(5, 0.0), 0.0));
    EXPECT_TRUE(vector_close(sparsemoe::load(r), std::vector<double>(5, 0.0), 0.0));
    const auto losses = sparsemoe::auxiliary_losses(r, Scalar(0.1), Scalar(0.1));
    EXPECT_EQ(losses.total(), Scalar(0));
  }
}

TYPED_TEST(Losses, InPlaceOverloadsIgnoreWhatTheOutputHeld) {
  using Scalar = TypeParam;
  const double tol = reference::tolerance<Scalar>();
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  // Outputs pre-filled with NaN and the wrong size (larger, then smaller), reused across
  // routings of different E, k and mode.
  sparsemoe::Vector<Scalar> imp = sparsemoe::Vector<Scalar>::Constant(17, nan);
  sparsemoe::Vector<Scalar> load = sparsemoe::Vector<Scalar>::Constant(17, nan);
  sparsemoe::Vector<Scalar> hard = sparsemoe::Vector<Scalar>::Constant(17, nan);
  sparsemoe::AuxiliaryLosses<Scalar> losses;
  losses.importance = sparsemoe::Vector<double>::Constant(3, std::numeric_limits<double>::quiet_NaN());
  losses.load = sparsemoe::Vector<double>::Constant(3, std::numeric_limits<double>::quiet_NaN());
  losses.smooth_load = true;
  struct Case {
    Index tokens, experts, k;
    Mode mode;
  };
  for (const Case& c : {Case{30, 6, 2, Mode::training}, Case{12, 9, 3, Mode::evaluation}, Case{40, 4, 1, Mode::training},
                        Case{0, 5, 2, Mode::training}, Case{25, 6, 6, Mode::training}}) {
    SCOPED_TRACE("T=" + std::to_string(c.tokens) + " E=" + std::to_string(c.experts) + " k=" + std::to_string(c.k));
    const auto r = make_routing<Scalar>(c.tokens, 4, c.experts, c.k, c.mode, 1500 + static_cast<std::uint64_t>(c.experts));
    const bool smooth = c.mode == Mode::training && c.k < c.experts;
    const std::vector<double> expected_imp = reference_importance(r);
    const std::vector<double> expected_hard = reference_hard_load(r, c.k);
    const std::vector<double> expected_load = smooth ? reference_smooth_load(r, c.k) : expected_hard;
    sparsemoe::importance(r, imp);
    sparsemoe::hard_load(r, hard);
    sparsemoe::load(r, load);
    sparsemoe::auxiliary_losses(r, Scalar(0.5), Scalar(0.25), losses);
    EXPECT_TRUE(vector_close(imp, expected_imp, 10 * tol));
    EXPECT_TRUE(vector_close(hard, expected_hard, 0.0));
    EXPECT_TRUE(vector_close(load, expected_load, 100 * tol));
    EXPECT_TRUE(vector_close(losses.importance, expected_imp, 10 * tol));
    EXPECT_TRUE(vector_close(losses.load, expected_load, 100 * tol));
    EXPECT_EQ(losses.smooth_load, smooth);
    const double expected_total = 0.5 * reference::cv_squared(expected_imp) + 0.25 * reference::cv_squared(expected_load);
    EXPECT_NEAR(static_cast<double>(losses.total()), expected_total, 1e3 * tol * std::max(1.0, expected_total));
  }
}

TYPED_TEST(Losses, NormalCdfAndPdf) {
  using Scalar = TypeParam;
  const double tol = reference::tolerance<Scalar>();
  for (double z = -8.0; z <= 8.0; z += 0.37) {
    const double cdf = reference::phi_cdf(z);
    const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2.0 * std::acos(-1.0));
    EXPECT_NEAR(static_cast<double>(sparsemoe::normal_cdf(static_cast<Scalar>(z))), cdf, 10 * tol * std::max(cdf, 1e-3));
    EXPECT_NEAR(static_cast<double>(sparsemoe::normal_pdf(static_cast<Scalar>(z))), pdf, 10 * tol * std::max(pdf, 1e-3));
  }
}

// --- auxiliary_losses ------------------------------------------------------------------------

TYPED_TEST(Losses, AuxiliaryLossesAreWeightedCvSquared) {
  using Scalar = TypeParam;
  const double tol = reference::tolerance<Scalar>();
  struct Case {
    Mode mode;
    Index k;
  };
  for (const Case& c : {Case{Mode::training, 2}, Case{Mode::evaluation, 2}, Case{Mode::training, 5}}) {
    const auto r = make_routing<Scalar>(60, 7, 5, c.k, c.mode, 600 + static_cast<std::uint64_t>(c.k));
    const Scalar wi = Scalar(0.3), wl = Scalar(1.7);
    const auto losses = sparsemoe::auxiliary_losses(r, wi, wl);
    const bool smooth = c.mode == Mode::training && c.k < 5;
    const std::vector<double> imp = reference_importance(r);
    const std::vector<double> load = smooth ? reference_smooth_load(r, c.k) : reference_hard_load(r, c.k);
    const double imp_cv = reference::cv_squared(imp), load_cv = reference::cv_squared(load);
    EXPECT_EQ(losses.smooth_load, smooth);
    EXPECT_TRUE(vector_close(losses.importance, imp, 100 * tol));
    EXPECT_TRUE(vector_close(losses.load, load, 100 * tol));
    EXPECT_NEAR(static_cast<double>(losses.importance_cv_squared), imp_cv, 1e3 * tol * std::max(imp_cv, 1e-3));
    EXPECT_NEAR(static_cast<double>(losses.load_cv_squared), load_cv, 1e3 * tol * std::max(load_cv, 1e-3));
    EXPECT_EQ(losses.importance_weight, wi);
    EXPECT_EQ(losses.load_weight, wl);
    const double expected_total = static_cast<double>(wi) * imp_cv + static_cast<double>(wl) * load_cv;
    EXPECT_NEAR(static_cast<double>(losses.importance_loss()), static_cast<double>(wi) * imp_cv,
                1e3 * tol * std::max(expected_total, 1e-3));
    EXPECT_NEAR(static_cast<double>(losses.load_loss()), static_cast<double>(wl) * load_cv,
                1e3 * tol * std::max(expected_total, 1e-3));
    EXPECT_NEAR(static_cast<double>(losses.total()), expected_total, 1e3 * tol * std::max(expected_total, 1e-3));
  }
}

TYPED_TEST(Losses, AuxiliaryLossesRejectBadWeights) {
  using Scalar = TypeParam;
  const auto r = make_routing<Scalar>(5, 3, 4, 2, Mode::training, 700);
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar inf = std::numeric_limits<Scalar>::infinity();
  for (Scalar bad : {Scalar(-0.5), nan, inf, -inf}) {
    EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::auxiliary_losses(r, bad, Scalar(0.1)), "auxiliary_losses",
                                 "importance_weight");
    EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::auxiliary_losses(r, Scalar(0.1), bad), "auxiliary_losses",
                                 "load_weight");
  }
  EXPECT_NO_THROW(sparsemoe::auxiliary_losses(r, Scalar(0), Scalar(0)));
}

// --- backward by finite differences -------------------------------------------------------------

// Which field of a Routing<double> a finite difference perturbs.
enum class Field { gates, clean_logits, noisy_logits, noise_scale };

MatrixD& field_of(Routing<double>& r, Field f) {
  switch (f) {
    case Field::gates: return r.gates;
    case Field::clean_logits: return r.clean_logits;
    case Field::noisy_logits: return r.noisy_logits;
    case Field::noise_scale: break;
  }
  return r.noise_scale;
}

template <typename Scalar>
const sparsemoe::Matrix<Scalar>& gradient_of(const sparsemoe::GateGradients<Scalar>& g, Field f) {
  switch (f) {
    case Field::gates: return g.gates;
    case Field::clean_logits: return g.clean_logits;
    case Field::noisy_logits: return g.noisy_logits;
    case Field::noise_scale: break;
  }
  return g.noise_scale;
}

const char* name_of(Field f) {
  switch (f) {
    case Field::gates: return "gates";
    case Field::clean_logits: return "clean_logits";
    case Field::noisy_logits: return "noisy_logits";
    case Field::noise_scale: break;
  }
  return "noise_scale";
}

// Central differences of `loss` with respect to every entry of one field of `base` (a copy is
// perturbed; ids, kth_expert and next_expert stay as they are).
MatrixD finite_difference(const Routing<double>& base, Field f, const std::function<double(const Routing<double>&)>& loss) {
  Routing<double> r = base;
  MatrixD& m = field_of(r, f);
  MatrixD fd(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) {
      const double saved = m(i, j);
      const double h = 1e-6 * std::max(1.0, std::abs(saved));
      m(i, j) = saved + h;
      const double plus = loss(r);
      m(i, j) = saved - h;
      const double minus = loss(r);
      m(i, j) = saved;
      fd(i, j) = (plus - minus) / (2 * h);
    }
  }
  return fd;
}

// Non-zero starting gradients, to check that the backward functions add rather than overwrite.
template <typename Scalar>
sparsemoe::GateGradients<Scalar> random_gradients(const Routing<Scalar>& r, std::uint64_t seed) {
  auto g = sparsemoe::GateGradients<Scalar>::zeros(r);
  g.gates = reference::uniform<Scalar>(g.gates.rows(), g.gates.cols(), seed);
  g.clean_logits = reference::uniform<Scalar>(g.clean_logits.rows(), g.clean_logits.cols(), seed + 1);
  g.noisy_logits = reference::uniform<Scalar>(g.noisy_logits.rows(), g.noisy_logits.cols(), seed + 2);
  g.noise_scale = reference::uniform<Scalar>(g.noise_scale.rows(), g.noise_scale.cols(), seed + 3);
  return g;
}

template <typename Scalar>
sparsemoe::Matrix<Scalar> minus(const sparsemoe::Matrix<Scalar>& a, const sparsemoe::Matrix<Scalar>& b) {
  return a - b;
}

template <typename Scalar>
constexpr double fd_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-4 : 1e-6;
}

TYPED_TEST(Losses, ImportanceBackwardMatchesFiniteDifferences) {
  using Scalar = TypeParam;
  for (Mode mode : {Mode::training, Mode::evaluation}) {
    const auto r = make_routing<Scalar>(20, 5, 6, 3, mode, 800);
    const sparsemoe::Vector<Scalar> d = reference::uniform<Scalar>(6, 1, 801, -2, 2);
    const auto start = random_gradients(r, 802);
    auto g = start;
    sparsemoe::importance_backward(r, d, g);
    const Routing<double> rd = to_double(r);
    const Eigen::VectorXd dd = d.template cast<double>();
    auto loss = [&](const Routing<double>& x) { return dd.dot(sparsemoe::importance(x)); };
    EXPECT_TRUE(reference::gradient_close(minus<Scalar>(g.gates, start.gates), finite_difference(rd, Field::gates, loss),
                                          fd_tolerance<Scalar>(), "gates"));
    // Importance does not depend on the logits: nothing else moves.
    EXPECT_EQ(g.clean_logits, start.clean_logits);
    EXPECT_EQ(g.noisy_logits, start.noisy_logits);
    EXPECT_EQ(g.noise_scale, start.noise_scale);
  }
}

TYPED_TEST(Losses, LoadBackwardMatchesFiniteDifferences) {
  using Scalar = TypeParam;
  struct Case {
    Index tokens, experts, k;
  };
  for (const Case& c : {Case{12, 6, 2}, Case{10, 5, 1}, Case{8, 5, 4}, Case{70, 3, 2}}) {
    const auto r = make_routing<Scalar>(c.tokens, 5, c.experts, c.k, Mode::training,
                                        900 + static_cast<std::uint64_t>(c.experts * 10 + c.k));
    ASSERT_TRUE(r.has_smooth_load());
    const sparsemoe::Vector<Scalar> d = reference::uniform<Scalar>(c.experts, 1, 901, -2, 2);
    const auto start = random_gradients(r, 902);
    auto g = start;
    sparsemoe::load_backward(r, d, g);
    const Routing<double> rd = to_double(r);
    const Eigen::VectorXd dd = d.template cast<double>();
    auto loss = [&](const Routing<double>& x) { return dd.dot(sparsemoe::load(x)); };
    for (Field f : {Field::clean_logits, Field::noisy_logits, Field::noise_scale}) {
      EXPECT_TRUE(reference::gradient_close(minus<Scalar>(gradient_of(g, f), gradient_of(start, f)),
                                            finite_difference(rd, f, loss), fd_tolerance<Scalar>(), name_of(f)))
          << "T=" << c.tokens << " E=" << c.experts << " k=" << c.k;
    }
    EXPECT_EQ(g.gates, start.gates);
  }
}

TYPED_TEST(Losses, LoadBackwardIsNoOpWithoutSmoothLoad) {
  using Scalar = TypeParam;
  for (const auto& r : {make_routing<Scalar>(10, 4, 5, 2, Mode::evaluation, 1000),
                        make_routing<Scalar>(10, 4, 5, 5, Mode::training, 1001)}) {
    const auto start = random_gradients(r, 1002);
    auto g = start;
    const sparsemoe::Vector<Scalar> ones = sparsemoe::Vector<Scalar>::Ones(5);
    sparsemoe::load_backward(r, ones, g);
    EXPECT_EQ(g.gates, start.gates);
    EXPECT_EQ(g.clean_logits, start.clean_logits);
    EXPECT_EQ(g.noisy_logits, start.noisy_logits);
    EXPECT_EQ(g.noise_scale, start.noise_scale);
  }
}

TYPED_TEST(Losses, AuxiliaryLossesBackwardMatchesFiniteDifferences) {
  using Scalar = TypeParam;
  struct Case {
    Mode mode;
    Index k;
    double wi, wl, upstream;
  };
  for (const Case& c : {Case{Mode::training, 2, 0.3, 1.7, 1.0}, Case{Mode::training, 3, 0.0, 0.9, 2.5},
                        Case{Mode::training, 1, 1.1, 0.0, -0.5}, Case{Mode::evaluation, 2, 0.4, 0.8, 1.0},
                        Case{Mode::training, 6, 0.4, 0.8, 1.0}}) {
    const auto r = make_routing<Scalar>(16, 5, 6, c.k, c.mode, 1100 + static_cast<std::uint64_t>(c.k));
    const Scalar wi = static_cast<Scalar>(c.wi), wl = static_cast<Scalar>(c.wl);
    const auto losses = sparsemoe::auxiliary_losses(r, wi, wl);
    const auto start = random_gradients(r, 1102);
    auto g = start;
    sparsemoe::auxiliary_losses_backward(r, losses, g, static_cast<Scalar>(c.upstream));
    const Routing<double> rd = to_double(r);
    const double wid = static_cast<double>(wi), wld = static_cast<double>(wl);
    auto loss = [&](const Routing<double>& x) {
      return c.upstream * sparsemoe::auxiliary_losses(x, wid, wld).total();
    };
    std::vector<Field> fields{Field::gates, Field::clean_logits, Field::noisy_logits};
    if (c.mode == Mode::training) fields.push_back(Field::noise_scale);
    for (Field f : fields) {
      EXPECT_TRUE(reference::gradient_close(minus<Scalar>(gradient_of(g, f), gradient_of(start, f)),
                                            finite_difference(rd, f, loss), fd_tolerance<Scalar>(), name_of(f)))
          << "mode " << (c.mode == Mode::training ? "training" : "evaluation") << " k=" << c.k << " w=(" << c.wi
          << ", " << c.wl << ") upstream " << c.upstream;
    }
  }
}

// Importance is a sum over the batch and CV² divides its spread by its mean: on a nearly balanced
// batch (k = E = 2, T = 300, gates near 1/2) the spread is ~1 against a mean of 150, so summing in
// float (error ~1e-5 absolute) put the loss off by 1e-4 relative. The sums and the moments are
// now formed in double; the reference here recomputes everything in long double from the same
// float gates, so the only error left is the final rounding to float.
TEST(LossAccuracy, NearlyBalancedFloatBatchMatchesALongDoubleReference) {
  for (const std::uint64_t seed : {1u, 2u, 3u, 4u}) {
    SCOPED_TRACE(seed);
    const Index tokens = 300, experts = 2, k = 2, dim = 8;
    sparsemoe::NoisyTopKGate<float> gate(dim, experts, k, 0.01f, seed);
    gate.gate_weight() = reference::uniform<float>(dim, experts, seed + 1, -0.02, 0.02);  // gates ≈ 1/2
    const auto input = reference::uniform<float>(tokens, dim, seed + 2);
    const Routing<float> routing = gate.route(input, Mode::evaluation);
    const float weight = 0.1f;
    const auto losses = sparsemoe::auxiliary_losses(routing, weight, 0.0f);

    std::vector<long double> sums(experts, 0.0L);
    for (Index t = 0; t < tokens; ++t) {
      for (Index s = 0; s < k; ++s) sums[static_cast<std::size_t>(routing.expert_ids(t, s))] += routing.gates(t, s);
    }
    const long double mean = (sums[0] + sums[1]) / 2;
    const long double variance = ((sums[0] - mean) * (sums[0] - mean) + (sums[1] - mean) * (sums[1] - mean)) / 2;
    const long double denominator = mean * mean + 1e-10L;
    const long double expected = static_cast<long double>(weight) * variance / denominator;
    ASSERT_GT(mean / std::fabs(sums[0] - mean), 30.0L) << "the batch must be nearly balanced for this to test anything";
    EXPECT_LT(std::fabs(static_cast<long double>(losses.total()) - expected) / expected, 1e-6L)
        << "loss " << losses.total() << " vs " << static_cast<double>(expected);

    // ∂L/∂g(t, s) = w·∂CV²/∂v_e, e = expert_ids(t, s), from the closed form in long double.
    auto gradients = sparsemoe::GateGradients<float>::zeros(routing);
    sparsemoe::auxiliary_losses_backward(routing, losses, gradients);
    long double worst = 0, largest = 0;
    for (Index t = 0; t < tokens; ++t) {
      for (Index s = 0; s < k; ++s) {
        const long double v = sums[static_cast<std::size_t>(routing.expert_ids(t, s))];
        const long double d_cv = (2.0L / experts) * (v - mean) / denominator -
                                 variance * (2.0L * mean / experts) / (denominator * denominator);
        const long double d_gate = static_cast<long double>(weight) * d_cv;
        largest = std::max(largest, std::fabs(d_gate));
        worst = std::max(worst, std::fabs(static_cast<long double>(gradients.gates(t, s)) - d_gate));
      }
    }
    ASSERT_GT(largest, 0.0L);
    EXPECT_LT(worst / largest, 1e-6L) << "worst |∂g − reference| / max |∂g|";
  }
}

}  // namespace
