// Per-message timestamps of the transport, kept in a bounded ring so tracing
// can stay on in long runs. Clock: CLOCK_MONOTONIC in ns, the clock of Python's
// time.monotonic_ns(), so events of all processes on one host share a time base.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

namespace afdkit::mesh {

enum class TraceKind : uint8_t {
  kEnqueue = 0,    // put called (or stream-ordered put queued)
  kPosted = 1,     // handed to the backend (ucp_put_nbx / cudaMemcpyAsync issued)
  kCompleted = 2,  // source buffer reusable (local completion)
  kDelivered = 3,  // the receiver saw the signal
  kConsumed = 4,   // the receiver released the data (marked by the caller)
};

struct TraceEvent {
  uint64_t tag;     // caller's message id (0: not traced); the AFD channel encodes direction/layer/microbatch/ranks
  int64_t t_ns;
  uint64_t nbytes;
  int32_t peer;     // the other end of the message
  TraceKind kind;
};

int64_t now_ns();

class Tracer {
 public:
  explicit Tracer(size_t capacity) : capacity_(capacity) {}
  bool enabled() const { return enabled_; }
  void set_enabled(bool on) { enabled_ = on; }
  void record(uint64_t tag, int peer, TraceKind kind, uint64_t nbytes, int64_t t_ns = 0);
  // Events in time order of recording; the ring keeps the newest `capacity` events.
  std::vector<TraceEvent> snapshot() const;
  void clear();
  uint64_t dropped() const { return dropped_; }

 private:
  mutable std::mutex mu_;
  std::vector<TraceEvent> ring_;
  size_t capacity_;
  size_t head_ = 0;  // next slot to overwrite once the ring is full
  uint64_t dropped_ = 0;
  volatile bool enabled_ = false;
};

}  // namespace afdkit::mesh
