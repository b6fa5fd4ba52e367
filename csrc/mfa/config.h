// Compile-time constants of the MFA decode kernels, in one place, with the
// invariants they rely on. Host and device code include this header.
#pragma once
#include <cstdint>

namespace afdkit::mfa::cfg {

// ---- the op ----------------------------------------------------------------
constexpr int kHeadDim = 256;      // Step-3 MFA: one K and one V head of 256
constexpr int kMaxQLen = 4;        // decode + up to 3 MTP tokens
constexpr int kHeadGroupUnit = 16; // heads per KV head: a multiple of 16
constexpr float kE4M3Max = 448.0f;
constexpr float kMinAmax = 1e-12f; // per-token scale floor, as quant/ uses
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- shared by the plan, the sm90 kernel and combine ------------------------
constexpr int kTileN = 64;            // KV tokens per tile (one wgmma N / K step set)
// Cost of a (part, sequence) visit in the plan, in tiles: the wait for the other
// consumer's last tile, the merge and stores, the next Q and its conversion. Measured, not
// modelled: 6 was 3-6 % faster than 2 at 64 x 8K, 8 x 32K and 128 x 4K and no slower
// elsewhere (H100, 2 / 4 / 6 / 8 in one call; bench/results/2026-12-07-h100-mfa-v6-plan-visit-cost.md).
#ifndef AFDKIT_MFA_PLAN_OVERHEAD
#define AFDKIT_MFA_PLAN_OVERHEAD 6
#endif
constexpr int kPlanOverheadTiles = AFDKIT_MFA_PLAN_OVERHEAD;
constexpr int kPartMetaInts = 8;      // ints per part in PlanBuffers::part_meta
// A part_meta row: the part's work (b0, t0) .. (b1, t1) in its first 16 bytes, which the
// kernel reads in one load (the rest of the row is 0, reserved).
constexpr int kMetaB0 = 0, kMetaT0 = 1, kMetaB1 = 2, kMetaT1 = 3;
constexpr int kBatchMetaInts = 4;     // ints per sequence in PlanBuffers::batch_meta: splits,
                                      // first partial slot, first part, 0 (one 16-byte load)
constexpr int kPlanThreads = 32;

// ---- sm90 kernel ---------------------------------------------------------------
constexpr int kRowsPerCta = 64;        // one wgmma M; rows = q_len x heads-per-kv, padded
constexpr int kWarpgroup = 128;
constexpr int kNumConsumerWg = 2;      // consumer c takes the tiles j with j % 2 == c (all 256 dims)
constexpr int kThreads = kWarpgroup * (1 + kNumConsumerWg); // WG0 issues the copies
constexpr int kMergeDims = kHeadDim / kNumConsumerWg;  // epilogue: consumer c writes dims [128c, +128)
// setmaxnreg targets. The pool is what the launch allocated: 168 registers (the cap
// for 384 threads) x 384; asking for more makes setmaxnreg.inc wait forever. The
// loader only issues copies (and stores per-token scales), so it keeps 56; the
// consumers hold O (64 x 256 fp32: 128 registers) + S + P and get the rest.
constexpr int kLaunchRegs = 168;
constexpr int kLoaderRegs = 56;
constexpr int kConsumerRegs = 224;
// fp8 QK^T (16 K-steps: 2 Q terms x 8 x 32 dims): K-steps of the high Q term per
// fresh wgmma accumulator, added in fp32 on the CUDA cores (1, 2, 4 or 8; the low term
// is chained). 16 = every step of both terms chained into one accumulator, no promotion
// (too coarse: see docs/mfa-decode.md, Numerics).
#ifndef AFDKIT_MFA_QK_PROMOTE
#define AFDKIT_MFA_QK_PROMOTE 2
#endif
constexpr int kQkPromoteSteps = AFDKIT_MFA_QK_PROMOTE;
constexpr int kSwizzleBytes = 128;     // 128B swizzle: 64 fp16 (128 e4m3) per swizzle row
constexpr int kSwizzleCols = kSwizzleBytes / 2;
constexpr int kOpTileBytes = kTileN * kHeadDim * 2;   // one fp16/bf16 64x256 operand tile
constexpr int kColBlockBytes = kTileN * kSwizzleBytes; // 64 rows x 128 B = 8 KB
constexpr int kVopBuffers = 2;         // one converted V tile per consumer
constexpr float kPerTokenVShift = 1024.0f; // P*v_scale*2^10 keeps fp16 P normal

// Raw stages hold one K or one V half-tile (64 rows of the cache's dtype). K lands
// through a tensor map already in the 128B-swizzled operand layout and QK^T reads it
// in place (fp8: e4m3 wgmma against Q split into two e4m3 terms); V is converted by
// the tile's consumer. Both rings are released by the consumer of the tile, K after
// its QK^T, V after its conversion. Per-token scales: k_scale per K stage, v_scale in
// kKStages + 2 slots (a slot is rewritten only after the loader saw K(t - kKStages)
// released, i.e. after the PV of tile t - kKStages - 2 by the same argument).
template <int kKvBytes>
struct RawRing {
  static constexpr int kHalfTileBytes = kTileN * kHeadDim * kKvBytes;
  static constexpr int kKStages = kKvBytes == 1 ? 3 : 2;
  static constexpr int kVStages = kKvBytes == 1 ? 4 : 2;
  static constexpr int kVScaleSlots = kKStages + 2;
  static_assert(kKStages >= 1 && kVStages >= 2, "one K stage and one V stage per consumer at least");
};

// ---- SIMT oracle ------------------------------------------------------------------
constexpr int kSimtRows = 16;     // rows of one CTA
constexpr int kSimtChunk = 64;    // tokens per scoring chunk
constexpr int kSimtThreads = 256; // one thread per output dim

// ---- append / combine --------------------------------------------------------------
constexpr int kAppendWarps = 8;
constexpr int kCombineWarps = 8;          // warps per combine block (1..8 of them per output row)

static_assert(kHeadDim == 256, "kernels index dims with 256-wide rows");
static_assert(kSimtThreads == kHeadDim, "SIMT: one thread per dim");
static_assert(kRowsPerCta == 64, "one wgmma M=64 per consumer warpgroup");
static_assert(kVopBuffers == kNumConsumerWg, "V operand buffer c belongs to consumer c");
static_assert(kTileN == 64 && kTileN % 16 == 0, "tile = 4 wgmma K-steps of 16 tokens");
static_assert(kHeadDim % kSwizzleCols == 0, "column blocks of 64 fp16");
static_assert(kThreads == 384, "1 loader + 2 consumer warpgroups");
static_assert(kLaunchRegs * kThreads <= 65536 && kLaunchRegs % 8 == 0, "launch allocation");
static_assert(kLoaderRegs * kWarpgroup + kConsumerRegs * kWarpgroup * kNumConsumerWg <= kLaunchRegs * kThreads,
              "setmaxnreg can only redistribute the registers the launch allocated");
static_assert(kLoaderRegs % 8 == 0 && kConsumerRegs % 8 == 0, "setmaxnreg wants multiples of 8");
static_assert(kTileN % 64 == 0, "a tile holds whole pages of 16, 32 or 64 tokens");
static_assert(kPartMetaInts % 4 == 0 && kPartMetaInts >= 4 && kBatchMetaInts == 4,
              "part_meta and batch_meta rows are read as 16-byte pieces");

}  // namespace afdkit::mfa::cfg
