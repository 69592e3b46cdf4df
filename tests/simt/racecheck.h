// The emulator's racecheck (compute-sanitizer's, without a GPU): a happens-before race detector
// over the shared memory of a CTA (or of the CTAs of a cluster), dynamic and static, and (unlike
// compute-sanitizer's) over the global memory their threads read and write. Each CUDA thread keeps
// a vector clock; bar.sync (__syncthreads, named barriers), cluster barriers, __syncwarp, mbarrier
// arrive -> wait, a TMA load's completion and cp.async's wait_group are the only edges between
// threads. Two accesses of a byte by different threads, one a write, with no chain of those edges
// between them, are a hazard (the FastTrack algorithm: a byte keeps its last write and its last few
// unordered reads), as is an access of a cluster peer's shared memory that its exit is not ordered
// after, or an mbarrier operation that the barrier's initialization is not ordered before. Warp
// shuffles and votes, wgmma's rendezvous and setmaxnreg order no memory here, as the PTX memory
// model says of them. A wgmma's operand read is the async proxy's: a thread's write it reads must
// also be followed, in that thread, by a fence.proxy.async that the read is ordered after (TMA's
// writes are the async proxy's own). Internal to tests/simt.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xj_simt {
namespace detail {

class Racecheck {
 public:
  // TMA loads in flight are threads of their own, in this many slots (reused round-robin).
  static constexpr int kAsyncSlots = 32;
  // An asynchronous copy: the clock it was issued at (its issuer's, and its own slot's).
  struct Async {
    std::vector<uint32_t> clock;
    int slot = 0, issuer = 0;
  };
  // kAtomic: an mbarrier operation, which must follow the barrier's initialization (a write) but
  // races no other atomic operation.
  enum Kind { kRead, kWrite, kAsyncRead, kAtomic };

  // The CTAs of a launch without clusters have one each; those of a cluster share one, as they
  // share their shared memory. A thread is numbered rank * cta_threads + its index in its CTA.
  // Its methods may be called from the cluster's OS threads at once.
  Racecheck(int cta_threads, int ctas);
  // CTA `rank`'s shared memory: `dynamic`, and the block of thread_local storage of the OS thread
  // that runs it (csrc/'s static __shared__ arrays); its threads' stacks after `stacks` (kStackBytes each).
  void add_cta(int rank, const uint8_t* dynamic, size_t dynamic_bytes, const std::vector<void*>& stacks,
               size_t stack_bytes);

  // Thread `thread`'s access of `bytes` at `p` (`pc`: the instruction, for the report; `op`: the
  // emulated instruction instead): the first hazard it makes, or "". The thread's own stack (its
  // registers and local memory) is not checked.
  std::string access(int thread, const void* p, size_t bytes, Kind kind, const void* pc, const char* op);
  // fence.proxy.async by `thread`.
  void fence_proxy_async(int thread);
  // The threads `members` pass a barrier together: each sees what any did before it.
  void join(const std::vector<int>& members);
  // A cluster barrier, of which each CTA's `members` first arrive (all CTAs' before any departs),
  // then depart, each time with its count `generation` of cluster barriers.
  void cluster_arrive(uint64_t generation, const std::vector<int>& members);
  void cluster_depart(uint64_t generation, const std::vector<int>& members);
  // CTA `rank` of a cluster, whose threads are `members`, exits: any access of its shared memory by
  // another CTA's thread that its exit is not ordered after, and any later one, is a hazard.
  std::string exit_cta(int rank, const std::vector<int>& members);
  // An mbarrier arrival (release into `arrivals`) and a wait it lets through (acquire from `phase`).
  void release(int thread, std::vector<uint32_t>& arrivals);
  void acquire(int thread, const std::vector<uint32_t>& phase);
  // A TMA load `thread` issues; its writes (as `access` does); its completion on an mbarrier.
  Async issue(int thread);
  std::string async_write(const Async& copy, const void* p, size_t bytes);
  static void complete(const Async& copy, std::vector<uint32_t>& arrivals);
  // A vector clock of zeros (an mbarrier's phase before any arrival).
  std::vector<uint32_t> empty_clock() const { return std::vector<uint32_t>(width_, 0); }

 private:
  static constexpr int kReads = 4;  // unordered reads a byte remembers (more: some are forgotten)
  struct Cell {
    uint32_t write = 0, reads[kReads] = {0, 0, 0, 0};
  };
  // One CTA's shared memory and its shadow: the dynamic bytes, then the static's (calloc: pages
  // no access touches cost nothing).
  struct Shared {
    const uint8_t *dynamic = nullptr, *statics = nullptr;
    size_t dynamic_bytes = 0, static_bytes = 0;
    std::unique_ptr<Cell, decltype(&std::free)> cells{nullptr, &std::free};
    bool exited = false;
    bool holds(const uint8_t* b) const {
      return (b >= dynamic && b < dynamic + dynamic_bytes) || (b >= statics && b < statics + static_bytes);
    }
  };
  Cell* cell(const void* p, int id, std::string& hazard);
  std::string check(const uint32_t* clock, int id, const void* p, size_t bytes, Kind kind, const void* pc,
                    const char* op);
  std::string where(const uint8_t* b) const;
  std::string who(int id) const;
  std::string describe(const char* hazard, const uint8_t* b, int id, bool write, uint32_t earlier,
                       bool earlier_write, const void* pc, const char* op) const;
  // Whether thread `writer`'s write at `clock` is followed by one of its fences that `reader` sees.
  bool fenced(int writer, uint32_t clock, const uint32_t* reader) const;
  uint32_t* row(int thread) { return clocks_.data() + static_cast<size_t>(thread) * width_; }
  void tick(int thread);

  struct Guard;
  std::mutex mutex_;
  int cta_threads_, threads_, width_;  // width: threads and async slots
  std::vector<uint32_t> clocks_;       // threads x width
  std::vector<int> issuers_;           // per async slot: the thread that issued its last copy
  std::vector<uint32_t> async_ticks_;
  int next_slot_ = 0;
  std::vector<Shared> shared_;         // per CTA
  std::unordered_map<const void*, Cell> global_;  // by byte
  std::vector<std::pair<const uint8_t*, const uint8_t*>> stacks_;  // per thread
  std::vector<std::vector<uint32_t>> fences_;  // per thread: its clock at each fence.proxy.async
  std::map<uint64_t, std::pair<std::vector<uint32_t>, int>> cluster_syncs_;  // by generation: clock, CTAs in it
};

// This OS thread's block of the emulator library's thread_local storage (where csrc/'s static
// __shared__ arrays live).
std::pair<const uint8_t*, size_t> static_shared();

}  // namespace detail
}  // namespace xj_simt
