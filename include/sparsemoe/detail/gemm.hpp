// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_GEMM_HPP
#define SPARSEMOE_DETAIL_GEMM_HPP

#include "../config.hpp"

#include <algorithm>
#include <vector>

#ifdef SPARSEMOE_WITH_LIBXSMM
#include "gemm_libxsmm.hpp"
#endif

namespace sparsemoe {
namespace detail {

/// Whether an operand enters a product as stored or transposed.
enum class Op { none, transpose };

/// A row-major operand described by pointer, stored shape and row stride.
template <typename Scalar>
struct ConstOperand {
  const Scalar* data;
  Index rows;    ///< stored rows
  Index cols;    ///< stored columns
  Index stride;  ///< distance between consecutive stored rows, in scalars
  Op op;
  Index op_rows() const { return op == Op::none ? rows : cols; }
  Index op_cols() const { return op == Op::none ? cols : rows; }
};

/// Describes a row-major block (any `Eigen::Ref`, `Map` or `Block` with unit inner stride).
template <typename Derived>
ConstOperand<typename Derived::Scalar> operand(const Eigen::DenseBase<Derived>& matrix,
                                               Op op = Op::none) {
  static_assert(Derived::IsRowMajor || Derived::ColsAtCompileTime == 1 || Derived::RowsAtCompileTime == 1,
                "sparsemoe::detail::gemm works on row-major storage");
  const auto& derived = matrix.derived();
  return {derived.data(), derived.rows(), derived.cols(), derived.outerStride(), op};
}

namespace gemm_impl {

template <typename Scalar, int LhsOrder, int RhsOrder>
void run_kernel(Index m, Index n, Index k, const ConstOperand<Scalar>& a,
                const ConstOperand<Scalar>& b, Scalar* c, Index ldc, Scalar alpha) {
  using Kernel = Eigen::internal::general_matrix_matrix_product<Index, Scalar, LhsOrder, false, Scalar,
                                                                RhsOrder, false, Eigen::RowMajor, 1>;
  Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                       Eigen::Dynamic>
      blocking(m, n, k, 1, true);
  Kernel::run(m, n, k, a.data, a.stride, b.data, b.stride, c, 1, ldc, alpha, blocking, nullptr);
}

/// Width of the fixed-size chunks of dot() and axpy(): 16 scalars (two AVX packets of float,
/// four of double). A constant, so which elements fall into the scalar tail depends on the length
/// alone, never on the operands' addresses.
constexpr Index vector_chunk = 16;

/// x·y over `k` elements with strides incx and incy (in scalars), in a fixed order: lane l of a
/// 16-lane accumulator sums x(i)·y(i) for i ≡ l (mod 16) in increasing i over the whole chunks,
/// the lanes are added in order 0..15, then the tail elements in increasing i. Unit strides take
/// the vectorised path; other strides the same order with scalar loads. Allocates nothing.
template <typename Scalar>
Scalar dot(Index k, const Scalar* x, Index incx, const Scalar* y, Index incy) {
  using Chunk = Eigen::Array<Scalar, vector_chunk, 1>;
  Chunk lanes = Chunk::Zero();
  const Index whole = k / vector_chunk * vector_chunk;
  if (incx == 1 && incy == 1) {
    for (Index i = 0; i < whole; i += vector_chunk) {
      lanes += Eigen::Map<const Chunk>(x + i) * Eigen::Map<const Chunk>(y + i);
    }
  } else {
    using Strided = Eigen::Map<const Chunk, Eigen::Unaligned, Eigen::InnerStride<>>;
    for (Index i = 0; i < whole; i += vector_chunk) {
      lanes += Strided(x + i * incx, Eigen::InnerStride<>(incx)) * Strided(y + i * incy, Eigen::InnerStride<>(incy));
    }
  }
  Scalar sum(0);
  for (Index l = 0; l < vector_chunk; ++l) sum += lanes[l];
  for (Index i = whole; i < k; ++i) sum += x[i * incx] * y[i * incy];
  return sum;
}

/// y(j) += s·x(j) for j < n, y with stride incy and x contiguous; each element is updated
/// independently (whole 16-element chunks vectorised when incy == 1, then the tail), so the
/// result does not depend on the addresses. Allocates nothing.
template <typename Scalar>
void axpy(Index n, Scalar s, const Scalar* x, Scalar* y, Index incy) {
  using Chunk = Eigen::Array<Scalar, vector_chunk, 1>;
  const Index whole = n / vector_chunk * vector_chunk;
  if (incy == 1) {
    for (Index j = 0; j < whole; j += vector_chunk) Eigen::Map<Chunk>(y + j) += s * Eigen::Map<const Chunk>(x + j);
  } else {
    using Strided = Eigen::Map<Chunk, Eigen::Unaligned, Eigen::InnerStride<>>;
    for (Index j = 0; j < whole; j += vector_chunk) {
      Strided(y + j * incy, Eigen::InnerStride<>(incy)) += s * Eigen::Map<const Chunk>(x + j);
    }
  }
  for (Index j = whole; j < n; ++j) y[j * incy] += s * x[j];
}

/// C (+)= alpha·op(A)·op(B) when m == 1 or n == 1 (C already zeroed unless accumulating), with
/// our own kernels rather than Eigen's matrix-vector product, which can allocate temporaries.
/// Row updates (axpy) where op(B)'s rows (m == 1) or op(A)'s columns (n == 1) are contiguous in
/// storage, dot products of contiguous stored rows otherwise:
///   m == 1, B as stored:     C(0, :) += (alpha·a(kk))·B(kk, :)        for kk = 0..k-1 in order;
///   m == 1, B transposed:    C(0, j) += alpha·dot(a, B(j, :))          for each j;
///   n == 1, A as stored:     C(i, 0) += alpha·dot(A(i, :), b)          for each i;
///   n == 1, A transposed:    C(:, 0) += (alpha·b(kk))·A(kk, :)        for kk = 0..k-1 in order
/// (a, b: the one-row or one-column operand, read with its stride). m == n == 1 takes the first
/// two lines. Single-threaded, in a fixed order that depends on the shapes alone (not on the
/// addresses or the thread count). Cost: 2·m·n·k flops, no allocation.
template <typename Scalar>
void run_vector_product(Index m, Index n, Index k, const ConstOperand<Scalar>& a, const ConstOperand<Scalar>& b,
                        Scalar* c, Index ldc, Scalar alpha) {
  if (m == 1) {
    // op(A) is 1×k: element kk at a.data[kk] as stored (1×k), a.data[kk·stride] transposed (k×1).
    const Index inc_a = a.op == Op::none ? 1 : a.stride;
    if (b.op == Op::none) {
      for (Index kk = 0; kk < k; ++kk) axpy(n, alpha * a.data[kk * inc_a], b.data + kk * b.stride, c, 1);
    } else {
      for (Index j = 0; j < n; ++j) c[j] += alpha * dot(k, a.data, inc_a, b.data + j * b.stride, 1);
    }
    return;
  }
  // n == 1: op(B) is k×1: element kk at b.data[kk·stride] as stored (k×1), b.data[kk] transposed.
  const Index inc_b = b.op == Op::none ? b.stride : 1;
  if (a.op == Op::none) {
    for (Index i = 0; i < m; ++i) c[i * ldc] += alpha * dot(k, a.data + i * a.stride, 1, b.data, inc_b);
  } else {
    for (Index kk = 0; kk < k; ++kk) axpy(m, alpha * b.data[kk * inc_b], a.data + kk * a.stride, c, ldc);
  }
}

}  // namespace gemm_impl

/// C = alpha·op(A)·op(B) (+ C when `accumulate`), all operands row-major; C is m×n with row
/// stride `ldc`.
///
/// Always single-threaded and with a cache blocking that depends only on (m, n, k): callers
/// parallelise over tiles themselves, so results are bitwise identical for any thread count
/// (Eigen's own products would pick a thread-count-dependent blocking outside an OpenMP region).
/// One-row or one-column results (m == 1 or n == 1) go through our own row updates and dot
/// products in a fixed order (gemm_impl::run_vector_product), which allocate nothing (Eigen's
/// matrix-vector product may allocate temporaries). With SPARSEMOE_WITH_LIBXSMM defined, the
/// other products run libxsmm JIT kernels over fixed 64×64 output tiles (gemm_libxsmm.hpp);
/// without it (the default), Eigen's GEMM kernel. Cost: 2·m·n·k flops.
template <typename Scalar>
void gemm(const ConstOperand<Scalar>& a, const ConstOperand<Scalar>& b, Scalar* c, Index ldc,
          Scalar alpha, bool accumulate) {
  const Index m = a.op_rows();
  const Index k = a.op_cols();
  const Index n = b.op_cols();
  SPARSEMOE_ASSERT(b.op_rows() == k);
  if (m == 0 || n == 0) return;
#ifdef SPARSEMOE_WITH_LIBXSMM
  if (m > 1 && n > 1 && k > 0 &&
      libxsmm_backend::gemm<Scalar>(m, n, k, a.data, a.stride, a.op == Op::transpose, b.data, b.stride,
                                    b.op == Op::transpose, c, ldc, alpha, accumulate)) {
    return;
  }
#endif
  using OuterStrided = Eigen::Map<Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
  OuterStrided result(c, m, n, Eigen::OuterStride<>(ldc));
  if (!accumulate) result.setZero();
  if (k == 0) return;
  if (m == 1 || n == 1) {
    gemm_impl::run_vector_product(m, n, k, a, b, c, ldc, alpha);
    return;
  }
  constexpr int row = Eigen::RowMajor;
  constexpr int col = Eigen::ColMajor;
  // A stored row-major and used transposed is a column-major operand with the same stride.
  if (a.op == Op::none && b.op == Op::none) gemm_impl::run_kernel<Scalar, row, row>(m, n, k, a, b, c, ldc, alpha);
  if (a.op == Op::none && b.op == Op::transpose) gemm_impl::run_kernel<Scalar, row, col>(m, n, k, a, b, c, ldc, alpha);
  if (a.op == Op::transpose && b.op == Op::none) gemm_impl::run_kernel<Scalar, col, row>(m, n, k, a, b, c, ldc, alpha);
  if (a.op == Op::transpose && b.op == Op::transpose)
    gemm_impl::run_kernel<Scalar, col, col>(m, n, k, a, b, c, ldc, alpha);
}

/// A k×n weight matrix copied into the layout the GEMM backend reads fastest: column panels of
/// `panel_width` columns, each a contiguous k×w row-major block (w = panel_width, or less for
/// the last panel). With libxsmm the panels are 64 columns wide, so a kernel call streams one
/// contiguous block; with Eigen there is one panel, the matrix itself. Memory: k·n scalars.
template <typename Scalar>
class PackedWeight {
 public:
  PackedWeight() = default;

  /// Copies `weight` (k×n) into panels. O(k·n).
  explicit PackedWeight(const Matrix<Scalar>& weight) { assign(weight, Op::none); }

  /// Packs op(weight) (k×n: the weight as stored, or its transpose), reusing this object's
  /// storage when the size is unchanged (then nothing is allocated). O(k·n).
  void assign(const Matrix<Scalar>& weight, Op op) {
    const bool transposed = op == Op::transpose;
    rows_ = transposed ? weight.cols() : weight.rows();
    cols_ = transposed ? weight.rows() : weight.cols();
    panel_width_ = preferred_panel_width(cols_);
    data_.resize(static_cast<std::size_t>(weight.size()));
#ifdef SPARSEMOE_WITH_LIBXSMM
    if (!transposed) {
      libxsmm_backend::copy_into_panels(weight.data(), weight.outerStride(), rows_, cols_, panel_width_, data_.data());
      return;
    }
#endif
    for (Index p0 = 0; p0 < cols_; p0 += panel_width_) {
      const Index width = std::min(panel_width_, cols_ - p0);
      Eigen::Map<Matrix<Scalar>> panel(data_.data() + p0 * rows_, rows_, width);
      if (!transposed) {
        panel = weight.middleCols(p0, width);
        continue;
      }
#ifdef SPARSEMOE_WITH_LIBXSMM
      libxsmm_backend::transpose_copy<Scalar, true>(weight.row(p0).data(), weight.outerStride(), width, rows_,
                                                    panel.data(), width);
#else
      panel = weight.middleRows(p0, width).transpose();
#endif
    }
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  Index panel_width() const { return panel_width_; }
  const Scalar* data() const { return data_.data(); }
  /// Bytes of the packed copy.
  std::size_t bytes() const { return data_.size() * sizeof(Scalar); }

  /// Panel width used for a weight of `cols` columns.
  static Index preferred_panel_width(Index cols) {
#ifdef SPARSEMOE_WITH_LIBXSMM
    static_cast<void>(cols);
    return libxsmm_backend::tile_cols;
#else
    return std::max<Index>(cols, 1);
#endif
  }

 private:
  Index rows_ = 0;
  Index cols_ = 0;
  Index panel_width_ = 1;
  std::vector<Scalar, Eigen::aligned_allocator<Scalar>> data_;
};

/// Columns [first_col, first_col + cols) of C (m×n, row stride ldc; `c` points at C(0, 0)) =
/// A·B (+ C when `accumulate`) for a row-major operand A (m×k, not transposed) and a packed B
/// (k×n); cols < 0 means up to n (column ranges that start on a 64-column boundary keep the
/// libxsmm kernels; others go through gemm() panel by panel). After
/// each block of C is final, `epilogue(first_row, rows, first_col, cols)` (columns numbered as
/// in B) runs on it while it is still in cache: bias and activation go there. The blocks are
/// fixed by the shapes; results do not depend on the thread count. Cost: 2·m·cols·k flops.
template <typename Scalar, typename Epilogue>
void gemm_packed(const ConstOperand<Scalar>& a, const PackedWeight<Scalar>& b, Scalar* c, Index ldc, bool accumulate,
                 Epilogue&& epilogue, Index first_col = 0, Index cols = -1) {
  SPARSEMOE_ASSERT(a.op == Op::none && a.cols == b.rows());
  const Index m = a.rows;
  const Index n = cols < 0 ? b.cols() - first_col : cols;
  const Index k = b.rows();
  const Index panel_width = b.panel_width();
  SPARSEMOE_ASSERT(first_col >= 0 && first_col + n <= b.cols());
  if (m == 0 || n == 0) return;
#ifdef SPARSEMOE_WITH_LIBXSMM
  const auto shifted = [&](Index row, Index rows, Index col, Index width) { epilogue(row, rows, first_col + col, width); };
  if (m > 1 && k > 0 && first_col % panel_width == 0 &&
      libxsmm_backend::gemm_packed<Scalar>(m, n, k, a.data, a.stride, b.data() + first_col * k, panel_width,
                                           c + first_col, ldc, accumulate, shifted)) {
    return;
  }
#endif
  // Panel by panel through gemm(): a panel is a k×w row-major block with row stride w.
  for (Index col = first_col; col < first_col + n;) {
    const Index panel_start = col / panel_width * panel_width;
    const Index stored_width = std::min(panel_width, b.cols() - panel_start);
    const Index width = std::min(panel_start + stored_width, first_col + n) - col;
    const ConstOperand<Scalar> panel{b.data() + panel_start * k + (col - panel_start), k, width, stored_width, Op::none};
    gemm(a, panel, c + col, ldc, Scalar(1), accumulate);
    epilogue(Index(0), m, col, width);
    col += width;
  }
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_GEMM_HPP
