// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// libFuzzer harness for the checkpoint reader (issue 4, items 5 and 7).
//
// Input: one control byte, then the bytes handed to the reader (as a file's content).
//   control bits 0-1: entry point: 0 = deserialize_checkpoint(layer), 1 = (layer, Sgd),
//                     2 = (layer, Adam), 3 = inspect_checkpoint only
//   control bit 2:    reseal: before reading, write the real size into the total size field and
//                     the real XXH3-64 into the last 8 bytes (when there are at least 28 bytes), so
//                     that mutations get past the integrity checks into the structure parser and
//                     the compatibility checks
//   control bits 3-4: target layer: 0 = float / Expert<Relu>, 1 = double / Expert<Silu>,
//                     2 = float / SwiGluExpert, 3 = double / Expert<GeluErf>;
//                     all d = 2, h = 2, E = 3, k = 2, with their optimizer stepped once (so that
//                     there is state to protect)
//
// Invariants, checked with __builtin_trap():
//   * the reader throws nothing but sparsemoe::CheckpointError, with a known kind and a message
//     that starts with the function's name;
//   * whenever it throws, the target layer and the target optimizer are bitwise unchanged;
//   * whenever it succeeds, inspect_checkpoint accepts the same bytes, and saving the loaded layer
//     (with the optimizer, when one was loaded) gives back exactly the input bytes (writer and
//     reader agree: a lossless, canonical format), and for a layer-only load of a file with
//     optimizer state, the layer's tensors equal the file's;
//   * inspect_checkpoint, when it succeeds, reports d, h, E ≥ 1, 1 ≤ k ≤ E, a finite ε > 0 and a
//     size equal to the input's.
// Plus no sanitizer report (ASan, UBSan) and no leak.
//
// Seeds (fuzz/corpus/fuzz_checkpoint/): valid checkpoints of each target with and without
// optimizer state, and corrupted ones. Regenerate them with
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
#include <vector>

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
#include <fstream>
#endif

#define FUZZ_CHECK(condition)                                                                      \
  do {                                                                                             \
    if (!(condition)) {                                                                            \
      std::fprintf(stderr, "fuzz_checkpoint: invariant failed: %s (%s:%d)\n", #condition, __FILE__, \
                   __LINE__);                                                                      \
      __builtin_trap();                                                                            \
    }                                                                                              \
  } while (false)

namespace {

using sparsemoe::CheckpointError;
using sparsemoe::CheckpointErrorKind;

/// Every byte of a layer's state (tensors, ε, seed, check_finite).
template <typename Layer>
std::string layer_bytes(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::string out;
  for (const auto& view : layer.tensors()) {
    out += view.name;
    out.append(reinterpret_cast<const char*>(&view.rows), sizeof view.rows);
    out.append(reinterpret_cast<const char*>(&view.cols), sizeof view.cols);
    out.append(reinterpret_cast<const char*>(view.data), static_cast<std::size_t>(view.size()) * sizeof(Scalar));
  }
  const Scalar epsilon = layer.gate().noise_epsilon();
  const std::uint64_t seed = layer.gate().noise_seed();
  out.append(reinterpret_cast<const char*>(&epsilon), sizeof epsilon);
  out.append(reinterpret_cast<const char*>(&seed), sizeof seed);
  out += layer.gate().check_finite() ? "1" : "0";
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

/// One training step, so that the optimizer has state.
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

/// A target layer with an Sgd and an Adam that have state, and pristine copies to reset to.
template <typename Layer>
struct Target {
  using Scalar = typename Layer::Scalar;
  Layer layer;
  sparsemoe::Sgd<Scalar> sgd;
  sparsemoe::Adam<Scalar> adam;

  explicit Target(std::uint64_t seed)
      : layer(sparsemoe::MoEConfig{2, 2, 3, 2, 0.05, seed}), sgd(sparsemoe::SgdOptions{0.1, 0.9, true, 0.01}) {
    layer.gate().initialize_uniform(seed + 1);
    step_once(layer, sgd);
    step_once(layer, adam);
  }
};

template <typename Layer>
Target<Layer>& pristine(std::uint64_t seed) {
  static Target<Layer> target(seed);
  return target;
}

/// Checks an error thrown by the reader.
void check_error(const CheckpointError& error, const char* function) {
  FUZZ_CHECK(error.kind() >= CheckpointErrorKind::io && error.kind() <= CheckpointErrorKind::non_finite_value);
  FUZZ_CHECK(std::strncmp(error.what(), function, std::strlen(function)) == 0);
}

/// Whether the layer's tensors are those the checkpoint `bytes` holds (layer-only load of a file
/// with optimizer state): compares the reserialized layer's tensor section with the input's.
template <typename Layer>
void check_layer_matches(const Layer& layer, const std::string& bytes) {
  const std::string saved = sparsemoe::serialize_checkpoint(layer);
  const sparsemoe::CheckpointInfo file = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  const sparsemoe::CheckpointInfo ours = sparsemoe::inspect_checkpoint(saved.data(), saved.size());
  FUZZ_CHECK(file.tensors.size() == ours.tensors.size());
  FUZZ_CHECK(file.noise_seed == ours.noise_seed && file.noise_epsilon == ours.noise_epsilon);
  // Up to the optimizer kind, the files are identical except for the total size field.
  const std::size_t header = 20;
  const std::size_t content = saved.size() - 8 - 8;  // without "none" (4 + 4 bytes) and the checksum
  FUZZ_CHECK(bytes.size() >= content);
  FUZZ_CHECK(std::memcmp(saved.data(), bytes.data(), 12) == 0);
  FUZZ_CHECK(std::memcmp(saved.data() + header, bytes.data() + header, content - header) == 0);
}

template <typename Layer>
void run(const std::string& bytes, int entry, std::uint64_t seed) {
  Target<Layer>& clean = pristine<Layer>(seed);
  Layer layer = clean.layer;
  auto sgd = clean.sgd;
  auto adam = clean.adam;
  const std::string layer_before = layer_bytes(layer);
  const std::string sgd_before = optimizer_bytes(sgd);
  const std::string adam_before = optimizer_bytes(adam);
  const char* function = "sparsemoe::deserialize_checkpoint";
  try {
    if (entry == 0) {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer);
    } else if (entry == 1) {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer, sgd);
    } else {
      sparsemoe::deserialize_checkpoint(bytes.data(), bytes.size(), layer, adam);
    }
  } catch (const CheckpointError& error) {
    check_error(error, function);
    FUZZ_CHECK(layer_bytes(layer) == layer_before);
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
    return;
  } catch (...) {
    FUZZ_CHECK(!"the reader threw something other than CheckpointError");
  }
  // Accepted: the same bytes must come back out, and inspect must agree.
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  FUZZ_CHECK(info.size_bytes == bytes.size());
  if (entry == 1) {
    FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer, sgd) == bytes);
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
  } else if (entry == 2) {
    FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer, adam) == bytes);
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
  } else {
    if (info.optimizer == "none") {
      FUZZ_CHECK(sparsemoe::serialize_checkpoint(layer) == bytes);
    } else {
      check_layer_matches(layer, bytes);
    }
    FUZZ_CHECK(optimizer_bytes(sgd) == sgd_before);
    FUZZ_CHECK(optimizer_bytes(adam) == adam_before);
  }
}

void run_inspect(const std::string& bytes) {
  try {
    const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
    FUZZ_CHECK(info.size_bytes == bytes.size());
    FUZZ_CHECK(info.input_dim >= 1 && info.hidden_dim >= 1 && info.num_experts >= 1);
    FUZZ_CHECK(info.k >= 1 && info.k <= info.num_experts);
    FUZZ_CHECK(info.noise_epsilon > 0.0 && info.noise_epsilon < HUGE_VAL);
    FUZZ_CHECK(info.scalar_size == 4 || info.scalar_size == 8);
  } catch (const CheckpointError& error) {
    check_error(error, "sparsemoe::inspect_checkpoint");
  } catch (...) {
    FUZZ_CHECK(!"inspect_checkpoint threw something other than CheckpointError");
  }
}

/// Writes the real total size and checksum into `bytes` (when it is long enough).
void reseal(std::string& bytes) {
  if (bytes.size() < 28) return;
  const std::uint64_t size = bytes.size();
  for (std::size_t i = 0; i < 8; ++i) bytes[12 + i] = static_cast<char>(size >> (8 * i) & 0xFF);
  const std::uint64_t checksum = XXH3_64bits(bytes.data(), bytes.size() - 8);
  for (std::size_t i = 0; i < 8; ++i) bytes[bytes.size() - 8 + i] = static_cast<char>(checksum >> (8 * i) & 0xFF);
}

using FloatRelu = sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>>;
using DoubleSilu = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Silu>>;
using FloatSwiGlu = sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>>;
using DoubleGeluErf = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::GeluErf>>;

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
  switch ((control >> 3) & 3u) {
    case 0: run<FloatRelu>(bytes, entry, 11); break;
    case 1: run<DoubleSilu>(bytes, entry, 12); break;
    case 2: run<FloatSwiGlu>(bytes, entry, 13); break;
    default: run<DoubleGeluErf>(bytes, entry, 14); break;
  }
  return 0;
}

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
// Seed writer (see the header comment): for each target, a checkpoint of a differently seeded
// layer of the same shape, alone and with Sgd / Adam state, and a few corrupted variants.
namespace {

void write_seed(const std::string& directory, const std::string& name, unsigned control, const std::string& bytes) {
  std::ofstream out(directory + "/" + name, std::ios::binary);
  out.put(static_cast<char>(control));
  out << bytes;
}

template <typename Layer>
void write_seeds(const std::string& directory, const std::string& name, unsigned target) {
  Target<Layer> source(1000 + target);
  const std::string layer_only = sparsemoe::serialize_checkpoint(source.layer);
  const std::string with_sgd = sparsemoe::serialize_checkpoint(source.layer, source.sgd);
  const std::string with_adam = sparsemoe::serialize_checkpoint(source.layer, source.adam);
  const unsigned t = target << 3;
  write_seed(directory, name + "_layer", t | 0u, layer_only);
  write_seed(directory, name + "_sgd", t | 1u, with_sgd);
  write_seed(directory, name + "_adam", t | 2u, with_adam);
  if (target != 0) return;
  write_seed(directory, name + "_adam_into_layer_only", t | 0u, with_adam);
  write_seed(directory, name + "_inspect", t | 3u, with_sgd);
  // Corrupted variants (float / Relu only, to keep the corpus small).
  std::string flipped = with_adam;
  flipped[flipped.size() / 2] = static_cast<char>(flipped[flipped.size() / 2] ^ 0x20);
  write_seed(directory, name + "_adam_flipped_payload", t | 2u, flipped);
  write_seed(directory, name + "_adam_flipped_resealed", t | 2u | 4u, flipped);
  write_seed(directory, name + "_truncated", t | 0u, layer_only.substr(0, layer_only.size() / 3));
  write_seed(directory, name + "_trailing", t | 0u, layer_only + std::string(5, '\0'));
  std::string version = layer_only;
  version[8] = 2;
  write_seed(directory, name + "_version2", t | 0u, version);
  write_seed(directory, name + "_sgd_into_adam", t | 2u, with_sgd);
  write_seed(directory, name + "_into_double_silu", (1u << 3) | 0u, layer_only);
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
  return 0;
}
#endif
