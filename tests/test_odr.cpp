// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// ODR / "missing inline" check. This file and test_odr_second_tu.cpp both include
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

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

std::string odr_second_tu_version();
double odr_second_tu_forward_sum();
#ifdef SPARSEMOE_ODR_CHECKPOINT
std::string odr_second_tu_checkpoint();
#endif
#ifdef SPARSEMOE_ODR_MODEL_FILES
std::string odr_second_tu_safetensors();
#endif

TEST(Odr, TwoTranslationUnitsLinkAndAgree) {
  EXPECT_EQ(sparsemoe::version_string(), odr_second_tu_version());
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
  const double here = layer.forward(input, options).output.sum();
  EXPECT_NE(here, 0.0);
  EXPECT_EQ(here, odr_second_tu_forward_sum());
}

#ifdef SPARSEMOE_ODR_CHECKPOINT
// checkpoint.hpp and its io/ headers hold many non-template functions: both TUs call them.
TEST(Odr, CheckpointHeadersLinkFromTwoTranslationUnits) {
  const std::string bytes = odr_second_tu_checkpoint();
  const sparsemoe::CheckpointInfo info = sparsemoe::inspect_checkpoint(bytes.data(), bytes.size());
  EXPECT_EQ(info.input_dim, 6);
  EXPECT_EQ(info.size_bytes, bytes.size());
  EXPECT_STREQ(sparsemoe::to_string(sparsemoe::CheckpointErrorKind::io), "io");
}
#endif

#ifdef SPARSEMOE_ODR_MODEL_FILES
// The model-file headers (safetensors, Hugging Face blocks, half-precision conversions): both TUs
// call their non-template functions.
TEST(Odr, ModelFileHeadersLinkFromTwoTranslationUnits) {
  const sparsemoe::SafetensorsFile file = sparsemoe::SafetensorsFile::from_bytes(odr_second_tu_safetensors());
  EXPECT_EQ(file.info("model.layers.0.mlp.gate.weight").shape, (std::vector<std::uint64_t>{3, 6}));
  EXPECT_STREQ(sparsemoe::to_string(sparsemoe::ModelFileErrorKind::io), "io");
  EXPECT_STREQ(sparsemoe::to_string(sparsemoe::SafetensorsDtype::bf16), "BF16");
  EXPECT_EQ(*sparsemoe::parse_hf_family("olmoe"), sparsemoe::HfFamily::olmoe);
  EXPECT_STREQ(sparsemoe::to_string(sparsemoe::GgmlType::q8_0), "Q8_0");
  EXPECT_THROW(sparsemoe::GgufFile::from_bytes("GGUF"), sparsemoe::ModelFileError);
  EXPECT_STREQ(sparsemoe::gguf_architecture(sparsemoe::HfFamily::mixtral), "llama");
  EXPECT_EQ(sparsemoe::GgufWriter().bytes().size(), 32u);  // the 24-byte header, padded
}
#endif
