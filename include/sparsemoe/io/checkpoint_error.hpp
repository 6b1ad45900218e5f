// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_ERROR_HPP
#define SPARSEMOE_IO_CHECKPOINT_ERROR_HPP

/// \file checkpoint_error.hpp
/// The errors of the checkpoint code: CheckpointErrorKind (which check failed), CheckpointError
/// (the exception, with kind()), and detail::checkpoint_fail, which every part of the checkpoint
/// code (byte codec, file I/O, format parser, layer glue) throws through.

#include "../config.hpp"

#include <cstdlib>
#include <ostream>
#include <stdexcept>
#include <string>

namespace sparsemoe {

/// \addtogroup files
/// @{

/// Which check a checkpoint operation failed; see CheckpointError::kind().
enum class CheckpointErrorKind {
  io,                   ///< opening, reading, writing, syncing or renaming a file failed (errno text)
  truncated,            ///< fewer bytes than a header, or than the header's total size
  bad_magic,            ///< the first 8 bytes are not "SPMOECKP": not a sparsemoe checkpoint
  unsupported_version,  ///< a format version outside [checkpoint_min_format_version, checkpoint_format_version]
  trailing_bytes,       ///< more bytes than the header's total size
  checksum_mismatch,    ///< the stored XXH3-64 differs from the computed one: the bytes are corrupted
  malformed,            ///< the checksum matches but the content breaks the format (forged or buggy writer)
  wrong_scalar_type,    ///< the file's scalar type (float/double) is not the layer's
  wrong_expert_kind,    ///< the file's expert kind (e.g. "expert:silu") is not the layer's
  shape_mismatch,       ///< d, h, E, k or a tensor's shape differs from the layer's
  tensor_mismatch,      ///< the count or a name of the parameter (or router state) tensors differs from the layer's
  optimizer_mismatch,   ///< the optimizer state asked for is not in the file (none, or another kind)
  non_finite_value,     ///< a parameter or router state tensor holds a NaN or an infinity (the message names it)
  wrong_router_kind,    ///< the file's router kind (e.g. "softmax_top_k") is not the layer's (format version 2)
  router_option_mismatch,  ///< a router (or layer) option (e.g. scale, num_groups, seed) differs from the layer's
  wrong_layer_kind,     ///< the file holds another layer type (e.g. a SoftMoELayer's checkpoint loaded into an MoELayer)
};

/// A stable lowercase name of `kind` ("checksum_mismatch", …), as used in the error messages.
inline const char* to_string(CheckpointErrorKind kind) {
  switch (kind) {
    case CheckpointErrorKind::io: return "io";
    case CheckpointErrorKind::truncated: return "truncated";
    case CheckpointErrorKind::bad_magic: return "bad_magic";
    case CheckpointErrorKind::unsupported_version: return "unsupported_version";
    case CheckpointErrorKind::trailing_bytes: return "trailing_bytes";
    case CheckpointErrorKind::checksum_mismatch: return "checksum_mismatch";
    case CheckpointErrorKind::malformed: return "malformed";
    case CheckpointErrorKind::wrong_scalar_type: return "wrong_scalar_type";
    case CheckpointErrorKind::wrong_expert_kind: return "wrong_expert_kind";
    case CheckpointErrorKind::shape_mismatch: return "shape_mismatch";
    case CheckpointErrorKind::tensor_mismatch: return "tensor_mismatch";
    case CheckpointErrorKind::non_finite_value: return "non_finite_value";
    case CheckpointErrorKind::optimizer_mismatch: return "optimizer_mismatch";
    case CheckpointErrorKind::wrong_router_kind: return "wrong_router_kind";
    case CheckpointErrorKind::router_option_mismatch: return "router_option_mismatch";
    case CheckpointErrorKind::wrong_layer_kind: return "wrong_layer_kind";
  }
  return "unknown";
}

/// Writes to_string(kind) (for test output and logs).
inline std::ostream& operator<<(std::ostream& stream, CheckpointErrorKind kind) { return stream << to_string(kind); }

namespace detail {

/// What SPARSEMOE_THROW(CheckpointError, …) carries: the kind and the message. Converts to
/// std::string so that the no-exceptions hook (which prints `std::string(message)`) works too.
struct CheckpointFailure {
  CheckpointErrorKind kind;
  std::string text;
  operator std::string() const { return text; }  // NOLINT(google-explicit-constructor)
};

}  // namespace detail

/// The exception every checkpoint function throws for a bad file or a failed I/O operation
/// (arguments that are wrong independently of any file, such as an optimizer whose state does
/// not fit the layer being saved, throw std::invalid_argument instead). The message names the
/// function, the file (if any), what was expected and what came.
class CheckpointError : public std::runtime_error {
 public:
  /// An error of `kind` with message `what`.
  CheckpointError(CheckpointErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  /// From SPARSEMOE_THROW(CheckpointError, detail::CheckpointFailure{…}).
  explicit CheckpointError(const detail::CheckpointFailure& failure)
      : std::runtime_error(failure.text), kind_(failure.kind) {}

  /// Which check failed.
  CheckpointErrorKind kind() const noexcept { return kind_; }

 private:
  CheckpointErrorKind kind_;
};

namespace detail {

/// Throws CheckpointError(kind, "<context>: <kind>: <parts...>") through SPARSEMOE_THROW; never
/// returns (a SPARSEMOE_THROW hook must not return either; if it does, this aborts).
template <typename... Parts>
[[noreturn]] void checkpoint_fail(CheckpointErrorKind kind, const std::string& context, const Parts&... parts) {
  SPARSEMOE_THROW(CheckpointError, (CheckpointFailure{kind, message(context, ": ", to_string(kind), ": ", parts...)}));
  std::abort();
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_ERROR_HPP
