// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// GGUF files (issue 12, item 4): sparsemoe/io/gguf.hpp.
//   * Reading: files made here by a minimal GGUF writer of the test's own load with every
//     metadata value type, the alignment, and F32/F16/BF16/Q8_0 tensors whose values equal a
//     decoder written here (Q8_0: f16 scale × int8, per 32-element block); ne is fastest-first
//     and shape() row-major.
//   * MoE blocks of the architectures llama (Mixtral), qwen2moe, qwen3moe, olmoe and deepseek2
//     (V2 softmax with groups, V3 sigmoid with exp_probs_b) from stacked expert tensors equal the
//     naive reference of moe_block_reference.hpp on the same raw weights (Q8_0 experts too).
//   * Each malformed file gets its own ModelFileErrorKind; every truncation is rejected.
//   * Writing (io/gguf_writer.hpp): the library's GgufWriter gives the test writer's bytes (plus
//     llama.cpp's trailing padding) for the same metadata and F32/F16/BF16 tensors; its Q8_0
//     equals a naive quantiser written here (own binary16 encoder); its errors. Each family's
//     block exported and read back is bitwise the layer (F32), stable after the first rounding
//     (BF16, F16), the naive Q8_0 round trip of its experts (Q8_0); what a family cannot express
//     is rejected with nothing written.
#include <sparsemoe/io/gguf.hpp>
#include <sparsemoe/io/gguf_writer.hpp>

#include "moe_block_reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace moe_block_reference;
using sparsemoe::GgufFile;
using sparsemoe::ModelFileError;
using sparsemoe::ModelFileErrorKind;

// --- The test's own GGUF writer ---------------------------------------------------------------

std::string le(std::uint64_t value, int bytes) {
  std::string out;
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  return out;
}
std::string gguf_string(const std::string& text) { return le(text.size(), 8) + text; }

struct Kv {
  std::string key;
  std::uint32_t type;
  std::string value;  // encoded
};
Kv kv_u32(const std::string& key, std::uint32_t v) { return {key, 4, le(v, 4)}; }
Kv kv_f32(const std::string& key, float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return {key, 6, le(bits, 4)};
}
Kv kv_bool(const std::string& key, bool v) { return {key, 7, std::string(1, v ? '\1' : '\0')}; }
Kv kv_string(const std::string& key, const std::string& v) { return {key, 8, gguf_string(v)}; }

struct Tensor {
  std::string name;
  std::vector<std::uint64_t> ne;
  std::uint32_t type;
  std::string bytes;
};

/// A GGUF file: header, metadata, tensor infos with offsets aligned to `alignment`, padding, data.
std::string make_gguf(const std::vector<Kv>& kvs, const std::vector<Tensor>& tensors, std::uint64_t alignment = 32,
                      std::uint32_t version = 3) {
  std::string out = "GGUF" + le(version, 4) + le(tensors.size(), 8) + le(kvs.size(), 8);
  for (const Kv& kv : kvs) out += gguf_string(kv.key) + le(kv.type, 4) + kv.value;
  std::vector<std::uint64_t> offsets;
  std::uint64_t offset = 0;
  for (const Tensor& t : tensors) {
    offsets.push_back(offset);
    offset = (offset + t.bytes.size() + alignment - 1) / alignment * alignment;
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    out += gguf_string(tensors[i].name) + le(tensors[i].ne.size(), 4);
    for (const std::uint64_t extent : tensors[i].ne) out += le(extent, 8);
    out += le(tensors[i].type, 4) + le(offsets[i], 8);
  }
  out.append((alignment - out.size() % alignment) % alignment, '\0');
  const std::size_t data = out.size();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    out.resize(data + offsets[i], '\0');
    out += tensors[i].bytes;
  }
  return out;
}

/// binary16 from its definition (as in test_safetensors).
double decode_f16(std::uint16_t bits) {
  const int exponent = (bits >> 10) & 31, mantissa = bits & 1023;
  const double value = exponent == 0 ? std::ldexp(mantissa / 1024.0, -14) : std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  return (bits >> 15) ? -value : value;
}

/// A binary16 near a positive normal float: its exponent and top 10 mantissa bits (truncated).
std::uint16_t truncate_to_f16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const int exponent = static_cast<int>((bits >> 23) & 255) - 127 + 15;
  return static_cast<std::uint16_t>(exponent << 10 | ((bits >> 13) & 1023));
}

/// Q8_0 bytes of `values` (a multiple of 32), and `values` replaced by what they decode to:
/// float(d)·q with d the block's scale as stored.
std::string quantize_q8_0(std::vector<float>& values) {
  std::string out;
  for (std::size_t block = 0; block < values.size() / 32; ++block) {
    float amax = 0.01f;  // keeps the scale a normal binary16
    for (std::size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(values[32 * block + j]));
    const std::uint16_t d_bits = truncate_to_f16(amax / 127.0f);
    const float d = static_cast<float>(decode_f16(d_bits));
    out += le(d_bits, 2);
    for (std::size_t j = 0; j < 32; ++j) {
      const float q = std::max(-127.0f, std::min(127.0f, std::round(values[32 * block + j] / d)));
      out.push_back(static_cast<char>(static_cast<std::int8_t>(q)));
      values[32 * block + j] = d * q;
    }
  }
  return out;
}

template <typename Function>
ModelFileErrorKind error_kind(Function&& function) {
  try {
    function();
  } catch (const ModelFileError& error) {
    return error.kind();
  }
  ADD_FAILURE() << "no ModelFileError";
  return ModelFileErrorKind::io;
}

ModelFileErrorKind parse_error(const std::string& bytes) {
  return error_kind([&] { GgufFile::from_bytes(bytes); });
}

std::vector<float> f32_values(std::size_t count, unsigned seed) {
  std::mt19937 random(seed);
  std::vector<float> v(count);
  for (float& x : v) x = std::normal_distribution<float>(0, 1)(random);
  return v;
}

// --- Reading -------------------------------------------------------------------------------------

TEST(GgufRead, MetadataOfEveryTypeAndTensorsOfEveryConvertedType) {
  std::vector<Kv> kvs = {
      {"u8", 0, le(200, 1)}, {"i8", 1, le(0xFE, 1)}, {"u16", 2, le(60000, 2)}, {"i16", 3, le(0xFFFE, 2)},
      kv_u32("u32", 4000000000u), {"i32", 5, le(0xFFFFFFFE, 4)}, kv_f32("f32", 1.5f), kv_bool("bool", true),
      kv_string("general.name", "tiny"), {"u64", 10, le(1ull << 40, 8)}, {"i64", 11, le(~std::uint64_t{0}, 8)},
  };
  double f64 = -2.25;
  std::uint64_t f64_bits;
  std::memcpy(&f64_bits, &f64, 8);
  kvs.push_back({"f64", 12, le(f64_bits, 8)});
  kvs.push_back({"strings", 9, le(8, 4) + le(2, 8) + gguf_string("a") + gguf_string("bc")});
  kvs.push_back({"nested", 9, le(9, 4) + le(1, 8) + le(4, 4) + le(2, 8) + le(7, 4) + le(8, 4)});

  const std::vector<float> a = f32_values(6, 1);
  std::vector<std::uint16_t> half = {0x3C00, 0xC000, 0x0001, 0x7BFF};  // 1, −2, 2^−24, 65504
  std::vector<std::uint16_t> brain = {0x3F80, 0xC040};                  // 1, −3
  std::vector<float> q = f32_values(64, 2);
  const std::string q_bytes = quantize_q8_0(q);
  const std::string bytes = make_gguf(kvs, {{"a", {3, 2}, 0, raw_bytes(a)},
                                            {"h", {4}, 1, raw_bytes(half)},
                                            {"b", {2}, 30, raw_bytes(brain)},
                                            {"q", {32, 2}, 8, q_bytes}});
  const GgufFile file = GgufFile::from_bytes(bytes);
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  const nlohmann::json& m = file.metadata();
  EXPECT_EQ(m["u8"], 200);
  EXPECT_EQ(m["i8"], -2);
  EXPECT_EQ(m["u16"], 60000);
  EXPECT_EQ(m["i16"], -2);
  EXPECT_EQ(m["u32"], 4000000000u);
  EXPECT_EQ(m["i32"], -2);
  EXPECT_EQ(m["f32"], 1.5);
  EXPECT_EQ(m["bool"], true);
  EXPECT_EQ(m["general.name"], "tiny");
  EXPECT_EQ(m["u64"], 1ull << 40);
  EXPECT_EQ(m["i64"], -1);
  EXPECT_EQ(m["f64"], -2.25);
  EXPECT_EQ(m["strings"], nlohmann::json({"a", "bc"}));
  EXPECT_EQ(m["nested"], nlohmann::json::array({nlohmann::json::array({7, 8})}));

  EXPECT_EQ(file.info("a").ne, (std::vector<std::uint64_t>{3, 2}));
  EXPECT_EQ(file.info("a").shape(), (std::vector<std::uint64_t>{2, 3}));
  const sparsemoe::Matrix<float> matrix = file.matrix<float>("a", 2, 3);
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 3; ++c) EXPECT_EQ(matrix(r, c), a[static_cast<std::size_t>(3 * r + c)]);
  }
  EXPECT_EQ(file.values<double>("h"), (std::vector<double>{1.0, -2.0, std::ldexp(1.0, -24), 65504.0}));
  EXPECT_EQ(file.values<float>("b"), (std::vector<float>{1.0f, -3.0f}));
  EXPECT_EQ(file.values<float>("q"), q);
  const sparsemoe::Matrix<float> second_row = file.matrix<float>("q", 2, 32).row(1);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(second_row(0, j), q[static_cast<std::size_t>(32 + j)]);
  EXPECT_EQ(error_kind([&] { file.matrix<float>("a", 3, 2); }), ModelFileErrorKind::shape_mismatch);
  EXPECT_EQ(error_kind([&] { file.values<float>("missing"); }), ModelFileErrorKind::missing_tensor);
}

TEST(GgufRead, SlicesOfStackedTensorsAndAlignment) {
  // ne {4, 3, 5}: five row-major 3×4 matrices; alignment 64.
  const std::vector<float> values = f32_values(60, 3);
  const std::vector<float> other = f32_values(3, 4);
  const std::string bytes = make_gguf({{"general.alignment", 4, le(64, 4)}},
                                      {{"x", {3}, 0, raw_bytes(other)}, {"stack", {4, 3, 5}, 0, raw_bytes(values)}}, 64);
  const GgufFile file = GgufFile::from_bytes(bytes);
  EXPECT_EQ(file.alignment(), 64u);
  EXPECT_EQ(file.info("stack").offset, 64u);
  for (Index e = 0; e < 5; ++e) {
    const sparsemoe::Matrix<double> slice = file.slice<double>("stack", e, 5, 3, 4);
    for (Index r = 0; r < 3; ++r) {
      for (Index c = 0; c < 4; ++c) EXPECT_EQ(slice(r, c), values[static_cast<std::size_t>(e * 12 + r * 4 + c)]);
    }
  }
  EXPECT_THROW(file.slice<double>("stack", 5, 5, 3, 4), std::invalid_argument);
  EXPECT_EQ(error_kind([&] { file.slice<double>("stack", 0, 4, 3, 5); }), ModelFileErrorKind::shape_mismatch);
}

TEST(GgufErrors, EachMalformationHasItsKind) {
  const std::vector<float> four = {1, 2, 3, 4};
  const std::string good = make_gguf({kv_string("k", "v")}, {{"t", {4}, 0, raw_bytes(four)}});
  GgufFile::from_bytes(good);
  std::string bad = good;
  bad[0] = 'X';
  EXPECT_EQ(parse_error(bad), ModelFileErrorKind::bad_magic);
  EXPECT_EQ(parse_error(make_gguf({}, {}, 32, 1)), ModelFileErrorKind::unsupported_version);
  EXPECT_EQ(parse_error(make_gguf({}, {}, 32, 4)), ModelFileErrorKind::unsupported_version);
  EXPECT_EQ(parse_error(make_gguf({}, {}, 32, 2).substr(0, 8)), ModelFileErrorKind::truncated);
  EXPECT_EQ(parse_error(make_gguf({{"k", 13, ""}}, {})), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({kv_bool("k", true), kv_bool("k", false)}, {})), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({{"k", 7, std::string(1, '\2')}}, {})), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({{"general.alignment", 4, le(3, 4)}}, {})), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({{"huge", 9, le(0, 4) + le(1ull << 40, 8)}}, {})), ModelFileErrorKind::truncated);
  EXPECT_EQ(parse_error(make_gguf({}, {{"t", {1, 1, 1, 1, 4}, 0, raw_bytes(four)}})), ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({}, {{"t", {4}, 0, raw_bytes(four)}, {"t", {4}, 0, raw_bytes(four)}})),
            ModelFileErrorKind::malformed_header);
  EXPECT_EQ(parse_error(make_gguf({}, {{"t", {4}, 99, raw_bytes(four)}})), ModelFileErrorKind::unknown_dtype);
  EXPECT_EQ(parse_error(make_gguf({}, {{"t", {20}, 8, std::string(34, '\0')}})), ModelFileErrorKind::size_mismatch);
  EXPECT_EQ(parse_error(make_gguf({}, {{"t", {8}, 0, raw_bytes(four)}})), ModelFileErrorKind::offset_out_of_range);
  // A tensor info edited by hand: offset 16 (not a multiple of 32), then 32 (past the data).
  std::string shifted = good;
  const std::size_t offset_field = shifted.find(std::string("\x01\0\0\0\0\0\0\0t", 9)) + 9 + 4 + 8 + 4;
  ASSERT_EQ(shifted.substr(offset_field, 8), le(0, 8));
  shifted.replace(offset_field, 8, le(16, 8));
  EXPECT_EQ(parse_error(shifted), ModelFileErrorKind::misaligned_tensor);
  shifted.replace(offset_field, 8, le(32, 8));
  EXPECT_EQ(parse_error(shifted), ModelFileErrorKind::offset_out_of_range);
  // Two tensors at the same offset.
  std::string overlapping = make_gguf({}, {{"a", {4}, 0, raw_bytes(four)}, {"b", {4}, 0, raw_bytes(four)}});
  const std::size_t b_offset = overlapping.find(std::string("\x01\0\0\0\0\0\0\0b", 9)) + 9 + 4 + 8 + 4;
  ASSERT_EQ(overlapping.substr(b_offset, 8), le(32, 8));
  overlapping.replace(b_offset, 8, le(0, 8));
  EXPECT_EQ(parse_error(overlapping), ModelFileErrorKind::overlapping_tensors);
  // Unsupported conversion.
  const GgufFile ints = GgufFile::from_bytes(make_gguf({}, {{"i", {4}, 26, raw_bytes(four)}}));
  EXPECT_EQ(error_kind([&] { ints.values<float>("i"); }), ModelFileErrorKind::unsupported_dtype);
  EXPECT_EQ(error_kind([&] { GgufFile::open("/nonexistent.gguf"); }), ModelFileErrorKind::io);
  for (std::size_t size = 0; size < good.size(); ++size) {
    try {
      GgufFile::from_bytes(good.substr(0, size));
      ADD_FAILURE() << "a file cut to " << size << " bytes was accepted";
    } catch (const ModelFileError&) {
    }
  }
}

// --- MoE blocks ----------------------------------------------------------------------------------

/// The GGUF tensors of `f`'s block from the raw HF-layout weights: stacked experts (ne {d, h, E}
/// for gate and up, {h, d, E} for down) in F32, or Q8_0 (the raw values then become the decoded
/// ones).
std::vector<Tensor> gguf_tensors(const Family& f, RawWeights& w, Index layer, bool q8, bool split = false) {
  const std::string blk = "blk." + std::to_string(layer) + ".";
  const auto u = [](Index v) { return static_cast<std::uint64_t>(v); };
  const auto encode = [&](std::vector<float>& values) { return q8 ? quantize_q8_0(values) : raw_bytes(values); };
  const std::uint32_t type = q8 ? 8 : 0;
  std::vector<Tensor> tensors;
  tensors.push_back({blk + "ffn_gate_inp.weight", {u(f.d), u(f.experts)}, 0, raw_bytes(w.values.at(f.prefix + "gate.weight"))});
  if (f.sigmoid) {
    tensors.push_back({blk + "exp_probs_b.bias", {u(f.experts)}, 0,
                       raw_bytes(w.values.at(f.prefix + "gate.e_score_correction_bias"))});
  }
  const std::vector<std::pair<std::string, std::string>> stacks = {{"ffn_gate_exps", f.gate}, {"ffn_up_exps", f.up},
                                                                   {"ffn_down_exps", f.down}};
  for (const auto& stack : stacks) {
    std::vector<float> all;
    for (Index e = 0; e < f.experts; ++e) {
      const auto& v = w.values.at(f.prefix + "experts." + std::to_string(e) + "." + stack.second + ".weight");
      all.insert(all.end(), v.begin(), v.end());
    }
    const std::string bytes = encode(all);
    for (Index e = 0; e < f.experts; ++e) {  // write the decoded values back into the raw weights
      auto& v = w.values.at(f.prefix + "experts." + std::to_string(e) + "." + stack.second + ".weight");
      std::copy(all.begin() + static_cast<std::ptrdiff_t>(e * f.d * f.h),
                all.begin() + static_cast<std::ptrdiff_t>((e + 1) * f.d * f.h), v.begin());
    }
    const bool down = stack.first == "ffn_down_exps";
    if (split) {  // one F32 tensor per expert, as older Mixtral conversions store them
      const std::string base = stack.first.substr(0, stack.first.size() - 5);  // without "_exps"
      for (Index e = 0; e < f.experts; ++e) {
        const auto& v = w.values.at(f.prefix + "experts." + std::to_string(e) + "." + stack.second + ".weight");
        tensors.push_back({blk + base + "." + std::to_string(e) + ".weight", {u(down ? f.h : f.d), u(down ? f.d : f.h)}, 0,
                           raw_bytes(v)});
      }
      continue;
    }
    tensors.push_back({blk + stack.first + ".weight", {u(down ? f.h : f.d), u(down ? f.d : f.h), u(f.experts)}, type, bytes});
  }
  if (f.shared_width > 0) {
    const std::string m = f.prefix + f.shared_module + ".";
    tensors.push_back({blk + "ffn_gate_shexp.weight", {u(f.d), u(f.shared_width)}, 0, raw_bytes(w.values.at(m + "gate_proj.weight"))});
    tensors.push_back({blk + "ffn_up_shexp.weight", {u(f.d), u(f.shared_width)}, 0, raw_bytes(w.values.at(m + "up_proj.weight"))});
    tensors.push_back({blk + "ffn_down_shexp.weight", {u(f.shared_width), u(f.d)}, 0, raw_bytes(w.values.at(m + "down_proj.weight"))});
  }
  if (f.shared_gate) {
    tensors.push_back({blk + "ffn_gate_inp_shexp.weight", {u(f.d)}, 0, raw_bytes(w.values.at(f.prefix + "shared_expert_gate.weight"))});
  }
  return tensors;
}

/// The GGUF metadata of `f`.
std::vector<Kv> gguf_metadata(const Family& f) {
  std::string arch = f.model_type == "mixtral" ? "llama"
                     : f.model_type == "qwen2_moe" ? "qwen2moe"
                     : f.model_type == "qwen3_moe" ? "qwen3moe"
                     : f.model_type == "olmoe" ? "olmoe" : "deepseek2";
  const auto u = [](Index v) { return static_cast<std::uint32_t>(v); };
  std::vector<Kv> kvs = {kv_string("general.architecture", arch), kv_u32(arch + ".block_count", 4),
                         kv_u32(arch + ".embedding_length", u(f.d)), kv_u32(arch + ".expert_count", u(f.experts)),
                         kv_u32(arch + ".expert_used_count", u(f.k))};
  kvs.push_back(kv_u32(arch + (arch == "llama" ? ".feed_forward_length" : ".expert_feed_forward_length"), u(f.h)));
  if (arch == "qwen2moe") kvs.push_back(kv_u32(arch + ".expert_shared_feed_forward_length", u(f.shared_width)));
  if (arch == "deepseek2") {
    kvs.push_back(kv_u32(arch + ".expert_gating_func", f.sigmoid ? 2 : 1));
    kvs.push_back(kv_bool(arch + ".expert_weights_norm", f.normalize));
    kvs.push_back(kv_f32(arch + ".expert_weights_scale", static_cast<float>(f.scale)));
    kvs.push_back(kv_u32(arch + ".expert_shared_count", u(f.shared_width / f.h)));
    kvs.push_back(kv_u32(arch + ".leading_dense_block_count", 1));
    kvs.push_back(kv_u32(arch + ".expert_group_count", u(f.groups)));
    kvs.push_back(kv_u32(arch + ".expert_group_used_count", u(f.top_groups)));
  }
  return kvs;
}

template <typename Scalar, typename Function>
void with_layer(const Family& f, Function&& function) {
  if (f.sigmoid) {
    function(static_cast<sparsemoe::HfSigmoidMoELayer<Scalar>*>(nullptr));
  } else {
    function(static_cast<sparsemoe::HfSoftmaxMoELayer<Scalar>*>(nullptr));
  }
}

TEST(GgufMoE, EachArchitectureMatchesTheReference) {
  for (const std::string type : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"}) {
    for (const bool q8 : {false, true}) {
      SCOPED_TRACE(type + (q8 ? " Q8_0" : " F32"));
      const Family f = q8 ? make_family(type, 2, 32, 32) : make_family(type, 2);
      RawWeights w = random_weights(f, 41);
      const GgufFile file = GgufFile::from_bytes(make_gguf(gguf_metadata(f), gguf_tensors(f, w, 2, q8)));
      with_layer<double>(f, [&](auto* tag) {
        using Layer = std::remove_pointer_t<decltype(tag)>;
        const Layer layer = sparsemoe::load_gguf_moe_block<Layer>(file, 2);
        EXPECT_EQ(layer.num_experts(), f.experts);
        EXPECT_EQ(layer.shared_hidden_dim(), f.shared_width);
        expect_matches_reference(f, w, layer, 1e-12);
      });
    }
  }
}

TEST(GgufMoE, MixtralWithOneTensorPerExpert) {
  const Family f = make_family("mixtral", 0);
  RawWeights w = random_weights(f, 43);
  const GgufFile file = GgufFile::from_bytes(make_gguf(gguf_metadata(f), gguf_tensors(f, w, 0, false, /*split=*/true)));
  EXPECT_TRUE(file.contains("blk.0.ffn_down.7.weight"));
  EXPECT_FALSE(file.contains("blk.0.ffn_down_exps.weight"));
  expect_matches_reference(f, w, sparsemoe::load_gguf_moe_block<sparsemoe::HfSoftmaxMoELayer<double>>(file, 0), 1e-12);
}

TEST(GgufMoE, MetadataAndTensorErrors) {
  Family f = make_family("deepseek_v3", 1);
  RawWeights w = random_weights(f, 7);
  const std::vector<Kv> kvs = gguf_metadata(f);
  const std::vector<Tensor> tensors = gguf_tensors(f, w, 1, false);
  const GgufFile file = GgufFile::from_bytes(make_gguf(kvs, tensors));
  EXPECT_EQ(error_kind([&] { sparsemoe::gguf_moe_block_spec(file, 0); }), ModelFileErrorKind::not_moe_layer);
  EXPECT_EQ(error_kind([&] { sparsemoe::gguf_moe_block_spec(file, 4); }), ModelFileErrorKind::not_moe_layer);
  EXPECT_EQ(error_kind([&] { sparsemoe::load_gguf_moe_block<sparsemoe::HfSoftmaxMoELayer<float>>(file, 1); }),
            ModelFileErrorKind::router_mismatch);
  const sparsemoe::HfMoEBlockSpec spec = sparsemoe::gguf_moe_block_spec(file, 1);
  EXPECT_EQ(spec.family, sparsemoe::HfFamily::deepseek_v3);
  EXPECT_EQ(spec.prefix, "blk.1.");
  EXPECT_EQ(spec.sigmoid.normalize_floor, std::ldexp(1.0, -14));

  std::vector<Kv> no_arch(kvs.begin() + 1, kvs.end());
  EXPECT_EQ(error_kind([&] { sparsemoe::gguf_moe_block_spec(GgufFile::from_bytes(make_gguf(no_arch, {})), 1); }),
            ModelFileErrorKind::unknown_architecture);
  std::vector<Kv> llama = {kv_string("general.architecture", "llama")};
  EXPECT_EQ(error_kind([&] { sparsemoe::gguf_moe_block_spec(GgufFile::from_bytes(make_gguf(llama, {})), 0); }),
            ModelFileErrorKind::unknown_architecture);  // a dense llama
  std::vector<Kv> missing = {kv_string("general.architecture", "olmoe"), kv_u32("olmoe.expert_count", 8)};
  try {
    sparsemoe::gguf_moe_block_spec(GgufFile::from_bytes(make_gguf(missing, {})), 0);
    ADD_FAILURE();
  } catch (const ModelFileError& error) {
    EXPECT_EQ(error.kind(), ModelFileErrorKind::missing_config_key);
    const std::string text = error.what();
    for (const char* key : {"embedding_length", "expert_used_count", "feed_forward_length"}) {
      EXPECT_NE(text.find(key), std::string::npos) << text;
    }
  }
  std::vector<Tensor> fewer(tensors.begin(), tensors.end() - 1);
  EXPECT_EQ(error_kind([&] {
              sparsemoe::load_gguf_moe_block<sparsemoe::HfSigmoidMoELayer<float>>(
                  GgufFile::from_bytes(make_gguf(kvs, fewer)), 1);
            }),
            ModelFileErrorKind::missing_tensor);
}

// --- Writing -------------------------------------------------------------------------------------

using sparsemoe::GgmlType;
using sparsemoe::GgufValueType;
using sparsemoe::GgufWriter;
using sparsemoe::HfFamily;

/// binary16 of a finite v >= 0 below 65520, rounded to nearest even, from the definition.
std::uint16_t encode_f16(double v) {
  if (v == 0) return 0;
  int e = 0;
  std::frexp(v, &e);  // v = m·2^e, m in [0.5, 1): the leading bit is 2^(e−1)
  int exponent = e - 1 + 15;
  if (exponent < 1) return static_cast<std::uint16_t>(std::nearbyint(std::ldexp(v, 24)));  // subnormal (or 2^−14)
  double mantissa = std::nearbyint(std::ldexp(v, 10 - (e - 1)));  // in [1024, 2048]
  if (mantissa == 2048) {
    mantissa = 1024;
    ++exponent;
  }
  return static_cast<std::uint16_t>(exponent << 10 | (static_cast<int>(mantissa) - 1024));
}

/// llama.cpp's reference Q8_0 written out naively: per 32 values d = max|x|/127, q = round(x·(1/d))
/// in [−127, 127], the scale stored as binary16; `bytes` gets the blocks, the result is f16(d)·q.
std::vector<float> naive_q8_0(const std::vector<float>& x, std::string* bytes = nullptr) {
  std::vector<float> out(x.size());
  for (std::size_t block = 0; block < x.size() / 32; ++block) {
    float amax = 0;
    for (std::size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * block + j]));
    const float d = amax / 127.0f;
    const float inverse = d != 0 ? 1.0f / d : 0.0f;
    const std::uint16_t bits = encode_f16(d);
    if (bytes) *bytes += le(bits, 2);
    for (std::size_t j = 0; j < 32; ++j) {
      const float q = std::min(127.0f, std::max(-127.0f, std::round(x[32 * block + j] * inverse)));
      if (bytes) bytes->push_back(static_cast<char>(static_cast<std::int8_t>(q)));
      out[32 * block + j] = static_cast<float>(decode_f16(bits) * q);
    }
  }
  return out;
}

TEST(GgufWrite, SameBytesAsTheTestWriter) {
  GgufWriter writer;
  writer.set_string("general.architecture", "tiny");
  writer.set_u32("general.alignment", 64);
  writer.set_u32("n", 7);
  writer.set_f32("f", 1.5f);
  writer.set_bool("b", true);
  writer.set("strings", GgufValueType::array, {"a", "bc"}, GgufValueType::string);
  writer.set("u32s", GgufValueType::array, {1, 2, 3}, GgufValueType::u32);
  writer.set("f32s", GgufValueType::array, {0.5, 2}, GgufValueType::f32);  // an integer element too
  writer.set_u32("n", 8);  // replaces the value, keeps the place
  const std::vector<float> a = f32_values(6, 5);
  const std::vector<float> half = {1.0f, -2.0f, std::ldexp(1.0f, -24), 65504.0f};
  const std::vector<float> brain = {1.0f, -3.0f};
  writer.add("a", {3, 2}, a.data(), a.size());
  writer.add("h", {4}, half.data(), half.size(), GgmlType::f16);
  writer.add("b", {2}, brain.data(), brain.size(), GgmlType::bf16);
  const std::string bytes = writer.bytes();

  const std::vector<std::uint16_t> half_bits = {0x3C00, 0xC000, 0x0001, 0x7BFF};
  const std::vector<std::uint16_t> brain_bits = {0x3F80, 0xC040};
  const std::string want = make_gguf({kv_string("general.architecture", "tiny"), kv_u32("general.alignment", 64),
                                      kv_u32("n", 8), kv_f32("f", 1.5f), kv_bool("b", true),
                                      {"strings", 9, le(8, 4) + le(2, 8) + gguf_string("a") + gguf_string("bc")},
                                      {"u32s", 9, le(4, 4) + le(3, 8) + le(1, 4) + le(2, 4) + le(3, 4)},
                                      {"f32s", 9, le(6, 4) + le(2, 8) + le(0x3F000000, 4) + le(0x40000000, 4)}},
                                     {{"a", {3, 2}, 0, raw_bytes(a)},
                                      {"h", {4}, 1, raw_bytes(half_bits)},
                                      {"b", {2}, 30, raw_bytes(brain_bits)}},
                                     64);
  // llama.cpp pads after the last tensor too; the test writer does not.
  ASSERT_GE(bytes.size(), want.size());
  EXPECT_EQ(bytes.substr(0, want.size()), want);
  EXPECT_EQ(bytes.substr(want.size()), std::string(bytes.size() - want.size(), '\0'));
  EXPECT_EQ(bytes.size() % 64, 0u);
  const GgufFile file = GgufFile::from_bytes(bytes);
  EXPECT_EQ(file.metadata(), writer.metadata());
  EXPECT_EQ(file.alignment(), 64u);
  EXPECT_EQ(file.values<float>("a"), a);
  EXPECT_EQ(file.values<float>("h"), half);
  EXPECT_EQ(file.values<float>("b"), brain);
}

TEST(GgufWrite, Q8_0IsTheNaiveQuantiser) {
  std::vector<float> x = f32_values(32 * 6, 9);
  for (std::size_t j = 32; j < 64; ++j) x[j] = 0;        // an all-zero block: d = 0
  x[70] = 1000;                                          // a block with one large value
  for (std::size_t j = 96; j < 128; ++j) x[j] = static_cast<float>(j) - 111.5f;  // an evenly spaced block
  std::vector<double> as_double(x.begin(), x.end());
  GgufWriter writer;
  writer.add("q", {64, 3}, x.data(), x.size(), GgmlType::q8_0);
  writer.add("qd", {32, 6}, as_double.data(), as_double.size(), GgmlType::q8_0);
  std::string want_bytes;
  const std::vector<float> want = naive_q8_0(x, &want_bytes);
  const GgufFile file = GgufFile::from_bytes(writer.bytes());
  EXPECT_EQ(file.info("q").type, GgmlType::q8_0);
  EXPECT_EQ(file.info("q").size_bytes, 6u * 34u);
  const std::string bytes = writer.bytes();
  const std::size_t data = bytes.size() - 2 * 224;  // two tensors of 204 bytes, each padded to 224
  EXPECT_EQ(bytes.substr(data, want_bytes.size()), want_bytes);
  EXPECT_EQ(file.values<float>("q"), want);
  EXPECT_EQ(file.values<float>("qd"), want);
  for (std::size_t block = 0; block < 6; ++block) {  // within half a step, plus the scale's rounding
    double d = 0;
    for (std::size_t j = 0; j < 32; ++j) d = std::max(d, std::fabs(static_cast<double>(x[32 * block + j])) / 127);
    for (std::size_t j = 32 * block; j < 32 * block + 32; ++j) {
      EXPECT_LE(std::fabs(static_cast<double>(want[j]) - x[j]), 0.5 * d + 127 * d / 2048) << j;
    }
  }
}

TEST(GgufWrite, Errors) {
  GgufWriter writer;
  const std::vector<float> v(64, 1.0f);
  EXPECT_THROW(writer.add("", {4}, v.data(), 4), std::invalid_argument);
  EXPECT_THROW(writer.add(std::string(64, 'n'), {4}, v.data(), 4), std::invalid_argument);
  EXPECT_THROW(writer.add("t", {4}, v.data(), 5), std::invalid_argument);
  EXPECT_THROW(writer.add("t", {1, 1, 1, 1, 4}, v.data(), 4), std::invalid_argument);
  EXPECT_THROW(writer.add("t", {0}, v.data(), 0), std::invalid_argument);
  EXPECT_THROW(writer.add("t", {4}, v.data(), 4, GgmlType::q4_0), std::invalid_argument);
  EXPECT_THROW(writer.add("t", {16, 4}, v.data(), 64, GgmlType::q8_0), std::invalid_argument);
  std::vector<float> nan = v;
  nan[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(writer.add("t", {64}, nan.data(), 64, GgmlType::q8_0), std::invalid_argument);
  std::vector<float> huge = v;
  huge[0] = 1e10f;
  EXPECT_THROW(writer.add("t", {64}, huge.data(), 64, GgmlType::q8_0), std::invalid_argument);
  EXPECT_EQ(writer.size(), 0u);
  writer.add("t", {64}, v.data(), 64);
  EXPECT_THROW(writer.add("t", {64}, v.data(), 64), std::invalid_argument);
  EXPECT_THROW(writer.set_u32("", 1), std::invalid_argument);
  EXPECT_THROW(writer.set_u32("general.alignment", 48), std::invalid_argument);
  EXPECT_THROW(writer.set_u64("general.alignment", 64), std::invalid_argument);
  EXPECT_THROW(writer.set("x", GgufValueType::u8, 256), std::invalid_argument);
  EXPECT_THROW(writer.set("x", GgufValueType::i32, "text"), std::invalid_argument);
  EXPECT_THROW(writer.set("x", GgufValueType::array, {{1}}, GgufValueType::array), std::invalid_argument);
  EXPECT_THROW(writer.set("x", GgufValueType::array, {1, -1}, GgufValueType::u32), std::invalid_argument);
  EXPECT_TRUE(writer.metadata().empty());
  try {
    writer.write("/nonexistent-directory/model.gguf");
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const ModelFileError& error) {
    EXPECT_EQ(error.kind(), ModelFileErrorKind::io);
    EXPECT_NE(std::string(error.what()).find("/nonexistent-directory/model.gguf"), std::string::npos) << error.what();
  }
  // A write that succeeds replaces the file, and GgufFile::open reads it.
  const std::string path = ::testing::TempDir() + "sparsemoe_gguf_writer_test.gguf";
  writer.set_string("general.name", "x");
  writer.write(path);
  writer.write(path);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(file.metadata()["general.name"], "x");
  EXPECT_EQ(file.values<float>("t"), v);
  std::remove(path.c_str());
}

// --- Exporting MoE blocks ------------------------------------------------------------------------

template <typename Layer>
void expect_bitwise_equal(Layer& a, Layer& b) {
  using Scalar = typename Layer::Scalar;
  const auto x = all_state(a), y = all_state(b);
  ASSERT_EQ(x.size(), y.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(x[i].size(), y[i].size()) << "tensor " << i;
    EXPECT_EQ(std::memcmp(x[i].data(), y[i].data(), x[i].size() * sizeof(Scalar)), 0) << "tensor " << i;
  }
  sparsemoe::Matrix<Scalar> input(7, a.input_dim());
  std::mt19937 random(5);
  for (Index i = 0; i < input.size(); ++i) input.data()[i] = std::normal_distribution<Scalar>(0, 1)(random);
  const auto ra = a.forward(input), rb = b.forward(input);
  ASSERT_EQ(ra.output.size(), rb.output.size());
  EXPECT_EQ(std::memcmp(ra.output.data(), rb.output.data(), sizeof(Scalar) * static_cast<std::size_t>(ra.output.size())), 0);
}

/// A float layer of family `f` with random weights, read from the test writer's file.
template <typename Layer>
Layer random_layer(const Family& f, unsigned seed) {
  RawWeights w = random_weights(f, seed);
  return sparsemoe::load_gguf_moe_block<Layer>(GgufFile::from_bytes(make_gguf(gguf_metadata(f), gguf_tensors(f, w, 2, false))), 2);
}

TEST(GgufExport, EachFamilyRoundTripsBitwise) {
  for (const std::string& type : all_families) {
    SCOPED_TRACE(type);
    const Family f = make_family(type, 2);
    const HfFamily family = *sparsemoe::parse_hf_family(type);
    with_layer<float>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      Layer first = random_layer<Layer>(f, 51);
      GgufWriter writer;
      sparsemoe::export_gguf_moe_block(first, family, 2, writer);
      const GgufFile file = GgufFile::from_bytes(writer.bytes());
      const std::string arch = sparsemoe::gguf_architecture(family);
      const nlohmann::json& m = file.metadata();
      EXPECT_EQ(m["general.architecture"], arch);
      EXPECT_EQ(m[arch + ".block_count"], 3);
      EXPECT_EQ(m[arch + ".embedding_length"], f.d);
      EXPECT_EQ(m[arch + ".expert_count"], f.experts);
      EXPECT_EQ(m[arch + ".expert_used_count"], f.k);
      EXPECT_EQ(m[arch + (arch == "llama" ? ".feed_forward_length" : ".expert_feed_forward_length")], f.h);
      if (arch == "deepseek2") {
        EXPECT_EQ(m[arch + ".expert_gating_func"], f.sigmoid ? 2 : 1);
        EXPECT_EQ(m[arch + ".expert_weights_scale"], f.scale);
        EXPECT_EQ(m[arch + ".expert_group_count"], f.groups);
        EXPECT_EQ(m[arch + ".expert_group_used_count"], f.top_groups);
        EXPECT_EQ(m[arch + ".expert_shared_count"], f.shared_width / f.h);
      }
      const auto u = [](Index v) { return static_cast<std::uint64_t>(v); };
      EXPECT_EQ(file.info("blk.2.ffn_gate_inp.weight").ne, (std::vector<std::uint64_t>{u(f.d), u(f.experts)}));
      EXPECT_EQ(file.info("blk.2.ffn_up_exps.weight").ne, (std::vector<std::uint64_t>{u(f.d), u(f.h), u(f.experts)}));
      EXPECT_EQ(file.info("blk.2.ffn_down_exps.weight").ne, (std::vector<std::uint64_t>{u(f.h), u(f.d), u(f.experts)}));
      EXPECT_EQ(file.contains("blk.2.ffn_down_shexp.weight"), f.shared_width > 0);
      EXPECT_EQ(file.contains("blk.2.exp_probs_b.bias"), f.sigmoid);
      Layer second = sparsemoe::load_gguf_moe_block<Layer>(file, 2);
      expect_bitwise_equal(first, second);

      for (const GgmlType half : {GgmlType::bf16, GgmlType::f16}) {
        SCOPED_TRACE(sparsemoe::to_string(half));
        GgufWriter once, twice;
        sparsemoe::export_gguf_moe_block(first, family, 2, once, half);
        const GgufFile rounded = GgufFile::from_bytes(once.bytes());
        EXPECT_EQ(rounded.info("blk.2.ffn_gate_exps.weight").type, half);
        EXPECT_EQ(rounded.info("blk.2.ffn_gate_inp.weight").type, GgmlType::f32);
        Layer a = sparsemoe::load_gguf_moe_block<Layer>(rounded, 2);
        sparsemoe::export_gguf_moe_block(a, family, 2, twice, half);
        EXPECT_EQ(twice.bytes(), once.bytes());
        Layer b = sparsemoe::load_gguf_moe_block<Layer>(GgufFile::from_bytes(twice.bytes()), 2);
        expect_bitwise_equal(a, b);
      }
    });
  }
}

TEST(GgufExport, DoubleLayersRoundTripBitwiseThroughF64) {
  for (const std::string& type : all_families) {
    SCOPED_TRACE(type);
    const Family f = make_family(type, 2);
    with_layer<double>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      Layer first = random_layer<Layer>(f, 57);
      for (const auto& view : first.tensors()) {  // values a float cannot hold
        for (Index i = 0; i < view.size(); ++i) view.data[i] += 1e-10 * static_cast<double>(i + 1);
      }
      GgufWriter writer;
      sparsemoe::export_gguf_moe_block(first, *sparsemoe::parse_hf_family(type), 2, writer, GgmlType::f64);
      const GgufFile file = GgufFile::from_bytes(writer.bytes());
      EXPECT_EQ(file.info("blk.2.ffn_gate_inp.weight").type, GgmlType::f64);
      EXPECT_EQ(file.info("blk.2.ffn_down_exps.weight").type, GgmlType::f64);
      Layer second = sparsemoe::load_gguf_moe_block<Layer>(file, 2);
      expect_bitwise_equal(first, second);
    });
  }
}

TEST(GgufExport, Q8_0ExpertsAreTheNaiveRoundTrip) {
  for (const std::string& type : all_families) {
    SCOPED_TRACE(type);
    Family f = make_family(type, 2, 32, 32);
    if (f.shared_gate) f.shared_width = 32;
    const HfFamily family = *sparsemoe::parse_hf_family(type);
    with_layer<float>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      using M = sparsemoe::Matrix<float>;
      Layer first = random_layer<Layer>(f, 53);
      GgufWriter writer;
      sparsemoe::export_gguf_moe_block(first, family, 2, writer, GgmlType::q8_0);
      const GgufFile file = GgufFile::from_bytes(writer.bytes());
      EXPECT_EQ(file.info("blk.2.ffn_down_exps.weight").type, GgmlType::q8_0);
      Layer second = sparsemoe::load_gguf_moe_block<Layer>(file, 2);
      // [out, in] row-major, quantised along in (rows of 32): as the naive quantiser sees them.
      const auto naive = [](const M& out_in) {
        const std::vector<float> values(out_in.data(), out_in.data() + out_in.size());
        const std::vector<float> decoded = naive_q8_0(values);
        return M(Eigen::Map<const M>(decoded.data(), out_in.rows(), out_in.cols()));
      };
      const auto check = [&](const sparsemoe::SwiGluExpert<float>& a, const sparsemoe::SwiGluExpert<float>& b, Index width) {
        EXPECT_EQ(M(b.w1().leftCols(width).transpose()), naive(a.w1().leftCols(width).transpose()));
        EXPECT_EQ(M(b.w1().rightCols(width).transpose()), naive(a.w1().rightCols(width).transpose()));
        EXPECT_EQ(M(b.w2().transpose()), naive(a.w2().transpose()));
      };
      for (Index e = 0; e < f.experts; ++e) check(first.expert(e), second.expert(e), f.h);
      if (f.shared_width > 0) check(first.shared_expert(), second.shared_expert(), f.shared_width);
      EXPECT_EQ(first.router().weight(), second.router().weight());  // the router stays F32
      EXPECT_EQ(first.shared_expert_gate(), second.shared_expert_gate());
    });
  }
}

TEST(GgufExport, RejectsWhatAFamilyCannotExpress) {
  sparsemoe::MoEConfig config = small_block_config();
  sparsemoe::SoftmaxTopKRouterOptions options;
  options.k = 2;
  using Softmax = sparsemoe::HfSoftmaxMoELayer<float>;
  using Sigmoid = sparsemoe::HfSigmoidMoELayer<float>;
  const Softmax plain(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options));
  GgufWriter writer;
  const auto rejects = [&](const auto& layer, HfFamily family, GgmlType type = GgmlType::f32) {
    try {
      sparsemoe::export_gguf_moe_block(layer, family, 0, writer, type);
      ADD_FAILURE() << "exported as " << sparsemoe::to_string(family);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_NE(rejects(plain, HfFamily::mixtral).find("normalize_top_k"), std::string::npos);  // always renormalised
  EXPECT_NE(rejects(plain, HfFamily::qwen3_moe).find("normalize_top_k"), std::string::npos);
  rejects(plain, HfFamily::qwen2_moe);                                                      // no shared expert
  EXPECT_NE(rejects(plain, HfFamily::deepseek_v3).find("SigmoidTopKRouter"), std::string::npos);
  EXPECT_EQ(writer.size(), 0u);
  EXPECT_TRUE(writer.metadata().empty());
  options.use_bias = true;
  EXPECT_NE(rejects(Softmax(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options)), HfFamily::olmoe).find("use_bias"),
            std::string::npos);
  options.use_bias = false;
  options.scale = 0.1;  // not a float: expert_weights_scale is an f32
  EXPECT_NE(rejects(Softmax(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options)), HfFamily::deepseek_v2).find("scale"),
            std::string::npos);
  options.scale = 1.0;
  sparsemoe::SigmoidTopKRouterOptions sigmoid;
  sigmoid.k = 2;  // the default normalize_epsilon 1e-20 is Hugging Face's, not llama.cpp's
  const Sigmoid hf_v3(config, sparsemoe::SigmoidTopKRouter<float>(4, 4, sigmoid));
  EXPECT_NE(rejects(hf_v3, HfFamily::deepseek_v3).find("normalize_epsilon"), std::string::npos);
  EXPECT_NE(rejects(plain, HfFamily::olmoe, GgmlType::q8_0).find("multiples of 32"), std::string::npos);
  config.shared_hidden_dim = 5;  // not a multiple of h = 3
  rejects(Softmax(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options)), HfFamily::deepseek_v2);
  EXPECT_EQ(writer.size(), 0u);
  EXPECT_TRUE(writer.metadata().empty());
  EXPECT_THROW(sparsemoe::export_gguf_moe_block(plain, HfFamily::olmoe, -1, writer), std::invalid_argument);

  // Several layers of one model into one file; a block that disagrees with the file's keys, or a
  // layer exported twice, is rejected and leaves the writer as it was.
  sparsemoe::export_gguf_moe_block(plain, HfFamily::olmoe, 3, writer);
  sparsemoe::export_gguf_moe_block(plain, HfFamily::olmoe, 1, writer);
  EXPECT_EQ(writer.metadata()["olmoe.block_count"], 4);
  const std::size_t tensors = writer.size();
  sparsemoe::export_gguf_moe_block(plain, HfFamily::olmoe, 0, writer);
  EXPECT_EQ(writer.size(), tensors + 4);
  EXPECT_THROW(sparsemoe::export_gguf_moe_block(plain, HfFamily::olmoe, 1, writer), std::invalid_argument);
  config.shared_hidden_dim = 0;
  config.k = 3;
  options.k = 3;
  EXPECT_THROW(sparsemoe::export_gguf_moe_block(Softmax(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options)),
                                                HfFamily::olmoe, 5, writer),
               std::invalid_argument);  // expert_used_count 3 against the file's 2
  EXPECT_EQ(writer.size(), tensors + 4);
  EXPECT_EQ(writer.metadata()["olmoe.block_count"], 4);
  const GgufFile file = GgufFile::from_bytes(writer.bytes());
  for (const Index layer : {0, 1, 3}) {
    Softmax read = sparsemoe::load_gguf_moe_block<Softmax>(file, layer);
    Softmax copy = plain;
    expect_bitwise_equal(copy, read);
  }
}

}  // namespace
