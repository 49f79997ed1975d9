// SD-Generate's own CUDA kernels: the fused operations candle has no single kernel for.
//
// Each kernel exists for f32, f16 and bf16 (suffixes _f32, _f16, _bf16). Arithmetic is in f32;
// values are rounded to the storage type exactly where PyTorch rounds them (after each of its
// separate ops), so a fused kernel gives the image the unfused diffusers run gives, not a
// "more precise" one that drifts from it.
//
// Compiled at build time by crates/sdgen-models/build.rs into a fatbin (a cubin for the build's
// CUDA_COMPUTE_CAP plus sm_80 PTX, so any Ampere-or-newer card can JIT it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Rounds through the storage type (a no-op for f32).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// ---------------------------------------------------------------------------------------------
// Welford statistics, merged as Chan et al.'s parallel algorithm (the way PyTorch's GroupNorm
// reduces): numerically stable where sum/sum-of-squares in f32 would cancel.
struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  float n = a.n + b.n;
  float delta = b.mean - a.mean;
  float nb_over_n = b.n / n;
  Welford r;
  r.n = n;
  r.mean = a.mean + delta * nb_over_n;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * nb_over_n;
  return r;
}

__device__ __forceinline__ Welford warp_merge(Welford w) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford o;
    o.n = __shfl_down_sync(0xffffffff, w.n, offset);
    o.mean = __shfl_down_sync(0xffffffff, w.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffff, w.m2, offset);
    w = welford_merge(w, o);
  }
  return w;
}

// Block-wide merge; the result is valid in thread 0. blockDim.x is a multiple of 32, at most 1024.
__device__ Welford block_merge(Welford w) {
  __shared__ Welford warps[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  w = warp_merge(w);
  if (lane == 0) warps[warp] = w;
  __syncthreads();
  if (warp == 0) {
    int nwarps = blockDim.x >> 5;
    w = lane < nwarps ? warps[lane] : Welford{0.f, 0.f, 0.f};
    w = warp_merge(w);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// GroupNorm over x: [B, C, HW] (contiguous), G groups of C/G channels, optionally of (x + add)
// where add: [B, C] is a per-channel term (the ResNet's time embedding, added in the storage type
// first, as diffusers' `hidden_states + temb` is).
//
// Pass 1 (gn_stats): grid (splits, B*G). Each block reduces a contiguous 1/splits of its group's
// cpg*HW elements into one Welford partial: partial[(bg * splits + split) * 3 + {0,1,2}].
template <typename T>
__device__ void gn_stats(const T* __restrict__ x, const T* __restrict__ add, int C, int HW, int cpg, int G,
                         int splits, float* __restrict__ partial) {
  int bg = blockIdx.y, split = blockIdx.x;
  int b = bg / G, g = bg % G;
  int64_t group_len = (int64_t)cpg * HW;
  int64_t chunk = (group_len + splits - 1) / splits;
  int64_t start = chunk * split;
  int64_t end = min(start + chunk, group_len);
  const T* base = x + ((int64_t)b * C + (int64_t)g * cpg) * HW;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float v = to_f(base[i]);
    if (add != nullptr) v = round_to<T>(v + to_f(add[(int64_t)b * C + g * cpg + i / HW]));
    w.n += 1.f;
    float delta = v - w.mean;
    w.mean += delta / w.n;
    w.m2 += delta * (v - w.mean);
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    float* p = partial + ((int64_t)bg * splits + split) * 3;
    p[0] = w.n;
    p[1] = w.mean;
    p[2] = w.m2;
  }
}

// Pass 2 (gn_apply): grid (ceil(HW / (blockDim * per_thread)), B*C). Each block merges its group's
// partials, then writes y = x·a + s (a = rstd·γ, s = β − a·mean: PyTorch's form, in f32, rounded
// once), then, with silu, SiLU of that rounded value (PyTorch's separate F.silu), rounded again.
template <typename T>
__device__ void gn_apply(const T* __restrict__ x, const T* __restrict__ add, const T* __restrict__ gamma,
                         const T* __restrict__ beta, T* __restrict__ y, int C, int HW, int cpg, int G, int splits,
                         const float* __restrict__ partial, float eps, int silu) {
  int bc = blockIdx.y;
  int b = bc / C, c = bc % C;
  int bg = b * G + c / cpg;
  __shared__ float s_scale, s_shift;
  if (threadIdx.x == 0) {
    Welford w{0.f, 0.f, 0.f};
    const float* p = partial + (int64_t)bg * splits * 3;
    for (int i = 0; i < splits; ++i) w = welford_merge(w, Welford{p[3 * i], p[3 * i + 1], p[3 * i + 2]});
    float var = w.n > 0.f ? w.m2 / w.n : 0.f;
    float rstd = rsqrtf(var + eps);
    float a = rstd * (gamma != nullptr ? to_f(gamma[c]) : 1.f);
    s_scale = a;
    s_shift = (beta != nullptr ? to_f(beta[c]) : 0.f) - a * w.mean;
  }
  __syncthreads();
  float a = s_scale, s = s_shift;
  float extra = add != nullptr ? to_f(add[bc]) : 0.f;
  const T* xp = x + (int64_t)bc * HW;
  T* yp = y + (int64_t)bc * HW;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += (int64_t)gridDim.x * blockDim.x) {
    float v = to_f(xp[i]);
    if (add != nullptr) v = round_to<T>(v + extra);
    float o = round_to<T>(v * a + s);
    if (silu) o = o / (1.f + expf(-o));
    yp[i] = from_f<T>(o);
  }
}

// ---------------------------------------------------------------------------------------------
// Row softmax in place: s: [rows, cols] (rows contiguous), f32 arithmetic, one block per row.
// The scores are already scaled (the GEMM's alpha). Two passes over the row: an online max/sum,
// then the normalised write (the row is in L1/L2 by then).
template <typename T>
__device__ void softmax_rows(T* __restrict__ s, int cols) {
  T* row = s + (int64_t)blockIdx.x * cols;
  float m = -INFINITY, sum = 0.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    float v = to_f(row[i]);
    if (v > m) {
      sum = sum * expf(m - v) + 1.f;
      m = v;
    } else {
      sum += expf(v - m);
    }
  }
  // Merge (m, sum) across the block.
  __shared__ float sm[32], ss[32];
  __shared__ float row_m, row_inv;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    float om = __shfl_down_sync(0xffffffff, m, offset);
    float os = __shfl_down_sync(0xffffffff, sum, offset);
    float nm = fmaxf(m, om);
    sum = (m == -INFINITY ? 0.f : sum * expf(m - nm)) + (om == -INFINITY ? 0.f : os * expf(om - nm));
    m = nm;
  }
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    int nwarps = blockDim.x >> 5;
    m = lane < nwarps ? sm[lane] : -INFINITY;
    sum = lane < nwarps ? ss[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) {
      float om = __shfl_down_sync(0xffffffff, m, offset);
      float os = __shfl_down_sync(0xffffffff, sum, offset);
      float nm = fmaxf(m, om);
      sum = (m == -INFINITY ? 0.f : sum * expf(m - nm)) + (om == -INFINITY ? 0.f : os * expf(om - nm));
      m = nm;
    }
    if (lane == 0) {
      row_m = m;
      row_inv = 1.f / sum;
    }
  }
  __syncthreads();
  m = row_m;
  float inv = row_inv;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = from_f<T>(expf(to_f(row[i]) - m) * inv);
}

// ---------------------------------------------------------------------------------------------
// GEGLU: x: [rows, 2·inner] → y: [rows, inner], y = a · gelu(g) with a = x[:, :inner],
// g = x[:, inner:] (diffusers' `hidden_states, gate = proj(x).chunk(2, -1); hidden_states *
// F.gelu(gate)`: the exact, erf GELU, rounded before the product as its separate ops round).
template <typename T>
__device__ void geglu(const T* __restrict__ x, T* __restrict__ y, int inner, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / inner, c = i % inner;
    const T* row = x + r * 2 * inner;
    float a = to_f(row[c]);
    float g = to_f(row[inner + c]);
    float gelu = round_to<T>(0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    y[i] = from_f<T>(a * gelu);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
  extern "C" __global__ void gn_stats_##SUFFIX(const T* x, const T* add, int C, int HW, int cpg, int G,         \
                                               int splits, float* partial) {                                   \
    gn_stats<T>(x, add, C, HW, cpg, G, splits, partial);                                                        \
  }                                                                                                              \
  extern "C" __global__ void gn_apply_##SUFFIX(const T* x, const T* add, const T* gamma, const T* beta, T* y,   \
                                               int C, int HW, int cpg, int G, int splits, const float* partial, \
                                               float eps, int silu) {                                           \
    gn_apply<T>(x, add, gamma, beta, y, C, HW, cpg, G, splits, partial, eps, silu);                             \
  }                                                                                                              \
  extern "C" __global__ void softmax_rows_##SUFFIX(T* s, int cols) { softmax_rows<T>(s, cols); }                \
  extern "C" __global__ void geglu_##SUFFIX(const T* x, T* y, int inner, int64_t n) { geglu<T>(x, y, inner, n); }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
