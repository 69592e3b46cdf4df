// The racecheck (racecheck.h) and the entry points of gcc's -fsanitize=thread instrumentation that
// feed it: the racecheck build (tests/simt_extension.py, racecheck=True) compiles csrc/ with
// -fsanitize=thread and links no ThreadSanitizer runtime, so each load and store of a kernel calls
// the __tsan_* functions below, which hand its accesses to the running CTA's Racecheck.
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

// Inside the racecheck, on this OS thread: an instrumented function it reaches (a template
// instantiation the linker took from a kernel's object) is not the kernel's access.
thread_local int tl_inside = 0;

}  // namespace

// The racecheck's lock, held by each of its operations (a cluster's CTAs run on OS threads at once).
struct Racecheck::Guard {
  std::lock_guard<std::mutex> lock;
  explicit Guard(std::mutex& m) : lock(m) { ++tl_inside; }
  ~Guard() { --tl_inside; }
};

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
          if (info->dlpi_phdr[i].p_type == PT_TLS && s->inside >= base &&
              s->inside < base + info->dlpi_phdr[i].p_memsz) {
            s->found = {reinterpret_cast<const uint8_t*>(base), info->dlpi_phdr[i].p_memsz};
            return 1;
          }
        return 0;
      },
      &search);
  if (!search.found.first) throw std::runtime_error("simt racecheck: the library's thread_local storage not found");
  return search.found;
}

Racecheck::Racecheck(int cta_threads, int ctas)
    : cta_threads_(cta_threads), threads_(cta_threads * ctas), width_(threads_ + kAsyncSlots),
      clocks_(static_cast<size_t>(threads_) * width_, 0), issuers_(kAsyncSlots, 0), async_ticks_(kAsyncSlots, 0),
      shared_(ctas), stacks_(threads_, {nullptr, nullptr}), fences_(threads_) {
  for (int t = 0; t < threads_; ++t) row(t)[t] = 1;
}

void Racecheck::add_cta(int rank, const uint8_t* dynamic, size_t dynamic_bytes, const std::vector<void*>& stacks,
                        size_t stack_bytes) {
  const auto [statics, static_bytes] = static_shared();  // (of the calling OS thread, which runs the CTA)
  const Guard guard(mutex_);
  Shared& m = shared_[rank];
  m.dynamic = dynamic, m.dynamic_bytes = dynamic_bytes, m.statics = statics, m.static_bytes = static_bytes;
  m.cells.reset(static_cast<Cell*>(std::calloc(dynamic_bytes + static_bytes, sizeof(Cell))));
  if (!m.cells) throw std::runtime_error("simt racecheck: no memory for the shadow of shared memory");
  for (size_t i = 0; i < stacks.size(); ++i) {
    const auto* begin = static_cast<const uint8_t*>(stacks[i]);
    stacks_[rank * cta_threads_ + i] = {begin, begin + stack_bytes};
  }
}

Racecheck::Cell* Racecheck::cell(const void* p, int id, std::string& hazard) {
  const auto* b = static_cast<const uint8_t*>(p);
  for (Shared& m : shared_) {
    if (!m.holds(b)) continue;
    if (m.exited) hazard = "racecheck: an access of " + where(b) + " by " + who(id) + " after that CTA exited";
    const bool dynamic = b >= m.dynamic && b < m.dynamic + m.dynamic_bytes;
    return m.cells.get() + (dynamic ? b - m.dynamic : m.dynamic_bytes + (b - m.statics));
  }
  if (id < threads_ && b >= stacks_[id].first && b < stacks_[id].second) return nullptr;
  return &global_[p];
}

void Racecheck::tick(int id) {
  if (++row(id)[id] > kClockMask) throw std::runtime_error("simt racecheck: a thread's clock overflowed");
}

std::string Racecheck::access(int thread, const void* p, size_t bytes, Kind kind, const void* pc, const char* op) {
  const Guard guard(mutex_);
  return check(row(thread), thread, p, bytes, kind, pc, op);
}

void Racecheck::fence_proxy_async(int thread) {
  const Guard guard(mutex_);
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
  std::string hazard;
  for (size_t i = 0; i < bytes; ++i) {
    const auto* at = static_cast<const uint8_t*>(p) + i;
    Cell* c = cell(at, id, hazard);
    if (!hazard.empty()) return hazard;
    if (c == nullptr) continue;
    if (!ordered_before(c->write, clock))
      return describe(write ? "write-after-write" : "read-after-write", at, id, write, c->write, true, pc, op);
    if (kind == kAtomic) continue;
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

std::string Racecheck::where(const uint8_t* b) const {
  for (size_t r = 0; r < shared_.size(); ++r) {
    const Shared& m = shared_[r];
    if (!m.holds(b)) continue;
    const bool dynamic = b >= m.dynamic && b < m.dynamic + m.dynamic_bytes;
    return "byte " + std::to_string(dynamic ? b - m.dynamic : b - m.statics) + " of the " +
           (dynamic ? "dynamic" : "static") + " shared memory" +
           (shared_.size() > 1 ? " of the cluster's CTA " + std::to_string(r) : "");
  }
  char global[48];
  snprintf(global, sizeof global, "global memory at %p", static_cast<const void*>(b));
  return global;
}

std::string Racecheck::who(int id) const {
  if (id >= threads_) return "a TMA load issued by " + who(issuers_[id - threads_]);
  const int t = id % cta_threads_;
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ")" +
         (shared_.size() > 1 ? " of the cluster's CTA " + std::to_string(id / cta_threads_) : "");
}

std::string Racecheck::describe(const char* hazard, const uint8_t* b, int id, bool write, uint32_t earlier,
                                bool earlier_write, const void* pc, const char* op) const {
  std::string at = op ? op : "an instruction outside the library";
  Dl_info info;
  if (!op && pc && dladdr(pc, &info) && info.dli_fbase) {
    char offset[32];
    snprintf(offset, sizeof offset, "pc 0x%lx",
             static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase)));
    at = std::string(offset) + " in " + info.dli_fname;
  }
  return std::string("racecheck: ") + hazard + " hazard at " + where(b) + ": " + who(id) +
         (write ? " writes" : " reads") + " it (" + at + ") and " + who(static_cast<int>(earlier >> kClockBits)) +
         (earlier_write ? " wrote" : " read") + " it with no barrier, mbarrier or wait ordering the two";
}

void Racecheck::join(const std::vector<int>& members) {
  if (members.size() < 2) return;
  const Guard guard(mutex_);
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

void Racecheck::cluster_arrive(uint64_t generation, const std::vector<int>& members) {
  const Guard guard(mutex_);
  auto& [clock, ctas] = cluster_syncs_[generation];
  if (clock.empty()) clock.assign(width_, 0);
  ++ctas;
  for (int m : members) {
    const uint32_t* r = row(m);
    for (int j = 0; j < width_; ++j) clock[j] = std::max(clock[j], r[j]);
  }
}

void Racecheck::cluster_depart(uint64_t generation, const std::vector<int>& members) {
  const Guard guard(mutex_);
  auto it = cluster_syncs_.find(generation);
  for (int m : members) {
    uint32_t* r = row(m);
    for (int j = 0; j < width_; ++j) r[j] = std::max(r[j], it->second.first[j]);
    tick(m);
  }
  if (--it->second.second == 0) cluster_syncs_.erase(it);  // the last CTA of this barrier has read it
}

std::string Racecheck::exit_cta(int rank, const std::vector<int>& members) {
  const Guard guard(mutex_);
  Shared& m = shared_[rank];
  m.exited = true;
  std::vector<uint32_t> end(width_, 0);  // the clock of its exit: after all its threads did
  for (int t : members)
    for (int j = 0; j < width_; ++j) end[j] = std::max(end[j], row(t)[j]);
  const auto peer = [&](uint32_t epoch) {
    const int id = static_cast<int>(epoch >> kClockBits);
    return epoch != 0 && id < threads_ && id / cta_threads_ != rank && !ordered_before(epoch, end.data());
  };
  for (size_t i = 0; i < m.dynamic_bytes + m.static_bytes; ++i) {
    const Cell& c = m.cells.get()[i];
    const uint8_t* b = i < m.dynamic_bytes ? m.dynamic + i : m.statics + (i - m.dynamic_bytes);
    uint32_t late = peer(c.write) ? c.write : 0;
    for (uint32_t r : c.reads) late = late ? late : peer(r) ? r : 0;
    if (late)
      return "racecheck: the cluster's CTA " + std::to_string(rank) + " exits while " +
             who(static_cast<int>(late >> kClockBits)) + " may still access " + where(b) +
             " (no cluster barrier orders that access before the exit)";
  }
  return {};
}

void Racecheck::release(int thread, std::vector<uint32_t>& arrivals) {
  const Guard guard(mutex_);
  const uint32_t* r = row(thread);
  for (int j = 0; j < width_; ++j) arrivals[j] = std::max(arrivals[j], r[j]);
  tick(thread);
}

void Racecheck::acquire(int thread, const std::vector<uint32_t>& phase) {
  const Guard guard(mutex_);
  uint32_t* r = row(thread);
  for (int j = 0; j < width_; ++j) r[j] = std::max(r[j], phase[j]);
}

Racecheck::Async Racecheck::issue(int thread) {
  const Guard guard(mutex_);
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
  const Guard guard(mutex_);
  return check(copy.clock.data(), threads_ + copy.slot, p, bytes, kWrite, nullptr, "its landing");
}

void Racecheck::complete(const Async& copy, std::vector<uint32_t>& arrivals) {
  for (size_t j = 0; j < arrivals.size(); ++j) arrivals[j] = std::max(arrivals[j], copy.clock[j]);
}

void race_access(const void* p, size_t bytes, Racecheck::Kind kind, const void* pc, const char* op) {
  Cta* c = running_cta();
  if (c == nullptr || !c->race || c->current < 0 || tl_inside) return;
  const std::string hazard = c->race->access(race_id(), p, bytes, kind, pc, op);
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

#define XJ_TSAN_EXPORT extern "C" __attribute__((visibility("default")))
#define XJ_RACE_ACCESS(kind, write, n)                                                                         \
  XJ_TSAN_EXPORT void __tsan_##kind##n(void* p) { on_access(p, n, write, __builtin_return_address(0)); }           \
  XJ_TSAN_EXPORT void __tsan_unaligned_##kind##n(void* p) { on_access(p, n, write, __builtin_return_address(0)); }
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
XJ_TSAN_EXPORT void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false, __builtin_return_address(0)); }
XJ_TSAN_EXPORT void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true, __builtin_return_address(0)); }
XJ_TSAN_EXPORT void __tsan_init() {}
XJ_TSAN_EXPORT void __tsan_func_entry(void*) {}
XJ_TSAN_EXPORT void __tsan_func_exit() {}
XJ_TSAN_EXPORT void __tsan_vptr_update(void**, void*) {}
XJ_TSAN_EXPORT void __tsan_vptr_read(void**) {}

// Atomics (host code's std::atomic and static guards, the kernels' atomicAdd): performed as asked,
// not checked (an atomic races nothing).
#define XJ_RACE_RMW(bits, type, name, builtin)                                   \
  XJ_TSAN_EXPORT type __tsan_atomic##bits##_##name(volatile type* a, type v, int) { \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                      \
  }
#define XJ_RACE_CAS(bits, type, name, weak)                                                              \
  XJ_TSAN_EXPORT int __tsan_atomic##bits##_##name(volatile type* a, type* expected, type v, int, int) {  \
    return __atomic_compare_exchange_n(a, expected, v, weak, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
  }
#define XJ_RACE_ATOMICS(bits, type)                                                                      \
  XJ_TSAN_EXPORT type __tsan_atomic##bits##_load(const volatile type* a, int) {                          \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                      \
  XJ_TSAN_EXPORT void __tsan_atomic##bits##_store(volatile type* a, type v, int) {                       \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                      \
  XJ_RACE_RMW(bits, type, exchange, __atomic_exchange_n)                                                 \
  XJ_RACE_RMW(bits, type, fetch_add, __atomic_fetch_add)                                                 \
  XJ_RACE_RMW(bits, type, fetch_sub, __atomic_fetch_sub)                                                 \
  XJ_RACE_RMW(bits, type, fetch_and, __atomic_fetch_and)                                                 \
  XJ_RACE_RMW(bits, type, fetch_or, __atomic_fetch_or)                                                   \
  XJ_RACE_RMW(bits, type, fetch_xor, __atomic_fetch_xor)                                                 \
  XJ_RACE_CAS(bits, type, compare_exchange_strong, false)                                                \
  XJ_RACE_CAS(bits, type, compare_exchange_weak, true)                                                   \
  XJ_TSAN_EXPORT type __tsan_atomic##bits##_compare_exchange_val(volatile type* a, type expected, type v, int, \
                                                                 int) {                                  \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);             \
    return expected;                                                                                     \
  }
XJ_RACE_ATOMICS(8, uint8_t)
XJ_RACE_ATOMICS(16, uint16_t)
XJ_RACE_ATOMICS(32, uint32_t)
XJ_RACE_ATOMICS(64, uint64_t)
#undef XJ_RACE_ATOMICS
#undef XJ_RACE_CAS
#undef XJ_RACE_RMW

XJ_TSAN_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
XJ_TSAN_EXPORT void __tsan_atomic_signal_fence(int) {}
#undef XJ_TSAN_EXPORT
