# SPDX-License-Identifier: MIT
#
# What the `docs` target runs (docs/CMakeLists.txt fills in the variables):
#
#   cmake -DDOXYGEN=<doxygen> -DDOXYFILE=<Doxyfile> -DHTML_DIR=<site> -DSOURCE_DIR=<repository>
#         [-DMATHJAX_DIR=<MathJax 2>] -P BuildSite.cmake
#
# Starts from an empty HTML_DIR, copies the part of MathJax 2 that TeX input with SVG output needs
# into HTML_DIR/mathjax (about 3 of its 50 MB: the site then renders formulas offline), and runs
# doxygen. Doxygen's warnings are errors (WARN_AS_ERROR = FAIL_ON_WARNINGS): it writes the whole
# site, lists every warning, then exits non-zero, and so does this script.

cmake_minimum_required(VERSION 3.20)

foreach(_var DOXYGEN DOXYFILE HTML_DIR SOURCE_DIR)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "BuildSite.cmake: ${_var} is not set")
  endif()
endforeach()

file(REMOVE_RECURSE "${HTML_DIR}")
if(DEFINED MATHJAX_DIR AND NOT MATHJAX_DIR STREQUAL "")
  set(_to "${HTML_DIR}/mathjax")
  file(MAKE_DIRECTORY "${_to}/jax/input" "${_to}/jax/output/SVG/fonts" "${_to}/localization")
  file(COPY "${MATHJAX_DIR}/MathJax.js" "${MATHJAX_DIR}/extensions" DESTINATION "${_to}")
  file(COPY "${MATHJAX_DIR}/jax/element" DESTINATION "${_to}/jax")
  file(COPY "${MATHJAX_DIR}/jax/input/TeX" DESTINATION "${_to}/jax/input")
  file(COPY "${MATHJAX_DIR}/jax/output/SVG/jax.js" "${MATHJAX_DIR}/jax/output/SVG/config.js"
    "${MATHJAX_DIR}/jax/output/SVG/autoload" DESTINATION "${_to}/jax/output/SVG")
  file(COPY "${MATHJAX_DIR}/jax/output/SVG/fonts/TeX" DESTINATION "${_to}/jax/output/SVG/fonts")
  file(COPY "${MATHJAX_DIR}/localization/en" DESTINATION "${_to}/localization")
endif()

execute_process(COMMAND "${DOXYGEN}" "${DOXYFILE}" WORKING_DIRECTORY "${SOURCE_DIR}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "sparsemoe docs: Doxygen reported the problems listed above, and they are "
    "errors here: document the public entity (or move it into namespace sparsemoe::detail), or fix "
    "the reference. The site was written anyway: ${HTML_DIR}/index.html")
endif()
message(STATUS "sparsemoe docs: ${HTML_DIR}/index.html")
