// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// What every translation unit of the extern-templates consumer reads first: the library's
// explicit instantiations (float and double, default expert) plus a SwiGLU layer with the
// default router and one with the sigmoid router, of its own.
#ifndef SPARSEMOE_TEST_EXTERN_LAYERS_HPP
#define SPARSEMOE_TEST_EXTERN_LAYERS_HPP

#include <sparsemoe/extern_templates.hpp>

SPARSEMOE_EXPLICIT_LAYER(float, sparsemoe::SwiGluExpert<float>)
SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::SigmoidTopKRouter<float>)
SPARSEMOE_EXPLICIT_ROUTED_LAYER(float, sparsemoe::SwiGluExpert<float>, sparsemoe::SigmoidTopKRouter<float>)

#endif
