// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// libFuzzer harness for the checkpoint reader (issue 4, items 5 and 7; format version 2 and
// version 1 files: issue 11).
//
// Input: one control byte, then the bytes handed to the reader (as a file's content).
//   control bits 0-1: entry point: 0 = deserialize_checkpoint(layer), 1 = (layer, Sgd),
//                     2 = (layer, Adam), 3 = inspect_checkpoint only
//   control bit 2:    reseal: before reading, write the real size into the total size field and
//                     the real XXH3-64 into the last 8 bytes (when there are at least 28 bytes), so
//                     that mutations get past the integrity checks into the structure parser and
//                     the compatibility checks
//   control bits 3-5: target layer, d = 2, h = 2: 0 = float / Expert<Relu>, 1 = double /
//                     Expert<Silu>, 2 = float / SwiGluExpert, 3 = double / Expert<GeluErf>, all
//                     with the noisy top-k gate, E = 3, k = 2; 4 = float / Expert<Relu> with a
//                     SoftmaxTopKRouter (groups, bias, scale), 5 = double / Expert<Silu> with a
//                     SigmoidTopKRouter (groups, selection bias state), 6 = float / SwiGluExpert
//                     with a SwitchRouter (jitter, seed), 7 = double / Expert<GeluErf> with a
//                     GShardRouter (seed), all E = 4; each with its Sgd and Adam stepped once (so
//                     that there is state to protect) and a non-zero training step
//   control bit 6:    the other layer types instead (bits 3-5 then pick one, d = 2, h = 2, E = 4):
//                     0/1 = float/double ExpertChoiceLayer, 2/3 = HashMoELayer (k = 2, with a
//                     table), 4/5 = SoftMoELayer (2 slots, normalised), 6/7 = HierarchicalMoELayer
//                     (2 groups), each with its Sgd and Adam stepped once; their invariants are the
//                     same (nothing but CheckpointError, nothing changed on failure, an accepted
//                     file saves back to its own bytes)
//
// Invariants, checked with __builtin_trap():
//   * the reader throws nothing but sparsemoe::CheckpointError, with a known kind and a message
//     that starts with the function's name;
//   * whenever it throws, the target layer (parameters, router state and options, training step)
//     and the target optimizer are bitwise unchanged;
//   * whenever it succeeds, inspect_checkpoint accepts the same bytes, and saving the loaded layer
//     (with the optimizer, when one was loaded) gives back exactly the input bytes for a version 2
//     file (writer and reader agree: a lossless, canonical format) and exactly the input upgraded
//     to version 2 for a version 1 file (same tensors and optimizer section; the training step is
//     the layer's, which a v1 file leaves unchanged); a layer-only load of a file with optimizer
//     state gives the layer that a load with that optimizer gives;
//   * inspect_checkpoint, when it succeeds, reports version 1 or 2, d, h, E ≥ 1, 1 ≤ k ≤ E, a
//     training step exactly for version 2, a finite ε > 0 for a noisy_top_k router, and a size
//     equal to the input's.
// Plus no sanitizer report (ASan, UBSan) and no leak.
//
// Seeds (fuzz/corpus/fuzz_checkpoint/): version 2 checkpoints of each target with and without
// optimizer state, version 1 checkpoints of the noisy-gate targets (v1_*, encoded by the seed
// writer's downgrade), corrupted ones, and v1_legacy_*: the seeds the version 1 writer itself
// wrote before format version 2 (kept as they were; the writer below does not produce them).
// Regenerate the others with
//   clang++ -std=c++17 -DSPARSEMOE_FUZZ_WRITE_SEEDS -Iinclude -isystem /usr/include/eigen3 \
//     fuzz/fuzz_checkpoint.cpp -o /tmp/seeds && /tmp/seeds fuzz/corpus/fuzz_checkpoint
#include <sparsemoe/sparsemoe.hpp>
#include <sparsemoe/checkpoint.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
#include <fstream>
#endif

#include "fuzz_check.hpp"

namespace {

using sparsemoe::CheckpointError;
using sparsemoe::CheckpointErrorKind;

template <typename Layer>
constexpr bool noisy_gate = std::is_same<typename Layer::RouterType, sparsemoe::NoisyTopKGate<typename Layer::Scalar>>::value;

/// Every byte of a layer's state: tensors, router state and options (the noisy gate's ε and seed
/// among them), the router's check_finite, the training step.
template <typename Layer>
std::string layer_bytes(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::string out;
  const auto append = [&](const std::vector<sparsemoe::TensorView<Scalar>>& views) {
    for (const auto& view : views) {
      out += view.name;
      out.append(reinterpret_cast<const char*>(&view.rows), sizeof view.rows);
      out.append(reinterpret_cast<const char*>(&view.cols), sizeof view.cols);
      out.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
    }
  };
  append(layer.tensors());
  bool check_finite = false;
  if constexpr (noisy_gate<Layer>) {
    check_finite = layer.gate().check_finite();
  } else {
    append(layer.router().state());
    check_finite = layer.router().options().check_finite;
  }
  for (const auto& option : sparsemoe::RouterKind<typename Layer::RouterType>::options(layer.router())) {
    out += option.name;
    out.append(reinterpret_cast<const char*>(&option.bits), sizeof option.bits);
  }
  const std::uint64_t step = layer.training_step();
  out.append(reinterpret_cast<const char*>(&step), sizeof step);
  out += check_finite ? "1" : "0";
  return out;
}

template <typename Scalar>
void append_state(std::string& out, const std::vector<sparsemoe::Vector<Scalar>>& state) {
  const std::size_t count = state.size();
  out.append(reinterpret_cast<const char*>(&count), sizeof count);
  for (const auto& tensor : state) {
    const auto size = tensor.size();
    out.append(reinterpret_cast<const char*>(&size), sizeof size);
    out.append(reinterpret_cast<const char*>(tensor.data()), static_cast<std::size_t>(size) * sizeof(Scalar));
  }
}

/// Every byte of an optimizer's state.
template <typename Scalar>
std::string optimizer_bytes(const sparsemoe::Sgd<Scalar>& sgd) {
  std::string out;
  const std::int64_t steps = sgd.step_count();
  out.append(reinterpret_cast<const char*>(&steps), sizeof steps);
  out.append(reinterpret_cast<const char*>(&sgd.options()), sizeof(sparsemoe::SgdOptions));
  append_state(out, sgd.velocities());
  return out;
}
template <typename Scalar>
std::string optimizer_bytes(const sparsemoe::Adam<Scalar>& adam) {
  std::string out;
  const std::int64_t steps = adam.step_count();
  out.append(reinterpret_cast<const char*>(&steps), sizeof steps);
  out.append(reinterpret_cast<const char*>(&adam.options()), sizeof(sparsemoe::AdamOptions));
  append_state(out, adam.first_moments());
  append_state(out, adam.second_moments());
  return out;
}

/// One training step with unpinned noise (the layer's step advances), so that the optimizer has
/// state.
template <typename Layer, typename Optimizer>
void step_once(Layer& layer, Optimizer& optimizer) {
  using Scalar = typename Layer::Scalar;
  sparsemoe::Matrix<Scalar> x(4, layer.input_dim());
  for (sparsemoe::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<Scalar>((i % 7) - 3) / Scalar(4);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  auto gradients = layer.make_gradients();
  const auto result = layer.forward(x, options);
  layer.backward(result, x, gradients);
  optimizer.step(layer.tensors(), gradients.tensors());
}

/// The target layer of each kind, from `seed`.
template <typename Layer>
Layer make_layer(std::uint64_t seed) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  if constexpr (noisy_gate<Layer>) {
    Layer layer(sparsemoe::MoEConfig{2, 2, 3, 2, 0.05, seed});
    layer.gate().initialize_uniform(seed + 1);
    return layer;
  } else {
    typename RouterT::Options options;
    if constexpr (std::is_same<RouterT, sparsemoe::SoftmaxTopKRouter<Scalar>>::value) {
      options.normalize_top_k = true;
      options.scale = 1.5;
      options.use_bias = true;
      options.num_groups = 2;
    } else if constexpr (std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<Scalar>>::value) {
      options.scale = 2.5;
      options.num_groups = 2;
      options.top_groups = 2;
    } else if constexpr (std::is_same<RouterT, sparsemoe::SwitchRouter<Scalar>>::value) {
      options.jitter_epsilon = 0.01;
      options.seed = 77;  // an option: the seeds' writer and the target must agree on it
    } else {
      options.seed = 78;
    }
    RouterT router(2, 4, options);
    router.initialize_uniform(seed + 1);
    if constexpr (std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<Scalar>>::value) {
      for (sparsemoe::Index e = 0; e < 4; ++e) router.selection_bias()[e] = static_cast<Scalar>(0.01 * double(e));
    }
    return Layer(sparsemoe::MoEConfig{2, 2, 4, router.k(), 0.01, seed}, router);
  }
}

/// How an MoELayer target is made (make_layer) and how its optimizers get state: one training
/// step with each, then the layer's training step advanced by `seed`.
struct MoEMaker {
  template <typename Layer>
  static Layer make(std::uint64_t seed) {
    return make_layer<Layer>(seed);
  }
  template <typename Layer, typename Sgd, typename Adam>
  static void give_state(Layer& layer, Sgd& sgd, Adam& adam, std::uint64_t seed) {
    step_once(layer, sgd);
    step_once(layer, adam);
    layer.set_training_step(layer.training_step() + seed);
  }
};

/// A target layer (built by `Maker`: MoEMaker, or ParadigmMaker below for the other layer types)
/// with an Sgd and an Adam that have state, and pristine copies to reset to.
template <typename Layer, typename Maker>
struct Target {
  using Scalar = typename Layer::Scalar;
  Layer layer;
  sparsemoe::Sgd<Scalar> sgd;
  sparsemoe::Adam<Scalar> adam;

  explicit Target(std::uint64_t seed)
      : layer(Maker::template make<Layer>(seed)), sgd(sparsemoe::SgdOptions{0.1, 0.9, true, 0.01}) {
    Maker::give_state(layer, sgd, adam, seed);
  }
};

/// The pristine target of this layer type and maker, built on the first call from its `seed`.
template <typename Layer, typename Maker>
const Target<Layer, Maker>& pristine(std::uint64_t seed) {
  static const Target<Layer, Maker> target(seed);
  return target;
}

/// Checks an error thrown by the reader.
void check_error(const CheckpointError& error, const char* function) {
  FUZZ_CHECK(error.kind() >= CheckpointErrorKind::io && error.kind() <= CheckpointErrorKind::wrong_layer_kind);
  FUZZ_CHECK(std::strncmp(error.what(), function, std::strlen(function)) == 0);
}

void put_u32(std::string& out, std::uint32_t value) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(value >> (8 * i) & 0xFF));
}
void put_u64(std::string& out, std::uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(value >> (8 * i) & 0xFF));
}
std::uint64_t get_u64(const std::string& bytes, std::size_t offset) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = value << 8 | static_cast<unsigned char>(bytes[offset + static_cast<std::size_t>(i)]);
  return value;
}

/// Writes the real total size and checksum into `bytes` (when it is long enough).
void reseal(std::string& bytes) {
  if (bytes.size() < 28) return;
  const std::uint64_t size = bytes.size();
  for (std::size_t i = 0; i < 8; ++i) bytes[12 + i] = static_cast<char>(size >> (8 * i) & 0xFF);
  const std::uint64_t checksum = XXH3_64bits(bytes.data(), bytes.size() - 8);
  for (std::size_t i = 0; i < 8; ++i) bytes[bytes.size() - 8 + i] = static_cast<char>(checksum >> (8 * i) & 0xFF);
}

/// The version 2 file of the state an accepted version 1 file `v1` (described by `info`) loads:
/// its header fields, then training step `step`, router kind "noisy_top_k" and the options
/// noise_epsilon and noise_seed, its tensor section, no router state, its optimizer section (or
/// "none" unless `keep_optimizer`), a new checksum.
std::string upgrade_version_1(const std::string& v1, const sparsemoe::CheckpointInfo& info, std::uint64_t step,
                              bool keep_optimizer) {
  const std::size_t header_end = 28 + 4 + info.expert_kind.size() + 32;  // through k
  std::size_t tensors_end = header_end + 16 + 8;
  for (const auto& tensor : info.tensors) {
    tensors_end += 4 + tensor.name.size() + 16 + static_cast<std::size_t>(tensor.rows * tensor.cols) * info.scalar_size;
  }
  std::string v2 = v1.substr(0, header_end);
  v2[8] = 2;
  put_u64(v2, step);
  put_u32(v2, 11);
  v2 += "noisy_top_k";
  put_u64(v2, 2);
  put_u32(v2, 13);
  v2 += "noise_epsilon";
  put_u32(v2, 3);
  put_u64(v2, get_u64(v1, header_end));
  put_u32(v2, 10);
  v2 += "noise_seed";
  put_u32(v2, 2);
  put_u64(v2, get_u64(v1, header_end + 8));
  v2 += v1.substr(header_end + 16, tensors_end - header_end - 16);
  put_u64(v2, 0);  // no router state
  if (keep_optimizer) {
    v2 += v1.substr(tensors_end, v1.size() - 8 - tensors_end);
  } else {
    put_u32(v2, 4);
    v2 += "none";
  }
  v2 += std::string(8, '\0');
  reseal(v2);
  return v2;
}

/// deserialize_checkpoint of `bytes` into `layer` (entry 0), with `sgd` (1) or with `adam` (2).
template <typename Layer, typename Sgd, typename Adam>
void load(const std::string& bytes, int entry, Layer& layer, Sgd& sgd, Adam& adam) {
  if (entry == 0) {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer);
  } else if (entry == 1) {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer, sgd);
  } else {
    sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer, adam);
  }
}

template <typename Layer>
void run(const std::string& bytes, int entry, std::uint64_t seed) {
  const Target<Layer, MoEMaker>& clean = pristine<Layer, MoEMaker>(seed);
  Layer layer = clean.layer;
  auto sgd = clean.sgd;
  auto adam = clean.adam;
  const std::string layer_before = layer_bytes(layer);
  const std::string sgd_before = optimizer_bytes(sgd);
  const std::string adam_before = optimizer_bytes(adam);
  const std::uint64_t step_before = layer.training_step();
  const char* function = "sparsemoe::deserialize_checkpoint";
  try {
    load(bytes, entry, layer, sgd, adam);
  } catch (const CheckpointError& error) {
    check_error(error, function);
    FUZZ_CHECK(layer_bytes(layer) == layer_before);
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
    return;
  } catch (...) {
    FUZZ_CHECK(!"the reader threw something other than CheckpointError");
  }
  // Accepted: inspect must agree, and the same bytes (a version 1 file: its upgrade) come back out.
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  FUZZ_CHECK(info.size_bytes == bytes.size());
  FUZZ_CHECK(layer.training_step() == (info.has_training_step ? info.training_step : step_before));
  const bool version_1 = info.format_version == 1;
  if (entry == 1) {
    const std::string saved = sparsemoe::serialize_checkpoint(layer, sgd);
    FUZZ_CHECK(saved == (version_1 ? upgrade_version_1(bytes, info, step_before, true) : bytes));
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
  } else if (entry == 2) {
    const std::string saved = sparsemoe::serialize_checkpoint(layer, adam);
    FUZZ_CHECK(saved == (version_1 ? upgrade_version_1(bytes, info, step_before, true) : bytes));
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
  } else {
    const std::string saved = sparsemoe::serialize_checkpoint(layer);
    if (version_1) {
      FUZZ_CHECK(saved == upgrade_version_1(bytes, info, step_before, false));
    } else if (info.optimizer == "none") {
      FUZZ_CHECK(saved == bytes);
    } else {
      // The layer-only load gives the layer that a load with the file's optimizer gives.
      Layer with_optimizer = clean.layer;
      auto scratch_sgd = clean.sgd;
      auto scratch_adam = clean.adam;
      if (info.optimizer == "sgd") {
        sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), with_optimizer, scratch_sgd);
      } else {
        sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), with_optimizer, scratch_adam);
      }
      FUZZ_CHECK(layer_bytes(with_optimizer) == layer_bytes(layer));
    }
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
  }
}

void run_inspect(const std::string& bytes) {
  try {
    const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
    FUZZ_CHECK(info.size_bytes == bytes.size());
    FUZZ_CHECK(info.format_version == 1 || info.format_version == 2);
    FUZZ_CHECK(info.has_training_step == (info.format_version == 2));
    FUZZ_CHECK(info.format_version == 2 || (info.router_kind == "noisy_top_k" && info.router_state_tensors.empty()));
    FUZZ_CHECK(info.input_dim >= 1 && info.hidden_dim >= 1 && info.num_experts >= 1);
    FUZZ_CHECK(info.k >= 1 && info.k <= info.num_experts);
    if (info.router_kind == "noisy_top_k") FUZZ_CHECK(info.noise_epsilon > 0.0 && info.noise_epsilon < HUGE_VAL);
    for (const auto& option : info.router_options) {
      FUZZ_CHECK(!option.name.empty());
      FUZZ_CHECK(option.type != sparsemoe::RouterOptionType::flag || option.bits <= 1);
    }
    FUZZ_CHECK(info.scalar_size == 4 || info.scalar_size == 8);
  } catch (const CheckpointError& error) {
    check_error(error, "sparsemoe::inspect_checkpoint");
  } catch (...) {
    FUZZ_CHECK(!"inspect_checkpoint threw something other than CheckpointError");
  }
}

/// A config of any of the other layer types with d = 2, h = 2, E = 4 and `seed`.
template <typename Config>
Config small_config(std::uint64_t seed) {
  Config config;
  config.input_dim = 2;
  config.hidden_dim = 2;
  config.num_experts = 4;
  config.seed = seed;
  return config;
}

/// A target of another layer type (control bit 6), built from `seed`.
template <typename Layer>
Layer make_paradigm_layer(std::uint64_t seed) {
  using Scalar = typename Layer::Scalar;
  if constexpr (std::is_same<Layer, sparsemoe::ExpertChoiceLayer<Scalar>>::value) {
    return Layer(small_config<sparsemoe::ExpertChoiceConfig>(seed));
  } else if constexpr (std::is_same<Layer, sparsemoe::HashMoELayer<Scalar>>::value) {
    sparsemoe::HashMoEConfig config = small_config<sparsemoe::HashMoEConfig>(seed);
    config.router.k = 2;
    Layer layer(config);
    sparsemoe::IndexVector frequencies(5);
    frequencies << 5, 4, 3, 2, 1;
    layer.router().set_table(sparsemoe::build_balanced_hash_table(frequencies, 4, 2));
    return layer;
  } else if constexpr (std::is_same<Layer, sparsemoe::SoftMoELayer<Scalar>>::value) {
    sparsemoe::SoftMoEConfig config = small_config<sparsemoe::SoftMoEConfig>(seed);
    config.slots_per_expert = 2;
    config.normalize = true;
    return Layer(config);
  } else {
    sparsemoe::HierarchicalMoEConfig config = small_config<sparsemoe::HierarchicalMoEConfig>(seed);
    config.num_groups = 2;
    return Layer(config);
  }
}

/// How a target of another layer type is made (make_paradigm_layer) and how its optimizers get
/// state: an Sgd and an Adam stepped once on constant gradients.
struct ParadigmMaker {
  template <typename Layer>
  static Layer make(std::uint64_t seed) {
    return make_paradigm_layer<Layer>(seed);
  }
  template <typename Layer, typename Sgd, typename Adam>
  static void give_state(Layer& layer, Sgd& sgd, Adam& adam, std::uint64_t) {
    using Scalar = typename Layer::Scalar;
    auto gradients = layer.make_gradients();
    for (const auto& view : gradients.tensors()) view.data[0] = Scalar(0.25);  // every tensor has an entry
    sgd.step(layer.tensors(), gradients.tensors());
    adam.step(layer.tensors(), gradients.tensors());
  }
};

/// Every byte of a target of another layer type and its optimizers (through the writer, which
/// the reader does not share: the layer's tensors, options and hash table, each optimizer's state).
template <typename Layer, typename Sgd, typename Adam>
std::string paradigm_bytes(const Layer& layer, const Sgd& sgd, const Adam& adam) {
  return sparsemoe::serialize_checkpoint(layer, sgd) + sparsemoe::serialize_checkpoint(layer, adam);
}

template <typename Layer>
void run_paradigm(const std::string& bytes, int entry, std::uint64_t seed) {
  const Target<Layer, ParadigmMaker>& clean = pristine<Layer, ParadigmMaker>(seed);
  Layer layer = clean.layer;
  auto sgd = clean.sgd;
  auto adam = clean.adam;
  const std::string before = paradigm_bytes(layer, sgd, adam);
  try {
    load(bytes, entry, layer, sgd, adam);
  } catch (const CheckpointError& error) {
    check_error(error, "sparsemoe::deserialize_checkpoint");
    FUZZ_CHECK(paradigm_bytes(layer, sgd, adam) == before);
    return;
  } catch (...) {
    FUZZ_CHECK(!"the reader threw something other than CheckpointError");
  }
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  FUZZ_CHECK(info.layer_kind != "moe" && info.training_step == 0);
  if (entry == 1) {
    FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer, sgd) == bytes);
  } else if (entry == 2) {
    FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer, adam) == bytes);
  } else if (info.optimizer == "none") {
    FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer) == bytes);
  }
}

using FloatRelu = sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>>;
using DoubleSilu = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Silu>>;
using FloatSwiGlu = sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>>;
using DoubleGeluErf = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::GeluErf>>;
using FloatReluSoftmax =
    sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::SoftmaxTopKRouter<float>>;
using DoubleSiluSigmoid =
    sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Silu>, sparsemoe::SigmoidTopKRouter<double>>;
using FloatSwiGluSwitch = sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>, sparsemoe::SwitchRouter<float>>;
using DoubleGeluErfGShard =
    sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::GeluErf>, sparsemoe::GShardRouter<double>>;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const unsigned control = data[0];
  std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((control & 4u) != 0) reseal(bytes);
  const int entry = static_cast<int>(control & 3u);
  if (entry == 3) {
    run_inspect(bytes);
    return 0;
  }
  if ((control & 64u) != 0) {
    switch ((control >> 3) & 7u) {
      case 0: run_paradigm<sparsemoe::ExpertChoiceLayer<float>>(bytes, entry, 21); break;
      case 1: run_paradigm<sparsemoe::ExpertChoiceLayer<double>>(bytes, entry, 22); break;
      case 2: run_paradigm<sparsemoe::HashMoELayer<float>>(bytes, entry, 23); break;
      case 3: run_paradigm<sparsemoe::HashMoELayer<double>>(bytes, entry, 24); break;
      case 4: run_paradigm<sparsemoe::SoftMoELayer<float>>(bytes, entry, 25); break;
      case 5: run_paradigm<sparsemoe::SoftMoELayer<double>>(bytes, entry, 26); break;
      case 6: run_paradigm<sparsemoe::HierarchicalMoELayer<float>>(bytes, entry, 27); break;
      default: run_paradigm<sparsemoe::HierarchicalMoELayer<double>>(bytes, entry, 28); break;
    }
    return 0;
  }
  switch ((control >> 3) & 7u) {
    case 0: run<FloatRelu>(bytes, entry, 11); break;
    case 1: run<DoubleSilu>(bytes, entry, 12); break;
    case 2: run<FloatSwiGlu>(bytes, entry, 13); break;
    case 3: run<DoubleGeluErf>(bytes, entry, 14); break;
    case 4: run<FloatReluSoftmax>(bytes, entry, 15); break;
    case 5: run<DoubleSiluSigmoid>(bytes, entry, 16); break;
    case 6: run<FloatSwiGluSwitch>(bytes, entry, 17); break;
    default: run<DoubleGeluErfGShard>(bytes, entry, 18); break;
  }
  return 0;
}

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
// Seed writer (see the header comment): for each target, a checkpoint of a differently seeded
// layer of the same shape, alone and with Sgd / Adam state; for the noisy-gate targets the same
// in version 1 (v1_*); and a few corrupted variants.
namespace {

void write_seed(const std::string& directory, const std::string& name, unsigned control, const std::string& bytes) {
  std::ofstream out(directory + "/" + name, std::ios::binary);
  out.put(static_cast<char>(control));
  out << bytes;
}

/// The version 1 encoding of a version 2 noisy-gate checkpoint (what the last v1 writer wrote).
std::string downgrade_to_version_1(const std::string& v2) {
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(v2.data(), v2.size());
  const std::size_t header_end = 28 + 4 + info.expert_kind.size() + 32;
  std::size_t offset = header_end + 8 + 4 + info.router_kind.size() + 8;
  for (const auto& option : info.router_options) offset += 4 + option.name.size() + 4 + 8;
  const std::size_t tensors_begin = offset;
  offset += 8;
  for (const auto& tensor : info.tensors) {
    offset += 4 + tensor.name.size() + 16 + static_cast<std::size_t>(tensor.rows * tensor.cols) * info.scalar_size;
  }
  std::string v1 = v2.substr(0, header_end);
  v1[8] = 1;
  put_u64(v1, info.router_options[0].bits);  // ε
  put_u64(v1, info.router_options[1].bits);  // seed
  v1 += v2.substr(tensors_begin, offset - tensors_begin);
  v1 += v2.substr(offset + 8, v2.size() - 8 - offset - 8);  // after the (empty) state section
  v1 += std::string(8, '\0');
  reseal(v1);
  return v1;
}

template <typename Layer>
void write_seeds(const std::string& directory, const std::string& name, unsigned target) {
  Target<Layer, MoEMaker> source(1000 + target);
  const std::string layer_only = sparsemoe::serialize_checkpoint(source.layer);
  const std::string with_sgd = sparsemoe::serialize_checkpoint(source.layer, source.sgd);
  const std::string with_adam = sparsemoe::serialize_checkpoint(source.layer, source.adam);
  const unsigned t = target << 3;
  write_seed(directory, name + "_layer", t | 0u, layer_only);
  write_seed(directory, name + "_sgd", t | 1u, with_sgd);
  write_seed(directory, name + "_adam", t | 2u, with_adam);
  if constexpr (noisy_gate<Layer>) {
    write_seed(directory, "v1_" + name + "_layer", t | 0u, downgrade_to_version_1(layer_only));
    write_seed(directory, "v1_" + name + "_sgd", t | 1u, downgrade_to_version_1(with_sgd));
    write_seed(directory, "v1_" + name + "_adam", t | 2u, downgrade_to_version_1(with_adam));
  }
  if (target == 5) {  // the sigmoid router's state, into a layer-only load and resealed with a flip
    write_seed(directory, name + "_adam_into_layer_only", t | 0u, with_adam);
    std::string flipped = with_sgd;
    flipped[flipped.size() / 3] = static_cast<char>(flipped[flipped.size() / 3] ^ 0x04);
    write_seed(directory, name + "_sgd_flipped_resealed", t | 1u | 4u, flipped);
    write_seed(directory, name + "_into_float_relu_softmax", (4u << 3) | 0u, layer_only);
  }
  if (target != 0) return;
  write_seed(directory, name + "_adam_into_layer_only", t | 0u, with_adam);
  write_seed(directory, name + "_inspect", t | 3u, with_sgd);
  write_seed(directory, "v1_" + name + "_inspect", t | 3u, downgrade_to_version_1(with_sgd));
  // Corrupted variants (float / Relu only, to keep the corpus small).
  std::string flipped = with_adam;
  flipped[flipped.size() / 2] = static_cast<char>(flipped[flipped.size() / 2] ^ 0x20);
  write_seed(directory, name + "_adam_flipped_payload", t | 2u, flipped);
  write_seed(directory, name + "_adam_flipped_resealed", t | 2u | 4u, flipped);
  write_seed(directory, name + "_truncated", t | 0u, layer_only.substr(0, layer_only.size() / 3));
  write_seed(directory, name + "_trailing", t | 0u, layer_only + std::string(5, '\0'));
  std::string version = layer_only;
  version[8] = 3;
  write_seed(directory, name + "_version3", t | 0u, version);
  write_seed(directory, name + "_sgd_into_adam", t | 2u, with_sgd);
  write_seed(directory, name + "_into_double_silu", (1u << 3) | 0u, layer_only);
  write_seed(directory, name + "_into_float_relu_softmax", (4u << 3) | 0u, layer_only);
}

/// Seeds of a target of another layer type (control bit 6): a differently seeded layer alone and
/// with Sgd / Adam state, and the float expert-choice file into the float Soft MoE target.
template <typename Layer>
void write_paradigm_seeds(const std::string& directory, const std::string& name, unsigned target) {
  Target<Layer, ParadigmMaker> source(2000 + target);
  const unsigned t = 64u | target << 3;
  write_seed(directory, name + "_layer", t | 0u, sparsemoe::serialize_checkpoint(source.layer));
  write_seed(directory, name + "_sgd", t | 1u, sparsemoe::serialize_checkpoint(source.layer, source.sgd));
  write_seed(directory, name + "_adam", t | 2u, sparsemoe::serialize_checkpoint(source.layer, source.adam));
  if (target == 0) {
    write_seed(directory, name + "_into_soft_moe", 64u | 4u << 3, sparsemoe::serialize_checkpoint(source.layer));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIRECTORY\n", argv[0]);
    return 2;
  }
  const std::string directory = argv[1];
  write_seeds<FloatRelu>(directory, "float_relu", 0);
  write_seeds<DoubleSilu>(directory, "double_silu", 1);
  write_seeds<FloatSwiGlu>(directory, "float_swiglu", 2);
  write_seeds<DoubleGeluErf>(directory, "double_gelu_erf", 3);
  write_seeds<FloatReluSoftmax>(directory, "float_relu_softmax", 4);
  write_seeds<DoubleSiluSigmoid>(directory, "double_silu_sigmoid", 5);
  write_seeds<FloatSwiGluSwitch>(directory, "float_swiglu_switch", 6);
  write_seeds<DoubleGeluErfGShard>(directory, "double_gelu_erf_gshard", 7);
  write_paradigm_seeds<sparsemoe::ExpertChoiceLayer<float>>(directory, "layer_expert_choice_float", 0);
  write_paradigm_seeds<sparsemoe::ExpertChoiceLayer<double>>(directory, "layer_expert_choice_double", 1);
  write_paradigm_seeds<sparsemoe::HashMoELayer<float>>(directory, "layer_hash_float", 2);
  write_paradigm_seeds<sparsemoe::HashMoELayer<double>>(directory, "layer_hash_double", 3);
  write_paradigm_seeds<sparsemoe::SoftMoELayer<float>>(directory, "layer_soft_moe_float", 4);
  write_paradigm_seeds<sparsemoe::SoftMoELayer<double>>(directory, "layer_soft_moe_double", 5);
  write_paradigm_seeds<sparsemoe::HierarchicalMoELayer<float>>(directory, "layer_hierarchical_float", 6);
  write_paradigm_seeds<sparsemoe::HierarchicalMoELayer<double>>(directory, "layer_hierarchical_double", 7);
  return 0;
}
#endif
