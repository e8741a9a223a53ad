// masked_target: the pixel target (VideoMAE) and the RGB-difference target (MAM2 / MotionMAE) of the
// masked tokens, fp32, one launch.
//
// 1-D grid over the B * M masked tokens (grid-stride, sized to fill the GPU), 256 threads per block;
// a block produces one token's R * C target values at a time (R = t*p*p rows, or (t-1)*p*p for the
// in-tubelet difference). Values are in [0, 1] pixel units: uint8 v / 255 (values and their differences
// kept as exact integers until that one division), a normalized float clip un-normalized as
// v * std[c] + mean[c]. With `normalize`, per token and channel over its R values x:
//     u = x - x[row 0],  mean = sum(u) / R,  var = sum((u - mean)^2) / (R - 1),  out = (u - mean) / (sqrt(var) + 1e-6)
// VideoMAE's formula (unbiased std, epsilon added to the std; the shift by the first value changes nothing
// but the rounding: a flat patch gives u = 0 and exactly 0 out, as fastmam.ops.targets.normalize_per_patch).
// For uint8, u = (v - v[row 0]) / 255 is formed from exact integers. The two sums are two passes over the
// token's pixels (the second and the write-out hit L1/L2, the token is a few KiB), in fp32, reduced in
// a fixed order: the result does not depend on scheduling.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <type_traits>

#include "device_utils.h"
#include "kernels.h"

namespace fastmam {
namespace {

using device::kThreads;
using device::kUnroll;
using device::PatchStep;
using device::PatchWalk;
using device::to_float;

constexpr float kEps = 1e-6f;  // VideoMAE's epsilon in (v - mean) / (std + eps)

// Kernel arguments: MaskedTargetArgs plus the sizes derived from it once on the host.
struct TargetParams {
  const void* clip;          // (B, T, H, W, C) uint8 or float, at stride[0]
  const void* next;          // (B, T, H, W, C) like clip, at stride[1] (== clip unless kNextFrameDiff)
  int64_t stride[2][5];      // elements, (B, T, H, W, C) order, of clip and next
  int64_t channels, tubelet, patch;
  int64_t patches_per_row;   // W / p
  int64_t positions;         // (H / p) * (W / p)
  int64_t num_tokens;        // N = (T / t) * positions
  const int64_t* ids;        // (B, M) token ids in [0, N), at ids_stride
  int64_t batch, num_ids;    // B, M
  int64_t ids_stride[2];
  TargetKind kind;
  bool normalize;
  int64_t rows;              // R
  int64_t elements;          // R * C, < 2^31 (checked on the host)
  int lanes;                 // threads in use (see device_utils.h)
  float mean[kMaxChannels];
  float std[kMaxChannels];
  float* out;                // (B, M, R * C) fp32, contiguous
};

// Sum over the threads of each channel, for every thread's channel: thread tid < lanes holds a
// partial of channel tid % C (the rest hold nothing). Each step folds the upper half of the channel
// groups onto the lower half; the fold distance is a multiple of C, so channels never mix. All
// threads of the block must call it.
__device__ float channel_sum(float partial, int lanes, int channels,
                             float* red) {  // (kThreads) shared scratch
  const int tid = threadIdx.x;
  red[tid] = tid < lanes ? partial : 0.0f;
  __syncthreads();
  for (int n = lanes; n > channels;) {
    const int half = (n / channels + 1) / 2 * channels;
    if (tid < n - half) red[tid] += red[tid + half];
    __syncthreads();
    n = half;
  }
  const float total = red[tid % channels];
  __syncthreads();  // red is reused by the next call
  return total;
}

// kDense: kNextFrameDiff, which walks two clips (each with its own strides); the other kinds walk one
// (two 64-bit offsets per element cost registers that the single-clip kinds keep for loads in flight).
template <typename in_t, bool kDense>
__global__ void __launch_bounds__(kThreads, device::kBlocksPerSM) masked_target_kernel(const TargetParams p) {
  constexpr int kViews = kDense ? 2 : 1;
  // two loads per element in the dense kind: half the elements give as many loads in flight
  constexpr int kBatch = kDense ? kUnroll / 2 : kUnroll;
  __shared__ float red[kThreads];
  constexpr bool kRawPixels = std::is_same_v<in_t, uint8_t>;
  const int tid = threadIdx.x;
  const int lanes = p.lanes;
  const int channels = static_cast<int>(p.channels);
  const int elements = static_cast<int>(p.elements);
  // threads >= lanes take no element, only their part in the reductions' barriers
  const int first_element = tid < lanes ? tid : elements;
  PatchStep<kViews> step;
  PatchWalk<kViews> first;
  device::start_walk<kViews>(tid < lanes ? tid : 0, lanes, channels, static_cast<int>(p.patch), p.stride, step,
                             first);
  const int ch = tid % channels;
  const float mean_c = p.mean[ch];
  const float std_c = p.std[ch];
  const int64_t frame = p.stride[0][1];
  const in_t* __restrict__ clip = static_cast<const in_t*>(p.clip);
  const in_t* __restrict__ next = static_cast<const in_t*>(p.next);

  // One pixel: a uint8 value as an exact integer (divided by 255 once, at the end), a float one in [0, 1]
  // units, in the reference's order of operations (no fused multiply-add).
  auto pixel = [&](const in_t* src, int64_t offset) -> float {
    const float v = to_float(src[offset]);
    if constexpr (kRawPixels) {
      return v;
    } else {
      return __fadd_rn(__fmul_rn(v, std_c), mean_c);
    }
  };
  // The first row's value of this thread's channel (element ch: frame 0, y 0, x 0), the normalization's shift.
  const int64_t first_offset = ch * p.stride[0][4];
  constexpr float kScale = kRawPixels ? 255.0f : 1.0f;

  for (int64_t token = blockIdx.x; token < p.batch * p.num_ids; token += gridDim.x) {
    const int64_t b = token / p.num_ids;
    const int64_t m = token - b * p.num_ids;
    const int64_t id = p.ids[b * p.ids_stride[0] + m * p.ids_stride[1]];
    assert(id >= 0 && id < p.num_tokens);  // ids_masked must index the clip's tokens (checked before the launch)
    const int64_t n = id >= 0 && id < p.num_tokens ? id : 0;  // and never read outside the clip, even in release
    const in_t* src = clip + device::token_origin(p.stride[0], b, n, p.tubelet, p.patch, p.patches_per_row,
                                                  p.positions);
    const in_t* src_next = next + device::token_origin(p.stride[1], b, n, p.tubelet, p.patch, p.patches_per_row,
                                                       p.positions);
    float* dst = p.out + token * p.elements;

    // f(e, value) for each of this thread's elements, a batch of loads in flight before the first use
    auto for_each_value = [&](auto&& f) {
      PatchWalk<kViews> walk = first;
      for (int e0 = first_element; e0 < elements; e0 += kBatch * lanes) {
        float v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          v[u] = 0.0f;
          if (e0 + u * lanes < elements) {
            const int64_t o = walk.offset[0];
            if constexpr (kDense) {
              v[u] = pixel(src_next, walk.offset[kViews - 1]) - pixel(src, o);
            } else if (p.kind == TargetKind::kFrameDiff) {
              v[u] = pixel(src, o + frame) - pixel(src, o);
            } else {
              v[u] = pixel(src, o);
            }
          }
          walk.advance(step);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (e0 + u * lanes < elements) f(e0 + u * lanes, v[u]);
        }
      }
    };

    if (!p.normalize) {
      for_each_value([&](int e, float v) { dst[e] = kRawPixels ? v / kScale : v; });
      continue;
    }
    float shift;
    if constexpr (kDense) {
      shift = pixel(src_next, ch * p.stride[1][4]) - pixel(src, first_offset);
    } else if (p.kind == TargetKind::kFrameDiff) {
      shift = pixel(src, first_offset + frame) - pixel(src, first_offset);
    } else {
      shift = pixel(src, first_offset);
    }
    auto shifted = [&](float v) { return kRawPixels ? (v - shift) / kScale : v - shift; };
    float sum = 0.0f;
    for_each_value([&](int, float v) { sum += shifted(v); });
    const float mean = channel_sum(sum, lanes, channels, red) / static_cast<float>(p.rows);
    float squares = 0.0f;
    for_each_value([&](int, float v) {
      const float d = shifted(v) - mean;
      squares += d * d;
    });
    const float var = channel_sum(squares, lanes, channels, red) / static_cast<float>(p.rows - 1);
    const float denom = sqrtf(var) + kEps;
    for_each_value([&](int e, float v) { dst[e] = (shifted(v) - mean) / denom; });
  }
}

template <bool kDense>
cudaError_t launch(const TargetParams& p, DType dtype, dim3 grid, cudaStream_t stream) {
  switch (dtype) {
    case DType::kUInt8:
      masked_target_kernel<uint8_t, kDense><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat32:
      masked_target_kernel<float, kDense><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      masked_target_kernel<__half, kDense><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      masked_target_kernel<__nv_bfloat16, kDense><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;  // ops.cpp admits uint8 and fp32/fp16/bf16 clips only
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_target(const MaskedTargetArgs& a, cudaStream_t stream) {
  TargetParams p{};
  p.clip = a.clip.data;
  p.next = a.kind == TargetKind::kNextFrameDiff ? a.next.data : a.clip.data;
  const ClipView& next = a.kind == TargetKind::kNextFrameDiff ? a.next : a.clip;
  std::copy(a.clip.stride, a.clip.stride + 5, p.stride[0]);
  std::copy(next.stride, next.stride + 5, p.stride[1]);
  p.channels = a.clip.size[4];
  p.tubelet = a.tubelet;
  p.patch = a.patch;
  p.patches_per_row = a.clip.size[3] / a.patch;
  p.positions = (a.clip.size[2] / a.patch) * p.patches_per_row;
  p.num_tokens = (a.clip.size[1] / a.tubelet) * p.positions;
  p.ids = a.ids;
  p.batch = a.clip.size[0];
  p.num_ids = a.num_ids;
  p.ids_stride[0] = a.ids_stride[0];
  p.ids_stride[1] = a.ids_stride[1];
  p.kind = a.kind;
  p.normalize = a.normalize;
  p.rows = (a.kind == TargetKind::kFrameDiff ? a.tubelet - 1 : a.tubelet) * a.patch * a.patch;
  p.elements = p.rows * p.channels;
  p.lanes = device::lanes_for(p.channels);
  std::copy(a.mean, a.mean + kMaxChannels, p.mean);
  std::copy(a.std, a.std + kMaxChannels, p.std);
  p.out = a.out;
  const int64_t tokens = p.batch * p.num_ids;
  if (tokens == 0 || p.elements == 0) return cudaSuccess;
  if (p.channels < 1 || p.channels > kMaxChannels || (a.normalize && p.rows < 2)) {
    return cudaErrorInvalidValue;  // ops.cpp rejects these with a message first
  }

  int sms = 0;
  if (const cudaError_t err = device::multiprocessor_count(&sms); err != cudaSuccess) return err;
  // A few waves of resident blocks; each block loops over tokens, so its setup (the walk's first
  // position, a few divisions) is paid once per block rather than once per token.
  const int64_t blocks = std::min(tokens, int64_t{4} * device::kBlocksPerSM * sms);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  if (a.kind == TargetKind::kNextFrameDiff) return launch<true>(p, a.clip.dtype, grid, stream);
  return launch<false>(p, a.clip.dtype, grid, stream);
}

}  // namespace fastmam
