/* tucker_fx: a 3x3x3 conv, stride 1, padding 1, for narrow channel counts (AVX2 + FMA, float32).

   x: (N, C, D, H, W) contiguous; w: (O, C, 3, 3, 3) contiguous; bias: O floats or NULL;
   y: (N, O, D, H, W) contiguous. The samples and output planes are split over nt threads
   (parallel.h). Returns 0, or -1 when out of memory.

   Each step keeps 4 output channels x 16 positions of one output row in 8 AVX registers and
   adds the 27 * C taps into them. The input planes d-1, d, d+1 sit in a ring of copies padded
   with zeros (one row above and below, one column left, the rest of the last 16 right), so the
   inner loop has no bounds checks; each input plane is copied once.

   Why (docs/lowering.md): oneDNN runs 3x3x3 convs with 4 channels or fewer at 9-14 GMAC/s on
   the project's CPUs, where their Tucker cores spend most of a compressed model's time. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

#define CW 16

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

/* one sample's output planes d0 <= d < d1 */
static int planes(const float* x, const float* w, const float* bias, float* y,
                  int C, int O, int D, int H, int W, int d0, int d1) {
    const int NCH = (W + CW - 1) / CW, WP = NCH * CW + 16, HP = H + 2, OB = (O + 3) / 4;
    const size_t plane = (size_t)HP * WP, os = (size_t)D * H * W;
    float* ring = aligned_alloc(64, round64(sizeof(float) * 3 * (size_t)C * plane));
    float* wr = aligned_alloc(64, round64(sizeof(float) * (size_t)OB * 4 * C * 27));
    if (!ring || !wr) { free(ring); free(wr); return -1; }
    memset(wr, 0, sizeof(float) * (size_t)OB * 4 * C * 27);
    for (int o = 0; o < O; o++) for (int c = 0; c < C; c++) for (int k = 0; k < 27; k++)
        wr[(((size_t)(o / 4) * C + c) * 27 + k) * 4 + o % 4] = w[((size_t)o * C + c) * 27 + k];
    memset(ring, 0, sizeof(float) * 3 * (size_t)C * plane);
    for (int dd = d0 - 1; dd <= d0 && dd < D; dd++) {
        if (dd < 0) continue;
        for (int c = 0; c < C; c++) for (int h = 0; h < H; h++)
            memcpy(ring + ((size_t)(dd % 3) * C + c) * plane + (size_t)(h + 1) * WP + 1,
                   x + (((size_t)c * D + dd) * H + h) * W, W * sizeof(float));
    }
    for (int d = d0; d < d1; d++) {
        if (d + 1 < D) {
            const int dd = d + 1;
            for (int c = 0; c < C; c++) for (int h = 0; h < H; h++)
                memcpy(ring + ((size_t)(dd % 3) * C + c) * plane + (size_t)(h + 1) * WP + 1,
                       x + (((size_t)c * D + dd) * H + h) * W, W * sizeof(float));
        }
        const int kd0 = d == 0 ? 1 : 0, kd1 = d == D - 1 ? 2 : 3;
        for (int h = 0; h < H; h++) for (int ob = 0; ob < OB; ob++) {
            const int on = O - 4 * ob < 4 ? O - 4 * ob : 4;
            float b[4] = {0.f, 0.f, 0.f, 0.f};
            if (bias) for (int o = 0; o < on; o++) b[o] = bias[4 * ob + o];
            for (int ch = 0; ch < NCH; ch++) {
                __m256 a00 = _mm256_set1_ps(b[0]), a01 = a00, a10 = _mm256_set1_ps(b[1]), a11 = a10;
                __m256 a20 = _mm256_set1_ps(b[2]), a21 = a20, a30 = _mm256_set1_ps(b[3]), a31 = a30;
                for (int kd = kd0; kd < kd1; kd++) {
                    const float* pl = ring + (size_t)((d + kd + 2) % 3) * C * plane + (size_t)h * WP + ch * CW;
                    const float* q = wr + ((size_t)ob * C * 27 + kd * 9) * 4;
                    for (int c = 0; c < C; c++, pl += plane, q += 27 * 4) {
                        for (int kh = 0; kh < 3; kh++) {
                            const float* r = pl + kh * WP;
                            const float* p = q + kh * 12;
#pragma GCC unroll 3
                            for (int kw = 0; kw < 3; kw++) {
                                const __m256 x0 = _mm256_loadu_ps(r + kw), x1 = _mm256_loadu_ps(r + kw + 8);
                                const __m256 w0 = _mm256_broadcast_ss(p + 4 * kw), w1 = _mm256_broadcast_ss(p + 4 * kw + 1);
                                const __m256 w2 = _mm256_broadcast_ss(p + 4 * kw + 2), w3 = _mm256_broadcast_ss(p + 4 * kw + 3);
                                a00 = _mm256_fmadd_ps(w0, x0, a00); a01 = _mm256_fmadd_ps(w0, x1, a01);
                                a10 = _mm256_fmadd_ps(w1, x0, a10); a11 = _mm256_fmadd_ps(w1, x1, a11);
                                a20 = _mm256_fmadd_ps(w2, x0, a20); a21 = _mm256_fmadd_ps(w2, x1, a21);
                                a30 = _mm256_fmadd_ps(w3, x0, a30); a31 = _mm256_fmadd_ps(w3, x1, a31);
                            }
                        }
                    }
                }
                float* base = y + (((size_t)(4 * ob) * D + d) * H + h) * W + ch * CW;
                if ((ch + 1) * CW <= W && on == 4) {
                    _mm256_storeu_ps(base, a00); _mm256_storeu_ps(base + 8, a01);
                    _mm256_storeu_ps(base + os, a10); _mm256_storeu_ps(base + os + 8, a11);
                    _mm256_storeu_ps(base + 2 * os, a20); _mm256_storeu_ps(base + 2 * os + 8, a21);
                    _mm256_storeu_ps(base + 3 * os, a30); _mm256_storeu_ps(base + 3 * os + 8, a31);
                } else {
                    float t[4][CW];
                    const int n = W - ch * CW < CW ? W - ch * CW : CW;
                    _mm256_storeu_ps(t[0], a00); _mm256_storeu_ps(t[0] + 8, a01);
                    _mm256_storeu_ps(t[1], a10); _mm256_storeu_ps(t[1] + 8, a11);
                    _mm256_storeu_ps(t[2], a20); _mm256_storeu_ps(t[2] + 8, a21);
                    _mm256_storeu_ps(t[3], a30); _mm256_storeu_ps(t[3] + 8, a31);
                    for (int o = 0; o < on; o++) memcpy(base + o * os, t[o], n * sizeof(float));
                }
            }
        }
    }
    free(ring);
    free(wr);
    return 0;
}

int tfx_narrow_conv3d(const float* x, const float* w, const float* bias, float* y,
                      int N, int C, int O, int D, int H, int W, int nt) {
    const long k = tfx_chunks(N, D, 4, nt), jobs = N * k;
    int err = 0;
    TFX_PARALLEL(tfx_team(jobs, nt), err)
    {
        long lo, hi;
        tfx_span(jobs, &lo, &hi);
        for (long j = lo; j < hi; j++) {
            const long i = j / k, c = j % k;
            err |= planes(x + (size_t)i * C * D * H * W, w, bias, y + (size_t)i * O * D * H * W, C, O, D, H, W,
                          (int)(D * c / k), (int)(D * (c + 1) / k));
        }
    }
    return err;
}
