// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Concurrent use of one layer (issue 4, item 4). MoELayer::forward/backward and
// NoisyTopKGate::route are const and keep their per-call state in the caller's objects, so:
//   * 4 std::threads running evaluation-mode forward on one shared layer at once (each with its
//     own inputs of different sizes, several iterations) get bitwise the results of serial calls;
//   * the same through the into-variant forward(input, options, result, workspace) with a
//     per-thread ForwardResult / ForwardWorkspace reused across iterations;
//   * the same for training-mode forward + backward with per-thread gradients, and for the
//     standalone gate's route.
// Each thread's OpenMP regions run in their own team, so this also mixes std::threads with
// OpenMP. Under ThreadSanitizer (.ci/run) this test is the data-race check of that claim.
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe::Mode;

constexpr int kThreads = 4;
constexpr int kIterations = 4;

template <typename Scalar>
class Concurrency : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
// gtest name generator: "float" / "double" (and, with a name generator, no clang
// -Wgnu-zero-variadic-macro-arguments under -Wpedantic).
struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};
TYPED_TEST_SUITE(Concurrency, Scalars, ScalarNames);

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(dist(rng));
  return m;
}

template <typename Derived>
std::vector<unsigned char> bytes_of(const Eigen::DenseBase<Derived>& value) {
  const auto& plain = value.derived().eval();
  std::vector<unsigned char> bytes(static_cast<std::size_t>(plain.size()) * sizeof(typename Derived::Scalar));
  if (!bytes.empty()) std::memcpy(bytes.data(), plain.data(), bytes.size());
  return bytes;
}

// What one call produced, as bytes (compared bitwise).
struct Outcome {
  std::vector<std::vector<unsigned char>> parts;
  bool operator==(const Outcome& other) const { return parts == other.parts; }
};

template <typename Scalar>
Outcome outcome_of(const sparsemoe::ForwardResult<Scalar>& result) {
  return {{bytes_of(result.output), bytes_of(result.routing.expert_ids), bytes_of(result.routing.gates),
           bytes_of(result.routing.noisy_logits), bytes_of(result.plan.token_of_row),
           bytes_of(result.losses.importance), bytes_of(result.losses.load)}};
}

sparsemoe::MoEConfig layer_config() {
  sparsemoe::MoEConfig config;
  config.input_dim = 20;
  config.hidden_dim = 36;
  config.num_experts = 6;
  config.k = 2;
  config.seed = 314;
  return config;
}

// Different batch sizes per thread and iteration: some below one gate tile, some several expert tiles.
Index batch_size(int thread, int iteration) {
  static const Index sizes[] = {1, 40, 333, 64, 150, 257, 7, 200};
  return sizes[(thread * 3 + iteration) % 8];
}

template <typename Scalar>
std::vector<std::vector<Matrix<Scalar>>> make_inputs(Index dim) {
  std::vector<std::vector<Matrix<Scalar>>> inputs(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kIterations; ++i) {
      inputs[static_cast<std::size_t>(t)].push_back(
          random_matrix<Scalar>(batch_size(t, i), dim, static_cast<std::uint64_t>(100 * t + i)));
    }
  }
  return inputs;
}

// Runs body(thread) on kThreads std::threads released together, so their calls overlap.
template <typename Body>
void run_concurrently(const Body& body) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      body(t);
    });
  }
  while (ready.load() < kThreads) std::this_thread::yield();
  go.store(true);
  for (auto& thread : threads) thread.join();
}

using Outcomes = std::vector<std::vector<Outcome>>;  // [thread][iteration]

Outcomes empty_outcomes() { return Outcomes(kThreads, std::vector<Outcome>(kIterations)); }

::testing::AssertionResult all_equal(const Outcomes& expected, const Outcomes& actual) {
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kIterations; ++i) {
      const auto& e = expected[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)];
      const auto& a = actual[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)];
      if (e.parts.empty()) return ::testing::AssertionFailure() << "no serial result for " << t << "/" << i;
      if (!(e == a)) {
        return ::testing::AssertionFailure() << "thread " << t << ", iteration " << i << " (T = " << batch_size(t, i)
                                             << ") differs from the serial call";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

template <typename Layer>
Layer make_layer() {
  Layer layer(layer_config());
  layer.gate().initialize_uniform(9);
  return layer;
}

TYPED_TEST(Concurrency, EvaluationForwardFromFourThreadsMatchesSerial) {
  using Scalar = TypeParam;
  const auto layer = make_layer<sparsemoe::MoELayer<Scalar>>();
  const auto inputs = make_inputs<Scalar>(layer.input_dim());
  Outcomes serial = empty_outcomes();
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kIterations; ++i) {
      serial[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] =
          outcome_of(layer.forward(inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]));
    }
  }
  for (int round = 0; round < 2; ++round) {
    Outcomes concurrent = empty_outcomes();
    run_concurrently([&](int t) {
      for (int i = 0; i < kIterations; ++i) {
        const auto result = layer.forward(inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]);
        concurrent[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = outcome_of(result);
      }
    });
    EXPECT_TRUE(all_equal(serial, concurrent)) << "round " << round;
  }
}

TYPED_TEST(Concurrency, IntoVariantWithPerThreadStorageMatchesSerial) {
  using Scalar = TypeParam;
  const auto layer = make_layer<sparsemoe::MoELayer<Scalar, sparsemoe::SwiGluExpert<Scalar>>>();
  const auto inputs = make_inputs<Scalar>(layer.input_dim());
  sparsemoe::ForwardOptions options;  // evaluation
  Outcomes serial = empty_outcomes();
  {
    sparsemoe::ForwardResult<Scalar> result;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    for (int t = 0; t < kThreads; ++t) {
      for (int i = 0; i < kIterations; ++i) {
        layer.forward(inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)], options, result, workspace);
        serial[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = outcome_of(result);
      }
    }
  }
  Outcomes concurrent = empty_outcomes();
  run_concurrently([&](int t) {
    sparsemoe::ForwardResult<Scalar> result;        // per thread, reused across iterations
    sparsemoe::ForwardWorkspace<Scalar> workspace;  // per thread, reused across iterations
    for (int i = 0; i < kIterations; ++i) {
      layer.forward(inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)], options, result, workspace);
      concurrent[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = outcome_of(result);
    }
  });
  EXPECT_TRUE(all_equal(serial, concurrent));
}

TYPED_TEST(Concurrency, TrainingForwardBackwardWithPerThreadGradientsMatchesSerial) {
  using Scalar = TypeParam;
  using Layer = sparsemoe::MoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::GeluTanh>>;
  const auto layer = make_layer<Layer>();
  const auto inputs = make_inputs<Scalar>(layer.input_dim());
  const auto step_of = [](int t, int i) { return static_cast<std::uint64_t>(10 * t + i); };
  const auto run = [&](int t, int i, sparsemoe::ForwardResult<Scalar>& result,
                       sparsemoe::ForwardWorkspace<Scalar>& workspace) {
    const Matrix<Scalar>& x = inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)];
    sparsemoe::ForwardOptions options;
    options.mode = Mode::training;
    options.step = step_of(t, i);
    layer.forward(x, options, result, workspace);
    auto gradients = layer.make_gradients();
    const Matrix<Scalar> d_output = random_matrix<Scalar>(x.rows(), x.cols(), 7);
    const Matrix<Scalar> d_input = layer.backward(result, d_output, gradients);
    Outcome outcome = outcome_of(result);
    outcome.parts.push_back(bytes_of(d_input));
    for (const auto& tensor : gradients.tensors()) outcome.parts.push_back(bytes_of(tensor.matrix()));
    return outcome;
  };
  Outcomes serial = empty_outcomes();
  {
    sparsemoe::ForwardResult<Scalar> result;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    for (int t = 0; t < kThreads; ++t) {
      for (int i = 0; i < kIterations; ++i) {
        serial[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = run(t, i, result, workspace);
      }
    }
  }
  Outcomes concurrent = empty_outcomes();
  run_concurrently([&](int t) {
    sparsemoe::ForwardResult<Scalar> result;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    for (int i = 0; i < kIterations; ++i) {
      concurrent[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = run(t, i, result, workspace);
    }
  });
  EXPECT_TRUE(all_equal(serial, concurrent));
}

TYPED_TEST(Concurrency, GateRouteFromFourThreadsMatchesSerial) {
  using Scalar = TypeParam;
  sparsemoe::NoisyTopKGate<Scalar> gate(20, 9, 3, Scalar(1e-2), 55);
  gate.initialize_uniform(4);
  const auto inputs = make_inputs<Scalar>(gate.input_dim());
  const auto route = [&](int t, int i) {
    const auto routing = gate.route(inputs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)],
                                    i % 2 == 0 ? Mode::training : Mode::evaluation, static_cast<std::uint64_t>(i));
    return Outcome{{bytes_of(routing.expert_ids), bytes_of(routing.gates), bytes_of(routing.noisy_logits),
                    bytes_of(routing.noise)}};
  };
  Outcomes serial = empty_outcomes();
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kIterations; ++i) serial[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = route(t, i);
  }
  Outcomes concurrent = empty_outcomes();
  run_concurrently([&](int t) {
    for (int i = 0; i < kIterations; ++i) concurrent[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)] = route(t, i);
  });
  EXPECT_TRUE(all_equal(serial, concurrent));
}

}  // namespace
