// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Experts: expert_forward (both overloads) against a naive per-row loop in double written here,
// initialize_uniform's bounds, determinism and distribution, the errors on bad sizes, and the
// tensors() views.
#include <sparsemoe/expert.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

constexpr double kPi = 3.141592653589793238462643383279502884;

// ---- Independent activation references (double) ----------------------------------------------
double ref_relu(double a) { return a > 0 ? a : 0.0; }
double ref_silu(double a) { return a / (1.0 + std::exp(-a)); }
double ref_gelu_tanh(double a) {
  return 0.5 * a * (1.0 + std::tanh(std::sqrt(2.0 / kPi) * (a + 0.044715 * a * a * a)));
}
double ref_gelu_erf(double a) { return 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0))); }

template <typename Activation>
double ref_act(double a);
template <>
double ref_act<sparsemoe::Relu>(double a) { return ref_relu(a); }
template <>
double ref_act<sparsemoe::Silu>(double a) { return ref_silu(a); }
template <>
double ref_act<sparsemoe::GeluTanh>(double a) { return ref_gelu_tanh(a); }
template <>
double ref_act<sparsemoe::GeluErf>(double a) { return ref_gelu_erf(a); }

// ---- Naive expert in double ---------------------------------------------------------------------
// For one input row x (length d): pre (p), hidden (h), out (d), and out_scale (d), a bound on the
// magnitude of the terms that were summed (so the tolerance is relative to what rounding can
// actually disturb, not to a possibly cancelled result).
struct NaiveRow {
  std::vector<double> pre, pre_scale, hidden, hidden_scale, out, out_scale;
};

template <typename ExpertT>
struct Traits;  // is_swiglu, act(a)

template <typename Scalar, typename Act>
struct Traits<sparsemoe::Expert<Scalar, Act>> {
  static constexpr bool is_swiglu = false;
  static double act(double a) { return ref_act<Act>(a); }
  static std::string name() { return std::string(Act::name) + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};

template <typename Scalar>
struct Traits<sparsemoe::SwiGluExpert<Scalar>> {
  static constexpr bool is_swiglu = true;
  static double act(double a) { return ref_silu(a); }
  static std::string name() { return std::string("swiglu") + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};

// Reads parameters through the public accessors only; W1 is d×p, b1 is p (or empty), W2 is h×d,
// b2 is d (or empty).
template <typename ExpertT, typename RowAccess>
NaiveRow naive_expert_row(const ExpertT& expert, const RowAccess& x) {
  const Index d = expert.input_dim();
  const Index h = expert.hidden_dim();
  const Index p = Traits<ExpertT>::is_swiglu ? 2 * h : h;
  NaiveRow r;
  r.pre.assign(p, 0.0);
  r.pre_scale.assign(p, 0.0);
  for (Index j = 0; j < p; ++j) {
    double sum = 0, scale = 0;
    for (Index i = 0; i < d; ++i) {
      const double term = static_cast<double>(x(i)) * static_cast<double>(expert.w1()(i, j));
      sum += term;
      scale += std::fabs(term);
    }
    if (expert.b1().size() > 0) {
      sum += static_cast<double>(expert.b1()(j));
      scale += std::fabs(static_cast<double>(expert.b1()(j)));
    }
    r.pre[j] = sum;
    r.pre_scale[j] = scale;
  }
  r.hidden.assign(h, 0.0);
  std::vector<double>& hidden_scale = r.hidden_scale;
  hidden_scale.assign(h, 0.0);
  for (Index j = 0; j < h; ++j) {
    if (Traits<ExpertT>::is_swiglu) {
      const double gate = r.pre[j], up = r.pre[h + j];
      r.hidden[j] = ref_silu(gate) * up;
      // |d silu| ≤ 1.1: error in gate and up propagate with these weights.
      hidden_scale[j] = std::fabs(r.hidden[j]) + 1.1 * r.pre_scale[j] * std::fabs(up) +
                        std::fabs(ref_silu(gate)) * r.pre_scale[h + j];
    } else {
      r.hidden[j] = Traits<ExpertT>::act(r.pre[j]);
      hidden_scale[j] = std::fabs(r.hidden[j]) + 1.2 * r.pre_scale[j];  // |act'| ≤ 1.13
    }
  }
  r.out.assign(d, 0.0);
  r.out_scale.assign(d, 0.0);
  for (Index c = 0; c < d; ++c) {
    double sum = 0, scale = 0;
    for (Index j = 0; j < h; ++j) {
      sum += r.hidden[j] * static_cast<double>(expert.w2()(j, c));
      scale += hidden_scale[j] * std::fabs(static_cast<double>(expert.w2()(j, c)));
    }
    if (expert.b2().size() > 0) {
      sum += static_cast<double>(expert.b2()(c));
      scale += std::fabs(static_cast<double>(expert.b2()(c)));
    }
    r.out[c] = sum;
    r.out_scale[c] = scale;
  }
  return r;
}

template <typename Scalar>
double relative_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed, double low = -1.0, double high = 1.0) {
  std::mt19937_64 generator(seed);
  std::uniform_real_distribution<double> uniform(low, high);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(uniform(generator));
  return m;
}

template <typename ExpertT>
class ExpertTest : public ::testing::Test {};

using ExpertTypes =
    ::testing::Types<sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::Expert<double, sparsemoe::Relu>,
                     sparsemoe::Expert<float, sparsemoe::Silu>, sparsemoe::Expert<double, sparsemoe::Silu>,
                     sparsemoe::Expert<float, sparsemoe::GeluTanh>, sparsemoe::Expert<double, sparsemoe::GeluTanh>,
                     sparsemoe::Expert<float, sparsemoe::GeluErf>, sparsemoe::Expert<double, sparsemoe::GeluErf>,
                     sparsemoe::SwiGluExpert<float>, sparsemoe::SwiGluExpert<double>>;

class ExpertNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return Traits<T>::name();
  }
};

TYPED_TEST_SUITE(ExpertTest, ExpertTypes, ExpertNames);

struct Shape {
  Index d, h, rows;
};
// d and h deliberately not multiples of 8 (nor of any SIMD width); d = 1 and rows = 1 hit the
// matrix-vector paths, rows = 130 more than one 128-row tile of the layer, rows = 0 the empty case.
const std::vector<Shape> kShapes = {{1, 1, 1},  {13, 29, 5}, {7, 3, 0},  {31, 65, 130},
                                    {5, 9, 1},  {1, 11, 17}, {20, 1, 4}, {13, 29, 1}};

TYPED_TEST(ExpertTest, AllocatingForwardMatchesNaiveLoop) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  std::uint64_t seed = 11;
  double worst = 0;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE("d=" + std::to_string(s.d) + " h=" + std::to_string(s.h) + " rows=" + std::to_string(s.rows));
    ExpertT expert(s.d, s.h);
    expert.initialize_uniform(seed++);
    const Matrix<Scalar> input = random_matrix<Scalar>(s.rows, s.d, seed++, -2.0, 2.0);
    const Matrix<Scalar> output = sparsemoe::expert_forward(expert, input);
    ASSERT_EQ(output.rows(), s.rows);
    ASSERT_EQ(output.cols(), s.d);
    for (Index r = 0; r < s.rows; ++r) {
      const NaiveRow ref = naive_expert_row(expert, input.row(r));
      for (Index c = 0; c < s.d; ++c) {
        const double error = std::fabs(static_cast<double>(output(r, c)) - ref.out[c]);
        ASSERT_LE(error, relative_tolerance<Scalar>() * ref.out_scale[c])
            << "row " << r << " col " << c << ": got " << output(r, c) << ", naive " << ref.out[c];
        worst = std::max(worst, error / ref.out_scale[c]);
      }
    }
  }
  std::cout << "  worst |out - naive| / scale = " << worst << "\n";
}

// The workspace overload writes pre, hidden and output into caller-owned blocks, possibly with an
// outer stride; nothing outside the blocks may change.
TYPED_TEST(ExpertTest, WorkspaceForwardMatchesNaiveLoopOnStridedBlocks) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  const Scalar sentinel = Scalar(12345.5);
  std::uint64_t seed = 101;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE("d=" + std::to_string(s.d) + " h=" + std::to_string(s.h) + " rows=" + std::to_string(s.rows));
    ExpertT expert(s.d, s.h);
    expert.initialize_uniform(seed++);
    const Index p = expert.pre_activation_width();
    const Matrix<Scalar> input_storage = random_matrix<Scalar>(s.rows + 3, s.d + 4, seed++, -2.0, 2.0);
    const auto input = input_storage.block(1, 2, s.rows, s.d);
    Matrix<Scalar> pre_storage = Matrix<Scalar>::Constant(s.rows + 2, p + 3, sentinel);
    Matrix<Scalar> hidden_storage = Matrix<Scalar>::Constant(s.rows + 2, s.h + 5, sentinel);
    Matrix<Scalar> output_storage = Matrix<Scalar>::Constant(s.rows + 2, s.d + 2, sentinel);
    sparsemoe::expert_forward(expert, input, pre_storage.block(1, 1, s.rows, p),
                              hidden_storage.block(1, 3, s.rows, s.h), output_storage.block(2, 0, s.rows, s.d));
    const double tolerance = relative_tolerance<Scalar>();
    for (Index r = 0; r < s.rows; ++r) {
      const NaiveRow ref = naive_expert_row(expert, input.row(r));
      for (Index j = 0; j < p; ++j) {
        ASSERT_LE(std::fabs(pre_storage(1 + r, 1 + j) - ref.pre[j]), tolerance * ref.pre_scale[j])
            << "pre(" << r << ", " << j << ")";
      }
      for (Index j = 0; j < s.h; ++j) {
        ASSERT_LE(std::fabs(hidden_storage(1 + r, 3 + j) - ref.hidden[j]), tolerance * ref.hidden_scale[j])
            << "hidden(" << r << ", " << j << ")";
      }
      for (Index c = 0; c < s.d; ++c) {
        ASSERT_LE(std::fabs(output_storage(2 + r, c) - ref.out[c]), tolerance * ref.out_scale[c])
            << "output(" << r << ", " << c << ")";
      }
    }
    // Outside the blocks: untouched.
    for (Index r = 0; r < pre_storage.rows(); ++r) {
      for (Index c = 0; c < pre_storage.cols(); ++c) {
        if (r >= 1 && r < 1 + s.rows && c >= 1 && c < 1 + p) continue;
        ASSERT_EQ(pre_storage(r, c), sentinel) << "pre storage (" << r << ", " << c << ")";
      }
    }
    for (Index r = 0; r < hidden_storage.rows(); ++r) {
      for (Index c = 0; c < hidden_storage.cols(); ++c) {
        if (r >= 1 && r < 1 + s.rows && c >= 3 && c < 3 + s.h) continue;
        ASSERT_EQ(hidden_storage(r, c), sentinel) << "hidden storage (" << r << ", " << c << ")";
      }
    }
    for (Index r = 0; r < output_storage.rows(); ++r) {
      for (Index c = 0; c < output_storage.cols(); ++c) {
        if (r >= 2 && r < 2 + s.rows && c < s.d) continue;
        ASSERT_EQ(output_storage(r, c), sentinel) << "output storage (" << r << ", " << c << ")";
      }
    }
  }
}

TYPED_TEST(ExpertTest, BothOverloadsAgreeBitwise) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  ExpertT expert(13, 29);
  expert.initialize_uniform(7);
  const Matrix<Scalar> input = random_matrix<Scalar>(9, 13, 8);
  const Matrix<Scalar> allocated = sparsemoe::expert_forward(expert, input);
  Matrix<Scalar> pre(9, expert.pre_activation_width()), hidden(9, 29), output(9, 13);
  sparsemoe::expert_forward(expert, input, pre, hidden, output);
  EXPECT_TRUE(allocated == output);
}

TYPED_TEST(ExpertTest, ZeroExpertGivesZero) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  ExpertT expert(6, 10);  // constructor zero-initialises
  for (auto& view : expert.tensors()) EXPECT_TRUE(view.matrix().isZero(0)) << view.name;
  const Matrix<Scalar> output = sparsemoe::expert_forward(expert, random_matrix<Scalar>(4, 6, 3));
  EXPECT_TRUE(output.isZero(0));
}

TYPED_TEST(ExpertTest, Dimensions) {
  using ExpertT = TypeParam;
  ExpertT expert(13, 29);
  EXPECT_EQ(expert.input_dim(), 13);
  EXPECT_EQ(expert.hidden_dim(), 29);
  EXPECT_EQ(expert.pre_activation_width(), Traits<ExpertT>::is_swiglu ? 58 : 29);
}

TYPED_TEST(ExpertTest, TensorsOrderShapesAndAliasing) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  const Index d = 13, h = 29;
  ExpertT expert(d, h);
  expert.initialize_uniform(5);
  auto views = expert.tensors();
  if (Traits<ExpertT>::is_swiglu) {
    ASSERT_EQ(views.size(), 2u);
    EXPECT_EQ(views[0].name, "w1");
    EXPECT_EQ(views[0].rows, d);
    EXPECT_EQ(views[0].cols, 2 * h);
    EXPECT_EQ(views[1].name, "w2");
    EXPECT_EQ(views[1].rows, h);
    EXPECT_EQ(views[1].cols, d);
    EXPECT_EQ(expert.b1().size(), 0);
    EXPECT_EQ(expert.b2().size(), 0);
  } else {
    ASSERT_EQ(views.size(), 4u);
    const std::vector<std::string> names = {"w1", "b1", "w2", "b2"};
    const std::vector<std::pair<Index, Index>> shapes = {{d, h}, {h, 1}, {h, d}, {d, 1}};
    for (std::size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(views[i].name, names[i]);
      EXPECT_EQ(views[i].rows, shapes[i].first) << names[i];
      EXPECT_EQ(views[i].cols, shapes[i].second) << names[i];
      EXPECT_EQ(views[i].size(), shapes[i].first * shapes[i].second);
    }
    EXPECT_EQ(views[1].data, expert.b1().data());
    EXPECT_EQ(views[3].data, expert.b2().data());
  }
  EXPECT_EQ(views.front().data, expert.w1().data());
  EXPECT_EQ(views[Traits<ExpertT>::is_swiglu ? 1 : 2].data, expert.w2().data());
  // Views alias the parameters: writes show through, row-major.
  for (auto& view : views) {
    view.matrix()(view.rows - 1, 0) = Scalar(42);
    view.flat()(0) = Scalar(-7);
  }
  EXPECT_EQ(expert.w1()(d - 1, 0), Scalar(42));
  EXPECT_EQ(expert.w1()(0, 0), Scalar(-7));
  EXPECT_EQ(expert.w2()(h - 1, 0), Scalar(42));
  EXPECT_EQ(expert.w2()(0, 0), Scalar(-7));
  if (!Traits<ExpertT>::is_swiglu) {
    EXPECT_EQ(expert.b1()(h - 1), Scalar(42));
    EXPECT_EQ(expert.b1()(0), Scalar(-7));
    EXPECT_EQ(expert.b2()(d - 1), Scalar(42));
    EXPECT_EQ(expert.b2()(0), Scalar(-7));
  }
  expert.set_zero();
  for (auto& view : expert.tensors()) EXPECT_TRUE(view.matrix().isZero(0)) << view.name;
}

// The bound of each tensor: 1/√fan_in, fan_in = d for the first layer, h for the second.
template <typename ExpertT>
std::vector<double> bounds_of(const ExpertT& expert) {
  const double first = 1.0 / std::sqrt(static_cast<double>(expert.input_dim()));
  const double second = 1.0 / std::sqrt(static_cast<double>(expert.hidden_dim()));
  if (Traits<ExpertT>::is_swiglu) return {first, second};
  return {first, first, second, second};
}

TYPED_TEST(ExpertTest, InitializeUniformBoundsAndDistribution) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  for (const auto& dims : std::vector<std::pair<Index, Index>>{{64, 96}, {13, 29}, {1, 1}}) {
    SCOPED_TRACE("d=" + std::to_string(dims.first) + " h=" + std::to_string(dims.second));
    ExpertT expert(dims.first, dims.second);
    expert.initialize_uniform(2024);
    auto views = expert.tensors();
    const std::vector<double> bounds = bounds_of(expert);
    ASSERT_EQ(views.size(), bounds.size());
    for (std::size_t t = 0; t < views.size(); ++t) {
      SCOPED_TRACE(views[t].name);
      const double bound = bounds[t];
      const Index n = views[t].size();
      double sum = 0, sum_squares = 0, low = bound, high = -bound;
      std::vector<double> values;
      for (Index i = 0; i < n; ++i) {
        const double v = static_cast<double>(views[t].flat()(i));
        // The library's float bound 1/√f may round up by one ulp.
        ASSERT_LE(std::fabs(v), bound * (1 + 2 * std::numeric_limits<Scalar>::epsilon())) << "element " << i;
        ASSERT_TRUE(std::isfinite(v));
        sum += v;
        sum_squares += v * v;
        low = std::min(low, v);
        high = std::max(high, v);
        values.push_back(v / bound);
      }
      if (n < 1000) continue;
      // U(−b, b): mean 0 with sd b/√(3n), variance b²/3; the extremes come close to ±b; the
      // empirical CDF stays within the Kolmogorov–Smirnov 0.1% band of (x + 1)/2.
      const double mean = sum / static_cast<double>(n);
      const double variance = sum_squares / static_cast<double>(n) - mean * mean;
      EXPECT_LT(std::fabs(mean), 5 * bound / std::sqrt(3.0 * static_cast<double>(n)));
      EXPECT_NEAR(variance / (bound * bound / 3), 1.0, 0.06);
      EXPECT_LT(low, -0.99 * bound);
      EXPECT_GT(high, 0.99 * bound);
      std::sort(values.begin(), values.end());
      double ks = 0;
      for (std::size_t i = 0; i < values.size(); ++i) {
        const double cdf = (values[i] + 1) / 2;
        ks = std::max({ks, std::fabs(cdf - static_cast<double>(i) / static_cast<double>(n)),
                       std::fabs(cdf - static_cast<double>(i + 1) / static_cast<double>(n))});
      }
      EXPECT_LT(ks, 1.95 / std::sqrt(static_cast<double>(n))) << "Kolmogorov–Smirnov statistic";
    }
  }
}

TYPED_TEST(ExpertTest, InitializeUniformIsAFunctionOfTheSeed) {
  using ExpertT = TypeParam;
  ExpertT first(13, 29), second(13, 29), other(13, 29);
  first.initialize_uniform(77);
  second.initialize_uniform(12345);  // overwritten below: the result must not depend on history
  second.initialize_uniform(77);
  other.initialize_uniform(78);
  auto a = first.tensors();
  auto b = second.tensors();
  auto c = other.tensors();
  for (std::size_t t = 0; t < a.size(); ++t) {
    SCOPED_TRACE(a[t].name);
    EXPECT_TRUE(a[t].flat() == b[t].flat()) << "same seed, different values";
    Index equal = 0;
    for (Index i = 0; i < a[t].size(); ++i) equal += a[t].flat()(i) == c[t].flat()(i);
    EXPECT_EQ(equal, 0) << "seed 77 and 78 share " << equal << " of " << a[t].size() << " values";
  }
  // Different tensors are not copies of one stream: W1's first row differs from b1 (or, for
  // SwiGLU, W_gate's first row from W_up's).
  if constexpr (Traits<ExpertT>::is_swiglu) {
    EXPECT_FALSE(first.gate_projection().row(0) == first.up_projection().row(0));
  } else {
    EXPECT_FALSE(first.w1().row(0).transpose() == first.b1());
  }
  // Within one tensor, no two rows are equal.
  for (Index i = 1; i < first.w1().rows(); ++i) EXPECT_FALSE(first.w1().row(i) == first.w1().row(0));
}

TEST(SwiGluExpert, GateAndUpAreTheHalvesOfW1) {
  sparsemoe::SwiGluExpert<double> expert(5, 7);
  expert.initialize_uniform(3);
  for (Index i = 0; i < 5; ++i) {
    for (Index j = 0; j < 7; ++j) {
      EXPECT_EQ(expert.gate_projection()(i, j), expert.w1()(i, j));
      EXPECT_EQ(expert.up_projection()(i, j), expert.w1()(i, 7 + j));
    }
  }
  expert.gate_projection()(1, 2) = 9.0;
  expert.up_projection()(3, 4) = -9.0;
  EXPECT_EQ(expert.w1()(1, 2), 9.0);
  EXPECT_EQ(expert.w1()(3, 11), -9.0);
}

// Hand-computed SwiGLU: one token, d = 1, h = 1: out = silu(x·g)·(x·u)·w.
TEST(SwiGluExpert, HandComputedValue) {
  sparsemoe::SwiGluExpert<double> expert(1, 1);
  expert.w1()(0, 0) = 0.5;   // gate
  expert.w1()(0, 1) = -1.5;  // up
  expert.w2()(0, 0) = 2.0;
  Matrix<double> x(1, 1);
  x(0, 0) = 0.8;
  const double gate = 0.4, up = -1.2;
  const double expected = gate / (1 + std::exp(-gate)) * up * 2.0;
  EXPECT_NEAR(sparsemoe::expert_forward(expert, x)(0, 0), expected, 1e-15);
}

// Hand-computed ReLU expert with biases: d = 2, h = 2.
TEST(Expert, HandComputedValue) {
  sparsemoe::Expert<double, sparsemoe::Relu> expert(2, 2);
  expert.w1() << 1, -1, 2, 0.5;  // row-major: W1(0,:) = (1, -1), W1(1,:) = (2, 0.5)
  expert.b1() << 0.25, -3;
  expert.w2() << 1, 2, 3, 4;
  expert.b2() << -1, 1;
  Matrix<double> x(1, 2);
  x << 1, 1;
  // pre = (1 + 2 + 0.25, −1 + 0.5 − 3) = (3.25, −3.5); hidden = (3.25, 0);
  // out = (3.25·1 − 1, 3.25·2 + 1) = (2.25, 7.5).
  const Matrix<double> out = sparsemoe::expert_forward(expert, x);
  EXPECT_DOUBLE_EQ(out(0, 0), 2.25);
  EXPECT_DOUBLE_EQ(out(0, 1), 7.5);
}

template <typename Callable>
std::string invalid_argument_message(const Callable& callable) {
  try {
    callable();
  } catch (const std::invalid_argument& error) {
    return error.what();
  } catch (...) {
    return "<other exception>";
  }
  return "<no exception>";
}

TYPED_TEST(ExpertTest, BadSizesThrowNamingTheFunction) {
  using ExpertT = TypeParam;
  const std::string function = Traits<ExpertT>::is_swiglu ? "sparsemoe::SwiGluExpert" : "sparsemoe::Expert";
  struct Bad {
    Index d, h;
    std::string mentions;
  };
  for (const Bad& bad : {Bad{0, 5, "input_dim=0"}, Bad{5, 0, "hidden_dim=0"}, Bad{0, 0, "input_dim=0"},
                         Bad{-3, 4, "input_dim=-3"}, Bad{4, -1, "hidden_dim=-1"}}) {
    const std::string message = invalid_argument_message([&] { ExpertT expert(bad.d, bad.h); });
    EXPECT_NE(message.find(function), std::string::npos) << message;
    EXPECT_NE(message.find(bad.mentions), std::string::npos) << message;
  }
  EXPECT_NO_THROW(ExpertT(1, 1));
}

TYPED_TEST(ExpertTest, ForwardRejectsWrongInputWidth) {
  using ExpertT = TypeParam;
  using Scalar = typename ExpertT::Scalar;
  ExpertT expert(13, 29);
  const std::string message =
      invalid_argument_message([&] { sparsemoe::expert_forward(expert, Matrix<Scalar>::Zero(5, 12)); });
  EXPECT_NE(message.find("sparsemoe::expert_forward"), std::string::npos) << message;
  EXPECT_NE(message.find("13"), std::string::npos) << message;
  EXPECT_NE(message.find("5x12"), std::string::npos) << message;
}

}  // namespace
