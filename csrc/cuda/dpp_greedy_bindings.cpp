// Bindings of the CUDA DPP greedy: raw device pointers (Python ints) in, errors raised with CUDA's text.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "metamoe/common.h"
#include "metamoe/cuda_ops.h"

namespace py = pybind11;

namespace metamoe {
namespace {

using cuda::DppWorkspace;
using cuda::DType;

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

DppWorkspace make_ws(const std::vector<uintptr_t>& p, int32_t num_blocks) {
  METAMOE_CHECK(p.size() == 11, "workspace must hold 11 device pointers, got ", p.size());
  return DppWorkspace{ptr<double>(p[0]),  ptr<double>(p[1]), ptr<double>(p[2]),  ptr<double>(p[3]),
                      ptr<double>(p[4]),  ptr<double>(p[5]), ptr<int64_t>(p[6]), ptr<int64_t>(p[7]),
                      ptr<double>(p[8]),  ptr<int32_t>(p[9]), ptr<int32_t>(p[10]), num_blocks};
}

DType to_dtype(int code) {
  METAMOE_CHECK(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", code);
  return static_cast<DType>(code);
}

void check(int err, const char* what) {
  if (err != 0) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

}  // namespace

void register_dpp_greedy_cuda(py::module_& m) {
  m.def("dpp_num_blocks", &cuda::dpp_num_blocks, py::arg("n"), "Blocks of the DPP update pass for N rows.");
  m.def(
      "dpp_init",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, uintptr_t rel, double ridge, std::vector<uintptr_t> ws,
         int32_t num_blocks, uintptr_t stream) {
        check(cuda::dpp_init(ptr<const void>(x), to_dtype(dtype), n, d, ptr<const double>(rel), ridge,
                             make_ws(ws, num_blocks), ptr<void>(stream)),
              "dpp_init");
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("relevance"), py::arg("ridge"),
      py::arg("workspace"), py::arg("num_blocks"), py::arg("stream"));
  m.def("dpp_partial_chunks", &cuda::dpp_partial_chunks, py::arg("k_max"),
        "Rows of the workspace's partial sums (each D float64) for up to k_max picks.");
  m.def(
      "dpp_picks",
      [](uintptr_t x, int dtype, int64_t n, int64_t d, int64_t k_max, double eps, int64_t t0, int64_t count,
         std::vector<uintptr_t> ws, int32_t num_blocks, uintptr_t out_idx, uintptr_t out_resid, uintptr_t stream) {
        check(cuda::dpp_picks(ptr<const void>(x), to_dtype(dtype), n, d, k_max, eps, t0, count,
                              make_ws(ws, num_blocks), ptr<int64_t>(out_idx), ptr<double>(out_resid),
                              ptr<void>(stream)),
              "dpp_picks");
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("k_max"), py::arg("eps"), py::arg("t0"),
      py::arg("count"), py::arg("workspace"), py::arg("num_blocks"), py::arg("out_idx"), py::arg("out_resid"),
      py::arg("stream"));
}

}  // namespace metamoe
