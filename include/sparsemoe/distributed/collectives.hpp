// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISTRIBUTED_COLLECTIVES_HPP
#define SPARSEMOE_DISTRIBUTED_COLLECTIVES_HPP

/// \file collectives.hpp
/// The reductions of expert parallelism that must give every rank the same bits: a sum over
/// ranks in rank order (sum_over_ranks), and the agreement of all ranks on an argument check
/// before any of them enters a collective call. Needs MPI (link sparsemoe::mpi).

#include "../config.hpp"
#include "exchange.hpp"

#include <mpi.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace sparsemoe {

/// \addtogroup distributed
/// @{

namespace detail {

/// The MPI datatype of a summed value: MPI_FLOAT, MPI_DOUBLE or MPI_INT64_T.
template <typename Value>
MPI_Datatype mpi_sum_type() {
  static_assert(std::is_same<Value, float>::value || std::is_same<Value, double>::value ||
                    std::is_same<Value, std::int64_t>::value,
                "sum_over_ranks sums float, double or std::int64_t");
  if (std::is_same<Value, float>::value) return MPI_FLOAT;
  if (std::is_same<Value, double>::value) return MPI_DOUBLE;
  return MPI_INT64_T;
}

}  // namespace detail

/// Replaces values[0..count) on every rank of `comm` by their sum over the ranks, added in rank
/// order: values_i = ((0 + v_i(rank 0)) + v_i(rank 1)) + … . Unlike MPI_Allreduce, whose
/// reduction order the MPI library picks (and may pick differently on different ranks), the
/// result is the same bits on every rank and for every MPI library, so that replicated
/// parameters updated from it stay identical. Collective: every rank passes the same count.
/// Cost: one MPI_Allgather of count values per rank (P·count values of `scratch`, reused), then
/// P·count additions. Throws std::invalid_argument for a negative count or one beyond MPI's int.
template <typename Value>
void sum_over_ranks(Value* values, Index count, MPI_Comm comm, std::vector<Value>& scratch) {
  const char* function = "sparsemoe::sum_over_ranks";
  const int items = detail::mpi_count(count, function, "count");
  int ranks = 0;
  detail::mpi_check(MPI_Comm_size(comm, &ranks), "MPI_Comm_size");
  detail::mpi_count(count * ranks, function, "count times the number of ranks");
  scratch.resize(static_cast<std::size_t>(count) * static_cast<std::size_t>(ranks));
  if (count == 0) return;
  const MPI_Datatype type = detail::mpi_sum_type<Value>();
  detail::mpi_check(MPI_Allgather(values, items, type, scratch.data(), items, type, comm), "MPI_Allgather");
  for (Index i = 0; i < count; ++i) {
    Value sum = 0;
    for (int r = 0; r < ranks; ++r) sum += scratch[static_cast<std::size_t>(r) * static_cast<std::size_t>(count) + static_cast<std::size_t>(i)];
    values[i] = sum;
  }
}

/// sum_over_ranks with scratch of its own.
template <typename Value>
void sum_over_ranks(Value* values, Index count, MPI_Comm comm) {
  std::vector<Value> scratch;
  sum_over_ranks(values, count, comm, scratch);
}

namespace detail {

/// A duplicate of a communicator (MPI_Comm_dup, collective), freed on destruction: a layer's
/// messages never mix with its caller's, and a constructor that throws after the duplication
/// still frees it. Move-only.
class OwnedCommunicator {
 public:
  OwnedCommunicator() = default;
  explicit OwnedCommunicator(MPI_Comm comm) { mpi_check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup"); }
  OwnedCommunicator(const OwnedCommunicator&) = delete;
  OwnedCommunicator& operator=(const OwnedCommunicator&) = delete;
  OwnedCommunicator(OwnedCommunicator&& other) noexcept : comm_(other.comm_) { other.comm_ = MPI_COMM_NULL; }
  OwnedCommunicator& operator=(OwnedCommunicator&& other) = delete;
  ~OwnedCommunicator() {
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  MPI_Comm get() const { return comm_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
};

/// FNV-1a over `bytes` bytes at `data`, continuing from `hash`: a fingerprint of values that must
/// be the same on every rank (require_same_on_all_ranks).
inline std::uint64_t fingerprint(const void* data, std::size_t bytes, std::uint64_t hash = 1469598103934665603ull) {
  const auto* byte = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) hash = (hash ^ byte[i]) * 1099511628211ull;
  return hash;
}

/// Throws std::invalid_argument on EVERY rank (naming `what`) unless `hash` is the same on all
/// ranks of `comm`. Collective: one MPI_Allreduce (MAX) of two 64-bit integers, hash and ~hash.
inline void require_same_on_all_ranks(MPI_Comm comm, std::uint64_t hash, const char* function, const char* what) {
  std::uint64_t mine[2] = {hash, ~hash}, largest[2] = {0, 0};
  mpi_check(MPI_Allreduce(mine, largest, 2, MPI_UINT64_T, MPI_MAX, comm), "MPI_Allreduce");
  require(largest[0] == hash && largest[1] == ~hash, function, "the ranks were given different ", what);
}

/// Runs `check` (argument checks that throw std::invalid_argument) on this rank, then lets all
/// ranks of `comm` agree: when any rank's check threw, EVERY rank throws std::invalid_argument
/// (the failing rank with its own message, the others naming the lowest failing rank), so that
/// no rank goes on into a collective call that the others never reach. Collective: one
/// MPI_Allreduce of one int.
template <typename Check>
void check_on_all_ranks(MPI_Comm comm, const char* function, const Check& check) {
  int rank = 0, ranks = 0;
  mpi_check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(comm, &ranks), "MPI_Comm_size");
  std::string failure;
  bool failed = false;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  try {
    check();
  } catch (const std::invalid_argument& error) {
    failed = true;
    failure = error.what();
  }
#else
  check();  // aborts on a failed check
#endif
  int first_failing = failed ? rank : ranks;
  int lowest = ranks;
  mpi_check(MPI_Allreduce(&first_failing, &lowest, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  if (lowest == ranks) return;
  require(!failed, function, "on rank ", rank, ": ", failure);
  require(false, function, "rank ", lowest, " rejected its arguments (its exception names the reason)");
}

}  // namespace detail

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_DISTRIBUTED_COLLECTIVES_HPP
