// The racecheck (racecheck.h) and the entry points of gcc's -fsanitize=thread instrumentation that
// feed it: the racecheck build (tests/simt_extension.py, racecheck=True) compiles csrc/ with
// -fsanitize=thread and links no ThreadSanitizer runtime, so each load and store of a kernel calls
// the __tsan_* functions below, which hand shared-memory accesses to the running CTA's Racecheck.
// This file itself is not instrumented; in other builds nothing calls them.
#include "racecheck.h"

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <stdexcept>

#include "cta.h"

namespace xj_simt {
namespace detail {
namespace {

constexpr int kClockBits = 21;  // an epoch: (thread or async slot) << 21 | clock
constexpr uint32_t kClockMask = (1u << kClockBits) - 1;

bool ordered_before(uint32_t epoch, const uint32_t* clock) {
  return epoch == 0 || clock[epoch >> kClockBits] >= (epoch & kClockMask);
}

}  // namespace

std::pair<const uint8_t*, size_t> static_shared() {
  struct Search {
    const char* inside;
    std::pair<const uint8_t*, size_t> found{nullptr, 0};
  } search{&tl_anchor};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* s = static_cast<Search*>(data);
        const auto* base = static_cast<const char*>(info->dlpi_tls_data);
        for (int i = 0; base && i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS && s->inside >= base && s->inside < base + info->dlpi_phdr[i].p_memsz) {
            s->found = {reinterpret_cast<const uint8_t*>(base), info->dlpi_phdr[i].p_memsz};
            return 1;
          }
        return 0;
      },
      &search);
  if (!search.found.first) throw std::runtime_error("simt racecheck: the library's thread_local storage not found");
  return search.found;
}

Racecheck::Racecheck(int threads, const uint8_t* dynamic, size_t dynamic_bytes)
    : threads_(threads), width_(threads + kAsyncSlots), clocks_(static_cast<size_t>(threads) * width_, 0),
      issuers_(kAsyncSlots, 0), async_ticks_(kAsyncSlots, 0), dynamic_(dynamic), dynamic_bytes_(dynamic_bytes),
      fences_(threads) {
  std::tie(static_, static_bytes_) = static_shared();
  cells_.reset(static_cast<Cell*>(std::calloc(dynamic_bytes_ + static_bytes_, sizeof(Cell))));
  if (!cells_) throw std::runtime_error("simt racecheck: no memory for the shadow of shared memory");
  for (int t = 0; t < threads_; ++t) row(t)[t] = 1;
}

void Racecheck::set_stack(int thread, const void* begin, size_t bytes) {
  if (stacks_.empty()) stacks_.resize(threads_, {nullptr, nullptr});
  stacks_[thread] = {static_cast<const uint8_t*>(begin), static_cast<const uint8_t*>(begin) + bytes};
}

Racecheck::Cell* Racecheck::cell(const void* p, int id) {
  const auto* b = static_cast<const uint8_t*>(p);
  if (b >= dynamic_ && b < dynamic_ + dynamic_bytes_) return cells_.get() + (b - dynamic_);
  if (b >= static_ && b < static_ + static_bytes_) return cells_.get() + dynamic_bytes_ + (b - static_);
  if (id < threads_ && !stacks_.empty() && b >= stacks_[id].first && b < stacks_[id].second) return nullptr;
  return &global_[p];
}

void Racecheck::tick(int id) {
  if (++row(id)[id] > kClockMask) throw std::runtime_error("simt racecheck: a thread's clock overflowed");
}

std::string Racecheck::access(int thread, const void* p, size_t bytes, Kind kind, const void* pc, const char* op) {
  return check(row(thread), thread, p, bytes, kind, pc, op);
}

void Racecheck::fence_proxy_async(int thread) {
  fences_[thread].push_back(row(thread)[thread]);
  tick(thread);  // its writes from here on need a later fence
}

bool Racecheck::fenced(int writer, uint32_t clock, const uint32_t* reader) const {
  const std::vector<uint32_t>& f = fences_[writer];
  const auto first = std::lower_bound(f.begin(), f.end(), clock);  // its first fence since the write
  return first != f.end() && reader[writer] >= *first;
}

std::string Racecheck::check(const uint32_t* clock, int id, const void* p, size_t bytes, Kind kind, const void* pc,
                             const char* op) {
  const bool write = kind == kWrite;
  const uint32_t now = static_cast<uint32_t>(id) << kClockBits | clock[id];
  for (size_t i = 0; i < bytes; ++i) {
    const auto* at = static_cast<const uint8_t*>(p) + i;
    Cell* c = cell(at, id);
    if (c == nullptr) continue;
    if (!ordered_before(c->write, clock))
      return describe(write ? "write-after-write" : "read-after-write", at, id, write, c->write, true, pc, op);
    const int writer = static_cast<int>(c->write >> kClockBits);
    if (kind == kAsyncRead && c->write != 0 && writer < threads_ && !fenced(writer, c->write & kClockMask, clock))
      return describe("read-after-write (no fence.proxy.async between the generic write and the async-proxy read)",
                      at, id, write, c->write, true, pc, op);
    if (write) {
      for (uint32_t r : c->reads)
        if (!ordered_before(r, clock)) return describe("write-after-read", at, id, write, r, false, pc, op);
      *c = Cell{};
      c->write = now;
      continue;
    }
    // a read ordered after an earlier one stands for it: a write ordered after this read is
    // ordered after that one too, and a write that is not races this read
    int slot = -1;
    for (int r = 0; r < kReads; ++r)
      if (ordered_before(c->reads[r], clock)) {
        c->reads[r] = 0;
        if (slot < 0) slot = r;
      }
    if (slot < 0) {  // kReads unordered reads already: one goes (a hazard with it may go unseen)
      slot = 0;
      for (int r = 1; r < kReads; ++r)
        if ((c->reads[r] & kClockMask) < (c->reads[slot] & kClockMask)) slot = r;
    }
    c->reads[slot] = now;
  }
  return {};
}

std::string Racecheck::describe(const char* hazard, const void* p, int id, bool write, uint32_t earlier,
                                bool earlier_write, const void* pc, const char* op) const {
  const auto* b = static_cast<const uint8_t*>(p);
  const bool dynamic = b >= dynamic_ && b < dynamic_ + dynamic_bytes_, shared = dynamic || (b >= static_ &&
                                                                                          b < static_ + static_bytes_);
  const auto who = [&](int x) {
    if (x >= threads_) return "a TMA load issued by thread " + std::to_string(issuers_[x - threads_]);
    return "thread " + std::to_string(x) + " (warp " + std::to_string(x / 32) + ")";
  };
  std::string at = op ? op : "an instruction outside the library";
  Dl_info info;
  if (!op && pc && dladdr(pc, &info) && info.dli_fbase)
    at = "pc 0x" + [](uintptr_t x) {
      char s[32];
      snprintf(s, sizeof s, "%lx", static_cast<unsigned long>(x));
      return std::string(s);
    }(reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase)) + " in " + info.dli_fname;
  char global[48];
  snprintf(global, sizeof global, "global memory at %p", p);
  return std::string("racecheck: ") + hazard + " hazard at " +
         (shared ? "byte " + std::to_string(dynamic ? b - dynamic_ : b - static_) + " of the " +
                       (dynamic ? "dynamic" : "static") + " shared memory"
                 : std::string(global)) + ": " + who(id) + (write ? " writes" : " reads") +
         " it (" + at + ") and " + who(static_cast<int>(earlier >> kClockBits)) +
         (earlier_write ? " wrote" : " read") + " it with no barrier, mbarrier or wait ordering the two";
}

void Racecheck::join(const std::vector<int>& members) {
  if (members.size() < 2) return;
  std::vector<uint32_t> all(width_, 0);
  for (int m : members) {
    const uint32_t* r = row(m);
    for (int j = 0; j < width_; ++j) all[j] = std::max(all[j], r[j]);
  }
  for (int m : members) {
    std::copy(all.begin(), all.end(), row(m));
    tick(m);
  }
}

void Racecheck::release(int thread, std::vector<uint32_t>& arrivals) {
  const uint32_t* r = row(thread);
  for (int j = 0; j < width_; ++j) arrivals[j] = std::max(arrivals[j], r[j]);
  tick(thread);
}

void Racecheck::acquire(int thread, const std::vector<uint32_t>& phase) {
  uint32_t* r = row(thread);
  for (int j = 0; j < width_; ++j) r[j] = std::max(r[j], phase[j]);
}

Racecheck::Async Racecheck::issue(int thread) {
  Async copy;
  copy.slot = next_slot_++ % kAsyncSlots, copy.issuer = thread;
  issuers_[copy.slot] = thread;
  const uint32_t* r = row(thread);
  copy.clock.assign(r, r + width_);
  if (++async_ticks_[copy.slot] > kClockMask) throw std::runtime_error("simt racecheck: a TMA slot's clock overflowed");
  copy.clock[threads_ + copy.slot] = async_ticks_[copy.slot];
  tick(thread);  // the issuer's own accesses from here on are not ordered before the copy's writes
  return copy;
}

std::string Racecheck::async_write(const Async& copy, const void* p, size_t bytes) {
  return check(copy.clock.data(), threads_ + copy.slot, p, bytes, kWrite, nullptr, "its landing");
}

void Racecheck::complete(const Async& copy, std::vector<uint32_t>& arrivals) {
  for (size_t j = 0; j < arrivals.size(); ++j) arrivals[j] = std::max(arrivals[j], copy.clock[j]);
}

void race_access(const void* p, size_t bytes, Racecheck::Kind kind, const void* pc, const char* op) {
  Cta* c = running_cta();
  if (c == nullptr || !c->race || c->current < 0) return;
  const std::string hazard = c->race->access(c->current, p, bytes, kind, pc, op);
  if (!hazard.empty()) fail(hazard);
}

}  // namespace detail
}  // namespace xj_simt

// ---- gcc's -fsanitize=thread entry points ------------------------------------------------------
namespace {
void on_access(const void* p, size_t bytes, bool write, const void* pc) {
  using xj_simt::detail::Racecheck;
  xj_simt::detail::race_access(p, bytes, write ? Racecheck::kWrite : Racecheck::kRead, pc);
}
}  // namespace

#define XJ_RACE_ACCESS(kind, write, n)                                                                         \
  extern "C" __attribute__((visibility("default"))) void __tsan_##kind##n(void* p) {                            \
    on_access(p, n, write, __builtin_return_address(0));                                                       \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) void __tsan_unaligned_##kind##n(void* p) {                  \
    on_access(p, n, write, __builtin_return_address(0));                                                       \
  }
XJ_RACE_ACCESS(read, false, 1)
XJ_RACE_ACCESS(read, false, 2)
XJ_RACE_ACCESS(read, false, 4)
XJ_RACE_ACCESS(read, false, 8)
XJ_RACE_ACCESS(read, false, 16)
XJ_RACE_ACCESS(write, true, 1)
XJ_RACE_ACCESS(write, true, 2)
XJ_RACE_ACCESS(write, true, 4)
XJ_RACE_ACCESS(write, true, 8)
XJ_RACE_ACCESS(write, true, 16)
#undef XJ_RACE_ACCESS

extern "C" {
__attribute__((visibility("default"))) void __tsan_read_range(void* p, unsigned long n) {
  on_access(p, n, false, __builtin_return_address(0));
}
__attribute__((visibility("default"))) void __tsan_write_range(void* p, unsigned long n) {
  on_access(p, n, true, __builtin_return_address(0));
}
__attribute__((visibility("default"))) void __tsan_init() {}
__attribute__((visibility("default"))) void __tsan_func_entry(void*) {}
__attribute__((visibility("default"))) void __tsan_func_exit() {}
__attribute__((visibility("default"))) void __tsan_vptr_update(void**, void*) {}
__attribute__((visibility("default"))) void __tsan_vptr_read(void**) {}
}

// Atomics (host code's std::atomic and static guards, the kernels' atomicAdd): performed as asked,
// not checked (an atomic races nothing).
#define XJ_RACE_ATOMICS(bits, type)                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_load(const volatile type* a, int) { \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) void __tsan_atomic##bits##_store(volatile type* a, type v, int) { \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                  \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_exchange(volatile type* a, type v, int) { \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_fetch_add(volatile type* a, type v, int) { \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_fetch_sub(volatile type* a, type v, int) { \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_fetch_and(volatile type* a, type v, int) { \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_fetch_or(volatile type* a, type v, int) { \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                          \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_fetch_xor(volatile type* a, type v, int) { \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int __tsan_atomic##bits##_compare_exchange_strong(         \
      volatile type* a, type* expected, type v, int, int) {                                                    \
    return __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);            \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int __tsan_atomic##bits##_compare_exchange_weak(           \
      volatile type* a, type* expected, type v, int, int) {                                                    \
    return __atomic_compare_exchange_n(a, expected, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);             \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) type __tsan_atomic##bits##_compare_exchange_val(           \
      volatile type* a, type expected, type v, int, int) {                                                     \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    return expected;                                                                                           \
  }
XJ_RACE_ATOMICS(8, uint8_t)
XJ_RACE_ATOMICS(16, uint16_t)
XJ_RACE_ATOMICS(32, uint32_t)
XJ_RACE_ATOMICS(64, uint64_t)
#undef XJ_RACE_ATOMICS

extern "C" {
__attribute__((visibility("default"))) void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__attribute__((visibility("default"))) void __tsan_atomic_signal_fence(int) {}
}
