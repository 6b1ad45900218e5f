# SPDX-License-Identifier: MIT
#
# Driver for the consumer tests (run by ctest as `cmake -D... -P consumer_test.cmake`).
# Each MODE configures, builds and runs a small project that uses sparsemoe the
# way a user would, with the same compiler and generator as the parent build.
#
#   MODE=install          configure sparsemoe (tests/examples/benchmarks off) in
#                         WORK_DIR/build and `cmake --install` it into PREFIX
#   MODE=find_package     tests/cmake/find_package against PREFIX
#   MODE=pkg_config       compile tests/cmake/main.cpp with
#                         `pkg-config --cflags --libs sparsemoe` against PREFIX
#   MODE=add_subdirectory tests/cmake/add_subdirectory against SOURCE_DIR
#   MODE=fetch_content    tests/cmake/fetch_content against SOURCE_DIR
#   MODE=readme           extract the README example and build it against SOURCE_DIR
#
# Other inputs: SOURCE_DIR, WORK_DIR, PREFIX, GENERATOR, MAKE_PROGRAM, CXX_COMPILER,
# CONFIG, Eigen3_DIR, USE_OPENMP, WERROR, EXPECTED_VERSION.

cmake_minimum_required(VERSION 3.20)

foreach(_var MODE SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "consumer_test.cmake: ${_var} is not set")
  endif()
endforeach()
if(NOT DEFINED USE_OPENMP)
  set(USE_OPENMP ON)
endif()
if(NOT DEFINED WERROR)
  set(WERROR OFF)
endif()

set(_tests_dir "${CMAKE_CURRENT_LIST_DIR}")

# Run a command, echo it, fail the test with its output if it fails.
function(run_checked)
  string(REPLACE ";" " " _pretty "${ARGV}")
  message(STATUS "+ ${_pretty}")
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "command failed (${_rc}): ${_pretty}")
  endif()
endfunction()

# Arguments shared by every child configure: same generator, compiler, build
# type and Eigen as the parent build.
set(_common_args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
if(DEFINED MAKE_PROGRAM AND NOT MAKE_PROGRAM STREQUAL "")
  list(APPEND _common_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(DEFINED CONFIG AND NOT CONFIG STREQUAL "")
  list(APPEND _common_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
  set(_config_args --config "${CONFIG}")
else()
  set(_config_args "")
endif()
if(DEFINED Eigen3_DIR AND NOT Eigen3_DIR STREQUAL "")
  list(APPEND _common_args "-DEigen3_DIR=${Eigen3_DIR}")
endif()

# Configure + build the consumer project in <src> into <bin>, then run <bin>/app.
function(build_and_run_consumer src bin)
  file(REMOVE_RECURSE "${bin}")
  run_checked("${CMAKE_COMMAND}" -S "${src}" -B "${bin}" ${_common_args} ${ARGN})
  run_checked("${CMAKE_COMMAND}" --build "${bin}" ${_config_args})
  set(_app "")
  foreach(_candidate "${bin}/app" "${bin}/app.exe" "${bin}/${CONFIG}/app" "${bin}/${CONFIG}/app.exe")
    if(EXISTS "${_candidate}" AND NOT IS_DIRECTORY "${_candidate}")
      set(_app "${_candidate}")
      break()
    endif()
  endforeach()
  if(_app STREQUAL "")
    message(FATAL_ERROR "consumer executable 'app' not found under ${bin}")
  endif()
  run_checked("${_app}")
endfunction()

if(MODE STREQUAL "install")
  if(NOT DEFINED PREFIX)
    message(FATAL_ERROR "consumer_test.cmake: PREFIX is not set")
  endif()
  set(_bin "${WORK_DIR}/build")
  file(REMOVE_RECURSE "${_bin}" "${PREFIX}")
  run_checked("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${_bin}" ${_common_args}
    "-DCMAKE_INSTALL_PREFIX=${PREFIX}"
    -DSPARSEMOE_INSTALL=ON
    -DSPARSEMOE_BUILD_TESTS=OFF
    -DSPARSEMOE_BUILD_EXAMPLES=OFF
    -DSPARSEMOE_BUILD_BENCHMARKS=OFF
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}")
  run_checked("${CMAKE_COMMAND}" --build "${_bin}" ${_config_args})
  run_checked("${CMAKE_COMMAND}" --install "${_bin}" ${_config_args})
  # The layout users (and the README) rely on.
  foreach(_f
      include/sparsemoe/sparsemoe.hpp
      share/cmake/sparsemoe/sparsemoeConfig.cmake
      share/cmake/sparsemoe/sparsemoeConfigVersion.cmake
      share/cmake/sparsemoe/sparsemoeTargets.cmake
      share/pkgconfig/sparsemoe.pc)
    if(NOT EXISTS "${PREFIX}/${_f}")
      message(FATAL_ERROR "install layout: ${PREFIX}/${_f} is missing")
    endif()
  endforeach()
  message(STATUS "installed sparsemoe into ${PREFIX}")

elseif(MODE STREQUAL "find_package")
  build_and_run_consumer("${_tests_dir}/find_package" "${WORK_DIR}/build"
    "-DCMAKE_PREFIX_PATH=${PREFIX}"
    "-DSPARSEMOE_EXPECTED_PREFIX=${PREFIX}"
    "-DSPARSEMOE_EXPECTED_VERSION=${EXPECTED_VERSION}")

elseif(MODE STREQUAL "add_subdirectory")
  build_and_run_consumer("${_tests_dir}/add_subdirectory" "${WORK_DIR}/build"
    "-DSPARSEMOE_SOURCE_DIR=${SOURCE_DIR}"
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}")

elseif(MODE STREQUAL "fetch_content")
  build_and_run_consumer("${_tests_dir}/fetch_content" "${WORK_DIR}/build"
    "-DSPARSEMOE_SOURCE_DIR=${SOURCE_DIR}"
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}")

elseif(MODE STREQUAL "readme")
  set(_cpp "${WORK_DIR}/readme_example.cpp")
  file(MAKE_DIRECTORY "${WORK_DIR}")
  run_checked("${CMAKE_COMMAND}" "-DREADME=${SOURCE_DIR}/README.md" "-DOUTPUT=${_cpp}"
    -P "${SOURCE_DIR}/cmake/ExtractReadmeExample.cmake")
  build_and_run_consumer("${_tests_dir}/readme_example" "${WORK_DIR}/build"
    "-DSPARSEMOE_SOURCE_DIR=${SOURCE_DIR}"
    "-DREADME_EXAMPLE_SOURCE=${_cpp}"
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}"
    "-DSPARSEMOE_WERROR=${WERROR}")

elseif(MODE STREQUAL "pkg_config")
  find_program(_pkg_config NAMES pkg-config pkgconf)
  if(NOT _pkg_config)
    # Matched by the test's SKIP_REGULAR_EXPRESSION (cmake -P cannot choose its
    # exit code before CMake 3.29).
    message("SPARSEMOE_TEST_SKIPPED: pkg-config not found")
    return()
  endif()
  set(_pcdir "${PREFIX}/share/pkgconfig")
  if(DEFINED ENV{PKG_CONFIG_PATH} AND NOT "$ENV{PKG_CONFIG_PATH}" STREQUAL "")
    set(ENV{PKG_CONFIG_PATH} "${_pcdir}:$ENV{PKG_CONFIG_PATH}")
  else()
    set(ENV{PKG_CONFIG_PATH} "${_pcdir}")
  endif()
  message(STATUS "PKG_CONFIG_PATH=$ENV{PKG_CONFIG_PATH}")

  execute_process(COMMAND "${_pkg_config}" --modversion sparsemoe
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _version ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --modversion sparsemoe failed: ${_err}")
  endif()
  if(DEFINED EXPECTED_VERSION AND NOT _version STREQUAL EXPECTED_VERSION)
    message(FATAL_ERROR "pkg-config reports sparsemoe ${_version}, expected ${EXPECTED_VERSION}")
  endif()
  execute_process(COMMAND "${_pkg_config}" --cflags sparsemoe
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _cflags ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --cflags sparsemoe failed: ${_err}")
  endif()
  execute_process(COMMAND "${_pkg_config}" --libs sparsemoe
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _libs ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --libs sparsemoe failed: ${_err}")
  endif()
  message(STATUS "pkg-config: cflags='${_cflags}' libs='${_libs}'")
  # The include flag must point into PREFIX (not at some other installed copy);
  # with the ${pcfiledir}-relative prefix it reads <prefix>/share/pkgconfig/../../include.
  separate_arguments(_cflag_list UNIX_COMMAND "${_cflags}")
  get_filename_component(_want_inc "${PREFIX}/include" REALPATH)
  set(_found_inc FALSE)
  foreach(_flag IN LISTS _cflag_list)
    if(_flag MATCHES "^-I(.+)$")
      get_filename_component(_inc "${CMAKE_MATCH_1}" REALPATH)
      if(_inc STREQUAL _want_inc)
        set(_found_inc TRUE)
      endif()
    endif()
  endforeach()
  if(NOT _found_inc)
    message(FATAL_ERROR "pkg-config --cflags sparsemoe does not point at ${PREFIX}/include: ${_cflags}")
  endif()

  separate_arguments(_lib_list UNIX_COMMAND "${_libs}")
  file(REMOVE_RECURSE "${WORK_DIR}/build")
  file(MAKE_DIRECTORY "${WORK_DIR}/build")
  run_checked("${CXX_COMPILER}" -std=c++17 ${_cflag_list}
    "${_tests_dir}/main.cpp" -o "${WORK_DIR}/build/app" ${_lib_list})
  run_checked("${WORK_DIR}/build/app")

else()
  message(FATAL_ERROR "consumer_test.cmake: unknown MODE '${MODE}'")
endif()
