// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Determinism (issue 4, item 3):
//   * a training-mode forward + backward (output, every Routing field, the dispatch plan, the
//     auxiliary losses, d_input and every gradient tensor of gradients.tensors()) and an
//     evaluation-mode forward are bitwise identical for 1, 2 and 3 OpenMP threads (with OpenMP)
//     and for repeated runs, for float and double, with Expert<S, Relu>, Expert<S, GeluTanh> and
//     SwiGluExpert<S>, on shapes with several expert tiles (MoELayer::expert_row_tile = 128
//     rows), several gate row tiles, several weight-gradient column tiles, and a skewed routing
//     where most tokens go to one expert;
//   * the into-variant forward(input, options, result, workspace) with storage reused across
//     thread counts gives the same bits as a fresh forward;
//   * the training noise depends only on (seed, step, token, expert): the same token index in
//     two different batches of the same size gets the same noise, routing.noise(t, i) equals
//     detail::standard_normal(seed, step, t, i) (cast to Scalar), and another step or seed gives
//     other noise.
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe::Mode;

// ---------------------------------------------------------------------------------------------
// Snapshots: every number a forward/backward produces, as named byte strings.
// ---------------------------------------------------------------------------------------------

struct Blob {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  std::vector<unsigned char> bytes;
};
using Snapshot = std::vector<Blob>;

template <typename Derived>
void record(Snapshot& snapshot, std::string name, const Eigen::DenseBase<Derived>& value) {
  using Scalar = typename Derived::Scalar;
  const auto& plain = value.derived().eval();  // contiguous copy in the object's own order
  Blob blob;
  blob.name = std::move(name);
  blob.rows = plain.rows();
  blob.cols = plain.cols();
  blob.bytes.resize(static_cast<std::size_t>(plain.size()) * sizeof(Scalar));
  if (!blob.bytes.empty()) std::memcpy(blob.bytes.data(), plain.data(), blob.bytes.size());
  snapshot.push_back(std::move(blob));
}

template <typename Scalar>
void record_scalar(Snapshot& snapshot, std::string name, Scalar value) {
  Matrix<Scalar> m(1, 1);
  m(0, 0) = value;
  record(snapshot, std::move(name), m);
}

template <typename Scalar>
void record_routing(Snapshot& snapshot, const std::string& prefix, const sparsemoe::Routing<Scalar>& routing) {
  record(snapshot, prefix + "expert_ids", routing.expert_ids);
  record(snapshot, prefix + "gates", routing.gates);
  record(snapshot, prefix + "clean_logits", routing.clean_logits);
  record(snapshot, prefix + "noisy_logits", routing.noisy_logits);
  record(snapshot, prefix + "raw_noise", routing.raw_noise);
  record(snapshot, prefix + "noise_scale", routing.noise_scale);
  record(snapshot, prefix + "noise", routing.noise);
  record(snapshot, prefix + "kth_expert", routing.kth_expert);
  record(snapshot, prefix + "next_expert", routing.next_expert);
}

template <typename Scalar>
void record_forward(Snapshot& snapshot, const std::string& prefix, const sparsemoe::ForwardResult<Scalar>& result) {
  record(snapshot, prefix + "output", result.output);
  record_routing(snapshot, prefix + "routing.", result.routing);
  record(snapshot, prefix + "plan.tokens_per_expert", result.plan.tokens_per_expert);
  record(snapshot, prefix + "plan.offsets", result.plan.offsets);
  record(snapshot, prefix + "plan.token_of_row", result.plan.token_of_row);
  record(snapshot, prefix + "plan.slot_of_row", result.plan.slot_of_row);
  record(snapshot, prefix + "plan.row_of_token_slot", result.plan.row_of_token_slot);
  record(snapshot, prefix + "losses.importance", result.losses.importance);
  record(snapshot, prefix + "losses.load", result.losses.load);
  record_scalar(snapshot, prefix + "losses.importance_cv_squared", result.losses.importance_cv_squared);
  record_scalar(snapshot, prefix + "losses.load_cv_squared", result.losses.load_cv_squared);
  record_scalar(snapshot, prefix + "losses.total", result.losses.total());
  record(snapshot, prefix + "cache.input", result.cache.input);
  record(snapshot, prefix + "cache.pre_activations", result.cache.pre_activations);
}

::testing::AssertionResult same_bits(const Snapshot& expected, const Snapshot& actual) {
  if (expected.size() != actual.size()) {
    return ::testing::AssertionFailure() << "snapshots have " << expected.size() << " and " << actual.size()
                                         << " entries";
  }
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const Blob& a = expected[i];
    const Blob& b = actual[i];
    if (a.name != b.name || a.rows != b.rows || a.cols != b.cols) {
      return ::testing::AssertionFailure() << "entry " << i << ": " << a.name << " " << a.rows << "x" << a.cols
                                           << " vs " << b.name << " " << b.rows << "x" << b.cols;
    }
    if (a.bytes != b.bytes) {
      std::size_t byte = 0;
      while (a.bytes[byte] == b.bytes[byte]) ++byte;
      return ::testing::AssertionFailure() << a.name << " (" << a.rows << "x" << a.cols << ") differs, first at byte "
                                           << byte << " of " << a.bytes.size();
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Thread counts.
// ---------------------------------------------------------------------------------------------

/// The thread counts to compare: 1, 2, 3 with OpenMP; one serial run without.
std::vector<int> thread_counts() {
#ifdef _OPENMP
  return {1, 2, 3};
#else
  return {1};
#endif
}

/// Sets the OpenMP thread count for its lifetime and restores the previous one.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads) {
#ifdef _OPENMP
    previous_ = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
  }
  ~ScopedThreads() {
#ifdef _OPENMP
    omp_set_num_threads(previous_);
#endif
  }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int previous_ = 1;
};

#ifdef _OPENMP
TEST(DeterminismThreads, ScopedThreadsSetsAndRestores) {
  const int before = omp_get_max_threads();
  {
    ScopedThreads threads(3);
    EXPECT_EQ(omp_get_max_threads(), 3);
    int team = 0;
#pragma omp parallel
    {
#pragma omp single
      team = omp_get_num_threads();
    }
    EXPECT_EQ(team, 3) << "OpenMP did not start the requested team (dynamic adjustment on?)";
  }
  EXPECT_EQ(omp_get_max_threads(), before);
}
#endif

// ---------------------------------------------------------------------------------------------
// The layer under test.
// ---------------------------------------------------------------------------------------------

template <typename Scalar_, typename ExpertT_>
struct Case {
  using Scalar = Scalar_;
  using ExpertT = ExpertT_;
};

template <typename C>
class Determinism : public ::testing::Test {};
using Cases = ::testing::Types<Case<float, sparsemoe::Expert<float, sparsemoe::Relu>>,
                               Case<double, sparsemoe::Expert<double, sparsemoe::Relu>>,
                               Case<float, sparsemoe::Expert<float, sparsemoe::GeluTanh>>,
                               Case<double, sparsemoe::Expert<double, sparsemoe::GeluTanh>>,
                               Case<float, sparsemoe::SwiGluExpert<float>>,
                               Case<double, sparsemoe::SwiGluExpert<double>>>;
struct CaseNames {
  template <typename C>
  static std::string GetName(int) {
    using Scalar = typename C::Scalar;
    using ExpertT = typename C::ExpertT;
    const std::string scalar = std::is_same<Scalar, float>::value ? "float" : "double";
    if (std::is_same<ExpertT, sparsemoe::SwiGluExpert<Scalar>>::value) return scalar + "_swiglu";
    if (std::is_same<ExpertT, sparsemoe::Expert<Scalar, sparsemoe::GeluTanh>>::value) return scalar + "_gelu_tanh";
    return scalar + "_relu";
  }
};
TYPED_TEST_SUITE(Determinism, Cases, CaseNames);

struct Shape {
  const char* name;
  Index tokens, dim, hidden, experts, k;
  bool skewed;          // most tokens to expert 0
  bool single = false;  // with skewed: every token to expert 0
};

// balanced: T·k = 1200 grouped rows over 5 experts (≥ 2 tiles each), 10 gate row tiles.
// skewed: ~90% of the tokens pick expert 0 first (≥ 4 tiles of 128 rows in one expert).
// wide: d > 64 (two gate-backward column tiles), p > 128 (two or three weight-gradient tiles).
// one expert: 200 rows, all on expert 0, so that evaluation forwards split the expert's work by
// columns (MoELayer::column_split_rows), over two column tiles of W1 (h = 300 > column_tile).
const Shape kShapes[] = {
    {"balanced", 600, 24, 40, 5, 2, false},
    {"skewed", 600, 24, 40, 5, 2, true},
    {"wide", 300, 72, 136, 4, 3, false},
    {"one expert", 200, 72, 300, 4, 1, true, true},
};

template <typename Scalar, typename ExpertT>
sparsemoe::MoELayer<Scalar, ExpertT> make_layer(const Shape& shape) {
  sparsemoe::MoEConfig config;
  config.input_dim = shape.dim;
  config.hidden_dim = shape.hidden;
  config.num_experts = shape.experts;
  config.k = shape.k;
  config.seed = 0x5EED;
  sparsemoe::MoELayer<Scalar, ExpertT> layer(config);
  layer.gate().initialize_uniform(77);
  if (shape.skewed) {
    layer.gate().gate_weight().row(0).setZero();
    layer.gate().gate_weight()(0, 0) = Scalar(shape.single ? 30 : 8);
  }
  return layer;
}

template <typename Scalar>
Matrix<Scalar> make_input(const Shape& shape, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  Matrix<Scalar> x(shape.tokens, shape.dim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<Scalar>(dist(rng));
  if (shape.skewed) {
    // Column 0 feeds only expert 0's logit (weight 8): ~1 for 90% of the tokens, -1 for the rest.
    for (Index t = 0; t < shape.tokens; ++t) {
      x(t, 0) = static_cast<Scalar>(t % 10 == 0 && !shape.single ? -1.0 : 1.0 + 0.1 * dist(rng));
    }
  }
  return x;
}

template <typename Layer>
Snapshot run_training(const Layer& layer, const Matrix<typename Layer::Scalar>& x,
                      const Matrix<typename Layer::Scalar>& d_output) {
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 41;
  options.importance_weight = 0.1;
  options.load_weight = 0.07;
  const auto result = layer.forward(x, options);
  auto gradients = layer.make_gradients();
  const auto d_input = layer.backward(result, d_output, gradients);
  Snapshot snapshot;
  record_forward(snapshot, "training.", result);
  record(snapshot, "d_input", d_input);
  for (const auto& tensor : gradients.tensors()) record(snapshot, "gradient." + tensor.name, tensor.matrix());
  // A second backward ADDS to the same gradients: the accumulation is deterministic too.
  (void)layer.backward(result, d_output, gradients);
  for (const auto& tensor : gradients.tensors()) record(snapshot, "gradient2." + tensor.name, tensor.matrix());
  return snapshot;
}

template <typename Layer>
Snapshot run_evaluation(const Layer& layer, const Matrix<typename Layer::Scalar>& x) {
  Snapshot snapshot;
  record_forward(snapshot, "evaluation.", layer.forward(x));
  return snapshot;
}

TYPED_TEST(Determinism, BitwiseAcrossThreadCountsAndRepeats) {
  using Scalar = typename TypeParam::Scalar;
  using ExpertT = typename TypeParam::ExpertT;
  for (const Shape& shape : kShapes) {
    SCOPED_TRACE(shape.name);
    const auto layer = make_layer<Scalar, ExpertT>(shape);
    const Matrix<Scalar> x = make_input<Scalar>(shape, 1);
    const Matrix<Scalar> d_output = make_input<Scalar>({"", shape.tokens, shape.dim, 0, 0, 0, false}, 2);

    Snapshot training_reference;
    Snapshot evaluation_reference;
    {
      ScopedThreads threads(1);
      training_reference = run_training(layer, x, d_output);
      evaluation_reference = run_evaluation(layer, x);
    }
    // The test must exercise what it claims: several tiles per expert, and real gradients.
    {
      const auto result = layer.forward(x);
      using Layer = sparsemoe::MoELayer<Scalar, ExpertT>;
      const Index tile = Layer::expert_row_tile;
      const Index biggest = result.tokens_per_expert().maxCoeff();
      EXPECT_GT(biggest, tile);
      if (shape.single) {
        EXPECT_EQ(result.tokens_per_expert()[0], shape.tokens * shape.k);
        EXPECT_LE(shape.tokens * shape.k, Layer::column_split_rows);
        EXPECT_GT(shape.hidden, Layer::column_tile);
      } else if (shape.skewed) {
        EXPECT_GE(result.tokens_per_expert()[0], 4 * tile);
      }
    }

    for (int repeat = 0; repeat < 2; ++repeat) {
      for (const int threads : thread_counts()) {
        SCOPED_TRACE(::testing::Message() << threads << " thread(s), repeat " << repeat);
        ScopedThreads scoped(threads);
        EXPECT_TRUE(same_bits(training_reference, run_training(layer, x, d_output)));
        EXPECT_TRUE(same_bits(evaluation_reference, run_evaluation(layer, x)));
      }
    }
  }
}

TYPED_TEST(Determinism, IntoVariantReusedAcrossThreadCounts) {
  using Scalar = typename TypeParam::Scalar;
  using ExpertT = typename TypeParam::ExpertT;
  const Shape& shape = kShapes[1];
  const auto layer = make_layer<Scalar, ExpertT>(shape);
  const Matrix<Scalar> x = make_input<Scalar>(shape, 3);
  const Matrix<Scalar> small = make_input<Scalar>({"", 37, shape.dim, 0, 0, 0, false}, 4);
  for (const Mode mode : {Mode::evaluation, Mode::training}) {
    SCOPED_TRACE(mode == Mode::training ? "training" : "evaluation");
    sparsemoe::ForwardOptions options;
    options.mode = mode;
    options.step = 5;
    Snapshot reference;
    Snapshot small_reference;
    {
      ScopedThreads threads(1);
      record_forward(reference, "", layer.forward(x, options));
      record_forward(small_reference, "", layer.forward(small, options));
    }
    sparsemoe::ForwardResult<Scalar> result;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    for (const int threads : {3, 1, 2, 3}) {
      if (threads > thread_counts().back()) continue;
      SCOPED_TRACE(::testing::Message() << threads << " thread(s)");
      ScopedThreads scoped(threads);
      layer.forward(x, options, result, workspace);
      Snapshot snapshot;
      record_forward(snapshot, "", result);
      EXPECT_TRUE(same_bits(reference, snapshot));
      // A smaller batch through the same (now oversized) storage, then the big one again.
      layer.forward(small, options, result, workspace);
      Snapshot small_snapshot;
      record_forward(small_snapshot, "", result);
      EXPECT_TRUE(same_bits(small_reference, small_snapshot));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Training noise: a function of (seed, step, token, expert) only.
// ---------------------------------------------------------------------------------------------

template <typename Scalar>
class NoiseAddressing : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
struct ScalarNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};
TYPED_TEST_SUITE(NoiseAddressing, Scalars, ScalarNames);

TYPED_TEST(NoiseAddressing, DependsOnlyOnSeedStepTokenExpert) {
  using Scalar = TypeParam;
  const Shape shape{"noise", 150, 12, 16, 7, 2, false};
  constexpr std::uint64_t seed = 0xC0FFEE;
  constexpr std::uint64_t step = 12345;
  sparsemoe::NoisyTopKGate<Scalar> gate(shape.dim, shape.experts, shape.k, Scalar(1e-2), seed);
  gate.initialize_uniform(3);
  const Matrix<Scalar> x1 = make_input<Scalar>(shape, 10);
  const Matrix<Scalar> x2 = make_input<Scalar>(shape, 11) * Scalar(5);
  ASSERT_FALSE(x1 == x2);

  sparsemoe::Routing<Scalar> first;
  sparsemoe::Routing<Scalar> second;
  {
    ScopedThreads threads(1);
    first = gate.route(x1, Mode::training, step);
  }
  {
    ScopedThreads threads(thread_counts().back());
    second = gate.route(x2, Mode::training, step);
  }
  ASSERT_EQ(first.noise.rows(), shape.tokens);
  ASSERT_EQ(first.noise.cols(), shape.experts);
  // Different batches, different logits and scales, the same noise sample.
  EXPECT_FALSE(first.clean_logits == second.clean_logits);
  EXPECT_FALSE(first.noise_scale == second.noise_scale);
  EXPECT_EQ(0, std::memcmp(first.noise.data(), second.noise.data(),
                           static_cast<std::size_t>(first.noise.size()) * sizeof(Scalar)));

  // The sample is detail::standard_normal at the entry's address, computed here independently.
  const std::pair<Index, Index> entries[] = {{0, 0}, {0, 6}, {1, 0}, {37, 3}, {64, 5}, {149, 6}};
  for (const auto& entry : entries) {
    const double expected = sparsemoe::detail::standard_normal(seed, step, static_cast<std::uint64_t>(entry.first),
                                                               static_cast<std::uint64_t>(entry.second));
    const Scalar expected_scalar = static_cast<Scalar>(expected);
    const Scalar got = first.noise(entry.first, entry.second);
    EXPECT_EQ(0, std::memcmp(&got, &expected_scalar, sizeof(Scalar)))
        << "noise(" << entry.first << ", " << entry.second << ") = " << got << ", standard_normal gives "
        << expected;
  }
  // And the noisy logits are built from it: H = c + n ⊙ s.
  for (const auto& entry : entries) {
    const Index t = entry.first;
    const Index i = entry.second;
    EXPECT_EQ(first.noisy_logits(t, i), first.clean_logits(t, i) + first.noise(t, i) * first.noise_scale(t, i));
  }

  // Token t's noise does not depend on the batch size either: a prefix batch has the prefix noise.
  const Matrix<Scalar> prefix = x2.topRows(40);
  const auto short_routing = gate.route(prefix, Mode::training, step);
  EXPECT_TRUE(short_routing.noise == first.noise.topRows(40));

  // Another step, or another seed, gives another sample.
  const auto next_step = gate.route(x1, Mode::training, step + 1);
  EXPECT_FALSE(next_step.noise == first.noise);
  sparsemoe::NoisyTopKGate<Scalar> other_seed(shape.dim, shape.experts, shape.k, Scalar(1e-2), seed + 1);
  other_seed.gate_weight() = gate.gate_weight();
  other_seed.noise_weight() = gate.noise_weight();
  EXPECT_FALSE(other_seed.route(x1, Mode::training, step).noise == first.noise);
  // Evaluation mode has no noise at all.
  EXPECT_EQ(gate.route(x1, Mode::evaluation, step).noise.size(), 0);
}

TYPED_TEST(NoiseAddressing, LayerUsesConfigSeedAndOptionsStep) {
  using Scalar = TypeParam;
  sparsemoe::MoEConfig config;
  config.input_dim = 8;
  config.hidden_dim = 8;
  config.num_experts = 4;
  config.k = 1;
  config.seed = 0xABCDEF12345ull;
  sparsemoe::MoELayer<Scalar> layer(config);
  const Shape shape{"", 70, 8, 8, 4, 1, false};
  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 99;
  const auto a = layer.forward(make_input<Scalar>(shape, 20), options);
  const auto b = layer.forward(make_input<Scalar>(shape, 21), options);
  EXPECT_TRUE(a.routing.noise == b.routing.noise);
  for (Index t : {Index(0), Index(33), Index(69)}) {
    for (Index i = 0; i < 4; ++i) {
      EXPECT_EQ(a.routing.noise(t, i),
                static_cast<Scalar>(sparsemoe::detail::standard_normal(config.seed, *options.step,
                                                                       static_cast<std::uint64_t>(t),
                                                                       static_cast<std::uint64_t>(i))))
          << "token " << t << ", expert " << i;
    }
  }
}

}  // namespace
