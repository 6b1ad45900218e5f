# SPDX-License-Identifier: MIT
#
# sparsemoe_set_warnings(<target>)
#
# Turns on the project's warning set for one of sparsemoe's OWN targets (tests,
# examples, benchmarks). Never use it on the sparsemoe INTERFACE target: its
# usage requirements would then leak warning flags into users' builds.
#
# -Werror is added when SPARSEMOE_WERROR is ON (the CI configuration). The target
# also compiles as ISO C++17 without compiler extensions (-std=c++17, not gnu++17),
# so that nothing non-standard slips into the headers unnoticed.
#
# sparsemoe_set_native(<target>)
#
# Compiles one of the project's own examples or benchmarks for the build machine's
# CPU (-march=native) when SPARSEMOE_NATIVE is ON, so Eigen uses AVX2/AVX-512 there.
# Users of the library choose their own architecture flags.

include_guard(GLOBAL)

function(sparsemoe_set_warnings target)
  if(NOT TARGET ${target})
    message(FATAL_ERROR "sparsemoe_set_warnings: '${target}' is not a target")
  endif()
  set_target_properties(${target} PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON CXX_EXTENSIONS OFF)
  if(CMAKE_CXX_COMPILER_ID MATCHES "^(GNU|Clang|AppleClang|IntelLLVM)$")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(SPARSEMOE_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()

function(sparsemoe_set_native target)
  if(SPARSEMOE_NATIVE AND CMAKE_CXX_COMPILER_ID MATCHES "^(GNU|Clang|IntelLLVM)$")
    target_compile_options(${target} PRIVATE -march=native)
    # GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized inside its own intrinsics
    # (GCC bug 105593, fixed in GCC 13); it is not about this project's code.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
  endif()
endfunction()
