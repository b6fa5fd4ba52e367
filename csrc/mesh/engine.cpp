// Engine setup, registration, peers and the put path. The progress thread, waits
// and shutdown are in engine_progress.cpp.
#include "mesh/engine.h"

#include <chrono>
#include <thread>

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <strings.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <ucs/config/global_opts.h>

#include "common/errors.h"
#include "mesh/gpu.h"
#include "mesh/ucx_info.h"

namespace afdkit::mesh {

std::string status_str(ucs_status_t s) { return ucs_status_string(s); }

namespace {

void request_done_cb(void* request, ucs_status_t status, void* user_data) {
  auto* ctx = static_cast<OpCtx*>(user_data);
  ctx->engine->on_request_done(ctx, status);
  ucp_request_free(request);
}

ucs_status_t fused_am_cb(void* arg, const void* header, size_t header_length, void* data, size_t length,
                         const ucp_am_recv_param_t* param) {
  return static_cast<Engine*>(arg)->on_fused_message(header, header_length, data, length,
                                                     (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0);
}

void ep_error_cb(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* p = static_cast<Peer*>(arg);
  p->engine->on_ep_error(p->rank, status);
}

void ucx_check(ucs_status_t s, const char* what) {
  if (s != UCS_OK) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: ", what, " failed: ", ucs_status_string(s));
}

// Whether UCX_<key> is set in the environment or in the engine's ucx_options.
bool user_sets_ucx_option(const EngineOptions& o, const std::string& key) {
  if (std::getenv(("UCX_" + key).c_str())) return true;
  for (const auto& kv : o.ucx_options)
    if (kv.first == key) return true;
  return false;
}

// Whether UCX_<key> is set (options win over the environment) to a value starting with `prefix`
// (case-insensitive), e.g. PROTO_ENABLE=n / no.
bool ucx_option_is(const EngineOptions& o, const std::string& key, const std::string& prefix) {
  const char* env = std::getenv(("UCX_" + key).c_str());
  std::string v = env ? env : "";
  for (const auto& kv : o.ucx_options)
    if (kv.first == key) v = kv.second;
  return !v.empty() && strncasecmp(v.c_str(), prefix.c_str(), prefix.size()) == 0;
}

ucp_context_h make_context(const EngineOptions& o) {
  ucp_config_t* cfg = nullptr;
  ucx_check(ucp_config_read(nullptr, nullptr, &cfg), "ucp_config_read");
  // Keepalive finds dead peers on transports without a connection to break (shm).
  char ka[32];
  std::snprintf(ka, sizeof(ka), "%dms", std::max(1, static_cast<int>(o.keepalive_s * 1000)));
  ucp_config_modify(cfg, "KEEPALIVE_INTERVAL", ka);
  // Fences per endpoint (UCX_FENCE_MODE=ep_based) unless the caller chose a mode: a
  // signal put then costs a weak fence where it shares a lane with the data before it
  // (tcp: one socket, in order) and a strong one (remote completion) only where it does
  // not (shm: bulk data on cma, the signal on posix). The default "auto" is strong
  // whenever UCX's new protocols are on, i.e. always: over tcp every signal waited a
  // whole round trip for the data's remote completion first (~3 one-way trips per message).
  if (!user_sets_ucx_option(o, "FENCE_MODE") && !ucx_option_is(o, "PROTO_ENABLE", "n"))
    ucp_config_modify(cfg, "FENCE_MODE", "ep_based");  // unknown to an old UCX: keep its default
  // tcp moves RMA with error handling (endpoints in mode PEER) as active messages of
  // one segment each: 8 KiB by default, one send() per 8 KiB. 256 KiB segments cut a
  // 256 KiB put from ~170 to ~55 us on loopback and carry a fused message of up to
  // 128 KiB in one piece; the buffers cost a few MiB per process.
  for (const char* key : {"TCP_TX_SEG_SIZE", "TCP_RX_SEG_SIZE"}) {
    if (!user_sets_ucx_option(o, key)) ucp_config_modify(cfg, key, "256K");
  }
  // No rendezvous (the engine's only active messages are eager: fused messages). With
  // rendezvous enabled, UCX gives endpoints with error handling (mode PEER) only
  // bandwidth lanes whose memory domain can invalidate remote access (select.c:
  // UCT_MD_FLAG_INVALIDATE_RMA), which tcp's cannot: their puts fell back to the
  // active-message emulation (a copy on each side, a reply per segment). Without it a
  // PEER endpoint gets tcp's zero-copy put, as one without error handling does: the
  // sender writes from the source, the receiver reads the socket into the destination.
  if (!user_sets_ucx_option(o, "RNDV_THRESH")) ucp_config_modify(cfg, "RNDV_THRESH", "inf");
  for (const auto& [k, v] : o.ucx_options) {
    if (k.rfind("AFDKIT_", 0) == 0) continue;  // engine settings (see Engine::Engine)
    if (ucp_config_modify(cfg, k.c_str(), v.c_str()) != UCS_OK) {
      ucp_config_release(cfg);
      AFDKIT_THROW(ValueError, "afdkit.mesh: UCX rejected option ", k, "=", v);
    }
  }
  ucp_params_t p{};
  p.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  p.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  p.mt_workers_shared = 0;
  ucp_context_h ctx = nullptr;
  ucs_status_t s = ucp_init(&p, cfg, &ctx);
  ucp_config_release(cfg);
  ucx_check(s, "ucp_init (check UCX_TLS / UCX_NET_DEVICES)");
  return ctx;
}

}  // namespace

Engine::Engine(const EngineOptions& options) : opt_(options), tracer_(options.trace_capacity) {
  if (opt_.err_mode != "auto" && opt_.err_mode != "peer" && opt_.err_mode != "none")
    AFDKIT_THROW(ValueError, "afdkit.mesh: err_mode must be 'auto', 'peer' or 'none', got '", opt_.err_mode, "'");
  if (opt_.world_size < 1 || opt_.rank < 0 || opt_.rank >= opt_.world_size)
    AFDKIT_THROW(ValueError, "afdkit.mesh: rank ", opt_.rank, " is outside world_size ", opt_.world_size);
  for (const auto& [k, v] : opt_.ucx_options) {  // engine settings that travel with the UCX options
    if (k == "AFDKIT_FUSED_MAX_BYTES") {
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 0)
        AFDKIT_THROW(ValueError, "afdkit.mesh: AFDKIT_FUSED_MAX_BYTES must be a byte count >= 0, got '", v, "'");
      opt_.fused_max_bytes = static_cast<size_t>(n);
    } else if (k == "AFDKIT_DIRECT_MAX_BYTES") {
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 0)
        AFDKIT_THROW(ValueError, "afdkit.mesh: AFDKIT_DIRECT_MAX_BYTES must be a byte count >= 0, got '", v, "'");
      opt_.direct_max_bytes = static_cast<size_t>(n);
    } else if (k.rfind("AFDKIT_", 0) == 0) {
      AFDKIT_THROW(ValueError, "afdkit.mesh: unknown engine option ", k);
    }
  }
  check_ucx_runtime();  // an older libucp than the headers we were built with misbehaves
  try {
    context_ = make_context(opt_);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // the engine's mutex serializes all calls
    ucx_check(ucp_worker_create(context_, &wp, &worker_), "ucp_worker_create");
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    ucx_check(ucp_worker_get_address(worker_, &addr, &len), "ucp_worker_get_address");
    address_.assign(reinterpret_cast<const char*>(addr), len);
    ucp_worker_release_address(worker_, addr);
    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = kFusedAmId;
    am.cb = fused_am_cb;
    am.arg = this;
    ucx_check(ucp_worker_set_am_recv_handler(worker_, &am), "ucp_worker_set_am_recv_handler");

    peers_.resize(opt_.world_size);
    ctrl_region_ = allocate_host(((opt_.world_size * 8 + 63) / 64) * 64);

    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    int worker_fd = -1;
    ucx_check(ucp_worker_get_efd(worker_, &worker_fd), "ucp_worker_get_efd");
    if (wake_fd_ < 0 || epoll_fd_ < 0) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: eventfd/epoll_create1 failed");
    for (int fd : {wake_fd_, worker_fd}) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: epoll_ctl failed");
    }
    progress_ = std::thread(&Engine::progress_loop, this);
  } catch (...) {
    for (auto& r : regions_) ucp_mem_unmap(context_, r.memh);
    if (worker_) ucp_worker_destroy(worker_);
    if (context_) ucp_cleanup(context_);
    if (wake_fd_ >= 0) ::close(wake_fd_);
    if (epoll_fd_ >= 0) ::close(epoll_fd_);
    throw;
  }
}

Engine::~Engine() {
  try {
    close(1.0);
  } catch (...) {
  }
  for (auto& r : regions_) {
    if (r.memh) ucp_mem_unmap(context_, r.memh);
  }
  for (auto& w : flag_watches_) gpu::free_mapped_words(w.armed);
  for (OpCtx* c : ctx_pool_) delete c;
  if (context_) ucp_cleanup(context_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

// ---- registration -----------------------------------------------------------

namespace {
std::string pack_rkey(ucp_context_h ctx, ucp_mem_h memh) {
  void* buf = nullptr;
  size_t size = 0;
  ucx_check(ucp_rkey_pack(ctx, memh, &buf, &size), "ucp_rkey_pack");
  std::string out(static_cast<const char*>(buf), size);
  ucp_rkey_buffer_release(buf);
  return out;
}
}  // namespace

int Engine::register_memory(void* ptr, size_t nbytes, MemKind kind, int device) {
  if (!ptr || nbytes == 0) AFDKIT_THROW(ValueError, "afdkit.mesh.register: empty buffer (ptr ", ptr, ", ", nbytes, " bytes)");
  LocalRegion r;
  r.ptr = ptr;
  r.nbytes = nbytes;
  r.kind = kind;
  r.device = device;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                  UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = ptr;
  mp.length = nbytes;
  mp.memory_type = kind == MemKind::kCuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  UcxLock lock(*this);
  ucx_check(ucp_mem_map(context_, &mp, &r.memh), "ucp_mem_map");
  try {
    r.rkey = pack_rkey(context_, r.memh);
    if (kind == MemKind::kCuda) {
      try {
        r.ipc = gpu::export_handle(ptr, &r.ipc_offset);
      } catch (const std::exception&) {
        r.ipc.clear();  // e.g. VMM-backed memory: no legacy IPC handle; peers use UCX
      }
    }
  } catch (...) {
    ucp_mem_unmap(context_, r.memh);
    throw;
  }
  if (kind == MemKind::kHost) add_host_range(r.ptr, r.nbytes);
  regions_.push_back(std::move(r));
  owned_.push_back(false);
  return static_cast<int>(regions_.size()) - 1;
}

int Engine::allocate_host(size_t nbytes) {
  if (nbytes == 0) AFDKIT_THROW(ValueError, "afdkit.mesh.alloc: nbytes must be positive");
  LocalRegion r;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                  UCP_MEM_MAP_PARAM_FIELD_FLAGS | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = nullptr;
  mp.length = nbytes;
  mp.flags = UCP_MEM_MAP_ALLOCATE;  // UCX picks memory its shm transports can map directly
  mp.memory_type = UCS_MEMORY_TYPE_HOST;
  UcxLock lock(*this);
  ucx_check(ucp_mem_map(context_, &mp, &r.memh), "ucp_mem_map(ALLOCATE)");
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  ucs_status_t s = ucp_mem_query(r.memh, &attr);
  if (s != UCS_OK || attr.length < nbytes) {
    ucp_mem_unmap(context_, r.memh);
    AFDKIT_MESH_THROW(MeshError, "afdkit.mesh.alloc: ucp_mem_query failed: ", ucs_status_string(s));
  }
  r.ptr = attr.address;
  r.nbytes = nbytes;
  std::memset(r.ptr, 0, nbytes);
  r.rkey = pack_rkey(context_, r.memh);
  add_host_range(r.ptr, r.nbytes);
  regions_.push_back(std::move(r));
  owned_.push_back(true);
  return static_cast<int>(regions_.size()) - 1;
}

void Engine::add_host_range(const void* ptr, size_t nbytes) {
  const int n = n_host_ranges_.load();
  if (n >= kMaxHostRanges) return;  // later regions just do not take the direct path
  host_ranges_[n] = {reinterpret_cast<uintptr_t>(ptr), nbytes};
  n_host_ranges_.store(n + 1, std::memory_order_release);
}

bool Engine::in_host_range(const void* ptr, size_t nbytes) const {
  const auto a = reinterpret_cast<uintptr_t>(ptr);
  const int n = n_host_ranges_.load(std::memory_order_acquire);
  for (int i = 0; i < n; ++i) {
    const auto& [base, len] = host_ranges_[i];
    if (a >= base && a - base <= len && nbytes <= len - (a - base)) return true;
  }
  return false;
}

const LocalRegion& Engine::region(int id) const {
  if (id < 0 || id >= static_cast<int>(regions_.size()))
    AFDKIT_THROW(ValueError, "afdkit.mesh: unknown local region id ", id);
  return regions_[id];
}

// ---- peers --------------------------------------------------------------------

Peer& Engine::peer_ref(int rank) {
  if (rank < 0 || rank >= opt_.world_size || !peers_[rank])
    AFDKIT_THROW(ValueError, "afdkit.mesh: rank ", rank, " is not a connected peer of rank ", opt_.rank,
                 " (world_size ", opt_.world_size, ")");
  return *peers_[rank];
}

void Engine::add_peer(int rank, const std::string& label, const std::string& address, int pid, bool same_host) {
  if (rank < 0 || rank >= opt_.world_size || rank == opt_.rank)
    AFDKIT_THROW(ValueError, "afdkit.mesh.add_peer: bad peer rank ", rank);
  if (peers_[rank]) AFDKIT_THROW(ValueError, "afdkit.mesh.add_peer: rank ", rank, " is already connected");
  auto p = std::make_unique<Peer>();
  p->rank = rank;
  p->label = label;
  p->pid = pid;
  p->same_host = same_host;
  p->engine = this;
  const bool try_peer = opt_.err_mode != "none" || !same_host;
  UcxLock lock(*this);
  ucs_status_t s = UCS_ERR_UNREACHABLE;
  for (bool err_peer : {true, false}) {
    if (err_peer && !try_peer) continue;
    if (!err_peer && (!same_host || opt_.err_mode == "peer")) break;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    // PEER: errors reach our callback instead of aborting the process.
    ep.err_mode = err_peer ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (err_peer) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = ep_error_cb;
      ep.err_handler.arg = p.get();
    }
    // A same-host attempt that may fall back would make UCX log an error for shm
    // transports without peer-failure support: quiet the log for that attempt only.
    char level[32] = "";
    const bool quiet = err_peer && same_host && opt_.err_mode == "auto" &&
                       ucs_global_opts_get_value("LOG_LEVEL", level, sizeof(level)) == UCS_OK;
    if (quiet) ucs_global_opts_set_value("LOG_LEVEL", "fatal");
    s = ucp_ep_create(worker_, &ep, &p->ep);
    if (quiet) ucs_global_opts_set_value("LOG_LEVEL", level);
    p->err_peer = err_peer;
    if (s == UCS_OK) break;
  }
  if (s != UCS_OK)
    AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: cannot create an endpoint to ", label, ": ", ucs_status_string(s),
                      " (UCX_TLS / UCX_NET_DEVICES leave no usable transport?)");
  p->fused = opt_.fused_max_bytes > 0 && fused_transport(p->ep);
  peers_[rank] = std::move(p);
  wake();  // wireup messages need progress
}

int Engine::add_remote_region(int peer, uintptr_t addr, size_t nbytes, MemKind kind, const std::string& rkey,
                              const std::string& ipc, size_t ipc_offset) {
  Peer& p = peer_ref(peer);
  RemoteRegion r;
  r.addr = addr;
  r.nbytes = nbytes;
  r.kind = kind;
  ucs_status_t s;
  {
    UcxLock lock(*this);
    s = ucp_ep_rkey_unpack(p.ep, rkey.data(), &r.rkey);
    void* mapped = nullptr;
    if (s == UCS_OK && kind == MemKind::kHost && p.same_host && opt_.direct_max_bytes > 0 &&
        ucp_rkey_ptr(r.rkey, addr, &mapped) == UCS_OK)
      r.direct = static_cast<char*>(mapped);  // else: no shm transport maps it (tcp, cma only, user memory)
  }
  if (s != UCS_OK)
    AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: cannot unpack a remote key of ", p.label, ": ", ucs_status_string(s),
                 " (no common transport for this memory type?)");
  // Same-host GPU memory: map it for the copy-engine path; UCX stays the fallback.
  if (kind == MemKind::kCuda && !ipc.empty() && p.same_host && opt_.device >= 0) {
    try {
      r.ipc_base = gpu::open_handle(ipc, opt_.device);
      r.ipc_ptr = static_cast<char*>(r.ipc_base) + ipc_offset;
    } catch (const std::exception&) {
      r.ipc_base = nullptr;  // e.g. no peer access between these GPUs: UCX cuda_ipc/cuda_copy instead
    }
  }
  p.regions.push_back(r);
  return static_cast<int>(p.regions.size()) - 1;
}

std::string Engine::backend(int peer, int remote_region) {
  Peer& p = peer_ref(peer);
  if (remote_region < 0 || remote_region >= static_cast<int>(p.regions.size()))
    AFDKIT_THROW(ValueError, "afdkit.mesh: unknown remote region ", remote_region, " of ", p.label);
  return p.regions[remote_region].ipc_ptr ? "ipc" : "ucx";
}

std::string Engine::endpoint_info(int peer) {
  Peer& p = peer_ref(peer);
  std::string out = std::string("# afdkit.mesh endpoint to ") + p.label + ": err_mode " + (p.err_peer ? "peer" : "none") +
                    (p.fused ? ", fused messages" : "") + "\n";
  char* text = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&text, &len);
  if (!f) return out;
  {
    UcxLock lock(*this);
    ucp_ep_print_info(p.ep, f);
  }
  std::fclose(f);
  out.append(text, len);
  std::free(text);
  return out;
}

// ---- put ------------------------------------------------------------------------

const RemoteRegion& Engine::remote_ref(Peer& p, int region, size_t offset, size_t nbytes, const char* what) {
  if (region < 0 || region >= static_cast<int>(p.regions.size()))
    AFDKIT_THROW(ValueError, "afdkit.mesh.put: unknown ", what, " region ", region, " of ", p.label);
  const RemoteRegion& r = p.regions[region];
  if (offset > r.nbytes || nbytes > r.nbytes - offset)
    AFDKIT_THROW(ValueError, "afdkit.mesh.put: ", what, " bytes [", offset, ", ", offset + nbytes,
                 ") overflow the remote region of ", r.nbytes, " bytes at ", p.label);
  return r;
}

void Engine::put(const PutOp& op) {
  if (op.ordered) {  // stream-ordered: the message path (IPC, or posted by the progress thread)
    MessageOp m;
    m.peer = op.peer;
    m.region = op.region;
    m.segments.push_back(Segment{op.src, op.nbytes, op.offset});
    m.sig_region = op.sig_region;
    m.sig_offset = op.sig_offset;
    m.sig_value = op.sig_value;
    m.stream = op.stream;
    m.ordered = op.ordered;
    m.tag = op.tag;
    m.best_effort = op.best_effort;
    put_message(m);
    return;
  }
  // Posted now: the same checks as put_message without building a message (no heap
  // allocation on the small-message path).
  if (closed_) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh.put: the mesh of rank ", opt_.rank, " is closed");
  Peer& p = peer_ref(op.peer);
  remote_ref(p, op.region, op.offset, op.nbytes, "data");
  if (op.sig_region >= 0) {
    remote_ref(p, op.sig_region, op.sig_offset, 8, "signal");
    if (op.sig_offset % 8 != 0) AFDKIT_THROW(ValueError, "afdkit.mesh.put: signal offset must be 8-byte aligned");
  }
  if (op.best_effort && peer_state(op.peer) != 0) return;
  if (!healthy(op.peer)) check_health(op.peer, "put");
  tracer_.record(op.tag, op.peer, TraceKind::kEnqueue, op.nbytes);
  static const Words kNoWords;
  const Segment seg{op.src, op.nbytes, op.offset};
  post_now(p, op.region, &seg, 1, kNoWords, op.sig_region, op.sig_offset, op.sig_value, op.tag);
}

void Engine::put_message(const MessageOp& op) {
  if (closed_) AFDKIT_MESH_THROW(MeshError, "afdkit.mesh.put: the mesh of rank ", opt_.rank, " is closed");
  Peer& p = peer_ref(op.peer);
  // Every bound is checked before anything moves.
  const RemoteRegion* r = nullptr;
  if (!op.segments.empty() || !op.words.empty()) {
    for (const auto& seg : op.segments) r = &remote_ref(p, op.region, seg.offset, seg.nbytes, "data");
    for (const auto& w : op.words) {
      r = &remote_ref(p, op.region, w.first, 8, "header word");
      if (w.first % 8 != 0) AFDKIT_THROW(ValueError, "afdkit.mesh.put: header words must be 8-byte aligned");
    }
  }
  const RemoteRegion* s = nullptr;
  if (op.sig_region >= 0) {
    s = &remote_ref(p, op.sig_region, op.sig_offset, 8, "signal");
    if (op.sig_offset % 8 != 0) AFDKIT_THROW(ValueError, "afdkit.mesh.put: signal offset must be 8-byte aligned");
  }
  if (op.credit_watch >= 0) {
    const FlagWatch& w = watch_ref(op.credit_watch);
    if (op.credit_index < 0 || op.credit_index >= w.n)
      AFDKIT_THROW(ValueError, "afdkit.mesh.put: credit flag ", op.credit_index, " outside the watch of ", w.n);
    if (!op.ordered) AFDKIT_THROW(ValueError, "afdkit.mesh.put: a credit flag needs a stream-ordered put");
  }
  if (op.best_effort && peer_state(op.peer) != 0) return;
  check_health(op.peer, "put");
  const size_t nbytes = op.total_bytes();
  tracer_.record(op.tag, op.peer, TraceKind::kEnqueue, nbytes);
  if (op.credit_watch >= 0) wait_flag(op.credit_watch, op.credit_index, op.credit_layer, op.stream);
  if (op.ordered && (!r || r->ipc_ptr) && (!s || s->ipc_ptr) && (r || s)) {
    post_ipc(op, p);  // same-host GPUs: copy engines move the data, the stream writes the words
    return;
  }
  if (op.ordered) {
    // UCX posts from the CPU: the progress thread posts once the stream reached this point.
    StreamPut sp{gpu::record_event(reinterpret_cast<cudaStream_t>(op.stream)), op, gpu::current_device()};
    {
      std::lock_guard<std::mutex> lock(stream_mu_);
      stream_puts_.push_back(std::move(sp));
      stream_puts_pending_.store(static_cast<int>(stream_puts_.size()));
    }
    wake();
    return;
  }
  post_now(p, op.region, op.segments.data(), op.segments.size(), op.words, op.sig_region, op.sig_offset,
           op.sig_value, op.tag);
}

bool Engine::post_direct(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                         size_t sig_offset, uint64_t sig_value, uint64_t tag) {
  size_t total = 0;
  for (size_t i = 0; i < nseg; ++i) total += segs[i].nbytes;
  if (total > opt_.direct_max_bytes) return false;
  char* data = (total || !words.empty()) ? p.regions[region].direct : nullptr;
  char* sig = sig_region >= 0 ? p.regions[sig_region].direct : nullptr;
  if (((total || !words.empty()) && !data) || (sig_region >= 0 && !sig)) return false;
  // Requests to this peer still in flight (e.g. cma puts progress in segments) could
  // land after these stores: keep to UCX and its fences then.
  if (p.rma_in_flight.load(std::memory_order_acquire) != 0 || p.fused_in_flight.load(std::memory_order_acquire) != 0)
    return false;
  for (size_t i = 0; i < nseg; ++i)
    if (segs[i].nbytes && !in_host_range(segs[i].src, segs[i].nbytes)) return false;  // unknown (maybe CUDA) memory
  for (size_t i = 0; i < nseg; ++i)
    if (segs[i].nbytes) std::memcpy(data + segs[i].offset, segs[i].src, segs[i].nbytes);
  for (const auto& w : words) __atomic_store_n(reinterpret_cast<uint64_t*>(data + w.first), w.second, __ATOMIC_RELAXED);
  if (tracer_.enabled()) {
    tracer_.record(tag, p.rank, TraceKind::kPosted, total);
    if (total) tracer_.record(tag, p.rank, TraceKind::kCompleted, total);
  }
  // Release: a reader that sees the signal (acquire) sees the data and words before it.
  if (sig) __atomic_store_n(reinterpret_cast<uint64_t*>(sig + sig_offset), sig_value, __ATOMIC_RELEASE);
  return true;
}

void Engine::post_now(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                      size_t sig_offset, uint64_t sig_value, uint64_t tag) {
  if (post_direct(p, region, segs, nseg, words, sig_region, sig_offset, sig_value, tag)) return;
  try {
    UcxLock lock(*this);
    post_locked(p, region, segs, nseg, words, sig_region, sig_offset, sig_value, tag);
  } catch (const MeshPeerLost&) {
    // A peer that resets our connection has usually closed because another rank died
    // first; give that rank's report (or our own liveness check) a moment to arrive so
    // that the error names the root cause, not only its consequence.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
    while (std::chrono::steady_clock::now() < deadline && lost_count() < 2)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    check_health(p.rank, "put");
    throw;
  }
}

void Engine::post_ipc(const MessageOp& op, Peer& p) {
  auto stream = reinterpret_cast<cudaStream_t>(op.stream);
  size_t nbytes = 0;
  if (!op.segments.empty() || !op.words.empty()) {
    char* base = p.regions[op.region].ipc_ptr;
    for (const auto& seg : op.segments) {
      if (seg.nbytes) gpu::copy_async(base + seg.offset, seg.src, seg.nbytes, stream);
      nbytes += seg.nbytes;
    }
    // Stream writes follow the copies in stream order; the signal's fence publishes both.
    for (const auto& w : op.words)
      gpu::write_value_raw(stream, reinterpret_cast<uint64_t*>(base + w.first), w.second, false);
  }
  tracer_.record(op.tag, op.peer, TraceKind::kPosted, nbytes);
  if (op.sig_region >= 0)
    gpu::write_value_raw(stream, reinterpret_cast<uint64_t*>(p.regions[op.sig_region].ipc_ptr + op.sig_offset),
                         op.sig_value, true);
}

int Engine::lost_count() const {
  int n = 0;
  for (int r = 0; r < opt_.world_size; ++r) {
    const uint64_t kind = peer_state(r) & 0xff;
    n += kind == static_cast<uint64_t>(PeerState::kLost) || kind == static_cast<uint64_t>(PeerState::kAborted);
  }
  return n;
}

OpCtx* Engine::take_ctx() {
  if (ctx_pool_.empty()) return new OpCtx();
  OpCtx* c = ctx_pool_.back();
  ctx_pool_.pop_back();
  return c;
}

// Posts one ucp_put_nbx; returns true when it is still in flight (then `ctx` belongs to
// the request; else the caller still owns it).
bool Engine::issue_put_locked(Peer& p, const void* src, size_t n, uintptr_t raddr, ucp_rkey_h rkey, OpCtx* ctx) {
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.send = request_done_cb;
  prm.user_data = ctx;
  ucs_status_ptr_t st = ucp_put_nbx(p.ep, src, n, raddr, rkey, &prm);
  if (st == nullptr) return false;  // completed in place
  if (UCS_PTR_IS_ERR(st)) {
    ctx_pool_.push_back(ctx);
    AFDKIT_MESH_THROW(MeshPeerLost, "afdkit.mesh.put to ", p.label, " failed: ", ucs_status_string(UCS_PTR_STATUS(st)));
  }
  // The callback runs inside a later progress call, under the mutex we hold: counting
  // after the post cannot race with it.
  outstanding_.fetch_add(1);
  p.rma_in_flight.fetch_add(1);
  return true;
}

void Engine::post_word_locked(Peer& p, const RemoteRegion& r, size_t offset, uint64_t value, uint64_t tag) {
  OpCtx* ctx = take_ctx();
  *ctx = OpCtx{this, tag, p.rank, 8, false, false, value, {0, 0, 0}};
  if (issue_put_locked(p, &ctx->word, 8, r.addr + offset, r.rkey, ctx)) {
    posts_.fetch_add(1);
    wake();
  } else {
    ctx_pool_.push_back(ctx);
  }
}

void Engine::post_ucx_locked(const MessageOp& op) {
  post_locked(*peers_[op.peer], op.region, op.segments.data(), op.segments.size(), op.words, op.sig_region,
              op.sig_offset, op.sig_value, op.tag);
}

void Engine::drain_fused_locked(Peer& p) {
  // A fused message still in flight (a congested socket) must leave before anything
  // else to this peer, or a later message could overtake its data or signal. Rare: a
  // fused send normally completes in place.
  const int64_t deadline = now_ns() + 60 * 1000000000LL;
  while (p.fused_in_flight > 0) {
    ucp_worker_progress(worker_);
    if (peer_state(p.rank) != 0 || now_ns() > deadline)
      AFDKIT_MESH_THROW(MeshPeerLost, "afdkit.mesh.put to ", p.label, ": an earlier message did not leave (",
                        p.fused_in_flight.load(), " in flight); ", describe_state(p.rank));
  }
}

void Engine::post_locked(Peer& p, int region, const Segment* segs, size_t nseg, const Words& words, int sig_region,
                         size_t sig_offset, uint64_t sig_value, uint64_t tag) {
  size_t total = 0;
  for (size_t i = 0; i < nseg; ++i) total += segs[i].nbytes;
  if (p.fused) {
    drain_fused_locked(p);
    // One active message for data + signal, when nothing RMA to this peer is in flight
    // that it could overtake (requests that completed locally sit in the socket before it).
    // An unsignalled put goes the same way (no signal in the header): one message
    // instead of UCX's emulated put and its completion reply.
    const bool small = nseg <= 1 && words.empty() && total <= opt_.fused_max_bytes && (total > 0 || sig_region >= 0);
    if (small && p.rma_in_flight == 0 && (sig_region < 0 || p.regions[sig_region].kind == MemKind::kHost) &&
        (total == 0 || p.regions[region].kind == MemKind::kHost)) {
      // Recorded before the message goes out, so that posted <= delivered across processes.
      tracer_.record(tag, p.rank, TraceKind::kPosted, total);
      const bool data = total > 0;
      if (post_fused_locked(p, data ? &p.regions[region] : nullptr, data ? segs : nullptr,
                            sig_region >= 0 ? &p.regions[sig_region] : nullptr, sig_offset, sig_value, tag)) {
        posts_.fetch_add(1);
        wake();
      }
      return;
    }
  }
  bool in_flight = false;
  for (size_t i = 0; i < nseg; ++i) {
    const Segment& seg = segs[i];
    if (!seg.nbytes) continue;
    const RemoteRegion& r = p.regions[region];
    OpCtx* ctx = take_ctx();
    *ctx = OpCtx{this, tag, p.rank, seg.nbytes, tracer_.enabled(), false, 0, {0, 0, 0}};
    const bool pending = issue_put_locked(p, seg.src, seg.nbytes, r.addr + seg.offset, r.rkey, ctx);
    if (!pending) {
      if (ctx->traced) tracer_.record(tag, p.rank, TraceKind::kCompleted, seg.nbytes);
      ctx_pool_.push_back(ctx);
    }
    in_flight |= pending;
  }
  for (const auto& w : words) post_word_locked(p, p.regions[region], w.first, w.second, 0);
  // Recorded before the signal goes out, so that posted <= delivered across processes.
  tracer_.record(tag, p.rank, TraceKind::kPosted, total);
  if (sig_region >= 0) {
    // The fence keeps the signal behind the data on every lane of this endpoint -- also
    // behind puts posted earlier without a signal (a signal-only put ends a bulk stream).
    ucx_check(ucp_worker_fence(worker_), "ucp_worker_fence");
    post_word_locked(p, p.regions[sig_region], sig_offset, sig_value, tag);
  }
  if (in_flight) {
    posts_.fetch_add(1);
    wake();
  }
}

void Engine::on_put_done(uint64_t tag, int peer, uint64_t nbytes, ucs_status_t status) {
  if (peer >= 0) tracer_.record(tag, peer, TraceKind::kCompleted, nbytes);
  outstanding_.fetch_sub(1);
}

}  // namespace afdkit::mesh
