/*
 * Scaled double gather: the one kernel behind MM-obfuscation's mask and unmask.
 *
 *     out[b, i, j] = (row_scale[b', i] * col_scale[b'', j]) * src[b, row_idx[b', i], col_idx[b'', j]]
 *
 * where b' = b when row keys are per slice (row_key_stride == rows) and 0 when shared
 * (row_key_stride == 0); the same for columns. `out` is contiguous; `src` has unit column stride
 * and any slice and row strides. Indices are int32.
 *
 * Why C: a torch composition (index_select twice, then a scaling pass) walks the matrix three
 * times and reaches 5% of a plain copy's bandwidth. Here each output row reads one source row
 * (row_idx picks it), gathers inside it, scales, and writes once: one read and one write of
 * every element, the floor of any copy.
 *
 * What makes it fast (measured on an AMD EPYC Zen 3, see docs/BENCHMARKS.md):
 *  - Prefetch: the gather visits a source row in random order, which the hardware prefetcher
 *    cannot follow, so every cache line would be a full memory round trip. While row i is
 *    gathered, row i+1's lines are prefetched in step (one line per line of output), so the
 *    next row is in L2 when its turn comes. This alone took 1.2 to 0.8 ns per element.
 *  - Non-temporal stores when the caller asks (`stream`): an encrypted operand is written once
 *    and not read back here (it goes to the relays), so streaming stores skip the
 *    read-for-ownership of each line. Decrypted results are read next, so they are not streamed.
 *  - SSE2 lanes assembled from scalar loads, then one vector multiply per 4 floats (2 doubles):
 *    on Zen 3 this beat both plain scalar code and AVX2's vgatherdps. SSE2 is part of every
 *    x86-64 CPU; other architectures get a plain C loop.
 *  - One row at a time for wide rows: blocking several output rows over one pass of the column
 *    key put power-of-two-strided output streams into the same L1 sets and was slower.
 *  - Outputs that stay in cache (decrypted results): float32 goes by transposed 8x8 tiles
 *    (AVX, chosen at run time), where the column gather moves whole vectors, not elements;
 *    float64 and CPUs without AVX by 4-row SSE2 blocks. See the comments at each.
 * The two multiplies are never fused, so results are bit-identical to the pure-torch fallback,
 * which computes (r * c) * x as well.
 *
 * The Python wrapper (tempo/core/obfuscation.py) checks shapes, strides, dtypes and index
 * bounds before calling; this file trusts them. Work is split by output rows over torch's
 * OpenMP pool when built with OpenMP (else POSIX threads); the GIL is released meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

typedef struct {
    char *out;
    const char *src;
    int64_t rows, cols;
    int64_t s_slice, s_row; /* source strides, in elements */
    const int32_t *row_idx;
    const char *row_scale;
    int64_t row_key_stride;
    const int32_t *col_idx;
    const char *col_scale;
    int64_t col_key_stride;
    int64_t begin, end; /* flattened (slice, row) range for one thread */
    int stream;         /* use non-temporal stores */
    float *tile;        /* scratch of TILE_ROWS * cols floats for the transposed-tile path, or NULL */
} job_t;

/* Source row of flattened output row t. */
static inline const char *source_row(const job_t *jb, int64_t t, size_t esize) {
    const int64_t b = t / jb->rows, i = t - b * jb->rows;
    const int64_t off = b * jb->s_slice + (int64_t)jb->row_idx[b * jb->row_key_stride + i] * jb->s_row;
    return jb->src + (size_t)off * esize;
}

/* Transposed tiles (float32, AVX): the fastest in-cache path, taken for outputs that are not
 * streamed, by groups of 8 rows of one slice. A column permutation moves single elements, which
 * SIMD cannot do from a row; in a transposed layout it moves whole 8-float vectors. So:
 *   pass 1: the group's 8 source rows (picked by row_idx), 8x8 blocks transposed in registers,
 *           into a scratch of `cols` vectors: X[j] = column j of those rows (stays in L1/L2);
 *   pass 2: for 8 output columns, the 8 vectors X[col_idx[j..j+7]] are loaded whole, transposed
 *           back, scaled ((r * c) * x, as everywhere) and stored as 8 output row pieces.
 * Two transposes cost 48 shuffles per 64 elements, against one scalar load and lane insert per
 * element for the row-wise gather. Measured on Zen 3 at 4096x256, one thread: 0.22-0.23 ns per
 * element against 0.335 for the 4-row SSE2 blocks below and 0.12-0.15 for memcpy. AVX (not
 * AVX2) suffices; the CPU is asked at run time, and without AVX the SSE2 path runs.
 * Each group prefetches the next group's source rows and output lines in step. Where earlier
 * work has pushed the operands out to memory (the benchmark times decrypt right after 136 MiB
 * of encryption), that took decrypt from 0.46-0.48 to 0.53-0.54 of a plain copy; in a quiet
 * loop over cached operands it costs about 10%. */
#define TILE_ROWS 8
#define TILE_MAX_COLS 2048 /* wider: rows 16 KiB apart alias in L1 and tiles lost ~10% */
#if HAVE_SSE2 && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TILE_OK 1
#define AVX_FN __attribute__((target("avx")))
AVX_FN static inline void transpose8(__m256 *r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Output rows t..t+7 (rows i..i+7 of slice b). X: TILE_ROWS * cols floats, 32-byte aligned. */
AVX_FN static void tile8_f32(const job_t *jb, int64_t t, int64_t b, int64_t i, float *X) {
    const int64_t cols = jb->cols, cols8 = cols & ~(int64_t)7;
    const int32_t *ci = jb->col_idx + b * jb->col_key_stride;
    const float *cs = (const float *)jb->col_scale + b * jb->col_key_stride;
    const float *rs = (const float *)jb->row_scale + b * jb->row_key_stride + i;
    const float *s[TILE_ROWS], *nx[TILE_ROWS];
    /* the next group's source rows are prefetched in step, one cache line per row per 16
     * columns, so that rows coming from memory (cold operands) are in cache when their turn
     * comes: the row permutation defeats the hardware prefetcher across rows. */
    const float *base = (const float *)jb->src + b * jb->s_slice;
    const int32_t *ri = jb->row_idx + b * jb->row_key_stride + i;
    /* (no division here: at 2048 elements a group, a few 64-bit divisions are a visible cost) */
    const int ahead = i + 2 * TILE_ROWS <= jb->rows && t + 2 * TILE_ROWS <= jb->end;
    for (int k = 0; k < TILE_ROWS; ++k) {
        s[k] = base + (int64_t)ri[k] * jb->s_row;
        nx[k] = ahead ? base + (int64_t)ri[TILE_ROWS + k] * jb->s_row : s[k];
    }
    __m256 v[TILE_ROWS];
    for (int64_t j = 0; j < cols8; j += 8) {
        if (ahead && (j & 15) == 0)
            for (int k = 0; k < TILE_ROWS; ++k) __builtin_prefetch(nx[k] + j, 0, 2);
        for (int k = 0; k < TILE_ROWS; ++k) v[k] = _mm256_loadu_ps(s[k] + j);
        transpose8(v);
        for (int k = 0; k < TILE_ROWS; ++k) _mm256_store_ps(X + (j + k) * TILE_ROWS, v[k]);
    }
    for (int64_t j = cols8; j < cols; ++j)
        for (int k = 0; k < TILE_ROWS; ++k) X[j * TILE_ROWS + k] = s[k][j];
    float *o = (float *)jb->out + t * cols;
    /* the next group's output (the next 8 * cols floats) is prefetched for writing in step: 4
     * cache lines per 8 columns covers it; the 8 interleaved row streams written here are a
     * pattern the hardware prefetcher follows poorly when they come from memory */
    const float *on = o + TILE_ROWS * cols;
    const int oahead = t + 2 * TILE_ROWS <= jb->end;
    __m256 rv[TILE_ROWS];
    for (int k = 0; k < TILE_ROWS; ++k) rv[k] = _mm256_set1_ps(rs[k]);
    for (int64_t j = 0; j < cols8; j += 8) {
        if (oahead)
            for (int u = 0; u < 4; ++u) __builtin_prefetch(on + ((j >> 3) * 4 + u) * 16, 1, 2);
        for (int k = 0; k < TILE_ROWS; ++k) v[k] = _mm256_load_ps(X + (int64_t)ci[j + k] * TILE_ROWS);
        transpose8(v);
        const __m256 cv = _mm256_loadu_ps(cs + j);
        for (int k = 0; k < TILE_ROWS; ++k)
            _mm256_storeu_ps(o + k * cols + j, _mm256_mul_ps(_mm256_mul_ps(rv[k], cv), v[k]));
    }
    for (int64_t j = cols8; j < cols; ++j)
        for (int k = 0; k < TILE_ROWS; ++k)
            o[k * cols + j] = (rs[k] * cs[j]) * X[(int64_t)ci[j] * TILE_ROWS + k];
}

static int cpu_has_avx(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") ? 1 : 0;
}
#else
#define TILE_OK 0
static void tile8_f32(const job_t *jb, int64_t t, int64_t b, int64_t i, float *X) {
    (void)jb, (void)t, (void)b, (void)i, (void)X;
}
static int cpu_has_avx(void) { return 0; }
#endif
#define TILE_F32(jb, t, b, i) tile8_f32(jb, t, b, i, (jb)->tile)
#define TILE_NONE(jb, t, b, i) ((void)0)

/* Narrow outputs that stay in cache (no streaming, at most BLOCK_MAX_COLS columns) go 4 rows per
 * pass over the column key: each index and scale is loaded once for 4 rows. Measured on Zen 3
 * at 256 columns: 0.46 -> 0.35 ns per element; at 8192 columns no gain (and rows 32 KiB apart
 * alias in L1), hence the bound. The next block's source rows are prefetched in step. */
#define BLOCK_ROWS 4
#define BLOCK_MAX_COLS 2048
#if HAVE_SSE2
#define BLOCK_OK 1
static void block4_f32(float *o, const float *const *s, const int32_t *ci, const float *cs,
                       const float *r, int64_t cols, const float *const *nx, int nnx) {
    const __m128 r0 = _mm_set1_ps(r[0]), r1 = _mm_set1_ps(r[1]), r2 = _mm_set1_ps(r[2]),
                 r3 = _mm_set1_ps(r[3]);
    const float *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
        if ((j & 15) == 0)
            for (int k = 0; k < nnx; ++k) __builtin_prefetch(nx[k] + j, 0, 2);
        const int32_t c0 = ci[j], c1 = ci[j + 1], c2 = ci[j + 2], c3 = ci[j + 3];
        const __m128 cv = _mm_loadu_ps(cs + j);
        _mm_storeu_ps(o + j, _mm_mul_ps(_mm_mul_ps(r0, cv), _mm_set_ps(s0[c3], s0[c2], s0[c1], s0[c0])));
        _mm_storeu_ps(o + cols + j,
                      _mm_mul_ps(_mm_mul_ps(r1, cv), _mm_set_ps(s1[c3], s1[c2], s1[c1], s1[c0])));
        _mm_storeu_ps(o + 2 * cols + j,
                      _mm_mul_ps(_mm_mul_ps(r2, cv), _mm_set_ps(s2[c3], s2[c2], s2[c1], s2[c0])));
        _mm_storeu_ps(o + 3 * cols + j,
                      _mm_mul_ps(_mm_mul_ps(r3, cv), _mm_set_ps(s3[c3], s3[c2], s3[c1], s3[c0])));
    }
    for (; j < cols; ++j)
        for (int k = 0; k < BLOCK_ROWS; ++k) o[k * cols + j] = (r[k] * cs[j]) * s[k][ci[j]];
}
static void block4_f64(double *o, const double *const *s, const int32_t *ci, const double *cs,
                       const double *r, int64_t cols, const double *const *nx, int nnx) {
    const __m128d r0 = _mm_set1_pd(r[0]), r1 = _mm_set1_pd(r[1]), r2 = _mm_set1_pd(r[2]),
                  r3 = _mm_set1_pd(r[3]);
    const double *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
    int64_t j = 0;
    for (; j + 2 <= cols; j += 2) {
        if ((j & 7) == 0)
            for (int k = 0; k < nnx; ++k) __builtin_prefetch(nx[k] + j, 0, 2);
        const int32_t c0 = ci[j], c1 = ci[j + 1];
        const __m128d cv = _mm_loadu_pd(cs + j);
        _mm_storeu_pd(o + j, _mm_mul_pd(_mm_mul_pd(r0, cv), _mm_set_pd(s0[c1], s0[c0])));
        _mm_storeu_pd(o + cols + j, _mm_mul_pd(_mm_mul_pd(r1, cv), _mm_set_pd(s1[c1], s1[c0])));
        _mm_storeu_pd(o + 2 * cols + j, _mm_mul_pd(_mm_mul_pd(r2, cv), _mm_set_pd(s2[c1], s2[c0])));
        _mm_storeu_pd(o + 3 * cols + j, _mm_mul_pd(_mm_mul_pd(r3, cv), _mm_set_pd(s3[c1], s3[c0])));
    }
    for (; j < cols; ++j)
        for (int k = 0; k < BLOCK_ROWS; ++k) o[k * cols + j] = (r[k] * cs[j]) * s[k][ci[j]];
}
#else
#define BLOCK_OK 0
#define block4_f32(...) ((void)0)
#define block4_f64(...) ((void)0)
#endif

/* Generic row loop: PER_LINE elements fill one cache line; LINE(o, j) does one line of output
 * (the x86 build assembles 4 or 2 lanes per SSE2 register, the portable one is scalar). */
#define DEFINE_GATHER(NAME, T, PER_LINE, LINE_STORE, LINE_STREAM, BLOCK4, TILE)                      \
    static void NAME(const job_t *jb) {                                                      \
        const int64_t cols = jb->cols;                                                       \
        const T *rs = (const T *)jb->row_scale;                                              \
        const T *cs_all = (const T *)jb->col_scale;                                          \
        const T *next = NULL; /* row t's source when known ahead (prefetched in step) */     \
        for (int64_t t = jb->begin; t < jb->end; ++t) {                                      \
            const int64_t b = t / jb->rows, i = t - b * jb->rows;                            \
            if (jb->tile && i + TILE_ROWS <= jb->rows && t + TILE_ROWS <= jb->end) {             \
                TILE(jb, t, b, i); /* prefetches its own next group */                       \
                t += TILE_ROWS - 1;                                                          \
                next = NULL;                                                                 \
                continue;                                                                    \
            }                                                                                \
            const T *srow = next ? next : (const T *)source_row(jb, t, sizeof(T));           \
            next = t + 1 < jb->end ? (const T *)source_row(jb, t + 1, sizeof(T)) : NULL;     \
            const int32_t *ci = jb->col_idx + b * jb->col_key_stride;                        \
            const T *cs = cs_all + b * jb->col_key_stride;                                   \
            const T r = rs[b * jb->row_key_stride + i];                                      \
            T *o = (T *)jb->out + t * cols;                                                  \
            if (BLOCK_OK && !jb->stream && cols <= BLOCK_MAX_COLS && i + BLOCK_ROWS <= jb->rows \
                && t + BLOCK_ROWS <= jb->end) {                                              \
                const T *s4[BLOCK_ROWS], *nx[BLOCK_ROWS];                                    \
                T r4[BLOCK_ROWS];                                                            \
                int nnx = 0;                                                                 \
                for (int k = 0; k < BLOCK_ROWS; ++k) {                                       \
                    s4[k] = k == 0 ? srow : (const T *)source_row(jb, t + k, sizeof(T));     \
                    r4[k] = rs[b * jb->row_key_stride + i + k];                              \
                    if (t + BLOCK_ROWS + k < jb->end)                                        \
                        nx[nnx++] = (const T *)source_row(jb, t + BLOCK_ROWS + k, sizeof(T)); \
                }                                                                            \
                BLOCK4(o, s4, ci, cs, r4, cols, nx, nnx);                                    \
                t += BLOCK_ROWS - 1;                                                         \
                next = t + 1 < jb->end ? (const T *)source_row(jb, t + 1, sizeof(T)) : NULL; \
                continue;                                                                    \
            }                                                                                \
            int64_t j = 0;                                                                   \
            if (jb->stream && ((uintptr_t)o & 15) == 0) {                                    \
                for (; j + PER_LINE <= cols; j += PER_LINE) {                                \
                    if (next) __builtin_prefetch(next + j, 0, 2);                            \
                    LINE_STREAM(o + j, srow, ci + j, cs + j, r);                             \
                }                                                                            \
            } else {                                                                         \
                for (; j + PER_LINE <= cols; j += PER_LINE) {                                \
                    if (next) __builtin_prefetch(next + j, 0, 2);                            \
                    LINE_STORE(o + j, srow, ci + j, cs + j, r);                              \
                }                                                                            \
            }                                                                                \
            if (next && j < cols) __builtin_prefetch(next + j, 0, 2);                        \
            for (; j < cols; ++j) o[j] = (r * cs[j]) * srow[ci[j]];                          \
        }                                                                                    \
    }

#if HAVE_SSE2
/* Four scalar loads assembled into one register beat AVX2's vgatherdps on Zen 3. */
#define F32_LINE(o, sr, c, s, r, STORE)                                                      \
    do {                                                                                     \
        const __m128 rv = _mm_set1_ps((r));                                                    \
        for (int q = 0; q < 16; q += 4) {                                                    \
            const float *sr_ = (sr);                                                      \
            const int32_t *c_ = (c);                                                       \
            const __m128 g = _mm_set_ps(sr_[c_[q + 3]], sr_[c_[q + 2]], sr_[c_[q + 1]], sr_[c_[q]]); \
            STORE((o) + q, _mm_mul_ps(_mm_mul_ps(rv, _mm_loadu_ps((s) + q)), g));            \
        }                                                                                    \
    } while (0)
#define F64_LINE(o, sr, c, s, r, STORE)                                                      \
    do {                                                                                     \
        const __m128d rv = _mm_set1_pd((r));                                                   \
        for (int q = 0; q < 8; q += 2) {                                                     \
            const double *sr_ = (sr);                                                     \
            const int32_t *c_ = (c);                                                       \
            const __m128d g = _mm_set_pd(sr_[c_[q + 1]], sr_[c_[q]]);                     \
            STORE((o) + q, _mm_mul_pd(_mm_mul_pd(rv, _mm_loadu_pd((s) + q)), g));            \
        }                                                                                    \
    } while (0)
#define F32_STORE(o, sr, c, s, r) F32_LINE(o, sr, c, s, r, _mm_storeu_ps)
#define F32_STREAM(o, sr, c, s, r) F32_LINE(o, sr, c, s, r, _mm_stream_ps)
#define F64_STORE(o, sr, c, s, r) F64_LINE(o, sr, c, s, r, _mm_storeu_pd)
#define F64_STREAM(o, sr, c, s, r) F64_LINE(o, sr, c, s, r, _mm_stream_pd)
#else
#define SCALAR_LINE(N, o, sr, c, s, r)                                                       \
    do {                                                                                     \
        for (int q = 0; q < (N); ++q) (o)[q] = ((r) * (s)[q]) * (sr)[(c)[q]];                \
    } while (0)
#define F32_STORE(o, sr, c, s, r) SCALAR_LINE(16, o, sr, c, s, r)
#define F32_STREAM F32_STORE
#define F64_STORE(o, sr, c, s, r) SCALAR_LINE(8, o, sr, c, s, r)
#define F64_STREAM F64_STORE
#endif

DEFINE_GATHER(gather_f32, float, 16, F32_STORE, F32_STREAM, block4_f32, TILE_F32)
DEFINE_GATHER(gather_f64, double, 8, F64_STORE, F64_STREAM, block4_f64, TILE_NONE)

typedef struct {
    job_t job;
    int dtype;
} task_t;

static int tiles_enabled = 1; /* switched by use_tiles(), for tests and measurements */
static int have_avx = 0;      /* asked of the CPU once, when the module loads */

static void *run_task(void *arg) {
    const task_t *tk = (const task_t *)arg;
    job_t jb = tk->job;
    jb.tile = NULL;
    if (tk->dtype == 0) {
        /* If the scratch cannot be had, the row-wise paths do the work: same result. */
        if (TILE_OK && tiles_enabled && !jb.stream && jb.rows >= TILE_ROWS && jb.cols >= 8
            && jb.cols <= TILE_MAX_COLS && jb.end - jb.begin >= TILE_ROWS && have_avx)
            jb.tile = aligned_alloc(32, (size_t)jb.cols * TILE_ROWS * sizeof(float));
        gather_f32(&jb);
        free(jb.tile);
    } else {
        gather_f64(&jb);
    }
#if HAVE_SSE2
    if (jb.stream) _mm_sfence(); /* streaming stores are weakly ordered */
#endif
    return NULL;
}

#define MAX_THREADS 256

/* The number of jobs to split `units` of work into: the caller's threads, at least 1, at most
 * MAX_THREADS and at most one per unit. */
static int clamp_threads(int nthreads, int64_t units) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (units < nthreads) nthreads = (int)units;
    return nthreads;
}

/* Runs fn on each of `count` jobs laid out `stride` bytes apart, with the GIL released by the
 * caller. With OpenMP: torch is imported first and its bundled runtime has the soname
 * libgomp.so.1, so this resolves to torch's own OpenMP pool: its workers are already up (often
 * spinning after torch's last parallel op) and take the work at once, instead of our threads
 * fighting them for the cores. If the runtime gives fewer threads, each takes several jobs.
 * Without OpenMP: POSIX threads; job 0 runs on the calling thread, and a job whose thread cannot
 * be created runs there too, so the work is complete either way. */
static void run_jobs(void *(*fn)(void *), char *jobs, size_t stride, int count) {
#ifdef _OPENMP
    if (count > 1) {
#pragma omp parallel num_threads(count)
        {
            const int nt = omp_get_num_threads();
            for (int k = omp_get_thread_num(); k < count; k += nt) fn(jobs + (size_t)k * stride);
        }
    } else {
        fn(jobs);
    }
#else
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 1; k < count; ++k)
        started[k] = pthread_create(&tids[k], NULL, fn, jobs + (size_t)k * stride) == 0;
    fn(jobs);
    for (int k = 1; k < count; ++k) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            fn(jobs + (size_t)k * stride);
    }
#endif
}

static PyObject *scaled_gather(PyObject *Py_UNUSED(self), PyObject *args) {
    int dtype, nthreads, stream;
    unsigned long long out, src, row_idx, row_scale, col_idx, col_scale;
    long long slices, rows, cols, s_slice, s_row, s_col, rks, cks;
    if (!PyArg_ParseTuple(args, "iKKLLLLLLKKLKKLip", &dtype, &out, &src, &slices, &rows, &cols,
                          &s_slice, &s_row, &s_col, &row_idx, &row_scale, &rks, &col_idx,
                          &col_scale, &cks, &nthreads, &stream))
        return NULL;
    if (dtype != 0 && dtype != 1) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32) or 1 (float64)");
        return NULL;
    }
    if (s_col != 1) {
        PyErr_SetString(PyExc_ValueError, "source must have unit column stride");
        return NULL;
    }
    if (slices < 0 || rows < 0 || cols < 0 || cols > INT32_MAX || rows > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "sizes must be in [0, 2**31)");
        return NULL;
    }
    const int64_t total = (int64_t)slices * rows;
    if (total == 0 || cols == 0) Py_RETURN_NONE;
    nthreads = clamp_threads(nthreads, total);

    task_t tasks[MAX_THREADS];
    for (int k = 0; k < nthreads; ++k) {
        job_t *jb = &tasks[k].job;
        jb->out = (char *)(uintptr_t)out;
        jb->src = (const char *)(uintptr_t)src;
        jb->rows = rows;
        jb->cols = cols;
        jb->s_slice = s_slice;
        jb->s_row = s_row;
        jb->row_idx = (const int32_t *)(uintptr_t)row_idx;
        jb->row_scale = (const char *)(uintptr_t)row_scale;
        jb->row_key_stride = rks;
        jb->col_idx = (const int32_t *)(uintptr_t)col_idx;
        jb->col_scale = (const char *)(uintptr_t)col_scale;
        jb->col_key_stride = cks;
        /* shares start on multiples of TILE_ROWS rows, so tiles are rarely cut */
        jb->begin = k == 0 ? 0 : (total * k / nthreads) & ~(int64_t)(TILE_ROWS - 1);
        jb->end = k == nthreads - 1 ? total : (total * (k + 1) / nthreads) & ~(int64_t)(TILE_ROWS - 1);
        jb->stream = stream;
        tasks[k].dtype = dtype;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(run_task, (char *)tasks, sizeof(task_t), nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* |A| v and |A|ᵀ w without materialising |A|: the rounding bounds of Freivalds' checks
 * (tempo/core/verify.py, `operand_bound`). One streaming read of A, the absolute value and
 * the multiply-add in registers: torch's composition (a chunk's abs into a buffer, then a GEMV)
 * runs at about a third of a plain read's bandwidth. `src` is rows × cols with unit column
 * stride and row stride s_row. Not transposed: out[i] = sum_j |src[i,j]|·v[j], rows split over
 * threads. Transposed: out[j] = sum_i |src[i,j]|·v[i]; each thread sums its rows into its own
 * partial vector, and the partials are added in thread order (the same result for the same
 * thread count). Sums in the source's precision, in a fixed order per thread; the caller's
 * bound has slack for its own rounding. */
typedef struct {
    const char *src;
    const char *v;
    char *out; /* not transposed: rows; transposed: this thread's partial, cols */
    int64_t rows, cols, s_row, begin, end;
    int transposed, dtype;
} absmv_t;

#define DEFINE_ABSMV(NAME, T, ABS)                                                        \
    static void NAME(const absmv_t *jb) {                                                 \
        const T *v = (const T *)jb->v;                                                    \
        T *out = (T *)jb->out;                                                            \
        const int64_t cols = jb->cols;                                                    \
        if (!jb->transposed) {                                                            \
            for (int64_t i = jb->begin; i < jb->end; ++i) {                               \
                const T *row = (const T *)jb->src + i * jb->s_row;                        \
                T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                      \
                int64_t j = 0;                                                            \
                for (; j + 8 <= cols; j += 8)                                             \
                    for (int q = 0; q < 8; ++q) acc[q] += ABS(row[j + q]) * v[j + q];     \
                T total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])); \
                for (; j < cols; ++j) total += ABS(row[j]) * v[j];                        \
                out[i] = total;                                                           \
            }                                                                             \
        } else {                                                                          \
            for (int64_t j = 0; j < cols; ++j) out[j] = 0;                                \
            for (int64_t i = jb->begin; i < jb->end; ++i) {                               \
                const T *row = (const T *)jb->src + i * jb->s_row;                        \
                const T w = v[i];                                                         \
                for (int64_t j = 0; j < cols; ++j) out[j] += ABS(row[j]) * w;             \
            }                                                                             \
        }                                                                                 \
    }
DEFINE_ABSMV(absmv_f32, float, fabsf)
DEFINE_ABSMV(absmv_f64, double, fabs)

static void *run_absmv(void *arg) {
    const absmv_t *jb = (const absmv_t *)arg;
    if (jb->dtype == 0)
        absmv_f32(jb);
    else
        absmv_f64(jb);
    return NULL;
}

static PyObject *abs_matvec(PyObject *Py_UNUSED(self), PyObject *args) {
    int dtype, transposed, nthreads;
    unsigned long long out, src, v, scratch;
    long long rows, cols, s_row;
    if (!PyArg_ParseTuple(args, "iKKKLLLpKi", &dtype, &out, &src, &v, &rows, &cols, &s_row, &transposed,
                          &scratch, &nthreads))
        return NULL;
    if (dtype != 0 && dtype != 1) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32) or 1 (float64)");
        return NULL;
    }
    if (rows <= 0 || cols <= 0) Py_RETURN_NONE;
    nthreads = clamp_threads(nthreads, rows);
    const size_t esize = dtype == 0 ? sizeof(float) : sizeof(double);
    absmv_t jobs[MAX_THREADS];
    for (int k = 0; k < nthreads; ++k) {
        absmv_t *jb = &jobs[k];
        jb->src = (const char *)(uintptr_t)src;
        jb->v = (const char *)(uintptr_t)v;
        /* transposed: thread 0 writes `out`, the others their slice of `scratch` (cols each) */
        jb->out = !transposed ? (char *)(uintptr_t)out
                  : k == 0    ? (char *)(uintptr_t)out
                              : (char *)(uintptr_t)scratch + (size_t)(k - 1) * (size_t)cols * esize;
        jb->rows = rows;
        jb->cols = cols;
        jb->s_row = s_row;
        jb->begin = rows * k / nthreads;
        jb->end = rows * (k + 1) / nthreads;
        jb->transposed = transposed;
        jb->dtype = dtype;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(run_absmv, (char *)jobs, sizeof(absmv_t), nthreads);
    if (transposed) /* the partials, added in thread order */
        for (int k = 1; k < nthreads; ++k) {
            if (dtype == 0) {
                float *o = (float *)(uintptr_t)out;
                const float *p = (const float *)jobs[k].out;
                for (int64_t j = 0; j < cols; ++j) o[j] += p[j];
            } else {
                double *o = (double *)(uintptr_t)out;
                const double *p = (const double *)jobs[k].out;
                for (int64_t j = 0; j < cols; ++j) o[j] += p[j];
            }
        }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* im2col and its adjoint for a convolution's patch rows (tempo/core/im2col.py), any 4- or
 * 8-byte element: rows (n·Ho·Wo) × (C·kh·kw), columns channel-major (c, ki, kj), zeros where a
 * window reaches the padding. Rows are written in order; the C·kh input rows a window reads
 * stay in cache across the output row's positions. torch's composition (two unfolds, a 6-D
 * permute, one copy) runs at about a tenth of a copy's bandwidth here. The fold adds each row
 * entry back at its input position (float, double, or int64 wrapping: the shares mode's ring),
 * images split over threads so that no two threads add into the same image. */
typedef struct {
    char *out;
    const char *src;
    int64_t n, c, h, w, kh, kw, dh, dw, ph, pw, sh, sw, ho, wo;
    int64_t begin, end; /* patch rows: (image, output row) pairs; fold: images */
    int esize, dtype;   /* fold: 0 float, 1 double, 2 int64 */
} conv_job_t;

static void *run_patch_rows(void *arg) {
    const conv_job_t *jb = (const conv_job_t *)arg;
    const int64_t K = jb->c * jb->kh * jb->kw;
    const size_t es = (size_t)jb->esize;
    for (int64_t t = jb->begin; t < jb->end; ++t) {
        const int64_t img = t / jb->ho, oh = t - img * jb->ho;
        char *row = jb->out + (size_t)(t * jb->wo) * (size_t)K * es;
        for (int64_t ow = 0; ow < jb->wo; ++ow, row += (size_t)K * es) {
            int64_t q = 0;
            for (int64_t ch = 0; ch < jb->c; ++ch) {
                for (int64_t ki = 0; ki < jb->kh; ++ki) {
                    const int64_t hi = oh * jb->sh + ki * jb->dh - jb->ph;
                    if (hi < 0 || hi >= jb->h) {
                        memset(row + (size_t)q * es, 0, (size_t)jb->kw * es);
                        q += jb->kw;
                        continue;
                    }
                    const char *in = jb->src + (size_t)(((img * jb->c + ch) * jb->h + hi) * jb->w) * es;
                    for (int64_t kj = 0; kj < jb->kw; ++kj, ++q) {
                        const int64_t wi = ow * jb->sw + kj * jb->dw - jb->pw;
                        if (es == 4) {
                            ((uint32_t *)row)[q] = (wi >= 0 && wi < jb->w) ? ((const uint32_t *)in)[wi] : 0;
                        } else {
                            ((uint64_t *)row)[q] = (wi >= 0 && wi < jb->w) ? ((const uint64_t *)in)[wi] : 0;
                        }
                    }
                }
            }
        }
    }
    return NULL;
}

#define DEFINE_FOLD(NAME, T)                                                                   \
    static void NAME(const conv_job_t *jb) {                                                   \
        const int64_t K = jb->c * jb->kh * jb->kw;                                             \
        for (int64_t img = jb->begin; img < jb->end; ++img) {                                  \
            T *dst = (T *)jb->out + (size_t)(img * jb->c * jb->h * jb->w);                     \
            const T *row = (const T *)jb->src + (size_t)(img * jb->ho * jb->wo * K);          \
            for (int64_t oh = 0; oh < jb->ho; ++oh)                                            \
                for (int64_t ow = 0; ow < jb->wo; ++ow, row += K) {                            \
                    int64_t q = 0;                                                             \
                    for (int64_t ch = 0; ch < jb->c; ++ch)                                     \
                        for (int64_t ki = 0; ki < jb->kh; ++ki) {                              \
                            const int64_t hi = oh * jb->sh + ki * jb->dh - jb->ph;             \
                            if (hi < 0 || hi >= jb->h) {                                       \
                                q += jb->kw;                                                   \
                                continue;                                                      \
                            }                                                                  \
                            T *d = dst + (size_t)((ch * jb->h + hi) * jb->w);                  \
                            for (int64_t kj = 0; kj < jb->kw; ++kj, ++q) {                     \
                                const int64_t wi = ow * jb->sw + kj * jb->dw - jb->pw;         \
                                if (wi >= 0 && wi < jb->w) d[wi] += row[q];                    \
                            }                                                                  \
                        }                                                                      \
                }                                                                              \
        }                                                                                      \
    }
DEFINE_FOLD(fold_f32, float)
DEFINE_FOLD(fold_f64, double)
DEFINE_FOLD(fold_u64, uint64_t) /* int64 in two's complement: unsigned adds wrap, as the ring's */

static void *run_fold(void *arg) {
    const conv_job_t *jb = (const conv_job_t *)arg;
    if (jb->dtype == 0)
        fold_f32(jb);
    else if (jb->dtype == 1)
        fold_f64(jb);
    else
        fold_u64(jb);
    return NULL;
}

static PyObject *conv_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    int fold, dtype, nthreads;
    unsigned long long out, src;
    long long n, c, h, w, kh, kw, dh, dw, ph, pw, sh, sw, ho, wo;
    if (!PyArg_ParseTuple(args, "piKKLLLLLLLLLLLLLLi", &fold, &dtype, &out, &src, &n, &c, &h, &w, &kh, &kw, &dh,
                          &dw, &ph, &pw, &sh, &sw, &ho, &wo, &nthreads))
        return NULL;
    if (dtype < 0 || dtype > 2) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32), 1 (float64) or 2 (int64)");
        return NULL;
    }
    const int64_t units = fold ? n : n * ho;
    if (units <= 0 || c <= 0 || wo <= 0) Py_RETURN_NONE;
    nthreads = clamp_threads(nthreads, units);
    conv_job_t jobs[MAX_THREADS];
    for (int k = 0; k < nthreads; ++k) {
        conv_job_t *jb = &jobs[k];
        jb->out = (char *)(uintptr_t)out;
        jb->src = (const char *)(uintptr_t)src;
        jb->n = n; jb->c = c; jb->h = h; jb->w = w; jb->kh = kh; jb->kw = kw; jb->dh = dh; jb->dw = dw;
        jb->ph = ph; jb->pw = pw; jb->sh = sh; jb->sw = sw; jb->ho = ho; jb->wo = wo;
        jb->begin = units * k / nthreads;
        jb->end = units * (k + 1) / nthreads;
        jb->esize = dtype == 0 ? 4 : 8;
        jb->dtype = dtype;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(fold ? run_fold : run_patch_rows, (char *)jobs, sizeof(conv_job_t), nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *use_tiles(PyObject *Py_UNUSED(self), PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int before = tiles_enabled;
    tiles_enabled = on;
    return PyBool_FromLong(before);
}

static PyObject *has_tiles(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyBool_FromLong(TILE_OK && have_avx);
}

static PyObject *uses_openmp(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"scaled_gather", scaled_gather, METH_VARARGS,
     "scaled_gather(dtype, out, src, slices, rows, cols, s_slice, s_row, s_col, row_idx, "
     "row_scale, row_key_stride, col_idx, col_scale, col_key_stride, nthreads, stream): "
     "out[b,i,j] = (row_scale[i] * col_scale[j]) * src[b, row_idx[i], col_idx[j]] (raw "
     "pointers, int32 indices; the caller validates everything)."},
    {"abs_matvec", abs_matvec, METH_VARARGS,
     "abs_matvec(dtype, out, src, v, rows, cols, s_row, transposed, scratch, nthreads): out = |src| v "
     "(or |src|^T v when transposed; scratch then holds (nthreads - 1) * cols partials). Raw pointers; "
     "the caller validates everything."},
    {"conv_rows", conv_rows, METH_VARARGS,
     "conv_rows(fold, dtype, out, src, n, c, h, w, kh, kw, dh, dw, ph, pw, sh, sw, ho, wo, nthreads): "
     "a convolution's patch rows of contiguous NCHW `src` into `out` (fold false), or their fold "
     "added into zeroed NCHW `out` (fold true). Raw pointers; the caller validates everything."},
    {"uses_openmp", uses_openmp, METH_NOARGS, "Whether threads come from OpenMP (else pthreads)."},
    {"use_tiles", use_tiles, METH_VARARGS,
     "use_tiles(on) -> bool: switch the transposed-tile float32 path (default on); returns the "
     "previous setting. For tests and measurements; results are identical either way."},
    {"has_tiles", has_tiles, METH_NOARGS,
     "Whether this build and CPU can take the transposed-tile path (AVX)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gather",
                                    "Scaled double-gather kernel for MM-obfuscation.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__gather(void) {
    have_avx = cpu_has_avx();
    return PyModule_Create(&module);
}
