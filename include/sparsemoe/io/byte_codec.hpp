// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_BYTE_CODEC_HPP
#define SPARSEMOE_IO_BYTE_CODEC_HPP

/// \file byte_codec.hpp
/// The byte level of the checkpoint format: little-endian loads of fixed-size integers, the
/// writer that appends fields to a byte string, and the bounds-checked reader cursor (running
/// past its end is a CheckpointErrorKind::malformed error naming the field). Floating-point
/// values travel as their raw IEEE-754 bits, so only little-endian hosts with IEEE-754 float and
/// double are supported (checked at compile time).

#include "checkpoint_error.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#if !defined(__BYTE_ORDER__) || !defined(__ORDER_LITTLE_ENDIAN__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sparsemoe/checkpoint.hpp supports little-endian hosts only (the format is little-endian)"
#endif

namespace sparsemoe {

/// \addtogroup files
/// @{

static_assert(std::numeric_limits<float>::is_iec559 && sizeof(float) == 4,
              "sparsemoe checkpoints need IEEE-754 binary32 float");
static_assert(std::numeric_limits<double>::is_iec559 && sizeof(double) == 8,
              "sparsemoe checkpoints need IEEE-754 binary64 double");

namespace detail {

/// Little-endian reads of fixed-size integers at `data` (no bounds check: callers check).
inline std::uint32_t load_u32(const unsigned char* data) {
  return static_cast<std::uint32_t>(data[0]) | static_cast<std::uint32_t>(data[1]) << 8 |
         static_cast<std::uint32_t>(data[2]) << 16 | static_cast<std::uint32_t>(data[3]) << 24;
}
inline std::uint64_t load_u64(const unsigned char* data) {
  return static_cast<std::uint64_t>(load_u32(data)) | static_cast<std::uint64_t>(load_u32(data + 4)) << 32;
}

/// Appends little-endian fields to a byte string (the checkpoint being written).
class CheckpointWriter {
 public:
  explicit CheckpointWriter(std::string& out) : out_(out) {}

  std::size_t position() const { return out_.size(); }
  void bytes(const void* data, std::size_t size) {
    if (size > 0) out_.append(static_cast<const char*>(data), size);
  }
  void u32(std::uint32_t value) {
    for (int shift = 0; shift < 32; shift += 8) out_.push_back(static_cast<char>((value >> shift) & 0xFFu));
  }
  void u64(std::uint64_t value) {
    for (int shift = 0; shift < 64; shift += 8) out_.push_back(static_cast<char>((value >> shift) & 0xFFu));
  }
  void i64(std::int64_t value) { u64(static_cast<std::uint64_t>(value)); }
  void f64(double value) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    u64(bits);
  }
  void str(const std::string& value) {
    u32(static_cast<std::uint32_t>(value.size()));
    bytes(value.data(), value.size());
  }
  /// Overwrites the u64 at `offset` (a field written earlier as a placeholder).
  void patch_u64(std::size_t offset, std::uint64_t value) {
    for (int shift = 0; shift < 64; shift += 8) {
      out_[offset++] = static_cast<char>((value >> shift) & 0xFFu);
    }
  }

 private:
  std::string& out_;
};

/// Bounds-checked little-endian reads from [position, end) of a checkpoint whose integrity was
/// verified; running past `end` is a CheckpointErrorKind::malformed error naming the field.
class CheckpointReader {
 public:
  CheckpointReader(const unsigned char* data, std::size_t begin, std::size_t end, const std::string& context)
      : data_(data), position_(begin), end_(end), context_(context) {}

  std::size_t position() const { return position_; }
  std::size_t remaining() const { return end_ - position_; }

  std::uint32_t u32(const char* field) {
    need(4, field);
    const std::uint32_t value = load_u32(data_ + position_);
    position_ += 4;
    return value;
  }
  std::uint64_t u64(const char* field) {
    need(8, field);
    const std::uint64_t value = load_u64(data_ + position_);
    position_ += 8;
    return value;
  }
  std::int64_t i64(const char* field) { return static_cast<std::int64_t>(u64(field)); }
  double f64(const char* field) {
    const std::uint64_t bits = u64(field);
    double value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  std::string str(std::size_t max_length, const char* field) {
    const std::size_t length = u32(field);
    if (length > max_length) {
      checkpoint_fail(CheckpointErrorKind::malformed, context_, field, " at offset ", position_ - 4, " is ", length,
                      " bytes long, at most ", max_length, " expected");
    }
    need(length, field);
    std::string value(reinterpret_cast<const char*>(data_ + position_), length);
    position_ += length;
    return value;
  }
  /// Skips `size` bytes of `field`, returning the offset where they start.
  std::size_t skip(std::size_t size, const char* field) {
    need(size, field);
    const std::size_t start = position_;
    position_ += size;
    return start;
  }

 private:
  void need(std::size_t size, const char* field) const {
    if (size > end_ - position_) {
      checkpoint_fail(CheckpointErrorKind::malformed, context_, field, " at offset ", position_, " needs ", size,
                      " bytes, only ", end_ - position_, " remain before the checksum");
    }
  }

  const unsigned char* data_;
  std::size_t position_;
  std::size_t end_;
  const std::string& context_;
};

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_BYTE_CODEC_HPP
