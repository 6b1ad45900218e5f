// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// libFuzzer harness for the model-file readers (issue 12): the safetensors header parser and
// checker (SafetensorsFile::from_bytes), the config.json reader of the Hugging Face families
// (hf_moe_block_spec), and the GGUF reader with its MoE block loader (GgufFile::from_bytes,
// gguf_moe_block_spec, load_gguf_moe_block).
//
// Input: one control byte, then the bytes handed to the reader.
//   control bits 0-1: 0 or 3 = the bytes are a safetensors file; 1 = a config.json; 2 = a GGUF
//                     file. Bits 2-7: the layer index asked for (config.json and GGUF).
//
// Invariants, checked with __builtin_trap():
//   * the readers throw nothing but sparsemoe::ModelFileError, with a known kind and a message
//     that starts with the function's name;
//   * an accepted file has its header within the input, and tensors whose byte ranges are
//     shape × element size, tile the data buffer exactly (sorted, contiguous, to its end);
//     every tensor converts to double (F64, F32, F16, BF16, F8_E4M3, F8_E5M2) or fails with
//     unsupported_dtype (the other dtypes) only; writing the converted tensors of the writable
//     dtypes (F64, F32, F16, BF16) back with SafetensorsWriter in their own dtype gives a file the
//     reader accepts, with the same names, shapes, metadata and values (NaN for NaN);
//   * an accepted config gives sizes ≥ 1, 1 ≤ k ≤ E, groups that divide E, the block prefix of
//     the layer, and (for small sizes) a router and an MoELayer built from it without an error;
//   * an accepted GGUF file has aligned, in-range, non-overlapping tensors that convert to double
//     or fail with unsupported_dtype only; its MoE block spec and (for small sizes) the block
//     itself load or fail with a ModelFileError only.
// Plus no sanitizer report (ASan, UBSan) and no leak.
//
// Seeds (fuzz/corpus/fuzz_model_files/): small files of each dtype with metadata, one config.json
// of each family, and a GGUF MoE block. Regenerate them with
//   clang++ -std=c++17 -DSPARSEMOE_FUZZ_WRITE_SEEDS -Iinclude -isystem /usr/include/eigen3 \
//     fuzz/fuzz_model_files.cpp -o /tmp/seeds && /tmp/seeds fuzz/corpus/fuzz_model_files
#include <sparsemoe/io/gguf.hpp>
#include <sparsemoe/io/hf_models.hpp>
#include <sparsemoe/io/safetensors.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
#include <fstream>
#endif

#include "fuzz_check.hpp"

namespace {

using sparsemoe::Index;
using sparsemoe::ModelFileError;
using sparsemoe::ModelFileErrorKind;
using sparsemoe::SafetensorsDtype;
using sparsemoe::SafetensorsFile;

bool known_kind(ModelFileErrorKind kind) { return std::string(to_string(kind)) != "unknown"; }

bool starts_with(const char* text, const char* prefix) { return std::strncmp(text, prefix, std::strlen(prefix)) == 0; }

bool same_values(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) return false;
  }
  return true;
}

bool writable(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::f64 || dtype == SafetensorsDtype::f32 || dtype == SafetensorsDtype::f16 ||
         dtype == SafetensorsDtype::bf16;
}

bool converts(SafetensorsDtype dtype) {
  return writable(dtype) || dtype == SafetensorsDtype::f8_e4m3 || dtype == SafetensorsDtype::f8_e5m2;
}

void fuzz_file(const std::string& bytes) {
  std::vector<SafetensorsFile> parsed;
  try {
    parsed.push_back(SafetensorsFile::from_bytes(bytes));
  } catch (const ModelFileError& error) {
    FUZZ_CHECK(known_kind(error.kind()));
    FUZZ_CHECK(starts_with(error.what(), "sparsemoe::SafetensorsFile::from_bytes"));
    return;
  }
  const SafetensorsFile& file = parsed.front();
  FUZZ_CHECK(8 + file.header_size() <= bytes.size());
  const std::uint64_t buffer = bytes.size() - 8 - file.header_size();
  std::uint64_t covered = 0;
  for (const auto& tensor : file.tensors()) {
    FUZZ_CHECK(tensor.begin == covered);
    FUZZ_CHECK(tensor.end - tensor.begin == tensor.num_elements() * sparsemoe::element_size(tensor.dtype));
    FUZZ_CHECK(file.contains(tensor.name));
    covered = tensor.end;
  }
  FUZZ_CHECK(covered == buffer);

  sparsemoe::SafetensorsWriter writer;
  std::vector<std::vector<double>> values(file.tensors().size());
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const auto& tensor = file.tensors()[i];
    try {
      values[i] = file.values<double>(tensor.name);
      FUZZ_CHECK(converts(tensor.dtype));
      FUZZ_CHECK(values[i].size() == tensor.num_elements());
    } catch (const ModelFileError& error) {
      FUZZ_CHECK(error.kind() == ModelFileErrorKind::unsupported_dtype && !converts(tensor.dtype));
      continue;
    }
    if (!tensor.name.empty() && writable(tensor.dtype)) {
      writer.add(tensor.name, tensor.shape, values[i].data(), values[i].size(), tensor.dtype);
    }
  }
  for (const auto& item : file.metadata()) writer.set_metadata(item.first, item.second);
  const SafetensorsFile again = SafetensorsFile::from_bytes(writer.bytes());
  FUZZ_CHECK(again.metadata() == file.metadata());
  FUZZ_CHECK(again.tensors().size() == writer.size());
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const auto& tensor = file.tensors()[i];
    if (tensor.name.empty() || !writable(tensor.dtype)) continue;
    FUZZ_CHECK(again.info(tensor.name).shape == tensor.shape);
    FUZZ_CHECK(again.info(tensor.name).dtype == tensor.dtype);
    FUZZ_CHECK(same_values(again.values<double>(tensor.name), values[i]));
  }
}

/// Small enough to build: the block's parameter count stays under 10^5.
bool small(const sparsemoe::MoEConfig& sizes) {
  return static_cast<double>(sizes.input_dim) * static_cast<double>(sizes.num_experts) *
             static_cast<double>(sizes.hidden_dim + sizes.shared_hidden_dim + 1) <= 1e5;
}

void fuzz_config(const std::string& bytes, Index layer) {
  const nlohmann::json config = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) return;
  sparsemoe::HfMoEBlockSpec spec;
  try {
    spec = sparsemoe::hf_moe_block_spec(config, layer);
  } catch (const ModelFileError& error) {
    FUZZ_CHECK(known_kind(error.kind()));
    FUZZ_CHECK(starts_with(error.what(), "sparsemoe::hf_moe_block_spec"));
    return;
  }
  const sparsemoe::MoEConfig& sizes = spec.config;
  FUZZ_CHECK(sizes.input_dim >= 1 && sizes.hidden_dim >= 1 && sizes.num_experts >= 1);
  FUZZ_CHECK(sizes.k >= 1 && sizes.k <= sizes.num_experts);
  FUZZ_CHECK(spec.prefix.rfind("model.layers." + std::to_string(layer) + ".", 0) == 0);
  const Index groups = spec.sigmoid_router ? spec.sigmoid.num_groups : spec.softmax.num_groups;
  FUZZ_CHECK(groups >= 1 && sizes.num_experts % groups == 0);
  if (!small(sizes)) return;  // building it would only test the allocator
  if (spec.sigmoid_router) {
    sparsemoe::HfSigmoidMoELayer<float> built(
        sizes, sparsemoe::SigmoidTopKRouter<float>(sizes.input_dim, sizes.num_experts, spec.sigmoid));
    FUZZ_CHECK(built.k() == sizes.k);
  } else {
    sparsemoe::HfSoftmaxMoELayer<float> built(
        sizes, sparsemoe::SoftmaxTopKRouter<float>(sizes.input_dim, sizes.num_experts, spec.softmax));
    FUZZ_CHECK(built.k() == sizes.k);
  }
}

void fuzz_gguf(const std::string& bytes, Index layer) {
  std::vector<sparsemoe::GgufFile> parsed;
  try {
    parsed.push_back(sparsemoe::GgufFile::from_bytes(bytes));
  } catch (const ModelFileError& error) {
    FUZZ_CHECK(known_kind(error.kind()));
    FUZZ_CHECK(starts_with(error.what(), "sparsemoe::GgufFile::from_bytes"));
    return;
  }
  const sparsemoe::GgufFile& file = parsed.front();
  FUZZ_CHECK(file.version() == 2 || file.version() == 3);
  for (const auto& tensor : file.tensors()) {
    FUZZ_CHECK(tensor.offset % file.alignment() == 0 && tensor.ne.size() <= 4);
    try {
      FUZZ_CHECK(file.values<double>(tensor.name).size() == tensor.num_elements());
    } catch (const ModelFileError& error) {
      FUZZ_CHECK(error.kind() == ModelFileErrorKind::unsupported_dtype);
    }
  }
  sparsemoe::HfMoEBlockSpec spec;
  try {
    spec = sparsemoe::gguf_moe_block_spec(file, layer);
    if (!small(spec.config)) return;
    if (spec.sigmoid_router) {
      FUZZ_CHECK(sparsemoe::load_gguf_moe_block<sparsemoe::HfSigmoidMoELayer<float>>(file, spec).k() == spec.config.k);
    } else {
      FUZZ_CHECK(sparsemoe::load_gguf_moe_block<sparsemoe::HfSoftmaxMoELayer<double>>(file, spec).k() == spec.config.k);
    }
  } catch (const ModelFileError& error) {
    FUZZ_CHECK(known_kind(error.kind()));
    FUZZ_CHECK(starts_with(error.what(), "sparsemoe::"));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  const Index layer = static_cast<Index>(data[0] >> 2);
  switch (data[0] & 3) {
    case 1: fuzz_config(bytes, layer); break;
    case 2: fuzz_gguf(bytes, layer); break;
    default: fuzz_file(bytes); break;
  }
  return 0;
}

#ifdef SPARSEMOE_FUZZ_WRITE_SEEDS
// The seeds: files of every writable dtype and configs of every family (see the file comment).
int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <seed directory>\n", argv[0]);
    return 2;
  }
  const std::string directory = argv[1];
  const auto save = [&](const std::string& name, char control, const std::string& bytes) {
    std::ofstream(directory + "/" + name, std::ios::binary) << control << bytes;
  };
  const std::vector<float> values = {1.5f, -2.0f, 0.0f, 1e-6f, 65504.0f, -0.5f};
  for (const SafetensorsDtype dtype :
       {SafetensorsDtype::f64, SafetensorsDtype::f32, SafetensorsDtype::f16, SafetensorsDtype::bf16}) {
    sparsemoe::SafetensorsWriter writer;
    writer.set_metadata("format", "pt");
    writer.add("model.layers.0.mlp.gate.weight", {2, 3}, values.data(), values.size(), dtype);
    writer.add("bias", {2}, values.data(), 2, dtype);
    writer.add("empty", {0, 3}, values.data(), 0, dtype);
    save(std::string("file_") + to_string(dtype), '\0', writer.bytes());
  }
  sparsemoe::SafetensorsWriter mixed;
  mixed.add("a", {3}, values.data(), 3, SafetensorsDtype::f32);
  mixed.add("b", {3}, values.data(), 3, SafetensorsDtype::bf16);
  save("file_mixed", '\0', mixed.bytes());
  const std::string integer = "{\"ids\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}";
  std::string length;
  for (int i = 0; i < 8; ++i) length.push_back(static_cast<char>((integer.size() >> (8 * i)) & 0xFF));
  save("file_i64", '\0', length + integer + std::string(8, '\x01'));

  const char* configs[] = {
      R"({"model_type":"mixtral","hidden_size":4,"intermediate_size":3,"num_local_experts":4,"num_experts_per_tok":2,"num_hidden_layers":2})",
      R"({"model_type":"qwen2_moe","hidden_size":4,"moe_intermediate_size":3,"shared_expert_intermediate_size":5,"num_experts":4,"num_experts_per_tok":2,"norm_topk_prob":false,"decoder_sparse_step":1,"mlp_only_layers":[]})",
      R"({"model_type":"qwen3_moe","hidden_size":4,"moe_intermediate_size":3,"num_experts":8,"num_experts_per_tok":2,"norm_topk_prob":true})",
      R"({"model_type":"olmoe","hidden_size":4,"intermediate_size":3,"num_experts":8,"num_experts_per_tok":3,"norm_topk_prob":false})",
      R"({"model_type":"deepseek_v2","hidden_size":4,"moe_intermediate_size":3,"n_routed_experts":8,"num_experts_per_tok":3,"n_group":4,"topk_group":2,"routed_scaling_factor":1.5,"norm_topk_prob":false,"n_shared_experts":2,"first_k_dense_replace":1,"topk_method":"group_limited_greedy"})",
      R"({"model_type":"deepseek_v3","hidden_size":4,"moe_intermediate_size":3,"n_routed_experts":8,"num_experts_per_tok":3,"n_group":4,"topk_group":2,"routed_scaling_factor":2.5,"norm_topk_prob":true,"n_shared_experts":1,"first_k_dense_replace":1,"moe_layer_freq":1,"scoring_func":"sigmoid","topk_method":"noaux_tc"})",
  };
  int number = 0;
  for (const char* config : configs) {
    save("config_" + std::to_string(number++), static_cast<char>(1 | (1 << 2)), config);  // layer 1
  }
  // A GGUF qwen2moe block of layer 1 (d = 32, h = 32, E = 4, k = 2), experts in Q8_0.
  const auto le = [](std::uint64_t value, int bytes) {
    std::string out;
    for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
    return out;
  };
  const auto text = [&](const std::string& value) { return le(value.size(), 8) + value; };
  struct Entry {
    std::string name;
    std::vector<std::uint64_t> ne;
    std::uint32_t type;
  };
  const std::vector<Entry> entries = {{"blk.1.ffn_gate_inp.weight", {32, 4}, 0},  {"blk.1.ffn_gate_exps.weight", {32, 32, 4}, 8},
                                      {"blk.1.ffn_up_exps.weight", {32, 32, 4}, 8}, {"blk.1.ffn_down_exps.weight", {32, 32, 4}, 8},
                                      {"blk.1.ffn_gate_shexp.weight", {32, 8}, 1},  {"blk.1.ffn_up_shexp.weight", {32, 8}, 1},
                                      {"blk.1.ffn_down_shexp.weight", {8, 32}, 30}, {"blk.1.ffn_gate_inp_shexp.weight", {32}, 0}};
  std::string gguf = "GGUF" + le(3, 4) + le(entries.size(), 8) + le(7, 8);
  gguf += text("general.architecture") + le(8, 4) + text("qwen2moe");
  for (const auto& key : {"embedding_length", "expert_feed_forward_length", "expert_count", "expert_used_count",
                          "expert_shared_feed_forward_length", "block_count"}) {
    const std::string name = key;
    const std::uint64_t value = name == "expert_count" ? 4 : name == "expert_used_count" ? 2
                                : name == "expert_shared_feed_forward_length" ? 8 : name == "block_count" ? 2 : 32;
    gguf += text("qwen2moe." + name) + le(4, 4) + le(value, 4);
  }
  std::string data;
  for (const Entry& entry : entries) {
    std::uint64_t elements = 1;
    for (const std::uint64_t extent : entry.ne) elements *= extent;
    gguf += text(entry.name) + le(entry.ne.size(), 4);
    for (const std::uint64_t extent : entry.ne) gguf += le(extent, 8);
    gguf += le(entry.type, 4) + le(data.size(), 8);
    if (entry.type == 8) {
      for (std::uint64_t block = 0; block < elements / 32; ++block) {
        data += le(0x2000, 2);  // scale 2^-7
        for (int j = 0; j < 32; ++j) data.push_back(static_cast<char>((block * 7 + static_cast<std::uint64_t>(j) * 13) % 255 - 127));
      }
    } else {
      const std::size_t bytes = entry.type == 0 ? 4 : 2;
      for (std::uint64_t i = 0; i < elements; ++i) data += le(entry.type == 0 ? 0x3C000000u + (i % 97) * 4099 : 0x3000u + i % 61, static_cast<int>(bytes));
    }
    data.append((32 - data.size() % 32) % 32, '\0');
  }
  gguf.append((32 - gguf.size() % 32) % 32, '\0');
  save("gguf_qwen2moe", static_cast<char>(2 | (1 << 2)), gguf + data);
  return 0;
}
#endif
