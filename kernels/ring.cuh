// ring.cuh -- the pydotcompute ring protocol, version 1 (docs/ring-protocol.md), in C++.
//
// One header for three compilers:
//   * nvcc and NVRTC (CuPy RawModule): functions are __host__ __device__, atomics are
//     cuda::atomic_ref -- system scope on the indices host and device share, device
//     scope on counters only one side's threads write;
//   * a plain C++20 compiler (g++/clang++ -std=c++20): std::atomic_ref, so the same
//     protocol code is built for the CPU and tested against the Python rings.
//
// A party attaches to a ring buffer as one side (host or device). The producer side
// publishes, the consumer side releases; each side's threads coordinate among
// themselves through `reserve`/`claim`, which live in the header when that side is
// the host and in a SideCounters struct in device memory when it is the device.
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
constexpr u64 kVersion = 1;
constexpr u64 kLine = 128;
constexpr u64 kHeaderSize = 8 * kLine;

constexpr u64 kOffMagic = 0;
constexpr u64 kOffVersion = 8;
constexpr u64 kOffHeaderSize = 16;
constexpr u64 kOffCapacity = 24;
constexpr u64 kOffSlotSize = 32;
constexpr u64 kOffRecordSize = 40;
constexpr u64 kOffBackpressure = 48;
constexpr u64 kOffProducerSide = 56;
constexpr u64 kOffConsumerSide = 64;
constexpr u64 kOffPublished = 1 * kLine;
constexpr u64 kOffReserve = 2 * kLine;
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
};

// The reservation / claim counters of a device side, kept in device memory
// (protocol 3.1). Initialise with ring_init_side_counters before the first use.
struct SideCounters {
  u64 reserve;
  u64 claim;
};

// A party's view of one ring: the buffer, its meta fields, and where this party's
// side keeps `reserve` and `claim` (null when this party plays no such role).
struct Ring {
  unsigned char* base;
  u64 capacity;
  u64 mask;
  u64 slot_size;
  u64 record_size;
  u64 backpressure;
  u64 producer_side;
  u64 consumer_side;
  u64 side;
  u64* reserve;
  u64* claim;
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

// Publish an index the other side polls: everything written before becomes
// visible before the new value.
PDC_RING_HD inline void store_shared(u64* p, u64 v) {
#if defined(__CUDA_ARCH__)
  __threadfence_system();  // the slots live in memory the host reads
#endif
  SystemRef(*p).store(v, order::memory_order_release);
}

PDC_RING_HD inline u64 load_side(u64* p) {
  return SideRef(*p).load(order::memory_order_acquire);
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

PDC_RING_HD inline void copy_bytes(unsigned char* dst, const unsigned char* src, u64 n) {
#if defined(__CUDA_ARCH__)
  if (((reinterpret_cast<u64>(dst) | reinterpret_cast<u64>(src) | n) & 7) == 0) {
    for (u64 i = 0; i < n; i += 8)
      *reinterpret_cast<u64*>(dst + i) = *reinterpret_cast<const u64*>(src + i);
  } else {
    for (u64 i = 0; i < n; ++i) dst[i] = src[i];
  }
#else
  std::memcpy(dst, src, n);
#endif
}

}  // namespace detail

// Polite waiting: spin briefly, then yield the CPU / __nanosleep with growing pauses.
struct Backoff {
  unsigned spins = 0;
  PDC_RING_HD void pause() {
#if defined(__CUDA_ARCH__)
    unsigned shift = spins < 5 ? spins : 5;
    __nanosleep(32u << shift);  // 32 ns .. 1 us
#else
    if (spins >= 32) std::this_thread::yield();
#endif
    ++spins;
  }
};

// ---- creating and attaching (protocol section 2) --------------------------------

PDC_RING_HD inline u64 slot_size_for(u64 record_size) { return (record_size + 7) & ~7ULL; }

PDC_RING_HD inline u64 ring_nbytes(u64 capacity, u64 record_size) {
  return kHeaderSize + capacity * slot_size_for(record_size);
}

// Write a fresh header: zero it, fill the meta line, store the magic last (release).
PDC_RING_HD inline Status ring_init(void* buffer, u64 nbytes, u64 capacity, u64 record_size,
                                    u64 backpressure, u64 producer_side, u64 consumer_side) {
  unsigned char* base = static_cast<unsigned char*>(buffer);
  if (reinterpret_cast<u64>(base) & 7) return kMisaligned;
  if (capacity < 2 || (capacity & (capacity - 1))) return kBadCapacity;
  if (record_size < 1) return kBadSlotSize;
  if (backpressure > kDropNewest || producer_side > 1 || consumer_side > 1) return kBadMeta;
  if (nbytes < ring_nbytes(capacity, record_size)) return kTooShort;
  for (u64 off = 0; off < kHeaderSize; off += 8) *detail::word(base, off) = 0;
  *detail::word(base, kOffVersion) = kVersion;
  *detail::word(base, kOffHeaderSize) = kHeaderSize;
  *detail::word(base, kOffCapacity) = capacity;
  *detail::word(base, kOffSlotSize) = slot_size_for(record_size);
  *detail::word(base, kOffRecordSize) = record_size;
  *detail::word(base, kOffBackpressure) = backpressure;
  *detail::word(base, kOffProducerSide) = producer_side;
  *detail::word(base, kOffConsumerSide) = consumer_side;
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
  if (capacity < 2 || (capacity & (capacity - 1))) return kBadCapacity;
  if (record_size < 1 || slot_size < record_size || (slot_size & 7)) return kBadSlotSize;
  if (nbytes < kHeaderSize + capacity * slot_size) return kTooShort;
  if (backpressure > kDropNewest || producer_side > 1 || consumer_side > 1 || side > 1)
    return kBadMeta;
  const bool produces = producer_side == side;
  const bool consumes = consumer_side == side;
  if (side == kSideDevice && (produces || consumes) && counters == nullptr)
    return kNoSideCounters;
  ring->base = base;
  ring->capacity = capacity;
  ring->mask = capacity - 1;
  ring->slot_size = slot_size;
  ring->record_size = record_size;
  ring->backpressure = backpressure;
  ring->producer_side = producer_side;
  ring->consumer_side = consumer_side;
  ring->side = side;
  ring->reserve = !produces ? nullptr
                  : side == kSideHost ? detail::word(base, kOffReserve)
                                      : &counters->reserve;
  ring->claim = !consumes ? nullptr
                : side == kSideHost ? detail::word(base, kOffClaim)
                                    : &counters->claim;
  return kOk;
}

// Shadow the shared indices in a device side's own counters (protocol 3.1). One
// thread, before the side's other threads start on the ring.
PDC_RING_HD inline void ring_init_side_counters(const Ring& r, SideCounters* counters) {
  counters->reserve = detail::load_shared(detail::word(r.base, kOffPublished));
  counters->claim = detail::load_shared(detail::word(r.base, kOffReleased));
}

PDC_RING_HD inline u64* ring_field(const Ring& r, u64 off) { return detail::word(r.base, off); }

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

PDC_RING_HD inline void write_slots(const Ring& r, u64 pos, u64 k, const unsigned char* src) {
  for (u64 i = 0; i < k; ++i) copy_bytes(slot(r, pos + i), src + i * r.record_size, r.record_size);
}

PDC_RING_HD inline void read_slots(const Ring& r, u64 pos, u64 k, unsigned char* dst) {
  for (u64 i = 0; i < k; ++i) copy_bytes(dst + i * r.record_size, slot(r, pos + i), r.record_size);
}

// Producers publish in reservation order.
PDC_RING_HD inline void publish(const Ring& r, u64 pos, u64 k) {
  u64* published = ring_field(r, kOffPublished);
  Backoff wait;
  while (load_shared(published) != pos) wait.pause();
  store_shared(published, pos + k);
  add_counter(ring_field(r, kOffEnqueued), k);
  // Signed: by the time `released` is read, other producers may have published and
  // consumers released past pos + k; that depth is someone else's observation.
  const i64 depth = static_cast<i64>(pos + k - load_shared(ring_field(r, kOffReleased)));
  if (depth > 0) raise_to(ring_field(r, kOffHighWater), static_cast<u64>(depth));
}

// Consumers release in claim order.
PDC_RING_HD inline void release(const Ring& r, u64 pos, u64 k) {
  u64* released = ring_field(r, kOffReleased);
  Backoff wait;
  while (load_shared(released) != pos) wait.pause();
  store_shared(released, pos + k);
}

// Take up to n published positions; returns how many (0: empty) and their start.
PDC_RING_HD inline u64 claim(const Ring& r, u64 n, u64* start) {
  for (;;) {
    const u64 c = load_side(r.claim);
    const i64 avail = static_cast<i64>(load_shared(ring_field(r, kOffPublished)) - c);
    if (avail <= 0) return 0;
    const u64 k = n < static_cast<u64>(avail) ? n : static_cast<u64>(avail);
    if (cas_side(r.claim, c, c + k)) {
      *start = c;
      return k;
    }
  }
}

}  // namespace detail

// Place up to n records (packed, record_size bytes each) while there is room. No
// backpressure action and nothing counted for records that did not fit. Returns
// how many were placed. Only for a party of the producer side.
PDC_RING_HD inline u64 ring_try_push(const Ring& r, const void* records, u64 n) {
  const unsigned char* src = static_cast<const unsigned char*>(records);
  u64 placed = 0;
  while (placed < n) {
    const u64 res = detail::load_side(r.reserve);
    const u64 rel = detail::load_shared(ring_field(r, kOffReleased));
    // Signed: with several producers `res` may be older than `rel`; the CAS then fails.
    const i64 room = static_cast<i64>(r.capacity) - static_cast<i64>(res - rel);
    if (room <= 0) break;
    const u64 k = n - placed < static_cast<u64>(room) ? n - placed : static_cast<u64>(room);
    if (!detail::cas_side(r.reserve, res, res + k)) continue;
    detail::write_slots(r, res, k, src + placed * r.record_size);
    detail::publish(r, res, k);
    placed += k;
  }
  return placed;
}

// Discard up to n of the oldest published records as a consumer-side thread
// (claim, skip, release), counting them in dropped_oldest. Returns how many.
// Only for a party of the consumer side.
PDC_RING_HD inline u64 ring_evict(const Ring& r, u64 n) {
  u64 c = 0;
  const u64 k = detail::claim(r, n, &c);
  if (k == 0) return 0;
  detail::release(r, c, k);
  detail::add_counter(ring_field(r, kOffDroppedOldest), k);
  return k;
}

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
PDC_RING_HD inline u64 ring_push(const Ring& r, const void* records, u64 n, u64 max_polls) {
  const unsigned char* src = static_cast<const unsigned char*>(records);
  const u64 rs = r.record_size;
  u64 placed = 0;
  u64 skipped = 0;
  const bool same_side = r.producer_side == r.consumer_side;
  if (r.backpressure == kDropOldest && same_side && n > r.capacity) {
    skipped = n - r.capacity;
    detail::add_counter(ring_field(r, kOffDroppedOldest), skipped);
  }
  const u64 todo = n - skipped;
  src += skipped * rs;
  placed = ring_try_push(r, src, todo);
  Backoff wait;
  u64 polls = 0;
  while (placed < todo) {
    const u64 left = todo - placed;
    if (r.backpressure == kReject) {
      detail::add_counter(ring_field(r, kOffRejected), left);
      break;
    }
    if (r.backpressure == kDropNewest) {
      detail::add_counter(ring_field(r, kOffDroppedNewest), left);
      break;
    }
    if (r.backpressure == kDropOldest && same_side) {
      // Records still in flight (reserved, or claimed and not released) cannot be
      // evicted; wait for them.
      if (ring_evict(r, left) == 0) wait.pause();
    } else {
      if (polls == max_polls) {
        detail::add_counter(
            ring_field(r, r.backpressure == kBlock ? kOffRejected : kOffDroppedNewest), left);
        break;
      }
      ++polls;
      if (r.backpressure == kDropOldest) {
        const u64 want = left < r.capacity ? left : r.capacity;
        const u64 res = detail::load_side(r.reserve);
        if (res + want > r.capacity)
          detail::raise_to(ring_field(r, kOffDropBefore), res + want - r.capacity);
      }
      wait.pause();
    }
    placed += ring_try_push(r, src + placed * rs, left);
  }
  return placed;
}

// Consume up to max_n records into `out` (packed). Records below the drop_before
// watermark are skipped unread and counted in dropped_oldest. Returns how many
// were delivered; 0 means the ring was empty. Only for a party of the consumer side.
PDC_RING_HD inline u64 ring_pop(const Ring& r, void* out, u64 max_n) {
  unsigned char* dst = static_cast<unsigned char*>(out);
  u64 delivered = 0;
  while (delivered < max_n) {
    u64 c = 0;
    const u64 k = detail::claim(r, max_n - delivered, &c);
    if (k == 0) break;
    const u64 d = detail::load_shared(ring_field(r, kOffDropBefore));
    const u64 stale = d > c ? (d - c < k ? d - c : k) : 0;
    detail::read_slots(r, c + stale, k - stale, dst + delivered * r.record_size);
    detail::release(r, c, k);
    detail::add_counter(ring_field(r, kOffDroppedOldest), stale);
    detail::add_counter(ring_field(r, kOffDequeued), k - stale);
    delivered += k - stale;
  }
  return delivered;
}

// Discard, unread, the claimable records below the drop_before watermark and count
// them in dropped_oldest (protocol 6.3.2, step 2). A paused consumer calls this so
// that a DROP_OLDEST producer on the other side still finds room. Returns how many.
PDC_RING_HD inline u64 ring_discard_stale(const Ring& r) {
  u64 discarded = 0;
  for (;;) {
    const u64 c = detail::load_side(r.claim);
    const u64 d = detail::load_shared(ring_field(r, kOffDropBefore));
    const u64 t = detail::load_shared(ring_field(r, kOffPublished));
    const u64 end = d < t ? d : t;
    if (end <= c) return discarded;
    if (!detail::cas_side(r.claim, c, end)) continue;
    detail::release(r, c, end - c);
    detail::add_counter(ring_field(r, kOffDroppedOldest), end - c);
    discarded += end - c;
  }
}

}  // namespace ring
}  // namespace pdc
