// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_GEMM_HPP
#define SPARSEMOE_DETAIL_GEMM_HPP

#include "../config.hpp"

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

}  // namespace gemm_impl

/// C = alpha·op(A)·op(B) (+ C when `accumulate`), all operands row-major; C is m×n with row
/// stride `ldc`.
///
/// Always single-threaded and with a cache blocking that depends only on (m, n, k): callers
/// parallelise over tiles themselves, so results are bitwise identical for any thread count
/// (Eigen's own products would pick a thread-count-dependent blocking outside an OpenMP region).
/// One-row or one-column results go through Eigen's matrix-vector kernel. With
/// SPARSEMOE_WITH_LIBXSMM defined, the other products run libxsmm JIT kernels over fixed 64×64
/// output tiles (gemm_libxsmm.hpp); without it (the default), Eigen's GEMM kernel.
/// Cost: 2·m·n·k flops.
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
  using ConstOuterStrided = Eigen::Map<const Matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;
  OuterStrided result(c, m, n, Eigen::OuterStride<>(ldc));
  if (!accumulate) result.setZero();
  if (k == 0) return;
  if (m == 1 || n == 1) {
    ConstOuterStrided a_stored(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.stride));
    ConstOuterStrided b_stored(b.data, b.rows, b.cols, Eigen::OuterStride<>(b.stride));
    if (a.op == Op::none && b.op == Op::none) result.noalias() += alpha * a_stored * b_stored;
    if (a.op == Op::none && b.op == Op::transpose) result.noalias() += alpha * a_stored * b_stored.transpose();
    if (a.op == Op::transpose && b.op == Op::none) result.noalias() += alpha * a_stored.transpose() * b_stored;
    if (a.op == Op::transpose && b.op == Op::transpose)
      result.noalias() += alpha * a_stored.transpose() * b_stored.transpose();
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

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_GEMM_HPP
