// SPDX-License-Identifier: MIT
// Sharded checkpoints of DistributedMoELayer (distributed/checkpoint.hpp) under mpirun -np W:
// for every P ≤ W, the first P ranks train a layer one step, save it, and the files are loaded
// into a single-process MoELayer (Q = 1) and onto W and ⌈W/2⌉ ranks. The independent reference
// is the single-process layer: its loaded parameters must be bitwise the saved ones, and the
// re-sharded distributed layer must compute bitwise its outputs, ∂L/∂x and expert gradients on
// the concatenated batch (every rank's token count a multiple of the router's 64-row tile).
// Mismatched layers, a shard without a tensor, a flipped byte and a truncated shard throw on
// every rank and change nothing.

#include <sparsemoe/distributed.hpp>
#include <sparsemoe/moe_layer.hpp>
#include <sparsemoe/optimizers.hpp>
#include <sparsemoe/router/sigmoid_top_k.hpp>

#include "mpi_test_util.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using sparsemoe::Index;
using sparsemoe::Matrix;
using sparsemoe_test::world_rank;
using sparsemoe_test::world_size;
using Router = sparsemoe::SigmoidTopKRouter<float>;
using ExpertT = sparsemoe::Expert<float, sparsemoe::Relu>;
using Layer = sparsemoe::DistributedMoELayer<float, ExpertT, Router>;
using Single = sparsemoe::MoELayer<float, ExpertT, Router>;

// Tokens per rank: a multiple of the router's 64-row tile and of the shared expert's 128-row
// tile, so that every per-token result is bitwise one process's.
constexpr Index d = 8, h = 16, experts = 7, k = 2, tile = 128;

sparsemoe::MoEConfig make_config(std::uint64_t seed, Index hidden = h, Index num_experts = experts) {
  sparsemoe::MoEConfig config{d, hidden, num_experts, k};
  config.seed = seed;
  config.shared_hidden_dim = 8;
  config.shared_expert_gate = true;
  return config;
}

Router make_router(std::uint64_t seed, Index num_experts = experts) {
  sparsemoe::SigmoidTopKRouterOptions options;
  options.k = k;
  Router router(d, num_experts, options);
  router.initialize_uniform(seed);
  return router;
}

/// A directory every rank of the world shares (made by rank 0, its name broadcast).
std::string shared_directory() {
  char path[256] = {};
  if (world_rank() == 0) {
    const char* base = std::getenv("TMPDIR");
    std::snprintf(path, sizeof path, "%s/sparsemoe_ckpt_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(path)) path[0] = '\0';
  }
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

/// Removes a directory of shared_directory() once every rank is done with it.
void remove_shared(const std::string& directory) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::filesystem::remove_all(directory);
}

/// The first `ranks` ranks of the world (MPI_COMM_NULL on the others).
MPI_Comm first_ranks(int ranks) {
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < ranks ? 0 : MPI_UNDEFINED, world_rank(), &comm);
  return comm;
}

/// Every tensor and state of `layer` by name, copied.
template <typename L>
std::map<std::string, Matrix<float>> snapshot(L& layer) {
  std::map<std::string, Matrix<float>> values;
  for (const auto& view : layer.tensors()) values[view.name] = view.matrix();
  for (const auto& view : layer.router().state()) values["router.state." + view.name] = view.matrix();
  return values;
}

bool bitwise(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

/// What the saved layer held and computed on this rank.
struct Saved {
  std::map<std::string, Matrix<float>> tensors;  ///< its tensors and router state
  Matrix<float> output, d_input;                 ///< one step on `tile` tokens per rank (batch_step)
};

/// A training step's output and ∂L/∂x (∂L/∂y = y) on rows [first, first + rows) of the batch of
/// `total` tokens that check_resharded also uses.
template <typename L>
std::pair<Matrix<float>, Matrix<float>> batch_step(const L& layer, Index first, Index rows, Index total) {
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  options.step = 0;
  const Matrix<float> input = sparsemoe_test::random_matrix<float>(total, d, 7);
  const auto result = layer.forward(input.middleRows(first, rows), options);
  auto gradients = layer.make_gradients();
  Matrix<float> d_input = layer.backward(result, result.output, gradients);
  return {result.output, d_input};
}

/// Trains a P-rank layer one SGD step (so that nothing is at its initial value), with a
/// non-zero selection bias and training step, and saves it as `prefix`. Returns its tensors,
/// then its output and ∂L/∂x on this rank's `tile` rows of a batch.
Saved train_and_save(MPI_Comm comm, const std::string& prefix, std::uint64_t step) {
  Layer layer(make_config(3), make_router(4), comm);
  int rank = 0, ranks = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  const Matrix<float> input = sparsemoe_test::random_matrix<float>(20 * ranks, d, 5);
  const auto result = layer.forward(input.middleRows(20 * rank, 20), options);
  auto gradients = layer.make_gradients();
  layer.backward(result, result.output, gradients);
  sparsemoe::SgdOptions sgd;
  sgd.learning_rate = 0.5;
  sparsemoe::Sgd<float>(sgd).step(layer.tensors(), gradients.tensors());
  layer.router().selection_bias() = sparsemoe_test::random_matrix<float>(experts, 1, 6).col(0);
  layer.set_training_step(step);
  sparsemoe::save_distributed_checkpoint(layer, prefix);
  Saved saved{snapshot(layer), {}, {}};
  std::tie(saved.output, saved.d_input) = batch_step(layer, tile * rank, tile, tile * ranks);
  return saved;
}

/// Loads `index` onto the first `ranks` ranks and checks them against `single` (already loaded)
/// on a batch of 64 tokens per rank: outputs, ∂L/∂x and expert gradients bitwise.
void check_resharded(const Single& single, const std::string& index, int ranks, std::uint64_t step) {
  MPI_Comm comm = first_ranks(ranks);
  if (comm == MPI_COMM_NULL) return;
  Layer layer(make_config(99), make_router(98), comm);  // other initial values: all replaced
  sparsemoe::load_distributed_checkpoint(layer, index);
  EXPECT_EQ(layer.training_step(), step);
  const int rank = layer.rank();
  sparsemoe::ForwardOptions options;
  options.mode = sparsemoe::Mode::training;
  options.step = 0;
  const Matrix<float> input = sparsemoe_test::random_matrix<float>(tile * ranks, d, 7);
  const auto expected = single.forward(input, options);
  auto expected_gradients = single.make_gradients();
  const Matrix<float> expected_d_input = single.backward(expected, expected.output, expected_gradients);
  const auto result = layer.forward(input.middleRows(tile * rank, tile), options);
  auto gradients = layer.make_gradients();
  const Matrix<float> d_input = layer.backward(result, result.output, gradients);
  EXPECT_TRUE(bitwise(result.output, expected.output.middleRows(tile * rank, tile)))
      << "output, rank " << rank << " of " << ranks;
  EXPECT_TRUE(bitwise(d_input, expected_d_input.middleRows(tile * rank, tile))) << "d_input, rank " << rank;
  for (Index local = 0; local < layer.num_local_experts(); ++local) {
    const Index e = layer.first_local_expert() + local;
    const ExpertT& got = gradients.experts[static_cast<std::size_t>(local)];
    const ExpertT& want = expected_gradients.experts[static_cast<std::size_t>(e)];
    EXPECT_TRUE(bitwise(got.w1(), want.w1()) && bitwise(got.w2(), want.w2())) << "expert " << e;
  }
  EXPECT_TRUE(sparsemoe_test::near(gradients.weight, expected_gradients.weight, 1e-5)) << "router gradient";
  MPI_Comm_free(&comm);
}

TEST(DistributedCheckpoint, SaveAtEveryRankCountLoadAtOneAndOtherCounts) {
  const std::string directory = shared_directory();
  ASSERT_FALSE(directory.empty());
  for (int saved_ranks = 1; saved_ranks <= world_size(); ++saved_ranks) {
    const std::string prefix = directory + "/moe_p" + std::to_string(saved_ranks);
    const std::uint64_t step = 40 + static_cast<std::uint64_t>(saved_ranks);
    Saved saved;
    MPI_Comm comm = first_ranks(saved_ranks);
    if (comm != MPI_COMM_NULL) {
      saved = train_and_save(comm, prefix, step);
      MPI_Comm_free(&comm);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const std::string index = sparsemoe::distributed_checkpoint_index(prefix);
    // Q = 1: every parameter the saving rank held, bitwise, in one process.
    Single single(make_config(11), make_router(12));
    sparsemoe::load_distributed_checkpoint(single, index);
    EXPECT_EQ(single.training_step(), step);
    const auto loaded = snapshot(single);
    for (const auto& entry : saved.tensors) {
      const auto found = loaded.find(entry.first);
      ASSERT_NE(found, loaded.end()) << entry.first;
      EXPECT_TRUE(bitwise(found->second, entry.second)) << entry.first << ", saved at P = " << saved_ranks;
    }
    if (world_rank() < saved_ranks) {  // the loaded layer computes what the saved one did, bitwise
      const auto [output, d_input] = batch_step(single, 0, tile * saved_ranks, tile * saved_ranks);
      EXPECT_TRUE(bitwise(saved.output, output.middleRows(tile * world_rank(), tile))) << "P = " << saved_ranks;
      EXPECT_TRUE(bitwise(saved.d_input, d_input.middleRows(tile * world_rank(), tile))) << "P = " << saved_ranks;
    }
    // Q = W and Q = ⌈W/2⌉ ranks against the single process.
    check_resharded(single, index, world_size(), step);
    check_resharded(single, index, (world_size() + 1) / 2, step);
  }
  remove_shared(directory);
}

TEST(DistributedCheckpoint, RanksWithoutExpertsWriteNoExperts) {
  // E = 2 over up to 4 ranks: some shards hold no expert (rank 0's still holds the router).
  const std::string directory = shared_directory();
  const std::string prefix = directory + "/few";
  Layer layer(make_config(3, h, 2), make_router(4, 2), MPI_COMM_WORLD);
  layer.set_training_step(9);
  sparsemoe::save_distributed_checkpoint(layer, prefix);
  MPI_Barrier(MPI_COMM_WORLD);
  Single single(make_config(5, h, 2), make_router(6, 2));
  sparsemoe::load_distributed_checkpoint(single, sparsemoe::distributed_checkpoint_index(prefix));
  EXPECT_EQ(single.training_step(), 9u);
  const auto loaded = snapshot(single);
  for (const auto& entry : snapshot(layer)) EXPECT_TRUE(bitwise(loaded.at(entry.first), entry.second)) << entry.first;
  remove_shared(directory);
}

/// Saves a layer on the world and returns the index path; rank 0 then edits the files.
std::string saved_world_checkpoint(const std::string& name) {
  const std::string prefix = shared_directory() + "/" + name;
  train_and_save(MPI_COMM_WORLD, prefix, 5);
  MPI_Barrier(MPI_COMM_WORLD);
  return prefix;
}

/// Expects load_distributed_checkpoint to throw std::invalid_argument on every rank and leave
/// the layer as it was, and the layer to stay usable (no rank left in a collective).
void expect_rejected(Layer& layer, const std::string& index, const char* what) {
  const auto before = snapshot(layer);
  EXPECT_THROW(sparsemoe::load_distributed_checkpoint(layer, index), std::invalid_argument) << what;
  const auto after = snapshot(layer);
  for (const auto& entry : before) EXPECT_TRUE(bitwise(after.at(entry.first), entry.second)) << what << " " << entry.first;
  EXPECT_NO_THROW(layer.forward(Matrix<float>::Ones(3, d))) << what;
}

TEST(DistributedCheckpoint, MismatchedLayersThrowOnEveryRankAndChangeNothing) {
  const std::string prefix = saved_world_checkpoint("mismatch");
  const std::string index = sparsemoe::distributed_checkpoint_index(prefix);
  Layer wider(make_config(1, h + 1), make_router(2), MPI_COMM_WORLD);
  expect_rejected(wider, index, "hidden_dim");
  sparsemoe::MoEConfig no_shared = make_config(1);
  no_shared.shared_hidden_dim = 0;
  no_shared.shared_expert_gate = false;
  Layer without_shared(no_shared, make_router(2), MPI_COMM_WORLD);
  expect_rejected(without_shared, index, "shared expert");
  Layer layer(make_config(1), make_router(2), MPI_COMM_WORLD);
  expect_rejected(layer, prefix + ".missing.json", "no index");
  Single single(make_config(1, h + 1), make_router(2));
  EXPECT_THROW(sparsemoe::load_distributed_checkpoint(single, index), std::invalid_argument);
  remove_shared(sparsemoe::detail::directory_of(prefix));
}

TEST(DistributedCheckpoint, CorruptedShardsThrowOnEveryRankAndChangeNothing) {
  const std::string prefix = saved_world_checkpoint("corrupt");
  const std::string index = sparsemoe::distributed_checkpoint_index(prefix);
  const std::string last_shard =
      prefix + "-" + [] {
        char text[32];
        std::snprintf(text, sizeof text, "%05d-of-%05d", world_size(), world_size());
        return std::string(text);
      }() + ".safetensors";
  Layer layer(make_config(1), make_router(2), MPI_COMM_WORLD);
  std::string original;
  if (world_rank() == 0) {
    std::ifstream in(last_shard, std::ios::binary);
    original.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const auto rewrite = [&](const std::string& content) {
    if (world_rank() == 0) std::ofstream(last_shard, std::ios::binary | std::ios::trunc) << content;
    MPI_Barrier(MPI_COMM_WORLD);
  };
  // One flipped bit in the last tensor's data: only its checksum can tell (only the last rank reads it).
  std::string flipped = original;
  if (!flipped.empty()) flipped[flipped.size() - 1] = static_cast<char>(flipped.back() ^ 0x01);
  rewrite(flipped);
  expect_rejected(layer, index, "flipped bit");
  rewrite(original.substr(0, original.size() / 2));
  expect_rejected(layer, index, "truncated shard");
  // The shard without one of its tensors (the index still names it).
  if (world_rank() == 0) {
    const sparsemoe::SafetensorsFile file = sparsemoe::SafetensorsFile::from_bytes(original);
    sparsemoe::SafetensorsWriter writer;
    for (const auto& entry : file.metadata()) writer.set_metadata(entry.first, entry.second);
    for (std::size_t i = 1; i < file.tensors().size(); ++i) {
      const std::string& name = file.tensors()[i].name;
      const std::vector<float> values = file.values<float>(name);
      writer.add(name, file.tensors()[i].shape, values.data(), values.size());
    }
    std::ofstream(last_shard, std::ios::binary | std::ios::trunc) << writer.bytes();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_rejected(layer, index, "missing tensor");
  rewrite(original);
  EXPECT_NO_THROW(sparsemoe::load_distributed_checkpoint(layer, index));
  remove_shared(sparsemoe::detail::directory_of(prefix));
}

}  // namespace
