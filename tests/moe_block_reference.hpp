// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The MoE blocks of the model families as the tests describe them (test_hf_models, test_gguf),
// independently of sparsemoe/io: each family's sizes and config keys, random raw weights in
// Hugging Face's [out, in] layout by tensor name, and a naive reference of the block's output on
// one token, in double, from those raw weights and the family's formula (softmax or sigmoid
// scores, selection bias, groups, top-k with ties to the lower id, renormalisation, routed
// scale, shared expert and its sigmoid gate).
#ifndef SPARSEMOE_TESTS_MOE_BLOCK_REFERENCE_HPP
#define SPARSEMOE_TESTS_MOE_BLOCK_REFERENCE_HPP

#include <sparsemoe/config.hpp>
#include <sparsemoe/layer_options.hpp>

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
#include <string>
#include <vector>

namespace moe_block_reference {

using safetensors_test::RawTensor;
using safetensors_test::raw_bytes;
using sparsemoe::Index;

/// Every family's model_type.
inline const std::vector<std::string> all_families = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                                      "deepseek_v3"};

/// A copy of every parameter and state tensor of `layer`: its tensors(), then its router's state().
template <typename Layer>
std::vector<std::vector<typename Layer::Scalar>> all_state(Layer& layer) {
  std::vector<std::vector<typename Layer::Scalar>> state;
  for (const auto& view : layer.tensors()) state.emplace_back(view.data, view.data + view.size());
  for (const auto& view : layer.router().state()) state.emplace_back(view.data, view.data + view.size());
  return state;
}

/// The sizes of the small layers the export tests build by hand: d = 4, h = 3, E = 4, k = 2.
inline sparsemoe::MoEConfig small_block_config() {
  sparsemoe::MoEConfig config;
  config.input_dim = 4;
  config.hidden_dim = 3;
  config.num_experts = 4;
  config.k = 2;
  return config;
}

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

inline Family make_family(const std::string& model_type, Index layer, Index d = 6, Index h = 4) {
  Family f;
  f.model_type = model_type;
  f.d = d;
  f.h = h;
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
inline std::vector<std::string> tensor_names(const Family& f) {
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

inline RawWeights random_weights(const Family& f, unsigned seed, bool bf16 = false) {
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

inline double silu(double a) { return a / (1.0 + std::exp(-a)); }
inline double logistic(double a) { return 1.0 / (1.0 + std::exp(-a)); }

/// SwiGLU of one token through HF-layout weights: down · (silu(gate·x) ⊙ (up·x)).
inline std::vector<double> swiglu(const RawWeights& w, const std::string& module, const std::string& gate,
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
inline std::vector<Index> ranked(const std::vector<double>& values, const std::vector<Index>& candidates) {
  std::vector<Index> order = candidates;
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    return values[static_cast<std::size_t>(a)] > values[static_cast<std::size_t>(b)];
  });
  return order;
}

/// The family's MoE block on one token, from the raw weights, in double.
inline std::vector<double> reference_block(const Family& f, const RawWeights& w, const std::vector<double>& x) {
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

}  // namespace moe_block_reference

#endif  // SPARSEMOE_TESTS_MOE_BLOCK_REFERENCE_HPP
