/* tucker_fx: y = W2 act(W1 z + b1) + b2 over positions, the wide map never written (AVX2 + FMA, float32).

   z: (R1, P) contiguous; W1: (C, R1); b1: C floats; W2: (R2, C); b2: R2 floats or NULL;
   y: (R2, P) contiguous; act(h) = h for h > 0, slope * h otherwise (slope 0: ReLU, 1: none).
   Each exported function takes N samples (x, y, and any per-sample operand one after the other)
   and splits samples and positions over nt threads (parallel.h); the static ones below them do
   one sample's positions p0 <= p < p1. Returns 0, or -1 for shapes out of range or no memory.

   A Tucker block's last factor (R1 -> C channels), its norm and activation, and the next block's
   first factor (C -> R2) are, per position, two small matrix products around an elementwise
   function. Computed 16 positions at a time, the C-channel intermediate lives in a 16 x C buffer
   on the stack (L1) instead of a full-width map in memory (16 MB for 16 channels at 64^3). */
#include <immintrin.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "parallel.h"

#define PW 16
#define CMAX 512  /* channels of the wide map (stack: 32 KB of h) */

static inline __m256 act(__m256 h, __m256 slope) {
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_blendv_ps(_mm256_mul_ps(h, slope), h, _mm256_cmp_ps(h, zero, _CMP_GT_OQ));
}

/* yp[o * ys + j] = b2[o] (+ skip[o * ss + j]) + sum_k W2[o, k] h[k][j], for 16 positions j. */
static void project(const __m256* h, int C, const float* w2, const float* b2, const float* skip, long ss,
                    float* yp, long ys, int R2) {
    int o = 0;
    for (; o + 4 <= R2; o += 4) {
        __m256 a[4][2];
        for (int i = 0; i < 4; i++) {
            const __m256 bb = _mm256_set1_ps(b2 ? b2[o + i] : 0.f);
            a[i][0] = skip ? _mm256_add_ps(bb, _mm256_loadu_ps(skip + (o + i) * ss)) : bb;
            a[i][1] = skip ? _mm256_add_ps(bb, _mm256_loadu_ps(skip + (o + i) * ss + 8)) : bb;
        }
        __m256 a00 = a[0][0], a01 = a[0][1], a10 = a[1][0], a11 = a[1][1];
        __m256 a20 = a[2][0], a21 = a[2][1], a30 = a[3][0], a31 = a[3][1];
        for (int k = 0; k < C; k++) {
            const __m256 x0 = h[2 * k], x1 = h[2 * k + 1];
            const __m256 u0 = _mm256_broadcast_ss(w2 + (long)o * C + k), u1 = _mm256_broadcast_ss(w2 + (long)(o + 1) * C + k);
            const __m256 u2 = _mm256_broadcast_ss(w2 + (long)(o + 2) * C + k), u3 = _mm256_broadcast_ss(w2 + (long)(o + 3) * C + k);
            a00 = _mm256_fmadd_ps(u0, x0, a00); a01 = _mm256_fmadd_ps(u0, x1, a01);
            a10 = _mm256_fmadd_ps(u1, x0, a10); a11 = _mm256_fmadd_ps(u1, x1, a11);
            a20 = _mm256_fmadd_ps(u2, x0, a20); a21 = _mm256_fmadd_ps(u2, x1, a21);
            a30 = _mm256_fmadd_ps(u3, x0, a30); a31 = _mm256_fmadd_ps(u3, x1, a31);
        }
        _mm256_storeu_ps(yp + o * ys, a00); _mm256_storeu_ps(yp + o * ys + 8, a01);
        _mm256_storeu_ps(yp + (o + 1) * ys, a10); _mm256_storeu_ps(yp + (o + 1) * ys + 8, a11);
        _mm256_storeu_ps(yp + (o + 2) * ys, a20); _mm256_storeu_ps(yp + (o + 2) * ys + 8, a21);
        _mm256_storeu_ps(yp + (o + 3) * ys, a30); _mm256_storeu_ps(yp + (o + 3) * ys + 8, a31);
    }
    for (; o < R2; o++) {
        const __m256 bb = _mm256_set1_ps(b2 ? b2[o] : 0.f);
        __m256 a0 = skip ? _mm256_add_ps(bb, _mm256_loadu_ps(skip + o * ss)) : bb;
        __m256 a1 = skip ? _mm256_add_ps(bb, _mm256_loadu_ps(skip + o * ss + 8)) : bb;
        for (int k = 0; k < C; k++) {
            const __m256 u = _mm256_broadcast_ss(w2 + (long)o * C + k);
            a0 = _mm256_fmadd_ps(u, h[2 * k], a0);
            a1 = _mm256_fmadd_ps(u, h[2 * k + 1], a1);
        }
        _mm256_storeu_ps(yp + o * ys, a0); _mm256_storeu_ps(yp + o * ys + 8, a1);
    }
}

static int chain(const float* z, const float* w1, const float* b1, const float* w2, const float* b2,
                 float* y, int R1, int C, int R2, long P, float slope_, long p0, long p1) {
    if (C > CMAX) return -1;
    __m256 h[2 * CMAX];
    const __m256 slope = _mm256_set1_ps(slope_);
    float zt[64 * PW] __attribute__((aligned(32)));
    float yt[64 * PW] __attribute__((aligned(32)));
    if (R1 > 64 || R2 > 64) return -1;
    for (long p = p0; p < p1; p += PW) {
        const int n = p1 - p < PW ? (int)(p1 - p) : PW;
        const float* zp;
        long zs;
        if (n == PW) { zp = z + p; zs = P; }
        else {  /* a short tail: through a zero-padded copy */
            memset(zt, 0, sizeof zt);
            for (int r = 0; r < R1; r++) memcpy(zt + r * PW, z + r * P + p, n * sizeof(float));
            zp = zt; zs = PW;
        }
        /* h = act(W1 z + b1), 4 channels x 16 positions at a time */
        int c = 0;
        for (; c + 4 <= C; c += 4) {
            __m256 a00 = _mm256_set1_ps(b1[c]), a01 = a00, a10 = _mm256_set1_ps(b1[c + 1]), a11 = a10;
            __m256 a20 = _mm256_set1_ps(b1[c + 2]), a21 = a20, a30 = _mm256_set1_ps(b1[c + 3]), a31 = a30;
            for (int r = 0; r < R1; r++) {
                const __m256 x0 = _mm256_loadu_ps(zp + r * zs), x1 = _mm256_loadu_ps(zp + r * zs + 8);
                const __m256 u0 = _mm256_broadcast_ss(w1 + (long)c * R1 + r), u1 = _mm256_broadcast_ss(w1 + (long)(c + 1) * R1 + r);
                const __m256 u2 = _mm256_broadcast_ss(w1 + (long)(c + 2) * R1 + r), u3 = _mm256_broadcast_ss(w1 + (long)(c + 3) * R1 + r);
                a00 = _mm256_fmadd_ps(u0, x0, a00); a01 = _mm256_fmadd_ps(u0, x1, a01);
                a10 = _mm256_fmadd_ps(u1, x0, a10); a11 = _mm256_fmadd_ps(u1, x1, a11);
                a20 = _mm256_fmadd_ps(u2, x0, a20); a21 = _mm256_fmadd_ps(u2, x1, a21);
                a30 = _mm256_fmadd_ps(u3, x0, a30); a31 = _mm256_fmadd_ps(u3, x1, a31);
            }
            h[2 * c] = act(a00, slope); h[2 * c + 1] = act(a01, slope);
            h[2 * c + 2] = act(a10, slope); h[2 * c + 3] = act(a11, slope);
            h[2 * c + 4] = act(a20, slope); h[2 * c + 5] = act(a21, slope);
            h[2 * c + 6] = act(a30, slope); h[2 * c + 7] = act(a31, slope);
        }
        for (; c < C; c++) {
            __m256 a0 = _mm256_set1_ps(b1[c]), a1 = a0;
            for (int r = 0; r < R1; r++) {
                const __m256 u = _mm256_broadcast_ss(w1 + (long)c * R1 + r);
                a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(zp + r * zs), a0);
                a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(zp + r * zs + 8), a1);
            }
            h[2 * c] = act(a0, slope); h[2 * c + 1] = act(a1, slope);
        }
        float* yp = n == PW ? y + p : yt;
        const long ys = n == PW ? P : PW;
        project(h, C, w2, b2, NULL, 0, yp, ys, R2);
        if (n < PW) for (int r = 0; r < R2; r++) memcpy(y + r * P + p, yt + r * PW, n * sizeof(float));
    }
    return 0;
}

/* y = W z + b + skip over positions: a 1x1 product and the residual sum after it, in one pass.
   z: (R, P); W: (C, R); b: C floats or NULL; skip, y: (C, P) (y may be skip: in place; skip NULL:
   the product alone).
   Positions go in tiles of 256, and each tile 4 output channels at a time, so that at most R + 8
   rows stream at once: the C rows of skip and y lie P floats apart, often a multiple of 4 KB, and
   2C + R streams at once measured 4x slower (cache-set conflicts) than the same work tiled. */
#define TILE 256
static int add(const float* z, const float* w, const float* b, const float* skip, float* y,
               int R, int C, long P, long p0, long p1) {
    if (R > CMAX) return -1;
    __m256 h[2 * CMAX];
    for (long t = p0; t < p1; t += TILE) {
        const long te = p1 - t < TILE ? p1 : t + TILE;
        for (int o = 0; o < C; o += 4) {
            const int on = C - o < 4 ? C - o : 4;
            for (long p = t; p < te; p += PW) {
                const int n = te - p < PW ? (int)(te - p) : PW;
                if (n == PW) {
                    for (int r = 0; r < R; r++) {
                        h[2 * r] = _mm256_loadu_ps(z + r * P + p);
                        h[2 * r + 1] = _mm256_loadu_ps(z + r * P + p + 8);
                    }
                    project(h, R, w + (long)o * R, b ? b + o : NULL, skip ? skip + o * P + p : NULL, P, y + o * P + p,
                            P, on);
                } else {  /* the last positions: through zero-padded copies */
                    float zt[PW] __attribute__((aligned(32))), st[4 * PW] __attribute__((aligned(32)));
                    float yt[4 * PW] __attribute__((aligned(32)));
                    for (int r = 0; r < R; r++) {
                        memset(zt, 0, sizeof zt);
                        memcpy(zt, z + r * P + p, n * sizeof(float));
                        h[2 * r] = _mm256_loadu_ps(zt);
                        h[2 * r + 1] = _mm256_loadu_ps(zt + 8);
                    }
                    memset(st, 0, sizeof st);
                    if (skip) for (int i = 0; i < on; i++) memcpy(st + i * PW, skip + (o + i) * P + p, n * sizeof(float));
                    project(h, R, w + (long)o * R, b ? b + o : NULL, skip ? st : NULL, PW, yt, PW, on);
                    for (int i = 0; i < on; i++) memcpy(y + (o + i) * P + p, yt + i * PW, n * sizeof(float));
                }
            }
        }
    }
    return 0;
}

/* y = W2 act(a * z + b) + b2 over positions, with a and b per channel: a norm whose statistics are
   known (GroupNorm, InstanceNorm), its activation and a 1x1 product, the normalised map never written.
   z: (C, P); a, b: C floats; W2: (R2, C); b2: R2 floats or NULL; y: (R2, P).
   Positions go in tiles; each tile is normalised channel by channel (one row streaming at a time)
   into a buffer on the stack, then projected 16 positions at a time. */
static int affine(const float* z, const float* a, const float* b, const float* w2, const float* b2,
                  float* y, int C, int R2, long P, float slope_, long p0, long p1) {
    if (C > CMAX || R2 > 64) return -1;
    /* tile: 128 KB of normalised values (L2), rows of at least 64 positions (short rows per channel
       measured slower: 16 channels at 64^3, 3.9 ms with tiles of 256 positions) */
    const long T = C >= 512 ? 64 : (32768 / C) / 16 * 16;
    static __thread float* tile = NULL;                    /* C * T floats, kept per thread */
    static __thread long tile_len = 0;
    if (tile_len < (long)C * T) {
        free(tile);
        tile = aligned_alloc(64, ((size_t)C * T * sizeof(float) + 63) / 64 * 64);
        tile_len = tile ? (long)C * T : 0;
        if (!tile) return -1;
    }
    const __m256 slope = _mm256_set1_ps(slope_);
    __m256 h[2 * CMAX];
    float yt[64 * PW] __attribute__((aligned(32)));
    for (long t = p0; t < p1; t += T) {
        const long te = p1 - t < T ? p1 : t + T, len = te - t;
        for (int c = 0; c < C; c++) {
            const __m256 av = _mm256_set1_ps(a[c]), bv = _mm256_set1_ps(b[c]);
            const float* zr = z + c * P + t;
            float* tr = tile + c * T;
            long j = 0;
            for (; j + 8 <= len; j += 8) _mm256_storeu_ps(tr + j, act(_mm256_fmadd_ps(av, _mm256_loadu_ps(zr + j), bv), slope));
            for (; j < len; j++) { const float v = a[c] * zr[j] + b[c]; tr[j] = v > 0.f ? v : slope_ * v; }
            for (; j < T; j++) tr[j] = 0.f;
        }
        for (long p = 0; p < len; p += PW) {
            const int n = len - p < PW ? (int)(len - p) : PW;
            for (int c = 0; c < C; c++) { h[2 * c] = _mm256_loadu_ps(tile + c * T + p); h[2 * c + 1] = _mm256_loadu_ps(tile + c * T + p + 8); }
            if (n == PW) project(h, C, w2, b2, NULL, 0, y + t + p, P, R2);
            else {
                project(h, C, w2, b2, NULL, 0, yt, PW, R2);
                for (int r = 0; r < R2; r++) memcpy(y + r * P + t + p, yt + r * PW, n * sizeof(float));
            }
        }
    }
    return 0;
}

/* Per row c of x (rows, P): out[2c] = sum(x - k), out[2c + 1] = sum((x - k)^2), k = x[c, 0] (the
   shifted sums of a variance without cancellation); float partial sums over 512 values, added in double. */
static int moments(const float* x, double* out, long P, long r0, long r1) {
    for (long c = r0; c < r1; c++) {
        const float* xr = x + c * P;
        const float k = xr[0];
        const __m256 kv = _mm256_set1_ps(k);
        double s = 0.0, q = 0.0;
        long j = 0;
        while (j + 8 <= P) {
            const long end = P - j < 512 ? j + (P - j) / 8 * 8 : j + 512;
            __m256 s0 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps();
            for (; j < end; j += 8) {
                const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + j), kv);
                s0 = _mm256_add_ps(s0, d);
                q0 = _mm256_fmadd_ps(d, d, q0);
            }
            float sv[8], qv[8];
            _mm256_storeu_ps(sv, s0); _mm256_storeu_ps(qv, q0);
            for (int i = 0; i < 8; i++) { s += sv[i]; q += qv[i]; }
        }
        for (; j < P; j++) { const double d = (double)xr[j] - k; s += d; q += d * d; }
        out[2 * c] = s;
        out[2 * c + 1] = q;
    }
    return 0;
}

/* The samples' position ranges: sample j / k, chunk j % k of k, bounds multiples of `align`. */
static inline void span_of(long j, long k, long P, long align, long* i, long* lo, long* hi) {
    const long c = j % k;
    *i = j / k;
    *lo = P * c / k / align * align;
    *hi = c + 1 == k ? P : P * (c + 1) / k / align * align;
}

/* w1s, b1s: the floats between samples' W1 and b1 (0: shared, C * R1 and C: per sample). */
int tfx_pointwise_chain(const float* z, const float* w1, const float* b1, const float* w2, const float* b2, float* y,
                        int N, int R1, int C, int R2, long P, float slope, long w1s, long b1s, int nt) {
    const long k = tfx_chunks(N, P, tfx_least((long)C * (R1 + R2)), nt), jobs = N * k;
    int err = 0;
    TFX_PARALLEL(tfx_team(jobs, nt), err)
    {
        long lo, hi, i, p0, p1;
        tfx_span(jobs, &lo, &hi);
        for (long j = lo; j < hi; j++) {
            span_of(j, k, P, PW, &i, &p0, &p1);
            if (p1 > p0)
                err |= chain(z + i * R1 * P, w1 + i * w1s, b1 + i * b1s, w2, b2, y + i * R2 * P, R1, C, R2, P, slope,
                             p0, p1);
        }
    }
    return err;
}

int tfx_pointwise_add(const float* z, const float* w, const float* b, const float* skip, float* y,
                      int N, int R, int C, long P, int nt) {
    const long k = tfx_chunks(N, P, tfx_least((long)R * C), nt), jobs = N * k;
    int err = 0;
    TFX_PARALLEL(tfx_team(jobs, nt), err)
    {
        long lo, hi, i, p0, p1;
        tfx_span(jobs, &lo, &hi);
        for (long j = lo; j < hi; j++) {
            span_of(j, k, P, TILE, &i, &p0, &p1);
            if (p1 > p0) err |= add(z + i * R * P, w, b, skip ? skip + i * C * P : NULL, y + i * C * P, R, C, P, p0, p1);
        }
    }
    return err;
}

/* a, b: (N, C), one scale and shift per sample and channel. */
int tfx_affine_act_pointwise(const float* z, const float* a, const float* b, const float* w2, const float* b2,
                             float* y, int N, int C, int R2, long P, float slope, int nt) {
    const long k = tfx_chunks(N, P, tfx_least((long)C * (R2 + 1)), nt), jobs = N * k;
    int err = 0;
    TFX_PARALLEL(tfx_team(jobs, nt), err)
    {
        long lo, hi, i, p0, p1;
        tfx_span(jobs, &lo, &hi);
        for (long j = lo; j < hi; j++) {
            span_of(j, k, P, PW, &i, &p0, &p1);
            if (p1 > p0) err |= affine(z + i * C * P, a + i * C, b + i * C, w2, b2, y + i * R2 * P, C, R2, P, slope, p0, p1);
        }
    }
    return err;
}

int tfx_row_moments(const float* x, double* out, long rows, long P, int nt) {
    int err = 0;
    TFX_PARALLEL(tfx_team(rows * P / 65536, nt), err)
    {
        long lo, hi;
        tfx_span(rows, &lo, &hi);
        err |= moments(x, out, P, lo, hi);
    }
    return err;
}

/* Shifted first and second moments of each sample's rows, for a norm folded into the product after
   them (kernels/norm_fold.py) without the centred copy: per sample i, with k_r = z[i, r, 0],
   out[i] = (sum_p (z_r - k_r) for r < R, then sum_p (z_r - k_r)(z_s - k_s) for r, s < R row-major).
   z: (N, R, P), R <= 64; out: N * (R + R * R) doubles. Float partial sums over 512 positions, added
   in double; each chunk of positions (a job) sums into its own slot of scratch (N * nt * (R + R * R)
   doubles), and the calling thread adds the slots. */
static void gram_range(const float* z, int R, long P, long p0, long p1, double* acc) {
    float k[64];
    for (int r = 0; r < R; r++) k[r] = z[(long)r * P];
    float s[64][8], g[64 * 64][8];
    for (long b = p0; b < p1; b += 512) {
        const long e = p1 - b < 512 ? p1 : b + 512, full = b + (e - b) / 8 * 8;
        __m256 sv[64];
        for (int r = 0; r < R; r++) sv[r] = _mm256_setzero_ps();
        for (int r = 0; r < R; r++) for (int t = 0; t <= r; t++) _mm256_storeu_ps(g[r * R + t], _mm256_setzero_ps());
        for (long p = b; p < full; p += 8) {
            __m256 d[64];
            for (int r = 0; r < R; r++) {
                d[r] = _mm256_sub_ps(_mm256_loadu_ps(z + (long)r * P + p), _mm256_set1_ps(k[r]));
                sv[r] = _mm256_add_ps(sv[r], d[r]);
            }
            for (int r = 0; r < R; r++) for (int t = 0; t <= r; t++)
                _mm256_storeu_ps(g[r * R + t], _mm256_fmadd_ps(d[r], d[t], _mm256_loadu_ps(g[r * R + t])));
        }
        for (int r = 0; r < R; r++) _mm256_storeu_ps(s[r], sv[r]);
        for (int r = 0; r < R; r++) {
            double a = 0.0;
            for (int l = 0; l < 8; l++) a += s[r][l];
            for (long p = full; p < e; p++) a += (double)z[(long)r * P + p] - k[r];
            acc[r] += a;
            for (int t = 0; t <= r; t++) {
                double q = 0.0;
                for (int l = 0; l < 8; l++) q += g[r * R + t][l];
                for (long p = full; p < e; p++) q += ((double)z[(long)r * P + p] - k[r]) * ((double)z[(long)t * P + p] - k[t]);
                acc[R + r * R + t] += q;
            }
        }
    }
    for (int r = 0; r < R; r++) for (int t = r + 1; t < R; t++) acc[R + r * R + t] = acc[R + t * R + r];
}

int tfx_gram(const float* z, double* out, double* scratch, int N, int R, long P, int nt) {
    if (R > 64) return -1;
    const long k = tfx_chunks(N, P, tfx_least((long)R * (R + 3) / 2), nt), jobs = N * k, len = R + (long)R * R;
    memset(scratch, 0, sizeof(double) * jobs * len);
    int err = 0;
    TFX_PARALLEL(tfx_team(jobs, nt), err)
    {
        long lo, hi;
        tfx_span(jobs, &lo, &hi);
        for (long j = lo; j < hi; j++) {
            const long i = j / k, c = j % k;
            gram_range(z + i * R * P, R, P, P * c / k, P * (c + 1) / k, scratch + j * len);
        }
    }
    memset(out, 0, sizeof(double) * N * len);
    for (long j = 0; j < jobs; j++) for (long e = 0; e < len; e++) out[(j / k) * len + e] += scratch[j * len + e];
    return err;
}

/* A GroupNorm after a 1x1 product u (C x R) + bias, folded into it from one sample's narrow input
   (the algebra of normed_affine in kernels/norm_fold.py, in double):
   its mean m (R) and covariance S (R x R). Channel c's output has mean u_c.m + bias_c and variance
   u_c' S u_c; a group's variance is the mean of its channels' second moments about the group mean.
   Then norm(u z + bias)_c = w_c.z + b_c with w_c = a_c u_c, a_c = gamma_c / sqrt(var_g + eps) and
   b_c = (mean_c - mean_g) a_c + beta_c - a_c u_c.m. */
static void fold_groupnorm(const double* m, const double* S, const float* u, const float* bias, const float* gamma,
                           const float* beta, int C, int R, int groups, double eps, float* w, float* b) {
    double mean[CMAX], var[CMAX];
    for (int c = 0; c < C; c++) {
        const float* uc = u + (long)c * R;
        double mu = 0.0, v = 0.0;
        for (int r = 0; r < R; r++) {
            mu += uc[r] * m[r];
            double row = 0.0;
            for (int t = 0; t < R; t++) row += S[r * R + t] * uc[t];
            v += uc[r] * row;
        }
        mean[c] = mu + (bias ? bias[c] : 0.0);
        var[c] = v;
    }
    const int cg = C / groups;
    for (int g = 0; g < groups; g++) {
        double mg = 0.0, vg = 0.0;
        for (int c = g * cg; c < (g + 1) * cg; c++) mg += mean[c];
        mg /= cg;
        for (int c = g * cg; c < (g + 1) * cg; c++) vg += var[c] + (mean[c] - mg) * (mean[c] - mg);
        const double rstd = 1.0 / sqrt(vg / cg + eps);
        for (int c = g * cg; c < (g + 1) * cg; c++) {
            const double a = rstd * (gamma ? gamma[c] : 1.0);
            const double um = mean[c] - (bias ? bias[c] : 0.0);
            for (int r = 0; r < R; r++) w[(long)c * R + r] = (float)(a * u[(long)c * R + r]);
            b[c] = (float)((mean[c] - mg) * a + (beta ? beta[c] : 0.0) - a * um);
        }
    }
}

/* y = W2 act(norm(u z + bias)) + b2 with norm a GroupNorm of `groups` (InstanceNorm: groups = C),
   its statistics from the narrow input z: the moments, the fold and the chain in one call. */
int tfx_normed_chain(const float* z, const float* u, const float* bias, const float* gamma, const float* beta,
                     int groups, double eps, const float* w2, const float* b2, float* y,
                     int N, int R1, int C, int R2, long P, float slope, int nt) {
    if (R1 > 64 || R2 > 64 || C > CMAX || groups < 1 || C % groups || P < 1) return -1;
    const long len = R1 + (long)R1 * R1;
    double* mom = malloc(sizeof(double) * N * len);
    double* scratch = malloc(sizeof(double) * N * (nt > 0 ? nt : 1) * len);
    float* w = malloc(sizeof(float) * N * C * R1);
    float* b = malloc(sizeof(float) * N * C);
    int err = !mom || !scratch || !w || !b;
    if (!err) err = tfx_gram(z, mom, scratch, N, R1, P, nt);
    for (int i = 0; i < N && !err; i++) {
        double m[64], S[64 * 64];
        const double* s = mom + i * len;
        for (int r = 0; r < R1; r++) m[r] = s[r] / P;
        for (int r = 0; r < R1; r++) for (int t = 0; t < R1; t++) S[r * R1 + t] = s[R1 + r * R1 + t] / P - m[r] * m[t];
        for (int r = 0; r < R1; r++) m[r] += z[(long)i * R1 * P + (long)r * P];  /* the shift back */
        fold_groupnorm(m, S, u, bias, gamma, beta, C, R1, groups, eps, w + (long)i * C * R1, b + (long)i * C);
    }
    if (!err) err = tfx_pointwise_chain(z, w, b, w2, b2, y, N, R1, C, R2, P, slope, (long)C * R1, C, nt);
    free(mom); free(scratch); free(w); free(b);
    return err;
}

/* y = W2 act(group_norm(x)) + b2: a GroupNorm's statistics from per-channel shifted sums (one pass),
   its scale and shift per channel, then the affine, the activation and the product (one pass). */
int tfx_norm_act(const float* x, const float* gamma, const float* beta, int groups, double eps,
                 const float* w2, const float* b2, float* y, int N, int C, int R2, long P, float slope, int nt) {
    if (C > CMAX || R2 > 64 || groups < 1 || C % groups || P < 1) return -1;
    double* mom = malloc(sizeof(double) * 2 * N * C);
    float* a = malloc(sizeof(float) * N * C);
    float* b = malloc(sizeof(float) * N * C);
    int err = !mom || !a || !b;
    if (!err) err = tfx_row_moments(x, mom, (long)N * C, P, nt);
    const int cg = C / groups;
    for (int i = 0; i < N && !err; i++) for (int g = 0; g < groups; g++) {
        /* channel c's sums are about its first value k_c; move them to the group's shift k_g */
        const long first = (long)i * C + (long)g * cg;
        const double kg = x[first * P];
        double sg = 0.0, qg = 0.0;
        for (long c = first; c < first + cg; c++) {
            const double d = x[c * P] - kg, sc = mom[2 * c], qc = mom[2 * c + 1];
            sg += sc + P * d;
            qg += qc + 2 * d * sc + P * d * d;
        }
        const double count = (double)P * cg, mg = sg / count;
        double var = qg / count - mg * mg;
        if (var < 0.0) var = 0.0;
        const double rstd = 1.0 / sqrt(var + eps), mean = kg + mg;
        for (long c = first; c < first + cg; c++) {
            const int ch = (int)(c - (long)i * C);
            const double ga = gamma ? gamma[ch] : 1.0;
            a[c] = (float)(rstd * ga);
            b[c] = (float)(-mean * rstd * ga + (beta ? beta[ch] : 0.0));
        }
    }
    if (!err) err = tfx_affine_act_pointwise(x, a, b, w2, b2, y, N, C, R2, P, slope, nt);
    free(mom); free(a); free(b);
    return err;
}
