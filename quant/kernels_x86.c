/* codelm's own x86 kernels: int8 or int4 weights times int8 activations, for CPUs whose torch
 * has no fast weight-only path (AVX2 without bf16 hardware; docs/quant.md, "Native kernels").
 *
 * y[m, n] = x[m, k] @ w[n, k].T with x quantised on the fly in blocks of 32 values (one float
 * scale each, absmax / 127), so each block's dot product is exact in int32 and only x's
 * rounding is new error. w is int8 scaled (fp16) per output channel or per group of 32 or more
 * (GGUF Q8_0's blocks), or int4 as (q - 8) * scale + zero per group (GGUF Q4_0 / Q4_1).
 *
 * The same file holds what runs around them: SwiGLU, causal attention for prompts, a prefill
 * GEMM on a tiled copy of the weights (AVX-512 VNNI, or 256-bit code; SwiGLU in its
 * epilogue), and a whole
 * decode step of llama-family blocks, whose RMSNorm and RoPE also serve prompts' rows.
 *
 * Built by native.py with the machine's own compiler (-O3 -march=native -fopenmp) and called
 * through ctypes; OpenMP resolves to the libgomp torch has loaded, so both share one pool. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__F16C__)
#error "codelm's native kernel needs AVX2 and F16C"
#endif

/* PARTS: native.py compiles this file three times at once, as the objects of one library:
 * with -DCODELM_PART=1 all but the prefill tiles, with 2 the tiles' GEMMs, with 3 their
 * sub-scaled kernel; the tile kernels, built for every kind of weight and every row count of a
 * call's last group, are most of the compile. What stands outside the #if blocks every part
 * takes (static inline helpers, each part compiling its own copy of those it uses); HIDDEN
 * functions are called across parts. */
#if !defined(CODELM_PART) || CODELM_PART < 1 || CODELM_PART > 3
#error "build kernels_x86.c as its parts: -DCODELM_PART=1, 2 and 3 (native.py does)"
#endif
#define HIDDEN __attribute__((visibility("hidden"))) /* one part's function the other calls */

#define BLOCK 32
/* The row kernels ask for the weight bytes this far ahead where a row is shorter: int4 rows of
 * K = 896 (448 bytes) otherwise wait on memory at each row's first load, the hardware
 * prefetcher not running far enough ahead of short rows (docs/quant.md, "Native kernels"). */
#define PREFETCH_BYTES 2048

#if CODELM_PART == 1
int codelm_kernels_abi(void) { return 28; }
#endif

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The sum of v's lanes, wrapping as the hardware adds: a block of x holding NaN or infinity
 * converts to INT_MIN in every lane, whose sum overflows (undefined in C, as a reduction in
 * signed vector arithmetic or through float and back). */
static inline int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* One block of x: q[32] = round(x / d), d = absmax / 127 (0 for a block of zeros), returned;
 * *qsum gets the sum of q and, where `sum` is given, *sum the float sum of x. The prompt's tile
 * kernel and the row kernels both quantise x through this, so they see the same numbers.
 * With AVX-512 the block is two registers and vpmovsdb narrows to bytes in one step. */
#if defined(__AVX512F__)
static inline float quantize_block(const float *src, int8_t *q, int32_t *qsum, float *sum)
{
    const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
    const float d =
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    const __m512i n0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i n1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)); /* ties to even */
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(n0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(n1));
    const __m512i n = _mm512_add_epi32(n0, n1);
    *qsum = hsum_epi32(
        _mm256_add_epi32(_mm512_castsi512_si256(n), _mm512_extracti64x4_epi64(n, 1)));
    if (sum)
        *sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    return d;
}
#else
static inline float quantize_block(const float *src, int8_t *q, int32_t *qsum, float *sum)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(src + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float d = hmax(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i n[4];
    for (int i = 0; i < 4; i++)
        n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* to nearest, ties to even */
    /* packs work within 128-bit lanes: the bytes come out as dwords 0 4 1 5 2 6 3 7 */
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                              _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(
                                          packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i nsum =
        _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    *qsum = hsum_epi32(nsum);
    if (sum)
        *sum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    return d;
}
#endif

/* x [rows, k] -> xq [rows, k] int8, xd [rows, k / BLOCK]: scale per block of 32. Where xsum
 * and xqsum are given, also per block: the float sum of x, and xd times the sum of xq (for
 * int4's zero points and its -8 offset). */
static void quantize_blocks(const float *x, int64_t blocks, int8_t *xq, float *xd, float *xsum,
                            float *xqsum)
{
    for (int64_t b = 0; b < blocks; b++) {
        int32_t qsum;
        xd[b] = quantize_block(x + b * BLOCK, xq + b * BLOCK, &qsum, xsum ? xsum + b : NULL);
        if (xqsum)
            xqsum[b] = xd[b] * (float)qsum;
    }
}

/* vpdpbusd on 256-bit registers: AVX-VNNI, or AVX-512 VNNI with VL */
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define HAS_DPBUSD_256 1
#else
#define HAS_DPBUSD_256 0
#endif

static inline __m256i widen(__m256i pairs, short by) /* 16-bit pair sums * by, as int32 */
{
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(by));
}

/* Per int32 lane, the sum of its 4 products of unsigned bytes u and signed bytes s; without
 * VNNI through 16-bit pair sums, so each pair of products must fit in int16. */
static inline __m256i dot4(__m256i u, __m256i s)
{
#if HAS_DPBUSD_256
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return widen(_mm256_maddubs_epi16(u, s), 1);
#endif
}

/* 32 int8 products summed in 8 int32 lanes. maddubs takes unsigned x signed bytes, so w's sign
 * moves onto x: |w| <= 128 and |x| <= 127 keep each pair sum within int16. */
static inline __m256i dot32(const int8_t *w, const int8_t *x)
{
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    return dot4(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
}

/* The 32 nibbles of 16 bytes (element j in the low nibble of byte j, element j + 16 in its
 * high nibble, as Int4Native repacks int4) as 32 bytes 0..15. Both lanes load the 16 bytes;
 * the upper one shifts a nibble. */
static inline __m256i unpack_q4(const uint8_t *w)
{
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w));
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(both, shift), _mm256_set1_epi8(0x0F));
}

/* 32 int4 weights times 32 int8 x, as 8 int32 lanes; q is 0..15 so maddubs takes it as it
 * is. */
static inline __m256i dot32_q4(const uint8_t *w, const int8_t *x)
{
    return dot4(unpack_q4(w), _mm256_loadu_si256((const __m256i *)x));
}

/* q (0 .. 31) of 32 int8 weights that fit in 5 bits (GGUF Q5_0's, w = q - 16), as
 * codelm_pack_q5 packs a block in 20 bytes: the low 4 bits as unpack_q4's nibbles, then a word
 * of fifth bits. With AVX-512 (BW, VL) bit j is element j's and the word is a mask under
 * which one add puts 16 on those bytes; on AVX2 the bits are in the order that one shift per
 * lane lifts to the sign bits of its bytes (bit 8r + i for byte r of lane i), where a blend
 * adds them. */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define FIFTH_BITS_IN_ORDER 1
static inline __m256i unpack_q5(const uint8_t *w)
{
    const __m256i low = unpack_q4(w);
    __mmask32 fifth;
    memcpy(&fifth, w + BLOCK / 2, sizeof fifth);
    return _mm256_mask_add_epi8(low, fifth, low, _mm256_set1_epi8(0x10));
}
#else
#define FIFTH_BITS_IN_ORDER 0
static inline __m256i unpack_q5(const uint8_t *w)
{
    const __m256i low = unpack_q4(w);
    int32_t bits;
    memcpy(&bits, w + BLOCK / 2, sizeof bits);
    const __m256i set = _mm256_sllv_epi32(_mm256_set1_epi32(bits),
                                          _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
    return _mm256_blendv_epi8(low, _mm256_or_si256(low, _mm256_set1_epi8(0x10)), set);
}
#endif

/* q . x for 32 int8 x as 8 int32 lanes (the caller subtracts 16 times the sum of x) */
static inline __m256i dot32_q5(const uint8_t *w, const int8_t *x)
{
    return dot4(unpack_q5(w), _mm256_loadu_si256((const __m256i *)x));
}

/* The fifth bits of a block of q (bit 4 of each byte) in unpack_q5's order: q << 3 lifts them
 * to the sign bits, whose mask has element j's bit at j; without AVX-512 element j = 4 i + r
 * goes to bit 8 r + i. */
static inline uint32_t fifth_bits(__m256i q)
{
    const uint32_t plain = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(q, 3));
    if (FIFTH_BITS_IN_ORDER)
        return plain;
    uint32_t out = 0;
    for (int j = 0; j < BLOCK; j++)
        out |= ((plain >> j) & 1u) << (8 * (j % 4) + j / 4);
    return out;
}

#define INLINE static inline __attribute__((always_inline))

/* How a row-major weight holds its blocks of 32: int8 bytes, int4 nibbles (dot32_q4) with
 * zeros, or int8 in 5 bits (dot32_q5: 20 bytes). */
enum { FMT_Q8 = 0, FMT_Q4 = 1, FMT_Q5 = 2 };
static inline int64_t block_bytes(int fmt) { return fmt == FMT_Q8 ? 32 : fmt == FMT_Q4 ? 16 : 20; }

/* Weight block b times x's block b scaled and added to acc; fmt is a constant at each call
 * site, so the compiler builds a copy of every loop below for each format. */
INLINE __m256 fma_block(const void *w, int64_t b, const int8_t *x, float scale, __m256 acc,
                        int fmt)
{
    const uint8_t *wb = (const uint8_t *)w + b * block_bytes(fmt);
    const __m256i dot = fmt == FMT_Q4   ? dot32_q4(wb, x + b * BLOCK)
                        : fmt == FMT_Q5 ? dot32_q5(wb, x + b * BLOCK)
                                        : dot32((const int8_t *)wb, x + b * BLOCK);
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(dot), acc);
}

/* sum over blocks of c[b] * (w . x)_b, c holding each block's two scales multiplied. Four
 * independent accumulators keep blocks in flight (one chain waits on every fmadd). */
INLINE float dot_scaled(const void *w, const float *c, const int8_t *xq, int64_t blocks, int fmt)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) {
        a0 = fma_block(w, b, xq, c[b], a0, fmt);
        a1 = fma_block(w, b + 1, xq, c[b + 1], a1, fmt);
        a2 = fma_block(w, b + 2, xq, c[b + 2], a2, fmt);
        a3 = fma_block(w, b + 3, xq, c[b + 3], a3, fmt);
    }
    for (; b < blocks; b++)
        a0 = fma_block(w, b, xq, c[b], a0, fmt);
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* sum over groups of ws[g] * sum over the group's blocks of xd[b] * (w . x)_b: groups of 64
 * and more, one per row included. */
INLINE float dot_grouped(const void *w, const float *ws, int64_t per_group, const int8_t *xq,
                         const float *xd, int64_t blocks, int fmt)
{
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; b < blocks; g++) {
        const int64_t end = b + per_group;
        __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
        for (; b + 2 <= end; b += 2) {
            g0 = fma_block(w, b, xq, xd[b], g0, fmt);
            g1 = fma_block(w, b + 1, xq, xd[b + 1], g1, fmt);
        }
        if (b < end) {
            g0 = fma_block(w, b, xq, xd[b], g0, fmt);
            b++;
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(ws[g]), _mm256_add_ps(g0, g1), acc);
    }
    return hsum(acc);
}

/* Groups of 32: c[b] = scale[b] * xd[b] (scales fp16). Where w = q - center (int4: 8, with
 * zeros; 5-bit int8: 16) also returns the row's offset, the sum of zero[b] * sx[b] - center *
 * scale[b] * sq[b]; 8 blocks a step. */
static float block_scales(const uint16_t *ws, const uint16_t *wz, float center, const float *xd,
                          const float *sx, const float *sq, int64_t blocks, float *c)
{
    __m256 off = _mm256_setzero_ps();
    float tail = 0.0f;
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + b)));
        _mm256_storeu_ps(c + b, _mm256_mul_ps(s, _mm256_loadu_ps(xd + b)));
        if (wz) {
            const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wz + b)));
            off = _mm256_fmadd_ps(z, _mm256_loadu_ps(sx + b), off);
        }
        if (center != 0.0f) {
            const __m256 sc = _mm256_mul_ps(s, _mm256_set1_ps(center));
            off = _mm256_fnmadd_ps(sc, _mm256_loadu_ps(sq + b), off);
        }
    }
    for (; b < blocks; b++) {
        const float s = _cvtsh_ss(ws[b]);
        c[b] = s * xd[b];
        if (wz)
            tail += _cvtsh_ss(wz[b]) * sx[b];
        if (center != 0.0f)
            tail -= center * s * sq[b];
    }
    return center != 0.0f ? hsum(off) + tail : 0.0f;
}

static void fp16_to_fp32(const uint16_t *src, float *dst, int64_t count)
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < count; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

/* sum of a[i] * b[i], 8 lanes at a time */
static float dot_f32(const float *a, const float *b, int64_t count)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < count; i++)
        sum += a[i] * b[i];
    return sum;
}

/* The m outputs of weight row r: per-row fp16 scales (and int4 zeros) become float once, in
 * this thread's scratch. For int4, sx / sq are x's per-group sums (see linear). */
INLINE void weight_row(const void *wr, const uint16_t *ws, const uint16_t *wz, int64_t groups,
                       int64_t blocks, int64_t m, int64_t n, const int8_t *xq, const float *xd,
                       const float *sx, const float *sq, float *scratch, float *y, int fmt)
{
    const int64_t k = blocks * BLOCK;
    const int q4 = fmt == FMT_Q4;
    const float center = q4 ? 8.0f : fmt == FMT_Q5 ? 16.0f : 0.0f;
    if (groups == blocks) { /* groups of 32: GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 */
        for (int64_t i = 0; i < m; i++) {
            const float *xdi = xd + i * blocks;
            const float off = fmt == FMT_Q8
                                  ? block_scales(ws, NULL, 0.0f, xdi, NULL, NULL, blocks, scratch)
                                  : block_scales(ws, wz, center, xdi, sx + i * groups,
                                                 sq + i * groups, blocks, scratch);
            y[i * n] = dot_scaled(wr, scratch, xq + i * k, blocks, fmt) + off;
        }
        return;
    }
    float *scale = scratch, *zero = scratch + groups;
    fp16_to_fp32(ws, scale, groups);
    if (q4)
        fp16_to_fp32(wz, zero, groups);
    for (int64_t i = 0; i < m; i++) {
        float off = q4 ? dot_f32(zero, sx + i * groups, groups) : 0.0f;
        if (center != 0.0f)
            off -= center * dot_f32(scale, sq + i * groups, groups);
        y[i * n] = dot_grouped(wr, scale, blocks / groups, xq + i * k, xd + i * blocks, blocks,
                               fmt) +
                   off;
    }
}

/* Floats rounded up to whole 64-byte lines, so threads' scratch never shares a line. */
static int64_t padded(int64_t floats) { return (floats + 15) / 16 * 16; }

/* In the prefill part (PARTS), called by linear() below. */
HIDDEN int rows_tiled(const float *x, int64_t m, int64_t k, const void *w, const uint16_t *ws,
                      const uint16_t *wz, int64_t group, int64_t n, int fmt, float *y,
                      int32_t offset, int swiglu, int nthreads);

#if CODELM_PART == 1 /* (see PARTS above) */
/* y [m, n] = x [m, k] @ w.T for w [n, k] in `fmt`: int8 (FMT_Q8), repacked int4 [n, k / 2]
 * with zeros wz (FMT_Q4) or int8 in 5 bits [n, k / 32 * 20] (FMT_Q5); fp16 scales (and zeros)
 * [n, k / group]. `offset`: what int8 w takes to be unsigned in the tile kernel (16 where every
 * w is in -16 .. 15, as always in 5 bits, else 128; int4: 8). From `tiled_from`
 * rows of x the tile kernel runs it (rows_tiled), where the channels come in whole tiles of
 * 16; below, weight row by weight row (calibration measures where one overtakes the other).
 * Returns 0, or -1 when the shape does not fit blocks of 32 or memory for scratch is short. */
static int linear(const float *x, int64_t m, int64_t k, const void *w, const uint16_t *ws,
                  const uint16_t *wz, int64_t group, int64_t n, int fmt, float *y,
                  int32_t offset, int64_t tiled_from, int nthreads)
{
    const int q4 = fmt == FMT_Q4;
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || nthreads < 1 ||
        q4 != (wz != NULL))
        return -1;
    if (m >= tiled_from && n % 16 == 0)
        return rows_tiled(x, m, k, w, ws, wz, group, n, fmt, y,
                          q4 ? 8 : fmt == FMT_Q5 ? 16 : offset, 0, nthreads);
    const int64_t blocks = k / BLOCK, groups = k / group, per_group = group / BLOCK;
    const int64_t row_bytes = blocks * block_bytes(fmt), per_thread = padded(blocks + groups);
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc((size_t)(m * blocks) * sizeof(float));
    /* int4 and 5-bit int8: per block, then per group, the sum of x (meets int4's zero) and xd
     * times the sum of xq (meets the -8 or -16). */
    const int centred = fmt != FMT_Q8;
    float *sums = centred ? calloc((size_t)(m * (blocks + groups)) * 2, sizeof(float)) : NULL;
    /* Heap, not stack: an array sized for the largest K would be probed page by page. */
    float *scratch = aligned_alloc(64, (size_t)(nthreads * per_thread) * sizeof(float));
    if (!xq || !xd || (centred && !sums) || !scratch) {
        free(xq);
        free(xd);
        free(sums);
        free(scratch);
        return -1;
    }
    float *bx = sums, *bq = centred ? sums + m * blocks : NULL;
    float *sx = centred ? sums + 2 * m * blocks : NULL, *sq = centred ? sx + m * groups : NULL;
    quantize_blocks(x, m * blocks, xq, xd, bx, bq);
    for (int64_t b = 0; centred && b < m * blocks; b++) {
        sx[b / per_group] += bx[b]; /* a row of x has whole groups: b / per_group is global */
        sq[b / per_group] += bq[b];
    }
    /* Rows of w outer: each weight row is read from memory once and reused for all m rows. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float *mine = scratch + omp_get_thread_num() * per_thread;
        const char *wr = (const char *)w + r * row_bytes;
        if (row_bytes < PREFETCH_BYTES && (r + 1) * row_bytes + PREFETCH_BYTES <= n * row_bytes)
            for (int64_t off = 0; off < row_bytes; off += 64)
                _mm_prefetch(wr + PREFETCH_BYTES + off, _MM_HINT_T0);
        if (q4)
            weight_row(wr, ws + r * groups, wz + r * groups, groups, blocks, m, n, xq, xd, sx, sq,
                       mine, y + r, FMT_Q4);
        else if (fmt == FMT_Q5)
            weight_row(wr, ws + r * groups, NULL, groups, blocks, m, n, xq, xd, sx, sq, mine,
                       y + r, FMT_Q5);
        else
            weight_row(wr, ws + r * groups, NULL, groups, blocks, m, n, xq, xd, NULL, NULL,
                       mine, y + r, FMT_Q8);
    }
    free(xq);
    free(xd);
    free(sums);
    free(scratch);
    return 0;
}

/* int8 w [n, k], scaled per output channel (group k) or per group of 32 or more; offset as
 * for linear. */
int codelm_q8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const uint16_t *ws,
                     int64_t group, int64_t n, int32_t offset, int64_t tiled_from, float *y,
                     int nthreads)
{
    return offset == 16 || offset == 128
               ? linear(x, m, k, w, ws, NULL, group, n, FMT_Q8, y, offset, tiled_from, nthreads)
               : -1;
}

/* int4 w [n, k / 2] (see dot32_q4): w = (q - 8) * scale + zero per group. */
int codelm_q4_linear(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *ws,
                     const uint16_t *wz, int64_t group, int64_t n, int64_t tiled_from, float *y,
                     int nthreads)
{
    return linear(x, m, k, w, ws, wz, group, n, FMT_Q4, y, 8, tiled_from, nthreads);
}

/* out [n, k / 32 * 20] = int8 w [n, k] in 5 bits, as codelm_q5_linear takes it: per block of
 * 32, q = w + 16 as 16 bytes of nibbles (element j low in byte j, element j + 16 high), then
 * its fifth bits in a word (fifth_bits). Returns 0, or -1 where some w is not in -16 .. 15. */
static int pack_q5_block(const int8_t *w, uint8_t *dst)
{
    const __m256i q =
        _mm256_add_epi8(_mm256_loadu_si256((const __m256i *)w), _mm256_set1_epi8(16));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(_mm256_castsi256_si128(q), nibble);
    const __m128i high = _mm_and_si128(_mm256_extracti128_si256(q, 1), nibble);
    _mm_storeu_si128((__m128i *)dst, _mm_or_si128(low, _mm_slli_epi16(high, 4)));
    const uint32_t fifth = fifth_bits(q);
    memcpy(dst + 16, &fifth, sizeof fifth);
    return !_mm256_testz_si256(q, _mm256_set1_epi8((char)0xE0));
}

int codelm_pack_q5(const int8_t *w, int64_t n, int64_t k, uint8_t *out, int nthreads)
{
    if (k % BLOCK != 0 || nthreads < 1)
        return -1;
    const int64_t blocks = n * (k / BLOCK);
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad)
    for (int64_t b = 0; b < blocks; b++)
        bad |= pack_q5_block(w + b * BLOCK, out + b * 20);
    return bad ? -1 : 0;
}

/* out [count, k] = rows ids of a table codelm_pack_q5 packed ([n, k / 32 * 20] bytes, fp16
 * scales [n, k / group]), dequantised: (q - 16) * scale, GGUF Q5_0's values. An embedding
 * lookup (QuantizedEmbedding), so rows go to threads only where there are many. Returns 0,
 * or -1 for an id outside 0 .. n - 1 or a shape that does not fit. */
int codelm_q5_rows(const uint8_t *w, const uint16_t *ws, int64_t n, int64_t k, int64_t group,
                   const int64_t *ids, int64_t count, float *out, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || nthreads < 1)
        return -1;
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n)
            return -1;
    const int64_t blocks = k / BLOCK, groups = k / group;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count >= 64)
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *row = w + ids[i] * blocks * 20;
        for (int64_t b = 0; b < blocks; b++) {
            int8_t q[BLOCK];
            _mm256_storeu_si256((__m256i *)q,
                                _mm256_sub_epi8(unpack_q5(row + b * 20), _mm256_set1_epi8(16)));
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(ws[ids[i] * groups + b * BLOCK / group]));
            float *dst = out + i * k + b * BLOCK;
            for (int j = 0; j < BLOCK; j += 8) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)));
                _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
            }
        }
    }
    return 0;
}

/* 0x10 in byte j where bit j of `bits` is set, else 0 */
static inline __m256i bits_as_16s(uint32_t bits)
{
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10));
#else
    const __m256i spread = _mm256_shuffle_epi8( /* byte j of the word in bytes 8j .. 8j + 7 */
        _mm256_set1_epi32((int)bits),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
#endif
}

/* GGUF Q8_0 (kind 8: fp16 d, 32 int8) or Q5_0 (kind 5: fp16 d, a word whose bit j is element
 * j's fifth bit, 16 bytes of nibbles as unpack_q4 takes them; w = (q - 16) d) blocks as int8
 * q [blocks * 32] and float d [blocks] (quant/gguf_repack.py; numpy took ~1 s for the default
 * model's tensors). Returns -1 for another kind. */
int codelm_unpack_gguf_int8(const uint8_t *src, int64_t blocks, int kind, int8_t *q, float *d,
                            int nthreads)
{
    if ((kind != 8 && kind != 5) || nthreads < 1)
        return -1;
    const int64_t size = kind == 8 ? 34 : 22;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = src + b * size;
        uint16_t half;
        memcpy(&half, block, sizeof half);
        d[b] = _cvtsh_ss(half);
        if (kind == 8) {
            memcpy(q + b * BLOCK, block + 2, BLOCK);
            continue;
        }
        uint32_t fifth;
        memcpy(&fifth, block + 2, sizeof fifth);
        const __m256i value = _mm256_or_si256(unpack_q4(block + 6), bits_as_16s(fifth));
        _mm256_storeu_si256((__m256i *)(q + b * BLOCK),
                            _mm256_sub_epi8(value, _mm256_set1_epi8(16)));
    }
    return 0;
}

/* int8 w in 5 bits [n, k / 32 * 20] (codelm_pack_q5), fp16 scales per group. */
int codelm_q5_linear(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *ws,
                     int64_t group, int64_t n, int64_t tiled_from, float *y, int nthreads)
{
    return linear(x, m, k, w, ws, NULL, group, n, FMT_Q5, y, 16, tiled_from, nthreads);
}

/* ---- A head's shortlist: the rows that can hold one of the two largest logits ----
 * (quant/cpu.py, Int8Shortlist) From int8 w [n, k] with fp16 scales ws per group: out, as
 * codelm_pack_q5 packs it, holds high = round(w / 8) (halves up, at most 15), so w = 8 high
 * + low with low in -4 .. 3 (to 7 where w > 123). bound[r] bounds, per unit of |x|, how far
 * row r's int8 logit (codelm_q8_linear) can be from 8 times its logit from high
 * (codelm_q5_linear), x quantised as both quantise it: |low . x| <= |low| |x| (scaled), plus
 * `rounding` times the magnitudes each kernel's float sums can reach: |w| |x| for int8's,
 * and for int5's 8 (|high + 16| + 16 |block sums of x| <= 16 sqrt(group) |scales|) |x|. */
int codelm_pack_shortlist(const int8_t *w, const uint16_t *ws, int64_t n, int64_t k,
                          int64_t group, float rounding, uint8_t *out, float *bound, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || nthreads < 1)
        return -1;
    const int64_t groups = k / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        double low2 = 0.0, w2 = 0.0, high2 = 0.0, scale2 = 0.0;
        for (int64_t g = 0; g < groups; g++) {
            const double s = _cvtsh_ss(ws[r * groups + g]);
            int64_t l = 0, q = 0, h = 0;
            for (int64_t b = g * group; b < (g + 1) * group; b += BLOCK) {
                const int8_t *src = w + r * k + b;
                int8_t high[BLOCK];
                for (int j = 0; j < BLOCK; j++) {
                    const int v = src[j], hv = (v + 132) / 8 - 16; /* floor((v + 4) / 8) */
                    high[j] = (int8_t)(hv > 15 ? 15 : hv);
                    l += (v - 8 * high[j]) * (v - 8 * high[j]);
                    q += v * v;
                    h += (high[j] + 16) * (high[j] + 16);
                }
                pack_q5_block(high, out + (r * k + b) / BLOCK * 20);
            }
            low2 += s * s * (double)l;
            w2 += s * s * (double)q;
            high2 += s * s * (double)h;
            scale2 += s * s;
        }
        const double magnitude =
            sqrt(w2) + 8.0 * (sqrt(high2) + 16.0 * sqrt((double)group * scale2));
        bound[r] = (float)((sqrt(low2) + rounding * magnitude) * (1.0 + 1e-6));
    }
    return 0;
}

/* a [n]: codelm_q5_linear's logits from high, times `times` (8) here. Rewrites a as upper
 * bounds of the int8 logits (a + bound * |x|, |x| taken to cover its quantised blocks) and
 * writes to idx, in order, the rows whose bound reaches the second largest lower bound (a -
 * bound * |x|): any row left out is below two others. Returns how many; fewer than 2 where
 * x holds NaN or inf. */
int64_t codelm_shortlist(float *a, float times, const float *bound, const float *x, int64_t k,
                         int64_t n, int32_t *idx)
{
    double x2 = 0.0;
    for (int64_t i = 0; i < k; i++)
        x2 += (double)x[i] * x[i];
    /* Quantised per block of 32, each value moves by at most half a step, absmax / 254 (and
     * a rounding of 1 / d): |x quantised| <= (1 + sqrt(32) / 254) |x|, with room to spare. */
    const float reach = (float)(sqrt(x2) * (1.0 + sqrt(32.0) / 254.0) * (1.0 + 1e-5));
    const __m256 t = _mm256_set1_ps(times), rx = _mm256_set1_ps(reach);
    __m256 first = _mm256_set1_ps(-INFINITY), second = first;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(a + i), t);
        const __m256 low = _mm256_fnmadd_ps(_mm256_loadu_ps(bound + i), rx, v);
        second = _mm256_max_ps(second, _mm256_min_ps(first, low));
        first = _mm256_max_ps(first, low);
        _mm256_storeu_ps(a + i, v);
    }
    float top[16];
    _mm256_storeu_ps(top, first);
    _mm256_storeu_ps(top + 8, second);
    float one = -INFINITY, two = -INFINITY;
    for (int j = 0; j < 16; j++) {
        two = fmaxf(two, fminf(one, top[j]));
        one = fmaxf(one, top[j]);
    }
    for (; i < n; i++) {
        a[i] *= times;
        const float low = a[i] - bound[i] * reach;
        two = fmaxf(two, fminf(one, low));
        one = fmaxf(one, low);
    }
    const __m256 cut = _mm256_set1_ps(two);
    int64_t count = 0;
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(bound + i), rx, _mm256_loadu_ps(a + i));
        _mm256_storeu_ps(a + i, v);
        unsigned reach_top = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, cut, _CMP_GE_OQ));
        for (; reach_top; reach_top &= reach_top - 1)
            idx[count++] = (int32_t)(i + __builtin_ctz(reach_top));
    }
    for (; i < n; i++) {
        a[i] += bound[i] * reach;
        if (a[i] >= two)
            idx[count++] = (int32_t)i;
    }
    return count;
}

#endif

/* ---- SwiGLU: silu(gate) * up, for the decode step and for prefill (layers.silu_and_mul) ---- */

/* e^x in 8 lanes: 2^n * e^r with x = n ln 2 + r, |r| <= ln 2 / 2, e^r by Cephes' expf
 * polynomial (~1 ulp); x clamped to [-87.3, 88.3], where 2^n stays a normal float. */
static inline __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* g / (1 + e^-g) * u in 8 lanes */
static inline __m256 silu_mul8(__m256 g, __m256 u)
{
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

/* out[i] = gate[i] / (1 + e^-gate[i]) * up[i] for i < n */
#if CODELM_PART == 1 /* (see PARTS above) */
static void silu_mul(const float *gate, const float *up, int64_t n, float *out)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    for (; i < n; i++)
        out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* x [m, 2 * ffn], each row its gate then its up half -> out [m, ffn]: one pass over x where
 * torch takes three (a contiguous gate, silu, mul). */
void codelm_swiglu(const float *x, int64_t m, int64_t ffn, float *out, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < m; i++)
        silu_mul(x + i * 2 * ffn, x + i * 2 * ffn + ffn, ffn, out + i * ffn);
}

/* ---- Causal attention for prompts: softmax(q k^T / sqrt(hd)) v over a layer's KV cache ----
 * torch's CPU flash attention takes a whole key block of up to 512 per query block and copies
 * K / V per query head under GQA. Here each work item is one KV head and ATT_POS positions of
 * the prompt: the rows are every (position, query head) of that KV head, so each key and value
 * load serves all of its query heads, and key blocks stop at the item's last position (the
 * causal half is never computed). Scores and the weighted sum of values are fp32 FMAs in
 * register tiles of ATT_ROWS rows x 16 lanes; the softmax is the online (flash) one, per key
 * block of up to ATT_KEYS. Keys are first packed in panels of 16, [panel][hd][16], so a score
 * tile reads 64 contiguous bytes a step. Plain AVX2 + FMA: Zen 4 runs two 256-bit FMAs a
 * cycle, as fast as one 512-bit one. */
#define ATT_ROWS 6  /* rows of a register tile: 12 accumulators, 2 loads, 1 broadcast */
#define ATT_POS ATT_ROWS /* prompt positions per work item: its rows (ATT_POS x the group's
                          * heads) then fill whole tiles whatever the group */
#define ATT_KEYS 64 /* keys per online-softmax block */

/* panel [hd][16] = the first `count` (up to 16) of keys [16][hd] transposed, zeros after them:
 * 8 x 8 blocks transposed in registers. */
static void pack_keys(const float *keys, int64_t count, int64_t hd, float *panel)
{
    for (int64_t j0 = 0; j0 < 16; j0 += 8)
        for (int64_t d0 = 0; d0 < hd; d0 += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++)
                r[j] = j0 + j < count ? _mm256_loadu_ps(keys + (j0 + j) * hd + d0)
                                      : _mm256_setzero_ps();
            /* rows j, columns d -> rows d, columns j */
            __m256 t[8];
            for (int j = 0; j < 8; j += 2) {
                t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
                t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
            }
            for (int j = 0; j < 8; j += 4) {
                r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
                r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
                r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
                r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
            }
            for (int j = 0; j < 4; j++) {
                t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
                t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
            }
            for (int d = 0; d < 8; d++)
                _mm256_storeu_ps(panel + (d0 + d) * 16 + j0, t[d]);
        }
}

/* s[r][0, 16 * panels) = q[r] . panel keys, for ATT_ROWS rows of q [.][hd] */
INLINE void score_tile(const float *q, int64_t hd, const float *kp, int64_t panels, float *s,
                       int64_t lds)
{
    for (int64_t p = 0; p < panels; p++) {
        const float *k = kp + p * hd * 16;
        __m256 acc[ATT_ROWS][2];
        for (int r = 0; r < ATT_ROWS; r++)
            acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd; d++) {
            const __m256 k0 = _mm256_loadu_ps(k + d * 16), k1 = _mm256_loadu_ps(k + d * 16 + 8);
            for (int r = 0; r < ATT_ROWS; r++) {
                const __m256 qd = _mm256_broadcast_ss(q + r * hd + d);
                acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
            }
        }
        for (int r = 0; r < ATT_ROWS; r++) {
            _mm256_storeu_ps(s + r * lds + p * 16, acc[r][0]);
            _mm256_storeu_ps(s + r * lds + p * 16 + 8, acc[r][1]);
        }
    }
}

/* o[r][0, hd) += sum over j < n_keys of p[r][j] * v[j], for ATT_ROWS rows; hd % 16 == 0 */
INLINE void value_tile(const float *p, int64_t ldp, const float *v, int64_t n_keys, int64_t hd,
                       float *o)
{
    for (int64_t c = 0; c < hd; c += 16) {
        __m256 acc[ATT_ROWS][2];
        for (int r = 0; r < ATT_ROWS; r++) {
            acc[r][0] = _mm256_loadu_ps(o + r * hd + c);
            acc[r][1] = _mm256_loadu_ps(o + r * hd + c + 8);
        }
        for (int64_t j = 0; j < n_keys; j++) {
            const __m256 v0 = _mm256_loadu_ps(v + j * hd + c), v1 = _mm256_loadu_ps(v + j * hd + c + 8);
            for (int r = 0; r < ATT_ROWS; r++) {
                const __m256 pj = _mm256_broadcast_ss(p + r * ldp + j);
                acc[r][0] = _mm256_fmadd_ps(pj, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(pj, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < ATT_ROWS; r++) {
            _mm256_storeu_ps(o + r * hd + c, acc[r][0]);
            _mm256_storeu_ps(o + r * hd + c + 8, acc[r][1]);
        }
    }
}

/* The online softmax of one row's scores s[0, n) of which the first `valid` count (the rest
 * are masked or padding): the row's running max m and sum l move on, its output o [hd] is
 * rescaled to the new max, and s becomes the weights e^(s - m) (0 where masked). */
static void softmax_step(float *s, int64_t n, int64_t valid, float *m, float *l, float *o,
                         int64_t hd)
{
    __m256 high = _mm256_set1_ps(*m);
    int64_t j = 0;
    for (; j + 8 <= valid; j += 8)
        high = _mm256_max_ps(high, _mm256_loadu_ps(s + j));
    float top = hmax(high);
    for (; j < valid; j++)
        top = s[j] > top ? s[j] : top;
    if (top > *m) {
        const float rescale = expf(*m - top); /* 0 for the first block (m = -inf) */
        for (int64_t i = 0; i < hd; i++)
            o[i] *= rescale;
        *l *= rescale;
        *m = top;
    }
    const __m256 shift = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (j = 0; j + 8 <= valid; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
        total = _mm256_add_ps(total, e);
        _mm256_storeu_ps(s + j, e);
    }
    float sum = hsum(total);
    for (; j < valid; j++)
        sum += s[j] = expf(s[j] - top);
    for (; j < n; j++)
        s[j] = 0.0f;
    *l += sum;
}

/* A KV cache holds float32 values, or (half) fp16 ones: where it is fp16 a row takes half the
 * bytes to read, and values become float as they are loaded (F16C). */
static inline __m256 kv_load8(const void *base, int64_t i, int half)
{
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)))
                : _mm256_loadu_ps((const float *)base + i);
}

static inline float kv_get(const void *base, int64_t i, int half)
{
    return half ? _cvtsh_ss(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline const void *kv_at(const void *base, int64_t i, int half)
{
    return (const char *)base + i * (half ? 2 : 4);
}

/* float32 x [n] into a cache row at element i */
static inline void kv_put(void *base, int64_t i, const float *x, int64_t n, int half)
{
    if (!half) {
        memcpy((float *)base + i, x, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)base + i;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; j++)
        dst[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
}

/* scores[0, 8) = q . keys[j] for 8 keys [8][hd], hd % 8 == 0: one load of q serves 8 keys,
 * and the 8 lane-sums reduce together (three rounds of hadd) instead of one by one. */
INLINE __m256 dot8_keys(const float *q, const void *keys, int64_t hd, int half)
{
    __m256 acc[8];
    for (int j = 0; j < 8; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < hd; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_fmadd_ps(qc, kv_load8(keys, j * hd + c, half), acc[j]);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Where the query heads of one KV head share its keys and values (GQA), each block of keys
 * is loaded once for DECODE_HEADS of them: at long context K and V no longer fit in L1 and
 * a head-by-head loop read them from L2 once per head. */
#define DECODE_HEADS 4 /* query heads one pass over the values serves: 2 accumulators each */

/* out[h, c..c+16) = sum over t < n_keys of p[h, t] values[t, c..c+16) / total[h], for
 * nh <= DECODE_HEADS heads (a constant where inlined): each value row is loaded once for all
 * of them, and their 2 x nh independent sums hide the FMA latency. */
INLINE void weigh_values(const float *p, int64_t n_keys, const void *values, int64_t hd,
                         int64_t c, const float *total, float *out, int nh, int half)
{
    __m256 acc[DECODE_HEADS][2];
    for (int h = 0; h < nh; h++)
        acc[h][0] = acc[h][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n_keys; t++) {
        const __m256 v0 = kv_load8(values, t * hd + c, half);
        const __m256 v1 = kv_load8(values, t * hd + c + 8, half);
        for (int h = 0; h < nh; h++) {
            const __m256 w = _mm256_broadcast_ss(p + h * n_keys + t);
            acc[h][0] = _mm256_fmadd_ps(w, v0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(w, v1, acc[h][1]);
        }
    }
    for (int h = 0; h < nh; h++) {
        const __m256 inv = _mm256_set1_ps(1.0f / total[h]);
        _mm256_storeu_ps(out + h * hd + c, _mm256_mul_ps(acc[h][0], inv));
        _mm256_storeu_ps(out + h * hd + c + 8, _mm256_mul_ps(acc[h][1], inv));
    }
}

/* out [nq, hd] = softmax(q_h . keys[t] / sqrt(hd)) . values over t < n_keys for nq query heads
 * of one KV head (q_h at q + h * hd); scores [nq, n_keys]. */
INLINE void attend_heads(const float *q, int64_t nq, const void *keys, const void *values,
                         int64_t n_keys, int64_t hd, float *scores, float *out, int half)
{
    const float scale = 1.0f / sqrtf((float)hd);
    int64_t t = 0;
    if (hd % 8 == 0)
        for (; t + 8 <= n_keys; t += 8) /* a block of 8 keys (hd floats each) stays in L1 */
            for (int64_t h = 0; h < nq; h++)
                _mm256_storeu_ps(scores + h * n_keys + t,
                                 _mm256_mul_ps(dot8_keys(q + h * hd, kv_at(keys, t * hd, half),
                                                         hd, half),
                                               _mm256_set1_ps(scale)));
    for (; t < n_keys; t++)
        for (int64_t h = 0; h < nq; h++) {
            float dot = 0.0f;
            for (int64_t c = 0; c < hd; c++)
                dot += q[h * hd + c] * kv_get(keys, t * hd + c, half);
            scores[h * n_keys + t] = dot * scale;
        }
    for (int64_t h0 = 0; h0 < nq; h0 += DECODE_HEADS) {
        const int nh = nq - h0 < DECODE_HEADS ? (int)(nq - h0) : DECODE_HEADS;
        float *p = scores + h0 * n_keys, *o = out + h0 * hd, total[DECODE_HEADS];
        for (int h = 0; h < nh; h++) { /* scores -> exp(score - max), total their sum */
            float top = -INFINITY;
            total[h] = 0.0f;
            softmax_step(p + h * n_keys, n_keys, n_keys, &top, &total[h], NULL, 0);
        }
        int64_t c = 0;
        for (; c + 16 <= hd; c += 16)
            switch (nh) {
            case 1: weigh_values(p, n_keys, values, hd, c, total, o, 1, half); break;
            case 2: weigh_values(p, n_keys, values, hd, c, total, o, 2, half); break;
            case 3: weigh_values(p, n_keys, values, hd, c, total, o, 3, half); break;
            default: weigh_values(p, n_keys, values, hd, c, total, o, 4, half); break;
            }
        for (; c < hd; c++) /* head sizes that are not a multiple of 16 */
            for (int h = 0; h < nh; h++) {
                float sum = 0.0f;
                for (t = 0; t < n_keys; t++)
                    sum += p[h * n_keys + t] * kv_get(values, t * hd + c, half);
                o[h * hd + c] = sum / total[h];
            }
    }
}

/* out [n_heads, hd] = attention of one position's q [n_heads, hd] over the first n_keys keys
 * of k_cache / v_cache [n_kv_heads, capacity, hd] (fp16 where `half`); scores [n_heads,
 * n_keys] is scratch. Work items are a KV head's query heads in as many runs as there are
 * threads for it. */
static void attend_position(const float *q, const void *k_cache, const void *v_cache,
                            int64_t capacity, int64_t n_heads, int64_t n_kv_heads, int64_t hd,
                            int64_t n_keys, float *scores, float *out, int half, int nthreads)
{
    const int64_t per_kv = n_heads / n_kv_heads;
    const int64_t threads_per_kv = (nthreads + n_kv_heads - 1) / n_kv_heads;
    const int64_t split = threads_per_kv < per_kv ? threads_per_kv : per_kv;
    const int64_t per_item = (per_kv + split - 1) / split;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t item = 0; item < n_kv_heads * split; item++) {
        const int64_t g = item / split, first = g * per_kv + item % split * per_item;
        const int64_t last = first + per_item < (g + 1) * per_kv ? first + per_item
                                                                 : (g + 1) * per_kv;
        if (first >= last)
            continue;
        const void *keys = kv_at(k_cache, g * capacity * hd, half);
        const void *values = kv_at(v_cache, g * capacity * hd, half);
        if (half) /* each a copy of attend_heads with its loads fixed */
            attend_heads(q + first * hd, last - first, keys, values, n_keys, hd,
                         scores + first * n_keys, out + first * hd, 1);
        else
            attend_heads(q + first * hd, last - first, keys, values, n_keys, hd,
                         scores + first * n_keys, out + first * hd, 0);
    }
}

/* k / v [n_kv_heads, capacity, hd] fp16, positions [0, n), as float32 [n_kv_heads, n, hd] */
static void widen_kv(const uint16_t *k, const uint16_t *v, int64_t n_kv_heads, int64_t capacity,
                     int64_t hd, int64_t n, float *wide_k, float *wide_v, int nthreads)
{
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < n_kv_heads; g++)
        for (int64_t t = 0; t < n; t++)
            for (int64_t c = 0; c < hd; c += 8) {
                const int64_t from = (g * capacity + t) * hd + c, to = (g * n + t) * hd + c;
                _mm256_storeu_ps(wide_k + to, kv_load8(k, from, 1));
                _mm256_storeu_ps(wide_v + to, kv_load8(v, from, 1));
            }
}

/* out [n_new, n_heads * hd] = causal attention of q (position t, head h at q + t * q_pos +
 * h * q_head, hd contiguous floats) at positions [start, start + n_new) over one layer's
 * k_cache / v_cache [n_kv_heads, capacity, hd] (float32, or fp16 where `half`) holding keys
 * [0, start + n_new). Returns 0, or -1 for a shape it does not take (hd not a multiple of 16,
 * heads not a multiple of the KV heads) or short memory. */
int codelm_attention(const float *q, int64_t q_pos, int64_t q_head, const void *k_cache,
                     const void *v_cache, int64_t capacity, int64_t n_heads, int64_t n_kv_heads,
                     int64_t hd, int64_t start, int64_t n_new, int half, float *out, int nthreads)
{
    if (hd % 16 != 0 || n_kv_heads < 1 || n_heads % n_kv_heads != 0 || nthreads < 1)
        return -1;
    const int64_t group = n_heads / n_kv_heads, end = start + n_new, panels = (end + 15) / 16;
    const int64_t rows = ATT_POS * group, tiles = (rows + ATT_ROWS - 1) / ATT_ROWS;
    const int64_t blocks = (n_new + ATT_POS - 1) / ATT_POS, items = n_kv_heads * blocks;
    if (n_new == 1 && q_head == hd) { /* one position: no packing, K/V read where they are */
        float *scores = malloc((size_t)(n_heads * end) * sizeof(float));
        if (!scores)
            return -1;
        attend_position(q, k_cache, v_cache, capacity, n_heads, n_kv_heads, hd, end, scores, out,
                        half, nthreads);
        free(scores);
        return 0;
    }
    /* A prompt's keys are packed into panels below anyway; an fp16 cache is widened first
     * (its values, read once per item, too): a pass over [0, end), small next to the FMAs. */
    const int64_t widened = n_kv_heads * end * hd; /* floats of K (then of V) when widened */
    float *wide = NULL;
    if (half) {
        if (!(wide = malloc((size_t)(2 * widened) * sizeof(float))))
            return -1;
        widen_kv(k_cache, v_cache, n_kv_heads, capacity, hd, end, wide, wide + widened, nthreads);
        capacity = end; /* the widened rows of a KV head */
    }
    const float *kf = half ? wide : k_cache, *vf = half ? wide + widened : v_cache;
    const float scale = 1.0f / sqrtf((float)hd);
    float *kp = malloc((size_t)(n_kv_heads * panels * hd * 16) * sizeof(float));
    if (!kp) {
        free(wide);
        return -1;
    }
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < n_kv_heads; g++)
        for (int64_t p = 0; p < panels; p++)
            pack_keys(kf + (g * capacity + p * 16) * hd, end - p * 16, hd,
                      kp + (g * panels + p) * hd * 16);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: the item's rows of q (scaled), of o, of scores; running max and sum */
        const int64_t padded = tiles * ATT_ROWS;
        float *qs = malloc((size_t)(padded * (2 * hd + ATT_KEYS + 2)) * sizeof(float));
        if (!qs) {
#pragma omp atomic write
            failed = 1;
        }
        float *o = qs + padded * hd, *s = o + padded * hd, *m = s + padded * ATT_KEYS;
        float *l = m + padded;
        /* the last positions first: they have the most keys, so the tail balances */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!qs)
                continue;
            const int64_t g = it % n_kv_heads, b = blocks - 1 - it / n_kv_heads;
            const int64_t t0 = b * ATT_POS, n_pos = n_new - t0 < ATT_POS ? n_new - t0 : ATT_POS;
            const int64_t real = n_pos * group, n_keys = start + t0 + n_pos;
            const int64_t used = (real + ATT_ROWS - 1) / ATT_ROWS; /* tiles with real rows */
            for (int64_t r = 0; r < used * ATT_ROWS; r++) {
                const int64_t t = t0 + r / group, h = g * group + r % group;
                for (int64_t d = 0; d < hd; d++)
                    qs[r * hd + d] = r < real ? q[t * q_pos + h * q_head + d] * scale : 0.0f;
                for (int64_t d = 0; d < hd; d++)
                    o[r * hd + d] = 0.0f;
                m[r] = -INFINITY;
                l[r] = 0.0f;
            }
            const float *v = vf + g * capacity * hd;
            for (int64_t k0 = 0; k0 < n_keys; k0 += ATT_KEYS) {
                const int64_t nk = n_keys - k0 < ATT_KEYS ? n_keys - k0 : ATT_KEYS;
                const float *panel = kp + (g * panels + k0 / 16) * hd * 16;
                for (int64_t tile = 0; tile < used; tile++)
                    score_tile(qs + tile * ATT_ROWS * hd, hd, panel, (nk + 15) / 16,
                               s + tile * ATT_ROWS * ATT_KEYS, ATT_KEYS);
                for (int64_t r = 0; r < used * ATT_ROWS; r++) {
                    /* row r sees keys [0, start + its position] */
                    const int64_t seen = r < real ? start + t0 + r / group + 1 - k0 : 0;
                    const int64_t valid = seen < 0 ? 0 : (seen < nk ? seen : nk);
                    softmax_step(s + r * ATT_KEYS, nk, valid, m + r, l + r, o + r * hd, hd);
                }
                for (int64_t tile = 0; tile < used; tile++)
                    value_tile(s + tile * ATT_ROWS * ATT_KEYS, ATT_KEYS, v + k0 * hd, nk, hd,
                               o + tile * ATT_ROWS * hd);
            }
            for (int64_t r = 0; r < real; r++) {
                const int64_t t = t0 + r / group, h = g * group + r % group;
                float *dst = out + t * n_heads * hd + h * hd;
                for (int64_t d = 0; d < hd; d++)
                    dst[d] = o[r * hd + d] / l[r];
            }
        }
        free(qs);
    }
    free(kp);
    free(wide);
    return failed ? -1 : 0;
}

#endif

#if CODELM_PART != 1 /* (see PARTS above) */
/* ---- Prefill: weights in tiles of 16 output channels (AVX-512 VNNI; 256-bit below) ----
 * The row-at-a-time loop above sums each output with a horizontal add and reloads x for every
 * weight row: fine for a few rows (decode), far from what vpdpbusd can do for a prompt. Here a
 * weight copy is laid out [n / 16][k / 32][8][16][4] bytes: one 64-byte load holds 4
 * consecutive k of 16 output channels, so a broadcast of 4 bytes of x and one vpdpbusd add 64
 * products straight into 16 outputs, and each load serves TILE_ROWS rows of x.
 * vpdpbusd multiplies unsigned by signed bytes: the weights are the unsigned side, int8 ones
 * stored as w + 128 and int4 ones as q (0..15), so w = u - offset (128, or int4's 8) and each
 * block's sums start at -offset * (sum of x's block): one broadcast per row and block, shared
 * by all channels. Per block of 32 the int32 sums become float with both scales (and int4's
 * zero times the block's float sum of x): the numbers of `linear`, summed in another order. */
#define TILE 16      /* output channels of a tile (the packed layout, Int8Tiles) */
#define TILE_ROWS 6  /* rows of x a weight load serves (4: 0.8x as fast with AVX-512, 0.93x
                        in 256-bit code) */
#define TILE_SPAN 66 /* rows of x (in L2) a tile pair (in L1 / L2) is applied to in turn */
_Static_assert(TILE_SPAN % TILE_ROWS == 0, "a span holds whole groups of rows");
/* GCC takes these intrinsics for plain vector arithmetic and reassociates a block's running sums
 * into trees of partial products spilled to the stack (0.6x as fast); an empty asm on each sum
 * after each step keeps it in its register. */
#define KEEP(v) __asm__("" : "+x"(v))

static inline __m256i x_four(const int8_t *x) /* 4 bytes of x in every lane */
{
    int32_t four;
    memcpy(&four, x, 4);
    return _mm256_set1_epi32(four);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAS_DPBUSD 1

static inline __m256 upper8(__m512 v) /* lanes 8..15, in AVX512F alone */
{
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* y[mr rows, 16 * nt] from one group of TILE_ROWS quantised rows (of which mr are real) and nt
 * weight tiles, the second `gap` tiles after the first; with `swiglu` (nt == 2) y[mr rows, 16]
 * = silu(first) * second. `nibbles`: int8 stored as w + 128, multiplied as two nibbles by the
 * 256-bit code without VNNI (0 everywhere else). mr, nt, nibbles and whether wz is given are
 * constants where inlined. */
INLINE void tile_kernel(const int8_t *xq, const float *xd, const int32_t *xo, const float *xs,
                        int64_t k, const uint8_t *wt, const float *ws, const float *wz,
                        int64_t gap, float *y, int64_t ldy, int mr, int nt, int swiglu, int nibbles)
{
    (void)nibbles;
    const int64_t blocks = k / BLOCK, tile_bytes = gap * k * TILE, tile_blocks = gap * blocks * TILE;
    __m512 acc[TILE_ROWS][2];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nt; j++)
            acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = xq + b * TILE_ROWS * BLOCK;
        const uint8_t *wb = wt + b * BLOCK * TILE;
        __m512i dot[TILE_ROWS][2];
        for (int r = 0; r < mr; r++) {
            const __m512i start = _mm512_set1_epi32(xo[b * TILE_ROWS + r]);
            for (int j = 0; j < nt; j++)
                dot[r][j] = start;
        }
        for (int step = 0; step < BLOCK / 4; step++) {
            __m512i w[2];
            for (int j = 0; j < nt; j++)
                w[j] = _mm512_loadu_si512(wb + j * tile_bytes + step * 64);
            for (int r = 0; r < mr; r++) {
                int32_t four;
                memcpy(&four, xb + r * BLOCK + step * 4, 4);
                const __m512i x4 = _mm512_set1_epi32(four);
                for (int j = 0; j < nt; j++)
                    dot[r][j] = _mm512_dpbusd_epi32(dot[r][j], w[j], x4);
            }
        }
        for (int j = 0; j < nt; j++) {
            const int64_t at = j * tile_blocks + b * TILE;
            const __m512 s = _mm512_loadu_ps(ws + at);
            for (int r = 0; r < mr; r++) {
                const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(xd[b * TILE_ROWS + r]));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][j]), scale, acc[r][j]);
                if (wz)
                    acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(wz + at),
                                                _mm512_set1_ps(xs[b * TILE_ROWS + r]), acc[r][j]);
            }
        }
    }
    if (swiglu) /* nt == 2: the gate tile and its up tile */
        for (int r = 0; r < mr; r++) {
            _mm256_storeu_ps(y + r * ldy, silu_mul8(_mm512_castps512_ps256(acc[r][0]),
                                                    _mm512_castps512_ps256(acc[r][1])));
            _mm256_storeu_ps(y + r * ldy + 8, silu_mul8(upper8(acc[r][0]), upper8(acc[r][1])));
        }
    else
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < nt; j++)
                _mm512_storeu_ps(y + r * ldy + j * TILE, acc[r][j]);
}

#else
/* 256-bit registers (AVX2, with or without AVX-VNNI): a tile is two columns of 8 channels,
 * each run over K on its own, 6 rows at a time. The weights are the same unsigned bytes u =
 * w + offset. With VNNI, vpdpbusd as above. Without it, vpmaddubsw multiplies them by x's
 * signed bytes into 16-bit pair sums, which saturate unless u is small: u up to 31 (int4's q,
 * and int8 whose values fit in 5 bits, GGUF Q5_0's, stored as w + 16) adds 4 steps in 16 bits
 * (4 * 2 * 31 * 128 < 2^15; int4's q <= 15 a whole block) before one vpmaddwd widens them; u up
 * to 255 (int8 as w + 128) is multiplied as its two nibbles, 16 * high + low, each adding a
 * whole block in 16 bits (8 * 2 * 15 * 128 < 2^15). So one vpmaddubsw per 32 products for
 * int4 and 5-bit int8 (1.6x as fast as before on Zen 4), two for other int8, where moving w's
 * sign onto x took three multiply-port instructions (vpsignb, vpmaddubsw, vpmaddwd; as fast as
 * the nibbles on Zen 4, whose 6-wide front end limits both). */
#define HAS_DPBUSD HAS_DPBUSD_256
#define SMALL_STEPS 4 /* steps of u <= 31 that 16 bits hold */
/* Column h (channels 8h .. 8h + 7) of the tile at wt for mr rows: out[r * ldo + c]. nibbles:
 * the weights are int8 as w + 128, else at most 31. Constants where inlined, like
 * tile_kernel's. */
INLINE void column_kernel(const int8_t *xq, const float *xd, const int32_t *xo, const float *xs,
                          int64_t k, const uint8_t *wt, const float *ws, const float *wz, int h,
                          float *out, int64_t ldo, int mr, int nibbles)
{
    const int64_t blocks = k / BLOCK;
    (void)nibbles; /* one vpdpbusd takes any u */
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < mr; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = xq + b * TILE_ROWS * BLOCK;
        const uint8_t *wb = wt + b * BLOCK * TILE + h * 32;
        __m256i dot[TILE_ROWS];
        for (int r = 0; r < mr; r++)
            dot[r] = _mm256_set1_epi32(xo[b * TILE_ROWS + r]);
#if HAS_DPBUSD
        for (int step = 0; step < BLOCK / 4; step++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(wb + step * 4 * TILE));
            for (int r = 0; r < mr; r++) {
                dot[r] = _mm256_dpbusd_epi32(dot[r], w, x_four(xb + r * BLOCK + step * 4));
                KEEP(dot[r]);
            }
        }
#else
        if (nibbles) {
            const __m256i nibble = _mm256_set1_epi8(0x0F);
            __m256i lo[TILE_ROWS], hi[TILE_ROWS];
            for (int r = 0; r < mr; r++)
                lo[r] = hi[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int step = 0; step < BLOCK / 4; step++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wb + step * 4 * TILE));
                const __m256i wl = _mm256_and_si256(w, nibble);
                const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
                for (int r = 0; r < mr; r++) {
                    const __m256i x4 = x_four(xb + r * BLOCK + step * 4);
                    lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(wl, x4));
                    hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(wh, x4));
                    KEEP(lo[r]);
                    KEEP(hi[r]);
                }
            }
            for (int r = 0; r < mr; r++)
                dot[r] = _mm256_add_epi32(dot[r], _mm256_add_epi32(widen(hi[r], 16), widen(lo[r], 1)));
        } else {
            const int steps = wz ? BLOCK / 4 : SMALL_STEPS; /* int4's q <= 15: a whole block */
            for (int part = 0; part < BLOCK / 4; part += steps) {
                __m256i pairs[TILE_ROWS];
                for (int r = 0; r < mr; r++)
                    pairs[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int step = part; step < part + steps; step++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(wb + step * 4 * TILE));
                    for (int r = 0; r < mr; r++) {
                        pairs[r] = _mm256_add_epi16(
                            pairs[r], _mm256_maddubs_epi16(w, x_four(xb + r * BLOCK + step * 4)));
                        KEEP(pairs[r]);
                    }
                }
                for (int r = 0; r < mr; r++)
                    dot[r] = _mm256_add_epi32(dot[r], widen(pairs[r], 1));
            }
        }
#endif
        const __m256 s = _mm256_loadu_ps(ws + b * TILE + h * 8);
        for (int r = 0; r < mr; r++) {
            const __m256 scale = _mm256_mul_ps(s, _mm256_set1_ps(xd[b * TILE_ROWS + r]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
            if (wz)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wz + b * TILE + h * 8),
                                         _mm256_set1_ps(xs[b * TILE_ROWS + r]), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++)
        _mm256_storeu_ps(out + r * ldo, acc[r]);
}

/* tile_kernel's contract (above, for AVX-512) column by column. */
INLINE void tile_kernel(const int8_t *xq, const float *xd, const int32_t *xo, const float *xs,
                        int64_t k, const uint8_t *wt, const float *ws, const float *wz,
                        int64_t gap, float *y, int64_t ldy, int mr, int nt, int swiglu, int nibbles)
{
    const int64_t tile_bytes = gap * k * TILE, tile_blocks = gap * (k / BLOCK) * TILE;
    if (swiglu) { /* nt == 2: the gate tile's two columns, then its up tile's (a tile's two
                     columns share cache lines: gate and up alternating ran 0.75x as fast) */
        float gate[TILE_ROWS * TILE], up[TILE_ROWS * TILE];
        for (int h = 0; h < 2; h++)
            column_kernel(xq, xd, xo, xs, k, wt, ws, wz, h, gate + h * 8, TILE, mr, nibbles);
        for (int h = 0; h < 2; h++)
            column_kernel(xq, xd, xo, xs, k, wt + tile_bytes, ws + tile_blocks,
                          wz ? wz + tile_blocks : NULL, h, up + h * 8, TILE, mr, nibbles);
        for (int r = 0; r < mr; r++)
            for (int h = 0; h < 2; h++)
                _mm256_storeu_ps(y + r * ldy + h * 8,
                                 silu_mul8(_mm256_loadu_ps(gate + r * TILE + h * 8),
                                           _mm256_loadu_ps(up + r * TILE + h * 8)));
        return;
    }
    for (int j = 0; j < nt; j++)
        for (int h = 0; h < 2; h++)
            column_kernel(xq, xd, xo, xs, k, wt + j * tile_bytes, ws + j * tile_blocks,
                          wz ? wz + j * tile_blocks : NULL, h, y + j * TILE + h * 8, ldy, mr, nibbles);
}
#endif

/* Sub-scaled int8 tiles (GGUF K-quants as they are, SubScaledTiles): w = d * sc * q (+ z) per
 * channel, q in -32 .. 31 stored signed in the tile layout, sc an int8 per 16 inputs (1 for
 * Q4_K and Q5_K), d a float per block (Q6_K's super-block's, repeated), z (Q4_K's and Q5_K's
 * -dmin m) a float per block, applied with x's float sum like int4's zeros. maddubs takes x
 * as the unsigned side (x + 128, stored so by quantize_tile_rows with `flip`): two steps'
 * pair sums stay within int16 (2 * 2 * 255 * 32 < 2^15) and one vpmaddwd widens them times
 * sc, so a block takes 8 vpmaddubsw and 4 vpmaddwd per row and column, one float epilogue,
 * and no nibbles. The 128 added to x is taken back by
 * each block's sums starting at wo = -128 * sum(q * sc) of the channel, shared by all rows.
 * 256-bit code on every build: with VNNI, int8 tiles of the requantised weight are the
 * faster candidate where calibration times them. */
typedef struct {
    const int8_t *sub;  /* per tile and block: [group of 16][column][8 channels][sc, sc] */
    const int32_t *wo;  /* per tile and block: [16 channels] */
} sub_scales;

INLINE void sub_column_kernel(const int8_t *xq, const float *xd, const float *xs, int64_t k,
                              const uint8_t *wt, const float *ws, const float *wz, sub_scales sub,
                              int h, float *out, int64_t ldo, int mr)
{
    const int64_t blocks = k / BLOCK;
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < mr; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *xb = xq + b * TILE_ROWS * BLOCK;
        const uint8_t *wb = wt + b * BLOCK * TILE + h * 32;
        const __m256i start = _mm256_loadu_si256((const __m256i *)(sub.wo + b * TILE + h * 8));
        __m256i dot[TILE_ROWS];
        for (int r = 0; r < mr; r++)
            dot[r] = start;
#pragma GCC unroll 4
        for (int step = 0; step < BLOCK / 4; step += 2) {
            const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                (const __m128i *)(sub.sub + b * 4 * TILE + step / 4 * 2 * TILE + h * TILE)));
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + step * 4 * TILE));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + (step + 1) * 4 * TILE));
            for (int r = 0; r < mr; r++) {
                const int8_t *xr = xb + r * BLOCK + step * 4;
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(x_four(xr), w0),
                                                 _mm256_maddubs_epi16(x_four(xr + 4), w1));
                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, sc));
                KEEP(dot[r]);
            }
        }
        const __m256 s = _mm256_loadu_ps(ws + b * TILE + h * 8);
        for (int r = 0; r < mr; r++) {
            const __m256 scale = _mm256_mul_ps(s, _mm256_set1_ps(xd[b * TILE_ROWS + r]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
            if (wz)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wz + b * TILE + h * 8),
                                         _mm256_set1_ps(xs[b * TILE_ROWS + r]), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++)
        _mm256_storeu_ps(out + r * ldo, acc[r]);
}

/* Whether weights stored as u = w + offset are multiplied as two nibbles: int8 as w + 128
 * without VNNI (see above). */
static inline int in_nibbles(int32_t offset) { return offset == 128 && !HAS_DPBUSD; }

/* x [rows, k] quantised as quantize_blocks does, into the order the tile
 * kernel reads: rows in groups of TILE_ROWS (the last padded with zeros), each group's block b
 * of all its rows together, so the kernel finds everything at constant offsets from one
 * pointer. Per row and block: xq 32 int8, xd the scale, xo -offset * the sum of xq and, where
 * given, xs the float sum of x. */
static void quantize_tile_rows(const float *x, int64_t rows, int64_t k, int32_t offset, int flip,
                               int8_t *xq, float *xd, int32_t *xo, float *xs, int nthreads)
{
    const int64_t blocks = k / BLOCK, padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t rb = 0; rb < padded * blocks; rb++) {
        const int64_t i = rb / blocks, b = rb % blocks;
        const int64_t at = (i / TILE_ROWS * blocks + b) * TILE_ROWS + i % TILE_ROWS;
        if (i >= rows) { /* padding: a block of zeros */
            memset(xq + at * BLOCK, 0, BLOCK);
            xd[at] = 0.0f;
            xo[at] = 0;
            if (xs)
                xs[at] = 0.0f;
            continue;
        }
        int32_t qsum;
        const float *src = x + i * k + b * BLOCK;
        xd[at] = quantize_block(src, xq + at * BLOCK, &qsum, xs ? xs + at : NULL);
        xo[at] = -offset * qsum;
        if (flip) /* as unsigned bytes x + 128 (the sub-scaled kernel) */
            for (int j = 0; j < BLOCK; j++)
                xq[at * BLOCK + j] ^= (int8_t)0x80;
    }
}

#endif

#if CODELM_PART == 3 /* (see PARTS above) */
/* One call per (rows, weight kind), so each is compiled with its loops unrolled. */
#define SUB_CALL(MR, WZ)                                                                         \
    for (int j = 0; j < nt; j++)                                                                 \
        for (int h = 0; h < 2; h++)                                                              \
            sub_column_kernel(xq, xd, xs, k, wt + j * gap * k * TILE, ws + j * gap * tile_blocks,  \
                              WZ ? WZ + j * gap * tile_blocks : NULL,                            \
                              (sub_scales){sub.sub + j * gap * tile_blocks * 4,                  \
                                           sub.wo + j * gap * tile_blocks},                      \
                              h, y + j * TILE + h * 8, ldy, MR);
#define SUB_CASE(MR)                                                                             \
    case MR:                                                                                     \
        if (wz) {                                                                                \
            SUB_CALL(MR, wz)                                                                     \
        } else {                                                                                 \
            SUB_CALL(MR, (const float *)NULL)                                                    \
        }                                                                                        \
        return;

HIDDEN void sub_tile_rows(const int8_t *xq, const float *xd, const float *xs, int64_t k,
                          const uint8_t *wt, const float *ws, const float *wz, sub_scales sub,
                          int64_t gap, float *y, int64_t ldy, int mr, int nt)
{
    const int64_t tile_blocks = k / BLOCK * TILE;
    switch (mr) {
        SUB_CASE(1)
        SUB_CASE(2)
        SUB_CASE(3)
        SUB_CASE(4)
        SUB_CASE(5)
        SUB_CASE(6)
    }
}
#undef SUB_CASE
#undef SUB_CALL
#endif

#if CODELM_PART == 2 /* (see PARTS above) */
/* sub_column_kernel for mr rows and nt tiles, built once per mr: part 3. */
HIDDEN void sub_tile_rows(const int8_t *xq, const float *xd, const float *xs, int64_t k,
                          const uint8_t *wt, const float *ws, const float *wz, sub_scales sub,
                          int64_t gap, float *y, int64_t ldy, int mr, int nt);

/* One call per (rows, tiles, weight kind), so each is compiled with its loops unrolled: int4
 * (zeros given), int8 as w + 128 in nibbles (256-bit code without VNNI), other int8. */
#define TILE_CALL(MR, WZ, NIBBLES)                                                               \
    if (nt == 2)                                                                                 \
        tile_kernel(xq, xd, xo, xs, k, wt, ws, WZ, gap, y, ldy, MR, 2, swiglu, NIBBLES);         \
    else                                                                                         \
        tile_kernel(xq, xd, xo, xs, k, wt, ws, WZ, gap, y, ldy, MR, 1, 0, NIBBLES);
#define TILE_CASE(MR)                                                                            \
    case MR:                                                                                     \
        if (wz) {                                                                                \
            TILE_CALL(MR, wz, 0)                                                                 \
        } else if (nibbles && !HAS_DPBUSD) {                                                     \
            TILE_CALL(MR, NULL, 1)                                                               \
        } else {                                                                                 \
            TILE_CALL(MR, NULL, 0)                                                               \
        }                                                                                        \
        return;

/* tile_kernel for mr rows and nt tiles; with sub.sub, the sub-scaled kernel (no swiglu) */
static void tile_rows(const int8_t *xq, const float *xd, const int32_t *xo, const float *xs,
                      int64_t k, const uint8_t *wt, const float *ws, const float *wz,
                      sub_scales sub, int64_t gap, float *y, int64_t ldy, int mr, int nt,
                      int swiglu, int nibbles)
{
    if (sub.sub) {
        sub_tile_rows(xq, xd, xs, k, wt, ws, wz, sub, gap, y, ldy, mr, nt);
        return;
    }
    switch (mr) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
    }
}
#undef TILE_CASE
#undef TILE_CALL

/* The first of `count` items starting at base, base + len, ... whose start is at or after
 * `bound` (count where none is) */
static inline int64_t item_at(int64_t bound, int64_t base, int64_t len, int64_t count)
{
    const int64_t item = bound <= base ? 0 : (bound - base + len - 1) / len;
    return item < count ? item : count;
}

/* The tile GEMM of `tiles` weight tiles at wt (scales ws, int4 zeros wz) over m rows of x
 * quantised by quantize_tile_rows, into y's rows of ldy floats from column 0; with `swiglu`
 * the tiles are a fused gate / up projection (gate tiles first, then as many up tiles) and y
 * gets silu(gate) * up straight from the registers: gate tile c pairs with up tile
 * c + tiles / 2, and the gate and up floats of a row never reach memory. */
static void tile_gemm_rows(const int8_t *xq, const float *xd, const int32_t *xo, const float *xs,
                           int64_t m, int64_t k, const uint8_t *wt, const float *ws,
                           const float *wz, sub_scales sub, int64_t tiles, float *y, int64_t ldy,
                           int swiglu, int nibbles, int nthreads)
{
    const int64_t blocks = k / BLOCK;
    /* A work item's tiles ("pair" below, one or two): t and t + gap, written at column c of
     * y's rows of ldy floats. Two where AVX-512 holds both tiles' sums in registers; the
     * 256-bit code runs a column at a time, where int8's nibbles ran 1.13x as fast with one
     * tile an item and the others 1.07x with two (Zen 4). */
    const int64_t per = swiglu || !nibbles ? 2 : 1;
    const int64_t pairs = swiglu ? tiles / 2 : (tiles + per - 1) / per;
    const int64_t gap = swiglu ? tiles / 2 : 1;
    /* Each thread takes an equal share of the work counted in rows x pairs, in span order:
     * item (span, pair) covers [its first row * pairs + pair * its rows, + its rows) and runs
     * on the thread whose share holds its start. Whole spans per thread left one a span's
     * partial rows short (512 rows: 264 against 248, the other waiting 6% of the GEMM). */
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t lo = m * pairs * me / team, hi = m * pairs * (me + 1) / team;
        for (int64_t first = 0; first < m; first += TILE_SPAN) {
            const int64_t end = first + TILE_SPAN < m ? first + TILE_SPAN : m;
            const int64_t from = item_at(lo, first * pairs, end - first, pairs);
            const int64_t to = item_at(hi, first * pairs, end - first, pairs);
            for (int64_t pair = from; pair < to; pair++) {
                const int64_t t = swiglu ? pair : pair * per, nt = tiles - t < per ? tiles - t : per;
                const int64_t c = swiglu ? pair * TILE : t * TILE, at = t * blocks * TILE;
                for (int64_t i = first; i < end; i += TILE_ROWS) {
                    const int mr = end - i < TILE_ROWS ? (int)(end - i) : TILE_ROWS;
                    tile_rows(xq + i * k, xd + i * blocks, xo + i * blocks,
                              xs ? xs + i * blocks : NULL, k, wt + t * k * TILE, ws + at,
                              wz ? wz + at : NULL,
                              sub.sub ? (sub_scales){sub.sub + at * 4, sub.wo + at} : sub, gap,
                              y + i * ldy + c, ldy, mr, (int)nt, swiglu, nibbles);
                }
            }
        }
    }
}

/* x's quantised rows in the order the tile kernel reads them (quantize_tile_rows): NULL where
 * memory is short. xs only where `sums` (int4's zero points). */
typedef struct {
    int8_t *xq;
    float *xd;
    int32_t *xo;
    float *xs;
} tile_rows_x;

static void free_tile_x(tile_rows_x *t)
{
    free(t->xq);
    free(t->xd);
    free(t->xo);
    free(t->xs);
}

static int quantize_tile_x(const float *x, int64_t m, int64_t k, int32_t offset, int flip,
                           int sums, tile_rows_x *t, int nthreads)
{
    const int64_t blocks = k / BLOCK;
    const int64_t rows = (m + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS; /* whole groups */
    t->xq = malloc((size_t)(rows * k));
    t->xd = malloc((size_t)(rows * blocks) * sizeof(float));
    t->xo = malloc((size_t)(rows * blocks) * sizeof(int32_t));
    t->xs = sums ? malloc((size_t)(rows * blocks) * sizeof(float)) : NULL;
    if (!t->xq || !t->xd || !t->xo || (sums && !t->xs)) {
        free_tile_x(t);
        return -1;
    }
    quantize_tile_rows(x, m, k, offset, flip, t->xq, t->xd, t->xo, t->xs, nthreads);
    return 0;
}

/* The GEMM of codelm_tiles_linear, or with `swiglu` that of codelm_tiles_swiglu. */
static int tiles_gemm(const float *x, int64_t m, int64_t k, const uint8_t *wt, int32_t offset,
                      const float *ws, const float *wz, int64_t n, float *y, int64_t ldy,
                      int swiglu, int nthreads)
{
    /* offset 128: int8 as w + 128; else u <= 31, int4's q (offset 8) or int8 as w + 16 */
    if (k % BLOCK != 0 || n % (swiglu ? 2 * TILE : TILE) != 0 || nthreads < 1 ||
        (wz ? offset != 8 : offset != 128 && offset != 16))
        return -1;
    tile_rows_x t;
    if (quantize_tile_x(x, m, k, offset, 0, wz != NULL, &t, nthreads) != 0)
        return -1;
    tile_gemm_rows(t.xq, t.xd, t.xo, t.xs, m, k, wt, ws, wz, (sub_scales){NULL, NULL}, n / TILE,
                   y, ldy, swiglu, in_nibbles(offset), nthreads);
    free_tile_x(&t);
    return 0;
}

/* Transposes 8 rows of 8 dwords in place: v[i] dword j <-> v[j] dword i. */
static inline void transpose8(__m256i v[8])
{
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4)
        for (int j = 0; j < 2; j++) {
            b[i + 2 * j] = _mm256_unpacklo_epi64(a[i + j], a[i + j + 2]);
            b[i + 2 * j + 1] = _mm256_unpackhi_epi64(a[i + j], a[i + j + 2]);
        }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x20);
        v[i + 4] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x31);
    }
}

#define LAYOUT_PREFETCH 1024 /* bytes ahead in each int8 row tile_bytes_from_rows reads */

/* Channels [r0, r0 + 16) of a row-major weight in `fmt` (Int8Native's int8 [n, k]; Int4Native's
 * nibbles [n, k / 2], byte j of a block holding element j low and j + 16 high; Int5Native's
 * 20-byte blocks) as the bytes of one tile of the layout above at wt: u = w + offset (int4 and
 * 5-bit int8: q, their offsets 8 and 16). A block of 8 channels is 8 rows of 8 dwords (4 k
 * each) that the layout wants by dword: one transpose. */
static void tile_bytes_from_rows(const void *w, int64_t k, int fmt, int64_t r0, int32_t offset,
                                 uint8_t *wt)
{
    const int64_t blocks = k / BLOCK, row_bytes = blocks * block_bytes(fmt);
    const __m256i add = _mm256_set1_epi8((char)offset);
    for (int64_t b = 0; b < blocks; b++)
        for (int half = 0; half < 2; half++) { /* channels 8 half .. 8 half + 7 */
            __m256i v[8];
            for (int c = 0; c < 8; c++) {
                const int64_t r = r0 + half * 8 + c;
                /* 16 rows are read side by side: prefetched a KB ahead, a layout of the
                 * default model's 136 MB head (4 rows of x) took 11.4 ms against 15.0 */
                if (fmt != FMT_Q8) {
                    const uint8_t *src = (const uint8_t *)w + r * row_bytes + b * block_bytes(fmt);
                    _mm_prefetch((const char *)src + LAYOUT_PREFETCH / 2, _MM_HINT_T0);
                    v[c] = fmt == FMT_Q5 ? unpack_q5(src) : unpack_q4(src);
                } else {
                    const int8_t *src = (const int8_t *)w + r * k + b * BLOCK;
                    _mm_prefetch((const char *)src + LAYOUT_PREFETCH, _MM_HINT_T0);
                    v[c] = _mm256_add_epi8(_mm256_loadu_si256((const __m256i *)src), add);
                }
            }
            transpose8(v); /* v[step]: dword c = channel c's 4 bytes of that step */
            for (int step = 0; step < BLOCK / 4; step++)
                _mm256_storeu_si256(
                    (__m256i *)(wt + (b * BLOCK / 4 + step) * TILE * 4 + half * 32), v[step]);
        }
}

/* tile_bytes_from_rows' tile, and the scales (and zeros) of each block as float at wts (wtz). */
static void tile_from_rows(const void *w, const uint16_t *ws, const uint16_t *wz, int64_t group,
                           int64_t k, int fmt, int64_t r0, int32_t offset, uint8_t *wt,
                           float *wts, float *wtz)
{
    const int64_t blocks = k / BLOCK, groups = k / group, per_group = group / BLOCK;
    tile_bytes_from_rows(w, k, fmt, r0, offset, wt);
    for (int64_t b = 0; b < blocks; b++)
        for (int c = 0; c < TILE; c++) {
            const int64_t g = (r0 + c) * groups + b / per_group;
            wts[b * TILE + c] = _cvtsh_ss(ws[g]);
            if (wz)
                wtz[b * TILE + c] = _cvtsh_ss(wz[g]);
        }
}

/* out = the bytes of Int8Tiles' copy of int8 rows w [n, k]: tile t's u = w + offsets[t] (mod
 * 256), the rows past n (to whole tiles) as zeros. What the per-call layout above lays out, for
 * a copy built once (0.9 GB/s in torch's permuting copy). */
int codelm_tile_bytes(const int8_t *w, int64_t n, int64_t k, const uint8_t *offsets, uint8_t *out,
                      int nthreads)
{
    if (k % BLOCK != 0 || n < 1 || nthreads < 1)
        return -1;
    const int64_t tiles = (n + TILE - 1) / TILE, whole = n / TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < whole; t++)
        tile_bytes_from_rows(w, k, FMT_Q8, t * TILE, offsets[t], out + t * TILE * k);
    if (tiles > whole) { /* the last rows, padded with zeros to a tile */
        int8_t *last = calloc((size_t)(TILE * k), 1);
        if (!last)
            return -1;
        memcpy(last, w + whole * TILE * k, (size_t)((n - whole * TILE) * k));
        tile_bytes_from_rows(last, k, FMT_Q8, 0, offsets[whole], out + whole * TILE * k);
        free(last);
    }
    return 0;
}

#define ROWS_CHUNK_BYTES (256 << 10) /* weight bytes a thread lays out at a time (L2) */

/* linear() for many rows of x: each thread takes an equal run of the weight's tiles, lays
 * them out ROWS_CHUNK_BYTES at a time in its own scratch (tile_from_rows) and runs the tile
 * kernel over all rows of x for them, x quantised once: no thread waits on another's layout.
 * The numbers of an Int8Tiles copy of the same weight (fp16 scales aside), without holding
 * one: the prefill kernel where the memory budget leaves a layer no copy. n % 16 == 0. With
 * `swiglu` w is a fused gate / up projection (n % 32 == 0) and y [m, n / 2] gets silu(gate) *
 * up: a thread's run is of gate tiles, each laid out with its up tile (n / 32 tiles on). */
HIDDEN int rows_tiled(const float *x, int64_t m, int64_t k, const void *w, const uint16_t *ws,
                      const uint16_t *wz, int64_t group, int64_t n, int fmt, float *y,
                      int32_t offset, int swiglu, int nthreads)
{
    const int64_t blocks = k / BLOCK, tiles = swiglu ? n / (2 * TILE) : n / TILE;
    const int64_t up = swiglu ? tiles * TILE : 0, ldy = swiglu ? n / 2 : n; /* up's first row */
    const int nibbles = in_nibbles(offset);          /* items as tile_gemm_rows makes them: */
    const int per = swiglu || nibbles ? 1 : 2;       /* tiles of y (swiglu: gate tiles) */
    const int64_t layers = swiglu ? 2 : 1;           /* tiles laid out for each */
    const int64_t fit = ROWS_CHUNK_BYTES / (k * TILE * layers) / per * per;
    const int64_t chunk = fit > per ? fit : per;
    tile_rows_x t;
    if (quantize_tile_x(x, m, k, offset, 0, wz != NULL, &t, nthreads) != 0)
        return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t units = (tiles + per - 1) / per; /* split in whole work items */
        const int64_t lo = units * me / team * per, hi_unit = units * (me + 1) / team * per;
        const int64_t hi = hi_unit < tiles ? hi_unit : tiles;
        const int64_t room = chunk * layers; /* tiles of scratch */
        uint8_t *wt = malloc((size_t)(room * TILE * k));
        float *wts = malloc((size_t)(room * TILE * blocks) * sizeof(float));
        float *wtz = wz ? malloc((size_t)(room * TILE * blocks) * sizeof(float)) : NULL;
        failed = !wt || !wts || (wz && !wtz);
        for (int64_t c0 = lo; !failed && c0 < hi; c0 += chunk) {
            const int64_t count = hi - c0 < chunk ? hi - c0 : chunk;
            for (int64_t i = 0; i < count * layers; i++) { /* swiglu: the up tiles after */
                const int64_t row = i < count ? (c0 + i) * TILE : up + (c0 + i - count) * TILE;
                tile_from_rows(w, ws, wz, group, k, fmt, row, offset, wt + i * k * TILE,
                               wts + i * blocks * TILE, wz ? wtz + i * blocks * TILE : NULL);
            }
            for (int64_t first = 0; first < m; first += TILE_SPAN) {
                const int64_t end = first + TILE_SPAN < m ? first + TILE_SPAN : m;
                for (int64_t i = 0; i < count; i += per) {
                    const int nt = swiglu ? 2 : count - i < per ? (int)(count - i) : per;
                    for (int64_t r = first; r < end; r += TILE_ROWS)
                        tile_rows(t.xq + r * k, t.xd + r * blocks, t.xo + r * blocks,
                                  t.xs ? t.xs + r * blocks : NULL, k, wt + i * k * TILE,
                                  wts + i * blocks * TILE, wz ? wtz + i * blocks * TILE : NULL,
                                  (sub_scales){NULL, NULL}, swiglu ? count : 1, y + r * ldy + (c0 + i) * TILE, ldy,
                                  end - r < TILE_ROWS ? (int)(end - r) : TILE_ROWS, nt, swiglu,
                                  nibbles);
                }
            }
        }
        free(wt);
        free(wts);
        free(wtz);
    }
    free_tile_x(&t);
    return failed ? -1 : 0;
}

/* silu(gate) * up [m, n / 2] of a fused gate / up projection held as codelm_q8_linear's,
 * codelm_q4_linear's or codelm_q5_linear's weight (gate rows first; n % 32 == 0), through
 * rows_tiled. */
int codelm_q8_swiglu(const float *x, int64_t m, int64_t k, const int8_t *w, const uint16_t *ws,
                     int64_t group, int64_t n, int32_t offset, float *y, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || n % (2 * TILE) != 0 ||
        nthreads < 1 || (offset != 16 && offset != 128))
        return -1;
    return rows_tiled(x, m, k, w, ws, NULL, group, n, FMT_Q8, y, offset, 1, nthreads);
}

int codelm_q4_swiglu(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *ws,
                     const uint16_t *wz, int64_t group, int64_t n, float *y, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || n % (2 * TILE) != 0 ||
        nthreads < 1 || !wz)
        return -1;
    return rows_tiled(x, m, k, w, ws, wz, group, n, FMT_Q4, y, 8, 1, nthreads);
}

int codelm_q5_swiglu(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *ws,
                     int64_t group, int64_t n, float *y, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || n % (2 * TILE) != 0 ||
        nthreads < 1)
        return -1;
    return rows_tiled(x, m, k, w, ws, NULL, group, n, FMT_Q5, y, 16, 1, nthreads);
}

/* y [m, n] (rows ldy floats apart) = x [m, k] @ w.T from a tiled copy (see above): wt [n /
 * 16][k / 32][8][16][4] bytes holding w + offset (int4: q and 8; int8: w + 128, or w + 16
 * where every w is in -16 .. 15), ws / wz [n / 16][k / 32][16] float scales and zeros (int4
 * only, or NULL). A copy whose tiles take different offsets is called once per run of them,
 * each writing its columns of y. Returns 0, or -1 for a shape that does not tile, another
 * offset, or short memory. */
int codelm_tiles_linear(const float *x, int64_t m, int64_t k, const uint8_t *wt, int32_t offset,
                        const float *ws, const float *wz, int64_t n, int64_t ldy, float *y,
                        int nthreads)
{
    return tiles_gemm(x, m, k, wt, offset, ws, wz, n, y, ldy, 0, nthreads);
}

/* y [m, n] = x w^T for sub-scaled int8 tiles (see sub_column_kernel): wt the tiles of q as
 * signed bytes, sub and wo their sub-scales and offset sums, ws the float scale per channel
 * and block and, where given, wz a zero per channel and block (w = q sc ws + wz), all laid
 * out per tile and block (SubScaledTiles); n % 16 == 0. */
int codelm_sub_tiles_linear(const float *x, int64_t m, int64_t k, const uint8_t *wt,
                            const int8_t *sub, const int32_t *wo, const float *ws, const float *wz,
                            int64_t n, float *y, int nthreads)
{
    if (k % BLOCK != 0 || n % TILE != 0 || nthreads < 1)
        return -1;
    tile_rows_x t;
    if (quantize_tile_x(x, m, k, 0, 1, wz != NULL, &t, nthreads) != 0)
        return -1;
    tile_gemm_rows(t.xq, t.xd, t.xo, t.xs, m, k, wt, ws, wz, (sub_scales){sub, wo}, n / TILE, y,
                   n, 0, 0, nthreads);
    free_tile_x(&t);
    return 0;
}

/* y [m, n / 2] = silu(gate) * up of the same GEMM where w is a fused gate / up projection
 * (layers.silu_and_mul's numbers: its function on the same floats); n % 32 == 0. */
int codelm_tiles_swiglu(const float *x, int64_t m, int64_t k, const uint8_t *wt, int32_t offset,
                        const float *ws, const float *wz, int64_t n, float *y, int nthreads)
{
    return tiles_gemm(x, m, k, wt, offset, ws, wz, n, y, n / 2, 1, nthreads);
}
#endif

#if CODELM_PART == 1 /* (see PARTS above) */
/* ---- One decode step of llama-family blocks, all in C (daemon/engine/fused_decode.py) ----
 * The same arithmetic as the torch modules (RMSNorm, q/k/v with bias, rotate-half RoPE, GQA
 * attention, SwiGLU) around the linear above, without ~20 torch ops per block between the
 * matmuls: at 0.5B a decode step spends as long in those ops as in a third of its weights. */

typedef struct {
    const void *w;
    const uint16_t *scales, *zeros; /* zeros: int4's only */
    const float *bias;              /* NULL: none */
    int64_t group, n, k, format;    /* format: FMT_Q8, FMT_Q4 or FMT_Q5 */
} codelm_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    codelm_linear qkv, out, gate_up, down;
} codelm_block;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim;
    float eps;
} codelm_shape;

static int apply(const codelm_linear *l, const float *x, float *y, int nthreads)
{
    /* one row of x: weight row by weight row (tiled_from 2), so offset 128 goes unread */
    if (linear(x, 1, l->k, l->w, l->scales, l->zeros, l->group, l->n, (int)l->format, y, 128, 2,
               nthreads) != 0)
        return -1;
    for (int64_t i = 0; l->bias && i < l->n; i++)
        y[i] += l->bias[i];
    return 0;
}

/* out = x / sqrt(mean(x^2) + eps) * w */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out)
{
    const float r = 1.0f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * r * w[i];
}

/* HF rotate-half RoPE with Rotary's tables: h * cos + roll(h, hd / 2) * signed sin. */
static void rotate(float *h, const float *cos, const float *sin, int64_t hd)
{
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = h[i], b = h[i + half];
        h[i] = a * cos[i] + b * sin[i];
        h[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* The two above for a prompt's rows (layers.RMSNorm, layers.qkv_heads): torch spends ~1 ms on
 * a 512 x 896 RMSNorm in five passes, and RoPE allocates four tensors per block. */
void codelm_rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps,
                     float *out, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++)
        rms_norm(x + i * n, w, n, eps, out + i * n);
}

/* Rotates, in place, the first `heads` heads of each row of x (row i at x + i * stride) by
 * row i of cos / sin [rows, hd]. */
void codelm_rotate_heads(float *x, int64_t rows, int64_t stride, int64_t heads, int64_t hd,
                         const float *cos, const float *sin, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++)
        for (int64_t h = 0; h < heads; h++)
            rotate(x + i * stride + h * hd, cos + i * hd, sin + i * hd, hd);
}

/* x [dim] (the embedded token, updated in place to the last block's output) at position pos:
 * every block's k / v rows are written at pos of k_cache / v_cache [n_layers, n_kv_heads,
 * capacity, head_dim] (float32, or fp16 where `half`) and attended over [0, pos]; cos / sin
 * are Rotary's rows for pos. Returns 0, or -1 when memory for scratch is short (x is then
 * partly updated). */
int codelm_decode_step(const codelm_block *blocks, const codelm_shape *s, float *x,
                       void *k_cache, void *v_cache, int64_t capacity, int64_t pos,
                       const float *cos, const float *sin, int half, int nthreads)
{
    const int64_t hd = s->head_dim, heads = s->n_heads, kv_heads = s->n_kv_heads;
    const int64_t dim = s->dim, ffn = s->ffn_dim, n_keys = pos + 1;
    const int64_t n_qkv = (heads + 2 * kv_heads) * hd;
    const int64_t layer_stride = kv_heads * capacity * hd;
    float *buf = malloc((size_t)(dim + n_qkv + heads * hd + 3 * ffn + heads * n_keys) *
                        sizeof(float));
    if (!buf)
        return -1;
    float *h = buf, *qkv = h + dim, *att = qkv + n_qkv, *gate_up = att + heads * hd;
    float *act = gate_up + 2 * ffn, *scores = act + ffn;
    int rc = 0;
    for (int64_t layer = 0; layer < s->n_layers && rc == 0; layer++) {
        const codelm_block *b = blocks + layer;
        void *kc = (void *)kv_at(k_cache, layer * layer_stride, half);
        void *vc = (void *)kv_at(v_cache, layer * layer_stride, half);
        rms_norm(x, b->attn_norm, dim, s->eps, h);
        if ((rc = apply(&b->qkv, h, qkv, nthreads)) != 0)
            break;
        for (int64_t head = 0; head < heads + kv_heads; head++)
            rotate(qkv + head * hd, cos, sin, hd);
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t row = (g * capacity + pos) * hd;
            kv_put(kc, row, qkv + (heads + g) * hd, hd, half);
            kv_put(vc, row, qkv + (heads + kv_heads + g) * hd, hd, half);
        }
        attend_position(qkv, kc, vc, capacity, heads, kv_heads, hd, n_keys, scores, att, half,
                        nthreads);
        if ((rc = apply(&b->out, att, h, nthreads)) != 0)
            break;
        for (int64_t i = 0; i < dim; i++)
            x[i] += h[i];
        rms_norm(x, b->ffn_norm, dim, s->eps, h);
        if ((rc = apply(&b->gate_up, h, gate_up, nthreads)) != 0)
            break;
        silu_mul(gate_up, gate_up + ffn, ffn, act);
        if ((rc = apply(&b->down, act, h, nthreads)) != 0)
            break;
        for (int64_t i = 0; i < dim; i++)
            x[i] += h[i];
    }
    free(buf);
    return rc;
}
#endif
