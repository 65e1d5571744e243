// metamoe._C_cuda: bindings of the CUDA kernels. Compiled by the host compiler (pybind11 stays out of
// nvcc); kernels live in *.cu files and are reached through the launchers declared in
// metamoe/cuda_ops.h. Tensors arrive as raw device pointers (torch.Tensor.data_ptr(), CuPy's
// __cuda_array_interface__), so the module never links libtorch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "metamoe/cuda_ops.h"

namespace py = pybind11;

namespace metamoe {
void register_dpp_greedy_cuda(py::module_& m);
void register_facility_location_cuda(py::module_& m);
}  // namespace metamoe

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "metamoe CUDA kernels";
  m.attr("__version__") = METAMOE_VERSION;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def(
      "device_count",
      []() -> py::tuple {
        int n = 0;
        cudaError_t err = cudaGetDeviceCount(&n);
        if (err != cudaSuccess) {
          std::string msg;
          if (err == cudaErrorInsufficientDriver) {
            msg = "no usable NVIDIA driver: it is missing or older than this module's CUDA runtime " +
                  std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
          } else if (err == cudaErrorNoDevice) {
            msg = "the NVIDIA driver reports no CUDA device";
          } else {
            msg = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
          }
          cudaGetLastError();
          return py::make_tuple(0, msg);
        }
        return py::make_tuple(n, std::string(n > 0 ? "ok" : "the NVIDIA driver reports no CUDA device"));
      },
      "(count, message): CUDA devices the runtime sees, and why none when there are none.");
  m.def(
      "set_device",
      [](int device) {
        cudaError_t err = cudaSetDevice(device);
        if (err != cudaSuccess) {
          cudaGetLastError();
          throw std::runtime_error("metamoe._C_cuda.set_device(" + std::to_string(device) +
                                   "): " + cudaGetErrorString(err));
        }
      },
      py::arg("device"),
      "Make ``device`` current for this module's CUDA runtime on the calling thread (its kernels launch "
      "there); the pointers passed to the kernels must live on it.");
  metamoe::register_dpp_greedy_cuda(m);
  metamoe::register_facility_location_cuda(m);
}
