// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// ODR / "missing inline" check. This file and test_odr.cpp both include
// the umbrella header and are linked into ONE executable (see tests/CMakeLists.txt).
// A non-template function or variable defined in a header without `inline` is then
// defined twice and the link fails. Add to odr_second_tu_touch() anything that
// needs instantiating in the second TU (e.g. a MoELayer<float> forward pass).
#include <sparsemoe/sparsemoe.hpp>
#ifdef SPARSEMOE_ODR_CHECKPOINT
#include <sparsemoe/checkpoint.hpp>
#endif
#ifdef SPARSEMOE_ODR_MODEL_FILES
#include <sparsemoe/io/gguf.hpp>
#include <sparsemoe/io/gguf_writer.hpp>
#include <sparsemoe/io/hf_models.hpp>
#endif

#include <string>

// Uses every non-template entity of the library from a second translation unit, so a missing
// `inline` in a header is a duplicate symbol at link time.
std::string odr_second_tu_version() { return sparsemoe::version_string(); }

double odr_second_tu_forward_sum() {
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 10;
  config.num_experts = 3;
  config.k = 2;
  sparsemoe::MoELayer<double> layer(config);
  layer.gate().initialize_uniform(5);
  sparsemoe::Matrix<double> input = sparsemoe::Matrix<double>::Constant(4, 6, 0.25);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  return layer.forward(input, options).output.sum();
}

#ifdef SPARSEMOE_ODR_CHECKPOINT
std::string odr_second_tu_checkpoint() {
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 10;
  config.num_experts = 3;
  config.k = 2;
  const sparsemoe::MoELayer<double> layer(config);
  const std::string bytes = sparsemoe::serialize_checkpoint(layer);
  static_cast<void>(sparsemoe::inspect_checkpoint(bytes.data(), bytes.size()));
  return bytes;
}
#endif

#ifdef SPARSEMOE_ODR_MODEL_FILES
std::string odr_second_tu_safetensors() {
  sparsemoe::MoEConfig config;
  config.input_dim = 6;
  config.hidden_dim = 4;
  config.num_experts = 3;
  config.k = 2;
  sparsemoe::SoftmaxTopKRouterOptions options;
  options.k = 2;
  const sparsemoe::HfSoftmaxMoELayer<float> layer(config, sparsemoe::SoftmaxTopKRouter<float>(6, 3, options));
  sparsemoe::SafetensorsWriter writer;
  sparsemoe::export_hf_moe_block(layer, sparsemoe::HfFamily::olmoe, 0, writer, sparsemoe::SafetensorsDtype::bf16);
  static_cast<void>(sparsemoe::hf_moe_block_spec(sparsemoe::hf_moe_config(layer, sparsemoe::HfFamily::olmoe), 0));
  static_cast<void>(sparsemoe::parse_safetensors_dtype("F16"));
  static_cast<void>(sparsemoe::ggml_block_layout(8));
  static_cast<void>(sparsemoe::to_string(sparsemoe::GgmlType::bf16));
  return writer.bytes();
}
#endif
