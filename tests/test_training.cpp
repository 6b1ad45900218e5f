// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Training smoke test: an MoELayer trained end to end (forward, MSE, backward, Adam) on a tiny
// synthetic task learns it, and the auxiliary losses keep the load balanced.

#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using sparsemoe::Index;
using Scalar = float;
using Matrix = sparsemoe::Matrix<Scalar>;

constexpr Index input_dim = 8;
constexpr Index hidden_dim = 16;
constexpr Index num_experts = 4;
constexpr Index k = 2;
constexpr Index batch = 64;
constexpr Index clusters = 4;
constexpr Index map_width = 8;

/// Inputs from `clusters` Gaussian clusters (centres N(0, I), spread 0.5); the target of a token
/// of cluster c is tanh(x·A_c)·B_c with fixed random A_c, B_c.
class Task {
 public:
  explicit Task(std::uint64_t seed) : engine_(seed) {
    std::normal_distribution<double> normal(0.0, 1.0);
    centers_.resize(clusters, input_dim);
    for (Index i = 0; i < centers_.size(); ++i) centers_.data()[i] = static_cast<Scalar>(normal(engine_));
    for (Index c = 0; c < clusters; ++c) {
      Matrix a(input_dim, map_width);
      Matrix b(map_width, input_dim);
      for (Index i = 0; i < a.size(); ++i) a.data()[i] = static_cast<Scalar>(normal(engine_) / std::sqrt(2.0));
      for (Index i = 0; i < b.size(); ++i) b.data()[i] = static_cast<Scalar>(normal(engine_) / std::sqrt(2.0));
      maps_in_.push_back(a);
      maps_out_.push_back(b);
    }
  }

  void sample(Matrix& x, Matrix& y) {
    std::uniform_int_distribution<Index> pick(0, clusters - 1);
    std::normal_distribution<double> normal(0.0, 0.5);
    for (Index t = 0; t < x.rows(); ++t) {
      const auto c = static_cast<std::size_t>(pick(engine_));
      for (Index j = 0; j < input_dim; ++j) {
        x(t, j) = centers_(static_cast<Index>(c), j) + static_cast<Scalar>(normal(engine_));
      }
      y.row(t) = (x.row(t) * maps_in_[c]).unaryExpr([](Scalar v) { return std::tanh(v); }) * maps_out_[c];
    }
  }

 private:
  std::mt19937_64 engine_;
  Matrix centers_;
  std::vector<Matrix> maps_in_;
  std::vector<Matrix> maps_out_;
};

struct TrainingRun {
  double first_loss = 0;        ///< mean training MSE over the first `window` steps
  double last_loss = 0;         ///< mean training MSE over the last `window` steps
  double held_out_before = 0;   ///< evaluation-mode MSE on a fixed batch before training
  double held_out_after = 0;    ///< the same after training
  double last_cv_squared = 0;   ///< mean CV² of the tokens per expert over the last `window` steps
};

constexpr int steps = 400;
constexpr int window = 20;

TrainingRun train(std::uint64_t seed, double importance_weight, double load_weight) {
  sparsemoe::MoEConfig config;
  config.input_dim = input_dim;
  config.hidden_dim = hidden_dim;
  config.num_experts = num_experts;
  config.k = k;
  config.seed = seed;
  sparsemoe::MoELayer<Scalar> layer(config);
  auto gradients = layer.make_gradients();
  sparsemoe::AdamOptions adam_options;
  adam_options.learning_rate = 1e-2;
  sparsemoe::Adam<Scalar> adam(adam_options);

  Task task(seed);
  Matrix held_out_x(256, input_dim);
  Matrix held_out_y(256, input_dim);
  task.sample(held_out_x, held_out_y);

  TrainingRun run;
  run.held_out_before =
      static_cast<double>(sparsemoe::mean_squared_error(layer.forward(held_out_x).output, held_out_y));
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  options.importance_weight = importance_weight;
  options.load_weight = load_weight;
  Matrix x(batch, input_dim);
  Matrix y(batch, input_dim);
  for (int step = 0; step < steps; ++step) {
    task.sample(x, y);
    options.step = static_cast<std::uint64_t>(step);
    const auto result = layer.forward(x, options);
    const double loss = static_cast<double>(sparsemoe::mean_squared_error(result.output, y));
    gradients.set_zero();
    layer.backward(result, sparsemoe::mean_squared_error_gradient(result.output, y), gradients);
    adam.step(layer.tensors(), gradients.tensors());
    if (step < window) run.first_loss += loss / window;
    if (step >= steps - window) {
      run.last_loss += loss / window;
      const Eigen::VectorXd counts = result.tokens_per_expert().cast<double>();
      run.last_cv_squared += sparsemoe::cv_squared(counts) / window;
    }
  }
  run.held_out_after =
      static_cast<double>(sparsemoe::mean_squared_error(layer.forward(held_out_x).output, held_out_y));
  return run;
}

/// One thread: at T = 64 the layer's fork/join costs more than its work, and under `ctest -j` an
/// oversubscribed OpenMP team (spin-waiting by default) can make this test 10-50 times slower.
/// Results do not depend on the thread count (the layer guarantees it), so nothing is lost.
class Training : public ::testing::Test {
 protected:
  void SetUp() override {
#ifdef _OPENMP
    saved_threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  void TearDown() override {
#ifdef _OPENMP
    omp_set_num_threads(saved_threads_);
#endif
  }

#ifdef _OPENMP
 private:
  int saved_threads_ = 1;
#endif
};

// Over seeds 1..12 (400 steps each) the training loss fell 7-20x, with or without the auxiliary
// losses; "at least half" leaves a wide margin.
TEST_F(Training, AdamHalvesTheLossOfATinyMixtureTask) {
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    const TrainingRun run = train(seed, 0.1, 0.1);
    SCOPED_TRACE(::testing::Message() << "seed " << seed << ": training loss " << run.first_loss << " -> "
                                      << run.last_loss << ", held-out " << run.held_out_before << " -> "
                                      << run.held_out_after);
    ASSERT_TRUE(std::isfinite(run.last_loss));
    EXPECT_LT(run.last_loss, 0.5 * run.first_loss);
    EXPECT_LT(run.held_out_after, 0.5 * run.held_out_before);
  }
}

// The auxiliary losses balance the load. Over seeds 1..12 the final CV² of the tokens per expert
// was 0.018-0.061 with w_importance = w_load = 0.1 and 0.029-0.215 without them (lower with them
// for every seed, though only slightly for some: seed 1 gives 0.023 vs 0.029). Multinomial
// sampling alone gives about 0.023 at T·k = 128 over E = 4. Asserted: an absolute bound of 0.1
// with them, and a lower mean over three seeds (true for every three of those twelve seeds).
TEST_F(Training, AuxiliaryLossesBalanceTheLoad) {
  double with_losses = 0;
  double without_losses = 0;
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    const TrainingRun balanced = train(seed, 0.1, 0.1);
    const TrainingRun unbalanced = train(seed, 0.0, 0.0);
    SCOPED_TRACE(::testing::Message() << "seed " << seed << ": final load CV^2 " << balanced.last_cv_squared
                                      << " with the auxiliary losses, " << unbalanced.last_cv_squared << " without");
    EXPECT_LT(balanced.last_cv_squared, 0.1);
    EXPECT_LT(unbalanced.last_loss, 0.5 * unbalanced.first_loss);  // learning works without them too
    with_losses += balanced.last_cv_squared / 3;
    without_losses += unbalanced.last_cv_squared / 3;
  }
  EXPECT_LT(with_losses, without_losses);
}

}  // namespace
