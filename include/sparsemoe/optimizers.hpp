// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_OPTIMIZERS_HPP
#define SPARSEMOE_OPTIMIZERS_HPP

/// \file optimizers.hpp
/// First-order optimizers over a list of parameter tensors and the matching list of gradients,
/// as returned by `MoELayer::tensors()` and `MoEGradients::tensors()` (same order, same shapes):
/// SGD with (Nesterov) momentum, and Adam with decoupled weight decay (AdamW).
///
/// Both keep one state tensor (or two) per parameter tensor, allocated on the first `step` and
/// shape-checked on every later one; after the first step, `step` allocates nothing. The updates
/// are element-wise Eigen array expressions over each tensor's flat storage (vectorised), O(N)
/// for N parameters in all. `restore_state` replaces the whole state at once (hyper-parameters,
/// step count, layout, state tensors), which is what checkpoint.hpp's loader uses.
///
/// \code
/// sparsemoe::MoELayer<float> layer({/*d*/ 32, /*h*/ 64, /*E*/ 8, /*k*/ 2});
/// auto gradients = layer.make_gradients();
/// sparsemoe::AdamOptions options;
/// options.learning_rate = 1e-3;
/// sparsemoe::Adam<float> adam(options);
/// // each step: gradients.set_zero(); forward; backward(…, gradients); then
/// adam.step(layer.tensors(), gradients.tensors());
/// \endcode

#include "config.hpp"
#include "parameters.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup optimizers
/// @{

namespace detail {

/// The names and shapes of the parameter tensors an optimizer saw on its first step, so that
/// later steps can check they are given the same list.
class TensorLayout {
 public:
  /// Whether a layout has been recorded (false before the first step, or after reset()).
  bool recorded() const { return recorded_; }
  /// Number of tensors recorded.
  std::size_t size() const { return rows_.size(); }

  /// Throws std::invalid_argument unless `parameters` and `gradients` have the same length and
  /// pairwise the same shapes, every non-empty tensor has data, and, once a layout is recorded,
  /// unless they match it. Names the first offending tensor. O(number of tensors); allocates
  /// only to build an error message.
  template <typename Scalar>
  void check(const std::vector<TensorView<Scalar>>& parameters, const std::vector<TensorView<Scalar>>& gradients,
             const char* function) const {
    require(parameters.size() == gradients.size(), function, "got ", parameters.size(), " parameter tensors but ",
            gradients.size(), " gradient tensors");
    if (recorded_) {
      require(parameters.size() == rows_.size(), function, "got ", parameters.size(),
              " parameter tensors, but the optimizer state was made for ", rows_.size(),
              " (call reset() to start afresh with other parameters)");
    }
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      const TensorView<Scalar>& parameter = parameters[i];
      const TensorView<Scalar>& gradient = gradients[i];
      require(parameter.rows >= 0 && parameter.cols >= 0, function, "parameter tensor ", i, " '", parameter.name,
              "' has a negative shape ", parameter.rows, "x", parameter.cols);
      require(gradient.rows == parameter.rows && gradient.cols == parameter.cols, function, "gradient tensor ", i,
              " '", gradient.name, "' is ", gradient.rows, "x", gradient.cols, " but parameter tensor '",
              parameter.name, "' is ", parameter.rows, "x", parameter.cols);
      require(parameter.size() == 0 || (parameter.data != nullptr && gradient.data != nullptr), function,
              "tensor ", i, " '", parameter.name, "' has no data");
      if (recorded_) {
        require(parameter.rows == rows_[i] && parameter.cols == cols_[i], function, "parameter tensor ", i, " '",
                parameter.name, "' is ", parameter.rows, "x", parameter.cols, " but was ", rows_[i], "x", cols_[i],
                " ('", names_[i], "') when the optimizer state was made (call reset() to start afresh)");
      }
    }
  }

  /// Records the names and shapes of `parameters`.
  template <typename Scalar>
  void record(const std::vector<TensorView<Scalar>>& parameters) {
    names_.clear();
    rows_.clear();
    cols_.clear();
    for (const TensorView<Scalar>& parameter : parameters) {
      names_.push_back(parameter.name);
      rows_.push_back(parameter.rows);
      cols_.push_back(parameter.cols);
    }
    recorded_ = true;
  }

  /// Forgets the recorded layout.
  void clear() {
    names_.clear();
    rows_.clear();
    cols_.clear();
    recorded_ = false;
  }

  /// Name of tensor `i` as recorded.
  const std::string& name(std::size_t i) const { return names_[i]; }

 private:
  bool recorded_ = false;
  std::vector<std::string> names_;
  std::vector<Index> rows_;
  std::vector<Index> cols_;
};

/// Throws unless `value` is finite and > 0.
inline void require_positive(double value, const char* function, const char* name) {
  require(std::isfinite(value) && value > 0.0, function, name, " must be finite and > 0, got ", value);
}

/// Throws unless `value` is finite and ≥ 0.
inline void require_non_negative(double value, const char* function, const char* name) {
  require(std::isfinite(value) && value >= 0.0, function, name, " must be finite and >= 0, got ", value);
}

/// Throws unless 0 ≤ value < 1.
inline void require_unit_interval(double value, const char* function, const char* name) {
  require(value >= 0.0 && value < 1.0, function, name, " must be in [0, 1), got ", value);
}

}  // namespace detail

/// Hyper-parameters of Sgd.
struct SgdOptions {
  double learning_rate = 1e-2;  ///< lr > 0
  double momentum = 0.0;        ///< μ ∈ [0, 1); 0 turns momentum (and its state) off
  bool nesterov = false;        ///< Nesterov momentum (needs μ > 0)
  double weight_decay = 0.0;    ///< λ ≥ 0, coupled L2 as in torch.optim.SGD: g ← g + λ·θ
};

/// Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay, as
/// torch.optim.SGD with dampening 0. For every element, with g the gradient:
///
///     g ← g + λ·θ                  (only if λ > 0)
///     v ← μ·v + g                  (v starts at 0; only if μ > 0)
///     d = g + μ·v  (Nesterov),  d = v  (plain momentum),  d = g  (μ = 0)
///     θ ← θ − lr·d
///
/// State: one velocity tensor per parameter tensor when μ > 0 (none otherwise). Cost per step:
/// O(N) for N parameters, a few flops each; nothing is allocated after the first step.
///
/// \tparam Scalar_ float or double: the scalar of the parameter and gradient views it steps.
template <typename Scalar_>
class Sgd {
 public:
  /// float or double: the scalar of the parameters, gradients and state.
  using Scalar = Scalar_;

  /// Throws std::invalid_argument unless lr is finite and > 0, 0 ≤ μ < 1, λ is finite and ≥ 0,
  /// and μ > 0 when Nesterov is on.
  explicit Sgd(const SgdOptions& options = {}) : options_(checked(options)) { detail::check_scalar<Scalar>(); }

  /// The hyper-parameters.
  const SgdOptions& options() const { return options_; }
  /// The current learning rate.
  double learning_rate() const { return options_.learning_rate; }
  /// Sets the learning rate (for schedules); throws std::invalid_argument unless finite and > 0.
  void set_learning_rate(double learning_rate) {
    detail::require_positive(learning_rate, "sparsemoe::Sgd::set_learning_rate", "learning_rate");
    options_.learning_rate = learning_rate;
  }

  /// Number of steps taken since construction (or reset()).
  std::int64_t step_count() const { return step_count_; }
  /// Velocity v of each parameter tensor, flat (rows·cols), in the parameters' order; empty
  /// before the first step and whenever μ = 0.
  const std::vector<Vector<Scalar>>& velocities() const { return velocities_; }

  /// Forgets the state (velocities, step count, recorded shapes).
  void reset() {
    velocities_.clear();
    layout_.clear();
    step_count_ = 0;
  }

  /// Replaces the whole state, as a checkpoint loader needs: afterwards this optimizer behaves
  /// exactly like the one whose state is given (same hyper-parameters, step count, recorded
  /// tensor layout and velocities), so training resumes bitwise as if never interrupted.
  ///
  /// - `options`: the hyper-parameters, checked as by the constructor.
  /// - `step_count` ≥ 0: steps taken. With 0 the state is that of a fresh optimizer (nothing
  ///   recorded; `parameters` is ignored and `velocities` must be empty).
  /// - `parameters`: the tensors the state belongs to (e.g. `layer.tensors()`); their names and
  ///   shapes are recorded as a first step would, and later steps are checked against them.
  /// - `velocities`: empty when μ = 0 (or step_count = 0), otherwise one flat vector of
  ///   parameters[i].size() scalars per parameter tensor, in the parameters' order.
  ///
  /// Throws std::invalid_argument naming the first problem before changing anything (strong
  /// guarantee: validation and the allocations happen first, the commit only moves). Cost:
  /// O(number of tensors); the velocities are moved in, not copied.
  void restore_state(const SgdOptions& options, std::int64_t step_count,
                     const std::vector<TensorView<Scalar>>& parameters, std::vector<Vector<Scalar>> velocities) {
    const char* function = "sparsemoe::Sgd::restore_state";
    checked(options);
    detail::require(step_count >= 0, function, "step_count must be >= 0, got ", step_count);
    detail::TensorLayout layout;
    if (step_count == 0) {
      detail::require(velocities.empty(), function, "step_count is 0 (a fresh optimizer) but ", velocities.size(),
                      " velocity tensors were given; expected none");
    } else {
      layout.check(parameters, parameters, function);
      const std::size_t expected = options.momentum > 0.0 ? parameters.size() : 0;
      detail::require(velocities.size() == expected, function, "expected ", expected,
                      " velocity tensors (one per parameter tensor when momentum > 0, none otherwise; momentum = ",
                      options.momentum, ", ", parameters.size(), " parameter tensors), got ", velocities.size());
      for (std::size_t i = 0; i < velocities.size(); ++i) {
        detail::require(velocities[i].size() == parameters[i].size(), function, "velocity tensor ", i,
                        " must have ", parameters[i].size(), " scalars (parameter tensor '", parameters[i].name,
                        "' is ", parameters[i].rows, "x", parameters[i].cols, "), got ", velocities[i].size());
      }
      layout.record(parameters);
    }
    // Commit: moves only, nothing here throws.
    options_ = options;
    step_count_ = step_count;
    layout_ = std::move(layout);
    velocities_ = std::move(velocities);
  }

  /// Updates every parameter tensor in place from its gradient (see the class comment).
  /// `parameters` and `gradients` must have the same length and pairwise the same shapes; on
  /// later steps they must also have the count and shapes of the first step. Throws
  /// std::invalid_argument naming the tensor otherwise, before changing anything. Gradients
  /// are not checked for NaN or infinity (they would propagate into the parameters).
  void step(const std::vector<TensorView<Scalar>>& parameters, const std::vector<TensorView<Scalar>>& gradients) {
    layout_.check(parameters, gradients, "sparsemoe::Sgd::step");
    const bool use_momentum = options_.momentum > 0.0;
    if (!layout_.recorded()) {
      layout_.record(parameters);
      if (use_momentum) {
        velocities_.clear();
        for (const TensorView<Scalar>& parameter : parameters) {
          velocities_.push_back(Vector<Scalar>::Zero(parameter.size()));
        }
      }
    }
    ++step_count_;
    const Scalar lr = static_cast<Scalar>(options_.learning_rate);
    const Scalar mu = static_cast<Scalar>(options_.momentum);
    const Scalar lambda = static_cast<Scalar>(options_.weight_decay);
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      Eigen::Map<Vector<Scalar>> theta_map = parameters[i].flat();
      const Eigen::Map<const Vector<Scalar>> gradient_map(gradients[i].data, gradients[i].size());
      auto theta = theta_map.array();
      const auto gradient = gradient_map.array();
      if (!use_momentum) {
        if (lambda != Scalar(0)) {
          theta -= lr * (gradient + lambda * theta);
        } else {
          theta -= lr * gradient;
        }
        continue;
      }
      auto velocity = velocities_[i].array();
      if (lambda != Scalar(0)) {
        velocity = mu * velocity + (gradient + lambda * theta);
        if (options_.nesterov) {
          theta -= lr * ((gradient + lambda * theta) + mu * velocity);
        } else {
          theta -= lr * velocity;
        }
      } else {
        velocity = mu * velocity + gradient;
        if (options_.nesterov) {
          theta -= lr * (gradient + mu * velocity);
        } else {
          theta -= lr * velocity;
        }
      }
    }
  }

 private:
  static const SgdOptions& checked(const SgdOptions& options) {
    const char* function = "sparsemoe::Sgd";
    detail::require_positive(options.learning_rate, function, "learning_rate");
    detail::require_unit_interval(options.momentum, function, "momentum");
    detail::require_non_negative(options.weight_decay, function, "weight_decay");
    detail::require(!options.nesterov || options.momentum > 0.0, function, "nesterov needs momentum > 0");
    return options;
  }

  SgdOptions options_;
  std::int64_t step_count_ = 0;
  detail::TensorLayout layout_;
  std::vector<Vector<Scalar>> velocities_;
};

/// Hyper-parameters of Adam (defaults of Kingma & Ba 2015, weight decay off).
struct AdamOptions {
  double learning_rate = 1e-3;  ///< lr > 0
  double beta1 = 0.9;           ///< β1 ∈ [0, 1): decay of the first moment
  double beta2 = 0.999;         ///< β2 ∈ [0, 1): decay of the second moment
  double epsilon = 1e-8;        ///< ε > 0, added to √v̂
  double weight_decay = 0.0;    ///< λ ≥ 0, decoupled (AdamW, Loshchilov & Hutter 2019)
};

/// Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019), as
/// torch.optim.AdamW. At step t = 1, 2, … and for every element, with g the gradient:
///
///     θ ← θ − lr·λ·θ                              (only if λ > 0; not through m or v)
///     m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²      (m, v start at 0)
///     m̂ = m / (1 − β1ᵗ),       v̂ = v / (1 − β2ᵗ)
///     θ ← θ − lr·m̂ / (√v̂ + ε)
///
/// The constants 1 − β and the bias corrections 1 − βᵗ are computed in double. State: two
/// tensors (m, v) per parameter tensor. Cost per step: O(N) for N parameters, about ten flops
/// and one square root each; nothing is allocated after the first step.
///
/// \tparam Scalar_ float or double: the scalar of the parameter and gradient views it steps.
template <typename Scalar_>
class Adam {
 public:
  /// float or double: the scalar of the parameters, gradients and state.
  using Scalar = Scalar_;

  /// Throws std::invalid_argument unless lr and ε are finite and > 0, 0 ≤ β1, β2 < 1 and λ is
  /// finite and ≥ 0.
  explicit Adam(const AdamOptions& options = {}) : options_(checked(options)) { detail::check_scalar<Scalar>(); }

  /// The hyper-parameters.
  const AdamOptions& options() const { return options_; }
  /// The current learning rate.
  double learning_rate() const { return options_.learning_rate; }
  /// Sets the learning rate (for schedules); throws std::invalid_argument unless finite and > 0.
  void set_learning_rate(double learning_rate) {
    detail::require_positive(learning_rate, "sparsemoe::Adam::set_learning_rate", "learning_rate");
    options_.learning_rate = learning_rate;
  }

  /// Number of steps t taken since construction (or reset()).
  std::int64_t step_count() const { return step_count_; }
  /// First moment m of each parameter tensor, flat (rows·cols), in the parameters' order; empty
  /// before the first step.
  const std::vector<Vector<Scalar>>& first_moments() const { return first_moments_; }
  /// Second moment v of each parameter tensor, flat (rows·cols); empty before the first step.
  const std::vector<Vector<Scalar>>& second_moments() const { return second_moments_; }

  /// Forgets the state (moments, step count, recorded shapes).
  void reset() {
    first_moments_.clear();
    second_moments_.clear();
    layout_.clear();
    step_count_ = 0;
  }

  /// Replaces the whole state, as a checkpoint loader needs: afterwards this optimizer behaves
  /// exactly like the one whose state is given (same hyper-parameters, step count t, recorded
  /// tensor layout and moments), so training resumes bitwise as if never interrupted.
  ///
  /// - `options`: the hyper-parameters, checked as by the constructor.
  /// - `step_count` ≥ 0: steps taken, t. With 0 the state is that of a fresh optimizer (nothing
  ///   recorded; `parameters` is ignored and both moment lists must be empty).
  /// - `parameters`: the tensors the state belongs to (e.g. `layer.tensors()`); their names and
  ///   shapes are recorded as a first step would, and later steps are checked against them.
  /// - `first_moments`, `second_moments` (t ≥ 1): one flat vector of parameters[i].size()
  ///   scalars per parameter tensor each, in the parameters' order.
  ///
  /// Throws std::invalid_argument naming the first problem before changing anything (strong
  /// guarantee: validation and the allocations happen first, the commit only moves). Cost:
  /// O(number of tensors); the moments are moved in, not copied.
  void restore_state(const AdamOptions& options, std::int64_t step_count,
                     const std::vector<TensorView<Scalar>>& parameters, std::vector<Vector<Scalar>> first_moments,
                     std::vector<Vector<Scalar>> second_moments) {
    const char* function = "sparsemoe::Adam::restore_state";
    checked(options);
    detail::require(step_count >= 0, function, "step_count must be >= 0, got ", step_count);
    detail::TensorLayout layout;
    if (step_count == 0) {
      detail::require(first_moments.empty() && second_moments.empty(), function,
                      "step_count is 0 (a fresh optimizer) but ", first_moments.size(), " first and ",
                      second_moments.size(), " second moment tensors were given; expected none");
    } else {
      layout.check(parameters, parameters, function);
      detail::require(first_moments.size() == parameters.size() && second_moments.size() == parameters.size(),
                      function, "expected ", parameters.size(),
                      " first and second moment tensors (one per parameter tensor), got ", first_moments.size(),
                      " and ", second_moments.size());
      for (std::size_t i = 0; i < parameters.size(); ++i) {
        detail::require(first_moments[i].size() == parameters[i].size() &&
                            second_moments[i].size() == parameters[i].size(),
                        function, "moment tensors ", i, " must have ", parameters[i].size(),
                        " scalars each (parameter tensor '", parameters[i].name, "' is ", parameters[i].rows, "x",
                        parameters[i].cols, "), got ", first_moments[i].size(), " and ", second_moments[i].size());
      }
      layout.record(parameters);
    }
    // Commit: moves only, nothing here throws.
    options_ = options;
    step_count_ = step_count;
    layout_ = std::move(layout);
    first_moments_ = std::move(first_moments);
    second_moments_ = std::move(second_moments);
  }

  /// Updates every parameter tensor in place from its gradient (see the class comment).
  /// `parameters` and `gradients` must have the same length and pairwise the same shapes; on
  /// later steps they must also have the count and shapes of the first step. Throws
  /// std::invalid_argument naming the tensor otherwise, before changing anything. Gradients
  /// are not checked for NaN or infinity (they would propagate into the parameters).
  void step(const std::vector<TensorView<Scalar>>& parameters, const std::vector<TensorView<Scalar>>& gradients) {
    layout_.check(parameters, gradients, "sparsemoe::Adam::step");
    if (!layout_.recorded()) {
      layout_.record(parameters);
      first_moments_.clear();
      second_moments_.clear();
      for (const TensorView<Scalar>& parameter : parameters) {
        first_moments_.push_back(Vector<Scalar>::Zero(parameter.size()));
        second_moments_.push_back(Vector<Scalar>::Zero(parameter.size()));
      }
    }
    ++step_count_;
    const double t = static_cast<double>(step_count_);
    const Scalar lr = static_cast<Scalar>(options_.learning_rate);
    const Scalar beta1 = static_cast<Scalar>(options_.beta1);
    const Scalar beta2 = static_cast<Scalar>(options_.beta2);
    // 1 − β in double: in float, 1 − 0.999f is off by 1.3e-5 relative.
    const Scalar one_minus_beta1 = static_cast<Scalar>(1.0 - options_.beta1);
    const Scalar one_minus_beta2 = static_cast<Scalar>(1.0 - options_.beta2);
    const Scalar epsilon = static_cast<Scalar>(options_.epsilon);
    const Scalar decay = static_cast<Scalar>(1.0 - options_.learning_rate * options_.weight_decay);
    const Scalar first_correction = static_cast<Scalar>(1.0 / (1.0 - std::pow(options_.beta1, t)));
    const Scalar second_correction = static_cast<Scalar>(1.0 / (1.0 - std::pow(options_.beta2, t)));
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      Eigen::Map<Vector<Scalar>> theta_map = parameters[i].flat();
      const Eigen::Map<const Vector<Scalar>> gradient_map(gradients[i].data, gradients[i].size());
      auto theta = theta_map.array();
      const auto gradient = gradient_map.array();
      auto m = first_moments_[i].array();
      auto v = second_moments_[i].array();
      if (options_.weight_decay > 0.0) theta *= decay;
      m = beta1 * m + one_minus_beta1 * gradient;
      v = beta2 * v + one_minus_beta2 * gradient.square();
      theta -= lr * (m * first_correction) / ((v * second_correction).sqrt() + epsilon);
    }
  }

 private:
  static const AdamOptions& checked(const AdamOptions& options) {
    const char* function = "sparsemoe::Adam";
    detail::require_positive(options.learning_rate, function, "learning_rate");
    detail::require_unit_interval(options.beta1, function, "beta1");
    detail::require_unit_interval(options.beta2, function, "beta2");
    detail::require_positive(options.epsilon, function, "epsilon");
    detail::require_non_negative(options.weight_decay, function, "weight_decay");
    return options;
  }

  AdamOptions options_;
  std::int64_t step_count_ = 0;
  detail::TensorLayout layout_;
  std::vector<Vector<Scalar>> first_moments_;
  std::vector<Vector<Scalar>> second_moments_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_OPTIMIZERS_HPP
