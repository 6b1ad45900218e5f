// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// ODR / "missing inline" check. This file and test_odr_second_tu.cpp both include
// the umbrella header and are linked into ONE executable (see tests/CMakeLists.txt).
// A non-template function or variable defined in a header without `inline` is then
// defined twice and the link fails. Add to odr_second_tu_touch() anything that
// needs instantiating in the second TU (e.g. a MoELayer<float> forward pass).
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <string>

// Defined in test_odr_second_tu.cpp.
std::string odr_second_tu_touch();

TEST(Odr, TwoTranslationUnitsLink) {
  const std::string here = sparsemoe::version_string();
  EXPECT_FALSE(here.empty());
  EXPECT_EQ(here, odr_second_tu_touch());
}
