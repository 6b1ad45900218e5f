// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// MoELayer forward against a naive per-token loop in double written here. The routing is verified
// independently too (clean logits x·W_g, noise scale softplus(x·W_noise) + ε and noisy logits
// recomputed in double; top-k with ties to the lower id; softmax gates), so the layer check is not
// circular; so are the auxiliary losses (importance, hard and smooth load, CV² with the population
// variance). Also: thread-count and run-to-run bitwise determinism, the noise sample's addressing,
// parameter views, and the errors the layer raises.
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

constexpr double kPi = 3.141592653589793238462643383279502884;

// ---- Independent references ---------------------------------------------------------------------
double ref_silu(double a) { return a / (1.0 + std::exp(-a)); }
template <typename Activation>
double ref_act(double a);
template <>
double ref_act<sparsemoe::Relu>(double a) { return a > 0 ? a : 0.0; }
template <>
double ref_act<sparsemoe::Silu>(double a) { return ref_silu(a); }
template <>
double ref_act<sparsemoe::GeluTanh>(double a) {
  return 0.5 * a * (1.0 + std::tanh(std::sqrt(2.0 / kPi) * (a + 0.044715 * a * a * a)));
}
template <>
double ref_act<sparsemoe::GeluErf>(double a) { return 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0))); }

double ref_softplus(double a) { return a > 30 ? a : std::log1p(std::exp(a)); }
double ref_normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

template <typename ExpertT>
struct Traits;
template <typename Scalar, typename Act>
struct Traits<sparsemoe::Expert<Scalar, Act>> {
  static constexpr bool is_swiglu = false;
  static double act(double a) { return ref_act<Act>(a); }
  static std::string name() { return std::string(Act::name) + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};
template <typename Scalar>
struct Traits<sparsemoe::SwiGluExpert<Scalar>> {
  static constexpr bool is_swiglu = true;
  static double act(double a) { return ref_silu(a); }
  static std::string name() { return std::string("swiglu") + (std::is_same<Scalar, float>::value ? "_float" : "_double"); }
};

/// E(x) of one expert for one token, in double with plain loops, and a bound on the magnitude of
/// the summed terms (out_scale) for the tolerance.
template <typename ExpertT>
void naive_expert(const ExpertT& expert, const std::vector<double>& x, std::vector<double>& out,
                  std::vector<double>& out_scale) {
  const Index d = expert.input_dim(), h = expert.hidden_dim();
  const Index p = Traits<ExpertT>::is_swiglu ? 2 * h : h;
  std::vector<double> pre(p), pre_scale(p), hidden(h), hidden_scale(h);
  for (Index j = 0; j < p; ++j) {
    double sum = 0, scale = 0;
    for (Index i = 0; i < d; ++i) {
      const double term = x[i] * static_cast<double>(expert.w1()(i, j));
      sum += term;
      scale += std::fabs(term);
    }
    if (expert.b1().size() > 0) {
      sum += expert.b1()(j);
      scale += std::fabs(static_cast<double>(expert.b1()(j)));
    }
    pre[j] = sum;
    pre_scale[j] = scale;
  }
  for (Index j = 0; j < h; ++j) {
    if (Traits<ExpertT>::is_swiglu) {
      hidden[j] = ref_silu(pre[j]) * pre[h + j];
      hidden_scale[j] =
          std::fabs(hidden[j]) + 1.1 * pre_scale[j] * std::fabs(pre[h + j]) + std::fabs(ref_silu(pre[j])) * pre_scale[h + j];
    } else {
      hidden[j] = Traits<ExpertT>::act(pre[j]);
      hidden_scale[j] = std::fabs(hidden[j]) + 1.2 * pre_scale[j];
    }
  }
  out.assign(d, 0.0);
  out_scale.assign(d, 0.0);
  for (Index c = 0; c < d; ++c) {
    double sum = 0, scale = 0;
    for (Index j = 0; j < h; ++j) {
      sum += hidden[j] * static_cast<double>(expert.w2()(j, c));
      scale += hidden_scale[j] * std::fabs(static_cast<double>(expert.w2()(j, c)));
    }
    if (expert.b2().size() > 0) {
      sum += expert.b2()(c);
      scale += std::fabs(static_cast<double>(expert.b2()(c)));
    }
    out[c] = sum;
    out_scale[c] = scale;
  }
}

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::mt19937_64& generator, double low = -1.0, double high = 1.0) {
  std::uniform_real_distribution<double> uniform(low, high);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(uniform(generator));
  return m;
}

template <typename Scalar>
bool bitwise_equal(const Scalar* a, const Scalar* b, Index size) {
  return size == 0 || std::memcmp(a, b, static_cast<std::size_t>(size) * sizeof(Scalar)) == 0;
}
template <typename MatrixType>
bool bitwise_equal(const MatrixType& a, const MatrixType& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && bitwise_equal(a.data(), b.data(), a.size());
}

#ifdef _OPENMP
class ThreadCount {
 public:
  explicit ThreadCount(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};
#endif

template <typename Scalar>
double output_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}
// Absolute tolerance on logits (|x|, |W| ≤ 1, d ≤ 40), and a gap below which two logits count as
// tied for the top-k comparison (rounding in the library's precision may order them either way).
template <typename Scalar>
double logit_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-12;
}
template <typename Scalar>
double gate_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

/// Logits recomputed in double from the layer's gate weights and the input, with the magnitude of
/// what was summed into each (`*_size`), which bounds the library's rounding error.
struct ReferenceLogits {
  Matrix<double> clean, raw, scale, noisy;
  Matrix<double> clean_size, raw_size, noisy_size;
};

/// The noise floor ε of the layers in this file: MoEConfig's documented default, unless a test
/// sets another (the reference never asks the layer for it).
constexpr double kDefaultNoiseEpsilon = 1e-2;

template <typename LayerT>
ReferenceLogits reference_logits(const LayerT& layer, const Matrix<typename LayerT::Scalar>& input,
                                 const sparsemoe::Routing<typename LayerT::Scalar>& routing, bool training,
                                 double epsilon = kDefaultNoiseEpsilon) {
  const Index T = input.rows(), d = input.cols(), E = layer.num_experts();
  const auto& wg = layer.gate().gate_weight();
  const auto& wn = layer.gate().noise_weight();
  ReferenceLogits ref;
  ref.clean = Matrix<double>::Zero(T, E);
  ref.raw = Matrix<double>::Zero(T, E);
  ref.scale = Matrix<double>::Zero(T, E);
  ref.noisy = Matrix<double>::Zero(T, E);
  ref.clean_size = Matrix<double>::Zero(T, E);
  ref.raw_size = Matrix<double>::Zero(T, E);
  ref.noisy_size = Matrix<double>::Zero(T, E);
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e) {
      double c = 0, r = 0, c_size = 0, r_size = 0;
      for (Index i = 0; i < d; ++i) {
        c += static_cast<double>(input(t, i)) * static_cast<double>(wg(i, e));
        r += static_cast<double>(input(t, i)) * static_cast<double>(wn(i, e));
        c_size += std::fabs(static_cast<double>(input(t, i)) * static_cast<double>(wg(i, e)));
        r_size += std::fabs(static_cast<double>(input(t, i)) * static_cast<double>(wn(i, e)));
      }
      ref.clean(t, e) = c;
      ref.raw(t, e) = r;
      ref.clean_size(t, e) = 1 + c_size;
      ref.raw_size(t, e) = 1 + r_size;
      ref.scale(t, e) = ref_softplus(r) + epsilon;
      // The noise sample n itself is the library's (Philox); everything around it is ours.
      const double n = training ? static_cast<double>(routing.noise(t, e)) : 0.0;
      ref.noisy(t, e) = training ? c + n * ref.scale(t, e) : c;
      // softplus' ≤ 1: an error δr in r moves s by at most δr.
      ref.noisy_size(t, e) = ref.clean_size(t, e) + std::fabs(n) * (ref.raw_size(t, e) + ref.scale(t, e));
    }
  }
  return ref;
}

/// Expert ids by descending value, ties to the lower id (a stable sort of 0..E−1).
std::vector<Index> ranking(const Matrix<double>& logits, Index t) {
  std::vector<Index> order(static_cast<std::size_t>(logits.cols()));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return logits(t, a) > logits(t, b); });
  return order;
}

/// Checks result.routing against the double reference. Tokens whose top-(k+1) logits are closer
/// than `tie_gap` (relative to the size of their terms) are left out of the id comparison (they may legitimately order either way in
/// float); returns how many were left out.
template <typename LayerT>
Index check_routing(const LayerT& layer, const Matrix<typename LayerT::Scalar>& input,
                    const sparsemoe::ForwardResult<typename LayerT::Scalar>& result, bool training, double tie_gap,
                    double epsilon = kDefaultNoiseEpsilon) {
  using Scalar = typename LayerT::Scalar;
  const auto& routing = result.routing;
  const Index T = input.rows(), E = layer.num_experts(), k = layer.k();
  EXPECT_EQ(routing.expert_ids.rows(), T);
  EXPECT_EQ(routing.expert_ids.cols(), k);
  EXPECT_EQ(routing.gates.rows(), T);
  EXPECT_EQ(routing.gates.cols(), k);
  EXPECT_EQ(routing.clean_logits.rows(), T);
  EXPECT_EQ(routing.clean_logits.cols(), E);
  EXPECT_EQ(routing.noisy(), training);
  if (training) {
    EXPECT_EQ(routing.noise.rows(), T);
    EXPECT_EQ(routing.noise.cols(), E);
  } else {
    EXPECT_EQ(routing.noise.size(), 0);
    EXPECT_EQ(routing.raw_noise.size(), 0);
    EXPECT_EQ(routing.noise_scale.size(), 0);
    EXPECT_TRUE(bitwise_equal(routing.noisy_logits, routing.clean_logits));
  }
  const ReferenceLogits ref = reference_logits(layer, input, routing, training, epsilon);
  const double logit_tol = logit_tolerance<Scalar>();
  const bool smooth_load = training && k < E;
  EXPECT_EQ(routing.has_smooth_load(), smooth_load);
  EXPECT_EQ(routing.kth_expert.size(), smooth_load ? T : 0);
  EXPECT_EQ(routing.next_expert.size(), smooth_load ? T : 0);
  Index skipped = 0;
  for (Index t = 0; t < T; ++t) {
    for (Index e = 0; e < E; ++e) {
      EXPECT_NEAR(routing.clean_logits(t, e), ref.clean(t, e), logit_tol * ref.clean_size(t, e))
          << "clean logit (" << t << ", " << e << ")";
      EXPECT_NEAR(routing.noisy_logits(t, e), ref.noisy(t, e), logit_tol * ref.noisy_size(t, e))
          << "noisy logit (" << t << ", " << e << ")";
      if (training) {
        EXPECT_NEAR(routing.noise_scale(t, e), ref.scale(t, e), logit_tol * (ref.raw_size(t, e) + ref.scale(t, e)))
            << "noise scale (" << t << ", " << e << ")";
        EXPECT_GE(routing.noise_scale(t, e), static_cast<Scalar>(epsilon));
      }
    }
    // Top-k with ties to the lower id, largest first.
    const std::vector<Index> order = ranking(ref.noisy, t);
    bool near_tie = false;
    for (Index j = 1; j < std::min(k + 1, E); ++j) {
      const double size = std::max(ref.noisy_size(t, order[j - 1]), ref.noisy_size(t, order[j]));
      near_tie = near_tie || ref.noisy(t, order[j - 1]) - ref.noisy(t, order[j]) < tie_gap * size;
    }
    if (near_tie) {
      ++skipped;
    } else {
      for (Index j = 0; j < k; ++j) {
        EXPECT_EQ(routing.expert_ids(t, j), order[j]) << "token " << t << " slot " << j;
      }
      // The experts holding the k-th and (k+1)-th largest noisy logit (for the load estimator).
      if (smooth_load) {
        EXPECT_EQ(routing.kth_expert[t], order[k - 1]) << "token " << t;
        EXPECT_EQ(routing.next_expert[t], order[k]) << "token " << t;
      }
    }
    // Ids valid and distinct whatever happened.
    std::vector<bool> seen(static_cast<std::size_t>(E), false);
    for (Index j = 0; j < k; ++j) {
      const Index id = routing.expert_ids(t, j);
      EXPECT_TRUE(id >= 0 && id < E) << "token " << t << " id " << id;
      if (id < 0 || id >= E) continue;
      EXPECT_FALSE(seen[id]) << "token " << t << " chose expert " << id << " twice";
      seen[id] = true;
    }
    // Gates: softmax of the chosen noisy logits, in double, max subtracted.
    double top = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < k; ++j) top = std::max(top, ref.noisy(t, routing.expert_ids(t, j)));
    double sum = 0;
    for (Index j = 0; j < k; ++j) sum += std::exp(ref.noisy(t, routing.expert_ids(t, j)) - top);
    double gate_sum = 0;
    for (Index j = 0; j < k; ++j) {
      const double expected = std::exp(ref.noisy(t, routing.expert_ids(t, j)) - top) / sum;
      EXPECT_NEAR(routing.gates(t, j), expected, gate_tolerance<Scalar>()) << "gate (" << t << ", " << j << ")";
      gate_sum += routing.gates(t, j);
      if (j > 0) {
        EXPECT_GE(routing.gates(t, j - 1), routing.gates(t, j)) << "gates not by descending logit";
      }
    }
    if (k > 0 && T > 0) {
      EXPECT_NEAR(gate_sum, 1.0, 4 * k * std::numeric_limits<Scalar>::epsilon()) << "token " << t;
    }
  }
  return skipped;
}

/// y against Σ_slot g(t, slot)·E_{id(t, slot)}(x_t) with the library's routing, naive in double.
template <typename LayerT>
double check_output(const LayerT& layer, const Matrix<typename LayerT::Scalar>& input,
                    const sparsemoe::ForwardResult<typename LayerT::Scalar>& result) {
  using Scalar = typename LayerT::Scalar;
  const Index T = input.rows(), d = input.cols(), k = layer.k();
  EXPECT_EQ(result.output.rows(), T);
  EXPECT_EQ(result.output.cols(), d);
  double worst = 0;
  std::vector<double> x(d), out, out_scale;
  for (Index t = 0; t < T; ++t) {
    for (Index i = 0; i < d; ++i) x[i] = input(t, i);
    std::vector<double> y(d, 0.0), scale(d, 0.0);
    for (Index j = 0; j < k; ++j) {
      const double g = result.routing.gates(t, j);
      naive_expert(layer.expert(result.routing.expert_ids(t, j)), x, out, out_scale);
      for (Index c = 0; c < d; ++c) {
        y[c] += g * out[c];
        scale[c] += g * out_scale[c];
      }
    }
    for (Index c = 0; c < d; ++c) {
      const double error = std::fabs(static_cast<double>(result.output(t, c)) - y[c]);
      const double tolerance = output_tolerance<Scalar>() * std::max(scale[c], std::numeric_limits<double>::min());
      if (!(error <= tolerance)) {
        ADD_FAILURE() << "output(" << t << ", " << c << ") = " << result.output(t, c) << ", naive " << y[c]
                      << ", |error| " << error << " > " << tolerance;
        return error / scale[c];
      }
      if (scale[c] > 0) worst = std::max(worst, error / scale[c]);
    }
  }
  return worst;
}

template <typename LayerT>
void check_tokens_per_expert(const LayerT& layer, const sparsemoe::ForwardResult<typename LayerT::Scalar>& result) {
  const Index T = result.routing.num_tokens(), E = layer.num_experts(), k = layer.k();
  const auto& counts = result.tokens_per_expert();
  ASSERT_EQ(counts.size(), E);
  std::vector<Index> histogram(static_cast<std::size_t>(E), 0);
  for (Index t = 0; t < T; ++t) {
    for (Index j = 0; j < k; ++j) ++histogram[static_cast<std::size_t>(result.routing.expert_ids(t, j))];
  }
  Index total = 0;
  for (Index e = 0; e < E; ++e) {
    EXPECT_EQ(counts[e], histogram[static_cast<std::size_t>(e)]) << "expert " << e;
    total += counts[e];
  }
  EXPECT_EQ(total, T * k);
  ASSERT_EQ(result.plan.offsets.size(), E + 1);
  EXPECT_EQ(result.plan.offsets[E], T * k);
}

// ---- The sweep ------------------------------------------------------------------------------------

template <typename LayerT>
class MoELayerTest : public ::testing::Test {};

template <typename ExpertT>
using LayerOf = sparsemoe::MoELayer<typename ExpertT::Scalar, ExpertT>;

using LayerTypes = ::testing::Types<
    LayerOf<sparsemoe::Expert<float, sparsemoe::Relu>>, LayerOf<sparsemoe::Expert<double, sparsemoe::Relu>>,
    LayerOf<sparsemoe::Expert<float, sparsemoe::Silu>>, LayerOf<sparsemoe::Expert<double, sparsemoe::Silu>>,
    LayerOf<sparsemoe::Expert<float, sparsemoe::GeluTanh>>, LayerOf<sparsemoe::Expert<double, sparsemoe::GeluTanh>>,
    LayerOf<sparsemoe::Expert<float, sparsemoe::GeluErf>>, LayerOf<sparsemoe::Expert<double, sparsemoe::GeluErf>>,
    LayerOf<sparsemoe::SwiGluExpert<float>>, LayerOf<sparsemoe::SwiGluExpert<double>>>;

class LayerNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return Traits<typename T::ExpertType>::name();
  }
};

TYPED_TEST_SUITE(MoELayerTest, LayerTypes, LayerNames);

sparsemoe::MoEConfig make_config(Index d, Index h, Index E, Index k, std::uint64_t seed) {
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = h;
  config.num_experts = E;
  config.k = k;
  config.seed = seed;
  return config;
}

sparsemoe::ForwardOptions make_options(Mode mode, std::uint64_t step = 0) {
  sparsemoe::ForwardOptions options;
  options.mode = mode;
  options.step = step;
  return options;
}

TYPED_TEST(MoELayerTest, ForwardMatchesNaiveLoopAcrossSizes) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 13, h = 29;
  const std::vector<std::pair<Index, Index>> experts_and_k = {{1, 1}, {3, 1}, {3, 2}, {3, 3},
                                                              {8, 1}, {8, 2}, {8, 8}};
  std::uint64_t seed = 1;
  double worst = 0;
  Index skipped = 0, compared = 0;
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    const bool training = mode == Mode::training;
    for (const auto& ek : experts_and_k) {
      for (const Index T : {Index(0), Index(1), Index(7), Index(1000)}) {
        const Index E = ek.first, k = ek.second;
        SCOPED_TRACE(std::string(training ? "training" : "evaluation") + " E=" + std::to_string(E) +
                     " k=" + std::to_string(k) + " T=" + std::to_string(T));
        ++seed;
        LayerT layer(make_config(d, h, E, k, seed));
        layer.gate().initialize_uniform(seed + 500);
        std::mt19937_64 generator(seed);
        const Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
        const auto result = layer.forward(input, make_options(mode, seed % 5));
        EXPECT_EQ(result.cache.empty(), !training);
        skipped += check_routing(layer, input, result, training, 4 * logit_tolerance<Scalar>());
        compared += T;
        check_tokens_per_expert(layer, result);
        worst = std::max(worst, check_output(layer, input, result));
        if (T == 1000) {
          // The routing is not degenerate: every expert gets tokens.
          EXPECT_GT(result.tokens_per_expert().minCoeff(), 0);
        }
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
  EXPECT_LE(skipped, compared / 100 + 1) << "too many near-ties left out of the id comparison";
  std::cout << "  worst |y − naive| / scale = " << worst << "; near-tie tokens left out of the id check: "
            << skipped << " of " << compared << "\n";
}

// Packed experts (the serving path): the same naive reference, over shapes whose d and h cut
// the GEMM backend's 64-column panels and 64-row tiles unevenly (edges of 2, 8, 0 and 44).
TYPED_TEST(MoELayerTest, PackedForwardMatchesNaiveLoop) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const std::vector<std::pair<Index, Index>> widths = {{13, 29}, {130, 200}, {64, 128}};
  std::uint64_t seed = 900;
  double worst = 0;
  for (const auto& dh : widths) {
    for (const Index T : {Index(0), Index(1), Index(7), Index(300)}) {
      const Index d = dh.first, h = dh.second, E = 5, k = 2;
      SCOPED_TRACE("d=" + std::to_string(d) + " h=" + std::to_string(h) + " T=" + std::to_string(T));
      ++seed;
      LayerT layer(make_config(d, h, E, k, seed));
      layer.gate().initialize_uniform(seed + 500);
      std::mt19937_64 generator(seed);
      const Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
      const sparsemoe::PackedExperts<Scalar> packed = layer.pack_experts();
      EXPECT_EQ(packed.num_experts(), E);
      sparsemoe::ForwardResult<Scalar> result;
      sparsemoe::ForwardWorkspace<Scalar> workspace;
      layer.forward(input, make_options(Mode::evaluation), result, workspace, packed);
      EXPECT_TRUE(result.cache.empty());
      check_routing(layer, input, result, false, 4 * logit_tolerance<Scalar>());
      check_tokens_per_expert(layer, result);
      worst = std::max(worst, check_output(layer, input, result));
      if (::testing::Test::HasFailure()) return;
    }
  }
  std::cout << "  worst |y − naive| / scale (packed) = " << worst << "\n";
}

// The packed experts are a copy: changing the layer's weights leaves a snapshot as it was, and
// packing again picks the new weights up.
TYPED_TEST(MoELayerTest, PackedExpertsAreASnapshot) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 70, h = 90, E = 3, k = 2, T = 40;
  LayerT layer(make_config(d, h, E, k, 77));
  layer.gate().initialize_uniform(78);
  std::mt19937_64 generator(79);
  const Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
  const sparsemoe::PackedExperts<Scalar> before = layer.pack_experts();
  const LayerT original = layer;
  for (Index e = 0; e < E; ++e) layer.expert(e).w2() *= Scalar(-2);
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  layer.forward(input, make_options(Mode::evaluation), result, workspace, before);
  check_output(original, input, result);
  const sparsemoe::PackedExperts<Scalar> after = layer.pack_experts();
  layer.forward(input, make_options(Mode::evaluation), result, workspace, after);
  check_output(layer, input, result);
}

TYPED_TEST(MoELayerTest, PackedForwardRejectsTrainingAndForeignPackedExperts) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(12, 20, 4, 2, 5));
  const LayerT other(make_config(12, 20, 4, 2, 5));
  const Matrix<Scalar> input = Matrix<Scalar>::Ones(3, 12);
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  const sparsemoe::PackedExperts<Scalar> mine = layer.pack_experts();
  EXPECT_THROW(layer.forward(input, make_options(Mode::training), result, workspace, mine), std::invalid_argument);
  EXPECT_THROW(layer.forward(input, make_options(Mode::evaluation), result, workspace, other.pack_experts()),
               std::invalid_argument);
  EXPECT_THROW(layer.forward(input, make_options(Mode::evaluation), result, workspace, sparsemoe::PackedExperts<Scalar>{}),
               std::invalid_argument);
  EXPECT_NO_THROW(layer.forward(input, make_options(Mode::evaluation), result, workspace, mine));
}

// Small batches on one expert run split by columns (MoELayer::column_split_rows): d and h past
// one 256-column tile and not multiples of 64, every token routed to expert 2, k = 1.
TYPED_TEST(MoELayerTest, SmallBatchOnOneExpertMatchesNaiveLoop) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 270, h = 300, E = 4, k = 1, favourite = 2;
  for (const Index T : {Index(1), Index(7), Index(200)}) {
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      for (const bool use_packed : {false, true}) {
        if (use_packed && mode == Mode::training) continue;
        SCOPED_TRACE("T=" + std::to_string(T) + (mode == Mode::training ? " training" : " evaluation") +
                     (use_packed ? " packed" : ""));
        LayerT layer(make_config(d, h, E, k, 40 + static_cast<std::uint64_t>(T)));
        layer.gate().gate_weight().setZero();
        layer.gate().gate_weight()(0, favourite) = Scalar(1000);
        std::mt19937_64 generator(static_cast<std::uint64_t>(T));
        Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
        input.col(0).setOnes();
        sparsemoe::ForwardResult<Scalar> result;
        sparsemoe::ForwardWorkspace<Scalar> workspace;
        if (use_packed) {
          layer.forward(input, make_options(mode), result, workspace, layer.pack_experts());
        } else {
          layer.forward(input, make_options(mode), result, workspace);
        }
        ASSERT_EQ(result.tokens_per_expert()[favourite], T);
        check_output(layer, input, result);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

// Every token's first choice is expert 5: W_g gives it a logit ~1000 (input column 0 is 1). With
// T = 1000 that expert has eight 128-row tiles.
TYPED_TEST(MoELayerTest, AllTokensRoutedToOneExpert) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 13, h = 29, E = 8, T = 1000, favourite = 5;
  for (const Index k : {Index(1), Index(2)}) {
    for (const Mode mode : {Mode::evaluation, Mode::training}) {
      SCOPED_TRACE("k=" + std::to_string(k) + (mode == Mode::training ? " training" : " evaluation"));
      LayerT layer(make_config(d, h, E, k, 40 + k));
      layer.gate().initialize_uniform(41);
      layer.gate().gate_weight()(0, favourite) = Scalar(1000);
      std::mt19937_64 generator(42);
      Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
      input.col(0).setOnes();
      const auto result = layer.forward(input, make_options(mode, 3));
      EXPECT_EQ(result.tokens_per_expert()[favourite], T);
      for (Index t = 0; t < T; ++t) {
        ASSERT_EQ(result.routing.expert_ids(t, 0), favourite) << "token " << t;
        // exp(H_other − H_favourite) underflows to 0: the favourite's gate is exactly 1.
        ASSERT_EQ(result.routing.gates(t, 0), Scalar(1)) << "token " << t;
        if (k > 1) {
          ASSERT_EQ(result.routing.gates(t, 1), Scalar(0)) << "token " << t;
        }
      }
      check_tokens_per_expert(layer, result);
      check_routing(layer, input, result, mode == Mode::training, 4 * logit_tolerance<Scalar>());
      check_output(layer, input, result);
    }
  }
}

// The paper's initialisation (W_g = 0, before initialize_uniform): every logit is exactly 0, so
// the ties go to the lowest ids and the gates are uniform.
TYPED_TEST(MoELayerTest, ZeroGateTiesGoToLowestIds) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 8, 3, 5));
  EXPECT_TRUE(layer.gate().gate_weight().isZero(0)) << "gate weights start at zero (the paper's choice)";
  EXPECT_TRUE(layer.gate().noise_weight().isZero(0));
  std::mt19937_64 generator(6);
  const Matrix<Scalar> input = random_matrix<Scalar>(50, 13, generator);
  const auto result = layer.forward(input);
  for (Index t = 0; t < 50; ++t) {
    for (Index j = 0; j < 3; ++j) {
      EXPECT_EQ(result.routing.expert_ids(t, j), j);
      EXPECT_NEAR(result.routing.gates(t, j), 1.0 / 3, 2 * std::numeric_limits<Scalar>::epsilon());
    }
  }
  check_output(layer, input, result);
}

// Exact ties: inputs and gate weights are small dyadic numbers, so every logit is computed exactly
// (in any summation order) and many tokens have tied logits, including at the k-th/(k+1)-th
// boundary. Ids must equal the stable (lower id first) ranking exactly, with no tie allowance.
TYPED_TEST(MoELayerTest, ExactTiesGoToTheLowerId) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 5, E = 7, T = 300;
  std::mt19937_64 generator(77);
  std::uniform_int_distribution<int> small(-2, 2);
  for (const Index k : {Index(1), Index(2), Index(4)}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    LayerT layer(make_config(d, 9, E, k, 70 + k));
    for (Index i = 0; i < layer.gate().gate_weight().size(); ++i) {
      layer.gate().gate_weight().data()[i] = Scalar(0.25) * static_cast<Scalar>(small(generator));
    }
    Matrix<Scalar> input(T, d);
    for (Index i = 0; i < input.size(); ++i) input.data()[i] = Scalar(0.5) * static_cast<Scalar>(small(generator));
    const auto result = layer.forward(input);
    const ReferenceLogits ref = reference_logits(layer, input, result.routing, false);
    Index boundary_ties = 0;
    for (Index t = 0; t < T; ++t) {
      const std::vector<Index> order = ranking(ref.clean, t);
      if (k < E && ref.clean(t, order[k - 1]) == ref.clean(t, order[k])) ++boundary_ties;
      for (Index j = 0; j < k; ++j) ASSERT_EQ(result.routing.expert_ids(t, j), order[j]) << "token " << t;
    }
    EXPECT_GT(boundary_ties, 10) << "the test did not produce ties at the top-k boundary";
    check_routing(layer, input, result, false, 0.0);
    check_output(layer, input, result);
  }
}

TYPED_TEST(MoELayerTest, EvaluationKeepsNoCacheTrainingDoes) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 5, 2, 3));
  layer.gate().initialize_uniform(4);
  std::mt19937_64 generator(5);
  const Matrix<Scalar> input = random_matrix<Scalar>(20, 13, generator);
  const auto evaluated = layer.forward(input);
  EXPECT_TRUE(evaluated.cache.empty());
  EXPECT_EQ(evaluated.cache.input.size(), 0);
  EXPECT_EQ(evaluated.cache.pre_activations.size(), 0);
  const auto trained = layer.forward(input, make_options(Mode::training, 1));
  EXPECT_FALSE(trained.cache.empty());
  EXPECT_TRUE(bitwise_equal(trained.cache.input, input));
  EXPECT_EQ(trained.cache.pre_activations.rows(), 20 * 2);
  // Evaluation: a deterministic function of the input (no noise): twice the same.
  const auto again = layer.forward(input);
  EXPECT_TRUE(bitwise_equal(evaluated.output, again.output));
}

// ---- Auxiliary losses, recomputed independently ------------------------------------------------

/// CV² with the population variance and the 1e-10 guard.
double ref_cv_squared(const std::vector<double>& v) {
  if (v.size() <= 1) return 0;
  const double n = static_cast<double>(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double variance = 0;
  for (double x : v) variance += (x - mean) * (x - mean);
  variance /= n;
  return variance / (mean * mean + 1e-10);
}

TYPED_TEST(MoELayerTest, AuxiliaryLossesMatchIndependentFormulas) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const bool is_float = std::is_same<Scalar, float>::value;
  const Index d = 13, T = 400;
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    for (const auto& ek : std::vector<std::pair<Index, Index>>{{3, 1}, {5, 2}, {5, 5}, {1, 1}}) {
      const Index E = ek.first, k = ek.second;
      const bool training = mode == Mode::training;
      SCOPED_TRACE(std::string(training ? "training" : "evaluation") + " E=" + std::to_string(E) +
                   " k=" + std::to_string(k));
      LayerT layer(make_config(d, 11, E, k, 90 + E + k));
      layer.gate().initialize_uniform(91);
      std::mt19937_64 generator(92);
      const Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
      sparsemoe::ForwardOptions options = make_options(mode, 6);
      options.importance_weight = 0.25;
      options.load_weight = 0.75;
      const auto result = layer.forward(input, options);
      const auto& routing = result.routing;
      const ReferenceLogits ref = reference_logits(layer, input, routing, training);

      std::vector<double> importance(E, 0.0), load(E, 0.0);
      const bool smooth = training && k < E;
      for (Index t = 0; t < T; ++t) {
        for (Index j = 0; j < k; ++j) importance[routing.expert_ids(t, j)] += routing.gates(t, j);
        if (!smooth) {
          for (Index j = 0; j < k; ++j) load[routing.expert_ids(t, j)] += 1;
          continue;
        }
        // P(x, i) = Φ((c_i − θ_i)/s_i), θ_i = the k-th largest noisy logit of the OTHER experts.
        for (Index i = 0; i < E; ++i) {
          std::vector<double> others;
          for (Index m = 0; m < E; ++m) {
            if (m != i) others.push_back(ref.noisy(t, m));
          }
          std::sort(others.begin(), others.end(), std::greater<double>());
          const double threshold = others[static_cast<std::size_t>(k - 1)];
          load[i] += ref_normal_cdf((ref.clean(t, i) - threshold) / ref.scale(t, i));
        }
      }
      const auto& losses = result.losses;
      EXPECT_EQ(losses.smooth_load, smooth);
      ASSERT_EQ(losses.importance.size(), E);
      ASSERT_EQ(losses.load.size(), E);
      const double sum_tolerance = is_float ? 1e-4 : 1e-11;  // relative, over T = 400 terms
      for (Index e = 0; e < E; ++e) {
        EXPECT_NEAR(losses.importance[e], importance[e], sum_tolerance * std::max(1.0, importance[e])) << e;
        EXPECT_NEAR(losses.load[e], load[e], sum_tolerance * std::max(1.0, load[e])) << e;
      }
      const double cv_importance = ref_cv_squared(importance);
      const double cv_load = ref_cv_squared(load);
      // CV² amplifies the relative error of the entries by ~2·(max |v − m|)/|m|/CV ≤ 2√E/CV.
      const double cv_tolerance = is_float ? 1e-3 : 1e-9;
      EXPECT_NEAR(losses.importance_cv_squared, cv_importance, cv_tolerance * (cv_importance + 1e-3));
      EXPECT_NEAR(losses.load_cv_squared, cv_load, cv_tolerance * (cv_load + 1e-3));
      EXPECT_NEAR(losses.importance_loss(), 0.25 * cv_importance, cv_tolerance * (cv_importance + 1e-3));
      EXPECT_NEAR(losses.load_loss(), 0.75 * cv_load, cv_tolerance * (cv_load + 1e-3));
      EXPECT_NEAR(losses.total(), 0.25 * cv_importance + 0.75 * cv_load,
                  cv_tolerance * (cv_importance + cv_load + 1e-3));
      if (E == 1) {
        EXPECT_EQ(losses.importance_cv_squared, Scalar(0));
        EXPECT_EQ(losses.load_cv_squared, Scalar(0));
      } else {
        EXPECT_GT(cv_importance, 1e-4) << "degenerate test: balanced importance";
      }
    }
  }
}

// ---- Noise addressing -------------------------------------------------------------------------

TYPED_TEST(MoELayerTest, TrainingNoiseIsStandardNormalAndAddressedBySeedStepTokenExpert) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 13, E = 8, T = 1000;
  LayerT layer(make_config(d, 29, E, 2, 21));
  layer.gate().initialize_uniform(22);
  std::mt19937_64 generator(23);
  const Matrix<Scalar> input = random_matrix<Scalar>(T, d, generator);
  const Matrix<Scalar> other_input = random_matrix<Scalar>(T, d, generator);
  const auto a = layer.forward(input, make_options(Mode::training, 7));
  const Matrix<Scalar>& noise = a.routing.noise;
  ASSERT_EQ(noise.rows(), T);
  ASSERT_EQ(noise.cols(), E);
  const double n = static_cast<double>(noise.size());
  const double mean = noise.template cast<double>().mean();
  const double variance = (noise.template cast<double>().array() - mean).square().sum() / n;
  EXPECT_LT(std::fabs(mean), 5 / std::sqrt(n));
  EXPECT_NEAR(variance, 1.0, 5 * std::sqrt(2 / n));
  // Every (token, expert) draws its own value: no repeats across tokens, tiles or experts.
  {
    std::vector<Scalar> values(noise.data(), noise.data() + noise.size());
    std::sort(values.begin(), values.end());
    const auto repeats = values.size() - static_cast<std::size_t>(std::unique(values.begin(), values.end()) - values.begin());
    EXPECT_LT(repeats, 5u) << "noise values repeat " << repeats << " times";
  }
  // Tail mass beyond ±2σ ≈ 4.55%.
  const double tail = (noise.template cast<double>().array().abs() > 2.0).template cast<double>().sum() / n;
  EXPECT_NEAR(tail, 0.0455, 0.012);

  // Same step: the same sample, whatever the input; another step or seed: another sample.
  const auto b = layer.forward(other_input, make_options(Mode::training, 7));
  EXPECT_TRUE(bitwise_equal(a.routing.noise, b.routing.noise));
  const auto c = layer.forward(input, make_options(Mode::training, 8));
  Index equal = 0;
  for (Index i = 0; i < noise.size(); ++i) equal += noise.data()[i] == c.routing.noise.data()[i];
  EXPECT_LT(equal, 5) << "steps 7 and 8 share " << equal << " noise values";
  LayerT reseeded(make_config(d, 29, E, 2, 24));
  reseeded.gate().initialize_uniform(22);
  const auto s = reseeded.forward(input, make_options(Mode::training, 7));
  equal = 0;
  for (Index i = 0; i < noise.size(); ++i) equal += noise.data()[i] == s.routing.noise.data()[i];
  EXPECT_LT(equal, 5) << "seeds 21 and 24 share " << equal << " noise values";

  // Token t's noise does not depend on the batch size: the first 7 rows of a 1000-token batch
  // see the same noise as a batch of those 7 tokens. (Only the noise: the outputs may differ in
  // the last bit, since the GEMM blocking depends on the block sizes.)
  const Matrix<Scalar> head = input.topRows(7);
  const auto small = layer.forward(head, make_options(Mode::training, 7));
  EXPECT_TRUE(bitwise_equal(Matrix<Scalar>(noise.topRows(7)), small.routing.noise));
}

TEST(MoELayerNoise, FloatAndDoubleDrawTheSameSample) {
  const auto config = make_config(13, 29, 6, 2, 31);
  sparsemoe::MoELayer<float> single(config);
  sparsemoe::MoELayer<double> twice(config);
  std::mt19937_64 generator(32);
  const Matrix<double> input = random_matrix<double>(50, 13, generator);
  const auto f = single.forward(input.cast<float>(), make_options(Mode::training, 5));
  const auto g = twice.forward(input, make_options(Mode::training, 5));
  for (Index i = 0; i < f.routing.noise.size(); ++i) {
    const double nd = g.routing.noise.data()[i];
    EXPECT_NEAR(f.routing.noise.data()[i], nd, std::numeric_limits<float>::epsilon() * std::max(1.0, std::fabs(nd)));
  }
  // And both layers were initialised with the same experts (up to float rounding).
  for (Index e = 0; e < 6; ++e) {
    EXPECT_TRUE(single.expert(e).w1().cast<double>().isApprox(twice.expert(e).w1(), 1e-6));
  }
}

// ---- Determinism ------------------------------------------------------------------------------

template <typename Scalar>
void expect_results_bitwise_equal(const sparsemoe::ForwardResult<Scalar>& a, const sparsemoe::ForwardResult<Scalar>& b,
                                  const std::string& what) {
  EXPECT_TRUE(bitwise_equal(a.output, b.output)) << what << ": output";
  EXPECT_TRUE(a.routing.expert_ids == b.routing.expert_ids) << what << ": expert_ids";
  EXPECT_TRUE(bitwise_equal(a.routing.gates, b.routing.gates)) << what << ": gates";
  EXPECT_TRUE(bitwise_equal(a.routing.clean_logits, b.routing.clean_logits)) << what << ": clean logits";
  EXPECT_TRUE(bitwise_equal(a.routing.noisy_logits, b.routing.noisy_logits)) << what << ": noisy logits";
  EXPECT_TRUE(bitwise_equal(a.routing.noise, b.routing.noise)) << what << ": noise";
  EXPECT_TRUE(bitwise_equal(a.routing.noise_scale, b.routing.noise_scale)) << what << ": noise scale";
  EXPECT_TRUE(bitwise_equal(a.losses.importance, b.losses.importance)) << what << ": importance";
  EXPECT_TRUE(bitwise_equal(a.losses.load, b.losses.load)) << what << ": load";
  EXPECT_TRUE(bitwise_equal(a.cache.pre_activations, b.cache.pre_activations)) << what << ": cached pre-activations";
}

TYPED_TEST(MoELayerTest, BitwiseIdenticalForOneAndTwoThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  // Several 128-row expert tiles and 64-row gate tiles.
  LayerT layer(make_config(40, 72, 5, 2, 51));
  layer.gate().initialize_uniform(52);
  std::mt19937_64 generator(53);
  const Matrix<Scalar> input = random_matrix<Scalar>(700, 40, generator);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    sparsemoe::ForwardResult<Scalar> one, two, three;
    {
      ThreadCount threads(1);
      one = layer.forward(input, make_options(mode, 11));
    }
    {
      ThreadCount threads(2);
      two = layer.forward(input, make_options(mode, 11));
    }
    {
      ThreadCount threads(3);
      three = layer.forward(input, make_options(mode, 11));
    }
    ASSERT_GT(one.tokens_per_expert().maxCoeff(), 2 * LayerT::expert_row_tile) << "want several tiles per expert";
    expect_results_bitwise_equal(one, two, "1 vs 2 threads");
    expect_results_bitwise_equal(one, three, "1 vs 3 threads");
  }
#endif
}

TYPED_TEST(MoELayerTest, TwoRunsWithTheSameSeedAndStepAreBitwiseIdentical) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const auto config = make_config(40, 72, 5, 2, 61);
  LayerT first(config), second(config);
  first.gate().initialize_uniform(62);
  second.gate().initialize_uniform(62);
  std::mt19937_64 generator(63);
  const Matrix<Scalar> input = random_matrix<Scalar>(700, 40, generator);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    const auto a = first.forward(input, make_options(mode, 12));
    const auto b = first.forward(input, make_options(mode, 12));
    const auto c = second.forward(input, make_options(mode, 12));
    expect_results_bitwise_equal(a, b, "same layer, two runs");
    expect_results_bitwise_equal(a, c, "two layers from one config");
  }
  // Different steps give different training outputs.
  const auto x = first.forward(input, make_options(Mode::training, 12));
  const auto y = first.forward(input, make_options(Mode::training, 13));
  EXPECT_FALSE(bitwise_equal(x.output, y.output));
}

// One ForwardResult and one ForwardWorkspace reused across calls of different batch sizes, modes
// and thread counts must give exactly what a fresh forward gives (no stale rows, noise or cache).
TYPED_TEST(MoELayerTest, ReusedResultAndWorkspaceMatchFreshForward) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 5, 2, 95));
  layer.gate().initialize_uniform(96);
  std::mt19937_64 generator(97);
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  struct Call {
    Index tokens;
    Mode mode;
    int threads;
  };
  const std::vector<Call> calls = {{1000, Mode::training, 2}, {7, Mode::evaluation, 1}, {300, Mode::training, 1},
                                   {0, Mode::training, 2},    {300, Mode::evaluation, 2}, {1, Mode::training, 2},
                                   {1000, Mode::evaluation, 1}, {1000, Mode::training, 2}};
  std::uint64_t step = 0;
  for (const Call& call : calls) {
    SCOPED_TRACE("T=" + std::to_string(call.tokens) + (call.mode == Mode::training ? " training" : " evaluation") +
                 " threads=" + std::to_string(call.threads));
    const Matrix<Scalar> input = random_matrix<Scalar>(call.tokens, 13, generator);
    const auto options = make_options(call.mode, ++step);
    {
#ifdef _OPENMP
      ThreadCount threads(call.threads);
#endif
      layer.forward(input, options, result, workspace);
    }
    const auto fresh = layer.forward(input, options);
    expect_results_bitwise_equal(fresh, result, "reused vs fresh");
    EXPECT_EQ(result.cache.empty(), call.mode == Mode::evaluation);
    if (call.mode == Mode::evaluation) {
      EXPECT_EQ(result.cache.input.size(), 0);
      EXPECT_EQ(result.cache.pre_activations.size(), 0);
    } else {
      EXPECT_TRUE(bitwise_equal(result.cache.input, input));
    }
    EXPECT_TRUE(bitwise_equal(result.plan.tokens_per_expert, fresh.plan.tokens_per_expert));
    EXPECT_TRUE(bitwise_equal(result.plan.token_of_row, fresh.plan.token_of_row));
    EXPECT_TRUE(result.routing.kth_expert == fresh.routing.kth_expert);
    EXPECT_TRUE(result.routing.next_expert == fresh.routing.next_expert);
    check_output(layer, input, result);
    if (::testing::Test::HasFailure()) return;
  }
}

// Stacking: the previous output (or the cached input) fed back in as the input, into the same
// result and workspace, must behave like a forward of a copy.
TYPED_TEST(MoELayerTest, InputAliasingThePreviousResult) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 5, 2, 105));
  layer.gate().initialize_uniform(106);
  std::mt19937_64 generator(107);
  const Matrix<Scalar> input = random_matrix<Scalar>(300, 13, generator);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    const auto options = make_options(mode, 3);
    sparsemoe::ForwardResult<Scalar> result;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    layer.forward(input, options, result, workspace);
    const Matrix<Scalar> first_output = result.output;
    layer.forward(result.output, options, result, workspace);
    expect_results_bitwise_equal(layer.forward(first_output, options), result, "output fed back");
    if (mode == Mode::training) {
      const Matrix<Scalar> cached = result.cache.input;
      layer.forward(result.cache.input, options, result, workspace);
      expect_results_bitwise_equal(layer.forward(cached, options), result, "cached input fed back");
    }
  }
}

// The input may be a strided block of a larger matrix (ConstMatrixRef with an outer stride).
TYPED_TEST(MoELayerTest, StridedInputBlock) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 5, 2, 98));
  layer.gate().initialize_uniform(99);
  std::mt19937_64 generator(100);
  const Matrix<Scalar> storage = random_matrix<Scalar>(310, 20, generator);
  const Matrix<Scalar> copy = storage.block(5, 3, 300, 13);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    const bool training = mode == Mode::training;
    const auto result = layer.forward(storage.block(5, 3, 300, 13), make_options(mode, 4));
    check_routing(layer, copy, result, training, 4 * logit_tolerance<Scalar>());
    check_output(layer, copy, result);
    if (training) {
      EXPECT_TRUE(bitwise_equal(result.cache.input, copy));
    }
  }
}

// MoEConfig::noise_epsilon reaches the noise scale s = softplus(x·W_noise) + ε.
TYPED_TEST(MoELayerTest, NoiseEpsilonComesFromTheConfig) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  for (const double epsilon : {0.3, 1e-4}) {
    auto config = make_config(13, 29, 6, 2, 101);
    config.noise_epsilon = epsilon;
    LayerT layer(config);
    layer.gate().initialize_uniform(102);
    std::mt19937_64 generator(103);
    const Matrix<Scalar> input = random_matrix<Scalar>(200, 13, generator);
    const auto result = layer.forward(input, make_options(Mode::training, 2));
    check_routing(layer, input, result, true, 4 * logit_tolerance<Scalar>(), epsilon);
    check_output(layer, input, result);
  }
}

TEST(MoELayerDefaults, DocumentedDefaults) {
  const sparsemoe::MoEConfig config;
  EXPECT_EQ(config.noise_epsilon, kDefaultNoiseEpsilon);
  EXPECT_EQ(config.seed, 0u);
  const sparsemoe::ForwardOptions options;
  EXPECT_EQ(options.mode, Mode::evaluation);
  EXPECT_FALSE(options.step.has_value());
  EXPECT_FALSE(options.keep_cache);
  EXPECT_EQ(options.importance_weight, 0.1);  // the paper's w_importance
  EXPECT_EQ(options.load_weight, 0.1);        // the paper's w_load
  sparsemoe::MoELayer<double> layer(make_config(13, 29, 4, 2, 0));
  EXPECT_EQ(layer.input_dim(), 13);
  EXPECT_EQ(layer.hidden_dim(), 29);
  EXPECT_EQ(layer.num_experts(), 4);
  EXPECT_EQ(layer.k(), 2);
  // The default expert is the paper's ReLU feed-forward expert.
  EXPECT_TRUE((std::is_same<sparsemoe::MoELayer<double>::ExpertType, sparsemoe::Expert<double, sparsemoe::Relu>>::value));
}

// ---- Parameters -------------------------------------------------------------------------------

TYPED_TEST(MoELayerTest, TensorsOrderShapesAndAliasing) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 13, h = 29, E = 3;
  LayerT layer(make_config(d, h, E, 2, 71));
  auto views = layer.tensors();
  const bool swiglu = Traits<typename LayerT::ExpertType>::is_swiglu;
  const std::size_t per_expert = swiglu ? 2 : 4;
  ASSERT_EQ(views.size(), 2 + E * per_expert);
  EXPECT_EQ(views[0].name, "gate.gate_weight");
  EXPECT_EQ(views[0].data, layer.gate().gate_weight().data());
  EXPECT_EQ(views[1].name, "gate.noise_weight");
  EXPECT_EQ(views[1].data, layer.gate().noise_weight().data());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(views[i].rows, d);
    EXPECT_EQ(views[i].cols, E);
  }
  for (Index e = 0; e < E; ++e) {
    const std::string prefix = "expert" + std::to_string(e) + ".";
    const std::size_t base = 2 + static_cast<std::size_t>(e) * per_expert;
    EXPECT_EQ(views[base].name, prefix + "w1");
    EXPECT_EQ(views[base].data, layer.expert(e).w1().data());
    EXPECT_EQ(views[base].rows, d);
    EXPECT_EQ(views[base].cols, swiglu ? 2 * h : h);
    const std::size_t w2 = base + (swiglu ? 1 : 2);
    EXPECT_EQ(views[w2].name, prefix + "w2");
    EXPECT_EQ(views[w2].data, layer.expert(e).w2().data());
    EXPECT_EQ(views[w2].rows, h);
    EXPECT_EQ(views[w2].cols, d);
    if (!swiglu) {
      EXPECT_EQ(views[base + 1].name, prefix + "b1");
      EXPECT_EQ(views[base + 1].rows, h);
      EXPECT_EQ(views[base + 1].cols, 1);
      EXPECT_EQ(views[base + 3].name, prefix + "b2");
      EXPECT_EQ(views[base + 3].rows, d);
      EXPECT_EQ(views[base + 3].cols, 1);
    }
  }
  // The gradients mirror the layer's tensors, zero-initialised.
  auto gradients = layer.make_gradients();
  auto gradient_views = gradients.tensors();
  ASSERT_EQ(gradient_views.size(), views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    EXPECT_EQ(gradient_views[i].name, views[i].name);
    EXPECT_EQ(gradient_views[i].rows, views[i].rows);
    EXPECT_EQ(gradient_views[i].cols, views[i].cols);
    EXPECT_TRUE(gradient_views[i].matrix().isZero(0));
    EXPECT_NE(gradient_views[i].data, views[i].data);
  }
  // Writing through a view changes what forward computes.
  std::mt19937_64 generator(72);
  const Matrix<Scalar> input = random_matrix<Scalar>(10, d, generator);
  const auto before = layer.forward(input);
  for (auto& view : views) view.flat() *= Scalar(2);
  const auto after = layer.forward(input);
  EXPECT_FALSE(bitwise_equal(before.output, after.output));
}

TYPED_TEST(MoELayerTest, ExpertInitialisationDependsOnSeedAndIndex) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  const Index d = 13, h = 29, E = 4;
  LayerT a(make_config(d, h, E, 2, 81)), b(make_config(d, h, E, 2, 81)), c(make_config(d, h, E, 2, 82));
  const double first_bound = 1 / std::sqrt(double(d)), second_bound = 1 / std::sqrt(double(h));
  for (Index e = 0; e < E; ++e) {
    EXPECT_TRUE(bitwise_equal(a.expert(e).w1(), b.expert(e).w1())) << "same seed, expert " << e;
    EXPECT_TRUE(bitwise_equal(a.expert(e).w2(), b.expert(e).w2())) << "same seed, expert " << e;
    EXPECT_FALSE(a.expert(e).w1() == c.expert(e).w1()) << "different seed, expert " << e;
    for (Index other = 0; other < e; ++other) {
      EXPECT_FALSE(a.expert(e).w1() == a.expert(other).w1()) << "experts " << other << " and " << e << " equal";
    }
    const Scalar slack = 1 + 2 * std::numeric_limits<Scalar>::epsilon();
    EXPECT_LE(a.expert(e).w1().cwiseAbs().maxCoeff(), first_bound * slack);
    EXPECT_LE(a.expert(e).w2().cwiseAbs().maxCoeff(), second_bound * slack);
    EXPECT_GT(a.expert(e).w1().cwiseAbs().maxCoeff(), 0.5 * first_bound);
  }
}

// ---- Errors -------------------------------------------------------------------------------------

template <typename Callable>
std::string invalid_argument_message(const Callable& callable) {
  try {
    callable();
  } catch (const std::invalid_argument& error) {
    return error.what();
  } catch (...) {
    return "<other exception>";
  }
  return "<no exception>";
}

TYPED_TEST(MoELayerTest, BadConfigThrowsNamingMoELayerAndTheSizes) {
  using LayerT = TypeParam;
  struct Bad {
    Index d, h, E, k;
    std::vector<std::string> mentions;
  };
  const std::vector<Bad> cases = {
      {13, 29, 3, 0, {"k", "0"}},        {13, 29, 3, 4, {"k", "4", "3"}},  {13, 29, 0, 1, {"num_experts", "0"}},
      {0, 29, 3, 2, {"input_dim", "0"}}, {13, 0, 3, 2, {"hidden_dim", "0"}}, {13, 29, 3, -1, {"k", "-1"}},
      {-5, 29, 3, 2, {"input_dim", "-5"}}};
  for (const Bad& bad : cases) {
    const std::string message = invalid_argument_message([&] { LayerT layer(make_config(bad.d, bad.h, bad.E, bad.k, 1)); });
    EXPECT_NE(message.find("MoELayer"), std::string::npos)
        << "d=" << bad.d << " h=" << bad.h << " E=" << bad.E << " k=" << bad.k << ": " << message;
    for (const std::string& word : bad.mentions) {
      EXPECT_NE(message.find(word), std::string::npos) << "'" << word << "' missing from: " << message;
    }
  }
  EXPECT_NO_THROW(LayerT(make_config(1, 1, 1, 1, 0)));
}

TYPED_TEST(MoELayerTest, BadNoiseEpsilonThrows) {
  using LayerT = TypeParam;
  for (const double epsilon : {0.0, -1e-2, std::numeric_limits<double>::quiet_NaN(),
                               std::numeric_limits<double>::infinity()}) {
    auto config = make_config(13, 29, 3, 2, 1);
    config.noise_epsilon = epsilon;
    const std::string message = invalid_argument_message([&] { LayerT layer(config); });
    EXPECT_NE(message.find("noise_epsilon"), std::string::npos) << "epsilon " << epsilon << ": " << message;
  }
}

TYPED_TEST(MoELayerTest, ForwardRejectsBadInputAndOptions) {
  using LayerT = TypeParam;
  using Scalar = typename LayerT::Scalar;
  LayerT layer(make_config(13, 29, 3, 2, 1));
  layer.gate().initialize_uniform(2);
  std::string message = invalid_argument_message([&] { layer.forward(Matrix<Scalar>::Zero(5, 12)); });
  EXPECT_NE(message.find("MoELayer::forward"), std::string::npos) << message;
  EXPECT_NE(message.find("13"), std::string::npos) << message;
  EXPECT_NE(message.find("5x12"), std::string::npos) << message;
  message = invalid_argument_message([&] { layer.forward(Matrix<Scalar>::Zero(5, 14), make_options(Mode::training)); });
  EXPECT_NE(message.find("5x14"), std::string::npos) << message;

  std::mt19937_64 generator(3);
  Matrix<Scalar> input = random_matrix<Scalar>(6, 13, generator);
  sparsemoe::ForwardOptions options;
  options.importance_weight = -0.1;
  message = invalid_argument_message([&] { layer.forward(input, options); });
  EXPECT_NE(message.find("importance_weight"), std::string::npos) << message;
  options.importance_weight = 0.1;
  options.load_weight = std::numeric_limits<double>::quiet_NaN();
  message = invalid_argument_message([&] { layer.forward(input, options); });
  EXPECT_NE(message.find("load_weight"), std::string::npos) << message;
  options.load_weight = 0.1;
  options.mode = Mode::training;
  options.step = std::uint64_t(1) << 32;
  message = invalid_argument_message([&] { layer.forward(input, options); });
  EXPECT_NE(message.find("step"), std::string::npos) << message;
  options.step = (std::uint64_t(1) << 32) - 1;
  EXPECT_NO_THROW(layer.forward(input, options));

  // A non-finite input makes a non-finite logit: rejected, naming the token row.
  input(4, 2) = std::numeric_limits<Scalar>::quiet_NaN();
  message = invalid_argument_message([&] { layer.forward(input); });
  EXPECT_NE(message.find("token row 4"), std::string::npos) << message;
}

}  // namespace
