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
/// transposed: ∂Y·W2ᵀ, ∂pre·W1ᵀ in backward). The first is used as is (measured 5–12 % faster than
/// packing op(A), bench/NOTES.md); for the second, op(B) is packed once per call into a
/// thread-local k×n buffer (AVX-512 16×16 register transposes) and the plain kernel runs on it.
/// The JIT kernels only take alpha = 1 and beta ∈ {0, 1}; alpha ≠ 1 goes through a thread-local
/// tile buffer. The buffers grow to their largest size once per thread and are then reused.

#include "../config.hpp"

#include <libxsmm.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
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
/// With a `prefetch` strategy other than none the kernel takes three more pointers, the next
/// call's A', B' and C' (libxsmm's calling convention for prefetching kernels).
template <typename Scalar>
Kernel<Scalar> dispatch(Index mm, Index nn, Index kk, Index lda, Index ldb, Index ldc, bool trans_b, bool beta_one,
                        int prefetch = LIBXSMM_GEMM_PREFETCH_NONE) {
  const libxsmm_blasint m = static_cast<libxsmm_blasint>(mm), n = static_cast<libxsmm_blasint>(nn),
                        k = static_cast<libxsmm_blasint>(kk);
  const libxsmm_blasint la = static_cast<libxsmm_blasint>(lda), lb = static_cast<libxsmm_blasint>(ldb),
                        lc = static_cast<libxsmm_blasint>(ldc);
  const Scalar alpha = Scalar(1);
  const Scalar beta = beta_one ? Scalar(1) : Scalar(0);
  const int flags = (trans_b ? LIBXSMM_GEMM_FLAG_TRANS_B : 0) | (beta_one ? 0 : LIBXSMM_GEMM_FLAG_BETA_0);
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

#if defined(__AVX512F__)
/// dst (16×16, row stride ldd) = transpose of src (16×16, row stride lds), in registers. With
/// `streaming`, dst's rows go out as non-temporal stores (each row must be 64-byte aligned).
template <bool streaming = false>
inline void transpose_16x16(const float* src, Index lds, float* dst, Index ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
  for (int i = 0; i < 16; ++i) {
    if constexpr (streaming) {
      _mm512_stream_ps(dst + i * ldd, r[i]);
    } else {
      _mm512_storeu_ps(dst + i * ldd, r[i]);
    }
  }
}
#endif

/// Whether `pointer` is aligned for 64-byte (one cache line, one AVX-512 register) stores.
inline bool line_aligned(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 64 == 0; }

/// dst(c, r) = src(r, c) for r < rows, c < cols (src row stride lds, dst row stride ldd).
/// Blocks of one cache line each way: each line of src is read once, whole, so power-of-two
/// strides do not thrash L1; float blocks are transposed in AVX-512 registers when available.
/// With `streaming` (for a copy bigger than the caches, read later), the float blocks transposed
/// in registers write their whole 64-byte-aligned lines of dst with non-temporal stores, which
/// skip reading each destination line first, and the stores are fenced before returning.
template <typename Scalar, bool streaming = false>
void transpose_copy(const Scalar* src, Index lds, Index rows, Index cols, Scalar* dst, Index ldd) {
  constexpr Index block = 64 / static_cast<Index>(sizeof(Scalar));
#if defined(__AVX512F__)
  const bool stream_lines = streaming && std::is_same<Scalar, float>::value && line_aligned(dst) &&
                            (ldd * static_cast<Index>(sizeof(Scalar))) % 64 == 0;
#endif
  for (Index r0 = 0; r0 < rows; r0 += block) {
    const Index rb = std::min(block, rows - r0);
    for (Index c0 = 0; c0 < cols; c0 += block) {
      const Index cb = std::min(block, cols - c0);
#if defined(__AVX512F__)
      if constexpr (std::is_same<Scalar, float>::value) {
        if (rb == block && cb == block) {
          if (stream_lines) {
            transpose_16x16<true>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
          } else {
            transpose_16x16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
          }
          continue;
        }
      }
#endif
      for (Index r = 0; r < rb; ++r) {
        const Scalar* source = src + (r0 + r) * lds + c0;
        Scalar* target = dst + c0 * ldd + r0 + r;
        for (Index c = 0; c < cb; ++c) target[c * ldd] = source[c];
      }
    }
  }
#if defined(__AVX512F__)
  if (stream_lines) _mm_sfence();
#endif
}

/// Copies src (k×n, row stride lds) into column panels of `panel_width` columns: panel q is the
/// contiguous k×w_q row-major block at dst + q·panel_width·k (w_q = panel_width, or what is left
/// for the last panel). Each row of src is read once, front to back, and its pieces go to the
/// panels; with AVX-512, whole 64-byte-aligned lines of dst are written with non-temporal stores
/// (the copy is bigger than the caches and read later: skipping the read of each destination
/// line saves a third of the traffic), fenced before returning. O(k·n).
template <typename Scalar>
void copy_into_panels(const Scalar* src, Index lds, Index k, Index n, Index panel_width, Scalar* dst) {
  for (Index row = 0; row < k; ++row) {
    const Scalar* source = src + row * lds;
    for (Index p0 = 0; p0 < n; p0 += panel_width) {
      const Index width = std::min(panel_width, n - p0);
      Scalar* target = dst + p0 * k + row * width;
      Index j = 0;
#if defined(__AVX512F__)
      constexpr Index line = 64 / static_cast<Index>(sizeof(Scalar));
      if (line_aligned(target)) {
        for (; j + line <= width; j += line) {
          if constexpr (std::is_same<Scalar, float>::value) {
            _mm512_stream_ps(target + j, _mm512_loadu_ps(source + p0 + j));
          } else {
            _mm512_stream_pd(target + j, _mm512_loadu_pd(source + p0 + j));
          }
        }
      }
#endif
      for (; j < width; ++j) target[j] = source[p0 + j];
    }
  }
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

/// C = alpha·op(A)·op(B) (+ C when `accumulate`), row-major, through libxsmm. A is stored with row
/// stride lda (m×k, or k×m when trans_a), B with row stride ldb (k×n, or n×k when trans_b).
/// Returns false (having touched nothing) when libxsmm cannot take the problem; the caller then
/// falls back to Eigen. Requires m, n, k ≥ 1.
///
/// Loop order: row tiles outside, column tiles inside, so the row block of op(A) (tile_rows × k)
/// stays in L2 while the column panels of op(B) stream past it. A transposed A goes through
/// libxsmm's TRANS_B kernels; a transposed B is packed once per column panel into a buffer that
/// holds all of op(B) (so it is packed once per call, during the first row tile).
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
  const Index ldc_kernel = scaled ? tn_full : ldc;  // alpha ≠ 1: kernel writes a tile buffer
  const bool beta_one = accumulate && !scaled;
  // op(B) as stored is read in tn-wide slices of k rows, ldb apart: too short a run per row for
  // the hardware prefetchers. The kernel then prefetches the next call's slice into L2 while it
  // computes (libxsmm's AL2 strategy): C forward 57 -> 43 ms, D 5.1 -> 3.0 ms (bench/NOTES.md).
  // If libxsmm has no prefetching kernel for a shape, all four go without.
  bool prefetch_next = !trans_b && !scaled;
  // The (at most four) kernels of this problem: full/edge tile in each direction.
  Kernel<Scalar> kernels[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
  const Index tm_edge = m % tm_full, tn_edge = n % tn_full;
  const auto dispatch_all = [&](int prefetch) {
    for (int edge_m = 0; edge_m < 2; ++edge_m) {
      const Index tm = edge_m ? tm_edge : tm_full;
      if (tm == 0) continue;
      for (int edge_n = 0; edge_n < 2; ++edge_n) {
        const Index tn = edge_n ? tn_edge : tn_full;
        if (tn == 0) continue;
        kernels[edge_m][edge_n] =
            dispatch<Scalar>(tn, tm, k, lda_kernel, lda, ldc_kernel, trans_a, beta_one, prefetch);
        if (!kernels[edge_m][edge_n]) return false;
      }
    }
    return true;
  };
  if (!prefetch_next || !dispatch_all(LIBXSMM_GEMM_PREFETCH_AL2)) {
    prefetch_next = false;
    if (!dispatch_all(LIBXSMM_GEMM_PREFETCH_NONE)) return false;
  }
  Scalar* packed_b = trans_b ? scratch<Scalar, 0>(panels * tn_full * k) : nullptr;
  Scalar* tile = scaled ? scratch<Scalar, 1>(tm_full * tn_full) : nullptr;
  for (Index i0 = 0; i0 < m; i0 += tm_full) {
    const Index tm = std::min(tm_full, m - i0);
    // libxsmm's B' (k×tm): op(A) rows i0.. as stored (A not transposed), or through the kernel's
    // own TRANS_B (A transposed: stored k×m, so rows i0.. of op(A) are columns i0.. of A).
    const Scalar* b_kernel = trans_a ? a + i0 : a + i0 * lda;
    for (Index j0 = 0, panel = 0; j0 < n; j0 += tn_full, ++panel) {
      const Index tn = std::min(tn_full, n - j0);
      const Scalar* a_kernel = b + j0;
      if (trans_b) {
        a_kernel = packed_b + panel * tn_full * k;
        // panel(kk, j) (column-major tn×k) = op(B)(kk, j0 + j) = B(j0 + j, kk)
        if (i0 == 0) transpose_copy(b + j0 * ldb, ldb, tn, k, const_cast<Scalar*>(a_kernel), tn_full);
      }
      const Kernel<Scalar> kernel = kernels[tm != tm_full][tn != tn_full];
      Scalar* c_tile = c + i0 * ldc + j0;
      if (prefetch_next) {
        // The next call's slice: the next column panel, or the first one again for the next row tile.
        const Scalar* next_slice = j0 + tn_full < n ? a_kernel + tn_full : b;
        kernel(a_kernel, b_kernel, c_tile, next_slice, b_kernel, c_tile);
        continue;
      }
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

/// C (m×n, row-major, row stride ldc) = A·B (+ C when `accumulate`), with A row-major (m×k, row
/// stride lda) and B (k×n) stored as column panels: panel q holds columns [q·panel_width,
/// q·panel_width + w_q) as a contiguous k×w_q row-major block starting at packed + q·panel_width·k.
/// Each kernel call reads one panel front to back, so the weights stream sequentially (the
/// hardware prefetchers follow them) instead of as k short rows one weight row apart.
/// After each output tile (rows i0..i0+tm, columns j0..j0+tn) `epilogue(i0, tm, j0, tn)` runs
/// while the tile is still in L1/L2. Returns false (having touched nothing) when libxsmm has no
/// kernel for the shape. Requires m, n, k ≥ 1 and panel_width a multiple of tile_cols.
template <typename Scalar, typename Epilogue>
bool gemm_packed(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* packed, Index panel_width,
                 Scalar* c, Index ldc, bool accumulate, Epilogue&& epilogue) {
  constexpr Index int_max = INT_MAX;
  if (m > int_max || n > int_max || k > int_max || lda > int_max || ldc > int_max || panel_width % tile_cols != 0) {
    return false;
  }
  const Index tm_full = std::min(tile_rows, m);
  const Index tm_edge = m % tm_full;
  const Index last_panel_width = n - (n - 1) / panel_width * panel_width;
  const Index panels = (n + panel_width - 1) / panel_width;
  // kernels[edge row tile][kind]: 0 a tile of a full panel (leading dimension panel_width), 1 a
  // full-width tile of the last panel, 2 the narrower edge tile of the last panel (leading
  // dimension: the last panel's width).
  Kernel<Scalar> kernels[2][3] = {{nullptr, nullptr, nullptr}, {nullptr, nullptr, nullptr}};
  const Index widths[3] = {panels > 1 ? tile_cols : 0, last_panel_width >= tile_cols ? tile_cols : 0,
                           last_panel_width % tile_cols};
  const Index leading[3] = {panel_width, last_panel_width, last_panel_width};
  for (int edge_m = 0; edge_m < 2; ++edge_m) {
    const Index tm = edge_m ? tm_edge : tm_full;
    if (tm == 0) continue;
    for (int kind = 0; kind < 3; ++kind) {
      if (widths[kind] == 0) continue;
      kernels[edge_m][kind] = dispatch<Scalar>(widths[kind], tm, k, leading[kind], lda, ldc, false, accumulate);
      if (!kernels[edge_m][kind]) return false;
    }
  }
  for (Index i0 = 0; i0 < m; i0 += tm_full) {
    const Index tm = std::min(tm_full, m - i0);
    const Scalar* a_block = a + i0 * lda;
    for (Index panel = 0; panel < panels; ++panel) {
      const Index p0 = panel * panel_width;
      const bool last = panel == panels - 1;
      const Index width = last ? last_panel_width : panel_width;
      const Scalar* panel_data = packed + p0 * k;
      for (Index j = 0; j < width; j += tile_cols) {
        const Index tn = std::min(tile_cols, width - j);
        const int kind = !last ? 0 : (tn == tile_cols ? 1 : 2);
        kernels[tm != tm_full][kind](panel_data + j, a_block, c + i0 * ldc + p0 + j);
        epilogue(i0, tm, p0 + j, tn);
      }
    }
  }
  return true;
}

}  // namespace libxsmm_backend
}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_GEMM_LIBXSMM_HPP
