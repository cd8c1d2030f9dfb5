// oneDNN convolutions for XLA's CPU backend, as XLA FFI custom calls (mdjax/core/onednn.py).
//
// Three handlers, one per pass of a 2-D float32 convolution in mdjax's layouts (input and output
// NHWC, kernel HWIO, no dilation, no groups):
//   mdjax_onednn_conv          y  = conv(x, w)
//   mdjax_onednn_conv_dx       dx = the input gradient, from dy and w
//   mdjax_onednn_conv_dw       dw = the kernel gradient, from x and dy
// Attributes: `strides` [sh, sw] and `padding` [top, bottom, left, right].
//
// Why written here: XLA's CPU backend runs convolutions on Eigen or YNNPACK, and oneDNN's NHWC
// kernels (PyTorch's channels_last CPU path) run WRN-16-4's 3x3 convolutions in 1.27 s per
// gradient against Eigen's 1.71 s (benchmarks/RESULTS.md). No package exposes oneDNN to XLA, so
// these handlers do, through XLA's stable FFI.
//
// Activations stay NHWC, as PyTorch's channels_last does; the kernel is reordered between HWIO and
// the blocked layout oneDNN's primitive asks for (`format_tag::any`): a few MB at most, once per
// call. Primitives are built once per shape and pass, and cached (oneDNN builds them slowly, tens
// of microseconds to milliseconds); a built primitive is safe to run from several threads at
// once with a user-provided scratchpad, which each thread keeps for itself (`Scratch`).

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;

enum class Pass { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

struct Geometry {
  int64_t n, h, w, c;     // input NHWC
  int64_t kh, kw, o;      // kernel HWIO (o output channels)
  int64_t ho, wo;         // output spatial size
  int64_t sh, sw;         // strides
  int64_t pt, pb, pl, pr; // padding

  std::string Key(Pass pass) const {
    std::string key;
    for (int64_t v : {static_cast<int64_t>(pass), n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb,
                      pl, pr}) {
      key += std::to_string(v);
      key += ',';
    }
    return key;
  }
  Dims Src() const { return {n, c, h, w}; }
  Dims Weights() const { return {o, c, kh, kw}; }
  Dims Dst() const { return {n, o, ho, wo}; }
  Dims Strides() const { return {sh, sw}; }
  Dims PadLo() const { return {pt, pl}; }
  Dims PadHi() const { return {pb, pr}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One built pass: its primitive, and the kernel's layout as the primitive wants it.
struct Plan {
  dnnl::primitive primitive;
  memory::desc weights;  // the primitive's kernel layout
  bool reorder = false;  // whether that differs from HWIO
  // HWIO -> `weights` for the forward pass and dX, `weights` -> HWIO for dW.
  dnnl::reorder weights_reorder;
  memory::desc scratchpad;
};

memory::desc Md(const Dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::shared_ptr<Plan> Build(const Geometry& g, Pass pass) {
  auto plan = std::make_shared<Plan>();
  dnnl::primitive_attr attr = UserScratchpad();
  // The backward passes are described with the forward one as their hint (oneDNN requires it).
  dnnl::convolution_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Md(g.Src(), Tag::nhwc), Md(g.Weights(), Tag::any), Md(g.Dst(), Tag::nhwc), g.Strides(),
      g.PadLo(), g.PadHi(), attr);
  if (pass == Pass::kForward) {
    plan->primitive = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (pass == Pass::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Md(g.Src(), Tag::nhwc),
        Md(g.Weights(), Tag::any), Md(g.Dst(), Tag::nhwc), g.Strides(), g.PadLo(), g.PadHi(), fwd,
        attr);
    plan->primitive = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Md(g.Src(), Tag::nhwc),
        Md(g.Weights(), Tag::any), Md(g.Dst(), Tag::nhwc), g.Strides(), g.PadLo(), g.PadHi(), fwd,
        attr);
    plan->primitive = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  }
  memory::desc user = Md(g.Weights(), Tag::hwio);
  plan->reorder = plan->weights != user;
  if (plan->reorder) {
    bool to_user = pass == Pass::kWeightGrad;
    plan->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), to_user ? plan->weights : user, Engine(), to_user ? user : plan->weights));
  }
  return plan;
}

std::shared_ptr<Plan> Cached(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  std::string key = g.Key(pass);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto plan = Build(g, pass);  // outside the lock: building is slow, and racing builds agree
  std::lock_guard<std::mutex> lock(mutex);
  return cache->emplace(key, plan).first->second;
}

// 64-byte aligned bytes for a call's scratchpad or reordered kernel, kept per thread and grown as
// needed: a fresh allocation of several MB per call pays its page faults every time (the calls of
// a WRN-16-4 step took ~80 ms more than their kernels when each allocated its own). A thread runs
// one custom call at a time, so reusing its buffers across calls is safe.
class Scratch {
 public:
  char* Get(size_t bytes) {
    if (bytes > size_) {
      Release();
      data_ = static_cast<char*>(operator new[](bytes, std::align_val_t(64)));
      size_ = bytes;
    }
    return data_;
  }
  ~Scratch() { Release(); }

 private:
  void Release() {
    if (data_) operator delete[](data_, std::align_val_t(64));
    data_ = nullptr;
    size_ = 0;
  }
  char* data_ = nullptr;
  size_t size_ = 0;
};

thread_local Scratch scratchpad_buffer, weights_buffer;

ffi::Error Check(const Geometry& g) {
  if (g.sh < 1 || g.sw < 1 || g.pt < 0 || g.pb < 0 || g.pl < 0 || g.pr < 0 ||
      g.ho != (g.h + g.pt + g.pb - g.kh) / g.sh + 1 ||
      g.wo != (g.w + g.pl + g.pr - g.kw) / g.sw + 1) {
    return ffi::Error::InvalidArgument(
        "mdjax_onednn: the shapes, strides and padding do not describe one convolution");
  }
  return ffi::Error::Success();
}

using Dimensions = ffi::Buffer<ffi::F32, 4>::Dimensions;

Geometry Describe(Dimensions x, Dimensions w, Dimensions y,
                  ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                  strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
}

// Runs `pass` on the NHWC input-side array `x` (x, or dx for the input gradient), the HWIO kernel
// `w` (w, or dw for the weight gradient) and the NHWC output-side array `y` (y, or dy).
ffi::Error Run(Pass pass, const Geometry& g, void* x, void* w, void* y) {
  if (ffi::Error error = Check(g); error.failure()) return error;
  try {
    std::shared_ptr<Plan> plan = Cached(g, pass);
    dnnl::stream stream(Engine());
    memory user_w(Md(g.Weights(), Tag::hwio), Engine(), w);
    memory prim_w = user_w;
    if (plan->reorder) {
      prim_w = memory(plan->weights, Engine(), weights_buffer.Get(plan->weights.get_size()));
    }
    if (plan->reorder && pass != Pass::kWeightGrad) {
      plan->weights_reorder.execute(stream, user_w, prim_w);
    }
    memory pad(plan->scratchpad, Engine(), scratchpad_buffer.Get(plan->scratchpad.get_size()));
    memory src(Md(g.Src(), Tag::nhwc), Engine(), x);
    memory dst(Md(g.Dst(), Tag::nhwc), Engine(), y);
    if (pass == Pass::kForward) {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                       {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else if (pass == Pass::kInputGrad) {
      plan->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w},
                                       {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                                       {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, pad}});
      if (plan->reorder) plan->weights_reorder.execute(stream, prim_w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("mdjax_onednn: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Out = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Forward(F32 x, F32 w, F32Out y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding) {
  Geometry g = Describe(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding);
  return Run(Pass::kForward, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(F32 dy, F32 w, F32Out dx, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> padding) {
  Geometry g = Describe(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding);
  return Run(Pass::kInputGrad, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error WeightGrad(F32 x, F32 dy, F32Out dw, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  Geometry g = Describe(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding);
  return Run(Pass::kWeightGrad, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// Every handler: two float32 4-D operands, one float32 4-D result, and the two attributes.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MdjaxOnednnConv, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MdjaxOnednnConvDx, InputGrad, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MdjaxOnednnConvDw, WeightGrad, Binding());
