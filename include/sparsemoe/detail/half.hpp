// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_HALF_HPP
#define SPARSEMOE_DETAIL_HALF_HPP

/// \file half.hpp
/// Conversions between IEEE-754 binary32 and the 16-bit formats of model files: binary16 (F16)
/// and bfloat16 (BF16), as raw bit patterns; and the widening of the 8-bit float formats
/// F8_E4M3 (the "fn" variant: no infinities) and F8_E5M2. Widening is exact (every 16-bit value, subnormals,
/// infinities and NaN payloads included, maps to the float with the same value); narrowing rounds
/// to nearest, ties to even, overflows to infinity and keeps NaNs NaN (quiet).

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparsemoe {
namespace detail {

/// The bits of `value`.
inline std::uint32_t float_bits(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

/// The float with bits `bits`.
inline float float_from_bits(std::uint32_t bits) {
  float value = 0;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

/// bfloat16 → float: the upper half of the float's bits (exact).
inline float float_from_bf16(std::uint16_t bits) { return float_from_bits(static_cast<std::uint32_t>(bits) << 16); }

/// float → bfloat16, rounding to nearest even; NaN stays NaN (quiet bit set).
inline std::uint16_t bf16_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

/// binary16 → float (exact): subnormals scale by 2^−24, exponent 31 gives ±∞ or a NaN with the
/// same payload.
inline float float_from_f16(std::uint16_t half) {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1Fu;
  const std::uint32_t mantissa = half & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign != 0 ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// F8_E4M3 → float (exact): 4 exponent bits with bias 7, 3 mantissa bits, subnormals m·2^−9,
/// no infinities, S.1111.111 is NaN; the largest value is 448.
inline float float_from_f8_e4m3(std::uint8_t bits) {
  const int exponent = (bits >> 3) & 15;
  const int mantissa = bits & 7;
  float magnitude = 0;
  if (exponent == 15 && mantissa == 7) {
    magnitude = float_from_bits(0x7FC00000u);
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  }
  return (bits & 0x80u) != 0 ? -magnitude : magnitude;
}

/// F8_E5M2 → float (exact): the upper byte of a binary16.
inline float float_from_f8_e5m2(std::uint8_t bits) { return float_from_f16(static_cast<std::uint16_t>(bits << 8)); }

/// float → binary16, rounding to nearest even; magnitudes from 65520 on become ±∞, NaN stays NaN.
inline std::uint16_t f16_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {  // NaN: keep the top payload bits, force quiet
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  if (magnitude >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // ≥ 65520: overflow
  if (magnitude < 0x38800000u) {  // below 2^−14: a binary16 subnormal (or 0, or the smallest normal)
    // |value|·2^24 is exact; nearbyint rounds it to nearest even in the default rounding mode.
    const float scaled = std::ldexp(float_from_bits(magnitude), 24);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(scaled)));
  }
  const std::uint32_t exponent = (magnitude >> 23) - 112u;
  std::uint32_t half = (exponent << 10) | ((magnitude >> 13) & 0x3FFu);
  const std::uint32_t rest = magnitude & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u) != 0)) ++half;  // a carry may reach the exponent
  return static_cast<std::uint16_t>(sign | half);
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_HALF_HPP
