// pybind11 module uniter_fast._C: the project's C++ CPU kernels, taking NumPy buffers (no libtorch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "ipot.h"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;
using LongArray = py::array_t<int64_t, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void check_lengths(const char* name, const LongArray& lens, int64_t batch, int64_t limit) {
  if (lens.ndim() != 1 || lens.shape(0) != batch)
    throw std::invalid_argument(std::string(name) + " must have shape (" + std::to_string(batch) + ",), got " +
                                shape_str(lens));
  const int64_t* p = lens.data();
  for (int64_t b = 0; b < batch; ++b)
    if (p[b] < 1 || p[b] > limit)
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(b) + "] must be in [1, " +
                                  std::to_string(limit) + "], got " + std::to_string(p[b]));
}

void ipot_forward_py(const FloatArray& cost, const LongArray& txt_lens, const LongArray& img_lens, float beta,
                     int iteration, int k, FloatArray& plan, FloatArray& dist, int num_threads) {
  if (cost.ndim() != 3) throw std::invalid_argument("cost must have shape (B, M, N), got " + shape_str(cost));
  const int64_t batch = cost.shape(0), m = cost.shape(1), n = cost.shape(2);
  check_lengths("txt_lens", txt_lens, batch, m);
  check_lengths("img_lens", img_lens, batch, n);
  if (plan.ndim() != 3 || plan.shape(0) != batch || plan.shape(1) != m || plan.shape(2) != n)
    throw std::invalid_argument("plan must have the cost's shape " + shape_str(cost) + ", got " + shape_str(plan));
  if (dist.ndim() != 1 || dist.shape(0) != batch)
    throw std::invalid_argument("dist must have shape (" + std::to_string(batch) + ",), got " + shape_str(dist));
  if (!(beta > 0.0f)) throw std::invalid_argument("beta must be > 0, got " + std::to_string(beta));
  if (iteration < 1 || k < 1) throw std::invalid_argument("iteration and k must be >= 1");
  float* plan_ptr = plan.mutable_data();
  float* dist_ptr = dist.mutable_data();
  py::gil_scoped_release release;
  uniter_fast::ipot_forward(cost.data(), txt_lens.data(), img_lens.data(), batch, m, n, beta, iteration, k, plan_ptr,
                            dist_ptr, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "uniter_fast C++ CPU kernels (pybind11, OpenMP; buffers in, preallocated buffers out)";
  mod.def("ipot_forward", &ipot_forward_py, py::arg("cost").noconvert(), py::arg("txt_lens").noconvert(),
          py::arg("img_lens").noconvert(), py::arg("beta"), py::arg("iteration"), py::arg("k"),
          py::arg("plan").noconvert(), py::arg("dist").noconvert(), py::arg("num_threads") = 0,
          "Batched IPOT. cost (B,M,N) float32 C-contiguous; txt_lens/img_lens (B,) int64 valid lengths in [1,M]/"
          "[1,N] (suffix pads); writes plan (B,M,N) float32 (zero outside the valid block) and dist (B,) float32 "
          "= sum(cost*plan). Releases the GIL; OpenMP over pairs with num_threads (<=0: OpenMP default).");
}
