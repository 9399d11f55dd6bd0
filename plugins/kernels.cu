// lowbit CUDA kernels: the weight-only GEMV/GEMM, lookup-table GEMV, sparse outlier matvec and
// fast Walsh-Hadamard transform behind the `lowbit` ops (plugins/torch_ops.py binds them).
//
// Layouts (documented beside their packers):
// - int4 weights: onnxruntime's MatMulNBits layout, written by ir/kernels.py:to_matmul_nbits.
//   B uint8 [N, n_blocks, block/2] (code 2j in the low nibble of byte j), scales half [N, n_blocks],
//   zero points uint8 [N, ceil(n_blocks/2)] packed the same way, or none (zero point 8).
// - lookup tables: ir/quant.py's bit streams, qweight uint8 [N, ceil(K*bits/8)] little-endian
//   per row, lut half [N, 2^bits].
// - sparse outliers: CSR (ir/quant.py:to_csr): crow int32 [N+1], col int32 [nnz], val half [nnz].
// - Hadamard: n = K * 2^m (ir/hadamard.py): butterflies over the 2^m factor, then the K x K base
//   matrix (float, row-major) over the K factor; output scaled by 1/sqrt(n).
// Activations are half, row-major [M, K]; outputs half [M, N]; accumulation in float.
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- W4A16 GEMV, batch 1..8: one warp per output row, 8 codes (one 32-bit word) per step -------
template <int M>
__global__ void w4_gemv(const half* __restrict__ x, const uint8_t* __restrict__ B, const half* __restrict__ scales,
                        const uint8_t* __restrict__ zp, half* __restrict__ y, int N, int K, int block) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= N) return;
  const int n_blocks = (K + block - 1) / block;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(B + (size_t)warp * n_blocks * (block / 2));
  const half* s = scales + (size_t)warp * n_blocks;
  const uint8_t* z = zp ? zp + (size_t)warp * ((n_blocks + 1) / 2) : nullptr;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  const int words = (K + 7) / 8;  // block >= 16, so the 8 codes of a word share one block
  for (int w = lane; w < words; w += 32) {
    const uint32_t q = __ldg(row + w);
    const int k0 = w * 8, b = k0 / block;
    const float sc = __half2float(s[b]);
    const float zero = z ? (float)((z[b >> 1] >> ((b & 1) * 4)) & 15) : 8.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int k = k0 + j;
      if (k < K) {
        const float wv = ((float)((q >> (4 * j)) & 15u) - zero) * sc;
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] += wv * __half2float(x[(size_t)m * K + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) y[(size_t)m * N + warp] = __float2half(v);
  }
}

// ---- W4A16 GEMM for larger batches: dequantize a 64 x 32 weight tile into shared memory, then
// tensor-core MMA (WMMA 16x16x16, fp32 accumulate); 4 warps, each owning a 32 x 32 output quarter.
constexpr int TM = 64, TN = 64, TK = 32;
__global__ void w4_gemm(const half* __restrict__ x, const uint8_t* __restrict__ B, const half* __restrict__ scales,
                        const uint8_t* __restrict__ zp, half* __restrict__ y, int M, int N, int K, int block) {
  using namespace nvcuda;
  __shared__ __align__(32) half xs[TM][TK + 8];
  __shared__ __align__(32) half ws[TN][TK + 8];  // ws[n][k]: read as a col-major K x N operand
  __shared__ __align__(32) float out[TM][TN + 4];
  const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN, t = threadIdx.x, warp = t >> 5;
  const int n_blocks = (K + block - 1) / block, row_bytes = n_blocks * (block / 2);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0.f);
  for (int k0 = 0; k0 < K; k0 += TK) {
    for (int i = t; i < TM * TK; i += blockDim.x) {
      const int r = i / TK, k = i % TK, gm = m0 + r, gk = k0 + k;
      xs[r][k] = (gm < M && gk < K) ? x[(size_t)gm * K + gk] : __float2half(0.f);
    }
    for (int i = t; i < TN * TK; i += blockDim.x) {
      const int r = i / TK, k = i % TK, gn = n0 + r, gk = k0 + k;
      float v = 0.f;
      if (gn < N && gk < K) {
        const int b = gk / block;
        const uint8_t byte = B[(size_t)gn * row_bytes + gk / 2];
        const float zero = zp ? (float)((zp[(size_t)gn * ((n_blocks + 1) / 2) + (b >> 1)] >> ((b & 1) * 4)) & 15) : 8.f;
        v = ((float)((byte >> ((gk & 1) * 4)) & 15) - zero) * __half2float(scales[(size_t)gn * n_blocks + b]);
      }
      ws[r][k] = __float2half(v);
    }
    __syncthreads();
    for (int kk = 0; kk < TK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &xs[(warp >> 1) * 32 + i * 16][kk], TK + 8);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &ws[(warp & 1) * 32 + j * 16][kk], TK + 8);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&out[(warp >> 1) * 32 + i * 16][(warp & 1) * 32 + j * 16], c[i][j], TN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = t; i < TM * TN; i += blockDim.x) {
    const int r = i / TN, n = i % TN;
    if (m0 + r < M && n0 + n < N) y[(size_t)(m0 + r) * N + n0 + n] = __float2half(out[r][n]);
  }
}

// ---- lookup-table GEMV (SqueezeLLM), bits 3 or 4: one warp per row, its table in shared memory --
template <int M, int BITS>
__global__ void lut_gemv(const half* __restrict__ x, const uint8_t* __restrict__ q, const half* __restrict__ lut,
                         half* __restrict__ y, int N, int K) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= N) return;
  constexpr int L = 1 << BITS;
  __shared__ float tables[4][L];   // 4 warps per block (the launcher's 128 threads)
  float* table = tables[threadIdx.x >> 5];
  if (lane < L) table[lane] = __half2float(lut[(size_t)warp * L + lane]);
  __syncwarp();
  const int row_bytes = (K * BITS + 7) / 8;
  const uint8_t* row = q + (size_t)warp * row_bytes;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  // 32 codes per step: 4 * BITS bytes of the row's bit stream
  for (int c = lane; c * 32 < K; c += 32) {
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) {   // byte loads: a row's stream need not be 4-byte aligned
      const int o = c * 4 * BITS + 4 * i;
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= (o + j < row_bytes ? (uint32_t)row[o + j] : 0u) << (8 * j);
      words[i] = word;
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int k = c * 32 + j;
      if (k < K) {
        const int bit = j * BITS, w = bit >> 5, o = bit & 31;
        uint32_t code = words[w] >> o;
        if (o + BITS > 32 && w + 1 < BITS) code |= words[w + 1] << (32 - o);
        const float wv = table[code & (L - 1)];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] += wv * __half2float(x[(size_t)m * K + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) y[(size_t)m * N + warp] = __float2half(v);
  }
}

// ---- sparse outliers: y[m, r] += sum_j val[j] * x[m, col[j]] over row r's CSR entries ------------
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

// ---- fast Walsh-Hadamard transform: one block per row, the row in shared memory ----------------
__global__ void fwht(const half* __restrict__ x, half* __restrict__ y, int n, int kbase,
                     const float* __restrict__ base) {
  extern __shared__ float v[];   // n floats, then n more for the base-matrix product
  const half* xr = x + (size_t)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = __half2float(xr[i]);
  __syncthreads();
  const int p = n / kbase;       // the 2^m factor: index i = a * p + b
  for (int h = 1; h < p; h <<= 1) {
    for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
      const int a = t / (p / 2), r = t % (p / 2);
      const int i = a * p + (r / h) * 2 * h + (r % h), j = i + h;
      const float u = v[i], w = v[j];
      v[i] = u + w;
      v[j] = u - w;
    }
    __syncthreads();
  }
  const float scale = rsqrtf((float)n);
  half* yr = y + (size_t)blockIdx.x * n;
  if (kbase == 1) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __float2half(v[i] * scale);
    return;
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {   // out[a, b] = sum_c H[c, a] v[c, b]
    const int a = i / p, b = i % p;
    float s = 0.f;
    for (int c = 0; c < kbase; ++c) s += base[c * kbase + a] * v[c * p + b];
    yr[i] = __float2half(s * scale);
  }
}

}  // namespace

// ---- C entry points (ctypes): pointers are device pointers; stream is a cudaStream_t ------------
extern "C" {

int lowbit_w4_matmul(const void* x, const void* B, const void* scales, const void* zp, void* y, int M, int N,
                     int K, int block, void* stream) {
  cudaStream_t s = (cudaStream_t)stream;
  const half* xh = (const half*)x;
  half* yh = (half*)y;
  const uint8_t *b = (const uint8_t*)B, *z = (const uint8_t*)zp;
  const half* sc = (const half*)scales;
  if (block < 16 || (block & (block - 1))) return 1;
  const int threads = 128, grid = (N * 32 + threads - 1) / threads;
  switch (M) {
    case 1: w4_gemv<1><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 2: w4_gemv<2><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 3: w4_gemv<3><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 4: w4_gemv<4><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 5: w4_gemv<5><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 6: w4_gemv<6><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 7: w4_gemv<7><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    case 8: w4_gemv<8><<<grid, threads, 0, s>>>(xh, b, sc, z, yh, N, K, block); break;
    default: {
      dim3 g((N + TN - 1) / TN, (M + TM - 1) / TM);
      w4_gemm<<<g, 128, 0, s>>>(xh, b, sc, z, yh, M, N, K, block);
    }
  }
  return (int)cudaGetLastError();
}

int lowbit_lut_matmul(const void* x, const void* q, const void* lut, void* y, int M, int N, int K, int bits,
                      void* stream) {
  cudaStream_t s = (cudaStream_t)stream;
  const int threads = 128, grid = (N * 32 + threads - 1) / threads;
  const half* xh = (const half*)x;
  const uint8_t* qq = (const uint8_t*)q;
  const half* l = (const half*)lut;
  half* yh = (half*)y;
  if (M < 1 || M > 8) return 1;
#define LUT_CASE(m)                                                                      \
  case m:                                                                                \
    if (bits == 3) lut_gemv<m, 3><<<grid, threads, 0, s>>>(xh, qq, l, yh, N, K);         \
    else if (bits == 4) lut_gemv<m, 4><<<grid, threads, 0, s>>>(xh, qq, l, yh, N, K);    \
    else return 1;                                                                       \
    break;
  switch (M) { LUT_CASE(1) LUT_CASE(2) LUT_CASE(3) LUT_CASE(4) LUT_CASE(5) LUT_CASE(6) LUT_CASE(7) LUT_CASE(8) }
#undef LUT_CASE
  return (int)cudaGetLastError();
}

int lowbit_csr_add(const void* x, const void* crow, const void* col, const void* val, void* y, int M, int N, int K,
                   void* stream) {
  const int threads = 128, grid = (N * 32 + threads - 1) / threads;
  csr_add<<<grid, threads, 0, (cudaStream_t)stream>>>((const half*)x, (const int*)crow, (const int*)col,
                                                      (const half*)val, (half*)y, M, N, K);
  return (int)cudaGetLastError();
}

int lowbit_hadamard(const void* x, void* y, int rows, int n, int kbase, const void* base, void* stream) {
  const size_t smem = (size_t)n * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(fwht, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) return 1;
  }
  fwht<<<rows, 256, smem, (cudaStream_t)stream>>>((const half*)x, (half*)y, n, kbase, (const float*)base);
  return (int)cudaGetLastError();
}

}  // extern "C"
