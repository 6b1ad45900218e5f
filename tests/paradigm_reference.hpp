// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Helpers shared by the tests of the Soft MoE and hierarchical MoE layers: a naive expert in
// double (explicit loops, the activation written here), a scoped OpenMP thread count, and a
// bitwise comparison of tensor lists. Nothing here calls the code under test.
#ifndef SPARSEMOE_TESTS_PARADIGM_REFERENCE_HPP
#define SPARSEMOE_TESTS_PARADIGM_REFERENCE_HPP

#include <sparsemoe/expert.hpp>
#include <sparsemoe/parameters.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace paradigm_reference {

using sparsemoe::Index;
using MatrixD = sparsemoe::Matrix<double>;

/// relu(x·W1 + b1)·W2 + b2 for one row x (1×d), in double, by explicit loops.
template <typename Scalar, typename Row>
std::vector<double> relu_expert(const sparsemoe::Expert<Scalar, sparsemoe::Relu>& expert, const Row& x) {
  const Index d = expert.input_dim();
  const Index h = expert.hidden_dim();
  std::vector<double> hidden(static_cast<std::size_t>(h));
  for (Index j = 0; j < h; ++j) {
    double sum = static_cast<double>(expert.b1()[j]);
    for (Index i = 0; i < d; ++i) sum += static_cast<double>(x[i]) * static_cast<double>(expert.w1()(i, j));
    hidden[static_cast<std::size_t>(j)] = std::max(sum, 0.0);
  }
  std::vector<double> out(static_cast<std::size_t>(d));
  for (Index i = 0; i < d; ++i) {
    double sum = static_cast<double>(expert.b2()[i]);
    for (Index j = 0; j < h; ++j) sum += hidden[static_cast<std::size_t>(j)] * static_cast<double>(expert.w2()(j, i));
    out[static_cast<std::size_t>(i)] = sum;
  }
  return out;
}

/// Sets the OpenMP thread count for a scope (a no-op without OpenMP).
class ThreadCount {
 public:
#ifdef _OPENMP
  explicit ThreadCount(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ThreadCount() { omp_set_num_threads(saved_); }

 private:
  int saved_;
#else
  explicit ThreadCount(int) {}
#endif
};

/// Copies of the bytes of each tensor of a list, with its name.
template <typename Scalar>
std::vector<std::pair<std::string, std::vector<Scalar>>> snapshot(const std::vector<sparsemoe::TensorView<Scalar>>& list) {
  std::vector<std::pair<std::string, std::vector<Scalar>>> result;
  for (const auto& view : list) result.emplace_back(view.name, std::vector<Scalar>(view.data, view.data + view.size()));
  return result;
}

/// Whether two matrices have the same shape and the same bits.
template <typename A, typename B>
bool bitwise_equal(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  const auto plain_a = a.eval();
  const auto plain_b = b.eval();
  return std::memcmp(plain_a.data(), plain_b.data(), static_cast<std::size_t>(plain_a.size()) * sizeof(plain_a(0, 0))) == 0;
}

/// Runs `run(threads)` for 1, 2 and 3 OpenMP threads; it returns a list of named matrices (every
/// number a forward and backward produced), which must be bitwise equal for every thread count.
template <typename Scalar, typename Run>
void expect_identical_across_thread_counts(const Run& run) {
  using Named = std::vector<std::pair<std::string, std::vector<Scalar>>>;
  Named first;
  for (const int threads : {1, 2, 3}) {
    ThreadCount scope(threads);
    const Named current = run();
    if (threads == 1) {
      first = current;
      continue;
    }
    ASSERT_EQ(current.size(), first.size());
    for (std::size_t i = 0; i < current.size(); ++i) {
      EXPECT_TRUE(current[i] == first[i]) << current[i].first << " differs with " << threads << " threads";
    }
  }
}

/// Runs `run(i)` for i = 0..3 one after the other, then all four at once on std::threads (one
/// shared layer, each call with its own data): the concurrent results must be bitwise the serial
/// ones. Under ThreadSanitizer this is the data-race check of "one layer serves many threads".
template <typename Scalar, typename Run>
void expect_concurrent_calls_match_serial(const Run& run) {
  using Named = std::vector<std::pair<std::string, std::vector<Scalar>>>;
  constexpr int calls = 4;
  std::vector<Named> serial(calls), concurrent(calls);
  for (int i = 0; i < calls; ++i) serial[static_cast<std::size_t>(i)] = run(i);
  std::vector<std::thread> threads;
  for (int i = 0; i < calls; ++i) {
    threads.emplace_back([&, i] { concurrent[static_cast<std::size_t>(i)] = run(i); });
  }
  for (auto& thread : threads) thread.join();
  for (int i = 0; i < calls; ++i) {
    EXPECT_TRUE(concurrent[static_cast<std::size_t>(i)] == serial[static_cast<std::size_t>(i)]) << "call " << i;
  }
}

/// Appends the entries of a dense matrix to a named list (for expect_identical_across_thread_counts).
template <typename Derived>
void append(std::vector<std::pair<std::string, std::vector<typename Derived::Scalar>>>& list, std::string name,
            const Eigen::PlainObjectBase<Derived>& matrix) {
  list.emplace_back(std::move(name),
                    std::vector<typename Derived::Scalar>(matrix.data(), matrix.data() + matrix.size()));
}

/// Every number of one forward and backward: the gradient tensors, the output and ∂L/∂x.
template <typename Gradients, typename Output, typename InputGradient>
auto step_record(Gradients& gradients, const Output& output, const InputGradient& d_input) {
  auto named = snapshot(gradients.tensors());
  append(named, "output", output);
  append(named, "d_input", d_input);
  return named;
}

}  // namespace paradigm_reference

#endif  // SPARSEMOE_TESTS_PARADIGM_REFERENCE_HPP
