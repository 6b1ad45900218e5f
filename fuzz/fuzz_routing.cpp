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
//     (possibly out-of-range) ids: std::invalid_argument exactly when an id is out of range;
//   * a whole MoELayer forward (and backward in training mode) with the check off: the same
//     routing and plan invariants, outputs of the right shape, no sanitizer report.
#include <sparsemoe/sparsemoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#define FUZZ_CHECK(condition)                                                                   \
  do {                                                                                          \
    if (!(condition)) {                                                                         \
      std::fprintf(stderr, "fuzz_routing: invariant failed: %s (%s:%d)\n", #condition, __FILE__, \
                   __LINE__);                                                                   \
      __builtin_trap();                                                                         \
    }                                                                                           \
  } while (false)

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

void check_plan(const sparsemoe::DispatchPlan& plan, const IndexMatrix& ids, Index experts) {
  const Index tokens = ids.rows();
  const Index k = ids.cols();
  const Index rows = tokens * k;
  FUZZ_CHECK(plan.num_tokens == tokens && plan.k == k && plan.num_experts == experts);
  FUZZ_CHECK(plan.num_rows() == rows);
  FUZZ_CHECK(plan.tokens_per_expert.size() == experts && plan.offsets.size() == experts + 1);
  FUZZ_CHECK(plan.token_of_row.size() == rows && plan.slot_of_row.size() == rows &&
             plan.row_of_token_slot.size() == rows);
  FUZZ_CHECK(plan.offsets[0] == 0 && plan.offsets[experts] == rows);
  std::vector<int> seen(static_cast<std::size_t>(rows), 0);
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
  for (const int count : seen) FUZZ_CHECK(count == 1);  // every (token, slot) grouped exactly once
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
    out_of_range = out_of_range || id < 0 || id >= experts;
  }
  try {
    sparsemoe::DispatchPlan raw_plan;
    sparsemoe::build_dispatch_plan(raw_ids, experts, raw_plan);
    FUZZ_CHECK(!out_of_range);
    check_plan(raw_plan, raw_ids, experts);
  } catch (const std::invalid_argument&) {
    FUZZ_CHECK(out_of_range);
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
