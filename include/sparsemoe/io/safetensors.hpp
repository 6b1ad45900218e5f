// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_SAFETENSORS_HPP
#define SPARSEMOE_IO_SAFETENSORS_HPP

/// \file safetensors.hpp
/// Hugging Face's safetensors format: a memory-mapped reader (SafetensorsFile), sharded models
/// through model.safetensors.index.json (SafetensorsModel), and a writer (SafetensorsWriter).
/// Needs nlohmann/json (Debian: nlohmann-json3-dev); not in the umbrella header.
///
/// A file is: a u64 little-endian N, N bytes of UTF-8 JSON (the header, possibly padded with
/// spaces), then the data buffer. The header maps each tensor name to
/// `{"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}` (offsets relative to the
/// buffer's start; elements row-major and little-endian) and may hold `"__metadata__"`, a map of
/// strings. The reader checks everything before anything is returned: header size (at most
/// safetensors_max_header_bytes), JSON syntax, each entry's fields, dtype names, that shape ×
/// element size equals each byte range, that ranges lie in the buffer, do not overlap and cover
/// it exactly; each failure is a ModelFileError of its own kind naming the tensor and the values.

#include "../config.hpp"
#include "../detail/half.hpp"
#include "checkpoint_error.hpp"
#include "file.hpp"
#include "model_file_error.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#if !defined(__BYTE_ORDER__) || !defined(__ORDER_LITTLE_ENDIAN__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sparsemoe/io/safetensors.hpp supports little-endian hosts only (the format is little-endian)"
#endif

namespace sparsemoe {

/// \addtogroup model_files
/// @{

/// The largest header a safetensors reader accepts, in bytes (the reference implementation's cap).
constexpr std::uint64_t safetensors_max_header_bytes = 100000000;

/// The element types of the safetensors format (the header's "dtype" strings in comments).
enum class SafetensorsDtype {
  boolean,  ///< "BOOL", 1 byte
  u8,       ///< "U8"
  i8,       ///< "I8"
  i16,      ///< "I16"
  u16,      ///< "U16"
  f16,      ///< "F16", IEEE-754 binary16 (read and written)
  bf16,     ///< "BF16", bfloat16 (read and written)
  i32,      ///< "I32"
  u32,      ///< "U32"
  f32,      ///< "F32" (read and written)
  f64,      ///< "F64" (read and written)
  i64,      ///< "I64"
  u64,      ///< "U64"
  f8_e4m3,  ///< "F8_E4M3", 1 byte, no infinities (read: widened exactly; block scales: hf_models.hpp)
  f8_e5m2,  ///< "F8_E5M2", 1 byte (read: widened exactly)
};

/// The header's name of `dtype` ("F32", "BF16", …).
inline const char* to_string(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::boolean: return "BOOL";
    case SafetensorsDtype::u8: return "U8";
    case SafetensorsDtype::i8: return "I8";
    case SafetensorsDtype::i16: return "I16";
    case SafetensorsDtype::u16: return "U16";
    case SafetensorsDtype::f16: return "F16";
    case SafetensorsDtype::bf16: return "BF16";
    case SafetensorsDtype::i32: return "I32";
    case SafetensorsDtype::u32: return "U32";
    case SafetensorsDtype::f32: return "F32";
    case SafetensorsDtype::f64: return "F64";
    case SafetensorsDtype::i64: return "I64";
    case SafetensorsDtype::u64: return "U64";
    case SafetensorsDtype::f8_e4m3: return "F8_E4M3";
    case SafetensorsDtype::f8_e5m2: return "F8_E5M2";
  }
  return "?";
}

/// Bytes per element of `dtype`.
inline std::size_t element_size(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::boolean:
    case SafetensorsDtype::u8:
    case SafetensorsDtype::i8:
    case SafetensorsDtype::f8_e4m3:
    case SafetensorsDtype::f8_e5m2: return 1;
    case SafetensorsDtype::i16:
    case SafetensorsDtype::u16:
    case SafetensorsDtype::f16:
    case SafetensorsDtype::bf16: return 2;
    case SafetensorsDtype::i32:
    case SafetensorsDtype::u32:
    case SafetensorsDtype::f32: return 4;
    case SafetensorsDtype::f64:
    case SafetensorsDtype::i64:
    case SafetensorsDtype::u64: return 8;
  }
  return 0;
}

/// The dtype named `name` ("F32", …), or nothing for a name the format does not have.
inline std::optional<SafetensorsDtype> parse_safetensors_dtype(const std::string& name) {
  for (int value = 0; value <= static_cast<int>(SafetensorsDtype::f8_e5m2); ++value) {
    const SafetensorsDtype dtype = static_cast<SafetensorsDtype>(value);
    if (name == to_string(dtype)) return dtype;
  }
  return std::nullopt;
}

/// One tensor of a safetensors header, checked against the file.
struct SafetensorsTensorInfo {
  std::string name;                  ///< the header's key
  SafetensorsDtype dtype = SafetensorsDtype::f32;  ///< element type
  std::vector<std::uint64_t> shape;  ///< row-major dimensions, outermost first ([] for a scalar)
  std::uint64_t begin = 0;           ///< first byte, relative to the data buffer
  std::uint64_t end = 0;             ///< one past the last byte; end − begin = elements × element_size(dtype)

  /// The number of elements, the product of shape (1 for a scalar).
  std::uint64_t num_elements() const {
    std::uint64_t count = 1;
    for (const std::uint64_t extent : shape) count *= extent;
    return count;
  }
};

namespace detail {

/// "[a, b, c]" for messages.
inline std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

/// The bytes a model file is read from: a read-only memory map of a file, or an owned buffer.
class MappedBytes {
 public:
  MappedBytes() = default;
  MappedBytes(const MappedBytes&) = delete;
  MappedBytes& operator=(const MappedBytes&) = delete;
  ~MappedBytes() {
    if (mapped_ != nullptr) ::munmap(mapped_, size_);
  }

  /// Maps the regular file at `path` read-only (a file of 0 bytes is held as an empty buffer).
  /// Throws ModelFileError(io) naming the step, the path and errno.
  static std::shared_ptr<const MappedBytes> map(const std::string& path, const std::string& context) {
    std::size_t size = 0;
    const int fd = open_regular_file(path, size, [&](const std::string& reason) {
      model_file_fail(ModelFileErrorKind::io, context, reason);
    });
    auto bytes = std::make_shared<MappedBytes>();
    bytes->size_ = size;
    if (bytes->size_ > 0) {
      void* address = ::mmap(nullptr, bytes->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (address == MAP_FAILED) {
        const int error = errno;
        close_fd(fd);
        model_file_fail(ModelFileErrorKind::io, context, "mmap of ", bytes->size_, " bytes failed: ", errno_text(error));
      }
      bytes->mapped_ = address;
      bytes->data_ = static_cast<const unsigned char*>(address);
    }
    close_fd(fd);  // the mapping stays valid without the descriptor
    return bytes;
  }

  /// Holds `content` (for files made in memory, tests and fuzzing).
  static std::shared_ptr<const MappedBytes> own(std::string content) {
    auto bytes = std::make_shared<MappedBytes>();
    bytes->owned_ = std::move(content);
    bytes->size_ = bytes->owned_.size();
    bytes->data_ = reinterpret_cast<const unsigned char*>(bytes->owned_.data());
    return bytes;
  }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  void* mapped_ = nullptr;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
  std::string owned_;
};

/// A JSON value's unsigned integer, or nothing (negative, fractional, or not a number).
inline std::optional<std::uint64_t> json_unsigned(const nlohmann::json& value) {
  if (!value.is_number_unsigned()) return std::nullopt;
  return value.get<std::uint64_t>();
}

/// Parses `text` as JSON. Returns a discarded value on a syntax error; sets `duplicate_key` to
/// the first key repeated inside one object, if any (nlohmann/json would silently keep only the
/// last of them).
inline nlohmann::json parse_json_checked(const char* begin, const char* end, std::string& duplicate_key) {
  std::vector<std::set<std::string>> open_objects;
  const nlohmann::json::parser_callback_t callback = [&](int, nlohmann::json::parse_event_t event,
                                                         nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == nlohmann::json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == nlohmann::json::parse_event_t::key && !open_objects.empty()) {
      if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate_key.empty()) {
        duplicate_key = parsed.get<std::string>();
      }
    }
    return true;
  };
  return nlohmann::json::parse(begin, end, callback, /*allow_exceptions=*/false);
}

/// Converts `count` elements of `dtype` at `bytes` (little-endian, any alignment) to `out`.
/// Returns false for a dtype that is not a floating-point type the reader converts.
template <typename Scalar>
bool convert_elements(SafetensorsDtype dtype, const unsigned char* bytes, std::size_t count, Scalar* out) {
  switch (dtype) {
    case SafetensorsDtype::f32:
      for (std::size_t i = 0; i < count; ++i) {
        float value = 0;
        std::memcpy(&value, bytes + 4 * i, 4);
        out[i] = static_cast<Scalar>(value);
      }
      return true;
    case SafetensorsDtype::f64:
      for (std::size_t i = 0; i < count; ++i) {
        double value = 0;
        std::memcpy(&value, bytes + 8 * i, 8);
        out[i] = static_cast<Scalar>(value);
      }
      return true;
    case SafetensorsDtype::bf16:
    case SafetensorsDtype::f16:
      for (std::size_t i = 0; i < count; ++i) {
        const std::uint16_t bits = static_cast<std::uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
        out[i] = static_cast<Scalar>(dtype == SafetensorsDtype::bf16 ? float_from_bf16(bits) : float_from_f16(bits));
      }
      return true;
    case SafetensorsDtype::f8_e4m3:
    case SafetensorsDtype::f8_e5m2:
      for (std::size_t i = 0; i < count; ++i) {
        out[i] = static_cast<Scalar>(dtype == SafetensorsDtype::f8_e4m3 ? float_from_f8_e4m3(bytes[i])
                                                                        : float_from_f8_e5m2(bytes[i]));
      }
      return true;
    default:
      return false;
  }
}

}  // namespace detail

/// One safetensors file, memory-mapped (open) or held in memory (from_bytes), with its header
/// parsed and checked. Copies share the mapping, which lives as long as the last copy; tensors are
/// converted from the mapped bytes when asked for, so opening a large file costs its header only.
/// Do not truncate a mapped file while it is in use (the OS would signal SIGBUS on access).
class SafetensorsFile {
 public:
  /// Maps the file at `path` and checks its header (see the file comment). Throws
  /// ModelFileError: io, truncated, header_too_large, malformed_header, unknown_dtype,
  /// size_mismatch, offset_out_of_range, overlapping_tensors or uncovered_bytes, naming the path,
  /// the tensor and the values. Cost: O(header) plus the mapping.
  static SafetensorsFile open(const std::string& path) {
    const std::string context = detail::file_context("sparsemoe::SafetensorsFile::open", path);
    return SafetensorsFile(path, detail::MappedBytes::map(path, context), context);
  }

  /// The same checks over `content`, the bytes of a file (named `name` in messages).
  static SafetensorsFile from_bytes(std::string content, const std::string& name = "<memory>") {
    const std::string context = detail::file_context("sparsemoe::SafetensorsFile::from_bytes", name);
    return SafetensorsFile(name, detail::MappedBytes::own(std::move(content)), context);
  }

  /// The path (or name) the file was opened from.
  const std::string& path() const { return path_; }
  /// The tensors, ordered by their position in the data buffer.
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  /// The header's "__metadata__" (empty without one).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Bytes of the header (N, excluding the 8-byte length).
  std::uint64_t header_size() const { return header_size_; }
  /// Whether the file has a tensor named `name`.
  bool contains(const std::string& name) const { return index_.count(name) > 0; }

  /// The tensor `name`; throws ModelFileError(missing_tensor) naming it and the file.
  const SafetensorsTensorInfo& info(const std::string& name) const {
    const auto found = index_.find(name);
    if (found == index_.end()) {
      detail::model_file_fail(ModelFileErrorKind::missing_tensor, context("info"), "no tensor '", name, "' (the file has ",
                              tensors_.size(), " tensors)");
    }
    return tensors_[found->second];
  }

  /// The raw little-endian bytes of tensor `info` (end − begin of them, unaligned in general).
  const unsigned char* raw_data(const SafetensorsTensorInfo& info) const { return data_begin() + info.begin; }

  /// Tensor `name` converted to Scalar, all elements in row-major order. Throws
  /// ModelFileError(missing_tensor) or (unsupported_dtype) for a dtype other than F64, F32, F16,
  /// BF16, F8_E4M3, F8_E5M2 (the 8-bit floats widened as stored, without any block scale).
  /// Cost: one pass over the tensor's bytes.
  template <typename Scalar>
  std::vector<Scalar> values(const std::string& name) const {
    const SafetensorsTensorInfo& tensor = info(name);
    std::vector<Scalar> out(static_cast<std::size_t>(tensor.num_elements()));
    convert(tensor, out.data(), "values");
    return out;
  }

  /// Tensor `name` as a rows×cols matrix (its shape must be exactly [rows, cols]). Throws
  /// ModelFileError: missing_tensor, shape_mismatch (naming both shapes), unsupported_dtype.
  template <typename Scalar>
  Matrix<Scalar> matrix(const std::string& name, Index rows, Index cols) const {
    const SafetensorsTensorInfo& tensor = info(name);
    require_shape(tensor, {static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)}, "matrix");
    Matrix<Scalar> out(rows, cols);
    convert(tensor, out.data(), "matrix");
    return out;
  }

  /// Tensor `name` as a vector of `size` entries (its shape must be exactly [size]). Errors as
  /// matrix().
  template <typename Scalar>
  Vector<Scalar> vector(const std::string& name, Index size) const {
    const SafetensorsTensorInfo& tensor = info(name);
    require_shape(tensor, {static_cast<std::uint64_t>(size)}, "vector");
    Vector<Scalar> out(size);
    convert(tensor, out.data(), "vector");
    return out;
  }

 private:
  SafetensorsFile(std::string path, std::shared_ptr<const detail::MappedBytes> bytes, const std::string& context)
      : path_(std::move(path)), bytes_(std::move(bytes)) {
    parse(context);
  }

  std::string context(const char* function) const {
    return detail::file_context((std::string("sparsemoe::SafetensorsFile::") + function).c_str(), path_);
  }

  const unsigned char* data_begin() const { return bytes_->data() + 8 + header_size_; }

  void require_shape(const SafetensorsTensorInfo& tensor, const std::vector<std::uint64_t>& expected,
                     const char* function) const {
    if (tensor.shape != expected) {
      detail::model_file_fail(ModelFileErrorKind::shape_mismatch, context(function), "tensor '", tensor.name,
                              "' has shape ", detail::shape_text(tensor.shape), ", expected ",
                              detail::shape_text(expected));
    }
  }

  template <typename Scalar>
  void convert(const SafetensorsTensorInfo& tensor, Scalar* out, const char* function) const {
    if (!detail::convert_elements(tensor.dtype, raw_data(tensor), static_cast<std::size_t>(tensor.num_elements()), out)) {
      detail::model_file_fail(ModelFileErrorKind::unsupported_dtype, context(function), "tensor '", tensor.name,
                              "' has dtype ", to_string(tensor.dtype), "; only F64, F32, F16, BF16, F8_E4M3 and "
                              "F8_E5M2 convert to a floating-point Scalar");
    }
  }

  /// Parses and checks the header; fills tensors_, index_, metadata_, header_size_.
  void parse(const std::string& context) {
    using detail::model_file_fail;
    const std::size_t size = bytes_->size();
    const unsigned char* data = bytes_->data();
    if (size < 8) {
      model_file_fail(ModelFileErrorKind::truncated, context, "the file has ", size,
                      " bytes, fewer than the 8 of the header length");
    }
    std::uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = header << 8 | data[i];
    if (header > safetensors_max_header_bytes) {
      model_file_fail(ModelFileErrorKind::header_too_large, context, "the header length is ", header,
                      " bytes, more than the limit of ", safetensors_max_header_bytes);
    }
    if (header > size - 8) {
      model_file_fail(ModelFileErrorKind::truncated, context, "the header length is ", header, " bytes, but only ",
                      size - 8, " bytes follow the length");
    }
    header_size_ = header;
    const char* text = reinterpret_cast<const char*>(data + 8);
    if (header < 2 || text[0] != '{') {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "the header must be a JSON object starting with '{'");
    }
    std::string duplicate;
    const nlohmann::json json = detail::parse_json_checked(text, text + header, duplicate);
    if (json.is_discarded() || !json.is_object()) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "the ", header, "-byte header is not valid JSON");
    }
    if (!duplicate.empty()) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "the header repeats the key '", duplicate, "'");
    }
    const std::uint64_t buffer = size - 8 - header;
    std::vector<SafetensorsTensorInfo> tensors;
    std::map<std::string, std::string> metadata;
    for (const auto& entry : json.items()) {
      if (entry.key() == "__metadata__") {
        if (!entry.value().is_object()) {
          model_file_fail(ModelFileErrorKind::malformed_header, context, "__metadata__ must be an object of strings");
        }
        for (const auto& item : entry.value().items()) {
          if (!item.value().is_string()) {
            model_file_fail(ModelFileErrorKind::malformed_header, context, "__metadata__ value of '", item.key(),
                            "' is not a string");
          }
          metadata[item.key()] = item.value().get<std::string>();
        }
        continue;
      }
      tensors.push_back(parse_entry(entry.key(), entry.value(), buffer, context));
    }
    std::sort(tensors.begin(), tensors.end(), [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t covered = 0;
    const SafetensorsTensorInfo* previous = nullptr;
    for (const SafetensorsTensorInfo& tensor : tensors) {
      if (tensor.begin < covered) {
        model_file_fail(ModelFileErrorKind::overlapping_tensors, context, "tensor '", tensor.name, "' (bytes ",
                        tensor.begin, "..", tensor.end, ") overlaps tensor '", previous->name, "' (bytes ",
                        previous->begin, "..", previous->end, ")");
      }
      if (tensor.begin > covered) {
        model_file_fail(ModelFileErrorKind::uncovered_bytes, context, "bytes ", covered, "..", tensor.begin,
                        " of the data buffer belong to no tensor (before tensor '", tensor.name, "')");
      }
      covered = tensor.end;
      previous = &tensor;
    }
    if (covered != buffer) {
      model_file_fail(ModelFileErrorKind::uncovered_bytes, context, "the data buffer has ", buffer,
                      " bytes but its tensors end at byte ", covered);
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) index_[tensors[i].name] = i;
    tensors_ = std::move(tensors);
    metadata_ = std::move(metadata);
  }

  static SafetensorsTensorInfo parse_entry(const std::string& name, const nlohmann::json& value, std::uint64_t buffer,
                                           const std::string& context) {
    using detail::model_file_fail;
    if (!value.is_object()) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "entry '", name, "' is not an object");
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(field)) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", name, "' has no \"", field, "\"");
      }
    }
    const nlohmann::json& dtype = value.at("dtype");
    if (!dtype.is_string()) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", name, "': dtype is not a string");
    }
    SafetensorsTensorInfo tensor;
    tensor.name = name;
    const std::optional<SafetensorsDtype> parsed = parse_safetensors_dtype(dtype.get<std::string>());
    if (!parsed) {
      model_file_fail(ModelFileErrorKind::unknown_dtype, context, "tensor '", name, "' has dtype '",
                      dtype.get<std::string>(), "', which the format does not define");
    }
    tensor.dtype = *parsed;
    const nlohmann::json& shape = value.at("shape");
    if (!shape.is_array()) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", name, "': shape is not an array");
    }
    std::uint64_t bytes = element_size(tensor.dtype);
    bool overflow = false;
    for (const nlohmann::json& extent : shape) {
      const std::optional<std::uint64_t> dimension = detail::json_unsigned(extent);
      if (!dimension) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", name, "': shape entry ",
                        extent.dump(), " is not a non-negative integer");
      }
      tensor.shape.push_back(*dimension);
      if (*dimension != 0 && bytes > std::numeric_limits<std::uint64_t>::max() / *dimension) overflow = true;
      bytes *= *dimension;
    }
    const nlohmann::json& offsets = value.at("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2 || !detail::json_unsigned(offsets[0]) ||
        !detail::json_unsigned(offsets[1])) {
      model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", name,
                      "': data_offsets must be two non-negative integers, got ", offsets.dump());
    }
    tensor.begin = *detail::json_unsigned(offsets[0]);
    tensor.end = *detail::json_unsigned(offsets[1]);
    if (tensor.begin > tensor.end || tensor.end > buffer) {
      model_file_fail(ModelFileErrorKind::offset_out_of_range, context, "tensor '", name, "' has data_offsets [",
                      tensor.begin, ", ", tensor.end, "], outside the ", buffer, "-byte data buffer");
    }
    if (overflow && tensor.num_elements() != 0) {
      model_file_fail(ModelFileErrorKind::size_mismatch, context, "tensor '", name, "' of shape ",
                      detail::shape_text(tensor.shape), " would need more than 2^64 bytes");
    }
    if (tensor.end - tensor.begin != bytes) {
      model_file_fail(ModelFileErrorKind::size_mismatch, context, "tensor '", name, "' of dtype ",
                      to_string(tensor.dtype), " and shape ", detail::shape_text(tensor.shape), " needs ", bytes,
                      " bytes, but its data_offsets [", tensor.begin, ", ", tensor.end, "] hold ",
                      tensor.end - tensor.begin);
    }
    return tensor;
  }

  std::string path_;
  std::shared_ptr<const detail::MappedBytes> bytes_;
  std::uint64_t header_size_ = 0;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A model in one or several safetensors files (shards): each tensor name maps to the shard that
/// holds it. open() takes a .safetensors file, a model.safetensors.index.json, or a directory
/// holding one of those (the index first). Every shard is mapped and checked when the model is
/// opened; tensors are converted when asked for.
class SafetensorsModel {
 public:
  /// Opens `path` (see the class comment). For an index, `weight_map` (tensor → shard file name,
  /// relative to the index's directory) must be an object of strings naming files in that
  /// directory, and every tensor it lists must be in its shard. Throws ModelFileError:
  /// malformed_index, missing_tensor, or any error of SafetensorsFile::open for a shard.
  static SafetensorsModel open(const std::string& path) {
    struct stat status {};
    if (::stat(path.c_str(), &status) == 0 && S_ISDIR(status.st_mode)) {
      const std::string index = path + "/model.safetensors.index.json";
      if (::stat(index.c_str(), &status) == 0) return open_index(index);
      return SafetensorsModel({SafetensorsFile::open(path + "/model.safetensors")});
    }
    const std::string suffix = ".json";
    if (path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0) {
      return open_index(path);
    }
    return SafetensorsModel({SafetensorsFile::open(path)});
  }

  /// A model over `shards`. Throws ModelFileError(malformed_index) when two shards hold a tensor
  /// of the same name.
  explicit SafetensorsModel(std::vector<SafetensorsFile> shards) : shards_(std::move(shards)) {
    for (std::size_t shard = 0; shard < shards_.size(); ++shard) {
      for (const SafetensorsTensorInfo& tensor : shards_[shard].tensors()) {
        const auto inserted = shard_of_.emplace(tensor.name, shard);
        if (!inserted.second) {
          detail::model_file_fail(ModelFileErrorKind::malformed_index, "sparsemoe::SafetensorsModel", "tensor '",
                                  tensor.name, "' is in both '", shards_[inserted.first->second].path(), "' and '",
                                  shards_[shard].path(), "'");
        }
      }
    }
  }

  /// The shards, in the order given (for an index: by first appearance in the sorted weight_map).
  const std::vector<SafetensorsFile>& shards() const { return shards_; }
  /// Whether a shard holds tensor `name`.
  bool contains(const std::string& name) const { return shard_of_.count(name) > 0; }
  /// Every tensor name, sorted.
  std::vector<std::string> tensor_names() const {
    std::vector<std::string> names;
    names.reserve(shard_of_.size());
    for (const auto& entry : shard_of_) names.push_back(entry.first);
    return names;
  }

  /// The shard holding `name`; throws ModelFileError(missing_tensor) naming it.
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto found = shard_of_.find(name);
    if (found == shard_of_.end()) {
      detail::model_file_fail(ModelFileErrorKind::missing_tensor, "sparsemoe::SafetensorsModel", "no tensor '", name,
                              "' in the model's ", shards_.size(), " file(s)");
    }
    return shards_[found->second];
  }

  /// SafetensorsFile::info of the shard holding `name`.
  const SafetensorsTensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  /// SafetensorsFile::matrix of the shard holding `name`.
  template <typename Scalar>
  Matrix<Scalar> matrix(const std::string& name, Index rows, Index cols) const {
    return file_of(name).template matrix<Scalar>(name, rows, cols);
  }
  /// SafetensorsFile::vector of the shard holding `name`.
  template <typename Scalar>
  Vector<Scalar> vector(const std::string& name, Index size) const {
    return file_of(name).template vector<Scalar>(name, size);
  }

 private:
  static SafetensorsModel open_index(const std::string& path) {
    const std::string context = detail::file_context("sparsemoe::SafetensorsModel::open", path);
    const auto bytes = detail::MappedBytes::map(path, context);
    const char* text = reinterpret_cast<const char*>(bytes->data());
    std::string duplicate;
    const nlohmann::json json = detail::parse_json_checked(text, text + bytes->size(), duplicate);
    if (json.is_discarded() || !json.is_object() || !json.contains("weight_map") || !json.at("weight_map").is_object()) {
      detail::model_file_fail(ModelFileErrorKind::malformed_index, context,
                              "expected a JSON object with a \"weight_map\" object");
    }
    if (!duplicate.empty()) {
      detail::model_file_fail(ModelFileErrorKind::malformed_index, context, "the index repeats the key '", duplicate, "'");
    }
    const std::string directory = detail::directory_of(path);
    std::vector<std::string> files;
    std::map<std::string, std::string> file_of_tensor;
    for (const auto& entry : json.at("weight_map").items()) {
      if (!entry.value().is_string()) {
        detail::model_file_fail(ModelFileErrorKind::malformed_index, context, "weight_map entry '", entry.key(),
                                "' is not a string");
      }
      const std::string file = entry.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
        detail::model_file_fail(ModelFileErrorKind::malformed_index, context, "weight_map entry '", entry.key(),
                                "' names '", file, "', not a file name in the index's directory");
      }
      if (std::find(files.begin(), files.end(), file) == files.end()) files.push_back(file);
      file_of_tensor[entry.key()] = file;
    }
    std::vector<SafetensorsFile> shards;
    for (const std::string& file : files) shards.push_back(SafetensorsFile::open(directory + "/" + file));
    SafetensorsModel model(std::move(shards));
    for (const auto& entry : file_of_tensor) {
      if (!model.contains(entry.first) || model.file_of(entry.first).path() != directory + "/" + entry.second) {
        detail::model_file_fail(ModelFileErrorKind::missing_tensor, context, "weight_map puts tensor '", entry.first,
                                "' in '", entry.second, "', which does not hold it");
      }
    }
    return model;
  }

  std::vector<SafetensorsFile> shards_;
  std::map<std::string, std::size_t> shard_of_;
};

namespace detail {

/// write_file_atomically(path, content, function) for the model-file writers: its
/// CheckpointError(io) becomes a ModelFileError(io) with the same message.
inline void write_model_file(const std::string& path, const std::string& content, const char* function) {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  try {
    write_file_atomically(path, content, function);
  } catch (const CheckpointError& error) {
    SPARSEMOE_THROW(ModelFileError, (ModelFileFailure{ModelFileErrorKind::io, error.what()}));
  }
#else
  write_file_atomically(path, content, function);
#endif
}

}  // namespace detail

/// Builds a safetensors file: add tensors (converted from float or double to F64, F32, F16 or
/// BF16, rounding to nearest even), set metadata, then bytes() or write(). The output is
/// canonical: tensors ordered by element size (largest first, so that every tensor starts at a
/// multiple of its element size), then by name; the header is compact JSON with sorted keys,
/// padded with spaces to a multiple of 8 bytes. Hugging Face's safetensors library reads it.
class SafetensorsWriter {
 public:
  /// Sets "__metadata__"[key] = value.
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Adds tensor `name` of `shape` from `values` (product(shape) elements, row-major), stored as
  /// `dtype`. A double converts to F16 through float. Throws std::invalid_argument for an empty
  /// or reserved name ("__metadata__"), a name already added, a dtype other than F64, F32, F16,
  /// BF16, or a shape whose product differs from values' size.
  template <typename Scalar>
  void add(const std::string& name, const std::vector<std::uint64_t>& shape, const Scalar* values, std::size_t count,
           SafetensorsDtype dtype = SafetensorsDtype::f32) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::SafetensorsWriter::add";
    detail::require(!name.empty() && name != "__metadata__", function, "invalid tensor name '", name, "'");
    detail::require(entries_.count(name) == 0, function, "tensor '", name, "' was already added");
    std::uint64_t elements = 1;
    for (const std::uint64_t extent : shape) elements *= extent;
    detail::require(elements == count, function, "tensor '", name, "': shape ", detail::shape_text(shape), " has ",
                    elements, " elements, got ", count, " values");
    Entry entry{dtype, shape, std::string()};
    entry.bytes.resize(count * element_size(dtype));
    unsigned char* out = reinterpret_cast<unsigned char*>(&entry.bytes[0]);
    for (std::size_t i = 0; i < count; ++i) {
      switch (dtype) {
        case SafetensorsDtype::f64: {
          const double value = static_cast<double>(values[i]);
          std::memcpy(out + 8 * i, &value, 8);
          break;
        }
        case SafetensorsDtype::f32: {
          const float value = static_cast<float>(values[i]);
          std::memcpy(out + 4 * i, &value, 4);
          break;
        }
        case SafetensorsDtype::f16:
        case SafetensorsDtype::bf16: {
          const float value = static_cast<float>(values[i]);
          const std::uint16_t bits =
              dtype == SafetensorsDtype::bf16 ? detail::bf16_from_float(value) : detail::f16_from_float(value);
          out[2 * i] = static_cast<unsigned char>(bits & 0xFFu);
          out[2 * i + 1] = static_cast<unsigned char>(bits >> 8);
          break;
        }
        default:
          detail::require(false, function, "tensor '", name, "': cannot write dtype ", to_string(dtype),
                          " (F64, F32, F16 or BF16 only)");
      }
    }
    entries_.emplace(name, std::move(entry));
  }

  /// Adds an Eigen matrix or vector as a tensor of `shape` (row-major order of its elements, which
  /// for a sparsemoe::Matrix is its storage order). Errors as the pointer overload.
  template <typename Derived>
  void add(const std::string& name, const std::vector<std::uint64_t>& shape, const Eigen::DenseBase<Derived>& values,
           SafetensorsDtype dtype = SafetensorsDtype::f32) {
    using Scalar = typename Derived::Scalar;
    const Matrix<Scalar> row_major = values;  // row-major copy, whatever the argument's layout
    add(name, shape, row_major.data(), static_cast<std::size_t>(row_major.size()), dtype);
  }

  /// Number of tensors added.
  std::size_t size() const { return entries_.size(); }

  /// The file's bytes. Cost: one copy of every tensor.
  std::string bytes() const {
    std::vector<const std::pair<const std::string, Entry>*> order;
    for (const auto& entry : entries_) order.push_back(&entry);
    std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
      return element_size(a->second.dtype) > element_size(b->second.dtype);
    });
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto* entry : order) {
      const std::uint64_t end = offset + entry->second.bytes.size();
      header[entry->first] = {{"dtype", to_string(entry->second.dtype)},
                              {"shape", entry->second.shape},
                              {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::string out;
    out.reserve(8 + text.size() + offset);
    std::uint64_t length = text.size();
    for (int i = 0; i < 8; ++i, length >>= 8) out.push_back(static_cast<char>(length & 0xFFu));
    out += text;
    for (const auto* entry : order) out += entry->second.bytes;
    return out;
  }

  /// Writes bytes() to `path` atomically (a temporary file renamed over it; see file.hpp).
  /// Throws ModelFileError(io) naming the step, the path and errno.
  void write(const std::string& path) const {
    detail::write_model_file(path, bytes(), "sparsemoe::SafetensorsWriter::write");
  }

 private:
  struct Entry {
    SafetensorsDtype dtype;
    std::vector<std::uint64_t> shape;
    std::string bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_SAFETENSORS_HPP
