// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The layer's stages as the seam of expert parallelism.
//   * combine_backward and group_backward against naive loops over (token, slot);
//   * a forward and a backward run stage by stage, with the experts split over two (or three)
//     ExpertBanks that each see only the grouped rows of their own experts, as the ranks of an
//     expert-parallel layer would after the exchange: output, kept pre-activations, ∂x, the
//     router's and every expert's gradients bitwise equal to MoELayer::forward/backward (same
//     kernels on the same per-expert tiles), including a share with no rows at all;
//   * the stages reject mismatched shapes with std::invalid_argument.
#include <sparsemoe/sparsemoe.hpp>

#include "reference_gate.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::IndexVector;
using MatrixD = sparsemoe::Matrix<double>;
using VectorD = sparsemoe::Vector<double>;
using Layer = sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::GeluTanh>>;
using ExpertD = Layer::ExpertType;

MatrixD random_matrix(Index rows, Index cols, std::uint64_t seed) {
  MatrixD m(rows, cols);
  sparsemoe::detail::fill_uniform(m.data(), m.size(), 1.0, seed, 0);
  return m;
}

Layer make_layer(Index d, Index h, Index experts, Index k) {
  sparsemoe::MoEConfig config{d, h, experts, k};  // d, h, E, k
  config.seed = 7;
  Layer layer(config);
  layer.gate().initialize_uniform(11);
  return layer;
}

TEST(Stages, CombineBackwardAndGroupBackwardMatchNaiveLoops) {
  const Index d = 6, tokens = 50, k = 2;
  const Layer layer = make_layer(d, 8, 4, k);
  const MatrixD x = random_matrix(tokens, d, 3);
  sparsemoe::ForwardOptions options;
  sparsemoe::CapacityOptions capacity;
  capacity.factor = 0.6;  // some slots have no row
  options.capacity = capacity;
  const auto result = layer.forward(x, options);
  ASSERT_GT(result.stats().capacity_dropped_slots, 0);
  const sparsemoe::DispatchPlan& plan = result.plan;
  const MatrixD dy = random_matrix(tokens, d, 4);

  MatrixD grouped_dy;
  VectorD gates;
  layer.combine_backward(dy, result.routing, plan, grouped_dy, gates);
  ASSERT_EQ(grouped_dy.rows(), plan.num_rows());
  ASSERT_EQ(gates.size(), plan.num_rows());
  MatrixD d_grouped = random_matrix(plan.num_rows(), d, 5);
  MatrixD expected = MatrixD::Zero(tokens, d);
  Index rows_seen = 0;
  for (Index t = 0; t < tokens; ++t) {
    for (Index j = 0; j < k; ++j) {
      const Index expert = result.routing.expert_ids(t, j);
      if (result.plan.dropped_by_capacity(t, j)) continue;
      // The row of (t, j): the one grouped row of expert `expert` that names (t, j).
      Index row = -1;
      for (Index r = plan.offsets[expert]; r < plan.offsets[expert + 1]; ++r) {
        if (plan.token_of_row[r] == t && plan.slot_of_row[r] == j) row = r;
      }
      ASSERT_GE(row, 0);
      ++rows_seen;
      EXPECT_EQ(grouped_dy.row(row), dy.row(t));
      EXPECT_EQ(gates[row], result.routing.gates(t, j));
      expected.row(t) += d_grouped.row(row);
    }
  }
  EXPECT_EQ(rows_seen, plan.num_rows());
  MatrixD d_input;
  Layer::group_backward(plan, d_grouped, d_input);
  EXPECT_EQ(d_input, expected);

  EXPECT_INVALID_ARGUMENT_WITH(layer.combine_backward(random_matrix(tokens + 1, d, 6), result.routing, plan,
                                                      grouped_dy, gates),
                               "combine_backward", "d_output");
  EXPECT_INVALID_ARGUMENT_WITH(Layer::group_backward(plan, random_matrix(plan.num_rows() + 1, d, 7), d_input),
                               "group_backward", "d_grouped_input has");
}

/// The experts [first, last) of `layer` as a bank of their own, and their share of a plan's rows.
struct Share {
  Index first = 0;
  Index last = 0;
  sparsemoe::ExpertBank<double, ExpertD> bank;
  Index base = 0;  // first grouped row of the share
  Index rows = 0;
  IndexVector offsets;  // local layout: offsets of experts first … last, minus base
};

std::vector<Share> split(const Layer& layer, const sparsemoe::DispatchPlan& plan, const std::vector<Index>& bounds) {
  std::vector<Share> shares;
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    Share share;
    share.first = bounds[s];
    share.last = bounds[s + 1];
    const auto& all = layer.expert_bank().experts();
    share.bank = sparsemoe::ExpertBank<double, ExpertD>(
        std::vector<ExpertD>(all.begin() + share.first, all.begin() + share.last));
    share.base = plan.offsets[share.first];
    share.rows = plan.offsets[share.last] - share.base;
    // Only the counts travel with the rows: rebuild the layout from them.
    IndexVector counts(share.last - share.first);
    for (Index e = share.first; e < share.last; ++e) counts[e - share.first] = plan.tokens_per_expert[e];
    sparsemoe::bank_offsets_from_counts(counts, share.offsets);
    shares.push_back(std::move(share));
  }
  return shares;
}

void expect_split_matches_layer(const Layer& layer, Index tokens, const std::vector<Index>& bounds,
                                std::uint64_t seed) {
  const Index d = layer.input_dim();
  const MatrixD x = random_matrix(tokens, d, seed);
  const MatrixD dy = random_matrix(tokens, d, seed + 1);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  options.step = 3;
  const auto reference = layer.forward(x, options);
  auto reference_gradients = layer.make_gradients();
  const MatrixD reference_dx = layer.backward(reference, dy, reference_gradients);

  // Forward, stage by stage.
  Layer::Traits::Routing routing;
  layer.route(x, options, routing);
  sparsemoe::DispatchPlan plan;
  sparsemoe::build_dispatch_plan(routing.expert_ids, layer.num_experts(), plan);
  MatrixD grouped;
  Layer::group(x, plan, grouped);
  std::vector<Share> shares = split(layer, plan, bounds);
  MatrixD expert_output(plan.num_rows(), d), pre(plan.num_rows(), layer.expert_bank().pre_activation_width());
  for (Share& share : shares) {
    // The rows this share receives, in a buffer of its own (what an exchange would deliver).
    const MatrixD received = grouped.middleRows(share.base, share.rows);
    MatrixD share_output, share_pre;
    sparsemoe::ExpertBankForwardWorkspace<double> workspace;
    share.bank.forward(share.offsets, received, &share_pre, share_output, workspace);
    expert_output.middleRows(share.base, share.rows) = share_output;
    pre.middleRows(share.base, share.rows) = share_pre;
  }
  MatrixD output;
  layer.combine(expert_output, routing, plan, output);
  EXPECT_EQ(output, reference.output);
  EXPECT_EQ(pre, reference.cache.pre_activations);

  // Backward, stage by stage.
  MatrixD grouped_dy;
  VectorD gates;
  layer.combine_backward(dy, routing, plan, grouped_dy, gates);
  MatrixD d_grouped(plan.num_rows(), d);
  VectorD d_gates(plan.num_rows());
  auto gradients = layer.make_gradients();
  for (Share& share : shares) {
    MatrixD received_dy = grouped_dy.middleRows(share.base, share.rows);
    const VectorD received_gates = gates.segment(share.base, share.rows);
    MatrixD share_d_input;
    VectorD share_d_gates;
    std::vector<ExpertD> share_gradients = share.bank.make_gradients();
    sparsemoe::ExpertBankBackwardWorkspace<double> workspace;
    share.bank.backward(share.offsets, grouped.middleRows(share.base, share.rows), pre.middleRows(share.base, share.rows),
                        received_dy, received_gates, share_d_input, share_d_gates, share_gradients, workspace);
    d_grouped.middleRows(share.base, share.rows) = share_d_input;
    d_gates.segment(share.base, share.rows) = share_d_gates;
    for (Index e = share.first; e < share.last; ++e) {
      gradients.experts[static_cast<std::size_t>(e)] = share_gradients[static_cast<std::size_t>(e - share.first)];
    }
  }
  MatrixD d_input;
  Layer::group_backward(plan, d_grouped, d_input);
  Layer::Traits::RoutingGradient routing_gradient;
  layer.route_backward(x, routing, reference.losses, plan, d_gates, routing_gradient, gradients.router(), d_input);
  EXPECT_EQ(d_input, reference_dx);
  const auto views = gradients.tensors();
  const auto reference_views = reference_gradients.tensors();
  ASSERT_EQ(views.size(), reference_views.size());
  for (std::size_t t = 0; t < views.size(); ++t) {
    const Eigen::Map<const MatrixD> got(views[t].data, views[t].rows, views[t].cols);
    const Eigen::Map<const MatrixD> want(reference_views[t].data, reference_views[t].rows, reference_views[t].cols);
    EXPECT_EQ(got, want) << views[t].name;
  }
}

TEST(Stages, ExpertsSplitOverBanksGiveTheLayersResultsBitForBit) {
  // 400 tokens · k = 2 over 4 experts: each half gets more than the column split's 256 rows, so
  // every share runs the same row tiles as the whole layer.
  const Layer layer = make_layer(12, 20, 4, 2);
  expect_split_matches_layer(layer, 400, {0, 2, 4}, 21);
  expect_split_matches_layer(layer, 400, {0, 1, 3, 4}, 22);
}

TEST(Stages, AShareWithoutRows) {
  const Layer layer = make_layer(5, 6, 3, 1);
  // Hand-made ids that never name expert 0: its share receives nothing.
  sparsemoe::IndexMatrix ids(4, 1);
  ids << 1, 2, 2, 1;
  sparsemoe::DispatchPlan plan;
  sparsemoe::build_dispatch_plan(ids, 3, plan);
  std::vector<Share> shares = split(layer, plan, {0, 1, 3});
  ASSERT_EQ(shares[0].rows, 0);
  const MatrixD empty(0, 5);
  MatrixD output, pre, d_input;
  VectorD d_gates;
  sparsemoe::ExpertBankForwardWorkspace<double> forward_workspace;
  shares[0].bank.forward(shares[0].offsets, empty, &pre, output, forward_workspace);
  EXPECT_EQ(output.rows(), 0);
  MatrixD d_output(0, 5);
  std::vector<ExpertD> gradients = shares[0].bank.make_gradients();
  sparsemoe::ExpertBankBackwardWorkspace<double> workspace;
  shares[0].bank.backward(shares[0].offsets, empty, pre, d_output, VectorD(), d_input, d_gates, gradients, workspace);
  EXPECT_EQ(d_input.rows(), 0);
  EXPECT_EQ(gradients[0].w1().cwiseAbs().maxCoeff(), 0.0);
}

}  // namespace
