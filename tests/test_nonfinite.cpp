// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Non-finite values (issue 4, item 2):
//   * with the default check_finite, NaN / +Inf / -Inf in one input row among good ones makes
//     MoELayer::forward and NoisyTopKGate::route throw std::invalid_argument that names the FIRST
//     bad token row (evaluation and training mode; first, middle and last rows);
//   * NaN / Inf in the gate weights (W_g, and W_noise in training) is caught the same way;
//   * with gate().set_check_finite(false), inputs full of NaN, ±Inf, ±1e30, ±max() and random
//     mixtures of them never give an out-of-range or duplicated expert id, never crash, and still
//     give a consistent dispatch plan (every (token, slot) grouped exactly once); rows whose
//     logits are finite still get finite gates that sum to 1; NaN ranks last, ties to the lower id.
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <regex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe::Mode;

template <typename Scalar>
class NonFinite : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
// gtest name generator: "float" / "double" (and, with a name generator, no clang
// -Wgnu-zero-variadic-macro-arguments under -Wpedantic).
struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};
TYPED_TEST_SUITE(NonFinite, Scalars, ScalarNames);

constexpr Index kTokens = 23;
constexpr Index kDim = 6;
constexpr Index kHidden = 8;
constexpr Index kExperts = 6;  // = kDim, so an identity W_g makes the input the logits
constexpr Index kTopK = 2;

sparsemoe::MoEConfig small_config() {
  sparsemoe::MoEConfig config;
  config.input_dim = kDim;
  config.hidden_dim = kHidden;
  config.num_experts = kExperts;
  config.k = kTopK;
  config.seed = 99;
  return config;
}

template <typename Scalar>
Matrix<Scalar> random_input(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(dist(rng));
  return m;
}

template <typename Scalar>
sparsemoe::MoELayer<Scalar> make_layer() {
  sparsemoe::MoELayer<Scalar> layer(small_config());
  layer.gate().initialize_uniform(5);  // non-zero gate weights: logits depend on the input
  return layer;
}

template <typename Scalar>
std::vector<Scalar> bad_values() {
  return {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
          -std::numeric_limits<Scalar>::infinity()};
}

// Whether `message` names token row `row` (and not a longer number starting with its digits).
bool names_row(const std::string& message, Index row) {
  return std::regex_search(message, std::regex("row " + std::to_string(row) + "([^0-9]|$)"));
}

// Runs `call`, expecting std::invalid_argument whose message names `first_bad` and no other
// listed bad row.
template <typename Call>
::testing::AssertionResult throws_naming_row(const Call& call, Index first_bad, const std::vector<Index>& other_bad) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    if (!names_row(message, first_bad)) {
      return ::testing::AssertionFailure() << "message does not name row " << first_bad << ": " << message;
    }
    for (Index row : other_bad) {
      if (names_row(message, row)) {
        return ::testing::AssertionFailure() << "message names row " << row << " instead of only the first bad row "
                                             << first_bad << ": " << message;
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& error) {
    return ::testing::AssertionFailure() << "threw something other than std::invalid_argument: " << error.what();
  }
  return ::testing::AssertionFailure() << "did not throw (first bad row " << first_bad << ")";
}

// ids in [0, E) and pairwise distinct in every row.
::testing::AssertionResult ids_valid(const sparsemoe::IndexMatrix& ids, Index experts) {
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      const Index id = ids(t, j);
      if (id < 0 || id >= experts) {
        return ::testing::AssertionFailure() << "token " << t << " slot " << j << ": id " << id << " outside [0, "
                                             << experts << ")";
      }
      for (Index i = 0; i < j; ++i) {
        if (ids(t, i) == id) {
          return ::testing::AssertionFailure() << "token " << t << ": id " << id << " in slots " << i << " and " << j;
        }
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Every (token, slot) appears in exactly one grouped row, in its expert's block.
::testing::AssertionResult plan_valid(const sparsemoe::DispatchPlan& plan, const sparsemoe::IndexMatrix& ids) {
  const Index rows = ids.rows() * ids.cols();
  if (plan.num_rows() != rows || plan.offsets.size() != plan.num_experts + 1 || plan.offsets[0] != 0 ||
      plan.offsets[plan.num_experts] != rows) {
    return ::testing::AssertionFailure() << "plan sizes/offsets inconsistent";
  }
  std::vector<int> seen(static_cast<std::size_t>(rows), 0);
  for (Index e = 0; e < plan.num_experts; ++e) {
    if (plan.offsets[e + 1] - plan.offsets[e] != plan.tokens_per_expert[e]) {
      return ::testing::AssertionFailure() << "offsets of expert " << e << " disagree with tokens_per_expert";
    }
    for (Index r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const Index t = plan.token_of_row[r];
      const Index j = plan.slot_of_row[r];
      if (t < 0 || t >= ids.rows() || j < 0 || j >= ids.cols() || ids(t, j) != e) {
        return ::testing::AssertionFailure() << "grouped row " << r << " is not a slot of expert " << e;
      }
      if (plan.row_of_slot(t, j) != r) return ::testing::AssertionFailure() << "row_of_slot does not invert row " << r;
      ++seen[static_cast<std::size_t>(t * ids.cols() + j)];
    }
  }
  for (Index i = 0; i < rows; ++i) {
    if (seen[static_cast<std::size_t>(i)] != 1) {
      return ::testing::AssertionFailure() << "(token, slot) " << i << " grouped " << seen[static_cast<std::size_t>(i)]
                                           << " times";
    }
  }
  return ::testing::AssertionSuccess();
}

// Rows whose noisy logits are all finite have finite gates in [0, 1] that sum to 1.
template <typename Scalar>
::testing::AssertionResult finite_rows_have_normalised_gates(const sparsemoe::Routing<Scalar>& routing) {
  const double tolerance = 8 * static_cast<double>(routing.k()) * std::numeric_limits<Scalar>::epsilon();
  for (Index t = 0; t < routing.num_tokens(); ++t) {
    if (!routing.noisy_logits.row(t).allFinite()) continue;
    double sum = 0;
    for (Index j = 0; j < routing.k(); ++j) {
      const Scalar g = routing.gates(t, j);
      if (!std::isfinite(g) || g < Scalar(0) || g > Scalar(1)) {
        return ::testing::AssertionFailure() << "token " << t << " slot " << j << ": gate " << g;
      }
      sum += static_cast<double>(g);
    }
    if (std::abs(sum - 1.0) > tolerance) {
      return ::testing::AssertionFailure() << "token " << t << ": gates sum to " << sum;
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Default: the check is on and names the first bad token row.
// ---------------------------------------------------------------------------------------------

TYPED_TEST(NonFinite, ForwardThrowsNamingFirstBadRow) {
  using Scalar = TypeParam;
  const auto layer = make_layer<Scalar>();
  ASSERT_TRUE(layer.gate().check_finite()) << "check_finite must be on by default";
  for (const Scalar bad : bad_values<Scalar>()) {
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      // (first bad row, later bad rows): first row, a middle row, the last row alone.
      const std::vector<std::pair<Index, std::vector<Index>>> layouts = {
          {0, {9, kTokens - 1}}, {7, {12, 19}}, {kTokens - 1, {}}};
      for (const auto& layout : layouts) {
        SCOPED_TRACE(::testing::Message() << "bad value " << bad << ", mode "
                                          << (mode == Mode::training ? "training" : "evaluation") << ", first bad row "
                                          << layout.first);
        Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 1);
        x(layout.first, 2) = bad;
        for (Index row : layout.second) x(row, (row % kDim)) = bad;
        sparsemoe::ForwardOptions options;
        options.mode = mode;
        options.step = 3;
        EXPECT_TRUE(throws_naming_row([&] { (void)layer.forward(x, options); }, layout.first, layout.second));
        EXPECT_TRUE(throws_naming_row([&] { (void)layer.gate().route(x, mode, 3); }, layout.first, layout.second));
        // The into-variant with reused storage behaves the same.
        sparsemoe::ForwardResult<Scalar> result;
        sparsemoe::ForwardWorkspace<Scalar> workspace;
        EXPECT_TRUE(throws_naming_row([&] { layer.forward(x, options, result, workspace); }, layout.first,
                                      layout.second));
      }
    }
  }
}

TYPED_TEST(NonFinite, StandaloneGateThrowsNamingFirstBadRow) {
  using Scalar = TypeParam;
  sparsemoe::NoisyTopKGate<Scalar> gate(kDim, kExperts, kTopK);
  gate.initialize_uniform(11);
  for (const Scalar bad : bad_values<Scalar>()) {
    Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 2);
    x(4, 0) = bad;
    x(5, 5) = bad;
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      EXPECT_TRUE(throws_naming_row([&] { (void)gate.route(x, mode, 0); }, 4, {5}));
    }
  }
}

TYPED_TEST(NonFinite, GoodInputDoesNotThrow) {
  using Scalar = TypeParam;
  const auto layer = make_layer<Scalar>();
  const Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 3);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    sparsemoe::ForwardOptions options;
    options.mode = mode;
    EXPECT_NO_THROW((void)layer.forward(x, options));
  }
}

TYPED_TEST(NonFinite, NonFiniteGateWeightThrows) {
  using Scalar = TypeParam;
  const Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 4);
  for (const Scalar bad : bad_values<Scalar>()) {
    auto layer = make_layer<Scalar>();
    layer.gate().gate_weight()(1, 3) = bad;  // every token's logit of expert 3 is non-finite
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      sparsemoe::ForwardOptions options;
      options.mode = mode;
      EXPECT_TRUE(throws_naming_row([&] { (void)layer.forward(x, options); }, 0, {1, 2}));
    }
    // A bad W_noise only matters in training (the noise scale is not computed otherwise). The
    // raw noise r = x·W_noise is then ±Inf (NaN for a NaN weight); softplus(−Inf) + ε = ε is a
    // finite scale, so the first bad row is the first one where r = +Inf (or NaN).
    auto noisy = make_layer<Scalar>();
    noisy.gate().noise_weight()(0, 0) = bad;
    Index first_bad = 0;
    while (!std::isnan(bad) && !(x(first_bad, 0) * bad > Scalar(0))) ++first_bad;
    ASSERT_LT(first_bad, kTokens);
    sparsemoe::ForwardOptions training;
    training.mode = Mode::training;
    EXPECT_NO_THROW((void)noisy.forward(x));
    EXPECT_TRUE(throws_naming_row([&] { (void)noisy.forward(x, training); }, first_bad, {}));
  }
}

// A forward that throws on a bad batch must not leave a reused ForwardResult that backward still
// accepts. moe_layer.hpp (forward into result) routes before it resets result.cache.owner, and
// gate.hpp (route) throws from require_finite after resizing expert_ids/gates/kth/next_expert
// but before filling them: the result keeps the previous batch's cache with a half-written
// routing. backward then silently returns NaN (same batch size) or, when the bad batch has a
// different size, reads uninitialised expert ids (a SEGV in importance_backward, losses.hpp,
// under ASan). Only the same-size case is run here, so the test fails without crashing.
TYPED_TEST(NonFinite, FailedForwardLeavesNoUsableCache) {
  using Scalar = TypeParam;
  const auto layer = make_layer<Scalar>();
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  const Matrix<Scalar> good = random_input<Scalar>(kTokens, kDim, 9);
  layer.forward(good, options, result, workspace);
  ASSERT_FALSE(result.cache.empty());
  Matrix<Scalar> bad = random_input<Scalar>(kTokens, kDim, 10);
  bad(4, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_THROW(layer.forward(bad, options, result, workspace), std::invalid_argument);
  auto gradients = layer.make_gradients();
  const Matrix<Scalar> d_output = Matrix<Scalar>::Ones(kTokens, kDim);
  EXPECT_THROW((void)layer.backward(result, d_output, gradients), std::invalid_argument)
      << "backward accepted the ForwardResult of a forward that threw";
}

// ---------------------------------------------------------------------------------------------
// Check off: always valid ids and a valid plan, whatever the values.
// ---------------------------------------------------------------------------------------------

// Inputs full of extreme values: each pattern fills the whole batch.
template <typename Scalar>
std::vector<std::pair<std::string, Matrix<Scalar>>> extreme_inputs() {
  using limits = std::numeric_limits<Scalar>;
  const std::vector<std::pair<std::string, Scalar>> fills = {
      {"NaN", limits::quiet_NaN()},  {"+Inf", limits::infinity()}, {"-Inf", -limits::infinity()},
      {"+1e30", Scalar(1e30)},       {"-1e30", Scalar(-1e30)},     {"+max", limits::max()},
      {"-max", -limits::max()},      {"0", Scalar(0)},             {"denorm_min", limits::denorm_min()}};
  std::vector<std::pair<std::string, Matrix<Scalar>>> inputs;
  for (const auto& fill : fills) inputs.emplace_back(fill.first, Matrix<Scalar>::Constant(kTokens, kDim, fill.second));
  // Random mixtures of all of the above and ordinary values, with many ties.
  std::mt19937_64 rng(2024);
  for (int variant = 0; variant < 6; ++variant) {
    Matrix<Scalar> x(kTokens, kDim);
    for (Index i = 0; i < x.size(); ++i) {
      const std::size_t pick = static_cast<std::size_t>(rng() % (fills.size() + 3));
      x.data()[i] = pick < fills.size() ? fills[pick].second : static_cast<Scalar>(static_cast<int>(rng() % 5) - 2);
    }
    inputs.emplace_back("mixture " + std::to_string(variant), x);
  }
  return inputs;
}

template <typename Scalar>
void expect_valid_forward(const sparsemoe::MoELayer<Scalar>& layer, const Matrix<Scalar>& x, bool run_backward) {
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    SCOPED_TRACE(mode == Mode::training ? "training" : "evaluation");
    sparsemoe::ForwardOptions options;
    options.mode = mode;
    options.step = 17;
    sparsemoe::ForwardResult<Scalar> result;
    ASSERT_NO_THROW(result = layer.forward(x, options));
    EXPECT_TRUE(ids_valid(result.routing.expert_ids, kExperts));
    EXPECT_TRUE(plan_valid(result.plan, result.routing.expert_ids));
    EXPECT_TRUE(finite_rows_have_normalised_gates(result.routing));
    EXPECT_EQ(result.output.rows(), x.rows());
    EXPECT_EQ(result.output.cols(), kDim);
    if (mode == Mode::training && result.routing.has_smooth_load()) {
      for (Index t = 0; t < x.rows(); ++t) {
        const Index kth = result.routing.kth_expert[t];
        const Index next = result.routing.next_expert[t];
        EXPECT_TRUE(kth >= 0 && kth < kExperts && next >= 0 && next < kExperts && kth != next) << "token " << t;
        EXPECT_EQ(kth, result.routing.expert_ids(t, kTopK - 1)) << "token " << t;
        for (Index j = 0; j < kTopK; ++j) EXPECT_NE(next, result.routing.expert_ids(t, j)) << "token " << t;
      }
    }
    // The standalone gate route agrees with the layer's.
    sparsemoe::Routing<Scalar> routing;
    ASSERT_NO_THROW(routing = layer.gate().route(x, mode, 17));
    EXPECT_TRUE(ids_valid(routing.expert_ids, kExperts));
    if (run_backward && mode == Mode::training) {
      auto gradients = layer.make_gradients();
      const Matrix<Scalar> d_output = Matrix<Scalar>::Ones(x.rows(), kDim);
      Matrix<Scalar> d_input;
      ASSERT_NO_THROW(d_input = layer.backward(result, d_output, gradients));
      EXPECT_EQ(d_input.rows(), x.rows());
      EXPECT_EQ(d_input.cols(), kDim);
    }
  }
}

TYPED_TEST(NonFinite, CheckOffInputsFullOfExtremesGiveValidIds) {
  using Scalar = TypeParam;
  auto layer = make_layer<Scalar>();
  layer.gate().set_check_finite(false);
  for (const auto& input : extreme_inputs<Scalar>()) {
    SCOPED_TRACE("input: " + input.first);
    expect_valid_forward(layer, input.second, /*run_backward=*/true);
  }
}

TYPED_TEST(NonFinite, CheckOffOneBadRowAmongGoodOnes) {
  using Scalar = TypeParam;
  auto layer = make_layer<Scalar>();
  layer.gate().set_check_finite(false);
  for (const Scalar bad : bad_values<Scalar>()) {
    Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 6);
    x(8, 1) = bad;
    const auto result = layer.forward(x);
    EXPECT_TRUE(ids_valid(result.routing.expert_ids, kExperts));
    EXPECT_TRUE(plan_valid(result.plan, result.routing.expert_ids));
    EXPECT_TRUE(finite_rows_have_normalised_gates(result.routing));
    // The good rows get the same experts as without the bad one, and the same output up to
    // rounding (a row's position inside its expert's GEMM tile changes with the other rows'
    // routing, and the GEMM kernel may round edge rows differently, so not bitwise).
    Matrix<Scalar> good = x;
    good.row(8).setZero();
    const auto reference = layer.forward(good);
    for (Index t = 0; t < kTokens; ++t) {
      if (t == 8) continue;
      EXPECT_TRUE(result.routing.expert_ids.row(t) == reference.routing.expert_ids.row(t)) << "token " << t;
      const double error = static_cast<double>((result.output.row(t) - reference.output.row(t)).norm());
      EXPECT_LE(error, 1e3 * std::numeric_limits<Scalar>::epsilon() *
                           (1.0 + static_cast<double>(reference.output.row(t).norm())))
          << "token " << t;
    }
  }
}

TYPED_TEST(NonFinite, CheckOffIdentityGateNaNRanksLastTiesToLowerId) {
  using Scalar = TypeParam;
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  auto layer = make_layer<Scalar>();
  layer.gate().set_check_finite(false);
  layer.gate().gate_weight() = Matrix<Scalar>::Identity(kDim, kExperts);  // logits = input
  Matrix<Scalar> x = random_input<Scalar>(4, kDim, 7);
  x.row(0).setConstant(nan);                                   // all NaN: ids 0, 1
  x.row(1) << nan, 3, nan, 1, nan, nan;                        // 0·NaN = NaN: every logit of the row is NaN
  x.row(2) << 5, 5, 5, 5, 5, 5;                                // all tied: ids 0, 1
  x.row(3) << 1, 2, 9, 9, 0, -1;                               // tie at the top: 2 before 3
  const auto routing = layer.gate().route(x, Mode::evaluation, 0);
  ASSERT_TRUE(ids_valid(routing.expert_ids, kExperts));
  EXPECT_EQ(routing.expert_ids(0, 0), 0);
  EXPECT_EQ(routing.expert_ids(0, 1), 1);
  EXPECT_EQ(routing.expert_ids(1, 0), 0);
  EXPECT_EQ(routing.expert_ids(1, 1), 1);
  EXPECT_EQ(routing.expert_ids(2, 0), 0);
  EXPECT_EQ(routing.expert_ids(2, 1), 1);
  EXPECT_EQ(routing.expert_ids(3, 0), 2);
  EXPECT_EQ(routing.expert_ids(3, 1), 3);
  EXPECT_EQ(routing.gates(3, 0), Scalar(0.5));
  EXPECT_EQ(routing.gates(3, 1), Scalar(0.5));
  EXPECT_EQ(routing.gates(2, 0), Scalar(0.5));
}

TYPED_TEST(NonFinite, SelectTopWithExactNonFiniteLogits) {
  using Scalar = TypeParam;
  using limits = std::numeric_limits<Scalar>;
  const Scalar nan = limits::quiet_NaN();
  const Scalar inf = limits::infinity();
  struct Case {
    std::vector<Scalar> values;
    std::vector<Index> expected;
  };
  const std::vector<Case> cases = {
      {{nan, inf, -inf, nan, Scalar(1)}, {1, 4, 2, 0, 3}},
      {{-inf, -inf, nan, -inf}, {0, 1, 3, 2}},
      {{nan, nan, nan}, {0, 1, 2}},
      {{limits::max(), inf, -limits::max(), limits::max()}, {1, 0, 3, 2}},
      {{Scalar(0), Scalar(-0.0), nan, Scalar(0)}, {0, 1, 3, 2}},
  };
  for (const Case& c : cases) {
    const Index size = static_cast<Index>(c.values.size());
    for (Index count = 1; count <= size; ++count) {
      std::vector<Index> ids(static_cast<std::size_t>(count), -1);
      sparsemoe::detail::select_top(c.values.data(), size, count, ids.data());
      for (Index j = 0; j < count; ++j) {
        EXPECT_EQ(ids[static_cast<std::size_t>(j)], c.expected[static_cast<std::size_t>(j)])
            << "size " << size << ", count " << count << ", slot " << j;
      }
    }
  }
}

TYPED_TEST(NonFinite, CheckOffNonFiniteGateWeights) {
  using Scalar = TypeParam;
  const Matrix<Scalar> x = random_input<Scalar>(kTokens, kDim, 8);
  for (const Scalar bad : bad_values<Scalar>()) {
    SCOPED_TRACE(::testing::Message() << "bad weight " << bad);
    auto layer = make_layer<Scalar>();
    layer.gate().set_check_finite(false);
    layer.gate().gate_weight()(1, 3) = bad;
    expect_valid_forward(layer, x, /*run_backward=*/true);
    if (std::isnan(bad)) {
      // Expert 3's logit is NaN for every token: NaN ranks last, so with k < E it is never chosen
      // and the chosen logits are finite.
      for (const Mode mode : {Mode::evaluation, Mode::training}) {
        const auto routing = layer.gate().route(x, mode, 1);
        for (Index t = 0; t < kTokens; ++t) {
          for (Index j = 0; j < kTopK; ++j) EXPECT_NE(routing.expert_ids(t, j), 3) << "token " << t;
          Scalar sum = 0;
          for (Index j = 0; j < kTopK; ++j) {
            EXPECT_TRUE(std::isfinite(routing.gates(t, j))) << "token " << t;
            sum += routing.gates(t, j);
          }
          EXPECT_NEAR(static_cast<double>(sum), 1.0, 1e-5) << "token " << t;
        }
      }
    }
    // The whole gate weight matrix non-finite.
    layer.gate().gate_weight().setConstant(bad);
    expect_valid_forward(layer, x, /*run_backward=*/false);
    // Non-finite noise weights (training only).
    auto noisy = make_layer<Scalar>();
    noisy.gate().set_check_finite(false);
    noisy.gate().noise_weight().setConstant(bad);
    expect_valid_forward(noisy, x, /*run_backward=*/true);
  }
}

TYPED_TEST(NonFinite, CheckOffHugeGateWeightsOverflowLogits) {
  using Scalar = TypeParam;
  auto layer = make_layer<Scalar>();
  layer.gate().set_check_finite(false);
  layer.gate().gate_weight().setConstant(std::numeric_limits<Scalar>::max());
  layer.gate().noise_weight().setConstant(-std::numeric_limits<Scalar>::max());
  for (const auto& input : extreme_inputs<Scalar>()) {
    SCOPED_TRACE("input: " + input.first);
    expect_valid_forward(layer, input.second, /*run_backward=*/false);
  }
  // With the check on, overflowing logits are non-finite and rejected.
  layer.gate().set_check_finite(true);
  const Matrix<Scalar> x = Matrix<Scalar>::Constant(kTokens, kDim, Scalar(1e30));
  EXPECT_TRUE(throws_naming_row([&] { (void)layer.forward(x); }, 0, {1}));
}

}  // namespace
