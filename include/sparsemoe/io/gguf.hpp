// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_GGUF_HPP
#define SPARSEMOE_IO_GGUF_HPP

/// \file gguf.hpp
/// llama.cpp's GGUF files (versions 2 and 3): a memory-mapped reader (GgufFile) with its metadata
/// and tensor directory checked before use, F32/F16/BF16/F64 and Q8_0 tensors dequantised to the
/// Scalar on load, and the MoE blocks of the GGUF architectures llama (Mixtral), qwen2moe,
/// qwen3moe, olmoe and deepseek2 (DeepSeek-V2/V3) built as MoELayers (load_gguf_moe_block).
/// Needs nlohmann/json (the metadata is held as JSON values); not in the umbrella header. Writing
/// GGUF files, and MoE layers into them: gguf_writer.hpp.
///
/// Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata (key string,
/// u32 value type, value), the tensor infos (name, u32 n_dims, n_dims × u64 ne, u32 ggml type,
/// u64 offset), padding to the alignment (metadata general.alignment, default 32), then the
/// tensor data; every offset is relative to the data section and a multiple of the alignment.
/// Strings are a u64 length and UTF-8 bytes; all integers little-endian.
///
/// **Dimension order.** ggml lists dimensions fastest-varying first: ne = {a, b, c} is the
/// row-major array [c][b][a]. GgufTensorInfo::ne keeps the file's order; GgufTensorInfo::shape()
/// gives the row-major (outermost first) shape that matrix(), vector() and slice() take. So a
/// router `ffn_gate_inp` with ne {H, E} is the row-major [E, H] of Hugging Face's gate.weight.

#include "hf_models.hpp"
#include "model_file_error.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup model_files
/// @{

/// The ggml tensor types whose sizes the GGUF reader knows (their numeric ids are the file's).
/// F32, F16, BF16, F64 and Q8_0 convert to a Scalar; the others are checked and listed only.
enum class GgmlType : std::uint32_t {
  f32 = 0,    ///< float
  f16 = 1,    ///< IEEE-754 binary16
  q4_0 = 2,   ///< 32-element blocks of 18 bytes
  q4_1 = 3,   ///< 32-element blocks of 20 bytes
  q5_0 = 6,   ///< 32-element blocks of 22 bytes
  q5_1 = 7,   ///< 32-element blocks of 24 bytes
  q8_0 = 8,   ///< 32-element blocks: an f16 scale d, then 32 int8 q; value = d·q (converted)
  q8_1 = 9,   ///< 32-element blocks of 36 bytes
  q2_k = 10,  ///< 256-element blocks of 84 bytes
  q3_k = 11,  ///< 256-element blocks of 110 bytes
  q4_k = 12,  ///< 256-element blocks of 144 bytes
  q5_k = 13,  ///< 256-element blocks of 176 bytes
  q6_k = 14,  ///< 256-element blocks of 210 bytes
  q8_k = 15,  ///< 256-element blocks of 292 bytes
  i8 = 24,    ///< int8
  i16 = 25,   ///< int16
  i32 = 26,   ///< int32
  i64 = 27,   ///< int64
  f64 = 28,   ///< double
  bf16 = 30,  ///< bfloat16
};

/// A readable name of `type` ("Q8_0", …).
inline const char* to_string(GgmlType type) {
  switch (type) {
    case GgmlType::f32: return "F32";
    case GgmlType::f16: return "F16";
    case GgmlType::q4_0: return "Q4_0";
    case GgmlType::q4_1: return "Q4_1";
    case GgmlType::q5_0: return "Q5_0";
    case GgmlType::q5_1: return "Q5_1";
    case GgmlType::q8_0: return "Q8_0";
    case GgmlType::q8_1: return "Q8_1";
    case GgmlType::q2_k: return "Q2_K";
    case GgmlType::q3_k: return "Q3_K";
    case GgmlType::q4_k: return "Q4_K";
    case GgmlType::q5_k: return "Q5_K";
    case GgmlType::q6_k: return "Q6_K";
    case GgmlType::q8_k: return "Q8_K";
    case GgmlType::i8: return "I8";
    case GgmlType::i16: return "I16";
    case GgmlType::i32: return "I32";
    case GgmlType::i64: return "I64";
    case GgmlType::f64: return "F64";
    case GgmlType::bf16: return "BF16";
  }
  return "?";
}

/// Elements per block and bytes per block of a ggml type id, or nothing for an id the reader does
/// not know. Plain types have blocks of one element.
inline std::optional<std::pair<std::uint64_t, std::uint64_t>> ggml_block_layout(std::uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::f32: return std::make_pair(1u, 4u);
    case GgmlType::f16: return std::make_pair(1u, 2u);
    case GgmlType::q4_0: return std::make_pair(32u, 18u);
    case GgmlType::q4_1: return std::make_pair(32u, 20u);
    case GgmlType::q5_0: return std::make_pair(32u, 22u);
    case GgmlType::q5_1: return std::make_pair(32u, 24u);
    case GgmlType::q8_0: return std::make_pair(32u, 34u);
    case GgmlType::q8_1: return std::make_pair(32u, 36u);
    case GgmlType::q2_k: return std::make_pair(256u, 84u);
    case GgmlType::q3_k: return std::make_pair(256u, 110u);
    case GgmlType::q4_k: return std::make_pair(256u, 144u);
    case GgmlType::q5_k: return std::make_pair(256u, 176u);
    case GgmlType::q6_k: return std::make_pair(256u, 210u);
    case GgmlType::q8_k: return std::make_pair(256u, 292u);
    case GgmlType::i8: return std::make_pair(1u, 1u);
    case GgmlType::i16: return std::make_pair(1u, 2u);
    case GgmlType::i32: return std::make_pair(1u, 4u);
    case GgmlType::i64: return std::make_pair(1u, 8u);
    case GgmlType::f64: return std::make_pair(1u, 8u);
    case GgmlType::bf16: return std::make_pair(1u, 2u);
  }
  return std::nullopt;
}

/// One tensor of a GGUF file, checked against the file.
struct GgufTensorInfo {
  std::string name;                  ///< the tensor's name
  GgmlType type = GgmlType::f32;     ///< element or block type
  std::vector<std::uint64_t> ne;     ///< dimensions as ggml lists them, fastest-varying first
  std::uint64_t offset = 0;          ///< first byte, relative to the data section
  std::uint64_t size_bytes = 0;      ///< bytes of data

  /// The row-major shape, outermost first: ne reversed.
  std::vector<std::uint64_t> shape() const { return std::vector<std::uint64_t>(ne.rbegin(), ne.rend()); }
  /// The number of elements, the product of ne.
  std::uint64_t num_elements() const {
    std::uint64_t count = 1;
    for (const std::uint64_t extent : ne) count *= extent;
    return count;
  }
};

namespace detail {

/// Bounds-checked little-endian reads over a GGUF file; running past the end is a
/// ModelFileError(truncated) naming the field and the offset.
class GgufCursor {
 public:
  GgufCursor(const unsigned char* data, std::size_t size, const std::string& context)
      : data_(data), size_(size), context_(context) {}

  std::size_t position() const { return position_; }
  std::size_t remaining() const { return size_ - position_; }

  const unsigned char* take(std::size_t bytes, const char* field) {
    if (bytes > remaining()) {
      model_file_fail(ModelFileErrorKind::truncated, context_, field, " at offset ", position_, " needs ", bytes,
                      " bytes, only ", remaining(), " remain");
    }
    const unsigned char* at = data_ + position_;
    position_ += bytes;
    return at;
  }
  std::uint64_t unsigned_integer(std::size_t bytes, const char* field) {
    const unsigned char* at = take(bytes, field);
    std::uint64_t value = 0;
    for (std::size_t i = bytes; i-- > 0;) value = value << 8 | at[i];
    return value;
  }
  std::uint32_t u32(const char* field) { return static_cast<std::uint32_t>(unsigned_integer(4, field)); }
  std::uint64_t u64(const char* field) { return unsigned_integer(8, field); }
  std::string string(const char* field) {
    const std::uint64_t length = u64(field);
    if (length > remaining()) {
      model_file_fail(ModelFileErrorKind::truncated, context_, field, " at offset ", position_ - 8, " is ", length,
                      " bytes long, only ", remaining(), " remain");
    }
    const unsigned char* at = take(static_cast<std::size_t>(length), field);
    return std::string(reinterpret_cast<const char*>(at), static_cast<std::size_t>(length));
  }

 private:
  const unsigned char* data_;
  std::size_t size_;
  std::size_t position_ = 0;
  const std::string& context_;
};

/// Reads one metadata value of GGUF type `type` as JSON (arrays nest up to 8 deep).
inline nlohmann::json read_gguf_value(GgufCursor& cursor, std::uint32_t type, const std::string& key, int depth,
                                      const std::string& context) {
  const char* field = "metadata value";
  switch (type) {
    case 0: return cursor.unsigned_integer(1, field);
    case 1: return static_cast<std::int8_t>(cursor.unsigned_integer(1, field));
    case 2: return cursor.unsigned_integer(2, field);
    case 3: return static_cast<std::int16_t>(cursor.unsigned_integer(2, field));
    case 4: return cursor.unsigned_integer(4, field);
    case 5: return static_cast<std::int32_t>(cursor.unsigned_integer(4, field));
    case 6: {
      const std::uint32_t bits = static_cast<std::uint32_t>(cursor.unsigned_integer(4, field));
      return static_cast<double>(float_from_bits(bits));
    }
    case 7: {
      const std::uint64_t value = cursor.unsigned_integer(1, field);
      if (value > 1) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "metadata '", key, "': bool value ", value);
      }
      return value == 1;
    }
    case 8: return cursor.string(field);
    case 9: {
      if (depth >= 8) model_file_fail(ModelFileErrorKind::malformed_header, context, "metadata '", key, "': arrays nest too deep");
      const std::uint32_t element_type = cursor.u32("array element type");
      const std::uint64_t count = cursor.u64("array length");
      if (count > cursor.remaining()) {  // every element takes at least one byte
        model_file_fail(ModelFileErrorKind::truncated, context, "metadata '", key, "': an array of ", count,
                        " elements cannot fit in the ", cursor.remaining(), " bytes that remain");
      }
      nlohmann::json array = nlohmann::json::array();
      for (std::uint64_t i = 0; i < count; ++i) array.push_back(read_gguf_value(cursor, element_type, key, depth + 1, context));
      return array;
    }
    case 10: return cursor.u64(field);
    case 11: return static_cast<std::int64_t>(cursor.u64(field));
    case 12: {
      const std::uint64_t bits = cursor.u64(field);
      double value = 0;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    default:
      model_file_fail(ModelFileErrorKind::malformed_header, context, "metadata '", key, "' has value type ", type,
                      " (0-12 are defined)");
  }
}

}  // namespace detail

/// One GGUF file, memory-mapped (open) or held in memory (from_bytes), with its header,
/// metadata and tensor directory parsed and checked: magic, version 2 or 3, counts that fit the
/// file, well-formed metadata values, a power-of-two alignment, tensor types the reader knows, at
/// most 4 dimensions, quantised rows that are whole blocks, offsets aligned, in range and not
/// overlapping, no repeated names. Tensors are converted when asked for. Copies share the mapping.
class GgufFile {
 public:
  /// Maps the file at `path` and checks it (see the class comment). Throws ModelFileError: io,
  /// truncated, bad_magic, unsupported_version, malformed_header, unknown_dtype, size_mismatch,
  /// misaligned_tensor, offset_out_of_range, overlapping_tensors. Cost: O(metadata + tensor infos).
  static GgufFile open(const std::string& path) {
    const std::string context = detail::file_context("sparsemoe::GgufFile::open", path);
    return GgufFile(path, detail::MappedBytes::map(path, context), context);
  }

  /// The same checks over `content`, the bytes of a file (named `name` in messages).
  static GgufFile from_bytes(std::string content, const std::string& name = "<memory>") {
    const std::string context = detail::file_context("sparsemoe::GgufFile::from_bytes", name);
    return GgufFile(name, detail::MappedBytes::own(std::move(content)), context);
  }

  /// The path (or name) the file was opened from.
  const std::string& path() const { return path_; }
  /// The format version (2 or 3).
  std::uint32_t version() const { return version_; }
  /// The data alignment (general.alignment, 32 when absent).
  std::uint64_t alignment() const { return alignment_; }
  /// Every metadata key with its value as JSON (integers, floats, bools, strings, arrays).
  const nlohmann::json& metadata() const { return metadata_; }
  /// The tensors, in the file's order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  /// Whether the file has a tensor named `name`.
  bool contains(const std::string& name) const { return index_.count(name) > 0; }

  /// The tensor `name`; throws ModelFileError(missing_tensor) naming it and the file.
  const GgufTensorInfo& info(const std::string& name) const {
    const auto found = index_.find(name);
    if (found == index_.end()) {
      detail::model_file_fail(ModelFileErrorKind::missing_tensor, context("info"), "no tensor '", name, "' (the file has ",
                              tensors_.size(), " tensors)");
    }
    return tensors_[found->second];
  }

  /// Tensor `name` converted to Scalar, all elements in row-major order. Throws
  /// ModelFileError(missing_tensor) or (unsupported_dtype) for a type other than F32, F16, BF16,
  /// F64, Q8_0. Cost: one pass over the tensor's bytes.
  template <typename Scalar>
  std::vector<Scalar> values(const std::string& name) const {
    const GgufTensorInfo& tensor = info(name);
    std::vector<Scalar> out(static_cast<std::size_t>(tensor.num_elements()));
    convert(tensor, 0, tensor.num_elements(), out.data(), "values");
    return out;
  }

  /// Tensor `name`, whose row-major shape must be [rows, cols] (ne = {cols, rows}), as a matrix.
  /// Throws ModelFileError: missing_tensor, shape_mismatch (naming both shapes), unsupported_dtype.
  template <typename Scalar>
  Matrix<Scalar> matrix(const std::string& name, Index rows, Index cols) const {
    const GgufTensorInfo& tensor = info(name);
    require_shape(tensor, {static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)}, "matrix");
    Matrix<Scalar> out(rows, cols);
    convert(tensor, 0, tensor.num_elements(), out.data(), "matrix");
    return out;
  }

  /// Tensor `name`, whose shape must be [size] (ne = {size}), as a vector. Errors as matrix().
  template <typename Scalar>
  Vector<Scalar> vector(const std::string& name, Index size) const {
    const GgufTensorInfo& tensor = info(name);
    require_shape(tensor, {static_cast<std::uint64_t>(size)}, "vector");
    Vector<Scalar> out(size);
    convert(tensor, 0, tensor.num_elements(), out.data(), "vector");
    return out;
  }

  /// Matrix `index` of the stacked tensor `name`, whose row-major shape must be [count, rows, cols]
  /// (ne = {cols, rows, count}) with index < count: for example expert e's [I, H] projection out
  /// of `ffn_up_exps` (ne {H, I, E}). Converts that matrix only. Errors as matrix().
  template <typename Scalar>
  Matrix<Scalar> slice(const std::string& name, Index index, Index count, Index rows, Index cols) const {
    const GgufTensorInfo& tensor = info(name);
    require_shape(tensor,
                  {static_cast<std::uint64_t>(count), static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)},
                  "slice");
    detail::require(index >= 0 && index < count, "sparsemoe::GgufFile::slice", "index ", index, " is not below ", count);
    Matrix<Scalar> out(rows, cols);
    const std::uint64_t elements = static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(cols);
    convert(tensor, static_cast<std::uint64_t>(index) * elements, elements, out.data(), "slice");
    return out;
  }

 private:
  GgufFile(std::string path, std::shared_ptr<const detail::MappedBytes> bytes, const std::string& context)
      : path_(std::move(path)), bytes_(std::move(bytes)) {
    parse(context);
  }

  std::string context(const char* function) const {
    return detail::file_context((std::string("sparsemoe::GgufFile::") + function).c_str(), path_);
  }

  void require_shape(const GgufTensorInfo& tensor, const std::vector<std::uint64_t>& expected, const char* function) const {
    if (tensor.shape() != expected) {
      detail::model_file_fail(ModelFileErrorKind::shape_mismatch, context(function), "tensor '", tensor.name,
                              "' has row-major shape ", detail::shape_text(tensor.shape()), " (ggml ne ",
                              detail::shape_text(tensor.ne), "), expected ", detail::shape_text(expected));
    }
  }

  /// Converts elements [first, first + count) of `tensor` (first and count whole rows, so whole
  /// blocks) into `out`.
  template <typename Scalar>
  void convert(const GgufTensorInfo& tensor, std::uint64_t first, std::uint64_t count, Scalar* out,
               const char* function) const {
    const unsigned char* data = bytes_->data() + data_offset_ + tensor.offset;
    const std::size_t n = static_cast<std::size_t>(count);
    switch (tensor.type) {
      case GgmlType::f32:
        detail::convert_elements(SafetensorsDtype::f32, data + 4 * first, n, out);
        return;
      case GgmlType::f64:
        detail::convert_elements(SafetensorsDtype::f64, data + 8 * first, n, out);
        return;
      case GgmlType::f16:
        detail::convert_elements(SafetensorsDtype::f16, data + 2 * first, n, out);
        return;
      case GgmlType::bf16:
        detail::convert_elements(SafetensorsDtype::bf16, data + 2 * first, n, out);
        return;
      case GgmlType::q8_0: {
        const unsigned char* block = data + first / 32 * 34;
        for (std::size_t b = 0; b < n / 32; ++b, block += 34) {
          const float scale = detail::float_from_f16(static_cast<std::uint16_t>(block[0] | block[1] << 8));
          for (std::size_t j = 0; j < 32; ++j) {
            const float quantised = static_cast<float>(static_cast<std::int8_t>(block[2 + j]));
            out[32 * b + j] = static_cast<Scalar>(scale * quantised);
          }
        }
        return;
      }
      default:
        detail::model_file_fail(ModelFileErrorKind::unsupported_dtype, context(function), "tensor '", tensor.name,
                                "' has type ", to_string(tensor.type),
                                "; only F32, F16, BF16, F64 and Q8_0 convert to a floating-point Scalar");
    }
  }

  void parse(const std::string& context) {
    using detail::model_file_fail;
    detail::GgufCursor cursor(bytes_->data(), bytes_->size(), context);
    const unsigned char* magic = cursor.take(4, "the magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) {
      model_file_fail(ModelFileErrorKind::bad_magic, context, "the file does not start with \"GGUF\"");
    }
    version_ = cursor.u32("the version");
    if (version_ != 2 && version_ != 3) {
      model_file_fail(ModelFileErrorKind::unsupported_version, context, "version ", version_, " (2 and 3 are read)");
    }
    const std::uint64_t tensor_count = cursor.u64("the tensor count");
    const std::uint64_t metadata_count = cursor.u64("the metadata count");
    // Each metadata entry takes at least 12 bytes, each tensor info at least 24.
    if (metadata_count > cursor.remaining() / 12 || tensor_count > cursor.remaining() / 24) {
      model_file_fail(ModelFileErrorKind::truncated, context, tensor_count, " tensors and ", metadata_count,
                      " metadata entries cannot fit in the file's ", bytes_->size(), " bytes");
    }
    nlohmann::json metadata = nlohmann::json::object();
    for (std::uint64_t i = 0; i < metadata_count; ++i) {
      const std::string key = cursor.string("a metadata key");
      const std::uint32_t type = cursor.u32("a metadata value type");
      if (metadata.contains(key)) model_file_fail(ModelFileErrorKind::malformed_header, context, "metadata key '", key, "' repeats");
      metadata[key] = detail::read_gguf_value(cursor, type, key, 0, context);
    }
    std::uint64_t alignment = 32;
    if (metadata.contains("general.alignment")) {
      const nlohmann::json& value = metadata.at("general.alignment");
      if (!value.is_number_unsigned() || value.get<std::uint64_t>() == 0 ||
          (value.get<std::uint64_t>() & (value.get<std::uint64_t>() - 1)) != 0 || value.get<std::uint64_t>() > 65536) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "general.alignment must be a power of two up "
                        "to 65536, got ", value.dump());
      }
      alignment = value.get<std::uint64_t>();
    }
    std::vector<GgufTensorInfo> tensors;
    std::map<std::string, std::size_t> index;
    for (std::uint64_t i = 0; i < tensor_count; ++i) {
      GgufTensorInfo tensor;
      tensor.name = cursor.string("a tensor name");
      const std::uint32_t dimensions = cursor.u32("a tensor's dimension count");
      if (dimensions > 4) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor '", tensor.name, "' has ", dimensions,
                        " dimensions (at most 4)");
      }
      for (std::uint32_t dimension = 0; dimension < dimensions; ++dimension) tensor.ne.push_back(cursor.u64("ne"));
      const std::uint32_t type = cursor.u32("a tensor type");
      tensor.offset = cursor.u64("a tensor offset");
      const auto layout = ggml_block_layout(type);
      if (!layout) {
        model_file_fail(ModelFileErrorKind::unknown_dtype, context, "tensor '", tensor.name, "' has ggml type ", type,
                        ", whose layout this reader does not know");
      }
      tensor.type = static_cast<GgmlType>(type);
      tensor.size_bytes = tensor_bytes(tensor, layout->first, layout->second, context);
      if (tensor.offset % alignment != 0) {
        model_file_fail(ModelFileErrorKind::misaligned_tensor, context, "tensor '", tensor.name, "' at offset ",
                        tensor.offset, " is not a multiple of the alignment ", alignment);
      }
      if (!index.emplace(tensor.name, tensors.size()).second) {
        model_file_fail(ModelFileErrorKind::malformed_header, context, "tensor name '", tensor.name, "' repeats");
      }
      tensors.push_back(std::move(tensor));
    }
    const std::uint64_t data_offset = (cursor.position() + alignment - 1) / alignment * alignment;
    if (data_offset > bytes_->size() && !tensors.empty()) {
      model_file_fail(ModelFileErrorKind::truncated, context, "the data section would start at byte ", data_offset,
                      " of a ", bytes_->size(), "-byte file");
    }
    const std::uint64_t data_size = data_offset <= bytes_->size() ? bytes_->size() - data_offset : 0;
    std::vector<const GgufTensorInfo*> order;
    for (const GgufTensorInfo& tensor : tensors) {
      if (tensor.offset > data_size || tensor.size_bytes > data_size - tensor.offset) {
        model_file_fail(ModelFileErrorKind::offset_out_of_range, context, "tensor '", tensor.name, "' (bytes ",
                        tensor.offset, " + ", tensor.size_bytes, ") ends past the ", data_size, "-byte data section");
      }
      order.push_back(&tensor);
    }
    std::sort(order.begin(), order.end(), [](const GgufTensorInfo* a, const GgufTensorInfo* b) {
      return a->offset != b->offset ? a->offset < b->offset : a->size_bytes < b->size_bytes;
    });
    for (std::size_t i = 1; i < order.size(); ++i) {
      if (order[i]->offset < order[i - 1]->offset + order[i - 1]->size_bytes) {
        model_file_fail(ModelFileErrorKind::overlapping_tensors, context, "tensor '", order[i]->name, "' (offset ",
                        order[i]->offset, ") overlaps tensor '", order[i - 1]->name, "' (bytes ", order[i - 1]->offset,
                        " + ", order[i - 1]->size_bytes, ")");
      }
    }
    alignment_ = alignment;
    data_offset_ = data_offset;
    metadata_ = std::move(metadata);
    tensors_ = std::move(tensors);
    index_ = std::move(index);
  }

  /// Bytes of `tensor`: whole blocks per row (ne[0]), overflow-checked.
  static std::uint64_t tensor_bytes(const GgufTensorInfo& tensor, std::uint64_t block_elements,
                                    std::uint64_t block_bytes, const std::string& context) {
    const std::uint64_t row = tensor.ne.empty() ? 1 : tensor.ne[0];
    if (row % block_elements != 0) {
      detail::model_file_fail(ModelFileErrorKind::size_mismatch, context, "tensor '", tensor.name, "' of type ",
                              to_string(tensor.type), " has rows of ", row, " elements, not a multiple of its ",
                              block_elements, "-element blocks");
    }
    std::uint64_t bytes = row / block_elements * block_bytes;
    const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max();
    for (std::size_t i = 1; i < tensor.ne.size(); ++i) {
      if (tensor.ne[i] != 0 && bytes > limit / tensor.ne[i]) {
        detail::model_file_fail(ModelFileErrorKind::size_mismatch, context, "tensor '", tensor.name, "' with ne ",
                                detail::shape_text(tensor.ne), " would need more than 2^64 bytes");
      }
      bytes *= tensor.ne[i];
    }
    return bytes;
  }

  std::string path_;
  std::shared_ptr<const detail::MappedBytes> bytes_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::uint64_t data_offset_ = 0;
  nlohmann::json metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
};

/// The MoE block of layer `layer` of a GGUF model, from its metadata (keys prefixed by the
/// architecture, general.architecture): architecture llama with experts (Mixtral: softmax,
/// renormalised), qwen2moe (softmax, not renormalised, σ-gated shared expert of width
/// expert_shared_feed_forward_length), qwen3moe (renormalised), olmoe (not renormalised) and
/// deepseek2 (expert_gating_func 1 = softmax: DeepSeek-V2, 2 = sigmoid with the selection bias
/// exp_probs_b: DeepSeek-V3; expert_weights_norm [false], expert_weights_scale [1] applied after
/// any renormalisation, expert_group_count and expert_group_used_count [1, no groups],
/// expert_shared_count shared experts, the first leading_dense_block_count layers dense). Sizes:
/// embedding_length (d), expert_feed_forward_length (h; feed_forward_length when absent),
/// expert_count (E), expert_used_count (k); block_count bounds the layer. The routers follow
/// llama.cpp: renormalisation does not depend on k, and DeepSeek-V3's sum is clamped to at least
/// 2^−14 instead of adding 1e-20. The returned spec's prefix is "blk.L.". Throws ModelFileError:
/// unknown_architecture, missing_config_key (every missing key named), malformed_config,
/// not_moe_layer.
inline HfMoEBlockSpec gguf_moe_block_spec(const GgufFile& file, Index layer) {
  using detail::model_file_fail;
  const char* context = "sparsemoe::gguf_moe_block_spec";
  const nlohmann::json& metadata = file.metadata();
  if (!metadata.contains("general.architecture") || !metadata.at("general.architecture").is_string()) {
    model_file_fail(ModelFileErrorKind::unknown_architecture, context, "the file has no general.architecture string");
  }
  const std::string architecture = metadata.at("general.architecture").get<std::string>();
  nlohmann::json keys_of_architecture = nlohmann::json::object();
  for (const auto& item : metadata.items()) {
    if (item.key().rfind(architecture + ".", 0) == 0) keys_of_architecture[item.key().substr(architecture.size() + 1)] = item.value();
  }
  detail::HfConfigReader keys(keys_of_architecture, context, "GGUF metadata");
  HfMoEBlockSpec spec;
  spec.layer = layer;
  if (architecture == "llama" && keys_of_architecture.contains("expert_count")) spec.family = HfFamily::mixtral;
  else if (architecture == "qwen2moe") spec.family = HfFamily::qwen2_moe;
  else if (architecture == "qwen3moe") spec.family = HfFamily::qwen3_moe;
  else if (architecture == "olmoe") spec.family = HfFamily::olmoe;
  else if (architecture == "deepseek2") spec.family = HfFamily::deepseek_v2;
  else {
    model_file_fail(ModelFileErrorKind::unknown_architecture, context, "architecture '", architecture,
                    "' has no supported MoE blocks (llama with experts, qwen2moe, qwen3moe, olmoe, deepseek2)");
  }
  if (layer < 0) detail::not_moe_layer(layer, "is negative", context);
  MoEConfig& sizes = spec.config;
  sizes.input_dim = keys.integer("embedding_length");
  sizes.num_experts = keys.integer("expert_count");
  sizes.k = keys.integer("expert_used_count");
  sizes.hidden_dim = keys_of_architecture.contains("expert_feed_forward_length") ? keys.integer("expert_feed_forward_length")
                                                                                 : keys.integer("feed_forward_length");
  const Index layers = keys.integer_or("block_count", -1);
  bool normalize = spec.family == HfFamily::mixtral || spec.family == HfFamily::qwen3_moe;
  if (spec.family == HfFamily::qwen2_moe) {
    sizes.shared_hidden_dim = keys.integer("expert_shared_feed_forward_length");
    sizes.shared_expert_gate = true;
  }
  if (spec.family == HfFamily::deepseek_v2) {
    const Index gating = keys.integer_or("expert_gating_func", 1);
    if (gating != 1 && gating != 2) keys.bad("expert_gating_func", "1 (softmax) or 2 (sigmoid)");
    normalize = keys.flag_or("expert_weights_norm", false);
    const double scale = keys_of_architecture.contains("expert_weights_scale") ? keys.real("expert_weights_scale") : 1.0;
    sizes.shared_hidden_dim = keys.integer_or("expert_shared_count", 0) * sizes.hidden_dim;
    const Index dense = keys.integer_or("leading_dense_block_count", 0);
    const Index groups = keys.integer_or("expert_group_count", 1);
    const Index top_groups = keys.integer_or("expert_group_used_count", 1);
    keys.require_complete(architecture);
    if (layer < dense) {
      detail::not_moe_layer(layer, "is one of the first leading_dense_block_count = " + std::to_string(dense) +
                                       " dense layers", context);
    }
    if (gating == 2) {
      spec.family = HfFamily::deepseek_v3;
      spec.sigmoid_router = true;
      spec.sigmoid.k = sizes.k;
      spec.sigmoid.normalize_top_k = normalize;
      spec.sigmoid.normalize_epsilon = 0.0;
      spec.sigmoid.normalize_floor = 6.103515625e-05;  // llama.cpp clamps the sum to 2^-14
      spec.sigmoid.scale = scale;
      spec.sigmoid.num_groups = groups;
      spec.sigmoid.top_groups = top_groups;
    } else {
      spec.softmax.scale = scale;
      spec.softmax.num_groups = groups;
      spec.softmax.top_groups = top_groups;
    }
  }
  keys.require_complete(architecture);
  if (layers >= 0 && layer >= layers) {
    detail::not_moe_layer(layer, "is past the last layer (block_count = " + std::to_string(layers) + ")", context);
  }
  detail::finish_block_spec(spec, normalize, context);
  spec.prefix = "blk." + std::to_string(layer) + ".";
  return spec;
}

/// Builds the MoE block of `spec` (from gguf_moe_block_spec) out of `file`'s tensors, dequantised
/// to Scalar: the router ffn_gate_inp (ne {d, E}), the stacked experts ffn_gate_exps and
/// ffn_up_exps (ne {d, h, E}) and ffn_down_exps (ne {h, d, E}) — or, in files that store them one
/// by one (older Mixtral conversions), ffn_gate.E and ffn_up.E (ne {d, h}) and ffn_down.E
/// (ne {h, d}) — DeepSeek-V3's exp_probs_b (ne {E}),
/// the shared expert ffn_{gate,up}_shexp (ne {d, h_s}) and ffn_down_shexp (ne {h_s, d}), and
/// Qwen2-MoE's shared gate ffn_gate_inp_shexp (ne {d}). Each row-major [out, in] matrix is
/// transposed into the library's layout. Every tensor is checked to exist before anything is
/// converted; nothing is changed on error. Throws ModelFileError: router_mismatch, missing_tensor,
/// shape_mismatch, unsupported_dtype. Cost: one pass over the block's weights.
template <typename Layer>
Layer load_gguf_moe_block(const GgufFile& file, const HfMoEBlockSpec& spec) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  const char* context = "sparsemoe::load_gguf_moe_block";
  detail::require_block_layer<Layer>(spec, context);
  const MoEConfig& sizes = spec.config;
  const Index d = sizes.input_dim;
  const Index h = sizes.hidden_dim;
  const Index experts = sizes.num_experts;
  const std::string& p = spec.prefix;
  // Stacked experts, or (older Mixtral conversions) one tensor per expert: ffn_gate.E.weight.
  const bool stacked = !file.contains(p + "ffn_gate.0.weight") || file.contains(p + "ffn_gate_exps.weight");
  const auto per_expert = [&](const char* projection, Index e) {
    return p + projection + "." + std::to_string(e) + ".weight";
  };
  std::vector<std::string> required{p + "ffn_gate_inp.weight"};
  for (const char* projection : {"ffn_gate", "ffn_up", "ffn_down"}) {
    if (stacked) {
      required.push_back(p + projection + "_exps.weight");
    } else {
      for (Index e = 0; e < experts; ++e) required.push_back(per_expert(projection, e));
    }
  }
  if (spec.sigmoid_router) required.push_back(p + "exp_probs_b.bias");
  if (sizes.shared_hidden_dim > 0) {
    for (const char* name : {"ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"}) {
      required.push_back(p + name);
    }
  }
  if (sizes.shared_expert_gate) required.push_back(p + "ffn_gate_inp_shexp.weight");
  detail::require_tensors(file, required, spec, context);

  Layer layer(sizes, detail::make_block_router<RouterT>(
                         spec, file.matrix<Scalar>(p + "ffn_gate_inp.weight", experts, d).transpose(),
                         spec.sigmoid_router ? file.vector<Scalar>(p + "exp_probs_b.bias", experts) : Vector<Scalar>()));
  for (Index e = 0; e < experts; ++e) {
    SwiGluExpert<Scalar>& expert = layer.expert(e);
    if (stacked) {
      expert.gate_projection() = file.slice<Scalar>(p + "ffn_gate_exps.weight", e, experts, h, d).transpose();
      expert.up_projection() = file.slice<Scalar>(p + "ffn_up_exps.weight", e, experts, h, d).transpose();
      expert.w2() = file.slice<Scalar>(p + "ffn_down_exps.weight", e, experts, d, h).transpose();
    } else {
      expert.gate_projection() = file.matrix<Scalar>(per_expert("ffn_gate", e), h, d).transpose();
      expert.up_projection() = file.matrix<Scalar>(per_expert("ffn_up", e), h, d).transpose();
      expert.w2() = file.matrix<Scalar>(per_expert("ffn_down", e), d, h).transpose();
    }
  }
  if (sizes.shared_hidden_dim > 0) {
    const Index width = sizes.shared_hidden_dim;
    SwiGluExpert<Scalar>& shared = layer.shared_expert();
    shared.gate_projection() = file.matrix<Scalar>(p + "ffn_gate_shexp.weight", width, d).transpose();
    shared.up_projection() = file.matrix<Scalar>(p + "ffn_up_shexp.weight", width, d).transpose();
    shared.w2() = file.matrix<Scalar>(p + "ffn_down_shexp.weight", d, width).transpose();
  }
  if (sizes.shared_expert_gate) layer.shared_expert_gate() = file.vector<Scalar>(p + "ffn_gate_inp_shexp.weight", d);
  return layer;
}

/// load_gguf_moe_block(file, gguf_moe_block_spec(file, layer)).
template <typename Layer>
Layer load_gguf_moe_block(const GgufFile& file, Index layer) {
  return load_gguf_moe_block<Layer>(file, gguf_moe_block_spec(file, layer));
}

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_GGUF_HPP
