// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISTRIBUTED_CHECKPOINT_HPP
#define SPARSEMOE_DISTRIBUTED_CHECKPOINT_HPP

/// \file distributed/checkpoint.hpp
/// Sharded checkpoints of DistributedMoELayer in Hugging Face's safetensors layout: each of the
/// P ranks writes one shard with its own experts (rank 0 also the replicated router, its state and
/// the shared expert), rank 0 writes `<prefix>.index.json` (weight_map tensor → shard file, as a
/// model.safetensors.index.json), and a loader re-shards the files onto any number Q of ranks, or
/// into one single-process MoELayer. Included by distributed.hpp when nlohmann/json (the
/// safetensors reader) and xxhash.h (the checksum of the checkpoints, Debian libxxhash-dev) are
/// available.

#include "../distributed.hpp"
#include "../expert.hpp"
#include "../io/checkpoint_layer.hpp"
#include "../io/file.hpp"
#include "../io/safetensors.hpp"
#include "../moe_layer.hpp"
#include "../router/router_kind.hpp"

#include <mpi.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace sparsemoe {

/// \addtogroup distributed
/// @{

namespace detail {

/// The metadata every distributed checkpoint of `layer` (a DistributedMoELayer or an MoELayer)
/// records, and that a loader requires to be equal: format, dtype, d, h, E, k, the shared expert
/// and its gate, the router's kind and options (RouterKind), the expert kind (ExpertKind).
template <typename Layer>
std::map<std::string, std::string> distributed_checkpoint_identity(const Layer& layer) {
  using RouterT = typename Layer::RouterType;
  std::string options;
  for (const RouterOption& option : RouterKind<RouterT>::options(layer.router())) {
    options += option.name + "=" + option.value_text() + ";";
  }
  return {{"format", "sparsemoe.distributed.1"},
          {"dtype", std::is_same<typename Layer::Scalar, float>::value ? "F32" : "F64"},
          {"input_dim", std::to_string(layer.input_dim())},
          {"hidden_dim", std::to_string(layer.hidden_dim())},
          {"num_experts", std::to_string(layer.num_experts())},
          {"k", std::to_string(layer.k())},
          {"shared_hidden_dim", std::to_string(layer.has_shared_expert() ? layer.shared_expert().hidden_dim() : 0)},
          {"shared_expert_gate", layer.shared_expert_gate().size() > 0 ? "1" : "0"},
          {"router_kind", RouterKind<RouterT>::name()},
          {"router_options", options},
          {"expert_kind", ExpertKind<typename Layer::ExpertType>::name()}};
}

/// The safetensors shape of a view: [rows] for a column (vectors), else [rows, cols].
template <typename Scalar>
std::vector<std::uint64_t> checkpoint_shape(const TensorView<Scalar>& view) {
  if (view.cols == 1) return {static_cast<std::uint64_t>(view.rows)};
  return {static_cast<std::uint64_t>(view.rows), static_cast<std::uint64_t>(view.cols)};
}

/// The router's tensors (under Traits::prefix), its state (under prefix + "state."), then the
/// given expert tensors: the list a checkpoint stores and a loader fills.
template <typename RouterT, typename Scalar>
std::vector<TensorView<Scalar>> checkpoint_views(RouterT& router, std::vector<TensorView<Scalar>> parameters) {
  std::vector<TensorView<Scalar>> views = std::move(parameters);
  append_tensor_views(views, std::string(RouterTraits<RouterT>::prefix) + "state.", router.state());
  return views;
}

/// Shard file name of `rank` of `ranks` for a checkpoint named `base`: base-00001-of-00004.safetensors.
inline std::string shard_file_name(const std::string& base, int rank, int ranks) {
  char text[32] = {};
  std::snprintf(text, sizeof text, "-%05d-of-%05d", rank + 1, ranks);
  return base + text + ".safetensors";
}

/// Reads every view of `targets` from the checkpoint `index_path` into staging buffers, after
/// checking the index metadata against `identity`: returns the staged values and sets `step`.
/// Changes no target. Throws std::invalid_argument (ModelFileErrors converted) on any mismatch:
/// other metadata, a missing tensor, another shape or dtype, a checksum that does not match.
template <typename Scalar>
std::vector<std::vector<Scalar>> stage_distributed_checkpoint(const std::string& index_path,
                                                              const std::map<std::string, std::string>& identity,
                                                              const std::vector<TensorView<Scalar>>& targets,
                                                              std::uint64_t& step, const char* function) {
  std::vector<std::vector<Scalar>> staged;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  try {
#endif
    const std::string context = file_context(function, index_path);
    const auto bytes = MappedBytes::map(index_path, context);
    const char* text = reinterpret_cast<const char*>(bytes->data());
    std::string duplicate;
    const nlohmann::json index = parse_json_checked(text, text + bytes->size(), duplicate);
    require(!index.is_discarded() && index.is_object() && index.contains("metadata") &&
                index.at("metadata").is_object(),
            function, index_path, ": expected a JSON object with a \"metadata\" object");
    const nlohmann::json& metadata = index.at("metadata");
    for (const auto& entry : identity) {
      const bool present = metadata.contains(entry.first) && metadata.at(entry.first).is_string();
      const std::string stored = present ? metadata.at(entry.first).get<std::string>() : std::string("(missing)");
      require(present && stored == entry.second, function, index_path, ": the checkpoint's ", entry.first, " is '",
              stored, "', the layer's '", entry.second, "'");
    }
    require(metadata.contains("step") && metadata.at("step").is_string(), function, index_path,
            ": the metadata has no step");
    step = std::stoull(metadata.at("step").get<std::string>());
    const SafetensorsModel model = SafetensorsModel::open(index_path);
    const SafetensorsDtype dtype = std::is_same<Scalar, float>::value ? SafetensorsDtype::f32 : SafetensorsDtype::f64;
    for (const TensorView<Scalar>& target : targets) {
      require(model.contains(target.name), function, index_path, ": the checkpoint has no tensor '", target.name, "'");
      const SafetensorsFile& file = model.file_of(target.name);
      const SafetensorsTensorInfo& info = file.info(target.name);
      require(info.shape == checkpoint_shape(target) && info.dtype == dtype, function, file.path(), ": tensor '",
              target.name, "' is ", to_string(info.dtype), " ", shape_text(info.shape), ", the layer's ",
              to_string(dtype), " ", shape_text(checkpoint_shape(target)));
      staged.push_back(file.template values<Scalar>(target.name));
      const auto checksum = file.metadata().find("checksum." + target.name);
      const std::string computed =
          hex64(checkpoint_checksum(staged.back().data(), staged.back().size() * sizeof(Scalar)));
      require(checksum != file.metadata().end() && checksum->second == computed, function, file.path(),
              ": tensor '", target.name, "' does not match its checksum (a corrupted file)");
    }
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& error) {  // ModelFileError, std::stoull's errors: one kind for the ranks to agree on
    require(false, function, error.what());
  }
#endif
  return staged;
}

/// Loads the checkpoint `index_path` into `layer` (a DistributedMoELayer or an MoELayer): stages
/// every tensor (stage_distributed_checkpoint, run through `agree(function, stage)`, which lets
/// the ranks agree on a failure or just runs it), then copies them in and sets the training step.
template <typename Layer, typename Agree>
void load_checkpoint_into(Layer& layer, const std::string& index_path, const Agree& agree) {
  using Scalar = typename Layer::Scalar;
  const char* function = "sparsemoe::load_distributed_checkpoint";
  const auto identity = distributed_checkpoint_identity(layer);
  const std::vector<TensorView<Scalar>> targets = checkpoint_views(layer.router(), layer.tensors());
  std::vector<std::vector<Scalar>> staged;
  std::uint64_t step = 0;
  agree(function, [&] { staged = stage_distributed_checkpoint(index_path, identity, targets, step, function); });
  for (std::size_t i = 0; i < targets.size(); ++i) std::copy(staged[i].begin(), staged[i].end(), targets[i].data);
  layer.set_training_step(step);
}

}  // namespace detail

/// The index file of the checkpoint `prefix`: prefix + ".index.json".
inline std::string distributed_checkpoint_index(const std::string& prefix) { return prefix + ".index.json"; }

/// Saves `layer` as a sharded checkpoint named `prefix` (a path without extension, e.g.
/// "ckpt/moe"): rank r of P writes `<prefix>-<r+1, 5 digits>-of-<P>.safetensors` with its experts
/// under their GLOBAL names (expert{e}.w1, … as MoELayer::tensors() names them); rank 0 also
/// the router (router.weight, …), its state (router.state.selection_bias for SigmoidTopKRouter),
/// the shared expert and its gate. Tensors keep the layer's Scalar (F32 or F64, so a round trip is
/// bitwise); each shard's `__metadata__` holds the layer's identity (d, h, E, k, shared expert,
/// router kind and options, expert kind), P, this rank, the training step and an XXH3-64 checksum
/// of every tensor; then rank 0 writes distributed_checkpoint_index(prefix), a
/// model.safetensors.index.json-style object {"metadata": {…}, "weight_map": {tensor: file}}.
/// Each file is written atomically. Collective: every rank throws std::invalid_argument when
/// any rank fails to write (its message names the file). Cost: one pass over the rank's
/// parameters, two MPI_Allreduce of one int.
template <typename Scalar, typename ExpertT, typename RouterT>
void save_distributed_checkpoint(const DistributedMoELayer<Scalar, ExpertT, RouterT>& layer, const std::string& prefix) {
  const char* function = "sparsemoe::save_distributed_checkpoint";
  // tensors() and state() are non-const only because their views are writable; they are only read here.
  auto& mutable_layer = const_cast<DistributedMoELayer<Scalar, ExpertT, RouterT>&>(layer);
  const std::string directory = detail::directory_of(prefix);
  const std::string base = prefix.substr(prefix.find_last_of('/') == std::string::npos ? 0 : prefix.find_last_of('/') + 1);
  const int rank = layer.rank(), ranks = layer.num_ranks();
  std::map<std::string, std::string> metadata = detail::distributed_checkpoint_identity(layer);
  metadata["num_ranks"] = std::to_string(ranks);
  metadata["step"] = std::to_string(layer.training_step());
  const SafetensorsDtype dtype = std::is_same<Scalar, float>::value ? SafetensorsDtype::f32 : SafetensorsDtype::f64;
  // This rank's views: its experts; rank 0 also every replicated tensor.
  std::vector<TensorView<Scalar>> views;
  for (TensorView<Scalar>& view : detail::checkpoint_views(mutable_layer.router(), mutable_layer.tensors())) {
    const bool expert = view.name.compare(0, 6, "expert") == 0;
    if (expert || rank == 0) views.push_back(view);
  }
  detail::check_on_all_ranks(layer.communicator(), function, [&] {
    SafetensorsWriter writer;
    for (const auto& entry : metadata) writer.set_metadata(entry.first, entry.second);
    writer.set_metadata("rank", std::to_string(rank));
    for (const TensorView<Scalar>& view : views) {
      writer.add(view.name, detail::checkpoint_shape(view), view.data, static_cast<std::size_t>(view.size()), dtype);
      const std::size_t bytes = static_cast<std::size_t>(view.size()) * sizeof(Scalar);
      writer.set_metadata("checksum." + view.name, detail::hex64(detail::checkpoint_checksum(view.data, bytes)));
    }
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
      writer.write(directory + "/" + detail::shard_file_name(base, rank, ranks));
    } catch (const std::exception& error) {
      detail::require(false, function, error.what());
    }
#else
    writer.write(directory + "/" + detail::shard_file_name(base, rank, ranks));
#endif
  });
  detail::check_on_all_ranks(layer.communicator(), function, [&] {
    if (rank != 0) return;
    // The weight map: every tensor's owner is known from the placement, no gather needed.
    nlohmann::json weight_map = nlohmann::json::object();
    for (const TensorView<Scalar>& view : views) {
      if (view.name.compare(0, 6, "expert") != 0) weight_map[view.name] = detail::shard_file_name(base, 0, ranks);
    }
    ExpertT shape(layer.input_dim(), layer.hidden_dim());
    for (Index e = 0; e < layer.num_experts(); ++e) {
      for (const TensorView<Scalar>& view : shape.tensors()) {
        weight_map["expert" + std::to_string(e) + "." + view.name] =
            detail::shard_file_name(base, layer.placement().owner(e), ranks);
      }
    }
    const nlohmann::json index = {{"metadata", metadata}, {"weight_map", weight_map}};
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
      detail::write_file_atomically(distributed_checkpoint_index(prefix), index.dump(2) + "\n", function);
    } catch (const std::exception& error) {
      detail::require(false, function, error.what());
    }
#else
    detail::write_file_atomically(distributed_checkpoint_index(prefix), index.dump(2) + "\n", function);
#endif
  });
}

/// Loads the checkpoint whose index is `index_path` (distributed_checkpoint_index(prefix)) into
/// `layer`, saved at any number P of ranks, onto the layer's Q ranks: each rank reads the
/// replicated router, router state and shared expert and exactly the experts the layer's
/// placement gives it, and the training step. The layer must have been built with the same d, h,
/// E, k, shared expert (and gate), router kind and options, and expert kind (its config's seed
/// may differ: every parameter is replaced). Everything is read and checked before anything is
/// changed; on any mismatch (metadata, a missing tensor, a shape or dtype, a checksum, an
/// unreadable or corrupted file) EVERY rank throws std::invalid_argument and no rank's layer is
/// modified. Collective: one MPI_Allreduce of one int. Cost: one pass over the rank's tensors
/// (shards are memory-mapped; only their headers and this rank's tensors are read).
template <typename Scalar, typename ExpertT, typename RouterT>
void load_distributed_checkpoint(DistributedMoELayer<Scalar, ExpertT, RouterT>& layer, const std::string& index_path) {
  detail::load_checkpoint_into(layer, index_path, [&layer](const char* function, const auto& stage) {
    detail::check_on_all_ranks(layer.communicator(), function, stage);
  });
}

/// Loads the checkpoint whose index is `index_path`, saved by any number P of ranks, into one
/// single-process MoELayer (every expert, the router and its state, the shared expert, the
/// training step): the layer then computes for a batch what the P-rank layer computed for it
/// split over the ranks. Same requirements and checks as the distributed overload; throws
/// std::invalid_argument on a mismatch and then changes nothing. Not collective.
template <typename Scalar, typename ExpertT, typename RouterT>
void load_distributed_checkpoint(MoELayer<Scalar, ExpertT, RouterT>& layer, const std::string& index_path) {
  detail::load_checkpoint_into(layer, index_path, [](const char*, const auto& stage) { stage(); });
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_DISTRIBUTED_CHECKPOINT_HPP
