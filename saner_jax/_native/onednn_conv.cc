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
// reorder costs little next to the convolution. Primitive descriptors are
// built once per geometry and cached; executing one primitive from several
// threads at once is safe (oneDNN's default scratchpad is per execution).

#include "dnnl.hpp"  // first: a missing oneDNN is the first error the compiler reports

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

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

struct Primitives {
  memory::desc images, outputs, hwio_kernel;
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc backward_data_pd;
  dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
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
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algorithm, p->images,
                                      any_kernel, p->outputs, strides, pad_low, pad_high),
      Engine());
  p->backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      dnnl::convolution_backward_data::desc(algorithm, p->images, any_kernel, p->outputs, strides,
                                            pad_low, pad_high),
      Engine(), p->forward_pd);
  p->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(algorithm, p->images, any_kernel, p->outputs,
                                               strides, pad_low, pad_high),
      Engine(), p->forward_pd);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->backward_data = dnnl::convolution_backward_data(p->backward_data_pd);
  p->backward_weights = dnnl::convolution_backward_weights(p->backward_weights_pd);
  return p;
}

const Primitives& Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[g];
  if (!slot) slot = Build(g);
  return *slot;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// `memory` over `data` in layout `want`, reordered from XLA's HWIO when the
// primitive wants another layout.
memory KernelIn(const Primitives& p, const memory::desc& want, float* data) {
  memory hwio(p.hwio_kernel, Engine(), data);
  if (want == p.hwio_kernel) return hwio;
  memory blocked(want, Engine());
  dnnl::reorder(hwio, blocked).execute(Stream(), hwio, blocked);
  return blocked;
}

// The geometry of a convolution of images shaped like `x` (N, H, W, C).
template <typename Images>
Geometry Describe(const Images& x, int64_t kh, int64_t kw, int64_t o, int64_t sh, int64_t sw,
                  int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto d = x.dimensions();
  return Geometry{d[0], d[1], d[2], d[3], kh, kw, o, sh, sw, pt, pb, pl, pr};
}

template <typename Fn>
ffi::Error Guarded(Fn fn) {
  try {
    fn();
    Stream().wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto k = w.dimensions();
    const Primitives& p = Get(Describe(x, k[0], k[1], k[3], sh, sw, pt, pb, pl, pr));
    memory src(p.images, Engine(), x.typed_data());
    memory dst(p.outputs, Engine(), y->typed_data());
    memory kernel = KernelIn(p, p.forward_pd.weights_desc(), w.typed_data());
    p.forward.execute(Stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst}});
  });
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto k = w.dimensions();
    const Primitives& p = Get(Describe(*dx, k[0], k[1], k[3], sh, sw, pt, pb, pl, pr));
    memory diff_dst(p.outputs, Engine(), dy.typed_data());
    memory diff_src(p.images, Engine(), dx->typed_data());
    memory kernel = KernelIn(p, p.backward_data_pd.weights_desc(), w.typed_data());
    p.backward_data.execute(Stream(), {{DNNL_ARG_DIFF_DST, diff_dst},
                                       {DNNL_ARG_WEIGHTS, kernel},
                                       {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto k = dw->dimensions();
    const Primitives& p = Get(Describe(x, k[0], k[1], k[3], sh, sw, pt, pb, pl, pr));
    memory src(p.images, Engine(), x.typed_data());
    memory diff_dst(p.outputs, Engine(), dy.typed_data());
    memory hwio(p.hwio_kernel, Engine(), dw->typed_data());
    const memory::desc want = p.backward_weights_pd.diff_weights_desc();
    memory diff_kernel = want == p.hwio_kernel ? hwio : memory(want, Engine());
    p.backward_weights.execute(Stream(), {{DNNL_ARG_SRC, src},
                                          {DNNL_ARG_DIFF_DST, diff_dst},
                                          {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
    if (!(want == p.hwio_kernel)) dnnl::reorder(diff_kernel, hwio).execute(Stream(), diff_kernel, hwio);
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
