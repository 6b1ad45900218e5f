// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// mean_squared_error and softmax_cross_entropy: values against closed forms (float and double),
// gradients against central finite differences in double, numerical stability, and argument checks.

#include <sparsemoe/training_losses.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>

namespace {

using sparsemoe::Index;
using sparsemoe::IndexVector;
using sparsemoe::Matrix;

template <typename Scalar>
class TrainingLossTest : public ::testing::Test {};

struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};

using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(TrainingLossTest, Scalars, ScalarNames);

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, unsigned seed, double scale = 1.0) {
  std::mt19937 engine(seed);
  std::uniform_real_distribution<double> uniform(-scale, scale);
  Matrix<Scalar> matrix(rows, cols);
  for (Index i = 0; i < matrix.size(); ++i) matrix.data()[i] = static_cast<Scalar>(uniform(engine));
  return matrix;
}

IndexVector random_labels(Index rows, Index classes, unsigned seed) {
  std::mt19937 engine(seed);
  std::uniform_int_distribution<Index> uniform(0, classes - 1);
  IndexVector labels(rows);
  for (Index i = 0; i < rows; ++i) labels[i] = uniform(engine);
  return labels;
}

/// Central finite differences of a scalar function of a matrix, entry by entry (double).
template <typename Function>
Matrix<double> numerical_gradient(const Function& function, Matrix<double> point, double step = 1e-6) {
  Matrix<double> gradient(point.rows(), point.cols());
  for (Index i = 0; i < point.size(); ++i) {
    const double saved = point.data()[i];
    point.data()[i] = saved + step;
    const double plus = function(point);
    point.data()[i] = saved - step;
    const double minus = function(point);
    point.data()[i] = saved;
    gradient.data()[i] = (plus - minus) / (2.0 * step);
  }
  return gradient;
}

template <typename Scalar>
double value_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-13;
}

// --- mean squared error ---------------------------------------------------------------------

TYPED_TEST(TrainingLossTest, MeanSquaredErrorIsTheMeanOverAllEntries) {
  using Scalar = TypeParam;
  Matrix<Scalar> prediction(2, 3);
  Matrix<Scalar> target(2, 3);
  prediction << 1, 2, 3, 4, 5, 6;
  target << 1, 0, 3, 0, 5, 9;
  // Squared differences 0, 4, 0, 16, 0, 9: sum 29 over T·d = 6 entries (not over T = 2 rows).
  EXPECT_NEAR(static_cast<double>(sparsemoe::mean_squared_error(prediction, target)), 29.0 / 6.0,
              value_tolerance<Scalar>() * 29.0 / 6.0);
  EXPECT_EQ(sparsemoe::mean_squared_error(prediction, prediction), Scalar(0));

  const Matrix<Scalar> gradient = sparsemoe::mean_squared_error_gradient(prediction, target);
  Matrix<Scalar> expected(2, 3);
  expected << 0, 4, 0, 8, 0, -6;  // 2·(p − y)
  expected /= Scalar(6);
  EXPECT_TRUE(gradient.isApprox(expected)) << gradient;
}

TYPED_TEST(TrainingLossTest, MeanSquaredErrorMatchesAPlainLoop) {
  using Scalar = TypeParam;
  const Matrix<Scalar> prediction = random_matrix<Scalar>(17, 5, 1);
  const Matrix<Scalar> target = random_matrix<Scalar>(17, 5, 2);
  double sum = 0;
  for (Index t = 0; t < 17; ++t) {
    for (Index j = 0; j < 5; ++j) {
      const double difference = static_cast<double>(prediction(t, j)) - static_cast<double>(target(t, j));
      sum += difference * difference;
    }
  }
  const double expected = sum / (17.0 * 5.0);
  EXPECT_NEAR(static_cast<double>(sparsemoe::mean_squared_error(prediction, target)), expected,
              value_tolerance<Scalar>() * expected);
}

TYPED_TEST(TrainingLossTest, MeanSquaredErrorAcceptsExpressions) {
  using Scalar = TypeParam;
  const Matrix<Scalar> a = random_matrix<Scalar>(4, 3, 3);
  EXPECT_NEAR(static_cast<double>(sparsemoe::mean_squared_error(a + a, a)),
              static_cast<double>(a.squaredNorm()) / 12.0, 1e-5);
  EXPECT_EQ(sparsemoe::mean_squared_error_gradient(a.topRows(2), a.topRows(2)), Matrix<Scalar>::Zero(2, 3));
}

TEST(TrainingLossGradient, MeanSquaredErrorByFiniteDifferences) {
  const Matrix<double> prediction = random_matrix<double>(6, 4, 11);
  const Matrix<double> target = random_matrix<double>(6, 4, 12);
  const Matrix<double> analytic = sparsemoe::mean_squared_error_gradient(prediction, target);
  const Matrix<double> numeric = numerical_gradient(
      [&](const Matrix<double>& p) { return sparsemoe::mean_squared_error(p, target); }, prediction);
  EXPECT_LT((analytic - numeric).cwiseAbs().maxCoeff(), 1e-9) << analytic << "\n\n" << numeric;
}

TYPED_TEST(TrainingLossTest, MeanSquaredErrorChecksShapes) {
  using Scalar = TypeParam;
  const Matrix<Scalar> a = Matrix<Scalar>::Zero(3, 4);
  const Matrix<Scalar> b = Matrix<Scalar>::Zero(4, 3);
  const Matrix<Scalar> empty(0, 4);
  EXPECT_THROW(sparsemoe::mean_squared_error(a, b), std::invalid_argument);
  EXPECT_THROW(sparsemoe::mean_squared_error_gradient(a, b), std::invalid_argument);
  EXPECT_THROW(sparsemoe::mean_squared_error(empty, empty), std::invalid_argument);
  EXPECT_THROW(sparsemoe::mean_squared_error_gradient(empty, empty), std::invalid_argument);
  try {
    sparsemoe::mean_squared_error(a, b);
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("sparsemoe::mean_squared_error"), std::string::npos) << message;
    EXPECT_NE(message.find("target must be 3x4, got 4x3"), std::string::npos) << message;
  }
}

// --- softmax cross-entropy ------------------------------------------------------------------

TYPED_TEST(TrainingLossTest, CrossEntropyOfUniformLogitsIsLogC) {
  using Scalar = TypeParam;
  const Matrix<Scalar> logits = Matrix<Scalar>::Constant(5, 7, Scalar(3.5));
  const IndexVector labels = random_labels(5, 7, 4);
  EXPECT_NEAR(static_cast<double>(sparsemoe::softmax_cross_entropy(logits, labels)), std::log(7.0),
              value_tolerance<Scalar>() * 10);
  // Gradient (1/7 − onehot)/T.
  const Matrix<Scalar> gradient = sparsemoe::softmax_cross_entropy_gradient(logits, labels);
  for (Index t = 0; t < 5; ++t) {
    for (Index c = 0; c < 7; ++c) {
      const double expected = (1.0 / 7.0 - (c == labels[t] ? 1.0 : 0.0)) / 5.0;
      EXPECT_NEAR(static_cast<double>(gradient(t, c)), expected, value_tolerance<Scalar>());
    }
  }
}

TYPED_TEST(TrainingLossTest, CrossEntropyMatchesTheClosedForm) {
  using Scalar = TypeParam;
  // Two classes: L = log(1 + e^{z_other − z_label}) per row.
  Matrix<Scalar> logits(3, 2);
  logits << 0, 1, 2, -1, Scalar(0.5), Scalar(0.5);
  IndexVector labels(3);
  labels << 1, 1, 0;
  const double expected = (std::log1p(std::exp(-1.0)) + std::log1p(std::exp(3.0)) + std::log(2.0)) / 3.0;
  EXPECT_NEAR(static_cast<double>(sparsemoe::softmax_cross_entropy(logits, labels)), expected,
              value_tolerance<Scalar>() * 10);

  // Random logits against log Σ exp − z_y written out in double.
  const Matrix<Scalar> z = random_matrix<Scalar>(9, 4, 5, 3.0);
  const IndexVector y = random_labels(9, 4, 6);
  double sum = 0;
  for (Index t = 0; t < 9; ++t) {
    double partition = 0;
    for (Index c = 0; c < 4; ++c) partition += std::exp(static_cast<double>(z(t, c)));
    sum += std::log(partition) - static_cast<double>(z(t, y[t]));
  }
  EXPECT_NEAR(static_cast<double>(sparsemoe::softmax_cross_entropy(z, y)), sum / 9.0, value_tolerance<Scalar>() * 10);
}

TYPED_TEST(TrainingLossTest, CrossEntropyIsStableForLargeLogits) {
  using Scalar = TypeParam;
  // exp(1000) overflows in both float and double; the shifted form does not.
  Matrix<Scalar> logits(2, 3);
  logits << 1000, 1000, 1000, -1000, 0, 1000;
  IndexVector labels(2);
  labels << 0, 2;
  const Scalar loss = sparsemoe::softmax_cross_entropy(logits, labels);
  ASSERT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(static_cast<double>(loss), std::log(3.0) / 2.0, 1e-5);
  const Matrix<Scalar> gradient = sparsemoe::softmax_cross_entropy_gradient(logits, labels);
  ASSERT_TRUE(gradient.allFinite());
  EXPECT_NEAR(static_cast<double>(gradient(0, 0)), (1.0 / 3.0 - 1.0) / 2.0, 1e-6);
  EXPECT_NEAR(static_cast<double>(gradient(1, 2)), 0.0, 1e-6);  // softmax ≈ onehot already
  // Each row of the gradient sums to zero.
  EXPECT_NEAR(static_cast<double>(gradient.rowwise().sum().cwiseAbs().maxCoeff()), 0.0, 1e-6);
}

TEST(TrainingLossGradient, CrossEntropyByFiniteDifferences) {
  const Matrix<double> logits = random_matrix<double>(7, 5, 21, 2.0);
  const IndexVector labels = random_labels(7, 5, 22);
  const Matrix<double> analytic = sparsemoe::softmax_cross_entropy_gradient(logits, labels);
  const Matrix<double> numeric = numerical_gradient(
      [&](const Matrix<double>& z) { return sparsemoe::softmax_cross_entropy(z, labels); }, logits);
  EXPECT_LT((analytic - numeric).cwiseAbs().maxCoeff(), 1e-9) << analytic << "\n\n" << numeric;
}

TYPED_TEST(TrainingLossTest, CrossEntropyChecksArguments) {
  using Scalar = TypeParam;
  const Matrix<Scalar> logits = Matrix<Scalar>::Zero(3, 4);
  IndexVector short_labels(2);
  short_labels << 0, 1;
  EXPECT_THROW(sparsemoe::softmax_cross_entropy(logits, short_labels), std::invalid_argument);
  EXPECT_THROW(sparsemoe::softmax_cross_entropy_gradient(logits, short_labels), std::invalid_argument);
  IndexVector bad_labels(3);
  bad_labels << 0, 4, 1;
  EXPECT_THROW(sparsemoe::softmax_cross_entropy(logits, bad_labels), std::invalid_argument);
  bad_labels << 0, -1, 1;
  EXPECT_THROW(sparsemoe::softmax_cross_entropy_gradient(logits, bad_labels), std::invalid_argument);
  const Matrix<Scalar> empty(0, 4);
  EXPECT_THROW(sparsemoe::softmax_cross_entropy(empty, IndexVector(0)), std::invalid_argument);
  try {
    bad_labels << 0, 1, 7;
    sparsemoe::softmax_cross_entropy(logits, bad_labels);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("sparsemoe::softmax_cross_entropy"), std::string::npos) << message;
    EXPECT_NE(message.find("label 7 of row 2 is outside [0, 4)"), std::string::npos) << message;
  }
}

}  // namespace
