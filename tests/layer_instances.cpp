// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The explicit instantiation definitions that test_instances.hpp declares: compiled once and
// linked into every test program that opts in (tests/CMakeLists.txt).
#define SPARSEMOE_INSTANTIATE_TEMPLATES
#include "test_instances.hpp"
