// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The invariant check every fuzz harness uses: on failure it names the condition and where it
// stands (the file names the harness), then traps, which libFuzzer reports as a crash and keeps
// the input.
#ifndef SPARSEMOE_FUZZ_CHECK_HPP
#define SPARSEMOE_FUZZ_CHECK_HPP

#include <cstdio>

#define FUZZ_CHECK(condition)                                                                           \
  do {                                                                                                  \
    if (!(condition)) {                                                                                 \
      std::fprintf(stderr, "fuzz: invariant failed: %s (%s:%d)\n", #condition, __FILE__, __LINE__);   \
      __builtin_trap();                                                                                 \
    }                                                                                                   \
  } while (false)

#endif  // SPARSEMOE_FUZZ_CHECK_HPP
