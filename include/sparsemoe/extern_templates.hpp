// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
#ifndef SPARSEMOE_EXTERN_TEMPLATES_HPP
#define SPARSEMOE_EXTERN_TEMPLATES_HPP

/// \file extern_templates.hpp
/// Opt-in: compile the layer's templates once per program instead of once per translation unit.
///
/// sparsemoe is header-only, so every translation unit that runs a forward and a backward pass
/// instantiates and optimises the whole layer again (about 10 s of CPU at -O2 with g++ 12, most
/// of it for MoELayer, the gate, the optimizers and the GEMM wrapper). This header includes
/// sparsemoe.hpp and, when asked to, adds explicit instantiations of those templates for float
/// and double with the default expert (Expert<S, Relu>):
///
///  - With `SPARSEMOE_EXTERN_TEMPLATES` defined, they are explicit instantiation *declarations*
///    (`extern template`): the translation unit uses the instantiations without compiling them.
///  - With `SPARSEMOE_INSTANTIATE_TEMPLATES` defined, they are the explicit instantiation
///    *definitions*. Exactly one translation unit of the program does this (whether or not it
///    also sees SPARSEMOE_EXTERN_TEMPLATES).
///  - With neither, this header is sparsemoe.hpp and nothing more.
///
/// \code
/// // sparsemoe_instances.cpp: compiled once and linked into the program
/// #define SPARSEMOE_INSTANTIATE_TEMPLATES
/// #include <sparsemoe/extern_templates.hpp>
///
/// // every other source file, compiled with -DSPARSEMOE_EXTERN_TEMPLATES (in CMake:
/// // target_compile_definitions(app PRIVATE SPARSEMOE_EXTERN_TEMPLATES)):
/// #include <sparsemoe/extern_templates.hpp>   // first, before any use of the layer
/// \endcode
///
/// Other layer types: `SPARSEMOE_EXPLICIT_LAYER(Scalar, ExpertT)` at global scope, after this
/// header, declares or defines (by the same two macros) the instantiations of
/// MoELayer<Scalar, ExpertT>, MoEGradients<Scalar, ExpertT> and ExpertBank<Scalar, ExpertT>; put it in a header of yours that
/// every translation unit, the instantiating one included, reads:
///
/// \code
/// SPARSEMOE_EXPLICIT_LAYER(float, sparsemoe::SwiGluExpert<float>)
/// // a layer with another router: its bank (above), the router, then the layer
/// SPARSEMOE_EXPLICIT_ROUTER(sparsemoe::SigmoidTopKRouter<float>)
/// SPARSEMOE_EXPLICIT_ROUTED_LAYER(float, sparsemoe::SwiGluExpert<float>, sparsemoe::SigmoidTopKRouter<float>)
/// \endcode
///
/// All translation units, the instantiating one included, must agree on every macro that changes
/// the headers (SPARSEMOE_WITH_LIBXSMM, SPARSEMOE_NO_EXCEPTIONS, OpenMP on or off), as for any
/// inline code. checkpoint.hpp is not covered (its cost is mostly its non-template functions).

#include "sparsemoe.hpp"

#if defined(SPARSEMOE_INSTANTIATE_TEMPLATES)
/// `template` (definitions) or `extern template` (declarations), or empty when not opted in.
#define SPARSEMOE_DETAIL_EXPLICIT template
#define SPARSEMOE_DETAIL_EXPLICIT_ENABLED 1
#elif defined(SPARSEMOE_EXTERN_TEMPLATES)
#define SPARSEMOE_DETAIL_EXPLICIT extern template
#define SPARSEMOE_DETAIL_EXPLICIT_ENABLED 1
#else
#define SPARSEMOE_DETAIL_EXPLICIT_ENABLED 0
#endif

#if SPARSEMOE_DETAIL_EXPLICIT_ENABLED

/// Explicit instantiation declarations or definitions of MoELayer<Scalar, ExpertT>, its
/// gradients and its ExpertBank (the expert type may contain commas: it is the variadic part).
#define SPARSEMOE_EXPLICIT_LAYER(Scalar, ...)                                   \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::MoELayer<Scalar, __VA_ARGS__>;      \
  SPARSEMOE_DETAIL_EXPLICIT struct sparsemoe::MoEGradients<Scalar, __VA_ARGS__>; \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::ExpertBank<Scalar, __VA_ARGS__>;

/// Explicit instantiation declarations or definitions of MoELayer<Scalar, ExpertT, RouterT> and
/// its gradients, for a router other than the default (ExpertT's bank and the router class come
/// from SPARSEMOE_EXPLICIT_LAYER and SPARSEMOE_EXPLICIT_ROUTER, once each per program).
#define SPARSEMOE_EXPLICIT_ROUTED_LAYER(Scalar, ExpertT, RouterT)                   \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::MoELayer<Scalar, ExpertT, RouterT>;      \
  SPARSEMOE_DETAIL_EXPLICIT struct sparsemoe::MoEGradients<Scalar, ExpertT, RouterT>;

/// Explicit instantiation declaration or definition of a router class (e.g.
/// sparsemoe::SoftmaxTopKRouter<float>).
#define SPARSEMOE_EXPLICIT_ROUTER(...) SPARSEMOE_DETAIL_EXPLICIT class __VA_ARGS__;

/// The templates every layer of scalar type `Scalar` uses.
#define SPARSEMOE_DETAIL_EXPLICIT_SCALAR(Scalar)                                                        \
  SPARSEMOE_DETAIL_EXPLICIT void sparsemoe::detail::gemm<Scalar>(                                       \
      const sparsemoe::detail::ConstOperand<Scalar>&, const sparsemoe::detail::ConstOperand<Scalar>&,   \
      Scalar*, sparsemoe::Index, Scalar, bool);                                                         \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::detail::PackedWeight<Scalar>;                              \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::NoisyTopKGate<Scalar>;                                     \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Expert<Scalar, sparsemoe::Relu>;                           \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Sgd<Scalar>;                                               \
  SPARSEMOE_DETAIL_EXPLICIT class sparsemoe::Adam<Scalar>;

SPARSEMOE_DETAIL_EXPLICIT_SCALAR(float)
SPARSEMOE_DETAIL_EXPLICIT_SCALAR(double)
SPARSEMOE_EXPLICIT_LAYER(float, sparsemoe::Expert<float, sparsemoe::Relu>)
SPARSEMOE_EXPLICIT_LAYER(double, sparsemoe::Expert<double, sparsemoe::Relu>)

#else

/// Not opted in: nothing to declare.
#define SPARSEMOE_EXPLICIT_LAYER(Scalar, ...)
/// Not opted in: nothing to declare.
#define SPARSEMOE_EXPLICIT_ROUTED_LAYER(Scalar, ExpertT, RouterT)
/// Not opted in: nothing to declare.
#define SPARSEMOE_EXPLICIT_ROUTER(...)

#endif  // SPARSEMOE_DETAIL_EXPLICIT_ENABLED

#endif  // SPARSEMOE_EXTERN_TEMPLATES_HPP
