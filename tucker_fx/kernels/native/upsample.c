/* tucker_fx: trilinear up-sampling by 2 (align_corners=False), optionally plus a skip map (AVX2, float32).

   x: (C, D, H, W); y, skip: (C, 2D, 2H, 2W) (skip may be NULL; y may be skip: in place); C counts
   samples x channels, split over nt threads (parallel.h). Along each axis an output at 2i takes 0.25 x[i-1] + 0.75 x[i]
   and one at 2i+1 takes 0.75 x[i] + 0.25 x[i+1], indices clamped to the edges (ATen's rule for
   scale 2 without align_corners). Each output row is the weighted sum of four input rows (two
   planes, two rows), widened by 2 with the same rule. Returns 0, or -1 when out of memory. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

static int rows(const float* x, const float* skip, float* y, int D, int H, int W, long c0, long c1) {
    const int OD = 2 * D, OH = 2 * H, OW = 2 * W;
    float* row = aligned_alloc(64, ((size_t)(W + 2 + 16) * sizeof(float) + 63) / 64 * 64);
    if (!row) return -1;
    const __m256 q1 = _mm256_set1_ps(0.25f), q3 = _mm256_set1_ps(0.75f);
    for (long c = c0; c < c1; c++) {
        const float* xc = x + (size_t)c * D * H * W;
        for (int od = 0; od < OD; od++) {
            const int i = od / 2;
            const int da = od % 2 ? i : (i > 0 ? i - 1 : 0), db = od % 2 ? (i + 1 < D ? i + 1 : D - 1) : i;
            const float wda = od % 2 ? 0.75f : 0.25f, wdb = 1.f - wda;
            for (int oh = 0; oh < OH; oh++) {
                const int j = oh / 2;
                const int ha = oh % 2 ? j : (j > 0 ? j - 1 : 0), hb = oh % 2 ? (j + 1 < H ? j + 1 : H - 1) : j;
                const float wha = oh % 2 ? 0.75f : 0.25f, whb = 1.f - wha;
                const float* r0 = xc + ((size_t)da * H + ha) * W;
                const float* r1 = xc + ((size_t)da * H + hb) * W;
                const float* r2 = xc + ((size_t)db * H + ha) * W;
                const float* r3 = xc + ((size_t)db * H + hb) * W;
                const __m256 w0 = _mm256_set1_ps(wda * wha), w1 = _mm256_set1_ps(wda * whb);
                const __m256 w2 = _mm256_set1_ps(wdb * wha), w3 = _mm256_set1_ps(wdb * whb);
                float* r = row + 1;  /* r[-1] and r[W] repeat the edges */
                int k = 0;
                for (; k + 8 <= W; k += 8) {
                    __m256 v = _mm256_mul_ps(w0, _mm256_loadu_ps(r0 + k));
                    v = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1 + k), v);
                    v = _mm256_fmadd_ps(w2, _mm256_loadu_ps(r2 + k), v);
                    _mm256_storeu_ps(r + k, _mm256_fmadd_ps(w3, _mm256_loadu_ps(r3 + k), v));
                }
                for (; k < W; k++)
                    r[k] = wda * wha * r0[k] + wda * whb * r1[k] + wdb * wha * r2[k] + wdb * whb * r3[k];
                r[-1] = r[0];
                r[W] = r[W - 1];
                const size_t off = (((size_t)c * OD + od) * OH + oh) * OW;
                float* yr = y + off;
                const float* sr = skip ? skip + off : NULL;
                k = 0;
                for (; k + 8 <= W; k += 8) {
                    const __m256 mid = _mm256_mul_ps(q3, _mm256_loadu_ps(r + k));
                    const __m256 e = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r + k - 1), mid);
                    const __m256 o = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r + k + 1), mid);
                    const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
                    __m256 y0 = _mm256_permute2f128_ps(lo, hi, 0x20), y1 = _mm256_permute2f128_ps(lo, hi, 0x31);
                    if (sr) {
                        y0 = _mm256_add_ps(y0, _mm256_loadu_ps(sr + 2 * k));
                        y1 = _mm256_add_ps(y1, _mm256_loadu_ps(sr + 2 * k + 8));
                    }
                    _mm256_storeu_ps(yr + 2 * k, y0);
                    _mm256_storeu_ps(yr + 2 * k + 8, y1);
                }
                for (; k < W; k++) {
                    const float e = 0.25f * r[k - 1] + 0.75f * r[k], o = 0.75f * r[k] + 0.25f * r[k + 1];
                    yr[2 * k] = e + (sr ? sr[2 * k] : 0.f);
                    yr[2 * k + 1] = o + (sr ? sr[2 * k + 1] : 0.f);
                }
            }
        }
    }
    free(row);
    return 0;
}

int tfx_upsample2x_trilinear(const float* x, const float* skip, float* y, long C, int D, int H, int W, int nt) {
    int err = 0;
    TFX_PARALLEL(tfx_team(C, nt), err)
    {
        long lo, hi;
        tfx_span(C, &lo, &hi);
        if (hi > lo) err |= rows(x, skip, y, D, H, W, lo, hi);
    }
    return err;
}
