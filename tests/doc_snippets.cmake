# SPDX-License-Identifier: MIT
#
# Guide snippet tests (label "docs"): every C++ block of docs/*.md, extracted by
# cmake/sparsemoeDocSnippets.cmake, is built with the project's warning flags and run by ctest as
# doc_<page>_<name> (e.g. doc_training_resume), in a directory of its own under
# <build>/tests/doc_snippets/ (some write files there). A page is a configure dependency: editing a
# guide re-extracts its snippets, and only the changed ones are rebuilt.

# The sanitizer presets turn them off: 17 small programs cost about 300 s of CPU to build with
# ASan + UBSan, for code paths the unit tests there already cover.
option(SPARSEMOE_BUILD_DOC_SNIPPETS "Build and run the C++ snippets of docs/*.md as tests" ON)
if(NOT SPARSEMOE_BUILD_DOC_SNIPPETS)
  return()
endif()

include(${PROJECT_SOURCE_DIR}/cmake/sparsemoeDocSnippets.cmake)

if(NOT DEFINED SPARSEMOE_XXHASH_INCLUDE_DIR)
  find_path(SPARSEMOE_XXHASH_INCLUDE_DIR xxhash.h DOC "Directory of xxhash.h (for checkpoint.hpp)")
  mark_as_advanced(SPARSEMOE_XXHASH_INCLUDE_DIR)
endif()

# Snippets may start threads (docs/serving.md).
find_package(Threads REQUIRED)

file(GLOB _sparsemoe_guides CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/docs/*.md)
foreach(_page IN LISTS _sparsemoe_guides)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_page}")
  get_filename_component(_stem "${_page}" NAME_WE)
  string(REGEX REPLACE "[^A-Za-z0-9_]" "_" _stem "${_stem}")
  set(_sources "${CMAKE_CURRENT_BINARY_DIR}/doc_snippets/${_stem}")
  sparsemoe_doc_snippets("${_page}" "${_sources}" _names _needs_xxhash)
  foreach(_name IN LISTS _names)
    set(_target "doc_${_stem}_${_name}")
    if(_name IN_LIST _needs_xxhash AND NOT SPARSEMOE_XXHASH_INCLUDE_DIR)
      message(STATUS "sparsemoe: xxhash.h not found (Debian: libxxhash-dev): ${_target} is not built")
      continue()
    endif()
    # Snippets of the model-file headers need nlohmann/json (found at the top level).
    file(READ "${_sources}/${_name}.cpp" _snippet_text)
    if(_snippet_text MATCHES "sparsemoe/io/(safetensors|hf_models|gguf)\\.hpp" AND NOT SPARSEMOE_WITH_NLOHMANN_JSON)
      message(STATUS "sparsemoe: nlohmann_json not found (Debian: nlohmann-json3-dev): ${_target} is not built")
      continue()
    endif()
    add_executable(${_target} "${_sources}/${_name}.cpp")
    target_link_libraries(${_target} PRIVATE sparsemoe::sparsemoe Threads::Threads)
    if(_name IN_LIST _needs_xxhash)
      target_include_directories(${_target} PRIVATE ${SPARSEMOE_XXHASH_INCLUDE_DIR})
    endif()
    if(NOT _snippet_text MATCHES "#define")  # a snippet that sets macros compiles the headers its own way
      sparsemoe_use_test_instances(${_target})
    endif()
    sparsemoe_set_warnings(${_target})
    set(_work "${CMAKE_CURRENT_BINARY_DIR}/doc_snippets/run/${_target}")
    file(MAKE_DIRECTORY "${_work}")
    add_test(NAME ${_target} COMMAND ${_target} WORKING_DIRECTORY "${_work}")
    set_tests_properties(${_target} PROPERTIES LABELS docs TIMEOUT 120)
  endforeach()
endforeach()
