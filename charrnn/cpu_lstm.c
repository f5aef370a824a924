/* An LSTM layer's time loop for CPU training, forward and backward, built by cpu_lstm.py on first use.

   Each thread runs its own rows of the batch for the whole sequence: the streams of a batch are independent, so
   the threads never wait for each other between time steps. A step is one small matrix product per thread,
   register-blocked below, with the gate nonlinearities applied to its output while it is still in cache; the
   backward loop also gives the layer's input gradient, step by step. The weight gradients, large products over
   all steps, stay with torch. */
#ifndef __AVX512F__
#error "charrnn's CPU LSTM kernel is written for AVX-512, which this CPU or compiler lacks"
#endif
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* one AVX-512 register; loads need no alignment */

static inline v16 ld(const float *p) { return *(const v16 *)p; }
static inline void st(float *p, v16 v) { *(v16 *)p = v; }

/* C[r][0:16*NV] = init[r][off:off+16*NV] (zero if init is NULL) + sum_k A[r][k] * P[k][0:16*NV] for R rows: a tile
   of R x NV vectors held in registers over the whole K loop. */
#define TILE(R, NV)                                                                                                 \
    static void tile_##R##_##NV(const float *A, int lda, const float *P, int ldp, int K, float *C, int ldc,         \
                                const float *const *init, int off) {                                               \
        v16 acc[R][NV];                                                                                             \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) acc[r][v] = init ? ld(init[r] + off + 16 * v) : (v16){0};                 \
        for (int k = 0; k < K; k++) {                                                                               \
            const float *p = P + (size_t)k * ldp;                                                                   \
            v16 b[NV];                                                                                              \
            for (int v = 0; v < NV; v++) b[v] = ld(p + 16 * v);                                                     \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                   \
                float x = A[(size_t)r * lda + k];                                                                   \
                for (int v = 0; v < NV; v++) acc[r][v] += x * b[v];                                                 \
            }                                                                                                       \
        }                                                                                                           \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) st(C + (size_t)r * ldc + 16 * v, acc[r][v]);                               \
    }
#define TILES(NV) TILE(1, NV) TILE(2, NV) TILE(3, NV) TILE(4, NV) TILE(5, NV) TILE(6, NV)
TILES(1) TILES(2) TILES(3) TILES(4)
typedef void (*tile_fn)(const float *, int, const float *, int, int, float *, int, const float *const *, int);
#define ROW(NV) {0, tile_1_##NV, tile_2_##NV, tile_3_##NV, tile_4_##NV, tile_5_##NV, tile_6_##NV}
static const tile_fn tiles[5][7] = {{0}, ROW(1), ROW(2), ROW(3), ROW(4)};

/* C (M x N) = init (M row pointers, or zeros if NULL) + A (M x K) @ P (K x N), N a multiple of 16. P is packed as
   column panels (cpu_lstm.panels): each 64 columns (fewer in the last) a contiguous (K x width) block, which the
   caches keep whole; rows of a (K x N) matrix 2 KB apart would crowd into a few cache sets. */
static void gemm(const float *A, int lda, int M, const float *P, int N, int K, float *C, int ldc,
                 const float *const *init) {
    int blocks = (M + 5) / 6;
    for (int c = 0; c < N; c += 64) {
        int width = N - c >= 64 ? 64 : N - c;
        for (int i = 0, r = 0; i < blocks; i++) {
            int rows = (M - r) / (blocks - i) + ((M - r) % (blocks - i) != 0);  /* blocks of even size */
            tiles[width / 16][rows](A + (size_t)r * lda, lda, P + (size_t)c * K, width, K, C + (size_t)r * ldc + c,
                                    ldc, init ? init + r : 0, c);
            r += rows;
        }
    }
}

/* dst = a (K x N) matrix whose element (k, n) is src[k * sk + n * sn], packed into gemm's column panels, copied in
   16 x 16 blocks so that reads and writes both stay within a few cache lines whichever stride is the unit one. */
void pack_panels(int K, int N, const float *src, long sk, long sn, float *dst) {
    for (int c = 0; c < N; c += 64) {
        int width = N - c >= 64 ? 64 : N - c;
        float *d = dst + (size_t)c * K;
        for (int k0 = 0; k0 < K; k0 += 16)
            for (int j0 = 0; j0 < width; j0 += 16)
                for (int k = k0; k < K && k < k0 + 16; k++)
                    for (int j = j0; j < j0 + 16 && j < width; j++)
                        d[(size_t)k * width + j] = src[k * sk + (c + j) * sn];
    }
}

/* exp, sigmoid and tanh on 16 floats to ~2e-7 relative error: Cody-Waite range reduction to f = x - n ln 2,
   |f| <= ln(2)/2, Cephes' expf polynomial for e^f, scalef for the 2^n, and a refined reciprocal estimate instead
   of a division. */
static inline v16 vexp(v16 x) {
    __m512 v = _mm512_max_ps(_mm512_min_ps((__m512)x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v16 f = (v16)v - (v16)n * 0.693359375f + (v16)n * 2.12194440e-4f;
    v16 p = f * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    return (v16)_mm512_scalef_ps((__m512)(p * f * f + f + 1.0f), n);
}
static inline v16 vrcp(v16 d) {
    v16 r = (v16)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
static inline v16 vsigm(v16 x) { return vrcp(1.0f + vexp(-x)); }
static inline v16 vtanh(v16 x) { return 2.0f * vrcp(1.0f + vexp(-2.0f * x)) - 1.0f; }

/* The batch rows [*lo, *hi) of thread k of nt. */
static void rows_of(int B, int nt, int k, int *lo, int *hi) {
    *lo = (int)((long)B * k / nt);
    *hi = (int)((long)B * (k + 1) / nt);
}

/* One layer forward over T steps. The gate pre-activations of a step (gates i f g o, each H wide) are either
   table[ids[t][b]] (a first layer: the embedding times W_ih plus both biases, one row per character) or
   bias + x[t][b] @ W_ih^T (x (T,B,I); wx: W_ih^T's panels), plus h[t][b] @ W_hh^T (wt: W_hh^T's panels).
   h, c (T+1,B,H) hold the initial state at [0] and get the rest. For the backward pass, unless acts is NULL:
   acts (T,B,4H) gets the gate activations and tc (T,B,H) tanh(c). scratch: per thread ceil(B/nt) x 4H floats.
   H a multiple of 16. */
void lstm_forward(int T, int B, int H, int I, int nt, const float *x, const long *ids, const float *wx,
                  const float *bias, const float *wt, float *acts, float *h, float *c, float *tc, float *scratch) {
    const size_t G = 4 * (size_t)H, BH = (size_t)B * H;
#pragma omp parallel num_threads(nt)
    {
        int lo, hi, k = omp_get_thread_num();
        rows_of(B, omp_get_num_threads(), k, &lo, &hi);
        int m = hi - lo;
        float *pre = scratch + (size_t)k * ((B + nt - 1) / nt) * G;
        const float *init[m > 0 ? m : 1];
        for (int t = 0; t < T && m > 0; t++) {
            if (ids) {
                for (int r = 0; r < m; r++) init[r] = x + ids[(size_t)t * B + lo + r] * G;
            } else {
                for (int r = 0; r < m; r++) init[r] = bias;
                gemm(x + ((size_t)t * B + lo) * I, I, m, wx, (int)G, I, pre, (int)G, init);
                for (int r = 0; r < m; r++) init[r] = pre + r * G;
            }
            gemm(h + t * BH + lo * (size_t)H, H, m, wt, (int)G, H, pre, (int)G, init);
            for (int b = lo; b < hi; b++) {
                const float *p = pre + (b - lo) * G;
                const float *cp = c + t * BH + b * (size_t)H;
                float *co = c + (t + 1) * BH + b * (size_t)H, *hb = h + (t + 1) * BH + b * (size_t)H;
                float *a = acts ? acts + ((size_t)t * B + b) * G : 0, *tb = acts ? tc + t * BH + b * (size_t)H : 0;
                for (int j = 0; j < H; j += 16) {
                    v16 i = vsigm(ld(p + j)), f = vsigm(ld(p + H + j));
                    v16 g = vtanh(ld(p + 2 * H + j)), o = vsigm(ld(p + 3 * H + j));
                    v16 cc = f * ld(cp + j) + i * g, t_ = vtanh(cc);
                    st(co + j, cc); st(hb + j, o * t_);
                    if (a) {
                        st(a + j, i); st(a + H + j, f); st(a + 2 * H + j, g); st(a + 3 * H + j, o);
                        st(tb + j, t_);
                    }
                }
            }
        }
    }
}

/* One layer backward over T steps. acts (T,B,4H) holds the forward's gate activations and is overwritten with the
   gradient of the gate pre-activations. dh (T,B,H): the gradient of the outputs. dhT, dcT (B,H): of the final
   state, overwritten with those of the initial state. w: W_hh's panels. db (nt,4H): each thread's part of the
   biases' gradient. Unless dx is NULL, dx (T,B,I) gets the gradient of the layer's input, wx being W_ih's panels:
   a step's gradient is at hand, in cache, when the next step's recurrent product reads it. Unless ids is NULL
   (a first layer), dtable (nt,V,4H) gets each thread's part of the gradient of the forward's table rows ids. */
void lstm_backward(int T, int B, int H, int I, int nt, float *acts, const float *w, const float *wx, const float *c,
                   const float *tc, const float *dh, float *dhT, float *dcT, float *db, float *dx, const long *ids,
                   int V, float *dtable) {
    const size_t G = 4 * (size_t)H, BH = (size_t)B * H;
#pragma omp parallel num_threads(nt)
    {
        int lo, hi, k = omp_get_thread_num();
        rows_of(B, omp_get_num_threads(), k, &lo, &hi);
        float *dbk = db + k * G, *dtk = ids ? dtable + (size_t)k * V * G : 0;
        for (size_t j = 0; j < G; j++) dbk[j] = 0.0f;
        if (ids)
            for (size_t j = 0; j < (size_t)V * G; j++) dtk[j] = 0.0f;
        for (int t = T - 1; t >= 0 && hi > lo; t--) {
            float *a = acts + ((size_t)t * B + lo) * G;
            if (t < T - 1) {
                gemm(a + B * G, (int)G, hi - lo, w, H, (int)G, dhT + lo * (size_t)H, H, 0);
                if (dx) gemm(a + B * G, (int)G, hi - lo, wx, I, (int)G, dx + ((t + 1) * (size_t)B + lo) * I, I, 0);
            }
            for (int b = lo; b < hi; b++, a += G) {
                float *dc = dcT + b * (size_t)H, *r = dhT + b * (size_t)H;
                const float *cp = c + t * BH + b * (size_t)H, *tb = tc + t * BH + b * (size_t)H;
                const float *d = dh + t * BH + b * (size_t)H;
                float *dt = ids ? dtk + ids[(size_t)t * B + b] * G : 0;
                for (int j = 0; j < H; j += 16) {
                    v16 i = ld(a + j), f = ld(a + H + j), g = ld(a + 2 * H + j), o = ld(a + 3 * H + j);
                    v16 t_ = ld(tb + j), dhh = ld(d + j) + ld(r + j);
                    v16 dcc = ld(dc + j) + dhh * o * (1.0f - t_ * t_);
                    v16 di = dcc * g * i * (1.0f - i), df = dcc * ld(cp + j) * f * (1.0f - f);
                    v16 dg = dcc * i * (1.0f - g * g), d_o = dhh * t_ * o * (1.0f - o);
                    st(a + j, di); st(a + H + j, df); st(a + 2 * H + j, dg); st(a + 3 * H + j, d_o);
                    st(dbk + j, ld(dbk + j) + di); st(dbk + H + j, ld(dbk + H + j) + df);
                    st(dbk + 2 * H + j, ld(dbk + 2 * H + j) + dg); st(dbk + 3 * H + j, ld(dbk + 3 * H + j) + d_o);
                    st(dc + j, dcc * f);
                    if (dt) {
                        st(dt + j, ld(dt + j) + di); st(dt + H + j, ld(dt + H + j) + df);
                        st(dt + 2 * H + j, ld(dt + 2 * H + j) + dg); st(dt + 3 * H + j, ld(dt + 3 * H + j) + d_o);
                    }
                }
            }
        }
        if (hi > lo) {
            gemm(acts + lo * G, (int)G, hi - lo, w, H, (int)G, dhT + lo * (size_t)H, H, 0);
            if (dx) gemm(acts + lo * G, (int)G, hi - lo, wx, I, (int)G, dx + lo * (size_t)I, I, 0);
        }
    }
}

