// The one pybind11 module of xjfast: every CUDA entry point, taking raw pointers, sizes, strides
// and a CUDA stream, so the extension never links against libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "device_info.h"

#ifndef XJFAST_BUILT_ARCHS
#error "XJFAST_BUILT_ARCHS (the comma-separated archs of CMAKE_CUDA_ARCHITECTURES) is set by CMakeLists.txt"
#endif

namespace py = pybind11;

static std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::stringstream list(XJFAST_BUILT_ARCHS);
  for (std::string arch; std::getline(list, arch, ',');) archs.push_back(arch);
  return archs;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "xjfast CUDA kernels and device queries";
  py::register_exception<xjfast::CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("device_count", &xjfast::device_count, "CUDA devices visible (0 without a GPU or driver)");
  m.def("compute_capability", &xjfast::compute_capability, py::arg("device"), "(major, minor) of a device");
  m.def("device_name", &xjfast::device_name, py::arg("device"), "the device's name, e.g. 'NVIDIA H100 80GB HBM3'");
  m.def("driver_version", &xjfast::driver_version, "CUDA driver version (e.g. 13000), 0 without a driver");
  m.def("runtime_version", &xjfast::runtime_version, "CUDA runtime version _C was built with");
  m.def("built_archs", &built_archs, "GPU architectures whose SASS _C embeds, e.g. ['90a', '100a']");
}
