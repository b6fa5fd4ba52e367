// Fused put + signal: one UCX active message that carries a message's data and its
// signal, for endpoints whose RMA UCX emulates with active messages anyway (tcp).
//
// Over such an endpoint a put is an active message that the receiver's progress copies
// into place, and its remote completion needs one more message back. A put + fence +
// signal put therefore costs two sends, two completion messages and (with a strong
// fence) a whole round trip before the signal goes. The fused message costs one send: the
// receiver's handler copies the data into the registered region and then stores the
// signal (release), exactly the order a fenced signal guarantees.
//
// Ordering with everything else sent to the same peer (see Engine::post_locked): a
// fused message is only sent when no RMA request to that peer is in flight (requests
// that completed locally already sit in the socket ahead of it), and nothing is posted
// to a peer while a fused message to it is still in flight.
#include <cstring>

#include "common/errors.h"
#include "mesh/engine.h"

namespace afdkit::mesh {
namespace {

void fused_done_cb(void* request, ucs_status_t status, void* user_data) {
  auto* ctx = static_cast<OpCtx*>(user_data);
  ctx->engine->on_request_done(ctx, status);
  ucp_request_free(request);
}

}  // namespace

bool Engine::fused_transport(ucp_ep_h ep) {
  // Only where every lane is tcp: shared memory and RDMA transports write in place, and
  // a one-sided put there beats a message the receiver must copy.
  ucp_transport_entry_t entries[16];
  ucp_ep_attr_t attr{};
  attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
  attr.transports.entries = entries;
  attr.transports.num_entries = 16;
  attr.transports.entry_size = sizeof(ucp_transport_entry_t);
  if (ucp_ep_query(ep, &attr) != UCS_OK || attr.transports.num_entries == 0) return false;
  for (unsigned i = 0; i < attr.transports.num_entries; ++i) {
    const char* name = entries[i].transport_name;
    if (!name || std::strcmp(name, "tcp") != 0) return false;
  }
  return true;
}

bool Engine::post_fused_locked(Peer& p, const RemoteRegion* data, const Segment* seg, const RemoteRegion* sig,
                               size_t sig_offset, uint64_t value, uint64_t tag) {
  const size_t nbytes = seg ? seg->nbytes : 0;
  OpCtx* ctx = take_ctx();
  *ctx = OpCtx{this, tag, p.rank, nbytes, tracer_.enabled(), true, 0, {0, 0, 0}};
  ctx->hdr[0] = seg ? data->addr + seg->offset : 0;
  ctx->hdr[1] = sig ? sig->addr + sig_offset : 0;  // 0: no signal
  ctx->hdr[2] = value;
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  // Eager: the receiver gets the data inside its handler (no rendezvous to finish later).
  prm.flags = UCP_AM_SEND_FLAG_EAGER;
  prm.cb.send = fused_done_cb;
  prm.user_data = ctx;
  ucs_status_ptr_t st = ucp_am_send_nbx(p.ep, kFusedAmId, ctx->hdr, sizeof(ctx->hdr), seg ? seg->src : nullptr,
                                        nbytes, &prm);
  if (st == nullptr) {  // completed in place
    if (ctx->traced && nbytes) tracer_.record(tag, p.rank, TraceKind::kCompleted, nbytes);
    ctx_pool_.push_back(ctx);
    return false;
  }
  if (UCS_PTR_IS_ERR(st)) {
    ctx_pool_.push_back(ctx);
    AFDKIT_MESH_THROW(MeshPeerLost, "afdkit.mesh.put to ", p.label, " failed: ", ucs_status_string(UCS_PTR_STATUS(st)));
  }
  outstanding_.fetch_add(1);
  p.fused_in_flight.fetch_add(1);
  return true;
}

bool Engine::host_range_registered(uintptr_t addr, size_t n) const {
  for (const auto& r : regions_) {
    const auto base = reinterpret_cast<uintptr_t>(r.ptr);
    if (r.kind == MemKind::kHost && addr >= base && addr - base <= r.nbytes && n <= r.nbytes - (addr - base))
      return true;
  }
  return false;
}

ucs_status_t Engine::on_fused_message(const void* header, size_t header_length, const void* data, size_t length,
                                      bool rndv) {
  // Runs inside ucp_worker_progress, under the UCX mutex: regions_ only grows under it.
  uint64_t hdr[3];
  const bool well_formed = !rndv && header_length == sizeof(hdr);
  if (well_formed) std::memcpy(hdr, header, sizeof(hdr));
  // A message may only write registered host memory of this rank: what a peer's puts
  // could reach with the keys it was given, nothing else.
  if (!well_formed || (length && !host_range_registered(hdr[0], length)) || hdr[1] % 8 != 0 ||
      (hdr[1] && !host_range_registered(hdr[1], 8))) {
    if (progress_error_.empty())
      progress_error_ = rndv ? "a fused message arrived by rendezvous (not supported); it was dropped"
                             : "a fused message pointed outside this rank's registered host memory; it was dropped";
    return UCS_OK;  // eager data: UCX releases it; a rendezvous descriptor is dropped with the error
  }
  if (length) std::memcpy(reinterpret_cast<void*>(hdr[0]), data, length);
  if (hdr[1]) __atomic_store_n(reinterpret_cast<uint64_t*>(hdr[1]), hdr[2], __ATOMIC_RELEASE);
  return UCS_OK;
}

void Engine::on_request_done(OpCtx* ctx, ucs_status_t status) {
  if (ctx->peer >= 0 && ctx->peer < opt_.world_size && peers_[ctx->peer]) {
    Peer& p = *peers_[ctx->peer];
    if (ctx->fused) {
      p.fused_in_flight.fetch_sub(1);
    } else {
      p.rma_in_flight.fetch_sub(1);
    }
  }
  on_put_done(ctx->traced ? ctx->tag : 0, ctx->traced ? ctx->peer : -1, ctx->nbytes, status);
  ctx_pool_.push_back(ctx);
}

}  // namespace afdkit::mesh
