// oneDNN convolutions for saner_jax.cpu_conv, called by XLA:CPU through the
// XLA FFI. Three handlers share one geometry (NHWC images, HWIO kernels,
// float32, 2-D, explicit padding, no dilation or groups):
//
//   saner_onednn_conv_forward         y  = conv(x, w)
//   saner_onednn_conv_backward_data   dx = d conv / dx applied to dy
//   saner_onednn_conv_backward_weights dw = d conv / dw applied to dy
//
// Images stay in XLA's NHWC buffers, which oneDNN reads and writes in place.
// Kernels are reordered between XLA's HWIO and the blocked layout that
// oneDNN's fastest kernels want; they are small (at most a few MB), so the
// reorder costs little next to the convolution. Primitives are built once per
// geometry and cached. XLA may run two of these calls at once on its threads,
// and Debian's oneDNN (OpenMP runtime) is built without concurrent execution:
// its library-managed scratchpad is global. So every primitive takes a
// user-managed scratchpad, one per calling thread.

#include "dnnl.hpp"  // first: a missing oneDNN is the first error the compiler reports

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR != 2
#error "saner_jax's cpu_conv is written against the oneDNN 2.x API (Debian's libdnnl-dev 2.x)"
#endif

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using F32 = ffi::Buffer<ffi::F32>;

// Everything that determines the primitives: N, H, W, C, kh, kw, O,
// strides (2), padding top, bottom, left, right.
using Geometry = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A reorder between two layouts of one tensor; a no-op when they are equal.
struct Reorder {
  Reorder() = default;
  Reorder(const memory::desc& from, const memory::desc& to, const dnnl::primitive_attr& attr) : from(from), to(to) {
    if (!(from == to)) {
      pd = dnnl::reorder::primitive_desc(Engine(), from, Engine(), to, attr);
      primitive = dnnl::reorder(pd);
    }
  }
  bool needed() const { return !(from == to); }
  memory::desc from, to;
  dnnl::reorder::primitive_desc pd;
  dnnl::reorder primitive;
};

struct Primitives {
  memory::desc images, outputs, hwio_kernel;
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc backward_data_pd;
  dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
  // HWIO -> the kernel layout of the forward and backward-data primitives,
  // and the kernel-gradient layout of the backward-weights one -> HWIO.
  Reorder kernel_to_forward, kernel_to_backward_data, kernel_gradient_to_hwio;
};

std::unique_ptr<Primitives> Build(const Geometry& g) {
  auto [n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr] = g;
  const int64_t oh = (h + pt + pb - kh) / sh + 1, ow = (w + pl + pr - kw) / sw + 1;
  auto p = std::make_unique<Primitives>();
  p->images = memory::desc({n, c, h, w}, memory::data_type::f32, Tag::nhwc);
  p->outputs = memory::desc({n, o, oh, ow}, memory::data_type::f32, Tag::nhwc);
  p->hwio_kernel = memory::desc({o, c, kh, kw}, memory::data_type::f32, Tag::hwio);
  // Tag::any lets oneDNN choose the kernel layout of its fastest implementation.
  const memory::desc any_kernel({o, c, kh, kw}, memory::data_type::f32, Tag::any);
  const memory::dims strides{sh, sw}, pad_low{pt, pl}, pad_high{pb, pr};
  const auto algorithm = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algorithm, p->images,
                                      any_kernel, p->outputs, strides, pad_low, pad_high),
      attr, Engine());
  p->backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      dnnl::convolution_backward_data::desc(algorithm, p->images, any_kernel, p->outputs, strides,
                                            pad_low, pad_high),
      attr, Engine(), p->forward_pd);
  p->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(algorithm, p->images, any_kernel, p->outputs,
                                               strides, pad_low, pad_high),
      attr, Engine(), p->forward_pd);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->backward_data = dnnl::convolution_backward_data(p->backward_data_pd);
  p->backward_weights = dnnl::convolution_backward_weights(p->backward_weights_pd);
  p->kernel_to_forward = Reorder(p->hwio_kernel, p->forward_pd.weights_desc(), attr);
  p->kernel_to_backward_data = Reorder(p->hwio_kernel, p->backward_data_pd.weights_desc(), attr);
  p->kernel_gradient_to_hwio = Reorder(p->backward_weights_pd.diff_weights_desc(), p->hwio_kernel, attr);
  return p;
}

const Primitives& Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[g];
  if (!slot) slot = Build(g);
  return *slot;  // map nodes never move and are never erased
}

// This thread's scratchpad, at least `bytes` long. Kept between calls: a
// fresh one per call costs page faults on every convolution.
void* ThreadScratchpad(size_t bytes) {
  thread_local std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    capacity = (bytes + 63) / 64 * 64;
    buffer.reset(std::aligned_alloc(64, capacity));
    if (!buffer) throw std::bad_alloc();
  }
  return buffer.get();
}

// Runs `primitive` on this thread's stream with this thread's scratchpad
// (calls on one thread run one after another).
template <typename PrimitiveDesc>
void Run(const dnnl::primitive& primitive, const PrimitiveDesc& pd, dnnl::stream& stream,
         std::unordered_map<int, memory> args) {
  const memory::desc desc = pd.scratchpad_desc();
  memory scratchpad(desc, Engine(), ThreadScratchpad(std::max<size_t>(desc.get_size(), 1)));
  args.insert({DNNL_ARG_SCRATCHPAD, scratchpad});
  primitive.execute(stream, args);
  stream.wait();  // before `scratchpad` and the caller's buffers go
}

void Apply(const Reorder& reorder, dnnl::stream& stream, memory& from, memory& to) {
  Run(reorder.primitive, reorder.pd, stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// The kernel in XLA's HWIO buffer `data`, in the layout `reorder` leads to.
memory KernelIn(const Reorder& reorder, float* data) {
  memory hwio(reorder.from, Engine(), data);
  if (!reorder.needed()) return hwio;
  memory blocked(reorder.to, Engine());
  Apply(reorder, Stream(), hwio, blocked);
  return blocked;
}

template <typename Buffer>
bool IsRank4(const Buffer& b) {
  return b.dimensions().size() == 4;
}

// The geometry of a convolution of images shaped like `images` (N, H, W, C)
// with a kernel shaped like `kernel` (kh, kw, C, O); an error unless
// `outputs` is shaped (N, Ho, Wo, O) as that convolution's output.
template <typename Images, typename Kernel, typename Outputs>
ffi::ErrorOr<Geometry> Describe(const Images& images, const Kernel& kernel, const Outputs& outputs,
                                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!IsRank4(images) || !IsRank4(kernel) || !IsRank4(outputs)) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument("saner_onednn_conv: operands must be rank 4 (NHWC, HWIO, NHWC)"));
  }
  auto x = images.dimensions(), k = kernel.dimensions(), y = outputs.dimensions();
  if (sh < 1 || sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0 || k[2] != x[3] ||
      x[1] + pt + pb < k[0] || x[2] + pl + pr < k[1]) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument("saner_onednn_conv: unsupported geometry"));
  }
  const int64_t oh = (x[1] + pt + pb - k[0]) / sh + 1, ow = (x[2] + pl + pr - k[1]) / sw + 1;
  if (y[0] != x[0] || y[1] != oh || y[2] != ow || y[3] != k[3]) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument("saner_onednn_conv: output shape does not match the geometry"));
  }
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], sh, sw, pt, pb, pl, pr};
}

template <typename Fn>
ffi::Error Guarded(const ffi::ErrorOr<Geometry>& geometry, Fn fn) {
  if (geometry.has_error()) return geometry.error();
  try {
    fn(Get(geometry.value()));
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "saner_onednn_conv: unknown exception");
  }
}

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded(Describe(x, w, *y, sh, sw, pt, pb, pl, pr), [&](const Primitives& p) {
    memory src(p.images, Engine(), x.typed_data());
    memory dst(p.outputs, Engine(), y->typed_data());
    memory kernel = KernelIn(p.kernel_to_forward, w.typed_data());
    Run(p.forward, p.forward_pd, Stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded(Describe(*dx, w, dy, sh, sw, pt, pb, pl, pr), [&](const Primitives& p) {
    memory diff_dst(p.outputs, Engine(), dy.typed_data());
    memory diff_src(p.images, Engine(), dx->typed_data());
    memory kernel = KernelIn(p.kernel_to_backward_data, w.typed_data());
    Run(p.backward_data, p.backward_data_pd, Stream(),
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded(Describe(x, *dw, dy, sh, sw, pt, pb, pl, pr), [&](const Primitives& p) {
    memory src(p.images, Engine(), x.typed_data());
    memory diff_dst(p.outputs, Engine(), dy.typed_data());
    memory hwio(p.hwio_kernel, Engine(), dw->typed_data());
    const Reorder& out = p.kernel_gradient_to_hwio;
    memory diff_kernel = out.needed() ? memory(out.from, Engine()) : hwio;
    Run(p.backward_weights, p.backward_weights_pd, Stream(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
    if (out.needed()) Apply(out, Stream(), diff_kernel, hwio);
  });
}

}  // namespace

#define SANER_GEOMETRY_ATTRS                                                         \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")     \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanerOnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() SANER_GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SanerOnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() SANER_GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SanerOnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() SANER_GEOMETRY_ATTRS);
