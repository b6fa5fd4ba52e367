#include "mesh/trace.h"

#include <time.h>

namespace afdkit::mesh {

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

void Tracer::record(uint64_t tag, int peer, TraceKind kind, uint64_t nbytes, int64_t t_ns) {
  if (!enabled_ || capacity_ == 0 || tag == 0) return;  // tag 0: untraced (acks, control)
  TraceEvent e{tag, t_ns ? t_ns : now_ns(), nbytes, peer, kind};
  std::lock_guard<std::mutex> lock(mu_);
  if (ring_.size() < capacity_) {
    ring_.push_back(e);
    return;
  }
  ring_[head_] = e;
  head_ = (head_ + 1) % capacity_;
  ++dropped_;
}

std::vector<TraceEvent> Tracer::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TraceEvent> out;
  out.reserve(ring_.size());
  for (size_t i = 0; i < ring_.size(); ++i) out.push_back(ring_[(head_ + i) % ring_.size()]);
  return out;
}

void Tracer::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  ring_.clear();
  head_ = 0;
  dropped_ = 0;
}

}  // namespace afdkit::mesh
