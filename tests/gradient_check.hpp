// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// A shared finite-difference gradient checker for the unit tests (double precision only).
//
// check_gradient(loss, parameter, analytic, options) perturbs every element θ_i of `parameter`
// in place (restoring it bit for bit afterwards), evaluates the scalar `loss()` around it with a
// central difference, and compares the result with `analytic[i]`. It returns the worst relative
// error |numeric − analytic| / max(|numeric|, |analytic|, absolute_floor) and where it occurred.
//
// The difference step is chosen per element: h_i = relative_step · max(1, |θ_i|), rounded so that
// θ_i + h_i − θ_i == h_i exactly. The default stencil is the 5-point central difference
// (−f(θ+2h) + 8f(θ+h) − 8f(θ−h) + f(θ−2h)) / 12h, whose truncation error is O(h⁴): with
// h = 1e-4 it is ~1e-16·f⁽⁵⁾ while the rounding error is ~1.5·eps·|f|/h, so gradients are
// checked to ~1e-11 absolute rather than the ~1e-8 of the 3-point O(h²) rule (still available).
// The loss must be smooth within ±2h of θ (no kinks, no top-k ties) for the check to mean
// anything; callers make sure of that.
//
// Overloads take the parameter as a raw pointer + size, a sparsemoe::TensorView<double>, or any
// dense Eigen matrix/vector object (e.g. the input X of a layer).
#ifndef SPARSEMOE_TESTS_GRADIENT_CHECK_HPP
#define SPARSEMOE_TESTS_GRADIENT_CHECK_HPP

#include <sparsemoe/parameters.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace sparsemoe_test {

struct GradientCheckOptions {
  /// h_i = relative_step · max(1, |θ_i|).
  double relative_step = 1e-4;
  /// Denominator floor of the relative error, so that gradient entries that are (nearly) zero are
  /// judged by their absolute error: with a loss of order 1 the 5-point difference at h = 1e-4
  /// carries ~1e-12 of rounding noise, so an exactly-zero gradient (a dead ReLU unit, an unused
  /// expert) shows up as ~1e-12/floor = 1e-7 rather than as a spurious failure.
  double absolute_floor = 1e-5;
  /// 5-point O(h⁴) stencil (default) or the 3-point O(h²) one.
  bool fourth_order = true;
};

struct GradientCheckResult {
  double worst_relative_error = 0;  ///< max_i |numeric_i − analytic_i| / max(|numeric_i|, |analytic_i|, floor)
  sparsemoe::Index worst_index = -1;  ///< flat (storage-order) index of the worst element, −1 if empty
  double numeric_at_worst = 0;
  double analytic_at_worst = 0;
  double max_abs_analytic = 0;  ///< largest |analytic_i| (to see that the tensor was not all zero)
  double max_abs_error = 0;     ///< largest |numeric_i − analytic_i|
  sparsemoe::Index size = 0;    ///< elements checked
};

inline std::ostream& operator<<(std::ostream& stream, const GradientCheckResult& result) {
  return stream << "worst relative error " << result.worst_relative_error << " at index " << result.worst_index
                << " (numeric " << result.numeric_at_worst << ", analytic " << result.analytic_at_worst
                << "), max |analytic| " << result.max_abs_analytic << ", max |error| " << result.max_abs_error
                << ", " << result.size << " elements";
}

/// d loss / d *theta by a central difference around the current value; *theta is restored exactly.
template <typename Loss>
double numeric_derivative(const Loss& loss, double* theta, const GradientCheckOptions& options = {}) {
  const double original = *theta;
  const double wanted = options.relative_step * std::max(1.0, std::fabs(original));
  // Make the step exactly representable relative to θ, so θ ± h really is θ ± h.
  volatile double shifted = original + wanted;
  const double step = shifted - original;
  auto at = [&](double value) {
    *theta = value;
    const double result = static_cast<double>(loss());
    *theta = original;
    return result;
  };
  if (!options.fourth_order) return (at(original + step) - at(original - step)) / (2 * step);
  const double plus2 = at(original + 2 * step);
  const double plus1 = at(original + step);
  const double minus1 = at(original - step);
  const double minus2 = at(original - 2 * step);
  return (-plus2 + 8 * plus1 - 8 * minus1 + minus2) / (12 * step);
}

/// Checks `analytic[0..size)` against finite differences of `loss()` in `parameter[0..size)`.
template <typename Loss>
GradientCheckResult check_gradient(const Loss& loss, double* parameter, sparsemoe::Index size, const double* analytic,
                                   const GradientCheckOptions& options = {}) {
  GradientCheckResult result;
  result.size = size;
  for (sparsemoe::Index i = 0; i < size; ++i) {
    const double numeric = numeric_derivative(loss, parameter + i, options);
    const double exact = analytic[i];
    const double error = std::fabs(numeric - exact);
    const double relative = error / std::max({std::fabs(numeric), std::fabs(exact), options.absolute_floor});
    result.max_abs_analytic = std::max(result.max_abs_analytic, std::fabs(exact));
    result.max_abs_error = std::max(result.max_abs_error, error);
    // NaN anywhere must be reported as the worst possible error.
    if (!(relative <= result.worst_relative_error) || result.worst_index < 0) {
      result.worst_relative_error = std::isnan(relative) ? std::numeric_limits<double>::infinity()
                                                         : std::max(relative, result.worst_relative_error);
      result.worst_index = i;
      result.numeric_at_worst = numeric;
      result.analytic_at_worst = exact;
    }
  }
  return result;
}

/// TensorView overload: `parameter` and `analytic` must have the same shape.
template <typename Loss>
GradientCheckResult check_gradient(const Loss& loss, const sparsemoe::TensorView<double>& parameter,
                                   const sparsemoe::TensorView<double>& analytic,
                                   const GradientCheckOptions& options = {}) {
  if (parameter.rows != analytic.rows || parameter.cols != analytic.cols) {
    throw std::invalid_argument("check_gradient: parameter " + parameter.name + " is " +
                                std::to_string(parameter.rows) + "x" + std::to_string(parameter.cols) +
                                " but its gradient " + analytic.name + " is " + std::to_string(analytic.rows) + "x" +
                                std::to_string(analytic.cols));
  }
  return check_gradient(loss, parameter.data, parameter.size(), analytic.data, options);
}

/// Dense Eigen overload (matrix or vector owning contiguous storage): the analytic gradient may be
/// any expression of the same shape; it is evaluated into the parameter's storage order first.
template <typename Loss, typename Derived, typename AnalyticDerived>
GradientCheckResult check_gradient(const Loss& loss, Eigen::PlainObjectBase<Derived>& parameter,
                                   const Eigen::DenseBase<AnalyticDerived>& analytic,
                                   const GradientCheckOptions& options = {}) {
  static_assert(std::is_same<typename Derived::Scalar, double>::value, "check_gradient works in double");
  if (parameter.rows() != analytic.rows() || parameter.cols() != analytic.cols()) {
    throw std::invalid_argument("check_gradient: parameter is " + std::to_string(parameter.rows()) + "x" +
                                std::to_string(parameter.cols()) + " but its gradient is " +
                                std::to_string(analytic.rows()) + "x" + std::to_string(analytic.cols()));
  }
  const typename Derived::PlainObject same_layout = analytic;
  return check_gradient(loss, parameter.data(), parameter.size(), same_layout.data(), options);
}

}  // namespace sparsemoe_test

#endif  // SPARSEMOE_TESTS_GRADIENT_CHECK_HPP
