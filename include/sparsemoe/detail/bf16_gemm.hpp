// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_BF16_GEMM_HPP
#define SPARSEMOE_DETAIL_BF16_GEMM_HPP

/// \file bf16_gemm.hpp
/// The product of fp32 rows and a bfloat16 weight matrix with fp32 accumulation, for serving
/// small batches whose cost is streaming the weights: Y = X·W, X fp32 (rows×k), W bfloat16 (k×n,
/// stored in 32-column panels), Y fp32. Each bfloat16 weight is widened exactly to fp32 (a 16-bit
/// shift) and multiplied into an fp32 accumulator by a fused multiply-add, k in order from 0:
/// every element of Y is Σ_k x_k·w_k rounded as a chain of fp32 FMAs, the same bits on the
/// AVX-512 kernel and on the portable one (std::fma), for any thread count.

#include "../config.hpp"
#include "half.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparsemoe {
namespace detail {

/// A k×n weight matrix rounded to bfloat16 (round to nearest even) and stored in panels of
/// `panel_width` = 32 columns: panel j is a contiguous k×32 row-major block (columns beyond n
/// in the last panel are zero), so one weight row of a panel is one 64-byte cache line.
/// Memory: 2·k·32·⌈n/32⌉ bytes.
class Bf16Weight {
 public:
  /// Columns of one panel.
  static constexpr Index panel_width = 32;

  Bf16Weight() = default;

  /// Rounds `weight` (k×n, fp32) to bfloat16 into panels. O(k·n).
  explicit Bf16Weight(const Matrix<float>& weight) : rows_(weight.rows()), cols_(weight.cols()) {
    const Index panels = (cols_ + panel_width - 1) / panel_width;
    data_.assign(static_cast<std::size_t>(panels * rows_ * panel_width), std::uint16_t(0));
    for (Index r = 0; r < rows_; ++r) {
      for (Index c = 0; c < cols_; ++c) data_[static_cast<std::size_t>(index(r, c))] = bf16_from_float(weight(r, c));
    }
  }

  /// k.
  Index rows() const { return rows_; }
  /// n.
  Index cols() const { return cols_; }
  /// Bytes of the stored panels.
  std::size_t bytes() const { return data_.size() * sizeof(std::uint16_t); }
  /// The bfloat16 bits of W(row, col).
  std::uint16_t bits(Index row, Index col) const { return data_[static_cast<std::size_t>(index(row, col))]; }
  /// W(row, col) widened to fp32 (exact).
  float value(Index row, Index col) const { return float_from_bf16(bits(row, col)); }
  /// Panel `panel` (k×32 bfloat16, row-major).
  const std::uint16_t* panel(Index panel) const { return data_.data() + panel * rows_ * panel_width; }

 private:
  Index index(Index row, Index col) const {
    return (col / panel_width) * rows_ * panel_width + row * panel_width + col % panel_width;
  }

  Index rows_ = 0;
  Index cols_ = 0;
  std::vector<std::uint16_t> data_;
};

/// Rows per block of a packed X (bf16_pack_rows).
constexpr Index bf16_row_block = 8;

/// Copies X (rows×k, row stride ldx) into `packed` in blocks of bf16_row_block rows: block b is
/// k×8 floats, X(8b + i, kk) at b·8k + 8·kk + i (rows past the end are zero). The kernels then
/// read the 8 values of one k contiguously, instead of 8 rows that may alias in the L1 cache.
/// Grows `packed` when needed (never shrinks it). O(rows·k).
inline void bf16_pack_rows(const float* x, Index ldx, Index rows, Index k, std::vector<float>& packed) {
  const Index blocks = (rows + bf16_row_block - 1) / bf16_row_block;
  const auto size = static_cast<std::size_t>(blocks * bf16_row_block * k);
  if (packed.size() < size) packed.resize(size);
  for (Index b = 0; b < blocks; ++b) {
    float* block = packed.data() + b * bf16_row_block * k;
    const Index count = std::min(bf16_row_block, rows - b * bf16_row_block);
    for (Index i = 0; i < bf16_row_block; ++i) {
      const float* row = x + (b * bf16_row_block + i) * ldx;
      for (Index kk = 0; kk < k; ++kk) block[kk * bf16_row_block + i] = i < count ? row[kk] : 0.0f;
    }
  }
}

/// Portable kernel: the first `width` columns of one panel, `rows` rows of one packed block of
/// X (k×8) times the panel, one fp32 FMA chain per element over k in order.
inline void bf16_panel_portable(const float* block, Index rows, const std::uint16_t* panel, Index k, Index width,
                                float* y, Index ldy) {
  constexpr Index w = Bf16Weight::panel_width;
  for (Index r = 0; r < rows; ++r) {
    float acc[w] = {};
    for (Index kk = 0; kk < k; ++kk) {
      const float xv = block[kk * bf16_row_block + r];
      const std::uint16_t* w_row = panel + kk * w;
      for (Index c = 0; c < width; ++c) acc[c] = std::fma(xv, float_from_bf16(w_row[c]), acc[c]);
    }
    std::copy(acc, acc + width, y + r * ldy);
  }
}

#if defined(__AVX512F__)
/// AVX-512 kernel: NR ≤ 8 rows of one packed block of X (k×8) times one whole panel, 2·NR
/// accumulators of 16 lanes; per k, one 64-byte load of 32 bfloat16, two widenings (zero-extend,
/// shift left 16), NR broadcasts and 2·NR FMAs. Stores the `width` first columns (masked).
template <int NR>
inline void bf16_panel_avx512(const float* block, const std::uint16_t* panel, Index k, Index width, float* y,
                              Index ldy) {
  __m512 acc_lo[NR], acc_hi[NR];
  for (int r = 0; r < NR; ++r) {
    acc_lo[r] = _mm512_setzero_ps();
    acc_hi[r] = _mm512_setzero_ps();
  }
  for (Index kk = 0; kk < k; ++kk) {
    const __m512i raw = _mm512_loadu_si512(static_cast<const void*>(panel + kk * Bf16Weight::panel_width));
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    const __m512 hi =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
    const float* x = block + kk * bf16_row_block;
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r]);
      acc_lo[r] = _mm512_fmadd_ps(xv, lo, acc_lo[r]);
      acc_hi[r] = _mm512_fmadd_ps(xv, hi, acc_hi[r]);
    }
  }
  const Index lo_width = std::min<Index>(width, 16);
  const Index hi_width = width - lo_width;
  const __mmask16 lo_mask = static_cast<__mmask16>((1u << lo_width) - 1u);
  const __mmask16 hi_mask = static_cast<__mmask16>((1u << hi_width) - 1u);
  for (int r = 0; r < NR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, lo_mask, acc_lo[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, hi_mask, acc_hi[r]);
  }
}

/// The AVX-512 kernel for `rows` (1 … 8) rows of one packed block.
inline void bf16_block_avx512(const float* block, Index rows, const std::uint16_t* panel, Index k, Index width,
                              float* y, Index ldy) {
  switch (rows) {
    case 8: bf16_panel_avx512<8>(block, panel, k, width, y, ldy); break;
    case 7: bf16_panel_avx512<7>(block, panel, k, width, y, ldy); break;
    case 6: bf16_panel_avx512<6>(block, panel, k, width, y, ldy); break;
    case 5: bf16_panel_avx512<5>(block, panel, k, width, y, ldy); break;
    case 4: bf16_panel_avx512<4>(block, panel, k, width, y, ldy); break;
    case 3: bf16_panel_avx512<3>(block, panel, k, width, y, ldy); break;
    case 2: bf16_panel_avx512<2>(block, panel, k, width, y, ldy); break;
    case 1: bf16_panel_avx512<1>(block, panel, k, width, y, ldy); break;
    default: break;
  }
}
#endif

/// Columns [first_col, first_col + cols) of Y = X·W: `packed_x` is X (rows×k fp32) as
/// bf16_pack_rows leaves it, W a Bf16Weight (k×n), `y` points at Y(0, first_col) (row stride
/// ldy). first_col must be a multiple of 32 (a panel boundary). Writes (does not accumulate).
/// `vector_kernel`: the AVX-512 kernel where compiled in (else the portable one; same bits).
/// Panel by panel, all row blocks of one panel before the next: each panel is read from memory
/// once. Cost: 2·rows·k·cols flops, 2·k·cols bytes of weights streamed.
inline void bf16_gemm(const float* packed_x, Index rows, const Bf16Weight& w, Index first_col, Index cols, float* y,
                      Index ldy, bool vector_kernel) {
  SPARSEMOE_ASSERT(first_col % Bf16Weight::panel_width == 0 && first_col + cols <= w.cols());
  if (rows == 0 || cols == 0) return;
  const Index k = w.rows();
#if !defined(__AVX512F__)
  static_cast<void>(vector_kernel);
#endif
  for (Index col = first_col; col < first_col + cols; col += Bf16Weight::panel_width) {
    const Index width = std::min(Bf16Weight::panel_width, first_col + cols - col);
    const std::uint16_t* panel = w.panel(col / Bf16Weight::panel_width);
    for (Index r = 0; r < rows; r += bf16_row_block) {
      const Index count = std::min(bf16_row_block, rows - r);
      const float* block = packed_x + r * k;
      float* y_block = y + r * ldy + (col - first_col);
#if defined(__AVX512F__)
      if (vector_kernel) {
        bf16_block_avx512(block, count, panel, k, width, y_block, ldy);
        continue;
      }
#endif
      bf16_panel_portable(block, count, panel, k, width, y_block, ldy);
    }
  }
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_BF16_GEMM_HPP
