// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_HASH_HPP
#define SPARSEMOE_ROUTER_HASH_HPP

/// \file hash.hpp
/// Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a token's experts
/// are a fixed function of its integer id (a vocabulary index, say), not of its activations. No
/// parameters, no gradient, no balance loss. HashMoELayer (hash_layer.hpp) runs it with experts.

#include "../config.hpp"
#include "../detail/parallel.hpp"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// Options of HashRouter.
struct HashRouterOptions {
  /// Experts per token, 1 ≤ k ≤ E; each gets the gate 1/k.
  Index k = 1;
  /// Mixed into every hash: routers with different seeds route the same id differently.
  std::uint64_t seed = 0;
};

/// What a HashRouter decided for T tokens: k distinct experts per token, each with gate 1/k.
template <typename Scalar>
struct HashRouting {
  IndexMatrix expert_ids;  ///< T×k: the experts of each token, in hash order (see HashRouter)
  Matrix<Scalar> gates;    ///< T×k: 1/k everywhere

  /// Number of tokens T.
  Index num_tokens() const { return expert_ids.rows(); }
  /// Slots per token k.
  Index k() const { return expert_ids.cols(); }
};

/// The a-th hash of token id `id` under `seed`: the splitmix64 finaliser of
/// (id ⊕ seed) + (a + 1)·0x9E3779B97F4A7C15 (mod 2^64), that is the (a+1)-th output of a
/// splitmix64 generator started at id ⊕ seed. Fixed forever (checkpoints and trained models rely
/// on it); O(1).
inline std::uint64_t token_hash(std::uint64_t id, std::uint64_t seed, std::uint64_t a) {
  std::uint64_t z = (id ^ seed) + (a + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The "balanced hash" of Roller et al.: a table (V×k) that sends id v to k distinct experts,
/// built greedily from how often each id occurs (frequencies[v] ≥ 0, V entries, e.g. counted over
/// the training data). Ids are taken by descending frequency (ties: the lower id first); each goes
/// to the k experts with the least load so far (ties: the lower expert id), listed by ascending
/// load, and adds its frequency to their loads. So the most frequent ids are spread first and the
/// expected number of tokens per expert is as even as this greedy rule makes it.
///
/// Throws std::invalid_argument naming the value unless E ≥ 1, 1 ≤ k ≤ E and every frequency is
/// ≥ 0. Cost: O(V log V + V·E·k), memory O(V·k + E).
inline IndexMatrix build_balanced_hash_table(const Eigen::Ref<const IndexVector>& frequencies, Index num_experts,
                                             Index k) {
  const char* function = "sparsemoe::build_balanced_hash_table";
  detail::require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
  detail::require(k >= 1 && k <= num_experts, function, "k must be in [1, num_experts = ", num_experts, "], got ", k);
  const Index vocabulary = frequencies.size();
  for (Index id = 0; id < vocabulary; ++id) {
    detail::require(frequencies[id] >= 0, function, "the frequency of id ", id, " is negative: ", frequencies[id]);
  }
  std::vector<Index> order(static_cast<std::size_t>(vocabulary));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return frequencies[a] > frequencies[b]; });
  std::vector<Index> load(static_cast<std::size_t>(num_experts), 0);
  IndexMatrix table(vocabulary, k);
  for (const Index id : order) {
    Index* chosen = table.row(id).data();
    for (Index slot = 0; slot < k; ++slot) {
      Index best = -1;
      for (Index expert = 0; expert < num_experts; ++expert) {
        if (std::find(chosen, chosen + slot, expert) != chosen + slot) continue;
        if (best < 0 || load[static_cast<std::size_t>(expert)] < load[static_cast<std::size_t>(best)]) best = expert;
      }
      chosen[slot] = best;
    }
    for (Index slot = 0; slot < k; ++slot) load[static_cast<std::size_t>(chosen[slot])] += frequencies[id];
  }
  return table;
}

/// Hash router over E experts: token t with id v goes to k distinct experts, each with gate 1/k.
///
/// Without a table (the default), slot j's expert is the first of token_hash(v, seed, a) mod E,
/// a = 0, 1, 2, …, that no earlier slot of the token holds; after 64·E draws without a new expert
/// (which practically never happens) the lowest expert id not yet held is taken, so the k experts
/// are always distinct and the rule is deterministic. With a table (set_table(), e.g. from
/// build_balanced_hash_table), token id v goes to the experts table(v, 0..k−1), and ids outside
/// [0, V) are rejected.
///
/// No parameters (tensors() is empty), no gradient: backward through the layer reaches the
/// experts and the input only. Cost of route: O(T·k²) (O(T·k) with a table).
///
/// \tparam Scalar_ float or double: the scalar of the gates.
template <typename Scalar_>
class HashRouter {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The options type the constructor takes.
  using Options = HashRouterOptions;

  /// Builds a router; throws std::invalid_argument naming the value unless 1 ≤ E < 2^32 and
  /// 1 ≤ k ≤ E.
  HashRouter(Index num_experts, const Options& options = {}) : num_experts_(num_experts), options_(options) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::HashRouter";
    detail::require(num_experts >= 1 && num_experts <= Index(0xFFFFFFFF), function,
                    "num_experts must be in [1, 2^32), got ", num_experts);
    detail::require(options.k >= 1 && options.k <= num_experts, function, "k must be in [1, num_experts = ",
                    num_experts, "], got ", options.k);
  }

  /// Number of experts E.
  Index num_experts() const { return num_experts_; }
  /// Experts per token.
  Index k() const { return options_.k; }
  /// The options the router was built with.
  const Options& options() const { return options_; }

  /// Routes by `table` (V×k, row v the k distinct experts of id v, each in [0, E)) from now on;
  /// an empty table returns to hashing. Throws std::invalid_argument naming the row and the value
  /// for a table of another width, an expert out of range or an expert twice in one row. O(V·k²).
  void set_table(IndexMatrix table) {
    const char* function = "sparsemoe::HashRouter::set_table";
    if (table.size() > 0) {
      detail::require(table.cols() == k(), function, "the table must have k = ", k(), " columns, got ", table.cols());
      for (Index id = 0; id < table.rows(); ++id) {
        for (Index slot = 0; slot < k(); ++slot) {
          const Index expert = table(id, slot);
          detail::require(expert >= 0 && expert < num_experts_, function, "table row ", id, " names expert ", expert,
                          ", outside [0, ", num_experts_, ")");
          for (Index earlier = 0; earlier < slot; ++earlier) {
            detail::require(table(id, earlier) != expert, function, "table row ", id, " names expert ", expert,
                            " twice");
          }
        }
      }
    }
    table_ = std::move(table);
  }
  /// The id → experts table (V×k), empty when routing by hash.
  const IndexMatrix& table() const { return table_; }

  /// Routes T tokens by their ids (T entries, each ≥ 0, and < V with a table) into `routing`,
  /// reusing its storage. Throws std::invalid_argument naming the position and the value of the
  /// first id that is negative (or outside the table).
  void route(const Eigen::Ref<const IndexVector>& token_ids, HashRouting<Scalar>& routing) const {
    const char* function = "sparsemoe::HashRouter::route";
    const Index tokens = token_ids.size();
    const Index vocabulary = table_.rows();
    for (Index t = 0; t < tokens; ++t) {
      detail::require(token_ids[t] >= 0, function, "token id ", token_ids[t], " at position ", t, " is negative");
      detail::require(table_.size() == 0 || token_ids[t] < vocabulary, function, "token id ", token_ids[t],
                      " at position ", t, " is outside the table's [0, ", vocabulary, ")");
    }
    const Index k = this->k();
    routing.expert_ids.resize(tokens, k);
    routing.gates.setConstant(tokens, k, Scalar(1) / static_cast<Scalar>(k));
    detail::parallel_for(tokens, static_cast<double>(8 * k * k), [&](Index t) {
      Index* ids = routing.expert_ids.row(t).data();
      if (table_.size() > 0) {
        for (Index slot = 0; slot < k; ++slot) ids[slot] = table_(token_ids[t], slot);
        return;
      }
      hash_experts(static_cast<std::uint64_t>(token_ids[t]), ids);
    });
  }

 private:
  /// The k distinct experts of one id (see the class comment).
  void hash_experts(std::uint64_t id, Index* ids) const {
    const auto experts = static_cast<std::uint64_t>(num_experts_);
    const std::uint64_t max_draws = 64 * experts;
    std::uint64_t draw = 0;
    for (Index slot = 0; slot < k(); ++slot) {
      Index expert = -1;
      while (expert < 0 && draw < max_draws) {
        const auto candidate = static_cast<Index>(token_hash(id, options_.seed, draw++) % experts);
        if (std::find(ids, ids + slot, candidate) == ids + slot) expert = candidate;
      }
      for (Index fallback = 0; expert < 0; ++fallback) {
        if (std::find(ids, ids + slot, fallback) == ids + slot) expert = fallback;
      }
      ids[slot] = expert;
    }
  }

  Index num_experts_;
  Options options_;
  IndexMatrix table_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_HASH_HPP
