// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The sparsemoe authors
//
// The program of the `mpi` component's consumer test, run under mpiexec with 2 ranks: one
// forward and backward of a DistributedMoELayer, so that a broken include path or MPI link of
// the installed sparsemoe::mpi fails here.
#include <sparsemoe/distributed.hpp>

#include <mpi.h>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 1;
  {
    using Router = sparsemoe::SoftmaxTopKRouter<float>;
    sparsemoe::MoEConfig config{16, 32, 4, 2};
    sparsemoe::SoftmaxTopKRouterOptions options;
    options.k = 2;
    Router router(16, 4, options);
    router.initialize_uniform(1);
    const sparsemoe::DistributedMoELayer<float, sparsemoe::Expert<float, sparsemoe::Relu>, Router> layer(
        config, router, MPI_COMM_WORLD);
    sparsemoe::ForwardOptions forward_options;
    forward_options.mode = sparsemoe::Mode::training;
    const sparsemoe::Matrix<float> x = sparsemoe::Matrix<float>::Random(8, 16);
    const auto result = layer.forward(x, forward_options);
    auto gradients = layer.make_gradients();
    const sparsemoe::Matrix<float> d_x = layer.backward(result, result.output, gradients);
    if (result.output.rows() == 8 && d_x.rows() == 8 && d_x.allFinite()) status = 0;
    std::printf("rank %d of %d: %ld local experts, output %ldx%ld\n", layer.rank(), layer.num_ranks(),
                static_cast<long>(layer.num_local_experts()), static_cast<long>(result.output.rows()),
                static_cast<long>(result.output.cols()));
  }
  MPI_Finalize();
  return status;
}
