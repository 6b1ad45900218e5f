// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_LAYER_GRADIENTS_HPP
#define SPARSEMOE_LAYER_GRADIENTS_HPP

/// \file layer_gradients.hpp
/// MoEGradients: the gradients of every parameter of an MoELayer, laid out like the layer.

#include "config.hpp"
#include "gate.hpp"
#include "layer_router.hpp"
#include "parameters.hpp"

#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Gradients of every parameter of an MoELayer, laid out like the layer: the router's (the base,
/// RouterTraits<RouterT>::Gradients: gate_weight and noise_weight for the default NoisyTopKGate,
/// weight and bias for the top-k routers), then each expert's.
template <typename Scalar, typename ExpertT, typename RouterT = NoisyTopKGate<Scalar>>
struct MoEGradients : RouterTraits<RouterT>::Gradients {
  /// The router's parameter gradients, the base of this struct.
  using RouterGradientsType = typename RouterTraits<RouterT>::Gradients;
  std::vector<ExpertT> experts;  ///< ∂L/∂(W1, b1, W2, b2) of each expert, as expert-shaped tensors
  std::vector<ExpertT> shared_experts;  ///< ∂L/∂ the shared expert's tensors (none or one)
  Vector<Scalar> shared_expert_gate;    ///< ∂L/∂w_shared, d (empty without the gate)

  /// The router's gradients (the base).
  RouterGradientsType& router() { return *this; }

  /// All gradient tensors, in the same order and with the same names as MoELayer::tensors().
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, RouterTraits<RouterT>::prefix, RouterGradientsType::tensors());
    for (std::size_t e = 0; e < experts.size(); ++e) {
      append_tensor_views(list, "expert" + std::to_string(e) + ".", experts[e].tensors());
    }
    for (auto& shared : shared_experts) append_tensor_views(list, "shared_expert.", shared.tensors());
    if (shared_expert_gate.size() > 0) list.push_back(make_tensor_view("shared_expert_gate", shared_expert_gate));
    return list;
  }

  /// Sets every gradient to zero.
  void set_zero() {
    RouterGradientsType::set_zero();
    for (auto& expert : experts) expert.set_zero();
    for (auto& shared : shared_experts) shared.set_zero();
    shared_expert_gate.setZero();
  }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_LAYER_GRADIENTS_HPP
