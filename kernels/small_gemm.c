// Few-row products that stream each weight once: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Why: a short query sends about 8 rows to each expert. A GEMM library blocks for many rows and
// reads the weight at 55-65% of the memory's speed there (RESULTS.md, "The experts' few-row
// products"); at a few rows the product is bound by reading W once. This kernel walks W exactly
// once, in the order it lies in memory, prefetching ahead, and keeps the rows' sums in registers.
// kernels/small_gemm.py packs the weights, builds this file for the CPU it runs on
// (-march=native) and holds it to F.linear in the tests. nm_grouped_* run a whole MoE layer's
// experts (rows grouped by expert) in one call, with the same sums as one call per expert.
//
// Layout (made once by pack() in small_gemm.py): W in panels of NB output columns; panel p holds
// W[p*NB:(p+1)*NB, :] transposed, [K][NB] fp32, [K/2][NB][2] bf16 pairs (the operand order of
// AVX512_BF16's pairwise dot product), or [K/4][NB][4] s8 quads (AVX512_VNNI's). N is padded to a multiple of NB with zero rows; only the
// first N columns of y are written.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512BF16__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif
#include "vec_math.h"  // bf16 <-> fp32; gelu_ps: the MLPs' GELU inside a product

#if defined(__AVX512F__)
#define VW 16 /* floats per vector register */
#define MT 8  /* rows per tile: 2*MT accumulators of the 32 vector registers */
#else
#define VW 8
#define MT 6  /* AVX2's 16 vector registers: 12 accumulators, two weight vectors, a broadcast. 6 rows, not 4:
                 1.04x / 1.13x at a 32- / 128-token fp32 query (RESULTS.md, "AVX2 CPUs") */
#endif
#define NB (2 * VW) /* output columns per panel: two vectors per row */
#define AHEAD 32    /* panel rows prefetched ahead (4 KiB with AVX-512); measured: 13 -> 19 GB/s at 8 rows */

typedef float vf __attribute__((vector_size(VW * 4)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

int nm_panel_width(void) { return NB; }

// Whether the float products take gelu=1 (a build with a vector GELU: AVX-512, or AVX2 + FMA).
int nm_fuses_gelu(void) {
#if defined(NM_VEC)
  return 1;
#else
  return 0;
#endif
}

// Memory for packed weights, in 2 MiB pages where the OS gives them (Linux THP in "madvise" or
// "always" mode). A short query streams every expert matrix once per layer; with 4 KiB pages that
// is a TLB miss, and a stop of the hardware prefetcher, every 4 KiB (RESULTS.md: 1.05-1.10x on the
// expert products in bf16). Returns NULL on failure (the caller falls back to ordinary memory).
void *nm_alloc_huge(int64_t bytes, int *huge) {
  const size_t align = (size_t)1 << 21;
  void *p = 0;
  *huge = 0;
  if (bytes <= 0 || posix_memalign(&p, align, (size_t)bytes)) return 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  *huge = madvise(p, (size_t)bytes, MADV_HUGEPAGE) == 0;  // before the first touch: faults then take 2 MiB pages
#endif
  return p;
}

void nm_free(void *p) { free(p); }

// mt rows (a constant once inlined into the switch below) against one panel.
static inline __attribute__((always_inline)) void tile_f32(
    const float *x, int64_t ldx, const int mt, int64_t K, const float *panel,
    const float *bias, float *y, int64_t ldy, int ncols, const float *warm, int64_t wmul, int gelu) {
  vf acc[MT][2];
  for (int m = 0; m < mt; m++) acc[m][0] = acc[m][1] = (vf){0};
  for (int64_t k = 0; k < K; k++) {
    const float *w = panel + k * NB;
    __builtin_prefetch(w + AHEAD * NB);
    __builtin_prefetch(w + AHEAD * NB + VW);
    if (warm) {  // the next panel, into L2, while this one is read again from cache (see panel_f32)
      const float *p = warm + ((k * NB * wmul) >> 16);
      __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(p + VW, 0, 2);
    }
    vf w0 = load(w), w1 = load(w + VW);
    for (int m = 0; m < mt; m++) {
      float xv = x[m * ldx + k];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  for (int m = 0; m < mt; m++) {
    float out[NB];
    memcpy(out, &acc[m][0], sizeof(vf));
    memcpy(out + VW, &acc[m][1], sizeof(vf));
    // bias tested outside the loop: inside it, gcc made masked loads from bias, which with no bias read
    // near address 0 under an empty mask, and Zen 5 takes a slow assist for each one: 1.2-1.8x on the
    // whole product there (RESULTS.md, "A new machine: AMD EPYC, Zen 5")
    if (bias)
      for (int j = 0; j < ncols; j++) out[j] += bias[j];
#if defined(NM_VEC)
    if (gelu)  // an MLP's up product: F.gelu of each output as it is written (gelu_ps, vec_math.h)
      for (int h = 0; h < NB; h += NM_VL) vps_store(out + h, gelu_ps(vps_load(out + h)));
#endif
    memcpy(y + m * ldy, out, (size_t)ncols * sizeof(float));
  }
}

// Where tile m0 of M rows starts prefetching the next panel of K rows (elements into it, -1: the
// first tile, which reads its own panel from memory), and wmul, its share of the panel per k (see below).
static inline int64_t warm_share(int64_t M, int64_t m0, int64_t K, int64_t *wmul) {
  int64_t tiles = (M + MT - 1) / MT, j = m0 / MT;
  *wmul = tiles > 1 ? 65536 / (tiles - 1) : 0;
  return j >= 1 ? (j - 1) * (K * NB / (tiles - 1)) : -1;
}

// All M rows against one panel, MT rows at a time. A panel re-read for the next tile comes from
// cache, so memory would idle: the tiles after the first prefetch the next panel (`next`) into L2,
// each its share of it (`wmul` = 1/(tiles-1) in 16-bit fixed point). Prefetching it all during the
// second tile asked one core for the whole panel in one tile's time, more than its share of the
// memory's speed; spread, the int8 and fp32 products at 16-128 rows ran 1-5% faster (bf16 the same).
static void panel_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const float *panel, const float *b,
                      float *y, int64_t ldy, int ncols, const float *next, int gelu) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const float *xm = x + m0 * ldx;
    float *ym = y + m0 * ldy;
    int64_t wmul, share = warm_share(M, m0, K, &wmul);
    const float *warm = next && share >= 0 ? next + share : 0;
    switch (M - m0 >= MT ? MT : (int)(M - m0)) {
#define CASE(n) case n: tile_f32(xm, ldx, n, K, panel, b, ym, ldy, ncols, warm, wmul, gelu); break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#if MT == 8
      CASE(7) CASE(8)
#endif
#undef CASE
    }
  }
}

static inline int panel_cols(int64_t N, int64_t p) { return (int)(N - p * NB < NB ? N - p * NB : NB); }

// One MoE layer's experts in one call: rows bounds[e]..bounds[e+1] of x [M, K] (row stride ldx,
// grouped by expert) against expert e's packed W (wps[e]), + bias [N] or NULL; y [M, N] (row stride
// ldy) the same rows. Each thread takes its share of every expert's panels and goes on to the next
// expert without waiting (nowait): one parallel region, no barrier between experts, and no Python
// between two experts' products. One expert (E = 1, bounds {0, M}) is a plain product: nm_linear_f32.
// gelu: F.gelu of every output as it is written (gelu_ps; builds where nm_fuses_gelu says so, as the
// encoder-layers call, its only caller that asks, does; an MLP's up product then needs no GELU pass).
void nm_grouped_f32(const float *x, int64_t ldx, int64_t K, int64_t E, const int64_t *bounds,
                    const float *const *wps, int64_t N, const float *bias, float *y, int64_t ldy, int gelu, int nthreads) {
  int64_t panels = (N + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  for (int64_t e = 0; e < E; e++) {
    int64_t lo = bounds[e], rows = bounds[e + 1] - bounds[e];
    if (rows <= 0) continue;  // every thread skips the same experts: the worksharing loops stay in step
#pragma omp for schedule(static) nowait
    for (int64_t p = 0; p < panels; p++)
      panel_f32(x + lo * ldx, ldx, rows, K, wps[e] + p * K * NB, bias ? bias + p * NB : 0, y + lo * ldy + p * NB, ldy,
                panel_cols(N, p), p + 1 < panels ? wps[e] + (p + 1) * K * NB : 0, gelu);
  }
}

// y [M, N] = x [M, K] @ W.T (+ bias [N] or NULL), W packed (wp).
void nm_linear_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const float *wp, int64_t N,
                   const float *bias, float *y, int64_t ldy, int nthreads) {
  int64_t bounds[2] = {0, M};
  nm_grouped_f32(x, ldx, K, 1, bounds, &wp, N, bias, y, ldy, 0, nthreads);
}

// --- An MoE layer's dispatch and combine around the grouped products: dispatch_sorted and combine
// (experts_nomic_moe.py) in two calls instead of about fifteen small torch operators, with the same
// results bit for bit (the tests compare). Rows are moved as bytes (es bytes an element).

// The (token, slot) pairs of experts [N*k] ordered by expert, stably (pair p is token p / k): order
// [N*k], counts [E], bounds [E+1]; x's rows (row stride ldx elements) gathered in that order into xs
// [N*k, H]. Returns 0, or -1 for an expert index outside 0..E-1.
int nm_moe_dispatch(const int64_t *experts, int64_t N, int64_t k, int64_t E, const char *x, int64_t ldx, int64_t H,
                    int64_t es, int64_t *order, int64_t *counts, int64_t *bounds, char *xs) {
  for (int64_t e = 0; e < E; e++) counts[e] = 0;
  for (int64_t p = 0; p < N * k; p++) {
    if (experts[p] < 0 || experts[p] >= E) return -1;
    counts[experts[p]]++;
  }
  bounds[0] = 0;
  for (int64_t e = 0; e < E; e++) bounds[e + 1] = bounds[e] + counts[e];
  int64_t *next = malloc((size_t)E * sizeof(int64_t));
  if (!next) return -2;
  memcpy(next, bounds, (size_t)E * sizeof(int64_t));
  for (int64_t p = 0; p < N * k; p++) order[next[experts[p]]++] = p;
  free(next);
  for (int64_t r = 0; r < N * k; r++) memcpy(xs + r * H * es, x + (order[r] / k) * ldx * es, (size_t)(H * es));
  return 0;
}

// y [N, H] = for each token, sum over its k slots in slot order of (weight x its expert's row of ys),
// + bias; ys [N*k, H] in expert order (order from nm_moe_dispatch), weights [N*k] in (token, slot)
// order. torch's roundings: in bf16 each product is rounded, the slot sum is taken in fp32 and
// rounded once, and + bias rounded again; fp32 is the same without the roundings.
__attribute__((optimize("fp-contract=off"))) int nm_moe_combine(
    const void *ys, const int64_t *order, const void *weights, int64_t N, int64_t k, int64_t H, int bf16,
    const void *bias, void *y) {
  int64_t *row = malloc((size_t)(N * k) * sizeof(int64_t));  // (token, slot) pair -> its row of ys
  float *acc = malloc((size_t)H * sizeof(float));
  if (!row || !acc) { free(row); free(acc); return -2; }
  for (int64_t r = 0; r < N * k; r++) row[order[r]] = r;
  for (int64_t t = 0; t < N; t++) {
    for (int64_t h = 0; h < H; h++) acc[h] = 0.0f;
    for (int64_t s = 0; s < k; s++) {
      int64_t p = t * k + s, r = row[p];
      if (bf16) {
        const uint16_t *yr = (const uint16_t *)ys + r * H;
        float w = bf16_f32(((const uint16_t *)weights)[p]);
        for (int64_t h = 0; h < H; h++) acc[h] += bf16_f32(f32_bf16(bf16_f32(yr[h]) * w));
      } else {
        const float *yr = (const float *)ys + r * H;
        float w = ((const float *)weights)[p];
        for (int64_t h = 0; h < H; h++) acc[h] += yr[h] * w;
      }
    }
    if (bf16) {
      uint16_t *out = (uint16_t *)y + t * H;
      for (int64_t h = 0; h < H; h++)
        out[h] = bias ? f32_bf16(bf16_f32(f32_bf16(acc[h])) + bf16_f32(((const uint16_t *)bias)[h])) : f32_bf16(acc[h]);
    } else {
      float *out = (float *)y + t * H;
      for (int64_t h = 0; h < H; h++) out[h] = bias ? acc[h] + ((const float *)bias)[h] : acc[h];
    }
  }
  free(row);
  free(acc);
  return 0;
}

#if defined(__AVX512BF16__)
int nm_has_bf16(void) { return 1; }

static inline __m512 bf16_to_f32(const uint16_t *p) { return bf16x16_ps(_mm256_loadu_si256((const __m256i *)p)); }

static inline __attribute__((always_inline)) void tile_bf16(
    const uint16_t *x, int64_t ldx, const int mt, int64_t K, const uint16_t *panel,
    const uint16_t *bias, uint16_t *y, int64_t ldy, int ncols, const uint16_t *warm, int64_t wmul, int gelu) {
  __m512 acc[MT][2];
  for (int m = 0; m < mt; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {  // one pair of k per step: 2 x 16 columns x 2 bf16
    const uint16_t *w = panel + k * NB;
    __builtin_prefetch(w + AHEAD * NB);
    __builtin_prefetch(w + AHEAD * NB + 2 * VW);
    if (warm) {
      const uint16_t *p = warm + ((k * NB * wmul) >> 16);
      __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(p + 2 * VW, 0, 2);
    }
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 2 * VW);
    for (int m = 0; m < mt; m++) {
      int32_t pair;
      memcpy(&pair, x + m * ldx + k, sizeof pair);
      __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  for (int m = 0; m < mt; m++) {
    uint16_t out[NB];
    for (int h = 0; h < 2; h++) {
      __m512 v = acc[m][h];
      if (bias) {
        if (ncols == NB) v = _mm512_add_ps(v, bf16_to_f32(bias + h * VW));
        else { uint16_t b[VW] = {0}; for (int j = h * VW; j < ncols && j < (h + 1) * VW; j++) b[j - h * VW] = bias[j];
               v = _mm512_add_ps(v, bf16_to_f32(b)); }
      }
      if (gelu) v = gelu_ps(v);  // an MLP's up product: F.gelu of the fp32 sum, then one rounding
      __m256bh r = _mm512_cvtneps_pbh(v);  // round to nearest even, as torch rounds
      memcpy(out + h * VW, &r, sizeof r);
    }
    memcpy(y + m * ldy, out, (size_t)ncols * sizeof(uint16_t));
  }
}

static void panel_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *panel,
                       const uint16_t *b, uint16_t *y, int64_t ldy, int ncols, const uint16_t *next, int gelu) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const uint16_t *xm = x + m0 * ldx;
    uint16_t *ym = y + m0 * ldy;
    int64_t wmul, share = warm_share(M, m0, K, &wmul);
    const uint16_t *warm = next && share >= 0 ? next + share : 0;
    switch (M - m0 >= MT ? MT : (int)(M - m0)) {
#define CASE(n) case n: tile_bf16(xm, ldx, n, K, panel, b, ym, ldy, ncols, warm, wmul, gelu); break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
  }
}

// As nm_grouped_f32, in bf16 (bit patterns as uint16) with fp32 sums; K must be even.
void nm_grouped_bf16(const uint16_t *x, int64_t ldx, int64_t K, int64_t E, const int64_t *bounds,
                     const uint16_t *const *wps, int64_t N, const uint16_t *bias, uint16_t *y, int64_t ldy, int gelu,
                     int nthreads) {
  int64_t panels = (N + NB - 1) / NB;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  for (int64_t e = 0; e < E; e++) {
    int64_t lo = bounds[e], rows = bounds[e + 1] - bounds[e];
    if (rows <= 0) continue;
#pragma omp for schedule(static) nowait
    for (int64_t p = 0; p < panels; p++)
      panel_bf16(x + lo * ldx, ldx, rows, K, wps[e] + p * K * NB, bias ? bias + p * NB : 0, y + lo * ldy + p * NB, ldy,
                 panel_cols(N, p), p + 1 < panels ? wps[e] + (p + 1) * K * NB : 0, gelu);
  }
}

void nm_linear_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *wp, int64_t N,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int nthreads) {
  int64_t bounds[2] = {0, M};
  nm_grouped_bf16(x, ldx, K, 1, bounds, &wp, N, bias, y, ldy, 0, nthreads);
}
#else
int nm_has_bf16(void) { return 0; }  // bf16 stays with oneDNN (and fp32 is what `auto` picks on such a CPU)
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
int nm_has_int8(void) { return 1; }

// s32 sums -> fp32 as int8_matmul_per_token rounds them: sum * (row scale * column scale), then + bias,
// each product and sum rounded on its own (no fused multiply-add: fp-contract=off, which also holds
// for the intrinsics' vector arithmetic), so that the vectors are torch's. sums [mt][NB], one tile.
__attribute__((noinline, optimize("fp-contract=off"))) static void epilogue_s8(
    const int32_t *sums, int mt, const int32_t *colsum, const float *xscale, const float *wscale, const float *bias,
    float *y, int64_t ldy, int ncols) {
  for (int h = 0; h * VW < ncols; h++) {  // 16 columns a vector; lanes past ncols are neither read nor written
    __mmask16 k = first_lanes(ncols - h * VW);
    // u8 = s8 + 128, so a sum holds 128 * (the column's weight sum) too: taken off exactly, in integers
    __m512i c128 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(k, colsum + h * VW), 7);
    __m512 ws = _mm512_maskz_loadu_ps(k, wscale + h * VW), b = bias ? _mm512_maskz_loadu_ps(k, bias + h * VW) : _mm512_setzero_ps();
    for (int m = 0; m < mt; m++) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, sums + m * NB + h * VW), c128));
      v = _mm512_mul_ps(v, _mm512_mul_ps(_mm512_set1_ps(xscale[m]), ws));
      if (bias) v = _mm512_add_ps(v, b);
      _mm512_mask_storeu_ps(y + m * ldy + h * VW, k, v);
    }
  }
}

// Rows of s8 activations (shifted to u8, see below) against one panel of s8 weight quads; s32 sums.
static inline __attribute__((always_inline)) void tile_s8(
    const uint8_t *xq, int64_t K, const int mt, const int8_t *panel, const int32_t *colsum,
    const float *xscale, const float *wscale, const float *bias, float *y, int64_t ldy, int ncols, const int8_t *warm,
    int64_t wmul) {
  __m512i acc[MT][2];
  for (int m = 0; m < mt; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 4) {  // one quad of k per step: 2 x 16 columns x 4 s8
    const int8_t *w = panel + k * NB;
    __builtin_prefetch(w + 4096);
    __builtin_prefetch(w + 4096 + 64);
    if (warm) {
      const int8_t *p = warm + ((k * NB * wmul) >> 16);
      __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(p + 64, 0, 2);
    }
    __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 4 * VW);
    for (int m = 0; m < mt; m++) {
      int32_t quad;
      memcpy(&quad, xq + m * K + k, sizeof quad);
      __m512i xb = _mm512_set1_epi32(quad);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xb, w1);
    }
  }
  // every row's sums leave the registers before the first epilogue call: a value live across a
  // call is spilled (all vector registers are the caller's to save), and with a call after the loop
  // GCC kept the accumulators moving between registers and the stack on every step of it (the
  // products at 32-64 rows per expert ran 1.15x slower so)
  int32_t out[MT][NB];
  for (int m = 0; m < mt; m++) {
    _mm512_storeu_si512(out[m], acc[m][0]);
    _mm512_storeu_si512(out[m] + VW, acc[m][1]);
  }
  epilogue_s8(&out[0][0], mt, colsum, xscale, wscale, bias, y, ldy, ncols);
}

// One row quantized as quantize_rows in int8_nomic_moe.py (symmetric s8, scale max|x|/127, round half
// to even), stored shifted to u8 (+128) for vpdpbusd's unsigned operand. With `g` (K floats of the
// thread's), the row is GELU'd first, into g: the down product of an MLP takes its input as the up
// product left it, without a pass of F.gelu over memory in between (gelu_ps, vec_math.h: within 1.5e-6
// of F.gelu, so a value moves to the next int8 step only where it lay within that of a half step).
static void quantize_row(const float *row, int64_t K, float *g, uint8_t *q, float *scale_out) {
  __m512 vmax = _mm512_setzero_ps();  // max |x| in vectors: the order of a max does not change it
  int64_t k = 0;
  if (g) {
    for (; k < K; k += VW) {
      __mmask16 live = first_lanes(K - k);
      __m512 v = gelu_ps(_mm512_maskz_loadu_ps(live, row + k));
      _mm512_mask_storeu_ps(g + k, live, v);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));  // masked lanes are gelu(0) = 0
    }
    row = g;
  }
  for (; k + VW <= K; k += VW) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < K; k++) {  // not fmaxf: its NaN rule keeps it a scalar call per element
    float a = fabsf(row[k]);
    amax = a > amax ? a : amax;
  }
  float scale = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
  *scale_out = scale;
  for (k = 0; k < K; k++) q[k] = (uint8_t)((int)nearbyintf(row[k] / scale) + 128);
}

static void panel_s8(const uint8_t *xq, int64_t K, int64_t M, const int8_t *panel, const int32_t *colsum,
                     const float *xscale, const float *wscale, const float *b, float *y, int64_t ldy, int ncols,
                     const int8_t *next) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const uint8_t *xm = xq + m0 * K;
    float *ym = y + m0 * ldy;
    int64_t wmul, share = warm_share(M, m0, K, &wmul);
    const int8_t *warm = next && share >= 0 ? next + share : 0;
    const float *xs = xscale + m0;
    switch (M - m0 >= MT ? MT : (int)(M - m0)) {
#define CASE(n) case n: tile_s8(xm, K, n, panel, colsum, xs, wscale, b, ym, ldy, ncols, warm, wmul); break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
  }
}

// As nm_grouped_f32, in int8: y [M, N] fp32 = (x quantized per row: symmetric s8, scale max|x|/127)
// @ (s8 W, scale per column).T (+ bias): the integer sums of torch._int_mm on the same s8 numbers.
// Every row is quantized once (rows split between the threads), then each expert's rows go against
// its s8 panels (wps[e], colsums[e], wscales[e]). K must be a multiple of 4. gelu: x is GELU'd on the
// way in (see quantize_row). Returns 0, or -1 where the activations' buffer could not be had.
int nm_grouped_s8(const float *x, int64_t ldx, int64_t K, int64_t E, const int64_t *bounds,
                  const int8_t *const *wps, const int32_t *const *colsums, const float *const *wscales,
                  int64_t N, const float *bias, float *y, int64_t ldy, int gelu, int nthreads) {
  int64_t M = bounds[E] - bounds[0];
  uint8_t *xq = malloc((size_t)(M * K));
  float *xscale = malloc((size_t)M * sizeof(float));
  if (!xq || !xscale) { free(xq); free(xscale); return -1; }
  int64_t panels = (N + NB - 1) / NB, first = bounds[0];
  int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    float *g = gelu ? malloc((size_t)K * sizeof(float)) : 0;
    if (gelu && !g) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
      if (!gelu || g) quantize_row(x + (first + m) * ldx, K, g, xq + m * K, xscale + m);
    free(g);
    // (the loop's closing barrier: every row is quantized before any product reads one, and every
    // thread sees the same `failed`, so all skip the products together when a GELU buffer was missing)
    int skip;
#pragma omp atomic read
    skip = failed;
    for (int64_t e = 0; e < E && !skip; e++) {
      int64_t lo = bounds[e] - first, rows = bounds[e + 1] - bounds[e];
      if (rows <= 0) continue;
#pragma omp for schedule(static) nowait
      for (int64_t p = 0; p < panels; p++)
        panel_s8(xq + lo * K, K, rows, wps[e] + p * K * NB, colsums[e] + p * NB, xscale + lo, wscales[e] + p * NB,
                 bias ? bias + p * NB : 0, y + (first + lo) * ldy + p * NB, ldy, panel_cols(N, p),
                 p + 1 < panels ? wps[e] + (p + 1) * K * NB : 0);
    }
  }
  free(xq);
  free(xscale);
  return failed ? -1 : 0;
}

// y[i] = gelu_ps(x[i]): the int8 calls' GELU alone, for the tests to hold it to F.gelu.
void nm_gelu_f32(const float *x, int64_t n, float *y) {
  for (int64_t i = 0; i < n; i += VW) {
    __mmask16 live = first_lanes(n - i);
    _mm512_mask_storeu_ps(y + i, live, gelu_ps(_mm512_maskz_loadu_ps(live, x + i)));
  }
}

int nm_linear_s8(const float *x, int64_t ldx, int64_t M, int64_t K, const int8_t *wp, const int32_t *colsum,
                 const float *wscale, int64_t N, const float *bias, float *y, int64_t ldy, int gelu, int nthreads) {
  int64_t bounds[2] = {0, M};
  return nm_grouped_s8(x, ldx, K, 1, bounds, &wp, &colsum, &wscale, N, bias, y, ldy, gelu, nthreads);
}
#else
int nm_has_int8(void) { return 0; }  // int8 keeps torch's kernels (FBGEMM, oneDNN)
#endif
