// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Sgd and Adam against their update formulas written out below with plain loops in double, over
// several steps, for float and double; hyper-parameter validation; shape checks; and a check that
// step() allocates nothing after the first call.

// Count Eigen heap allocations instead of aborting on them: with EIGEN_RUNTIME_NO_MALLOC, Eigen
// checks every allocation through eigen_assert, which here only counts failures (in every build
// type, NDEBUG or not).
#include <atomic>
namespace {
std::atomic<long> eigen_assert_failures{0};
}  // namespace
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition) \
  ((condition) ? static_cast<void>(0) : static_cast<void>(eigen_assert_failures.fetch_add(1)))

#include <sparsemoe/moe_layer.hpp>
#include <sparsemoe/optimizers.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// Counts operator new calls while `count_new` is set (std::vector, std::string, …).
namespace {
std::atomic<bool> count_new{false};
std::atomic<long> new_calls{0};
}  // namespace

// Not inlined, so that GCC does not mistake the malloc/free pairing for a new/free mismatch.
#if defined(__GNUC__)
#define TEST_NOINLINE __attribute__((noinline))
#else
#define TEST_NOINLINE
#endif

TEST_NOINLINE void* operator new(std::size_t size) {
  if (count_new.load()) new_calls.fetch_add(1);
  if (void* pointer = std::malloc(size == 0 ? 1 : size)) return pointer;
  throw std::bad_alloc();
}
TEST_NOINLINE void operator delete(void* pointer) noexcept { std::free(pointer); }
TEST_NOINLINE void operator delete(void* pointer, std::size_t) noexcept { std::free(pointer); }

namespace {

using sparsemoe::Adam;
using sparsemoe::AdamOptions;
using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe::Sgd;
using sparsemoe::SgdOptions;
using sparsemoe::TensorView;

template <typename Scalar>
class OptimizerTest : public ::testing::Test {};

struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};

using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(OptimizerTest, Scalars, ScalarNames);

/// Absolute tolerance for comparing Scalar results with the double reference after a few steps.
template <typename Scalar>
double tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-12;
}

/// A small "model": tensors of several shapes, one of them empty, with gradients alongside.
template <typename Scalar>
struct Model {
  std::vector<Matrix<Scalar>> parameters;
  std::vector<Matrix<Scalar>> gradients;
  std::mt19937 engine{12345};

  Model() {
    const std::vector<std::pair<Index, Index>> shapes{{3, 4}, {5, 1}, {1, 1}, {0, 4}, {2, 7}};
    std::uniform_real_distribution<double> uniform(-1.0, 1.0);
    for (const auto& shape : shapes) {
      Matrix<Scalar> parameter(shape.first, shape.second);
      for (Index i = 0; i < parameter.size(); ++i) parameter.data()[i] = static_cast<Scalar>(uniform(engine));
      parameters.push_back(parameter);
      gradients.push_back(Matrix<Scalar>::Zero(shape.first, shape.second));
    }
  }

  /// New random gradients in [−2, 2] (exactly representable in Scalar, shared with the reference).
  void draw_gradients() {
    std::uniform_real_distribution<double> uniform(-2.0, 2.0);
    for (auto& gradient : gradients) {
      for (Index i = 0; i < gradient.size(); ++i) gradient.data()[i] = static_cast<Scalar>(uniform(engine));
    }
  }

  std::vector<TensorView<Scalar>> parameter_views() {
    std::vector<TensorView<Scalar>> views;
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      views.push_back(sparsemoe::make_tensor_view("p" + std::to_string(i), parameters[i]));
    }
    return views;
  }

  std::vector<TensorView<Scalar>> gradient_views() {
    std::vector<TensorView<Scalar>> views;
    for (std::size_t i = 0; i < gradients.size(); ++i) {
      views.push_back(sparsemoe::make_tensor_view("p" + std::to_string(i), gradients[i]));
    }
    return views;
  }

  /// Every parameter element, flattened, in double.
  std::vector<double> flat_parameters() const {
    std::vector<double> values;
    for (const auto& parameter : parameters) {
      for (Index i = 0; i < parameter.size(); ++i) values.push_back(static_cast<double>(parameter.data()[i]));
    }
    return values;
  }

  std::vector<double> flat_gradients() const {
    std::vector<double> values;
    for (const auto& gradient : gradients) {
      for (Index i = 0; i < gradient.size(); ++i) values.push_back(static_cast<double>(gradient.data()[i]));
    }
    return values;
  }
};

/// torch.optim.SGD (dampening 0), element by element in double.
struct ReferenceSgd {
  SgdOptions options;
  std::vector<double> velocity;

  void step(std::vector<double>& theta, const std::vector<double>& gradient) {
    if (velocity.empty()) velocity.assign(theta.size(), 0.0);
    for (std::size_t j = 0; j < theta.size(); ++j) {
      double g = gradient[j];
      if (options.weight_decay > 0.0) g += options.weight_decay * theta[j];
      double direction = g;
      if (options.momentum > 0.0) {
        velocity[j] = options.momentum * velocity[j] + g;
        direction = options.nesterov ? g + options.momentum * velocity[j] : velocity[j];
      }
      theta[j] -= options.learning_rate * direction;
    }
  }
};

/// torch.optim.AdamW, element by element in double.
struct ReferenceAdam {
  AdamOptions options;
  std::vector<double> m;
  std::vector<double> v;
  int t = 0;

  void step(std::vector<double>& theta, const std::vector<double>& gradient) {
    if (m.empty()) {
      m.assign(theta.size(), 0.0);
      v.assign(theta.size(), 0.0);
    }
    ++t;
    for (std::size_t j = 0; j < theta.size(); ++j) {
      theta[j] -= options.learning_rate * options.weight_decay * theta[j];
      m[j] = options.beta1 * m[j] + (1.0 - options.beta1) * gradient[j];
      v[j] = options.beta2 * v[j] + (1.0 - options.beta2) * gradient[j] * gradient[j];
      const double m_hat = m[j] / (1.0 - std::pow(options.beta1, t));
      const double v_hat = v[j] / (1.0 - std::pow(options.beta2, t));
      theta[j] -= options.learning_rate * m_hat / (std::sqrt(v_hat) + options.epsilon);
    }
  }
};

template <typename Scalar, typename Optimizer, typename Reference>
void expect_matches_reference(Optimizer& optimizer, Reference& reference, int steps) {
  Model<Scalar> model;
  std::vector<double> expected = model.flat_parameters();
  for (int step = 0; step < steps; ++step) {
    model.draw_gradients();
    reference.step(expected, model.flat_gradients());
    optimizer.step(model.parameter_views(), model.gradient_views());
    const std::vector<double> actual = model.flat_parameters();
    ASSERT_EQ(actual.size(), expected.size());
    for (std::size_t j = 0; j < actual.size(); ++j) {
      ASSERT_NEAR(actual[j], expected[j], tolerance<Scalar>() * (1.0 + std::abs(expected[j])))
          << "element " << j << " after step " << step + 1;
    }
  }
  EXPECT_EQ(optimizer.step_count(), steps);
}

SgdOptions sgd_options(double learning_rate, double momentum, bool nesterov, double weight_decay) {
  SgdOptions options;
  options.learning_rate = learning_rate;
  options.momentum = momentum;
  options.nesterov = nesterov;
  options.weight_decay = weight_decay;
  return options;
}

AdamOptions adam_options(double learning_rate, double beta1, double beta2, double epsilon, double weight_decay) {
  AdamOptions options;
  options.learning_rate = learning_rate;
  options.beta1 = beta1;
  options.beta2 = beta2;
  options.epsilon = epsilon;
  options.weight_decay = weight_decay;
  return options;
}

TYPED_TEST(OptimizerTest, SgdMatchesItsFormula) {
  using Scalar = TypeParam;
  const std::vector<SgdOptions> cases{
      sgd_options(0.1, 0.0, false, 0.0),   // plain gradient descent
      sgd_options(0.05, 0.0, false, 0.3),  // L2 weight decay, no momentum
      sgd_options(0.05, 0.9, false, 0.0),  // heavy-ball momentum
      sgd_options(0.05, 0.9, true, 0.0),   // Nesterov
      sgd_options(0.02, 0.7, false, 0.1),  // momentum + weight decay
      sgd_options(0.02, 0.5, true, 0.2),   // Nesterov + weight decay
  };
  for (const SgdOptions& options : cases) {
    SCOPED_TRACE(::testing::Message() << "lr=" << options.learning_rate << " momentum=" << options.momentum
                                      << " nesterov=" << options.nesterov << " weight_decay=" << options.weight_decay);
    Sgd<Scalar> optimizer(options);
    ReferenceSgd reference{options, {}};
    expect_matches_reference<Scalar>(optimizer, reference, 7);
  }
}

TYPED_TEST(OptimizerTest, AdamMatchesItsFormula) {
  using Scalar = TypeParam;
  const std::vector<AdamOptions> cases{
      adam_options(1e-3, 0.9, 0.999, 1e-8, 0.0),  // the defaults
      adam_options(0.05, 0.9, 0.999, 1e-8, 0.0),
      adam_options(0.05, 0.8, 0.99, 1e-3, 0.0),   // other betas, a visible epsilon
      adam_options(0.05, 0.9, 0.999, 1e-8, 0.5),  // AdamW decoupled weight decay
      adam_options(0.01, 0.0, 0.5, 1e-6, 0.1),    // beta1 = 0 (RMSProp-like with bias correction)
  };
  for (const AdamOptions& options : cases) {
    SCOPED_TRACE(::testing::Message() << "lr=" << options.learning_rate << " beta1=" << options.beta1 << " beta2="
                                      << options.beta2 << " epsilon=" << options.epsilon
                                      << " weight_decay=" << options.weight_decay);
    Adam<Scalar> optimizer(options);
    ReferenceAdam reference{options, {}, {}, 0};
    expect_matches_reference<Scalar>(optimizer, reference, 8);
  }
}

TYPED_TEST(OptimizerTest, DefaultOptionsAreTheUsualOnes) {
  using Scalar = TypeParam;
  const Adam<Scalar> adam;
  EXPECT_DOUBLE_EQ(adam.options().learning_rate, 1e-3);
  EXPECT_DOUBLE_EQ(adam.options().beta1, 0.9);
  EXPECT_DOUBLE_EQ(adam.options().beta2, 0.999);
  EXPECT_DOUBLE_EQ(adam.options().epsilon, 1e-8);
  EXPECT_DOUBLE_EQ(adam.options().weight_decay, 0.0);
  const Sgd<Scalar> sgd;
  EXPECT_DOUBLE_EQ(sgd.options().momentum, 0.0);
  EXPECT_FALSE(sgd.options().nesterov);
}

TYPED_TEST(OptimizerTest, StateIsExposedAfterTheFirstStep) {
  using Scalar = TypeParam;
  Model<Scalar> model;
  Adam<Scalar> adam;
  EXPECT_EQ(adam.step_count(), 0);
  EXPECT_TRUE(adam.first_moments().empty());
  model.draw_gradients();
  adam.step(model.parameter_views(), model.gradient_views());
  ASSERT_EQ(adam.first_moments().size(), model.parameters.size());
  ASSERT_EQ(adam.second_moments().size(), model.parameters.size());
  for (std::size_t i = 0; i < model.parameters.size(); ++i) {
    EXPECT_EQ(adam.first_moments()[i].size(), model.parameters[i].size());
    // After one step m = (1 − β1)·g and v = (1 − β2)·g².
    for (Index j = 0; j < model.gradients[i].size(); ++j) {
      const double g = static_cast<double>(model.gradients[i].data()[j]);
      EXPECT_NEAR(adam.first_moments()[i][j], 0.1 * g, 1e-6 * std::abs(g));
      EXPECT_NEAR(adam.second_moments()[i][j], 0.001 * g * g, 1e-6 * 0.001 * g * g);
    }
  }

  Sgd<Scalar> plain(sgd_options(0.1, 0.0, false, 0.0));
  plain.step(model.parameter_views(), model.gradient_views());
  EXPECT_TRUE(plain.velocities().empty());  // no state without momentum
  Sgd<Scalar> momentum(sgd_options(0.1, 0.9, false, 0.0));
  momentum.step(model.parameter_views(), model.gradient_views());
  ASSERT_EQ(momentum.velocities().size(), model.parameters.size());
  EXPECT_EQ(momentum.velocities()[0], model.gradients[0].template reshaped<Eigen::RowMajor>().eval());
}

TYPED_TEST(OptimizerTest, RejectsBadHyperParameters) {
  using Scalar = TypeParam;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (const double lr : {0.0, -1e-3, nan, inf}) {
    EXPECT_THROW(Sgd<Scalar>(sgd_options(lr, 0.0, false, 0.0)), std::invalid_argument) << lr;
    EXPECT_THROW(Adam<Scalar>(adam_options(lr, 0.9, 0.999, 1e-8, 0.0)), std::invalid_argument) << lr;
  }
  for (const double beta : {-0.1, 1.0, 1.5, nan}) {
    EXPECT_THROW(Sgd<Scalar>(sgd_options(0.1, beta, false, 0.0)), std::invalid_argument) << beta;
    EXPECT_THROW(Adam<Scalar>(adam_options(0.1, beta, 0.999, 1e-8, 0.0)), std::invalid_argument) << beta;
    EXPECT_THROW(Adam<Scalar>(adam_options(0.1, 0.9, beta, 1e-8, 0.0)), std::invalid_argument) << beta;
  }
  for (const double epsilon : {0.0, -1e-8, nan, inf}) {
    EXPECT_THROW(Adam<Scalar>(adam_options(0.1, 0.9, 0.999, epsilon, 0.0)), std::invalid_argument) << epsilon;
  }
  for (const double decay : {-0.1, nan, inf}) {
    EXPECT_THROW(Sgd<Scalar>(sgd_options(0.1, 0.0, false, decay)), std::invalid_argument) << decay;
    EXPECT_THROW(Adam<Scalar>(adam_options(0.1, 0.9, 0.999, 1e-8, decay)), std::invalid_argument) << decay;
  }
  EXPECT_THROW(Sgd<Scalar>(sgd_options(0.1, 0.0, true, 0.0)), std::invalid_argument);  // Nesterov needs μ > 0
  try {
    Adam<Scalar> adam(adam_options(0.1, 1.0, 0.999, 1e-8, 0.0));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("sparsemoe::Adam"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("beta1"), std::string::npos) << error.what();
  }

  Adam<Scalar> adam;
  EXPECT_THROW(adam.set_learning_rate(0.0), std::invalid_argument);
  EXPECT_THROW(adam.set_learning_rate(nan), std::invalid_argument);
  adam.set_learning_rate(0.5);
  EXPECT_DOUBLE_EQ(adam.learning_rate(), 0.5);
  Sgd<Scalar> sgd;
  EXPECT_THROW(sgd.set_learning_rate(-1.0), std::invalid_argument);
}

/// Expects `call` to throw std::invalid_argument whose message contains every one of `parts`.
template <typename Call>
void expect_invalid_argument(const Call& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(error.what()).find(part), std::string::npos) << "'" << part << "' not in: " << error.what();
    }
  }
}

template <typename Scalar, typename Optimizer>
void check_shape_errors(Optimizer& optimizer, const std::string& function) {
  Model<Scalar> model;
  model.draw_gradients();
  optimizer.step(model.parameter_views(), model.gradient_views());
  const std::vector<double> before = model.flat_parameters();

  // A parameter tensor changes shape after the first step: error names it, nothing changes.
  Model<Scalar> reshaped;
  reshaped.parameters[4].resize(7, 2);
  reshaped.gradients[4] = Matrix<Scalar>::Zero(7, 2);
  expect_invalid_argument([&] { optimizer.step(reshaped.parameter_views(), reshaped.gradient_views()); },
                          {function, "'p4'", "7x2", "2x7"});

  // One tensor more or fewer.
  Model<Scalar> longer;
  longer.parameters.push_back(Matrix<Scalar>::Zero(2, 2));
  longer.gradients.push_back(Matrix<Scalar>::Zero(2, 2));
  expect_invalid_argument([&] { optimizer.step(longer.parameter_views(), longer.gradient_views()); },
                          {function, "6 parameter tensors", "5"});

  // Gradients that do not match the parameters.
  auto parameters = model.parameter_views();
  auto gradients = model.gradient_views();
  gradients.pop_back();
  expect_invalid_argument([&] { optimizer.step(parameters, gradients); },
                          {function, "5 parameter tensors", "4 gradient"});
  gradients = model.gradient_views();
  Matrix<Scalar> wrong = Matrix<Scalar>::Zero(3, 3);
  gradients[0] = sparsemoe::make_tensor_view("g0", wrong);
  expect_invalid_argument([&] { optimizer.step(parameters, gradients); }, {function, "'g0'", "3x3", "'p0'", "3x4"});

  EXPECT_EQ(model.flat_parameters(), before);
  EXPECT_EQ(optimizer.step_count(), 1);

  // reset() forgets the shapes.
  optimizer.reset();
  EXPECT_EQ(optimizer.step_count(), 0);
  EXPECT_NO_THROW(optimizer.step(reshaped.parameter_views(), reshaped.gradient_views()));
  EXPECT_EQ(optimizer.step_count(), 1);
}

TYPED_TEST(OptimizerTest, SgdChecksShapes) {
  Sgd<TypeParam> optimizer(sgd_options(0.1, 0.9, false, 0.0));
  check_shape_errors<TypeParam>(optimizer, "sparsemoe::Sgd::step");
}

TYPED_TEST(OptimizerTest, AdamChecksShapes) {
  Adam<TypeParam> optimizer;
  check_shape_errors<TypeParam>(optimizer, "sparsemoe::Adam::step");
}

TYPED_TEST(OptimizerTest, StepsOnAnMoELayer) {
  using Scalar = TypeParam;
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 5;
  config.num_experts = 3;
  config.k = 2;
  config.seed = 7;
  sparsemoe::MoELayer<Scalar> layer(config);
  auto gradients = layer.make_gradients();

  // Zero gradients: Adam's update is 0/(0 + ε) = 0, so nothing moves.
  const Matrix<Scalar> w1 = layer.expert(1).w1();
  Adam<Scalar> adam;
  adam.step(layer.tensors(), gradients.tensors());
  EXPECT_EQ(layer.expert(1).w1(), w1);
  ASSERT_EQ(adam.first_moments().size(), layer.tensors().size());

  // A gradient of one on expert 1's W1 at step 2 moves that tensor, and only it, by
  // lr·m̂/(√v̂ + ε) with m̂ = 0.1/(1 − 0.9²), v̂ = 0.001/(1 − 0.999²).
  gradients.experts[1].w1().setOnes();
  const Matrix<Scalar> w2 = layer.expert(1).w2();
  adam.step(layer.tensors(), gradients.tensors());
  const double shift = 1e-3 * (0.1 / (1 - 0.81)) / (std::sqrt(0.001 / (1 - 0.999 * 0.999)) + 1e-8);
  const Matrix<Scalar> moved = layer.expert(1).w1();
  for (Index i = 0; i < w1.size(); ++i) {
    EXPECT_NEAR(static_cast<double>(moved.data()[i]), static_cast<double>(w1.data()[i]) - shift, 1e-6);
  }
  EXPECT_EQ(layer.expert(1).w2(), w2);
  EXPECT_EQ(layer.gate().gate_weight(), Matrix<Scalar>::Zero(config.input_dim, config.num_experts));
}

TYPED_TEST(OptimizerTest, NoAllocationAfterTheFirstStep) {
  using Scalar = TypeParam;
  Model<Scalar> model;
  const auto parameters = model.parameter_views();
  const auto gradients = model.gradient_views();
  Sgd<Scalar> sgd(sgd_options(0.1, 0.9, true, 0.1));
  Adam<Scalar> adam(adam_options(0.01, 0.9, 0.999, 1e-8, 0.1));
  model.draw_gradients();
  sgd.step(parameters, gradients);
  adam.step(parameters, gradients);

  eigen_assert_failures = 0;
  new_calls = 0;
  Eigen::internal::set_is_malloc_allowed(false);
  count_new = true;
  for (int step = 0; step < 5; ++step) {
    sgd.step(parameters, gradients);
    adam.step(parameters, gradients);
  }
  count_new = false;
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(new_calls.load(), 0);
  EXPECT_EQ(eigen_assert_failures.load(), 0);

  // The counters do work: an Eigen allocation and an operator new call both register.
  Eigen::internal::set_is_malloc_allowed(false);
  count_new = true;
  {
    Matrix<Scalar> allocated(4, 4);
    allocated.setZero();
    void* volatile memory = ::operator new(16);  // a direct call: compilers may not elide it
    ::operator delete(memory);
  }
  count_new = false;
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_GE(new_calls.load(), 1);
  EXPECT_GE(eigen_assert_failures.load(), 1);
}

}  // namespace
