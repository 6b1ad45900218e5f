// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_MOE_LAYER_HPP
#define SPARSEMOE_MOE_LAYER_HPP

/// \file moe_layer.hpp
/// The sparsely-gated mixture-of-experts layer y = Σ_{i∈S(x)} g_i(x)·E_i(x) (Shazeer et al. 2017),
/// forward and backward, run as explicit stages: route → group → expert compute → combine.

#include "bf16_experts.hpp"
#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/scratch_pool.hpp"
#include "expert.hpp"
#include "expert_bank.hpp"
#include "gate.hpp"
#include "layer_options.hpp"
#include "layer_router.hpp"
#include "losses.hpp"
#include "packed_experts.hpp"
#include "parameters.hpp"
#include "dispatch.hpp"
#include "forward_result.hpp"
#include "layer_gradients.hpp"
#include "workspaces.hpp"

#include <atomic>
#include <cmath>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

namespace detail {

/// What an MoELayer shares with nobody but itself: its identity (ForwardCache::owner and
/// PackedExperts refer to it weakly) and the workspaces and result buffers of the calls that
/// bring none.
template <typename Scalar, typename RoutingGradientT>
struct LayerScratch {
  ScratchPool<ForwardWorkspace<Scalar>> forward_workspaces;
  ScratchPool<BackwardWorkspace<Scalar, RoutingGradientT>> backward_workspaces;
  /// Buffers of destroyed results; a few suffice for a training loop (one result alive at a time,
  /// per thread), and each is O(T·k·p) scalars.
  ScratchPool<ResultStorage<Scalar>> result_storage{4};
};

}  // namespace detail

/// Sparsely-gated mixture-of-experts layer over tokens of width d: a router (the NoisyTopKGate
/// by default) picks k of E experts per token, and y = Σ_{i∈S(x)} g_i(x)·E_i(x).
///
/// \f[ y = \sum_{i \in S(x)} g_i(x)\, E_i(x), \qquad E_i(x) = \operatorname{act}(x W_{1,i} + b_{1,i})\, W_{2,i} + b_{2,i} \f]
///
/// Forward runs four named stages: route (gate logits, noise, top-k, softmax), group (a stable
/// counting sort puts each expert's tokens into one contiguous block of rows), expert compute (two
/// GEMMs per tile of 128 rows of one expert, OpenMP-parallel, biggest experts first), combine (each
/// output row is the gate-weighted sum of its k expert rows, written by one thread). Tile
/// boundaries depend only on the routing, never on the thread count, so results are bitwise
/// identical for any number of threads. Backward runs the mirror stages: combine_backward (∂y to
/// grouped rows and their gates), compute_experts_backward, group_backward (scatter-add into ∂x)
/// and route_backward (router and losses). Every stage is public and takes and returns its data:
/// an expert-parallel layer inserts its exchange of grouped rows between group and expert compute
/// and between expert compute and combine (and mirrored in backward), and runs the experts it
/// holds as an ExpertBank (expert_bank()), the same kernels, on the rows it receives.
///
/// The layer holds parameters only: forward and backward are const and keep their per-call state
/// in the returned ForwardResult, so one layer can serve several threads at once (while nobody
/// changes its parameters).
///
/// Cost per forward: 4·T·k·d·h flops in the experts (6·T·k·d·h for SwiGLU), 2·T·d·E in the gate
/// (4·T·d·E in training); backward about twice that.
///
/// \code
/// sparsemoe::MoELayer<float> layer({/*d*/ 64, /*h*/ 256, /*E*/ 8, /*k*/ 2});
/// sparsemoe::Matrix<float> x = sparsemoe::Matrix<float>::Random(32, 64);
/// auto result = layer.forward(x);                 // evaluation mode
/// std::cout << result.output.rows() << "\n";      // 32
/// \endcode
///
/// \tparam Scalar_ float or double: parameters, inputs, outputs and gradients.
/// \tparam ExpertT the expert type: Expert<Scalar_, Act> (the default, ReLU), SwiGluExpert<Scalar_>,
///   or a type of yours that models the contract of expert.hpp.
/// \tparam RouterT the router: NoisyTopKGate<Scalar_> (the default, with the CV² losses), one of the
///   top-k routers of router.hpp (with the balance loss and the z-loss), or a type with a
///   RouterTraits specialisation (layer_router.hpp).
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>, typename RouterT = NoisyTopKGate<Scalar_>>
class MoELayer {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type (Expert<Scalar, Act>, SwiGluExpert<Scalar>, or one of yours).
  using ExpertType = ExpertT;
  /// The router type (NoisyTopKGate by default, or a top-k router of router.hpp).
  using RouterType = RouterT;
  /// How the layer talks to its router (layer_router.hpp).
  using Traits = RouterTraits<RouterT>;
  /// The gradients of every parameter, as make_gradients() returns them.
  using Gradients = MoEGradients<Scalar, ExpertT, RouterT>;
  /// What forward returns: ForwardResult over the router's routing and loss records.
  using Result = ForwardResult<Scalar, typename Traits::Routing, typename Traits::Losses>;
  /// Scratch of backward for this router.
  using BackwardWorkspaceType = BackwardWorkspace<Scalar, typename Traits::RoutingGradient>;
  static_assert(std::is_same<typename RouterT::Scalar, Scalar>::value, "RouterT::Scalar must be the layer's Scalar");
  static_assert(std::is_same<typename ExpertT::Scalar, Scalar>::value, "ExpertT::Scalar must be the layer's Scalar");

  /// The expert bank type: the routed experts are one ExpertBank, the shared expert (if any) a
  /// one-expert bank run as its companion.
  using Bank = ExpertBank<Scalar, ExpertT>;
  /// Rows of one expert tile (ExpertBank::row_tile; fixed, so results do not depend on the thread
  /// count).
  static constexpr Index expert_row_tile = Bank::row_tile;
  /// Columns of one weight-gradient tile in backward (ExpertBank::gradient_column_tile).
  static constexpr Index gradient_column_tile = Bank::gradient_column_tile;
  /// A forward without PackedExperts packs the W1 and W2 of each expert that has at least this
  /// many rows into its workspace first (ExpertBank::pack_rows_threshold).
  static constexpr Index pack_rows_threshold = Bank::pack_rows_threshold;
  /// A forward with at most this many grouped rows (T·k), all routed to at most
  /// column_split_max_experts experts, splits expert work by columns, so that all threads stream
  /// the one expert's weights; with two or more experts in use the row tiles already give every
  /// thread weights to stream (ExpertBank::column_split_rows). Fixed by the problem, never by the
  /// thread count, so that results stay bitwise identical for any number of threads.
  static constexpr Index column_split_rows = Bank::column_split_rows;
  /// See column_split_rows: the column split applies when at most this many experts have rows.
  static constexpr Index column_split_max_experts = Bank::column_split_max_experts;
  /// Columns of one tile of the column split (ExpertBank::column_tile).
  static constexpr Index column_tile = Bank::column_tile;

  /// Builds the layer: gate weights zero (the paper's initialisation), expert i initialised by
  /// ExpertT::initialize_uniform with a seed derived from (config.seed, i).
  /// Throws std::invalid_argument unless d, h, E ≥ 1, 1 ≤ k ≤ E and noise_epsilon > 0.
  /// Only for the default router, NoisyTopKGate; with another router it does not compile (pass
  /// the router). A template, so that an explicit instantiation of a layer with another router
  /// (extern_templates.hpp) does not instantiate it.
  template <typename R = RouterT>
  explicit MoELayer(const MoEConfig& config) : MoELayer(config, default_router<R>(config)) {}

  /// Builds the layer around `router` (for example a SoftmaxTopKRouter), which must have the config's d,
  /// E and k; experts as for MoELayer(config). config.noise_epsilon serves NoisyTopKGate only.
  /// Throws std::invalid_argument unless d, h, E ≥ 1, 1 ≤ k ≤ E and the router's sizes match.
  MoELayer(const MoEConfig& config, RouterT router)
      : router_(std::move(router)),
        input_dim_(checked(config).input_dim),
        num_experts_(config.num_experts),
        k_(config.k),
        hidden_dim_(config.hidden_dim),
        scratch_(std::make_shared<Scratch>()) {
    Traits::check_router(router_, config.input_dim, config.num_experts, config.k, "sparsemoe::MoELayer");
    std::uint64_t state = config.seed;
    std::vector<ExpertT> experts;
    experts.reserve(static_cast<std::size_t>(config.num_experts));
    for (Index e = 0; e < config.num_experts; ++e) {
      experts.emplace_back(config.input_dim, config.hidden_dim);
      experts.back().initialize_uniform(detail::splitmix64(state));
    }
    experts_ = Bank(std::move(experts));
    if (config.shared_hidden_dim > 0) {
      std::vector<ExpertT> shared(1, ExpertT(config.input_dim, config.shared_hidden_dim));
      shared.front().initialize_uniform(detail::splitmix64(state));
      shared_ = Bank(std::move(shared));
      if (config.shared_expert_gate) {
        shared_gate_weight_.resize(config.input_dim);
        detail::fill_uniform(shared_gate_weight_.data(), shared_gate_weight_.size(),
                             Scalar(1) / std::sqrt(static_cast<Scalar>(config.input_dim)), detail::splitmix64(state), 0);
      }
    }
  }

  /// A copy has the same parameters and training step but an identity of its own: results and
  /// packed experts of `other` are not accepted by the copy. Its workspace pool starts empty.
  MoELayer(const MoELayer& other)
      : router_(other.router_),
        experts_(other.experts_),
        input_dim_(other.input_dim_),
        num_experts_(other.num_experts_),
        k_(other.k_),
        hidden_dim_(other.hidden_dim_),
        shared_(other.shared_),
        shared_gate_weight_(other.shared_gate_weight_),
        scratch_(std::make_shared<Scratch>()),
        training_step_(other.training_step()) {}

  /// Moving keeps the identity: results and packed experts of `other` are accepted by the new
  /// layer. The moved-from layer may only be assigned to or destroyed.
  MoELayer(MoELayer&& other) noexcept
      : router_(std::move(other.router_)),
        experts_(std::move(other.experts_)),
        input_dim_(other.input_dim_),
        num_experts_(other.num_experts_),
        k_(other.k_),
        hidden_dim_(other.hidden_dim_),
        shared_(std::move(other.shared_)),
        shared_gate_weight_(std::move(other.shared_gate_weight_)),
        scratch_(std::move(other.scratch_)),
        training_step_(other.training_step()) {}

  /// Copies `other`'s parameters and training step; this layer takes a new identity, so that
  /// results made before the assignment are rejected by backward.
  MoELayer& operator=(const MoELayer& other) {
    if (this != &other) *this = MoELayer(other);
    return *this;
  }

  /// Takes `other`'s parameters, training step and identity; results made by this layer before
  /// the assignment are rejected by backward.
  MoELayer& operator=(MoELayer&& other) noexcept {
    if (this == &other) return *this;
    router_ = std::move(other.router_);
    experts_ = std::move(other.experts_);
    input_dim_ = other.input_dim_;
    num_experts_ = other.num_experts_;
    k_ = other.k_;
    hidden_dim_ = other.hidden_dim_;
    shared_ = std::move(other.shared_);
    shared_gate_weight_ = std::move(other.shared_gate_weight_);
    scratch_ = std::move(other.scratch_);
    training_step_.store(other.training_step(), std::memory_order_relaxed);
    return *this;
  }

  ~MoELayer() = default;

  /// Token width d (input and output).
  Index input_dim() const { return input_dim_; }
  /// Hidden width h of each expert.
  Index hidden_dim() const { return hidden_dim_; }
  /// Whether the layer has a shared expert (MoEConfig::shared_hidden_dim > 0).
  bool has_shared_expert() const { return shared_.num_experts() > 0; }
  /// h_s, the shared expert's hidden width (0 without one).
  Index shared_hidden_dim() const { return shared_.hidden_dim(); }
  /** @{ */
  /// The shared expert (throws std::out_of_range without one).
  ExpertT& shared_expert() { return shared_.expert(0); }
  const ExpertT& shared_expert() const { return shared_.expert(0); }
  /** @} */
  /** @{ */
  /// w_shared (d), the shared expert's gate σ(x·w_shared); empty without the gate.
  Vector<Scalar>& shared_expert_gate() { return shared_gate_weight_; }
  const Vector<Scalar>& shared_expert_gate() const { return shared_gate_weight_; }
  /** @} */
  /// Number of experts E.
  Index num_experts() const { return num_experts_; }
  /// Experts chosen per token.
  Index k() const { return k_; }

  /// The noise sample index that the next training-mode forward without ForwardOptions::step
  /// will use. It starts at 0 and each such forward advances it by one (atomically: concurrent
  /// forwards get distinct samples, in the order they reach the layer).
  std::uint64_t training_step() const { return training_step_.load(std::memory_order_relaxed); }
  /// Sets the next training step, e.g. when a run resumes from a checkpoint at step `step`.
  void set_training_step(std::uint64_t step) { training_step_.store(step, std::memory_order_relaxed); }

  /// Frees the workspaces pooled by calls that bring none (forward(input, options) and
  /// backward(result, d_output, gradients) keep them for the next call of the same shape).
  void release_workspaces() const {
    scratch_->forward_workspaces.clear();
    scratch_->backward_workspaces.clear();
    scratch_->result_storage.clear();
  }
  /// Bytes held by the pooled, idle workspaces (and the kept buffers of destroyed results).
  std::size_t pooled_workspace_bytes() const {
    return scratch_->forward_workspaces.bytes() + scratch_->backward_workspaces.bytes() +
           scratch_->result_storage.bytes();
  }

  /// Throws std::invalid_argument naming the first parameter tensor (as tensors() names it,
  /// for example "expert3.w2") that holds a NaN or an infinity. O(E·d·h). pack_experts() runs
  /// it; run it yourself after loading weights from elsewhere or after a suspicious optimizer step.
  void require_finite_parameters() const {
    const char* function = "sparsemoe::MoELayer::require_finite_parameters";
    // tensors() is non-const only because its views are writable; they are only read here.
    for (const TensorView<Scalar>& view : const_cast<MoELayer&>(*this).tensors()) {
      detail::require(Eigen::Map<const Vector<Scalar>>(view.data, view.size()).allFinite(), function, "parameter ",
                      view.name, " holds a non-finite value");
    }
  }

  /** @{ */
  /// The router (keep its parameters' shapes: forward and backward check them).
  RouterT& router() { return router_; }
  const RouterT& router() const { return router_; }
  /** @} */
  /** @{ */
  /// The router, under the name of the default NoisyTopKGate (W_g, W_noise, check_finite).
  RouterT& gate() { return router_; }
  const RouterT& gate() const { return router_; }
  /** @} */
  /** @{ */
  /// Expert `index`, 0 ≤ index < E (std::out_of_range otherwise; keep its shapes: forward and
  /// backward check them).
  ExpertT& expert(Index index) { return experts_.expert(index); }
  const ExpertT& expert(Index index) const { return experts_.expert(index); }
  /** @} */
  /** @{ */
  /// The routed experts as one ExpertBank (the expert-compute stage; keep its experts' shapes).
  Bank& expert_bank() { return experts_; }
  const Bank& expert_bank() const { return experts_; }
  /** @} */

  /// Every parameter tensor: the router's under Traits::prefix (gate.gate_weight,
  /// gate.noise_weight for the default gate; router.weight, router.bias for top-k routers), then
  /// expert0.w1, expert0.b1, …
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, Traits::prefix, router_.tensors());
    append_tensor_views(list, "", experts_.tensors());
    if (has_shared_expert()) append_tensor_views(list, "shared_expert.", shared_.expert(0).tensors());
    if (shared_gate_weight_.size() > 0) list.push_back(make_tensor_view("shared_expert_gate", shared_gate_weight_));
    return list;
  }

  /// Zero gradients shaped like this layer's parameters.
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.router() = Traits::make_gradients(router_);
    gradients.experts = experts_.make_gradients();
    if (has_shared_expert()) gradients.shared_experts.assign(1, ExpertT(input_dim(), shared_hidden_dim()));
    gradients.shared_expert_gate = Vector<Scalar>::Zero(shared_gate_weight_.size());
    return gradients;
  }

  /// Forward pass over the T×d batch `input`. Throws std::invalid_argument on a width mismatch,
  /// on negative or non-finite loss weights, on step ≥ 2^32, on unusable capacity options
  /// (ForwardOptions::capacity: a factor ≤ 0 or not finite), and (with the gate's check_finite)
  /// on non-finite gate logits.
  ///
  /// Scratch memory comes from a pool inside the layer (thread-safe; one workspace per concurrent
  /// call, kept for the next call), and the returned result hands its output and cache buffers
  /// back to the layer when it is destroyed, so a loop over batches of one shape does not fault
  /// in fresh pages on every call; release_workspaces() frees what is pooled.
  ///
  /// \param input T×d, one token per row (T may be 0).
  /// \param options the mode (training: noise and a cache), the noise step, and the loss weights.
  /// \return the output (T×d), the routing, the dispatch plan, the losses and, in training mode
  ///   or with options.keep_cache, the cache that backward needs.
  Result forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options = {}) const {
    Result result;
    if (const auto storage = scratch_->result_storage.take_idle()) {
      result.output.swap(storage->output);
      result.cache.input.swap(storage->cache_input);
      result.cache.pre_activations.swap(storage->pre_activations);
    }
    result.recycler = std::shared_ptr<detail::ScratchPool<detail::ResultStorage<Scalar>>>(scratch_, &scratch_->result_storage);
    const auto workspace = scratch_->forward_workspaces.take();
    forward(input, options, result, *workspace);
    return result;
  }

  /// Forward pass into `result`, with scratch memory from `workspace`; both keep their storage
  /// from call to call, so a forward of the same shape and mode allocates nothing. Evaluation
  /// mode leaves result.cache empty unless options.keep_cache is set.
  void forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result,
               ForwardWorkspace<Scalar>& workspace) const {
    forward_impl(input, options, result, workspace, nullptr);
  }

  /// The experts' current parameters, packed for the GEMM backend (see PackedExperts), for
  /// evaluation-mode forwards. O(E·d·h) time and memory; parallel over experts. Throws
  /// std::invalid_argument naming the tensor if a parameter is not finite (see
  /// require_finite_parameters()) or has been resized.
  PackedExperts<Scalar> pack_experts() const {
    check_parameter_shapes("sparsemoe::MoELayer::pack_experts");
    require_finite_parameters();
    PackedExperts<Scalar> packed = experts_.pack();
    packed.owner_ = scratch_;
    packed.made_by_layer_ = true;
    return packed;
  }

  /// Evaluation-mode forward whose expert GEMMs read `packed` (made by this layer's
  /// pack_experts(), from the weights it should use) instead of the layer's experts; otherwise as
  /// the forward above. Throws std::invalid_argument when options.mode is training (backward
  /// needs the layer's own weights) or when `packed` was not made by this layer.
  void forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result,
               ForwardWorkspace<Scalar>& workspace, const PackedExperts<Scalar>& packed) const {
    const char* function = "sparsemoe::MoELayer::forward";
    detail::require(options.mode == Mode::evaluation && !options.keep_cache, function,
                    "packed experts serve evaluation-mode forwards without a cache only; train (or keep a cache "
                    "for backward) with the layer's own weights");
    bool shapes_match = packed.num_experts() == num_experts();
    for (std::size_t e = 0; shapes_match && e < packed.experts_.size(); ++e) {
      const auto& entry = packed.experts_[e];
      shapes_match = entry.w1.rows() == input_dim() && entry.w1.cols() == pre_activation_width() &&
                     entry.w2.rows() == hidden_dim() && entry.w2.cols() == input_dim();
    }
    detail::require(made_by_this(packed.owner_) && shapes_match, function,
                    "the packed experts were not made by this layer's pack_experts()");
    forward_impl(input, options, result, workspace, &packed);
  }

  /// The routed experts' current weights rounded to bfloat16 (see Bf16Experts), for
  /// evaluation-mode forwards that stream half the weight bytes; float layers only. O(E·d·(p + h))
  /// time, 2·E·d·(p + h) bytes; parallel over experts. Throws std::invalid_argument naming the
  /// tensor if a parameter is not finite (see require_finite_parameters()) or has been resized.
  template <typename E = ExpertT>
  Bf16Experts<E> bf16_experts() const {
    static_assert(std::is_same<E, ExpertT>::value, "bf16_experts() makes bf16 copies of the layer's own experts");
    check_parameter_shapes("sparsemoe::MoELayer::bf16_experts");
    require_finite_parameters();
    Bf16Experts<E> experts(experts_);
    experts.owner_ = scratch_;
    experts.made_by_layer_ = true;
    return experts;
  }

  /// Evaluation-mode forward whose routed experts run on `experts`' bfloat16 weights (made by
  /// this layer's bf16_experts()) with fp32 activations and accumulation (Bf16Experts::forward;
  /// `kernel` picks the AVX-512 or the portable kernel, same results); routing, a shared expert
  /// (fp32, its weights as stored) and combine as the forward above. Throws
  /// std::invalid_argument when options.mode is training or options.keep_cache is set, or when
  /// `experts` was not made by this layer. Cost: as forward(), with 2 bytes per routed weight.
  template <typename E = ExpertT>
  void forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result,
               ForwardWorkspace<Scalar>& workspace, const Bf16Experts<E>& experts,
               Bf16Kernel kernel = Bf16Kernel::automatic) const {
    const char* function = "sparsemoe::MoELayer::forward";
    detail::require(options.mode == Mode::evaluation && !options.keep_cache, function,
                    "bf16 experts serve evaluation-mode forwards without a cache only");
    detail::require(made_by_this(experts.owner_) && experts.num_experts() == num_experts() &&
                        experts.input_dim() == input_dim() && experts.hidden_dim() == hidden_dim() &&
                        experts.pre_activation_width() == pre_activation_width(),
                    function, "the bf16 experts were not made by this layer's bf16_experts()");
    forward_impl(input, options, result, workspace, nullptr, &experts, kernel);
  }

  /// Stage 1, route: the router's decisions for `input` (T×d), into `routing`, with the sample
  /// index options.step (0 when unset; only forward draws from the layer's training step).
  void route(ConstMatrixRef<Scalar> input, const ForwardOptions& options, typename Traits::Routing& routing) const {
    Traits::route(router_, input, options.mode, options.step.value_or(0), routing);
  }

  /// Stage 2, group: grouped row r of `grouped` (T·k×d) is input row plan.token_of_row[r].
  static void group(ConstMatrixRef<Scalar> input, const DispatchPlan& plan, Matrix<Scalar>& grouped) {
    grouped.resize(plan.num_rows(), input.cols());
    detail::parallel_for(plan.num_rows(), static_cast<double>(input.cols()),
                         [&](Index row) { grouped.row(row) = input.row(plan.token_of_row[row]); });
  }

  /// Stage 3, expert compute: `expert_output` (resized to T·k×d) = E_i of every grouped row of
  /// expert i of `grouped_input` (the group stage's rows, laid out by plan.offsets): the routed
  /// ExpertBank's forward (see there for tiles, packing and the column split). When
  /// `pre_activations` is given, it is resized to T·k×p and keeps the pre-activations for
  /// backward. With `packed` (from pack_experts()), the GEMMs read its packed weights and biases.
  ///
  /// This stage sees grouped rows and their layout only, never tokens or slots: an
  /// expert-parallel layer sends the grouped rows to the process that owns each expert between
  /// group and this stage, runs the bank of its own experts on what it receives (ExpertBank), and
  /// sends the outputs back before combine.
  void compute_experts(const DispatchPlan& plan, ConstMatrixRef<Scalar> grouped_input, Matrix<Scalar>* pre_activations,
                       Matrix<Scalar>& expert_output, ForwardWorkspace<Scalar>& workspace,
                       const PackedExperts<Scalar>* packed = nullptr) const {
    experts_.forward(bank_offsets(plan), grouped_input, pre_activations, expert_output, workspace.experts, packed);
  }

  /// Stage 4, combine: output_t (T×d) = Σ_j g(t, j)·expert_output[row of (t, j)], slots in order.
  /// Slots that are not dispatched (row −1) contribute nothing.
  void combine(const Matrix<Scalar>& expert_output, const typename Traits::Routing& routing, const DispatchPlan& plan,
               Matrix<Scalar>& output) const {
    combine_with_shared(expert_output, routing, plan, nullptr, nullptr, output);
  }

 private:
  /// combine, then + s_t·shared_output_t for each token (s_t = shared_gates[t], or 1 when
  /// `shared_gates` is null or empty) when `shared_output` is given: the shared expert is added
  /// unscaled by the routed gates.
  void combine_with_shared(const Matrix<Scalar>& expert_output, const typename Traits::Routing& routing,
                           const DispatchPlan& plan, const Matrix<Scalar>* shared_output,
                           const Vector<Scalar>* shared_gates, Matrix<Scalar>& output) const {
    output.resize(plan.num_tokens, input_dim());
    const bool gated = shared_gates && shared_gates->size() > 0;
    detail::parallel_for(plan.num_tokens, static_cast<double>((plan.k + 1) * input_dim()), [&](Index token) {
      output.row(token).setZero();
      for (Index slot = 0; slot < plan.k; ++slot) {
        const Index row = plan.row_of_slot(token, slot);
        if (row >= 0) output.row(token) += routing.gates(token, slot) * expert_output.row(row);
      }
      if (!shared_output) return;
      if (gated) {
        output.row(token) += (*shared_gates)[token] * shared_output->row(token);
      } else {
        output.row(token) += shared_output->row(token);
      }
    });
  }

 public:

  /// Backward pass: from the result of a forward that kept its cache (training mode, or
  /// ForwardOptions::keep_cache) and ∂L/∂y (T×d), returns ∂L/∂x (T×d) and ADDS the gradient of
  /// L + losses.total() with respect to every parameter to `gradients` (call
  /// gradients.set_zero() to start afresh). The auxiliary losses enter with the weights that
  /// forward used; the training noise is the sample forward drew.
  /// Throws std::invalid_argument, before any work, if the result has no cache, was made by
  /// another layer (or one that no longer exists), or if any of its parts, d_output, the
  /// gradients or the layer's parameters have shapes other than the forward's.
  /// Scratch memory comes from the layer's pool, as for forward(input, options).
  ///
  /// \param forward_result what this layer's forward returned, with its cache.
  /// \param d_output ∂L/∂y of the caller's loss, T×d.
  /// \param gradients where the parameter gradients are ADDED (make_gradients()).
  /// \return ∂(L + losses.total())/∂x, T×d.
  Matrix<Scalar> backward(const Result& forward_result, ConstMatrixRef<Scalar> d_output,
                          Gradients& gradients) const {
    Matrix<Scalar> d_input;
    const auto workspace = scratch_->backward_workspaces.take();
    backward(forward_result, d_output, gradients, d_input, *workspace);
    return d_input;
  }

  /// Backward pass into `d_input` (resized to T×d), with scratch memory from `workspace`; as the
  /// overload above otherwise. Reusing `d_input` and `workspace` across steps of the same shape
  /// saves the allocation (and the page faults) of about T·k·(d + 2·p) + 2·E·d·p scalars per call.
  ///
  /// Runs the backward stages in the mirror order of forward: combine_backward, then (after
  /// grouping the cached input again) compute_experts_backward with the shared expert as the
  /// bank's companion, group_backward (with the shared expert's ∂x and its gate), and
  /// route_backward.
  void backward(const Result& forward_result, ConstMatrixRef<Scalar> d_output, Gradients& gradients,
                Matrix<Scalar>& d_input, BackwardWorkspaceType& workspace) const {
    const char* function = "sparsemoe::MoELayer::backward";
    const ForwardCache<Scalar>& cache = forward_result.cache;
    const typename Traits::Routing& routing = forward_result.routing;
    const DispatchPlan& plan = forward_result.plan;
    check_forward_result(forward_result, function);
    const Index tokens = cache.input.rows();
    detail::require_shape(d_output, tokens, input_dim(), function, "d_output");
    check_gradients(gradients, function);

    const bool shared = has_shared_expert();
    const bool gated = shared_gate_weight_.size() > 0;
    combine_backward_with_shared(d_output, routing, plan, workspace.grouped_d_output, workspace.gate_of_row,
                                 shared ? &workspace.shared_d_output : nullptr);
    group(cache.input, plan, workspace.grouped_input);
    if (shared) {
      const Eigen::Matrix<Index, 2, 1> shared_offsets(0, tokens);  // one expert over all T tokens
      const typename Bank::BackwardCompanion companion{&shared_,
                                                       shared_offsets,
                                                       cache.input,
                                                       cache.shared_pre_activations,
                                                       workspace.shared_d_output,
                                                       forward_result.shared_gates,
                                                       &workspace.shared_d_input,
                                                       &workspace.shared_d_gate,
                                                       &gradients.shared_experts,
                                                       &workspace.shared};
      experts_.backward(bank_offsets(plan), workspace.grouped_input, cache.pre_activations, workspace.grouped_d_output,
                        workspace.gate_of_row, workspace.d_grouped_input, workspace.d_gate_of_row, gradients.experts,
                        workspace.experts, companion);
    } else {
      compute_experts_backward(plan, workspace.grouped_input, cache.pre_activations, workspace.grouped_d_output,
                               workspace.gate_of_row, workspace.d_grouped_input, workspace.d_gate_of_row,
                               gradients.experts, workspace.experts);
      workspace.shared_d_gate.resize(0);
    }
    group_backward_with_shared(plan, workspace.d_grouped_input, shared ? &workspace.shared_d_input : nullptr,
                               gated ? &forward_result.shared_gates : nullptr, gated ? &workspace.shared_d_gate : nullptr,
                               d_input);
    if (gated) {  // ∂w_shared += Xᵀ·∂z, each entry summed over the tokens in order
      detail::parallel_for(input_dim(), static_cast<double>(2 * tokens), [&](Index column) {
        Scalar sum = 0;
        for (Index token = 0; token < tokens; ++token) sum += cache.input(token, column) * workspace.shared_d_gate[token];
        gradients.shared_expert_gate[column] += sum;
      });
    }
    route_backward(cache.input, routing, forward_result.losses, plan, workspace.d_gate_of_row,
                   workspace.routing_gradient, gradients.router(), d_input);
  }

  /// Backward stage 1, combine backward (the mirror of combine): for every grouped row r of
  /// (token t, slot j), grouped_d_output row r = ∂L/∂y_t (resized to T·k×d) and gate_of_row[r] =
  /// g(t, j) (resized to T·k). Slots without a row get nothing. O(T·k·d) copies, parallel over
  /// tokens. Throws std::invalid_argument unless d_output is T×d.
  ///
  /// What this stage writes is what an expert-parallel layer sends to the process that owns each
  /// row's expert before compute_experts_backward (the gates travel with the rows).
  void combine_backward(ConstMatrixRef<Scalar> d_output, const typename Traits::Routing& routing,
                        const DispatchPlan& plan, Matrix<Scalar>& grouped_d_output, Vector<Scalar>& gate_of_row) const {
    detail::require_shape(d_output, plan.num_tokens, input_dim(), "sparsemoe::MoELayer::combine_backward", "d_output");
    combine_backward_with_shared(d_output, routing, plan, grouped_d_output, gate_of_row, nullptr);
  }

  /// Backward stage 2, expert backward: the routed ExpertBank's backward over the grouped rows
  /// (see ExpertBank::backward). From the group stage's `grouped_input`, the pre-activations that
  /// forward kept, and combine_backward's grouped_d_output (scaled in place by the gates) and
  /// gate_of_row: d_grouped_input (resized to T·k×d), d_gate_of_row (⟨∂L/∂y, E(x)⟩ per row) and
  /// the experts' gradients, ADDED to `expert_gradients` (E experts, e.g. gradients.experts),
  /// accumulated from the grouped rows only: no tokens, no slots. An expert-parallel layer runs it
  /// (through its own ExpertBank) on the rows it received and sends d_grouped_input and
  /// d_gate_of_row back.
  void compute_experts_backward(const DispatchPlan& plan, ConstMatrixRef<Scalar> grouped_input,
                                ConstMatrixRef<Scalar> pre_activations, MatrixRef<Scalar> grouped_d_output,
                                const Eigen::Ref<const Vector<Scalar>>& gate_of_row, Matrix<Scalar>& d_grouped_input,
                                Vector<Scalar>& d_gate_of_row, std::vector<ExpertT>& expert_gradients,
                                ExpertBankBackwardWorkspace<Scalar>& workspace) const {
    experts_.backward(bank_offsets(plan), grouped_input, pre_activations, grouped_d_output, gate_of_row,
                      d_grouped_input, d_gate_of_row, expert_gradients, workspace);
  }

  /// Backward stage 3, group backward (the mirror of group, a scatter-add): d_input (resized to
  /// T×d) row t = 0 + Σ_j d_grouped_input[row of (t, j)], slots in order, over the dispatched
  /// slots (a token without any gets 0). One thread per token, so the sum order is fixed.
  static void group_backward(const DispatchPlan& plan, ConstMatrixRef<Scalar> d_grouped_input,
                             Matrix<Scalar>& d_input) {
    detail::require(d_grouped_input.rows() == plan.num_rows(), "sparsemoe::MoELayer::group_backward",
                    "d_grouped_input has ", d_grouped_input.rows(), " rows, the plan ", plan.num_rows());
    group_backward_impl(plan, d_grouped_input, nullptr, nullptr, nullptr, nullptr, d_input);
  }

  /// Backward stage 4, route backward: ∂L/∂(the router's outputs), into `routing_gradient` (set
  /// here), is the gradient of the auxiliary losses (with the weights forward used) plus
  /// d_gate_of_row[r] at (t, j) of every grouped row r; the router's backward then ADDS ∂L/∂x
  /// into `d_input` (T×d, as group_backward left it) and ∂L/∂(its parameters) into
  /// `router_gradients` (e.g. gradients.router()). `input` is the forward's T×d input.
  ///
  /// With experts on several processes, d_gate_of_row must be back on the tokens' process
  /// before this stage; the losses' statistics are the only part that needs the global batch.
  void route_backward(ConstMatrixRef<Scalar> input, const typename Traits::Routing& routing,
                      const typename Traits::Losses& losses, const DispatchPlan& plan,
                      const Vector<Scalar>& d_gate_of_row, typename Traits::RoutingGradient& routing_gradient,
                      typename Traits::Gradients& router_gradients, Matrix<Scalar>& d_input) const {
    detail::require(d_gate_of_row.size() == plan.num_rows(), "sparsemoe::MoELayer::route_backward",
                    "d_gate_of_row has ", d_gate_of_row.size(), " entries, the plan ", plan.num_rows(), " rows");
    routing_gradient.set_zero(routing);
    Traits::losses_backward(routing, losses, routing_gradient);
    for (Index row = 0; row < plan.num_rows(); ++row) {
      routing_gradient.gates(plan.token_of_row[row], plan.slot_of_row[row]) += d_gate_of_row[row];
    }
    Traits::backward(router_, routing, input, routing_gradient, router_gradients, d_input);
  }

 private:
  /// combine_backward, and with `shared_d_output` also ∂L/∂y into it (resized to T×d), for the
  /// shared expert's backward.
  void combine_backward_with_shared(const ConstMatrixRef<Scalar>& d_output, const typename Traits::Routing& routing,
                                    const DispatchPlan& plan, Matrix<Scalar>& grouped_d_output,
                                    Vector<Scalar>& gate_of_row, Matrix<Scalar>* shared_d_output) const {
    grouped_d_output.resize(plan.num_rows(), input_dim());
    gate_of_row.resize(plan.num_rows());
    if (shared_d_output) shared_d_output->resize(plan.num_tokens, input_dim());
    detail::parallel_for(plan.num_tokens, static_cast<double>((plan.k + 1) * input_dim()), [&](Index token) {
      for (Index slot = 0; slot < plan.k; ++slot) {
        const Index row = plan.row_of_slot(token, slot);
        if (row < 0) continue;
        grouped_d_output.row(row) = d_output.row(token);
        gate_of_row[row] = routing.gates(token, slot);
      }
      if (shared_d_output) shared_d_output->row(token) = d_output.row(token);
    });
  }

  /// group_backward, then for each token + the shared expert's ∂x row (when `shared_d_input` is
  /// given) and, with the shared expert's gate s = σ(x·w_shared) (`shared_gates`, `shared_d_gate`
  /// holding ∂L/∂s on entry), + ∂L/∂(x·w_shared)·w_shared, where ∂L/∂(x·w_shared) = ∂L/∂s·s·(1 − s)
  /// replaces ∂L/∂s in shared_d_gate (for ∂w_shared).
  void group_backward_with_shared(const DispatchPlan& plan, const Matrix<Scalar>& d_grouped_input,
                                  const Matrix<Scalar>* shared_d_input, const Vector<Scalar>* shared_gates,
                                  Vector<Scalar>* shared_d_gate, Matrix<Scalar>& d_input) const {
    group_backward_impl(plan, d_grouped_input, shared_d_input, shared_gates, shared_gates ? &shared_gate_weight_ : nullptr,
                        shared_d_gate, d_input);
  }

  static void group_backward_impl(const DispatchPlan& plan, const ConstMatrixRef<Scalar>& d_grouped_input,
                                  const Matrix<Scalar>* shared_d_input, const Vector<Scalar>* shared_gates,
                                  const Vector<Scalar>* shared_gate_weight, Vector<Scalar>* shared_d_gate,
                                  Matrix<Scalar>& d_input) {
    const Index width = d_grouped_input.cols();
    d_input.resize(plan.num_tokens, width);
    detail::parallel_for(plan.num_tokens, static_cast<double>(plan.k * width), [&](Index token) {
      d_input.row(token).setZero();  // then 0 + r₀ + r₁ + …: bitwise r₀ + r₁ + …
      for (Index slot = 0; slot < plan.k; ++slot) {
        const Index row = plan.row_of_slot(token, slot);
        if (row >= 0) d_input.row(token) += d_grouped_input.row(row);
      }
      if (shared_d_input) d_input.row(token) += shared_d_input->row(token);
      if (shared_gates) {
        const Scalar gate = (*shared_gates)[token];
        const Scalar d_logit = (*shared_d_gate)[token] * gate * (Scalar(1) - gate);
        (*shared_d_gate)[token] = d_logit;
        d_input.row(token) += d_logit * shared_gate_weight->transpose();
      }
    });
  }

  /// The forward of every overload: `packed` (fp32 packed weights) or, when Bf16 is not void,
  /// `bf16` (bfloat16 weights, run by `kernel`) replace the routed experts' weights.
  template <typename Bf16 = void>
  void forward_impl(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result,
                    ForwardWorkspace<Scalar>& workspace, const PackedExperts<Scalar>* packed,
                    const Bf16* bf16 = nullptr, Bf16Kernel kernel = Bf16Kernel::automatic) const {
    const char* function = "sparsemoe::MoELayer::forward";
    detail::require(input.cols() == input_dim(), function, "input must have ", input_dim(),
                    " columns (the layer's input_dim), got ", input.rows(), "x", input.cols());
    check_parameter_shapes(function);
    if (options.capacity) detail::check_capacity_options(*options.capacity, function);
    const bool training = options.mode == Mode::training;
    const bool keep_cache = training || options.keep_cache;
    // The cache becomes usable only when this call has completed: a throw below (non-finite
    // logits, bad weights) must not leave an earlier call's cache behind for backward.
    ForwardCache<Scalar>& cache = result.cache;
    cache.owner.reset();
    std::uint64_t step = 0;
    if (training) {
      step = options.step ? *options.step : training_step_.fetch_add(1, std::memory_order_relaxed);
    }
    result.step = step;
    Traits::route(router_, input, options.mode, step, result.routing);
    if (options.capacity) {
      build_dispatch_plan(result.routing.expert_ids, result.routing.gates, num_experts(), *options.capacity,
                          result.plan);
    } else {
      build_dispatch_plan(result.routing.expert_ids, num_experts(), result.plan);
    }
    Traits::compute_losses(result.routing, options, result.losses);
    result.plan.stats.auxiliary_loss = static_cast<double>(result.losses.total());
    group(input, result.plan, workspace.grouped_input);
    const bool shared = has_shared_expert();
    if (keep_cache) {
      cache.input = input;
      cache.pre_activations.resize(result.plan.num_rows(), pre_activation_width());
      cache.shared_pre_activations.resize(shared ? input.rows() : 0, shared_.pre_activation_width());
    } else {
      cache.input.resize(0, 0);
      cache.pre_activations.resize(0, 0);
      cache.shared_pre_activations.resize(0, 0);
    }
    result.shared_gates.resize(shared_gate_weight_.size() > 0 ? input.rows() : 0);
    if (result.shared_gates.size() > 0) {
      detail::parallel_for(input.rows(), static_cast<double>(2 * input_dim()), [&](Index token) {
        result.shared_gates[token] = sigmoid(input.row(token).dot(shared_gate_weight_.transpose()));
      });
    }
    Matrix<Scalar>* pre_activations = keep_cache ? &cache.pre_activations : nullptr;
    if constexpr (!std::is_void<Bf16>::value) {
      bf16->forward(bank_offsets(result.plan), workspace.grouped_input, workspace.expert_output, workspace.bf16,
                    kernel);
      if (shared) {
        const Eigen::Matrix<Index, 2, 1> shared_offsets(0, input.rows());
        shared_.forward(shared_offsets, input, nullptr, workspace.shared_output, workspace.shared);
      }
    } else if (shared) {
      // The shared expert: a one-expert bank over all T tokens, its tiles first in the schedule.
      const Eigen::Matrix<Index, 2, 1> shared_offsets(0, input.rows());
      const typename Bank::ForwardCompanion companion{
          &shared_, shared_offsets, input, keep_cache ? &cache.shared_pre_activations : nullptr,
          &workspace.shared_output, &workspace.shared};
      experts_.forward(bank_offsets(result.plan), workspace.grouped_input, pre_activations, workspace.expert_output,
                       workspace.experts, packed, companion);
    } else {
      compute_experts(result.plan, workspace.grouped_input, pre_activations, workspace.expert_output, workspace,
                      packed);
    }
    combine_with_shared(workspace.expert_output, result.routing, result.plan, shared ? &workspace.shared_output : nullptr,
                        &result.shared_gates, result.output);
    if (keep_cache) cache.owner = scratch_;
  }

  // MoELayer(config)'s router: a NoisyTopKGate with zero weights.
  template <typename R>
  static R default_router(const MoEConfig& config) {
    static_assert(std::is_same<R, NoisyTopKGate<Scalar>>::value,
                  "MoELayer(config) builds the default NoisyTopKGate; pass the router: MoELayer(config, router)");
    if constexpr (std::is_same<R, NoisyTopKGate<Scalar>>::value) {
      return R(checked(config).input_dim, config.num_experts, config.k, static_cast<Scalar>(config.noise_epsilon),
               config.seed);
    } else {
      std::terminate();  // unreachable: the static_assert above has failed
    }
  }

  static const MoEConfig& checked(const MoEConfig& config) {
    const char* function = "sparsemoe::MoELayer";
    detail::require(config.input_dim >= 1, function, "input_dim must be >= 1, got ", config.input_dim);
    detail::require(config.hidden_dim >= 1, function, "hidden_dim must be >= 1, got ", config.hidden_dim);
    detail::require(config.num_experts >= 1, function, "num_experts must be >= 1, got ", config.num_experts);
    detail::require(config.k >= 1 && config.k <= config.num_experts, function, "k must be in [1, num_experts = ",
                    config.num_experts, "], got ", config.k);
    detail::require(config.shared_hidden_dim >= 0, function, "shared_hidden_dim must be >= 0, got ",
                    config.shared_hidden_dim);
    detail::require(!config.shared_expert_gate || config.shared_hidden_dim > 0, function,
                    "shared_expert_gate needs a shared expert (shared_hidden_dim > 0)");
    return config;
  }

  Index pre_activation_width() const { return experts_.pre_activation_width(); }

  /// Whether `owner` names this layer (and not a layer that is gone, even at the same address).
  bool made_by_this(const std::weak_ptr<const void>& owner) const {
    return scratch_ && !owner.expired() && !owner.owner_before(scratch_) && !scratch_.owner_before(owner);
  }

  /// Throws unless the gate's and every expert's parameters still have the layer's shapes (they
  /// are reachable through non-const references and could have been resized). O(E).
  void check_parameter_shapes(const char* function) const {
    const Index d = input_dim(), experts = num_experts();
    Traits::check_router(router_, d, experts, k(), function);
    experts_.require_expert_shapes(function);
    if (has_shared_expert()) {
      detail::require(shared_.fits(shared_.expert(0)), function, "the shared expert has been resized");
    }
    detail::require(shared_gate_weight_.size() == 0 || shared_gate_weight_.size() == d, function,
                    "the shared expert's gate has ", shared_gate_weight_.size(), " entries, expected ", d);
  }

  /// Throws unless `result` can feed this layer's backward: a kept cache made by this layer, and
  /// a routing, dispatch plan and losses of the cached batch's shape that agree with each other
  /// (every grouped row in its expert's range, (token, slot) ↔ row a bijection; row −1 exactly
  /// where the id is −1 or the plan dropped the slot by capacity, both counts matching the
  /// plan's stats). O(T·k + E),
  /// before any work, so that a stale or edited result can never make backward read out of range.
  void check_forward_result(const Result& result, const char* function) const {
    const ForwardCache<Scalar>& cache = result.cache;
    const std::weak_ptr<const void> nobody;
    const bool never_kept = !cache.owner.owner_before(nobody) && !nobody.owner_before(cache.owner);
    detail::require(!never_kept, function,
                    "the forward result has no cache: run forward with Mode::training (or with "
                    "ForwardOptions::keep_cache) before backward");
    detail::require(made_by_this(cache.owner), function,
                    "the forward result was made by another layer (or by one that no longer exists)");
    check_parameter_shapes(function);
    const Index tokens = cache.input.rows(), experts = num_experts(), k = this->k();
    const Index rows = result.plan.num_rows();
    detail::require_shape(cache.input, tokens, input_dim(), function, "result.cache.input");
    detail::require_shape(cache.shared_pre_activations, has_shared_expert() ? tokens : 0,
                          shared_.pre_activation_width(), function,
                          "result.cache.shared_pre_activations");
    detail::require(result.shared_gates.size() == (shared_gate_weight_.size() > 0 ? tokens : 0), function,
                    "result.shared_gates has ", result.shared_gates.size(), " entries, expected ",
                    shared_gate_weight_.size() > 0 ? tokens : 0);
    const typename Traits::Routing& routing = result.routing;
    Traits::check_routing(router_, routing, result.losses, tokens, function);
    const DispatchPlan& plan = result.plan;
    bool valid = plan.num_tokens == tokens && plan.num_experts == experts && plan.k == k && rows >= 0 &&
                 rows + plan.dropped_slots == tokens * k && plan.tokens_per_expert.size() == experts &&
                 plan.offsets.size() == experts + 1 && plan.token_of_row.size() == rows &&
                 plan.slot_of_row.size() == rows && plan.row_of_token_slot.size() == tokens * k &&
                 static_cast<Index>(plan.capacity_dropped.size()) == tokens * k;
    detail::require(valid, function, "result.plan does not have the shapes of ", tokens, " tokens, ", experts,
                    " experts and k = ", k);
    detail::require_shape(cache.pre_activations, rows, pre_activation_width(), function,
                          "result.cache.pre_activations");
    valid = plan.offsets[0] == 0 && plan.offsets[experts] == rows;
    for (Index e = 0; valid && e < experts; ++e) {
      valid = plan.tokens_per_expert[e] >= 0 && plan.offsets[e + 1] == plan.offsets[e] + plan.tokens_per_expert[e];
    }
    // Every (token, slot) with an expert owns one row of that expert, and the row names it back,
    // unless the plan dropped it by capacity; a slot with id −1 owns none. With rows = T·k −
    // dropped, that makes the map a bijection.
    Index router_dropped = 0, capacity_dropped = 0;
    for (Index token = 0; valid && token < tokens; ++token) {
      for (Index slot = 0; valid && slot < k; ++slot) {
        const Index expert = routing.expert_ids(token, slot);
        const Index row = plan.row_of_slot(token, slot);
        const bool over_capacity = plan.dropped_by_capacity(token, slot);
        if (expert == -1 || over_capacity) {
          valid = row == -1 && (expert == -1 ? !over_capacity : expert >= 0 && expert < experts);
          ++(expert == -1 ? router_dropped : capacity_dropped);
          continue;
        }
        valid = expert >= 0 && expert < experts && row >= plan.offsets[expert] && row < plan.offsets[expert + 1] &&
                plan.token_of_row[row] == token && plan.slot_of_row[row] == slot;
      }
    }
    detail::require(valid && router_dropped == plan.stats.router_dropped_slots &&
                        capacity_dropped == plan.stats.capacity_dropped_slots &&
                        router_dropped + capacity_dropped == plan.dropped_slots,
                    function, "result.plan and result.routing disagree (was the result edited?)");
  }

  void check_gradients(Gradients& gradients, const char* function) const {
    Traits::check_gradients(router_, gradients.router(), function);
    detail::require(static_cast<Index>(gradients.experts.size()) == num_experts(), function, "gradients has ",
                    gradients.experts.size(), " experts, the layer ", num_experts());
    for (const ExpertT& expert : gradients.experts) {
      detail::require(experts_.fits(expert), function, "an expert gradient is ", expert.input_dim(),
                      "x", expert.hidden_dim(), " or has resized tensors, expected ", input_dim(), "x", hidden_dim());
    }
    detail::require(static_cast<Index>(gradients.shared_experts.size()) == shared_.num_experts() &&
                        (!has_shared_expert() || shared_.fits(gradients.shared_experts.front())),
                    function, "the shared expert's gradient does not have the shared expert's shapes");
    detail::require(gradients.shared_expert_gate.size() == shared_gate_weight_.size(), function,
                    "gradients.shared_expert_gate has ", gradients.shared_expert_gate.size(), " entries, expected ",
                    shared_gate_weight_.size());
  }

  using Scratch = detail::LayerScratch<Scalar, typename Traits::RoutingGradient>;

  RouterT router_;
  Bank experts_;  ///< the E routed experts
  Index input_dim_ = 0;
  Index num_experts_ = 0;
  Index k_ = 0;
  Index hidden_dim_ = 0;
  Bank shared_;                          ///< none or one always-on expert (a bank of 0 or 1)
  Vector<Scalar> shared_gate_weight_;    ///< w_shared (d), or empty: no gate on the shared expert
  /// Identity (never shared with another layer) and the workspace pool.
  std::shared_ptr<Scratch> scratch_;
  /// Next training step; forward (const) advances it, atomically.
  mutable std::atomic<std::uint64_t> training_step_{0};
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_MOE_LAYER_HPP
