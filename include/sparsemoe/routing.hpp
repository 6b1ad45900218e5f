// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTING_HPP
#define SPARSEMOE_ROUTING_HPP

/// \file routing.hpp
/// The former name of dispatch.hpp (the dispatch plan, expert capacity and routing telemetry),
/// kept so that existing includes compile. New code includes <sparsemoe/dispatch.hpp>.

#include "dispatch.hpp"

#endif  // SPARSEMOE_ROUTING_HPP
