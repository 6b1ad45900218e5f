# SPDX-License-Identifier: MIT
#
# Driver for the consumer tests (run by ctest as `cmake -D... -P consumer_test.cmake`).
# Each MODE configures, builds and runs a small project that uses sparsemoe the way a user
# would, or runs the README's commands exactly as written (extracted from README.md by
# cmake/ExtractReadmeExample.cmake, marker by marker).
#
#   MODE=install          configure sparsemoe (tests/examples/benchmarks off), `cmake --install`
#                         it into STAGING_PREFIX, then MOVE that prefix to PREFIX
#                         (= CONSUMER_HOME/.local): the package must be relocatable. Checks the
#                         layout and that no installed CMake or pkg-config file names an
#                         absolute path (of this machine, the build tree or the staging prefix).
#   MODE=find_package     the README's CMake project (<!-- readme-cmake-project -->) plus its
#                         find_package lines (<!-- readme-find-package -->), configured and built
#                         by the README's commands (<!-- readme-find-package-build -->) with
#                         HOME=CONSUMER_HOME. VARIANT=no_pkg_config (the consumer has no
#                         pkg-config) or VARIANT=eigen_backend (SPARSEMOE_USE_LIBXSMM=OFF)
#                         configure with the parent's settings plus that change instead.
#   MODE=pkg_config       the README's pkg-config lines (<!-- readme-pkg-config -->), then its
#                         include-path-only lines (<!-- readme-plain-compile -->), run with
#                         HOME=CONSUMER_HOME and tests/cmake/main.cpp as app.cpp
#   MODE=add_subdirectory the README's project plus <!-- readme-add-subdirectory -->, with
#                         third_party/sparsemoe a link to SOURCE_DIR
#   MODE=fetch_content    the same with <!-- readme-fetch-content -->
#   MODE=readme           extract the README's usage example and its training-with-checkpoints
#                         example (<!-- readme-training-example -->), build both against
#                         SOURCE_DIR and run them
#   MODE=install_recipe   the README's build-and-install recipe (<!-- readme-install -->) run in a
#                         copy of the source tree with HOME=WORK_DIR/home
#   MODE=no_gtest         a top-level configure with GoogleTest and Google Benchmark hidden must
#                         succeed and say that it turned the unit tests and benchmarks off
#   MODE=macro_name       compiling the headers with SPARSEMOE_USE_LIBXSMM (the CMake option's
#                         name) or SPARSEMOE_WITH_LIBXSMM=0 defined must fail with a message
#   MODE=mpi_component    tests/cmake/mpi_component against the installed package (COMPONENTS
#                         mpi, target sparsemoe::mpi), run with MPIEXEC -n 2 MPIEXEC_FLAGS;
#                         skipped when WITH_MPI is off
#   MODE=extern_templates tests/cmake/extern_templates at -O2: user.cpp with
#                         SPARSEMOE_EXTERN_TEMPLATES plus instances.cpp builds and runs, user.cpp
#                         alone fails to link
#
# Other inputs: SOURCE_DIR, WORK_DIR, PREFIX, STAGING_PREFIX, CONSUMER_HOME, GENERATOR,
# MAKE_PROGRAM, CXX_COMPILER, CONFIG, Eigen3_DIR, EIGEN_INCLUDE_DIRS, USE_OPENMP, USE_LIBXSMM,
# WITH_LIBXSMM, WERROR, EXPECTED_VERSION.

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
if(WITH_LIBXSMM)
  set(_expect_libxsmm 1)
else()
  set(_expect_libxsmm 0)
endif()

set(_tests_dir "${CMAKE_CURRENT_LIST_DIR}")
set(_readme "${SOURCE_DIR}/README.md")

# Run a command, echo it, fail the test with its output if it fails.
function(run_checked)
  string(REPLACE ";" " " _pretty "${ARGV}")
  message(STATUS "+ ${_pretty}")
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "command failed (${_rc}): ${_pretty}")
  endif()
endfunction()

# Write the README block after <!-- marker --> (a ```fence block) to `output`.
function(extract_readme_block marker fence output)
  run_checked("${CMAKE_COMMAND}" "-DREADME=${_readme}" "-DMARKER=${marker}" "-DFENCE=${fence}"
    "-DOUTPUT=${output}" -P "${SOURCE_DIR}/cmake/ExtractReadmeExample.cmake")
endfunction()

# Run the shell script `script` (README lines) with bash -e in `dir`, as a user would in a fresh
# shell: HOME=`home`, no PKG_CONFIG_PATH or CMAKE_PREFIX_PATH inherited, CXX = this build's compiler.
function(run_readme_script script dir home)
  file(READ "${script}" _text)
  message(STATUS "running in ${dir} with HOME=${home}:\n${_text}")
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env --unset=PKG_CONFIG_PATH --unset=CMAKE_PREFIX_PATH
      "HOME=${home}" "CXX=${CXX_COMPILER}" bash -e "${script}"
    WORKING_DIRECTORY "${dir}"
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "the README's commands failed (${_rc}): ${script}")
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

# Find <bin>/app (or its multi-config / .exe spelling) and run it.
function(run_app bin)
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

# Configure + build the consumer project in <src> into <bin>, then run <bin>/app.
function(build_consumer src bin)
  file(REMOVE_RECURSE "${bin}")
  run_checked("${CMAKE_COMMAND}" -S "${src}" -B "${bin}" ${_common_args} ${ARGN})
  run_checked("${CMAKE_COMMAND}" --build "${bin}" ${_config_args})
endfunction()

function(build_and_run_consumer src bin)
  build_consumer("${src}" "${bin}" ${ARGN})
  run_app("${bin}")
endfunction()

# A consumer project in <dir>: CMakeLists.txt = the README's project block + the README block
# after <!-- marker --> + `epilogue` (this test's checks), app.cpp = tests/cmake/main.cpp.
function(make_readme_project dir marker epilogue)
  file(REMOVE_RECURSE "${dir}")
  file(MAKE_DIRECTORY "${dir}")
  extract_readme_block(readme-cmake-project cmake "${dir}/project.cmake")
  extract_readme_block(${marker} cmake "${dir}/snippet.cmake")
  file(READ "${dir}/project.cmake" _project)
  file(READ "${dir}/snippet.cmake" _snippet)
  file(WRITE "${dir}/CMakeLists.txt"
    "${_project}${_snippet}\n# Checks added by tests/cmake/consumer_test.cmake (not in the README):\n${epilogue}\n")
  configure_file("${_tests_dir}/main.cpp" "${dir}/app.cpp" COPYONLY)
endfunction()

if(MODE STREQUAL "install")
  foreach(_var PREFIX STAGING_PREFIX)
    if(NOT DEFINED ${_var})
      message(FATAL_ERROR "consumer_test.cmake: ${_var} is not set")
    endif()
  endforeach()
  set(_bin "${WORK_DIR}/build")
  file(REMOVE_RECURSE "${_bin}" "${PREFIX}" "${STAGING_PREFIX}")
  set(_libxsmm_args "")
  if(DEFINED USE_LIBXSMM AND NOT USE_LIBXSMM STREQUAL "")
    set(_libxsmm_args "-DSPARSEMOE_USE_LIBXSMM=${USE_LIBXSMM}")
  endif()
  run_checked("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${_bin}" ${_common_args}
    "-DCMAKE_INSTALL_PREFIX=${STAGING_PREFIX}"
    -DSPARSEMOE_INSTALL=ON
    -DSPARSEMOE_BUILD_TESTS=OFF
    -DSPARSEMOE_BUILD_EXAMPLES=OFF
    -DSPARSEMOE_BUILD_BENCHMARKS=OFF
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}"
    ${_libxsmm_args})
  run_checked("${CMAKE_COMMAND}" --build "${_bin}" ${_config_args})
  run_checked("${CMAKE_COMMAND}" --install "${_bin}" ${_config_args})
  # Relocate: every consumer test uses the moved copy, and nothing may point back.
  get_filename_component(_parent "${PREFIX}" DIRECTORY)
  file(MAKE_DIRECTORY "${_parent}")
  file(RENAME "${STAGING_PREFIX}" "${PREFIX}")
  message(STATUS "installed into ${STAGING_PREFIX}, moved to ${PREFIX}")
  # The layout users (and the README) rely on.
  foreach(_f
      include/sparsemoe/sparsemoe.hpp
      share/cmake/sparsemoe/sparsemoeConfig.cmake
      share/cmake/sparsemoe/sparsemoeConfigVersion.cmake
      share/cmake/sparsemoe/sparsemoeTargets.cmake
      share/cmake/sparsemoe/sparsemoeFindLibxsmm.cmake
      share/pkgconfig/sparsemoe.pc)
    if(NOT EXISTS "${PREFIX}/${_f}")
      message(FATAL_ERROR "install layout: ${PREFIX}/${_f} is missing")
    endif()
  endforeach()
  # No installed package file may name the staging prefix, the source or build tree, and the
  # exported targets' INTERFACE_* properties no absolute path other than below ${_IMPORT_PREFIX}
  # (a path of this machine, e.g. of libxsmm, breaks consumers whose machine differs).
  file(GLOB _package_files "${PREFIX}/share/cmake/sparsemoe/*.cmake" "${PREFIX}/share/pkgconfig/*.pc")
  foreach(_file IN LISTS _package_files)
    file(READ "${_file}" _text)
    foreach(_path IN ITEMS "${STAGING_PREFIX}" "${SOURCE_DIR}" "${_bin}")
      string(FIND "${_text}" "${_path}" _pos)
      if(NOT _pos EQUAL -1)
        message(FATAL_ERROR "${_file} names '${_path}': the installed package is not relocatable")
      endif()
    endforeach()
    if(_file MATCHES "Targets")
      file(STRINGS "${_file}" _lines REGEX "^[ \t]*INTERFACE_[A-Z_]+ \"")
      foreach(_line IN LISTS _lines)
        string(REGEX REPLACE "^[ \t]*INTERFACE_[A-Z_]+ \"(.*)\"[ \t]*$" "\\1" _value "${_line}")
        string(REPLACE "\${_IMPORT_PREFIX}/" "" _value "${_value}")
        string(REPLACE "\${_IMPORT_PREFIX}" "" _value "${_value}")
        if(_value MATCHES "(^|;|:|<|>)/")
          message(FATAL_ERROR "${_file} exports an absolute path: ${_line}")
        endif()
      endforeach()
    endif()
  endforeach()

elseif(MODE STREQUAL "find_package")
  set(_src "${WORK_DIR}/src")
  set(_epilogue "
get_filename_component(_found_dir \"\${sparsemoe_DIR}\" REALPATH)
get_filename_component(_expected_prefix \"${PREFIX}\" REALPATH)
string(FIND \"\${_found_dir}\" \"\${_expected_prefix}/\" _pos)
if(NOT _pos EQUAL 0)
  message(FATAL_ERROR \"found sparsemoe in '\${sparsemoe_DIR}', expected it under '${PREFIX}'\")
endif()
if(NOT sparsemoe_VERSION VERSION_EQUAL \"${EXPECTED_VERSION}\")
  message(FATAL_ERROR \"found sparsemoe \${sparsemoe_VERSION}, expected ${EXPECTED_VERSION}\")
endif()
message(STATUS \"sparsemoe \${sparsemoe_VERSION} from \${sparsemoe_DIR} (OpenMP: \${sparsemoe_WITH_OPENMP}, libxsmm: \${sparsemoe_WITH_LIBXSMM})\")
if(DEFINED SPARSEMOE_TEST_EXPECT_LIBXSMM)
  set(_expect \${SPARSEMOE_TEST_EXPECT_LIBXSMM})
else()
  set(_expect ${_expect_libxsmm})
endif()
target_compile_definitions(app PRIVATE SPARSEMOE_EXPECT_LIBXSMM=\${_expect})
")
  make_readme_project("${_src}" readme-find-package "${_epilogue}")
  if(NOT DEFINED VARIANT OR VARIANT STREQUAL "")
    # Exactly the README's commands.
    extract_readme_block(readme-find-package-build sh "${WORK_DIR}/build.sh")
    run_readme_script("${WORK_DIR}/build.sh" "${_src}" "${CONSUMER_HOME}")
  elseif(VARIANT STREQUAL "no_pkg_config")
    # libxsmm must still be found (by find_library) when the install used it.
    build_and_run_consumer("${_src}" "${WORK_DIR}/build" "-DCMAKE_PREFIX_PATH=${PREFIX}"
      -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON)
  elseif(VARIANT STREQUAL "eigen_backend")
    build_and_run_consumer("${_src}" "${WORK_DIR}/build" "-DCMAKE_PREFIX_PATH=${PREFIX}"
      -DSPARSEMOE_USE_LIBXSMM=OFF -DSPARSEMOE_TEST_EXPECT_LIBXSMM=0)
  else()
    message(FATAL_ERROR "consumer_test.cmake: unknown VARIANT '${VARIANT}'")
  endif()

elseif(MODE STREQUAL "add_subdirectory" OR MODE STREQUAL "fetch_content")
  set(_src "${WORK_DIR}/src")
  string(REPLACE "_" "-" _marker "readme-${MODE}")
  set(_epilogue "
# Not the top-level project: sparsemoe must not build (or even look for the dependencies of) its
# tests, examples and benchmarks, nor install itself.
foreach(_opt SPARSEMOE_BUILD_TESTS SPARSEMOE_BUILD_EXAMPLES SPARSEMOE_BUILD_BENCHMARKS SPARSEMOE_INSTALL)
  if(\${_opt})
    message(FATAL_ERROR \"\${_opt} is ON in a subproject build; it must default to OFF\")
  endif()
endforeach()
if(TARGET test_odr OR TARGET forward_pass)
  message(FATAL_ERROR \"sparsemoe's own tests/examples were added in a subproject build\")
endif()
target_compile_definitions(app PRIVATE SPARSEMOE_EXPECT_LIBXSMM=${_expect_libxsmm})
")
  make_readme_project("${_src}" ${_marker} "${_epilogue}")
  file(MAKE_DIRECTORY "${_src}/third_party")
  file(CREATE_LINK "${SOURCE_DIR}" "${_src}/third_party/sparsemoe" SYMBOLIC)
  set(_args "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}")
  if(DEFINED USE_LIBXSMM AND NOT USE_LIBXSMM STREQUAL "")
    list(APPEND _args "-DSPARSEMOE_USE_LIBXSMM=${USE_LIBXSMM}")
  endif()
  build_and_run_consumer("${_src}" "${WORK_DIR}/build" ${_args})

elseif(MODE STREQUAL "readme")
  # The usage example (app) and the training-with-checkpoints example (training).
  set(_cpp "${WORK_DIR}/readme_example.cpp")
  set(_training_cpp "${WORK_DIR}/readme_training_example.cpp")
  file(MAKE_DIRECTORY "${WORK_DIR}")
  extract_readme_block(readme-example cpp "${_cpp}")
  extract_readme_block(readme-training-example cpp "${_training_cpp}")
  build_and_run_consumer("${_tests_dir}/readme_example" "${WORK_DIR}/build"
    "-DSPARSEMOE_SOURCE_DIR=${SOURCE_DIR}"
    "-DREADME_EXAMPLE_SOURCE=${_cpp}"
    "-DREADME_TRAINING_SOURCE=${_training_cpp}"
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}"
    "-DSPARSEMOE_WERROR=${WERROR}")
  # It writes moe.spmoe into its working directory.
  file(REMOVE "${WORK_DIR}/moe.spmoe")
  message(STATUS "+ ${WORK_DIR}/build/training (in ${WORK_DIR})")
  execute_process(COMMAND "${WORK_DIR}/build/training" WORKING_DIRECTORY "${WORK_DIR}" RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${WORK_DIR}/moe.spmoe")
    message(FATAL_ERROR "the README's training example failed (${_rc})")
  endif()

elseif(MODE STREQUAL "pkg_config")
  find_program(_pkg_config NAMES pkg-config pkgconf)
  if(NOT _pkg_config)
    # Matched by the test's SKIP_REGULAR_EXPRESSION (cmake -P cannot choose its
    # exit code before CMake 3.29).
    message("SPARSEMOE_TEST_SKIPPED: pkg-config not found")
    return()
  endif()
  # The include flag must point into PREFIX (not at some other installed copy); with the
  # ${pcfiledir}-relative prefix it reads <prefix>/share/pkgconfig/../../include.
  set(ENV{PKG_CONFIG_PATH} "${PREFIX}/share/pkgconfig")
  execute_process(COMMAND "${_pkg_config}" --modversion sparsemoe
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _version ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --modversion sparsemoe failed: ${_err}")
  endif()
  if(DEFINED EXPECTED_VERSION AND NOT _version STREQUAL EXPECTED_VERSION)
    message(FATAL_ERROR "pkg-config reports sparsemoe ${_version}, expected ${EXPECTED_VERSION}")
  endif()
  execute_process(COMMAND "${_pkg_config}" --cflags --libs sparsemoe
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _flags ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pkg-config --cflags --libs sparsemoe failed: ${_err}")
  endif()
  unset(ENV{PKG_CONFIG_PATH})
  message(STATUS "pkg-config --cflags --libs sparsemoe: ${_flags}")
  separate_arguments(_flag_list UNIX_COMMAND "${_flags}")
  get_filename_component(_want_inc "${PREFIX}/include" REALPATH)
  set(_found_inc FALSE)
  foreach(_flag IN LISTS _flag_list)
    if(_flag MATCHES "^-I(.+)$")
      get_filename_component(_inc "${CMAKE_MATCH_1}" REALPATH)
      if(_inc STREQUAL _want_inc)
        set(_found_inc TRUE)
      endif()
    endif()
  endforeach()
  if(NOT _found_inc)
    message(FATAL_ERROR "pkg-config --cflags sparsemoe does not point at ${PREFIX}/include: ${_flags}")
  endif()
  if(WITH_LIBXSMM AND NOT _flags MATCHES "-DSPARSEMOE_WITH_LIBXSMM=1")
    message(FATAL_ERROR "the install uses libxsmm but pkg-config's flags do not select it: ${_flags}")
  endif()

  # Exactly the README's lines, in a directory holding app.cpp.
  file(REMOVE_RECURSE "${WORK_DIR}")
  file(MAKE_DIRECTORY "${WORK_DIR}")
  configure_file("${_tests_dir}/main.cpp" "${WORK_DIR}/app.cpp" COPYONLY)
  extract_readme_block(readme-pkg-config sh "${WORK_DIR}/pkg_config.sh")
  run_readme_script("${WORK_DIR}/pkg_config.sh" "${WORK_DIR}" "${CONSUMER_HOME}")
  # And the README's include-path-only compile (the Eigen backend, no pkg-config).
  file(REMOVE "${WORK_DIR}/app")
  extract_readme_block(readme-plain-compile sh "${WORK_DIR}/plain_compile.sh")
  run_readme_script("${WORK_DIR}/plain_compile.sh" "${WORK_DIR}" "${CONSUMER_HOME}")

elseif(MODE STREQUAL "install_recipe")
  # A copy of the source tree as a clone has it (no build trees, no .git).
  set(_src "${WORK_DIR}/sparsemoe")
  set(_home "${WORK_DIR}/home")
  file(REMOVE_RECURSE "${WORK_DIR}")
  file(MAKE_DIRECTORY "${_src}" "${_home}")
  file(GLOB _entries RELATIVE "${SOURCE_DIR}" "${SOURCE_DIR}/*" "${SOURCE_DIR}/.*")
  foreach(_entry IN LISTS _entries)
    if(_entry MATCHES "^(\\.|\\.\\.|\\.git|build|build-.*|out|cmake-build-.*)$")
      continue()
    endif()
    file(COPY "${SOURCE_DIR}/${_entry}" DESTINATION "${_src}")
  endforeach()
  extract_readme_block(readme-install sh "${WORK_DIR}/install.sh")
  run_readme_script("${WORK_DIR}/install.sh" "${_src}" "${_home}")
  foreach(_f
      include/sparsemoe/sparsemoe.hpp
      share/cmake/sparsemoe/sparsemoeConfig.cmake
      share/pkgconfig/sparsemoe.pc)
    if(NOT EXISTS "${_home}/.local/${_f}")
      message(FATAL_ERROR "the README's install recipe did not install ${_home}/.local/${_f}")
    endif()
  endforeach()

elseif(MODE STREQUAL "no_gtest")
  set(_bin "${WORK_DIR}/build")
  file(REMOVE_RECURSE "${_bin}")
  # Top level, defaults (tests and benchmarks ON), with GoogleTest and Google Benchmark hidden.
  set(_command "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${_bin}" ${_common_args}
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON)
  string(REPLACE ";" " " _pretty "${_command}")
  message(STATUS "+ ${_pretty}")
  execute_process(COMMAND ${_command} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  message("${_out}")
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "configuring without GoogleTest/Google Benchmark failed (${_rc})")
  endif()
  foreach(_expected "GoogleTest not found" "Google Benchmark not found")
    string(FIND "${_out}" "${_expected}" _pos)
    if(_pos EQUAL -1)
      message(FATAL_ERROR "the configure output does not say '${_expected}'")
    endif()
  endforeach()
  # The consumer tests are still there.
  execute_process(COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${_bin}" -N
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _tests ERROR_VARIABLE _tests)
  if(NOT _rc EQUAL 0 OR NOT _tests MATCHES "consumer_install")
    message(FATAL_ERROR "ctest -N in a build without GoogleTest: ${_tests}")
  endif()

elseif(MODE STREQUAL "macro_name")
  set(_cpp "${WORK_DIR}/include_all.cpp")
  file(MAKE_DIRECTORY "${WORK_DIR}")
  file(WRITE "${_cpp}" "#include <sparsemoe/sparsemoe.hpp>\nint main() { return 0; }\n")
  set(_compile "${CXX_COMPILER}" -std=c++17 -fsyntax-only "-I${SOURCE_DIR}/include")
  foreach(_dir IN LISTS EIGEN_INCLUDE_DIRS)
    list(APPEND _compile "-I${_dir}")
  endforeach()
  # The control: without either macro the headers compile (the Eigen backend).
  run_checked(${_compile} "${_cpp}")
  foreach(_define -DSPARSEMOE_USE_LIBXSMM -DSPARSEMOE_USE_LIBXSMM=1 -DSPARSEMOE_WITH_LIBXSMM=0)
    string(REPLACE ";" " " _pretty "${_compile};${_define};${_cpp}")
    message(STATUS "+ ${_pretty}  (must fail)")
    execute_process(COMMAND ${_compile} ${_define} "${_cpp}"
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
    if(_rc EQUAL 0)
      message(FATAL_ERROR "compiling with ${_define} succeeded; it must stop with an #error")
    endif()
    if(NOT _out MATCHES "SPARSEMOE_WITH_LIBXSMM=1")
      message(FATAL_ERROR "compiling with ${_define} failed without saying to define SPARSEMOE_WITH_LIBXSMM=1:\n${_out}")
    endif()
  endforeach()

elseif(MODE STREQUAL "extern_templates")
  # At -O2, the case the opt-in is for (whatever this build's own flags are).
  set(_bin "${WORK_DIR}/build")
  build_and_run_consumer("${_tests_dir}/extern_templates" "${_bin}"
    "-DSPARSEMOE_SOURCE_DIR=${SOURCE_DIR}"
    "-DSPARSEMOE_USE_OPENMP=${USE_OPENMP}"
    "-DSPARSEMOE_WERROR=${WERROR}"
    "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG")
  # user.cpp alone must not link: its explicit instantiation declarations kept the layer's
  # member functions out of its object file.
  message(STATUS "+ ${CMAKE_COMMAND} --build ${_bin} --target app_without_instances  (must fail)")
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${_bin}" --target app_without_instances ${_config_args}
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(_rc EQUAL 0)
    message(FATAL_ERROR "user.cpp linked without instances.cpp: SPARSEMOE_EXTERN_TEMPLATES had no effect")
  endif()
  if(NOT _out MATCHES "MoELayer")
    message(FATAL_ERROR "linking user.cpp alone failed, but not for want of MoELayer's members:\n${_out}")
  endif()

elseif(MODE STREQUAL "mpi_component")
  if(NOT WITH_MPI)
    message("SPARSEMOE_TEST_SKIPPED: sparsemoe was built without MPI, so it installs no component mpi")
    return()
  endif()
  set(_bin "${WORK_DIR}/build")
  build_consumer("${_tests_dir}/mpi_component" "${_bin}" "-DCMAKE_PREFIX_PATH=${PREFIX}")
  separate_arguments(_launcher_flags UNIX_COMMAND "${MPIEXEC_FLAGS}")
  run_checked("${MPIEXEC}" -n 2 ${_launcher_flags} "${_bin}/app")

else()
  message(FATAL_ERROR "consumer_test.cmake: unknown MODE '${MODE}'")
endif()
