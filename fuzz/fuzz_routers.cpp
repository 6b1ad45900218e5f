// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// libFuzzer harness for the top-k routers of router.hpp (issue 11, item 7): SoftmaxTopKRouter,
// SigmoidTopKRouter, SwitchRouter and GShardRouter, alone and inside an MoELayer.
//
// Input: a 6-byte header, then one byte per value.
//   byte 0: router (b % 4: softmax, sigmoid, Switch, GShard)
//   byte 1: T − 1 (T = 1 + b % 24)        byte 2: E − 1 (E = 1 + b % 12)
//   byte 3: k − 1 (k = 1 + b % E)         byte 4: flags: bit 0 training, bit 1 normalize_top_k,
//     bit 2 use_bias, bit 3 softmax_over_selected / HF's zero group mask / Switch jitter,
//     bit 4 Scalar = double, bits 5-7 step
//   byte 5: num_groups = 1 + b % 4, top_groups = 1 + (b / 4) % 4
//   values (0 when the data has run out): W_r (d×E, d = 4), the bias (E), the selection bias (E),
//   the T×d input. A value byte indexes a palette of NaN, ±Inf, ±0, ±1e30 and denormals, or
//   else stands for (b − 128)/16 (ties are common).
//
// Invariants, checked by __builtin_trap(): a constructor or route may only throw
// std::invalid_argument (bad options; non-finite logits). Otherwise: ids in [0, E) and distinct
// per token, −1 only for GShard's second slot in training; gates finite and ≥ 0, 0 where the id
// is −1; renormalised softmax gates sum to the routed scale; with groups, every chosen expert is
// in a kept group; backward with unit upstream gradients and a whole MoELayer forward + backward
// give finite results of the right shapes; a dispatch plan groups every dispatched slot once.
#include <sparsemoe/sparsemoe.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "fuzz_check.hpp"

namespace {

using sparsemoe::Index;

struct Bytes {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t next = 0;
  std::uint8_t take() { return next < size ? data[next++] : 0; }
};

template <typename Scalar>
Scalar value_of(std::uint8_t b) {
  switch (b) {
    case 0: return std::numeric_limits<Scalar>::quiet_NaN();
    case 1: return std::numeric_limits<Scalar>::infinity();
    case 2: return -std::numeric_limits<Scalar>::infinity();
    case 3: return Scalar(-0.0);
    case 4: return Scalar(1e30);
    case 5: return Scalar(-1e30);
    case 6: return std::numeric_limits<Scalar>::denorm_min();
    default: return static_cast<Scalar>((static_cast<int>(b) - 128) / 16.0);
  }
}

template <typename Scalar>
void fill(sparsemoe::Matrix<Scalar>& m, Bytes& bytes) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = value_of<Scalar>(bytes.take());
}

template <typename Scalar>
void fill(sparsemoe::Vector<Scalar>& v, Bytes& bytes) {
  for (Index i = 0; i < v.size(); ++i) v[i] = value_of<Scalar>(bytes.take());
}

template <typename RouterT>
void exercise(RouterT router, Index tokens, Index k, bool training, std::uint64_t step, double scale,
              bool renormalised, bool drops_second, bool groups_exclusive, Bytes& bytes) {
  using Scalar = typename RouterT::Scalar;
  const Index d = router.input_dim(), experts = router.num_experts();
  auto parameters = router.tensors();
  for (auto& view : parameters) {
    for (Index i = 0; i < view.size(); ++i) view.data[i] = value_of<Scalar>(bytes.take());
  }
  sparsemoe::Matrix<Scalar> input(tokens, d);
  fill(input, bytes);
  sparsemoe::RouteOptions options;
  options.mode = training ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
  options.step = step;
  sparsemoe::TopKRouting<Scalar> routing;
  try {
    router.route(input, options, routing);
  } catch (const std::invalid_argument&) {
    return;  // non-finite logits, named by the message
  }
  FUZZ_CHECK(routing.expert_ids.rows() == tokens && routing.expert_ids.cols() == k);
  FUZZ_CHECK(routing.gates.rows() == tokens && routing.gates.cols() == k);
  for (Index t = 0; t < tokens; ++t) {
    double sum = 0;
    bool dropped = false;
    for (Index j = 0; j < k; ++j) {
      const Index id = routing.expert_ids(t, j);
      const double gate = static_cast<double>(routing.gates(t, j));
      FUZZ_CHECK(std::isfinite(gate) && gate >= 0.0);
      if (id == -1) {
        FUZZ_CHECK(drops_second && training && j == 1 && gate == 0.0);
        dropped = true;
        continue;
      }
      FUZZ_CHECK(id >= 0 && id < experts);
      for (Index other = 0; other < j; ++other) FUZZ_CHECK(routing.expert_ids(t, other) != id);
      if (groups_exclusive && routing.selected_groups.size() > 0) {
        const Index group = id / (experts / routing.group_scores.cols());
        bool kept = false;
        for (Index g = 0; g < routing.selected_groups.cols(); ++g) kept = kept || routing.selected_groups(t, g) == group;
        FUZZ_CHECK(kept);
      }
      sum += gate;
    }
    if (renormalised && !dropped) FUZZ_CHECK(std::fabs(sum - scale) <= 1e-4 * scale);
  }
  // Backward with unit upstream gradients: finite, right shapes.
  sparsemoe::TopKRoutingGradient<Scalar> upstream;
  upstream.set_zero(routing);
  upstream.gates.setOnes();
  auto gradients = router.make_gradients();
  sparsemoe::Matrix<Scalar> d_input = sparsemoe::Matrix<Scalar>::Zero(tokens, d);
  router.backward(routing, input, upstream, gradients, d_input);
  FUZZ_CHECK(gradients.weight.rows() == d && gradients.weight.cols() == experts);
  // The plan groups every dispatched slot exactly once.
  const sparsemoe::DispatchPlan plan = sparsemoe::build_dispatch_plan(routing.expert_ids, experts);
  Index dispatched = 0;
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) {
      const Index row = plan.row_of_slot(t, j);
      if (routing.expert_ids(t, j) < 0) {
        FUZZ_CHECK(row == -1);
        continue;
      }
      ++dispatched;
      FUZZ_CHECK(row >= 0 && row < plan.num_rows() && plan.token_of_row[row] == t && plan.slot_of_row[row] == j);
    }
  }
  FUZZ_CHECK(dispatched == plan.num_rows());
  // The whole layer around the router (ReLU experts, h = 3).
  sparsemoe::MoEConfig config;
  config.input_dim = d;
  config.hidden_dim = 3;
  config.num_experts = experts;
  config.k = k;
  sparsemoe::MoELayer<Scalar, sparsemoe::Expert<Scalar>, RouterT> layer(config, router);
  sparsemoe::ForwardOptions forward_options;
  forward_options.mode = options.mode;
  forward_options.step = step;
  forward_options.keep_cache = true;
  forward_options.z_loss_weight = 1e-3;
  const auto result = layer.forward(input, forward_options);
  FUZZ_CHECK(result.output.rows() == tokens && result.output.cols() == d);
  auto layer_gradients = layer.make_gradients();
  const sparsemoe::Matrix<Scalar> d_y = sparsemoe::Matrix<Scalar>::Ones(tokens, d);
  const sparsemoe::Matrix<Scalar> d_x = layer.backward(result, d_y, layer_gradients);
  FUZZ_CHECK(d_x.rows() == tokens && d_x.cols() == d);
}

template <typename Scalar>
void run(Bytes& bytes, std::uint8_t kind, Index tokens, Index experts, Index k, std::uint8_t flags,
         std::uint8_t groups) {
  const bool training = flags & 1, normalize = flags & 2, bias = flags & 4, extra = flags & 8;
  const std::uint64_t step = flags >> 5;
  const Index num_groups = 1 + groups % 4, top_groups = 1 + (groups / 4) % 4;
  const Index d = 4;
  try {
    switch (kind % 4) {
      case 0: {
        sparsemoe::SoftmaxTopKRouterOptions o;
        o.k = k;
        o.normalize_top_k = normalize;
        o.use_bias = bias;
        o.softmax_over_selected = extra;
        o.num_groups = num_groups;
        o.top_groups = top_groups;
        o.scale = 2.5;
        sparsemoe::SoftmaxTopKRouter<Scalar> router(d, experts, o);
        exercise(router, tokens, k, training, step, 2.5, normalize || extra, false, true, bytes);
        break;
      }
      case 1: {
        sparsemoe::SigmoidTopKRouterOptions o;
        o.k = k;
        o.normalize_top_k = normalize;
        o.use_bias = bias;
        o.group_mask = extra ? sparsemoe::GroupMask::zero : sparsemoe::GroupMask::exclude;
        o.num_groups = num_groups;
        o.top_groups = top_groups;
        sparsemoe::SigmoidTopKRouter<Scalar> router(d, experts, o);
        fill(router.selection_bias(), bytes);
        exercise(router, tokens, k, training, step, 1.0, false, false, !extra, bytes);
        break;
      }
      case 2: {
        sparsemoe::SwitchRouterOptions o;
        o.use_bias = bias;
        o.jitter_epsilon = extra ? 0.01 : 0.0;
        o.seed = groups;
        sparsemoe::SwitchRouter<Scalar> router(d, experts, o);
        exercise(router, tokens, 1, training, step, 1.0, false, false, true, bytes);
        break;
      }
      default: {
        sparsemoe::GShardRouterOptions o;
        o.use_bias = bias;
        o.seed = groups;
        sparsemoe::GShardRouter<Scalar> router(d, experts, o);
        exercise(router, tokens, 2, training, step, 1.0, true, true, true, bytes);
        break;
      }
    }
  } catch (const std::invalid_argument&) {
    // Options the router (or the layer) rejects: groups not dividing E, k > E, E < 2 for GShard, …
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 6) return 0;
  Bytes bytes{data, size, 6};
  const Index tokens = 1 + data[1] % 24;
  const Index experts = 1 + data[2] % 12;
  const Index k = 1 + data[3] % experts;
  try {
    if (data[4] & 16) {
      run<double>(bytes, data[0], tokens, experts, k, data[4], data[5]);
    } else {
      run<float>(bytes, data[0], tokens, experts, k, data[4], data[5]);
    }
  } catch (...) {
    __builtin_trap();  // anything but std::invalid_argument is a bug
  }
  return 0;
}
