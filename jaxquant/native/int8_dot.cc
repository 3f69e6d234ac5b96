// int8 x int8 -> int32 matrix product for XLA:CPU, called through XLA's FFI.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]     x: (M, K) s8, w: (N, K) s8
//
// The weight is stored (N, K), contracted axis last (jaxquant stores
// per-channel weights so on CPUs), so each output feature reads one
// contiguous row. Sums are exact int32, as XLA's dot(s8, s8) -> s32: the
// caller keeps K within the int32 bound (jaxquant's planner does), so both
// give the same integers, bit for bit.
//
// Why a kernel: XLA:CPU has no fast int8 path for a few rows (decode). Here
// the weight streams from memory once per call, whatever M: output features
// are taken in tiles small enough to stay in L2 while every block of rows
// passes over them. Tiles are shared among XLA's intra-op threads.
//
// The inner loop is chosen at run time from the CPU's features ('variant'
// attribute: 0 the best this CPU has, else a forced one, for tests):
//   1 portable C++, 2 AVX2 (int8 widened to int16, vpmaddwd: exact, no
//   saturation, unlike vpmaddubsw). Nothing is compiled for the build
//   machine's own CPU (-march=native): one binary serves every x86-64.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxquant::kAvx2;
using jaxquant::kBest;
using jaxquant::kRowBlock;

namespace {

// out[r, n] for r < rows, n in [n0, n1): x rows start at x, stride k.
void BlockPortable(const int8_t* x, int64_t rows, const int8_t* w,
                   int64_t n0, int64_t n1, int64_t k, int32_t* out,
                   int64_t out_stride) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * k;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* xr = x + r * k;
      int32_t acc = 0;
      for (int64_t i = 0; i < k; ++i) acc += int32_t{xr[i]} * wr[i];
      out[r * out_stride + n] = acc;
    }
  }
}

#ifdef JAXQUANT_X86
using jaxquant::Sum8;

// Output features n and n + 1 (when `two`) for R rows: each weight vector
// loaded serves R rows, each activation vector two features.
template <int R>
__attribute__((target("avx2"))) inline void PairAvx2(
    const int8_t* x, const int16_t* x16, const int8_t* w, int64_t n,
    bool two, int64_t k, int32_t* out, int64_t out_stride) {
  const int64_t vec_k = k - k % 16;
  const int8_t* w0 = w + n * k;
  const int8_t* w1 = two ? w0 + k : w0;
  __m256i acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  for (int64_t i = 0; i < vec_k; i += 16) {
    const __m256i a = _mm256_cvtepi8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + i)));
    const __m256i b = _mm256_cvtepi8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + i)));
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(x16 + r * k + i));
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(xv, a));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(xv, b));
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t t0 = Sum8(acc0[r]), t1 = Sum8(acc1[r]);
    for (int64_t i = vec_k; i < k; ++i) {
      t0 += int32_t{x[r * k + i]} * w0[i];
      t1 += int32_t{x[r * k + i]} * w1[i];
    }
    out[r * out_stride + n] = t0;
    if (two) out[r * out_stride + n + 1] = t1;
  }
}

// As BlockPortable; x16 holds the same rows widened to int16 (stride k).
template <int R>
__attribute__((target("avx2"))) void RowsAvx2(
    const int8_t* x, const int16_t* x16, const int8_t* w, int64_t n0,
    int64_t n1, int64_t k, int32_t* out, int64_t out_stride) {
  for (int64_t n = n0; n < n1; n += 2) {
    PairAvx2<R>(x, x16, w, n, n + 1 < n1, k, out, out_stride);
  }
}

void BlockAvx2(const int8_t* x, const int16_t* x16, int64_t rows,
               const int8_t* w, int64_t n0, int64_t n1, int64_t k,
               int32_t* out, int64_t out_stride) {
  static_assert(kRowBlock == 4, "one RowsAvx2 instance per block size");
  switch (rows) {
    case 1: return RowsAvx2<1>(x, x16, w, n0, n1, k, out, out_stride);
    case 2: return RowsAvx2<2>(x, x16, w, n0, n1, k, out, out_stride);
    case 3: return RowsAvx2<3>(x, x16, w, n0, n1, k, out, out_stride);
    default: return RowsAvx2<4>(x, x16, w, n0, n1, k, out, out_stride);
  }
}
#endif

// Output features [n0, n1) for every row of x.
void Tile(int32_t variant, const int8_t* x, const int16_t* x16, int64_t m,
          const int8_t* w, int64_t n0, int64_t n1, int64_t k, int32_t* out,
          int64_t n) {
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, m - r0);
#ifdef JAXQUANT_X86
    if (variant == kAvx2) {
      BlockAvx2(x + r0 * k, x16 + r0 * k, rows, w, n0, n1, k, out + r0 * n, n);
      continue;
    }
#endif
    (void)x16;
    BlockPortable(x + r0 * k, rows, w, n0, n1, k, out + r0 * n, n);
  }
}

ffi::Error Int8DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                       ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out,
                       int32_t variant) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "jaxquant_int8_dot: expects x (M, K) and w (N, K) int8");
  }
  if (variant == kBest) variant = jaxquant::Best();
  if (!jaxquant::Supported(variant)) {
    return ffi::Error::InvalidArgument(
        "jaxquant_int8_dot: variant " + std::to_string(variant) +
        " is not supported by this CPU or build");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  int32_t* y = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(y, 0, sizeof(int32_t) * m * n);
    return ffi::Error::Success();
  }
  const int8_t* xs = x.typed_data();
  std::vector<int16_t> x16(variant == kAvx2 ? m * k : 0);
  std::copy(xs, xs + x16.size(), x16.begin());
  const int64_t tile = std::max<int64_t>(1, jaxquant::kTileBytes / k);
  const int64_t tiles = (n + tile - 1) / tile;
  jaxquant::ParallelTiles(pool, tiles, [&, tile](int64_t t) {
    Tile(variant, xs, x16.data(), m, w.typed_data(), t * tile,
         std::min(n, (t + 1) * tile), k, y, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantInt8Dot, Int8DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("variant"));
