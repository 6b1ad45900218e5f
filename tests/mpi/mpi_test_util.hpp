// SPDX-License-Identifier: MIT
// Helpers of the MPI tests: the rank and size of MPI_COMM_WORLD, and a global batch that every
// rank can generate in full from one seed (so that each rank can run the single-process
// reference on the concatenated batch and compare its own slice).
#ifndef SPARSEMOE_TESTS_MPI_TEST_UTIL_HPP
#define SPARSEMOE_TESTS_MPI_TEST_UTIL_HPP

#include <sparsemoe/config.hpp>

#include <mpi.h>

#include <cstdint>
#include <random>
#include <vector>

namespace sparsemoe_test {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// Tokens of each rank: `per_rank[r]`, and the first global row of each rank.
struct Split {
  std::vector<sparsemoe::Index> tokens;
  std::vector<sparsemoe::Index> first;
  sparsemoe::Index total = 0;

  explicit Split(const std::vector<sparsemoe::Index>& per_rank) : tokens(per_rank) {
    for (const sparsemoe::Index count : per_rank) {
      first.push_back(total);
      total += count;
    }
  }
  sparsemoe::Index mine() const { return tokens[static_cast<std::size_t>(world_rank())]; }
  sparsemoe::Index my_first() const { return first[static_cast<std::size_t>(world_rank())]; }
};

/// Uneven token counts for `ranks` ranks from `seed`, each in [0, max_tokens], a multiple of
/// `multiple`; rank `empty_rank` (if in range) gets none.
inline Split uneven_split(int ranks, sparsemoe::Index max_tokens, std::uint64_t seed, int empty_rank = -1,
                          sparsemoe::Index multiple = 1) {
  std::mt19937_64 random(seed);
  std::vector<sparsemoe::Index> counts;
  for (int r = 0; r < ranks; ++r) {
    const auto units = static_cast<sparsemoe::Index>(random() % static_cast<std::uint64_t>(max_tokens / multiple + 1));
    counts.push_back(r == empty_rank ? 0 : units * multiple);
  }
  return Split(counts);
}

/// A T×d matrix of uniform values in [-1, 1) from `seed` (the same on every rank).
template <typename Scalar>
sparsemoe::Matrix<Scalar> random_matrix(sparsemoe::Index rows, sparsemoe::Index cols, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  sparsemoe::Matrix<Scalar> matrix(rows, cols);
  for (sparsemoe::Index i = 0; i < matrix.size(); ++i) matrix.data()[i] = static_cast<Scalar>(uniform(random));
  return matrix;
}

/// |a − b| ≤ tolerance·max(1, |b|), elementwise; false on a shape mismatch.
template <typename A, typename B>
bool near(const A& a, const B& b, double tolerance) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (sparsemoe::Index i = 0; i < a.rows(); ++i) {
    for (sparsemoe::Index j = 0; j < a.cols(); ++j) {
      const double x = static_cast<double>(a(i, j)), y = static_cast<double>(b(i, j));
      if (!(std::abs(x - y) <= tolerance * std::max(1.0, std::abs(y)))) return false;
    }
  }
  return true;
}

}  // namespace sparsemoe_test

#endif  // SPARSEMOE_TESTS_MPI_TEST_UTIL_HPP
