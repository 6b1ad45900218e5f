// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Expert-parallel training over MPI: one MoE layer (softmax top-k router, ReLU experts) whose
// experts are spread over the ranks, trained with Adam on a synthetic regression task (inputs
// from 8 Gaussian clusters, each cluster's target a different map tanh(x·A_c)·B_c). Each step
// draws one global batch; rank r trains on its share of the tokens, its experts serve the rows
// that every rank routes to them, and the router's gradient is summed over the ranks.
//
//   mpirun -np 4 build/examples/train_distributed [--steps N] [--batch N] [--experts N] [--k N]
//                                                 [--hidden N] [--lr X] [--seed N] [--no-check]
//
// (as root, Open MPI also wants --allow-run-as-root; more ranks than cores, --oversubscribe.)
// Rank 0 prints, every 10 steps, the global loss (mean squared error over the whole batch plus
// the balance loss) and the rows each rank's experts processed in that step. At the end every
// rank also trains a single-process MoELayer on the whole batches (unless --no-check) and rank 0
// prints how far the two runs are apart: the same numbers up to the order of a few sums.

#include <sparsemoe/distributed.hpp>
#include <sparsemoe/sparsemoe.hpp>

#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using sparsemoe::Index;
using Scalar = double;
using Matrix = sparsemoe::Matrix<Scalar>;
using Router = sparsemoe::SoftmaxTopKRouter<Scalar>;
using ExpertType = sparsemoe::Expert<Scalar, sparsemoe::Relu>;

constexpr Index input_dim = 16;
constexpr Index clusters = 8;

struct Options {
  Index steps = 100;
  Index batch = 512;  ///< tokens per step over all ranks
  Index experts = 8;
  Index k = 2;
  Index hidden = 32;
  double learning_rate = 3e-3;
  std::uint64_t seed = 1;
  bool check = true;
};

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string name = argv[i];
    if (name == "--no-check") {
      options.check = false;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument("missing value after " + name);
    const std::string value = argv[++i];
    if (name == "--steps") options.steps = std::stol(value);
    else if (name == "--batch") options.batch = std::stol(value);
    else if (name == "--experts") options.experts = std::stol(value);
    else if (name == "--k") options.k = std::stol(value);
    else if (name == "--hidden") options.hidden = std::stol(value);
    else if (name == "--lr") options.learning_rate = std::stod(value);
    else if (name == "--seed") options.seed = std::stoull(value);
    else throw std::invalid_argument("unknown option " + name);
  }
  if (options.steps < 1 || options.batch < 1) throw std::invalid_argument("--steps and --batch must be >= 1");
  return options;
}

/// The task: cluster centres and each cluster's map, from the seed (the same on every rank).
struct Task {
  Matrix centres, a, b;  // C×d; C·d×d; C·d×d

  explicit Task(std::uint64_t seed) {
    std::mt19937_64 random(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    centres.resize(clusters, input_dim);
    a.resize(clusters * input_dim, input_dim);
    b.resize(clusters * input_dim, input_dim);
    for (Index i = 0; i < centres.size(); ++i) centres.data()[i] = 2.0 * normal(random);
    for (Index i = 0; i < a.size(); ++i) a.data()[i] = normal(random) / std::sqrt(double(input_dim));
    for (Index i = 0; i < b.size(); ++i) b.data()[i] = normal(random) / std::sqrt(double(input_dim));
  }

  /// The whole batch of `step` (every rank draws the same one and keeps its share).
  void batch(Index tokens, std::uint64_t seed, Index step, Matrix& x, Matrix& target) const {
    std::mt19937_64 random(seed * 1000003u + static_cast<std::uint64_t>(step));
    std::normal_distribution<double> normal(0.0, 0.5);
    x.resize(tokens, input_dim);
    target.resize(tokens, input_dim);
    for (Index t = 0; t < tokens; ++t) {
      const Index c = static_cast<Index>(random() % clusters);
      for (Index j = 0; j < input_dim; ++j) x(t, j) = centres(c, j) + normal(random);
      const Matrix hidden = (x.row(t) * a.middleRows(c * input_dim, input_dim)).array().tanh().matrix();
      target.row(t) = hidden * b.middleRows(c * input_dim, input_dim);
    }
  }
};

Router make_router(const Options& options) {
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = options.k;
  router_options.normalize_top_k = true;
  Router router(input_dim, options.experts, router_options);
  router.initialize_uniform(options.seed + 17);  // the same on every rank
  return router;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  int status = 0;
  try {
    const Options options = parse(argc, argv);
    sparsemoe::MoEConfig config{input_dim, options.hidden, options.experts, options.k};
    config.seed = options.seed;
    sparsemoe::DistributedMoELayer<Scalar, ExpertType, Router> layer(config, make_router(options), MPI_COMM_WORLD);
    sparsemoe::AdamOptions adam;
    adam.learning_rate = options.learning_rate;
    sparsemoe::Adam<Scalar> optimizer(adam);
    sparsemoe::ForwardOptions forward_options;
    forward_options.mode = sparsemoe::Mode::training;
    // This rank's share of each global batch: tokens [first, first + mine).
    const Index first = options.batch * rank / ranks;
    const Index mine = options.batch * (rank + 1) / ranks - first;
    if (rank == 0) {
      std::printf("%d ranks, %ld experts (rank r holds experts [%ld, %ld) ...), %ld tokens per step\n", ranks,
                  static_cast<long>(options.experts), static_cast<long>(layer.placement().first_expert(0)),
                  static_cast<long>(layer.placement().first_expert(1)), static_cast<long>(options.batch));
    }

    const Task task(options.seed);
    Matrix x, target;
    auto gradients = layer.make_gradients();
    double final_loss = 0;
    for (Index step = 0; step < options.steps; ++step) {
      task.batch(options.batch, options.seed, step, x, target);
      const auto result = layer.forward(x.middleRows(first, mine), forward_options);
      // MSE over the GLOBAL batch: this rank's sum of squares, summed over the ranks.
      const Matrix error = result.output - target.middleRows(first, mine);
      double squares[1] = {error.squaredNorm()};
      sparsemoe::sum_over_ranks(squares, 1, MPI_COMM_WORLD);
      const double scale = 1.0 / static_cast<double>(options.batch * input_dim);
      const double loss = squares[0] * scale + static_cast<double>(result.losses.total());
      gradients.set_zero();
      layer.backward(result, (2.0 * scale) * error, gradients);
      optimizer.step(layer.tensors(), gradients.tensors());
      final_loss = loss;
      if (step % 10 == 0 || step + 1 == options.steps) {
        // Rows each rank's experts processed in this step, gathered on rank 0.
        long rows = static_cast<long>(result.exchange.num_expert_rows());
        std::vector<long> load(static_cast<std::size_t>(ranks));
        MPI_Gather(&rows, 1, MPI_LONG, load.data(), 1, MPI_LONG, 0, MPI_COMM_WORLD);
        if (rank == 0) {
          std::printf("step %4ld  loss %.6f  balance %.5f  rows per rank:", static_cast<long>(step), loss,
                      static_cast<double>(result.losses.balance));
          for (const long count : load) std::printf(" %ld", count);
          std::printf("\n");
        }
      }
    }

    if (options.check) {
      // The same training in one process over the whole batches.
      sparsemoe::MoELayer<Scalar, ExpertType, Router> single(config, make_router(options));
      sparsemoe::Adam<Scalar> single_optimizer(adam);
      auto single_gradients = single.make_gradients();
      double single_loss = 0;
      for (Index step = 0; step < options.steps; ++step) {
        task.batch(options.batch, options.seed, step, x, target);
        const auto result = single.forward(x, forward_options);
        const Matrix error = result.output - target;
        const double scale = 1.0 / static_cast<double>(options.batch * input_dim);
        single_loss = error.squaredNorm() * scale + static_cast<double>(result.losses.total());
        single_gradients.set_zero();
        single.backward(result, (2.0 * scale) * error, single_gradients);
        single_optimizer.step(single.tensors(), single_gradients.tensors());
      }
      double difference[1] = {0.0};
      for (Index e = layer.first_local_expert(); e < layer.first_local_expert() + layer.num_local_experts(); ++e) {
        difference[0] = std::max(difference[0], (layer.expert(e).w1() - single.expert(e).w1()).cwiseAbs().maxCoeff());
      }
      double largest[1] = {0.0};
      MPI_Allreduce(difference, largest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      if (rank == 0) {
        std::printf("final loss: %d ranks %.12f, one process %.12f; largest |difference| of an expert weight %.3g\n",
                    ranks, final_loss, single_loss, largest[0]);
      }
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %d: %s\n", rank, error.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
