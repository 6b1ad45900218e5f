// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_MODEL_FILE_ERROR_HPP
#define SPARSEMOE_IO_MODEL_FILE_ERROR_HPP

/// \file model_file_error.hpp
/// The errors of the model-file code (safetensors.hpp, hf_models.hpp, gguf.hpp): ModelFileErrorKind (which
/// check failed), ModelFileError (the exception, with kind()), and detail::model_file_fail, which
/// every part of that code throws through. The same design as checkpoint_error.hpp.

#include "../config.hpp"

#include <cstdlib>
#include <ostream>
#include <stdexcept>
#include <string>

namespace sparsemoe {

/// \addtogroup model_files
/// @{

/// Which check reading or mapping a model file failed; see ModelFileError::kind().
enum class ModelFileErrorKind {
  io,                   ///< opening, mapping, reading or writing a file failed (errno text)
  truncated,            ///< fewer bytes than the 8-byte length prefix, or than the header it announces
  header_too_large,     ///< the header length exceeds safetensors_max_header_bytes (100 MB)
  malformed_header,     ///< the header is not a JSON object of well-formed entries (the message says which)
  unknown_dtype,        ///< a tensor's dtype is not one of the format's names
  unsupported_dtype,    ///< a known dtype that cannot be converted to a floating-point Scalar (e.g. I64)
  size_mismatch,        ///< a tensor's shape × element size differs from its byte range
  offset_out_of_range,  ///< a tensor's byte range ends past the data buffer, or begins after its end
  overlapping_tensors,  ///< two tensors share bytes
  uncovered_bytes,      ///< bytes of the data buffer belong to no tensor (a gap, or bytes after the last)
  malformed_index,      ///< model.safetensors.index.json is not a valid index (or names a shard outside its directory)
  missing_tensor,       ///< a tensor the caller or the index asks for is not in the file(s)
  shape_mismatch,       ///< a tensor's shape is not the one the model's configuration implies
  malformed_config,     ///< config.json is not valid JSON, or a key has the wrong type or value
  missing_config_key,   ///< config.json lacks keys the model family needs (the message names them all)
  unknown_architecture, ///< config.json's model_type is not a supported MoE family
  not_moe_layer,        ///< the layer asked for is a dense layer of the model, or past its last layer
  router_mismatch,      ///< the family's router is not the layer type's router (softmax vs sigmoid)
  bad_magic,            ///< a GGUF file does not start with "GGUF"
  unsupported_version,  ///< a GGUF version other than 2 or 3
  misaligned_tensor,    ///< a GGUF tensor's offset is not a multiple of the file's alignment
};

/// A stable lowercase name of `kind` ("size_mismatch", …), as used in the error messages.
inline const char* to_string(ModelFileErrorKind kind) {
  switch (kind) {
    case ModelFileErrorKind::io: return "io";
    case ModelFileErrorKind::truncated: return "truncated";
    case ModelFileErrorKind::header_too_large: return "header_too_large";
    case ModelFileErrorKind::malformed_header: return "malformed_header";
    case ModelFileErrorKind::unknown_dtype: return "unknown_dtype";
    case ModelFileErrorKind::unsupported_dtype: return "unsupported_dtype";
    case ModelFileErrorKind::size_mismatch: return "size_mismatch";
    case ModelFileErrorKind::offset_out_of_range: return "offset_out_of_range";
    case ModelFileErrorKind::overlapping_tensors: return "overlapping_tensors";
    case ModelFileErrorKind::uncovered_bytes: return "uncovered_bytes";
    case ModelFileErrorKind::malformed_index: return "malformed_index";
    case ModelFileErrorKind::missing_tensor: return "missing_tensor";
    case ModelFileErrorKind::shape_mismatch: return "shape_mismatch";
    case ModelFileErrorKind::malformed_config: return "malformed_config";
    case ModelFileErrorKind::missing_config_key: return "missing_config_key";
    case ModelFileErrorKind::unknown_architecture: return "unknown_architecture";
    case ModelFileErrorKind::not_moe_layer: return "not_moe_layer";
    case ModelFileErrorKind::router_mismatch: return "router_mismatch";
    case ModelFileErrorKind::bad_magic: return "bad_magic";
    case ModelFileErrorKind::unsupported_version: return "unsupported_version";
    case ModelFileErrorKind::misaligned_tensor: return "misaligned_tensor";
  }
  return "unknown";
}

/// Writes to_string(kind) (for test output and logs).
inline std::ostream& operator<<(std::ostream& stream, ModelFileErrorKind kind) { return stream << to_string(kind); }

namespace detail {

/// What SPARSEMOE_THROW(ModelFileError, …) carries: the kind and the message (converts to
/// std::string for the no-exceptions hook).
struct ModelFileFailure {
  ModelFileErrorKind kind;
  std::string text;
  operator std::string() const { return text; }  // NOLINT(google-explicit-constructor)
};

}  // namespace detail

/// The exception the model-file readers and loaders throw for a bad file, index or
/// configuration, or a failed I/O operation. The message names the function, the file, the
/// tensor or key, what was expected and what came. Arguments that are wrong independently of any
/// file (a writer asked for a dtype it cannot write, a duplicate tensor name) throw
/// std::invalid_argument instead. Nothing is partially loaded: a loader that throws returns no
/// object and changes none of its arguments.
class ModelFileError : public std::runtime_error {
 public:
  /// An error of `kind` with message `what`.
  ModelFileError(ModelFileErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  /// From SPARSEMOE_THROW(ModelFileError, detail::ModelFileFailure{…}).
  explicit ModelFileError(const detail::ModelFileFailure& failure)
      : std::runtime_error(failure.text), kind_(failure.kind) {}

  /// Which check failed.
  ModelFileErrorKind kind() const noexcept { return kind_; }

 private:
  ModelFileErrorKind kind_;
};

namespace detail {

/// Throws ModelFileError(kind, "<context>: <kind>: <parts...>") through SPARSEMOE_THROW; never
/// returns.
template <typename... Parts>
[[noreturn]] void model_file_fail(ModelFileErrorKind kind, const std::string& context, const Parts&... parts) {
  SPARSEMOE_THROW(ModelFileError, (ModelFileFailure{kind, message(context, ": ", to_string(kind), ": ", parts...)}));
  std::abort();
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_MODEL_FILE_ERROR_HPP
