// Standalone GPU harness for csrc/mfa: random inputs, CPU fp64 reference, SIMT
// oracle vs sm90 kernel, append_kv bit-exactness, and timing against a
// device-to-device copy. Build and run from the repository root:
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -I csrc dev/mfa/harness.cu csrc/mfa/*.cu csrc/mfa/instantiations/*.cu -o build/mfa_harness
//   timeout 300 build/mfa_harness   # correctness matrix + timing table (timeout: a
//                                   # pipeline bug shows as a hang)
//   build/mfa_harness --small    # two tiny cases (for compute-sanitizer)
//   build/mfa_harness --no-time  # correctness only
//   build/mfa_harness --breakdown  # timing also splits each case into kernel / combine
//   build/mfa_harness --sweep      # batch 1 and 8 over 4K..64K: per-call fixed cost vs tiles per part
//   build/mfa_harness --one B LEN  # only the timing of batch B x LEN (for Nsight Compute: -k regex:decode_sm90)
//   build/mfa_harness --profile  # phase table of the sm90 kernel (64 x 4K, 1 x 32K); needs
//                                # every .cu built with -DAFDKIT_MFA_PROFILE
//
// Every output is poisoned with NaN first, unused cache pages are NaN, and inputs
// are fresh random normals. PASS needs relative L2 < 1e-2 vs fp64 on the same
// quantized cache, no NaN, and |lse - ref| < 2e-3.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mfa/config.h"
#include "mfa/launch.h"
#include "mfa/sm90_profile.cuh"

using namespace afdkit::mfa;

namespace afdkit::mfa {
namespace sm90 {
template <KvDtype kKv>
void launch_decode_sm90(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream);
}
namespace detail {
void launch_combine(const DecodeParams& p, const PlanBuffers& pb, cudaStream_t stream);
}
}  // namespace afdkit::mfa

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

template <class T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count = 0) { alloc(count); }
  void alloc(size_t count) {
    if (p) CK(cudaFree(p));
    n = count;
    p = nullptr;
    if (count) CK(cudaMalloc(&p, count * sizeof(T)));
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  void up(const std::vector<T>& h) { CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

static float bf2f(__nv_bfloat16 v) { return __bfloat162float(v); }
static uint8_t f2e4m3(float x) { return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); }
static float e4m32f(uint8_t c) {
  __nv_fp8_e4m3 v;
  v.__x = c;
  return float(v);
}

struct Case {
  const char* name;
  int batch, q_len, hq, hkv, page;
  KvDtype dtype;
  ScaleMode mode;
  std::vector<int> lens;  // empty: random in [0, max_len]
  int max_len;
  int parts;  // 0: from the SM count
};

struct Inputs {
  Case c;
  int num_pages = 0, max_pages = 0;
  std::vector<__nv_bfloat16> q;
  std::vector<uint8_t> kc, vc;  // raw cache bytes (fp8 codes or bf16)
  std::vector<float> ks, vs;    // per-tensor: 1 value; per-token: [pages, page, hkv]
  std::vector<int32_t> table, lens;
};

static int64_t elt(const Case& c) { return c.dtype == KvDtype::kFp8E4M3 ? 1 : 2; }

// Random cache with a shuffled page assignment; pages nobody uses stay NaN.
static Inputs make_inputs(const Case& c, std::mt19937& rng) {
  Inputs in;
  in.c = c;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> ud(0, std::max(c.max_len, 0));
  in.lens = c.lens.empty() ? std::vector<int>(c.batch) : c.lens;
  if (c.lens.empty())
    for (auto& l : in.lens) l = ud(rng);
  int need = 0;
  for (int l : in.lens) {
    in.max_pages = std::max(in.max_pages, (l + c.page - 1) / c.page);
    need += (l + c.page - 1) / c.page;
  }
  in.max_pages = std::max(in.max_pages, 1);
  in.num_pages = need + 3;  // spare NaN pages
  std::vector<int> perm(in.num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  in.table.assign(size_t(c.batch) * in.max_pages, -1);
  for (int b = 0, k = 0; b < c.batch; ++b)
    for (int j = 0; j < (in.lens[b] + c.page - 1) / c.page; ++j) in.table[size_t(b) * in.max_pages + j] = perm[k++];
  in.q.resize(size_t(c.batch) * c.q_len * c.hq * 256);
  for (auto& x : in.q) x = __float2bfloat16(nd(rng) * 2.f);
  const size_t rows = size_t(in.num_pages) * c.page * c.hkv;
  in.kc.assign(rows * 256 * elt(c), c.dtype == KvDtype::kFp8E4M3 ? 0x7f : 0xff);  // NaN
  in.vc = in.kc;
  const bool tok = c.mode == ScaleMode::kPerToken;
  in.ks.assign(tok ? rows : 1, tok ? NAN : 0.02f);
  in.vs.assign(tok ? rows : 1, tok ? NAN : 0.015f);
  for (int b = 0; b < c.batch; ++b)
    for (int t = 0; t < in.lens[b]; ++t)
      for (int h = 0; h < c.hkv; ++h) {
        const size_t row = (size_t(in.table[size_t(b) * in.max_pages + t / c.page]) * c.page + t % c.page) * c.hkv + h;
        float kx[256], vx[256], ka = 0, va = 0;
        for (int d = 0; d < 256; ++d) kx[d] = nd(rng), vx[d] = nd(rng), ka = std::max(ka, std::fabs(kx[d])),
                                    va = std::max(va, std::fabs(vx[d]));
        if (c.dtype == KvDtype::kBf16) {
          auto* kd = reinterpret_cast<__nv_bfloat16*>(in.kc.data()) + row * 256;
          auto* vd = reinterpret_cast<__nv_bfloat16*>(in.vc.data()) + row * 256;
          for (int d = 0; d < 256; ++d) kd[d] = __float2bfloat16(kx[d]), vd[d] = __float2bfloat16(vx[d]);
          continue;
        }
        const float ksc = tok ? ka / 448.f : in.ks[0], vsc = tok ? va / 448.f : in.vs[0];
        if (tok) in.ks[row] = ksc, in.vs[row] = vsc;
        for (int d = 0; d < 256; ++d) in.kc[row * 256 + d] = f2e4m3(kx[d] / ksc), in.vc[row * 256 + d] = f2e4m3(vx[d] / vsc);
      }
  return in;
}

// fp64 reference on the dequantized cache: out [b, t, hq, 256], lse [b, t, hq].
static void reference(const Inputs& in, float sm_scale, std::vector<double>& out, std::vector<double>& lse) {
  const Case& c = in.c;
  const int G = c.hq / c.hkv;
  out.assign(in.q.size(), 0.0);
  lse.assign(size_t(c.batch) * c.q_len * c.hq, -INFINITY);
  std::vector<double> kf, vf, s;
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.hkv; ++h) {
      const int L = in.lens[b];
      kf.assign(size_t(L) * 256, 0), vf.assign(size_t(L) * 256, 0);
      for (int t = 0; t < L; ++t) {
        const size_t row = (size_t(in.table[size_t(b) * in.max_pages + t / c.page]) * c.page + t % c.page) * c.hkv + h;
        for (int d = 0; d < 256; ++d) {
          if (c.dtype == KvDtype::kBf16) {
            kf[t * 256 + d] = bf2f(reinterpret_cast<const __nv_bfloat16*>(in.kc.data())[row * 256 + d]);
            vf[t * 256 + d] = bf2f(reinterpret_cast<const __nv_bfloat16*>(in.vc.data())[row * 256 + d]);
          } else {
            const double ksc = c.mode == ScaleMode::kPerToken ? in.ks[row] : in.ks[0];
            const double vsc = c.mode == ScaleMode::kPerToken ? in.vs[row] : in.vs[0];
            kf[t * 256 + d] = e4m32f(in.kc[row * 256 + d]) * ksc;
            vf[t * 256 + d] = e4m32f(in.vc[row * 256 + d]) * vsc;
          }
        }
      }
      for (int i = 0; i < c.q_len; ++i)
        for (int g = 0; g < G; ++g) {
          const int hq = h * G + g, vis = L - (c.q_len - 1 - i);
          const size_t qo = ((size_t(b) * c.q_len + i) * c.hq + hq) * 256;
          if (vis <= 0) continue;
          s.assign(vis, 0);
          double mx = -INFINITY;
          for (int t = 0; t < vis; ++t) {
            double acc = 0;
            for (int d = 0; d < 256; ++d) acc += double(bf2f(in.q[qo + d])) * kf[t * 256 + d];
            s[t] = acc * sm_scale;
            mx = std::max(mx, s[t]);
          }
          double sum = 0;
          for (int t = 0; t < vis; ++t) s[t] = std::exp(s[t] - mx), sum += s[t];
          for (int t = 0; t < vis; ++t)
            for (int d = 0; d < 256; ++d) out[qo + d] += s[t] / sum * vf[t * 256 + d];
          lse[(size_t(b) * c.q_len + i) * c.hq + hq] = mx + std::log(sum);
        }
    }
}

struct Device {
  Case c;
  int num_sms = 0;
  DevBuf<__nv_bfloat16> q, out;
  DevBuf<uint8_t> kc, vc;
  DevBuf<float> ks, vs, lse, o_part, lse_part;
  DevBuf<int32_t> table, lens, part_meta, batch_meta;
  DecodeParams p;
  PlanBuffers pb;
  void setup(const Inputs& in, int parts_override) {
    c = in.c;
    CK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
    q.alloc(in.q.size()), q.up(in.q);
    out.alloc(in.q.size());
    kc.alloc(in.kc.size()), kc.up(in.kc), vc.alloc(in.vc.size()), vc.up(in.vc);
    ks.alloc(in.ks.size()), ks.up(in.ks), vs.alloc(in.vs.size()), vs.up(in.vs);
    table.alloc(in.table.size()), table.up(in.table), lens.alloc(c.batch), lens.up(in.lens);
    lse.alloc(size_t(c.batch) * c.q_len * c.hq);
    p = DecodeParams{};
    p.q = q.p, p.q_stride_h = 256, p.q_stride_t = int64_t(c.hq) * 256, p.q_stride_b = int64_t(c.q_len) * c.hq * 256;
    p.k_cache = kc.p, p.v_cache = vc.p;
    p.kv_stride_head = 256, p.kv_stride_token = int64_t(c.hkv) * 256, p.kv_stride_page = int64_t(c.page) * c.hkv * 256;
    p.kv_dtype = c.dtype, p.scale_mode = c.mode, p.k_scale = ks.p, p.v_scale = vs.p;
    p.block_table = table.p, p.block_table_stride = in.max_pages, p.max_pages_per_seq = in.max_pages;
    p.seq_lens = lens.p, p.batch = c.batch, p.q_len = c.q_len, p.num_q_heads = c.hq, p.num_kv_heads = c.hkv;
    p.page_size = c.page, p.num_pages = in.num_pages, p.softmax_scale = 1.f / 16.f;
    p.out = out.p, p.out_stride_h = 256, p.out_stride_t = p.q_stride_t, p.out_stride_b = p.q_stride_b, p.lse = lse.p;
    PlanSizes sz = plan_sizes(c.batch, c.q_len, c.hq, c.hkv, num_sms);
    if (parts_override > 0) {  // same formula with a forced part count
      const int nrb = (c.q_len * (c.hq / c.hkv) + 63) / 64;
      sz = plan_sizes(c.batch, c.q_len, c.hq, c.hkv, parts_override * c.hkv * nrb);
    }
    part_meta.alloc(sz.part_meta_ints), batch_meta.alloc(std::max<int64_t>(sz.batch_meta_ints, 1));
    o_part.alloc(sz.o_partial_floats), lse_part.alloc(sz.lse_partial_floats);
    pb = PlanBuffers{part_meta.p, batch_meta.p, sz.num_sm_parts, o_part.p, lse_part.p};
  }
  void poison() {
    CK(cudaMemset(out.p, 0xff, out.n * 2));  // bf16 NaN
    CK(cudaMemset(lse.p, 0xff, lse.n * 4));
  }
};

struct Err {
  double rel_l2 = 0, lse_max = 0;
  bool nan = false;
};
static Err compare(const Device& d, const std::vector<double>& ro, const std::vector<double>& rl) {
  Err e;
  auto o = d.out.down();
  auto l = d.lse.down();
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    const double v = bf2f(o[i]);
    if (std::isnan(v)) e.nan = true;
    num += (v - ro[i]) * (v - ro[i]), den += ro[i] * ro[i];
  }
  e.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  for (size_t i = 0; i < l.size(); ++i) {
    if (std::isnan(l[i])) e.nan = true;
    if (std::isinf(rl[i]) || std::isinf(l[i])) {
      if (!(std::isinf(rl[i]) && std::isinf(l[i]))) e.lse_max = INFINITY;
      continue;
    }
    e.lse_max = std::max(e.lse_max, std::fabs(l[i] - rl[i]));
  }
  return e;
}
static bool pass(const Err& e) { return !e.nan && e.rel_l2 < 1e-2 && e.lse_max < 2e-3; }

static int run_case(const Case& c, std::mt19937& rng) {
  Inputs in = make_inputs(c, rng);
  std::vector<double> ro, rl;
  reference(in, 1.f / 16.f, ro, rl);
  Device d;
  d.setup(in, c.parts);
  d.poison();
  decode_simt(d.p, 0);
  CK(cudaDeviceSynchronize());
  const Err es = compare(d, ro, rl);
  std::printf("%-34s simt relL2 %.2e lse %.1e%s | ", c.name, es.rel_l2, es.lse_max, es.nan ? " NaN" : "");
  std::fflush(stdout);  // a hang in the sm90 kernel still shows the oracle's result
  d.poison();
  plan(d.p.seq_lens, c.batch, d.pb, 0);
  decode(d.p, d.pb, 0);
  CK(cudaDeviceSynchronize());
  const Err e9 = compare(d, ro, rl);
  const bool ok = pass(es) && pass(e9);
  std::printf("sm90 relL2 %.2e lse %.1e%s  parts %3d  %s\n", e9.rel_l2, e9.lse_max, e9.nan ? " NaN" : "",
              d.pb.num_sm_parts, ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

// append_kv vs a host implementation of the same convention, bit for bit.
static int check_append(ScaleMode mode, std::mt19937& rng) {
  const int T = 37, H = 2, page = 16, pages = 8;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__nv_bfloat16> k(size_t(T) * H * 256), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = __float2bfloat16(nd(rng) * (i % 97 == 0 ? 400.f : 3.f)),
                                        v[i] = __float2bfloat16(nd(rng));
  std::vector<int64_t> slots(T);
  std::vector<int> perm(pages * page);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int t = 0; t < T; ++t) slots[t] = t % 9 == 4 ? -1 : perm[t];
  DevBuf<__nv_bfloat16> dk(k.size()), dv(v.size());
  dk.up(k), dv.up(v);
  DevBuf<int64_t> ds(T);
  ds.up(slots);
  const size_t rows = size_t(pages) * page * H;
  DevBuf<uint8_t> kc(rows * 256), vc(rows * 256);
  CK(cudaMemset(kc.p, 0, kc.n));
  CK(cudaMemset(vc.p, 0, vc.n));
  std::vector<float> sc_init(mode == ScaleMode::kPerToken ? rows : 1, 0.0371f);
  DevBuf<float> ksd(sc_init.size()), vsd(sc_init.size());
  ksd.up(sc_init), vsd.up(sc_init);
  AppendKvParams a;
  a.k = dk.p, a.v = dv.p, a.k_stride_t = a.v_stride_t = H * 256, a.k_stride_h = a.v_stride_h = 256;
  a.num_tokens = T, a.num_kv_heads = H, a.slot_mapping = ds.p, a.k_cache = kc.p, a.v_cache = vc.p;
  a.kv_stride_head = 256, a.kv_stride_token = H * 256, a.kv_stride_page = int64_t(page) * H * 256;
  a.page_size = page, a.num_pages = pages, a.kv_dtype = KvDtype::kFp8E4M3, a.scale_mode = mode;
  a.k_scale = ksd.p, a.v_scale = vsd.p;
  append_kv(a, 0);
  CK(cudaDeviceSynchronize());
  auto kh = kc.down(), vh = vc.down();
  auto ksh = ksd.down(), vsh = vsd.down();
  int bad = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      if (slots[t] < 0) continue;
      const size_t row = size_t(slots[t]) * H + h;
      for (int which = 0; which < 2; ++which) {
        const auto& x = which ? v : k;
        float sc = 0.0371f, amax = 0;
        for (int d = 0; d < 256; ++d) amax = std::max(amax, std::fabs(bf2f(x[(size_t(t) * H + h) * 256 + d])));
        if (mode == ScaleMode::kPerToken) {
          sc = std::max(amax, 1e-12f) / 448.f;
          if ((which ? vsh : ksh)[row] != sc) ++bad;
        }
        for (int d = 0; d < 256; ++d) {
          const float xf = bf2f(x[(size_t(t) * H + h) * 256 + d]);
          const uint8_t want = f2e4m3(std::min(448.f, std::max(-448.f, xf / sc)));
          if ((which ? vh : kh)[row * 256 + d] != want) ++bad;
        }
      }
    }
  std::printf("append_kv %-10s mismatches %d  %s\n", mode == ScaleMode::kPerToken ? "per-token" : "per-tensor", bad,
              bad ? "FAIL" : "PASS");
  return bad ? 1 : 0;
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-side fill for the timing cases (host RNG over a GB would dominate the run):
// finite fp8 codes (|code| <= 240, never the NaN 0x7f/0xff) and bf16 q in (-2, 2).
__global__ void fill_kernel(uint8_t* kv, size_t n_kv, __nv_bfloat16* q, size_t n_q, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n_kv + n_q; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    if (i < n_kv) kv[i] = uint8_t(h & 0xf7) & 0x77 ? uint8_t(h & 0xf7) : uint8_t(0x30);
    else q[i - n_kv] = __float2bfloat16(float(h & 0xffff) / 16384.f - 2.f);
  }
}

// Tiles per part of a plan whose sequences all have `len` tokens (part_meta rows).
static std::vector<int> tiles_per_part(const DevBuf<int32_t>& pm, int parts, int len) {
  const auto m = pm.down();
  const int n = (len + 63) / 64;
  std::vector<int> tiles(parts, 0);
  for (int i = 0; i < parts; ++i) {
    const int32_t* r = m.data() + size_t(i) * cfg::kPartMetaInts;
    const int b0 = r[cfg::kMetaB0], t0 = r[cfg::kMetaT0], b1 = r[cfg::kMetaB1], t1 = r[cfg::kMetaT1];
    for (int b = b0; b <= b1; ++b) tiles[i] += (b == b1 ? t1 : n) - (b == b0 ? t0 : 0);
  }
  return tiles;
}

namespace prof = afdkit::mfa::sm90::prof;

// One profiled launch (-DAFDKIT_MFA_PROFILE build): per-CTA records -> average
// cycles per tile of each phase, CTA durations and the work split.
static void profile_launch(const char* name, const DecodeParams& p, const PlanBuffers& pb, int len) {
  const int nrb = (p.q_len * (p.num_q_heads / p.num_kv_heads) + 63) / 64;
  const int ctas = pb.num_sm_parts * p.num_kv_heads * nrb;
  DevBuf<unsigned long long> buf(size_t(ctas) * prof::kRecordSlots);
  CK(cudaMemset(buf.p, 0, buf.n * sizeof(unsigned long long)));
  prof::set_buffer(buf.p);
  decode(p, pb, 0);
  CK(cudaDeviceSynchronize());
  prof::set_buffer(nullptr);
  const auto r = buf.down();
  if (std::all_of(r.begin(), r.end(), [](unsigned long long v) { return v == 0; })) {
    std::printf("%s: no profile records (rebuild every .cu with -DAFDKIT_MFA_PROFILE)\n", name);
    return;
  }
  auto rec = [&](int cta, int slot) { return double(r[size_t(cta) * prof::kRecordSlots + slot]); };
  // " | name median / max" per event, in us after slot `base`, over the CTAs `keep` accepts;
  // events no CTA recorded are left out, so the separator goes before each
  auto event_stats = [&](int n, const int* ev, const char* const* names, auto keep, int base) {
    const char* sep = "";
    for (int k = 0; k < n; ++k) {
      std::vector<double> v;
      for (int i = 0; i < ctas; ++i)
        if (keep(i) && rec(i, ev[k]) > 0) v.push_back((rec(i, ev[k]) - rec(i, base)) * 1e-3);
      if (v.empty()) continue;
      std::sort(v.begin(), v.end());
      std::printf("%s %s %.2f / %.2f", sep, names[k], v[v.size() / 2], v.back());
      sep = " |";
    }
    std::printf("\n");
  };
  double t_min = 1e300, t_max = 0, halves = 0, ld[5] = {}, cs[2][prof::kConsSlots] = {};
  double d_min = 1e300, d_max = 0, d_sum = 0, tl_min = 1e300, tl_max = 0;
  int worst = -1, active = 0;
  for (int i = 0; i < ctas; ++i) {
    const double t0 = rec(i, prof::kT0);
    const double t1 = std::max({rec(i, prof::kT1Loader), rec(i, prof::kT1Cons0), rec(i, prof::kT1Cons1)});
    const double tiles = rec(i, prof::kCons + prof::kTiles);
    t_min = std::min(t_min, t0), t_max = std::max(t_max, t1);
    tl_min = std::min(tl_min, tiles), tl_max = std::max(tl_max, tiles);
    if (tiles > 0) ++active;
    if (t1 > 0 && tiles > 0) {
      const double d = (t1 - t0) * 1e-3;
      d_min = std::min(d_min, d), d_max = std::max(d_max, d), d_sum += d;
      if (worst < 0 || d > (std::max({rec(worst, prof::kT1Loader), rec(worst, prof::kT1Cons0), rec(worst, prof::kT1Cons1)}) - rec(worst, prof::kT0)) * 1e-3) worst = i;
    }
    halves += rec(i, prof::kHalves);
    for (int k = 0; k < 5; ++k) ld[k] += rec(i, prof::kLdWaitKFree + k);
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < prof::kConsSlots; ++k) cs[c][k] += rec(i, prof::kCons + c * prof::kConsSlots + k);
  }
  std::printf("== profile %s: %d CTAs (%d with tiles), tiles/CTA min %.0f max %.0f; CTA us min %.1f mean %.1f max %.1f;"
              " kernel span %.1f us\n", name, ctas, active, tl_min, tl_max, d_min, active ? d_sum / active : 0.,
              d_max, (t_max - t_min) * 1e-3);
  {  // first-segment events of the CTAs with tiles, us after the CTA's entry: median / max
    constexpr int kEvents = 15;
    const int ev[kEvents] = {prof::kEvConsMeta, prof::kEvLoaderReady, prof::kEvPagesReady, prof::kEvKIssued,
                             prof::kEvFirstIssue, prof::kEvQLoaded, prof::kEvQAll, prof::kEvQBarrier,
                             prof::kEvQStored, prof::kEvFirstVConv, prof::kEvFirstK, prof::kEvEpilogue,
                             prof::kEvEpiBothIn, prof::kEvEpiStores, prof::kT1Cons0};
    const char* names[kEvents] = {"cons0 has meta", "loader has lengths", "page ids", "K issued",
                                  "first copies issued", "Q loaded", "all Q pieces", "Q barrier", "Q stored",
                                  "first V converted", "first K landed", "last epilogue starts",
                                  "both consumers in it", "its stores start", "cons0 ends"};
    std::printf("  CTA timeline (us after entry, median / max over CTAs with tiles; kernel start spread %.1f us):",
                [&] {
                  double lo = 1e300, hi = 0;
                  for (int i = 0; i < ctas; ++i)
                    if (rec(i, prof::kCons + prof::kTiles) > 0) lo = std::min(lo, rec(i, prof::kT0)), hi = std::max(hi, rec(i, prof::kT0));
                  return hi > lo ? (hi - lo) * 1e-3 : 0.;
                }());
    event_stats(kEvents, ev, names, [&](int i) { return rec(i, prof::kCons + prof::kTiles) > 0; }, prof::kT0);
  }
  {  // the first segment boundary of CTAs with >= 2 segments, us after consumer 0's first
     // epilogue starts (consumer 1's start is negative when consumer 0 had the last tile)
    constexpr int kEvents = 6;
    const int ev[kEvents] = {prof::kEvB0Epi1, prof::kEvB0BothIn, prof::kEvB0Stores,
                             prof::kEvB0End, prof::kEvB1QStored, prof::kEvB1Tile};
    const char* names[kEvents] = {"cons1 epilogue starts", "both in", "stores start", "cons0 leaves",
                                  "next Q stored", "its first tile done"};
    auto two_segments = [&](int i) { return rec(i, prof::kEvB0Epi0) > 0 && rec(i, prof::kEvB1QStored) > 0; };
    int n = 0;
    for (int i = 0; i < ctas; ++i) n += two_segments(i);
    if (n > 0) {
      std::printf("  boundary timeline (%d CTAs; us after cons0's first epilogue starts, median / max):", n);
      event_stats(kEvents, ev, names, two_segments, prof::kEvB0Epi0);
    }
  }
  const double tiles_all = std::max(1.0, halves);  // the loader's record counts tiles
  std::printf("  loader (thread 0) cycles/tile: wait_k_free %7.0f  scales %7.0f  issue %7.0f  wait_v_free %7.0f\n",
              ld[0] / tiles_all, ld[1] / tiles_all, ld[2] / tiles_all, ld[3] / tiles_all);
  for (int c = 0; c < 2; ++c) {
    const double nt = std::max(1.0, cs[c][prof::kTiles]), ns = std::max(1.0, cs[c][prof::kSegments]);
    double sum = 0;
    for (int k = prof::kWaitK; k <= prof::kConvV; ++k) sum += cs[c][k];
    std::printf("  cons%d cycles/own tile: wait_v %6.0f conv_v %6.0f wait_k %7.0f qk %6.0f softmax %6.0f rescale %6.0f"
                " pv %6.0f | sum %7.0f | per segment (%.0f): q_load %6.0f epilogue %6.0f\n", c,
                cs[c][prof::kWaitV] / nt, cs[c][prof::kConvV] / nt, cs[c][prof::kWaitK] / nt, cs[c][prof::kQk] / nt,
                cs[c][prof::kSoftmax] / nt, cs[c][prof::kRescale] / nt, cs[c][prof::kPv] / nt, sum / nt, ns,
                cs[c][prof::kQload] / ns, cs[c][prof::kEpilogue] / ns);
  }
  if (worst >= 0) {
    const double nt = std::max(1.0, rec(worst, prof::kCons + prof::kTiles));
    const double t1 = std::max({rec(worst, prof::kT1Loader), rec(worst, prof::kT1Cons0), rec(worst, prof::kT1Cons1)});
    std::printf("  slowest CTA %d (SM %.0f): %.0f tiles, %.1f us, %.0f ns/tile; cons0 wait_k %.0f wait_v %.0f cycles/tile;"
                " loader wait_k_free %.0f wait_v_free %.0f cycles/tile\n", worst, rec(worst, prof::kSmid), nt,
                (t1 - rec(worst, prof::kT0)) * 1e-3, (t1 - rec(worst, prof::kT0)) / nt,
                rec(worst, prof::kCons + prof::kWaitK) / nt, rec(worst, prof::kCons + prof::kWaitV) / nt,
                rec(worst, prof::kLdWaitKFree) / nt, rec(worst, prof::kLdWaitVFree) / nt);
  }
  (void)len;
}

__global__ void empty_kernel() {}

// Two empty kernels launched as decode + combine are: the floor any two-kernel
// decode step pays per call.
static void launch_empty_pair(int blocks, cudaStream_t stream) {
  empty_kernel<<<blocks, 384, 0, stream>>>();
  empty_kernel<<<blocks, 256, 0, stream>>>();
  CK(cudaGetLastError());
}

static bool g_breakdown = false;  // --breakdown: also time the kernel and the combine apart

// Times decode (plan excluded: once per step) and a D2D copy of the same KV bytes.
// Sequences rotate over >= 512 MB of cache so that repeated runs stream from HBM.
// With `profile` it also makes one profiled launch (see profile_launch).
static void time_case(int batch, int len, bool check, bool profile = false) {
  const int page = 64, hq = 64, pages_per_seq = (len + page - 1) / page;
  const double kv_bytes = double(batch) * len * 512;
  const int rot = std::max(1, std::min(16, int(std::ceil(512e6 / kv_bytes))));
  const size_t pages = size_t(pages_per_seq) * batch * rot;
  DevBuf<uint8_t> kc(pages * page * 256), vc(pages * page * 256);
  DevBuf<__nv_bfloat16> q(size_t(batch) * hq * 256), out(q.n);
  fill_kernel<<<1024, 256>>>(kc.p, kc.n, q.p, q.n, 1u);
  fill_kernel<<<1024, 256>>>(vc.p, vc.n, q.p, 0, 2u);
  CK(cudaGetLastError());
  std::vector<float> one{0.02f};
  DevBuf<float> ks(1), vs(1), lse(size_t(batch) * hq);
  ks.up(one), vs.up(one);
  std::vector<int32_t> lens_h(batch, len), table_h(size_t(batch) * pages_per_seq * rot);
  for (size_t i = 0; i < table_h.size(); ++i) table_h[i] = int32_t(i);  // rotation r: rows r*batch..
  DevBuf<int32_t> lens(batch), table(table_h.size());
  lens.up(lens_h), table.up(table_h);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const PlanSizes sz = plan_sizes(batch, 1, hq, 1, sms);
  DevBuf<int32_t> pm(sz.part_meta_ints), bm(sz.batch_meta_ints);
  DevBuf<float> op(sz.o_partial_floats), lp(sz.lse_partial_floats);
  const PlanBuffers pb{pm.p, bm.p, sz.num_sm_parts, op.p, lp.p};
  DecodeParams p;
  p.q = q.p, p.q_stride_h = 256, p.q_stride_t = hq * 256, p.q_stride_b = hq * 256;
  p.k_cache = kc.p, p.v_cache = vc.p, p.kv_stride_head = 256, p.kv_stride_token = 256, p.kv_stride_page = page * 256;
  p.kv_dtype = KvDtype::kFp8E4M3, p.scale_mode = ScaleMode::kPerTensor, p.k_scale = ks.p, p.v_scale = vs.p;
  p.block_table_stride = pages_per_seq, p.max_pages_per_seq = pages_per_seq, p.seq_lens = lens.p;
  p.batch = batch, p.q_len = 1, p.num_q_heads = hq, p.num_kv_heads = 1, p.page_size = page;
  p.num_pages = int(pages), p.softmax_scale = 1.f / 16.f, p.out = out.p, p.out_stride_h = 256;
  p.out_stride_t = p.out_stride_b = hq * 256, p.lse = lse.p;
  auto at_rot = [&](int r) { p.block_table = table.p + size_t(r) * batch * pages_per_seq; };
  at_rot(0);
  plan(p.seq_lens, batch, pb, 0);
  double simt_err = -1;
  if (check) {  // sm90 vs the SIMT oracle (the CPU reference is too slow here)
    decode_simt(p, 0);
    auto a = out.down();
    decode(p, pb, 0);
    auto b = out.down();
    double num = 0, den = 0;
    bool nan = false;
    for (size_t i = 0; i < a.size(); ++i) {
      const double x = bf2f(a[i]), y = bf2f(b[i]);
      nan |= std::isnan(y);
      num += (x - y) * (x - y), den += x * x;
    }
    simt_err = nan ? NAN : std::sqrt(num / std::max(den, 1e-30));
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> td, tc;
  for (int it = 0; it < 3 + 5 * rot && it < 3 + 40; ++it) {
    at_rot(it % rot);
    CK(cudaEventRecord(e0));
    decode(p, pb, 0);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (it >= 3) td.push_back(ms);
  }
  const size_t copy_bytes = std::min(kc.n, size_t(std::max(kv_bytes / 2, 256e6)));
  for (int it = 0; it < 13; ++it) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(vc.p, kc.p, copy_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (it >= 3) tc.push_back(ms);
  }
  const double t_dec = median(td) * 1e-3, t_copy = median(tc) * 1e-3;
  const double bw_dec = kv_bytes / t_dec, bw_copy = 2.0 * copy_bytes / t_copy;  // copy: read + write
  const auto tiles = tiles_per_part(pm, sz.num_sm_parts, len);
  const int max_tiles = *std::max_element(tiles.begin(), tiles.end());
  std::printf("batch %3d x %6d  decode %8.1f us  %6.0f GB/s | copy %6.0f GB/s | ratio %.3f | parts %3d rot %2d"
              " | tiles/part max %d mean %.1f | %.0f ns per tile of the largest part",
              batch, len, t_dec * 1e6, bw_dec * 1e-9, bw_copy * 1e-9, bw_dec / bw_copy, sz.num_sm_parts, rot, max_tiles,
              double(batch) * ((len + 63) / 64) / sz.num_sm_parts, t_dec * 1e9 / std::max(1, max_tiles));
  if (check) std::printf(" | sm90-vs-simt relL2 %.2e", simt_err);
  std::printf("\n");
  if (g_breakdown) {
    // 20 calls captured back-to-back in one CUDA graph, replayed (device time per call,
    // no host launch cost, as in a captured decode step): the whole op, the sm90 kernel
    // alone and the combine alone (reading the partials the last decode left).
    const int n = 20;
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto per_call_us = [&](auto&& launch) {
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      for (int it = 0; it < n; ++it) at_rot(it % rot), launch(st);
      CK(cudaStreamEndCapture(st, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, st));
      std::vector<float> ts;
      for (int r = 0; r < 5; ++r) {
        CK(cudaEventRecord(e0, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms);
      }
      CK(cudaGraphExecDestroy(ge));
      CK(cudaGraphDestroy(g));
      return median(ts) * 1e3 / n;
    };
    const double full = per_call_us([&](cudaStream_t s) { decode(p, pb, s); });
    const double kern = per_call_us([&](cudaStream_t s) { sm90::launch_decode_sm90<KvDtype::kFp8E4M3>(p, pb, s); });
    decode(p, pb, st);
    const double comb = per_call_us([&](cudaStream_t s) { detail::launch_combine(p, pb, s); });
    const double floor = per_call_us([&](cudaStream_t s) { launch_empty_pair(sz.num_sm_parts, s); });
    CK(cudaStreamDestroy(st));
    std::printf("  back-to-back, us per call: decode %.1f | sm90 kernel alone %.1f | combine alone %.1f | two empty"
                " kernels %.1f | copy-time of the KV %.1f\n", full, kern, comb, floor, kv_bytes / bw_copy * 1e6);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  if (profile) {
    at_rot(1 % rot);  // a rotation not touched by the last timed launches
    char name[64];
    std::snprintf(name, sizeof(name), "batch %d x %d", batch, len);
    profile_launch(name, p, pb, len);
  }
}

int main(int argc, char** argv) {
  bool small = false, timing = true, profile = false, sweep = false;
  int one_b = 0, one_len = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--one") && i + 2 < argc) one_b = std::atoi(argv[i + 1]), one_len = std::atoi(argv[i + 2]);
    if (!std::strcmp(argv[i], "--small")) small = true;
    if (!std::strcmp(argv[i], "--no-time")) timing = false;
    if (!std::strcmp(argv[i], "--profile")) profile = true;
    if (!std::strcmp(argv[i], "--breakdown")) g_breakdown = true, small = false;
    if (!std::strcmp(argv[i], "--sweep")) sweep = true, g_breakdown = true;
  }
  std::mt19937 rng(20240607);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const auto F = KvDtype::kFp8E4M3;
  const auto B = KvDtype::kBf16;
  const auto PT = ScaleMode::kPerTensor, TK = ScaleMode::kPerToken, NO = ScaleMode::kNone;
  if (one_b > 0) {  // one shape's timing only: a short run to put under a profiler
    time_case(one_b, one_len, false);
    return 0;
  }
  if (profile) {  // timing + phase table of the two headline shapes, no correctness matrix
    std::printf("-- profile: fp8 per-tensor, q_len 1, 64 heads / 1 kv head, page 64 --\n");
    time_case(64, 4096, true, true);
    time_case(1, 32768, true, true);
    return 0;
  }
  if (sweep) {  // fixed cost per call vs tiles per part: small batches over 1..16 tiles per CTA
    std::printf("-- sweep: fp8 per-tensor, q_len 1, 64 heads / 1 kv head, page 64, back-to-back --\n");
    for (int b : {1, 8})
      for (int len : {4096, 8192, 16384, 32768, 65536}) time_case(b, len, false);
    return 0;
  }
  std::vector<Case> cases;
  if (small) {
    cases = {{"small fp8 q1 g16", 2, 1, 16, 1, 16, F, PT, {70, 3}, 0, 0},
             {"small bf16 q2 g16 split", 2, 2, 16, 1, 32, B, NO, {130, 1}, 0, 3}};
    timing = false;
  } else {
    cases = {
        {"fp8 pt q1 g64 p64", 4, 1, 64, 1, 64, F, PT, {}, 700, 0},
        {"fp8 pt q1 g64 p64 nosplit", 3, 1, 64, 1, 64, F, PT, {}, 700, 1},
        {"fp8 pt q1 g64 parts7", 5, 1, 64, 1, 64, F, PT, {}, 900, 7},
        {"fp8 tok q1 g64 p64", 4, 1, 64, 1, 64, F, TK, {}, 700, 0},
        {"fp8 pt q4 g64 p16 (rows 256)", 3, 4, 64, 1, 16, F, PT, {0, 2, 300}, 0, 0},
        {"fp8 tok q2 g64 p32", 3, 2, 64, 1, 32, F, TK, {1, 65, 513}, 0, 0},
        {"fp8 pt q3 g16 hkv2 p64", 3, 3, 32, 2, 64, F, PT, {}, 400, 0},
        {"fp8 tok q1 g32 hkv4 p16", 2, 1, 128, 4, 16, F, TK, {}, 300, 0},
        {"fp8 pt q1 g128 p64", 2, 1, 128, 1, 64, F, PT, {}, 500, 0},
        {"bf16 q1 g64 p64", 4, 1, 64, 1, 64, B, NO, {}, 700, 0},
        {"bf16 q2 g64 p16 hkv2", 2, 2, 128, 2, 16, B, NO, {}, 300, 0},
        {"fp8 pt lens 0/1/q_len edge", 5, 4, 64, 1, 64, F, PT, {0, 1, 3, 4, 64}, 0, 2},
        {"fp8 pt long 4096 split", 2, 1, 64, 1, 64, F, PT, {4096, 2500}, 0, 0},
    };
  }
  int fails = 0;
  for (const auto& c : cases) fails += run_case(c, rng);
  if (!small) fails += check_append(ScaleMode::kPerTensor, rng) + check_append(ScaleMode::kPerToken, rng);
  std::printf("correctness: %s (%d failing)\n", fails ? "FAIL" : "PASS", fails);
  if (timing) {
    std::printf("-- timing: fp8 per-tensor, q_len 1, 64 heads / 1 kv head, page 64 --\n");
    time_case(64, 4096, true);
    time_case(64, 8192, false);
    time_case(64, 32768, false);
    time_case(1, 32768, true);
    time_case(8, 32768, false);
    time_case(128, 4096, false);
  }
  return fails ? 1 : 0;
}
