// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Unit tests of the counter-based generator behind the gate noise:
//   * detail::philox4x32_10 against the published Random123 known-answer vectors, against an
//     independent implementation written here from Salmon et al. (SC 2011), and, when the
//     Random123 headers are installed, against Random123's own philox4x32_R(10, ...);
//   * detail::standard_normal against its documented construction (counter layout, 53-bit
//     uniforms, Box–Muller in double) and statistically against N(0, 1): moments, a
//     Kolmogorov–Smirnov bound, a binned chi-square test and correlations between neighbouring
//     addresses. Every statistical check uses a fixed address range, so it is deterministic.
#include <sparsemoe/detail/philox.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#if __has_include(<Random123/philox.h>)
#include <Random123/philox.h>
#define SPARSEMOE_TEST_HAVE_RANDOM123 1
#else
#define SPARSEMOE_TEST_HAVE_RANDOM123 0
#endif

namespace {

using Counter = std::array<std::uint32_t, 4>;
using Key = std::array<std::uint32_t, 2>;

// ---------------------------------------------------------------------------------------------
// Independent reference: Philox4x32-10 from the paper's description.
//   round:  (L0, R0, L1, R1) -> (hi(M1·R1)^L1... ) written with 64-bit products split by hand,
//   key schedule: k0 += 0x9E3779B9 (golden ratio), k1 += 0xBB67AE85 (sqrt(3) - 1).
// Written with the "two-word" formulation of the paper (pairs of (hi, lo) products).
// ---------------------------------------------------------------------------------------------
void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t product = std::uint64_t{a} * std::uint64_t{b};
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product & 0xFFFFFFFFu);
}

Counter reference_philox(Counter x, Key k, int rounds = 10) {
  for (int r = 0; r < rounds; ++r) {
    std::uint32_t hi0 = 0, lo0 = 0, hi1 = 0, lo1 = 0;
    mulhilo32(0xD2511F53u, x[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, x[2], hi1, lo1);
    const Counter next{hi1 ^ x[1] ^ k[0], lo1, hi0 ^ x[3] ^ k[1], lo0};
    x = next;
    k[0] = static_cast<std::uint32_t>(k[0] + 0x9E3779B9u);
    k[1] = static_cast<std::uint32_t>(k[1] + 0xBB67AE85u);
  }
  return x;
}

#if SPARSEMOE_TEST_HAVE_RANDOM123
Counter random123_philox(const Counter& x, const Key& k) {
  philox4x32_ctr_t ctr = {{x[0], x[1], x[2], x[3]}};
  philox4x32_key_t key = {{k[0], k[1]}};
  const philox4x32_ctr_t out = philox4x32_R(10, ctr, key);
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}
#endif

// The documented construction of detail::standard_normal, re-derived here: counter
// (expert, token low word, token high word, step), key (seed low word, seed high word);
// word0 = (bits0:bits1) >> 11, word1 = (bits2:bits3) >> 11; u1 = (word0 + 1)/2^53,
// u2 = word1/2^53; z = sqrt(-2 ln u1)·cos(2π u2).
double reference_normal(std::uint64_t seed, std::uint64_t step, std::uint64_t token, std::uint64_t expert) {
  const Counter ctr{static_cast<std::uint32_t>(expert & 0xFFFFFFFFu), static_cast<std::uint32_t>(token & 0xFFFFFFFFu),
                    static_cast<std::uint32_t>(token >> 32), static_cast<std::uint32_t>(step & 0xFFFFFFFFu)};
  const Key key{static_cast<std::uint32_t>(seed & 0xFFFFFFFFu), static_cast<std::uint32_t>(seed >> 32)};
#if SPARSEMOE_TEST_HAVE_RANDOM123
  const Counter bits = random123_philox(ctr, key);
#else
  const Counter bits = reference_philox(ctr, key);
#endif
  const std::uint64_t hi = (std::uint64_t{bits[0]} << 32) | bits[1];
  const std::uint64_t lo = (std::uint64_t{bits[2]} << 32) | bits[3];
  const double u1 = std::ldexp(static_cast<double>((hi >> 11) + 1), -53);
  const double u2 = std::ldexp(static_cast<double>(lo >> 11), -53);
  const double pi = std::acos(-1.0);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * pi * u2);
}

double phi_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

::testing::AssertionResult same_words(const Counter& actual, const Counter& expected) {
  if (actual == expected) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure();
  failure << std::hex << "got {";
  for (auto w : actual) failure << " 0x" << w;
  failure << " }, expected {";
  for (auto w : expected) failure << " 0x" << w;
  return failure << " }";
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10
// ---------------------------------------------------------------------------------------------

// Random123's kat_vectors, "philox4x32 10" lines (published test vectors).
TEST(Philox4x32_10, KnownAnswerZero) {
  EXPECT_TRUE(same_words(sparsemoe::detail::philox4x32_10({0u, 0u, 0u, 0u}, {0u, 0u}),
                         {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
}

TEST(Philox4x32_10, KnownAnswerAllOnes) {
  EXPECT_TRUE(same_words(sparsemoe::detail::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                                          {0xffffffffu, 0xffffffffu}),
                         {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
}

TEST(Philox4x32_10, KnownAnswerPi) {
  EXPECT_TRUE(same_words(sparsemoe::detail::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                                          {0xa4093822u, 0x299f31d0u}),
                         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

// The in-test reference must itself reproduce the published vectors, or it proves nothing.
TEST(Philox4x32_10, InTestReferenceReproducesKnownAnswers) {
  EXPECT_TRUE(same_words(reference_philox({0u, 0u, 0u, 0u}, {0u, 0u}),
                         {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_TRUE(same_words(reference_philox({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                                          {0xa4093822u, 0x299f31d0u}),
                         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Philox4x32_10, MatchesIndependentReferenceOnRandomInputs) {
  std::mt19937_64 rng(20260101);
  std::uniform_int_distribution<std::uint32_t> word;
  for (int trial = 0; trial < 4096; ++trial) {
    const Counter ctr{word(rng), word(rng), word(rng), word(rng)};
    const Key key{word(rng), word(rng)};
    ASSERT_TRUE(same_words(sparsemoe::detail::philox4x32_10(ctr, key), reference_philox(ctr, key)))
        << "trial " << trial;
  }
}

TEST(Philox4x32_10, MatchesRandom123OnRandomInputs) {
#if SPARSEMOE_TEST_HAVE_RANDOM123
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<std::uint32_t> word;
  // Published vectors through Random123 itself (guards the harness).
  ASSERT_TRUE(same_words(random123_philox({0u, 0u, 0u, 0u}, {0u, 0u}),
                         {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  for (int trial = 0; trial < 4096; ++trial) {
    // Mix fully random words with small counters (the library's typical use: expert, token, step).
    const bool small = trial % 2 == 1;
    const Counter ctr{small ? word(rng) % 64 : word(rng), small ? static_cast<std::uint32_t>(trial) : word(rng),
                      small ? 0u : word(rng), small ? word(rng) % 1000 : word(rng)};
    const Key key{word(rng), small ? 0u : word(rng)};
    ASSERT_TRUE(same_words(sparsemoe::detail::philox4x32_10(ctr, key), random123_philox(ctr, key)))
        << "trial " << trial;
  }
#else
  GTEST_SKIP() << "<Random123/philox.h> not available";
#endif
}

TEST(Philox4x32_10, EveryInputWordMatters) {
  const Counter base{1u, 2u, 3u, 4u};
  const Key base_key{5u, 6u};
  const Counter reference = sparsemoe::detail::philox4x32_10(base, base_key);
  for (int i = 0; i < 4; ++i) {
    Counter ctr = base;
    ctr[static_cast<std::size_t>(i)] ^= 1u;
    EXPECT_NE(sparsemoe::detail::philox4x32_10(ctr, base_key), reference) << "counter word " << i;
  }
  for (int i = 0; i < 2; ++i) {
    Key key = base_key;
    key[static_cast<std::size_t>(i)] ^= 0x80000000u;
    EXPECT_NE(sparsemoe::detail::philox4x32_10(base, key), reference) << "key word " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// standard_normal
// ---------------------------------------------------------------------------------------------

TEST(StandardNormal, MatchesDocumentedConstruction) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 4096; ++trial) {
    const std::uint64_t seed = trial < 16 ? static_cast<std::uint64_t>(trial) : rng();
    const std::uint64_t step = rng() & 0xFFFFFFFFu;
    const std::uint64_t token = trial % 3 == 0 ? rng() : rng() % 100000;  // incl. tokens ≥ 2^32
    const std::uint64_t expert = rng() % 4096;
    const double expected = reference_normal(seed, step, token, expert);
    const double actual = sparsemoe::detail::standard_normal(seed, step, token, expert);
    ASSERT_NEAR(actual, expected, 1e-14 * (1.0 + std::abs(expected)))
        << "seed " << seed << " step " << step << " token " << token << " expert " << expert;
  }
}

TEST(StandardNormal, Deterministic) {
  for (std::uint64_t t = 0; t < 100; ++t) {
    const double a = sparsemoe::detail::standard_normal(123, 4, t, t % 7);
    const double b = sparsemoe::detail::standard_normal(123, 4, t, t % 7);
    EXPECT_EQ(a, b);  // bitwise: the value depends only on the address
  }
}

TEST(StandardNormal, EveryAddressComponentMatters) {
  using sparsemoe::detail::standard_normal;
  const double base = standard_normal(11, 5, 9, 3);
  EXPECT_NE(standard_normal(12, 5, 9, 3), base);
  EXPECT_NE(standard_normal(11 + (std::uint64_t{1} << 32), 5, 9, 3), base);  // seed high word
  EXPECT_NE(standard_normal(11, 6, 9, 3), base);
  EXPECT_NE(standard_normal(11, 5, 10, 3), base);
  EXPECT_NE(standard_normal(11, 5, 9 + (std::uint64_t{1} << 32), 3), base);  // token high word
  EXPECT_NE(standard_normal(11, 5, 9, 4), base);
}

// Samples at addresses (seed, step, token, expert) with token = i / 8, expert = i % 8.
std::vector<double> normal_samples(std::size_t count, std::uint64_t seed = 2026, std::uint64_t step = 3) {
  std::vector<double> samples(count);
  for (std::size_t i = 0; i < count; ++i) {
    samples[i] = sparsemoe::detail::standard_normal(seed, step, i / 8, i % 8);
  }
  return samples;
}

constexpr std::size_t sample_count = std::size_t{1} << 18;

TEST(StandardNormal, MomentsMatchStandardNormal) {
  const std::vector<double> z = normal_samples(sample_count);
  const double n = static_cast<double>(z.size());
  double mean = 0;
  for (double v : z) mean += v;
  mean /= n;
  double m2 = 0, m3 = 0, m4 = 0;
  for (double v : z) {
    const double c = v - mean;
    m2 += c * c;
    m3 += c * c * c;
    m4 += c * c * c * c;
  }
  m2 /= n;
  m3 /= n;
  m4 /= n;
  const double skewness = m3 / std::pow(m2, 1.5);
  const double kurtosis = m4 / (m2 * m2);
  // Five standard errors each: SE(mean) = 1/√n, SE(var) = √(2/n), SE(skew) ≈ √(6/n), SE(kurt) ≈ √(24/n).
  EXPECT_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(m2, 1.0, 5.0 * std::sqrt(2.0 / n));
  EXPECT_NEAR(skewness, 0.0, 5.0 * std::sqrt(6.0 / n));
  EXPECT_NEAR(kurtosis, 3.0, 5.0 * std::sqrt(24.0 / n));
  for (double v : z) {
    ASSERT_TRUE(std::isfinite(v));
    // u1 ≥ 2^-53, so |z| ≤ sqrt(2·53·ln 2) ≈ 8.57.
    ASSERT_LE(std::abs(v), 8.58);
  }
}

TEST(StandardNormal, KolmogorovSmirnovAgainstPhi) {
  std::vector<double> z = normal_samples(sample_count, 99, 0);
  std::sort(z.begin(), z.end());
  const double n = static_cast<double>(z.size());
  double d = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double f = phi_cdf(z[i]);
    d = std::max(d, std::max(static_cast<double>(i + 1) / n - f, f - static_cast<double>(i) / n));
  }
  // Critical value of the one-sample KS statistic at α = 0.001: 1.95/√n.
  EXPECT_LT(d, 1.95 / std::sqrt(n)) << "KS distance " << d;
}

TEST(StandardNormal, BinnedChiSquareIncludingTails) {
  const std::vector<double> z = normal_samples(sample_count, 5, 77);
  // 16 bins: (−∞, −3.5], (−3.5, −3], …, (3, 3.5], (3.5, ∞).
  std::vector<double> edges;
  for (int i = -7; i <= 7; ++i) edges.push_back(0.5 * i);
  std::vector<double> observed(edges.size() + 1, 0.0);
  for (double v : z) {
    const auto bin = static_cast<std::size_t>(std::upper_bound(edges.begin(), edges.end(), v) - edges.begin());
    observed[bin] += 1;
  }
  const double n = static_cast<double>(z.size());
  double chi2 = 0;
  for (std::size_t b = 0; b < observed.size(); ++b) {
    const double lo = b == 0 ? 0.0 : phi_cdf(edges[b - 1]);
    const double hi = b == edges.size() ? 1.0 : phi_cdf(edges[b]);
    const double expected = n * (hi - lo);
    chi2 += (observed[b] - expected) * (observed[b] - expected) / expected;
  }
  // χ² with 15 degrees of freedom: the 0.999 quantile is 37.70.
  EXPECT_LT(chi2, 37.70);
}

double correlation(const std::vector<double>& a, const std::vector<double>& b) {
  const double n = static_cast<double>(a.size());
  double ma = 0, mb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ma += a[i];
    mb += b[i];
  }
  ma /= n;
  mb /= n;
  double sab = 0, saa = 0, sbb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    sab += (a[i] - ma) * (b[i] - mb);
    saa += (a[i] - ma) * (a[i] - ma);
    sbb += (b[i] - mb) * (b[i] - mb);
  }
  return sab / std::sqrt(saa * sbb);
}

TEST(StandardNormal, NeighbouringAddressesAreUncorrelated) {
  using sparsemoe::detail::standard_normal;
  const std::size_t n = 1 << 16;
  std::vector<double> base(n), next_expert(n), next_token(n), next_step(n), next_seed(n), far_token(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t token = i;
    base[i] = standard_normal(17, 100, token, 2);
    next_expert[i] = standard_normal(17, 100, token, 3);
    next_token[i] = standard_normal(17, 100, token + 1, 2);
    next_step[i] = standard_normal(17, 101, token, 2);
    next_seed[i] = standard_normal(18, 100, token, 2);
    far_token[i] = standard_normal(17, 100, token + (std::uint64_t{1} << 32), 2);
  }
  const double bound = 5.0 / std::sqrt(static_cast<double>(n));
  EXPECT_LT(std::abs(correlation(base, next_expert)), bound);
  EXPECT_LT(std::abs(correlation(base, next_token)), bound);
  EXPECT_LT(std::abs(correlation(base, next_step)), bound);
  EXPECT_LT(std::abs(correlation(base, next_seed)), bound);
  EXPECT_LT(std::abs(correlation(base, far_token)), bound);
  // And the squares (a dependence in scale would show here, not in the plain correlation).
  auto squares = [](std::vector<double> v) {
    for (double& x : v) x *= x;
    return v;
  };
  EXPECT_LT(std::abs(correlation(squares(base), squares(next_expert))), bound);
  EXPECT_LT(std::abs(correlation(squares(base), squares(next_step))), bound);
}

}  // namespace
