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
 *  - One row at a time: blocking several output rows over one pass of the column key put
 *    power-of-two-strided output streams into the same L1 sets and was slower.
 * The two multiplies are never fused, so results are bit-identical to the pure-torch fallback,
 * which computes (r * c) * x as well.
 *
 * The Python wrapper (tempo/enclave/obfuscation.py) checks shapes, strides, dtypes and index
 * bounds before calling; this file trusts them. Work is split by output rows over torch's
 * OpenMP pool when built with OpenMP (else POSIX threads); the GIL is released meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>

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
} job_t;

/* Source row of flattened output row t. */
static inline const char *source_row(const job_t *jb, int64_t t, size_t esize) {
    const int64_t b = t / jb->rows, i = t - b * jb->rows;
    const int64_t off = b * jb->s_slice + (int64_t)jb->row_idx[b * jb->row_key_stride + i] * jb->s_row;
    return jb->src + (size_t)off * esize;
}

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
#define DEFINE_GATHER(NAME, T, PER_LINE, LINE_STORE, LINE_STREAM, BLOCK4)                            \
    static void NAME(const job_t *jb) {                                                      \
        const int64_t cols = jb->cols;                                                       \
        const T *rs = (const T *)jb->row_scale;                                              \
        const T *cs_all = (const T *)jb->col_scale;                                          \
        const T *next = jb->begin < jb->end ? (const T *)source_row(jb, jb->begin, sizeof(T)) : NULL; \
        for (int64_t t = jb->begin; t < jb->end; ++t) {                                      \
            const int64_t b = t / jb->rows, i = t - b * jb->rows;                            \
            const T *srow = next;                                                            \
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

DEFINE_GATHER(gather_f32, float, 16, F32_STORE, F32_STREAM, block4_f32)
DEFINE_GATHER(gather_f64, double, 8, F64_STORE, F64_STREAM, block4_f64)

typedef struct {
    job_t job;
    int dtype;
} task_t;

static void *run_task(void *arg) {
    const task_t *tk = (const task_t *)arg;
    if (tk->dtype == 0)
        gather_f32(&tk->job);
    else
        gather_f64(&tk->job);
#if HAVE_SSE2
    if (tk->job.stream) _mm_sfence(); /* streaming stores are weakly ordered */
#endif
    return NULL;
}

#define MAX_THREADS 256

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
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (total < nthreads) nthreads = (int)total;

    task_t tasks[MAX_THREADS];
#ifndef _OPENMP
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
#endif
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
        jb->begin = total * k / nthreads;
        jb->end = total * (k + 1) / nthreads;
        jb->stream = stream;
        tasks[k].dtype = dtype;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    /* torch is imported first and its bundled runtime has the soname libgomp.so.1, so this
     * resolves to torch's own OpenMP pool: its workers are already up (often spinning after
     * torch's last parallel op) and take the work at once, instead of our threads fighting
     * them for the cores. If the runtime gives fewer threads, each takes several shares. */
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads();
            for (int k = omp_get_thread_num(); k < nthreads; k += nt) run_task(&tasks[k]);
        }
    } else {
        run_task(&tasks[0]);
    }
#else
    /* Thread 0's share runs on the calling thread; if a thread cannot be created, its share
     * runs here too, so the result is complete either way. */
    for (int k = 1; k < nthreads; ++k)
        started[k] = pthread_create(&tids[k], NULL, run_task, &tasks[k]) == 0;
    run_task(&tasks[0]);
    for (int k = 1; k < nthreads; ++k) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            run_task(&tasks[k]);
    }
#endif
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    {"uses_openmp", uses_openmp, METH_NOARGS, "Whether threads come from OpenMP (else pthreads)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gather",
                                    "Scaled double-gather kernel for MM-obfuscation.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__gather(void) { return PyModule_Create(&module); }
