// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The benchmark suite of issue 5: the MoE layer (forward, forward+backward) at configs A, B, C, D,
// Decode and SkewA with 1 and 2 threads; Soft MoE at config A's expert FLOPs; the forward and
// backward stages alone at A, each with a byte model and its roofline bound (issue 16: the
// per-phase table printed after the ratio table); and, in the same binary, the references needed
// to judge them: an FMA-peak probe, a read-bandwidth probe, a plain GEMM of the same FLOPs through
// the same backend, and a naive per-token loop.
//
// The probes run first, in main(), before any benchmark: their results are stored and used for the
// "frac_peak" counter (fraction of the FMA peak measured for the same thread count) and for the
// memory floor of D and Decode (for their bf16-weight rows, the bf16 floor). After the run, a
// ratio table (issue 5's targets) is printed and, with --ratio_table=<path>, written as TSV (read
// by scripts/bench and scripts/plot-bench).
//
// Build in Release with -march=native (scripts/bench does). Float throughout.

#include <sparsemoe/sparsemoe.hpp>

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using sparsemoe::Index;
using Scalar = float;
using Mat = sparsemoe::Matrix<Scalar>;
using Layer = sparsemoe::MoELayer<Scalar>;

#ifdef SPARSEMOE_WITH_LIBXSMM
constexpr const char* backend_name = "libxsmm";
#else
constexpr const char* backend_name = "eigen";
#endif

void set_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

int available_threads() {
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------
// Probes

/// FLOPs of `iterations` rounds of 16 independent FMA chains, on this thread.
#if defined(__AVX512F__)
constexpr int fma_lanes = 16;
__attribute__((noinline)) float fma_chains(long iterations) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iterations; ++it) {
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < 16; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int fma_lanes = 8;
__attribute__((noinline)) float fma_chains(long iterations) {
  __m256 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iterations; ++it) {
    for (int i = 0; i < 16; ++i) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
  }
  alignas(32) float out[8];
  __m256 sum = acc[0];
  for (int i = 1; i < 16; ++i) sum = _mm256_add_ps(sum, acc[i]);
  _mm256_store_ps(out, sum);
  float total = 0;
  for (float v : out) total += v;
  return total;
}
#else
constexpr int fma_lanes = 1;
__attribute__((noinline)) float fma_chains(long iterations) {
  float acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = 0.001f * static_cast<float>(i);
  for (long it = 0; it < iterations; ++it) {
    for (int i = 0; i < 16; ++i) acc[i] = std::fma(acc[i], 0.999999f, 1e-7f);
  }
  float total = 0;
  for (float v : acc) total += v;
  return total;
}
#endif
constexpr double fma_flops_per_iteration = 2.0 * 16 * fma_lanes;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Aggregate FMA GFLOP/s of `threads` threads each running the chains (best of 5).
double measure_peak(int threads) {
  const long iterations = 20000000;
  double best = 0;
  volatile float sink = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const double start = now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    { sink = sink + fma_chains(iterations); }
#else
    sink = sink + fma_chains(iterations);
#endif
    const double seconds = now() - start;
    best = std::max(best, threads * fma_flops_per_iteration * static_cast<double>(iterations) / seconds * 1e-9);
  }
  return best;
}

/// Sum of data[begin, end) in 128 independent lanes: the inner loop vectorises without
/// reassociating anything, for compilers that decline the `omp simd` reduction below.
[[maybe_unused]] float lane_sum(const float* data, Index begin, Index end) {
  constexpr Index lanes = 128;
  float partial[lanes] = {};
  Index i = begin;
  for (; i + lanes <= end; i += lanes) {
    for (Index lane = 0; lane < lanes; ++lane) partial[lane] += data[i + lane];
  }
  float total = 0;
  for (; i < end; ++i) total += data[i];
  for (const float value : partial) total += value;
  return total;
}

/// Sum of a float array, split statically over the team. GCC vectorises the `omp simd`
/// reduction (measured 5-8 % more single-thread bandwidth than lane_sum); clang declines it
/// (-Wpass-failed) and gets lane_sum on each thread's share instead.
float array_sum(const float* data, Index size) {
  float total = 0;
#if defined(_OPENMP) && !defined(__clang__)
#pragma omp parallel for simd schedule(static) reduction(+ : total)
  for (Index i = 0; i < size; ++i) total += data[i];
#elif defined(_OPENMP)
#pragma omp parallel reduction(+ : total)
  {
    const auto threads = static_cast<Index>(omp_get_num_threads());
    const auto thread = static_cast<Index>(omp_get_thread_num());
    total += lane_sum(data, size * thread / threads, size * (thread + 1) / threads);
  }
#else
  total = lane_sum(data, 0, size);
#endif
  return total;
}

/// The array the bandwidth probe reads: 512 MiB, far past the L3.
const std::vector<float>& bandwidth_array() {
  static const std::vector<float> data(Index(128) << 20, 1.0f);
  return data;
}

/// Read bandwidth, GB/s, of `threads` threads summing the array (best of 5).
double measure_bandwidth(int threads) {
  const auto& data = bandwidth_array();
  set_threads(threads);
  double best = 0;
  volatile float sink = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const double start = now();
    sink = sink + array_sum(data.data(), static_cast<Index>(data.size()));
    const double seconds = now() - start;
    best = std::max(best, static_cast<double>(data.size() * sizeof(float)) / seconds * 1e-9);
  }
  return best;
}

struct Machine {
  double peak[3] = {0, 0, 0};       // GFLOP/s for 1 and 2 threads
  double bandwidth[3] = {0, 0, 0};  // GB/s for 1 and 2 threads
};
Machine machine;

double peak_for(int threads) { return machine.peak[std::min(threads, 2)]; }
double bandwidth_for(int threads) { return machine.bandwidth[std::min(threads, 2)]; }

void BM_PeakFMA(benchmark::State& state, int threads) {
  const long iterations = 2000000;
  volatile float sink = 0;
  for (auto _ : state) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    { sink = sink + fma_chains(iterations); }
#else
    sink = sink + fma_chains(iterations);
#endif
  }
  const double flops = threads * fma_flops_per_iteration * static_cast<double>(iterations);
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["probe_GFLOPs"] = peak_for(threads);
}

void BM_ReadBandwidth(benchmark::State& state, int threads) {
  const auto& data = bandwidth_array();
  set_threads(threads);
  for (auto _ : state) benchmark::DoNotOptimize(array_sum(data.data(), static_cast<Index>(data.size())));
  state.counters["GBps"] = benchmark::Counter(static_cast<double>(data.size() * sizeof(float)) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
  state.counters["probe_GBps"] = bandwidth_for(threads);
}

// ---------------------------------------------------------------------------------------------
// Configurations

struct Config {
  const char* label;
  Index tokens, d, h, experts, k;
  bool skew = false;
  Index shared_hidden = 0;  ///< h_s of the always-on shared expert (0: none)
};

const Config configs[] = {
    {"A", 4096, 512, 2048, 8, 2},    {"B", 4096, 1024, 4096, 16, 2}, {"C", 512, 512, 2048, 64, 4},
    {"D", 64, 512, 2048, 8, 2},      {"Decode", 1, 1024, 4096, 8, 2}, {"SkewA", 4096, 512, 2048, 8, 2, true},
};

/// Fine-grained shapes of current models (ReLU experts of the same GEMM sizes), run with all
/// threads only: DeepSeek-like (E = 64, k = 6, two shared experts of width 512 = one of 1024)
/// and Qwen3-30B-A3B-like (E = 128, k = 8, no shared expert).
const Config model_configs[] = {
    {"DeepSeek", 2048, 1024, 512, 64, 6, false, 1024},
    {"Qwen3", 4096, 2048, 768, 128, 8},
};

const Config& config_named(const std::string& label) {
  for (const Config& c : configs) {
    if (label == c.label) return c;
  }
  for (const Config& c : model_configs) {
    if (label == c.label) return c;
  }
  std::abort();
}

/// Expert FLOPs of one forward: 4·T·k·d·h routed, plus 4·T·d·h_s for a shared expert.
double expert_forward_flops(const Config& c) {
  return 4.0 * static_cast<double>(c.tokens) * static_cast<double>(c.d) *
         static_cast<double>(c.k * c.h + c.shared_hidden);
}

/// A layer and an input for one config, built once per process and shared by every benchmark.
///
/// Routing: the gate gets U(±1/√d) weights (initialize_uniform), so routing is balanced-ish.
/// SkewA: input column 0 is a marker, 10 for 90% of the tokens (every token whose index is not a
/// multiple of 10) and 0 for the rest, and W_g(0, ·) is 0 except W_g(0, 0) = 10: those tokens get a
/// logit boost of 100 for expert 0, which is then always in their top-k, so expert 0 receives 90%
/// of the tokens (0.9·T of the T·k rows) and the other slot spreads over the others as in A.
struct Setup {
  std::unique_ptr<Layer> layer;
  Mat input;
  Mat d_output;
  explicit Setup(const Config& c) {
    sparsemoe::MoEConfig mc;
    mc.input_dim = c.d;
    mc.hidden_dim = c.h;
    mc.num_experts = c.experts;
    mc.k = c.k;
    mc.seed = 42;
    mc.shared_hidden_dim = c.shared_hidden;
    layer = std::make_unique<Layer>(mc);
    layer->gate().initialize_uniform(7);
    input.resize(c.tokens, c.d);
    sparsemoe::detail::fill_uniform(input.data(), input.size(), Scalar(1), 11, 0);
    d_output.resize(c.tokens, c.d);
    sparsemoe::detail::fill_uniform(d_output.data(), d_output.size(), Scalar(1), 13, 0);
    if (c.skew) {
      for (Index t = 0; t < c.tokens; ++t) input(t, 0) = (t % 10 != 0) ? Scalar(10) : Scalar(0);
      layer->gate().gate_weight().row(0).setZero();
      layer->gate().gate_weight()(0, 0) = Scalar(10);
    }
  }
};

Setup& setup_for(const Config& c) {
  static std::map<std::string, std::unique_ptr<Setup>> cache;
  auto& slot = cache[c.label];
  if (!slot) slot = std::make_unique<Setup>(c);
  return *slot;
}

/// Bytes of the parameters of the experts that received at least one token.
double used_expert_bytes(const Layer& layer, const sparsemoe::DispatchPlan& plan) {
  double bytes = 0;
  for (Index e = 0; e < layer.num_experts(); ++e) {
    if (plan.tokens_per_expert[e] == 0) continue;
    const auto& expert = layer.expert(e);
    bytes += static_cast<double>(expert.w1().size() + expert.b1().size() + expert.w2().size() + expert.b2().size()) *
             sizeof(Scalar);
  }
  return bytes;
}

/// Evicts the caches: reads and writes 64 MiB (twice the L3).
void flush_caches() {
  static std::vector<float> junk(Index(16) << 20, 1.0f);
  for (float& v : junk) v = v * 0.5f + 0.5f;
  benchmark::ClobberMemory();
}

void add_rate_counters(benchmark::State& state, double flops, Index tokens, int threads) {
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_peak"] =
      benchmark::Counter(flops * 1e-9 / peak_for(threads), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = threads;
}

/// Time per iteration ÷ memory floor (bytes of used experts ÷ measured read bandwidth).
void add_floor_counter(benchmark::State& state, double bytes, int threads) {
  const double floor_seconds = bytes / (bandwidth_for(threads) * 1e9);
  state.counters["weight_MB"] = bytes * 1e-6;
  state.counters["floor_us"] = floor_seconds * 1e6;
  state.counters["x_floor"] = benchmark::Counter(
      floor_seconds, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

/// Bytes of `count` scalars.
double scalar_bytes(double count) { return count * sizeof(Scalar); }
/// Bytes of `count` indices (expert ids, the dispatch plan's row maps).
double index_bytes(double count) { return count * sizeof(Index); }

/// The roofline counters of a stage row: `flops` and `bytes` per call (the stage's analytic
/// model: the minimum it must read plus write), the achieved GBps and GFLOPs (GFLOPs only when
/// the stage has FLOPs), bound_ms = max(flops / FMA peak, bytes / read bandwidth) with the probes
/// of this run at the row's thread count, and x_of_roofline = measured time ÷ bound_ms.
void add_roofline_counters(benchmark::State& state, double flops, double bytes, int threads) {
  const double bound_seconds = std::max(flops / (peak_for(threads) * 1e9), bytes / (bandwidth_for(threads) * 1e9));
  state.counters["flops"] = flops;
  state.counters["bytes"] = bytes;
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (flops > 0) {
    state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  }
  state.counters["bound_ms"] = bound_seconds * 1e3;
  state.counters["x_of_roofline"] = benchmark::Counter(
      bound_seconds, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["threads"] = threads;
}

// ---------------------------------------------------------------------------------------------
// Layer benchmarks

/// Evaluation-mode forward; `packed`: through MoELayer::pack_experts()'s packed weights (made
/// once, outside the timing, as a server would); `cold`: caches flushed before each iteration.
void BM_LayerForward(benchmark::State& state, const Config& c, int threads, bool cold, bool packed) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::ForwardOptions options;  // evaluation: no cache
  sparsemoe::ForwardResult<Scalar> warm;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  const sparsemoe::PackedExperts<Scalar> packed_experts = packed ? s.layer->pack_experts() : sparsemoe::PackedExperts<Scalar>{};
  const auto run = [&] {
    if (packed) {
      s.layer->forward(s.input, options, warm, workspace, packed_experts);
    } else {
      s.layer->forward(s.input, options, warm, workspace);
    }
  };
  run();
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      flush_caches();
      state.ResumeTiming();
    }
    run();
    benchmark::DoNotOptimize(warm.output.data());
  }
  state.counters["workspace_bytes"] = static_cast<double>(workspace.bytes());
  add_rate_counters(state, expert_forward_flops(c), c.tokens, threads);
  add_floor_counter(state, used_expert_bytes(*s.layer, warm.plan), threads);
  const auto& counts = warm.tokens_per_expert();
  state.counters["max_expert_rows"] = static_cast<double>(counts.maxCoeff());
  state.counters["cache_bytes"] = static_cast<double>((warm.cache.input.size() + warm.cache.pre_activations.size()) *
                                                      sizeof(Scalar));
}

/// Evaluation-mode forward through MoELayer::bf16_experts() (bfloat16 expert weights made once,
/// outside the timing; fp32 activations and accumulation). Its x_floor is against the bf16
/// memory floor: the used experts' bytes at 2 per weight (4 per bias) plus the fp32 input and
/// output rows (T·d·4 bytes each), at the measured read bandwidth.
void BM_LayerForwardBf16(benchmark::State& state, const Config& c, int threads, bool cold) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::ForwardOptions options;  // evaluation: no cache
  sparsemoe::ForwardResult<Scalar> warm;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  const auto experts = s.layer->bf16_experts();
  s.layer->forward(s.input, options, warm, workspace, experts);
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      flush_caches();
      state.ResumeTiming();
    }
    s.layer->forward(s.input, options, warm, workspace, experts);
    benchmark::DoNotOptimize(warm.output.data());
  }
  state.counters["workspace_bytes"] = static_cast<double>(workspace.bytes());
  add_rate_counters(state, expert_forward_flops(c), c.tokens, threads);
  double bytes = 2.0 * static_cast<double>(c.tokens * c.d) * sizeof(Scalar);
  for (Index e = 0; e < s.layer->num_experts(); ++e) {
    if (warm.plan.tokens_per_expert[e] > 0) bytes += static_cast<double>(experts.expert_bytes());
  }
  add_floor_counter(state, bytes, threads);
  state.counters["max_expert_rows"] = static_cast<double>(warm.tokens_per_expert().maxCoeff());
}

void BM_LayerForwardBackward(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  auto gradients = s.layer->make_gradients();
  double cache_bytes = 0, routing_bytes = 0;
  sparsemoe::ForwardResult<Scalar> result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  sparsemoe::BackwardWorkspace<Scalar> backward_workspace;
  Mat d_input;
  // One untimed step first, as in BM_LayerForward: the workspaces, the cache and libxsmm's JIT
  // kernels are then in place, as they are at every training step after the first.
  s.layer->forward(s.input, options, result, workspace);
  s.layer->backward(result, s.d_output, gradients, d_input, backward_workspace);
  for (auto _ : state) {
    s.layer->forward(s.input, options, result, workspace);
    s.layer->backward(result, s.d_output, gradients, d_input, backward_workspace);
    benchmark::DoNotOptimize(d_input.data());
    cache_bytes = static_cast<double>((result.cache.input.size() + result.cache.pre_activations.size()) * sizeof(Scalar));
    const auto& r = result.routing;
    routing_bytes = static_cast<double>((r.gates.size() + r.clean_logits.size() + r.noisy_logits.size() +
                                         r.raw_noise.size() + r.noise_scale.size() + r.noise.size()) *
                                        sizeof(Scalar));
  }
  add_rate_counters(state, 3 * expert_forward_flops(c), c.tokens, threads);
  state.counters["workspace_bytes"] = static_cast<double>(workspace.bytes());
  state.counters["backward_workspace_bytes"] = static_cast<double>(backward_workspace.bytes());
  state.counters["cache_bytes"] = cache_bytes;
  state.counters["routing_bytes"] = routing_bytes;
  // Issue 5's bound: T·k·(d + h) scalars (+ O(T·E) for the gate, counted in routing_bytes).
  state.counters["cache_bound_bytes"] = static_cast<double>(c.tokens * c.k * (c.d + c.h)) * sizeof(Scalar);
}

/// The other routing paradigms at a config's sizes, with the expert FLOPs of its top-k layer:
/// expert choice with capacity factor k (E·C = T·k rows when E divides T·k: the compute of top-k
/// token choice) and hash routing with k hashes of the token ids 0 … T−1. An evaluation forward,
/// or (with `backward`) a training forward and backward, into reused results and workspaces.
template <typename ParadigmLayer, typename Forward>
void run_paradigm(benchmark::State& state, const Config& c, int threads, bool backward, const ParadigmLayer& layer,
                  const Forward& forward) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::PlannedForwardOptions options;
  options.mode = backward ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
  typename ParadigmLayer::Result result;
  typename ParadigmLayer::Workspace workspace;
  auto gradients = layer.make_gradients();
  Mat d_input;
  const auto step = [&] {
    forward(s.input, options, result, workspace);
    if (backward) layer.backward(result, s.d_output, gradients, d_input, workspace);
  };
  step();  // untimed: workspaces and results in place, as at every later step
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(result.output.data());
  }
  add_rate_counters(state, (backward ? 3 : 1) * expert_forward_flops(c), c.tokens, threads);
  state.counters["max_expert_rows"] = static_cast<double>(result.tokens_per_expert().maxCoeff());
}

void BM_ExpertChoice(benchmark::State& state, const Config& c, int threads, bool backward) {
  sparsemoe::ExpertChoiceConfig config;
  config.input_dim = c.d;
  config.hidden_dim = c.h;
  config.num_experts = c.experts;
  config.router.capacity_factor = static_cast<double>(c.k);
  config.seed = 42;
  const sparsemoe::ExpertChoiceLayer<Scalar> layer(config);
  run_paradigm(state, c, threads, backward, layer, [&](const Mat& x, const auto& options, auto& result, auto& workspace) {
    layer.forward(x, options, result, workspace);
  });
}

void BM_Hash(benchmark::State& state, const Config& c, int threads, bool backward) {
  sparsemoe::HashMoEConfig config;
  config.input_dim = c.d;
  config.hidden_dim = c.h;
  config.num_experts = c.experts;
  config.router.k = c.k;
  config.seed = 42;
  const sparsemoe::HashMoELayer<Scalar> layer(config);
  sparsemoe::IndexVector ids(c.tokens);
  for (Index t = 0; t < c.tokens; ++t) ids[t] = t;
  run_paradigm(state, c, threads, backward, layer, [&](const Mat& x, const auto& options, auto& result, auto& workspace) {
    layer.forward(x, ids, options, result, workspace);
  });
}

/// The API a newcomer calls first: forward(x, options) returning a new result (and, with
/// `backward`, backward(result, d_y, gradients) returning ∂L/∂x), which take their workspaces from
/// the layer's pool. Compared with the workspace rows above in the ratio table.
void BM_LayerSimple(benchmark::State& state, const Config& c, int threads, bool backward) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::ForwardOptions options;
  if (backward) options.mode = sparsemoe::Mode::training;
  auto gradients = s.layer->make_gradients();
  const auto step = [&] {
    const auto result = s.layer->forward(s.input, options);
    benchmark::DoNotOptimize(result.output.data());
    if (backward) {
      const Mat d_input = s.layer->backward(result, s.d_output, gradients);
      benchmark::DoNotOptimize(d_input.data());
    }
  };
  step();  // as in the rows above: one untimed call first
  for (auto _ : state) step();
  add_rate_counters(state, (backward ? 3 : 1) * expert_forward_flops(c), c.tokens, threads);
  state.counters["pooled_workspace_bytes"] = static_cast<double>(s.layer->pooled_workspace_bytes());
}

// ---------------------------------------------------------------------------------------------
// Stages alone, at A: the forward stages (route, group, expert compute, combine) and the backward
// stages (combine backward, expert backward, group backward, route backward), each timed on
// inputs prepared outside its loop, with the roofline counters of add_roofline_counters. Next to
// each row: its FLOP and byte models, in T tokens, widths d and h, E experts, k per token, P the
// bytes of the parameters of the used experts (those with at least one row), p the
// pre-activation width (h for ReLU experts); a scalar is 4 bytes, an index 8.

/// A config's sizes as doubles, for the FLOP and byte models of the stage rows.
struct Sizes {
  double T, d, h, E, k;
  explicit Sizes(const Config& c)
      : T(static_cast<double>(c.tokens)),
        d(static_cast<double>(c.d)),
        h(static_cast<double>(c.h)),
        E(static_cast<double>(c.experts)),
        k(static_cast<double>(c.k)) {}
};

/// Route, any router: 2·T·d·E flops (the logits). Bytes: reads x (T·d) and the router's weight
/// (d·E); writes the `kept` T×E arrays the router keeps for backward, the gates (T·k) and the
/// expert ids (T·k indices).
double route_bytes(const Sizes& z, double kept) {
  return scalar_bytes(z.T * z.d + z.d * z.E + kept * z.T * z.E + z.T * z.k) + index_bytes(z.T * z.k);
}

/// The layer's route stage (NoisyTopKGate, evaluation: no noise): route_bytes with the logits.
void BM_Gate(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::Routing<Scalar> routing;
  for (auto _ : state) {
    s.layer->route(s.input, sparsemoe::ForwardOptions{}, routing);
    benchmark::DoNotOptimize(routing.gates.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(c.tokens), benchmark::Counter::kIsIterationInvariantRate);
  const Sizes z(c);
  add_roofline_counters(state, 2 * z.T * z.d * z.E, route_bytes(z, 1), threads);
}

/// One top-k router of router.hpp routing config c's batch in training mode (its random parts
/// on), for its share of a forward at c: softmax (renormalised), sigmoid with groups (DeepSeek-V3
/// style), Switch with input jitter, GShard. An alternative to the layer's gate, not a phase of
/// the layer's step. Bytes: route_bytes with the logits and the scores (Switch's jittered input is
/// not counted: a fused kernel need not keep it).
template <typename RouterT>
void BM_Router(benchmark::State& state, const Config& c, int threads, RouterT router) {
  set_threads(threads);
  Setup& s = setup_for(c);
  router.initialize_uniform(7);
  sparsemoe::TopKRouting<Scalar> routing;
  sparsemoe::RouteOptions options;
  options.mode = sparsemoe::Mode::training;
  options.step = 1;
  for (auto _ : state) {
    router.route(s.input, options, routing);
    benchmark::DoNotOptimize(routing.gates.data());
  }
  const Sizes z(c);
  add_roofline_counters(state, 2 * z.T * z.d * z.E, route_bytes(z, 2), threads);
}

/// Group (the dispatch plan, then the grouped rows): no flops. Bytes: reads the expert ids (T·k
/// indices) and x (T·d: each token once, although it is copied k times); writes the plan's three
/// row maps (3·T·k indices) and the grouped rows (T·k·d).
void BM_Group(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::Routing<Scalar> routing;
  s.layer->route(s.input, sparsemoe::ForwardOptions{}, routing);
  sparsemoe::DispatchPlan plan;
  Mat grouped;
  for (auto _ : state) {
    sparsemoe::build_dispatch_plan(routing.expert_ids, c.experts, plan);
    Layer::group(s.input, plan, grouped);
    benchmark::DoNotOptimize(grouped.data());
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(c.tokens), benchmark::Counter::kIsIterationInvariantRate);
  const Sizes z(c);
  add_roofline_counters(state, 0, scalar_bytes(z.T * z.d + z.T * z.k * z.d) + index_bytes(4 * z.T * z.k), threads);
}

/// Combine: no flops counted (2·T·k·d multiply-adds, negligible). Bytes: reads the expert output
/// rows (T·k·d), the gates (T·k) and the row map (T·k indices); writes y (T·d).
void BM_Combine(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::Routing<Scalar> routing;
  s.layer->route(s.input, sparsemoe::ForwardOptions{}, routing);
  const auto plan = sparsemoe::build_dispatch_plan(routing.expert_ids, c.experts);
  const Mat expert_output = Mat::Constant(plan.num_rows(), c.d, Scalar(0.5));
  Mat output;
  for (auto _ : state) {
    s.layer->combine(expert_output, routing, plan, output);
    benchmark::DoNotOptimize(output.data());
  }
  const Sizes z(c);
  add_roofline_counters(state, 0, scalar_bytes(z.T * z.k * z.d + z.T * z.k + z.T * z.d) + index_bytes(z.T * z.k), threads);
}

/// Expert compute (evaluation: no pre-activations kept): 4·T·k·d·h flops. Bytes: reads P and the
/// grouped rows (T·k·d); writes the expert output rows (T·k·d). The hidden rows stay in per-thread
/// tiles and are not counted.
void BM_ExpertCompute(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::Routing<Scalar> routing;
  s.layer->route(s.input, sparsemoe::ForwardOptions{}, routing);
  const auto plan = sparsemoe::build_dispatch_plan(routing.expert_ids, c.experts);
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  Layer::group(s.input, plan, workspace.grouped_input);
  for (auto _ : state) {
    s.layer->compute_experts(plan, workspace.grouped_input, nullptr, workspace.expert_output, workspace);
    benchmark::DoNotOptimize(workspace.expert_output.data());
  }
  add_rate_counters(state, expert_forward_flops(c), c.tokens, threads);
  const Sizes z(c);
  add_roofline_counters(state, expert_forward_flops(c),
                        used_expert_bytes(*s.layer, plan) + scalar_bytes(2 * z.T * z.k * z.d), threads);
}

/// The backward stages of MoELayer, in the order backward runs them.
enum class BackwardStage { combine, experts, group, route };

/// The data of every backward stage of one training step of config c's layer, made outside the
/// timing: a training forward that keeps its cache, then the backward stages in the order
/// MoELayer::backward runs them (as tests/test_stages.cpp does), each output kept as the next
/// stage's input. Every stage has run once, so its outputs are sized and a timed call allocates
/// nothing. Gradients, and ∂x in route_backward, accumulate over the timed calls (no effect on
/// the time).
struct BackwardStages {
  Setup& s;
  Layer::Result forward;
  Mat grouped_input;     ///< the cached input grouped again, as backward does
  Mat grouped_d_output;  ///< combine_backward's ∂y rows
  Mat scaled_d_output;   ///< their copy, which the expert backward scales by the gates in place
  sparsemoe::Vector<Scalar> gate_of_row, d_gate_of_row;
  Mat d_grouped_input, d_input;
  Layer::Gradients gradients;
  sparsemoe::ExpertBankBackwardWorkspace<Scalar> experts_workspace;
  Layer::Traits::RoutingGradient routing_gradient;

  explicit BackwardStages(const Config& c) : s(setup_for(c)), gradients(s.layer->make_gradients()) {
    sparsemoe::ForwardOptions options;
    options.mode = sparsemoe::Mode::training;
    options.step = 1;
    sparsemoe::ForwardWorkspace<Scalar> workspace;
    s.layer->forward(s.input, options, forward, workspace);
    combine_backward();
    Layer::group(forward.cache.input, forward.plan, grouped_input);
    scaled_d_output = grouped_d_output;
    experts_backward();
    group_backward();
    route_backward();
  }
  /// Runs `stage` on the data the previous stage left.
  void run(BackwardStage stage) {
    switch (stage) {
      case BackwardStage::combine: return combine_backward();
      case BackwardStage::experts: return experts_backward();
      case BackwardStage::group: return group_backward();
      case BackwardStage::route: return route_backward();
    }
  }
  void combine_backward() {
    s.layer->combine_backward(s.d_output, forward.routing, forward.plan, grouped_d_output, gate_of_row);
  }
  void experts_backward() {
    s.layer->compute_experts_backward(forward.plan, grouped_input, forward.cache.pre_activations, scaled_d_output,
                                      gate_of_row, d_grouped_input, d_gate_of_row, gradients.experts,
                                      experts_workspace);
  }
  void group_backward() { Layer::group_backward(forward.plan, d_grouped_input, d_input); }
  void route_backward() {
    s.layer->route_backward(forward.cache.input, forward.routing, forward.losses, forward.plan, d_gate_of_row,
                            routing_gradient, gradients.router(), d_input);
  }
};

/// The FLOPs and bytes per call (first, second) of one backward stage at config c, with the
/// expert parameters of `b`'s routing.
std::pair<double, double> backward_stage_model(BackwardStage stage, const Config& c, const BackwardStages& b) {
  const Sizes z(c);
  switch (stage) {
    case BackwardStage::combine:
      // No flops. Bytes: reads ∂y (T·d), the gates (T·k) and the row map (T·k indices); writes the
      // ∂y rows (T·k·d) and the gate of each row (T·k).
      return {0, scalar_bytes(z.T * z.d + z.T * z.k * z.d + 2 * z.T * z.k) + index_bytes(z.T * z.k)};
    case BackwardStage::experts: {
      // 8·T·k·d·h flops (∂hidden, ∂x, ∂W1, ∂W2). Bytes: reads the grouped rows (T·k·d), the
      // pre-activations (T·k·p), the ∂y rows and writes them back scaled (2·T·k·d), the gates
      // (T·k), P, and reads and writes the used experts' gradients (2·P); writes ∂x rows (T·k·d)
      // and ∂gates (T·k). Not counted: the hidden and ∂pre rows (T·k·h and T·k·p) that the row
      // pass writes and the weight-gradient pass reads back, and the transposed weight copies (P).
      const double p = static_cast<double>(b.s.layer->expert_bank().pre_activation_width());
      const double parameters = used_expert_bytes(*b.s.layer, b.forward.plan);
      return {2 * expert_forward_flops(c),
              3 * parameters + scalar_bytes(4 * z.T * z.k * z.d + z.T * z.k * p + 2 * z.T * z.k)};
    }
    case BackwardStage::group:
      // A scatter-add: no flops counted (T·k·d adds). Bytes: reads the ∂x rows (T·k·d) and the
      // row map (T·k indices); writes ∂x (T·d).
      return {0, scalar_bytes(z.T * z.k * z.d + z.T * z.d) + index_bytes(z.T * z.k)};
    case BackwardStage::route:
      // NoisyTopKGate in training (the losses' gradient, then ∂W_g, ∂W_noise and ∂x): 8·T·d·E
      // flops. Bytes: reads x (T·d), reads and adds into ∂x (2·T·d), reads W_g and W_noise
      // (2·d·E) and reads and writes their gradients (4·d·E); reads the routing's five T×E arrays
      // (clean and noisy logits, raw noise, noise scale, noise), the gates and ∂gates (2·T·k),
      // the expert ids and the plan's token and slot of each row (3·T·k indices).
      return {8 * z.T * z.d * z.E, scalar_bytes(3 * z.T * z.d + 6 * z.d * z.E + 5 * z.T * z.E + 2 * z.T * z.k) +
                                       index_bytes(3 * z.T * z.k)};
  }
  return {0, 0};
}

/// One backward stage alone at config c (rows A/Stage/CombineBackward, ExpertsBackward,
/// GroupBackward, RouteBackward), on BackwardStages' data. The expert backward scales its ∂y rows
/// by the gates in place: they are restored from combine backward's copy before each call,
/// outside the timing.
void BM_BackwardStage(benchmark::State& state, const Config& c, int threads, BackwardStage stage) {
  set_threads(threads);
  BackwardStages b(c);
  for (auto _ : state) {
    if (stage == BackwardStage::experts) {
      state.PauseTiming();
      b.scaled_d_output = b.grouped_d_output;
      state.ResumeTiming();
    }
    b.run(stage);
    benchmark::ClobberMemory();
  }
  const auto [flops, bytes] = backward_stage_model(stage, c, b);
  add_roofline_counters(state, flops, bytes, threads);
}

/// Soft MoE (soft_moe.hpp) with the expert FLOPs of a config: S = T·k slots, n = T·k/E per expert,
/// normalised logits, the config's input and ∂L/∂y. Its FLOPs add the soft dispatch: 2·T·d·S each
/// for the logits, the slot inputs and the combine, three times the expert FLOPs' T·k·d at
/// h = 2048 and T·k = S. `backward`: forward + backward (counted as 3 forwards, as the layer rows).
void BM_SoftMoE(benchmark::State& state, const Config& c, int threads, bool backward) {
  set_threads(threads);
  Setup& s = setup_for(c);
  sparsemoe::SoftMoEConfig soft;
  soft.input_dim = c.d;
  soft.hidden_dim = c.h;
  soft.num_experts = c.experts;
  soft.slots_per_expert = c.tokens * c.k / c.experts;
  soft.normalize = true;
  soft.seed = 42;
  const sparsemoe::SoftMoELayer<Scalar> layer(soft);
  const sparsemoe::Mode mode = backward ? sparsemoe::Mode::training : sparsemoe::Mode::evaluation;
  sparsemoe::SoftMoEResult<Scalar> result;
  sparsemoe::SoftMoELayer<Scalar>::ForwardWorkspace workspace;
  sparsemoe::SoftMoELayer<Scalar>::BackwardWorkspace backward_workspace;
  auto gradients = layer.make_gradients();
  Mat d_input(c.tokens, c.d);
  const auto run = [&] {
    layer.forward(s.input, mode, result, workspace);
    if (backward) layer.backward(result, s.d_output, gradients, backward_workspace, d_input);
  };
  run();  // workspaces and JIT kernels in place, as at every step after the first
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(backward ? d_input.data() : result.output.data());
  }
  const double slots = static_cast<double>(layer.num_slots());
  const double forward_flops = 6.0 * static_cast<double>(c.tokens) * static_cast<double>(c.d) * slots +
                               4.0 * slots * static_cast<double>(c.d) * static_cast<double>(c.h);
  add_rate_counters(state, (backward ? 3.0 : 1.0) * forward_flops, c.tokens, threads);
  state.counters["expert_flops_share"] = 4.0 * slots * static_cast<double>(c.d * c.h) / forward_flops;
}

// ---------------------------------------------------------------------------------------------
// References

/// The expert FLOPs of a forward as one expert's two GEMMs over all T·k rows, in the layer's
/// tiles of 128 rows, through the same detail::gemm (same backend), weights warm, no routing.
void BM_PlainGemm(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  const Index rows = c.tokens * c.k, tile = 128;
  Mat x(rows, c.d), w1(c.d, c.h), w2(c.h, c.d), y(rows, c.d);
  sparsemoe::detail::fill_uniform(x.data(), x.size(), Scalar(1), 1, 0);
  sparsemoe::detail::fill_uniform(w1.data(), w1.size(), Scalar(0.05), 2, 0);
  sparsemoe::detail::fill_uniform(w2.data(), w2.size(), Scalar(0.05), 3, 0);
  std::vector<Mat> hidden(static_cast<std::size_t>(available_threads() + 1), Mat(tile, c.h));
  const Index tiles = (rows + tile - 1) / tile;
  for (auto _ : state) {
    const double tile_flops = 4.0 * static_cast<double>(tile * c.d * c.h);
    sparsemoe::detail::parallel_for_dynamic(tiles, tile_flops, [&](Index t) {
      const Index first = t * tile, count = std::min(tile, rows - first);
      Mat& hb = hidden[static_cast<std::size_t>(sparsemoe::detail::thread_index())];
      using sparsemoe::detail::operand;
      sparsemoe::detail::gemm(operand(x.middleRows(first, count)), operand(w1), hb.data(), hb.outerStride(),
                              Scalar(1), false);
      sparsemoe::detail::gemm(operand(hb.topRows(count)), operand(w2), y.row(first).data(), y.outerStride(),
                              Scalar(1), false);
    });
    benchmark::DoNotOptimize(y.data());
  }
  add_rate_counters(state, expert_forward_flops(c), c.tokens, threads);
}

/// The expert GEMMs of a forward and nothing else: for each expert, hidden = X_e·W1, Y_e = hidden·W2
/// through the same detail::gemm over the layer's own weights (no bias, activation, gate,
/// grouping or combine), one expert per parallel task, caches flushed before each iteration.
/// Rows per expert: the gate's routing of the config's input, or, with `even`, T·k/E each. The
/// bound of what the layer's expert stage can reach on cold weights (D: bench/NOTES.md).
void BM_ExpertGemmsCold(benchmark::State& state, const Config& c, int threads, bool even) {
  set_threads(threads);
  Setup& s = setup_for(c);
  const Layer& layer = *s.layer;
  sparsemoe::Routing<Scalar> routing;
  layer.route(s.input, sparsemoe::ForwardOptions{}, routing);
  const auto plan = sparsemoe::build_dispatch_plan(routing.expert_ids, c.experts);
  std::vector<Index> rows(static_cast<std::size_t>(c.experts));
  for (Index e = 0; e < c.experts; ++e) {
    rows[static_cast<std::size_t>(e)] = even ? c.tokens * c.k / c.experts : plan.tokens_per_expert[e];
  }
  const Index most = *std::max_element(rows.begin(), rows.end());
  std::vector<Mat> x, hidden, y;
  for (Index e = 0; e < c.experts; ++e) {
    x.emplace_back(rows[static_cast<std::size_t>(e)], c.d);
    sparsemoe::detail::fill_uniform(x.back().data(), x.back().size(), Scalar(1), 20 + static_cast<std::uint64_t>(e), 0);
    y.emplace_back(rows[static_cast<std::size_t>(e)], c.d);
  }
  hidden.assign(static_cast<std::size_t>(available_threads() + 1), Mat(most, c.h));
  double flops = 0, bytes = 0;
  for (Index e = 0; e < c.experts; ++e) {
    const Index count = rows[static_cast<std::size_t>(e)];
    if (count == 0) continue;
    flops += 4.0 * static_cast<double>(count * c.d * c.h);
    bytes += static_cast<double>(layer.expert(e).w1().size() + layer.expert(e).w2().size()) * sizeof(Scalar);
  }
  for (auto _ : state) {
    state.PauseTiming();
    flush_caches();
    state.ResumeTiming();
    sparsemoe::detail::parallel_for_dynamic(c.experts, flops / static_cast<double>(c.experts), [&](Index e) {
      const auto index = static_cast<std::size_t>(e);
      const Index count = rows[index];
      if (count == 0) return;
      auto block = hidden[static_cast<std::size_t>(sparsemoe::detail::thread_index())].topRows(count);
      using sparsemoe::detail::operand;
      sparsemoe::detail::gemm(operand(x[index]), operand(layer.expert(e).w1()), block.data(), block.outerStride(),
                              Scalar(1), false);
      sparsemoe::detail::gemm(operand(block), operand(layer.expert(e).w2()), y[index].data(), y[index].outerStride(),
                              Scalar(1), false);
    });
    benchmark::DoNotOptimize(y.front().data());
  }
  add_rate_counters(state, flops, c.tokens, threads);
  add_floor_counter(state, bytes, threads);
}

/// The naive per-token loop: for each token, for each of its k experts, Eigen matrix-vector
/// products y_t += g·(relu(x_t·W1 + b1)·W2 + b2) (routing from the same gate, parallel over tokens).
void BM_NaiveTokenLoop(benchmark::State& state, const Config& c, int threads) {
  set_threads(threads);
  Setup& s = setup_for(c);
  const Layer& layer = *s.layer;
  sparsemoe::Routing<Scalar> routing;
  for (auto _ : state) {
    layer.route(s.input, sparsemoe::ForwardOptions{}, routing);
    Mat output = Mat::Zero(c.tokens, c.d);
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (Index t = 0; t < c.tokens; ++t) {
      for (Index j = 0; j < c.k; ++j) {
        const auto& expert = layer.expert(routing.expert_ids(t, j));
        Eigen::Matrix<Scalar, 1, Eigen::Dynamic> hidden =
            (s.input.row(t) * expert.w1() + expert.b1().transpose()).cwiseMax(Scalar(0));
        output.row(t) += routing.gates(t, j) * (hidden * expert.w2() + expert.b2().transpose());
      }
    }
    benchmark::DoNotOptimize(output.data());
  }
  add_rate_counters(state, expert_forward_flops(c), c.tokens, threads);
}

// ---------------------------------------------------------------------------------------------
// Registration and the ratio table

std::vector<int> thread_counts() {
  std::vector<int> counts{1};
  if (available_threads() >= 2) counts.push_back(2);
  return counts;
}

void register_all() {
  using benchmark::RegisterBenchmark;
  for (int t : thread_counts()) {
    RegisterBenchmark(("Probe/PeakFMA/threads:" + std::to_string(t)).c_str(), BM_PeakFMA, t)->UseRealTime();
  }
  for (int t : thread_counts()) {
    RegisterBenchmark(("Probe/ReadBandwidth/threads:" + std::to_string(t)).c_str(), BM_ReadBandwidth, t)->UseRealTime();
  }
  for (const Config& c : configs) {
    for (int t : thread_counts()) {
      const std::string suffix = "/threads:" + std::to_string(t);
      for (const bool packed : {false, true}) {
        const std::string kind = packed ? "/ForwardPacked" : "/Forward";
        RegisterBenchmark((std::string(c.label) + kind + suffix).c_str(), BM_LayerForward, c, t, false, packed)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
        if (std::string(c.label) == "D" || std::string(c.label) == "Decode") {
          RegisterBenchmark((std::string(c.label) + kind + "Cold" + suffix).c_str(), BM_LayerForward, c, t, true, packed)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
      if (std::string(c.label) == "D" || std::string(c.label) == "Decode") {
        // bf16 expert weights (fp32 activations), next to the fp32 rows of the same run.
        for (const bool cold : {false, true}) {
          RegisterBenchmark((std::string(c.label) + (cold ? "/ForwardBf16Cold" : "/ForwardBf16") + suffix).c_str(),
                            BM_LayerForwardBf16, c, t, cold)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
      RegisterBenchmark((std::string(c.label) + "/ForwardBackward" + suffix).c_str(), BM_LayerForwardBackward, c, t)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
  const int all_threads = available_threads() >= 2 ? 2 : 1;
  for (const char* label : {"A", "DeepSeek", "Qwen3"}) {
    const Config& c = config_named(label);
    const std::string suffix = "/threads:" + std::to_string(all_threads);
    if (std::string(label) != "A") {
      RegisterBenchmark((std::string(label) + "/Forward" + suffix).c_str(), BM_LayerForward, c, all_threads, false, false)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      RegisterBenchmark((std::string(label) + "/ForwardPacked" + suffix).c_str(), BM_LayerForward, c, all_threads, false,
                        true)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      RegisterBenchmark((std::string(label) + "/ForwardBackward" + suffix).c_str(), BM_LayerForwardBackward, c,
                        all_threads)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    if (std::string(label) == "A") {
      RegisterBenchmark(("A/SoftMoE/Forward" + suffix).c_str(), BM_SoftMoE, c, all_threads, false)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      RegisterBenchmark(("A/SoftMoE/ForwardBackward" + suffix).c_str(), BM_SoftMoE, c, all_threads, true)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    RegisterBenchmark((std::string(label) + "/ForwardSimple" + suffix).c_str(), BM_LayerSimple, c, all_threads, false)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark((std::string(label) + "/ForwardBackwardSimple" + suffix).c_str(), BM_LayerSimple, c, all_threads,
                      true)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  const Config& a = config_named("A");
  for (int t : thread_counts()) {
    const std::string suffix = "/threads:" + std::to_string(t);
    RegisterBenchmark(("A/Stage/Gate" + suffix).c_str(), BM_Gate, a, t)->UseRealTime()->Unit(benchmark::kMillisecond);
    sparsemoe::SoftmaxTopKRouterOptions softmax;
    softmax.k = a.k;
    softmax.normalize_top_k = true;
    sparsemoe::SigmoidTopKRouterOptions sigmoid;
    sigmoid.k = a.k;
    sigmoid.num_groups = 4;
    sigmoid.top_groups = 2;
    sigmoid.scale = 2.5;
    sparsemoe::SwitchRouterOptions switch_options;
    switch_options.jitter_epsilon = 0.01;
    RegisterBenchmark(("A/Stage/Router/SoftmaxTopK" + suffix).c_str(), BM_Router<sparsemoe::SoftmaxTopKRouter<Scalar>>, a,
                      t, sparsemoe::SoftmaxTopKRouter<Scalar>(a.d, a.experts, softmax))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("A/Stage/Router/SigmoidTopK" + suffix).c_str(), BM_Router<sparsemoe::SigmoidTopKRouter<Scalar>>, a,
                      t, sparsemoe::SigmoidTopKRouter<Scalar>(a.d, a.experts, sigmoid))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("A/Stage/Router/Switch" + suffix).c_str(), BM_Router<sparsemoe::SwitchRouter<Scalar>>, a, t,
                      sparsemoe::SwitchRouter<Scalar>(a.d, a.experts, switch_options))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("A/Stage/Router/GShard" + suffix).c_str(), BM_Router<sparsemoe::GShardRouter<Scalar>>, a, t,
                      sparsemoe::GShardRouter<Scalar>(a.d, a.experts, sparsemoe::GShardRouterOptions{}))
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (const bool backward : {false, true}) {
      const std::string kind = backward ? "/ForwardBackward" : "/Forward";
      RegisterBenchmark(("A/ExpertChoice" + kind + suffix).c_str(), BM_ExpertChoice, a, t, backward)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      RegisterBenchmark(("A/Hash" + kind + suffix).c_str(), BM_Hash, a, t, backward)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    RegisterBenchmark(("A/Stage/Group" + suffix).c_str(), BM_Group, a, t)->UseRealTime()->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("A/Stage/Combine" + suffix).c_str(), BM_Combine, a, t)->UseRealTime()->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("A/Stage/ExpertCompute" + suffix).c_str(), BM_ExpertCompute, a, t)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    const std::pair<const char*, BackwardStage> backward_stages[] = {{"CombineBackward", BackwardStage::combine},
                                                                     {"ExpertsBackward", BackwardStage::experts},
                                                                     {"GroupBackward", BackwardStage::group},
                                                                     {"RouteBackward", BackwardStage::route}};
    for (const auto& [name, stage] : backward_stages) {
      RegisterBenchmark(("A/Stage/" + std::string(name) + suffix).c_str(), BM_BackwardStage, a, t, stage)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    RegisterBenchmark(("A/Ref/PlainGemm" + suffix).c_str(), BM_PlainGemm, a, t)->UseRealTime()->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("C/Ref/PlainGemm" + suffix).c_str(), BM_PlainGemm, config_named("C"), t)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("D/Ref/NaiveTokenLoop" + suffix).c_str(), BM_NaiveTokenLoop, config_named("D"), t)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("D/Ref/ExpertGemmsCold" + suffix).c_str(), BM_ExpertGemmsCold, config_named("D"), t, false)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    RegisterBenchmark(("D/Ref/ExpertGemmsEvenCold" + suffix).c_str(), BM_ExpertGemmsCold, config_named("D"), t, true)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

/// Keeps every run (and prints like the console reporter).
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  struct Record {
    double seconds;      // real time per iteration
    double cpu_seconds;  // CPU time of the main thread per iteration
    std::map<std::string, double> counters;
  };
  std::map<std::string, Record> runs;
  void ReportRuns(const std::vector<Run>& reports) override {
    for (const Run& run : reports) {
      if (run.error_occurred) continue;
      // With --benchmark_repetitions=N > 1 the table uses the median of the N repetitions.
      if (run.run_type == Run::RT_Aggregate ? run.aggregate_name != "median" : run.repetitions > 1) continue;
      Record record;
      record.seconds = run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      record.cpu_seconds = run.GetAdjustedCPUTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      for (const auto& [name, counter] : run.counters) record.counters[name] = counter.value;
      std::string name = run.run_name.str();
      const std::string suffix = "/real_time";
      if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        name.resize(name.size() - suffix.size());
      }
      runs[name] = record;
    }
    ConsoleReporter::ReportRuns(reports);
  }
  const Record* find(const std::string& name) const {
    auto it = runs.find(name);
    return it == runs.end() ? nullptr : &it->second;
  }
  double counter(const std::string& name, const std::string& key) const {
    const Record* r = find(name);
    if (!r) return NAN;
    auto it = r->counters.find(key);
    return it == r->counters.end() ? NAN : it->second;
  }
  double seconds(const std::string& name) const {
    const Record* r = find(name);
    return r ? r->seconds : NAN;
  }
  double cpu_seconds(const std::string& name) const {
    const Record* r = find(name);
    return r ? r->cpu_seconds : NAN;
  }
};

struct Row {
  std::string metric;
  double measured;
  std::string target;  // as text: ">=0.85", "<=1.2", ...
  double bound;
  bool at_least;
};

void print_table(const RecordingReporter& rec, const char* tsv_path) {
  const int t2 = available_threads() >= 2 ? 2 : 1;
  const std::string T = "/threads:" + std::to_string(t2);
  auto frac = [&](const std::string& name) { return rec.counter(name, "frac_peak"); };
  std::vector<Row> rows;
  auto add = [&](std::string metric, double value, double bound, bool at_least) {
    char text[32];
    std::snprintf(text, sizeof text, "%s%.2f", at_least ? ">=" : "<=", bound);
    rows.push_back({std::move(metric), value, text, bound, at_least});
  };
  // Each forward target twice: the layer's weights as stored (training, or serving without
  // packing), and the serving path over MoELayer::pack_experts() ("packed").
  add("A_forward_frac_peak", frac("A/Forward" + T), 0.85, true);
  add("A_forward_packed_frac_peak", frac("A/ForwardPacked" + T), 0.85, true);
  add("A_fwdbwd_frac_peak", frac("A/ForwardBackward" + T), 0.80, true);
  add("B_forward_frac_peak", frac("B/Forward" + T), 0.83, true);
  add("B_forward_packed_frac_peak", frac("B/ForwardPacked" + T), 0.83, true);
  add("C_forward_frac_peak", frac("C/Forward" + T), 0.68, true);
  add("C_forward_packed_frac_peak", frac("C/ForwardPacked" + T), 0.68, true);
  add("D_forward_x_memfloor", rec.counter("D/Forward" + T, "x_floor"), 1.2, false);
  add("D_cold_x_memfloor", rec.counter("D/ForwardCold" + T, "x_floor"), 1.2, false);
  add("D_packed_x_memfloor", rec.counter("D/ForwardPacked" + T, "x_floor"), 1.2, false);
  add("D_packed_cold_x_memfloor", rec.counter("D/ForwardPackedCold" + T, "x_floor"), 1.2, false);
  add("Decode_forward_x_memfloor", rec.counter("Decode/Forward" + T, "x_floor"), 1.2, false);
  add("Decode_cold_x_memfloor", rec.counter("Decode/ForwardCold" + T, "x_floor"), 1.2, false);
  add("Decode_packed_x_memfloor", rec.counter("Decode/ForwardPacked" + T, "x_floor"), 1.2, false);
  add("Decode_packed_cold_x_memfloor", rec.counter("Decode/ForwardPackedCold" + T, "x_floor"), 1.2, false);
  // bf16 expert weights (issue 12): x of the bf16 memory floor (2 bytes per weight).
  add("D_bf16_x_bf16floor", rec.counter("D/ForwardBf16" + T, "x_floor"), 1.2, false);
  add("D_bf16_cold_x_bf16floor", rec.counter("D/ForwardBf16Cold" + T, "x_floor"), 1.2, false);
  add("Decode_bf16_x_bf16floor", rec.counter("Decode/ForwardBf16" + T, "x_floor"), 1.2, false);
  add("Decode_bf16_cold_x_bf16floor", rec.counter("Decode/ForwardBf16Cold" + T, "x_floor"), 1.2, false);
  const double overhead = (rec.seconds("A/Stage/Gate" + T) + rec.seconds("A/Stage/Group" + T) +
                           rec.seconds("A/Stage/Combine" + T)) /
                          rec.seconds("A/Forward" + T);
  add("A_overhead_gate+group+combine", overhead, 0.05, false);
  for (const char* router : {"SoftmaxTopK", "SigmoidTopK", "Switch", "GShard"}) {
    add(std::string("A_router_share_") + router,
        rec.seconds(std::string("A/Stage/Router/") + router + T) / rec.seconds("A/Forward" + T), 0.05, false);
  }
  add("A_speedup_1to2_threads", rec.seconds("A/Forward/threads:1") / rec.seconds("A/Forward" + T), 1.9, true);
  add("SkewA_over_A_forward_time", rec.seconds("SkewA/Forward" + T) / rec.seconds("A/Forward" + T), 1.1, false);
  // The simple API (forward(x, options), backward(result, d_y, gradients)) against the
  // workspace overloads of the same run: within 10 %.
  for (const char* label : {"A", "DeepSeek", "Qwen3"}) {
    const std::string l = label;
    add(l + "_simple_over_workspace_forward", rec.seconds(l + "/ForwardSimple" + T) / rec.seconds(l + "/Forward" + T),
        1.1, false);
    add(l + "_simple_over_workspace_fwdbwd",
        rec.seconds(l + "/ForwardBackwardSimple" + T) / rec.seconds(l + "/ForwardBackward" + T), 1.1, false);
  }
  add("DeepSeek_forward_frac_peak", frac("DeepSeek/Forward" + T), 0.70, true);
  add("DeepSeek_fwdbwd_frac_peak", frac("DeepSeek/ForwardBackward" + T), 0.70, true);
  const double cache_bytes = rec.counter("A/ForwardBackward" + T, "cache_bytes");
  const double bound_bytes = rec.counter("A/ForwardBackward" + T, "cache_bound_bytes");
  add("A_cache_over_Tk(d+h)", cache_bytes / bound_bytes, 1.0, false);
  // References (no target: context for the rows above).
  auto ref = [&](std::string metric, double value) { rows.push_back({std::move(metric), value, "ref", 0, true}); };
  ref("A_fwdbwd_speedup_1to2", rec.seconds("A/ForwardBackward/threads:1") / rec.seconds("A/ForwardBackward" + T));
  ref("B_fwdbwd_frac_peak", frac("B/ForwardBackward" + T));
  ref("C_fwdbwd_frac_peak", frac("C/ForwardBackward" + T));
  ref("DeepSeek_forward_packed_frac_peak", frac("DeepSeek/ForwardPacked" + T));
  ref("Qwen3_forward_frac_peak", frac("Qwen3/Forward" + T));
  ref("Qwen3_forward_packed_frac_peak", frac("Qwen3/ForwardPacked" + T));
  ref("Qwen3_fwdbwd_frac_peak", frac("Qwen3/ForwardBackward" + T));
  ref("SkewA_fwdbwd_over_A", rec.seconds("SkewA/ForwardBackward" + T) / rec.seconds("A/ForwardBackward" + T));
  ref("A_expert_compute_frac_peak", frac("A/Stage/ExpertCompute" + T));
  ref("A_plain_gemm_frac_peak", frac("A/Ref/PlainGemm" + T));
  ref("C_plain_gemm_frac_peak", frac("C/Ref/PlainGemm" + T));
  ref("D_naive_loop_frac_peak", frac("D/Ref/NaiveTokenLoop" + T));
  ref("D_forward_frac_peak", frac("D/Forward" + T));
  ref("D_forward_over_naive_loop_time", rec.seconds("D/Forward" + T) / rec.seconds("D/Ref/NaiveTokenLoop" + T));
  ref("D_expert_gemms_only_cold_x_memfloor", rec.counter("D/Ref/ExpertGemmsCold" + T, "x_floor"));
  ref("D_expert_gemms_even_rows_cold_x_memfloor", rec.counter("D/Ref/ExpertGemmsEvenCold" + T, "x_floor"));
  // bf16 weights against the fp32 rows of the same run (time ratio: below 1 is faster).
  for (const char* label : {"D", "Decode"}) {
    const std::string l = label;
    ref(l + "_bf16_over_fp32_packed_time", rec.seconds(l + "/ForwardBf16" + T) / rec.seconds(l + "/ForwardPacked" + T));
    ref(l + "_bf16_cold_over_fp32_packed_cold_time",
        rec.seconds(l + "/ForwardBf16Cold" + T) / rec.seconds(l + "/ForwardPackedCold" + T));
    ref(l + "_bf16_cold_over_fp32_cold_time", rec.seconds(l + "/ForwardBf16Cold" + T) / rec.seconds(l + "/ForwardCold" + T));
  }
  // One thread, CPU time of the main thread instead of wall time: robust to other jobs time-sharing
  // the cores (a shared machine), normalised by the FMA probe's CPU-time rate of the same run.
  const double probe_flops = rec.counter("Probe/PeakFMA/threads:1", "GFLOPs") * rec.seconds("Probe/PeakFMA/threads:1");
  const double peak_cpu = probe_flops / rec.cpu_seconds("Probe/PeakFMA/threads:1");
  auto cpu_frac = [&](const std::string& name, double flops) { return flops * 1e-9 / rec.cpu_seconds(name) / peak_cpu; };
  const Config& a = config_named("A");
  ref("1t_cpu_A_forward_frac_peak", cpu_frac("A/Forward/threads:1", expert_forward_flops(a)));
  ref("1t_cpu_A_fwdbwd_frac_peak", cpu_frac("A/ForwardBackward/threads:1", 3 * expert_forward_flops(a)));
  ref("1t_cpu_B_forward_frac_peak", cpu_frac("B/Forward/threads:1", expert_forward_flops(config_named("B"))));
  ref("1t_cpu_C_forward_frac_peak", cpu_frac("C/Forward/threads:1", expert_forward_flops(config_named("C"))));
  ref("1t_cpu_D_forward_frac_peak", cpu_frac("D/Forward/threads:1", expert_forward_flops(config_named("D"))));
  ref("1t_cpu_SkewA_forward_frac_peak", cpu_frac("SkewA/Forward/threads:1", expert_forward_flops(a)));
  ref("1t_cpu_A_plain_gemm_frac_peak", cpu_frac("A/Ref/PlainGemm/threads:1", expert_forward_flops(a)));
  ref("1t_cpu_A_overhead_gate+group+combine",
      (rec.cpu_seconds("A/Stage/Gate/threads:1") + rec.cpu_seconds("A/Stage/Group/threads:1") +
       rec.cpu_seconds("A/Stage/Combine/threads:1")) / rec.cpu_seconds("A/Forward/threads:1"));
  ref("1t_cpu_peak_GFLOPs", peak_cpu);
  ref("peak_GFLOPs_1thread", machine.peak[1]);
  ref("peak_GFLOPs_" + std::to_string(t2) + "threads", machine.peak[t2]);
  ref("read_GBps_1thread", machine.bandwidth[1]);
  ref("read_GBps_" + std::to_string(t2) + "threads", machine.bandwidth[t2]);

  std::printf("\nsparsemoe ratio table (backend: %s, float, %d threads unless stated)\n", backend_name, t2);
  std::printf("%-34s %10s %8s %s\n", "metric", "measured", "target", "status");
  for (const Row& r : rows) {
    std::string status;
    if (r.target == "ref") {
      status = "-";
    } else if (std::isnan(r.measured)) {
      status = "n/a";
    } else {
      const bool met = r.at_least ? r.measured >= r.bound : r.measured <= r.bound;
      if (met) {
        status = "met";
      } else {
        char text[64];
        std::snprintf(text, sizeof text, "MISSED by %.1f%%",
                      100.0 * (r.at_least ? (r.bound - r.measured) / r.bound : (r.measured - r.bound) / r.bound));
        status = text;
      }
    }
    std::printf("%-34s %10.3f %8s %s\n", r.metric.c_str(), r.measured, r.target.c_str(), status.c_str());
  }
  if (tsv_path) {
    std::ofstream out(tsv_path);
    out << "# backend=" << backend_name << "\n";
    out << "metric\tmeasured\ttarget\n";
    for (const Row& r : rows) out << r.metric << '\t' << r.measured << '\t' << r.target << '\n';
    out << "# per-benchmark: name\treal_s_per_iter\tGFLOPs\tfrac_peak\tcpu_s_per_iter (main thread)\n";
    for (const auto& entry : rec.runs) {
      const std::string& name = entry.first;
      const RecordingReporter::Record& record = entry.second;
      auto get = [&record](const char* key) {
        auto it = record.counters.find(key);
        return it == record.counters.end() ? NAN : it->second;
      };
      out << "run\t" << name << '\t' << record.seconds << '\t' << get("GFLOPs") << '\t' << get("frac_peak") << '\t'
          << record.cpu_seconds << '\n';
    }
  }
}

/// The per-phase section of issue 16: each stage row of config A at `threads` threads against
/// its roofline bound (bench/NOTES.md gives the byte models), and its share of A's forward and
/// forward+backward rows of the same run. The routers of router.hpp follow as alternatives to
/// the gate, outside the sums.
void print_phase_table(const RecordingReporter& rec, int threads) {
  const std::string T = "/threads:" + std::to_string(threads);
  const double forward = rec.seconds("A/Forward" + T), step = rec.seconds("A/ForwardBackward" + T);
  enum class Kind { forward, backward, alternative };
  const std::pair<const char*, Kind> phases[] = {
      {"Gate", Kind::forward},           {"Group", Kind::forward},
      {"ExpertCompute", Kind::forward},  {"Combine", Kind::forward},
      {"CombineBackward", Kind::backward}, {"ExpertsBackward", Kind::backward},
      {"GroupBackward", Kind::backward}, {"RouteBackward", Kind::backward},
      {"Router/SoftmaxTopK", Kind::alternative}, {"Router/SigmoidTopK", Kind::alternative},
      {"Router/Switch", Kind::alternative},      {"Router/GShard", Kind::alternative}};
  auto cell = [](double value, const char* format) {
    char text[32];
    if (std::isnan(value)) return std::string("-");
    std::snprintf(text, sizeof text, format, value);
    return std::string(text);
  };
  const Config& a = config_named("A");
  std::printf("\nsparsemoe per-phase roofline, config A (T=%ld d=%ld h=%ld E=%ld k=%ld), %d threads: FMA peak %.1f GFLOP/s, "
              "read bandwidth %.1f GB/s\n",
              static_cast<long>(a.tokens), static_cast<long>(a.d), static_cast<long>(a.h), static_cast<long>(a.experts),
              static_cast<long>(a.k), threads, peak_for(threads), bandwidth_for(threads));
  // One line of the table: the phase's name left-aligned, then the columns right-aligned.
  auto line = [](const std::array<std::string, 10>& columns) {
    constexpr int widths[10] = {20, 9, 9, 8, 9, 9, 7, 10, 8, 10};
    std::printf("%-*s", widths[0], columns[0].c_str());
    for (std::size_t i = 1; i < columns.size(); ++i) std::printf(" %*s", widths[i], columns[i].c_str());
    std::printf("\n");
  };
  line({"phase", "ms", "MB", "GB/s", "GFLOP/s", "bound ms", "bound", "x roofline", "of fwd", "of fwd+bwd"});
  double forward_sum = 0, step_sum = 0;
  for (const auto& [phase, kind] : phases) {
    const std::string name = std::string("A/Stage/") + phase + T;
    const double seconds = rec.seconds(name);
    if (kind != Kind::alternative) step_sum += seconds;
    if (kind == Kind::forward) forward_sum += seconds;
    // Rates and x of roofline from the row's time (the median with repetitions), not from the
    // medians of its rate counters: those may come from other repetitions than the median time.
    const double flops = rec.counter(name, "flops"), bytes = rec.counter(name, "bytes");
    const double bound_ms = rec.counter(name, "bound_ms");
    const bool compute_bound = flops / peak_for(threads) > bytes / bandwidth_for(threads);
    line({phase, cell(seconds * 1e3, "%.3f"), cell(bytes * 1e-6, "%.1f"), cell(bytes / seconds * 1e-9, "%.1f"),
          cell(flops > 0 ? flops / seconds * 1e-9 : NAN, "%.1f"), cell(bound_ms, "%.3f"),
          std::isnan(bytes) ? "-" : compute_bound ? "flops" : "bytes", cell(seconds * 1e3 / bound_ms, "%.2f"),
          cell(kind == Kind::backward ? NAN : seconds / forward, "%.3f"),
          cell(kind == Kind::alternative ? NAN : seconds / step, "%.3f")});
  }
  line({"sum forward phases", cell(forward_sum * 1e3, "%.3f"), "", "", "", "", "", "", cell(forward_sum / forward, "%.3f"),
        cell(forward_sum / step, "%.3f")});
  line({"sum all phases", cell(step_sum * 1e3, "%.3f"), "", "", "", "", "", "", "-", cell(step_sum / step, "%.3f")});
  line({"A/Forward", cell(forward * 1e3, "%.3f"), "", "", "", "", "", "", cell(forward / forward, "%.3f"),
        cell(forward / step, "%.3f")});
  line({"A/ForwardBackward", cell(step * 1e3, "%.3f"), "", "", "", "", "", "", "-", cell(step / step, "%.3f")});
}

}  // namespace

int main(int argc, char** argv) {
  const char* tsv_path = nullptr;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--ratio_table=", 14) == 0) {
      tsv_path = argv[i] + 14;
    } else {
      args.push_back(argv[i]);
    }
  }
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  // The probes first: every fraction of peak and memory floor below uses them.
  for (int t : thread_counts()) {
    machine.peak[t] = measure_peak(t);
    machine.bandwidth[t] = measure_bandwidth(t);
  }
  if (available_threads() < 2) {
    machine.peak[2] = machine.peak[1];
    machine.bandwidth[2] = machine.bandwidth[1];
  }
  char text[128];
  std::snprintf(text, sizeof text, "1 thread %.1f GFLOP/s, 2 threads %.1f GFLOP/s", machine.peak[1], machine.peak[2]);
  benchmark::AddCustomContext("fma_peak", text);
  std::snprintf(text, sizeof text, "1 thread %.1f GB/s, 2 threads %.1f GB/s", machine.bandwidth[1], machine.bandwidth[2]);
  benchmark::AddCustomContext("read_bandwidth", text);
  benchmark::AddCustomContext("sparsemoe_backend", backend_name);
  std::fprintf(stderr, "probes: FMA peak %.1f / %.1f GFLOP/s, read bandwidth %.1f / %.1f GB/s (1 / 2 threads); backend %s\n",
               machine.peak[1], machine.peak[2], machine.bandwidth[1], machine.bandwidth[2], backend_name);
  register_all();
  RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_table(reporter, tsv_path);
  print_phase_table(reporter, available_threads() >= 2 ? 2 : 1);
  benchmark::Shutdown();
  return 0;
}
