// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Checkpoints of ExpertChoiceLayer, HashMoELayer, SoftMoELayer and HierarchicalMoELayer (issue 13,
// "checkpoint support"), float and double:
//   * round trip: save (file and memory) -> load into a layer built with another seed and other
//     random weights -> a training forward and one backward (output, ∂x and every gradient) are
//     bitwise those of the original layer, which the loading code never touched; the hash layer
//     carries a balanced table, the hierarchical layer's gates their noise seeds;
//   * Adam state round trip: one more step after loading gives bitwise the original's parameters;
//   * failures leave the target unchanged (compared with a copy taken before): every byte flip,
//     truncations, a file of another layer kind (and an MoELayer file, and the other way round),
//     another option or size (slots, groups, capacity factor, k, hash seed), another Scalar,
//     another expert type;
//   * inspect_checkpoint names the layer kind.

#include <sparsemoe/checkpoint.hpp>
#include <sparsemoe/expert_choice.hpp>
#include <sparsemoe/hash_layer.hpp>
#include <sparsemoe/hierarchical_moe.hpp>
#include <sparsemoe/moe_layer.hpp>
#include <sparsemoe/optimizers.hpp>
#include <sparsemoe/soft_moe.hpp>

#include "planned_reference.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

namespace {

using sparsemoe::CheckpointError;
using sparsemoe::CheckpointErrorKind;
using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::TensorView;

/// The raw bytes of every value of `views`, in order (bitwise comparisons: NaN and −0 included).
template <typename Scalar>
std::string raw(const std::vector<TensorView<Scalar>>& views) {
  std::string bytes;
  for (const TensorView<Scalar>& view : views) {
    bytes.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
  }
  return bytes;
}

template <typename Scalar>
std::string raw(const sparsemoe::Matrix<Scalar>& matrix) {
  return std::string(reinterpret_cast<const char*>(matrix.data()), static_cast<std::size_t>(matrix.size()) * sizeof(Scalar));
}

/// Overwrites every parameter of `layer` with U(−0.5, 0.5) draws of a generator seeded `seed`.
template <typename Layer>
void randomize(Layer& layer, std::uint32_t seed) {
  using Scalar = typename Layer::Scalar;
  std::mt19937 generator(seed);
  std::uniform_real_distribution<double> uniform(-0.5, 0.5);
  for (const TensorView<Scalar>& view : layer.tensors()) {
    for (Index i = 0; i < view.size(); ++i) view.data[i] = static_cast<Scalar>(uniform(generator));
  }
}

template <typename Scalar>
sparsemoe::Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  sparsemoe::Matrix<Scalar> matrix(rows, cols);
  for (Index i = 0; i < matrix.size(); ++i) matrix.data()[i] = static_cast<Scalar>(uniform(generator));
  return matrix;
}

constexpr Index tokens = 12;
constexpr Index width = 6;   // d
constexpr Index hidden = 5;  // h
constexpr Index experts = 4;

/// A config of any of the four layer types with d, h, E = 4 and `seed` (the rest default).
template <typename Config>
Config sized(std::uint64_t seed, Index d, Index h) {
  return planned_reference::layer_sizes<Config>(d, h, experts, seed);
}

/// The raw bytes of the output, ∂x and every gradient of `forward(x)` (a training forward of
/// `layer` on a fixed random T×d batch x) and one backward of a fixed random ∂L/∂y.
template <typename Layer, typename Forward>
std::string run_once(const Layer& layer, const Forward& forward) {
  using Scalar = typename Layer::Scalar;
  const sparsemoe::Matrix<Scalar> x = random_matrix<Scalar>(tokens, width, 5);
  const auto result = forward(x);
  auto gradients = layer.make_gradients();
  const sparsemoe::Matrix<Scalar> d_input = layer.backward(result, random_matrix<Scalar>(tokens, width, 6), gradients);
  return raw(result.output) + raw(d_input) + raw(gradients.tensors());
}

// ---- One case per layer type: how to build it, run it and what else defines it ------------------

template <typename Scalar_>
struct ExpertChoiceCase {
  using Scalar = Scalar_;
  using Layer = sparsemoe::ExpertChoiceLayer<Scalar>;
  using SiluLayer = sparsemoe::ExpertChoiceLayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Silu>>;
  template <typename Other>
  using Rebind = ExpertChoiceCase<Other>;
  static constexpr const char* kind = "expert_choice";
  static sparsemoe::ExpertChoiceConfig config(std::uint64_t seed, Index d = width, Index h = hidden) {
    sparsemoe::ExpertChoiceConfig config = sized<sparsemoe::ExpertChoiceConfig>(seed, d, h);
    config.router.capacity_factor = 2.0;
    return config;
  }
  static void decorate(Layer&) {}
  /// Another option: the capacity factor.
  static Layer other_options() {
    sparsemoe::ExpertChoiceConfig other = config(1);
    other.router.capacity_factor = 1.5;
    return Layer(other);
  }
  static std::string state(const Layer&) { return {}; }
  /// Output, ∂x and every gradient of a training forward and one backward (run_once).
  static std::string run(const Layer& layer) {
    sparsemoe::PlannedForwardOptions options;
    options.mode = Mode::training;
    return run_once(layer, [&](const sparsemoe::Matrix<Scalar>& x) { return layer.forward(x, options); });
  }
};

template <typename Scalar_>
struct HashCase {
  using Scalar = Scalar_;
  using Layer = sparsemoe::HashMoELayer<Scalar>;
  using SiluLayer = sparsemoe::HashMoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Silu>>;
  template <typename Other>
  using Rebind = HashCase<Other>;
  static constexpr const char* kind = "hash";
  static sparsemoe::HashMoEConfig config(std::uint64_t seed, Index d = width, Index h = hidden) {
    sparsemoe::HashMoEConfig config = sized<sparsemoe::HashMoEConfig>(seed, d, h);
    config.router.k = 2;
    config.router.seed = 7;
    return config;
  }
  /// A balanced table over a vocabulary of 20 ids.
  static void decorate(Layer& layer) {
    sparsemoe::IndexVector frequencies(20);
    for (Index v = 0; v < 20; ++v) frequencies[v] = (v * 7) % 11 + 1;
    layer.router().set_table(sparsemoe::build_balanced_hash_table(frequencies, experts, layer.k()));
  }
  /// Another option: the hash seed.
  static Layer other_options() {
    sparsemoe::HashMoEConfig other = config(1);
    other.router.seed = 8;
    return Layer(other);
  }
  static std::string state(const Layer& layer) {
    const sparsemoe::IndexMatrix& table = layer.router().table();
    return std::string(reinterpret_cast<const char*>(table.data()), static_cast<std::size_t>(table.size()) * sizeof(Index));
  }
  static std::string run(const Layer& layer) {
    sparsemoe::IndexVector ids(tokens);
    for (Index t = 0; t < tokens; ++t) ids[t] = (t * 3) % 20;
    sparsemoe::PlannedForwardOptions options;
    options.mode = Mode::training;
    return run_once(layer, [&](const sparsemoe::Matrix<Scalar>& x) { return layer.forward(x, ids, options); });
  }
};

template <typename Scalar_>
struct SoftCase {
  using Scalar = Scalar_;
  using Layer = sparsemoe::SoftMoELayer<Scalar>;
  using SiluLayer = sparsemoe::SoftMoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Silu>>;
  template <typename Other>
  using Rebind = SoftCase<Other>;
  static constexpr const char* kind = "soft_moe";
  static sparsemoe::SoftMoEConfig config(std::uint64_t seed, Index d = width, Index h = hidden) {
    sparsemoe::SoftMoEConfig config = sized<sparsemoe::SoftMoEConfig>(seed, d, h);
    config.slots_per_expert = 2;
    config.normalize = true;
    return config;
  }
  static void decorate(Layer&) {}
  /// Another option: slots per expert.
  static Layer other_options() {
    sparsemoe::SoftMoEConfig other = config(1);
    other.slots_per_expert = 3;
    return Layer(other);
  }
  static std::string state(const Layer&) { return {}; }
  static std::string run(const Layer& layer) {
    return run_once(layer, [&](const sparsemoe::Matrix<Scalar>& x) { return layer.forward(x, Mode::training); });
  }
};

template <typename Scalar_>
struct HierarchicalCase {
  using Scalar = Scalar_;
  using Layer = sparsemoe::HierarchicalMoELayer<Scalar>;
  using SiluLayer = sparsemoe::HierarchicalMoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Silu>>;
  template <typename Other>
  using Rebind = HierarchicalCase<Other>;
  static constexpr const char* kind = "hierarchical";
  static sparsemoe::HierarchicalMoEConfig config(std::uint64_t seed, Index d = width, Index h = hidden) {
    sparsemoe::HierarchicalMoEConfig config = sized<sparsemoe::HierarchicalMoEConfig>(seed, d, h);
    config.num_groups = 2;
    config.k_groups = 1;
    config.k_per_group = 1;
    config.noise_epsilon = seed == 1 ? 1e-2 : 3e-2;  // restored from the file, like the seeds
    return config;
  }
  static void decorate(Layer&) {}
  /// Another size: 4 groups of 1 instead of 2 of 2 (same E and k).
  static Layer other_options() {
    sparsemoe::HierarchicalMoEConfig other = config(1);
    other.num_groups = 4;
    return Layer(other);
  }
  /// The gates' ε and noise seeds (not tensors, but they decide the training noise).
  static std::string state(const Layer& layer) {
    std::string text = std::to_string(layer.primary_gate().noise_epsilon()) + "/" +
                       std::to_string(layer.primary_gate().noise_seed());
    for (Index i = 0; i < layer.num_groups(); ++i) text += "/" + std::to_string(layer.secondary_gate(i).noise_seed());
    return text;
  }
  static std::string run(const Layer& layer) {
    sparsemoe::HierarchicalForwardOptions options;
    options.mode = Mode::training;
    options.step = 3;
    return run_once(layer, [&](const sparsemoe::Matrix<Scalar>& x) { return layer.forward(x, options); });
  }
};

template <typename Case>
class ParadigmCheckpoint : public ::testing::Test {
 public:
  using Scalar = typename Case::Scalar;
  using Layer = typename Case::Layer;

  /// The layer that is saved: seed 1, random weights, decorated (the hash table).
  static Layer source() {
    Layer layer(Case::config(1));
    randomize(layer, 11);
    Case::decorate(layer);
    return layer;
  }
  /// A load target: seed 2 (other noise seeds), other random weights, no decoration.
  static Layer target() {
    Layer layer(Case::config(2));
    randomize(layer, 22);
    return layer;
  }
  /// Everything that defines `layer`: its parameters and Case::state.
  static std::string snapshot(const Layer& layer) {
    Layer copy = layer;
    return raw(copy.tensors()) + "|" + Case::state(layer);
  }
  /// Expects `load` to throw CheckpointError of `kind` (any kind when `any`) whose message holds
  /// `needle`, and `layer` to keep its snapshot.
  static void expect_rejected(Layer& layer, const std::function<void()>& load, CheckpointErrorKind kind,
                              const std::string& needle, bool any = false) {
    const std::string before = snapshot(layer);
    try {
      load();
      ADD_FAILURE() << "accepted";
    } catch (const CheckpointError& error) {
      if (!any) {
        EXPECT_EQ(error.kind(), kind) << error.what();
      }
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
    }
    EXPECT_EQ(snapshot(layer), before);
  }
};

using Cases = ::testing::Types<ExpertChoiceCase<float>, ExpertChoiceCase<double>, HashCase<float>, HashCase<double>,
                               SoftCase<float>, SoftCase<double>, HierarchicalCase<float>, HierarchicalCase<double>>;
/// Test names: "<layer kind>_float", "<layer kind>_double".
struct CaseNames {
  template <typename Case>
  static std::string GetName(int) {
    return std::string(Case::kind) + (std::is_same<typename Case::Scalar, float>::value ? "_float" : "_double");
  }
};
TYPED_TEST_SUITE(ParadigmCheckpoint, Cases, CaseNames);

TYPED_TEST(ParadigmCheckpoint, RoundTripIsBitwise) {
  using Layer = typename TypeParam::Layer;
  const Layer original = this->source();
  const std::string expected = TypeParam::run(original);
  // In memory.
  Layer loaded = this->target();
  ASSERT_NE(TypeParam::run(loaded), expected);  // the test can fail: the target differs before
  const std::string bytes = sparsemoe::serialize_checkpoint(original);
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded);
  EXPECT_EQ(TypeParam::run(loaded), expected);
  EXPECT_EQ(this->snapshot(loaded), this->snapshot(original));
  // Through a file.
  const std::string path = ::testing::TempDir() + "paradigm_" + TypeParam::kind + "_" +
                           std::to_string(sizeof(typename TypeParam::Scalar)) + "_" + std::to_string(::getpid()) +
                           ".ckpt";
  sparsemoe::save_checkpoint(path, original);
  Layer from_file = this->target();
  sparsemoe::load_checkpoint(path, from_file);
  EXPECT_EQ(TypeParam::run(from_file), expected);
  const sparsemoe::CheckpointInfo info = sparsemoe::read_checkpoint_info(path);
  EXPECT_EQ(info.layer_kind, TypeParam::kind);
  EXPECT_EQ(info.router_kind, std::string("layer:") + TypeParam::kind);
  EXPECT_EQ(info.format_version, 2u);
  std::remove(path.c_str());
  // Saving is deterministic, and a loaded layer saves the same bytes.
  EXPECT_EQ(sparsemoe::serialize_checkpoint(loaded), bytes);
}

TYPED_TEST(ParadigmCheckpoint, AdamStateRoundTrip) {
  using Scalar = typename TypeParam::Scalar;
  using Layer = typename TypeParam::Layer;
  Layer original = this->source();
  sparsemoe::Adam<Scalar> adam;
  auto gradients = original.make_gradients();
  const auto step = [](Layer& layer, sparsemoe::Adam<Scalar>& optimizer, decltype(gradients)& g, std::uint32_t seed) {
    for (const TensorView<Scalar>& view : g.tensors()) {
      std::mt19937 generator(seed++);
      std::uniform_real_distribution<double> uniform(-1.0, 1.0);
      for (Index i = 0; i < view.size(); ++i) view.data[i] = static_cast<Scalar>(uniform(generator));
    }
    optimizer.step(layer.tensors(), g.tensors());
  };
  step(original, adam, gradients, 100);
  step(original, adam, gradients, 200);
  const std::string bytes = sparsemoe::serialize_checkpoint(original, adam);
  Layer loaded = this->target();
  sparsemoe::Adam<Scalar> loaded_adam;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, loaded_adam);
  EXPECT_EQ(loaded_adam.step_count(), 2);
  auto loaded_gradients = loaded.make_gradients();
  step(original, adam, gradients, 300);
  step(loaded, loaded_adam, loaded_gradients, 300);
  EXPECT_EQ(this->snapshot(loaded), this->snapshot(original));
  // Asking for Sgd state from an Adam file fails and changes nothing.
  sparsemoe::Sgd<Scalar> sgd;
  this->expect_rejected(
      loaded, [&] { sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), loaded, sgd); },
      CheckpointErrorKind::optimizer_mismatch, "expected sgd optimizer state");
  EXPECT_EQ(sgd.step_count(), 0);
}

TYPED_TEST(ParadigmCheckpoint, CorruptionAndTruncationLeaveTheLayerUnchanged) {
  using Layer = typename TypeParam::Layer;
  const std::string bytes = sparsemoe::serialize_checkpoint(this->source());
  Layer layer = this->target();
  for (std::size_t offset = 0; offset < bytes.size(); ++offset) {
    std::string corrupted = bytes;
    corrupted[offset] = static_cast<char>(static_cast<unsigned char>(corrupted[offset]) ^ 0x10);
    this->expect_rejected(
        layer, [&] { sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), layer); },
        CheckpointErrorKind::checksum_mismatch, "", true);
  }
  for (const std::size_t size : {std::size_t(0), std::size_t(7), std::size_t(30), bytes.size() / 2, bytes.size() - 1}) {
    this->expect_rejected(
        layer, [&] { sparsemoe::deserialize_checkpoint(bytes.data(), size, layer); }, CheckpointErrorKind::truncated,
        "");
  }
  // A training step other than 0 (these layers keep none), with a valid checksum, is malformed.
  std::string stepped = bytes;
  const std::size_t step_offset = 28 + 4 + std::string("expert:relu").size() + 4 * 8;
  ASSERT_EQ(stepped.substr(28 + 4, 11), "expert:relu");
  stepped[step_offset] = 1;
  const std::uint64_t checksum = sparsemoe::detail::checkpoint_checksum(stepped.data(), stepped.size() - 8);
  std::memcpy(&stepped[stepped.size() - 8], &checksum, 8);
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(stepped.data(), stepped.size(), layer); },
      CheckpointErrorKind::malformed, "records training step 0, got 1");
  // A flip in the middle of a payload is a checksum mismatch, named as such.
  std::string corrupted = bytes;
  corrupted[bytes.size() / 2] = static_cast<char>(corrupted[bytes.size() / 2] ^ 0x01);
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(corrupted.data(), corrupted.size(), layer); },
      CheckpointErrorKind::checksum_mismatch, "corrupted");
}

TYPED_TEST(ParadigmCheckpoint, OtherLayerKindsAreRejected) {
  using Scalar = typename TypeParam::Scalar;
  using Layer = typename TypeParam::Layer;
  Layer layer = this->target();
  // Every other paradigm's file, of the same Scalar, d, h, E.
  std::vector<std::string> others;
  if (std::string(TypeParam::kind) != "expert_choice") {
    others.push_back(sparsemoe::serialize_checkpoint(typename ExpertChoiceCase<Scalar>::Layer(ExpertChoiceCase<Scalar>::config(1))));
  }
  if (std::string(TypeParam::kind) != "hash") others.push_back(sparsemoe::serialize_checkpoint(typename HashCase<Scalar>::Layer(HashCase<Scalar>::config(1))));
  if (std::string(TypeParam::kind) != "soft_moe") others.push_back(sparsemoe::serialize_checkpoint(typename SoftCase<Scalar>::Layer(SoftCase<Scalar>::config(1))));
  if (std::string(TypeParam::kind) != "hierarchical") {
    others.push_back(sparsemoe::serialize_checkpoint(typename HierarchicalCase<Scalar>::Layer(HierarchicalCase<Scalar>::config(1))));
  }
  ASSERT_EQ(others.size(), 3u);
  for (const std::string& other : others) {
    this->expect_rejected(
        layer, [&] { sparsemoe::deserialize_checkpoint(other.data(), other.size(), layer); },
        CheckpointErrorKind::wrong_layer_kind, std::string("expected a checkpoint of layer kind \"") + TypeParam::kind);
  }
  // An MoELayer's file into this layer, and this layer's file into an MoELayer.
  sparsemoe::MoELayer<Scalar> moe({width, hidden, experts, 2});
  const std::string moe_bytes = sparsemoe::serialize_checkpoint(moe);
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(moe_bytes.data(), moe_bytes.size(), layer); },
      CheckpointErrorKind::wrong_layer_kind, "got layer kind \"moe\" (MoELayer)");
  const std::string bytes = sparsemoe::serialize_checkpoint(this->source());
  const std::string moe_before = sparsemoe::serialize_checkpoint(moe);
  try {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), moe);
    ADD_FAILURE() << "an MoELayer accepted a " << TypeParam::kind << " checkpoint";
  } catch (const CheckpointError& error) {
    EXPECT_EQ(error.kind(), CheckpointErrorKind::wrong_layer_kind) << error.what();
    EXPECT_NE(std::string(error.what()).find(std::string("got layer kind \"") + TypeParam::kind),
              std::string::npos)
        << error.what();
  }
  EXPECT_EQ(sparsemoe::serialize_checkpoint(moe), moe_before);
}

TYPED_TEST(ParadigmCheckpoint, OtherShapesOptionsAndTypesAreRejected) {
  using Scalar = typename TypeParam::Scalar;
  using Layer = typename TypeParam::Layer;
  Layer layer = this->target();
  // Another defining option (capacity factor, hash seed, slots per expert, number of groups).
  const std::string other_options = sparsemoe::serialize_checkpoint(TypeParam::other_options());
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(other_options.data(), other_options.size(), layer); },
      CheckpointErrorKind::router_option_mismatch, "layer option '");
  // Another d, another h.
  for (const std::string& other : {sparsemoe::serialize_checkpoint(Layer(TypeParam::config(1, width + 1, hidden))),
                                   sparsemoe::serialize_checkpoint(Layer(TypeParam::config(1, width, hidden + 2)))}) {
    const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(other.data(), other.size());
    EXPECT_EQ(info.layer_kind, TypeParam::kind);
    this->expect_rejected(
        layer, [&] { sparsemoe::deserialize_checkpoint(other.data(), other.size(), layer); },
        CheckpointErrorKind::shape_mismatch, info.input_dim != width ? "input_dim (d)" : "hidden_dim (h)");
  }
  // Another Scalar.
  using OtherScalar = std::conditional_t<std::is_same<Scalar, float>::value, double, float>;
  using OtherCase = typename TypeParam::template Rebind<OtherScalar>;
  const std::string other_scalar = sparsemoe::serialize_checkpoint(typename OtherCase::Layer(OtherCase::config(1)));
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(other_scalar.data(), other_scalar.size(), layer); },
      CheckpointErrorKind::wrong_scalar_type, "tensors (the layer's Scalar)");
  // Another expert type (SiLU experts of the same shapes).
  const std::string other_expert =
      sparsemoe::serialize_checkpoint(typename TypeParam::SiluLayer(TypeParam::config(1)));
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(other_expert.data(), other_expert.size(), layer); },
      CheckpointErrorKind::wrong_expert_kind, "expected expert kind \"expert:relu\"");
}

TYPED_TEST(ParadigmCheckpoint, SgdAndAdamThroughFiles) {
  using Scalar = typename TypeParam::Scalar;
  using Layer = typename TypeParam::Layer;
  Layer original = this->source();
  sparsemoe::SgdOptions sgd_options;
  sgd_options.momentum = 0.9;
  sparsemoe::Sgd<Scalar> sgd(sgd_options);
  sparsemoe::Adam<Scalar> adam;
  auto gradients = original.make_gradients();
  for (const TensorView<Scalar>& view : gradients.tensors()) {
    for (Index i = 0; i < view.size(); ++i) view.data[i] = static_cast<Scalar>(0.25 - 0.01 * static_cast<double>(i));
  }
  sgd.step(original.tensors(), gradients.tensors());
  Layer adam_layer = original;
  adam.step(adam_layer.tensors(), gradients.tensors());
  const std::string base = ::testing::TempDir() + "paradigm_opt_" + TypeParam::kind + "_" +
                           std::to_string(sizeof(Scalar)) + "_" + std::to_string(::getpid());
  sparsemoe::save_checkpoint(base + ".sgd", original, sgd);
  sparsemoe::save_checkpoint(base + ".adam", adam_layer, adam);
  EXPECT_EQ(sparsemoe::read_checkpoint_info(base + ".sgd").optimizer, "sgd");
  EXPECT_EQ(sparsemoe::serialize_checkpoint(original, sgd), sparsemoe::serialize_checkpoint(original, sgd));
  Layer sgd_target = this->target();
  sparsemoe::Sgd<Scalar> sgd_loaded;
  sparsemoe::load_checkpoint(base + ".sgd", sgd_target, sgd_loaded);
  EXPECT_EQ(this->snapshot(sgd_target), this->snapshot(original));
  EXPECT_EQ(sgd_loaded.step_count(), 1);
  EXPECT_EQ(sgd_loaded.options().momentum, 0.9);
  // One more step on both gives the same parameters (the velocities came back).
  sgd.step(original.tensors(), gradients.tensors());
  sgd_loaded.step(sgd_target.tensors(), gradients.tensors());
  EXPECT_EQ(this->snapshot(sgd_target), this->snapshot(original));
  Layer adam_target = this->target();
  sparsemoe::Adam<Scalar> adam_loaded;
  sparsemoe::load_checkpoint(base + ".adam", adam_target, adam_loaded);
  EXPECT_EQ(this->snapshot(adam_target), this->snapshot(adam_layer));
  EXPECT_EQ(adam_loaded.step_count(), 1);
  // A file without optimizer state cannot fill one.
  sparsemoe::save_checkpoint(base + ".none", original);
  sparsemoe::Adam<Scalar> fresh;
  this->expect_rejected(
      adam_target, [&] { sparsemoe::load_checkpoint(base + ".none", adam_target, fresh); },
      CheckpointErrorKind::optimizer_mismatch, "without optimizer state");
  EXPECT_EQ(fresh.step_count(), 0);
  for (const char* suffix : {".sgd", ".adam", ".none"}) std::remove((base + suffix).c_str());
}

TYPED_TEST(ParadigmCheckpoint, NonFiniteParametersAreRefusedUnlessAllowed) {
  using Scalar = typename TypeParam::Scalar;
  using Layer = typename TypeParam::Layer;
  Layer diverged = this->source();
  diverged.tensors().back().data[0] = std::numeric_limits<Scalar>::quiet_NaN();
  const std::string bytes = sparsemoe::serialize_checkpoint(diverged);
  Layer layer = this->target();
  this->expect_rejected(
      layer, [&] { sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer); },
      CheckpointErrorKind::non_finite_value, diverged.tensors().back().name);
  sparsemoe::CheckpointLoadOptions options;
  options.allow_non_finite = true;
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer, options);
  EXPECT_EQ(this->snapshot(layer), this->snapshot(diverged));
}

TYPED_TEST(ParadigmCheckpoint, AFileWithoutATableClearsTheTargetsTable) {
  using Layer = typename TypeParam::Layer;
  const Layer plain(TypeParam::config(1));  // never decorated: no hash table
  const std::string bytes = sparsemoe::serialize_checkpoint(plain);
  Layer layer = this->source();  // decorated: a hash layer has a table
  sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer);
  EXPECT_EQ(this->snapshot(layer), this->snapshot(plain));
  EXPECT_EQ(TypeParam::run(layer), TypeParam::run(plain));
}

/// The hash table's entries are checked: an id outside [0, E), a fraction, an id twice in a row
/// (each in a file with a valid checksum) are refused, and the layer keeps its table.
TEST(HashCheckpoint, ForgedTablesAreRefused) {
  using Layer = HashCase<float>::Layer;
  Layer source(HashCase<float>::config(1));
  HashCase<float>::decorate(source);
  const std::string bytes = sparsemoe::serialize_checkpoint(source);
  // The table is the last tensor: its last two entries (row V − 1) end before the optimizer kind
  // "none" (4 + 4 bytes) and the checksum (8 bytes).
  const std::size_t last = bytes.size() - 8 - 8 - sizeof(float);
  const auto forge = [&](float second_last, float value) {
    std::string forged = bytes;
    std::memcpy(&forged[last - sizeof(float)], &second_last, sizeof(float));
    std::memcpy(&forged[last], &value, sizeof(float));
    const std::uint64_t checksum = sparsemoe::detail::checkpoint_checksum(forged.data(), forged.size() - 8);
    std::memcpy(&forged[forged.size() - 8], &checksum, 8);
    return forged;
  };
  {  // The unchanged entries load (the forging itself is right).
    float a = 0, b = 0;
    std::memcpy(&a, &bytes[last - sizeof(float)], sizeof(float));
    std::memcpy(&b, &bytes[last], sizeof(float));
    const std::string same = forge(a, b);
    EXPECT_EQ(same, bytes);
  }
  const struct {
    float second_last, last;
    const char* needle;
  } cases[] = {{0.0f, static_cast<float>(experts), "expected an expert id in [0, 4)"},
               {0.0f, -1.0f, "expected an expert id in [0, 4)"},
               {0.0f, 1.5f, "expected an expert id in [0, 4)"},
               {0.0f, -0.0f, "expected an expert id in [0, 4)"},  // would save as +0
               {2.0f, 2.0f, "names expert 2 twice"}};
  for (const auto& item : cases) {
    const std::string forged = forge(item.second_last, item.last);
    Layer layer = ParadigmCheckpoint<HashCase<float>>::target();
    HashCase<float>::decorate(layer);
    const sparsemoe::IndexMatrix table = layer.router().table();
    try {
      sparsemoe::deserialize_checkpoint(forged.data(), forged.size(), layer);
      ADD_FAILURE() << "accepted " << item.needle;
    } catch (const CheckpointError& error) {
      EXPECT_EQ(error.kind(), CheckpointErrorKind::malformed) << error.what();
      EXPECT_NE(std::string(error.what()).find(item.needle), std::string::npos) << error.what();
    }
    EXPECT_EQ(layer.router().table(), table);
  }
}

}  // namespace
