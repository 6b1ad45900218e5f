// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_FILE_HPP
#define SPARSEMOE_IO_FILE_HPP

/// \file file.hpp
/// POSIX file I/O of the checkpoint code: reading a whole regular file, and writing one
/// atomically (a temporary file next to it, write, fsync, rename over the target, fsync of the
/// directory). Every failure throws CheckpointError(io) naming the step, the path and errno.

#include "checkpoint_error.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string>
#include <system_error>

namespace sparsemoe {

/// \addtogroup files
/// @{

namespace detail {

/// The message text of errno value `error`.
inline std::string errno_text(int error) { return std::generic_category().message(error) + " (errno " + std::to_string(error) + ")"; }

/// "<function>: '<path>'".
inline std::string file_context(const char* function, const std::string& path) {
  return std::string(function) + ": '" + path + "'";
}

/// Closes `fd`, retrying on EINTR is not done (POSIX leaves the descriptor state unspecified).
inline int close_fd(int fd) { return ::close(fd); }

/// Opens the regular file at `path` read-only and stores its size in `size`. On failure calls
/// `fail(reason)` (which must throw) with the step and errno: cannot open, cannot stat, not a
/// regular file. Shared by the checkpoint and model-file readers, which throw different errors.
template <typename Fail>
int open_regular_file(const std::string& path, std::size_t& size, Fail&& fail) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // O_NONBLOCK: a FIFO must not hang us
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int error = errno;
    fail("cannot open for reading: " + errno_text(error));
  }
  struct stat status {};
  if (::fstat(fd, &status) != 0) {
    const int error = errno;
    close_fd(fd);
    fail("cannot stat: " + errno_text(error));
  }
  if (!S_ISREG(status.st_mode)) {
    close_fd(fd);
    fail(std::string("expected a regular file, got ") + (S_ISDIR(status.st_mode) ? "a directory" : "a special file"));
  }
  size = status.st_size > 0 ? static_cast<std::size_t>(status.st_size) : 0;
  return fd;
}

/// The whole content of the file at `path`. Throws CheckpointError(io) naming the path and errno.
inline std::string read_file(const std::string& path, const char* function) {
  const std::string context = file_context(function, path);
  std::size_t size = 0;
  const int fd = open_regular_file(path, size, [&](const std::string& reason) {
    checkpoint_fail(CheckpointErrorKind::io, context, reason);
  });
  std::string content;
  content.resize(size);
  std::size_t filled = 0;
  for (;;) {
    if (filled == content.size()) content.resize(content.size() + 65536);  // the file grew, or to see EOF
    const ssize_t got = ::read(fd, &content[filled], content.size() - filled);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      close_fd(fd);
      checkpoint_fail(CheckpointErrorKind::io, context, "read failed after ", filled, " bytes: ", errno_text(error));
    }
    if (got == 0) break;
    filled += static_cast<std::size_t>(got);
  }
  close_fd(fd);
  content.resize(filled);
  return content;
}

/// The directory part of `path` ("." when there is none).
inline std::string directory_of(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

/// Closes `fd` (unless −1), removes `temporary` and throws CheckpointError(io) for `step`.
[[noreturn]] inline void abandon_temporary(int fd, const std::string& temporary, const std::string& context,
                                           const char* step, int error) {
  if (fd >= 0) close_fd(fd);
  ::unlink(temporary.c_str());
  checkpoint_fail(CheckpointErrorKind::io, context, step, " the temporary file '", temporary, "' failed: ",
                  errno_text(error), "; the temporary file was removed and the previous checkpoint (if any) is "
                  "untouched");
}

/// Writes `bytes` to `path` atomically: a new temporary file `path.tmp.<pid>.<n>` (O_EXCL, so
/// never someone else's) in the same directory, write, fsync, close, rename over `path`, fsync
/// the directory. On any failure before the rename the temporary file is removed and `path` is
/// untouched; every failure throws CheckpointError(io) with the step, the path and errno.
inline void write_file_atomically(const std::string& path, const std::string& bytes, const char* function) {
  const std::string context = file_context(function, path);
  if (path.empty() || path.back() == '/') {
    checkpoint_fail(CheckpointErrorKind::io, context, "expected a file path, got ",
                    path.empty() ? "an empty path" : "a directory path");
  }
  static std::atomic<std::uint64_t> counter{0};
  std::string temporary;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    temporary = path + ".tmp." + std::to_string(static_cast<long long>(::getpid())) + "." +
                std::to_string(counter.fetch_add(1, std::memory_order_relaxed));
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST && errno != EINTR) {
      const int error = errno;
      checkpoint_fail(CheckpointErrorKind::io, context, "cannot create the temporary file '", temporary,
                      "': ", errno_text(error));
    }
    if (fd < 0 && attempt >= 1000) {
      checkpoint_fail(CheckpointErrorKind::io, context, "cannot create a temporary file next to it: ",
                      errno_text(EEXIST));
    }
  }
  std::size_t written = 0;
  while (written < bytes.size()) {
    const std::size_t chunk = std::min<std::size_t>(bytes.size() - written, std::size_t(1) << 30);
    const ssize_t result = ::write(fd, bytes.data() + written, chunk);
    if (result < 0 && errno == EINTR) continue;
    if (result <= 0) abandon_temporary(fd, temporary, context, "writing", result < 0 ? errno : EIO);
    written += static_cast<std::size_t>(result);
  }
  if (::fsync(fd) != 0) abandon_temporary(fd, temporary, context, "fsync of", errno);
  if (close_fd(fd) != 0) abandon_temporary(-1, temporary, context, "closing", errno);
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    abandon_temporary(-1, temporary, context, "renaming", errno);
  }
  // The new name is in place; make the rename itself durable.
  const std::string directory = directory_of(path);
  const int directory_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory_fd < 0) {
    const int error = errno;
    checkpoint_fail(CheckpointErrorKind::io, context, "the checkpoint was written and renamed, but opening its "
                    "directory '", directory, "' to fsync it failed: ", errno_text(error));
  }
  if (::fsync(directory_fd) != 0 && errno != EINVAL) {  // EINVAL: the file system cannot sync directories
    const int error = errno;
    close_fd(directory_fd);
    checkpoint_fail(CheckpointErrorKind::io, context, "the checkpoint was written and renamed, but the fsync of "
                    "its directory '", directory, "' failed: ", errno_text(error));
  }
  close_fd(directory_fd);
}

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_FILE_HPP
