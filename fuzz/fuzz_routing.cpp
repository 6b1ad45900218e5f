// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// libFuzzer harness for routing + grouping on arbitrary logits (issue 4, item 7).
//
// Input: a 6-byte header, then values.
//   byte 0: T - 1 (T = 1 + b % 32 tokens)      byte 3: d - 1 (d = 1 + b % 8; ignored with identity)
//   byte 1: E - 1 (E = 1 + b % 12 experts)     byte 4: h - 1 (h = 1 + b % 8, the experts' hidden width)
//   byte 2: k - 1 (k = 1 + b % E)              byte 5: flags
//     flags bit 0: training mode (noise on)     bit 1: Scalar = double (else float)
//     flags bit 2: raw values (else palette)    bit 3: identity W_g (d = E, the input rows ARE the logits)
//     flags bits 4-7: step (0..15)
//   values, read in order until the data runs out (then 0): the T×E logits for select_top, W_g
//   (d×E), W_noise (d×E), the T×d input, then T×k raw expert ids. Raw: the bits of one float or
//   double each. Palette: one byte each, indexing NaN, ±Inf, ±0, ±1, ±max, ±1e30, ±lowest normal,
//   denormals, ... (ties and non-finite values are then common).
//   Then 3 capacity bytes (0 when the data has run out: dropless, as before they existed):
//     c0: capacity factor: 0 none (dropless), 1..249 → c0/32, 250 → 0, 251 → −1, 252 → NaN,
//         253 → +Inf (those four must be rejected), 254 → 1e300, 255 → the smallest denormal;
//     c1: policy c1 % 3 (DropPolicy), rounding (c1 / 3) % 2 (CapacityRounding);
//     c2: min_capacity c2 % 8.
//
// Exercised, with invariants checked by __builtin_trap():
//   * detail::select_top on every logits row for several counts: equal to a stable sort by
//     (value descending, NaN last, index ascending); ids in range and distinct;
//   * NoisyTopKGate::route with set_check_finite(false): ids in range, distinct, and the top k of
//     the noisy logits; gates finite, in [0, 1], non-increasing, summing to 1 WHEN the row's
//     logits are finite; kth_expert / next_expert consistent (training, k < E);
//   * the same route with the check on: throws std::invalid_argument exactly when some row has a
//     non-finite logit or noise scale, and the message names the first such row;
//   * build_dispatch_plan on the routed ids: every (token, slot) grouped exactly once, offsets
//     are the prefix sums of tokens_per_expert, tokens ascending inside each expert; on raw
//     (possibly out-of-range) ids: std::invalid_argument exactly when an id is out of range (−1,
//     a slot not dispatched, is in range and gets no row);
//   * build_dispatch_plan under a random expert capacity, on the routed ids and gates and on the
//     raw ids: std::invalid_argument exactly when the factor is unusable (or an id out of range);
//     otherwise ids in range, capacity respected (C = expert_capacity, ≤ C rows per expert,
//     min(routed, C) kept), every (token, slot) either grouped once or marked dropped (by the
//     router: id −1; by capacity: flagged), tokens ascending in each expert, every kept slot ahead
//     of every dropped one of its expert in the policy's order (NaN gates last), stats consistent;
//   * a whole MoELayer forward (and backward in training mode) with the check off, dropless and
//     under the same capacity: the same routing and plan invariants, outputs of the right shape,
//     no sanitizer report.
#include <sparsemoe/sparsemoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fuzz_check.hpp"

namespace {

using sparsemoe::Index;
using sparsemoe::IndexMatrix;
using sparsemoe::Matrix;
using sparsemoe::Mode;

class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t byte() { return position_ < size_ ? data_[position_++] : 0; }
  std::size_t left() const { return size_ - position_; }
  template <typename Scalar>
  Scalar value(bool raw) {
    if (raw) {
      unsigned char bytes[sizeof(Scalar)] = {};
      for (auto& b : bytes) b = byte();
      Scalar v;
      std::memcpy(&v, bytes, sizeof(Scalar));
      return v;
    }
    return palette<Scalar>(byte());
  }

 private:
  template <typename Scalar>
  static Scalar palette(std::uint8_t b) {
    using limits = std::numeric_limits<Scalar>;
    switch (b % 24) {
      case 0: return limits::quiet_NaN();
      case 1: return -limits::quiet_NaN();
      case 2: return limits::infinity();
      case 3: return -limits::infinity();
      case 4: return Scalar(0);
      case 5: return -Scalar(0);
      case 6: return Scalar(1);
      case 7: return Scalar(-1);
      case 8: return limits::max();
      case 9: return -limits::max();
      case 10: return Scalar(1e30);
      case 11: return Scalar(-1e30);
      case 12: return limits::min();
      case 13: return limits::denorm_min();
      case 14: return -limits::denorm_min();
      case 15: return limits::epsilon();
      case 16: return Scalar(88.7);   // exp overflows just above (float)
      case 17: return Scalar(-745.2); // exp underflows (double)
      default: return Scalar(static_cast<int>(b / 24) - 5);  // small integers: many ties
    }
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t position_ = 0;
};

// The reference ranking: stable sort by (value descending, NaN last), ties by index.
template <typename Scalar>
std::vector<Index> reference_ranking(const Scalar* values, Index size) {
  std::vector<Index> order(static_cast<std::size_t>(size));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    const Scalar va = values[a];
    const Scalar vb = values[b];
    if (std::isnan(va)) return false;
    if (std::isnan(vb)) return true;
    return va > vb;
  });
  return order;
}

void check_ids(const IndexMatrix& ids, Index experts) {
  for (Index t = 0; t < ids.rows(); ++t) {
    for (Index j = 0; j < ids.cols(); ++j) {
      FUZZ_CHECK(ids(t, j) >= 0 && ids(t, j) < experts);
      for (Index i = 0; i < j; ++i) FUZZ_CHECK(ids(t, i) != ids(t, j));
    }
  }
}

// A dropless plan of `ids` (in range or −1: not dispatched, no row).
void check_plan(const sparsemoe::DispatchPlan& plan, const IndexMatrix& ids, Index experts) {
  const Index tokens = ids.rows();
  const Index k = ids.cols();
  const Index not_dispatched = (ids.array() == -1).count();
  const Index rows = tokens * k - not_dispatched;
  FUZZ_CHECK(plan.num_tokens == tokens && plan.k == k && plan.num_experts == experts);
  FUZZ_CHECK(plan.num_rows() == rows && plan.dropped_slots == not_dispatched);
  FUZZ_CHECK(plan.stats.capacity == -1 && plan.stats.capacity_dropped_slots == 0);
  FUZZ_CHECK(plan.tokens_per_expert.size() == experts && plan.offsets.size() == experts + 1);
  FUZZ_CHECK(plan.token_of_row.size() == rows && plan.slot_of_row.size() == rows &&
             plan.row_of_token_slot.size() == tokens * k);
  FUZZ_CHECK(plan.offsets[0] == 0 && plan.offsets[experts] == rows);
  std::vector<int> seen(static_cast<std::size_t>(tokens * k), 0);
  for (Index e = 0; e < experts; ++e) {
    FUZZ_CHECK(plan.tokens_per_expert[e] >= 0);
    FUZZ_CHECK(plan.offsets[e + 1] - plan.offsets[e] == plan.tokens_per_expert[e]);
    Index previous_token = -1;
    for (Index r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const Index t = plan.token_of_row[r];
      const Index j = plan.slot_of_row[r];
      FUZZ_CHECK(t >= 0 && t < tokens && j >= 0 && j < k);
      FUZZ_CHECK(ids(t, j) == e);
      FUZZ_CHECK(t >= previous_token);  // stable: tokens ascending (a token twice only with duplicate ids)
      previous_token = t;
      FUZZ_CHECK(plan.row_of_slot(t, j) == r);
      ++seen[static_cast<std::size_t>(t * k + j)];
    }
  }
  for (Index i = 0; i < tokens * k; ++i) {
    const bool dispatched = ids(i / k, i % k) != -1;
    FUZZ_CHECK(seen[static_cast<std::size_t>(i)] == (dispatched ? 1 : 0));  // grouped exactly once, or never
    if (!dispatched) FUZZ_CHECK(plan.row_of_slot(i / k, i % k) == -1);
  }
}

// Whether the slot at flat index a (token a / k, slot a % k) goes ahead of b in `policy`'s
// order: token-major, slot-major, or gate descending with NaN last; then token, then slot.
template <typename Scalar>
bool goes_ahead(Index a, Index b, Index k, const Matrix<Scalar>& gates, sparsemoe::DropPolicy policy) {
  const Index ta = a / k, ja = a % k, tb = b / k, jb = b % k;
  switch (policy) {
    case sparsemoe::DropPolicy::by_position: return a < b;
    case sparsemoe::DropPolicy::by_slot_then_position: return ja != jb ? ja < jb : ta < tb;
    case sparsemoe::DropPolicy::by_probability: {
      const Scalar ga = gates(ta, ja), gb = gates(tb, jb);
      if (std::isnan(ga) != std::isnan(gb)) return std::isnan(gb);
      if (!std::isnan(ga) && ga != gb) return ga > gb;
      return a < b;
    }
  }
  return false;
}

// A plan built under `capacity` from `ids` (in range) and `gates`.
template <typename Scalar>
void check_capacity_plan(const sparsemoe::DispatchPlan& plan, const IndexMatrix& ids, const Matrix<Scalar>& gates,
                         Index experts, const sparsemoe::CapacityOptions& capacity) {
  const Index tokens = ids.rows(), k = ids.cols();
  const Index limit = sparsemoe::expert_capacity(tokens, k, experts, capacity);
  FUZZ_CHECK(limit >= capacity.min_capacity && limit >= 0);
  FUZZ_CHECK(limit <= std::max(tokens * k, capacity.min_capacity));
  FUZZ_CHECK(plan.num_tokens == tokens && plan.k == k && plan.num_experts == experts);
  FUZZ_CHECK(plan.stats.capacity == limit);
  FUZZ_CHECK(plan.tokens_per_expert.size() == experts && plan.offsets.size() == experts + 1);
  FUZZ_CHECK(plan.stats.capacity_dropped_per_expert.size() == experts);
  FUZZ_CHECK(static_cast<Index>(plan.capacity_dropped.size()) == tokens * k && plan.row_of_token_slot.size() == tokens * k);
  FUZZ_CHECK(plan.token_of_row.size() == plan.num_rows() && plan.slot_of_row.size() == plan.num_rows());
  FUZZ_CHECK(plan.offsets[0] == 0 && plan.offsets[experts] == plan.num_rows());
  Index router_dropped = 0, capacity_dropped = 0, max_routed = 0, max_rows = 0;
  std::vector<int> seen(static_cast<std::size_t>(plan.num_rows()), 0);
  for (Index e = 0; e < experts; ++e) {
    FUZZ_CHECK(plan.offsets[e + 1] - plan.offsets[e] == plan.tokens_per_expert[e]);
    FUZZ_CHECK(plan.tokens_per_expert[e] >= 0 && plan.tokens_per_expert[e] <= limit);  // capacity respected
    Index routed = 0, dropped = 0;
    for (Index flat = 0; flat < tokens * k; ++flat) {
      if (ids(flat / k, flat % k) != e) continue;
      ++routed;
      if (!plan.capacity_dropped[static_cast<std::size_t>(flat)]) continue;
      ++dropped;
      // Every kept slot of this expert goes ahead of this dropped one.
      for (Index other = 0; other < tokens * k; ++other) {
        if (ids(other / k, other % k) == e && !plan.capacity_dropped[static_cast<std::size_t>(other)]) {
          FUZZ_CHECK(goes_ahead(other, flat, k, gates, capacity.policy));
        }
      }
    }
    FUZZ_CHECK(plan.tokens_per_expert[e] == std::min(routed, limit));
    FUZZ_CHECK(plan.stats.capacity_dropped_per_expert[e] == dropped && routed - dropped == plan.tokens_per_expert[e]);
    capacity_dropped += dropped;
    max_routed = std::max(max_routed, routed);
    max_rows = std::max(max_rows, plan.tokens_per_expert[e]);
    Index previous = -1;
    for (Index r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const Index t = plan.token_of_row[r], j = plan.slot_of_row[r];
      FUZZ_CHECK(t >= 0 && t < tokens && j >= 0 && j < k);
      FUZZ_CHECK(ids(t, j) == e && !plan.dropped_by_capacity(t, j) && plan.row_of_slot(t, j) == r);
      FUZZ_CHECK(t * k + j > previous);  // token-major order inside the expert
      previous = t * k + j;
      ++seen[static_cast<std::size_t>(r)];
    }
  }
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) {
      const Index id = ids(t, j);
      FUZZ_CHECK(id >= -1 && id < experts);
      if (id < 0) {
        ++router_dropped;
        FUZZ_CHECK(!plan.dropped_by_capacity(t, j));
      }
      if (id < 0 || plan.dropped_by_capacity(t, j)) FUZZ_CHECK(plan.row_of_slot(t, j) == -1);
    }
  }
  for (const int count : seen) FUZZ_CHECK(count == 1);
  FUZZ_CHECK(plan.stats.router_dropped_slots == router_dropped && plan.stats.capacity_dropped_slots == capacity_dropped);
  FUZZ_CHECK(plan.dropped_slots == router_dropped + capacity_dropped);
  FUZZ_CHECK(plan.num_rows() == tokens * k - plan.dropped_slots);
  FUZZ_CHECK(plan.stats.max_routed_per_expert == max_routed && plan.stats.max_rows_per_expert == max_rows);
}

template <typename Scalar>
void check_routing(const sparsemoe::Routing<Scalar>& routing, Index tokens, Index experts, Index k, bool training) {
  FUZZ_CHECK(routing.num_tokens() == tokens && routing.k() == k && routing.num_experts() == experts);
  FUZZ_CHECK(routing.noisy() == training);
  check_ids(routing.expert_ids, experts);
  const double tolerance = 16.0 * static_cast<double>(k) * std::numeric_limits<Scalar>::epsilon();
  for (Index t = 0; t < tokens; ++t) {
    const Scalar* logits = routing.noisy_logits.row(t).data();
    const std::vector<Index> expected = reference_ranking(logits, experts);
    for (Index j = 0; j < k; ++j) FUZZ_CHECK(routing.expert_ids(t, j) == expected[static_cast<std::size_t>(j)]);
    if (routing.has_smooth_load()) {
      FUZZ_CHECK(routing.kth_expert[t] == expected[static_cast<std::size_t>(k - 1)]);
      FUZZ_CHECK(routing.next_expert[t] == expected[static_cast<std::size_t>(k)]);
    }
    if (routing.noisy_logits.row(t).allFinite()) {
      double sum = 0;
      for (Index j = 0; j < k; ++j) {
        const Scalar g = routing.gates(t, j);
        FUZZ_CHECK(std::isfinite(g) && g >= Scalar(0) && g <= Scalar(1));
        if (j > 0) FUZZ_CHECK(g <= routing.gates(t, j - 1));
        sum += static_cast<double>(g);
      }
      FUZZ_CHECK(std::fabs(sum - 1.0) <= tolerance);
    }
  }
}

// First row with a non-finite noisy logit or noise scale, or -1.
template <typename Scalar>
Index first_non_finite_row(const sparsemoe::Routing<Scalar>& routing) {
  for (Index t = 0; t < routing.num_tokens(); ++t) {
    const bool scale_ok = routing.noise_scale.size() == 0 || routing.noise_scale.row(t).allFinite();
    if (!routing.noisy_logits.row(t).allFinite() || !scale_ok) return t;
  }
  return -1;
}

bool names_row(const std::string& message, Index row) {
  const std::string needle = "row " + std::to_string(row);
  for (std::size_t at = message.find(needle); at != std::string::npos; at = message.find(needle, at + 1)) {
    const std::size_t end = at + needle.size();
    if (end == message.size() || message[end] < '0' || message[end] > '9') return true;
  }
  return false;
}

template <typename Scalar>
void run(Reader& in, Index tokens, Index experts, Index k, Index dim, Index hidden, bool training, bool raw,
         bool identity, std::uint64_t step) {
  const Mode mode = training ? Mode::training : Mode::evaluation;
  if (identity) dim = experts;

  // 1. select_top on arbitrary logits rows.
  Matrix<Scalar> logits(tokens, experts);
  for (Index i = 0; i < logits.size(); ++i) logits.data()[i] = in.value<Scalar>(raw);
  std::vector<Index> ids(static_cast<std::size_t>(experts) + 1);
  for (Index t = 0; t < tokens; ++t) {
    const Scalar* row = logits.row(t).data();
    const std::vector<Index> expected = reference_ranking(row, experts);
    for (const Index count : {Index(1), k, std::min(k + 1, experts), experts}) {
      ids[static_cast<std::size_t>(count)] = -7;  // sentinel: must stay untouched
      sparsemoe::detail::select_top(row, experts, count, ids.data());
      for (Index j = 0; j < count; ++j) FUZZ_CHECK(ids[static_cast<std::size_t>(j)] == expected[static_cast<std::size_t>(j)]);
      FUZZ_CHECK(ids[static_cast<std::size_t>(count)] == -7);
    }
  }

  // 2. The gate, check off and on.
  sparsemoe::NoisyTopKGate<Scalar> gate(dim, experts, k, Scalar(1e-2), /*noise_seed=*/step);  // as the layer's below
  Matrix<Scalar> input;
  if (identity) {
    gate.gate_weight().setIdentity();
    input = logits;  // logits = input·I (exact for finite rows; 0·Inf = NaN spreads non-finite values)
  } else {
    for (Index i = 0; i < gate.gate_weight().size(); ++i) gate.gate_weight().data()[i] = in.value<Scalar>(raw);
  }
  for (Index i = 0; i < gate.noise_weight().size(); ++i) gate.noise_weight().data()[i] = in.value<Scalar>(raw);
  if (!identity) {
    input.resize(tokens, dim);
    for (Index i = 0; i < input.size(); ++i) input.data()[i] = in.value<Scalar>(raw);
  }
  gate.set_check_finite(false);
  const sparsemoe::Routing<Scalar> routing = gate.route(input, mode, step);
  check_routing(routing, tokens, experts, k, training);

  gate.set_check_finite(true);
  const Index first_bad = first_non_finite_row(routing);
  bool threw = false;
  try {
    const sparsemoe::Routing<Scalar> checked = gate.route(input, mode, step);
    FUZZ_CHECK(checked.expert_ids == routing.expert_ids);
  } catch (const std::invalid_argument& error) {
    threw = true;
    FUZZ_CHECK(first_bad >= 0 && names_row(error.what(), first_bad));
  }
  FUZZ_CHECK(threw == (first_bad >= 0));

  // 3. Grouping: the routed ids, then raw ids that may be out of range or repeated.
  const sparsemoe::DispatchPlan plan = sparsemoe::build_dispatch_plan(routing.expert_ids, experts);
  check_plan(plan, routing.expert_ids, experts);
  IndexMatrix raw_ids(tokens, k);
  bool out_of_range = false;
  for (Index i = 0; i < raw_ids.size(); ++i) {
    const std::uint8_t b = in.byte();
    const Index id = b >= 0xF0 ? Index(b) - 0xF8 + (b & 1 ? experts : 0) : Index(b) % experts;  // a few out of range
    raw_ids.data()[i] = id;
    out_of_range = out_of_range || id < -1 || id >= experts;  // −1: a slot not dispatched
  }
  try {
    sparsemoe::DispatchPlan raw_plan;
    sparsemoe::build_dispatch_plan(raw_ids, experts, raw_plan);
    FUZZ_CHECK(!out_of_range);
    check_plan(raw_plan, raw_ids, experts);
  } catch (const std::invalid_argument&) {
    FUZZ_CHECK(out_of_range);
  }

  // 3b. The same under a random capacity (none when the data has run out).
  const std::uint8_t factor_byte = in.byte(), policy_byte = in.byte(), min_byte = in.byte();
  std::optional<sparsemoe::CapacityOptions> capacity;
  bool usable = true;
  if (factor_byte != 0) {
    sparsemoe::CapacityOptions o;
    switch (factor_byte) {
      case 250: o.factor = 0.0; usable = false; break;
      case 251: o.factor = -1.0; usable = false; break;
      case 252: o.factor = std::numeric_limits<double>::quiet_NaN(); usable = false; break;
      case 253: o.factor = std::numeric_limits<double>::infinity(); usable = false; break;
      case 254: o.factor = 1e300; break;
      case 255: o.factor = std::numeric_limits<double>::denorm_min(); break;
      default: o.factor = factor_byte / 32.0; break;
    }
    o.policy = static_cast<sparsemoe::DropPolicy>(policy_byte % 3);
    o.rounding = static_cast<sparsemoe::CapacityRounding>((policy_byte / 3) % 2);
    o.min_capacity = min_byte % 8;
    capacity = o;
    sparsemoe::DispatchPlan capped;
    try {
      sparsemoe::build_dispatch_plan(routing.expert_ids, routing.gates, experts, o, capped);
      FUZZ_CHECK(usable);
      check_capacity_plan(capped, routing.expert_ids, routing.gates, experts, o);
    } catch (const std::invalid_argument&) {
      FUZZ_CHECK(!usable);
    }
    try {  // into the same plan: leftovers of the previous one must not matter
      sparsemoe::build_dispatch_plan(raw_ids, routing.gates, experts, o, capped);
      FUZZ_CHECK(usable && !out_of_range);
      check_capacity_plan(capped, raw_ids, routing.gates, experts, o);
    } catch (const std::invalid_argument&) {
      FUZZ_CHECK(!usable || out_of_range);
    }
  }

  // 4. A whole layer, check off: forward (and backward in training).
  sparsemoe::MoEConfig config;
  config.input_dim = dim;
  config.hidden_dim = hidden;
  config.num_experts = experts;
  config.k = k;
  config.seed = step;
  sparsemoe::MoELayer<Scalar> layer(config);
  layer.gate().gate_weight() = gate.gate_weight();
  layer.gate().noise_weight() = gate.noise_weight();
  layer.gate().set_check_finite(false);
  sparsemoe::ForwardOptions options;
  options.mode = mode;
  options.step = step;
  const sparsemoe::ForwardResult<Scalar> result = layer.forward(input, options);
  check_routing(result.routing, tokens, experts, k, training);
  FUZZ_CHECK(result.routing.expert_ids == routing.expert_ids);
  check_plan(result.plan, result.routing.expert_ids, experts);
  FUZZ_CHECK(result.output.rows() == tokens && result.output.cols() == dim);
  FUZZ_CHECK(result.losses.importance.size() == experts && result.losses.load.size() == experts);
  FUZZ_CHECK(result.cache.empty() == !training);
  if (training) {
    auto gradients = layer.make_gradients();
    const Matrix<Scalar> d_output = Matrix<Scalar>::Ones(tokens, dim);
    const Matrix<Scalar> d_input = layer.backward(result, d_output, gradients);
    FUZZ_CHECK(d_input.rows() == tokens && d_input.cols() == dim);
  }

  // 5. The layer under the capacity: same routing, a capacity plan, backward accepts it.
  if (!capacity) return;
  options.capacity = capacity;
  try {
    const sparsemoe::ForwardResult<Scalar> capped = layer.forward(input, options);
    FUZZ_CHECK(usable);
    FUZZ_CHECK(capped.routing.expert_ids == routing.expert_ids);
    check_capacity_plan(capped.plan, capped.routing.expert_ids, capped.routing.gates, experts, *capacity);
    FUZZ_CHECK(capped.output.rows() == tokens && capped.output.cols() == dim);
    if (training) {
      auto gradients = layer.make_gradients();
      const Matrix<Scalar> d_input = layer.backward(capped, Matrix<Scalar>::Ones(tokens, dim), gradients);
      FUZZ_CHECK(d_input.rows() == tokens && d_input.cols() == dim);
    }
  } catch (const std::invalid_argument&) {
    FUZZ_CHECK(!usable);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 6) return 0;
  Reader in(data, size);
  const Index tokens = 1 + in.byte() % 32;
  const Index experts = 1 + in.byte() % 12;
  const Index k = 1 + in.byte() % experts;
  const Index dim = 1 + in.byte() % 8;
  const Index hidden = 1 + in.byte() % 8;
  const std::uint8_t flags = in.byte();
  const bool training = flags & 1u;
  const bool use_double = flags & 2u;
  const bool raw = flags & 4u;
  const bool identity = flags & 8u;
  const std::uint64_t step = flags >> 4;
  if (use_double) {
    run<double>(in, tokens, experts, k, dim, hidden, training, raw, identity, step);
  } else {
    run<float>(in, tokens, experts, k, dim, hidden, training, raw, identity, step);
  }
  return 0;
}
