// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Checkpoints (issue 4, item 5; format version 2: issue 11 and issue 10 item 5):
// sparsemoe/checkpoint.hpp.
//   * Round trip: bitwise for every parameter (NaN payloads, −0.0, ±Inf, denormals included), the
//     noise ε and seed, and Adam / Sgd state after real steps, for several expert types and both
//     scalars; after loading, forward, backward and further optimizer steps are bitwise those of
//     the original objects.
//   * Every router (softmax, sigmoid with its selection-bias state, Switch and GShard with their
//     seeds): bitwise round trip of weights, bias, state and options; the training step comes
//     back, so 3 unpinned training steps, save, load into a fresh layer, 2 more steps equal 5
//     steps straight (and would not without the step); a file for another router kind, k or any
//     router option is rejected naming the field, with the layer unchanged.
//   * Version 1: committed files written by the last v1 writer (tests/data/) and files made here
//     by a small v1 writer still load, and leave the layer's training step unchanged.
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

/// One router option record (version 2): str name, u32 type, u64 bits.
struct OptionRecord {
  std::string name;
  std::size_t name_offset = 0, type_offset = 0, value_offset = 0;
  std::uint32_t type = 0;
  std::uint64_t bits = 0;
};

/// Where every field of a checkpoint is, found by walking docs/checkpoint-format.md by hand
/// (version 2, or version 1 for the files of that version).
struct Layout {
  std::uint32_t version = 0;
  std::size_t scalar_size = 0;
  std::string expert_kind;
  std::size_t kind_offset = 0, d_offset = 0, count_offset = 0;
  std::size_t epsilon_offset = 0, seed_offset = 0;  // noisy gate: where ε's and the seed's bits are
  std::size_t step_offset = 0, router_kind_offset = 0, option_count_offset = 0;  // version 2
  std::uint64_t training_step = 0;
  std::string router_kind;
  std::vector<OptionRecord> options;
  std::vector<Record> tensors;
  std::size_t state_count_offset = 0;  // version 2
  std::vector<Record> router_state;
  std::size_t optimizer_offset = 0;
  std::string optimizer;
  std::size_t optimizer_fields_offset = 0;
  std::vector<Record> state;  // optimizer state
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
  layout.version = get_u32(bytes, 8);
  std::size_t offset = 20;
  const std::uint32_t code = get_u32(bytes, offset);
  layout.scalar_size = get_u32(bytes, offset + 4);
  EXPECT_TRUE((code == 1 && layout.scalar_size == 4) || (code == 2 && layout.scalar_size == 8));
  offset += 8;
  layout.kind_offset = offset;
  layout.expert_kind = get_str(bytes, offset);
  layout.d_offset = offset;
  offset += 32;  // d, h, E, k
  if (layout.version == 1) {
    layout.router_kind = "noisy_top_k";
    layout.epsilon_offset = offset;
    layout.seed_offset = offset + 8;
    offset += 16;
  } else {
    layout.step_offset = offset;
    layout.training_step = get_u64(bytes, offset);
    offset += 8;
    layout.router_kind_offset = offset;
    layout.router_kind = get_str(bytes, offset);
    layout.option_count_offset = offset;
    const std::uint64_t options = get_u64(bytes, offset);
    offset += 8;
    for (std::uint64_t i = 0; i < options; ++i) {
      OptionRecord option;
      option.name_offset = offset;
      option.name = get_str(bytes, offset);
      option.type_offset = offset;
      option.type = get_u32(bytes, offset);
      option.value_offset = offset + 4;
      option.bits = get_u64(bytes, offset + 4);
      offset += 12;
      if (option.name == "noise_epsilon") layout.epsilon_offset = option.value_offset;
      if (option.name == "noise_seed") layout.seed_offset = option.value_offset;
      layout.options.push_back(option);
    }
  }
  layout.count_offset = offset;
  const std::uint64_t count = get_u64(bytes, layout.count_offset);
  offset += 8;
  for (std::uint64_t i = 0; i < count; ++i) layout.tensors.push_back(get_record(bytes, offset, layout.scalar_size));
  if (layout.version >= 2) {
    layout.state_count_offset = offset;
    const std::uint64_t state_count = get_u64(bytes, offset);
    offset += 8;
    for (std::uint64_t i = 0; i < state_count; ++i) {
      layout.router_state.push_back(get_record(bytes, offset, layout.scalar_size));
    }
  }
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

/// A tiny writer of the version 1 layout: the same checkpoint as the version 2 `bytes` of a
/// noisy-gate layer (ε and seed in the header, no training step, no router kind, options or
/// state section), as the last v1 writer would have written it.
std::string to_version_1(const std::string& bytes) {
  const Layout layout = walk(bytes);
  EXPECT_EQ(layout.version, 2u);
  EXPECT_EQ(layout.router_kind, "noisy_top_k");
  EXPECT_TRUE(layout.router_state.empty());
  std::string v1 = bytes.substr(0, layout.d_offset + 32);  // magic ... k
  put_u32(v1, 8, 1);
  v1 += bytes.substr(layout.epsilon_offset, 8);
  v1 += bytes.substr(layout.seed_offset, 8);
  v1 += bytes.substr(layout.count_offset, layout.state_count_offset - layout.count_offset);  // the tensors
  v1 += bytes.substr(layout.optimizer_offset, bytes.size() - 8 - layout.optimizer_offset);
  v1 += std::string(8, '\0');
  put_u64(v1, 12, v1.size());
  put_u64(v1, v1.size() - 8, XXH3_64bits(v1.data(), v1.size() - 8));
  return v1;
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

/// Every byte of the layer's state: tensor names, shapes and raw bytes, the router's state
/// tensors and options (RouterKind: the noisy gate's ε and seed among them), its check_finite
/// flag, and the training step. Two layers are bitwise equal iff their snapshots are.
template <typename Layer, typename RouterT = typename Layer::RouterType>
std::string snapshot(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::string out;
  const auto append = [&](const std::vector<sparsemoe::TensorView<Scalar>>& views) {
    for (const auto& view : views) {
      out += view.name + ":" + std::to_string(view.rows) + "x" + std::to_string(view.cols) + ":";
      out.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
    }
  };
  append(layer.tensors());
  bool check_finite = false;
  if constexpr (std::is_same<RouterT, sparsemoe::NoisyTopKGate<Scalar>>::value) {
    check_finite = layer.gate().check_finite();
  } else {
    out += "state:";
    append(layer.router().state());
    check_finite = layer.router().options().check_finite;
  }
  for (const sparsemoe::RouterOption& option : sparsemoe::RouterKind<RouterT>::options(layer.router())) {
    out += option.name + "=" + std::to_string(option.bits) + ";";
  }
  out += ":" + std::to_string(check_finite) + ":step " + std::to_string(layer.training_step());
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
  EXPECT_EQ(info.router_kind, "noisy_top_k");
  ASSERT_EQ(info.router_options.size(), 2u);
  ASSERT_NE(info.router_option("noise_seed"), nullptr);
  EXPECT_EQ(info.router_option("noise_seed")->bits, 3u);
  EXPECT_EQ(info.router_option("nothing"), nullptr);
  EXPECT_TRUE(info.has_training_step);
  EXPECT_EQ(info.training_step, 0u);
  EXPECT_TRUE(info.router_state_tensors.empty());
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
  for (const std::uint32_t version : {0u, 3u, 0x01000002u}) {
    forged = bytes;
    put_u32(forged, 8, version);
    message = expect_error(CheckpointErrorKind::unsupported_version, [&] {
      sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target);
    });
    EXPECT_NE(message.find("expected format version 1 to 2, got version " + std::to_string(version)),
              std::string::npos) << message;
  }
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

// ---- Resuming a training run: the training step comes back ----------------------------------

/// `steps` training steps with UNPINNED noise (the layer's own training step advances), batch
/// `first` onwards: forward (with the balance and z-loss for top-k routers), backward, optimizer
/// step, and for the sigmoid router DeepSeek-V3's selection-bias update (state without gradient).
template <typename Layer, typename Optimizer>
void train_unpinned(Layer& layer, Optimizer& optimizer, int steps, int first = 0) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  auto gradients = layer.make_gradients();
  for (int s = first; s < first + steps; ++s) {
    const auto x = random_matrix<Scalar>(12, layer.input_dim(), 3000u + static_cast<std::uint32_t>(s));
    const auto dy = random_matrix<Scalar>(12, layer.input_dim(), 4000u + static_cast<std::uint32_t>(s));
    sparsemoe::ForwardOptions options;
    options.mode = Mode::training;
    options.z_loss_weight = 1e-3;
    gradients.set_zero();
    const auto result = layer.forward(x, options);
    layer.backward(result, dy, gradients);
    optimizer.step(layer.tensors(), gradients.tensors());
    if constexpr (std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<Scalar>>::value) {
      sparsemoe::IndexVector counts;
      sparsemoe::count_tokens_per_expert(result.routing, counts);
      sparsemoe::update_selection_bias(layer.router().selection_bias(), counts, 1e-3, true);
    }
  }
}

/// The parameter bytes of a layer only (no step, no options): what a resumed run must reproduce.
template <typename Layer>
std::string parameter_bytes(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::string out;
  for (const auto& view : layer.tensors()) {
    out.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
  }
  return out;
}

TYPED_TEST(Checkpoint, ResumedTrainingEqualsAnUninterruptedRunBitwise) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer straight = make_layer<Layer>(80);
  sparsemoe::Adam<Scalar> straight_adam;
  train_unpinned(straight, straight_adam, 5);
  ASSERT_EQ(straight.training_step(), 5u);

  Layer first_half = make_layer<Layer>(80);
  sparsemoe::Adam<Scalar> first_adam;
  train_unpinned(first_half, first_adam, 3);
  const std::string bytes = sparsemoe::serialize_checkpoint(first_half, first_adam);
  EXPECT_EQ(walk(bytes).training_step, 3u);
  Layer resumed = make_layer<Layer>(81, 0.4);  // fresh: other weights, ε, seed; step 0
  sparsemoe::Adam<Scalar> resumed_adam;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), resumed, resumed_adam);
  EXPECT_EQ(resumed.training_step(), 3u);
  train_unpinned(resumed, resumed_adam, 2, 3);
  EXPECT_SAME_BYTES(snapshot(resumed), snapshot(straight));
  EXPECT_SAME_BYTES(snapshot(resumed_adam), snapshot(straight_adam));

  // Without the step the noise of steps 3 and 4 would be that of steps 0 and 1: the test has teeth.
  Layer forgetful = make_layer<Layer>(81, 0.4);
  sparsemoe::Adam<Scalar> forgetful_adam;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), forgetful, forgetful_adam);
  forgetful.set_training_step(0);
  train_unpinned(forgetful, forgetful_adam, 2, 3);
  EXPECT_OTHER_BYTES(parameter_bytes(forgetful), parameter_bytes(straight));
}

// ---- Version 1 files ---------------------------------------------------------------------------

TYPED_TEST(Checkpoint, Version1FilesLoadAndLeaveTheTrainingStepUnchanged) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_layer<Layer>(82);
  sparsemoe::Adam<Scalar> adam;
  train(original, adam, 2);
  original.set_training_step(41);
  const std::string v2 = sparsemoe::serialize_checkpoint(original, adam);
  const std::string v1 = to_version_1(v2);
  const Layout layout = walk(v1);
  EXPECT_EQ(layout.end, v1.size() - 8);
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(v1.data(), v1.size());
  EXPECT_EQ(info.format_version, 1u);
  EXPECT_FALSE(info.has_training_step);
  EXPECT_EQ(info.router_kind, "noisy_top_k");
  EXPECT_EQ(info.router_options, sparsemoe::RouterKind<sparsemoe::NoisyTopKGate<Scalar>>::options(original.gate()));
  EXPECT_EQ(info.noise_seed, 82u);

  Layer target = make_layer<Layer>(83, 0.2);
  target.set_training_step(41);  // a v1 file does not touch it
  sparsemoe::Adam<Scalar> restored;
  sparsemoe::deserialize_checkpoint(v1.data(), v1.size(), target, restored);
  EXPECT_SAME_BYTES(snapshot(target), snapshot(original));
  EXPECT_SAME_BYTES(snapshot(restored), snapshot(adam));
  target.set_training_step(7);
  sparsemoe::deserialize_checkpoint(v1.data(), v1.size(), target);
  EXPECT_EQ(target.training_step(), 7u);
  // Saving again writes version 2, from which the v1 writer gives back the very same bytes.
  EXPECT_EQ(walk(sparsemoe::serialize_checkpoint(target)).version, 2u);
  EXPECT_SAME_BYTES(to_version_1(sparsemoe::serialize_checkpoint(target, restored)), v1);
  // Corruption of a v1 file is caught as before.
  std::string flipped = v1;
  flipped[v1.size() / 2] = static_cast<char>(flipped[v1.size() / 2] ^ 0x08);
  const std::string before = snapshot(target);
  expect_error(CheckpointErrorKind::checksum_mismatch,
               [&] { sparsemoe::deserialize_checkpoint(flipped.data(), flipped.size(), target); });
  expect_error(CheckpointErrorKind::truncated,
               [&] { sparsemoe::deserialize_checkpoint(v1.data(), v1.size() - 3, target); });
  EXPECT_SAME_BYTES(snapshot(target), before);
}

#ifdef SPARSEMOE_TEST_DATA_DIR
/// The content of a file of tests/data.
std::string test_data(const std::string& name) {
  std::ifstream in(std::string(SPARSEMOE_TEST_DATA_DIR) + "/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Loads a committed version 1 file (written by the last v1 writer) into a layer built from its
/// info.config() and an optimizer, then compares every tensor, ε, the seed and the optimizer
/// state with the file's own bytes.
template <typename Layer, typename Optimizer>
void check_committed_version_1(const std::string& name) {
  SCOPED_TRACE(name);
  using Scalar = typename Layer::Scalar;
  const std::string bytes = test_data(name);
  ASSERT_GT(bytes.size(), 104u);
  const Layout layout = walk(bytes);
  ASSERT_EQ(layout.version, 1u);
  ASSERT_EQ(layout.end, bytes.size() - 8);
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  EXPECT_EQ(info.format_version, 1u);
  EXPECT_FALSE(info.has_training_step);
  EXPECT_EQ(info.router_kind, "noisy_top_k");
  Layer layer(info.config());
  layer.set_training_step(17);
  Optimizer optimizer;
  sparsemoe::load_checkpoint(std::string(SPARSEMOE_TEST_DATA_DIR) + "/" + name, layer, optimizer);
  EXPECT_EQ(layer.training_step(), 17u);
  const auto views = layer.tensors();
  ASSERT_EQ(views.size(), layout.tensors.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    EXPECT_EQ(views[i].name, layout.tensors[i].name);
    ASSERT_EQ(static_cast<std::size_t>(views[i].size()) * sizeof(Scalar), layout.tensors[i].payload_size);
    EXPECT_EQ(std::memcmp(views[i].data, bytes.data() + layout.tensors[i].payload_offset, layout.tensors[i].payload_size),
              0) << views[i].name;
  }
  const auto epsilon = static_cast<double>(layer.gate().noise_epsilon());
  EXPECT_EQ(std::memcmp(&epsilon, bytes.data() + layout.epsilon_offset, 8), 0);
  EXPECT_EQ(layer.gate().noise_seed(), get_u64(bytes, layout.seed_offset));
  EXPECT_EQ(optimizer.step_count(), static_cast<std::int64_t>(get_u64(bytes, layout.optimizer_fields_offset)));
  // The optimizer state and every other field: the v1 writer of this test, applied to what the
  // current writer saves, gives back the committed bytes exactly.
  EXPECT_SAME_BYTES(to_version_1(sparsemoe::serialize_checkpoint(layer, optimizer)), bytes);
}

TEST(CheckpointVersion1, CommittedFilesOfTheLastVersion1WriterStillLoad) {
  check_committed_version_1<sparsemoe::MoELayer<float>, sparsemoe::Adam<float>>("checkpoint_v1_float_relu_adam.spmoe");
  check_committed_version_1<sparsemoe::MoELayer<double, sparsemoe::SwiGluExpert<double>>, sparsemoe::Sgd<double>>(
      "checkpoint_v1_double_swiglu_sgd.spmoe");
  // And a v1 file is refused by a layer of another router, naming both kinds.
  const std::string bytes = test_data("checkpoint_v1_float_relu_adam.spmoe");
  sparsemoe::SoftmaxTopKRouter<float> router(5, 4);
  sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::SoftmaxTopKRouter<float>> layer(
      make_config(1), router);
  const std::string before = snapshot(layer);
  const std::string message = expect_error(CheckpointErrorKind::wrong_router_kind, [&] {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer);
  });
  EXPECT_NE(message.find("expected router kind \"softmax_top_k\" (the layer's), got \"noisy_top_k\""),
            std::string::npos) << message;
  EXPECT_SAME_BYTES(snapshot(layer), before);
}
#endif

// ---- Every router: softmax, sigmoid (with state), Switch, GShard ------------------------------

template <typename Scalar_, typename ExpertT_, typename RouterT_>
struct RouterCase {
  using Scalar = Scalar_;
  using ExpertT = ExpertT_;
  using RouterT = RouterT_;
  using Layer = sparsemoe::MoELayer<Scalar, ExpertT, RouterT>;
};

/// Per router: options other than the defaults (k fits d = 5, E = 4), and each option changed
/// alone (the name of the option that then differs first, and the options).
template <typename RouterT>
struct RouterSetup;

template <typename Scalar>
struct RouterSetup<sparsemoe::SoftmaxTopKRouter<Scalar>> {
  using Options = sparsemoe::SoftmaxTopKRouterOptions;
  static Options options() {
    Options o;
    o.k = 2;
    o.normalize_top_k = true;
    o.scale = 2.5;
    o.use_bias = true;
    o.num_groups = 2;
    o.top_groups = 1;
    return o;
  }
  static std::vector<std::pair<std::string, Options>> changes() {
    std::vector<std::pair<std::string, Options>> list;
    Options o = options();
    o.normalize_top_k = false;
    list.emplace_back("normalize_top_k", o);
    o = options();
    o.scale = 2.0;
    list.emplace_back("scale", o);
    o = options();
    o.softmax_over_selected = true;
    list.emplace_back("softmax_over_selected", o);
    o = options();
    o.use_bias = false;
    list.emplace_back("use_bias", o);
    o = options();
    o.num_groups = 4;
    o.top_groups = 2;
    list.emplace_back("num_groups", o);
    o = options();
    o.top_groups = 2;
    list.emplace_back("top_groups", o);
    return list;
  }
};

template <typename Scalar>
struct RouterSetup<sparsemoe::SigmoidTopKRouter<Scalar>> {
  using Options = sparsemoe::SigmoidTopKRouterOptions;
  static Options options() {
    Options o;
    o.k = 2;
    o.scale = 2.5;
    o.num_groups = 2;
    o.top_groups = 1;
    o.group_mask = sparsemoe::GroupMask::zero;
    return o;
  }
  static std::vector<std::pair<std::string, Options>> changes() {
    std::vector<std::pair<std::string, Options>> list;
    Options o = options();
    o.normalize_top_k = false;
    list.emplace_back("normalize_top_k", o);
    o = options();
    o.normalize_epsilon = 0.0;
    list.emplace_back("normalize_epsilon", o);
    o = options();
    o.normalize_floor = 6.1e-5;
    list.emplace_back("normalize_floor", o);
    o = options();
    o.scale = 1.0;
    list.emplace_back("scale", o);
    o = options();
    o.use_bias = true;
    list.emplace_back("use_bias", o);
    o = options();
    o.num_groups = 1;
    list.emplace_back("num_groups", o);
    o = options();
    o.top_groups = 2;
    list.emplace_back("top_groups", o);
    o = options();
    o.group_mask = sparsemoe::GroupMask::exclude;
    list.emplace_back("group_mask", o);
    return list;
  }
};

template <typename Scalar>
struct RouterSetup<sparsemoe::SwitchRouter<Scalar>> {
  using Options = sparsemoe::SwitchRouterOptions;
  static Options options() {
    Options o;
    o.jitter_epsilon = 0.05;
    o.seed = 77;
    o.use_bias = true;
    return o;
  }
  static std::vector<std::pair<std::string, Options>> changes() {
    std::vector<std::pair<std::string, Options>> list;
    Options o = options();
    o.jitter_epsilon = 0.01;
    list.emplace_back("jitter_epsilon", o);
    o = options();
    o.seed = 78;
    list.emplace_back("seed", o);
    o = options();
    o.use_bias = false;
    list.emplace_back("use_bias", o);
    return list;
  }
};

template <typename Scalar>
struct RouterSetup<sparsemoe::GShardRouter<Scalar>> {
  using Options = sparsemoe::GShardRouterOptions;
  static Options options() {
    Options o;
    o.random_second_expert = true;
    o.seed = 99;
    return o;
  }
  static std::vector<std::pair<std::string, Options>> changes() {
    std::vector<std::pair<std::string, Options>> list;
    Options o = options();
    o.random_second_expert = false;
    list.emplace_back("random_second_expert", o);
    o = options();
    o.seed = 100;
    list.emplace_back("seed", o);
    o = options();
    o.use_bias = true;
    list.emplace_back("use_bias", o);
    return list;
  }
};

/// A layer with router options `options`, router weights (bias, selection bias) from `seed`.
template <typename Layer, typename Options>
Layer make_router_layer(std::uint64_t seed, const Options& options) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  RouterT router(5, 4, options);
  router.initialize_uniform(seed + 100);
  for (Index e = 0; e < router.bias().size(); ++e) router.bias()[e] = static_cast<Scalar>(0.01 * double(e + 1) * double(seed % 5 + 1));
  if constexpr (std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<Scalar>>::value) {
    for (Index e = 0; e < 4; ++e) router.selection_bias()[e] = static_cast<Scalar>(0.003 * double(e) - 0.004 * double(seed % 3));
  }
  sparsemoe::MoEConfig config = make_config(seed);
  config.k = router.k();
  return Layer(config, router);
}

template <typename Layer>
Layer make_router_layer(std::uint64_t seed) {
  return make_router_layer<Layer>(seed, RouterSetup<typename Layer::RouterType>::options());
}

template <typename T>
class RouterCheckpoint : public ::testing::Test {};
using RouterCases =
    ::testing::Types<RouterCase<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::SoftmaxTopKRouter<float>>,
                     RouterCase<double, sparsemoe::Expert<double, sparsemoe::Silu>, sparsemoe::SigmoidTopKRouter<double>>,
                     RouterCase<float, sparsemoe::SwiGluExpert<float>, sparsemoe::SigmoidTopKRouter<float>>,
                     RouterCase<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::SwitchRouter<float>>,
                     RouterCase<double, sparsemoe::Expert<double, sparsemoe::GeluTanh>, sparsemoe::GShardRouter<double>>>;
struct RouterCaseNames {
  template <typename T>
  static std::string GetName(int) {
    std::string kind = sparsemoe::ExpertKind<typename T::ExpertT>::name();
    std::replace(kind.begin(), kind.end(), ':', '_');
    return (std::is_same<typename T::Scalar, float>::value ? "float_" : "double_") + kind + "_" +
           sparsemoe::RouterKind<typename T::RouterT>::name();
  }
};
TYPED_TEST_SUITE(RouterCheckpoint, RouterCases, RouterCaseNames);

template <typename RouterT>
constexpr bool has_state = std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<typename RouterT::Scalar>>::value;

TYPED_TEST(RouterCheckpoint, RoundTripIsBitwiseForWeightsStateOptionsAndStep) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  using RouterT = typename TypeParam::RouterT;
  Layer original = make_router_layer<Layer>(1);
  original.set_training_step(123456789);
  // Special values in the router weight (and the state): they must come back bit for bit.
  const std::vector<Scalar> specials = special_values<Scalar>();
  auto views = original.tensors();
  for (std::size_t i = 0; i < specials.size() && static_cast<Index>(i) < views[0].size(); ++i) {
    views[0].data[i] = specials[i];
  }
  if constexpr (has_state<RouterT>) original.router().selection_bias()[1] = Scalar(-0.0);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  const Layout layout = walk(bytes);
  EXPECT_EQ(layout.version, 2u);
  EXPECT_EQ(layout.end, bytes.size() - 8) << "the documented layout does not cover the file";
  EXPECT_EQ(layout.router_kind, sparsemoe::RouterKind<RouterT>::name());
  EXPECT_EQ(layout.training_step, 123456789u);
  EXPECT_EQ(layout.tensors[0].name, "router.weight");
  EXPECT_EQ(layout.router_state.size(), has_state<RouterT> ? 1u : 0u);
  const auto expected_options = sparsemoe::RouterKind<RouterT>::options(original.router());
  ASSERT_EQ(layout.options.size(), expected_options.size());
  for (std::size_t i = 0; i < expected_options.size(); ++i) {
    EXPECT_EQ(layout.options[i].name, expected_options[i].name);
    EXPECT_EQ(layout.options[i].type, static_cast<std::uint32_t>(expected_options[i].type));
    EXPECT_EQ(layout.options[i].bits, expected_options[i].bits);
  }

  Layer loaded = make_router_layer<Layer>(2);  // other weights, bias, selection bias; step 0
  ASSERT_NE(difference(snapshot(loaded), snapshot(original)), "");
  const std::string before = snapshot(loaded);
  expect_error(CheckpointErrorKind::non_finite_value,
               [&] { sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded); });
  EXPECT_SAME_BYTES(snapshot(loaded), before);
  sparsemoe::CheckpointLoadOptions load_options;
  load_options.allow_non_finite = true;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, load_options);
  EXPECT_SAME_BYTES(snapshot(loaded), snapshot(original));
  EXPECT_EQ(loaded.training_step(), 123456789u);
  EXPECT_SAME_BYTES(sparsemoe::serialize_checkpoint(loaded), bytes);
  if constexpr (has_state<RouterT>) {
    EXPECT_TRUE(std::signbit(loaded.router().selection_bias()[1]));
    EXPECT_EQ(layout.router_state[0].name, "router.state.selection_bias");
  }
}

TYPED_TEST(RouterCheckpoint, InspectDescribesTheRouterAndConfigRebuildsTheLayer) {
  using Layer = typename TypeParam::Layer;
  using RouterT = typename TypeParam::RouterT;
  Layer layer = make_router_layer<Layer>(3);
  layer.set_training_step(9);
  const std::string bytes = sparsemoe::serialize_checkpoint(layer);
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  EXPECT_EQ(info.format_version, 2u);
  EXPECT_EQ(info.router_kind, sparsemoe::RouterKind<RouterT>::name());
  EXPECT_EQ(info.router_options, sparsemoe::RouterKind<RouterT>::options(layer.router()));
  EXPECT_TRUE(info.has_training_step);
  EXPECT_EQ(info.training_step, 9u);
  EXPECT_EQ(info.noise_epsilon, 0.0);
  EXPECT_EQ(info.k, layer.k());
  ASSERT_EQ(info.router_state_tensors.size(), has_state<RouterT> ? 1u : 0u);
  if constexpr (has_state<RouterT>) {
    EXPECT_EQ(info.router_state_tensors[0].name, "router.state.selection_bias");
    EXPECT_EQ(info.router_state_tensors[0].rows, 4);
    EXPECT_EQ(info.router_state_tensors[0].cols, 1);
  }
  // config() plus a router with the file's options builds a layer that accepts the file.
  RouterT router(info.input_dim, info.num_experts, RouterSetup<RouterT>::options());
  Layer rebuilt(info.config(), router);
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), rebuilt);
  EXPECT_SAME_BYTES(snapshot(rebuilt), snapshot(layer));
}

TYPED_TEST(RouterCheckpoint, ResumedTrainingEqualsAnUninterruptedRunBitwise) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  using RouterT = typename TypeParam::RouterT;
  Layer straight = make_router_layer<Layer>(4);
  sparsemoe::Adam<Scalar> straight_adam;
  train_unpinned(straight, straight_adam, 5);

  Layer first_half = make_router_layer<Layer>(4);
  sparsemoe::Adam<Scalar> first_adam;
  train_unpinned(first_half, first_adam, 3);
  const fs::path directory = fs::temp_directory_path() / ("sparsemoe_ckpt_resume_" + std::to_string(::getpid()));
  fs::create_directories(directory);
  const std::string path = (directory / "run.ckpt").string();
  sparsemoe::save_checkpoint(path, first_half, first_adam);
  Layer resumed = make_router_layer<Layer>(5);  // fresh: other weights and state, step 0
  sparsemoe::Adam<Scalar> resumed_adam;
  sparsemoe::load_checkpoint(path, resumed, resumed_adam);
  EXPECT_EQ(resumed.training_step(), 3u);
  train_unpinned(resumed, resumed_adam, 2, 3);
  EXPECT_SAME_BYTES(snapshot(resumed), snapshot(straight));
  EXPECT_SAME_BYTES(snapshot(resumed_adam), snapshot(straight_adam));
  if constexpr (has_state<RouterT>) {  // the selection bias moved, and came back
    EXPECT_FALSE(straight.router().selection_bias().isApprox(make_router_layer<Layer>(4).router().selection_bias()));
  }
  // Routers that draw random numbers (Switch's jitter, GShard's second expert) would go astray
  // without the step.
  if constexpr (std::is_same<RouterT, sparsemoe::SwitchRouter<Scalar>>::value ||
                std::is_same<RouterT, sparsemoe::GShardRouter<Scalar>>::value) {
    Layer forgetful = make_router_layer<Layer>(5);
    sparsemoe::Adam<Scalar> forgetful_adam;
    sparsemoe::load_checkpoint(path, forgetful, forgetful_adam);
    forgetful.set_training_step(0);
    train_unpinned(forgetful, forgetful_adam, 2, 3);
    EXPECT_OTHER_BYTES(parameter_bytes(forgetful), parameter_bytes(straight));
  }
  fs::remove_all(directory);
}

TYPED_TEST(RouterCheckpoint, EveryRouterOptionMismatchIsRejectedNamingItAndChangesNothing) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  using RouterT = typename TypeParam::RouterT;
  Layer target = make_router_layer<Layer>(6);
  target.set_training_step(31);
  sparsemoe::Adam<Scalar> target_adam;
  train_unpinned(target, target_adam, 1);
  const std::string before = snapshot(target);
  const std::string adam_before = snapshot(target_adam);
  const std::string kind = sparsemoe::RouterKind<RouterT>::name();
  const auto target_options = sparsemoe::RouterKind<RouterT>::options(target.router());
  const auto value_of = [](const std::vector<sparsemoe::RouterOption>& options, const std::string& name) {
    for (const auto& option : options) {
      if (option.name == name) return option.value_text();
    }
    ADD_FAILURE() << "no option " << name;
    return std::string();
  };
  const auto changes = RouterSetup<RouterT>::changes();
  EXPECT_EQ(changes.size(), target_options.size()) << "every option is changed once";
  for (const auto& change : changes) {
    SCOPED_TRACE(change.first);
    Layer other = make_router_layer<Layer>(7, change.second);
    sparsemoe::Adam<Scalar> other_adam;
    train_unpinned(other, other_adam, 1);
    const std::string bytes = sparsemoe::serialize_checkpoint(other, other_adam);
    const std::string message = expect_error(CheckpointErrorKind::router_option_mismatch, [&] {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target, target_adam);
    });
    const auto other_options = sparsemoe::RouterKind<RouterT>::options(other.router());
    EXPECT_NE(message.find("router option '" + change.first + "': expected " + value_of(target_options, change.first) +
                           " (the layer's " + kind + " router), got " + value_of(other_options, change.first)),
              std::string::npos) << message;
    expect_error(CheckpointErrorKind::router_option_mismatch,
                 [&] { sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target); });
  }
  // k (softmax and sigmoid choose it; Switch and GShard have 1 and 2): a shape mismatch.
  if constexpr (!std::is_same<RouterT, sparsemoe::SwitchRouter<Scalar>>::value &&
                !std::is_same<RouterT, sparsemoe::GShardRouter<Scalar>>::value) {
    auto options = RouterSetup<RouterT>::options();
    options.k = 1;
    const Layer other = make_router_layer<Layer>(8, options);
    const std::string bytes = sparsemoe::serialize_checkpoint(other);
    const std::string message = expect_error(CheckpointErrorKind::shape_mismatch, [&] {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target);
    });
    EXPECT_NE(message.find("expected k = 2 (the layer's), got 1"), std::string::npos) << message;
  }
  // Another router kind: a noisy-gate layer's file here, and this file in a noisy-gate layer.
  using NoisyLayer = sparsemoe::MoELayer<Scalar, typename TypeParam::ExpertT>;
  sparsemoe::MoEConfig config = make_config(9);
  config.k = target.k();
  NoisyLayer noisy(config);
  const std::string noisy_bytes = sparsemoe::serialize_checkpoint(noisy);
  std::string message = expect_error(CheckpointErrorKind::wrong_router_kind, [&] {
    sparsemoe::deserialize_checkpoint(noisy_bytes.data(), noisy_bytes.size(), target, target_adam);
  });
  EXPECT_NE(message.find("expected router kind \"" + kind + "\" (the layer's), got \"noisy_top_k\""), std::string::npos)
      << message;
  const std::string own_bytes = sparsemoe::serialize_checkpoint(target);
  const std::string noisy_before = snapshot(noisy);
  message = expect_error(CheckpointErrorKind::wrong_router_kind, [&] {
    sparsemoe::deserialize_checkpoint(own_bytes.data(), own_bytes.size(), noisy);
  });
  EXPECT_NE(message.find("expected router kind \"noisy_top_k\" (the layer's), got \"" + kind + "\""), std::string::npos)
      << message;
  EXPECT_SAME_BYTES(snapshot(noisy), noisy_before);
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(target_adam), adam_before);
}

TYPED_TEST(RouterCheckpoint, ForgedRouterRecordsAreRejectedAndChangeNothing) {
  using Layer = typename TypeParam::Layer;
  using RouterT = typename TypeParam::RouterT;
  const Layer original = make_router_layer<Layer>(10);
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  const Layout layout = walk(bytes);
  Layer target = make_router_layer<Layer>(11);
  const std::string before = snapshot(target);
  const auto expect_forged = [&](CheckpointErrorKind kind, std::string forged, const std::string& needle) {
    reseal(forged);
    const std::string message =
        expect_error(kind, [&] { sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), target); });
    EXPECT_NE(message.find(needle), std::string::npos) << message;
  };
  const OptionRecord& option = layout.options.back();
  std::string forged = bytes;
  put_u32(forged, option.type_offset, 9);
  expect_forged(CheckpointErrorKind::malformed, forged, "has type code 9");
  forged = bytes;
  put_u32(forged, option.type_offset, option.type == 1 ? 2 : 1);  // another type: the list differs
  expect_forged(CheckpointErrorKind::router_option_mismatch, forged, "router options");
  forged = bytes;
  put_u64(forged, option.value_offset, option.bits ^ 1);  // another value
  expect_forged(CheckpointErrorKind::router_option_mismatch, forged, "router option '" + option.name + "': expected");
  forged = bytes;
  forged[option.name_offset + 4] = static_cast<char>(forged[option.name_offset + 4] ^ 0x20);  // renamed
  expect_forged(CheckpointErrorKind::router_option_mismatch, forged, "router options");
  if (layout.options.size() >= 2) {  // two options of one name
    forged = bytes;
    const OptionRecord& first = layout.options[0];
    forged.replace(option.name_offset, option.type_offset - option.name_offset,
                   bytes.substr(first.name_offset, first.type_offset - first.name_offset));
    expect_forged(CheckpointErrorKind::malformed, forged, "appears twice");
  }
  forged = bytes;
  put_u64(forged, layout.option_count_offset, std::uint64_t(1) << 40);
  expect_forged(CheckpointErrorKind::malformed, forged, "router option count");
  forged = bytes;
  put_u32(forged, layout.router_kind_offset, 5000);
  expect_forged(CheckpointErrorKind::malformed, forged, "at most 256 expected");
  forged = bytes;
  put_u64(forged, layout.state_count_offset, std::uint64_t(1) << 50);
  expect_forged(CheckpointErrorKind::malformed, forged, "router state tensor count");
  if constexpr (has_state<RouterT>) {
    const Record& state = layout.router_state[0];
    forged = bytes;
    forged[state.name_offset + 4 + 7] = 'X';  // "router.state..." -> "router.Xtate..."
    expect_forged(CheckpointErrorKind::tensor_mismatch, forged, "to be 'router.state.selection_bias' (the layer's)");
    forged = bytes;
    put_u64(forged, state.rows_offset, 1);
    put_u64(forged, state.rows_offset + 8, 4);
    expect_forged(CheckpointErrorKind::shape_mismatch, forged, "tensor 'router.state.selection_bias': expected 4x1");
    forged = bytes;  // the state record removed: count 0
    forged.erase(state.name_offset, state.payload_offset + state.payload_size - state.name_offset);
    put_u64(forged, layout.state_count_offset, 0);
    expect_forged(CheckpointErrorKind::tensor_mismatch, forged, "expected 1 router state tensors (the layer's), got 0");
    // A non-finite selection bias is refused, naming it.
    Layer bad = make_router_layer<Layer>(12);
    bad.router().selection_bias()[2] = std::numeric_limits<typename TypeParam::Scalar>::quiet_NaN();
    const std::string bad_bytes = sparsemoe::serialize_checkpoint(bad);
    const std::string message = expect_error(CheckpointErrorKind::non_finite_value, [&] {
      sparsemoe::deserialize_checkpoint(bad_bytes.data(), bad_bytes.size(), target);
    });
    EXPECT_NE(message.find("tensor 'router.state.selection_bias' holds nan at flat index 2"), std::string::npos)
        << message;
  } else {
    forged = bytes;  // a state tensor the router does not have
    const Record& weight = layout.tensors[0];
    const std::string record =
        bytes.substr(weight.name_offset, weight.payload_offset + weight.payload_size - weight.name_offset);
    forged.insert(layout.state_count_offset + 8, record);
    put_u64(forged, layout.state_count_offset, 1);
    expect_forged(CheckpointErrorKind::tensor_mismatch, forged, "expected 0 router state tensors (the layer's), got 1");
  }
  EXPECT_SAME_BYTES(snapshot(target), before);
}

TYPED_TEST(RouterCheckpoint, TruncationAndEveryByteFlipAreRejectedAndChangeNothing) {
  using Layer = typename TypeParam::Layer;
  using Scalar = typename TypeParam::Scalar;
  Layer original = make_router_layer<Layer>(13);
  sparsemoe::Sgd<Scalar> sgd(sparsemoe::SgdOptions{0.1, 0.9, false, 0.0});
  train_unpinned(original, sgd, 1);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, sgd);
  Layer target = make_router_layer<Layer>(14);
  sparsemoe::Sgd<Scalar> target_sgd(sparsemoe::SgdOptions{0.2, 0.5, false, 0.0});
  train_unpinned(target, target_sgd, 2);
  const std::string before = snapshot(target);
  const std::string sgd_before = snapshot(target_sgd);
  for (std::size_t length = 0; length < bytes.size(); ++length) {
    expect_error(CheckpointErrorKind::truncated,
                 [&] { sparsemoe::deserialize_checkpoint(bytes.data(), length, target, target_sgd); });
  }
  for (std::size_t offset = 20; offset < bytes.size(); ++offset) {
    std::string corrupted = bytes;
    corrupted[offset] = static_cast<char>(static_cast<unsigned char>(corrupted[offset]) ^ 0x41);
    expect_error(CheckpointErrorKind::checksum_mismatch,
                 [&] { sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), target, target_sgd); });
  }
  EXPECT_SAME_BYTES(snapshot(target), before);
  EXPECT_SAME_BYTES(snapshot(target_sgd), sgd_before);
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), target, target_sgd);
  EXPECT_SAME_BYTES(snapshot(target), snapshot(original));
  EXPECT_SAME_BYTES(snapshot(target_sgd), snapshot(sgd));
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

// The example of docs/checkpoint-format.md is what the writer writes: size, fields, checksum.
TEST(CheckpointFormat, DocumentedExampleIsWhatTheWriterWrites) {
  FloatLayer layer(sparsemoe::MoEConfig{1, 1, 1, 1, 0.01, 7});
  layer.gate().gate_weight()(0, 0) = 0.5f;
  layer.gate().noise_weight()(0, 0) = -0.25f;
  layer.expert(0).w1()(0, 0) = 1.0f;
  layer.expert(0).b1()(0) = -0.0f;
  layer.expert(0).w2()(0, 0) = 2.0f;
  layer.expert(0).b2()(0) = 0.125f;
  layer.set_training_step(3);
  const std::string bytes = sparsemoe::serialize_checkpoint(layer);
  ASSERT_EQ(bytes.size(), 410u);
  EXPECT_EQ(get_u64(bytes, 402), 0x9903d45483fbfad0ull);  // "d0fa fb83 54d4 0399"
  const Layout layout = walk(bytes);
  EXPECT_EQ(layout.step_offset, 0x4bu);
  EXPECT_EQ(layout.router_kind_offset, 0x53u);
  EXPECT_EQ(layout.count_offset, 0xa1u);
  EXPECT_EQ(layout.state_count_offset, 0x182u);
  EXPECT_EQ(layout.optimizer_offset, 0x18au);
  EXPECT_EQ(get_u32(bytes, 0x13a), 0x80000000u);  // b1 = -0.0f
  // A noisy_top_k router must have exactly its two options (resealed forgeries are malformed).
  std::string forged = bytes;
  forged[layout.options[1].name_offset + 4] = 'N';  // "noise_seed" -> "Noise_seed"
  reseal(forged);
  std::string message = expect_error(CheckpointErrorKind::malformed, [&] {
    sparsemoe::inspect_checkpoint(forged.data(), forged.size());
  });
  EXPECT_NE(message.find("got noise_epsilon (real), Noise_seed (unsigned)"), std::string::npos) << message;
  forged = bytes;
  put_u32(forged, layout.options[1].type_offset, 1);  // the seed as a signed integer
  reseal(forged);
  expect_error(CheckpointErrorKind::malformed, [&] { sparsemoe::inspect_checkpoint(forged.data(), forged.size()); });
  forged = bytes;
  put_u32(forged, layout.options[1].type_offset, 4);  // a flag of 7
  reseal(forged);
  message = expect_error(CheckpointErrorKind::malformed, [&] {
    sparsemoe::inspect_checkpoint(forged.data(), forged.size());
  });
  EXPECT_NE(message.find("router flag 'noise_seed' is 7, expected 0 or 1"), std::string::npos) << message;
  forged = bytes;
  put_u64(forged, 12, 115);  // below the version 2 minimum
  message = expect_error(CheckpointErrorKind::malformed, [&] {
    sparsemoe::inspect_checkpoint(forged.data(), forged.size());
  });
  EXPECT_NE(message.find("expected at least 116 for format version 2"), std::string::npos) << message;
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
  for (int kind = 0; kind <= static_cast<int>(CheckpointErrorKind::router_option_mismatch); ++kind) {
    names.insert(sparsemoe::to_string(static_cast<CheckpointErrorKind>(kind)));
  }
  EXPECT_EQ(names.size(), 15u);
  EXPECT_EQ(names.count("unknown"), 0u);
  const CheckpointError error(CheckpointErrorKind::truncated, "message");
  EXPECT_EQ(error.kind(), CheckpointErrorKind::truncated);
  EXPECT_STREQ(error.what(), "message");
  EXPECT_TRUE((std::is_base_of<std::runtime_error, CheckpointError>::value));
}

}  // namespace
