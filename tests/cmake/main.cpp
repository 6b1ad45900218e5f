// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The consumer projects' program (app.cpp of the README's consumer projects): includes the
// installed / added / fetched library, runs one forward pass and checks its shape, so a broken
// include path, Eigen, OpenMP or libxsmm link fails here. With SPARSEMOE_EXPECT_LIBXSMM defined
// (0 or 1) it also checks which GEMM backend the build selected.
#include <sparsemoe/sparsemoe.hpp>

#include <iostream>

#ifdef SPARSEMOE_WITH_LIBXSMM
#define SPARSEMOE_CONSUMER_BACKEND "libxsmm"
#define SPARSEMOE_CONSUMER_LIBXSMM 1
#else
#define SPARSEMOE_CONSUMER_BACKEND "Eigen"
#define SPARSEMOE_CONSUMER_LIBXSMM 0
#endif
#ifdef SPARSEMOE_EXPECT_LIBXSMM
static_assert(SPARSEMOE_EXPECT_LIBXSMM == SPARSEMOE_CONSUMER_LIBXSMM,
              "the consumer build selected the wrong GEMM backend (SPARSEMOE_WITH_LIBXSMM)");
#endif

int main() {
  sparsemoe::MoEConfig config;
  config.input_dim = 16;
  config.hidden_dim = 32;
  config.num_experts = 4;
  config.k = 2;
  sparsemoe::MoELayer<float> layer(config);
  const sparsemoe::Matrix<float> input = sparsemoe::Matrix<float>::Ones(8, 16);
  const auto result = layer.forward(input);
  if (result.output.rows() != 8 || result.output.cols() != 16 || !result.output.allFinite()) {
    std::cerr << "consumer: unexpected forward output\n";
    return 1;
  }
  std::cout << "sparsemoe " << sparsemoe::version_string() << " (" << SPARSEMOE_CONSUMER_BACKEND
            << " GEMMs): forward ok, output norm " << result.output.norm() << '\n';
  return 0;
}
