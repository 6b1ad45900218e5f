// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_PARADIGM_HPP
#define SPARSEMOE_IO_CHECKPOINT_PARADIGM_HPP

/// \file checkpoint_paradigm.hpp
/// Checkpoints of the layer types other than MoELayer: ExpertChoiceLayer, HashMoELayer,
/// SoftMoELayer and HierarchicalMoELayer. Each is described by a ParadigmCheckpoint
/// specialisation (its kind, its header k, the options that define it, and for the hash layer
/// its id → experts table); one writer and one validate-then-commit loader serve all four.
///
/// The files are format version 2 files (checkpoint.hpp): the kind string holds "layer:" + the
/// layer kind ("layer:expert_choice", "layer:hash", "layer:soft_moe", "layer:hierarchical"),
/// the option records hold the layer's defining options, the parameter tensors are the layer's
/// tensors() with their names, and the router state section holds the hash layer's table (or
/// nothing). docs/checkpoint-format.md lists every layer's fields.

#include "../config.hpp"
#include "../expert_choice.hpp"
#include "../gate.hpp"
#include "../hash_layer.hpp"
#include "../hierarchical_moe.hpp"
#include "../parameters.hpp"
#include "../router/router_kind.hpp"
#include "../soft_moe.hpp"
#include "byte_codec.hpp"
#include "checkpoint_error.hpp"
#include "checkpoint_format.hpp"
#include "checkpoint_layer.hpp"
#include "checkpoint_optimizer.hpp"
#include "checkpoint_router.hpp"

#include <algorithm>
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

namespace detail {

/// What the four layer types share by default (`Traits` is the ParadigmCheckpoint
/// specialisation that derives from it): no router state section, and options that must equal
/// the target's bit for bit.
template <typename Traits>
struct ParadigmCheckpointDefaults {
  /// Whether the layer type has a checkpoint: true for every specialisation built on this.
  static constexpr bool supported = true;

  /// Checks that the file's options (`info.router_options`) equal Traits::options(staged) name by
  /// name and bit by bit (router_option_mismatch otherwise); restores nothing.
  template <typename LayerT>
  static void stage_options(LayerT& staged, const CheckpointInfo& info, const std::string& context) {
    check_router_options(info.router_options, Traits::options(staged), info.layer_kind, true, context, "layer");
  }

  /// Appends an empty router state section (a count of 0).
  template <typename LayerT>
  static void write_state(CheckpointWriter& writer, const LayerT&) {
    writer.u64(0);
  }

  /// Throws CheckpointError(tensor_mismatch) unless the file's router state section is empty.
  template <typename LayerT>
  static void stage_state(LayerT&, const unsigned char*, const ParsedCheckpoint& parsed, const std::string& context) {
    if (!parsed.info.router_state_tensors.empty()) {
      checkpoint_fail(CheckpointErrorKind::tensor_mismatch, context, "expected no router state tensors (the ",
                      parsed.info.layer_kind, " layer has none), got ", parsed.info.router_state_tensors.size(),
                      ", the first '", parsed.info.router_state_tensors.front().name, "'");
    }
  }
};

/// A layer type's checkpoint description; specialised below for ExpertChoiceLayer,
/// HashMoELayer, SoftMoELayer and HierarchicalMoELayer (`supported` is true there). Members of a
/// specialisation: `kind` (the layer kind), `k(layer)` (the header's k), `options(layer)` (the
/// typed options that define the layer), `stage_options(staged, info, context)` (check the
/// file's options against the staged copy, restoring those that a load restores),
/// `write_state(writer, layer)` and `stage_state(staged, data, parsed, context)` (the router
/// state section); `supported` comes from ParadigmCheckpointDefaults.
template <typename LayerT>
struct ParadigmCheckpoint {
  /// Whether LayerT has a checkpoint of this kind.
  static constexpr bool supported = false;
};

/// ExpertChoiceLayer: kind "expert_choice"; k = E (a token may reach every expert); options
/// capacity_factor (real) and capacity (integer, 0 when unset), both compared. The router's
/// weight is the tensor "router.weight".
template <typename Scalar, typename ExpertT>
struct ParadigmCheckpoint<ExpertChoiceLayer<Scalar, ExpertT>>
    : ParadigmCheckpointDefaults<ParadigmCheckpoint<ExpertChoiceLayer<Scalar, ExpertT>>> {
  /// The layer kind.
  static constexpr const char* kind = "expert_choice";
  /// The layer type.
  using Layer = ExpertChoiceLayer<Scalar, ExpertT>;
  /// The header's k: E.
  static Index k(const Layer& layer) { return layer.num_experts(); }
  /// The router's capacity options.
  static std::vector<RouterOption> options(const Layer& layer) {
    const ExpertChoiceRouterOptions& options = layer.router().options();
    return {RouterOption::real("capacity_factor", options.capacity_factor),
            RouterOption::integer("capacity", options.capacity ? static_cast<std::int64_t>(*options.capacity) : 0)};
  }
};

/// HashMoELayer: kind "hash"; k = the router's k; option hash_seed (unsigned, compared). With a
/// table (HashRouter::set_table), the router state section holds it as "router.state.table", a
/// V×k tensor of expert ids stored as Scalar values (exact: ids are < E ≤ 2^24); without one the
/// section is empty. A load installs the file's table, or clears the target's when there is none.
template <typename Scalar, typename ExpertT>
struct ParadigmCheckpoint<HashMoELayer<Scalar, ExpertT>>
    : ParadigmCheckpointDefaults<ParadigmCheckpoint<HashMoELayer<Scalar, ExpertT>>> {
  /// The layer kind.
  static constexpr const char* kind = "hash";
  /// The layer type.
  using Layer = HashMoELayer<Scalar, ExpertT>;
  /// The name of the table's state tensor.
  static constexpr const char* table_name = "router.state.table";
  /// The header's k: experts per token.
  static Index k(const Layer& layer) { return layer.k(); }
  /// The hash seed.
  static std::vector<RouterOption> options(const Layer& layer) {
    return {RouterOption::unsigned_integer("hash_seed", layer.router().options().seed)};
  }
  /// Appends the table (V×k expert ids as Scalar values), or an empty section without a table.
  static void write_state(CheckpointWriter& writer, const Layer& layer) {
    const IndexMatrix& table = layer.router().table();
    writer.u64(table.size() > 0 ? 1u : 0u);
    if (table.size() == 0) return;
    // Row-major like every tensor record: row v holds the k experts of id v.
    Matrix<Scalar> values = table.template cast<Scalar>();
    write_tensor_record(writer, table_name, values.rows(), values.cols(), values.data());
  }
  /// Installs the file's table into `staged` (or clears it), after checking that it is a V×k
  /// tensor of integer ids in [0, E), distinct in each row (malformed otherwise, naming the row).
  static void stage_state(Layer& staged, const unsigned char* data, const ParsedCheckpoint& parsed,
                          const std::string& context) {
    using Kind = CheckpointErrorKind;
    const std::vector<CheckpointTensorInfo>& state = parsed.info.router_state_tensors;
    if (state.empty()) {
      staged.router().set_table(IndexMatrix());
      return;
    }
    if (state.size() != 1 || state.front().name != table_name) {
      checkpoint_fail(Kind::tensor_mismatch, context, "expected no router state tensor or only '", table_name,
                      "', got ", state.size(), " starting with '", state.front().name, "'");
    }
    const Index k = staged.k();
    const Index experts = staged.num_experts();
    const CheckpointTensorInfo& tensor = state.front();
    if (tensor.cols != k || tensor.rows < 1) {
      checkpoint_fail(Kind::shape_mismatch, context, "tensor '", table_name, "': expected V×", k,
                      " with V >= 1 (the layer's k), got ", tensor.rows, "x", tensor.cols);
    }
    IndexMatrix table(tensor.rows, k);
    const unsigned char* values = data + parsed.router_state_tensor_offsets.front();
    for (Index row = 0; row < tensor.rows; ++row) {
      for (Index slot = 0; slot < k; ++slot) {
        Scalar value;
        std::memcpy(&value, values + static_cast<std::size_t>(row * k + slot) * sizeof(Scalar), sizeof(Scalar));
        // −0 is refused too: it would load as expert 0 and save as +0 (one state, one encoding).
        if (!(value >= Scalar(0) && !std::signbit(value) && value < static_cast<Scalar>(experts) &&
              std::floor(value) == value)) {
          checkpoint_fail(Kind::malformed, context, "tensor '", table_name, "' row ", row, " holds ", value,
                          ", expected an expert id in [0, ", experts, ")");
        }
        table(row, slot) = static_cast<Index>(value);
        for (Index earlier = 0; earlier < slot; ++earlier) {
          if (table(row, earlier) == table(row, slot)) {
            checkpoint_fail(Kind::malformed, context, "tensor '", table_name, "' row ", row, " names expert ",
                            table(row, slot), " twice");
          }
        }
      }
    }
    staged.router().set_table(std::move(table));  // validated above: cannot throw but bad_alloc
  }
};

/// SoftMoELayer: kind "soft_moe"; k = E (every token reaches every expert through the slots);
/// options slots_per_expert (integer) and normalize (flag), both compared. Tensors "phi", "scale"
/// (normalised layers only), then the experts'.
template <typename Scalar, typename ExpertT>
struct ParadigmCheckpoint<SoftMoELayer<Scalar, ExpertT>>
    : ParadigmCheckpointDefaults<ParadigmCheckpoint<SoftMoELayer<Scalar, ExpertT>>> {
  /// The layer kind.
  static constexpr const char* kind = "soft_moe";
  /// The layer type.
  using Layer = SoftMoELayer<Scalar, ExpertT>;
  /// The header's k: E.
  static Index k(const Layer& layer) { return layer.num_experts(); }
  /// Slots per expert and whether the layer normalises.
  static std::vector<RouterOption> options(const Layer& layer) {
    return {RouterOption::integer("slots_per_expert", static_cast<std::int64_t>(layer.slots_per_expert())),
            RouterOption::flag("normalize", layer.normalized())};
  }
};

/// HierarchicalMoELayer: kind "hierarchical"; k = k_p·k_s (experts per token); options
/// num_groups, k_groups, k_per_group (integers, compared), then noise_epsilon (real: the gates'
/// Scalar ε widened to double), primary.noise_seed and group<i>.noise_seed for each group
/// (unsigned), restored like an MoELayer's noisy gate's. Tensors "primary.gate_weight",
/// "primary.noise_weight", "group<i>.gate_weight", "group<i>.noise_weight", then the experts'.
template <typename Scalar, typename ExpertT>
struct ParadigmCheckpoint<HierarchicalMoELayer<Scalar, ExpertT>>
    : ParadigmCheckpointDefaults<ParadigmCheckpoint<HierarchicalMoELayer<Scalar, ExpertT>>> {
  /// The layer kind.
  static constexpr const char* kind = "hierarchical";
  /// The layer type.
  using Layer = HierarchicalMoELayer<Scalar, ExpertT>;
  /// The number of leading options that must equal the target's (the sizes).
  static constexpr std::size_t compared_options = 3;
  /// The header's k: k_p·k_s.
  static Index k(const Layer& layer) { return layer.k_groups() * layer.k_per_group(); }
  /// The sizes, the gates' ε and every gate's noise seed.
  static std::vector<RouterOption> options(const Layer& layer) {
    std::vector<RouterOption> list = {
        RouterOption::integer("num_groups", static_cast<std::int64_t>(layer.num_groups())),
        RouterOption::integer("k_groups", static_cast<std::int64_t>(layer.k_groups())),
        RouterOption::integer("k_per_group", static_cast<std::int64_t>(layer.k_per_group())),
        RouterOption::real("noise_epsilon", static_cast<double>(layer.primary_gate().noise_epsilon())),
        RouterOption::unsigned_integer("primary.noise_seed", layer.primary_gate().noise_seed())};
    for (Index i = 0; i < layer.num_groups(); ++i) {
      list.push_back(RouterOption::unsigned_integer("group" + std::to_string(i) + ".noise_seed",
                                                    layer.secondary_gate(i).noise_seed()));
    }
    return list;
  }
  /// Compares the sizes, then gives every gate of `staged` the file's ε and noise seed (new gates
  /// of the same shapes; their weights come from the file next).
  static void stage_options(Layer& staged, const CheckpointInfo& info, const std::string& context) {
    const std::vector<RouterOption> target = options(staged);
    // The sizes first (so that another num_groups is named as such), then the whole list.
    const auto sizes = static_cast<std::ptrdiff_t>(std::min(compared_options, info.router_options.size()));
    check_router_options({info.router_options.begin(), info.router_options.begin() + sizes},
                         {target.begin(), target.begin() + sizes}, info.layer_kind, true, context, "layer");
    check_router_options(info.router_options, target, info.layer_kind, false, context, "layer");
    const Scalar epsilon = checked_noise_epsilon<Scalar>(info.router_options[compared_options].as_real(), context);
    const auto restage = [&](NoisyTopKGate<Scalar>& gate, std::uint64_t seed) {
      NoisyTopKGate<Scalar> fresh(gate.input_dim(), gate.num_experts(), gate.k(), epsilon, seed);
      fresh.set_check_finite(gate.check_finite());
      gate = std::move(fresh);
    };
    restage(staged.primary_gate(), info.router_options[compared_options + 1].bits);
    for (Index i = 0; i < staged.num_groups(); ++i) {
      restage(staged.secondary_gate(i), info.router_options[compared_options + 2 + static_cast<std::size_t>(i)].bits);
    }
  }
};

/// Whether LayerT is one of the layer types of this file.
template <typename LayerT>
inline constexpr bool is_paradigm_layer = ParadigmCheckpoint<LayerT>::supported;

/// Enables a public checkpoint overload for the layer types of this file only.
template <typename LayerT>
using EnableIfParadigmLayer = std::enable_if_t<is_paradigm_layer<LayerT>, int>;

/// The whole checkpoint of `layer` (ExpertChoiceLayer, HashMoELayer, SoftMoELayer,
/// HierarchicalMoELayer) and `optimizer` as bytes, in format version 2. tensors() is non-const,
/// so the views are taken from a copy of the layer (extra memory: one layer).
template <typename LayerT, typename Optimizer>
std::string serialize_paradigm(const LayerT& layer, const Optimizer& optimizer, const char* function) {
  using Scalar = typename LayerT::Scalar;
  using Traits = ParadigmCheckpoint<LayerT>;
  LayerT copy = layer;
  const std::vector<TensorView<Scalar>> views = copy.tensors();
  const std::vector<RouterOption> options = Traits::options(layer);
  require(options.size() <= checkpoint_max_router_options, function, "the layer has ", options.size(),
          " options (e.g. one noise seed per group), a checkpoint holds at most ", checkpoint_max_router_options);
  const auto copies = static_cast<std::size_t>(1 + state_copies(optimizer));
  std::string bytes;
  bytes.reserve(static_cast<std::size_t>(scalar_count(views)) * sizeof(Scalar) * copies +
                views.size() * copies * 96 + options.size() * 48 + 1024);
  CheckpointWriter writer(bytes);
  begin_checkpoint(writer);
  write_layer_header<Scalar, typename LayerT::ExpertType>(
      writer, layer.input_dim(), layer.hidden_dim(), layer.num_experts(), Traits::k(layer), 0,
      std::string(layer_kind_prefix) + Traits::kind, options);
  writer.u64(static_cast<std::uint64_t>(views.size()));
  std::vector<WrittenTensor> written;
  write_tensor_views(writer, "", views, written);
  Traits::write_state(writer, layer);
  write_optimizer(writer, written, optimizer, function);
  finish_checkpoint(bytes, writer);
  return bytes;
}

/// Parses, validates against `layer` (and `optimizer`), then commits. Everything is checked and
/// filled into a staged copy of the layer first; the optimizer's restore_state has the strong
/// guarantee; the commit is a no-throw move assignment of the copy into `layer` (so views taken
/// from `layer` before a load no longer point into it). Check order: integrity and structure,
/// layer kind, scalar type, expert kind, d/h/E/k, options, parameter tensor names and shapes,
/// optimizer section, finiteness, router state (the hash table). Memory: one copy of the layer.
template <typename LayerT, typename Optimizer>
void deserialize_paradigm(const void* data, std::size_t size, LayerT& layer, Optimizer& optimizer,
                          const std::string& context, const CheckpointLoadOptions& options) {
  static_assert(std::is_nothrow_move_assignable<LayerT>::value,
                "the checkpoint commit relies on a no-throw move assignment of the layer");
  using Scalar = typename LayerT::Scalar;
  using Traits = ParadigmCheckpoint<LayerT>;
  require(data != nullptr || size == 0, context.c_str(), "data is a null pointer but size is ", size);
  static const unsigned char empty = 0;
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  const ParsedCheckpoint parsed = parse_checkpoint(bytes, size, context);
  const CheckpointInfo& info = parsed.info;
  check_layer_identity<Scalar, typename LayerT::ExpertType>(info, Traits::kind, context);
  check_layer_sizes(info, layer.input_dim(), layer.hidden_dim(), layer.num_experts(), Traits::k(layer), context);
  LayerT staged = layer;
  Traits::stage_options(staged, info, context);
  const std::vector<TensorView<Scalar>> views = staged.tensors();
  check_tensor_list(info.tensors, views, tensor_names(views), "parameter tensors", context);
  check_optimizer_kind(parsed, optimizer, context);
  if (!options.allow_non_finite) check_finite_tensors<Scalar>(bytes, info.tensors, parsed.tensor_offsets, context);
  copy_payloads(bytes, parsed.tensor_offsets, views, 0, 0, views.size());
  Traits::stage_state(staged, bytes, parsed, context);
  restore_optimizer(bytes, parsed, views, optimizer, context);  // strong guarantee; may throw only before it commits
  layer = std::move(staged);                                     // no-throw
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_PARADIGM_HPP
