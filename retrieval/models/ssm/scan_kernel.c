/*
 * Fused selective scan for CPUs (forward and backward), fp32.
 *
 * One (batch, channel) row at a time: the d_state-wide state lives in registers, the
 * discretised A (exp(delta*A)) and delta*B*u are formed on the fly and never stored as
 * [B, D, L, N] tensors. Rows are independent, so they are spread over OpenMP threads.
 *
 * Layouts (all contiguous, fp32):
 *   u, delta, y : [Bt, D, L]        (delta already has bias and softplus applied)
 *   A           : [D, N]
 *   Bm, Cm      : [Bt, L, N]        (transposed from mamba-ssm's [Bt, N, L] by the caller)
 *   h0, hlast   : [Bt, D, N]        (h0 may be NULL: zero initial state)
 * mask_diag != 0 reads the output from h_t - delta_t*B_t*u_t (= exp(delta_t*A) h_{t-1}),
 * i.e. the scan operator without its diagonal (VideoMambaPro's masked backward branch).
 *
 * Built at first use by retrieval/models/ssm/cpu.py with the machine's C compiler.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define RESTRICT __restrict__

/*
 * exp(x) as 2^k * e^r, |r| <= ln2/2, with a degree-7 Taylor polynomial: relative error ~1e-7,
 * written branch-free so the compiler vectorises it across the state dimension (libm's
 * expf is a scalar call in most toolchains). Inputs are clamped to the finite fp32 range.
 */
static inline __attribute__((always_inline)) float vexp(float x)
{
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    float k = floorf(x * 1.4426950408889634f + 0.5f);
    float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  /* ln2 split hi/lo */
    float p = 1.9841270e-4f;
    p = p * r + 1.3888889e-3f;
    p = p * r + 8.3333333e-3f;
    p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int i; float f; } bits;
    bits.i = ((int)k + 127) << 23;
    return p * bits.f;
}

static inline __attribute__((always_inline)) void fwd_row(
    const float *RESTRICT u, const float *RESTRICT dt, const float *RESTRICT a,
    const float *RESTRICT Bm, const float *RESTRICT Cm, const float *RESTRICT h0,
    float *RESTRICT y, float *RESTRICT hlast, long L, const int N, int mask_diag)
{
    float h[64];
    float dA[64];
    float dBu[64];
    for (int n = 0; n < N; n++) h[n] = h0 ? h0[n] : 0.0f;
    for (long t = 0; t < L; t++) {
        const float d = dt[t], du = dt[t] * u[t];
        const float *bt = Bm + t * N, *ct = Cm + t * N;
        float acc = 0.0f;
        for (int n = 0; n < N; n++) {
            dA[n] = vexp(d * a[n]);
            dBu[n] = du * bt[n];
        }
        if (mask_diag) {
            for (int n = 0; n < N; n++) {
                float r = dA[n] * h[n];
                h[n] = r + dBu[n];
                acc += ct[n] * r;
            }
        } else {
            for (int n = 0; n < N; n++) {
                h[n] = dA[n] * h[n] + dBu[n];
                acc += ct[n] * h[n];
            }
        }
        y[t] = acc;
    }
    if (hlast) for (int n = 0; n < N; n++) hlast[n] = h[n];
}

/*
 * d_state == 16 (every VideoMamba/Vim size) gets a hand-vectorised row: the state is one
 * 16-lane vector held in a register for the whole sequence. GCC/Clang vector extensions
 * compile to AVX-512 where available and to pairs/quads of narrower registers elsewhere.
 */
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) v16f vload(const float *p)
{
    v16f v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline __attribute__((always_inline)) v16f vexp16(v16f x)
{
    const v16f lo = (v16f){0} - 87.0f, hi = (v16f){0} + 88.0f;
    v16i below = x < lo, above = x > hi;
    x = (v16f)(((v16i)lo & below) | ((v16i)x & ~below));
    x = (v16f)(((v16i)hi & above) | ((v16i)x & ~above));
    /* k = round(x / ln2) via floor(t + 0.5); truncation rounds negatives up, so correct by one */
    v16f t = x * 1.4426950408889634f + 0.5f;
    v16i ki = __builtin_convertvector(t, v16i);
    v16f kf = __builtin_convertvector(ki, v16f);
    ki = ki + (kf > t);
    kf = __builtin_convertvector(ki, v16f);
    v16f r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;   /* |r| <= ln2/2 */
    v16f p = r * 1.9841270e-4f + 1.3888889e-3f;                           /* Taylor, degree 7 */
    p = p * r + 8.3333333e-3f;
    p = p * r + 4.1666667e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v16i bits = (ki + 127) << 23;
    return p * (v16f)bits;
}

static inline __attribute__((always_inline)) float hsum16(v16f v)
{
    v16f s = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    s = s + __builtin_shuffle(s, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    s = s + __builtin_shuffle(s, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    s = s + __builtin_shuffle(s, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return s[0];
}

static void fwd_row16(const float *RESTRICT u, const float *RESTRICT dt, const float *RESTRICT a,
                      const float *RESTRICT Bm, const float *RESTRICT Cm, const float *RESTRICT h0,
                      float *RESTRICT y, float *RESTRICT hlast, long L, int mask_diag)
{
    const v16f av = vload(a);
    v16f h = h0 ? vload(h0) : (v16f){0};
    if (mask_diag) {
        for (long t = 0; t < L; t++) {
            v16f r = vexp16(av * dt[t]) * h;
            h = r + vload(Bm + t * 16) * (dt[t] * u[t]);
            y[t] = hsum16(vload(Cm + t * 16) * r);
        }
    } else {
        for (long t = 0; t < L; t++) {
            h = vexp16(av * dt[t]) * h + vload(Bm + t * 16) * (dt[t] * u[t]);
            y[t] = hsum16(vload(Cm + t * 16) * h);
        }
    }
    if (hlast) memcpy(hlast, &h, sizeof(h));
}

#define DISPATCH_N(CALL)                 \
    switch (N) {                         \
        case 16: { const int NN = 16; CALL; break; } \
        case 8:  { const int NN = 8;  CALL; break; } \
        case 4:  { const int NN = 4;  CALL; break; } \
        default: { const int NN = N;  CALL; break; } \
    }

int vtr_scan_fwd(const float *u, const float *delta, const float *A, const float *Bm,
                 const float *Cm, const float *h0, float *y, float *hlast,
                 long Bt, long D, long L, int N, int mask_diag, int nthreads)
{
    if (N > 64) return -1;
    long rows = Bt * D;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        long b = r / D, d = r % D;
        const float *ur = u + r * L, *dr = delta + r * L;
        const float *br = Bm + b * L * N, *cr = Cm + b * L * N;
        const float *h0r = h0 ? h0 + r * N : NULL;
        float *hl = hlast ? hlast + r * N : NULL;
        if (N == 16)
            fwd_row16(ur, dr, A + d * N, br, cr, h0r, y + r * L, hl, L, mask_diag);
        else
            DISPATCH_N(fwd_row(ur, dr, A + d * N, br, cr, h0r, y + r * L, hl, L, NN, mask_diag));
    }
    return 0;
}

/*
 * Backward of one row. Recomputes the states (stored in hs/dAs scratch of L*N floats each),
 * then runs the adjoint recursion g_t = C_t dy_t + dA_{t+1} g_{t+1} from the end.
 * dB/dC are accumulated into this thread's private [L, N] slabs of the batch item,
 * dA into this thread's private [N] slab of the channel.
 */
static inline __attribute__((always_inline)) void bwd_row(
    const float *RESTRICT u, const float *RESTRICT dt, const float *RESTRICT a,
    const float *RESTRICT Bm, const float *RESTRICT Cm, const float *RESTRICT h0,
    const float *RESTRICT dy, const float *RESTRICT dhlast,
    float *RESTRICT du, float *RESTRICT ddt, float *RESTRICT dA_acc,
    float *RESTRICT dB_acc, float *RESTRICT dC_acc, float *RESTRICT dh0,
    float *RESTRICT hs, float *RESTRICT dAs, long L, const int N, int mask_diag)
{
    float h[64];
    float g[64];
    float da_loc[64];
    for (int n = 0; n < N; n++) h[n] = h0 ? h0[n] : 0.0f;
    /* hs[t] holds h_{t-1} (the state the step t update starts from) */
    for (long t = 0; t < L; t++) {
        const float d = dt[t], du_ = dt[t] * u[t];
        const float *bt = Bm + t * N;
        float *hst = hs + t * N, *dat = dAs + t * N;
        for (int n = 0; n < N; n++) {
            float e = vexp(d * a[n]);
            dat[n] = e;
            hst[n] = h[n];
            h[n] = e * h[n] + du_ * bt[n];
        }
    }
    for (int n = 0; n < N; n++) {
        g[n] = dhlast ? dhlast[n] : 0.0f;
        da_loc[n] = 0.0f;
    }
    for (long t = L - 1; t >= 0; t--) {
        const float d = dt[t], ut = u[t], dyt = dy[t];
        const float *bt = Bm + t * N, *ct = Cm + t * N;
        const float *hprev = hs + t * N, *dat = dAs + t * N;
        float *dbt = dB_acc + t * N, *dct = dC_acc + t * N;
        float s_du = 0.0f, s_dd = 0.0f;
        for (int n = 0; n < N; n++) {
            float e = dat[n];
            float hp = hprev[n];
            float dbu = d * ut * bt[n];
            float r = mask_diag ? e * hp : e * hp + dbu;   /* read-out state */
            dct[n] += dyt * r;
            float gn = g[n] + ct[n] * dyt;                    /* dL/dh_t */
            float gb = mask_diag ? g[n] : gn;                  /* dL/d(dBu_t) */
            float ge = gn * hp * e;                            /* dL/d(delta_t*a) */
            s_du += gb * d * bt[n];
            s_dd += gb * ut * bt[n] + ge * a[n];
            dbt[n] += gb * d * ut;
            da_loc[n] += ge * d;
            g[n] = gn * e;                                     /* dL/dh_{t-1} */
        }
        du[t] = s_du;
        ddt[t] = s_dd;
    }
    for (int n = 0; n < N; n++) {
        dA_acc[n] += da_loc[n];
        if (dh0) dh0[n] = g[n];
    }
}

static void bwd_row16(const float *RESTRICT u, const float *RESTRICT dt, const float *RESTRICT a,
                      const float *RESTRICT Bm, const float *RESTRICT Cm, const float *RESTRICT h0,
                      const float *RESTRICT dy, const float *RESTRICT dhlast,
                      float *RESTRICT du, float *RESTRICT ddt, float *RESTRICT dA_acc,
                      float *RESTRICT dB_acc, float *RESTRICT dC_acc, float *RESTRICT dh0,
                      float *RESTRICT hs, float *RESTRICT dAs, long L, int mask_diag)
{
    const v16f av = vload(a);
    v16f h = h0 ? vload(h0) : (v16f){0};
    for (long t = 0; t < L; t++) {          /* recompute: hs[t] = h_{t-1}, dAs[t] = exp(dt*a) */
        v16f e = vexp16(av * dt[t]);
        memcpy(dAs + t * 16, &e, sizeof(e));
        memcpy(hs + t * 16, &h, sizeof(h));
        h = e * h + vload(Bm + t * 16) * (dt[t] * u[t]);
    }
    v16f g = dhlast ? vload(dhlast) : (v16f){0};
    v16f da = (v16f){0};
    for (long t = L - 1; t >= 0; t--) {
        const float d = dt[t], ut = u[t], dyt = dy[t];
        const v16f e = vload(dAs + t * 16), hp = vload(hs + t * 16);
        const v16f bt = vload(Bm + t * 16), ct = vload(Cm + t * 16);
        v16f r = e * hp;
        if (!mask_diag) r = r + bt * (d * ut);
        v16f dct = vload(dC_acc + t * 16) + r * dyt;
        memcpy(dC_acc + t * 16, &dct, sizeof(dct));
        v16f gn = g + ct * dyt;
        v16f gb = mask_diag ? g : gn;
        v16f ge = gn * hp * e;
        float s1 = hsum16(gb * bt), s2 = hsum16(ge * av);
        du[t] = s1 * d;
        ddt[t] = s1 * ut + s2;
        v16f dbt = vload(dB_acc + t * 16) + gb * (d * ut);
        memcpy(dB_acc + t * 16, &dbt, sizeof(dbt));
        da = da + ge * d;
        g = gn * e;
    }
    v16f dacc = vload(dA_acc) + da;
    memcpy(dA_acc, &dacc, sizeof(dacc));
    if (dh0) memcpy(dh0, &g, sizeof(g));
}

int vtr_scan_bwd(const float *u, const float *delta, const float *A, const float *Bm,
                 const float *Cm, const float *h0, const float *dy, const float *dhlast,
                 float *du, float *ddelta, float *dA, float *dB, float *dC, float *dh0,
                 long Bt, long D, long L, int N, int mask_diag, int nthreads)
{
    if (N > 64) return -1;
    if (nthreads < 1) nthreads = 1;
    long rows = Bt * D;
    long slab = Bt * L * N;
    /* private accumulators per thread: dB, dC [Bt, L, N], dA [D, N] */
    float *priv = (float *)calloc((size_t)nthreads * (2 * slab + D * N), sizeof(float));
    float *scratch = (float *)malloc((size_t)nthreads * 2 * L * N * sizeof(float));
    if (!priv || !scratch) { free(priv); free(scratch); return -2; }
    int used = nthreads;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        float *pB = priv + (size_t)tid * (2 * slab + D * N);
        float *pC = pB + slab;
        float *pA = pC + slab;
        float *hs = scratch + (size_t)tid * 2 * L * N;
        float *dAs = hs + L * N;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            long b = r / D, d = r % D;
            if (N == 16)
                bwd_row16(u + r * L, delta + r * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                          h0 ? h0 + r * N : NULL, dy + r * L, dhlast ? dhlast + r * N : NULL,
                          du + r * L, ddelta + r * L, pA + d * N, pB + b * L * N, pC + b * L * N,
                          dh0 ? dh0 + r * N : NULL, hs, dAs, L, mask_diag);
            else
            DISPATCH_N(bwd_row(u + r * L, delta + r * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                               h0 ? h0 + r * N : NULL, dy + r * L, dhlast ? dhlast + r * N : NULL,
                               du + r * L, ddelta + r * L, pA + d * N, pB + b * L * N, pC + b * L * N,
                               dh0 ? dh0 + r * N : NULL, hs, dAs, L, NN, mask_diag));
        }
    }
    /* reduce the private slabs */
    long total_bc = slab, total_a = D * N;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long i = 0; i < total_bc; i++) {
        float sb = 0.0f, sc = 0.0f;
        for (int k = 0; k < used; k++) {
            const float *base = priv + (size_t)k * (2 * slab + D * N);
            sb += base[i];
            sc += base[slab + i];
        }
        dB[i] = sb;
        dC[i] = sc;
    }
    for (long i = 0; i < total_a; i++) {
        float s = 0.0f;
        for (int k = 0; k < used; k++) s += priv[(size_t)k * (2 * slab + D * N) + 2 * slab + i];
        dA[i] = s;
    }
    free(priv);
    free(scratch);
    return 0;
}
