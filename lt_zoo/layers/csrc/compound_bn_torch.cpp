// The CPU kernel of lt_zoo::cbn_cpp_eval_running in C++: the eval forward of Compound BN from the running
// state, as lt_zoo::cbn_native_eval_running computes it in Python (lt_zoo/layers/compound_bn_ops.py),
// without the Python between the dispatcher and the native pass.  A compiled ResNet-32 calls it 31 times
// per eval forward; on a map too small for the pass to matter the Python kernel costs 2.4x this one per
// call (25.6 us against 10.6 us on a 2x64x2x2 map, benchmarks/results/cbn_op_overhead.md).
//
// Built on first use by lt_zoo/layers/compound_bn_torch.py with torch.utils.cpp_extension (torch headers,
// ninja).  The schema, its flexible-layout tag and the fake implementation are defined in Python
// (compound_bn_ops.py); this file only registers the CPU kernel.  The pass itself stays in the library
// of csrc/compound_bn_cpu.cpp (no torch headers), whose entry points lt_zoo::cbn_cpp_set_library resolves
// once by path: the same library, already loaded by compound_bn_native.py, so both call the same code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

// cbn_eval_running_<f32|f64> of csrc/compound_bn_cpu.cpp
template <typename S>
using EvalRunning = void (*)(const S* x, int64_t n, int64_t c, int64_t l, int cl, const S* prior, const S* mean,
                             const S* var, const S* weight, const S* bias, int64_t m, S eps, S temperature, int mn,
                             S* out, int nt);

EvalRunning<float> eval_f32 = nullptr;
EvalRunning<double> eval_f64 = nullptr;

void set_library(std::string path) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(handle, "lt_zoo: cannot open the native CBN library ", path, ": ", dlerror());
    auto f32 = reinterpret_cast<EvalRunning<float>>(dlsym(handle, "cbn_eval_running_f32"));
    auto f64 = reinterpret_cast<EvalRunning<double>>(dlsym(handle, "cbn_eval_running_f64"));
    TORCH_CHECK(f32 && f64, "lt_zoo: ", path, " lacks cbn_eval_running_f32/f64");
    eval_f32 = f32;
    eval_f64 = f64;
}

// the map in a layout the pass reads (contiguous or channels_last), as compound_bn_ops._standard
at::Tensor standard(const at::Tensor& x) {
    return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
}

// a statistic in the map's dtype, contiguous, as compound_bn_native._small
at::Tensor small(const at::Tensor& t, const at::Tensor& like) {
    return t.scalar_type() == like.scalar_type() && t.is_contiguous() ? t : t.to(like.scalar_type()).contiguous();
}

template <typename S>
void run(EvalRunning<S> fn, const at::Tensor& x, const at::Tensor& prior, const at::Tensor& mean,
         const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias, double eps, double temperature,
         bool mn, at::Tensor& out) {
    const at::Tensor p = small(prior, x), mu = small(mean, x), v = small(var, x), w = small(weight, x),
                     b = small(bias, x);
    fn(x.data_ptr<S>(), x.size(0), x.size(1), x.size(2) * x.size(3), x.is_contiguous() ? 0 : 1, p.data_ptr<S>(),
       mu.data_ptr<S>(), v.data_ptr<S>(), w.data_ptr<S>(), b.data_ptr<S>(), p.size(0), static_cast<S>(eps),
       static_cast<S>(temperature), mn ? 1 : 0, out.data_ptr<S>(), std::max(1, at::get_num_threads()));
}

// Eval output (N, C, H, W) in x's strides from the running state: prior (M,), mean, var (M, C), weight,
// bias (M, C); eps, temperature and mn (combine == 'mn') as CompoundBatchNorm2d's.  No gradient.
at::Tensor eval_running(const at::Tensor& x, const at::Tensor& prior, const at::Tensor& mean, const at::Tensor& var,
                        const at::Tensor& weight, const at::Tensor& bias, double eps, double temperature, bool mn) {
    TORCH_CHECK(eval_f32 && eval_f64, "lt_zoo::cbn_cpp_eval_running: call lt_zoo::cbn_cpp_set_library first");
    TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                "lt_zoo::cbn_cpp_eval_running: expected a 4-D float32/float64 map, got ", x.dim(), "-D ",
                x.scalar_type());
    const at::Tensor xs = standard(x);
    at::Tensor out = at::empty_like(xs);
    if (xs.scalar_type() == at::kFloat)
        run<float>(eval_f32, xs, prior, mean, var, weight, bias, eps, temperature, mn, out);
    else
        run<double>(eval_f64, xs, prior, mean, var, weight, bias, eps, temperature, mn, out);
    // the strides the fake implementation promises (empty_like(x)), as compound_bn_ops._layout_of
    return out.strides() == x.strides() ? out : at::empty_like(x).copy_(out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lt_zoo, m) {
    m.def("cbn_cpp_set_library(str path) -> ()", &set_library);
}

TORCH_LIBRARY_IMPL(lt_zoo, CPU, m) {
    m.impl("cbn_cpp_eval_running", &eval_running);
}
