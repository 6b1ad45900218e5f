// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_CHECKPOINT_HPP
#define SPARSEMOE_CHECKPOINT_HPP

/// \file checkpoint.hpp
/// Lossless checkpoints of an MoELayer with any router, and of an ExpertChoiceLayer,
/// HashMoELayer, SoftMoELayer or HierarchicalMoELayer (and, optionally, of its Sgd or Adam
/// optimizer) in a documented, checksummed binary format, written atomically.
///
/// This is the public entry point; the implementation lives in io/ (one purpose per file):
/// io/checkpoint_error.hpp (CheckpointError), io/byte_codec.hpp (little-endian fields),
/// io/file.hpp (POSIX reads and atomic writes), io/checkpoint_format.hpp (format constants,
/// CheckpointInfo, parsing and validation), io/checkpoint_optimizer.hpp (optimizer sections),
/// io/checkpoint_router.hpp (router options and state), io/checkpoint_layer.hpp (ExpertKind,
/// the layer's tensors, validate-then-commit loading) and io/checkpoint_paradigm.hpp (the other
/// layer types: their kind "layer:<kind>", options and tensors). A router's kind string and options come
/// from RouterKind<RouterT> (router/router_kind.hpp), specialised in each router's header.
///
/// Not part of the umbrella header sparsemoe.hpp, because it needs xxHash (`xxhash.h`, Debian
/// package libxxhash-dev, used header-only through XXH_INLINE_ALL: nothing to link) and POSIX
/// file calls (open, write, fsync, rename). Include it explicitly:
///
/// \code
/// #include <sparsemoe/sparsemoe.hpp>
/// #include <sparsemoe/checkpoint.hpp>
///
/// sparsemoe::MoELayer<float> layer({/*d*/ 64, /*h*/ 256, /*E*/ 8, /*k*/ 2});
/// sparsemoe::Adam<float> adam;
/// // ... train ...
/// sparsemoe::save_checkpoint("model.ckpt", layer, adam);   // atomic: old file or new file, never half
/// // later, possibly in another process:
/// sparsemoe::load_checkpoint("model.ckpt", layer, adam);   // validates everything, then copies in
/// \endcode
///
/// Guarantees:
///  - Round trip is bitwise: every parameter, router state and optimizer state scalar is stored as
///    its raw IEEE bytes (NaN payloads and −0.0 included), and so are the router options (the
///    noisy gate's ε and seed among them) and the layer's training step; after loading, the
///    layer's forward/backward (training noise included) and the optimizer's next step give
///    bitwise the results of the saved objects.
///  - Loading validates the whole file (size, magic, version, checksum, structure, scalar type,
///    expert kind, router kind, shapes, router options and tensor names against the target)
///    before touching anything; on any failure the layer and the optimizer are left exactly as
///    they were, and the CheckpointError says which check failed (CheckpointError::kind()).
///  - Saving writes `path.tmp.<pid>.<n>` in the same directory, fsyncs it, renames it over `path`
///    and fsyncs the directory: a crash leaves the old checkpoint or the new one under `path`,
///    never a partial file. On failure the temporary file is removed and `path` is untouched.
///
/// Format (version 2; all integers little-endian, offsets in bytes; see docs/checkpoint-format.md,
/// which also describes version 1):
///
///     off  size  field
///       0     8  magic "SPMOECKP"
///       8     4  u32 format version = 2
///      12     8  u64 total file size N, checksum included
///      20     4  u32 scalar type code: 1 = IEEE-754 binary32 (float), 2 = binary64 (double)
///      24     4  u32 scalar size in bytes: 4 or 8
///      28        str expert kind: "expert:relu" | "expert:silu" | "expert:gelu_tanh" |
///                "expert:gelu_erf" | "swiglu" (ExpertKind<ExpertT>::name())
///                i64 d, i64 h, i64 E, i64 k
///                u64 training step (MoELayer::training_step())
///                str router kind: "noisy_top_k" | "softmax_top_k" | "sigmoid_top_k" | "switch" |
///                "gshard" (RouterKind<RouterT>::name()); for the other layer types the layer
///                kind instead: "layer:expert_choice" | "layer:hash" | "layer:soft_moe" |
///                "layer:hierarchical" (CheckpointInfo::layer_kind)
///                u64 router option count, then that many option records
///                u64 parameter tensor count, then that many tensor records
///                u64 router state tensor count, then that many tensor records
///                str optimizer kind: "none" | "sgd" | "adam", then its section (below)
///     N−8     8  u64 XXH3_64bits (seed 0) of bytes [0, N−8)
///
///     str            = u32 byte length, then the bytes (UTF-8, no terminator)
///     f64            = the 8 bytes of an IEEE-754 binary64
///     option record  = str name, u32 type (1 integer, 2 unsigned, 3 real, 4 flag), u64 value bits
///     tensor record  = str name, i64 rows, i64 cols, rows·cols scalars (row-major, raw IEEE bytes)
///     "sgd" section  = i64 step count, f64 lr, f64 momentum, f64 weight decay, u32 nesterov (0|1),
///                      u64 state tensor count, records "sgd.velocity.<param>" (one per parameter
///                      when momentum > 0 and step count > 0, else none)
///     "adam" section = i64 step count, f64 lr, f64 β1, f64 β2, f64 ε, f64 weight decay,
///                      u64 state tensor count, records "adam.m.<param>" for every parameter,
///                      then "adam.v.<param>" for every parameter (none when step count = 0)
///
/// The parameter tensors are those of MoELayer::tensors(), in that order and with those names
/// (gate.gate_weight, gate.noise_weight or router.weight, router.bias, then expert0.w1,
/// expert0.b1, …); the router state tensors are the router's state() under "<prefix>state."
/// (e.g. router.state.selection_bias); optimizer state tensors have the shape of their
/// parameter. The check order when reading is: magic, version, total size (truncated / trailing
/// bytes), checksum, structure, then compatibility with the target.
///
/// What is restored: every parameter and router state tensor, the layer's training step (so the
/// next unpinned training forward draws the noise an uninterrupted run would), the noisy gate's
/// noise ε and seed, and the optimizer's hyper-parameters, step count and state. What must
/// already match: Scalar, the expert type, the router kind, d, h, E, k and every other router
/// option (RouterKind::options: e.g. scale, num_groups, seed). What is kept from the target: the
/// router's check_finite setting (a run-time option, not state). A version 1 file (always a
/// noisy top-k gate) loads as before and leaves the layer's training_step() unchanged: it does
/// not record one.
///
/// Requirements: a little-endian host (checked at compile time) with IEEE-754 float and double,
/// and POSIX. Memory: saving builds the whole file in memory (≈ the parameter and state bytes)
/// plus a copy of the router and of one expert at a time; loading reads the whole file, plus a
/// copy of the router and the optimizer state before they are moved in. Time: O(file size),
/// dominated by the copy, the XXH3 pass (several GB/s) and fsync.
///
/// Thread safety: saving only reads the layer and optimizer (no other thread may modify them
/// meanwhile); concurrent saves to the same path are safe (each uses its own temporary file; the
/// last rename wins). Loading modifies the layer and optimizer: no concurrent use of them.

#include "io/byte_codec.hpp"
#include "io/checkpoint_error.hpp"
#include "io/checkpoint_format.hpp"
#include "io/checkpoint_layer.hpp"
#include "io/checkpoint_optimizer.hpp"
#include "io/checkpoint_paradigm.hpp"
#include "io/checkpoint_router.hpp"
#include "io/file.hpp"
#include "router/router_kind.hpp"
#include "moe_layer.hpp"
#include "optimizers.hpp"

#include <cstddef>
#include <string>

namespace sparsemoe {

/// \addtogroup files
/// @{

// ---- In memory ----------------------------------------------------------------------------------

/// The checkpoint of `layer` (any router) as bytes, in format version 2 (the file
/// save_checkpoint writes). O(parameters); memory: the result plus a copy of the router and of one
/// expert. Throws std::bad_alloc only.
template <typename Scalar, typename ExpertT, typename RouterT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT, RouterT>& layer) {
  return detail::serialize(layer, detail::NoOptimizer{}, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and the state of `optimizer` (hyper-parameters, step count, one
/// velocity per parameter tensor when momentum > 0). Throws std::invalid_argument if the
/// optimizer's state does not fit the layer's tensors (it was stepped on other parameters).
template <typename Scalar, typename ExpertT, typename RouterT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT, RouterT>& layer, const Sgd<Scalar>& optimizer) {
  return detail::serialize(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and the state of `optimizer` (hyper-parameters, step count, first
/// and second moments). Throws std::invalid_argument if the optimizer's state does not fit the
/// layer's tensors.
template <typename Scalar, typename ExpertT, typename RouterT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT, RouterT>& layer, const Adam<Scalar>& optimizer) {
  return detail::serialize(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// Loads the checkpoint in the `size` bytes at `data` into `layer` (any router), which must have
/// the file's Scalar, expert kind, router kind, d, h, E, k and router options; its parameters,
/// router state tensors and (version 2 files) training step are replaced, and for the
/// NoisyTopKGate the noise ε and seed too. An optimizer section in the file is verified but
/// ignored. A parameter or state value that is NaN or infinite is rejected (non_finite_value)
/// unless options.allow_non_finite. Throws CheckpointError (see CheckpointErrorKind) and then
/// leaves `layer` unchanged; std::invalid_argument if `data` is null while `size` > 0. O(size).
template <typename Scalar, typename ExpertT, typename RouterT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT, RouterT>& layer,
                            const CheckpointLoadOptions& options = {}) {
  detail::NoOptimizer none;
  detail::deserialize(data, size, layer, none, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Sgd section (CheckpointErrorKind::optimizer_mismatch if there is none). On any error neither
/// the layer nor the optimizer changes.
template <typename Scalar, typename ExpertT, typename RouterT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT, RouterT>& layer,
                            Sgd<Scalar>& optimizer, const CheckpointLoadOptions& options = {}) {
  detail::deserialize(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Adam section (CheckpointErrorKind::optimizer_mismatch if there is none). On any error neither
/// the layer nor the optimizer changes.
template <typename Scalar, typename ExpertT, typename RouterT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT, RouterT>& layer,
                            Adam<Scalar>& optimizer, const CheckpointLoadOptions& options = {}) {
  detail::deserialize(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// What the checkpoint in the `size` bytes at `data` holds, after the integrity and structure
/// checks (no target layer: no scalar, kind or shape comparison). Throws CheckpointError
/// (std::invalid_argument if `data` is null while `size` > 0). O(size).
inline CheckpointInfo inspect_checkpoint(const void* data, std::size_t size) {
  static const unsigned char empty = 0;
  detail::require(data != nullptr || size == 0, "sparsemoe::inspect_checkpoint", "data is a null pointer but size is ",
                  size);
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  return detail::parse_checkpoint(bytes, size, "sparsemoe::inspect_checkpoint").info;
}

// ---- Files --------------------------------------------------------------------------------------

/// Saves `layer` to `path` atomically (temporary file, write, fsync, rename, directory fsync):
/// `path` holds the old checkpoint or the new one, never a partial file. The file is created
/// with mode 0666 & ~umask (an existing file's mode is not kept; a symlink at `path` is
/// replaced, not followed). Throws CheckpointError(io) with the failed step and errno text; the
/// temporary file is then removed and `path` is untouched (unless only the final directory
/// fsync failed, which the message says). O(parameters) plus the I/O.
template <typename Scalar, typename ExpertT, typename RouterT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT, RouterT>& layer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, detail::NoOptimizer{}, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically (see above). Throws
/// std::invalid_argument, before writing anything, if the optimizer's state does not fit the layer.
template <typename Scalar, typename ExpertT, typename RouterT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT, RouterT>& layer, const Sgd<Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, optimizer, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically (see above). Throws
/// std::invalid_argument, before writing anything, if the optimizer's state does not fit the layer.
template <typename Scalar, typename ExpertT, typename RouterT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT, RouterT>& layer, const Adam<Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, optimizer, function), function);
}

/// Loads the checkpoint at `path` into `layer` (see deserialize_checkpoint): reads the whole
/// file, validates everything, then copies in. Throws CheckpointError (io for a missing or
/// unreadable file) and then leaves `layer` unchanged. O(file size).
template <typename Scalar, typename ExpertT, typename RouterT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT, RouterT>& layer, const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::NoOptimizer none;
  detail::deserialize(bytes.data(), bytes.size(), layer, none, detail::file_context(function, path), options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Sgd section required). On any
/// error neither changes.
template <typename Scalar, typename ExpertT, typename RouterT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT, RouterT>& layer, Sgd<Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path), options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Adam section required). On any
/// error neither changes.
template <typename Scalar, typename ExpertT, typename RouterT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT, RouterT>& layer, Adam<Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path), options);
}

// ---- The other layer types ----------------------------------------------------------------------
//
// ExpertChoiceLayer, HashMoELayer, SoftMoELayer and HierarchicalMoELayer (LayerT below; the
// overloads take part only for these types). Same format (version 2) and guarantees as an
// MoELayer's checkpoint; the kind string is "layer:<kind>" (CheckpointInfo::layer_kind), and a
// file loads only into a layer of the same type, Scalar, expert type, d, h, E, k and options
// (io/checkpoint_paradigm.hpp, docs/checkpoint-format.md). These layers keep no training step:
// the file's is 0 and a load ignores it. A load fills a copy of the layer and moves it in:
// views taken from the layer before a load do not see the loaded values.

/// The checkpoint of `layer` (a layer type of io/checkpoint_paradigm.hpp) as bytes. O(parameters);
/// memory: the result plus a copy of the layer. Throws std::bad_alloc only (std::invalid_argument
/// for a hierarchical layer of more than 251 groups, whose options would not fit).
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
std::string serialize_checkpoint(const LayerT& layer) {
  return detail::serialize_paradigm(layer, detail::NoOptimizer{}, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and of `optimizer`'s state. Throws std::invalid_argument if the
/// optimizer's state does not fit the layer's tensors.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
std::string serialize_checkpoint(const LayerT& layer, const Sgd<typename LayerT::Scalar>& optimizer) {
  return detail::serialize_paradigm(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and of `optimizer`'s state. Throws std::invalid_argument if the
/// optimizer's state does not fit the layer's tensors.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
std::string serialize_checkpoint(const LayerT& layer, const Adam<typename LayerT::Scalar>& optimizer) {
  return detail::serialize_paradigm(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// Loads the checkpoint in the `size` bytes at `data` into `layer`, which must be of the file's
/// layer kind (wrong_layer_kind), Scalar, expert kind, d, h, E, k and options; every parameter
/// (and the hash table, or its absence; the hierarchical gates' ε and noise seeds) is replaced.
/// An optimizer section is verified but ignored. Throws CheckpointError and then leaves `layer`
/// unchanged. O(size).
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void deserialize_checkpoint(const void* data, std::size_t size, LayerT& layer, const CheckpointLoadOptions& options = {}) {
  detail::NoOptimizer none;
  detail::deserialize_paradigm(data, size, layer, none, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Sgd section. On any error neither the layer nor the optimizer changes.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void deserialize_checkpoint(const void* data, std::size_t size, LayerT& layer, Sgd<typename LayerT::Scalar>& optimizer,
                            const CheckpointLoadOptions& options = {}) {
  detail::deserialize_paradigm(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Adam section. On any error neither the layer nor the optimizer changes.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void deserialize_checkpoint(const void* data, std::size_t size, LayerT& layer, Adam<typename LayerT::Scalar>& optimizer,
                            const CheckpointLoadOptions& options = {}) {
  detail::deserialize_paradigm(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// Saves `layer` to `path` atomically (see save_checkpoint of an MoELayer).
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void save_checkpoint(const std::string& path, const LayerT& layer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize_paradigm(layer, detail::NoOptimizer{}, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void save_checkpoint(const std::string& path, const LayerT& layer, const Sgd<typename LayerT::Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize_paradigm(layer, optimizer, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void save_checkpoint(const std::string& path, const LayerT& layer, const Adam<typename LayerT::Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize_paradigm(layer, optimizer, function), function);
}

/// Loads the checkpoint at `path` into `layer` (see deserialize_checkpoint). Throws
/// CheckpointError and then leaves `layer` unchanged.
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void load_checkpoint(const std::string& path, LayerT& layer, const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::NoOptimizer none;
  detail::deserialize_paradigm(bytes.data(), bytes.size(), layer, none, detail::file_context(function, path), options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Sgd section required).
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void load_checkpoint(const std::string& path, LayerT& layer, Sgd<typename LayerT::Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize_paradigm(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path),
                               options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Adam section required).
template <typename LayerT, detail::EnableIfParadigmLayer<LayerT> = 0>
void load_checkpoint(const std::string& path, LayerT& layer, Adam<typename LayerT::Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize_paradigm(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path),
                               options);
}

/// What the checkpoint at `path` holds (see inspect_checkpoint). Throws CheckpointError.
inline CheckpointInfo read_checkpoint_info(const std::string& path) {
  const char* function = "sparsemoe::read_checkpoint_info";
  const std::string bytes = detail::read_file(path, function);
  return detail::parse_checkpoint(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
                                  detail::file_context(function, path))
      .info;
}

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_CHECKPOINT_HPP
