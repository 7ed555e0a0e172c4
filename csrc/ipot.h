// Batched IPOT (UNITER's word-region alignment) on the CPU: OpenMP over pairs, vectorised inner loops.
#pragma once

#include <cstdint>

namespace uniter_fast {

// Runs `iteration` outer IPOT steps with `k` inner Sinkhorn sweeps on every pair of a batch.
//
// cost:      [batch, m, n] float32, C-contiguous; only the valid block [txt_lens[b], img_lens[b]] of pair b is read.
// txt_lens:  [batch] int64 in [1, m];  img_lens: [batch] int64 in [1, n] (pads are a suffix of each side).
// plan:      [batch, m, n] float32 output, fully written (exactly zero outside the valid block).
// dist:      [batch] float32 output, sum over the valid block of cost * plan.
// The caller validates shapes and ranges; num_threads <= 0 uses the OpenMP default.
void ipot_forward(const float* cost, const int64_t* txt_lens, const int64_t* img_lens, int64_t batch, int64_t m,
                  int64_t n, float beta, int iteration, int k, float* plan, float* dist, int num_threads);

}  // namespace uniter_fast
