// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISTRIBUTED_HPP
#define SPARSEMOE_DISTRIBUTED_HPP

/// \file distributed.hpp
/// Expert parallelism over MPI: DistributedMoELayer, an MoE layer whose E experts are spread
/// over the P ranks of a communicator while every rank keeps its own tokens and a replica of the
/// router, with the all-to-all exchanges of distributed/exchange.hpp between grouping and
/// combining. Not included by sparsemoe.hpp: it needs MPI (link the CMake target sparsemoe::mpi).

#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "dispatch.hpp"
#include "distributed/collectives.hpp"
#include "distributed/exchange.hpp"
#include "distributed/losses.hpp"
#include "expert.hpp"
#include "expert_bank.hpp"
#include "layer_options.hpp"
#include "layer_router.hpp"
#include "moe_layer.hpp"
#include "parameters.hpp"
#include "router.hpp"
#include "router/softmax_top_k.hpp"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup distributed
/// @{

/// What DistributedMoELayer::forward returns on one rank, and everything its backward needs:
/// this rank's output and routing, the exchange plan, the global losses and, in training mode
/// (or with ForwardOptions::keep_cache), the cache.
template <typename Scalar>
struct DistributedForwardResult {
  Matrix<Scalar> output;              ///< T×d, this rank's tokens: y = Σ_{i∈S(x)} g_i(x)·E_i(x)
  TopKRouting<Scalar> routing;        ///< the router's decisions for this rank's tokens
  DispatchPlan plan;                  ///< this rank's grouped rows over the E global experts
  ExpertExchangePlan exchange;        ///< who sent how many rows to whom (and this rank's expert rows)
  DistributedTopKLosses<Scalar> losses;  ///< the auxiliary losses of the GLOBAL batch (the same on every rank)
  std::uint64_t step = 0;             ///< the training step used (training mode; 0 otherwise)
  bool cached = false;                ///< whether the cache below is complete (backward needs it)
  Matrix<Scalar> input;               ///< cache: T×d copy of this rank's input
  Matrix<Scalar> expert_input;        ///< cache: R×d, the rows this rank's experts received
  Matrix<Scalar> pre_activations;     ///< cache: R×p, x·W1 + b1 of those rows
  Vector<Scalar> shared_gates;        ///< T: σ(x·w_shared) of each token (gated shared expert); else empty
  Matrix<Scalar> shared_pre_activations;  ///< cache: T×p_s, the shared expert's x·W1 + b1 (with one)

  /// Rows each of this rank's experts processed (local expert order), from all ranks.
  Index rows_of_local_expert(Index expert) const { return exchange.offsets[expert + 1] - exchange.offsets[expert]; }
};

/// Gradients of the parameters one rank holds: the replicated router's (the base,
/// RouterTraits<RouterT>::Gradients; after backward the same sum over all ranks on every rank)
/// and this rank's experts'.
template <typename Scalar, typename ExpertT, typename RouterT>
struct DistributedMoEGradients : RouterTraits<RouterT>::Gradients {
  /// The router's parameter gradients, the base of this struct.
  using RouterGradientsType = typename RouterTraits<RouterT>::Gradients;
  std::vector<ExpertT> experts;  ///< ∂L/∂ this rank's experts, local order (global id = first_expert + index)
  Index first_expert = 0;        ///< global id of experts[0]
  /// ∂L/∂ the replicated shared expert (none or one), summed over the ranks like the router's.
  std::vector<ExpertT> shared_experts;
  Vector<Scalar> shared_expert_gate;  ///< ∂L/∂w_shared (d; empty without the gate), summed over the ranks

  /// The router's gradients (the base).
  RouterGradientsType& router() { return *this; }

  /// The router's tensors under RouterTraits::prefix, then expert{global id}.w1, … of this
  /// rank's experts: the names of DistributedMoELayer::tensors() (and of MoELayer::tensors()).
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, RouterTraits<RouterT>::prefix, RouterGradientsType::tensors());
    for (std::size_t e = 0; e < experts.size(); ++e) {
      append_tensor_views(list, "expert" + std::to_string(first_expert + static_cast<Index>(e)) + ".",
                          experts[e].tensors());
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

/// Scratch memory of DistributedMoELayer's forward and backward, reusable across calls: calls of
/// the same shapes allocate nothing in the layer's own buffers. Not shared between threads.
template <typename Scalar, typename ExpertT, typename RouterT>
struct DistributedWorkspace {
  Matrix<Scalar> grouped;          ///< local rows×d: the input (forward) or ∂L/∂y (backward) grouped
  Matrix<Scalar> staging;          ///< scratch of the exchanges
  Matrix<Scalar> expert_input;     ///< R×d: the received rows when no cache is kept
  Matrix<Scalar> expert_rows;      ///< R×d: expert outputs (forward), ∂L/∂y then ∂L/∂x rows (backward)
  Matrix<Scalar> expert_d_input;   ///< R×d: ∂L/∂x of the received rows
  Matrix<Scalar> local_rows;       ///< local rows×d: what came back
  Vector<Scalar> gate_of_row;      ///< local rows: the gate of each row
  Vector<Scalar> expert_gates;     ///< R: the gates of the received rows
  Vector<Scalar> expert_d_gates;   ///< R: ⟨∂L/∂y, E(x)⟩ of the received rows
  Vector<Scalar> d_gate_of_row;    ///< local rows: the same, back home
  typename ExpertBank<Scalar, ExpertT>::ForwardWorkspace bank_forward;    ///< the experts' forward scratch
  typename ExpertBank<Scalar, ExpertT>::BackwardWorkspace bank_backward;  ///< the experts' backward scratch
  typename RouterTraits<RouterT>::RoutingGradient routing_gradient;      ///< ∂L/∂(the router's outputs)
  typename RouterTraits<RouterT>::Gradients router_gradient;             ///< this rank's share of the router's gradient
  Matrix<Scalar> shared_output;    ///< T×d: the shared expert's output (without its gate)
  Matrix<Scalar> shared_d_output;  ///< T×d: ∂L/∂y for the shared expert (then times its gate)
  Matrix<Scalar> shared_d_input;   ///< T×d: ∂L/∂x through the shared expert
  Vector<Scalar> shared_d_gate;    ///< T: ∂L/∂(the shared gate), then ∂L/∂(x·w_shared)
  typename ExpertBank<Scalar, ExpertT>::ForwardWorkspace shared_forward;    ///< the shared expert's scratch
  typename ExpertBank<Scalar, ExpertT>::BackwardWorkspace shared_backward;  ///< the shared expert's scratch
  std::vector<ExpertT> shared_share;  ///< this rank's share of the shared expert's gradient
  Vector<Scalar> shared_gate_share;   ///< this rank's share of ∂L/∂w_shared
  std::vector<Scalar> reduced;     ///< the replicated parameters' gradients, flattened for the sum over ranks
  std::vector<Scalar> reduce_scratch;  ///< scratch of sum_over_ranks
  /// Seconds spent inside the exchanges (MPI_Wtime around plan_expert_exchange,
  /// exchange_to_experts and exchange_from_experts, waiting for other ranks included), ADDED by
  /// every forward and backward: zero it to measure a span (bench/bench_distributed.cpp).
  double exchange_seconds = 0;
  /// Bytes this rank sent to OTHER ranks in those exchanges (its rows for itself and the count
  /// tables left out), added likewise.
  std::uint64_t exchange_bytes_sent = 0;
};

/// An expert-parallel MoE layer over the P ranks of an MPI communicator: y = Σ_{i∈S(x)} g_i(x)·E_i(x)
/// for each rank's own tokens, where expert i lives on rank ExpertPlacement::owner(i) (contiguous
/// blocks of ⌊E/P⌋ or ⌈E/P⌉ experts; E need not be a multiple of P) and every rank holds the
/// same router.
///
/// Forward on each rank: route the rank's T tokens with its replica of the router → the losses of
/// the global batch (distributed_topk_losses) → group the (token, slot) rows by expert (the
/// DispatchPlan over the E global experts) → send each rank the rows of its experts
/// (plan_expert_exchange, exchange_to_experts) → the rank's experts run over the rows they
/// received (ExpertBank: the same tiles and kernels as MoELayer) → send the results back
/// (exchange_from_experts) → combine in fixed (token, slot) order. Backward runs the same two
/// exchanges the other way: ∂L/∂y rows and their gates go to the experts, ∂L/∂x rows and
/// ⟨∂L/∂y, E(x)⟩ come back; each expert's gradient stays on its rank; the router's gradient is
/// summed over the ranks in rank order (sum_over_ranks), so every replica gets the same bits.
///
/// Equal to one process: with the same MoEConfig and router, the P ranks together compute what one
/// MoELayer computes for the concatenated batch (rank 0's tokens, then rank 1's, …). Every expert
/// receives its rows in the order that MoELayer groups them, so the outputs, ∂L/∂x and the expert
/// gradients are bitwise those of one process when every rank's token count is a multiple of 64
/// (the router's row tile); otherwise the router's GEMMs see a shorter last tile than one process
/// does, which the GEMM kernels may round differently, and those values differ in the last bits
/// (see the guide on expert parallelism). The losses and the router's
/// gradient are sums over ranks, equal up to the order of the additions. Bitwise identical for
/// any OpenMP thread count per rank, and independent of message timing.
///
/// Collective: construction, forward and backward must be called by every rank of the
/// communicator, in the same order. Arguments are checked on every rank and the ranks agree
/// before any exchange: a bad argument on one rank makes every rank throw
/// std::invalid_argument, never a deadlock. The communicator is duplicated (MPI_Comm_dup) and
/// owned: the layer's messages never mix with the caller's. MPI is called only from the thread
/// that calls forward or backward, never inside an OpenMP region (MPI_THREAD_FUNNELED suffices);
/// unlike MoELayer, one layer must not run forwards or backwards from several threads at once,
/// since their collectives would interleave on the one communicator.
///
/// Routers: the top-k routers whose route() fills a TopKRouting (SoftmaxTopKRouter,
/// SigmoidTopKRouter, SwitchRouter, GShardRouter), with the balance and z-losses of the global
/// batch (tested with SoftmaxTopKRouter, SigmoidTopKRouter, SwitchRouter and GShardRouter).
/// Random decisions of a router (Switch's input jitter, GShard's sampling) are keyed by the
/// GLOBAL token row: each forward passes the exclusive prefix sum of the ranks' token counts
/// (one MPI_Exscan) as RouteOptions::token_offset, so a training step draws what one process
/// draws for the concatenated batch. Expert capacity
/// (ForwardOptions::capacity) is global: C comes from the global token count and the slots that
/// are dropped are those one process drops for the concatenated batch (DropPolicy::by_position
/// and by_slot_then_position). A shared expert (MoEConfig::shared_hidden_dim, with its optional
/// gate) is replicated like the router: each rank runs it on its own tokens and its gradient is
/// summed over the ranks. Not yet supported: DropPolicy::by_probability, and the NoisyTopKGate
/// (its routing is not a TopKRouting and its importance and smooth-load losses would need a
/// distributed form of their own; its route() already takes the token offset).
///
/// Cost per forward on one rank: the router on T tokens, the experts on the R rows they receive
/// (4·R·d·h flops), one MPI_Exscan of one integer (the token offset), and three all-to-alls:
/// P·⌈E/P⌉ counts, then T·k rows of d scalars out and back (each rank's rows for itself stay in
/// memory but still pass through MPI); backward twice
/// the expert work, four row exchanges (∂y rows, gates, ∂x rows, gate gradients) and one
/// all-gather of the router's d·E (+E) gradient.
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT the expert type (Expert<Scalar_, Act> by default with ReLU, or SwiGluExpert).
/// \tparam RouterT a top-k router (SoftmaxTopKRouter by default).
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>, typename RouterT = SoftmaxTopKRouter<Scalar_>>
class DistributedMoELayer {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type.
  using ExpertType = ExpertT;
  /// The router type.
  using RouterType = RouterT;
  /// How the layer talks to its router (layer_router.hpp).
  using Traits = RouterTraits<RouterT>;
  /// The local experts' bank.
  using Bank = ExpertBank<Scalar, ExpertT>;
  /// What forward returns.
  using Result = DistributedForwardResult<Scalar>;
  /// The gradients of one rank's parameters.
  using Gradients = DistributedMoEGradients<Scalar, ExpertT, RouterT>;
  /// Scratch of forward and backward.
  using Workspace = DistributedWorkspace<Scalar, ExpertT, RouterT>;
  /// The single-process layer, whose static stages (group, group_backward) this layer runs.
  using Stages = MoELayer<Scalar, ExpertT, RouterT>;
  static_assert(std::is_same<typename Traits::Routing, TopKRouting<Scalar>>::value,
                "DistributedMoELayer needs a top-k router (its route() fills a TopKRouting); the NoisyTopKGate is "
                "not supported yet");
  static_assert(std::is_same<typename RouterT::Scalar, Scalar>::value, "RouterT::Scalar must be the layer's Scalar");
  static_assert(std::is_same<typename ExpertT::Scalar, Scalar>::value, "ExpertT::Scalar must be the layer's Scalar");

  /// Builds this rank's part of the layer over a duplicate of `comm`: the router (which must be
  /// the same on every rank: built with the same options and initialised from the same seed) and
  /// this rank's experts, expert i initialised exactly as MoELayer(config, router) initialises its
  /// expert i. Collective over `comm`. Throws std::invalid_argument on every rank unless d, h,
  /// E ≥ 1, 1 ≤ k ≤ E, the router has the config's d, E and k, shared_hidden_dim ≥ 0 (a shared
  /// expert, replicated and initialised as MoELayer's, with shared_expert_gate its gate), and
  /// every rank passed the same config and router parameters.
  DistributedMoELayer(const MoEConfig& config, RouterT router, MPI_Comm comm)
      : owned_comm_(comm), comm_(owned_comm_.get()), router_(std::move(router)) {
    const char* function = "sparsemoe::DistributedMoELayer";
    detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(comm_, &ranks_), "MPI_Comm_size");
    detail::check_on_all_ranks(comm_, function, [&] {
      detail::require(config.input_dim >= 1 && config.hidden_dim >= 1 && config.num_experts >= 1, function,
                      "input_dim, hidden_dim and num_experts must be >= 1, got ", config.input_dim, ", ",
                      config.hidden_dim, ", ", config.num_experts);
      detail::require(config.k >= 1 && config.k <= config.num_experts, function, "k must be in [1, num_experts = ",
                      config.num_experts, "], got ", config.k);
      detail::require(config.shared_hidden_dim >= 0, function, "shared_hidden_dim must be >= 0, got ",
                      config.shared_hidden_dim);
      detail::require(!config.shared_expert_gate || config.shared_hidden_dim > 0, function,
                      "shared_expert_gate needs a shared expert (shared_hidden_dim > 0)");
      Traits::check_router(router_, config.input_dim, config.num_experts, config.k, function);
    });
    input_dim_ = config.input_dim;
    hidden_dim_ = config.hidden_dim;
    k_ = config.k;
    placement_ = ExpertPlacement(config.num_experts, ranks_);
    std::uint64_t state = config.seed;
    std::vector<ExpertT> mine;
    for (Index e = 0; e < config.num_experts; ++e) {
      const std::uint64_t seed = detail::splitmix64(state);
      if (placement_.owner(e) != rank_) continue;
      mine.emplace_back(config.input_dim, config.hidden_dim);
      mine.back().initialize_uniform(seed);
    }
    if (!mine.empty()) bank_ = Bank(std::move(mine));
    if (config.shared_hidden_dim > 0) {  // replicated, initialised as MoELayer initialises it
      std::vector<ExpertT> shared(1, ExpertT(config.input_dim, config.shared_hidden_dim));
      shared.front().initialize_uniform(detail::splitmix64(state));
      shared_ = Bank(std::move(shared));
      if (config.shared_expert_gate) {
        shared_gate_weight_.resize(config.input_dim);
        detail::fill_uniform(shared_gate_weight_.data(), shared_gate_weight_.size(),
                             Scalar(1) / std::sqrt(static_cast<Scalar>(config.input_dim)), detail::splitmix64(state), 0);
      }
    }
    require_replicated(config, function);
  }

  /// Not copyable (the communicator is owned).
  DistributedMoELayer(const DistributedMoELayer&) = delete;
  /// Not copyable (the communicator is owned).
  DistributedMoELayer& operator=(const DistributedMoELayer&) = delete;
  /// Takes `other`'s parameters and communicator; `other` may only be destroyed.
  DistributedMoELayer(DistributedMoELayer&& other) noexcept
      : owned_comm_(std::move(other.owned_comm_)),
        comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        router_(std::move(other.router_)),
        bank_(std::move(other.bank_)),
        shared_(std::move(other.shared_)),
        shared_gate_weight_(std::move(other.shared_gate_weight_)),
        placement_(std::move(other.placement_)),
        rank_(other.rank_),
        ranks_(other.ranks_),
        input_dim_(other.input_dim_),
        hidden_dim_(other.hidden_dim_),
        k_(other.k_),
        training_step_(other.training_step()) {}
  /// Not assignable.
  DistributedMoELayer& operator=(DistributedMoELayer&&) = delete;
  /// Frees the duplicated communicator (MPI must still be initialised).
  ~DistributedMoELayer() = default;

  /// d.
  Index input_dim() const { return input_dim_; }
  /// h.
  Index hidden_dim() const { return hidden_dim_; }
  /// E, over all ranks.
  Index num_experts() const { return placement_.num_experts(); }
  /// Experts per token.
  Index k() const { return k_; }
  /// This rank in the layer's communicator.
  int rank() const { return rank_; }
  /// P.
  int num_ranks() const { return ranks_; }
  /// Which rank holds which expert.
  const ExpertPlacement& placement() const { return placement_; }
  /// Global id of this rank's first expert.
  Index first_local_expert() const { return placement_.first_expert(rank_); }
  /// Experts on this rank.
  Index num_local_experts() const { return placement_.num_local_experts(rank_); }
  /// The layer's own communicator (a duplicate of the one it was built with).
  MPI_Comm communicator() const { return comm_; }
  /** @{ */
  /// The replicated router (change it only identically on every rank).
  RouterT& router() { return router_; }
  const RouterT& router() const { return router_; }
  /** @} */
  /** @{ */
  /// Expert `global_id`, which must be on this rank (std::out_of_range otherwise).
  ExpertT& expert(Index global_id) { return bank_.expert(local_index(global_id)); }
  const ExpertT& expert(Index global_id) const { return bank_.expert(local_index(global_id)); }
  /** @} */
  /// Whether the layer has a (replicated) shared expert.
  bool has_shared_expert() const { return shared_.num_experts() > 0; }
  /** @{ */
  /// The replicated shared expert (std::out_of_range without one; change it only identically on
  /// every rank).
  ExpertT& shared_expert() { return shared_.expert(0); }
  const ExpertT& shared_expert() const { return shared_.expert(0); }
  /** @} */
  /** @{ */
  /// w_shared (d), the replicated gate σ(x·w_shared) of the shared expert; empty without it.
  Vector<Scalar>& shared_expert_gate() { return shared_gate_weight_; }
  const Vector<Scalar>& shared_expert_gate() const { return shared_gate_weight_; }
  /** @} */
  /// The next training step (see MoELayer::training_step()); the same on every rank as long as
  /// every rank runs the same forwards.
  std::uint64_t training_step() const { return training_step_.load(std::memory_order_relaxed); }
  /// Sets the next training step.
  void set_training_step(std::uint64_t step) { training_step_.store(step, std::memory_order_relaxed); }

  /// The router's tensors under Traits::prefix, then this rank's experts as expert{global id}.w1,
  /// …: the names MoELayer::tensors() gives the same parameters. An optimizer over these views
  /// keeps the router replicated when every rank steps it with the same (summed) gradient.
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, Traits::prefix, router_.tensors());
    const std::vector<TensorView<Scalar>> experts = bank_.tensors(first_local_expert());
    list.insert(list.end(), experts.begin(), experts.end());
    if (has_shared_expert()) append_tensor_views(list, "shared_expert.", shared_.expert(0).tensors());
    if (shared_gate_weight_.size() > 0) list.push_back(make_tensor_view("shared_expert_gate", shared_gate_weight_));
    return list;
  }

  /// Zero gradients shaped like this rank's parameters.
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.router() = Traits::make_gradients(router_);
    gradients.experts.assign(static_cast<std::size_t>(num_local_experts()), ExpertT(input_dim_, hidden_dim_));
    gradients.first_expert = first_local_expert();
    if (has_shared_expert()) gradients.shared_experts = shared_.make_gradients();
    gradients.shared_expert_gate = Vector<Scalar>::Zero(shared_gate_weight_.size());
    return gradients;
  }

  /// Forward pass over this rank's T×d batch `input` (T may differ between ranks, and be 0).
  /// Collective. Throws std::invalid_argument on every rank if any rank's input has the wrong
  /// width, a rank's router rejects its input (non-finite logits), options.capacity is unusable
  /// or asks for DropPolicy::by_probability (not supported yet), a loss weight or variant is
  /// unusable, or the ranks passed different options.
  Result forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options = {}) const {
    Result result;
    Workspace workspace;
    forward(input, options, result, workspace);
    return result;
  }

  /// Forward pass into `result`, with scratch memory from `workspace` (both keep their storage).
  void forward(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result, Workspace& workspace) const {
    const char* function = "sparsemoe::DistributedMoELayer::forward";
    const bool keep_cache = options.mode == Mode::training || options.keep_cache;
    result.cached = false;
    std::uint64_t step = 0;
    if (options.mode == Mode::training) {
      step = options.step ? *options.step : training_step_.fetch_add(1, std::memory_order_relaxed);
    }
    result.step = step;
    // The global row of this rank's first token (rank 0's tokens first): it keys the router's
    // random draws, so that they are those of one process on the concatenated batch.
    const std::int64_t local_tokens = input.rows();
    std::int64_t first_token = 0;
    detail::mpi_check(MPI_Exscan(&local_tokens, &first_token, 1, MPI_INT64_T, MPI_SUM, comm_), "MPI_Exscan");
    if (rank_ == 0) first_token = 0;  // MPI leaves rank 0's result undefined
    detail::check_on_all_ranks(comm_, function, [&] {
      detail::require(input.cols() == input_dim_, function, "input must have ", input_dim_,
                      " columns (the layer's input_dim), got ", input.rows(), "x", input.cols());
      if (options.capacity) {
        detail::check_capacity_options(*options.capacity, function);
        detail::require(options.capacity->policy != DropPolicy::by_probability, function,
                        "DropPolicy::by_probability is not supported by the distributed layer yet (it would rank "
                        "the gates of all ranks); use by_position or by_slot_then_position");
      }
      bank_.require_expert_shapes(function);
      Traits::check_router(router_, input_dim_, num_experts(), k_, function);
      Traits::route(router_, input, options.mode, step, result.routing, static_cast<std::uint64_t>(first_token));
      if (options.capacity) {
        detail::count_routed_slots(result.routing.expert_ids, num_experts(), result.plan, function);
      } else {
        build_dispatch_plan(result.routing.expert_ids, num_experts(), result.plan);
      }
    });
    require_same_options(options, function);
    if (options.capacity) plan_with_global_capacity(result.routing.expert_ids, *options.capacity, result.plan);
    distributed_topk_losses(result.routing, options.balance_loss_weight, options.balance_loss, options.z_loss_weight,
                            comm_, result.losses);
    result.plan.stats.auxiliary_loss = static_cast<double>(result.losses.total());
    const DispatchPlan& plan = result.plan;
    Stages::group(input, plan, workspace.grouped);
    timed_exchange(workspace, 0, [&] { plan_expert_exchange(plan, placement_, comm_, result.exchange); });
    Matrix<Scalar>& expert_input = keep_cache ? result.expert_input : workspace.expert_input;
    to_experts(result.exchange, workspace.grouped, expert_input, workspace);
    if (keep_cache) {
      result.input = input;
    } else {
      result.input.resize(0, 0);
      result.pre_activations.resize(0, 0);
    }
    result.shared_gates.resize(shared_gate_weight_.size() > 0 ? input.rows() : 0);
    if (result.shared_gates.size() > 0) {
      detail::parallel_for(input.rows(), static_cast<double>(2 * input_dim_), [&](Index token) {
        result.shared_gates[token] = sigmoid(input.row(token).dot(shared_gate_weight_.transpose()));
      });
    }
    run_bank_forward(result.exchange, expert_input, keep_cache ? &result.pre_activations : nullptr, input,
                     keep_cache ? &result.shared_pre_activations : nullptr, workspace);
    if (!keep_cache || !has_shared_expert()) result.shared_pre_activations.resize(0, 0);
    from_experts(result.exchange, workspace.expert_rows, workspace.local_rows, workspace);
    // Combine, slots in order: output_t = 0 + g_t0·E(x)_0 + g_t1·E(x)_1 + … (+ s_t·shared_t), as MoELayer.
    result.output.resize(plan.num_tokens, input_dim_);
    detail::parallel_for(plan.num_tokens, static_cast<double>((plan.k + 1) * input_dim_), [&](Index token) {
      result.output.row(token).setZero();
      for (Index slot = 0; slot < plan.k; ++slot) {
        const Index row = plan.row_of_slot(token, slot);
        if (row >= 0) result.output.row(token) += result.routing.gates(token, slot) * workspace.local_rows.row(row);
      }
      if (!has_shared_expert()) return;
      if (result.shared_gates.size() > 0) {
        result.output.row(token) += result.shared_gates[token] * workspace.shared_output.row(token);
      } else {
        result.output.row(token) += workspace.shared_output.row(token);
      }
    });
    result.cached = keep_cache;
  }

  /// The rows each of the E experts received in `result`'s forward, summed over all ranks: what
  /// one process's DispatchPlan::tokens_per_expert would be for the concatenated batch, and what
  /// update_selection_bias (DeepSeek-V3's auxiliary-loss-free balancing of SigmoidTopKRouter)
  /// takes, so that every rank applies the same update to its replica. Collective: one
  /// sum_over_ranks of E integers.
  IndexVector tokens_per_expert_over_ranks(const Result& result) const {
    const char* function = "sparsemoe::DistributedMoELayer::tokens_per_expert_over_ranks";
    detail::check_on_all_ranks(comm_, function, [&] {
      detail::require(result.plan.tokens_per_expert.size() == num_experts(), function, "result.plan has ",
                      result.plan.tokens_per_expert.size(), " experts, the layer ", num_experts());
    });
    std::vector<std::int64_t> counts(result.plan.tokens_per_expert.data(),
                                     result.plan.tokens_per_expert.data() + num_experts());
    sum_over_ranks(counts.data(), num_experts(), comm_);
    IndexVector total(num_experts());
    for (Index e = 0; e < num_experts(); ++e) total[e] = static_cast<Index>(counts[static_cast<std::size_t>(e)]);
    return total;
  }

  /// Backward pass: from this rank's forward result (with its cache) and ∂L/∂y of this rank's
  /// tokens (T×d), returns ∂L/∂x of this rank's tokens and ADDS to `gradients` the gradient of
  /// L + losses.total() with respect to this rank's experts and, summed over all ranks (the same
  /// on every rank), the router. Collective. Throws std::invalid_argument on every rank if any
  /// rank's result has no cache or shapes other than its forward's, or its d_output or gradients
  /// have the wrong shapes.
  Matrix<Scalar> backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients) const {
    Matrix<Scalar> d_input;
    Workspace workspace;
    backward(result, d_output, gradients, d_input, workspace);
    return d_input;
  }

  /// Backward pass into `d_input` (resized to T×d), with scratch memory from `workspace`.
  void backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients, Matrix<Scalar>& d_input,
                Workspace& workspace) const {
    const char* function = "sparsemoe::DistributedMoELayer::backward";
    const DispatchPlan& plan = result.plan;
    const TopKRouting<Scalar>& routing = result.routing;
    const Index tokens = result.input.rows();
    detail::check_on_all_ranks(comm_, function, [&] {
      detail::require(result.cached, function,
                      "the forward result has no cache: run forward with Mode::training (or keep_cache) first");
      check_result(result, function);
      detail::require_shape(d_output, tokens, input_dim_, function, "d_output");
      Traits::check_gradients(router_, gradients.router(), function);
      detail::require(static_cast<Index>(gradients.experts.size()) == num_local_experts() &&
                          gradients.first_expert == first_local_expert(),
                      function, "gradients holds ", gradients.experts.size(), " experts from ", gradients.first_expert,
                      ", this rank ", num_local_experts(), " from ", first_local_expert(), " (use make_gradients())");
      for (const ExpertT& expert : gradients.experts) {
        detail::require(num_local_experts() == 0 || bank_.fits(expert), function,
                        "an expert gradient does not have the experts' shapes");
      }
      detail::require(gradients.shared_experts.size() == static_cast<std::size_t>(shared_.num_experts()) &&
                          (!has_shared_expert() || shared_.fits(gradients.shared_experts.front())) &&
                          gradients.shared_expert_gate.size() == shared_gate_weight_.size(),
                      function, "the shared expert's gradients do not have its shapes (use make_gradients())");
    });
    typename Traits::RoutingGradient& routing_gradient = workspace.routing_gradient;
    routing_gradient.set_zero(routing);
    distributed_topk_losses_backward(routing, result.losses, routing_gradient);

    // ∂L/∂y rows and their gates to the experts; ∂L/∂y itself to the shared expert.
    Stages::group(d_output, plan, workspace.grouped);
    if (has_shared_expert()) workspace.shared_d_output = d_output;
    workspace.gate_of_row.resize(plan.num_rows());
    for (Index row = 0; row < plan.num_rows(); ++row) {
      workspace.gate_of_row[row] = routing.gates(plan.token_of_row[row], plan.slot_of_row[row]);
    }
    to_experts(result.exchange, workspace.grouped, workspace.expert_rows, workspace);
    to_experts(result.exchange, workspace.gate_of_row, workspace.expert_gates, workspace);
    run_bank_backward(result, workspace, gradients);
    from_experts(result.exchange, workspace.expert_d_input, workspace.local_rows, workspace);
    from_experts(result.exchange, workspace.expert_d_gates, workspace.d_gate_of_row, workspace);

    for (Index row = 0; row < plan.num_rows(); ++row) {
      routing_gradient.gates(plan.token_of_row[row], plan.slot_of_row[row]) += workspace.d_gate_of_row[row];
    }
    Stages::group_backward(plan, workspace.local_rows, d_input);
    const bool gated = shared_gate_weight_.size() > 0;
    if (has_shared_expert()) {  // + shared ∂x, + ∂L/∂(x·w_shared)·w_shared, in MoELayer's order
      detail::parallel_for(tokens, static_cast<double>(2 * input_dim_), [&](Index token) {
        d_input.row(token) += workspace.shared_d_input.row(token);
        if (!gated) return;
        const Scalar gate = result.shared_gates[token];
        const Scalar d_logit = workspace.shared_d_gate[token] * gate * (Scalar(1) - gate);
        workspace.shared_d_gate[token] = d_logit;
        d_input.row(token) += d_logit * shared_gate_weight_.transpose();
      });
    }
    workspace.shared_gate_share = Vector<Scalar>::Zero(shared_gate_weight_.size());
    if (gated) {  // ∂w_shared share = Xᵀ·∂z over this rank's tokens, in order
      detail::parallel_for(input_dim_, static_cast<double>(2 * tokens), [&](Index column) {
        Scalar sum = 0;
        for (Index token = 0; token < tokens; ++token) sum += result.input(token, column) * workspace.shared_d_gate[token];
        workspace.shared_gate_share[column] = sum;
      });
    }
    // The router: this rank's share into a zeroed gradient, summed over the ranks in rank order.
    typename Traits::Gradients& share = workspace.router_gradient;
    share = Traits::make_gradients(router_);
    Traits::backward(router_, routing, result.input, routing_gradient, share, d_input);
    // The replicated parameters' gradients: router, shared expert, its gate, in one sum over ranks.
    std::vector<TensorView<Scalar>> parts = share.tensors();
    std::vector<TensorView<Scalar>> targets = gradients.router().tensors();
    for (std::size_t i = 0; i < workspace.shared_share.size(); ++i) {
      append_tensor_views(parts, "", workspace.shared_share[i].tensors());
      append_tensor_views(targets, "", gradients.shared_experts[i].tensors());
    }
    if (gated) {
      parts.push_back(make_tensor_view("", workspace.shared_gate_share));
      targets.push_back(make_tensor_view("", gradients.shared_expert_gate));
    }
    add_sum_over_ranks(parts, targets, workspace);
  }

 private:
  /// Runs the exchange `call`, adding its MPI_Wtime span and `bytes` to the workspace's counters.
  template <typename Call>
  static void timed_exchange(Workspace& workspace, std::uint64_t bytes, const Call& call) {
    const double start = MPI_Wtime();
    call();
    workspace.exchange_seconds += MPI_Wtime() - start;
    workspace.exchange_bytes_sent += bytes;
  }

  /// Rows of `counts` (per rank) that go to other ranks than this one.
  std::uint64_t off_rank_rows(const std::vector<int>& counts) const {
    std::uint64_t rows = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) {
      if (static_cast<int>(r) != rank_) rows += static_cast<std::uint64_t>(counts[r]);
    }
    return rows;
  }

  /// exchange_to_experts over the layer's communicator, timed.
  template <typename Rows, typename Output>
  void to_experts(const ExpertExchangePlan& exchange, const Rows& rows, Output& out, Workspace& workspace) const {
    const std::uint64_t bytes = off_rank_rows(exchange.send_counts) * static_cast<std::uint64_t>(rows.cols()) * sizeof(Scalar);
    timed_exchange(workspace, bytes, [&] { exchange_to_experts<Scalar>(exchange, rows, out, workspace.staging, comm_); });
  }

  /// exchange_from_experts over the layer's communicator, timed.
  template <typename Rows, typename Output>
  void from_experts(const ExpertExchangePlan& exchange, const Rows& rows, Output& out, Workspace& workspace) const {
    const std::uint64_t bytes =
        off_rank_rows(exchange.receive_counts) * static_cast<std::uint64_t>(rows.cols()) * sizeof(Scalar);
    timed_exchange(workspace, bytes, [&] { exchange_from_experts<Scalar>(exchange, rows, out, workspace.staging, comm_); });
  }

  Index local_index(Index global_id) const {
    const Index local = global_id - first_local_expert();
    if (global_id < 0 || global_id >= num_experts() || local < 0 || local >= num_local_experts()) {
      SPARSEMOE_THROW(std::out_of_range, detail::message("sparsemoe::DistributedMoELayer::expert: expert ", global_id,
                                                         " is not on rank ", rank_));
    }
    return local;
  }

  /// This rank's experts over the rows they received and, with a shared expert, the shared
  /// expert over this rank's tokens as the bank's companion (as MoELayer runs it); a rank without
  /// experts runs the shared expert alone.
  void run_bank_forward(const ExpertExchangePlan& exchange, const Matrix<Scalar>& expert_input,
                        Matrix<Scalar>* pre_activations, ConstMatrixRef<Scalar> input,
                        Matrix<Scalar>* shared_pre_activations, Workspace& workspace) const {
    const Eigen::Matrix<Index, 2, 1> shared_offsets(0, input.rows());
    if (num_local_experts() == 0) {
      workspace.expert_rows.resize(0, input_dim_);
      if (pre_activations) pre_activations->resize(0, 0);
      if (has_shared_expert()) {
        shared_.forward(shared_offsets, input, shared_pre_activations, workspace.shared_output, workspace.shared_forward);
      }
      return;
    }
    if (!has_shared_expert()) {
      bank_.forward(exchange.offsets, expert_input, pre_activations, workspace.expert_rows, workspace.bank_forward);
      return;
    }
    const typename Bank::ForwardCompanion companion{&shared_,         shared_offsets,           input,
                                                    shared_pre_activations, &workspace.shared_output,
                                                    &workspace.shared_forward};
    bank_.forward(exchange.offsets, expert_input, pre_activations, workspace.expert_rows, workspace.bank_forward,
                  nullptr, companion);
  }

  /// The backward of run_bank_forward: the experts' and the shared expert's (into
  /// workspace.shared_share, zeroed first: it is summed over the ranks afterwards).
  void run_bank_backward(const Result& result, Workspace& workspace, Gradients& gradients) const {
    workspace.shared_share.clear();
    if (has_shared_expert()) workspace.shared_share = shared_.make_gradients();
    const Eigen::Matrix<Index, 2, 1> shared_offsets(0, result.input.rows());
    if (num_local_experts() == 0) {
      workspace.expert_d_input.resize(0, input_dim_);
      workspace.expert_d_gates.resize(0);
      if (has_shared_expert()) {
        shared_.backward(shared_offsets, result.input, result.shared_pre_activations, workspace.shared_d_output,
                         result.shared_gates, workspace.shared_d_input, workspace.shared_d_gate, workspace.shared_share,
                         workspace.shared_backward);
      }
      return;
    }
    if (!has_shared_expert()) {
      bank_.backward(result.exchange.offsets, result.expert_input, result.pre_activations, workspace.expert_rows,
                     workspace.expert_gates, workspace.expert_d_input, workspace.expert_d_gates, gradients.experts,
                     workspace.bank_backward);
      return;
    }
    const typename Bank::BackwardCompanion companion{&shared_,
                                                     shared_offsets,
                                                     result.input,
                                                     result.shared_pre_activations,
                                                     workspace.shared_d_output,
                                                     result.shared_gates,
                                                     &workspace.shared_d_input,
                                                     &workspace.shared_d_gate,
                                                     &workspace.shared_share,
                                                     &workspace.shared_backward};
    bank_.backward(result.exchange.offsets, result.expert_input, result.pre_activations, workspace.expert_rows,
                   workspace.expert_gates, workspace.expert_d_input, workspace.expert_d_gates, gradients.experts,
                   workspace.bank_backward, companion);
  }

  /// Throws unless `result` is shaped like a forward of this layer on this rank (every shape that
  /// backward indexes), so that an edited result never makes backward read out of range.
  void check_result(const Result& result, const char* function) const {
    const Index tokens = result.input.rows();
    const DispatchPlan& plan = result.plan;
    const ExpertExchangePlan& exchange = result.exchange;
    detail::require_shape(result.input, tokens, input_dim_, function, "result.input");
    Traits::check_routing(router_, result.routing, TopKRouterLosses<Scalar>{}, tokens, function);
    detail::require(result.output.rows() == tokens, function, "result.output has ", result.output.rows(),
                    " rows, the cached input ", tokens);
    bool valid = plan.num_tokens == tokens && plan.num_experts == num_experts() && plan.k == k_ &&
                 plan.token_of_row.size() == plan.num_rows() && plan.slot_of_row.size() == plan.num_rows() &&
                 plan.row_of_token_slot.size() == tokens * k_ && exchange.local_rows == plan.num_rows() &&
                 exchange.num_local_experts() == num_local_experts() && exchange.num_ranks == ranks_;
    for (Index row = 0; valid && row < plan.num_rows(); ++row) {
      const Index token = plan.token_of_row[row], slot = plan.slot_of_row[row];
      valid = token >= 0 && token < tokens && slot >= 0 && slot < k_ && plan.row_of_slot(token, slot) == row;
    }
    for (Index i = 0; valid && i < plan.row_of_token_slot.size(); ++i) {
      valid = plan.row_of_token_slot[i] >= -1 && plan.row_of_token_slot[i] < plan.num_rows();
    }
    detail::require(valid, function, "result.plan or result.exchange is not that of this rank's forward");
    const Index rows = exchange.num_expert_rows();
    detail::require_shape(result.expert_input, rows, input_dim_, function, "result.expert_input");
    if (num_local_experts() > 0) {
      detail::require_shape(result.pre_activations, rows, bank_.pre_activation_width(), function,
                            "result.pre_activations");
    }
    detail::require_shape(result.shared_pre_activations, has_shared_expert() ? tokens : 0,
                          has_shared_expert() ? shared_.pre_activation_width() : 0, function,
                          "result.shared_pre_activations");
    detail::require(result.shared_gates.size() == (shared_gate_weight_.size() > 0 ? tokens : 0), function,
                    "result.shared_gates has ", result.shared_gates.size(), " entries");
  }

  /// targets[i] += Σ over ranks of parts[i] (same shapes), all flattened into one sum_over_ranks.
  void add_sum_over_ranks(const std::vector<TensorView<Scalar>>& parts, const std::vector<TensorView<Scalar>>& targets,
                          Workspace& workspace) const {
    std::vector<Scalar>& flat = workspace.reduced;
    flat.clear();
    for (const TensorView<Scalar>& part : parts) flat.insert(flat.end(), part.data, part.data + part.size());
    sum_over_ranks(flat.data(), static_cast<Index>(flat.size()), comm_, workspace.reduce_scratch);
    std::size_t offset = 0;
    for (std::size_t t = 0; t < targets.size(); ++t) {
      Scalar* target = targets[t].data;
      for (Index i = 0; i < targets[t].size(); ++i) target[i] += flat[offset + static_cast<std::size_t>(i)];
      offset += static_cast<std::size_t>(targets[t].size());
    }
  }

  /// Throws std::invalid_argument on every rank unless every rank holds the same config and the
  /// same router parameters (a 64-bit fingerprint of them, compared over the ranks).
  void require_replicated(const MoEConfig& config, const char* function) {
    const Index sizes[] = {config.input_dim, config.hidden_dim, config.num_experts, config.k, config.shared_hidden_dim,
                           static_cast<Index>(config.shared_expert_gate)};
    std::uint64_t hash = detail::fingerprint(sizes, sizeof(sizes));
    hash = detail::fingerprint(&config.seed, sizeof(config.seed), hash);
    for (const TensorView<Scalar>& view : router_.tensors()) {
      hash = detail::fingerprint(view.data, static_cast<std::size_t>(view.size()) * sizeof(Scalar), hash);
    }
    for (const TensorView<Scalar>& view : router_.state()) {
      hash = detail::fingerprint(view.data, static_cast<std::size_t>(view.size()) * sizeof(Scalar), hash);
    }
    hash = detail::fingerprint(shared_gate_weight_.data(), static_cast<std::size_t>(shared_gate_weight_.size()) * sizeof(Scalar),
                               hash);
    detail::require_same_on_all_ranks(comm_, hash, function,
                                      "configs or router parameters (build the router identically on every rank, "
                                      "e.g. initialize_uniform with the same seed)");
  }

  /// Throws std::invalid_argument on every rank unless every rank passed the same forward options
  /// (mode, loss weights and variants, capacity): different ones would make the ranks disagree
  /// on the global losses or take different collective paths.
  void require_same_options(const ForwardOptions& options, const char* function) const {
    const double weights[] = {options.balance_loss_weight, options.z_loss_weight,
                              options.capacity ? options.capacity->factor : -1.0};
    const Index integers[] = {static_cast<Index>(options.mode), static_cast<Index>(options.keep_cache),
                              static_cast<Index>(options.balance_loss.counts), options.balance_loss.sequence_length,
                              static_cast<Index>(options.balance_loss.normalize_scores),
                              options.capacity ? static_cast<Index>(options.capacity->policy) : -1,
                              options.capacity ? static_cast<Index>(options.capacity->rounding) : -1,
                              options.capacity ? options.capacity->min_capacity : -1};
    std::uint64_t hash = detail::fingerprint(weights, sizeof(weights));
    hash = detail::fingerprint(integers, sizeof(integers), hash);
    detail::require_same_on_all_ranks(comm_, hash, function, "forward options (mode, loss weights, capacity)");
  }

  /// The dispatch plan of `ids` under an expert capacity C computed from the GLOBAL token count,
  /// with the drops one process would make for the concatenated batch: the slots that chose
  /// expert e are ranked in the policy's global order (by_position: ranks in order, then tokens,
  /// then slots; by_slot_then_position: slot 0 of every rank's tokens first, …), and each rank
  /// learns from MPI_Exscan and MPI_Allreduce of its per-(slot, expert) counts where its own
  /// slots start in that order. plan.tokens_per_expert must hold the routed counts
  /// (detail::count_routed_slots). Collective: one MPI_Exscan and one MPI_Allreduce of k·E + 1
  /// integers (exact). O(T·k + k·E).
  void plan_with_global_capacity(const IndexMatrix& ids, const CapacityOptions& capacity, DispatchPlan& plan) const {
    const Index experts = num_experts(), k = k_, tokens = plan.num_tokens;
    const auto cells = static_cast<std::size_t>(k * experts);
    std::vector<std::int64_t> local(cells + 1, 0), before(cells + 1, 0), total(cells + 1, 0);
    for (Index token = 0; token < tokens; ++token) {
      for (Index slot = 0; slot < k; ++slot) {
        if (ids(token, slot) >= 0) ++local[static_cast<std::size_t>(slot * experts + ids(token, slot))];
      }
    }
    local[cells] = tokens;
    detail::mpi_check(MPI_Exscan(local.data(), before.data(), static_cast<int>(cells + 1), MPI_INT64_T, MPI_SUM, comm_),
                      "MPI_Exscan");
    if (rank_ == 0) std::fill(before.begin(), before.end(), 0);  // MPI leaves rank 0's result undefined
    detail::mpi_check(MPI_Allreduce(local.data(), total.data(), static_cast<int>(cells + 1), MPI_INT64_T, MPI_SUM, comm_),
                      "MPI_Allreduce");
    const Index limit = expert_capacity(static_cast<Index>(total[cells]), k, experts, capacity);
    plan.stats.capacity = limit;
    // seen[e]: the position, in the policy's global order, of this rank's next slot on expert e.
    std::vector<std::int64_t> seen(static_cast<std::size_t>(experts), 0);
    const auto cell = [&](const std::vector<std::int64_t>& table, Index slot, Index expert) {
      return table[static_cast<std::size_t>(slot * experts + expert)];
    };
    const auto visit = [&](Index token, Index slot) {
      const Index expert = ids(token, slot);
      if (expert < 0) return;
      std::int64_t& position = seen[static_cast<std::size_t>(expert)];
      if (position < limit) {
        ++plan.tokens_per_expert[expert];
      } else {
        detail::drop_by_capacity(plan, token * k + slot, expert);
      }
      ++position;
    };
    plan.tokens_per_expert.setZero();
    if (capacity.policy == DropPolicy::by_position) {
      for (Index e = 0; e < experts; ++e) {
        for (Index slot = 0; slot < k; ++slot) seen[static_cast<std::size_t>(e)] += cell(before, slot, e);
      }
      for (Index token = 0; token < tokens; ++token) {
        for (Index slot = 0; slot < k; ++slot) visit(token, slot);
      }
    } else {  // by_slot_then_position
      for (Index slot = 0; slot < k; ++slot) {
        for (Index e = 0; e < experts; ++e) {
          std::int64_t start = cell(before, slot, e);
          for (Index earlier = 0; earlier < slot; ++earlier) start += cell(total, earlier, e);
          seen[static_cast<std::size_t>(e)] = start;
        }
        for (Index token = 0; token < tokens; ++token) visit(token, slot);
      }
    }
    detail::place_rows(ids, plan);
  }

  detail::OwnedCommunicator owned_comm_;
  MPI_Comm comm_ = MPI_COMM_NULL;  // owned_comm_.get()
  RouterT router_;
  Bank bank_;
  Bank shared_;                        ///< none or one replicated shared expert
  Vector<Scalar> shared_gate_weight_;  ///< w_shared (d), or empty
  ExpertPlacement placement_;
  int rank_ = 0;
  int ranks_ = 0;
  Index input_dim_ = 0;
  Index hidden_dim_ = 0;
  Index k_ = 0;
  mutable std::atomic<std::uint64_t> training_step_{0};
};

/// @}
}  // namespace sparsemoe

// Sharded checkpoints (save_distributed_checkpoint, load_distributed_checkpoint) need the
// safetensors reader (nlohmann/json) and the checkpoints' checksum (xxhash.h, header only):
// included when both are available.
#if __has_include(<nlohmann/json.hpp>) && __has_include(<xxhash.h>)
#include "distributed/checkpoint.hpp"
#endif

#endif  // SPARSEMOE_DISTRIBUTED_HPP
