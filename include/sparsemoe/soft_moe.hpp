// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_SOFT_MOE_HPP
#define SPARSEMOE_SOFT_MOE_HPP

/// \file soft_moe.hpp
/// Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts"): every expert
/// processes a few slots, each slot a convex combination of all tokens, and every token's output
/// a convex combination of all slot outputs. Fully differentiable, nothing dropped.

#include "config.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "expert.hpp"
#include "expert_bank.hpp"
#include "parameters.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup paradigms
/// @{

/// Sizes and options of a SoftMoELayer.
struct SoftMoEConfig {
  Index input_dim = 0;         ///< d, token width (input and output)
  Index hidden_dim = 0;        ///< h, hidden width of each expert
  Index num_experts = 0;       ///< E
  Index slots_per_expert = 1;  ///< n, slots each expert processes (S = E·n slots in all)
  /// The paper's normalisation: l2-normalise each token row of X and each column of Φ, and
  /// multiply the normalised Φ by a learned scalar scale (initialised to 1).
  bool normalize = false;
  std::uint64_t seed = 0;  ///< seed of Φ's and the experts' initialisation
};

/// What SoftMoELayer::forward computed for one batch of T tokens (S = E·n slots), and what
/// backward needs. Memory: O(T·S + S·(d + p)), plus T·d for the input copy in training mode.
template <typename Scalar>
struct SoftMoEResult {
  Matrix<Scalar> output;            ///< T×d: Y = C·Ỹ
  Matrix<Scalar> logits;            ///< T×S: L = X·Φ (normalised: scale·X̂·Φ̄)
  Matrix<Scalar> dispatch_weights;  ///< T×S: D, softmax of L over tokens (each column sums to 1)
  Matrix<Scalar> combine_weights;   ///< T×S: C, softmax of L over slots (each row sums to 1)
  Matrix<Scalar> slot_inputs;       ///< S×d: X̃ = Dᵀ·X
  Matrix<Scalar> slot_outputs;      ///< S×d: Ỹ, row s = E_{⌊s/n⌋}(X̃_s)
  Matrix<Scalar> pre_activations;   ///< S×p: X̃·W1 + b1 of each slot (training mode only)
  Matrix<Scalar> input;             ///< T×d: a copy of X (training mode only)
  Matrix<Scalar> normalized_input;  ///< T×d: X̂, the l2-normalised token rows (normalised layers only)
  Vector<Scalar> input_inverse_norms;  ///< T: 1/√(‖x_t‖² + ε) (normalised layers only)
  Matrix<Scalar> normalized_phi;    ///< d×S: Φ̄, the l2-normalised columns of Φ (normalised layers only)
  Vector<Scalar> phi_inverse_norms;  ///< S: 1/√(‖Φ_s‖² + ε) (normalised layers only)
  bool training = false;            ///< whether the forward kept what backward needs

  /// Number of tokens T.
  Index num_tokens() const { return output.rows(); }
  /// Number of slots S = E·n.
  Index num_slots() const { return logits.cols(); }
};

/// Gradients of every parameter of a SoftMoELayer, shaped like the parameters
/// (SoftMoELayer::make_gradients()).
template <typename Scalar, typename ExpertT>
struct SoftMoEGradients {
  Matrix<Scalar> phi;            ///< d×S: ∂L/∂Φ
  Vector<Scalar> scale;          ///< 1 entry: ∂L/∂scale (empty for a layer without normalisation)
  std::vector<ExpertT> experts;  ///< ∂L/∂(each expert's tensors), as expert-shaped tensors

  /// All gradient tensors, with the names and in the order of SoftMoELayer::tensors().
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    list.push_back(make_tensor_view("phi", phi));
    if (scale.size() > 0) list.push_back(make_tensor_view("scale", scale));
    detail::append_numbered_tensor_views(list, "expert", experts);
    return list;
  }

  /// Sets every gradient to zero.
  void set_zero() {
    phi.setZero();
    scale.setZero();
    for (auto& expert : experts) expert.set_zero();
  }
};

/// Scratch of SoftMoELayer::backward, reused across calls (no allocation when T and S repeat).
template <typename Scalar>
struct SoftMoEBackwardWorkspace {
  Matrix<Scalar> d_combine;         ///< T×S: ∂L/∂C
  Matrix<Scalar> d_dispatch;        ///< T×S: ∂L/∂D
  Matrix<Scalar> d_logits;          ///< T×S: ∂L/∂L through both softmaxes
  Matrix<Scalar> d_slot_outputs;    ///< S×d: ∂L/∂Ỹ
  Matrix<Scalar> d_slot_inputs;     ///< S×d: ∂L/∂X̃
  Vector<Scalar> slot_gates;        ///< empty: every slot output enters with weight 1
  Vector<Scalar> d_slot_gates;      ///< empty (no gate to differentiate)
  ExpertBankBackwardWorkspace<Scalar> experts;  ///< scratch of the experts' backward
  Matrix<Scalar> d_phi_normalized;  ///< d×S: X̂ᵀ·∂L (normalised layers only)
  Matrix<Scalar> d_input_normalized;  ///< T×d: ∂L/∂X̂ (normalised layers only)
};

/// Soft MoE layer over E experts with n slots each (Puigcerver et al. 2023).
///
/// For one batch X (T×d) and the slot parameters Φ (d×S, S = E·n):
/// \f[ L = X\Phi,\quad D_{ts} = \frac{e^{L_{ts}}}{\sum_{t'} e^{L_{t's}}},\quad
///     \tilde X = D^\top X,\quad \tilde Y_s = E_{\lfloor s/n \rfloor}(\tilde X_s),\quad
///     C_{ts} = \frac{e^{L_{ts}}}{\sum_{s'} e^{L_{ts'}}},\quad Y = C\,\tilde Y. \f]
/// With SoftMoEConfig::normalize, L = X̂·(scale·Φ̄): X̂ has the rows x_t/√(‖x_t‖² + ε), Φ̄ the
/// columns Φ_s/√(‖Φ_s‖² + ε), ε = normalization_epsilon (1e-6), scale a learned scalar.
///
/// "Tokens" are the T rows of ONE batch (a sequence, or whatever the caller groups): every
/// slot mixes all of them, so a token's output depends on every other token of the batch. Causal
/// (autoregressive) use, where a token may not see later ones, is out of scope.
///
/// Cost, forward: 2·T·d·S (logits) + 2·T·S·d (dispatch) + 2·T·S·d (combine) flops, plus the
/// experts on S rows, 2·S·d·(p + h); backward about twice that. No token is dropped and every
/// expert gets exactly n rows, whatever the batch. Parameters: Φ (d·S), the scale (1, normalised
/// layers only) and the E experts. forward and backward are const and keep no state: one layer
/// serves many threads, and results are bitwise identical for any thread count.
///
/// \tparam Scalar_ float or double.
/// \tparam ExpertT an expert type (expert.hpp): Expert<Scalar, Act>, SwiGluExpert<Scalar>, …
template <typename Scalar_, typename ExpertT = Expert<Scalar_, Relu>>
class SoftMoELayer {
 public:
  /// float or double.
  using Scalar = Scalar_;
  /// The expert type.
  using ExpertType = ExpertT;
  /// What forward returns.
  using Result = SoftMoEResult<Scalar>;
  /// What make_gradients() returns.
  using Gradients = SoftMoEGradients<Scalar, ExpertT>;
  /// Scratch of backward.
  using BackwardWorkspace = SoftMoEBackwardWorkspace<Scalar>;
  /// Scratch of forward (the experts' stage).
  using ForwardWorkspace = ExpertBankForwardWorkspace<Scalar>;
  static_assert(std::is_same<typename ExpertT::Scalar, Scalar>::value, "ExpertT::Scalar must be the layer's Scalar");

  /// ε of the l2 normalisation x/√(‖x‖² + ε) (the Soft MoE reference code's value).
  static constexpr double normalization_epsilon = 1e-6;

  /// Builds the layer: Φ drawn from U(−1/√d, 1/√d), the scale 1, expert i initialised by
  /// ExpertT::initialize_uniform, all from config.seed. Throws std::invalid_argument unless
  /// d, h, E ≥ 1 and n ≥ 1 (naming the bad value).
  explicit SoftMoELayer(const SoftMoEConfig& config) {
    detail::check_scalar<Scalar>();
    const char* function = "sparsemoe::SoftMoELayer";
    detail::require(config.input_dim >= 1, function, "input_dim must be >= 1, got ", config.input_dim);
    detail::require(config.hidden_dim >= 1, function, "hidden_dim must be >= 1, got ", config.hidden_dim);
    detail::require(config.num_experts >= 1, function, "num_experts must be >= 1, got ", config.num_experts);
    detail::require(config.slots_per_expert >= 1, function, "slots_per_expert must be >= 1, got ",
                    config.slots_per_expert);
    slots_per_expert_ = config.slots_per_expert;
    std::uint64_t state = config.seed;
    phi_.resize(config.input_dim, config.num_experts * config.slots_per_expert);
    detail::fill_uniform(phi_.data(), phi_.size(), Scalar(1) / std::sqrt(static_cast<Scalar>(config.input_dim)),
                         detail::splitmix64(state), 0);
    if (config.normalize) scale_ = Vector<Scalar>::Ones(1);
    std::vector<ExpertT> experts;
    experts.reserve(static_cast<std::size_t>(config.num_experts));
    for (Index e = 0; e < config.num_experts; ++e) {
      experts.emplace_back(config.input_dim, config.hidden_dim);
      experts.back().initialize_uniform(detail::splitmix64(state));
    }
    bank_ = ExpertBank<Scalar, ExpertT>(std::move(experts));
    slot_offsets_.resize(config.num_experts + 1);
    for (Index e = 0; e <= config.num_experts; ++e) slot_offsets_[e] = e * slots_per_expert_;
  }

  /// Token width d.
  Index input_dim() const { return phi_.rows(); }
  /// Hidden width h of each expert.
  Index hidden_dim() const { return bank_.hidden_dim(); }
  /// Number of experts E.
  Index num_experts() const { return bank_.num_experts(); }
  /// Slots per expert n.
  Index slots_per_expert() const { return slots_per_expert_; }
  /// Slots in all, S = E·n.
  Index num_slots() const { return phi_.cols(); }
  /// Whether the layer l2-normalises X and Φ and has a learned scale.
  bool normalized() const { return scale_.size() > 0; }

  /** @{ */
  /// Φ, d×S: column s holds the parameters of slot s (expert ⌊s/n⌋).
  Matrix<Scalar>& phi() { return phi_; }
  const Matrix<Scalar>& phi() const { return phi_; }
  /** @} */
  /** @{ */
  /// The learned scale of the normalised Φ: 1 entry, or empty for a layer without normalisation.
  Vector<Scalar>& scale() { return scale_; }
  const Vector<Scalar>& scale() const { return scale_; }
  /** @} */
  /** @{ */
  /// Expert e (0 ≤ e < E; throws std::out_of_range otherwise).
  ExpertT& expert(Index e) { return bank_.expert(e); }
  const ExpertT& expert(Index e) const { return bank_.expert(e); }
  /** @} */
  /// The E experts as one ExpertBank: expert e owns the slot rows [e·n, (e+1)·n).
  const ExpertBank<Scalar, ExpertT>& expert_bank() const { return bank_; }

  /// Φ ("phi"), the scale ("scale", normalised layers only), then each expert's tensors
  /// ("expert<e>.<name>"), in that order.
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list;
    list.push_back(make_tensor_view("phi", phi_));
    if (normalized()) list.push_back(make_tensor_view("scale", scale_));
    append_tensor_views(list, "", bank_.tensors());
    return list;
  }

  /// Zero gradients shaped like every parameter.
  Gradients make_gradients() const {
    Gradients gradients;
    gradients.phi = Matrix<Scalar>::Zero(phi_.rows(), phi_.cols());
    gradients.scale = Vector<Scalar>::Zero(scale_.size());
    gradients.experts = bank_.make_gradients();
    return gradients;
  }

  /// Runs the layer on the T×d batch `input` (T ≥ 1). In Mode::training the result also keeps
  /// the input and the pre-activations for backward. Throws std::invalid_argument for a wrong
  /// width, T = 0 or a non-finite input entry (naming its token row).
  Result forward(ConstMatrixRef<Scalar> input, Mode mode = Mode::evaluation) const {
    Result result;
    ForwardWorkspace workspace;
    forward(input, mode, result, workspace);
    return result;
  }

  /// Like forward(input, mode), writing into `result` and reusing its storage and `workspace`'s.
  void forward(ConstMatrixRef<Scalar> input, Mode mode, Result& result, ForwardWorkspace& workspace) const {
    const char* function = "sparsemoe::SoftMoELayer::forward";
    check_input(input, function);
    const Index tokens = input.rows();
    const Index slots = num_slots();
    const Index width = input_dim();
    const bool training = mode == Mode::training;
    result.training = training;
    result.logits.resize(tokens, slots);
    result.dispatch_weights.resize(tokens, slots);
    result.combine_weights.resize(tokens, slots);
    result.slot_inputs.resize(slots, width);
    result.slot_outputs.resize(slots, width);
    result.output.resize(tokens, width);
    result.input.resize(training ? tokens : 0, width);
    if (training) result.input = input;

    // Logits.
    if (normalized()) {
      normalize_rows(input, result.normalized_input, result.input_inverse_norms);
      result.normalized_phi.resize(width, slots);
      result.phi_inverse_norms.resize(slots);
      detail::parallel_for(slots, 4.0 * static_cast<double>(width), [&](Index s) {
        const Scalar inverse =
            Scalar(1) / std::sqrt(phi_.col(s).squaredNorm() + static_cast<Scalar>(normalization_epsilon));
        result.phi_inverse_norms[s] = inverse;
        result.normalized_phi.col(s) = phi_.col(s) * inverse;
      });
      row_tiled_product(detail::operand(result.normalized_input), detail::operand(result.normalized_phi),
                        result.logits, scale_[0], false);
    } else {
      result.normalized_input.resize(0, 0);
      result.input_inverse_norms.resize(0);
      result.normalized_phi.resize(0, 0);
      result.phi_inverse_norms.resize(0);
      row_tiled_product(detail::operand(input), detail::operand(phi_), result.logits, Scalar(1), false);
    }

    // D: softmax over tokens, one column (slot) at a time; C: softmax over slots, one row at a time.
    detail::parallel_for(slots, 4.0 * static_cast<double>(tokens), [&](Index s) {
      const auto logits = result.logits.col(s);
      auto weights = result.dispatch_weights.col(s);
      const Scalar top = logits.maxCoeff();
      weights = (logits.array() - top).exp().matrix();
      weights /= weights.sum();
    });
    detail::parallel_for(tokens, 4.0 * static_cast<double>(slots), [&](Index t) {
      const auto logits = result.logits.row(t);
      auto weights = result.combine_weights.row(t);
      const Scalar top = logits.maxCoeff();
      weights = (logits.array() - top).exp().matrix();
      weights /= weights.sum();
    });

    // X̃ = Dᵀ·X, experts over their n slots each, Y = C·Ỹ.
    row_tiled_product(detail::operand(result.dispatch_weights, detail::Op::transpose), detail::operand(input),
                      result.slot_inputs, Scalar(1), false);
    if (!training) result.pre_activations.resize(0, 0);
    bank_.forward(slot_offsets_, result.slot_inputs, training ? &result.pre_activations : nullptr,
                  result.slot_outputs, workspace);
    row_tiled_product(detail::operand(result.combine_weights), detail::operand(result.slot_outputs), result.output,
                      Scalar(1), false);
  }

  /// Backward of a training-mode forward: takes ∂L/∂Y (T×d), returns ∂L/∂X (T×d) and ADDS the
  /// parameter gradients into `gradients` (call gradients.set_zero() first). Exact through both
  /// softmaxes (∂L/∂L = C ⊙ (∂C − rowsum(C ⊙ ∂C)) + D ⊙ (∂D − colsum(D ⊙ ∂D)), ∂C = ∂Y·Ỹᵀ,
  /// ∂D = X·∂X̃ᵀ), the experts and, when normalised, the l2 normalisations and the scale. The
  /// parameters must be those of the forward. Throws std::invalid_argument for a result of
  /// evaluation mode or of another shape, or gradients of another shape.
  Matrix<Scalar> backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients) const {
    BackwardWorkspace workspace;
    Matrix<Scalar> d_input(result.num_tokens(), input_dim());
    backward(result, d_output, gradients, workspace, d_input);
    return d_input;
  }

  /// Like backward(result, d_output, gradients), writing ∂L/∂X into `d_input` (T×d) and reusing
  /// `workspace`: no allocation when T and S are those of the previous call.
  void backward(const Result& result, ConstMatrixRef<Scalar> d_output, Gradients& gradients,
                BackwardWorkspace& workspace, MatrixRef<Scalar> d_input) const {
    const char* function = "sparsemoe::SoftMoELayer::backward";
    const Index tokens = result.num_tokens();
    const Index slots = num_slots();
    const Index width = input_dim();
    detail::require(result.training, function,
                    "the result comes from an evaluation-mode forward (pass Mode::training to keep what backward needs)");
    detail::require(result.logits.cols() == slots && result.slot_outputs.rows() == slots &&
                        result.input.rows() == tokens && result.input.cols() == width &&
                        result.pre_activations.rows() == slots && result.normalized_phi.cols() == (normalized() ? slots : 0),
                    function, "the result does not come from a layer of this shape (S = ", slots, ", d = ", width,
                    ")");
    detail::require_shape(d_output, tokens, width, function, "d_output");
    detail::require_shape(d_input, tokens, width, function, "d_input");
    detail::require_shape(gradients.phi, width, slots, function, "gradients.phi");
    detail::require_shape(gradients.scale, scale_.size(), 1, function, "gradients.scale");
    detail::require(static_cast<Index>(gradients.experts.size()) == num_experts(), function, "gradients.experts has ",
                    gradients.experts.size(), " experts, the layer ", num_experts());
    const auto& input = result.input;
    const auto& dispatch = result.dispatch_weights;
    const auto& combine = result.combine_weights;
    workspace.d_combine.resize(tokens, slots);
    workspace.d_dispatch.resize(tokens, slots);
    workspace.d_logits.resize(tokens, slots);
    workspace.d_slot_outputs.resize(slots, width);
    workspace.slot_gates.resize(0);

    // Y = C·Ỹ: ∂C = ∂Y·Ỹᵀ, ∂Ỹ = Cᵀ·∂Y.
    row_tiled_product(detail::operand(d_output), detail::operand(result.slot_outputs, detail::Op::transpose),
                      workspace.d_combine, Scalar(1), false);
    row_tiled_product(detail::operand(combine, detail::Op::transpose), detail::operand(d_output),
                      workspace.d_slot_outputs, Scalar(1), false);
    // The experts, each slot with weight 1.
    bank_.backward(slot_offsets_, result.slot_inputs, result.pre_activations, workspace.d_slot_outputs,
                   workspace.slot_gates, workspace.d_slot_inputs, workspace.d_slot_gates, gradients.experts,
                   workspace.experts);
    // X̃ = Dᵀ·X: ∂D = X·∂X̃ᵀ, ∂X = D·∂X̃.
    row_tiled_product(detail::operand(input), detail::operand(workspace.d_slot_inputs, detail::Op::transpose),
                      workspace.d_dispatch, Scalar(1), false);
    row_tiled_product(detail::operand(dispatch), detail::operand(workspace.d_slot_inputs), d_input, Scalar(1), false);
    // Both softmaxes back into the logits.
    detail::parallel_for(tokens, 4.0 * static_cast<double>(slots), [&](Index t) {
      const Scalar weighted = combine.row(t).dot(workspace.d_combine.row(t));
      workspace.d_logits.row(t) =
          (combine.row(t).array() * (workspace.d_combine.row(t).array() - weighted)).matrix();
    });
    detail::parallel_for(slots, 4.0 * static_cast<double>(tokens), [&](Index s) {
      const Scalar weighted = dispatch.col(s).dot(workspace.d_dispatch.col(s));
      workspace.d_logits.col(s) +=
          (dispatch.col(s).array() * (workspace.d_dispatch.col(s).array() - weighted)).matrix();
    });

    if (!normalized()) {
      // L = X·Φ: ∂Φ += Xᵀ·∂L, ∂X += ∂L·Φᵀ.
      row_tiled_product(detail::operand(input, detail::Op::transpose), detail::operand(workspace.d_logits),
                        gradients.phi, Scalar(1), true);
      row_tiled_product(detail::operand(workspace.d_logits), detail::operand(phi_, detail::Op::transpose), d_input,
                        Scalar(1), true);
      return;
    }
    // L = scale·X̂·Φ̄: ∂(scale·Φ̄) = X̂ᵀ·∂L, ∂X̂ = scale·∂L·Φ̄ᵀ, then through u = v/√(‖v‖² + ε):
    // ∂v = (∂u − u·⟨u, ∂u⟩)/√(‖v‖² + ε).
    const Scalar scale = scale_[0];
    workspace.d_phi_normalized.resize(width, slots);
    workspace.d_input_normalized.resize(tokens, width);
    row_tiled_product(detail::operand(result.normalized_input, detail::Op::transpose),
                      detail::operand(workspace.d_logits), workspace.d_phi_normalized, Scalar(1), false);
    row_tiled_product(detail::operand(workspace.d_logits),
                      detail::operand(result.normalized_phi, detail::Op::transpose), workspace.d_input_normalized,
                      scale, false);
    Scalar d_scale = 0;
    for (Index s = 0; s < slots; ++s) {
      const auto d_column = workspace.d_phi_normalized.col(s);
      const auto column = result.normalized_phi.col(s);
      const Scalar projection = column.dot(d_column);
      d_scale += projection;
      gradients.phi.col(s) += (scale * result.phi_inverse_norms[s]) * (d_column - projection * column);
    }
    gradients.scale[0] += d_scale;
    detail::parallel_for(tokens, 4.0 * static_cast<double>(width), [&](Index t) {
      const auto d_row = workspace.d_input_normalized.row(t);
      const auto row = result.normalized_input.row(t);
      d_input.row(t) += result.input_inverse_norms[t] * (d_row - row.dot(d_row) * row);
    });
  }

 private:
  void check_input(ConstMatrixRef<Scalar> input, const char* function) const {
    detail::require(input.cols() == input_dim(), function, "input must have ", input_dim(),
                    " columns (the layer's input_dim), got ", input.rows(), "x", input.cols());
    detail::require(input.rows() >= 1, function, "input must have at least one token row, got 0");
    for (Index t = 0; t < input.rows(); ++t) {
      detail::require(input.row(t).allFinite(), function, "non-finite input in token row ", t);
    }
  }

  /// Columns of one output tile of row_tiled_product.
  static constexpr Index product_column_tile = 64;
  /// Depth of one GEMM call of row_tiled_product: with 64×64 output tiles the backend's packing
  /// buffers (depth × 64 scalars each) then fit its stack allowance, so no call allocates.
  static constexpr Index product_depth_chunk = 128;

  /// The block of rows [row, row + rows) and columns [col, col + cols) of op(x), as an operand.
  static detail::ConstOperand<Scalar> block(const detail::ConstOperand<Scalar>& x, Index row, Index rows, Index col,
                                            Index cols) {
    detail::ConstOperand<Scalar> part = x;
    if (x.op == detail::Op::none) {
      part.data = x.data + row * x.stride + col;
      part.rows = rows;
      part.cols = cols;
    } else {
      part.data = x.data + col * x.stride + row;
      part.rows = cols;
      part.cols = rows;
    }
    return part;
  }

  /// result = alpha·op(A)·op(B) (+ result when accumulate), in output tiles of 64×64 spread over
  /// the threads, each summed over the depth in chunks of product_depth_chunk in a fixed order:
  /// results do not depend on the thread count, and nothing is allocated.
  static void row_tiled_product(const detail::ConstOperand<Scalar>& a, const detail::ConstOperand<Scalar>& b,
                                MatrixRef<Scalar> result, Scalar alpha, bool accumulate) {
    const Index rows = a.op_rows();
    const Index depth = a.op_cols();
    const Index cols = b.op_cols();
    SPARSEMOE_ASSERT(result.rows() == rows && result.cols() == cols && b.op_rows() == depth);
    const Index column_tiles = detail::tile_count(cols, product_column_tile);
    const double tile_flops = 2.0 * static_cast<double>(detail::row_tile * product_column_tile * depth);
    detail::parallel_for(detail::tile_count(rows, detail::row_tile) * column_tiles, tile_flops, [&](Index tile) {
      const Index first_row = tile / column_tiles * detail::row_tile;
      const Index first_col = tile % column_tiles * product_column_tile;
      const Index tile_rows = std::min(detail::row_tile, rows - first_row);
      const Index tile_cols = std::min(product_column_tile, cols - first_col);
      Scalar* output = result.data() + first_row * result.outerStride() + first_col;
      for (Index k = 0; k == 0 || k < depth; k += product_depth_chunk) {
        const Index chunk = std::min(product_depth_chunk, depth - k);
        detail::gemm(block(a, first_row, tile_rows, k, chunk), block(b, k, chunk, first_col, tile_cols), output,
                     result.outerStride(), alpha, accumulate || k > 0);
      }
    });
  }

  /// Row t of `normalized` = row t of `values`·r_t, r_t = 1/√(‖row t‖² + ε) (into inverse_norms).
  static void normalize_rows(ConstMatrixRef<Scalar> values, Matrix<Scalar>& normalized, Vector<Scalar>& inverse_norms) {
    normalized.resize(values.rows(), values.cols());
    inverse_norms.resize(values.rows());
    detail::parallel_for(values.rows(), 4.0 * static_cast<double>(values.cols()), [&](Index t) {
      const Scalar inverse =
          Scalar(1) / std::sqrt(values.row(t).squaredNorm() + static_cast<Scalar>(normalization_epsilon));
      inverse_norms[t] = inverse;
      normalized.row(t) = values.row(t) * inverse;
    });
  }

  Index slots_per_expert_ = 1;
  Matrix<Scalar> phi_;
  Vector<Scalar> scale_;
  ExpertBank<Scalar, ExpertT> bank_;
  IndexVector slot_offsets_;  ///< E+1: expert e owns the slot rows [e·n, (e+1)·n)
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_SOFT_MOE_HPP
