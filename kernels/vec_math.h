// Math shared by the kernels, each written for its callers' ranges and accuracy: bf16 <-> fp32 (every
// file), and with AVX-512, 16 floats at a time, short_attention.c's softmax and the MLPs' GELU.
#ifndef NM_VEC_MATH_H
#define NM_VEC_MATH_H
#include <stdint.h>
#include <string.h>

// bf16 as its bit pattern (uint16): the high half of a float; rounded to nearest even, as torch rounds.
static inline float bf16_f32(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 bf16 -> 16 fp32, and back rounded as f32_bf16 (integer steps: no AVX512_BF16 needed).
static inline __m512 bf16x16_ps(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline __m256i ps_bf16x16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

// The mask of a vector's first n lanes (none for n <= 0, all 16 from n >= 16): a row's ragged tail.
static inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// e^x for x <= 0 (scores less their row's maximum, -z^2), 16 at a time: x = n ln2 + r with
// |r| <= ln2/2, e^r by its Taylor series to r^7 (truncation below 1e-8 relative there), scaled by 2^n
// (vscalefps). Clamped at -87, where e^x is 1.6e-38: against a row sum of at least 1 that is zero.
static inline __m512 exp_le0(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  static const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

// GELU (the erf form, F.gelu's default): 0.5 x (1 + erf(x / sqrt 2)), with erf by Abramowitz and
// Stegun 7.1.26 (absolute error below 1.5e-7). For z = x / sqrt 2 < 0, 1 + erf(z) is taken as
// q = poly(t) e^(-z^2) itself, not 1 - (1 - q): no cancellation in the negative tail. Against F.gelu:
// absolute error below 1.5e-6 for |x| <= 12 (6e-7 relative for x >= 0), far under an int8 step of
// the rows it feeds (its only caller; tests/test_small_gemm.py measures it).
static inline __m512 gelu_ps(__m512 x) {
  __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  __m512 a = _mm512_abs_ps(z);
  __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  __m512 q = _mm512_mul_ps(_mm512_mul_ps(p, t), exp_le0(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)));
  __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 one_plus_erf = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0f), q), neg, q);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_erf);
}
#endif
#endif
