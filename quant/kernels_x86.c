/* codelm's own x86 kernel: int8 weights times int8 activations, for CPUs whose torch has no
 * fast weight-only path (AVX2 without bf16 hardware; docs/quant.md, "Native kernel").
 *
 * y[m, n] = x[m, k] @ w[n, k].T with x quantised on the fly in blocks of 32 values (one float
 * scale each, absmax / 127), so each block's dot product is exact in int32 and only x's
 * rounding is new error. w is int8 scaled (fp16) per output channel or per group of 32 or more
 * (GGUF Q8_0's blocks), or int4 as (q - 8) * scale + zero per group (GGUF Q4_0 / Q4_1).
 *
 * Built by native.py with the machine's own compiler (-O3 -march=native -fopenmp) and called
 * through ctypes; OpenMP resolves to the libgomp torch has loaded, so both share one pool. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(__AVX2__) || !defined(__F16C__)
#error "codelm's native kernel needs AVX2 and F16C"
#endif

#define BLOCK 32
#define MAX_GROUPS 4096 /* K up to 131072 in groups of 32 */

int codelm_kernels_abi(void) { return 4; }

/* x [rows, k] -> xq [rows, k] int8, xd [rows, k / BLOCK]: scale per block of 32. Where xsum
 * and xqsum are given, also per block: the float sum of x, and xd times the sum of xq (for
 * int4's zero points and its -8 offset). */
static void quantize_blocks(const float *x, int64_t blocks, int8_t *xq, float *xd, float *xsum,
                            float *xqsum)
{
    for (int64_t b = 0; b < blocks; b++) {
        const float *src = x + b * BLOCK;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            amax = fmaxf(amax, fabsf(src[j]));
            sum += src[j];
        }
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        int qsum = 0;
        xd[b] = d;
        for (int j = 0; j < BLOCK; j++) {
            const int q = (int)nearbyintf(src[j] * inv);
            xq[b * BLOCK + j] = (int8_t)q;
            qsum += q;
        }
        if (xsum) {
            xsum[b] = sum;
            xqsum[b] = d * (float)qsum;
        }
    }
}

/* 32 int8 products summed in 8 int32 lanes. maddubs takes unsigned x signed bytes, so w's sign
 * moves onto x: |w| <= 128 and |x| <= 127 keep each pair sum within int16. */
static inline __m256i dot32(const int8_t *w, const int8_t *x)
{
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    const __m256i wabs = _mm256_sign_epi8(wv, wv);
    const __m256i xs = _mm256_sign_epi8(xv, wv);
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, xs);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void fp16_to_fp32(const uint16_t *src, float *dst, int64_t count)
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < count; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

/* c[i] = a[i] * b[i]: a block's two scales combined once, 8 blocks at a time */
static void mul_f32(const float *a, const float *b, float *c, int64_t count)
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(c + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    for (; i < count; i++)
        c[i] = a[i] * b[i];
}

static inline __m256 fma_block(const int8_t *w, const int8_t *x, float scale, __m256 acc)
{
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(dot32(w, x)), acc);
}

/* One output: sum over blocks of xd[b] * ws[group of b] * (w . x in block b). Independent
 * accumulators keep several blocks in flight: one chain waits on each fmadd's latency. */
static float row_dot(const int8_t *w, const float *ws, int64_t per_group, const int8_t *xq,
                     const float *xd, int64_t blocks)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t b = 0;
    if (per_group == 1) { /* GGUF Q8_0: a scale per block */
        float c[MAX_GROUPS];
        mul_f32(xd, ws, c, blocks);
        for (; b + 4 <= blocks; b += 4) {
            a0 = fma_block(w + b * BLOCK, xq + b * BLOCK, c[b], a0);
            a1 = fma_block(w + (b + 1) * BLOCK, xq + (b + 1) * BLOCK, c[b + 1], a1);
            a2 = fma_block(w + (b + 2) * BLOCK, xq + (b + 2) * BLOCK, c[b + 2], a2);
            a3 = fma_block(w + (b + 3) * BLOCK, xq + (b + 3) * BLOCK, c[b + 3], a3);
        }
        for (; b < blocks; b++)
            a0 = fma_block(w + b * BLOCK, xq + b * BLOCK, c[b], a0);
    } else { /* per group of several blocks (per channel: one group), scaled at its end */
        for (int64_t g = 0; b < blocks; g++) {
            const int64_t end = b + per_group;
            __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
            for (; b + 2 <= end; b += 2) {
                g0 = fma_block(w + b * BLOCK, xq + b * BLOCK, xd[b], g0);
                g1 = fma_block(w + (b + 1) * BLOCK, xq + (b + 1) * BLOCK, xd[b + 1], g1);
            }
            if (b < end) {
                g0 = fma_block(w + b * BLOCK, xq + b * BLOCK, xd[b], g0);
                b++;
            }
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[g]), _mm256_add_ps(g0, g1), a0);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* w [n, k] int8 with fp16 scales ws [n, k / group] (group: a multiple of BLOCK dividing k;
 * k for one scale per row; fp16 as GGUF Q8_0 stores them). Returns 0, or -1 for such a shape mismatch or no scratch memory. */
int codelm_q8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const uint16_t *ws,
                     int64_t group, int64_t n, float *y, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || k / group > MAX_GROUPS)
        return -1;
    const int64_t blocks = k / BLOCK, groups = k / group;
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc((size_t)(m * blocks) * sizeof(float));
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return -1;
    }
    quantize_blocks(x, m * blocks, xq, xd, NULL, NULL);
    /* Rows of w outer: each weight row is read from memory once and reused for all m rows. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int8_t *wr = w + r * k;
        float wsr[MAX_GROUPS];
        fp16_to_fp32(ws + r * groups, wsr, groups);
        for (int64_t i = 0; i < m; i++)
            y[i * n + r] = row_dot(wr, wsr, group / BLOCK, xq + i * k, xd + i * blocks, blocks);
    }
    free(xq);
    free(xd);
    return 0;
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

/* 32 int4 weights (16 bytes: element j in the low nibble of byte j, element j + 16 in its
 * high nibble, as Int4Native repacks them) times 32 int8 x, as 8 int32 lanes; q is 0..15. */
static inline __m256i dot32_q4(const uint8_t *w, const int8_t *x)
{
    /* Both halves of the block's 16 bytes, the upper lane shifted down a nibble. */
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w));
    const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(both, shift), _mm256_set1_epi8(0x0F));
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), _mm256_set1_epi16(1));
#endif
}

static inline __m256 fma_block_q4(const uint8_t *w, const int8_t *x, float scale, __m256 acc)
{
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(dot32_q4(w, x)), acc);
}

/* sum over groups of scale * sum_b xd[b] * (q . xq)_b; the -8 and zero terms come separately. */
static float row_dot_q4(const uint8_t *w, const float *ws, int64_t per_group, const int8_t *xq,
                        const float *xd, int64_t blocks)
{
    const int64_t half = BLOCK / 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t b = 0;
    if (per_group == 1) {
        float c[MAX_GROUPS];
        mul_f32(xd, ws, c, blocks);
        for (; b + 4 <= blocks; b += 4) {
            a0 = fma_block_q4(w + b * half, xq + b * BLOCK, c[b], a0);
            a1 = fma_block_q4(w + (b + 1) * half, xq + (b + 1) * BLOCK, c[b + 1], a1);
            a2 = fma_block_q4(w + (b + 2) * half, xq + (b + 2) * BLOCK, c[b + 2], a2);
            a3 = fma_block_q4(w + (b + 3) * half, xq + (b + 3) * BLOCK, c[b + 3], a3);
        }
        for (; b < blocks; b++)
            a0 = fma_block_q4(w + b * half, xq + b * BLOCK, c[b], a0);
    } else {
        for (int64_t g = 0; b < blocks; g++) {
            const int64_t end = b + per_group;
            __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
            for (; b + 2 <= end; b += 2) {
                g0 = fma_block_q4(w + b * half, xq + b * BLOCK, xd[b], g0);
                g1 = fma_block_q4(w + (b + 1) * half, xq + (b + 1) * BLOCK, xd[b + 1], g1);
            }
            if (b < end) {
                g0 = fma_block_q4(w + b * half, xq + b * BLOCK, xd[b], g0);
                b++;
            }
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[g]), _mm256_add_ps(g0, g1), a0);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* w [n, k / 2] int4 (see dot32_q4) with fp16 scales ws and zeros wz [n, k / group]:
 * w = (q - 8) * scale + zero. Same return values as codelm_q8_linear. */
int codelm_q4_linear(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *ws,
                     const uint16_t *wz, int64_t group, int64_t n, float *y, int nthreads)
{
    if (k % BLOCK != 0 || group % BLOCK != 0 || k % group != 0 || k / group > MAX_GROUPS)
        return -1;
    const int64_t blocks = k / BLOCK, groups = k / group, per_group = group / BLOCK;
    int8_t *xq = malloc((size_t)(m * k));
    float *xd = malloc((size_t)(m * blocks) * sizeof(float));
    float *bsum = malloc((size_t)(m * blocks) * 2 * sizeof(float));
    /* Per row of x and group: the sum of x (meets the zero), the sum of xd * xq (meets -8). */
    float *gsum = calloc((size_t)(m * groups) * 2, sizeof(float));
    if (!xq || !xd || !bsum || !gsum) {
        free(xq);
        free(xd);
        free(bsum);
        free(gsum);
        return -1;
    }
    float *gsum_q = gsum + m * groups;
    quantize_blocks(x, m * blocks, xq, xd, bsum, bsum + m * blocks);
    for (int64_t b = 0; b < m * blocks; b++) {
        const int64_t g = b / per_group; /* blocks of one row of x never share a group */
        gsum[g] += bsum[b];
        gsum_q[g] += bsum[m * blocks + b];
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float scale[MAX_GROUPS], zero[MAX_GROUPS];
        fp16_to_fp32(ws + r * groups, scale, groups);
        fp16_to_fp32(wz + r * groups, zero, groups);
        const uint8_t *wr = w + r * (k / 2);
        for (int64_t i = 0; i < m; i++) {
            const float offset = dot_f32(zero, gsum + i * groups, groups) -
                                 8.0f * dot_f32(scale, gsum_q + i * groups, groups);
            y[i * n + r] =
                row_dot_q4(wr, scale, per_group, xq + i * k, xd + i * blocks, blocks) + offset;
        }
    }
    free(xq);
    free(xd);
    free(bsum);
    free(gsum);
    return 0;
}
