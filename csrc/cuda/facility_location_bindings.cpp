// Bindings of the CUDA facility location: raw device pointers (Python ints) in, CUDA errors raised as text.
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

template <typename P>
P* fptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

cuda::FlGraph make_graph(const std::vector<uintptr_t>& p, int64_t n, int64_t m) {
  METAMOE_CHECK(p.size() == 7, "graph must hold 7 device pointers, got ", p.size());
  METAMOE_CHECK(n > 0 && m > 0, "n_candidates and n_ground must be >= 1");
  return cuda::FlGraph{fptr<const int64_t>(p[0]), fptr<const int64_t>(p[1]), fptr<const float>(p[2]),
                       fptr<const int64_t>(p[3]), fptr<const int64_t>(p[4]), fptr<const float>(p[5]),
                       fptr<const double>(p[6]), n, m};
}

cuda::FlWorkspace make_ws(const std::vector<uintptr_t>& p, int32_t num_blocks) {
  METAMOE_CHECK(p.size() == 9, "workspace must hold 9 device pointers, got ", p.size());
  return cuda::FlWorkspace{fptr<double>(p[0]),  fptr<double>(p[1]),  fptr<int32_t>(p[2]),
                           fptr<int32_t>(p[3]), fptr<int64_t>(p[4]), fptr<unsigned long long>(p[5]),
                           fptr<double>(p[6]),  fptr<int64_t>(p[7]), fptr<int64_t>(p[8]), num_blocks};
}

void check_cuda(int err, const char* what) {
  if (err != 0) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

}  // namespace

void register_facility_location_cuda(py::module_& m) {
  m.def("fl_num_blocks", &cuda::fl_num_blocks, py::arg("n"), "Blocks of the facility-location argmax pass.");
  m.def(
      "fl_init",
      [](std::vector<uintptr_t> graph, int64_t n, int64_t mg, std::vector<uintptr_t> ws, int32_t num_blocks,
         uintptr_t stream) {
        check_cuda(cuda::fl_init(make_graph(graph, n, mg), make_ws(ws, num_blocks), fptr<void>(stream)), "fl_init");
      },
      py::arg("graph"), py::arg("n_candidates"), py::arg("n_ground"), py::arg("workspace"), py::arg("num_blocks"),
      py::arg("stream"));
  m.def(
      "fl_picks",
      [](std::vector<uintptr_t> graph, int64_t n, int64_t mg, std::vector<uintptr_t> ws, int32_t num_blocks,
         int64_t t0, int64_t count, uintptr_t out_idx, uintptr_t out_gain, uintptr_t stream) {
        METAMOE_CHECK(t0 >= 0 && count >= 0 && t0 + count <= n, "picks ", t0, "..", t0 + count, " exceed N=", n);
        check_cuda(cuda::fl_picks(make_graph(graph, n, mg), make_ws(ws, num_blocks), t0, count,
                                  fptr<int64_t>(out_idx), fptr<double>(out_gain), fptr<void>(stream)),
                   "fl_picks");
      },
      py::arg("graph"), py::arg("n_candidates"), py::arg("n_ground"), py::arg("workspace"), py::arg("num_blocks"),
      py::arg("t0"), py::arg("count"), py::arg("out_idx"), py::arg("out_gain"), py::arg("stream"));
}

}  // namespace metamoe
