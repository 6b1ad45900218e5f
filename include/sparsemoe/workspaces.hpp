// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_WORKSPACES_HPP
#define SPARSEMOE_WORKSPACES_HPP

/// \file workspaces.hpp
/// Reusable scratch memory of MoELayer::forward and MoELayer::backward (allocation-free steady state).

#include "bf16_experts.hpp"
#include "config.hpp"
#include "expert_bank.hpp"
#include "gate.hpp"

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Scratch memory of MoELayer::forward, reusable across calls: a forward of the same shape into
/// the same workspace (and the same ForwardResult) allocates nothing. Not shared between threads:
/// give each calling thread its own.
template <typename Scalar>
struct ForwardWorkspace {
  Matrix<Scalar> grouped_input;              ///< T·k×d: each expert's tokens, contiguous (stage group)
  Matrix<Scalar> expert_output;              ///< T·k×d: E_i of each grouped row (stage expert compute)
  Matrix<Scalar> shared_output;              ///< T×d: the shared expert's output (without its gate)
  ExpertBankForwardWorkspace<Scalar> experts;  ///< scratch of the routed experts' ExpertBank::forward
  ExpertBankForwardWorkspace<Scalar> shared;   ///< scratch of the shared expert's bank (its companion)
  Bf16ExpertsWorkspace bf16;                   ///< scratch of Bf16Experts::forward (bf16 forwards only)

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    return static_cast<std::size_t>(grouped_input.size() + expert_output.size() + shared_output.size()) *
               sizeof(Scalar) +
           experts.bytes() + shared.bytes() + bf16.bytes();
  }
};

/// Scratch memory of MoELayer::backward, reusable across calls of the same shape. Not shared
/// between threads: give each calling thread its own. RoutingGradientT is the router's
/// (RouterTraits::RoutingGradient; MoELayer::BackwardWorkspaceType names the type).
template <typename Scalar, typename RoutingGradientT = GateGradients<Scalar>>
struct BackwardWorkspace {
  Matrix<Scalar> grouped_input;                              ///< T·k×d: the cached input, grouped
  Matrix<Scalar> grouped_d_output;                           ///< T·k×d: ∂L/∂y grouped, then times g
  Vector<Scalar> gate_of_row;                                ///< T·k: the combine weight g of each grouped row
  Matrix<Scalar> d_grouped_input;                            ///< T·k×d: ∂L/∂x of each grouped row
  Vector<Scalar> d_gate_of_row;                              ///< T·k: ⟨∂L/∂y, E(x)⟩ per grouped row
  RoutingGradientT routing_gradient;                         ///< ∂L/∂(the router's outputs)
  Matrix<Scalar> shared_d_output;                            ///< T×d: ∂L/∂y, then times the shared expert's gate
  Matrix<Scalar> shared_d_input;                             ///< T×d: ∂L/∂x through the shared expert
  Vector<Scalar> shared_d_gate;                              ///< T: ∂L/∂(the shared expert's gate)
  ExpertBankBackwardWorkspace<Scalar> experts;               ///< scratch of the routed experts' ExpertBank::backward
  ExpertBankBackwardWorkspace<Scalar> shared;                ///< scratch of the shared expert's bank (its companion)

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    return static_cast<std::size_t>(grouped_input.size() + grouped_d_output.size() + gate_of_row.size() +
                                    d_grouped_input.size() + d_gate_of_row.size() + shared_d_output.size() +
                                    shared_d_input.size() + shared_d_gate.size()) *
               sizeof(Scalar) +
           experts.bytes() + shared.bytes();
  }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_WORKSPACES_HPP
