// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Hash routing (router/hash.hpp) and HashMoELayer (hash_layer.hpp):
//   * the hash against the documented formula, re-derived here (splitmix64's finaliser of
//     (id ⊕ seed) + (a + 1)·γ, mod E, skipping experts a token already has);
//   * the balanced table against a naive greedy (ids by frequency, experts sorted by load) and a
//     case worked by hand;
//   * the layer's output against y_t = (1/k)·Σ_j E_{h_j}(x_t) with naive experts;
//   * every gradient (input, every expert tensor) by central finite differences in double; no
//     router tensors;
//   * bitwise identical forward and backward for 1, 2 and 3 OpenMP threads;
//   * bad input rejected with std::invalid_argument naming the value.
#include <sparsemoe/hash_layer.hpp>

#include "planned_reference.hpp"
#include "router_reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using planned_reference::MatrixD;
using planned_reference::random_matrix;
using planned_reference::throws_naming;
using sparsemoe::HashRouter;
using sparsemoe::HashRouterOptions;
using sparsemoe::HashRouting;
using sparsemoe::Index;
using sparsemoe::IndexMatrix;
using sparsemoe::IndexVector;
using sparsemoe::Mode;

HashRouterOptions hash_options(Index k, std::uint64_t seed = 0) {
  HashRouterOptions options;
  options.k = k;
  options.seed = seed;
  return options;
}

/// The documented hash, written out: splitmix64's output function applied to
/// (id xor seed) + (a + 1)·0x9E3779B97F4A7C15.
std::uint64_t documented_hash(std::uint64_t id, std::uint64_t seed, std::uint64_t a) {
  std::uint64_t x = (id ^ seed) + (a + 1) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

/// The k experts of `id`: draws a = 0, 1, … mod E, keeping the first k distinct ones.
std::vector<Index> documented_experts(std::uint64_t id, std::uint64_t seed, Index experts, Index k) {
  std::vector<Index> chosen;
  for (std::uint64_t a = 0; static_cast<Index>(chosen.size()) < k; ++a) {
    const auto e = static_cast<Index>(documented_hash(id, seed, a) % static_cast<std::uint64_t>(experts));
    if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
  }
  return chosen;
}

TEST(HashRouter, FollowsTheDocumentedHash) {
  for (const Index experts : {1, 2, 5, 16}) {
    for (Index k = 1; k <= std::min<Index>(experts, 4); ++k) {
      for (const std::uint64_t seed : {0ull, 12345ull}) {
        SCOPED_TRACE("E=" + std::to_string(experts) + " k=" + std::to_string(k) + " seed=" + std::to_string(seed));
        const HashRouter<float> router(experts, hash_options(k, seed));
        IndexVector ids(50);
        for (Index t = 0; t < ids.size(); ++t) ids[t] = (t * 7919) % 1000 + (t == 49 ? (Index(1) << 40) : 0);
        HashRouting<float> r;
        router.route(ids, r);
        ASSERT_EQ(r.expert_ids.rows(), ids.size());
        ASSERT_EQ(r.expert_ids.cols(), k);
        for (Index t = 0; t < ids.size(); ++t) {
          const std::vector<Index> expected =
              documented_experts(static_cast<std::uint64_t>(ids[t]), seed, experts, k);
          for (Index j = 0; j < k; ++j) {
            EXPECT_EQ(r.expert_ids(t, j), expected[static_cast<std::size_t>(j)]) << "token " << t << " slot " << j;
            EXPECT_EQ(r.gates(t, j), 1.0f / static_cast<float>(k));
          }
        }
      }
    }
  }
}

TEST(HashRouter, SpreadsIdsRoughlyEvenly) {
  const Index experts = 8;
  const HashRouter<double> router(experts, hash_options(2));
  IndexVector ids(8000);
  std::iota(ids.data(), ids.data() + ids.size(), Index(0));
  HashRouting<double> r;
  router.route(ids, r);
  std::vector<Index> load(static_cast<std::size_t>(experts), 0);
  for (Index t = 0; t < ids.size(); ++t) {
    EXPECT_NE(r.expert_ids(t, 0), r.expert_ids(t, 1));
    for (Index j = 0; j < 2; ++j) ++load[static_cast<std::size_t>(r.expert_ids(t, j))];
  }
  for (const Index count : load) EXPECT_NEAR(static_cast<double>(count), 2000.0, 200.0);  // ~4.5 σ
}

/// The greedy of build_balanced_hash_table, written with full sorts.
IndexMatrix naive_balanced_table(const IndexVector& frequencies, Index experts, Index k) {
  std::vector<Index> ids(static_cast<std::size_t>(frequencies.size()));
  std::iota(ids.begin(), ids.end(), Index(0));
  std::sort(ids.begin(), ids.end(), [&](Index a, Index b) {
    return frequencies[a] != frequencies[b] ? frequencies[a] > frequencies[b] : a < b;
  });
  std::vector<Index> load(static_cast<std::size_t>(experts), 0);
  IndexMatrix table(frequencies.size(), k);
  for (const Index id : ids) {
    std::vector<Index> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), Index(0));
    std::sort(order.begin(), order.end(), [&](Index a, Index b) {
      const Index la = load[static_cast<std::size_t>(a)], lb = load[static_cast<std::size_t>(b)];
      return la != lb ? la < lb : a < b;
    });
    for (Index j = 0; j < k; ++j) table(id, j) = order[static_cast<std::size_t>(j)];
    for (Index j = 0; j < k; ++j) load[static_cast<std::size_t>(table(id, j))] += frequencies[id];
  }
  return table;
}

TEST(BalancedHashTable, MatchesANaiveGreedyAndAWorkedCase) {
  // Frequencies 5, 3, 3, 1 on two experts: id 0 → e0 (loads 5, 0), id 1 → e1 (5, 3),
  // id 2 → e1 (5, 6), id 3 → e0 (6, 6).
  IndexVector worked(4);
  worked << 5, 3, 3, 1;
  const IndexMatrix table = sparsemoe::build_balanced_hash_table(worked, 2, 1);
  ASSERT_EQ(table.rows(), 4);
  EXPECT_EQ(table(0, 0), 0);
  EXPECT_EQ(table(1, 0), 1);
  EXPECT_EQ(table(2, 0), 1);
  EXPECT_EQ(table(3, 0), 0);
  std::mt19937_64 generator(7);
  std::uniform_int_distribution<Index> zipf_like(0, 1000);
  for (const Index experts : {3, 8}) {
    for (Index k = 1; k <= 3; ++k) {
      IndexVector frequencies(200);
      for (Index v = 0; v < frequencies.size(); ++v) frequencies[v] = zipf_like(generator) / (v + 1);
      EXPECT_EQ(sparsemoe::build_balanced_hash_table(frequencies, experts, k), naive_balanced_table(frequencies, experts, k))
          << "E=" << experts << " k=" << k;
    }
  }
}

TEST(HashRouter, RoutesByATable) {
  IndexVector frequencies(6);
  frequencies << 10, 1, 7, 7, 0, 3;
  HashRouter<double> router(3, hash_options(2));
  const IndexMatrix table = sparsemoe::build_balanced_hash_table(frequencies, 3, 2);
  router.set_table(table);
  IndexVector ids(5);
  ids << 4, 0, 5, 0, 2;
  HashRouting<double> r;
  router.route(ids, r);
  for (Index t = 0; t < ids.size(); ++t) {
    for (Index j = 0; j < 2; ++j) EXPECT_EQ(r.expert_ids(t, j), table(ids[t], j));
  }
  ids[3] = 6;
  EXPECT_TRUE(throws_naming([&] { router.route(ids, r); }, {"token id 6", "position 3", "[0, 6)"}));
  router.set_table(IndexMatrix());
  router.route(ids, r);  // back to hashing: any id ≥ 0
  EXPECT_EQ(r.expert_ids(3, 0), documented_experts(6, 0, 3, 2)[0]);
}

TEST(HashRouter, RejectsBadInput) {
  EXPECT_TRUE(throws_naming([] { HashRouter<float>(4, hash_options(0)); }, {"k must be in [1, num_experts = 4]", "0"}));
  EXPECT_TRUE(throws_naming([] { HashRouter<float>(4, hash_options(5)); }, {"k must be", "5"}));
  EXPECT_TRUE(throws_naming([] { HashRouter<float>(0, hash_options(1)); }, {"num_experts", "0"}));
  HashRouter<float> router(4, hash_options(2));
  HashRouting<float> r;
  IndexVector ids(3);
  ids << 3, -7, 1;
  EXPECT_TRUE(throws_naming([&] { router.route(ids, r); }, {"token id -7", "position 1", "negative"}));
  IndexMatrix table(2, 2);
  table << 0, 1, 2, 2;
  EXPECT_TRUE(throws_naming([&] { router.set_table(table); }, {"row 1", "expert 2 twice"}));
  table << 0, 1, 2, 4;
  EXPECT_TRUE(throws_naming([&] { router.set_table(table); }, {"row 1", "expert 4"}));
  EXPECT_TRUE(throws_naming([&] { router.set_table(IndexMatrix::Zero(2, 3)); }, {"k = 2 columns", "3"}));
  IndexVector frequencies(3);
  frequencies << 4, -1, 2;
  EXPECT_TRUE(throws_naming([&] { sparsemoe::build_balanced_hash_table(frequencies, 4, 1); }, {"id 1", "-1"}));
  EXPECT_TRUE(throws_naming([&] { sparsemoe::build_balanced_hash_table(frequencies.cwiseAbs(), 4, 5); }, {"k must", "5"}));
}

// ---------------------------------------------------------------------------------------------
// The layer.

using ExpertD = planned_reference::ExpertD;
using LayerD = sparsemoe::HashMoELayer<double, ExpertD>;

sparsemoe::HashMoEConfig layer_config(Index d, Index h, Index experts, Index k, std::uint64_t seed) {
  auto config = planned_reference::layer_sizes<sparsemoe::HashMoEConfig>(d, h, experts, seed);
  config.router.k = k;
  config.router.seed = seed + 1;
  return config;
}

IndexVector some_ids(Index tokens, std::uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::uniform_int_distribution<Index> vocabulary(0, 50000);
  IndexVector ids(tokens);
  for (Index t = 0; t < tokens; ++t) ids[t] = vocabulary(generator);
  return ids;
}

TEST(HashMoELayer, ForwardMatchesANaiveReference) {
  const Index d = 6, h = 5, experts = 5, tokens = 40;
  for (Index k = 1; k <= 3; ++k) {
    const LayerD layer(layer_config(d, h, experts, k, 3));
    const MatrixD x = random_matrix(tokens, d, 4);
    const IndexVector ids = some_ids(tokens, 5);
    const auto result = layer.forward(x, ids);
    for (Index t = 0; t < tokens; ++t) {
      std::vector<double> y(static_cast<std::size_t>(d), 0.0);
      for (const Index e : documented_experts(static_cast<std::uint64_t>(ids[t]), 4, experts, k)) {
        const std::vector<double> out = planned_reference::naive_expert(layer.expert(e), x, t);
        const double gate = 1.0 / static_cast<double>(k);
        for (Index i = 0; i < d; ++i) y[static_cast<std::size_t>(i)] += gate * out[static_cast<std::size_t>(i)];
      }
      for (Index i = 0; i < d; ++i) EXPECT_NEAR(result.output(t, i), y[static_cast<std::size_t>(i)], 1e-12) << k;
    }
    EXPECT_EQ(result.plan.num_rows(), tokens * k);
  }
}

TEST(HashMoELayer, GradientsMatchFiniteDifferences) {
  LayerD layer(layer_config(5, 4, 4, 2, 31));
  const IndexVector ids = some_ids(12, 32);
  const auto forward = [&](const MatrixD& x) {
    sparsemoe::PlannedForwardOptions options;
    options.mode = Mode::training;
    return layer.forward(x, ids, options);
  };
  const auto names = planned_reference::expect_gradients_match(layer, 12, 5, 33, forward);
  for (std::size_t i = 1; i < names.size(); ++i) EXPECT_EQ(names[i].rfind("expert", 0), 0u) << names[i];
  EXPECT_EQ(names.size(), 1u + 4u * 4u);  // the input, then w1, b1, w2, b2 of 4 experts
}

TEST(HashMoELayer, BitwiseIdenticalForAnyThreadCount) {
  using Layer = sparsemoe::HashMoELayer<float, sparsemoe::SwiGluExpert<float>>;
  Layer layer(layer_config(16, 24, 8, 2, 41));
  const sparsemoe::Matrix<float> x = random_matrix(3000, 16, 42).cast<float>();
  const sparsemoe::Matrix<float> d_y = random_matrix(3000, 16, 43).cast<float>();
  const IndexVector ids = some_ids(3000, 44);
  planned_reference::expect_bitwise_across_threads([&] {
    sparsemoe::PlannedForwardOptions options;
    options.mode = Mode::training;
    const auto result = layer.forward(x, ids, options);
    auto gradients = layer.make_gradients();
    const sparsemoe::Matrix<float> d_x = layer.backward(result, d_y, gradients);
    std::vector<MatrixD> list{result.output.cast<double>(), d_x.cast<double>()};
    planned_reference::append_tensors(list, gradients.tensors());
    return list;
  });
}

TEST(HashMoELayer, EmptyBatchAndOneExpert) {
  sparsemoe::PlannedForwardOptions options;
  options.mode = Mode::training;
  const LayerD empty_layer(layer_config(4, 3, 3, 2, 91));
  const auto empty = empty_layer.forward(MatrixD::Zero(0, 4), IndexVector(), options);
  EXPECT_EQ(empty.output.rows(), 0);
  auto gradients = empty_layer.make_gradients();
  EXPECT_EQ(empty_layer.backward(empty, MatrixD::Zero(0, 4), gradients).rows(), 0);
  const LayerD single(layer_config(4, 3, 1, 1, 92));  // every token to expert 0, gate 1
  const MatrixD x = random_matrix(5, 4, 93);
  const auto result = single.forward(x, some_ids(5, 94), options);
  for (Index t = 0; t < 5; ++t) {
    const std::vector<double> out = planned_reference::naive_expert(single.expert(0), x, t);
    for (Index i = 0; i < 4; ++i) EXPECT_NEAR(result.output(t, i), out[static_cast<std::size_t>(i)], 1e-12);
  }
}

TEST(HashMoELayer, RejectsBadInput) {
  EXPECT_TRUE(throws_naming([] { LayerD(layer_config(4, 3, 2, 3, 1)); }, {"k must be", "3"}));
  EXPECT_TRUE(throws_naming([] { LayerD(layer_config(4, 3, 2, 0, 1)); }, {"k must be", "0"}));
  const LayerD layer(layer_config(4, 3, 3, 2, 1));
  const MatrixD x = random_matrix(5, 4, 2);
  EXPECT_TRUE(throws_naming([&] { layer.forward(x, IndexVector()); }, {"token_ids", "(5)", "got 0"}));
  EXPECT_TRUE(throws_naming([&] { layer.forward(x, some_ids(4, 3)); }, {"token_ids", "got 4"}));
  IndexVector ids = some_ids(5, 3);
  ids[2] = -1;
  EXPECT_TRUE(throws_naming([&] { layer.forward(x, ids); }, {"token id -1", "position 2"}));
  ids[2] = 9;
  EXPECT_TRUE(throws_naming([&] { layer.forward(MatrixD::Zero(5, 3), ids); }, {"4 columns", "5x3"}));
  MatrixD bad = x;
  bad(1, 3) = std::nan("");
  EXPECT_TRUE(throws_naming([&] { layer.forward(bad, ids); }, {"non-finite", "row 1", "column 3"}));
  auto gradients = layer.make_gradients();
  EXPECT_TRUE(throws_naming([&] { layer.backward(layer.forward(x, ids), MatrixD::Zero(5, 4), gradients); }, {"no cache"}));
}

}  // namespace
