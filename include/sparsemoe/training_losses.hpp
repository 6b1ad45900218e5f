// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_TRAINING_LOSSES_HPP
#define SPARSEMOE_TRAINING_LOSSES_HPP

/// \file training_losses.hpp
/// Task losses for training a layer, with their gradients: mean squared error for regression and
/// softmax cross-entropy for classification. Both are means (over all entries, resp. over rows),
/// so the loss scale does not grow with the batch. The auxiliary load-balancing losses of the MoE
/// layer are in losses.hpp.

#include "config.hpp"

#include <cmath>
#include <type_traits>

namespace sparsemoe {

/// \addtogroup losses
/// @{

/// Mean squared error over ALL T·d entries (not per row, no ½):
/// L = (1/(T·d))·Σ_{t,j} (p_tj − y_tj)².
/// `prediction` and `target` are T×d with T·d ≥ 1. Throws std::invalid_argument on a shape
/// mismatch or an empty input. O(T·d).
///
/// \code
/// sparsemoe::Matrix<float> p(1, 2), y(1, 2);
/// p << 1, 2;
/// y << 0, 0;
/// sparsemoe::mean_squared_error(p, y);  // (1 + 4) / 2 = 2.5
/// \endcode
template <typename DerivedPrediction, typename DerivedTarget>
typename DerivedPrediction::Scalar mean_squared_error(const Eigen::MatrixBase<DerivedPrediction>& prediction,
                                                      const Eigen::MatrixBase<DerivedTarget>& target) {
  using Scalar = typename DerivedPrediction::Scalar;
  static_assert(std::is_same<Scalar, typename DerivedTarget::Scalar>::value,
                "prediction and target must have the same Scalar");
  const char* function = "sparsemoe::mean_squared_error";
  detail::require(prediction.size() > 0, function, "prediction must not be empty, got ", prediction.rows(), "x",
                  prediction.cols());
  detail::require_shape(target, prediction.rows(), prediction.cols(), function, "target");
  return (prediction - target).squaredNorm() / static_cast<Scalar>(prediction.size());
}

/// ∂L/∂prediction of mean_squared_error: (2/(T·d))·(prediction − target), T×d.
/// Same checks as mean_squared_error. O(T·d); allocates the result.
template <typename DerivedPrediction, typename DerivedTarget>
Matrix<typename DerivedPrediction::Scalar> mean_squared_error_gradient(
    const Eigen::MatrixBase<DerivedPrediction>& prediction, const Eigen::MatrixBase<DerivedTarget>& target) {
  using Scalar = typename DerivedPrediction::Scalar;
  static_assert(std::is_same<Scalar, typename DerivedTarget::Scalar>::value,
                "prediction and target must have the same Scalar");
  const char* function = "sparsemoe::mean_squared_error_gradient";
  detail::require(prediction.size() > 0, function, "prediction must not be empty, got ", prediction.rows(), "x",
                  prediction.cols());
  detail::require_shape(target, prediction.rows(), prediction.cols(), function, "target");
  return (Scalar(2) / static_cast<Scalar>(prediction.size())) * (prediction - target);
}

namespace detail {

/// Throws unless `logits` is T×C with T, C ≥ 1 and `labels` holds T class ids in [0, C).
template <typename Derived>
void check_classification(const Eigen::MatrixBase<Derived>& logits, const IndexVector& labels, const char* function) {
  require(logits.rows() >= 1 && logits.cols() >= 1, function, "logits must be at least 1x1, got ", logits.rows(),
          "x", logits.cols());
  require(labels.size() == logits.rows(), function, "labels must have one entry per logits row (", logits.rows(),
          "), got ", labels.size());
  for (Index row = 0; row < labels.size(); ++row) {
    require(labels[row] >= 0 && labels[row] < logits.cols(), function, "label ", labels[row], " of row ", row,
            " is outside [0, ", logits.cols(), ")");
  }
}

}  // namespace detail

/// Softmax cross-entropy, mean over the T rows:
/// L = (1/T)·Σ_t (log Σ_c exp(z_tc) − z_t,y_t), computed per row as
/// (m_t − z_t,y_t) + log Σ_c exp(z_tc − m_t) with m_t = max_c z_tc: large logits do not overflow,
/// and both terms are ≥ 0, so nothing cancels.
/// `logits` is T×C (T, C ≥ 1), `labels` holds T class ids in [0, C). Throws
/// std::invalid_argument on a size mismatch or a label out of range. O(T·C).
///
/// \code
/// sparsemoe::Matrix<double> z = sparsemoe::Matrix<double>::Zero(1, 4);
/// sparsemoe::IndexVector y(1);
/// y << 2;
/// sparsemoe::softmax_cross_entropy(z, y);  // log 4
/// \endcode
template <typename Derived>
typename Derived::Scalar softmax_cross_entropy(const Eigen::MatrixBase<Derived>& logits, const IndexVector& labels) {
  using Scalar = typename Derived::Scalar;
  detail::check_classification(logits, labels, "sparsemoe::softmax_cross_entropy");
  Scalar total = 0;
  for (Index row = 0; row < logits.rows(); ++row) {
    const Scalar largest = logits.row(row).maxCoeff();
    const Scalar log_sum = std::log((logits.row(row).array() - largest).exp().sum());
    total += (largest - logits(row, labels[row])) + log_sum;  // two terms ≥ 0: no cancellation
  }
  return total / static_cast<Scalar>(logits.rows());
}

/// ∂L/∂logits of softmax_cross_entropy: (softmax(z_t) − onehot(y_t)) / T for each row t, T×C
/// (softmax computed with the row maximum subtracted). Same checks as softmax_cross_entropy.
/// O(T·C); allocates the result.
template <typename Derived>
Matrix<typename Derived::Scalar> softmax_cross_entropy_gradient(const Eigen::MatrixBase<Derived>& logits,
                                                                const IndexVector& labels) {
  using Scalar = typename Derived::Scalar;
  detail::check_classification(logits, labels, "sparsemoe::softmax_cross_entropy_gradient");
  const Scalar inverse_rows = Scalar(1) / static_cast<Scalar>(logits.rows());
  Matrix<Scalar> gradient(logits.rows(), logits.cols());
  for (Index row = 0; row < logits.rows(); ++row) {
    const Scalar largest = logits.row(row).maxCoeff();
    gradient.row(row) = (logits.row(row).array() - largest).exp().matrix();
    gradient.row(row) *= inverse_rows / gradient.row(row).sum();
    gradient(row, labels[row]) -= inverse_rows;
  }
  return gradient;
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_TRAINING_LOSSES_HPP
