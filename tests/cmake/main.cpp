// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The consumer projects' program: includes the installed / added / fetched library, runs one
// forward pass and checks its shape, so a broken include path, Eigen or OpenMP link fails here.
#include <sparsemoe/sparsemoe.hpp>

#include <iostream>

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
  std::cout << "sparsemoe " << sparsemoe::version_string() << ": forward ok, output norm "
            << result.output.norm() << '\n';
  return 0;
}
