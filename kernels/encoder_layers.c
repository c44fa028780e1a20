// The encoder layers of a short input in one call: NomicMoELayer.forward (modeling_nomic_moe.py),
// step for step, on this library's products and attention, for fp32 or bf16 activations (an int8
// model's are fp32: its matrices take the s8 products).
//
// Why: at a 32-token query a layer makes about ten product, attention and routing calls and a dozen
// torch operators between them; from Python that costs 150-200 us a layer before any arithmetic (a
// hidden-64 model's whole pass takes 2.4 ms in int8, RESULTS.md). Here the calls follow one another
// with nothing in between. The plain version is the model's own forward; the tests hold this to it.
//
// What is computed here and not in a product: residual add + LayerNorm and the router (fp32 logits,
// softmax, top-k, as NomicMoERouter). An MLP's GELU (gelu_ps) is taken inside a product: as a float
// up product writes its outputs, or as an s8 down product quantizes its input. In bf16 every step
// rounds its output to bf16 as torch's does (the GELU'd up product once, from its fp32 sums).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "vec_math.h"  // the float vector: AVX-512's 16 lanes or AVX2's 8, one source for both

#if defined(NM_VEC)

int nm_has_layers(void) { return 1; }

// the library's calls strung together here (small_gemm.c, short_attention.c)
void nm_linear_f32(const float *, int64_t, int64_t, int64_t, const float *, int64_t, const float *, float *, int64_t, int);
void nm_grouped_f32(const float *, int64_t, int64_t, int64_t, const int64_t *, const float *const *, int64_t,
                    const float *, float *, int64_t, int, int);
int nm_moe_dispatch(const int64_t *, int64_t, int64_t, int64_t, const char *, int64_t, int64_t, int64_t, int64_t *,
                    int64_t *, int64_t *, char *);
int nm_moe_combine(const void *, const int64_t *, const void *, int64_t, int64_t, int64_t, int, const void *, void *);
int nm_attention(const void *, int64_t, int, int64_t, int64_t, int64_t, const int64_t *, const float *, const float *,
                 float, void *, int);
#if defined(__AVX512BF16__)
void nm_linear_bf16(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, const uint16_t *, uint16_t *,
                    int64_t, int);
void nm_grouped_bf16(const uint16_t *, int64_t, int64_t, int64_t, const int64_t *, const uint16_t *const *, int64_t,
                     const uint16_t *, uint16_t *, int64_t, int, int);
#endif
#if defined(__AVX512VNNI__)
int nm_grouped_s8(const float *, int64_t, int64_t, int64_t, const int64_t *, const int8_t *const *,
                  const int32_t *const *, const float *const *, int64_t, const float *, float *, int64_t, int, int);
#endif

// One matrix in this library's layout: fp32 or bf16 panels (colsum NULL), or s8 quads with their
// column sums and per-column scales. E matrices of one shape for an MoE layer's experts.
typedef struct {
  const void *const *panels;     // [E]
  const int32_t *const *colsums;  // [E], int8 only
  const float *const *scales;     // [E], int8 only
  const void *bias;               // [n] in the activations' dtype, or NULL
  int64_t n, k;
} nm_mats;

typedef struct {
  nm_mats qkv, out;                 // the attention's two products
  const void *norm1_w, *norm1_b, *norm2_w, *norm2_b;  // [H], the activations' dtype
  float eps;
  int64_t heads, head_dim;
  int64_t experts;                  // 0: a dense layer (up, down: fc1, fc2)
  nm_mats up, down;                 // MoE: every expert's w1 and w2 (no bias)
  const float *router;              // [E, H] fp32
  int64_t top_k;
  int norm_topk;
  const void *expert_bias;          // [H]
} nm_layer;

// A vector of values at p[i..] (the m lanes) of the activations' dtype, as fp32; stored back rounded
// as torch rounds.
static inline vps load_act(const void *p, int64_t i, int bf16, vmask m) {
  return bf16 ? vps_load_bf16(m, (const uint16_t *)p + i) : vps_maskz_load(m, (const float *)p + i);
}

static inline void store_act(void *p, int64_t i, int bf16, vmask m, vps v) {
  if (bf16) vps_store_bf16((uint16_t *)p + i, m, v);
  else vps_mask_store((float *)p + i, m, v);
}

// x = LayerNorm(x + a) over rows of H (post-LN: NomicMoELayer's norm1 and norm2). In bf16 the sum is
// rounded before the norm, as torch's bf16 add leaves it; the norm is computed in fp32.
static void add_norm(void *x, const void *a, const void *w, const void *b, float eps, int64_t N, int64_t H, int bf16,
                     int nthreads) {
  int es = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && N * H >= 16384) schedule(static)
  for (int64_t t = 0; t < N; t++) {
    char *xr = (char *)x + t * H * es;
    const char *ar = (const char *)a + t * H * es;
    vps sum = vps_zero();
    for (int64_t i = 0; i < H; i += NM_VL) {
      vmask m = first_lanes(H - i);
      vps s = vps_add(load_act(xr, i, bf16, m), load_act(ar, i, bf16, m));
      store_act(xr, i, bf16, m, s);  // the residual sum, rounded as torch rounds it
      sum = vps_add(sum, load_act(xr, i, bf16, m));
    }
    float mean = vps_sum(sum) / (float)H;
    vps vm = vps_set1(mean), sq = vps_zero();
    for (int64_t i = 0; i < H; i += NM_VL) {
      vmask m = first_lanes(H - i);
      vps d = vps_maskz(m, vps_sub(load_act(xr, i, bf16, m), vm));
      sq = vps_fmadd(d, d, sq);
    }
    vps rstd = vps_set1(1.0f / sqrtf(vps_sum(sq) / (float)H + eps));
    for (int64_t i = 0; i < H; i += NM_VL) {
      vmask m = first_lanes(H - i);
      vps d = vps_mul(vps_sub(load_act(xr, i, bf16, m), vm), rstd);
      store_act(xr, i, bf16, m, vps_fmadd(d, load_act(w, i, bf16, m), load_act(b, i, bf16, m)));
    }
  }
}

// NomicMoERouter: fp32 logits x @ router.T, softmax, the top_k experts of each token (the larger
// probability first; a tie to the lower expert), their probabilities (renormalised with norm_topk),
// in the activations' dtype (rounded in bf16, as weights.to(x.dtype)).
static void route(const void *x, int bf16, int64_t N, int64_t H, const float *wr, int64_t E, int64_t k, int norm,
                  int64_t *experts, void *weights) {
  for (int64_t t = 0; t < N; t++) {
    float p[64], sum = 0.0f, top = -INFINITY;
    for (int64_t e = 0; e < E; e++) {
      vps acc = vps_zero();
      for (int64_t i = 0; i < H; i += NM_VL) {
        vmask m = first_lanes(H - i);
        acc = vps_fmadd(load_act(x, t * H + i, bf16, m), vps_maskz_load(m, wr + e * H + i), acc);
      }
      p[e] = vps_sum(acc);
      top = p[e] > top ? p[e] : top;
    }
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - top));
    float chosen[64], total = 0.0f;
    for (int64_t s = 0; s < k; s++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        int taken = 0;
        for (int64_t r = 0; r < s; r++) taken |= experts[t * k + r] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      experts[t * k + s] = best;
      total += chosen[s] = p[best] / sum;
    }
    for (int64_t s = 0; s < k; s++) {
      float w = norm ? chosen[s] / total : chosen[s];
      if (bf16) ((uint16_t *)weights)[t * k + s] = f32_bf16(w);
      else ((float *)weights)[t * k + s] = w;
    }
  }
}

// y [M, n] = x [M, k] through matrix set `m`: one matrix (E = 1) or every expert's rows at once
// (rows bounds[e]..bounds[e+1] through expert e). gelu_in (s8 only): of F.gelu(x), taken as the
// product quantizes x; gelu_out (float only): F.gelu of y, taken as the product writes it. Returns 0,
// or < 0 on a missing buffer or path.
static int product(const nm_mats *m, int64_t E, const int64_t *bounds, const void *x, int bf16, void *y, int gelu_in,
                   int gelu_out, int nthreads) {
  if (m->colsums) {
#if defined(__AVX512VNNI__)
    if (bf16 || gelu_out) return -3;
    return nm_grouped_s8(x, m->k, m->k, E, bounds, (const int8_t *const *)m->panels, m->colsums, m->scales, m->n,
                         m->bias, y, m->n, gelu_in, nthreads) ? -2 : 0;
#else
    return -3;
#endif
  }
  if (gelu_in) return -3;
  if (bf16) {
#if defined(__AVX512BF16__)
    nm_grouped_bf16(x, m->k, m->k, E, bounds, (const uint16_t *const *)m->panels, m->n, m->bias, y, m->n, gelu_out,
                    nthreads);
    return 0;
#else
    return -3;
#endif
  }
  nm_grouped_f32(x, m->k, m->k, E, bounds, (const float *const *)m->panels, m->n, m->bias, y, m->n, gelu_out, nthreads);
  return 0;
}

// An MLP's two products with the GELU between, inside one of them: an s8 down product takes it as it
// quantizes its input, else the up product as it writes its output.
static int mlp(const nm_mats *up, const nm_mats *down, int64_t E, const int64_t *bounds, const void *x, int bf16,
               void *h, void *y, int nthreads) {
  int s8_down = down->colsums != 0;
  int status = product(up, E, bounds, x, bf16, h, 0, !s8_down, nthreads);
  return status ? status : product(down, E, bounds, h, bf16, y, s8_down, 0, nthreads);
}

// x [N, H] in place through layers[0..L): texts at token offsets bounds [B+1], RoPE's cos and sin
// [N, head_dim] fp32 (the model's Packing.rope). counts [MoE layers, E] receives the (token, slot)
// pairs each expert got. Returns 0, -2 where a buffer could not be had, -3 for a matrix this build
// cannot run, -4 for an MoE layer of more than 64 experts.
int nm_encoder_layers(const nm_layer *layers, int64_t L, void *x, int bf16, int64_t N, int64_t H, int64_t B,
                      const int64_t *bounds, const float *cos, const float *sin, int64_t *counts, int nthreads) {
  int64_t es = bf16 ? 2 : 4, widest = 0, k = 1, E = 0;
  for (int64_t l = 0; l < L; l++) {
    const nm_layer *ly = &layers[l];
    widest = ly->up.n > widest ? ly->up.n : widest;
    if (ly->experts) {
      if (ly->experts > 64) return -4;
      k = ly->top_k > k ? ly->top_k : k;
      E = ly->experts > E ? ly->experts : E;
    }
  }
  int64_t qkv_n = 3 * H, slots = N * k;
  char *mem = malloc((size_t)(es * (N * qkv_n + 2 * N * H + slots * widest + 2 * slots * H) + 8 * (2 * slots + 2 * E + 1)
                              + 4 * slots));
  if (!mem) return -2;
  char *qkv = mem, *ctx = qkv + es * N * qkv_n, *a = ctx + es * N * H, *h = a + es * N * H, *xs = h + es * slots * widest,
       *ys = xs + es * slots * H;
  int64_t *experts = (int64_t *)(ys + es * slots * H), *order = experts + slots, *segs = order + slots,
          *scratch_counts = segs + E + 1;
  void *weights = scratch_counts + E;
  int64_t one[2] = {0, N};
  int status = 0;
  for (int64_t l = 0; l < L && !status; l++) {
    const nm_layer *ly = &layers[l];
    if ((status = product(&ly->qkv, 1, one, x, bf16, qkv, 0, 0, nthreads))) break;
    int att = nm_attention(qkv, qkv_n, bf16, ly->heads, ly->head_dim, B, bounds, cos, sin,
                           (float)(1.0 / sqrt((double)ly->head_dim)), ctx, nthreads);
    if (att) { status = att == -1 ? -3 : -2; break; }
    if ((status = product(&ly->out, 1, one, ctx, bf16, a, 0, 0, nthreads))) break;
    add_norm(x, a, ly->norm1_w, ly->norm1_b, ly->eps, N, H, bf16, nthreads);
    if (!ly->experts) {
      if ((status = mlp(&ly->up, &ly->down, 1, one, x, bf16, h, a, nthreads))) break;
    } else {
      int64_t *got = counts ? counts : scratch_counts;
      route(x, bf16, N, H, ly->router, ly->experts, ly->top_k, ly->norm_topk, experts, weights);
      if (nm_moe_dispatch(experts, N, ly->top_k, ly->experts, x, H, H, es, order, got, segs, xs)) { status = -2; break; }
      if ((status = mlp(&ly->up, &ly->down, ly->experts, segs, xs, bf16, h, ys, nthreads))) break;
      if (nm_moe_combine(ys, order, weights, N, ly->top_k, H, bf16, ly->expert_bias, a)) { status = -2; break; }
      if (counts) counts += ly->experts;
    }
    add_norm(x, a, ly->norm2_w, ly->norm2_b, ly->eps, N, H, bf16, nthreads);
  }
  free(mem);
  return status;
}
#else
int nm_has_layers(void) { return 0; }  // no vector unit these files are written for: the model's own forward
#endif
