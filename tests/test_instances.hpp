// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_TESTS_TEST_INSTANCES_HPP
#define SPARSEMOE_TESTS_TEST_INSTANCES_HPP

// The layer instantiations most test programs use, compiled once per build (test_instances.cpp,
// linked into every test) instead of once per test translation unit: the tests' build time is
// mostly the optimiser and code generator going over the same MoELayer / ExpertBank / router code
// again in each file. CMake force-includes this header into the test sources compiled with
// SPARSEMOE_EXTERN_TEMPLATES (tests/CMakeLists.txt), so the tests themselves are unchanged; the
// tests that build the library with other settings (EIGEN_RUNTIME_NO_MALLOC, the ODR pair) do
// not opt in. The consumer test of extern_templates.hpp covers the same mechanism for users.

#include <sparsemoe/extern_templates.hpp>

#if SPARSEMOE_DETAIL_EXPLICIT_ENABLED

// One scalar type's routers, experts and layers (extern_templates.hpp itself covers the gate, the
// ReLU expert and its layer, the GEMM wrapper and the optimizers).
#define SPARSEMOE_TEST_INSTANCES(S)                                                                      \
  SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::SoftmaxTopKRouter<S>)                                             \
  SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::SigmoidTopKRouter<S>)                                             \
  SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::SwitchRouter<S>)                                                  \
  SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::GShardRouter<S>)                                                  \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Expert<S, sparsemoe::GeluErf>;                              \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Expert<S, sparsemoe::GeluTanh>;                             \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Expert<S, sparsemoe::Silu>;                                 \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::SwiGluExpert<S>;                                            \
  SPARSEMOE_EXPLICIT_LAYER(S, sparsemoe::Expert<S, sparsemoe::GeluErf>)                                  \
  SPARSEMOE_EXPLICIT_LAYER(S, sparsemoe::Expert<S, sparsemoe::GeluTanh>)                                 \
  SPARSEMOE_EXPLICIT_LAYER(S, sparsemoe::Expert<S, sparsemoe::Silu>)                                     \
  SPARSEMOE_EXPLICIT_LAYER(S, sparsemoe::SwiGluExpert<S>)                                                \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::Expert<S>, sparsemoe::SoftmaxTopKRouter<S>)              \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::Expert<S>, sparsemoe::SigmoidTopKRouter<S>)              \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::Expert<S>, sparsemoe::SwitchRouter<S>)                   \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::Expert<S>, sparsemoe::GShardRouter<S>)                   \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::SwiGluExpert<S>, sparsemoe::SoftmaxTopKRouter<S>)        \
  SPARSEMOE_EXPLICIT_ROUTED_LAYER(S, sparsemoe::SwiGluExpert<S>, sparsemoe::SigmoidTopKRouter<S>)

SPARSEMOE_TEST_INSTANCES(float)
SPARSEMOE_TEST_INSTANCES(double)

#endif  // SPARSEMOE_DETAIL_EXPLICIT_ENABLED

#endif  // SPARSEMOE_TESTS_TEST_INSTANCES_HPP
