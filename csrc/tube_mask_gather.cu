// tube_mask_gather: tube masking from noise and the gather of the visible patches, one launch.
//
// Grid (B, G), 256 threads per block. Every block of sample b
//   1. ranks the sample's S noise values with a stable block-wide radix sort (CUB BlockRadixSort on
//      (key, position) pairs): the `keep` positions of lowest noise are visible, ties to the lower
//      position, as torch.argsort(stable=True) in tube_masking_reference;
//   2. compacts the visible positions, then the hidden ones, each in ascending order, with a
//      block-wide exclusive scan of the visibility flags;
//   3. copies its share (every G-th) of the sample's Nv visible patches from the clip, normalized
//      and cast, reading each pixel once.
// Block (b, 0) also writes ids_keep, ids_masked and mask. Sorting again in each of the G blocks costs
// a few microseconds of one block's time and spares a second launch or blocks waiting on one another.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "device_utils.h"
#include "kernels.h"

namespace fastmam {
namespace {

using device::from_float;
using device::kThreads;
using device::kUnroll;
using device::PatchStep;
using device::PatchWalk;
using device::to_float;

// A block copies at least this many patch elements, so that its sort stays a small part of its work.
constexpr int64_t kMinBlockElements = 4096;

// Kernel arguments: TubeMaskGatherArgs plus the sizes derived from it once on the host.
struct GatherParams {
  const void* clip;         // (B, T, H, W, C) uint8 or float, at clip_stride
  int64_t clip_stride[5];   // elements, (B, T, H, W, C) order
  int64_t channels, tubelet, patch;
  int64_t patches_per_row;  // W / p
  int64_t positions;        // S = (H / p) * (W / p), <= kMaxPositions
  int64_t slices;           // T / t
  const void* noise;        // (B, S) floating point of noise_dtype, at noise_stride
  DType noise_dtype;
  int64_t noise_stride[2];
  int sort_begin_bit;  // lowest key bit that can differ (see radix_key)
  int64_t keep, hidden;  // visible / hidden positions per slice
  int64_t nv, nm, pv;    // visible tokens, hidden tokens, patch-vector length t*p*p*C
  int lanes;             // threads in use by the copy (see device_utils.h)
  float mean[kMaxChannels];
  float std[kMaxChannels];
  void* patches;         // (B, Nv, pv) of patches_dtype, contiguous
  DType patches_dtype;
  int64_t* ids_keep;     // (B, Nv) contiguous
  int64_t* ids_masked;   // (B, Nm) contiguous
  bool* mask;            // (B, slices * S) contiguous
};

// An unsigned key whose order is torch.sort's order of the noise values: flip the sign bit of
// positives and every bit of negatives (IEEE order becomes unsigned order). torch puts NaN after every
// number and treats -0.0 as +0.0, so both are folded to one value first. Every noise dtype converts
// to double exactly; for float, half and bfloat16 noise the low 29 bits of the key carry no
// information and the sort skips them.
__device__ __forceinline__ uint64_t radix_key(double v) {
  if (isnan(v)) {
    v = __longlong_as_double(0x7ff8000000000000LL);
  } else if (v == 0.0) {
    v = 0.0;
  }
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(v));
  return bits ^ ((bits >> 63) ? ~uint64_t{0} : (uint64_t{1} << 63));
}

__device__ __forceinline__ double load_noise(const GatherParams& p, int64_t b, int64_t s) {
  const int64_t off = b * p.noise_stride[0] + s * p.noise_stride[1];
  switch (p.noise_dtype) {
    case DType::kFloat64:
      return static_cast<const double*>(p.noise)[off];
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p.noise)[off]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.noise)[off]);
    default:
      return static_cast<const float*>(p.noise)[off];
  }
}

// Tube masking of sample b. Leaves in `order` the visible spatial positions in ascending order,
// followed by the hidden ones in ascending order, and visible[s] = 1 for each visible s.
template <int kItems>
__device__ void select_positions(const GatherParams& p, int64_t b,
                                 int* order,         // (kThreads * kItems) shared
                                 uint8_t* visible) {  // (kThreads * kItems) shared
  using Sort = cub::BlockRadixSort<uint64_t, kThreads, kItems, int>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } tmp;

  const int tid = threadIdx.x;
  const int positions = static_cast<int>(p.positions);
  const int keep = static_cast<int>(p.keep);
  // Blocked arrangement: thread tid holds positions tid * kItems + i. The sort is stable in that
  // order, so equal keys keep ascending positions. Padding sorts after every real key (the largest
  // real key, NaN's, is below all ones).
  uint64_t key[kItems];
  int pos[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    pos[i] = tid * kItems + i;
    key[i] = pos[i] < positions ? radix_key(load_noise(p, b, pos[i])) : ~uint64_t{0};
  }
  Sort(tmp.sort).Sort(key, pos, p.sort_begin_bit, 64);
  // Now key[i], pos[i] hold rank tid * kItems + i: the `keep` lowest ranks are visible.
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (pos[i] < positions) visible[pos[i]] = (tid * kItems + i) < keep;
  }
  __syncthreads();  // visible[] complete; tmp free for the scan

  // Compaction: a visible position goes to slot (visible positions before it), a hidden one to
  // keep + (hidden positions before it).
  int flag[kItems];
  int before[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int s = tid * kItems + i;
    flag[i] = s < positions ? visible[s] : 0;
  }
  Scan(tmp.scan).ExclusiveSum(flag, before);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int s = tid * kItems + i;
    if (s < positions) order[flag[i] ? before[i] : keep + (s - before[i])] = s;
  }
  __syncthreads();
}

// ids_keep, ids_masked and mask of sample b: slice i repeats the spatial choice at tokens i * S + s.
__device__ void write_masking(const GatherParams& p, int64_t b,
                              const int* order,          // (S) shared, from select_positions
                              const uint8_t* visible) {  // (S) shared
  const int tid = threadIdx.x;
  int64_t* keep_out = p.ids_keep + b * p.nv;
  int64_t* masked_out = p.ids_masked + b * p.nm;
  bool* mask_out = p.mask + b * p.slices * p.positions;
  for (int64_t i = 0; i < p.slices; ++i) {
    const int64_t first = i * p.positions;
    for (int64_t k = tid; k < p.keep; k += kThreads) keep_out[i * p.keep + k] = first + order[k];
    for (int64_t k = tid; k < p.hidden; k += kThreads) masked_out[i * p.hidden + k] = first + order[p.keep + k];
    for (int64_t s = tid; s < p.positions; s += kThreads) mask_out[first + s] = !visible[s];
  }
}

// Copy every gridDim.y-th visible patch of sample b: uint8 pixels as (v / 255 - mean[c]) / std[c]
// (the reference's order of operations, in fp32), float pixels only cast; then rounded to out_t.
template <typename in_t, typename out_t>
__device__ void gather_visible(const GatherParams& p, int64_t b,
                               const int* order) {  // (S) shared, from select_positions
  constexpr bool kNormalize = std::is_same_v<in_t, uint8_t>;
  const int tid = threadIdx.x;
  if (tid >= p.lanes) return;  // no barrier follows
  PatchStep<1> step;
  PatchWalk<1> first;
  device::start_walk<1>(tid, p.lanes, static_cast<int>(p.channels), static_cast<int>(p.patch), &p.clip_stride,
                        step, first);
  const int ch = tid % static_cast<int>(p.channels);
  const float mean = p.mean[ch];
  const float stdev = p.std[ch];
  const in_t* __restrict__ clip = static_cast<const in_t*>(p.clip);
  out_t* __restrict__ patches = static_cast<out_t*>(p.patches);
  // Indices inside one patch vector are 32-bit (pv < 2^31, checked on the host), which keeps the
  // kernel within 64 registers; every memory offset is 64-bit.
  const int pv = static_cast<int>(p.pv);
  const int lanes = p.lanes;

  for (int64_t j = blockIdx.y; j < p.nv; j += gridDim.y) {
    const int64_t slice = j / p.keep;
    const int64_t n = slice * p.positions + order[j - slice * p.keep];
    const in_t* src = clip + device::token_origin(p.clip_stride, b, n, p.tubelet, p.patch, p.patches_per_row,
                                                  p.positions);
    out_t* dst = patches + (b * p.nv + j) * p.pv;
    PatchWalk<1> walk = first;
    for (int e0 = tid; e0 < pv; e0 += kUnroll * lanes) {
      // all loads of the batch first, then the stores: kUnroll loads in flight per thread
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        v[u] = e0 + u * lanes < pv ? to_float(src[walk.offset[0]]) : 0.0f;
        walk.advance(step);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = e0 + u * lanes;
        if (e < pv) dst[e] = from_float<out_t>(kNormalize ? (v[u] / 255.0f - mean) / stdev : v[u]);
      }
    }
  }
}

template <int kItems, typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads, device::kBlocksPerSM) tube_mask_gather_kernel(const GatherParams p) {
  __shared__ int order[kThreads * kItems];
  __shared__ uint8_t visible[kThreads * kItems];
  const int64_t b = blockIdx.x;
  select_positions<kItems>(p, b, order, visible);
  if (blockIdx.y == 0) write_masking(p, b, order, visible);
  gather_visible<in_t, out_t>(p, b, order);
}

template <int kItems, typename in_t>
cudaError_t launch_for_output(const GatherParams& p, dim3 grid, cudaStream_t stream) {
  switch (p.patches_dtype) {
    case DType::kFloat32:
      tube_mask_gather_kernel<kItems, in_t, float><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      tube_mask_gather_kernel<kItems, in_t, __half><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      tube_mask_gather_kernel<kItems, in_t, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;  // ops.cpp admits fp32, fp16 and bf16 only
  }
  return cudaGetLastError();
}

template <int kItems>
cudaError_t launch_for_input(const GatherParams& p, DType clip_dtype, dim3 grid, cudaStream_t stream) {
  switch (clip_dtype) {
    case DType::kUInt8:
      return launch_for_output<kItems, uint8_t>(p, grid, stream);
    case DType::kFloat32:
      return launch_for_output<kItems, float>(p, grid, stream);
    case DType::kFloat16:
      return launch_for_output<kItems, __half>(p, grid, stream);
    case DType::kBFloat16:
      return launch_for_output<kItems, __nv_bfloat16>(p, grid, stream);
    default:
      return cudaErrorInvalidValue;  // ops.cpp admits uint8 and fp32/fp16/bf16 clips only
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

cudaError_t tube_mask_gather(const TubeMaskGatherArgs& a, cudaStream_t stream) {
  const int64_t batch = a.clip.size[0];
  const int64_t channels = a.clip.size[4];
  GatherParams p{};
  p.clip = a.clip.data;
  std::copy(a.clip.stride, a.clip.stride + 5, p.clip_stride);
  p.channels = channels;
  p.tubelet = a.tubelet;
  p.patch = a.patch;
  p.patches_per_row = a.clip.size[3] / a.patch;
  p.positions = (a.clip.size[2] / a.patch) * p.patches_per_row;
  p.slices = a.clip.size[1] / a.tubelet;
  p.noise = a.noise;
  p.noise_dtype = a.noise_dtype;
  p.noise_stride[0] = a.noise_stride[0];
  p.noise_stride[1] = a.noise_stride[1];
  p.sort_begin_bit = a.noise_dtype == DType::kFloat64 ? 0 : 29;
  p.keep = a.keep;
  p.hidden = p.positions - a.keep;
  p.nv = p.slices * p.keep;
  p.nm = p.slices * p.hidden;
  p.pv = a.tubelet * a.patch * a.patch * channels;
  p.lanes = device::lanes_for(channels);
  std::copy(a.mean, a.mean + kMaxChannels, p.mean);
  std::copy(a.std, a.std + kMaxChannels, p.std);
  p.patches = a.patches;
  p.patches_dtype = a.patches_dtype;
  p.ids_keep = a.ids_keep;
  p.ids_masked = a.ids_masked;
  p.mask = a.mask;
  if (batch == 0) return cudaSuccess;
  if (p.positions > kMaxPositions || p.keep < 1 || p.hidden < 1 || channels < 1 || channels > kMaxChannels) {
    return cudaErrorInvalidValue;  // ops.cpp rejects these with a message first
  }

  int sms = 0;
  if (const cudaError_t err = device::multiprocessor_count(&sms); err != cudaSuccess) return err;
  // Blocks per sample: enough for the grid to fill the GPU, but each copying >= kMinBlockElements.
  int64_t per_sample = ceil_div(int64_t{device::kBlocksPerSM} * sms, batch);
  per_sample = std::min({per_sample, ceil_div(p.nv * p.pv, kMinBlockElements), p.nv, int64_t{65535}});
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(std::max<int64_t>(per_sample, 1)));
  // One key per thread covers the common S <= 256 (e.g. 196 at 224x224 / 16) at a quarter of the
  // sort's cost with four.
  if (p.positions <= kThreads) return launch_for_input<1>(p, a.clip.dtype, grid, stream);
  return launch_for_input<4>(p, a.clip.dtype, grid, stream);
}

}  // namespace fastmam
