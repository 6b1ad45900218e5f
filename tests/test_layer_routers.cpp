// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// MoELayer with the top-k routers of router.hpp in place of the noisy top-k gate:
//   * forward against a naive per-token reference that routes by brute force (softmax of x·W_r,
//     renormalisation, routed scale) and runs each expert as a plain loop, in double;
//   * every gradient (input, router weight and bias, every expert tensor) of
//     L = Σ (W ⊙ y) + losses.total() — balance loss and z-loss included — against central
//     finite differences in double, for softmax (renormalised and scaled, with a bias; grouped),
//     sigmoid with groups and a selection bias (DeepSeek-V3), Switch with input jitter, and GShard
//     with its random second expert (slots that are not dispatched);
//   * bitwise identical results for 1, 2 and 3 OpenMP threads.
#include "gradient_check.hpp"
#include "planned_reference.hpp"
#include "router_reference.hpp"

#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
using MatrixD = sparsemoe::Matrix<double>;
using ExpertD = sparsemoe::Expert<double, sparsemoe::Silu>;
using planned_reference::naive_expert;
using planned_reference::random_matrix;

sparsemoe::MoEConfig layer_config(Index d, Index h, Index experts, Index k, std::uint64_t seed) {
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = experts;
  config.k = k;
  config.seed = seed;
  return config;
}



/// softmax(x_t·W_r) over the experts, by loops.
std::vector<double> naive_router_softmax(const MatrixD& weight, const MatrixD& x, Index token) {
  std::vector<double> z(static_cast<std::size_t>(weight.cols()), 0.0);
  for (Index e = 0; e < weight.cols(); ++e) {
    for (Index i = 0; i < weight.rows(); ++i) z[static_cast<std::size_t>(e)] += x(token, i) * weight(i, e);
  }
  return router_reference::softmax(z);
}

/// Forward of a softmax-routed layer (d = 6, h = 5, E = 7, T = 40) against a naive per-token
/// reference: brute-force top-k of softmax(x·W_r), gates (renormalised when asked) × scale, each
/// expert by loops; and the balance loss α·E·Σ_i f_i·P_i by its definition.
void expect_softmax_layer_matches_reference(const sparsemoe::SoftmaxTopKRouterOptions& router_options,
                                            double balance_weight) {
  const Index d = 6, h = 5, experts = 7, k = router_options.k, tokens = 40;
  const double scale = router_options.scale;
  sparsemoe::SoftmaxTopKRouter<double> router(d, experts, router_options);
  router.initialize_uniform(3);
  sparsemoe::MoELayer<double, ExpertD, sparsemoe::SoftmaxTopKRouter<double>> layer(
      layer_config(d, h, experts, k, 4), router);
  const MatrixD x = random_matrix(tokens, d, 5);
  sparsemoe::ForwardOptions options;
  options.balance_loss_weight = balance_weight;
  const auto result = layer.forward(x, options);

  std::vector<double> counts(static_cast<std::size_t>(experts), 0.0), score_sums(counts);
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> p = naive_router_softmax(layer.router().weight(), x, t);
    const std::vector<Index> chosen = router_reference::brute_force_top_k(p, k);
    double chosen_sum = 0;
    for (const Index e : chosen) chosen_sum += p[static_cast<std::size_t>(e)];
    if (!router_options.normalize_top_k) chosen_sum = 1;
    std::vector<double> y(static_cast<std::size_t>(d), 0.0);
    for (Index j = 0; j < k; ++j) {
      const Index e = chosen[static_cast<std::size_t>(j)];
      EXPECT_EQ(result.routing.expert_ids(t, j), e) << "token " << t << " slot " << j;
      const double gate = scale * p[static_cast<std::size_t>(e)] / chosen_sum;
      const std::vector<double> out = naive_expert(layer.expert(e), x, t);
      for (Index i = 0; i < d; ++i) y[static_cast<std::size_t>(i)] += gate * out[static_cast<std::size_t>(i)];
      counts[static_cast<std::size_t>(e)] += 1;
    }
    for (Index e = 0; e < experts; ++e) score_sums[static_cast<std::size_t>(e)] += p[static_cast<std::size_t>(e)];
    for (Index i = 0; i < d; ++i) EXPECT_NEAR(result.output(t, i), y[static_cast<std::size_t>(i)], 1e-12);
  }
  // α·E·Σ_i f_i·P_i with f_i = count_i/(T·k), P_i = mean_t p_ti.
  double balance = 0;
  for (Index e = 0; e < experts; ++e) {
    balance += counts[static_cast<std::size_t>(e)] / static_cast<double>(tokens * k) *
               score_sums[static_cast<std::size_t>(e)] / static_cast<double>(tokens);
  }
  balance *= balance_weight * static_cast<double>(experts);
  EXPECT_NEAR(result.losses.total(), balance, 1e-14);
  EXPECT_EQ(result.plan.dropped_slots, 0);
  for (Index e = 0; e < experts; ++e) EXPECT_EQ(result.tokens_per_expert()[e], counts[static_cast<std::size_t>(e)]);
}

TEST(LayerWithSoftmaxRouter, ForwardMatchesANaiveReference) {
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = 3;
  router_options.normalize_top_k = true;
  router_options.scale = 2.5;
  expect_softmax_layer_matches_reference(router_options, 0.02);
}

/// Checks every gradient of L = Σ(W ⊙ y) + losses.total() against finite differences. The loss
/// refuses (and the input is redrawn) where a perturbation changes any routing decision.
template <typename RouterT, typename Expert = ExpertD>
void check_layer_gradients(const RouterT& router, Index k, const sparsemoe::ForwardOptions& options,
                           const std::string& label, bool expect_dropped = false, Index shared_hidden = 0,
                           bool shared_gate = false) {
  SCOPED_TRACE(label);
  const Index d = 5, h = 4, experts = router.num_experts(), tokens = 10;
  sparsemoe::MoEConfig config = layer_config(d, h, experts, k, 21);
  config.shared_hidden_dim = shared_hidden;
  config.shared_expert_gate = shared_gate;
  sparsemoe::MoELayer<double, Expert, RouterT> layer(config, router);
  ASSERT_EQ(layer.has_shared_expert(), shared_hidden > 0);
  const MatrixD output_weight = random_matrix(tokens, d, 22);
  bool checked = false;
  for (std::uint64_t attempt = 0; attempt < 20 && !checked; ++attempt) {
    MatrixD x = random_matrix(tokens, d, 100 + attempt);
    const auto result = layer.forward(x, options);
    ASSERT_FALSE(result.cache.empty());
    if (expect_dropped && result.plan.dropped_slots == 0) continue;
    const sparsemoe::IndexMatrix ids = result.routing.expert_ids;
    bool routing_changed = false;
    const auto loss = [&] {
      const auto r = layer.forward(x, options);
      routing_changed = routing_changed || r.routing.expert_ids != ids;
      return (output_weight.array() * r.output.array()).sum() + r.losses.total();
    };
    auto gradients = layer.make_gradients();
    const MatrixD d_x = layer.backward(result, output_weight, gradients);
    const auto checks = planned_reference::check_every_gradient(layer, loss, x, d_x, gradients);
    if (routing_changed) continue;  // too close to a decision boundary: another input
    checked = true;
    for (const auto& [name, check] : checks) {
      EXPECT_LT(check.worst_relative_error, 1e-6) << name << ": " << check;
      if (name == "input" || name == "router.weight") {
        EXPECT_GT(check.max_abs_analytic, 1e-4) << name << " gradient is (nearly) zero";
      }
    }
  }
  EXPECT_TRUE(checked) << "no input away from routing decision boundaries in 20 draws";
}

TEST(LayerWithTopKRouters, GradientsMatchFiniteDifferences) {
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 7;
  options.balance_loss_weight = 0.1;
  options.z_loss_weight = 0.01;
  {
    sparsemoe::SoftmaxTopKRouterOptions o;
    o.k = 2;
    o.normalize_top_k = true;
    o.scale = 2.5;
    o.use_bias = true;
    sparsemoe::SoftmaxTopKRouter<double> router(5, 6, o);
    router.initialize_uniform(31);
    router.tensors()[1].data[2] = 0.3;  // a non-zero bias
    check_layer_gradients(router, 2, options, "softmax, renormalised, scaled, bias");
  }
  {
    sparsemoe::SoftmaxTopKRouterOptions o;
    o.k = 2;
    o.num_groups = 3;
    o.top_groups = 2;
    sparsemoe::SoftmaxTopKRouter<double> router(5, 6, o);
    router.initialize_uniform(32);
    check_layer_gradients(router, 2, options, "softmax, grouped (DeepSeek-V2), not renormalised");
  }
  {
    sparsemoe::SigmoidTopKRouterOptions o;
    o.k = 2;
    o.num_groups = 3;
    o.top_groups = 2;
    o.scale = 2.5;
    sparsemoe::SigmoidTopKRouter<double> router(5, 6, o);
    router.initialize_uniform(33);
    router.selection_bias() = random_matrix(6, 1, 34, 0.2);
    auto sigmoid_options = options;
    sigmoid_options.balance_loss.normalize_scores = true;
    check_layer_gradients(router, 2, sigmoid_options, "sigmoid, grouped, selection bias (DeepSeek-V3)");
  }
  {
    sparsemoe::SwitchRouterOptions o;
    o.jitter_epsilon = 0.01;
    o.seed = 5;
    sparsemoe::SwitchRouter<double> router(5, 6, o);
    router.initialize_uniform(35);
    check_layer_gradients(router, 1, options, "switch with input jitter");
  }
  {
    sparsemoe::GShardRouterOptions o;
    o.seed = 6;
    sparsemoe::GShardRouter<double> router(5, 6, o);
    router.initialize_uniform(36);
    auto gshard_options = options;
    gshard_options.balance_loss.counts = sparsemoe::BalanceCounts::first_slot;
    check_layer_gradients(router, 2, gshard_options, "gshard, random second expert", /*expect_dropped=*/true);
  }
}

// A dense MoE (every expert, weighted by the softmax over all E) is the softmax router with
// k = E and no renormalisation: y = Σ_i softmax(x·W_r)_i·E_i(x). Forward against a naive sum over
// every expert, gradients by finite differences.
TEST(LayerWithSoftmaxRouter, DenseMoEIsKEqualsE) {
  sparsemoe::SoftmaxTopKRouterOptions dense;
  dense.k = 7;  // every one of the reference layer's 7 experts: y = Σ_i p_i·E_i(x)
  expect_softmax_layer_matches_reference(dense, 0.0);
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = 4;
  sparsemoe::SoftmaxTopKRouter<double> router(5, 4, router_options);
  router.initialize_uniform(71);
  sparsemoe::ForwardOptions training;
  training.mode = Mode::training;
  training.balance_loss_weight = 0;
  check_layer_gradients(router, 4, training, "dense: softmax with k = E");
}

// The always-on shared expert (DeepSeekMoE, Qwen2-MoE), with and without Qwen2-MoE's sigmoid
// gate σ(x·w_shared), beside the noisy gate and a top-k router: its tensors and the gate's weight
// get their gradients by finite differences too.
TEST(LayerWithSharedExpert, GradientsMatchFiniteDifferences) {
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 4;
  options.balance_loss_weight = 0.05;
  sparsemoe::SoftmaxTopKRouterOptions o;
  o.k = 2;
  o.normalize_top_k = true;
  o.scale = 2.0;
  sparsemoe::SoftmaxTopKRouter<double> router(5, 6, o);
  router.initialize_uniform(51);
  check_layer_gradients(router, 2, options, "softmax + shared expert", false, 7, false);
  check_layer_gradients(router, 2, options, "softmax + gated shared expert (Qwen2-MoE)", false, 7, true);
  check_layer_gradients<sparsemoe::SoftmaxTopKRouter<double>, sparsemoe::SwiGluExpert<double>>(
      router, 2, options, "softmax + gated SwiGLU shared expert", false, 3, true);
  sparsemoe::NoisyTopKGate<double> gate(5, 6, 2, 0.01, 52);
  gate.initialize_uniform(53);
  check_layer_gradients(gate, 2, options, "noisy top-k + gated shared expert", false, 7, true);
}

TEST(LayerWithSharedExpert, ForwardAddsTheGatedSharedExpertToEveryToken) {
  sparsemoe::MoEConfig config = layer_config(6, 5, 4, 2, 61);
  config.shared_hidden_dim = 9;
  config.shared_expert_gate = true;
  sparsemoe::MoELayer<double, ExpertD> with_shared(config);
  with_shared.gate().initialize_uniform(62);
  // The same routed part without the shared expert: copy the router and the experts over.
  sparsemoe::MoELayer<double, ExpertD> routed_only(layer_config(6, 5, 4, 2, 61));
  routed_only.gate() = with_shared.gate();
  for (Index e = 0; e < 4; ++e) routed_only.expert(e) = with_shared.expert(e);
  const MatrixD x = random_matrix(50, 6, 63);
  const auto y = with_shared.forward(x).output;
  const auto y_routed = routed_only.forward(x).output;
  for (Index t = 0; t < 50; ++t) {
    const double gate = 1.0 / (1.0 + std::exp(-x.row(t).dot(with_shared.shared_expert_gate().transpose())));
    const std::vector<double> shared = naive_expert(with_shared.shared_expert(), x, t);
    for (Index i = 0; i < 6; ++i) {
      EXPECT_NEAR(y(t, i), y_routed(t, i) + gate * shared[static_cast<std::size_t>(i)], 1e-12) << t << "," << i;
    }
  }
  EXPECT_EQ(with_shared.tensors().back().name, "shared_expert_gate");
  sparsemoe::MoEConfig bad = config;
  bad.shared_hidden_dim = 0;
  EXPECT_THROW(sparsemoe::MoELayer<double>{bad}, std::invalid_argument);  // a gate without an expert
}

TEST(LayerWithSharedExpert, BitwiseIdenticalForAnyThreadCountAndSmallBatches) {
  for (const Index tokens : {1, 3, 300}) {  // 1 and 3 tokens take the column-split path
    sparsemoe::MoEConfig config = layer_config(16, 24, 4, 1, 71);
    config.shared_hidden_dim = 40;
    config.shared_expert_gate = true;
    sparsemoe::MoELayer<float> layer(config);
    layer.gate().initialize_uniform(72);
    const sparsemoe::Matrix<float> x = random_matrix(tokens, 16, 73).cast<float>();
    const sparsemoe::Matrix<float> d_y = random_matrix(tokens, 16, 74).cast<float>();
    sparsemoe::ForwardOptions options;
    options.mode = Mode::training;
    options.step = 2;
    std::vector<sparsemoe::Matrix<float>> outputs, d_xs;
    std::vector<sparsemoe::Vector<float>> d_gates;
    for (const int threads : router_reference::thread_counts()) {
      router_reference::ScopedThreads scope(threads);
      const auto result = layer.forward(x, options);
      auto gradients = layer.make_gradients();
      d_xs.push_back(layer.backward(result, d_y, gradients));
      outputs.push_back(result.output);
      d_gates.push_back(gradients.shared_expert_gate);
    }
    for (std::size_t i = 1; i < outputs.size(); ++i) {
      EXPECT_TRUE(router_reference::same(outputs[i], outputs[0])) << tokens;
      EXPECT_TRUE(router_reference::same(d_xs[i], d_xs[0])) << tokens;
      EXPECT_TRUE(router_reference::same(d_gates[i], d_gates[0])) << tokens;
    }
  }
}

TEST(LayerWithTopKRouters, DroppedSlotsContributeNothing) {
  sparsemoe::GShardRouterOptions o;
  o.seed = 9;
  sparsemoe::GShardRouter<float> router(8, 4, o);
  router.initialize_uniform(10);
  sparsemoe::MoELayer<float, sparsemoe::Expert<float>, sparsemoe::GShardRouter<float>> layer(
      layer_config(8, 16, 4, 2, 11), router);
  const sparsemoe::Matrix<float> x = random_matrix(64, 8, 12).cast<float>();
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 3;
  const auto result = layer.forward(x, options);
  ASSERT_GT(result.plan.dropped_slots, 0) << "the test needs dropped second experts";
  EXPECT_EQ(result.plan.num_rows(), 64 * 2 - result.plan.dropped_slots);
  for (Index t = 0; t < 64; ++t) {
    // The token's output is exactly that of its dispatched slots, run one token at a time.
    sparsemoe::Matrix<float> expected = sparsemoe::Matrix<float>::Zero(1, 8);
    for (Index j = 0; j < 2; ++j) {
      const Index e = result.routing.expert_ids(t, j);
      if (e < 0) {
        EXPECT_EQ(result.routing.gates(t, j), 0.0f);
        continue;
      }
      const auto& expert = layer.expert(e);
      sparsemoe::Matrix<float> hidden = x.row(t) * expert.w1();
      hidden.row(0) += expert.b1().transpose();
      hidden = hidden.cwiseMax(0.0f);
      sparsemoe::Matrix<float> out = hidden * expert.w2();
      out.row(0) += expert.b2().transpose();
      expected += result.routing.gates(t, j) * out;
    }
    EXPECT_LT((result.output.row(t) - expected).cwiseAbs().maxCoeff(), 1e-5f) << t;
  }
}

TEST(LayerWithTopKRouters, BitwiseIdenticalForAnyThreadCount) {
  sparsemoe::SigmoidTopKRouterOptions o;
  o.k = 4;
  o.num_groups = 4;
  o.top_groups = 2;
  o.scale = 2.5;
  sparsemoe::SigmoidTopKRouter<float> router(32, 16, o);
  router.initialize_uniform(40);
  sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>, sparsemoe::SigmoidTopKRouter<float>> layer(
      layer_config(32, 48, 16, 4, 41), router);
  const sparsemoe::Matrix<float> x = random_matrix(700, 32, 42).cast<float>();
  const sparsemoe::Matrix<float> d_y = random_matrix(700, 32, 43).cast<float>();
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.z_loss_weight = 1e-3;
  std::vector<sparsemoe::Matrix<float>> outputs, d_xs, d_weights;
  for (const int threads : router_reference::thread_counts()) {
    router_reference::ScopedThreads scope(threads);
    options.step = 1;
    const auto result = layer.forward(x, options);
    auto gradients = layer.make_gradients();
    d_xs.push_back(layer.backward(result, d_y, gradients));
    outputs.push_back(result.output);
    d_weights.push_back(gradients.weight);
  }
  for (std::size_t i = 1; i < outputs.size(); ++i) {
    EXPECT_TRUE(router_reference::same(outputs[i], outputs[0]));
    EXPECT_TRUE(router_reference::same(d_xs[i], d_xs[0]));
    EXPECT_TRUE(router_reference::same(d_weights[i], d_weights[0]));
  }
}

TEST(LayerWithTopKRouters, RouterOfOtherSizesIsRejected) {
  sparsemoe::SoftmaxTopKRouterOptions o;
  o.k = 2;
  using Layer = sparsemoe::MoELayer<float, sparsemoe::Expert<float>, sparsemoe::SoftmaxTopKRouter<float>>;
  EXPECT_THROW(Layer(layer_config(8, 4, 5, 2, 1), sparsemoe::SoftmaxTopKRouter<float>(8, 6, o)), std::invalid_argument);
  EXPECT_THROW(Layer(layer_config(8, 4, 6, 3, 1), sparsemoe::SoftmaxTopKRouter<float>(8, 6, o)), std::invalid_argument);
  EXPECT_THROW(Layer(layer_config(7, 4, 6, 2, 1), sparsemoe::SoftmaxTopKRouter<float>(8, 6, o)), std::invalid_argument);
  EXPECT_NO_THROW(Layer(layer_config(8, 4, 6, 2, 1), sparsemoe::SoftmaxTopKRouter<float>(8, 6, o)));
}

}  // namespace
