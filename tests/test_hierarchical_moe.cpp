// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of HierarchicalMoELayer (hierarchical_moe.hpp), over float and double. References:
//   * forward: both gates, the output, Importance_H, Load_H (the smooth estimator of each gate,
//     the secondary one over the tokens of its group only, the empty-group rule) and the CV²
//     losses, written here as explicit loops in double with full sorts, from the input, the
//     parameters and the noise sample; the noise sample itself against Philox at
//     (gate seed, step, token, column);
//   * backward: central finite differences in double of Σ Y ⊙ R + losses.total() for X, both
//     gates' weights (primary and every group) and every expert tensor, with and without empty
//     groups;
//   * bitwise identical forward and backward for 1, 2 and 3 OpenMP threads;
//   * bad input: std::invalid_argument naming the bad value.
#include <sparsemoe/hierarchical_moe.hpp>

#include "gradient_check.hpp"
#include "paradigm_reference.hpp"
#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using paradigm_reference::MatrixD;
using sparsemoe::HierarchicalForwardOptions;
using sparsemoe::HierarchicalMoEConfig;
using sparsemoe::HierarchicalMoELayer;
using sparsemoe::Index;
using sparsemoe::Mode;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class HierarchicalMoE : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(HierarchicalMoE, Scalars, reference::ScalarNames);

HierarchicalMoEConfig make_config(Index groups, Index per_group, Index k_groups, Index k_per_group) {
  HierarchicalMoEConfig config;
  config.input_dim = 4;
  config.hidden_dim = 3;
  config.num_experts = groups * per_group;
  config.num_groups = groups;
  config.k_groups = k_groups;
  config.k_per_group = k_per_group;
  config.seed = 5;
  return config;
}

// Random gate weights (the zero initialisation would make every logit a tie).
template <typename Layer>
void randomize_gates(Layer& layer, std::uint64_t seed) {
  using Scalar = typename Layer::Scalar;
  auto& primary = layer.primary_gate();
  primary.gate_weight() = reference::uniform<Scalar>(layer.input_dim(), layer.num_groups(), seed);
  primary.noise_weight() = reference::uniform<Scalar>(layer.input_dim(), layer.num_groups(), seed + 1);
  for (Index i = 0; i < layer.num_groups(); ++i) {
    auto& gate = layer.secondary_gate(i);
    gate.gate_weight() = reference::uniform<Scalar>(layer.input_dim(), layer.group_size(), seed + 2 + 2 * i);
    gate.noise_weight() = reference::uniform<Scalar>(layer.input_dim(), layer.group_size(), seed + 3 + 2 * i);
  }
}

// One noisy top-k gate on one token, in double: noisy logits, chosen ids (ranked), gates, and the
// smooth load term Φ((c_i − θ_i)/s_i) of every column.
struct GateReference {
  std::vector<double> noisy;
  std::vector<Index> chosen;
  std::vector<double> gates;
  std::vector<double> probability;
};

template <typename Scalar, typename Noise>
GateReference gate_reference(const sparsemoe::NoisyTopKGate<Scalar>& gate, const Mat<Scalar>& x, Index t,
                             const Noise& noise, bool training) {
  const Index width = gate.num_experts();
  GateReference r;
  std::vector<double> clean(static_cast<std::size_t>(width)), scale(static_cast<std::size_t>(width));
  for (Index i = 0; i < width; ++i) {
    double c = 0, raw = 0;
    for (Index m = 0; m < x.cols(); ++m) {
      c += static_cast<double>(x(t, m)) * static_cast<double>(gate.gate_weight()(m, i));
      raw += static_cast<double>(x(t, m)) * static_cast<double>(gate.noise_weight()(m, i));
    }
    const auto u = static_cast<std::size_t>(i);
    clean[u] = c;
    scale[u] = reference::softplus(raw) + static_cast<double>(gate.noise_epsilon());
    r.noisy.push_back(training ? c + static_cast<double>(noise(t, i)) * scale[u] : c);
  }
  const std::vector<Index> ranked = reference::ranking(r.noisy);
  r.chosen.assign(ranked.begin(), ranked.begin() + gate.k());
  std::vector<double> chosen_logits;
  for (const Index id : r.chosen) chosen_logits.push_back(r.noisy[static_cast<std::size_t>(id)]);
  r.gates = reference::softmax(chosen_logits);
  for (Index i = 0; i < width && gate.k() < width; ++i) {  // the smooth load needs k < width
    const auto u = static_cast<std::size_t>(i);
    const double threshold = reference::kth_largest_excluding(r.noisy, gate.k(), i);
    r.probability.push_back(reference::phi_cdf((clean[u] - threshold) / scale[u]));
  }
  return r;
}

struct LayerReference {
  MatrixD output;
  std::vector<double> importance, load;
  double total = 0;
};

template <typename Scalar>
LayerReference layer_reference(const HierarchicalMoELayer<Scalar>& layer, const Mat<Scalar>& x,
                               const sparsemoe::HierarchicalMoEResult<Scalar>& result,
                               const HierarchicalForwardOptions& options) {
  const bool training = options.mode == Mode::training;
  const Index tokens = x.rows(), groups = layer.num_groups(), b = layer.group_size();
  const Index experts = layer.num_experts();
  const bool primary_smooth = training && layer.k_groups() < groups;
  const bool secondary_smooth = training && layer.k_per_group() < b;
  LayerReference r;
  r.output = MatrixD::Zero(tokens, x.cols());
  r.importance.assign(static_cast<std::size_t>(experts), 0.0);
  std::vector<double> primary_load(static_cast<std::size_t>(groups), 0.0);
  std::vector<double> secondary_load(static_cast<std::size_t>(experts), 0.0);
  std::vector<double> group_tokens(static_cast<std::size_t>(groups), 0.0);
  for (Index t = 0; t < tokens; ++t) {
    const GateReference primary = gate_reference(layer.primary_gate(), x, t, result.primary.noise, training);
    for (Index i = 0; i < groups; ++i) {
      const bool chosen = std::find(primary.chosen.begin(), primary.chosen.end(), i) != primary.chosen.end();
      primary_load[static_cast<std::size_t>(i)] += primary_smooth ? primary.probability[static_cast<std::size_t>(i)]
                                                                  : (chosen ? 1.0 : 0.0);
    }
    for (std::size_t p = 0; p < primary.chosen.size(); ++p) {
      const Index i = primary.chosen[p];
      group_tokens[static_cast<std::size_t>(i)] += 1.0;
      const GateReference inner = gate_reference(layer.secondary_gate(i), x, t,
                                                 result.secondary[static_cast<std::size_t>(i)].noise, training);
      for (Index j = 0; j < b; ++j) {
        const bool picked = std::find(inner.chosen.begin(), inner.chosen.end(), j) != inner.chosen.end();
        secondary_load[static_cast<std::size_t>(i * b + j)] +=
            secondary_smooth ? inner.probability[static_cast<std::size_t>(j)] : (picked ? 1.0 : 0.0);
      }
      for (std::size_t q = 0; q < inner.chosen.size(); ++q) {
        const Index e = i * b + inner.chosen[q];
        const double gate = primary.gates[p] * inner.gates[q];
        r.importance[static_cast<std::size_t>(e)] += gate;
        const std::vector<double> out = paradigm_reference::relu_expert(layer.expert(e), x.row(t));
        for (Index m = 0; m < x.cols(); ++m) r.output(t, m) += gate * out[static_cast<std::size_t>(m)];
      }
    }
  }
  for (Index i = 0; i < groups; ++i) {
    for (Index j = 0; j < b; ++j) {
      const auto e = static_cast<std::size_t>(i * b + j);
      const double count = group_tokens[static_cast<std::size_t>(i)];
      const double ratio = count > 0 ? secondary_load[e] / count
                                     : static_cast<double>(layer.k_per_group()) / static_cast<double>(b);
      r.load.push_back(primary_load[static_cast<std::size_t>(i)] * ratio);
    }
  }
  r.total = options.importance_weight * reference::cv_squared(r.importance) +
            options.load_weight * reference::cv_squared(r.load);
  return r;
}

template <typename Scalar>
double tolerance() {
  return std::is_same<Scalar, float>::value ? 5e-5 : 1e-11;
}

TYPED_TEST(HierarchicalMoE, ForwardMatchesNaiveLoops) {
  using Scalar = TypeParam;
  const std::vector<HierarchicalMoEConfig> configs = {make_config(2, 3, 1, 2), make_config(3, 2, 2, 1),
                                                      make_config(4, 2, 1, 1), make_config(2, 2, 2, 2)};
  for (const HierarchicalMoEConfig& config : configs) {
    SCOPED_TRACE("a=" + std::to_string(config.num_groups) + " E=" + std::to_string(config.num_experts) +
                 " kp=" + std::to_string(config.k_groups) + " ks=" + std::to_string(config.k_per_group));
    HierarchicalMoELayer<Scalar> layer(config);
    randomize_gates(layer, 40);
    const Mat<Scalar> x = reference::uniform<Scalar>(9, 4, 17, -1.5, 1.5);
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      HierarchicalForwardOptions options;
      options.mode = mode;
      options.step = 3;
      options.importance_weight = 0.3;
      options.load_weight = 0.7;
      const auto result = layer.forward(x, options);
      const LayerReference r = layer_reference(layer, x, result, options);
      const double tol = tolerance<Scalar>();
      EXPECT_TRUE(reference::all_close(result.output, r.output, tol));
      for (Index e = 0; e < layer.num_experts(); ++e) {
        EXPECT_TRUE(reference::close(result.losses.importance[e], r.importance[static_cast<std::size_t>(e)], tol));
        EXPECT_TRUE(reference::close(result.losses.load[e], r.load[static_cast<std::size_t>(e)], tol)) << "expert " << e;
      }
      EXPECT_TRUE(reference::close(static_cast<double>(result.losses.total()), r.total, 10 * tol));
      EXPECT_EQ(result.training, mode == Mode::training);
    }
  }
}

TYPED_TEST(HierarchicalMoE, NoiseDependsOnlyOnSeedStepTokenAndColumn) {
  using Scalar = TypeParam;
  HierarchicalMoELayer<Scalar> layer(make_config(3, 2, 1, 1));
  randomize_gates(layer, 8);
  const Mat<Scalar> x = reference::uniform<Scalar>(6, 4, 2);
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  options.step = 11;
  const auto result = layer.forward(x, options);
  std::vector<std::uint64_t> seeds = {layer.primary_gate().noise_seed()};
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index i = 0; i < layer.num_groups(); ++i) {
      EXPECT_EQ(result.primary.noise(t, i), static_cast<Scalar>(sparsemoe::detail::standard_normal(
                                                layer.primary_gate().noise_seed(), 11, static_cast<std::uint64_t>(t),
                                                static_cast<std::uint64_t>(i))));
      const auto& gate = layer.secondary_gate(i);
      for (Index j = 0; j < layer.group_size(); ++j) {
        EXPECT_EQ(result.secondary[static_cast<std::size_t>(i)].noise(t, j),
                  static_cast<Scalar>(sparsemoe::detail::standard_normal(gate.noise_seed(), 11,
                                                                         static_cast<std::uint64_t>(t),
                                                                         static_cast<std::uint64_t>(j))));
      }
    }
  }
  for (Index i = 0; i < layer.num_groups(); ++i) seeds.push_back(layer.secondary_gate(i).noise_seed());
  std::sort(seeds.begin(), seeds.end());
  EXPECT_EQ(std::unique(seeds.begin(), seeds.end()), seeds.end()) << "every gate has its own noise stream";
}

TYPED_TEST(HierarchicalMoE, EmptyGroupTakesTheUniformShare) {
  using Scalar = TypeParam;
  HierarchicalMoELayer<Scalar> layer(make_config(4, 3, 1, 2));
  randomize_gates(layer, 9);
  const Mat<Scalar> x = reference::uniform<Scalar>(1, 4, 3);  // one token: three groups stay empty
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  const auto result = layer.forward(x, options);
  Index empty = 0;
  for (Index i = 0; i < 4; ++i) {
    if (result.losses.group_tokens[i] != 0) continue;
    ++empty;
    EXPECT_GT(result.losses.primary_load[i], 0.0);
    for (Index j = 0; j < 3; ++j) {
      EXPECT_EQ(result.losses.secondary_load[i * 3 + j], 0.0);
      EXPECT_DOUBLE_EQ(result.losses.load[i * 3 + j], result.losses.primary_load[i] * 2.0 / 3.0);
    }
  }
  EXPECT_EQ(empty, 3);
}

// Σ Y ⊙ R + the auxiliary losses.
double objective(const HierarchicalMoELayer<double>& layer, const Mat<double>& x, const Mat<double>& weights,
                 const HierarchicalForwardOptions& options) {
  const auto result = layer.forward(x, options);
  return result.output.cwiseProduct(weights).sum() + result.losses.total();
}

void expect_gradients_match(const HierarchicalMoEConfig& config, Index tokens, std::uint64_t seed) {
  HierarchicalMoELayer<double> layer(config);
  randomize_gates(layer, seed);
  Mat<double> x = reference::uniform<double>(tokens, config.input_dim, seed + 100, -1.5, 1.5);
  const Mat<double> weights = reference::uniform<double>(tokens, config.input_dim, seed + 101);
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  options.step = 2;
  options.importance_weight = 0.5;
  options.load_weight = 0.8;
  const auto result = layer.forward(x, options);
  auto gradients = layer.make_gradients();
  const Mat<double> d_input = layer.backward(result, weights, gradients);
  const auto loss = [&] { return objective(layer, x, weights, options); };
  const double tol = 1e-6;
  const auto input_check = sparsemoe_test::check_gradient(loss, x, d_input);
  EXPECT_LT(input_check.worst_relative_error, tol) << "input: " << input_check;
  const auto parameters = layer.tensors();
  const auto analytic = gradients.tensors();
  ASSERT_EQ(parameters.size(), analytic.size());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    ASSERT_EQ(parameters[i].name, analytic[i].name);
    const auto check = sparsemoe_test::check_gradient(loss, parameters[i], analytic[i]);
    EXPECT_LT(check.worst_relative_error, tol) << parameters[i].name << ": " << check;
  }
  EXPECT_GT(gradients.primary.gate_weight().cwiseAbs().maxCoeff(), 1e-4);
  EXPECT_GT(gradients.primary.noise_weight().cwiseAbs().maxCoeff(), 1e-4);
}

TEST(HierarchicalMoEGradients, MatchFiniteDifferences) {
  expect_gradients_match(make_config(2, 3, 1, 2), 8, 1);
  expect_gradients_match(make_config(3, 2, 2, 1), 7, 2);
  expect_gradients_match(make_config(2, 2, 2, 2), 5, 3);  // k = gate width: hard loads, no smooth term
}

TEST(HierarchicalMoEGradients, MatchFiniteDifferencesWithEmptyGroups) {
  expect_gradients_match(make_config(4, 3, 1, 2), 2, 4);
}

TEST(HierarchicalMoEGradients, LossesAloneReachBothGates) {
  // With R = 0 the objective is the auxiliary loss only: its gradient must reach the primary and
  // the secondary gates (importance through both gate values, load through both estimators).
  HierarchicalMoELayer<double> layer(make_config(2, 3, 1, 2));
  randomize_gates(layer, 12);
  Mat<double> x = reference::uniform<double>(8, 4, 13);
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  const auto result = layer.forward(x, options);
  auto gradients = layer.make_gradients();
  layer.backward(result, Mat<double>::Zero(8, 4), gradients);
  EXPECT_GT(result.losses.total(), 0.0);
  EXPECT_GT(gradients.primary.gate_weight().cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_GT(gradients.secondary[0].noise_weight().cwiseAbs().maxCoeff(), 1e-6);
  for (const auto& expert : gradients.experts) EXPECT_EQ(expert.w1().cwiseAbs().maxCoeff(), 0.0);
}

TYPED_TEST(HierarchicalMoE, BitwiseIdenticalAcrossThreadCounts) {
  using Scalar = TypeParam;
  HierarchicalMoEConfig config = make_config(4, 4, 2, 2);
  config.input_dim = 64;
  config.hidden_dim = 48;
  HierarchicalMoELayer<Scalar> layer(config);
  randomize_gates(layer, 21);
  const Mat<Scalar> x = reference::uniform<Scalar>(256, 64, 22);
  const Mat<Scalar> d_output = reference::uniform<Scalar>(256, 64, 23);
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  options.step = 4;
  paradigm_reference::expect_identical_across_thread_counts<Scalar>([&] {
    const auto result = layer.forward(x, options);
    auto gradients = layer.make_gradients();
    const Mat<Scalar> d_input = layer.backward(result, d_output, gradients);
    auto named = paradigm_reference::step_record(gradients, result.output, d_input);
    paradigm_reference::append(named, "gates", result.gates);
    return named;
  });
}

TEST(HierarchicalMoEGradients, MatchFiniteDifferencesWithSwiGluExperts) {
  HierarchicalMoELayer<double, sparsemoe::SwiGluExpert<double>> layer(make_config(2, 2, 1, 1));
  randomize_gates(layer, 31);
  Mat<double> x = reference::uniform<double>(6, 4, 32, -1.5, 1.5);
  const Mat<double> weights = reference::uniform<double>(6, 4, 33);
  HierarchicalForwardOptions options;
  options.mode = Mode::training;
  const auto result = layer.forward(x, options);
  auto gradients = layer.make_gradients();
  const Mat<double> d_input = layer.backward(result, weights, gradients);
  const auto loss = [&] {
    const auto r = layer.forward(x, options);
    return r.output.cwiseProduct(weights).sum() + r.losses.total();
  };
  EXPECT_LT(sparsemoe_test::check_gradient(loss, x, d_input).worst_relative_error, 1e-6);
  const auto parameters = layer.tensors();
  const auto analytic = gradients.tensors();
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const auto check = sparsemoe_test::check_gradient(loss, parameters[i], analytic[i]);
    EXPECT_LT(check.worst_relative_error, 1e-6) << parameters[i].name << ": " << check;
  }
}

TEST(HierarchicalMoEConcurrency, OneLayerServesManyThreads) {
  HierarchicalMoELayer<float> layer(make_config(3, 2, 2, 1));
  randomize_gates(layer, 41);
  const HierarchicalMoELayer<float>& shared = layer;
  paradigm_reference::expect_concurrent_calls_match_serial<float>([&](int call) {
    const Mat<float> x = reference::uniform<float>(30 + 5 * call, 4, 200 + static_cast<std::uint64_t>(call));
    HierarchicalForwardOptions options;
    options.mode = Mode::training;
    options.step = static_cast<std::uint64_t>(call);
    const auto result = shared.forward(x, options);
    auto gradients = shared.make_gradients();
    const Mat<float> d_input = shared.backward(result, x, gradients);
    return paradigm_reference::step_record(gradients, result.output, d_input);
  });
}

TEST(HierarchicalMoEErrors, BadConfigurationNamesTheValue) {
  HierarchicalMoEConfig config = make_config(3, 2, 1, 1);
  config.num_experts = 7;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "num_experts", "multiple of num_groups = 3",
                               "got 7");
  config = make_config(3, 2, 1, 1);
  config.k_per_group = 3;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "k_per_group", "group size = 2", "got 3");
  config = make_config(3, 2, 1, 1);
  config.k_groups = 4;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "k_groups", "num_groups = 3", "got 4");
  config = make_config(3, 2, 1, 1);
  config.num_groups = 0;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "num_groups", "got 0");
  config = make_config(3, 2, 1, 1);
  config.hidden_dim = 0;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "hidden_dim", "got 0");
  config = make_config(3, 2, 1, 1);
  config.noise_epsilon = 0;
  EXPECT_INVALID_ARGUMENT_WITH(HierarchicalMoELayer<float>{config}, "noise_epsilon");
}

TEST(HierarchicalMoEErrors, BadInputNamesTheValue) {
  HierarchicalMoELayer<double> layer(make_config(2, 3, 1, 2));
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(Mat<double>::Zero(3, 5)), "4 columns", "3x5");
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(Mat<double>::Zero(0, 4)), "at least one token");
  Mat<double> x = reference::uniform<double>(5, 4, 1);
  x(2, 1) = std::numeric_limits<double>::quiet_NaN();
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x), "non-finite", "token row 2");
  x(2, 1) = 0.25;
  HierarchicalForwardOptions options;
  options.load_weight = -1;
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x, options), "load_weight", "got -1");
  options.load_weight = 0.1;
  options.mode = Mode::training;
  options.step = std::uint64_t{1} << 32;
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x, options), "step", "4294967296");
  options.step = 0;
  auto gradients = layer.make_gradients();
  const auto evaluation = layer.forward(x);
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(evaluation, Mat<double>::Zero(5, 4), gradients), "evaluation-mode");
  const auto training = layer.forward(x, options);
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(training, Mat<double>::Zero(5, 3), gradients), "d_output", "5x4", "5x3");
  HierarchicalMoELayer<double> other(make_config(3, 2, 1, 1));
  EXPECT_INVALID_ARGUMENT_WITH(other.backward(training, Mat<double>::Zero(5, 4), gradients),
                               "does not come from a layer of this shape");
}

}  // namespace
