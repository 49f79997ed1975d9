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
// 16-byte vectors of storage elements (8 halves or 4 floats), converted to f32 and back.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  float v[N];
  __device__ __forceinline__ void load(const T* p) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_f(e[i]);
  }
  __device__ __forceinline__ void store(T* p) const {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_f<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

// N values of x from p (N = the vector width with VEC, else 1), as f32.
template <typename T, bool VEC, int N>
__device__ __forceinline__ void load_n(const T* p, float (&vals)[N]) {
  if constexpr (VEC) {
    Vec<T> vec;
    vec.load(p);
#pragma unroll
    for (int j = 0; j < N; ++j) vals[j] = vec.v[j];
  } else {
    vals[0] = to_f(p[0]);
  }
}

// The inverse of load_n.
template <typename T, bool VEC, int N>
__device__ __forceinline__ void store_n(T* p, const float (&vals)[N]) {
  if constexpr (VEC) {
    Vec<T> vec;
#pragma unroll
    for (int j = 0; j < N; ++j) vec.v[j] = vals[j];
    vec.store(p);
  } else {
    p[0] = from_f<T>(vals[0]);
  }
}

// Pass 1 (gn_stats): grid (splits, B*G). Each block reduces a contiguous 1/splits of its group's
// cpg*HW elements into one Welford partial: partial[(bg * splits + split) * 3 + {0,1,2}].
// VEC: with HW a multiple of the vector width (and aligned pointers, checked by the host) every
// thread reads 16 bytes at a time; the chunk boundaries are multiples of it.
template <typename T, bool VEC>
__device__ void gn_stats(const T* __restrict__ x, const T* __restrict__ add, int C, int HW, int cpg, int G,
                         int splits, float* __restrict__ partial) {
  constexpr int N = VEC ? Vec<T>::N : 1;
  int bg = blockIdx.y, split = blockIdx.x;
  int b = bg / G, g = bg % G;
  int64_t group_len = (int64_t)cpg * HW;
  int64_t chunk = ((group_len + splits - 1) / splits + N - 1) / N * N;
  int64_t start = chunk * split;
  int64_t end = min(start + chunk, group_len);
  const T* base = x + ((int64_t)b * C + (int64_t)g * cpg) * HW;
  const T* addb = add != nullptr ? add + (int64_t)b * C + g * cpg : nullptr;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = start + (int64_t)threadIdx.x * N; i < end; i += (int64_t)blockDim.x * N) {
    float vals[N];
    load_n<T, VEC, N>(base + i, vals);
    float extra = addb != nullptr ? to_f(addb[i / HW]) : 0.f;  // one channel per vector
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float v = addb != nullptr ? round_to<T>(vals[j] + extra) : vals[j];
      w.n += 1.f;
      float delta = v - w.mean;
      w.mean += delta / w.n;
      w.m2 += delta * (v - w.mean);
    }
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
template <typename T, bool VEC>
__device__ void gn_apply(const T* __restrict__ x, const T* __restrict__ add, const T* __restrict__ gamma,
                         const T* __restrict__ beta, T* __restrict__ y, int C, int HW, int cpg, int G, int splits,
                         const float* __restrict__ partial, float eps, int silu) {
  constexpr int N = VEC ? Vec<T>::N : 1;
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
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * N; i < HW;
       i += (int64_t)gridDim.x * blockDim.x * N) {
    float vals[N];
    load_n<T, VEC, N>(xp + i, vals);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float v = add != nullptr ? round_to<T>(vals[j] + extra) : vals[j];
      float o = round_to<T>(v * a + s);
      if (silu) o = o / (1.f + expf(-o));
      vals[j] = o;
    }
    store_n<T, VEC, N>(yp + i, vals);
  }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm over channels-last x: [B, HW, C] (contiguous), G groups of cpg = C/G consecutive
// channels, optionally of (x + add) with add: [B, C]. The same statistics and roundings as
// gn_stats/gn_apply, in three passes, each reading rows of 16-byte channel vectors:
// Pass 1 (gnl_stats): grid (splits, B), 256 threads. Thread t takes channel vector v = t % V of
// the V = C/N vectors (N channels of 16 bytes) in pixel rows r = t / V, stepping R = 256 / V rows;
// each of its N channels keeps a Welford. The R rows are merged per channel in shared memory
// ([R][C][3] floats, 256·N·12 bytes) into partial[((b·splits + split)·C + c)·3 + {0,1,2}].
template <typename T>
__device__ void gnl_stats(const T* __restrict__ x, const T* __restrict__ add, int C, int HW, int splits,
                          float* __restrict__ partial) {
  constexpr int N = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char gnl_smem[];
  float* smem = reinterpret_cast<float*>(gnl_smem);
  int V = C / N, R = blockDim.x / V;
  int t = threadIdx.x, v = t % V, r = t / V;
  int b = blockIdx.y, split = blockIdx.x;
  int64_t chunk = ((int64_t)HW + splits - 1) / splits;
  int64_t p0 = chunk * split, p1 = min(p0 + chunk, (int64_t)HW);
  if (r < R) {
    Welford w[N];
    float extra[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      w[j] = Welford{0.f, 0.f, 0.f};
      extra[j] = add != nullptr ? to_f(add[(int64_t)b * C + v * N + j]) : 0.f;
    }
    for (int64_t p = p0 + r; p < p1; p += R) {
      Vec<T> vec;
      vec.load(x + ((int64_t)b * HW + p) * C + v * N);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float val = add != nullptr ? round_to<T>(vec.v[j] + extra[j]) : vec.v[j];
        w[j].n += 1.f;
        float delta = val - w[j].mean;
        w[j].mean += delta / w[j].n;
        w[j].m2 += delta * (val - w[j].mean);
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float* o = smem + ((int64_t)r * C + v * N + j) * 3;
      o[0] = w[j].n;
      o[1] = w[j].mean;
      o[2] = w[j].m2;
    }
  }
  __syncthreads();
  for (int c = t; c < C; c += blockDim.x) {
    Welford m{0.f, 0.f, 0.f};
    for (int i = 0; i < R; ++i) {
      const float* o = smem + ((int64_t)i * C + c) * 3;
      m = welford_merge(m, Welford{o[0], o[1], o[2]});
    }
    float* out = partial + (((int64_t)b * splits + split) * C + c) * 3;
    out[0] = m.n;
    out[1] = m.mean;
    out[2] = m.m2;
  }
}

// Pass 2 (gnl_finalize): grid (B·G), a multiple of 32 threads: merges the group's splits × cpg
// channel partials into stats[bg·2 + {0, 1}] = (mean, rstd).
extern "C" __global__ void gnl_finalize(const float* __restrict__ partial, int C, int cpg, int G, int splits,
                                        float eps, float* __restrict__ stats) {
  int bg = blockIdx.x, b = bg / G, g = bg % G;
  Welford w{0.f, 0.f, 0.f};
  for (int i = threadIdx.x; i < splits * cpg; i += blockDim.x) {
    int split = i / cpg, c = g * cpg + i % cpg;
    const float* p = partial + (((int64_t)b * splits + split) * C + c) * 3;
    w = welford_merge(w, Welford{p[0], p[1], p[2]});
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    float var = w.n > 0.f ? w.m2 / w.n : 0.f;
    stats[bg * 2] = w.mean;
    stats[bg * 2 + 1] = rsqrtf(var + eps);
  }
}

// Pass 3 (gnl_apply): grid (blocks, B); threads stride over the item's 16-byte vectors: y = x·a + s with a = rstd·γ,
// s = β − a·mean (gn_apply's form and roundings), then SiLU when asked.
template <typename T>
__device__ void gnl_apply(const T* __restrict__ x, const T* __restrict__ add, const T* __restrict__ gamma,
                          const T* __restrict__ beta, T* __restrict__ y, int C, int64_t HW, int cpg, int G,
                          const float* __restrict__ stats, int silu) {
  constexpr int N = Vec<T>::N;
  int V = C / N;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < HW * V; i += (int64_t)gridDim.x * blockDim.x) {
    int b = blockIdx.y;
    int v = i % V;
    int64_t at = ((int64_t)b * HW * V + i) * N;
    Vec<T> vec;
    vec.load(x + at);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      int c = v * N + j, bg = b * G + c / cpg;
      float mean = stats[bg * 2], rstd = stats[bg * 2 + 1];
      float a = rstd * (gamma != nullptr ? to_f(gamma[c]) : 1.f);
      float s = (beta != nullptr ? to_f(beta[c]) : 0.f) - a * mean;
      float val = add != nullptr ? round_to<T>(vec.v[j] + to_f(add[(int64_t)b * C + c])) : vec.v[j];
      float o = round_to<T>(val * a + s);
      if (silu) o = o / (1.f + expf(-o));
      vec.v[j] = o;
    }
    vec.store(y + at);
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

// ---------------------------------------------------------------------------------------------
// The adaptive layer norms of DiT-type models (SD 3's MMDiT).

// Sum over the block; every thread gets the result. blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float v) {
  __shared__ float warps[32];
  __shared__ float total;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warps[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  float r = total;
  __syncthreads();  // `total` and `warps` are reused by the next call
  return r;
}

// y = LN(x) · (1 + scale) + shift over rows of d elements (a layer norm without affine
// parameters, then diffusers' `norm(x) * (1 + scale[:, None]) + shift[:, None]`), rounded after
// the norm, `1 + scale`, the product and the sum, as those separate PyTorch ops round. x, y:
// [items · rows_per_item, d] contiguous; shift, scale: [items, d] with row stride mod_ld (chunks
// of the modulation vector). One block per row, LN_MAXV elements per thread in registers.
#define LN_MAXV 16
template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                            T* __restrict__ y, int d, int rows_per_item, long long mod_ld, float eps) {
  const long long row = blockIdx.x;
  const long long item = row / rows_per_item;
  const T* xr = x + row * d;
  float v[LN_MAXV];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < LN_MAXV; ++i) {
    int j = threadIdx.x + i * blockDim.x;
    v[i] = j < d ? to_f(xr[j]) : 0.f;
    sum += v[i];
  }
  const float mean = block_sum(sum) / d;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < LN_MAXV; ++i) {
    int j = threadIdx.x + i * blockDim.x;
    float c = v[i] - mean;
    sq += j < d ? c * c : 0.f;
  }
  const float rstd = rsqrtf(block_sum(sq) / d + eps);
  const T* sh = shift + item * mod_ld;
  const T* sc = scale + item * mod_ld;
  T* yr = y + row * d;
#pragma unroll
  for (int i = 0; i < LN_MAXV; ++i) {
    int j = threadIdx.x + i * blockDim.x;
    if (j < d) {
      float n = round_to<T>((v[i] - mean) * rstd);
      float s1 = round_to<T>(1.f + to_f(sc[j]));
      yr[j] = from_f<T>(round_to<T>(n * s1) + to_f(sh[j]));
    }
  }
}

// out = x + y · gate (adaLN-Zero's gated residual, `x + gate[:, None] * y`), the product rounded
// before the sum. x, y, out: [items · rows_per_item, d] contiguous, 16-byte aligned, d a multiple
// of the vector width; gate: [items, d] with row stride gate_ld. One 16-byte vector per thread.
template <typename T>
__device__ void gated_add(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                          T* __restrict__ out, int d, long long rows_per_item, long long gate_ld, long long n) {
  constexpr int N = Vec<T>::N;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n;
       i += (long long)gridDim.x * blockDim.x * N) {
    long long row = i / d;
    int j = (int)(i - row * d);
    const T* g = gate + (row / rows_per_item) * gate_ld + j;
    Vec<T> a, b;
    a.load(x + i);
    b.load(y + i);
#pragma unroll
    for (int e = 0; e < N; ++e) a.v[e] = a.v[e] + round_to<T>(b.v[e] * to_f(g[e]));
    a.store(out + i);
  }
}

// Attention heads packed for a joint attention: src: [items, rows, heads · d] (row stride
// src_row, item stride src_item) is written into dst: [items, dst_rows, heads, d] at rows
// [dst_row0, dst_row0 + rows), each head's d values RMS-normalised when w is given (diffusers'
// RMSNorm: x · rsqrt(mean(x²) + eps) in f32, rounded to the storage type, then times the weight
// and rounded again), copied as they are otherwise. One warp per (item, row, head).
template <typename T>
__device__ void rms_pack(const T* __restrict__ src, long long src_item, long long src_row, const T* __restrict__ w,
                         T* __restrict__ dst, int items, int rows, int heads, int d, int dst_rows, int dst_row0,
                         float eps) {
  const long long warps = (long long)items * rows * heads;
  const int lane = threadIdx.x & 31;
  for (long long wi = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; wi < warps;
       wi += ((long long)gridDim.x * blockDim.x) >> 5) {
    int h = (int)(wi % heads);
    long long r = (wi / heads) % rows, item = wi / ((long long)heads * rows);
    const T* s = src + item * src_item + r * src_row + (long long)h * d;
    T* o = dst + ((item * dst_rows + dst_row0 + r) * heads + h) * (long long)d;
    float inv = 1.f;
    if (w != nullptr) {
      float sq = 0.f;
      for (int e = lane; e < d; e += 32) {
        float v = to_f(s[e]);
        sq += v * v;
      }
      for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, offset);
      inv = rsqrtf(sq / d + eps);
    }
    for (int e = lane; e < d; e += 32) {
      float v = to_f(s[e]);
      o[e] = w != nullptr ? from_f<T>(round_to<T>(v * inv) * to_f(w[e])) : s[e];
    }
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
  extern "C" __global__ void gn_stats_##SUFFIX(const T* x, const T* add, int C, int HW, int cpg, int G,         \
                                               int splits, float* partial) {                                   \
    gn_stats<T, false>(x, add, C, HW, cpg, G, splits, partial);                                                 \
  }                                                                                                              \
  extern "C" __global__ void gn_stats_vec_##SUFFIX(const T* x, const T* add, int C, int HW, int cpg, int G,     \
                                                   int splits, float* partial) {                               \
    gn_stats<T, true>(x, add, C, HW, cpg, G, splits, partial);                                                  \
  }                                                                                                              \
  extern "C" __global__ void gn_apply_##SUFFIX(const T* x, const T* add, const T* gamma, const T* beta, T* y,   \
                                               int C, int HW, int cpg, int G, int splits, const float* partial, \
                                               float eps, int silu) {                                           \
    gn_apply<T, false>(x, add, gamma, beta, y, C, HW, cpg, G, splits, partial, eps, silu);                      \
  }                                                                                                              \
  extern "C" __global__ void gn_apply_vec_##SUFFIX(const T* x, const T* add, const T* gamma, const T* beta,     \
                                                   T* y, int C, int HW, int cpg, int G, int splits,             \
                                                   const float* partial, float eps, int silu) {                 \
    gn_apply<T, true>(x, add, gamma, beta, y, C, HW, cpg, G, splits, partial, eps, silu);                       \
  }                                                                                                              \
  extern "C" __global__ void gnl_stats_##SUFFIX(const T* x, const T* add, int C, int HW, int splits,            \
                                                float* partial) {                                              \
    gnl_stats<T>(x, add, C, HW, splits, partial);                                                               \
  }                                                                                                              \
  extern "C" __global__ void gnl_apply_##SUFFIX(const T* x, const T* add, const T* gamma, const T* beta, T* y,  \
                                                int C, long long HW, int cpg, int G, const float* stats,        \
                                                int silu) {                                                     \
    gnl_apply<T>(x, add, gamma, beta, y, C, HW, cpg, G, stats, silu);                                           \
  }                                                                                                              \
  extern "C" __global__ void softmax_rows_##SUFFIX(T* s, int cols) { softmax_rows<T>(s, cols); }                \
  extern "C" __global__ void geglu_##SUFFIX(const T* x, T* y, int inner, int64_t n) { geglu<T>(x, y, inner, n); } \
  extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const T* shift, const T* scale, T* y, int d,      \
                                                  int rows_per_item, long long mod_ld, float eps) {            \
    ln_modulate<T>(x, shift, scale, y, d, rows_per_item, mod_ld, eps);                                          \
  }                                                                                                              \
  extern "C" __global__ void gated_add_##SUFFIX(const T* x, const T* y, const T* gate, T* out, int d,           \
                                                long long rows_per_item, long long gate_ld, long long n) {     \
    gated_add<T>(x, y, gate, out, d, rows_per_item, gate_ld, n);                                                \
  }                                                                                                              \
  extern "C" __global__ void rms_pack_##SUFFIX(const T* src, long long src_item, long long src_row, const T* w,  \
                                               T* dst, int items, int rows, int heads, int d, int dst_rows,     \
                                               int dst_row0, float eps) {                                       \
    rms_pack<T>(src, src_item, src_row, w, dst, items, rows, heads, d, dst_rows, dst_row0, eps);                \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Flash attention, forward (FlashAttention-2's schedule): one block of 4 warps takes 64 query rows
// of one (batch, head), each warp 16 of them; keys and values stream through shared memory in
// tiles of 64 (cp.async, the next tile's copy overlapping this tile's products). Scores,
// probabilities, the running row max and sum and the f32 output accumulator all stay in registers
// (mma.sync m16n8k16 fragments), so the score matrix never exists in memory of any kind.
// Probabilities are rounded to T before the P·V product and summed unrounded, as flash-attention
// does.
//
// q, k, v, o are addressed by (batch, head, row) strides in elements, the head dim contiguous
// (the heads' views of `[b, seq, heads·d]` need no copy). D is the head dim `d` rounded up to a
// multiple of 16, the columns past `d` zero-filled in shared memory. The host checks that d, every
// stride and every base offset are multiples of 8 elements (16-byte copies).
struct AttnArgs {
  int q_len, kv_len, d, heads;
  long long q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, v_sb, v_sh, v_sr, o_sb, o_sh, o_sr;
  float scale;
};

constexpr int FA_BQ = 64, FA_BK = 64, FA_THREADS = 128;
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix
// then fall in 8 different 4-bank groups, free of bank conflicts.
constexpr int FA_PAD = 8;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared without passing through registers; `valid` false writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a·b for one 16×16 (row-major) by 16×8 (column-major) tile, f32 accumulation.
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, __half*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values rounded to T in one 32-bit register, the first in the low half (a fragment's order).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half*) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Starts copying rows [row0, row0 + 64) of a [rows, d] matrix (row stride `ld`) into a [64][D]
// tile (row stride D + FA_PAD), zero-filling rows past `rows` and columns past `d`.
template <typename T, int D>
__device__ __forceinline__ void fa_load_tile(T* __restrict__ dst, const T* __restrict__ src, int row0, int rows,
                                             int d, long long ld) {
  constexpr int VEC = 8, CHUNKS = D / VEC;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < 64 * CHUNKS; i += FA_THREADS) {
    int r = i / CHUNKS, c = (i % CHUNKS) * VEC;
    bool valid = row0 + r < rows && c < d;  // d is a multiple of 8: a chunk is all in or all out
    cp_async16(dst + r * (D + FA_PAD) + c, valid ? src + (long long)(row0 + r) * ld + c : src, valid);
  }
}

template <typename T, int D>
__device__ void flash_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, AttnArgs a) {
  constexpr int LD = D + FA_PAD;  // shared row stride, elements
  constexpr int KSTEPS = D / 16;  // k-steps of Q·Kᵀ over the head dim
  constexpr int OTILES = D / 8;   // 8-column tiles of the output
  constexpr int STILES = FA_BK / 8;
  T* tag = nullptr;  // picks the mma/pack overload for T
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);  // [64][LD]
  T* ks = qs + FA_BQ * LD;              // [64][LD]
  T* vs = ks + FA_BK * LD;              // [64][LD]

  int b = blockIdx.y / a.heads, h = blockIdx.y % a.heads;
  int q0 = blockIdx.x * FA_BQ;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int g = lane / 4, t = lane % 4;  // a fragment's row group and column pair
  const T* qb = q + b * a.q_sb + h * a.q_sh;
  const T* kb = k + b * a.k_sb + h * a.k_sh;
  const T* vb = v + b * a.v_sb + h * a.v_sh;
  T* ob = o + b * a.o_sb + h * a.o_sh;

  fa_load_tile<T, D>(qs, qb, q0, a.q_len, a.d, a.q_sr);
  fa_load_tile<T, D>(ks, kb, 0, a.kv_len, a.d, a.k_sr);
  cp_async_commit();

  uint32_t qf[KSTEPS][4];  // this warp's 16 query rows as A fragments, loaded once
  float acc[OTILES][4];    // output rows g and g + 8, columns 8n + 2t, +1
#pragma unroll
  for (int n = 0; n < OTILES; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // rows g, g + 8 (this lane's part)
  const float scale_log2 = a.scale * 1.4426950408889634f;               // exp(x·s) = exp2(x·s·log2 e)
  const int tiles = (a.kv_len + FA_BK - 1) / FA_BK;

  for (int tile = 0; tile < tiles; ++tile) {
    const int k0 = tile * FA_BK;
    cp_async_wait_all();
    __syncthreads();  // K (and Q) landed; every warp is done with the last V tile
    fa_load_tile<T, D>(vs, vb, k0, a.kv_len, a.d, a.v_sr);
    cp_async_commit();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk)
        ldmatrix_x4(qf[kk], qs + (warp * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
    }

    // S = Q·Kᵀ: ldmatrix of K's rows gives Kᵀ's column-major B fragments directly.
    float s[STILES][4];
#pragma unroll
    for (int j = 0; j < STILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
      for (int jj = 0; jj < STILES / 2; ++jj) {
        uint32_t r[4];
        ldmatrix_x4(r, ks + (jj * 16 + lane % 8 + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
        mma_16816(s[2 * jj], qf[kk], r[0], r[1], tag);
        mma_16816(s[2 * jj + 1], qf[kk], r[2], r[3], tag);
      }
    }
    if (k0 + FA_BK > a.kv_len) {  // keys past the end take no weight
#pragma unroll
      for (int j = 0; j < STILES; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + 8 * j + 2 * t + (e % 2) >= a.kv_len) s[j][e] = -INFINITY;
    }

    // Online softmax; a row's 64 scores are spread over the 4 lanes of its group.
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = row_max[i];
#pragma unroll
      for (int j = 0; j < STILES; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      corr[i] = exp2f((row_max[i] - mx) * scale_log2);  // 0 on the first tile (-inf); mx is finite
      row_max[i] = mx;
      row_sum[i] *= corr[i];
    }
    uint32_t pf[FA_BK / 16][4];  // P as the A fragments of P·V (a score tile's layout is one)
#pragma unroll
    for (int j = 0; j < STILES; ++j) {
      float p0 = exp2f((s[j][0] - row_max[0]) * scale_log2), p1 = exp2f((s[j][1] - row_max[0]) * scale_log2);
      float p2 = exp2f((s[j][2] - row_max[1]) * scale_log2), p3 = exp2f((s[j][3] - row_max[1]) * scale_log2);
      row_sum[0] += p0 + p1;
      row_sum[1] += p2 + p3;
      pf[j / 2][(j % 2) * 2] = pack2(p0, p1, tag);
      pf[j / 2][(j % 2) * 2 + 1] = pack2(p2, p3, tag);
    }
#pragma unroll
    for (int n = 0; n < OTILES; ++n) {
      acc[n][0] *= corr[0];
      acc[n][1] *= corr[0];
      acc[n][2] *= corr[1];
      acc[n][3] *= corr[1];
    }

    cp_async_wait_all();
    __syncthreads();  // V landed; every warp is done with this K tile
    if (tile + 1 < tiles) {
      fa_load_tile<T, D>(ks, kb, k0 + FA_BK, a.kv_len, a.d, a.k_sr);
      cp_async_commit();
    }
    // O += P·V: V's rows are the k dimension, so its B fragments come through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < FA_BK / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < OTILES / 2; ++nn) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, vs + (kk * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * LD + nn * 16 + 8 * (lane / 16));
        mma_16816(acc[2 * nn], pf[kk], r[0], r[1], tag);
        mma_16816(acc[2 * nn + 1], pf[kk], r[2], r[3], tag);
      }
    }
  }

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    inv[i] = 1.f / sum;
  }
  const int r0 = q0 + warp * 16 + g;
#pragma unroll
  for (int n = 0; n < OTILES; ++n) {
    int c = n * 8 + 2 * t;  // even, and d is a multiple of 8: both columns are in or both out
    if (c >= a.d) continue;
    if (r0 < a.q_len)
      *reinterpret_cast<uint32_t*>(ob + (long long)r0 * a.o_sr + c) = pack2(acc[n][0] * inv[0], acc[n][1] * inv[0], tag);
    if (r0 + 8 < a.q_len)
      *reinterpret_cast<uint32_t*>(ob + (long long)(r0 + 8) * a.o_sr + c) =
          pack2(acc[n][2] * inv[1], acc[n][3] * inv[1], tag);
  }
}

// Shared memory of one flash_attn block: Q, K and V tiles of [64][D + FA_PAD] 2-byte elements.
// (host mirror: ops::cuda::flash_smem_bytes)

#define FLASH(T, SUFFIX, D)                                                                                     \
  extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                       \
      flash_attn_##SUFFIX##_##D(const T* q, const T* k, const T* v, T* o, AttnArgs a) {                          \
    flash_attn<T, D>(q, k, v, o, a);                                                                             \
  }
#define FLASH_ALL(T, SUFFIX) \
  FLASH(T, SUFFIX, 16) FLASH(T, SUFFIX, 32) FLASH(T, SUFFIX, 48) FLASH(T, SUFFIX, 64) FLASH(T, SUFFIX, 80) \
  FLASH(T, SUFFIX, 96) FLASH(T, SUFFIX, 112) FLASH(T, SUFFIX, 128)
FLASH_ALL(__half, f16)
FLASH_ALL(__nv_bfloat16, bf16)
