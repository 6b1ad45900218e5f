// SPDX-License-Identifier: MIT
// sum_over_ranks, the agreement of argument checks, and the global balance and z-losses
// (distributed/losses.hpp) under mpirun -np 1..4, against the single-process balance_loss and
// z_loss of the concatenated batch, which every rank routes in full.
#include <sparsemoe/distributed/losses.hpp>
#include <sparsemoe/router/softmax_top_k.hpp>

#include "mpi_test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe_test::world_rank;
using sparsemoe_test::world_size;

TEST(SumOverRanks, AddsInRankOrderWithTheSameBitsEverywhere) {
  const int ranks = world_size(), rank = world_rank();
  const Index count = 37;
  // Values of every rank, known to all: large and small magnitudes, so the order matters.
  std::vector<std::vector<double>> all;
  for (int r = 0; r < ranks; ++r) {
    const Matrix<double> values = sparsemoe_test::random_matrix<double>(count, 1, 100 + static_cast<std::uint64_t>(r));
    std::vector<double> v(values.data(), values.data() + count);
    for (Index i = 0; i < count; i += 3) v[static_cast<std::size_t>(i)] *= (r % 2 == 0 ? 1e16 : 1.0);
    all.push_back(v);
  }
  std::vector<double> mine = all[static_cast<std::size_t>(rank)];
  sparsemoe::sum_over_ranks(mine.data(), count, MPI_COMM_WORLD);
  for (Index i = 0; i < count; ++i) {
    double expected = 0;
    for (int r = 0; r < ranks; ++r) expected += all[static_cast<std::size_t>(r)][static_cast<std::size_t>(i)];
    EXPECT_EQ(mine[static_cast<std::size_t>(i)], expected) << i;
  }
  std::vector<std::int64_t> counts{rank, 1, -2 * rank};
  sparsemoe::sum_over_ranks(counts.data(), 3, MPI_COMM_WORLD);
  EXPECT_EQ(counts[0], static_cast<std::int64_t>(ranks) * (ranks - 1) / 2);
  EXPECT_EQ(counts[1], ranks);
  EXPECT_EQ(counts[2], -static_cast<std::int64_t>(ranks) * (ranks - 1));
}

TEST(CheckOnAllRanks, OneRanksFailureThrowsEverywhere) {
  const int rank = world_rank(), last = world_size() - 1;
  bool threw = false;
  std::string what;
  try {
    sparsemoe::detail::check_on_all_ranks(MPI_COMM_WORLD, "test", [&] {
      sparsemoe::detail::require(rank != last, "check", "bad value ", 42);
    });
  } catch (const std::invalid_argument& error) {
    threw = true;
    what = error.what();
  }
  EXPECT_TRUE(threw);
  if (rank == last) {
    EXPECT_NE(what.find("bad value 42"), std::string::npos) << what;
  } else {
    EXPECT_NE(what.find("rank " + std::to_string(last)), std::string::npos) << what;
  }
  EXPECT_NO_THROW(sparsemoe::detail::check_on_all_ranks(MPI_COMM_WORLD, "test", [] {}));
}

/// Rows [first, first + count) of a routing.
template <typename Scalar>
sparsemoe::TopKRouting<Scalar> slice(const sparsemoe::TopKRouting<Scalar>& routing, Index first, Index count) {
  sparsemoe::TopKRouting<Scalar> part;
  part.expert_ids = routing.expert_ids.middleRows(first, count);
  part.gates = routing.gates.middleRows(first, count);
  part.logits = routing.logits.middleRows(first, count);
  part.scores = routing.scores.middleRows(first, count);
  return part;
}

template <typename Scalar>
void check_losses(const sparsemoe::BalanceLossOptions& options, Index multiple, int empty_rank, std::uint64_t seed,
                  double tolerance) {
  const Index d = 6, experts = 5, k = 2;
  const sparsemoe_test::Split split =
      sparsemoe_test::uneven_split(world_size(), 24, seed, empty_rank, multiple);
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = k;
  sparsemoe::SoftmaxTopKRouter<Scalar> router(d, experts, router_options);
  router.initialize_uniform(seed + 1);
  router.weight() *= Scalar(3);  // sharper scores
  const Matrix<Scalar> input = sparsemoe_test::random_matrix<Scalar>(split.total, d, seed + 2);
  sparsemoe::TopKRouting<Scalar> global;
  router.route(input, {}, global);
  const double alpha = 0.01, c = 0.001;

  // Reference: one process, the concatenated batch.
  const Scalar balance = sparsemoe::balance_loss(global, alpha, options);
  const Scalar z = sparsemoe::z_loss(global, c);
  sparsemoe::TopKRoutingGradient<Scalar> reference;
  reference.set_zero(global);
  sparsemoe::balance_loss_backward(global, alpha, options, reference);
  sparsemoe::z_loss_backward(global, c, reference);

  const sparsemoe::TopKRouting<Scalar> local = slice(global, split.my_first(), split.mine());
  sparsemoe::DistributedTopKLosses<Scalar> losses;
  sparsemoe::distributed_topk_losses(local, alpha, options, c, MPI_COMM_WORLD, losses);
  EXPECT_EQ(losses.global_tokens, split.total);
  EXPECT_NEAR(static_cast<double>(losses.balance), static_cast<double>(balance), tolerance * std::abs(balance));
  EXPECT_NEAR(static_cast<double>(losses.z), static_cast<double>(z), tolerance * std::abs(z));
  if (split.total > 0) {
    EXPECT_GT(losses.balance, Scalar(0));
  }
  sparsemoe::TopKRoutingGradient<Scalar> gradient;
  gradient.set_zero(local);
  sparsemoe::distributed_topk_losses_backward(local, losses, gradient);
  // The gradients depend on the global batch through exact counts only: bitwise.
  EXPECT_TRUE(gradient.scores == reference.scores.middleRows(split.my_first(), split.mine()));
  EXPECT_TRUE(gradient.logits == reference.logits.middleRows(split.my_first(), split.mine()));

  // The same bits on every rank (the value a replicated router's gradient is scaled by).
  double values[2] = {static_cast<double>(losses.balance), static_cast<double>(losses.z)};
  double lowest[2] = {0, 0}, highest[2] = {0, 0};
  MPI_Allreduce(values, lowest, 2, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(values, highest, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(lowest[0], highest[0]);
  EXPECT_EQ(lowest[1], highest[1]);
}

TEST(DistributedTopKLosses, WholeBatchFloat) { check_losses<float>({}, 1, -1, 21, 1e-6); }
TEST(DistributedTopKLosses, WholeBatchDouble) { check_losses<double>({}, 1, -1, 22, 1e-13); }
TEST(DistributedTopKLosses, RankWithoutTokens) {
  check_losses<double>({}, 1, world_size() > 1 ? 1 : -1, 23, 1e-13);
}

TEST(DistributedTopKLosses, FirstSlotNormalizedScores) {
  sparsemoe::BalanceLossOptions options;
  options.counts = sparsemoe::BalanceCounts::first_slot;
  options.normalize_scores = true;
  check_losses<double>(options, 1, -1, 24, 1e-13);
}

TEST(DistributedTopKLosses, SequenceWise) {
  sparsemoe::BalanceLossOptions options;
  options.sequence_length = 4;
  check_losses<double>(options, 4, world_size() > 1 ? 0 : -1, 25, 1e-13);
  check_losses<float>(options, 4, -1, 26, 1e-6);
}

TEST(DistributedTopKLosses, EveryRankThrowsWhenOneRanksTokensSplitBadly) {
  sparsemoe::BalanceLossOptions options;
  options.sequence_length = 4;
  const bool odd = world_rank() == world_size() - 1;
  sparsemoe::TopKRouting<double> routing;
  routing.expert_ids = sparsemoe::IndexMatrix::Zero(odd ? 3 : 4, 1);
  routing.gates = Matrix<double>::Ones(odd ? 3 : 4, 1);
  routing.logits = Matrix<double>::Zero(odd ? 3 : 4, 2);
  routing.scores = Matrix<double>::Constant(odd ? 3 : 4, 2, 0.5);
  sparsemoe::DistributedTopKLosses<double> losses;
  EXPECT_THROW(sparsemoe::distributed_topk_losses(routing, 0.01, options, 0.0, MPI_COMM_WORLD, losses),
               std::invalid_argument);
}

}  // namespace
