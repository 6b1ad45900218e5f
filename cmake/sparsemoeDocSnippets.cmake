# SPDX-License-Identifier: MIT
#
# The C++ snippets of the guides (docs/*.md), extracted so that ctest compiles and runs every
# one of them (tests/doc_snippets.cmake). The same convention as the README's examples
# (cmake/ExtractReadmeExample.cmake): a marker line right before the fence,
#
#   <!-- snippet: NAME -->
#   ```cpp
#   ...
#   ```
#
# with two differences. A page may hold several snippets, and several blocks may carry the same
# NAME: they are concatenated in page order into one program, so a guide can show a program piece
# by piece with prose in between. And EVERY ```cpp (or ```c++) block of a guide must carry a
# marker: a block without one stops the configure, so no C++ in the guides goes untested (show
# non-compiling text in a ```text block instead).
#
#   sparsemoe_doc_snippets(<page.md> <output-dir> <names-var> <needs-xxhash-var>)
#
# writes <output-dir>/<NAME>.cpp for each NAME of <page.md> (only when its content changes, so an
# unchanged snippet is not rebuilt), each block preceded by a #line directive so that compiler
# errors point into the page, and sets <names-var> to the names in page order and
# <needs-xxhash-var> to those that include checkpoint.hpp (they need xxhash.h).

include_guard(GLOBAL)

function(sparsemoe_doc_snippets page output_dir names_var xxhash_var)
  file(READ "${page}" _text)
  string(REPLACE "\r\n" "\n" _text "${_text}")
  # One list element per line. Semicolons and square brackets would be taken for list syntax,
  # so they travel as placeholders and are put back line by line.
  string(REPLACE ";" "@SPARSEMOE_SEMICOLON@" _text "${_text}")
  string(REPLACE "[" "@SPARSEMOE_OPEN@" _text "${_text}")
  string(REPLACE "]" "@SPARSEMOE_CLOSE@" _text "${_text}")
  string(REPLACE "\n" ";" _lines "${_text}")
  get_filename_component(_page_abs "${page}" ABSOLUTE)
  file(RELATIVE_PATH _page_name "${PROJECT_SOURCE_DIR}" "${_page_abs}")

  set(_names "")
  set(_number 0)
  set(_previous "")
  set(_current "")      # NAME of the block being read, empty outside a snippet block
  set(_in_fence FALSE)
  foreach(_line IN LISTS _lines)
    math(EXPR _number "${_number} + 1")
    string(REPLACE "@SPARSEMOE_SEMICOLON@" ";" _line "${_line}")
    string(REPLACE "@SPARSEMOE_OPEN@" "[" _line "${_line}")
    string(REPLACE "@SPARSEMOE_CLOSE@" "]" _line "${_line}")
    if(_in_fence)
      if(_line MATCHES "^[ ]*(```|~~~)")
        set(_in_fence FALSE)
        set(_current "")
      elseif(NOT _current STREQUAL "")
        string(APPEND _body_${_current} "${_line}\n")
      endif()
    elseif(_line MATCHES "^[ ]*(```|~~~)[ \t]*([^ \t`]*)")
      set(_in_fence TRUE)
      string(TOLOWER "${CMAKE_MATCH_2}" _info)
      if(_info STREQUAL "cpp" OR _info STREQUAL "c++")
        if(NOT _previous MATCHES "^<!-- snippet: ([A-Za-z0-9_]+) -->[ \t]*$")
          message(FATAL_ERROR "${_page_name}:${_number}: a ```${_info} block without a "
            "'<!-- snippet: NAME -->' line right before it. Every C++ block of a guide is compiled "
            "and run by ctest (cmake/sparsemoeDocSnippets.cmake); mark it, or use ```text for code "
            "that is not meant to compile.")
        endif()
        set(_current "${CMAKE_MATCH_1}")
        if(NOT _current IN_LIST _names)
          list(APPEND _names "${_current}")
          set(_body_${_current} "")
        endif()
        math(EXPR _first "${_number} + 1")
        string(APPEND _body_${_current} "#line ${_first} \"${_page_abs}\"\n")
      elseif(_previous MATCHES "^<!-- snippet: ")
        message(FATAL_ERROR "${_page_name}:${_number}: a snippet marker must be followed by a ```cpp "
          "block, got ```${_info}")
      endif()
    endif()
    set(_previous "${_line}")
  endforeach()
  if(_in_fence)
    message(FATAL_ERROR "${_page_name}: a code block is never closed")
  endif()

  set(_xxhash "")
  if(_names)
    file(MAKE_DIRECTORY "${output_dir}")
  endif()
  foreach(_name IN LISTS _names)
    set(_content "// Generated from ${_page_name} by cmake/sparsemoeDocSnippets.cmake -- do not edit.\n${_body_${_name}}")
    set(_file "${output_dir}/${_name}.cpp")
    set(_old "")
    if(EXISTS "${_file}")
      file(READ "${_file}" _old)
    endif()
    if(NOT _old STREQUAL _content)
      file(WRITE "${_file}" "${_content}")
    endif()
    if(_content MATCHES "checkpoint\\.hpp")
      list(APPEND _xxhash "${_name}")
    endif()
  endforeach()
  set(${names_var} "${_names}" PARENT_SCOPE)
  set(${xxhash_var} "${_xxhash}" PARENT_SCOPE)
endfunction()
