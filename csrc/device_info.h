// Device and driver queries (device_info.cu). Each throws xjfast::CudaError on a CUDA error,
// except device_count(), which reports 0 where there is no GPU or no driver.
#pragma once

#include <string>
#include <utility>

namespace xjfast {
int device_count();
std::pair<int, int> compute_capability(int device);
std::string device_name(int device);
int driver_version();
int runtime_version();
}  // namespace xjfast
