// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_DISTRIBUTED_EXCHANGE_HPP
#define SPARSEMOE_DISTRIBUTED_EXCHANGE_HPP

/// \file exchange.hpp
/// The all-to-all exchange of expert parallelism over MPI: where each expert lives
/// (ExpertPlacement), who sends how many grouped rows of which expert to whom (ExpertExchangePlan,
/// plan_expert_exchange), and the two directions of the row exchange (exchange_to_experts,
/// exchange_from_experts). Needs MPI (link sparsemoe::mpi); not included by sparsemoe.hpp.

#include "../config.hpp"
#include "../detail/parallel.hpp"
#include "../dispatch.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace sparsemoe {

/// \addtogroup distributed
/// @{

namespace detail {

/// The MPI datatype of a scalar: MPI_FLOAT or MPI_DOUBLE.
template <typename Scalar>
MPI_Datatype mpi_scalar_type() {
  check_scalar<Scalar>();
  return std::is_same<Scalar, float>::value ? MPI_FLOAT : MPI_DOUBLE;
}

/// Throws std::runtime_error naming the MPI call when `code` is not MPI_SUCCESS (reachable only
/// where the communicator's error handler returns errors instead of aborting).
inline void mpi_check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  SPARSEMOE_THROW(std::runtime_error, message("sparsemoe: ", call, " failed: ", text));
}

/// An MPI datatype of `width` consecutive scalars (one grouped row), committed, freed when the
/// guard goes out of scope, so that MPI counts are rows, not scalars.
template <typename Scalar>
class RowType {
 public:
  explicit RowType(Index width) {
    require(width >= 1 && width <= INT_MAX, "sparsemoe::RowType", "row width must be in [1, INT_MAX], got ", width);
    mpi_check(MPI_Type_contiguous(static_cast<int>(width), mpi_scalar_type<Scalar>(), &type_), "MPI_Type_contiguous");
    mpi_check(MPI_Type_commit(&type_), "MPI_Type_commit");
  }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  ~RowType() { MPI_Type_free(&type_); }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

/// `value` as an MPI count (int); throws std::invalid_argument naming `what` beyond INT_MAX.
inline int mpi_count(Index value, const char* function, const char* what) {
  require(value >= 0 && value <= INT_MAX, function, what, " must be in [0, INT_MAX] for MPI, got ", value);
  return static_cast<int>(value);
}

}  // namespace detail

/// Which rank holds which expert: E experts over P ranks in contiguous blocks, rank r holding
/// experts [first_expert(r), first_expert(r + 1)) with first_expert(r) = ⌊r·E/P⌋. The split is
/// as even as it gets (block sizes differ by at most one); E need not be a multiple of P, and
/// with E < P some ranks hold no expert. Global expert e is local expert e − first_expert(r) of
/// its owner r. O(E + P) memory.
class ExpertPlacement {
 public:
  /// No experts, no ranks.
  ExpertPlacement() = default;

  /// The split of `num_experts` experts over `num_ranks` ranks. Throws std::invalid_argument
  /// unless num_experts ≥ 1 and num_ranks ≥ 1.
  ExpertPlacement(Index num_experts, int num_ranks) {
    const char* function = "sparsemoe::ExpertPlacement";
    detail::require(num_experts >= 1, function, "num_experts must be >= 1, got ", num_experts);
    detail::require(num_ranks >= 1, function, "num_ranks must be >= 1, got ", num_ranks);
    first_.resize(static_cast<std::size_t>(num_ranks) + 1);
    for (int r = 0; r <= num_ranks; ++r) first_[static_cast<std::size_t>(r)] = static_cast<Index>(r) * num_experts / num_ranks;
    owner_.resize(static_cast<std::size_t>(num_experts));
    for (int r = 0; r < num_ranks; ++r) {
      for (Index e = first_expert(r); e < first_expert(r + 1); ++e) owner_[static_cast<std::size_t>(e)] = r;
      max_local_ = std::max(max_local_, num_local_experts(r));
    }
  }

  /// E.
  Index num_experts() const { return static_cast<Index>(owner_.size()); }
  /// P.
  int num_ranks() const { return static_cast<int>(first_.empty() ? 0 : first_.size() - 1); }
  /// First global expert of `rank` (0 ≤ rank ≤ P; first_expert(P) = E).
  Index first_expert(int rank) const { return first_.at(static_cast<std::size_t>(rank)); }
  /// Experts held by `rank`.
  Index num_local_experts(int rank) const { return first_expert(rank + 1) - first_expert(rank); }
  /// The most experts any rank holds, ⌈E/P⌉.
  Index max_local_experts() const { return max_local_; }
  /// The rank that holds global expert `expert`.
  int owner(Index expert) const { return owner_.at(static_cast<std::size_t>(expert)); }

 private:
  std::vector<Index> first_;
  std::vector<int> owner_;
  Index max_local_ = 0;
};

/// Who sends how many grouped rows to whom in one expert-parallel step, made by
/// plan_expert_exchange from the rank's DispatchPlan (over the E global experts).
///
/// Send side: the local grouped rows are expert-major over the global experts, and each rank's
/// experts are a contiguous block of ids, so the rows for rank r are the contiguous block
/// [send_offsets[r], send_offsets[r] + send_counts[r]) of the local grouped rows, already in
/// (expert, token) order: no bucketing copy is needed.
///
/// Receive side: MPI_Alltoallv delivers the rows source-major (all of rank 0's, then rank 1's,
/// …; each source's in its own order) into a staging buffer. The expert rows of this rank are
/// then laid out expert-major: local expert m's block holds the rows of source 0, then of source
/// 1, …, each source's in its own (token, slot) order. That is exactly the order in which one
/// process running the concatenated batch (rank 0's tokens, then rank 1's, …) groups the rows of
/// that expert, which makes the distributed layer's results equal to one process's. The order is
/// a function of the routing alone, never of message timing.
struct ExpertExchangePlan {
  int rank = 0;        ///< this rank
  int num_ranks = 0;   ///< P
  Index width_of_counts = 0;  ///< M = placement.max_local_experts(): the per-rank stride of the count tables
  std::vector<int> send_counts;      ///< P: rows sent to each rank
  std::vector<int> send_offsets;     ///< P: first local grouped row sent to each rank
  std::vector<int> receive_counts;   ///< P: rows received from each rank
  std::vector<int> receive_offsets;  ///< P: first staging row of each source
  /// P×M, row-major: entry (r, m) = rows this rank sends to rank r for r's local expert m (0
  /// beyond r's experts). What MPI_Alltoall sent.
  std::vector<std::int64_t> sent_per_expert;
  /// P×M, row-major: entry (s, m) = rows source s sends to this rank for local expert m.
  std::vector<std::int64_t> received_per_expert;
  /// N+1 (N = this rank's local experts): first expert row of each local expert; offsets[N] =
  /// num_expert_rows(). The `offsets` of ExpertBank over the received rows.
  IndexVector offsets;
  /// num_expert_rows(): expert row i is staging row staging_row_of_expert_row[i].
  IndexVector staging_row_of_expert_row;
  /// Rows of the local DispatchPlan (sent out by exchange_to_experts, back by exchange_from_experts).
  Index local_rows = 0;

  /// Rows this rank's experts process (received from all ranks, itself included).
  Index num_expert_rows() const { return staging_row_of_expert_row.size(); }
  /// Local experts N.
  Index num_local_experts() const { return offsets.size() > 0 ? offsets.size() - 1 : 0; }
  /// Rows this rank's experts receive from `source` for local expert `expert`.
  Index rows_from(int source, Index expert) const {
    return static_cast<Index>(received_per_expert[static_cast<std::size_t>(source * width_of_counts + expert)]);
  }
};

/// Fills `exchange` for the local dispatch plan `plan` (over placement.num_experts() experts)
/// of this rank of `comm`: one MPI_Alltoall of P×M counts (M = ⌈E/P⌉ entries per destination,
/// the rows for each of its local experts), then the offsets and the expert-major order of the
/// received rows (see ExpertExchangePlan). Collective: every rank of `comm` must call it, in the
/// same order as the other collectives. Throws std::invalid_argument (on this rank) when the
/// plan's expert count or the communicator's size disagree with `placement`, or a row count
/// does not fit MPI's int counts. Cost: O(P·M + E + rows received) plus one all-to-all of
/// 8·P·M bytes per rank. Reuses the storage of `exchange`.
inline void plan_expert_exchange(const DispatchPlan& plan, const ExpertPlacement& placement, MPI_Comm comm,
                                 ExpertExchangePlan& exchange) {
  const char* function = "sparsemoe::plan_expert_exchange";
  int rank = 0, ranks = 0;
  detail::mpi_check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  detail::mpi_check(MPI_Comm_size(comm, &ranks), "MPI_Comm_size");
  detail::require(placement.num_ranks() == ranks, function, "the placement is for ", placement.num_ranks(),
                  " ranks, the communicator has ", ranks);
  detail::require(plan.num_experts == placement.num_experts(), function, "the plan has ", plan.num_experts,
                  " experts, the placement ", placement.num_experts());
  const Index width = placement.max_local_experts();
  const auto table = static_cast<std::size_t>(ranks) * static_cast<std::size_t>(width);
  exchange.rank = rank;
  exchange.num_ranks = ranks;
  exchange.width_of_counts = width;
  exchange.local_rows = plan.num_rows();
  exchange.send_counts.assign(static_cast<std::size_t>(ranks), 0);
  exchange.send_offsets.assign(static_cast<std::size_t>(ranks), 0);
  exchange.receive_counts.assign(static_cast<std::size_t>(ranks), 0);
  exchange.receive_offsets.assign(static_cast<std::size_t>(ranks), 0);
  exchange.sent_per_expert.assign(table, 0);
  exchange.received_per_expert.assign(table, 0);
  detail::mpi_count(plan.num_rows(), function, "the local grouped rows");
  for (int r = 0; r < ranks; ++r) {
    const Index first = placement.first_expert(r), last = placement.first_expert(r + 1);
    exchange.send_offsets[static_cast<std::size_t>(r)] = static_cast<int>(plan.offsets[first]);
    exchange.send_counts[static_cast<std::size_t>(r)] = static_cast<int>(plan.offsets[last] - plan.offsets[first]);
    for (Index e = first; e < last; ++e) {
      exchange.sent_per_expert[static_cast<std::size_t>(r * width + (e - first))] = plan.tokens_per_expert[e];
    }
  }
  if (width > 0) {
    detail::mpi_check(MPI_Alltoall(exchange.sent_per_expert.data(), static_cast<int>(width), MPI_INT64_T,
                                   exchange.received_per_expert.data(), static_cast<int>(width), MPI_INT64_T, comm),
                      "MPI_Alltoall");
  }
  const Index local_experts = placement.num_local_experts(rank);
  // Staging layout (source-major) and expert-major offsets.
  Index staged = 0;
  exchange.offsets.setZero(local_experts + 1);
  for (int s = 0; s < ranks; ++s) {
    Index from_source = 0;
    for (Index m = 0; m < local_experts; ++m) {
      const Index rows = exchange.rows_from(s, m);
      detail::require(rows >= 0, function, "rank ", s, " announced ", rows, " rows");
      from_source += rows;
      exchange.offsets[m + 1] += rows;
    }
    exchange.receive_offsets[static_cast<std::size_t>(s)] = detail::mpi_count(staged, function, "the received rows");
    exchange.receive_counts[static_cast<std::size_t>(s)] = detail::mpi_count(from_source, function, "the received rows");
    staged += from_source;
  }
  for (Index m = 0; m < local_experts; ++m) exchange.offsets[m + 1] += exchange.offsets[m];
  // Expert-major order: local expert m, then source s, then the source's own order.
  exchange.staging_row_of_expert_row.resize(staged);
  for (Index m = 0; m < local_experts; ++m) {
    Index expert_row = exchange.offsets[m];
    for (int s = 0; s < ranks; ++s) {
      Index staging_row = exchange.receive_offsets[static_cast<std::size_t>(s)];
      for (Index before = 0; before < m; ++before) staging_row += exchange.rows_from(s, before);
      const Index rows = exchange.rows_from(s, m);
      for (Index i = 0; i < rows; ++i) exchange.staging_row_of_expert_row[expert_row++] = staging_row + i;
    }
  }
}

/// Forward direction: sends the local grouped rows `local_rows` (plan.num_rows()×w, expert-major
/// over the global experts, as MoELayer::group makes them) to the ranks that hold their experts,
/// and writes the rows this rank's experts receive into `expert_rows` (num_expert_rows()×w,
/// resized; a Matrix<Scalar>, or a Vector<Scalar> for w = 1), expert-major as
/// ExpertExchangePlan describes. `staging` is scratch (resized).
/// Collective over `comm` (the one the plan was made on): one MPI_Alltoallv of w-scalar rows.
/// Throws std::invalid_argument (on this rank) when local_rows does not have the plan's rows.
/// Cost: one all-to-all moving the rows, plus one parallel copy of the received rows.
template <typename Scalar, typename Output>
void exchange_to_experts(const ExpertExchangePlan& exchange, ConstMatrixRef<Scalar> local_rows, Output& expert_rows,
                         Matrix<Scalar>& staging, MPI_Comm comm) {
  static_assert(std::is_same<typename Output::Scalar, Scalar>::value, "expert_rows must hold Scalar");
  const char* function = "sparsemoe::exchange_to_experts";
  detail::require(local_rows.rows() == exchange.local_rows, function, "local_rows has ", local_rows.rows(),
                  " rows, the exchange plan ", exchange.local_rows);
  const Index width = local_rows.cols();
  detail::require(local_rows.rows() <= 1 || local_rows.outerStride() == width, function,
                  "local_rows must have contiguous rows (outer stride ", local_rows.outerStride(), ", width ", width, ")");
  const Index received = exchange.receive_offsets.empty()
                             ? 0
                             : exchange.receive_offsets.back() + exchange.receive_counts.back();
  staging.resize(received, width);
  expert_rows.resize(exchange.num_expert_rows(), width);
  if (width == 0) return;
  const detail::RowType<Scalar> row(width);
  detail::mpi_check(MPI_Alltoallv(local_rows.data(), exchange.send_counts.data(), exchange.send_offsets.data(), row.get(),
                                  staging.data(), exchange.receive_counts.data(), exchange.receive_offsets.data(),
                                  row.get(), comm),
                    "MPI_Alltoallv");
  detail::parallel_for(exchange.num_expert_rows(), static_cast<double>(width), [&](Index i) {
    expert_rows.row(i) = staging.row(exchange.staging_row_of_expert_row[i]);
  });
}

/// Reverse direction: sends each expert row of `expert_rows` (num_expert_rows()×w, in the
/// expert-major order of exchange_to_experts) back to the rank it came from, and writes into
/// `local_rows` (the plan's rows×w, resized; a Matrix<Scalar>, or a Vector<Scalar> for w = 1)
/// the rows that come back, in the local grouped order: local row i of the result belongs to
/// local grouped row i sent out. `staging` is
/// scratch. Collective over `comm`: one MPI_Alltoallv with the send and receive splits of
/// exchange_to_experts swapped. Throws std::invalid_argument (on this rank) when expert_rows
/// does not have num_expert_rows() rows.
template <typename Scalar, typename Output>
void exchange_from_experts(const ExpertExchangePlan& exchange, ConstMatrixRef<Scalar> expert_rows, Output& local_rows,
                           Matrix<Scalar>& staging, MPI_Comm comm) {
  static_assert(std::is_same<typename Output::Scalar, Scalar>::value, "local_rows must hold Scalar");
  const char* function = "sparsemoe::exchange_from_experts";
  detail::require(expert_rows.rows() == exchange.num_expert_rows(), function, "expert_rows has ", expert_rows.rows(),
                  " rows, the exchange plan ", exchange.num_expert_rows());
  const Index width = expert_rows.cols();
  staging.resize(exchange.num_expert_rows(), width);
  local_rows.resize(exchange.local_rows, width);
  if (width == 0) return;
  detail::parallel_for(exchange.num_expert_rows(), static_cast<double>(width), [&](Index i) {
    staging.row(exchange.staging_row_of_expert_row[i]) = expert_rows.row(i);
  });
  const detail::RowType<Scalar> row(width);
  detail::mpi_check(MPI_Alltoallv(staging.data(), exchange.receive_counts.data(), exchange.receive_offsets.data(),
                                  row.get(), local_rows.data(), exchange.send_counts.data(),
                                  exchange.send_offsets.data(), row.get(), comm),
                    "MPI_Alltoallv");
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_DISTRIBUTED_EXCHANGE_HPP
