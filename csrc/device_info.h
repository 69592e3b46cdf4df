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
