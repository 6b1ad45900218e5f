// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_SPARSEMOE_HPP
#define SPARSEMOE_SPARSEMOE_HPP

/// \file sparsemoe.hpp
/// Umbrella header: everything in sparsemoe.

#include "activation.hpp"
#include "balance_losses.hpp"
#include "bf16_experts.hpp"
#include "config.hpp"
#include "expert.hpp"
#include "expert_bank.hpp"
#include "expert_choice.hpp"
#include "forward_result.hpp"
#include "gate.hpp"
#include "hash_layer.hpp"
#include "hierarchical_moe.hpp"
#include "layer_gradients.hpp"
#include "losses.hpp"
#include "moe_layer.hpp"
#include "optimizers.hpp"
#include "packed_experts.hpp"
#include "parameters.hpp"
#include "planned_experts.hpp"
#include "router.hpp"
#include "router/expert_choice.hpp"
#include "router/hash.hpp"
#include "router/sigmoid_top_k.hpp"
#include "router/softmax_top_k.hpp"
#include "router/switch.hpp"
#include "soft_moe.hpp"
#include "dispatch.hpp"
#include "training_losses.hpp"
#include "workspaces.hpp"

#endif  // SPARSEMOE_SPARSEMOE_HPP
