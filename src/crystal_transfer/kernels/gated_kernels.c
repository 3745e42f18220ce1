/* Compiled CPU kernels of CGCNN's gated convolution, the edge part (crystal_transfer.models.gated.CompiledGatedMessages).

   Rows are edges e = n * n_slots + m of the (E, 2h) tensor z = W_i v_i + W_j v_j + W_e u_ij + b; the first h
   channels are the filter half f, the last h the core half c. BatchNorm is folded into per-channel
   scale and shift (x = z * scale + shift); the messages are sigmoid(x_f) * softplus(x_c), summed over each atom's
   slots. Every function works on a range of atoms or rows, so that the caller can split the work among threads.
   crystal_transfer.native compiles this file with the machine's C compiler (-O3 -march=native -ffast-math) on
   first use; exp and log1p are written out as polynomials so that the loops vectorise without a vector maths
   library. tests/models/test_cgcnn.py compares the results with PyTorch's. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (Cephes' single-precision polynomial, about 1 ulp), written so that the compiler vectorises it */
static inline float exp_nonpos(float x) {
  x = fmaxf(x, -87.0f);
  float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

/* 2 atanh(s) = log1p(e) for s = e / (2 + e), e in [0, 1], so s <= 1/3: the series to s^15, relative error < 2e-9 */
static inline float log1p_series(float s) {
  float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

/* per-channel sum and sum of squares of z rows [r0, r1), accumulated in double */
void ct_col_stats(const float *restrict z, int64_t r0, int64_t r1, int64_t width, double *restrict sum,
                  double *restrict sumsq) {
  for (int64_t k = 0; k < width; k++) { sum[k] = 0.0; sumsq[k] = 0.0; }
  for (int64_t r = r0; r < r1; r++) {
    const float *row = z + r * width;
    for (int64_t k = 0; k < width; k++) { double v = row[k]; sum[k] += v; sumsq[k] += v * v; }
  }
}

/* x = z * scale + shift; gate = sigmoid(x_f), slope = sigmoid(x_c), sp = sigmoid(-x_f) * softplus(x_c) (what the
   filter half's gradient needs);
   out[n, :] = sum_m sigmoid(x_f) * softplus(x_c), for atoms [n0, n1) */
static inline void gated_forward(const float *restrict z, const float *restrict scale,
                                 const float *restrict shift, float *restrict gate, float *restrict slope,
                                 float *restrict sp, float *restrict out, int64_t n0, int64_t n1, int64_t n_slots,
                                 int64_t h, int keep) {
  for (int64_t n = n0; n < n1; n++) {
    float *o = out + n * h;
    for (int64_t k = 0; k < h; k++) o[k] = 0.0f;
    for (int64_t m = 0; m < n_slots; m++) {
      int64_t e = n * n_slots + m;
      const float *row = z + e * 2 * h;
      for (int64_t k = 0; k < h; k++) {
        float f = row[k] * scale[k] + shift[k];
        float c = row[h + k] * scale[h + k] + shift[h + k];
        float ef = exp_nonpos(-fabsf(f));
        float ec = exp_nonpos(-fabsf(c));
        /* one division for the three reciprocals 1/(1+ef), 1/(1+ec), 1/(2+ec) */
        float af = 1.0f + ef, ac = 1.0f + ec, bc = 2.0f + ec;
        float r = 1.0f / (af * ac * bc);
        float rf = r * ac * bc;
        float sf = (f >= 0.0f ? 1.0f : ef) * rf;
        float softc = fmaxf(c, 0.0f) + log1p_series(ec * (r * af * ac));
        if (keep) { /* a constant in each caller: the branch is compiled away */
          float nf = (f >= 0.0f ? ef : 1.0f) * rf; /* 1 - sigmoid(f), without the cancellation near 1 */
          gate[e * h + k] = sf;
          slope[e * h + k] = (c >= 0.0f ? 1.0f : ec) * (r * af * bc);
          sp[e * h + k] = nf * softc;
        }
        o[k] += sf * softc;
      }
    }
  }
}

void ct_gated_forward(const float *restrict z, const float *restrict scale, const float *restrict shift,
                      float *restrict gate, float *restrict slope, float *restrict sp, float *restrict out,
                      int64_t n0, int64_t n1, int64_t n_slots, int64_t h) {
  gated_forward(z, scale, shift, gate, slope, sp, out, n0, n1, n_slots, h, 1);
}

/* ct_gated_forward without what only the backward needs (gradient disabled): out only */
void ct_gated_forward_inference(const float *restrict z, const float *restrict scale, const float *restrict shift,
                                float *restrict out, int64_t n0, int64_t n1, int64_t n_slots, int64_t h) {
  gated_forward(z, scale, shift, NULL, NULL, NULL, out, n0, n1, n_slots, h, 0);
}

/* dy (the gradient w.r.t. x = BN output) into dz for atoms [n0, n1), with per-channel sums of dy and dy * z:
   dy_f = grad * sigmoid(f) * sigmoid(-f) * softplus(c), dy_c = grad * sigmoid(f) * sigmoid(c) */
void ct_gated_backward_dy(const float *restrict grad, const float *restrict gate, const float *restrict slope,
                          const float *restrict sp, const float *restrict z, float *restrict dz,
                          double *restrict sum_dy, double *restrict sum_dyz, int64_t n0, int64_t n1,
                          int64_t n_slots, int64_t h) {
  for (int64_t k = 0; k < 2 * h; k++) { sum_dy[k] = 0.0; sum_dyz[k] = 0.0; }
  for (int64_t n = n0; n < n1; n++) {
    const float *gr = grad + n * h;
    for (int64_t m = 0; m < n_slots; m++) {
      int64_t e = n * n_slots + m;
      const float *g = gate + e * h, *s = slope + e * h, *p = sp + e * h, *row = z + e * 2 * h;
      float *d = dz + e * 2 * h;
      for (int64_t k = 0; k < h; k++) {
        float gg = gr[k] * g[k];
        float df = gg * p[k];
        float dc = gg * s[k];
        d[k] = df; d[h + k] = dc;
        sum_dy[k] += df; sum_dyz[k] += (double)df * row[k];
        sum_dy[h + k] += dc; sum_dyz[h + k] += (double)dc * row[h + k];
      }
    }
  }
}

/* ---- the edge matmul by bands ----------------------------------------------------------------------------------
   The edge features u_e[k] = exp(-(d_e - mu_k)^2 / width^2) are exactly zero (models.layers.gaussian_expand) where the
   exponent exceeds 87, i.e. outside a band of about 19 of CGCNN's 41 centres around d_e: only the band's
   columns of W_e contribute. band() gives the band [lo, hi] of centres mu_k = dmin + k * step within `reach`
   (sqrt(87) * width plus a margin) of d; the entries read are those of u itself, so the result is the dense
   product's up to the order of the sums. wt is W_e transposed, (G, width) row-major. */
static inline void band(float d, int64_t g, float dmin, float step, float reach, int64_t *lo, int64_t *hi) {
  /* clamped as floats before the casts: a distance far beyond the centres gives an empty band (hi < lo), not an
     overflowing cast (the caller sends only finite distances: -ffast-math assumes no NaN or infinity) */
  float first = fminf(fmaxf(ceilf((d - reach - dmin) / step), 0.0f), (float)g);
  float last = fminf(fmaxf(floorf((d + reach - dmin) / step), -1.0f), (float)(g - 1));
  *lo = (int64_t)first;
  *hi = (int64_t)last;
}

/* z[e, :] = nbr[idx[e], :] + self[e / n_slots, :] + sum_{k in band(d_e)} u[e, k] * wt[k, :] for atoms [n0, n1);
   with `stats`, also the per-channel sum and sum of squares of these rows in double (ct_col_stats, fused) */
static inline void gather_add_band(const float *restrict nbr, const float *restrict self_part,
                                   const int64_t *restrict idx, const float *restrict u, const float *restrict dist,
                                   const float *restrict wt, float *restrict z, double *restrict sum,
                                   double *restrict sumsq, int64_t n0, int64_t n1, int64_t n_slots, int64_t width,
                                   int64_t g, float dmin, float step, float reach, int stats) {
  if (stats)
    for (int64_t k = 0; k < width; k++) { sum[k] = 0.0; sumsq[k] = 0.0; }
  for (int64_t n = n0; n < n1; n++) {
    const float *s = self_part + n * width;
    for (int64_t m = 0; m < n_slots; m++) {
      int64_t e = n * n_slots + m, lo, hi;
      const float *src = nbr + idx[e] * width;
      float *dst = z + e * width;
      for (int64_t k = 0; k < width; k++) dst[k] = src[k] + s[k];
      if (g > 0) { /* g == 0: ct_gather_add, no edge features */
        band(dist[e], g, dmin, step, reach, &lo, &hi);
        const float *ue = u + e * g;
        for (int64_t j = lo; j <= hi; j++) {
          float uj = ue[j];
          const float *w = wt + j * width;
          for (int64_t k = 0; k < width; k++) dst[k] += uj * w[k];
        }
      }
      if (stats) /* a constant in each caller: compiled away where 0 */
        for (int64_t k = 0; k < width; k++) { double v = dst[k]; sum[k] += v; sumsq[k] += v * v; }
    }
  }
}

void ct_gather_add_band(const float *restrict nbr, const float *restrict self_part, const int64_t *restrict idx,
                        const float *restrict u, const float *restrict dist, const float *restrict wt,
                        float *restrict z, double *restrict sum, double *restrict sumsq, int64_t n0, int64_t n1,
                        int64_t n_slots, int64_t width, int64_t g, float dmin, float step, float reach) {
  /* CGCNN's 2 x 64 channels: a constant row length the compiler unrolls into registers */
  if (width == 128 && sum)
    gather_add_band(nbr, self_part, idx, u, dist, wt, z, sum, sumsq, n0, n1, n_slots, 128, g, dmin, step, reach, 1);
  else if (width == 128)
    gather_add_band(nbr, self_part, idx, u, dist, wt, z, sum, sumsq, n0, n1, n_slots, 128, g, dmin, step, reach, 0);
  else
    gather_add_band(nbr, self_part, idx, u, dist, wt, z, sum, sumsq, n0, n1, n_slots, width, g, dmin, step, reach,
                    sum != NULL);
}

/* ct_bn_backward_apply, and the gradient of W_e (transposed, (G, width)) by bands in the same pass:
   dwt[k, :] = sum_e u[e, k] * dz[e, :] over the edges of atoms [n0, n1), in float32 over blocks of 32 atoms
   and in float64 across blocks (dwt: this range's own (G, width) float64 buffer, zeroed by the caller);
   block: scratch of G * width floats */
static inline void bn_backward_apply_band(float *restrict dz, const float *restrict z, const float *restrict a,
                                          const float *restrict b, const float *restrict c,
                                          const int64_t *restrict idx, float *restrict d_self,
                                          float *restrict d_nbr, const float *restrict u,
                                          const float *restrict dist, double *restrict dwt, float *restrict block,
                                          int64_t n0, int64_t n1, int64_t n_slots, int64_t width, int64_t g,
                                          float dmin, float step, float reach) {
  if (dwt)
    for (int64_t k = 0; k < g * width; k++) block[k] = 0.0f;
  for (int64_t n = n0; n < n1; n++) {
    float *ds = d_self + n * width;
    for (int64_t k = 0; k < width; k++) ds[k] = 0.0f;
    for (int64_t m = 0; m < n_slots; m++) {
      int64_t e = n * n_slots + m, lo, hi;
      float *d = dz + e * width;
      const float *row = z + e * width;
      if (d_nbr) {
        float *dn = d_nbr + idx[e] * width;
        for (int64_t k = 0; k < width; k++) {
          float v = d[k] * a[k] + row[k] * b[k] + c[k];
          d[k] = v; ds[k] += v; dn[k] += v;
        }
      } else {
        for (int64_t k = 0; k < width; k++) {
          float v = d[k] * a[k] + row[k] * b[k] + c[k];
          d[k] = v; ds[k] += v;
        }
      }
      if (dwt) {
        band(dist[e], g, dmin, step, reach, &lo, &hi);
        const float *ue = u + e * g;
        for (int64_t j = lo; j <= hi; j++) {
          float uj = ue[j];
          float *w = block + j * width;
          for (int64_t k = 0; k < width; k++) w[k] += uj * d[k];
        }
      }
    }
    if (dwt && ((n - n0) % 32 == 31 || n == n1 - 1)) {
      for (int64_t k = 0; k < g * width; k++) { dwt[k] += block[k]; block[k] = 0.0f; }
    }
  }
}

void ct_bn_backward_apply_band(float *restrict dz, const float *restrict z, const float *restrict a,
                               const float *restrict b, const float *restrict c, const int64_t *restrict idx,
                               float *restrict d_self, float *restrict d_nbr, const float *restrict u,
                               const float *restrict dist, double *restrict dwt, float *restrict block,
                               int64_t n0, int64_t n1, int64_t n_slots, int64_t width, int64_t g, float dmin,
                               float step, float reach) {
  if (width == 128)
    bn_backward_apply_band(dz, z, a, b, c, idx, d_self, d_nbr, u, dist, dwt, block, n0, n1, n_slots, 128, g, dmin,
                           step, reach);
  else
    bn_backward_apply_band(dz, z, a, b, c, idx, d_self, d_nbr, u, dist, dwt, block, n0, n1, n_slots, width, g,
                           dmin, step, reach);
}

/* dz = dz * a + z * b + c in place for atoms [n0, n1); d_self[n, :] = sum_m dz[n, m, :] and, when d_nbr is not
   NULL, d_nbr[idx[e], :] += dz[e, :] (d_nbr zeroed by the caller; one buffer per range of atoms) */
void ct_bn_backward_apply(float *restrict dz, const float *restrict z, const float *restrict a,
                          const float *restrict b, const float *restrict c, const int64_t *restrict idx,
                          float *restrict d_self, float *restrict d_nbr, int64_t n0, int64_t n1, int64_t n_slots,
                          int64_t width) {
  ct_bn_backward_apply_band(dz, z, a, b, c, idx, d_self, d_nbr, NULL, NULL, NULL, NULL, n0, n1, n_slots, width, 0,
                            0.0f, 1.0f, 0.0f);
}

/* CGCNN's Gaussian edge features of distances [r0, r1) (models.layers.gaussian_expand in one pass):
   u[r, k] = exp(-(d_r - mu_k)^2 * inv_w2), written as exactly 0 where the exponent exceeds max_exponent (87:
   below that, float32 turns subnormal) */
void ct_gaussian_expand(const float *restrict dist, const float *restrict centres, float *restrict u, int64_t r0,
                        int64_t r1, int64_t g, float inv_w2, float max_exponent) {
  for (int64_t r = r0; r < r1; r++) {
    float d = dist[r];
    float *row = u + r * g;
    for (int64_t k = 0; k < g; k++) {
      float x = d - centres[k];
      float exponent = x * x * inv_w2;
      float value = exp_nonpos(-fminf(exponent, max_exponent));
      row[k] = exponent > max_exponent ? 0.0f : value;
    }
  }
}

/* z[e, :] = nbr[idx[e], :] + self[e / n_slots, :] for atoms [n0, n1) (the edge matmul follows in PyTorch) */
void ct_gather_add(const float *restrict nbr, const float *restrict self_part, const int64_t *restrict idx,
                   float *restrict z, int64_t n0, int64_t n1, int64_t n_slots, int64_t width) {
  gather_add_band(nbr, self_part, idx, NULL, NULL, NULL, z, NULL, NULL, n0, n1, n_slots, width, 0, 0.0f, 1.0f, 0.0f,
                  0);
}
