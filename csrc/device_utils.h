// Device-side helpers shared by the kernels (included by *.cu only): element conversions, the walk
// over the elements of one patch vector, and the launch-size helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fastmam::device {

// Threads per block of every kernel here: 8 warps; the block-wide sort of tube_mask_gather is built
// for this size (256 threads x 4 keys = kMaxPositions).
inline constexpr int kThreads = 256;

// Elements each thread loads before it stores or reduces any: with one byte per lane, 8 loads in
// flight per warp keep enough bytes in flight to cover DRAM latency at full occupancy.
inline constexpr int kUnroll = 8;

__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element e of a patch vector is (frame f, row y, column x, channel ch) with
// e = ((f * p + y) * p + x) * C + ch: VideoMAE's (p0 p1 p2 c). Thread `tid` of a block owns one
// channel, ch = tid % C, and visits e = tid, tid + lanes, tid + 2 * lanes, ... where `lanes`, the
// threads in use, is the largest multiple of C not above kThreads. Each visit moves a fixed
// lanes / C pixels ahead; PatchWalk applies that step with two carries instead of three integer
// divisions per element (which would cost more than the memory traffic of a uint8 element).
// kViews clips with their own strides (a clip and its next frames) are walked in lockstep. The walk
// is host code too, so that tests/test_csrc_build.py checks it on a machine without a GPU (hence no
// `#pragma unroll`, which g++ rejects; loops of kViews <= 2 trips are unrolled anyway).
template <int kViews>
struct PatchStep {
  int patch;
  int dx, dy;                  // the step in columns and rows, each < patch (the rest is whole frames)
  int64_t offset[kViews];      // dx, dy and whole frames, in elements of each view
  int64_t carry_x[kViews];     // x wrapped past the patch: one row down, p columns back
  int64_t carry_y[kViews];     // y wrapped past the patch: one frame on, p rows back
};

template <int kViews>
struct PatchWalk {
  int x, y;                 // column and row of the current pixel inside its patch
  int64_t offset[kViews];   // its element offset from the patch origin, in each view

  __host__ __device__ __forceinline__ void advance(const PatchStep<kViews>& s) {
    x += s.dx;
    y += s.dy;
    for (int v = 0; v < kViews; ++v) offset[v] += s.offset[v];
    if (x >= s.patch) {
      x -= s.patch;
      ++y;
      for (int v = 0; v < kViews; ++v) offset[v] += s.carry_x[v];
    }
    if (y >= s.patch) {
      y -= s.patch;
      for (int v = 0; v < kViews; ++v) offset[v] += s.carry_y[v];
    }
  }
};

// The step and the first position of thread `tid` (< lanes) for clips of `channels` channels with
// strides `stride[v]` in (B, T, H, W, C) order.
template <int kViews>
__host__ __device__ __forceinline__ void start_walk(int tid, int lanes, int channels, int patch,
                                                    const int64_t (*stride)[5],  // [kViews][5] element strides
                                                    PatchStep<kViews>& step, PatchWalk<kViews>& walk) {
  const int pp = patch * patch;
  const int pixels = lanes / channels;
  step.patch = patch;
  step.dx = pixels % patch;
  step.dy = (pixels / patch) % patch;
  const int df = pixels / pp;
  const int pixel = tid / channels;
  const int ch = tid % channels;
  walk.x = pixel % patch;
  walk.y = (pixel / patch) % patch;
  const int f = pixel / pp;
  for (int v = 0; v < kViews; ++v) {
    const int64_t st = stride[v][1], sh = stride[v][2], sw = stride[v][3], sc = stride[v][4];
    step.offset[v] = df * st + step.dy * sh + step.dx * sw;
    step.carry_x[v] = sh - patch * sw;
    step.carry_y[v] = st - patch * sh;
    walk.offset[v] = f * st + walk.y * sh + walk.x * sw + ch * sc;
  }
}

// Element offset of the origin (first frame, top-left pixel, channel 0) of token n of sample b.
// Tokens are ordered (time slice, patch row, patch column).
__host__ __device__ __forceinline__ int64_t token_origin(const int64_t* stride,  // (5,) strides, BTHWC order
                                                         int64_t b, int64_t n, int64_t tubelet, int64_t patch,
                                                         int64_t patches_per_row, int64_t positions) {
  const int64_t slice = n / positions;
  const int64_t s = n - slice * positions;
  const int64_t row = s / patches_per_row;
  const int64_t col = s - row * patches_per_row;
  return b * stride[0] + slice * tubelet * stride[1] + row * patch * stride[2] + col * patch * stride[3];
}

// Threads in use per block: the largest multiple of `channels` not above kThreads, so that each
// thread keeps one channel for all its elements.
inline int lanes_for(int64_t channels) { return kThreads - static_cast<int>(kThreads % channels); }

// Streaming multiprocessors of the current device, to size grids that fill the GPU.
inline cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// Blocks each kernel is compiled to keep resident per SM (__launch_bounds__): 3 x 256 threads caps
// registers at 80 per thread (65536 / 768, rounded down to ptxas's granule), 37.5% of sm_80/sm_90's
// 2048 threads; with kUnroll loads in flight per thread that hides DRAM latency. 4 blocks (64
// registers) made ptxas spill 4-24 bytes per thread in both kernels (ptxas -v, checked by
// tests/test_csrc_build.py::test_kernels_use_no_local_memory). Grids are sized from it.
inline constexpr int kBlocksPerSM = 3;

}  // namespace fastmam::device
