// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_EXPERT_CHOICE_HPP
#define SPARSEMOE_EXPERT_CHOICE_HPP

/// \file expert_choice.hpp
/// The expert-choice MoE layer (Zhou et al. 2022): each expert takes its C best tokens, and
/// y_t = Σ_{i took t} S(t, i)·E_i(x_t). The router is in router/expert_choice.hpp.

#include "expert.hpp"
#include "planned_experts.hpp"
#include "router/expert_choice.hpp"

#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// Sizes (d, h, E, seed) and the router's options of an ExpertChoiceLayer.
struct ExpertChoiceConfig : PlannedLayerSizes {
  ExpertChoiceRouterOptions router;  ///< the capacity factor (or an explicit capacity) C
};

/// Expert-choice mixture-of-experts layer (Zhou et al. 2022, "Mixture-of-Experts with Expert
/// Choice Routing") over tokens of width d:
///
/// \f[ S = \operatorname{softmax}(X W_r), \qquad y_t = \sum_{i:\, t \in \mathrm{top}_C(S_{:,i})} S_{t,i}\, E_i(x_t) \f]
///
/// Each expert takes exactly C tokens (C = ⌈(T/E)·f⌉, capped at T; see ExpertChoiceRouter), so
/// the load is balanced by construction and no balance loss is needed; a token is processed by 0
/// to E experts, and a token that no expert took gets y_t = 0 (routing.unrouted_tokens counts
/// them). The router fills a T×E id matrix (slot i stands for expert i, −1 where not taken), the
/// dispatch plan groups each expert's tokens, and the experts run in an ExpertBank: tile-scheduled
/// GEMMs, bitwise identical results for any thread count.
///
/// Backward is exact: the experts, ∂x through the experts and, through S (the softmax), ∂W_r and
/// ∂x through the router. The selection itself (which tokens) has no gradient.
///
/// Note that expert choice looks at the whole batch: a token's output depends on the other
/// tokens of its batch, so it suits training and batched encoders, not token-by-token decoding.
///
/// Cost per forward: 2·T·d·E flops for the router, 4·E·C·d·h in the experts (6·E·C·d·h for
/// SwiGLU; with f = 2 that is the compute of top-2 token choice); backward about twice that.
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT the expert type (Expert<Scalar_, Act> by default with ReLU, SwiGluExpert, …).
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>>
class ExpertChoiceLayer : public PlannedLayerBase<Scalar_, ExpertT, ExpertChoiceRouting<Scalar_>> {
  using Base = PlannedLayerBase<Scalar_, ExpertT, ExpertChoiceRouting<Scalar_>>;
  using Base::bank_;

 public:
  using typename Base::Scalar;
  using typename Base::Result;
  using typename Base::Gradients;
  using typename Base::Workspace;
  /// The router.
  using Router = ExpertChoiceRouter<Scalar>;

  /// Builds the layer: expert i initialised by ExpertT::initialize_uniform with the i-th output
  /// of a splitmix64 generator started at config.seed, and W_r ~ U(−1/√d, 1/√d) by
  /// ExpertChoiceRouter::initialize_uniform(config.seed) (a zero W_r would make every score 1/E
  /// and every expert take the first C tokens). Throws std::invalid_argument unless d, h, E ≥ 1
  /// and the capacity options are valid.
  explicit ExpertChoiceLayer(const ExpertChoiceConfig& config)
      : Base(config.num_experts, config.input_dim, config.hidden_dim, config.seed),
        router_(config.input_dim, config.num_experts, config.router) {
    router_.initialize_uniform(config.seed);
  }

  /** @{ */
  /// The router (keep the shape of its weight).
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  /** @} */
  /// Every parameter tensor: "router.weight" (d×E), then "expert0.w1", "expert0.b1", … (the
  /// names MoELayer gives a top-k router's and its experts' tensors).
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, "router.", router_.tensors());
    const std::vector<TensorView<Scalar>> experts = bank_.tensors();
    list.insert(list.end(), experts.begin(), experts.end());
    return list;
  }

  /// Zero gradients shaped like tensors().
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.router = router_.make_gradients();
    gradients.experts = bank_.make_gradients();
    return gradients;
  }

  /// Forward pass over the T×d batch `input` (see the class comment). Allocates its scratch;
  /// use the overload with a result and a workspace to reuse storage across calls.
  /// Throws std::invalid_argument on a width mismatch or a non-finite input (naming the row,
  /// the column and the value).
  Result forward(ConstMatrixRef<Scalar> input, const PlannedForwardOptions& options = {}) const {
    Result result;
    Workspace workspace;
    forward(input, options, result, workspace);
    return result;
  }

  /// Forward pass into `result` with scratch from `workspace`; both keep their storage, so a
  /// forward of the same shape and mode allocates nothing.
  void forward(ConstMatrixRef<Scalar> input, const PlannedForwardOptions& options, Result& result,
               Workspace& workspace) const {
    const char* function = "sparsemoe::ExpertChoiceLayer::forward";
    detail::require_shape(router_.weight(), this->input_dim(), this->num_experts(), function, "router.weight");
    detail::planned_forward(
        bank_, input, options, [&](auto& routing) { router_.route(input, routing); }, result, workspace, function);
  }

  /// Backward pass: from a forward that kept its cache and ∂L/∂y (T×d), returns ∂L/∂x and ADDS
  /// ∂L/∂W_r and every expert's gradient to `gradients`. Throws std::invalid_argument, before any
  /// work, if the result has no cache or its parts, d_output or the gradients have shapes other
  /// than the forward's.
  Matrix<Scalar> backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients) const {
    Matrix<Scalar> d_input;
    Workspace workspace;
    backward(result, d_output, gradients, d_input, workspace);
    return d_input;
  }

  /// Backward into `d_input` (resized to T×d) with scratch from `workspace`; as above otherwise.
  /// The result must come from this layer's forward: one of another layer with the same shapes
  /// passes the checks (unlike MoELayer, these layers keep no identity in their results).
  /// Cost: about twice the forward's flops.
  void backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients, Matrix<Scalar>& d_input,
                Workspace& workspace) const {
    const char* function = "sparsemoe::ExpertChoiceLayer::backward";
    const PlannedCache<Scalar>& cache = result.cache;
    const ExpertChoiceRouting<Scalar>& routing = result.routing;
    const Index d = this->input_dim(), experts = this->num_experts();
    detail::require_shape(routing.gates, routing.expert_ids.rows(), experts, function, "result.routing.gates");
    detail::require_shape(router_.weight(), d, experts, function, "router.weight");
    detail::require_shape(gradients.router.weight, d, experts, function, "gradients.router.weight");
    detail::require_planned_backward(bank_, routing.expert_ids, result.plan, cache, d_output, gradients.experts,
                                     function);
    TopKRoutingGradient<Scalar>& upstream = workspace.routing_gradient;
    upstream.set_zero(routing);
    detail::planned_backward(bank_, cache, result.plan, routing.gates, d_output, workspace, gradients.experts, d_input,
                             &upstream.gates);
    router_.backward(routing, cache.input, upstream, gradients.router, d_input);
  }

 private:
  Router router_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_EXPERT_CHOICE_HPP
