// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_HIERARCHICAL_MOE_HPP
#define SPARSEMOE_HIERARCHICAL_MOE_HPP

/// \file hierarchical_moe.hpp
/// The hierarchical MoE of Shazeer et al. 2017 ("Outrageously Large Neural Networks",
/// appendix B): a primary noisy top-k gate chooses groups of experts, and a secondary noisy top-k
/// gate inside each chosen group chooses its experts; with the appendix's importance and load.

#include "config.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "dispatch.hpp"
#include "expert.hpp"
#include "expert_bank.hpp"
#include "gate.hpp"
#include "losses.hpp"
#include "parameters.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup paradigms
/// @{

/// Sizes and options of a HierarchicalMoELayer: E = a·b experts in a groups of b.
struct HierarchicalMoEConfig {
  Index input_dim = 0;         ///< d, token width (input and output)
  Index hidden_dim = 0;        ///< h, hidden width of each expert
  Index num_experts = 0;       ///< E, a multiple of num_groups
  Index num_groups = 0;        ///< a, groups of b = E/a experts each
  Index k_groups = 1;          ///< k_p, groups each token is sent to (primary top-k), 1 ≤ k_p ≤ a
  Index k_per_group = 1;       ///< k_s, experts chosen inside each of those groups, 1 ≤ k_s ≤ b
  double noise_epsilon = 1e-2;  ///< ε of every gate's noise scale softplus(x·W_noise) + ε
  std::uint64_t seed = 0;       ///< seeds the experts' initialisation and every gate's noise stream
};

/// Per-call settings of HierarchicalMoELayer::forward.
struct HierarchicalForwardOptions {
  Mode mode = Mode::evaluation;  ///< training adds gate noise and keeps what backward needs
  std::uint64_t step = 0;        ///< index of the training noise sample (< 2^32): pass a new one each step
  double importance_weight = 0.1;  ///< w_importance of CV(Importance_H)² (the paper uses 0.1)
  double load_weight = 0.1;        ///< w_load of CV(Load_H)² (the paper uses 0.1)
};

/// The auxiliary losses of a hierarchical MoE over one batch (appendix B), every statistic summed
/// in double. Expert (i, j), expert j of group i, has the flat index e = i·b + j.
///
/// Importance_H(X)_{i,j} = Σ_x G_p(x)_i·G_i(x)_j;
/// Load_H(X)_{i,j} = Load_p(X)_i·Load_i(X⁽ⁱ⁾)_j / |X⁽ⁱ⁾|, with X⁽ⁱ⁾ the tokens the primary gate
/// sent to group i, Load_p the primary gate's load over the batch and Load_i the secondary gate's
/// load over X⁽ⁱ⁾ (each the smooth estimator in training with k < gate width, else the hard
/// count). When no token reaches group i (|X⁽ⁱ⁾| = 0) the ratio Load_i/|X⁽ⁱ⁾| is undefined; it is
/// then taken as k_s/b for every j, the share a uniform secondary gate would give, so that
/// Load_H(X)_{i,j} = Load_p(X)_i·k_s/b and the primary gate's load gradient still reaches group i.
///
/// The base AuxiliaryLosses holds importance = Importance_H and load = Load_H (E entries each),
/// smooth_load (whether either gate's load is the smooth estimator), both CV², both weights and
/// total() = w_importance·CV(Importance_H)² + w_load·CV(Load_H)².
template <typename Scalar>
struct HierarchicalLosses : AuxiliaryLosses<Scalar> {
  Vector<double> primary_load;    ///< a: Load_p(X)
  Vector<double> secondary_load;  ///< E: Load_i(X⁽ⁱ⁾)_j at i·b + j
  IndexVector group_tokens;       ///< a: |X⁽ⁱ⁾|
};

/// What HierarchicalMoELayer::forward computed for T tokens, and what backward needs.
/// Memory: O(T·(a + E)) for the routings, O(T·k_p·k_s·(d + p)) for the grouped rows in training.
template <typename Scalar>
struct HierarchicalMoEResult {
  Matrix<Scalar> output;              ///< T×d: Σ_i Σ_j G_p(x)_i·G_i(x)_j·E_{i,j}(x)
  Routing<Scalar> primary;            ///< the primary gate over the a groups
  /// a routings, one per group's secondary gate, each over ALL T tokens (so that a token's noise
  /// does not depend on which other tokens reach the group); only the rows of tokens the primary
  /// gate sent to the group are used.
  std::vector<Routing<Scalar>> secondary;
  IndexMatrix expert_ids;             ///< T×(k_p·k_s): i·b + j for primary slot p, secondary slot q at p·k_s + q
  Matrix<Scalar> gates;               ///< T×(k_p·k_s): G_p(x)_i·G_i(x)_j at the same positions
  DispatchPlan plan;                  ///< the grouped rows of each expert
  HierarchicalLosses<Scalar> losses;  ///< the appendix's importance and load losses
  Matrix<Scalar> input;               ///< T×d: a copy of X (training mode only)
  Matrix<Scalar> grouped_input;       ///< rows×d: the input row of each grouped row
  Matrix<Scalar> pre_activations;     ///< rows×p: x·W1 + b1 of each grouped row (training mode only)
  bool training = false;              ///< whether the forward kept what backward needs

  /// Number of tokens T.
  Index num_tokens() const { return output.rows(); }
};

/// Scratch of HierarchicalMoELayer::forward, reused across calls (a forward of the same shape
/// into the same result and workspace allocates nothing).
template <typename Scalar>
struct HierarchicalForwardWorkspace {
  ExpertBankForwardWorkspace<Scalar> experts;  ///< scratch of the experts' stage
  Matrix<Scalar> expert_output;                ///< rows×d: E_{i,j}(x) of each grouped row
};

/// Scratch of HierarchicalMoELayer::backward, reused across calls (no allocation when the shapes
/// repeat).
template <typename Scalar>
struct HierarchicalBackwardWorkspace {
  ExpertBankBackwardWorkspace<Scalar> experts;  ///< scratch of the experts' stage
  Matrix<Scalar> grouped_d_output;              ///< rows×d: ∂L/∂y of each grouped row's token
  Vector<Scalar> gate_of_row;                   ///< rows: G_p·G_i of each grouped row
  Matrix<Scalar> d_grouped_input;               ///< rows×d: ∂L/∂x through each row's expert
  Vector<Scalar> d_gate_of_row;                 ///< rows: ⟨∂L/∂y, E_{i,j}(x)⟩
  GateGradients<Scalar> primary;                ///< ∂L/∂(the primary gate's outputs)
  std::vector<GateGradients<Scalar>> secondary;  ///< ∂L/∂(each secondary gate's outputs)
};

/// Gradients of every parameter of a HierarchicalMoELayer (make_gradients()): gate-shaped and
/// expert-shaped holders whose weights are the gradients.
template <typename Scalar, typename ExpertT>
struct HierarchicalMoEGradients {
  NoisyTopKGate<Scalar> primary;             ///< ∂L/∂W_g and ∂L/∂W_noise of the primary gate (d×a)
  std::vector<NoisyTopKGate<Scalar>> secondary;  ///< the same for each group's gate (d×b)
  std::vector<ExpertT> experts;              ///< ∂L/∂(each expert's tensors)

  /// All gradient tensors, with the names and in the order of HierarchicalMoELayer::tensors().
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, "primary.", primary.tensors());
    detail::append_numbered_tensor_views(list, "group", secondary);
    detail::append_numbered_tensor_views(list, "expert", experts);
    return list;
  }

  /// Sets every gradient to zero (allocates nothing).
  void set_zero() {
    primary.gate_weight().setZero();
    primary.noise_weight().setZero();
    for (auto& gate : secondary) {
      gate.gate_weight().setZero();
      gate.noise_weight().setZero();
    }
    for (auto& expert : experts) expert.set_zero();
  }
};

/// Hierarchical MoE layer (Shazeer et al. 2017, appendix B): E = a·b experts in a groups of b.
///
/// A primary NoisyTopKGate over the a groups picks k_p groups with weights G_p(x); inside each
/// picked group i a secondary NoisyTopKGate over its b experts picks k_s experts with weights
/// G_i(x):
/// \f[ y = \sum_{i=1}^{a} \sum_{j=1}^{b} G_p(x)_i\, G_i(x)_j\, E_{i,j}(x) \f]
/// (k_p·k_s experts per token). The auxiliary losses are w_importance·CV(Importance_H)² and
/// w_load·CV(Load_H)² over the E experts (HierarchicalLosses). The noise sample of every gate is
/// fixed by (gate seed, step, token, column), as in NoisyTopKGate; each gate has its own seed,
/// drawn from HierarchicalMoEConfig::seed.
///
/// Cost, forward: the gates 2·T·d·(a + E) flops, twice that in training (the noise logits); the
/// secondary gates run over all T tokens (see HierarchicalMoEResult::secondary), so they cost
/// what one flat gate over E experts costs. The experts: 2·T·k_p·k_s·d·(p + h). Backward: about
/// twice the forward. Parameters: the primary gate (2·d·a), a
/// secondary gates (2·d·b each) and the E experts. forward and backward are const and keep no
/// state; results are bitwise identical for any thread count.
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT an expert type (expert.hpp).
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>>
class HierarchicalMoELayer {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type.
  using ExpertType = ExpertT;
  /// What forward returns.
  using Result = HierarchicalMoEResult<Scalar>;
  /// What make_gradients() returns.
  using Gradients = HierarchicalMoEGradients<Scalar, ExpertT>;
  /// Scratch of forward.
  using ForwardWorkspace = HierarchicalForwardWorkspace<Scalar>;
  /// Scratch of backward.
  using BackwardWorkspace = HierarchicalBackwardWorkspace<Scalar>;
  static_assert(std::is_same<typename ExpertT::Scalar, Scalar>::value, "ExpertT::Scalar must be the layer's Scalar");

  /// Builds the layer: every gate weight zero (the paper's initialisation), expert e initialised by
  /// ExpertT::initialize_uniform, each gate's noise seed and each expert's seed drawn from
  /// config.seed. Throws std::invalid_argument (naming the value) unless d, h ≥ 1, a ≥ 1, E ≥ 1
  /// is a multiple of a, 1 ≤ k_p ≤ a, 1 ≤ k_s ≤ b and ε > 0 is finite.
  explicit HierarchicalMoELayer(const HierarchicalMoEConfig& config)
      : primary_(checked(config).input_dim, config.num_groups, config.k_groups,
                 static_cast<Scalar>(config.noise_epsilon), derived_seed(config.seed, 0)) {
    const Index groups = config.num_groups;
    const Index per_group = config.num_experts / groups;
    secondary_.reserve(static_cast<std::size_t>(groups));
    for (Index i = 0; i < groups; ++i) {
      secondary_.emplace_back(config.input_dim, per_group, config.k_per_group,
                              static_cast<Scalar>(config.noise_epsilon), derived_seed(config.seed, 1 + i));
    }
    std::uint64_t state = derived_seed(config.seed, 1 + groups);
    std::vector<ExpertT> experts;
    experts.reserve(static_cast<std::size_t>(config.num_experts));
    for (Index e = 0; e < config.num_experts; ++e) {
      experts.emplace_back(config.input_dim, config.hidden_dim);
      experts.back().initialize_uniform(detail::splitmix64(state));
    }
    bank_ = ExpertBank<Scalar, ExpertT>(std::move(experts));
  }

  /// Token width d.
  Index input_dim() const { return primary_.input_dim(); }
  /// Hidden width h of each expert.
  Index hidden_dim() const { return bank_.hidden_dim(); }
  /// Number of experts E = a·b.
  Index num_experts() const { return bank_.num_experts(); }
  /// Number of groups a.
  Index num_groups() const { return primary_.num_experts(); }
  /// Experts per group b.
  Index group_size() const { return secondary_.front().num_experts(); }
  /// Groups per token k_p.
  Index k_groups() const { return primary_.k(); }
  /// Experts per chosen group k_s.
  Index k_per_group() const { return secondary_.front().k(); }

  /** @{ */
  /// The primary gate over the a groups.
  NoisyTopKGate<Scalar>& primary_gate() { return primary_; }
  const NoisyTopKGate<Scalar>& primary_gate() const { return primary_; }
  /** @} */
  /** @{ */
  /// The secondary gate of group i over its b experts (throws std::out_of_range for a bad i).
  NoisyTopKGate<Scalar>& secondary_gate(Index i) { return secondary_.at(static_cast<std::size_t>(i)); }
  const NoisyTopKGate<Scalar>& secondary_gate(Index i) const { return secondary_.at(static_cast<std::size_t>(i)); }
  /** @} */
  /** @{ */
  /// Expert j of group i is expert(i·b + j) (throws std::out_of_range for a bad index).
  ExpertT& expert(Index e) { return bank_.expert(e); }
  const ExpertT& expert(Index e) const { return bank_.expert(e); }
  /** @} */
  /// The E experts as one ExpertBank, expert (i, j) at i·b + j; rows are grouped by that index.
  const ExpertBank<Scalar, ExpertT>& expert_bank() const { return bank_; }

  /// The primary gate's tensors ("primary.gate_weight", "primary.noise_weight"), each group's
  /// ("group<i>.…"), then each expert's ("expert<e>.…"), in that order.
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    append_tensor_views(list, "primary.", primary_.tensors());
    detail::append_numbered_tensor_views(list, "group", secondary_);
    append_tensor_views(list, "", bank_.tensors());
    return list;
  }

  /// Zero gradients shaped like every parameter.
  Gradients make_gradients() const {
    Gradients gradients{primary_, secondary_, bank_.make_gradients()};
    gradients.set_zero();
    return gradients;
  }

  /// Runs the layer on the T×d batch `input` (T ≥ 1). Throws std::invalid_argument for a wrong
  /// width, T = 0, a non-finite input entry (naming its token row), a step ≥ 2^32 or a negative
  /// or non-finite loss weight.
  Result forward(ConstMatrixRef<Scalar> input, const HierarchicalForwardOptions& options = {}) const {
    Result result;
    ForwardWorkspace workspace;
    forward(input, options, result, workspace);
    return result;
  }

  /// Like forward(input, options), writing into `result` and reusing its storage and
  /// `workspace`'s: no allocation when the shapes and the mode are those of the previous call.
  void forward(ConstMatrixRef<Scalar> input, const HierarchicalForwardOptions& options, Result& result,
               ForwardWorkspace& workspace) const {
    const char* function = "sparsemoe::HierarchicalMoELayer::forward";
    detail::require(input.cols() == input_dim(), function, "input must have ", input_dim(),
                    " columns (the layer's input_dim), got ", input.rows(), "x", input.cols());
    detail::require(input.rows() >= 1, function, "input must have at least one token row, got 0");
    for (Index t = 0; t < input.rows(); ++t) {
      detail::require(input.row(t).allFinite(), function, "non-finite input in token row ", t);
    }
    for (const double weight : {options.importance_weight, options.load_weight}) {
      detail::require(std::isfinite(weight) && weight >= 0.0, function,
                      "importance_weight and load_weight must be finite and >= 0, got ", weight);
    }
    const Index tokens = input.rows();
    const Index groups = num_groups();
    const Index per_group = group_size();
    const Index kp = k_groups();
    const Index ks = k_per_group();
    const bool training = options.mode == Mode::training;
    result.training = training;

    primary_.route(input, options.mode, options.step, result.primary);
    result.secondary.resize(static_cast<std::size_t>(groups));
    for (Index i = 0; i < groups; ++i) {
      secondary_[static_cast<std::size_t>(i)].route(input, options.mode, options.step,
                                                    result.secondary[static_cast<std::size_t>(i)]);
    }
    result.expert_ids.resize(tokens, kp * ks);
    result.gates.resize(tokens, kp * ks);
    for (Index t = 0; t < tokens; ++t) {
      for (Index p = 0; p < kp; ++p) {
        const Index group = result.primary.expert_ids(t, p);
        const Routing<Scalar>& inner = result.secondary[static_cast<std::size_t>(group)];
        for (Index q = 0; q < ks; ++q) {
          result.expert_ids(t, p * ks + q) = group * per_group + inner.expert_ids(t, q);
          result.gates(t, p * ks + q) = result.primary.gates(t, p) * inner.gates(t, q);
        }
      }
    }
    build_dispatch_plan(result.expert_ids, num_experts(), result.plan);

    // Experts over the grouped rows, then each token's weighted sum in slot order.
    const Index rows = result.plan.rows;
    Matrix<Scalar>& grouped_input = result.grouped_input;
    grouped_input.resize(rows, input_dim());
    detail::parallel_for(rows, static_cast<double>(input_dim()),
                         [&](Index r) { grouped_input.row(r) = input.row(result.plan.token_of_row[r]); });
    Matrix<Scalar>& expert_output = workspace.expert_output;
    bank_.forward(result.plan.offsets, grouped_input, training ? &result.pre_activations : nullptr, expert_output,
                  workspace.experts);
    result.output.resize(tokens, input_dim());
    detail::parallel_for(tokens, 2.0 * static_cast<double>(kp * ks * input_dim()), [&](Index t) {
      result.output.row(t).setZero();
      for (Index slot = 0; slot < kp * ks; ++slot) {
        result.output.row(t) += result.gates(t, slot) * expert_output.row(result.plan.row_of_token_slot[t * kp * ks + slot]);
      }
    });
    if (training) {
      result.input = input;
    } else {
      result.input.resize(0, 0);
      result.pre_activations.resize(0, 0);
    }
    compute_losses(result, options);
  }

  /// Backward of a training-mode forward: takes ∂L/∂Y (T×d), returns ∂L/∂X (T×d) and ADDS the
  /// gradients of the caller's loss plus result.losses.total() into `gradients`.
  ///
  /// With r = ⟨∂L/∂y, E_{i,j}(x)⟩ of each chosen (i, j) and ι_{i,j} = ∂L/∂Importance_H(i,j):
  /// ∂L/∂G_p(x)_i += Σ_j G_i(x)_j·(r + ι_{i,j}), ∂L/∂G_i(x)_j += G_p(x)_i·(r + ι_{i,j}); with
  /// λ_{i,j} = ∂L/∂Load_H(i,j): ∂L/∂Load_p(X)_i = Σ_j λ_{i,j}·Load_i(X⁽ⁱ⁾)_j/|X⁽ⁱ⁾| (k_s/b for an
  /// empty group), ∂L/∂Load_i(X⁽ⁱ⁾)_j = λ_{i,j}·Load_p(X)_i/|X⁽ⁱ⁾| (0 for an empty group); then each
  /// gate's backward (NoisyTopKGate::backward) with the same noise sample as forward. The
  /// parameters must be those of the forward. Throws std::invalid_argument for a result of
  /// evaluation mode or of another layer shape, or arguments of the wrong shape.
  Matrix<Scalar> backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients) const {
    BackwardWorkspace workspace;
    Matrix<Scalar> d_input(result.num_tokens(), input_dim());
    backward(result, d_output, gradients, workspace, d_input);
    return d_input;
  }

  /// Like backward(result, d_output, gradients), writing ∂L/∂X into `d_input` (T×d) and reusing
  /// `workspace`: no allocation when the shapes are those of the previous call.
  void backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients,
                BackwardWorkspace& workspace, MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::HierarchicalMoELayer::backward";
    const Index tokens = result.num_tokens();
    const Index groups = num_groups();
    const Index per_group = group_size();
    const Index slots = k_groups() * k_per_group();
    detail::require(result.training, function,
                    "the result comes from an evaluation-mode forward (pass Mode::training to keep what backward needs)");
    detail::require(result.primary.num_experts() == groups && static_cast<Index>(result.secondary.size()) == groups &&
                        result.expert_ids.cols() == slots && result.plan.num_experts == num_experts() &&
                        result.input.cols() == input_dim(),
                    function, "the result does not come from a layer of this shape (a = ", groups, ", E = ",
                    num_experts(), ", d = ", input_dim(), ")");
    detail::require_shape(d_output, tokens, input_dim(), function, "d_output");
    detail::require_shape(d_input, tokens, input_dim(), function, "d_input");
    detail::require(static_cast<Index>(gradients.secondary.size()) == groups &&
                        static_cast<Index>(gradients.experts.size()) == num_experts(),
                    function, "gradients have ", gradients.secondary.size(), " groups and ", gradients.experts.size(),
                    " experts, the layer ", groups, " and ", num_experts());
    const DispatchPlan& plan = result.plan;
    const Index rows = plan.rows;

    // The experts: unscaled ∂L/∂y rows in, ⟨∂L/∂y, E(x)⟩ per row and ∂L/∂x rows out.
    Matrix<Scalar>& grouped_d_output = workspace.grouped_d_output;
    Vector<Scalar>& gate_of_row = workspace.gate_of_row;
    grouped_d_output.resize(rows, input_dim());
    gate_of_row.resize(rows);
    detail::parallel_for(rows, static_cast<double>(input_dim()), [&](Index r) {
      const Index token = plan.token_of_row[r];
      grouped_d_output.row(r) = d_output.row(token);
      gate_of_row[r] = result.gates(token, plan.slot_of_row[r]);
    });
    Matrix<Scalar>& d_grouped_input = workspace.d_grouped_input;
    Vector<Scalar>& d_gate_of_row = workspace.d_gate_of_row;
    bank_.backward(plan.offsets, result.grouped_input, result.pre_activations, grouped_d_output, gate_of_row,
                   d_grouped_input, d_gate_of_row, gradients.experts, workspace.experts);
    detail::parallel_for(tokens, static_cast<double>(slots * input_dim()), [&](Index t) {
      d_input.row(t).setZero();
      for (Index slot = 0; slot < slots; ++slot) d_input.row(t) += d_grouped_input.row(plan.row_of_token_slot[t * slots + slot]);
    });

    // ∂L/∂Importance_H and ∂L/∂Load_H (affine in the statistic, formed in double).
    const HierarchicalLosses<Scalar>& losses = result.losses;
    double importance_slope = 0, importance_offset = 0, load_slope = 0, load_offset = 0;
    detail::cv_squared_gradient_affine(losses.importance, importance_slope, importance_offset);
    detail::cv_squared_gradient_affine(losses.load, load_slope, load_offset);
    const double importance_weight = static_cast<double>(losses.importance_weight);
    const double load_weight = static_cast<double>(losses.load_weight);
    const auto d_importance = [&](Index e) {
      return importance_weight * (importance_slope * losses.importance[e] + importance_offset);
    };
    const auto d_load = [&](Index e) { return load_weight * (load_slope * losses.load[e] + load_offset); };

    // Both gates' weights: the product rule on G_p·G_i.
    GateGradients<Scalar>& primary_gradient = workspace.primary;
    std::vector<GateGradients<Scalar>>& secondary_gradients = workspace.secondary;
    primary_gradient.set_zero(result.primary);
    secondary_gradients.resize(static_cast<std::size_t>(groups));
    for (Index i = 0; i < groups; ++i) {
      secondary_gradients[static_cast<std::size_t>(i)].set_zero(result.secondary[static_cast<std::size_t>(i)]);
    }
    const Index ks = k_per_group();
    for (Index t = 0; t < tokens; ++t) {
      for (Index slot = 0; slot < slots; ++slot) {
        const Index p = slot / ks, q = slot % ks;
        const Index group = result.primary.expert_ids(t, p);
        const Routing<Scalar>& inner = result.secondary[static_cast<std::size_t>(group)];
        const Scalar d_gate = d_gate_of_row[plan.row_of_token_slot[t * slots + slot]] +
                              static_cast<Scalar>(d_importance(result.expert_ids(t, slot)));
        primary_gradient.gates(t, p) += inner.gates(t, q) * d_gate;
        secondary_gradients[static_cast<std::size_t>(group)].gates(t, q) += result.primary.gates(t, p) * d_gate;
      }
    }
    // The load: Load_H(i,j) = Load_p(i)·ratio(i,j), ratio = Load_i(j)/|X⁽ⁱ⁾| or k_s/b when empty.
    if (load_weight != 0.0) {
      const double uniform = static_cast<double>(ks) / static_cast<double>(per_group);
      detail::load_backward_by(
          result.primary,
          [&](Index i) {
            double sum = 0;
            for (Index j = 0; j < per_group; ++j) {
              const Index e = i * per_group + j;
              const Index count = losses.group_tokens[i];
              sum += d_load(e) * (count > 0 ? losses.secondary_load[e] / static_cast<double>(count) : uniform);
            }
            return static_cast<Scalar>(sum);
          },
          primary_gradient);
      for (Index i = 0; i < groups; ++i) {
        const Index count = losses.group_tokens[i];
        if (count == 0) continue;
        detail::load_backward_by(
            result.secondary[static_cast<std::size_t>(i)],
            [&](Index j) {
              const Index e = i * per_group + j;
              return static_cast<Scalar>(d_load(e) * losses.primary_load[i] / static_cast<double>(count));
            },
            secondary_gradients[static_cast<std::size_t>(i)], [&](Index t) { return routed_to(result.primary, t, i); });
      }
    }
    primary_.backward(result.primary, result.input, primary_gradient, gradients.primary.gate_weight(),
                      gradients.primary.noise_weight(), d_input);
    for (Index i = 0; i < groups; ++i) {
      const auto index = static_cast<std::size_t>(i);
      secondary_[index].backward(result.secondary[index], result.input, secondary_gradients[index],
                                 gradients.secondary[index].gate_weight(), gradients.secondary[index].noise_weight(),
                                 d_input);
    }
  }

 private:
  /// Validates the sizes before any member is built (the gate's own checks name other things).
  static const HierarchicalMoEConfig& checked(const HierarchicalMoEConfig& config) {
    const char* function = "sparsemoe::HierarchicalMoELayer";
    detail::require(config.input_dim >= 1, function, "input_dim must be >= 1, got ", config.input_dim);
    detail::require(config.hidden_dim >= 1, function, "hidden_dim must be >= 1, got ", config.hidden_dim);
    detail::require(config.num_groups >= 1, function, "num_groups must be >= 1, got ", config.num_groups);
    detail::require(config.num_experts >= 1 && config.num_experts % config.num_groups == 0, function,
                    "num_experts must be a positive multiple of num_groups = ", config.num_groups, ", got ",
                    config.num_experts);
    detail::require(config.k_groups >= 1 && config.k_groups <= config.num_groups, function,
                    "k_groups must be in [1, num_groups = ", config.num_groups, "], got ", config.k_groups);
    const Index per_group = config.num_experts / config.num_groups;
    detail::require(config.k_per_group >= 1 && config.k_per_group <= per_group, function,
                    "k_per_group must be in [1, group size = ", per_group, "], got ", config.k_per_group);
    return config;
  }

  /// Seed number `index` of the layer: splitmix64 applied index + 1 times from `seed`.
  static std::uint64_t derived_seed(std::uint64_t seed, Index index) {
    std::uint64_t state = seed;
    std::uint64_t value = 0;
    for (Index i = 0; i <= index; ++i) value = detail::splitmix64(state);
    return value;
  }

  /// Whether the primary gate sent token t to group i.
  static bool routed_to(const Routing<Scalar>& primary, Index t, Index group) {
    for (Index p = 0; p < primary.k(); ++p) {
      if (primary.expert_ids(t, p) == group) return true;
    }
    return false;
  }

  /// Importance_H, Load_H and their CV² (HierarchicalLosses).
  void compute_losses(Result& result, const HierarchicalForwardOptions& options) const {
    HierarchicalLosses<Scalar>& losses = result.losses;
    const Index groups = num_groups();
    const Index per_group = group_size();
    const Index tokens = result.num_tokens();
    losses.importance.setZero(num_experts());
    for (Index t = 0; t < tokens; ++t) {
      for (Index slot = 0; slot < result.gates.cols(); ++slot) {
        losses.importance[result.expert_ids(t, slot)] += static_cast<double>(result.gates(t, slot));
      }
    }
    hard_load(result.primary, losses.group_tokens);
    load(result.primary, losses.primary_load);
    losses.secondary_load.setZero(num_experts());
    losses.load.resize(num_experts());
    const double uniform = static_cast<double>(k_per_group()) / static_cast<double>(per_group);
    for (Index i = 0; i < groups; ++i) {
      const Routing<Scalar>& inner = result.secondary[static_cast<std::size_t>(i)];
      auto group_load = losses.secondary_load.segment(i * per_group, per_group);
      const auto member = [&](Index t) { return routed_to(result.primary, t, i); };
      if (inner.has_smooth_load()) {
        detail::for_each_load_term(inner, member, [&](Index, Index j, Scalar z, Index) {
          group_load[j] += static_cast<double>(normal_cdf(z));
        });
      } else {
        for (Index t = 0; t < tokens; ++t) {
          if (!member(t)) continue;
          for (Index q = 0; q < inner.k(); ++q) group_load[inner.expert_ids(t, q)] += 1.0;
        }
      }
      const Index count = losses.group_tokens[i];
      for (Index j = 0; j < per_group; ++j) {
        const double ratio = count > 0 ? group_load[j] / static_cast<double>(count) : uniform;
        losses.load[i * per_group + j] = losses.primary_load[i] * ratio;
      }
    }
    losses.smooth_load = result.primary.has_smooth_load() || result.secondary.front().has_smooth_load();
    losses.importance_cv_squared = static_cast<Scalar>(cv_squared(losses.importance));
    losses.load_cv_squared = static_cast<Scalar>(cv_squared(losses.load));
    losses.importance_weight = static_cast<Scalar>(options.importance_weight);
    losses.load_weight = static_cast<Scalar>(options.load_weight);
  }

  NoisyTopKGate<Scalar> primary_;
  std::vector<NoisyTopKGate<Scalar>> secondary_;
  ExpertBank<Scalar, ExpertT> bank_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_HIERARCHICAL_MOE_HPP
