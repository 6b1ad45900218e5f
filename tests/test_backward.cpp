// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// MoELayer::backward: every gradient (input X, W_g, W_noise, every tensor of every expert)
// against finite differences of L = Σ (W ⊙ y) + losses.total() in double, for every expert type,
// with the auxiliary losses on and off, for k = 1, 2 and E; bitwise identity across thread
// counts; exact accumulation; and the errors backward must raise.
#include "gradient_check.hpp"

#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

template <typename ExpertT>
struct Kind;
template <typename Scalar, typename Act>
struct Kind<sparsemoe::Expert<Scalar, Act>> {
  static constexpr bool has_relu_kink = std::is_same<Act, sparsemoe::Relu>::value;
  static std::string name() { return std::string(Act::name) + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};
template <typename Scalar>
struct Kind<sparsemoe::SwiGluExpert<Scalar>> {
  static constexpr bool has_relu_kink = false;
  static std::string name() { return std::string("swiglu") + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::mt19937_64& generator, double low = -1.0, double high = 1.0) {
  std::uniform_real_distribution<double> uniform(low, high);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(uniform(generator));
  return m;
}

#ifdef _OPENMP
/// Sets the OpenMP thread count for its lifetime and restores the previous one.
class ThreadCount {
 public:
  explicit ThreadCount(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};
#endif

template <typename Scalar>
bool bitwise_equal(const Scalar* a, const Scalar* b, Index size) {
  return size == 0 || std::memcmp(a, b, static_cast<std::size_t>(size) * sizeof(Scalar)) == 0;
}

// ---- Finite-difference checks ---------------------------------------------------------------

// Sizes kept small so the ~2000 forward passes per configuration stay fast.
constexpr Index kTokens = 8, kDim = 6, kHidden = 7, kExperts = 4;
constexpr std::uint64_t kStep = 3;

// The step of the difference quotient is 1e-4 (relative), and the 5-point stencil reaches ±2e-4;
// one input element moves a noisy logit by at most 2e-4·(|W_g| + |n|·|W_noise|) < 1e-3 (|W| ≤
// 1/√d ≈ 0.41, |n| < 4 for these few samples), so two logits approach each other by < 2e-3 and
// the loss is smooth over the stencil when
//  - every gap between consecutive sorted noisy logits of a token exceeds kLogitMargin (not only
//    the k-th/(k+1)-th gap: the load estimator's threshold θ is the k-th or (k+1)-th order
//    statistic, whose slope changes where ranks k−1/k or k+1/k+2 swap), and
//  - for ReLU, every pre-activation of a routed (token, expert) pair is at least kReluMargin from 0.
constexpr double kLogitMargin = 3e-3;
constexpr double kReluMargin = 1e-3;
constexpr double kMaxRelativeError = 1e-6;

template <typename ExpertT>
bool away_from_kinks(const sparsemoe::MoELayer<double, ExpertT>& layer, const Matrix<double>& input,
                     const sparsemoe::ForwardResult<double>& result) {
  const auto& routing = result.routing;
  for (Index t = 0; t < input.rows(); ++t) {
    std::vector<double> logits(routing.noisy_logits.row(t).data(),
                               routing.noisy_logits.row(t).data() + routing.noisy_logits.cols());
    std::sort(logits.begin(), logits.end());
    for (std::size_t i = 1; i < logits.size(); ++i) {
      if (logits[i] - logits[i - 1] < kLogitMargin) return false;
    }
    if (Kind<ExpertT>::has_relu_kink) {
      for (Index slot = 0; slot < routing.k(); ++slot) {
        const ExpertT& expert = layer.expert(routing.expert_ids(t, slot));
        for (Index j = 0; j < expert.hidden_dim(); ++j) {
          double pre = expert.b1()(j);
          for (Index i = 0; i < expert.input_dim(); ++i) pre += input(t, i) * expert.w1()(i, j);
          if (std::fabs(pre) < kReluMargin) return false;
        }
      }
    }
  }
  return true;
}

std::string describe(const std::string& kind, Index k, double w_importance, double w_load) {
  std::ostringstream s;
  s << kind << " k=" << k << (k == kExperts ? " (dense)" : "") << " w_importance=" << w_importance
    << " w_load=" << w_load;
  return s.str();
}

template <typename ExpertT>
void check_backward_by_finite_differences(Index k, double w_importance, double w_load, std::uint64_t seed) {
  using Layer = sparsemoe::MoELayer<double, ExpertT>;
  const std::string label = describe(Kind<ExpertT>::name(), k, w_importance, w_load);
  SCOPED_TRACE(label);
  sparsemoe::MoEConfig config;
  config.input_dim = kDim;
  config.hidden_dim = kHidden;
  config.num_experts = kExperts;
  config.k = k;
  config.seed = seed;
  Layer layer(config);
  layer.gate().initialize_uniform(seed + 1000);  // non-zero W_g and W_noise: routing varies

  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = kStep;
  options.importance_weight = w_importance;
  options.load_weight = w_load;

  std::mt19937_64 generator(seed * 7919 + 17);
  const Matrix<double> output_weight = random_matrix<double>(kTokens, kDim, generator);
  Matrix<double> input;
  bool found = false;
  {
#ifdef _OPENMP
    // Thousands of tiny forward passes (redraws here, ~2000 for the differences below): with several
    // threads each is dominated by OpenMP fork/join and crawls on a loaded machine. Only the
    // analytic pass runs with the ambient thread count; results do not depend on it
    // (BackwardDeterminism checks that bit for bit).
    ThreadCount single_thread(1);
#endif
    for (int attempt = 0; attempt < 500 && !found; ++attempt) {
      input = random_matrix<double>(kTokens, kDim, generator);
      found = away_from_kinks(layer, input, layer.forward(input, options));
    }
  }
  ASSERT_TRUE(found) << "no input away from top-k ties and ReLU kinks in 500 draws";

  const auto loss = [&] {
    const auto result = layer.forward(input, options);
    return (output_weight.array() * result.output.array()).sum() + result.losses.total();
  };

  const auto result = layer.forward(input, options);
  ASSERT_FALSE(result.cache.empty());
  // The configuration is the one intended: smooth load estimator exactly when k < E.
  EXPECT_EQ(result.losses.smooth_load, k < kExperts);
  auto gradients = layer.make_gradients();
  const Matrix<double> d_input = layer.backward(result, output_weight, gradients);
  ASSERT_EQ(d_input.rows(), kTokens);
  ASSERT_EQ(d_input.cols(), kDim);

  sparsemoe_test::GradientCheckOptions check_options;
  double worst = 0;
#ifdef _OPENMP
  ThreadCount single_thread(1);  // see above
#endif
  const auto report = [&](const std::string& tensor, const sparsemoe_test::GradientCheckResult& r) {
    std::cout << "  [" << label << "] " << std::left << std::setw(20) << tensor << std::right
              << " worst rel err " << std::setprecision(3) << std::scientific << r.worst_relative_error
              << "  max |error| " << r.max_abs_error << "  max |grad| " << r.max_abs_analytic << "  at worst: numeric "
              << r.numeric_at_worst << " analytic " << r.analytic_at_worst << std::defaultfloat << std::setprecision(6)
              << "\n";
    EXPECT_LT(r.worst_relative_error, kMaxRelativeError) << tensor << ": " << r;
    worst = std::max(worst, r.worst_relative_error);
  };

  const auto input_check = sparsemoe_test::check_gradient(loss, input, d_input, check_options);
  EXPECT_GT(input_check.max_abs_analytic, 1e-3) << "d_input is (nearly) zero: the check would be vacuous";
  report("input", input_check);

  auto parameters = layer.tensors();
  auto gradient_views = gradients.tensors();
  ASSERT_EQ(parameters.size(), gradient_views.size());
  for (std::size_t t = 0; t < parameters.size(); ++t) {
    ASSERT_EQ(parameters[t].name, gradient_views[t].name);
    const auto r = sparsemoe_test::check_gradient(loss, parameters[t], gradient_views[t], check_options);
    // With k = 1 and no auxiliary loss every gate is exactly 1, so W_g and W_noise get no gradient.
    const bool gate_matters = k > 1 || w_importance > 0 || w_load > 0;
    if (gate_matters && (parameters[t].name == "gate.gate_weight" || parameters[t].name == "gate.noise_weight")) {
      EXPECT_GT(r.max_abs_analytic, 1e-4) << parameters[t].name << " gradient is (nearly) zero";
    }
    report(parameters[t].name, r);
  }
  std::ostringstream key;
  key << "worst_relative_error_k" << k << "_w" << w_importance << "_" << w_load;
  ::testing::Test::RecordProperty(key.str(), std::to_string(worst));
}

template <typename ExpertT>
class BackwardFiniteDifferences : public ::testing::Test {};

using DoubleExpertTypes =
    ::testing::Types<sparsemoe::Expert<double, sparsemoe::Relu>, sparsemoe::Expert<double, sparsemoe::Silu>,
                     sparsemoe::Expert<double, sparsemoe::GeluTanh>, sparsemoe::Expert<double, sparsemoe::GeluErf>,
                     sparsemoe::SwiGluExpert<double>>;

class KindNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return Kind<T>::name();
  }
};

TYPED_TEST_SUITE(BackwardFiniteDifferences, DoubleExpertTypes, KindNames);

TYPED_TEST(BackwardFiniteDifferences, TopOne) {
  check_backward_by_finite_differences<TypeParam>(1, 0.1, 0.3, 11);
  check_backward_by_finite_differences<TypeParam>(1, 0.0, 0.0, 12);
}

TYPED_TEST(BackwardFiniteDifferences, TopTwo) {
  check_backward_by_finite_differences<TypeParam>(2, 0.1, 0.3, 21);
  check_backward_by_finite_differences<TypeParam>(2, 0.0, 0.0, 22);
}

TYPED_TEST(BackwardFiniteDifferences, Dense) {
  check_backward_by_finite_differences<TypeParam>(kExperts, 0.1, 0.3, 31);
  check_backward_by_finite_differences<TypeParam>(kExperts, 0.0, 0.0, 32);
}

// Only the load loss (w_importance = 0), and only the importance loss, with k = 2: each term's
// gradient checked on its own (a sign error in one could otherwise hide behind the other).
TEST(BackwardFiniteDifferencesSingleLoss, LoadOnlyAndImportanceOnly) {
  check_backward_by_finite_differences<sparsemoe::Expert<double, sparsemoe::Silu>>(2, 0.0, 1.0, 41);
  check_backward_by_finite_differences<sparsemoe::Expert<double, sparsemoe::Silu>>(2, 1.0, 0.0, 42);
  check_backward_by_finite_differences<sparsemoe::Expert<double, sparsemoe::Silu>>(3, 0.0, 1.0, 43);
}

// ---- Thread-count independence, accumulation, errors --------------------------------------------

template <typename LayerT>
class BackwardDeterminism : public ::testing::Test {};

using DeterminismLayers =
    ::testing::Types<sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Relu>>,
                     sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>>,
                     sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::GeluErf>>,
                     sparsemoe::MoELayer<double, sparsemoe::SwiGluExpert<double>>>;

class LayerNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return Kind<typename T::ExpertType>::name();
  }
};

TYPED_TEST_SUITE(BackwardDeterminism, DeterminismLayers, LayerNames);

template <typename LayerT>
struct BackwardRun {
  Matrix<typename LayerT::Scalar> d_input;
  typename LayerT::Gradients gradients;
};

template <typename LayerT>
BackwardRun<LayerT> run_backward(const LayerT& layer, const Matrix<typename LayerT::Scalar>& input,
                                 const Matrix<typename LayerT::Scalar>& d_output,
                                 const sparsemoe::ForwardOptions& options) {
  BackwardRun<LayerT> run;
  const auto result = layer.forward(input, options);
  run.gradients = layer.make_gradients();
  run.d_input = layer.backward(result, d_output, run.gradients);
  return run;
}

TYPED_TEST(BackwardDeterminism, BitwiseIdenticalForOneAndTwoThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  // Big enough for several 128-row expert tiles and 64-row gate tiles; SwiGLU's p = 144 also gives
  // two 128-column weight-gradient tiles.
  sparsemoe::MoEConfig config;
  config.input_dim = 40;
  config.hidden_dim = 72;
  config.num_experts = 5;
  config.k = 2;
  config.seed = 5;
  LayerT layer(config);
  layer.gate().initialize_uniform(6);
  std::mt19937_64 generator(7);
  const Matrix<Scalar> input = random_matrix<Scalar>(700, 40, generator);
  const Matrix<Scalar> d_output = random_matrix<Scalar>(700, 40, generator);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 9;
  options.importance_weight = 0.1;
  options.load_weight = 0.3;

  BackwardRun<LayerT> one, two, three;
  {
    ThreadCount threads(1);
    one = run_backward(layer, input, d_output, options);
  }
  {
    ThreadCount threads(2);
    two = run_backward(layer, input, d_output, options);
  }
  {
    ThreadCount threads(3);  // more threads than cores, uneven split
    three = run_backward(layer, input, d_output, options);
  }
  ASSERT_TRUE(one.d_input.allFinite());
  EXPECT_TRUE(bitwise_equal(one.d_input.data(), two.d_input.data(), one.d_input.size())) << "d_input";
  EXPECT_TRUE(bitwise_equal(one.d_input.data(), three.d_input.data(), one.d_input.size())) << "d_input (3 threads)";
  auto a = one.gradients.tensors();
  auto b = two.gradients.tensors();
  auto c = three.gradients.tensors();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t t = 0; t < a.size(); ++t) {
    EXPECT_TRUE(bitwise_equal(a[t].data, b[t].data, a[t].size())) << a[t].name << " differs for 1 and 2 threads";
    EXPECT_TRUE(bitwise_equal(a[t].data, c[t].data, a[t].size())) << a[t].name << " differs for 1 and 3 threads";
    EXPECT_GT(a[t].matrix().cwiseAbs().maxCoeff(), Scalar(0)) << a[t].name << " is all zero";
  }
#endif
}

TYPED_TEST(BackwardDeterminism, TwoRunsAreBitwiseIdentical) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  sparsemoe::MoEConfig config;
  config.input_dim = 13;
  config.hidden_dim = 29;
  config.num_experts = 5;
  config.k = 2;
  config.seed = 8;
  LayerT first(config), second(config);
  first.gate().initialize_uniform(9);
  second.gate().initialize_uniform(9);
  std::mt19937_64 generator(10);
  const Matrix<Scalar> input = random_matrix<Scalar>(300, 13, generator);
  const Matrix<Scalar> d_output = random_matrix<Scalar>(300, 13, generator);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 4;
  const auto x = run_backward(first, input, d_output, options);
  const auto y = run_backward(second, input, d_output, options);
  EXPECT_TRUE(bitwise_equal(x.d_input.data(), y.d_input.data(), x.d_input.size()));
  auto a = x.gradients;
  auto b = y.gradients;
  auto va = a.tensors();
  auto vb = b.tensors();
  for (std::size_t t = 0; t < va.size(); ++t) {
    EXPECT_TRUE(bitwise_equal(va[t].data, vb[t].data, va[t].size())) << va[t].name;
  }
}

// backward ADDS to the gradients: two calls without zeroing give twice one call. Accumulating
// C += A·B can round differently from 2·(A·B) when the product is summed in several passes, so the
// tolerance is a few ulps of the tensor's largest entry (overwriting instead of adding, or
// zeroing first, would be off by 100%).
TYPED_TEST(BackwardDeterminism, BackwardAccumulatesIntoGradients) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  sparsemoe::MoEConfig config;
  config.input_dim = 13;
  config.hidden_dim = 29;
  config.num_experts = 4;
  config.k = 2;
  config.seed = 12;
  LayerT layer(config);
  layer.gate().initialize_uniform(13);
  std::mt19937_64 generator(14);
  const Matrix<Scalar> input = random_matrix<Scalar>(50, 13, generator);
  const Matrix<Scalar> d_output = random_matrix<Scalar>(50, 13, generator);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 2;
  const auto result = layer.forward(input, options);

  auto once = layer.make_gradients();
  const Matrix<Scalar> d_input_once = layer.backward(result, d_output, once);
  auto twice = layer.make_gradients();
  const Matrix<Scalar> d_input_first = layer.backward(result, d_output, twice);
  const Matrix<Scalar> d_input_second = layer.backward(result, d_output, twice);
  // d_input is returned fresh each call, not accumulated.
  EXPECT_TRUE(bitwise_equal(d_input_once.data(), d_input_first.data(), d_input_once.size()));
  EXPECT_TRUE(bitwise_equal(d_input_once.data(), d_input_second.data(), d_input_once.size()));

  // Starting from a non-zero accumulator: gradients = C + one call.
  auto offset = layer.make_gradients();
  for (auto& view : offset.tensors()) view.flat().setConstant(Scalar(0.5));
  layer.backward(result, d_output, offset);

  const Scalar eps = std::numeric_limits<Scalar>::epsilon();
  auto v1 = once.tensors();
  auto v2 = twice.tensors();
  auto vo = offset.tensors();
  double worst_ulps = 0;
  for (std::size_t t = 0; t < v1.size(); ++t) {
    const Scalar scale = std::max(v1[t].matrix().cwiseAbs().maxCoeff(), std::numeric_limits<Scalar>::min());
    for (Index i = 0; i < v1[t].size(); ++i) {
      const Scalar expected = 2 * v1[t].flat()(i);
      const Scalar error = std::fabs(v2[t].flat()(i) - expected);
      // The second call adds into a non-zero accumulator inside the GEMM kernels (the
      // libxsmm backend accumulates from C), so its rounding differs from 2×once by a few ulps
      // of the accumulated value (2·scale); measured up to ~4.3 eps·|value|.
      ASSERT_LE(error, 16 * eps * (2 * scale)) << v1[t].name << "[" << i << "]: twice " << v2[t].flat()(i) << ", 2×once "
                                        << expected;
      worst_ulps = std::max(worst_ulps, static_cast<double>(error / (eps * scale)));
      const Scalar offset_expected = Scalar(0.5) + v1[t].flat()(i);
      ASSERT_LE(std::fabs(vo[t].flat()(i) - offset_expected), 16 * eps * (scale + Scalar(0.5)))
          << v1[t].name << "[" << i << "] after starting from 0.5";
    }
  }
  std::cout << "  accumulation: worst |twice − 2·once| = " << worst_ulps << " eps·max|g|\n";
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

TYPED_TEST(BackwardDeterminism, BackwardRejectsBadArguments) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 7;
  config.num_experts = 4;
  config.k = 2;
  config.seed = 1;
  LayerT layer(config), twin(config);
  std::mt19937_64 generator(2);
  const Matrix<Scalar> input = random_matrix<Scalar>(8, 6, generator);
  const Matrix<Scalar> d_output = random_matrix<Scalar>(8, 6, generator);
  sparsemoe::ForwardOptions training;
  training.mode = Mode::training;
  const auto trained = layer.forward(input, training);
  const auto evaluated = layer.forward(input);  // Mode::evaluation
  auto gradients = layer.make_gradients();
  const std::string function = "sparsemoe::MoELayer::backward";

  std::string message = invalid_argument_message([&] { layer.backward(evaluated, d_output, gradients); });
  EXPECT_NE(message.find(function), std::string::npos) << message;
  EXPECT_NE(message.find("Mode::training"), std::string::npos) << message;

  // Same configuration, same parameters, but another object.
  message = invalid_argument_message([&] { twin.backward(trained, d_output, gradients); });
  EXPECT_NE(message.find(function), std::string::npos) << message;
  EXPECT_NE(message.find("another layer"), std::string::npos) << message;

  message = invalid_argument_message([&] { layer.backward(trained, Matrix<Scalar>::Zero(8, 7), gradients); });
  EXPECT_NE(message.find(function), std::string::npos) << message;
  EXPECT_NE(message.find("d_output"), std::string::npos) << message;
  EXPECT_NE(message.find("8x6"), std::string::npos) << message;
  EXPECT_NE(message.find("8x7"), std::string::npos) << message;

  message = invalid_argument_message([&] { layer.backward(trained, Matrix<Scalar>::Zero(9, 6), gradients); });
  EXPECT_NE(message.find("d_output"), std::string::npos) << message;
  EXPECT_NE(message.find("9x6"), std::string::npos) << message;

  // Gradients shaped for a different layer.
  sparsemoe::MoEConfig other = config;
  other.hidden_dim = 5;
  auto wrong = LayerT(other).make_gradients();
  message = invalid_argument_message([&] { layer.backward(trained, d_output, wrong); });
  EXPECT_NE(message.find(function), std::string::npos) << message;

  other = config;
  other.num_experts = 3;
  wrong = LayerT(other).make_gradients();
  message = invalid_argument_message([&] { layer.backward(trained, d_output, wrong); });
  EXPECT_NE(message.find(function), std::string::npos) << message;

  // Nothing was accumulated by the failed calls.
  for (auto& view : gradients.tensors()) EXPECT_TRUE(view.matrix().isZero(0)) << view.name;
  // And a correct call still works.
  EXPECT_NO_THROW(layer.backward(trained, d_output, gradients));
}

// Zero tokens: backward returns a 0×d gradient and leaves the weight gradients zero (except what
// the auxiliary losses contribute, which is nothing for an empty batch).
TYPED_TEST(BackwardDeterminism, EmptyBatch) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 7;
  config.num_experts = 4;
  config.k = 2;
  LayerT layer(config);
  layer.gate().initialize_uniform(3);
  sparsemoe::ForwardOptions training;
  training.mode = Mode::training;
  const auto result = layer.forward(Matrix<Scalar>(0, 6), training);
  auto gradients = layer.make_gradients();
  const Matrix<Scalar> d_input = layer.backward(result, Matrix<Scalar>(0, 6), gradients);
  EXPECT_EQ(d_input.rows(), 0);
  EXPECT_EQ(d_input.cols(), 6);
  for (auto& view : gradients.tensors()) EXPECT_TRUE(view.matrix().isZero(0)) << view.name;
}

}  // namespace
