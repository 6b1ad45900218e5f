// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Checkpoints (issue 4, item 5): sparsemoe/checkpoint.hpp.
//   * Round trip: bitwise for every parameter (NaN payloads, −0.0, ±Inf, denormals included), the
//     noise ε and seed, and Adam / Sgd state after real steps, for several expert types and both
//     scalars; after loading, forward, backward and further optimizer steps are bitwise those of
//     the original objects.
//   * The format: walked here independently of the reader, following docs/checkpoint-format.md.
//   * Corruption: truncation at every offset, every single-byte flip, wrong magic / version /
//     scalar type / expert kind / shapes / tensor names, trailing bytes, forged-but-resealed files
//     and missing optimizer state each raise CheckpointError of the right kind, and leave the layer
//     and the optimizer bitwise unchanged.
//   * The checksum is what catches a flipped payload byte: the same bytes with the checksum
//     recomputed load silently (ChecksumIsTheOnlyGuardAgainstPayloadCorruption).
//   * Atomic writes: a failed save (write error through RLIMIT_FSIZE, rename onto a directory, a
//     parent that is a regular file; a read-only directory when not root) leaves the previous
//     checkpoint byte-identical and no temporary file behind.
#include <sparsemoe/sparsemoe.hpp>
#include <sparsemoe/checkpoint.hpp>

#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using sparsemoe::CheckpointError;
using sparsemoe::CheckpointErrorKind;
using sparsemoe::Index;
using sparsemoe::Mode;
template <typename Scalar>
using Matrix = sparsemoe::Matrix<Scalar>;

// ---- Byte helpers (independent of the reader) -----------------------------------------------------

std::uint32_t get_u32(const std::string& bytes, std::size_t offset) {
  std::uint32_t value = 0;
  for (int i = 3; i >= 0; --i) value = value << 8 | static_cast<unsigned char>(bytes.at(offset + static_cast<std::size_t>(i)));
  return value;
}
std::uint64_t get_u64(const std::string& bytes, std::size_t offset) {
  return static_cast<std::uint64_t>(get_u32(bytes, offset)) | static_cast<std::uint64_t>(get_u32(bytes, offset + 4)) << 32;
}
void put_u32(std::string& bytes, std::size_t offset, std::uint32_t value) {
  for (std::size_t i = 0; i < 4; ++i) bytes.at(offset + i) = static_cast<char>(value >> (8 * i) & 0xFF);
}
void put_u64(std::string& bytes, std::size_t offset, std::uint64_t value) {
  for (std::size_t i = 0; i < 8; ++i) bytes.at(offset + i) = static_cast<char>(value >> (8 * i) & 0xFF);
}
void put_f64(std::string& bytes, std::size_t offset, double value) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, 8);
  put_u64(bytes, offset, bits);
}

/// Recomputes the total size field and the trailing XXH3-64, as a forger (or a buggy writer) would.
void reseal(std::string& bytes) {
  put_u64(bytes, 12, bytes.size());
  put_u64(bytes, bytes.size() - 8, XXH3_64bits(bytes.data(), bytes.size() - 8));
}

/// One tensor record as documented: str name, i64 rows, i64 cols, payload.
struct Record {
  std::string name;
  std::size_t name_offset = 0;  // of the u32 length
  std::size_t rows_offset = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::size_t payload_offset = 0;
  std::size_t payload_size = 0;
};

/// Where every field of a checkpoint is, found by walking docs/checkpoint-format.md by hand.
struct Layout {
  std::size_t scalar_size = 0;
  std::string expert_kind;
  std::size_t kind_offset = 0, d_offset = 0, epsilon_offset = 0, seed_offset = 0, count_offset = 0;
  std::vector<Record> tensors;
  std::size_t optimizer_offset = 0;
  std::string optimizer;
  std::size_t optimizer_fields_offset = 0;
  std::vector<Record> state;
  std::size_t end = 0;  // where the content ends: must be the checksum's offset
};

std::string get_str(const std::string& bytes, std::size_t& offset) {
  const std::uint32_t length = get_u32(bytes, offset);
  std::string value = bytes.substr(offset + 4, length);
  offset += 4 + length;
  return value;
}

Record get_record(const std::string& bytes, std::size_t& offset, std::size_t scalar_size) {
  Record record;
  record.name_offset = offset;
  record.name = get_str(bytes, offset);
  record.rows_offset = offset;
  record.rows = static_cast<std::int64_t>(get_u64(bytes, offset));
  record.cols = static_cast<std::int64_t>(get_u64(bytes, offset + 8));
  offset += 16;
  record.payload_offset = offset;
  record.payload_size = static_cast<std::size_t>(record.rows * record.cols) * scalar_size;
  offset += record.payload_size;
  return record;
}

Layout walk(const std::string& bytes) {
  Layout layout;
  std::size_t offset = 20;
  const std::uint32_t code = get_u32(bytes, offset);
  layout.scalar_size = get_u32(bytes, offset + 4);
  EXPECT_TRUE((code == 1 && layout.scalar_size == 4) || (code == 2 && layout.scalar_size == 8));
  offset += 8;
  layout.kind_offset = offset;
  layout.expert_kind = get_str(bytes, offset);
  layout.d_offset = offset;
  offset += 32;  // d, h, E, k
  layout.epsilon_offset = offset;
  layout.seed_offset = offset + 8;
  layout.count_offset = offset + 16;
  const std::uint64_t count = get_u64(bytes, layout.count_offset);
  offset += 24;
  for (std::uint64_t i = 0; i < count; ++i) layout.tensors.push_back(get_record(bytes, offset, layout.scalar_size));
  layout.optimizer_offset = offset;
  layout.optimizer = get_str(bytes, offset);
  layout.optimizer_fields_offset = offset;
  if (layout.optimizer != "none") {
    offset += layout.optimizer == "sgd" ? 8 + 3 * 8 + 4 : 8 + 5 * 8;
    const std::uint64_t state_count = get_u64(bytes, offset);
    offset += 8;
    for (std::uint64_t i = 0; i < state_count; ++i) layout.state.push_back(get_record(bytes, offset, layout.scalar_size));
  }
  layout.end = offset;
  return layout;
}

// ---- Layers, snapshots, training ----------------------------------------------------------------

template <typename Scalar_, typename ExpertT_>
struct Case {
  using Scalar = Scalar_;
  using ExpertT = ExpertT_;
  using Layer = sparsemoe::MoELayer<Scalar, ExpertT>;
};

/// The same expert family over the other scalar type.
template <typename ExpertT, typename Other>
struct Rebind;
template <typename Scalar, typename Act, typename Other>
struct Rebind<sparsemoe::Expert<Scalar, Act>, Other> {
  using type = sparsemoe::Expert<Other, Act>;
};
template <typename Scalar, typename Other>
struct Rebind<sparsemoe::SwiGluExpert<Scalar>, Other> {
  using type = sparsemoe::SwiGluExpert<Other>;
};

/// Another expert kind over the same scalar.
template <typename ExpertT>
struct OtherKind {
  using type = sparsemoe::Expert<typename ExpertT::Scalar, sparsemoe::Relu>;
};
template <typename Scalar>
struct OtherKind<sparsemoe::Expert<Scalar, sparsemoe::Relu>> {
  using type = sparsemoe::Expert<Scalar, sparsemoe::Silu>;
};

sparsemoe::MoEConfig make_config(std::uint64_t seed, double epsilon = 0.03) {
  sparsemoe::MoEConfig config;
  config.input_dim = 5;
  config.hidden_dim = 6;
  config.num_experts = 4;
  config.k = 2;
  config.noise_epsilon = epsilon;
  config.seed = seed;
  return config;
}

template <typename Layer>
Layer make_layer(std::uint64_t seed, double epsilon = 0.03) {
  Layer layer(make_config(seed, epsilon));
  layer.gate().initialize_uniform(seed + 100);
  return layer;
}

/// Every byte of the layer's state: tensor names, shapes and raw bytes, ε's bytes, the seed, the
/// check_finite flag. Two layers are bitwise equal iff their snapshots are.
template <typename Layer, typename = decltype(std::declval<Layer&>().gate())>
std::string snapshot(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::string out;
  for (const auto& view : layer.tensors()) {
    out += view.name + ":" + std::to_string(view.rows) + "x" + std::to_string(view.cols) + ":";
    out.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
  }
  const Scalar epsilon = layer.gate().noise_epsilon();
  out.append(reinterpret_cast<const char*>(&epsilon), sizeof epsilon);
  out += ":" + std::to_string(layer.gate().noise_seed()) + ":" + std::to_string(layer.gate().check_finite());
  return out;
}

template <typename Scalar>
void append_vectors(std::string& out, const std::vector<sparsemoe::Vector<Scalar>>& vectors) {
  out += std::to_string(vectors.size()) + ":";
  for (const auto& v : vectors) {
    out += std::to_string(v.size()) + ":";
    out.append(reinterpret_cast<const char*>(v.data()), static_cast<std::size_t>(v.size()) * sizeof(Scalar));
  }
}

template <typename Scalar>
std::string snapshot(const sparsemoe::Adam<Scalar>& adam) {
  std::string out = std::to_string(adam.step_count()) + ":";
  const sparsemoe::AdamOptions& o = adam.options();
  for (double value : {o.learning_rate, o.beta1, o.beta2, o.epsilon, o.weight_decay}) {
    out.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  append_vectors(out, adam.first_moments());
  append_vectors(out, adam.second_moments());
  return out;
}

template <typename Scalar>
std::string snapshot(const sparsemoe::Sgd<Scalar>& sgd) {
  std::string out = std::to_string(sgd.step_count()) + ":" + std::to_string(sgd.options().nesterov) + ":";
  const sparsemoe::SgdOptions& o = sgd.options();
  for (double value : {o.learning_rate, o.momentum, o.weight_decay}) {
    out.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  append_vectors(out, sgd.velocities());
  return out;
}

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(uniform(generator));
  return m;
}

/// `steps` real training steps (training-mode forward, backward, optimizer step) from step `first`.
template <typename Layer, typename Optimizer>
void train(Layer& layer, Optimizer& optimizer, int steps, int first = 0) {
  using Scalar = typename Layer::Scalar;
  auto gradients = layer.make_gradients();
  for (int s = first; s < first + steps; ++s) {
    const auto x = random_matrix<Scalar>(12, layer.input_dim(), 1000u + static_cast<std::uint32_t>(s));
    const auto dy = random_matrix<Scalar>(12, layer.input_dim(), 2000u + static_cast<std::uint32_t>(s));
    sparsemoe::ForwardOptions options;
    options.mode = Mode::training;
    options.step = static_cast<std::uint64_t>(s);
    gradients.set_zero();
    const auto result = layer.forward(x, options);
    layer.backward(result, dy, gradients);
    optimizer.step(layer.tensors(), gradients.tensors());
  }
}

/// Raw bits of special values written into some tensors: a quiet NaN with a payload, a NaN with
/// the sign set, −0.0, ±Inf, the smallest denormal, the largest finite value.
template <typename Scalar>
std::vector<Scalar> special_values() {
  using Bits = std::conditional_t<std::is_same<Scalar, float>::value, std::uint32_t, std::uint64_t>;
  const Bits payload_nan = std::is_same<Scalar, float>::value ? Bits(0x7fc12345u) : Bits(0x7ff8000000012345ull);
  const Bits negative_nan = std::is_same<Scalar, float>::value ? Bits(0xffc00001u) : Bits(0xfff0000000000001ull);
  Scalar a, b;
  std::memcpy(&a, &payload_nan, sizeof a);
  std::memcpy(&b, &negative_nan, sizeof b);
  return {a, b, Scalar(-0.0), std::numeric_limits<Scalar>::infinity(), -std::numeric_limits<Scalar>::infinity(),
          std::numeric_limits<Scalar>::denorm_min(), std::numeric_limits<Scalar>::max()};
}

struct CaseNames {
  template <typename T>
  static std::string GetName(int) {
    std::string kind = sparsemoe::ExpertKind<typename T::ExpertT>::name();  // "expert:relu" -> "expert_relu"
    std::replace(kind.begin(), kind.end(), ':', '_');
    return (std::is_same<typename T::Scalar, float>::value ? "float_" : "double_") + kind;
  }
};

/// Empty when `a` and `b` are equal, else where they first differ (binary snapshots are not printed).
std::string difference(const std::string& a, const std::string& b) {
  if (a == b) return {};
  const auto mismatch = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return "they differ from byte " + std::to_string(mismatch.first - a.begin()) + " (sizes " + std::to_string(a.size()) +
         " and " + std::to_string(b.size()) + ")";
}
#define EXPECT_SAME_BYTES(a, b) EXPECT_EQ(difference((a), (b)), "") << #a " vs " #b
#define EXPECT_OTHER_BYTES(a, b) EXPECT_NE(difference((a), (b)), "") << #a " vs " #b

/// Expects `action` to throw CheckpointError of `kind`; returns its message.
template <typename Action>
std::string expect_error(CheckpointErrorKind kind, Action&& action) {
  try {
    action();
  } catch (const CheckpointError& error) {
    EXPECT_EQ(sparsemoe::to_string(error.kind()), std::string(sparsemoe::to_string(kind))) << error.what();
    return error.what();
  }
  ADD_FAILURE() << "expected CheckpointError " << sparsemoe::to_string(kind) << ", nothing was thrown";
  return {};
}

// ---- Typed tests over scalar × expert type ------------------------------------------------------

template <typename T>
class Checkpoint : public ::testing::Test {};
using Cases = ::testing::Types<Case<float, sparsemoe::Expert<float, sparsemoe::Relu>>,
                               Case<double, sparsemoe::Expert<double, sparsemoe::Silu>>,
                               Case<float, sparsemoe::Expert<float, sparsemoe::GeluTanh>>,
                               Case<double, sparsemoe::Expert<double, sparsemoe::GeluErf>>,
                               Case<float, sparsemoe::SwiGluExpert<float>>, Case<double, sparsemoe::SwiGluExpert<double>>>;
TYPED_TEST_SUITE(Checkpoint, Cases, CaseNames);

TYPED_TEST(Checkpoint, LayerRoundTripIsBitwiseIncludingNaNPayloadsAndNegativeZero) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(1, 0.03);
  original.gate().set_check_finite(false);
  const std::vector<Scalar> specials = special_values<Scalar>();
  auto views = original.tensors();
  for (std::size_t t = 0; t < views.size(); t += 3) {
    for (std::size_t i = 0; i < specials.size() && static_cast<Index>(i) < views[t].size(); ++i) {
      views[t].data[i] = specials[i];
    }
  }
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  EXPECT_EQ(walk(bytes).end, bytes.size() - 8) << "the documented layout does not cover the file";

  Layer loaded = make_layer<Layer>(2, 0.5);  // other weights, ε and seed
  loaded.gate().set_check_finite(false);
  ASSERT_NE(difference(snapshot(loaded), snapshot(original)), "");
  const std::string before = snapshot(loaded);
  expect_error(CheckpointErrorKind::non_finite_value,
               [&] { sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded); });
  EXPECT_SAME_BYTES(snapshot(loaded), before);  // rejected by default, nothing changed
  sparsemoe::CheckpointLoadOptions load_options;
  load_options.allow_non_finite = true;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, load_options);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));  // every byte, the NaN payloads and −0.0 included
  EXPECT_EQ(loaded.gate().noise_seed(), original.gate().noise_seed());
  const Scalar loaded_epsilon = loaded.gate().noise_epsilon();
  const Scalar original_epsilon = original.gate().noise_epsilon();
  EXPECT_EQ(std::memcmp(&loaded_epsilon, &original_epsilon, sizeof(Scalar)), 0);
  EXPECT_SAME_BYTES(sparsemoe::serialize_checkpoint(loaded), bytes);
  // A −0.0 is still negative, and the payload NaN kept its bits.
  const Scalar negative_zero = loaded.tensors()[0].data[2];
  EXPECT_TRUE(negative_zero == Scalar(0) && std::signbit(negative_zero));
  EXPECT_EQ(std::memcmp(loaded.tensors()[0].data, &specials[0], sizeof(Scalar)), 0);
}

TYPED_TEST(Checkpoint, CheckFiniteIsKeptFromTheTarget) {
  using Layer = typename TypeParam::Layer;
  Layer original = make_layer<Layer>(1);
  original.gate().set_check_finite(false);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  Layer loaded = make_layer<Layer>(2);
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded);
  EXPECT_TRUE(loaded.gate().check_finite());
}

TYPED_TEST(Checkpoint, FileNamesAndShapesAreTheLayerTensors) {
  using Layer = typename TypeParam::Layer;
  Layer layer = make_layer<Layer>(3);
  const std::string bytes = sparsemoe::serialize_checkpoint(layer);
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  const auto views = layer.tensors();
  ASSERT_EQ(info.tensors.size(), views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    EXPECT_EQ(info.tensors[i].name, views[i].name);
    EXPECT_EQ(info.tensors[i].rows, views[i].rows);
    EXPECT_EQ(info.tensors[i].cols, views[i].cols);
  }
  EXPECT_EQ(info.expert_kind, sparsemoe::ExpertKind<typename TypeParam::ExpertT>::name());
  EXPECT_EQ(info.scalar_size, sizeof(typename TypeParam::Scalar));
  EXPECT_EQ(info.format_version, sparsemoe::checkpoint_format_version);
  EXPECT_EQ(info.size_bytes, bytes.size());
  EXPECT_EQ(info.optimizer, "none");
  EXPECT_EQ(info.input_dim, 5);
  EXPECT_EQ(info.hidden_dim, 6);
  EXPECT_EQ(info.num_experts, 4);
  EXPECT_EQ(info.k, 2);
  EXPECT_EQ(info.noise_seed, 3u);
  EXPECT_EQ(info.noise_epsilon, static_cast<double>(static_cast<typename TypeParam::Scalar>(0.03)));
  // config() builds a layer the file loads into.
  Layer rebuilt(info.config());
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), rebuilt);
  EXPECT_SAME_BYTES(snapshot(rebuilt), snapshot(layer));
}

TYPED_TEST(Checkpoint, ForwardAndBackwardAreBitwiseAfterLoadingFromAFile) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(4);
  sparsemoe::Adam<Scalar> adam;
  train(original, adam, 3);
  const fs::path directory = fs::temp_directory_path() / ("sparsemoe_ckpt_fwd_" + std::to_string(::getpid()));
  fs::create_directories(directory);
  const std::string path = (directory / "layer.ckpt").string();
  sparsemoe::save_checkpoint(path, original);
  Layer loaded = make_layer<Layer>(5, 0.2);
  sparsemoe::load_checkpoint(path, loaded);
  fs::remove_all(directory);

  const auto x = random_matrix<Scalar>(40, 5, 77);
  const auto a = original.forward(x);
  const auto b = loaded.forward(x);
  ASSERT_EQ(a.output.size(), b.output.size());
  EXPECT_EQ(std::memcmp(a.output.data(), b.output.data(), sizeof(Scalar) * static_cast<std::size_t>(a.output.size())), 0);

  sparsemoe::ForwardOptions options;
  options.mode = Mode::training;
  options.step = 9;
  const auto ta = original.forward(x, options);
  const auto tb = loaded.forward(x, options);  // same noise: the seed came back
  EXPECT_EQ(std::memcmp(ta.output.data(), tb.output.data(), sizeof(Scalar) * static_cast<std::size_t>(ta.output.size())), 0);
  const auto dy = random_matrix<Scalar>(40, 5, 78);
  auto ga = original.make_gradients();
  auto gb = loaded.make_gradients();
  const Matrix<Scalar> dxa = original.backward(ta, dy, ga);
  const Matrix<Scalar> dxb = loaded.backward(tb, dy, gb);
  EXPECT_EQ(std::memcmp(dxa.data(), dxb.data(), sizeof(Scalar) * static_cast<std::size_t>(dxa.size())), 0);
  const auto va = ga.tensors();
  const auto vb = gb.tensors();
  for (std::size_t i = 0; i < va.size(); ++i) {
    EXPECT_EQ(std::memcmp(va[i].data, vb[i].data, sizeof(Scalar) * static_cast<std::size_t>(va[i].size())), 0)
        << va[i].name;
  }
}

TYPED_TEST(Checkpoint, AdamStateRoundTripResumesTrainingBitwise) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  sparsemoe::AdamOptions options;
  options.learning_rate = 3e-3;
  options.beta2 = 0.99;
  options.weight_decay = 0.01;
  Layer original = make_layer<Layer>(6);
  sparsemoe::Adam<Scalar> adam(options);
  train(original, adam, 3);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, adam);
  EXPECT_EQ(walk(bytes).end, bytes.size() - 8);
  EXPECT_EQ(walk(bytes).state.size(), 2 * original.tensors().size());

  Layer loaded = make_layer<Layer>(7);
  sparsemoe::Adam<Scalar> restored;  // default hyper-parameters, no state
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, restored);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));
  EXPECT_SAME_BYTES(snapshot(restored), snapshot(adam));
  EXPECT_EQ(restored.step_count(), 3);
  EXPECT_SAME_BYTES(sparsemoe::serialize_checkpoint(loaded, restored), bytes);

  // Two more steps on both: still bitwise equal (hyper-parameters, t, m and v all came back).
  train(original, adam, 2, 3);
  train(loaded, restored, 2, 3);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));
  EXPECT_SAME_BYTES(snapshot(restored), snapshot(adam));
}

TYPED_TEST(Checkpoint, SgdStateRoundTripResumesTrainingBitwise) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  for (const double momentum : {0.0, 0.9}) {
    sparsemoe::SgdOptions options;
    options.learning_rate = 0.05;
    options.momentum = momentum;
    options.nesterov = momentum > 0.0;
    options.weight_decay = 1e-3;
    Layer original = make_layer<Layer>(8);
    sparsemoe::Sgd<Scalar> sgd(options);
    train(original, sgd, 3);
    const std::string bytes = sparsemoe::serialize_checkpoint(original, sgd);
    EXPECT_EQ(walk(bytes).state.size(), momentum > 0.0 ? original.tensors().size() : 0u);

    Layer loaded = make_layer<Layer>(9);
    sparsemoe::Sgd<Scalar> restored;
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, restored);
    EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));
    EXPECT_SAME_BYTES(snapshot(restored), snapshot(sgd));
    EXPECT_SAME_BYTES(sparsemoe::serialize_checkpoint(loaded, restored), bytes);
    train(original, sgd, 2, 3);
    train(loaded, restored, 2, 3);
    EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original)) << "momentum " << momentum;
    EXPECT_SAME_BYTES(snapshot(restored), snapshot(sgd)) << "momentum " << momentum;
  }
}

TYPED_TEST(Checkpoint, FreshOptimizerRoundTrip) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(10);
  sparsemoe::AdamOptions options;
  options.learning_rate = 0.02;
  sparsemoe::Adam<Scalar> fresh(options);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, fresh);
  EXPECT_TRUE(walk(bytes).state.empty());

  Layer loaded = make_layer<Layer>(11);
  sparsemoe::Adam<Scalar> stepped;
  train(loaded, stepped, 1);  // has state that must go
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, stepped);
  EXPECT_SAME_BYTES(snapshot(stepped), snapshot(fresh));
  train(original, fresh, 2);
  train(loaded, stepped, 2);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));
}

TYPED_TEST(Checkpoint, TruncationAtEveryOffsetIsReportedAndChangesNothing) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(12);
  sparsemoe::Adam<Scalar> adam;
  train(original, adam, 1);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, adam);
  Layer target = make_layer<Layer>(13);
  sparsemoe::Adam<Scalar> target_adam;
  train(target, target_adam, 2);
  const std::string before = snapshot(target);
  const std::string adam_before = snapshot(target_adam);
  for (std::size_t length = 0; length < bytes.size(); ++length) {
    expect_error(CheckpointErrorKind::truncated,
                 [&] { sparsemoe::deserialize_checkpoint(bytes.data(), length, target, target_adam); });
    if (length % 97 == 0) {  // the layer-only and inspect entry points too
      expect_error(CheckpointErrorKind::truncated,
                   [&] { sparsemoe::deserialize_checkpoint(bytes.data(), length, target); });
      expect_error(CheckpointErrorKind::truncated, [&] { sparsemoe::inspect_checkpoint(bytes.data(), length); });
    }
  }
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(target_adam), adam_before);
}

TYPED_TEST(Checkpoint, EverySingleByteFlipIsRejectedAndChangesNothing) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(14);
  sparsemoe::Adam<Scalar> adam;
  train(original, adam, 1);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, adam);
  Layer target = make_layer<Layer>(15);
  sparsemoe::Adam<Scalar> target_adam;
  const std::string before = snapshot(target);
  const std::string adam_before = snapshot(target_adam);
  for (std::size_t offset = 0; offset < bytes.size(); ++offset) {
    for (const unsigned char mask : {0x01, 0x80, 0xFF}) {
      std::string corrupted = bytes;
      corrupted[offset] = static_cast<char>(static_cast<unsigned char>(corrupted[offset]) ^ mask);
      try {
        sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), target, target_adam);
        ADD_FAILURE() << "flip at offset " << offset << " mask " << int(mask) << " was accepted";
      } catch (const CheckpointError& error) {
        const CheckpointErrorKind kind = error.kind();
        if (offset < 8) {
          EXPECT_EQ(kind, CheckpointErrorKind::bad_magic) << offset;
        } else if (offset < 12) {
          EXPECT_EQ(kind, CheckpointErrorKind::unsupported_version) << offset;
        } else if (offset < 20) {  // the total size field
          EXPECT_TRUE(kind == CheckpointErrorKind::truncated || kind == CheckpointErrorKind::trailing_bytes ||
                      kind == CheckpointErrorKind::malformed)
              << offset << ": " << error.what();
        } else {  // header fields after the size, every payload byte, the checksum itself
          EXPECT_EQ(kind, CheckpointErrorKind::checksum_mismatch) << offset << ": " << error.what();
        }
      }
    }
  }
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(target_adam), adam_before);
}

TYPED_TEST(Checkpoint, WrongScalarTypeIsReported) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  using Other = std::conditional_t<std::is_same<Scalar, float>::value, double, float>;
  using OtherLayer = sparsemoe::MoELayer<Other, typename Rebind<typename TypeParam::ExpertT, Other>::type>;
  const OtherLayer other = make_layer<OtherLayer>(16);
  const std::string bytes = sparsemoe::serialize_checkpoint(other);
  Layer target = make_layer<Layer>(17);
  const std::string before = snapshot(target);
  const std::string message = expect_error(CheckpointErrorKind::wrong_scalar_type, [&] {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target);
  });
  EXPECT_NE(message.find(std::is_same<Scalar, float>::value ? "expected float32" : "expected float64"),
            std::string::npos) << message;
  EXPECT_NE(message.find(std::is_same<Scalar, float>::value ? "got float64" : "got float32"), std::string::npos)
      << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TYPED_TEST(Checkpoint, WrongExpertKindIsReported) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  using OtherLayer = sparsemoe::MoELayer<Scalar, typename OtherKind<typename TypeParam::ExpertT>::type>;
  const OtherLayer other = make_layer<OtherLayer>(18);
  const std::string bytes = sparsemoe::serialize_checkpoint(other);
  Layer target = make_layer<Layer>(19);
  const std::string before = snapshot(target);
  const std::string message = expect_error(CheckpointErrorKind::wrong_expert_kind, [&] {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target);
  });
  EXPECT_NE(message.find("expected expert kind \"" + sparsemoe::ExpertKind<typename TypeParam::ExpertT>::name()),
            std::string::npos) << message;
  EXPECT_NE(message.find("got \"" + sparsemoe::ExpertKind<typename OtherKind<typename TypeParam::ExpertT>::type>::name()),
            std::string::npos) << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TYPED_TEST(Checkpoint, WrongShapesAreReportedWithBothValues) {
  using Layer = typename TypeParam::Layer;
  Layer target = make_layer<Layer>(20);
  const std::string before = snapshot(target);
  struct Change {
    const char* field;
    sparsemoe::MoEConfig config;
    Index expected, got;
  };
  std::vector<Change> changes;
  sparsemoe::MoEConfig config = make_config(21);
  config.input_dim = 7;
  changes.push_back({"input_dim (d) = 5", config, 5, 7});
  config = make_config(21);
  config.hidden_dim = 3;
  changes.push_back({"hidden_dim (h) = 6", config, 6, 3});
  config = make_config(21);
  config.num_experts = 5;
  changes.push_back({"num_experts (E) = 4", config, 4, 5});
  config = make_config(21);
  config.k = 1;
  changes.push_back({"k = 2", config, 2, 1});
  for (const Change& change : changes) {
    const Layer other(change.config);
    const std::string bytes = sparsemoe::serialize_checkpoint(other);
    const std::string message = expect_error(CheckpointErrorKind::shape_mismatch, [&] {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target);
    });
    EXPECT_NE(message.find(std::string("expected ") + change.field), std::string::npos) << message;
    EXPECT_NE(message.find("got " + std::to_string(change.got)), std::string::npos) << message;
  }
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TYPED_TEST(Checkpoint, ForgedTensorShapeAndNameAreReported) {
  using Layer = typename TypeParam::Layer;
  const Layer original = make_layer<Layer>(22);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  const Layout layout = walk(bytes);
  Layer target = make_layer<Layer>(23);
  const std::string before = snapshot(target);
  // expert1.w1 stored transposed (same payload size), checksum recomputed.
  const Record* w1 = nullptr;
  for (const Record& record : layout.tensors) {
    if (record.name == "expert1.w1") w1 = &record;
  }
  ASSERT_NE(w1, nullptr);
  std::string forged = bytes;
  put_u64(forged, w1->rows_offset, static_cast<std::uint64_t>(w1->cols));
  put_u64(forged, w1->rows_offset + 8, static_cast<std::uint64_t>(w1->rows));
  reseal(forged);
  std::string message = expect_error(CheckpointErrorKind::shape_mismatch, [&] {
    sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
  });
  const std::string shape = std::to_string(w1->rows) + "x" + std::to_string(w1->cols);
  const std::string transposed = std::to_string(w1->cols) + "x" + std::to_string(w1->rows);
  EXPECT_NE(message.find("tensor 'expert1.w1': expected " + shape + " (the layer's), got " + transposed),
            std::string::npos) << message;
  // A renamed tensor (same length).
  forged = bytes;
  forged[w1->name_offset + 4 + 6] = '3';  // "expert1.w1" -> "expert3.w1"
  reseal(forged);
  message = expect_error(CheckpointErrorKind::tensor_mismatch, [&] {
    sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
  });
  EXPECT_NE(message.find("to be 'expert1.w1' (the layer's), got 'expert3.w1'"), std::string::npos) << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TYPED_TEST(Checkpoint, ForgedButResealedContentIsMalformed) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  const Layer original = make_layer<Layer>(24);
  sparsemoe::Sgd<Scalar> sgd(sparsemoe::SgdOptions{0.1, 0.5, true, 0.0});
  Layer trained = original;
  train(trained, sgd, 1);
  const std::string bytes = sparsemoe::serialize_checkpoint(trained, sgd);
  const Layout layout = walk(bytes);
  Layer target = make_layer<Layer>(25);
  sparsemoe::Sgd<Scalar> target_sgd;
  const std::string before = snapshot(target);
  const std::string sgd_before = snapshot(target_sgd);
  const auto expect_malformed = [&](const char* what, std::string forged, const char* needle) {
    reseal(forged);
    const std::string message = expect_error(CheckpointErrorKind::malformed, [&] {
      sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target, target_sgd);
    });
    EXPECT_NE(message.find(needle), std::string::npos) << what << ": " << message;
  };
  std::string forged = bytes;
  put_u64(forged, layout.tensors[1].rows_offset, static_cast<std::uint64_t>(-3));
  expect_malformed("negative rows", forged, "expected non-negative rows and cols");
  forged = bytes;
  put_u64(forged, layout.tensors[1].rows_offset, std::uint64_t(1) << 40);
  expect_malformed("huge rows", forged, "which needs more bytes than the");
  forged = bytes;
  put_u64(forged, layout.d_offset + 24, 9);  // k = 9 > E = 4
  expect_malformed("k > E", forged, "1 <= k <= E");
  forged = bytes;
  put_f64(forged, layout.epsilon_offset, 0.0);
  expect_malformed("epsilon 0", forged, "finite noise epsilon > 0");
  forged = bytes;
  put_f64(forged, layout.epsilon_offset, std::nan(""));
  expect_malformed("epsilon NaN", forged, "finite noise epsilon > 0");
  if (std::is_same<Scalar, float>::value) {
    forged = bytes;
    put_f64(forged, layout.epsilon_offset, 0.1);  // 0.1 is not a float
    expect_malformed("epsilon not a float", forged, "is not exactly a finite float32");
  }
  forged = bytes;
  put_u32(forged, 24, layout.scalar_size == 4 ? 8 : 4);
  expect_malformed("scalar size", forged, "has size");
  forged = bytes;
  forged.insert(bytes.size() - 8, "junk");
  expect_malformed("bytes before the checksum", forged, "4 bytes before the checksum");
  forged = bytes;
  forged.replace(layout.optimizer_offset + 4, 3, "sgX");
  expect_malformed("unknown optimizer kind", forged, "got \"sgX\"");
  forged = bytes;
  put_u32(forged, layout.optimizer_fields_offset + 32, 2);  // nesterov flag
  expect_malformed("nesterov flag", forged, "nesterov flag 0 or 1, got 2");
  forged = bytes;
  put_f64(forged, layout.optimizer_fields_offset + 8, -1.0);  // learning rate
  expect_malformed("negative learning rate", forged, "invalid sgd hyper-parameters");
  forged = bytes;
  put_u64(forged, layout.optimizer_fields_offset, static_cast<std::uint64_t>(-1));  // step count
  expect_malformed("negative step count", forged, "step count >= 0, got -1");
  forged = bytes;
  forged[layout.state[0].name_offset + 4] = 'x';
  expect_malformed("state tensor name", forged, "should be 'sgd.velocity.gate.gate_weight'");
  forged = bytes;
  put_u32(forged, layout.kind_offset, 100000);
  expect_malformed("expert kind length", forged, "at most 256 expected");
  // An unknown scalar type code is a wrong scalar type.
  forged = bytes;
  put_u32(forged, 20, 3);
  reseal(forged);
  expect_error(CheckpointErrorKind::wrong_scalar_type, [&] {
    sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target, target_sgd);
  });
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(target_sgd), sgd_before);
}

TYPED_TEST(Checkpoint, NonFiniteWeightsAreRejectedNamingTheTensor) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  const Scalar bad_values[] = {std::numeric_limits<Scalar>::quiet_NaN(), -std::numeric_limits<Scalar>::infinity()};
  for (const Scalar bad : bad_values) {
    Layer original = make_layer<Layer>(28);
    auto views = original.tensors();
    const std::size_t victim = views.size() - 1;  // the last expert's last tensor
    views[victim].data[views[victim].size() / 2] = bad;
    const std::string bytes = sparsemoe::serialize_checkpoint(original);
    Layer target = make_layer<Layer>(29);
    const std::string before = snapshot(target);
    const std::string message = expect_error(CheckpointErrorKind::non_finite_value, [&] {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target);
    });
    EXPECT_NE(message.find("'" + views[victim].name + "'"), std::string::npos) << message;
    EXPECT_SAME_BYTES(snapshot(target), before);
  }
}

TYPED_TEST(Checkpoint, MissingOrOtherOptimizerStateIsReported) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(26);
  sparsemoe::Sgd<Scalar> sgd(sparsemoe::SgdOptions{0.1, 0.5, false, 0.0});
  train(original, sgd, 1);
  const std::string layer_only = sparsemoe::serialize_checkpoint(original);
  const std::string with_sgd = sparsemoe::serialize_checkpoint(original, sgd);
  Layer target = make_layer<Layer>(27);
  sparsemoe::Adam<Scalar> adam;
  train(target, adam, 1);
  const std::string before = snapshot(target);
  const std::string adam_before = snapshot(adam);
  std::string message = expect_error(CheckpointErrorKind::optimizer_mismatch, [&] {
    sparsemoe::deserialize_checkpoint(layer_only.data(), layer_only.size(), target, adam);
  });
  EXPECT_NE(message.find("expected adam optimizer state, got a checkpoint without optimizer state"), std::string::npos)
      << message;
  message = expect_error(CheckpointErrorKind::optimizer_mismatch, [&] {
    sparsemoe::deserialize_checkpoint(with_sgd.data(), with_sgd.size(), target, adam);
  });
  EXPECT_NE(message.find("expected adam optimizer state, got sgd state"), std::string::npos) << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(adam), adam_before);
  // The layer-only loader accepts a file with optimizer state (verified, then ignored).
  sparsemoe::deserialize_checkpoint(with_sgd.data(), with_sgd.size(), target);
  EXPECT_SAME_BYTES(snapshot(target), snapshot(original));
  EXPECT_SAME_BYTES(snapshot(adam), adam_before);
}

TYPED_TEST(Checkpoint, MagicVersionAndTrailingBytesAreReported) {
  using Layer = typename TypeParam::Layer;
  const Layer original = make_layer<Layer>(28);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  Layer target = make_layer<Layer>(29);
  const std::string before = snapshot(target);
  std::string forged = bytes;
  forged.replace(0, 8, std::string("GGUF\3\0\0\0", 8));
  std::string message = expect_error(CheckpointErrorKind::bad_magic, [&] {
    sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
  });
  EXPECT_NE(message.find("expected the magic \"SPMOECKP\""), std::string::npos) << message;
  EXPECT_NE(message.find("got 4747554603000000"), std::string::npos) << message;
  expect_error(CheckpointErrorKind::bad_magic, [&] { sparsemoe::deserialize_checkpoint("SPQ", 3, target); });
  forged = bytes;
  put_u32(forged, 8, 2);
  message = expect_error(CheckpointErrorKind::unsupported_version, [&] {
    sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
  });
  EXPECT_NE(message.find("expected format version 1, got version 2"), std::string::npos) << message;
  for (const std::size_t extra : {std::size_t(1), std::size_t(100)}) {
    forged = bytes + std::string(extra, '\0');
    message = expect_error(CheckpointErrorKind::trailing_bytes, [&] {
      sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
    });
    EXPECT_NE(message.find(std::to_string(extra) + " trailing bytes"), std::string::npos) << message;
  }
  message = expect_error(CheckpointErrorKind::truncated, [&] {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size() - 1, target);
  });
  EXPECT_NE(message.find("sparsemoe::deserialize_checkpoint: truncated: expected " + std::to_string(bytes.size()) +
                         " bytes (the header's total size), got " + std::to_string(bytes.size() - 1)),
            std::string::npos)
      << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
}

// The checksum is what stands between a flipped payload bit and a silently different model: the
// flipped file is refused, and the very same bytes with the checksum recomputed (what a reader
// without a checksum would see) load without complaint and change a weight.
TYPED_TEST(Checkpoint, ChecksumIsTheOnlyGuardAgainstPayloadCorruption) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  const Layer original = make_layer<Layer>(30);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  const Layout layout = walk(bytes);
  const Record& record = layout.tensors[4];  // an expert tensor
  std::string corrupted = bytes;
  const std::size_t offset = record.payload_offset + sizeof(Scalar) + 1;
  corrupted[offset] = static_cast<char>(corrupted[offset] ^ 0x10);
  Layer target = make_layer<Layer>(31);
  const std::string before = snapshot(target);
  const std::string message = expect_error(CheckpointErrorKind::checksum_mismatch, [&] {
    sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), target);
  });
  EXPECT_NE(message.find("expected XXH3-64 0x"), std::string::npos) << message;
  EXPECT_SAME_BYTES(snapshot(target), before);

  reseal(corrupted);
  sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), target);
  Layer reference = original;
  EXPECT_OTHER_BYTES(snapshot(target), snapshot(reference));
  EXPECT_NE(std::memcmp(target.tensors()[4].data + 1, reference.tensors()[4].data + 1, sizeof(Scalar)), 0);
}

// ---- Saving: argument errors, files, atomicity ----------------------------------------------------

using FloatLayer = sparsemoe::MoELayer<float>;

/// A fresh directory under the system's temporary directory, removed at the end of the test.
class CheckpointFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "sparsemoe_ckpt_XXXXXX").string();
    ASSERT_NE(::mkdtemp(&pattern[0]), nullptr);
    directory_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::permissions(directory_, fs::perms::owner_all, fs::perm_options::add, ignored);
    fs::remove_all(directory_, ignored);
  }
  std::set<std::string> entries(const fs::path& directory) const {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(directory)) names.insert(entry.path().filename().string());
    return names;
  }
  static std::string read(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }
  fs::path directory_;
};

TEST_F(CheckpointFiles, SaveLoadOverwriteAndNoTemporaryFilesRemain) {
  const FloatLayer first = make_layer<FloatLayer>(40);
  const FloatLayer second = make_layer<FloatLayer>(41);
  const std::string path = (directory_ / "model.ckpt").string();
  sparsemoe::save_checkpoint(path, first);
  EXPECT_SAME_BYTES(read(path), sparsemoe::serialize_checkpoint(first));
  sparsemoe::save_checkpoint(path, second);  // over the old one
  EXPECT_SAME_BYTES(read(path), sparsemoe::serialize_checkpoint(second));
  EXPECT_EQ(entries(directory_), std::set<std::string>{"model.ckpt"});
  FloatLayer loaded = make_layer<FloatLayer>(42);
  sparsemoe::load_checkpoint(path, loaded);
  FloatLayer reference = second;
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(reference));
  const sparsemoe::CheckpointInfo info = sparsemoe::read_checkpoint_info(path);
  EXPECT_EQ(info.noise_seed, 41u);
  EXPECT_EQ(info.expert_kind, "expert:relu");
  // With an optimizer, through files.
  sparsemoe::Adam<float> adam;
  FloatLayer trained = first;
  train(trained, adam, 2);
  sparsemoe::save_checkpoint(path, trained, adam);
  sparsemoe::Adam<float> restored;
  sparsemoe::load_checkpoint(path, loaded, restored);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(trained));
  EXPECT_SAME_BYTES(snapshot(restored), snapshot(adam));
  sparsemoe::Sgd<float> sgd(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0});
  train(trained, sgd, 2);
  sparsemoe::save_checkpoint(path, trained, sgd);
  sparsemoe::Sgd<float> sgd_restored;
  sparsemoe::load_checkpoint(path, loaded, sgd_restored);
  EXPECT_SAME_BYTES(snapshot(sgd_restored), snapshot(sgd));
  // A relative path (no directory part) works too.
  const fs::path previous = fs::current_path();
  fs::current_path(directory_);
  sparsemoe::save_checkpoint("relative.ckpt", first);
  fs::current_path(previous);
  EXPECT_SAME_BYTES(read(directory_ / "relative.ckpt"), sparsemoe::serialize_checkpoint(first));
  EXPECT_EQ(entries(directory_), (std::set<std::string>{"model.ckpt", "relative.ckpt"}));
}

TEST_F(CheckpointFiles, LoadingAMissingFileOrADirectoryIsAnIoError) {
  FloatLayer target = make_layer<FloatLayer>(43);
  const std::string before = snapshot(target);
  const std::string missing = (directory_ / "missing.ckpt").string();
  std::string message = expect_error(CheckpointErrorKind::io, [&] { sparsemoe::load_checkpoint(missing, target); });
  EXPECT_NE(message.find("sparsemoe::load_checkpoint: '" + missing + "': io: cannot open for reading: No such file"),
            std::string::npos) << message;
  message = expect_error(CheckpointErrorKind::io, [&] { sparsemoe::load_checkpoint(directory_.string(), target); });
  EXPECT_NE(message.find("expected a regular file, got a directory"), std::string::npos) << message;
  expect_error(CheckpointErrorKind::io, [&] { sparsemoe::read_checkpoint_info(missing); });
  EXPECT_SAME_BYTES(snapshot(target), before);
  // A file error is also a std::runtime_error.
  EXPECT_THROW(sparsemoe::load_checkpoint(missing, target), std::runtime_error);
}

TEST_F(CheckpointFiles, CorruptedFileNamesThePath) {
  const FloatLayer layer = make_layer<FloatLayer>(44);
  const std::string path = (directory_ / "model.ckpt").string();
  sparsemoe::save_checkpoint(path, layer);
  std::string bytes = read(path);
  bytes[bytes.size() / 2] ^= 0x04;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  FloatLayer target = make_layer<FloatLayer>(45);
  const std::string before = snapshot(target);
  const std::string message =
      expect_error(CheckpointErrorKind::checksum_mismatch, [&] { sparsemoe::load_checkpoint(path, target); });
  EXPECT_EQ(message.rfind("sparsemoe::load_checkpoint: '" + path + "': checksum_mismatch: expected XXH3-64 0x", 0), 0u)
      << message;
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TEST_F(CheckpointFiles, FailedWriteKeepsThePreviousCheckpoint) {
  // RLIMIT_FSIZE makes write() fail with EFBIG part-way (root included), like a full disk.
  const FloatLayer old_layer = make_layer<FloatLayer>(46);
  const FloatLayer new_layer = make_layer<FloatLayer>(47);
  const std::string path = (directory_ / "model.ckpt").string();
  sparsemoe::save_checkpoint(path, old_layer);
  const std::string old_bytes = read(path);
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = 100;  // bytes
  void (*previous_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    sparsemoe::save_checkpoint(path, new_layer);
  } catch (const CheckpointError& error) {
    message = error.what();
    EXPECT_EQ(error.kind(), CheckpointErrorKind::io);
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, previous_handler);
  EXPECT_NE(message.find("writing the temporary file"), std::string::npos) << message;
  EXPECT_NE(message.find("File too large"), std::string::npos) << message;
  EXPECT_SAME_BYTES(read(path), old_bytes);
  EXPECT_EQ(entries(directory_), std::set<std::string>{"model.ckpt"});
}

TEST_F(CheckpointFiles, FailedRenameLeavesNoTemporaryFile) {
  // The target is a non-empty directory: everything succeeds up to rename(), which fails.
  const fs::path target = directory_ / "model.ckpt";
  fs::create_directory(target);
  std::ofstream(target / "keep") << "x";
  const FloatLayer layer = make_layer<FloatLayer>(48);
  const std::string message = expect_error(CheckpointErrorKind::io, [&] {
    sparsemoe::save_checkpoint(target.string(), layer);
  });
  EXPECT_NE(message.find("renaming the temporary file"), std::string::npos) << message;
  EXPECT_EQ(entries(directory_), std::set<std::string>{"model.ckpt"});
  EXPECT_EQ(entries(target), std::set<std::string>{"keep"});
}

TEST_F(CheckpointFiles, ParentThatIsARegularFileFailsCleanly) {
  const fs::path parent = directory_ / "not_a_directory";
  std::ofstream(parent) << "precious";
  const FloatLayer layer = make_layer<FloatLayer>(49);
  const std::string message = expect_error(CheckpointErrorKind::io, [&] {
    sparsemoe::save_checkpoint((parent / "model.ckpt").string(), layer);
  });
  EXPECT_NE(message.find("cannot create the temporary file"), std::string::npos) << message;
  EXPECT_NE(message.find("Not a directory"), std::string::npos) << message;
  EXPECT_SAME_BYTES(read(parent), "precious");
  EXPECT_EQ(entries(directory_), std::set<std::string>{"not_a_directory"});
  expect_error(CheckpointErrorKind::io, [&] { sparsemoe::save_checkpoint("", layer); });
  expect_error(CheckpointErrorKind::io, [&] { sparsemoe::save_checkpoint((directory_ / "").string(), layer); });
}

TEST_F(CheckpointFiles, ReadOnlyDirectoryKeepsThePreviousCheckpoint) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions (the other failure tests cover this)";
  const FloatLayer old_layer = make_layer<FloatLayer>(50);
  const std::string path = (directory_ / "model.ckpt").string();
  sparsemoe::save_checkpoint(path, old_layer);
  const std::string old_bytes = read(path);
  fs::permissions(directory_, fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write,
                  fs::perm_options::remove);
  expect_error(CheckpointErrorKind::io, [&] { sparsemoe::save_checkpoint(path, make_layer<FloatLayer>(51)); });
  fs::permissions(directory_, fs::perms::owner_write, fs::perm_options::add);
  EXPECT_SAME_BYTES(read(path), old_bytes);
  EXPECT_EQ(entries(directory_), std::set<std::string>{"model.ckpt"});
}

TEST_F(CheckpointFiles, ConcurrentSavesToOnePathLeaveOneWholeCheckpoint) {
  std::vector<FloatLayer> layers;
  std::set<std::string> candidates;
  for (std::uint64_t i = 0; i < 4; ++i) {
    layers.push_back(make_layer<FloatLayer>(60 + i));
    candidates.insert(sparsemoe::serialize_checkpoint(layers.back()));
  }
  const std::string path = (directory_ / "model.ckpt").string();
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    threads.emplace_back([&, i] {
      for (int repeat = 0; repeat < 5; ++repeat) sparsemoe::save_checkpoint(path, layers[i]);
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(candidates.count(read(path)), 1u);
  EXPECT_EQ(entries(directory_), std::set<std::string>{"model.ckpt"});
}

TEST(CheckpointArguments, OptimizerSteppedOnOtherParametersIsRejectedBeforeWriting) {
  FloatLayer layer = make_layer<FloatLayer>(70);
  sparsemoe::MoEConfig config = make_config(71);
  config.num_experts = 3;
  FloatLayer other(config);
  sparsemoe::Adam<float> adam;
  train(other, adam, 1);
  EXPECT_THROW(sparsemoe::serialize_checkpoint(layer, adam), std::invalid_argument);
  sparsemoe::Sgd<float> sgd(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0});
  train(other, sgd, 1);
  try {
    sparsemoe::serialize_checkpoint(layer, sgd);
    ADD_FAILURE() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("sparsemoe::serialize_checkpoint: the optimizer has 14 velocity tensors "
                                             "but the layer has 18 parameter tensors"),
              std::string::npos)
        << error.what();
  }
  const std::string path = (fs::temp_directory_path() / ("sparsemoe_never_" + std::to_string(::getpid()))).string();
  EXPECT_THROW(sparsemoe::save_checkpoint(path, layer, sgd), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path));
}

TEST(CheckpointArguments, RestoreStateValidatesBeforeChangingAnything) {
  FloatLayer layer = make_layer<FloatLayer>(72);
  sparsemoe::Adam<float> adam;
  train(layer, adam, 1);
  const std::string before = snapshot(adam);
  const auto views = layer.tensors();
  std::vector<sparsemoe::Vector<float>> moments(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) moments[i] = sparsemoe::Vector<float>::Zero(views[i].size());
  std::vector<sparsemoe::Vector<float>> short_moments = moments;
  short_moments.pop_back();
  EXPECT_THROW(adam.restore_state({}, 2, views, moments, short_moments), std::invalid_argument);
  std::vector<sparsemoe::Vector<float>> wrong_size = moments;
  wrong_size[3].resize(1);
  EXPECT_THROW(adam.restore_state({}, 2, views, moments, wrong_size), std::invalid_argument);
  EXPECT_THROW(adam.restore_state({}, -1, views, {}, {}), std::invalid_argument);
  EXPECT_THROW(adam.restore_state({}, 0, views, moments, moments), std::invalid_argument);
  sparsemoe::AdamOptions bad;
  bad.beta1 = 1.0;
  EXPECT_THROW(adam.restore_state(bad, 2, views, moments, moments), std::invalid_argument);
  EXPECT_SAME_BYTES(snapshot(adam), before);

  sparsemoe::Sgd<float> sgd(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0});
  train(layer, sgd, 1);
  const std::string sgd_before = snapshot(sgd);
  EXPECT_THROW(sgd.restore_state(sparsemoe::SgdOptions{0.1, 0.0, false, 0.0}, 1, views, moments),
               std::invalid_argument);  // μ = 0 takes no velocities
  EXPECT_THROW(sgd.restore_state(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0}, 1, views, short_moments),
               std::invalid_argument);
  EXPECT_THROW(sgd.restore_state(sparsemoe::SgdOptions{0.1, 0.0, true, 0.0}, 1, views, {}), std::invalid_argument);
  EXPECT_SAME_BYTES(snapshot(sgd), sgd_before);
  // A restored layout is enforced by the next step, as a recorded one is.
  sgd.restore_state(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0}, 1, views, moments);
  sparsemoe::MoEConfig smaller = make_config(73);
  smaller.num_experts = 3;
  FloatLayer small_layer(smaller);
  auto gradients = small_layer.make_gradients();
  EXPECT_THROW(sgd.step(small_layer.tensors(), gradients.tensors()), std::invalid_argument);
}

TEST(CheckpointErrors, KindNamesAreDistinct) {
  std::set<std::string> names;
  for (int kind = 0; kind <= static_cast<int>(CheckpointErrorKind::non_finite_value); ++kind) {
    names.insert(sparsemoe::to_string(static_cast<CheckpointErrorKind>(kind)));
  }
  EXPECT_EQ(names.size(), 13u);
  EXPECT_EQ(names.count("unknown"), 0u);
  const CheckpointError error(CheckpointErrorKind::truncated, "message");
  EXPECT_EQ(error.kind(), CheckpointErrorKind::truncated);
  EXPECT_STREQ(error.what(), "message");
  EXPECT_TRUE((std::is_base_of<std::runtime_error, CheckpointError>::value));
}

}  // namespace
