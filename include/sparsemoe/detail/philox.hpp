// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_PHILOX_HPP
#define SPARSEMOE_DETAIL_PHILOX_HPP

#include <array>
#include <cmath>
#include <cstdint>

namespace sparsemoe {
namespace detail {

/// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
/// SC 2011): a counter-based generator, so a number depends only on (counter, key) and never on
/// which thread asks or in which order. Cost: 10 rounds of two 32×32→64-bit multiplies.
inline std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> counter,
                                                  std::array<std::uint32_t, 2> key) {
  constexpr std::uint64_t multiplier0 = 0xD2511F53u;
  constexpr std::uint64_t multiplier1 = 0xCD9E8D57u;
  constexpr std::uint32_t weyl0 = 0x9E3779B9u;
  constexpr std::uint32_t weyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += weyl0;
      key[1] += weyl1;
    }
    const std::uint64_t product0 = multiplier0 * counter[0];
    const std::uint64_t product1 = multiplier1 * counter[2];
    counter = {static_cast<std::uint32_t>(product1 >> 32) ^ counter[1] ^ key[0],
               static_cast<std::uint32_t>(product1),
               static_cast<std::uint32_t>(product0 >> 32) ^ counter[3] ^ key[1],
               static_cast<std::uint32_t>(product0)};
  }
  return counter;
}

/// One standard normal sample N(0, 1) addressed by (seed, step, token, expert).
///
/// Philox4x32-10 with counter (expert, token low word, token high word, step) and key = seed
/// gives 128 random bits; two 53-bit uniforms u1 ∈ (0, 1], u2 ∈ [0, 1) enter the Box–Muller
/// transform sqrt(−2 ln u1)·cos(2π u2), evaluated in double. `step` and `expert` must be below
/// 2^32 (callers check). The same address always gives the same value, for float and double alike
/// up to the final rounding.
inline double standard_normal(std::uint64_t seed, std::uint64_t step, std::uint64_t token,
                              std::uint64_t expert) {
  const std::array<std::uint32_t, 4> bits = philox4x32_10(
      {static_cast<std::uint32_t>(expert), static_cast<std::uint32_t>(token),
       static_cast<std::uint32_t>(token >> 32), static_cast<std::uint32_t>(step)},
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
  constexpr double two_to_minus_53 = 1.0 / 9007199254740992.0;
  const std::uint64_t word0 = (static_cast<std::uint64_t>(bits[0]) << 32 | bits[1]) >> 11;
  const std::uint64_t word1 = (static_cast<std::uint64_t>(bits[2]) << 32 | bits[3]) >> 11;
  const double u1 = (static_cast<double>(word0) + 1.0) * two_to_minus_53;
  const double u2 = static_cast<double>(word1) * two_to_minus_53;
  constexpr double two_pi = 6.283185307179586476925286766559;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
}

/// A 64-bit seed mixed into a sequence of well-spread 64-bit values (splitmix64), used to derive
/// independent seeds for parameter initialisation.
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_PHILOX_HPP
