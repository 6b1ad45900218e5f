// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Check drivers shared by the tests of the top-k routers
// (router/softmax_top_k.hpp, router/sigmoid_top_k.hpp, router/switch.hpp): they
// run a router's route and backward and compare them with central finite
// differences (double) or with themselves across thread counts. The references
// they compare with are independent of the router (gradient_check.hpp's
// stencil); the records' fields are the routers' own.
#ifndef SPARSEMOE_TESTS_ROUTER_CHECKS_HPP
#define SPARSEMOE_TESTS_ROUTER_CHECKS_HPP

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <sparsemoe/balance_losses.hpp>
#include <sparsemoe/router.hpp>
#include <string>

#include "gradient_check.hpp"
#include "router_reference.hpp"

namespace router_checks {

using reference::MatrixD;
using sparsemoe::Index;

/// No further check (the default `extra` of expect_router_gradients).
struct NoExtraCheck {
  template <typename Loss>
  void operator()(Loss &) const {}
};

/// L = Σ a⊙gates + Σ B⊙scores + Σ C⊙logits + 0.7·balance_loss + 0.3·z_loss over
/// a T×d input (input from `seed`, a, B, C from seed + 1, + 2, + 3): the
/// router's backward must give ∂L/∂W_r, ∂L/∂b_r (when the router has a bias)
/// and ∂L/∂x equal to central finite differences within 1e-6 relative.
/// `extra(loss)` may check further parameters against the same loss (e.g. that
/// a selection bias gets none). A perturbation that changes the selection
/// (expert ids or kept groups) fails the test: the data must lie away from
/// ties.
template <typename Router, typename Extra = NoExtraCheck>
void expect_router_gradients(Router &router, const sparsemoe::RouteOptions &route, Index tokens, std::uint64_t seed,
                             const sparsemoe::BalanceLossOptions &balance, Extra extra = {}) {
  using router_reference::same;
  MatrixD input = reference::uniform<double>(tokens, router.input_dim(), seed);
  const MatrixD a = reference::uniform<double>(tokens, router.k(), seed + 1);
  const MatrixD b = reference::uniform<double>(tokens, router.num_experts(), seed + 2);
  const MatrixD cz = reference::uniform<double>(tokens, router.num_experts(), seed + 3);
  const double alpha = 0.7, beta = 0.3;
  sparsemoe::TopKRouting<double> base;
  router.route(input, route, base);
  int flips = 0;
  auto loss = [&]() {
    sparsemoe::TopKRouting<double> r;
    router.route(input, route, r);
    if (!same(r.expert_ids, base.expert_ids) || !same(r.selected_groups, base.selected_groups)) ++flips;
    return (a.array() * r.gates.array()).sum() + (b.array() * r.scores.array()).sum() +
           (cz.array() * r.logits.array()).sum() + sparsemoe::balance_loss(r, alpha, balance) +
           sparsemoe::z_loss(r, beta);
  };
  sparsemoe::TopKRoutingGradient<double> up;
  up.set_zero(base);
  up.gates = a;
  up.scores = b;
  up.logits = cz;
  sparsemoe::balance_loss_backward(base, alpha, balance, up);
  sparsemoe::z_loss_backward(base, beta, up);
  auto grads = router.make_gradients();
  // Backward adds: start from known values and subtract them afterwards.
  grads.weight.setConstant(0.25);
  grads.bias.setConstant(-0.5);
  MatrixD dx = MatrixD::Constant(tokens, router.input_dim(), 2.0);
  router.backward(base, input, up, grads, dx);
  grads.weight.array() -= 0.25;
  grads.bias.array() += 0.5;
  dx.array() -= 2.0;
  const auto weight_check = sparsemoe_test::check_gradient(loss, router.weight(), grads.weight);
  EXPECT_LT(weight_check.worst_relative_error, 1e-6) << "weight: " << weight_check;
  EXPECT_GT(weight_check.max_abs_analytic, 1e-3);
  if (router.bias().size() > 0) {
    const auto bias_check = sparsemoe_test::check_gradient(loss, router.bias(), grads.bias);
    EXPECT_LT(bias_check.worst_relative_error, 1e-6) << "bias: " << bias_check;
  }
  const auto input_check = sparsemoe_test::check_gradient(loss, input, dx);
  EXPECT_LT(input_check.worst_relative_error, 1e-6) << "input: " << input_check;
  extra(loss);
  EXPECT_EQ(flips, 0) << "a perturbation changed the selection: pick data farther from ties";
}

/// Route and backward of a T×d input (seed 12; upstream gates from seed 13,
/// scores from seed 14, plus the z-loss and, when given, the balance loss at
/// weight 0.01) at 1, 2 and 3 threads: every field of the routing, the
/// parameter gradients and ∂x must be bitwise equal to the first run.
template <typename Router>
void expect_router_deterministic(const Router &router, const sparsemoe::RouteOptions &route, Index tokens,
                                 const std::optional<sparsemoe::BalanceLossOptions> &balance = std::nullopt) {
  using Scalar = typename Router::Scalar;
  using Mat = sparsemoe::Matrix<Scalar>;
  using router_reference::same;
  const auto input = reference::uniform<Scalar>(tokens, router.input_dim(), 12);
  const auto a = reference::uniform<Scalar>(tokens, router.k(), 13);
  const auto b = reference::uniform<Scalar>(tokens, router.num_experts(), 14);
  sparsemoe::TopKRouting<Scalar> first;
  typename Router::Gradients first_grads;
  Mat first_dx;
  bool have_first = false;
  for (const int threads : router_reference::thread_counts()) {
    SCOPED_TRACE(std::to_string(threads) + " thread(s)");
    router_reference::ScopedThreads scoped(threads);
    sparsemoe::TopKRouting<Scalar> r;
    router.route(input, route, r);
    sparsemoe::TopKRoutingGradient<Scalar> up;
    up.set_zero(r);
    up.gates = a;
    up.scores = b;
    sparsemoe::z_loss_backward(r, Scalar(0.01), up);
    if (balance) sparsemoe::balance_loss_backward(r, 0.01, *balance, up);
    auto grads = router.make_gradients();
    Mat dx = Mat::Zero(tokens, router.input_dim());
    router.backward(r, input, up, grads, dx);
    if (!have_first) {
      first = r;
      first_grads = grads;
      first_dx = dx;
      have_first = true;
      continue;
    }
    EXPECT_TRUE(same(r.expert_ids, first.expert_ids));
    EXPECT_TRUE(same(r.gates, first.gates));
    EXPECT_TRUE(same(r.logits, first.logits));
    EXPECT_TRUE(same(r.scores, first.scores));
    EXPECT_TRUE(same(r.group_scores, first.group_scores));
    EXPECT_TRUE(same(r.selected_groups, first.selected_groups));
    EXPECT_TRUE(same(r.input_jitter, first.input_jitter));
    EXPECT_TRUE(same(grads.weight, first_grads.weight));
    EXPECT_TRUE(same(grads.bias, first_grads.bias));
    EXPECT_TRUE(same(dx, first_dx));
  }
}

}  // namespace router_checks

#endif  // SPARSEMOE_TESTS_ROUTER_CHECKS_HPP
