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

#include <gtest/gtest.h>

#include <string>

std::string odr_second_tu_version();
double odr_second_tu_forward_sum();
#ifdef SPARSEMOE_ODR_CHECKPOINT
std::string odr_second_tu_checkpoint();
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
