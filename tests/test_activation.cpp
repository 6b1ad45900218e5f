// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Activations: value() against closed forms written here in long double, derivative() against
// central finite differences of those closed forms, and the block versions apply() and
// multiply_by_derivative() against value() and derivative() element-wise, for float and double.
#include <sparsemoe/activation.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

constexpr long double kPi = 3.141592653589793238462643383279502884L;

// ---- Independent references (long double), one per activation -------------------------------
// `condition(a)` bounds the rounding error of the library's formula in units of eps: it is the
// size of the terms that cancel (e.g. 0.5·a·(1 + tanh u) loses |a|·eps absolutely when
// 1 + tanh u is tiny), so the tolerance is honest without hiding a wrong formula.
template <typename Activation>
struct Reference;

template <>
struct Reference<sparsemoe::Relu> {
  static constexpr bool has_kink_at_zero = true;
  static long double value(long double a) { return a > 0 ? a : 0.0L; }
  static long double value_condition(long double a) { return std::fabs(a); }
  static long double derivative_condition(long double) { return 1.0L; }
};

template <>
struct Reference<sparsemoe::Silu> {
  static constexpr bool has_kink_at_zero = false;
  static long double value(long double a) { return a / (1.0L + std::exp(-a)); }
  static long double value_condition(long double a) { return 1.0L + std::fabs(a); }
  static long double derivative_condition(long double a) { return 1.0L + std::fabs(a); }
};

template <>
struct Reference<sparsemoe::GeluTanh> {
  static constexpr bool has_kink_at_zero = false;
  static long double value(long double a) {
    const long double u = std::sqrt(2.0L / kPi) * (a + 0.044715L * a * a * a);
    return 0.5L * a * (1.0L + std::tanh(u));
  }
  static long double value_condition(long double a) { return 1.0L + std::fabs(a); }
  // 0.5·a·(1 − t²)·du/da with du/da ≈ 0.8·(1 + 0.134·a²): the term that cancels.
  static long double derivative_condition(long double a) {
    return 1.0L + std::fabs(a) * (1.0L + 0.134L * a * a);
  }
};

template <>
struct Reference<sparsemoe::GeluErf> {
  static constexpr bool has_kink_at_zero = false;
  static long double value(long double a) { return 0.5L * a * (1.0L + std::erf(a / std::sqrt(2.0L))); }
  static long double value_condition(long double a) { return 1.0L + std::fabs(a); }
  static long double derivative_condition(long double a) { return 1.0L + std::fabs(a); }
};

// Fourth-order central difference of the long-double reference (error O(h⁴) + O(eps_ld/h)),
// far more accurate than any double result it is compared with.
template <typename Activation>
long double reference_derivative(long double a) {
  const long double h = 1e-4L * std::max(1.0L, std::fabs(a));
  using R = Reference<Activation>;
  return (-R::value(a + 2 * h) + 8 * R::value(a + h) - 8 * R::value(a - h) + R::value(a - 2 * h)) / (12 * h);
}

// Sample points: a dense grid over [-8, 8] plus small, large and very large magnitudes (exp
// overflows in float beyond ~88, so ±100 also checks the saturated branches).
std::vector<double> value_points() {
  std::vector<double> points;
  for (double a = -8.0; a <= 8.0; a += 0.0371) points.push_back(a);
  for (double a : {0.0, 1e-30, -1e-30, 1e-8, -1e-8, 1e-3, -1e-3, 0.5, -0.5, 12.0, -12.0, 20.0, -20.0, 40.0,
                   -40.0, 100.0, -100.0}) {
    points.push_back(a);
  }
  return points;
}

// Derivative points: away from the ReLU kink by far more than the difference step.
std::vector<double> derivative_points() {
  std::vector<double> points;
  for (double a = -8.0; a <= 8.0; a += 0.0371) points.push_back(a);
  for (double a : {1e-2, -1e-2, 0.5, -0.5, 12.0, -12.0, 20.0, -20.0}) points.push_back(a);
  return points;
}

template <typename A, typename S>
struct Case {
  using Activation = A;
  using Scalar = S;
};

template <typename T>
class ActivationTest : public ::testing::Test {};

using Cases = ::testing::Types<Case<sparsemoe::Relu, float>, Case<sparsemoe::Relu, double>,
                               Case<sparsemoe::Silu, float>, Case<sparsemoe::Silu, double>,
                               Case<sparsemoe::GeluTanh, float>, Case<sparsemoe::GeluTanh, double>,
                               Case<sparsemoe::GeluErf, float>, Case<sparsemoe::GeluErf, double>>;

class CaseNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::string(T::Activation::name) + (std::is_same<typename T::Scalar, float>::value ? "_float" : "_double");
  }
};

TYPED_TEST_SUITE(ActivationTest, Cases, CaseNames);

template <typename Scalar>
long double eps() {
  return static_cast<long double>(std::numeric_limits<Scalar>::epsilon());
}

TYPED_TEST(ActivationTest, ValueMatchesClosedForm) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  long double worst = 0;
  for (const double point : value_points()) {
    const Scalar a = static_cast<Scalar>(point);
    const long double reference = R::value(static_cast<long double>(a));
    const long double got = Act::template value<Scalar>(a);
    const long double tolerance = 8 * eps<Scalar>() * (std::fabs(reference) + R::value_condition(a)) +
                                  static_cast<long double>(std::numeric_limits<Scalar>::denorm_min());
    EXPECT_LE(std::fabs(got - reference), tolerance) << Act::name << "(" << a << ") = " << static_cast<double>(got)
                                                     << ", closed form " << static_cast<double>(reference);
    worst = std::max(worst, std::fabs(got - reference) / (std::fabs(reference) + R::value_condition(a)));
  }
  std::cout << "  " << Act::name << ": worst |value - ref|/(|ref| + cond) = " << static_cast<double>(worst)
            << " (" << static_cast<double>(worst / eps<Scalar>()) << " eps)\n";
}

TYPED_TEST(ActivationTest, ValueSpotChecks) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  // act(0) = 0 for all four; all four approach the identity for large positive a and 0 for large
  // negative a.
  EXPECT_EQ(Act::template value<Scalar>(Scalar(0)), Scalar(0));
  // (silu(30) = 30 − 2.8e-12, so use 60, where every form is within eps of a.)
  EXPECT_NEAR(Act::template value<Scalar>(Scalar(60)), Scalar(60), Scalar(60) * 4 * std::numeric_limits<Scalar>::epsilon());
  EXPECT_NEAR(Act::template value<Scalar>(Scalar(-30)), Scalar(0), Scalar(1e-6));
}

TYPED_TEST(ActivationTest, DerivativeMatchesFiniteDifferences) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  long double worst = 0;
  for (const double point : derivative_points()) {
    const Scalar a = static_cast<Scalar>(point);
    const long double numeric = reference_derivative<Act>(static_cast<long double>(a));
    const long double got = Act::template derivative<Scalar>(a);
    const long double tolerance = 16 * eps<Scalar>() * (std::fabs(numeric) + R::derivative_condition(a)) + 1e-13L;
    EXPECT_LE(std::fabs(got - numeric), tolerance)
        << Act::name << "'(" << a << ") = " << static_cast<double>(got) << ", finite difference "
        << static_cast<double>(numeric);
    worst = std::max(worst, std::fabs(got - numeric) / (std::fabs(numeric) + R::derivative_condition(a)));
  }
  std::cout << "  " << Act::name << ": worst |derivative - FD|/(|FD| + cond) = " << static_cast<double>(worst)
            << "\n";
}

TYPED_TEST(ActivationTest, DerivativeAtZero) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  // ReLU: documented as 0 at a = 0. The smooth ones: silu'(0) = 1/2, gelu'(0) = 1/2.
  const Scalar expected = Reference<Act>::has_kink_at_zero ? Scalar(0) : Scalar(0.5);
  EXPECT_NEAR(Act::template derivative<Scalar>(Scalar(0)), expected, 4 * std::numeric_limits<Scalar>::epsilon());
  if (Reference<Act>::has_kink_at_zero) {
    EXPECT_EQ(Act::template derivative<Scalar>(Scalar(1e-20)), Scalar(1));
    EXPECT_EQ(Act::template derivative<Scalar>(Scalar(-1e-20)), Scalar(0));
  }
}

// Fills a rows×cols matrix with the sample points (cycled) in a scrambled order.
template <typename Scalar>
Matrix<Scalar> sample_block(Index rows, Index cols, unsigned seed, const std::vector<double>& points) {
  std::mt19937 generator(seed);
  std::uniform_int_distribution<std::size_t> pick(0, points.size() - 1);
  Matrix<Scalar> block(rows, cols);
  for (Index i = 0; i < block.size(); ++i) block.data()[i] = static_cast<Scalar>(points[pick(generator)]);
  return block;
}

// Block shapes: empty, one element, odd sizes that leave a non-vectorised tail, and one wide row.
const std::vector<std::pair<Index, Index>> kShapes = {{0, 5}, {1, 1}, {7, 13}, {33, 17}, {1, 67}, {64, 3}};

TYPED_TEST(ActivationTest, ApplyMatchesValueElementwise) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  unsigned seed = 1;
  for (const auto& shape : kShapes) {
    const Matrix<Scalar> input = sample_block<Scalar>(shape.first, shape.second, seed++, value_points());
    Matrix<Scalar> block = input;
    Act::template apply<Scalar>(block);
    ASSERT_EQ(block.rows(), input.rows());
    ASSERT_EQ(block.cols(), input.cols());
    for (Index i = 0; i < input.size(); ++i) {
      const Scalar a = input.data()[i];
      const long double expected = Act::template value<Scalar>(a);
      const long double got = block.data()[i];
      const long double tolerance = 8 * eps<Scalar>() * (std::fabs(expected) + R::value_condition(a)) +
                                    static_cast<long double>(std::numeric_limits<Scalar>::denorm_min());
      ASSERT_LE(std::fabs(got - expected), tolerance) << "apply vs value at a = " << a << ", shape " << shape.first
                                                      << "x" << shape.second;
    }
  }
}

TYPED_TEST(ActivationTest, ApplyOnStridedBlockTouchesOnlyTheBlock) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  Matrix<Scalar> storage = sample_block<Scalar>(11, 21, 99, value_points());
  const Matrix<Scalar> before = storage;
  // A 7×13 block with an outer stride of 21 (rows not contiguous with each other).
  Act::template apply<Scalar>(storage.block(2, 3, 7, 13));
  for (Index r = 0; r < storage.rows(); ++r) {
    for (Index c = 0; c < storage.cols(); ++c) {
      const bool inside = r >= 2 && r < 9 && c >= 3 && c < 16;
      const Scalar a = before(r, c);
      if (!inside) {
        ASSERT_EQ(storage(r, c), a) << "element (" << r << ", " << c << ") outside the block changed";
        continue;
      }
      const long double expected = Act::template value<Scalar>(a);
      const long double tolerance = 8 * eps<Scalar>() * (std::fabs(expected) + R::value_condition(a)) +
                                    static_cast<long double>(std::numeric_limits<Scalar>::denorm_min());
      ASSERT_LE(std::fabs(storage(r, c) - expected), tolerance) << "at a = " << a;
    }
  }
}

TYPED_TEST(ActivationTest, MultiplyByDerivativeMatchesDerivativeElementwise) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  unsigned seed = 17;
  std::mt19937 generator(5);
  std::uniform_real_distribution<double> gradient_value(-2.0, 2.0);
  for (const auto& shape : kShapes) {
    const Matrix<Scalar> pre = sample_block<Scalar>(shape.first, shape.second, seed++, derivative_points());
    Matrix<Scalar> gradient(pre.rows(), pre.cols());
    for (Index i = 0; i < gradient.size(); ++i) gradient.data()[i] = static_cast<Scalar>(gradient_value(generator));
    const Matrix<Scalar> upstream = gradient;
    Act::template multiply_by_derivative<Scalar>(pre, gradient);
    for (Index i = 0; i < pre.size(); ++i) {
      const Scalar a = pre.data()[i];
      const long double g = upstream.data()[i];
      const long double expected = g * static_cast<long double>(Act::template derivative<Scalar>(a));
      const long double tolerance =
          16 * eps<Scalar>() * std::fabs(g) * (std::fabs(expected / (g == 0 ? 1 : g)) + R::derivative_condition(a));
      ASSERT_LE(std::fabs(gradient.data()[i] - expected), tolerance)
          << "multiply_by_derivative at a = " << a << ", upstream " << static_cast<double>(g);
    }
  }
}

TYPED_TEST(ActivationTest, MultiplyByDerivativeOnStridedBlocks) {
  using Act = typename TypeParam::Activation;
  using Scalar = typename TypeParam::Scalar;
  using R = Reference<Act>;
  const Matrix<Scalar> pre_storage = sample_block<Scalar>(10, 19, 3, derivative_points());
  Matrix<Scalar> gradient_storage = Matrix<Scalar>::Constant(12, 23, Scalar(0.75));
  const Matrix<Scalar> before = gradient_storage;
  // pre: 6×9 block at (1, 4) of a 10×19 matrix; gradient: 6×9 block at (3, 2) of a 12×23 matrix.
  Act::template multiply_by_derivative<Scalar>(pre_storage.block(1, 4, 6, 9), gradient_storage.block(3, 2, 6, 9));
  for (Index r = 0; r < gradient_storage.rows(); ++r) {
    for (Index c = 0; c < gradient_storage.cols(); ++c) {
      const bool inside = r >= 3 && r < 9 && c >= 2 && c < 11;
      if (!inside) {
        ASSERT_EQ(gradient_storage(r, c), before(r, c)) << "element (" << r << ", " << c << ") outside changed";
        continue;
      }
      const Scalar a = pre_storage(r - 3 + 1, c - 2 + 4);
      const long double expected = 0.75L * static_cast<long double>(Act::template derivative<Scalar>(a));
      const long double tolerance = 16 * eps<Scalar>() * (std::fabs(expected) + R::derivative_condition(a));
      ASSERT_LE(std::fabs(gradient_storage(r, c) - expected), tolerance) << "at a = " << a;
    }
  }
}

TEST(ActivationNames, StableIdentifiers) {
  EXPECT_STREQ(sparsemoe::Relu::name, "relu");
  EXPECT_STREQ(sparsemoe::Silu::name, "silu");
  EXPECT_STREQ(sparsemoe::GeluTanh::name, "gelu_tanh");
  EXPECT_STREQ(sparsemoe::GeluErf::name, "gelu_erf");
  EXPECT_TRUE((std::is_same<sparsemoe::Gelu, sparsemoe::GeluTanh>::value));
}

TEST(ActivationForms, GeluTanhAndErfDifferButAgreeClosely) {
  // The two GELU forms are distinct functions (guards against one silently aliasing the other);
  // the tanh form approximates the erf form to ~1e-3 on [-8, 8].
  double max_difference = 0;
  for (double a = -8; a <= 8; a += 0.01) {
    max_difference = std::max(max_difference, std::fabs(sparsemoe::GeluTanh::value(a) - sparsemoe::GeluErf::value(a)));
  }
  EXPECT_GT(max_difference, 1e-5);
  EXPECT_LT(max_difference, 1e-3);
}

}  // namespace
