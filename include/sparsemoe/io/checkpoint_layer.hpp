// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_LAYER_HPP
#define SPARSEMOE_IO_CHECKPOINT_LAYER_HPP

/// \file checkpoint_layer.hpp
/// The layer side of a checkpoint: the expert kind strings (ExpertKind), writing an MoELayer's
/// header and parameter tensors (and the whole file, with an optimizer section), checking a
/// parsed file against a target layer, and the validate-then-commit load.

#include "../activation.hpp"
#include "../config.hpp"
#include "../expert.hpp"
#include "../gate.hpp"
#include "../moe_layer.hpp"
#include "../parameters.hpp"
#include "byte_codec.hpp"
#include "checkpoint_error.hpp"
#include "checkpoint_format.hpp"
#include "checkpoint_optimizer.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsemoe {

/// The expert kind string stored in a checkpoint for expert type `ExpertT`, checked on load.
/// Specialised for Expert<Scalar, Activation> ("expert:" + Activation::name, e.g. "expert:relu")
/// and SwiGluExpert<Scalar> ("swiglu"); specialise it, with a `static std::string name()` that no
/// other expert type returns, to checkpoint a layer of your own expert type.
template <typename ExpertT>
struct ExpertKind {
  static_assert(sizeof(ExpertT) == 0,
                "sparsemoe::ExpertKind is not specialised for this expert type: specialise it to checkpoint it");
  static std::string name() { return {}; }
};

/// "expert:" + Activation::name.
template <typename Scalar, typename Activation>
struct ExpertKind<Expert<Scalar, Activation>> {
  static std::string name() { return std::string("expert:") + Activation::name; }
};

/// "swiglu".
template <typename Scalar>
struct ExpertKind<SwiGluExpert<Scalar>> {
  static std::string name() { return "swiglu"; }
};

namespace detail {

/// Appends the layer's header fields and parameter tensors; returns their names and shapes.
/// MoELayer::tensors() is non-const, so the views are taken from copies: the gate, then one
/// expert at a time (extra memory: one expert). Names are those of MoELayer::tensors().
template <typename Scalar, typename ExpertT>
std::vector<WrittenTensor> write_layer(CheckpointWriter& writer, const MoELayer<Scalar, ExpertT>& layer) {
  const NoisyTopKGate<Scalar>& gate = layer.gate();
  writer.u32(checkpoint_scalar_code<Scalar>());
  writer.u32(static_cast<std::uint32_t>(sizeof(Scalar)));
  writer.str(ExpertKind<ExpertT>::name());
  writer.i64(static_cast<std::int64_t>(layer.input_dim()));
  writer.i64(static_cast<std::int64_t>(layer.hidden_dim()));
  writer.i64(static_cast<std::int64_t>(layer.num_experts()));
  writer.i64(static_cast<std::int64_t>(layer.k()));
  writer.f64(static_cast<double>(gate.noise_epsilon()));
  writer.u64(gate.noise_seed());
  const std::size_t count_offset = writer.position();
  writer.u64(0);  // tensor count, patched below
  std::vector<WrittenTensor> written;
  const auto write_views = [&](const std::string& prefix, const std::vector<TensorView<Scalar>>& views) {
    for (const TensorView<Scalar>& view : views) {
      written.push_back({prefix + view.name, view.rows, view.cols});
      write_tensor_record(writer, written.back().name, view.rows, view.cols, view.data);
    }
  };
  {
    NoisyTopKGate<Scalar> gate_copy = gate;
    write_views("gate.", gate_copy.tensors());
  }
  for (Index e = 0; e < layer.num_experts(); ++e) {
    ExpertT expert_copy = layer.expert(e);
    write_views("expert" + std::to_string(e) + ".", expert_copy.tensors());
  }
  writer.patch_u64(count_offset, static_cast<std::uint64_t>(written.size()));
  return written;
}

/// The whole checkpoint of `layer` (and `optimizer`) as bytes.
template <typename Scalar, typename ExpertT, typename Optimizer>
std::string serialize(const MoELayer<Scalar, ExpertT>& layer, const Optimizer& optimizer, const char* function) {
  std::string bytes;
  // Reserve the exact payload (parameters, plus their state copies) and a generous allowance for
  // the names and fields, so that the buffer is allocated once.
  const ExpertT& first = layer.expert(0);
  const Index expert_scalars = first.w1().size() + first.b1().size() + first.w2().size() + first.b2().size();
  const Index parameter_scalars = 2 * layer.input_dim() * layer.num_experts() + layer.num_experts() * expert_scalars;
  const Index tensors = 2 + 4 * layer.num_experts();
  bytes.reserve(static_cast<std::size_t>(parameter_scalars * (1 + state_copies(optimizer))) * sizeof(Scalar) +
                static_cast<std::size_t>(tensors * (1 + state_copies(optimizer)) * 96 + 256));
  CheckpointWriter writer(bytes);
  writer.bytes(checkpoint_magic, checkpoint_magic_size);
  writer.u32(checkpoint_format_version);
  writer.u64(0);  // total size, patched below
  const std::vector<WrittenTensor> parameters = write_layer(writer, layer);
  write_optimizer(writer, parameters, optimizer, function);
  writer.patch_u64(checkpoint_size_offset, static_cast<std::uint64_t>(bytes.size() + checkpoint_checksum_size));
  writer.u64(checkpoint_checksum(bytes.data(), bytes.size()));
  return bytes;
}

/// Checks that `parsed` fits `layer` (scalar type, expert kind, d, h, E, k, ε representable,
/// tensor count, names and shapes against `views` = layer.tensors()). Touches nothing.
template <typename Scalar, typename ExpertT>
void check_compatible(const ParsedCheckpoint& parsed, const MoELayer<Scalar, ExpertT>& layer,
                      const std::vector<TensorView<Scalar>>& views, const std::string& context) {
  using Kind = CheckpointErrorKind;
  const CheckpointInfo& info = parsed.info;
  const std::string layer_scalar = checkpoint_scalar_name(checkpoint_scalar_code<Scalar>());
  if (info.scalar_type != layer_scalar) {
    checkpoint_fail(Kind::wrong_scalar_type, context, "expected ", layer_scalar, " tensors (the layer's Scalar), got ",
                    info.scalar_type);
  }
  const std::string kind = ExpertKind<ExpertT>::name();
  if (info.expert_kind != kind) {
    checkpoint_fail(Kind::wrong_expert_kind, context, "expected expert kind \"", kind, "\" (the layer's), got \"",
                    info.expert_kind, "\"");
  }
  const struct {
    const char* name;
    Index file;
    Index target;
  } sizes[] = {{"input_dim (d)", info.input_dim, layer.input_dim()},
               {"hidden_dim (h)", info.hidden_dim, layer.hidden_dim()},
               {"num_experts (E)", info.num_experts, layer.num_experts()},
               {"k", info.k, layer.k()}};
  for (const auto& item : sizes) {
    if (item.file != item.target) {
      checkpoint_fail(Kind::shape_mismatch, context, "expected ", item.name, " = ", item.target,
                      " (the layer's), got ", item.file);
    }
  }
  const auto epsilon = static_cast<Scalar>(info.noise_epsilon);
  if (!(std::isfinite(epsilon) && epsilon > Scalar(0) && static_cast<double>(epsilon) == info.noise_epsilon)) {
    checkpoint_fail(Kind::malformed, context, "the noise epsilon ", info.noise_epsilon, " is not exactly a finite ",
                    layer_scalar, " > 0");
  }
  if (info.tensors.size() != views.size()) {
    checkpoint_fail(Kind::tensor_mismatch, context, "expected ", views.size(), " parameter tensors (the layer's), got ",
                    info.tensors.size());
  }
  for (std::size_t i = 0; i < views.size(); ++i) {
    const CheckpointTensorInfo& tensor = info.tensors[i];
    if (tensor.name != views[i].name) {
      checkpoint_fail(Kind::tensor_mismatch, context, "expected tensor ", i, " to be '", views[i].name,
                      "' (the layer's), got '", tensor.name, "'");
    }
    if (tensor.rows != views[i].rows || tensor.cols != views[i].cols) {
      checkpoint_fail(Kind::shape_mismatch, context, "tensor '", tensor.name, "': expected ", views[i].rows, "x",
                      views[i].cols, " (the layer's), got ", tensor.rows, "x", tensor.cols);
    }
  }
}

/// Throws CheckpointError(non_finite_value) naming the first parameter tensor of a verified
/// checkpoint that holds a NaN or an infinity: such weights would spread to every output. O(size).
template <typename Scalar>
void check_finite_tensors(const unsigned char* data, const ParsedCheckpoint& parsed, const std::string& context) {
  for (std::size_t i = 0; i < parsed.info.tensors.size(); ++i) {
    const CheckpointTensorInfo& tensor = parsed.info.tensors[i];
    const unsigned char* values = data + parsed.tensor_offsets[i];
    const auto count = static_cast<std::size_t>(tensor.rows * tensor.cols);
    for (std::size_t j = 0; j < count; ++j) {
      Scalar value;
      std::memcpy(&value, values + j * sizeof(Scalar), sizeof(Scalar));
      if (!std::isfinite(value)) {
        checkpoint_fail(CheckpointErrorKind::non_finite_value, context, "tensor '", tensor.name, "' holds ", value,
                        " at flat index ", j);
      }
    }
  }
}

/// Parses, validates against `layer` (and `optimizer`), then copies in. Nothing is modified
/// unless every check passed; the commit itself cannot fail (moves, swaps and memcpy).
template <typename Scalar, typename ExpertT, typename Optimizer>
void deserialize(const void* data, std::size_t size, MoELayer<Scalar, ExpertT>& layer, Optimizer& optimizer,
                 const std::string& context, const CheckpointLoadOptions& options) {
  static_assert(std::is_nothrow_move_assignable<NoisyTopKGate<Scalar>>::value,
                "the checkpoint commit relies on a no-throw gate move");
  require(data != nullptr || size == 0, context.c_str(), "data is a null pointer but size is ", size);
  static const unsigned char empty = 0;
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  const ParsedCheckpoint parsed = parse_checkpoint(bytes, size, context);
  std::vector<TensorView<Scalar>> views = layer.tensors();
  check_compatible(parsed, layer, views, context);
  check_optimizer_kind(parsed, optimizer, context);
  if (!options.allow_non_finite) check_finite_tensors<Scalar>(bytes, parsed, context);
  // Everything that may allocate happens before the first modification.
  NoisyTopKGate<Scalar> gate(layer.input_dim(), layer.num_experts(), layer.k(),
                             static_cast<Scalar>(parsed.info.noise_epsilon), parsed.info.noise_seed);
  gate.set_check_finite(layer.gate().check_finite());
  restore_optimizer(bytes, parsed, views, optimizer, context);  // strong guarantee; may throw only before it commits
  // Commit: no-throw from here on.
  for (std::size_t i = 0; i < views.size(); ++i) {
    const auto count = static_cast<std::size_t>(views[i].size());
    if (count > 0) std::memcpy(views[i].data, bytes + parsed.tensor_offsets[i], count * sizeof(Scalar));
  }
  // Give the loaded weights to the new gate (it carries the file's ε and seed), then install it.
  gate.gate_weight().swap(layer.gate().gate_weight());
  gate.noise_weight().swap(layer.gate().noise_weight());
  layer.gate() = std::move(gate);
}

}  // namespace detail

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_LAYER_HPP
