# SPDX-License-Identifier: MIT
#
# Runs examples/train (or a script around it) for the tests of tests/examples.cmake and checks
# what it prints and writes. Arguments (-D):
#   MODE=router    train --router ROUTER for 5 tiny steps with capacity factor 1: exit 0, the
#                  summary line, and a routing log (--routing-csv) of 5 rows that never exceed C
#                  (ROUTER=default: no --router, which must be noisy-top-k)
#   MODE=paradigm  train --router ROUTER (expert-choice, hash, soft-moe, hierarchical) for 5 tiny
#                  steps at its defaults (the expert FLOPs of k = 2): exit 0, the summary line with
#                  k=2, and a per-step log of 5 rows
#   MODE=unknown   train --router nonsense: exit 2 and the list of valid routers on stderr;
#                  --router hash --capacity-factor 1: exit 2 and why; --help has a line for each
#                  router
#   MODE=compare   scripts/compare-routers --train TRAIN --logs DIR on tiny sizes: a header, one row
#                  per router and paradigm, and one kept log each
#   MODE=plot      train --router sigmoid-bias --routing-csv, then scripts/plot-routing and
#                  scripts/plot-losses: PNGs
#   TRAIN          path of the train executable
#   SOURCE_DIR     the repository root (scripts/)
#   WORK_DIR       an empty directory of its own for the logs
cmake_minimum_required(VERSION 3.20)

set(_routers noisy-top-k softmax-top-k switch gshard sigmoid-bias expert-choice hash soft-moe hierarchical)
set(_tiny --steps 5 --batch 64 --experts 4 --hidden 16 --threads 1)
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_checked expected_rc)
  execute_process(COMMAND ${ARGN} WORKING_DIRECTORY "${WORK_DIR}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _out
                  ERROR_VARIABLE _err)
  message("${_out}${_err}")
  if(NOT "${_rc}" STREQUAL "${expected_rc}")
    message(FATAL_ERROR "expected exit status ${expected_rc}, got ${_rc}: ${ARGN}")
  endif()
  set(output "${_out}" PARENT_SCOPE)
  set(errors "${_err}" PARENT_SCOPE)
endfunction()

function(require_match text regex what)
  if(NOT text MATCHES "${regex}")
    message(FATAL_ERROR "${what} does not match '${regex}'")
  endif()
endfunction()

set(_number "[0-9]+(\\.[0-9]+)?")
if(MODE STREQUAL "router")
  set(_router_args --router ${ROUTER})
  if(ROUTER STREQUAL "default")
    set(_router_args)
    set(ROUTER noisy-top-k)
  endif()
  run_checked(0 "${TRAIN}" ${_router_args} ${_tiny} --capacity-factor 1 --quiet --csv training.csv
              --routing-csv routing.csv)
  require_match("${output}" "\nsummary: router=${ROUTER} k=[12] final_loss=${_number} heldout_mse=${_number} load_cv2=${_number} max_mean_rows=${_number} dropped_pct=${_number} ms_per_step=${_number}\n"
                "the summary")
  require_match("${output}" "dropped slots, % of T\\*k: ${_number}% -> ${_number}%" "the dropped slots line")
  file(STRINGS "${WORK_DIR}/routing.csv" _lines)
  list(LENGTH _lines _count)
  list(GET _lines 0 _header)
  set(_expected_header "step,capacity,router_dropped,capacity_dropped,max_rows,mean_rows,rows_0,rows_1,rows_2,rows_3,dropped_0,dropped_1,dropped_2,dropped_3")
  if(NOT _count EQUAL 6 OR NOT _header STREQUAL _expected_header)
    message(FATAL_ERROR "routing.csv: expected the header ${_expected_header} and 5 rows, got ${_count} lines starting '${_header}'")
  endif()
  list(REMOVE_AT _lines 0)
  foreach(_line IN LISTS _lines)  # every expert's rows <= C = ceil(64·k/4), and max_rows is their max
    string(REPLACE "," ";" _fields "${_line}")
    list(GET _fields 1 _capacity)
    list(GET _fields 4 _max_rows)
    list(SUBLIST _fields 6 4 _rows)
    if(NOT (_capacity EQUAL 16 OR _capacity EQUAL 32))
      message(FATAL_ERROR "routing.csv: capacity ${_capacity} is not ceil(64*k/4) for k = 1 or 2: ${_line}")
    endif()
    set(_largest 0)
    foreach(_r IN LISTS _rows)
      if(_r GREATER _capacity)
        message(FATAL_ERROR "routing.csv: an expert got ${_r} rows, more than C = ${_capacity}: ${_line}")
      endif()
      if(_r GREATER _largest)
        set(_largest ${_r})
      endif()
    endforeach()
    if(NOT _largest EQUAL _max_rows)
      message(FATAL_ERROR "routing.csv: max_rows ${_max_rows} is not the largest rows_e ${_largest}: ${_line}")
    endif()
  endforeach()
elseif(MODE STREQUAL "paradigm")
  run_checked(0 "${TRAIN}" --router ${ROUTER} ${_tiny} --quiet --csv training.csv)
  require_match("${output}" "\nsummary: router=${ROUTER} k=2 final_loss=${_number} heldout_mse=${_number} load_cv2=${_number} max_mean_rows=${_number} dropped_pct=${_number} ms_per_step=${_number}\n"
                "the summary")
  file(STRINGS "${WORK_DIR}/training.csv" _lines)
  list(LENGTH _lines _count)
  list(GET _lines 0 _header)
  if(NOT _count EQUAL 6 OR NOT _header STREQUAL "step,loss,aux_loss,load_0,load_1,load_2,load_3")
    message(FATAL_ERROR "training.csv: expected a header and 5 rows, got ${_count} lines starting '${_header}'")
  endif()
elseif(MODE STREQUAL "unknown")
  run_checked(2 "${TRAIN}" --router nonsense ${_tiny} --quiet)
  string(REPLACE ";" ", " _list "${_routers}")
  require_match("${errors}" "unknown router 'nonsense'; valid routers: ${_list}" "stderr")
  # a flag of another router stops with a message, e.g. expert capacity for hash routing
  run_checked(2 "${TRAIN}" --router hash --capacity-factor 1 ${_tiny} --quiet)
  require_match("${errors}" "--capacity-factor applies to MoELayer's routers and expert-choice only, not to --router hash"
                "stderr")
  run_checked(0 "${TRAIN}" --help)  # --help describes every router
  foreach(_router IN LISTS _routers)
    require_match("${output}" "\n +${_router} +[a-z]" "--help's line of ${_router}")
  endforeach()
elseif(MODE STREQUAL "compare")
  run_checked(0 bash "${SOURCE_DIR}/scripts/compare-routers" --train "${TRAIN}" --logs logs ${_tiny})
  require_match("${output}" "^\\| router \\| k \\| training MSE \\| held-out MSE \\| load CV² \\| max/mean rows \\| dropped / unrouted % \\| ms/step \\|\n"
                "the table header")
  foreach(_router IN LISTS _routers)
    require_match("${output}" "\n\\| ${_router} \\| [12] \\| ${_number} \\| ${_number} \\| ${_number} \\| ${_number} \\| ${_number} \\| ${_number} \\|\n"
                  "the row of ${_router}")
    if(NOT EXISTS "${WORK_DIR}/logs/${_router}.csv")
      message(FATAL_ERROR "compare-routers --logs kept no logs/${_router}.csv")
    endif()
  endforeach()
elseif(MODE STREQUAL "plot")
  run_checked(0 "${TRAIN}" --router sigmoid-bias ${_tiny} --quiet --csv training.csv --routing-csv routing.csv)
  run_checked(0 bash "${SOURCE_DIR}/scripts/plot-routing" routing.csv routing.png)
  run_checked(0 bash "${SOURCE_DIR}/scripts/plot-losses" losses.png training.csv training.csv)
  foreach(_png IN ITEMS routing.png losses.png)
    file(READ "${WORK_DIR}/${_png}" _magic LIMIT 4 HEX)
    if(NOT _magic STREQUAL "89504e47")
      message(FATAL_ERROR "${_png} is not a PNG (starts with ${_magic})")
    endif()
  endforeach()
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()
