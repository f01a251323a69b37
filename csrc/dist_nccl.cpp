// The NCCL backend, in its own file: it needs the CUDA and NCCL headers, which only GPU installs have.
#include <chrono>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

c10::intrusive_ptr<c10d::Backend> lisa_make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, std::chrono::milliseconds timeout, int device) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto o = c10d::ProcessGroupNCCL::Options::create();
  o->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
}
