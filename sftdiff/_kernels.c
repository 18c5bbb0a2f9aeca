/* create's scan as one compiled loop per value (see sftdiff/kernels.py, which calls it).
 *
 * scan(kind_b, base, kind_f, ft, lo, hi, threshold, out_idx, out_bits, out_b, out_f) -> count
 *
 * For every flat position i in [lo, hi): |Δ| = |widen(ft[i]) - widen(base[i])| as float32, and its bit
 * pattern m. Positions with m >= threshold are appended, in ascending order, to out_idx (int64),
 * out_bits (m, uint32) and out_b / out_f (the raw base and fine-tune values, in their own widths).
 * Non-negative floats order as their bit patterns, and NaN and +-inf (patterns >= 0x7F800000) pass
 * every finite threshold, so the caller notices them without testing each value.
 *
 * Kinds: 0 BF16 and 1 F16 (16-bit patterns), 2 float32, 3 float64. The difference is taken in
 * float32, or in float64 when either side is float64 (then |Δ| is rounded to float32 once), which is
 * exactly what create's numpy code computes: the output is byte-identical (tests/test_kernels.py).
 * Build with IEEE semantics (no -ffast-math): only subtractions and exact conversions happen here.
 *
 * Each call works in blocks of BLOCK values. A branch-free loop, which the compiler vectorizes,
 * writes the block's bit patterns and one flag byte per value into L1-resident buffers; then the
 * flags are tested GROUP at a time as one 64-bit word, and only the groups holding a candidate are
 * looked at. At the ~1.5% of values a scan keeps, about one group in nine is. The GIL is released
 * for the whole loop, so create's worker threads scan on every core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define GROUP 8
enum { K_BF16 = 0, K_F16 = 1, K_F32 = 2, K_F64 = 3, K_COUNT = 4 };
static const Py_ssize_t ITEMSIZE[K_COUNT] = {2, 2, 4, 8};

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static __forceinline
#endif

INLINE float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* IEEE binary16 to float32, exactly (as numpy's cast), without branches the vectorizer cannot take. */
INLINE float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    uint32_t normal = ((exp + 112u) << 23) | (mant << 13);
    uint32_t special = 0x7F800000u | (mant << 13);  /* inf, NaN (payload kept) */
    uint32_t tiny = f32_to_bits((float)mant * 5.9604644775390625e-08f);  /* zero, subnormal: exact */
    uint32_t body = exp == 0 ? tiny : (exp == 31 ? special : normal);
    return bits_to_f32(sign | body);
}

/* Value i of an array of `kind`, widened to float32 (kinds 0-2) or float64 (any kind). */
INLINE float wide32(const void *p, int kind, Py_ssize_t i) {
    switch (kind) {
    case K_BF16: return bits_to_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    case K_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

INLINE double wide64(const void *p, int kind, Py_ssize_t i) {
    return kind == K_F64 ? ((const double *)p)[i] : (double)wide32(p, kind, i);
}

INLINE void copy_raw(void *out, Py_ssize_t at, const void *in, Py_ssize_t i, int kind) {
    switch (kind) {
    case K_BF16: case K_F16: ((uint16_t *)out)[at] = ((const uint16_t *)in)[i]; break;
    case K_F32: ((uint32_t *)out)[at] = ((const uint32_t *)in)[i]; break;
    default: ((uint64_t *)out)[at] = ((const uint64_t *)in)[i]; break;
    }
}

/* The scan for one pair of kinds; inlined into one function per pair, so each loop is specialized. */
INLINE Py_ssize_t scan_pair(const void *b, int kb, const void *f, int kf, Py_ssize_t lo, Py_ssize_t hi,
                            uint32_t threshold, int64_t *out_idx, uint32_t *out_bits, void *out_b, void *out_f) {
    uint32_t mags[BLOCK];
    union { uint8_t bytes[BLOCK]; uint64_t words[BLOCK / GROUP]; } flags;
    int32_t pos[BLOCK];
    Py_ssize_t count = 0;
    for (Py_ssize_t start = lo; start < hi; start += BLOCK) {
        int n = hi - start < BLOCK ? (int)(hi - start) : BLOCK;
        for (int j = 0; j < n; j++) {
            Py_ssize_t i = start + j;
            uint32_t m;
            if (kb == K_F64 || kf == K_F64) {  /* subtract in float64, round |Δ| once to float32 */
                double d = wide64(f, kf, i) - wide64(b, kb, i);
                m = f32_to_bits((float)fabs(d));
            } else {
                m = f32_to_bits(wide32(f, kf, i) - wide32(b, kb, i)) & 0x7FFFFFFFu;
            }
            mags[j] = m;
            flags.bytes[j] = m >= threshold;
        }
        for (int j = n; j < BLOCK; j++) flags.bytes[j] = 0;  /* a partial last block */
        int c = 0;
        for (int g = 0; g < BLOCK / GROUP; g++) {
            if (flags.words[g]) {
                for (int j = g * GROUP; j < g * GROUP + GROUP; j++) {  /* no branch per value */
                    pos[c] = j;
                    c += flags.bytes[j];
                }
            }
        }
        for (int q = 0; q < c; q++) {  /* then one sequential write per candidate and output */
            int j = pos[q];
            out_idx[count + q] = start + j;
            out_bits[count + q] = mags[j];
            copy_raw(out_b, count + q, b, start + j, kb);
            copy_raw(out_f, count + q, f, start + j, kf);
        }
        count += c;
    }
    return count;
}

typedef Py_ssize_t (*scan_fn)(const void *, const void *, Py_ssize_t, Py_ssize_t, uint32_t, int64_t *, uint32_t *,
                              void *, void *);

#define PAIR(KB, KF)                                                                                          \
    static Py_ssize_t scan_##KB##_##KF(const void *b, const void *f, Py_ssize_t lo, Py_ssize_t hi, uint32_t t, \
                                       int64_t *oi, uint32_t *om, void *ob, void *of) {                      \
        return scan_pair(b, KB, f, KF, lo, hi, t, oi, om, ob, of);                                            \
    }
#define ROW(KB) PAIR(KB, 0) PAIR(KB, 1) PAIR(KB, 2) PAIR(KB, 3)
ROW(0) ROW(1) ROW(2) ROW(3)
#define FNS(KB) {scan_##KB##_0, scan_##KB##_1, scan_##KB##_2, scan_##KB##_3}
static const scan_fn SCANS[K_COUNT][K_COUNT] = {FNS(0), FNS(1), FNS(2), FNS(3)};

static int check_size(const Py_buffer *buf, Py_ssize_t need, const char *what) {
    if (buf->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd", what, buf->len, need);
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    int kb, kf;
    Py_ssize_t lo, hi;
    unsigned int threshold;
    Py_buffer b, f, oi, om, ob, of;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*iy*nnIw*w*w*w*", &kb, &b, &kf, &f, &lo, &hi, &threshold, &oi, &om, &ob, &of))
        return NULL;
    Py_ssize_t count = -1;
    if (kb < 0 || kb >= K_COUNT || kf < 0 || kf >= K_COUNT) {
        PyErr_Format(PyExc_ValueError, "unknown kinds %d, %d", kb, kf);
    } else if (lo < 0 || hi < lo) {
        PyErr_Format(PyExc_ValueError, "bad range [%zd, %zd)", lo, hi);
    } else {
        Py_ssize_t n = hi - lo;
        if (check_size(&b, hi * ITEMSIZE[kb], "base") == 0 && check_size(&f, hi * ITEMSIZE[kf], "fine-tune") == 0 &&
            check_size(&oi, n * 8, "out_idx") == 0 && check_size(&om, n * 4, "out_bits") == 0 &&
            check_size(&ob, n * ITEMSIZE[kb], "out_b") == 0 && check_size(&of, n * ITEMSIZE[kf], "out_f") == 0) {
            scan_fn fn = SCANS[kb][kf];
            Py_BEGIN_ALLOW_THREADS
            count = fn(b.buf, f.buf, lo, hi, (uint32_t)threshold, (int64_t *)oi.buf, (uint32_t *)om.buf, ob.buf, of.buf);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&f);
    PyBuffer_Release(&oi);
    PyBuffer_Release(&om);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&of);
    return count < 0 ? NULL : PyLong_FromSsize_t(count);
}

static PyMethodDef METHODS[] = {
    {"scan", scan, METH_VARARGS,
     "scan(kind_b, base, kind_f, ft, lo, hi, threshold, out_idx, out_bits, out_b, out_f) -> count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels", "create's scan, compiled (see kernels.py)", 0,
                                    METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&MODULE); }
