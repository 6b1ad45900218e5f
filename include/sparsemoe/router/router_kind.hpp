// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_ROUTER_ROUTER_KIND_HPP
#define SPARSEMOE_ROUTER_ROUTER_KIND_HPP

/// \file router_kind.hpp
/// A router's identity as a checkpoint records it: RouterKind<RouterT> gives a kind string
/// ("softmax_top_k", …) and the list of the router's options that change its math, each a typed
/// RouterOption. Each router header specialises RouterKind next to its router, so the checkpoint
/// code needs none of the router headers: it sees only the routers the user included.
///
/// A checkpoint stores the kind and the options of the layer's router and loads only into a
/// layer whose router has the same kind and bitwise the same options (checkpoint.hpp). A router
/// of your own becomes checkpointable by specialising RouterKind with the two members of the
/// primary template.

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// How a RouterOption's 64 value bits are read. The numbers are the codes a checkpoint stores.
enum class RouterOptionType : std::uint32_t {
  integer = 1,           ///< a signed integer (two's complement), e.g. k, num_groups
  unsigned_integer = 2,  ///< an unsigned integer, e.g. a seed
  real = 3,              ///< the IEEE-754 binary64 bits of a double, e.g. scale
  flag = 4,              ///< 0 (false) or 1 (true), e.g. normalize_top_k
};

/// "integer", "unsigned", "real", "flag", or "unknown" for a code outside the enumeration.
inline const char* to_string(RouterOptionType type) {
  switch (type) {
    case RouterOptionType::integer: return "integer";
    case RouterOptionType::unsigned_integer: return "unsigned";
    case RouterOptionType::real: return "real";
    case RouterOptionType::flag: return "flag";
  }
  return "unknown";
}

/// One setting of a router that changes what it computes, as a checkpoint stores it: a name, a
/// type and 64 bits. Two options are equal when name, type and bits are (reals bitwise: −0.0 is
/// not 0.0). Cost: one string.
struct RouterOption {
  std::string name;                                  ///< as in the router's Options struct, e.g. "scale"
  RouterOptionType type = RouterOptionType::integer; ///< how `bits` is read
  std::uint64_t bits = 0;                            ///< the value's bits (see RouterOptionType)

  /// A signed integer option.
  static RouterOption integer(std::string name, std::int64_t value) {
    return {std::move(name), RouterOptionType::integer, static_cast<std::uint64_t>(value)};
  }
  /// An unsigned integer option (seeds).
  static RouterOption unsigned_integer(std::string name, std::uint64_t value) {
    return {std::move(name), RouterOptionType::unsigned_integer, value};
  }
  /// A real option: the bits of the double `value`, exactly.
  static RouterOption real(std::string name, double value) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    return {std::move(name), RouterOptionType::real, bits};
  }
  /// A boolean option: 1 for true, 0 for false.
  static RouterOption flag(std::string name, bool value) {
    return {std::move(name), RouterOptionType::flag, value ? 1u : 0u};
  }

  /// The value of an integer option.
  std::int64_t as_integer() const { return static_cast<std::int64_t>(bits); }
  /// The value of a real option.
  double as_real() const {
    double value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  /// The value of a flag option (any non-zero bits read as true).
  bool as_flag() const { return bits != 0; }

  /// The value as text: "-3", "42", "2.5" (reals with 17 significant digits, so that two
  /// different doubles never print alike; "-0" for −0.0), "true"/"false".
  std::string value_text() const {
    std::ostringstream stream;
    switch (type) {
      case RouterOptionType::integer: stream << as_integer(); break;
      case RouterOptionType::unsigned_integer: stream << bits; break;
      case RouterOptionType::real:
        stream.precision(17);
        stream << as_real();
        break;
      case RouterOptionType::flag: stream << (as_flag() ? "true" : "false"); break;
      default: stream << "bits " << bits; break;
    }
    return stream.str();
  }

  friend bool operator==(const RouterOption& a, const RouterOption& b) {
    return a.name == b.name && a.type == b.type && a.bits == b.bits;
  }
  friend bool operator!=(const RouterOption& a, const RouterOption& b) { return !(a == b); }
};

/// A router type's checkpoint identity. Specialise it for each router type with:
///
/// | member | meaning |
/// | --- | --- |
/// | `static std::string name()` | a kind string no other router type returns, at most 256 bytes (e.g. "softmax_top_k"), not starting with "layer:" (reserved for the layer types other than MoELayer) |
/// | `static std::vector<RouterOption> options(const RouterT& router)` | every option of `router` that changes its forward or backward, in a fixed order, with distinct names (at most 256 bytes each) |
///
/// Leave out what does not change the math (e.g. check_finite, which only decides whether bad
/// logits throw) and what the layer already records (d, E and k are in the checkpoint header).
/// Specialisations here: SoftmaxTopKRouter (router/softmax_top_k.hpp), SigmoidTopKRouter
/// (router/sigmoid_top_k.hpp), SwitchRouter and GShardRouter (router/switch.hpp); NoisyTopKGate's
/// is in io/checkpoint_router.hpp, because a checkpoint restores its options instead.
template <typename RouterT>
struct RouterKind {
  static_assert(sizeof(RouterT) == 0,
                "sparsemoe::RouterKind is not specialised for this router type: specialise it to checkpoint it");
  /// The kind name a checkpoint stores.
  static std::string name() { return {}; }
  /// The options that change the router's results, as a checkpoint stores and compares them.
  static std::vector<RouterOption> options(const RouterT&) { return {}; }
};

}  // namespace sparsemoe

#endif  // SPARSEMOE_ROUTER_ROUTER_KIND_HPP
