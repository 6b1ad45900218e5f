# SPDX-License-Identifier: MIT
#
# sparsemoe_find_libxsmm(<found-var> [GLOBAL])
#
# Looks for libxsmm on THIS machine and, when its header and both archives are there, defines the
# imported INTERFACE target sparsemoe::libxsmm that selects sparsemoe's libxsmm GEMM backend:
#
#   INTERFACE_COMPILE_DEFINITIONS  SPARSEMOE_WITH_LIBXSMM=1  (the macro the headers test)
#   INTERFACE_INCLUDE_DIRECTORIES  the directory of libxsmm.h
#   INTERFACE_LINK_LIBRARIES       libxsmm, then libxsmmnoblas, then threads, dl, rt, m
#
# <found-var> is set to TRUE or FALSE in the caller's scope, and SPARSEMOE_LIBXSMM_VERSION to the
# version found (empty when unknown). GLOBAL makes the imported target visible everywhere.
#
# sparsemoe's own build calls it from cmake/sparsemoeLibxsmm.cmake. It is also installed next to
# sparsemoeConfig.cmake, which calls it at the CONSUMER's configure time: the installed package
# names no path of the machine it was built on, and works wherever libxsmm lives on the consumer's
# machine (or without libxsmm, with the Eigen backend).
#
# Search: pkg-config's module `libxsmm`, when pkg-config is installed, gives hints; then plain
# find_path/find_library over CMake's usual places (CMAKE_PREFIX_PATH, the environment variable
# LIBXSMM_ROOT, the system directories), so pkg-config is not needed. The results are cached as
# SPARSEMOE_LIBXSMM_INCLUDE_DIR, SPARSEMOE_LIBXSMM_LIBRARY and SPARSEMOE_LIBXSMMNOBLAS_LIBRARY;
# set those to point at another libxsmm.
#
# Why libxsmmnoblas, and why in that order: libxsmm.a references the BLAS symbols sgemm_, dgemm_,
# sgemv_, dgemv_ (its libxsmm_?gemm fall back to BLAS). sparsemoe only calls dispatched JIT kernels
# and never reaches that fallback, so the references are satisfied by libxsmm's own stub library
# instead of a real BLAS (OpenBLAS/BLIS would bring their own thread pools). Debian's
# libxsmmnoblas.pc lists "-lxsmmnoblas -lxsmm", which fails to link statically (the stubs come
# before the archive that needs them), so libxsmm is linked first and the stubs after it.

include_guard(GLOBAL)

function(sparsemoe_find_libxsmm found_var)
  cmake_parse_arguments(PARSE_ARGV 1 _arg "GLOBAL" "" "")
  set(SPARSEMOE_LIBXSMM_VERSION "" PARENT_SCOPE)
  if(TARGET sparsemoe::libxsmm)
    get_target_property(_version sparsemoe::libxsmm SPARSEMOE_LIBXSMM_VERSION)
    if(_version)
      set(SPARSEMOE_LIBXSMM_VERSION "${_version}" PARENT_SCOPE)
    endif()
    set(${found_var} TRUE PARENT_SCOPE)
    return()
  endif()

  set(_include_hints "")
  set(_library_hints "")
  set(_version "")
  find_package(PkgConfig QUIET)
  if(PKG_CONFIG_FOUND)
    pkg_check_modules(_sparsemoe_libxsmm_pc QUIET libxsmm)
    if(_sparsemoe_libxsmm_pc_FOUND)
      list(APPEND _include_hints ${_sparsemoe_libxsmm_pc_INCLUDEDIR} ${_sparsemoe_libxsmm_pc_INCLUDE_DIRS})
      list(APPEND _library_hints ${_sparsemoe_libxsmm_pc_LIBDIR} ${_sparsemoe_libxsmm_pc_LIBRARY_DIRS})
      set(_version "${_sparsemoe_libxsmm_pc_VERSION}")
    endif()
  endif()

  find_path(SPARSEMOE_LIBXSMM_INCLUDE_DIR NAMES libxsmm.h
    HINTS ${_include_hints} ENV LIBXSMM_ROOT PATH_SUFFIXES include
    DOC "Directory of libxsmm.h (sparsemoe's libxsmm GEMM backend)")
  find_library(SPARSEMOE_LIBXSMM_LIBRARY NAMES xsmm
    HINTS ${_library_hints} ENV LIBXSMM_ROOT PATH_SUFFIXES lib
    DOC "libxsmm (sparsemoe's libxsmm GEMM backend)")
  find_library(SPARSEMOE_LIBXSMMNOBLAS_LIBRARY NAMES xsmmnoblas
    HINTS ${_library_hints} ENV LIBXSMM_ROOT PATH_SUFFIXES lib
    DOC "libxsmm's BLAS stubs, libxsmmnoblas (sparsemoe's libxsmm GEMM backend)")
  mark_as_advanced(SPARSEMOE_LIBXSMM_INCLUDE_DIR SPARSEMOE_LIBXSMM_LIBRARY SPARSEMOE_LIBXSMMNOBLAS_LIBRARY)

  if(NOT SPARSEMOE_LIBXSMM_INCLUDE_DIR OR NOT SPARSEMOE_LIBXSMM_LIBRARY OR NOT SPARSEMOE_LIBXSMMNOBLAS_LIBRARY)
    set(${found_var} FALSE PARENT_SCOPE)
    return()
  endif()

  if(_version STREQUAL "" AND EXISTS "${SPARSEMOE_LIBXSMM_INCLUDE_DIR}/libxsmm_version.h")
    file(STRINGS "${SPARSEMOE_LIBXSMM_INCLUDE_DIR}/libxsmm_version.h" _line
      REGEX "^#define LIBXSMM_CONFIG_VERSION \"[^\"]*\"")
    if(_line MATCHES "\"([^\"]*)\"")
      set(_version "${CMAKE_MATCH_1}")
    endif()
  endif()

  # libxsmm's own link dependencies (its libxsmm.pc: -lpthread -lrt -ldl -lm).
  set(_system_libraries "")
  set(THREADS_PREFER_PTHREAD_FLAG ON)
  find_package(Threads QUIET)
  if(Threads_FOUND)
    list(APPEND _system_libraries Threads::Threads)
  endif()
  list(APPEND _system_libraries ${CMAKE_DL_LIBS})
  if(UNIX AND NOT APPLE)
    list(APPEND _system_libraries rt)
  endif()
  if(UNIX)
    list(APPEND _system_libraries m)
  endif()

  if(_arg_GLOBAL OR CMAKE_FIND_PACKAGE_TARGETS_GLOBAL)
    add_library(sparsemoe::libxsmm INTERFACE IMPORTED GLOBAL)
  else()
    add_library(sparsemoe::libxsmm INTERFACE IMPORTED)
  endif()
  set_target_properties(sparsemoe::libxsmm PROPERTIES
    INTERFACE_COMPILE_DEFINITIONS "SPARSEMOE_WITH_LIBXSMM=1"
    INTERFACE_INCLUDE_DIRECTORIES "${SPARSEMOE_LIBXSMM_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${SPARSEMOE_LIBXSMM_LIBRARY};${SPARSEMOE_LIBXSMMNOBLAS_LIBRARY};${_system_libraries}"
    SPARSEMOE_LIBXSMM_VERSION "${_version}")
  set(SPARSEMOE_LIBXSMM_VERSION "${_version}" PARENT_SCOPE)
  set(${found_var} TRUE PARENT_SCOPE)
endfunction()
