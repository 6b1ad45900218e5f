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
#include <sparsemoe/io/gguf.hpp>

#include "moe_block_reference.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
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

}  // namespace
