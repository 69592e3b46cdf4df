// The part of cooperative_groups that csrc/ uses (thread-block clusters), on tests/simt's runtime:
// found before CUDA's own header when csrc/ is compiled for the CPU.
#pragma once

#include <cstdint>

namespace cooperative_groups {

struct cluster_group {
  unsigned long long num_blocks() const { return xj_simt::cluster_blocks(); }
  unsigned block_rank() const { return xj_simt::cluster_rank(); }
  void sync() const { xj_simt::cluster_sync(); }
  template <class T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(xj_simt::map_shared_rank(p, rank));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
