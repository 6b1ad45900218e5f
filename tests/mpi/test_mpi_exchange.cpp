// SPDX-License-Identifier: MIT
// The expert exchange (distributed/exchange.hpp) under mpirun -np 1..4: every rank generates the
// routing of ALL ranks from one seed, so each rank can compute by naive loops which rows it must
// receive, in which order, and what must come back.
#include <sparsemoe/distributed/exchange.hpp>

#include "mpi_test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::IndexMatrix;
using sparsemoe::Matrix;

using sparsemoe_test::world_rank;
using sparsemoe_test::world_size;

/// The global batch: per rank its tokens' expert ids (T_r×k; distinct per token, −1 sometimes).
struct Global {
  std::vector<IndexMatrix> ids;
};

enum class Shape { random, empty_rank, one_owner, skewed };

Global make_global(int ranks, Index experts, Index k, Shape shape, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  Global global;
  for (int r = 0; r < ranks; ++r) {
    Index tokens = static_cast<Index>(random() % 23);
    if (shape == Shape::empty_rank && r == ranks / 2) tokens = 0;
    IndexMatrix ids(tokens, k);
    for (Index t = 0; t < tokens; ++t) {
      std::vector<Index> pool;
      for (Index e = 0; e < experts; ++e) pool.push_back(e);
      if (shape == Shape::one_owner) pool.resize(static_cast<std::size_t>(std::max<Index>(k, experts / ranks)));
      for (Index j = 0; j < k; ++j) {
        const std::size_t pick = static_cast<std::size_t>(random() % (pool.size() - static_cast<std::size_t>(j)));
        std::swap(pool[static_cast<std::size_t>(j) + pick], pool[static_cast<std::size_t>(j)]);
        ids(t, j) = pool[static_cast<std::size_t>(j)];
        if (shape == Shape::skewed && random() % 5 == 0) ids(t, j) = -1;
      }
    }
    global.ids.push_back(ids);
  }
  return global;
}

/// Row content of (source rank, token, slot), column c: exact small integers.
template <typename Scalar>
Scalar content(int source, Index token, Index slot, Index column) {
  return static_cast<Scalar>(((source * 64 + token) * 8 + slot) * 16 + column % 16);
}

template <typename Scalar>
void check_exchange(Index experts, Index k, Index width, Shape shape, std::uint64_t seed) {
  const int rank = world_rank(), ranks = world_size();
  const Global global = make_global(ranks, experts, k, shape, seed);
  const sparsemoe::ExpertPlacement placement(experts, ranks);
  const IndexMatrix& ids = global.ids[static_cast<std::size_t>(rank)];
  const sparsemoe::DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, experts);
  Matrix<Scalar> local(plan.num_rows(), width);
  for (Index row = 0; row < plan.num_rows(); ++row) {
    for (Index c = 0; c < width; ++c) local(row, c) = content<Scalar>(rank, plan.token_of_row[row], plan.slot_of_row[row], c);
  }
  sparsemoe::ExpertExchangePlan exchange;
  sparsemoe::plan_expert_exchange(plan, placement, MPI_COMM_WORLD, exchange);
  Matrix<Scalar> expert_rows, staging;
  sparsemoe::exchange_to_experts<Scalar>(exchange, local, expert_rows, staging, MPI_COMM_WORLD);

  // Naive reference: for each of my experts, each source, each of its tokens ascending, the slots
  // that chose the expert.
  const Index first = placement.first_expert(rank), mine = placement.num_local_experts(rank);
  Matrix<Scalar> expected(0, width);
  std::vector<Index> expected_offsets{0};
  std::vector<Scalar> rows;
  Index count = 0;
  for (Index m = 0; m < mine; ++m) {
    for (int s = 0; s < ranks; ++s) {
      const IndexMatrix& source_ids = global.ids[static_cast<std::size_t>(s)];
      for (Index t = 0; t < source_ids.rows(); ++t) {
        for (Index j = 0; j < k; ++j) {
          if (source_ids(t, j) != first + m) continue;
          for (Index c = 0; c < width; ++c) rows.push_back(content<Scalar>(s, t, j, c));
          ++count;
        }
      }
    }
    expected_offsets.push_back(count);
  }
  expected = Eigen::Map<Matrix<Scalar>>(rows.data(), count, width);
  EXPECT_EQ(exchange.num_local_experts(), mine);
  for (Index m = 0; m <= mine && exchange.num_local_experts() == mine; ++m) {
    EXPECT_EQ(exchange.offsets[m], expected_offsets[static_cast<std::size_t>(m)]) << m;
  }
  EXPECT_EQ(expert_rows.rows(), count);
  EXPECT_EQ(expert_rows.cols(), width);
  if (expert_rows.rows() == count) {
    EXPECT_TRUE(expert_rows == expected) << "rank " << rank;
  }

  // Reverse (whatever happened above: every rank must take part in the collective): each expert transforms its rows (2·x + global expert id); every local grouped row
  // must come back transformed by the expert it was sent to.
  Matrix<Scalar> transformed = expert_rows;
  for (Index m = 0; m < exchange.num_local_experts(); ++m) {
    for (Index i = exchange.offsets[m]; i < exchange.offsets[m + 1]; ++i) {
      transformed.row(i) = transformed.row(i) * Scalar(2);
      transformed.row(i).array() += static_cast<Scalar>(first + m);
    }
  }
  Matrix<Scalar> back;
  sparsemoe::exchange_from_experts<Scalar>(exchange, transformed, back, staging, MPI_COMM_WORLD);
  EXPECT_EQ(back.rows(), plan.num_rows());
  for (Index row = 0; row < std::min(back.rows(), plan.num_rows()); ++row) {
    const Index expert = ids(plan.token_of_row[row], plan.slot_of_row[row]);
    for (Index c = 0; c < width; ++c) {
      const Scalar want = Scalar(2) * content<Scalar>(rank, plan.token_of_row[row], plan.slot_of_row[row], c) +
                          static_cast<Scalar>(expert);
      EXPECT_EQ(back(row, c), want) << "rank " << rank << " row " << row << " column " << c;
    }
  }
}

TEST(ExpertPlacement, ContiguousBalancedBlocks) {
  for (int ranks = 1; ranks <= 5; ++ranks) {
    for (Index experts = 1; experts <= 9; ++experts) {
      const sparsemoe::ExpertPlacement placement(experts, ranks);
      EXPECT_EQ(placement.first_expert(0), 0);
      EXPECT_EQ(placement.first_expert(ranks), experts);
      Index largest = 0;
      for (int r = 0; r < ranks; ++r) {
        const Index n = placement.num_local_experts(r);
        EXPECT_GE(n, experts / ranks);
        EXPECT_LE(n, (experts + ranks - 1) / ranks);
        largest = std::max(largest, n);
        for (Index e = placement.first_expert(r); e < placement.first_expert(r + 1); ++e) EXPECT_EQ(placement.owner(e), r);
      }
      EXPECT_EQ(placement.max_local_experts(), largest);
    }
  }
  EXPECT_THROW(sparsemoe::ExpertPlacement(0, 2), std::invalid_argument);
  EXPECT_THROW(sparsemoe::ExpertPlacement(4, 0), std::invalid_argument);
}

TEST(ExpertExchange, RandomRoutingFloat) { check_exchange<float>(8, 2, 5, Shape::random, 11); }
TEST(ExpertExchange, RandomRoutingDouble) { check_exchange<double>(8, 3, 3, Shape::random, 12); }
TEST(ExpertExchange, UnevenSplit) { check_exchange<float>(7, 2, 4, Shape::random, 13); }
TEST(ExpertExchange, FewerExpertsThanRanks) { check_exchange<double>(3, 2, 2, Shape::random, 14); }
TEST(ExpertExchange, RankWithoutTokens) { check_exchange<float>(8, 2, 4, Shape::empty_rank, 15); }
TEST(ExpertExchange, AllTokensToOneRanksExperts) { check_exchange<float>(8, 2, 4, Shape::one_owner, 16); }
TEST(ExpertExchange, UndispatchedSlots) { check_exchange<double>(6, 2, 1, Shape::skewed, 17); }

TEST(ExpertExchange, RejectsAPlanOfAnotherShape) {
  const sparsemoe::ExpertPlacement placement(4, world_size() + 1);
  IndexMatrix ids(1, 1);
  ids(0, 0) = 0;
  const sparsemoe::DispatchPlan plan = sparsemoe::build_dispatch_plan(ids, 4);
  sparsemoe::ExpertExchangePlan exchange;
  EXPECT_THROW(sparsemoe::plan_expert_exchange(plan, placement, MPI_COMM_WORLD, exchange), std::invalid_argument);
}

}  // namespace
