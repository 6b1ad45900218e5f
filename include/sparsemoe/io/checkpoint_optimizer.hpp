// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_IO_CHECKPOINT_OPTIMIZER_HPP
#define SPARSEMOE_IO_CHECKPOINT_OPTIMIZER_HPP

/// \file checkpoint_optimizer.hpp
/// The optimizer section of a checkpoint: writing the "none", "sgd" and "adam" sections from an
/// optimizer, checking that the file holds the section a load asks for, and restoring Sgd / Adam
/// through their restore_state (strong guarantee). The section layout is in checkpoint.hpp.

#include "../config.hpp"
#include "../optimizers.hpp"
#include "../parameters.hpp"
#include "byte_codec.hpp"
#include "checkpoint_error.hpp"
#include "checkpoint_format.hpp"

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace sparsemoe {

/// \addtogroup files
/// @{

namespace detail {

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

}  // namespace detail

/// @}

}  // namespace sparsemoe

#endif  // SPARSEMOE_IO_CHECKPOINT_OPTIMIZER_HPP
