// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// What every translation unit of the extern-templates consumer reads first: the library's
// explicit instantiations (float and double, default expert) plus one layer type of its own.
#ifndef SPARSEMOE_TEST_EXTERN_LAYERS_HPP
#define SPARSEMOE_TEST_EXTERN_LAYERS_HPP

#include <sparsemoe/extern_templates.hpp>

SPARSEMOE_EXPLICIT_LAYER(float, sparsemoe::SwiGluExpert<float>)

#endif
