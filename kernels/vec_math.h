// Math shared by the kernels, each written for its callers' ranges and accuracy: bf16 <-> fp32 (every
// file), and a float vector of the widest kind the build has (AVX-512: 16 lanes; AVX2 + FMA: 8) with
// short_attention.c's softmax and the MLPs' GELU on it. The code above this layer is written once
// for both widths: NM_VL lanes, a vmask for a row's ragged tail, and the vps_* operations.
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define NM_VEC 1
#define NM_VL 16
typedef __m512 vps;
typedef __mmask16 vmask;

// 16 bf16 -> 16 fp32, and back rounded as f32_bf16 (integer steps: no AVX512_BF16 needed).
static inline __m512 bf16x16_ps(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline __m256i ps_bf16x16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

// The mask of a vector's first n lanes (none for n <= 0, all from n >= NM_VL): a row's ragged tail.
static inline vmask first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}
static inline vps vps_zero(void) { return _mm512_setzero_ps(); }
static inline vps vps_set1(float f) { return _mm512_set1_ps(f); }
static inline vps vps_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vps_store(float *p, vps v) { _mm512_storeu_ps(p, v); }
static inline vps vps_maskz_load(vmask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void vps_mask_store(float *p, vmask m, vps v) { _mm512_mask_storeu_ps(p, m, v); }
static inline vps vps_maskz(vmask m, vps v) { return _mm512_maskz_mov_ps(m, v); }  // zero where m is off
static inline vps vps_select(vmask m, vps on, vps off) { return _mm512_mask_mov_ps(off, m, on); }
static inline vps vps_fmadd(vps a, vps b, vps c) { return _mm512_fmadd_ps(a, b, c); }
static inline vps vps_fnmadd(vps a, vps b, vps c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vps vps_add(vps a, vps b) { return _mm512_add_ps(a, b); }
static inline vps vps_sub(vps a, vps b) { return _mm512_sub_ps(a, b); }
static inline vps vps_mul(vps a, vps b) { return _mm512_mul_ps(a, b); }
static inline vps vps_div(vps a, vps b) { return _mm512_div_ps(a, b); }
static inline vps vps_max(vps a, vps b) { return _mm512_max_ps(a, b); }
static inline vps vps_abs(vps a) { return _mm512_abs_ps(a); }
static inline float vps_sum(vps v) { return _mm512_reduce_add_ps(v); }
static inline float vps_hmax(vps v) { return _mm512_reduce_max_ps(v); }
static inline vps vps_round(vps v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vps vps_scale2(vps p, vps n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral
static inline vps vps_neg_select(vps z, vps if_neg, vps if_not) {  // per lane: z < 0 ? if_neg : if_not
  return _mm512_mask_mov_ps(if_not, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), if_neg);
}
// the m lanes of NM_VL bf16 at p, as fp32 (zero elsewhere); stored back rounded as torch rounds
static inline vps vps_load_bf16(vmask m, const uint16_t *p) { return bf16x16_ps(_mm256_maskz_loadu_epi16(m, p)); }
static inline void vps_store_bf16(uint16_t *p, vmask m, vps v) { _mm256_mask_storeu_epi16(p, m, ps_bf16x16(v)); }

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NM_VEC 1
#define NM_VL 8
typedef __m256 vps;
typedef __m256i vmask;  // a lane all ones where on

static inline vmask first_lanes(int64_t n) {
  int c = n >= 8 ? 8 : n <= 0 ? 0 : (int)n;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vps vps_zero(void) { return _mm256_setzero_ps(); }
static inline vps vps_set1(float f) { return _mm256_set1_ps(f); }
static inline vps vps_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vps_store(float *p, vps v) { _mm256_storeu_ps(p, v); }
static inline vps vps_maskz_load(vmask m, const float *p) { return _mm256_maskload_ps(p, m); }
static inline void vps_mask_store(float *p, vmask m, vps v) { _mm256_maskstore_ps(p, m, v); }
static inline vps vps_maskz(vmask m, vps v) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
static inline vps vps_select(vmask m, vps on, vps off) { return _mm256_blendv_ps(off, on, _mm256_castsi256_ps(m)); }
static inline vps vps_fmadd(vps a, vps b, vps c) { return _mm256_fmadd_ps(a, b, c); }
static inline vps vps_fnmadd(vps a, vps b, vps c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vps vps_add(vps a, vps b) { return _mm256_add_ps(a, b); }
static inline vps vps_sub(vps a, vps b) { return _mm256_sub_ps(a, b); }
static inline vps vps_mul(vps a, vps b) { return _mm256_mul_ps(a, b); }
static inline vps vps_div(vps a, vps b) { return _mm256_div_ps(a, b); }
static inline vps vps_max(vps a, vps b) { return _mm256_max_ps(a, b); }
static inline vps vps_abs(vps a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline float vps_sum(vps v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vps_hmax(vps v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vps vps_round(vps v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vps vps_scale2(vps p, vps n) {  // p 2^n for integral n in [-126, 127]: n into the exponent bits
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vps vps_neg_select(vps z, vps if_neg, vps if_not) {
  return _mm256_blendv_ps(if_not, if_neg, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
}
// bf16 lanes through a small buffer: AVX2 has no 16-bit masked moves (and no bf16 products: the
// callers' bf16 paths do not run on this build; these keep them whole)
static inline int lanes_of(vmask m) { return __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(m))); }
static inline vps vps_load_bf16(vmask m, const uint16_t *p) {
  uint16_t b[8] = {0};
  memcpy(b, p, (size_t)lanes_of(m) * 2);
  __m128i v = _mm_loadu_si128((const __m128i *)b);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline void vps_store_bf16(uint16_t *p, vmask m, vps v) {
  float f[8];
  _mm256_storeu_ps(f, v);
  for (int i = 0, n = lanes_of(m); i < n; i++) p[i] = f32_bf16(f[i]);
}
#endif

#if defined(NM_VEC)
// e^x for x <= 0 (scores less their row's maximum, -z^2), NM_VL at a time: x = n ln2 + r with
// |r| <= ln2/2, e^r by its Taylor series to r^7 (truncation below 1e-8 relative there), scaled by 2^n.
// Clamped at -87, where e^x is 1.6e-38: against a row sum of at least 1 that is zero.
static inline vps exp_le0(vps x) {
  x = vps_max(x, vps_set1(-87.0f));
  vps n = vps_round(vps_mul(x, vps_set1(1.44269504088896341f)));
  vps r = vps_fnmadd(n, vps_set1(0.693145751953125f), x);  // ln2 in two parts: r exact
  r = vps_fnmadd(n, vps_set1(1.428606765330187045e-06f), r);
  vps p = vps_set1(1.0f / 5040);
  static const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (int i = 0; i < 7; i++) p = vps_fmadd(p, r, vps_set1(c[i]));
  return vps_scale2(p, n);
}

// GELU (the erf form, F.gelu's default): 0.5 x (1 + erf(x / sqrt 2)), with erf by Abramowitz and
// Stegun 7.1.26 (absolute error below 1.5e-7). For z = x / sqrt 2 < 0, 1 + erf(z) is taken as
// q = poly(t) e^(-z^2) itself, not 1 - (1 - q): no cancellation in the negative tail. Against F.gelu:
// absolute error below 1.5e-6 for |x| <= 12 (6e-7 relative for x >= 0), far under an int8 step of
// the rows it feeds (tests/test_small_gemm.py measures it).
static inline vps gelu_ps(vps x) {
  vps z = vps_mul(x, vps_set1(0.70710678118654752f));
  vps a = vps_abs(z);
  vps t = vps_div(vps_set1(1.0f), vps_fmadd(a, vps_set1(0.3275911f), vps_set1(1.0f)));
  vps p = vps_set1(1.061405429f);
  p = vps_fmadd(p, t, vps_set1(-1.453152027f));
  p = vps_fmadd(p, t, vps_set1(1.421413741f));
  p = vps_fmadd(p, t, vps_set1(-0.284496736f));
  p = vps_fmadd(p, t, vps_set1(0.254829592f));
  vps q = vps_mul(vps_mul(p, t), exp_le0(vps_mul(vps_sub(vps_zero(), a), a)));
  vps one_plus_erf = vps_neg_select(z, q, vps_sub(vps_set1(2.0f), q));
  return vps_mul(vps_mul(vps_set1(0.5f), x), one_plus_erf);
}
#endif
#endif
