// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_PLANNED_EXPERTS_HPP
#define SPARSEMOE_PLANNED_EXPERTS_HPP

/// \file planned_experts.hpp
/// The records shared by the layers whose router is not a per-token top-k (ExpertChoiceLayer,
/// HashMoELayer): per-call options, the cache, the result, the gradients and the workspace, and
/// the stages they run around an ExpertBank once a router has filled a (token, slot) id matrix
/// and its gates: group → expert compute → combine, and backward the other way round.

#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "dispatch.hpp"
#include "expert_bank.hpp"
#include "parameters.hpp"
#include "router.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup layer
/// @{

/// The sizes every planned layer's config has (ExpertChoiceConfig, HashMoEConfig derive from it).
struct PlannedLayerSizes {
  Index input_dim = 0;     ///< d: token width (input and output)
  Index hidden_dim = 0;    ///< h: hidden width of each expert
  Index num_experts = 0;   ///< E
  std::uint64_t seed = 0;  ///< seeds the initial parameters
};

/// Per-call settings of ExpertChoiceLayer::forward and HashMoELayer::forward.
struct PlannedForwardOptions {
  /// Training keeps the cache for backward (these routers have no random part).
  Mode mode = Mode::evaluation;
  /// Keep the cache in evaluation mode too.
  bool keep_cache = false;
};

/// What a forward keeps for backward: T·d + rows·p scalars (rows = grouped rows of the plan, p =
/// the experts' pre-activation width); empty in evaluation mode without keep_cache.
template <typename Scalar>
struct PlannedCache {
  Matrix<Scalar> input;            ///< T×d copy of the input
  Matrix<Scalar> pre_activations;  ///< rows×p: x·W1 + b1 of every grouped row
  bool kept = false;               ///< whether a completed forward filled this cache

  /// Whether this cache cannot feed a backward pass.
  bool empty() const { return !kept; }
};

/// What ExpertChoiceLayer::forward and HashMoELayer::forward return.
template <typename Scalar, typename RoutingT>
struct PlannedResult {
  Matrix<Scalar> output;       ///< T×d
  RoutingT routing;            ///< the router's decisions
  DispatchPlan plan;           ///< each expert's rows, built from routing.expert_ids
  PlannedCache<Scalar> cache;  ///< for backward

  /// Rows each expert received (E entries).
  const IndexVector& tokens_per_expert() const { return plan.tokens_per_expert; }
};

/// Gradients of ExpertChoiceLayer or HashMoELayer, laid out like the layer's tensors(): the
/// router's weight ("router.weight", absent for the hash router, which has no parameters), then
/// each expert's ("expert0.w1", …).
template <typename Scalar, typename ExpertT>
struct PlannedGradients {
  RouterGradients<Scalar> router;  ///< ∂L/∂W_r (d×E; empty for the hash router)
  std::vector<ExpertT> experts;    ///< ∂L/∂ each expert's tensors

  /// All gradient tensors, in the order and with the names of the layer's tensors().
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    if (router.weight.size() > 0) list.push_back(make_tensor_view("router.weight", router.weight));
    for (std::size_t e = 0; e < experts.size(); ++e) {
      append_tensor_views(list, "expert" + std::to_string(e) + ".", experts[e].tensors());
    }
    return list;
  }

  /// Sets every gradient to zero.
  void set_zero() {
    router.set_zero();
    for (ExpertT& expert : experts) expert.set_zero();
  }
};

/// Scratch memory of the forward and backward of ExpertChoiceLayer and HashMoELayer: reusing one
/// (and the result) for calls of the same shape allocates nothing. Not shared between threads.
template <typename Scalar>
struct PlannedWorkspace {
  Matrix<Scalar> grouped_input;       ///< rows×d: each expert's tokens, contiguous
  Matrix<Scalar> expert_output;       ///< rows×d: E_i of each grouped row
  Matrix<Scalar> grouped_d_output;    ///< rows×d: ∂L/∂y grouped (then times the gate)
  Matrix<Scalar> d_grouped_input;     ///< rows×d: ∂L/∂x of each grouped row
  Vector<Scalar> gate_of_row;         ///< rows: the combine weight of each grouped row
  Vector<Scalar> d_gate_of_row;       ///< rows: ⟨∂L/∂y, E(x)⟩ of each grouped row
  TopKRoutingGradient<Scalar> routing_gradient;  ///< ∂L/∂(the router's outputs)
  ExpertBankForwardWorkspace<Scalar> forward;    ///< the bank's forward scratch
  ExpertBankBackwardWorkspace<Scalar> backward;  ///< the bank's backward scratch
};

/// What ExpertChoiceLayer and HashMoELayer have in common: E experts of one shape in an
/// ExpertBank, their accessors, and the types of their results, gradients and workspaces. Not a
/// layer on its own (its constructor is protected).
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT the expert type.
/// \tparam RoutingT the router's record (ExpertChoiceRouting, HashRouting).
template <typename Scalar_, typename ExpertT, typename RoutingT>
class PlannedLayerBase {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type.
  using ExpertType = ExpertT;
  /// What forward returns.
  using Result = PlannedResult<Scalar, RoutingT>;
  /// The gradients of every parameter, as make_gradients() returns them.
  using Gradients = PlannedGradients<Scalar, ExpertT>;
  /// Scratch of forward and backward.
  using Workspace = PlannedWorkspace<Scalar>;

  /// Token width d.
  Index input_dim() const { return bank_.input_dim(); }
  /// Hidden width h of each expert.
  Index hidden_dim() const { return bank_.hidden_dim(); }
  /// Number of experts E.
  Index num_experts() const { return bank_.num_experts(); }
  /// Expert `index`, 0 ≤ index < E (std::out_of_range otherwise; keep its shapes).
  ExpertT& expert(Index index) { return bank_.expert(index); }
  /// Expert `index`, read-only.
  const ExpertT& expert(Index index) const { return bank_.expert(index); }
  /// The experts.
  const ExpertBank<Scalar, ExpertT>& experts() const { return bank_; }

 protected:
  /// E experts of width d and hidden width h, expert i initialised by
  /// ExpertT::initialize_uniform with the i-th output of a splitmix64 generator started at
  /// `seed`. Throws std::invalid_argument unless E, d, h ≥ 1.
  PlannedLayerBase(Index num_experts, Index input_dim, Index hidden_dim, std::uint64_t seed)
      : bank_(num_experts, input_dim, hidden_dim) {
    for (Index e = 0; e < num_experts; ++e) bank_.expert(e).initialize_uniform(detail::splitmix64(seed));
  }

  /// The experts, run by forward and backward.
  ExpertBank<Scalar, ExpertT> bank_;
};

namespace detail {

/// Throws std::invalid_argument naming the row, the column and the value of the first non-finite
/// entry of `input`. O(T·d).
template <typename Scalar>
void require_finite_input(const ConstMatrixRef<Scalar>& input, const char* function) {
  for (Index row = 0; row < input.rows(); ++row) {
    if (input.row(row).allFinite()) continue;
    Index column = 0;
    while (std::isfinite(input(row, column))) ++column;
    require(false, function, "non-finite input ", input(row, column), " in token row ", row, ", column ", column);
  }
}

/// grouped row r = source row plan.token_of_row[r]. O(rows·d), parallel over rows.
template <typename Scalar>
void gather_plan_rows(const ConstMatrixRef<Scalar>& source, const DispatchPlan& plan, Matrix<Scalar>& grouped) {
  grouped.resize(plan.num_rows(), source.cols());
  parallel_for(plan.num_rows(), static_cast<double>(source.cols()),
               [&](Index row) { grouped.row(row) = source.row(plan.token_of_row[row]); });
}

/// output row t = Σ over the slots j of t that have a row of weight(t, j)·rows[row of (t, j)],
/// slots in order (weight null: 1). Each token is summed by one thread: bitwise the same for any
/// thread count. O(T·k + rows·d).
template <typename Scalar>
void sum_plan_rows(const Matrix<Scalar>& rows, const Matrix<Scalar>* weight, const DispatchPlan& plan,
                   Matrix<Scalar>& output) {
  output.resize(plan.num_tokens, rows.cols());
  parallel_for(plan.num_tokens, static_cast<double>(plan.k + rows.cols()), [&](Index token) {
    output.row(token).setZero();
    for (Index slot = 0; slot < plan.k; ++slot) {
      const Index row = plan.row_of_slot(token, slot);
      if (row < 0) continue;
      if (weight) {
        output.row(token) += (*weight)(token, slot) * rows.row(row);
      } else {
        output.row(token) += rows.row(row);
      }
    }
  });
}

/// Throws std::invalid_argument unless `plan` is the dropless plan of `expert_ids` over E
/// experts: the shapes, and (token, slot) ↔ grouped row a bijection between the slots with an
/// id and the rows, each row inside its expert's block. O(T·k + E), before any work, so that an
/// edited or mismatched result never makes backward read out of range.
inline void require_plan_of(const IndexMatrix& expert_ids, Index num_experts, const DispatchPlan& plan,
                            const char* function) {
  const Index tokens = expert_ids.rows(), k = expert_ids.cols(), rows = plan.num_rows();
  bool valid = plan.num_tokens == tokens && plan.num_experts == num_experts && plan.k == k && rows >= 0 &&
               plan.tokens_per_expert.size() == num_experts && plan.offsets.size() == num_experts + 1 &&
               plan.token_of_row.size() == rows && plan.slot_of_row.size() == rows &&
               plan.row_of_token_slot.size() == tokens * k && plan.offsets[0] == 0 && plan.offsets[num_experts] == rows;
  for (Index e = 0; valid && e < num_experts; ++e) {
    valid = plan.tokens_per_expert[e] >= 0 && plan.offsets[e + 1] == plan.offsets[e] + plan.tokens_per_expert[e];
  }
  Index dispatched = 0;
  for (Index token = 0; valid && token < tokens; ++token) {
    for (Index slot = 0; valid && slot < k; ++slot) {
      const Index expert = expert_ids(token, slot);
      const Index row = plan.row_of_slot(token, slot);
      if (expert < 0) {
        valid = expert == -1 && row == -1;
        continue;
      }
      ++dispatched;
      valid = expert < num_experts && row >= plan.offsets[expert] && row < plan.offsets[expert + 1] &&
              plan.token_of_row[row] == token && plan.slot_of_row[row] == slot;
    }
  }
  require(valid && dispatched == rows, function, "result.plan and result.routing disagree (was the result edited?)");
}

/// The checks every planned layer's backward makes before any work: a kept cache of T×d
/// (T = the routing's rows), a plan that belongs to `expert_ids`, pre-activations of its rows,
/// ∂L/∂y of T×d, the experts still of the bank's shapes and one gradient of those shapes per
/// expert. Throws std::invalid_argument naming what is wrong. O(T·k + E).
template <typename Scalar, typename ExpertT>
void require_planned_backward(const ExpertBank<Scalar, ExpertT>& bank, const IndexMatrix& expert_ids,
                              const DispatchPlan& plan, const PlannedCache<Scalar>& cache,
                              const ConstMatrixRef<Scalar>& d_output, const std::vector<ExpertT>& expert_gradients,
                              const char* function) {
  require(!cache.empty(), function,
          "the forward result has no cache: run forward with Mode::training (or keep_cache) first");
  bank.require_expert_shapes(function);
  const Index tokens = expert_ids.rows();
  require_shape(cache.input, tokens, bank.input_dim(), function, "result.cache.input");
  require_plan_of(expert_ids, bank.num_experts(), plan, function);
  require_shape(cache.pre_activations, plan.num_rows(), bank.pre_activation_width(), function,
                "result.cache.pre_activations");
  require_shape(d_output, tokens, bank.input_dim(), function, "d_output");
  require(static_cast<Index>(expert_gradients.size()) == bank.num_experts(), function, "gradients has ",
          expert_gradients.size(), " experts, the layer ", bank.num_experts());
  for (const ExpertT& expert : expert_gradients) {
    require(bank.fits(expert), function, "an expert gradient does not have the experts' shapes");
  }
}

/// The forward of a planned layer over the T×d batch `input`: checks the input (width d, finite:
/// the message names the row, the column and the value) and the experts' shapes, calls
/// route(result.routing) (which fills expert_ids and gates, T×k), builds the dropless plan over
/// the bank's experts, groups the input, runs the bank (keeping the input and the
/// pre-activations in result.cache in training mode or with keep_cache) and combines the rows
/// with their gates into result.output (T×d). Cost: the router's, the bank's
/// 2·rows·d·(p + h) flops and O(T·k + rows·d).
template <typename Scalar, typename ExpertT, typename RoutingT, typename Route>
void planned_forward(const ExpertBank<Scalar, ExpertT>& bank, const ConstMatrixRef<Scalar>& input,
                     const PlannedForwardOptions& options, const Route& route, PlannedResult<Scalar, RoutingT>& result,
                     PlannedWorkspace<Scalar>& workspace, const char* function) {
  require(input.cols() == bank.input_dim(), function, "input must have ", bank.input_dim(),
          " columns (the layer's input_dim), got ", input.rows(), "x", input.cols());
  require_finite_input(input, function);
  bank.require_expert_shapes(function);
  PlannedCache<Scalar>& cache = result.cache;
  cache.kept = false;
  const bool keep = options.mode == Mode::training || options.keep_cache;
  route(result.routing);
  build_dispatch_plan(result.routing.expert_ids, bank.num_experts(), result.plan);
  if (keep) {
    cache.input = input;
  } else {
    cache.input.resize(0, 0);
    cache.pre_activations.resize(0, 0);
  }
  gather_plan_rows(input, result.plan, workspace.grouped_input);
  bank.forward(result.plan.offsets, workspace.grouped_input, keep ? &cache.pre_activations : nullptr,
               workspace.expert_output, workspace.forward);
  sum_plan_rows(workspace.expert_output, &result.routing.gates, result.plan, result.output);
  cache.kept = keep;
}

/// Backward of the expert part: from ∂L/∂y (T×d) of a forward with `plan`, `gates` (T×k) and the
/// cached input and pre-activations, ADDS each expert's parameter gradients to
/// `expert_gradients`, writes ∂L/∂x through the experts into `d_input` (resized to T×d) and, when
/// `d_gates` is not null, ⟨∂L/∂y_t, E_i(x_t)⟩ into d_gates(t, j) for every slot with a row (other
/// entries untouched). Cost: the bank's ≈ 4·rows·d·(p + h) flops + O(rows·d).
template <typename Scalar, typename ExpertT>
void planned_backward(const ExpertBank<Scalar, ExpertT>& bank, const PlannedCache<Scalar>& cache,
                      const DispatchPlan& plan, const Matrix<Scalar>& gates, const ConstMatrixRef<Scalar>& d_output,
                      PlannedWorkspace<Scalar>& workspace, std::vector<ExpertT>& expert_gradients,
                      Matrix<Scalar>& d_input, Matrix<Scalar>* d_gates) {
  const Index rows = plan.num_rows();
  gather_plan_rows(ConstMatrixRef<Scalar>(cache.input), plan, workspace.grouped_input);
  gather_plan_rows(d_output, plan, workspace.grouped_d_output);
  workspace.gate_of_row.resize(rows);
  for (Index row = 0; row < rows; ++row) workspace.gate_of_row[row] = gates(plan.token_of_row[row], plan.slot_of_row[row]);
  bank.backward(plan.offsets, workspace.grouped_input, cache.pre_activations, workspace.grouped_d_output,
                workspace.gate_of_row, workspace.d_grouped_input, workspace.d_gate_of_row, expert_gradients,
                workspace.backward);
  sum_plan_rows(workspace.d_grouped_input, static_cast<const Matrix<Scalar>*>(nullptr), plan, d_input);
  if (!d_gates) return;
  for (Index row = 0; row < rows; ++row) {
    (*d_gates)(plan.token_of_row[row], plan.slot_of_row[row]) = workspace.d_gate_of_row[row];
  }
}

}  // namespace detail

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_PLANNED_EXPERTS_HPP
