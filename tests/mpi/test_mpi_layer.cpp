// SPDX-License-Identifier: MIT
// DistributedMoELayer under mpirun -np 1..4 against the single-process MoELayer on the
// concatenated batch (rank 0's tokens, then rank 1's, …), which every rank builds and runs in
// full from the same seed.
//
// Outputs, ∂L/∂x and the gradients of the rank's experts are bitwise equal (each expert receives
// its rows in the order one process groups them) when every rank's token count is a multiple of
// the router's 64-row tile. Otherwise a rank's last router tile is shorter than the concatenated
// batch's tile over the same tokens, and GEMM kernels may round a tile of another height
// differently in the last bits (libxsmm picks another JIT kernel; Eigen's remainder paths differ
// between compilers), for the logits in forward and the router's ∂x in backward; then they agree
// within `tolerance`. The losses and the router's gradient are sums over ranks, equal up to the
// order of the additions.

#include <sparsemoe/distributed.hpp>
#include <sparsemoe/moe_layer.hpp>
#include <sparsemoe/optimizers.hpp>
#include <sparsemoe/router/sigmoid_top_k.hpp>
#include <sparsemoe/router/switch.hpp>

#include "mpi_test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe_test::world_rank;
using sparsemoe_test::world_size;

/// max |a − b| ≤ tolerance·max(1e-30, max |b|): agreement relative to the tensor's scale.
template <typename A, typename B>
::testing::AssertionResult near_scaled(const A& a, const B& b, double tolerance) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return ::testing::AssertionFailure() << "shapes differ";
  if (a.size() == 0) return ::testing::AssertionSuccess();
  const double scale = std::max(1e-30, static_cast<double>(b.cwiseAbs().maxCoeff()));
  const double error = static_cast<double>((a - b).cwiseAbs().maxCoeff());
  if (error <= tolerance * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << error << " > " << tolerance << " x " << scale;
}

template <typename A, typename B>
::testing::AssertionResult bitwise(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) {
    return ::testing::AssertionFailure() << "shapes " << a.rows() << "x" << a.cols() << " and " << b.rows() << "x"
                                         << b.cols();
  }
  if (a == b) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "not bitwise equal, max difference "
                                       << (a - b).cwiseAbs().maxCoeff();
}

struct Case {
  Index d = 12, h = 20, experts = 8, k = 2;
  Index max_tokens = 40;  ///< per rank
  Index multiple = 1;     ///< every rank's token count is a multiple of this
  int empty_rank = -1;
  bool normalize = false;
  bool bias = false;
  /// Added to the router bias of experts [favoured_first, favoured_last) (with `bias`).
  Index favoured_first = 0, favoured_last = 0;
  double favour = 0;
  sparsemoe::BalanceLossOptions balance;
  double z_weight = 0.001;
  std::optional<sparsemoe::CapacityOptions> capacity;
  Index shared_hidden = 0;  ///< a shared expert of this hidden width (0: none)
  bool shared_gate = false;
  double jitter = 0;  ///< SwitchRouter's input jitter ε
  std::uint64_t seed = 1;

  /// A router bias of `amount` on experts [first, last).
  Case& favour_experts(Index first, Index last, double amount) {
    bias = true;
    favoured_first = first;
    favoured_last = last;
    favour = amount;
    return *this;
  }
  /// A shared expert of hidden width `hidden`, gated or not.
  Case& with_shared_expert(Index hidden, bool gate) {
    shared_hidden = hidden;
    shared_gate = gate;
    return *this;
  }
};

template <typename Scalar>
double tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-12;
}

/// Whether everything per token must be bitwise one process's (see the top of the file).
bool exact_split(Index multiple) { return multiple % sparsemoe::detail::row_tile == 0; }

template <typename A, typename B>
::testing::AssertionResult equal(const A& a, const B& b, bool exact, double tolerance) {
  return exact ? bitwise(a, b) : near_scaled(a, b, tolerance);
}

template <typename Scalar, typename ExpertT = sparsemoe::Expert<Scalar, sparsemoe::Relu>,
          typename Router = sparsemoe::SoftmaxTopKRouter<Scalar>>
void check_against_one_process(const Case& c) {
  const int rank = world_rank();
  const sparsemoe_test::Split split =
      sparsemoe_test::uneven_split(world_size(), c.max_tokens, c.seed, c.empty_rank, c.multiple);
  // The shared expert runs in 128-row tiles of each rank's tokens.
  const bool exact = exact_split(c.multiple) && (c.shared_hidden == 0 || c.multiple % 128 == 0);
  const double tol = tolerance<Scalar>();
  sparsemoe::MoEConfig config;
  config.input_dim = c.d;
  config.hidden_dim = c.h;
  config.num_experts = c.experts;
  config.k = c.k;
  config.seed = c.seed + 7;
  config.shared_hidden_dim = c.shared_hidden;
  config.shared_expert_gate = c.shared_gate;
  typename Router::Options options;
  if constexpr (std::is_same<Router, sparsemoe::SwitchRouter<Scalar>>::value) {  // Switch: k = 1, no renormalisation
    options.jitter_epsilon = c.jitter;
    options.seed = c.seed + 17;
  } else if constexpr (std::is_same<Router, sparsemoe::GShardRouter<Scalar>>::value) {  // k = 2, random second expert
    options.seed = c.seed + 17;
  } else {
    options.k = c.k;
    options.normalize_top_k = c.normalize;
  }
  options.use_bias = c.bias;
  Router router(c.d, c.experts, options);
  router.initialize_uniform(c.seed + 3);
  router.weight() *= Scalar(4);
  if (c.bias) {
    for (Index e = c.favoured_first; e < c.favoured_last; ++e) router.bias()[e] += static_cast<Scalar>(c.favour);
  }
  for (sparsemoe::TensorView<Scalar>& state : router.state()) {  // e.g. a sigmoid router's selection bias
    const Matrix<Scalar> values = sparsemoe_test::random_matrix<Scalar>(state.rows, state.cols, c.seed + 5);
    std::copy(values.data(), values.data() + values.size(), state.data);
  }

  const Matrix<Scalar> input = sparsemoe_test::random_matrix<Scalar>(split.total, c.d, c.seed + 11);
  const Matrix<Scalar> d_output = sparsemoe_test::random_matrix<Scalar>(split.total, c.d, c.seed + 13);
  sparsemoe::ForwardOptions forward_options;
  forward_options.mode = sparsemoe::Mode::training;
  forward_options.balance_loss = c.balance;
  forward_options.z_loss_weight = c.z_weight;
  forward_options.capacity = c.capacity;

  // One process, the concatenated batch.
  const sparsemoe::MoELayer<Scalar, ExpertT, Router> reference(config, router);
  const auto expected = reference.forward(input, forward_options);
  auto expected_gradients = reference.make_gradients();
  const Matrix<Scalar> expected_d_input = reference.backward(expected, d_output, expected_gradients);

  // P ranks.
  const sparsemoe::DistributedMoELayer<Scalar, ExpertT, Router> layer(config, router, MPI_COMM_WORLD);
  const Index first = split.my_first(), mine = split.mine();
  const auto result = layer.forward(input.middleRows(first, mine), forward_options);
  auto gradients = layer.make_gradients();
  const Matrix<Scalar> d_input = layer.backward(result, d_output.middleRows(first, mine), gradients);

  EXPECT_TRUE(result.routing.expert_ids == expected.routing.expert_ids.middleRows(first, mine)) << "rank " << rank;
  // The same capacity and the same drops as one process.
  EXPECT_EQ(result.plan.stats.capacity, expected.plan.stats.capacity);
  const auto slots = static_cast<std::ptrdiff_t>(c.k);
  EXPECT_TRUE(std::equal(result.plan.capacity_dropped.begin(), result.plan.capacity_dropped.end(),
                         expected.plan.capacity_dropped.begin() + first * slots,
                         expected.plan.capacity_dropped.begin() + (first + mine) * slots))
      << "capacity drops, rank " << rank;
  if (c.capacity && split.total >= 16) {
    EXPECT_GT(expected.plan.stats.capacity_dropped_slots, 0) << "the case should drop slots";
  }
  EXPECT_TRUE(equal(result.routing.logits, expected.routing.logits.middleRows(first, mine), exact, tol));
  EXPECT_TRUE(equal(result.output, expected.output.middleRows(first, mine), exact, tol)) << "output, rank " << rank;
  EXPECT_TRUE(equal(d_input, expected_d_input.middleRows(first, mine), exact, tol)) << "d_input, rank " << rank;
  EXPECT_NEAR(static_cast<double>(result.losses.balance), static_cast<double>(expected.losses.balance),
              tol * std::abs(static_cast<double>(expected.losses.balance)));
  EXPECT_NEAR(static_cast<double>(result.losses.z), static_cast<double>(expected.losses.z),
              tol * std::abs(static_cast<double>(expected.losses.z)));
  EXPECT_TRUE(near_scaled(gradients.weight, expected_gradients.weight, tol)) << "router weight, rank " << rank;
  if (c.bias) {
    EXPECT_TRUE(near_scaled(gradients.bias, expected_gradients.bias, tol)) << "router bias, rank " << rank;
  }
  EXPECT_EQ(static_cast<Index>(gradients.experts.size()), layer.num_local_experts());
  for (Index local = 0; local < layer.num_local_experts(); ++local) {
    const Index e = layer.first_local_expert() + local;
    const ExpertT& got = gradients.experts[static_cast<std::size_t>(local)];
    const ExpertT& want = expected_gradients.experts[static_cast<std::size_t>(e)];
    EXPECT_TRUE(equal(got.w1(), want.w1(), exact, tol)) << "expert " << e << " w1";
    EXPECT_TRUE(equal(got.w2(), want.w2(), exact, tol)) << "expert " << e << " w2";
    EXPECT_TRUE(equal(got.b1(), want.b1(), exact, tol)) << "expert " << e << " b1";
    EXPECT_TRUE(equal(got.b2(), want.b2(), exact, tol)) << "expert " << e << " b2";
    EXPECT_EQ(result.rows_of_local_expert(local), expected.plan.tokens_per_expert[e]) << "expert " << e;
    EXPECT_TRUE(bitwise(layer.expert(e).w1(), reference.expert(e).w1())) << "initial w1 of expert " << e;
  }
  // The replicated shared expert: its gradient is a sum over ranks.
  EXPECT_EQ(gradients.shared_experts.size(), expected_gradients.shared_experts.size());
  for (std::size_t i = 0; i < std::min(gradients.shared_experts.size(), expected_gradients.shared_experts.size()); ++i) {
    EXPECT_TRUE(near_scaled(gradients.shared_experts[i].w1(), expected_gradients.shared_experts[i].w1(), tol));
    EXPECT_TRUE(near_scaled(gradients.shared_experts[i].w2(), expected_gradients.shared_experts[i].w2(), tol));
    EXPECT_TRUE(near_scaled(gradients.shared_experts[i].b2(), expected_gradients.shared_experts[i].b2(), tol));
  }
  EXPECT_TRUE(near_scaled(gradients.shared_expert_gate, expected_gradients.shared_expert_gate, tol));
  // The loads over all ranks (what update_selection_bias takes) are one process's loads.
  const sparsemoe::IndexVector loads = layer.tokens_per_expert_over_ranks(result);
  EXPECT_TRUE(loads == expected.plan.tokens_per_expert) << "rank " << rank;
  // The router's gradient is the same bits on every rank (replicas stay replicas).
  const Matrix<Scalar> weight = gradients.weight;
  Matrix<Scalar> highest(weight.rows(), weight.cols()), lowest(weight.rows(), weight.cols());
  const MPI_Datatype type = std::is_same<Scalar, float>::value ? MPI_FLOAT : MPI_DOUBLE;
  MPI_Allreduce(weight.data(), highest.data(), static_cast<int>(weight.size()), type, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(weight.data(), lowest.data(), static_cast<int>(weight.size()), type, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_TRUE(highest == lowest) << "router gradient differs between ranks";
}

TEST(DistributedMoELayer, RandomRoutingFloat) { check_against_one_process<float>(Case{}); }

TEST(DistributedMoELayer, TileAlignedSplitIsBitwiseOnEveryBackend) {
  Case c;
  c.max_tokens = 128;
  c.multiple = sparsemoe::detail::row_tile;
  c.seed = 10;
  check_against_one_process<float>(c);
}

TEST(DistributedMoELayer, RandomRoutingDoubleUnevenSplit) {
  Case c;
  c.experts = 6;  // P = 4: 1, 2, 1, 2 experts
  c.k = 3;
  c.normalize = true;
  c.seed = 2;
  check_against_one_process<double>(c);
}

TEST(DistributedMoELayer, FewerExpertsThanRanks) {
  Case c;
  c.experts = 3;  // P = 4: a rank without experts
  c.seed = 3;
  check_against_one_process<float>(c);
}

TEST(DistributedMoELayer, RankWithoutTokens) {
  Case c;
  c.empty_rank = world_size() > 1 ? 1 : -1;
  c.seed = 4;
  check_against_one_process<double>(c);
}

TEST(DistributedMoELayer, SigmoidRouterWithSelectionBias) {
  Case c;
  c.normalize = true;
  c.seed = 11;
  check_against_one_process<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::SigmoidTopKRouter<float>>(c);
}

TEST(DistributedMoELayer, GlobalCapacityByPosition) {
  Case c;
  c.capacity = sparsemoe::CapacityOptions{};
  c.capacity->factor = 0.75;
  c.seed = 12;
  check_against_one_process<float>(c);
  c.multiple = sparsemoe::detail::row_tile;
  c.max_tokens = 128;
  check_against_one_process<double>(c);
}

TEST(DistributedMoELayer, GlobalCapacityBySlotThenPosition) {
  Case c;
  c.k = 3;
  c.capacity = sparsemoe::CapacityOptions{};
  c.capacity->factor = 0.6;
  c.capacity->policy = sparsemoe::DropPolicy::by_slot_then_position;
  c.capacity->min_capacity = 2;
  c.max_tokens = 60;
  c.seed = 13;
  check_against_one_process<double>(c);
}

// Switch (k = 1) without and with input jitter, GShard with its random second expert. The random
// parts are keyed by the global token row (the layer passes the exclusive prefix sum of the token
// counts as the offset): a training step on P ranks draws what one process draws for the
// concatenated batch. Uneven splits, where keying by the local row would differ on every rank
// but the first; the last case tile-aligned, so everything per token is bitwise.
TEST(DistributedMoELayer, SwitchAndGShardRoutersDrawWhatOneProcessDraws) {
  using Relu = sparsemoe::Expert<double, sparsemoe::Relu>;
  Case c;
  c.k = 1;
  c.seed = 14;
  check_against_one_process<double, Relu, sparsemoe::SwitchRouter<double>>(c);
  c.seed = 15;
  c.jitter = 0.5;
  check_against_one_process<double, Relu, sparsemoe::SwitchRouter<double>>(c);
  c.k = 2;
  c.seed = 16;
  check_against_one_process<double, Relu, sparsemoe::GShardRouter<double>>(c);
  c.seed = 18;
  c.multiple = 64;
  c.max_tokens = 192;
  check_against_one_process<float, sparsemoe::Expert<float, sparsemoe::Relu>, sparsemoe::GShardRouter<float>>(c);
}

TEST(DistributedMoELayer, GatedSharedExpert) {
  Case c = Case{}.with_shared_expert(24, true);
  c.seed = 15;
  check_against_one_process<float>(c);
  c.multiple = 128;  // the shared expert's tiles: bitwise
  c.max_tokens = 256;
  check_against_one_process<double>(c);
}

TEST(DistributedMoELayer, SharedExpertWithoutGateFewerExpertsThanRanks) {
  Case c = Case{}.with_shared_expert(16, false);
  c.experts = 3;
  c.seed = 16;
  check_against_one_process<float>(c);
}

TEST(DistributedMoELayer, AllTokensToRankZerosExpertsBothSlotsOnOneRank) {
  // P ≤ 4, E = 8: experts 0 and 1 are rank 0's, and every token picks both.
  Case c = Case{}.favour_experts(0, 2, 50);
  c.seed = 5;
  check_against_one_process<float>(c);
}

TEST(DistributedMoELayer, ExpertWithoutRows) {
  Case c = Case{}.favour_experts(3, 5, -50);  // experts 3 and 4 never chosen
  c.seed = 6;
  check_against_one_process<double>(c);
}

TEST(DistributedMoELayer, ManyRowsPerExpertPackedAndTiled) {
  Case c;
  c.experts = 4;
  c.max_tokens = 320;  // > 128-row tiles and > 256 rows per expert (packed weights)
  c.multiple = sparsemoe::detail::row_tile;
  c.seed = 7;
  check_against_one_process<float>(c);
}

TEST(DistributedMoELayer, SwiGluExpertsFirstSlotNormalizedScores) {
  Case c;
  c.balance.counts = sparsemoe::BalanceCounts::first_slot;
  c.balance.normalize_scores = true;
  c.seed = 8;
  check_against_one_process<float, sparsemoe::SwiGluExpert<float>>(c);
}

TEST(DistributedMoELayer, SequenceWiseBalanceLoss) {
  Case c;
  c.balance.sequence_length = 4;
  c.multiple = 4;
  c.seed = 9;
  check_against_one_process<double>(c);
}

/// The config {d, h, E, k} with `seed`, and a softmax top-k router for it initialised from
/// `router_seed` (the same on every rank).
template <typename Scalar>
std::pair<sparsemoe::MoEConfig, sparsemoe::SoftmaxTopKRouter<Scalar>> layer_setup(Index d, Index h, Index experts,
                                                                                   Index k, std::uint64_t seed,
                                                                                   std::uint64_t router_seed) {
  sparsemoe::MoEConfig config{d, h, experts, k};
  config.seed = seed;
  sparsemoe::SoftmaxTopKRouterOptions options;
  options.k = k;
  sparsemoe::SoftmaxTopKRouter<Scalar> router(d, experts, options);
  router.initialize_uniform(router_seed);
  return {config, router};
}

/// Output, ∂L/∂x and every gradient of this rank for `threads` OpenMP threads.
template <typename Scalar>
std::vector<Matrix<Scalar>> run_with_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  static_cast<void>(threads);
#endif
  using Router = sparsemoe::SoftmaxTopKRouter<Scalar>;
  const auto [config, router] = layer_setup<Scalar>(24, 40, 6, 2, 5, 9);
  const sparsemoe_test::Split split = sparsemoe_test::uneven_split(world_size(), 400, 31);
  const Matrix<Scalar> input = sparsemoe_test::random_matrix<Scalar>(split.total, 24, 32);
  const sparsemoe::DistributedMoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Relu>, Router> layer(
      config, router, MPI_COMM_WORLD);
  sparsemoe::ForwardOptions forward_options;
  forward_options.mode = sparsemoe::Mode::training;
  const auto result = layer.forward(input.middleRows(split.my_first(), split.mine()), forward_options);
  auto gradients = layer.make_gradients();
  const Matrix<Scalar> d_input = layer.backward(result, result.output, gradients);
  std::vector<Matrix<Scalar>> outputs{result.output, d_input};
  for (const auto& view : gradients.tensors()) {
    outputs.push_back(Eigen::Map<const Matrix<Scalar>>(view.data, view.rows, view.cols));
  }
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
  return outputs;
}

TEST(DistributedMoELayer, ThreadCountPerRankChangesNoBit) {
  const auto one = run_with_threads<float>(1);
  // Different thread counts on different ranks at once, too.
  const auto mixed = run_with_threads<float>(2 + world_rank() % 2);
  const auto three = run_with_threads<float>(3);
  ASSERT_EQ(one.size(), mixed.size());
  ASSERT_EQ(one.size(), three.size());
  for (std::size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(bitwise(mixed[i], one[i])) << "tensor " << i;
    EXPECT_TRUE(bitwise(three[i], one[i])) << "tensor " << i;
  }
}

TEST(DistributedMoELayer, TrainingStepsStayEqualToOneProcess) {
  // Three SGD steps: the replicated router stays replicated and both runs keep agreeing.
  using Router = sparsemoe::SoftmaxTopKRouter<double>;
  const auto [config, router] = layer_setup<double>(8, 16, 5, 2, 21, 22);
  const sparsemoe_test::Split split = sparsemoe_test::uneven_split(world_size(), 30, 23);
  sparsemoe::MoELayer<double, sparsemoe::Expert<double, sparsemoe::Relu>, Router> reference(config, router);
  sparsemoe::DistributedMoELayer<double, sparsemoe::Expert<double, sparsemoe::Relu>, Router> layer(config, router,
                                                                                                  MPI_COMM_WORLD);
  sparsemoe::SgdOptions sgd;
  sgd.learning_rate = 0.1;
  sparsemoe::Sgd<double> reference_optimizer(sgd), optimizer(sgd);
  sparsemoe::ForwardOptions forward_options;
  forward_options.mode = sparsemoe::Mode::training;
  for (int step = 0; step < 3; ++step) {
    const Matrix<double> input = sparsemoe_test::random_matrix<double>(split.total, 8, 100 + static_cast<std::uint64_t>(step));
    const auto expected = reference.forward(input, forward_options);
    auto expected_gradients = reference.make_gradients();
    reference.backward(expected, expected.output, expected_gradients);
    reference_optimizer.step(reference.tensors(), expected_gradients.tensors());
    const auto result = layer.forward(input.middleRows(split.my_first(), split.mine()), forward_options);
    auto gradients = layer.make_gradients();
    layer.backward(result, result.output, gradients);
    optimizer.step(layer.tensors(), gradients.tensors());
    EXPECT_TRUE(near_scaled(result.output, expected.output.middleRows(split.my_first(), split.mine()), 1e-10))
        << "step " << step;
  }
  EXPECT_TRUE(near_scaled(layer.router().weight(), reference.router().weight(), 1e-10));
  for (Index e = layer.first_local_expert(); e < layer.first_local_expert() + layer.num_local_experts(); ++e) {
    EXPECT_TRUE(near_scaled(layer.expert(e).w1(), reference.expert(e).w1(), 1e-10)) << "expert " << e;
  }
}

TEST(DistributedMoELayer, ABadInputOnOneRankThrowsOnEveryRank) {
  using Router = sparsemoe::SoftmaxTopKRouter<float>;
  sparsemoe::MoEConfig config{8, 16, 4, 2};
  Router router(8, 4, sparsemoe::SoftmaxTopKRouterOptions{});
  const sparsemoe::DistributedMoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>, Router> layer(config, router,
                                                                                                     MPI_COMM_WORLD);
  const bool bad = world_rank() == world_size() - 1;
  const Matrix<float> input = Matrix<float>::Ones(3, bad ? 7 : 8);
  EXPECT_THROW(layer.forward(input), std::invalid_argument);
  // The layer is still usable afterwards: no rank is left inside a collective.
  EXPECT_NO_THROW(layer.forward(Matrix<float>::Ones(3, 8)));
}

TEST(DistributedMoELayer, RejectsUnsupportedOrDifferentOptionsOnEveryRank) {
  const auto [config, router] = layer_setup<float>(8, 16, 4, 2, 1, 2);
  const sparsemoe::DistributedMoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>,
                                       sparsemoe::SoftmaxTopKRouter<float>>
      layer(config, router, MPI_COMM_WORLD);
  const Matrix<float> input = Matrix<float>::Ones(5, 8);
  sparsemoe::ForwardOptions options;
  options.capacity = sparsemoe::CapacityOptions{};
  options.capacity->policy = sparsemoe::DropPolicy::by_probability;
  EXPECT_THROW(layer.forward(input, options), std::invalid_argument);
  if (world_size() > 1) {
    options.capacity->policy = sparsemoe::DropPolicy::by_position;
    if (world_rank() == 0) options.capacity->factor = 2.0;
    EXPECT_THROW(layer.forward(input, options), std::invalid_argument);
  }
  EXPECT_NO_THROW(layer.forward(input));
}

TEST(DistributedMoELayer, RejectsDifferentRoutersOnDifferentRanks) {
  using Router = sparsemoe::SoftmaxTopKRouter<float>;
  sparsemoe::MoEConfig config{8, 16, 4, 2};
  Router router(8, 4, sparsemoe::SoftmaxTopKRouterOptions{});
  router.initialize_uniform(static_cast<std::uint64_t>(world_rank()));
  using Layer = sparsemoe::DistributedMoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>, Router>;
  if (world_size() > 1) {
    EXPECT_THROW(Layer(config, router, MPI_COMM_WORLD), std::invalid_argument);
  }
  config.shared_expert_gate = true;  // without a shared expert
  router.initialize_uniform(1);
  EXPECT_THROW(Layer(config, router, MPI_COMM_WORLD), std::invalid_argument);
}

}  // namespace
