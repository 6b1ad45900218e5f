// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The routers and loss terms allocate nothing in steady state: a second route into the same
// TopKRouting, set_zero of the same TopKRoutingGradient, the loss terms with a reused
// BalanceLossWorkspace, and a backward into the same RouterGradients and d_input, all of the
// same shapes, must not allocate. Two independent counters, as in test_allocation.cpp: global
// operator new/delete replaced by counting versions, and Eigen's own heap allocations (through
// std::malloc) counted through EIGEN_RUNTIME_NO_MALLOC, whose check reports through eigen_assert,
// redefined here to count instead of abort (active even with NDEBUG).

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace {
std::atomic<long> eigen_heap_allocations{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                                                         \
  do {                                                                                  \
    if (!(condition)) eigen_heap_allocations.fetch_add(1, std::memory_order_relaxed);   \
  } while (false)

#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>
#include <sparsemoe/router/sigmoid_top_k.hpp>
#include <sparsemoe/router/softmax_top_k.hpp>
#include <sparsemoe/router/switch.hpp>

#include <gtest/gtest.h>

namespace {
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* pointer = std::malloc(size == 0 ? 1 : size)) return pointer;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* pointer) noexcept { std::free(pointer); }
void operator delete[](void* pointer) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::size_t) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::size_t) noexcept { std::free(pointer); }

namespace {

using sparsemoe::Index;
using sparsemoe::Mode;
using sparsemoe::RouteOptions;

// One training step of a router with every loss term: route, gradients zeroed, balance and
// z-loss (value and backward), backward. The second step, on a new input of the same shape and
// another step index, must not allocate.
template <typename Router>
void expect_steady_state_allocates_nothing(const Router& router, Index tokens) {
  using Scalar = typename Router::Scalar;
  sparsemoe::Matrix<Scalar> input = sparsemoe::Matrix<Scalar>::Random(tokens, router.input_dim());
  sparsemoe::TopKRouting<Scalar> routing;
  sparsemoe::TopKRoutingGradient<Scalar> upstream;
  sparsemoe::BalanceLossWorkspace workspace;
  sparsemoe::BalanceLossOptions balance;
  balance.sequence_length = tokens / 4;
  balance.normalize_scores = true;
  auto gradients = router.make_gradients();
  sparsemoe::Matrix<Scalar> d_input = sparsemoe::Matrix<Scalar>::Zero(tokens, router.input_dim());
  double total = 0;
  const auto step = [&](std::uint64_t index) {
    router.route(input, RouteOptions{Mode::training, index}, routing);
    upstream.set_zero(routing);
    upstream.gates.setConstant(Scalar(0.5));
    total += static_cast<double>(sparsemoe::balance_loss(routing, 0.01, balance, workspace));
    total += static_cast<double>(sparsemoe::z_loss(routing, 1e-3));
    sparsemoe::balance_loss_backward(routing, 0.01, balance, upstream, workspace);
    sparsemoe::z_loss_backward(routing, 1e-3, upstream);
    gradients.set_zero();
    d_input.setZero();
    router.backward(routing, input, upstream, gradients, d_input);
  };
  step(0);
  input = sparsemoe::Matrix<Scalar>::Random(tokens, router.input_dim());
  const long before = allocations.load();
  const long eigen_before = eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  step(1);
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0) << "operator new calls in a steady-state router step";
  EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 0) << "Eigen heap allocations in a steady-state router step";
  EXPECT_TRUE(d_input.allFinite());
  EXPECT_TRUE(gradients.weight.allFinite());
  EXPECT_TRUE(std::isfinite(total));
}

// 300 tokens: several row tiles; 1200: above the parallel threshold of the per-token loops.
TEST(RouterAllocation, SoftmaxTopKSteadyStateAllocatesNothing) {
  for (const Index tokens : {Index(300), Index(1200)}) {
    sparsemoe::SoftmaxTopKRouterOptions options;
    options.k = 3;
    options.normalize_top_k = true;
    options.use_bias = true;
    options.num_groups = 4;
    options.top_groups = 2;
    sparsemoe::SoftmaxTopKRouter<float> router(24, 8, options);
    router.initialize_uniform(1);
    expect_steady_state_allocates_nothing(router, tokens);
    options.softmax_over_selected = true;
    sparsemoe::SoftmaxTopKRouter<double> over_selected(24, 8, options);
    over_selected.initialize_uniform(2);
    expect_steady_state_allocates_nothing(over_selected, tokens);
  }
}

TEST(RouterAllocation, SigmoidTopKSteadyStateAllocatesNothing) {
  sparsemoe::SigmoidTopKRouterOptions options;
  options.k = 4;
  options.num_groups = 4;
  options.top_groups = 2;
  options.scale = 2.5;
  sparsemoe::SigmoidTopKRouter<float> router(24, 16, options);
  router.initialize_uniform(3);
  router.selection_bias().setConstant(0.01f);
  expect_steady_state_allocates_nothing(router, 1200);
  options.group_mask = sparsemoe::GroupMask::zero;
  sparsemoe::SigmoidTopKRouter<double> zero_mask(24, 16, options);
  expect_steady_state_allocates_nothing(zero_mask, 300);
}

TEST(RouterAllocation, SwitchAndGShardSteadyStateAllocatesNothing) {
  sparsemoe::SwitchRouterOptions jitter;
  jitter.jitter_epsilon = 0.01;
  jitter.use_bias = true;
  sparsemoe::SwitchRouter<float> switch_router(24, 8, jitter);
  switch_router.initialize_uniform(4);
  expect_steady_state_allocates_nothing(switch_router, 1200);
  sparsemoe::GShardRouter<double> gshard(24, 8);
  gshard.initialize_uniform(5);
  expect_steady_state_allocates_nothing(gshard, 1200);
}

}  // namespace
