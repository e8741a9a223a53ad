// The interface between the host glue (ops.cpp: torch tensors, checks, op registration) and the CUDA
// kernels (*.cu). Plain C++17 and the CUDA runtime API only: the kernels compile without torch's
// headers, which keeps nvcc fast (torch's headers alone cost ~35 s per architecture) and keeps the
// kernels usable from other C++ code.
//
// Semantics are those of the pure-PyTorch references in fastmam/ops (masking.py, gather.py,
// targets.py); see csrc/README.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastmam {

enum class DType : int32_t { kUInt8, kFloat16, kBFloat16, kFloat32, kFloat64 };

// Per-channel statistics travel by value in the kernel arguments (no host-to-device copy per call,
// so no hidden synchronization): this bounds the number of channels.
inline constexpr int kMaxChannels = 16;

// tube_mask_gather sorts one sample's noise inside one thread block (CUB BlockRadixSort, 256 threads
// x 4 keys): at most this many spatial positions per time slice. 224x224 frames with 16x16 patches
// have 196; 512x512 frames 1024.
inline constexpr int64_t kMaxPositions = 1024;

// A clip addressed in (B, T, H, W, C) order through its strides, whatever its layout in memory:
// uint8 BTHWC frames from a loader, or VideoMAE's normalized float (B, C, T, H, W) with its strides
// permuted into this order. Non-contiguous clips need no copy.
struct ClipView {
  const void* data;  // (B, T, H, W, C) elements of `dtype`, at `stride`
  DType dtype;
  int64_t size[5];    // B, T, H, W, C
  int64_t stride[5];  // in elements, (B, T, H, W, C) order
};

// Tube masking of the noise and the gather of the visible patches, in one launch.
struct TubeMaskGatherArgs {
  ClipView clip;
  int64_t tubelet, patch;  // t frames x p x p pixels per token
  const void* noise;       // (B, S) of `noise_dtype` (floating point), at `noise_stride`; S = (H/p) * (W/p)
  DType noise_dtype;
  int64_t noise_stride[2];
  int64_t keep;  // kept spatial positions per slice: S - int(ratio * S), in [1, S - 1]
  // uint8 clips are normalized as (v / 255 - mean[c]) / std[c]; float clips are only cast
  float mean[kMaxChannels];
  float std[kMaxChannels];
  void* patches;  // (B, Nv, t*p*p*C) of `patches_dtype` (fp32/fp16/bf16), contiguous; Nv = (T/t) * keep
  DType patches_dtype;
  int64_t* ids_keep;    // (B, Nv) contiguous, ascending token ids
  int64_t* ids_masked;  // (B, Nm) contiguous, ascending token ids; Nm = (T/t) * (S - keep)
  bool* mask;           // (B, N) contiguous, true = hidden; N = (T/t) * S
};

// Launches the kernel on `stream`; returns the launch's error (cudaSuccess when B == 0).
cudaError_t tube_mask_gather(const TubeMaskGatherArgs& args, cudaStream_t stream);

enum class TargetKind : int32_t {
  kPixels = 0,         // the t frames of each masked token                          R = t*p*p rows
  kFrameDiff = 1,      // frame f+1 minus frame f inside the tubelet                 R = (t-1)*p*p rows
  kNextFrameDiff = 2,  // dense: next clip's frame f minus this clip's frame f       R = t*p*p rows
};

// Pixel / RGB-difference targets of the masked tokens, fp32, in [0, 1] pixel units before the
// optional per-token, per-channel normalization (v - mean) / (std_unbiased + 1e-6).
struct MaskedTargetArgs {
  ClipView clip;
  ClipView next;  // kNextFrameDiff: the frames right after clip's (same geometry and dtype); else == clip
  int64_t tubelet, patch;
  const int64_t* ids;  // (B, M) masked token ids in [0, N), at `ids_stride`
  int64_t num_ids;     // M
  int64_t ids_stride[2];
  TargetKind kind;
  bool normalize;
  // float clips are un-normalized as v * std[c] + mean[c]; uint8 clips as v / 255
  float mean[kMaxChannels];
  float std[kMaxChannels];
  float* out;  // (B, M, R*C) fp32, contiguous
};

cudaError_t masked_target(const MaskedTargetArgs& args, cudaStream_t stream);

}  // namespace fastmam
