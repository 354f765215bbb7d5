// stream_stats.cu -- a persistent ring kernel: running statistics of a stream of
// float64 values.
//
// Launched once (CuPy RawModule, NVRTC or nvcc), it polls a host->device input ring
// (docs/ring-protocol.md) of 8-byte records, each one IEEE float64, and keeps the
// running count, mean, variance (Welford/Chan), min and max of every value it has
// consumed, until the host asks it to terminate. Values go in with any ring
// producer on the host; the statistics come out through the control block.
//
// Signature (extern "C", so the name is not mangled):
//
//   pdc_stream_stats(unsigned char*           input,         // the ring buffer
//                    unsigned long long       input_nbytes,
//                    unsigned long long*      control,       // control block, below
//                    pdc::ring::SideCounters* side_counters) // 16 bytes of device memory
//
// Launch: grid (1, 1, 1) -- one resident block always fits, whatever the GPU --
// block (T, 1, 1) with T a power of two in [32, 512], no dynamic shared memory.
// `input` and `control` must be readable and writable by both host and device at
// the same address or through their device aliases: mapped pinned host memory
// (cudaHostAlloc; CuPy: cupy.cuda.alloc_pinned_memory, whose address is valid on
// the device under unified addressing). The ring must be created by the host with
// record_size 8, producer_side 0 (host) and consumer_side 1 (device).
// `side_counters` is the device side's own words for the ring (a 128-byte
// pdc::ring::SideCounters in device memory: its claim counter, its counters); the
// kernel initialises it from the ring itself. The ring's dequeued/dropped_oldest
// counters are mirrored into its header about once a millisecond and at exit.
//
// Control block: the one of every ring kernel (control.cuh, generated from
// pydotcompute.rings.control.ControlBlock): 8-byte little-endian words, one writer
// per 128-byte line. This kernel uses these words (pdc::control::k...):
//
//   State        written by the host: 0 = paused, 1 = active (consume), 2 = terminate.
//                Start with 0 or 1; write 2 and wait for Status 2 or 3.
//   Status       0 = not started, 1 = running (the results are valid from here on),
//                2 = exited, 3 = failed
//   ErrorCode    0, or why it failed: 1..9 = ring.cuh Status of ring_attach
//                (bad buffer), 100 = wrong ring sides or record size,
//                101 = block size not a power of two in [32, 512]
//   Heartbeat    incremented on every poll
//   Processed    values folded into the statistics
//   IdlePolls    polls that found the ring empty while active
//   Batches      non-empty polls
//   ResultsSeq   odd while the results are being rewritten; a reader reads it, the
//                results, then it again, and retries unless both reads are the same
//                even number
//   Results + 0  count (u64)
//           + 1  mean  (f64 bits)
//           + 2  m2    (f64 bits) sum of squared deviations: population variance
//                      = m2 / count, sample variance = m2 / (count - 1)
//           + 3  min   (f64 bits; +inf while count is 0)
//           + 4  max   (f64 bits; -inf while count is 0)
//
// Warp 0 takes the records: its lanes check the slots' tags and copy whole words
// together, lane 0 claims and releases each batch once. While paused the kernel
// still discards records below the ring's drop_before watermark (DROP_OLDEST
// across sides needs the consumer for that). While idle it backs off with
// __nanosleep (32 ns doubling to 1 us). A NaN value propagates into mean and m2
// (IEEE arithmetic); min and max skip it (fmin/fmax).
#include "control.cuh"
#include "ring.cuh"

namespace {

using pdc::ring::u64;

constexpr unsigned kMaxThreads = 512;

namespace ctl = pdc::control;
constexpr u64 kCommand = ctl::kState;
constexpr u64 kStatus = ctl::kStatus;
constexpr u64 kError = ctl::kErrorCode;
constexpr u64 kHeartbeat = ctl::kHeartbeat;
constexpr u64 kProcessed = ctl::kProcessed;
constexpr u64 kIdlePolls = ctl::kIdlePolls;
constexpr u64 kBatches = ctl::kBatches;
constexpr u64 kSeq = ctl::kResultsSeq;
constexpr u64 kCount = ctl::kResults + 0;
constexpr u64 kMean = ctl::kResults + 1;
constexpr u64 kM2 = ctl::kResults + 2;
constexpr u64 kMin = ctl::kResults + 3;
constexpr u64 kMax = ctl::kResults + 4;
static_assert(kMax < ctl::kWords, "the results fit in the control block");

constexpr u64 kCommandActive = ctl::kActive;
constexpr u64 kCommandTerminate = ctl::kTerminate;
constexpr u64 kStatusRunning = ctl::kStatusRunning;
constexpr u64 kStatusExited = ctl::kStatusExited;
constexpr u64 kStatusFailed = ctl::kStatusFailed;
constexpr u64 kErrorRingShape = 100;
constexpr u64 kErrorBlockSize = 101;

// Partial statistics of a set of values (Chan et al. pairwise update).
struct Moments {
  double count;
  double mean;
  double m2;
  double min;
  double max;
};

__device__ Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * (b.count / n),
                 a.m2 + b.m2 + delta * delta * (a.count * b.count / n), fmin(a.min, b.min),
                 fmax(a.max, b.max)};
}

__device__ void store_word(u64* control, u64 index, u64 value) {
  pdc::ring::detail::store_shared(control + index, value);
}

__device__ void publish_stats(u64* control, u64 seq, u64 count, const Moments& m) {
  // Sequence lock: odd while writing; the host retries a read that straddles it.
  // Every store is a release store, so no field can become visible before the odd
  // sequence number, nor the even one before the fields.
  store_word(control, kSeq, seq + 1);
  store_word(control, kCount, count);
  store_word(control, kMean, static_cast<u64>(__double_as_longlong(m.mean)));
  store_word(control, kM2, static_cast<u64>(__double_as_longlong(m.m2)));
  store_word(control, kMin, static_cast<u64>(__double_as_longlong(m.min)));
  store_word(control, kMax, static_cast<u64>(__double_as_longlong(m.max)));
  store_word(control, kSeq, seq + 2);
}

}  // namespace

extern "C" __global__ void pdc_stream_stats(unsigned char* input, unsigned long long input_nbytes,
                                            unsigned long long* control,
                                            pdc::ring::SideCounters* side_counters) {
  __shared__ double values[kMaxThreads];
  __shared__ Moments partial[kMaxThreads];
  __shared__ int action;  // <0: exit, 0: nothing this round, >0: values[0..action) to fold
  __shared__ pdc::ring::Ring ring;

  const unsigned tid = threadIdx.x;
  const unsigned threads = blockDim.x;
  // Running totals live in thread 0's registers; the host sees them through line 3.
  Moments total{0.0, 0.0, 0.0, __longlong_as_double(0x7FF0000000000000LL),
                __longlong_as_double(static_cast<long long>(0xFFF0000000000000ULL))};

  if (tid == 0) {
    u64 error = 0;
    if (threads < 32 || threads > kMaxThreads || (threads & (threads - 1))) {
      error = kErrorBlockSize;
    } else {
      const int status = pdc::ring::ring_attach(&ring, input, input_nbytes, pdc::ring::kSideDevice,
                                                side_counters);
      if (status != pdc::ring::kOk) {
        error = static_cast<u64>(status);
      } else if (ring.record_size != 8 || ring.producer_side != pdc::ring::kSideHost ||
                 ring.consumer_side != pdc::ring::kSideDevice) {
        error = kErrorRingShape;
      } else {
        pdc::ring::ring_init_side_counters(ring, side_counters);
      }
    }
    if (error != 0) {
      store_word(control, kError, error);
      store_word(control, kStatus, kStatusFailed);
      action = -1;
    } else {
      publish_stats(control, 0, 0, total);  // valid statistics before "running"
      store_word(control, kStatus, kStatusRunning);
      action = 0;
    }
  }
  __syncthreads();
  if (action < 0) return;

  u64 processed = 0, idle_polls = 0, batches = 0, heartbeat = 0, seq = 2;
  pdc::ring::Backoff idle;

  for (;;) {
    if (tid < pdc::ring::kTeamSize) {  // warp 0 moves the records; one thread on a CPU
      const pdc::ring::Team team;
      u64 command = 0;
      if (tid == 0) {
        store_word(control, kHeartbeat, ++heartbeat);
        command = pdc::ring::detail::load_shared(control + kCommand);
      }
      command = team.broadcast(command);
      int next = 0;
      if (command == kCommandTerminate) {
        next = -1;
      } else if (command == kCommandActive) {
        next = static_cast<int>(pdc::ring::ring_pop(team, ring, values, threads));
      } else {
        pdc::ring::ring_discard_stale(team, ring);
      }
      if (tid == 0) {
        if (next == 0 && command == kCommandActive) store_word(control, kIdlePolls, ++idle_polls);
        if (next == 0) {
          idle.pause();
        } else {
          idle = pdc::ring::Backoff{};
        }
        action = next;
      }
    }
    __syncthreads();
    const int n = action;
    if (n < 0) break;
    if (n > 0) {
      const double v = values[tid];
      partial[tid] = tid < static_cast<unsigned>(n) ? Moments{1.0, v, 0.0, v, v}
                                                    : Moments{0.0, 0.0, 0.0, 0.0, 0.0};
      __syncthreads();
      for (unsigned stride = threads / 2; stride > 0; stride /= 2) {
        if (tid < stride) partial[tid] = merge(partial[tid], partial[tid + stride]);
        __syncthreads();
      }
      if (tid == 0) {
        total = merge(total, partial[0]);
        processed += static_cast<u64>(n);
        publish_stats(control, seq, processed, total);
        seq += 2;
        store_word(control, kProcessed, processed);
        store_word(control, kBatches, ++batches);
      }
    }
    __syncthreads();  // `action` and `partial` are rewritten next round
  }

  if (tid == 0) {
    pdc::ring::ring_mirror_counters(ring, true);
    store_word(control, kStatus, kStatusExited);
  }
}
