// Small kernels with and without the ordering their shared memory needs: the controls of
// tests/test_racecheck.py, which show that the racecheck build reports each kind of hazard (and
// stays quiet once the barrier, wait or __syncwarp is there). Instrumented like csrc/'s kernels in
// that build; called through ctypes (xj_simt_race_control), not through xjfast._C's bindings.
#include <cuda.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace {

constexpr int kThreads = 128;  // a warpgroup

// Thread t writes words[t], then reads its neighbour's word: ordered by __syncthreads or not.
void write_then_read_neighbour(float* words, bool barrier) {
  const int t = threadIdx.x;
  words[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  if (words[(t + 1) % kThreads] < 0.f) __trap();
}

void neighbours(bool barrier) {
  write_then_read_neighbour(reinterpret_cast<float*>(xj_simt::dynamic_shared()), barrier);
}

// Thread t reads its neighbour's word, then overwrites its own: a write-after-read.
void overwrite(bool barrier) {
  float* s = reinterpret_cast<float*>(xj_simt::dynamic_shared());
  const int t = threadIdx.x;
  s[t] = 1.f;
  __syncthreads();
  volatile float x = s[(t + 1) % kThreads];
  (void)x;
  if (barrier) __syncthreads();
  s[t] = 2.f;
}

// The same on static __shared__ memory (thread_local storage in the emulator).
void static_neighbours(bool barrier) {
  __shared__ float s[kThreads];
  write_then_read_neighbour(s, barrier);
}

// The same on global memory (which compute-sanitizer's racecheck does not watch, and this one does
// within a CTA).
float global_words[kThreads];
void global_neighbours(bool barrier) { write_then_read_neighbour(global_words, barrier); }

// Within a warp: lane l reads lane l + 1's word after a shuffle (which orders no memory) or a __syncwarp.
void lanes(bool barrier) {
  float* s = reinterpret_cast<float*>(xj_simt::dynamic_shared());
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (barrier) __syncwarp();
  else (void)__shfl_xor_sync(0xffffffffu, t, 1);
  if (s[t / 32 * 32 + (t + 1) % 32] < 0.f) __trap();
}

// Thread 0 fills a table and arrives on an mbarrier; the others wait for its phase, or do not.
void mbarrier_handoff(bool wait) {
  uint8_t* smem = xj_simt::dynamic_shared();
  const uint32_t bar = xj_simt::shared_address(smem);
  float* table = reinterpret_cast<float*>(smem + 128);
  const int t = threadIdx.x;
  if (t == 0) xj_simt::mbarrier_init(bar, 1);
  __syncthreads();
  if (t == 0) {
    for (int i = 0; i < kThreads; ++i) table[i] = static_cast<float>(i);
    xj_simt::mbarrier_arrive(bar, 0);
  } else {
    while (wait && !xj_simt::mbarrier_try_wait(bar, 0)) {
    }
    if (table[t] < 0.f) __trap();
  }
}

// Thread 0 initializes an mbarrier that every thread then arrives at: after a __syncthreads, or
// after a warpgroup rendezvous (setmaxnreg) that makes the init come first but orders no memory.
void mbarrier_init(bool barrier) {
  const uint32_t bar = xj_simt::shared_address(xj_simt::dynamic_shared());
  if (threadIdx.x == 0) xj_simt::mbarrier_init(bar, kThreads);
  if (barrier) __syncthreads();
  else xj_simt::setmaxnreg(232);
  xj_simt::mbarrier_arrive(bar, 0);
  while (!xj_simt::mbarrier_try_wait(bar, 0)) {
  }
}

// Each thread copies 16 bytes into shared memory with cp.async; after a __syncthreads its
// neighbour reads them, with or without the copy's wait_group before that barrier.
void cp_async(bool wait) {
  uint8_t* smem = xj_simt::dynamic_shared();
  static const float source[4 * kThreads] = {};
  const int t = threadIdx.x;
  xj_simt::cp_async_16(smem + 16 * t, source + 4 * t, true);
  xj_simt::cp_async_commit();
  if (wait) xj_simt::cp_async_wait(0);
  __syncthreads();
  if (reinterpret_cast<const float*>(smem)[4 * ((t + 1) % kThreads)] < 0.f) __trap();
  xj_simt::cp_async_wait(0);
}

// Every thread writes its 32 bytes of a wgmma's A and B (64 x 32 e4m3 each, 8 x 16-byte core
// matrices, K-major, no swizzle), then the warpgroup multiplies them: the writes reach the async
// proxy that wgmma reads through only with a fence.proxy.async after them (the barrier is not enough).
void wgmma_operands(bool fence) {
  uint8_t* smem = xj_simt::dynamic_shared();
  const int t = threadIdx.x;
  const uint4 ones = {0x38383838u, 0x38383838u, 0x38383838u, 0x38383838u};  // 1.0 in e4m3
  reinterpret_cast<uint4*>(smem)[2 * t] = ones, reinterpret_cast<uint4*>(smem)[2 * t + 1] = ones;
  if (fence) xj_simt::fence_proxy_async();
  __syncthreads();
  const auto descriptor = [](uint32_t address) {  // leading (K) 128 bytes apart, 8-row groups 256
    return uint64_t{address >> 4} | uint64_t{128 >> 4} << 16 | uint64_t{256 >> 4} << 32;
  };
  const uint32_t a = xj_simt::shared_address(smem);
  float d[32];
  xj_simt::wgmma_e4m3(d, 64, nullptr, descriptor(a), descriptor(a + 2048), false);
  if (d[0] != 32.f) __trap();
}

// Thread 0 loads a 128 x 4-byte box by TMA; every thread reads it after waiting on its mbarrier, or not.
void tma(bool wait) {
  static float tensor[kThreads];
  uint8_t* smem = xj_simt::dynamic_shared();
  const uint32_t bar = xj_simt::shared_address(smem), dst = xj_simt::shared_address(smem + 128);
  const int t = threadIdx.x;
  if (t == 0) {
    void* encode = nullptr;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &encode, 12000, cudaEnableDefault, nullptr);
    alignas(64) static CUtensorMap map;
    const cuuint64_t dims[1] = {kThreads}, strides[1] = {4};
    const cuuint32_t box[1] = {kThreads}, element_strides[1] = {1};
    if (reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(encode)(
            &map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 1, tensor, dims, strides, box, element_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      __trap();
    xj_simt::mbarrier_init(bar, 1);
    xj_simt::mbarrier_arrive(bar, 4 * kThreads);
    const int coords[1] = {0};
    xj_simt::tma_load(&map, dst, coords, 1, bar);
  }
  __syncthreads();
  while (wait && !xj_simt::mbarrier_try_wait(bar, 0)) {
  }
  if (reinterpret_cast<const float*>(smem + 128)[t] < 0.f) __trap();
  while (!xj_simt::mbarrier_try_wait(bar, 0)) {  // (no CTA exits with a load in flight)
  }
}

// A cluster of two CTAs: each writes its static shared word, and after a cluster barrier reads its
// peer's; without a second barrier a CTA may exit (its shared memory gone) before its peer's read.
void cluster_peer(bool barrier) {
  __shared__ float word[kThreads];
  const int t = threadIdx.x;
  // (mapped before the barrier, which the peer cannot have passed: the emulator refuses to map an
  // exited CTA's memory, and the racecheck is to see the access itself)
  const float* peer = static_cast<const float*>(xj_simt::map_shared_rank(word, 1 - xj_simt::cluster_rank()));
  word[t] = static_cast<float>(t);
  xj_simt::cluster_sync();
  if (peer[t] < 0.f) __trap();
  if (barrier) xj_simt::cluster_sync();
}

struct Control {
  const char* name;
  void (*run)(bool);
  int cluster;  // CTAs: 0, one CTA without a cluster
};
constexpr Control kControls[] = {
    {"neighbours", neighbours, 0},   {"overwrite", overwrite, 0},
    {"static_neighbours", static_neighbours, 0}, {"global_neighbours", global_neighbours, 0},
    {"lanes", lanes, 0},             {"mbarrier", mbarrier_handoff, 0},
    {"mbarrier_init", mbarrier_init, 0},
    {"cp_async", cp_async, 0},       {"tma", tma, 0},
    {"wgmma_operands", wgmma_operands, 0}, {"cluster_peer", cluster_peer, 2},
};

}  // namespace

// Runs control `name` (of kControls), CTAs of 128 threads, with its ordering (`ordered`) or
// without: "" when the launch passes, else its error (the racecheck's report, in the racecheck build).
extern "C" __attribute__((visibility("default"))) const char* xj_simt_race_control(const char* name, int ordered) {
  static thread_local std::string result;
  for (const Control& c : kControls) {
    if (std::strcmp(c.name, name) != 0) continue;
    try {
      xj_simt::launch(dim3(std::max(c.cluster, 1)), dim3(kThreads), 8192, c.cluster, [&] { c.run(ordered != 0); });
      result.clear();
    } catch (const std::exception& e) {
      result = e.what();
    }
    return result.c_str();
  }
  return "no such control";
}
