// Probe for issue 32: one bfloat16 3x3 convolution through oneDNN as a jax.ffi custom call.
// Built and timed by benchmarks/onednn_conv_probe.py (needs `apt-get install libdnnl-dev`).
#include <cstdint>
#include <unordered_map>
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

static dnnl::engine& Engine() { static dnnl::engine e(dnnl::engine::kind::cpu, 0); return e; }

struct Geo { memory::dims src, wei, dst, strides, dil, plo, phi; };

static Geo MakeGeo(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd,
                   int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  // x NHWC, w HWIO, y NHWC -> oneDNN logical dims NCHW / OIHW
  return Geo{{xd[0], xd[3], xd[1], xd[2]}, {wd[3], wd[2], wd[0], wd[1]}, {yd[0], yd[3], yd[1], yd[2]},
             {sh, sw}, {0, 0}, {phl, pwl}, {phh, pwh}};
}

ffi::Error FwdImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::BF16> y,
                   int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  auto& eng = Engine();
  Geo g = MakeGeo(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, phl, phh, pwl, pwh);
  memory::desc src_md(g.src, dt::bf16, tag::nhwc), dst_md(g.dst, dt::bf16, tag::nhwc);
  memory::desc wei_any(g.wei, dt::bf16, tag::any), wei_user(g.wei, dt::bf16, tag::hwio);
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, src_md, wei_any, dst_md, g.strides, g.dil, g.plo, g.phi);
  auto pd = dnnl::convolution_forward::primitive_desc(d, eng);
  dnnl::stream s(eng);
  memory src(src_md, eng, x.untyped_data()), dst(dst_md, eng, y->untyped_data());
  memory wu(wei_user, eng, w.untyped_data());
  memory wk = wu;
  if (pd.weights_desc() != wei_user) { wk = memory(pd.weights_desc(), eng); dnnl::reorder(wu, wk).execute(s, wu, wk); }
  dnnl::convolution_forward(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wk}, {DNNL_ARG_DST, dst}});
  s.wait();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, FwdImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::BF16>>().Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<ffi::BF16>>()
        .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("phl").Attr<int64_t>("phh").Attr<int64_t>("pwl").Attr<int64_t>("pwh"));
