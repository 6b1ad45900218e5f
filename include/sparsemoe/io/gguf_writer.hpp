// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_GGUF_WRITER_HPP
#define SPARSEMOE_IO_GGUF_WRITER_HPP

/// \file gguf_writer.hpp
/// Writing llama.cpp's GGUF files: GgufWriter (GGUF version 3, little-endian; metadata of the
/// scalar, string and array value types; F32, F64, F16, BF16 and Q8_0 tensors, Q8_0 quantised on
/// write; written atomically) and export_gguf_moe_block, which writes an MoE layer as the MoE
/// block of one of the GGUF architectures load_gguf_moe_block reads (llama for Mixtral,
/// qwen2moe, qwen3moe, olmoe, deepseek2 for DeepSeek-V2 and V3), with llama.cpp's tensor names
/// and metadata keys. Needs nlohmann/json; not in the umbrella header.
///
/// The layout written is the one gguf.hpp's file comment describes: "GGUF", u32 version 3, u64
/// tensor count, u64 metadata count, the metadata in the order set, the tensor infos in the order
/// added (ne fastest-varying first), zero padding to the alignment, then each tensor's data at an
/// offset that is a multiple of the alignment, each followed by zero padding to the alignment (as
/// llama.cpp writes them, so the file's size is a multiple of the alignment too).

#include "byte_codec.hpp"
#include "file.hpp"
#include "gguf.hpp"
#include "hf_models.hpp"
#include "model_file_error.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup model_files
/// @{

/// The GGUF metadata value types (their numeric ids are the file's).
enum class GgufValueType : std::uint32_t {
  u8 = 0,        ///< uint8
  i8 = 1,        ///< int8
  u16 = 2,       ///< uint16
  i16 = 3,       ///< int16
  u32 = 4,       ///< uint32
  i32 = 5,       ///< int32
  f32 = 6,       ///< float
  boolean = 7,   ///< one byte, 0 or 1
  string = 8,    ///< u64 length and UTF-8 bytes
  array = 9,     ///< u32 element type, u64 count, the elements
  u64 = 10,      ///< uint64
  i64 = 11,      ///< int64
  f64 = 12,      ///< double
};

namespace detail {

/// Appends a GGUF string (u64 length, then the bytes) through `out`.
inline void put_gguf_string(CheckpointWriter& out, const std::string& text) {
  out.u64(text.size());
  out.bytes(text.data(), text.size());
}

/// Whether `value` is a JSON value that metadata of scalar type `type` (not an array) can hold
/// exactly as GgufFile::metadata() will read it back.
inline bool gguf_scalar_fits(GgufValueType type, const nlohmann::json& value) {
  const auto in = [&](std::int64_t low, std::uint64_t high) {
    if (value.is_number_unsigned()) return value.get<std::uint64_t>() <= high;
    if (value.is_number_integer()) return value.get<std::int64_t>() >= low && (value.get<std::int64_t>() < 0 ||
                                                                                 static_cast<std::uint64_t>(value.get<std::int64_t>()) <= high);
    return false;
  };
  switch (type) {
    case GgufValueType::u8: return in(0, 0xFFu);
    case GgufValueType::i8: return in(-0x80, 0x7Fu);
    case GgufValueType::u16: return in(0, 0xFFFFu);
    case GgufValueType::i16: return in(-0x8000, 0x7FFFu);
    case GgufValueType::u32: return in(0, 0xFFFFFFFFu);
    case GgufValueType::i32: return in(-0x7FFFFFFF - 1, 0x7FFFFFFFu);
    case GgufValueType::u64: return in(0, ~std::uint64_t{0});
    case GgufValueType::i64: return in(std::numeric_limits<std::int64_t>::min(), 0x7FFFFFFFFFFFFFFFu);
    case GgufValueType::f32:
    case GgufValueType::f64: return value.is_number_float();
    case GgufValueType::boolean: return value.is_boolean();
    case GgufValueType::string: return value.is_string();
    case GgufValueType::array: return false;
  }
  return false;
}

/// Appends scalar `value` of type `type` (checked by gguf_scalar_fits) little-endian.
inline void put_gguf_scalar(CheckpointWriter& out, GgufValueType type, const nlohmann::json& value) {
  const auto integer = [&](int bytes) {
    const std::uint64_t bits = value.is_number_unsigned() ? value.get<std::uint64_t>()
                                                          : static_cast<std::uint64_t>(value.get<std::int64_t>());
    for (int i = 0; i < bytes; ++i) {
      const unsigned char byte = static_cast<unsigned char>((bits >> (8 * i)) & 0xFFu);
      out.bytes(&byte, 1);
    }
  };
  switch (type) {
    case GgufValueType::u8:
    case GgufValueType::i8: integer(1); return;
    case GgufValueType::u16:
    case GgufValueType::i16: integer(2); return;
    case GgufValueType::u32:
    case GgufValueType::i32: integer(4); return;
    case GgufValueType::u64:
    case GgufValueType::i64: integer(8); return;
    case GgufValueType::f32: {
      const float real = static_cast<float>(value.get<double>());
      std::uint32_t bits = 0;
      std::memcpy(&bits, &real, sizeof bits);
      out.u32(bits);
      return;
    }
    case GgufValueType::f64: out.f64(value.get<double>()); return;
    case GgufValueType::boolean: {
      const unsigned char byte = value.get<bool>() ? 1 : 0;
      out.bytes(&byte, 1);
      return;
    }
    case GgufValueType::string: put_gguf_string(out, value.get<std::string>()); return;
    case GgufValueType::array: return;  // not a scalar; never called with it
  }
}

/// The llama.cpp Q8_0 blocks of the `count` floats at `values` (a multiple of 32): per block of 32,
/// d = max|x|/127 in float, the f16 of d (round to nearest even), then q_j = round(x_j·(1/d))
/// (halves away from zero; 0 when d = 0) clamped to [−127, 127], as int8. Dequantised, an element
/// is f16(d)·q_j. Throws std::invalid_argument for a non-finite value, or a block whose scale
/// overflows binary16 (max|x| ≥ 127·65520). Cost: O(count).
inline void put_q8_0(std::string& out, const float* values, std::size_t count, const char* function,
                     const std::string& name) {
  for (std::size_t block = 0; block < count / 32; ++block) {
    const float* x = values + 32 * block;
    float amax = 0.0f;
    for (std::size_t j = 0; j < 32; ++j) {
      require(std::isfinite(x[j]), function, "tensor '", name, "': Q8_0 needs finite values, got ", x[j]);
      amax = std::max(amax, std::fabs(x[j]));
    }
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    const std::uint16_t d_bits = f16_from_float(d);
    require(std::isfinite(float_from_f16(d_bits)), function, "tensor '", name, "': a Q8_0 block with max |x| = ",
            amax, " has a scale past binary16's range");
    out.push_back(static_cast<char>(d_bits & 0xFFu));
    out.push_back(static_cast<char>(d_bits >> 8));
    for (std::size_t j = 0; j < 32; ++j) {
      const float q = std::min(127.0f, std::max(-127.0f, std::round(x[j] * inverse)));
      out.push_back(static_cast<char>(static_cast<std::int8_t>(q)));
    }
  }
}

}  // namespace detail

/// Builds a GGUF file (version 3) in memory: metadata key/values and tensors, then bytes() or
/// write() (atomically). Metadata keeps the order of the first set of each key (a later set
/// replaces the value and type); tensors keep the order added. The alignment is the u32 metadata
/// general.alignment when set (a power of two up to 65536, as GgufFile reads), else 32.
/// Tensor data is converted when added, so the writer holds the file's tensor bytes (Q8_0: 34
/// bytes per 32 values). What it writes, GgufFile reads back: the metadata as the same JSON,
/// every tensor with the same ne and type, its values the ones added (F32/F64 exactly; F16 and
/// BF16 rounded to nearest even; Q8_0 dequantised as detail::put_q8_0 says).
class GgufWriter {
 public:
  /// Sets metadata `key` to the u32 `value`.
  void set_u32(const std::string& key, std::uint32_t value) { set(key, GgufValueType::u32, value); }
  /// Sets metadata `key` to the i32 `value`.
  void set_i32(const std::string& key, std::int32_t value) { set(key, GgufValueType::i32, value); }
  /// Sets metadata `key` to the u64 `value`.
  void set_u64(const std::string& key, std::uint64_t value) { set(key, GgufValueType::u64, value); }
  /// Sets metadata `key` to the f32 `value`.
  void set_f32(const std::string& key, float value) { set(key, GgufValueType::f32, static_cast<double>(value)); }
  /// Sets metadata `key` to the bool `value`.
  void set_bool(const std::string& key, bool value) { set(key, GgufValueType::boolean, value); }
  /// Sets metadata `key` to the string `value`.
  void set_string(const std::string& key, const std::string& value) { set(key, GgufValueType::string, value); }

  /// Sets metadata `key` to `value` of `type`: for a scalar type, a JSON value of that type (an
  /// integer in range, a float, a bool, a string); for GgufValueType::array, a flat JSON array
  /// whose elements all have the scalar type `element_type`. F32 values are stored rounded to
  /// float (metadata() shows the rounded value). Throws std::invalid_argument for an empty key or
  /// one over 65535 bytes, a value that does not fit the type, nested arrays, or a
  /// general.alignment that is not a u32 power of two up to 65536. Cost: O(size of the value).
  void set(const std::string& key, GgufValueType type, const nlohmann::json& value,
           GgufValueType element_type = GgufValueType::u8) {
    const char* function = "sparsemoe::GgufWriter::set";
    detail::require(!key.empty() && key.size() <= 65535, function, "a metadata key must have 1 to 65535 bytes, got ",
                    key.size());
    nlohmann::json stored = value;
    if (type == GgufValueType::array) {
      detail::require(value.is_array(), function, "metadata '", key, "': an array needs a JSON array, got ", value.dump());
      detail::require(element_type != GgufValueType::array, function, "metadata '", key,
                      "': arrays of arrays are not written");
      for (nlohmann::json& element : stored) {
        if ((element_type == GgufValueType::f32 || element_type == GgufValueType::f64) && element.is_number()) {
          element = element_type == GgufValueType::f32 ? static_cast<double>(static_cast<float>(element.get<double>()))
                                                       : element.get<double>();
        }
        detail::require(detail::gguf_scalar_fits(element_type, element), function, "metadata '", key, "': element ",
                        element.dump(), " does not fit value type ", static_cast<std::uint32_t>(element_type));
      }
    } else {
      nlohmann::json converted = value;
      if ((type == GgufValueType::f32 || type == GgufValueType::f64) && value.is_number()) {
        converted = type == GgufValueType::f32 ? static_cast<double>(static_cast<float>(value.get<double>()))
                                               : value.get<double>();
      }
      detail::require(detail::gguf_scalar_fits(type, converted), function, "metadata '", key, "': ", value.dump(),
                      " does not fit value type ", static_cast<std::uint32_t>(type));
      stored = converted;
    }
    if (key == "general.alignment") {
      const bool power = type == GgufValueType::u32 && stored.get<std::uint64_t>() > 0 &&
                         stored.get<std::uint64_t>() <= 65536 &&
                         (stored.get<std::uint64_t>() & (stored.get<std::uint64_t>() - 1)) == 0;
      detail::require(power, function, "general.alignment must be a u32 power of two up to 65536, got ", value.dump());
    }
    const auto found = std::find_if(keys_.begin(), keys_.end(), [&](const Key& entry) { return entry.key == key; });
    if (found == keys_.end()) {
      keys_.push_back({key, type, element_type});
    } else {
      found->type = type;
      found->element = element_type;
    }
    metadata_[key] = std::move(stored);
  }

  /// The metadata set so far, as GgufFile::metadata() will read it.
  const nlohmann::json& metadata() const { return metadata_; }
  /// The value type of metadata `key`, which must be set (std::invalid_argument otherwise).
  GgufValueType value_type(const std::string& key) const {
    const auto found = std::find_if(keys_.begin(), keys_.end(), [&](const Key& entry) { return entry.key == key; });
    detail::require(found != keys_.end(), "sparsemoe::GgufWriter::value_type", "no metadata '", key, "'");
    return found->type;
  }
  /// The data alignment: general.alignment when set, else 32.
  std::uint64_t alignment() const {
    return metadata_.contains("general.alignment") ? metadata_.at("general.alignment").get<std::uint64_t>() : 32;
  }

  /// Adds tensor `name` with ggml dimensions `ne` (fastest-varying first: ne {cols, rows} is a
  /// row-major rows×cols matrix) from `values`, the product(ne) elements in row-major order of the
  /// reversed ne, stored as `type`: F32, F64, F16, BF16 (a double goes through float for F16 and
  /// BF16; both round to nearest even) or Q8_0 (ne[0] a multiple of 32; see detail::put_q8_0).
  /// Throws std::invalid_argument for an empty name or one over 63 bytes (llama.cpp's limit), a
  /// name already added, 0 or more than 4 dimensions, a zero extent, a count other than product(ne),
  /// another type, Q8_0 rows that are not whole blocks, or values Q8_0 cannot hold. Nothing is added
  /// on error. Cost: one pass over the values.
  template <typename Scalar>
  void add(const std::string& name, const std::vector<std::uint64_t>& ne, const Scalar* values, std::size_t count,
           GgmlType type = GgmlType::f32) {
    static_assert(std::is_floating_point<Scalar>::value, "GgufWriter::add takes float or double values");
    const char* function = "sparsemoe::GgufWriter::add";
    detail::require(!name.empty() && name.size() <= 63, function, "a tensor name must have 1 to 63 bytes, got '", name,
                    "'");
    detail::require(index_.count(name) == 0, function, "tensor '", name, "' was already added");
    detail::require(!ne.empty() && ne.size() <= 4, function, "tensor '", name, "' needs 1 to 4 dimensions, got ",
                    ne.size());
    std::uint64_t elements = 1;
    for (const std::uint64_t extent : ne) {
      detail::require(extent > 0, function, "tensor '", name, "' has a zero extent in ne ", detail::shape_text(ne));
      elements *= extent;
    }
    detail::require(elements == count, function, "tensor '", name, "': ne ", detail::shape_text(ne), " has ", elements,
                    " elements, got ", count, " values");
    std::string data;
    switch (type) {
      case GgmlType::f32:
      case GgmlType::f64:
      case GgmlType::f16:
      case GgmlType::bf16: {
        detail::CheckpointWriter out(data);
        for (std::size_t i = 0; i < count; ++i) {
          const float value = static_cast<float>(values[i]);
          if (type == GgmlType::f64) {
            out.f64(static_cast<double>(values[i]));
          } else if (type == GgmlType::f32) {
            std::uint32_t bits = 0;
            std::memcpy(&bits, &value, sizeof bits);
            out.u32(bits);
          } else {
            const std::uint16_t bits = type == GgmlType::bf16 ? detail::bf16_from_float(value) : detail::f16_from_float(value);
            const unsigned char pair[2] = {static_cast<unsigned char>(bits & 0xFFu), static_cast<unsigned char>(bits >> 8)};
            out.bytes(pair, 2);
          }
        }
        break;
      }
      case GgmlType::q8_0: {
        detail::require(ne[0] % 32 == 0, function, "tensor '", name, "': Q8_0 needs rows (ne[0]) of whole 32-element "
                        "blocks, got ne ", detail::shape_text(ne));
        std::vector<float> floats(values, values + count);
        data.reserve(count / 32 * 34);
        detail::put_q8_0(data, floats.data(), count, function, name);
        break;
      }
      default:
        detail::require(false, function, "tensor '", name, "': cannot write type ", to_string(type),
                        " (F32, F64, F16, BF16 or Q8_0 only)");
    }
    index_.emplace(name, tensors_.size());
    tensors_.push_back({name, ne, type, std::move(data)});
  }

  /// Adds an Eigen matrix (or vector) of rows×cols as tensor `name` with ne {cols, rows} (a
  /// vector: ne {size}), in the row-major order of its elements. Errors as add().
  template <typename Derived>
  void add_matrix(const std::string& name, const Eigen::DenseBase<Derived>& values, GgmlType type = GgmlType::f32) {
    using Scalar = typename Derived::Scalar;
    const Matrix<Scalar> row_major = values;  // row-major copy, whatever the argument's layout
    const auto u = [](Index extent) { return static_cast<std::uint64_t>(extent); };
    const std::vector<std::uint64_t> ne = Derived::IsVectorAtCompileTime ? std::vector<std::uint64_t>{u(row_major.size())}
                                                                         : std::vector<std::uint64_t>{u(row_major.cols()),
                                                                                                      u(row_major.rows())};
    add(name, ne, row_major.data(), static_cast<std::size_t>(row_major.size()), type);
  }

  /// Whether tensor `name` was added.
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  /// Number of tensors added.
  std::size_t size() const { return tensors_.size(); }

  /// Moves `other`'s metadata and tensors into this writer. A key set in both must have the same
  /// type and value, except the u32 keys named "<arch>.block_count", which take the larger value
  /// (so the blocks of several layers can be exported into one file); tensor names must not
  /// repeat. Throws std::invalid_argument naming the first conflict; nothing is changed on error.
  /// Cost: O(metadata + tensors), no tensor data copied.
  void merge(GgufWriter&& other) {
    const char* function = "sparsemoe::GgufWriter::merge";
    for (const Key& entry : other.keys_) {
      const auto found = std::find_if(keys_.begin(), keys_.end(), [&](const Key& mine) { return mine.key == entry.key; });
      if (found == keys_.end() || (block_count_key(entry) && block_count_key(*found))) continue;
      detail::require(found->type == entry.type && found->element == entry.element &&
                          metadata_.at(entry.key) == other.metadata_.at(entry.key),
                      function, "metadata '", entry.key, "' is ", metadata_.at(entry.key).dump(), " here and ",
                      other.metadata_.at(entry.key).dump(), " in the blocks being added");
    }
    for (const Tensor& tensor : other.tensors_) {
      detail::require(index_.count(tensor.name) == 0, function, "tensor '", tensor.name, "' was already added");
    }
    for (const Key& entry : other.keys_) {
      const nlohmann::json& value = other.metadata_.at(entry.key);
      if (block_count_key(entry) && metadata_.contains(entry.key)) {
        set(entry.key, entry.type, std::max(value.get<std::uint64_t>(), metadata_.at(entry.key).get<std::uint64_t>()));
      } else {
        set(entry.key, entry.type, value, entry.element);
      }
    }
    for (Tensor& tensor : other.tensors_) {
      index_.emplace(tensor.name, tensors_.size());
      tensors_.push_back(std::move(tensor));
    }
    other = GgufWriter();
  }

  /// The file's bytes (see the file comment for the layout). Cost: one copy of every tensor.
  std::string bytes() const {
    const std::uint64_t alignment = this->alignment();
    const auto padded = [&](std::uint64_t size) { return (size + alignment - 1) / alignment * alignment; };
    std::uint64_t data_size = 0;
    for (const Tensor& tensor : tensors_) data_size += padded(tensor.data.size());
    std::string out;
    detail::CheckpointWriter writer(out);
    writer.bytes("GGUF", 4);
    writer.u32(3);
    writer.u64(tensors_.size());
    writer.u64(keys_.size());
    for (const Key& entry : keys_) {
      detail::put_gguf_string(writer, entry.key);
      writer.u32(static_cast<std::uint32_t>(entry.type));
      const nlohmann::json& value = metadata_.at(entry.key);
      if (entry.type == GgufValueType::array) {
        writer.u32(static_cast<std::uint32_t>(entry.element));
        writer.u64(value.size());
        for (const nlohmann::json& element : value) detail::put_gguf_scalar(writer, entry.element, element);
      } else {
        detail::put_gguf_scalar(writer, entry.type, value);
      }
    }
    std::uint64_t offset = 0;
    for (const Tensor& tensor : tensors_) {
      detail::put_gguf_string(writer, tensor.name);
      writer.u32(static_cast<std::uint32_t>(tensor.ne.size()));
      for (const std::uint64_t extent : tensor.ne) writer.u64(extent);
      writer.u32(static_cast<std::uint32_t>(tensor.type));
      writer.u64(offset);
      offset += padded(tensor.data.size());
    }
    out.reserve(static_cast<std::size_t>(padded(out.size()) + data_size));
    out.resize(static_cast<std::size_t>(padded(out.size())), '\0');
    for (const Tensor& tensor : tensors_) {
      out += tensor.data;
      out.resize(static_cast<std::size_t>(padded(out.size())), '\0');
    }
    return out;
  }

  /// Writes bytes() to `path` atomically (a temporary file next to it, renamed over it; see
  /// file.hpp): `path` is either untouched or the whole new file. Throws ModelFileError(io)
  /// naming the step, the path and errno.
  void write(const std::string& path) const { detail::write_model_file(path, bytes(), "sparsemoe::GgufWriter::write"); }

 private:
  struct Key {
    std::string key;
    GgufValueType type;
    GgufValueType element;
  };
  struct Tensor {
    std::string name;
    std::vector<std::uint64_t> ne;
    GgmlType type;
    std::string data;
  };

  static bool block_count_key(const Key& entry) {
    const std::string suffix = ".block_count";
    return entry.type == GgufValueType::u32 && entry.key.size() > suffix.size() &&
           entry.key.compare(entry.key.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  std::vector<Key> keys_;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<Tensor> tensors_;
  std::map<std::string, std::size_t> index_;
};

/// The GGUF general.architecture of `family`'s models: "llama" (Mixtral), "qwen2moe",
/// "qwen3moe", "olmoe", "deepseek2" (DeepSeek-V2 and V3).
inline const char* gguf_architecture(HfFamily family) {
  switch (family) {
    case HfFamily::mixtral: return "llama";
    case HfFamily::qwen2_moe: return "qwen2moe";
    case HfFamily::qwen3_moe: return "qwen3moe";
    case HfFamily::olmoe: return "olmoe";
    case HfFamily::deepseek_v2:
    case HfFamily::deepseek_v3: return "deepseek2";
  }
  return "?";
}

namespace detail {

/// Throws std::invalid_argument naming `what` when the layer's `have` differs from the `want`
/// that a GGUF block of `family` would be read back with.
template <typename T>
void require_gguf_same(const T& have, const T& want, HfFamily family, const char* what) {
  require(have == want, "sparsemoe::export_gguf_moe_block", "a GGUF ", gguf_architecture(family), " block of ",
          to_string(family), " cannot express this layer: it has ", what, " = ", have, ", the block would be read back "
          "with ", want);
}

/// The router options of `spec` of the kind of `options` (softmax or sigmoid).
inline const SoftmaxTopKRouterOptions& block_router_options(const HfMoEBlockSpec& spec, const SoftmaxTopKRouterOptions&) {
  return spec.softmax;
}
/// The router options of `spec` of the kind of `options` (softmax or sigmoid).
inline const SigmoidTopKRouterOptions& block_router_options(const HfMoEBlockSpec& spec, const SigmoidTopKRouterOptions&) {
  return spec.sigmoid;
}

}  // namespace detail

/// Adds `layer` to `writer` as the MoE block of layer `layer_index` of a GGUF model of `family`:
/// the metadata keys gguf_moe_block_spec reads and the tensors load_gguf_moe_block reads, so that
/// load_gguf_moe_block gives the layer back — bitwise for F32 (and F64) with a float (double)
/// layer, and for F16/BF16 once the weights are already rounded to them.
///
/// Metadata (u32 unless said): general.architecture (string, gguf_architecture), and prefixed by
/// it: block_count (layer_index + 1, or the larger value already in `writer`), embedding_length
/// (d), expert_count (E), expert_used_count (k), feed_forward_length (llama) or
/// expert_feed_forward_length (the others) = h; qwen2moe: expert_shared_feed_forward_length
/// (h_s); deepseek2: expert_gating_func (1 softmax, 2 sigmoid for V3), expert_weights_norm (bool),
/// expert_weights_scale (f32), expert_shared_count (h_s / h), leading_dense_block_count (0),
/// expert_group_count, expert_group_used_count. Only the MoE block's keys are written: a whole
/// model's file needs the rest (attention, vocabulary, …) too.
///
/// Tensors, "blk.L." + name, ne fastest-varying first: ffn_gate_inp.weight {d, E} (W_rᵀ);
/// exp_probs_b.bias {E} (V3's selection bias); ffn_gate_exps.weight and ffn_up_exps.weight
/// {d, h, E} and ffn_down_exps.weight {h, d, E} (expert e's [out, in] matrices stacked); the
/// shared expert ffn_gate_shexp.weight and ffn_up_shexp.weight {d, h_s}, ffn_down_shexp.weight
/// {h_s, d}; Qwen2-MoE's shared gate ffn_gate_inp_shexp.weight {d}. The expert and shared-expert
/// matrices are stored as `type` (F32, F64, F16, BF16, Q8_0); the router, the selection bias and
/// the shared gate stay F32 (F64 when `type` is F64), as llama.cpp keeps them unquantised.
///
/// The layer must be exactly what a block of `family` is read back as: its sizes, router type and
/// every router option (k, renormalisation, scale — which must be a float for deepseek2 —, groups,
/// no router bias, DeepSeek-V3's normalize_epsilon 0 and normalize_floor 2^−14, …) and shared
/// expert are compared with the spec gguf_moe_block_spec reads from the metadata written, and
/// a difference throws std::invalid_argument naming the option and both values (for example a
/// sigmoid router for a softmax family, or Qwen3-MoE without renormalisation). Also
/// std::invalid_argument: layer_index < 0, a metadata key `writer` already holds with another
/// value, a tensor name already in `writer`, Q8_0 with d, h or h_s not a multiple of 32, weights
/// Q8_0 cannot hold. Nothing is added to `writer` on error. Cost: one copy of the block's weights
/// (plus a conversion per element).
template <typename Layer>
void export_gguf_moe_block(const Layer& layer, HfFamily family, Index layer_index, GgufWriter& writer,
                           GgmlType type = GgmlType::f32) {
  using Scalar = typename Layer::Scalar;
  constexpr bool sigmoid = detail::is_sigmoid_block_layer<Layer>();
  const char* function = "sparsemoe::export_gguf_moe_block";
  detail::require(layer_index >= 0 && layer_index < 0x7FFFFFFF, function, "layer_index must be in [0, 2^31 - 1), got ",
                  layer_index);
  const Index d = layer.input_dim();
  const Index h = layer.hidden_dim();
  const Index experts = layer.num_experts();
  const Index shared_width = layer.shared_hidden_dim();
  const bool deepseek = family == HfFamily::deepseek_v2 || family == HfFamily::deepseek_v3;
  const auto& o = layer.router().options();
  const auto u32 = [](Index value) { return static_cast<std::uint32_t>(value); };

  // The metadata, then the spec the reader makes of it, compared with the layer.
  GgufWriter block;
  const std::string arch = gguf_architecture(family);
  const std::string a = arch + ".";
  block.set_string("general.architecture", arch);
  block.set_u32(a + "block_count", u32(layer_index + 1));
  block.set_u32(a + "embedding_length", u32(d));
  block.set_u32(a + "expert_count", u32(experts));
  block.set_u32(a + "expert_used_count", u32(layer.k()));
  block.set_u32(a + (family == HfFamily::mixtral ? "feed_forward_length" : "expert_feed_forward_length"), u32(h));
  if (family == HfFamily::qwen2_moe) {
    detail::require(shared_width > 0 && layer.shared_expert_gate().size() > 0, function, "qwen2_moe has a shared "
                    "expert with a sigmoid gate; the layer lacks it");
    block.set_u32(a + "expert_shared_feed_forward_length", u32(shared_width));
  }
  if (deepseek) {
    detail::require(shared_width % h == 0, function, to_string(family), " writes expert_shared_count = h_s / h: h_s = ",
                    shared_width, " is not a multiple of h = ", h);
    block.set_u32(a + "expert_gating_func", family == HfFamily::deepseek_v3 ? 2 : 1);
    block.set_bool(a + "expert_weights_norm", o.normalize_top_k);
    block.set_f32(a + "expert_weights_scale", static_cast<float>(o.scale));
    block.set_u32(a + "expert_shared_count", u32(shared_width / h));
    block.set_u32(a + "leading_dense_block_count", 0);
    block.set_u32(a + "expert_group_count", u32(o.num_groups));
    block.set_u32(a + "expert_group_used_count", u32(o.top_groups));
  }
  const HfMoEBlockSpec spec = gguf_moe_block_spec(GgufFile::from_bytes(block.bytes(), "<metadata>"), layer_index);
  detail::require(spec.sigmoid_router == sigmoid, function, "model family '", to_string(family), "' needs a ",
                  spec.sigmoid_router ? "SigmoidTopKRouter" : "SoftmaxTopKRouter");
  const auto same = [&](const auto& have, const auto& expected, const char* what) {
    detail::require_gguf_same(have, expected, family, what);
  };
  same(shared_width, spec.config.shared_hidden_dim, "shared expert width h_s");
  same(layer.shared_expert_gate().size() > 0, spec.config.shared_expert_gate, "a shared-expert gate");
  const auto& want = detail::block_router_options(spec, o);
  same(o.k, want.k, "k");
  same(o.normalize_top_k, want.normalize_top_k, "normalize_top_k");
  same(o.scale, want.scale, "scale");
  same(o.use_bias, want.use_bias, "use_bias");
  same(o.num_groups, want.num_groups, "num_groups");
  same(o.top_groups, want.top_groups, "top_groups");
  if constexpr (sigmoid) {
    same(o.normalize_epsilon, want.normalize_epsilon, "normalize_epsilon");
    same(o.normalize_floor, want.normalize_floor, "normalize_floor");
    same(static_cast<int>(o.group_mask), static_cast<int>(want.group_mask), "group_mask");
  } else {
    same(o.softmax_over_selected, want.softmax_over_selected, "softmax_over_selected");
  }
  if (type == GgmlType::q8_0) {
    detail::require(d % 32 == 0 && h % 32 == 0 && shared_width % 32 == 0, function, "Q8_0 needs d, h and h_s to be "
                    "multiples of 32 (whole blocks per row), got d = ", d, ", h = ", h, ", h_s = ", shared_width);
  }

  // The tensors.
  const GgmlType small = type == GgmlType::f64 ? GgmlType::f64 : GgmlType::f32;
  const std::string p = "blk." + std::to_string(layer_index) + ".";
  const auto u = [](Index value) { return static_cast<std::uint64_t>(value); };
  block.add_matrix(p + "ffn_gate_inp.weight", layer.router().weight().transpose(), small);
  if constexpr (sigmoid) block.add_matrix(p + "exp_probs_b.bias", layer.router().selection_bias(), small);
  std::vector<Scalar> stack(static_cast<std::size_t>(experts * h * d));
  const auto add_stack = [&](const char* name, std::uint64_t columns, std::uint64_t rows, const auto& matrix_of) {
    for (Index e = 0; e < experts; ++e) {
      const Matrix<Scalar> out_in = matrix_of(layer.expert(e));  // row-major [out, in]
      std::copy(out_in.data(), out_in.data() + out_in.size(), stack.begin() + static_cast<std::ptrdiff_t>(e * h * d));
    }
    block.add(p + name, {columns, rows, u(experts)}, stack.data(), stack.size(), type);
  };
  add_stack("ffn_gate_exps.weight", u(d), u(h), [&](const SwiGluExpert<Scalar>& x) { return x.w1().leftCols(h).transpose(); });
  add_stack("ffn_up_exps.weight", u(d), u(h), [&](const SwiGluExpert<Scalar>& x) { return x.w1().rightCols(h).transpose(); });
  add_stack("ffn_down_exps.weight", u(h), u(d), [](const SwiGluExpert<Scalar>& x) { return x.w2().transpose(); });
  if (shared_width > 0) {
    const SwiGluExpert<Scalar>& shared = layer.shared_expert();
    block.add_matrix(p + "ffn_gate_shexp.weight", shared.w1().leftCols(shared_width).transpose(), type);
    block.add_matrix(p + "ffn_up_shexp.weight", shared.w1().rightCols(shared_width).transpose(), type);
    block.add_matrix(p + "ffn_down_shexp.weight", shared.w2().transpose(), type);
  }
  if (layer.shared_expert_gate().size() > 0) block.add_matrix(p + "ffn_gate_inp_shexp.weight", layer.shared_expert_gate(), small);
  writer.merge(std::move(block));
}

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_GGUF_WRITER_HPP
