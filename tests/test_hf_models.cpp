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
using sparsemoe::HfFamily;
using sparsemoe::Index;
using sparsemoe::ModelFileError;
using sparsemoe::ModelFileErrorKind;
using sparsemoe::SafetensorsFile;
using sparsemoe::SafetensorsModel;

/// A family's MoE block as the test describes it, independently of the library.
struct Family {
  std::string model_type;
  Index d = 6, h = 4, experts = 8, k = 2;
  bool sigmoid = false;        // DeepSeek-V3
  bool normalize = false;      // renormalise the k weights
  double scale = 1.0;          // routed scaling factor (applied as the family does)
  Index groups = 1, top_groups = 1;
  bool top2_group_score = false;  // V3: group score = sum of the two largest biased scores
  Index shared_width = 0;
  bool shared_gate = false;
  std::string prefix;           // of layer L
  std::string gate, up, down;   // expert tensor names
  std::string shared_module;    // "shared_expert" / "shared_experts"
  nlohmann::json config;        // the config.json written for it
};

Family make_family(const std::string& model_type, Index layer) {
  Family f;
  f.model_type = model_type;
  f.prefix = "model.layers." + std::to_string(layer) + ".mlp.";
  f.gate = "gate_proj";
  f.up = "up_proj";
  f.down = "down_proj";
  nlohmann::json& c = f.config;
  c["model_type"] = model_type;
  c["hidden_size"] = f.d;
  c["num_hidden_layers"] = 4;
  if (model_type == "mixtral") {
    f.prefix = "model.layers." + std::to_string(layer) + ".block_sparse_moe.";
    f.gate = "w1";
    f.up = "w3";
    f.down = "w2";
    f.normalize = true;
    c["intermediate_size"] = f.h;
    c["num_local_experts"] = f.experts;
    c["num_experts_per_tok"] = f.k;
  } else if (model_type == "qwen2_moe") {
    f.shared_width = 5;
    f.shared_gate = true;
    f.shared_module = "shared_expert";
    c["moe_intermediate_size"] = f.h;
    c["shared_expert_intermediate_size"] = f.shared_width;
    c["num_experts"] = f.experts;
    c["num_experts_per_tok"] = f.k;
    c["norm_topk_prob"] = false;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = nlohmann::json::array();
  } else if (model_type == "qwen3_moe") {
    f.normalize = true;
    c["moe_intermediate_size"] = f.h;
    c["num_experts"] = f.experts;
    c["num_experts_per_tok"] = f.k;
    c["norm_topk_prob"] = true;
  } else if (model_type == "olmoe") {
    f.k = 3;
    c["intermediate_size"] = f.h;
    c["num_experts"] = f.experts;
    c["num_experts_per_tok"] = f.k;
    c["norm_topk_prob"] = false;
  } else if (model_type == "deepseek_v2" || model_type == "deepseek_v3") {
    const bool v3 = model_type == "deepseek_v3";
    f.k = 3;
    f.sigmoid = v3;
    f.normalize = v3;
    f.scale = v3 ? 2.5 : 1.5;
    f.groups = 4;
    f.top_groups = 2;
    f.top2_group_score = v3;
    f.shared_width = (v3 ? 1 : 2) * f.h;
    f.shared_module = "shared_experts";
    c["moe_intermediate_size"] = f.h;
    c["n_routed_experts"] = f.experts;
    c["num_experts_per_tok"] = f.k;
    c["n_group"] = f.groups;
    c["topk_group"] = f.top_groups;
    c["routed_scaling_factor"] = f.scale;
    c["norm_topk_prob"] = f.normalize;
    c["n_shared_experts"] = v3 ? 1 : 2;
    c["first_k_dense_replace"] = 1;
    c["moe_layer_freq"] = 1;
    c["scoring_func"] = v3 ? "sigmoid" : "softmax";
    c["topk_method"] = v3 ? "noaux_tc" : "group_limited_greedy";
  }
  return f;
}

/// Raw weights by tensor name: HF shape and row-major float values.
struct RawWeights {
  std::map<std::string, std::vector<std::uint64_t>> shapes;
  std::map<std::string, std::vector<float>> values;

  void add(const std::string& name, std::vector<std::uint64_t> shape, std::mt19937& random, float spread, bool bf16) {
    std::size_t count = 1;
    for (auto extent : shape) count *= extent;
    std::vector<float> v(count);
    for (float& value : v) {
      value = std::normal_distribution<float>(0.0f, spread)(random);
      if (bf16) {  // keep only what BF16 holds (truncation: the stored bits are the top half)
        std::uint32_t bits;
        std::memcpy(&bits, &value, 4);
        bits &= 0xFFFF0000u;
        std::memcpy(&value, &bits, 4);
      }
    }
    shapes[name] = std::move(shape);
    values[name] = std::move(v);
  }
  double at(const std::string& name, Index row, Index col) const {
    return values.at(name)[static_cast<std::size_t>(row * static_cast<Index>(shapes.at(name).back()) + col)];
  }
  /// The tensors as the test's writer lays them out (in the order of `names`), F32 or BF16.
  std::vector<RawTensor> tensors(const std::vector<std::string>& names, bool bf16) const {
    std::vector<RawTensor> list;
    for (const std::string& name : names) {
      const std::vector<float>& v = values.at(name);
      std::string bytes;
      if (bf16) {
        std::vector<std::uint16_t> top(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) {
          std::uint32_t bits;
          std::memcpy(&bits, &v[i], 4);
          top[i] = static_cast<std::uint16_t>(bits >> 16);
        }
        bytes = raw_bytes(top);
      } else {
        bytes = raw_bytes(v);
      }
      list.push_back({name, bf16 ? "BF16" : "F32", shapes.at(name), bytes});
    }
    return list;
  }
};

/// HF's tensor names of the family's block, in a fixed order.
std::vector<std::string> tensor_names(const Family& f) {
  std::vector<std::string> names = {f.prefix + "gate.weight"};
  if (f.sigmoid) names.push_back(f.prefix + "gate.e_score_correction_bias");
  for (Index e = 0; e < f.experts; ++e) {
    for (const std::string& p : {f.gate, f.up, f.down}) {
      names.push_back(f.prefix + "experts." + std::to_string(e) + "." + p + ".weight");
    }
  }
  if (f.shared_width > 0) {
    for (const char* p : {"gate_proj", "up_proj", "down_proj"}) {
      names.push_back(f.prefix + f.shared_module + "." + p + ".weight");
    }
  }
  if (f.shared_gate) names.push_back(f.prefix + "shared_expert_gate.weight");
  return names;
}

RawWeights random_weights(const Family& f, unsigned seed, bool bf16 = false) {
  std::mt19937 random(seed);
  RawWeights w;
  const auto u = [](Index v) { return static_cast<std::uint64_t>(v); };
  w.add(f.prefix + "gate.weight", {u(f.experts), u(f.d)}, random, 1.0f, bf16);
  if (f.sigmoid) w.add(f.prefix + "gate.e_score_correction_bias", {u(f.experts)}, random, 0.3f, bf16);
  for (Index e = 0; e < f.experts; ++e) {
    const std::string m = f.prefix + "experts." + std::to_string(e) + ".";
    w.add(m + f.gate + ".weight", {u(f.h), u(f.d)}, random, 0.5f, bf16);
    w.add(m + f.up + ".weight", {u(f.h), u(f.d)}, random, 0.5f, bf16);
    w.add(m + f.down + ".weight", {u(f.d), u(f.h)}, random, 0.5f, bf16);
  }
  if (f.shared_width > 0) {
    const std::string m = f.prefix + f.shared_module + ".";
    w.add(m + "gate_proj.weight", {u(f.shared_width), u(f.d)}, random, 0.5f, bf16);
    w.add(m + "up_proj.weight", {u(f.shared_width), u(f.d)}, random, 0.5f, bf16);
    w.add(m + "down_proj.weight", {u(f.d), u(f.shared_width)}, random, 0.5f, bf16);
  }
  if (f.shared_gate) w.add(f.prefix + "shared_expert_gate.weight", {1, u(f.d)}, random, 0.5f, bf16);
  return w;
}

double silu(double a) { return a / (1.0 + std::exp(-a)); }
double logistic(double a) { return 1.0 / (1.0 + std::exp(-a)); }

/// SwiGLU of one token through HF-layout weights: down · (silu(gate·x) ⊙ (up·x)).
std::vector<double> swiglu(const RawWeights& w, const std::string& module, const std::string& gate,
                           const std::string& up, const std::string& down, Index width, const std::vector<double>& x) {
  const Index d = static_cast<Index>(x.size());
  std::vector<double> hidden(static_cast<std::size_t>(width)), y(x.size(), 0.0);
  for (Index i = 0; i < width; ++i) {
    double a = 0, b = 0;
    for (Index j = 0; j < d; ++j) {
      a += w.at(module + gate + ".weight", i, j) * x[static_cast<std::size_t>(j)];
      b += w.at(module + up + ".weight", i, j) * x[static_cast<std::size_t>(j)];
    }
    hidden[static_cast<std::size_t>(i)] = silu(a) * b;
  }
  for (Index o = 0; o < d; ++o) {
    for (Index i = 0; i < width; ++i) {
      y[static_cast<std::size_t>(o)] += w.at(module + down + ".weight", o, i) * hidden[static_cast<std::size_t>(i)];
    }
  }
  return y;
}

/// Indices sorted by value, larger first, ties to the lower index.
std::vector<Index> ranked(const std::vector<double>& values, const std::vector<Index>& candidates) {
  std::vector<Index> order = candidates;
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    return values[static_cast<std::size_t>(a)] > values[static_cast<std::size_t>(b)];
  });
  return order;
}

/// The family's MoE block on one token, from the raw weights, in double.
std::vector<double> reference_block(const Family& f, const RawWeights& w, const std::vector<double>& x) {
  const std::size_t experts = static_cast<std::size_t>(f.experts);
  std::vector<double> z(experts, 0.0), score(experts), selection(experts);
  for (Index e = 0; e < f.experts; ++e) {
    for (Index j = 0; j < f.d; ++j) z[static_cast<std::size_t>(e)] += w.at(f.prefix + "gate.weight", e, j) * x[static_cast<std::size_t>(j)];
  }
  if (f.sigmoid) {
    for (std::size_t e = 0; e < experts; ++e) {
      score[e] = logistic(z[e]);
      selection[e] = score[e] + w.values.at(f.prefix + "gate.e_score_correction_bias")[e];
    }
  } else {
    const double top = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (std::size_t e = 0; e < experts; ++e) sum += std::exp(z[e] - top);
    for (std::size_t e = 0; e < experts; ++e) selection[e] = score[e] = std::exp(z[e] - top) / sum;
  }
  std::vector<Index> candidates(experts);
  std::iota(candidates.begin(), candidates.end(), Index{0});
  if (f.groups > 1) {
    const Index size = f.experts / f.groups;
    std::vector<double> group_score(static_cast<std::size_t>(f.groups));
    for (Index g = 0; g < f.groups; ++g) {
      std::vector<double> members(selection.begin() + g * size, selection.begin() + (g + 1) * size);
      std::sort(members.rbegin(), members.rend());
      group_score[static_cast<std::size_t>(g)] = f.top2_group_score ? members[0] + members[1] : members[0];
    }
    std::vector<Index> all_groups(static_cast<std::size_t>(f.groups));
    std::iota(all_groups.begin(), all_groups.end(), Index{0});
    const std::vector<Index> kept = ranked(group_score, all_groups);
    candidates.clear();
    for (Index e = 0; e < f.experts; ++e) {
      if (std::find(kept.begin(), kept.begin() + f.top_groups, e / size) != kept.begin() + f.top_groups) {
        candidates.push_back(e);
      }
    }
  }
  const std::vector<Index> chosen = ranked(selection, candidates);
  std::vector<double> weights;
  double total = 0;
  for (Index j = 0; j < f.k; ++j) {
    weights.push_back(score[static_cast<std::size_t>(chosen[static_cast<std::size_t>(j)])]);
    total += weights.back();
  }
  for (double& weight : weights) {
    if (f.normalize) weight /= total;
    const bool v2_normalized = f.model_type == "deepseek_v2" && f.normalize;  // V2 scales only unnormalised weights
    if (!v2_normalized) weight *= f.scale;
  }
  std::vector<double> y(x.size(), 0.0);
  for (Index j = 0; j < f.k; ++j) {
    const Index e = chosen[static_cast<std::size_t>(j)];
    const std::vector<double> out =
        swiglu(w, f.prefix + "experts." + std::to_string(e) + ".", f.gate, f.up, f.down, f.h, x);
    for (std::size_t o = 0; o < y.size(); ++o) y[o] += weights[static_cast<std::size_t>(j)] * out[o];
  }
  if (f.shared_width > 0) {
    const std::vector<double> out =
        swiglu(w, f.prefix + f.shared_module + ".", "gate_proj", "up_proj", "down_proj", f.shared_width, x);
    double gate = 1.0;
    if (f.shared_gate) {
      double a = 0;
      for (Index j = 0; j < f.d; ++j) a += w.at(f.prefix + "shared_expert_gate.weight", 0, j) * x[static_cast<std::size_t>(j)];
      gate = logistic(a);
    }
    for (std::size_t o = 0; o < y.size(); ++o) y[o] += gate * out[o];
  }
  return y;
}

template <typename Layer>
void expect_matches_reference(const Family& f, const RawWeights& w, const Layer& layer, double tolerance) {
  using Scalar = typename Layer::Scalar;
  std::mt19937 random(99);
  const Index tokens = 9;
  sparsemoe::Matrix<Scalar> x(tokens, f.d);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<Scalar>(std::normal_distribution<double>(0, 1)(random));
  const auto result = layer.forward(x);
  for (Index t = 0; t < tokens; ++t) {
    std::vector<double> token(static_cast<std::size_t>(f.d));
    for (Index j = 0; j < f.d; ++j) token[static_cast<std::size_t>(j)] = static_cast<double>(x(t, j));
    const std::vector<double> want = reference_block(f, w, token);
    for (Index o = 0; o < f.d; ++o) {
      EXPECT_NEAR(static_cast<double>(result.output(t, o)), want[static_cast<std::size_t>(o)],
                  tolerance * (1.0 + std::fabs(want[static_cast<std::size_t>(o)])))
          << f.model_type << " token " << t << " output " << o;
    }
  }
}

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

const std::vector<std::string> all_families = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                               "deepseek_v3"};

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

// --- Round trip ----------------------------------------------------------------------------------

template <typename Layer>
std::vector<std::vector<typename Layer::Scalar>> all_state(Layer& layer) {
  std::vector<std::vector<typename Layer::Scalar>> state;
  for (const auto& view : layer.tensors()) state.emplace_back(view.data, view.data + view.size());
  for (const auto& view : layer.router().state()) state.emplace_back(view.data, view.data + view.size());
  return state;
}

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
  sparsemoe::MoEConfig config;
  config.input_dim = 4;
  config.hidden_dim = 3;
  config.num_experts = 4;
  config.k = 2;
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
