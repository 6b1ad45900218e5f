// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DETAIL_SCRATCH_POOL_HPP
#define SPARSEMOE_DETAIL_SCRATCH_POOL_HPP

/// \file scratch_pool.hpp
/// A thread-safe pool of reusable scratch objects (workspaces, result buffers).

#include "../config.hpp"

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace sparsemoe {
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

}  // namespace detail
}  // namespace sparsemoe

#endif  // SPARSEMOE_DETAIL_SCRATCH_POOL_HPP
