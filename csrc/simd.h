// Eight-lane fp32 vectors (GCC/Clang vector extensions) and the element formats the CPU kernels read and write:
// float32, bfloat16 and float16, converted to and from fp32 on load and store. The same source compiles for any x86-64
// level; with -march=native on an AVX2/FMA machine every f32x8 operation is one ymm instruction.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace uniter_fast {
namespace simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef _Float16 f16x8 __attribute__((vector_size(16)));

constexpr int kWidth = 8;

// a * b + c, fused (one rounding) where the target has FMA; the build uses -ffp-contract=off, so this is explicit.
inline f32x8 fma(f32x8 a, f32x8 b, f32x8 c) {
#if defined(__FMA__)
  return (f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline float fma(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// Stores 8 lanes at a 32-byte aligned address bypassing the caches (no read for ownership of the line) where the
// target has AVX; the caller ends with store_fence() before the data is read by another thread.
inline void stream8(float* p, f32x8 v) {
#if defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

inline void store_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Transposes the 8 x 8 block held in r[0..7] (row i in r[i]) in place.
inline void transpose8(f32x8 (&r)[8]) {
#if defined(__AVX__)
  const __m256 t0 = _mm256_unpacklo_ps((__m256)r[0], (__m256)r[1]), t1 = _mm256_unpackhi_ps((__m256)r[0], (__m256)r[1]);
  const __m256 t2 = _mm256_unpacklo_ps((__m256)r[2], (__m256)r[3]), t3 = _mm256_unpackhi_ps((__m256)r[2], (__m256)r[3]);
  const __m256 t4 = _mm256_unpacklo_ps((__m256)r[4], (__m256)r[5]), t5 = _mm256_unpackhi_ps((__m256)r[4], (__m256)r[5]);
  const __m256 t6 = _mm256_unpacklo_ps((__m256)r[6], (__m256)r[7]), t7 = _mm256_unpackhi_ps((__m256)r[6], (__m256)r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = (f32x8)_mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = (f32x8)_mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = (f32x8)_mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = (f32x8)_mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = (f32x8)_mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = (f32x8)_mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = (f32x8)_mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = (f32x8)_mm256_permute2f128_ps(u3, u7, 0x31);
#else
  for (int i = 0; i < 8; ++i)
    for (int j = i + 1; j < 8; ++j) {
      const float v = r[i][j];
      r[i][j] = r[j][i];
      r[j][i] = v;
    }
#endif
}

inline f32x8 splat(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

inline float hsum(f32x8 v) {
  // pairwise, so that the order matches a tree reduction: ((0+4)+(2+6)) + ((1+5)+(3+7))
  const float a = v[0] + v[4], b = v[1] + v[5], c = v[2] + v[6], d = v[3] + v[7];
  return (a + c) + (b + d);
}

// Element formats: `Storage` is the C++ type of one element; load8/store8 move eight consecutive elements (no
// alignment needed), load1/store1 one element. Stores round to nearest even, like torch's .to(dtype).
struct Float32 {
  using Storage = float;
  static f32x8 load8(const float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
  static float load1(const float* p) { return *p; }
  static void store1(float* p, float x) { *p = x; }
};

struct BFloat16 {
  using Storage = uint16_t;
  static f32x8 load8(const uint16_t* p) {
#if defined(__AVX2__)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (f32x8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
    return (f32x8)bits;
#endif
  }
  static void store8(uint16_t* p, f32x8 v) {
    const u32x8 bits = (u32x8)v;
    const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const u32x8 is_nan = (u32x8)(v != v);  // all ones where NaN; NaN becomes torch's canonical 0x7FC0
    const u16x8 out = __builtin_convertvector((is_nan & 0x7FC0u) | (~is_nan & rounded), u16x8);
    std::memcpy(p, &out, sizeof(out));
  }
  static float load1(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
  }
  static void store1(uint16_t* p, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    *p = x != x ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
};

struct Float16 {
  using Storage = uint16_t;
  static f32x8 load8(const uint16_t* p) {
#if defined(__F16C__)
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    f16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, f32x8);
#endif
  }
  static void store8(uint16_t* p, f32x8 v) {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
    const f16x8 h = __builtin_convertvector(v, f16x8);
    std::memcpy(p, &h, sizeof(h));
#endif
  }
  static float load1(const uint16_t* p) {
    _Float16 h;
    std::memcpy(&h, p, sizeof(h));
    return static_cast<float>(h);
  }
  static void store1(uint16_t* p, float x) {
    const _Float16 h = static_cast<_Float16>(x);
    std::memcpy(p, &h, sizeof(h));
  }
};

}  // namespace simd
}  // namespace uniter_fast
