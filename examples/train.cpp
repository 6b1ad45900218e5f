// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// Trains one sparsely-gated MoE layer with Adam on a synthetic regression task where
// specialisation pays off: inputs come from C = 8 Gaussian clusters, and each cluster's target is
// a different random nonlinear map tanh(x·A_c)·B_c. A gate that sends each cluster to "its"
// experts lets every expert learn one map (a dense layer of the same compute per token,
// --experts 1 --k 1 --hidden 128, ends about three times worse). The auxiliary losses
// (w_importance, w_load) balance the load over the experts; Shazeer et al. 2017 (section 4)
// report that without them the gate collapses onto a few experts. Here, at the defaults, the load
// without them becomes uneven (CV² about 0.07 instead of 0.01) but does not collapse; with
// --experts 16, seven of the sixteen experts fall to 0.4-1.5% of the rows each (CV² 0.64 instead
// of 0.02) and the final loss is 1.5 times that with the auxiliary losses.
//
// The gate starts at W_g = W_noise = 0, as the layer initialises it (the paper's choice);
// --gate-init uniform starts it at small random values instead.
//
// --router picks the layer's router; every router trains on the same task, from the same seeds:
//   noisy-top-k     the layer's default, NoisyTopKGate (Shazeer et al. 2017) with the CV²
//                   importance and load losses (--w-importance, --w-load)
//   softmax-top-k   SoftmaxTopKRouter with renormalised top-k gates (Mixtral)
//   switch          SwitchRouter: top-1 of a softmax (Switch Transformer); k = 1
//   gshard          GShardRouter: top-2, the second expert dispatched with probability
//                   min(1, 2·g₂) in training; k = 2; its balance loss counts first choices only
//   sigmoid-bias    SigmoidTopKRouter (DeepSeek-V3): sigmoid scores, renormalised top-k gates,
//                   and a selection bias that update_selection_bias moves by γ (--bias-rate)
//                   after every step instead of a balance loss
// softmax-top-k, switch and gshard train with the Switch/GShard balance loss (α = 0.01,
// --w-balance) and the router z-loss (1e-3, --w-z); sigmoid-bias with neither by default, as
// DeepSeek-V3 balances by the bias alone. The four top-k routers start from small random weights
// (--gate-init uniform). --capacity-factor caps the rows of each expert (ForwardOptions::capacity;
// dropless by default).
//
// --router also takes the layers that do not route by token-choice top-k, on the same task, seeds
// and optimizer, each at the expert FLOPs of k = 2 by default:
//   expert-choice   ExpertChoiceLayer (Zhou et al. 2022): each expert takes its C = ⌈(T/E)·f⌉
//                   best tokens, f = --capacity-factor [2]; tokens no expert took are "unrouted"
//   hash            HashMoELayer (Roller et al. 2021), --k hashes [2] of the token id, which here
//                   is the token's cluster (the id that decides its target map)
//   soft-moe        SoftMoELayer (Puigcerver et al. 2023), normalised, n = batch·k/E slots per
//                   expert (--k [2])
//   hierarchical    HierarchicalMoELayer (Shazeer et al. 2017, appendix B): --groups a [2] groups
//                   of E/a experts, --k-groups [1] of them per token, --k [2] experts inside each,
//                   with the appendix's importance and load losses (--w-importance, --w-load)
// They are evaluated in batches of --batch tokens (expert choice and Soft MoE mix the tokens of
// one batch) and write the same summary line; see docs/training.md.
//
//   train [--router NAME] [--steps N] [--batch N] [--experts N] [--k N] [--hidden N] [--lr X]
//         [--w-importance X] [--w-load X] [--w-balance X] [--w-z X] [--bias-rate X]
//         [--capacity-factor X] [--drop-policy position|slot|probability] [--seed N]
//         [--csv PATH] [--routing-csv PATH] [--gate-init zero|uniform] [--threads N] [--quiet]
//         [--groups N] [--k-groups N]
//
// Writes one CSV row per step: step,loss,aux_loss,load_0..load_{E-1} (load = tokens routed to
// each expert at that step). Plot it with scripts/plot-training. --routing-csv adds a second log
// of the dispatch telemetry (RoutingStats) per step: step,capacity,router_dropped,
// capacity_dropped,max_rows,mean_rows,rows_0..rows_{E-1},dropped_0..dropped_{E-1} (rows after
// capacity, dropped = slots the capacity refused, per expert); scripts/plot-routing draws it.
// The summary ends with one line "summary: router=NAME key=value ..." that scripts/compare-routers
// reads.

#include <sparsemoe/sparsemoe.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_WIN32)
#include <io.h>
#define SPARSEMOE_EXAMPLE_ISATTY() (_isatty(_fileno(stdout)) != 0)
#else
#include <unistd.h>
#define SPARSEMOE_EXAMPLE_ISATTY() (isatty(STDOUT_FILENO) != 0)
#endif

namespace {

using sparsemoe::Index;
using Scalar = float;
using Matrix = sparsemoe::Matrix<Scalar>;

constexpr Index input_dim = 32;        // d
constexpr Index clusters = 8;          // C
constexpr Index map_width = 32;        // width m of each cluster's map tanh(x·A_c)·B_c
constexpr double cluster_spread = 0.5; // per-coordinate standard deviation inside a cluster

/// The routers --router chooses from, in the order of router_names.
enum class RouterChoice {
  noisy_top_k,
  softmax_top_k,
  switch_top_1,
  gshard_top_2,
  sigmoid_bias,
  expert_choice,
  hash,
  soft_moe,
  hierarchical
};

/// --router's names, indexed by RouterChoice.
constexpr const char* router_names[] = {"noisy-top-k", "softmax-top-k", "switch",       "gshard",      "sigmoid-bias",
                                        "expert-choice", "hash",          "soft-moe", "hierarchical"};

const char* router_name(RouterChoice router) { return router_names[static_cast<int>(router)]; }

/// "noisy-top-k, softmax-top-k, ...": the valid --router values.
std::string router_list() {
  std::string list;
  for (const char* name : router_names) list += (list.empty() ? "" : ", ") + std::string(name);
  return list;
}

RouterChoice parse_router(const std::string& text) {
  for (int i = 0; i < static_cast<int>(std::size(router_names)); ++i) {
    if (text == router_names[i]) return static_cast<RouterChoice>(i);
  }
  throw std::invalid_argument("unknown router '" + text + "'; valid routers: " + router_list());
}

struct Options {
  RouterChoice router = RouterChoice::noisy_top_k;
  Index steps = 3000;
  Index batch = 256;
  Index experts = 8;
  std::optional<Index> k;  ///< unset: 2, or the router's own k (switch: 1)
  Index hidden = 64;
  double learning_rate = 3e-3;
  double importance_weight = 0.1;
  double load_weight = 0.1;
  std::optional<double> balance_weight;  ///< unset: 0.01, or 0 for sigmoid-bias
  std::optional<double> z_weight;        ///< unset: 1e-3, or 0 for sigmoid-bias
  std::optional<double> bias_rate;       ///< γ of update_selection_bias; unset: selection_bias_rate()
  double capacity_factor = 0;            ///< 0: dropless (expert-choice: f = 2)
  sparsemoe::DropPolicy drop_policy = sparsemoe::DropPolicy::by_position;
  std::uint64_t seed = 1;
  std::string csv = "training.csv";
  std::string routing_csv;  ///< empty: no routing log
  bool quiet = false;
  std::optional<bool> uniform_gate;  ///< unset: zero for noisy-top-k, uniform for the others
  Index threads = 0;                 ///< OpenMP threads; 0 = OpenMP's default (OMP_NUM_THREADS or all cores)
  std::optional<Index> groups;       ///< hierarchical: groups a; unset: 2
  std::optional<Index> k_groups;     ///< hierarchical: groups per token; unset: 1

  /// Whether the router is one of MoELayer's (the first five), not another layer.
  bool moe_layer() const { return static_cast<int>(router) <= static_cast<int>(RouterChoice::sigmoid_bias); }
  /// Whether the layer has noisy top-k gates with the CV² losses (noisy-top-k, hierarchical).
  bool noisy_gates() const { return noisy() || router == RouterChoice::hierarchical; }
  /// expert-choice: the capacity factor f of C = ⌈(T/E)·f⌉.
  double expert_choice_factor() const { return capacity_factor > 0 ? capacity_factor : 2.0; }
  bool noisy() const { return router == RouterChoice::noisy_top_k; }
  Index experts_per_token() const { return k.value_or(router == RouterChoice::switch_top_1 ? 1 : 2); }
  double balance_loss_weight() const {
    return balance_weight.value_or(noisy() || router == RouterChoice::sigmoid_bias ? 0.0 : 0.01);
  }
  double z_loss_weight() const {
    return z_weight.value_or(noisy() || router == RouterChoice::sigmoid_bias ? 0.0 : 1e-3);
  }
  bool uniform_gate_init() const { return uniform_gate.value_or(!noisy_gates()); }
  /// γ: DeepSeek-V3 takes 1e-3 per step over batches of millions of tokens; on 256 tokens that
  /// makes the bias chase the batch's noise (final load CV² 0.054 here, 0.25 with 1e-2), 1e-4
  /// balances (0.015).
  double selection_bias_rate() const { return bias_rate.value_or(1e-4); }
};

void print_usage(std::ostream& out, const char* program) {
  const Options defaults;
  out << "Usage: " << program << " [options]\n"
      << "Trains one MoE layer (d = " << input_dim << ", ReLU experts, float) with Adam on MSE over a\n"
      << "synthetic task: " << clusters << " Gaussian input clusters, each with its own random nonlinear\n"
      << "target map tanh(x*A_c)*B_c, fresh samples every step.\n\n"
      << "Options (defaults in brackets):\n"
      << "  --router NAME      the layer's router [" << router_name(defaults.router) << "]:\n"
      << "                     noisy-top-k    noisy top-k gate with CV^2 losses (Shazeer et al. 2017)\n"
      << "                     softmax-top-k  renormalised top-k of a softmax (Mixtral)\n"
      << "                     switch         top-1 of a softmax (Switch Transformer), k = 1\n"
      << "                     gshard         top-2, random second expert (GShard), k = 2\n"
      << "                     sigmoid-bias   sigmoid top-k with an aux-loss-free selection bias\n"
      << "                                    (DeepSeek-V3)\n"
      << "                     expert-choice  each expert takes its C best tokens (Zhou et al. 2022)\n"
      << "                     hash           k experts by a hash of the token id, here its cluster\n"
      << "                                    (Roller et al. 2021)\n"
      << "                     soft-moe       soft mixtures of all tokens in batch*k/E slots per expert\n"
      << "                                    (Soft MoE, Puigcerver et al. 2023)\n"
      << "                     hierarchical   a primary noisy gate over groups, a secondary one in\n"
      << "                                    each (Shazeer et al. 2017, appendix B)\n"
      << "  --steps N          training steps [" << defaults.steps << "]\n"
      << "  --batch N          tokens per step [" << defaults.batch << "]\n"
      << "  --experts N        experts E [" << defaults.experts << "]\n"
      << "  --k N              experts per token, 1 <= k <= E [2; switch: 1]; soft-moe: slots as for\n"
      << "                     k; hierarchical: experts inside each chosen group\n"
      << "  --hidden N         hidden width h of each expert [" << defaults.hidden << "]\n"
      << "  --lr X             Adam learning rate [" << defaults.learning_rate << "]\n"
      << "  --w-importance X   noisy-top-k, hierarchical: weight of the importance loss ["
      << defaults.importance_weight << "]\n"
      << "  --w-load X         noisy-top-k, hierarchical: weight of the load loss [" << defaults.load_weight << "]\n"
      << "  --w-balance X      top-k routers: weight alpha of the balance loss alpha*E*sum_i f_i*P_i\n"
      << "                     [0.01; sigmoid-bias: 0]\n"
      << "  --w-z X            top-k routers: weight of the router z-loss [0.001; sigmoid-bias: 0]\n"
      << "  --bias-rate X      sigmoid-bias: update rate gamma of the selection bias [0.0001]\n"
      << "  --capacity-factor X  cap each expert at ceil(X*T*k/E) rows, dropping the rest; 0 = dropless [0];\n"
      << "                     expert-choice: each expert takes ceil(T/E*X) tokens [2]\n"
      << "  --drop-policy position|slot|probability  which slots a full expert keeps: first come\n"
      << "                     (token order), first choices first, or the largest gates [position]\n"
      << "  --seed N           seed of the task, the initial weights and the gate noise [" << defaults.seed
      << "]\n"
      << "  --csv PATH         per-step log: step,loss,aux_loss,load_0..load_{E-1} [" << defaults.csv << "]\n"
      << "  --routing-csv PATH per-step routing log (capacity, drops, rows per expert), for\n"
      << "                     scripts/plot-routing [none]\n"
      << "  --gate-init zero|uniform  the router's weights start at zero (the paper's choice) or at\n"
      << "                     U(-1/sqrt(d), 1/sqrt(d)) [zero; the top-k routers: uniform]\n"
      << "  --threads N        OpenMP threads, 0 = OpenMP's default [0]; at this size the layer's\n"
      << "                     parallel regions hold little work, and on a busy machine one thread\n"
      << "                     (or OMP_WAIT_POLICY=passive) is much faster\n"
      << "  --quiet            no progress output (the summary is still printed)\n"
      << "  --groups N         hierarchical: groups of E/N experts [2]\n"
      << "  --k-groups N       hierarchical: groups per token [1]\n"
      << "  --help             this text\n\n"
      << "Try --w-importance 0 --w-load 0 to train without the auxiliary losses, and\n"
      << "--experts 1 --k 1 --hidden 128 for a dense layer of the same compute per token.\n";
}

Index parse_index(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size()) throw std::invalid_argument(flag + " needs an integer, got '" + text + "'");
  return static_cast<Index>(value);
}

double parse_double(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size()) throw std::invalid_argument(flag + " needs a number, got '" + text + "'");
  return value;
}

/// Throws unless `flag` (given on the command line) applies to the chosen router.
void require_router_option(const Options& options, bool given, const char* flag, bool applies, const char* routers) {
  if (given && !applies) {
    throw std::invalid_argument(std::string(flag) + " applies to " + routers + " only, not to --router " +
                                router_name(options.router));
  }
}

/// Parses argv; returns false when the program should stop (after --help).
bool parse_options(int argc, char** argv, Options& options) {
  bool importance_given = false;
  bool load_given = false;
  bool capacity_given = false;
  bool drop_policy_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    bool has_value = false;
    const std::size_t equals = flag.find('=');
    if (flag.rfind("--", 0) == 0 && equals != std::string::npos) {
      value = flag.substr(equals + 1);
      flag = flag.substr(0, equals);
      has_value = true;
    }
    if (flag == "--help" || flag == "-h") {
      print_usage(std::cout, argv[0]);
      return false;
    }
    if (flag == "--quiet") {
      options.quiet = true;
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) throw std::invalid_argument("unknown option or missing value: " + flag);
      value = argv[++i];
    }
    if (flag == "--router") {
      options.router = parse_router(value);
    } else if (flag == "--steps") {
      options.steps = parse_index(flag, value);
    } else if (flag == "--batch") {
      options.batch = parse_index(flag, value);
    } else if (flag == "--experts") {
      options.experts = parse_index(flag, value);
    } else if (flag == "--k") {
      options.k = parse_index(flag, value);
    } else if (flag == "--hidden") {
      options.hidden = parse_index(flag, value);
    } else if (flag == "--lr") {
      options.learning_rate = parse_double(flag, value);
    } else if (flag == "--w-importance") {
      options.importance_weight = parse_double(flag, value);
      importance_given = true;
    } else if (flag == "--w-load") {
      options.load_weight = parse_double(flag, value);
      load_given = true;
    } else if (flag == "--w-balance") {
      options.balance_weight = parse_double(flag, value);
    } else if (flag == "--w-z") {
      options.z_weight = parse_double(flag, value);
    } else if (flag == "--bias-rate") {
      options.bias_rate = parse_double(flag, value);
      if (!(*options.bias_rate >= 0)) throw std::invalid_argument("--bias-rate must be >= 0");
    } else if (flag == "--capacity-factor") {
      options.capacity_factor = parse_double(flag, value);
      capacity_given = true;
      if (!(options.capacity_factor >= 0)) throw std::invalid_argument("--capacity-factor must be >= 0 (0: dropless)");
    } else if (flag == "--drop-policy") {
      drop_policy_given = true;
      if (value == "position") {
        options.drop_policy = sparsemoe::DropPolicy::by_position;
      } else if (value == "slot") {
        options.drop_policy = sparsemoe::DropPolicy::by_slot_then_position;
      } else if (value == "probability") {
        options.drop_policy = sparsemoe::DropPolicy::by_probability;
      } else {
        throw std::invalid_argument("--drop-policy must be position, slot or probability");
      }
    } else if (flag == "--seed") {
      const Index seed = parse_index(flag, value);
      if (seed < 0) throw std::invalid_argument("--seed must be >= 0");
      options.seed = static_cast<std::uint64_t>(seed);
    } else if (flag == "--csv") {
      options.csv = value;
    } else if (flag == "--routing-csv") {
      options.routing_csv = value;
    } else if (flag == "--threads") {
      options.threads = parse_index(flag, value);
      if (options.threads < 0) throw std::invalid_argument("--threads must be >= 0");
    } else if (flag == "--groups") {
      options.groups = parse_index(flag, value);
    } else if (flag == "--k-groups") {
      options.k_groups = parse_index(flag, value);
    } else if (flag == "--gate-init") {
      if (value != "zero" && value != "uniform") throw std::invalid_argument("--gate-init must be zero or uniform");
      options.uniform_gate = value == "uniform";
    } else {
      throw std::invalid_argument("unknown option: " + flag);
    }
  }
  if (options.steps < 1) throw std::invalid_argument("--steps must be >= 1");
  if (options.steps > Index(0xFFFFFFFF)) throw std::invalid_argument("--steps must be < 2^32");
  if (options.batch < 1) throw std::invalid_argument("--batch must be >= 1");
  const bool top_k = options.moe_layer() && !options.noisy();
  const bool sigmoid = options.router == RouterChoice::sigmoid_bias;
  const bool hierarchical = options.router == RouterChoice::hierarchical;
  const bool expert_choice = options.router == RouterChoice::expert_choice;
  const bool gated = options.moe_layer() || hierarchical;
  require_router_option(options, importance_given, "--w-importance", options.noisy_gates(),
                        "--router noisy-top-k and hierarchical");
  require_router_option(options, load_given, "--w-load", options.noisy_gates(), "--router noisy-top-k and hierarchical");
  require_router_option(options, options.balance_weight.has_value(), "--w-balance", top_k, "the top-k routers");
  require_router_option(options, options.z_weight.has_value(), "--w-z", top_k, "the top-k routers");
  require_router_option(options, options.bias_rate.has_value(), "--bias-rate", sigmoid, "--router sigmoid-bias");
  require_router_option(options, capacity_given, "--capacity-factor", options.moe_layer() || expert_choice,
                        "MoELayer's routers and expert-choice");
  require_router_option(options, drop_policy_given, "--drop-policy", options.moe_layer(), "MoELayer's routers");
  require_router_option(options, !options.routing_csv.empty(), "--routing-csv", options.moe_layer(),
                        "MoELayer's routers");
  require_router_option(options, options.uniform_gate.has_value(), "--gate-init", gated,
                        "MoELayer's routers and hierarchical");
  require_router_option(options, options.groups.has_value(), "--groups", hierarchical, "--router hierarchical");
  require_router_option(options, options.k_groups.has_value(), "--k-groups", hierarchical, "--router hierarchical");
  if (expert_choice && options.k.has_value()) {
    throw std::invalid_argument("--router expert-choice has no --k: each expert takes C = ceil(T/E*f) tokens, "
                                "set f with --capacity-factor");
  }
  if (expert_choice && capacity_given && !(options.capacity_factor > 0)) {
    throw std::invalid_argument("--router expert-choice needs --capacity-factor > 0");
  }
  const Index fixed_k = options.router == RouterChoice::switch_top_1   ? 1
                        : options.router == RouterChoice::gshard_top_2 ? 2
                                                                       : 0;
  if (fixed_k > 0 && options.experts_per_token() != fixed_k) {
    throw std::invalid_argument(std::string("--router ") + router_name(options.router) + " sends every token to " +
                                (fixed_k == 1 ? "1 expert" : "2 experts") + ": --k must be " + std::to_string(fixed_k));
  }
  return true;
}

/// The synthetic task: C clusters with centres μ_c ~ N(0, I) in R^d; a token of cluster c is
/// x = μ_c + 0.5·N(0, I), and its target is y = tanh(x·A_c)·B_c, with A_c (d×m) and B_c (m×d)
/// fixed Gaussian matrices scaled so that every cluster's target has about unit variance.
class Task {
 public:
  /// The task is a function of `task_seed`; the samples drawn from it, of `sample_seed`.
  Task(std::uint64_t task_seed, std::uint64_t sample_seed) : engine_(sample_seed) {
    std::mt19937_64 task_engine(task_seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    centers_.resize(clusters, input_dim);
    for (Index i = 0; i < centers_.size(); ++i) centers_.data()[i] = static_cast<Scalar>(normal(task_engine));
    for (Index c = 0; c < clusters; ++c) {
      // Pre-activations x·A_c of standard deviation about 1.5 inside the cluster (so tanh bends),
      // plus the shift the cluster centre gives.
      Matrix a(input_dim, map_width);
      Matrix b(map_width, input_dim);
      const double a_scale = 1.5 / (cluster_spread * std::sqrt(static_cast<double>(input_dim)));
      for (Index i = 0; i < a.size(); ++i) a.data()[i] = static_cast<Scalar>(a_scale * normal(task_engine));
      for (Index i = 0; i < b.size(); ++i) b.data()[i] = static_cast<Scalar>(normal(task_engine));
      maps_in_.push_back(a);
      maps_out_.push_back(b);
    }
    // Scale each B_c so that the cluster's targets have unit mean square.
    for (std::size_t c = 0; c < maps_out_.size(); ++c) {
      Matrix x(512, input_dim);
      fill_cluster(x, static_cast<Index>(c), task_engine);
      const Matrix y = ((x * maps_in_[c]).array().tanh().matrix() * maps_out_[c]).eval();
      maps_out_[c] /= static_cast<Scalar>(std::sqrt(y.squaredNorm() / static_cast<double>(y.size())));
    }
  }

  /// Fills x (T×d), y (T×d) and cluster ids (T) with fresh samples, clusters uniformly at random.
  void sample(Matrix& x, Matrix& y, std::vector<Index>& cluster_of) {
    std::uniform_int_distribution<Index> pick(0, clusters - 1);
    cluster_of.resize(static_cast<std::size_t>(x.rows()));
    for (Index t = 0; t < x.rows(); ++t) cluster_of[static_cast<std::size_t>(t)] = pick(engine_);
    std::normal_distribution<double> normal(0.0, cluster_spread);
    for (Index t = 0; t < x.rows(); ++t) {
      const Index c = cluster_of[static_cast<std::size_t>(t)];
      for (Index j = 0; j < input_dim; ++j) x(t, j) = centers_(c, j) + static_cast<Scalar>(normal(engine_));
      y.row(t) = (x.row(t) * maps_in_[static_cast<std::size_t>(c)]).array().tanh().matrix() *
                 maps_out_[static_cast<std::size_t>(c)];
    }
  }

 private:
  void fill_cluster(Matrix& x, Index c, std::mt19937_64& engine) const {
    std::normal_distribution<double> normal(0.0, cluster_spread);
    for (Index t = 0; t < x.rows(); ++t) {
      for (Index j = 0; j < input_dim; ++j) x(t, j) = centers_(c, j) + static_cast<Scalar>(normal(engine));
    }
  }

  std::mt19937_64 engine_;
  Matrix centers_;
  std::vector<Matrix> maps_in_;
  std::vector<Matrix> maps_out_;
};

/// Running sums over a window of steps.
struct Window {
  double loss = 0;
  double aux_loss = 0;
  double cv_squared = 0;
  double max_over_mean_rows = 0;  ///< Σ max rows / mean rows per expert (RoutingStats)
  double router_dropped = 0;      ///< Σ slots the router did not dispatch
  double capacity_dropped = 0;    ///< Σ slots dropped by expert capacity
  std::vector<double> load;
  Index steps = 0;

  void add(double step_loss, double step_aux, const sparsemoe::IndexVector& tokens_per_expert,
           const sparsemoe::RoutingStats& stats) {
    if (load.empty()) load.assign(static_cast<std::size_t>(tokens_per_expert.size()), 0.0);
    loss += step_loss;
    aux_loss += step_aux;
    const Eigen::VectorXd counts = tokens_per_expert.cast<double>();
    cv_squared += sparsemoe::cv_squared(counts);
    for (Index e = 0; e < counts.size(); ++e) load[static_cast<std::size_t>(e)] += counts[e];
    if (stats.mean_rows_per_expert > 0) {
      max_over_mean_rows += static_cast<double>(stats.max_rows_per_expert) / stats.mean_rows_per_expert;
    }
    router_dropped += static_cast<double>(stats.router_dropped_slots);
    capacity_dropped += static_cast<double>(stats.capacity_dropped_slots);
    ++steps;
  }
  double mean_loss() const { return loss / static_cast<double>(steps); }
  double mean_aux_loss() const { return aux_loss / static_cast<double>(steps); }
  double mean_cv_squared() const { return cv_squared / static_cast<double>(steps); }
  double mean_max_over_mean_rows() const { return max_over_mean_rows / static_cast<double>(steps); }
  /// Percentages of the window's T·k slots: dropped by the router, by capacity, both.
  double router_dropped_percent(Index slots_per_step) const {
    return 100.0 * router_dropped / static_cast<double>(steps * slots_per_step);
  }
  double capacity_dropped_percent(Index slots_per_step) const {
    return 100.0 * capacity_dropped / static_cast<double>(steps * slots_per_step);
  }
  double dropped_percent(Index slots_per_step) const {
    return router_dropped_percent(slots_per_step) + capacity_dropped_percent(slots_per_step);
  }
};

/// The layer in evaluation mode (no noise) on `tokens` fresh samples: its mean squared error and,
/// for each cluster, the expert most often ranked first for its tokens, with that share.
struct Evaluation {
  double loss = 0;
  std::vector<Index> usual_expert;  ///< per cluster
  std::vector<double> usual_share;  ///< per cluster
};

template <typename Layer>
Evaluation evaluate(const Layer& layer, Task& task, Index tokens) {
  Matrix x(tokens, input_dim);
  Matrix y(tokens, input_dim);
  std::vector<Index> cluster_of;
  task.sample(x, y, cluster_of);
  const auto result = layer.forward(x);
  std::vector<std::vector<Index>> top_counts(static_cast<std::size_t>(clusters),
                                             std::vector<Index>(static_cast<std::size_t>(layer.num_experts()), 0));
  for (Index t = 0; t < tokens; ++t) {
    ++top_counts[static_cast<std::size_t>(cluster_of[static_cast<std::size_t>(t)])]
                [static_cast<std::size_t>(result.routing.expert_ids(t, 0))];
  }
  Evaluation evaluation;
  evaluation.loss = static_cast<double>(sparsemoe::mean_squared_error(result.output, y));
  for (const auto& counts : top_counts) {
    const auto usual = std::max_element(counts.begin(), counts.end());
    Index total = 0;
    for (const Index count : counts) total += count;
    evaluation.usual_expert.push_back(static_cast<Index>(usual - counts.begin()));
    evaluation.usual_share.push_back(total > 0 ? static_cast<double>(*usual) / static_cast<double>(total) : 0.0);
  }
  return evaluation;
}

void print_progress_bar(Index step, Index steps, double loss, double tokens_per_second) {
  constexpr int width = 30;
  const int filled = static_cast<int>(width * step / steps);
  std::string bar(static_cast<std::size_t>(filled), '#');
  bar.append(static_cast<std::size_t>(width - filled), '.');
  std::printf("\r[%s] step %lld/%lld  loss %.4f  %.0f tokens/s\x1b[K", bar.c_str(), static_cast<long long>(step),
              static_cast<long long>(steps), loss, tokens_per_second);
  std::fflush(stdout);
}

void print_load_table(const Window& start, const Window& end, Index batch, Index k) {
  const double per_step = static_cast<double>(batch * k);
  std::printf("  expert   tokens/step (start)  fraction   tokens/step (end)  fraction\n");
  for (std::size_t e = 0; e < start.load.size(); ++e) {
    const double first = start.load[e] / static_cast<double>(start.steps);
    const double last = end.load[e] / static_cast<double>(end.steps);
    std::printf("  %6zu   %19.1f  %8.3f   %17.1f  %8.3f\n", e, first, first / per_step, last, last / per_step);
  }
}

/// The per-step CSV log with its header: step,loss,aux_loss,load_0..load_{E-1}.
std::ofstream open_csv(const Options& options) {
  std::ofstream csv(options.csv);
  if (!csv) throw std::runtime_error("cannot write " + options.csv);
  csv << "step,loss,aux_loss";
  for (Index e = 0; e < options.experts; ++e) csv << ",load_" << e;
  csv << "\n";
  return csv;
}

/// The training and auxiliary losses of the first and last `window` steps.
void print_loss_windows(const Window& first_steps, const Window& last_steps, Index window) {
  std::printf("training loss (MSE, mean of the first / last %lld steps): %.4f -> %.4f\n",
              static_cast<long long>(window), first_steps.mean_loss(), last_steps.mean_loss());
  std::printf("auxiliary loss (same windows):                     %.4f -> %.4f\n", first_steps.mean_aux_loss(),
              last_steps.mean_aux_loss());
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

const char* drop_policy_name(sparsemoe::DropPolicy policy) {
  switch (policy) {
    case sparsemoe::DropPolicy::by_position:
      return "by position";
    case sparsemoe::DropPolicy::by_slot_then_position:
      return "first choices first";
    case sparsemoe::DropPolicy::by_probability:
      return "by probability";
  }
  return "?";
}

/// The summary's description of the router and its loss weights. For noisy-top-k without
/// capacity it is the text the example has always printed.
std::string router_settings(const Options& options) {
  std::ostringstream text;
  if (options.noisy()) {
    text << "w_importance " << options.importance_weight << ", w_load " << options.load_weight;
  } else {
    text << "router " << router_name(options.router) << ", w_balance " << options.balance_loss_weight() << ", w_z "
         << options.z_loss_weight();
    if (options.router == RouterChoice::sigmoid_bias) text << ", bias rate " << options.selection_bias_rate();
  }
  if (options.capacity_factor > 0) {
    text << ", capacity factor " << options.capacity_factor << " (" << drop_policy_name(options.drop_policy) << ")";
  }
  return text.str();
}

void write_routing_header(std::ostream& out, Index experts) {
  out << "step,capacity,router_dropped,capacity_dropped,max_rows,mean_rows";
  for (Index e = 0; e < experts; ++e) out << ",rows_" << e;
  for (Index e = 0; e < experts; ++e) out << ",dropped_" << e;
  out << '\n';
}

void write_routing_row(std::ostream& out, Index step, const sparsemoe::IndexVector& rows,
                       const sparsemoe::RoutingStats& stats) {
  out << step << ',' << stats.capacity << ',' << stats.router_dropped_slots << ',' << stats.capacity_dropped_slots
      << ',' << stats.max_rows_per_expert << ',' << stats.mean_rows_per_expert;
  for (Index e = 0; e < rows.size(); ++e) out << ',' << rows[e];
  for (Index e = 0; e < rows.size(); ++e) {
    out << ',' << (stats.capacity_dropped_per_expert.size() == rows.size() ? stats.capacity_dropped_per_expert[e] : 0);
  }
  out << '\n';
}

/// Trains `layer` (whatever its router) on the task and prints the summary.
template <typename Layer>
int train(const Options& options, Layer& layer) {
  constexpr bool selection_bias =
      std::is_same<typename Layer::RouterType, sparsemoe::SigmoidTopKRouter<Scalar>>::value;
  const Index k = layer.k();
  auto gradients = layer.make_gradients();

  sparsemoe::AdamOptions adam_options;
  adam_options.learning_rate = options.learning_rate;
  sparsemoe::Adam<Scalar> adam(adam_options);

  sparsemoe::ForwardOptions forward_options;
  forward_options.mode = sparsemoe::Mode::training;
  forward_options.importance_weight = options.importance_weight;
  forward_options.load_weight = options.load_weight;
  forward_options.balance_loss_weight = options.balance_loss_weight();
  forward_options.z_loss_weight = options.z_loss_weight();
  if (options.router == RouterChoice::gshard_top_2) {
    forward_options.balance_loss.counts = sparsemoe::BalanceCounts::first_slot;  // GShard counts first choices
  }
  // Sigmoid scores do not sum to 1 per token; DeepSeek-V3 normalises them in its balance loss.
  forward_options.balance_loss.normalize_scores = selection_bias;
  if (options.capacity_factor > 0) {
    sparsemoe::CapacityOptions capacity;
    capacity.factor = options.capacity_factor;
    capacity.policy = options.drop_policy;
    forward_options.capacity = capacity;
  }

  std::ofstream csv = open_csv(options);
  std::ofstream routing_csv;
  if (!options.routing_csv.empty()) {
    routing_csv.open(options.routing_csv);
    if (!routing_csv) throw std::runtime_error("cannot write " + options.routing_csv);
    write_routing_header(routing_csv, options.experts);
  }

  Task task(options.seed, options.seed + 1);
  Task evaluation_task(options.seed, options.seed + 2);  // same task, other samples
  const Evaluation before = evaluate(layer, evaluation_task, 4096);

  Matrix x(options.batch, input_dim);
  Matrix y(options.batch, input_dim);
  std::vector<Index> cluster_of;
  const Index window = std::min<Index>(20, options.steps);
  Window first_steps;
  Window last_steps;
  const bool terminal = SPARSEMOE_EXAMPLE_ISATTY();
  const Index report_every = std::max<Index>(1, options.steps / 20);
  const auto started = std::chrono::steady_clock::now();
  auto last_bar = started;
  double recent_loss = 0;
  double recent_aux_loss = 0;
  Index recent_steps = 0;

  // Reused from step to step: forward and backward then keep their buffers after the first step.
  typename Layer::Result result;
  sparsemoe::ForwardWorkspace<Scalar> workspace;
  typename Layer::BackwardWorkspaceType backward_workspace;
  sparsemoe::Matrix<Scalar> d_input;
  sparsemoe::IndexVector routed_per_expert;  // sigmoid-bias: the loads its bias update reads
  const auto parameters = layer.tensors();  // views, valid while the shapes stay
  const auto gradient_tensors = gradients.tensors();
  for (Index step = 0; step < options.steps; ++step) {
    task.sample(x, y, cluster_of);
    forward_options.step = static_cast<std::uint64_t>(step);
    layer.forward(x, forward_options, result, workspace);
    const double loss = static_cast<double>(sparsemoe::mean_squared_error(result.output, y));
    const double aux_loss = static_cast<double>(result.losses.total());
    gradients.set_zero();
    layer.backward(result, sparsemoe::mean_squared_error_gradient(result.output, y), gradients, d_input,
                   backward_workspace);
    adam.step(parameters, gradient_tensors);
    if constexpr (selection_bias) {
      // DeepSeek-V3's auxiliary-loss-free balancing: move each expert's selection bias by γ
      // toward the mean load, counted over the slots the router chose (before any capacity).
      sparsemoe::count_tokens_per_expert(result.routing, routed_per_expert);
      sparsemoe::update_selection_bias(layer.router().selection_bias(), routed_per_expert,
                                       options.selection_bias_rate(), false);
    }

    const auto& load = result.tokens_per_expert();
    csv << step << ',' << loss << ',' << aux_loss;
    for (Index e = 0; e < load.size(); ++e) csv << ',' << load[e];
    csv << '\n';
    if (routing_csv.is_open()) write_routing_row(routing_csv, step, load, result.stats());
    if (step < window) first_steps.add(loss, aux_loss, load, result.stats());
    if (step >= options.steps - window) last_steps.add(loss, aux_loss, load, result.stats());
    recent_loss += loss;
    recent_aux_loss += aux_loss;
    ++recent_steps;

    if (options.quiet) continue;
    const auto now = std::chrono::steady_clock::now();
    const double elapsed = std::chrono::duration<double>(now - started).count();
    const double tokens_per_second = static_cast<double>((step + 1) * options.batch) / std::max(elapsed, 1e-9);
    const bool last = step + 1 == options.steps;
    if (terminal) {
      if (last || std::chrono::duration<double>(now - last_bar).count() >= 0.1) {
        print_progress_bar(step + 1, options.steps, recent_loss / static_cast<double>(recent_steps), tokens_per_second);
        recent_loss = 0;
        recent_aux_loss = 0;
        recent_steps = 0;
        last_bar = now;
      }
      if (last) std::printf("\n");
    } else if ((step + 1) % report_every == 0 || last) {
      std::printf("step %lld/%lld  loss %.4f  aux %.4f  %.0f tokens/s\n", static_cast<long long>(step + 1),
                  static_cast<long long>(options.steps), recent_loss / static_cast<double>(recent_steps),
                  recent_aux_loss / static_cast<double>(recent_steps), tokens_per_second);
      std::fflush(stdout);
      recent_loss = 0;
      recent_aux_loss = 0;
      recent_steps = 0;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const Evaluation after = evaluate(layer, evaluation_task, 4096);
  csv.close();
  if (routing_csv.is_open()) routing_csv.close();
  if (!csv || (!options.routing_csv.empty() && !routing_csv)) throw std::runtime_error("writing a log failed");

  std::printf("\nMoE layer: d=%lld h=%lld E=%lld k=%lld, batch %lld, %lld steps, Adam lr %g, %s, seed %llu, %d thread(s)\n",
              static_cast<long long>(input_dim), static_cast<long long>(options.hidden),
              static_cast<long long>(options.experts), static_cast<long long>(k),
              static_cast<long long>(options.batch), static_cast<long long>(options.steps), options.learning_rate,
              router_settings(options).c_str(), static_cast<unsigned long long>(options.seed), thread_count());
  std::printf("time: %.1f s, %.0f tokens/s\n", seconds,
              static_cast<double>(options.steps * options.batch) / std::max(seconds, 1e-9));
  print_loss_windows(first_steps, last_steps, window);
  std::printf("held-out MSE, evaluation mode (4096 tokens):       %.4f -> %.4f\n", before.loss, after.loss);
  std::printf("load CV^2 (tokens per expert, mean over the windows): %.4f -> %.4f\n", first_steps.mean_cv_squared(),
              last_steps.mean_cv_squared());
  std::printf("cluster -> its usual top-1 expert (share of its tokens), evaluation mode, at the end:\n ");
  for (std::size_t c = 0; c < after.usual_expert.size(); ++c) {
    std::printf(" %zu->%lld (%.2f)", c, static_cast<long long>(after.usual_expert[c]), after.usual_share[c]);
  }
  std::printf("\n");
  std::printf("per-expert load (tokens per step, fraction of the batch's %lld routed rows):\n",
              static_cast<long long>(options.batch * k));
  print_load_table(first_steps, last_steps, options.batch, k);
  const Index slots = options.batch * k;
  std::printf("routing telemetry (RoutingStats, same windows):\n");
  std::printf("  max/mean rows per expert: %.3f -> %.3f\n", first_steps.mean_max_over_mean_rows(),
              last_steps.mean_max_over_mean_rows());
  std::printf("  dropped slots, %% of T*k: %.2f%% -> %.2f%% (by the router %.2f%% -> %.2f%%, by capacity %.2f%% -> "
              "%.2f%%)\n",
              first_steps.dropped_percent(slots), last_steps.dropped_percent(slots),
              first_steps.router_dropped_percent(slots), last_steps.router_dropped_percent(slots),
              first_steps.capacity_dropped_percent(slots), last_steps.capacity_dropped_percent(slots));
  const double milliseconds_per_step = 1e3 * seconds / static_cast<double>(options.steps);
  std::printf("time per step: %.2f ms\n", milliseconds_per_step);
  std::printf("summary: router=%s k=%lld final_loss=%.4f heldout_mse=%.4f load_cv2=%.4f max_mean_rows=%.3f "
              "dropped_pct=%.2f ms_per_step=%.2f\n",
              router_name(options.router), static_cast<long long>(k), last_steps.mean_loss(), after.loss,
              last_steps.mean_cv_squared(), last_steps.mean_max_over_mean_rows(), last_steps.dropped_percent(slots),
              milliseconds_per_step);
  std::printf("per-step log written to %s\n", options.csv.c_str());
  if (!options.routing_csv.empty()) std::printf("routing log written to %s\n", options.routing_csv.c_str());
  return 0;
}

/// What one training step of a layer other than MoELayer reports.
struct StepRecord {
  double loss = 0;
  double aux_loss = 0;
  sparsemoe::IndexVector load;  ///< rows each expert processed
  Index unrouted = 0;           ///< tokens no expert processed (expert choice)
};

/// How train_paradigm describes a layer other than MoELayer.
struct ParadigmDescription {
  std::string layer;     ///< the report's first line up to the sizes, e.g. "Hash MoE layer"
  std::string settings;  ///< e.g. "k 2 hashes of the cluster id"
  double k = 0;          ///< expert rows per token, E·(rows per expert)/T where that is fixed
};

/// The tokens' clusters as the ids HashMoELayer routes by.
void cluster_ids(const std::vector<Index>& cluster_of, sparsemoe::IndexVector& ids) {
  ids.resize(static_cast<Index>(cluster_of.size()));
  for (Index t = 0; t < ids.size(); ++t) ids[t] = cluster_of[static_cast<std::size_t>(t)];
}

/// Mean squared error of predict(x, ids) on max(1, 4096/batch) fresh batches of `batch` tokens
/// (expert choice and Soft MoE mix the tokens of one call, so they see batches of the training
/// size).
template <typename Predict>
double held_out_mse(const Predict& predict, Task& task, Index batch) {
  const Index batches = std::max<Index>(1, 4096 / batch);
  Matrix x(batch, input_dim);
  Matrix y(batch, input_dim);
  std::vector<Index> cluster_of;
  sparsemoe::IndexVector ids;
  double sum = 0;
  for (Index i = 0; i < batches; ++i) {
    task.sample(x, y, cluster_of);
    cluster_ids(cluster_of, ids);
    sum += static_cast<double>(sparsemoe::mean_squared_error(predict(x, ids), y));
  }
  return sum / static_cast<double>(batches);
}

/// The training loop and report of train() for a layer other than MoELayer: train_step(x, y,
/// ids, step) runs forward and backward (zeroing the gradients first) and returns a StepRecord;
/// predict(x, ids) is an evaluation-mode forward. The summary line has train()'s keys: the load
/// CV² and max/mean of the rows per expert, and as dropped_pct the unrouted tokens in % of T.
template <typename TrainStep, typename Predict>
int train_paradigm(const Options& options, const ParadigmDescription& description,
                   const std::vector<sparsemoe::TensorView<Scalar>>& parameters,
                   const std::vector<sparsemoe::TensorView<Scalar>>& gradient_tensors, const TrainStep& train_step,
                   const Predict& predict) {
  sparsemoe::AdamOptions adam_options;
  adam_options.learning_rate = options.learning_rate;
  sparsemoe::Adam<Scalar> adam(adam_options);
  std::ofstream csv = open_csv(options);

  Task task(options.seed, options.seed + 1);
  Task evaluation_task(options.seed, options.seed + 2);  // same task, other samples
  const double before = held_out_mse(predict, evaluation_task, options.batch);
  Matrix x(options.batch, input_dim);
  Matrix y(options.batch, input_dim);
  std::vector<Index> cluster_of;
  sparsemoe::IndexVector ids;
  const Index window = std::min<Index>(20, options.steps);
  const Index report_every = std::max<Index>(1, options.steps / 20);
  Window first_steps;
  Window last_steps;
  const auto started = std::chrono::steady_clock::now();
  for (Index step = 0; step < options.steps; ++step) {
    task.sample(x, y, cluster_of);
    cluster_ids(cluster_of, ids);
    const StepRecord record = train_step(x, y, ids, static_cast<std::uint64_t>(step));
    adam.step(parameters, gradient_tensors);
    csv << step << ',' << record.loss << ',' << record.aux_loss;
    for (Index e = 0; e < record.load.size(); ++e) csv << ',' << record.load[e];
    csv << '\n';
    sparsemoe::RoutingStats stats;  // the rows per expert and the unrouted tokens, for Window
    stats.max_rows_per_expert = record.load.maxCoeff();
    stats.mean_rows_per_expert = record.load.cast<double>().mean();
    stats.router_dropped_slots = record.unrouted;
    if (step < window) first_steps.add(record.loss, record.aux_loss, record.load, stats);
    if (step >= options.steps - window) last_steps.add(record.loss, record.aux_loss, record.load, stats);
    if (!options.quiet && ((step + 1) % report_every == 0 || step + 1 == options.steps)) {
      std::printf("step %lld/%lld  loss %.4f  aux %.4f\n", static_cast<long long>(step + 1),
                  static_cast<long long>(options.steps), record.loss, record.aux_loss);
      std::fflush(stdout);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const double after = held_out_mse(predict, evaluation_task, options.batch);
  csv.close();
  if (!csv) throw std::runtime_error("writing a log failed");

  std::printf("\n%s: d=%lld h=%lld E=%lld, %s, batch %lld, %lld steps, Adam lr %g, seed %llu, %d thread(s)\n",
              description.layer.c_str(), static_cast<long long>(input_dim), static_cast<long long>(options.hidden),
              static_cast<long long>(options.experts), description.settings.c_str(),
              static_cast<long long>(options.batch), static_cast<long long>(options.steps), options.learning_rate,
              static_cast<unsigned long long>(options.seed), thread_count());
  std::printf("time: %.1f s, %.0f tokens/s\n", seconds,
              static_cast<double>(options.steps * options.batch) / std::max(seconds, 1e-9));
  print_loss_windows(first_steps, last_steps, window);
  std::printf("held-out MSE, evaluation mode (batches of %lld):    %.4f -> %.4f\n",
              static_cast<long long>(options.batch), before, after);
  std::printf("load CV^2 (rows per expert, mean over the windows): %.4f -> %.4f\n", first_steps.mean_cv_squared(),
              last_steps.mean_cv_squared());
  std::printf("max/mean rows per expert: %.3f -> %.3f\n", first_steps.mean_max_over_mean_rows(),
              last_steps.mean_max_over_mean_rows());
  std::printf("unrouted tokens, %% of T: %.2f%% -> %.2f%%\n", first_steps.router_dropped_percent(options.batch),
              last_steps.router_dropped_percent(options.batch));
  const double milliseconds_per_step = 1e3 * seconds / static_cast<double>(options.steps);
  std::printf("time per step: %.2f ms\n", milliseconds_per_step);
  std::printf("summary: router=%s k=%g final_loss=%.4f heldout_mse=%.4f load_cv2=%.4f max_mean_rows=%.3f "
              "dropped_pct=%.2f ms_per_step=%.2f\n",
              router_name(options.router), description.k, last_steps.mean_loss(), after,
              last_steps.mean_cv_squared(), last_steps.mean_max_over_mean_rows(),
              last_steps.router_dropped_percent(options.batch), milliseconds_per_step);
  std::printf("per-step log written to %s\n", options.csv.c_str());
  return 0;
}

/// The mean squared error of `output` against `y`, with its gradient into `d_output`.
double mse_and_gradient(const Matrix& output, const Matrix& y, Matrix& d_output) {
  d_output = sparsemoe::mean_squared_error_gradient(output, y);
  return static_cast<double>(sparsemoe::mean_squared_error(output, y));
}

/// Tokens no expert took: expert choice counts them, hash routing has none.
Index unrouted_tokens(const sparsemoe::ExpertChoiceRouting<Scalar>& routing) { return routing.unrouted_tokens; }
Index unrouted_tokens(const sparsemoe::HashRouting<Scalar>&) { return 0; }

/// Trains `layer`, an ExpertChoiceLayer or a HashMoELayer, with train_paradigm;
/// forward(x, ids, options, result, workspace) calls the layer's forward.
template <typename Layer, typename Forward>
int train_planned(const Options& options, Layer& layer, const ParadigmDescription& description,
                  const Forward& forward) {
  auto gradients = layer.make_gradients();
  sparsemoe::PlannedForwardOptions training;
  training.mode = sparsemoe::Mode::training;
  typename Layer::Result result;
  typename Layer::Workspace workspace;
  Matrix d_output;
  Matrix d_input;
  const auto train_step = [&](const Matrix& x, const Matrix& y, const sparsemoe::IndexVector& ids, std::uint64_t) {
    forward(x, ids, training, result, workspace);
    StepRecord record;
    record.loss = mse_and_gradient(result.output, y, d_output);
    gradients.set_zero();
    layer.backward(result, d_output, gradients, d_input, workspace);
    record.load = result.tokens_per_expert();
    record.unrouted = unrouted_tokens(result.routing);
    return record;
  };
  typename Layer::Result evaluation;
  typename Layer::Workspace evaluation_workspace;
  const auto predict = [&](const Matrix& x, const sparsemoe::IndexVector& ids) {
    forward(x, ids, sparsemoe::PlannedForwardOptions{}, evaluation, evaluation_workspace);
    return evaluation.output;
  };
  return train_paradigm(options, description, layer.tensors(), gradients.tensors(), train_step, predict);
}

/// --router expert-choice: ExpertChoiceLayer with capacity factor f (--capacity-factor, 2).
int train_expert_choice(const Options& options, sparsemoe::ExpertChoiceConfig config) {
  config.router.capacity_factor = options.expert_choice_factor();
  sparsemoe::ExpertChoiceLayer<Scalar> layer(config);
  const Index capacity = layer.router().capacity(options.batch);
  ParadigmDescription description;
  description.layer = "Expert-choice layer";
  std::ostringstream settings;
  settings << "capacity factor " << config.router.capacity_factor << " (C = " << capacity << " of "
           << options.batch << " tokens)";
  description.settings = settings.str();
  description.k = static_cast<double>(options.experts * capacity) / static_cast<double>(options.batch);
  return train_planned(options, layer, description, [&](const Matrix& x, const sparsemoe::IndexVector&,
                                                        const sparsemoe::PlannedForwardOptions& forward_options,
                                                        auto& result, auto& workspace) {
    layer.forward(x, forward_options, result, workspace);
  });
}

/// --router hash: HashMoELayer with k hashes of each token's cluster id.
int train_hash(const Options& options, sparsemoe::HashMoEConfig config) {
  config.router.k = options.experts_per_token();
  config.router.seed = options.seed;
  sparsemoe::HashMoELayer<Scalar> layer(config);
  ParadigmDescription description;
  description.layer = "Hash MoE layer";
  description.settings = "k " + std::to_string(layer.k()) + " hashes of the cluster id";
  description.k = static_cast<double>(layer.k());
  return train_planned(options, layer, description, [&](const Matrix& x, const sparsemoe::IndexVector& ids,
                                                        const sparsemoe::PlannedForwardOptions& forward_options,
                                                        auto& result, auto& workspace) {
    layer.forward(x, ids, forward_options, result, workspace);
  });
}

/// --router soft-moe: SoftMoELayer, normalised, n = batch·k/E slots per expert (top-k's FLOPs).
int train_soft_moe(const Options& options, sparsemoe::SoftMoEConfig config) {
  config.slots_per_expert = std::max<Index>(1, options.batch * options.experts_per_token() / std::max<Index>(1, options.experts));
  config.normalize = true;
  sparsemoe::SoftMoELayer<Scalar> layer(config);
  auto gradients = layer.make_gradients();
  sparsemoe::SoftMoELayer<Scalar>::Result result;
  sparsemoe::SoftMoELayer<Scalar>::ForwardWorkspace workspace;
  sparsemoe::SoftMoELayer<Scalar>::BackwardWorkspace backward_workspace;
  Matrix d_output;
  Matrix d_input(options.batch, input_dim);
  const auto train_step = [&](const Matrix& x, const Matrix& y, const sparsemoe::IndexVector&, std::uint64_t) {
    layer.forward(x, sparsemoe::Mode::training, result, workspace);
    StepRecord record;
    record.loss = mse_and_gradient(result.output, y, d_output);
    gradients.set_zero();
    layer.backward(result, d_output, gradients, backward_workspace, d_input);
    record.load = sparsemoe::IndexVector::Constant(options.experts, config.slots_per_expert);
    return record;
  };
  const auto predict = [&](const Matrix& x, const sparsemoe::IndexVector&) { return layer.forward(x).output; };
  ParadigmDescription description;
  description.layer = "Soft MoE layer";
  description.settings = std::to_string(config.slots_per_expert) + " slots per expert, normalised";
  description.k = static_cast<double>(options.experts * config.slots_per_expert) / static_cast<double>(options.batch);
  return train_paradigm(options, description, layer.tensors(), gradients.tensors(), train_step, predict);
}

/// --router hierarchical: --groups groups, --k-groups of them per token, --k experts in each.
int train_hierarchical(const Options& options, sparsemoe::HierarchicalMoEConfig config) {
  config.num_groups = options.groups.value_or(2);
  config.k_groups = options.k_groups.value_or(1);
  config.k_per_group = options.experts_per_token();
  sparsemoe::HierarchicalMoELayer<Scalar> layer(config);
  if (options.uniform_gate_init()) {
    layer.primary_gate().initialize_uniform(options.seed + 3);
    for (Index i = 0; i < layer.num_groups(); ++i) {
      layer.secondary_gate(i).initialize_uniform(options.seed + 4 + static_cast<std::uint64_t>(i));
    }
  }
  auto gradients = layer.make_gradients();
  sparsemoe::HierarchicalForwardOptions forward_options;
  forward_options.mode = sparsemoe::Mode::training;
  forward_options.importance_weight = options.importance_weight;
  forward_options.load_weight = options.load_weight;
  sparsemoe::HierarchicalMoELayer<Scalar>::Result result;
  sparsemoe::HierarchicalMoELayer<Scalar>::ForwardWorkspace workspace;
  sparsemoe::HierarchicalMoELayer<Scalar>::BackwardWorkspace backward_workspace;
  Matrix d_output;
  Matrix d_input(options.batch, input_dim);
  const auto train_step = [&](const Matrix& x, const Matrix& y, const sparsemoe::IndexVector&, std::uint64_t step) {
    forward_options.step = step;
    layer.forward(x, forward_options, result, workspace);
    StepRecord record;
    record.loss = mse_and_gradient(result.output, y, d_output);
    record.aux_loss = static_cast<double>(result.losses.total());
    gradients.set_zero();
    layer.backward(result, d_output, gradients, backward_workspace, d_input);
    record.load = result.plan.tokens_per_expert;
    return record;
  };
  const auto predict = [&](const Matrix& x, const sparsemoe::IndexVector&) { return layer.forward(x).output; };
  ParadigmDescription description;
  description.layer = "Hierarchical MoE layer";
  std::ostringstream settings;
  settings << config.num_groups << " groups, " << config.k_groups << " per token, k " << config.k_per_group
           << " in each, w_importance " << options.importance_weight << ", w_load " << options.load_weight;
  description.settings = settings.str();
  description.k = static_cast<double>(config.k_groups * config.k_per_group);
  return train_paradigm(options, description, layer.tensors(), gradients.tensors(), train_step, predict);
}

/// The d, h, E and seed of a layer other than MoELayer, in its config type.
template <typename Config>
Config sizes(const Options& options) {
  Config config;
  config.input_dim = input_dim;
  config.hidden_dim = options.hidden;
  config.num_experts = options.experts;
  config.seed = options.seed;
  return config;
}

/// A layer with the top-k router `router` (built with the config's d, E and k).
template <typename Router>
int train_with(const Options& options, const sparsemoe::MoEConfig& config, Router router) {
  sparsemoe::MoELayer<Scalar, sparsemoe::Expert<Scalar, sparsemoe::Relu>, Router> layer(config, std::move(router));
  if (options.uniform_gate_init()) layer.router().initialize_uniform(options.seed + 3);
  return train(options, layer);
}

int run(const Options& options) {
#ifdef _OPENMP
  if (options.threads > 0) omp_set_num_threads(static_cast<int>(options.threads));
#endif
  sparsemoe::MoEConfig config;
  config.input_dim = input_dim;
  config.hidden_dim = options.hidden;
  config.num_experts = options.experts;
  config.k = options.experts_per_token();
  config.seed = options.seed;
  switch (options.router) {
    case RouterChoice::noisy_top_k: {
      // The gate starts at W_g = W_noise = 0, as the layer (and the paper) initialise it: every
      // expert equally likely, routing decided by the noise until W_g learns.
      sparsemoe::MoELayer<Scalar> layer(config);
      if (options.uniform_gate_init()) layer.gate().initialize_uniform(options.seed + 3);
      return train(options, layer);
    }
    case RouterChoice::softmax_top_k: {
      sparsemoe::SoftmaxTopKRouterOptions mixtral;  // renormalised top-k of the softmax
      mixtral.k = config.k;
      mixtral.normalize_top_k = true;
      return train_with(options, config, sparsemoe::SoftmaxTopKRouter<Scalar>(input_dim, options.experts, mixtral));
    }
    case RouterChoice::switch_top_1:
      return train_with(options, config, sparsemoe::SwitchRouter<Scalar>(input_dim, options.experts));
    case RouterChoice::gshard_top_2: {
      sparsemoe::GShardRouterOptions gshard;  // random second expert in training
      gshard.seed = options.seed + 4;
      return train_with(options, config, sparsemoe::GShardRouter<Scalar>(input_dim, options.experts, gshard));
    }
    case RouterChoice::sigmoid_bias: {
      sparsemoe::SigmoidTopKRouterOptions deepseek;  // renormalised top-k of σ(z), selection bias
      deepseek.k = config.k;
      return train_with(options, config, sparsemoe::SigmoidTopKRouter<Scalar>(input_dim, options.experts, deepseek));
    }
    case RouterChoice::expert_choice:
      return train_expert_choice(options, sizes<sparsemoe::ExpertChoiceConfig>(options));
    case RouterChoice::hash:
      return train_hash(options, sizes<sparsemoe::HashMoEConfig>(options));
    case RouterChoice::soft_moe:
      return train_soft_moe(options, sizes<sparsemoe::SoftMoEConfig>(options));
    case RouterChoice::hierarchical:
      return train_hierarchical(options, sizes<sparsemoe::HierarchicalMoEConfig>(options));
  }
  throw std::logic_error("unhandled router");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options;
    if (!parse_options(argc, argv, options)) return 0;
    return run(options);
  } catch (const std::invalid_argument& error) {
    std::cerr << "train: " << error.what() << "\n(see --help)\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "train: " << error.what() << "\n";
    return 1;
  }
}
