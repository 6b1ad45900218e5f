// SPDX-License-Identifier: MIT
// Shared by the consumer tests (find_package, add_subdirectory, fetch_content,
// pkg-config): it only has to compile, link and run against the package as a
// user would see it. Extend it with a tiny MoELayer forward pass once the API
// settles; keep it to the public umbrella header.
#include <sparsemoe/sparsemoe.hpp>

#include <iostream>

int main() {
  std::cout << "sparsemoe " << sparsemoe::version_string() << '\n';
  return 0;
}
