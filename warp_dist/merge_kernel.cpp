// The WARP merge of one flat tensor, for merge.kernel=native (built and loaded by warp_dist/native.py).
//
// Same math as merging._fused_merge (the torch.compile graph) and the same output bits: rows d_i = p_i - x
// (i < M) and x - f (the SFT row, when given) in fp32; the Gram matrix of the rows from fp32 products summed in
// fp32 over blocks of BLOCK elements, the block sums in fp64; SLERP coefficients from the Gram matrix (the fold of
// merging.slerp_coefficients, fp64); out = x + sum_i c_i d_i and nxt = lerp(x, out, eta) in fp32 (torch.lerp's
// two-sided formula), stored in x's dtype (bf16: round to nearest even, NaN stays NaN).
//
// One OpenMP parallel region per call: each thread sweeps its own range of whole blocks twice (Gram partials, then
// the outputs), with one barrier between the sweeps where every thread sums the partials in the same order and
// computes the same coefficients. No allocation per element, no Python per call: what made torch.compile's call
// cost ~100-150 us per tensor, most of a small tensor's merge.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {
constexpr int BLOCK = 256;
constexpr int MAXK = 17;  // rows: up to 16 policies and the SFT row

template <int BF>
inline float load(const void* p, int64_t i) {
  if (!BF) return static_cast<const float*>(p)[i];
  uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int BF>
inline void store(void* p, int64_t i, float v) {
  if (!BF) {
    static_cast<float*>(p)[i] = v;
    return;
  }
  uint32_t u;
  std::memcpy(&u, &v, 4);
  static_cast<uint16_t*>(p)[i] = std::isnan(v) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// merging.slerp_coefficients on the m x m top-left of g (row stride ld)
void coefficients(const double* g, int m, int ld, double lam, double eps, double* acc) {
  for (int i = 0; i < m; ++i) acc[i] = i == 0 ? 1.0 : 0.0;
  for (int j = 1; j < m; ++j) {
    const double t = m == 2 ? lam : 1.0 / (j + 1);
    double aa = 0, ab = 0;
    for (int i = 0; i < m; ++i) {
      for (int k = 0; k < m; ++k) aa += acc[i] * acc[k] * g[i * ld + k];
      ab += acc[i] * g[i * ld + j];
    }
    const double na = std::sqrt(std::max(aa, 0.0)), nb = std::sqrt(std::max(g[j * ld + j], 0.0));
    double w1 = 1 - t, w2 = t;
    if (na >= 1e-12 && nb >= 1e-12) {
      const double omega = std::acos(std::max(-1.0, std::min(1.0, ab / (na * nb))));
      const double s = std::sin(omega);
      if (s >= eps) {
        w1 = std::sin((1 - t) * omega) / s;
        w2 = std::sin(t * omega) / s;
      }
    }
    for (int i = 0; i < m; ++i) acc[i] *= w1;
    acc[j] += w2;
  }
}

// R = M when M <= MAXR (every policy's stream read in the same inner loop: the loads of all M + 1 or M + 2 streams in
// flight together, which a loop per policy over a block did not keep: 16 % slower at M = 4 on tensors from DRAM);
// R = 0 for a larger M (a loop per policy)
constexpr int MAXR = 8;

template <int BF, int R>
void merge(int64_t n, int M, const void* x, const void* const* ps, const void* f, double lam, float eta, double eps,
           void* out, void* nxt, double* gram) {
  const int k = M + (f ? 1 : 0);
  const int npairs = k * (k + 1) / 2;
  const int nt = std::max(1, omp_get_max_threads());
  std::vector<double> partial(static_cast<size_t>(nt) * npairs, 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t blocks = (n + BLOCK - 1) / BLOCK, per = (blocks + T - 1) / T;
    const int64_t a = std::min<int64_t>(n, tid * per * BLOCK), b = std::min<int64_t>(n, (tid + 1) * per * BLOCK);
    double sums[MAXK * (MAXK + 1) / 2] = {0};
    float rows[MAXK][BLOCK];
    for (int64_t s = a; s < b; s += BLOCK) {  // sweep 1: Gram partials of this thread's blocks
      const int w = static_cast<int>(std::min<int64_t>(BLOCK, b - s));
      if (R > 0) {
#pragma omp simd
        for (int e = 0; e < w; ++e) {
          const float base = load<BF>(x, s + e);
          for (int r = 0; r < R; ++r) rows[r][e] = load<BF>(ps[r], s + e) - base;
          if (f) rows[R][e] = base - load<BF>(f, s + e);
        }
      } else {
        for (int r = 0; r < M; ++r) {
          const void* p = ps[r];
#pragma omp simd
          for (int e = 0; e < w; ++e) rows[r][e] = load<BF>(p, s + e) - load<BF>(x, s + e);
        }
        if (f) {
#pragma omp simd
          for (int e = 0; e < w; ++e) rows[M][e] = load<BF>(x, s + e) - load<BF>(f, s + e);
        }
      }
      for (int i = 0, q = 0; i < k; ++i)
        for (int j = i; j < k; ++j, ++q) {
          float acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int e = 0; e < w; ++e) acc += rows[i][e] * rows[j][e];
          sums[q] += acc;
        }
    }
    for (int q = 0; q < npairs; ++q) partial[static_cast<size_t>(tid) * npairs + q] = sums[q];
#pragma omp barrier
    double g[MAXK * MAXK], c[MAXK];
    for (int i = 0, q = 0; i < k; ++i)
      for (int j = i; j < k; ++j, ++q) {
        double total = 0;
        for (int t = 0; t < T; ++t) total += partial[static_cast<size_t>(t) * npairs + q];
        g[i * k + j] = g[j * k + i] = total;
      }
    coefficients(g, M, k, lam, eps, c);
    if (tid == 0)
      for (int i = 0; i < k; ++i)
        for (int j = 0; j < k; ++j) gram[i * (M + 1) + j] = g[i * k + j];
    float cf[MAXK];
    for (int i = 0; i < M; ++i) cf[i] = static_cast<float>(c[i]);
    const bool low = std::fabs(eta) < 0.5f;
    for (int64_t s = a; s < b; s += BLOCK) {  // sweep 2: theta_slerp and the next theta_init
      const int w = static_cast<int>(std::min<int64_t>(BLOCK, b - s));
      float d[BLOCK];
      if (R > 0) {
#pragma omp simd
        for (int e = 0; e < w; ++e) {
          const float base = load<BF>(x, s + e);
          float acc = cf[0] * (load<BF>(ps[0], s + e) - base);
          for (int r = 1; r < R; ++r) acc += cf[r] * (load<BF>(ps[r], s + e) - base);
          d[e] = acc;
        }
      } else {
#pragma omp simd
        for (int e = 0; e < w; ++e) d[e] = cf[0] * (load<BF>(ps[0], s + e) - load<BF>(x, s + e));
        for (int r = 1; r < M; ++r) {
          const void* p = ps[r];
          const float cr = cf[r];
#pragma omp simd
          for (int e = 0; e < w; ++e) d[e] += cr * (load<BF>(p, s + e) - load<BF>(x, s + e));
        }
      }
#pragma omp simd
      for (int e = 0; e < w; ++e) {
        const float base = load<BF>(x, s + e), o = base + d[e], diff = o - base;
        store<BF>(out, s + e, o);
        store<BF>(nxt, s + e, low ? base + eta * diff : o - diff * (1.0f - eta));
      }
    }
  }
}

template <int BF>
void dispatch(int64_t n, int M, const void* x, const void* const* ps, const void* f, double lam, float eta,
              double eps, void* out, void* nxt, double* gram) {
  switch (M) {
    case 1: return merge<BF, 1>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 2: return merge<BF, 2>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 3: return merge<BF, 3>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 4: return merge<BF, 4>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 5: return merge<BF, 5>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 6: return merge<BF, 6>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 7: return merge<BF, 7>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    case 8: return merge<BF, 8>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
    default: return merge<BF, 0>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
  }
}
}  // namespace

// 0 on success; 1: M outside 1..MAXK-1
extern "C" int warp_merge(int bf16, int64_t n, int M, const void* x, const void* const* ps, const void* f, double lam,
                          float eta, double eps, void* out, void* nxt, double* gram) {
  if (M < 1 || M + 1 > MAXK) return 1;
  if (bf16)
    dispatch<1>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
  else
    dispatch<0>(n, M, x, ps, f, lam, eta, eps, out, nxt, gram);
  return 0;
}

extern "C" int warp_merge_max_policies() { return MAXK - 1; }
