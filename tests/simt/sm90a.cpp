// The sm_90a instructions of the emulator: wgmma (e4m3, m64nNk32, operands through shared-memory
// matrix descriptors or, for A, registers), mbarriers with transaction counts, TMA tensor loads
// with the driver's cuTensorMapEncodeTiled behind them, and setmaxnreg. Written from the PTX ISA
// and the CUDA driver API's documentation, not from csrc/'s helpers, so a kernel that builds its
// descriptors, swizzles or barrier phases at odds with them computes a wrong answer or fails here.
// (Where that reading of the documentation is itself wrong, the kernel and the emulator agree and
// only a GPU can tell.)
//
// Models, where the hardware leaves a choice:
//   - a wgmma completes when it is issued (the kernels wait for each group at once);
//   - its FP8 accumulator keeps 13 explicit mantissa bits: each k-step's exact sum is added to the
//     accumulator and the result truncated towards zero (the precision DeepSeek-V3 and
//     SageAttention2 measured on Hopper, which csrc/attention_cores.cuh designs around);
//   - a TMA load lands at the end of the scheduling round that issued it, after every warp has run
//     as far as it can: a thread that reads the tile without waiting on its mbarrier reads poison
//     or the stage's previous tile;
//   - %globaltimer advances 1 us a read, so a timed-out wait is a count of polls, not of CPU time.
#include <cuda.h>

#include <cstring>
#include <string>

#include "cta.h"

namespace xj_simt {
using namespace detail;
namespace {

// ---- wgmma -------------------------------------------------------------------------------------
// Every thread of the calling warpgroup arrives with the same `op` and `key` (the operands they
// must agree on). `first_warp` runs when the first of the four warps has arrived whole: what a
// wgmma reads from shared memory is read then, so that an operand another warp writes without a
// barrier of the CTA (or an mbarrier) before the product is missed, as the PTX memory model
// allows. `last` runs in the arrival that completes the rendezvous. Both take the operands of
// this instance, which the call returns.
template <class FirstWarp, class Last>
WgmmaOperands& warpgroup_rendezvous(const char* op, uint64_t key, FirstWarp&& first_warp, Last&& last) {
  Cta& c = cta();
  const int thread = fiber().linear, group = thread / kGroupThreads;
  const int threads = static_cast<int>(c.fibers.size());
  if ((group + 1) * kGroupThreads > threads) fail(std::string(op) + ": the CTA's last warpgroup is not whole");
  for (int w = 4 * group; w < 4 * group + 4; ++w)
    if (c.live_in_warp[w] != 32) fail(std::string(op) + " in a warpgroup with exited threads");
  Barrier& barrier = c.group_barriers[group];
  WarpgroupOp& state = c.groups[group];
  if (barrier.arrived == 0) {
    state.op = op, state.key = key;
  } else if (std::strcmp(state.op, op) != 0 || state.key != key) {
    fail(std::string("the threads of a warpgroup disagree: ") + state.op + " and " + op +
         (std::strcmp(state.op, op) == 0 ? " with other operands" : ""));
  }
  WgmmaOperands& operands = state.operands[state.instances & 1];
  int* arrivals = state.warp_arrivals;
  if (++arrivals[thread / 32 % 4] == 32 && arrivals[0] + arrivals[1] + arrivals[2] + arrivals[3] == 32)
    first_warp(operands);
  arrive_and_wait(barrier, kGroupThreads, [&] {
    last(operands);
    arrivals[0] = arrivals[1] = arrivals[2] = arrivals[3] = 0;
    ++state.instances;
  });
  return operands;
}

struct Descriptor {
  uint32_t start, leading, stride;  // bytes
  int base_offset, swizzle;         // swizzle: 0 none, else its span in bytes (128, 64, 32)
};

Descriptor decode(uint64_t desc) {
  static const int spans[4] = {0, 128, 64, 32};
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4, static_cast<int>((desc >> 49) & 7),
          spans[desc >> 62]};
}

// The .shared address of byte k (0..31) of row `row` of a K-major operand (rows M or N, K in bytes):
// without swizzle, 8 x 16-byte core matrices, `leading` bytes apart along K and `stride` bytes
// apart from one 8-row group to the next; with a swizzle of span W, rows of the 8-row group W bytes
// apart, groups `stride` apart, and the 16-byte chunk bits of the address (4 and up) XORed with
// its bits 7 and up (log2(W / 16) of them).
uint32_t operand_address(const Descriptor& d, int row, int k) {
  if (d.swizzle == 0) return d.start + (row / 8) * d.stride + (k / 16) * d.leading + (row % 8) * 16 + k % 16;
  const uint32_t linear = d.start + (row / 8) * d.stride + (row % 8) * d.swizzle + k;
  return linear ^ (((linear >> 7) & (d.swizzle / 16 - 1)) << 4);
}

void read_operand(uint64_t desc, int rows, float (*out)[32]) {
  const Descriptor d = decode(desc);
  if (d.base_offset != 0) fail("wgmma: a descriptor base offset other than 0 (not emulated)");
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 32; ++k) {
      const uint8_t* byte = shared_bytes(operand_address(d, r, k), 1, "wgmma operand");
      race_access(byte, 1, Racecheck::kAsyncRead, nullptr, "a wgmma operand");
      out[r][k] = e4m3_value(*byte, 0);
    }
}

// x truncated towards zero to 13 explicit mantissa bits.
float fp8_accumulator(double x) {
  float f = static_cast<float>(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= ~((1u << 10) - 1);
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- mbarriers ---------------------------------------------------------------------------------
const uint8_t* check_mbarrier_address(uint32_t address, const char* op) {
  if (address % 8) fail(std::string(op) + ": an mbarrier must be 8-byte aligned");
  return shared_bytes(address, 8, op);
}

// The mbarrier at `address`, which the calling thread's `op` (an atomic operation on it) uses:
// racecheck requires its initialization to be ordered before.
Mbarrier& mbarrier(uint32_t address, const char* op) {
  Cta& c = cta();
  race_access(check_mbarrier_address(address, op), 8, Racecheck::kAtomic, nullptr, op);
  const auto it = c.mbarriers.find(address);
  if (it == c.mbarriers.end())
    fail(std::string(op) + ": no mbarrier was initialized at shared address " + std::to_string(address));
  return it->second;
}

void settle(Mbarrier& b) {
  if (b.pending != 0 || b.tx != 0) return;
  if (cta().race) b.completed[b.phase & 1].swap(b.arrivals), b.arrivals = cta().race->empty_clock();
  ++b.phase, b.pending = b.expected, ++cta().progress;
}

// ---- TMA ---------------------------------------------------------------------------------------
constexpr uint32_t kTensorMapMagic = 0x58544D41;  // what encode_tiled writes first

// What cuTensorMapEncodeTiled stores in the opaque CUtensorMap, here.
struct TensorMap {
  uint32_t magic;
  uint8_t rank, element_bytes, swizzle, unused;
  const uint8_t* base;
  uint64_t dims[5], strides[5];  // strides in bytes, strides[0] = element_bytes
  uint32_t box[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "a tensor map fits the driver's opaque 128 bytes");

uint64_t box_bytes(const TensorMap& t) {
  uint64_t bytes = t.element_bytes;
  for (int i = 0; i < 5; ++i) bytes *= t.box[i];
  return bytes;
}

int element_bytes(CUtensorMapDataType type) {
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;
  }
}

// cuTensorMapEncodeTiled, with the driver's checks (CUDA driver API, "Tensor Map Object Management")
// for what the emulator implements: no interleave, element strides of 1, zeros out of bounds.
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                      const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                      CUtensorMapL2promotion, CUtensorMapFloatOOBfill fill) {
  TensorMap t{};
  t.magic = kTensorMapMagic, t.rank = static_cast<uint8_t>(rank);
  t.element_bytes = static_cast<uint8_t>(element_bytes(type));
  if (map == nullptr || reinterpret_cast<uintptr_t>(map) % 64 || rank < 1 || rank > 5 || address == nullptr ||
      reinterpret_cast<uintptr_t>(address) % 16)
    return CUDA_ERROR_INVALID_VALUE;
  if (t.element_bytes == 0 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return CUDA_ERROR_NOT_SUPPORTED;
  t.base = static_cast<const uint8_t*>(address);
  t.strides[0] = t.element_bytes;
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32) || box[i] == 0 || box[i] > 256 || element_strides[i] == 0 ||
        element_strides[i] > 8)
      return CUDA_ERROR_INVALID_VALUE;
    if (element_strides[i] != 1) return CUDA_ERROR_NOT_SUPPORTED;
    if (i > 0 && (strides[i - 1] % 16 || strides[i - 1] >= (1ull << 40))) return CUDA_ERROR_INVALID_VALUE;
    t.dims[i] = dims[i], t.box[i] = box[i];
    if (i > 0) t.strides[i] = strides[i - 1];
  }
  const uint32_t inner = box[0] * t.element_bytes;
  static const int spans[4] = {0, 32, 64, 128};  // CU_TENSOR_MAP_SWIZZLE_NONE, _32B, _64B, _128B
  if (swizzle < CU_TENSOR_MAP_SWIZZLE_NONE || swizzle > CU_TENSOR_MAP_SWIZZLE_128B) return CUDA_ERROR_NOT_SUPPORTED;
  t.swizzle = static_cast<uint8_t>(spans[swizzle]);
  if (inner % 16 || (t.swizzle && inner > t.swizzle)) return CUDA_ERROR_INVALID_VALUE;
  for (cuuint32_t i = rank; i < 5; ++i) t.box[i] = 1, t.dims[i] = 1;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &t, sizeof(t));
  return CUDA_SUCCESS;
}

// The box of `map` at `coords` into shared memory at `dst` (in the box's order, innermost first,
// each byte's address swizzled as the map says), elements outside the tensor as zeros; then its
// bytes complete on mbarrier `bar`. Runs in the scheduler, between rounds.
// `copy`: the load as racecheck sees it (unused without racecheck).
void land(const TensorMap& t, const int (&coords)[5], uint32_t dst, uint32_t bar, const Racecheck::Async& copy) {
  Cta& c = cta();
  uint8_t* const window = c.dynamic - kDynamicBase;  // + a .shared address (checked at the issue)
  uint64_t offset = 0;
  for (uint32_t j4 = 0; j4 < t.box[4]; ++j4)
    for (uint32_t j3 = 0; j3 < t.box[3]; ++j3)
      for (uint32_t j2 = 0; j2 < t.box[2]; ++j2)
        for (uint32_t j1 = 0; j1 < t.box[1]; ++j1)
          for (uint32_t j0 = 0; j0 < t.box[0]; ++j0, offset += t.element_bytes) {
            const int64_t at[5] = {coords[0] + int64_t{j0}, coords[1] + int64_t{j1}, coords[2] + int64_t{j2},
                                   coords[3] + int64_t{j3}, coords[4] + int64_t{j4}};
            bool inside = true;
            uint64_t source = 0;
            for (int i = 0; i < 5; ++i) {
              inside = inside && at[i] >= 0 && static_cast<uint64_t>(at[i]) < t.dims[i];
              source += static_cast<uint64_t>(at[i]) * t.strides[i];
            }
            uint32_t address = dst + static_cast<uint32_t>(offset);
            if (t.swizzle) address ^= ((address >> 7) & (t.swizzle / 16 - 1)) << 4;
            if (inside) std::memcpy(window + address, t.base + source, t.element_bytes);
            else std::memset(window + address, 0, t.element_bytes);
            if (c.race && c.error.empty()) c.error = c.race->async_write(copy, window + address, t.element_bytes);
          }
  Mbarrier& b = c.mbarriers.at(bar);
  if (c.race) Racecheck::complete(copy, b.arrivals);
  b.tx -= static_cast<int64_t>(box_bytes(t));  // (it may go below 0 until the expect_tx arrives)
  settle(b);
}

}  // namespace

void wgmma_e4m3(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  if (n != 64 && n != 128) fail("wgmma: N of 64 or 128 (the shapes emulated)");
  const int local = fiber().linear % kGroupThreads;
  Cta& c = cta();
  WarpgroupOp& group = c.groups[fiber().linear / kGroupThreads];
  if (a) std::memcpy(group.a_regs[local], a, 16);
  const uint64_t key = (a ? 1 : a_desc * 0x9E3779B97F4A7C15ull) ^ (b_desc * 0xC2B2AE3D27D4EB4Full) ^ n ^
                       (accumulate ? 1ull << 63 : 0);
  const auto read_shared = [&](WgmmaOperands& s) {
    if (!a) read_operand(a_desc, 64, s.a);
    read_operand(b_desc, n, s.b);
  };
  const auto gather_registers = [&](WgmmaOperands& s) {
    if (!a) return;
    // A's register fragments: warp w holds rows 16w..16w+15 as mma.m16n8k32 holds its A
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 32; ++k) {
        const int w = m / 16, r = m % 16;
        s.a[m][k] = e4m3_value(group.a_regs[32 * w + (r % 8) * 4 + (k % 16) / 4][r / 8 + 2 * (k / 16)], k % 4);
      }
  };
  const WgmmaOperands& op = warpgroup_rendezvous("wgmma.mma_async", key, read_shared, gather_registers);
  // this thread's accumulators: per 8-column tile i, rows g and g + 8 of its warp, columns 2t, 2t + 1
  const int w = local / 32, g = local % 32 / 4, t = local % 4;
  for (int i = 0; i < n / 8; ++i)
    for (int e = 0; e < 4; ++e) {
      const int m = 16 * w + g + 8 * (e / 2), col = 8 * i + 2 * t + e % 2;
      double sum = accumulate ? d[4 * i + e] : 0.0;
      double step = 0.0;
      for (int k = 0; k < 32; ++k) step += static_cast<double>(op.a[m][k]) * op.b[col][k];
      d[4 * i + e] = fp8_accumulator(sum + step);
    }
}

void setmaxnreg(int registers) {
  if (registers < 24 || registers > 256 || registers % 8)
    fail("setmaxnreg: a register count in [24, 256], a multiple of 8; got " + std::to_string(registers));
  const auto nothing = [](WgmmaOperands&) {};
  warpgroup_rendezvous("setmaxnreg", static_cast<uint64_t>(registers), nothing, nothing);
}

void fence_proxy_async() {
  if (cta().race) cta().race->fence_proxy_async(race_id());
}

void mbarrier_init(uint32_t bar, int arrivals) {
  if (arrivals < 1 || arrivals >= (1 << 20)) fail("mbarrier.init: an arrival count in [1, 2^20)");
  race_access(check_mbarrier_address(bar, "mbarrier.init"), 8, Racecheck::kWrite, nullptr, "mbarrier.init");
  Mbarrier& b = cta().mbarriers[bar];
  b = Mbarrier{};
  b.expected = b.pending = arrivals;
  if (Racecheck* race = cta().race) b.arrivals = b.completed[0] = b.completed[1] = race->empty_clock();
}

void mbarrier_arrive(uint32_t bar, uint32_t tx_bytes) {
  Mbarrier& b = mbarrier(bar, "mbarrier.arrive");
  if (b.pending == 0) fail("mbarrier.arrive: more arrivals than the phase expects");
  b.tx += tx_bytes;
  if (cta().race) cta().race->release(race_id(), b.arrivals);
  --b.pending, ++cta().progress;
  settle(b);
}

bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  const Mbarrier& b = mbarrier(bar, "mbarrier.try_wait");
  // the phase of this parity is complete when the current (incomplete) phase has the other one
  const bool complete = (b.phase & 1) != (parity & 1);
  if (complete && cta().race) cta().race->acquire(race_id(), b.completed[parity & 1]);
  if (!complete) yield();
  else if (draw(2) == 0) stall_warp();
  return complete;
}

uint64_t global_timer() { return cta().clock += 1000; }

void tma_load(const void* map, uint32_t dst, const int* coords, int rank, uint32_t bar) {
  TensorMap t;
  std::memcpy(&t, map, sizeof(t));
  if (t.magic != kTensorMapMagic) fail("cp.async.bulk.tensor: not a tensor map cuTensorMapEncodeTiled wrote");
  if (t.rank != rank) fail("cp.async.bulk.tensor: a " + std::to_string(rank) + "-d load of a rank-" +
                           std::to_string(t.rank) + " tensor map");
  if (dst % 128) fail("cp.async.bulk.tensor: the shared-memory destination must be 128-byte aligned");
  shared_bytes(dst, box_bytes(t), "cp.async.bulk.tensor destination");
  mbarrier(bar, "cp.async.bulk.tensor");
  int at[5] = {0, 0, 0, 0, 0};
  for (int i = 0; i < rank; ++i) at[i] = coords[i];
  Racecheck::Async copy;
  if (cta().race) copy = cta().race->issue(race_id());
  cta().in_flight.push_back([t, at, dst, bar, copy] { land(t, at, dst, bar, copy); });
}

}  // namespace xj_simt

// TMA's tensor maps come from the driver, through the runtime's entry-point query.
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  const bool known = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = known ? reinterpret_cast<void*>(&xj_simt::encode_tiled) : nullptr;
  if (status) *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
