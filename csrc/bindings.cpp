// The one pybind11 module of xjfast: every CUDA entry point, taking raw pointers, sizes, strides
// and a CUDA stream, so the extension never links against libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "denoise_step.h"
#include "device_info.h"
#include "kv_cache_commit.h"
#include "kv_cache_compact.h"
#include "temporal_attention.h"

namespace py = pybind11;

static void copy_strides(const std::vector<int64_t>& from, int64_t* to, size_t max, const char* name) {
  if (from.size() > max) throw std::invalid_argument(std::string(name) + ": too many strides");
  for (size_t i = 0; i < max; ++i) {
    to[i] = i < from.size() ? from[i] : 0;
    // torch never makes one; a direct call's would address memory before the tensor
    if (to[i] < 0) throw std::invalid_argument(std::string(name) + ": strides must be non-negative, got " +
                                               std::to_string(to[i]));
  }
}

// Pointers arrive as integers (tensor.data_ptr()), the stream as its handle (cuda_stream).
static void denoise_step(uintptr_t x_t, uintptr_t model_out, uintptr_t coef, uintptr_t x0, uintptr_t x_next,
                         int dtype, std::vector<int> shape, std::vector<int64_t> x_strides,
                         std::vector<int64_t> model_out_strides, bool tokens, std::vector<int> patch,
                         uint64_t frame_index, uintptr_t frame_index_ptr, uint64_t seed, uintptr_t stream) {
  if (shape.size() != 5 || patch.size() != 3) throw std::invalid_argument("denoise_step: shape has 5 sizes, patch 3");
  xjfast::DenoiseArgs a{};
  a.x_t = reinterpret_cast<const void*>(x_t);
  a.model_out = reinterpret_cast<const void*>(model_out);
  a.coef = reinterpret_cast<const float*>(coef);
  a.x0 = reinterpret_cast<void*>(x0);
  a.x_next = reinterpret_cast<void*>(x_next);
  a.dtype = dtype;
  a.tokens = tokens;
  a.geometry = {shape[0], shape[1], shape[2], shape[3], shape[4], patch[0], patch[1], patch[2], {}, {}};
  copy_strides(x_strides, a.geometry.sx, 5, "x_t");
  copy_strides(model_out_strides, a.geometry.sm, 5, "model_out");
  a.frame_index = frame_index;
  a.frame_index_ptr = reinterpret_cast<const int64_t*>(frame_index_ptr);  // 0: use frame_index
  a.seed = seed;
  xjfast::denoise_step(a, reinterpret_cast<cudaStream_t>(stream));
}

static void kv_cache_commit(uintptr_t k, uintptr_t v, std::vector<int64_t> k_strides, std::vector<int64_t> v_strides,
                            uintptr_t page_ids, uintptr_t k_pages, uintptr_t v_pages, uintptr_t k_scale,
                            uintptr_t k_mean, uintptr_t v_scale, int input_dtype, int storage_dtype,
                            std::vector<int> sizes, uintptr_t stream) {
  if (sizes.size() != 6) throw std::invalid_argument("kv_cache_commit: sizes are (n, B, T, H, D, P)");
  xjfast::CommitArgs a{};
  a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v);
  copy_strides(k_strides, a.sk, 3, "k");
  copy_strides(v_strides, a.sv, 3, "v");
  a.page_ids = reinterpret_cast<const int32_t*>(page_ids);
  a.k_pages = reinterpret_cast<void*>(k_pages);
  a.v_pages = reinterpret_cast<void*>(v_pages);
  a.k_scale = reinterpret_cast<float*>(k_scale);
  a.k_mean = reinterpret_cast<float*>(k_mean);
  a.v_scale = reinterpret_cast<float*>(v_scale);
  a.input_dtype = input_dtype;
  a.storage_dtype = storage_dtype;
  a.n = sizes[0], a.B = sizes[1], a.T = sizes[2], a.H = sizes[3], a.D = sizes[4], a.P = sizes[5];
  xjfast::kv_cache_commit(a, reinterpret_cast<cudaStream_t>(stream));
}

// keep and page: (k, v, k_scale, k_mean, v_scale) pointers of contiguous tensors.
static void kv_cache_compact(std::vector<uintptr_t> keep, std::vector<uintptr_t> page, uintptr_t top,
                             int storage_dtype, std::vector<int> sizes, int keep_count, int count, uintptr_t stream) {
  if (keep.size() != 5 || page.size() != 5)
    throw std::invalid_argument("kv_cache_compact: keep and page are 5 pointers each (k, v, k_scale, k_mean, v_scale)");
  if (sizes.size() != 5) throw std::invalid_argument("kv_cache_compact: sizes are (B, K, T, H, D)");
  xjfast::CompactArgs a{};
  a.keep_k = reinterpret_cast<void*>(keep[0]);
  a.keep_v = reinterpret_cast<void*>(keep[1]);
  a.keep_k_scale = reinterpret_cast<float*>(keep[2]);
  a.keep_k_mean = reinterpret_cast<float*>(keep[3]);
  a.keep_v_scale = reinterpret_cast<float*>(keep[4]);
  a.page_k = reinterpret_cast<const void*>(page[0]);
  a.page_v = reinterpret_cast<const void*>(page[1]);
  a.page_k_scale = reinterpret_cast<const float*>(page[2]);
  a.page_k_mean = reinterpret_cast<const float*>(page[3]);
  a.page_v_scale = reinterpret_cast<const float*>(page[4]);
  a.top = reinterpret_cast<const int64_t*>(top);
  a.storage_dtype = storage_dtype;
  a.B = sizes[0], a.K = sizes[1], a.T = sizes[2], a.H = sizes[3], a.D = sizes[4];
  a.keep_count = keep_count, a.count = count;
  xjfast::kv_cache_compact(a, reinterpret_cast<cudaStream_t>(stream));
}

// Five pointers of a family of paged key units: k, v, k_scale, k_mean, v_scale (all 0: none), its
// tokens per unit and the units its storage holds.
static xjfast::PagedUnits paged_units(const std::vector<uintptr_t>& p, int tokens, int count, const char* name) {
  if (p.size() != 5) throw std::invalid_argument(std::string(name) + ": expected 5 pointers (k, v, k_scale, k_mean, v_scale)");
  return {reinterpret_cast<const uint8_t*>(p[0]), reinterpret_cast<const uint8_t*>(p[1]),
          reinterpret_cast<const float*>(p[2]), reinterpret_cast<const float*>(p[3]),
          reinterpret_cast<const float*>(p[4]), tokens, count};
}

static xjfast::QueryTiles query_tiles(uintptr_t q, const std::vector<int64_t>& q_strides, int dtype,
                                      const std::vector<int>& sizes, int first_slot, int unit_tokens,
                                      uintptr_t frame_slots, uintptr_t frame_lags, float sm_scale_log2,
                                      uintptr_t rope, int rope_center, int rope_dims) {
  if (sizes.size() != 4) throw std::invalid_argument("temporal_attention: sizes are (B, H, Lq, D)");
  xjfast::QueryTiles t{};
  t.q = reinterpret_cast<const void*>(q);
  copy_strides(q_strides, t.sq, 3, "q");
  t.dtype = dtype;
  t.B = sizes[0], t.H = sizes[1], t.Lq = sizes[2], t.D = sizes[3];
  t.first_slot = first_slot, t.unit_T = unit_tokens;
  t.frame_slots = reinterpret_cast<const int32_t*>(frame_slots);
  t.frame_lags = reinterpret_cast<const int32_t*>(frame_lags);
  t.sm_scale_log2 = sm_scale_log2;
  t.rope = reinterpret_cast<const float*>(rope);
  t.rope_center = rope_center, t.rope_dims = rope_dims;
  return t;
}

static void temporal_attention(uintptr_t q, std::vector<int64_t> q_strides, uintptr_t out,
                               std::vector<int64_t> out_strides, uintptr_t lse, int dtype, std::vector<int> sizes,
                               std::vector<uintptr_t> cache, int cache_tokens, int cache_pages, uintptr_t page_table,
                               int n_pages,
                               int n_sinks, std::vector<uintptr_t> keep, int keep_capacity, int keep_count,
                               std::vector<uintptr_t> pass, int unit_tokens, int n_units, uintptr_t private_blocks,
                               int block_tokens, bool causal, uintptr_t frame_slots, uintptr_t frame_lags,
                               int first_slot, float sm_scale_log2, uintptr_t rope, int rope_center, int rope_dims,
                               int core, uintptr_t stream) {
  xjfast::AttentionArgs a{};
  a.qt = query_tiles(q, q_strides, dtype, sizes, first_slot, unit_tokens, frame_slots, frame_lags, sm_scale_log2,
                     rope, rope_center, rope_dims);
  a.out = reinterpret_cast<void*>(out);
  copy_strides(out_strides, a.so, 3, "out");
  a.lse = reinterpret_cast<float*>(lse);
  a.cache = paged_units(cache, cache_tokens, cache_pages, "cache");
  a.page_table = reinterpret_cast<const int32_t*>(page_table);
  a.n_pages = n_pages, a.n_sinks = n_sinks;
  a.keep = paged_units(keep, keep_capacity, 1, "keep");
  a.keep_count = keep_count;
  a.pass = paged_units(pass, unit_tokens, n_units, "pass");
  a.n_units = n_units;
  a.private_blocks = reinterpret_cast<const int8_t*>(private_blocks);
  a.block_tokens = block_tokens, a.causal = causal;
  a.core = core;
  xjfast::temporal_attention(a, reinterpret_cast<cudaStream_t>(stream));
}

static void attention_mass(uintptr_t q, std::vector<int64_t> q_strides, uintptr_t lse, int dtype,
                           std::vector<int> sizes, std::vector<uintptr_t> cache, int cache_tokens, uintptr_t page_table,
                           int table_index, int slot, int window,
                           uintptr_t mass, int unit_tokens, uintptr_t frame_slots, uintptr_t frame_lags,
                           int first_slot, float sm_scale_log2, uintptr_t rope, int rope_center, int rope_dims, int core,
                           uintptr_t stream) {
  xjfast::AttentionMassArgs a{};
  a.qt = query_tiles(q, q_strides, dtype, sizes, first_slot, unit_tokens, frame_slots, frame_lags, sm_scale_log2,
                     rope, rope_center, rope_dims);
  a.lse = reinterpret_cast<const float*>(lse);
  a.cache = paged_units(cache, cache_tokens, 0, "cache");  // (the mass kernel uses no tensor map)
  a.page_table = reinterpret_cast<const int32_t*>(page_table);
  a.table_index = table_index, a.slot = slot, a.window = window;
  a.mass = reinterpret_cast<int64_t*>(mass);
  a.core = core;
  xjfast::attention_mass(a, reinterpret_cast<cudaStream_t>(stream));
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "xjfast CUDA kernels and device queries";
  py::register_exception<xjfast::CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.def("device_count", &xjfast::device_count, "CUDA devices visible (0 without a GPU or driver)");
  m.def("compute_capability", &xjfast::compute_capability, py::arg("device"), "(major, minor) of a device");
  m.def("device_name", &xjfast::device_name, py::arg("device"), "the device's name, e.g. 'NVIDIA H100 80GB HBM3'");
  m.def("driver_version", &xjfast::driver_version, "CUDA driver version (e.g. 13000), 0 without a driver");
  m.def("runtime_version", &xjfast::runtime_version, "CUDA runtime version _C was built with");
  m.def("built_archs", &xjfast::built_archs, "GPU architectures whose SASS _C embeds, e.g. ['90a', '100a']");
  m.def("denoise_step", &denoise_step, "the fused sampler step (see xjfast.ops.denoise_step)", py::arg("x_t"),
        py::arg("model_out"), py::arg("coef"), py::arg("x0"), py::arg("x_next"), py::arg("dtype"), py::arg("shape"),
        py::arg("x_strides"), py::arg("model_out_strides"), py::arg("tokens"), py::arg("patch"),
        py::arg("frame_index"), py::arg("frame_index_ptr"), py::arg("seed"), py::arg("stream"));
  m.def("kv_cache_commit", &kv_cache_commit, "quantize frames into cache pages (see xjfast.ops.kv_cache_commit)",
        py::arg("k"), py::arg("v"), py::arg("k_strides"), py::arg("v_strides"), py::arg("page_ids"),
        py::arg("k_pages"), py::arg("v_pages"), py::arg("k_scale"), py::arg("k_mean"), py::arg("v_scale"),
        py::arg("input_dtype"), py::arg("storage_dtype"), py::arg("sizes"), py::arg("stream"));
  m.def("kv_cache_compact", &kv_cache_compact,
        "merge an evicted page's selected tokens into the keep buffer (see xjfast.ops.kv_cache_compact)",
        py::arg("keep"), py::arg("page"), py::arg("top"), py::arg("storage_dtype"), py::arg("sizes"),
        py::arg("keep_count"), py::arg("count"), py::arg("stream"));
  m.def("temporal_attention", &temporal_attention,
        "FP8 attention over paged key units (see xjfast.ops.temporal_attention)", py::arg("q"), py::arg("q_strides"),
        py::arg("out"), py::arg("out_strides"), py::arg("lse"), py::arg("dtype"), py::arg("sizes"), py::arg("cache"),
        py::arg("cache_tokens"), py::arg("cache_pages"), py::arg("page_table"), py::arg("n_pages"), py::arg("n_sinks"), py::arg("keep"),
        py::arg("keep_capacity"), py::arg("keep_count"), py::arg("pass_units"), py::arg("unit_tokens"),
        py::arg("n_units"), py::arg("private_blocks"), py::arg("block_tokens"), py::arg("causal"),
        py::arg("frame_slots"), py::arg("frame_lags"), py::arg("first_slot"), py::arg("sm_scale_log2"),
        py::arg("rope"), py::arg("rope_center"), py::arg("rope_dims"), py::arg("core"), py::arg("stream"));
  m.def("attention_mass", &attention_mass, "attention mass of one cached page's keys, from the LSE",
        py::arg("q"), py::arg("q_strides"), py::arg("lse"), py::arg("dtype"), py::arg("sizes"), py::arg("cache"),
        py::arg("cache_tokens"), py::arg("page_table"), py::arg("table_index"), py::arg("slot"), py::arg("window"),
        py::arg("mass"), py::arg("unit_tokens"), py::arg("frame_slots"), py::arg("frame_lags"), py::arg("first_slot"),
        py::arg("sm_scale_log2"), py::arg("rope"), py::arg("rope_center"), py::arg("rope_dims"), py::arg("core"),
        py::arg("stream"));
  m.attr("attention_block_n") = xjfast::kAttentionBlockN;
  m.attr("attention_cores") = py::dict(py::arg("auto") = static_cast<int>(xjfast::kCoreAuto),
                                       py::arg("mma") = static_cast<int>(xjfast::kCoreMmaSync),
                                       py::arg("wgmma") = static_cast<int>(xjfast::kCoreWgmma),
                                       py::arg("ws") = static_cast<int>(xjfast::kCoreWs));
}
