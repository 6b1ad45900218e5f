# SPDX-License-Identifier: MIT
#
# Tests of examples/train and the scripts around it (label "examples"; tests/cmake/train_example.cmake
# runs them): each router for a few tiny steps (exit 0, the summary line, a routing log that
# respects the capacity), each other paradigm (expert choice, hash, Soft MoE, hierarchical: exit 0,
# the summary line, the per-step log), an unknown router (exit 2 with the list of valid ones), the
# compare-routers table, and, where gnuplot is installed, plot-routing and plot-losses PNGs; and
# examples/serve on a tiny random block, fp32 and --bf16. Seconds in all.
if(NOT SPARSEMOE_BUILD_EXAMPLES)
  return()
endif()

function(sparsemoe_add_train_test name mode)
  add_test(NAME ${name}
    COMMAND ${CMAKE_COMMAND} -DMODE=${mode} "-DTRAIN=$<TARGET_FILE:train>" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
      "-DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/examples/${name}" ${ARGN}
      -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/train_example.cmake)
  set_tests_properties(${name} PROPERTIES LABELS examples TIMEOUT 120)
endfunction()

foreach(_router IN ITEMS default noisy-top-k softmax-top-k switch gshard sigmoid-bias)
  sparsemoe_add_train_test(example_train_${_router} router -DROUTER=${_router})
endforeach()
foreach(_paradigm IN ITEMS expert-choice hash soft-moe hierarchical)
  sparsemoe_add_train_test(example_train_${_paradigm} paradigm -DROUTER=${_paradigm})
endforeach()
sparsemoe_add_train_test(example_train_unknown_router unknown)

find_program(SPARSEMOE_BASH bash)
mark_as_advanced(SPARSEMOE_BASH)
if(SPARSEMOE_BASH)
  sparsemoe_add_train_test(example_compare_routers compare)
  find_program(SPARSEMOE_GNUPLOT gnuplot)
  mark_as_advanced(SPARSEMOE_GNUPLOT)
  if(SPARSEMOE_GNUPLOT)
    sparsemoe_add_train_test(example_plot_routing plot)
  else()
    message(STATUS "sparsemoe: gnuplot not found: example_plot_routing is not run")
  endif()
endif()

# examples/serve on a tiny random block, fp32 packed and --bf16 (bf16 expert weights): exit 0
# and the per-batch table; with --bf16 the line naming the bf16 experts and their kernel.
if(SPARSEMOE_WITH_NLOHMANN_JSON)  # examples/serve is built (examples/CMakeLists.txt)
  add_test(NAME example_serve_tiny
    COMMAND serve --family qwen3-moe --layer-shape tiny --batches 1,16 --repeats 1 --bandwidth-mb 16)
  add_test(NAME example_serve_tiny_bf16
    COMMAND serve --family deepseek-v3 --layer-shape tiny --batches 1,16 --repeats 1 --bandwidth-mb 16 --bf16)
  set_tests_properties(example_serve_tiny PROPERTIES LABELS examples TIMEOUT 120
    PASS_REGULAR_EXPRESSION "GB/s counts the expert weights")
  set_tests_properties(example_serve_tiny_bf16 PROPERTIES LABELS examples TIMEOUT 120
    PASS_REGULAR_EXPRESSION "bf16 experts: [^\n]* kernel\n.*as bf16")
endif()
