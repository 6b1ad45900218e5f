// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of SoftMoELayer (soft_moe.hpp), over float and double. References:
//   * forward: the whole layer written here as explicit loops in double (logits, the softmax
//     over tokens of each slot column, the softmax over slots of each token row, the slot inputs,
//     a naive ReLU expert per slot, the combine), with and without the l2 normalisation;
//   * the dispatch columns and the combine rows sum to 1;
//   * backward: central finite differences in double of Σ Y ⊙ R for Φ, the scale, X and every
//     expert tensor (ReLU and SwiGLU experts), with and without the normalisation;
//   * bitwise identical forward and backward for 1, 2 and 3 OpenMP threads;
//   * bad input: std::invalid_argument naming the bad value.
#include <sparsemoe/soft_moe.hpp>

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
using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::SoftMoEConfig;
using sparsemoe::SoftMoELayer;

template <typename Scalar>
using Mat = sparsemoe::Matrix<Scalar>;

template <typename Scalar>
class SoftMoE : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SoftMoE, Scalars, reference::ScalarNames);

SoftMoEConfig small_config(bool normalize) {
  SoftMoEConfig config;
  config.input_dim = 4;
  config.hidden_dim = 5;
  config.num_experts = 3;
  config.slots_per_expert = 2;
  config.normalize = normalize;
  config.seed = 7;
  return config;
}

struct SoftReference {
  MatrixD logits, dispatch, combine, slot_inputs, slot_outputs, output;
};

// The layer in double by explicit loops.
template <typename Scalar>
SoftReference soft_reference(const SoftMoELayer<Scalar>& layer, const Mat<Scalar>& x) {
  const Index tokens = x.rows(), width = x.cols(), slots = layer.num_slots(), n = layer.slots_per_expert();
  const double epsilon = 1e-6;
  MatrixD xn(tokens, width), phin(width, slots);
  for (Index t = 0; t < tokens; ++t) {
    double norm = 0;
    for (Index i = 0; i < width; ++i) norm += static_cast<double>(x(t, i)) * static_cast<double>(x(t, i));
    const double factor = layer.normalized() ? 1.0 / std::sqrt(norm + epsilon) : 1.0;
    for (Index i = 0; i < width; ++i) xn(t, i) = static_cast<double>(x(t, i)) * factor;
  }
  for (Index s = 0; s < slots; ++s) {
    double norm = 0;
    for (Index i = 0; i < width; ++i) norm += static_cast<double>(layer.phi()(i, s)) * static_cast<double>(layer.phi()(i, s));
    const double factor =
        layer.normalized() ? static_cast<double>(layer.scale()[0]) / std::sqrt(norm + epsilon) : 1.0;
    for (Index i = 0; i < width; ++i) phin(i, s) = static_cast<double>(layer.phi()(i, s)) * factor;
  }
  SoftReference r;
  r.logits = MatrixD::Zero(tokens, slots);
  for (Index t = 0; t < tokens; ++t)
    for (Index s = 0; s < slots; ++s)
      for (Index i = 0; i < width; ++i) r.logits(t, s) += xn(t, i) * phin(i, s);
  r.dispatch.resize(tokens, slots);
  for (Index s = 0; s < slots; ++s) {
    double top = -std::numeric_limits<double>::infinity(), sum = 0;
    for (Index t = 0; t < tokens; ++t) top = std::max(top, r.logits(t, s));
    for (Index t = 0; t < tokens; ++t) sum += r.dispatch(t, s) = std::exp(r.logits(t, s) - top);
    for (Index t = 0; t < tokens; ++t) r.dispatch(t, s) /= sum;
  }
  r.combine.resize(tokens, slots);
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> weights = reference::softmax(reference::row(r.logits, t));
    for (Index s = 0; s < slots; ++s) r.combine(t, s) = weights[static_cast<std::size_t>(s)];
  }
  r.slot_inputs = MatrixD::Zero(slots, width);
  for (Index s = 0; s < slots; ++s)
    for (Index t = 0; t < tokens; ++t)
      for (Index i = 0; i < width; ++i) r.slot_inputs(s, i) += r.dispatch(t, s) * static_cast<double>(x(t, i));
  r.slot_outputs.resize(slots, width);
  for (Index s = 0; s < slots; ++s) {
    const std::vector<double> out = paradigm_reference::relu_expert(layer.expert(s / n), r.slot_inputs.row(s));
    for (Index i = 0; i < width; ++i) r.slot_outputs(s, i) = out[static_cast<std::size_t>(i)];
  }
  r.output = MatrixD::Zero(tokens, width);
  for (Index t = 0; t < tokens; ++t)
    for (Index s = 0; s < slots; ++s)
      for (Index i = 0; i < width; ++i) r.output(t, i) += r.combine(t, s) * r.slot_outputs(s, i);
  return r;
}

template <typename Scalar>
double forward_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-12;
}

TYPED_TEST(SoftMoE, ForwardMatchesNaiveLoops) {
  using Scalar = TypeParam;
  for (const bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "normalised" : "plain");
    SoftMoELayer<Scalar> layer(small_config(normalize));
    if (normalize) layer.scale()[0] = Scalar(2.5);
    const Mat<Scalar> x = reference::uniform<Scalar>(7, 4, 11, -1.5, 1.5);
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      const auto result = layer.forward(x, mode);
      const SoftReference r = soft_reference(layer, x);
      const double tol = forward_tolerance<Scalar>();
      EXPECT_TRUE(reference::all_close(result.logits, r.logits, tol));
      EXPECT_TRUE(reference::all_close(result.dispatch_weights, r.dispatch, tol));
      EXPECT_TRUE(reference::all_close(result.combine_weights, r.combine, tol));
      EXPECT_TRUE(reference::all_close(result.slot_inputs, r.slot_inputs, tol));
      EXPECT_TRUE(reference::all_close(result.slot_outputs, r.slot_outputs, tol));
      EXPECT_TRUE(reference::all_close(result.output, r.output, tol));
      EXPECT_EQ(result.training, mode == Mode::training);
      EXPECT_EQ(result.pre_activations.rows(), mode == Mode::training ? layer.num_slots() : 0);
    }
    // The evaluation output is the training output, bit for bit (Soft MoE has no noise).
    EXPECT_TRUE(paradigm_reference::bitwise_equal(layer.forward(x, Mode::evaluation).output,
                                                  layer.forward(x, Mode::training).output));
  }
}

TYPED_TEST(SoftMoE, DispatchColumnsAndCombineRowsSumToOne) {
  using Scalar = TypeParam;
  SoftMoEConfig config = small_config(false);
  config.slots_per_expert = 3;
  SoftMoELayer<Scalar> layer(config);
  layer.phi() *= Scalar(4);  // peaked softmaxes
  const Mat<Scalar> x = reference::uniform<Scalar>(9, 4, 3, -2.0, 2.0);
  const auto result = layer.forward(x);
  const double tol = std::is_same<Scalar, float>::value ? 1e-6 : 1e-14;
  for (Index s = 0; s < layer.num_slots(); ++s) {
    double sum = 0;
    for (Index t = 0; t < x.rows(); ++t) {
      EXPECT_GE(result.dispatch_weights(t, s), Scalar(0));
      sum += static_cast<double>(result.dispatch_weights(t, s));
    }
    EXPECT_NEAR(sum, 1.0, tol) << "dispatch column " << s;
  }
  for (Index t = 0; t < x.rows(); ++t) {
    double sum = 0;
    for (Index s = 0; s < layer.num_slots(); ++s) sum += static_cast<double>(result.combine_weights(t, s));
    EXPECT_NEAR(sum, 1.0, tol) << "combine row " << t;
  }
}

// Σ Y ⊙ R for the layer's current parameters.
template <typename Layer>
double weighted_output(const Layer& layer, const Mat<double>& x, const Mat<double>& weights) {
  return layer.forward(x).output.cwiseProduct(weights).sum();
}

template <typename Layer>
void expect_gradients_match_finite_differences(Layer& layer, Mat<double> x) {
  const Mat<double> weights = reference::uniform<double>(x.rows(), x.cols(), 99);
  auto gradients = layer.make_gradients();
  const auto result = layer.forward(x, Mode::training);
  const Mat<double> d_input = layer.backward(result, weights, gradients);
  const auto loss = [&] { return weighted_output(layer, x, weights); };
  const double tol = 1e-7;
  const auto input_check = sparsemoe_test::check_gradient(loss, x, d_input);
  EXPECT_LT(input_check.worst_relative_error, tol) << "input: " << input_check;
  EXPECT_GT(input_check.max_abs_analytic, 1e-3);
  const auto parameters = layer.tensors();
  const auto analytic = gradients.tensors();
  ASSERT_EQ(parameters.size(), analytic.size());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    ASSERT_EQ(parameters[i].name, analytic[i].name);
    const auto check = sparsemoe_test::check_gradient(loss, parameters[i], analytic[i]);
    EXPECT_LT(check.worst_relative_error, tol) << parameters[i].name << ": " << check;
    EXPECT_GT(check.max_abs_analytic, 1e-4) << parameters[i].name << " has an all-zero gradient";
  }
}

TEST(SoftMoEGradients, MatchFiniteDifferences) {
  for (const bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "normalised" : "plain");
    SoftMoELayer<double> layer(small_config(normalize));
    if (normalize) layer.scale()[0] = 2.5;
    expect_gradients_match_finite_differences(layer, reference::uniform<double>(6, 4, 21, -1.5, 1.5));
  }
}

TEST(SoftMoEGradients, MatchFiniteDifferencesWithSwiGluExperts) {
  for (const bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "normalised" : "plain");
    SoftMoELayer<double, sparsemoe::SwiGluExpert<double>> layer(small_config(normalize));
    expect_gradients_match_finite_differences(layer, reference::uniform<double>(5, 4, 22, -1.5, 1.5));
  }
}

TEST(SoftMoEGradients, TensorNamesAndOrder) {
  SoftMoELayer<float> plain(small_config(false));
  SoftMoELayer<float> normalized(small_config(true));
  const auto plain_names = plain.tensors();
  const auto normalized_names = normalized.tensors();
  ASSERT_EQ(plain_names.size(), 1u + 3u * 4u);
  ASSERT_EQ(normalized_names.size(), 2u + 3u * 4u);
  EXPECT_EQ(plain_names[0].name, "phi");
  EXPECT_EQ(plain_names[1].name, "expert0.w1");
  EXPECT_EQ(normalized_names[1].name, "scale");
  EXPECT_EQ(normalized_names.back().name, "expert2.b2");
  EXPECT_EQ(normalized.scale()[0], 1.0f);
  EXPECT_EQ(plain_names[0].rows, 4);
  EXPECT_EQ(plain_names[0].cols, 6);
}

TYPED_TEST(SoftMoE, BitwiseIdenticalAcrossThreadCounts) {
  using Scalar = TypeParam;
  for (const bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "normalised" : "plain");
    SoftMoEConfig config = small_config(normalize);  // larger, so that every product is tiled and threaded
    config.input_dim = 32;
    config.hidden_dim = 40;
    config.slots_per_expert = 20;
    SoftMoELayer<Scalar> layer(config);
    const Mat<Scalar> x = reference::uniform<Scalar>(300, 32, 5);
    const Mat<Scalar> d_output = reference::uniform<Scalar>(300, 32, 6);
    paradigm_reference::expect_identical_across_thread_counts<Scalar>([&] {
      const auto result = layer.forward(x, Mode::training);
      auto gradients = layer.make_gradients();
      const Mat<Scalar> d_input = layer.backward(result, d_output, gradients);
      return paradigm_reference::step_record(gradients, result.output, d_input);
    });
  }
}

TEST(SoftMoEConcurrency, OneLayerServesManyThreads) {
  SoftMoEConfig config = small_config(true);
  config.input_dim = 16;
  const SoftMoELayer<float> layer(config);
  paradigm_reference::expect_concurrent_calls_match_serial<float>([&](int call) {
    const Mat<float> x = reference::uniform<float>(40 + 7 * call, 16, 100 + static_cast<std::uint64_t>(call));
    const auto result = layer.forward(x, Mode::training);
    auto gradients = layer.make_gradients();
    const Mat<float> d_input = layer.backward(result, x, gradients);
    return paradigm_reference::step_record(gradients, result.output, d_input);
  });
}

TEST(SoftMoEErrors, BadConfigurationNamesTheValue) {
  SoftMoEConfig config = small_config(false);
  config.slots_per_expert = 0;
  EXPECT_INVALID_ARGUMENT_WITH(SoftMoELayer<float>{config}, "slots_per_expert", "got 0");
  config = small_config(false);
  config.num_experts = -2;
  EXPECT_INVALID_ARGUMENT_WITH(SoftMoELayer<float>{config}, "num_experts", "got -2");
  config = small_config(false);
  config.input_dim = 0;
  EXPECT_INVALID_ARGUMENT_WITH(SoftMoELayer<float>{config}, "input_dim", "got 0");
  config = small_config(false);
  config.hidden_dim = 0;
  EXPECT_INVALID_ARGUMENT_WITH(SoftMoELayer<float>{config}, "hidden_dim", "got 0");
}

TEST(SoftMoEErrors, BadInputNamesTheValue) {
  SoftMoELayer<double> layer(small_config(true));
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(Mat<double>::Zero(3, 5)), "4 columns", "3x5");
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(Mat<double>::Zero(0, 4)), "at least one token");
  Mat<double> x = reference::uniform<double>(5, 4, 1);
  x(3, 2) = std::numeric_limits<double>::quiet_NaN();
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x), "non-finite", "token row 3");
  x(3, 2) = std::numeric_limits<double>::infinity();
  EXPECT_INVALID_ARGUMENT_WITH(layer.forward(x, Mode::training), "non-finite", "token row 3");
  x(3, 2) = 0.5;
  auto gradients = layer.make_gradients();
  const auto evaluation = layer.forward(x);
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(evaluation, Mat<double>::Zero(5, 4), gradients), "evaluation-mode");
  const auto training = layer.forward(x, Mode::training);
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(training, Mat<double>::Zero(4, 4), gradients), "d_output", "5x4",
                               "4x4");
  SoftMoELayer<double> other(small_config(false));
  auto other_gradients = other.make_gradients();
  EXPECT_INVALID_ARGUMENT_WITH(layer.backward(training, Mat<double>::Zero(5, 4), other_gradients),
                               "gradients.scale");
  EXPECT_INVALID_ARGUMENT_WITH(other.backward(training, Mat<double>::Zero(5, 4), other_gradients),
                               "does not come from a layer of this shape");
}

}  // namespace
