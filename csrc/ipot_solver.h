// The IPOT iteration on one pair, shared by the IPOT kernel (ipot.cpp) and the fused WRA distance (wra.cpp).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace uniter_fast {

constexpr int64_t kLanes = 16;  // row stride granularity of the workspaces (one 64-byte line of floats)

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;

// `count` floats, 64-byte aligned, zero-filled.
Buffer aligned_zeros(int64_t count);

// Workspace of one thread for pairs of at most m x n, rows padded to `ld` (a multiple of 16 floats) and 64-byte
// aligned so that the inner loops have no remainder: the Gibbs kernel A = exp(-C / beta), Q (then the plan T), and
// the scaling vectors. Entries beyond the valid block stay exactly zero (delta too), so full-width loops add nothing.
struct IpotWorkspace {
  int64_t ld;
  Buffer kernel, q, sigma, delta, acc;
  IpotWorkspace(int64_t m, int64_t n);
};

// Runs `iteration` outer IPOT steps with `k` inner sweeps on the valid mv x nv block of `cost` (row stride
// cost_ld), with UNITER's init, update order and arithmetic. Leaves the plan T in ws.q (row stride ws.ld; entries
// beyond column nv are zero). The caller sets the FTZ/DAZ mode (subnormal plan entries are slow otherwise).
void ipot_solve(const float* cost, int64_t cost_ld, int64_t mv, int64_t nv, float beta, int iteration, int k,
                IpotWorkspace& ws);

// Sets flush-to-zero and denormals-are-zero for the calling thread and restores the previous mode on destruction.
class FlushDenormals {
 public:
  FlushDenormals();
  ~FlushDenormals();
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_;
};

}  // namespace uniter_fast
