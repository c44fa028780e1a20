// Softmax attention of the texts of a packed batch, RoPE applied to q and k on the way in: the
// step between the attention's two products, in one call instead of about fifteen torch operators.
//
// Why: at a short query's 32 tokens, torch spends ~120 us a layer on RoPE (six elementwise ops) and
// a per-text SDPA call, against ~30 us of arithmetic (RESULTS.md, "Attention in one call"). The
// plain version of the same math is apply_rope + attend_per_text in modeling_nomic_moe.py, and the
// tests hold this one to it.
//
// qkv: [N, 3, h, D] rows (row stride ldq elements): q, k, v of each token, heads contiguous.
// bounds: [B+1] token offsets of the texts; cos, sin: [N, D] fp32, each token's RoPE angles
// (GPT-NeoX "rotate half": x * cos + cat(-x2, x1) * sin). ctx: [N, h, D] contiguous.
// Each (text, head) is one task: q and k roped and scaled into fp32 buffers, k transposed so that
// 16 keys' scores come from one vector sum, softmax with a vector exp, then the weighted sum of v.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#include "vec_math.h"  // exp_le0: e^x for the scores less their row's maximum; bf16 rounding

int nm_has_attention(void) { return 1; }

#define MAXD 128  // head sizes up to this (multiples of 16): the output row stays in registers

// One token's q or k (D values of dtype `bf16 ? uint16 : float`), roped and scaled, into fp32 `out`.
static void rope_row(const void *src, int bf16, int64_t D, const float *cos, const float *sin, float scale,
                     float *out) {
  float x[MAXD];
  if (bf16) {
    const uint16_t *s = src;
    for (int64_t d = 0; d < D; d++) x[d] = bf16_f32(s[d]);
  } else {
    memcpy(x, src, (size_t)D * sizeof(float));
  }
  int64_t half = D / 2;
  for (int64_t d = 0; d < half; d++) {
    out[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    out[d + half] = (x[d + half] * cos[d + half] + x[d] * sin[d + half]) * scale;
  }
}

static inline __mmask16 real_keys(int64_t j, int64_t L) {  // which of keys j..j+15 exist
  return first_lanes(L - j);
}

#define QB 4  // queries a block

// Scores of queries Q[0..QB) (rows of D) against keys j..j+16*nc-1 (Kt zero beyond L), nc <= 4 vectors
// of 16 keys: QB x nc independent sums. nc is a constant once inlined into scores_block's switch.
static inline __attribute__((always_inline)) void scores_nc(const float *Q, int64_t D, const float *Kt, int64_t Lp,
                                                            int64_t j, float *S, const int nc) {
  __m512 a[QB][4];
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) a[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d++) {
    const float *k = Kt + d * Lp + j;
    __m512 kc[4];
    for (int c = 0; c < nc; c++) kc[c] = _mm512_loadu_ps(k + 16 * c);
    for (int r = 0; r < QB; r++) {
      __m512 x = _mm512_set1_ps(Q[r * D + d]);
      for (int c = 0; c < nc; c++) a[r][c] = _mm512_fmadd_ps(x, kc[c], a[r][c]);
    }
  }
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) _mm512_storeu_ps(S + r * Lp + j + 16 * c, a[r][c]);
}

// The keys in blocks of 64 and the rest in 16s: a 32-token text computes 32 keys' scores, not 64.
static void scores_block(const float *Q, int64_t D, const float *Kt, int64_t Lp, int64_t j, float *S) {
  switch (Lp - j >= 64 ? 4 : (int)(Lp - j) / 16) {
    case 4: scores_nc(Q, D, Kt, Lp, j, S, 4); break;
    case 3: scores_nc(Q, D, Kt, Lp, j, S, 3); break;
    case 2: scores_nc(Q, D, Kt, Lp, j, S, 2); break;
    case 1: scores_nc(Q, D, Kt, Lp, j, S, 1); break;
  }
}

// Row S[0..L) of scores -> softmax weights in place (zeros up to Lp); returns 1 / their sum.
static inline float softmax_row(float *S, int64_t L, int64_t Lp) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < Lp; j += 16)
    mx = _mm512_mask_max_ps(mx, real_keys(j, L), mx, _mm512_loadu_ps(S + j));
  __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < Lp; j += 16) {
    __m512 p = _mm512_maskz_mov_ps(real_keys(j, L), exp_le0(_mm512_sub_ps(_mm512_loadu_ps(S + j), m)));
    _mm512_storeu_ps(S + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

static inline void store_row(__m512 *o, int64_t nv, float inv, int bf16, char *out) {
  for (int64_t c = 0; c < nv; c++) {
    __m512 y = _mm512_mul_ps(o[c], _mm512_set1_ps(inv));
    if (bf16) {  // round to nearest even, as torch rounds
      __m512i u = _mm512_castps_si512(y);
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                           _mm512_set1_epi32(1))));
      _mm256_storeu_si256((__m256i *)(out + 32 * c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
      _mm512_storeu_ps((float *)out + 16 * c, y);
    }
  }
}

// One text's tokens [lo, lo+L), one head. buf: the thread's scratch, 3*Lp*D + QB*Lp floats (Lp: L up to 16s).
static void attend_head(const char *qkv, int64_t ldq_bytes, int bf16, int64_t h, int64_t hd, int64_t D,
                        int64_t lo, int64_t L, const float *cos, const float *sin, float scale,
                        char *ctx, int64_t ldc_bytes, float *buf) {
  const int64_t Lp = (L + 15) & ~(int64_t)15, es = bf16 ? 2 : 4, hD = h * D, nv = D / 16;
  float *Q = buf, *Kt = Q + Lp * D, *V = Kt + Lp * D, *S = V + Lp * D;  // Q [Lp][D], Kt [D][Lp], V [L][D], S [QB][Lp]
  float row[MAXD];
  for (int64_t t = 0; t < L; t++) {
    const char *r = qkv + (lo + t) * ldq_bytes;
    const float *c = cos + (lo + t) * D, *s = sin + (lo + t) * D;
    rope_row(r + hd * D * es, bf16, D, c, s, scale, Q + t * D);
    rope_row(r + (hD + hd * D) * es, bf16, D, c, s, 1.0f, row);
    for (int64_t d = 0; d < D; d++) Kt[d * Lp + t] = row[d];
    const char *v = r + (2 * hD + hd * D) * es;
    if (bf16) {
      for (int64_t d = 0; d < D; d++) V[t * D + d] = bf16_f32(((const uint16_t *)v)[d]);
    } else {
      memcpy(V + t * D, v, (size_t)D * sizeof(float));
    }
  }
  for (int64_t d = 0; d < D; d++) memset(Kt + d * Lp + L, 0, (size_t)(Lp - L) * sizeof(float));
  int64_t Lq = (L + QB - 1) / QB * QB;
  memset(Q + L * D, 0, (size_t)((Lq - L) * D) * sizeof(float));  // the last block's missing queries: computed, not stored
  for (int64_t i = 0; i < L; i += QB) {  // QB queries at a time: QB times the independent sums per key loaded
    for (int64_t j = 0; j < Lp; j += 64) scores_block(Q + i * D, D, Kt, Lp, j, S);
    float inv[QB];
    for (int r = 0; r < QB; r++) inv[r] = softmax_row(S + r * Lp, L, Lp);
    __m512 o[QB][MAXD / 16];
    for (int r = 0; r < QB; r++)
      for (int64_t c = 0; c < nv; c++) o[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
      const float *vj = V + j * D;
      for (int64_t c = 0; c < nv; c++) {
        __m512 vc = _mm512_loadu_ps(vj + 16 * c);
        for (int r = 0; r < QB; r++) o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(S[r * Lp + j]), vc, o[r][c]);
      }
    }
    for (int r = 0; r < QB && i + r < L; r++) store_row(o[r], nv, inv[r], bf16, ctx + (lo + i + r) * ldc_bytes + hd * D * es);
  }
}

#if defined(__AVX512BF16__)
// bf16 in: q, k and v rounded to bf16 (as torch's bf16 RoPE leaves them) and the softmax weights too,
// the products in AVX512_BF16's pairwise dot products (twice the multiply-adds of an fp32 FMA), the
// sums in fp32. Layouts, in pairs of bf16 (one 32-bit word): Q2 [Lq][D/2] (dims 2d, 2d+1), Kt2
// [D/2][Lp] (a key's dims 2d, 2d+1), V2 [Lp/2][D] (tokens 2j, 2j+1 of a dim), P2 [QB][Lp/2].
static inline uint32_t bf16_pair(float lo, float hi) { return f32_bf16(lo) | (uint32_t)f32_bf16(hi) << 16; }

static inline __attribute__((always_inline)) void scores_nc_bf16(const uint32_t *Q2, int64_t D2, const uint32_t *Kt2,
                                                                 int64_t Lp, int64_t j, float scale, float *S, const int nc) {
  __m512 a[QB][4];
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) a[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D2; d++) {
    const uint32_t *k = Kt2 + d * Lp + j;
    __m512bh kc[4];
    for (int c = 0; c < nc; c++) kc[c] = (__m512bh)_mm512_loadu_si512(k + 16 * c);
    for (int r = 0; r < QB; r++) {
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)Q2[r * D2 + d]);
      for (int c = 0; c < nc; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], x, kc[c]);
    }
  }
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) _mm512_storeu_ps(S + r * Lp + j + 16 * c, _mm512_mul_ps(a[r][c], _mm512_set1_ps(scale)));
}

static void scores_block_bf16(const uint32_t *Q2, int64_t D2, const uint32_t *Kt2, int64_t Lp, int64_t j, float scale,
                              float *S) {
  switch (Lp - j >= 64 ? 4 : (int)(Lp - j) / 16) {
    case 4: scores_nc_bf16(Q2, D2, Kt2, Lp, j, scale, S, 4); break;
    case 3: scores_nc_bf16(Q2, D2, Kt2, Lp, j, scale, S, 3); break;
    case 2: scores_nc_bf16(Q2, D2, Kt2, Lp, j, scale, S, 2); break;
    case 1: scores_nc_bf16(Q2, D2, Kt2, Lp, j, scale, S, 1); break;
  }
}

static void attend_head_bf16(const char *qkv, int64_t ldq_bytes, int64_t h, int64_t hd, int64_t D, int64_t lo, int64_t L,
                             const float *cos, const float *sin, float scale, char *ctx, int64_t ldc_bytes, float *buf) {
  const int64_t Lp = (L + 15) & ~(int64_t)15, hD = h * D, nv = D / 16, D2 = D / 2, Lq = (L + QB - 1) / QB * QB;
  uint32_t *Q2 = (uint32_t *)buf, *Kt2 = Q2 + Lp * D2, *V2 = Kt2 + D2 * Lp, *P2 = V2 + Lp / 2 * D;
  float *S = (float *)(P2 + QB * Lp / 2);
  float q[MAXD], k[MAXD];
  for (int64_t t = 0; t < L; t++) {
    const char *r = qkv + (lo + t) * ldq_bytes;
    const float *c = cos + (lo + t) * D, *s = sin + (lo + t) * D;
    rope_row(r + hd * D * 2, 1, D, c, s, 1.0f, q);
    rope_row(r + (hD + hd * D) * 2, 1, D, c, s, 1.0f, k);
    const uint16_t *v = (const uint16_t *)(r + (2 * hD + hd * D) * 2);
    for (int64_t d = 0; d < D2; d++) {
      Q2[t * D2 + d] = bf16_pair(q[2 * d], q[2 * d + 1]);
      Kt2[d * Lp + t] = bf16_pair(k[2 * d], k[2 * d + 1]);
    }
    uint16_t *v2 = (uint16_t *)(V2 + (t / 2) * D) + t % 2;  // token t is the low (even) or high half
    for (int64_t d = 0; d < D; d++) v2[2 * d] = v[d];
  }
  for (int64_t d = 0; d < D2; d++) memset(Kt2 + d * Lp + L, 0, (size_t)(Lp - L) * 4);
  memset(Q2 + L * D2, 0, (size_t)((Lq - L) * D2) * 4);
  if (L % 2) {
    uint16_t *v2 = (uint16_t *)(V2 + (L / 2) * D) + 1;
    for (int64_t d = 0; d < D; d++) v2[2 * d] = 0;
  }
  for (int64_t i = 0; i < L; i += QB) {
    for (int64_t j = 0; j < Lp; j += 64) scores_block_bf16(Q2 + i * D2, D2, Kt2, Lp, j, scale, S);
    float inv[QB];
    for (int r = 0; r < QB; r++) {
      inv[r] = softmax_row(S + r * Lp, L, Lp);
      for (int64_t j = 0; j < Lp; j += 2) P2[r * (Lp / 2) + j / 2] = bf16_pair(S[r * Lp + j], S[r * Lp + j + 1]);
    }
    __m512 o[QB][MAXD / 16];
    for (int r = 0; r < QB; r++)
      for (int64_t c = 0; c < nv; c++) o[r][c] = _mm512_setzero_ps();
    for (int64_t j2 = 0; j2 < (L + 1) / 2; j2++) {
      const uint32_t *vj = V2 + j2 * D;
      for (int64_t c = 0; c < nv; c++) {
        __m512bh vc = (__m512bh)_mm512_loadu_si512(vj + 16 * c);
        for (int r = 0; r < QB; r++)
          o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)_mm512_set1_epi32((int)P2[r * (Lp / 2) + j2]), vc);
      }
    }
    for (int r = 0; r < QB && i + r < L; r++) store_row(o[r], nv, inv[r], 1, ctx + (lo + i + r) * ldc_bytes + hd * D * 2);
  }
}
#define BF16_PRODUCTS 1
#else
#define BF16_PRODUCTS 0
#endif

// Returns 0, -1 for a head size it does not take, -2 where its scratch could not be had.
int nm_attention(const void *qkv, int64_t ldq, int bf16, int64_t h, int64_t D, int64_t B, const int64_t *bounds,
                 const float *cos, const float *sin, float scale, void *ctx, int nthreads) {
  if (D % 16 || D > MAXD || D < 16) return -1;
  int64_t Lmax = 0;
  for (int64_t b = 0; b < B; b++) Lmax = bounds[b + 1] - bounds[b] > Lmax ? bounds[b + 1] - bounds[b] : Lmax;
  const int64_t Lp = (Lmax + 63) & ~(int64_t)63;
  int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    float *buf = malloc((size_t)(3 * Lp * D + QB * Lp) * sizeof(float));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * h; task++) {
      int64_t b = task / h, hd = task % h, lo = bounds[b], L = bounds[b + 1] - lo;
      if (!buf || L <= 0) continue;
#if BF16_PRODUCTS
      if (bf16) {
        attend_head_bf16(qkv, ldq * 2, h, hd, D, lo, L, cos, sin, scale, ctx, h * D * 2, buf);
        continue;
      }
#endif
      attend_head(qkv, ldq * (bf16 ? 2 : 4), bf16, h, hd, D, lo, L, cos, sin, scale, ctx, h * D * (bf16 ? 2 : 4), buf);
    }
    free(buf);
  }
  return failed ? -2 : 0;
}
#else
int nm_has_attention(void) { return 0; }  // AVX2 and others keep torch's RoPE and SDPA
int nm_attention(const void *qkv, int64_t ldq, int bf16, int64_t h, int64_t D, int64_t B, const int64_t *bounds,
                 const float *cos, const float *sin, float scale, void *ctx, int nthreads) {
  return -1;
}
#endif
