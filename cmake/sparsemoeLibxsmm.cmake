# SPDX-License-Identifier: MIT
#
# Optional libxsmm GEMM backend (include/sparsemoe/detail/gemm_libxsmm.hpp).
# Include this from the top-level CMakeLists.txt AFTER add_library(sparsemoe INTERFACE):
#
#   include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/sparsemoeLibxsmm.cmake)
#
# Defines:
#   option SPARSEMOE_USE_LIBXSMM  default ON when pkg-config finds libxsmm, else OFF
#   SPARSEMOE_WITH_LIBXSMM        ON when the backend is compiled in (for sparsemoeConfig.cmake.in)
# and, when enabled, gives the INTERFACE target `sparsemoe`:
#   - the compile definition SPARSEMOE_WITH_LIBXSMM=1 (selects the backend at compile time),
#   - the link to libxsmm (PkgConfig::SPARSEMOE_LIBXSMM) followed by the libxsmmnoblas archive
#     (full path in SPARSEMOE_LIBXSMMNOBLAS_LIBRARY).
#
# Why libxsmmnoblas, and why in that order: libxsmm.a references the BLAS symbols sgemm_, dgemm_,
# sgemv_, dgemv_ (its libxsmm_?gemm fall back to BLAS). sparsemoe only calls dispatched JIT kernels
# and never reaches that fallback, so we satisfy the references with libxsmm's own stub library
# instead of a real BLAS (OpenBLAS/BLIS would bring their own thread pools, see issue 5). Debian's
# libxsmmnoblas.pc lists "-lxsmmnoblas -lxsmm", which fails to link statically (the stubs come
# before the archive that needs them), so libxsmm is linked first and the stubs after it.
#
# Installed consumers: the exported INTERFACE_LINK_LIBRARIES name PkgConfig::SPARSEMOE_LIBXSMM
# (and the stub archive by absolute path), so sparsemoeConfig.cmake.in must recreate that imported
# target before including sparsemoeTargets.cmake:
#
#   set(sparsemoe_WITH_LIBXSMM @SPARSEMOE_WITH_LIBXSMM@)
#   if(sparsemoe_WITH_LIBXSMM)
#     find_dependency(PkgConfig)
#     pkg_check_modules(SPARSEMOE_LIBXSMM REQUIRED QUIET IMPORTED_TARGET libxsmm)
#   endif()
#
# and sparsemoe.pc.in needs, when SPARSEMOE_WITH_LIBXSMM is ON, "Requires.private"-free plain
# "Libs: -lxsmm -lxsmmnoblas -lpthread -lrt -ldl -lm" (in that order) and
# "Cflags: -DSPARSEMOE_WITH_LIBXSMM=1".

find_package(PkgConfig QUIET)
set(_sparsemoe_libxsmm_found OFF)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(SPARSEMOE_LIBXSMM QUIET IMPORTED_TARGET GLOBAL libxsmm)
  if(SPARSEMOE_LIBXSMM_FOUND)
    # The BLAS stub archive, by full path (the pkg-config target of libxsmmnoblas would drag
    # libxsmm.a along and CMake would de-duplicate it into the wrong order).
    pkg_get_variable(_sparsemoe_libxsmm_libdir libxsmm libdir)
    find_library(SPARSEMOE_LIBXSMMNOBLAS_LIBRARY NAMES xsmmnoblas
      HINTS ${_sparsemoe_libxsmm_libdir} ${SPARSEMOE_LIBXSMM_LIBRARY_DIRS})
    unset(_sparsemoe_libxsmm_libdir)
    if(SPARSEMOE_LIBXSMMNOBLAS_LIBRARY)
      set(_sparsemoe_libxsmm_found ON)
    endif()
  endif()
endif()

option(SPARSEMOE_USE_LIBXSMM "Use libxsmm JIT kernels for sparsemoe's GEMMs (needs libxsmm + libxsmmnoblas via pkg-config)"
  ${_sparsemoe_libxsmm_found})

set(SPARSEMOE_WITH_LIBXSMM OFF)
if(SPARSEMOE_USE_LIBXSMM)
  if(NOT _sparsemoe_libxsmm_found)
    message(FATAL_ERROR
      "sparsemoe: SPARSEMOE_USE_LIBXSMM is ON but pkg-config did not find libxsmm and libxsmmnoblas "
      "(Debian: apt-get install libxsmm-dev pkg-config). Configure with -DSPARSEMOE_USE_LIBXSMM=OFF "
      "to use the plain Eigen backend.")
  endif()
  set(SPARSEMOE_WITH_LIBXSMM ON)
  target_compile_definitions(sparsemoe INTERFACE SPARSEMOE_WITH_LIBXSMM=1)
  # libxsmm first, its BLAS stubs after it (see above).
  target_link_libraries(sparsemoe INTERFACE PkgConfig::SPARSEMOE_LIBXSMM "${SPARSEMOE_LIBXSMMNOBLAS_LIBRARY}")
  message(STATUS "sparsemoe: libxsmm ${SPARSEMOE_LIBXSMM_VERSION} GEMM backend enabled")
else()
  message(STATUS "sparsemoe: GEMM backend Eigen (SPARSEMOE_USE_LIBXSMM=OFF)")
endif()
unset(_sparsemoe_libxsmm_found)
