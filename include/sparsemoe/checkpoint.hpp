// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_CHECKPOINT_HPP
#define SPARSEMOE_CHECKPOINT_HPP

/// \file checkpoint.hpp
/// Lossless checkpoints of an MoELayer (and, optionally, of its Sgd or Adam optimizer) in a
/// documented, checksummed binary format, written atomically.
///
/// Not part of the umbrella header sparsemoe.hpp, because it needs xxHash (`xxhash.h`, Debian
/// package libxxhash-dev, used header-only through XXH_INLINE_ALL: nothing to link) and POSIX
/// file calls (open, write, fsync, rename). Include it explicitly:
///
/// \code
/// #include <sparsemoe/sparsemoe.hpp>
/// #include <sparsemoe/checkpoint.hpp>
///
/// sparsemoe::MoELayer<float> layer({/*d*/ 64, /*h*/ 256, /*E*/ 8, /*k*/ 2});
/// sparsemoe::Adam<float> adam;
/// // ... train ...
/// sparsemoe::save_checkpoint("model.ckpt", layer, adam);   // atomic: old file or new file, never half
/// // later, possibly in another process:
/// sparsemoe::load_checkpoint("model.ckpt", layer, adam);   // validates everything, then copies in
/// \endcode
///
/// Guarantees:
///  - Round trip is bitwise: every parameter and optimizer state scalar is stored as its raw IEEE
///    bytes (NaN payloads and −0.0 included), and so are the noise ε and seed; after loading, the
///    layer's forward/backward and the optimizer's next step give bitwise the results of the
///    saved objects.
///  - Loading validates the whole file (size, magic, version, checksum, structure, scalar type,
///    expert kind, shapes and tensor names against the target) before touching anything; on any
///    failure the layer and the optimizer are left exactly as they were, and the CheckpointError
///    says which check failed (CheckpointError::kind()).
///  - Saving writes `path.tmp.<pid>.<n>` in the same directory, fsyncs it, renames it over `path`
///    and fsyncs the directory: a crash leaves the old checkpoint or the new one under `path`,
///    never a partial file. On failure the temporary file is removed and `path` is untouched.
///
/// Format (version 1; all integers little-endian, offsets in bytes; see docs/checkpoint-format.md):
///
///     off  size  field
///       0     8  magic "SPMOECKP"
///       8     4  u32 format version = 1
///      12     8  u64 total file size N, checksum included
///      20     4  u32 scalar type code: 1 = IEEE-754 binary32 (float), 2 = binary64 (double)
///      24     4  u32 scalar size in bytes: 4 or 8
///      28        str expert kind: "expert:relu" | "expert:silu" | "expert:gelu_tanh" |
///                "expert:gelu_erf" | "swiglu" (ExpertKind<ExpertT>::name())
///                i64 d, i64 h, i64 E, i64 k
///                f64 noise ε (the gate's Scalar value widened to double: exact), u64 noise seed
///                u64 tensor count, then that many tensor records
///                str optimizer kind: "none" | "sgd" | "adam", then its section (below)
///     N−8     8  u64 XXH3_64bits (seed 0) of bytes [0, N−8)
///
///     str            = u32 byte length, then the bytes (UTF-8, no terminator)
///     f64            = the 8 bytes of an IEEE-754 binary64
///     tensor record  = str name, i64 rows, i64 cols, rows·cols scalars (row-major, raw IEEE bytes)
///     "sgd" section  = i64 step count, f64 lr, f64 momentum, f64 weight decay, u32 nesterov (0|1),
///                      u64 state tensor count, records "sgd.velocity.<param>" (one per parameter
///                      when momentum > 0 and step count > 0, else none)
///     "adam" section = i64 step count, f64 lr, f64 β1, f64 β2, f64 ε, f64 weight decay,
///                      u64 state tensor count, records "adam.m.<param>" for every parameter,
///                      then "adam.v.<param>" for every parameter (none when step count = 0)
///
/// The parameter tensors are those of MoELayer::tensors(), in that order and with those names
/// (gate.gate_weight, gate.noise_weight, expert0.w1, expert0.b1, …); state tensors have the
/// shape of their parameter. The check order when reading is: magic, version, total size
/// (truncated / trailing bytes), checksum, structure, then compatibility with the target.
///
/// What is restored: every parameter, the gate's noise ε and noise seed (so training noise
/// continues as before), and the optimizer's hyper-parameters, step count and state. What must
/// already match: Scalar, the expert type, d, h, E and k. What is kept from the target: the
/// gate's check_finite() setting (a run-time option, not state).
///
/// Requirements: a little-endian host (checked at compile time) with IEEE-754 float and double,
/// and POSIX. Memory: saving builds the whole file in memory (≈ the parameter and state bytes)
/// plus a copy of one expert at a time; loading reads the whole file, plus the optimizer state
/// before it is moved in. Time: O(file size), dominated by the copy, the XXH3 pass (several GB/s)
/// and fsync.
///
/// Thread safety: saving only reads the layer and optimizer (no other thread may modify them
/// meanwhile); concurrent saves to the same path are safe (each uses its own temporary file; the
/// last rename wins). Loading modifies the layer and optimizer: no concurrent use of them.

#include "activation.hpp"
#include "config.hpp"
#include "expert.hpp"
#include "gate.hpp"
#include "moe_layer.hpp"
#include "optimizers.hpp"
#include "parameters.hpp"

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(XXH_VERSION_NUMBER) || XXH_VERSION_NUMBER < 800
#error "sparsemoe/checkpoint.hpp needs xxHash 0.8 or newer (XXH3_64bits)"
#endif

#if !defined(__BYTE_ORDER__) || !defined(__ORDER_LITTLE_ENDIAN__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sparsemoe/checkpoint.hpp supports little-endian hosts only (the format is little-endian)"
#endif

namespace sparsemoe {

/// \addtogroup files
/// @{

static_assert(std::numeric_limits<float>::is_iec559 && sizeof(float) == 4,
              "sparsemoe checkpoints need IEEE-754 binary32 float");
static_assert(std::numeric_limits<double>::is_iec559 && sizeof(double) == 8,
              "sparsemoe checkpoints need IEEE-754 binary64 double");

/// The checkpoint format version this build writes, and the only one it reads.
inline constexpr std::uint32_t checkpoint_format_version = 1;

/// Which check a checkpoint operation failed; see CheckpointError::kind().
enum class CheckpointErrorKind {
  io,                   ///< opening, reading, writing, syncing or renaming a file failed (errno text)
  truncated,            ///< fewer bytes than a header, or than the header's total size
  bad_magic,            ///< the first 8 bytes are not "SPMOECKP": not a sparsemoe checkpoint
  unsupported_version,  ///< a format version other than checkpoint_format_version
  trailing_bytes,       ///< more bytes than the header's total size
  checksum_mismatch,    ///< the stored XXH3-64 differs from the computed one: the bytes are corrupted
  malformed,            ///< the checksum matches but the content breaks the format (forged or buggy writer)
  wrong_scalar_type,    ///< the file's scalar type (float/double) is not the layer's
  wrong_expert_kind,    ///< the file's expert kind (e.g. "expert:silu") is not the layer's
  shape_mismatch,       ///< d, h, E, k or a tensor's shape differs from the layer's
  tensor_mismatch,      ///< the tensor count or a tensor name differs from the layer's
  optimizer_mismatch,   ///< the optimizer state asked for is not in the file (none, or another kind)
  non_finite_value,     ///< a parameter tensor holds a NaN or an infinity (the message names the tensor)
};

/// Settings of load_checkpoint and deserialize_checkpoint.
struct CheckpointLoadOptions {
  /// Accept parameter tensors that hold NaN or infinity (to look at a diverged run); by default
  /// such a file is rejected with CheckpointErrorKind::non_finite_value, naming the tensor.
  bool allow_non_finite = false;
};

/// A stable lowercase name of `kind` ("checksum_mismatch", …), as used in the error messages.
inline const char* to_string(CheckpointErrorKind kind) {
  switch (kind) {
    case CheckpointErrorKind::io: return "io";
    case CheckpointErrorKind::truncated: return "truncated";
    case CheckpointErrorKind::bad_magic: return "bad_magic";
    case CheckpointErrorKind::unsupported_version: return "unsupported_version";
    case CheckpointErrorKind::trailing_bytes: return "trailing_bytes";
    case CheckpointErrorKind::checksum_mismatch: return "checksum_mismatch";
    case CheckpointErrorKind::malformed: return "malformed";
    case CheckpointErrorKind::wrong_scalar_type: return "wrong_scalar_type";
    case CheckpointErrorKind::wrong_expert_kind: return "wrong_expert_kind";
    case CheckpointErrorKind::shape_mismatch: return "shape_mismatch";
    case CheckpointErrorKind::tensor_mismatch: return "tensor_mismatch";
    case CheckpointErrorKind::non_finite_value: return "non_finite_value";
    case CheckpointErrorKind::optimizer_mismatch: return "optimizer_mismatch";
  }
  return "unknown";
}

/// Writes to_string(kind) (for test output and logs).
inline std::ostream& operator<<(std::ostream& stream, CheckpointErrorKind kind) { return stream << to_string(kind); }

namespace detail {

/// What SPARSEMOE_THROW(CheckpointError, …) carries: the kind and the message. Converts to
/// std::string so that the no-exceptions hook (which prints `std::string(message)`) works too.
struct CheckpointFailure {
  CheckpointErrorKind kind;
  std::string text;
  operator std::string() const { return text; }  // NOLINT(google-explicit-constructor)
};

}  // namespace detail

/// The exception every checkpoint function throws for a bad file or a failed I/O operation
/// (arguments that are wrong independently of any file, such as an optimizer whose state does
/// not fit the layer being saved, throw std::invalid_argument instead). The message names the
/// function, the file (if any), what was expected and what came.
class CheckpointError : public std::runtime_error {
 public:
  /// An error of `kind` with message `what`.
  CheckpointError(CheckpointErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  /// From SPARSEMOE_THROW(CheckpointError, detail::CheckpointFailure{…}).
  explicit CheckpointError(const detail::CheckpointFailure& failure)
      : std::runtime_error(failure.text), kind_(failure.kind) {}

  /// Which check failed.
  CheckpointErrorKind kind() const noexcept { return kind_; }

 private:
  CheckpointErrorKind kind_;
};

/// The expert kind string stored in a checkpoint for expert type `ExpertT`, checked on load.
/// Specialised for Expert<Scalar, Activation> ("expert:" + Activation::name, e.g. "expert:relu")
/// and SwiGluExpert<Scalar> ("swiglu"); specialise it, with a `static std::string name()` that no
/// other expert type returns, to checkpoint a layer of your own expert type.
template <typename ExpertT>
struct ExpertKind {
  static_assert(sizeof(ExpertT) == 0,
                "sparsemoe::ExpertKind is not specialised for this expert type: specialise it to checkpoint it");
  /// The kind string (never called: the primary template does not compile).
  static std::string name() { return {}; }
};

/// "expert:" + Activation::name.
template <typename Scalar, typename Activation>
struct ExpertKind<Expert<Scalar, Activation>> {
  /// "expert:" + Activation::name, e.g. "expert:gelu_erf".
  static std::string name() { return std::string("expert:") + Activation::name; }
};

/// "swiglu".
template <typename Scalar>
struct ExpertKind<SwiGluExpert<Scalar>> {
  /// "swiglu".
  static std::string name() { return "swiglu"; }
};

/// Name and shape of one tensor stored in a checkpoint.
struct CheckpointTensorInfo {
  std::string name;  ///< e.g. "expert0.w1", "adam.m.expert0.w1"
  Index rows = 0;    ///< rows (a vector is rows×1)
  Index cols = 0;    ///< columns
};

/// Everything a checkpoint says about itself, as returned by inspect_checkpoint() after the
/// integrity and structure checks (no target layer involved). Use config() to build a layer the
/// file loads into.
struct CheckpointInfo {
  std::uint32_t format_version = 0;                     ///< checkpoint_format_version
  std::size_t size_bytes = 0;                           ///< total file size, checksum included
  std::uint64_t checksum = 0;                           ///< the stored (and verified) XXH3-64
  std::string scalar_type;                              ///< "float32" or "float64"
  std::size_t scalar_size = 0;                          ///< 4 or 8
  std::string expert_kind;                              ///< ExpertKind<ExpertT>::name() of the writer
  Index input_dim = 0;                                  ///< d
  Index hidden_dim = 0;                                 ///< h
  Index num_experts = 0;                                ///< E
  Index k = 0;                                          ///< k
  double noise_epsilon = 0.0;                           ///< the gate's ε (exact)
  std::uint64_t noise_seed = 0;                         ///< the gate's noise seed
  std::vector<CheckpointTensorInfo> tensors;            ///< parameter tensors, MoELayer::tensors() order
  std::string optimizer = "none";                       ///< "none", "sgd" or "adam"
  std::int64_t optimizer_step_count = 0;                ///< steps the optimizer had taken
  SgdOptions sgd_options;                               ///< meaningful when optimizer == "sgd"
  AdamOptions adam_options;                             ///< meaningful when optimizer == "adam"
  std::vector<CheckpointTensorInfo> optimizer_tensors;  ///< state tensors, file order

  /// A layer configuration with this file's d, h, E, k, ε and seed: `MoELayer<S, ExpertT>
  /// layer(info.config())` of the right S and ExpertT accepts the file.
  MoEConfig config() const {
    MoEConfig result;
    result.input_dim = input_dim;
    result.hidden_dim = hidden_dim;
    result.num_experts = num_experts;
    result.k = k;
    result.noise_epsilon = noise_epsilon;
    result.seed = noise_seed;
    return result;
  }
};

namespace detail {

/// The 8 magic bytes every checkpoint starts with.
inline constexpr char checkpoint_magic[8] = {'S', 'P', 'M', 'O', 'E', 'C', 'K', 'P'};
inline constexpr std::size_t checkpoint_magic_size = 8;
/// Offset of the u32 version, of the u64 total size, and the size of that fixed prefix.
inline constexpr std::size_t checkpoint_version_offset = 8;
inline constexpr std::size_t checkpoint_size_offset = 12;
inline constexpr std::size_t checkpoint_prefix_size = 20;
inline constexpr std::size_t checkpoint_checksum_size = 8;
/// The smallest well-formed file: prefix, scalar code and size, an empty kind string, d, h, E, k,
/// ε, seed, tensor count, "none" (4 + 4 bytes), checksum.
inline constexpr std::size_t checkpoint_min_size = checkpoint_prefix_size + 8 + 4 + 6 * 8 + 8 + 8 + checkpoint_checksum_size;
/// Limits on stored strings (a guard against absurd lengths, far above any real name).
inline constexpr std::size_t checkpoint_max_kind_length = 256;
inline constexpr std::size_t checkpoint_max_name_length = 4096;

/// Scalar type code stored in a checkpoint: 1 = float (binary32), 2 = double (binary64).
template <typename Scalar>
constexpr std::uint32_t checkpoint_scalar_code() {
  return std::is_same<Scalar, float>::value ? 1u : 2u;
}

/// "float32" / "float64" for a scalar code, "unknown code <c>" otherwise.
inline std::string checkpoint_scalar_name(std::uint32_t code) {
  if (code == 1) return "float32";
  if (code == 2) return "float64";
  return "unknown scalar type code " + std::to_string(code);
}

/// XXH3-64 (seed 0) of `size` bytes: the checkpoint checksum.
inline std::uint64_t checkpoint_checksum(const void* data, std::size_t size) { return XXH3_64bits(data, size); }

/// Throws CheckpointError(kind, "<context>: <kind>: <parts...>") through SPARSEMOE_THROW; never
/// returns (a SPARSEMOE_THROW hook must not return either; if it does, this aborts).
template <typename... Parts>
[[noreturn]] void checkpoint_fail(CheckpointErrorKind kind, const std::string& context, const Parts&... parts) {
  SPARSEMOE_THROW(CheckpointError, (CheckpointFailure{kind, message(context, ": ", to_string(kind), ": ", parts...)}));
  std::abort();
}

/// `value` as "0x" and 16 lowercase hex digits.
inline std::string hex64(std::uint64_t value) {
  std::string text = "0x0000000000000000";
  for (std::size_t i = 0; i < 16; ++i) text[17 - i] = "0123456789abcdef"[(value >> (4 * i)) & 0xFu];
  return text;
}

/// The message text of errno value `error`.
inline std::string errno_text(int error) { return std::generic_category().message(error) + " (errno " + std::to_string(error) + ")"; }

/// Little-endian reads of fixed-size integers at `data` (no bounds check: callers check).
inline std::uint32_t load_u32(const unsigned char* data) {
  return static_cast<std::uint32_t>(data[0]) | static_cast<std::uint32_t>(data[1]) << 8 |
         static_cast<std::uint32_t>(data[2]) << 16 | static_cast<std::uint32_t>(data[3]) << 24;
}
inline std::uint64_t load_u64(const unsigned char* data) {
  return static_cast<std::uint64_t>(load_u32(data)) | static_cast<std::uint64_t>(load_u32(data + 4)) << 32;
}

/// Appends little-endian fields to a byte string (the checkpoint being written).
class CheckpointWriter {
 public:
  explicit CheckpointWriter(std::string& out) : out_(out) {}

  std::size_t position() const { return out_.size(); }
  void bytes(const void* data, std::size_t size) {
    if (size > 0) out_.append(static_cast<const char*>(data), size);
  }
  void u32(std::uint32_t value) {
    for (int shift = 0; shift < 32; shift += 8) out_.push_back(static_cast<char>((value >> shift) & 0xFFu));
  }
  void u64(std::uint64_t value) {
    for (int shift = 0; shift < 64; shift += 8) out_.push_back(static_cast<char>((value >> shift) & 0xFFu));
  }
  void i64(std::int64_t value) { u64(static_cast<std::uint64_t>(value)); }
  void f64(double value) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    u64(bits);
  }
  void str(const std::string& value) {
    u32(static_cast<std::uint32_t>(value.size()));
    bytes(value.data(), value.size());
  }
  /// Overwrites the u64 at `offset` (a field written earlier as a placeholder).
  void patch_u64(std::size_t offset, std::uint64_t value) {
    for (int shift = 0; shift < 64; shift += 8) {
      out_[offset++] = static_cast<char>((value >> shift) & 0xFFu);
    }
  }

 private:
  std::string& out_;
};

/// Bounds-checked little-endian reads from [position, end) of a checkpoint whose integrity was
/// verified; running past `end` is a CheckpointErrorKind::malformed error naming the field.
class CheckpointReader {
 public:
  CheckpointReader(const unsigned char* data, std::size_t begin, std::size_t end, const std::string& context)
      : data_(data), position_(begin), end_(end), context_(context) {}

  std::size_t position() const { return position_; }
  std::size_t remaining() const { return end_ - position_; }

  std::uint32_t u32(const char* field) {
    need(4, field);
    const std::uint32_t value = load_u32(data_ + position_);
    position_ += 4;
    return value;
  }
  std::uint64_t u64(const char* field) {
    need(8, field);
    const std::uint64_t value = load_u64(data_ + position_);
    position_ += 8;
    return value;
  }
  std::int64_t i64(const char* field) { return static_cast<std::int64_t>(u64(field)); }
  double f64(const char* field) {
    const std::uint64_t bits = u64(field);
    double value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  std::string str(std::size_t max_length, const char* field) {
    const std::size_t length = u32(field);
    if (length > max_length) {
      checkpoint_fail(CheckpointErrorKind::malformed, context_, field, " at offset ", position_ - 4, " is ", length,
                      " bytes long, at most ", max_length, " expected");
    }
    need(length, field);
    std::string value(reinterpret_cast<const char*>(data_ + position_), length);
    position_ += length;
    return value;
  }
  /// Skips `size` bytes of `field`, returning the offset where they start.
  std::size_t skip(std::size_t size, const char* field) {
    need(size, field);
    const std::size_t start = position_;
    position_ += size;
    return start;
  }

 private:
  void need(std::size_t size, const char* field) const {
    if (size > end_ - position_) {
      checkpoint_fail(CheckpointErrorKind::malformed, context_, field, " at offset ", position_, " needs ", size,
                      " bytes, only ", end_ - position_, " remain before the checksum");
    }
  }

  const unsigned char* data_;
  std::size_t position_;
  std::size_t end_;
  const std::string& context_;
};

/// A checkpoint that passed the integrity and structure checks: its description, plus where each
/// tensor's payload starts in the buffer it was parsed from.
struct ParsedCheckpoint {
  CheckpointInfo info;
  std::vector<std::size_t> tensor_offsets;            ///< payload offset of info.tensors[i]
  std::vector<std::size_t> optimizer_tensor_offsets;  ///< payload offset of info.optimizer_tensors[i]
};

/// Whether `options` satisfy Sgd's constructor checks (lr finite > 0, 0 ≤ μ < 1, λ finite ≥ 0,
/// Nesterov only with μ > 0).
inline bool valid_sgd_options(const SgdOptions& options) {
  return std::isfinite(options.learning_rate) && options.learning_rate > 0.0 && options.momentum >= 0.0 &&
         options.momentum < 1.0 && std::isfinite(options.weight_decay) && options.weight_decay >= 0.0 &&
         (!options.nesterov || options.momentum > 0.0);
}

/// Whether `options` satisfy Adam's constructor checks (lr, ε finite > 0, 0 ≤ β1, β2 < 1, λ finite ≥ 0).
inline bool valid_adam_options(const AdamOptions& options) {
  return std::isfinite(options.learning_rate) && options.learning_rate > 0.0 && options.beta1 >= 0.0 &&
         options.beta1 < 1.0 && options.beta2 >= 0.0 && options.beta2 < 1.0 && std::isfinite(options.epsilon) &&
         options.epsilon > 0.0 && std::isfinite(options.weight_decay) && options.weight_decay >= 0.0;
}

/// Reads one tensor record (name, rows, cols, payload) and returns its description and the
/// payload offset. O(name length); the payload is only bounds-checked, not read.
inline void read_tensor_record(CheckpointReader& reader, std::size_t scalar_size, const std::string& context,
                               std::vector<CheckpointTensorInfo>& tensors, std::vector<std::size_t>& offsets) {
  CheckpointTensorInfo tensor;
  tensor.name = reader.str(checkpoint_max_name_length, "a tensor name");
  const std::size_t shape_offset = reader.position();
  const std::int64_t rows = reader.i64("tensor rows");
  const std::int64_t cols = reader.i64("tensor cols");
  if (rows < 0 || cols < 0) {
    checkpoint_fail(CheckpointErrorKind::malformed, context, "tensor '", tensor.name, "' at offset ", shape_offset,
                    " has shape ", rows, "x", cols, ", expected non-negative rows and cols");
  }
  // rows·cols·scalar_size must fit in what remains; checked without overflow.
  const auto urows = static_cast<std::uint64_t>(rows);
  const auto ucols = static_cast<std::uint64_t>(cols);
  const std::uint64_t available = reader.remaining() / scalar_size;
  if (urows != 0 && ucols > available / urows) {
    checkpoint_fail(CheckpointErrorKind::malformed, context, "tensor '", tensor.name, "' is ", rows, "x", cols,
                    ", which needs more bytes than the ", reader.remaining(), " left before the checksum");
  }
  tensor.rows = static_cast<Index>(rows);
  tensor.cols = static_cast<Index>(cols);
  offsets.push_back(reader.skip(static_cast<std::size_t>(urows * ucols) * scalar_size, "a tensor payload"));
  tensors.push_back(std::move(tensor));
}

/// Checks the integrity (size, magic, version, total size, checksum) and the structure of the
/// `size` bytes at `data`, without any target layer. `context` prefixes error messages
/// ("<function>" or "<function>: '<path>'"). O(size): one XXH3 pass plus the field reads.
inline ParsedCheckpoint parse_checkpoint(const unsigned char* data, std::size_t size, const std::string& context) {
  using Kind = CheckpointErrorKind;
  // 1. Magic (a short prefix of the magic is a truncated checkpoint, anything else is not one).
  if (size < checkpoint_magic_size) {
    if (size == 0 || std::memcmp(data, checkpoint_magic, size) == 0) {
      checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", checkpoint_min_size,
                      " (a checkpoint starts with the 8-byte magic \"SPMOECKP\")");
    }
    checkpoint_fail(Kind::bad_magic, context, "expected the magic \"SPMOECKP\", got a ", size,
                    "-byte file that does not start with it");
  }
  if (std::memcmp(data, checkpoint_magic, checkpoint_magic_size) != 0) {
    std::string got;
    for (std::size_t i = 0; i < checkpoint_magic_size; ++i) {
      const char hex[] = "0123456789abcdef";
      got += hex[data[i] >> 4];
      got += hex[data[i] & 0xF];
    }
    checkpoint_fail(Kind::bad_magic, context, "expected the magic \"SPMOECKP\" (53504d4f45434b50), got ", got,
                    ": not a sparsemoe checkpoint");
  }
  // 2. Version, before anything else, so that a later version may change all that follows.
  if (size < checkpoint_version_offset + 4) {
    checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", checkpoint_min_size,
                    " (the file ends inside the format version)");
  }
  const std::uint32_t version = load_u32(data + checkpoint_version_offset);
  if (version != checkpoint_format_version) {
    checkpoint_fail(Kind::unsupported_version, context, "expected format version ", checkpoint_format_version,
                    ", got version ", version);
  }
  // 3. Total size: truncation and trailing bytes are told apart from corruption.
  if (size < checkpoint_prefix_size) {
    checkpoint_fail(Kind::truncated, context, "got ", size, " bytes, expected at least ", checkpoint_min_size,
                    " (the file ends inside the total size field)");
  }
  const std::uint64_t total = load_u64(data + checkpoint_size_offset);
  if (total < checkpoint_min_size) {
    checkpoint_fail(Kind::malformed, context, "the header's total size is ", total, " bytes, expected at least ",
                    checkpoint_min_size);
  }
  if (static_cast<std::uint64_t>(size) < total) {
    checkpoint_fail(Kind::truncated, context, "expected ", total, " bytes (the header's total size), got ", size);
  }
  if (static_cast<std::uint64_t>(size) > total) {
    checkpoint_fail(Kind::trailing_bytes, context, "expected ", total, " bytes (the header's total size), got ", size,
                    ": ", static_cast<std::uint64_t>(size) - total, " trailing bytes");
  }
  // 4. Checksum over everything before it.
  const std::size_t body = size - checkpoint_checksum_size;
  const std::uint64_t stored = load_u64(data + body);
  const std::uint64_t computed = checkpoint_checksum(data, body);
  if (stored != computed) {
    checkpoint_fail(Kind::checksum_mismatch, context, "expected XXH3-64 ", hex64(stored),
                    " (stored in the last 8 bytes), got ", hex64(computed), " over bytes [0, ", body,
                    "): the checkpoint is corrupted");
  }
  // 5. Structure.
  ParsedCheckpoint parsed;
  CheckpointInfo& info = parsed.info;
  info.format_version = version;
  info.size_bytes = size;
  info.checksum = stored;
  CheckpointReader reader(data, checkpoint_prefix_size, body, context);
  const std::uint32_t scalar_code = reader.u32("the scalar type code");
  const std::uint32_t scalar_size = reader.u32("the scalar size");
  if (scalar_code != 1 && scalar_code != 2) {
    checkpoint_fail(Kind::wrong_scalar_type, context, "expected scalar type code 1 (float32) or 2 (float64), got ",
                    scalar_code);
  }
  const std::uint32_t expected_scalar_size = scalar_code == 1 ? 4u : 8u;
  if (scalar_size != expected_scalar_size) {
    checkpoint_fail(Kind::malformed, context, "scalar type ", checkpoint_scalar_name(scalar_code), " has size ",
                    expected_scalar_size, ", the file says ", scalar_size);
  }
  info.scalar_type = checkpoint_scalar_name(scalar_code);
  info.scalar_size = scalar_size;
  info.expert_kind = reader.str(checkpoint_max_kind_length, "the expert kind");
  const std::int64_t d = reader.i64("d");
  const std::int64_t h = reader.i64("h");
  const std::int64_t experts = reader.i64("E");
  const std::int64_t k = reader.i64("k");
  if (d < 1 || h < 1 || experts < 1 || k < 1 || k > experts) {
    checkpoint_fail(Kind::malformed, context, "expected d, h, E >= 1 and 1 <= k <= E, got d=", d, ", h=", h,
                    ", E=", experts, ", k=", k);
  }
  info.input_dim = static_cast<Index>(d);
  info.hidden_dim = static_cast<Index>(h);
  info.num_experts = static_cast<Index>(experts);
  info.k = static_cast<Index>(k);
  info.noise_epsilon = reader.f64("the noise epsilon");
  if (!(std::isfinite(info.noise_epsilon) && info.noise_epsilon > 0.0)) {
    checkpoint_fail(Kind::malformed, context, "expected a finite noise epsilon > 0, got ", info.noise_epsilon);
  }
  info.noise_seed = reader.u64("the noise seed");
  const std::uint64_t tensor_count = reader.u64("the tensor count");
  // Each record takes at least 20 bytes: the count cannot exceed what remains / 20.
  if (tensor_count > reader.remaining() / 20) {
    checkpoint_fail(Kind::malformed, context, "the tensor count ", tensor_count, " cannot fit in the ",
                    reader.remaining(), " bytes left before the checksum");
  }
  info.tensors.reserve(static_cast<std::size_t>(tensor_count));
  parsed.tensor_offsets.reserve(static_cast<std::size_t>(tensor_count));
  for (std::uint64_t i = 0; i < tensor_count; ++i) {
    read_tensor_record(reader, scalar_size, context, info.tensors, parsed.tensor_offsets);
  }
  // 6. Optimizer section.
  info.optimizer = reader.str(16, "the optimizer kind");
  std::vector<std::string> expected_state_names;
  if (info.optimizer == "sgd") {
    info.optimizer_step_count = reader.i64("the sgd step count");
    info.sgd_options.learning_rate = reader.f64("the sgd learning rate");
    info.sgd_options.momentum = reader.f64("the sgd momentum");
    info.sgd_options.weight_decay = reader.f64("the sgd weight decay");
    const std::uint32_t nesterov = reader.u32("the sgd nesterov flag");
    if (nesterov > 1) {
      checkpoint_fail(Kind::malformed, context, "expected the sgd nesterov flag 0 or 1, got ", nesterov);
    }
    info.sgd_options.nesterov = nesterov == 1;
    if (!valid_sgd_options(info.sgd_options)) {
      checkpoint_fail(Kind::malformed, context, "invalid sgd hyper-parameters: learning_rate=",
                      info.sgd_options.learning_rate, ", momentum=", info.sgd_options.momentum,
                      ", weight_decay=", info.sgd_options.weight_decay, ", nesterov=", nesterov);
    }
    if (info.optimizer_step_count > 0 && info.sgd_options.momentum > 0.0) {
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("sgd.velocity." + tensor.name);
    }
  } else if (info.optimizer == "adam") {
    info.optimizer_step_count = reader.i64("the adam step count");
    info.adam_options.learning_rate = reader.f64("the adam learning rate");
    info.adam_options.beta1 = reader.f64("the adam beta1");
    info.adam_options.beta2 = reader.f64("the adam beta2");
    info.adam_options.epsilon = reader.f64("the adam epsilon");
    info.adam_options.weight_decay = reader.f64("the adam weight decay");
    if (!valid_adam_options(info.adam_options)) {
      checkpoint_fail(Kind::malformed, context, "invalid adam hyper-parameters: learning_rate=",
                      info.adam_options.learning_rate, ", beta1=", info.adam_options.beta1, ", beta2=",
                      info.adam_options.beta2, ", epsilon=", info.adam_options.epsilon, ", weight_decay=",
                      info.adam_options.weight_decay);
    }
    if (info.optimizer_step_count > 0) {
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("adam.m." + tensor.name);
      for (const CheckpointTensorInfo& tensor : info.tensors) expected_state_names.push_back("adam.v." + tensor.name);
    }
  } else if (info.optimizer != "none") {
    checkpoint_fail(Kind::malformed, context, "expected the optimizer kind \"none\", \"sgd\" or \"adam\", got \"",
                    info.optimizer, "\"");
  }
  if (info.optimizer != "none") {
    if (info.optimizer_step_count < 0) {
      checkpoint_fail(Kind::malformed, context, "expected a ", info.optimizer, " step count >= 0, got ",
                      info.optimizer_step_count);
    }
    const std::uint64_t state_count = reader.u64("the optimizer state tensor count");
    if (state_count != expected_state_names.size()) {
      checkpoint_fail(Kind::malformed, context, "expected ", expected_state_names.size(), " ", info.optimizer,
                      " state tensors (step count ", info.optimizer_step_count, ", ", info.tensors.size(),
                      " parameter tensors), got ", state_count);
    }
    for (std::size_t i = 0; i < expected_state_names.size(); ++i) {
      read_tensor_record(reader, scalar_size, context, info.optimizer_tensors, parsed.optimizer_tensor_offsets);
      const CheckpointTensorInfo& state = info.optimizer_tensors.back();
      const CheckpointTensorInfo& parameter = info.tensors[i % info.tensors.size()];
      if (state.name != expected_state_names[i]) {
        checkpoint_fail(Kind::malformed, context, "optimizer state tensor ", i, " should be '",
                        expected_state_names[i], "', got '", state.name, "'");
      }
      if (state.rows != parameter.rows || state.cols != parameter.cols) {
        checkpoint_fail(Kind::malformed, context, "optimizer state tensor '", state.name, "' is ", state.rows, "x",
                        state.cols, ", its parameter '", parameter.name, "' is ", parameter.rows, "x",
                        parameter.cols);
      }
    }
  }
  if (reader.remaining() != 0) {
    checkpoint_fail(Kind::malformed, context, "the content ends at offset ", reader.position(), ", ",
                    reader.remaining(), " bytes before the checksum at offset ", body);
  }
  return parsed;
}

/// The parameter names and shapes written for a layer (the optimizer section needs them).
struct WrittenTensor {
  std::string name;
  Index rows;
  Index cols;
};

/// Appends one tensor record.
template <typename Scalar>
void write_tensor_record(CheckpointWriter& writer, const std::string& name, Index rows, Index cols,
                         const Scalar* data) {
  writer.str(name);
  writer.i64(static_cast<std::int64_t>(rows));
  writer.i64(static_cast<std::int64_t>(cols));
  writer.bytes(data, static_cast<std::size_t>(rows * cols) * sizeof(Scalar));
}

/// Appends the layer's header fields and parameter tensors; returns their names and shapes.
/// MoELayer::tensors() is non-const, so the views are taken from copies: the gate, then one
/// expert at a time (extra memory: one expert). Names are those of MoELayer::tensors().
template <typename Scalar, typename ExpertT>
std::vector<WrittenTensor> write_layer(CheckpointWriter& writer, const MoELayer<Scalar, ExpertT>& layer) {
  const NoisyTopKGate<Scalar>& gate = layer.gate();
  writer.u32(checkpoint_scalar_code<Scalar>());
  writer.u32(static_cast<std::uint32_t>(sizeof(Scalar)));
  writer.str(ExpertKind<ExpertT>::name());
  writer.i64(static_cast<std::int64_t>(layer.input_dim()));
  writer.i64(static_cast<std::int64_t>(layer.hidden_dim()));
  writer.i64(static_cast<std::int64_t>(layer.num_experts()));
  writer.i64(static_cast<std::int64_t>(layer.k()));
  writer.f64(static_cast<double>(gate.noise_epsilon()));
  writer.u64(gate.noise_seed());
  const std::size_t count_offset = writer.position();
  writer.u64(0);  // tensor count, patched below
  std::vector<WrittenTensor> written;
  const auto write_views = [&](const std::string& prefix, const std::vector<TensorView<Scalar>>& views) {
    for (const TensorView<Scalar>& view : views) {
      written.push_back({prefix + view.name, view.rows, view.cols});
      write_tensor_record(writer, written.back().name, view.rows, view.cols, view.data);
    }
  };
  {
    NoisyTopKGate<Scalar> gate_copy = gate;
    write_views("gate.", gate_copy.tensors());
  }
  for (Index e = 0; e < layer.num_experts(); ++e) {
    ExpertT expert_copy = layer.expert(e);
    write_views("expert" + std::to_string(e) + ".", expert_copy.tensors());
  }
  writer.patch_u64(count_offset, static_cast<std::uint64_t>(written.size()));
  return written;
}

/// No optimizer: kind "none".
struct NoOptimizer {};

/// How many parameter-sized state tensors each parameter tensor has in the file.
inline Index state_copies(const NoOptimizer&) { return 0; }
template <typename Scalar>
Index state_copies(const Sgd<Scalar>& optimizer) {
  return optimizer.velocities().empty() ? 0 : 1;
}
template <typename Scalar>
Index state_copies(const Adam<Scalar>& optimizer) {
  return optimizer.first_moments().empty() ? 0 : 2;
}

inline void write_optimizer(CheckpointWriter& writer, const std::vector<WrittenTensor>&, const NoOptimizer&,
                            const char*) {
  writer.str("none");
}

/// Throws std::invalid_argument unless `state` holds one flat tensor per written parameter, of its size.
template <typename Scalar>
void check_state(const std::vector<Vector<Scalar>>& state, const std::vector<WrittenTensor>& parameters,
                 const char* function, const char* what) {
  require(state.size() == parameters.size(), function, "the optimizer has ", state.size(), " ", what,
          " tensors but the layer has ", parameters.size(), " parameter tensors: it was not stepped on this layer");
  for (std::size_t i = 0; i < state.size(); ++i) {
    require(state[i].size() == parameters[i].rows * parameters[i].cols, function, "the optimizer's ", what,
            " tensor ", i, " has ", state[i].size(), " scalars but parameter '", parameters[i].name, "' is ",
            parameters[i].rows, "x", parameters[i].cols);
  }
}

template <typename Scalar>
void write_optimizer(CheckpointWriter& writer, const std::vector<WrittenTensor>& parameters,
                     const Sgd<Scalar>& optimizer, const char* function) {
  const SgdOptions& options = optimizer.options();
  const bool has_state = optimizer.step_count() > 0 && options.momentum > 0.0;
  if (has_state) {
    check_state(optimizer.velocities(), parameters, function, "velocity");
  }
  writer.str("sgd");
  writer.i64(optimizer.step_count());
  writer.f64(options.learning_rate);
  writer.f64(options.momentum);
  writer.f64(options.weight_decay);
  writer.u32(options.nesterov ? 1u : 0u);
  writer.u64(has_state ? static_cast<std::uint64_t>(parameters.size()) : 0u);
  if (!has_state) return;
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    write_tensor_record(writer, "sgd.velocity." + parameters[i].name, parameters[i].rows, parameters[i].cols,
                        optimizer.velocities()[i].data());
  }
}

template <typename Scalar>
void write_optimizer(CheckpointWriter& writer, const std::vector<WrittenTensor>& parameters,
                     const Adam<Scalar>& optimizer, const char* function) {
  const AdamOptions& options = optimizer.options();
  const bool has_state = optimizer.step_count() > 0;
  if (has_state) {
    check_state(optimizer.first_moments(), parameters, function, "first moment");
    check_state(optimizer.second_moments(), parameters, function, "second moment");
  }
  writer.str("adam");
  writer.i64(optimizer.step_count());
  writer.f64(options.learning_rate);
  writer.f64(options.beta1);
  writer.f64(options.beta2);
  writer.f64(options.epsilon);
  writer.f64(options.weight_decay);
  writer.u64(has_state ? static_cast<std::uint64_t>(2 * parameters.size()) : 0u);
  if (!has_state) return;
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    write_tensor_record(writer, "adam.m." + parameters[i].name, parameters[i].rows, parameters[i].cols,
                        optimizer.first_moments()[i].data());
  }
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    write_tensor_record(writer, "adam.v." + parameters[i].name, parameters[i].rows, parameters[i].cols,
                        optimizer.second_moments()[i].data());
  }
}

/// The whole checkpoint of `layer` (and `optimizer`) as bytes.
template <typename Scalar, typename ExpertT, typename Optimizer>
std::string serialize(const MoELayer<Scalar, ExpertT>& layer, const Optimizer& optimizer, const char* function) {
  std::string bytes;
  // Reserve the exact payload (parameters, plus their state copies) and a generous allowance for
  // the names and fields, so that the buffer is allocated once.
  const ExpertT& first = layer.expert(0);
  const Index expert_scalars = first.w1().size() + first.b1().size() + first.w2().size() + first.b2().size();
  const Index parameter_scalars = 2 * layer.input_dim() * layer.num_experts() + layer.num_experts() * expert_scalars;
  const Index tensors = 2 + 4 * layer.num_experts();
  bytes.reserve(static_cast<std::size_t>(parameter_scalars * (1 + state_copies(optimizer))) * sizeof(Scalar) +
                static_cast<std::size_t>(tensors * (1 + state_copies(optimizer)) * 96 + 256));
  CheckpointWriter writer(bytes);
  writer.bytes(checkpoint_magic, checkpoint_magic_size);
  writer.u32(checkpoint_format_version);
  writer.u64(0);  // total size, patched below
  const std::vector<WrittenTensor> parameters = write_layer(writer, layer);
  write_optimizer(writer, parameters, optimizer, function);
  writer.patch_u64(checkpoint_size_offset, static_cast<std::uint64_t>(bytes.size() + checkpoint_checksum_size));
  writer.u64(checkpoint_checksum(bytes.data(), bytes.size()));
  return bytes;
}

/// Copies `count` scalars of a verified payload into a new flat vector.
template <typename Scalar>
Vector<Scalar> payload_vector(const unsigned char* data, std::size_t offset, Index count) {
  Vector<Scalar> vector(count);
  if (count > 0) std::memcpy(vector.data(), data + offset, static_cast<std::size_t>(count) * sizeof(Scalar));
  return vector;
}

/// Checks that `parsed` fits `layer` (scalar type, expert kind, d, h, E, k, ε representable,
/// tensor count, names and shapes against `views` = layer.tensors()). Touches nothing.
template <typename Scalar, typename ExpertT>
void check_compatible(const ParsedCheckpoint& parsed, const MoELayer<Scalar, ExpertT>& layer,
                      const std::vector<TensorView<Scalar>>& views, const std::string& context) {
  using Kind = CheckpointErrorKind;
  const CheckpointInfo& info = parsed.info;
  const std::string layer_scalar = checkpoint_scalar_name(checkpoint_scalar_code<Scalar>());
  if (info.scalar_type != layer_scalar) {
    checkpoint_fail(Kind::wrong_scalar_type, context, "expected ", layer_scalar, " tensors (the layer's Scalar), got ",
                    info.scalar_type);
  }
  const std::string kind = ExpertKind<ExpertT>::name();
  if (info.expert_kind != kind) {
    checkpoint_fail(Kind::wrong_expert_kind, context, "expected expert kind \"", kind, "\" (the layer's), got \"",
                    info.expert_kind, "\"");
  }
  const struct {
    const char* name;
    Index file;
    Index target;
  } sizes[] = {{"input_dim (d)", info.input_dim, layer.input_dim()},
               {"hidden_dim (h)", info.hidden_dim, layer.hidden_dim()},
               {"num_experts (E)", info.num_experts, layer.num_experts()},
               {"k", info.k, layer.k()}};
  for (const auto& item : sizes) {
    if (item.file != item.target) {
      checkpoint_fail(Kind::shape_mismatch, context, "expected ", item.name, " = ", item.target,
                      " (the layer's), got ", item.file);
    }
  }
  const auto epsilon = static_cast<Scalar>(info.noise_epsilon);
  if (!(std::isfinite(epsilon) && epsilon > Scalar(0) && static_cast<double>(epsilon) == info.noise_epsilon)) {
    checkpoint_fail(Kind::malformed, context, "the noise epsilon ", info.noise_epsilon, " is not exactly a finite ",
                    layer_scalar, " > 0");
  }
  if (info.tensors.size() != views.size()) {
    checkpoint_fail(Kind::tensor_mismatch, context, "expected ", views.size(), " parameter tensors (the layer's), got ",
                    info.tensors.size());
  }
  for (std::size_t i = 0; i < views.size(); ++i) {
    const CheckpointTensorInfo& tensor = info.tensors[i];
    if (tensor.name != views[i].name) {
      checkpoint_fail(Kind::tensor_mismatch, context, "expected tensor ", i, " to be '", views[i].name,
                      "' (the layer's), got '", tensor.name, "'");
    }
    if (tensor.rows != views[i].rows || tensor.cols != views[i].cols) {
      checkpoint_fail(Kind::shape_mismatch, context, "tensor '", tensor.name, "': expected ", views[i].rows, "x",
                      views[i].cols, " (the layer's), got ", tensor.rows, "x", tensor.cols);
    }
  }
}

/// Throws CheckpointError(non_finite_value) naming the first parameter tensor of a verified
/// checkpoint that holds a NaN or an infinity: such weights would spread to every output. O(size).
template <typename Scalar>
void check_finite_tensors(const unsigned char* data, const ParsedCheckpoint& parsed, const std::string& context) {
  for (std::size_t i = 0; i < parsed.info.tensors.size(); ++i) {
    const CheckpointTensorInfo& tensor = parsed.info.tensors[i];
    const unsigned char* values = data + parsed.tensor_offsets[i];
    const auto count = static_cast<std::size_t>(tensor.rows * tensor.cols);
    for (std::size_t j = 0; j < count; ++j) {
      Scalar value;
      std::memcpy(&value, values + j * sizeof(Scalar), sizeof(Scalar));
      if (!std::isfinite(value)) {
        checkpoint_fail(CheckpointErrorKind::non_finite_value, context, "tensor '", tensor.name, "' holds ", value,
                        " at flat index ", j);
      }
    }
  }
}

/// Restores optimizer state from a verified, compatible checkpoint (strong guarantee: the
/// optimizer's restore_state validates and allocates before it commits).
template <typename Scalar>
void restore_optimizer(const unsigned char*, const ParsedCheckpoint&, const std::vector<TensorView<Scalar>>&,
                       NoOptimizer&, const std::string&) {}

inline void require_optimizer_kind(const ParsedCheckpoint& parsed, const char* kind, const std::string& context) {
  if (parsed.info.optimizer != kind) {
    checkpoint_fail(CheckpointErrorKind::optimizer_mismatch, context, "expected ", kind, " optimizer state, got ",
                    parsed.info.optimizer == "none" ? std::string("a checkpoint without optimizer state")
                                                    : parsed.info.optimizer + " state");
  }
}

template <typename Scalar>
void restore_optimizer(const unsigned char* data, const ParsedCheckpoint& parsed,
                       const std::vector<TensorView<Scalar>>& views, Sgd<Scalar>& optimizer, const std::string&) {
  std::vector<Vector<Scalar>> velocities;
  velocities.reserve(parsed.info.optimizer_tensors.size());
  for (std::size_t i = 0; i < parsed.info.optimizer_tensors.size(); ++i) {
    const CheckpointTensorInfo& tensor = parsed.info.optimizer_tensors[i];
    velocities.push_back(payload_vector<Scalar>(data, parsed.optimizer_tensor_offsets[i], tensor.rows * tensor.cols));
  }
  optimizer.restore_state(parsed.info.sgd_options, parsed.info.optimizer_step_count, views, std::move(velocities));
}

template <typename Scalar>
void restore_optimizer(const unsigned char* data, const ParsedCheckpoint& parsed,
                       const std::vector<TensorView<Scalar>>& views, Adam<Scalar>& optimizer, const std::string&) {
  std::vector<Vector<Scalar>> first;
  std::vector<Vector<Scalar>> second;
  const std::size_t half = parsed.info.optimizer_tensors.size() / 2;
  first.reserve(half);
  second.reserve(half);
  for (std::size_t i = 0; i < parsed.info.optimizer_tensors.size(); ++i) {
    const CheckpointTensorInfo& tensor = parsed.info.optimizer_tensors[i];
    (i < half ? first : second)
        .push_back(payload_vector<Scalar>(data, parsed.optimizer_tensor_offsets[i], tensor.rows * tensor.cols));
  }
  optimizer.restore_state(parsed.info.adam_options, parsed.info.optimizer_step_count, views, std::move(first),
                          std::move(second));
}

inline void check_optimizer_kind(const ParsedCheckpoint&, const NoOptimizer&, const std::string&) {}
template <typename Scalar>
void check_optimizer_kind(const ParsedCheckpoint& parsed, const Sgd<Scalar>&, const std::string& context) {
  require_optimizer_kind(parsed, "sgd", context);
}
template <typename Scalar>
void check_optimizer_kind(const ParsedCheckpoint& parsed, const Adam<Scalar>&, const std::string& context) {
  require_optimizer_kind(parsed, "adam", context);
}

/// Parses, validates against `layer` (and `optimizer`), then copies in. Nothing is modified
/// unless every check passed; the commit itself cannot fail (moves, swaps and memcpy).
template <typename Scalar, typename ExpertT, typename Optimizer>
void deserialize(const void* data, std::size_t size, MoELayer<Scalar, ExpertT>& layer, Optimizer& optimizer,
                 const std::string& context, const CheckpointLoadOptions& options) {
  static_assert(std::is_nothrow_move_assignable<NoisyTopKGate<Scalar>>::value,
                "the checkpoint commit relies on a no-throw gate move");
  require(data != nullptr || size == 0, context.c_str(), "data is a null pointer but size is ", size);
  static const unsigned char empty = 0;
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  const ParsedCheckpoint parsed = parse_checkpoint(bytes, size, context);
  std::vector<TensorView<Scalar>> views = layer.tensors();
  check_compatible(parsed, layer, views, context);
  check_optimizer_kind(parsed, optimizer, context);
  if (!options.allow_non_finite) check_finite_tensors<Scalar>(bytes, parsed, context);
  // Everything that may allocate happens before the first modification.
  NoisyTopKGate<Scalar> gate(layer.input_dim(), layer.num_experts(), layer.k(),
                             static_cast<Scalar>(parsed.info.noise_epsilon), parsed.info.noise_seed);
  gate.set_check_finite(layer.gate().check_finite());
  restore_optimizer(bytes, parsed, views, optimizer, context);  // strong guarantee; may throw only before it commits
  // Commit: no-throw from here on.
  for (std::size_t i = 0; i < views.size(); ++i) {
    const auto count = static_cast<std::size_t>(views[i].size());
    if (count > 0) std::memcpy(views[i].data, bytes + parsed.tensor_offsets[i], count * sizeof(Scalar));
  }
  // Give the loaded weights to the new gate (it carries the file's ε and seed), then install it.
  gate.gate_weight().swap(layer.gate().gate_weight());
  gate.noise_weight().swap(layer.gate().noise_weight());
  layer.gate() = std::move(gate);
}

/// "<function>: '<path>'".
inline std::string file_context(const char* function, const std::string& path) {
  return std::string(function) + ": '" + path + "'";
}

/// Closes `fd`, retrying on EINTR is not done (POSIX leaves the descriptor state unspecified).
inline int close_fd(int fd) { return ::close(fd); }

/// The whole content of the file at `path`. Throws CheckpointError(io) naming the path and errno.
inline std::string read_file(const std::string& path, const char* function) {
  const std::string context = file_context(function, path);
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // O_NONBLOCK: a FIFO must not hang us
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int error = errno;
    checkpoint_fail(CheckpointErrorKind::io, context, "cannot open for reading: ", errno_text(error));
  }
  struct stat status {};
  if (::fstat(fd, &status) != 0) {
    const int error = errno;
    close_fd(fd);
    checkpoint_fail(CheckpointErrorKind::io, context, "cannot stat: ", errno_text(error));
  }
  if (!S_ISREG(status.st_mode)) {
    close_fd(fd);
    checkpoint_fail(CheckpointErrorKind::io, context, "expected a regular file, got ",
                    S_ISDIR(status.st_mode) ? "a directory" : "a special file");
  }
  std::string content;
  content.resize(status.st_size > 0 ? static_cast<std::size_t>(status.st_size) : 0);
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

// ---- In memory ----------------------------------------------------------------------------------

/// The checkpoint of `layer` as bytes (the file save_checkpoint writes). O(parameters); memory:
/// the result plus a copy of one expert. Throws std::bad_alloc only.
template <typename Scalar, typename ExpertT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT>& layer) {
  return detail::serialize(layer, detail::NoOptimizer{}, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and the state of `optimizer` (hyper-parameters, step count, one
/// velocity per parameter tensor when momentum > 0). Throws std::invalid_argument if the
/// optimizer's state does not fit the layer's tensors (it was stepped on other parameters).
template <typename Scalar, typename ExpertT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT>& layer, const Sgd<Scalar>& optimizer) {
  return detail::serialize(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// The checkpoint of `layer` and the state of `optimizer` (hyper-parameters, step count, first
/// and second moments). Throws std::invalid_argument if the optimizer's state does not fit the
/// layer's tensors.
template <typename Scalar, typename ExpertT>
std::string serialize_checkpoint(const MoELayer<Scalar, ExpertT>& layer, const Adam<Scalar>& optimizer) {
  return detail::serialize(layer, optimizer, "sparsemoe::serialize_checkpoint");
}

/// Loads the checkpoint in the `size` bytes at `data` into `layer`, which must have the file's
/// Scalar, expert kind, d, h, E and k; its parameters, noise ε and noise seed are replaced. An
/// optimizer section in the file is verified but ignored. A parameter that is NaN or infinite
/// is rejected (non_finite_value) unless options.allow_non_finite. Throws CheckpointError (see
/// CheckpointErrorKind) and then leaves `layer` unchanged; std::invalid_argument if `data` is
/// null while `size` > 0. O(size).
template <typename Scalar, typename ExpertT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT>& layer,
                            const CheckpointLoadOptions& options = {}) {
  detail::NoOptimizer none;
  detail::deserialize(data, size, layer, none, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Sgd section (CheckpointErrorKind::optimizer_mismatch if there is none). On any error neither
/// the layer nor the optimizer changes.
template <typename Scalar, typename ExpertT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT>& layer,
                            Sgd<Scalar>& optimizer, const CheckpointLoadOptions& options = {}) {
  detail::deserialize(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// Like deserialize_checkpoint(data, size, layer), and also restores `optimizer` from the file's
/// Adam section (CheckpointErrorKind::optimizer_mismatch if there is none). On any error neither
/// the layer nor the optimizer changes.
template <typename Scalar, typename ExpertT>
void deserialize_checkpoint(const void* data, std::size_t size, MoELayer<Scalar, ExpertT>& layer,
                            Adam<Scalar>& optimizer, const CheckpointLoadOptions& options = {}) {
  detail::deserialize(data, size, layer, optimizer, "sparsemoe::deserialize_checkpoint", options);
}

/// What the checkpoint in the `size` bytes at `data` holds, after the integrity and structure
/// checks (no target layer: no scalar, kind or shape comparison). Throws CheckpointError
/// (std::invalid_argument if `data` is null while `size` > 0). O(size).
inline CheckpointInfo inspect_checkpoint(const void* data, std::size_t size) {
  static const unsigned char empty = 0;
  detail::require(data != nullptr || size == 0, "sparsemoe::inspect_checkpoint", "data is a null pointer but size is ",
                  size);
  const auto* bytes = size == 0 ? &empty : static_cast<const unsigned char*>(data);
  return detail::parse_checkpoint(bytes, size, "sparsemoe::inspect_checkpoint").info;
}

// ---- Files --------------------------------------------------------------------------------------

/// Saves `layer` to `path` atomically (temporary file, write, fsync, rename, directory fsync):
/// `path` holds the old checkpoint or the new one, never a partial file. The file is created
/// with mode 0666 & ~umask (an existing file's mode is not kept; a symlink at `path` is
/// replaced, not followed). Throws CheckpointError(io) with the failed step and errno text; the
/// temporary file is then removed and `path` is untouched (unless only the final directory
/// fsync failed, which the message says). O(parameters) plus the I/O.
template <typename Scalar, typename ExpertT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT>& layer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, detail::NoOptimizer{}, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically (see above). Throws
/// std::invalid_argument, before writing anything, if the optimizer's state does not fit the layer.
template <typename Scalar, typename ExpertT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT>& layer, const Sgd<Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, optimizer, function), function);
}

/// Saves `layer` and the state of `optimizer` to `path` atomically (see above). Throws
/// std::invalid_argument, before writing anything, if the optimizer's state does not fit the layer.
template <typename Scalar, typename ExpertT>
void save_checkpoint(const std::string& path, const MoELayer<Scalar, ExpertT>& layer, const Adam<Scalar>& optimizer) {
  const char* function = "sparsemoe::save_checkpoint";
  detail::write_file_atomically(path, detail::serialize(layer, optimizer, function), function);
}

/// Loads the checkpoint at `path` into `layer` (see deserialize_checkpoint): reads the whole
/// file, validates everything, then copies in. Throws CheckpointError (io for a missing or
/// unreadable file) and then leaves `layer` unchanged. O(file size).
template <typename Scalar, typename ExpertT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT>& layer, const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::NoOptimizer none;
  detail::deserialize(bytes.data(), bytes.size(), layer, none, detail::file_context(function, path), options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Sgd section required). On any
/// error neither changes.
template <typename Scalar, typename ExpertT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT>& layer, Sgd<Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path), options);
}

/// Loads the checkpoint at `path` into `layer` and `optimizer` (Adam section required). On any
/// error neither changes.
template <typename Scalar, typename ExpertT>
void load_checkpoint(const std::string& path, MoELayer<Scalar, ExpertT>& layer, Adam<Scalar>& optimizer,
                     const CheckpointLoadOptions& options = {}) {
  const char* function = "sparsemoe::load_checkpoint";
  const std::string bytes = detail::read_file(path, function);
  detail::deserialize(bytes.data(), bytes.size(), layer, optimizer, detail::file_context(function, path), options);
}

/// What the checkpoint at `path` holds (see inspect_checkpoint). Throws CheckpointError.
inline CheckpointInfo read_checkpoint_info(const std::string& path) {
  const char* function = "sparsemoe::read_checkpoint_info";
  const std::string bytes = detail::read_file(path, function);
  return detail::parse_checkpoint(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
                                  detail::file_context(function, path))
      .info;
}

/// @}
}  // namespace sparsemoe

#endif  // SPARSEMOE_CHECKPOINT_HPP
