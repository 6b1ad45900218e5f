// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Independent reference implementations for the gate, routing and loss tests: naive loops in
// double, full sorts, closed forms. Nothing here calls into sparsemoe except for the Matrix /
// Index aliases, so the tests never compare the library against itself.
#ifndef SPARSEMOE_TESTS_REFERENCE_GATE_HPP
#define SPARSEMOE_TESTS_REFERENCE_GATE_HPP

#include <sparsemoe/config.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace reference {

using sparsemoe::Index;
using MatrixD = sparsemoe::Matrix<double>;

/// Names the typed-test instances "float" and "double" (and gives TYPED_TEST_SUITE its third
/// argument, which clang's -Wpedantic otherwise asks for).
struct ScalarNames {
  template <typename Scalar>
  static std::string GetName(int) {
    return std::is_same<Scalar, float>::value ? "float" : "double";
  }
};

/// Relative tolerance for results computed in Scalar (a few hundred ulps of float, ~4500 ulps of
/// double to allow for reassociation in the library's GEMM).
template <typename Scalar>
constexpr double tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

/// A matrix of i.i.d. U(lo, hi) draws from a fixed seed.
template <typename Scalar>
sparsemoe::Matrix<Scalar> uniform(Index rows, Index cols, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  sparsemoe::Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<Scalar>(dist(rng));
  return m;
}

/// A matrix of small integers in [lo, hi] (exactly representable, exact products and sums).
template <typename Scalar>
sparsemoe::Matrix<Scalar> integers(Index rows, Index cols, std::uint64_t seed, int lo, int hi) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  sparsemoe::Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<Scalar>(dist(rng));
  return m;
}

/// Element-wise conversion to double.
template <typename Derived>
MatrixD to_double(const Eigen::MatrixBase<Derived>& m) {
  MatrixD out(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) out(i, j) = static_cast<double>(m(i, j));
  return out;
}

/// Naive X·W in double, one dot product at a time.
template <typename A, typename B>
MatrixD matmul(const Eigen::MatrixBase<A>& x, const Eigen::MatrixBase<B>& w) {
  MatrixD out(x.rows(), w.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index e = 0; e < w.cols(); ++e) {
      double sum = 0;
      for (Index i = 0; i < x.cols(); ++i) sum += static_cast<double>(x(t, i)) * static_cast<double>(w(i, e));
      out(t, e) = sum;
    }
  }
  return out;
}

/// log(1 + e^r), evaluated as max(r, 0) + log1p(e^{-|r|}).
inline double softplus(double r) { return std::max(r, 0.0) + std::log1p(std::exp(-std::abs(r))); }

inline double logistic(double r) { return 1.0 / (1.0 + std::exp(-r)); }

/// Standard normal CDF.
inline double phi_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

/// All indices 0..n-1 sorted by (value descending, NaN last, index ascending): a full sort.
inline std::vector<Index> ranking(const std::vector<double>& values) {
  std::vector<Index> ids(values.size());
  std::iota(ids.begin(), ids.end(), Index{0});
  std::sort(ids.begin(), ids.end(), [&](Index a, Index b) {
    const double va = values[static_cast<std::size_t>(a)];
    const double vb = values[static_cast<std::size_t>(b)];
    const bool na = std::isnan(va), nb = std::isnan(vb);
    if (na != nb) return nb;         // the number ranks before NaN
    if (!na && va != vb) return va > vb;
    return a < b;                    // ties (and NaN vs NaN): lower index first
  });
  return ids;
}

/// Row `t` of a matrix as a vector of doubles.
template <typename Derived>
std::vector<double> row(const Eigen::MatrixBase<Derived>& m, Index t) {
  std::vector<double> out(static_cast<std::size_t>(m.cols()));
  for (Index j = 0; j < m.cols(); ++j) out[static_cast<std::size_t>(j)] = static_cast<double>(m(t, j));
  return out;
}

/// Softmax in double of `values` (max subtracted).
inline std::vector<double> softmax(const std::vector<double>& values) {
  const double top = *std::max_element(values.begin(), values.end());
  std::vector<double> out(values.size());
  double sum = 0;
  for (std::size_t i = 0; i < values.size(); ++i) sum += out[i] = std::exp(values[i] - top);
  for (double& v : out) v /= sum;
  return out;
}

/// The k-th largest (1-based) of the noisy logits of every expert except `excluded`.
inline double kth_largest_excluding(const std::vector<double>& h, Index k, Index excluded) {
  std::vector<double> others;
  for (std::size_t j = 0; j < h.size(); ++j)
    if (static_cast<Index>(j) != excluded) others.push_back(h[j]);
  std::sort(others.begin(), others.end(), [](double a, double b) { return a > b; });
  return others[static_cast<std::size_t>(k - 1)];
}

/// Population CV² = Var / (Mean² + 1e-10), two-pass in double.
inline double cv_squared(const std::vector<double>& v) {
  if (v.size() <= 1) return 0.0;
  const double n = static_cast<double>(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  return var / (mean * mean + 1e-10);
}

/// |actual − expected| ≤ tol·max(1, |expected|).
inline ::testing::AssertionResult close(double actual, double expected, double tol) {
  if (std::abs(actual - expected) <= tol * std::max(1.0, std::abs(expected))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "actual " << actual << " vs expected " << expected << " (diff "
                                       << actual - expected << ", tol " << tol << ")";
}

/// Entry-wise close() of two matrices of equal shape.
template <typename A, typename B>
::testing::AssertionResult all_close(const Eigen::MatrixBase<A>& actual, const Eigen::MatrixBase<B>& expected,
                                     double tol) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape " << actual.rows() << "x" << actual.cols() << " vs "
                                         << expected.rows() << "x" << expected.cols();
  for (Index i = 0; i < actual.rows(); ++i) {
    for (Index j = 0; j < actual.cols(); ++j) {
      const double a = static_cast<double>(actual(i, j));
      const double e = static_cast<double>(expected(i, j));
      if (!(std::abs(a - e) <= tol * std::max(1.0, std::abs(e))))
        return ::testing::AssertionFailure() << "entry (" << i << ", " << j << "): " << a << " vs " << e
                                             << " (diff " << a - e << ", tol " << tol << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

/// Finite-difference comparison: |analytic − fd| ≤ tol·max(|fd|, 1e-2·scale), where scale is the
/// largest |fd| of the whole gradient (so entries that are ~0 are judged on the gradient's scale).
template <typename A, typename B>
::testing::AssertionResult gradient_close(const Eigen::MatrixBase<A>& analytic, const Eigen::MatrixBase<B>& fd,
                                          double tol, const std::string& what) {
  if (analytic.rows() != fd.rows() || analytic.cols() != fd.cols())
    return ::testing::AssertionFailure() << what << ": shape " << analytic.rows() << "x" << analytic.cols()
                                         << " vs " << fd.rows() << "x" << fd.cols();
  double scale = 1e-12;
  for (Index i = 0; i < fd.rows(); ++i)
    for (Index j = 0; j < fd.cols(); ++j) scale = std::max(scale, std::abs(static_cast<double>(fd(i, j))));
  for (Index i = 0; i < fd.rows(); ++i) {
    for (Index j = 0; j < fd.cols(); ++j) {
      const double a = static_cast<double>(analytic(i, j));
      const double f = static_cast<double>(fd(i, j));
      if (!(std::abs(a - f) <= tol * std::max(std::abs(f), 1e-2 * scale)))
        return ::testing::AssertionFailure() << what << " (" << i << ", " << j << "): analytic " << a
                                             << " vs finite difference " << f << " (rel err "
                                             << std::abs(a - f) / std::max(std::abs(f), 1e-2 * scale) << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

/// Whether what() of `error` contains every string of `parts`.
inline ::testing::AssertionResult message_contains(const std::exception& error, const std::vector<std::string>& parts) {
  const std::string what = error.what();
  for (const auto& part : parts)
    if (what.find(part) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << what << "\" lacks \"" << part << "\"";
  return ::testing::AssertionSuccess();
}

}  // namespace reference

/// Runs `statement`, which must throw std::invalid_argument whose what() contains every string
/// of the initializer list `...`.
#define EXPECT_INVALID_ARGUMENT_WITH(statement, ...)                                           \
  do {                                                                                         \
    bool sparsemoe_test_thrown = false;                                                        \
    try {                                                                                      \
      statement;                                                                               \
    } catch (const std::invalid_argument& sparsemoe_test_error) {                              \
      sparsemoe_test_thrown = true;                                                            \
      EXPECT_TRUE(reference::message_contains(sparsemoe_test_error, {__VA_ARGS__}));           \
    } catch (const std::exception& sparsemoe_test_error) {                                     \
      ADD_FAILURE() << "threw a std::exception that is not std::invalid_argument: "            \
                    << sparsemoe_test_error.what();                                            \
      sparsemoe_test_thrown = true;                                                            \
    }                                                                                          \
    if (!sparsemoe_test_thrown) ADD_FAILURE() << "expected std::invalid_argument from " #statement; \
  } while (false)

#endif  // SPARSEMOE_TESTS_REFERENCE_GATE_HPP
