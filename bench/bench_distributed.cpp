// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Weak scaling of DistributedMoELayer (expert parallelism over MPI): tokens per rank and experts
// per rank fixed, run under `mpiexec -np P` for P = 1, 2, 4 (scripts/bench-distributed runs them
// and prints the table). Two benchmarks, forward and forward+backward (training mode), each a
// fixed number of steps (--steps, the same on every rank: every step is collective, so Google
// Benchmark's own choice of iteration counts, which differs between ranks, would deadlock).
//
// Per step: the time is the slowest rank's (MPI_Barrier, MPI_Wtime around the step, max over
// ranks), reported as manual time. Counters:
//   comm_share   the share of the step in the exchanges (DistributedWorkspace::exchange_seconds,
//                MPI_Wtime around plan_expert_exchange / exchange_to_experts /
//                exchange_from_experts; max over ranks, over the max step time)
//   bytes_sent   bytes one rank sent to OTHER ranks per step (max over ranks)
//   model_bytes  2·T·k·d·(P−1)/P·sizeof(Scalar) per direction (what a rank sends, and as much
//                again it receives) of a forward, uniform routing: the T·k rows out to the experts
//                and their results back, each with a share (P−1)/P for other ranks; twice that
//                for forward+backward (∂L/∂y rows out, ∂L/∂x rows back; the backward's gate
//                vectors, 2·T·k·(P−1)/P scalars, are left out of the model)
//   bytes_ratio  bytes_sent / model_bytes
//   tokens_per_s all ranks' tokens per second of step time
//
// Flags (before Google Benchmark's own): --tokens_per_rank=T (default 2048), --experts_per_rank=N
// (2), --d= (512), --h= (1024), --k= (2), --steps= (10). Float. Only rank 0 reports. Run it on a
// quiet machine, one core per rank (OMP_NUM_THREADS=1 unless cores are spare).

#include <sparsemoe/distributed.hpp>

#include <benchmark/benchmark.h>
#include <mpi.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using sparsemoe::Index;
using Scalar = float;
using Layer = sparsemoe::DistributedMoELayer<Scalar>;

struct Settings {
  Index tokens_per_rank = 2048;
  Index experts_per_rank = 2;
  Index d = 512;
  Index h = 1024;
  Index k = 2;
  int steps = 10;
};

/// Takes --name=value flags of `settings` out of argv (the rest goes to Google Benchmark).
Settings parse_settings(int& argc, char** argv) {
  Settings settings;
  const struct {
    const char* name;
    Index* value;
  } flags[] = {{"--tokens_per_rank=", &settings.tokens_per_rank},
               {"--experts_per_rank=", &settings.experts_per_rank},
               {"--d=", &settings.d},
               {"--h=", &settings.h},
               {"--k=", &settings.k}};
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    bool taken = false;
    for (const auto& flag : flags) {
      if (std::strncmp(argv[i], flag.name, std::strlen(flag.name)) == 0) {
        *flag.value = std::strtoll(argv[i] + std::strlen(flag.name), nullptr, 10);
        taken = true;
      }
    }
    if (std::strncmp(argv[i], "--steps=", 8) == 0) {
      settings.steps = std::atoi(argv[i] + 8);
      taken = true;
    }
    if (!taken) argv[kept++] = argv[i];
  }
  argc = kept;
  return settings;
}

double max_over_ranks(double value) {
  double result = 0;
  MPI_Allreduce(&value, &result, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

/// One benchmark: `steps` forward (or forward+backward) steps of a layer of settings' shapes.
void run_steps(benchmark::State& state, const Settings& s, bool backward) {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  sparsemoe::MoEConfig config{s.d, s.h, s.experts_per_rank * ranks, s.k};
  sparsemoe::SoftmaxTopKRouterOptions router_options;
  router_options.k = s.k;
  sparsemoe::SoftmaxTopKRouter<Scalar> router(s.d, config.num_experts, router_options);
  router.initialize_uniform(1);
  const Layer layer(config, router, MPI_COMM_WORLD);
  sparsemoe::Matrix<Scalar> input(s.tokens_per_rank, s.d);
  std::mt19937_64 random(100 + static_cast<std::uint64_t>(rank));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (Index i = 0; i < input.size(); ++i) input.data()[i] = uniform(random);
  sparsemoe::ForwardOptions options;
  options.mode = backward ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
  Layer::Result result;
  Layer::Workspace workspace;
  auto gradients = layer.make_gradients();
  sparsemoe::Matrix<Scalar> d_input;
  layer.forward(input, options, result, workspace);  // one untimed step: first-touch, JIT kernels
  if (backward) layer.backward(result, result.output, gradients, d_input, workspace);
  double step_seconds = 0, exchange_seconds = 0, bytes = 0;
  for (auto _ : state) {
    workspace.exchange_seconds = 0;
    workspace.exchange_bytes_sent = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    layer.forward(input, options, result, workspace);
    if (backward) layer.backward(result, result.output, gradients, d_input, workspace);
    const double seconds = max_over_ranks(MPI_Wtime() - start);
    state.SetIterationTime(seconds);
    step_seconds += seconds;
    exchange_seconds += max_over_ranks(workspace.exchange_seconds);
    bytes += max_over_ranks(static_cast<double>(workspace.exchange_bytes_sent));
  }
  const double steps = static_cast<double>(state.iterations());
  const double model = 2.0 * static_cast<double>(s.tokens_per_rank * s.k * s.d) * (ranks - 1) / ranks *
                       sizeof(Scalar) * (backward ? 2 : 1);
  state.counters["ranks"] = ranks;
  state.counters["comm_share"] = step_seconds > 0 ? exchange_seconds / step_seconds : 0;
  state.counters["bytes_sent"] = bytes / steps;
  state.counters["model_bytes"] = model;
  state.counters["bytes_ratio"] = model > 0 ? bytes / steps / model : 0;
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(s.tokens_per_rank * ranks) * steps, benchmark::Counter::kIsRate);
}

/// Prints nothing: the reporter of every rank but 0.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const Settings settings = parse_settings(argc, argv);
  if (rank != 0) {  // only rank 0 writes --benchmark_out (the others would truncate the same file)
    int kept = 1;
    for (int i = 1; i < argc; ++i) {
      if (std::strncmp(argv[i], "--benchmark_out", 15) != 0) argv[kept++] = argv[i];
    }
    argc = kept;
  }
  benchmark::Initialize(&argc, argv);
  for (const bool backward : {false, true}) {
    benchmark::RegisterBenchmark(backward ? "distributed/forward_backward" : "distributed/forward",
                                 [settings, backward](benchmark::State& state) { run_steps(state, settings, backward); })
        ->Iterations(settings.steps)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
