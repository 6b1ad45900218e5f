// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Serving one MoE block of a real model family: loads it from a Hugging Face model directory or a
// GGUF file, or builds one with random weights in the shape of a named model, packs its experts
// once, and runs evaluation-mode batches of 1, 16 and 256 tokens (reusing the result and the
// workspace), printing tokens/s, the GB/s of expert weights the batch streams against the
// machine's read bandwidth measured in the same run, and which experts the batch hit.
//
//   serve --model DIR --layer L          a Hugging Face directory (config.json + safetensors)
//   serve --gguf FILE --layer L          a GGUF file
//   serve --family F [--layer-shape S]   random weights; F: mixtral, qwen2-moe, qwen3-moe, olmoe,
//                                        deepseek-v2, deepseek-v3; S: tiny (default) or a model:
//                                        mixtral 8x7b, 8x22b; qwen2-moe a2.7b, 57b-a14b;
//                                        qwen3-moe 30b-a3b, 235b-a22b; olmoe 1b-7b;
//                                        deepseek-v2 lite; deepseek-v3 671b
//   options: --batches 1,16,256  --repeats R (5)  --bandwidth-mb M (512)  --seed N (1)
//            --bf16: serve the routed experts from bfloat16 weights (MoELayer::bf16_experts(),
//            fp32 activations and accumulation); GB/s then counts their 2 bytes per weight
//
// Weights are float (4 bytes each; 2 for the routed experts with --bf16). Random weights of a full-size shape take that model's expert
// memory: qwen3-moe 30b-a3b needs 2.4 GB for one block, deepseek-v3 671b 11 GB.

#include <sparsemoe/io/gguf.hpp>
#include <sparsemoe/io/hf_models.hpp>
#include <sparsemoe/sparsemoe.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using sparsemoe::Index;

struct Settings {
  std::string model_dir, gguf, family, shape = "tiny";
  Index layer = -1;
  std::vector<Index> batches = {1, 16, 256};
  int repeats = 5;
  Index bandwidth_mb = 512;
  std::uint64_t seed = 1;
  bool bf16 = false;
};

[[noreturn]] void usage(int status) {
  (status == 0 ? std::cout : std::cerr)
      << "usage: serve (--model DIR | --gguf FILE) --layer L | --family F [--layer-shape S]\n"
         "             [--batches 1,16,256] [--repeats R] [--bandwidth-mb M] [--seed N] [--bf16]\n";
  std::exit(status);
}

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help") usage(0);
    if (flag == "--bf16") {
      s.bf16 = true;
      continue;
    }
    if (i + 1 >= argc) usage(2);
    const std::string value = argv[++i];
    if (flag == "--model") s.model_dir = value;
    else if (flag == "--gguf") s.gguf = value;
    else if (flag == "--family") s.family = value;
    else if (flag == "--layer-shape") s.shape = value;
    else if (flag == "--layer") s.layer = std::atoll(value.c_str());
    else if (flag == "--repeats") s.repeats = std::max(1, std::atoi(value.c_str()));
    else if (flag == "--bandwidth-mb") s.bandwidth_mb = std::max<Index>(1, std::atoll(value.c_str()));
    else if (flag == "--seed") s.seed = std::strtoull(value.c_str(), nullptr, 10);
    else if (flag == "--batches") {
      s.batches.clear();
      std::stringstream list(value);
      for (std::string item; std::getline(list, item, ',');) s.batches.push_back(std::max<Index>(1, std::atoll(item.c_str())));
    } else {
      usage(2);
    }
  }
  if (s.model_dir.empty() + s.gguf.empty() + s.family.empty() != 2) usage(2);
  return s;
}

/// config.json keys of a family in a named shape (published sizes of those models' MoE blocks).
nlohmann::json shape_config(const std::string& family, const std::string& shape) {
  struct Shape {
    Index d, h, experts, k, shared, groups, top_groups;
    double scale;
    bool normalize;
  };
  const std::map<std::string, Shape> shapes = {
      {"mixtral/tiny", {64, 96, 8, 2, 0, 1, 1, 1.0, true}},
      {"mixtral/8x7b", {4096, 14336, 8, 2, 0, 1, 1, 1.0, true}},
      {"mixtral/8x22b", {6144, 16384, 8, 2, 0, 1, 1, 1.0, true}},
      {"qwen2_moe/tiny", {64, 32, 16, 4, 128, 1, 1, 1.0, false}},
      {"qwen2_moe/a2.7b", {2048, 1408, 60, 4, 5632, 1, 1, 1.0, false}},
      {"qwen2_moe/57b-a14b", {3584, 2560, 64, 8, 20480, 1, 1, 1.0, false}},
      {"qwen3_moe/tiny", {64, 32, 32, 8, 0, 1, 1, 1.0, true}},
      {"qwen3_moe/30b-a3b", {2048, 768, 128, 8, 0, 1, 1, 1.0, true}},
      {"qwen3_moe/235b-a22b", {4096, 1536, 128, 8, 0, 1, 1, 1.0, true}},
      {"olmoe/tiny", {64, 32, 16, 4, 0, 1, 1, 1.0, false}},
      {"olmoe/1b-7b", {2048, 1024, 64, 8, 0, 1, 1, 1.0, false}},
      {"deepseek_v2/tiny", {64, 32, 16, 4, 2, 1, 1, 1.0, false}},
      {"deepseek_v2/lite", {2048, 1408, 64, 6, 2, 1, 1, 1.0, false}},
      {"deepseek_v3/tiny", {64, 32, 16, 4, 1, 4, 2, 2.5, true}},
      {"deepseek_v3/671b", {7168, 2048, 256, 8, 1, 8, 4, 2.5, true}},
  };
  std::string model_type = family;
  std::replace(model_type.begin(), model_type.end(), '-', '_');
  const auto found = shapes.find(model_type + "/" + shape);
  if (found == shapes.end()) {
    std::cerr << "serve: no shape '" << shape << "' for family '" << family << "' (see the file comment)\n";
    std::exit(2);
  }
  const Shape& s = found->second;
  nlohmann::json c = {{"model_type", model_type}, {"hidden_size", s.d}, {"num_experts_per_tok", s.k}};
  if (model_type == "mixtral") {
    c["intermediate_size"] = s.h;
    c["num_local_experts"] = s.experts;
  } else if (model_type == "olmoe") {
    c["intermediate_size"] = s.h;
    c["num_experts"] = s.experts;
    c["norm_topk_prob"] = s.normalize;
  } else if (model_type == "qwen2_moe" || model_type == "qwen3_moe") {
    c["moe_intermediate_size"] = s.h;
    c["num_experts"] = s.experts;
    c["norm_topk_prob"] = s.normalize;
    if (model_type == "qwen2_moe") c["shared_expert_intermediate_size"] = s.shared;
  } else {
    c["moe_intermediate_size"] = s.h;
    c["n_routed_experts"] = s.experts;
    c["n_group"] = s.groups;
    c["topk_group"] = s.top_groups;
    c["routed_scaling_factor"] = s.scale;
    c["norm_topk_prob"] = s.normalize;
    c["n_shared_experts"] = s.shared;
    c["first_k_dense_replace"] = 0;
    if (model_type == "deepseek_v3") c["topk_method"] = "noaux_tc";
  }
  return c;
}

/// A layer of `spec`'s shape with random weights (router U(±1/√d), experts as the layer draws
/// them, DeepSeek-V3's selection bias U(±0.1)).
template <typename Layer>
Layer random_layer(const sparsemoe::HfMoEBlockSpec& spec, std::uint64_t seed) {
  using RouterT = typename Layer::RouterType;
  sparsemoe::MoEConfig config = spec.config;
  config.seed = seed;
  if constexpr (std::is_same<RouterT, sparsemoe::SigmoidTopKRouter<float>>::value) {
    RouterT router(config.input_dim, config.num_experts, spec.sigmoid);
    router.initialize_uniform(seed);
    std::mt19937_64 random(seed);
    for (Index e = 0; e < config.num_experts; ++e) {
      router.selection_bias()[e] = std::uniform_real_distribution<float>(-0.1f, 0.1f)(random);
    }
    return Layer(config, std::move(router));
  } else {
    RouterT router(config.input_dim, config.num_experts, spec.softmax);
    router.initialize_uniform(seed);
    return Layer(config, std::move(router));
  }
}

/// Best of 3 reads of a buffer of `megabytes`: the machine's read bandwidth in GB/s.
double read_bandwidth(Index megabytes) {
  const Index count = megabytes * (1 << 20) / static_cast<Index>(sizeof(float));
  const sparsemoe::Vector<float> buffer = sparsemoe::Vector<float>::Constant(count, 1.0f);
  double best = 1e300;
  volatile double sink = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    const auto start = Clock::now();
    double total = 0;
#ifdef _OPENMP
#pragma omp parallel for reduction(+ : total) schedule(static)
#endif
    for (Index block = 0; block < count / 4096; ++block) total += buffer.segment(block * 4096, 4096).sum();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    sink = sink + total;
  }
  return static_cast<double>(count) * sizeof(float) / best / 1e9;
}

template <typename Layer>
void serve(const Layer& layer, const std::string& what, const Settings& settings) {
  const Index d = layer.input_dim();
  const Index experts = layer.num_experts();
  // Routed experts: 3·d·h weights of 4 bytes, or 2 with --bf16 (the router and a shared expert stay fp32).
  const double weight_bytes = settings.bf16 ? 2.0 : static_cast<double>(sizeof(float));
  const double expert_bytes = 3.0 * static_cast<double>(d) * static_cast<double>(layer.hidden_dim()) * weight_bytes;
  double fixed_bytes = static_cast<double>(d) * static_cast<double>(experts) * sizeof(float);  // router
  if (layer.has_shared_expert()) fixed_bytes += 3.0 * static_cast<double>(d) * layer.shared_hidden_dim() * sizeof(float);
  std::cout << what << ": d = " << d << ", h = " << layer.hidden_dim() << ", E = " << experts << ", k = " << layer.k()
            << ", shared h_s = " << layer.shared_hidden_dim() << ", expert weights "
            << std::setprecision(3) << expert_bytes * static_cast<double>(experts) / 1e9 << " GB"
            << (settings.bf16 ? " (bf16)" : "") << '\n';
  const double bandwidth = read_bandwidth(settings.bandwidth_mb);
  std::cout << "read bandwidth (best of 3 reads of " << settings.bandwidth_mb << " MB): " << std::setprecision(3)
            << bandwidth << " GB/s\n";

  // fp32: the packed experts; --bf16: the experts' weights rounded to bfloat16. Made once.
  const sparsemoe::PackedExperts<float> packed =
      settings.bf16 ? sparsemoe::PackedExperts<float>{} : layer.pack_experts();
  using ExpertT = typename Layer::ExpertType;
  const sparsemoe::Bf16Experts<ExpertT> bf16 = settings.bf16 ? layer.bf16_experts() : sparsemoe::Bf16Experts<ExpertT>{};
  if (settings.bf16) {
    std::cout << "bf16 experts: " << std::setprecision(3) << static_cast<double>(bf16.bytes()) / 1e9 << " GB, "
              << (sparsemoe::bf16_vector_kernel_compiled() ? "AVX-512" : "portable") << " kernel\n";
  }
  sparsemoe::ForwardWorkspace<float> workspace;
  typename Layer::Result result;
  const sparsemoe::ForwardOptions options;
  const auto run = [&](const sparsemoe::Matrix<float>& x, typename Layer::Result& out) {
    if (settings.bf16) {
      layer.forward(x, options, out, workspace, bf16);
    } else {
      layer.forward(x, options, out, workspace, packed);
    }
  };
  std::mt19937 random(static_cast<unsigned>(settings.seed));
  std::cout << std::setw(7) << "tokens" << std::setw(14) << "tokens/s" << std::setw(12) << "ms/batch" << std::setw(12)
            << "GB/s" << std::setw(12) << "x read bw" << std::setw(14) << "experts hit" << std::setw(16)
            << "max tokens/exp" << '\n';
  for (const Index tokens : settings.batches) {
    sparsemoe::Matrix<float> x(tokens, d);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = std::normal_distribution<float>(0.0f, 1.0f)(random);
    run(x, result);  // warm-up: sizes the workspace
    double best = 1e300;
    for (int repeat = 0; repeat < settings.repeats; ++repeat) {
      const auto start = Clock::now();
      run(x, result);
      best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    }
    const auto& per_expert = result.tokens_per_expert();
    Index hit = 0;
    Index busiest = 0;
    for (Index e = 0; e < experts; ++e) {
      hit += per_expert[e] > 0 ? 1 : 0;
      busiest = std::max(busiest, per_expert[e]);
    }
    const double streamed = fixed_bytes + static_cast<double>(hit) * expert_bytes;
    const double gbps = streamed / best / 1e9;
    std::cout << std::setw(7) << tokens << std::setw(14) << std::setprecision(4) << static_cast<double>(tokens) / best
              << std::setw(12) << best * 1e3 << std::setw(12) << gbps << std::setw(12) << gbps / bandwidth
              << std::setw(9) << hit << "/" << std::setw(4) << experts << std::setw(16) << busiest << '\n';
  }
  std::cout << "GB/s counts the expert weights a batch reads once (hit experts"
            << (settings.bf16 ? " as bf16" : "") << ", router, shared expert); "
               "x read bw is that over the measured read bandwidth.\n";
}

template <typename Function>
void with_layer_type(const sparsemoe::HfMoEBlockSpec& spec, Function&& function) {
  if (spec.sigmoid_router) {
    function(static_cast<sparsemoe::HfSigmoidMoELayer<float>*>(nullptr));
  } else {
    function(static_cast<sparsemoe::HfSoftmaxMoELayer<float>*>(nullptr));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Settings settings = parse(argc, argv);
  try {
    if (!settings.family.empty()) {
      const sparsemoe::HfMoEBlockSpec spec =
          sparsemoe::hf_moe_block_spec(shape_config(settings.family, settings.shape), std::max<Index>(settings.layer, 0));
      with_layer_type(spec, [&](auto* tag) {
        using Layer = std::remove_pointer_t<decltype(tag)>;
        serve(random_layer<Layer>(spec, settings.seed), settings.family + " " + settings.shape + " (random weights)",
              settings);
      });
    } else if (!settings.model_dir.empty()) {
      const sparsemoe::HfMoEBlockSpec spec =
          sparsemoe::hf_moe_block_spec(sparsemoe::read_hf_config(settings.model_dir), settings.layer);
      const sparsemoe::SafetensorsModel model = sparsemoe::SafetensorsModel::open(settings.model_dir);
      with_layer_type(spec, [&](auto* tag) {
        using Layer = std::remove_pointer_t<decltype(tag)>;
        serve(sparsemoe::load_hf_moe_block<Layer>(model, spec), settings.model_dir + " layer " + std::to_string(spec.layer),
              settings);
      });
    } else {
      const sparsemoe::GgufFile file = sparsemoe::GgufFile::open(settings.gguf);
      const sparsemoe::HfMoEBlockSpec spec = sparsemoe::gguf_moe_block_spec(file, settings.layer);
      with_layer_type(spec, [&](auto* tag) {
        using Layer = std::remove_pointer_t<decltype(tag)>;
        serve(sparsemoe::load_gguf_moe_block<Layer>(file, spec), settings.gguf + " layer " + std::to_string(spec.layer),
              settings);
      });
    }
  } catch (const sparsemoe::ModelFileError& error) {
    std::cerr << "serve: " << error.what() << '\n';
    return 1;
  }
  return 0;
}
