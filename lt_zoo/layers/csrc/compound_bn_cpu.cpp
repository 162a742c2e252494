// Compound BN on CPU: the map-sized work of lt_zoo/layers/compound_bn_functional.py in one pass each.
//
// Built on first use by lt_zoo/layers/compound_bn_native.py (g++ -O3 -march=native, no torch headers) and
// called through ctypes with raw pointers.  Every function walks the map in tiles of kTileVectors vectors
// of T positions of one image (T lanes: one vector register of the target), gathered into a [U][C][T]
// scratch tile whatever the map's layout (contiguous (N, C, L) or channels_last (N, L, C)), so every
// inner loop runs over T adjacent positions and vectorises.
//
// Every pass takes the raw map and the shift s (C,) of the layer's shifted coordinates, and works on x - s.
//   estep_moments  r_pk = softmax_k(const_k + sum_c x_pc (w1_kc + x_pc w2_kc)), thresholded at 1e-30
//                  (or the one-hot group of each image), stored as R (N, M, L); and the sums
//                  [sum_p r, sum_p r^2, sum_p r x_c, sum_p r x_c^2] as (M, 2 + 2C)        (Eq. 7-10)
//   combine        out_pc = x_pc sum_k r_pk A_kc [+ g_pc sum_k r_pk B_kc] + sum_k r_pk D_kc:
//                  the output (A = scale, D = offset) and the input gradient (A = U, B = W A, D = V)
//   grad_moments   G_kc = sum_p r_pk g_pc, H_kc = sum_p r_pk g_pc x_pc
//   eval           E-step and output in one pass, R never stored
// Each sum over k of a position's posteriors r_pk is taken relative to component 0 (relative_rows): one
// term fewer per element, as the r_pk sum to 1.
// train_forward / train_backward chain the passes of a training step with the (M, C) statistics between
// them, one call per direction; eval_running folds the eval constants and runs eval in one call.
//
// R is (N, M, L), or (N, M, 1) on the split path (one weight per image).  Sums accumulate in the map's
// scalar type, in a different order than the GEMM formulation: results agree to rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>

namespace {

// One tile is one vector register of the target: a wider vector-extension type is not a register, GCC
// passes it through memory, and the passes ran 8x slower on an AVX2-only CPU with 64-byte tiles.
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif

// positions per tile: T<float> = 16 / 8 / 4 and T<double> = 8 / 4 / 2 (AVX-512 / AVX / SSE)
template <typename S> constexpr int64_t T = kVectorBytes / static_cast<int64_t>(sizeof(S));

// Contiguous maps are read as C (+ M for R, + C for the output) streams of T positions each, more than
// the hardware prefetcher follows; each full-tile access also prefetches 128 bytes ahead in its stream
// (20-30% faster passes once the map outgrows L2 on an AVX2 CPU).
template <typename S> constexpr int64_t kAhead = 128 / static_cast<int64_t>(sizeof(S));

// V: T<S> lanes of S (GCC vector extension), I: the integers of the same width
template <typename S> struct Lanes;
template <> struct Lanes<float> {
    typedef float V __attribute__((vector_size(kVectorBytes)));
    typedef int32_t I __attribute__((vector_size(kVectorBytes)));
    static constexpr int bits = 23, bias = 127, degree = 6;
    // 2^r on [-1/2, 1/2], degree 6, fitted for least maximum relative error (1.9e-9; 9.6e-8 evaluated in
    // float, under one ulp)
    static constexpr float exp2_coef[degree + 1] = {1.0f, 0.6931471824645996f, 0.24022646248340607f,
                                                    0.05550328642129898f, 0.009618489071726799f,
                                                    0.0013399930903688073f, 0.00015345810970757157f};
};
template <> struct Lanes<double> {
    typedef double V __attribute__((vector_size(kVectorBytes)));
    typedef int64_t I __attribute__((vector_size(kVectorBytes)));
    static constexpr int bits = 52, bias = 1023, degree = 12;
    // 2^r on [-1/2, 1/2]: Taylor, (ln 2)^k / k! (truncation < 2e-16)
    static constexpr double exp2_coef[degree + 1] = {
        1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
        0.0013333558146428443, 0.0001540353039338161, 1.525273380405984e-05, 1.3215486790144307e-06,
        1.0178086009239699e-07, 7.054911620801123e-09, 4.445538271870811e-10, 2.5678435993488202e-11};
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
    for (int64_t t = 0; t < T<S>; ++t) s += v[t];
    return s;
}

// y[i] = 2^y[i] for N vectors of y <= 0, branch-free (libm has no vector form here), in lockstep: each
// step for all N before the next, so the N chains of dependent multiply-adds overlap.  y = n + r with
// n = round(y) (r = y - n is exact), 2^r by the polynomial exp2_coef, times 2^n built in the exponent
// bits.  y is clamped at -101 (the exponent bits would overflow below -126): 2^-101 < 1e-30 and every
// caller divides by a sum >= 1 and thresholds at 1e-30, which zeroes such a term anyway.  NaN stays NaN.
// Base 2 because the E-step's coefficients come pre-scaled by log2(e) (kLog2e): no multiply and no
// two-step ln 2 reduction a term, and a polynomial of degree 6 for float instead of Taylor's 7.
template <int N, typename S, typename V = typename Lanes<S>::V>
inline void exp2_nonpositive(V* y) {
    using L = Lanes<S>;
    typedef typename L::I I;
    I n[N];
    V r[N], p[N];
    for (int i = 0; i < N; ++i) {
        const V yc = y[i] < S(-101) ? V{} + S(-101) : y[i];
        n[i] = __builtin_convertvector(yc - S(0.5), I);  // truncation of y - 1/2 <= 0: round to nearest
        r[i] = yc - __builtin_convertvector(n[i], V);
        p[i] = V{} + L::exp2_coef[L::degree];
    }
    for (int k = L::degree - 1; k >= 0; --k)
        for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + L::exp2_coef[k];  // Horner: one FMA a degree
    for (int i = 0; i < N; ++i) {
        const I e = (n[i] + L::bias) << L::bits;
        V scale;
        std::memcpy(&scale, &e, sizeof(V));
        y[i] = p[i] * scale;
    }
}

constexpr double kLog2e = 1.4426950408889634;

// Images [first, last) of this OpenMP thread: a static split, so the order of every partial sum, and the
// result, depend only on the number of threads.
inline void my_images(int64_t n, int64_t& first, int64_t& last) {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    first = n * tid / nth;
    last = n * (tid + 1) / nth;
}

// f(img, l0, tn) for every tile of this thread's images: positions [l0, l0 + tn) of image img, tiles of
// U vectors (U T positions)
template <typename S, int U, typename F>
inline void each_tile(int64_t n, int64_t l, F&& f) {
    int64_t first, last;
    my_images(n, first, last);
    constexpr int64_t W = U * T<S>;
    for (int64_t img = first; img < last; ++img)
        for (int64_t l0 = 0; l0 < l; l0 += W) f(img, l0, l - l0 < W ? l - l0 : W);
}

// In-register transpose of a T x T block (T vectors of T lanes: rows in, columns out), for channels_last
// tiles where one tile is one register: log2(T) butterfly stages, each swapping the off-diagonal b x b
// blocks of every 2b x 2b block with two-source shuffles, which GCC lowers to the target's permutes
// (vpermt2ps on AVX-512).  Stage b: row i (bit b clear) takes lanes j of itself where bit b of j is clear and lanes
// j - b of row i + b where it is set; row i + b takes the rest.
template <typename I, int64_t N, int64_t B, size_t... J>
constexpr I butterfly_mask(std::index_sequence<J...>, bool upper) {
    return I{static_cast<typename std::remove_reference<decltype(I{}[0])>::type>(
        upper ? ((J & B) == 0 ? J + B : N + J) : ((J & B) == 0 ? J : N + J - B))...};
}

template <typename S, int64_t B = 1>
inline void transpose(typename Lanes<S>::V* r) {
    typedef typename Lanes<S>::I I;
    constexpr int64_t N = T<S>;
    if constexpr (B < N) {
        constexpr I lo = butterfly_mask<I, N, B>(std::make_index_sequence<N>{}, false);
        constexpr I hi = butterfly_mask<I, N, B>(std::make_index_sequence<N>{}, true);
        for (int64_t i = 0; i < N; ++i)
            if ((i & B) == 0) {
                const auto a = r[i], c = r[i + B];
                r[i] = __builtin_shuffle(a, c, lo);
                r[i + B] = __builtin_shuffle(a, c, hi);
            }
        transpose<S, B * 2>(r);
    }
}

template <typename S>
struct Tiles {
    typedef typename Lanes<S>::V V;
    int64_t n, c, l;
    int cl;  // 1: channels_last (N, L, C); 0: contiguous (N, C, L)

    // tile[ch] = x[img, ch, l0 : l0 + tn] - shift[ch] (shift nullptr: none), zero beyond tn before the
    // shift: x - s without a shifted copy of the map; padded positions hold -s, and every caller gives them
    // weight 0 or leaves them unwritten.  The members are read into locals first: a store through memcpy
    // may alias anything, *this included, and would reload them for every channel.
    void gather(const S* x, const S* shift, int64_t img, int64_t l0, int64_t tn, V* tile) const {
        const int64_t c = this->c, l = this->l;
        if (cl) {
            // a transpose: in registers, T x T blocks, for C a multiple of T; else written straight into the
            // tile's storage, one channel's T lanes after another.  Filling a small
            // buffer per channel and loading it as one vector stalled on store forwarding (several times the
            // contiguous pass; benchmarks/results/cbn_pass_bound.md has the ratio now)
            const S* base = x + (img * l + l0) * c;
            S* flat = reinterpret_cast<S*>(tile);  // GCC vector types alias their element type
            if (tn == T<S> && c % T<S> == 0) {
                for (int64_t ch0 = 0; ch0 < c; ch0 += T<S>) {
                    V rows[T<S>];
                    for (int64_t t = 0; t < T<S>; ++t) rows[t] = load<S>(base + t * c + ch0);
                    transpose<S>(rows);
                    for (int64_t t = 0; t < T<S>; ++t) tile[ch0 + t] = shift ? rows[t] - shift[ch0 + t] : rows[t];
                }
                return;
            }
            if (tn == T<S>) {
                for (int64_t ch = 0; ch < c; ++ch)
                    for (int64_t t = 0; t < T<S>; ++t) flat[ch * T<S> + t] = base[t * c + ch];
            } else {
                for (int64_t ch = 0; ch < c; ++ch)
                    for (int64_t t = 0; t < T<S>; ++t) flat[ch * T<S> + t] = t < tn ? base[t * c + ch] : S(0);
            }
            if (shift)
                for (int64_t ch = 0; ch < c; ++ch) tile[ch] -= shift[ch];
        } else {
            const S* base = x + img * c * l + l0;
            for (int64_t ch = 0; ch < c; ++ch) {
                V v;
                if (tn == T<S>) {
                    __builtin_prefetch(base + ch * l + kAhead<S>);
                    v = load<S>(base + ch * l);
                } else {
                    S buf[T<S>] = {};
                    std::memcpy(buf, base + ch * l, tn * sizeof(S));
                    v = load<S>(buf);
                }
                tile[ch] = shift ? v - shift[ch] : v;
            }
        }
    }

    void scatter(S* out, int64_t img, int64_t l0, int64_t tn, const V* tile) const {
        const int64_t c = this->c, l = this->l;
        if (cl) {
            S* base = out + (img * l + l0) * c;
            if (tn == T<S> && c % T<S> == 0) {
                for (int64_t ch0 = 0; ch0 < c; ch0 += T<S>) {
                    V rows[T<S>];
                    for (int64_t t = 0; t < T<S>; ++t) rows[t] = tile[ch0 + t];
                    transpose<S>(rows);
                    for (int64_t t = 0; t < T<S>; ++t) store(base + t * c + ch0, rows[t]);
                }
                return;
            }
            const S* flat = reinterpret_cast<const S*>(tile);
            for (int64_t ch = 0; ch < c; ++ch)
                for (int64_t t = 0; t < tn; ++t) base[t * c + ch] = flat[ch * T<S> + t];
        } else {
            S* base = out + img * c * l + l0;
            if (tn == T<S>) {
                for (int64_t ch = 0; ch < c; ++ch) {
                    __builtin_prefetch(base + ch * l + kAhead<S>, 1);
                    store(base + ch * l, tile[ch]);
                }
            } else {
                for (int64_t ch = 0; ch < c; ++ch) {
                    S buf[T<S>];
                    store(buf, tile[ch]);
                    std::memcpy(base + ch * l, buf, tn * sizeof(S));
                }
            }
        }
    }

    // r[k stride] of a stored R (N, M, lr) for one vector of positions, 0 beyond tn; lr = 1: one weight per
    // image
    void load_r(const S* R, int64_t img, int64_t l0, int64_t tn, int64_t m, int64_t lr, V* r, int64_t stride) const {
        for (int64_t k = 0; k < m; ++k) {
            const S* src = R + (img * m + k) * lr;
            if (lr == 1) {
                S buf[T<S>];
                for (int64_t t = 0; t < T<S>; ++t) buf[t] = t < tn ? src[0] : S(0);
                r[k * stride] = load<S>(buf);
            } else if (tn == T<S>) {
                __builtin_prefetch(src + l0 + kAhead<S>);
                r[k * stride] = load<S>(src + l0);
            } else {
                S buf[T<S>] = {};
                std::memcpy(buf, src + l0, tn * sizeof(S));
                r[k * stride] = load<S>(buf);
            }
        }
    }
};

// Tiles of the passes are kTileVectors vectors of T positions: each (M, C) coefficient loaded once serves
// them all, the E-step runs that many FMA chains a component, and the moments' accumulators are loaded
// and stored once per kTileVectors vectors (docs/compound_bn_numerics.md: with this file's other changes of
// 2026-12-04, 0.66-0.76x the eval time and 0.75-0.80x the training time of one-vector tiles on an AVX2 CPU;
// benchmarks/results/cbn_kernel_ab.md).  One vector with AVX-512:
// its 16-float vectors would leave half of a two-vector tile empty on 4 x 4 maps (ResNet's last stage),
// and no AVX-512 machine has timed two.
constexpr int kTileVectors = kVectorBytes == 64 ? 1 : 2;

// Positions of vector u of a tile of tn positions: min(max(tn - u T, 0), T)
template <typename S>
inline int64_t vector_positions(int64_t tn, int u) { return std::clamp<int64_t>(tn - u * T<S>, 0, T<S>); }

// xt [U][C] = the tile's U vectors of positions [l0, l0 + tn) of image img, minus shift
template <int U, typename S, typename V>
inline void gather_tile(const Tiles<S>& tl, const S* x, const S* shift, int64_t img, int64_t l0, int64_t tn, V* xt) {
    for (int u = 0; u < U; ++u) tl.gather(x, shift, img, l0 + u * T<S>, vector_positions<S>(tn, u), xt + u * tl.c);
}

// r [M][U] of a stored R for the tile's U vectors
template <int U, typename S, typename V>
inline void load_r_tile(const Tiles<S>& tl, const S* R, int64_t img, int64_t l0, int64_t tn, int64_t m, int64_t lr,
                        V* r) {
    for (int u = 0; u < U; ++u) tl.load_r(R, img, l0 + u * T<S>, vector_positions<S>(tn, u), m, lr, r + u, U);
}

// Every pass and tile function takes the number of components twice: MM > 0 is M known at compile time
// (the extern "C" entry points dispatch M = 1..8 so), which unrolls the loops over k and keeps the M
// posteriors of a tile in registers (2-3x faster on AVX2); MM = 0 reads the runtime m instead.
template <int MM>
inline int64_t comps(int64_t m) { return MM > 0 ? MM : m; }

// An (M, W) table relative to its row 0: row 0 as is, row k >= 1 minus row 0 (nullptr: an empty table).
// Every per-position weighting of the passes is relative to component 0: the E-step's softmax sees only
// differences of logits (logit_0 = 0), and the mixes sum_k r_k A_k are A_0 + sum_{k>=1} r_k (A_k - A_0) as
// the posteriors sum to 1 (to the 1e-30 threshold; one-hot on the split path).  That takes one term of M
// off every map-sized sum: 2(M-1) FMAs per element for the E-step instead of 2M, 2(M-1) + 1 for the output
// instead of 2M + 1.  It is also the more accurate form of the E-step: the logits' common part, often
// large, cancels in the (M, C) coefficients instead of between two map-sized sums.
// scale (kLog2e for the E-step's logits, see exp2_nonpositive) multiplies the differences.
template <typename S>
std::vector<S> relative_rows(const S* t, int64_t m, int64_t w, S scale = S(1)) {
    if (!t) return {};
    std::vector<S> out(t, t + m * w);
    for (int64_t i = w; i < m * w; ++i) out[i] = (out[i] - t[i % w]) * scale;  // * 1 is exact
    return out;
}

// Posteriors of one tile of U vectors: softmax over k of const_k + sum_c x_c (w1_kc + x_c w2_kc),
// max-subtracted, thresholded at 1e-30 (F.threshold of the GEMM kernel); coefficients relative_rows
// (logit_0 = 0) times log2(e), so the logits are in base 2 (exp2_nonpositive).  xt is [U][C] (vector u of
// channel ch at xt[u c + ch]), r is [M][U].  U > 1 loads each coefficient once for U vectors and runs U
// independent FMA chains a component.
template <int MM, int U, typename S, typename V>
void estep_tile(const V* __restrict xt, int64_t c, int64_t m_, const S* __restrict w1, const S* __restrict w2,
                const S* __restrict cst, V* __restrict r) {
    const int64_t m = comps<MM>(m_);
    for (int u = 0; u < U; ++u) r[u] = V{};
    for (int64_t k = 1; k < m; ++k)
        for (int u = 0; u < U; ++u) r[k * U + u] = V{} + cst[k];
    for (int64_t ch = 0; ch < c; ++ch) {
        for (int64_t k = 1; k < m; ++k) {
            const S a = w1[k * c + ch], b = w2[k * c + ch];
            for (int u = 0; u < U; ++u) {
                const V xv = xt[u * c + ch];
                r[k * U + u] += xv * (a + xv * b);
            }
        }
    }
    for (int u = 0; u < U; ++u) {
        V mx = r[u];
        for (int64_t k = 1; k < m; ++k) mx = r[k * U + u] > mx ? r[k * U + u] : mx;
        for (int64_t k = 0; k < m; ++k) r[k * U + u] -= mx;
    }
    if constexpr (MM > 0) {
        exp2_nonpositive<MM * U, S>(r);
    } else {
        for (int64_t i = 0; i < m * U; ++i) exp2_nonpositive<1, S>(r + i);
    }
    for (int u = 0; u < U; ++u) {
        V sum{};
        for (int64_t k = 0; k < m; ++k) sum += r[k * U + u];
        const V inv = S(1) / sum;
        for (int64_t k = 0; k < m; ++k) {
            const V v = r[k * U + u] * inv;
            r[k * U + u] = v > S(1e-30) ? v : V{};
        }
    }
}

// cnt_k += r_k, sq_k += r_k^2, p_kc += r_k x_c, q_kc += r_k x_c^2 over one tile of U vectors (xt [U][C],
// r [M][U])
template <int MM, int U, typename S, typename V>
void accumulate_moments(const V* __restrict xt, const V* __restrict r, int64_t c, int64_t m_, V* __restrict cnt,
                        V* __restrict sq, V* __restrict p, V* __restrict q) {
    const int64_t m = comps<MM>(m_);
    for (int64_t k = 0; k < m; ++k)
        for (int u = 0; u < U; ++u) {
            cnt[k] += r[k * U + u];
            sq[k] += r[k * U + u] * r[k * U + u];
        }
    for (int64_t ch = 0; ch < c; ++ch) {
        for (int64_t k = 0; k < m; ++k) {
            V pk = p[k * c + ch], qk = q[k * c + ch];
            for (int u = 0; u < U; ++u) {
                const V xv = xt[u * c + ch], rx = r[k * U + u] * xv;
                pk += rx;
                qk += rx * xv;
            }
            p[k * c + ch] = pk;
            q[k * c + ch] = qk;
        }
    }
}

template <int MM, typename S>
void estep_moments(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl, const S* w1, const S* w2,
                   const S* cst, int64_t m_, const int64_t* groups, S* R, S* sums, int nt) {
    typedef typename Lanes<S>::V V;
    const int64_t m = comps<MM>(m_);
    const Tiles<S> tl{n, c, l, cl};
    const int64_t width = 2 + 2 * c;
    std::vector<S> parts(static_cast<size_t>(nt) * m * width, S(0));
    const std::vector<S> rw1 = relative_rows(w1, m, c, S(kLog2e)), rw2 = relative_rows(w2, m, c, S(kLog2e)),
                         rcst = relative_rows(cst, m, 1, S(kLog2e));
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        constexpr int U = kTileVectors;
        std::vector<V> xt(U * c), r(U * m), p(m * c), q(m * c), cnt(m), sq(m);
        each_tile<S, U>(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            gather_tile<U>(tl, x, shift, img, l0, tn, xt.data());
            V mask[U];
            for (int u = 0; u < U; ++u) {
                S valid[T<S>];
                for (int64_t t = 0; t < T<S>; ++t) valid[t] = t < vector_positions<S>(tn, u) ? S(1) : S(0);
                mask[u] = load<S>(valid);
            }
            if (groups) {
                for (int64_t k = 0; k < m; ++k)
                    for (int u = 0; u < U; ++u) r[k * U + u] = k == groups[img] ? mask[u] : V{};
                if (l0 == 0)
                    for (int64_t k = 0; k < m; ++k) R[img * m + k] = k == groups[img] ? S(1) : S(0);
            } else {
                estep_tile<MM, U, S>(xt.data(), c, m, rw1.data(), rw2.data(), rcst.data(), r.data());
                for (int64_t k = 0; k < m; ++k)
                    for (int u = 0; u < U; ++u) {
                        r[k * U + u] *= mask[u];  // padded positions weigh nothing
                        S buf[T<S>];
                        store(buf, r[k * U + u]);
                        std::memcpy(R + (img * m + k) * l + l0 + u * T<S>, buf, vector_positions<S>(tn, u) * sizeof(S));
                    }
            }
            accumulate_moments<MM, U, S>(xt.data(), r.data(), c, m, cnt.data(), sq.data(), p.data(), q.data());
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

// out = x (r^T A) [+ g (r^T B)] + r^T D over one tile of U vectors, with A, B, D relative_rows (r_0
// implied); xt, gt are [U][C] and r is [M][U] as in estep_tile.  emit(u, ch, v) takes vector u of channel
// ch of the output: into a [U][C] tile, or straight into a contiguous map (Tiles::direct).
template <int MM, int U, typename S, typename V, typename Emit>
void combine_tile(const V* __restrict xt, const V* __restrict gt, const V* __restrict r, int64_t c, int64_t m_,
                  const S* __restrict A, const S* __restrict B, const S* __restrict D, Emit&& emit) {
    const int64_t m = comps<MM>(m_);
    for (int64_t ch = 0; ch < c; ++ch) {
        V a[U], b[U], d[U];
        for (int u = 0; u < U; ++u) {
            a[u] = V{} + A[ch];
            d[u] = V{} + D[ch];
            if (gt) b[u] = V{} + B[ch];
        }
        for (int64_t k = 1; k < m; ++k) {
            const S ak = A[k * c + ch], dk = D[k * c + ch], bk = gt ? B[k * c + ch] : S(0);
            for (int u = 0; u < U; ++u) {
                a[u] += r[k * U + u] * ak;
                d[u] += r[k * U + u] * dk;
                if (gt) b[u] += r[k * U + u] * bk;
            }
        }
        for (int u = 0; u < U; ++u)
            emit(u, ch, gt ? xt[u * c + ch] * a[u] + gt[u * c + ch] * b[u] + d[u] : xt[u * c + ch] * a[u] + d[u]);
    }
}

// The output of a tile of U vectors at positions [l0, l0 + tn) of image img: written straight into a
// contiguous map when the tile is full (one load and one store a vector fewer than through a tile and
// Tiles::scatter), else through ot [U][C] and scatter.
template <int MM, int U, typename S, typename V>
void combine_out(const Tiles<S>& tl, const V* xt, const V* gt, const V* r, int64_t m, const S* A, const S* B,
                 const S* D, S* out, int64_t img, int64_t l0, int64_t tn, V* ot) {
    const int64_t c = tl.c, l = tl.l;
    if (!tl.cl && tn == U * T<S>) {
        S* base = out + img * c * l + l0;
        combine_tile<MM, U, S>(xt, gt, r, c, m, A, B, D, [base, l](int u, int64_t ch, V v) {
            if (u == 0) __builtin_prefetch(base + ch * l + kAhead<S>, 1);
            store(base + ch * l + u * T<S>, v);
        });
        return;
    }
    combine_tile<MM, U, S>(xt, gt, r, c, m, A, B, D, [ot, c](int u, int64_t ch, V v) { ot[u * c + ch] = v; });
    for (int u = 0; u < U; ++u) tl.scatter(out, img, l0 + u * T<S>, vector_positions<S>(tn, u), ot + u * c);
}

// The same output on a channels_last map with C a multiple of T, position by position in the map's own
// orientation: vector cb of a position is channels [cb, cb + T), r_k of the position a broadcast scalar,
// A_k [cb, cb + T) a plain vector load.  No transpose in or out (a tile through combine_out costs two
// T x T transposes per T channels); x, g are the raw maps (x minus shift here), r [M][U] as in estep_tile,
// rs scratch for M U T scalars.
// The combine pass only: in eval the E-step has the transposed tile already, and re-reading the map
// position by position made the pass 1.19-1.24x slower than combine_out's transpose back (an A/B run, not kept).
template <int MM, int U, typename S, typename V>
void combine_rows(const Tiles<S>& tl, const S* x, const S* shift, const S* g, const V* r, int64_t m_, const S* A,
                  const S* B, const S* D, S* out, int64_t img, int64_t l0, int64_t tn, S* __restrict rs) {
    const int64_t m = comps<MM>(m_), c = tl.c;
    for (int64_t k = 0; k < m; ++k)  // r_k of position t at rs[k U T + t]
        for (int u = 0; u < U; ++u) store(rs + (k * U + u) * T<S>, r[k * U + u]);
    for (int64_t t = 0; t < tn; ++t) {
        const int64_t at = (img * tl.l + l0 + t) * c;
        for (int64_t cb = 0; cb < c; cb += T<S>) {
            V xv = load<S>(x + at + cb), a = load<S>(A + cb), d = load<S>(D + cb), b{};
            if (shift) xv -= load<S>(shift + cb);
            if (g) b = load<S>(B + cb);
            for (int64_t k = 1; k < m; ++k) {
                const S rk = rs[k * U * T<S> + t];
                a += rk * load<S>(A + k * c + cb);
                d += rk * load<S>(D + k * c + cb);
                if (g) b += rk * load<S>(B + k * c + cb);
            }
            store(out + at + cb, g ? xv * a + load<S>(g + at + cb) * b + d : xv * a + d);
        }
    }
}

template <int MM, typename S>
void combine(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l, int cl, const S* R,
             int64_t lr, int64_t m_, const S* A_, const S* B_, const S* D_, S* out, int nt) {
    typedef typename Lanes<S>::V V;
    const int64_t m = comps<MM>(m_);
    const Tiles<S> tl{n, c, l, cl};
    const std::vector<S> A = relative_rows(A_, m, c), B = relative_rows(B_, m, c), D = relative_rows(D_, m, c);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        constexpr int U = kTileVectors;
        std::vector<V> xt(U * c), gt(g ? U * c : 0), ot(U * c), r(U * m);
        std::vector<S> rs(m * U * T<S>);
        each_tile<S, U>(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            load_r_tile<U>(tl, R, img, l0, tn, m, lr, r.data());
            if (cl && c % T<S> == 0) {
                combine_rows<MM, U, S>(tl, x, shift, g, r.data(), m, A.data(), B.data(), D.data(), out, img, l0, tn,
                                       rs.data());
                return;
            }
            gather_tile<U>(tl, x, shift, img, l0, tn, xt.data());
            if (g) gather_tile<U>(tl, g, static_cast<const S*>(nullptr), img, l0, tn, gt.data());
            combine_out<MM, U, S>(tl, xt.data(), g ? gt.data() : nullptr, r.data(), m, A.data(), B.data(), D.data(),
                                  out, img, l0, tn, ot.data());
        });
    }
}


// G_kc += r_k g_c, H_kc += r_k g_c x_c over one tile of U vectors (xt, gt [U][C], r [M][U])
template <int MM, int U, typename S, typename V>
void accumulate_grad(const V* __restrict xt, const V* __restrict gt, const V* __restrict r, int64_t c,
                     int64_t m_, V* __restrict ga, V* __restrict ha) {
    const int64_t m = comps<MM>(m_);
    for (int64_t ch = 0; ch < c; ++ch) {
        for (int64_t k = 0; k < m; ++k) {
            V gk = ga[k * c + ch], hk = ha[k * c + ch];
            for (int u = 0; u < U; ++u) {
                const V rg = r[k * U + u] * gt[u * c + ch];
                gk += rg;
                hk += rg * xt[u * c + ch];
            }
            ga[k * c + ch] = gk;
            ha[k * c + ch] = hk;
        }
    }
}

template <int MM, typename S>
void grad_moments(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l, int cl, const S* R,
                  int64_t lr, int64_t m_, S* G, S* H, int nt) {
    typedef typename Lanes<S>::V V;
    const int64_t m = comps<MM>(m_);
    const Tiles<S> tl{n, c, l, cl};
    std::vector<S> parts(static_cast<size_t>(nt) * 2 * m * c, S(0));
    int used = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        constexpr int U = kTileVectors;
        std::vector<V> xt(U * c), gt(U * c), r(U * m), ga(m * c), ha(m * c);
        each_tile<S, U>(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            gather_tile<U>(tl, x, shift, img, l0, tn, xt.data());
            gather_tile<U>(tl, g, static_cast<const S*>(nullptr), img, l0, tn, gt.data());
            load_r_tile<U>(tl, R, img, l0, tn, m, lr, r.data());
            accumulate_grad<MM, U, S>(xt.data(), gt.data(), r.data(), c, m, ga.data(), ha.data());
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

template <int MM, typename S>
void eval(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl, const S* w1, const S* w2,
          const S* cst, int64_t m_, const S* scale, const S* offset, S* out, int nt) {
    typedef typename Lanes<S>::V V;
    constexpr int U = kTileVectors;
    const int64_t m = comps<MM>(m_);
    const Tiles<S> tl{n, c, l, cl};
    const std::vector<S> rw1 = relative_rows(w1, m, c, S(kLog2e)), rw2 = relative_rows(w2, m, c, S(kLog2e)),
                         rcst = relative_rows(cst, m, 1, S(kLog2e)),
                         A = relative_rows(scale, m, c), D = relative_rows(offset, m, c);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<V> xt(U * c), ot(U * c), r(U * m);
        each_tile<S, U>(n, l, [&](int64_t img, int64_t l0, int64_t tn) {
            gather_tile<U>(tl, x, shift, img, l0, tn, xt.data());
            estep_tile<MM, U, S>(xt.data(), c, m, rw1.data(), rw2.data(), rcst.data(), r.data());
            combine_out<MM, U, S>(tl, xt.data(), static_cast<const V*>(nullptr), r.data(), m, A.data(),
                                  static_cast<const S*>(nullptr), D.data(), out, img, l0, tn, ot.data());
        });
    }
}

// ---- (M, C) statistics: what the layer computes between and after the passes, in one call each ----
// The same formulas as lt_zoo/layers/compound_bn_functional.py (estep_coefficients, fold_running, the
// statistics of _train_forward, the backward's U and V) and CompoundBatchNorm2d._update_running; there
// they are ~130 small torch ops per layer and step, which cost more than the passes on small maps.

template <typename S>
inline S tiny() { return std::numeric_limits<S>::min(); }

// w1 = (mu - s)/var', w2 = -1/(2 var'), const = log pi - (sum log var' + sum (mu - s) w1)/2, all / T;
// var' = max(var, eps), pi floored at the smallest normal
template <typename S>
void coefficients(const S* prior, const S* mean_rel, const S* var, int64_t m, int64_t c, S eps, S temperature,
                  S* w1, S* w2, S* cst) {
    for (int64_t k = 0; k < m; ++k) {
        S logsum = 0, quad = 0;
        for (int64_t ch = 0; ch < c; ++ch) {
            const S v = std::max(var[k * c + ch], eps), iv = S(1) / v, a = mean_rel[k * c + ch] * iv;
            logsum += std::log(v);
            quad += mean_rel[k * c + ch] * a;
            w1[k * c + ch] = temperature == S(1) ? a : a / temperature;
            w2[k * c + ch] = iv * (S(-0.5) / temperature);
        }
        const S cs = std::log(std::max(prior[k], tiny<S>())) - S(0.5) * (logsum + quad);
        cst[k] = temperature == S(1) ? cs : cs / temperature;
    }
}

// scale = c_k gamma / sqrt(var + eps), offset = c_k (beta - gamma (mu - s) / sqrt(var + eps)), inv = 1/sqrt(var + eps);
// c_k = pi_k^-1/2 when mn, else 1
template <typename S>
void affine(const S* weight, const S* bias, const S* mean_rel, const S* var, const S* prior, int64_t m, int64_t c,
            S eps, int mn, S* scale, S* offset, S* inv) {
    for (int64_t k = 0; k < m; ++k) {
        const S cw = mn ? S(1) / std::sqrt(std::max(prior[k], tiny<S>())) : S(1);
        for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t i = k * c + ch;
            const S iv = S(1) / std::sqrt(var[i] + eps), sc = weight[i] * iv, off = bias[i] - sc * mean_rel[i];
            if (inv) inv[i] = iv;
            scale[i] = mn ? sc * cw : sc;
            offset[i] = mn ? off * cw : off;
        }
    }
}

// eval constants (FoldedEval): out = [shift C | w1 MC | w2 MC | const M | scale MC | offset MC]
template <typename S>
void fold(const S* prior, const S* mean, const S* var, const S* weight, const S* bias, int64_t m, int64_t c, S eps,
          S temperature, int mn, S* out) {
    S* shift = out;
    S* w1 = shift + c;
    S* w2 = w1 + m * c;
    S* cst = w2 + m * c;
    S* scale = cst + m;
    S* offset = scale + m * c;
    S total = 0;
    for (int64_t k = 0; k < m; ++k) total += prior[k];
    for (int64_t ch = 0; ch < c; ++ch) {
        S sh = 0;
        for (int64_t k = 0; k < m; ++k) sh += prior[k] / total * mean[k * c + ch];
        shift[ch] = sh;
    }
    std::vector<S> mean_rel(m * c);
    for (int64_t k = 0; k < m; ++k)
        for (int64_t ch = 0; ch < c; ++ch) mean_rel[k * c + ch] = mean[k * c + ch] - shift[ch];
    coefficients<S>(prior, mean_rel.data(), var, m, c, eps, temperature, w1, w2, cst);
    affine<S>(weight, bias, mean_rel.data(), var, prior, m, c, eps, mn, scale, offset, nullptr);
}

// Statistics of a training forward from the batch sums (M, 2 + 2C) (Eq. 7-10) and the output's affine.
// out = [counts M | n_eff M | safe M | mask M | finite 1 | bmean MC | bvar MC | scale MC | offset MC | inv MC |
//        mean_used MC]; mask: component active (N_k > min_count), 1/0; finite: every sum finite, 1/0.
template <typename S>
void batch_affine(const S* sums, const S* prior, const S* mean_rel, const S* var, const S* weight, const S* bias,
                  int64_t m, int64_t c, S eps, S min_count, int use_batch, int mn, S* out) {
    const int64_t width = 2 + 2 * c;
    S* counts = out;
    S* n_eff = counts + m;
    S* safe = n_eff + m;
    S* mask = safe + m;
    S* finite = mask + m;
    S* bmean = finite + 1;
    S* bvar = bmean + m * c;
    S* scale = bvar + m * c;
    S* offset = scale + m * c;
    S* inv = offset + m * c;
    S* mean_used = inv + m * c;
    bool ok = true;
    S total = 0;
    for (int64_t i = 0; i < m * width; ++i) ok = ok && std::isfinite(sums[i]);
    std::vector<S> var_used(m * c), prior_used(m);
    for (int64_t k = 0; k < m; ++k) {
        const S* row = sums + k * width;
        counts[k] = row[0];
        total += row[0];
        n_eff[k] = row[0] * row[0] / std::max(row[1], tiny<S>());
        const bool active = row[0] > min_count;
        mask[k] = active ? S(1) : S(0);
        safe[k] = active ? row[0] : S(1);
        for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t i = k * c + ch;
            const S mu = row[2 + ch] / safe[k];
            bmean[i] = mu;
            bvar[i] = std::max(row[2 + c + ch] / safe[k] - mu * mu, S(0));
            const bool batch = use_batch && active;
            mean_used[i] = batch ? mu : mean_rel[i];
            var_used[i] = batch ? bvar[i] : var[i];
        }
    }
    *finite = ok ? S(1) : S(0);
    for (int64_t k = 0; k < m; ++k) prior_used[k] = use_batch ? counts[k] / total : prior[k];
    affine<S>(weight, bias, mean_used, var_used.data(), prior_used.data(), m, c, eps, mn, scale, offset, inv);
}

// Backward of _ConstantAssignmentNorm from G = R^T g and H = R^T (g x) (M, C), not under DDP:
// out = [dweight MC | dbias MC | U MC | W A MC | V MC] (the docstring there gives the formulas)
template <typename S>
void backward_coefficients(const S* G, const S* H, const S* cw, const S* mean, const S* inv, const S* weight,
                           const S* safe, const S* mask, int64_t m, int64_t c, S* out) {
    S* dweight = out;
    S* dbias = dweight + m * c;
    S* u = dbias + m * c;
    S* wa = u + m * c;
    S* v = wa + m * c;
    for (int64_t k = 0; k < m; ++k) {
        for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t i = k * c + ch;
            const S gk = cw ? G[i] * cw[k] : G[i], hk = cw ? H[i] * cw[k] : H[i];
            const S gdiff = hk - mean[i] * gk, iv = inv[i], scale = weight[i] * iv;
            dweight[i] = gdiff * iv;
            dbias[i] = gk;
            const S ui = mask[k] > S(0) ? -weight[i] * (iv * iv * iv) * gdiff / safe[k] : S(0);
            u[i] = ui;
            v[i] = (mask[k] > S(0) ? -scale * gk / safe[k] : S(0)) - ui * mean[i];
            wa[i] = cw ? scale * cw[k] : scale;
        }
    }
}

// CompoundBatchNorm2d._update_running in place: EMA (momentum) of the prior (if update_prior), and of
// the mean and unbiased variance of active components; a batch with a non-finite statistic changes
// nothing but num_batches_skipped.
template <typename S>
void running_update(S* prior, S* mean, S* var, S* last_counts, int64_t* tracked, int64_t* skipped,
                    const S* counts, const S* n_eff, const S* bmean, const S* bvar, const S* finite, int64_t m,
                    int64_t c, S momentum, S min_count, int update_prior) {
    const bool ok = *finite > S(0);
    if (!ok) {
        ++*skipped;
        return;
    }
    if (update_prior) {
        S total = 0, ptotal = 0;
        for (int64_t k = 0; k < m; ++k) total += counts[k];
        std::vector<S> p(m);
        for (int64_t k = 0; k < m; ++k) {
            p[k] = (1 - momentum) * prior[k] + momentum * counts[k] / total;
            ptotal += p[k];
        }
        for (int64_t k = 0; k < m; ++k) prior[k] = p[k] / ptotal;
    }
    for (int64_t k = 0; k < m; ++k) {
        if (!(counts[k] > min_count)) continue;
        const S unbias = n_eff[k] / (n_eff[k] - 1);
        for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t i = k * c + ch;
            mean[i] = (1 - momentum) * mean[i] + momentum * bmean[i];
            var[i] = (1 - momentum) * var[i] + momentum * bvar[i] * unbias;
        }
    }
    for (int64_t k = 0; k < m; ++k) last_counts[k] = counts[k];
    ++*tracked;
}

// One call per direction of a training layer step (not under DDP): a step used to be ~10 foreign calls
// plus the torch ops around them, and that fixed cost per call outweighed the passes on small maps.
//
// The forward's statistics buffer: batch_affine's block, then [shift C | cw M | mean MC]; cw: the weights
// c_k of the output (pi_k^-1/2 of the prior used when mn, else 1); mean: bmean + shift, the batch mean in
// the map's own coordinates.
template <typename S>
struct TrainBuffer {
    S *counts, *n_eff, *safe, *mask, *finite, *bmean, *bvar, *scale, *offset, *inv, *mean_used, *shift, *cw, *mean;
    TrainBuffer(S* b, int64_t m, int64_t c) {
        const int64_t mc = m * c;
        counts = b;
        n_eff = counts + m;
        safe = n_eff + m;
        mask = safe + m;
        finite = mask + m;
        bmean = finite + 1;
        bvar = bmean + mc;
        scale = bvar + mc;
        offset = scale + mc;
        inv = offset + mc;
        mean_used = inv + mc;
        shift = mean_used + mc;
        cw = shift + c;
        mean = cw + m;
    }
};

// The training forward of compound_bn_functional with the batch shift (the mean of the N vectors at
// map position `centre`, batch_shift), the E-step coefficients, posteriors and sums, the statistics and
// the output in one call.  prior, mean, var: the running state (M,), (M, C); R (N, M, L or 1) and y
// (x's layout) are written, and the statistics into `out` (TrainBuffer).
template <int MM, typename S>
void train_forward(const S* x, int64_t n, int64_t c, int64_t l, int cl, int64_t centre, const S* prior,
                   const S* mean, const S* var, const S* weight, const S* bias, int64_t m, const int64_t* groups,
                   S eps, S temperature, S min_count, int use_batch, int mn, S* R, S* y, S* out, int nt) {
    TrainBuffer<S> b(out, m, c);
    for (int64_t ch = 0; ch < c; ++ch) {
        S s = 0;
        for (int64_t img = 0; img < n; ++img) s += cl ? x[(img * l + centre) * c + ch] : x[(img * c + ch) * l + centre];
        b.shift[ch] = s / static_cast<S>(n);
    }
    std::vector<S> mean_rel(m * c), w1(m * c), w2(m * c), cst(m), sums(m * (2 + 2 * c));
    for (int64_t k = 0; k < m; ++k)
        for (int64_t ch = 0; ch < c; ++ch) mean_rel[k * c + ch] = mean[k * c + ch] - b.shift[ch];
    if (!groups) coefficients<S>(prior, mean_rel.data(), var, m, c, eps, temperature, w1.data(), w2.data(), cst.data());
    estep_moments<MM, S>(x, b.shift, n, c, l, cl, w1.data(), w2.data(), cst.data(), m, groups, R, sums.data(), nt);
    batch_affine<S>(sums.data(), prior, mean_rel.data(), var, weight, bias, m, c, eps, min_count, use_batch, mn, out);
    S total = 0;
    for (int64_t k = 0; k < m; ++k) total += b.counts[k];
    for (int64_t k = 0; k < m; ++k) {
        const S p = use_batch ? b.counts[k] / total : prior[k];
        b.cw[k] = mn ? S(1) / std::sqrt(std::max(p, tiny<S>())) : S(1);
        for (int64_t ch = 0; ch < c; ++ch) b.mean[k * c + ch] = b.bmean[k * c + ch] + b.shift[ch];
    }
    combine<MM, S>(x, b.shift, nullptr, n, c, l, cl, R, groups ? 1 : l, m, b.scale, nullptr, b.offset, y, nt);
}

// Its backward (batch statistics, r constant): the gradient sums, the coefficients and, when dx is not
// null, the input gradient in one call; out = [dweight MC | dbias MC].
template <int MM, typename S>
void train_backward(const S* x, const S* g, int64_t n, int64_t c, int64_t l, int cl, const S* R, int64_t lr,
                    int64_t m, const S* weight, const S* buf, int mn, S* dx, S* out, int nt) {
    TrainBuffer<S> b(const_cast<S*>(buf), m, c);
    std::vector<S> G(m * c), H(m * c), coef(5 * m * c);
    grad_moments<MM, S>(x, b.shift, g, n, c, l, cl, R, lr, m, G.data(), H.data(), nt);
    backward_coefficients<S>(G.data(), H.data(), mn ? b.cw : nullptr, b.mean_used, b.inv, weight, b.safe, b.mask,
                             m, c, coef.data());
    std::memcpy(out, coef.data(), 2 * m * c * sizeof(S));
    const S* u = coef.data() + 2 * m * c;
    if (dx) combine<MM, S>(x, b.shift, g, n, c, l, cl, R, lr, m, u, u + m * c, u + 2 * m * c, dx, nt);
}

// Eval from the running state: the constants of fold and the eval pass in one call (a compiled graph
// would otherwise recompute the constants in ~30 graph ops per layer and forward).
template <int MM, typename S>
void eval_running(const S* x, int64_t n, int64_t c, int64_t l, int cl, const S* prior, const S* mean, const S* var,
                  const S* weight, const S* bias, int64_t m, S eps, S temperature, int mn, S* out, int nt) {
    std::vector<S> f(c + 4 * m * c + m);
    fold<S>(prior, mean, var, weight, bias, m, c, eps, temperature, mn, f.data());
    const S* w1 = f.data() + c;
    const S* cst = w1 + 2 * m * c;
    eval<MM, S>(x, f.data(), n, c, l, cl, w1, w1 + m * c, cst, m, cst + m, cst + m + m * c, out, nt);
}

// f(std::integral_constant<int, MM>) with MM = m for m in 1..8 (unrolled passes), else MM = 0 (runtime m)
template <typename F>
inline void with_components(int64_t m, F&& f) {
    switch (m) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        default: f(std::integral_constant<int, 0>{});
    }
}

}  // namespace

#define LT_ZOO_EXPORT(S, SUF)                                                                                     \
    extern "C" void cbn_estep_moments_##SUF(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl,  \
                                           const S* w1, const S* w2, const S* cst, int64_t m,                     \
                                           const int64_t* groups, S* R, S* sums, int nt) {                        \
        with_components(m, [&](auto mm) {                                                                         \
            estep_moments<decltype(mm)::value, S>(x, shift, n, c, l, cl, w1, w2, cst, m, groups, R, sums, nt);    \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_combine_##SUF(const S* x, const S* shift, const S* g, int64_t n, int64_t c, int64_t l,    \
                                     int cl, const S* R, int64_t lr, int64_t m, const S* A, const S* B,           \
                                     const S* D, S* out, int nt) {                                                \
        with_components(m, [&](auto mm) {                                                                         \
            combine<decltype(mm)::value, S>(x, shift, g, n, c, l, cl, R, lr, m, A, B, D, out, nt);                \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_grad_moments_##SUF(const S* x, const S* shift, const S* g, int64_t n, int64_t c,          \
                                          int64_t l, int cl, const S* R, int64_t lr, int64_t m, S* G, S* H,       \
                                          int nt) {                                                               \
        with_components(m, [&](auto mm) {                                                                         \
            grad_moments<decltype(mm)::value, S>(x, shift, g, n, c, l, cl, R, lr, m, G, H, nt);                   \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_eval_##SUF(const S* x, const S* shift, int64_t n, int64_t c, int64_t l, int cl,           \
                                  const S* w1, const S* w2, const S* cst, int64_t m, const S* scale,              \
                                  const S* offset, S* out, int nt) {                                              \
        with_components(m, [&](auto mm) {                                                                         \
            eval<decltype(mm)::value, S>(x, shift, n, c, l, cl, w1, w2, cst, m, scale, offset, out, nt);          \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" int64_t cbn_tile_positions_##SUF() { return T<S>; }                                               \
    extern "C" int64_t cbn_tile_vectors_##SUF() { return kTileVectors; }                                        \
    extern "C" void cbn_coefficients_##SUF(const S* prior, const S* mean_rel, const S* var, int64_t m, int64_t c, \
                                          S eps, S temperature, S* w1, S* w2, S* cst) {                           \
        coefficients<S>(prior, mean_rel, var, m, c, eps, temperature, w1, w2, cst);                               \
    }                                                                                                             \
    extern "C" void cbn_fold_##SUF(const S* prior, const S* mean, const S* var, const S* weight, const S* bias,   \
                                  int64_t m, int64_t c, S eps, S temperature, int mn, S* out) {                   \
        fold<S>(prior, mean, var, weight, bias, m, c, eps, temperature, mn, out);                                 \
    }                                                                                                             \
    extern "C" void cbn_batch_affine_##SUF(const S* sums, const S* prior, const S* mean_rel, const S* var,        \
                                          const S* weight, const S* bias, int64_t m, int64_t c, S eps,            \
                                          S min_count, int use_batch, int mn, S* out) {                           \
        batch_affine<S>(sums, prior, mean_rel, var, weight, bias, m, c, eps, min_count, use_batch, mn, out);      \
    }                                                                                                             \
    extern "C" void cbn_backward_coefficients_##SUF(const S* G, const S* H, const S* cw, const S* mean,           \
                                                   const S* inv, const S* weight, const S* safe, const S* mask,   \
                                                   int64_t m, int64_t c, S* out) {                                \
        backward_coefficients<S>(G, H, cw, mean, inv, weight, safe, mask, m, c, out);                             \
    }                                                                                                             \
    extern "C" void cbn_train_forward_##SUF(const S* x, int64_t n, int64_t c, int64_t l, int cl, int64_t centre, \
                                           const S* prior, const S* mean, const S* var, const S* weight,          \
                                           const S* bias, int64_t m, const int64_t* groups, S eps, S temperature, \
                                           S min_count, int use_batch, int mn, S* R, S* y, S* out, int nt) {      \
        with_components(m, [&](auto mm) {                                                                         \
            train_forward<decltype(mm)::value, S>(x, n, c, l, cl, centre, prior, mean, var, weight, bias, m,      \
                                                  groups, eps, temperature, min_count, use_batch, mn, R, y, out,  \
                                                  nt);                                                            \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_train_backward_##SUF(const S* x, const S* g, int64_t n, int64_t c, int64_t l, int cl,     \
                                            const S* R, int64_t lr, int64_t m, const S* weight, const S* buf,     \
                                            int mn, S* dx, S* out, int nt) {                                      \
        with_components(m, [&](auto mm) {                                                                         \
            train_backward<decltype(mm)::value, S>(x, g, n, c, l, cl, R, lr, m, weight, buf, mn, dx, out, nt);    \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_eval_running_##SUF(const S* x, int64_t n, int64_t c, int64_t l, int cl, const S* prior,   \
                                          const S* mean, const S* var, const S* weight, const S* bias, int64_t m, \
                                          S eps, S temperature, int mn, S* out, int nt) {                         \
        with_components(m, [&](auto mm) {                                                                         \
            eval_running<decltype(mm)::value, S>(x, n, c, l, cl, prior, mean, var, weight, bias, m, eps,          \
                                                 temperature, mn, out, nt);                                       \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void cbn_running_update_##SUF(S* prior, S* mean, S* var, S* last_counts, int64_t* tracked,         \
                                            int64_t* skipped, const S* counts, const S* n_eff, const S* bmean,    \
                                            const S* bvar, const S* finite, int64_t m, int64_t c, S momentum,     \
                                            S min_count, int update_prior) {                                      \
        running_update<S>(prior, mean, var, last_counts, tracked, skipped, counts, n_eff, bmean, bvar, finite, m, \
                          c, momentum, min_count, update_prior);                                                  \
    }

LT_ZOO_EXPORT(float, f32)
LT_ZOO_EXPORT(double, f64)
