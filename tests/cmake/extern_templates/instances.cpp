// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The one translation unit that compiles the explicit instantiations.
#define SPARSEMOE_INSTANTIATE_TEMPLATES
#include "layers.hpp"
