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
/// transposed: ∂Y·W2ᵀ, ∂pre·W1ᵀ in backward). Both transposed cases are packed instead (measured
/// faster than libxsmm's own transposed-B kernel, see bench/NOTES.md): op(B) once per call into
/// a thread-local k×n buffer, op(A) once per row tile into a thread-local tile_rows×k buffer.
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

/// panel (column-major tn×k, leading dimension ld) = columns [j0, j0+tn) of op(B) = rows of the
/// stored B (n×k, row stride ldb). Reads each cache line of B once, whole (16 scalars of one row
/// at a time), so power-of-two strides do not thrash L1.
template <typename Scalar>
void pack_transposed_panel(const Scalar* b, Index ldb, Index j0, Index tn, Index k, Scalar* panel, Index ld) {
  constexpr Index chunk = 64 / static_cast<Index>(sizeof(Scalar));
  for (Index k0 = 0; k0 < k; k0 += chunk) {
    const Index kc = std::min(chunk, k - k0);
    for (Index j = 0; j < tn; ++j) {
      const Scalar* source = b + (j0 + j) * ldb + k0;
      Scalar* target = panel + k0 * ld + j;
      for (Index t = 0; t < kc; ++t) target[t * ld] = source[t];
    }
  }
}

/// block (row-major tm×k, row stride ld) = rows [i0, i0+tm) of op(A) = columns of the stored A
/// (k×m, row stride lda); reads each cache line of A once, whole.
template <typename Scalar>
void pack_transposed_block(const Scalar* a, Index lda, Index i0, Index tm, Index k, Scalar* block, Index ld) {
  constexpr Index chunk = 64 / static_cast<Index>(sizeof(Scalar));
  for (Index c0 = 0; c0 < tm; c0 += chunk) {
    const Index cc = std::min(chunk, tm - c0);
    for (Index kk = 0; kk < k; ++kk) {
      const Scalar* source = a + kk * lda + i0 + c0;
      Scalar* target = block + c0 * ld + kk;
      for (Index t = 0; t < cc; ++t) target[t * ld] = source[t];
    }
  }
}

/// Leading dimension of a packed buffer of k scalars per line: k rounded up to a cache line, plus
/// one line when that is a multiple of 1 KiB (so consecutive lines do not share L1 sets).
template <typename Scalar>
Index padded_leading_dimension(Index k) {
  constexpr Index line = 64 / static_cast<Index>(sizeof(Scalar));
  Index ld = (k + line - 1) / line * line;
  if ((ld * static_cast<Index>(sizeof(Scalar))) % 1024 == 0) ld += line;
  return ld;
}

/// C = alpha·op(A)·op(B) (+ C when `accumulate`), row-major, through libxsmm. A is stored with row
/// stride lda (m×k, or k×m when trans_a), B with row stride ldb (k×n, or n×k when trans_b).
/// Returns false (having touched nothing) when libxsmm cannot take the problem; the caller then
/// falls back to Eigen. Requires m, n, k ≥ 1.
///
/// Loop order: row tiles outside, column tiles inside, so the row block of op(A) (tile_rows × k)
/// stays in L2 while the column panels of op(B) stream past it. A transposed A is packed once per
/// row tile; a transposed B is packed once per column panel into a buffer that holds all of op(B)
/// (so it is packed once per call, during the first row tile).
template <typename Scalar>
bool gemm(Index m, Index n, Index k, const Scalar* a, Index lda, bool trans_a, const Scalar* b, Index ldb,
          bool trans_b, Scalar* c, Index ldc, Scalar alpha, bool accumulate) {
  constexpr Index int_max = INT_MAX;
  if (m > int_max || n > int_max || k > int_max || lda > int_max || ldb > int_max || ldc > int_max) return false;
  const bool scaled = alpha != Scalar(1);
  const Index tm_full = std::min(tile_rows, m);
  const Index tn_full = std::min(tile_cols, n);
  const Index panels = (n + tn_full - 1) / tn_full;
  // Kernel layout: libxsmm's A' is an op(B) panel (tn×k column-major), its B' an op(A) block
  // (k×tm column-major = tm×k row-major), its C' a C tile (tn×tm column-major).
  const Index lda_kernel = trans_b ? tn_full : ldb;
  const Index ld_block = trans_a ? padded_leading_dimension<Scalar>(k) : lda;
  const Index ldc_kernel = scaled ? tn_full : ldc;  // alpha ≠ 1: kernel writes a tile buffer
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
      kernels[edge_m][edge_n] = dispatch<Scalar>(tn, tm, k, lda_kernel, ld_block, ldc_kernel, false, beta_one);
      if (!kernels[edge_m][edge_n]) return false;
    }
  }
  Scalar* packed_b = trans_b ? scratch<Scalar, 0>(panels * tn_full * k) : nullptr;
  Scalar* packed_a = trans_a ? scratch<Scalar, 1>(tm_full * ld_block) : nullptr;
  Scalar* tile = scaled ? scratch<Scalar, 2>(tm_full * tn_full) : nullptr;
  for (Index i0 = 0; i0 < m; i0 += tm_full) {
    const Index tm = std::min(tm_full, m - i0);
    const Scalar* b_kernel = a + i0 * lda;
    if (trans_a) {
      pack_transposed_block(a, lda, i0, tm, k, packed_a, ld_block);
      b_kernel = packed_a;
    }
    for (Index j0 = 0, panel = 0; j0 < n; j0 += tn_full, ++panel) {
      const Index tn = std::min(tn_full, n - j0);
      const Scalar* a_kernel = b + j0;
      if (trans_b) {
        a_kernel = packed_b + panel * tn_full * k;
        if (i0 == 0) pack_transposed_panel(b, ldb, j0, tn, k, const_cast<Scalar*>(a_kernel), tn_full);
      }
      const Kernel<Scalar> kernel = kernels[tm != tm_full][tn != tn_full];
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
