// Device and driver queries through the CUDA runtime (linked statically into _C).
#include <algorithm>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "device_info.h"

#ifndef XJFAST_BUILT_ARCHS
#error "XJFAST_BUILT_ARCHS (the comma-separated archs of CMAKE_CUDA_ARCHITECTURES) is set by CMakeLists.txt"
#endif

namespace xjfast {

int device_count() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  // No GPU, or no driver at all: zero devices, not an error (this is how a CPU machine looks).
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    return 0;
  }
  check(status, "cudaGetDeviceCount");
  return count;
}

std::pair<int, int> compute_capability(int device) {
  int major = 0, minor = 0;
  XJ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  XJ_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return {major, minor};
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  XJ_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

int driver_version() {
  int version = 0;
  XJ_CUDA_CHECK(cudaDriverGetVersion(&version));
  return version;  // 0 when no driver is installed
}

int runtime_version() {
  int version = 0;
  XJ_CUDA_CHECK(cudaRuntimeGetVersion(&version));
  return version;
}

std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::stringstream list(XJFAST_BUILT_ARCHS);
  for (std::string arch; std::getline(list, arch, ',');) archs.push_back(arch);
  return archs;
}

bool built_for(const std::string& arch) {
  static const auto archs = built_archs();  // asked at every attention launch: parsed once
  return std::find(archs.begin(), archs.end(), arch) != archs.end();
}

}  // namespace xjfast
