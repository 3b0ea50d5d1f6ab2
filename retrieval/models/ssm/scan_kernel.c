/*
 * Fused CPU kernels for the (bidirectional) Mamba mixer, fp32, forward and backward. The conv input
 * and the gate z may also be bf16 (in_proj's output under bf16 autocast): read in place and widened
 * in registers, with state and accumulation in fp32.
 *
 * Layout: everything sequence-shaped is [batch, L, channels] with unit channel stride (the
 * layout of in_proj's output), so a block of 16 CHANNELS at one position is one 64-byte vector.
 * A work item is (batch, 16-channel block); the d_state states of the block are d_state vectors
 * (state n of 16 channels), so a step needs no horizontal sum:
 *
 *   delta = softplus(dpre + bias)                       (or dpre + bias without softplus)
 *           dpre = dt_t @ W^T (the dt projection, fused) or given
 *   h_n  <- exp(delta * A_n) * h_n + (delta * u) * B_t[n]          n = 0 .. d_state-1
 *   y    = sum_n C_t[n] * h_n + D * u                   (mask_diag: read exp(delta A_n) h_n,
 *                                                        and nothing at the direction's first step)
 *
 * A direction runs t = 0 .. L-1, or L-1 .. 0 when `reverse` is set (the bimamba backward
 * branch, without flipping any tensor). Several directions are summed into one output and the
 * SiLU(z) gate is applied to the sum once, after the last direction.
 *
 * Backward: the forward saves the states every VTR_CHUNK steps (when a checkpoint buffer is
 * given); the backward recomputes one chunk at a time (states and exp(delta A) into thread-local
 * scratch), then runs the adjoint recursion through it from the end. dB/dC need a sum over
 * channels: the 16 lane-vectors of a step are reduced with a 16x16 transpose-add into one vector
 * over states and added to a per-thread [B, L, N] buffer; per-thread buffers are summed at the end.
 *
 * The forward also reads/writes mamba-ssm's [batch, channels, L] layout ("time-major", for the
 * selective_scan API) by moving 16x16 tiles through register transposes per chunk.
 *
 * Also here: the depthwise conv (K taps) + SiLU of both directions (causal for the forward
 * branch, anti-causal for the backward branch) and its backward, the backward of the gate, and
 * a tiled transpose.
 *
 * Built at first use by retrieval/models/ssm/cpu.py with the machine's C compiler and linked
 * against the OpenMP runtime torch has loaded, so torch and these kernels share one thread pool.
 * Plain C with GCC/Clang vector extensions; AVX-512 intrinsics where available (masked loads,
 * VREDUCEPS/VSCALEFPS in exp, VRCP14PS), generic code elsewhere. No -ffast-math (see vexp2).
 *
 * Per instruction set (the 16-channel block and every layout stay the same):
 *   AVX-512   a v16f is one zmm register; the per-state loops are fully unrolled.
 *   AVX/AVX2  a v16f is two ymm registers. Lane-wise max/min, masked loads and stores, the
 *             reciprocal estimate and the lane sums go through __m256 intrinsics on the halves:
 *             GCC lowers a compare or select on a vector wider than the machine's into one
 *             branch per lane, which made exp (its clamp) scalar, and keeps 64-byte values that
 *             live across loop iterations on the stack. So the row-major forward works on
 *             8-channel halves throughout (v8f = one ymm): the per-step passes (pre_halves,
 *             post_halves) and the state loop (recur_halves), per group of up to 8 states, each
 *             state one ymm register kept across the chunk's steps (16 states of 16 channels would
 *             need 32). The backward's two state loops do the same in groups of 4 (bwd_halves);
 *             the conv's and the dt projection's sums are held in ymm halves; the conv at K = 4
 *             slides a register window along tiles of positions (conv4_window, which the AVX-512
 *             build shares with whole blocks). exp, softplus and sigmoid are the 8-wide forms on every path (vexp2_state8: degree 5, VROUNDPS and an
 *             integer exponent add). Results differ from the AVX-512 build in summation order, the
 *             2^-23 reciprocal estimate and exp's last bit (<= 2e-7 relative against <= 1e-7).
 *   SSE2      (x86-64 baseline) max/min on the four xmm quarters; the loops stay rolled.
 *   other     generic vector code (compare + select), rolled.
 */
/* -DVTR_GENERIC_VECTORS with -march=x86-64: the generic vector code of non-x86 machines, built
 * and tested on x86 (the SSE2 quarters and intrinsics are left out) */
#if defined(VTR_GENERIC_VECTORS)
#if defined(__AVX__)
#error "VTR_GENERIC_VECTORS goes with -march=x86-64 (SSE2 only)"
#endif
#undef __SSE2__
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))
#define VTR_MAXN 64     /* largest d_state */
#define VTR_CHUNK 64    /* steps between saved states */
#define VTR_MAXK 16     /* largest conv width */
#define VTR_PF 32       /* steps ahead that pre16 prefetches u */
#define VTR_CONV_T 64   /* rows per conv backward block */
#if defined(__AVX__) && !defined(__AVX512F__)
#define VTR_BWD_SCRATCH 7  /* per-step vectors of the backward's chunk scratch (see bwd_chunk) */
#else
#define VTR_BWD_SCRATCH 2
#endif

/*
 * The per-state loops are fully unrolled where a 16-float vector is one register (AVX-512);
 * elsewhere a v16f is 2-4 narrower registers and the unrolled loops would not stay in registers
 * (nor compile quickly), so they stay rolled; on AVX the forward's state loop has its own
 * unrolled form over 8-channel halves (recur_halves).
 */
#if defined(__AVX512F__)
#define VTR_UNROLL _Pragma("GCC unroll 16")
#else
#define VTR_UNROLL _Pragma("GCC unroll 1")
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

INLINE v16f vb(float x) { return (v16f){0} + x; }

/* ---- lane-masked loads/stores (a block may have fewer than 16 channels) ---------------- */
#if defined(__AVX512F__)
typedef __mmask16 lmask;
INLINE lmask lanes(long w) { return (lmask)(w >= 16 ? 0xffff : ((1u << w) - 1u)); }
INLINE v16f ld(const float *p, lmask m) { return (v16f)_mm512_maskz_loadu_ps(m, p); }
INLINE void st(float *p, v16f v, lmask m) { _mm512_mask_storeu_ps(p, m, (__m512)v); }
/* max/min return the second operand when either is NaN: call them as vmax(const, x) */
INLINE v16f vmax(v16f a, v16f b) { return (v16f)_mm512_max_ps((__m512)a, (__m512)b); }
#else
typedef long lmask;
INLINE lmask lanes(long w) { return w; }
/* an unaligned 16-float vector in memory: one full-width load/store (never a memcpy call) */
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));
#if defined(__AVX__)
/*
 * x86 without AVX-512: a v16f is two ymm registers. GCC lowers a compare-and-select on a vector
 * wider than the machine's to one branch per lane, so max/min go through real __m256 halves, and a
 * partial block is read and written with AVX masked moves.
 */
typedef float v8f __attribute__((vector_size(32)));
/* the two halves of a v16f and back (GCC keeps the union in registers; __builtin_shufflevector on
 * 64-byte vectors goes through the stack lane by lane) */
typedef union { v16f v; __m256 h[2]; } vsplit;
INLINE __m256 lo8(v16f v) { const vsplit x = {v}; return x.h[0]; }
INLINE __m256 hi8(v16f v) { const vsplit x = {v}; return x.h[1]; }
INLINE v16f cat8(__m256 a, __m256 b) { vsplit x; x.h[0] = a; x.h[1] = b; return x.v; }
INLINE __m256i half_mask(long w)          /* lanes [0, w) of one 8-float half, w may be <0 or >8 */
{
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castps_si256(_mm256_cmp_ps(iota, _mm256_set1_ps((float)w), _CMP_LT_OQ));
}
INLINE v16f ld(const float *p, lmask w)
{
    if (w >= 16) return *(const v16f_u *)p;
    return cat8(_mm256_maskload_ps(p, half_mask(w)), _mm256_maskload_ps(p + 8, half_mask(w - 8)));
}
INLINE void st(float *p, v16f v, lmask w)
{
    if (w >= 16) { *(v16f_u *)p = v; return; }
    _mm256_maskstore_ps(p, half_mask(w), lo8(v));
    if (w > 8) _mm256_maskstore_ps(p + 8, half_mask(w - 8), hi8(v));
}
/* max/min return the second operand when either is NaN (as the AVX-512 path): vmax(const, x) */
INLINE v16f vmax(v16f a, v16f b) { return cat8(_mm256_max_ps(lo8(a), lo8(b)), _mm256_max_ps(hi8(a), hi8(b))); }
INLINE v16f vmin(v16f a, v16f b) { return cat8(_mm256_min_ps(lo8(a), lo8(b)), _mm256_min_ps(hi8(a), hi8(b))); }
#else
INLINE v16f ld(const float *p, lmask w)
{
    if (w >= 16) return *(const v16f_u *)p;
    v16f v = (v16f){0};
    for (long i = 0; i < w; i++) v[i] = p[i];
    return v;
}
INLINE void st(float *p, v16f v, lmask w)
{
    if (w >= 16) { *(v16f_u *)p = v; return; }
    for (long i = 0; i < w; i++) p[i] = v[i];
}
#if defined(__SSE2__)
/* x86-64 baseline (SSE2): max/min on the four xmm quarters, for the same reason */
typedef union { v16f v; __m128 q[4]; } vsplit;
INLINE v16f vmax(v16f a, v16f b)
{
    const vsplit x = {a}, y = {b};
    vsplit r;
    for (int i = 0; i < 4; i++) r.q[i] = _mm_max_ps(x.q[i], y.q[i]);
    return r.v;
}
INLINE v16f vmin(v16f a, v16f b)
{
    const vsplit x = {a}, y = {b};
    vsplit r;
    for (int i = 0; i < 4; i++) r.q[i] = _mm_min_ps(x.q[i], y.q[i]);
    return r.v;
}
#else
/* other machines: GCC/Clang generic vectors */
INLINE v16f vsel(v16i m, v16f a, v16f b) { return (v16f)((m & (v16i)a) | (~m & (v16i)b)); }
INLINE v16f vmax(v16f a, v16f b) { return vsel(a > b, a, b); }
INLINE v16f vmin(v16f a, v16f b) { return vsel(a < b, a, b); }
#endif
#endif
#endif

/* 16 bf16 values -> fp32 (exact: bf16 is the top half of an fp32), lane-masked like ld() */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
INLINE v16f ldh(const uint16_t *p, lmask m)
{
    return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}
#elif defined(__AVX512F__)
INLINE v16f ldh(const uint16_t *p, lmask m)
{
    v16u v = (v16u){0};
    for (int i = 0; i < 16; i++) if ((m >> i) & 1) v[i] = (uint32_t)p[i] << 16;
    return (v16f)v;
}
#else
typedef uint16_t v16h_u __attribute__((vector_size(32), aligned(2), may_alias));
INLINE v16f ldh(const uint16_t *p, lmask w)
{
    if (w >= 16) return (v16f)(__builtin_convertvector(*(const v16h_u *)p, v16u) << 16);
    v16u v = (v16u){0};
    for (long i = 0; i < (w < 16 ? w : 16); i++) v[i] = (uint32_t)p[i] << 16;
    return (v16f)v;
}
#endif

/* fp32 -> 16 bf16 values, rounded to nearest even (NaN -> 0x7fc0, as torch), lane-masked like st() */
typedef uint16_t v16h __attribute__((vector_size(32)));
INLINE void sth(uint16_t *p, v16f v, lmask m)
{
    const v16u u = (v16u)v;
    const v16u r = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
    const v16i nan = (v16i)(u & 0x7fffffffu) > 0x7f800000;
    const v16u w = (v16u)((nan & 0x7fc0) | (~nan & (v16i)r));
#if defined(__AVX2__) && !defined(__AVX512F__)
    /* every lane is < 2^16: a saturating pack is exact; it interleaves 128-bit lanes, undone by the permute */
    const union { v16u v; __m256i h[2]; } x = {w};
    const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(x.h[0], x.h[1]), 0xd8);
    v16h h;
    memcpy(&h, &pk, sizeof(h));
#else
    const v16h h = __builtin_convertvector(w, v16h);
#endif
#if defined(__AVX512F__)
    if (m == 0xffff) { memcpy(p, &h, sizeof(h)); return; }
    for (int i = 0; i < 16; i++) if ((m >> i) & 1) p[i] = h[i];
#else
    if (m >= 16) { memcpy(p, &h, sizeof(h)); return; }
    for (long i = 0; i < m; i++) p[i] = h[i];
#endif
}

INLINE v16f vabs(v16f x) { return (v16f)((v16u)x & 0x7fffffffu); }

/*
 * 2^x = 2^k * 2^f. With AVX-512DQ: k = floor(x), f = x - k in [0, 1) in one VREDUCEPS, 2^f by a
 * degree-5 polynomial fitted on [0, 1) for relative error (<= 1.7e-7 evaluated in fp32, exact
 * at f = 0), and VSCALEFPS multiplies by 2^floor(x) itself (it floors its second operand), with
 * correct overflow/underflow (+-inf, NaN included): 7 instructions, no clamp. Elsewhere
 * k = round(x) from the 1.5*2^23 rounding trick (exact: this file is built without
 * -ffast-math), |f| <= 1/2, a degree-6 polynomial (<= 1e-7), the input clamped to the normal
 * range first.
 */
#define DEF_POLY_EXP2(NAME, T)                                                  \
    INLINE T NAME(T f)                                                          \
    {                                                                           \
        T p = f * 1.5345795e-4f + 1.3399931e-3f;                                \
        p = p * f + 9.6184891e-3f;                                              \
        p = p * f + 5.5503286e-2f;                                              \
        p = p * f + 2.4022646e-1f;                                              \
        p = p * f + 6.9314718e-1f;                                              \
        return p * f + 1.0f;                                                    \
    }
DEF_POLY_EXP2(poly_exp2, v16f)

INLINE v16f vexp2(v16f x)
{
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    const v16f f = (v16f)_mm512_reduce_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    v16f p = f * 1.8793186e-3f + 8.9909950e-3f;
    p = p * f + 5.5818677e-2f;
    p = p * f + 2.4015927e-1f;
    p = p * f + 6.9315170e-1f;
    p = p * f + 1.0f;
    return (v16f)_mm512_scalef_ps((__m512)p, (__m512)x);
#elif defined(__AVX512F__)
    x = vmax(vb(-150.0f), x);
    const float magic = 12582912.0f;                 /* 1.5 * 2^23 */
    const v16f k = (x + magic) - magic;
    return (v16f)_mm512_scalef_ps((__m512)poly_exp2(x - k), (__m512)k);
#else
    x = vmin(vb(126.0f), vmax(vb(-126.0f), x));
    const float magic = 12582912.0f + 127.0f;        /* the exponent bias rides along */
    const v16f t = x + magic;
    const v16f k = t - magic;
    return poly_exp2(x - k) * (v16f)((v16u)t << 23);
#endif
}

#define LOG2E 1.4426950408889634f

INLINE v16f vexp(v16f x) { return vexp2(x * LOG2E); }

/* 1/x: AVX-512's 14-bit estimate and one Newton step (rel. error ~2^-28; x finite and nonzero) */
INLINE v16f vrcp(v16f x)
{
#if defined(__AVX512F__)
    const v16f r = (v16f)_mm512_rcp14_ps((__m512)x);
    return r + r * (1.0f - x * r);
#elif defined(__AVX__)
    /* the 12-bit estimate and one Newton step: rel. error ~2^-23 (a division is ~7x the cost) */
    const v16f r = cat8(_mm256_rcp_ps(lo8(x)), _mm256_rcp_ps(hi8(x)));
    return r + r * (1.0f - x * r);
#else
    return 1.0f / x;
#endif
}

/* the argument is kept above -87 so that 1 + exp(-x) stays finite; NaN propagates */
INLINE v16f vsigmoid16(v16f x) { return vrcp(1.0f + vexp(-vmax(vb(-87.0f), x))); }

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3],
 * atanh(s) = s q(s^2) with q of degree 4 fitted for relative error on s^2 in [0, 1/9]
 * (<= 7e-8 evaluated in fp32; the series 1 + s^2/3 + s^4/5 + ... to the same accuracy needs 8 terms) */
#define ATANH_Q(s2) ((((s2) * 0.14003867f + 0.14001295f) * (s2) + 0.20010743f) * (s2) + 0.33333209f) * (s2) + 1.0f
#define DEF_SOFTPLUS(NAME, T, EXP, RCP, ABS, MAX0)                              \
    INLINE T NAME(T x)                                                          \
    {                                                                           \
        T e = EXP(-ABS(x));                                                     \
        T s = e * RCP(e + 2.0f);                      /* (0, 1/3] */            \
        T s2 = s * s;                                                           \
        return MAX0(x) + 2.0f * s * (ATANH_Q(s2));                              \
    }
/* NAME of four independent vectors, stage by stage (the same operations per lane as DEF_SOFTPLUS),
 * so that the four ~25-op dependency chains are interleaved in program order */
#define DEF_SOFTPLUS_X4(NAME, T, EXP, RCP, ABS, MAX0)                          \
    INLINE void NAME(T *x)                                                      \
    {                                                                           \
        T e[4], r[4];                                                           \
        _Pragma("GCC unroll 4")                                                 \
        for (int i = 0; i < 4; i++) e[i] = EXP(-ABS(x[i]));                     \
        _Pragma("GCC unroll 4")                                                 \
        for (int i = 0; i < 4; i++) r[i] = RCP(e[i] + 2.0f);                    \
        _Pragma("GCC unroll 4")                                                 \
        for (int i = 0; i < 4; i++) {                                           \
            const T s = e[i] * r[i], s2 = s * s;                                \
            x[i] = MAX0(x[i]) + 2.0f * s * (ATANH_Q(s2));                       \
        }                                                                       \
    }
INLINE v16f vmax0(v16f x) { return vmax(vb(0.0f), x); }
DEF_SOFTPLUS(vsoftplus16, v16f, vexp, vrcp, vabs, vmax0)

/* out[n] = sum of the lanes of v[n], n = 0..15 (four levels of pairwise transpose-add) */
INLINE v16f lvl(v16f a, v16f b, v16i p, v16i q)
{
    return __builtin_shuffle(a, b, p) + __builtin_shuffle(a, b, q);
}

#if defined(__AVX__) && !defined(__AVX512F__)
/* out lane n = sum of the lanes of w[n], n = 0..7 (horizontal adds, then the two 128-bit halves) */
INLINE __m256 hsum8x8(const __m256 *w)
{
    const __m256 t0 = _mm256_hadd_ps(w[0], w[1]), t1 = _mm256_hadd_ps(w[2], w[3]);
    const __m256 t2 = _mm256_hadd_ps(w[4], w[5]), t3 = _mm256_hadd_ps(w[6], w[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

INLINE v16f tsum16(const v16f *v)
{
    __m256 w[16];
    for (int n = 0; n < 16; n++) w[n] = _mm256_add_ps(lo8(v[n]), hi8(v[n]));
    return cat8(hsum8x8(w), hsum8x8(w + 8));
}
#else
INLINE v16f tsum16(const v16f *v)
{
    const v16i p1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i p2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const v16i p3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const v16i p4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    /* the network leaves lane m holding input bitrev4(m): feed the inputs bit-reversed */
    v16f x0 = lvl(v[0], v[8], p1, p1 + 8), x1 = lvl(v[4], v[12], p1, p1 + 8);
    v16f x2 = lvl(v[2], v[10], p1, p1 + 8), x3 = lvl(v[6], v[14], p1, p1 + 8);
    v16f x4 = lvl(v[1], v[9], p1, p1 + 8), x5 = lvl(v[5], v[13], p1, p1 + 8);
    v16f x6 = lvl(v[3], v[11], p1, p1 + 8), x7 = lvl(v[7], v[15], p1, p1 + 8);
    v16f y0 = lvl(x0, x1, p2, p2 + 4), y1 = lvl(x2, x3, p2, p2 + 4);
    v16f y2 = lvl(x4, x5, p2, p2 + 4), y3 = lvl(x6, x7, p2, p2 + 4);
    v16f z0 = lvl(y0, y1, p3, p3 + 2), z1 = lvl(y2, y3, p3, p3 + 2);
    return lvl(z0, z1, p4, p4 + 1);
}
#endif

INLINE float hsum(v16f v)
{
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* transpose of a 16x16 tile held as 16 row vectors: swap the off-diagonal k x k blocks of
 * every 2k x 2k block, for k = 8, 4, 2, 1 */
#define T16_LEVEL(K, LO, HI)                                                    \
    for (int i = 0; i < 16; i++) {                                              \
        if (i & (K)) continue;                                                  \
        const v16f a_ = r[i], b_ = r[i + (K)];                                  \
        r[i] = __builtin_shuffle(a_, b_, (v16i)LO);                             \
        r[i + (K)] = __builtin_shuffle(a_, b_, (v16i)HI);                       \
    }

INLINE void transpose16(v16f *r)
{
    /* lane l of the low row takes (l & K) ? b[l-K] : a[l]; of the high row (l & K) ? b[l] : a[l+K] */
    T16_LEVEL(8, ((v16i){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),
                 ((v16i){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))
    T16_LEVEL(4, ((v16i){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}),
                 ((v16i){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}))
    T16_LEVEL(2, ((v16i){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}),
                 ((v16i){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}))
    T16_LEVEL(1, ((v16i){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}),
                 ((v16i){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}))
}
#undef T16_LEVEL

/* ---- the state loop on AVX/AVX2: 8-channel halves ------------------------------------------ */

/*
 * Without AVX-512 the 16 states of a 16-channel block take 32 ymm registers, twice what there
 * are. The recurrence of a chunk therefore runs per 8-channel half and per group of G <= 8 states
 * (fully unrolled: the group's states are one ymm each and stay in registers for the whole chunk),
 * adding the group's share of y into the chunk's y buffer. States are independent given delta and
 * u, so the grouping changes no result but the order of y's sum over states.
 */
#if defined(__AVX__) && !defined(__AVX512F__)
#define VTR_HALVES 1
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));

/*
 * 2^x in the state loop (x = delta * A * log2(e)): k = round(x) by VROUNDPS, 2^(x - k) by a
 * degree-5 polynomial (relative error <= 2e-7 in fp32, against <= 1e-7 for vexp2's degree 6) and
 * 2^k added to its exponent field by an integer add, which leaves the multiply ports to the
 * polynomial and the recurrence. x is clamped at -126 (2^x then gives 2^-126 instead of a
 * smaller number: an absolute error under 1.2e-38) and, unless BOUNDED says x <= 126 holds (in
 * the state loop: delta from softplus and every A <= 0, as in every Mamba, so x <= 0), at +126
 * too. NaN propagates.
 */
INLINE v8f vexp2_state8(v8f x, const int BOUNDED)
{
    __m256 c = _mm256_max_ps(_mm256_set1_ps(-126.0f), (__m256)x);
    if (!BOUNDED) c = _mm256_min_ps(_mm256_set1_ps(126.0f), c);
    const __m256 k = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v8u e = (v8u)_mm256_cvtps_epi32(k) << 23;    /* vector extensions: AVX without AVX2 too */
    const v8f f = (v8f)c - (v8f)k;
    v8f p = f * 1.3264678e-3f + 9.6715158e-3f;
    p = p * f + 5.5507340e-2f;
    p = p * f + 2.4022242e-1f;
    p = p * f + 6.9314700e-1f;
    p = p * f + 1.0f;
    return (v8f)((v8u)p + e);
}

INLINE v8f vmax8(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
INLINE v8f vrcp8(v8f x)
{
    const v8f r = (v8f)_mm256_rcp_ps((__m256)x);
    return r + r * (1.0f - x * r);
}
INLINE v8f vabs8(v8f x) { return (v8f)((v8u)x & 0x7fffffffu); }
INLINE v8f vmax0_8(v8f x) { return vmax8((v8f){0}, x); }
/* exp's argument is at most 87: vexp2_state8 needs no upper clamp */
INLINE v8f vsigmoid8(v8f x) { return vrcp8(1.0f + vexp2_state8(-vmax8((v8f){0} - 87.0f, x) * LOG2E, 1)); }
/* exp(x) for x <= 0 (softplus' exp(-|x|)) */
INLINE v8f vexp_neg8(v8f x) { return vexp2_state8(x * LOG2E, 1); }
DEF_SOFTPLUS(vsoftplus8, v8f, vexp_neg8, vrcp8, vabs8, vmax0_8)

DEF_SOFTPLUS_X4(vsoftplus8x4, v8f, vexp_neg8, vrcp8, vabs8, vmax0_8)

/* the v16f forms in this build: the 8-wide functions on both halves, so every path of the build
 * (row-major, time-major, backward, conv) computes the same exp, softplus and sigmoid */
INLINE v16f vexp2_state(v16f x, const int BOUNDED)
{
    return cat8((__m256)vexp2_state8((v8f)lo8(x), BOUNDED), (__m256)vexp2_state8((v8f)hi8(x), BOUNDED));
}
INLINE v16f vsoftplus(v16f x) { return cat8((__m256)vsoftplus8((v8f)lo8(x)), (__m256)vsoftplus8((v8f)hi8(x))); }
INLINE v16f vsigmoid(v16f x) { return cat8((__m256)vsigmoid8((v8f)lo8(x)), (__m256)vsigmoid8((v8f)hi8(x))); }

/* one 8-channel half with w lanes (w <= 0: none, w >= 8: all) */
INLINE v8f ld8(const float *p, long w)
{
    if (w >= 8) return *(const v8f_u *)p;
    return (v8f)_mm256_maskload_ps(p, half_mask(w));
}
INLINE void st8(float *p, v8f v, long w)
{
    if (w >= 8) *(v8f_u *)p = v;
    else if (w > 0) _mm256_maskstore_ps(p, half_mask(w), (__m256)v);
}
typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2), may_alias));
INLINE v8f ldh8(const uint16_t *p, long w)
{
    if (w >= 8) return (v8f)(__builtin_convertvector(*(const v8h_u *)p, v8u) << 16);
    v8u v = (v8u){0};
    for (long i = 0; i < w; i++) v[i] = (uint32_t)p[i] << 16;
    return (v8f)v;
}

/*
 * One half (8 channels) and G states of a chunk's recurrence: h, a2 hold the states' vectors with
 * a 16-float stride (one v16f per state, this half's 8 lanes); dl, du and y one v16f per step.
 * Step j reads B at bt + j*bs and C at ct + j*cs (the state index added).
 */
INLINE void recur8(const int G, const int MASK, const int NONPOS, long len, const float *RESTRICT dl, const float *RESTRICT du,
                   float *RESTRICT y, float *RESTRICT h, const float *RESTRICT a2,
                   const float *RESTRICT bt, long bs, const float *RESTRICT ct, long cs)
{
    v8f hv[8], av[8];
    for (int n = 0; n < G; n++) {
        hv[n] = *(const v8f_u *)(h + 16 * n);
        av[n] = *(const v8f_u *)(a2 + 16 * n);
    }
    for (long j = 0; j < len; j++) {
        const v8f d = *(const v8f_u *)(dl + 16 * j), x = *(const v8f_u *)(du + 16 * j);
        const float *b = bt + j * bs, *c = ct + j * cs;
        v8f ya = *(v8f_u *)(y + 16 * j), yb = (v8f){0};
#pragma GCC unroll 8
        for (int n = 0; n < G; n++) {
            const v8f e = vexp2_state8(d * av[n], NONPOS);
            v8f r;
            if (MASK) {
                r = e * hv[n];
                hv[n] = r + x * b[n];
            } else {
                hv[n] = e * hv[n] + x * b[n];
                r = hv[n];
            }
            if (n & 1) yb += r * c[n];
            else ya += r * c[n];
        }
        *(v8f_u *)(y + 16 * j) = ya + yb;
    }
    for (int n = 0; n < G; n++) *(v8f_u *)(h + 16 * n) = hv[n];
}

/* A chunk's recurrence for one 16-channel block, NN states (see recur8); adds C h to y.
 * nonpos: every delta * A is <= 0 (or NaN), see vexp2_state8. */
static void recur_halves(int NN, int MASK, int nonpos, long len, const v16f *dl, const v16f *du, v16f *y, v16f *h,
                         const v16f *a2, const float *bt, long bs, const float *ct, long cs)
{
    for (int hf = 0; hf < 2; hf++) {
        const float *pd = (const float *)dl + 8 * hf, *pu = (const float *)du + 8 * hf;
        float *py = (float *)y + 8 * hf, *ph = (float *)h + 8 * hf;
        const float *pa = (const float *)a2 + 8 * hf;
        for (int n0 = 0; n0 < NN;) {
            const int G = NN - n0 >= 8 ? 8 : NN - n0 >= 4 ? 4 : NN - n0 >= 2 ? 2 : 1;
            float *hh = ph + 16 * n0;
            const float *aa = pa + 16 * n0, *b = bt + n0, *c = ct + n0;
#define RECUR(GG) do {                                                                      \
                if (MASK && nonpos) recur8(GG, 1, 1, len, pd, pu, py, hh, aa, b, bs, c, cs);  \
                else if (MASK) recur8(GG, 1, 0, len, pd, pu, py, hh, aa, b, bs, c, cs);      \
                else if (nonpos) recur8(GG, 0, 1, len, pd, pu, py, hh, aa, b, bs, c, cs);    \
                else recur8(GG, 0, 0, len, pd, pu, py, hh, aa, b, bs, c, cs);                \
            } while (0)
            if (G == 8) RECUR(8);
            else if (G == 4) RECUR(4);
            else if (G == 2) RECUR(2);
            else RECUR(1);
#undef RECUR
            n0 += G;
        }
    }
}

/* p[0..G) += the lane sums of w[0..G) */
INLINE void add_lane_sums(const int G, float *RESTRICT p, const v8f *w)
{
    if (G == 4) {
        const __m256 t0 = _mm256_hadd_ps((__m256)w[0], (__m256)w[1]), t1 = _mm256_hadd_ps((__m256)w[2], (__m256)w[3]);
        const __m256 u = _mm256_hadd_ps(t0, t1);
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
        _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), s4));
    } else {
        for (int n = 0; n < G; n++) {
            const __m128 q = _mm_add_ps(_mm256_castps256_ps128((__m256)w[n]), _mm256_extractf128_ps((__m256)w[n], 1));
            const __m128 r = _mm_add_ps(q, _mm_movehl_ps(q, q));
            p[n] += _mm_cvtss_f32(_mm_add_ss(r, _mm_shuffle_ps(r, r, 1)));
        }
    }
}

/*
 * The backward's two state loops for one 8-channel half and G states (the forward's grouping):
 * the recomputation of the chunk (exp(delta A) and h_{t-1} of every step into eA / hp), then the
 * adjoint from the chunk's last step. Per step j: dl, du, dy one v16f each (this half's lanes);
 * s1 and s2 (sums over states, v16f per step) are added to. gs, da, h, a, a2: the group's
 * vectors, 16-float stride. B/C of step j at bt + j*bs / ct + j*cs, their gradients (summed over
 * channels) added at pB + j*ps / pC + j*ps. mfirst: step 0 is the masked first step (reads no C).
 * The adjoint step is bwd_chunk's, on one ymm (that one is left as it is, so that the AVX-512
 * build's code does not change).
 */
INLINE void bwd_group8(const int G, const int MASK, int mfirst, long len, long NN, const float *RESTRICT dl,
                       const float *RESTRICT du, const float *RESTRICT dy, float *RESTRICT s1, float *RESTRICT s2,
                       float *RESTRICT eA, float *RESTRICT hp, float *RESTRICT gs, float *RESTRICT da,
                       float *RESTRICT h, const float *RESTRICT a, const float *RESTRICT a2,
                       const float *RESTRICT bt, long bs, const float *RESTRICT ct, long cs,
                       float *RESTRICT pB, float *RESTRICT pC, long ps)
{
    v8f v[4], w[4];
    for (int n = 0; n < G; n++) v[n] = *(const v8f_u *)(h + 16 * n);
    for (long j = 0; j < len; j++) {
        const v8f d = *(const v8f_u *)(dl + 16 * j), x = *(const v8f_u *)(du + 16 * j);
        const float *b = bt + j * bs;
        float *ej = eA + 16 * NN * j, *hj = hp + 16 * NN * j;
#pragma GCC unroll 4
        for (int n = 0; n < G; n++) {
            const v8f e = vexp2_state8(d * *(const v8f_u *)(a2 + 16 * n), 0);
            *(v8f_u *)(ej + 16 * n) = e;
            *(v8f_u *)(hj + 16 * n) = v[n];
            v[n] = e * v[n] + x * b[n];
        }
    }
    for (int n = 0; n < G; n++) {
        v[n] = *(const v8f_u *)(gs + 16 * n);
        w[n] = *(const v8f_u *)(da + 16 * n);
    }
    for (long j = len - 1; j >= 0; j--) {
        const v8f d = *(const v8f_u *)(dl + 16 * j), x = *(const v8f_u *)(du + 16 * j);
        const v8f dyv = *(const v8f_u *)(dy + 16 * j);
        const v8f dyc = (MASK && mfirst && j == 0) ? (v8f){0} : dyv;
        const float *b = bt + j * bs, *c = ct + j * cs;
        const float *ej = eA + 16 * NN * j, *hj = hp + 16 * NN * j;
        v8f a1 = (v8f){0}, a3 = (v8f){0}, dB[4], dC[4];
#pragma GCC unroll 4
        for (int n = 0; n < G; n++) {
            const v8f e = *(const v8f_u *)(ej + 16 * n);
            const v8f rp = e * *(const v8f_u *)(hj + 16 * n);      /* exp(delta A) h_{t-1} */
            v8f gh, gr;                                             /* dL/dh_t, dL/d(rp) */
            if (MASK) {
                gh = v[n];
                gr = gh + dyc * c[n];
                dC[n] = dyc * rp;
            } else {
                gh = v[n] + dyv * c[n];
                gr = gh;
                dC[n] = dyv * (rp + x * b[n]);
            }
            dB[n] = gh * x;
            const v8f ge = gr * rp;                                 /* dL/d(delta A_n) */
            a1 += gh * b[n];
            a3 += ge * *(const v8f_u *)(a + 16 * n);
            w[n] += ge * d;
            v[n] = gr * e;                                          /* dL/dh_{t-1} */
        }
        *(v8f_u *)(s1 + 16 * j) += a1;
        *(v8f_u *)(s2 + 16 * j) += a3;
        add_lane_sums(G, pB + j * ps, dB);
        add_lane_sums(G, pC + j * ps, dC);
    }
    for (int n = 0; n < G; n++) {
        *(v8f_u *)(gs + 16 * n) = v[n];
        *(v8f_u *)(da + 16 * n) = w[n];
    }
}

/* One chunk's backward state loops for a 16-channel block, NN states (see bwd_group8); s1 and s2
 * are overwritten. */
static void bwd_halves(int NN, int MASK, int mfirst, long len, const v16f *dl, const v16f *du, const v16f *dy,
                       v16f *s1, v16f *s2, v16f *eA, v16f *hp, v16f *gs, v16f *da, v16f *h, const v16f *a,
                       const v16f *a2, const float *bt, long bs, const float *ct, long cs, float *pB, float *pC,
                       long ps)
{
    for (long j = 0; j < len; j++) s1[j] = s2[j] = vb(0.0f);
    for (int hf = 0; hf < 2; hf++) {
        const int o = 8 * hf;
        for (int n0 = 0; n0 < NN;) {
            const int G = NN - n0 >= 4 ? 4 : NN - n0 >= 2 ? 2 : 1;
            const int q = 16 * n0 + o;
#define BWD(GG, MM) bwd_group8(GG, MM, mfirst, len, NN, (const float *)dl + o, (const float *)du + o,           \
                               (const float *)dy + o, (float *)s1 + o, (float *)s2 + o, (float *)eA + q,          \
                               (float *)hp + q, (float *)gs + q, (float *)da + q, (float *)h + q,                 \
                               (const float *)a + q, (const float *)a2 + q, bt + n0, bs, ct + n0, cs, pB + n0,    \
                               pC + n0, ps)
            if (G == 4) { if (MASK) BWD(4, 1); else BWD(4, 0); }
            else if (G == 2) { if (MASK) BWD(2, 1); else BWD(2, 0); }
            else { if (MASK) BWD(1, 1); else BWD(1, 0); }
#undef BWD
            n0 += G;
        }
    }
}
#else
INLINE v16f vexp2_state(v16f x, const int BOUNDED) { (void)BOUNDED; return vexp2(x); }
INLINE v16f vsoftplus(v16f x) { return vsoftplus16(x); }
DEF_SOFTPLUS_X4(vsoftplus_x4, v16f, vexp, vrcp, vabs, vmax0)
INLINE v16f vsigmoid(v16f x) { return vsigmoid16(x); }
#endif

/* ---- the scan --------------------------------------------------------------------------- */

/*
 * One direction's inputs; [B, L, X] operands are addressed as base + b*bs + t*ls + x*cs.
 * Channel stride cs = 1 everywhere, except in the forward's time-major mode (u_cs != 1): then
 * u, dpre, z and out are [B, E, L] with unit time stride (mamba-ssm's layout) and are moved
 * through 16x16 register transposes per chunk.
 */
typedef struct {
    const float *u;    long u_bs, u_ls, u_cs; /* [B, L, E] scan input (after conv + SiLU) */
    const float *dpre; long d_bs, d_ls, d_cs; /* [B, L, E] delta before bias/softplus, or NULL: */
    const float *dt;   long t_bs, t_ls;      /* [B, L, R] low-rank dt, dpre = dt @ Wt */
    const float *Wt;   long R;               /* [R, E] (dt_proj.weight transposed) */
    const float *Bm;   long b_bs, b_ls;      /* [B, L, N] */
    const float *Cm;   long c_bs, c_ls;      /* [B, L, N] */
    const float *A;                          /* [N, E] (transposed from [E, N]) */
    const float *D;                          /* [E] or NULL */
    const float *bias;                       /* [E] or NULL */
    const float *h0;                         /* [B, N, E] or NULL */
    float *hlast;                            /* [B, N, E] or NULL */
    float *ckpt;                             /* [B, ceil(L/CHUNK), N, E] or NULL */
    int reverse, mask_diag, elemental, softplus;
    int z_bf16;                              /* the gate z (passed to vtr_scan_fwd) is bf16, row-major */
    int u_bf16;                              /* u is bf16 (row-major forward only) */
    int bc_bf16;                             /* dt, B and C are bf16 (row-major forward only, R <= VTR_MAXN) */
} vtr_dir;

/* One direction's gradients; all contiguous. */
typedef struct {
    float *du, *ddpre;                       /* [B, L, E] */
    float *dB, *dC;                          /* [B, L, N] */
    float *dA;                               /* [N, E] */
    float *dD, *dbias;                       /* [E] or NULL */
    float *dh0;                              /* [B, N, E] or NULL */
    const float *dhlast;                     /* [B, N, E] or NULL */
} vtr_grad;

int vtr_chunk(void) { return VTR_CHUNK; }

/* the vector path this build runs (the loader logs it; tests check that a build took its flags) */
/*
 * The scan's elementwise functions over n floats, so tests can check them against float64
 * (fn 0: 2^x as the state loop computes it, `bounded` its no-upper-clamp form for x <= 126;
 * 1: softplus; 2: sigmoid). Returns -1 for an unknown fn.
 */
int vtr_math(int fn, int bounded, const float *x, float *y, long n)
{
    if (fn < 0 || fn > 2) return -1;
    for (long i = 0; i < n; i += 16) {
        const lmask m = lanes(n - i);
        const v16f v = ld(x + i, m);
        v16f r;
        if (fn == 0) r = bounded ? vexp2_state(v, 1) : vexp2_state(v, 0);
        else if (fn == 1) r = vsoftplus(v);
        else r = vsigmoid(v);
        st(y + i, r, m);
    }
    return 0;
}

const char *vtr_vector_path(void)
{
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE2__)
    return "sse2";
#else
    return "generic";
#endif
}

/*
 * Work split: thread `tid` of `nthr` owns a contiguous range of (batch, channel-block) items and
 * walks it chunk-major: chunk k of every block it owns, then chunk k+1, with each block's state
 * parked in memory between chunks. A chunk of rows (all channels) is thus used while it is in
 * cache and its pages are in the TLB, instead of each block streaming through all L rows alone.
 */
typedef struct { long b, blk0, blk1; } vtr_span;   /* blocks [blk0, blk1) of batch b */

/* this thread's share of the items: [*lo, *hi); spans are walked with next_span */
static void thread_range(long items, int tid, int nthr, long *lo, long *hi)
{
    const long per = (items + nthr - 1) / nthr;
    *lo = tid * per < items ? tid * per : items;
    *hi = *lo + per < items ? *lo + per : items;
}

static int next_span(long *lo, long hi, long nblk, vtr_span *sp)
{
    if (*lo >= hi) return 0;
    const long b = *lo / nblk, end = (b + 1) * nblk < hi ? (b + 1) * nblk : hi;
    sp->b = b;
    sp->blk0 = *lo - b * nblk;
    sp->blk1 = end - b * nblk;
    *lo = end;
    return 1;
}

/* dpre of one block at one position: dt_row @ Wt[:, c0:c0+16] (the fused dt projection) */
#if defined(VTR_HALVES)
/* AVX: the sums in two ymm registers (GCC carries a 64-byte vector through a loop via the stack),
 * and out of line: inlined into the large fwd_chunk, the sums went through the stack anyway */
static __attribute__((noinline)) v16f dt_proj(const float *RESTRICT dtrow, const float *RESTRICT Wt, long R, long E, lmask m)
{
    v8f a0 = (v8f){0}, a1 = (v8f){0};
    if (m >= 16) {
        for (long r = 0; r < R; r++) {
            a0 += *(const v8f_u *)(Wt + r * E) * dtrow[r];
            a1 += *(const v8f_u *)(Wt + r * E + 8) * dtrow[r];
        }
    } else {
        const __m256i k0 = half_mask(m), k1 = half_mask(m - 8);
        for (long r = 0; r < R; r++) {
            a0 += (v8f)_mm256_maskload_ps(Wt + r * E, k0) * dtrow[r];
            a1 += (v8f)_mm256_maskload_ps(Wt + r * E + 8, k1) * dtrow[r];
        }
    }
    return cat8((__m256)a0, (__m256)a1);
}
#else
INLINE v16f dt_proj(const float *RESTRICT dtrow, const float *RESTRICT Wt, long R, long E, lmask m)
{
    v16f a0 = vb(0.0f), a1 = vb(0.0f);
    long r = 0;
    for (; r + 1 < R; r += 2) {
        a0 += ld(Wt + r * E, m) * dtrow[r];
        a1 += ld(Wt + (r + 1) * E, m) * dtrow[r + 1];
    }
    if (r < R) a0 += ld(Wt + r * E, m) * dtrow[r];
    return a0 + a1;
}
#endif

/* dst[k] = the 16 channels (rows base + i*cs) at time k, k < len <= VTR_CHUNK */
INLINE void tile_load(const float *base, long cs, long len, long nch, v16f *dst)
{
    for (long g = 0; g < len; g += 16) {
        const long nt = len - g < 16 ? len - g : 16;
        const lmask mt = lanes(nt);
        v16f r[16];
VTR_UNROLL
        for (int i = 0; i < 16; i++) r[i] = i < nch ? ld(base + i * cs + g, mt) : vb(0.0f);
        transpose16(r);
        for (long k = 0; k < nt; k++) dst[g + k] = r[k];
    }
}

/* the inverse of tile_load */
INLINE void tile_store(float *base, long cs, long len, long nch, const v16f *src)
{
    for (long g = 0; g < len; g += 16) {
        const long nt = len - g < 16 ? len - g : 16;
        const lmask mt = lanes(nt);
        v16f r[16];
VTR_UNROLL
        for (int k = 0; k < 16; k++) r[k] = k < nt ? src[g + k] : vb(0.0f);
        transpose16(r);
        for (long i = 0; i < nch; i++) st(base + i * cs + g, r[i], mt);
    }
}

#if defined(VTR_HALVES)
#define HALF(V, J, HF) (*(v8f_u *)((float *)((V) + (J)) + 8 * (HF)))

/*
 * The per-step passes around the recurrence of a row-major chunk, per 8-channel half (in
 * fwd_chunk's v16f form GCC keeps their values on the stack): delta and delta*u of every step
 * (pre_halves), then y + D u, the earlier direction's sum, the gate and the store (post_halves,
 * fp32 output). dt rows of the chunk are read from sT when the direction's dt is bf16.
 */
static void pre_halves(const vtr_dir *d, long b, long c0, long w, long L, long E, long i0, long len,
                       const float *sT, v16f *cdl, v16f *cdu, v16f *cy)
{
    const long step = d->reverse ? -1 : 1, t0 = (d->reverse ? L - 1 : 0) + step * i0;
    const long R = d->R;
    const int fast = d->dt && R <= VTR_MAXN;
    if (fast) {
        /* pass 1: pre = bias + dt_row @ Wt for both halves, four steps at a time: each dt value is
         * broadcast once for 16 channels, each weight load feeds four steps' independent sums */
        v8f wt[2 * VTR_MAXN];
        for (long r = 0; r < R; r++) {
            wt[2 * r] = ld8(d->Wt + r * E + c0, w);
            wt[2 * r + 1] = ld8(d->Wt + r * E + c0 + 8, w - 8);
        }
        const v8f bl = d->bias ? ld8(d->bias + c0, w) : (v8f){0}, bh = d->bias ? ld8(d->bias + c0 + 8, w - 8) : (v8f){0};
#define DT_ROW(J) (d->bc_bf16 ? sT + (J) * R : d->dt + b * d->t_bs + (t0 + step * (J)) * d->t_ls)
        long j = 0;
        for (; j + 4 <= len; j += 4) {
            const float *r0 = DT_ROW(j), *r1 = DT_ROW(j + 1), *r2 = DT_ROW(j + 2), *r3 = DT_ROW(j + 3);
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0};
            for (long r = 0; r < R; r++) {
                const v8f wl = wt[2 * r], wu = wt[2 * r + 1];
                const float s0 = r0[r], s1 = r1[r], s2 = r2[r], s3 = r3[r];
                a0 += wl * s0; e0 += wu * s0;
                a1 += wl * s1; e1 += wu * s1;
                a2 += wl * s2; e2 += wu * s2;
                a3 += wl * s3; e3 += wu * s3;
            }
            /* the bias after the sums, as dt_proj (the backward's recomputed delta is this one) */
            HALF(cdl, j, 0) = a0 + bl; HALF(cdl, j, 1) = e0 + bh;
            HALF(cdl, j + 1, 0) = a1 + bl; HALF(cdl, j + 1, 1) = e1 + bh;
            HALF(cdl, j + 2, 0) = a2 + bl; HALF(cdl, j + 2, 1) = e2 + bh;
            HALF(cdl, j + 3, 0) = a3 + bl; HALF(cdl, j + 3, 1) = e3 + bh;
        }
        for (; j < len; j++) {
            const float *r0 = DT_ROW(j);
            v8f a0 = {0}, e0 = {0};
            for (long r = 0; r < R; r++) {
                a0 += wt[2 * r] * r0[r];
                e0 += wt[2 * r + 1] * r0[r];
            }
            HALF(cdl, j, 0) = a0 + bl; HALF(cdl, j, 1) = e0 + bh;
        }
#undef DT_ROW
    }
    for (int hf = 0; hf < 2; hf++) {
        const long c = c0 + 8 * hf, wh = w - 8 * hf;
        const v8f bias = d->bias ? ld8(d->bias + c, wh) : (v8f){0};
        /* pass 1 elsewhere: dt with a rank above VTR_MAXN, or dpre given */
        if (d->dt && !fast) {
            const __m256i km = half_mask(wh);
            const float *Wt = d->Wt + c;
            for (long j = 0; j < len; j++) {
                const float *row = d->bc_bf16 ? sT + j * R : d->dt + b * d->t_bs + (t0 + step * j) * d->t_ls;
                v8f a0 = {0};
                for (long r = 0; r < R; r++) a0 += (v8f)_mm256_maskload_ps(Wt + r * E, km) * row[r];
                HALF(cdl, j, hf) = a0 + bias;
            }
        } else if (!d->dt) {
            for (long j = 0; j < len; j++)
                HALF(cdl, j, hf) = bias + ld8(d->dpre + b * d->d_bs + (t0 + step * j) * d->d_ls + c, wh);
        }
        /* pass 2: delta = softplus(pre), delta * u, and D * u as y's start (the recurrence adds
         * C h to it; u is read once); the steps are independent, so their softplus chains overlap */
        const long ub = b * d->u_bs + t0 * d->u_ls + c, us = step * d->u_ls;
        const v8f Dv = d->D ? ld8(d->D + c, wh) : (v8f){0};
        const int sp = d->softplus;
        if (d->u_bf16) {
            const uint16_t *uh = (const uint16_t *)(const void *)d->u + ub;
            for (long j = 0; j < len; j++) {
                const v8f pre = HALF(cdl, j, hf), dl = sp ? vsoftplus8(pre) : pre, u = ldh8(uh + j * us, wh);
                HALF(cdl, j, hf) = dl;
                HALF(cdu, j, hf) = dl * u;
                HALF(cy, j, hf) = Dv * u;
            }
        } else {
            const float *uf = d->u + ub;
            long j = 0;
            if (sp)             /* four steps at a time: their softplus chains interleaved (+7 %) */
                for (; j + 4 <= len; j += 4) {
                    v8f q[4] = {HALF(cdl, j, hf), HALF(cdl, j + 1, hf), HALF(cdl, j + 2, hf), HALF(cdl, j + 3, hf)};
                    vsoftplus8x4(q);
                    for (int i = 0; i < 4; i++) {
                        const v8f u = ld8(uf + (j + i) * us, wh);
                        HALF(cdl, j + i, hf) = q[i];
                        HALF(cdu, j + i, hf) = q[i] * u;
                        HALF(cy, j + i, hf) = Dv * u;
                    }
                }
            for (; j < len; j++) {
                const v8f pre = HALF(cdl, j, hf), dl = sp ? vsoftplus8(pre) : pre, u = ld8(uf + j * us, wh);
                HALF(cdl, j, hf) = dl;
                HALF(cdu, j, hf) = dl * u;
                HALF(cy, j, hf) = Dv * u;
            }
        }
    }
}

static void post_halves(const vtr_dir *d, long b, long c0, long w, long L, long E, long i0, long len,
                        const v16f *cy, float *out, int acc, const void *z, long z_bs, long z_ls, float *S)
{
    const long step = d->reverse ? -1 : 1, first = d->reverse ? L - 1 : 0;
    for (int hf = 0; hf < 2; hf++) {
        const long c = c0 + 8 * hf, wh = w - 8 * hf;
        float *o = out + b * L * E + c;
        long t = first + step * i0;
        for (long j = 0; j < len; j++, t += step) {
            v8f y = HALF(cy, j, hf);                      /* C h + D u (pre_halves) */
            if (acc) y += ld8(o + t * E, wh);
            if (z) {
                const long zi = b * z_bs + t * z_ls + c;
                const v8f zv = d->z_bf16 ? ldh8((const uint16_t *)z + zi, wh) : ld8((const float *)z + zi, wh);
                if (S) st8(S + (b * L + t) * E + c, y, wh);
                y = y * (zv * vsigmoid8(zv));
            }
            st8(o + t * E, y, wh);
        }
    }
}
#undef HALF
#else
/*
 * The per-step pass before the recurrence of a row-major chunk (builds without VTR_HALVES):
 * pre = bias + dt_row @ Wt four steps at a time (each weight vector feeds four steps' independent
 * sums), delta = softplus(pre) four steps at a time (their chains interleaved), delta * u, and
 * D * u as y's start (the recurrence adds C h to it; u is read once). dt rows of the chunk are
 * read from sT when the direction's dt is bf16.
 */
static void pre16(const vtr_dir *d, long b, long c0, lmask m, long L, long E, long i0, long len,
                  const float *sT, v16f *cdl, v16f *cdu, v16f *cy)
{
    const long step = d->reverse ? -1 : 1, t0 = (d->reverse ? L - 1 : 0) + step * i0;
    const long R = d->R;
    const v16f bias = d->bias ? ld(d->bias + c0, m) : vb(0.0f);
#define DT_ROW(J) (d->bc_bf16 ? sT + (J) * R : d->dt + b * d->t_bs + (t0 + step * (J)) * d->t_ls)
    long j = 0;
    if (d->dt && R <= VTR_MAXN) {
        v16f wt[VTR_MAXN];
        for (long r = 0; r < R; r++) wt[r] = ld(d->Wt + r * E + c0, m);
        /* each step's sum is formed as dt_proj forms it (even and odd rows apart, then the bias),
         * so the backward's recomputed delta is this one to the bit */
        for (; j + 4 <= len; j += 4) {
            const float *q[4] = {DT_ROW(j), DT_ROW(j + 1), DT_ROW(j + 2), DT_ROW(j + 3)};
            v16f ev[4] = {vb(0.0f), vb(0.0f), vb(0.0f), vb(0.0f)}, od[4] = {vb(0.0f), vb(0.0f), vb(0.0f), vb(0.0f)};
            long r = 0;
            for (; r + 1 < R; r += 2)
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    ev[i] += wt[r] * q[i][r];
                    od[i] += wt[r + 1] * q[i][r + 1];
                }
            if (r < R)
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) ev[i] += wt[r] * q[i][r];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) cdl[j + i] = (ev[i] + od[i]) + bias;
        }
    }
    for (; j < len; j++)                    /* the last steps, a rank above VTR_MAXN, or dpre given */
        cdl[j] = (d->dt ? dt_proj(DT_ROW(j), d->Wt + c0, R, E, m)
                        : ld(d->dpre + b * d->d_bs + (t0 + step * j) * d->d_ls + c0, m)) + bias;
#undef DT_ROW
    const long ub = b * d->u_bs + t0 * d->u_ls + c0, us = step * d->u_ls;
    const float *uf = d->u_bf16 ? NULL : d->u + ub;
    const uint16_t *uh = d->u_bf16 ? (const uint16_t *)(const void *)d->u + ub : NULL;
#define LDU(J) (uh ? ldh(uh + (J) * us, m) : ld(uf + (J) * us, m))
    /* u's rows are E floats apart, so consecutive steps' 64 bytes sit in different lines and
     * often different pages, where the hardware prefetcher stops: fetched VTR_PF steps ahead
     * (+8 % on the scan at 12,545 positions; a prefetch never faults, so none is bounds-checked) */
#define PREFETCH_U(J) __builtin_prefetch(uh ? (const void *)(uh + (J) * us) : (const void *)(uf + (J) * us))
    const v16f Dv = d->D ? ld(d->D + c0, m) : vb(0.0f);
    j = 0;
    if (d->softplus)
        for (; j + 4 <= len; j += 4) {
            v16f q[4] = {cdl[j], cdl[j + 1], cdl[j + 2], cdl[j + 3]};
            for (int i = 0; i < 4; i++) PREFETCH_U(j + VTR_PF + i);
            vsoftplus_x4(q);
            for (int i = 0; i < 4; i++) {
                const v16f u = LDU(j + i);
                cdl[j + i] = q[i];
                cdu[j + i] = q[i] * u;
                cy[j + i] = Dv * u;
            }
        }
    for (; j < len; j++) {
        const v16f dl = d->softplus ? vsoftplus(cdl[j]) : cdl[j], u = LDU(j);
        cdl[j] = dl;
        cdu[j] = dl * u;
        cy[j] = Dv * u;
    }
#undef PREFETCH_U
#undef LDU
}
#endif

/* One chunk [i0, i0+len) (in direction order) of one block; the state h is read from and
 * written back to `hs` (NN vectors). a2/h are the caller's scratch (registers for NN = 16). */
INLINE void fwd_chunk(const vtr_dir *RESTRICT d, long b, long c0, lmask m, long L, long E,
                      const int NN, const int MASK, const int TM, float *RESTRICT out, int acc,
                      const float *RESTRICT z, long z_bs, long z_ls, long z_cs, float *RESTRICT S, long i0,
                      v16f *RESTRICT hs, v16f *RESTRICT a2, v16f *RESTRICT h, uint16_t *RESTRICT out16)
{
    const long len = L - i0 < VTR_CHUNK ? L - i0 : VTR_CHUNK;
    for (int n = 0; n < NN; n++) {
        a2[n] = ld(d->A + n * E + c0, m) * LOG2E;
        h[n] = hs[n];
    }
    const v16f Dv = d->D ? ld(d->D + c0, m) : vb(0.0f);
    const v16f bias = d->bias ? ld(d->bias + c0, m) : vb(0.0f);
    /* u may be bf16 (d->u_bf16), dt/B/C too (d->bc_bf16): read in place, widened in registers; the
     * chunk's dt/B/C rows are widened once into scratch (they are shared by every channel block) */
    const int u16 = d->u_bf16, bc16 = d->bc_bf16;
    const float *u = u16 ? NULL : d->u + b * d->u_bs + c0 * d->u_cs;
    const uint16_t *uh = u16 ? (const uint16_t *)(const void *)d->u + b * d->u_bs + c0 * d->u_cs : NULL;
#define LDU(T) (u16 ? ldh(uh + (T) * d->u_ls, m) : ld(u + (T) * d->u_ls, m))
    const float *dp = d->dpre ? d->dpre + b * d->d_bs + c0 * d->d_cs : NULL;
    const int has_dt = d->dt != NULL;
    const float *dtb = has_dt && !bc16 ? d->dt + b * d->t_bs : NULL, *Wt = has_dt ? d->Wt + c0 : NULL;
    const float *Bb = bc16 ? NULL : d->Bm + b * d->b_bs, *Cb = bc16 ? NULL : d->Cm + b * d->c_bs;
    float sT[VTR_CHUNK * VTR_MAXN], sB[VTR_CHUNK * VTR_MAXN], sC[VTR_CHUNK * VTR_MAXN];
    const long step = d->reverse ? -1 : 1, first = d->reverse ? L - 1 : 0;
    const long nck = (L + VTR_CHUNK - 1) / VTR_CHUNK;
    const int softplus = d->softplus;
    float *o = out + b * L * E + (TM ? c0 * L : c0);
    uint16_t *o16 = out16 ? out16 + b * L * E + c0 : NULL;
    /* z is fp32, or bf16 (d->z_bf16, row-major only): read in place, widened in registers */
    const float *zb = z && !d->z_bf16 ? z + b * z_bs + c0 * z_cs : NULL;
    const uint16_t *zh = z && d->z_bf16 ? (const uint16_t *)(const void *)z + b * z_bs + c0 * z_cs : NULL;
    float *Sb = S ? S + b * L * E + c0 : NULL;
    /* time-major: the chunk's rows as vectors over channels, in memory (time) order */
    const long tmin = d->reverse ? L - i0 - len : i0, nch = E - c0 < 16 ? E - c0 : 16;
    v16f tU[VTR_CHUNK], tV[VTR_CHUNK];
#define TIX(j) (d->reverse ? len - 1 - (j) : (j))
    if (d->ckpt) {
        float *cp = d->ckpt + (b * nck + i0 / VTR_CHUNK) * NN * E + c0;
        for (int n = 0; n < NN; n++) st(cp + n * E, h[n], m);
    }
    /*
     * Three passes, so the recurrence loop carries no long dependency chains (softplus, the
     * gate's sigmoid) and the CPU can overlap consecutive steps' exps.
     */
    v16f cdl[VTR_CHUNK], cdu[VTR_CHUNK], cy[VTR_CHUNK];
    long t = first + step * i0;
    if (bc16) {
        const uint16_t *Th = has_dt ? (const uint16_t *)(const void *)d->dt + b * d->t_bs : NULL;
        const uint16_t *Bh = (const uint16_t *)(const void *)d->Bm + b * d->b_bs;
        const uint16_t *Ch = (const uint16_t *)(const void *)d->Cm + b * d->c_bs;
        for (long j = 0; j < len; j++, t += step) {
            for (long q = 0; q < NN; q += 16) {
                const lmask mq = lanes(NN - q);
                st(sB + j * NN + q, ldh(Bh + t * d->b_ls + q, mq), mq);
                st(sC + j * NN + q, ldh(Ch + t * d->c_ls + q, mq), mq);
            }
            for (long q = 0; Th && q < d->R; q += 16) {
                const lmask mq = lanes(d->R - q);
                st(sT + j * d->R + q, ldh(Th + t * d->t_ls + q, mq), mq);
            }
        }
        t = first + step * i0;
    }
    if (TM) {
        if (dp) tile_load(dp + tmin, d->d_cs, len, nch, tV);
        tile_load(u + tmin, d->u_cs, len, nch, tU);
    }
#if defined(VTR_HALVES)
    if (!TM) pre_halves(d, b, c0, m, L, E, i0, len, sT, cdl, cdu, cy);
#else
    if (!TM) pre16(d, b, c0, m, L, E, i0, len, sT, cdl, cdu, cy);
#endif
    else for (long j = 0; j < len; j++) {                   /* time-major, as the row-major pre pass */
        const v16f pre = (has_dt ? dt_proj(dtb + (t + step * j) * d->t_ls, Wt, d->R, E, m) : tV[TIX(j)]) + bias;
        const v16f dl = softplus ? vsoftplus(pre) : pre;
        cdl[j] = dl;
        cdu[j] = dl * tU[TIX(j)];
        cy[j] = Dv * tU[TIX(j)];
    }
#if defined(VTR_HALVES)
    /* delta >= 0 (softplus) and A <= 0 in every lane of the block: delta * A <= 0 */
    int nonpos = softplus;
    for (int n = 0; nonpos && n < NN; n++)
        for (long i = 0; i < nch; i++) nonpos &= d->A[n * E + c0 + i] <= 0.0f;
    if (bc16)
        recur_halves(NN, MASK, nonpos, len, cdl, cdu, cy, h, a2, sB, NN, sC, NN);
    else
        recur_halves(NN, MASK, nonpos, len, cdl, cdu, cy, h, a2, Bb + t * d->b_ls, step * d->b_ls, Cb + t * d->c_ls,
                     step * d->c_ls);
#else
    for (long j = 0; j < len; j++, t += step) {
        const v16f dl = cdl[j], du = cdu[j];
        const float *bt = bc16 ? sB + j * NN : Bb + t * d->b_ls, *ct = bc16 ? sC + j * NN : Cb + t * d->c_ls;
        v16f ya[4] = {cy[j], vb(0.0f), vb(0.0f), vb(0.0f)};
VTR_UNROLL
        for (int n = 0; n < NN; n++) {
            const v16f e = vexp2_state(dl * a2[n], 0);
            if (MASK) {
                const v16f r = e * h[n];
                h[n] = r + du * bt[n];
                ya[n & 3] += r * ct[n];
            } else {
                h[n] = e * h[n] + du * bt[n];
                ya[n & 3] += h[n] * ct[n];
            }
        }
        cy[j] = (ya[0] + ya[1]) + (ya[2] + ya[3]);
    }
#endif
    if (MASK && i0 == 0) cy[0] = Dv * (TM ? tU[TIX(0)] : LDU(first));   /* the masked first step reads no state */
    t = first + step * i0;
    if (TM) {
        v16f *tZ = cdu;                                   /* free after the recurrence */
        if (zb) tile_load(zb + tmin, z_cs, len, nch, tZ);
        if (acc) tile_load(o + tmin, L, len, nch, tV);
        for (long j = 0; j < len; j++, t += step) {
            const long x = TIX(j);
            v16f y = cy[j];                               /* C h + D u (the pre pass) */
            if (acc) y += tV[x];
            if (zb) {
                const v16f zv = tZ[x];
                if (Sb) st(Sb + t * E, y, m);
                y = y * (zv * vsigmoid(zv));
            }
            tV[x] = y;
        }
        tile_store(o + tmin, L, len, nch, tV);
    } else {
#if defined(VTR_HALVES)
        if (!o16) {
            post_halves(d, b, c0, m, L, E, i0, len, cy, out, acc, z, z_bs, z_ls, S);
        } else
#endif
        for (long j = 0; j < len; j++, t += step) {
            v16f y = cy[j];                               /* C h + D u (the pre pass) */
            if (acc) y += ld(o + t * E, m);
            if (zb || zh) {
                const v16f zv = zh ? ldh(zh + t * z_ls, m) : ld(zb + t * z_ls, m);
                if (Sb) st(Sb + t * E, y, m);
                y = y * (zv * vsigmoid(zv));
            }
            if (o16) sth(o16 + t * E, y, m);      /* the last direction writes out_proj's bf16 input */
            else st(o + t * E, y, m);
        }
    }
#undef TIX
#undef LDU
    for (int n = 0; n < NN; n++) hs[n] = h[n];
    if (d->hlast && i0 + len == L)
        for (int n = 0; n < NN; n++) st(d->hlast + (b * NN + n) * E + c0, h[n], m);
}

static void fwd16(const vtr_dir *d, long b, long c0, lmask m, long L, long E, int tm, float *out, int acc,
                  const float *z, long z_bs, long z_ls, long z_cs, float *S, long i0, v16f *hs,
                  uint16_t *out16)
{
    v16f a2[16], h[16];
    if (tm) {
        if (d->mask_diag) fwd_chunk(d, b, c0, m, L, E, 16, 1, 1, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
        else fwd_chunk(d, b, c0, m, L, E, 16, 0, 1, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
    } else {
        if (d->mask_diag) fwd_chunk(d, b, c0, m, L, E, 16, 1, 0, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
        else fwd_chunk(d, b, c0, m, L, E, 16, 0, 0, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
    }
}

static void fwdN(const vtr_dir *d, long b, long c0, lmask m, long L, long E, int N, int tm, float *out, int acc,
                 const float *z, long z_bs, long z_ls, long z_cs, float *S, long i0, v16f *hs,
                 uint16_t *out16)
{
    v16f a2[VTR_MAXN], h[VTR_MAXN];
    if (tm) {
        if (d->mask_diag) fwd_chunk(d, b, c0, m, L, E, N, 1, 1, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
        else fwd_chunk(d, b, c0, m, L, E, N, 0, 1, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
    } else {
        if (d->mask_diag) fwd_chunk(d, b, c0, m, L, E, N, 1, 0, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
        else fwd_chunk(d, b, c0, m, L, E, N, 0, 0, out, acc, z, z_bs, z_ls, z_cs, S, i0, hs, a2, h, out16);
    }
}

/* the direction's initial state of one block into hs */
static void init_state(const vtr_dir *d, long b, long c0, lmask m, long L, long E, int N, v16f *hs)
{
    if (d->h0) {
        for (int n = 0; n < N; n++) hs[n] = ld(d->h0 + (b * N + n) * E + c0, m);
    } else {
        const long first = d->reverse ? L - 1 : 0;
        v16f h0 = vb(0.0f);
        if (d->elemental) {
            const float *u0 = d->u_bf16 ? NULL : d->u + b * d->u_bs + first * d->u_ls + c0 * d->u_cs;
            if (d->u_bf16) h0 = ldh((const uint16_t *)(const void *)d->u + b * d->u_bs + first * d->u_ls + c0, m);
            else if (d->u_cs == 1) h0 = ld(u0, m);
            else for (long i = 0; i < 16 && c0 + i < E; i++) h0[i] = u0[i * d->u_cs];
        }
        for (int n = 0; n < N; n++) hs[n] = h0;
    }
}

/* MXCSR flush-to-zero + denormals-are-zero for the kernels' threads (restored after): decaying
 * states would otherwise crawl through denormal arithmetic. */
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define FTZ_ON unsigned int vtr_csr_ = _mm_getcsr(); _mm_setcsr(vtr_csr_ | 0x8040u)
#define FTZ_OFF _mm_setcsr(vtr_csr_)
#else
#define FTZ_ON do {} while (0)
#define FTZ_OFF do {} while (0)
#endif

/*
 * out [B, L, E] = SiLU(z) * sum over directions of (y_dir + D_dir * u_dir) (no gate if z is NULL).
 * S (optional, with z) receives the sum before the gate, which the backward needs.
 */
int vtr_scan_fwd(const vtr_dir *dirs, int ndir, const float *z, long z_bs, long z_ls, long z_cs, float *out,
                 int out_tm, float *S, long B, long L, long E, int N, int nthreads, uint16_t *out16)
{
    if (N < 1 || N > VTR_MAXN) return -1;
    if (nthreads < 1) nthreads = 1;
    /* one layout per call: row-major ([B, L, E], unit channel stride) or time-major (out_tm) */
    const int tm = out_tm != 0;
    for (int k = 0; k < ndir; k++) {
        const vtr_dir *d = &dirs[k];
        if (!d->dpre == !d->dt) return -6;                        /* exactly one of dpre, dt */
        if (tm ? (d->u_ls != 1 || (d->dpre && d->d_ls != 1)) : (d->u_cs != 1 || (d->dpre && d->d_cs != 1)))
            return -5;
    }
    if (z && (tm ? z_ls != 1 : z_cs != 1)) return -5;
    for (int k = 0; k < ndir; k++)
        if ((z && dirs[k].z_bf16 && tm) || (tm && (dirs[k].u_bf16 || dirs[k].bc_bf16))) return -5;  /* bf16: row-major only */
    for (int k = 0; k < ndir; k++)
        if (dirs[k].bc_bf16 && dirs[k].R > VTR_MAXN) return -7;
    if (out16 && tm) return -5;
    const long nblk = (E + 15) / 16, nck = (L + VTR_CHUNK - 1) / VTR_CHUNK;
    int fail = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_ON;
        const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
        long lo, hi;
        thread_range(B * nblk, tid, nthr, &lo, &hi);
        const long nb = hi - lo < nblk ? hi - lo : nblk;
        v16f *hs = nb > 0 ? (v16f *)aligned_alloc(64, (size_t)nb * N * sizeof(v16f)) : NULL;
        vtr_span sp;
        if (nb > 0 && !hs) {
#pragma omp atomic write
            fail = 1;
        } else {
            while (next_span(&lo, hi, nblk, &sp)) {
                const long b = sp.b;
                for (int k = 0; k < ndir; k++) {
                    const vtr_dir *d = &dirs[k];
                    const int last = k == ndir - 1;
                    for (long blk = sp.blk0; blk < sp.blk1; blk++)
                        init_state(d, b, blk * 16, lanes(E - blk * 16), L, E, N, hs + (blk - sp.blk0) * N);
                    for (long ck = 0; ck < nck; ck++)
                        for (long blk = sp.blk0; blk < sp.blk1; blk++) {
                            const long c0 = blk * 16;
                            v16f *h = hs + (blk - sp.blk0) * N;
                            if (N == 16)
                                fwd16(d, b, c0, lanes(E - c0), L, E, tm, out, k > 0, last ? z : NULL, z_bs, z_ls,
                                      z_cs, last ? S : NULL, ck * VTR_CHUNK, h, last ? out16 : NULL);
                            else
                                fwdN(d, b, c0, lanes(E - c0), L, E, N, tm, out, k > 0, last ? z : NULL, z_bs, z_ls,
                                     z_cs, last ? S : NULL, ck * VTR_CHUNK, h, last ? out16 : NULL);
                        }
                }
            }
        }
        free(hs);
        FTZ_OFF;
    }
    return fail ? -2 : 0;
}

/* per-thread accumulators of one direction */
typedef struct {
    float *dB, *dC;   /* [B, L, N] */
    float *dA;        /* [N, E] */
    float *dD, *dbias;/* [E] */
} vtr_acc;

/*
 * Backward through one chunk [i0, i0+len) of one block. Carried between chunks (in `cs`, 2N+2
 * vectors): the adjoint state g (dL/dh), the dA accumulator, and the dD and dbias accumulators.
 */
INLINE void bwd_chunk(const vtr_dir *RESTRICT d, const vtr_grad *RESTRICT g, const vtr_acc *RESTRICT pa,
                      long b, long c0, lmask m, long L, long E, const int NN, const int MASK,
                      const float *RESTRICT ds, long i0, v16f *RESTRICT cs, v16f *RESTRICT scr,
                      v16f *RESTRICT a, v16f *RESTRICT a2, v16f *RESTRICT gs, v16f *RESTRICT da,
                      v16f *RESTRICT h, v16f *RESTRICT dBv, v16f *RESTRICT dCv)
{
    const long len = L - i0 < VTR_CHUNK ? L - i0 : VTR_CHUNK;
    const long nck = (L + VTR_CHUNK - 1) / VTR_CHUNK;
    const float *ck = d->ckpt + (b * nck + i0 / VTR_CHUNK) * NN * E + c0;
    for (int n = 0; n < NN; n++) {
        a[n] = ld(d->A + n * E + c0, m);
        a2[n] = a[n] * LOG2E;
        gs[n] = cs[n];
        da[n] = cs[NN + n];
        h[n] = ld(ck + n * E, m);
    }
    v16f dDacc = cs[2 * NN], dbacc = cs[2 * NN + 1];
    const v16f Dv = d->D ? ld(d->D + c0, m) : vb(0.0f);
    const v16f bias = d->bias ? ld(d->bias + c0, m) : vb(0.0f);
    const float *u = d->u + b * d->u_bs + c0;
    const float *dp = d->dpre ? d->dpre + b * d->d_bs + c0 : NULL;
    const float *dtb = d->dt ? d->dt + b * d->t_bs : NULL, *Wt = d->dt ? d->Wt + c0 : NULL;
    const float *Bb = d->Bm + b * d->b_bs, *Cb = d->Cm + b * d->c_bs;
    const float *dsb = ds + b * L * E + c0;
    float *dub = g->du + b * L * E + c0, *ddb = g->ddpre + b * L * E + c0;
    float *pdB = pa->dB + b * L * NN, *pdC = pa->dC + b * L * NN;
    const long step = d->reverse ? -1 : 1, first = d->reverse ? L - 1 : 0;
    const int softplus = d->softplus;
    v16f *cdA = scr, *chp = scr + VTR_CHUNK * NN, *cdl = chp + VTR_CHUNK * NN, *csg = cdl + VTR_CHUNK;
    /* recompute the chunk: delta, h_{t-1} and exp(delta_t A) for each of its steps */
    long t = first + step * i0;
    for (long j = 0; j < len; j++, t += step) {
        const v16f pre = (dtb ? dt_proj(dtb + t * d->t_ls, Wt, d->R, E, m) : ld(dp + t * d->d_ls, m)) + bias;
        cdl[j] = softplus ? vsoftplus(pre) : pre;
        csg[j] = softplus ? vsigmoid(pre) : vb(1.0f);      /* d softplus / d pre */
    }
#if defined(VTR_HALVES)
    {
        /* more per-step scratch after csg (VTR_BWD_SCRATCH): u, delta*u, dy, and the state sums */
        v16f *cu = csg + VTR_CHUNK, *cdu = cu + VTR_CHUNK, *cdy = cdu + VTR_CHUNK;
        v16f *cs1 = cdy + VTR_CHUNK, *cs2 = cs1 + VTR_CHUNK;
        t = first + step * i0;
        for (long j = 0; j < len; j++, t += step) {
            cu[j] = ld(u + t * d->u_ls, m);
            cdu[j] = cdl[j] * cu[j];
            cdy[j] = ld(dsb + t * E, m);
        }
        t = first + step * i0;
        bwd_halves(NN, MASK, i0 == 0, len, cdl, cdu, cdy, cs1, cs2, cdA, chp, gs, da, h, a, a2, Bb + t * d->b_ls,
                   step * d->b_ls, Cb + t * d->c_ls, step * d->c_ls, pdB + t * NN, pdC + t * NN, step * NN);
        for (long j = 0; j < len; j++, t += step) {
            const v16f uv = cu[j], dl = cdl[j], dy = cdy[j], s1 = cs1[j];
            const v16f dpr = (s1 * uv + cs2[j]) * csg[j];
            st(dub + t * E, Dv * dy + s1 * dl, m);
            st(ddb + t * E, dpr, m);
            dDacc += dy * uv;
            dbacc += dpr;
        }
    }
#else
    t = first + step * i0;
    for (long j = 0; j < len; j++, t += step) {
        const v16f dl = cdl[j];
        const v16f du = dl * ld(u + t * d->u_ls, m);
        const float *bt = Bb + t * d->b_ls;
        v16f *cdAj = cdA + j * NN, *chpj = chp + j * NN;
VTR_UNROLL
        for (int n = 0; n < NN; n++) {
            const v16f e = vexp2_state(dl * a2[n], 0);
            cdAj[n] = e;
            chpj[n] = h[n];
            h[n] = e * h[n] + du * bt[n];
        }
    }
    /* adjoint through the chunk, last step first */
    t = first + step * (i0 + len - 1);
    for (long j = len - 1; j >= 0; j--, t -= step) {
        const v16f uv = ld(u + t * d->u_ls, m);
        const v16f dl = cdl[j];
        const v16f dy = ld(dsb + t * E, m);
        const v16f dyc = (MASK && i0 == 0 && j == 0) ? vb(0.0f) : dy;   /* dy of the C read */
        const v16f du = dl * uv;
        const float *bt = Bb + t * d->b_ls, *ct = Cb + t * d->c_ls;
        const v16f *cdAj = cdA + j * NN, *chpj = chp + j * NN;
        v16f s1a = vb(0.0f), s1b = vb(0.0f), s2a = vb(0.0f), s2b = vb(0.0f);
VTR_UNROLL
        for (int n = 0; n < NN; n++) {
            const v16f e = cdAj[n];
            const v16f rp = e * chpj[n];                 /* exp(delta A) h_{t-1} */
            v16f gh, gr;                                 /* dL/dh_t, dL/d(rp) */
            if (MASK) {
                gh = gs[n];
                gr = gh + dyc * ct[n];
                dCv[n] = dyc * rp;
            } else {
                gh = gs[n] + dy * ct[n];
                gr = gh;
                dCv[n] = dy * (rp + du * bt[n]);
            }
            dBv[n] = gh * du;
            const v16f ge = gr * rp;                     /* dL/d(delta A_n) */
            if (n & 1) { s1b += gh * bt[n]; s2b += ge * a[n]; }
            else       { s1a += gh * bt[n]; s2a += ge * a[n]; }
            da[n] += ge * dl;
            gs[n] = gr * e;                              /* dL/dh_{t-1} */
        }
        const v16f s1 = s1a + s1b, s2 = s2a + s2b;
        const v16f dpr = (s1 * uv + s2) * csg[j];
        st(dub + t * E, Dv * dy + s1 * dl, m);
        st(ddb + t * E, dpr, m);
        dDacc += dy * uv;
        dbacc += dpr;
        if (NN == 16) {
            v16f sb, sc;
            memcpy(&sb, pdB + t * 16, sizeof(sb));
            memcpy(&sc, pdC + t * 16, sizeof(sc));
            sb += tsum16(dBv);
            sc += tsum16(dCv);
            memcpy(pdB + t * 16, &sb, sizeof(sb));
            memcpy(pdC + t * 16, &sc, sizeof(sc));
        } else {
            for (int n = 0; n < NN; n++) {
                pdB[t * NN + n] += hsum(dBv[n]);
                pdC[t * NN + n] += hsum(dCv[n]);
            }
        }
    }
#endif
    for (int n = 0; n < NN; n++) {
        cs[n] = gs[n];
        cs[NN + n] = da[n];
    }
    cs[2 * NN] = dDacc;
    cs[2 * NN + 1] = dbacc;
    if (i0 == 0) {   /* the chunk holding the direction's first step: finish the block */
        if (d->h0) {
            if (g->dh0)
                for (int n = 0; n < NN; n++) st(g->dh0 + (b * NN + n) * E + c0, gs[n], m);
        } else if (d->elemental) {
            v16f s = vb(0.0f);
            for (int n = 0; n < NN; n++) s += gs[n];
            st(dub + first * E, ld(dub + first * E, m) + s, m);
        }
        for (int n = 0; n < NN; n++) st(pa->dA + n * E + c0, ld(pa->dA + n * E + c0, m) + da[n], m);
        st(pa->dD + c0, ld(pa->dD + c0, m) + dDacc, m);
        st(pa->dbias + c0, ld(pa->dbias + c0, m) + dbacc, m);
    }
}

static void bwd16(const vtr_dir *d, const vtr_grad *g, const vtr_acc *pa, long b, long c0, lmask m,
                  long L, long E, const float *ds, long i0, v16f *cs, v16f *scr)
{
    v16f a[16], a2[16], gs[16], da[16], h[16], dBv[16], dCv[16];
    if (d->mask_diag) bwd_chunk(d, g, pa, b, c0, m, L, E, 16, 1, ds, i0, cs, scr, a, a2, gs, da, h, dBv, dCv);
    else bwd_chunk(d, g, pa, b, c0, m, L, E, 16, 0, ds, i0, cs, scr, a, a2, gs, da, h, dBv, dCv);
}

static void bwdN(const vtr_dir *d, const vtr_grad *g, const vtr_acc *pa, long b, long c0, lmask m,
                 long L, long E, int N, const float *ds, long i0, v16f *cs, v16f *scr)
{
    v16f a[VTR_MAXN], a2[VTR_MAXN], gs[VTR_MAXN], da[VTR_MAXN], h[VTR_MAXN], dBv[VTR_MAXN], dCv[VTR_MAXN];
    if (d->mask_diag) bwd_chunk(d, g, pa, b, c0, m, L, E, N, 1, ds, i0, cs, scr, a, a2, gs, da, h, dBv, dCv);
    else bwd_chunk(d, g, pa, b, c0, m, L, E, N, 0, ds, i0, cs, scr, a, a2, gs, da, h, dBv, dCv);
}

/*
 * Backward of vtr_scan_fwd (without the gate: ds is the gradient of the pre-gate sum, see
 * vtr_gate_bwd). Needs the checkpoints the forward wrote. Every gradient in `grads` is written.
 */
int vtr_scan_bwd(const vtr_dir *dirs, const vtr_grad *grads, int ndir, const float *ds,
                 long B, long L, long E, int N, int nthreads)
{
    if (N < 1 || N > VTR_MAXN) return -1;
    if (ndir < 1 || ndir > 2) return -4;
    for (int k = 0; k < ndir; k++) {
        if (!dirs[k].ckpt) return -3;
        if (dirs[k].u_cs != 1 || (dirs[k].dpre && dirs[k].d_cs != 1)) return -5;   /* row-major only */
        if (!dirs[k].dpre == !dirs[k].dt) return -6;
    }
    if (nthreads < 1) nthreads = 1;
    const long nblk = (E + 15) / 16, nck = (L + VTR_CHUNK - 1) / VTR_CHUNK;
    const size_t per_dir = (size_t)(2 * B * L * N + N * E + 2 * E);
    const size_t per_thread = (size_t)ndir * per_dir;
    const size_t scr_vecs = (size_t)(2 * VTR_CHUNK * N + VTR_BWD_SCRATCH * VTR_CHUNK);
    float *priv = (float *)calloc((size_t)nthreads * per_thread, sizeof(float));
    if (!priv) return -2;
    int fail = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_ON;
        const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
        vtr_acc pa[2];
        for (int k = 0; k < ndir; k++) {
            float *base = priv + (size_t)tid * per_thread + (size_t)k * per_dir;
            pa[k].dB = base;
            pa[k].dC = base + B * L * N;
            pa[k].dA = base + 2 * B * L * N;
            pa[k].dD = pa[k].dA + N * E;
            pa[k].dbias = pa[k].dD + E;
        }
        long lo, hi;
        thread_range(B * nblk, tid, nthr, &lo, &hi);
        const long nb = hi - lo < nblk ? hi - lo : nblk;
        const size_t cs_vecs = (size_t)(2 * N + 2);
        v16f *mem = nb > 0 ? (v16f *)aligned_alloc(64, (scr_vecs + nb * cs_vecs) * sizeof(v16f)) : NULL;
        vtr_span sp;
        if (nb > 0 && !mem) {
#pragma omp atomic write
            fail = 1;
        } else {
            v16f *scr = mem, *cs = mem + scr_vecs;
            while (next_span(&lo, hi, nblk, &sp)) {
                const long b = sp.b;
                for (int k = 0; k < ndir; k++) {
                    const vtr_dir *d = &dirs[k];
                    for (long blk = sp.blk0; blk < sp.blk1; blk++) {
                        v16f *c = cs + (blk - sp.blk0) * cs_vecs;
                        const lmask m = lanes(E - blk * 16);
                        for (int n = 0; n < N; n++) {
                            c[n] = grads[k].dhlast ? ld(grads[k].dhlast + (b * N + n) * E + blk * 16, m) : vb(0.0f);
                            c[N + n] = vb(0.0f);
                        }
                        c[2 * N] = c[2 * N + 1] = vb(0.0f);
                    }
                    for (long ck = nck - 1; ck >= 0; ck--)
                        for (long blk = sp.blk0; blk < sp.blk1; blk++) {
                            const long c0 = blk * 16;
                            v16f *c = cs + (blk - sp.blk0) * cs_vecs;
                            if (N == 16)
                                bwd16(d, &grads[k], &pa[k], b, c0, lanes(E - c0), L, E, ds, ck * VTR_CHUNK, c, scr);
                            else
                                bwdN(d, &grads[k], &pa[k], b, c0, lanes(E - c0), L, E, N, ds, ck * VTR_CHUNK, c, scr);
                        }
                }
            }
        }
        free(mem);
        FTZ_OFF;
    }
    if (fail) { free(priv); return -2; }
    for (int k = 0; k < ndir; k++) {
        const vtr_grad *g = &grads[k];
        const long nbl = B * L * N;
        const float *base = priv + (size_t)k * per_dir;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (long i = 0; i < nbl; i++) {
            float sb = 0.0f, sc = 0.0f;
            for (int th = 0; th < nthreads; th++) {
                sb += base[th * per_thread + i];
                sc += base[th * per_thread + nbl + i];
            }
            g->dB[i] = sb;
            g->dC[i] = sc;
        }
        for (long i = 0; i < N * E + 2 * E; i++) {
            float s = 0.0f;
            for (int th = 0; th < nthreads; th++) s += base[th * per_thread + 2 * nbl + i];
            if (i < N * E) g->dA[i] = s;
            else if (i < N * E + E) { if (g->dD) g->dD[i - N * E] = s; }
            else if (g->dbias) g->dbias[i - N * E - E] = s;
        }
    }
    free(priv);
    return 0;
}

/* ds = dout * silu(z), dz = dout * S * silu'(z); dout, S, ds, dz contiguous [B, L, E] */
int vtr_gate_bwd(const float *dout, const float *S, const float *z, long z_bs, long z_ls, float *ds, float *dz,
                 long B, long L, long E, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const long rows = B * L;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const long b = r / L, t = r % L;
        const float *zr = z + b * z_bs + t * z_ls;
        for (long c = 0; c < E; c += 16) {
            const lmask m = lanes(E - c);
            const v16f zv = ld(zr + c, m), go = ld(dout + r * E + c, m), sv = ld(S + r * E + c, m);
            const v16f sg = vsigmoid(zv);
            st(ds + r * E + c, go * zv * sg, m);
            st(dz + r * E + c, go * sv * sg * (1.0f + zv * (1.0f - sg)), m);
        }
    }
    return 0;
}

/* ---- depthwise conv + SiLU --------------------------------------------------------------- */

/*
 * yf[t] = silu(bf + sum_k wf[k] * x[t-K+1+k])   (causal, the forward branch)
 * yb[t] = silu(bb + sum_k wb[k] * x[t+K-1-k])   (anti-causal: the backward branch's causal conv
 *                                                 on the reversed sequence, read back in place)
 * x: [B, L, E] with strides (x_bs, x_ls, 1); w: [K, E]; outputs contiguous [B, L, E].
 * wb/yb may be NULL (one direction); biases may be NULL.
 */
/* x is fp32, or bf16 when x16 (widened in registers) */
INLINE v16f conv_x(const void *xb, int x16, long i, lmask m)
{
    return x16 ? ldh((const uint16_t *)xb + i, m) : ld((const float *)xb + i, m);
}

#if defined(VTR_HALVES)
/* AVX: the sum in two ymm registers (see dt_proj) */
INLINE v16f conv_pre_x(const void *xb, int x16, long x_ls, const float *w, const float *bias, long t, long L,
                       long E, long c, int K, int dir, lmask m)
{
    const v16f b0 = bias ? ld(bias + c, m) : vb(0.0f);
    v8f a0 = (v8f)lo8(b0), a1 = (v8f)hi8(b0);
    for (int k = 0; k < K; k++) {
        const long s = dir ? t + K - 1 - k : t - K + 1 + k;
        if (s < 0 || s >= L) continue;
        const v16f wv = ld(w + k * E + c, m), xv = conv_x(xb, x16, s * x_ls + c, m);
        a0 += (v8f)lo8(wv) * (v8f)lo8(xv);
        a1 += (v8f)hi8(wv) * (v8f)hi8(xv);
    }
    return cat8((__m256)a0, (__m256)a1);
}
#else
INLINE v16f conv_pre_x(const void *xb, int x16, long x_ls, const float *w, const float *bias, long t, long L,
                       long E, long c, int K, int dir, lmask m)
{
    v16f acc = bias ? ld(bias + c, m) : vb(0.0f);
    for (int k = 0; k < K; k++) {
        const long s = dir ? t + K - 1 - k : t - K + 1 + k;
        if (s < 0 || s >= L) continue;
        acc += ld(w + k * E + c, m) * conv_x(xb, x16, s * x_ls + c, m);
    }
    return acc;
}
#endif

INLINE v16f conv_pre(const float *xb, long x_ls, const float *w, const float *bias, long t, long L, long E,
                     long c, int K, int dir, lmask m)
{
    return conv_pre_x(xb, 0, x_ls, w, bias, t, L, E, c, K, dir, m);
}

/* conv_pre with a bf16 input row (widened in registers) */
INLINE v16f conv_pre_h(const uint16_t *xb, long x_ls, const float *w, const float *bias, long t, long L, long E,
                       long c, int K, int dir, lmask m)
{
    return conv_pre_x(xb, 1, x_ls, w, bias, t, L, E, c, K, dir, m);
}

/* vtr_conv_fwd for a bf16 x (e.g. in_proj's output under bf16 autocast); fp32 weights; the outputs
 * are fp32, or bf16 with out_bf16 (what x_proj and the scan then read under autocast) */
int vtr_conv_fwd_bf16(const uint16_t *x, long x_bs, long x_ls, const float *wf, const float *bf, const float *wb,
                      const float *bb, void *yf, void *yb, long B, long L, long E, int K, int nthreads,
                      int out_bf16)
{
    if (K < 1 || K > VTR_MAXK) return -1;
    if (nthreads < 1) nthreads = 1;
    const long rows = B * L;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const long b = r / L, t = r % L;
        const uint16_t *xb = x + b * x_bs;
        for (long c = 0; c < E; c += 16) {
            const lmask m = lanes(E - c);
            v16f p = conv_pre_h(xb, x_ls, wf, bf, t, L, E, c, K, 0, m);
            if (out_bf16) sth((uint16_t *)yf + r * E + c, p * vsigmoid(p), m);
            else st((float *)yf + r * E + c, p * vsigmoid(p), m);
            if (wb) {
                p = conv_pre_h(xb, x_ls, wb, bb, t, L, E, c, K, 1, m);
                if (out_bf16) sth((uint16_t *)yb + r * E + c, p * vsigmoid(p), m);
                else st((float *)yb + r * E + c, p * vsigmoid(p), m);
            }
        }
    }
    return 0;
}

#if defined(VTR_HALVES) || defined(__AVX512F__)
#define CONV_TILE 256   /* positions per work item of conv4_window */
/* the conv window's vector: one register of channels (an 8-channel half on AVX, the whole
 * 16-channel block on AVX-512), `w` lanes of it in use (w >= its width: all) */
#if defined(VTR_HALVES)
typedef v8f cwv;
#define CW 8
INLINE cwv cw_ld(const float *p, long w) { return ld8(p, w); }
INLINE void cw_st(float *p, cwv v, long w) { st8(p, v, w); }
INLINE cwv cw_silu(cwv p) { return p * vsigmoid8(p); }
#else
typedef v16f cwv;
#define CW 16
INLINE cwv cw_ld(const float *p, long w) { return ld(p, lanes(w)); }
INLINE void cw_st(float *p, cwv v, long w) { st(p, v, lanes(w)); }
INLINE cwv cw_silu(cwv p) { return p * vsigmoid(p); }
#endif
/*
 * vtr_conv_fwd for K = 4 on AVX and AVX-512: a work item is (batch, tile of CONV_TILE positions,
 * 16-channel block); each register of its channels slides along the tile with the window
 * x[t-3 .. t+3] in registers, so each position loads one new x vector and both branches' taps
 * and biases stay in registers (the generic loop reloads all of them at every position and
 * channel block). The sums are the generic loop's, in the same order (bias, then tap 0 .. 3).
 */
static void conv4_window(const float *x, long x_bs, long x_ls, const float *wf, const float *bf, const float *wb,
                         const float *bb, float *yf, float *yb, long B, long L, long E, int nthreads)
{
    const long ntile = (L + CONV_TILE - 1) / CONV_TILE, nblk = (E + 15) / 16, items = B * ntile * nblk;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long it = 0; it < items; it++) {
        const long b = it / (ntile * nblk), tile = it / nblk % ntile, c0 = it % nblk * 16;
        const long t0 = tile * CONV_TILE, t1 = t0 + CONV_TILE < L ? t0 + CONV_TILE : L;
        const float *xb = x + b * x_bs;
        for (long c = c0; c < c0 + 16 && c < E; c += CW) {
            const long wh = E - c;
            const cwv f0 = cw_ld(wf + c, wh), f1 = cw_ld(wf + E + c, wh), f2 = cw_ld(wf + 2 * E + c, wh),
                      f3 = cw_ld(wf + 3 * E + c, wh);
            const cwv fb = bf ? cw_ld(bf + c, wh) : (cwv){0};
            cwv g0 = (cwv){0}, g1 = g0, g2 = g0, g3 = g0, gb = g0;
            if (wb) {
                g0 = cw_ld(wb + c, wh); g1 = cw_ld(wb + E + c, wh); g2 = cw_ld(wb + 2 * E + c, wh);
                g3 = cw_ld(wb + 3 * E + c, wh);
                gb = bb ? cw_ld(bb + c, wh) : (cwv){0};
            }
#define XT(T) ((T) >= 0 && (T) < L ? cw_ld(xb + (T) * x_ls + c, wh) : (cwv){0})
            /* window: xm3 .. xp3 = x[t-3] .. x[t+3] */
            cwv xm3 = XT(t0 - 3), xm2 = XT(t0 - 2), xm1 = XT(t0 - 1), x0 = XT(t0), xp1 = XT(t0 + 1), xp2 = XT(t0 + 2);
            float *of = yf + (b * L) * E + c, *ob = yb ? yb + (b * L) * E + c : NULL;
            for (long t = t0; t < t1; t++) {
                const cwv xp3 = XT(t + 3);
                cwv p = fb;                                     /* causal: tap k reads x[t-3+k] */
                p += f0 * xm3;
                p += f1 * xm2;
                p += f2 * xm1;
                p += f3 * x0;
                cw_st(of + t * E, cw_silu(p), wh);
                if (wb) {                                       /* anti-causal: tap k reads x[t+3-k] */
                    cwv q = gb;
                    q += g0 * xp3;
                    q += g1 * xp2;
                    q += g2 * xp1;
                    q += g3 * x0;
                    cw_st(ob + t * E, cw_silu(q), wh);
                }
                xm3 = xm2; xm2 = xm1; xm1 = x0; x0 = xp1; xp1 = xp2; xp2 = xp3;
            }
#undef XT
        }
    }
}
#endif

int vtr_conv_fwd(const float *x, long x_bs, long x_ls, const float *wf, const float *bf, const float *wb,
                 const float *bb, float *yf, float *yb, long B, long L, long E, int K, int nthreads)
{
    if (K < 1 || K > VTR_MAXK) return -1;
    if (nthreads < 1) nthreads = 1;
#if defined(VTR_HALVES) || defined(__AVX512F__)
    if (K == 4) {
        conv4_window(x, x_bs, x_ls, wf, bf, wb, bb, yf, yb, B, L, E, nthreads);
        return 0;
    }
#endif
    const long rows = B * L;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const long b = r / L, t = r % L;
        const float *xb = x + b * x_bs;
        for (long c = 0; c < E; c += 16) {
            const lmask m = lanes(E - c);
            v16f p = conv_pre(xb, x_ls, wf, bf, t, L, E, c, K, 0, m);
            st(yf + r * E + c, p * vsigmoid(p), m);
            if (wb) {
                p = conv_pre(xb, x_ls, wb, bb, t, L, E, c, K, 1, m);
                st(yb + r * E + c, p * vsigmoid(p), m);
            }
        }
    }
    return 0;
}

INLINE v16f dsilu(v16f p)
{
    const v16f sg = vsigmoid(p);
    return sg * (1.0f + p * (1.0f - sg));
}

/*
 * Backward of vtr_conv_fwd: gyf/gyb are the gradients of yf/yb (contiguous); dx (contiguous
 * [B, L, E]) is written, dw [K, E] and db [E] are written (summed over batch and positions).
 */
int vtr_conv_bwd(const float *x, long x_bs, long x_ls, const float *wf, const float *bf, const float *wb,
                 const float *bb, const float *gyf, const float *gyb, float *dx, float *dwf, float *dbf,
                 float *dwb, float *dbb, long B, long L, long E, int K, int nthreads)
{
    if (K < 1 || K > VTR_MAXK) return -1;
    if (nthreads < 1) nthreads = 1;
    const int ndir = wb ? 2 : 1;
    const long nblk = (L + VTR_CONV_T - 1) / VTR_CONV_T, items = B * nblk;
    const size_t per_thread = (size_t)ndir * (K + 1) * E;
    const size_t span = VTR_CONV_T + K - 1;
    float *priv = (float *)calloc((size_t)nthreads * per_thread, sizeof(float));
    float *scr = (float *)malloc((size_t)nthreads * ndir * span * E * sizeof(float));
    if (!priv || !scr) { free(priv); free(scr); return -2; }
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        float *pw = priv + (size_t)tid * per_thread;
        float *gf = scr + (size_t)tid * ndir * span * E, *gb = gf + span * E;
#pragma omp for schedule(static)
        for (long it = 0; it < items; it++) {
            const long b = it / nblk, t0 = (it % nblk) * VTR_CONV_T;
            const long t1 = t0 + VTR_CONV_T < L ? t0 + VTR_CONV_T : L;
            const float *xb = x + b * x_bs;
            /* gradients at the conv outputs, over the rows this block's dx depends on */
            const long ff = t0, fl = t1 + K - 1 < L ? t1 + K - 1 : L;      /* forward: [t0, t1+K-1) */
            const long bf0 = t0 - K + 1 > 0 ? t0 - K + 1 : 0, bl = t1;       /* backward: [t0-K+1, t1) */
            for (long t = ff; t < fl; t++)
                for (long c = 0; c < E; c += 16) {
                    const lmask m = lanes(E - c);
                    const v16f p = conv_pre(xb, x_ls, wf, bf, t, L, E, c, K, 0, m);
                    st(gf + (t - ff) * E + c, ld(gyf + (b * L + t) * E + c, m) * dsilu(p), m);
                }
            if (ndir == 2)
                for (long t = bf0; t < bl; t++)
                    for (long c = 0; c < E; c += 16) {
                        const lmask m = lanes(E - c);
                        const v16f p = conv_pre(xb, x_ls, wb, bb, t, L, E, c, K, 1, m);
                        st(gb + (t - bf0) * E + c, ld(gyb + (b * L + t) * E + c, m) * dsilu(p), m);
                    }
            for (long s = t0; s < t1; s++)
                for (long c = 0; c < E; c += 16) {
                    const lmask m = lanes(E - c);
                    v16f acc = vb(0.0f);
                    for (int k = 0; k < K; k++) {
                        const long tf = s + K - 1 - k;         /* yf[tf] reads x[s] with wf[k] */
                        if (tf < L) acc += ld(wf + k * E + c, m) * ld(gf + (tf - ff) * E + c, m);
                        if (ndir == 2) {
                            const long tb = s - K + 1 + k;     /* yb[tb] reads x[s] with wb[k] */
                            if (tb >= 0) acc += ld(wb + k * E + c, m) * ld(gb + (tb - bf0) * E + c, m);
                        }
                    }
                    st(dx + (b * L + s) * E + c, acc, m);
                }
            /* weight and bias gradients over this block's own rows */
            for (int dir = 0; dir < ndir; dir++) {
                float *dw = pw + (size_t)dir * (K + 1) * E, *dbias = dw + K * E;
                const float *gg = dir ? gb : gf;
                const long off = dir ? bf0 : ff;
                for (long c = 0; c < E; c += 16) {
                    const lmask m = lanes(E - c);
                    v16f accb = ld(dbias + c, m);
                    v16f accw[VTR_MAXK];
                    for (int k = 0; k < K; k++) accw[k] = ld(dw + k * E + c, m);
                    for (long t = t0; t < t1; t++) {
                        const v16f gv = ld(gg + (t - off) * E + c, m);
                        accb += gv;
                        for (int k = 0; k < K; k++) {
                            const long s = dir ? t + K - 1 - k : t - K + 1 + k;
                            if (s >= 0 && s < L) accw[k] += gv * ld(xb + s * x_ls + c, m);
                        }
                    }
                    st(dbias + c, accb, m);
                    for (int k = 0; k < K; k++) st(dw + k * E + c, accw[k], m);
                }
            }
        }
    }
    for (int dir = 0; dir < ndir; dir++) {
        float *dw = dir ? dwb : dwf, *dbias = dir ? dbb : dbf;
        for (long i = 0; i < (K + 1) * E; i++) {
            float s = 0.0f;
            for (int th = 0; th < nthreads; th++) s += priv[(size_t)th * per_thread + (size_t)dir * (K + 1) * E + i];
            if (i < K * E) dw[i] = s;
            else if (dbias) dbias[i - K * E] = s;
        }
    }
    free(priv);
    free(scr);
    return 0;
}

/* ---- layout change for the [B, D, L] API ------------------------------------------------- */

/* dst[b, y, x] = src[b, x, y]; src rows have unit stride (src + b*s_bs + x*s_xs + y), dst is
 * contiguous [B, Y, X]. 16x16 tiles, transposed in registers. */
int vtr_transpose(const float *src, long s_bs, long s_xs, float *dst, long B, long X, long Y, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const long tx = (X + 15) / 16, ty = (Y + 15) / 16, tiles = B * tx * ty;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long it = 0; it < tiles; it++) {
        const long b = it / (tx * ty), x0 = (it / ty) % tx * 16, y0 = it % ty * 16;
        const long nx = X - x0 < 16 ? X - x0 : 16, ny = Y - y0 < 16 ? Y - y0 : 16;
        const lmask my = lanes(ny), mx = lanes(nx);
        v16f r[16];
VTR_UNROLL
        for (int i = 0; i < 16; i++) r[i] = i < nx ? ld(src + b * s_bs + (x0 + i) * s_xs + y0, my) : vb(0.0f);
        transpose16(r);
        for (int j = 0; j < ny; j++) st(dst + (b * Y + y0 + j) * X + x0, r[j], mx);
    }
    return 0;
}
