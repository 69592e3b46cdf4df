// The emulator's state of a running CTA and the fiber switching that its barriers and collectives
// are made of, shared by runtime.cpp (the scheduler, barriers, warp collectives, clusters and the
// CUDA runtime), sm90a.cpp (wgmma, mbarriers, TMA) and racecheck.cpp. Internal to tests/simt.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "racecheck.h"

namespace xj_simt {
namespace detail {

constexpr int kBarriers = 16;              // bar.sync ids 0..15
constexpr int kGroupThreads = 128;         // a warpgroup
constexpr uint32_t kDynamicBase = 0x480;   // the dynamic shared memory's .shared address (see prelude.h)

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<int> members;  // the arrivals that order memory (racecheck), in this generation
};

// A cp.async in flight: it lands when its issuer waits for its group (cp.async.wait_group).
struct CpAsync {
  void* dst;
  const void* src;
  bool valid;  // false: 16 zeros
};

struct Fiber {
  ucontext_t context;
  uint3 index;
  int linear = 0;
  bool done = false;
  uint64_t exchanges = 0;  // warp exchanges so far: which of the two buffers the next one uses
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
  std::vector<CpAsync> copies;     // issued, not yet landed
  std::vector<size_t> groups;      // the end in `copies` of each committed group
};

// A wgmma's operands as values: A (64 x 32) and B (N x 32).
struct WgmmaOperands {
  float a[64][32], b[128][32];
};

// An instruction the four warps of a warpgroup execute together (wgmma, setmaxnreg): what the
// first arrival passed, which the others must match, and its operands, decoded once. Two sets of
// operands, by the parity of `instances`: a warp may arrive at the next instruction, and decode
// its operands, while other threads still read this one's.
struct WarpgroupOp {
  const char* op = nullptr;
  uint64_t key = 0, instances = 0;
  int warp_arrivals[4] = {0, 0, 0, 0};
  uint32_t a_regs[kGroupThreads][4];  // each thread's A registers (wgmma with A from registers)
  WgmmaOperands operands[2];
};

struct Mbarrier {
  int expected = 0, pending = 0;  // arrivals per phase, and still to come in this one
  int64_t tx = 0;                 // transaction bytes expected and not yet complete
  uint32_t phase = 0;             // phases completed
  std::vector<uint32_t> arrivals, completed[2];  // racecheck: this phase's releases; the last
                                                 // completed phase of each parity
};

struct Cluster;

struct Cta {
  uint3 block_index;
  dim3 block_dim, grid_dim;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // the OS thread's stack (for AddressSanitizer)
  size_t scheduler_stack_bytes = 0;
  int current = -1, live = 0;
  std::vector<int> live_in_warp;
  Barrier barriers[kBarriers];
  std::vector<Barrier> warp_barriers, group_barriers;
  std::vector<uint8_t> buffers;  // per warp: two exchange buffers of 32 slots
  std::vector<WarpgroupOp> groups;
  std::map<uint32_t, Mbarrier> mbarriers;           // by .shared address
  std::vector<std::function<void()>> in_flight;     // TMA loads, done at the end of a round
  uint8_t* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  Cluster* cluster = nullptr;
  unsigned rank = 0;
  const std::function<void()>* body = nullptr;
  uint64_t progress = 0;  // arrivals, completions and exits: a round without any is a deadlock
  uint64_t clock = 0;     // %globaltimer, ns: 1 us a read
  uint64_t random = 0;    // the state of the scheduler's pseudo-random draws
  std::vector<int> stalled;  // per warp: rounds it still sits out
  std::string error;      // set by a trap or an exception in a thread
  // the racecheck build's (tests/simt/racecheck.h): the CTA's own, or its cluster's
  Racecheck* race = nullptr;
  std::unique_ptr<Racecheck> own_race;
  uint64_t cluster_syncs = 0;  // cluster barriers so far
};

Cta& cta();
Fiber& fiber();
Cta* running_cta();  // null outside a launch
// The calling thread's number in racecheck: unique in its cluster.
inline int race_id() {
  Cta& c = cta();
  return static_cast<int>(c.rank * c.fibers.size()) + fiber().linear;
}
extern thread_local char tl_anchor;  // in the library's thread_local storage, on every OS thread
// Back to the scheduler: the fiber runs again in the next round, or later in this one.
void yield();
// Ends the calling fiber's CTA with `what` as its error.
[[noreturn]] void fail(const std::string& what);
void complete(Barrier& b);
// A pseudo-random number in [0, n), from the CTA's sequence.
uint64_t draw(uint64_t n);
// The calling thread's warp sits out the next 1 to 8 rounds (as a slow warp would), from its next
// yield on, which this one is.
void stall_warp();

// Arrive at `b`, which `expected` threads complete; `last` runs in the arrival that completes it,
// before any waiter goes on. `orders_memory`: a barrier of the PTX memory model (bar.sync,
// bar.warp.sync), not a mere rendezvous (a shuffle, a wgmma): racecheck orders the accesses before
// it in any member thread before those after it in every other.
template <class Last>
void arrive_and_wait(Barrier& b, int expected, Last&& last, bool orders_memory = false) {
  Cta& c = cta();
  ++c.progress;
  if (orders_memory && c.race) b.members.push_back(race_id());
  const uint64_t gen = b.generation;
  if (++b.arrived >= expected) {
    last();
    complete(b);
    return;
  }
  while (b.generation == gen) yield();
}
inline void arrive_and_wait(Barrier& b, int expected, bool orders_memory = false) {
  arrive_and_wait(b, expected, [] {}, orders_memory);
}

// racecheck: the calling thread's access of `bytes` at `p`, by the kernel's instruction at `pc` or
// the emulated instruction `op`; fails the CTA with the hazard it makes (nothing without racecheck).
void race_access(const void* p, size_t bytes, Racecheck::Kind kind, const void* pc, const char* op = nullptr);

// Byte `byte` of `word` as e4m3.
float e4m3_value(uint32_t word, int byte);
// `bytes` bytes of dynamic shared memory at .shared address `address` (a failure outside it).
uint8_t* shared_bytes(uint32_t address, size_t bytes, const char* what);

}  // namespace detail
}  // namespace xj_simt
