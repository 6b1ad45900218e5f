// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Independent references and helpers for the router and balance-loss tests (router.hpp,
// router/*.hpp, balance_losses.hpp). Everything here is written from the formulas, with naive
// per-token loops in double: top-k by brute force over ALL k-subsets (the unique subset whose
// every member ranks before every outsider), group scores by full sorts. Nothing here calls the
// code under test; only the Matrix / Index aliases and the records' field layout are shared.
#ifndef SPARSEMOE_TESTS_ROUTER_REFERENCE_HPP
#define SPARSEMOE_TESTS_ROUTER_REFERENCE_HPP

#include <sparsemoe/config.hpp>
#include <sparsemoe/detail/philox.hpp>

#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace router_reference {

using reference::MatrixD;
using sparsemoe::Index;

/// Whether expert a ranks before expert b: larger value first, equal values to the lower id.
inline bool ranks_first(const std::vector<double>& values, Index a, Index b) {
  const double va = values[static_cast<std::size_t>(a)];
  const double vb = values[static_cast<std::size_t>(b)];
  return va > vb || (va == vb && a < b);
}

/// Top-k by brute force: enumerates every k-subset of the allowed candidates and returns the one
/// whose every member ranks before every allowed outsider (exactly one exists), sorted by rank.
/// Exponential in E: for E ≤ 20 only. Values must not be NaN.
inline std::vector<Index> brute_force_top_k(const std::vector<double>& values, Index k,
                                            const std::vector<bool>& allowed) {
  const Index size = static_cast<Index>(values.size());
  EXPECT_LE(size, 20) << "brute_force_top_k is exponential";
  std::vector<Index> found;
  int matches = 0;
  for (std::uint32_t mask = 0; mask < (std::uint32_t{1} << size); ++mask) {
    std::vector<Index> members, outsiders;
    bool valid = true;
    for (Index i = 0; i < size; ++i) {
      const bool in = (mask >> i) & 1u;
      if (in && !allowed[static_cast<std::size_t>(i)]) valid = false;
      if (in) members.push_back(i);
      else if (allowed[static_cast<std::size_t>(i)]) outsiders.push_back(i);
    }
    if (!valid || static_cast<Index>(members.size()) != k) continue;
    bool dominates = true;
    for (Index m : members)
      for (Index o : outsiders) dominates = dominates && ranks_first(values, m, o);
    if (!dominates) continue;
    ++matches;
    found = members;
  }
  EXPECT_EQ(matches, 1) << "exactly one k-subset must dominate";
  std::sort(found.begin(), found.end(), [&](Index a, Index b) { return ranks_first(values, a, b); });
  return found;
}

/// brute_force_top_k with every candidate allowed.
inline std::vector<Index> brute_force_top_k(const std::vector<double>& values, Index k) {
  return brute_force_top_k(values, k, std::vector<bool>(values.size(), true));
}

/// How group scores are formed from the selection values of a group's members.
enum class GroupScore { max, sum_of_top_two };

/// Group score of each of `groups` groups of consecutive experts.
inline std::vector<double> group_scores(const std::vector<double>& values, Index groups, GroupScore kind) {
  const Index size = static_cast<Index>(values.size()) / groups;
  std::vector<double> scores;
  for (Index g = 0; g < groups; ++g) {
    std::vector<double> members(values.begin() + g * size, values.begin() + (g + 1) * size);
    std::sort(members.begin(), members.end(), [](double a, double b) { return a > b; });
    if (kind == GroupScore::max) scores.push_back(members[0]);
    else scores.push_back(members.size() >= 2 ? members[0] + members[1] : members[0]);
  }
  return scores;
}

/// softmax in double of a row.
inline std::vector<double> softmax(const std::vector<double>& z) { return reference::softmax(z); }

inline double logistic(double z) { return 1.0 / (1.0 + std::exp(-z)); }

/// Naive logits x·W (+ b) in double.
template <typename X, typename W, typename B>
MatrixD logits(const Eigen::MatrixBase<X>& x, const Eigen::MatrixBase<W>& w, const Eigen::MatrixBase<B>& b) {
  MatrixD z = reference::matmul(x, w);
  if (b.size() > 0)
    for (Index t = 0; t < z.rows(); ++t)
      for (Index e = 0; e < z.cols(); ++e) z(t, e) += static_cast<double>(b(e));
  return z;
}

/// The documented address of the routers' random numbers, re-derived here from Philox4x32-10
/// (itself tested against its published vectors in test_philox): counter (column, token low,
/// token high, step), key (seed low, seed high), the top 53 bits of the first two words / 2^53.
inline double philox_uniform(std::uint64_t seed, std::uint64_t step, std::uint64_t token, std::uint64_t column) {
  const auto bits = sparsemoe::detail::philox4x32_10(
      {static_cast<std::uint32_t>(column), static_cast<std::uint32_t>(token), static_cast<std::uint32_t>(token >> 32),
       static_cast<std::uint32_t>(step)},
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
  const std::uint64_t high = bits[0], low = bits[1];
  return static_cast<double>((high << 32 | low) >> 11) / 9007199254740992.0;
}

/// Same shape and bitwise equal entries.
template <typename A, typename B>
bool same(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && a == b;
}

/// Thread counts compared by the determinism tests: 1, 2, 3 with OpenMP; one run without.
inline std::vector<int> thread_counts() {
#ifdef _OPENMP
  return {1, 2, 3};
#else
  return {1};
#endif
}

/// Sets the OpenMP thread count for its lifetime and restores the previous one.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads) {
#ifdef _OPENMP
    previous_ = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    static_cast<void>(threads);
#endif
  }
  ~ScopedThreads() {
#ifdef _OPENMP
    omp_set_num_threads(previous_);
#endif
  }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int previous_ = 1;
};

}  // namespace router_reference

#endif  // SPARSEMOE_TESTS_ROUTER_REFERENCE_HPP
