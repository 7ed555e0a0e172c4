// Fused WRA distance on the CPU (see wra.h for the maths). Pairs are spread over the threads; each pair is worked
// on by one thread with everything but the embeddings in its workspace.
//
// All products are one register-blocked kernel, `outer_accumulate`: 6 broadcast scalars times 2 vectors of 8 lanes
// per step, 12 accumulators (the 6 x 16 block of BLIS's Haswell kernel), with operands laid out so that the vectors
// are contiguous and everything a block touches sits in L1.
//   forward:  the row norms (the one sequential read of the pair's embeddings from memory); X Y^T in chunks of kChunk
//             columns, X^T packed per chunk ([k][i], 16 text rows per block) and the region rows broadcast; the cost;
//             IPOT (ipot_solve, the IPOT kernel's loop); then one pass over the plan for the distance, the plan and the
//             (a, c) stats.
//   backward: G = -g diag(a) T diag(a') packed in panels of 6 rows (and G^T in panels of 6 columns); then, 16 embedding
//             columns at a time, the chunks of X and Y packed (read once) and dX = G Y + g c X, dY = G^T X + g c' Y
//             from them; fp32 gradients are written with streaming stores (no read for ownership).
// All arithmetic is fp32 (bf16/fp16 are widened on load and rounded to nearest even on store).
#include "wra.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "ipot_solver.h"
#include "simd.h"

namespace uniter_fast {
namespace {

using simd::f32x8;
using simd::kWidth;

constexpr int kPanel = 6;                  // broadcast rows per block
constexpr int64_t kSpan = 2 * kWidth;      // vector lanes per block row (2 vectors)
constexpr int64_t kChunk = 64;             // embedding columns per packed chunk of the forward's X Y^T

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#define UF_INLINE inline __attribute__((always_inline))

// acc[r][0..1] += sum_{t < count} w[t * w_step + r * w_row] * vec[t * vec_step + (0..15)] for r < R. Always inlined,
// so that the accumulators stay in registers.
template <class Vec, int R>
UF_INLINE void outer_accumulate(f32x8 (&acc)[kPanel][2], const float* w, int64_t w_step, int64_t w_row,
                             const typename Vec::Storage* vec, int64_t vec_step, int64_t count) {
  for (int64_t t = 0; t < count; ++t, w += w_step, vec += vec_step) {
    const f32x8 v0 = Vec::load8(vec), v1 = Vec::load8(vec + kWidth);
    for (int r = 0; r < R; ++r) {
      const f32x8 b = simd::splat(w[r * w_row]);
      acc[r][0] = simd::fma(b, v0, acc[r][0]);
      acc[r][1] = simd::fma(b, v1, acc[r][1]);
    }
  }
}

// The same for a runtime row count 1..kPanel.
template <class Vec>
UF_INLINE void outer_accumulate_rows(int rows, f32x8 (&acc)[kPanel][2], const float* w, int64_t w_step, int64_t w_row,
                                  const typename Vec::Storage* vec, int64_t vec_step, int64_t count) {
  switch (rows) {
    case 6:
      return outer_accumulate<Vec, 6>(acc, w, w_step, w_row, vec, vec_step, count);
    case 5:
      return outer_accumulate<Vec, 5>(acc, w, w_step, w_row, vec, vec_step, count);
    case 4:
      return outer_accumulate<Vec, 4>(acc, w, w_step, w_row, vec, vec_step, count);
    case 3:
      return outer_accumulate<Vec, 3>(acc, w, w_step, w_row, vec, vec_step, count);
    case 2:
      return outer_accumulate<Vec, 2>(acc, w, w_step, w_row, vec, vec_step, count);
    default:
      return outer_accumulate<Vec, 1>(acc, w, w_step, w_row, vec, vec_step, count);
  }
}

inline void zero(f32x8 (&acc)[kPanel][2]) {
  for (auto& row : acc) row[0] = row[1] = simd::splat(0.0f);
}

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

// Per-thread buffers for pairs of at most m x n with embeddings of width dim.
struct WraWorkspace {
  IpotWorkspace ipot;
  int64_t ld;        // row stride of the cost (that of the IPOT workspace)
  int64_t text_pad;  // text rows rounded up to a whole block (16)
  Buffer cost;       // [m, ld] the cost C
  Buffer dots_t;     // [n, text_pad] X Y^T, transposed
  Buffer x_t;        // [kChunk, text_pad] a chunk of X^T
  Buffer y_rows;     // [kPanel, kChunk] a chunk of 6 region rows in fp32 (bf16/fp16 inputs)
  Buffer g_panels;   // [ceil(m / 6) * n * 6] G in panels of 6 text rows: [panel][j][r]
  Buffer gt_panels;  // [ceil(n / 6) * m * 6] G^T in panels of 6 region rows: [panel][i][r]
  Buffer x_chunk;    // [m, 16] 16 columns of X in fp32 (backward)
  Buffer y_chunk;    // [n, 16] 16 columns of Y in fp32 (backward)
  Buffer txt_norm, txt_inv, txt_rho, img_norm, img_inv, img_rho;
  WraWorkspace(int64_t m, int64_t n)
      : ipot(m, n),
        ld(ipot.ld),
        text_pad(round_up(m, kSpan)),
        cost(aligned_zeros(m * ld)),
        dots_t(aligned_zeros(n * text_pad)),
        x_t(aligned_zeros(kChunk * text_pad)),
        y_rows(aligned_zeros(kPanel * kChunk)),
        g_panels(aligned_zeros(round_up(m, kPanel) * n)),
        gt_panels(aligned_zeros(round_up(n, kPanel) * m)),
        x_chunk(aligned_zeros(m * kSpan)),
        y_chunk(aligned_zeros(n * kSpan)),
        txt_norm(aligned_zeros(m)),
        txt_inv(aligned_zeros(m)),
        txt_rho(aligned_zeros(m)),
        img_norm(aligned_zeros(n)),
        img_inv(aligned_zeros(n)),
        img_rho(aligned_zeros(n)) {}
};

template <class In>
const typename In::Storage* rows_of(const void* base, int64_t batch_stride, int64_t b) {
  return static_cast<const typename In::Storage*>(base) + b * batch_stride;
}

// ---------------------------------------------------------------------------------------------------- forward

// x_t[k * ld + i] = x[i * x_ld + k] for k < kc, i < ld (rows from `rows` on are zero; ld is a multiple of 8), in fp32:
// 8 x 8 blocks transposed in registers.
template <class In>
void pack_transposed(const typename In::Storage* x, int64_t x_ld, int64_t rows, int64_t kc, float* x_t, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += kWidth) {
    const int valid = static_cast<int>(std::clamp<int64_t>(rows - i0, 0, kWidth));
    int64_t k = 0;
    for (; k + kWidth <= kc; k += kWidth) {
      f32x8 block[kWidth];
      for (int r = 0; r < kWidth; ++r) block[r] = r < valid ? In::load8(x + (i0 + r) * x_ld + k) : simd::splat(0.0f);
      simd::transpose8(block);
      for (int c = 0; c < kWidth; ++c) simd::Float32::store8(x_t + (k + c) * ld + i0, block[c]);
    }
    for (; k < kc; ++k)
      for (int r = 0; r < kWidth; ++r) x_t[k * ld + i0 + r] = r < valid ? In::load1(x + (i0 + r) * x_ld + k) : 0.0f;
  }
}

// dots_t[j * text_pad + i] = x_i . y_j for i < text_pad (rows beyond mv are zero), j < nv.
template <class In>
void dot_products(const typename In::Storage* x, int64_t x_ld, int64_t mv, const typename In::Storage* y,
                  int64_t y_ld, int64_t nv, int64_t dim, WraWorkspace& ws) {
  const int64_t tp = ws.text_pad;
  float* x_t = ws.x_t.get();
  float* dots_t = ws.dots_t.get();
  for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, dim - k0);
    pack_transposed<In>(x + k0, x_ld, mv, kc, x_t, tp);
    for (int64_t j0 = 0; j0 < nv; j0 += kPanel) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanel, nv - j0));
      const float* w;  // the region rows j0.. as fp32: w[r * w_row + k]
      int64_t w_row;
      if constexpr (std::is_same_v<In, simd::Float32>) {
        w = y + j0 * y_ld + k0;
        w_row = y_ld;
      } else {
        float* buf = ws.y_rows.get();
        for (int r = 0; r < rows; ++r) {
          const auto* yr = y + (j0 + r) * y_ld + k0;
          int64_t k = 0;
          for (; k + kWidth <= kc; k += kWidth) simd::Float32::store8(buf + r * kChunk + k, In::load8(yr + k));
          for (; k < kc; ++k) buf[r * kChunk + k] = In::load1(yr + k);
        }
        w = buf;
        w_row = kChunk;
      }
      for (int64_t i0 = 0; i0 < tp; i0 += kSpan) {
        f32x8 acc[kPanel][2];
        float* out = dots_t + j0 * tp + i0;
        for (int r = 0; r < rows; ++r) {
          acc[r][0] = k0 == 0 ? simd::splat(0.0f) : simd::Float32::load8(out + r * tp);
          acc[r][1] = k0 == 0 ? simd::splat(0.0f) : simd::Float32::load8(out + r * tp + kWidth);
        }
        outer_accumulate_rows<simd::Float32>(rows, acc, w, 1, w_row, x_t + i0, tp, kc);
        for (int r = 0; r < rows; ++r) {
          simd::Float32::store8(out + r * tp, acc[r][0]);
          simd::Float32::store8(out + r * tp + kWidth, acc[r][1]);
        }
      }
    }
  }
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

  dot_products<In>(x, in.txt_row_stride, mv, y, in.img_row_stride, nv, dim, ws);
  float* cost = ws.cost.get();
  const float* dots_t = ws.dots_t.get();
  for (int64_t i = 0; i < mv; ++i) {
    float* ci = cost + i * ld;
    const float ai = txt_inv[i];
    for (int64_t j = 0; j < nv; ++j) ci[j] = 1.0f - dots_t[j * ws.text_pad + i] * ai * img_inv[j];
  }

  ipot_solve(cost, ld, mv, nv, beta, iteration, k, ws.ipot);

  // distance, and rho on both sides (sum of T * cosine), while writing the plan
  const float* t = ws.ipot.q.get();
  float* txt_rho = ws.txt_rho.get();
  float* img_rho = ws.img_rho.get();
  std::fill(img_rho, img_rho + nv, 0.0f);
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

// Stores 16 lanes at `out` (element type Out); fp32 lanes at 32-byte aligned addresses as streaming stores.
template <class Out>
inline void store_span(typename Out::Storage* out, f32x8 v0, f32x8 v1, bool stream) {
  if constexpr (std::is_same_v<Out, simd::Float32>) {
    if (stream) {
      simd::stream8(out, v0);
      simd::stream8(out + kWidth, v1);
      return;
    }
  }
  Out::store8(out, v0);
  Out::store8(out + kWidth, v1);
}

// chunk[r * 16 + c] = rows[r * ld + d0 + c] in fp32 for r < count, c < 16 (zero from column dim on). Packing the
// chunk keeps it in L1: rows of a power-of-two-ish stride (3 KB for D = 768) map to a handful of L1 sets.
template <class In>
void pack_chunk(const typename In::Storage* rows, int64_t ld, int64_t count, int64_t d0, int64_t dim, float* chunk) {
  for (int64_t r = 0; r < count; ++r) {
    const auto* row = rows + r * ld + d0;
    float* out = chunk + r * kSpan;
    if (d0 + kSpan <= dim) {
      simd::Float32::store8(out, In::load8(row));
      simd::Float32::store8(out + kWidth, In::load8(row + kWidth));
    } else {
      for (int64_t c = 0; c < kSpan; ++c) out[c] = d0 + c < dim ? In::load1(row + c) : 0.0f;
    }
  }
}

// out[r * out_ld + d0 + c] = sum_{t < count} panel[t * 6 + r] src[t * 16 + c] + e[r] self[r * 16 + c] for the rows
// r of one panel and c < span (16, or fewer at the end of a row).
template <class In>
void combine_panel(int rows, const float* panel, int64_t count, const float* src, const float* self, const float* e,
                   typename In::Storage* out, int64_t out_ld, int64_t d0, int64_t span, bool stream) {
  f32x8 acc[kPanel][2];
  zero(acc);
  outer_accumulate_rows<simd::Float32>(rows, acc, panel, kPanel, 1, src, kSpan, count);
  for (int r = 0; r < rows; ++r) {
    const f32x8 er = simd::splat(e[r]);
    const f32x8 v0 = simd::fma(er, simd::Float32::load8(self + r * kSpan), acc[r][0]);
    const f32x8 v1 = simd::fma(er, simd::Float32::load8(self + r * kSpan + kWidth), acc[r][1]);
    auto* o = out + r * out_ld + d0;
    if (span == kSpan) {
      store_span<In>(o, v0, v1, stream);
    } else {
      float tail[kSpan];
      simd::Float32::store8(tail, v0);
      simd::Float32::store8(tail + kWidth, v1);
      for (int64_t c = 0; c < span; ++c) In::store1(o + c, tail[c]);
    }
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

  // G = -g diag(a) T diag(a') in panels of 6 rows ([panel][j][r]) and G^T in panels of 6 columns ([panel][i][r]);
  // e = g c on each side.
  float* g_panels = ws.g_panels.get();
  float* gt_panels = ws.gt_panels.get();
  float* e_txt = ws.txt_rho.get();
  float* e_img = ws.img_rho.get();
  for (int64_t i = 0; i < mv; ++i) {
    const float scale = -g * txt_stats[2 * i];
    float* gp = g_panels + (i / kPanel) * kPanel * nv + i % kPanel;
    for (int64_t j = 0; j < nv; ++j) {
      const float v = scale * plan[i * n + j] * img_stats[2 * j];
      gp[j * kPanel] = v;
      gt_panels[(j / kPanel) * kPanel * mv + i * kPanel + j % kPanel] = v;
    }
    e_txt[i] = g * txt_stats[2 * i + 1];
  }
  for (int64_t j = 0; j < nv; ++j) e_img[j] = g * img_stats[2 * j + 1];

  // 16 columns at a time: the chunks of X and Y, packed, serve both products from L1.
  float* x_chunk = ws.x_chunk.get();
  float* y_chunk = ws.y_chunk.get();
  const bool stream = std::is_same_v<In, simd::Float32> && dim % kWidth == 0 &&
                      reinterpret_cast<uintptr_t>(grad_txt) % 32 == 0 && reinterpret_cast<uintptr_t>(grad_img) % 32 == 0;
  for (int64_t d0 = 0; d0 < dim; d0 += kSpan) {
    const int64_t span = std::min(kSpan, dim - d0);
    pack_chunk<In>(x, x_ld, mv, d0, dim, x_chunk);
    pack_chunk<In>(y, y_ld, nv, d0, dim, y_chunk);
    for (int64_t p0 = 0; p0 < mv; p0 += kPanel) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanel, mv - p0));
      combine_panel<In>(rows, g_panels + p0 * nv, nv, y_chunk, x_chunk + p0 * kSpan, e_txt + p0, grad_txt + p0 * dim,
                        dim, d0, span, stream);
    }
    for (int64_t p0 = 0; p0 < nv; p0 += kPanel) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanel, nv - p0));
      combine_panel<In>(rows, gt_panels + p0 * mv, mv, x_chunk, y_chunk + p0 * kSpan, e_img + p0, grad_img + p0 * dim,
                        dim, d0, span, stream);
    }
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
    simd::store_fence();  // order the streaming stores before the results are read
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
