// Host glue of the CUDA ops: argument checks (each TORCH_CHECK says what was wrong and what was
// expected), output allocation, the launch on torch's current stream, and the registration as
// torch.ops.fastmam_cuda.*. The kernels live in *.cu behind the plain interface of kernels.h.
//
// The device is set with the generic c10::DeviceGuard (which dispatches to the CUDA guard that
// libc10_cuda registers) rather than c10::cuda::CUDAGuard: that header drags in the caching
// allocator's globals, and without them this file's object links and loads into a CPU-only torch,
// which tests/test_csrc_build.py uses to check the schemas on machines without a GPU.
//
// Python wrappers with the same validation as the other backends, the fake (meta) implementations
// for torch.compile, and the routing of unsupported cases are in fastmam/ops/_cuda.py.
#ifdef TORCH_EXTENSION_NAME
// Built by setup.py as the Python module fastmam._C; Python.h goes first, as Python requires.
#include <Python.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace fastmam {
namespace {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// `float[]?` in a schema. (c10::OptionalArrayRef<double> compiles but fails schema inference when the
// library loads.)
using OptionalStats = std::optional<at::ArrayRef<double>>;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kByte:
      return DType::kUInt8;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "fastmam_cuda: unsupported dtype ", t);
  }
}

struct Geometry {
  int64_t batch, frames, height, width, channels;
};

// Checks a clip against its layout and tiling; returns its (B, T, H, W, C).
Geometry check_clip(const char* op, const char* name, const at::Tensor& clip, c10::string_view layout,
                    int64_t tubelet, int64_t patch) {
  TORCH_CHECK(layout == "BTHWC" || layout == "BCTHW", op, ": layout must be 'BTHWC' (uint8 frames) or 'BCTHW' ",
              "(VideoMAE's normalized float clips), got '", layout, "'");
  TORCH_CHECK(clip.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", clip.device(),
              "; use backend='reference' for CPU tensors");
  TORCH_CHECK(clip.dim() == 5, op, ": ", name, " must be 5-D (", layout, "), got shape ", clip.sizes());
  const bool bthwc = layout == "BTHWC";
  if (bthwc) {
    TORCH_CHECK(clip.scalar_type() == at::kByte, op, ": a BTHWC ", name, " must be uint8 (raw frames), got ",
                clip.scalar_type(), "; pass normalized float clips as (B, C, T, H, W) with layout='BCTHW'");
  } else {
    const auto t = clip.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": a BCTHW ", name,
                " must be float32, float16 or bfloat16, got ", t,
                "; fastmam.ops routes other float clips to the Triton or reference backend");
  }
  const Geometry g = bthwc ? Geometry{clip.size(0), clip.size(1), clip.size(2), clip.size(3), clip.size(4)}
                          : Geometry{clip.size(0), clip.size(2), clip.size(3), clip.size(4), clip.size(1)};
  TORCH_CHECK(tubelet >= 1 && patch >= 1, op, ": tubelet and patch must be >= 1, got tubelet=", tubelet,
              ", patch=", patch);
  TORCH_CHECK(g.frames % tubelet == 0 && g.height % patch == 0 && g.width % patch == 0, op, ": ", name, " of T=",
              g.frames, ", H=", g.height, ", W=", g.width, " does not tile into tubelets of ", tubelet, " frames and ",
              patch, "x", patch, " patches; expected T % tubelet == H % patch == W % patch == 0");
  TORCH_CHECK(g.channels >= 1 && g.channels <= kMaxChannels, op, ": ", name, " has ", g.channels,
              " channels; the CUDA kernels take 1 to ", kMaxChannels);
  TORCH_CHECK(g.batch <= kMaxInt32, op, ": batch ", g.batch, " exceeds the CUDA grid limit of ", kMaxInt32);
  TORCH_CHECK(tubelet * patch * patch * g.channels <= kMaxInt32, op, ": a patch vector of ", tubelet, "x", patch,
              "x", patch, "x", g.channels, " elements exceeds 2^31 - 1");
  return g;
}

// The clip seen in (B, T, H, W, C) order: BCTHW clips get their strides permuted, no copy.
ClipView clip_view(const at::Tensor& clip, c10::string_view layout, const Geometry& g) {
  ClipView v{};
  v.data = clip.data_ptr();
  v.dtype = dtype_of(clip.scalar_type());
  const int64_t sizes[5] = {g.batch, g.frames, g.height, g.width, g.channels};
  const int dims[5] = {0, 1, 2, 3, 4};
  const int permuted[5] = {0, 2, 3, 4, 1};  // BCTHW dims in BTHWC order
  const int* order = layout == "BTHWC" ? dims : permuted;
  for (int i = 0; i < 5; ++i) {
    v.size[i] = sizes[i];
    v.stride[i] = clip.stride(order[i]);
  }
  return v;
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& clip) {
  TORCH_CHECK(t.device() == clip.device(), op, ": ", name, " is on ", t.device(), " but clip is on ", clip.device(),
              "; expected one device");
}

// Per-channel statistics into the kernel's by-value arrays (fp32, as the references' tensors).
void copy_stats(const char* op, const char* name, at::ArrayRef<double> values, int64_t channels, float* out) {
  TORCH_CHECK(static_cast<int64_t>(values.size()) == channels, op, ": ", name, " must have one value per channel (",
              channels, "), got ", values.size());
  for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<float>(values[c]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tube_mask_gather_cuda(
    const at::Tensor& clip,   // (B, T, H, W, C) uint8 [BTHWC] or (B, C, T, H, W) float [BCTHW]
    const at::Tensor& noise,  // (B, S) floating point
    double ratio, int64_t tubelet, int64_t patch, at::ArrayRef<double> mean, at::ArrayRef<double> stdev,
    at::ScalarType out_dtype, c10::string_view layout) {
  constexpr const char* op = "fastmam_cuda::tube_mask_gather";
  const Geometry g = check_clip(op, "clip", clip, layout, tubelet, patch);
  check_same_device(op, "noise", noise, clip);
  const auto nt = noise.scalar_type();
  TORCH_CHECK(nt == at::kFloat || nt == at::kDouble || nt == at::kHalf || nt == at::kBFloat16, op,
              ": noise must be floating point (e.g. torch.rand), got ", nt);
  const int64_t positions = (g.height / patch) * (g.width / patch);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == g.batch && noise.size(1) == positions, op,
              ": noise must have shape (B=", g.batch, ", S=", positions, ") for tube masking, got ", noise.sizes());
  TORCH_CHECK(positions <= kMaxPositions, op, ": S=", positions, " spatial positions per slice exceed the ",
              kMaxPositions, " that one thread block sorts; fastmam.ops routes such clips to the Triton backend");
  TORCH_CHECK(ratio > 0.0 && ratio < 1.0, op, ": mask ratio must be in (0, 1), got ", ratio);
  // int(ratio * S) as in Python: the same double product, truncated
  const int64_t hidden = static_cast<int64_t>(ratio * static_cast<double>(positions));
  TORCH_CHECK(hidden > 0 && hidden < positions, op, ": mask ratio ", ratio, " hides ", hidden, " of ", positions,
              " positions; it must hide at least one and keep at least one");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);

  TubeMaskGatherArgs args{};
  args.clip = clip_view(clip, layout, g);
  args.tubelet = tubelet;
  args.patch = patch;
  args.noise = noise.data_ptr();
  args.noise_dtype = dtype_of(nt);
  args.noise_stride[0] = noise.stride(0);
  args.noise_stride[1] = noise.stride(1);
  args.keep = positions - hidden;
  if (layout == "BTHWC") {
    copy_stats(op, "mean", mean, g.channels, args.mean);
    copy_stats(op, "std", stdev, g.channels, args.std);
  }
  const int64_t slices = g.frames / tubelet;
  const int64_t nv = slices * args.keep;
  const int64_t nm = slices * hidden;
  const auto opts = clip.options();
  at::Tensor patches = at::empty({g.batch, nv, tubelet * patch * patch * g.channels}, opts.dtype(out_dtype));
  at::Tensor ids_keep = at::empty({g.batch, nv}, opts.dtype(at::kLong));
  at::Tensor ids_masked = at::empty({g.batch, nm}, opts.dtype(at::kLong));
  at::Tensor mask = at::empty({g.batch, slices * positions}, opts.dtype(at::kBool));
  args.patches = patches.data_ptr();
  args.patches_dtype = dtype_of(out_dtype);
  args.ids_keep = ids_keep.data_ptr<int64_t>();
  args.ids_masked = ids_masked.data_ptr<int64_t>();
  args.mask = mask.data_ptr<bool>();

  const c10::DeviceGuard guard(clip.device());
  C10_CUDA_CHECK(tube_mask_gather(args, c10::cuda::getCurrentCUDAStream().stream()));
  return {patches, ids_keep, ids_masked, mask};
}

at::Tensor masked_target_cuda(const char* op, TargetKind kind,
                              const at::Tensor& clip,  // (B, T, H, W, C) uint8 or (B, C, T, H, W) float
                              const at::Tensor& ids,   // (B, M) int64 masked token ids
                              int64_t tubelet, int64_t patch, bool normalize,
                              const std::optional<at::Tensor>& next_clip,  // like clip, dense kind only
                              OptionalStats mean, OptionalStats stdev,
                              c10::string_view layout) {
  const Geometry g = check_clip(op, "clip", clip, layout, tubelet, patch);
  check_same_device(op, "ids_masked", ids, clip);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids_masked must be int64 token ids, got ", ids.scalar_type(),
              "; convert with .long()");
  const int64_t tokens = (g.frames / tubelet) * (g.height / patch) * (g.width / patch);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == g.batch && ids.size(1) <= tokens, op,
              ": ids_masked must have shape (B=", g.batch, ", M <= ", tokens, "), got ", ids.sizes());
  if (kind == TargetKind::kFrameDiff) {
    TORCH_CHECK(tubelet >= 2, op, ": the in-tubelet RGB difference needs tubelet >= 2, got ", tubelet,
                "; pass next_clip for the dense variant");
  }
  if (kind == TargetKind::kNextFrameDiff) {
    const at::Tensor& next = *next_clip;
    check_same_device(op, "next_clip", next, clip);
    TORCH_CHECK(next.sizes() == clip.sizes() && next.scalar_type() == clip.scalar_type(), op,
                ": next_clip must match clip, got ", next.sizes(), " ", next.scalar_type(), ", expected ",
                clip.sizes(), " ", clip.scalar_type());
  }
  const int64_t rows = (kind == TargetKind::kFrameDiff ? tubelet - 1 : tubelet) * patch * patch;
  TORCH_CHECK(!normalize || rows >= 2, op, ": per-patch normalization needs at least 2 values per patch and ",
              "channel, got ", rows);

  MaskedTargetArgs args{};
  args.clip = clip_view(clip, layout, g);
  args.next = kind == TargetKind::kNextFrameDiff ? clip_view(*next_clip, layout, g) : args.clip;
  args.tubelet = tubelet;
  args.patch = patch;
  args.ids = ids.data_ptr<int64_t>();
  args.num_ids = ids.size(1);
  args.ids_stride[0] = ids.stride(0);
  args.ids_stride[1] = ids.stride(1);
  args.kind = kind;
  args.normalize = normalize;
  if (layout == "BCTHW") {
    TORCH_CHECK(mean.has_value() && stdev.has_value(), op,
                ": a normalized BCTHW clip needs the mean and std it was normalized with, to un-normalize");
    copy_stats(op, "mean", *mean, g.channels, args.mean);
    copy_stats(op, "std", *stdev, g.channels, args.std);
  }
  at::Tensor out = at::empty({g.batch, ids.size(1), rows * g.channels}, clip.options().dtype(at::kFloat));
  args.out = out.data_ptr<float>();

  const c10::DeviceGuard guard(clip.device());
  C10_CUDA_CHECK(masked_target(args, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor pixel_target_cuda(const at::Tensor& clip, const at::Tensor& ids_masked, int64_t tubelet, int64_t patch,
                             bool normalize, OptionalStats mean, OptionalStats stdev,
                             c10::string_view layout) {
  return masked_target_cuda("fastmam_cuda::pixel_target", TargetKind::kPixels, clip, ids_masked, tubelet, patch,
                            normalize, std::nullopt, mean, stdev, layout);
}

at::Tensor rgb_diff_target_cuda(const at::Tensor& clip, const at::Tensor& ids_masked, int64_t tubelet, int64_t patch,
                                bool normalize, const std::optional<at::Tensor>& next_clip,
                                OptionalStats mean, OptionalStats stdev,
                                c10::string_view layout) {
  const TargetKind kind = next_clip.has_value() ? TargetKind::kNextFrameDiff : TargetKind::kFrameDiff;
  return masked_target_cuda("fastmam_cuda::rgb_diff_target", kind, clip, ids_masked, tubelet, patch, normalize,
                            next_clip, mean, stdev, layout);
}

}  // namespace
}  // namespace fastmam

// The schemas mirror fastmam.ops' Python signatures (argument names, order and defaults), so the
// ops read the same from Python (torch.ops.fastmam_cuda.*) and from C++.
TORCH_LIBRARY(fastmam_cuda, m) {
  m.def(
      "tube_mask_gather(Tensor clip, Tensor noise, float ratio, int tubelet, int patch, float[] mean, "
      "float[] std, ScalarType out_dtype, str layout=\"BTHWC\") "
      "-> (Tensor patches, Tensor ids_keep, Tensor ids_masked, Tensor mask)");
  m.def(
      "pixel_target(Tensor clip, Tensor ids_masked, int tubelet, int patch, bool normalize=True, "
      "float[]? mean=None, float[]? std=None, str layout=\"BTHWC\") -> Tensor");
  m.def(
      "rgb_diff_target(Tensor clip, Tensor ids_masked, int tubelet, int patch, bool normalize=False, "
      "Tensor? next_clip=None, float[]? mean=None, float[]? std=None, str layout=\"BTHWC\") -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmam_cuda, CUDA, m) {
  m.impl("tube_mask_gather", &fastmam::tube_mask_gather_cuda);
  m.impl("pixel_target", &fastmam::pixel_target_cuda);
  m.impl("rgb_diff_target", &fastmam::rgb_diff_target_cuda);
}

#ifdef TORCH_EXTENSION_NAME
// `import fastmam._C` loads this library, which runs the registrations above; the module itself is
// empty (the ops are reached as torch.ops.fastmam_cuda.*). A CMake build defines no
// TORCH_EXTENSION_NAME and needs no Python: load it with torch.ops.load_library.
#define FASTMAM_CONCAT_(a, b) a##b
#define FASTMAM_CONCAT(a, b) FASTMAM_CONCAT_(a, b)
#define FASTMAM_STRING_(x) #x
#define FASTMAM_STRING(x) FASTMAM_STRING_(x)

PyMODINIT_FUNC FASTMAM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      FASTMAM_STRING(TORCH_EXTENSION_NAME),
      "fastmam's CUDA kernels; the ops are registered as torch.ops.fastmam_cuda.*",
      -1,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  return PyModule_Create(&module);
}
#endif
