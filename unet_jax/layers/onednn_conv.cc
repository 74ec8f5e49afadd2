// bfloat16 convolutions on the CPU's matrix units (AMX) through oneDNN, as three jax.ffi
// targets (issue 32): the forward pass and its two gradients, NHWC activations, HWIO
// kernels, no groups, no dilation. Built and registered by unet_jax/layers/onednn.py
// (needs g++ and Debian's libdnnl-dev, oneDNN 2.x). oneDNN's own errors (dnnl::error) and
// shape mismatches are returned to XLA as ffi::Error: a Python exception, not a crash.
//
//   ConvFwd:        x bf16[N,H,W,C], w bf16[KH,KW,C,O]           -> y bf16[N,OH,OW,O]
//   ConvBwdData:    dy bf16[N,OH,OW,O], w bf16[KH,KW,C,O]        -> dx bf16[N,H,W,C]
//   ConvBwdWeights: x bf16[N,H,W,C], dy bf16[N,OH,OW,O]          -> dw f32[KH,KW,C,O]
//
// Attributes: strides sh, sw; paddings phl, phh (top, bottom), pwl, pwh (left, right).
// The kernel gradient is accumulated and returned in float32 (the parameters' dtype under
// the mixed-precision policy), so no update is rounded to 8 bits of mantissa.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
};

// oneDNN's logical dimensions are NCHW and OIHW whatever the memory layout.
Geometry Geom(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y, int64_t sh,
              int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  return {{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
          {sh, sw},                 {phl, pwl},                 {phh, pwh}};
}

std::string CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                        int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) return "expected 4-D x (NHWC), w (HWIO) and y (NHWC)";
  if (w[2] != x[3]) return "w's input channels (HWIO's I) must equal x's C";
  if (y[0] != x[0] || y[3] != w[3]) return "y must be (N, OH, OW, O) for x's N and w's O";
  if (sh < 1 || sw < 1) return "strides must be positive";
  if (y[1] != (x[1] + phl + phh - w[0]) / sh + 1 || y[2] != (x[2] + pwl + pwh - w[1]) / sw + 1)
    return "y's height and width must be floor((n + p_lo + p_hi - k) / s) + 1";
  return "";
}

// Primitive descriptors are built once per geometry: building one searches oneDNN's
// implementations and JIT-compiles the chosen kernel, which costs more than a small call.
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
  dnnl::convolution_forward fwd_p;
  dnnl::convolution_backward_data bwd_data_p;
  dnnl::convolution_backward_weights bwd_weights_p;
};

const Prims& Get(const Geometry& g) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::unique_ptr<Prims>> cache;
  std::vector<int64_t> key;
  for (const auto* d : {&g.src, &g.wei, &g.dst, &g.strides, &g.pad_l, &g.pad_r}) key.insert(key.end(), d->begin(), d->end());
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto& eng = Engine();
  memory::desc src(g.src, dt::bf16, tag::nhwc), dst(g.dst, dt::bf16, tag::nhwc);
  memory::desc wei_any(g.wei, dt::bf16, tag::any), dwei_any(g.wei, dt::f32, tag::any);
  auto alg = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, alg, src, wei_any, dst, g.strides, {0, 0},
                                      g.pad_l, g.pad_r),
      eng);
  dnnl::convolution_backward_data::primitive_desc bwd_data(
      dnnl::convolution_backward_data::desc(alg, src, wei_any, dst, g.strides, g.pad_l, g.pad_r), eng, fwd);
  dnnl::convolution_backward_weights::primitive_desc bwd_weights(
      dnnl::convolution_backward_weights::desc(alg, src, dwei_any, dst, g.strides, g.pad_l, g.pad_r), eng, fwd);
  auto prims = std::unique_ptr<Prims>(new Prims{fwd, bwd_data, bwd_weights, dnnl::convolution_forward(fwd),
                                                dnnl::convolution_backward_data(bwd_data),
                                                dnnl::convolution_backward_weights(bwd_weights)});
  return *cache.emplace(key, std::move(prims)).first->second;
}

// The user's HWIO kernel in the layout the primitive wants (AMX kernels use a blocked one).
memory KernelIn(const memory::desc& wanted, void* data, const Geometry& g, dnnl::stream& s) {
  auto& eng = Engine();
  memory user(memory::desc(g.wei, dt::bf16, tag::hwio), eng, data);
  if (wanted == user.get_desc()) return user;
  memory blocked(wanted, eng);
  dnnl::reorder(user, blocked).execute(s, user, blocked);
  return blocked;
}

// One call at a time: each already runs on every OpenMP thread, and XLA:CPU may start two
// independent calls (a convolution's two gradients) at once, which crashed oneDNN 2.6's AMX
// kernels in about one run of three here.
std::mutex& ExecMutex() {
  static std::mutex mu;
  return mu;
}

template <typename F>
ffi::Error Guard(const std::string& shape_error, F&& body) {
  if (!shape_error.empty()) return ffi::Error::InvalidArgument("unet_jax onednn_conv: " + shape_error);
  std::lock_guard<std::mutex> lock(ExecMutex());
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("unet_jax onednn_conv: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::BF16> y, int64_t sh,
                   int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  return Guard(CheckShapes(xd, wd, yd, sh, sw, phl, phh, pwl, pwh), [&] {
    auto g = Geom(xd, wd, yd, sh, sw, phl, phh, pwl, pwh);
    const Prims& p = Get(g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory src(p.fwd.src_desc(), eng, x.untyped_data()), dst(p.fwd.dst_desc(), eng, y->untyped_data());
    memory wei = KernelIn(p.fwd.weights_desc(), w.untyped_data(), g, s);
    p.fwd_p.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    s.wait();
  });
}

ffi::Error BwdDataImpl(ffi::Buffer<ffi::BF16> dy, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::BF16> dx,
                       int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  auto xd = dx->dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  return Guard(CheckShapes(xd, wd, yd, sh, sw, phl, phh, pwl, pwh), [&] {
    auto g = Geom(xd, wd, yd, sh, sw, phl, phh, pwl, pwh);
    const Prims& p = Get(g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory diff_dst(p.bwd_data.diff_dst_desc(), eng, dy.untyped_data());
    memory diff_src(p.bwd_data.diff_src_desc(), eng, dx->untyped_data());
    memory wei = KernelIn(p.bwd_data.weights_desc(), w.untyped_data(), g, s);
    p.bwd_data_p.execute(s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_SRC, diff_src}});
    s.wait();
  });
}

ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  auto xd = x.dimensions(), wd = dw->dimensions(), yd = dy.dimensions();
  return Guard(CheckShapes(xd, wd, yd, sh, sw, phl, phh, pwl, pwh), [&] {
    auto g = Geom(xd, wd, yd, sh, sw, phl, phh, pwl, pwh);
    const Prims& p = Get(g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory src(p.bwd_weights.src_desc(), eng, x.untyped_data());
    memory diff_dst(p.bwd_weights.diff_dst_desc(), eng, dy.untyped_data());
    memory user(memory::desc(g.wei, dt::f32, tag::hwio), eng, dw->untyped_data());
    bool direct = p.bwd_weights.diff_weights_desc() == user.get_desc();
    memory diff_wei = direct ? user : memory(p.bwd_weights.diff_weights_desc(), eng);
    p.bwd_weights_p.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
    if (!direct) dnnl::reorder(diff_wei, user).execute(s, diff_wei, user);
    s.wait();
  });
}

}  // namespace

#define UNET_JAX_CONV_ATTRS                                                                                   \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("phl").Attr<int64_t>("phh").Attr<int64_t>("pwl") \
      .Attr<int64_t>("pwh")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>() UNET_JAX_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdData, BwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>() UNET_JAX_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdWeights, BwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() UNET_JAX_CONV_ATTRS);
