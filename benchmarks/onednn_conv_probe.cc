// Probe for issue 32: one bfloat16 convolution (NHWC input, HWIO kernel, NHWC output) through
// oneDNN as a jax.ffi custom call. Built and timed by benchmarks/onednn_conv_probe.py (needs
// `apt-get install libdnnl-dev`). oneDNN throws dnnl::error; it is returned to XLA as an
// ffi::Error, so a bad shape is a Python exception, not a crashed process.
#include <cstdint>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

static dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

ffi::Error FwdImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::BF16> y,
                   int64_t sh, int64_t sw, int64_t phl, int64_t phh, int64_t pwl, int64_t pwh) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[2] != xd[3]) {
    return ffi::Error::InvalidArgument("onednn_conv_probe: expected x NHWC, w HWIO with w's I == x's C, y NHWC");
  }
  try {
    auto& eng = Engine();
    // oneDNN's logical dimensions are NCHW and OIHW whatever the memory layout.
    memory::dims src{xd[0], xd[3], xd[1], xd[2]}, wei{wd[3], wd[2], wd[0], wd[1]}, dst{yd[0], yd[3], yd[1], yd[2]};
    memory::desc src_md(src, dt::bf16, tag::nhwc), dst_md(dst, dt::bf16, tag::nhwc);
    memory::desc wei_any(wei, dt::bf16, tag::any), wei_user(wei, dt::bf16, tag::hwio);
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                         src_md, wei_any, dst_md, {sh, sw}, {0, 0}, {phl, pwl}, {phh, pwh});
    dnnl::convolution_forward::primitive_desc pd(desc, eng);
    dnnl::stream stream(eng);
    memory src_m(src_md, eng, x.untyped_data()), dst_m(dst_md, eng, y->untyped_data());
    memory wei_m(wei_user, eng, w.untyped_data());
    // The AMX kernel wants its own blocked kernel layout: reorder the (small) HWIO kernel.
    if (pd.weights_desc() != wei_user) {
      memory blocked(pd.weights_desc(), eng);
      dnnl::reorder(wei_m, blocked).execute(stream, wei_m, blocked);
      wei_m = blocked;
    }
    dnnl::convolution_forward(pd).execute(
        stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m}, {DNNL_ARG_DST, dst_m}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv_probe: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("phl")
                                  .Attr<int64_t>("phh")
                                  .Attr<int64_t>("pwl")
                                  .Attr<int64_t>("pwh"));
