// The WARP merge of one flat tensor, for merge.kernel=native (built and loaded by warp_dist/merging/native.py).
//
// The math of merging._fused_merge (the torch.compile graph): rows d_i = p_i - x (i < M) and x - f (the SFT row,
// when given) in fp32; the Gram matrix of the rows from fp32 products (fused into the sums where the CPU has
// FMA) summed in fp32 over blocks of BLOCK elements (one accumulator per pair and vector lane), each block's sums
// added in fp64; then, with the merge method's coefficients c (computed from that Gram matrix in Python:
// merging.methods), out = x + sum_i c_i d_i and nxt = lerp(x, out, eta) in fp32
// (torch.lerp's two-sided formula, no fused multiply-add), stored in x's dtype (bf16: round to nearest even, NaN
// stays NaN). The outputs are the compiled graph's bits whenever both round the coefficients to the same fp32 values
// (their Gram sums add the same products in a different order); a NaN's own bits may differ (torch's conversions
// write 0x7FC0 or 0xFFFF for any NaN, this kernel the NaN the arithmetic carried).
//
// Two calls per tensor, one OpenMP parallel region each (warp_gram, warp_apply): each thread sweeps its own range of
// whole blocks, the same ranges in both; the Gram partials are summed in thread order. No allocation per element:
// torch.compile's calls cost ~100-150 us per tensor, most of a small tensor's merge.
//
// Elements go STEP = 2V at a time, as two vectors of V floats, V = 16 with AVX-512 and 8 below it: one register each
// (GCC/Clang vector extensions; wider vectors than the registers spilled the Gram accumulators on AVX2 and made its
// merge 3-4x slower): fp32, elements i..i+V-1 and i+V..i+2V-1; bf16, one 4V-byte load whose 32-bit lanes hold two
// elements each, split by a shift and a mask into the even and the odd elements (no shuffles), and stored back by
// the same pairing (the two halves rounded and put back together by one 16-bit blend where the CPU has one).
// The Gram products of a block go one group of rows at a time, each group as many pairs as fit in the registers
// with the rows they read (AVX2, 16 registers: the 6 pairs of M = 2 with the SFT row in one group, the 15 of M = 4
// with it in two), one half-step's rows live at a time: with more, the compiler spilled accumulators to the stack,
// each then a load-FMA-store chain per step. Each pair still adds the same products in the same order.
// Outputs of tensors of at least STREAM_MIN_BYTES are written with non-temporal stores where the CPU has AVX (or
// AVX-512), the outputs are 64-byte aligned and one step writes whole 64-byte lines (on AVX2 fp32 only: bf16's
// half-line stores made it slower), so no output line is read before it is written.
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the bf16 loads and stores assume little-endian lanes");

namespace {
constexpr int BLOCK = 256;
constexpr int MAXK = 9;  // rows: up to 8 policies and the SFT row
// V floats per vector: one register (AVX-512: 16; AVX/AVX2: 8; below AVX, 8 as two SSE registers)
#if defined(__AVX512F__)
constexpr int V = 16;
#else
constexpr int V = 8;
#endif
constexpr int STEP = 2 * V;
constexpr int64_t STREAM_MIN_BYTES = int64_t(4) << 20;
template <int BF>
constexpr size_t ELEM = BF ? 2 : 4;  // bytes per stored element
// non-temporal stores: with AVX or AVX-512, where one step writes whole 64-byte lines (not bf16 on AVX2)
template <int BF>
#if defined(__AVX512F__) || defined(__AVX__)
constexpr bool CAN_STREAM = STEP * ELEM<BF> % 64 == 0;
#else
constexpr bool CAN_STREAM = false;
#endif

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef float vh __attribute__((vector_size(V * 2)));   // half a vector
typedef double vd __attribute__((vector_size(V * 4)));  // V / 2 doubles

struct Two {  // the STEP elements of one step
  vf a, b;
};

template <typename To, typename From>
inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// One half of the step at element i: h = 0 its a, h = 1 its b (Two's halves). fp32: elements i + hV .. i + hV + V - 1;
// bf16, little-endian: element i + 2l sits in the low half of lane l, i + 2l + 1 in its high half, so a holds the
// even elements, b the odd ones
template <int BF>
inline vf load_half(const void* p, int64_t i, int h) {
  vf r;
  if (!BF) {
    std::memcpy(&r, static_cast<const float*>(p) + i + h * V, sizeof(vf));
  } else {
    vu u;
    std::memcpy(&u, static_cast<const uint16_t*>(p) + i, sizeof u);
    r = h ? bits<vf>(vu(u & 0xFFFF0000u)) : bits<vf>(vu(u << 16));
  }
  return r;
}

// v rounded to bf16 (nearest even) in the high half of each lane. A NaN lane stays NaN without a test: it is a bf16
// input's NaN carried through the arithmetic (low half zero, so adding 0x7FFF or 0x8000 cannot carry into the high
// half) or the CPU's default NaN of inf - inf / 0 * inf (0xFFC00000, the same)
inline vu round_bf16(vf v) {
  const vu u = bits<vu>(v);
  return u + 0x7FFFu + ((u >> 16) & 1u);
}

// a's and b's lanes rounded to bf16 and paired back into 32-bit lanes: a's in the low halves, b's in the high ones
// (one 16-bit blend where the CPU has one, else a shift, a mask and an or)
inline vu pack_bf16(vf a, vf b) {
  const vu lo = round_bf16(a) >> 16, hi = round_bf16(b);
#if defined(__AVX512BW__)
  return bits<vu>(_mm512_mask_blend_epi16(0xAAAAAAAAu, bits<__m512i>(lo), bits<__m512i>(hi)));
#elif defined(__AVX2__) && !defined(__AVX512F__)
  return bits<vu>(_mm256_blend_epi16(bits<__m256i>(lo), bits<__m256i>(hi), 0xAA));
#else
  return lo | (hi & 0xFFFF0000u);
#endif
}

template <int BF, int NT>
inline void store(void* p, int64_t i, const Two& t) {
  if (!BF) {
    float* q = static_cast<float*>(p) + i;
#if defined(__AVX512F__)
    if (NT) {
      _mm512_stream_ps(q, t.a);
      _mm512_stream_ps(q + V, t.b);
      return;
    }
#elif defined(__AVX__)
    if (NT) {
      _mm256_stream_ps(q, t.a);
      _mm256_stream_ps(q + V, t.b);
      return;
    }
#endif
    std::memcpy(q, &t.a, sizeof(vf));
    std::memcpy(q + V, &t.b, sizeof(vf));
    return;
  }
  const vu w = pack_bf16(t.a, t.b);
  uint16_t* q = static_cast<uint16_t*>(p) + i;
#if defined(__AVX512F__)
  if (NT) return _mm512_stream_si512(reinterpret_cast<__m512i*>(q), bits<__m512i>(w));
#endif
  std::memcpy(q, &w, sizeof w);
}

// acc + a * b: one rounding where the CPU has FMA (the Gram sums only; the outputs keep separate multiplies and
// adds, as the compiled graph)
inline vf fma(vf a, vf b, vf acc) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, acc);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, acc);
#else
  return acc + a * b;
#endif
}

// the V lanes of v summed pairwise into V / 2 fp64 lanes
inline vd widen_sum(vf v) {
  vh lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return __builtin_convertvector(lo, vd) + __builtin_convertvector(hi, vd);
}


// The input streams of a short tail, as zero-padded copies
struct Streams {
  const void* x;
  const void* ps[MAXK];
  const void* f;
};

// The tail of [full, b) (fewer than STEP elements) copied into zero-padded buffers
template <int BF, int R>
Streams padded(const void* x, const void* const* ps, const void* f, int64_t full, int64_t b,
               unsigned char (*buf)[STEP * 4]) {
  const size_t len = static_cast<size_t>(b - full) * ELEM<BF>, off = static_cast<size_t>(full) * ELEM<BF>;
  std::memset(buf, 0, sizeof(unsigned char[STEP * 4]) * (R + 2));
  Streams s{buf[0], {}, f ? buf[R + 1] : nullptr};
  std::memcpy(buf[0], static_cast<const char*>(x) + off, len);
  for (int q = 0; q < R; ++q) {
    std::memcpy(buf[q + 1], static_cast<const char*>(ps[q]) + off, len);
    s.ps[q] = buf[q + 1];
  }
  if (f) std::memcpy(buf[R + 1], static_cast<const char*>(f) + off, len);
  return s;
}

// Registers for one group's Gram accumulators and the rows it reads (the other two: x and the bf16 mask). More
// than this spilled accumulators to the stack, and a spilled accumulator is a chain of load, FMA and store per step.
#if defined(__AVX512F__)
constexpr int GRAM_REGS = 32 - 2;
#elif defined(__AVX__)
constexpr int GRAM_REGS = 16 - 2;
#else
constexpr int GRAM_REGS = 16 / 2 - 2;  // SSE: a vector is two of its 16 registers
#endif

// The number of pairs (u, v), v >= u, with u in [u0, u1)
constexpr int pairs_of(int K, int u0, int u1) { return u1 <= u0 ? 0 : (K - u0) + pairs_of(K, u0 + 1, u1); }

// The end of the group of rows u0.. : as many rows as fit their accumulators and the rows they read in GRAM_REGS
constexpr int group_end(int K, int u0) {
  int u1 = u0 + 1;
  while (u1 < K && pairs_of(K, u0, u1 + 1) + (K - u0) <= GRAM_REGS) ++u1;
  return u1;
}

// One step's products of the pairs (u, v) with u in [U0, U1), v >= u, each added to its accumulator (acc holds the
// group's pairs in the upper triangle's row-major order); only rows U0.. are formed
template <int BF, int R, int F, int U0, int U1>
inline void gram_step(const void* x, const void* const* ps, const void* f, int64_t i, vf* acc) {
  constexpr int K = R + F, N = K - U0;
  // the a half's rows and products, then the b half's (loaded again, from L1): only one half's rows live at once
  for (int h = 0; h < 2; ++h) {
    vf r[N];
    const vf base = load_half<BF>(x, i, h);
    for (int q = U0; q < R; ++q) r[q - U0] = load_half<BF>(ps[q], i, h) - base;
    if (F) r[R - U0] = base - load_half<BF>(f, i, h);
    for (int u = 0, q = 0; u < U1 - U0; ++u)
      for (int v = u; v < N; ++v, ++q) acc[q] = fma(r[u], r[v], acc[q]);
  }
}

// The Gram sums of one block, one group of rows after another (the block's inputs stay in L1 between groups): each
// pair's products in the same order as in one loop, its block sum added to its fp64 total
template <int BF, int R, int F, int U0>
inline void gram_block(int64_t s, int64_t full, const void* x, const void* const* ps, const void* f,
                       const Streams* tail, vd* total) {
  constexpr int K = R + F, U1 = group_end(K, U0), G = pairs_of(K, U0, U1), Q = pairs_of(K, 0, U0);
  vf acc[G];
  for (int q = 0; q < G; ++q) acc[q] = vf{};
  for (int64_t i = s; i < full; i += STEP) gram_step<BF, R, F, U0, U1>(x, ps, f, i, acc);
  if (tail) gram_step<BF, R, F, U0, U1>(tail->x, tail->ps, tail->f, 0, acc);  // zero rows add nothing
  for (int q = 0; q < G; ++q) total[Q + q] += widen_sum(acc[q]);
  if constexpr (U1 < K) gram_block<BF, R, F, U1>(s, full, x, ps, f, tail, total);
}

// The Gram partials of elements [a, b) (a a multiple of BLOCK) into sums (upper triangle, row after row)
template <int BF, int R, int F>
void gram_sweep(int64_t a, int64_t b, const void* x, const void* const* ps, const void* f, double* sums) {
  constexpr int K = R + F, P = K * (K + 1) / 2;
  vd total[P];
  for (int q = 0; q < P; ++q) total[q] = vd{};
  for (int64_t s = a; s < b; s += BLOCK) {
    const int64_t e = std::min<int64_t>(b, s + BLOCK), full = s + (e - s) / STEP * STEP;
    if (full < e) {
      alignas(64) unsigned char buf[R + 2][STEP * 4];
      const Streams t = padded<BF, R>(x, ps, f, full, e, buf);
      gram_block<BF, R, F, 0>(s, full, x, ps, f, &t, total);
    } else {  // a separate call with a null tail: the compiler drops the tail's step from the common path
      gram_block<BF, R, F, 0>(s, full, x, ps, f, nullptr, total);
    }
  }
  for (int q = 0; q < P; ++q) {
    double t = 0;
    for (int l = 0; l < V / 2; ++l) t += total[q][l];
    sums[q] = t;
  }
}

// theta_slerp and the next theta_init of one half (h) of a step: each policy's half loaded (again) as its term is
// added, so only the sum and one input are live (not every policy's two halves: what spilled on AVX2 for M = 4)
template <int BF, int R, int LOW>
inline void out_half(const void* x, const void* const* ps, const float* cf, float eta, int64_t i, int h, vf& o,
                     vf& nx) {
  const vf base = load_half<BF>(x, i, h);
  vf acc = cf[0] * (load_half<BF>(ps[0], i, h) - base);
  for (int q = 1; q < R; ++q) acc += cf[q] * (load_half<BF>(ps[q], i, h) - base);
  o = base + acc;
  const vf diff = o - base;
  nx = LOW ? base + eta * diff : o - diff * (1.0f - eta);
}

template <int BF, int R, int LOW, int NT>
inline void out_step(const void* x, const void* const* ps, const float* cf, float eta, int64_t i, void* out,
                     void* nxt) {
  Two o, nx;
  out_half<BF, R, LOW>(x, ps, cf, eta, i, 0, o.a, nx.a);
  out_half<BF, R, LOW>(x, ps, cf, eta, i, 1, o.b, nx.b);
  store<BF, NT>(out, i, o);
  store<BF, NT>(nxt, i, nx);
}

// theta_slerp and the next theta_init for elements [a, b)
template <int BF, int R, int LOW, int NT>
void out_sweep(int64_t a, int64_t b, const void* x, const void* const* ps_in, const float* cf_in, float eta,
               void* out, void* nxt) {
  // local copies, which the stores cannot alias: no reload of the pointers and coefficients per step
  const void* ps[R];
  float cf[R];
  for (int q = 0; q < R; ++q) ps[q] = ps_in[q], cf[q] = cf_in[q];
  const int64_t full = a + (b - a) / STEP * STEP;
  for (int64_t i = a; i < full; i += STEP) out_step<BF, R, LOW, NT>(x, ps, cf, eta, i, out, nxt);
#if defined(__AVX512F__) || defined(__AVX__)
  if (NT) _mm_sfence();
#endif
  if (full < b) {
    alignas(64) unsigned char buf[R + 2][STEP * 4], res[2][STEP * 4];
    const Streams t = padded<BF, R>(x, ps, nullptr, full, b, buf);
    out_step<BF, R, LOW, 0>(t.x, t.ps, cf, eta, 0, res[0], res[1]);
    const size_t len = static_cast<size_t>(b - full) * ELEM<BF>, off = static_cast<size_t>(full) * ELEM<BF>;
    std::memcpy(static_cast<char*>(out) + off, res[0], len);
    std::memcpy(static_cast<char*>(nxt) + off, res[1], len);
  }
}

// The thread count and each thread's range of whole blocks: the same in both sweeps of a tensor (the Gram partials
// are summed in thread order, so the same T gives the same sums)
struct Ranges {
  int T;
  int64_t per;
  int64_t begin(int t, int64_t n) const { return std::min<int64_t>(n, t * per * BLOCK); }
  int64_t end(int t, int64_t n) const { return std::min<int64_t>(n, (t + 1) * per * BLOCK); }
};

inline Ranges ranges(int64_t n, int T) { return {T, ((n + BLOCK - 1) / BLOCK + T - 1) / T}; }

// Sweep 1: the Gram matrix of the rows, written to gram ([R + 1, R + 1] fp64, row and column R untouched without f)
template <int BF, int R, int F>
void gram(int64_t n, const void* x, const void* const* ps, const void* f, double* gram) {
  constexpr int K = R + F, P = K * (K + 1) / 2;
  const int nt = std::max(1, omp_get_max_threads());
  std::vector<double> partial(static_cast<size_t>(nt) * P, 0.0);
  int ran = 1;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    if (tid == 0) ran = T;
    const Ranges r = ranges(n, T);
    gram_sweep<BF, R, F>(r.begin(tid, n), r.end(tid, n), x, ps, f, partial.data() + static_cast<size_t>(tid) * P);
  }
  for (int i = 0, q = 0; i < K; ++i)
    for (int j = i; j < K; ++j, ++q) {
      double total = 0;
      for (int t = 0; t < ran; ++t) total += partial[static_cast<size_t>(t) * P + q];
      gram[i * (R + 1) + j] = gram[j * (R + 1) + i] = total;
    }
}

// Sweep 2: out = x + sum_i c_i (p_i - x) and nxt = lerp(x, out, eta), with the merge method's coefficients c (fp32)
template <int BF, int R>
void apply(int64_t n, const void* x, const void* const* ps, const float* cf, float eta, void* out, void* nxt) {
  const int nt = std::max(1, omp_get_max_threads());
  const bool stream = CAN_STREAM<BF> && n * int64_t(ELEM<BF>) >= STREAM_MIN_BYTES &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && reinterpret_cast<uintptr_t>(nxt) % 64 == 0;
  const bool low = std::fabs(eta) < 0.5f;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const Ranges r = ranges(n, omp_get_num_threads());
    const int64_t a = r.begin(tid, n), b = r.end(tid, n);
    if (stream && low)
      out_sweep<BF, R, 1, 1>(a, b, x, ps, cf, eta, out, nxt);
    else if (stream)
      out_sweep<BF, R, 0, 1>(a, b, x, ps, cf, eta, out, nxt);
    else if (low)
      out_sweep<BF, R, 1, 0>(a, b, x, ps, cf, eta, out, nxt);
    else
      out_sweep<BF, R, 0, 0>(a, b, x, ps, cf, eta, out, nxt);
  }
}

// gram<BF, M, sft given> / apply<BF, M> for the runtime M (1..MAXK - 1)
template <int BF, int R = 1>
void dispatch_gram(int64_t n, int M, const void* x, const void* const* ps, const void* f, double* g) {
  if (M == R) return f ? gram<BF, R, 1>(n, x, ps, f, g) : gram<BF, R, 0>(n, x, ps, f, g);
  if constexpr (R + 1 < MAXK) dispatch_gram<BF, R + 1>(n, M, x, ps, f, g);
}

template <int BF, int R = 1>
void dispatch_apply(int64_t n, int M, const void* x, const void* const* ps, const float* cf, float eta, void* out,
                    void* nxt) {
  if (M == R) return apply<BF, R>(n, x, ps, cf, eta, out, nxt);
  if constexpr (R + 1 < MAXK) dispatch_apply<BF, R + 1>(n, M, x, ps, cf, eta, out, nxt);
}
}  // namespace

// 0 on success; 1: M outside 1..MAXK-1
extern "C" int warp_gram(int bf16, int64_t n, int M, const void* x, const void* const* ps, const void* f,
                         double* gram) {
  if (M < 1 || M + 1 > MAXK) return 1;
  if (bf16)
    dispatch_gram<1>(n, M, x, ps, f, gram);
  else
    dispatch_gram<0>(n, M, x, ps, f, gram);
  return 0;
}

extern "C" int warp_apply(int bf16, int64_t n, int M, const void* x, const void* const* ps, const float* cf,
                          float eta, void* out, void* nxt) {
  if (M < 1 || M + 1 > MAXK) return 1;
  if (bf16)
    dispatch_apply<1>(n, M, x, ps, cf, eta, out, nxt);
  else
    dispatch_apply<0>(n, M, x, ps, cf, eta, out, nxt);
  return 0;
}

extern "C" int warp_merge_max_policies() { return MAXK - 1; }
