# SPDX-License-Identifier: MIT
#
# Optional MPI support of sparsemoe's own build: the expert-parallel layer of
# include/sparsemoe/distributed.hpp. Include this from the top-level CMakeLists.txt AFTER
# add_library(sparsemoe INTERFACE):
#
#   include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/sparsemoeMpi.cmake)
#
# Defines:
#   option SPARSEMOE_USE_MPI  default ON when an MPI with C++ support is found
#   SPARSEMOE_WITH_MPI        ON when the target below exists
#   target sparsemoe_mpi (alias sparsemoe::mpi), an INTERFACE target = sparsemoe::sparsemoe plus
#     MPI::MPI_CXX, for code that includes <sparsemoe/distributed.hpp>
#   SPARSEMOE_MPI_TEST_FLAGS      launcher flags of the MPI tests, after -n N (cache)
#
# The core target sparsemoe::sparsemoe never links MPI and no header of the umbrella
# sparsemoe.hpp includes mpi.h. Only MPI's C API is used: MPI_CXX_SKIP_MPICXX keeps the
# deprecated C++ bindings (and their library) out. As for libxsmm, the link to MPI::MPI_CXX is
# recorded in the build interface only; the installed sparsemoeConfig.cmake finds MPI again on
# the consumer's machine (component `mpi`).

include_guard(GLOBAL)

if(NOT DEFINED MPI_CXX_SKIP_MPICXX)
  set(MPI_CXX_SKIP_MPICXX ON)
endif()
find_package(MPI QUIET COMPONENTS CXX)

option(SPARSEMOE_USE_MPI "Build sparsemoe::mpi (distributed.hpp, expert parallelism) and its tests" ${MPI_CXX_FOUND})

set(SPARSEMOE_WITH_MPI OFF)
if(SPARSEMOE_USE_MPI)
  if(NOT MPI_CXX_FOUND)
    message(FATAL_ERROR
      "sparsemoe: SPARSEMOE_USE_MPI is ON but no MPI with C++ support was found (Debian: apt-get install "
      "libopenmpi-dev openmpi-bin, or libmpich-dev mpich). Configure with -DSPARSEMOE_USE_MPI=OFF to leave "
      "expert parallelism out, or point MPI_HOME (or MPI_CXX_COMPILER) at an MPI installation.")
  endif()
  set(SPARSEMOE_WITH_MPI ON)
  add_library(sparsemoe_mpi INTERFACE)
  add_library(sparsemoe::mpi ALIAS sparsemoe_mpi)
  set_target_properties(sparsemoe_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(sparsemoe_mpi INTERFACE sparsemoe $<BUILD_INTERFACE:MPI::MPI_CXX>)
  # The tests' launcher flags: ranks beyond the cores are allowed (Open MPI: --oversubscribe;
  # MPICH's launcher does it by default), and Open MPI is told that running as root is fine when
  # the configure runs as root (as CI does).
  set(_sparsemoe_mpi_flags ${MPIEXEC_PREFLAGS})
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _sparsemoe_mpiexec_version
    ERROR_VARIABLE _sparsemoe_mpiexec_version RESULT_VARIABLE _sparsemoe_mpiexec_rc)
  if(_sparsemoe_mpiexec_version MATCHES "Open MPI|OpenRTE")
    list(APPEND _sparsemoe_mpi_flags --oversubscribe)
    execute_process(COMMAND id -u OUTPUT_VARIABLE _sparsemoe_uid OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _sparsemoe_id_rc ERROR_QUIET)
    if(_sparsemoe_id_rc EQUAL 0 AND _sparsemoe_uid STREQUAL "0")
      list(APPEND _sparsemoe_mpi_flags --allow-run-as-root)
    endif()
  endif()
  set(SPARSEMOE_MPI_TEST_FLAGS "${_sparsemoe_mpi_flags}" CACHE STRING
    "Launcher flags of the MPI tests, after -n N (default: Open MPI's --oversubscribe, and --allow-run-as-root as root)")
  mark_as_advanced(SPARSEMOE_MPI_TEST_FLAGS)
  message(STATUS "sparsemoe: MPI ${MPI_CXX_VERSION} found: sparsemoe::mpi (distributed.hpp) enabled, "
    "launcher ${MPIEXEC_EXECUTABLE}")
else()
  message(STATUS "sparsemoe: MPI not found or SPARSEMOE_USE_MPI=OFF (Debian: libopenmpi-dev openmpi-bin): "
    "sparsemoe::mpi (distributed.hpp) and the MPI tests are left out")
endif()
