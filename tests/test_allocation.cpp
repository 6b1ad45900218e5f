// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Steady state allocates nothing: a forward pass of the same shape into the same ForwardResult
// and ForwardWorkspace must not allocate. Two independent counters: this binary replaces the
// global operator new/delete with counting versions, and Eigen's own heap allocations (which go
// through std::malloc, not operator new) are counted through EIGEN_RUNTIME_NO_MALLOC, whose check
// reports through eigen_assert, redefined here to count instead of abort (it is active even in
// NDEBUG builds).

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace {
std::atomic<long> eigen_heap_allocations{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                                                     \
  do {                                                                              \
    if (!(condition)) eigen_heap_allocations.fetch_add(1, std::memory_order_relaxed); \
  } while (false)

#include <sparsemoe/expert_choice.hpp>
#include <sparsemoe/hash_layer.hpp>
#include <sparsemoe/sparsemoe.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace {
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* pointer = std::malloc(size == 0 ? 1 : size)) return pointer;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* pointer) noexcept { std::free(pointer); }
void operator delete[](void* pointer) noexcept { std::free(pointer); }
void operator delete(void* pointer, std::size_t) noexcept { std::free(pointer); }
void operator delete[](void* pointer, std::size_t) noexcept { std::free(pointer); }

namespace {

// d = 24, h = 40, E = 6, k = 2.
sparsemoe::MoEConfig small_config() {
  sparsemoe::MoEConfig config;
  config.input_dim = 24;
  config.hidden_dim = 40;
  config.num_experts = 6;
  config.k = 2;
  return config;
}

/// Calls `run()` once with both counters watching (Eigen's malloc check on) and expects neither
/// an operator new call nor an Eigen heap allocation in it; `what` names the call.
template <typename Run>
void expect_allocation_free(const Run& run, const char* what) {
  const long before = allocations.load();
  const long eigen_before = eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  run();
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0) << "operator new calls in " << what;
  EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 0) << "Eigen heap allocations in " << what;
}

// tokens = 300 gives each of the 6 experts about 100 rows; tokens = 1200 about 400, past
// MoELayer::pack_rows_threshold, so that the forward also packs weights into its workspace.
//
// With `capacity`, the forward drops slots by capacity too; the factors used below make every
// expert overflow, so the number of rows (E·C) stays the same from call to call.
template <typename Scalar, typename ExpertT>
void expect_no_allocation(sparsemoe::Mode mode, bool packed = false, sparsemoe::Index tokens = 300,
                          std::optional<sparsemoe::CapacityOptions> capacity = std::nullopt) {
  sparsemoe::MoELayer<Scalar, ExpertT> layer(small_config());
  layer.gate().initialize_uniform(3);
  const sparsemoe::Matrix<Scalar> input = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  sparsemoe::ForwardOptions options;
  options.mode = mode;
  options.capacity = capacity;
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  const sparsemoe::PackedExperts<Scalar> packed_experts =
      packed ? layer.pack_experts() : sparsemoe::PackedExperts<Scalar>{};
  const auto run = [&] {
    if (packed) {
      layer.forward(input, options, result, workspace, packed_experts);
    } else {
      layer.forward(input, options, result, workspace);
    }
  };
  run();
  const sparsemoe::Index row_count = result.plan.num_rows();
  if (capacity) {
    EXPECT_GT(result.stats().capacity_dropped_slots, 0) << "the capacity must drop slots";
  }
  const Scalar* output = result.output.data();
  const Scalar* grouped = workspace.grouped_input.data();
  const Scalar* logits = result.routing.noisy_logits.data();
  const auto* rows = result.plan.token_of_row.data();

  options.step = 1;
  expect_allocation_free(run, "a steady-state forward");
  EXPECT_EQ(result.output.data(), output);
  EXPECT_EQ(workspace.grouped_input.data(), grouped);
  EXPECT_EQ(result.routing.noisy_logits.data(), logits);
  EXPECT_EQ(result.plan.token_of_row.data(), rows);
  EXPECT_EQ(result.output.rows(), tokens);
  EXPECT_EQ(result.plan.num_rows(), row_count);
  EXPECT_TRUE(result.output.allFinite());
}

// A training step (forward, backward into reused gradients, d_input and BackwardWorkspace, an
// Adam update): the second step (new input, new noise) must not allocate.
template <typename Scalar, typename ExpertT>
void expect_no_backward_allocation(sparsemoe::Index tokens,
                                   std::optional<sparsemoe::CapacityOptions> capacity = std::nullopt) {
  sparsemoe::MoELayer<Scalar, ExpertT> layer(small_config());
  layer.gate().initialize_uniform(5);
  sparsemoe::Matrix<Scalar> input = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  const sparsemoe::Matrix<Scalar> d_output = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  options.capacity = capacity;
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  sparsemoe::BackwardWorkspace<Scalar> backward_workspace;
  auto gradients = layer.make_gradients();
  sparsemoe::Matrix<Scalar> d_input;
  sparsemoe::Adam<Scalar> adam;
  // Views stay valid while the layer and the gradients live and keep their shapes: made once.
  const auto parameters = layer.tensors();
  const auto gradient_tensors = gradients.tensors();
  const auto step = [&](std::uint64_t index) {
    options.step = index;
    layer.forward(input, options, result, workspace);
    gradients.set_zero();
    layer.backward(result, d_output, gradients, d_input, backward_workspace);
    adam.step(parameters, gradient_tensors);
  };
  step(0);
  const sparsemoe::Index rows = result.plan.num_rows();
  if (capacity) {
    EXPECT_GT(result.stats().capacity_dropped_slots, 0) << "the capacity must drop slots";
  }
  const Scalar* d_input_data = d_input.data();
  input = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  const long before = allocations.load();
  const long eigen_before = eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  step(1);
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0) << "operator new calls in a steady-state training step";
  EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 0) << "Eigen heap allocations in a steady-state training step";
  EXPECT_EQ(d_input.data(), d_input_data);
  EXPECT_EQ(d_input.rows(), tokens);
  EXPECT_EQ(result.plan.num_rows(), rows);
  EXPECT_TRUE(d_input.allFinite());
}

// ExpertChoiceLayer and HashMoELayer: a training step (forward into a reused result, backward
// into reused gradients, d_input and workspace, an Adam update) on a new input of the same shape
// must not allocate. `forward(input, result, workspace)` runs the layer's training forward.
template <typename Layer, typename Forward>
void expect_planned_step_allocates_nothing(Layer& layer, sparsemoe::Index tokens, const Forward& forward) {
  using Scalar = typename Layer::Scalar;
  sparsemoe::Matrix<Scalar> input = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  const sparsemoe::Matrix<Scalar> d_output = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  typename Layer::Result result;
  typename Layer::Workspace workspace;
  auto gradients = layer.make_gradients();
  sparsemoe::Matrix<Scalar> d_input;
  sparsemoe::Adam<Scalar> adam;
  const auto parameters = layer.tensors();
  const auto gradient_tensors = gradients.tensors();
  const auto step = [&] {
    forward(input, result, workspace);
    gradients.set_zero();
    layer.backward(result, d_output, gradients, d_input, workspace);
    adam.step(parameters, gradient_tensors);
  };
  step();
  const sparsemoe::Index rows = result.plan.num_rows();
  const Scalar* d_input_data = d_input.data();
  input = sparsemoe::Matrix<Scalar>::Random(tokens, 24);
  const long before = allocations.load();
  const long eigen_before = eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  step();
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0) << "operator new calls in a steady-state training step";
  EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 0) << "Eigen heap allocations in a steady-state training step";
  EXPECT_EQ(d_input.data(), d_input_data);
  EXPECT_EQ(result.plan.num_rows(), rows);
  EXPECT_TRUE(d_input.allFinite());
}

sparsemoe::CapacityOptions capacity(double factor, sparsemoe::DropPolicy policy) {
  sparsemoe::CapacityOptions options;
  options.factor = factor;
  options.policy = policy;
  return options;
}

}  // namespace

TEST(Allocation, SteadyStateEvaluationForwardAllocatesNothing) {
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::evaluation);
  expect_no_allocation<double, sparsemoe::Expert<double, sparsemoe::Silu>>(sparsemoe::Mode::evaluation);
}

TEST(Allocation, SteadyStatePackedForwardAllocatesNothing) {
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::evaluation, true);
  expect_no_allocation<double, sparsemoe::SwiGluExpert<double>>(sparsemoe::Mode::evaluation, true);
}

// The bf16 serving forward: the layer's (MoELayer::bf16_experts(), 300 tokens: row tiles), and
// the expert stage alone (Bf16Experts::forward) with all rows on one expert (the column split).
template <typename ExpertT>
void expect_no_bf16_allocation() {
  sparsemoe::MoELayer<float, ExpertT> layer(small_config());
  layer.gate().initialize_uniform(3);
  // Seeded, not Matrix::Random: std::rand's sequence, which the other tests' inputs come from,
  // stays as it was without this test.
  sparsemoe::Matrix<float> input(300, 24);
  sparsemoe::detail::fill_uniform(input.data(), input.size(), 1.0f, 31, 0);
  const auto experts = layer.bf16_experts();
  const sparsemoe::ForwardOptions options;
  sparsemoe::ForwardResult<float> result;
  sparsemoe::ForwardWorkspace<float> workspace;
  sparsemoe::IndexVector one_expert = sparsemoe::IndexVector::Zero(layer.num_experts() + 1);
  one_expert.tail(layer.num_experts() - 1).setConstant(40);
  sparsemoe::Matrix<float> stage_output;
  sparsemoe::Bf16ExpertsWorkspace stage_workspace;
  const auto run = [&] {
    layer.forward(input, options, result, workspace, experts);
    experts.forward(one_expert, input.topRows(40), stage_output, stage_workspace);
  };
  run();
  expect_allocation_free(run, "a steady-state bf16 forward");
  EXPECT_TRUE(result.output.allFinite());
  EXPECT_TRUE(stage_output.allFinite());
}

TEST(Allocation, SteadyStateBf16ForwardAllocatesNothing) {
  expect_no_bf16_allocation<sparsemoe::Expert<float, sparsemoe::Relu>>();
  expect_no_bf16_allocation<sparsemoe::SwiGluExpert<float>>();
}

TEST(Allocation, SteadyStateTrainingForwardAllocatesNothing) {
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::training);
  expect_no_allocation<float, sparsemoe::SwiGluExpert<float>>(sparsemoe::Mode::training);
}

TEST(Allocation, SteadyStateForwardThatPacksIntoItsWorkspaceAllocatesNothing) {
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::training, false, 1200);
  expect_no_allocation<double, sparsemoe::SwiGluExpert<double>>(sparsemoe::Mode::evaluation, false, 1200);
}

TEST(Allocation, SteadyStateTrainingStepAllocatesNothing) {
  expect_no_backward_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(300);
  expect_no_backward_allocation<double, sparsemoe::SwiGluExpert<double>>(300);
  expect_no_backward_allocation<float, sparsemoe::Expert<float, sparsemoe::GeluTanh>>(1200);
}

TEST(Allocation, SteadyStateForwardWithCapacityAllocatesNothing) {
  using sparsemoe::DropPolicy;
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::evaluation, false, 300,
                                                                        capacity(0.3, DropPolicy::by_position));
  expect_no_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(sparsemoe::Mode::training, false, 300,
                                                                        capacity(0.3, DropPolicy::by_probability));
  expect_no_allocation<double, sparsemoe::SwiGluExpert<double>>(sparsemoe::Mode::evaluation, true, 300,
                                                               capacity(0.3, DropPolicy::by_slot_then_position));
}

TEST(Allocation, SteadyStateTrainingStepWithCapacityAllocatesNothing) {
  using sparsemoe::DropPolicy;
  expect_no_backward_allocation<float, sparsemoe::Expert<float, sparsemoe::Relu>>(
      300, capacity(0.3, DropPolicy::by_probability));
  expect_no_backward_allocation<double, sparsemoe::SwiGluExpert<double>>(300, capacity(0.3, DropPolicy::by_position));
}

TEST(Allocation, SteadyStateExpertChoiceAndHashStepsAllocateNothing) {
  sparsemoe::ExpertChoiceConfig choice;
  choice.input_dim = 24;
  choice.hidden_dim = 40;
  choice.num_experts = 6;
  sparsemoe::ExpertChoiceLayer<float> expert_choice(choice);
  sparsemoe::PlannedForwardOptions training;
  training.mode = sparsemoe::Mode::training;
  expect_planned_step_allocates_nothing(expert_choice, 300, [&](const auto& x, auto& result, auto& workspace) {
    expert_choice.forward(x, training, result, workspace);
  });
  sparsemoe::HashMoEConfig hash;
  hash.input_dim = 24;
  hash.hidden_dim = 40;
  hash.num_experts = 6;
  hash.router.k = 2;
  sparsemoe::HashMoELayer<double, sparsemoe::SwiGluExpert<double>> hashed(hash);
  sparsemoe::IndexVector ids(300);
  for (sparsemoe::Index t = 0; t < ids.size(); ++t) ids[t] = t * 13;
  expect_planned_step_allocates_nothing(hashed, 300, [&](const auto& x, auto& result, auto& workspace) {
    hashed.forward(x, ids, training, result, workspace);
  });
}

TEST(Allocation, CountersSeeAllocations) {
  // The probe escapes through a volatile pointer, so the compiler may not elide the allocation.
  static std::vector<int>* volatile probe = nullptr;
  const long before = allocations.load();
  probe = new std::vector<int>(100);
  delete probe;
  EXPECT_GE(allocations.load() - before, 1);
  const long eigen_before = eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  Eigen::VectorXd vector(1000);
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 1);
  EXPECT_EQ(vector.size(), 1000);
}

// The Soft MoE and hierarchical MoE layers: a training step (forward into a reused result and
// workspace, backward into reused gradients, workspace and d_input) and an evaluation forward
// allocate nothing the second time.
template <typename Layer, typename Options, typename Step>
void expect_paradigm_step_allocates_nothing(const Layer& layer, const Options& options, const Step& step,
                                            const char* what) {
  const sparsemoe::Matrix<float> input = sparsemoe::Matrix<float>::Random(300, layer.input_dim());
  const sparsemoe::Matrix<float> d_output = sparsemoe::Matrix<float>::Random(300, layer.input_dim());
  typename Layer::Result result;
  typename Layer::ForwardWorkspace workspace;
  typename Layer::BackwardWorkspace backward_workspace;
  auto gradients = layer.make_gradients();
  sparsemoe::Matrix<float> d_input(300, layer.input_dim());
  for (const bool backward : {false, true}) {
    const auto run = [&] {
      step(layer, input, options, backward, result, workspace);
      if (!backward) return;
      gradients.set_zero();
      layer.backward(result, d_output, gradients, backward_workspace, d_input);
    };
    run();
    const long before = allocations.load();
    const long eigen_before = eigen_heap_allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    run();
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_EQ(allocations.load() - before, 0) << what << (backward ? ": training step" : ": evaluation forward");
    EXPECT_EQ(eigen_heap_allocations.load() - eigen_before, 0)
        << what << (backward ? ": training step" : ": evaluation forward");
    EXPECT_TRUE(result.output.allFinite());
  }
}

TEST(Allocation, SoftMoEAndHierarchicalMoEStepsAllocateNothing) {
  sparsemoe::SoftMoEConfig soft;
  soft.input_dim = 24;
  soft.hidden_dim = 40;
  soft.num_experts = 4;
  soft.slots_per_expert = 150;  // S = 600 slots: rows past the bank's packing threshold
  soft.normalize = true;
  const auto soft_step = [](const auto& layer, const auto& input, sparsemoe::Mode, bool backward, auto& result,
                            auto& workspace) {
    layer.forward(input, backward ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation, result, workspace);
  };
  expect_paradigm_step_allocates_nothing(sparsemoe::SoftMoELayer<float>(soft), sparsemoe::Mode::training, soft_step,
                                         "Soft MoE");

  sparsemoe::HierarchicalMoEConfig hierarchical;
  hierarchical.input_dim = 24;
  hierarchical.hidden_dim = 40;
  hierarchical.num_experts = 6;
  hierarchical.num_groups = 3;
  hierarchical.k_groups = 2;
  hierarchical.k_per_group = 1;
  sparsemoe::HierarchicalMoELayer<float> layer(hierarchical);
  layer.primary_gate().initialize_uniform(1);
  for (sparsemoe::Index i = 0; i < 3; ++i) layer.secondary_gate(i).initialize_uniform(2 + static_cast<std::uint64_t>(i));
  const auto hierarchical_step = [](const auto& layer, const auto& input, sparsemoe::HierarchicalForwardOptions options,
                                    bool backward, auto& result, auto& workspace) {
    options.mode = backward ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
    layer.forward(input, options, result, workspace);
  };
  expect_paradigm_step_allocates_nothing(layer, sparsemoe::HierarchicalForwardOptions{}, hierarchical_step,
                                         "hierarchical MoE");
}

// One token, k = 1: every expert work unit has exactly one row (m = 1 products: x·W1, h·W2,
// and in backward dy·W2ᵀ, dh·W1ᵀ; the gate's x·W_g too). An evaluation forward (plain and with
// packed experts), an evaluation forward that keeps its cache, and a training step (forward,
// backward into reused gradients, d_input and BackwardWorkspace) allocate nothing the second time.
template <typename Layer>
void expect_one_token_steps_allocate_nothing(const Layer& layer, const char* what) {
  using Scalar = typename Layer::Scalar;
  sparsemoe::Matrix<Scalar> input(1, layer.input_dim());
  sparsemoe::detail::fill_uniform(input.data(), input.size(), Scalar(1), 41, 0);
  sparsemoe::Matrix<Scalar> d_output(1, layer.input_dim());
  sparsemoe::detail::fill_uniform(d_output.data(), d_output.size(), Scalar(1), 43, 0);
  typename Layer::Result result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  typename Layer::BackwardWorkspaceType backward_workspace;
  auto gradients = layer.make_gradients();
  sparsemoe::Matrix<Scalar> d_input;
  const sparsemoe::PackedExperts<Scalar> packed = layer.pack_experts();
  const std::string name(what);

  sparsemoe::ForwardOptions evaluation;
  const auto forward = [&] { layer.forward(input, evaluation, result, workspace); };
  forward();
  expect_allocation_free(forward, (name + ": one-token evaluation forward").c_str());
  EXPECT_EQ(result.plan.num_rows(), 1);
  EXPECT_TRUE(result.output.allFinite());

  const auto packed_forward = [&] { layer.forward(input, evaluation, result, workspace, packed); };
  packed_forward();
  expect_allocation_free(packed_forward, (name + ": one-token packed evaluation forward").c_str());
  EXPECT_TRUE(result.output.allFinite());

  for (const bool training : {false, true}) {
    sparsemoe::ForwardOptions options;
    options.mode = training ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
    options.keep_cache = !training;
    std::uint64_t step_index = 0;
    const auto step = [&] {
      options.step = step_index++;
      layer.forward(input, options, result, workspace);
      gradients.set_zero();
      layer.backward(result, d_output, gradients, d_input, backward_workspace);
    };
    // Warm-up: training noise moves the token between experts, and backward packs W1ᵀ and W2ᵀ of
    // an expert into the workspace the first time the expert has rows; so warm up until every
    // expert has had the token (or 64 steps, for routing without noise).
    std::vector<bool> seen(static_cast<std::size_t>(layer.num_experts()), false);
    for (int warm_up = 0; warm_up < 64; ++warm_up) {
      step();
      for (sparsemoe::Index e = 0; e < layer.num_experts(); ++e) {
        if (result.plan.tokens_per_expert[e] > 0) seen[static_cast<std::size_t>(e)] = true;
      }
      if (std::find(seen.begin(), seen.end(), false) == seen.end()) break;
    }
    expect_allocation_free(step, (name + (training ? ": one-token training step"
                                                   : ": one-token evaluation forward with a kept cache and backward"))
                                     .c_str());
    EXPECT_EQ(result.plan.num_rows(), 1);
    EXPECT_EQ(d_input.rows(), 1);
    EXPECT_TRUE(d_input.allFinite());
  }
}

sparsemoe::MoEConfig one_token_config() {
  sparsemoe::MoEConfig config = small_config();
  config.k = 1;
  return config;
}

TEST(Allocation, OneTokenStepsWithTheDefaultGateAllocateNothing) {
  sparsemoe::MoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>> single(one_token_config());
  single.gate().initialize_uniform(7);
  expect_one_token_steps_allocate_nothing(single, "float, default gate");
  sparsemoe::MoELayer<double, sparsemoe::SwiGluExpert<double>> swiglu(one_token_config());
  swiglu.gate().initialize_uniform(8);
  expect_one_token_steps_allocate_nothing(swiglu, "double SwiGLU, default gate");
}

template <typename Scalar, typename ExpertT>
void expect_one_token_router_steps_allocate_nothing(const char* what) {
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = 1;
  sparsemoe::SoftmaxTopKRouter<Scalar> router(24, 6, router_options);
  router.initialize_uniform(9);
  const sparsemoe::MoELayer<Scalar, ExpertT, sparsemoe::SoftmaxTopKRouter<Scalar>> layer(one_token_config(), router);
  expect_one_token_steps_allocate_nothing(layer, what);
}

TEST(Allocation, OneTokenStepsWithATopKRouterAllocateNothing) {
  expect_one_token_router_steps_allocate_nothing<float, sparsemoe::Expert<float, sparsemoe::Silu>>(
      "float, softmax top-k router");
  expect_one_token_router_steps_allocate_nothing<double, sparsemoe::Expert<double, sparsemoe::Relu>>(
      "double, softmax top-k router");
}
