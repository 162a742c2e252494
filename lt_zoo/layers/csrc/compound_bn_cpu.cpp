// Compound BN on CPU: the map-sized work of lt_zoo/layers/compound_bn_functional.py in one pass each.
//
// Built on first use by lt_zoo/layers/compound_bn_native.py (g++ -O3 -march=native, no torch headers) and
// called through ctypes with raw pointers.  Every function walks the map in tiles of T positions of one
// image, gathered into a [C][T] scratch tile whatever the map's layout (contiguous (N, C, L) or
// channels_last (N, L, C)), so every inner loop runs over T adjacent positions and vectorises.
//
// Every pass takes the raw map and the shift s (C,) of the layer's shifted coordinates, and works on x - s.
//   estep_moments  r_pk = softmax_k(const_k + sum_c x_pc (w1_kc + x_pc w2_kc)), thresholded at 1e-30
//                  (or the one-hot group of each image), stored as R (N, M, L); and the sums
//                  [sum_p r, sum_p r^2, sum_p r x_c, sum_p r x_c^2] as (M, 2 + 2C)        (Eq. 7-10)
//   combine        out_pc = x_pc sum_k r_pk A_kc [+ g_pc sum_k r_pk B_kc] + sum_k r_pk D_kc:
//                  the output (A = scale, D = offset) and the input gradient (A = U, B = W A, D = V)
//   grad_moments   G_kc = sum_p r_pk g_pc, H_kc = sum_p r_pk g_pc x_pc
//   eval           E-step and output in one pass, R never stored
//
// R is (N, M, L), or (N, M, 1) on the split path (one weight per image).  Sums accumulate in the map's
// scalar type, in a different order than the GEMM formulation: results agree to rounding.
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

namespace {

constexpr int64_t T = 16;  // positions per tile: one vector of T lanes

// V: T lanes of S (GCC vector extension; 64 bytes of float = one AVX-512 register, or two AVX2 ones).
template <typename S> struct Lanes;
template <> struct Lanes<float> {
    typedef float V __attribute__((vector_size(T * sizeof(float))));
    typedef int32_t I __attribute__((vector_size(T * sizeof(int32_t))));
    static constexpr int bits = 23, bias = 127, degree = 7;
};
template <> struct Lanes<double> {
    typedef double V __attribute__((vector_size(T * sizeof(double))));
    typedef int64_t I __attribute__((vector_size(T * sizeof(int64_t))));
    static constexpr int bits = 52, bias = 1023, degree = 12;
};

template <typename S, typename V = typename Lanes<S>::V>
inline V load(const S* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}

template <typename S, typename V>
inline void store(S* p, V v) { std::memcpy(p, &v, sizeof(V)); }

template <typename S, typename V>
inline S hsum(V v) {
    S s = 0;
    for (int64_t t = 0; t < T; ++t) s += v[t];
    return s;
}

// exp(x) for x <= 0 on every lane, branch-free (libm's exp has no vector form here).  Below -70 it is 0:
// a softmax term there is < exp(-69.08) = 1e-30 of the largest term, 1, so the threshold zeroes it anyway.
// x = n ln2 + r with |r| <= ln2/2 (Cody-Waite), Taylor polynomial of degree 7 (float, relative error
// < 2e-7) or 12 (double, < 1e-15), times 2^n built in the exponent bits.
template <typename S, typename V = typename Lanes<S>::V>
inline V exp_nonpositive(V x) {
    using L = Lanes<S>;
    typedef typename L::I I;
    const auto lo = x < S(-70);  // lane mask
    const V xc = lo ? V{} + S(-70) : x;
    const V y = xc * S(1.4426950408889634);
    const I n = __builtin_convertvector(y - S(0.5), I);  // truncation of y - 1/2 <= 0: round to nearest
    const V nf = __builtin_convertvector(n, V);
    const V r = (xc - nf * S(0.693145751953125)) - nf * S(1.4286068203094173e-06);
    V p = V{} + S(1);
    for (int k = L::degree; k >= 1; --k) p = S(1) + p * r * (S(1) / S(k));
    const I e = (n + L::bias) << L::bits;
    V scale;
    std::memcpy(&scale, &e, sizeof(V));
    return lo ? V{} : p * scale;
}

// Images [first, last) of this OpenMP thread: a static split, so the order of every partial sum, and the
// result, depend only on the number of threads.
inline void my_images(int64_t n, int64_t& first, int64_t& last) {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    first = n * tid / nth;
    last = n * (tid + 1) / nth;
}

// f(img, l0, tn) for every tile of this thread's images: positions [l0, l0 + tn) of image img
template <typename F>
inline void each_tile(int64_t n, int64_t l, F&& f) {
    int64_t first, last;
    my_images(n, first, last);
    for (int64_t img = first; img < last; ++img)
        for (int64_t l0 = 0; l0 < l; l0 += T) f(img, l0, l - l0 < T ? l - l0 : T);
}

template <typename S>
struct Tiles {
    typedef typename Lanes<S>::V V;
    int64_t n, c, l;
    int cl;  // 1: channels_last (N, L, C); 0: contiguous (N, C, L)

    // tile[ch] = x[img, ch, l0 : l0 + tn], zero beyond tn
    void gather(const S* x, int64_t img, int64_t l0, int64_t tn, V* tile) const {
        if (cl) {
            const S* base = x + (img * l + l0) * c;
            S buf[T];
            for (int64_t ch = 0; ch < c; ++ch) {
                for (int64_t t = 0; t < T; ++t) buf[t] = t < tn ? base[t * c + ch] : S(0);
                tile[ch] = load<S>(buf);
            }
        } else {
            const S* base = x + img * c * l + l0;
            if (tn == T) {
                for (int64_t ch = 0; ch < c; ++ch) tile[ch] = load<S>(base + ch * l);
            } else {
                for (int64_t ch = 0; ch < c; ++ch) {
                    S buf[T] = {};
                    std::memcpy(buf, base + ch * l, tn * sizeof(S));
                    tile[ch] = load<S>(buf);
                }
            }
        }
    }

    // the same, minus the shift s per channel (nullptr: none): x - s without a shifted copy of the map;
    // padded positions hold -s, and every caller gives them weight 0 or leaves them unwritten
    void gather(const S* x, const S* shift, int64_t img, int64_t l0, int64_t tn, V* tile) const {
        gather(x, img, l0, tn, tile);
        if (shift)
            for (int64_t ch = 0; ch < c; ++ch) tile[ch] -= shift[ch];
    }

    void scatter(S* out, int64_t img, int64_t l0, int64_t tn, const V* tile) const {
        if (cl) {
            S* base = out + (img * l + l0) * c;
            for (int64_t ch = 0; ch < c; ++ch)
                for (int64_t t = 0; t < tn; ++t) base[t * c + ch] = tile[ch][t];
        } else {
            S* base = out + img * c * l + l0;
            for (int64_t ch = 0; ch < c; ++ch) {
                if (tn == T) {
                    store(base + ch * l, tile[ch]);
                } else {
                    S buf[T];
                    store(buf, tile[ch]);
                    std::memcpy(base + ch * l, buf, tn * sizeof(S));
                }
            }
        }
    }

    // r[k] of a stored R (N, M, lr) for one tile, 0 beyond tn; lr = 1: one weight per image
    void load_r(const S* R, int64_t img, int64_t l0, int64_t tn, int64_t m, int64_t lr, V* r) const {
        for (int64_t k = 0; k < m; ++k) {
            const S* src = R + (img * m + k) * lr;
            if (lr == 1) {
                S buf[T];
                for (int64_t t = 0; t < T; ++t) buf[t] = t < tn ? src[0] : S(0);
                r[k] = load<S>(buf);
            } else if (tn == T) {
                r[k] = load<S>(src + l0);
            } else {
                S buf[T] = {};
                std::memcpy(buf, src + l0, tn * sizeof(S));
                r[k] = load<S>(buf);
            }
        }
    }
};

// Posteriors of one tile: softmax over k of const_k + sum_c x_c (w1_kc + x_c w2_kc), max-subtracted,
// thresholded at 1e-30 (F.threshold of the GEMM kernel).
template <typename S, typename V>
void estep_tile(const V* xt, int64_t c, int64_t m, const S* w1, const S* w2, const S* cst, V* r) {
    V mx{};
    for (int64_t k = 0; k < m; ++k) {
        V acc = V{} + cst[k];
        for (int64_t ch = 0; ch < c; ++ch) acc += xt[ch] * (w1[k * c + ch] + xt[ch] * w2[k * c + ch]);
        r[k] = acc;
        mx = (k == 0 || acc > mx) ? acc : mx;
    }
    V sum{};
    for (int64_t k = 0; k < m; ++k) {
        r[k] = exp_nonpositive<S>(r[k] - mx);
        sum += r[k];
    }
    const V inv = S(1) / sum;
    for (int64_t k = 0; k < m; ++k) {
        const V v = r[k] * inv;
        r[k] = v > S(1e-30) ? v : V{};
    }
}

template <typename S>
void estep_moments(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl, const S* w1, const S* w2,
                   const S* cst, int64_t m, const int64_t* groups, S* R, S* sums, int nt) {
    typedef typename Lanes<S>::V V;
    const Tiles<S> tl{n, c, l, cl};
    const int64_t width = 2 + 2 * c;
    std::vector<S> parts(static_cast<size_t>(nt) * m * width, S(0));
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<V> xt(c), r(m), p(m * c), q(m * c), cnt(m), sq(m);
        each_tile(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            tl.gather(x, shift, img, l0, tn, xt.data());
            S valid[T];
            for (int64_t t = 0; t < T; ++t) valid[t] = t < tn ? S(1) : S(0);
            const V mask = load<S>(valid);
            if (groups) {
                for (int64_t k = 0; k < m; ++k) r[k] = k == groups[img] ? mask : V{};
                if (l0 == 0)
                    for (int64_t k = 0; k < m; ++k) R[img * m + k] = k == groups[img] ? S(1) : S(0);
            } else {
                estep_tile<S>(xt.data(), c, m, w1, w2, cst, r.data());
                for (int64_t k = 0; k < m; ++k) {
                    r[k] *= mask;  // padded positions weigh nothing
                    S buf[T];
                    store(buf, r[k]);
                    std::memcpy(R + (img * m + k) * l + l0, buf, tn * sizeof(S));
                }
            }
            for (int64_t k = 0; k < m; ++k) {
                cnt[k] += r[k];
                sq[k] += r[k] * r[k];
                for (int64_t ch = 0; ch < c; ++ch) {
                    const V rx = r[k] * xt[ch];
                    p[k * c + ch] += rx;
                    q[k * c + ch] += rx * xt[ch];
                }
            }
        });
        S* part = parts.data() + static_cast<size_t>(omp_get_thread_num()) * m * width;
        for (int64_t k = 0; k < m; ++k) {
            part[k * width] = hsum<S>(cnt[k]);
            part[k * width + 1] = hsum<S>(sq[k]);
            for (int64_t ch = 0; ch < c; ++ch) {
                part[k * width + 2 + ch] = hsum<S>(p[k * c + ch]);
                part[k * width + 2 + c + ch] = hsum<S>(q[k * c + ch]);
            }
        }
        if (omp_get_thread_num() == 0) used = omp_get_num_threads();
    }
    for (int64_t i = 0; i < m * width; ++i) {
        S s = 0;
        for (int th = 0; th < used; ++th) s += parts[static_cast<size_t>(th) * m * width + i];
        sums[i] = s;
    }
}

// out = x (r^T A) [+ g (r^T B)] + r^T D over one tile
template <typename S, typename V>
void combine_tile(const V* xt, const V* gt, const V* r, int64_t c, int64_t m, const S* A, const S* B, const S* D,
                  V* ot) {
    for (int64_t ch = 0; ch < c; ++ch) {
        V a{}, d{};
        if (gt) {
            V b{};
            for (int64_t k = 0; k < m; ++k) {
                a += r[k] * A[k * c + ch];
                b += r[k] * B[k * c + ch];
                d += r[k] * D[k * c + ch];
            }
            ot[ch] = xt[ch] * a + gt[ch] * b + d;
        } else {
            for (int64_t k = 0; k < m; ++k) {
                a += r[k] * A[k * c + ch];
                d += r[k] * D[k * c + ch];
            }
            ot[ch] = xt[ch] * a + d;
        }
    }
}

template <typename S>
void combine(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l, int cl, const S* R,
             int64_t lr, int64_t m, const S* A, const S* B, const S* D, S* out, int nt) {
    typedef typename Lanes<S>::V V;
    const Tiles<S> tl{n, c, l, cl};
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<V> xt(c), gt(g ? c : 0), ot(c), r(m);
        each_tile(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            tl.gather(x, shift, img, l0, tn, xt.data());
            if (g) tl.gather(g, img, l0, tn, gt.data());
            tl.load_r(R, img, l0, tn, m, lr, r.data());
            combine_tile<S>(xt.data(), g ? gt.data() : nullptr, r.data(), c, m, A, B, D, ot.data());
            tl.scatter(out, img, l0, tn, ot.data());
        });
    }
}

template <typename S>
void grad_moments(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l, int cl, const S* R,
                  int64_t lr, int64_t m, S* G, S* H, int nt) {
    typedef typename Lanes<S>::V V;
    const Tiles<S> tl{n, c, l, cl};
    std::vector<S> parts(static_cast<size_t>(nt) * 2 * m * c, S(0));
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<V> xt(c), gt(c), r(m), ga(m * c), ha(m * c);
        each_tile(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            tl.gather(x, shift, img, l0, tn, xt.data());
            tl.gather(g, img, l0, tn, gt.data());
            tl.load_r(R, img, l0, tn, m, lr, r.data());
            for (int64_t k = 0; k < m; ++k)
                for (int64_t ch = 0; ch < c; ++ch) {
                    const V rg = r[k] * gt[ch];
                    ga[k * c + ch] += rg;
                    ha[k * c + ch] += rg * xt[ch];
                }
        });
        S* part = parts.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * m * c;
        for (int64_t i = 0; i < m * c; ++i) {
            part[i] = hsum<S>(ga[i]);
            part[m * c + i] = hsum<S>(ha[i]);
        }
        if (omp_get_thread_num() == 0) used = omp_get_num_threads();
    }
    for (int64_t i = 0; i < m * c; ++i) {
        S sg = 0, sh = 0;
        for (int th = 0; th < used; ++th) {
            sg += parts[static_cast<size_t>(th) * 2 * m * c + i];
            sh += parts[static_cast<size_t>(th) * 2 * m * c + m * c + i];
        }
        G[i] = sg;
        H[i] = sh;
    }
}

template <typename S>
void eval(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl, const S* w1, const S* w2,
          const S* cst, int64_t m, const S* scale, const S* offset, S* out, int nt) {
    typedef typename Lanes<S>::V V;
    const Tiles<S> tl{n, c, l, cl};
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<V> xt(c), ot(c), r(m);
        each_tile(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            tl.gather(x, shift, img, l0, tn, xt.data());
            estep_tile<S>(xt.data(), c, m, w1, w2, cst, r.data());
            combine_tile<S>(xt.data(), static_cast<const V*>(nullptr), r.data(), c, m, scale,
                            static_cast<const S*>(nullptr), offset, ot.data());
            tl.scatter(out, img, l0, tn, ot.data());
        });
    }
}

}  // namespace

#define LT_ZOO_EXPORT(S, SUF)                                                                                     \
    extern "C" void cbn_estep_moments_##SUF(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl,  \
                                           const S* w1, const S* w2, const S* cst, int64_t m,                     \
                                           const int64_t* groups, S* R, S* sums, int nt) {                        \
        estep_moments<S>(x, shift, n, c, l, cl, w1, w2, cst, m, groups, R, sums, nt);                             \
    }                                                                                                             \
    extern "C" void cbn_combine_##SUF(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l,    \
                                     int cl, const S* R, int64_t lr, int64_t m, const S* A, const S* B,           \
                                     const S* D, S* out, int nt) {                                                \
        combine<S>(x, shift, g, n, c, l, cl, R, lr, m, A, B, D, out, nt);                                         \
    }                                                                                                             \
    extern "C" void cbn_grad_moments_##SUF(const S* x, const S* shift, const S* g, int64_t n, int64_t c,          \
                                          int64_t l, int cl, const S* R, int64_t lr, int64_t m, S* G, S* H,       \
                                          int nt) {                                                               \
        grad_moments<S>(x, shift, g, n, c, l, cl, R, lr, m, G, H, nt);                                            \
    }                                                                                                             \
    extern "C" void cbn_eval_##SUF(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl,           \
                                  const S* w1, const S* w2, const S* cst, int64_t m, const S* scale,              \
                                  const S* offset, S* out, int nt) {                                              \
        eval<S>(x, shift, n, c, l, cl, w1, w2, cst, m, scale, offset, out, nt);                                   \
    }

LT_ZOO_EXPORT(float, f32)
LT_ZOO_EXPORT(double, f64)
