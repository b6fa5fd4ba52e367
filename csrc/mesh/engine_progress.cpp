// The progress thread, failure detection and propagation, waits, and shutdown.
#include <linux/futex.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "common/errors.h"
#include "mesh/engine.h"
#include "mesh/gpu.h"

namespace afdkit::mesh {
namespace {

constexpr int kFlagWatchPeriodMs = 2;
constexpr int64_t kFlagWatchPeriodNs = kFlagWatchPeriodMs * 1000000LL;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

void sleep_us(int us) {
  timespec ts{us / 1000000, (us % 1000000) * 1000L};
  nanosleep(&ts, nullptr);
}

// A process of this host that exited (or is a zombie nobody reaped yet) is lost:
// shared-memory transports have no connection whose break would tell UCX.
bool process_gone(int pid) {
  if (pid <= 0) return false;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return true;
  std::string line;
  std::getline(f, line);
  auto close_paren = line.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 >= line.size()) return false;
  char state = line[close_paren + 2];
  return state == 'Z' || state == 'X';
}

const char* state_name(uint64_t kind) {
  switch (static_cast<PeerState>(kind)) {
    case PeerState::kLost: return "was lost";
    case PeerState::kLeft: return "closed its mesh";
    case PeerState::kAborted: return "aborted the mesh";
    default: return "is alive";
  }
}

}  // namespace

volatile uint64_t* Engine::ctrl_words() const {
  return static_cast<volatile uint64_t*>(regions_[ctrl_region_].ptr);
}

void Engine::wake() {
  if (sleeping_.load()) {
    uint64_t one = 1;
    ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
    (void)ignored;
  }
  unpark();
}

void Engine::unpark() {
  if (parked_.load()) {
    park_word_.fetch_add(1);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&park_word_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }
}

void Engine::park(int timeout_us) {
  const uint32_t seen = park_word_.load();
  parked_.store(true);
  // Dekker-style with unpark(): a caller that bumped the word before `parked_` was
  // visible is seen here; one that comes later sees `parked_` and wakes the futex.
  if (spinning_waiters_.load() > 0 && park_word_.load() == seen) {
    timespec ts{timeout_us / 1000000, (timeout_us % 1000000) * 1000L};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&park_word_), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
  }
  parked_.store(false);
}

void Engine::notify_waiters() {
  activity_.fetch_add(1, std::memory_order_release);
  if (waiters_.load() > 0)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&activity_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

void Engine::sleep_on_activity(uint32_t seen, int us) {
  timespec ts{us / 1000000, (us % 1000000) * 1000L};
  waiters_.fetch_add(1);
  stat_wait_sleeps_.fetch_add(1, std::memory_order_relaxed);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&activity_), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
  waiters_.fetch_sub(1);
}

// ---- progress thread ------------------------------------------------------------

void Engine::progress_loop() {
  const int64_t spin_ns = static_cast<int64_t>(opt_.spin_us) * 1000;
  const int64_t liveness_ns = std::max<int64_t>(1000000, static_cast<int64_t>(opt_.keepalive_s * 1e9 / 2));
  // Keepalive runs inside ucp_worker_progress: wake up often enough for it.
  const int sleep_ms = std::clamp(static_cast<int>(opt_.keepalive_s * 1000 / 4), 1, 100);
  int64_t last_active = now_ns(), last_liveness = last_active, last_progress = last_active;
  while (!stop_.load()) {
    const uint64_t seen = posts_.load();
    stat_loops_.fetch_add(1, std::memory_order_relaxed);
    bool active = false;
    if (ucx_waiting_.load() > 0) {
      std::this_thread::yield();  // a caller wants the worker: let it post first
      continue;
    }
    // A host wait that spins drives the worker itself: step aside (no second core burnt
    // on the same worker, no lock ping-pong) unless stream-ordered puts wait for posting.
    // Parked, not polling: on a 2-core host a thread that wakes every few microseconds
    // preempts the spinning waiter of this or the peer process. The park ends when the
    // wait stops spinning, on wake(), or after 1 ms for the liveness check and watchdogs.
    if (spinning_waiters_.load() > 0 && pending_broadcasts_.load() == 0 && stream_puts_pending_.load() == 0) {
      park(n_stream_waits_.load() > 0 || n_flag_watches_.load() > 0 ? 500 : 1000);
      const int64_t t = now_ns();
      if (t - last_liveness > liveness_ns) {
        check_liveness();
        last_liveness = t;
      }
      if (n_stream_waits_.load() > 0 && t - last_watch_ns_ > 1000000) {
        last_watch_ns_ = t;
        watchdogs_ran_.store(true);
        watch_stream_waits(t);
      }
      if (n_flag_watches_.load() > 0 && t - last_flag_watch_ns_ > kFlagWatchPeriodNs) {
        last_flag_watch_ns_ = t;
        watchdogs_ran_.store(true);
        watch_flag_waits(t);
      }
      continue;
    }
    {
      UcxLock lock(*this);
      for (int i = 0; i < 64 && ucp_worker_progress(worker_) != 0; ++i) active = true;
    }
    int64_t now = now_ns();
    if (active) {
      notify_waiters();
      last_progress = now;
    }
    // Requests in flight need progress (tcp fragments): stay awake while they move.
    if (drain_stream_puts() || (outstanding_.load() > 0 && now - last_progress < 5000000)) active = true;
    if (pending_broadcasts_.load() > 0) {
      pending_broadcasts_.store(0);
      for (int r = 0; r < opt_.world_size; ++r) {
        if (r != opt_.rank && peers_[r] && peers_[r]->notified.load() && ctrl_words()[r] != 0 &&
            (ctrl_words()[r] & 0xff) == static_cast<uint64_t>(PeerState::kLost)) {
          broadcast_state(r, PeerState::kLost);
        }
      }
      active = true;
    }
    if (now - last_liveness > liveness_ns) {
      check_liveness();
      last_liveness = now;
    }
    if (n_stream_waits_.load() > 0 && now - last_watch_ns_ > 1000000) {  // at most every 1 ms
      last_watch_ns_ = now;
      watchdogs_ran_.store(true);
      watch_stream_waits(now);
    }
    if (n_flag_watches_.load() > 0 && now - last_flag_watch_ns_ > kFlagWatchPeriodNs) {
      last_flag_watch_ns_ = now;
      watchdogs_ran_.store(true);
      watch_flag_waits(now);
    }
    if (active) {
      last_active = now;
      continue;
    }
    // A spinning waiter progresses the worker itself: do not compete with it for a core.
    if (now - last_active < spin_ns && spinning_waiters_.load() == 0) {
      cpu_relax();
      continue;
    }
    // Dekker-style handshake with wake(): either we see the new post or the poster sees us asleep.
    sleeping_.store(true);
    ucs_status_t armed;
    {
      UcxLock lock(*this);
      armed = posts_.load() != seen ? UCS_ERR_BUSY : ucp_worker_arm(worker_);
    }
    if (armed != UCS_OK) {
      sleeping_.store(false);
      continue;
    }
    epoll_event evs[4];
    stat_sleeps_.fetch_add(1, std::memory_order_relaxed);
    // Watched flags are read from host memory: waking every few ms for them is cheap.
    epoll_wait(epoll_fd_, evs, 4, n_flag_watches_.load() > 0 ? std::min(sleep_ms, kFlagWatchPeriodMs) : sleep_ms);
    sleeping_.store(false);
    uint64_t drained;
    while (::read(wake_fd_, &drained, sizeof(drained)) > 0) {
    }
    last_active = now_ns();  // spin a little after a wakeup: more traffic usually follows
  }
}

bool Engine::drain_stream_puts() {
  std::unique_lock<std::mutex> lock(stream_mu_);
  if (stream_puts_.empty()) return false;
  while (!stream_puts_.empty()) {
    StreamPut& head = stream_puts_.front();
    bool done = true;
    try {
      // This thread has no CUDA device of its own: query and post in the caller's, or
      // the runtime would make a context on device 0 and UCX would copy from there.
      gpu::set_device(head.device);
      done = gpu::event_done(head.event);
    } catch (const std::exception& e) {
      progress_error_ = e.what();
    }
    if (!done) return true;  // FIFO: later puts stay behind this one
    StreamPut sp = std::move(head);
    stream_puts_.pop_front();
    stream_puts_pending_.store(static_cast<int>(stream_puts_.size()));
    lock.unlock();
    gpu::destroy_event(sp.event);
    try {
      UcxLock ucx(*this);
      if (progress_error_.empty() && peer_state(sp.op.peer) == 0) post_ucx_locked(sp.op);
    } catch (const std::exception& e) {
      progress_error_ = e.what();
    }
    lock.lock();
  }
  return true;
}

// ---- failures ---------------------------------------------------------------------

void Engine::on_ep_error(int peer, ucs_status_t status) {
  if (peer < 0 || peer >= opt_.world_size || !peers_[peer]) return;
  // A rank that is closing tears its own endpoints down: errors then say nothing of the peer.
  if (closed_.load()) return;
  Peer& p = *peers_[peer];
  if (p.same_host && !process_gone(p.pid)) {
    int64_t none = 0;
    if (p.suspect_ns.compare_exchange_strong(none, now_ns())) p.suspect_status.store(static_cast<int>(status));
    return;
  }
  mark_lost(peer, status);
}

void Engine::mark_lost(int peer, ucs_status_t status) {
  Peer& p = *peers_[peer];
  auto* word = reinterpret_cast<uint64_t*>(const_cast<uint64_t*>(ctrl_words()) + peer);
  uint64_t expected = 0;
  const uint64_t lost = static_cast<uint64_t>(PeerState::kLost) | (static_cast<uint64_t>(opt_.rank) << 8);
  // A peer that announced its leaving (or an abort) keeps that state: its closing is no crash.
  if (__atomic_compare_exchange_n(word, &expected, lost, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    p.error_status.store(static_cast<int>(status));
    if (!p.notified.exchange(true)) pending_broadcasts_.fetch_add(1);
  }
}

void Engine::broadcast_state(int subject, PeerState state) {
  const uint64_t value = static_cast<uint64_t>(state) | (static_cast<uint64_t>(opt_.rank) << 8);
  for (int r = 0; r < opt_.world_size; ++r) {
    if (r == opt_.rank || r == subject || !peers_[r] || peers_[r]->ctrl_region < 0) continue;
    if (ctrl_words()[r] != 0) continue;  // do not talk to the dead
    Peer& q = *peers_[r];
    try {
      UcxLock lock(*this);
      post_word_locked(q, q.regions[q.ctrl_region], static_cast<size_t>(subject) * 8, value, 0);
    } catch (const std::exception&) {
      // that peer is failing too; its own error callback reports it
    }
  }
}

void Engine::check_liveness() {
  if (closed_.load()) return;
  // Grace for a suspect (see Peer::suspect_ns): twice the keepalive, at least a second.
  const int64_t grace_ns = std::max<int64_t>(1000000000, static_cast<int64_t>(opt_.keepalive_s * 2e9));
  for (int r = 0; r < opt_.world_size; ++r) {
    if (!peers_[r] || !peers_[r]->same_host || ctrl_words()[r] != 0) continue;
    Peer& p = *peers_[r];
    const int64_t since = p.suspect_ns.load();
    const auto status = static_cast<ucs_status_t>(since ? p.suspect_status.load() : UCS_ERR_ENDPOINT_TIMEOUT);
    if (process_gone(p.pid) || (since && now_ns() - since > grace_ns)) mark_lost(r, status);
  }
}

uint64_t Engine::peer_state(int rank) const {
  if (rank < 0 || rank >= opt_.world_size) return 0;
  return __atomic_load_n(const_cast<uint64_t*>(ctrl_words()) + rank, __ATOMIC_ACQUIRE);
}

std::string Engine::describe_state(int subject) const {
  const uint64_t s = peer_state(subject);
  const int reporter = static_cast<int>(s >> 8);
  std::string who = subject == opt_.rank ? str_cat("rank ", subject, " (this rank)")
                    : peers_[subject]    ? peers_[subject]->label
                                         : str_cat("rank ", subject);
  std::string out = str_cat(who, " ", state_name(s & 0xff));
  if (reporter == opt_.rank && subject != opt_.rank && peers_[subject]) {
    int st = peers_[subject]->error_status.load();
    out += str_cat(" (detected by this rank, rank ", opt_.rank,
                   st ? str_cat(": ", ucs_status_string(static_cast<ucs_status_t>(st))) : std::string(), ")");
  } else if (reporter != subject) {
    out += str_cat(" (reported by rank ", reporter, ")");
  }
  return out;
}

bool Engine::healthy(int peer) const {
  for (int r = 0; r < opt_.world_size; ++r) {
    const uint64_t kind = peer_state(r) & 0xff;
    if (kind == static_cast<uint64_t>(PeerState::kLost) || kind == static_cast<uint64_t>(PeerState::kAborted))
      return false;
  }
  if (peer >= 0 && peer_state(peer) != 0) return false;
  if (watchdogs_ran_.load()) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (!stream_timeout_.empty()) return false;
  }
  return progress_error_.empty();
}

void Engine::check_health(int peer, const std::string& what) const {
  // Root causes (a crash, an abort) first, all of them: which one came first cannot be
  // told from here, and a peer that closed because of another's death is a consequence.
  std::string lost;
  for (int r = 0; r < opt_.world_size; ++r) {
    const uint64_t kind = peer_state(r) & 0xff;
    if (kind == static_cast<uint64_t>(PeerState::kLost) || kind == static_cast<uint64_t>(PeerState::kAborted))
      lost += (lost.empty() ? "" : "; ") + describe_state(r);
  }
  if (!lost.empty())
    AFDKIT_MESH_THROW(MeshPeerLost, "afdkit.mesh: rank ", opt_.rank, " ", what, ": ", lost, "; the mesh is unusable");
  if (peer >= 0 && peer_state(peer) != 0)
    AFDKIT_MESH_THROW(MeshPeerLost, "afdkit.mesh: rank ", opt_.rank, " ", what, ": ", describe_state(peer));
  if (watchdogs_ran_.load()) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (!stream_timeout_.empty())
      AFDKIT_MESH_THROW(MeshTimeout, "afdkit.mesh: rank ", opt_.rank, " ", what, ": ", stream_timeout_);
  }
  if (!progress_error_.empty())
    AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: rank ", opt_.rank, " ", what, ": the progress thread failed: ",
                 progress_error_);
}

void Engine::abort() {
  if (closed_) return;
  auto* word = reinterpret_cast<uint64_t*>(const_cast<uint64_t*>(ctrl_words()) + opt_.rank);
  __atomic_store_n(word, static_cast<uint64_t>(PeerState::kAborted) | (static_cast<uint64_t>(opt_.rank) << 8),
                   __ATOMIC_SEQ_CST);
  broadcast_state(opt_.rank, PeerState::kAborted);
}

// ---- waits --------------------------------------------------------------------------

uint64_t Engine::load(const uint64_t* word, MemKind kind) const {
  if (kind == MemKind::kCuda) return gpu::read_word(word);
  return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}

void Engine::wait(const uint64_t* word, MemKind kind, uint64_t value, double timeout_s, int peer,
                  std::string_view what, uint64_t tag) {
  const int64_t start = now_ns();
  const int64_t deadline = start + static_cast<int64_t>(timeout_s * 1e9);
  const int64_t spin_ns = static_cast<int64_t>(opt_.spin_us) * 1000;
  // (No sched_yield while polling: tried every 20 us after 20 us without an answer, it
  // cost a 1 MB shm message ~40 us on 2 cores -- the core went to another runnable thread
  // for a time slice.)
  int64_t last_active = start;
  int backoff_us = 1;
  // While spinning, the waiter drives the worker itself (data that the receiver's
  // progress lands, e.g. over tcp, arrives without a thread handoff); the progress
  // thread parks meanwhile.
  struct Spinning {
    Engine& e;
    bool on = true;
    explicit Spinning(Engine& engine) : e(engine) { e.spinning_waiters_.fetch_add(1); }
    // `hand_over`: the wait goes to sleep, so the progress thread must drive the worker
    // now; a wait that returns only hands over work still in flight (else the progress
    // thread resumes within its park timeout: no syscall on the fast path).
    void off(bool hand_over) {
      if (!on) return;
      on = false;
      if (e.spinning_waiters_.fetch_sub(1) == 1 &&
          (hand_over || e.outstanding_.load() > 0 || e.pending_broadcasts_.load() > 0))
        e.unpark();
    }
    ~Spinning() { off(false); }
  } spinning(*this);
  uint32_t seen = activity_.load(std::memory_order_acquire);
  uint64_t last_cur = load(word, kind);
  for (uint64_t iter = 0;; ++iter) {
    bool progressed = false;
    if (spinning.on) {
      // A burst of polls between clock reads: the word (plain loads for host words), and
      // every 4th poll the worker (data the transport lands, e.g. over tcp; a progress
      // call plus the mutex cost more than a poll, and shm data needs none).
      const bool host = kind == MemKind::kHost;
      for (int i = 0; i < 32; ++i) {
        if ((host ? __atomic_load_n(word, __ATOMIC_ACQUIRE) : load(word, kind)) >= value) break;
        if ((i & 3) == 0 && !closed_ && ucx_waiting_.load(std::memory_order_relaxed) == 0 && ucx_mu_.try_lock()) {
          if (worker_) progressed |= ucp_worker_progress(worker_) != 0;
          ucx_mu_.unlock();
        }
        cpu_relax();
      }
    }
    // The activity counter before the word: a landing after this load bumps the counter
    // past `act`, so the futex sleep below cannot miss it.
    const uint32_t act = activity_.load(std::memory_order_acquire);
    const uint64_t cur = load(word, kind);
    if (cur >= value) {
      tracer_.record(tag, peer, TraceKind::kDelivered, 0);
      return;
    }
    const int64_t now = now_ns();
    // Traffic is recent while this wait's progress, the progress thread or the writer
    // (the word moved) did something.
    if (progressed || act != seen || cur != last_cur) last_active = now;
    seen = act;
    last_cur = cur;
    if (!spinning.on || (iter & 3) == 0) {
      if (closed_)
        AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: rank ", opt_.rank, " waits for ", std::string(what),
                          " on a closed mesh");
      if (!healthy(peer)) {
        // A peer's last data and signal land before its departure notice (one endpoint,
        // in order), but both may land between the load above and this check (a waiter
        // preempted on a loaded host took the finished peer for a failure): look again;
        // the next pass of the loop finds the word and returns.
        if (load(word, kind) >= value) continue;
        check_health(peer, str_cat("waiting for ", std::string(what)));
      }
    }
    if (now > deadline) {
      char waited[32];
      std::snprintf(waited, sizeof(waited), "%.3f", (now - start) * 1e-9);
      AFDKIT_MESH_THROW(MeshTimeout, "afdkit.mesh: rank ", opt_.rank, " timed out after ", waited,
                   " s waiting for ", std::string(what),
                   peer >= 0 && peers_[peer] ? str_cat(" from ", peers_[peer]->label) : std::string(),
                   " (signal is ", cur, ", expected >= ", value, ")");
    }
    if (spinning.on && now - last_active < spin_ns) continue;
    spinning.off(true);
    // Bounded adaptive backoff: no core burns while a slow peer computes; the progress
    // thread cuts the sleep short when it lands data.
    sleep_on_activity(act, backoff_us);
    backoff_us = std::min(backoff_us * 2, std::max(1, opt_.max_sleep_us));
  }
}

void Engine::wait_stream(const uint64_t* word, uint64_t value, uintptr_t stream, double timeout_s, int peer,
                         const std::string& what) {
  if (closed_) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: rank ", opt_.rank, " waits for ", what, " on a closed mesh");
  check_health(peer, str_cat("stream wait for ", what));
  const int device = gpu::device_of(word);
  const MemKind kind = device >= 0 && gpu::device_address(word) == word ? MemKind::kCuda : MemKind::kHost;
  gpu::wait_value(reinterpret_cast<cudaStream_t>(stream), word, value);
  const int64_t now = now_ns();
  const double t = timeout_s > 0 ? std::min(timeout_s, 1e9) : 1e9;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    stream_waits_.push_back(StreamWait{const_cast<uint64_t*>(word), value, now, now + static_cast<int64_t>(t * 1e9),
                                       peer, device >= 0 ? device : gpu::current_device(), kind, what});
    n_stream_waits_.store(static_cast<int>(stream_waits_.size()));
  }
  wake();
}

bool Engine::watch_stream_waits(int64_t now) {
  std::vector<StreamWait> waits;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    waits.swap(stream_waits_);
  }
  std::vector<StreamWait> keep;
  std::string expired;
  const bool lost = lost_count() > 0;
  const uint64_t* last_word = nullptr;
  uint64_t last_value = 0;
  for (auto& w : waits) {
    uint64_t cur = 0;
    try {
      if (w.word == last_word) {
        cur = last_value;
      } else {
        cur = w.kind == MemKind::kCuda ? gpu::read_word(w.word) : __atomic_load_n(w.word, __ATOMIC_ACQUIRE);
        last_word = w.word;
        last_value = cur;
      }
    } catch (const std::exception& e) {
      cur = 0;
      if (progress_error_.empty()) progress_error_ = str_cat("reading the word of a stream wait: ", e.what());
    }
    if (cur >= w.value) continue;  // satisfied: the stream went on
    const bool peer_gone = lost || (w.peer >= 0 && peer_state(w.peer) != 0) || !progress_error_.empty();
    if (!peer_gone && now <= w.deadline_ns) {
      keep.push_back(std::move(w));
      continue;
    }
    // Release the GPU: the stream must not hang forever on a word nobody will write.
    bool released = false;
    if (w.kind == MemKind::kCuda) {
      released = gpu::store_word(w.word, w.value);
    } else {
      __atomic_store_n(w.word, w.value, __ATOMIC_RELEASE);
      released = true;
    }
    if (!peer_gone && expired.empty()) {
      char waited[32];
      std::snprintf(waited, sizeof(waited), "%.3f", (now - w.start_ns) * 1e-9);
      expired = str_cat("a stream-ordered wait timed out after ", waited, " s waiting for ", w.what,
                        w.peer >= 0 && peers_[w.peer] ? str_cat(" from ", peers_[w.peer]->label) : std::string(),
                        " (signal is ", cur, ", expected >= ", w.value, "); the stream was ",
                        released ? "released and the data it guards is invalid" : "NOT released (store failed)",
                        "; the mesh is unusable");
    }
  }
  if (!expired.empty()) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (stream_timeout_.empty()) stream_timeout_ = expired;
  }
  std::lock_guard<std::mutex> lock(watch_mu_);
  for (auto& w : keep) stream_waits_.push_back(std::move(w));
  n_stream_waits_.store(static_cast<int>(stream_waits_.size()));
  return !stream_waits_.empty();
}

void Engine::flush(double timeout_s) {
  const int64_t start = now_ns();
  const int64_t deadline = start + static_cast<int64_t>(timeout_s * 1e9);
  int backoff_us = 1;
  for (;;) {
    bool queued;
    {
      std::lock_guard<std::mutex> lock(stream_mu_);
      queued = !stream_puts_.empty();
    }
    if (!queued && outstanding_.load() <= 0) return;
    if (now_ns() > deadline)
      AFDKIT_MESH_THROW(MeshTimeout, "afdkit.mesh: rank ", opt_.rank, " flush timed out after ", timeout_s, " s with ",
                   outstanding_.load(), " puts in flight", queued ? " and stream-ordered puts queued" : "");
    wake();
    sleep_us(backoff_us);
    backoff_us = std::min(backoff_us * 2, 200);
  }
}

// ---- shutdown -------------------------------------------------------------------------

namespace {
struct FlushState {
  bool done = false;
};
void flush_cb(void* request, ucs_status_t, void* user_data) {
  static_cast<FlushState*>(user_data)->done = true;
  ucp_request_free(request);
}
}  // namespace

void Engine::close(double timeout_s) {
  if (closed_.exchange(true)) return;
  if (!worker_) return;
  // Pass on any loss this rank found before saying goodbye (peers should learn the cause),
  // then announce the departure so that peers do not take the disconnect for a crash.
  for (int r = 0; r < opt_.world_size; ++r) {
    if (r != opt_.rank && (peer_state(r) & 0xff) == static_cast<uint64_t>(PeerState::kLost) &&
        static_cast<int>(peer_state(r) >> 8) == opt_.rank)
      broadcast_state(r, PeerState::kLost);
  }
  if (peer_state(opt_.rank) == 0) broadcast_state(opt_.rank, PeerState::kLeft);
  try {
    flush(timeout_s);
  } catch (const std::exception&) {
  }
  // Remote completion of what we sent (the announcement included) before the sockets close,
  // to every peer not lost: one that announced its own leaving too, where the endpoint
  // handles errors (tcp). There a put is an active message that the receiver acknowledges,
  // and UCX (1.22) aborts a receiver whose acknowledgement meets a closed socket
  // ("ucp_request.inl:356 Fatal: unexpected error: Endpoint timeout"). Two ranks closing
  // at once used to skip the flush to each other (each had announced leaving), so one
  // could close before the other had acknowledged its announcement, and kill it.
  std::vector<std::unique_ptr<FlushState>> flushes;
  UcxLock lock(*this);
  for (auto& p : peers_) {
    if (!p || !p->ep) continue;
    const uint64_t state = peer_state(p->rank);
    if (state != 0 && (!p->err_peer || (state & 0xff) != static_cast<uint64_t>(PeerState::kLeft))) continue;
    auto st = std::make_unique<FlushState>();
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.send = flush_cb;
    prm.user_data = st.get();
    ucs_status_ptr_t r = ucp_ep_flush_nbx(p->ep, &prm);
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) flushes.push_back(std::move(st));
  }
  posts_.fetch_add(1);
  wake();
  ucx_mu_.unlock();  // the progress thread completes the flushes
  const int64_t deadline = now_ns() + static_cast<int64_t>(timeout_s * 1e9);
  for (auto& f : flushes) {
    while (!__atomic_load_n(&f->done, __ATOMIC_ACQUIRE) && now_ns() < deadline) sleep_us(50);
  }
  stop_.store(true);
  uint64_t one = 1;
  ssize_t ignored = ::write(wake_fd_, &one, sizeof(one));
  (void)ignored;
  if (progress_.joinable()) progress_.join();
  ucx_mu_.lock();  // released by `lock` at the end of this scope
  for (auto& f : flushes) {
    while (!f->done && now_ns() < deadline) ucp_worker_progress(worker_);
    if (!f->done) f.release();  // the callback may still run later: leak the flag, not a dangling pointer
  }
  for (auto& p : peers_) {
    if (!p) continue;
    for (auto& r : p->regions) {
      if (r.rkey) ucp_rkey_destroy(r.rkey);
      gpu::close_handle(r.ipc_base);
    }
    if (p->ep) {
      ucp_request_param_t prm{};
      prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      // FORCE: no handshake with a peer that may be gone (needs error mode PEER); an
      // endpoint without failure handling to a dead peer is left to ucp_worker_destroy.
      prm.flags = p->err_peer ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      if (!p->err_peer && peer_state(p->rank) != 0 &&
          (peer_state(p->rank) & 0xff) != static_cast<uint64_t>(PeerState::kLeft)) {
        p->ep = nullptr;
        continue;
      }
      ucs_status_ptr_t r = ucp_ep_close_nbx(p->ep, &prm);
      const int64_t ep_deadline = now_ns() + 100000000;  // 100 ms
      while (r != nullptr && !UCS_PTR_IS_ERR(r) && ucp_request_check_status(r) == UCS_INPROGRESS &&
             now_ns() < ep_deadline)
        ucp_worker_progress(worker_);
      if (r != nullptr && !UCS_PTR_IS_ERR(r)) ucp_request_free(r);
      p->ep = nullptr;
    }
  }
  ucp_worker_destroy(worker_);
  worker_ = nullptr;
}

}  // namespace afdkit::mesh
