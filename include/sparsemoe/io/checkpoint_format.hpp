// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_FORMAT_HPP
#define SPARSEMOE_IO_CHECKPOINT_FORMAT_HPP

/// \file checkpoint_format.hpp
/// The checkpoint format itself, independent of any layer: the format version and the fixed
/// offsets, the scalar type codes, the XXH3-64 checksum, what a file describes (CheckpointInfo),
/// the tensor record, and parse_checkpoint, which checks integrity (size, magic, version, total
/// size, checksum) and structure and returns where each payload is. The layout is documented in
/// checkpoint.hpp and docs/checkpoint-format.md.

#include "../config.hpp"
#include "../layer_options.hpp"
#include "../optimizers.hpp"
#include "../router/router_kind.hpp"
#include "byte_codec.hpp"
#include "checkpoint_error.hpp"

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(XXH_VERSION_NUMBER) || XXH_VERSION_NUMBER < 800
#error "sparsemoe/checkpoint.hpp needs xxHash 0.8 or newer (XXH3_64bits)"
#endif

namespace sparsemoe {

/// \addtogroup files
/// @{

/// The checkpoint format version this build writes (2: router kind and options, router state
/// tensors and the layer's training step; see checkpoint.hpp).
inline constexpr std::uint32_t checkpoint_format_version = 2;
/// The oldest format version this build reads. Version 1 files (noisy top-k gate only, no
/// training step) load as before and leave the layer's training_step() unchanged.
inline constexpr std::uint32_t checkpoint_min_format_version = 1;

/// Settings of load_checkpoint and deserialize_checkpoint.
struct CheckpointLoadOptions {
  /// Accept parameter (and router state) tensors that hold NaN or infinity (to look at a
  /// diverged run); by default such a file is rejected with
  /// CheckpointErrorKind::non_finite_value, naming the tensor.
  bool allow_non_finite = false;
};

/// Name and shape of one tensor stored in a checkpoint.
struct CheckpointTensorInfo {
  std::string name;  ///< e.g. "expert0.w1", "router.state.selection_bias", "adam.m.expert0.w1"
  Index rows = 0;    ///< rows (a vector is rows×1)
  Index cols = 0;    ///< columns
};

/// Everything a checkpoint says about itself, as returned by inspect_checkpoint() after the
/// integrity and structure checks (no target layer involved). Use config() to build a layer the
/// file loads into.
struct CheckpointInfo {
  std::uint32_t format_version = 0;                     ///< 1 or 2 (checkpoint_format_version)
  std::size_t size_bytes = 0;                           ///< total file size, checksum included
  std::uint64_t checksum = 0;                           ///< the stored (and verified) XXH3-64
  std::string scalar_type;                              ///< "float32" or "float64"
  std::size_t scalar_size = 0;                          ///< 4 or 8
  std::string expert_kind;                              ///< ExpertKind<ExpertT>::name() of the writer
  Index input_dim = 0;                                  ///< d
  Index hidden_dim = 0;                                 ///< h
  Index num_experts = 0;                                ///< E
  Index k = 0;                                          ///< k
  /// Whether the file records the layer's training step (version 2 files do, version 1 files not).
  bool has_training_step = false;
  /// MoELayer::training_step() when saved (0 when !has_training_step).
  std::uint64_t training_step = 0;
  /// The kind string of the file. For an MoELayer's file: RouterKind<RouterT>::name() of its
  /// router, "noisy_top_k" (every version 1 file), "softmax_top_k", "sigmoid_top_k", "switch",
  /// "gshard", or a router of your own. For another layer type: "layer:" + layer_kind, e.g.
  /// "layer:soft_moe".
  std::string router_kind;
  /// Which layer type wrote the file: "moe" (MoELayer, every version 1 file), "expert_choice"
  /// (ExpertChoiceLayer), "hash" (HashMoELayer), "soft_moe" (SoftMoELayer) or "hierarchical"
  /// (HierarchicalMoELayer); taken from router_kind (the part after "layer:", else "moe").
  std::string layer_kind;
  /// RouterKind<RouterT>::options() of the writer's router, in file order (for a version 1 file:
  /// noise_epsilon and noise_seed, as a version 2 file of the same gate stores them); for
  /// another layer type, the options that define that layer (docs/checkpoint-format.md).
  std::vector<RouterOption> router_options;
  double noise_epsilon = 0.0;                           ///< noisy_top_k: the gate's ε (exact); else 0
  std::uint64_t noise_seed = 0;                         ///< noisy_top_k: the gate's noise seed; else 0
  std::vector<CheckpointTensorInfo> tensors;            ///< parameter tensors, MoELayer::tensors() order
  /// The router's state() tensors (no gradient, e.g. "router.state.selection_bias"); empty for
  /// routers without state and in version 1 files.
  std::vector<CheckpointTensorInfo> router_state_tensors;
  std::string optimizer = "none";                       ///< "none", "sgd" or "adam"
  std::int64_t optimizer_step_count = 0;                ///< steps the optimizer had taken
  SgdOptions sgd_options;                               ///< meaningful when optimizer == "sgd"
  AdamOptions adam_options;                             ///< meaningful when optimizer == "adam"
  std::vector<CheckpointTensorInfo> optimizer_tensors;  ///< state tensors, file order

  /// The router option called `name`, or nullptr. O(number of options).
  const RouterOption* router_option(const std::string& name) const {
    for (const RouterOption& option : router_options) {
      if (option.name == name) return &option;
    }
    return nullptr;
  }

  /// A layer configuration with this file's d, h, E, k (and, for noisy_top_k, ε and seed):
  /// `MoELayer<S, ExpertT> layer(info.config())` of the right S and ExpertT accepts a noisy_top_k
  /// file; for another router kind, build the router with the options in router_options and
  /// pass it: `MoELayer<S, ExpertT, RouterT> layer(info.config(), router)`.
  MoEConfig config() const {
    MoEConfig result;
    result.input_dim = input_dim;
    result.hidden_dim = hidden_dim;
    result.num_experts = num_experts;
    result.k = k;
    if (router_kind == "noisy_top_k") {
      result.noise_epsilon = noise_epsilon;
      result.seed = noise_seed;
    }
    return result;
  }
};

namespace detail {

/// The 8 magic bytes every checkpoint starts with.
inline constexpr char checkpoint_magic[8] = {'S', 'P', 'M', 'O', 'E', 'C', 'K', 'P'};
inline constexpr std::size_t checkpoint_magic_size = 8;
/// Offset of the u32 version, of the u64 total size, and the size of that fixed prefix (the same
/// in every version).
inline constexpr std::size_t checkpoint_version_offset = 8;
inline constexpr std::size_t checkpoint_size_offset = 12;
inline constexpr std::size_t checkpoint_prefix_size = 20;
inline constexpr std::size_t checkpoint_checksum_size = 8;
/// The smallest well-formed version 1 file: prefix, scalar code and size, an empty kind string,
/// d, h, E, k, ε, seed, tensor count, "none" (4 + 4 bytes), checksum (104 bytes). No version is
/// smaller.
inline constexpr std::size_t checkpoint_v1_min_size =
    checkpoint_prefix_size + 8 + 4 + 6 * 8 + 8 + 8 + checkpoint_checksum_size;
/// The smallest well-formed version 2 file: prefix, scalar code and size, an empty expert kind,
/// d, h, E, k, training step, an empty router kind, option count, tensor count, state count,
/// "none", checksum (116 bytes).
inline constexpr std::size_t checkpoint_min_size =
    checkpoint_prefix_size + 8 + 4 + 5 * 8 + 4 + 3 * 8 + 8 + checkpoint_checksum_size;
/// Limits on stored strings and counts (a guard against absurd lengths, far above any real one).
inline constexpr std::size_t checkpoint_max_kind_length = 256;
inline constexpr std::size_t checkpoint_max_name_length = 4096;
inline constexpr std::size_t checkpoint_max_option_name_length = 256;
inline constexpr std::uint64_t checkpoint_max_router_options = 256;
/// The router kind of NoisyTopKGate (RouterKind<NoisyTopKGate<S>>::name()), which every version 1
/// file implies.
inline constexpr const char* noisy_top_k_kind = "noisy_top_k";

/// The layer kind of an MoELayer's checkpoint (CheckpointInfo::layer_kind).
inline constexpr const char* moe_layer_kind = "moe";
/// What the kind string of another layer type's checkpoint starts with: "layer:" + its kind.
inline constexpr const char* layer_kind_prefix = "layer:";

/// The layer kind a file's kind string `router_kind` implies: the part after "layer:", or "moe".
inline std::string layer_kind_of(const std::string& router_kind) {
  const std::string prefix = layer_kind_prefix;
  if (router_kind.compare(0, prefix.size(), prefix) == 0) return router_kind.substr(prefix.size());
  return moe_layer_kind;
}

/// The class that writes layer kind `kind` ("MoELayer" for "moe", "SoftMoELayer" for
/// "soft_moe", …; "an unknown layer type" otherwise), for error messages.
inline std::string layer_kind_class(const std::string& kind) {
  if (kind == moe_layer_kind) return "MoELayer";
  if (kind == "expert_choice") return "ExpertChoiceLayer";
  if (kind == "hash") return "HashMoELayer";
  if (kind == "soft_moe") return "SoftMoELayer";
  if (kind == "hierarchical") return "HierarchicalMoELayer";
  return "an unknown layer type";
}

/// The smallest well-formed file of format `version` (1 or 2).
constexpr std::size_t checkpoint_min_size_of(std::uint32_t version) {
  return version == 1 ? checkpoint_v1_min_size : checkpoint_min_size;
}

/// Scalar type code stored in a checkpoint: 1 = float (binary32), 2 = double (binary64).
template <typename Scalar>
constexpr std::uint32_t checkpoint_scalar_code() {
  return std::is_same<Scalar, float>::value ? 1u : 2u;
}

/// "float32" / "float64" for a scalar code, "unknown code <c>" otherwise.
inline std::string checkpoint_scalar_name(std::uint32_t code) {
  if (code == 1) return "float32";
  if (code == 2) return "float64";
  return "unknown scalar type code " + std::to_string(code);
}

/// XXH3-64 (seed 0) of `size` bytes: the checkpoint checksum.
inline std::uint64_t checkpoint_checksum(const void* data, std::size_t size) { return XXH3_64bits(data, size); }

/// `value` as "0x" and 16 lowercase hex digits.
inline std::string hex64(std::uint64_t value) {
  std::string text = "0x0000000000000000";
  for (std::size_t i = 0; i < 16; ++i) text[17 - i] = "0123456789abcdef"[(value >> (4 * i)) & 0xFu];
  return text;
}

/// A checkpoint that passed the integrity and structure checks: its description, plus where each
/// tensor's payload starts in the buffer it was parsed from.
struct ParsedCheckpoint {
  CheckpointInfo info;
  std::vector<std::size_t> tensor_offsets;               ///< payload offset of info.tensors[i]
  std::vector<std::size_t> router_state_tensor_offsets;  ///< payload offset of info.router_state_tensors[i]
  std::vector<std::size_t> optimizer_tensor_offsets;     ///< payload offset of info.optimizer_tensors[i]
};

/// Whether `options` satisfy Sgd's constructor checks (lr finite > 0, 0 ≤ μ < 1, λ finite ≥ 0,
/// Nesterov only with μ > 0).
inline bool valid_sgd_options(const SgdOptions& options) {
  return std::isfinite(options.learning_rate) && options.learning_rate > 0.0 && options.momentum >= 0.0 &&
         options.momentum < 1.0 && std::isfinite(options.weight_decay) && options.weight_decay >= 0.0 &&
         (!options.nesterov || options.momentum > 0.0);
}

/// Whether `options` satisfy Adam's constructor checks (lr, ε finite > 0, 0 ≤ β1, β2 < 1, λ finite ≥ 0).
inline bool valid_adam_options(const AdamOptions& options) {
  return std::isfinite(options.learning_rate) && options.learning_rate > 0.0 && options.beta1 >= 0.0 &&
         options.beta1 < 1.0 && options.beta2 >= 0.0 && options.beta2 < 1.0 && std::isfinite(options.epsilon) &&
         options.epsilon > 0.0 && std::isfinite(options.weight_decay) && options.weight_decay >= 0.0;
}

/// Reads one tensor record (name, rows, cols, payload) and returns its description and the
/// payload offset. O(name length); the payload is only bounds-checked, not read.
inline void read_tensor_record(CheckpointReader& reader, std::size_t scalar_size, const std::string& context,
                               std::vector<CheckpointTensorInfo>& tensors, std::vector<std::size_t>& offsets) {
  CheckpointTensorInfo tensor;
  tensor.name = reader.str(checkpoint_max_name_length, "a tensor name");
  const std::size_t shape_offset = reader.position();
  const std::int64_t rows = reader.i64("tensor rows");
  const std::int64_t cols = reader.i64("tensor cols");
  if (rows < 0 || cols < 0) {
    checkpoint_fail(CheckpointErrorKind::malformed, context, "tensor '", tensor.name, "' at offset ", shape_offset,
                    " has shape ", rows, "x", cols, ", expected non-negative rows and cols");
  }
  // rows·cols·scalar_size must fit in what remains; checked without overflow.
  const auto urows = static_cast<std::uint64_t>(rows);
  const auto ucols = static_cast<std::uint64_t>(cols);
  const std::uint64_t available = reader.remaining() / scalar_size;
  if (urows != 0 && ucols > available / urows) {
    checkpoint_fail(CheckpointErrorKind::malformed, context, "tensor '", tensor.name, "' is ", rows, "x", cols,
                    ", which needs more bytes than the ", reader.remaining(), " left before the checksum");
  }
  tensor.rows = static_cast<Index>(rows);
  tensor.cols = static_cast<Index>(cols);
  offsets.push_back(reader.skip(static_cast<std::size_t>(urows * ucols) * scalar_size, "a tensor payload"));
  tensors.push_back(std::move(tensor));
}

/// "name (type)" of each option, comma-separated (for error messages).
inline std::string describe_router_options(const std::vector<RouterOption>& options) {
  std::string text;
  for (const RouterOption& option : options) {
    if (!text.empty()) text += ", ";
    text += option.name + " (" + to_string(option.type) + ")";
  }
  return text.empty() ? "none" : text;
}

/// Reads the version 2 router option list (u64 count, then per option: str name, u32 type code,
/// u64 value bits) into `options`. Throws CheckpointError(malformed) for a count that cannot fit,
/// an empty, over-long or repeated name, an unknown type code, or a flag other than 0 or 1.
inline void read_router_options(CheckpointReader& reader, const std::string& context,
                                std::vector<RouterOption>& options) {
  using Kind = CheckpointErrorKind;
  const std::uint64_t count = reader.u64("the router option count");
  // Each option takes at least 4 + 1 + 4 + 8 = 17 bytes.
  if (count > checkpoint_max_router_options || count > reader.remaining() / 17) {
    checkpoint_fail(Kind::malformed, context, "the router option count ", count, " exceeds ",
                    checkpoint_max_router_options, " or cannot fit in the ", reader.remaining(),
                    " bytes left before the checksum");
  }
  options.reserve(static_cast<std::size_t>(count));
  for (std::uint64_t i = 0; i < count; ++i) {
    RouterOption option;
    option.name = reader.str(checkpoint_max_option_name_length, "a router option name");
    const std::size_t type_offset = reader.position();
    const std::uint32_t type = reader.u32("a router option type");
    option.bits = reader.u64("a router option value");
    if (option.name.empty()) {
      checkpoint_fail(Kind::malformed, context, "router option ", i, " has an empty name");
    }
    for (const RouterOption& earlier : options) {
      if (earlier.name == option.name) {
        checkpoint_fail(Kind::malformed, context, "router option '", option.name, "' appears twice");
      }
    }
    if (type < static_cast<std::uint32_t>(RouterOptionType::integer) ||
        type > static_cast<std::uint32_t>(RouterOptionType::flag)) {
      checkpoint_fail(Kind::malformed, context, "router option '", option.name, "' at offset ", type_offset,
                      " has type code ", type, ", expected 1 (integer), 2 (unsigned), 3 (real) or 4 (flag)");
    }
    option.type = static_cast<RouterOptionType>(type);
    if (option.type == RouterOptionType::flag && option.bits > 1) {
      checkpoint_fail(Kind::malformed, context, "router flag '", option.name, "' is ", option.bits,
                      ", expected 0 or 1");
    }
    options.push_back(std::move(option));
  }
}

/// The options of a noisy_top_k router are exactly noise_epsilon (a finite real > 0) and
/// noise_seed (unsigned), in that order; copies them into info.noise_epsilon and info.noise_seed.
/// Throws CheckpointError(malformed) otherwise (checked without a target: a load restores them).
inline void check_noisy_top_k_options(CheckpointInfo& info, const std::string& context) {
  using Kind = CheckpointErrorKind;
  const std::vector<RouterOption>& options = info.router_options;
  if (options.size() != 2 || options[0].name != "noise_epsilon" || options[0].type != RouterOptionType::real ||
      options[1].name != "noise_seed" || options[1].type != RouterOptionType::unsigned_integer) {
    checkpoint_fail(Kind::malformed, context, "a noisy_top_k router has the options noise_epsilon (real), "
                    "noise_seed (unsigned), got ", describe_router_options(options));
  }
  info.noise_epsilon = options[0].as_real();
  info.noise_seed = options[1].bits;
  if (!(std::isfinite(info.noise_epsilon) && info.noise_epsilon > 0.0)) {
    checkpoint_fail(Kind::malformed, context, "expected a finite noise epsilon > 0, got ", info.noise_epsilon);
  }
}

/// Checks the integrity (size, magic, version, total size, checksum) and the structure of the
/// `size` bytes at `data`, without any target layer. `context` prefixes error messages
/// ("<function>" or "<function>: '<path>'"). O(size): one XXH3 pass plus the field reads.
inline ParsedCheckpoint parse_checkpoint(const unsigned char* data, std::size_t size, const std::string& context) {
  using Kind = CheckpointErrorKind;
  // 1. Magic (a short prefix of the magic is a truncated checkpoint, anything else is not one).
  if (size < checkpoint_magic_size) {
    if (size == 0 || std::memcmp(data, checkpoint_magic, size) == 0) {
      checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", checkpoint_v1_min_size,
                      " (a checkpoint starts with the 8-byte magic \"SPMOECKP\")");
    }
    checkpoint_fail(Kind::bad_magic, context, "expected the magic \"SPMOECKP\", got a ", size,
                    "-byte file that does not start with it");
  }
  if (std::memcmp(data, checkpoint_magic, checkpoint_magic_size) != 0) {
    std::string got;
    for (std::size_t i = 0; i < checkpoint_magic_size; ++i) {
      const char hex[] = "0123456789abcdef";
      got += hex[data[i] >> 4];
      got += hex[data[i] & 0xF];
    }
    checkpoint_fail(Kind::bad_magic, context, "expected the magic \"SPMOECKP\" (53504d4f45434b50), got ", got,
                    ": not a sparsemoe checkpoint");
  }
  // 2. Version, before anything else, so that a later version may change all that follows.
  if (size < checkpoint_version_offset + 4) {
    checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", checkpoint_v1_min_size,
                    " (the file ends inside the format version)");
  }
  const std::uint32_t version = load_u32(data + checkpoint_version_offset);
  if (version < checkpoint_min_format_version || version > checkpoint_format_version) {
    checkpoint_fail(Kind::unsupported_version, context, "expected format version ", checkpoint_min_format_version,
                    " to ", checkpoint_format_version, ", got version ", version);
  }
  const std::size_t min_size = checkpoint_min_size_of(version);
  // 3. Total size: truncation and trailing bytes are told apart from corruption.
  if (size < checkpoint_prefix_size) {
    checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", min_size,
                    " (the file ends inside the total size field)");
  }
  const std::uint64_t total = load_u64(data + checkpoint_size_offset);
  if (total < min_size) {
    checkpoint_fail(Kind::malformed, context, "the header's total size is ", total, " bytes, expected at least ",
                    min_size, " for format version ", version);
  }
  if (static_cast<std::uint64_t>(size) < total) {
    checkpoint_fail(Kind::truncated, context, "expected ", total, " bytes (the header's total size), got ", size);
  }
  if (static_cast<std::uint64_t>(size) > total) {
    checkpoint_fail(Kind::trailing_bytes, context, "expected ", total, " bytes (the header's total size), got ", size,
                    ": ", static_cast<std::uint64_t>(size) - total, " trailing bytes");
  }
  // 4. Checksum over everything before it.
  const std::size_t body = size - checkpoint_checksum_size;
  const std::uint64_t stored = load_u64(data + body);
  const std::uint64_t computed = checkpoint_checksum(data, body);
  if (stored != computed) {
    checkpoint_fail(Kind::checksum_mismatch, context, "expected XXH3-64 ", hex64(stored),
                    " (stored in the last 8 bytes), got ", hex64(computed), " over bytes [0, ", body,
                    "): the checkpoint is corrupted");
  }
  // 5. Structure.
  ParsedCheckpoint parsed;
  CheckpointInfo& info = parsed.info;
  info.format_version = version;
  info.size_bytes = size;
  info.checksum = stored;
  CheckpointReader reader(data, checkpoint_prefix_size, body, context);
  const std::uint32_t scalar_code = reader.u32("the scalar type code");
  const std::uint32_t scalar_size = reader.u32("the scalar size");
  if (scalar_code != 1 && scalar_code != 2) {
    checkpoint_fail(Kind::wrong_scalar_type, context, "expected scalar type code 1 (float32) or 2 (float64), got ",
                    scalar_code);
  }
  const std::uint32_t expected_scalar_size = scalar_code == 1 ? 4u : 8u;
  if (scalar_size != expected_scalar_size) {
    checkpoint_fail(Kind::malformed, context, "scalar type ", checkpoint_scalar_name(scalar_code), " has size ",
                    expected_scalar_size, ", the file says ", scalar_size);
  }
  info.scalar_type = checkpoint_scalar_name(scalar_code);
  info.scalar_size = scalar_size;
  info.expert_kind = reader.str(checkpoint_max_kind_length, "the expert kind");
  const std::int64_t d = reader.i64("d");
  const std::int64_t h = reader.i64("h");
  const std::int64_t experts = reader.i64("E");
  const std::int64_t k = reader.i64("k");
  if (d < 1 || h < 1 || experts < 1 || k < 1 || k > experts) {
    checkpoint_fail(Kind::malformed, context, "expected d, h, E >= 1 and 1 <= k <= E, got d=", d, ", h=", h,
                    ", E=", experts, ", k=", k);
  }
  info.input_dim = static_cast<Index>(d);
  info.hidden_dim = static_cast<Index>(h);
  info.num_experts = static_cast<Index>(experts);
  info.k = static_cast<Index>(k);
  if (version == 1) {
    // Version 1: the noisy top-k gate's ε and seed, then the tensors; no training step.
    info.router_kind = noisy_top_k_kind;
    info.router_options.push_back(RouterOption::real("noise_epsilon", reader.f64("the noise epsilon")));
    info.router_options.push_back(RouterOption::unsigned_integer("noise_seed", reader.u64("the noise seed")));
  } else {
    info.has_training_step = true;
    info.training_step = reader.u64("the training step");
    info.router_kind = reader.str(checkpoint_max_kind_length, "the router kind");
    read_router_options(reader, context, info.router_options);
  }
  info.layer_kind = layer_kind_of(info.router_kind);
  if (info.layer_kind != moe_layer_kind && info.training_step != 0) {
    // The other layer types keep no step and write 0: anything else is not their encoding.
    checkpoint_fail(Kind::malformed, context, "a ", info.layer_kind, " layer's checkpoint records training step 0, got ",
                    info.training_step);
  }
  if (info.router_kind == noisy_top_k_kind) check_noisy_top_k_options(info, context);
  const std::uint64_t tensor_count = reader.u64("the tensor count");
  // Each record takes at least 20 bytes: the count cannot exceed what remains / 20.
  if (tensor_count > reader.remaining() / 20) {
    checkpoint_fail(Kind::malformed, context, "the tensor count ", tensor_count, " cannot fit in the ",
                    reader.remaining(), " bytes left before the checksum");
  }
  info.tensors.reserve(static_cast<std::size_t>(tensor_count));
  parsed.tensor_offsets.reserve(static_cast<std::size_t>(tensor_count));
  for (std::uint64_t i = 0; i < tensor_count; ++i) {
    read_tensor_record(reader, scalar_size, context, info.tensors, parsed.tensor_offsets);
  }
  if (version >= 2) {
    const std::uint64_t state_count = reader.u64("the router state tensor count");
    if (state_count > reader.remaining() / 20) {
      checkpoint_fail(Kind::malformed, context, "the router state tensor count ", state_count, " cannot fit in the ",
                      reader.remaining(), " bytes left before the checksum");
    }
    for (std::uint64_t i = 0; i < state_count; ++i) {
      read_tensor_record(reader, scalar_size, context, info.router_state_tensors, parsed.router_state_tensor_offsets);
    }
  }
  // 6. Optimizer section.
  info.optimizer = reader.str(16, "the optimizer kind");
  std::vector<std::string> expected_state_names;
  if (info.optimizer == "sgd") {
    info.optimizer_step_count = reader.i64("the sgd step count");
    info.sgd_options.learning_rate = reader.f64("the sgd learning rate");
    info.sgd_options.momentum = reader.f64("the sgd momentum");
    info.sgd_options.weight_decay = reader.f64("the sgd weight decay");
    const std::uint32_t nesterov = reader.u32("the sgd nesterov flag");
    if (nesterov > 1) {
      checkpoint_fail(Kind::malformed, context, "expected the sgd nesterov flag 0 or 1, got ", nesterov);
    }
    info.sgd_options.nesterov = nesterov == 1;
    if (!valid_sgd_options(info.sgd_options)) {
      checkpoint_fail(Kind::malformed, context, "invalid sgd hyper-parameters: learning_rate=",
                      info.sgd_options.learning_rate, ", momentum=", info.sgd_options.momentum,
                      ", weight_decay=", info.sgd_options.weight_decay, ", nesterov=", nesterov);
    }
    if (info.optimizer_step_count > 0 && info.sgd_options.momentum > 0.0) {
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("sgd.velocity." + tensor.name);
    }
  } else if (info.optimizer == "adam") {
    info.optimizer_step_count = reader.i64("the adam step count");
    info.adam_options.learning_rate = reader.f64("the adam learning rate");
    info.adam_options.beta1 = reader.f64("the adam beta1");
    info.adam_options.beta2 = reader.f64("the adam beta2");
    info.adam_options.epsilon = reader.f64("the adam epsilon");
    info.adam_options.weight_decay = reader.f64("the adam weight decay");
    if (!valid_adam_options(info.adam_options)) {
      checkpoint_fail(Kind::malformed, context, "invalid adam hyper-parameters: learning_rate=",
                      info.adam_options.learning_rate, ", beta1=", info.adam_options.beta1, ", beta2=",
                      info.adam_options.beta2, ", epsilon=", info.adam_options.epsilon, ", weight_decay=",
                      info.adam_options.weight_decay);
    }
    if (info.optimizer_step_count > 0) {
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("adam.m." + tensor.name);
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("adam.v." + tensor.name);
    }
  } else if (info.optimizer != "none") {
    checkpoint_fail(Kind::malformed, context, "expected the optimizer kind \"none\", \"sgd\" or \"adam\", got \"",
                    info.optimizer, "\"");
  }
  if (info.optimizer != "none") {
    if (info.optimizer_step_count < 0) {
      checkpoint_fail(Kind::malformed, context, "expected a ", info.optimizer, " step count >= 0, got ",
                      info.optimizer_step_count);
    }
    const std::uint64_t state_count = reader.u64("the optimizer state tensor count");
    if (state_count != expected_state_names.size()) {
      checkpoint_fail(Kind::malformed, context, "expected ", expected_state_names.size(), " ", info.optimizer,
                      " state tensors (step count ", info.optimizer_step_count, ", ", info.tensors.size(),
                      " parameter tensors), got ", state_count);
    }
    for (std::size_t i = 0; i < expected_state_names.size(); ++i) {
      read_tensor_record(reader, scalar_size, context, info.optimizer_tensors, parsed.optimizer_tensor_offsets);
      const CheckpointTensorInfo& state = info.optimizer_tensors.back();
      const CheckpointTensorInfo& parameter = info.tensors[i % info.tensors.size()];
      if (state.name != expected_state_names[i]) {
        checkpoint_fail(Kind::malformed, context, "optimizer state tensor ", i, " should be '",
                        expected_state_names[i], "', got '", state.name, "'");
      }
      if (state.rows != parameter.rows || state.cols != parameter.cols) {
        checkpoint_fail(Kind::malformed, context, "optimizer state tensor '", state.name, "' is ", state.rows, "x",
                        state.cols, ", its parameter '", parameter.name, "' is ", parameter.rows, "x",
                        parameter.cols);
      }
    }
  }
  if (reader.remaining() != 0) {
    checkpoint_fail(Kind::malformed, context, "the content ends at offset ", reader.position(), ", ",
                    reader.remaining(), " bytes before the checksum at offset ", body);
  }
  return parsed;
}

/// The parameter names and shapes written for a layer (the optimizer section needs them).
struct WrittenTensor {
  std::string name;
  Index rows;
  Index cols;
};

/// Appends one tensor record.
template <typename Scalar>
void write_tensor_record(CheckpointWriter& writer, const std::string& name, Index rows, Index cols,
                         const Scalar* data) {
  writer.str(name);
  writer.i64(static_cast<std::int64_t>(rows));
  writer.i64(static_cast<std::int64_t>(cols));
  writer.bytes(data, static_cast<std::size_t>(rows * cols) * sizeof(Scalar));
}

/// Copies `count` scalars of a verified payload into a new flat vector.
template <typename Scalar>
Vector<Scalar> payload_vector(const unsigned char* data, std::size_t offset, Index count) {
  Vector<Scalar> vector(count);
  if (count > 0) std::memcpy(vector.data(), data + offset, static_cast<std::size_t>(count) * sizeof(Scalar));
  return vector;
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_FORMAT_HPP
