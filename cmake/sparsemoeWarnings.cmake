# SPDX-License-Identifier: MIT
#
# sparsemoe_set_warnings(<target>)
#
# Turns on the project's warning set for one of sparsemoe's OWN targets (tests,
# examples, benchmarks). Never use it on the sparsemoe INTERFACE target: its
# usage requirements would then leak warning flags into users' builds.
#
# -Werror is added when SPARSEMOE_WERROR is ON (the CI configuration).

include_guard(GLOBAL)

function(sparsemoe_set_warnings target)
  if(NOT TARGET ${target})
    message(FATAL_ERROR "sparsemoe_set_warnings: '${target}' is not a target")
  endif()
  if(CMAKE_CXX_COMPILER_ID MATCHES "^(GNU|Clang|AppleClang|IntelLLVM)$")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(SPARSEMOE_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
