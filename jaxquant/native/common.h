// What jaxquant's kernels share: the inner-loop variants and their run-time
// choice, and the split of output-feature tiles over XLA's intra-op threads.

#ifndef JAXQUANT_NATIVE_COMMON_H_
#define JAXQUANT_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXQUANT_X86 1
#endif

namespace jaxquant {

// The 'variant' attribute of every kernel: 0 the best this CPU runs, else
// a forced one (tests run each the CPU supports).
enum Variant : int32_t { kBest = 0, kPortable = 1, kAvx2 = 2 };

inline bool Supported(int32_t variant) {
  switch (variant) {
    case kPortable:
      return true;
#ifdef JAXQUANT_X86
    case kAvx2:
      return __builtin_cpu_supports("avx2");
#endif
    default:
      return false;
  }
}

inline int32_t Best() { return Supported(kAvx2) ? kAvx2 : kPortable; }

// Rows of x handled together: each weight vector loaded serves this many.
constexpr int64_t kRowBlock = 4;
// Weight bytes per tile of output features: kept in L2 while every block
// of rows passes over it, so the weight streams from memory once per call.
constexpr int64_t kTileBytes = 128 * 1024;

#ifdef JAXQUANT_X86
__attribute__((target("avx2"))) inline int32_t Sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v),
                            _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// Runs tile(t) for t in [0, tiles) on the caller and XLA's intra-op threads.
// The caller takes tiles too, so it finishes even if no pool thread is free;
// workers that start after the last tile is taken return at once.
template <typename F>
void ParallelTiles(xla::ffi::ThreadPool& pool, int64_t tiles, F tile) {
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, tiles, tile] {
    int64_t finished = 0;
    for (int64_t t; (t = shared->next.fetch_add(1)) < tiles; ++finished) {
      tile(t);
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->done += finished;
      if (shared->done == tiles) shared->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tiles - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    auto copy = work;  // Schedule takes ownership of its task
    pool.Schedule(std::move(copy));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == tiles; });
}

}  // namespace jaxquant

#endif  // JAXQUANT_NATIVE_COMMON_H_
