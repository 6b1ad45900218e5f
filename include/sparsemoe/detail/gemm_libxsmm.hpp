// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_GEMM_LIBXSMM_HPP
#define SPARSEMOE_DETAIL_GEMM_LIBXSMM_HPP

/// \file gemm_libxsmm.hpp
/// Optional GEMM backend over libxsmm's JIT kernels (compiled in when SPARSEMOE_WITH_LIBXSMM is
/// defined; the CMake option SPARSEMOE_USE_LIBXSMM does that and links libxsmm + libxsmmnoblas).
///
/// Only dispatched kernels (`libxsmm_smmdispatch` / `libxsmm_dmmdispatch`) are used, never
/// `libxsmm_?gemm`, which hands shapes it does not like to whatever BLAS is linked (and returns
/// garbage with libxsmmnoblas). The product is cut into output tiles of tile_rows × tile_cols with
/// the full inner dimension; tile boundaries depend only on (m, n, k), each tile is one kernel call,
/// and nothing runs in parallel inside: results are bitwise identical for any thread count.
///
/// Row-major C (m×n) = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so libxsmm's "A" is our B
/// and its "B" is our A. libxsmm 1.17's JIT supports a transposed second operand (our A used
/// transposed: the weight gradients Xᵀ·∂pre) but not a transposed first one (our B used
/// transposed: ∂Y·W2ᵀ, ∂pre·W1ᵀ in backward); for that case each column panel of op(B) is
/// transposed once into a thread-local buffer (k × tile_cols) and reused by every row tile.
/// The JIT kernels only take alpha = 1 and beta ∈ {0, 1}; alpha ≠ 1 goes through a thread-local
/// tile buffer. The buffers grow to their largest size once per thread and are then reused.

#include "../config.hpp"

#include <libxsmm.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

namespace sparsemoe {
namespace detail {
namespace libxsmm_backend {

/// Rows (of C) per tile.
constexpr Index tile_rows = 64;
/// Columns (of C) per tile.
constexpr Index tile_cols = 64;

template <typename Scalar>
using Kernel = std::conditional_t<std::is_same<Scalar, float>::value, libxsmm_smmfunction, libxsmm_dmmfunction>;

/// JIT kernel for column-major C'(mm×nn) = A'(mm×kk)·B'(kk×nn) (+ C' when `beta_one`), or null.
template <typename Scalar>
Kernel<Scalar> dispatch(Index mm, Index nn, Index kk, Index lda, Index ldb, Index ldc, bool trans_b, bool beta_one) {
  const libxsmm_blasint m = static_cast<libxsmm_blasint>(mm), n = static_cast<libxsmm_blasint>(nn),
                        k = static_cast<libxsmm_blasint>(kk);
  const libxsmm_blasint la = static_cast<libxsmm_blasint>(lda), lb = static_cast<libxsmm_blasint>(ldb),
                        lc = static_cast<libxsmm_blasint>(ldc);
  const Scalar alpha = Scalar(1);
  const Scalar beta = beta_one ? Scalar(1) : Scalar(0);
  const int flags = (trans_b ? LIBXSMM_GEMM_FLAG_TRANS_B : 0) | (beta_one ? 0 : LIBXSMM_GEMM_FLAG_BETA_0);
  const int prefetch = LIBXSMM_GEMM_PREFETCH_NONE;
  if constexpr (std::is_same<Scalar, float>::value) {
    return libxsmm_smmdispatch(m, n, k, &la, &lb, &lc, &alpha, &beta, &flags, &prefetch);
  } else {
    return libxsmm_dmmdispatch(m, n, k, &la, &lb, &lc, &alpha, &beta, &flags, &prefetch);
  }
}

/// Thread-local scratch, grown on demand and never shrunk.
template <typename Scalar, int Slot>
Scalar* scratch(Index size) {
  thread_local std::vector<Scalar> buffer;
  if (static_cast<Index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
  return buffer.data();
}

/// C = alpha·op(A)·op(B) (+ C when `accumulate`), row-major, through libxsmm. A is stored with row
/// stride lda (m×k, or k×m when trans_a), B with row stride ldb (k×n, or n×k when trans_b).
/// Returns false (having touched nothing) when libxsmm cannot take the problem; the caller then
/// falls back to Eigen. Requires m, n, k ≥ 1.
template <typename Scalar>
bool gemm(Index m, Index n, Index k, const Scalar* a, Index lda, bool trans_a, const Scalar* b, Index ldb,
          bool trans_b, Scalar* c, Index ldc, Scalar alpha, bool accumulate) {
  constexpr Index int_max = INT_MAX;
  if (m > int_max || n > int_max || k > int_max || lda > int_max || ldb > int_max || ldc > int_max) return false;
  const bool scaled = alpha != Scalar(1);
  const Index tm_full = std::min(tile_rows, m);
  const Index tn_full = std::min(tile_cols, n);
  // Kernel layout: libxsmm's A' is op(B) panel (tn×k col-major), B' is op(A) block (k×tm).
  const Index lda_kernel = trans_b ? tn_full : ldb;  // packed panel has leading dimension tn_full
  const Index ldb_kernel = lda;
  // With alpha ≠ 1 the kernel writes a tm×tn tile buffer (row-major, stride tn_full), beta = 0.
  const Index ldc_kernel = scaled ? tn_full : ldc;
  const bool beta_one = accumulate && !scaled;
  // The (at most four) kernels of this problem: full/edge tile in each direction.
  Kernel<Scalar> kernels[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
  const Index tm_edge = m % tm_full, tn_edge = n % tn_full;
  for (int edge_m = 0; edge_m < 2; ++edge_m) {
    const Index tm = edge_m ? tm_edge : tm_full;
    if (tm == 0) continue;
    for (int edge_n = 0; edge_n < 2; ++edge_n) {
      const Index tn = edge_n ? tn_edge : tn_full;
      if (tn == 0) continue;
      // A packed edge panel keeps leading dimension tn_full: always valid (≥ tn).
      kernels[edge_m][edge_n] = dispatch<Scalar>(tn, tm, k, lda_kernel, ldb_kernel, ldc_kernel, trans_a, beta_one);
      if (!kernels[edge_m][edge_n]) return false;
    }
  }
  Scalar* panel = trans_b ? scratch<Scalar, 0>(k * tn_full) : nullptr;
  Scalar* tile = scaled ? scratch<Scalar, 1>(tm_full * tn_full) : nullptr;
  for (Index j0 = 0; j0 < n; j0 += tn_full) {
    const Index tn = std::min(tn_full, n - j0);
    const Scalar* a_kernel;  // libxsmm's A': columns j0.. of op(B)
    if (trans_b) {
      // op(B)(kk, j) = B_stored(j, kk): gather the panel as column-major tn×k, ld = tn_full.
      for (Index kk = 0; kk < k; ++kk) {
        Scalar* out = panel + kk * tn_full;
        for (Index j = 0; j < tn; ++j) out[j] = b[(j0 + j) * ldb + kk];
      }
      a_kernel = panel;
    } else {
      a_kernel = b + j0;
    }
    for (Index i0 = 0; i0 < m; i0 += tm_full) {
      const Index tm = std::min(tm_full, m - i0);
      const Kernel<Scalar> kernel = kernels[tm != tm_full][tn != tn_full];
      const Scalar* b_kernel = trans_a ? a + i0 : a + i0 * lda;
      Scalar* c_tile = c + i0 * ldc + j0;
      if (!scaled) {
        kernel(a_kernel, b_kernel, c_tile);
        continue;
      }
      kernel(a_kernel, b_kernel, tile);
      for (Index i = 0; i < tm; ++i) {
        Scalar* row = c_tile + i * ldc;
        const Scalar* source = tile + i * tn_full;
        if (accumulate) {
          for (Index j = 0; j < tn; ++j) row[j] += alpha * source[j];
        } else {
          for (Index j = 0; j < tn; ++j) row[j] = alpha * source[j];
        }
      }
    }
  }
  return true;
}

}  // namespace libxsmm_backend
}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_GEMM_LIBXSMM_HPP
