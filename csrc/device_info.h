// Device and driver queries (device_info.cu). Each throws xjfast::CudaError on a CUDA error,
// except device_count(), which reports 0 where there is no GPU or no driver.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace xjfast {
int device_count();
std::pair<int, int> compute_capability(int device);
std::string device_name(int device);
int driver_version();
int runtime_version();
// The archs whose SASS _C embeds (["90a", "100a"]): CMakeLists.txt's XJFAST_BUILT_ARCHS.
std::vector<std::string> built_archs();
bool built_for(const std::string& arch);
}  // namespace xjfast
