// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_HF_MODELS_HPP
#define SPARSEMOE_IO_HF_MODELS_HPP

/// \file hf_models.hpp
/// The MoE blocks of Hugging Face models in and out: from a model's config.json and its
/// safetensors weights, build one layer's MoE block as an MoELayer with SwiGLU experts and the
/// family's exact router (load_hf_moe_block), and write a layer back under the same tensor names
/// and config keys (export_hf_moe_block, hf_moe_config). Families: Mixtral, Qwen2-MoE,
/// Qwen3-MoE, OLMoE, DeepSeek-V2 and DeepSeek-V3. Needs nlohmann/json; not in the umbrella header.
///
/// Hugging Face stores each nn.Linear weight as [out, in] (y = x·Wᵀ); sparsemoe stores y = x·W.
/// Loading transposes: router W_r (d×E) = gate.weightᵀ; expert W1 (d×2h) = [W_gateᵀ | W_upᵀ];
/// W2 (h×d) = W_downᵀ. Exporting transposes back.

#include "../expert.hpp"
#include "../layer_options.hpp"
#include "../moe_layer.hpp"
#include "../router/sigmoid_top_k.hpp"
#include "../router/softmax_top_k.hpp"
#include "model_file_error.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace sparsemoe {

/// \addtogroup model_files
/// @{

/// The model families whose MoE blocks load_hf_moe_block reads (config.json's model_type).
enum class HfFamily {
  mixtral,      ///< "mixtral": softmax top-k, always renormalised; no shared expert
  qwen2_moe,    ///< "qwen2_moe": softmax top-k, norm_topk_prob; one shared expert gated by σ(x·w)
  qwen3_moe,    ///< "qwen3_moe": softmax top-k, norm_topk_prob; no shared expert
  olmoe,        ///< "olmoe": softmax top-k, norm_topk_prob; no shared expert
  deepseek_v2,  ///< "deepseek_v2": softmax, greedy or group-limited (max) top-k, routed scale; shared experts
  deepseek_v3,  ///< "deepseek_v3": sigmoid + selection bias, group-limited (top-2 sum) top-k; shared experts
};

/// config.json's model_type of `family` ("mixtral", "qwen2_moe", …).
inline const char* to_string(HfFamily family) {
  switch (family) {
    case HfFamily::mixtral: return "mixtral";
    case HfFamily::qwen2_moe: return "qwen2_moe";
    case HfFamily::qwen3_moe: return "qwen3_moe";
    case HfFamily::olmoe: return "olmoe";
    case HfFamily::deepseek_v2: return "deepseek_v2";
    case HfFamily::deepseek_v3: return "deepseek_v3";
  }
  return "?";
}

/// The family whose model_type is `model_type`, or nothing.
inline std::optional<HfFamily> parse_hf_family(const std::string& model_type) {
  for (int value = 0; value <= static_cast<int>(HfFamily::deepseek_v3); ++value) {
    const HfFamily family = static_cast<HfFamily>(value);
    if (model_type == to_string(family)) return family;
  }
  return std::nullopt;
}

/// Everything load_hf_moe_block needs to know about one layer's MoE block, read from config.json.
struct HfMoEBlockSpec {
  HfFamily family = HfFamily::mixtral;  ///< the model family
  Index layer = 0;                      ///< the decoder layer index L
  /// The block's tensor-name prefix: "model.layers.L.block_sparse_moe." (Mixtral) or
  /// "model.layers.L.mlp." (the others).
  std::string prefix;
  /// d = hidden_size, h = the expert width, E, k, and the shared expert: h_s (Qwen2-MoE's
  /// shared_expert_intermediate_size; DeepSeek's n_shared_experts·moe_intermediate_size, its
  /// shared experts as one of that width) and Qwen2-MoE's σ gate.
  MoEConfig config;
  /// Whether the family routes with SigmoidTopKRouter (DeepSeek-V3) rather than SoftmaxTopKRouter.
  bool sigmoid_router = false;
  SoftmaxTopKRouterOptions softmax;  ///< the softmax router's options (when !sigmoid_router)
  SigmoidTopKRouterOptions sigmoid;  ///< the sigmoid router's options (when sigmoid_router)
};

/// The layer type load_hf_moe_block builds for the softmax families (all but DeepSeek-V3).
template <typename Scalar>
using HfSoftmaxMoELayer = MoELayer<Scalar, SwiGluExpert<Scalar>, SoftmaxTopKRouter<Scalar>>;
/// The layer type load_hf_moe_block builds for DeepSeek-V3.
template <typename Scalar>
using HfSigmoidMoELayer = MoELayer<Scalar, SwiGluExpert<Scalar>, SigmoidTopKRouter<Scalar>>;

namespace detail {

inline const char* hf_context() { return "sparsemoe::hf_moe_block_spec"; }

/// Reads config.json's keys for one family, collecting the names of missing required keys.
class HfConfigReader {
 public:
  /// Reads keys of `config`; errors name `context` (the function) and `source` (where the keys
  /// come from, e.g. "config.json").
  explicit HfConfigReader(const nlohmann::json& config, const char* context = hf_context(),
                          const char* source = "config.json")
      : config_(config), context_(context), source_(source) {}

  Index integer(const char* key) {
    if (!config_.contains(key)) {
      missing(key);
      return 0;
    }
    const nlohmann::json& value = config_.at(key);
    // Sizes past 2^31 are no model's, and keep products like n_shared_experts·h from overflowing.
    if (!value.is_number_integer() || value.get<std::int64_t>() < 0 || value.get<std::int64_t>() > 0x7FFFFFFF) {
      bad(key, "an integer in [0, 2^31)");
    }
    return static_cast<Index>(value.get<std::int64_t>());
  }
  Index integer_or(const char* key, Index fallback) {
    return config_.contains(key) && !config_.at(key).is_null() ? integer(key) : fallback;
  }
  bool flag_or(const char* key, bool fallback) {
    if (!config_.contains(key) || config_.at(key).is_null()) return fallback;
    if (!config_.at(key).is_boolean()) bad(key, "true or false");
    return config_.at(key).get<bool>();
  }
  bool flag(const char* key) {
    if (!config_.contains(key)) missing(key);
    return flag_or(key, false);
  }
  double real(const char* key) {
    if (!config_.contains(key)) {
      missing(key);
      return 1.0;
    }
    const nlohmann::json& value = config_.at(key);
    if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() <= 0) {
      bad(key, "a finite number > 0");
    }
    return value.get<double>();
  }
  std::string text_or(const char* key, const std::string& fallback) {
    if (!config_.contains(key) || config_.at(key).is_null()) return fallback;
    if (!config_.at(key).is_string()) bad(key, "a string");
    return config_.at(key).get<std::string>();
  }
  std::vector<Index> integers_or_empty(const char* key) {
    std::vector<Index> values;
    if (!config_.contains(key) || config_.at(key).is_null()) return values;
    if (!config_.at(key).is_array()) bad(key, "an array of integers");
    for (const nlohmann::json& value : config_.at(key)) {
      if (!value.is_number_integer()) bad(key, "an array of integers");
      values.push_back(static_cast<Index>(value.get<std::int64_t>()));
    }
    return values;
  }

  /// Throws ModelFileError(missing_config_key) naming every missing key, if any.
  void require_complete(const std::string& family) const {
    if (missing_.empty()) return;
    std::string names;
    for (const std::string& key : missing_) names += (names.empty() ? "" : ", ") + key;
    model_file_fail(ModelFileErrorKind::missing_config_key, context_, source_, " of '", family, "' lacks ",
                    missing_.size(), " key(s) the MoE block needs: ", names);
  }

  [[noreturn]] void bad(const char* key, const char* expected) const {
    model_file_fail(ModelFileErrorKind::malformed_config, context_, source_, " key '", key, "' must be ", expected,
                    ", got ", config_.contains(key) ? config_.at(key).dump() : std::string("nothing"));
  }

 private:
  void missing(const char* key) { missing_.emplace_back(key); }

  const nlohmann::json& config_;
  const char* context_;
  const char* source_;
  std::vector<std::string> missing_;
};

/// Checks the sizes and groups of `spec` (ModelFileError(malformed_config) naming them) and sets
/// the softmax router's k and renormalisation (the sigmoid router's are set by the caller).
inline void finish_block_spec(HfMoEBlockSpec& spec, bool normalize, const char* context) {
  const MoEConfig& sizes = spec.config;
  if (sizes.input_dim < 1 || sizes.hidden_dim < 1 || sizes.num_experts < 1 || sizes.k < 1 ||
      sizes.k > sizes.num_experts || (sizes.shared_expert_gate && sizes.shared_hidden_dim < 1)) {
    model_file_fail(ModelFileErrorKind::malformed_config, context, "the sizes do not make an MoE block: d = ",
                    sizes.input_dim, ", expert width h = ", sizes.hidden_dim, ", E = ", sizes.num_experts, ", k = ",
                    sizes.k, ", shared width h_s = ", sizes.shared_hidden_dim, " (need d, h, E >= 1, 1 <= k <= E, and "
                    "h_s >= 1 for a gated shared expert)");
  }
  if (!spec.sigmoid_router) {
    spec.softmax.k = sizes.k;
    spec.softmax.normalize_top_k = normalize;
  }
  const Index groups = spec.sigmoid_router ? spec.sigmoid.num_groups : spec.softmax.num_groups;
  const Index top_groups = spec.sigmoid_router ? spec.sigmoid.top_groups : spec.softmax.top_groups;
  if (groups < 1 || sizes.num_experts % groups != 0 || top_groups < 1 || top_groups > groups ||
      sizes.k > top_groups * (sizes.num_experts / groups)) {
    model_file_fail(ModelFileErrorKind::malformed_config, context, groups, " expert groups with ", top_groups,
                    " kept do not fit ", sizes.num_experts, " experts and k = ", sizes.k);
  }
}

[[noreturn]] inline void not_moe_layer(Index layer, const std::string& why, const char* context = hf_context()) {
  model_file_fail(ModelFileErrorKind::not_moe_layer, context, "layer ", layer, " ", why);
}

/// Names of the expert tensors of one family (gate, up, down projections).
struct HfExpertNames {
  const char* gate;
  const char* up;
  const char* down;
};

inline HfExpertNames hf_expert_names(HfFamily family) {
  if (family == HfFamily::mixtral) return {"w1", "w3", "w2"};
  return {"gate_proj", "up_proj", "down_proj"};
}

/// The shared expert's module name ("" without one).
inline std::string hf_shared_module(HfFamily family) {
  if (family == HfFamily::qwen2_moe) return "shared_expert";
  if (family == HfFamily::deepseek_v2 || family == HfFamily::deepseek_v3) return "shared_experts";
  return "";
}

}  // namespace detail

/// Reads the MoE block of decoder layer `layer` from a model's parsed config.json: its family
/// (model_type), sizes, router and shared expert. The keys, per family (defaults in brackets are
/// Hugging Face's for keys that may be absent):
///  - mixtral: hidden_size, intermediate_size, num_local_experts, num_experts_per_tok; softmax,
///    always renormalised.
///  - qwen2_moe: hidden_size, moe_intermediate_size, shared_expert_intermediate_size,
///    num_experts, num_experts_per_tok, norm_topk_prob [false], decoder_sparse_step [1],
///    mlp_only_layers [[]]; the shared expert's output is scaled by σ(x·w).
///  - qwen3_moe: as qwen2_moe without the shared expert; olmoe: hidden_size, intermediate_size,
///    num_experts, num_experts_per_tok, norm_topk_prob [false].
///  - deepseek_v2, deepseek_v3: hidden_size, moe_intermediate_size, n_routed_experts,
///    num_experts_per_tok, n_group, topk_group, routed_scaling_factor, norm_topk_prob,
///    n_shared_experts, first_k_dense_replace, moe_layer_freq [1], topk_method (V2: "greedy" or
///    "group_limited_greedy"; V3: "noaux_tc"), scoring_func (V2 "softmax", V3 "sigmoid").
///    Renormalisation applies only when k > 1 (as in their modeling code); V2 multiplies by
///    routed_scaling_factor only when it does not renormalise, V3 always (after renormalising).
/// num_hidden_layers, when present, bounds the layer. Throws ModelFileError: unknown_architecture
/// (no or another model_type), missing_config_key (naming every missing key at once),
/// malformed_config (a key of the wrong type or value), not_moe_layer (a dense layer, or past
/// the last layer). Cost: O(size of the config).
inline HfMoEBlockSpec hf_moe_block_spec(const nlohmann::json& config, Index layer) {
  using detail::model_file_fail;
  const char* context = detail::hf_context();
  if (!config.is_object()) model_file_fail(ModelFileErrorKind::malformed_config, context, "config.json is not an object");
  if (!config.contains("model_type") || !config.at("model_type").is_string()) {
    model_file_fail(ModelFileErrorKind::unknown_architecture, context,
                    "config.json has no model_type string (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, "
                    "deepseek_v2, deepseek_v3)");
  }
  const std::string model_type = config.at("model_type").get<std::string>();
  const std::optional<HfFamily> family = parse_hf_family(model_type);
  if (!family) {
    model_file_fail(ModelFileErrorKind::unknown_architecture, context, "model_type '", model_type,
                    "' is not a supported MoE family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)");
  }
  if (layer < 0) detail::not_moe_layer(layer, "is negative");
  HfMoEBlockSpec spec;
  spec.family = *family;
  spec.layer = layer;
  detail::HfConfigReader keys(config);
  MoEConfig& sizes = spec.config;
  sizes.input_dim = keys.integer("hidden_size");
  sizes.k = keys.integer("num_experts_per_tok");
  bool normalize = false;
  const Index layers = keys.integer_or("num_hidden_layers", -1);
  switch (spec.family) {
    case HfFamily::mixtral:
      sizes.hidden_dim = keys.integer("intermediate_size");
      sizes.num_experts = keys.integer("num_local_experts");
      normalize = true;
      break;
    case HfFamily::olmoe:
      sizes.hidden_dim = keys.integer("intermediate_size");
      sizes.num_experts = keys.integer("num_experts");
      normalize = keys.flag_or("norm_topk_prob", false);
      break;
    case HfFamily::qwen2_moe:
    case HfFamily::qwen3_moe: {
      sizes.hidden_dim = keys.integer("moe_intermediate_size");
      sizes.num_experts = keys.integer("num_experts");
      normalize = keys.flag_or("norm_topk_prob", false);
      if (spec.family == HfFamily::qwen2_moe) {
        sizes.shared_hidden_dim = keys.integer("shared_expert_intermediate_size");
        sizes.shared_expert_gate = true;
      }
      const Index step = keys.integer_or("decoder_sparse_step", 1);
      const std::vector<Index> dense = keys.integers_or_empty("mlp_only_layers");
      keys.require_complete(model_type);
      if (std::find(dense.begin(), dense.end(), layer) != dense.end()) {
        detail::not_moe_layer(layer, "is listed in mlp_only_layers (a dense MLP)");
      }
      if (step < 1) keys.bad("decoder_sparse_step", "an integer >= 1");
      if ((layer + 1) % step != 0) {
        detail::not_moe_layer(layer, "is dense: (layer + 1) is not a multiple of decoder_sparse_step = " +
                                         std::to_string(step));
      }
      break;
    }
    case HfFamily::deepseek_v2:
    case HfFamily::deepseek_v3: {
      const bool v3 = spec.family == HfFamily::deepseek_v3;
      sizes.hidden_dim = keys.integer("moe_intermediate_size");
      sizes.num_experts = keys.integer("n_routed_experts");
      const Index groups = keys.integer("n_group");
      const Index top_groups = keys.integer("topk_group");
      const double scale = keys.real("routed_scaling_factor");
      normalize = keys.flag("norm_topk_prob");
      const Index shared = keys.integer("n_shared_experts");
      const Index first_dense = keys.integer("first_k_dense_replace");
      const Index frequency = keys.integer_or("moe_layer_freq", 1);
      const std::string method = keys.text_or("topk_method", v3 ? "noaux_tc" : "greedy");
      const std::string scoring = keys.text_or("scoring_func", v3 ? "sigmoid" : "softmax");
      keys.require_complete(model_type);
      if (scoring != (v3 ? "sigmoid" : "softmax")) keys.bad("scoring_func", v3 ? "\"sigmoid\"" : "\"softmax\"");
      if (v3 && method != "noaux_tc") keys.bad("topk_method", "\"noaux_tc\"");
      if (!v3 && method != "greedy" && method != "group_limited_greedy") {
        keys.bad("topk_method", "\"greedy\" or \"group_limited_greedy\"");
      }
      if (frequency < 1) keys.bad("moe_layer_freq", "an integer >= 1");
      if (layer < first_dense) {
        detail::not_moe_layer(layer, "is one of the first first_k_dense_replace = " + std::to_string(first_dense) +
                                         " dense layers");
      }
      if (layer % frequency != 0) {
        detail::not_moe_layer(layer, "is dense: not a multiple of moe_layer_freq = " + std::to_string(frequency));
      }
      sizes.shared_hidden_dim = shared * sizes.hidden_dim;
      const bool grouped = v3 || method == "group_limited_greedy";
      normalize = normalize && sizes.k > 1;
      if (v3) {
        spec.sigmoid_router = true;
        spec.sigmoid.k = sizes.k;
        spec.sigmoid.normalize_top_k = normalize;
        spec.sigmoid.scale = scale;
        spec.sigmoid.num_groups = grouped ? groups : 1;
        spec.sigmoid.top_groups = grouped ? top_groups : 1;
      } else {
        spec.softmax.num_groups = grouped ? groups : 1;
        spec.softmax.top_groups = grouped ? top_groups : 1;
        spec.softmax.scale = normalize ? 1.0 : scale;
      }
      break;
    }
  }
  keys.require_complete(model_type);
  if (layers >= 0 && layer >= layers) detail::not_moe_layer(layer, "is past the last layer (num_hidden_layers = " +
                                                                       std::to_string(layers) + ")");
  detail::finish_block_spec(spec, normalize, context);
  spec.prefix = "model.layers." + std::to_string(layer) +
                (spec.family == HfFamily::mixtral ? ".block_sparse_moe." : ".mlp.");
  return spec;
}

/// Parses the config.json at `path` (or `path`/config.json for a directory). Throws
/// ModelFileError: io, malformed_config (not valid JSON, naming the file).
inline nlohmann::json read_hf_config(const std::string& path) {
  std::string file = path;
  struct stat status {};
  if (::stat(path.c_str(), &status) == 0 && S_ISDIR(status.st_mode)) file = path + "/config.json";
  const std::string context = detail::file_context("sparsemoe::read_hf_config", file);
  const auto bytes = detail::MappedBytes::map(file, context);
  const char* text = reinterpret_cast<const char*>(bytes->data());
  std::string duplicate;
  nlohmann::json json = detail::parse_json_checked(text, text + bytes->size(), duplicate);
  if (json.is_discarded()) detail::model_file_fail(ModelFileErrorKind::malformed_config, context, "not valid JSON");
  return json;
}

namespace detail {

/// Checks at compile time that `Layer` is an HfSoftmaxMoELayer or HfSigmoidMoELayer; true for
/// the sigmoid one (DeepSeek-V3's).
template <typename Layer>
constexpr bool is_sigmoid_block_layer() {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  static_assert(std::is_same<typename Layer::ExpertType, SwiGluExpert<Scalar>>::value,
                "MoE blocks of model files have SwiGLU experts: use HfSoftmaxMoELayer or HfSigmoidMoELayer");
  constexpr bool sigmoid = std::is_same<RouterT, SigmoidTopKRouter<Scalar>>::value;
  static_assert(sigmoid || std::is_same<RouterT, SoftmaxTopKRouter<Scalar>>::value,
                "the layer needs a SoftmaxTopKRouter or a SigmoidTopKRouter");
  return sigmoid;
}

/// Checks at compile time that `Layer` is an HfSoftmaxMoELayer or HfSigmoidMoELayer, and at run
/// time that its router is the one `spec`'s family needs (ModelFileError(router_mismatch)).
template <typename Layer>
void require_block_layer(const HfMoEBlockSpec& spec, const char* context) {
  constexpr bool sigmoid = is_sigmoid_block_layer<Layer>();
  if (spec.sigmoid_router != sigmoid) {
    model_file_fail(ModelFileErrorKind::router_mismatch, context, "model family '", to_string(spec.family),
                    "' routes with a ", spec.sigmoid_router ? "sigmoid" : "softmax", " top-k router; load it into ",
                    spec.sigmoid_router ? "HfSigmoidMoELayer" : "HfSoftmaxMoELayer");
  }
}

/// Throws ModelFileError(missing_tensor) listing (the first 8 of) the `names` that `model` lacks.
template <typename Model>
void require_tensors(const Model& model, const std::vector<std::string>& names, const HfMoEBlockSpec& spec,
                     const char* context) {
  std::string missing;
  std::size_t missing_count = 0;
  for (const std::string& name : names) {
    if (model.contains(name)) continue;
    if (++missing_count <= 8) missing += (missing.empty() ? "" : ", ") + name;
  }
  if (missing_count > 0) {
    model_file_fail(ModelFileErrorKind::missing_tensor, context, "the ", to_string(spec.family), " MoE block of layer ",
                    spec.layer, " needs ", missing_count, " tensor(s) the file(s) lack: ", missing,
                    missing_count > 8 ? ", …" : "");
  }
}

/// The router of `spec` with weight W_r = `weight` (d×E) and, for the sigmoid router, the
/// selection bias `selection_bias` (E).
template <typename RouterT>
RouterT make_block_router(const HfMoEBlockSpec& spec, Matrix<typename RouterT::Scalar> weight,
                          const Vector<typename RouterT::Scalar>& selection_bias) {
  using Scalar = typename RouterT::Scalar;
  if constexpr (std::is_same<RouterT, SigmoidTopKRouter<Scalar>>::value) {
    RouterT router(spec.config.input_dim, spec.config.num_experts, spec.sigmoid);
    router.weight() = std::move(weight);
    router.selection_bias() = selection_bias;
    return router;
  } else {
    static_cast<void>(selection_bias);
    RouterT router(spec.config.input_dim, spec.config.num_experts, spec.softmax);
    router.weight() = std::move(weight);
    return router;
  }
}

/// The [rows, cols] weight `name` of `model` as a matrix, multiplied by its block scales when the
/// model has `name` + "_scale_inv" (DeepSeek-V3's FP8 checkpoints: one F32 scale per 128×128 block,
/// shape [⌈rows/128⌉, ⌈cols/128⌉]; w = stored value × scale).
template <typename Scalar>
Matrix<Scalar> read_linear_weight(const SafetensorsModel& model, const std::string& name, Index rows, Index cols) {
  Matrix<Scalar> weight = model.matrix<Scalar>(name, rows, cols);
  const std::string scale_name = name + "_scale_inv";
  if (!model.contains(scale_name)) return weight;
  constexpr Index block = 128;
  const Matrix<Scalar> scale = model.matrix<Scalar>(scale_name, (rows + block - 1) / block, (cols + block - 1) / block);
  for (Index row = 0; row < rows; ++row) {
    for (Index col = 0; col < cols; ++col) weight(row, col) *= scale(row / block, col / block);
  }
  return weight;
}

}  // namespace detail

/// Builds the MoE block of `spec` (from hf_moe_block_spec) out of `model`'s tensors, converted
/// to Scalar and transposed from [out, in] (see the file comment). `Layer` is
/// HfSoftmaxMoELayer<Scalar> or, for DeepSeek-V3, HfSigmoidMoELayer<Scalar>. Every tensor is
/// checked to exist (all missing names listed at once) and to have its [out, in] shape before
/// the layer is returned; nothing is changed on error. FP8 weights (F8_E4M3) with a
/// `<name>_scale_inv` tensor, as DeepSeek-V3 ships them, are multiplied by their 128×128 block
/// scales. Throws ModelFileError: router_mismatch (the family needs the other router),
/// missing_tensor, shape_mismatch (of a weight or of its scales), unsupported_dtype.
/// Cost: one pass over the block's weights (3·E·d·h + d·E values, plus the shared expert).
template <typename Layer>
Layer load_hf_moe_block(const SafetensorsModel& model, const HfMoEBlockSpec& spec) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  const char* context = "sparsemoe::load_hf_moe_block";
  detail::require_block_layer<Layer>(spec, context);
  const MoEConfig& sizes = spec.config;
  const Index d = sizes.input_dim;
  const detail::HfExpertNames names = detail::hf_expert_names(spec.family);
  const detail::HfExpertNames shared_names{"gate_proj", "up_proj", "down_proj"};
  const std::string shared = spec.prefix + detail::hf_shared_module(spec.family) + ".";
  const std::string bias = spec.prefix + "gate.e_score_correction_bias";

  std::vector<std::string> required{spec.prefix + "gate.weight"};
  if (spec.sigmoid_router) required.push_back(bias);
  for (Index e = 0; e < sizes.num_experts; ++e) {
    const std::string expert = spec.prefix + "experts." + std::to_string(e) + ".";
    for (const char* name : {names.gate, names.up, names.down}) required.push_back(expert + name + ".weight");
  }
  if (sizes.shared_hidden_dim > 0) {
    for (const char* name : {shared_names.gate, shared_names.up, shared_names.down}) {
      required.push_back(shared + name + ".weight");
    }
  }
  if (sizes.shared_expert_gate) required.push_back(spec.prefix + "shared_expert_gate.weight");
  detail::require_tensors(model, required, spec, context);

  Layer layer(sizes, detail::make_block_router<RouterT>(
                         spec, detail::read_linear_weight<Scalar>(model, spec.prefix + "gate.weight", sizes.num_experts, d)
                                   .transpose(),
                         spec.sigmoid_router ? model.vector<Scalar>(bias, sizes.num_experts) : Vector<Scalar>()));
  const auto fill = [&](SwiGluExpert<Scalar>& expert, const std::string& prefix, Index width,
                        const detail::HfExpertNames& n) {
    expert.gate_projection() = detail::read_linear_weight<Scalar>(model, prefix + n.gate + ".weight", width, d).transpose();
    expert.up_projection() = detail::read_linear_weight<Scalar>(model, prefix + n.up + ".weight", width, d).transpose();
    expert.w2() = detail::read_linear_weight<Scalar>(model, prefix + n.down + ".weight", d, width).transpose();
  };
  for (Index e = 0; e < sizes.num_experts; ++e) {
    fill(layer.expert(e), spec.prefix + "experts." + std::to_string(e) + ".", sizes.hidden_dim, names);
  }
  if (sizes.shared_hidden_dim > 0) fill(layer.shared_expert(), shared, sizes.shared_hidden_dim, shared_names);
  if (sizes.shared_expert_gate) {
    layer.shared_expert_gate() = model.matrix<Scalar>(spec.prefix + "shared_expert_gate.weight", 1, d).transpose();
  }
  return layer;
}

/// load_hf_moe_block(model, hf_moe_block_spec(config, layer)).
template <typename Layer>
Layer load_hf_moe_block(const SafetensorsModel& model, const nlohmann::json& config, Index layer) {
  return load_hf_moe_block<Layer>(model, hf_moe_block_spec(config, layer));
}

/// The MoE block of layer `layer` of the Hugging Face model directory `directory` (its
/// config.json, and model.safetensors or the shards of model.safetensors.index.json):
/// load_hf_moe_block(SafetensorsModel::open(directory), read_hf_config(directory), layer).
/// Errors as those three.
template <typename Layer>
Layer load_hf_moe_block(const std::string& directory, Index layer) {
  return load_hf_moe_block<Layer>(SafetensorsModel::open(directory), read_hf_config(directory), layer);
}

namespace detail {

/// Throws std::invalid_argument unless `layer` can be written as an MoE block of `family`.
template <typename Layer>
void check_exportable(const Layer& layer, HfFamily family, const char* function) {
  using Scalar = typename Layer::Scalar;
  using RouterT = typename Layer::RouterType;
  static_assert(std::is_same<typename Layer::ExpertType, SwiGluExpert<Scalar>>::value,
                "Hugging Face MoE blocks have SwiGLU experts");
  constexpr bool sigmoid = std::is_same<RouterT, SigmoidTopKRouter<Scalar>>::value;
  const auto& o = layer.router().options();
  const bool deepseek = family == HfFamily::deepseek_v2 || family == HfFamily::deepseek_v3;
  require(sigmoid == (family == HfFamily::deepseek_v3), function, "model family '", to_string(family),
          "' needs a ", family == HfFamily::deepseek_v3 ? "SigmoidTopKRouter" : "SoftmaxTopKRouter");
  require(!o.use_bias, function, "the router has a learned bias b_r, which ", to_string(family), " does not have");
  require(deepseek || o.num_groups == 1, function, to_string(family), " has no group-limited routing, got num_groups = ",
          o.num_groups);
  if constexpr (!sigmoid) {
    require(!o.softmax_over_selected, function, to_string(family), " takes the top k of softmax(z), not the softmax "
            "over the selected logits");
    require(family == HfFamily::deepseek_v2 || o.scale == 1.0, function, to_string(family),
            " has no routed scale, got scale = ", o.scale);
    require(family != HfFamily::deepseek_v2 || !o.normalize_top_k || o.scale == 1.0, function,
            "deepseek_v2 scales only unnormalised gates, got normalize_top_k with scale = ", o.scale);
  }
  require(family != HfFamily::mixtral || o.normalize_top_k, function, "mixtral always renormalises the top k");
  require(!deepseek || !o.normalize_top_k || layer.k() > 1, function, to_string(family),
          " renormalises only for k > 1, got normalize_top_k with k = 1");
  const bool wants_shared = family == HfFamily::qwen2_moe || deepseek;
  require(!layer.has_shared_expert() || wants_shared, function, to_string(family), " has no shared expert");
  require(family != HfFamily::qwen2_moe || (layer.has_shared_expert() && layer.shared_expert_gate().size() > 0),
          function, "qwen2_moe has a shared expert with a sigmoid gate; the layer lacks it");
  require(!deepseek || layer.shared_expert_gate().size() == 0, function, to_string(family),
          "'s shared experts have no gate");
  require(!deepseek || layer.shared_hidden_dim() % layer.hidden_dim() == 0, function, to_string(family),
          " writes n_shared_experts = h_s / h: h_s = ", layer.shared_hidden_dim(), " is not a multiple of h = ",
          layer.hidden_dim());
}

}  // namespace detail

/// The config.json keys that describe `layer` as an MoE block of `family` (the keys
/// hf_moe_block_spec reads, plus model_type and architectures), with every layer an MoE layer
/// (decoder_sparse_step 1, first_k_dense_replace 0, …): merge them into the config of a whole
/// model, adjusting those for its dense layers. Throws std::invalid_argument when the layer's
/// router or shared expert cannot be expressed in the family (e.g. a Mixtral without
/// renormalisation, a router bias, groups outside DeepSeek, a shared expert width that is not a
/// multiple of h for DeepSeek).
template <typename Layer>
nlohmann::json hf_moe_config(const Layer& layer, HfFamily family) {
  detail::check_exportable(layer, family, "sparsemoe::hf_moe_config");
  const auto& o = layer.router().options();
  nlohmann::json config;
  config["model_type"] = to_string(family);
  config["hidden_size"] = layer.input_dim();
  config["num_experts_per_tok"] = layer.k();
  switch (family) {
    case HfFamily::mixtral:
      config["architectures"] = {"MixtralForCausalLM"};
      config["intermediate_size"] = layer.hidden_dim();
      config["num_local_experts"] = layer.num_experts();
      break;
    case HfFamily::olmoe:
      config["architectures"] = {"OlmoeForCausalLM"};
      config["intermediate_size"] = layer.hidden_dim();
      config["num_experts"] = layer.num_experts();
      config["norm_topk_prob"] = o.normalize_top_k;
      break;
    case HfFamily::qwen2_moe:
    case HfFamily::qwen3_moe:
      config["architectures"] = {family == HfFamily::qwen2_moe ? "Qwen2MoeForCausalLM" : "Qwen3MoeForCausalLM"};
      config["moe_intermediate_size"] = layer.hidden_dim();
      config["num_experts"] = layer.num_experts();
      config["norm_topk_prob"] = o.normalize_top_k;
      config["decoder_sparse_step"] = 1;
      config["mlp_only_layers"] = nlohmann::json::array();
      if (family == HfFamily::qwen2_moe) config["shared_expert_intermediate_size"] = layer.shared_hidden_dim();
      break;
    case HfFamily::deepseek_v2:
    case HfFamily::deepseek_v3: {
      const bool v3 = family == HfFamily::deepseek_v3;
      config["architectures"] = {v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"};
      config["moe_intermediate_size"] = layer.hidden_dim();
      config["n_routed_experts"] = layer.num_experts();
      config["n_group"] = o.num_groups;
      config["topk_group"] = o.top_groups;
      config["routed_scaling_factor"] = o.scale;
      config["norm_topk_prob"] = o.normalize_top_k;
      config["n_shared_experts"] = layer.shared_hidden_dim() / layer.hidden_dim();
      config["first_k_dense_replace"] = 0;
      config["moe_layer_freq"] = 1;
      config["scoring_func"] = v3 ? "sigmoid" : "softmax";
      config["topk_method"] = v3 ? "noaux_tc" : (o.num_groups > 1 ? "group_limited_greedy" : "greedy");
      break;
    }
  }
  return config;
}

/// Adds `layer`'s tensors to `writer` under the names of `family`'s MoE block of decoder layer
/// `layer_index` (the names load_hf_moe_block reads), transposed to [out, in] and stored as
/// `dtype` (F32 by default; F64 keeps a double layer exact; BF16 and F16 round to nearest even).
/// With hf_moe_config's keys, load_hf_moe_block gives back the same layer, bitwise when `dtype`
/// holds the Scalar exactly. Throws std::invalid_argument as hf_moe_config, or from the writer.
/// Cost: one copy of the block's weights.
template <typename Layer>
void export_hf_moe_block(const Layer& layer, HfFamily family, Index layer_index, SafetensorsWriter& writer,
                         SafetensorsDtype dtype = SafetensorsDtype::f32) {
  using Scalar = typename Layer::Scalar;
  detail::check_exportable(layer, family, "sparsemoe::export_hf_moe_block");
  detail::require(layer_index >= 0, "sparsemoe::export_hf_moe_block", "layer_index must be >= 0, got ", layer_index);
  const std::string prefix =
      "model.layers." + std::to_string(layer_index) + (family == HfFamily::mixtral ? ".block_sparse_moe." : ".mlp.");
  const auto u = [](Index value) { return static_cast<std::uint64_t>(value); };
  const Index d = layer.input_dim();
  const Index h = layer.hidden_dim();
  const Index experts = layer.num_experts();
  const Matrix<Scalar> router_weight = layer.router().weight().transpose();
  writer.add(prefix + "gate.weight", {u(experts), u(d)}, router_weight, dtype);
  if constexpr (std::is_same<typename Layer::RouterType, SigmoidTopKRouter<Scalar>>::value) {
    // Stored in F32 (as DeepSeek-V3 ships it) unless F64 is asked for.
    writer.add(prefix + "gate.e_score_correction_bias", {u(experts)}, layer.router().selection_bias(),
               dtype == SafetensorsDtype::f64 ? dtype : SafetensorsDtype::f32);
  }
  const auto add_expert = [&](const SwiGluExpert<Scalar>& expert, const std::string& module, Index width,
                              const detail::HfExpertNames& names) {
    const Matrix<Scalar> gate = expert.w1().leftCols(width).transpose();
    const Matrix<Scalar> up = expert.w1().rightCols(width).transpose();
    const Matrix<Scalar> down = expert.w2().transpose();
    writer.add(module + names.gate + ".weight", {u(width), u(d)}, gate, dtype);
    writer.add(module + names.up + ".weight", {u(width), u(d)}, up, dtype);
    writer.add(module + names.down + ".weight", {u(d), u(width)}, down, dtype);
  };
  for (Index e = 0; e < experts; ++e) {
    add_expert(layer.expert(e), prefix + "experts." + std::to_string(e) + ".", h, detail::hf_expert_names(family));
  }
  if (layer.has_shared_expert()) {
    add_expert(layer.shared_expert(), prefix + detail::hf_shared_module(family) + ".", layer.shared_hidden_dim(),
               {"gate_proj", "up_proj", "down_proj"});
  }
  if (layer.shared_expert_gate().size() > 0) {
    writer.add(prefix + "shared_expert_gate.weight", {1, u(d)}, layer.shared_expert_gate().transpose(), dtype);
  }
}

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_HF_MODELS_HPP
