// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// safetensors files (issue 12, item 1): sparsemoe/io/safetensors.hpp.
//   * Reading: files made here by a minimal writer of the test's own (header text built by hand,
//     bytes laid out by hand) load with the right names, dtypes, shapes, metadata and values;
//     F16 and BF16 are checked over all 65536 bit patterns against a decoder written here from
//     the formats' definitions; F64 and F32 bitwise.
//   * Memory mapping: open(path) gives what from_bytes gives.
//   * Writing: the library writer's files are parsed here independently (length prefix, header
//     padded to 8, offsets contiguous and aligned to the element size), read back bitwise, and
//     round F16/BF16 to nearest even as a brute-force reference does.
//   * Sharded models through model.safetensors.index.json, and their errors.
//   * Every malformed-file case gets its own ModelFileErrorKind; every truncation of a valid file
//     is rejected.
#include <sparsemoe/io/safetensors.hpp>

#include "safetensors_test_writer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using namespace safetensors_test;
using sparsemoe::ModelFileError;
using sparsemoe::ModelFileErrorKind;
using sparsemoe::SafetensorsDtype;
using sparsemoe::SafetensorsFile;
using sparsemoe::SafetensorsModel;
using sparsemoe::SafetensorsWriter;

// --- Independent decoders and rounding ----------------------------------------------------------

/// binary16 from its definition: (−1)^s · 2^(e−15) · (1 + m/1024), subnormals 2^−14 · m/1024.
double decode_f16(std::uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 10) & 31;
  const int mantissa = bits & 1023;
  double value;
  if (exponent == 0) value = std::ldexp(mantissa / 1024.0, -14);
  else if (exponent == 31) value = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::nan("");
  else value = std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  return sign ? -value : value;
}

/// bfloat16 from its definition: 8 exponent bits (bias 127), 7 mantissa bits.
double decode_bf16(std::uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 7) & 255;
  const int mantissa = bits & 127;
  double value;
  if (exponent == 0) value = std::ldexp(mantissa / 128.0, -126);
  else if (exponent == 255) value = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::nan("");
  else value = std::ldexp(1.0 + mantissa / 128.0, exponent - 127);
  return sign ? -value : value;
}

/// The 16-bit pattern nearest to `value` (ties to the even pattern) by brute force over all
/// finite patterns of the sign of value, with overflow to infinity past the largest finite one
/// plus half an ulp.
std::uint16_t nearest(double value, double (*decode)(std::uint16_t), std::uint16_t infinity_bits, double max_finite,
                      double max_ulp) {
  const std::uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  const double magnitude = std::fabs(value);
  if (magnitude >= max_finite + max_ulp / 2) return sign | infinity_bits;
  std::uint16_t best = sign;
  double best_distance = std::numeric_limits<double>::infinity();
  for (std::uint32_t pattern = 0; pattern < infinity_bits; ++pattern) {
    const double distance = std::fabs(decode(static_cast<std::uint16_t>(pattern)) - magnitude);
    if (distance < best_distance || (distance == best_distance && (pattern & 1) == 0)) {
      best = static_cast<std::uint16_t>(sign | pattern);
      best_distance = distance;
    }
  }
  return best;
}

template <typename Function>
ModelFileErrorKind error_kind(Function&& function) {
  try {
    function();
  } catch (const ModelFileError& error) {
    EXPECT_NE(std::string(error.what()).find(to_string(error.kind())), std::string::npos) << error.what();
    return error.kind();
  }
  ADD_FAILURE() << "no ModelFileError";
  return ModelFileErrorKind::io;
}

ModelFileErrorKind parse_error(const std::string& bytes) {
  return error_kind([&] { SafetensorsFile::from_bytes(bytes); });
}

// --- Reading -------------------------------------------------------------------------------------

TEST(SafetensorsRead, NamesShapesMetadataAndExactValues) {
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-40f};
  const std::vector<double> b = {0.1, -1e300, 7.0};
  const std::string bytes =
      make_file({{"b", "F64", {3}, raw_bytes(b)}, {"a.weight", "F32", {2, 3}, raw_bytes(a)}, {"empty", "F32", {0, 4}, ""}},
                "{\"format\":\"pt\",\"note\":\"x\"}");
  const SafetensorsFile file = SafetensorsFile::from_bytes(bytes);
  ASSERT_EQ(file.tensors().size(), 3u);
  EXPECT_EQ(file.tensors()[0].name, "b");  // by position in the buffer
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "x");
  EXPECT_EQ(file.info("a.weight").dtype, SafetensorsDtype::f32);
  EXPECT_EQ(file.info("a.weight").shape, (std::vector<std::uint64_t>{2, 3}));
  EXPECT_TRUE(file.contains("empty"));
  EXPECT_FALSE(file.contains("c"));

  const sparsemoe::Matrix<float> m = file.matrix<float>("a.weight", 2, 3);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(std::memcmp(&m.data()[i], &a[static_cast<std::size_t>(i)], 4), 0) << i;
  }
  const sparsemoe::Vector<double> v = file.vector<double>("b", 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(v[i], b[static_cast<std::size_t>(i)]);
  EXPECT_EQ(file.matrix<double>("empty", 0, 4).size(), 0);
  // F32 → double widens exactly.
  EXPECT_EQ(file.matrix<double>("a.weight", 2, 3)(1, 2), static_cast<double>(a[5]));
}

TEST(SafetensorsRead, HalfFormatsOverEveryBitPattern) {
  std::vector<std::uint16_t> patterns(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) patterns[i] = static_cast<std::uint16_t>(i);
  const std::string bytes =
      make_file({{"h", "F16", {256, 256}, raw_bytes(patterns)}, {"b", "BF16", {65536}, raw_bytes(patterns)}});
  const SafetensorsFile file = SafetensorsFile::from_bytes(bytes);
  const std::vector<float> h = file.values<float>("h");
  const std::vector<double> b = file.values<double>("b");
  for (std::size_t i = 0; i < 65536; ++i) {
    const double want_h = decode_f16(patterns[i]);
    const double want_b = decode_bf16(patterns[i]);
    if (std::isnan(want_h)) {
      EXPECT_TRUE(std::isnan(h[i])) << i;
    } else {
      ASSERT_EQ(static_cast<double>(h[i]), want_h) << "F16 pattern " << i;
      EXPECT_EQ(std::signbit(h[i]), (patterns[i] & 0x8000) != 0);
    }
    if (std::isnan(want_b)) {
      EXPECT_TRUE(std::isnan(b[i])) << i;
    } else {
      ASSERT_EQ(b[i], want_b) << "BF16 pattern " << i;
    }
  }
}

/// F8_E4M3 ("fn": bias 7, no infinities, S.1111.111 NaN) and F8_E5M2 (bias 15, IEEE-like) from
/// their definitions.
double decode_f8(std::uint8_t bits, int exponent_bits) {
  const int mantissa_bits = 7 - exponent_bits;
  const int bias = (1 << (exponent_bits - 1)) - 1;
  const int exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int mantissa = bits & ((1 << mantissa_bits) - 1);
  const double scale = 1 << mantissa_bits;
  double value;
  if (exponent_bits == 4 && exponent == 15 && mantissa == 7) return std::nan("");
  if (exponent_bits == 5 && exponent == 31) {
    if (mantissa != 0) return std::nan("");
    value = std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    value = std::ldexp(mantissa / scale, 1 - bias);
  } else {
    value = std::ldexp(1.0 + mantissa / scale, exponent - bias);
  }
  return (bits & 0x80) ? -value : value;
}

TEST(SafetensorsRead, EightBitFloatsOverEveryBitPattern) {
  std::vector<std::uint8_t> patterns(256);
  for (int i = 0; i < 256; ++i) patterns[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i);
  const SafetensorsFile file = SafetensorsFile::from_bytes(
      make_file({{"e4m3", "F8_E4M3", {256}, raw_bytes(patterns)}, {"e5m2", "F8_E5M2", {16, 16}, raw_bytes(patterns)}}));
  const std::vector<double> e4m3 = file.values<double>("e4m3");
  const std::vector<float> e5m2 = file.values<float>("e5m2");
  for (std::size_t i = 0; i < 256; ++i) {
    const double want4 = decode_f8(patterns[i], 4), want5 = decode_f8(patterns[i], 5);
    if (std::isnan(want4)) {
      EXPECT_TRUE(std::isnan(e4m3[i])) << i;
    } else {
      EXPECT_EQ(e4m3[i], want4) << "E4M3 pattern " << i;
    }
    if (std::isnan(want5)) {
      EXPECT_TRUE(std::isnan(e5m2[i])) << i;
    } else {
      EXPECT_EQ(static_cast<double>(e5m2[i]), want5) << "E5M2 pattern " << i;
    }
  }
  EXPECT_EQ(e4m3[0x7E], 448.0);
}

TEST(SafetensorsRead, MemoryMappedFileEqualsBytes) {
  TempDir dir;
  std::mt19937 random(5);
  std::vector<float> values(1000);
  for (float& value : values) value = std::uniform_real_distribution<float>(-1, 1)(random);
  const std::string bytes = make_file({{"x", "F32", {10, 100}, raw_bytes(values)}});
  write_bytes(dir.file("m.safetensors"), bytes);
  const SafetensorsFile mapped = SafetensorsFile::open(dir.file("m.safetensors"));
  EXPECT_EQ(mapped.matrix<float>("x", 10, 100), SafetensorsFile::from_bytes(bytes).matrix<float>("x", 10, 100));
  EXPECT_EQ(mapped.values<float>("x"), values);
  // The mapping outlives the file's name and the first handle.
  fs::remove(dir.file("m.safetensors"));
  const SafetensorsFile copy = mapped;
  EXPECT_EQ(copy.values<float>("x"), values);
}

TEST(SafetensorsRead, SpacePaddedHeaderAndUnalignedData) {
  const std::vector<std::uint16_t> half = {0x3C00};  // 1.0 in F16
  const std::vector<float> single = {2.5f};
  // The F32 tensor starts at byte 2 of the buffer: readers must not assume alignment.
  std::string header = "{\"a\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[2,6]}}   ";
  const SafetensorsFile file = SafetensorsFile::from_bytes(file_from(header, raw_bytes(half) + raw_bytes(single)));
  EXPECT_EQ(file.values<float>("a"), std::vector<float>{1.0f});
  EXPECT_EQ(file.values<float>("b"), std::vector<float>{2.5f});
  EXPECT_EQ(file.info("b").num_elements(), 1u);
}

// --- Writing -------------------------------------------------------------------------------------

TEST(SafetensorsWrite, LayoutIsValidAndValuesComeBackBitwise) {
  std::mt19937 random(11);
  sparsemoe::Matrix<float> w(3, 5);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = std::normal_distribution<float>(0, 1)(random);
  sparsemoe::Vector<double> bias(7);
  for (Eigen::Index i = 0; i < bias.size(); ++i) bias[i] = std::normal_distribution<double>(0, 1)(random);
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.add("z.half", {3, 5}, w, SafetensorsDtype::f16);
  writer.add("w", {3, 5}, w);
  writer.add("a.bias", {7}, bias, SafetensorsDtype::f64);
  writer.add("m.bf", {5, 3}, w, SafetensorsDtype::bf16);
  const std::string bytes = writer.bytes();

  // The layout, parsed here without the reader.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  EXPECT_EQ(n % 8, 0u);
  const nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  std::map<std::string, std::size_t> sizes = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}};
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") continue;
    const std::uint64_t begin = item.value()["data_offsets"][0], end = item.value()["data_offsets"][1];
    EXPECT_EQ(begin % sizes.at(item.value()["dtype"].get<std::string>()), 0u) << item.key() << " is not aligned";
    ranges.emplace_back(begin, end);
  }
  std::sort(ranges.begin(), ranges.end());
  std::uint64_t covered = 0;
  for (const auto& range : ranges) {
    EXPECT_EQ(range.first, covered);
    covered = range.second;
  }
  EXPECT_EQ(8 + n + covered, bytes.size());
  EXPECT_EQ(header["w"]["shape"], (std::vector<int>{3, 5}));
  // The first tensor in the buffer is the F64 one (largest element first).
  EXPECT_EQ(header["a.bias"]["data_offsets"][0], 0);

  const SafetensorsFile file = SafetensorsFile::from_bytes(bytes);
  EXPECT_EQ(file.matrix<float>("w", 3, 5), w);
  EXPECT_EQ(file.vector<double>("a.bias", 7), bias);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  // Canonical: the same tensors added in another order give the same bytes.
  SafetensorsWriter other;
  other.add("m.bf", {5, 3}, w, SafetensorsDtype::bf16);
  other.add("a.bias", {7}, bias, SafetensorsDtype::f64);
  other.add("w", {3, 5}, w);
  other.add("z.half", {3, 5}, w, SafetensorsDtype::f16);
  other.set_metadata("format", "pt");
  EXPECT_EQ(other.bytes(), bytes);
}

TEST(SafetensorsWrite, HalfFormatsRoundToNearestEven) {
  std::mt19937 random(3);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.0f, 65520.0f, 1e9f, -1e9f, 5.96e-8f, 2.98e-8f,
                               2.99e-8f, 1e-45f, 3.0e38f, -3.4e38f, 1.0009765625f, 1.00048828125f, 1.00146484375f};
  for (int i = 0; i < 300; ++i) {
    values.push_back(std::ldexp(std::uniform_real_distribution<float>(-2, 2)(random),
                                std::uniform_int_distribution<int>(-30, 20)(random)));
  }
  SafetensorsWriter writer;
  writer.add("h", {values.size()}, values.data(), values.size(), SafetensorsDtype::f16);
  writer.add("b", {values.size()}, values.data(), values.size(), SafetensorsDtype::bf16);
  const SafetensorsFile file = SafetensorsFile::from_bytes(writer.bytes());
  const auto* h = file.raw_data(file.info("h"));
  const auto* b = file.raw_data(file.info("b"));
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t got_h = static_cast<std::uint16_t>(h[2 * i] | h[2 * i + 1] << 8);
    const std::uint16_t got_b = static_cast<std::uint16_t>(b[2 * i] | b[2 * i + 1] << 8);
    EXPECT_EQ(got_h, nearest(values[i], decode_f16, 0x7C00, 65504.0, 32.0)) << values[i];
    if (std::fabs(values[i]) < 1e30f) {  // the brute force is exact; bf16's range needs no overflow case here
      EXPECT_EQ(got_b, nearest(values[i], decode_bf16, 0x7F80, 3.3895313892515355e38, std::ldexp(1.0, 120)))
          << values[i];
    }
  }
  SafetensorsWriter nan_writer;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  nan_writer.add("n", {1}, &nan, 1, SafetensorsDtype::f16);
  nan_writer.add("m", {1}, &nan, 1, SafetensorsDtype::bf16);
  const SafetensorsFile nan_file = SafetensorsFile::from_bytes(nan_writer.bytes());
  EXPECT_TRUE(std::isnan(nan_file.values<float>("n")[0]));
  EXPECT_TRUE(std::isnan(nan_file.values<float>("m")[0]));
}

TEST(SafetensorsWrite, RejectsBadArguments) {
  SafetensorsWriter writer;
  const float value = 1;
  writer.add("a", {1}, &value, 1);
  EXPECT_THROW(writer.add("a", {1}, &value, 1), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", {1}, &value, 1), std::invalid_argument);
  EXPECT_THROW(writer.add("", {1}, &value, 1), std::invalid_argument);
  EXPECT_THROW(writer.add("b", {2}, &value, 1), std::invalid_argument);
  EXPECT_THROW(writer.add("c", {1}, &value, 1, SafetensorsDtype::i64), std::invalid_argument);
  EXPECT_EQ(writer.size(), 1u);
}

TEST(SafetensorsWrite, WritesAFileAtomically) {
  TempDir dir;
  SafetensorsWriter writer;
  const std::vector<float> values = {1, 2, 3};
  writer.add("x", {3}, values.data(), values.size());
  writer.write(dir.file("out.safetensors"));
  EXPECT_EQ(SafetensorsFile::open(dir.file("out.safetensors")).values<float>("x"), values);
  EXPECT_EQ(error_kind([&] { writer.write(dir.file("no/such/dir/out.safetensors")); }), ModelFileErrorKind::io);
}

// --- Sharded models ------------------------------------------------------------------------------

TEST(SafetensorsModelTest, ShardsThroughTheIndex) {
  TempDir dir;
  const std::vector<float> a = {1, 2}, b = {3, 4, 5};
  write_bytes(dir.file("model-00001-of-00002.safetensors"), make_file({{"a", "F32", {2}, raw_bytes(a)}}));
  write_bytes(dir.file("model-00002-of-00002.safetensors"), make_file({{"b", "F32", {3}, raw_bytes(b)}}));
  write_bytes(dir.file("model.safetensors.index.json"),
              "{\"metadata\":{\"total_size\":20},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
              "\"b\":\"model-00002-of-00002.safetensors\"}}");
  for (const std::string& path : {dir.file(""), dir.file("model.safetensors.index.json")}) {
    const SafetensorsModel model = SafetensorsModel::open(path);
    EXPECT_EQ(model.shards().size(), 2u);
    EXPECT_EQ(model.tensor_names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(model.vector<float>("b", 3), sparsemoe::Vector<float>::LinSpaced(3, 3, 5));
    EXPECT_EQ(model.info("a").dtype, SafetensorsDtype::f32);
    EXPECT_EQ(error_kind([&] { model.file_of("c"); }), ModelFileErrorKind::missing_tensor);
  }

  // A tensor the index places in a shard that lacks it.
  write_bytes(dir.file("bad1.json"), "{\"weight_map\":{\"a\":\"model-00002-of-00002.safetensors\"}}");
  EXPECT_EQ(error_kind([&] { SafetensorsModel::open(dir.file("bad1.json")); }), ModelFileErrorKind::missing_tensor);
  // A shard outside the index's directory.
  write_bytes(dir.file("bad2.json"), "{\"weight_map\":{\"a\":\"../x.safetensors\"}}");
  EXPECT_EQ(error_kind([&] { SafetensorsModel::open(dir.file("bad2.json")); }), ModelFileErrorKind::malformed_index);
  write_bytes(dir.file("bad3.json"), "{\"weights\":{}}");
  EXPECT_EQ(error_kind([&] { SafetensorsModel::open(dir.file("bad3.json")); }), ModelFileErrorKind::malformed_index);
  write_bytes(dir.file("bad4.json"), "{\"weight_map\":{\"a\":3}}");
  EXPECT_EQ(error_kind([&] { SafetensorsModel::open(dir.file("bad4.json")); }), ModelFileErrorKind::malformed_index);
  // A shard that does not exist.
  write_bytes(dir.file("bad5.json"), "{\"weight_map\":{\"a\":\"gone.safetensors\"}}");
  EXPECT_EQ(error_kind([&] { SafetensorsModel::open(dir.file("bad5.json")); }), ModelFileErrorKind::io);
  // Two shards with the same tensor.
  EXPECT_EQ(error_kind([&] {
              SafetensorsModel({SafetensorsFile::from_bytes(make_file({{"a", "F32", {2}, raw_bytes(a)}})),
                                SafetensorsFile::from_bytes(make_file({{"a", "F32", {2}, raw_bytes(a)}}))});
            }),
            ModelFileErrorKind::malformed_index);
  // A single file and a directory with model.safetensors.
  TempDir single;
  write_bytes(single.file("model.safetensors"), make_file({{"a", "F32", {2}, raw_bytes(a)}}));
  EXPECT_EQ(SafetensorsModel::open(single.file("")).vector<float>("a", 2)[1], 2.0f);
  EXPECT_EQ(SafetensorsModel::open(single.file("model.safetensors")).shards().size(), 1u);
}

// --- Malformed files -----------------------------------------------------------------------------

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

TEST(SafetensorsErrors, EachMalformationHasItsKind) {
  const std::string eight(8, '\0');
  const std::string sixteen(16, '\0');
  // truncated
  EXPECT_EQ(parse_error(""), ModelFileErrorKind::truncated);
  EXPECT_EQ(parse_error("1234567"), ModelFileErrorKind::truncated);
  EXPECT_EQ(parse_error(u64_le(100) + "{}"), ModelFileErrorKind::truncated);
  // header_too_large (checked before the file's size: a 100 MB + 1 length with nothing after it)
  EXPECT_EQ(parse_error(u64_le(100000001) + "{}"), ModelFileErrorKind::header_too_large);
  EXPECT_EQ(parse_error(u64_le(~std::uint64_t{0})), ModelFileErrorKind::header_too_large);
  // malformed_header
  EXPECT_EQ(parse_error(file_from("[1,2]", "")), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from(" {}", "")), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"a\":", "")), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"a\":3}", "")), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", eight)),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[-2]", 0, 8) + "}", eight)),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[2.0]", 0, 8) + "}", eight)),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", eight)),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", eight)),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{\"__metadata__\":{\"a\":1}}", "")), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("a", "F32", "[2]", 0, 8) + "}",
                                  eight)),
            ModelFileErrorKind::malformed_header);
  // unknown_dtype
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F42", "[2]", 0, 8) + "}", eight)), ModelFileErrorKind::unknown_dtype);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "f32", "[2]", 0, 8) + "}", eight)), ModelFileErrorKind::unknown_dtype);
  // size_mismatch: shape × element size differs from the byte range
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[3]", 0, 8) + "}", eight)), ModelFileErrorKind::size_mismatch);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "BF16", "[2,3]", 0, 8) + "}", eight)),
            ModelFileErrorKind::size_mismatch);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[4294967296,4294967296]", 0, 8) + "}", eight)),
            ModelFileErrorKind::size_mismatch);
  // offset_out_of_range
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[4]", 0, 16) + "}", eight)),
            ModelFileErrorKind::offset_out_of_range);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[0]", 8, 4) + "}", eight)),
            ModelFileErrorKind::offset_out_of_range);
  // overlapping_tensors
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}",
                                  sixteen.substr(0, 12))),
            ModelFileErrorKind::overlapping_tensors);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 0, 8) + "}",
                                  eight)),
            ModelFileErrorKind::overlapping_tensors);
  // uncovered_bytes: a gap, and bytes after the last tensor
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}",
                                  sixteen.substr(0, 12))),
            ModelFileErrorKind::uncovered_bytes);
  EXPECT_EQ(parse_error(file_from("{" + entry("a", "F32", "[2]", 0, 8) + "}", sixteen)),
            ModelFileErrorKind::uncovered_bytes);
  EXPECT_EQ(parse_error(file_from("{}", "x")), ModelFileErrorKind::uncovered_bytes);

  // Errors when reading a tensor out of a valid file.
  const SafetensorsFile file = SafetensorsFile::from_bytes(
      file_from("{" + entry("i", "I64", "[1]", 0, 8) + "," + entry("w", "F32", "[2]", 8, 16) + "}", sixteen));
  EXPECT_EQ(error_kind([&] { file.values<float>("i"); }), ModelFileErrorKind::unsupported_dtype);
  EXPECT_EQ(error_kind([&] { file.values<float>("x"); }), ModelFileErrorKind::missing_tensor);
  EXPECT_EQ(error_kind([&] { file.matrix<float>("w", 1, 2); }), ModelFileErrorKind::shape_mismatch);
  EXPECT_EQ(error_kind([&] { file.vector<float>("w", 3); }), ModelFileErrorKind::shape_mismatch);
  // io
  EXPECT_EQ(error_kind([&] { SafetensorsFile::open("/nonexistent/sparsemoe.safetensors"); }), ModelFileErrorKind::io);
  EXPECT_EQ(error_kind([&] { SafetensorsFile::open("/"); }), ModelFileErrorKind::io);
}

TEST(SafetensorsErrors, MessagesNameTheTensorAndValues) {
  try {
    SafetensorsFile::from_bytes(file_from("{" + entry("model.w", "F32", "[3]", 0, 8) + "}", std::string(8, '\0')),
                                "x.safetensors");
    FAIL();
  } catch (const ModelFileError& error) {
    const std::string text = error.what();
    EXPECT_NE(text.find("x.safetensors"), std::string::npos) << text;
    EXPECT_NE(text.find("model.w"), std::string::npos) << text;
    EXPECT_NE(text.find("[3]"), std::string::npos) << text;
    EXPECT_NE(text.find("12"), std::string::npos) << text;
  }
}

TEST(SafetensorsErrors, EveryTruncationIsRejected) {
  const std::vector<float> values = {1, 2, 3, 4, 5};
  const std::string bytes = make_file({{"a", "F32", {5}, raw_bytes(values)}, {"b", "F32", {0}, ""}});
  SafetensorsFile::from_bytes(bytes);  // the whole file is fine
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    try {
      SafetensorsFile::from_bytes(bytes.substr(0, size));
      ADD_FAILURE() << "a file cut to " << size << " bytes was accepted";
    } catch (const ModelFileError&) {
    }
  }
}

}  // namespace
