// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_CONFIG_HPP
#define SPARSEMOE_CONFIG_HPP

/// \file config.hpp
/// Version, scalar and matrix aliases, and the error macros shared by every header.

#include <Eigen/Core>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#error "sparsemoe needs Eigen 3.4 or newer"
#endif

// The libxsmm GEMM backend is selected by the macro SPARSEMOE_WITH_LIBXSMM=1 (CMake's option
// SPARSEMOE_USE_LIBXSMM and pkg-config's flags define it). Stop on the near misses instead of
// silently building the Eigen backend (or the libxsmm one for "=0").
#if defined(SPARSEMOE_USE_LIBXSMM)
#error "SPARSEMOE_USE_LIBXSMM is the name of the CMake option; to select the libxsmm backend, define SPARSEMOE_WITH_LIBXSMM=1 (and link -lxsmm -lxsmmnoblas), or define neither for the Eigen backend"
#endif
#if defined(SPARSEMOE_WITH_LIBXSMM) && (SPARSEMOE_WITH_LIBXSMM + 0) != 1
#error "define SPARSEMOE_WITH_LIBXSMM=1 to select the libxsmm backend, or leave it undefined for the Eigen backend"
#endif

/// \ingroup core
/// Major version of the library (incompatible API changes).
#define SPARSEMOE_VERSION_MAJOR 0
/// \ingroup core
/// Minor version of the library (additions).
#define SPARSEMOE_VERSION_MINOR 1
/// \ingroup core
/// Patch version of the library (fixes).
#define SPARSEMOE_VERSION_PATCH 0

/// \ingroup core
/// Throws `exception_type(message)`. Define `SPARSEMOE_NO_EXCEPTIONS` (or build with
/// `-fno-exceptions`) to print the message to stderr and abort instead, or define
/// `SPARSEMOE_THROW(exception_type, message)` yourself before including any sparsemoe header.
#ifndef SPARSEMOE_THROW
#if defined(SPARSEMOE_NO_EXCEPTIONS) || !(defined(__cpp_exceptions) || defined(__EXCEPTIONS))
#define SPARSEMOE_THROW(exception_type, message)                                        \
  do {                                                                                  \
    std::fprintf(stderr, "sparsemoe: %s\n", std::string(message).c_str());              \
    std::abort();                                                                       \
  } while (false)
#else
#define SPARSEMOE_THROW(exception_type, message) throw exception_type(message)
#endif
#endif

/// \ingroup core
/// Debug-only check of an internal invariant (compiled out with NDEBUG, like `eigen_assert`).
#ifndef SPARSEMOE_ASSERT
#ifdef NDEBUG
#define SPARSEMOE_ASSERT(condition) static_cast<void>(0)
#else
#define SPARSEMOE_ASSERT(condition)                                                     \
  do {                                                                                  \
    if (!(condition)) {                                                                 \
      std::fprintf(stderr, "sparsemoe: internal assertion failed: %s (%s:%d)\n",        \
                   #condition, __FILE__, __LINE__);                                     \
      std::abort();                                                                     \
    }                                                                                   \
  } while (false)
#endif
#endif

namespace sparsemoe {

/// \addtogroup core
/// @{

/// The library's version as "major.minor.patch".
inline std::string version_string() {
  return std::to_string(SPARSEMOE_VERSION_MAJOR) + "." + std::to_string(SPARSEMOE_VERSION_MINOR) +
         "." + std::to_string(SPARSEMOE_VERSION_PATCH);
}

/// Sizes and indices: signed, 64-bit on every supported platform (never `int` for T·k·d).
using Index = Eigen::Index;

/// Row-major dynamic matrix: one token (or one grouped row) per row, so rows are contiguous.
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector (biases, per-expert statistics).
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Row-major matrix of indices (expert ids per token).
using IndexMatrix = Eigen::Matrix<Index, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic vector of indices (offsets, counts, token ids).
using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

/// Read-only view of a row-major matrix; accepts any Eigen expression (a column-major argument
/// is copied into a temporary).
template <typename Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>>;

/// Writable view of a row-major matrix with contiguous rows.
template <typename Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;

/// Whether a forward pass is part of training (noise on, cache kept) or of evaluation.
enum class Mode { evaluation, training };

namespace detail {

/// Compile-time check that a scalar type is one the library supports.
template <typename Scalar>
constexpr void check_scalar() {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "sparsemoe supports Scalar = float or double");
}

/// Builds a message from its parts with operator<<.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}

/// Throws std::invalid_argument("<function>: <parts...>") unless `condition` holds.
template <typename... Parts>
void require(bool condition, const char* function, const Parts&... parts) {
  if (!condition) {
    SPARSEMOE_THROW(std::invalid_argument, message(function, ": ", parts...));
  }
}

/// Throws unless `matrix` is rows×cols; the message names the function, the argument and both shapes.
template <typename Derived>
void require_shape(const Eigen::EigenBase<Derived>& matrix, Index rows, Index cols,
                   const char* function, const char* argument) {
  require(matrix.rows() == rows && matrix.cols() == cols, function, argument, " must be ", rows,
          "x", cols, ", got ", matrix.rows(), "x", matrix.cols());
}

}  // namespace detail

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_CONFIG_HPP
