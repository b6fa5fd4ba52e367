// Optional phase profile of the sm90 decode kernel (compile everything with
// -DAFDKIT_MFA_PROFILE; without it every macro below expands to nothing and the
// kernel is unchanged). One representative thread per role (thread 0 of WG0, of
// WG1, of WG2) sums the 32-bit %clock deltas of each phase in registers and
// writes one record per CTA at the end; the CTA also records globaltimer at entry
// and at exit of each role and its SM id. dev/mfa/harness.cu --profile reads them.
#pragma once
#include <cstdint>

namespace afdkit::mfa::sm90::prof {

// Slots of one CTA record (uint64 each).
enum Slot : int {
  kT0 = 0,         // globaltimer at kernel entry (ns)
  kT1Loader,       // globaltimer when the loader role ends
  kT1Cons0,        // ... consumer 0 ends
  kT1Cons1,        // ... consumer 1 ends
  kSmid,
  kHalves,         // K half-tiles converted by the loader (= tiles)
  kLdWaitKFree,    // loader: wait raw_k_empty[stage] (the K stage's last tile not yet past QK^T)
  kLdScales,       // loader: per-token scale loads and stores + arrive
  kLdIssue,        // loader: copy issue (K boxes, V rows, next page ids)
  kLdWaitVFree,    // loader: wait raw_v_empty[stage] (V not yet converted by its consumer)
  kLdSpare,        // unused
  kCons = 11,      // consumer c: slots kCons + c * kConsSlots + ConsSlot
  kConsSlots = 11,
  // globaltimer events (ns) of the CTA's first segment, for the fixed cost per CTA
  kEvFirstIssue = kCons + 2 * kConsSlots,  // loader: first K and V copies issued
  kEvQStored,      // consumer 0: Q of the first segment in shared memory (after the barrier)
  kEvFirstK,       // consumer 0: its first K tile has landed
  kEvEpilogue,     // consumer 0: start of its last epilogue
  kEvLoaderReady,  // loader: its part's sequence lengths read, before the first page id
  kEvConsMeta,     // consumer 0: its part's metadata read
  kEvQLoaded,      // consumer 0 (thread 0): its first Q piece back in registers
  kEvPagesReady,   // loader: the first tile's page ids in registers
  kEvKIssued,      // loader: the first K tile's boxes issued (before the V copy)
  kEvEpiBothIn,    // consumer 0: past the first barrier of its last epilogue (consumer 1 is there too)
  kEvEpiStores,    // consumer 0: merge done, its last epilogue's stores start
  kEvQAll,         // consumer 0 (thread 0): all eight of its first Q pieces back in registers
  kEvQBarrier,     // consumer 0: past the barrier before its first Q store (consumer 1 there too)
  kEvFirstVConv,   // consumer 0: its first V tile converted (before the first K wait)
  // The first segment boundary of CTAs with >= 2 segments (what a boundary costs: the
  // plan charges 6 tiles for it, see config.h)
  kEvB0Epi0,       // consumer 0: its first segment's epilogue starts
  kEvB0Epi1,       // consumer 1: ditto (before consumer 0's = consumer 0 had the last tile)
  kEvB0BothIn,     // consumer 0: past that epilogue's exchange barrier
  kEvB0Stores,     // consumer 0: that epilogue's stores start
  kEvB0End,        // consumer 0: leaves that epilogue
  kEvB1QStored,    // consumer 0: Q of the second segment stored (after its barrier)
  kEvB1Tile,       // consumer 0: its first tile of the second segment done (PV waited)
  kRecordSlots,    // 54
};
enum ConsSlot : int {
  kTiles = 0,
  kSegments,
  kWaitK,     // wait k_full
  kQk,        // QK^T wgmma (issue + wait), per-token K scale
  kRescale,   // O *= alpha (skipped by warps whose rows kept their max)
  kSoftmax,   // online softmax
  kWaitV,     // wait for the V copy (raw_v_full)
  kPv,        // P fragments + PV wgmma
  kConvV,     // convert own V + release the raw stage + warpgroup barrier
  kQload,     // per segment: Q barriers + load
  kEpilogue,  // per segment: epilogue
};

struct Args {
  unsigned long long* buf = nullptr;  // [grid.x * grid.y][kRecordSlots]
};

// Host side (decode.cu): the buffer the next launches write, nullptr = off.
void set_buffer(unsigned long long* buf);
unsigned long long* buffer();

}  // namespace afdkit::mfa::sm90::prof

#ifdef AFDKIT_MFA_PROFILE
namespace afdkit::mfa::sm90::prof {
__device__ __forceinline__ uint32_t clk() {
  uint32_t c;
  asm volatile("mov.u32 %0, %%clock;" : "=r"(c)::"memory");
  return c;
}
__device__ __forceinline__ uint64_t gtime() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ uint32_t smid() {
  uint32_t s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
}  // namespace afdkit::mfa::sm90::prof
#define MFA_PROF(...) __VA_ARGS__
// Adds the cycles since `mark` to acc[slot] and moves `mark` to now.
#define MFA_PROF_LAP(acc, slot, mark)                          \
  do {                                                         \
    const uint32_t now_ = ::afdkit::mfa::sm90::prof::clk();    \
    (acc)[slot] += now_ - (mark);                              \
    (mark) = now_;                                             \
  } while (0)
#else
#define MFA_PROF(...)
#define MFA_PROF_LAP(acc, slot, mark) \
  do {                                \
  } while (0)
#endif
