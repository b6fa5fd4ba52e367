// afdkit._C.mesh: the transport engine. Buffers cross as raw pointers plus byte
// counts (the Python layer takes them from torch tensors it keeps alive); waits
// release the GIL. C++ mesh exceptions become afdkit.mesh.MeshError & co.
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "bindings/dlpack_capsule.h"
#include "bindings/registry.h"
#include "common/errors.h"
#include "mesh/engine.h"
#include "mesh/ucx_info.h"

namespace afdkit::bindings {
namespace {

using mesh::Engine;
using mesh::MemKind;

py::bytes to_bytes(const std::string& s) { return py::bytes(s.data(), s.size()); }

std::unique_ptr<Engine> make_engine(int rank, int world_size, int device, double keepalive_s, int spin_us,
                                    int max_sleep_us, size_t trace_capacity,
                                    const std::map<std::string, std::string>& ucx_options,
                                    const std::string& err_mode) {
  mesh::EngineOptions o;
  o.rank = rank;
  o.world_size = world_size;
  o.device = device;
  o.keepalive_s = keepalive_s;
  o.spin_us = spin_us;
  o.max_sleep_us = max_sleep_us;
  o.trace_capacity = trace_capacity;
  for (const auto& kv : ucx_options) o.ucx_options.emplace_back(kv.first, kv.second);
  o.err_mode = err_mode;
  py::gil_scoped_release nogil;  // UCX init may take a while (transport discovery)
  return std::make_unique<Engine>(o);
}

py::dict region_info(Engine& e, int id) {
  const mesh::LocalRegion& r = e.region(id);
  py::dict d;
  d["ptr"] = reinterpret_cast<std::uintptr_t>(r.ptr);
  d["nbytes"] = r.nbytes;
  d["cuda"] = r.kind == MemKind::kCuda;
  d["device"] = r.device;
  d["rkey"] = to_bytes(r.rkey);
  d["ipc"] = to_bytes(r.ipc);
  d["ipc_offset"] = r.ipc_offset;
  return d;
}

// A uint8 CPU tensor over a UCX-allocated region; it keeps the engine (and so the
// memory) alive for as long as the tensor lives.
py::capsule host_view(py::object self, int id) {
  Engine& e = self.cast<Engine&>();
  const mesh::LocalRegion& r = e.region(id);
  if (r.kind != MemKind::kHost) AFDKIT_THROW(ValueError, "afdkit.mesh: region ", id, " is not host memory");
  TensorView v;
  v.data = r.ptr;
  v.dtype = DType::kUInt8;
  v.device = Device{DeviceKind::kCPU, 0};
  v.shape = {static_cast<int64_t>(r.nbytes)};
  v.strides = {1};
  return export_capsule(v, self, true);
}

py::list trace_events(Engine& e) {
  py::list out;
  for (const auto& ev : e.tracer().snapshot())
    out.append(py::make_tuple(ev.tag, ev.t_ns, ev.nbytes, ev.peer, static_cast<int>(ev.kind)));
  return out;
}

void put(Engine& e, std::uintptr_t src, size_t nbytes, int peer, int region, size_t offset, int sig_region,
         size_t sig_offset, uint64_t sig_value, std::uintptr_t stream, uint64_t tag, bool best_effort,
         std::optional<bool> ordered) {
  mesh::PutOp op;
  op.src = reinterpret_cast<const void*>(src);
  op.nbytes = nbytes;
  op.peer = peer;
  op.region = region;
  op.offset = offset;
  op.sig_region = sig_region;
  op.sig_offset = sig_offset;
  op.sig_value = sig_value;
  op.stream = stream;
  // Default: a non-zero stream orders the put; ordered=True also orders it on the legacy
  // default stream, whose handle is 0 (torch's default stream).
  op.ordered = ordered.has_value() ? *ordered : stream != 0;
  op.tag = tag;
  op.best_effort = best_effort;
  e.put(op);
}

// The AFD channel's message: segments (src, nbytes, offset), header words (offset,
// value) and a signal, optionally behind a credit flag, in one call.
void put_message(Engine& e, int peer, int region, const std::vector<std::tuple<std::uintptr_t, size_t, size_t>>& segments,
                 const std::vector<std::pair<size_t, uint64_t>>& words, int sig_region, size_t sig_offset,
                 uint64_t sig_value, std::uintptr_t stream, bool ordered, uint64_t tag, int credit_watch,
                 int credit_index, uint64_t credit_layer) {
  mesh::MessageOp op;
  op.peer = peer;
  op.region = region;
  op.segments.reserve(segments.size());
  for (const auto& [src, nbytes, offset] : segments)
    op.segments.push_back(mesh::Segment{reinterpret_cast<const void*>(src), nbytes, offset});
  op.words = words;
  op.sig_region = sig_region;
  op.sig_offset = sig_offset;
  op.sig_value = sig_value;
  op.stream = stream;
  op.ordered = ordered;
  op.tag = tag;
  op.credit_watch = credit_watch;
  op.credit_index = credit_index;
  op.credit_layer = credit_layer;
  e.put_message(op);
}

// Ping-pong of put + signal between two ranks on host memory, timed in C++ so that the
// numbers are the transport's, comparable with ucx_perftest (no Python per message).
// Latency: the initiator puts, the responder waits then puts back; half a round trip
// per iteration. Bandwidth: `bw_iters` puts without signals, then one fenced signal;
// the responder acknowledges it (perftest's put_bw also streams puts and completes once).
py::tuple bench_pingpong(Engine& e, bool initiator, int peer, std::uintptr_t src, int region, int sig_region,
                         std::uintptr_t sig_word, size_t size, int iters, int bw_iters, uint64_t seq,
                         double timeout_s) {
  std::vector<int64_t> lat;
  lat.reserve(iters);
  auto* word = reinterpret_cast<const uint64_t*>(sig_word);
  mesh::PutOp op;
  op.src = reinterpret_cast<const void*>(src);
  op.nbytes = size;
  op.peer = peer;
  op.region = region;
  op.sig_region = sig_region;
  double bw_s = 0;
  {
    py::gil_scoped_release nogil;
    for (int i = 0; i < iters; ++i) {
      const int64_t t0 = mesh::now_ns();
      op.sig_value = ++seq;
      if (initiator) {
        e.put(op);
        e.wait(word, MemKind::kHost, seq, timeout_s, peer, "a ping-pong reply");
      } else {
        e.wait(word, MemKind::kHost, seq, timeout_s, peer, "a ping-pong request");
        e.put(op);
      }
      lat.push_back((mesh::now_ns() - t0) / 2);
    }
    const int64_t t0 = mesh::now_ns();
    if (initiator) {
      mesh::PutOp data = op;
      data.sig_region = -1;
      for (int i = 0; i < bw_iters; ++i) e.put(data);
      op.nbytes = 0;
      op.sig_value = ++seq;
      e.put(op);  // fenced behind the stream
      e.wait(word, MemKind::kHost, ++seq, timeout_s, peer, "the bandwidth acknowledgement");
    } else {
      e.wait(word, MemKind::kHost, ++seq, timeout_s, peer, "the end of the bandwidth stream");
      op.nbytes = 0;
      op.sig_value = ++seq;
      e.put(op);
    }
    bw_s = (mesh::now_ns() - t0) * 1e-9;
    e.flush(timeout_s);
  }
  return py::make_tuple(lat, bw_s, seq);
}

void register_exceptions(py::module_& sub) {
  static py::exception<mesh::MeshError> base(sub, "MeshError", PyExc_RuntimeError);
  static py::exception<mesh::MeshTimeout> timeout(sub, "MeshTimeout", base.ptr());
  static py::exception<mesh::MeshPeerLost> lost(sub, "MeshPeerLost", base.ptr());
  static py::exception<mesh::MeshAuthError> auth(sub, "MeshAuthError", base.ptr());
  // Most specific first: a later-registered translator is tried earlier.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mesh::MeshTimeout& e) {
      PyErr_SetString(timeout.ptr(), e.what());
    } catch (const mesh::MeshPeerLost& e) {
      PyErr_SetString(lost.ptr(), e.what());
    } catch (const mesh::MeshAuthError& e) {
      PyErr_SetString(auth.ptr(), e.what());
    } catch (const mesh::MeshError& e) {
      PyErr_SetString(base.ptr(), e.what());
    }
  });
}

}  // namespace

void register_mesh(py::module_& m) {
  auto sub = m.def_submodule("mesh", "One-sided transport: UCX (tcp/shm/cma/cuda_ipc/verbs) and CUDA IPC.");
  register_exceptions(sub);
  sub.def("check_ucx", &mesh::check_ucx_runtime,
          "Raises MeshError when the loaded UCX is older than the UCX afdkit was built against.");
  sub.def("ucx_library_path", &mesh::ucx_library_path, "The file libucp was loaded from.");
  sub.def("now_ns", &mesh::now_ns, "CLOCK_MONOTONIC in ns (the clock of trace events).");
  py::class_<Engine>(sub, "Engine")
      .def(py::init(&make_engine), py::arg("rank"), py::arg("world_size"), py::arg("device") = -1,
           py::arg("keepalive_s") = 1.0, py::arg("spin_us") = 50, py::arg("max_sleep_us") = 200,
           py::arg("trace_capacity") = 1 << 16, py::arg("ucx_options") = std::map<std::string, std::string>{},
           py::arg("err_mode") = "auto")
      .def_property_readonly("rank", &Engine::rank)
      .def_property_readonly("world_size", &Engine::world_size)
      .def_property_readonly("closed", &Engine::closed)
      .def("address", [](Engine& e) { return to_bytes(e.address()); })
      .def("register_memory",
           [](Engine& e, std::uintptr_t ptr, size_t nbytes, bool cuda, int device) {
             return e.register_memory(reinterpret_cast<void*>(ptr), nbytes, cuda ? MemKind::kCuda : MemKind::kHost,
                                      device);
           },
           py::arg("ptr"), py::arg("nbytes"), py::arg("cuda") = false, py::arg("device") = -1)
      .def("allocate_host", &Engine::allocate_host, py::arg("nbytes"))
      .def("region", &region_info, py::arg("id"))
      .def("host_view", &host_view, py::arg("id"))
      .def("control_region", &Engine::control_region)
      .def("add_peer",
           [](Engine& e, int rank, const std::string& label, py::bytes address, int pid, bool same_host) {
             e.add_peer(rank, label, std::string(address), pid, same_host);
           },
           py::arg("rank"), py::arg("label"), py::arg("address"), py::arg("pid"), py::arg("same_host"))
      .def("add_remote_region",
           [](Engine& e, int peer, std::uintptr_t addr, size_t nbytes, bool cuda, py::bytes rkey, py::bytes ipc,
              size_t ipc_offset) {
             return e.add_remote_region(peer, addr, nbytes, cuda ? MemKind::kCuda : MemKind::kHost,
                                        std::string(rkey), std::string(ipc), ipc_offset);
           },
           py::arg("peer"), py::arg("addr"), py::arg("nbytes"), py::arg("cuda"), py::arg("rkey"), py::arg("ipc"),
           py::arg("ipc_offset"))
      .def("set_peer_control", &Engine::set_peer_control, py::arg("peer"), py::arg("region"))
      .def("backend", &Engine::backend, py::arg("peer"), py::arg("region"))
      .def("endpoint_info", &Engine::endpoint_info, py::arg("peer"))
      .def("put", &put, py::arg("src"), py::arg("nbytes"), py::arg("peer"), py::arg("region"), py::arg("offset") = 0,
           py::arg("sig_region") = -1, py::arg("sig_offset") = 0, py::arg("sig_value") = 0, py::arg("stream") = 0,
           py::arg("tag") = 0, py::arg("best_effort") = false, py::arg("ordered") = py::none(),
           "One-sided write of nbytes at src into the peer's region at offset, then (fenced) the 8-byte "
           "signal sig_value at sig_offset of region sig_region. Returns once posted; flush() for completion. "
           "ordered (default: stream != 0) orders it after the work queued on stream (0: the legacy default stream).")
      .def("put_message", &put_message, py::arg("peer"), py::arg("region"), py::arg("segments"),
           py::arg("words") = std::vector<std::pair<size_t, uint64_t>>{}, py::arg("sig_region") = -1,
           py::arg("sig_offset") = 0, py::arg("sig_value") = 0, py::arg("stream") = 0, py::arg("ordered") = false,
           py::arg("tag") = 0, py::arg("credit_watch") = -1, py::arg("credit_index") = 0,
           py::arg("credit_layer") = 0,
           "put() of several (src, nbytes, offset) segments into one region, then 8-byte header words "
           "(offset, value) into it, then the fenced signal; with credit_watch >= 0 the stream first waits for "
           "that flag (wait_flag). Every bound is checked before anything moves.")
      .def("watch_flags",
           [](Engine& e, std::uintptr_t flags, int n, const std::vector<int>& peers,
              const std::vector<std::string>& labels, double timeout_s) {
             return e.watch_flags(reinterpret_cast<uint64_t*>(flags), n, peers, labels, timeout_s);
           },
           py::arg("flags"), py::arg("n"), py::arg("peers"), py::arg("labels"), py::arg("timeout_s"),
           "Registers n flag words (device memory) with the watchdog; returns the watch id.")
      .def("unwatch_flags", &Engine::unwatch_flags, py::arg("id"))
      .def("wait_flag", &Engine::wait_flag, py::arg("watch"), py::arg("index"), py::arg("layer"), py::arg("stream"),
           "Stream-ordered: the stream waits for flag `index` >= 1 and resets it to 0 (graph-capturable).")
      .def("bench_pingpong", &bench_pingpong, py::arg("initiator"), py::arg("peer"), py::arg("src"),
           py::arg("region"), py::arg("sig_region"), py::arg("sig_word"), py::arg("size"), py::arg("iters"),
           py::arg("bw_iters"), py::arg("seq"), py::arg("timeout_s") = 60.0,
           "Host-memory ping-pong of put + signal from a C++ loop (benchmarks): returns (one-way latencies in "
           "ns, bandwidth seconds, next seq).")
      .def("wait",
           [](Engine& e, std::uintptr_t word, uint64_t value, double timeout_s, int peer, const std::string& what,
              uint64_t tag, bool cuda) {
             py::gil_scoped_release nogil;
             e.wait(reinterpret_cast<const uint64_t*>(word), cuda ? MemKind::kCuda : MemKind::kHost, value,
                    timeout_s, peer, what, tag);
           },
           py::arg("word"), py::arg("value"), py::arg("timeout_s"), py::arg("peer") = -1, py::arg("what") = "a signal",
           py::arg("tag") = 0, py::arg("cuda") = false)
      .def("wait_stream",
           [](Engine& e, std::uintptr_t word, uint64_t value, std::uintptr_t stream, double timeout_s, int peer,
              const std::string& what) {
             e.wait_stream(reinterpret_cast<const uint64_t*>(word), value, stream, timeout_s, peer, what);
           },
           py::arg("word"), py::arg("value"), py::arg("stream"), py::arg("timeout_s") = 30.0, py::arg("peer") = -1,
           py::arg("what") = "a stream-ordered signal")
      .def("load",
           [](Engine& e, std::uintptr_t word, bool cuda) {
             return e.load(reinterpret_cast<const uint64_t*>(word), cuda ? MemKind::kCuda : MemKind::kHost);
           },
           py::arg("word"), py::arg("cuda") = false)
      .def("flush",
           [](Engine& e, double timeout_s) {
             py::gil_scoped_release nogil;
             e.flush(timeout_s);
           },
           py::arg("timeout_s"))
      .def("peer_state", &Engine::peer_state, py::arg("rank"))
      .def("check_health", &Engine::check_health, py::arg("peer"), py::arg("what"))
      .def("abort", &Engine::abort)
      .def("close",
           [](Engine& e, double timeout_s) {
             py::gil_scoped_release nogil;
             e.close(timeout_s);
           },
           py::arg("timeout_s") = 2.0)
      .def("trace_enable", [](Engine& e, bool on) { e.tracer().set_enabled(on); }, py::arg("on"))
      .def("trace_enabled", [](Engine& e) { return e.tracer().enabled(); })
      .def("trace", &trace_events, "Events as (tag, t_ns, nbytes, peer, kind) tuples, oldest first.")
      .def("stats",
           [](Engine& e) {
             auto s = e.stats();
             py::dict d;
             d["progress_loops"] = s.loops;
             d["progress_sleeps"] = s.sleeps;
             d["wait_sleeps"] = s.wait_sleeps;
             d["outstanding"] = s.outstanding;
             return d;
           })
      .def("trace_clear", [](Engine& e) { e.tracer().clear(); })
      .def("trace_dropped", [](Engine& e) { return e.tracer().dropped(); })
      .def("mark",
           [](Engine& e, uint64_t tag, int peer, int kind, uint64_t nbytes) {
             e.tracer().record(tag, peer, static_cast<mesh::TraceKind>(kind), nbytes);
           },
           py::arg("tag"), py::arg("peer"), py::arg("kind"), py::arg("nbytes") = 0);
}

}  // namespace afdkit::bindings
