// ring.cuh -- the pydotcompute ring protocol, version 2 (docs/ring-protocol.md), in C++.
//
// One header for three compilers:
//   * nvcc and NVRTC (CuPy RawModule): functions are __host__ __device__, atomics are
//     cuda::atomic_ref -- system scope on what host and device share, device scope
//     on the words only one side's threads use;
//   * a plain C++20 compiler (g++/clang++ -std=c++20): std::atomic_ref, so the same
//     protocol code is built for the CPU and tested against the Python rings.
//
// A party attaches to a ring buffer as one side (host or device). The producer side
// publishes, the consumer side releases; each side's threads coordinate among
// themselves through `reserve`/`claim`, which live in the header when that side is
// the host and in a SideCounters struct in device memory when it is the device. A
// device party also keeps its counters, its reading of `released` and its shadow of
// the indices it writes there, and mirrors the counters into the header about once
// a millisecond (ring_mirror_counters), so no counter update crosses PCIe per batch.
//
// Every operation is run by a *team*: the threads that move one batch together.
// On a GPU a team is a warp (all 32 lanes call, with the same arguments): lane 0
// decides, every lane copies whole 8-byte words of consecutive slots, and lane 0
// publishes or releases the batch with one release store. On the host a team is one
// thread (Solo). The overloads without a team argument are Solo.
//
// No operation here waits for room or data beyond the protocol's ordering waits,
// except ring_push, which polls at most `max_polls` times (see there).
#pragma once

#if defined(__CUDACC__)
#include <cuda/atomic>
#define PDC_RING_HD __host__ __device__
#else
#include <atomic>
#define PDC_RING_HD
#endif
#if !defined(__CUDACC_RTC__)  // NVRTC compiles device code only and has no host headers
#include <chrono>
#include <cstring>
#include <thread>
#endif

namespace pdc {
namespace ring {

using u64 = unsigned long long;
using i64 = long long;
static_assert(sizeof(u64) == 8, "ring fields are 64-bit");

// ---- layout (protocol section 2) ------------------------------------------------
constexpr u64 kMagic = 0x31474E4952434450ULL;  // "PDCRING1" in memory order
constexpr u64 kVersion = 2;
constexpr u64 kLine = 128;
constexpr u64 kHeaderSize = 8 * kLine;
constexpr u64 kTagSize = 8;

constexpr u64 kOffMagic = 0;
constexpr u64 kOffVersion = 8;
constexpr u64 kOffHeaderSize = 16;
constexpr u64 kOffCapacity = 24;
constexpr u64 kOffSlotSize = 32;
constexpr u64 kOffRecordSize = 40;
constexpr u64 kOffBackpressure = 48;
constexpr u64 kOffProducerSide = 56;
constexpr u64 kOffConsumerSide = 64;
constexpr u64 kOffRecordOffset = 72;
constexpr u64 kOffPublished = 1 * kLine;
constexpr u64 kOffReserve = 2 * kLine;
constexpr u64 kOffReleasedSeen = 2 * kLine + 8;
constexpr u64 kOffReleased = 3 * kLine;
constexpr u64 kOffClaim = 4 * kLine;
constexpr u64 kOffEnqueued = 5 * kLine;
constexpr u64 kOffDroppedNewest = 5 * kLine + 8;
constexpr u64 kOffRejected = 5 * kLine + 16;
constexpr u64 kOffHighWater = 5 * kLine + 24;
constexpr u64 kOffDequeued = 6 * kLine;
constexpr u64 kOffDroppedOldest = 6 * kLine + 8;
constexpr u64 kOffDropBefore = 7 * kLine;

constexpr u64 kSideHost = 0;
constexpr u64 kSideDevice = 1;

constexpr u64 kBlock = 0;
constexpr u64 kReject = 1;
constexpr u64 kDropOldest = 2;
constexpr u64 kDropNewest = 3;

// How often a device party mirrors its counters into the header (protocol 2).
constexpr u64 kMirrorPeriodNs = 1000000;

// Results of ring_init / ring_attach.
enum Status : int {
  kOk = 0,
  kBadMagic = 1,
  kBadVersion = 2,
  kBadHeaderSize = 3,
  kBadCapacity = 4,
  kBadSlotSize = 5,
  kTooShort = 6,
  kBadMeta = 7,          // backpressure or side out of range
  kNoSideCounters = 8,   // a device party on a ring with a device side needs SideCounters
  kMisaligned = 9,       // the buffer is not 8-byte aligned
  kBadRecordOffset = 10, // record_offset does not match the ring's sides
};

// The device side's own words for one ring, in device memory (protocol 3.1 and 2).
// Initialise with ring_init_side_counters before the first use.
struct SideCounters {
  u64 reserve;        // producer: next position to reserve
  u64 claim;          // consumer: next position to claim
  u64 released_seen;  // producer: last reading of the header's released
  u64 released;       // consumer: released, in claim order among device threads
  u64 published;      // producer: records published (mirrored into the header)
  u64 enqueued;       // producer counters, mirrored into line 5
  u64 dropped_newest;
  u64 rejected;
  u64 high_water;
  u64 dequeued;       // consumer counters, mirrored into line 6
  u64 dropped_oldest;
  u64 drop_before;    // producer: the watermark it raised last
  u64 mirrored_at;    // when the counters were last mirrored (ns)
  u64 reserved_[3];
};
static_assert(sizeof(SideCounters) == 128, "SideCounters is one 128-byte line");

// A party's view of one ring: the buffer, its meta fields, and where this party's
// side keeps `reserve` and `claim` (null when this party plays no such role).
struct Ring {
  unsigned char* base;
  u64 capacity;
  u64 mask;
  u64 slot_size;
  u64 record_size;
  u64 record_offset;  // 8 on a crossing ring (tagged slots), else 0
  u64 backpressure;
  u64 producer_side;
  u64 consumer_side;
  u64 side;
  u64* reserve;
  u64* claim;
  SideCounters* counters;  // the device party's words; null for a host party
};

// ---- atomics (protocol section 5) ---------------------------------------------
namespace detail {

#if defined(__CUDACC__)
namespace order = cuda::std;
using SystemRef = cuda::atomic_ref<u64, cuda::thread_scope_system>;
using SideRef = cuda::atomic_ref<u64, cuda::thread_scope_device>;
#else
namespace order = std;
using SystemRef = std::atomic_ref<u64>;
using SideRef = std::atomic_ref<u64>;
#endif

PDC_RING_HD inline u64* word(unsigned char* base, u64 off) {
  return reinterpret_cast<u64*>(base + off);
}

// An index of the other side: acquire (ld.acquire.sys on the device).
PDC_RING_HD inline u64 load_shared(u64* p) {
  return SystemRef(*p).load(order::memory_order_acquire);
}

// Publish an index the other side polls: a release store (st.release.sys), so what
// this thread -- and, through the team's synchronisation, its team -- wrote or read
// before is ordered before it. One per batch; no full system fence.
PDC_RING_HD inline void store_shared(u64* p, u64 v) {
  SystemRef(*p).store(v, order::memory_order_release);
}

// Slot words and mirrored counters: whole words, no ordering (ld/st.relaxed.sys).
PDC_RING_HD inline u64 load_word(u64* p) {
  return SystemRef(*p).load(order::memory_order_relaxed);
}

PDC_RING_HD inline void store_word(u64* p, u64 v) {
  SystemRef(*p).store(v, order::memory_order_relaxed);
}

PDC_RING_HD inline u64 load_side(u64* p) {
  return SideRef(*p).load(order::memory_order_acquire);
}

PDC_RING_HD inline void store_side(u64* p, u64 v) {
  SideRef(*p).store(v, order::memory_order_release);
}

PDC_RING_HD inline bool cas_side(u64* p, u64 expected, u64 desired) {
  return SideRef(*p).compare_exchange_strong(expected, desired, order::memory_order_acq_rel,
                                             order::memory_order_acquire);
}

PDC_RING_HD inline void add_counter(u64* p, u64 v) {
  if (v != 0) SideRef(*p).fetch_add(v, order::memory_order_relaxed);
}

// max() among the threads of one side (std::atomic_ref has no fetch_max before C++26).
PDC_RING_HD inline void raise_to(u64* p, u64 v) {
  SideRef ref(*p);
  u64 cur = ref.load(order::memory_order_acquire);
  while (v > cur && !ref.compare_exchange_weak(cur, v, order::memory_order_acq_rel,
                                               order::memory_order_acquire)) {
  }
}

PDC_RING_HD inline u64 now_ns() {
#if defined(__CUDA_ARCH__)
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#elif defined(__CUDACC_RTC__)
  return 0;  // not reached: NVRTC builds device code only
#else
  return static_cast<u64>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                              std::chrono::steady_clock::now().time_since_epoch())
                              .count());
#endif
}

}  // namespace detail

// ---- teams --------------------------------------------------------------------

// One thread: the host's team, and a GPU thread working alone.
struct Solo {
  PDC_RING_HD unsigned rank() const { return 0; }
  PDC_RING_HD unsigned size() const { return 1; }
  PDC_RING_HD void sync() const {}
  PDC_RING_HD u64 broadcast(u64 v) const { return v; }
  // How many of the team's ranks, from rank 0 on, have `pred` true.
  PDC_RING_HD unsigned leading(bool pred) const { return pred ? 1u : 0u; }
};

#if defined(__CUDACC__)
// A whole warp; every lane calls with the same arguments. Device code only.
struct Warp {
  __device__ unsigned rank() const { return threadIdx.x & 31u; }
  __device__ unsigned size() const { return 32u; }
  __device__ void sync() const { __syncwarp(); }
  __device__ u64 broadcast(u64 v) const { return __shfl_sync(0xffffffffu, v, 0); }
  __device__ unsigned leading(bool pred) const {
    const unsigned misses = ~__ballot_sync(0xffffffffu, pred);
    return misses == 0 ? 32u : static_cast<unsigned>(__ffs(static_cast<int>(misses)) - 1);
  }
};
#endif

#if defined(__CUDA_ARCH__)
using Team = Warp;  // what a kernel gives a ring operation: the threads of one warp
constexpr unsigned kTeamSize = 32;
#else
using Team = Solo;
constexpr unsigned kTeamSize = 1;
#endif

// Polite waiting: spin briefly, then yield the CPU / __nanosleep with growing pauses.
struct Backoff {
  unsigned spins = 0;
  PDC_RING_HD void pause() {
#if defined(__CUDA_ARCH__)
    unsigned shift = spins < 5 ? spins : 5;
    __nanosleep(32u << shift);  // 32 ns .. 1 us
#elif !defined(__CUDACC_RTC__)
    if (spins >= 32) std::this_thread::yield();
#endif
    ++spins;
  }
};

// ---- seal (protocol 4.4) ------------------------------------------------------

constexpr u64 kK1 = 0x9E3779B97F4A7C15ULL;
constexpr u64 kK2 = 0xBF58476D1CE4E5B9ULL;
constexpr u64 kK3 = 0x94D049BB133111EBULL;

namespace detail {

PDC_RING_HD inline u64 mix(u64 h, u64 x) {
  h = (h ^ x) * kK2;
  return h ^ (h >> 32);
}

PDC_RING_HD inline u64 finish(u64 h) {
  h = (h ^ (h >> 29)) * kK3;
  return h ^ (h >> 32);
}

// Word `w` of a record of `rs` bytes at any address, zero-padded past its end.
PDC_RING_HD inline u64 record_word(const unsigned char* rec, u64 rs, u64 w) {
  const u64 at = 8 * w;
  const u64 n = rs - at < 8 ? rs - at : 8;
  if (n == 8 && (reinterpret_cast<u64>(rec + at) & 7) == 0)
    return *reinterpret_cast<const u64*>(rec + at);
  u64 x = 0;
  for (u64 b = 0; b < n; ++b) x |= static_cast<u64>(rec[at + b]) << (8 * b);
  return x;
}

// Store word `w` of a record into packed memory at any address (only its bytes).
PDC_RING_HD inline void put_record_word(unsigned char* rec, u64 rs, u64 w, u64 x) {
  const u64 at = 8 * w;
  const u64 n = rs - at < 8 ? rs - at : 8;
  if (n == 8 && (reinterpret_cast<u64>(rec + at) & 7) == 0) {
    *reinterpret_cast<u64*>(rec + at) = x;
    return;
  }
  for (u64 b = 0; b < n; ++b) rec[at + b] = static_cast<unsigned char>(x >> (8 * b));
}

}  // namespace detail

// The tag of position `pos` holding the `rs` record bytes at `record` (any memory).
PDC_RING_HD inline u64 ring_seal(u64 pos, const void* record, u64 rs) {
  const unsigned char* rec = static_cast<const unsigned char*>(record);
  u64 h = (pos + 1) * kK1;
  for (u64 w = 0; w * 8 < rs; ++w) h = detail::mix(h, detail::record_word(rec, rs, w));
  return detail::finish(h);
}

// ---- creating and attaching (protocol section 2) --------------------------------

PDC_RING_HD inline u64 slot_size_for(u64 record_size, bool crossing = false) {
  return (crossing ? kTagSize : 0) + ((record_size + 7) & ~7ULL);
}

PDC_RING_HD inline u64 ring_nbytes(u64 capacity, u64 record_size, bool crossing = false) {
  return kHeaderSize + capacity * slot_size_for(record_size, crossing);
}

// Write a fresh header: zero it (and a crossing ring's tags), fill the meta line,
// store the magic last (release).
PDC_RING_HD inline Status ring_init(void* buffer, u64 nbytes, u64 capacity, u64 record_size,
                                    u64 backpressure, u64 producer_side, u64 consumer_side) {
  unsigned char* base = static_cast<unsigned char*>(buffer);
  if (reinterpret_cast<u64>(base) & 7) return kMisaligned;
  if (capacity < 2 || (capacity & (capacity - 1))) return kBadCapacity;
  if (record_size < 1) return kBadSlotSize;
  if (backpressure > kDropNewest || producer_side > 1 || consumer_side > 1) return kBadMeta;
  const bool crossing = producer_side != consumer_side;
  if (nbytes < ring_nbytes(capacity, record_size, crossing)) return kTooShort;
  for (u64 off = 0; off < kHeaderSize; off += 8) *detail::word(base, off) = 0;
  const u64 slot_size = slot_size_for(record_size, crossing);
  if (crossing)  // a zero tag seals nothing
    for (u64 i = 0; i < capacity; ++i) *detail::word(base, kHeaderSize + i * slot_size) = 0;
  *detail::word(base, kOffVersion) = kVersion;
  *detail::word(base, kOffHeaderSize) = kHeaderSize;
  *detail::word(base, kOffCapacity) = capacity;
  *detail::word(base, kOffSlotSize) = slot_size;
  *detail::word(base, kOffRecordSize) = record_size;
  *detail::word(base, kOffBackpressure) = backpressure;
  *detail::word(base, kOffProducerSide) = producer_side;
  *detail::word(base, kOffConsumerSide) = consumer_side;
  *detail::word(base, kOffRecordOffset) = crossing ? kTagSize : 0;
  detail::store_shared(detail::word(base, kOffMagic), kMagic);
  return kOk;
}

// Validate an existing ring and set up `ring` for a party of `side`. A device party
// on a ring with a device producer or consumer passes its SideCounters (device
// memory); a host party passes nullptr.
PDC_RING_HD inline Status ring_attach(Ring* ring, void* buffer, u64 nbytes, u64 side,
                                      SideCounters* counters) {
  unsigned char* base = static_cast<unsigned char*>(buffer);
  if (reinterpret_cast<u64>(base) & 7) return kMisaligned;
  if (nbytes < kHeaderSize) return kTooShort;
  if (detail::load_shared(detail::word(base, kOffMagic)) != kMagic) return kBadMagic;
  if (*detail::word(base, kOffVersion) != kVersion) return kBadVersion;
  if (*detail::word(base, kOffHeaderSize) != kHeaderSize) return kBadHeaderSize;
  const u64 capacity = *detail::word(base, kOffCapacity);
  const u64 slot_size = *detail::word(base, kOffSlotSize);
  const u64 record_size = *detail::word(base, kOffRecordSize);
  const u64 backpressure = *detail::word(base, kOffBackpressure);
  const u64 producer_side = *detail::word(base, kOffProducerSide);
  const u64 consumer_side = *detail::word(base, kOffConsumerSide);
  const u64 record_offset = *detail::word(base, kOffRecordOffset);
  if (capacity < 2 || (capacity & (capacity - 1))) return kBadCapacity;
  if (backpressure > kDropNewest || producer_side > 1 || consumer_side > 1 || side > 1)
    return kBadMeta;
  const bool crossing = producer_side != consumer_side;
  if (record_offset != (crossing ? kTagSize : 0)) return kBadRecordOffset;
  if (record_size < 1 || slot_size != slot_size_for(record_size, crossing)) return kBadSlotSize;
  if (nbytes < kHeaderSize + capacity * slot_size) return kTooShort;
  const bool produces = producer_side == side;
  const bool consumes = consumer_side == side;
  if (side == kSideDevice && (produces || consumes) && counters == nullptr)
    return kNoSideCounters;
  ring->base = base;
  ring->capacity = capacity;
  ring->mask = capacity - 1;
  ring->slot_size = slot_size;
  ring->record_size = record_size;
  ring->record_offset = record_offset;
  ring->backpressure = backpressure;
  ring->producer_side = producer_side;
  ring->consumer_side = consumer_side;
  ring->side = side;
  ring->counters = side == kSideDevice ? counters : nullptr;
  ring->reserve = !produces ? nullptr
                  : side == kSideHost ? detail::word(base, kOffReserve)
                                      : &counters->reserve;
  ring->claim = !consumes ? nullptr
                : side == kSideHost ? detail::word(base, kOffClaim)
                                    : &counters->claim;
  return kOk;
}

PDC_RING_HD inline u64* ring_field(const Ring& r, u64 off) { return detail::word(r.base, off); }

// Shadow the header in a device side's own words (protocol 3.1). One thread,
// before the side's other threads start on the ring.
PDC_RING_HD inline void ring_init_side_counters(const Ring& r, SideCounters* c) {
  const u64 published = detail::load_shared(ring_field(r, kOffPublished));
  const u64 released = detail::load_shared(ring_field(r, kOffReleased));
  c->reserve = published;
  c->published = published;
  c->claim = released;
  c->released = released;
  c->released_seen = released;
  c->enqueued = *ring_field(r, kOffEnqueued);
  c->dropped_newest = *ring_field(r, kOffDroppedNewest);
  c->rejected = *ring_field(r, kOffRejected);
  c->high_water = *ring_field(r, kOffHighWater);
  c->dequeued = *ring_field(r, kOffDequeued);
  c->dropped_oldest = *ring_field(r, kOffDroppedOldest);
  c->drop_before = *ring_field(r, kOffDropBefore);
  c->mirrored_at = detail::now_ns();
}

// A device party's counters into the header, with plain stores: when `force`, or
// when the last mirror is older than kMirrorPeriodNs. A host party has nothing to
// mirror (its counters are the header's). Call from one thread.
PDC_RING_HD inline void ring_mirror_counters(const Ring& r, bool force) {
  SideCounters* c = r.counters;
  if (c == nullptr) return;
  const u64 now = detail::now_ns();
  if (!force && now - detail::load_side(&c->mirrored_at) < kMirrorPeriodNs) return;
  detail::store_side(&c->mirrored_at, now);
  if (r.producer_side == kSideDevice) {
    detail::store_word(ring_field(r, kOffPublished), detail::load_side(&c->published));
    detail::store_word(ring_field(r, kOffEnqueued), detail::load_side(&c->enqueued));
    detail::store_word(ring_field(r, kOffDroppedNewest), detail::load_side(&c->dropped_newest));
    detail::store_word(ring_field(r, kOffRejected), detail::load_side(&c->rejected));
    detail::store_word(ring_field(r, kOffHighWater), detail::load_side(&c->high_water));
  }
  if (r.consumer_side == kSideDevice) {
    detail::store_word(ring_field(r, kOffDequeued), detail::load_side(&c->dequeued));
    detail::store_word(ring_field(r, kOffDroppedOldest), detail::load_side(&c->dropped_oldest));
  }
}

// published - released, clamped to [0, capacity] (protocol 4.3).
PDC_RING_HD inline u64 ring_depth(const Ring& r) {
  const u64 released = detail::load_shared(ring_field(r, kOffReleased));
  const i64 d = static_cast<i64>(detail::load_shared(ring_field(r, kOffPublished)) - released);
  if (d < 0) return 0;
  return static_cast<u64>(d) > r.capacity ? r.capacity : static_cast<u64>(d);
}

// ---- produce and consume (protocol section 4) -----------------------------------
namespace detail {

PDC_RING_HD inline unsigned char* slot(const Ring& r, u64 pos) {
  return r.base + kHeaderSize + (pos & r.mask) * r.slot_size;
}

PDC_RING_HD inline u64* record_words(const Ring& r, u64 pos) {
  return reinterpret_cast<u64*>(slot(r, pos) + r.record_offset);
}

PDC_RING_HD inline u64 words_per_record(const Ring& r) { return (r.record_size + 7) / 8; }

// Whether the slot of `pos` holds its record, sealed (protocol 4.4): the tag and
// the words read whole, in any order.
PDC_RING_HD inline bool sealed(const Ring& r, u64 pos) {
  u64* words = record_words(r, pos);
  const u64 rs = r.record_size;
  u64 h = (pos + 1) * kK1;
  for (u64 w = 0; w * 8 < rs; ++w) {
    u64 x = load_word(words + w);
    if (rs - 8 * w < 8) x &= (1ULL << (8 * (rs - 8 * w))) - 1;  // padding counts as zero
    h = mix(h, x);
  }
  return load_word(reinterpret_cast<u64*>(slot(r, pos))) == finish(h);
}

// The team writes k records (packed at src) into the slots of pos .. pos+k-1:
// consecutive ranks write consecutive words, then each record's tag.
template <class T>
PDC_RING_HD void write_slots(const T& team, const Ring& r, u64 pos, u64 k,
                             const unsigned char* src) {
  const u64 rw = words_per_record(r);
  const u64 rs = r.record_size;
  for (u64 i = team.rank(); i < k * rw; i += team.size()) {
    const u64 rec = i / rw, w = i % rw;
    store_word(record_words(r, pos + rec) + w, record_word(src + rec * rs, rs, w));
  }
  if (r.record_offset != 0)
    for (u64 i = team.rank(); i < k; i += team.size())
      store_word(reinterpret_cast<u64*>(slot(r, pos + i)), ring_seal(pos + i, src + i * rs, rs));
}

template <class T>
PDC_RING_HD void read_slots(const T& team, const Ring& r, u64 pos, u64 k, unsigned char* dst) {
  const u64 rw = words_per_record(r);
  const u64 rs = r.record_size;
  for (u64 i = team.rank(); i < k * rw; i += team.size()) {
    const u64 rec = i / rw, w = i % rw;
    put_record_word(dst + rec * rs, rs, w, load_word(record_words(r, pos + rec) + w));
  }
}

// Publish r .. r+k-1 (one thread). A host producer publishes in reservation order
// with one release store; a device producer has published through the tags and
// only counts, in device memory.
PDC_RING_HD inline void publish(const Ring& r, u64 pos, u64 k, u64 seen) {
  // Signed: by the time of `seen`, other producers may have published and consumers
  // released past pos + k; that depth is someone else's observation.
  const i64 depth = static_cast<i64>(pos + k - seen);
  SideCounters* c = r.counters;
  if (c != nullptr && r.record_offset != 0) {  // a device producer of a crossing ring
    add_counter(&c->published, k);
    add_counter(&c->enqueued, k);
    if (depth > 0) raise_to(&c->high_water, static_cast<u64>(depth));
    return;
  }
  u64* published = ring_field(r, kOffPublished);
  Backoff wait;
  while (load_shared(published) != pos) wait.pause();
  store_shared(published, pos + k);
  add_counter(ring_field(r, kOffEnqueued), k);
  if (depth > 0) raise_to(ring_field(r, kOffHighWater), static_cast<u64>(depth));
}

// Release c .. c+k-1 in claim order (one thread), after the team's reads: one
// release store of the header's index per batch.
PDC_RING_HD inline void release(const Ring& r, u64 pos, u64 k) {
  u64* order_word = r.counters ? &r.counters->released : ring_field(r, kOffReleased);
  Backoff wait;
  while (load_side(order_word) != pos) wait.pause();
  store_shared(ring_field(r, kOffReleased), pos + k);
  if (r.counters) store_side(order_word, pos + k);  // passes the order on
}

PDC_RING_HD inline u64* producer_counter(const Ring& r, u64 off) {
  if (SideCounters* c = r.counters) {
    return off == kOffDroppedNewest ? &c->dropped_newest : &c->rejected;
  }
  return ring_field(r, off);
}

PDC_RING_HD inline u64* consumer_counter(const Ring& r, u64 off) {
  if (SideCounters* c = r.counters) return off == kOffDequeued ? &c->dequeued : &c->dropped_oldest;
  return ring_field(r, off);
}

// Raise drop_before (a producer across sides, one thread).
PDC_RING_HD inline void raise_drop_before(const Ring& r, u64 value) {
  if (SideCounters* c = r.counters) {
    raise_to(&c->drop_before, value);
    store_shared(ring_field(r, kOffDropBefore), load_side(&c->drop_before));
    return;
  }
  raise_to(ring_field(r, kOffDropBefore), value);
}

// The team claims up to n readable positions (crossing ring: sealed ones) plus the
// stale ones below drop_before ahead of them when `with_stale`; `stale_only` claims
// only stale ones. Returns how many, and their start in *start.
template <class T>
PDC_RING_HD u64 claim(const T& team, const Ring& r, u64 n, bool stale_only, u64* start) {
  for (;;) {
    u64 c = 0, limit = 0;
    if (team.rank() == 0) {
      c = load_side(r.claim);
      const u64 d = load_shared(ring_field(r, kOffDropBefore));
      const u64 stale = d > c ? (d - c < r.capacity ? d - c : r.capacity) : 0;
      limit = stale_only ? stale : n + stale;
      if (limit > r.capacity) limit = r.capacity;
    }
    c = team.broadcast(c);
    limit = team.broadcast(limit);
    u64 k = 0;
    if (r.record_offset != 0) {
      while (k < limit) {  // whole team: one slot per rank per step
        const u64 i = k + team.rank();
        const unsigned run = team.leading(i < limit && sealed(r, c + i));
        k += run;
        if (run < team.size()) break;
      }
    } else if (team.rank() == 0) {
      const i64 avail = static_cast<i64>(load_shared(ring_field(r, kOffPublished)) - c);
      k = avail <= 0 ? 0 : (limit < static_cast<u64>(avail) ? limit : static_cast<u64>(avail));
    }
    k = team.broadcast(k);
    if (k == 0) return 0;
    u64 won = 0;
    if (team.rank() == 0) won = cas_side(r.claim, c, c + k) ? 1 : 0;
    if (team.broadcast(won)) {
      *start = c;
      return k;
    }
  }
}

}  // namespace detail

// Place up to n records (packed, record_size bytes each) while there is room. No
// backpressure action and nothing counted for records that did not fit. Returns
// how many were placed. Only for a party of the producer side.
template <class T>
PDC_RING_HD u64 ring_try_push(const T& team, const Ring& r, const void* records, u64 n) {
  const unsigned char* src = static_cast<const unsigned char*>(records);
  u64* seen_word = r.counters ? &r.counters->released_seen : ring_field(r, kOffReleasedSeen);
  u64 placed = 0;
  while (placed < n) {
    u64 res = 0, k = 0, seen = 0;
    if (team.rank() == 0) {
      for (;;) {
        res = detail::load_side(r.reserve);
        seen = detail::load_side(seen_word);
        // Signed: with several producers `res` may be older than `seen`; the CAS fails.
        i64 room = static_cast<i64>(r.capacity) - static_cast<i64>(res - seen);
        if (room < static_cast<i64>(n - placed)) {  // short: read the consumer's index
          seen = detail::load_shared(ring_field(r, kOffReleased));
          detail::raise_to(seen_word, seen);
          room = static_cast<i64>(r.capacity) - static_cast<i64>(res - seen);
        }
        if (room <= 0) {
          k = 0;
          break;
        }
        k = n - placed < static_cast<u64>(room) ? n - placed : static_cast<u64>(room);
        if (detail::cas_side(r.reserve, res, res + k)) break;
      }
    }
    k = team.broadcast(k);
    if (k == 0) break;
    res = team.broadcast(res);
    detail::write_slots(team, r, res, k, src + placed * r.record_size);
    team.sync();
    if (team.rank() == 0) detail::publish(r, res, k, seen);
    placed += k;
  }
  if (team.rank() == 0) ring_mirror_counters(r, false);
  return placed;
}

PDC_RING_HD inline u64 ring_try_push(const Ring& r, const void* records, u64 n) {
  return ring_try_push(Solo{}, r, records, n);
}

// Discard up to n of the oldest published records as a consumer-side thread
// (claim, skip, release), counting them in dropped_oldest. Returns how many.
// Only for a party of the consumer side.
template <class T>
PDC_RING_HD u64 ring_evict(const T& team, const Ring& r, u64 n) {
  u64 c = 0;
  const u64 k = detail::claim(team, r, n, false, &c);
  if (k == 0) return 0;
  if (team.rank() == 0) {
    detail::release(r, c, k);
    detail::add_counter(detail::consumer_counter(r, kOffDroppedOldest), k);
  }
  return k;
}

PDC_RING_HD inline u64 ring_evict(const Ring& r, u64 n) { return ring_evict(Solo{}, r, n); }

// Produce n records under the ring's backpressure strategy (protocol section 6).
// Returns how many were written into the ring; every other record is counted:
//   BLOCK        waits for room, polling at most max_polls times, then counts the
//                rest in `rejected`;
//   REJECT       counts what did not fit in `rejected` at once;
//   DROP_NEWEST  counts what did not fit in `dropped_newest` at once;
//   DROP_OLDEST  same side: evicts the oldest records until all fit (a batch larger
//                than the ring keeps its last `capacity` records; the first ones are
//                counted in `dropped_oldest` unwritten);
//                across sides: raises the drop_before watermark and waits for the
//                consumer to skip, at most max_polls polls, then counts the rest in
//                `dropped_newest`.
template <class T>
PDC_RING_HD u64 ring_push(const T& team, const Ring& r, const void* records, u64 n,
                          u64 max_polls) {
  const unsigned char* src = static_cast<const unsigned char*>(records);
  const u64 rs = r.record_size;
  const bool lead = team.rank() == 0;
  u64 skipped = 0;
  const bool same_side = r.producer_side == r.consumer_side;
  if (r.backpressure == kDropOldest && same_side && n > r.capacity) {
    skipped = n - r.capacity;
    if (lead) detail::add_counter(detail::consumer_counter(r, kOffDroppedOldest), skipped);
  }
  const u64 todo = n - skipped;
  src += skipped * rs;
  u64 placed = ring_try_push(team, r, src, todo);
  Backoff wait;
  u64 polls = 0;
  while (placed < todo) {
    const u64 left = todo - placed;
    if (r.backpressure == kReject) {
      if (lead) detail::add_counter(detail::producer_counter(r, kOffRejected), left);
      break;
    }
    if (r.backpressure == kDropNewest) {
      if (lead) detail::add_counter(detail::producer_counter(r, kOffDroppedNewest), left);
      break;
    }
    if (r.backpressure == kDropOldest && same_side) {
      // Records still in flight (reserved, or claimed and not released) cannot be
      // evicted; wait for them.
      if (ring_evict(team, r, left) == 0) wait.pause();
    } else {
      if (polls == max_polls) {
        if (lead)
          detail::add_counter(detail::producer_counter(
                                  r, r.backpressure == kBlock ? kOffRejected : kOffDroppedNewest),
                              left);
        break;
      }
      ++polls;
      if (r.backpressure == kDropOldest && lead) {
        const u64 want = left < r.capacity ? left : r.capacity;
        const u64 res = detail::load_side(r.reserve);
        if (res + want > r.capacity) detail::raise_drop_before(r, res + want - r.capacity);
      }
      wait.pause();
    }
    placed += ring_try_push(team, r, src + placed * rs, left);
  }
  if (lead) ring_mirror_counters(r, false);
  return placed;
}

PDC_RING_HD inline u64 ring_push(const Ring& r, const void* records, u64 n, u64 max_polls) {
  return ring_push(Solo{}, r, records, n, max_polls);
}

// Consume up to max_n records into `out` (packed). Records below the drop_before
// watermark are skipped unread and counted in dropped_oldest. Returns how many
// were delivered; 0 means the ring was empty. Only for a party of the consumer side.
// A team claims, copies with all its ranks, then releases the batch once.
template <class T>
PDC_RING_HD u64 ring_pop(const T& team, const Ring& r, void* out, u64 max_n) {
  unsigned char* dst = static_cast<unsigned char*>(out);
  u64 delivered = 0;
  while (delivered < max_n) {
    u64 c = 0;
    const u64 k = detail::claim(team, r, max_n - delivered, false, &c);
    if (k == 0) break;
    u64 stale = 0;
    if (team.rank() == 0) {
      // drop_before only grows: at least the claim's stale positions are stale now,
      // so no more than max_n - delivered records are delivered.
      const u64 d = detail::load_shared(ring_field(r, kOffDropBefore));
      stale = d > c ? (d - c < k ? d - c : k) : 0;
    }
    stale = team.broadcast(stale);
    detail::read_slots(team, r, c + stale, k - stale, dst + delivered * r.record_size);
    team.sync();
    if (team.rank() == 0) {
      detail::release(r, c, k);
      detail::add_counter(detail::consumer_counter(r, kOffDroppedOldest), stale);
      detail::add_counter(detail::consumer_counter(r, kOffDequeued), k - stale);
    }
    delivered += k - stale;
  }
  if (team.rank() == 0) ring_mirror_counters(r, false);
  return delivered;
}

PDC_RING_HD inline u64 ring_pop(const Ring& r, void* out, u64 max_n) {
  return ring_pop(Solo{}, r, out, max_n);
}

// Discard, unread, the claimable records below the drop_before watermark and count
// them in dropped_oldest (protocol 6.3.2, step 2). A paused consumer calls this so
// that a DROP_OLDEST producer on the other side still finds room. Returns how many.
template <class T>
PDC_RING_HD u64 ring_discard_stale(const T& team, const Ring& r) {
  u64 discarded = 0;
  for (;;) {
    u64 c = 0;
    const u64 k = detail::claim(team, r, 0, true, &c);
    if (k == 0) break;
    if (team.rank() == 0) {
      detail::release(r, c, k);
      detail::add_counter(detail::consumer_counter(r, kOffDroppedOldest), k);
    }
    discarded += k;
  }
  if (team.rank() == 0) ring_mirror_counters(r, false);
  return discarded;
}

PDC_RING_HD inline u64 ring_discard_stale(const Ring& r) { return ring_discard_stale(Solo{}, r); }

}  // namespace ring
}  // namespace pdc
