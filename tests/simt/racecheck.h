// The emulator's racecheck (compute-sanitizer's, without a GPU): a happens-before race detector
// over one CTA's shared memory, dynamic and static, and (unlike compute-sanitizer's) over the
// global memory its threads read and write. Each CUDA thread keeps a vector clock; bar.sync
// (__syncthreads, named barriers, cluster syncs), __syncwarp, mbarrier arrive -> wait, a TMA load's
// completion and cp.async's wait_group are the only edges between threads. Two accesses of a byte
// by different threads, one a write, with no chain of those edges between them, are a hazard (the
// FastTrack algorithm: a byte keeps its last write and its last few unordered reads). Warp
// shuffles and votes, wgmma's rendezvous and setmaxnreg order no memory here, as the PTX memory
// model says of them. A wgmma's operand read is the async proxy's: a thread's write it reads must
// also be followed, in that thread, by a fence.proxy.async that the read is ordered after (TMA's
// writes are the async proxy's own). Internal to tests/simt.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
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

  // `threads` CUDA threads; shared memory is `dynamic` and the OS thread's block of thread_local
  // storage that holds csrc/'s static __shared__ arrays.
  Racecheck(int threads, const uint8_t* dynamic, size_t dynamic_bytes);

  enum Kind { kRead, kWrite, kAsyncRead };
  // Thread `thread`'s access of `bytes` at `p` (`pc`: the instruction, for the report; `op`: the
  // emulated instruction instead): the first hazard it makes, or "". The thread's own stack (its
  // registers and local memory) is not checked.
  std::string access(int thread, const void* p, size_t bytes, Kind kind, const void* pc, const char* op);
  // fence.proxy.async by `thread`.
  void fence_proxy_async(int thread);
  // The threads `members` pass a barrier together: each sees what any did before it.
  void join(const std::vector<int>& members);
  // An mbarrier arrival (release into `arrivals`) and a wait it lets through (acquire from `phase`).
  void release(int thread, std::vector<uint32_t>& arrivals);
  void acquire(int thread, const std::vector<uint32_t>& phase);
  // A TMA load `thread` issues; its writes (as `access` does); its completion on an mbarrier.
  Async issue(int thread);
  std::string async_write(const Async& copy, const void* p, size_t bytes);
  static void complete(const Async& copy, std::vector<uint32_t>& arrivals);
  // A vector clock of zeros (an mbarrier's phase before any arrival).
  std::vector<uint32_t> empty_clock() const { return std::vector<uint32_t>(width_, 0); }
  // Thread `thread`'s stack: [begin, begin + bytes).
  void set_stack(int thread, const void* begin, size_t bytes);

 private:
  static constexpr int kReads = 4;  // unordered reads a byte remembers (more: some are forgotten)
  struct Cell {
    uint32_t write = 0, reads[kReads] = {0, 0, 0, 0};
  };
  Cell* cell(const void* p, int id);
  std::string check(const uint32_t* clock, int id, const void* p, size_t bytes, Kind kind, const void* pc,
                    const char* op);
  std::string describe(const char* hazard, const void* p, int id, bool write, uint32_t earlier, bool earlier_write,
                       const void* pc, const char* op) const;
  // Whether thread `writer`'s write at `clock` is followed by one of its fences that `reader` sees.
  bool fenced(int writer, uint32_t clock, const uint32_t* reader) const;
  uint32_t* row(int thread) { return clocks_.data() + static_cast<size_t>(thread) * width_; }
  void tick(int thread);

  int threads_, width_;             // width: threads and async slots
  std::vector<uint32_t> clocks_;    // threads x width
  std::vector<int> issuers_;        // per async slot: the thread that issued its last copy
  std::vector<uint32_t> async_ticks_;
  int next_slot_ = 0;
  const uint8_t *dynamic_, *static_;
  size_t dynamic_bytes_, static_bytes_;
  // the dynamic shared memory's bytes, then the static's (calloc: pages no access touches cost nothing)
  std::unique_ptr<Cell, decltype(&std::free)> cells_{nullptr, &std::free};
  std::unordered_map<const void*, Cell> global_;  // by byte
  std::vector<std::pair<const uint8_t*, const uint8_t*>> stacks_;
  std::vector<std::vector<uint32_t>> fences_;  // per thread: its clock at each fence.proxy.async
};

// This OS thread's block of the emulator library's thread_local storage (where csrc/'s static
// __shared__ arrays live).
std::pair<const uint8_t*, size_t> static_shared();

}  // namespace detail
}  // namespace xj_simt
