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
// a vector of keys' scores comes from one vector sum, softmax with a vector exp, then the weighted
// sum of v. Written once for both vector widths (vec_math.h: AVX-512's 16 floats, AVX2's 8); bf16
// activations where the CPU has AVX512_BF16's products.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "vec_math.h"  // the float vector (AVX-512 or AVX2); exp_le0: e^x for the scores less their row's maximum

#if defined(NM_VEC)
int nm_has_attention(void) { return 1; }

#define MAXD 128  // head sizes up to this (multiples of 16)
#define QB 4      // queries a block
#if NM_VL == 16
#define KV 4  // vectors of keys a score block (64 keys): QB x KV sums of the 32 vector registers
#define OV 8  // output vectors a pass over v: a whole head of up to 128 in registers
#else
#define KV 2  // AVX2's 16 registers: QB x 2 sums, the keys and a broadcast
#define OV 2
#endif

// One token's q or k (D values), roped and scaled, into fp32 `out`.
static void rope_row(const float *restrict x, int64_t D, const float *restrict cos, const float *restrict sin, float scale,
                     float *restrict out) {
  int64_t half = D / 2;
  for (int64_t d = 0; d < half; d++) {
    out[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    out[d + half] = (x[d + half] * cos[d + half] + x[d] * sin[d + half]) * scale;
  }
}

// Scores of queries Q[0..QB) (rows of D) against keys j..j+NM_VL*nc-1 (Kt zero beyond L), nc <= KV
// vectors of keys: QB x nc independent sums. nc is a constant once inlined into scores_block's switch.
static inline __attribute__((always_inline)) void scores_nc(const float *Q, int64_t D, const float *Kt, int64_t Lp,
                                                            int64_t j, float *S, const int nc) {
  vps a[QB][KV];
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) a[r][c] = vps_zero();
  for (int64_t d = 0; d < D; d++) {
    const float *k = Kt + d * Lp + j;
    vps kc[KV];
    for (int c = 0; c < nc; c++) kc[c] = vps_load(k + NM_VL * c);
    for (int r = 0; r < QB; r++) {
      vps x = vps_set1(Q[r * D + d]);
      for (int c = 0; c < nc; c++) a[r][c] = vps_fmadd(x, kc[c], a[r][c]);
    }
  }
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) vps_store(S + r * Lp + j + NM_VL * c, a[r][c]);
}

// The keys in blocks of KV vectors and the rest a vector at a time: a 32-token text computes 32
// keys' scores, not 64.
static void scores_block(const float *Q, int64_t D, const float *Kt, int64_t Lp, int64_t j, float *S) {
  switch (Lp - j >= KV * NM_VL ? KV : (int)(Lp - j) / NM_VL) {
#if KV == 4
    case 4: scores_nc(Q, D, Kt, Lp, j, S, 4); break;
    case 3: scores_nc(Q, D, Kt, Lp, j, S, 3); break;
#endif
    case 2: scores_nc(Q, D, Kt, Lp, j, S, 2); break;
    case 1: scores_nc(Q, D, Kt, Lp, j, S, 1); break;
  }
}

// Row S[0..L) of scores -> softmax weights in place (zeros up to Lp); returns 1 / their sum.
static inline float softmax_row(float *S, int64_t L, int64_t Lp) {
  vps mx = vps_set1(-INFINITY);
  for (int64_t j = 0; j < Lp; j += NM_VL) mx = vps_max(mx, vps_select(first_lanes(L - j), vps_load(S + j), mx));
  vps m = vps_set1(vps_hmax(mx)), sum = vps_zero();
  for (int64_t j = 0; j < Lp; j += NM_VL) {
    vps p = vps_maskz(first_lanes(L - j), exp_le0(vps_sub(vps_load(S + j), m)));
    vps_store(S + j, p);
    sum = vps_add(sum, p);
  }
  return 1.0f / vps_sum(sum);
}

// Output vectors c0..c0+nc of QB rows, scaled by each row's 1 / sum, to ctx rows (bf16: rounded to
// nearest even, as torch rounds; rows past the text's end are not stored).
static inline __attribute__((always_inline)) void store_rows(vps o[QB][OV], int64_t c0, int nc, const float *inv,
                                                             int rows, int bf16, char *out, int64_t ldc_bytes) {
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < nc; c++) {
      vps y = vps_mul(o[r][c], vps_set1(inv[r]));
      if (bf16) vps_store_bf16((uint16_t *)(out + r * ldc_bytes) + NM_VL * (c0 + c), first_lanes(NM_VL), y);
      else vps_store((float *)(out + r * ldc_bytes) + NM_VL * (c0 + c), y);
    }
}

// Output vectors c0..c0+nc (nc a constant once inlined: the sums stay in registers) of QB queries
// rows: their softmax weights S [QB][Lp] times V [L][D], stored scaled by each row's 1 / sum.
static inline __attribute__((always_inline)) void weighted_v(const float *S, int64_t Lp, const float *V, int64_t D,
                                                             int64_t L, int64_t c0, const int nc, const float *inv,
                                                             int rows, char *out, int64_t ldc_bytes) {
  vps o[QB][OV];
  for (int r = 0; r < QB; r++)
    for (int c = 0; c < nc; c++) o[r][c] = vps_zero();
  for (int64_t j = 0; j < L; j++) {
    const float *vj = V + j * D + NM_VL * c0;
    for (int c = 0; c < nc; c++) {
      vps vc = vps_load(vj + NM_VL * c);
      for (int r = 0; r < QB; r++) o[r][c] = vps_fmadd(vps_set1(S[r * Lp + j]), vc, o[r][c]);
    }
  }
  store_rows(o, c0, nc, inv, rows, 0, out, ldc_bytes);
}

// One text's tokens [lo, lo+L), one head, fp32. buf: the thread's scratch, 3*Lp*D + QB*Lp floats (Lp:
// L up to 16s).
static void attend_head(const float *qkv, int64_t ldq, int64_t h, int64_t hd, int64_t D, int64_t lo, int64_t L,
                        const float *cos, const float *sin, float scale, float *ctx, int64_t ldc, float *buf) {
  const int64_t Lp = (L + 15) & ~(int64_t)15, hD = h * D, nv = D / NM_VL;
  float *Q = buf, *Kt = Q + Lp * D, *V = Kt + Lp * D, *S = V + Lp * D;  // Q [Lp][D], Kt [D][Lp], V [L][D], S [QB][Lp]
  float row[MAXD];
  for (int64_t t = 0; t < L; t++) {
    const float *r = qkv + (lo + t) * ldq, *c = cos + (lo + t) * D, *s = sin + (lo + t) * D;
    rope_row(r + hd * D, D, c, s, scale, Q + t * D);
    rope_row(r + hD + hd * D, D, c, s, 1.0f, row);
    for (int64_t d = 0; d < D; d++) Kt[d * Lp + t] = row[d];
    memcpy(V + t * D, r + 2 * hD + hd * D, (size_t)D * sizeof(float));
  }
  for (int64_t d = 0; d < D; d++) memset(Kt + d * Lp + L, 0, (size_t)(Lp - L) * sizeof(float));
  int64_t Lq = (L + QB - 1) / QB * QB;
  memset(Q + L * D, 0, (size_t)((Lq - L) * D) * sizeof(float));  // the last block's missing queries: computed, not stored
  for (int64_t i = 0; i < L; i += QB) {  // QB queries at a time: QB times the independent sums per key loaded
    for (int64_t j = 0; j < Lp; j += KV * NM_VL) scores_block(Q + i * D, D, Kt, Lp, j, S);
    float inv[QB];
    for (int r = 0; r < QB; r++) inv[r] = softmax_row(S + r * Lp, L, Lp);
    int rows = L - i < QB ? (int)(L - i) : QB;
    char *out = (char *)(ctx + (lo + i) * ldc + hd * D);
    for (int64_t c0 = 0; c0 < nv; c0 += OV) {  // OV output vectors of each row at a time, in registers
      switch (nv - c0 < OV ? (int)(nv - c0) : OV) {
#define CASE(n) case n: weighted_v(S, Lp, V, D, L, c0, n, inv, rows, out, ldc * 4); break;
        CASE(1) CASE(2)
#if OV == 8
        CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#endif
#undef CASE
      }
    }
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
  float q[MAXD], k[MAXD], x[MAXD];
  for (int64_t t = 0; t < L; t++) {
    const char *r = qkv + (lo + t) * ldq_bytes;
    const float *c = cos + (lo + t) * D, *s = sin + (lo + t) * D;
    const uint16_t *qt = (const uint16_t *)(r + hd * D * 2), *kt = (const uint16_t *)(r + (hD + hd * D) * 2);
    for (int64_t d = 0; d < D; d++) x[d] = bf16_f32(qt[d]);
    rope_row(x, D, c, s, 1.0f, q);
    for (int64_t d = 0; d < D; d++) x[d] = bf16_f32(kt[d]);
    rope_row(x, D, c, s, 1.0f, k);
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
    vps o[QB][OV];  // OV = 8 vectors of 16: a whole head
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
    store_rows(o, 0, (int)nv, inv, L - i < QB ? (int)(L - i) : QB, 1, ctx + (lo + i) * ldc_bytes + hd * D * 2, ldc_bytes);
  }
}
#define BF16_PRODUCTS 1
#else
#define BF16_PRODUCTS 0
#endif

// Returns 0, -1 for a head size or a dtype it does not take, -2 where its scratch could not be had.
int nm_attention(const void *qkv, int64_t ldq, int bf16, int64_t h, int64_t D, int64_t B, const int64_t *bounds,
                 const float *cos, const float *sin, float scale, void *ctx, int nthreads) {
  if (D % 16 || D > MAXD || D < 16 || (bf16 && !BF16_PRODUCTS)) return -1;
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
      attend_head(qkv, ldq, h, hd, D, lo, L, cos, sin, scale, ctx, h * D, buf);
    }
    free(buf);
  }
  return failed ? -2 : 0;
}
#else
int nm_has_attention(void) { return 0; }  // no vector unit this file is written for: torch's RoPE and SDPA
int nm_attention(const void *qkv, int64_t ldq, int bf16, int64_t h, int64_t D, int64_t B, const int64_t *bounds,
                 const float *cos, const float *sin, float scale, void *ctx, int nthreads) {
  return -1;
}
#endif
