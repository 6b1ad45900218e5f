// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// detail::gemm against a naive triple loop in double: every transpose combination, accumulate
// on and off, alpha = 1 and alpha ≠ 1, strided operands, shapes from 1 to 200×300×500. Runs
// whichever backend this build selected (Eigen, or libxsmm with SPARSEMOE_WITH_LIBXSMM). Also
// gemm_packed over PackedWeight (as stored and transposed) with its epilogue, and PackedWeight's
// layout. test_gemm_native is the same file compiled for the build machine (-march=native), so
// that the AVX-512 transposes and streaming stores of the packing run where the CPU has them.

#include <sparsemoe/detail/gemm.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::detail::ConstOperand;
using sparsemoe::detail::Op;

// Deterministic values in [-1, 1).
double value_at(std::uint64_t seed, Index i) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i) * 0xBF58476D1CE4E5B9ull + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) / 4503599627370496.0 - 1.0;
}

template <typename Scalar>
struct Stored {
  std::vector<Scalar> data;
  Index rows, cols, stride;
  Scalar operator()(Index r, Index c) const { return data[static_cast<std::size_t>(r * stride + c)]; }
};

// A stored matrix rows×cols with row stride cols + pad, padding filled with garbage.
template <typename Scalar>
Stored<Scalar> make(Index rows, Index cols, Index pad, std::uint64_t seed) {
  Stored<Scalar> s{std::vector<Scalar>(static_cast<std::size_t>(rows * (cols + pad))), rows, cols, cols + pad};
  for (Index i = 0; i < static_cast<Index>(s.data.size()); ++i) {
    s.data[static_cast<std::size_t>(i)] = static_cast<Scalar>(value_at(seed, i));
  }
  return s;
}

template <typename Scalar>
class GemmTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};
TYPED_TEST_SUITE(GemmTest, Scalars, ScalarNames);

// `relative` > 0: the tolerance is relative·(|alpha|·Σ|x·y| + |C0|) instead of the default
// 4·eps·(k + 2)·(|alpha|·Σ|x·y| + 1).
template <typename Scalar>
void check(Index m, Index n, Index k, Op op_a, Op op_b, bool accumulate, Scalar alpha, Index pad,
           double relative = 0) {
  const bool ta = op_a == Op::transpose, tb = op_b == Op::transpose;
  const Stored<Scalar> a = ta ? make<Scalar>(k, m, pad, 1) : make<Scalar>(m, k, pad, 1);
  const Stored<Scalar> b = tb ? make<Scalar>(n, k, pad, 2) : make<Scalar>(k, n, pad, 2);
  Stored<Scalar> c = make<Scalar>(m, n, pad, 3);
  const Stored<Scalar> c0 = c;
  const ConstOperand<Scalar> oa{a.data.data(), a.rows, a.cols, a.stride, op_a};
  const ConstOperand<Scalar> ob{b.data.data(), b.rows, b.cols, b.stride, op_b};
  sparsemoe::detail::gemm(oa, ob, c.data.data(), c.stride, alpha, accumulate);
  const double eps = std::is_same<Scalar, float>::value ? 1.2e-7 : 2.3e-16;
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (Index p = 0; p < k; ++p) {
        const double x = ta ? a(p, i) : a(i, p);
        const double y = tb ? b(j, p) : b(p, j);
        sum += x * y;
        magnitude += std::abs(x * y);
      }
      const double start = accumulate ? static_cast<double>(c0(i, j)) : 0.0;
      const double expected = start + static_cast<double>(alpha) * sum;
      const double scaled = std::abs(static_cast<double>(alpha)) * magnitude;
      const double tolerance = relative > 0 ? relative * (scaled + std::abs(start))
                                            : 4 * eps * (static_cast<double>(k) + 2) * (scaled + 1);
      ASSERT_NEAR(static_cast<double>(c(i, j)), expected, tolerance)
          << "m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb << " acc=" << accumulate
          << " alpha=" << alpha << " pad=" << pad << " at (" << i << "," << j << ")";
    }
    // The padding of C is never written.
    for (Index j = n; j < c.stride; ++j) ASSERT_EQ(c(i, j), c0(i, j));
  }
}

TYPED_TEST(GemmTest, MatchesNaiveTripleLoop) {
  using Scalar = TypeParam;
  const std::vector<std::tuple<Index, Index, Index>> shapes = {
      {1, 1, 1},    {1, 7, 5},    {7, 1, 5},    {5, 7, 1},     {1, 64, 64},   {64, 1, 64},  {3, 5, 7},
      {17, 33, 9},  {63, 65, 31}, {64, 64, 64}, {128, 64, 192}, {65, 129, 63}, {2, 2, 300}, {200, 300, 500}};
  for (const auto& [m, n, k] : shapes) {
    for (const Op op_a : {Op::none, Op::transpose}) {
      for (const Op op_b : {Op::none, Op::transpose}) {
        for (const bool accumulate : {false, true}) {
          for (const Scalar alpha : {Scalar(1), Scalar(-0.75)}) {
            check<Scalar>(m, n, k, op_a, op_b, accumulate, alpha, (m + n + k) % 3);
            if (::testing::Test::HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TYPED_TEST(GemmTest, EmptyInnerDimensionZeroesOrKeeps) {
  using Scalar = TypeParam;
  std::vector<Scalar> c(6, Scalar(5));
  const Scalar dummy = 0;
  const ConstOperand<Scalar> a{&dummy, 2, 0, 0, Op::none};
  const ConstOperand<Scalar> b{&dummy, 0, 3, 3, Op::none};
  sparsemoe::detail::gemm(a, b, c.data(), 3, Scalar(1), true);
  for (Scalar v : c) EXPECT_EQ(v, Scalar(5));
  sparsemoe::detail::gemm(a, b, c.data(), 3, Scalar(1), false);
  for (Scalar v : c) EXPECT_EQ(v, Scalar(0));
}

// gemm_packed: C (+)= A·op(W) with op(W) packed by PackedWeight::assign, against the naive loop;
// the epilogue must see every element of C exactly once, after it is final.
template <typename Scalar>
void check_packed(Index m, Index n, Index k, Op op_w, bool accumulate, Index pad) {
  using Matrix = sparsemoe::Matrix<Scalar>;
  const Stored<Scalar> a = make<Scalar>(m, k, pad, 11);
  Matrix stored = op_w == Op::none ? Matrix(k, n) : Matrix(n, k);
  for (Index i = 0; i < stored.size(); ++i) stored.data()[i] = static_cast<Scalar>(value_at(12, i));
  sparsemoe::detail::PackedWeight<Scalar> packed;
  packed.assign(Matrix::Constant(3, 5, Scalar(7)), Op::none);  // reused below: a different size
  packed.assign(stored, op_w);
  ASSERT_EQ(packed.rows(), k);
  ASSERT_EQ(packed.cols(), n);
  Stored<Scalar> c = make<Scalar>(m, n, pad, 13);
  const Stored<Scalar> c0 = c;
  std::vector<int> visits(static_cast<std::size_t>(m * n), 0);
  const ConstOperand<Scalar> oa{a.data.data(), a.rows, a.cols, a.stride, Op::none};
  sparsemoe::detail::gemm_packed(oa, packed, c.data.data(), c.stride, accumulate,
                                 [&](Index row, Index rows, Index col, Index cols) {
    for (Index i = row; i < row + rows; ++i) {
      for (Index j = col; j < col + cols; ++j) {
        ++visits[static_cast<std::size_t>(i * n + j)];
        c.data[static_cast<std::size_t>(i * c.stride + j)] *= Scalar(2);  // the epilogue's result must stay
      }
    }
  });
  const double eps = std::is_same<Scalar, float>::value ? 1.2e-7 : 2.3e-16;
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (Index p = 0; p < k; ++p) {
        const double x = a(i, p);
        const double y = op_w == Op::none ? stored(p, j) : stored(j, p);
        sum += x * y;
        magnitude += std::abs(x * y);
      }
      const double expected = 2 * (sum + (accumulate ? static_cast<double>(c0(i, j)) : 0.0));
      const double tolerance = 8 * eps * (static_cast<double>(k) + 2) * (magnitude + 1);
      ASSERT_NEAR(static_cast<double>(c(i, j)), expected, tolerance)
          << "m=" << m << " n=" << n << " k=" << k << " op_w=" << (op_w == Op::transpose) << " acc=" << accumulate
          << " at (" << i << "," << j << ")";
      ASSERT_EQ(visits[static_cast<std::size_t>(i * n + j)], 1) << "epilogue visits of (" << i << "," << j << ")";
    }
    for (Index j = n; j < c.stride; ++j) ASSERT_EQ(c(i, j), c0(i, j));
  }
}

TYPED_TEST(GemmTest, PackedMatchesNaiveTripleLoop) {
  using Scalar = TypeParam;
  const std::vector<std::tuple<Index, Index, Index>> shapes = {
      {1, 1, 1},   {1, 70, 5},    {7, 1, 5},     {5, 7, 1},     {1, 64, 64},   {64, 64, 64},
      {17, 33, 9}, {63, 130, 31}, {65, 129, 63}, {128, 192, 70}, {2, 2, 300}, {150, 200, 130}};
  for (const auto& [m, n, k] : shapes) {
    for (const Op op_w : {Op::none, Op::transpose}) {
      for (const bool accumulate : {false, true}) {
        check_packed<Scalar>(m, n, k, op_w, accumulate, (m + n + k) % 3);
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// One-row (m = 1) and one-column (n = 1) products, which run our own row updates and dot
// products (no Eigen matrix-vector product, which may allocate): every op combination,
// accumulate on and off, alpha = 1, -0.75 and 2.5, lengths on both sides of the 16-element
// chunks, padded strides (the one-row or one-column operand too), against the naive loop in
// double with a relative tolerance (1e-5 for float, through check()'s `relative`).
TYPED_TEST(GemmTest, OneRowAndOneColumnMatchNaiveLoop) {
  using Scalar = TypeParam;
  const std::vector<Index> lengths = {1, 2, 15, 16, 17, 40, 97};
  for (const Index other : lengths) {
    for (const Index k : {1, 3, 15, 16, 17, 33, 64, 301}) {
      for (const Op op_a : {Op::none, Op::transpose}) {
        for (const Op op_b : {Op::none, Op::transpose}) {
          for (const bool accumulate : {false, true}) {
            for (const Scalar alpha : {Scalar(1), Scalar(-0.75), Scalar(2.5)}) {
              for (const Index pad : {0, 3}) {
                const double relative = std::is_same<Scalar, float>::value ? 1e-5 : 1e-13;
                check<Scalar>(1, other, k, op_a, op_b, accumulate, alpha, pad, relative);
                check<Scalar>(other, 1, k, op_a, op_b, accumulate, alpha, pad, relative);
                if (::testing::Test::HasFatalFailure()) return;
              }
            }
          }
        }
      }
    }
  }
}

// The one-row and one-column products give the same bits wherever the operands sit in memory
// (the summation order depends on the shapes alone): operands shifted by one scalar, which
// changes their alignment against the vector width.
TYPED_TEST(GemmTest, OneRowAndOneColumnIndependentOfAlignment) {
  using Scalar = TypeParam;
  const Index k = 75, other = 37;
  for (const bool one_row : {true, false}) {
    for (const Op op_a : {Op::none, Op::transpose}) {
      for (const Op op_b : {Op::none, Op::transpose}) {
        const Index m = one_row ? 1 : other, n = one_row ? other : 1;
        const Index a_rows = op_a == Op::none ? m : k, a_cols = op_a == Op::none ? k : m;
        const Index b_rows = op_b == Op::none ? k : n, b_cols = op_b == Op::none ? n : k;
        std::vector<Scalar> results[2];
        for (const Index shift : {0, 1}) {
          std::vector<Scalar> a(static_cast<std::size_t>(a_rows * a_cols + 1)), b(static_cast<std::size_t>(b_rows * b_cols + 1));
          for (Index i = 0; i < a_rows * a_cols; ++i) a[static_cast<std::size_t>(i + shift)] = static_cast<Scalar>(value_at(31, i));
          for (Index i = 0; i < b_rows * b_cols; ++i) b[static_cast<std::size_t>(i + shift)] = static_cast<Scalar>(value_at(32, i));
          std::vector<Scalar> c(static_cast<std::size_t>(m * n + 1), Scalar(0));
          const ConstOperand<Scalar> oa{a.data() + shift, a_rows, a_cols, a_cols, op_a};
          const ConstOperand<Scalar> ob{b.data() + shift, b_rows, b_cols, b_cols, op_b};
          sparsemoe::detail::gemm(oa, ob, c.data() + shift, n, Scalar(0.5), false);
          results[shift].assign(c.begin() + shift, c.begin() + shift + m * n);
        }
        EXPECT_EQ(results[0], results[1]) << "one_row=" << one_row << " ta=" << (op_a == Op::transpose)
                                          << " tb=" << (op_b == Op::transpose);
      }
    }
  }
}

TYPED_TEST(GemmTest, PackedOneRowMatchesNaiveLoop) {
  using Scalar = TypeParam;
  for (const Index n : {1, 17, 64, 65, 200}) {
    for (const Index k : {1, 16, 33, 130}) {
      for (const Op op_w : {Op::none, Op::transpose}) {
        for (const bool accumulate : {false, true}) {
          check_packed<Scalar>(1, n, k, op_w, accumulate, 2);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

// Same inputs, same output bits, whatever ran before (kernels and scratch are reused).
TYPED_TEST(GemmTest, RepeatableBitwise) {
  using Scalar = TypeParam;
  for (const Op op_b : {Op::none, Op::transpose}) {
    const auto a = make<Scalar>(130, 70, 0, 4);
    const auto b = op_b == Op::none ? make<Scalar>(70, 90, 0, 5) : make<Scalar>(90, 70, 0, 5);
    const ConstOperand<Scalar> oa{a.data.data(), a.rows, a.cols, a.stride, Op::none};
    const ConstOperand<Scalar> ob{b.data.data(), b.rows, b.cols, b.stride, op_b};
    std::vector<Scalar> first(130 * 90), second(130 * 90);
    sparsemoe::detail::gemm(oa, ob, first.data(), 90, Scalar(1), false);
    sparsemoe::detail::gemm(oa, ob, second.data(), 90, Scalar(1), false);
    EXPECT_EQ(first, second);
  }
}

// PackedWeight's layout, element by element from its definition: op(W) (k×n) in column panels
// of panel_width() columns, panel q a contiguous k×w_q row-major block at data() + q·panel_width·k.
// Shapes with edge panels and rows of odd widths, so that with AVX-512 (test_gemm_native) the
// streaming stores meet unaligned rows; the storage is reused across sizes.
TYPED_TEST(GemmTest, PackedWeightHoldsPanelsExactly) {
  using Scalar = TypeParam;
  using Matrix = sparsemoe::Matrix<Scalar>;
  sparsemoe::detail::PackedWeight<Scalar> packed;
  const std::vector<std::pair<Index, Index>> shapes = {{1, 1}, {3, 70}, {64, 64}, {37, 129}, {130, 200}, {512, 96}};
  for (const auto& [rows, cols] : shapes) {
    for (const Op op : {Op::none, Op::transpose}) {
      Matrix stored = op == Op::none ? Matrix(rows, cols) : Matrix(cols, rows);
      for (Index i = 0; i < stored.size(); ++i) stored.data()[i] = static_cast<Scalar>(value_at(21 + rows, i));
      packed.assign(stored, op);
      const Index k = rows, n = cols, width = packed.panel_width();
      ASSERT_EQ(packed.rows(), k);
      ASSERT_EQ(packed.cols(), n);
      ASSERT_GE(width, 1);
      for (Index p0 = 0; p0 < n; p0 += width) {
        const Index w = std::min(width, n - p0);
        for (Index r = 0; r < k; ++r) {
          for (Index j = 0; j < w; ++j) {
            const Scalar expected = op == Op::none ? stored(r, p0 + j) : stored(p0 + j, r);
            ASSERT_EQ(packed.data()[p0 * k + r * w + j], expected)
                << rows << "x" << cols << " op " << (op == Op::transpose) << " panel at " << p0 << " (" << r << ", "
                << j << ")";
          }
        }
      }
    }
  }
}

}  // namespace
