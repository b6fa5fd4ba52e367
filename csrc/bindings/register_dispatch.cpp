// afdkit._C.dispatch_ipc: the CUDA IPC expert-parallel dispatcher's native half: the
// symmetric buffer (IpcBuffer) and a Plan that holds one dispatcher's configuration and
// fixed buffers (borrowed once, kept alive by the plan) and launches its four kernels.
// The Python side (afdkit.dispatch.ipc) computes the layout, exchanges the handles and
// owns the protocol state.
#include <memory>
#include <string>
#include <vector>

#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "common/device_guard.h"
#include "moe/dispatch_ipc.h"
#include "moe/ipc_buffer.h"

namespace afdkit::bindings {
namespace {

using moe::ipc::Common;
using moe::ipc::Config;
using moe::ipc::IpcBuffer;
using moe::ipc::Layout;
using moe::ipc::SlotBuffers;

constexpr const char* kOp = "afdkit.dispatch.ipc";

int64_t get_int(const py::dict& d, const char* key) {
  if (!d.contains(key)) AFDKIT_THROW(ValueError, kOp, ": the plan's configuration lacks '", key, "'");
  return d[key].cast<int64_t>();
}

Layout parse_layout(const py::dict& d) {
  Layout l;
  l.token_bytes = get_int(d, "token_bytes");
  l.scale_offset = get_int(d, "scale_offset");
  l.meta_offset = get_int(d, "meta_offset");
  l.row_bytes = get_int(d, "row_bytes");
  l.combine_row_bytes = get_int(d, "combine_row_bytes");
  l.dispatch_flags_offset = get_int(d, "dispatch_flags_offset");
  l.combine_flags_offset = get_int(d, "combine_flags_offset");
  l.recv_offset = get_int(d, "recv_offset");
  l.combine_offset = get_int(d, "combine_offset");
  l.slot_bytes = get_int(d, "slot_bytes");
  l.total_bytes = get_int(d, "total_bytes");
  for (int64_t v : {l.row_bytes, l.combine_row_bytes, l.dispatch_flags_offset, l.combine_flags_offset, l.recv_offset,
                    l.combine_offset, l.slot_bytes, l.meta_offset, l.scale_offset, l.token_bytes})
    if (v < 0 || v % 16 != 0) AFDKIT_THROW(ValueError, kOp, ": layout offsets must be >= 0 and 16-byte aligned");
  return l;
}

Config parse_config(const py::dict& d, const py::dict& layout) {
  Config c;
  c.rank = static_cast<int>(get_int(d, "rank"));
  c.ranks = static_cast<int>(get_int(d, "ranks"));
  c.max_tokens = static_cast<int>(get_int(d, "max_tokens"));
  c.hidden = static_cast<int>(get_int(d, "hidden"));
  c.top_k = static_cast<int>(get_int(d, "top_k"));
  c.num_experts = static_cast<int>(get_int(d, "num_experts"));
  c.local_experts = static_cast<int>(get_int(d, "local_experts"));
  c.kmax = static_cast<int>(get_int(d, "kmax"));
  c.fp8 = get_int(d, "fp8") != 0;
  c.timeout_ns = static_cast<uint64_t>(get_int(d, "timeout_ns"));
  c.layout = parse_layout(layout);
  if (c.ranks < 1 || c.ranks > moe::ipc::kMaxRanks || c.rank < 0 || c.rank >= c.ranks)
    AFDKIT_THROW(ValueError, kOp, ": ranks must be in 1..", moe::ipc::kMaxRanks, " and rank in [0, ranks), got rank ",
                 c.rank, " of ", c.ranks);
  if (c.top_k < 1 || c.top_k > moe::ipc::kMaxTopK || c.local_experts * c.ranks != c.num_experts ||
      c.kmax != std::min(c.top_k, c.local_experts) || c.max_tokens < 1 || c.hidden < 1)
    AFDKIT_THROW(ValueError, kOp, ": inconsistent configuration");
  if (c.fp8 && c.hidden % moe::ipc::kQuantGroup != 0)
    AFDKIT_THROW(ValueError, kOp, ": FP8 needs hidden % 128 == 0, got ", c.hidden);
  const int64_t rows = static_cast<int64_t>(c.ranks) * c.max_tokens;
  const Layout& l = c.layout;
  if (l.row_bytes < l.meta_offset + 8 * c.top_k || l.recv_offset + rows * l.row_bytes > l.slot_bytes ||
      l.combine_offset + rows * l.combine_row_bytes > l.slot_bytes || l.combine_row_bytes < 2 * c.hidden ||
      l.total_bytes < l.slot_bytes)
    AFDKIT_THROW(ValueError, kOp, ": the layout does not fit the configuration");
  return c;
}

// One dispatcher: configuration, buffer addresses and the slots' fixed tensors.
class Plan {
 public:
  Plan(const py::dict& config, const py::dict& layout, std::uintptr_t local, py::handle peers_obj,
       std::uintptr_t error_word, const py::list& slots) {
    common_.cfg = parse_config(config, layout);
    const Config& c = common_.cfg;
    common_.local = reinterpret_cast<uint8_t*>(local);
    common_.error = reinterpret_cast<uint64_t*>(error_word);
    Borrowed peers = keep(borrow(peers_obj, kOp, "peers"));
    check(kOp, "peers", *peers).dtype(DType::kInt64).shape({c.ranks}).contiguous().on_cuda();
    device_ = peers->device;
    common_.peers = peers->ptr<int64_t>();
    for (py::handle s : slots) slots_.push_back(parse_slot(py::reinterpret_borrow<py::dict>(s)));
    if (slots_.empty()) AFDKIT_THROW(ValueError, kOp, ": a plan needs at least one slot");
    if (static_cast<int64_t>(slots_.size()) * c.layout.slot_bytes > c.layout.total_bytes)
      AFDKIT_THROW(ValueError, kOp, ": ", slots_.size(), " slots do not fit the buffer");
  }

  void dispatch_send(int slot, py::handle x_obj, py::handle ids_obj, py::handle w_obj, std::uintptr_t stream) {
    const Config& c = common_.cfg;
    Borrowed x = borrow(x_obj, kOp, "x"), ids = borrow(ids_obj, kOp, "topk_ids");
    Borrowed w = borrow(w_obj, kOp, "topk_weights");
    check(kOp, "x", *x).dtype(DType::kBFloat16).ndim(2).size(1, c.hidden, "hidden").contiguous().on(device_);
    const int64_t tokens = x->size(0);
    check(kOp, "topk_ids", *ids).dtype_in({DType::kInt32, DType::kInt64}).shape({tokens, c.top_k}).contiguous()
        .on(device_);
    check(kOp, "topk_weights", *w).dtype(DType::kFloat32).shape({tokens, c.top_k}).contiguous().on(device_);
    moe::ipc::DispatchSendArgs a;
    a.x = x->data;
    a.ids = ids->data;
    a.ids64 = ids->dtype == DType::kInt64;
    a.weights = w->ptr<float>();
    a.tokens = static_cast<int>(tokens);
    const Common cm = at(slot);
    DeviceGuard guard(device_);
    py::gil_scoped_release nogil;
    moe::ipc::dispatch_send(cm, a, as_stream(stream));
  }

  void dispatch_recv(int slot, std::uintptr_t stream) {
    const Common cm = at(slot);
    DeviceGuard guard(device_);
    py::gil_scoped_release nogil;
    moe::ipc::dispatch_recv(cm, as_stream(stream));
  }

  void combine_send(int slot, py::handle y_obj, std::uintptr_t stream) {
    Borrowed y = borrow(y_obj, kOp, "expert_out");
    check(kOp, "expert_out", *y).dtype(DType::kBFloat16).ndim(2).size(1, common_.cfg.hidden, "hidden")
        .last_dim_contiguous().on(device_);
    moe::ipc::CombineSendArgs a;
    a.expert_out = y->data;
    a.rows = y->size(0);
    a.row_stride = y->stride(0);
    a.vec = true;
    const Common cm = at(slot);
    DeviceGuard guard(device_);
    py::gil_scoped_release nogil;
    moe::ipc::combine_send(cm, a, as_stream(stream));
  }

  void combine_recv(int slot, py::handle out_obj, std::uintptr_t stream) {
    Borrowed out = borrow(out_obj, kOp, "out");
    check(kOp, "out", *out).dtype(DType::kBFloat16).ndim(2).size(1, common_.cfg.hidden, "hidden").contiguous()
        .writable().on(device_);
    moe::ipc::CombineRecvArgs a;
    a.out = out->data;
    a.tokens = static_cast<int>(out->size(0));
    const Common cm = at(slot);
    DeviceGuard guard(device_);
    py::gil_scoped_release nogil;
    moe::ipc::combine_recv(cm, a, as_stream(stream));
  }

  int64_t recv_smem_bytes() const { return moe::ipc::dispatch_recv_smem_bytes(common_.cfg); }

 private:
  Borrowed keep(Borrowed b) {
    owners_.push_back(b.owner);
    return b;
  }

  SlotBuffers parse_slot(const py::dict& d);

  Common at(int slot) const {
    if (slot < 0 || slot >= static_cast<int>(slots_.size()))
      AFDKIT_THROW(ValueError, kOp, ": slot ", slot, " out of range [0, ", slots_.size(), ")");
    Common cm = common_;
    cm.slot = slot;
    cm.buf = slots_[slot];
    return cm;
  }

  Common common_;
  Device device_;
  std::vector<SlotBuffers> slots_;
  std::vector<std::shared_ptr<void>> owners_;  // the slots' tensors stay alive with the plan
};

SlotBuffers Plan::parse_slot(const py::dict& d) {
  const Config& c = common_.cfg;
  const int64_t capacity = static_cast<int64_t>(c.ranks) * c.max_tokens * c.kmax;
  auto tensor = [&](const char* key) -> Borrowed {
    if (!d.contains(key)) AFDKIT_THROW(ValueError, kOp, ": a slot lacks '", key, "'");
    Borrowed b = keep(borrow(d[key], kOp, key));
    check(kOp, key, *b).contiguous().writable().on(device_);
    return b;
  };
  SlotBuffers s;
  Borrowed tokens = tensor("tokens");
  check(kOp, "tokens", *tokens).dtype(c.fp8 ? DType::kFloat8E4M3FN : DType::kBFloat16).shape({capacity, c.hidden});
  s.tokens = tokens->data;
  if (c.fp8) {
    Borrowed scales = tensor("scales");
    check(kOp, "scales", *scales).dtype(DType::kFloat32).shape({capacity, c.hidden / moe::ipc::kQuantGroup});
    s.scales = scales->ptr<float>();
  }
  auto int32s = [&](const char* key, int64_t n) {
    Borrowed b = tensor(key);
    check(kOp, key, *b).dtype(DType::kInt32).shape({n});
    return b->ptr<int32_t>();
  };
  s.counts = int32s("counts", c.local_experts);
  s.offsets = int32s("offsets", c.local_experts + 1);
  s.recv_tokens = int32s("recv_tokens", c.ranks);
  s.row_of_pair = int32s("row_of_pair", static_cast<int64_t>(c.ranks) * c.max_tokens * c.kmax);
  s.row_src = int32s("row_src", capacity);
  s.row_index = int32s("row_index", capacity);
  s.dest_mask = reinterpret_cast<uint32_t*>(int32s("dest_mask", c.max_tokens));
  s.counters = reinterpret_cast<uint32_t*>(int32s("counters", 2));
  Borrowed weight = tensor("row_weight");
  check(kOp, "row_weight", *weight).dtype(DType::kFloat32).shape({capacity});
  s.row_weight = weight->ptr<float>();
  return s;
}

py::bytes to_bytes(const std::string& s) { return py::bytes(s.data(), s.size()); }

}  // namespace

void register_dispatch(py::module_& m) {
  auto sub = m.def_submodule("dispatch_ipc", "Expert-parallel dispatch/combine over CUDA IPC (GPUs of one host)");
  sub.attr("MAX_RANKS") = moe::ipc::kMaxRanks;
  py::class_<IpcBuffer>(sub, "IpcBuffer")
      .def(py::init<size_t, int>(), py::arg("nbytes"), py::arg("device"))
      .def("handle", [](const IpcBuffer& b) { return to_bytes(b.handle()); })
      .def("open_peer", [](IpcBuffer& b, int rank, py::bytes h) { return b.open_peer(rank, std::string(h)); },
           py::arg("rank"), py::arg("handle"))
      .def("close_peers", &IpcBuffer::close_peers)
      .def("close", &IpcBuffer::close)
      .def("error", &IpcBuffer::error)
      .def("clear_error", &IpcBuffer::clear_error)
      .def_property_readonly("base", &IpcBuffer::base)
      .def_property_readonly("nbytes", &IpcBuffer::nbytes)
      .def_property_readonly("device", &IpcBuffer::device)
      .def_property_readonly("closed", &IpcBuffer::closed)
      .def_property_readonly("error_word", &IpcBuffer::error_word);
  py::class_<Plan>(sub, "Plan")
      .def(py::init<const py::dict&, const py::dict&, std::uintptr_t, py::handle, std::uintptr_t, const py::list&>(),
           py::arg("config"), py::arg("layout"), py::arg("local"), py::arg("peers"), py::arg("error_word"),
           py::arg("slots"))
      .def("dispatch_send", &Plan::dispatch_send, py::arg("slot"), py::arg("x"), py::arg("topk_ids"),
           py::arg("topk_weights"), py::arg("stream"))
      .def("dispatch_recv", &Plan::dispatch_recv, py::arg("slot"), py::arg("stream"))
      .def("combine_send", &Plan::combine_send, py::arg("slot"), py::arg("expert_out"), py::arg("stream"))
      .def("combine_recv", &Plan::combine_recv, py::arg("slot"), py::arg("out"), py::arg("stream"))
      .def_property_readonly("recv_smem_bytes", &Plan::recv_smem_bytes);
}

}  // namespace afdkit::bindings
