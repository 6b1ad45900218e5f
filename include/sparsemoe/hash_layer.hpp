// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_HASH_LAYER_HPP
#define SPARSEMOE_HASH_LAYER_HPP

/// \file hash_layer.hpp
/// The hash MoE layer (Roller et al. 2021): each token goes to k experts fixed by its integer id,
/// y_t = (1/k)·Σ_j E_{h_j(id_t)}(x_t). The router is in router/hash.hpp.

#include "expert.hpp"
#include "planned_experts.hpp"
#include "router/hash.hpp"

#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Sizes (d, h, E, seed of the experts) and the router's options of a HashMoELayer.
struct HashMoEConfig : PlannedLayerSizes {
  HashRouterOptions router;  ///< k (1 ≤ k ≤ E) and the hash seed
};

/// Hash-routed mixture-of-experts layer (Roller et al. 2021, "Hash Layers For Large Sparse
/// Models") over tokens of width d. Token t, with the caller's integer id v_t (e.g. its
/// vocabulary index), goes to the k distinct experts h_1(v_t), …, h_k(v_t) of HashRouter (a
/// fixed hash, or a balanced id → experts table), each with weight 1/k:
///
/// \f[ y_t = \frac{1}{k} \sum_{j=1}^{k} E_{h_j(v_t)}(x_t) \f]
///
/// The routing does not depend on x: there are no router parameters, no router gradient and
/// no balance loss. Backward gives the experts' gradients and ∂x through the experts. The
/// experts run in an ExpertBank (tile-scheduled GEMMs, bitwise identical results for any thread
/// count).
///
/// Cost per forward: O(T·k²) for the hash, 4·T·k·d·h flops in the experts (6·T·k·d·h for
/// SwiGLU); backward about twice the expert part.
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT the expert type (Expert<Scalar_, Act> by default with ReLU, SwiGluExpert, …).
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>>
class HashMoELayer : public PlannedLayerBase<Scalar_, ExpertT, HashRouting<Scalar_>> {
  using Base = PlannedLayerBase<Scalar_, ExpertT, HashRouting<Scalar_>>;
  using Base::bank_;

 public:
  using typename Base::Scalar;
  using typename Base::Result;
  using typename Base::Gradients;
  using typename Base::Workspace;
  /// The router.
  using Router = HashRouter<Scalar>;

  /// Builds the layer: expert i initialised by ExpertT::initialize_uniform with the i-th output
  /// of a splitmix64 generator started at config.seed. Throws std::invalid_argument unless d,
  /// h, E ≥ 1 and 1 ≤ k ≤ E.
  explicit HashMoELayer(const HashMoEConfig& config)
      : Base(config.num_experts, config.input_dim, config.hidden_dim, config.seed),
        router_(config.num_experts, config.router) {}
  /// Experts per token.
  Index k() const { return router_.k(); }

  /** @{ */
  /// The router (set_table() switches it to a balanced table).
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  /** @} */
  /// Every parameter tensor: "expert0.w1", "expert0.b1", … (the router has none).
  std::vector<TensorView<Scalar>> tensors() { return bank_.tensors(); }

  /// Zero gradients shaped like tensors().
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.experts = bank_.make_gradients();
    return gradients;
  }

  /// Forward pass over the T×d batch `input`, whose row t has the integer id token_ids[t] (T
  /// entries, each ≥ 0; below the table's size with a table). Allocates its scratch; use the
  /// overload with a result and a workspace to reuse storage. Throws std::invalid_argument on a
  /// width mismatch, token ids of another length than T, a negative id (naming the position and
  /// the value) or a non-finite input.
  Result forward(ConstMatrixRef<Scalar> input, const Eigen::Ref<const IndexVector>& token_ids,
                 const PlannedForwardOptions& options = {}) const {
    Result result;
    Workspace workspace;
    forward(input, token_ids, options, result, workspace);
    return result;
  }

  /// Forward pass into `result` with scratch from `workspace`; both keep their storage, so a
  /// forward of the same shape and mode allocates nothing.
  void forward(ConstMatrixRef<Scalar> input, const Eigen::Ref<const IndexVector>& token_ids,
               const PlannedForwardOptions& options, Result& result, Workspace& workspace) const {
    const char* function = "sparsemoe::HashMoELayer::forward";
    detail::require(token_ids.size() == input.rows(), function, "token_ids must have one id per input row (",
                    input.rows(), "), got ", token_ids.size());
    detail::planned_forward(
        bank_, input, options, [&](auto& routing) { router_.route(token_ids, routing); }, result, workspace, function);
  }

  /// Backward pass: from a forward that kept its cache and ∂L/∂y (T×d), returns ∂L/∂x (through
  /// the experts: the routing does not depend on x) and ADDS every expert's gradient to
  /// `gradients`. Throws std::invalid_argument, before any work, if the result has no cache or
  /// its parts, d_output or the gradients have shapes other than the forward's.
  Matrix<Scalar> backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients) const {
    Matrix<Scalar> d_input;
    Workspace workspace;
    backward(result, d_output, gradients, d_input, workspace);
    return d_input;
  }

  /// Backward into `d_input` (resized to T×d) with scratch from `workspace`; as above otherwise.
  /// The result must come from this layer's forward: one of another layer with the same shapes
  /// passes the checks (unlike MoELayer, these layers keep no identity in their results).
  void backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients, Matrix<Scalar>& d_input,
                Workspace& workspace) const {
    const char* function = "sparsemoe::HashMoELayer::backward";
    detail::require_shape(result.routing.gates, result.routing.expert_ids.rows(), k(), function,
                          "result.routing.gates");
    detail::require_planned_backward(bank_, result.routing.expert_ids, result.plan, result.cache, d_output,
                                     gradients.experts, function);
    detail::planned_backward(bank_, result.cache, result.plan, result.routing.gates, d_output, workspace,
                             gradients.experts, d_input, static_cast<Matrix<Scalar>*>(nullptr));
  }

 private:
  Router router_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_HASH_LAYER_HPP
