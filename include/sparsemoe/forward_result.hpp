// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_FORWARD_RESULT_HPP
#define SPARSEMOE_FORWARD_RESULT_HPP

/// \file forward_result.hpp
/// What MoELayer::forward returns (ForwardResult) and keeps for backward (ForwardCache).

#include "config.hpp"
#include "detail/scratch_pool.hpp"
#include "dispatch.hpp"
#include "gate.hpp"
#include "losses.hpp"

#include <cstdint>
#include <memory>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// What a forward keeps for backward (training mode, or ForwardOptions::keep_cache). Memory:
/// T·d + T·k·p scalars (p = h, or 2h for SwiGLU); empty otherwise.
template <typename Scalar>
struct ForwardCache {
  /// Identity of the layer that made this cache, set only when its forward completed. It never
  /// matches a layer other than that one (nor one built later at the same address).
  std::weak_ptr<const void> owner;
  Matrix<Scalar> input;              ///< T×d copy of the input
  Matrix<Scalar> pre_activations;    ///< T·k×p, grouped rows: x·W1 + b1 of each routed token
  Matrix<Scalar> shared_pre_activations;  ///< T×p_s: x·W1 + b1 of the shared expert (empty without one)

  /// Whether this cache cannot feed a backward pass (no completed forward kept it, or its layer
  /// is gone).
  bool empty() const { return owner.expired(); }
  /// Bytes held by the input copy and the pre-activations.
  std::size_t bytes() const { return static_cast<std::size_t>(input.size() + pre_activations.size()) * sizeof(Scalar); }
};

namespace detail {

/// The big buffers of a ForwardResult made by MoELayer::forward(input, options), kept after the
/// result is destroyed for the next such call (buffers above glibc's mmap threshold, 32 MiB,
/// would otherwise come back as fresh pages, each faulted in on first touch).
template <typename Scalar>
struct ResultStorage {
  Matrix<Scalar> output;
  Matrix<Scalar> cache_input;
  Matrix<Scalar> pre_activations;
  std::size_t bytes() const {
    return static_cast<std::size_t>(output.size() + cache_input.size() + pre_activations.size()) * sizeof(Scalar);
  }
};

}  // namespace detail

/// Everything a forward pass returns. RoutingT and LossesT are the router's records
/// (RouterTraits): for the default NoisyTopKGate, Routing and AuxiliaryLosses; for the top-k
/// routers of router.hpp, TopKRouting and TopKRouterLosses (MoELayer::Result names the type).
template <typename Scalar, typename RoutingT = Routing<Scalar>, typename LossesT = AuxiliaryLosses<Scalar>>
struct ForwardResult {
  Matrix<Scalar> output;             ///< T×d: y = Σ_{i∈S(x)} g_i(x)·E_i(x)
  RoutingT routing;                  ///< the router's decisions (O(T·E))
  DispatchPlan plan;                 ///< grouped rows per expert (tokens_per_expert, offsets, capacity drops, stats, …)
  LossesT losses;                    ///< the auxiliary loss terms; losses.total() is what backward differentiates
  ForwardCache<Scalar> cache;        ///< for backward; empty in evaluation mode
  std::uint64_t step = 0;            ///< the noise sample index used (training mode; 0 otherwise)
  /// T: σ(x·w_shared) of each token, the shared expert's gate (MoEConfig::shared_expert_gate);
  /// empty without it.
  Vector<Scalar> shared_gates;
  /// Set by MoELayer::forward(input, options) only: where the output and cache buffers go when
  /// this result is destroyed, for that layer's next such call (nothing if the layer is gone).
  std::weak_ptr<detail::ScratchPool<detail::ResultStorage<Scalar>>> recycler;

  /// An empty result, to pass to the forward overloads that write into one.
  ForwardResult() = default;
  /** @{ */
  /// Member-wise copies and moves; a copy also hands its buffers to the same layer's pool when
  /// destroyed.
  ForwardResult(const ForwardResult&) = default;
  ForwardResult(ForwardResult&&) noexcept = default;
  ForwardResult& operator=(const ForwardResult&) = default;
  ForwardResult& operator=(ForwardResult&&) noexcept = default;
  /** @} */
  /// Gives the output and cache buffers to the pool of the layer that made this result through
  /// MoELayer::forward(input, options), if that layer still exists; frees them otherwise.
  ~ForwardResult() {
    const auto pool = recycler.lock();
    if (!pool || (output.size() == 0 && cache.pre_activations.size() == 0)) return;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
#endif
      auto storage = std::make_unique<detail::ResultStorage<Scalar>>();
      storage->output.swap(output);
      storage->cache_input.swap(cache.input);
      storage->pre_activations.swap(cache.pre_activations);
      pool->give_back(std::move(storage));
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    } catch (...) {
      // No memory for the small holder: the buffers are freed as usual.
    }
#endif
  }

  /// Rows each expert received (E entries; after capacity when ForwardOptions::capacity is set).
  const IndexVector& tokens_per_expert() const { return plan.tokens_per_expert; }
  /// Routing telemetry: capacity, max/mean rows per expert, slots dropped by the router and by
  /// capacity (per expert), the auxiliary loss total (RoutingStats).
  const RoutingStats& stats() const { return plan.stats; }
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_FORWARD_RESULT_HPP
