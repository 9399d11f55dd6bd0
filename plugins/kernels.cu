// lowbit CUDA kernels: the weight-only GEMV, lookup-table GEMV, sparse outlier matvec and fast
// Walsh-Hadamard transform behind the `lowbit` ops (plugins/torch_ops.py binds them).
//
// Layouts (documented beside their packers):
// - int4 weights: onnxruntime's MatMulNBits layout, written by ir/kernels.py:to_matmul_nbits.
//   B uint8 [N, n_blocks, block/2] (code 2j in the low nibble of byte j), scales half [N, n_blocks],
//   zero points uint8 [N, ceil(n_blocks/2)] packed the same way, or none (zero point 8). The GEMV
//   reads it as is: with block >= 32 every 16-byte load holds 32 codes of one block.
// - lookup tables: ir/quant.py's bit streams, qweight uint8 [N, ceil(K*bits/8)], code j at bits
//   [j*bits, (j+1)*bits) little-endian; lut half [N, 2^bits].
// - sparse outliers: CSR (ir/quant.py:to_csr): crow int32 [N+1], col int32 [nnz], val half [nnz].
//   The GEMV kernels add them in their epilogue (csr pointers non-null), so outliers cost a few
//   gathers per row instead of a second pass; csr_add is the stand-alone form.
// - Hadamard: n = K * 2^m (ir/hadamard.py): butterflies over the 2^m factor in registers and
//   shared memory, then the K x K base matrix on tensor cores (hT: half [kpad, kpad], H transposed
//   and zero-padded to a multiple of 16); output scaled by 1/sqrt(n).
// Activations are half, row-major [M, K]; outputs half [M, N]. Products are summed in half2 over
// at most 32 codes, then in float.
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace {

constexpr int THREADS = 128;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// weights are read once: keep them out of L1
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ half2 as_h2(uint32_t v) { return *reinterpret_cast<half2*>(&v); }

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// activations x[k .. k+8) as four half2 words, zero past K
__device__ __forceinline__ uint4 load_x8(const half* __restrict__ xr, int k, int K, bool vec) {
  if (vec && k + 8 <= K) return *reinterpret_cast<const uint4*>(xr + k);
  uint32_t h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = k + j < K ? __half_as_ushort(xr[k + j]) : 0u;
  return make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
}

// the GEMVs' accumulators: float acc[M][R] over the whole row, half2 partial sums over 32 codes
template <typename T, int M, int R>
__device__ __forceinline__ void fill(T (&a)[M][R], T v) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) a[m][r] = v;
}

template <int M, int R>
__device__ __forceinline__ void flush(float (&acc)[M][R], const half2 (&sum)[M][R]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float2 f = __half22float2(sum[m][r]);
      acc[m][r] += f.x + f.y;
    }
}

// Outliers of rows row0 .. row0+R-1, split across `threads` threads from `t`: `fetch` reads the
// first entry of each row's share, `add` adds it and the rest (rows with more entries than
// threads). The LUT GEMV fetches before its dense loop (the latency hides behind the weights'); the
// int4 GEMV fetches after it (measured faster there: the prefetch costs registers).
template <int R>
struct Outliers {
  int k[R], j[R], end[R];
  float v[R];
  __device__ __forceinline__ void fetch(const int* __restrict__ crow, const int* __restrict__ col,
                                        const half* __restrict__ val, int row0, int N, int t) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      j[r] = end[r] = 0, k[r] = 0, v[r] = 0.f;
      if (crow && row0 + r < N) {
        j[r] = crow[row0 + r] + t, end[r] = crow[row0 + r + 1];
        if (j[r] < end[r]) k[r] = col[j[r]], v[r] = __half2float(val[j[r]]);
      }
    }
  }
  template <int M>
  __device__ __forceinline__ void add(float (&acc)[M][R], const half* __restrict__ x, const int* __restrict__ col,
                                      const half* __restrict__ val, int K, int threads) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (j[r] >= end[r]) continue;
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m][r] += v[r] * __half2float(x[(size_t)m * K + k[r]]);
      for (int jj = j[r] + threads; jj < end[r]; jj += threads) {
        const float vv = __half2float(val[jj]);
        const int kk = col[jj];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m][r] += vv * __half2float(x[(size_t)m * K + kk]);
      }
    }
  }
};

// ---- W4A16 GEMV, batch 1..4: a block of 128 threads owns R output rows and splits K in 32-code
// chunks (one 16-byte load per row per chunk). Nibbles become halves by the exponent trick
// (0x6400 | q = 1024 + q), so dequantization is two half2 ops per two weights.
template <int M, int R>
__global__ void __launch_bounds__(THREADS) w4_gemv(const half* __restrict__ x, const uint8_t* __restrict__ B,
                                                   const half* __restrict__ scales, const uint8_t* __restrict__ zp,
                                                   const int* __restrict__ crow, const int* __restrict__ col,
                                                   const half* __restrict__ val, half* __restrict__ y, int N, int K,
                                                   int block, bool xvec) {
  const int row0 = blockIdx.x * R, t = threadIdx.x;
  const int n_blocks = (K + block - 1) / block, row_chunks = n_blocks * block / 32, chunks = (K + 31) / 32;
  const int zrow = (n_blocks + 1) / 2, gshift = __ffs(block) - 6;   // chunk -> block: c >> log2(block / 32)
  float acc[M][R];
  fill(acc, 0.f);
  for (int c = t; c < chunks; c += THREADS) {
    uint4 w[R];
    half2 s2[R], z2[R];
    const int b = c >> gshift;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = min(row0 + r, N - 1);   // rows past N repeat the last one and are never stored
      w[r] = ld_stream(B + ((size_t)n * row_chunks + c) * 16);
      s2[r] = __half2half2(scales[(size_t)n * n_blocks + b]);
      const int zero = zp ? (zp[(size_t)n * zrow + (b >> 1)] >> ((b & 1) * 4)) & 15 : 8;
      z2[r] = as_h2((0x6400u | zero) * 0x10001u);
    }
    half2 sum[M][R];
    fill(sum, __float2half2_rn(0.f));
#pragma unroll
    for (int i = 0; i < 4; ++i) {   // word i: codes 8i .. 8i+7 of the chunk
      half2 xp[M][4];               // (x_j, x_j+4): the pairs the nibble masks produce
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 v = load_x8(x + (size_t)m * K, c * 32 + 8 * i, K, xvec);
        xp[m][0] = as_h2(__byte_perm(v.x, v.z, 0x5410));
        xp[m][1] = as_h2(__byte_perm(v.x, v.z, 0x7632));
        xp[m][2] = as_h2(__byte_perm(v.y, v.w, 0x5410));
        xp[m][3] = as_h2(__byte_perm(v.y, v.w, 0x7632));
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t q = word(w[r], i);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const half2 d = __hmul2(__hsub2(as_h2(((q >> (4 * j)) & 0x000F000Fu) | 0x64006400u), z2[r]), s2[r]);
#pragma unroll
          for (int m = 0; m < M; ++m) sum[m][r] = __hfma2(d, xp[m][j], sum[m][r]);
        }
      }
    }
    flush(acc, sum);
  }
  Outliers<R> out;
  out.fetch(crow, col, val, row0, N, t);
  out.template add<M>(acc, x, col, val, K, THREADS);
  __shared__ float part[THREADS / 32][M * R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float v = warp_sum(acc[m][r]);
      if ((t & 31) == 0) part[t >> 5][m * R + r] = v;
    }
  __syncthreads();
  if (t < M * R && row0 + t % R < N) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) s += part[w][t];
    y[(size_t)(t / R) * N + row0 + t % R] = __float2half(s);
  }
}

// ---- int4 -> half weights [N, K] (batches above the GEMV's: then a cuBLAS tensor-core GEMM) ---
__global__ void w4_dequant(const uint8_t* __restrict__ B, const half* __restrict__ scales, const uint8_t* __restrict__ zp,
                           half* __restrict__ w, int N, int K, int block) {
  const int n_blocks = (K + block - 1) / block, row_chunks = n_blocks * block / 32, chunks = (K + 31) / 32;
  const size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (size_t)N * chunks) return;
  const int n = id / chunks, c = id % chunks, b = c * 32 / block;
  const uint4 q = ld_stream(B + ((size_t)n * row_chunks + c) * 16);
  const float s = __half2float(scales[(size_t)n * n_blocks + b]);
  const float zero = zp ? (float)((zp[(size_t)n * ((n_blocks + 1) / 2) + (b >> 1)] >> ((b & 1) * 4)) & 15) : 8.f;
  half* out = w + (size_t)n * K + c * 32;
  const bool vec = K % 8 == 0 && c * 32 + 32 <= K;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t qi = word(q, i);
    uint32_t h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const half lo = __float2half(((float)((qi >> (8 * j)) & 15) - zero) * s);
      const half hi = __float2half(((float)((qi >> (8 * j + 4)) & 15) - zero) * s);
      h[j] = __half_as_ushort(lo) | (uint32_t)__half_as_ushort(hi) << 16;
      if (!vec) {
        if (c * 32 + 8 * i + 2 * j < K) out[8 * i + 2 * j] = lo;
        if (c * 32 + 8 * i + 2 * j + 1 < K) out[8 * i + 2 * j + 1] = hi;
      }
    }
    if (vec) reinterpret_cast<uint4*>(out)[i] = make_uint4(h[0], h[1], h[2], h[3]);
  }
}

// ---- lookup-table GEMV (SqueezeLLM), bits 3 or 4, batch 1..8: a warp owns R rows (their tables in
// shared memory, read as broadcasts) and its lanes split K in 128-code chunks (BITS 16-byte loads
// per row when rows are 16-byte aligned, byte loads otherwise). Bit offsets are compile-time.
template <int M, int BITS, int R>
__global__ void __launch_bounds__(THREADS) lut_gemv(const half* __restrict__ x, const uint8_t* __restrict__ q,
                                                    const half* __restrict__ lut, const int* __restrict__ crow,
                                                    const int* __restrict__ col, const half* __restrict__ val,
                                                    half* __restrict__ y, int N, int K, bool qvec, bool xvec) {
  constexpr int L = 1 << BITS, WORDS = 4 * BITS;
  __shared__ half tables[THREADS / 32][R][L];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (THREADS / 32) + warp) * R;
  for (int i = lane; i < R * L; i += 32) tables[warp][i / L][i % L] = lut[(size_t)min(row0 + i / L, N - 1) * L + i % L];
  __syncwarp();
  Outliers<R> out;
  out.fetch(crow, col, val, row0, N, lane);
  const int row_bytes = (K * BITS + 7) / 8, chunks = (K + 127) / 128;
  float acc[M][R];
  fill(acc, 0.f);
  for (int c = lane; c < chunks; c += 32) {
    uint32_t w[R][WORDS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = q + (size_t)min(row0 + r, N - 1) * row_bytes;
      const int o = c * 16 * BITS;
      if (qvec) {
#pragma unroll
        for (int i = 0; i < BITS; ++i) {
          const uint4 v = ld_stream(p + o + 16 * i);
          w[r][4 * i] = v.x, w[r][4 * i + 1] = v.y, w[r][4 * i + 2] = v.z, w[r][4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) {
          uint32_t v = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) v |= (o + 4 * i + j < row_bytes ? (uint32_t)p[o + 4 * i + j] : 0u) << (8 * j);
          w[r][i] = v;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) {   // 32 codes per half2 partial sum
      half2 sum[M][R];
      fill(sum, __float2half2_rn(0.f));
#pragma unroll
      for (int s8 = 0; s8 < 4; ++s8) {
        const int j0 = g * 32 + s8 * 8;   // first code of these 8, within the chunk
        uint4 xv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) xv[m] = load_x8(x + (size_t)m * K, c * 128 + j0, K, xvec);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            half t[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int bit = (j0 + 2 * e + h) * BITS, wi = bit >> 5, o = bit & 31;
              uint32_t code = w[r][wi] >> o;
              if (o + BITS > 32) code |= w[r][wi + 1] << (32 - o);
              t[h] = tables[warp][r][code & (L - 1)];
            }
            const half2 tp = __halves2half2(t[0], t[1]);
#pragma unroll
            for (int m = 0; m < M; ++m) sum[m][r] = __hfma2(tp, as_h2(word(xv[m], e)), sum[m][r]);
          }
        }
      }
      flush(acc, sum);
    }
  }
  out.template add<M>(acc, x, col, val, K, 32);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float v = warp_sum(acc[m][r]);
      if (lane == 0 && row0 + r < N) y[(size_t)m * N + row0 + r] = __float2half(v);
    }
}

// ---- sparse outliers alone: y[m, r] += sum_j val[j] * x[m, col[j]] over row r's CSR entries -----
__global__ void csr_add(const half* __restrict__ x, const int* __restrict__ crow, const int* __restrict__ col,
                        const half* __restrict__ val, half* __restrict__ y, int M, int N, int K) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= N) return;
  for (int m = 0; m < M; ++m) {
    float acc = 0.f;
    for (int j = crow[warp] + lane; j < crow[warp + 1]; j += 32)
      acc += __half2float(val[j]) * __half2float(x[(size_t)m * K + col[j]]);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)m * N + warp] = __float2half(__half2float(y[(size_t)m * N + warp]) + acc);
  }
}

// ---- fast Walsh-Hadamard transform: one block per row, the row in shared memory as float ------
constexpr int HT = 256;

template <int RADIX>   // butterflies over strides h, 2h, .., RADIX/2 h of every 2^m block
__device__ __forceinline__ void had_pass(float* v, int n, int p, int h) {
  const int per = p / RADIX;
  for (int g = threadIdx.x; g < n / RADIX; g += HT) {
    const int a = g / per, r = g % per, base = a * p + (r / h) * RADIX * h + r % h;
    float e[RADIX];
#pragma unroll
    for (int j = 0; j < RADIX; ++j) e[j] = v[base + j * h];
#pragma unroll
    for (int s = 1; s < RADIX; s <<= 1)
#pragma unroll
      for (int j = 0; j < RADIX; ++j)
        if (!(j & s)) {
          const float u = e[j], w = e[j + s];
          e[j] = u + w, e[j + s] = u - w;
        }
#pragma unroll
    for (int j = 0; j < RADIX; ++j) v[base + j * h] = e[j];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(HT) fwht(const half* __restrict__ x, half* __restrict__ y, int n, int kbase, int kpad,
                                           const half* __restrict__ hT) {
  extern __shared__ __align__(32) unsigned char smem[];
  float* v = reinterpret_cast<float*>(smem);
  const int p = n / kbase;
  const half* xr = x + (size_t)blockIdx.x * n;
  half* yr = y + (size_t)blockIdx.x * n;
  int h = 1;
  if (p >= 8) {   // 16-byte loads, the first three butterfly stages in registers
    for (int i = threadIdx.x; i < n / 8; i += HT) {
      const uint4 u = reinterpret_cast<const uint4*>(xr)[i];
      float e[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(as_h2(word(u, j)));
        e[2 * j] = f.x, e[2 * j + 1] = f.y;
      }
#pragma unroll
      for (int s = 1; s < 8; s <<= 1)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (!(j & s)) {
            const float a = e[j], b = e[j + s];
            e[j] = a + b, e[j + s] = a - b;
          }
      reinterpret_cast<float4*>(v)[2 * i] = make_float4(e[0], e[1], e[2], e[3]);
      reinterpret_cast<float4*>(v)[2 * i + 1] = make_float4(e[4], e[5], e[6], e[7]);
    }
    h = 8;
  } else {
    for (int i = threadIdx.x; i < n; i += HT) v[i] = __half2float(xr[i]);
  }
  __syncthreads();
  while (h < p) {
    if (8 * h <= p) had_pass<8>(v, n, p, h), h *= 8;
    else if (4 * h <= p) had_pass<4>(v, n, p, h), h *= 4;
    else had_pass<2>(v, n, p, h), h *= 2;
  }
  const float scale = rsqrtf((float)n);
  if (kbase == 1) {
    if (n % 8 == 0) {
      for (int i = threadIdx.x; i < n / 8; i += HT) {
        const float4 a = reinterpret_cast<float4*>(v)[2 * i], b = reinterpret_cast<float4*>(v)[2 * i + 1];
        const half2 o[4] = {__floats2half2_rn(a.x * scale, a.y * scale), __floats2half2_rn(a.z * scale, a.w * scale),
                            __floats2half2_rn(b.x * scale, b.y * scale), __floats2half2_rn(b.z * scale, b.w * scale)};
        reinterpret_cast<uint4*>(yr)[i] = *reinterpret_cast<const uint4*>(o);
      }
    } else {
      for (int i = threadIdx.x; i < n; i += HT) yr[i] = __float2half(v[i] * scale);
    }
    return;
  }
  // base factor: out[a, b] = sum_c H[c, a] v[c, b], a (kpad x kpad) x (kpad x pp) product on
  // tensor cores; V in half, rows past kbase and columns past p zero
  using namespace nvcuda;
  const int pp = p < 16 ? 16 : p, ld = pp + 8;
  half* vh = reinterpret_cast<half*>(smem + ((size_t)n * 4 + 31) / 32 * 32);
  float* scratch = reinterpret_cast<float*>(vh + (size_t)kpad * ld) + (threadIdx.x >> 5) * 256;
  for (int i = threadIdx.x; i < kpad * pp; i += HT) {
    const int c = i / pp, b = i % pp;
    vh[c * ld + b] = __float2half(c < kbase && b < p ? v[c * p + b] : 0.f);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, tb = pp / 16;
  for (int tile = threadIdx.x >> 5; tile < kpad / 16 * tb; tile += HT / 32) {
    const int a0 = tile / tb * 16, b0 = tile % tb * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int c0 = 0; c0 < kpad; c0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, hT + (size_t)a0 * kpad + c0, kpad);
      wmma::load_matrix_sync(fb, vh + c0 * ld + b0, ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(scratch, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int a = a0 + e / 16, b = b0 + e % 16;
      if (a < kbase && b < p) yr[a * p + b] = __float2half(scratch[e] * scale);
    }
    __syncwarp();
  }
}

bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

}  // namespace

// ---- C entry points (ctypes): pointers are device pointers; stream is a cudaStream_t. They return
// 0, a CUDA error code, or -1 for a case the kernels do not take (the caller falls back) ----------
extern "C" {

// y = x @ W^T (+ the CSR outliers when crow is non-null), M <= 32: the GEMV, 4 rows of x per launch
// (on an H100 two 4-row launches took 20 us where one 8-row launch took 30, K = N = 4096)
int lowbit_w4_matmul(const void* x, const void* B, const void* scales, const void* zp, const void* crow,
                     const void* col, const void* val, void* y, int M, int N, int K, int block, void* stream) {
  if (block < 32 || (block & (block - 1)) || M < 1 || M > 32 || !aligned16(B)) return -1;
  cudaStream_t s = (cudaStream_t)stream;
  const uint8_t *b = (const uint8_t*)B, *z = (const uint8_t*)zp;
  const half* sc = (const half*)scales;
  const int *cr = (const int*)crow, *cc = (const int*)col;
  const half* cv = (const half*)val;
  const bool xvec = K % 8 == 0 && aligned16(x);
  for (int i = 0; i < M; i += 4) {
    const half* xh = (const half*)x + (size_t)i * K;
    half* yh = (half*)y + (size_t)i * N;
#define W4_CASE(m)                                                                                                 \
  case m:                                                                                                          \
    w4_gemv<m, 4><<<(N + 3) / 4, THREADS, 0, s>>>(xh, b, sc, z, cr, cc, cv, yh, N, K, block, xvec);                \
    break;
    switch (M - i < 4 ? M - i : 4) { W4_CASE(1) W4_CASE(2) W4_CASE(3) W4_CASE(4) }
#undef W4_CASE
  }
  return (int)cudaGetLastError();
}

int lowbit_w4_dequant(const void* B, const void* scales, const void* zp, void* w, int N, int K, int block,
                      void* stream) {
  if (block < 32 || (block & (block - 1)) || !aligned16(B)) return -1;
  const size_t total = (size_t)N * ((K + 31) / 32);
  w4_dequant<<<(unsigned)((total + 255) / 256), 256, 0, (cudaStream_t)stream>>>(
      (const uint8_t*)B, (const half*)scales, (const uint8_t*)zp, (half*)w, N, K, block);
  return (int)cudaGetLastError();
}

int lowbit_lut_matmul(const void* x, const void* q, const void* lut, const void* crow, const void* col, const void* val,
                      void* y, int M, int N, int K, int bits, void* stream) {
  if (M < 1 || M > 8 || (bits != 3 && bits != 4)) return -1;
  cudaStream_t s = (cudaStream_t)stream;
  const half *l = (const half*)lut, *cv = (const half*)val;
  const uint8_t* qq = (const uint8_t*)q;
  const int *cr = (const int*)crow, *cc = (const int*)col;
  const bool qvec = K % 128 == 0 && aligned16(q), xvec = K % 8 == 0 && aligned16(x);
  for (int i = 0; i < M;) {   // batches of 8, 4, 2 and 1 rows of x (fewer kernels to compile)
    const int m = M - i >= 8 ? 8 : M - i >= 4 ? 4 : M - i >= 2 ? 2 : 1;
    const half* xh = (const half*)x + (size_t)i * K;
    half* yh = (half*)y + (size_t)i * N;
#define LUT_CASE(m, r)                                                                                             \
  case m: {                                                                                                        \
    const int grid = (N + 4 * r - 1) / (4 * r);                                                                    \
    if (bits == 3) lut_gemv<m, 3, r><<<grid, THREADS, 0, s>>>(xh, qq, l, cr, cc, cv, yh, N, K, qvec, xvec);        \
    else lut_gemv<m, 4, r><<<grid, THREADS, 0, s>>>(xh, qq, l, cr, cc, cv, yh, N, K, qvec, xvec);                  \
    break;                                                                                                         \
  }
    switch (m) { LUT_CASE(1, 4) LUT_CASE(2, 4) LUT_CASE(4, 2) LUT_CASE(8, 1) }
#undef LUT_CASE
    i += m;
  }
  return (int)cudaGetLastError();
}

int lowbit_csr_add(const void* x, const void* crow, const void* col, const void* val, void* y, int M, int N, int K,
                   void* stream) {
  const int threads = 128, grid = (N * 32 + threads - 1) / threads;
  csr_add<<<grid, threads, 0, (cudaStream_t)stream>>>((const half*)x, (const int*)crow, (const int*)col,
                                                      (const half*)val, (half*)y, M, N, K);
  return (int)cudaGetLastError();
}

// hT: half [kpad, kpad] (H transposed, zero-padded), null when kbase == 1
int lowbit_hadamard(const void* x, void* y, int rows, int n, int kbase, int kpad, const void* hT, void* stream) {
  const int p = n / kbase;
  if ((p >= 8 && !aligned16(x)) || (n % 8 == 0 && kbase == 1 && !aligned16(y))) return -1;
  size_t smem = ((size_t)n * 4 + 31) / 32 * 32;
  if (kbase > 1) smem += (size_t)kpad * ((p < 16 ? 16 : p) + 8) * 2 + HT / 32 * 256 * 4;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(fwht, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess)
    return -1;
  fwht<<<rows, HT, smem, (cudaStream_t)stream>>>((const half*)x, (half*)y, n, kbase, kpad, (const half*)hT);
  return (int)cudaGetLastError();
}

}  // extern "C"
