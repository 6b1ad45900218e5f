// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_PARAMETERS_HPP
#define SPARSEMOE_PARAMETERS_HPP

/// \file parameters.hpp
/// A uniform, named view of parameter (and gradient) tensors, so optimizers and checkpoints can
/// walk every tensor of a layer in one stable order.

#include "config.hpp"
#include "detail/philox.hpp"

#include <string>
#include <vector>

namespace sparsemoe {

/// \addtogroup optimizers
/// @{

/// A named rows×cols row-major tensor owned elsewhere (a matrix, or a vector as rows×1).
/// Valid while its owner lives and is not resized.
template <typename Scalar>
struct TensorView {
  std::string name;        ///< such as "expert3.w2", unique within its list
  Scalar* data = nullptr;  ///< first of rows·cols contiguous scalars, row-major
  Index rows = 0;          ///< rows (a vector is rows×1)
  Index cols = 0;          ///< columns

  /// rows·cols.
  Index size() const { return rows * cols; }
  /// The tensor as a row-major matrix.
  Eigen::Map<Matrix<Scalar>> matrix() const { return {data, rows, cols}; }
  /// The tensor as one flat vector of rows·cols scalars.
  Eigen::Map<Vector<Scalar>> flat() const { return {data, size()}; }
};

/// View of a dense, contiguous Eigen matrix or vector.
template <typename Derived>
TensorView<typename Derived::Scalar> make_tensor_view(std::string name,
                                                      Eigen::PlainObjectBase<Derived>& tensor) {
  return {std::move(name), tensor.data(), tensor.rows(), tensor.cols()};
}

/// Appends `views` to `list`, prefixing each name with `prefix`.
template <typename Scalar>
void append_tensor_views(std::vector<TensorView<Scalar>>& list, const std::string& prefix,
                         std::vector<TensorView<Scalar>> views) {
  for (auto& view : views) {
    view.name = prefix + view.name;
    list.push_back(std::move(view));
  }
}

namespace detail {

/// Appends the tensors of objects[i] (experts, gates: anything with tensors()) to `list` as
/// "<prefix><i>.<name>", for i in order.
template <typename Scalar, typename Object>
void append_numbered_tensor_views(std::vector<TensorView<Scalar>>& list, const std::string& prefix,
                                  std::vector<Object>& objects) {
  for (std::size_t i = 0; i < objects.size(); ++i) {
    append_tensor_views(list, prefix + std::to_string(i) + ".", objects[i].tensors());
  }
}

/// Fills `values` with independent draws from U(−bound, bound): Philox4x32-10 at counter
/// (index, stream) under key `seed`, so the result depends on (seed, stream, index) only.
template <typename Scalar>
void fill_uniform(Scalar* values, Index count, Scalar bound, std::uint64_t seed, std::uint64_t stream) {
  for (Index index = 0; index < count; ++index) {
    const auto bits = philox4x32_10(
        {static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(static_cast<std::uint64_t>(index) >> 32),
         static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)},
        {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
    const std::uint64_t word = (static_cast<std::uint64_t>(bits[0]) << 32 | bits[1]) >> 11;
    const double unit = static_cast<double>(word) * (1.0 / 9007199254740992.0);
    values[index] = static_cast<Scalar>((2.0 * unit - 1.0) * static_cast<double>(bound));
  }
}

}  // namespace detail

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_PARAMETERS_HPP
