// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Second translation unit of test_odr (not a test executable of its own): it
// includes the umbrella header again, so any header definition missing `inline`
// is defined twice in the test_odr binary and fails to link.
#include <sparsemoe/sparsemoe.hpp>

#include <string>

std::string odr_second_tu_touch() { return sparsemoe::version_string(); }
