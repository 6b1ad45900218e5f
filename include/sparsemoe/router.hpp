// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_HPP
#define SPARSEMOE_ROUTER_HPP

/// \file router.hpp
/// The Router concept shared by the top-k routers (router/softmax_top_k.hpp,
/// router/sigmoid_top_k.hpp, router/switch.hpp): the record a router fills for a batch
/// (TopKRouting), the upstream gradients its backward consumes (TopKRoutingGradient), the
/// gradients of its linear parameters (RouterGradients), and the building blocks they share.
///
/// \section router_concept The Router concept
///
/// Notation: T tokens (rows of the input), d = input_dim(), E = num_experts(), k = k().
/// A type `R` is a Router when, for `r` an `R`, `cr` a `const R`, `x` a T×d
/// `ConstMatrixRef<R::Scalar>`, `options` a RouteOptions, `routing` a `TopKRouting<R::Scalar>`,
/// `upstream` a `TopKRoutingGradient<R::Scalar>`, `g` an `R::Gradients` and `dx` a T×d
/// `MatrixRef<R::Scalar>`, these are valid:
///
/// | expression | result | meaning |
/// | --- | --- | --- |
/// | `R::Scalar` | float or double | the scalar of parameters, input and every output |
/// | `R::Gradients` | a type | holds the parameter gradients (RouterGradients here) |
/// | `cr.input_dim()`, `cr.num_experts()`, `cr.k()` | Index | d, E, and the slots per token |
/// | `cr.route(x, options, routing)` | void | fills `routing` (shapes below); reuses its storage, so nothing is allocated when T repeats |
/// | `cr.backward(routing, x, upstream, g, dx)` | void | ADDS ∂L/∂parameters to `g` and ∂L/∂x to `dx` |
/// | `r.tensors()` | `std::vector<TensorView<Scalar>>` | the parameters that carry a gradient, in the order of `g.tensors()` |
/// | `r.state()` | `std::vector<TensorView<Scalar>>` | state without a gradient (may be empty) |
/// | `cr.make_gradients()` | `R::Gradients` | zeroed gradients shaped like `tensors()` |
/// | `g.tensors()`, `g.set_zero()` | | the gradient tensors (same names and shapes), zeroing |
///
/// `route` and `backward` are const and keep no state of their own, so concurrent calls on one
/// router are safe while nobody changes its parameters. Their results are bitwise identical for
/// any OpenMP thread count. Random decisions (GShard's second expert, Switch's input jitter) are
/// functions of (the router's seed, `options.step`, token row, column) only.
///
/// `backward` takes the routing of the forward pass and the same input. `upstream` holds the
/// gradients of the loss with respect to the router's outputs, accumulated by whoever used them:
/// `upstream.gates` (T×k) by the layer's combine step, `upstream.scores` (T×E) by balance losses,
/// `upstream.logits` (T×E) by the z-loss (see balance_losses.hpp). Selection (which experts are
/// chosen) is piecewise constant and has no gradient; a slot with id −1 (not dispatched) gets
/// none either.
///
/// \section router_checkpoint Parameters and state in a checkpoint
///
/// `tensors()` lists what an optimizer updates (the weight W_r, d×E, and, when the router has
/// one, the bias b_r, E×1). `state()` lists tensors that a checkpoint must keep for an exact
/// resume but that no optimizer touches: DeepSeek-V3's selection bias (E×1), updated by
/// update_selection_bias(). checkpoint.hpp stores `state()` after the layer's parameter tensors,
/// under "router.state." (e.g. "router.state.selection_bias"), and fills them back through the
/// same views; it also stores the router's kind and options, through the RouterKind
/// specialisation next to each router (router/router_kind.hpp).
///
/// \section router_ties Ties and non-finite values
///
/// Every top-k here ranks by descending score and breaks exact ties toward the lower expert id
/// (and the lower group id for groups), whatever the thread count. Logits are checked: a
/// non-finite logit makes `route` throw std::invalid_argument naming the token row, the expert
/// and the value (the check can be switched off per router; then NaN ranks last, below −∞).

#include "config.hpp"
#include "detail/gemm.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "parameters.hpp"
#include "dispatch.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace sparsemoe {

/// \addtogroup routers
/// @{

/// Per-call options of Router::route.
struct RouteOptions {
  /// Training turns on a router's random parts (GShard's second-expert sampling, Switch's input
  /// jitter); evaluation is deterministic without them.
  Mode mode = Mode::evaluation;
  /// Sample index of the random parts: the same (seed, step) always gives the same decisions.
  /// Must be below 2^32 for routers that draw random numbers.
  std::uint64_t step = 0;
  /// Global row of the batch's first token: the random draws of local row t are keyed by token
  /// row token_offset + t, so that a batch split into parts (over the ranks of
  /// DistributedMoELayer, which passes the exclusive prefix sum of the ranks' token counts) draws
  /// what the whole batch draws. 0 (the default) for a batch on its own.
  std::uint64_t token_offset = 0;
};

/// What a top-k router decided for a batch of T tokens over E experts, and what its backward
/// needs. Filled by Router::route, which reuses the storage. Memory: O(T·E) (plus O(T·d) with
/// input jitter).
template <typename Scalar>
struct TopKRouting {
  /// T×k: the chosen experts of each token, by descending selection score (the router documents
  /// which score), ties to the lower id. −1 marks a slot that is not dispatched (GShard's dropped
  /// second expert); ids in a row are otherwise distinct and in [0, E).
  IndexMatrix expert_ids;
  /// T×k: combine weights of the slots (after any renormalisation, then times the routed scale);
  /// 0 where the id is −1.
  Matrix<Scalar> gates;
  /// T×E: z = x·W_r (+ b_r when the router has a bias).
  Matrix<Scalar> logits;
  /// T×E: the per-expert probabilities, softmax(z) or σ(z) by router; the P of balance losses.
  Matrix<Scalar> scores;
  /// T×G: group scores of group-limited selection (G = number of groups); empty without groups.
  Matrix<Scalar> group_scores;
  /// T×M: the M groups kept per token, by descending group score, ties to the lower group id;
  /// empty without groups.
  IndexMatrix selected_groups;
  /// T×d: multiplicative input jitter m ~ U(1−ε, 1+ε) (Switch in training with ε > 0); else empty.
  Matrix<Scalar> input_jitter;
  /// T×d: x ⊙ m, the input the router weight saw (with input jitter); else empty.
  Matrix<Scalar> jittered_input;

  /// Number of tokens T.
  Index num_tokens() const { return expert_ids.rows(); }
  /// Slots per token k.
  Index k() const { return expert_ids.cols(); }
  /// Number of experts E.
  Index num_experts() const { return logits.cols(); }
  /// Whether input jitter was applied (then backward reads jittered_input and input_jitter).
  bool jittered() const { return input_jitter.cols() > 0; }
};

/// Upstream gradients of one batch with respect to a TopKRouting's outputs, accumulated by the
/// layer and the loss terms, consumed by Router::backward. Entries of slots with id −1 are ignored.
template <typename Scalar>
struct TopKRoutingGradient {
  Matrix<Scalar> gates;   ///< T×k: ∂L/∂gates
  Matrix<Scalar> scores;  ///< T×E: direct ∂L/∂scores (balance losses)
  Matrix<Scalar> logits;  ///< T×E: direct ∂L/∂logits, not through the scores (z-loss)

  /// Shapes every member for `routing` and zeroes it, reusing storage of the same size.
  void set_zero(const TopKRouting<Scalar>& routing) {
    gates.setZero(routing.num_tokens(), routing.k());
    scores.setZero(routing.num_tokens(), routing.num_experts());
    logits.setZero(routing.num_tokens(), routing.num_experts());
  }
};

/// Gradients of a linear router's parameters (W_r d×E, optional b_r E), accumulated by
/// Router::backward, plus the T×E workspace that backward writes ∂L/∂z into.
template <typename Scalar>
struct RouterGradients {
  Matrix<Scalar> weight;  ///< d×E: ∂L/∂W_r
  Vector<Scalar> bias;    ///< E (empty when the router has no bias): ∂L/∂b_r
  /// T×E workspace, not a parameter gradient: after backward, the total ∂L/∂z of that batch
  /// (overwritten, not accumulated). Kept here so that backward allocates nothing when T repeats.
  Matrix<Scalar> logits;

  /// "weight", then "bias" when present: the names and shapes of Router::tensors().
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list{make_tensor_view("weight", weight)};
    if (bias.size() > 0) list.push_back(make_tensor_view("bias", bias));
    return list;
  }

  /// Zeroes the parameter gradients (not the workspace).
  void set_zero() {
    weight.setZero();
    bias.setZero();
  }
};

/// The parameters every linear router shares, and what it does with them alone: W_r (d×E) and an
/// optional bias b_r (E) of the scores z = x·W_r (+ b_r). SoftmaxTopKRouter, SigmoidTopKRouter,
/// SwitchRouter and GShardRouter derive from it; a new linear router does too, and writes only its
/// routing and its backward.
///
/// \tparam Scalar float or double.
template <typename Scalar>
class LinearRouterParameters {
 public:
  /// Width d of the input rows.
  Index input_dim() const { return weight_.rows(); }
  /// Number of experts E.
  Index num_experts() const { return weight_.cols(); }

  /// W_r, d×E: z = x·W_r (keep its shape: route and backward check it).
  Matrix<Scalar>& weight() { return weight_; }
  /// W_r, d×E.
  const Matrix<Scalar>& weight() const { return weight_; }
  /// b_r, E entries (empty when the router was built without a bias).
  Vector<Scalar>& bias() { return bias_; }
  /// b_r, E entries or empty.
  const Vector<Scalar>& bias() const { return bias_; }

  /// Sets W_r to U(−1/√d, 1/√d) draws that depend only on `seed`, and b_r to zero (a router's
  /// state, such as a selection bias, is left as it is).
  void initialize_uniform(std::uint64_t seed) {
    const Scalar bound = Scalar(1) / std::sqrt(static_cast<Scalar>(input_dim()));
    detail::fill_uniform(weight_.data(), weight_.size(), bound, seed, 0);
    bias_.setZero();
  }

  /// "weight" (d×E), then "bias" (E×1) when there is one: the parameters with a gradient.
  std::vector<TensorView<Scalar>> tensors() {
    std::vector<TensorView<Scalar>> list{make_tensor_view("weight", weight_)};
    if (bias_.size() > 0) list.push_back(make_tensor_view("bias", bias_));
    return list;
  }

  /// Zero gradients shaped like tensors().
  RouterGradients<Scalar> make_gradients() const {
    RouterGradients<Scalar> gradients;
    gradients.weight = Matrix<Scalar>::Zero(input_dim(), num_experts());
    gradients.bias = Vector<Scalar>::Zero(bias_.size());
    return gradients;
  }

 protected:
  /// No parameters yet: the derived router's constructor checks d and E, then calls
  /// allocate_parameters.
  LinearRouterParameters() = default;

  /// W_r = 0 (d×E) and, with `use_bias`, b_r = 0 (E entries); otherwise b_r empty.
  void allocate_parameters(Index input_dim, Index num_experts, bool use_bias) {
    weight_ = Matrix<Scalar>::Zero(input_dim, num_experts);
    bias_ = Vector<Scalar>::Zero(use_bias ? num_experts : 0);
  }

  /// W_r, d×E.
  Matrix<Scalar> weight_;
  /// b_r, E entries or empty.
  Vector<Scalar> bias_;
};

/// Counts, into `counts` (E entries, storage reused), the slots routed to each expert; slots with
/// id −1 are not counted. O(T·k). The input of update_selection_bias and of balance statistics.
template <typename Scalar>
void count_tokens_per_expert(const TopKRouting<Scalar>& routing, IndexVector& counts) {
  counts.setZero(routing.num_experts());
  for (Index token = 0; token < routing.num_tokens(); ++token) {
    for (Index slot = 0; slot < routing.k(); ++slot) {
      const Index expert = routing.expert_ids(token, slot);
      if (expert >= 0) ++counts[expert];
    }
  }
}

namespace detail {

/// One uniform draw in [0, 1) addressed by (seed, step, token, column): Philox4x32-10 with
/// counter (column, token low word, token high word, step) and key = seed, as standard_normal
/// does, keeping the top 53 bits of the first two words. `step` and `column` must be below 2^32.
inline double counter_uniform(std::uint64_t seed, std::uint64_t step, std::uint64_t token, std::uint64_t column) {
  const std::array<std::uint32_t, 4> bits = philox4x32_10(
      {static_cast<std::uint32_t>(column), static_cast<std::uint32_t>(token), static_cast<std::uint32_t>(token >> 32),
       static_cast<std::uint32_t>(step)},
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
  const std::uint64_t word = (static_cast<std::uint64_t>(bits[0]) << 32 | bits[1]) >> 11;
  return static_cast<double>(word) * (1.0 / 9007199254740992.0);
}

/// Writes to ids[0..count) the `count` candidates i in [0, size) with allowed(i) of largest
/// value(i), largest first, ties to the lower index, NaN last (ranks_before). Candidates are
/// scanned in increasing index, so an equal value never displaces an earlier one.
/// O(size·count) calls of value(); no allocation. Requires at least `count` allowed candidates.
template <typename Value, typename Allowed>
void select_top_by(Index size, Index count, const Value& value, const Allowed& allowed, Index* ids) {
  if (count == 0) return;
  Index filled = 0;
  for (Index candidate = 0; candidate < size; ++candidate) {
    if (!allowed(candidate)) continue;
    const auto candidate_value = value(candidate);
    if (filled == count && !ranks_before(candidate_value, value(ids[count - 1]))) continue;
    Index position = filled < count ? filled++ : count - 1;
    while (position > 0 && ranks_before(candidate_value, value(ids[position - 1]))) {
      ids[position] = ids[position - 1];
      --position;
    }
    ids[position] = candidate;
  }
  SPARSEMOE_ASSERT(filled == count);
}

/// p = softmax(z) over one token's `size` logits (max subtracted), in Scalar. O(size).
template <typename Scalar>
void softmax_row(const Scalar* z, Index size, Scalar* p) {
  Scalar top = z[0];
  for (Index i = 1; i < size; ++i) top = std::max(top, z[i]);
  Scalar sum = 0;
  for (Index i = 0; i < size; ++i) sum += p[i] = std::exp(z[i] - top);
  for (Index i = 0; i < size; ++i) p[i] /= sum;
}

/// Through the softmax of one token: on entry gradient[i] = ∂L/∂p_i, on return
/// ∂L/∂z_i = p_i·(∂L/∂p_i − Σ_m p_m·∂L/∂p_m) + direct[i] (the direct ∂L/∂z_i). O(size).
template <typename Scalar>
void softmax_backward_row(const Scalar* p, const Scalar* direct, Index size, Scalar* gradient) {
  Scalar dot = 0;
  for (Index i = 0; i < size; ++i) dot += p[i] * gradient[i];
  for (Index i = 0; i < size; ++i) gradient[i] = p[i] * (gradient[i] - dot) + direct[i];
}

/// Options every linear router validates the same way.
inline void require_group_options(const char* function, Index num_experts, Index k, Index num_groups,
                                  Index top_groups) {
  require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
  require(num_experts <= Index(0xFFFFFFFF), function, "num_experts must be < 2^32, got ", num_experts);
  require(k >= 1 && k <= num_experts, function, "k must be in [1, num_experts = ", num_experts, "], got ", k);
  require(num_groups >= 1 && num_experts % num_groups == 0, function, "num_groups must be >= 1 and divide num_experts = ",
          num_experts, ", got ", num_groups);
  require(top_groups >= 1 && top_groups <= num_groups, function, "top_groups must be in [1, num_groups = ", num_groups,
          "], got ", top_groups);
  const Index reachable = top_groups * (num_experts / num_groups);
  require(k <= reachable, function, "k must be <= top_groups * num_experts / num_groups = ", reachable,
          " (the experts of the kept groups), got ", k);
}

/// logits = input·weight (+ bias), row tile by row tile (fixed tiles: the result does not depend
/// on the thread count). `logits` must already be T×E. Cost: 2·T·d·E flops.
template <typename Scalar>
void linear_logits(const ConstMatrixRef<Scalar>& input, const Matrix<Scalar>& weight, const Vector<Scalar>& bias,
                   Matrix<Scalar>& logits) {
  const Index tokens = input.rows();
  const Index experts = weight.cols();
  const bool has_bias = bias.size() > 0;
  const double tile_flops = 2.0 * static_cast<double>(row_tile * weight.rows() * experts);
  parallel_for(tile_count(tokens, row_tile), tile_flops, [&](Index tile) {
    const Index first = tile * row_tile;
    const Index rows = std::min(row_tile, tokens - first);
    gemm(operand(input.middleRows(first, rows)), operand(weight), logits.row(first).data(), experts, Scalar(1), false);
    if (has_bias) logits.middleRows(first, rows).rowwise() += bias.transpose();
  });
}

/// Throws std::invalid_argument naming the first non-finite logit (token row, expert, value).
template <typename Scalar>
void require_finite_logits(const Matrix<Scalar>& logits, const char* function) {
  for (Index token = 0; token < logits.rows(); ++token) {
    if (logits.row(token).allFinite()) continue;
    Index expert = 0;
    while (std::isfinite(logits(token, expert))) ++expert;
    require(false, function, "non-finite router logit ", logits(token, expert), " in token row ", token,
            ", expert ", expert, " (check the input for NaN/Inf, or the router weights)");
  }
}

/// Checks the shapes of Router::backward's arguments.
template <typename Scalar>
void require_backward_shapes(const char* function, const TopKRouting<Scalar>& routing,
                             const ConstMatrixRef<Scalar>& input, const TopKRoutingGradient<Scalar>& upstream,
                             const RouterGradients<Scalar>& gradients, const MatrixRef<Scalar>& d_input,
                             Index input_dim, Index num_experts, Index k, bool has_bias) {
  const Index tokens = routing.num_tokens();
  require(routing.num_experts() == num_experts && routing.k() == k && routing.scores.rows() == tokens &&
              routing.scores.cols() == num_experts && routing.gates.rows() == tokens && routing.gates.cols() == k,
          function, "routing has E=", routing.num_experts(), ", k=", routing.k(), " but the router has E=",
          num_experts, ", k=", k);
  require_shape(input, tokens, input_dim, function, "input");
  require_shape(upstream.gates, tokens, k, function, "upstream.gates");
  require_shape(upstream.scores, tokens, num_experts, function, "upstream.scores");
  require_shape(upstream.logits, tokens, num_experts, function, "upstream.logits");
  require_shape(gradients.weight, input_dim, num_experts, function, "parameter_gradients.weight");
  require_shape(gradients.bias, has_bias ? num_experts : 0, 1, function, "parameter_gradients.bias");
  require_shape(d_input, tokens, input_dim, function, "d_input");
  if (routing.jittered()) {
    require_shape(routing.input_jitter, tokens, input_dim, function, "routing.input_jitter");
    require_shape(routing.jittered_input, tokens, input_dim, function, "routing.jittered_input");
  }
}

/// The parameter and input gradients of z = x̃·W (+ b) from dz = gradients.logits (T×E), where
/// x̃ is the input, or x ⊙ m with input jitter m: adds x̃ᵀ·dz to gradients.weight, the column sums
/// of dz to gradients.bias (when it is non-empty), and (dz·Wᵀ) ⊙ m (m = 1 without jitter) to
/// d_input. Fixed tiles: bitwise independent of the thread count. Cost: 4·T·d·E flops.
template <typename Scalar>
void linear_backward(const TopKRouting<Scalar>& routing, const ConstMatrixRef<Scalar>& input,
                     const Matrix<Scalar>& weight, RouterGradients<Scalar>& gradients, MatrixRef<Scalar> d_input) {
  const Matrix<Scalar>& d_logits = gradients.logits;
  const Index tokens = d_logits.rows();
  const Index experts = d_logits.cols();
  const Index width = weight.rows();
  const bool jittered = routing.jittered();
  const double weight_tile_flops = 2.0 * static_cast<double>(row_tile * tokens * experts);
  parallel_for(tile_count(width, row_tile), weight_tile_flops, [&](Index tile) {
    const Index first = tile * row_tile;
    const Index columns = std::min(row_tile, width - first);
    const auto seen = jittered ? operand(routing.jittered_input.middleCols(first, columns), Op::transpose)
                               : operand(input.middleCols(first, columns), Op::transpose);
    gemm(seen, operand(d_logits), gradients.weight.row(first).data(), gradients.weight.outerStride(), Scalar(1), true);
  });
  if (gradients.bias.size() > 0) {
    parallel_for(experts, static_cast<double>(tokens), [&](Index expert) {
      Scalar sum = 0;
      for (Index token = 0; token < tokens; ++token) sum += d_logits(token, expert);
      gradients.bias[expert] += sum;
    });
  }
  if (!jittered) {
    const double input_tile_flops = 2.0 * static_cast<double>(row_tile * width * experts);
    parallel_for(tile_count(tokens, row_tile), input_tile_flops, [&](Index tile) {
      const Index first = tile * row_tile;
      const Index rows = std::min(row_tile, tokens - first);
      gemm(operand(d_logits.middleRows(first, rows)), operand(weight, Op::transpose), d_input.row(first).data(),
           d_input.outerStride(), Scalar(1), true);
    });
    return;
  }
  // With jitter, each entry of dz·Wᵀ is scaled by its own multiplier: one dot product per entry
  // (rows of W are contiguous), no scratch matrix.
  parallel_for(tokens, 2.0 * static_cast<double>(width * experts), [&](Index token) {
    for (Index column = 0; column < width; ++column) {
      d_input(token, column) += routing.input_jitter(token, column) * d_logits.row(token).dot(weight.row(column));
    }
  });
}

}  // namespace detail

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_HPP
