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

/// Checks ∂L/∂x and ∂L/∂(every tensor) of L = Σ(W ⊙ y) against central finite differences in
/// double. `forward(x)` runs a training-mode forward of the layer on x and returns the result;
/// `same_routing(a, b)` says whether two results made the same discrete decisions (the check is
/// meaningless across a decision boundary, and fails if a perturbation crosses one). Returns the
/// names of the tensors checked.
template <typename Layer, typename Forward, typename SameRouting>
std::vector<std::string> expect_gradients_match(Layer& layer, MatrixD x, const Forward& forward,
                                                const SameRouting& same_routing) {
  const auto result = forward(x);
  const MatrixD output_weight = random_matrix(x.rows(), x.cols(), 977);
  bool routing_changed = false;
  const auto loss = [&] {
    const auto r = forward(x);
    routing_changed = routing_changed || !same_routing(r, result);
    return (output_weight.array() * r.output.array()).sum();
  };
  auto gradients = layer.make_gradients();
  const MatrixD d_x = layer.backward(result, output_weight, gradients);
  std::vector<std::string> names{"input"};
  const auto input_check = sparsemoe_test::check_gradient(loss, x, d_x);
  EXPECT_LT(input_check.worst_relative_error, 1e-6) << "input: " << input_check;
  EXPECT_GT(input_check.max_abs_analytic, 1e-4) << "input gradient is (nearly) zero";
  auto parameters = layer.tensors();
  auto gradient_views = gradients.tensors();
  EXPECT_EQ(parameters.size(), gradient_views.size());
  for (std::size_t t = 0; t < parameters.size() && t < gradient_views.size(); ++t) {
    EXPECT_EQ(parameters[t].name, gradient_views[t].name);
    const auto check = sparsemoe_test::check_gradient(loss, parameters[t], gradient_views[t]);
    EXPECT_LT(check.worst_relative_error, 1e-6) << parameters[t].name << ": " << check;
    names.push_back(parameters[t].name);
  }
  EXPECT_FALSE(routing_changed) << "a perturbation changed the routing: pick another input";
  return names;
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
