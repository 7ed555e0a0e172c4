// Fused WRA distance on the CPU (see wra.h for the maths). One pair at a time per thread, everything but the
// embeddings in a per-thread workspace:
//   forward:  row norms (the first, sequential read of the pair's embeddings), the dot products X Y^T in register
//             blocks of 3 x 4 rows (the embeddings now come from L2), the cost, IPOT (ipot_solve), then the distance,
//             the plan and the per-row stats in one pass over the plan.
//   backward: G = -g diag(a) T diag(a'); dX = G Y + g c X and dY = G^T X + g c' Y, column chunk by column chunk so
//             that each chunk of X and Y is read once and serves both products, 4 rows x 24 columns per block.
// All arithmetic is fp32 (bf16/fp16 are widened on load and rounded to nearest even on store).
#include "wra.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ipot_solver.h"
#include "simd.h"

namespace uniter_fast {
namespace {

using simd::f32x8;
using simd::kWidth;

// ---------------------------------------------------------------------------------------------------- forward

template <class In>
float row_norm(const typename In::Storage* x, int64_t dim) {
  f32x8 acc0 = simd::splat(0.0f), acc1 = simd::splat(0.0f);
  int64_t k = 0;
  for (; k + 2 * kWidth <= dim; k += 2 * kWidth) {
    const f32x8 v0 = In::load8(x + k), v1 = In::load8(x + k + kWidth);
    acc0 = simd::fma(v0, v0, acc0);
    acc1 = simd::fma(v1, v1, acc1);
  }
  for (; k + kWidth <= dim; k += kWidth) {
    const f32x8 v = In::load8(x + k);
    acc0 = simd::fma(v, v, acc0);
  }
  float s = simd::hsum(acc0 + acc1);
  for (; k < dim; ++k) {
    const float v = In::load1(x + k);
    s = simd::fma(v, v, s);
  }
  return std::sqrt(s);
}

// out[r * out_ld + c] = x_r . y_c for R rows of x and C rows of y (row strides x_ld, y_ld).
template <class In, int R, int C>
void dot_block(const typename In::Storage* x, int64_t x_ld, const typename In::Storage* y, int64_t y_ld, int64_t dim,
               float* out, int64_t out_ld) {
  f32x8 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = simd::splat(0.0f);
  int64_t k = 0;
  for (; k + kWidth <= dim; k += kWidth) {
    f32x8 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = In::load8(x + r * x_ld + k);
    for (int c = 0; c < C; ++c) {
      const f32x8 yv = In::load8(y + c * y_ld + k);
      for (int r = 0; r < R; ++r) acc[r][c] = simd::fma(xv[r], yv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = simd::hsum(acc[r][c]);
      for (int64_t t = k; t < dim; ++t) s = simd::fma(In::load1(x + r * x_ld + t), In::load1(y + c * y_ld + t), s);
      out[r * out_ld + c] = s;
    }
  }
}

template <class In, int R>
void dot_rows(const typename In::Storage* x, int64_t x_ld, const typename In::Storage* y, int64_t y_ld, int64_t nv,
              int64_t dim, float* out, int64_t out_ld) {
  constexpr int kCols = 4;
  int64_t j = 0;
  for (; j + kCols <= nv; j += kCols) dot_block<In, R, kCols>(x, x_ld, y + j * y_ld, y_ld, dim, out + j, out_ld);
  switch (nv - j) {
    case 3:
      dot_block<In, R, 3>(x, x_ld, y + j * y_ld, y_ld, dim, out + j, out_ld);
      break;
    case 2:
      dot_block<In, R, 2>(x, x_ld, y + j * y_ld, y_ld, dim, out + j, out_ld);
      break;
    case 1:
      dot_block<In, R, 1>(x, x_ld, y + j * y_ld, y_ld, dim, out + j, out_ld);
      break;
    default:
      break;
  }
}

// dots[i * ld + j] = x_i . y_j for i < mv, j < nv.
template <class In>
void dot_products(const typename In::Storage* x, int64_t x_ld, int64_t mv, const typename In::Storage* y,
                  int64_t y_ld, int64_t nv, int64_t dim, float* dots, int64_t ld) {
  constexpr int kRows = 3;
  int64_t i = 0;
  for (; i + kRows <= mv; i += kRows) dot_rows<In, kRows>(x + i * x_ld, x_ld, y, y_ld, nv, dim, dots + i * ld, ld);
  if (mv - i == 2) dot_rows<In, 2>(x + i * x_ld, x_ld, y, y_ld, nv, dim, dots + i * ld, ld);
  if (mv - i == 1) dot_rows<In, 1>(x + i * x_ld, x_ld, y, y_ld, nv, dim, dots + i * ld, ld);
}

// Per-thread buffers for pairs of at most m x n.
struct WraWorkspace {
  IpotWorkspace ipot;
  int64_t ld;     // row stride of the cost (and of the IPOT workspace)
  Buffer cost;    // [m, ld]: the cost C (forward); G = -g diag(a) T diag(a') (backward)
  Buffer cost_t;  // [n, ldt]: G^T (backward)
  int64_t ldt;
  Buffer txt_norm, txt_inv, img_norm, img_inv, img_rho;
  WraWorkspace(int64_t m, int64_t n)
      : ipot(m, n),
        ld(ipot.ld),
        cost(aligned_zeros(m * ld)),
        cost_t(aligned_zeros(n * round_up_lanes(m))),
        ldt(round_up_lanes(m)),
        txt_norm(aligned_zeros(m)),
        txt_inv(aligned_zeros(m)),
        img_norm(aligned_zeros(n)),
        img_inv(aligned_zeros(n)),
        img_rho(aligned_zeros(ld)) {}
};

template <class In>
const typename In::Storage* rows_of(const void* base, int64_t batch_stride, int64_t b) {
  return static_cast<const typename In::Storage*>(base) + b * batch_stride;
}

// The stats (a, c) of the rows of one side: c = a [|x| >= eps] rho / |x|; zero for pad rows up to `rows`.
void write_stats(const float* norm, const float* inv, const float* rho, int64_t valid, int64_t rows, float eps,
                 float* stats) {
  for (int64_t i = 0; i < valid; ++i) {
    stats[2 * i] = inv[i];
    stats[2 * i + 1] = norm[i] >= eps ? inv[i] * rho[i] / norm[i] : 0.0f;
  }
  std::fill(stats + 2 * valid, stats + 2 * rows, 0.0f);
}

template <class In>
float wra_pair_forward(const WraInputs& in, int64_t b, float beta, int iteration, int k, float eps, float* plan,
                       float* txt_stats, float* img_stats, WraWorkspace& ws) {
  const int64_t mv = in.txt_lens[b], nv = in.img_lens[b], m = in.m, n = in.n, dim = in.dim, ld = ws.ld;
  const auto* x = rows_of<In>(in.txt, in.txt_batch_stride, b);
  const auto* y = rows_of<In>(in.img, in.img_batch_stride, b);
  float* txt_norm = ws.txt_norm.get();
  float* txt_inv = ws.txt_inv.get();
  float* img_norm = ws.img_norm.get();
  float* img_inv = ws.img_inv.get();
  for (int64_t i = 0; i < mv; ++i) {
    txt_norm[i] = row_norm<In>(x + i * in.txt_row_stride, dim);
    txt_inv[i] = 1.0f / std::max(txt_norm[i], eps);
  }
  for (int64_t j = 0; j < nv; ++j) {
    img_norm[j] = row_norm<In>(y + j * in.img_row_stride, dim);
    img_inv[j] = 1.0f / std::max(img_norm[j], eps);
  }

  float* cost = ws.cost.get();
  dot_products<In>(x, in.txt_row_stride, mv, y, in.img_row_stride, nv, dim, cost, ld);
  for (int64_t i = 0; i < mv; ++i) {
    float* ci = cost + i * ld;
    const float ai = txt_inv[i];
#pragma omp simd
    for (int64_t j = 0; j < nv; ++j) ci[j] = 1.0f - ci[j] * ai * img_inv[j];
  }

  ipot_solve(cost, ld, mv, nv, beta, iteration, k, ws.ipot);

  // distance, and rho on both sides (sum of T * cosine), while writing the plan
  const float* t = ws.ipot.q.get();
  float* img_rho = ws.img_rho.get();
  std::fill(img_rho, img_rho + ld, 0.0f);
  float* txt_rho = ws.ipot.sigma.get();  // sigma is no longer needed
  double total = 0.0;
  for (int64_t i = 0; i < mv; ++i) {
    const float* ci = cost + i * ld;
    const float* ti = t + i * ld;
    float dist_row = 0.0f, rho_row = 0.0f;
#pragma omp simd reduction(+ : dist_row, rho_row)
    for (int64_t j = 0; j < nv; ++j) {
      const float cos_t = (1.0f - ci[j]) * ti[j];
      dist_row += ci[j] * ti[j];
      rho_row += cos_t;
      img_rho[j] += cos_t;
    }
    total += dist_row;
    txt_rho[i] = rho_row;
    if (plan != nullptr) {
      float* out = plan + i * n;
      std::memcpy(out, ti, static_cast<size_t>(nv) * sizeof(float));
      std::fill(out + nv, out + n, 0.0f);
    }
  }
  if (plan != nullptr) {
    std::fill(plan + mv * n, plan + m * n, 0.0f);
    write_stats(txt_norm, txt_inv, txt_rho, mv, m, eps, txt_stats);
    write_stats(img_norm, img_inv, img_rho, nv, n, eps, img_stats);
  }
  return static_cast<float>(total);
}

// ---------------------------------------------------------------------------------------------------- backward

// out_r[d0 .. d0 + 8V) = sum_{j < count} w[r * w_ld + j] src_j[d0 ..] + e[r] self_r[d0 ..] for R rows, V vectors.
template <class In, int R, int V>
void combine_block(const float* w, int64_t w_ld, int64_t count, const typename In::Storage* src, int64_t src_ld,
                   const typename In::Storage* self, int64_t self_ld, const float* e, typename In::Storage* out,
                   int64_t out_ld, int64_t d0) {
  f32x8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = simd::splat(0.0f);
  for (int64_t j = 0; j < count; ++j) {
    f32x8 sv[V];
    for (int v = 0; v < V; ++v) sv[v] = In::load8(src + j * src_ld + d0 + v * kWidth);
    for (int r = 0; r < R; ++r) {
      const f32x8 wr = simd::splat(w[r * w_ld + j]);
      for (int v = 0; v < V; ++v) acc[r][v] = simd::fma(wr, sv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const f32x8 er = simd::splat(e[r]);
    for (int v = 0; v < V; ++v) {
      const f32x8 own = In::load8(self + r * self_ld + d0 + v * kWidth);
      In::store8(out + r * out_ld + d0 + v * kWidth, simd::fma(er, own, acc[r][v]));
    }
  }
}

// The columns [d_begin, d_end) (fewer than 8) of R rows, element by element.
template <class In, int R>
void combine_tail(const float* w, int64_t w_ld, int64_t count, const typename In::Storage* src, int64_t src_ld,
                  const typename In::Storage* self, int64_t self_ld, const float* e, typename In::Storage* out,
                  int64_t out_ld, int64_t d_begin, int64_t d_end) {
  for (int r = 0; r < R; ++r) {
    for (int64_t d = d_begin; d < d_end; ++d) {
      float s = 0.0f;
      for (int64_t j = 0; j < count; ++j) s = simd::fma(w[r * w_ld + j], In::load1(src + j * src_ld + d), s);
      In::store1(out + r * out_ld + d, simd::fma(e[r], In::load1(self + r * self_ld + d), s));
    }
  }
}

template <class In, int R>
void combine_rows_chunk(const float* w, int64_t w_ld, int64_t count, const typename In::Storage* src, int64_t src_ld,
                        const typename In::Storage* self, int64_t self_ld, const float* e, typename In::Storage* out,
                        int64_t out_ld, int64_t d0, int vectors, int64_t d_end) {
  switch (vectors) {
    case 3:
      combine_block<In, R, 3>(w, w_ld, count, src, src_ld, self, self_ld, e, out, out_ld, d0);
      break;
    case 2:
      combine_block<In, R, 2>(w, w_ld, count, src, src_ld, self, self_ld, e, out, out_ld, d0);
      break;
    case 1:
      combine_block<In, R, 1>(w, w_ld, count, src, src_ld, self, self_ld, e, out, out_ld, d0);
      break;
    default:
      combine_tail<In, R>(w, w_ld, count, src, src_ld, self, self_ld, e, out, out_ld, d0, d_end);
      break;
  }
}

// out_r = sum_j w_rj src_j + e_r self_r over the columns [d0, d0 + 8 vectors) (or [d0, d_end) when vectors == 0) for
// every row r < rows.
template <class In>
void combine_rows(const float* w, int64_t w_ld, int64_t rows, int64_t count, const typename In::Storage* src,
                  int64_t src_ld, const typename In::Storage* self, int64_t self_ld, const float* e,
                  typename In::Storage* out, int64_t out_ld, int64_t d0, int vectors, int64_t d_end) {
  constexpr int kRows = 4;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    combine_rows_chunk<In, kRows>(w + r * w_ld, w_ld, count, src, src_ld, self + r * self_ld, self_ld, e + r,
                                  out + r * out_ld, out_ld, d0, vectors, d_end);
  const float* wr = w + r * w_ld;
  const auto* sr = self + r * self_ld;
  auto* orow = out + r * out_ld;
  switch (rows - r) {
    case 3:
      combine_rows_chunk<In, 3>(wr, w_ld, count, src, src_ld, sr, self_ld, e + r, orow, out_ld, d0, vectors, d_end);
      break;
    case 2:
      combine_rows_chunk<In, 2>(wr, w_ld, count, src, src_ld, sr, self_ld, e + r, orow, out_ld, d0, vectors, d_end);
      break;
    case 1:
      combine_rows_chunk<In, 1>(wr, w_ld, count, src, src_ld, sr, self_ld, e + r, orow, out_ld, d0, vectors, d_end);
      break;
    default:
      break;
  }
}

template <class In>
void wra_pair_backward(const WraInputs& in, int64_t b, const float* plan, const float* txt_stats,
                       const float* img_stats, float g, typename In::Storage* grad_txt,
                       typename In::Storage* grad_img, WraWorkspace& ws) {
  using S = typename In::Storage;
  const int64_t mv = in.txt_lens[b], nv = in.img_lens[b], m = in.m, n = in.n, dim = in.dim;
  const S* x = rows_of<In>(in.txt, in.txt_batch_stride, b);
  const S* y = rows_of<In>(in.img, in.img_batch_stride, b);
  const int64_t x_ld = in.txt_row_stride, y_ld = in.img_row_stride;

  // G = -g diag(a) T diag(a') and its transpose; e = g c on each side.
  float* gm = ws.cost.get();
  float* gt = ws.cost_t.get();
  const int64_t ld = ws.ld, ldt = ws.ldt;
  float* e_txt = ws.txt_norm.get();
  float* e_img = ws.img_norm.get();
  for (int64_t i = 0; i < mv; ++i) {
    const float scale = -g * txt_stats[2 * i];
    for (int64_t j = 0; j < nv; ++j) {
      const float v = scale * plan[i * n + j] * img_stats[2 * j];
      gm[i * ld + j] = v;
      gt[j * ldt + i] = v;
    }
    e_txt[i] = g * txt_stats[2 * i + 1];
  }
  for (int64_t j = 0; j < nv; ++j) e_img[j] = g * img_stats[2 * j + 1];

  // Column chunks of 24 (3 vectors): both products read the chunk of X and of Y while it is in L1.
  constexpr int kChunkVectors = 3;
  for (int64_t d0 = 0; d0 < dim;) {
    const int64_t full = (dim - d0) / kWidth;
    const int vectors = static_cast<int>(std::min<int64_t>(full, kChunkVectors));
    const int64_t d_end = vectors > 0 ? d0 + vectors * kWidth : dim;
    combine_rows<In>(gm, ld, mv, nv, y, y_ld, x, x_ld, e_txt, grad_txt, dim, d0, vectors, d_end);
    combine_rows<In>(gt, ldt, nv, mv, x, x_ld, y, y_ld, e_img, grad_img, dim, d0, vectors, d_end);
    d0 = d_end;
  }
  std::memset(grad_txt + mv * dim, 0, static_cast<size_t>((m - mv) * dim) * sizeof(S));
  std::memset(grad_img + nv * dim, 0, static_cast<size_t>((n - nv) * dim) * sizeof(S));
}

// ---------------------------------------------------------------------------------------------------- batches

template <class In>
void forward_batch(const WraInputs& in, float beta, int iteration, int k, float eps, float* dist, float* plan,
                   float* txt_stats, float* img_stats, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    const FlushDenormals flush;
    WraWorkspace ws(in.m, in.n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < in.batch; ++b) {
      const bool save = plan != nullptr;
      dist[b] = wra_pair_forward<In>(in, b, beta, iteration, k, eps, save ? plan + b * in.m * in.n : nullptr,
                                     save ? txt_stats + b * in.m * 2 : nullptr,
                                     save ? img_stats + b * in.n * 2 : nullptr, ws);
    }
  }
}

template <class In>
void backward_batch(const WraInputs& in, const float* plan, const float* txt_stats, const float* img_stats,
                    const float* grad_dist, void* grad_txt, void* grad_img, int num_threads) {
  using S = typename In::Storage;
#pragma omp parallel num_threads(num_threads)
  {
    WraWorkspace ws(in.m, in.n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < in.batch; ++b) {
      wra_pair_backward<In>(in, b, plan + b * in.m * in.n, txt_stats + b * in.m * 2, img_stats + b * in.n * 2,
                            grad_dist[b], static_cast<S*>(grad_txt) + b * in.m * in.dim,
                            static_cast<S*>(grad_img) + b * in.n * in.dim, ws);
    }
  }
}

}  // namespace

void wra_forward(const WraInputs& in, float beta, int iteration, int k, float eps, float* dist, float* plan,
                 float* txt_stats, float* img_stats, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  switch (in.type) {
    case ElementType::kFloat32:
      forward_batch<simd::Float32>(in, beta, iteration, k, eps, dist, plan, txt_stats, img_stats, num_threads);
      break;
    case ElementType::kBFloat16:
      forward_batch<simd::BFloat16>(in, beta, iteration, k, eps, dist, plan, txt_stats, img_stats, num_threads);
      break;
    case ElementType::kFloat16:
      forward_batch<simd::Float16>(in, beta, iteration, k, eps, dist, plan, txt_stats, img_stats, num_threads);
      break;
  }
}

void wra_backward(const WraInputs& in, const float* plan, const float* txt_stats, const float* img_stats,
                  const float* grad_dist, void* grad_txt, void* grad_img, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  switch (in.type) {
    case ElementType::kFloat32:
      backward_batch<simd::Float32>(in, plan, txt_stats, img_stats, grad_dist, grad_txt, grad_img, num_threads);
      break;
    case ElementType::kBFloat16:
      backward_batch<simd::BFloat16>(in, plan, txt_stats, img_stats, grad_dist, grad_txt, grad_img, num_threads);
      break;
    case ElementType::kFloat16:
      backward_batch<simd::Float16>(in, plan, txt_stats, img_stats, grad_dist, grad_txt, grad_img, num_threads);
      break;
  }
}

}  // namespace uniter_fast
