// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_PACKED_EXPERTS_HPP
#define SPARSEMOE_PACKED_EXPERTS_HPP

/// \file packed_experts.hpp
/// Experts' weights copied once into the GEMM backend's packed layout, for serving.

#include "config.hpp"
#include "detail/gemm.hpp"

#include <memory>
#include <vector>

namespace sparsemoe {

template <typename Scalar_, typename ExpertT, typename RouterT>
class MoELayer;
template <typename Scalar_, typename ExpertT>
class ExpertBank;

/// \addtogroup layer
/// @{

/// A snapshot of every expert's parameters with W1 and W2 in the GEMM backend's packed layout
/// (detail::PackedWeight: contiguous column panels), made by MoELayer::pack_experts() (or
/// ExpertBank::pack()) for serving. An evaluation-mode forward that is given it streams each
/// weight panel front to back, which the hardware prefetchers follow, so small batches whose
/// weights come from memory gain most (bench/NOTES.md). Memory: the experts' parameters once
/// more, E·(2·d·h + h + d) scalars for Expert. It is a copy: after the weights change, pack
/// again. Immutable once made, so any number of threads may use one at once.
template <typename Scalar>
class PackedExperts {
 public:
  /// No experts: pass MoELayer::pack_experts()'s result instead.
  PackedExperts() = default;

  /// Whether this holds nothing usable (default-constructed, or made by a layer that is gone).
  bool empty() const { return experts_.empty() || (made_by_layer_ && owner_.expired()); }
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
  template <typename, typename>
  friend class ExpertBank;

  struct Entry {
    detail::PackedWeight<Scalar> w1;
    Vector<Scalar> b1;
    detail::PackedWeight<Scalar> w2;
    Vector<Scalar> b2;
  };

  std::weak_ptr<const void> owner_;  // identity of the layer that packed it (made_by_layer_)
  bool made_by_layer_ = false;
  std::vector<Entry> experts_;
};

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_PACKED_EXPERTS_HPP
