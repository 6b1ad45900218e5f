// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// ExpertBank: the expert-compute stage over rows grouped by expert, with explicit data.
//   * forward over hand-made layouts (an expert with 0 rows, N = 1, an expert past the packing
//     threshold, several row tiles, the small-batch column split, packed weights, a companion
//     bank) against a naive per-row loop of the expert's formula written here;
//   * backward against central finite differences in double for ∂x, every expert tensor, and a
//     closed form for ∂g (⟨∂L/∂y, E(x)⟩, from the naive forward); gradients are added; the
//     in/out d_output holds g·∂L/∂y on return; gates of 1 when gate_of_row is empty;
//   * bitwise identical forward and backward (with and without a companion) for 1, 2 and 3
//     OpenMP threads;
//   * bad layouts and shapes rejected with std::invalid_argument naming the value.
#include <sparsemoe/expert_bank.hpp>

#include "gradient_check.hpp"
#include "reference_gate.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::IndexVector;
using sparsemoe::Matrix;
using sparsemoe::Vector;
using MatrixD = Matrix<double>;
using VectorD = Vector<double>;

class ThreadCount {
 public:
#ifdef _OPENMP
  explicit ThreadCount(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
#else
  explicit ThreadCount(int) {}
#endif
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
#ifdef _OPENMP
  int saved_ = 1;
#endif
};

template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed, double bound = 1.0) {
  Matrix<Scalar> m(rows, cols);
  sparsemoe::detail::fill_uniform(m.data(), m.size(), static_cast<Scalar>(bound), seed, 0);
  return m;
}

IndexVector offsets_of(const std::vector<Index>& counts) {
  IndexVector offsets;
  IndexVector c(static_cast<Index>(counts.size()));
  for (std::size_t e = 0; e < counts.size(); ++e) c[static_cast<Index>(e)] = counts[e];
  sparsemoe::bank_offsets_from_counts(c, offsets);
  return offsets;
}

template <typename ExpertT>
sparsemoe::ExpertBank<typename ExpertT::Scalar, ExpertT> make_bank(Index experts, Index d, Index h,
                                                                   std::uint64_t seed) {
  std::vector<ExpertT> list;
  for (Index e = 0; e < experts; ++e) {
    list.emplace_back(d, h);
    list.back().initialize_uniform(seed + static_cast<std::uint64_t>(e));
  }
  return sparsemoe::ExpertBank<typename ExpertT::Scalar, ExpertT>(std::move(list));
}

// ---------------------------------------------------------------------------------------------
// The naive reference: one row at a time, the formula written out.
// ---------------------------------------------------------------------------------------------

double relu(double v) { return v > 0 ? v : 0; }
double silu(double v) { return v / (1 + std::exp(-v)); }

/// E(x) of an Expert<S, Relu> or Expert<S, Silu> (act(x·W1 + b1)·W2 + b2) or a SwiGluExpert
/// ((silu(x·W_gate) ⊙ x·W_up)·W_down), in double, with the pre-activations x·W1 + b1.
template <typename ExpertT>
std::vector<double> naive_expert(const ExpertT& expert, const double* x, bool swiglu, bool use_silu,
                                 std::vector<double>* pre_out = nullptr) {
  const Index d = expert.input_dim(), h = expert.hidden_dim(), p = expert.pre_activation_width();
  std::vector<double> pre(static_cast<std::size_t>(p), 0.0), hidden(static_cast<std::size_t>(h), 0.0);
  for (Index j = 0; j < p; ++j) {
    double sum = expert.b1().size() > 0 ? static_cast<double>(expert.b1()[j]) : 0.0;
    for (Index i = 0; i < d; ++i) sum += x[i] * static_cast<double>(expert.w1()(i, j));
    pre[static_cast<std::size_t>(j)] = sum;
  }
  for (Index j = 0; j < h; ++j) {
    const double a = pre[static_cast<std::size_t>(j)];
    hidden[static_cast<std::size_t>(j)] =
        swiglu ? silu(a) * pre[static_cast<std::size_t>(h + j)] : (use_silu ? silu(a) : relu(a));
  }
  std::vector<double> out(static_cast<std::size_t>(d), 0.0);
  for (Index c = 0; c < d; ++c) {
    double sum = expert.b2().size() > 0 ? static_cast<double>(expert.b2()[c]) : 0.0;
    for (Index j = 0; j < h; ++j) sum += hidden[static_cast<std::size_t>(j)] * static_cast<double>(expert.w2()(j, c));
    out[static_cast<std::size_t>(c)] = sum;
  }
  if (pre_out) *pre_out = pre;
  return out;
}

template <typename ExpertT, typename Bank>
void expect_forward_matches_naive(const Bank& bank, const IndexVector& offsets, const Matrix<typename Bank::Scalar>& x,
                                  const Matrix<typename Bank::Scalar>& y, const Matrix<typename Bank::Scalar>* pre,
                                  bool swiglu, bool use_silu, double tolerance) {
  const Index d = bank.input_dim();
  ASSERT_EQ(y.rows(), x.rows());
  ASSERT_EQ(y.cols(), d);
  for (Index e = 0; e < bank.num_experts(); ++e) {
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<double> row(static_cast<std::size_t>(d));
      for (Index i = 0; i < d; ++i) row[static_cast<std::size_t>(i)] = static_cast<double>(x(r, i));
      std::vector<double> naive_pre;
      const std::vector<double> expected = naive_expert(bank.expert(e), row.data(), swiglu, use_silu, &naive_pre);
      for (Index c = 0; c < d; ++c) {
        ASSERT_NEAR(static_cast<double>(y(r, c)), expected[static_cast<std::size_t>(c)],
                    tolerance * (1 + std::fabs(expected[static_cast<std::size_t>(c)])))
            << "row " << r << " of expert " << e << ", column " << c;
      }
      if (!pre) continue;
      for (Index j = 0; j < bank.pre_activation_width(); ++j) {
        ASSERT_NEAR(static_cast<double>((*pre)(r, j)), naive_pre[static_cast<std::size_t>(j)],
                    tolerance * (1 + std::fabs(naive_pre[static_cast<std::size_t>(j)])))
            << "pre-activation of row " << r << ", column " << j;
      }
    }
  }
}

using ReluBank = sparsemoe::ExpertBank<double, sparsemoe::Expert<double, sparsemoe::Relu>>;

TEST(ExpertBankForward, MatchesTheNaiveLoopOverHandMadeLayouts) {
  const Index d = 12, h = 20;
  const ReluBank bank = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(5, d, h, 3);
  // An empty expert, one past the packing threshold (and over several tiles), one of 130 rows
  // (two tiles), one row, three rows.
  for (const std::vector<Index>& counts :
       {std::vector<Index>{3, 0, 300, 1, 130}, std::vector<Index>{0, 0, 0, 0, 0}, std::vector<Index>{0, 7, 0, 0, 0},
        std::vector<Index>{1, 1, 1, 1, 1}}) {
    const IndexVector offsets = offsets_of(counts);
    const MatrixD x = random_matrix<double>(offsets[5], d, 11);
    ReluBank::ForwardWorkspace workspace;
    MatrixD y, pre;
    bank.forward(offsets, x, &pre, y, workspace);
    expect_forward_matches_naive<sparsemoe::Expert<double, sparsemoe::Relu>>(bank, offsets, x, y, &pre, false, false,
                                                                             1e-12);
    MatrixD y_without_pre;
    bank.forward(offsets, x, nullptr, y_without_pre, workspace);
    EXPECT_EQ(y_without_pre, y) << "keeping the pre-activations must not change the output";
    const auto packed = bank.pack();
    MatrixD y_packed;
    bank.forward(offsets, x, nullptr, y_packed, workspace, &packed);
    expect_forward_matches_naive<sparsemoe::Expert<double, sparsemoe::Relu>>(bank, offsets, x, y_packed, nullptr,
                                                                             false, false, 1e-12);
  }
}

TEST(ExpertBankForward, SwiGluAndOneExpert) {
  const Index d = 9, h = 300;  // h past the column split's tile: two column tiles of W1 (p = 600)
  using Bank = sparsemoe::ExpertBank<double, sparsemoe::SwiGluExpert<double>>;
  const Bank bank = make_bank<sparsemoe::SwiGluExpert<double>>(1, d, h, 5);
  for (const Index rows : {Index(0), Index(1), Index(40), Index(260)}) {  // column split up to 256 rows
    const IndexVector offsets = offsets_of({rows});
    const MatrixD x = random_matrix<double>(rows, d, 17);
    Bank::ForwardWorkspace workspace;
    MatrixD y, pre;
    bank.forward(offsets, x, &pre, y, workspace);
    expect_forward_matches_naive<sparsemoe::SwiGluExpert<double>>(bank, offsets, x, y, &pre, true, false, 1e-12);
  }
}

TEST(ExpertBankForward, FloatMatchesTheNaiveLoop) {
  const Index d = 16, h = 24;
  using Bank = sparsemoe::ExpertBank<float, sparsemoe::Expert<float, sparsemoe::Silu>>;
  const Bank bank = make_bank<sparsemoe::Expert<float, sparsemoe::Silu>>(3, d, h, 8);
  const IndexVector offsets = offsets_of({200, 0, 90});
  const Matrix<float> x = random_matrix<float>(290, d, 19);
  Bank::ForwardWorkspace workspace;
  Matrix<float> y;
  bank.forward(offsets, x, nullptr, y, workspace);
  expect_forward_matches_naive<sparsemoe::Expert<float, sparsemoe::Silu>>(bank, offsets, x, y, nullptr, false, true,
                                                                          1e-5);
}

TEST(ExpertBankForward, CompanionRunsInTheSameScheduleWithTheSameResults) {
  const Index d = 10, h = 14, hs = 22;
  const ReluBank bank = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(4, d, h, 21);
  const ReluBank shared = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(1, d, hs, 99);
  for (const std::vector<Index>& counts : {std::vector<Index>{3, 0, 300, 1}, std::vector<Index>{0, 9, 0, 0}}) {
    const IndexVector offsets = offsets_of(counts);
    const MatrixD x = random_matrix<double>(offsets[4], d, 23);
    const MatrixD tokens = random_matrix<double>(150, d, 29);
    const IndexVector shared_offsets = offsets_of({150});
    ReluBank::ForwardWorkspace workspace, shared_workspace;
    MatrixD y, pre, shared_y, shared_pre;
    const ReluBank::ForwardCompanion companion{&shared, shared_offsets, tokens, &shared_pre, &shared_y,
                                               &shared_workspace};
    bank.forward(offsets, x, &pre, y, workspace, nullptr, companion);
    expect_forward_matches_naive<sparsemoe::Expert<double, sparsemoe::Relu>>(bank, offsets, x, y, &pre, false, false,
                                                                             1e-12);
    expect_forward_matches_naive<sparsemoe::Expert<double, sparsemoe::Relu>>(shared, shared_offsets, tokens, shared_y,
                                                                             &shared_pre, false, false, 1e-12);
    MatrixD alone;
    bank.forward(offsets, x, nullptr, alone, workspace);
    EXPECT_EQ(alone, y) << "a companion must not change the bank's own results";
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// L = Σ_r g_r·⟨W_r, E_e(x_r)⟩ over the rows of a layout, by the naive loop (double).
template <typename ExpertT>
double naive_loss(const sparsemoe::ExpertBank<double, ExpertT>& bank, const IndexVector& offsets, const MatrixD& x,
                  const MatrixD& weights, const VectorD& gates, bool swiglu, bool use_silu) {
  double loss = 0;
  for (Index e = 0; e < bank.num_experts(); ++e) {
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      const std::vector<double> y = naive_expert(bank.expert(e), x.row(r).data(), swiglu, use_silu);
      double dot = 0;
      for (Index c = 0; c < x.cols(); ++c) dot += weights(r, c) * y[static_cast<std::size_t>(c)];
      loss += (gates.size() > 0 ? gates[r] : 1.0) * dot;
    }
  }
  return loss;
}

template <typename ExpertT>
void check_backward(Index d, Index h, const std::vector<Index>& counts, bool swiglu, bool use_silu, bool with_gates,
                    std::uint64_t seed) {
  using Bank = sparsemoe::ExpertBank<double, ExpertT>;
  Bank bank = make_bank<ExpertT>(static_cast<Index>(counts.size()), d, h, seed);
  const IndexVector offsets = offsets_of(counts);
  const Index rows = offsets[offsets.size() - 1];
  MatrixD x = random_matrix<double>(rows, d, seed + 100);
  const MatrixD weights = random_matrix<double>(rows, d, seed + 200);
  VectorD gates;
  if (with_gates) gates = (random_matrix<double>(rows, 1, seed + 300).array() + 1.5).matrix();

  typename Bank::ForwardWorkspace forward_workspace;
  MatrixD y, pre;
  bank.forward(offsets, x, &pre, y, forward_workspace);
  MatrixD d_output = weights;
  MatrixD d_input;
  VectorD d_gates;
  std::vector<ExpertT> gradients = bank.make_gradients();
  typename Bank::BackwardWorkspace workspace;
  bank.backward(offsets, x, pre, d_output, gates, d_input, d_gates, gradients, workspace);

  // On return d_output holds g·∂L/∂y.
  for (Index r = 0; r < rows; ++r) {
    const double g = with_gates ? gates[r] : 1.0;
    for (Index c = 0; c < d; ++c) ASSERT_EQ(d_output(r, c), weights(r, c) * g) << "row " << r;
  }
  // ∂L/∂g_r = ⟨W_r, E(x_r)⟩, from the naive forward.
  ASSERT_EQ(d_gates.size(), with_gates ? rows : 0);
  for (Index e = 0; with_gates && e < bank.num_experts(); ++e) {
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
      const std::vector<double> out = naive_expert(bank.expert(e), x.row(r).data(), swiglu, use_silu);
      double dot = 0;
      for (Index c = 0; c < d; ++c) dot += weights(r, c) * out[static_cast<std::size_t>(c)];
      EXPECT_NEAR(d_gates[r], dot, 1e-12 * (1 + std::fabs(dot))) << "row " << r;
    }
  }
  const auto loss = [&] { return naive_loss(bank, offsets, x, weights, gates, swiglu, use_silu); };
  const auto dx = sparsemoe_test::check_gradient(loss, x, d_input);
  EXPECT_LT(dx.worst_relative_error, 1e-7) << "d_grouped_input: " << dx;
  for (Index e = 0; e < bank.num_experts(); ++e) {
    const auto parameters = bank.expert(e).tensors();
    const auto analytic = gradients[static_cast<std::size_t>(e)].tensors();
    for (std::size_t t = 0; t < parameters.size(); ++t) {
      const auto result = sparsemoe_test::check_gradient(loss, parameters[t], analytic[t]);
      EXPECT_LT(result.worst_relative_error, 1e-7) << "expert " << e << " " << parameters[t].name << ": " << result;
      if (counts[static_cast<std::size_t>(e)] == 0) {
        EXPECT_EQ(result.max_abs_analytic, 0.0);
      }
    }
  }

  // Gradients are added: a second identical call doubles them (up to rounding: the GEMMs
  // accumulate into the gradient as they go).
  std::vector<ExpertT> once = gradients;
  d_output = weights;
  bank.backward(offsets, x, pre, d_output, gates, d_input, d_gates, gradients, workspace);
  for (std::size_t e = 0; e < gradients.size(); ++e) {
    const auto twice = gradients[e].tensors();
    const auto single = once[e].tensors();
    for (std::size_t t = 0; t < twice.size(); ++t) {
      for (Index i = 0; i < twice[t].size(); ++i) {
        const double expected = 2 * single[t].data[i];
        ASSERT_NEAR(twice[t].data[i], expected, 1e-12 * (1 + std::fabs(expected))) << twice[t].name;
      }
    }
  }
}

TEST(ExpertBankBackward, MatchesFiniteDifferencesWithAnEmptyExpert) {
  check_backward<sparsemoe::Expert<double, sparsemoe::Silu>>(5, 4, {3, 0, 2, 1}, false, true, true, 31);
}

TEST(ExpertBankBackward, MatchesFiniteDifferencesForOneExpert) {
  check_backward<sparsemoe::Expert<double, sparsemoe::Silu>>(4, 6, {5}, false, true, true, 41);
}

TEST(ExpertBankBackward, MatchesFiniteDifferencesForSwiGlu) {
  check_backward<sparsemoe::SwiGluExpert<double>>(4, 3, {2, 3, 0}, true, false, true, 51);
}

TEST(ExpertBankBackward, WithoutGatesEveryGateIsOne) {
  check_backward<sparsemoe::Expert<double, sparsemoe::Silu>>(5, 4, {2, 1, 0}, false, true, false, 61);
}

TEST(ExpertBankBackward, CompanionGivesTheSameResultsAsTwoSeparateCalls) {
  const Index d = 7, h = 9, hs = 11;
  const ReluBank bank = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(3, d, h, 71);
  const ReluBank shared = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(1, d, hs, 72);
  const IndexVector offsets = offsets_of({140, 0, 3});
  const IndexVector shared_offsets = offsets_of({130});
  const MatrixD x = random_matrix<double>(143, d, 73), tokens = random_matrix<double>(130, d, 74);
  const MatrixD dy = random_matrix<double>(143, d, 75), dys = random_matrix<double>(130, d, 76);
  const VectorD gates = random_matrix<double>(143, 1, 77), shared_gates = random_matrix<double>(130, 1, 78);
  ReluBank::ForwardWorkspace fw;
  MatrixD y, pre, ys, pres;
  bank.forward(offsets, x, &pre, y, fw);
  shared.forward(shared_offsets, tokens, &pres, ys, fw);

  ReluBank::BackwardWorkspace w1, w2;
  MatrixD d_x1, d_t1, d_x2, d_t2, dy1 = dy, dys1 = dys, dy2 = dy, dys2 = dys;
  VectorD dg1, dgs1, dg2, dgs2;
  auto g1 = bank.make_gradients(), gs1 = shared.make_gradients(), g2 = bank.make_gradients(),
       gs2 = shared.make_gradients();
  bank.backward(offsets, x, pre, dy1, gates, d_x1, dg1, g1, w1);
  shared.backward(shared_offsets, tokens, pres, dys1, shared_gates, d_t1, dgs1, gs1, w2);
  const ReluBank::BackwardCompanion companion{&shared, shared_offsets, tokens, pres, dys2, shared_gates,
                                              &d_t2, &dgs2, &gs2, &w2};
  bank.backward(offsets, x, pre, dy2, gates, d_x2, dg2, g2, w1, companion);
  EXPECT_EQ(d_x1, d_x2);
  EXPECT_EQ(d_t1, d_t2);
  EXPECT_EQ(dg1, dg2);
  EXPECT_EQ(dgs1, dgs2);
  EXPECT_EQ(dy1, dy2);
  EXPECT_EQ(dys1, dys2);
  for (std::size_t e = 0; e < g1.size(); ++e) {
    EXPECT_EQ(g1[e].w1(), g2[e].w1());
    EXPECT_EQ(g1[e].b2(), g2[e].b2());
  }
  EXPECT_EQ(gs1[0].w1(), gs2[0].w1());
  EXPECT_EQ(gs1[0].w2(), gs2[0].w2());
}

// ---------------------------------------------------------------------------------------------
// Determinism across thread counts
// ---------------------------------------------------------------------------------------------

struct BankRun {
  Matrix<float> y, d_x, shared_y, shared_d_x, d_out;
  Vector<float> d_g, shared_d_g;
  std::vector<Matrix<float>> gradients;
};

BankRun run_bank(int threads) {
  ThreadCount count(threads);
  using Expert = sparsemoe::Expert<float, sparsemoe::GeluTanh>;
  using Bank = sparsemoe::ExpertBank<float, Expert>;
  const Index d = 40, h = 150;  // two weight-gradient column tiles of W1
  const Bank bank = make_bank<Expert>(4, d, h, 81);
  const Bank shared = make_bank<Expert>(1, d, 70, 82);
  const IndexVector offsets = offsets_of({300, 0, 129, 7});
  const IndexVector shared_offsets = offsets_of({260});
  const Matrix<float> x = random_matrix<float>(436, d, 83), tokens = random_matrix<float>(260, d, 84);
  const Vector<float> gates = random_matrix<float>(436, 1, 85), shared_gates;
  BankRun run;
  Bank::ForwardWorkspace fw, sfw;
  Matrix<float> pre, shared_pre;
  bank.forward(offsets, x, &pre, run.y, fw, nullptr,
               Bank::ForwardCompanion{&shared, shared_offsets, tokens, &shared_pre, &run.shared_y, &sfw});
  run.d_out = random_matrix<float>(436, d, 86);
  Matrix<float> shared_d_out = random_matrix<float>(260, d, 87);
  Bank::BackwardWorkspace bw, sbw;
  auto gradients = bank.make_gradients();
  auto shared_gradients = shared.make_gradients();
  bank.backward(offsets, x, pre, run.d_out, gates, run.d_x, run.d_g, gradients, bw,
                Bank::BackwardCompanion{&shared, shared_offsets, tokens, shared_pre, shared_d_out, shared_gates,
                                        &run.shared_d_x, &run.shared_d_g, &shared_gradients, &sbw});
  for (auto* list : {&gradients, &shared_gradients}) {
    for (auto& gradient : *list) {
      for (const auto& view : gradient.tensors()) {
        run.gradients.push_back(Eigen::Map<const Matrix<float>>(view.data, view.rows, view.cols));
      }
    }
  }
  return run;
}

TEST(ExpertBankDeterminism, BitwiseIdenticalForOneTwoAndThreeThreads) {
  const BankRun one = run_bank(1);
  for (const int threads : {2, 3}) {
    const BankRun other = run_bank(threads);
    SCOPED_TRACE(threads);
    EXPECT_EQ(one.y, other.y);
    EXPECT_EQ(one.shared_y, other.shared_y);
    EXPECT_EQ(one.d_x, other.d_x);
    EXPECT_EQ(one.shared_d_x, other.shared_d_x);
    EXPECT_EQ(one.d_out, other.d_out);
    EXPECT_EQ(one.d_g, other.d_g);
    EXPECT_EQ(other.shared_d_g.size(), 0);
    ASSERT_EQ(one.gradients.size(), other.gradients.size());
    for (std::size_t t = 0; t < one.gradients.size(); ++t) EXPECT_EQ(one.gradients[t], other.gradients[t]) << t;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

TEST(ExpertBankErrors, BadLayoutsAndShapesAreRejected) {
  const ReluBank bank = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(3, 4, 5, 91);
  ReluBank::ForwardWorkspace workspace;
  MatrixD y;
  const MatrixD x = random_matrix<double>(6, 4, 92);
  const auto layout = [](Index a, Index b, Index c, Index e) {
    IndexVector offsets(4);
    offsets << a, b, c, e;
    return offsets;
  };
  IndexVector short_offsets(3);
  short_offsets << 0, 3, 6;
  EXPECT_INVALID_ARGUMENT_WITH(bank.forward(short_offsets, x, nullptr, y, workspace), "ExpertBank::forward",
                               "offsets has 3 entries");
  EXPECT_INVALID_ARGUMENT_WITH(bank.forward(layout(0, 4, 2, 6), x, nullptr, y, workspace),
                               "offsets[2] = 2 < offsets[1] = 4");
  EXPECT_INVALID_ARGUMENT_WITH(bank.forward(layout(0, 2, 4, 7), x, nullptr, y, workspace), "offsets[N] = 7");
  EXPECT_INVALID_ARGUMENT_WITH(bank.forward(layout(1, 2, 4, 6), x, nullptr, y, workspace),
                               "offsets[0] must be 0, got 1");
  const IndexVector good = layout(0, 2, 4, 6);
  EXPECT_INVALID_ARGUMENT_WITH(bank.forward(good, random_matrix<double>(6, 5, 93), nullptr, y, workspace),
                               "must have 4 columns, got 6x5");

  MatrixD pre;
  bank.forward(good, x, &pre, y, workspace);
  ReluBank::BackwardWorkspace backward_workspace;
  MatrixD d_output = x, d_input;
  VectorD gates = VectorD::Ones(6), d_gates;
  auto gradients = bank.make_gradients();
  gradients.pop_back();
  EXPECT_INVALID_ARGUMENT_WITH(
      bank.backward(good, x, pre, d_output, gates, d_input, d_gates, gradients, backward_workspace),
      "ExpertBank::backward", "gradients has 2 experts, the bank 3");
  gradients = bank.make_gradients();
  const VectorD wrong_gates = VectorD::Ones(5);
  EXPECT_INVALID_ARGUMENT_WITH(
      bank.backward(good, x, pre, d_output, wrong_gates, d_input, d_gates, gradients, backward_workspace),
      "gate_of_row has 5 entries");
  EXPECT_INVALID_ARGUMENT_WITH(
      bank.backward(good, x, random_matrix<double>(6, 4, 94), d_output, gates, d_input, d_gates, gradients,
                    backward_workspace),
      "pre_activations must be 6x5, got 6x4");

  IndexVector offsets;
  IndexVector negative(2);
  negative << 3, -1;
  EXPECT_INVALID_ARGUMENT_WITH(sparsemoe::bank_offsets_from_counts(negative, offsets),
                               "expert 1 has a negative row count -1");
  EXPECT_INVALID_ARGUMENT_WITH(ReluBank(0, 4, 5), "num_experts must be >= 1, got 0");
  std::vector<sparsemoe::Expert<double, sparsemoe::Relu>> mixed;
  mixed.emplace_back(4, 5);
  mixed.emplace_back(4, 6);
  EXPECT_INVALID_ARGUMENT_WITH(ReluBank{mixed}, "expert 1 has been resized");
}

TEST(ExpertBank, OffsetsFromCountsAndTensorNames) {
  IndexVector counts(4);
  counts << 2, 0, 5, 1;
  IndexVector offsets;
  sparsemoe::bank_offsets_from_counts(counts, offsets);
  ASSERT_EQ(offsets.size(), 5);
  Index running = 0;
  for (Index e = 0; e < 4; ++e) {
    EXPECT_EQ(offsets[e], running);
    running += counts[e];
  }
  EXPECT_EQ(offsets[4], 8);
  ReluBank bank = make_bank<sparsemoe::Expert<double, sparsemoe::Relu>>(2, 3, 4, 1);
  const auto views = bank.tensors(6);
  ASSERT_EQ(views.size(), 8u);
  EXPECT_EQ(views[0].name, "expert6.w1");
  EXPECT_EQ(views[7].name, "expert7.b2");
  EXPECT_EQ(bank.shape().pre_activation_width, 4);
  EXPECT_EQ(bank.num_experts(), 2);
}

}  // namespace
