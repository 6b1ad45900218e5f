// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_LAYER_HPP
#define SPARSEMOE_IO_CHECKPOINT_LAYER_HPP

/// \file checkpoint_layer.hpp
/// The layer side of a checkpoint: the expert kind strings (ExpertKind), writing an MoELayer of
/// any router (header, training step, router kind and options, parameter and router state
/// tensors; the whole file with an optimizer section), checking a parsed file against a target
/// layer, and the validate-then-commit load.

#include "../activation.hpp"
#include "../config.hpp"
#include "../expert.hpp"
#include "../gate.hpp"
#include "../moe_layer.hpp"
#include "../parameters.hpp"
#include "../router/router_kind.hpp"
#include "byte_codec.hpp"
#include "checkpoint_error.hpp"
#include "checkpoint_format.hpp"
#include "checkpoint_optimizer.hpp"
#include "checkpoint_router.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup files
/// @{

/// The expert kind string stored in a checkpoint for expert type `ExpertT`, checked on load.
/// Specialised for Expert<Scalar, Activation> ("expert:" + Activation::name, e.g. "expert:relu")
/// and SwiGluExpert<Scalar> ("swiglu"); specialise it, with a `static std::string name()` that no
/// other expert type returns, to checkpoint a layer of your own expert type.
template <typename ExpertT>
struct ExpertKind {
  static_assert(sizeof(ExpertT) == 0,
                "sparsemoe::ExpertKind is not specialised for this expert type: specialise it to checkpoint it");
  /// The kind name a checkpoint stores.
  static std::string name() { return {}; }
};

/// "expert:" + Activation::name.
template <typename Scalar, typename Activation>
struct ExpertKind<Expert<Scalar, Activation>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return std::string("expert:") + Activation::name; }
};

/// "swiglu".
template <typename Scalar>
struct ExpertKind<SwiGluExpert<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return "swiglu"; }
};

namespace detail {

/// Appends one router state record per view, named router_state_name(prefix, view.name).
template <typename Scalar>
void write_state_records(CheckpointWriter& writer, const char* prefix, const std::vector<TensorView<Scalar>>& views) {
  writer.u64(static_cast<std::uint64_t>(views.size()));
  for (const TensorView<Scalar>& view : views) {
    write_tensor_record(writer, router_state_name(prefix, view.name), view.rows, view.cols, view.data);
  }
}

/// Appends the magic, the format version and a zero total size (patched by finish_checkpoint).
inline void begin_checkpoint(CheckpointWriter& writer) {
  writer.bytes(checkpoint_magic, checkpoint_magic_size);
  writer.u32(checkpoint_format_version);
  writer.u64(0);  // total size, patched by finish_checkpoint
}

/// Patches the total size N into `bytes` (what `writer` wrote since begin_checkpoint) and appends
/// the XXH3-64 of the N − 8 bytes before it.
inline void finish_checkpoint(std::string& bytes, CheckpointWriter& writer) {
  writer.patch_u64(checkpoint_size_offset, static_cast<std::uint64_t>(bytes.size() + checkpoint_checksum_size));
  writer.u64(checkpoint_checksum(bytes.data(), bytes.size()));
}

/// Appends the header fields every version 2 file has after the prefix: scalar code and size,
/// expert kind, d, h, E, k, training step, kind string (RouterKind::name() of an MoELayer's
/// router, or "layer:<kind>" for another layer type) and the typed option records.
template <typename Scalar, typename ExpertT>
void write_layer_header(CheckpointWriter& writer, Index d, Index h, Index experts, Index k, std::uint64_t step,
                        const std::string& kind, const std::vector<RouterOption>& options) {
  writer.u32(checkpoint_scalar_code<Scalar>());
  writer.u32(static_cast<std::uint32_t>(sizeof(Scalar)));
  writer.str(ExpertKind<ExpertT>::name());
  writer.i64(static_cast<std::int64_t>(d));
  writer.i64(static_cast<std::int64_t>(h));
  writer.i64(static_cast<std::int64_t>(experts));
  writer.i64(static_cast<std::int64_t>(k));
  writer.u64(step);
  writer.str(kind);
  writer.u64(static_cast<std::uint64_t>(options.size()));
  for (const RouterOption& option : options) {
    writer.str(option.name);
    writer.u32(static_cast<std::uint32_t>(option.type));
    writer.u64(option.bits);
  }
}

/// Appends one tensor record per view, named `view_prefix` + view.name, and adds each name and
/// shape to `written` (the optimizer section needs them).
template <typename Scalar>
void write_tensor_views(CheckpointWriter& writer, const std::string& view_prefix,
                        const std::vector<TensorView<Scalar>>& views, std::vector<WrittenTensor>& written) {
  for (const TensorView<Scalar>& view : views) {
    written.push_back({view_prefix + view.name, view.rows, view.cols});
    write_tensor_record(writer, written.back().name, view.rows, view.cols, view.data);
  }
}

/// Appends everything of the layer after the fixed prefix (format version 2): the header
/// (write_layer_header), the parameter tensors and the router state tensors; returns the
/// parameters' names and shapes. MoELayer::tensors() and the routers' tensors()/state() are
/// non-const, so the views are taken from copies: the router (`router_copy`, made by the caller),
/// then one expert at a time (extra memory: one expert). Names are those of MoELayer::tensors().
template <typename Scalar, typename ExpertT, typename RouterT>
std::vector<WrittenTensor> write_layer(CheckpointWriter& writer, const MoELayer<Scalar, ExpertT, RouterT>& layer,
                                       RouterT& router_copy) {
  const char* prefix = MoELayer<Scalar, ExpertT, RouterT>::Traits::prefix;
  write_layer_header<Scalar, ExpertT>(writer, layer.input_dim(), layer.hidden_dim(), layer.num_experts(), layer.k(),
                                      layer.training_step(), RouterKind<RouterT>::name(),
                                      RouterKind<RouterT>::options(router_copy));
  const std::size_t count_offset = writer.position();
  writer.u64(0);  // tensor count, patched below
  std::vector<WrittenTensor> written;
  write_tensor_views(writer, prefix, router_copy.tensors(), written);
  for (Index e = 0; e < layer.num_experts(); ++e) {
    ExpertT expert_copy = layer.expert(e);
    write_tensor_views(writer, "expert" + std::to_string(e) + ".", expert_copy.tensors(), written);
  }
  writer.patch_u64(count_offset, static_cast<std::uint64_t>(written.size()));
  write_state_records(writer, prefix, router_state(router_copy));
  return written;
}

/// The number of scalars in `views`.
template <typename Scalar>
Index scalar_count(const std::vector<TensorView<Scalar>>& views) {
  Index count = 0;
  for (const TensorView<Scalar>& view : views) count += view.size();
  return count;
}

/// The whole checkpoint of `layer` (and `optimizer`) as bytes, in format version 2.
template <typename Scalar, typename ExpertT, typename RouterT, typename Optimizer>
std::string serialize(const MoELayer<Scalar, ExpertT, RouterT>& layer, const Optimizer& optimizer,
                      const char* function) {
  RouterT router_copy = layer.router();
  std::string bytes;
  // Reserve the exact payload (parameters, plus their state copies, plus the router state) and a
  // generous allowance for the names and fields, so that the buffer is allocated once.
  const ExpertT& first = layer.expert(0);
  const Index expert_scalars = first.w1().size() + first.b1().size() + first.w2().size() + first.b2().size();
  const Index router_scalars = scalar_count(router_copy.tensors());
  const Index parameter_scalars = router_scalars + layer.num_experts() * expert_scalars;
  const Index state_scalars = scalar_count(router_state(router_copy));
  const Index tensors = 4 + 4 * layer.num_experts();
  bytes.reserve(static_cast<std::size_t>(parameter_scalars * (1 + state_copies(optimizer)) + state_scalars) *
                    sizeof(Scalar) +
                static_cast<std::size_t>(tensors * (1 + state_copies(optimizer)) * 96 + 1024));
  CheckpointWriter writer(bytes);
  begin_checkpoint(writer);
  const std::vector<WrittenTensor> parameters = write_layer(writer, layer, router_copy);
  write_optimizer(writer, parameters, optimizer, function);
  finish_checkpoint(bytes, writer);
  return bytes;
}

/// Throws CheckpointError unless `info` was written for a layer of kind `layer_kind` ("moe" for
/// an MoELayer, else ParadigmCheckpoint::kind: wrong_layer_kind), of scalar type `Scalar`
/// (wrong_scalar_type) and of expert type `ExpertT` (wrong_expert_kind), checked in that order.
template <typename Scalar, typename ExpertT>
void check_layer_identity(const CheckpointInfo& info, const std::string& layer_kind, const std::string& context) {
  using Kind = CheckpointErrorKind;
  if (info.layer_kind != layer_kind) {
    checkpoint_fail(Kind::wrong_layer_kind, context, "expected a checkpoint of layer kind \"", layer_kind,
                    "\" (the layer's: ", layer_kind_class(layer_kind), "), got layer kind \"", info.layer_kind,
                    "\" (", layer_kind_class(info.layer_kind), ")");
  }
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
}

/// Throws CheckpointError(shape_mismatch), naming the first that differs, unless the file's d,
/// h, E and k equal the target layer's `d`, `h`, `experts` and `k`.
inline void check_layer_sizes(const CheckpointInfo& info, Index d, Index h, Index experts, Index k,
                              const std::string& context) {
  const struct {
    const char* name;
    Index file;
    Index target;
  } sizes[] = {{"input_dim (d)", info.input_dim, d},
               {"hidden_dim (h)", info.hidden_dim, h},
               {"num_experts (E)", info.num_experts, experts},
               {"k", info.k, k}};
  for (const auto& item : sizes) {
    if (item.file != item.target) {
      checkpoint_fail(CheckpointErrorKind::shape_mismatch, context, "expected ", item.name, " = ", item.target,
                      " (the layer's), got ", item.file);
    }
  }
}

/// Checks that `parsed` was written for a layer like `layer`: layer kind, scalar type, expert
/// kind, router kind, d, h, E and k. Touches nothing; the router options, tensors and state come
/// after.
template <typename Scalar, typename ExpertT, typename RouterT>
void check_compatible(const ParsedCheckpoint& parsed, const MoELayer<Scalar, ExpertT, RouterT>& layer,
                      const std::string& context) {
  const CheckpointInfo& info = parsed.info;
  check_layer_identity<Scalar, ExpertT>(info, moe_layer_kind, context);
  const std::string router_kind = RouterKind<RouterT>::name();
  if (info.router_kind != router_kind) {
    checkpoint_fail(CheckpointErrorKind::wrong_router_kind, context, "expected router kind \"", router_kind,
                    "\" (the layer's), got \"", info.router_kind, "\"");
  }
  check_layer_sizes(info, layer.input_dim(), layer.hidden_dim(), layer.num_experts(), layer.k(), context);
}

/// The names of `views`, in order.
template <typename Scalar>
std::vector<std::string> tensor_names(const std::vector<TensorView<Scalar>>& views) {
  std::vector<std::string> names;
  names.reserve(views.size());
  for (const TensorView<Scalar>& view : views) names.push_back(view.name);
  return names;
}

/// Throws CheckpointError unless the file's tensors (`file`) have exactly the names of `names`
/// (tensor_mismatch: count or a name) and the shapes of `views` (shape_mismatch). `what` says
/// which list ("parameter tensors", "router state tensors").
template <typename Scalar>
void check_tensor_list(const std::vector<CheckpointTensorInfo>& file, const std::vector<TensorView<Scalar>>& views,
                       const std::vector<std::string>& names, const char* what, const std::string& context) {
  using Kind = CheckpointErrorKind;
  if (file.size() != views.size()) {
    checkpoint_fail(Kind::tensor_mismatch, context, "expected ", views.size(), " ", what, " (the layer's), got ",
                    file.size());
  }
  for (std::size_t i = 0; i < views.size(); ++i) {
    const CheckpointTensorInfo& tensor = file[i];
    if (tensor.name != names[i]) {
      checkpoint_fail(Kind::tensor_mismatch, context, "expected tensor ", i, " to be '", names[i],
                      "' (the layer's), got '", tensor.name, "'");
    }
    if (tensor.rows != views[i].rows || tensor.cols != views[i].cols) {
      checkpoint_fail(Kind::shape_mismatch, context, "tensor '", tensor.name, "': expected ", views[i].rows, "x",
                      views[i].cols, " (the layer's), got ", tensor.rows, "x", tensor.cols);
    }
  }
}

/// Throws CheckpointError(non_finite_value) naming the first of `tensors` (payloads at `offsets`
/// in `data`, verified) that holds a NaN or an infinity: such weights would spread to every
/// output. O(their size).
template <typename Scalar>
void check_finite_tensors(const unsigned char* data, const std::vector<CheckpointTensorInfo>& tensors,
                          const std::vector<std::size_t>& offsets, const std::string& context) {
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const CheckpointTensorInfo& tensor = tensors[i];
    const unsigned char* values = data + offsets[i];
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

/// Copies the verified payloads at `offsets` into `views` (shapes already checked). No-throw.
template <typename Scalar>
void copy_payloads(const unsigned char* data, const std::vector<std::size_t>& offsets,
                   const std::vector<TensorView<Scalar>>& views, std::size_t first_view, std::size_t first_offset,
                   std::size_t count) noexcept {
  for (std::size_t i = 0; i < count; ++i) {
    const TensorView<Scalar>& view = views[first_view + i];
    const auto scalars = static_cast<std::size_t>(view.size());
    if (scalars > 0) std::memcpy(view.data, data + offsets[first_offset + i], scalars * sizeof(Scalar));
  }
}

/// Parses, validates against `layer` (and `optimizer`), then copies in. Nothing is modified
/// unless every check passed; the commit itself cannot fail (memcpy, a no-throw router move and
/// an atomic store). Check order: integrity and structure (parse_checkpoint), scalar type, expert
/// kind, router kind, d/h/E/k, router options, parameter tensor names and shapes, router state
/// tensor names and shapes, optimizer section, finiteness.
template <typename Scalar, typename ExpertT, typename RouterT, typename Optimizer>
void deserialize(const void* data, std::size_t size, MoELayer<Scalar, ExpertT, RouterT>& layer, Optimizer& optimizer,
                 const std::string& context, const CheckpointLoadOptions& options) {
  static_assert(std::is_nothrow_move_assignable<RouterT>::value,
                "the checkpoint commit relies on a no-throw move assignment of the router");
  const char* prefix = MoELayer<Scalar, ExpertT, RouterT>::Traits::prefix;
  require(data != nullptr || size == 0, context.c_str(), "data is a null pointer but size is ", size);
  static const unsigned char empty = 0;
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  const ParsedCheckpoint parsed = parse_checkpoint(bytes, size, context);
  const CheckpointInfo& info = parsed.info;
  check_compatible(parsed, layer, context);
  // The router that will be installed: a copy of the layer's (or, for NoisyTopKGate, a gate with
  // the file's ε and seed), after the option check. Everything that may allocate happens before
  // the first modification.
  RouterT staged = stage_router(static_cast<const RouterT&>(layer.router()), info, context);
  const std::vector<TensorView<Scalar>> views = layer.tensors();
  check_tensor_list(info.tensors, views, tensor_names(views), "parameter tensors", context);
  const std::vector<TensorView<Scalar>> router_views = staged.tensors();
  const std::vector<TensorView<Scalar>> state_views = router_state(staged);
  std::vector<std::string> state_names;
  state_names.reserve(state_views.size());
  for (const TensorView<Scalar>& view : state_views) state_names.push_back(router_state_name(prefix, view.name));
  check_tensor_list(info.router_state_tensors, state_views, state_names, "router state tensors", context);
  check_optimizer_kind(parsed, optimizer, context);
  if (!options.allow_non_finite) {
    check_finite_tensors<Scalar>(bytes, info.tensors, parsed.tensor_offsets, context);
    check_finite_tensors<Scalar>(bytes, info.router_state_tensors, parsed.router_state_tensor_offsets, context);
  }
  restore_optimizer(bytes, parsed, views, optimizer, context);  // strong guarantee; may throw only before it commits
  // Commit: no-throw from here on. The router's tensors go into the staged router (the first
  // router_views.size() of the layer's views name the same tensors), the experts' into the layer.
  const std::size_t router_count = router_views.size();
  copy_payloads(bytes, parsed.tensor_offsets, router_views, 0, 0, router_count);
  copy_payloads(bytes, parsed.tensor_offsets, views, router_count, router_count, views.size() - router_count);
  copy_payloads(bytes, parsed.router_state_tensor_offsets, state_views, 0, 0, state_views.size());
  layer.router() = std::move(staged);
  if (info.has_training_step) layer.set_training_step(info.training_step);
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_LAYER_HPP
