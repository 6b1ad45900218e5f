// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_MOE_LAYER_HPP
#define SPARSEMOE_MOE_LAYER_HPP

/// \file moe_layer.hpp
/// The sparsely-gated mixture-of-experts layer y = Σ_{i∈S(x)} g_i(x)·E_i(x) (Shazeer et al. 2017),
/// forward and backward, run as explicit stages: route → group → expert compute → combine.

#include "config.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "expert.hpp"
#include "gate.hpp"
#include "layer_options.hpp"
#include "layer_router.hpp"
#include "losses.hpp"
#include "parameters.hpp"
#include "dispatch.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

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

/// A thread-safe stack of idle objects of type T (workspaces, result storage), so that calls
/// which do not bring their own reuse earlier calls' storage. take() hands out an idle object (or
/// a new one) as a Lease, which gives it back when it goes out of scope, also on a throw. The
/// mutex is taken once per hand-out and once per return, never inside a loop. At most
/// `max_idle` objects are kept; one given back beyond that is freed.
template <typename T>
class ScratchPool {
 public:
  /// Exclusive use of one pooled object until destruction.
  class Lease {
   public:
    Lease(ScratchPool& pool, std::unique_ptr<T> object) : pool_(&pool), object_(std::move(object)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (object_) pool_->give_back(std::move(object_));
    }
    T& operator*() const { return *object_; }

   private:
    ScratchPool* pool_;
    std::unique_ptr<T> object_;
  };

  explicit ScratchPool(std::size_t max_idle = static_cast<std::size_t>(-1)) : max_idle_(max_idle) {}

  /// An idle object, or a new one when none is idle.
  Lease take() {
    std::unique_ptr<T> object = take_idle();
    if (!object) object = std::make_unique<T>();
    return Lease(*this, std::move(object));
  }

  /// An idle object, or null when none is idle.
  std::unique_ptr<T> take_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_.empty()) return nullptr;
    std::unique_ptr<T> object = std::move(idle_.back());
    idle_.pop_back();
    return object;
  }

  /// Keeps `object` for a later take(), or frees it when max_idle objects are idle already (or
  /// when the list cannot grow).
  void give_back(std::unique_ptr<T> object) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_.size() >= max_idle_) return;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    try {
      idle_.push_back(std::move(object));
    } catch (...) {
      // Out of memory while growing the list: the object is freed instead of pooled.
    }
#else
    idle_.push_back(std::move(object));
#endif
  }

  /// Frees every idle object.
  void clear() {
    std::vector<std::unique_ptr<T>> released;
    std::lock_guard<std::mutex> lock(mutex_);
    released.swap(idle_);
  }

  /// Bytes held by the idle objects (T::bytes()).
  std::size_t bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t total = 0;
    for (const auto& object : idle_) total += object->bytes();
    return total;
  }

 private:
  std::size_t max_idle_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<T>> idle_;
};

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

namespace detail {

/// A block of consecutive grouped rows of one expert: the unit of parallel expert work.
struct ExpertTile {
  Index expert;
  Index first_row;
  Index rows;
};

/// Tiles of at most `tile_rows` rows per expert, biggest experts first (ties: lower id), so that
/// the last tiles handed out are small. Reuses `expert_order` and `tiles`. O(E log E + tiles).
inline void make_expert_tiles(const DispatchPlan& plan, Index tile_rows, std::vector<Index>& expert_order,
                              std::vector<ExpertTile>& tiles) {
  expert_order.resize(static_cast<std::size_t>(plan.num_experts));
  for (Index e = 0; e < plan.num_experts; ++e) expert_order[static_cast<std::size_t>(e)] = e;
  std::sort(expert_order.begin(), expert_order.end(), [&](Index a, Index b) {
    const Index count_a = plan.tokens_per_expert[a];
    const Index count_b = plan.tokens_per_expert[b];
    return count_a != count_b ? count_a > count_b : a < b;
  });
  tiles.clear();
  for (const Index expert : expert_order) {
    const Index count = plan.tokens_per_expert[expert];
    for (Index first = 0; first < count; first += tile_rows) {
      tiles.push_back({expert, plan.offsets[expert] + first, std::min(tile_rows, count - first)});
    }
  }
}

/// A block of columns of one expert's W1 or W2, over all of the expert's rows: the unit of
/// parallel expert work for small batches.
struct ColumnTile {
  Index expert;
  Index first_column;
  Index columns;
};

/// A block of columns of one expert's weight gradient (of W1 when first_layer, else of W2): the
/// unit of parallel work of the weight-gradient phase of backward.
struct GradientTile {
  Index expert;
  bool first_layer;
  Index first_column;
};

}  // namespace detail

/// Scratch memory of MoELayer::forward, reusable across calls: a forward of the same shape into
/// the same workspace (and the same ForwardResult) allocates nothing. Not shared between threads:
/// give each calling thread its own.
template <typename Scalar>
struct ForwardWorkspace {
  Matrix<Scalar> grouped_input;              ///< T·k×d: each expert's tokens, contiguous
  Matrix<Scalar> expert_output;              ///< T·k×d: E_i of each grouped row
  std::vector<Matrix<Scalar>> hidden;        ///< per OpenMP thread, tile×h
  std::vector<Matrix<Scalar>> pre;           ///< per OpenMP thread, tile×p (evaluation mode)
  std::vector<detail::ExpertTile> tiles;     ///< this call's expert tiles
  std::vector<Index> expert_order;           ///< experts by descending size
  /** @{ */
  /// Per expert, W1 and W2 packed for this call (only for experts with at least
  /// MoELayer::pack_rows_threshold rows, whose GEMMs then stream contiguous panels).
  std::vector<detail::PackedWeight<Scalar>> packed_w1, packed_w2;
  /** @} */
  std::vector<char> packed_this_call;        ///< per expert: packed_w1/w2 hold its current weights
  Matrix<Scalar> split_pre;                  ///< T·k×p, small batches in evaluation mode
  Matrix<Scalar> split_hidden;               ///< T·k×h, small batches
  std::vector<detail::ColumnTile> column_tiles;  ///< small batches: this call's column tiles
  Matrix<Scalar> shared_output;                  ///< T×d: the shared expert's output (without its gate)
  std::vector<Matrix<Scalar>> shared_hidden;     ///< per OpenMP thread, tile×h_s
  std::vector<Matrix<Scalar>> shared_pre;        ///< per OpenMP thread, tile×p_s (no cache kept)

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    std::size_t total = static_cast<std::size_t>(grouped_input.size() + expert_output.size() + shared_output.size());
    for (const auto& block : shared_hidden) total += static_cast<std::size_t>(block.size());
    for (const auto& block : shared_pre) total += static_cast<std::size_t>(block.size());
    for (const auto& block : hidden) total += static_cast<std::size_t>(block.size());
    for (const auto& block : pre) total += static_cast<std::size_t>(block.size());
    total += static_cast<std::size_t>(split_pre.size() + split_hidden.size());
    total *= sizeof(Scalar);
    for (const auto& packed : packed_w1) total += packed.bytes();
    for (const auto& packed : packed_w2) total += packed.bytes();
    return total;
  }
};

/// Scratch memory of MoELayer::backward, reusable across calls of the same shape. Not shared
/// between threads: give each calling thread its own. RoutingGradientT is the router's
/// (RouterTraits::RoutingGradient; MoELayer::BackwardWorkspaceType names the type).
template <typename Scalar, typename RoutingGradientT = GateGradients<Scalar>>
struct BackwardWorkspace {
  Matrix<Scalar> grouped_input;                              ///< T·k×d: the cached input, grouped
  Matrix<Scalar> grouped_d_output;                           ///< T·k×d: ∂L/∂y grouped, then times g
  Matrix<Scalar> hidden;                                     ///< T·k×h: act(pre), recomputed
  Matrix<Scalar> d_pre;                                      ///< T·k×p: ∂L/∂pre
  Matrix<Scalar> d_grouped_input;                            ///< T·k×d: ∂L/∂x of each grouped row
  Vector<Scalar> d_gate_of_row;                              ///< T·k: ⟨∂L/∂y, E(x)⟩ per grouped row
  std::vector<Matrix<Scalar>> d_hidden;                      ///< per OpenMP thread, tile×h
  std::vector<detail::PackedWeight<Scalar>> w1_transposed;   ///< per expert, W1ᵀ packed (p×d)
  std::vector<detail::PackedWeight<Scalar>> w2_transposed;   ///< per expert, W2ᵀ packed (d×h)
  RoutingGradientT routing_gradient;                         ///< ∂L/∂(the router's outputs)
  std::vector<detail::ExpertTile> tiles;                     ///< this call's expert tiles
  std::vector<Index> expert_order;                           ///< experts by descending size
  std::vector<detail::GradientTile> gradient_tiles;          ///< this call's weight-gradient tiles
  Matrix<Scalar> shared_hidden;                              ///< T×h_s: the shared expert's act(pre), recomputed
  Matrix<Scalar> shared_d_output;                            ///< T×d: ∂L/∂y times the shared expert's gate
  Matrix<Scalar> shared_d_pre;                               ///< T×p_s: ∂L/∂pre of the shared expert
  Matrix<Scalar> shared_d_input;                             ///< T×d: ∂L/∂x through the shared expert
  Vector<Scalar> shared_d_gate;                              ///< T: ∂L/∂(the shared expert's gate)
  std::vector<Matrix<Scalar>> shared_d_hidden;               ///< per OpenMP thread, tile×h_s

  /// Bytes held by the matrices and packed weights above.
  std::size_t bytes() const {
    std::size_t total = static_cast<std::size_t>(grouped_input.size() + grouped_d_output.size() + hidden.size() +
                                                  d_pre.size() + d_grouped_input.size() + d_gate_of_row.size() +
                                                  shared_hidden.size() + shared_d_output.size() + shared_d_pre.size() +
                                                  shared_d_input.size() + shared_d_gate.size()) *
                        sizeof(Scalar);
    for (const auto& block : shared_d_hidden) total += static_cast<std::size_t>(block.size()) * sizeof(Scalar);
    for (const auto& block : d_hidden) total += static_cast<std::size_t>(block.size()) * sizeof(Scalar);
    for (const auto& packed : w1_transposed) total += packed.bytes();
    for (const auto& packed : w2_transposed) total += packed.bytes();
    return total;
  }
};

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

template <typename Scalar_, typename ExpertT, typename RouterT>
class MoELayer;

/// A snapshot of every expert's parameters with W1 and W2 in the GEMM backend's packed layout
/// (detail::PackedWeight: contiguous column panels), made by MoELayer::pack_experts() for
/// serving. An evaluation-mode forward that is given it streams each weight panel front to back,
/// which the hardware prefetchers follow: with libxsmm that is worth 1.2–1.7× on small batches
/// whose weights come from memory (bench/NOTES.md). Memory: the experts' parameters once more,
/// E·(2·d·h + h + d) scalars for Expert. It is a copy: after the layer's weights change, pack
/// again. Immutable once made, so any number of threads may use one at once.
template <typename Scalar>
class PackedExperts {
 public:
  /// No experts: pass MoELayer::pack_experts()'s result instead.
  PackedExperts() = default;

  /// Whether this holds nothing usable (default-constructed, or its layer is gone).
  bool empty() const { return owner_.expired(); }
  /// Number of experts held.
  Index num_experts() const { return static_cast<Index>(experts_.size()); }
  /// Bytes of the packed weights and biases.
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const Entry& entry : experts_) {
      total += entry.w1.bytes() + entry.w2.bytes() + static_cast<std::size_t>(entry.b1.size() + entry.b2.size()) *
                                                          sizeof(Scalar);
    }
    return total;
  }

 private:
  template <typename, typename, typename>
  friend class MoELayer;

  struct Entry {
    detail::PackedWeight<Scalar> w1;
    Vector<Scalar> b1;
    detail::PackedWeight<Scalar> w2;
    Vector<Scalar> b2;
  };

  std::weak_ptr<const void> owner_;  // identity of the layer that packed it
  std::vector<Entry> experts_;
};

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
/// identical for any number of threads.
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
  /// Shapes every expert's parameters must keep: p, and the sizes of b1 and b2 (0: no bias).
  struct ExpertShape {
    Index pre_activation_width = 0;
    Index b1_size = 0;
    Index b2_size = 0;
  };

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

  /// Rows of one expert tile (fixed, so results do not depend on the thread count).
  static constexpr Index expert_row_tile = 128;
  /// Columns of one weight-gradient tile in backward.
  static constexpr Index gradient_column_tile = 128;
  /// A forward without PackedExperts packs the W1 and W2 of each expert that has at least this
  /// many rows into its workspace first: packing costs about as much as the GEMMs gain on
  /// ~240 rows (bench/NOTES.md), and fewer rows are better served from the weights as stored.
  static constexpr Index pack_rows_threshold = 256;
  /// A forward with at most this many grouped rows (T·k), all routed to at most
  /// column_split_max_experts experts, splits expert work by columns, so that all threads stream
  /// the one expert's weights (T = 1, k = 1 at d = 1024, h = 4096, packed: 0.92 → 0.50 ms on
  /// 2 threads). With two or more experts in use the row tiles already give every thread weights to
  /// stream, and measured faster on 2 cores (bench/NOTES.md). Fixed by the problem, never by the
  /// thread count, so that results stay bitwise identical for any number of threads.
  static constexpr Index column_split_rows = 256;
  /// See column_split_rows: the column split applies when at most this many experts have rows.
  static constexpr Index column_split_max_experts = 1;
  /// Columns of one tile of the column split (a multiple of the 64-column weight panels).
  static constexpr Index column_tile = 256;

  /// Builds the layer: gate weights zero (the paper's initialisation), expert i initialised by
  /// ExpertT::initialize_uniform with a seed derived from (config.seed, i).
  /// Throws std::invalid_argument unless d, h, E ≥ 1, 1 ≤ k ≤ E and noise_epsilon > 0.
  explicit MoELayer(const MoEConfig& config)
      : MoELayer(config, NoisyTopKGate<Scalar>(checked(config).input_dim, config.num_experts, config.k,
                                               static_cast<Scalar>(config.noise_epsilon), config.seed)) {
    static_assert(std::is_same<RouterT, NoisyTopKGate<Scalar>>::value,
                  "MoELayer(config) builds the default NoisyTopKGate; pass the router: MoELayer(config, router)");
  }

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
    experts_.reserve(static_cast<std::size_t>(config.num_experts));
    for (Index e = 0; e < config.num_experts; ++e) {
      experts_.emplace_back(config.input_dim, config.hidden_dim);
      experts_.back().initialize_uniform(detail::splitmix64(state));
    }
    const ExpertT& first = experts_.front();
    expert_shape_ = {first.pre_activation_width(), first.b1().size(), first.b2().size()};
    if (config.shared_hidden_dim > 0) {
      shared_hidden_dim_ = config.shared_hidden_dim;
      shared_experts_.emplace_back(config.input_dim, config.shared_hidden_dim);
      shared_experts_.back().initialize_uniform(detail::splitmix64(state));
      const ExpertT& shared = shared_experts_.front();
      shared_shape_ = {shared.pre_activation_width(), shared.b1().size(), shared.b2().size()};
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
        expert_shape_(other.expert_shape_),
        shared_experts_(other.shared_experts_),
        shared_hidden_dim_(other.shared_hidden_dim_),
        shared_gate_weight_(other.shared_gate_weight_),
        shared_shape_(other.shared_shape_),
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
        expert_shape_(other.expert_shape_),
        shared_experts_(std::move(other.shared_experts_)),
        shared_hidden_dim_(other.shared_hidden_dim_),
        shared_gate_weight_(std::move(other.shared_gate_weight_)),
        shared_shape_(other.shared_shape_),
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
    expert_shape_ = other.expert_shape_;
    shared_experts_ = std::move(other.shared_experts_);
    shared_hidden_dim_ = other.shared_hidden_dim_;
    shared_gate_weight_ = std::move(other.shared_gate_weight_);
    shared_shape_ = other.shared_shape_;
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
  bool has_shared_expert() const { return !shared_experts_.empty(); }
  /// h_s, the shared expert's hidden width (0 without one).
  Index shared_hidden_dim() const { return shared_hidden_dim_; }
  /** @{ */
  /// The shared expert (throws std::out_of_range without one).
  ExpertT& shared_expert() { return shared_experts_.at(0); }
  const ExpertT& shared_expert() const { return shared_experts_.at(0); }
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
  ExpertT& expert(Index index) { return experts_.at(static_cast<std::size_t>(index)); }
  const ExpertT& expert(Index index) const { return experts_.at(static_cast<std::size_t>(index)); }
  /** @} */

  /// Every parameter tensor: the router's under Traits::prefix (gate.gate_weight,
  /// gate.noise_weight for the default gate; router.weight, router.bias for top-k routers), then
  /// expert0.w1, expert0.b1, …
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, Traits::prefix, router_.tensors());
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      append_tensor_views(list, "expert" + std::to_string(e) + ".", experts_[e].tensors());
    }
    for (auto& shared : shared_experts_) append_tensor_views(list, "shared_expert.", shared.tensors());
    if (shared_gate_weight_.size() > 0) list.push_back(make_tensor_view("shared_expert_gate", shared_gate_weight_));
    return list;
  }

  /// Zero gradients shaped like this layer's parameters.
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.router() = Traits::make_gradients(router_);
    gradients.experts.assign(experts_.size(), ExpertT(input_dim(), hidden_dim()));
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
    PackedExperts<Scalar> packed;
    packed.experts_.resize(experts_.size());
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      const ExpertT& expert = experts_[static_cast<std::size_t>(e)];
      auto& entry = packed.experts_[static_cast<std::size_t>(e)];
      entry.w1 = detail::PackedWeight<Scalar>(expert.w1());
      entry.b1 = expert.b1();
      entry.w2 = detail::PackedWeight<Scalar>(expert.w2());
      entry.b2 = expert.b2();
    });
    packed.owner_ = scratch_;
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

  /// Stage 3, expert compute: workspace.expert_output (T·k×d) = E_i of every grouped row of
  /// expert i, from workspace.grouped_input. When `pre_activations` is given (T·k×p), the
  /// pre-activations are kept there for backward. With `packed` (from pack_experts()), the GEMMs
  /// read its packed weights and biases. Bias and an element-wise activation run on each output
  /// tile of the first GEMM while it is in cache.
  ///
  /// Work is cut into tiles of up to 128 rows of one expert, biggest experts first. A small batch
  /// on a single expert (see column_split_rows) is cut by columns instead: tiles of column_tile
  /// columns of W1 (then, after all of them, of W2), so that every thread streams weights.
  /// Either way the tiles depend on the routing only, never on the thread count.
  void compute_experts(const DispatchPlan& plan, Matrix<Scalar>* pre_activations, ForwardWorkspace<Scalar>& workspace,
                       const PackedExperts<Scalar>* packed = nullptr) const {
    compute_experts_and_shared(plan, pre_activations, workspace, packed, nullptr, nullptr);
  }

 private:
  /// compute_experts, and with `shared_input` (T×d) also the shared expert over every token into
  /// workspace.shared_output (T×d; pre-activations into `shared_pre` when given, T×p_s). Its
  /// tiles (128 tokens each, all of equal size) go first in the same dynamic schedule as the
  /// routed tiles, so that neither waits for the other.
  void compute_experts_and_shared(const DispatchPlan& plan, Matrix<Scalar>* pre_activations,
                                  ForwardWorkspace<Scalar>& workspace, const PackedExperts<Scalar>* packed,
                                  const ConstMatrixRef<Scalar>* shared_input, Matrix<Scalar>* shared_pre) const {
    workspace.expert_output.resize(plan.num_rows(), input_dim());
    detail::make_expert_tiles(plan, expert_row_tile, workspace.expert_order, workspace.tiles);
    pack_large_experts(plan, packed == nullptr, workspace);
    const auto threads = static_cast<std::size_t>(detail::max_threads());
    const Index shared_tiles = shared_input ? detail::tile_count(shared_input->rows(), expert_row_tile) : 0;
    if (shared_input) {
      workspace.shared_output.resize(shared_input->rows(), input_dim());
      workspace.shared_hidden.resize(threads);
      workspace.shared_pre.resize(shared_pre ? 0 : threads);
      for (auto& block : workspace.shared_hidden) block.resize(expert_row_tile, shared_hidden_dim());
      for (auto& block : workspace.shared_pre) block.resize(expert_row_tile, shared_shape_.pre_activation_width);
    }
    const double shared_tile_flops = 2.0 * static_cast<double>(expert_row_tile * input_dim()) *
                                     static_cast<double>(shared_shape_.pre_activation_width + shared_hidden_dim());
    const auto shared_tile = [&](Index tile) {
      const Index first = tile * expert_row_tile;
      const Index rows = std::min(expert_row_tile, shared_input->rows() - first);
      const auto thread = static_cast<std::size_t>(detail::thread_index());
      const ExpertT& shared = shared_experts_.front();
      const ExpertWeights weights{&shared, nullptr, &shared.b1(), nullptr, &shared.b2()};
      auto hidden = workspace.shared_hidden[thread].topRows(rows);
      auto pre = shared_pre ? shared_pre->middleRows(first, rows) : workspace.shared_pre[thread].topRows(rows);
      auto output = workspace.shared_output.middleRows(first, rows);
      first_layer(shared, weights, shared_input->middleRows(first, rows), pre, hidden, 0,
                  shared_shape_.pre_activation_width);
      if (!detail::activation_is_elementwise<ExpertT>::value) shared.activate(pre, hidden);
      second_layer(weights, hidden, output, 0, input_dim());
    };
    const Index experts_used = (plan.tokens_per_expert.array() > 0).count();
    if (plan.num_rows() <= column_split_rows && experts_used <= column_split_max_experts) {
      compute_experts_by_columns(plan, pre_activations, workspace, packed);
      detail::parallel_for_dynamic(shared_tiles, shared_tile_flops, shared_tile);
      return;
    }
    workspace.hidden.resize(threads);
    workspace.pre.resize(pre_activations ? 0 : threads);
    for (auto& block : workspace.hidden) block.resize(expert_row_tile, hidden_dim());
    for (auto& block : workspace.pre) block.resize(expert_row_tile, pre_activation_width());
    const Index routed_tiles = static_cast<Index>(workspace.tiles.size());
    const double work = (tile_flops(plan, 1) + static_cast<double>(shared_tiles) * shared_tile_flops) /
                        static_cast<double>(std::max<Index>(1, routed_tiles + shared_tiles));
    detail::parallel_for_dynamic(shared_tiles + routed_tiles, work, [&](Index index) {
      if (index < shared_tiles) {
        shared_tile(index);
        return;
      }
      const detail::ExpertTile& tile = workspace.tiles[static_cast<std::size_t>(index - shared_tiles)];
      const auto thread = static_cast<std::size_t>(detail::thread_index());
      auto hidden = workspace.hidden[thread].topRows(tile.rows);
      auto pre = pre_activations ? pre_activations->middleRows(tile.first_row, tile.rows)
                                 : workspace.pre[thread].topRows(tile.rows);
      auto output = workspace.expert_output.middleRows(tile.first_row, tile.rows);
      const ExpertT& expert = experts_[static_cast<std::size_t>(tile.expert)];
      const ExpertWeights weights = weights_of(tile.expert, packed, workspace);
      first_layer(expert, weights, workspace.grouped_input.middleRows(tile.first_row, tile.rows), pre, hidden, 0,
                  pre_activation_width());
      if (!detail::activation_is_elementwise<ExpertT>::value) expert.activate(pre, hidden);
      second_layer(weights, hidden, output, 0, input_dim());
    });
  }

 public:
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
  /// Work: per expert, W1ᵀ and W2ᵀ are packed once (detail::PackedWeight); per 128-row tile,
  /// ∂hidden = ∂Y·W2ᵀ, the gate gradient ⟨∂Y, E(x)⟩, ∂pre and ∂X rows; then the weight gradients
  /// in (expert, 128-column) tiles, each reducing over the expert's rows in order.
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

    typename Traits::RoutingGradient& routing_gradient = workspace.routing_gradient;
    routing_gradient.set_zero(routing);
    Traits::losses_backward(routing, forward_result.losses, routing_gradient);

    const Index rows = plan.num_rows();
    group(cache.input, plan, workspace.grouped_input);
    group(d_output, plan, workspace.grouped_d_output);
    workspace.hidden.resize(rows, hidden_dim());
    workspace.d_pre.resize(rows, pre_activation_width());
    workspace.d_grouped_input.resize(rows, input_dim());
    workspace.d_gate_of_row.resize(rows);
    pack_transposed_weights(plan, workspace);

    detail::make_expert_tiles(plan, expert_row_tile, workspace.expert_order, workspace.tiles);
    const auto threads = static_cast<std::size_t>(detail::max_threads());
    workspace.d_hidden.resize(threads);
    for (auto& block : workspace.d_hidden) block.resize(expert_row_tile, hidden_dim());
    const bool shared = has_shared_expert();
    const bool gated = shared_gate_weight_.size() > 0;
    const Index shared_tiles = shared ? detail::tile_count(tokens, expert_row_tile) : 0;
    if (shared) {
      workspace.shared_hidden.resize(tokens, shared_hidden_dim());
      workspace.shared_d_output.resize(tokens, input_dim());
      workspace.shared_d_pre.resize(tokens, shared_shape_.pre_activation_width);
      workspace.shared_d_input.resize(tokens, input_dim());
      workspace.shared_d_hidden.resize(threads);
      for (auto& block : workspace.shared_d_hidden) block.resize(expert_row_tile, shared_hidden_dim());
    }
    workspace.shared_d_gate.resize(gated ? tokens : 0);
    const auto no_epilogue = [](Index, Index, Index, Index) {};
    const Index routed_tiles = static_cast<Index>(workspace.tiles.size());
    const double shared_tile_flops = 4.0 * static_cast<double>(expert_row_tile * input_dim()) *
                                     static_cast<double>(shared_shape_.pre_activation_width + shared_hidden_dim());
    const double work = (2 * tile_flops(plan, 1) + static_cast<double>(shared_tiles) * shared_tile_flops) /
                        static_cast<double>(std::max<Index>(1, routed_tiles + shared_tiles));
    detail::parallel_for_dynamic(shared_tiles + routed_tiles, work, [&](Index index) {
      if (index < shared_tiles) {
        shared_backward_tile(index, cache, forward_result.shared_gates, d_output, workspace);
        return;
      }
      const detail::ExpertTile& tile = workspace.tiles[static_cast<std::size_t>(index - shared_tiles)];
      const auto expert_index = static_cast<std::size_t>(tile.expert);
      const ExpertT& expert = experts_[expert_index];
      auto d_hidden = workspace.d_hidden[static_cast<std::size_t>(detail::thread_index())].topRows(tile.rows);
      auto d_out = workspace.grouped_d_output.middleRows(tile.first_row, tile.rows);
      auto pre = cache.pre_activations.middleRows(tile.first_row, tile.rows);
      auto hidden = workspace.hidden.middleRows(tile.first_row, tile.rows);
      // Unscaled ∂L/∂hidden = dY·W2ᵀ gives both ⟨dY, E(x)⟩ and, times g, the expert's gradient.
      detail::gemm_packed(detail::operand(d_out), workspace.w2_transposed[expert_index], d_hidden.data(),
                          d_hidden.outerStride(), false, no_epilogue);
      expert.activate(pre, hidden);
      for (Index r = 0; r < tile.rows; ++r) {
        const Index row = tile.first_row + r;
        Scalar d_gate = d_hidden.row(r).dot(hidden.row(r));
        if (expert.b2().size() > 0) d_gate += d_out.row(r).dot(expert.b2().transpose());
        workspace.d_gate_of_row[row] = d_gate;
        const Scalar gate = routing.gates(plan.token_of_row[row], plan.slot_of_row[row]);
        d_hidden.row(r) *= gate;
        d_out.row(r) *= gate;
      }
      auto d_pre = workspace.d_pre.middleRows(tile.first_row, tile.rows);
      expert.activation_backward(pre, d_hidden, d_pre);
      detail::gemm_packed(detail::operand(d_pre), workspace.w1_transposed[expert_index],
                          workspace.d_grouped_input.row(tile.first_row).data(), workspace.d_grouped_input.outerStride(),
                          false, no_epilogue);
    });

    accumulate_weight_gradients(plan, cache.input, workspace, gradients);

    for (Index row = 0; row < rows; ++row) {
      routing_gradient.gates(plan.token_of_row[row], plan.slot_of_row[row]) += workspace.d_gate_of_row[row];
    }
    d_input.resize(tokens, input_dim());
    detail::parallel_for(tokens, static_cast<double>(plan.k * input_dim()), [&](Index token) {
      d_input.row(token).setZero();  // then 0 + r₀ + r₁ + …: bitwise r₀ + r₁ + …
      for (Index slot = 0; slot < plan.k; ++slot) {
        const Index row = plan.row_of_slot(token, slot);
        if (row >= 0) d_input.row(token) += workspace.d_grouped_input.row(row);
      }
      if (shared) d_input.row(token) += workspace.shared_d_input.row(token);
      if (gated) {
        // ∂L/∂(x·w_shared) = ∂L/∂s · s·(1 − s); kept in shared_d_gate for ∂w_shared below.
        const Scalar gate = forward_result.shared_gates[token];
        const Scalar d_logit = workspace.shared_d_gate[token] * gate * (Scalar(1) - gate);
        workspace.shared_d_gate[token] = d_logit;
        d_input.row(token) += d_logit * shared_gate_weight_.transpose();
      }
    });
    if (gated) {  // ∂w_shared += Xᵀ·∂z, each entry summed over the tokens in order
      detail::parallel_for(input_dim(), static_cast<double>(2 * tokens), [&](Index column) {
        Scalar sum = 0;
        for (Index token = 0; token < tokens; ++token) sum += cache.input(token, column) * workspace.shared_d_gate[token];
        gradients.shared_expert_gate[column] += sum;
      });
    }
    Traits::backward(router_, routing, cache.input, routing_gradient, gradients.router(), d_input);
  }

 private:
  /// Where one expert's weights come from in this call: packed (from PackedExperts or the
  /// workspace) or, when w1/w2 are null, the expert's own matrices.
  struct ExpertWeights {
    const ExpertT* expert;
    const detail::PackedWeight<Scalar>* w1;
    const Vector<Scalar>* b1;
    const detail::PackedWeight<Scalar>* w2;
    const Vector<Scalar>* b2;
  };

  ExpertWeights weights_of(Index e, const PackedExperts<Scalar>* packed, const ForwardWorkspace<Scalar>& workspace) const {
    const auto index = static_cast<std::size_t>(e);
    const ExpertT& expert = experts_[index];
    if (packed) {
      const auto& entry = packed->experts_[index];
      return {&expert, &entry.w1, &entry.b1, &entry.w2, &entry.b2};
    }
    if (workspace.packed_this_call[index]) {
      return {&expert, &workspace.packed_w1[index], &expert.b1(), &workspace.packed_w2[index], &expert.b2()};
    }
    return {&expert, nullptr, &expert.b1(), nullptr, &expert.b2()};
  }

  /// Columns [first_col, first_col + cols) of pre = input·W1 + b1, and for an element-wise
  /// activation the same columns of hidden = act(pre), each output tile while it is in cache.
  template <typename Input, typename Pre, typename Hidden>
  static void first_layer(const ExpertT& expert, const ExpertWeights& weights, const Input& input, Pre& pre,
                          Hidden& hidden, Index first_col, Index cols) {
    const auto epilogue = [&](Index row, Index rows, Index col, Index width) {
      auto pre_tile = pre.block(row, col, rows, width);
      if (weights.b1->size() > 0) pre_tile.rowwise() += weights.b1->segment(col, width).transpose();
      if (detail::activation_is_elementwise<ExpertT>::value) expert.activate(pre_tile, hidden.block(row, col, rows, width));
    };
    if (input.rows() == 0) return;
    if (weights.w1) {
      detail::gemm_packed(detail::operand(input), *weights.w1, pre.data(), pre.outerStride(), false, epilogue, first_col,
                          cols);
      return;
    }
    detail::gemm(detail::operand(input), detail::operand(expert.w1().middleCols(first_col, cols)),
                 pre.data() + first_col, pre.outerStride(), Scalar(1), false);
    epilogue(0, input.rows(), first_col, cols);
  }

  /// Columns [first_col, first_col + cols) of output = hidden·W2 + b2.
  template <typename Hidden, typename Output>
  static void second_layer(const ExpertWeights& weights, const Hidden& hidden, Output& output, Index first_col,
                           Index cols) {
    const auto epilogue = [&](Index row, Index rows, Index col, Index width) {
      if (weights.b2->size() > 0) {
        output.block(row, col, rows, width).rowwise() += weights.b2->segment(col, width).transpose();
      }
    };
    if (hidden.rows() == 0) return;
    if (weights.w2) {
      detail::gemm_packed(detail::operand(hidden), *weights.w2, output.data(), output.outerStride(), false, epilogue,
                          first_col, cols);
      return;
    }
    detail::gemm(detail::operand(hidden), detail::operand(weights.expert->w2().middleCols(first_col, cols)),
                 output.data() + first_col, output.outerStride(), Scalar(1), false);
    epilogue(0, hidden.rows(), first_col, cols);
  }

  /// compute_experts for small batches: phase 1, tiles (expert, column_tile columns of W1) give
  /// pre and hidden of all the expert's rows; after them (and, for a non-element-wise activation,
  /// an activation pass per expert), phase 2, tiles (expert, column_tile columns of W2).
  void compute_experts_by_columns(const DispatchPlan& plan, Matrix<Scalar>* pre_activations,
                                  ForwardWorkspace<Scalar>& workspace, const PackedExperts<Scalar>* packed) const {
    const Index rows = plan.num_rows();
    workspace.split_hidden.resize(rows, hidden_dim());
    workspace.split_pre.resize(pre_activations ? 0 : rows, pre_activation_width());
    Matrix<Scalar>& pre_all = pre_activations ? *pre_activations : workspace.split_pre;
    auto& tiles = workspace.column_tiles;
    const auto make_tiles = [&](Index width) {
      tiles.clear();
      for (const Index expert : workspace.expert_order) {
        if (plan.tokens_per_expert[expert] == 0) continue;
        for (Index c = 0; c < width; c += column_tile) tiles.push_back({expert, c, std::min(column_tile, width - c)});
      }
    };
    const auto run = [&](Index width, bool first) {
      make_tiles(width);
      detail::parallel_for_dynamic(static_cast<Index>(tiles.size()), tile_flops(plan, tiles.size()), [&](Index index) {
        const detail::ColumnTile& tile = tiles[static_cast<std::size_t>(index)];
        const Index first_row = plan.offsets[tile.expert], count = plan.tokens_per_expert[tile.expert];
        const ExpertWeights weights = weights_of(tile.expert, packed, workspace);
        auto hidden = workspace.split_hidden.middleRows(first_row, count);
        if (first) {
          auto pre = pre_all.middleRows(first_row, count);
          first_layer(*weights.expert, weights, workspace.grouped_input.middleRows(first_row, count), pre, hidden,
                      tile.first_column, tile.columns);
        } else {
          auto output = workspace.expert_output.middleRows(first_row, count);
          second_layer(weights, hidden, output, tile.first_column, tile.columns);
        }
      });
    };
    run(pre_activation_width(), true);
    if (!detail::activation_is_elementwise<ExpertT>::value) {
      // About one operation per pre-activation of the expert's rows.
      const double work = static_cast<double>(rows) * static_cast<double>(pre_activation_width()) /
                          static_cast<double>(num_experts());
      detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
        const Index first_row = plan.offsets[e], count = plan.tokens_per_expert[e];
        experts_[static_cast<std::size_t>(e)].activate(pre_all.middleRows(first_row, count),
                                                       workspace.split_hidden.middleRows(first_row, count));
      });
    }
    run(input_dim(), false);
  }

  /// Packs W1 and W2 of every expert with at least pack_rows_threshold rows into the workspace
  /// (when `enabled`), marking them in workspace.packed_this_call. Parallel over experts.
  void pack_large_experts(const DispatchPlan& plan, bool enabled, ForwardWorkspace<Scalar>& workspace) const {
    const auto experts = experts_.size();
    workspace.packed_this_call.assign(experts, 0);
    if (!enabled) return;
    workspace.packed_w1.resize(experts);
    workspace.packed_w2.resize(experts);
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(pre_activation_width() + hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      if (plan.tokens_per_expert[e] < pack_rows_threshold) return;
      const auto index = static_cast<std::size_t>(e);
      workspace.packed_w1[index].assign(experts_[index].w1(), detail::Op::none);
      workspace.packed_w2[index].assign(experts_[index].w2(), detail::Op::none);
      workspace.packed_this_call[index] = 1;
    });
  }

  void forward_impl(ConstMatrixRef<Scalar> input, const ForwardOptions& options, Result& result,
                    ForwardWorkspace<Scalar>& workspace, const PackedExperts<Scalar>* packed) const {
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
      cache.shared_pre_activations.resize(shared ? input.rows() : 0, shared_shape_.pre_activation_width);
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
    compute_experts_and_shared(result.plan, keep_cache ? &cache.pre_activations : nullptr, workspace, packed,
                               shared ? &input : nullptr,
                               shared && keep_cache ? &cache.shared_pre_activations : nullptr);
    combine_with_shared(workspace.expert_output, result.routing, result.plan, shared ? &workspace.shared_output : nullptr,
                        &result.shared_gates, result.output);
    if (keep_cache) cache.owner = scratch_;
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

  Index pre_activation_width() const { return expert_shape_.pre_activation_width; }

  /// Whether `owner` names this layer (and not a layer that is gone, even at the same address).
  bool made_by_this(const std::weak_ptr<const void>& owner) const {
    return scratch_ && !owner.expired() && !owner.owner_before(scratch_) && !scratch_.owner_before(owner);
  }

  /// Throws unless the gate's and every expert's parameters still have the layer's shapes (they
  /// are reachable through non-const references and could have been resized). O(E).
  void check_parameter_shapes(const char* function) const {
    const Index d = input_dim(), experts = num_experts();
    Traits::check_router(router_, d, experts, k(), function);
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      const ExpertT& expert = experts_[e];
      detail::require(fits(expert, hidden_dim(), expert_shape_), function, "expert ", e, " has been resized: w1 ", expert.w1().rows(), "x",
                      expert.w1().cols(), ", b1 ", expert.b1().size(), ", w2 ", expert.w2().rows(), "x",
                      expert.w2().cols(), ", b2 ", expert.b2().size(), "; the layer needs w1 ", d, "x",
                      expert_shape_.pre_activation_width, ", b1 ", expert_shape_.b1_size, ", w2 ", hidden_dim(), "x",
                      d, ", b2 ", expert_shape_.b2_size);
    }
    if (has_shared_expert()) {
      detail::require(fits(shared_experts_.front(), shared_hidden_dim_, shared_shape_), function,
                      "the shared expert has been resized");
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
                          has_shared_expert() ? shared_shape_.pre_activation_width : 0, function,
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

  /// Average flops of one of `tiles` tiles sharing the expert forward of `plan`'s rows.
  double tile_flops(const DispatchPlan& plan, std::size_t tiles) const {
    const double total = 2.0 * static_cast<double>(plan.num_rows()) * static_cast<double>(input_dim()) *
                         static_cast<double>(pre_activation_width() + hidden_dim());
    return tiles == 0 ? 0.0 : total / static_cast<double>(tiles);
  }

  void check_gradients(Gradients& gradients, const char* function) const {
    Traits::check_gradients(router_, gradients.router(), function);
    detail::require(static_cast<Index>(gradients.experts.size()) == num_experts(), function, "gradients has ",
                    gradients.experts.size(), " experts, the layer ", num_experts());
    for (const ExpertT& expert : gradients.experts) {
      detail::require(fits(expert, hidden_dim(), expert_shape_), function, "an expert gradient is ", expert.input_dim(),
                      "x", expert.hidden_dim(), " or has resized tensors, expected ", input_dim(), "x", hidden_dim());
    }
    detail::require(gradients.shared_experts.size() == shared_experts_.size() &&
                        (!has_shared_expert() || fits(gradients.shared_experts.front(), shared_hidden_dim_, shared_shape_)),
                    function, "the shared expert's gradient does not have the shared expert's shapes");
    detail::require(gradients.shared_expert_gate.size() == shared_gate_weight_.size(), function,
                    "gradients.shared_expert_gate has ", gradients.shared_expert_gate.size(), " entries, expected ",
                    shared_gate_weight_.size());
  }

  /// Whether `expert`'s tensors have the shapes of an expert of this layer with hidden width
  /// `hidden` (every tensor: they are reachable through non-const references).
  bool fits(const ExpertT& expert, Index hidden, const ExpertShape& shape) const {
    return expert.w1().rows() == input_dim() && expert.w1().cols() == shape.pre_activation_width &&
           expert.w2().rows() == hidden && expert.w2().cols() == input_dim() && expert.b1().size() == shape.b1_size &&
           expert.b2().size() == shape.b2_size;
  }

  /// Backward of the shared expert over tokens [128·tile, 128·tile + 128): ∂hidden = ∂Y·W2ᵀ
  /// (unscaled), the gate's ∂s = ⟨∂Y, E_s(x)⟩ when gated, then times s: ∂pre, ∂X rows; the
  /// recomputed hidden rows and s ⊙ ∂Y are kept for the weight gradients.
  void shared_backward_tile(Index tile, const ForwardCache<Scalar>& cache, const Vector<Scalar>& shared_gates,
                            ConstMatrixRef<Scalar> d_output, BackwardWorkspaceType& workspace) const {
    const Index first = tile * expert_row_tile;
    const Index rows = std::min(expert_row_tile, cache.input.rows() - first);
    const ExpertT& shared = shared_experts_.front();
    auto d_hidden = workspace.shared_d_hidden[static_cast<std::size_t>(detail::thread_index())].topRows(rows);
    auto d_out = workspace.shared_d_output.middleRows(first, rows);
    const auto pre = cache.shared_pre_activations.middleRows(first, rows);
    auto hidden = workspace.shared_hidden.middleRows(first, rows);
    d_out = d_output.middleRows(first, rows);
    detail::gemm(detail::operand(d_out), detail::operand(shared.w2(), detail::Op::transpose), d_hidden.data(),
                 d_hidden.outerStride(), Scalar(1), false);
    shared.activate(pre, hidden);
    if (shared_gates.size() > 0) {
      for (Index r = 0; r < rows; ++r) {
        Scalar d_gate = d_hidden.row(r).dot(hidden.row(r));
        if (shared.b2().size() > 0) d_gate += d_out.row(r).dot(shared.b2().transpose());
        workspace.shared_d_gate[first + r] = d_gate;
        d_hidden.row(r) *= shared_gates[first + r];
        d_out.row(r) *= shared_gates[first + r];
      }
    }
    auto d_pre = workspace.shared_d_pre.middleRows(first, rows);
    shared.activation_backward(pre, d_hidden, d_pre);
    detail::gemm(detail::operand(d_pre), detail::operand(shared.w1(), detail::Op::transpose),
                 workspace.shared_d_input.row(first).data(), workspace.shared_d_input.outerStride(), Scalar(1), false);
  }

  /// W1ᵀ and W2ᵀ of every expert that has rows, packed for the backward products (parallel
  /// over experts; storage reused from call to call).
  void pack_transposed_weights(const DispatchPlan& plan, BackwardWorkspaceType& workspace) const {
    workspace.w1_transposed.resize(experts_.size());
    workspace.w2_transposed.resize(experts_.size());
    const double work = 2.0 * static_cast<double>(input_dim()) * static_cast<double>(pre_activation_width() + hidden_dim());
    detail::parallel_for_dynamic(num_experts(), work, [&](Index e) {
      if (plan.tokens_per_expert[e] == 0) return;
      const auto index = static_cast<std::size_t>(e);
      workspace.w1_transposed[index].assign(experts_[index].w1(), detail::Op::transpose);
      workspace.w2_transposed[index].assign(experts_[index].w2(), detail::Op::transpose);
    });
  }

  /// ∂W1 += X_iᵀ·∂pre, ∂b1 += Σ ∂pre, ∂W2 += hiddenᵀ·∂out, ∂b2 += Σ ∂out for each expert i, in
  /// tiles of gradient_column_tile columns; each tile reduces over all of the expert's rows in
  /// row order, so no two threads touch one gradient element and the sum order is fixed.
  ///
  /// With a shared expert (tiles with expert = E, first in the list): ∂W1_s += Xᵀ·∂pre_s, ∂b1_s,
  /// ∂W2_s += hidden_sᵀ·(s ⊙ ∂Y), ∂b2_s, over all T tokens in order.
  void accumulate_weight_gradients(const DispatchPlan& plan, const Matrix<Scalar>& input,
                                   BackwardWorkspaceType& workspace, Gradients& gradients) const {
    auto& tiles = workspace.gradient_tiles;
    tiles.clear();
    const Index shared = num_experts();  // the shared expert's tile id
    if (has_shared_expert()) {
      for (Index c = 0; c < shared_shape_.pre_activation_width; c += gradient_column_tile) tiles.push_back({shared, true, c});
      for (Index c = 0; c < input_dim(); c += gradient_column_tile) tiles.push_back({shared, false, c});
    }
    for (Index expert = 0; expert < num_experts(); ++expert) {
      if (plan.tokens_per_expert[expert] == 0) continue;
      for (Index c = 0; c < pre_activation_width(); c += gradient_column_tile) tiles.push_back({expert, true, c});
      for (Index c = 0; c < input_dim(); c += gradient_column_tile) tiles.push_back({expert, false, c});
    }
    detail::parallel_for_dynamic(static_cast<Index>(tiles.size()), tile_flops(plan, tiles.size()), [&](Index index) {
      const detail::GradientTile& tile = tiles[static_cast<std::size_t>(index)];
      const bool is_shared = tile.expert == shared;
      ExpertT& gradient = is_shared ? gradients.shared_experts.front() : gradients.experts[static_cast<std::size_t>(tile.expert)];
      const Index first_row = is_shared ? 0 : plan.offsets[tile.expert];
      const Index rows = is_shared ? input.rows() : plan.tokens_per_expert[tile.expert];
      const Matrix<Scalar>& left = tile.first_layer ? (is_shared ? input : workspace.grouped_input)
                                                    : (is_shared ? workspace.shared_hidden : workspace.hidden);
      const Matrix<Scalar>& right = tile.first_layer ? (is_shared ? workspace.shared_d_pre : workspace.d_pre)
                                                     : (is_shared ? workspace.shared_d_output : workspace.grouped_d_output);
      Matrix<Scalar>& weight = tile.first_layer ? gradient.w1() : gradient.w2();
      Vector<Scalar>& bias = tile.first_layer ? gradient.b1() : gradient.b2();
      const Index columns = std::min(gradient_column_tile, right.cols() - tile.first_column);
      const auto right_block = right.block(first_row, tile.first_column, rows, columns);
      detail::gemm(detail::operand(left.middleRows(first_row, rows), detail::Op::transpose),
                   detail::operand(right_block), weight.data() + tile.first_column, weight.outerStride(), Scalar(1),
                   true);
      if (bias.size() > 0) bias.segment(tile.first_column, columns) += right_block.colwise().sum().transpose();
    });
  }

  using Scratch = detail::LayerScratch<Scalar, typename Traits::RoutingGradient>;

  RouterT router_;
  std::vector<ExpertT> experts_;
  Index input_dim_ = 0;
  Index num_experts_ = 0;
  Index k_ = 0;
  Index hidden_dim_ = 0;
  ExpertShape expert_shape_;
  std::vector<ExpertT> shared_experts_;  ///< none or one always-on expert
  Index shared_hidden_dim_ = 0;
  Vector<Scalar> shared_gate_weight_;    ///< w_shared (d), or empty: no gate on the shared expert
  ExpertShape shared_shape_;
  /// Identity (never shared with another layer) and the workspace pool.
  std::shared_ptr<Scratch> scratch_;
  /// Next training step; forward (const) advances it, atomically.
  mutable std::atomic<std::uint64_t> training_step_{0};
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_MOE_LAYER_HPP
