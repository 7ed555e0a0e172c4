// Batched IPOT kernel for the CPU. The update order, init and arithmetic follow UNITER's model/ot.py (see
// uniter_fast/ot/reference.py); the plan is kept in the [text, region] layout of the cost.
#include "ipot.h"

#include "ipot_solver.h"

#include <omp.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace uniter_fast {

Buffer aligned_zeros(int64_t count) {
  const size_t bytes = static_cast<size_t>(round_up_lanes(std::max<int64_t>(count, 1))) * sizeof(float);
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Buffer(p);
}

IpotWorkspace::IpotWorkspace(int64_t m, int64_t n)
    : ld(round_up_lanes(n)),
      kernel(aligned_zeros(m * ld)),
      q(aligned_zeros(m * ld)),
      sigma(aligned_zeros(m)),
      delta(aligned_zeros(ld)),
      acc(aligned_zeros(ld)) {}

// Plan entries far from the optimum decay towards zero through subnormals, which are ~100x slower on x86: flush them
// to zero (an absolute change below 1.2e-38).
FlushDenormals::FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ | DAZ
FlushDenormals::~FlushDenormals() { _mm_setcsr(saved_); }

namespace {

// exp(x) for fp32 without libm calls, so the loop vectorises: Cody-Waite range reduction and the Cephes expf
// polynomial (max error ~2 ulp); x is clamped to [-87, 88] so the result stays a normal float.
inline float exp_fp32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fi = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - fi * 0.693145751953125f;
  r = r - fi * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// What a sweep does to a row after computing its sigma_i.
enum class Mode {
  kAccumulate,  // inner sweep (k > 1): only accumulate sum_i Q_ij sigma_i for the next delta
  kNextStep,    // last sweep of an outer step: T = delta * Q * sigma, store Q = A * T, accumulate
  kFinish,      // last sweep of the last step: store T = delta * Q * sigma
};

// One row: sigma_i = 1 / (mv * sum_j delta_j Q_ij), then the row update of `mode`.
inline void sweep_row(float* q, const float* a, int64_t nv, const float* delta, float* acc, float mvf, Mode mode,
                      float* sigma) {
  float r = 0.0f;
#pragma omp simd reduction(+ : r)
  for (int64_t j = 0; j < nv; ++j) r += delta[j] * q[j];
  const float s = 1.0f / (mvf * r);
  *sigma = s;
  if (mode == Mode::kFinish) {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) q[j] = delta[j] * q[j] * s;
  } else if (mode == Mode::kNextStep) {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) {
      q[j] = a[j] * (delta[j] * q[j] * s);
      acc[j] += q[j] * s;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) acc[j] += q[j] * s;
  }
}

// Four rows at once (row stride `ld`, `nv` columns): four independent reduction chains hide the latency of the
// horizontal sums and divisions, and acc/delta are loaded once per four rows. Same arithmetic as sweep_row.
inline void sweep_rows4(float* q, const float* a, int64_t ld, int64_t nv, const float* delta, float* acc, float mvf,
                        Mode mode, float* sigma) {
  float* q0 = q;
  float* q1 = q + ld;
  float* q2 = q + 2 * ld;
  float* q3 = q + 3 * ld;
  const float* a0 = a;
  const float* a1 = a + ld;
  const float* a2 = a + 2 * ld;
  const float* a3 = a + 3 * ld;
  float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f, r3 = 0.0f;
#pragma omp simd reduction(+ : r0, r1, r2, r3)
  for (int64_t j = 0; j < nv; ++j) {
    r0 += delta[j] * q0[j];
    r1 += delta[j] * q1[j];
    r2 += delta[j] * q2[j];
    r3 += delta[j] * q3[j];
  }
  const float s0 = 1.0f / (mvf * r0), s1 = 1.0f / (mvf * r1), s2 = 1.0f / (mvf * r2), s3 = 1.0f / (mvf * r3);
  sigma[0] = s0;
  sigma[1] = s1;
  sigma[2] = s2;
  sigma[3] = s3;
  if (mode == Mode::kFinish) {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) {
      const float d = delta[j];
      q0[j] = d * q0[j] * s0;
      q1[j] = d * q1[j] * s1;
      q2[j] = d * q2[j] * s2;
      q3[j] = d * q3[j] * s3;
    }
  } else if (mode == Mode::kNextStep) {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) {
      const float d = delta[j];
      q0[j] = a0[j] * (d * q0[j] * s0);
      q1[j] = a1[j] * (d * q1[j] * s1);
      q2[j] = a2[j] * (d * q2[j] * s2);
      q3[j] = a3[j] * (d * q3[j] * s3);
      acc[j] = (((acc[j] + q0[j] * s0) + q1[j] * s1) + q2[j] * s2) + q3[j] * s3;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) acc[j] = (((acc[j] + q0[j] * s0) + q1[j] * s1) + q2[j] * s2) + q3[j] * s3;
  }
}

}  // namespace

// Q lives in the workspace between sweeps. Each sweep is one pass over the rows: the row sum gives sigma_i, then the
// row is updated (T = delta * Q * sigma, and Q = A * T for the next outer step) and accumulated into the column sums
// (sum_i Q_ij sigma_i) of the next sweep while it is in L1.
void ipot_solve(const float* cost, int64_t cost_ld, int64_t mv, int64_t nv, float beta, int iteration, int k,
                IpotWorkspace& ws) {
  const int64_t ld = ws.ld;
  const int64_t width = round_up_lanes(nv);
  float* a = ws.kernel.get();
  float* q = ws.q.get();
  float* sigma = ws.sigma.get();
  float* delta = ws.delta.get();
  float* acc = ws.acc.get();
  const float mvf = static_cast<float>(mv);
  const float nvf = static_cast<float>(nv);
  const float sigma0 = 1.0f / mvf;

  // Outer step 1 starts from T = 1, so Q = A; sigma = 1 / mv. Columns nv..width of a and q are zero.
  std::fill(acc, acc + ld, 0.0f);
  for (int64_t i = 0; i < mv; ++i) {
    const float* c = cost + i * cost_ld;
    float* ai = a + i * ld;
    float* qi = q + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) {
      ai[j] = exp_fp32(-c[j] / beta);
      qi[j] = ai[j];
      acc[j] += qi[j] * sigma0;
    }
    std::fill(ai + nv, ai + width, 0.0f);
    std::fill(qi + nv, qi + width, 0.0f);
    sigma[i] = sigma0;
  }

  for (int it = 0; it < iteration; ++it) {
    for (int s = 0; s < k; ++s) {
      const bool update_plan = s == k - 1;
      const bool last = update_plan && it == iteration - 1;
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) {
        delta[j] = 1.0f / (nvf * acc[j]);
        acc[j] = 0.0f;
      }
      std::fill(delta + nv, delta + width, 0.0f);
      const Mode mode = !update_plan ? Mode::kAccumulate : (last ? Mode::kFinish : Mode::kNextStep);
      int64_t i = 0;
      for (; i + 4 <= mv; i += 4) sweep_rows4(q + i * ld, a + i * ld, ld, width, delta, acc, mvf, mode, sigma + i);
      for (; i < mv; ++i) sweep_row(q + i * ld, a + i * ld, width, delta, acc, mvf, mode, sigma + i);
    }
  }
}

namespace {

// One pair: cost and plan have row stride `n`; the valid block is mv x nv. Returns sum(cost * plan) and writes the
// whole [m, n] plan (zero outside the valid block).
float ipot_pair(const float* cost, int64_t mv, int64_t nv, int64_t m, int64_t n, float beta, int iteration, int k,
                float* plan, IpotWorkspace& ws) {
  ipot_solve(cost, n, mv, nv, beta, iteration, k, ws);
  const float* q = ws.q.get();
  double total = 0.0;
  for (int64_t i = 0; i < mv; ++i) {
    const float* c = cost + i * n;
    const float* ti = q + i * ws.ld;
    float* out = plan + i * n;
    float r = 0.0f;
#pragma omp simd reduction(+ : r)
    for (int64_t j = 0; j < nv; ++j) {
      out[j] = ti[j];
      r += c[j] * ti[j];
    }
    total += r;
    std::fill(out + nv, out + n, 0.0f);
  }
  std::fill(plan + mv * n, plan + m * n, 0.0f);
  return static_cast<float>(total);
}

}  // namespace

void ipot_forward(const float* cost, const int64_t* txt_lens, const int64_t* img_lens, int64_t batch, int64_t m,
                  int64_t n, float beta, int iteration, int k, float* plan, float* dist, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel num_threads(num_threads)
  {
    const FlushDenormals flush;
    IpotWorkspace ws(m, n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t off = b * m * n;
      dist[b] = ipot_pair(cost + off, txt_lens[b], img_lens[b], m, n, beta, iteration, k, plan + off, ws);
    }
  }
}

}  // namespace uniter_fast
