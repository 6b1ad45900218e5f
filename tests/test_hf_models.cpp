// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Hugging Face MoE blocks (issue 12, item 2): sparsemoe/io/hf_models.hpp.
//   * For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 with group-limited
//     greedy routing, DeepSeek-V3), a tiny model is written here by the test's own safetensors
//     writer with HF's [out, in] tensor names and a config.json written by hand; the loaded
//     layer's output equals a naive reference computed here in double from the raw weights with
//     the family's formula (softmax or sigmoid, selection bias, groups, top-k with ties to the
//     lower id, renormalisation, routed scale, shared expert and its σ gate).
//   * BF16 weights, float layers, sharded models through the index and config.json files.
//   * Round trip: import → export → import gives bitwise the same tensors and router state, the
//     exported names and shapes are HF's (listed here independently), and the exported config
//     keys give back the same block.
//   * Errors: unknown model_type, missing keys (all named), wrong key types, dense layers,
//     router mismatch, missing tensors, wrong shapes; export of layers a family cannot express.
#include <sparsemoe/io/hf_models.hpp>

#include "moe_block_reference.hpp"
#include "safetensors_test_writer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace safetensors_test;
using namespace moe_block_reference;
using sparsemoe::HfFamily;
using sparsemoe::Index;
using sparsemoe::ModelFileError;
using sparsemoe::ModelFileErrorKind;
using sparsemoe::SafetensorsFile;
using sparsemoe::SafetensorsModel;

SafetensorsModel model_of(const Family& f, const RawWeights& w, bool bf16 = false) {
  return SafetensorsModel({SafetensorsFile::from_bytes(make_file(w.tensors(tensor_names(f), bf16)))});
}

template <typename Scalar, typename Function>
void with_layer_type(const Family& f, Function&& function) {
  if (f.sigmoid) {
    function(static_cast<sparsemoe::HfSigmoidMoELayer<Scalar>*>(nullptr));
  } else {
    function(static_cast<sparsemoe::HfSoftmaxMoELayer<Scalar>*>(nullptr));
  }
}

// --- Loading -------------------------------------------------------------------------------------

TEST(HfModels, EachFamilyMatchesItsReference) {
  for (const std::string& type : all_families) {
    SCOPED_TRACE(type);
    const Family f = make_family(type, 2);
    const RawWeights w = random_weights(f, 17);
    const SafetensorsModel model = model_of(f, w);
    with_layer_type<double>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      const Layer layer = sparsemoe::load_hf_moe_block<Layer>(model, f.config, 2);
      EXPECT_EQ(layer.input_dim(), f.d);
      EXPECT_EQ(layer.hidden_dim(), f.h);
      EXPECT_EQ(layer.num_experts(), f.experts);
      EXPECT_EQ(layer.k(), f.k);
      EXPECT_EQ(layer.shared_hidden_dim(), f.shared_width);
      expect_matches_reference(f, w, layer, 1e-12);
    });
  }
}

TEST(HfModels, FloatLayersAndBf16Weights) {
  for (const std::string type : {"qwen3_moe", "deepseek_v3"}) {
    SCOPED_TRACE(type);
    const Family f = make_family(type, 1);
    const RawWeights w = random_weights(f, 5, /*bf16=*/true);
    const SafetensorsModel model = model_of(f, w, /*bf16=*/true);
    EXPECT_EQ(model.info(f.prefix + "gate.weight").dtype, sparsemoe::SafetensorsDtype::bf16);
    with_layer_type<float>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      expect_matches_reference(f, w, sparsemoe::load_hf_moe_block<Layer>(model, f.config, 1), 2e-5);
    });
  }
}

TEST(HfModels, ShardedModelAndConfigFileFromADirectory) {
  const Family f = make_family("qwen2_moe", 3);
  const RawWeights w = random_weights(f, 23);
  std::vector<std::string> names = tensor_names(f);
  const std::size_t half = names.size() / 2;
  TempDir dir;
  const std::vector<std::string> first(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(half));
  const std::vector<std::string> second(names.begin() + static_cast<std::ptrdiff_t>(half), names.end());
  write_bytes(dir.file("model-00001-of-00002.safetensors"), make_file(w.tensors(first, false)));
  write_bytes(dir.file("model-00002-of-00002.safetensors"), make_file(w.tensors(second, false)));
  nlohmann::json index;
  for (const auto& name : first) index["weight_map"][name] = "model-00001-of-00002.safetensors";
  for (const auto& name : second) index["weight_map"][name] = "model-00002-of-00002.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  write_bytes(dir.file("config.json"), f.config.dump(2));
  const SafetensorsModel model = SafetensorsModel::open(dir.file(""));
  EXPECT_EQ(model.shards().size(), 2u);
  const auto layer = sparsemoe::load_hf_moe_block<sparsemoe::HfSoftmaxMoELayer<double>>(
      model, sparsemoe::read_hf_config(dir.file("")), 3);
  expect_matches_reference(f, w, layer, 1e-12);
  expect_matches_reference(f, w, sparsemoe::load_hf_moe_block<sparsemoe::HfSoftmaxMoELayer<double>>(dir.file(""), 3),
                           1e-12);

  write_bytes(dir.file("bad.json"), "{\"model_type\": ");
  EXPECT_THROW(
      try { sparsemoe::read_hf_config(dir.file("bad.json")); } catch (const ModelFileError& error) {
        EXPECT_EQ(error.kind(), ModelFileErrorKind::malformed_config);
        throw;
      },
      ModelFileError);
}

TEST(HfModels, SpecCarriesTheRouterOptions) {
  const sparsemoe::HfMoEBlockSpec v3 = sparsemoe::hf_moe_block_spec(make_family("deepseek_v3", 1).config, 1);
  EXPECT_TRUE(v3.sigmoid_router);
  EXPECT_EQ(v3.prefix, "model.layers.1.mlp.");
  EXPECT_EQ(v3.sigmoid.scale, 2.5);
  EXPECT_EQ(v3.sigmoid.num_groups, 4);
  EXPECT_EQ(v3.sigmoid.top_groups, 2);
  EXPECT_TRUE(v3.sigmoid.normalize_top_k);
  EXPECT_EQ(v3.config.shared_hidden_dim, 4);
  const sparsemoe::HfMoEBlockSpec mixtral = sparsemoe::hf_moe_block_spec(make_family("mixtral", 0).config, 0);
  EXPECT_EQ(mixtral.prefix, "model.layers.0.block_sparse_moe.");
  EXPECT_TRUE(mixtral.softmax.normalize_top_k);
  // k = 1 in DeepSeek: no renormalisation (the modeling code's `top_k > 1 and norm_topk_prob`).
  Family one = make_family("deepseek_v3", 1);
  one.config["num_experts_per_tok"] = 1;
  EXPECT_FALSE(sparsemoe::hf_moe_block_spec(one.config, 1).sigmoid.normalize_top_k);
  // DeepSeek-V2 greedy: no groups.
  Family greedy = make_family("deepseek_v2", 1);
  greedy.config["topk_method"] = "greedy";
  EXPECT_EQ(sparsemoe::hf_moe_block_spec(greedy.config, 1).softmax.num_groups, 1);
}

TEST(HfModels, DeepSeekV3Fp8WeightsWithBlockScales) {
  // d = 130: the [h, d] projections have two 128-column scale blocks, the [d, h] down projections
  // two 128-row ones. Stored bytes avoid the NaN patterns; scales are powers of two, so the
  // products are exact in float and the reference sees exactly the dequantised weights.
  const Family f = make_family("deepseek_v3", 1, 130, 4);
  RawWeights w = random_weights(f, 13);
  std::mt19937 random(8);
  std::vector<RawTensor> tensors;
  std::vector<std::string> plain = tensor_names(f);
  for (Index e = 0; e < f.experts; ++e) {
    for (const std::string& projection : {f.gate, f.up, f.down}) {
      const std::string name = f.prefix + "experts." + std::to_string(e) + "." + projection + ".weight";
      plain.erase(std::find(plain.begin(), plain.end(), name));
      const std::vector<std::uint64_t> shape = w.shapes.at(name);
      const std::uint64_t scale_rows = (shape[0] + 127) / 128, scale_cols = (shape[1] + 127) / 128;
      std::vector<float> scales(scale_rows * scale_cols);
      for (float& scale : scales) scale = std::ldexp(1.0f, std::uniform_int_distribution<int>(-6, -2)(random));
      std::vector<std::uint8_t> bytes(w.values.at(name).size());
      for (std::size_t i = 0; i < bytes.size(); ++i) {
        std::uint8_t byte;
        do {
          byte = static_cast<std::uint8_t>(std::uniform_int_distribution<int>(0, 255)(random));
        } while ((byte & 0x7F) == 0x7F);
        bytes[i] = byte;
        const std::size_t row = i / shape[1], col = i % shape[1];
        const int exponent = (byte >> 3) & 15, mantissa = byte & 7;
        const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                              : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
        w.values.at(name)[i] = ((byte & 0x80) ? -magnitude : magnitude) * scales[row / 128 * scale_cols + col / 128];
      }
      tensors.push_back({name, "F8_E4M3", shape, raw_bytes(bytes)});
      tensors.push_back({name + "_scale_inv", "F32", {scale_rows, scale_cols}, raw_bytes(scales)});
    }
  }
  for (RawTensor& tensor : w.tensors(plain, false)) tensors.push_back(tensor);
  const SafetensorsModel model({SafetensorsFile::from_bytes(make_file(tensors))});
  expect_matches_reference(f, w, sparsemoe::load_hf_moe_block<sparsemoe::HfSigmoidMoELayer<double>>(model, f.config, 1),
                           1e-12);
}

// --- Round trip ----------------------------------------------------------------------------------

TEST(HfModels, ImportExportImportIsBitwise) {
  for (const std::string& type : all_families) {
    SCOPED_TRACE(type);
    const Family f = make_family(type, 2);
    const RawWeights w = random_weights(f, 31);
    const SafetensorsModel model = model_of(f, w);
    with_layer_type<float>(f, [&](auto* tag) {
      using Layer = std::remove_pointer_t<decltype(tag)>;
      Layer first = sparsemoe::load_hf_moe_block<Layer>(model, f.config, 2);
      const HfFamily family = *sparsemoe::parse_hf_family(type);
      sparsemoe::SafetensorsWriter writer;
      sparsemoe::export_hf_moe_block(first, family, 2, writer);
      const SafetensorsFile file = SafetensorsFile::from_bytes(writer.bytes());
      // HF's names and [out, in] shapes, and the raw values unchanged.
      std::set<std::string> written;
      for (const auto& tensor : file.tensors()) written.insert(tensor.name);
      const std::vector<std::string> names = tensor_names(f);
      EXPECT_EQ(written, std::set<std::string>(names.begin(), names.end()));
      for (const std::string& name : names) {
        EXPECT_EQ(file.info(name).shape, w.shapes.at(name)) << name;
        EXPECT_EQ(file.values<float>(name), w.values.at(name)) << name;
      }
      nlohmann::json config = sparsemoe::hf_moe_config(first, family);
      EXPECT_EQ(config["model_type"], type);
      Layer second = sparsemoe::load_hf_moe_block<Layer>(SafetensorsModel({file}), config, 2);
      const auto a = all_state(first), b = all_state(second);
      ASSERT_EQ(a.size(), b.size());
      for (std::size_t i = 0; i < a.size(); ++i) {
        ASSERT_EQ(a[i].size(), b[i].size());
        EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)), 0) << "tensor " << i;
      }
      const sparsemoe::HfMoEBlockSpec before = sparsemoe::hf_moe_block_spec(f.config, 2);
      const sparsemoe::HfMoEBlockSpec after = sparsemoe::hf_moe_block_spec(config, 2);
      EXPECT_EQ(before.sigmoid.scale, after.sigmoid.scale);
      EXPECT_EQ(before.softmax.scale, after.softmax.scale);
      EXPECT_EQ(before.softmax.normalize_top_k, after.softmax.normalize_top_k);
      EXPECT_EQ(before.sigmoid.num_groups, after.sigmoid.num_groups);
      EXPECT_EQ(before.softmax.num_groups, after.softmax.num_groups);
      EXPECT_EQ(before.config.shared_hidden_dim, after.config.shared_hidden_dim);
    });
  }
}

TEST(HfModels, ExportRejectsWhatAFamilyCannotExpress) {
  sparsemoe::MoEConfig config = small_block_config();
  sparsemoe::SoftmaxTopKRouterOptions options;
  options.k = 2;
  using Softmax = sparsemoe::HfSoftmaxMoELayer<float>;
  const Softmax plain(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options));
  sparsemoe::SafetensorsWriter writer;
  EXPECT_THROW(sparsemoe::export_hf_moe_block(plain, HfFamily::mixtral, 0, writer), std::invalid_argument);
  EXPECT_THROW(sparsemoe::hf_moe_config(plain, HfFamily::qwen2_moe), std::invalid_argument);  // no shared expert
  EXPECT_THROW(sparsemoe::hf_moe_config(plain, HfFamily::deepseek_v3), std::invalid_argument);  // softmax router
  EXPECT_NO_THROW(sparsemoe::hf_moe_config(plain, HfFamily::olmoe));
  options.use_bias = true;
  const Softmax biased(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options));
  EXPECT_THROW(sparsemoe::hf_moe_config(biased, HfFamily::olmoe), std::invalid_argument);
  config.shared_hidden_dim = 5;  // not a multiple of h = 3
  options.use_bias = false;
  const Softmax shared(config, sparsemoe::SoftmaxTopKRouter<float>(4, 4, options));
  EXPECT_THROW(sparsemoe::hf_moe_config(shared, HfFamily::deepseek_v2), std::invalid_argument);
  EXPECT_EQ(writer.size(), 0u);
}

// --- Errors --------------------------------------------------------------------------------------

template <typename Function>
std::string expect_error(ModelFileErrorKind kind, Function&& function) {
  try {
    function();
  } catch (const ModelFileError& error) {
    EXPECT_EQ(error.kind(), kind) << error.what();
    return error.what();
  }
  ADD_FAILURE() << "no ModelFileError of kind " << kind;
  return "";
}

TEST(HfModelsErrors, ConfigErrorsNameTheKeys) {
  using sparsemoe::hf_moe_block_spec;
  Family f = make_family("mixtral", 0);
  nlohmann::json config = f.config;
  config["model_type"] = "llama";
  EXPECT_NE(expect_error(ModelFileErrorKind::unknown_architecture, [&] { hf_moe_block_spec(config, 0); }).find("llama"),
            std::string::npos);
  config.erase("model_type");
  expect_error(ModelFileErrorKind::unknown_architecture, [&] { hf_moe_block_spec(config, 0); });

  config = f.config;
  config.erase("intermediate_size");
  config.erase("num_local_experts");
  const std::string text = expect_error(ModelFileErrorKind::missing_config_key, [&] { hf_moe_block_spec(config, 0); });
  EXPECT_NE(text.find("intermediate_size"), std::string::npos) << text;
  EXPECT_NE(text.find("num_local_experts"), std::string::npos) << text;

  config = make_family("qwen3_moe", 0).config;
  config["norm_topk_prob"] = "yes";
  expect_error(ModelFileErrorKind::malformed_config, [&] { hf_moe_block_spec(config, 0); });
  config = make_family("qwen3_moe", 0).config;
  config["num_experts_per_tok"] = 9;
  expect_error(ModelFileErrorKind::malformed_config, [&] { hf_moe_block_spec(config, 0); });
  config["num_experts_per_tok"] = -1;
  expect_error(ModelFileErrorKind::malformed_config, [&] { hf_moe_block_spec(config, 0); });
  config = make_family("deepseek_v3", 1).config;
  config["n_group"] = 3;  // does not divide 8 experts
  expect_error(ModelFileErrorKind::malformed_config, [&] { hf_moe_block_spec(config, 1); });
  config = make_family("deepseek_v3", 1).config;
  config["scoring_func"] = "softmax";
  expect_error(ModelFileErrorKind::malformed_config, [&] { hf_moe_block_spec(config, 1); });

  // Dense layers and layers past the end.
  expect_error(ModelFileErrorKind::not_moe_layer, [&] { hf_moe_block_spec(make_family("deepseek_v3", 0).config, 0); });
  config = make_family("qwen2_moe", 1).config;
  config["mlp_only_layers"] = {1};
  expect_error(ModelFileErrorKind::not_moe_layer, [&] { hf_moe_block_spec(config, 1); });
  config["mlp_only_layers"] = nlohmann::json::array();
  config["decoder_sparse_step"] = 2;
  expect_error(ModelFileErrorKind::not_moe_layer, [&] { hf_moe_block_spec(config, 2); });
  EXPECT_NO_THROW(hf_moe_block_spec(config, 1));
  expect_error(ModelFileErrorKind::not_moe_layer, [&] { hf_moe_block_spec(f.config, 4); });
  expect_error(ModelFileErrorKind::not_moe_layer, [&] { hf_moe_block_spec(f.config, -1); });
}

TEST(HfModelsErrors, TensorErrorsAndRouterMismatch) {
  const Family v3 = make_family("deepseek_v3", 1);
  const RawWeights w3 = random_weights(v3, 3);
  expect_error(ModelFileErrorKind::router_mismatch, [&] {
    sparsemoe::load_hf_moe_block<sparsemoe::HfSoftmaxMoELayer<float>>(model_of(v3, w3), v3.config, 1);
  });

  const Family f = make_family("olmoe", 0);
  const RawWeights w = random_weights(f, 3);
  std::vector<std::string> names = tensor_names(f);
  const std::string dropped = f.prefix + "experts.5.up_proj.weight";
  names.erase(std::find(names.begin(), names.end(), dropped));
  const SafetensorsModel incomplete({SafetensorsFile::from_bytes(make_file(w.tensors(names, false)))});
  const std::string text = expect_error(ModelFileErrorKind::missing_tensor, [&] {
    sparsemoe::load_hf_moe_block<sparsemoe::HfSoftmaxMoELayer<float>>(incomplete, f.config, 0);
  });
  EXPECT_NE(text.find(dropped), std::string::npos) << text;

  // gate.weight stored [in, out] by mistake (d = 6 ≠ E = 8).
  RawWeights transposed = w;
  transposed.shapes[f.prefix + "gate.weight"] = {static_cast<std::uint64_t>(f.d), static_cast<std::uint64_t>(f.experts)};
  expect_error(ModelFileErrorKind::shape_mismatch, [&] {
    sparsemoe::load_hf_moe_block<sparsemoe::HfSoftmaxMoELayer<float>>(model_of(f, transposed), f.config, 0);
  });
}

}  // namespace
