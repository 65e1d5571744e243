// metamoe._C: the CPU module. Each op file defines a register_* function; this file binds them all.
#include <pybind11/pybind11.h>

#include <thread>

#ifdef METAMOE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace metamoe {
void register_dpp_greedy(py::module_& m);
void register_facility_location(py::module_& m);
}  // namespace metamoe

PYBIND11_MODULE(_C, m) {
  m.doc() = "metamoe CPU kernels (C++17, OpenMP)";
  m.attr("__version__") = METAMOE_VERSION;
#ifdef METAMOE_OPENMP
  m.attr("openmp") = true;
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel region uses.");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); }, py::arg("n"));
#else
  m.attr("openmp") = false;
  m.def("num_threads", []() { return 1; }, "Always 1: built without OpenMP.");
  m.def("set_num_threads", [](int) {}, py::arg("n"));
#endif
  metamoe::register_dpp_greedy(m);
  metamoe::register_facility_location(m);
}
