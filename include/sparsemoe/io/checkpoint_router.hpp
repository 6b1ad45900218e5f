// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_ROUTER_HPP
#define SPARSEMOE_IO_CHECKPOINT_ROUTER_HPP

/// \file checkpoint_router.hpp
/// The router side of a checkpoint: NoisyTopKGate's RouterKind (the other routers specialise it
/// in their own headers, so none of them is included here), the router's state() tensors (for
/// routers that have them), the comparison of a file's router options with a target router's,
/// and the staged copy of the router that a load fills before it installs it.
///
/// Options: a file loads only into a router of the same kind whose RouterKind::options() equal
/// the file's, name by name, type by type and bit by bit; the first difference is a
/// CheckpointError (router_option_mismatch) naming the option and both values. The exception is
/// NoisyTopKGate, whose noise ε and seed are restored from the file (as format version 1 did,
/// and as MoEConfig, which carries them, expects).

#include "../config.hpp"
#include "../gate.hpp"
#include "../parameters.hpp"
#include "../router/router_kind.hpp"
#include "checkpoint_error.hpp"
#include "checkpoint_format.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup files
/// @{

/// Checkpoint identity of NoisyTopKGate (Shazeer et al. 2017): kind "noisy_top_k"; options
/// noise_epsilon (real: the gate's Scalar ε widened to double, exact) and noise_seed (unsigned).
/// k is the layer's (checkpoint header); check_finite changes no result and is not recorded.
/// Unlike the other routers' options, a load restores these two from the file.
template <typename Scalar>
struct RouterKind<NoisyTopKGate<Scalar>> {
  /// The kind name a checkpoint stores.
  static std::string name() { return detail::noisy_top_k_kind; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const NoisyTopKGate<Scalar>& gate) {
    return {RouterOption::real("noise_epsilon", static_cast<double>(gate.noise_epsilon())),
            RouterOption::unsigned_integer("noise_seed", gate.noise_seed())};
  }
};

namespace detail {

/// Whether RouterT has `state()` (tensors without gradient; the Router concept of router.hpp).
template <typename RouterT, typename = void>
struct HasRouterState : std::false_type {};
template <typename RouterT>
struct HasRouterState<RouterT, std::void_t<decltype(std::declval<RouterT&>().state())>> : std::true_type {};

/// router.state(), or no views for a router without state() (NoisyTopKGate). O(number of views).
template <typename RouterT>
std::vector<TensorView<typename RouterT::Scalar>> router_state(RouterT& router) {
  if constexpr (HasRouterState<RouterT>::value) {
    return router.state();
  } else {
    static_cast<void>(router);
    return {};
  }
}

/// The name a router state tensor has in a checkpoint: `prefix` + "state." + `name`, e.g.
/// "router.state.selection_bias" (a parameter tensor would be "router.selection_bias").
inline std::string router_state_name(const char* prefix, const std::string& name) {
  return std::string(prefix) + "state." + name;
}

/// Throws CheckpointError(router_option_mismatch) unless `file` and `layer` (the target router's
/// RouterKind::options, or the target layer's options for `noun` "layer") list the same options,
/// with the same names and types in the same order, and, when `compare_values`, bitwise the same
/// values. The message names the first option that differs and both values (or both lists).
/// O(number of options).
inline void check_router_options(const std::vector<RouterOption>& file, const std::vector<RouterOption>& layer,
                                 const std::string& kind, bool compare_values, const std::string& context,
                                 const char* noun = "router") {
  using Kind = CheckpointErrorKind;
  bool same_list = file.size() == layer.size();
  for (std::size_t i = 0; same_list && i < file.size(); ++i) {
    same_list = file[i].name == layer[i].name && file[i].type == layer[i].type;
  }
  if (!same_list) {
    checkpoint_fail(Kind::router_option_mismatch, context, "expected the ", kind, " ", noun, " options ",
                    describe_router_options(layer), " (the layer's), got ", describe_router_options(file));
  }
  if (!compare_values) return;
  for (std::size_t i = 0; i < file.size(); ++i) {
    if (file[i].bits != layer[i].bits) {
      checkpoint_fail(Kind::router_option_mismatch, context, noun, " option '", layer[i].name, "': expected ",
                      layer[i].value_text(), " (the layer's ", kind, " ", noun, "), got ", file[i].value_text());
    }
  }
}

/// The file's noise ε `epsilon` as the gate's Scalar. Throws CheckpointError(malformed) unless
/// it is exactly a finite Scalar > 0.
template <typename Scalar>
Scalar checked_noise_epsilon(double epsilon, const std::string& context) {
  const auto value = static_cast<Scalar>(epsilon);
  if (!(std::isfinite(value) && value > Scalar(0) && static_cast<double>(value) == epsilon)) {
    checkpoint_fail(CheckpointErrorKind::malformed, context, "the noise epsilon ", epsilon,
                    " is not exactly a finite ", checkpoint_scalar_name(checkpoint_scalar_code<Scalar>()), " > 0");
  }
  return value;
}

/// The router a load fills and then installs: a copy of `target`, after checking that the file's
/// router options equal the target's (CheckpointError router_option_mismatch otherwise). The
/// router kind was checked before. Allocates (the copy); changes nothing.
template <typename RouterT>
RouterT stage_router(const RouterT& target, const CheckpointInfo& info, const std::string& context) {
  check_router_options(info.router_options, RouterKind<RouterT>::options(target), info.router_kind, true, context);
  return target;
}

/// NoisyTopKGate: a new gate with the file's noise ε and seed (restored, not compared) and the
/// target's sizes and check_finite setting. Throws CheckpointError(malformed) if the file's ε is
/// not exactly a finite Scalar > 0 (parse_checkpoint already checked the option list).
template <typename Scalar>
NoisyTopKGate<Scalar> stage_router(const NoisyTopKGate<Scalar>& target, const CheckpointInfo& info,
                                   const std::string& context) {
  check_router_options(info.router_options, RouterKind<NoisyTopKGate<Scalar>>::options(target), info.router_kind,
                       false, context);
  const Scalar epsilon = checked_noise_epsilon<Scalar>(info.noise_epsilon, context);
  NoisyTopKGate<Scalar> gate(target.input_dim(), target.num_experts(), target.k(), epsilon, info.noise_seed);
  gate.set_check_finite(target.check_finite());
  return gate;
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_ROUTER_HPP
