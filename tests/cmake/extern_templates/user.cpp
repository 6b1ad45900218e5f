// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// A translation unit compiled with SPARSEMOE_EXTERN_TEMPLATES: it trains float, SwiGLU and sigmoid-routed layers
// for a step and runs a double layer forward, using the instantiations of instances.cpp. Linked
// without instances.cpp it must fail (undefined references): the declarations took effect.
#include "layers.hpp"

#include <iostream>

#ifndef SPARSEMOE_EXTERN_TEMPLATES
#error "compile user.cpp with SPARSEMOE_EXTERN_TEMPLATES"
#endif

namespace {

template <typename Layer>
bool train_one_step(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  sparsemoe::Adam<Scalar> adam;
  auto gradients = layer.make_gradients();
  const sparsemoe::Matrix<Scalar> x = sparsemoe::Matrix<Scalar>::Random(64, layer.input_dim());
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  const auto result = layer.forward(x, options);
  gradients.set_zero();
  const sparsemoe::Matrix<Scalar> d_x =
      layer.backward(result, sparsemoe::Matrix<Scalar>::Ones(64, layer.input_dim()), gradients);
  adam.step(layer.tensors(), gradients.tensors());
  return d_x.allFinite() && adam.step_count() == 1;
}

}  // namespace

int main() {
  sparsemoe::MoEConfig config;
  config.input_dim = 16;
  config.hidden_dim = 32;
  config.num_experts = 4;
  config.k = 2;
  sparsemoe::MoELayer<float> relu_layer(config);
  sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>> swiglu_layer(config);
  sparsemoe::SigmoidTopKRouterOptions sigmoid_options;
  sigmoid_options.k = config.k;
  sparsemoe::MoELayer<float, sparsemoe::SwiGluExpert<float>, sparsemoe::SigmoidTopKRouter<float>> sigmoid_layer(
      config, sparsemoe::SigmoidTopKRouter<float>(config.input_dim, config.num_experts, sigmoid_options));
  const sparsemoe::MoELayer<double> double_layer(config);
  const auto evaluation = double_layer.forward(sparsemoe::Matrix<double>::Ones(8, 16));
  const bool ok = train_one_step(relu_layer) && train_one_step(swiglu_layer) && train_one_step(sigmoid_layer) && evaluation.output.allFinite();
  std::cout << "extern templates: " << (ok ? "ok" : "FAILED") << '\n';
  return ok ? 0 : 1;
}
