// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// A minimal safetensors writer of the tests' own (test_safetensors, test_hf_models), written from
// the format's description and independent of sparsemoe/io/safetensors.hpp: the header text is
// built by hand, tensors are laid out one after the other in the order given.
#ifndef SPARSEMOE_TESTS_SAFETENSORS_TEST_WRITER_HPP
#define SPARSEMOE_TESTS_SAFETENSORS_TEST_WRITER_HPP

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace safetensors_test {

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::string bytes;
};

inline std::string u64_le(std::uint64_t value) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  return out;
}

/// A file from a header text and a data buffer, as the format lays them out.
inline std::string file_from(const std::string& header, const std::string& data) {
  return u64_le(header.size()) + header + data;
}

inline std::string shape_json(const std::vector<std::uint64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

/// Tensors stored in the given order, one after the other; the header written by hand.
inline std::string make_file(const std::vector<RawTensor>& tensors, const std::string& metadata = "") {
  std::string header = "{";
  std::string data;
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":" + metadata;
    first = false;
  }
  for (const RawTensor& tensor : tensors) {
    const std::uint64_t begin = data.size();
    data += tensor.bytes;
    header += std::string(first ? "" : ",") + "\"" + tensor.name + "\":{\"dtype\":\"" + tensor.dtype +
              "\",\"shape\":" + shape_json(tensor.shape) + ",\"data_offsets\":[" + std::to_string(begin) + "," +
              std::to_string(data.size()) + "]}";
    first = false;
  }
  header += "}";
  return file_from(header, data);
}

template <typename T>
std::string raw_bytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(&out[0], values.data(), out.size());
  return out;
}

/// A fresh directory under the system's temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() / ("sparsemoe_model_files_" + std::to_string(::getpid()) + "_" +
                                         std::to_string(counter_++));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
  static inline int counter_ = 0;
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

}  // namespace safetensors_test

#endif  // SPARSEMOE_TESTS_SAFETENSORS_TEST_WRITER_HPP
