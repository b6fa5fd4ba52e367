// The flag protocol of stream-ordered, graph-capturable transfers and its watchdog.
//
// A CUDA graph replays constants: a stream wait captured once cannot register itself
// with a host watchdog each time it runs, and increasing sequence numbers cannot be
// captured either. So a flag is a 0/1 word (set to 1 by the peer, reset to 0 by the
// waiting stream), and every wait marks itself in an "armed" word of mapped host memory
// (layer + 1 while the stream waits, 0 after). The progress thread reads the armed words
// with plain loads every few milliseconds; an armed value that stays put past the
// timeout while its flag is still 0 is a hung wait: the watchdog stores kFlagReleased
// into the flag (the stream goes on), and poisons the engine so the next call raises.
#include <cstdio>

#include "common/errors.h"
#include "mesh/engine.h"
#include "mesh/gpu.h"

namespace afdkit::mesh {

Engine::FlagWatch& Engine::watch_ref(int id) {
  if (id < 0 || id >= static_cast<int>(flag_watches_.size()) || !flag_watches_[id].flags)
    AFDKIT_THROW(ValueError, "afdkit.mesh: unknown flag watch ", id);
  return flag_watches_[id];
}

int Engine::watch_flags(uint64_t* flags, int n, const std::vector<int>& peers, const std::vector<std::string>& labels,
                        double timeout_s) {
  if (closed_) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: the mesh of rank ", opt_.rank, " is closed");
  if (!flags || n <= 0 || static_cast<int>(peers.size()) != n || static_cast<int>(labels.size()) != n)
    AFDKIT_THROW(ValueError, "afdkit.mesh.watch_flags: need ", n, " flags with one peer and one label each (got ",
                 peers.size(), " peers, ", labels.size(), " labels)");
  const int device = gpu::device_of(flags);
  if (device < 0 || gpu::device_address(flags) != flags)
    AFDKIT_THROW(ValueError, "afdkit.mesh.watch_flags: flags must live in CUDA device memory");
  for (int p : peers) {
    if (p >= opt_.world_size || p == opt_.rank)
      AFDKIT_THROW(ValueError, "afdkit.mesh.watch_flags: bad peer rank ", p);
  }
  FlagWatch w;
  w.flags = flags;
  w.n = n;
  w.device = device;
  w.timeout_s = timeout_s > 0 ? timeout_s : 1e9;
  w.peers = peers;
  w.labels = labels;
  w.seen.assign(n, 0);
  w.since_ns.assign(n, 0);
  w.armed = gpu::alloc_mapped_words(static_cast<size_t>(n));
  try {
    w.armed_dev = gpu::device_address(w.armed);
  } catch (...) {
    gpu::free_mapped_words(w.armed);
    throw;
  }
  std::lock_guard<std::mutex> lock(watch_mu_);
  flag_watches_.push_back(std::move(w));
  n_flag_watches_.fetch_add(1);
  wake();
  return static_cast<int>(flag_watches_.size()) - 1;
}

void Engine::unwatch_flags(int id) {
  std::lock_guard<std::mutex> lock(watch_mu_);
  FlagWatch& w = watch_ref(id);
  // The armed words stay allocated until the engine goes: a stream may still write them.
  w.flags = nullptr;
  n_flag_watches_.fetch_sub(1);
}

void Engine::wait_flag(int watch, int index, uint64_t layer, uintptr_t stream) {
  if (closed_) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: rank ", opt_.rank, " waits on a closed mesh");
  FlagWatch& w = watch_ref(watch);
  if (index < 0 || index >= w.n)
    AFDKIT_THROW(ValueError, "afdkit.mesh.wait_flag: flag ", index, " outside the watch of ", w.n, " flags");
  check_health(w.peers[index], str_cat("stream wait for ", w.labels[index]));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  gpu::write_value_raw(s, w.armed_dev + index, layer + 1, false);
  gpu::wait_value_raw(s, w.flags + index, 1);
  gpu::write_value_raw(s, w.flags + index, 0, false);
  gpu::write_value_raw(s, w.armed_dev + index, 0, false);
}

void Engine::watch_flag_waits(int64_t now) {
  std::lock_guard<std::mutex> lock(watch_mu_);
  const bool lost = lost_count() > 0;
  std::string expired;
  for (auto& w : flag_watches_) {
    if (!w.flags) continue;
    const int64_t timeout_ns = static_cast<int64_t>(w.timeout_s * 1e9);
    for (int i = 0; i < w.n; ++i) {
      const uint64_t armed = __atomic_load_n(w.armed + i, __ATOMIC_ACQUIRE);
      if (armed == 0) {
        w.seen[i] = 0;
        continue;
      }
      if (armed != w.seen[i]) {  // a new wait (another layer): its clock starts now
        w.seen[i] = armed;
        w.since_ns[i] = now;
      }
      if (w.since_ns[i] < 0) continue;  // released already; the stream is on its way
      const bool peer_gone =
          lost || (w.peers[i] >= 0 && peer_state(w.peers[i]) != 0) || !progress_error_.empty();
      if (!peer_gone && now - w.since_ns[i] <= timeout_ns) continue;
      uint64_t cur = 0;
      try {
        cur = gpu::read_word(w.flags + i);
      } catch (const std::exception& e) {
        if (progress_error_.empty()) progress_error_ = str_cat("reading a watched flag: ", e.what());
      }
      if (cur >= 1) continue;  // it landed just now; the stream goes on by itself
      const bool released = gpu::store_word(w.flags + i, kFlagReleased);
      const int64_t waited = now - w.since_ns[i];
      w.since_ns[i] = -1;
      if (peer_gone || !expired.empty()) continue;  // check_health names the lost peer
      char secs[32];
      std::snprintf(secs, sizeof(secs), "%.3f", waited * 1e-9);
      const int peer = w.peers[i];
      expired = str_cat("a stream-ordered wait timed out after ", secs, " s waiting for ", w.labels[i],
                        " of layer ", armed - 1,
                        peer >= 0 && peers_[peer] ? str_cat(" from ", peers_[peer]->label) : std::string(),
                        "; the stream was ",
                        released ? "released and the data it guards is invalid" : "NOT released (store failed)",
                        "; the mesh is unusable");
    }
  }
  if (!expired.empty()) {
    std::lock_guard<std::mutex> elock(error_mu_);
    if (stream_timeout_.empty()) stream_timeout_ = expired;
  }
}

}  // namespace afdkit::mesh
