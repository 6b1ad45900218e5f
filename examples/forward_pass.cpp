// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Forward pass of one MoE layer (d=512, h=2048, E=8, k=2) over 4096 random tokens, in evaluation
// mode (also over packed expert weights, as a server would run it) and in training mode, with the
// routing statistics, both auxiliary losses, and the time and GFLOP/s next to a plain Eigen GEMM
// of the same FLOPs measured in the same run.
//
//   forward_pass [--tokens T] [--input-dim d] [--hidden-dim h] [--experts E] [--k k] [--repeats R]

#include <sparsemoe/sparsemoe.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;
using sparsemoe::Index;
using Matrix = sparsemoe::Matrix<float>;

struct Settings {
  Index tokens = 4096;
  Index input_dim = 512;
  Index hidden_dim = 2048;
  Index experts = 8;
  Index k = 2;
  int repeats = 3;
};

Settings parse(int argc, char** argv) {
  Settings settings;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help") {
      std::cout << "usage: forward_pass [--tokens T] [--input-dim d] [--hidden-dim h] [--experts E] [--k k] "
                   "[--repeats R]\n";
      std::exit(0);
    }
    if (i + 1 >= argc) {
      std::cerr << "forward_pass: " << flag << " needs a value (see --help)\n";
      std::exit(2);
    }
    const long long value = std::atoll(argv[++i]);
    if (flag == "--tokens") settings.tokens = value;
    else if (flag == "--input-dim") settings.input_dim = value;
    else if (flag == "--hidden-dim") settings.hidden_dim = value;
    else if (flag == "--experts") settings.experts = value;
    else if (flag == "--k") settings.k = value;
    else if (flag == "--repeats") settings.repeats = static_cast<int>(std::max(1LL, value));
    else {
      std::cerr << "forward_pass: unknown flag " << flag << " (see --help)\n";
      std::exit(2);
    }
  }
  return settings;
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Best wall time in seconds of `repeats` calls of `run`.
template <typename Run>
double best_seconds(int repeats, const Run& run) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

template <typename Vec>
std::string list(const Vec& values) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << "[";
  for (Index i = 0; i < values.size(); ++i) out << (i ? " " : "") << values[i];
  out << "]";
  return out.str();
}

void report(const char* label, const sparsemoe::ForwardResult<float>& result, double seconds, double flops) {
  std::cout << label << "\n"
            << "  tokens per expert  " << list(result.tokens_per_expert()) << "\n"
            << "  importance         " << list(result.losses.importance) << "\n"
            << (result.losses.smooth_load ? "  load (smooth)      " : "  load (count)       ")
            << list(result.losses.load) << "\n"
            << std::setprecision(6) << "  importance loss    " << result.losses.importance_loss()
            << "  (CV^2 " << result.losses.importance_cv_squared << ")\n"
            << "  load loss          " << result.losses.load_loss() << "  (CV^2 " << result.losses.load_cv_squared
            << ")\n"
            << "  output norm        " << result.output.norm() << "\n"
            << std::setprecision(2) << std::fixed << "  time               " << seconds * 1e3 << " ms, "
            << flops / seconds * 1e-9 << " GFLOP/s (expert FLOPs 4*T*k*d*h)\n"
            << std::defaultfloat;
}

}  // namespace

int main(int argc, char** argv) {
  const Settings settings = parse(argc, argv);
  sparsemoe::MoEConfig config;
  config.input_dim = settings.input_dim;
  config.hidden_dim = settings.hidden_dim;
  config.num_experts = settings.experts;
  config.k = settings.k;
  config.seed = 2017;
  try {
    sparsemoe::MoELayer<float> layer(config);
    // The paper starts W_g and W_noise at zero; random values make evaluation routing non-trivial.
    layer.gate().initialize_uniform(config.seed);

    Matrix tokens(settings.tokens, settings.input_dim);
    std::mt19937 generator(42);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (Index i = 0; i < tokens.size(); ++i) tokens.data()[i] = uniform(generator);
    const double flops = 4.0 * static_cast<double>(settings.tokens * settings.k * settings.input_dim *
                                                   settings.hidden_dim);

    std::cout << "MoE layer: T=" << settings.tokens << " d=" << settings.input_dim << " h=" << settings.hidden_dim
              << " E=" << settings.experts << " k=" << settings.k << ", " << thread_count() << " thread(s), best of " << settings.repeats << "\n";

    sparsemoe::ForwardResult<float> evaluation;
    const double evaluation_seconds =
        best_seconds(settings.repeats, [&] { evaluation = layer.forward(tokens); });
    report("evaluation mode", evaluation, evaluation_seconds, flops);

    // Serving: pack the expert weights once, reuse the result and the workspace from call to call
    // (no allocation after the first call), and check the output against the plain forward above.
    const sparsemoe::PackedExperts<float> packed = layer.pack_experts();
    sparsemoe::ForwardResult<float> served;
    sparsemoe::ForwardWorkspace<float> workspace;
    const sparsemoe::ForwardOptions evaluation_options;
    const double served_seconds = best_seconds(settings.repeats, [&] {
      layer.forward(tokens, evaluation_options, served, workspace, packed);
    });
    report("evaluation mode, packed experts and a reused workspace", served, served_seconds, flops);
    std::cout << "  max |difference| to the plain evaluation output "
              << (served.output - evaluation.output).cwiseAbs().maxCoeff() << "\n";

    sparsemoe::ForwardOptions training_options;
    training_options.mode = sparsemoe::Mode::training;
    training_options.step = 1;
    sparsemoe::ForwardResult<float> training;
    const double training_seconds =
        best_seconds(settings.repeats, [&] { training = layer.forward(tokens, training_options); });
    report("training mode", training, training_seconds, flops);

    // Reference: a plain Eigen GEMM pair of the same FLOPs, (T·k × d)·(d × h) then (T·k × h)·(h × d).
    const Index rows = settings.tokens * settings.k;
    Matrix gemm_input = tokens.replicate(settings.k, 1);
    Matrix hidden(rows, settings.hidden_dim);
    Matrix output(rows, settings.input_dim);
    const Matrix& w1 = layer.expert(0).w1();
    const Matrix& w2 = layer.expert(0).w2();
    const double gemm_seconds = best_seconds(settings.repeats, [&] {
      hidden.noalias() = gemm_input * w1;
      output.noalias() = hidden * w2;
    });
    std::cout << std::fixed << std::setprecision(2) << "plain Eigen GEMM, same FLOPs: " << gemm_seconds * 1e3
              << " ms, " << flops / gemm_seconds * 1e-9 << " GFLOP/s\n"
              << "ratio sparsemoe/GEMM (evaluation): " << gemm_seconds / evaluation_seconds << "\n";
  } catch (const std::exception& error) {
    std::cerr << "forward_pass: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
