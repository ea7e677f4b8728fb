/* ressformer's CPU kernels for training, compiled on first use by ressformer/native.py (any C
 * compiler: no PyTorch headers) and called through ctypes on contiguous rows.
 *
 * topk_f32 / topk_f64: the k largest of each row, sorted descending, ties toward the lower index
 * (ONNX TopK's order; NaN ranks above every number, as in torch.topk; -0 equals +0). A row's values
 * become integer keys of the same order (one vectorized pass); one pass in index order keeps the k
 * best so far sorted, so an entry enters only if strictly larger than the k-th (an equal one has a
 * higher index and ranks after), shifting the smaller kept ones down. On attention scores of a
 * trained model this is ~2.4x torch.topk plus the tie repair it would need (docs/training.md).
 *
 * match_rows: for two rows of k distinct key indices each (a, b), pos[j] = the slot of a holding
 * b[j], or k if a does not hold it: the pairs the structural-continuity loss multiplies. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int32_t key_f32(float f) {
    int32_t u;
    memcpy(&u, &f, sizeof u);
    u = u == INT32_MIN ? 0 : u;          /* -0 == +0 */
    u ^= (u >> 31) & INT32_MAX;          /* negative floats: flip the magnitude, so int order = float order */
    return f != f ? INT32_MAX : u;       /* NaN first */
}

static inline int64_t key_f64(double f) {
    int64_t u;
    memcpy(&u, &f, sizeof u);
    u = u == INT64_MIN ? 0 : u;
    u ^= (u >> 63) & INT64_MAX;
    return f != f ? INT64_MAX : u;
}

/* is some idx[0, count) outside [0, n)? (the kernels that read rows at indices check them first) */
static int bad_index(const int64_t *idx, int64_t count, int64_t n) {
    int bad = 0;
    for (int64_t i = 0; i < count; i++) bad |= idx[i] < 0 || idx[i] >= n;
    return bad;
}

#define DEFINE_TOPK(NAME, T, K, KEY)                                                          \
    int NAME(const T *x, int64_t rows, int64_t n, int64_t k, T *val, int64_t *idx) {          \
        if (k < 1 || k > n || n > INT32_MAX) return 1;                                        \
        K *key = malloc(n * sizeof(K)); /* a row's keys */                                    \
        K *kv = malloc(k * sizeof(K)); /* the best so far: keys descending, ties by index */  \
        int32_t *ki = malloc(k * sizeof(int32_t));                                            \
        if (!key || !kv || !ki) return free(key), free(kv), free(ki), 2;                      \
        for (int64_t r = 0; r < rows; r++) {                                                  \
            const T *row = x + r * n;                                                         \
            for (int64_t j = 0; j < n; j++) key[j] = KEY(row[j]); /* vectorized */            \
            for (int64_t j = 0; j < k; j++) { /* the first k, insertion-sorted */             \
                K kj = key[j];                                                                \
                int64_t p = j;                                                                \
                for (; p > 0 && kv[p - 1] < kj; p--) kv[p] = kv[p - 1], ki[p] = ki[p - 1];    \
                kv[p] = kj, ki[p] = (int32_t)j;                                               \
            }                                                                                 \
            K kth = kv[k - 1];                                                                \
            for (int64_t j = k; j < n; j++) {                                                 \
                K kj = key[j];                                                                \
                if (kj <= kth) continue;                                                      \
                int64_t p = k - 1; /* the k-th drops out; shift the smaller ones down */      \
                for (; p > 0 && kv[p - 1] < kj; p--) kv[p] = kv[p - 1], ki[p] = ki[p - 1];    \
                kv[p] = kj, ki[p] = (int32_t)j, kth = kv[k - 1];                              \
            }                                                                                 \
            for (int64_t i = 0; i < k; i++) idx[r * k + i] = ki[i], val[r * k + i] = row[ki[i]]; \
        }                                                                                     \
        free(key), free(kv), free(ki);                                                        \
        return 0;                                                                             \
    }

DEFINE_TOPK(topk_f32, float, int32_t, key_f32)
DEFINE_TOPK(topk_f64, double, int64_t, key_f64)

int match_rows(const int64_t *a, const int64_t *b, int64_t rows, int64_t k, int64_t n, int64_t *pos) {
    if (n < 1 || n > INT32_MAX || bad_index(a, rows * k, n) || bad_index(b, rows * k, n)) return 1;
    int32_t *slot = malloc(n * sizeof(int32_t)); /* slot[key] = its place in a's row, or -1 */
    if (!slot) return 2;
    for (int64_t i = 0; i < n; i++) slot[i] = -1;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *ra = a + r * k, *rb = b + r * k;
        for (int64_t i = 0; i < k; i++) slot[ra[i]] = (int32_t)i;
        for (int64_t j = 0; j < k; j++) pos[r * k + j] = slot[rb[j]] >= 0 ? slot[rb[j]] : k;
        for (int64_t i = 0; i < k; i++) slot[ra[i]] = -1;
    }
    free(slot);
    return 0;
}

/* entmax15_sorted_f32 / _f64: entmax-1.5 of rows already sorted descending (the top-k values),
 * the same operations in the same order as ressformer/ops.py's entmax15_kernel(presorted=True):
 * x/2, max-shifted, clamped to -2 (NaN -> -2); the prefix sums accumulated in double as torch's CPU
 * cumsum does; the threshold at the end of the leading run of tau <= z. (Within a few ulp of it:
 * torch's vectorized sqrt is not correctly rounded, C's is.) */
#define DEFINE_ENTMAX15(NAME, T)                                                              \
    int NAME(const T *x, int64_t rows, int64_t k, T *y) {                                     \
        if (k < 1) return 1;                                                                  \
        T *z = malloc(k * sizeof(T)), *tau = malloc(k * sizeof(T));                           \
        if (!z || !tau) return free(z), free(tau), 2;                                         \
        for (int64_t r = 0; r < rows; r++) {                                                  \
            const T *row = x + r * k;                                                         \
            T *out = y + r * k, mx = -INFINITY;                                               \
            int valid = 0, nan = 0;                                                           \
            for (int64_t i = 0; i < k; i++) {                                                 \
                T h = row[i] / 2;                                                             \
                valid |= isfinite(h), nan |= isnan(h);                                        \
                mx = h > mx ? h : mx;                                                         \
            }                                                                                 \
            mx = !valid ? 0 : nan ? NAN : mx;                                                 \
            double s1 = 0, s2 = 0;                                                            \
            int64_t support = 0, run = 1;                                                     \
            for (int64_t i = 0; i < k; i++) {                                                 \
                T d = row[i] / 2 - mx;                                                        \
                z[i] = d != d ? (T)-2 : d < (T)-2 ? (T)-2 : d;                                \
                T rho = (T)(i + 1);                                                           \
                s1 += z[i], s2 += z[i] * z[i];                                                \
                T mean = (T)s1 / rho, mean_sq = (T)s2 / rho;                                  \
                T ss = rho * (mean_sq - mean * mean);                                         \
                T delta = (1 - ss) / rho;                                                     \
                delta = delta < 0 ? 0 : delta;                                                \
                tau[i] = mean - (T)sqrt(delta);                                               \
                run &= tau[i] <= z[i], support += run;                                        \
            }                                                                                 \
            T ts = tau[(support > 0 ? support : 1) - 1];                                      \
            for (int64_t i = 0; i < k; i++) {                                                 \
                T d = z[i] - ts;                                                              \
                d = d < 0 ? 0 : d;                                                            \
                out[i] = valid ? d * d : 0;                                                   \
            }                                                                                 \
        }                                                                                     \
        free(z), free(tau);                                                                   \
        return 0;                                                                             \
    }

DEFINE_ENTMAX15(entmax15_sorted_f32, float)
DEFINE_ENTMAX15(entmax15_sorted_f64, double)

/* attn_out: the top-k attention's output, out[b, i, :] = sum_j w[b, i, j] v[b, idx[b, i, j], :]. */
#define DEFINE_ATTN_OUT(SUFFIX, T)                                                            \
    int attn_out_##SUFFIX(const T *restrict w, const T *restrict v, const int64_t *idx, int64_t heads, \
                          int64_t t, int64_t n, int64_t k, int64_t d, T *restrict out) {      \
        if (bad_index(idx, heads * t * k, n)) return 1;                                       \
        for (int64_t r = 0; r < heads * t; r++) {                                             \
            T *restrict o = out + r * d;                                                      \
            for (int64_t c = 0; c < d; c++) o[c] = 0;                                         \
            for (int64_t j = 0; j < k; j++) {                                                 \
                const T a = w[r * k + j], *restrict vr = v + ((r / t) * n + idx[r * k + j]) * d; \
                for (int64_t c = 0; c < d; c++) o[c] += a * vr[c];                            \
            }                                                                                 \
        }                                                                                     \
        return 0;                                                                             \
    }

DEFINE_ATTN_OUT(f32, float)
DEFINE_ATTN_OUT(f64, double)

/* The top-k attention backward from the selection alone (ops.topk_attention_backward's sums, per
 * head b and query i over its k selected keys idx[b, i, :]):
 *   attn_dw:    dw[b, i, j] = go[b, i, :] . v[b, idx[b, i, j], :]
 *   attn_grads: dq[b, i, :] = sum_j ds[b, i, j] k[b, idx, :]; dk[b, idx, :] += ds[b, i, j] q[b, i, :];
 *               dv[b, idx, :] += w[b, i, j] go[b, i, :]   (dk, dv zeroed by the caller)
 * No n-wide rows; heads are independent, so callers split them across threads. attn_grads sums dq
 * itself (attn_out's loop with ds and k) in the same pass as dk/dv: calling attn_out for dq and
 * then scattering dk/dv took 24-26 ms against 19 ms for one `small` backward (8 x 8 x 256 x 416). */
#define DEFINE_ATTN_BWD(SUFFIX, T)                                                            \
    int attn_dw_##SUFFIX(const T *go, const T *v, const int64_t *idx, int64_t heads, int64_t t, \
                         int64_t n, int64_t k, int64_t d, T *dw) {                            \
        if (bad_index(idx, heads * t * k, n)) return 1;                                       \
        for (int64_t r = 0; r < heads * t; r++) {                                             \
            const T *g = go + r * d;                                                          \
            for (int64_t j = 0; j < k; j++) {                                                 \
                const T *vr = v + ((r / t) * n + idx[r * k + j]) * d;                         \
                T acc[8] = {0}, s = 0; /* 8 lanes: a dot product the compiler vectorizes */   \
                int64_t c = 0;                                                                \
                for (; c + 8 <= d; c += 8)                                                    \
                    for (int l = 0; l < 8; l++) acc[l] += g[c + l] * vr[c + l];               \
                for (; c < d; c++) s += g[c] * vr[c];                                         \
                for (int l = 0; l < 8; l++) s += acc[l];                                      \
                dw[r * k + j] = s;                                                            \
            }                                                                                 \
        }                                                                                     \
        return 0;                                                                             \
    }                                                                                         \
    int attn_grads_##SUFFIX(const T *restrict ds, const T *restrict w, const T *restrict q,   \
                            const T *restrict go, const T *restrict kx, const int64_t *idx,   \
                            int64_t heads, int64_t t, int64_t n, int64_t k, int64_t d,        \
                            T *restrict dq, T *restrict dk, T *restrict dv) {                 \
        if (bad_index(idx, heads * t * k, n)) return 1;                                       \
        for (int64_t r = 0; r < heads * t; r++) {                                             \
            const T *restrict qr = q + r * d, *restrict gr = go + r * d;                      \
            T *restrict dqr = dq + r * d;                                                     \
            for (int64_t c = 0; c < d; c++) dqr[c] = 0;                                       \
            for (int64_t j = 0; j < k; j++) {                                                 \
                const int64_t row = ((r / t) * n + idx[r * k + j]) * d;                       \
                const T s = ds[r * k + j], a = w[r * k + j];                                  \
                const T *restrict kr = kx + row;                                              \
                T *restrict dkr = dk + row, *restrict dvr = dv + row;                         \
                for (int64_t c = 0; c < d; c++) dqr[c] += s * kr[c];                          \
                for (int64_t c = 0; c < d; c++) dkr[c] += s * qr[c];                          \
                for (int64_t c = 0; c < d; c++) dvr[c] += a * gr[c];                          \
            }                                                                                 \
        }                                                                                     \
        return 0;                                                                             \
    }

DEFINE_ATTN_BWD(f32, float)
DEFINE_ATTN_BWD(f64, double)
