// The mesh engine of one process: a UCX worker, registered memory, one endpoint
// per peer, one-sided put + signal, host and stream waits, and a progress thread.
//
// What it keeps from StepMesh and what it changes:
// - data moves by one-sided writes between registered buffers posted from the CPU
//   (UCX: RDMA verbs / shm / tcp; same-host GPUs: CUDA IPC on copy engines); no SM
//   moves data, and the signal is a sequence number written after the data;
// - failures raise (MeshTimeout / MeshPeerLost) instead of aborting; a lost peer is
//   reported to every other rank so their pending waits fail promptly;
// - no thread pinning, no per-request state that outlives the request, and a
//   progress thread that sleeps on the worker's event fd when idle.
//
// Threading: setup calls (register, add_peer, add_remote_region) happen before
// traffic, from one thread. put/wait/flush may be called from any thread. Every UCX
// call runs under one engine mutex (the worker is SERIALIZED); callers take priority
// over the progress thread, which steps aside while a caller waits for the lock --
// UCX's own MULTI-mode spinlock let a busy progress loop starve posting threads.
#pragma once
#include <cuda_runtime_api.h>
#include <ucp/api/ucp.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "mesh/mesh_errors.h"
#include "mesh/trace.h"

namespace afdkit::mesh {

enum class MemKind : int { kHost = 0, kCuda = 1 };

// What the control word of a rank says about it. A rank's control block holds one
// word per rank: (state | reporter << 8); 0 means alive.
enum class PeerState : uint64_t { kAlive = 0, kLost = 1, kLeft = 2, kAborted = 3 };

struct EngineOptions {
  int rank = 0;
  int world_size = 1;
  int device = -1;               // local CUDA device for IPC mappings and events; -1: none
  double keepalive_s = 1.0;      // UCX keepalive, and the liveness check of same-host peers
  // Host waits poll (driving the UCX worker themselves) while traffic is recent: until
  // `spin_us` passed without the word changing or the worker making progress; then they
  // sleep with a bounded backoff and the progress thread, which blocks on the UCX event fd
  // when idle, takes over. The progress thread also polls `spin_us` after its last activity.
  int spin_us = 50;
  int max_sleep_us = 200;        // cap of the adaptive backoff of host waits
  size_t trace_capacity = 1 << 16;
  std::vector<std::pair<std::string, std::string>> ucx_options;  // ucp_config_modify pairs, e.g. TLS=tcp
  // UCX error handling of endpoints: "peer" (UCX reports failures; needed across hosts),
  // "none" (same host only: shm transports lack peer-failure support in UCX; the engine's
  // own process check finds dead peers), or "auto" (peer, falling back to none for
  // same-host peers that no transport with failure handling reaches).
  std::string err_mode = "auto";
  // Over endpoints whose RMA UCX emulates with active messages (tcp), a put + signal of
  // up to this many bytes travels as ONE active message that the receiver's progress
  // writes (data, then the signal): one send instead of two, no remote-completion
  // messages. Past one tcp segment (256 KiB, see make_context) the reassembly costs more
  // than it saves. 0 disables it. Set through ucx_options {"AFDKIT_FUSED_MAX_BYTES": "N"}.
  size_t fused_max_bytes = 128 << 10;
  // Same-host peers whose regions UCX's shared-memory transports map into this process
  // (ucp_rkey_ptr: UCX-allocated host regions over posix/sysv): a put + signal of up to
  // this many bytes is a memcpy plus a release store of the signal from the caller's
  // thread -- no UCX call, no lock. Faster than UCX's cma at every size measured (1 MB:
  // 31 vs 105 us one-way, 8 MB: 611 vs 774 us on 2 cores), so no limit by default; the
  // caller's thread does the copy. 0 disables it. Set through ucx_options
  // {"AFDKIT_DIRECT_MAX_BYTES": "N"}.
  size_t direct_max_bytes = SIZE_MAX;
};

class Engine;

// What a UCX request carries to its completion callback; pooled by the engine. `word`
// is the source of signal/control writes and `hdr` the header of a fused message: both
// must outlive the request.
struct OpCtx {
  Engine* engine = nullptr;
  uint64_t tag = 0;
  int peer = -1;
  uint64_t nbytes = 0;
  bool traced = false;
  bool fused = false;
  uint64_t word = 0;
  uint64_t hdr[3] = {0, 0, 0};  // fused: data address, signal address, signal value
};

struct PutOp {
  const void* src = nullptr;
  size_t nbytes = 0;
  int peer = -1;
  int region = -1;  // remote region handle of `peer` (from add_remote_region)
  size_t offset = 0;
  int sig_region = -1;  // -1: no signal
  size_t sig_offset = 0;
  uint64_t sig_value = 0;
  uintptr_t stream = 0;  // the CUDA stream (0: the legacy default stream) when `ordered`
  bool ordered = false;  // false: post now from this thread; true: after `stream`'s prior work
  uint64_t tag = 0;      // trace id
  bool best_effort = false;  // skip silently when the peer already left (acknowledgements)
};

// One piece of a message: `nbytes` at `src` into the peer's data region at `offset`.
struct Segment {
  const void* src = nullptr;
  size_t nbytes = 0;
  size_t offset = 0;
};

// A whole message in one call: its segments, then 8-byte header words written into the
// data region (after the segments), then the signal -- the AFD channel's send of one
// (layer, microbatch) to one peer. With `credit_watch` >= 0 the stream first waits for
// the flag `credit_index` of that watch (the slot is free; see wait_flag).
struct MessageOp {
  int peer = -1;
  int region = -1;
  std::vector<Segment> segments;
  std::vector<std::pair<size_t, uint64_t>> words;  // (offset in `region`, value)
  int sig_region = -1;  // -1: no signal
  size_t sig_offset = 0;
  uint64_t sig_value = 0;
  uintptr_t stream = 0;
  bool ordered = false;
  uint64_t tag = 0;
  bool best_effort = false;
  int credit_watch = -1;
  int credit_index = 0;
  uint64_t credit_layer = 0;
  size_t total_bytes() const {
    size_t n = 0;
    for (const auto& s : segments) n += s.nbytes;
    return n;
  }
};

struct LocalRegion {
  void* ptr = nullptr;
  size_t nbytes = 0;
  MemKind kind = MemKind::kHost;
  int device = -1;
  ucp_mem_h memh = nullptr;
  std::string rkey;        // packed remote key
  std::string ipc;         // CUDA IPC handle of the allocation (GPU regions)
  size_t ipc_offset = 0;   // ptr - allocation base
};

struct RemoteRegion {
  uintptr_t addr = 0;
  size_t nbytes = 0;
  MemKind kind = MemKind::kHost;
  ucp_rkey_h rkey = nullptr;
  char* direct = nullptr;    // the peer's host memory mapped here by UCX (shm, ucp_rkey_ptr)
  char* ipc_ptr = nullptr;   // mapped peer memory (same host, GPU): the ipc backend
  void* ipc_base = nullptr;  // what cudaIpcCloseMemHandle takes
};

struct Peer {
  int rank = -1;
  std::string label;  // "rank 3 (ffn)" in messages
  ucp_ep_h ep = nullptr;
  int pid = 0;
  bool same_host = false;
  bool err_peer = true;  // endpoint created with UCP_ERR_HANDLING_MODE_PEER
  std::deque<RemoteRegion> regions;  // deque: stable addresses while setup appends
  int ctrl_region = -1;
  Engine* engine = nullptr;             // for the UCX error callback
  std::atomic<bool> notified{false};    // its loss was broadcast to the others
  std::atomic<int> error_status{0};     // the ucs_status_t UCX reported, if any
  // A same-host peer whose connection broke while its process still runs is only a
  // suspect: its departure notice may still be on its way (UCX may deliver the disconnect
  // first). check_liveness() calls it lost once its process ends or a grace time passes.
  std::atomic<int64_t> suspect_ns{0};
  std::atomic<int> suspect_status{0};
  // Fused messages (EngineOptions::fused_max_bytes) go to this peer; the requests to it
  // still in flight, RMA and fused (changed under the UCX mutex; the direct path reads
  // them without it).
  bool fused = false;
  std::atomic<int> rma_in_flight{0};
  std::atomic<int> fused_in_flight{0};
};

class Engine {
 public:
  explicit Engine(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // ---- setup ---------------------------------------------------------------
  std::string address() const { return address_; }
  int rank() const { return opt_.rank; }
  int world_size() const { return opt_.world_size; }
  // Registers caller-owned memory; returns the region id.
  int register_memory(void* ptr, size_t nbytes, MemKind kind, int device);
  // Host memory allocated by UCX (shared-memory transports write it directly); zeroed.
  // Lives until the engine is destroyed.
  int allocate_host(size_t nbytes);
  const LocalRegion& region(int id) const;
  int control_region() const { return ctrl_region_; }
  void add_peer(int rank, const std::string& label, const std::string& address, int pid, bool same_host);
  int add_remote_region(int peer, uintptr_t addr, size_t nbytes, MemKind kind, const std::string& rkey,
                        const std::string& ipc, size_t ipc_offset);
  void set_peer_control(int peer, int remote_region) { peer_ref(peer).ctrl_region = remote_region; }
  // "ipc" when puts to this remote region from a stream use CUDA IPC, else "ucx".
  std::string backend(int peer, int remote_region);
  // UCX's description of the endpoint to `peer` (ucp_ep_print_info: its lanes and what
  // each carries, e.g. "rma_bw" where puts are zero-copy), after one line naming the
  // error handling mode the engine chose for it.
  std::string endpoint_info(int peer);

  // ---- data path -----------------------------------------------------------
  void put(const PutOp& op);
  // put() of several segments plus header words and a signal, in one call.
  void put_message(const MessageOp& op);
  // Waits until every put of this process completed locally (sources reusable).
  void flush(double timeout_s);
  // Host-blocking: returns once *word >= value; raises MeshTimeout / MeshPeerLost.
  // `peer` (-1: any) names the writer for messages and for its liveness.
  // (`what` is a view: a caller's literal costs no allocation per wait.)
  void wait(const uint64_t* word, MemKind kind, uint64_t value, double timeout_s, int peer, std::string_view what,
            uint64_t tag = 0);
  // Stream-ordered: work queued on `stream` after this waits for *word >= value. A
  // watchdog of the progress thread honours `timeout_s`: past it (or once a peer is
  // lost) it releases the stream by storing `value` into the word and poisons the
  // engine, so that the next call (check_health, wait, put, flush) raises MeshTimeout
  // (or MeshPeerLost) naming what the stream waited for, instead of the GPU hanging.
  void wait_stream(const uint64_t* word, uint64_t value, uintptr_t stream, double timeout_s = 30.0,
                   int peer = -1, const std::string& what = "a stream-ordered signal");
  // ---- flag protocol (stream-ordered, CUDA-graph-safe; the AFD channel on GPUs) ----
  // A flag is a word in local device memory that one peer sets to 1 (data landed / slot
  // free) and this rank's stream resets to 0 after waiting for it. All operations are
  // constants on the stream (write-value / wait-value), so a captured graph replays them.
  // watch_flags registers `n` flags for the watchdog and allocates their `armed` words
  // (mapped host memory): wait_flag writes layer+1 there before waiting and 0 after, so
  // the progress thread sees, without any per-call registration, which stream waits on
  // which flag since when; past `timeout_s` (or once a peer is lost) it releases the
  // stream by storing kFlagReleased and poisons the engine like wait_stream's watchdog.
  static constexpr uint64_t kFlagReleased = 2;
  static constexpr unsigned kFusedAmId = 0x61f;  // active-message id of fused put + signal messages
  int watch_flags(uint64_t* flags, int n, const std::vector<int>& peers, const std::vector<std::string>& labels,
                  double timeout_s);
  void unwatch_flags(int id);
  // Stream: armed = layer + 1; wait flag >= 1; flag = 0; armed = 0.
  void wait_flag(int watch, int index, uint64_t layer, uintptr_t stream);
  // A non-blocking read of a signal word (acquire).
  uint64_t load(const uint64_t* word, MemKind kind) const;

  // ---- health --------------------------------------------------------------
  // Throws MeshPeerLost if `peer` (or, with peer == -1, any rank) was lost/aborted.
  void check_health(int peer, const std::string& what) const;
  // check_health's verdict without building a message: false where it would throw.
  bool healthy(int peer) const;
  int lost_count() const;  // peers known lost or aborted
  uint64_t peer_state(int rank) const;
  // Poisons the mesh: every rank's pending and future calls raise MeshPeerLost.
  void abort();
  // Tells the peers this rank leaves, flushes, closes endpoints, stops the thread.
  void close(double timeout_s);
  bool closed() const { return closed_; }

  Tracer& tracer() { return tracer_; }
  // Counters of the progress thread (loops, sleeps in epoll) and of host waits (futex sleeps).
  struct Stats {
    uint64_t loops, sleeps, wait_sleeps, outstanding;
  };
  Stats stats() const { return {stat_loops_.load(), stat_sleeps_.load(), stat_wait_sleeps_.load(),
                                static_cast<uint64_t>(outstanding_.load())}; }

  // Called by UCX callbacks (file-local trampolines).
  void on_ep_error(int peer, ucs_status_t status);
  void mark_lost(int peer, ucs_status_t status);  // marks and broadcasts a loss (once)
  void on_put_done(uint64_t tag, int peer, uint64_t nbytes, ucs_status_t status);
  // A request finished: accounting, then its context back to the pool (UCX mutex held).
  void on_request_done(OpCtx* ctx, ucs_status_t status);
  // A fused message arrived (progress under the UCX mutex): data, then the signal.
  ucs_status_t on_fused_message(const void* header, size_t header_length, const void* data, size_t length,
                                bool rndv);

 private:
  // Holds the UCX mutex; announces the caller so that the progress thread yields.
  class UcxLock {
   public:
    explicit UcxLock(Engine& e) : e_(e) {
      if (e_.ucx_mu_.try_lock()) return;  // uncontended: no announcement needed
      e_.ucx_waiting_.fetch_add(1);
      e_.ucx_mu_.lock();
      e_.ucx_waiting_.fetch_sub(1);
    }
    ~UcxLock() { e_.ucx_mu_.unlock(); }
    UcxLock(const UcxLock&) = delete;
    UcxLock& operator=(const UcxLock&) = delete;

   private:
    Engine& e_;
  };
  struct StreamPut {  // a UCX message that waits for the caller's stream to reach it
    cudaEvent_t event;
    MessageOp op;
    int device;  // the caller's device: the progress thread makes it current to post
  };
  struct StreamWait {  // a pending cuStreamWaitValue64, watched by the progress thread
    uint64_t* word;
    uint64_t value;
    int64_t start_ns, deadline_ns;
    int peer;
    int device;
    MemKind kind;
    std::string what;
  };
  struct FlagWatch {
    uint64_t* flags = nullptr;  // device words
    uint64_t* armed = nullptr;  // mapped host words (cudaHostAlloc), written by the streams
    uint64_t* armed_dev = nullptr;  // their device address
    int n = 0;
    int device = -1;
    double timeout_s = 30.0;
    std::vector<int> peers;
    std::vector<std::string> labels;
    std::vector<uint64_t> seen;     // the armed value last seen per flag
    std::vector<int64_t> since_ns;  // when it was first seen
  };
  Peer& peer_ref(int rank);
  FlagWatch& watch_ref(int id);
  void watch_flag_waits(int64_t now);
  const RemoteRegion& remote_ref(Peer& p, int region, size_t offset, size_t nbytes, const char* what);
  // *_locked: the caller holds the UCX mutex.
  using Words = std::vector<std::pair<size_t, uint64_t>>;
  void post_ucx_locked(const MessageOp& op);
  void post_locked(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                   size_t sig_offset, uint64_t sig_value, uint64_t tag);
  // Stores the message through the peer's mapped memory when every part of it can go
  // that way (see EngineOptions::direct_max_bytes); false: nothing was written.
  bool post_direct(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                   size_t sig_offset, uint64_t sig_value, uint64_t tag);
  // UcxLock + post_locked; a lost peer's error names the root cause where it can.
  void post_now(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                size_t sig_offset, uint64_t sig_value, uint64_t tag);
  // Sends one fused message (seg null: a signal only; sig null: data only); true while in flight.
  bool post_fused_locked(Peer& p, const RemoteRegion* data, const Segment* seg, const RemoteRegion* sig,
                         size_t sig_offset, uint64_t value, uint64_t tag);
  void drain_fused_locked(Peer& p);
  bool issue_put_locked(Peer& p, const void* src, size_t n, uintptr_t raddr, ucp_rkey_h rkey, OpCtx* ctx);
  OpCtx* take_ctx();
  bool host_range_registered(uintptr_t addr, size_t n) const;
  bool fused_transport(ucp_ep_h ep);
  void post_ipc(const MessageOp& op, Peer& p);
  void post_word_locked(Peer& p, const RemoteRegion& r, size_t offset, uint64_t value, uint64_t tag);
  void progress_loop();
  bool drain_stream_puts();
  // Checks pending stream waits: drops the satisfied ones, releases expired ones (and all
  // of them once a peer is lost). Returns true while some are pending.
  bool watch_stream_waits(int64_t now);
  void broadcast_state(int subject, PeerState state);
  void check_liveness();
  void wake();
  void unpark();  // ends the progress thread's step-aside (see progress_loop)
  void park(int timeout_us);
  void notify_waiters();
  void sleep_on_activity(uint32_t seen, int us);
  std::string describe_state(int subject) const;
  volatile uint64_t* ctrl_words() const;

  EngineOptions opt_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  std::deque<LocalRegion> regions_;
  std::vector<bool> owned_;  // allocated by UCX (ALLOCATE) vs caller-owned
  std::vector<std::unique_ptr<Peer>> peers_;
  int ctrl_region_ = -1;
  Tracer tracer_;

  std::mutex ucx_mu_;
  std::atomic<int> ucx_waiting_{0};
  std::mutex stream_mu_;
  std::deque<StreamPut> stream_puts_;
  std::atomic<int> stream_puts_pending_{0};  // stream_puts_.size(), readable without the lock
  std::atomic<int64_t> outstanding_{0};
  std::vector<OpCtx*> ctx_pool_;  // free request contexts (UCX mutex)
  // This rank's registered host ranges, readable without the UCX mutex (the direct path
  // takes only sources it knows are host memory: a CUDA pointer cannot be memcpy'd).
  static constexpr int kMaxHostRanges = 64;
  std::pair<uintptr_t, size_t> host_ranges_[kMaxHostRanges];
  std::atomic<int> n_host_ranges_{0};
  void add_host_range(const void* ptr, size_t nbytes);
  bool in_host_range(const void* ptr, size_t nbytes) const;
  std::atomic<int> pending_broadcasts_{0};
  std::atomic<uint64_t> posts_{0};  // bumped by callers before they check sleeping_
  // Bumped by the progress thread after it made progress; host waits sleep on it (futex)
  // so that data the progress thread lands (tcp, AM-emulated RMA) wakes them at once.
  alignas(64) std::atomic<uint32_t> activity_{0};
  std::atomic<int> waiters_{0};
  std::atomic<int> spinning_waiters_{0};  // waits that drive the worker themselves
  // While a wait spins, the progress thread parks on this futex word (no second thread
  // on the worker, no core taken from the spinner on a small host); wake() and a wait
  // that stops spinning with work left unpark it.
  alignas(64) std::atomic<uint32_t> park_word_{0};
  std::atomic<bool> parked_{false};
  std::atomic<uint64_t> stat_loops_{0}, stat_sleeps_{0}, stat_wait_sleeps_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> closed_{false};
  std::string progress_error_;  // a failure inside the progress thread, reported by waits
  std::mutex watch_mu_;
  std::vector<StreamWait> stream_waits_;
  std::atomic<int> n_stream_waits_{0};
  std::deque<FlagWatch> flag_watches_;  // deque: stable while the progress thread reads
  std::atomic<int> n_flag_watches_{0};
  int64_t last_flag_watch_ns_ = 0;
  int64_t last_watch_ns_ = 0;
  mutable std::mutex error_mu_;
  std::string stream_timeout_;  // sticky: a stream wait ran past its timeout (MeshTimeout)
  // Set (sticky) by the progress thread before its watchdogs first run: only then can
  // stream_timeout_ be set, so check_health skips its mutex until then.
  std::atomic<bool> watchdogs_ran_{false};
  int wake_fd_ = -1;
  int epoll_fd_ = -1;
  std::thread progress_;
};

std::string status_str(ucs_status_t s);

}  // namespace afdkit::mesh
