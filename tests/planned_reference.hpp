// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Shared pieces of the layer tests (MoELayer with routers and capacity, ExpertChoiceLayer,
// HashMoELayer): a naive SiLU expert in double, random inputs, the finite-difference check of every gradient of
// L = Σ(W ⊙ y) through the input and every tensor of a layer, and the bitwise comparison of a
// forward + backward over 1, 2 and 3 OpenMP threads. Nothing here calls the code under test
// except through the layer's public forward/backward/tensors.
#ifndef SPARSEMOE_TESTS_PLANNED_REFERENCE_HPP
#define SPARSEMOE_TESTS_PLANNED_REFERENCE_HPP

#include "gradient_check.hpp"
#include "router_reference.hpp"

#include <sparsemoe/expert.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace planned_reference {

using sparsemoe::Index;
using MatrixD = sparsemoe::Matrix<double>;
using ExpertD = sparsemoe::Expert<double, sparsemoe::Silu>;

/// i.i.d. U(−scale, scale) entries from a fixed seed.
inline MatrixD random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 generator(seed);
  std::uniform_real_distribution<double> uniform(-scale, scale);
  MatrixD m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = uniform(generator);
  return m;
}

/// A layer config (MoEConfig, ExpertChoiceConfig, HashMoEConfig) with d, h, E and the seed set.
template <typename Config>
Config layer_sizes(Index d, Index h, Index experts, std::uint64_t seed) {
  Config config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = experts;
  config.seed = seed;
  return config;
}

/// E(x) = silu(x·W1 + b1)·W2 + b2 of one token row, by loops in double.
inline std::vector<double> naive_expert(const ExpertD& expert, const MatrixD& x, Index token) {
  const Index d = expert.input_dim(), h = expert.hidden_dim();
  std::vector<double> hidden(static_cast<std::size_t>(h)), out(static_cast<std::size_t>(d));
  for (Index j = 0; j < h; ++j) {
    double a = expert.b1()(j);
    for (Index i = 0; i < d; ++i) a += x(token, i) * expert.w1()(i, j);
    hidden[static_cast<std::size_t>(j)] = a / (1.0 + std::exp(-a));
  }
  for (Index i = 0; i < d; ++i) {
    double o = expert.b2()(i);
    for (Index j = 0; j < h; ++j) o += hidden[static_cast<std::size_t>(j)] * expert.w2()(j, i);
    out[static_cast<std::size_t>(i)] = o;
  }
  return out;
}

/// Finite-difference checks of ∂L/∂x (named "input") and of every tensor of `layer` against the
/// analytic gradients `d_x` and `gradients` (whose tensors() must list the same names in the
/// same order). `loss()` evaluates L at the current x and parameters.
template <typename Layer, typename Loss, typename Gradients>
std::vector<std::pair<std::string, sparsemoe_test::GradientCheckResult>> check_every_gradient(
    Layer& layer, const Loss& loss, MatrixD& x, const MatrixD& d_x, Gradients& gradients) {
  std::vector<std::pair<std::string, sparsemoe_test::GradientCheckResult>> checks;
  checks.emplace_back("input", sparsemoe_test::check_gradient(loss, x, d_x));
  auto parameters = layer.tensors();
  auto gradient_views = gradients.tensors();
  EXPECT_EQ(parameters.size(), gradient_views.size());
  for (std::size_t t = 0; t < parameters.size() && t < gradient_views.size(); ++t) {
    EXPECT_EQ(parameters[t].name, gradient_views[t].name);
    checks.emplace_back(parameters[t].name, sparsemoe_test::check_gradient(loss, parameters[t], gradient_views[t]));
  }
  return checks;
}

/// Checks ∂L/∂x and ∂L/∂(every tensor) of L = Σ(W ⊙ y) against central finite differences in
/// double, on a tokens×d input drawn from `seed`. `forward(x)` runs a training-mode forward of
/// the layer on x and returns the result. The check is meaningless across a routing decision:
/// where a perturbation changes result.routing.expert_ids, the input is redrawn (up to 20 times;
/// the test fails if no draw is far enough from every decision). Returns the names checked.
template <typename Layer, typename Forward>
std::vector<std::string> expect_gradients_match(Layer& layer, Index tokens, Index d, std::uint64_t seed,
                                                const Forward& forward) {
  const MatrixD output_weight = random_matrix(tokens, d, 977);
  for (std::uint64_t attempt = 0; attempt < 20; ++attempt) {
    MatrixD x = random_matrix(tokens, d, seed + attempt);
    const auto result = forward(x);
    bool routing_changed = false;
    const auto loss = [&] {
      const auto r = forward(x);
      routing_changed = routing_changed || r.routing.expert_ids != result.routing.expert_ids;
      return (output_weight.array() * r.output.array()).sum();
    };
    auto gradients = layer.make_gradients();
    const MatrixD d_x = layer.backward(result, output_weight, gradients);
    const auto checks = check_every_gradient(layer, loss, x, d_x, gradients);
    if (routing_changed) continue;
    std::vector<std::string> names;
    for (const auto& [name, check] : checks) {
      EXPECT_LT(check.worst_relative_error, 1e-6) << name << ": " << check;
      names.push_back(name);
    }
    EXPECT_GT(checks.front().second.max_abs_analytic, 1e-4) << "input gradient is (nearly) zero";
    return names;
  }
  ADD_FAILURE() << "no input away from routing decisions in 20 draws";
  return {};
}

/// Runs `run()` (a forward and backward returning a vector of matrices: output, ∂x, gradients)
/// with 1, 2 and 3 OpenMP threads, twice each, and expects every matrix bitwise equal to the
/// first run's.
template <typename Run>
void expect_bitwise_across_threads(const Run& run) {
  std::vector<MatrixD> first;
  {
    router_reference::ScopedThreads threads(1);
    first = run();
  }
  for (const int threads : router_reference::thread_counts()) {
    for (int repeat = 0; repeat < 2; ++repeat) {
      SCOPED_TRACE(std::to_string(threads) + " thread(s), repeat " + std::to_string(repeat));
      router_reference::ScopedThreads scoped(threads);
      const std::vector<MatrixD> again = run();
      ASSERT_EQ(again.size(), first.size());
      for (std::size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(router_reference::same(again[i], first[i])) << i;
    }
  }
}

/// Every tensor of `views` as a double matrix (for expect_bitwise_across_threads).
template <typename Scalar>
void append_tensors(std::vector<MatrixD>& list, const std::vector<sparsemoe::TensorView<Scalar>>& views) {
  for (const auto& view : views) list.push_back(view.matrix().template cast<double>());
}

/// Whether `call` throws std::invalid_argument whose message contains every one of `parts`.
template <typename Call>
::testing::AssertionResult throws_naming(const Call& call, const std::vector<std::string>& parts) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const std::string& part : parts) {
      if (message.find(part) == std::string::npos) {
        return ::testing::AssertionFailure() << "message \"" << message << "\" does not name \"" << part << "\"";
      }
    }
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no std::invalid_argument";
}

}  // namespace planned_reference

#endif  // SPARSEMOE_TESTS_PLANNED_REFERENCE_HPP
