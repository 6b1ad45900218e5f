# SPDX-License-Identifier: MIT
#
# Extract a marked code block of the README into a file, so that tests can compile or run what
# the README tells users to do, exactly as written.
#
#   cmake -DREADME=<path/README.md> -DOUTPUT=<file> [-DMARKER=<name>] [-DFENCE=<info>]
#         -P ExtractReadmeExample.cmake
#
# The block is the fenced code block whose opening fence "```<info>" is the line right after the
# marker line
#
#   <!-- <name> -->
#
# MARKER defaults to "readme-example" (the usage example, a ```cpp block that the test
# `readme_example_builds` compiles and runs). FENCE is the block's info string: "cpp" (the
# default; "c++" is accepted too), "sh" or "cmake". Both lines start in column 1 (trailing
# whitespace is fine); the block ends at the next line starting with "```". Mentions of the
# marker inside a line (prose, inline code) do not count. The marker renders as nothing on
# GitHub, so the README looks normal while the tests keep it honest. Exactly one line with the
# marker must be present. A C++ block gets a #line directive (compiler errors then point into
# README.md), a shell or CMake block a comment naming its README line. OUTPUT is rewritten only
# when its content changes, so an unchanged README causes no rebuild.

cmake_minimum_required(VERSION 3.20)

if(NOT DEFINED README OR NOT DEFINED OUTPUT)
  message(FATAL_ERROR "usage: cmake -DREADME=<README.md> -DOUTPUT=<file> [-DMARKER=<name>] [-DFENCE=cpp|sh|cmake] -P ${CMAKE_CURRENT_LIST_FILE}")
endif()
if(NOT DEFINED MARKER OR MARKER STREQUAL "")
  set(MARKER "readme-example")
endif()
if(NOT DEFINED FENCE OR FENCE STREQUAL "")
  set(FENCE "cpp")
endif()
if(FENCE STREQUAL "cpp")
  set(_fence_regex "(cpp|c\\+\\+)")
elseif(FENCE MATCHES "^(sh|cmake)$")
  set(_fence_regex "${FENCE}")
else()
  message(FATAL_ERROR "ExtractReadmeExample: FENCE must be cpp, sh or cmake, got '${FENCE}'")
endif()
set(_marker "<!-- ${MARKER} -->")
if(NOT EXISTS "${README}")
  message(FATAL_ERROR "ExtractReadmeExample: '${README}' does not exist")
endif()

# file(READ) keeps the text as one string; splitting it into a CMake list would
# mangle the semicolons and brackets of C++ code.
file(READ "${README}" _text)
string(REPLACE "\r\n" "\n" _text "${_text}")
# The marker counts only on a line of its own (mentions of it in prose or inline
# code are ignored), so search for it right after a newline.
set(_text "\n${_text}")
set(_marker_line "\n${_marker}")

string(FIND "${_text}" "${_marker_line}" _pos)
if(_pos EQUAL -1)
  message(FATAL_ERROR
    "ExtractReadmeExample: no '${_marker}' line in ${README}. Put it on the line "
    "right before the ```${FENCE} block it marks.")
endif()
string(LENGTH "${_marker_line}" _len)
math(EXPR _after "${_pos} + ${_len}")
string(SUBSTRING "${_text}" ${_after} -1 _rest)

# Exactly one marker.
string(FIND "${_rest}" "${_marker_line}" _again)
if(NOT _again EQUAL -1)
  message(FATAL_ERROR "ExtractReadmeExample: more than one '${_marker}' in ${README}")
endif()

# The fence must be the very next line.
if(NOT _rest MATCHES "^[ \t]*\n```${_fence_regex}[ \t]*\n")
  message(FATAL_ERROR
    "ExtractReadmeExample: '${_marker}' in ${README} must be immediately followed "
    "by a line reading ```${FENCE}")
endif()
string(LENGTH "${CMAKE_MATCH_0}" _fence_len)
string(SUBSTRING "${_rest}" ${_fence_len} -1 _rest)

# README line of the block's first line, for a #line directive: compiler errors
# then point into README.md. (_text starts with an extra newline, so the number
# of newlines before the block is its 1-based line number.)
math(EXPR _body_start "${_after} + ${_fence_len}")
string(SUBSTRING "${_text}" 0 ${_body_start} _before)
string(REGEX MATCHALL "\n" _newlines "${_before}")
list(LENGTH _newlines _first_line)

# The closing fence: a line starting with ``` (the block may be the last thing
# in the file, with or without a trailing newline).
set(_body "")
set(_closed FALSE)
if(_rest MATCHES "^```")
  set(_closed TRUE)
else()
  string(FIND "${_rest}" "\n```" _end)
  if(NOT _end EQUAL -1)
    math(EXPR _end "${_end} + 1")
    string(SUBSTRING "${_rest}" 0 ${_end} _body)
    set(_closed TRUE)
  endif()
endif()
if(NOT _closed)
  message(FATAL_ERROR "ExtractReadmeExample: the ```${FENCE} block after '${_marker}' in ${README} is never closed")
endif()
if(_body MATCHES "^[ \t\n]*$")
  message(FATAL_ERROR "ExtractReadmeExample: the ```${FENCE} block after '${_marker}' in ${README} is empty")
endif()

get_filename_component(_readme_abs "${README}" ABSOLUTE)
if(FENCE STREQUAL "cpp")
  set(_content "// Generated from README.md by cmake/ExtractReadmeExample.cmake -- do not edit.\n#line ${_first_line} \"${_readme_abs}\"\n${_body}")
else()
  set(_content "# Generated from ${_readme_abs}, line ${_first_line} on (${_marker}), by cmake/ExtractReadmeExample.cmake -- do not edit.\n${_body}")
endif()

set(_old "")
if(EXISTS "${OUTPUT}")
  file(READ "${OUTPUT}" _old)
endif()
if(NOT _old STREQUAL _content)
  file(WRITE "${OUTPUT}" "${_content}")
  message(STATUS "ExtractReadmeExample: wrote ${OUTPUT}")
else()
  message(STATUS "ExtractReadmeExample: ${OUTPUT} is up to date")
endif()
