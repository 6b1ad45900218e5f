// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// MoELayer's contract with the results and packed experts it hands out: a result is accepted by
// backward only from the very layer instance that made it (never from a layer built later at the
// same address, nor from a copy), and only while every part of it still has the shapes of its
// forward; parameters resized through their non-const references are rejected before any work;
// the training noise advances by itself unless pinned; an evaluation forward can keep its cache
// and is then differentiated exactly (finite differences in double); non-finite parameters are
// named.
#include "gradient_check.hpp"

#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

sparsemoe::MoEConfig make_config(Index d, Index h, Index experts, Index k, std::uint64_t seed = 5) {
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = experts;
  config.k = k;
  config.seed = seed;
  return config;
}

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(uniform(generator));
  return m;
}

sparsemoe::ForwardOptions training_options(std::uint64_t step = 1) {
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = step;
  return options;
}

/// Whether every gradient tensor is exactly zero (backward threw before touching any).
template <typename Gradients>
bool all_zero(Gradients& gradients) {
  for (const auto& view : gradients.tensors()) {
    for (Index i = 0; i < view.size(); ++i) {
      if (view.data[i] != 0) return false;
    }
  }
  return true;
}

/// Expects `call` to throw std::invalid_argument whose message contains `fragment`.
void expect_invalid_argument(const std::function<void()>& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "expected std::invalid_argument containing '" << fragment << "'";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  }
}

// ---- Identity --------------------------------------------------------------------------------

// The report that opened this: a result that outlives its layer, handed to a new layer built in
// the same storage with the same d but another E or h, made backward read out of bounds.
TEST(LayerIdentity, ResultOfADestroyedLayerIsRejectedByANewLayerAtTheSameAddress) {
  const Index d = 6;
  const Matrix<float> x = random_matrix<float>(20, d, 1);
  const Matrix<float> d_y = random_matrix<float>(20, d, 2);
  struct Replacement {
    Index hidden, experts, k;
  };
  for (const Replacement replacement : {Replacement{8, 4, 2}, Replacement{32, 4, 2}, Replacement{8, 9, 3},
                                        Replacement{4, 2, 1}}) {
    std::optional<sparsemoe::MoELayer<float>> layer;
    layer.emplace(make_config(d, 8, 4, 2));
    layer->gate().initialize_uniform(3);
    const auto result = layer->forward(x, training_options());
    ASSERT_FALSE(result.cache.empty());
    const void* address = &*layer;
    layer.reset();
    EXPECT_TRUE(result.cache.empty()) << "the cache of a destroyed layer can feed no backward";
    layer.emplace(make_config(d, replacement.hidden, replacement.experts, replacement.k));
    ASSERT_EQ(static_cast<const void*>(&*layer), address) << "the test needs the new layer in the same storage";
    auto gradients = layer->make_gradients();
    expect_invalid_argument([&] { layer->backward(result, d_y, gradients); }, "another layer");
    EXPECT_TRUE(all_zero(gradients));
  }
}

TEST(LayerIdentity, ACopyHasItsOwnIdentityAMoveKeepsIt) {
  const Matrix<double> x = random_matrix<double>(12, 5, 4);
  const Matrix<double> d_y = random_matrix<double>(12, 5, 5);
  sparsemoe::MoELayer<double> original(make_config(5, 7, 4, 2));
  original.gate().initialize_uniform(9);
  const auto result = original.forward(x, training_options());

  sparsemoe::MoELayer<double> copy(original);
  auto gradients = copy.make_gradients();
  expect_invalid_argument([&] { copy.backward(result, d_y, gradients); }, "another layer");

  sparsemoe::MoELayer<double> assigned(make_config(5, 7, 4, 2));
  const auto assigned_result = assigned.forward(x, training_options());
  assigned = original;  // copy assignment: new parameters, new identity
  expect_invalid_argument([&] { assigned.backward(assigned_result, d_y, gradients); }, "another layer");
  expect_invalid_argument([&] { assigned.backward(result, d_y, gradients); }, "another layer");
  EXPECT_TRUE(all_zero(gradients));

  // A moved layer is the same layer: its results stay valid, and give the original's gradients.
  auto expected = original.make_gradients();
  const Matrix<double> expected_d_x = original.backward(result, d_y, expected);
  sparsemoe::MoELayer<double> moved(std::move(original));
  auto moved_gradients = moved.make_gradients();
  const Matrix<double> d_x = moved.backward(result, d_y, moved_gradients);
  EXPECT_EQ(d_x, expected_d_x);
  EXPECT_EQ(moved_gradients.gate_weight, expected.gate_weight);
}

TEST(LayerIdentity, PackedExpertsOfADestroyedLayerAreRejected) {
  const Matrix<float> x = random_matrix<float>(10, 6, 6);
  std::optional<sparsemoe::MoELayer<float>> layer;
  layer.emplace(make_config(6, 8, 4, 2));
  const auto packed = layer->pack_experts();
  EXPECT_FALSE(packed.empty());
  layer.reset();
  EXPECT_TRUE(packed.empty());
  layer.emplace(make_config(6, 8, 4, 2));  // same shapes, same storage
  sparsemoe::ForwardResult<float> result;
  sparsemoe::ForwardWorkspace<float> workspace;
  expect_invalid_argument([&] { layer->forward(x, {}, result, workspace, packed); }, "not made by this layer");
}

// ---- Every shape checked before any work -----------------------------------------------------

class EditedResult : public ::testing::Test {
 protected:
  EditedResult() : layer_(make_config(6, 8, 4, 2)), x_(random_matrix<float>(30, 6, 7)), d_y_(random_matrix<float>(30, 6, 8)) {
    layer_.gate().initialize_uniform(10);
    result_ = layer_.forward(x_, training_options());
  }

  /// Backward on an edited copy of the result must throw and leave the gradients untouched.
  void expect_rejected(const std::function<void(sparsemoe::ForwardResult<float>&)>& edit, const std::string& fragment) {
    sparsemoe::ForwardResult<float> edited = result_;
    edit(edited);
    auto gradients = layer_.make_gradients();
    expect_invalid_argument([&] { layer_.backward(edited, d_y_, gradients); }, fragment);
    EXPECT_TRUE(all_zero(gradients));
  }

  sparsemoe::MoELayer<float> layer_;
  Matrix<float> x_, d_y_;
  sparsemoe::ForwardResult<float> result_;
};

TEST_F(EditedResult, TheUneditedResultIsAccepted) {
  auto gradients = layer_.make_gradients();
  EXPECT_NO_THROW(layer_.backward(result_, d_y_, gradients));
  EXPECT_FALSE(all_zero(gradients));
}

TEST_F(EditedResult, CacheShapes) {
  expect_rejected([](auto& r) { r.cache.pre_activations.conservativeResize(r.cache.pre_activations.rows() - 1, Eigen::NoChange); },
                  "pre_activations");
  expect_rejected([](auto& r) { r.cache.pre_activations.conservativeResize(Eigen::NoChange, 4); }, "pre_activations");
  expect_rejected([](auto& r) { r.cache.input.conservativeResize(r.cache.input.rows() + 5, Eigen::NoChange); }, "");
}

TEST_F(EditedResult, RoutingShapesAndIds) {
  expect_rejected([](auto& r) { r.routing.gates.conservativeResize(Eigen::NoChange, 1); }, "gates");
  expect_rejected([](auto& r) { r.routing.noise.resize(0, 0); }, "noise");
  expect_rejected([](auto& r) { r.routing.clean_logits.conservativeResize(Eigen::NoChange, 3); }, "clean_logits");
  expect_rejected([](auto& r) { r.routing.expert_ids(3, 1) = 4; }, "disagree");
  expect_rejected([](auto& r) { r.routing.expert_ids(3, 1) = -1; }, "-1");
  expect_rejected([](auto& r) { r.routing.kth_expert[2] = 99; }, "kth_expert");
  expect_rejected([](auto& r) { r.routing.next_expert.resize(3); }, "kth_expert");
  // Swapping two tokens' first choices between experts breaks the plan's row ranges.
  expect_rejected(
      [](auto& r) {
        for (Index t = 1; t < r.routing.num_tokens(); ++t) {
          if (r.routing.expert_ids(t, 0) != r.routing.expert_ids(0, 0)) {
            std::swap(r.routing.expert_ids(t, 0), r.routing.expert_ids(0, 0));
            return;
          }
        }
      },
      "disagree");
}

TEST_F(EditedResult, PlanShapesAndConsistency) {
  expect_rejected([](auto& r) { r.plan.row_of_token_slot[5] = r.plan.num_rows() + 3; }, "disagree");
  expect_rejected([](auto& r) { r.plan.token_of_row[0] = 29 - r.plan.token_of_row[0]; }, "disagree");
  expect_rejected([](auto& r) { std::swap(r.plan.row_of_token_slot[0], r.plan.row_of_token_slot[1]); }, "disagree");
  expect_rejected([](auto& r) { r.plan.offsets[2] += 1; }, "");
  expect_rejected([](auto& r) { r.plan.tokens_per_expert.resize(3); }, "plan");
  expect_rejected([](auto& r) { r.plan.k = 1; }, "plan");
}

TEST_F(EditedResult, LossShapes) {
  expect_rejected([](auto& r) { r.losses.importance.resize(2); }, "importance");
  expect_rejected(
      [](auto& r) {
        r.losses.smooth_load = true;
        r.routing.noise.resize(0, 0);
        r.routing.raw_noise.resize(0, 0);
        r.routing.noise_scale.resize(0, 0);
        r.routing.kth_expert.resize(0);
        r.routing.next_expert.resize(0);
      },
      "smooth load");
}

TEST(ResizedParameters, AreRejectedByForwardBackwardAndPacking) {
  const Matrix<float> x = random_matrix<float>(16, 6, 11);
  const Matrix<float> d_y = random_matrix<float>(16, 6, 12);
  const std::vector<std::function<void(sparsemoe::MoELayer<float>&)>> edits = {
      [](auto& layer) { layer.expert(1).w1().resize(6, 20); },
      [](auto& layer) { layer.expert(2).w2().resize(9, 6); },
      [](auto& layer) { layer.expert(0).b1().resize(3); },
      [](auto& layer) { layer.expert(3).b2().resize(0); },
      [](auto& layer) { layer.gate().gate_weight().resize(6, 5); },
      [](auto& layer) { layer.gate().noise_weight().resize(7, 4); },
  };
  for (std::size_t i = 0; i < edits.size(); ++i) {
    SCOPED_TRACE(i);
    sparsemoe::MoELayer<float> layer(make_config(6, 8, 4, 2));
    const auto result = layer.forward(x, training_options());
    edits[i](layer);
    auto gradients = sparsemoe::MoELayer<float>(make_config(6, 8, 4, 2)).make_gradients();
    EXPECT_THROW(layer.backward(result, d_y, gradients), std::invalid_argument);
    EXPECT_TRUE(all_zero(gradients));
    EXPECT_THROW(layer.forward(x, training_options()), std::invalid_argument);
    EXPECT_THROW(layer.pack_experts(), std::invalid_argument);
  }
}

// ---- Training noise --------------------------------------------------------------------------

TEST(TrainingStep, AdvancesByItselfUnlessPinned) {
  sparsemoe::MoELayer<double> layer(make_config(5, 6, 4, 2, 21));
  const Matrix<double> x = random_matrix<double>(9, 5, 13);
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  EXPECT_FALSE(options.step.has_value()) << "the default must not pin the noise sample";
  EXPECT_EQ(layer.training_step(), 0u);
  const auto first = layer.forward(x, options);
  const auto second = layer.forward(x, options);
  EXPECT_EQ(first.step, 0u);
  EXPECT_EQ(second.step, 1u);
  EXPECT_EQ(layer.training_step(), 2u);
  EXPECT_NE(first.routing.noise, second.routing.noise) << "two default training steps drew the same noise";
  // The noise of each step is the documented sample n(t, i) = N(seed, step, t, i), drawn here by an
  // independent call of the Philox/Box–Muller generator the README names.
  for (const auto* result : {&first, &second}) {
    for (Index t = 0; t < x.rows(); ++t) {
      for (Index i = 0; i < 4; ++i) {
        EXPECT_EQ(result->routing.noise(t, i),
                  sparsemoe::detail::standard_normal(21, result->step, static_cast<std::uint64_t>(t),
                                                     static_cast<std::uint64_t>(i)));
      }
    }
  }
  // A pinned step replays a sample without advancing the counter.
  options.step = 0;
  const auto replay = layer.forward(x, options);
  EXPECT_EQ(replay.routing.noise, first.routing.noise);
  EXPECT_EQ(replay.output, first.output);
  EXPECT_EQ(layer.training_step(), 2u);
  // Evaluation forwards neither draw noise nor advance it.
  layer.forward(x);
  EXPECT_EQ(layer.training_step(), 2u);
  layer.set_training_step(7);
  EXPECT_EQ(layer.forward(x, training_options(std::uint64_t{0}) /* pinned */).step, 0u);
  options.step.reset();
  EXPECT_EQ(layer.forward(x, options).step, 7u);
}

// ---- Evaluation-mode gradients ---------------------------------------------------------------

TEST(EvaluationCache, BackwardOfTheNoiseFreeRoutingMatchesFiniteDifferences) {
  using Layer = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Silu>>;
  Layer layer(make_config(5, 6, 4, 2, 31));
  layer.gate().initialize_uniform(32);
  sparsemoe::ForwardOptions options;  // evaluation
  options.keep_cache = true;
  options.importance_weight = 0.3;
  options.load_weight = 0.2;  // the hard count: no gradient, but the value must not disturb
  const Matrix<double> output_weight = random_matrix<double>(8, 5, 33);
  Matrix<double> x;
  // An input whose clean logits are no closer than 3e-3 to each other: the routing is then
  // constant over the difference stencil (|Δlogit| < 1e-3).
  for (std::uint64_t attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 500u) << "no input away from top-k ties";
    x = random_matrix<double>(8, 5, 100 + attempt);
    const auto routing = layer.gate().route(x, Mode::evaluation);
    bool separated = true;
    for (Index t = 0; t < x.rows() && separated; ++t) {
      std::vector<double> logits(routing.clean_logits.row(t).data(), routing.clean_logits.row(t).data() + 4);
      std::sort(logits.begin(), logits.end());
      for (std::size_t i = 1; i < logits.size(); ++i) separated = separated && logits[i] - logits[i - 1] > 3e-3;
    }
    if (separated) break;
  }
  const auto result = layer.forward(x, options);
  ASSERT_FALSE(result.cache.empty()) << "keep_cache must keep the cache in evaluation mode";
  EXPECT_FALSE(result.routing.noisy());
  EXPECT_EQ(layer.training_step(), 0u);
  auto gradients = layer.make_gradients();
  const Matrix<double> d_x = layer.backward(result, output_weight, gradients);
  const auto loss = [&] {
    sparsemoe::ForwardOptions plain;  // the same routing without a cache
    plain.importance_weight = options.importance_weight;
    plain.load_weight = options.load_weight;
    const auto r = layer.forward(x, plain);
    return (output_weight.array() * r.output.array()).sum() + r.losses.total();
  };
  const auto input_check = sparsemoe_test::check_gradient(loss, x, d_x);
  EXPECT_LT(input_check.worst_relative_error, 1e-6) << input_check;
  EXPECT_GT(input_check.max_abs_analytic, 1e-3);
  auto parameters = layer.tensors();
  auto gradient_views = gradients.tensors();
  for (std::size_t t = 0; t < parameters.size(); ++t) {
    const auto check = sparsemoe_test::check_gradient(loss, parameters[t], gradient_views[t]);
    EXPECT_LT(check.worst_relative_error, 1e-6) << parameters[t].name << ": " << check;
    if (parameters[t].name == "gate.gate_weight") {
      EXPECT_GT(check.max_abs_analytic, 1e-3);
    }
    if (parameters[t].name == "gate.noise_weight") {
      EXPECT_EQ(check.max_abs_analytic, 0.0) << "no noise, no gradient";
    }
  }
  // Packed experts serve plain evaluation forwards only.
  sparsemoe::ForwardResult<double> packed_result;
  sparsemoe::ForwardWorkspace<double> workspace;
  EXPECT_THROW(layer.forward(x, options, packed_result, workspace, layer.pack_experts()), std::invalid_argument);
}

// ---- Non-finite parameters -------------------------------------------------------------------

TEST(NonFiniteParameters, AreNamedByTheCheckAndByPacking) {
  sparsemoe::MoELayer<float> layer(make_config(6, 8, 4, 2));
  EXPECT_NO_THROW(layer.require_finite_parameters());
  EXPECT_NO_THROW(layer.pack_experts());
  const float values[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
  for (const float value : values) {
    sparsemoe::MoELayer<float> broken(layer);
    broken.expert(2).w2()(3, 1) = value;
    expect_invalid_argument([&] { broken.require_finite_parameters(); }, "expert2.w2");
    expect_invalid_argument([&] { broken.pack_experts(); }, "expert2.w2");
    sparsemoe::MoELayer<float> broken_gate(layer);
    broken_gate.gate().noise_weight()(0, 3) = value;
    expect_invalid_argument([&] { broken_gate.require_finite_parameters(); }, "gate.noise_weight");
    sparsemoe::MoELayer<float> broken_bias(layer);
    broken_bias.expert(0).b1()(7) = value;
    expect_invalid_argument([&] { broken_bias.require_finite_parameters(); }, "expert0.b1");
  }
}


// ---- The simple API's pooled storage -----------------------------------------------------------

namespace simple_api {

// forward(input, options) and backward(result, d_y, gradients) take their workspaces from the
// layer's pool and recycle the buffers of destroyed results: whatever storage they reuse (of
// another shape, of another mode, of another thread), they must give exactly what the overloads
// with the caller's own fresh workspaces give.
TEST(SimpleApi, PooledCallsEqualCallsWithFreshWorkspacesBitwise) {
  sparsemoe::MoELayer<float> layer(make_config(6, 16, 5, 2, 41));
  layer.gate().initialize_uniform(42);
  auto pooled_gradients = layer.make_gradients();
  auto fresh_gradients = layer.make_gradients();
  std::uint64_t seed = 50;
  for (const Index tokens : {40, 40, 7, 300, 40, 0, 40}) {
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      SCOPED_TRACE(std::to_string(tokens) + (mode == Mode::training ? " training" : " evaluation"));
      const Matrix<float> x = random_matrix<float>(tokens, 6, ++seed);
      const Matrix<float> d_y = random_matrix<float>(tokens, 6, ++seed);
      sparsemoe::ForwardOptions options;
      options.mode = mode;
      options.step = seed;
      const auto pooled = layer.forward(x, options);
      sparsemoe::ForwardResult<float> fresh;
      sparsemoe::ForwardWorkspace<float> workspace;
      layer.forward(x, options, fresh, workspace);
      ASSERT_EQ(pooled.output.rows(), tokens);
      EXPECT_EQ(pooled.output, fresh.output);
      EXPECT_EQ(pooled.routing.gates, fresh.routing.gates);
      if (mode == Mode::evaluation) {
        EXPECT_TRUE(pooled.cache.empty());
        continue;
      }
      EXPECT_EQ(pooled.cache.pre_activations, fresh.cache.pre_activations);
      pooled_gradients.set_zero();
      fresh_gradients.set_zero();
      const Matrix<float> pooled_d_x = layer.backward(pooled, d_y, pooled_gradients);
      Matrix<float> fresh_d_x;
      sparsemoe::BackwardWorkspace<float> backward_workspace;
      layer.backward(fresh, d_y, fresh_gradients, fresh_d_x, backward_workspace);
      EXPECT_EQ(pooled_d_x, fresh_d_x);
      auto a = pooled_gradients.tensors();
      auto b = fresh_gradients.tensors();
      for (std::size_t t = 0; t < a.size(); ++t) {
        EXPECT_TRUE(std::equal(a[t].data, a[t].data + a[t].size(), b[t].data)) << a[t].name;
      }
    }
  }
  EXPECT_GT(layer.pooled_workspace_bytes(), 0u);
  layer.release_workspaces();
  EXPECT_EQ(layer.pooled_workspace_bytes(), 0u);
}

TEST(SimpleApi, ResultsMayOutliveTheirLayerAndMove) {
  const Matrix<double> x = random_matrix<double>(30, 5, 60);
  std::optional<sparsemoe::ForwardResult<double>> kept;
  {
    sparsemoe::MoELayer<double> layer(make_config(5, 8, 4, 2));
    auto result = layer.forward(x, training_options());
    const Matrix<double> expected = result.output;
    kept.emplace(std::move(result));  // the moved-from result gives nothing back
    EXPECT_EQ(kept->output, expected);
    const auto copy = *kept;  // a copy recycles its own buffers when destroyed
    EXPECT_EQ(copy.output, expected);
  }
  EXPECT_TRUE(kept->cache.empty());
  kept.reset();  // its layer is gone: the buffers are freed, nothing else happens (ASan watches)
}

TEST(SimpleApi, ConcurrentCallsOnOneLayerEqualSerialOnes) {
  sparsemoe::MoELayer<float> layer(make_config(6, 12, 4, 2, 70));
  layer.gate().initialize_uniform(71);
  constexpr int kThreads = 4, kCalls = 8;
  std::vector<Matrix<float>> inputs, expected;
  for (int i = 0; i < kThreads * kCalls; ++i) {
    inputs.push_back(random_matrix<float>(20 + 13 * (i % 5), 6, 100 + static_cast<std::uint64_t>(i)));
    sparsemoe::ForwardResult<float> result;
    sparsemoe::ForwardWorkspace<float> workspace;
    layer.forward(inputs.back(), training_options(static_cast<std::uint64_t>(i)), result, workspace);
    expected.push_back(result.output);
  }
  std::vector<Matrix<float>> outputs(inputs.size());
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int c = 0; c < kCalls; ++c) {
        const auto i = static_cast<std::size_t>(t * kCalls + c);
        outputs[i] = layer.forward(inputs[i], training_options(i)).output;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (std::size_t i = 0; i < inputs.size(); ++i) EXPECT_EQ(outputs[i], expected[i]) << i;
}

}  // namespace simple_api

}  // namespace
