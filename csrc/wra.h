// UNITER's word-region alignment (WRA) distance on the CPU, fused: cosine cost from the raw embeddings, IPOT, the
// distance sum(C * T) and its gradient, reading each pair's embeddings once per pass. OpenMP over pairs.
//
// Per pair with valid lengths mv = txt_lens[b], nv = img_lens[b] (pads are a suffix of each side):
//   a_i = 1 / max(|x_i|, eps), a'_j = 1 / max(|y_j|, eps)    (F.normalize's L2 scaling, eps 1e-5 in UNITER)
//   C_ij = 1 - (x_i . y_j) a_i a'_j  for i < mv, j < nv       (the cosine cost; pads take no part)
//   T = IPOT(C) (plan detached), dist = sum_ij C_ij T_ij
// Backward with g = d loss / d dist, rho_i = sum_j T_ij (1 - C_ij) and the stats saved by the forward
// (a_i, c_i = a_i [|x_i| >= eps] rho_i / |x_i|), which is what autograd of x / max(|x|, eps) gives:
//   d loss / d x_i = -g (sum_j a_i T_ij a'_j y_j - c_i x_i), and symmetrically for y_j.
#pragma once

#include <cstdint>

namespace uniter_fast {

enum class ElementType { kFloat32, kBFloat16, kFloat16 };

// Two batches of embeddings, [batch, m, dim] text and [batch, n, dim] regions, in one element type, unit stride
// along dim; batch and row strides in elements. Lengths are int64 in [1, m] / [1, n] (the caller validates).
struct WraInputs {
  ElementType type;
  const void* txt;
  int64_t txt_batch_stride, txt_row_stride;
  const void* img;
  int64_t img_batch_stride, img_row_stride;
  const int64_t* txt_lens;
  const int64_t* img_lens;
  int64_t batch, m, n, dim;
};

// Forward. dist: [batch] float32 (written). plan: [batch, m, n] float32, txt_stats: [batch, m, 2] float32 and
// img_stats: [batch, n, 2] float32 (a, c per row; zero at pads) are written when not null (all three or none), for
// the backward. num_threads <= 0 uses the OpenMP default.
void wra_forward(const WraInputs& in, float beta, int iteration, int k, float eps, float* dist, float* plan,
                 float* txt_stats, float* img_stats, int num_threads);

// Backward: the gradients [batch, m, dim] and [batch, n, dim] (contiguous, the inputs' element type, zero at pad
// rows) of sum_b grad_dist[b] * dist_b, from the forward's plan and stats.
void wra_backward(const WraInputs& in, const float* plan, const float* txt_stats, const float* img_stats,
                  const float* grad_dist, void* grad_txt, void* grad_img, int num_threads);

}  // namespace uniter_fast
