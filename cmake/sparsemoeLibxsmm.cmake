# SPDX-License-Identifier: MIT
#
# Optional libxsmm GEMM backend (include/sparsemoe/detail/gemm_libxsmm.hpp) of sparsemoe's own
# build. Include this from the top-level CMakeLists.txt AFTER add_library(sparsemoe INTERFACE):
#
#   include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/sparsemoeLibxsmm.cmake)
#
# Defines:
#   option SPARSEMOE_USE_LIBXSMM  default ON when libxsmm is found (sparsemoeFindLibxsmm.cmake)
#   SPARSEMOE_WITH_LIBXSMM        ON when the backend is compiled in
# and, when enabled, links the INTERFACE target `sparsemoe` to sparsemoe::libxsmm (the compile
# definition SPARSEMOE_WITH_LIBXSMM=1 and libxsmm + libxsmmnoblas, in that order) in the BUILD
# interface only. The installed package does not record that link: sparsemoeConfig.cmake looks
# for libxsmm again on the consumer's machine, with the same sparsemoeFindLibxsmm.cmake, and adds
# it there (or falls back to the Eigen backend), so no path of this machine is exported.

include(${CMAKE_CURRENT_LIST_DIR}/sparsemoeFindLibxsmm.cmake)

sparsemoe_find_libxsmm(_sparsemoe_libxsmm_found GLOBAL)

option(SPARSEMOE_USE_LIBXSMM
  "Use libxsmm JIT kernels for sparsemoe's GEMMs (needs libxsmm.h, libxsmm and libxsmmnoblas)"
  ${_sparsemoe_libxsmm_found})

set(SPARSEMOE_WITH_LIBXSMM OFF)
if(SPARSEMOE_USE_LIBXSMM)
  if(NOT _sparsemoe_libxsmm_found)
    message(FATAL_ERROR
      "sparsemoe: SPARSEMOE_USE_LIBXSMM is ON but libxsmm was not found (libxsmm.h: "
      "'${SPARSEMOE_LIBXSMM_INCLUDE_DIR}', libxsmm: '${SPARSEMOE_LIBXSMM_LIBRARY}', libxsmmnoblas: "
      "'${SPARSEMOE_LIBXSMMNOBLAS_LIBRARY}'; Debian: apt-get install libxsmm-dev). Configure with "
      "-DSPARSEMOE_USE_LIBXSMM=OFF to use the plain Eigen backend, or point CMAKE_PREFIX_PATH or "
      "LIBXSMM_ROOT at a libxsmm installation.")
  endif()
  set(SPARSEMOE_WITH_LIBXSMM ON)
  target_link_libraries(sparsemoe INTERFACE $<BUILD_INTERFACE:sparsemoe::libxsmm>)
  message(STATUS "sparsemoe: libxsmm ${SPARSEMOE_LIBXSMM_VERSION} GEMM backend enabled (${SPARSEMOE_LIBXSMM_LIBRARY})")
else()
  message(STATUS "sparsemoe: GEMM backend Eigen (SPARSEMOE_USE_LIBXSMM=OFF)")
endif()
unset(_sparsemoe_libxsmm_found)
