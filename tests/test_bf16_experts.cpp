// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Bf16Experts: experts with bfloat16 weights, fp32 activations and accumulation.
//   * forward of ReLU and SwiGLU experts over 0, 1, 17 and 256 grouped rows (some experts with
//     none; row tiles) and 40 rows all on one expert (column tiles), widths that are not
//     multiples of the 32-column panels and hidden widths over one 256-column tile, against a naive double-precision loop over the bfloat16-rounded weights
//     written here: |y − y_ref| ≤ 1e-4·(1 + |y_ref|) (the documented tolerance);
//   * the AVX-512 kernel (when compiled in: the _native target) and the portable kernel give
//     the same bits; bitwise identical results for 1, 2 and 3 OpenMP threads;
//   * the weights are the round-to-nearest-even bfloat16 values of the fp32 weights;
//   * MoELayer's bf16 forward against the fp32 forward of a copy whose experts carry the rounded
//     weights (same routing, outputs within the tolerance), and against the unrounded layer
//     (within the bfloat16 rounding of the weights);
//   * bad input rejected with std::invalid_argument: input width, layouts, empty experts,
//     training mode, experts made by another layer.
#include <sparsemoe/sparsemoe.hpp>

#include "paradigm_reference.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <stdexcept>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::IndexVector;
using sparsemoe::Matrix;
using ReluExpert = sparsemoe::Expert<float, sparsemoe::Relu>;
using SwiGlu = sparsemoe::SwiGluExpert<float>;

using paradigm_reference::ThreadCount;

template <typename ExpertT>
sparsemoe::ExpertBank<float, ExpertT> random_bank(Index experts, Index d, Index h, std::uint64_t seed) {
  std::vector<ExpertT> list;
  for (Index e = 0; e < experts; ++e) {
    ExpertT expert(d, h);
    expert.initialize_uniform(seed + static_cast<std::uint64_t>(e));
    list.push_back(expert);
  }
  return sparsemoe::ExpertBank<float, ExpertT>(std::move(list));
}

Matrix<float> random_rows(Index rows, Index d, std::uint64_t seed) {
  Matrix<float> m(rows, d);
  sparsemoe::detail::fill_uniform(m.data(), m.size(), 1.0f, seed, 0);
  return m;
}

/// `rows` rows over `experts` experts: expert 1 gets none; the rest in a fixed uneven pattern.
IndexVector layout(Index experts, Index rows) {
  IndexVector offsets(experts + 1);
  offsets[0] = 0;
  Index left = rows;
  for (Index e = 0; e < experts; ++e) {
    Index count = 0;
    if (e == experts - 1) {
      count = left;
    } else if (e != 1) {
      count = std::min(left, (rows * (e + 2)) / (3 * experts) + (e == 0 ? 1 : 0));
    }
    offsets[e + 1] = offsets[e] + count;
    left -= count;
  }
  return offsets;
}

double silu(double a) { return a / (1.0 + std::exp(-a)); }

/// The naive reference, in double, on the bfloat16-rounded weights (rounded_expert()).
template <typename ExpertT>
Matrix<double> reference(const sparsemoe::Bf16Experts<ExpertT>& bf16, const IndexVector& offsets,
                         const Matrix<float>& input, bool gated) {
  const Index d = bf16.input_dim(), h = bf16.hidden_dim(), p = bf16.pre_activation_width();
  Matrix<double> output(input.rows(), d);
  for (Index e = 0; e < bf16.num_experts(); ++e) {
    const ExpertT expert = bf16.rounded_expert(e);
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<double> pre(static_cast<std::size_t>(p)), hidden(static_cast<std::size_t>(h));
      for (Index j = 0; j < p; ++j) {
        double sum = expert.b1().size() > 0 ? static_cast<double>(expert.b1()[j]) : 0.0;
        for (Index k = 0; k < d; ++k) sum += static_cast<double>(input(r, k)) * expert.w1()(k, j);
        pre[static_cast<std::size_t>(j)] = sum;
      }
      for (Index j = 0; j < h; ++j) {
        const double a = pre[static_cast<std::size_t>(j)];
        hidden[static_cast<std::size_t>(j)] = gated ? silu(a) * pre[static_cast<std::size_t>(h + j)] : std::max(a, 0.0);
      }
      for (Index c = 0; c < d; ++c) {
        double sum = expert.b2().size() > 0 ? static_cast<double>(expert.b2()[c]) : 0.0;
        for (Index j = 0; j < h; ++j) sum += hidden[static_cast<std::size_t>(j)] * expert.w2()(j, c);
        output(r, c) = sum;
      }
    }
  }
  return output;
}

template <typename Derived>
void expect_within_tolerance(const Matrix<float>& actual, const Eigen::MatrixBase<Derived>& expected) {
  ASSERT_EQ(actual.rows(), expected.rows());
  ASSERT_EQ(actual.cols(), expected.cols());
  for (Index r = 0; r < actual.rows(); ++r) {
    for (Index c = 0; c < actual.cols(); ++c) {
      const double ref = static_cast<double>(expected(r, c));
      ASSERT_LE(std::abs(static_cast<double>(actual(r, c)) - ref), 1e-4 * (1.0 + std::abs(ref)))
          << "row " << r << " column " << c;
    }
  }
}

template <typename ExpertT>
void check_against_reference(Index d, Index h, bool gated) {
  const auto bank = random_bank<ExpertT>(4, d, h, 5);
  const sparsemoe::Bf16Experts<ExpertT> bf16(bank);
  sparsemoe::Bf16ExpertsWorkspace workspace;
  for (const Index rows : {Index(0), Index(1), Index(17), Index(256)}) {
    SCOPED_TRACE(testing::Message() << "rows " << rows);
    const IndexVector offsets = layout(4, rows);
    const Matrix<float> input = random_rows(rows, d, 100 + static_cast<std::uint64_t>(rows));
    Matrix<float> output, portable;
    bf16.forward(offsets, input, output, workspace);
    expect_within_tolerance(output, reference(bf16, offsets, input, gated));
    bf16.forward(offsets, input, portable, workspace, sparsemoe::Bf16Kernel::portable);
    ASSERT_EQ(portable.rows(), rows);
    EXPECT_TRUE(output == portable) << "the kernels disagree";
  }
  // All rows on one expert: the column split (every thread streams part of its weights).
  IndexVector one_expert(5);
  one_expert << 0, 0, 40, 40, 40;
  const Matrix<float> input = random_rows(40, d, 7);
  Matrix<float> output;
  bf16.forward(one_expert, input, output, workspace);
  expect_within_tolerance(output, reference(bf16, one_expert, input, gated));
}

TEST(Bf16Experts, ReluMatchesDoubleReferenceOnRoundedWeights) { check_against_reference<ReluExpert>(40, 72, false); }

TEST(Bf16Experts, ReluWideHiddenCrossesColumnTiles) { check_against_reference<ReluExpert>(33, 300, false); }

TEST(Bf16Experts, SwiGluMatchesDoubleReferenceOnRoundedWeights) { check_against_reference<SwiGlu>(40, 72, true); }

TEST(Bf16Experts, SwiGluWideHiddenCrossesColumnTiles) { check_against_reference<SwiGlu>(64, 160, true); }

TEST(Bf16Experts, WeightsAreRoundedToNearestEven) {
  const auto bank = random_bank<ReluExpert>(2, 8, 5, 9);
  const sparsemoe::Bf16Experts<ReluExpert> bf16(bank);
  for (Index e = 0; e < 2; ++e) {
    const ReluExpert rounded = bf16.rounded_expert(e);
    for (Index r = 0; r < 8; ++r) {
      for (Index c = 0; c < 5; ++c) {
        const float w = bank.expert(e).w1()(r, c);
        EXPECT_EQ(rounded.w1()(r, c), sparsemoe::detail::float_from_bf16(sparsemoe::detail::bf16_from_float(w)));
        EXPECT_LE(std::abs(rounded.w1()(r, c) - w), std::ldexp(std::abs(w), -8));
      }
    }
    EXPECT_TRUE(rounded.b1() == bank.expert(e).b1());
    EXPECT_TRUE(rounded.b2() == bank.expert(e).b2());
  }
  EXPECT_EQ(bf16.expert_bytes(), static_cast<std::size_t>(2 * 8 * 10 + 4 * (5 + 8)));
}

TEST(Bf16Experts, BitwiseIdenticalForOneTwoThreeThreads) {
  const auto bank = random_bank<SwiGlu>(3, 64, 300, 21);
  const sparsemoe::Bf16Experts<SwiGlu> bf16(bank);
  for (const Index rows : {Index(1), Index(256)}) {
    const IndexVector offsets = layout(3, rows);
    const Matrix<float> input = random_rows(rows, 64, 3);
    Matrix<float> first;
    for (const int threads : {1, 2, 3}) {
      ThreadCount scope(threads);
      sparsemoe::Bf16ExpertsWorkspace workspace;
      Matrix<float> output;
      bf16.forward(offsets, input, output, workspace);
      if (threads == 1) {
        first = output;
      } else {
        EXPECT_TRUE(output == first) << threads << " threads, " << rows << " rows";
      }
    }
  }
}

TEST(Bf16Experts, RejectsBadInput) {
  const auto bank = random_bank<ReluExpert>(3, 16, 8, 1);
  const sparsemoe::Bf16Experts<ReluExpert> bf16(bank);
  sparsemoe::Bf16ExpertsWorkspace workspace;
  Matrix<float> output;
  const Matrix<float> input = random_rows(6, 16, 2);
  IndexVector offsets(4);
  offsets << 0, 2, 2, 6;
  EXPECT_NO_THROW(bf16.forward(offsets, input, output, workspace));
  EXPECT_THROW(bf16.forward(offsets, random_rows(6, 15, 2), output, workspace), std::invalid_argument);
  IndexVector short_offsets(3);
  short_offsets << 0, 2, 6;
  EXPECT_THROW(bf16.forward(short_offsets, input, output, workspace), std::invalid_argument);
  IndexVector decreasing(4);
  decreasing << 0, 3, 2, 6;
  EXPECT_THROW(bf16.forward(decreasing, input, output, workspace), std::invalid_argument);
  IndexVector wrong_total(4);
  wrong_total << 0, 2, 2, 5;
  EXPECT_THROW(bf16.forward(wrong_total, input, output, workspace), std::invalid_argument);
  const sparsemoe::Bf16Experts<ReluExpert> none;
  EXPECT_TRUE(none.empty());
  EXPECT_THROW(none.forward(offsets, input, output, workspace), std::invalid_argument);
}

sparsemoe::MoEConfig layer_config() {
  sparsemoe::MoEConfig config;
  config.input_dim = 48;
  config.hidden_dim = 96;
  config.num_experts = 6;
  config.k = 2;
  config.seed = 17;
  return config;
}

TEST(Bf16Experts, LayerForwardMatchesFp32LayerOnRoundedWeights) {
  using Layer = sparsemoe::MoELayer<float, SwiGlu, sparsemoe::SoftmaxTopKRouter<float>>;
  const sparsemoe::MoEConfig config = layer_config();
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = config.k;
  Layer layer(config, sparsemoe::SoftmaxTopKRouter<float>(config.input_dim, config.num_experts, router_options));
  layer.router().weight().setRandom();
  const auto bf16 = layer.bf16_experts();
  Layer rounded(layer);
  for (Index e = 0; e < layer.num_experts(); ++e) rounded.expert(e) = bf16.rounded_expert(e);
  const sparsemoe::ForwardOptions options;
  for (const Index tokens : {Index(0), Index(1), Index(17), Index(128)}) {
    SCOPED_TRACE(testing::Message() << "tokens " << tokens);
    const Matrix<float> input = random_rows(tokens, config.input_dim, 40 + static_cast<std::uint64_t>(tokens));
    Layer::Result served, reference, unrounded;
    sparsemoe::ForwardWorkspace<float> workspace, reference_workspace;
    layer.forward(input, options, served, workspace, bf16);
    rounded.forward(input, options, reference, reference_workspace);
    layer.forward(input, options, unrounded, reference_workspace);
    EXPECT_TRUE(served.routing.expert_ids == reference.routing.expert_ids);
    expect_within_tolerance(served.output, reference.output);
    // Against the unrounded fp32 weights: the bfloat16 rounding (2^-9 relative per weight).
    if (tokens > 0) {
      EXPECT_LE((served.output - unrounded.output).cwiseAbs().maxCoeff(), 2e-2f);
    }
    Layer::Result portable;
    layer.forward(input, options, portable, workspace, bf16, sparsemoe::Bf16Kernel::portable);
    EXPECT_TRUE(portable.output == served.output);
  }
}

TEST(Bf16Experts, LayerRejectsTrainingAndForeignExperts) {
  sparsemoe::MoELayer<float> layer(layer_config());
  sparsemoe::MoELayer<float> other(layer_config());
  const auto bf16 = layer.bf16_experts();
  const Matrix<float> input = random_rows(4, layer_config().input_dim, 8);
  sparsemoe::ForwardWorkspace<float> workspace;
  sparsemoe::ForwardResult<float> result;
  sparsemoe::ForwardOptions training;
  training.mode = sparsemoe::Mode::training;
  EXPECT_THROW(layer.forward(input, training, result, workspace, bf16), std::invalid_argument);
  EXPECT_THROW(other.forward(input, sparsemoe::ForwardOptions{}, result, workspace, bf16), std::invalid_argument);
  EXPECT_THROW(layer.forward(random_rows(4, 7, 8), sparsemoe::ForwardOptions{}, result, workspace, bf16),
               std::invalid_argument);
  EXPECT_NO_THROW(layer.forward(input, sparsemoe::ForwardOptions{}, result, workspace, bf16));
}

TEST(Bf16Experts, ReportsWhichKernelIsCompiled) {
#if defined(__AVX512F__)
  EXPECT_TRUE(sparsemoe::bf16_vector_kernel_compiled());
#else
  EXPECT_FALSE(sparsemoe::bf16_vector_kernel_compiled());
#endif
  std::cout << "[ INFO     ] bf16 kernel: " << (sparsemoe::bf16_vector_kernel_compiled() ? "AVX-512" : "portable")
            << '\n';
}

}  // namespace
