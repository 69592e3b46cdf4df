// The CPU runtime behind prelude.h: CTAs as fibers (ucontext), barriers and warp collectives that
// switch between them, clusters on OS threads, and the CUDA runtime calls of csrc/'s host code
// answered as one emulated sm_90 device (its sm_90a instructions and the driver's tensor maps:
// sm90a.cpp). Kernels run synchronously at launch, as with CUDA_LAUNCH_BLOCKING=1. A trap, a
// barrier no thread can pass (a deadlock, e.g. __syncthreads in divergent code) or a collective
// some lanes of a warp skip raise from the launch; in the racecheck build, so does a hazard
// (racecheck.h), which the barriers, copies and exits here report to it.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <cuda_fp8.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include "cta.h"

namespace xj_simt {
namespace detail {

constexpr size_t kStackBytes = 512 << 10;
constexpr size_t kMaxDynamicShared = 227 << 10;  // sm_90's opt-in limit per block

// A barrier over all the CTAs of a cluster, which a trap in any of them breaks for the others.
struct ClusterBarrier {
  std::mutex mutex;
  std::condition_variable cv;
  int expected, arrived = 0;
  uint64_t generation = 0;
  bool broken = false;
  explicit ClusterBarrier(int n) : expected(n) {}
  bool arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex);
    const uint64_t gen = generation;
    if (++arrived == expected) {
      arrived = 0, ++generation;
      cv.notify_all();
      return !broken;
    }
    cv.wait(lock, [&] { return generation != gen || broken; });
    return !broken;
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mutex);
    broken = true;
    cv.notify_all();
  }
  // A CTA that exits no longer arrives (as the hardware counts its exited threads as arrived).
  void leave() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--expected == arrived && arrived > 0) arrived = 0, ++generation;
    cv.notify_all();
  }
};

struct Cluster {
  explicit Cluster(int n) : barrier(n), dynamic(n), anchor(n), exited(n) {}
  std::unique_ptr<Racecheck> race;  // the racecheck build's, over every CTA's shared memory
  ClusterBarrier barrier;
  std::vector<uint8_t*> dynamic;       // each rank's dynamic shared memory
  std::vector<const char*> anchor;     // each rank's tls_anchor: its thread_local (static) shared memory
  std::vector<std::atomic<bool>> exited;  // reading an exited CTA's shared memory is an error
};

// AddressSanitizer (tests/simt_memcheck.py) is told of every switch between stacks: before it, the
// stack switched to (`save` null when the current one is left for good); after it, in the new one.
#if defined(__SANITIZE_ADDRESS__)
void leave_stack(void** save, const void* bottom, size_t bytes) { __sanitizer_start_switch_fiber(save, bottom, bytes); }
void enter_stack(void* save, const void** bottom, size_t* bytes) { __sanitizer_finish_switch_fiber(save, bottom, bytes); }
#else
void leave_stack(void**, const void*, size_t) {}
void enter_stack(void*, const void**, size_t*) {}
#endif

thread_local Cta* tl_cta = nullptr;
thread_local char tl_anchor;  // the same offset from every thread_local, on every OS thread

// Fiber stacks, reused by the CTAs an OS thread runs (guard page at the bottom).
struct Stacks {
  std::vector<void*> free;
  ~Stacks() {
    for (void* s : free) munmap(s, kStackBytes);
  }
  void* take() {
    if (!free.empty()) {
      void* s = free.back();
      free.pop_back();
#if defined(__SANITIZE_ADDRESS__)  // it may hold the poisoned frames of a fiber a failure abandoned
      ASAN_UNPOISON_MEMORY_REGION(static_cast<char*>(s) + 4096, kStackBytes - 4096);
#endif
      return s;
    }
    void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) throw std::runtime_error("simt: no memory for a fiber stack");
    mprotect(s, 4096, PROT_NONE);
    return s;
  }
};
thread_local Stacks tl_stacks;

Cta& cta() { return *tl_cta; }
Cta* running_cta() { return tl_cta; }
Fiber& fiber() { return cta().fibers[cta().current]; }

void yield() {
  Cta& c = cta();
  Fiber& f = fiber();
  leave_stack(&f.fake_stack, c.scheduler_stack, c.scheduler_stack_bytes);
  swapcontext(&f.context, &c.scheduler);
  enter_stack(f.fake_stack, nullptr, nullptr);
}

[[noreturn]] void fail(const std::string& what) {
  Cta& c = cta();
  if (c.error.empty()) c.error = what;
  leave_stack(nullptr, c.scheduler_stack, c.scheduler_stack_bytes);
  setcontext(&c.scheduler);  // this fiber is abandoned
  std::abort();
}

void complete(Barrier& b) {
  Cta& c = cta();
  if (c.race) c.race->join(b.members);
  b.members.clear();
  b.arrived = 0, ++b.generation, ++c.progress;
}

// The calling thread's cp.async groups but the newest `pending` land (cp.async.wait_group).
void land_copies(size_t pending) {
  Fiber& f = fiber();
  if (f.groups.size() <= pending) return;
  const size_t end = f.groups[f.groups.size() - 1 - pending];
  for (size_t i = 0; i < end; ++i) {
    const CpAsync& copy = f.copies[i];
    race_access(copy.dst, 16, Racecheck::kWrite, nullptr, "cp.async, as its group is waited for");
    if (copy.valid) std::memcpy(copy.dst, copy.src, 16);
    else std::memset(copy.dst, 0, 16);
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(end));
  f.groups.erase(f.groups.begin(), f.groups.end() - static_cast<std::ptrdiff_t>(pending));
  for (size_t& g : f.groups) g -= end;
}

uint64_t draw(uint64_t n) {
  uint64_t& state = cta().random;
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return (state >> 33) % n;
}

void stall_warp() {
  Cta& c = cta();
  int& rounds = c.stalled[fiber().linear / 32];
  rounds = std::max(rounds, 1 + static_cast<int>(draw(8)));
  ++c.progress;  // (the round is not a deadlock: this warp goes on after the stall)
  yield();
}

void fiber_main() {
  Cta& c = cta();
  Fiber& f = fiber();
  enter_stack(nullptr, &c.scheduler_stack, &c.scheduler_stack_bytes);
  try {
    (*c.body)();
    if (!f.copies.empty()) {  // a thread's copies in flight land all the same as it exits
      f.groups.push_back(f.copies.size());
      land_copies(0);
    }
  } catch (const std::exception& e) {
    if (c.error.empty()) c.error = std::string("exception in thread: ") + e.what();
  }
  f.done = true;
  --c.live, --c.live_in_warp[f.linear / 32], ++c.progress;
  // Exited threads count as arrived at __syncthreads and at their warp's collectives.
  Barrier& block = c.barriers[0];
  if (block.arrived > 0 && block.arrived >= c.live) complete(block);
  Barrier& warp = c.warp_barriers[f.linear / 32];
  if (warp.arrived > 0 && warp.arrived >= c.live_in_warp[f.linear / 32]) complete(warp);
  leave_stack(nullptr, c.scheduler_stack, c.scheduler_stack_bytes);  // back through uc_link
}

void run_cta(const std::function<void()>& body, uint3 block_index, dim3 block_dim, dim3 grid_dim, size_t dynamic_bytes,
             Cluster* cluster, unsigned rank) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z), warps = (threads + 31) / 32;
  Cta c;
  c.block_index = block_index, c.block_dim = block_dim, c.grid_dim = grid_dim;
  c.fibers.resize(threads);
  c.live = threads;
  c.live_in_warp.assign(warps, 32);
  if (threads % 32) c.live_in_warp.back() = threads % 32;
  c.warp_barriers.resize(warps);
  c.group_barriers.resize((warps + 3) / 4);
  c.groups.resize((warps + 3) / 4);
  c.buffers.assign(static_cast<size_t>(warps) * 2 * 32 * kLaneSlot, 0);
  // exactly the bytes asked for (under AddressSanitizer, an access past them is reported)
  void* block = nullptr;
  if (posix_memalign(&block, 1024, std::max<size_t>(dynamic_bytes, 1)) != 0)
    throw std::runtime_error("simt: no memory for the dynamic shared memory");
  std::unique_ptr<uint8_t, decltype(&std::free)> dynamic(static_cast<uint8_t*>(block), &std::free);
  std::memset(dynamic.get(), 0xFF, dynamic_bytes);  // NaN as floats and as e4m3
  c.dynamic = dynamic.get(), c.dynamic_bytes = dynamic_bytes;
  c.cluster = cluster, c.rank = rank;
  c.body = &body;
#ifdef XJ_SIMT_RACECHECK
  if (!cluster) c.own_race = std::make_unique<Racecheck>(threads, 1);
  c.race = cluster ? cluster->race.get() : c.own_race.get();
#endif
  if (cluster) cluster->dynamic[rank] = c.dynamic, cluster->anchor[rank] = &tl_anchor;

  std::vector<void*> stacks;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = c.fibers[i];
    f.linear = i;
    f.index = {static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>(i / block_dim.x % block_dim.y),
               static_cast<unsigned>(i / (block_dim.x * block_dim.y))};
    stacks.push_back(tl_stacks.take());
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks.back();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &c.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  if (c.race) c.race->add_cta(static_cast<int>(rank), c.dynamic, c.dynamic_bytes, stacks, kStackBytes);
  Cta* outer = tl_cta;
  tl_cta = &c;
  if (cluster) cluster->barrier.arrive_and_wait();  // every rank has registered its memory
  // The warps run one at a time, each as far as it can (through its own collectives, up to a barrier
  // of the CTA), in a new pseudo-random order every time (a fixed sequence per CTA), its lanes too:
  // so a read that races another warp's write, with no barrier of the CTA between them, often comes
  // first and sees the value the write replaces (poison, or the last tile's). A warp also stalls for
  // 1 to 8 rounds, as a slow warp would, one round in eight and, one time in two, right after an
  // mbarrier wait lets it through (stall_warp): so a warp that skips a wait for a signal gets ahead
  // of the warps that give it.
  c.random = 0x9E3779B97F4A7C15ull ^ (block_index.x * 0x100000001B3ull + block_index.y * 0x1000193ull + rank);
  c.stalled.assign(warps, 0);
  const auto shuffle = [&](std::vector<int>& order) {
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[draw(i + 1)]);
  };
  std::vector<int> warp_order(warps);
  std::vector<std::vector<int>> lane_order(warps);
  for (int w = 0; w < warps; ++w) {
    warp_order[w] = w;
    for (int i = 32 * w; i < std::min(threads, 32 * (w + 1)); ++i) lane_order[w].push_back(i);
  }
  while (c.live > 0 && c.error.empty()) {
    const uint64_t before = c.progress;
    bool everyone = true;  // ran every warp: only such a round without progress is a deadlock
    shuffle(warp_order);
    for (int w : warp_order) {
      if (warps > 1 && c.stalled[w] == 0 && draw(8) == 0) c.stalled[w] = 1 + static_cast<int>(draw(8));
      if (c.stalled[w] > 0) {
        --c.stalled[w], everyone = false;
        continue;
      }
      for (uint64_t start = ~c.progress; start != c.progress && c.error.empty() && c.stalled[w] == 0;) {
        start = c.progress;
        shuffle(lane_order[w]);
        for (int i : lane_order[w]) {
          if (c.fibers[i].done || !c.error.empty() || c.stalled[w] > 0) continue;
          c.current = i;
          void* fake_stack = nullptr;
          leave_stack(&fake_stack, c.fibers[i].context.uc_stack.ss_sp, kStackBytes);
          swapcontext(&c.scheduler, &c.fibers[i].context);
          enter_stack(fake_stack, nullptr, nullptr);
        }
      }
    }
    // the asynchronous copies issued this round land now, after every warp has run past them
    std::vector<std::function<void()>> landing;
    landing.swap(c.in_flight);
    for (const auto& copy : landing) copy();
    if (!landing.empty()) ++c.progress;
    if (c.progress == before && everyone && c.error.empty())
      c.error = "deadlock: every live thread waits at a barrier, warp collective or mbarrier that cannot complete";
  }
  if (c.error.empty() && !c.in_flight.empty()) c.error = "the CTA exited with TMA loads in flight";
  if (c.race && cluster) {  // (a CTA alone shares its memory with no one)
    std::vector<int> members(threads);
    for (int i = 0; i < threads; ++i) members[i] = static_cast<int>(rank) * threads + i;
    const std::string late = c.race->exit_cta(static_cast<int>(rank), members);
    if (c.error.empty()) c.error = late;
  }
  tl_cta = outer;
  for (void* s : stacks) tl_stacks.free.push_back(s);
  if (cluster) cluster->exited[rank] = true, cluster->barrier.leave();
  if (!c.error.empty()) {
    if (cluster) cluster->barrier.abort();
    throw std::runtime_error("simt: CTA (" + std::to_string(block_index.x) + ", " + std::to_string(block_index.y) + ", " +
                    std::to_string(block_index.z) + "): " + c.error);
  }
}

// Byte `byte` of `word` as e4m3 (decoded once into a table: mma_e4m3 reads 2048 a call).
float e4m3_value(uint32_t word, int byte) {
  static const auto table = [] {
    std::array<float, 256> t;
    for (int x = 0; x < 256; ++x)
      t[x] = __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x), __NV_E4M3)));
    return t;
  }();
  return table[(word >> (8 * byte)) & 0xFF];
}

uint8_t* shared_bytes(uint32_t address, size_t bytes, const char* what) {
  Cta& c = cta();
  if (address < kDynamicBase || address - kDynamicBase + bytes > c.dynamic_bytes)
    fail(std::string(what) + ": shared address " + std::to_string(address) + " (+" + std::to_string(bytes) +
         " bytes) outside the dynamic shared memory [" + std::to_string(kDynamicBase) + ", " +
         std::to_string(kDynamicBase + c.dynamic_bytes) + ")");
  return c.dynamic + (address - kDynamicBase);
}

}  // namespace detail

using namespace detail;

uint3 thread_index() { return fiber().index; }
uint3 block_index() { return cta().block_index; }
dim3 block_dim() { return cta().block_dim; }
dim3 grid_dim() { return cta().grid_dim; }
int lane_id() { return fiber().linear % 32; }

void syncthreads() { arrive_and_wait(cta().barriers[0], cta().live, true); }

void named_barrier(int id, int threads) {
  if (id < 0 || id >= kBarriers || threads % 32 != 0) fail("bar.sync: id 0..15 and a multiple of 32 threads");
  arrive_and_wait(cta().barriers[id], threads, true);
}

namespace {
void warp_barrier(bool orders_memory) {
  Cta& c = cta();
  const int warp = fiber().linear / 32;
  arrive_and_wait(c.warp_barriers[warp], c.live_in_warp[warp], orders_memory);
}
}  // namespace

void syncwarp() { warp_barrier(true); }
void converge_warp() { warp_barrier(false); }

void trap() { fail("__trap()"); }

const void* warp_exchange(const void* mine, size_t bytes) {
  Cta& c = cta();
  Fiber& f = fiber();
  const int warp = f.linear / 32, lane = f.linear % 32;
  uint8_t* buffer = c.buffers.data() + (static_cast<size_t>(warp) * 2 + (f.exchanges & 1)) * 32 * kLaneSlot;
  std::memcpy(buffer + lane * kLaneSlot, mine, bytes);
  ++f.exchanges;
  if (c.live_in_warp[warp] != 32) fail("a warp collective with exited lanes");
  converge_warp();
  return buffer;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto rows = exchange(static_cast<const uint8_t*>(row));
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    const uint8_t* at = rows[8 * i + lane / 4] + 4 * (lane % 4);
    race_access(at, 4, Racecheck::kRead, nullptr, "ldmatrix");
    std::memcpy(&r[i], at, 4);
  }
}

void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  const auto exchanged = exchange(Operands{{a[0], a[1], a[2], a[3]}, {b0, b1}});
  Operands lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = exchanged[l];
  const int g = lane_id() / 4, t = lane_id() % 4;
  // PTX ISA, m16n8k32 .e4m3: A[r][k] in lane (r % 8) * 4 + (k % 16) / 4, register r / 8 + 2 (k / 16),
  // byte k % 4; B[k][n] in lane n * 4 + (k % 16) / 4, register k / 16, byte k % 4.
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e / 2), n = 2 * t + e % 2;
    float acc = d[e];
    for (int k = 0; k < 32; ++k) {
      const Operands& oa = lanes[(r % 8) * 4 + (k % 16) / 4];
      const Operands& ob = lanes[n * 4 + (k % 16) / 4];
      acc += e4m3_value(oa.a[r / 8 + 2 * (k / 16)], k % 4) * e4m3_value(ob.b[k / 16], k % 4);
    }
    d[e] = acc;
  }
}

void cp_async_16(void* dst, const void* src, bool valid) {
  race_access(dst, 16, Racecheck::kWrite, nullptr, "cp.async, as it is issued");  // it may land from here on
  fiber().copies.push_back({dst, src, valid});
}
void cp_async_commit() {
  Fiber& f = fiber();
  if (f.groups.empty() || f.groups.back() != f.copies.size()) f.groups.push_back(f.copies.size());
}
void cp_async_wait(int pending) { land_copies(static_cast<size_t>(pending)); }

uint8_t* dynamic_shared() { return cta().dynamic; }

uint32_t shared_address(const void* p) {
  Cta& c = cta();
  const auto* q = static_cast<const uint8_t*>(p);
  if (q < c.dynamic || q > c.dynamic + c.dynamic_bytes)
    fail("the .shared address of memory other than the CTA's dynamic shared memory (not emulated)");
  return kDynamicBase + static_cast<uint32_t>(q - c.dynamic);
}

unsigned cluster_rank() { return cta().cluster ? cta().rank : 0; }
unsigned cluster_blocks() {
  Cta& c = cta();
  return c.cluster ? static_cast<unsigned>(c.cluster->dynamic.size()) : 1;
}

void cluster_sync() {
  Cta& c = cta();
  bool ok = true;
  Barrier& block = c.barriers[0];
  arrive_and_wait(block, c.live, [&] {  // (in the CTA's last arrival)
    if (!c.cluster) return;
    const uint64_t generation = c.cluster_syncs++;
    if (c.race) c.race->cluster_arrive(generation, block.members);
    ok = c.cluster->barrier.arrive_and_wait();
    if (c.race && ok) c.race->cluster_depart(generation, block.members);
  }, true);
  if (!ok) fail("another CTA of the cluster failed");
}

void* map_shared_rank(const void* p, unsigned rank) {
  Cta& c = cta();
  if (!c.cluster || rank >= c.cluster->dynamic.size()) fail("map_shared_rank: no such rank in the cluster");
  if (c.cluster->exited[rank]) fail("map_shared_rank: CTA " + std::to_string(rank) + " of the cluster has exited");
  const auto* q = static_cast<const uint8_t*>(p);
  if (q >= c.dynamic && q < c.dynamic + c.dynamic_bytes)
    return c.cluster->dynamic[rank] + (q - c.dynamic);
  return const_cast<char*>(c.cluster->anchor[rank] + (reinterpret_cast<const char*>(q) - &tl_anchor));
}

void launch(dim3 grid, dim3 block, size_t dynamic_smem, int cluster, const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("simt: invalid launch configuration");
  if (dynamic_smem > kMaxDynamicShared) throw std::invalid_argument("simt: too much dynamic shared memory");
  if (cluster < 0 || cluster > 8 || (cluster > 0 && grid.x % cluster != 0))
    throw std::invalid_argument("simt: a cluster of 1 to 8 CTAs that divides the grid's x");
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x0 = 0; x0 < grid.x; x0 += std::max(cluster, 1)) {
        if (cluster == 0) {
          run_cta(body, {x0, y, z}, block, grid, dynamic_smem, nullptr, 0);
          continue;
        }
        Cluster group(cluster);
#ifdef XJ_SIMT_RACECHECK
        group.race = std::make_unique<Racecheck>(static_cast<int>(threads), cluster);
#endif
        std::vector<std::thread> ranks;
        std::vector<std::string> errors(cluster);
        ClusterBarrier all_done(cluster);  // a rank's thread_local shared memory lives until then
        for (int r = 0; r < cluster; ++r)
          ranks.emplace_back([&, r] {
            try {
              run_cta(body, {x0 + r, y, z}, block, grid, dynamic_smem, &group, r);
            } catch (const std::exception& e) {
              errors[r] = e.what();
            }
            all_done.arrive_and_wait();
          });
        for (auto& t : ranks) t.join();
        for (const auto& e : errors)
          if (!e.empty()) throw std::runtime_error(e);
      }
}

}  // namespace xj_simt

// ---- the CUDA runtime, as one sm_90 device (its driver's tensor maps: sm90a.cpp) ---------------
namespace {
thread_local cudaError_t last_error = cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorSimt"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error in the SIMT emulator"; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    default: return last_error = cudaErrorInvalidValue;
  }
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return last_error = cudaErrorInvalidDevice;
  *prop = cudaDeviceProp{};
  std::strncpy(prop->name, "xjfast SIMT emulator (CPU)", sizeof(prop->name) - 1);
  prop->major = 9, prop->minor = 0, prop->multiProcessorCount = 132;
  prop->sharedMemPerBlockOptin = 227 << 10;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && (value < 0 || value > (227 << 10)))
    return last_error = cudaErrorInvalidValue;
  return cudaSuccess;
}
