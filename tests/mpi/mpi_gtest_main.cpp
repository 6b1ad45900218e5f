// SPDX-License-Identifier: MIT
// main() of the MPI tests: every rank runs every test; rank 0 prints the usual GoogleTest report,
// the other ranks only their failures (--gtest_brief). The exit code is the worst over all ranks,
// so a failure on any rank fails the ctest. Tests use EXPECT_* only (never an early return before
// a collective call, which would leave the other ranks waiting); ctest's TIMEOUT turns a deadlock
// into a failure.
#include <gtest/gtest.h>
#include <mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) GTEST_FLAG_SET(brief, true);
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
