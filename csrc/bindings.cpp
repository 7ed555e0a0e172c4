// pybind11 module uniter_fast._C: the project's C++ CPU kernels, taking NumPy buffers (no libtorch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "ipot.h"
#include "wra.h"

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

// An embedding batch [B, rows, dim] of the element type `dtype` ("fp32"; "bf16" passed as int16/uint16; "fp16"), unit
// stride along dim, any non-negative batch and row strides.
struct EmbeddingArg {
  const void* data;
  int64_t batch, rows, dim, batch_stride, row_stride;
};

uniter_fast::ElementType element_type(const std::string& dtype) {
  if (dtype == "fp32") return uniter_fast::ElementType::kFloat32;
  if (dtype == "bf16") return uniter_fast::ElementType::kBFloat16;
  if (dtype == "fp16") return uniter_fast::ElementType::kFloat16;
  throw std::invalid_argument("dtype must be 'fp32', 'bf16' or 'fp16', got '" + dtype + "'");
}

void check_element_type(const char* name, const py::array& a, const std::string& dtype) {
  const char kind = a.dtype().kind();
  const py::ssize_t size = a.dtype().itemsize();
  const bool ok = dtype == "fp32"   ? (kind == 'f' && size == 4)
                  : dtype == "fp16" ? (kind == 'f' && size == 2)
                                    : ((kind == 'i' || kind == 'u') && size == 2);
  if (!ok)
    throw std::invalid_argument(std::string(name) + " must hold " + dtype + " elements (bf16 as int16), got dtype " +
                                std::string(py::str(a.dtype())));
}

EmbeddingArg embedding_arg(const char* name, const py::array& a, const std::string& dtype) {
  if (a.ndim() != 3) throw std::invalid_argument(std::string(name) + " must have shape (B, L, D), got " + shape_str(a));
  check_element_type(name, a, dtype);
  const py::ssize_t item = a.itemsize();
  for (int d = 0; d < 3; ++d)
    if (a.strides(d) < 0 || a.strides(d) % item != 0)
      throw std::invalid_argument(std::string(name) + " must have non-negative strides in whole elements");
  if (a.shape(2) > 1 && a.strides(2) != item)
    throw std::invalid_argument(std::string(name) + " must have unit stride along its last dimension");
  return {a.data(), a.shape(0), a.shape(1), a.shape(2), a.strides(0) / item, a.strides(1) / item};
}

uniter_fast::WraInputs wra_inputs(const py::array& txt_emb, const py::array& img_emb, const std::string& dtype,
                                  const LongArray& txt_lens, const LongArray& img_lens) {
  const EmbeddingArg txt = embedding_arg("txt_emb", txt_emb, dtype);
  const EmbeddingArg img = embedding_arg("img_emb", img_emb, dtype);
  if (img.batch != txt.batch || img.dim != txt.dim)
    throw std::invalid_argument("img_emb must have shape (" + std::to_string(txt.batch) + ", N, " +
                                std::to_string(txt.dim) + "), got " + shape_str(img_emb));
  check_lengths("txt_lens", txt_lens, txt.batch, txt.rows);
  check_lengths("img_lens", img_lens, txt.batch, img.rows);
  return {element_type(dtype),
          txt.data,
          txt.batch_stride,
          txt.row_stride,
          img.data,
          img.batch_stride,
          img.row_stride,
          txt_lens.data(),
          img_lens.data(),
          txt.batch,
          txt.rows,
          img.rows,
          txt.dim};
}

void check_shape(const char* name, const py::array& a, std::initializer_list<int64_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  std::string want = "(";
  int d = 0;
  for (int64_t s : shape) {
    want += (d ? ", " : "") + std::to_string(s);
    ok = ok && a.shape(d) == s;
    ++d;
  }
  want += shape.size() == 1 ? ",)" : ")";
  if (!ok) throw std::invalid_argument(std::string(name) + " must have shape " + want + ", got " + shape_str(a));
}

// An optional float32 C-contiguous output: nullptr for None, else checked against `shape`.
float* optional_output(const char* name, const py::object& obj, std::initializer_list<int64_t> shape) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<FloatArray>(obj))
    throw py::type_error(std::string(name) + " must be None or a C-contiguous float32 array");
  auto arr = obj.cast<FloatArray>();
  check_shape(name, arr, shape);
  return arr.mutable_data();
}

void wra_forward_py(const py::array& txt_emb, const py::array& img_emb, const std::string& dtype,
                    const LongArray& txt_lens, const LongArray& img_lens, float beta, int iteration, int k, float eps,
                    FloatArray& dist, const py::object& plan, const py::object& txt_stats, const py::object& img_stats,
                    int num_threads) {
  const uniter_fast::WraInputs in = wra_inputs(txt_emb, img_emb, dtype, txt_lens, img_lens);
  if (!(beta > 0.0f)) throw std::invalid_argument("beta must be > 0, got " + std::to_string(beta));
  if (iteration < 1 || k < 1) throw std::invalid_argument("iteration and k must be >= 1");
  if (!(eps > 0.0f)) throw std::invalid_argument("eps must be > 0, got " + std::to_string(eps));
  check_shape("dist", dist, {in.batch});
  float* plan_ptr = optional_output("plan", plan, {in.batch, in.m, in.n});
  float* txt_stats_ptr = optional_output("txt_stats", txt_stats, {in.batch, in.m, 2});
  float* img_stats_ptr = optional_output("img_stats", img_stats, {in.batch, in.n, 2});
  if ((plan_ptr == nullptr) != (txt_stats_ptr == nullptr) || (plan_ptr == nullptr) != (img_stats_ptr == nullptr))
    throw std::invalid_argument("plan, txt_stats and img_stats must be given together or not at all");
  float* dist_ptr = dist.mutable_data();
  py::gil_scoped_release release;
  uniter_fast::wra_forward(in, beta, iteration, k, eps, dist_ptr, plan_ptr, txt_stats_ptr, img_stats_ptr,
                           num_threads);
}

void check_gradient_output(const char* name, const py::array& out, const py::array& like, const std::string& dtype) {
  check_element_type(name, out, dtype);
  check_shape(name, out, {like.shape(0), like.shape(1), like.shape(2)});
  if (!(out.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (!out.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
}

void wra_backward_py(const py::array& txt_emb, const py::array& img_emb, const std::string& dtype,
                     const LongArray& txt_lens, const LongArray& img_lens, const FloatArray& plan,
                     const FloatArray& txt_stats, const FloatArray& img_stats, const FloatArray& grad_dist,
                     py::array& grad_txt, py::array& grad_img, int num_threads) {
  const uniter_fast::WraInputs in = wra_inputs(txt_emb, img_emb, dtype, txt_lens, img_lens);
  check_shape("plan", plan, {in.batch, in.m, in.n});
  check_shape("txt_stats", txt_stats, {in.batch, in.m, 2});
  check_shape("img_stats", img_stats, {in.batch, in.n, 2});
  check_shape("grad_dist", grad_dist, {in.batch});
  check_gradient_output("grad_txt", grad_txt, txt_emb, dtype);
  check_gradient_output("grad_img", grad_img, img_emb, dtype);
  void* grad_txt_ptr = grad_txt.mutable_data();
  void* grad_img_ptr = grad_img.mutable_data();
  py::gil_scoped_release release;
  uniter_fast::wra_backward(in, plan.data(), txt_stats.data(), img_stats.data(), grad_dist.data(), grad_txt_ptr,
                            grad_img_ptr, num_threads);
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
  mod.def("wra_forward", &wra_forward_py, py::arg("txt_emb"), py::arg("img_emb"), py::arg("dtype"),
          py::arg("txt_lens").noconvert(), py::arg("img_lens").noconvert(), py::arg("beta"), py::arg("iteration"),
          py::arg("k"), py::arg("eps"), py::arg("dist").noconvert(), py::arg("plan"), py::arg("txt_stats"),
          py::arg("img_stats"), py::arg("num_threads") = 0,
          "Fused WRA distance. txt_emb (B,M,D), img_emb (B,N,D) of dtype 'fp32'/'fp16'/'bf16' (bf16 as int16), unit "
          "stride along D; txt_lens/img_lens (B,) int64 in [1,M]/[1,N] (suffix pads). Writes dist (B,) float32 = "
          "sum(C*T) with C = 1 - cos (L2 eps) and T the IPOT plan; plan (B,M,N), txt_stats (B,M,2), img_stats "
          "(B,N,2) float32 (for wra_backward) when not None. Releases the GIL; OpenMP over pairs.");
  mod.def("wra_backward", &wra_backward_py, py::arg("txt_emb"), py::arg("img_emb"), py::arg("dtype"),
          py::arg("txt_lens").noconvert(), py::arg("img_lens").noconvert(), py::arg("plan").noconvert(),
          py::arg("txt_stats").noconvert(), py::arg("img_stats").noconvert(), py::arg("grad_dist").noconvert(),
          py::arg("grad_txt"), py::arg("grad_img"), py::arg("num_threads") = 0,
          "Gradient of sum_b grad_dist[b] * dist_b w.r.t. the embeddings (plan detached), from wra_forward's plan "
          "and stats; writes grad_txt (B,M,D) and grad_img (B,N,D), C-contiguous, the embeddings' dtype, zero at "
          "pad rows. Releases the GIL; OpenMP over pairs.");
}
