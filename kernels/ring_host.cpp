// ring_host.cpp -- C entry points to ring.cuh built for the CPU, for callers that
// load a shared library (Python ctypes, the conformance tests):
//
//   g++ -std=c++20 -O2 -shared -fPIC ring_host.cpp -o libpdcring.so
//
// Each call attaches to the buffer afresh (validating its header), so the library
// keeps no state. `side` is the side this caller plays (0 host, 1 device); a caller
// playing the device side passes a pointer to its SideCounters (16 words, see
// pdc_ring_side_counters_words) and calls pdc_ring_mirror_counters to publish its
// counters into the header, as a device mirrors them on a period.
// Negative returns are -Status codes of ring.cuh, or kNotThisRole.
#include "ring.cuh"

using pdc::ring::Ring;
using pdc::ring::SideCounters;
using pdc::ring::u64;

namespace {

constexpr long long kNotThisRole = -100;  // e.g. a push by the consumer side

long long attach(Ring* r, void* buf, u64 nbytes, u64 side, void* counters) {
  return -static_cast<long long>(
      pdc::ring::ring_attach(r, buf, nbytes, side, static_cast<SideCounters*>(counters)));
}

}  // namespace

extern "C" {

u64 pdc_ring_side_counters_words() { return sizeof(SideCounters) / 8; }

u64 pdc_ring_seal(u64 pos, const void* record, u64 record_size) {
  return pdc::ring::ring_seal(pos, record, record_size);
}

int pdc_ring_init(void* buf, u64 nbytes, u64 capacity, u64 record_size, u64 backpressure,
                  u64 producer_side, u64 consumer_side) {
  return pdc::ring::ring_init(buf, nbytes, capacity, record_size, backpressure, producer_side,
                              consumer_side);
}

int pdc_ring_check(void* buf, u64 nbytes) {
  Ring r;
  SideCounters unused{};
  return pdc::ring::ring_attach(&r, buf, nbytes, pdc::ring::kSideHost, &unused);
}

void pdc_ring_init_side_counters(void* buf, u64 nbytes, u64 side, void* counters) {
  Ring r;
  if (attach(&r, buf, nbytes, side, counters) == 0)
    pdc::ring::ring_init_side_counters(r, static_cast<SideCounters*>(counters));
}

long long pdc_ring_mirror_counters(void* buf, u64 nbytes, u64 side, void* counters) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  pdc::ring::ring_mirror_counters(r, true);
  return 0;
}

long long pdc_ring_try_push(void* buf, u64 nbytes, u64 side, void* counters,
                            const void* records, u64 n) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.reserve == nullptr) return kNotThisRole;
  return static_cast<long long>(pdc::ring::ring_try_push(r, records, n));
}

long long pdc_ring_push(void* buf, u64 nbytes, u64 side, void* counters, const void* records,
                        u64 n, u64 max_polls) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.reserve == nullptr) return kNotThisRole;
  return static_cast<long long>(pdc::ring::ring_push(r, records, n, max_polls));
}

long long pdc_ring_pop(void* buf, u64 nbytes, u64 side, void* counters, void* out, u64 max_n) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.claim == nullptr) return kNotThisRole;
  return static_cast<long long>(pdc::ring::ring_pop(r, out, max_n));
}

long long pdc_ring_discard_stale(void* buf, u64 nbytes, u64 side, void* counters) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.claim == nullptr) return kNotThisRole;
  return static_cast<long long>(pdc::ring::ring_discard_stale(r));
}

long long pdc_ring_depth(void* buf, u64 nbytes) {
  Ring r;
  SideCounters unused{};
  if (long long err = attach(&r, buf, nbytes, pdc::ring::kSideHost, &unused)) return err;
  return static_cast<long long>(pdc::ring::ring_depth(r));
}

// Stream `count` records whose first 8 bytes are the u64 values first, first+1, ...
// (the rest of each record zero) under BLOCK, waiting as long as it takes. Runs
// without the caller's interpreter lock, so a test can consume concurrently.
long long pdc_ring_produce_sequence(void* buf, u64 nbytes, u64 side, void* counters, u64 first,
                                    u64 count, u64 batch) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.reserve == nullptr) return kNotThisRole;
  if (r.record_size < 8 || batch == 0 || batch > 4096) return -pdc::ring::kBadMeta;
  static thread_local unsigned char staging[4096 * 64];
  if (batch * r.record_size > sizeof(staging)) batch = sizeof(staging) / r.record_size;
  u64 sent = 0;
  while (sent < count) {
    const u64 k = count - sent < batch ? count - sent : batch;
    for (u64 i = 0; i < k * r.record_size; ++i) staging[i] = 0;
    for (u64 i = 0; i < k; ++i) {
      const u64 value = first + sent + i;
      std::memcpy(staging + i * r.record_size, &value, 8);
    }
    u64 done = 0;
    pdc::ring::Backoff wait;
    while (done < k) {
      const u64 got = pdc::ring::ring_try_push(r, staging + done * r.record_size, k - done);
      if (got == 0) wait.pause();
      done += got;
    }
    sent += k;
  }
  pdc::ring::ring_mirror_counters(r, true);
  return static_cast<long long>(sent);
}

// Consume `count` records and check that their first 8 bytes are first, first+1, ...
// Returns the number of records out of sequence (0 when all arrived in order).
long long pdc_ring_consume_sequence(void* buf, u64 nbytes, u64 side, void* counters, u64 first,
                                    u64 count) {
  Ring r;
  if (long long err = attach(&r, buf, nbytes, side, counters)) return err;
  if (r.claim == nullptr) return kNotThisRole;
  if (r.record_size < 8 || r.record_size > 64) return -pdc::ring::kBadMeta;
  unsigned char records[64 * 64];
  const u64 per_pop = sizeof(records) / r.record_size;
  u64 seen = 0;
  long long wrong = 0;
  pdc::ring::Backoff wait;
  while (seen < count) {
    const u64 want = count - seen < per_pop ? count - seen : per_pop;
    const u64 got = pdc::ring::ring_pop(r, records, want);
    if (got == 0) {
      wait.pause();
      continue;
    }
    wait = pdc::ring::Backoff{};
    for (u64 i = 0; i < got; ++i) {
      u64 value;
      std::memcpy(&value, records + i * r.record_size, 8);
      if (value != first + seen + i) ++wrong;
    }
    seen += got;
  }
  pdc::ring::ring_mirror_counters(r, true);
  return wrong;
}

}  // extern "C"
