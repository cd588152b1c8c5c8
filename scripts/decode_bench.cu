// Standalone timing of the decode kernel (csrc/lora_decode.cu) without torch: built here with nvcc, carried to
// the GPU machine as a binary, so a device call spends its time measuring, not installing.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -DLORA_OPS_DECODE_DIAG=1 -Icsrc \
//        csrc/lora_decode.cu scripts/decode_bench.cu -o build/decode_bench        (scripts/build_decode_bench.sh)
//   build/decode_bench [--n 14336] [--k 4096] [--r 16] [--copies 4] [--diag "0 1 2 4 8 15"] [--ms "1 16"]
//
// For each weight format (NF4 double quant, bf16), M and diagnostics mask (LORA_OPS_DECODE_DIAG, see the
// Diag enum in lora_decode.cu; 0 = the real kernel, checked against an fp32 reference here) it prints:
//   graph : us per call, CUDA graph of 200 calls rotating over `copies` weights (no flush; launch gaps are a
//           graph's); the weights together exceed L2, so every call streams its weight from DRAM.
//   flush : do_bench's method: a 256 MB memset before each call (L2 full of dirty lines), events around one
//           call, median of 100.
// and, as the floor of the same bytes, a kernel that only reads them (16-byte loads, all SMs) timed both ways.
// Data are random (any byte is a valid NF4 pair; the 16 code values are random floats, not NF4's: the kernel
// takes them from a tensor).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "lora_decode.h"

#define CK(e)                                                                                   \
  do {                                                                                          \
    cudaError_t err_ = (e);                                                                     \
    if (err_ != cudaSuccess) {                                                                  \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #e, cudaGetErrorString(err_));     \
      exit(1);                                                                                  \
    }                                                                                           \
  } while (0)

namespace {

__device__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}
__device__ float unif(uint64_t i, uint32_t seed) { return (hash32(i, seed) >> 8) * (1.0f / 16777216.0f); }

__global__ void fill_bytes(uint8_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = hash32(i, seed) & 0xff;
}
__global__ void fill_f32(float* p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = lo + (hi - lo) * unif(i, seed);
}
__global__ void fill_bf16(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16((2.0f * unif(i, seed) - 1.0f) * scale);
}

// fp32 reference: one thread per (m, n); W dequantized exactly as lora_ops.nf4 does (product then sum, rounded).
__global__ void reference(const __nv_bfloat16* x, const void* w, const uint8_t* qabs, const float* nabs,
                          const float* ncode, const float* offset, const float* code, int bs, bool nf4,
                          const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* bias, float scaling,
                          int M, int N, int K, int r, float* y) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  double acc = 0.0;
  for (int k = 0; k < K; ++k) {
    const int64_t f = (int64_t)n * K + k;
    float wv;
    if (nf4) {
      const uint8_t byte = static_cast<const uint8_t*>(w)[f >> 1];
      const int c = (f & 1) ? (byte & 15) : (byte >> 4);
      const int64_t blk = f / bs;
      const float s = __fadd_rn(__fmul_rn(ncode[qabs[blk]], nabs[blk >> 8]), *offset);
      wv = __bfloat162float(__float2bfloat16(__fmul_rn(code[c], s)));  // the dequantized weight in x.dtype
    } else {
      wv = __bfloat162float(static_cast<const __nv_bfloat16*>(w)[f]);
    }
    acc += (double)__bfloat162float(x[(int64_t)m * K + k]) * wv;
  }
  double lora = 0.0;
  for (int j = 0; j < r; ++j) {
    double s = 0.0;
    for (int k = 0; k < K; ++k)
      s += (double)__bfloat162float(x[(int64_t)m * K + k]) * __bfloat162float(A[(int64_t)j * K + k]);
    lora += s * __bfloat162float(B[(int64_t)n * r + j]);
  }
  y[(int64_t)m * N + n] = (float)(acc + scaling * lora + __bfloat162float(bias[n]));
}

// The floor: read `bytes` once with 16-byte loads over the whole chip, keep one word per block.
__global__ void read_only(const uint4* p, int64_t n16, uint32_t* sink) {
  uint32_t v = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n16; i += (int64_t)gridDim.x * blockDim.x) {
    const uint4 q = __ldcs(p + i);
    v ^= q.x ^ q.y ^ q.z ^ q.w;
  }
  if (v == 0x12345678u) sink[blockIdx.x] = v;
}

struct Timer {
  cudaStream_t s;
  void* flush;
  size_t flush_bytes = 256u << 20;
  explicit Timer(cudaStream_t st) : s(st) { CK(cudaMalloc(&flush, flush_bytes)); }
  template <typename F>
  float graph_us(F launch, int calls = 200) {
    for (int i = 0; i < 10; ++i) launch(i);
    CK(cudaStreamSynchronize(s));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < calls; ++i) launch(i);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> v;
    for (int rep = 0; rep < 7; ++rep) {
      CK(cudaEventRecord(a, s));
      CK(cudaGraphLaunch(ge, s));
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      v.push_back(1e3f * ms / calls);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
  template <typename F>
  float flush_us(F launch, int reps = 100) {
    for (int i = 0; i < 5; ++i) launch(i);
    std::vector<cudaEvent_t> a(reps), b(reps);
    for (int i = 0; i < reps; ++i) {
      CK(cudaEventCreate(&a[i]));
      CK(cudaEventCreate(&b[i]));
    }
    for (int i = 0; i < reps; ++i) {
      CK(cudaMemsetAsync(flush, 0, flush_bytes, s));
      CK(cudaEventRecord(a[i], s));
      launch(i);
      CK(cudaEventRecord(b[i], s));
    }
    CK(cudaStreamSynchronize(s));
    std::vector<float> v;
    for (int i = 0; i < reps; ++i) {
      float ms;
      CK(cudaEventElapsedTime(&ms, a[i], b[i]));
      v.push_back(1e3f * ms);
      cudaEventDestroy(a[i]);
      cudaEventDestroy(b[i]);
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
};

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  int x;
  while (ss >> x) v.push_back(x);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int N = 14336, K = 4096, r = 16, copies = 4, bs = 64;
  std::vector<int> diags = {0, 1, 2, 4, 8, 1 | 2 | 8, 16, 32, 64};
  std::vector<int> ms = {1, 16};
  std::string formats = "nf4 dense";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--n")) N = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--k")) K = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--r")) r = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--copies")) copies = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--diag")) diags = parse_list(argv[i + 1]);
    else if (!strcmp(argv[i], "--ms")) ms = parse_list(argv[i + 1]);
    else if (!strcmp(argv[i], "--formats")) formats = argv[i + 1];
    else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  Timer tm(st);
  const int64_t nk = (int64_t)N * K, nblk = nk / bs;
  const int G = 1024, TB = 256;

  // Inputs shared by all copies.
  __nv_bfloat16 *x, *A, *B, *bias, *y;
  float *nabs, *ncode, *offset, *code, *yref;
  CK(cudaMalloc(&x, 16 * K * 2));
  CK(cudaMalloc(&A, (int64_t)r * K * 2));
  CK(cudaMalloc(&B, (int64_t)N * r * 2));
  CK(cudaMalloc(&bias, N * 2));
  CK(cudaMalloc(&y, 16 * (int64_t)N * 2));
  CK(cudaMalloc(&yref, 16 * (int64_t)N * 4));
  CK(cudaMalloc(&nabs, (nblk / 256 + 1) * 4));
  CK(cudaMalloc(&ncode, 256 * 4));
  CK(cudaMalloc(&offset, 4));
  CK(cudaMalloc(&code, 16 * 4));
  fill_bf16<<<G, TB, 0, st>>>(x, 16 * K, 1, 1.0f);
  fill_bf16<<<G, TB, 0, st>>>(A, (int64_t)r * K, 2, 0.03f);
  fill_bf16<<<G, TB, 0, st>>>(B, (int64_t)N * r, 3, 0.1f);
  fill_bf16<<<G, TB, 0, st>>>(bias, N, 4, 0.1f);
  fill_f32<<<G, TB, 0, st>>>(nabs, nblk / 256 + 1, 5, 0.01f, 0.02f);
  fill_f32<<<G, TB, 0, st>>>(ncode, 256, 6, 0.0f, 1.0f);
  fill_f32<<<G, TB, 0, st>>>(offset, 1, 7, 0.001f, 0.002f);
  fill_f32<<<G, TB, 0, st>>>(code, 16, 8, -1.0f, 1.0f);
  uint32_t* sink;
  CK(cudaMalloc(&sink, 4096 * 4));

  printf("decode_bench on %s (%d SMs, L2 %d MB): N=%d K=%d r=%d, %d rotated weight copies\n", prop.name,
         prop.multiProcessorCount, prop.l2CacheSize >> 20, N, K, r, copies);
  // Copy bandwidth in this process (read + write bytes / time), the ceiling the decode timings are reported against.
  {
    void *src, *dst;
    const size_t cb = 256u << 20;
    CK(cudaMalloc(&src, cb));
    CK(cudaMalloc(&dst, cb));
    const float us = tm.graph_us([&](int) { CK(cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice, st)); }, 20);
    printf("copy: %.0f GB/s (read+write)\n", 2.0 * cb / us / 1e3);
    CK(cudaFree(src));
    CK(cudaFree(dst));
  }

  std::stringstream fs(formats);
  std::string fmt;
  while (fs >> fmt) {
    const bool nf4 = fmt == "nf4";
    const int64_t wbytes = nf4 ? nk / 2 : nk * 2, abytes = nf4 ? nblk : 0;
    std::vector<void*> w(copies);
    std::vector<uint8_t*> qabs(copies, nullptr);
    for (int c = 0; c < copies; ++c) {
      CK(cudaMalloc(&w[c], wbytes));
      if (nf4) {
        fill_bytes<<<G, TB, 0, st>>>(static_cast<uint8_t*>(w[c]), wbytes, 100 + c);
        CK(cudaMalloc(&qabs[c], abytes));
        fill_bytes<<<G, TB, 0, st>>>(qabs[c], abytes, 200 + c);
      } else {
        fill_bf16<<<G, TB, 0, st>>>(static_cast<__nv_bfloat16*>(w[c]), nk, 100 + c, 0.05f);
      }
    }
    const double bytes = (double)wbytes + abytes;
    const float f_graph = tm.graph_us([&](int i) {
      read_only<<<prop.multiProcessorCount * 8, 512, 0, st>>>(static_cast<const uint4*>(w[i % copies]), wbytes / 16,
                                                              sink);
    });
    const float f_flush = tm.flush_us([&](int i) {
      read_only<<<prop.multiProcessorCount * 8, 512, 0, st>>>(static_cast<const uint4*>(w[i % copies]), wbytes / 16,
                                                              sink);
    });
    printf("\n[%s] weight %.1f MB (+ absmax %.2f MB). floor (read-only kernel over the same bytes): graph %.1f us "
           "(%.0f GB/s), flush %.1f us\n",
           fmt.c_str(), wbytes / 1e6, abytes / 1e6, f_graph, wbytes / f_graph / 1e3, f_flush);
    for (int M : ms) {
      LoraOpsDecodeArgs a{};
      a.x = x;
      a.lora_A = A;
      a.lora_B = B;
      a.bias = bias;
      a.y = y;
      a.M = M;
      a.N = N;
      a.K = K;
      a.r = r;
      a.scaling = 0.5f;
      a.kind = LORA_OPS_BFLOAT16;
      a.weight_format = nf4 ? LORA_OPS_DECODE_NF4 : LORA_OPS_DECODE_DENSE;
      if (nf4) {
        a.blocksize = bs;
        a.nested_absmax = nabs;
        a.nested_code = ncode;
        a.offset = offset;
        a.codebook = code;
      }
      auto launch = [&](int i) {
        LoraOpsDecodeArgs b = a;
        b.weight = w[i % copies];
        b.absmax = qabs[i % copies];
        CK(lora_ops_lora_decode(&b, st));
      };
      for (int d : diags) {
        char buf[16];
        snprintf(buf, sizeof buf, "%d", d);
        setenv("LORA_OPS_DECODE_DIAG", buf, 1);
        float err = -1.0f;
        if (d == 0) {  // check the real kernel against the fp32 reference (copy 0)
          launch(0);
          reference<<<dim3((N + 127) / 128, M), 128, 0, st>>>(x, w[0], qabs[0], nabs, ncode, offset, code, bs, nf4, A,
                                                            B, bias, 0.5f, M, N, K, r, yref);
          CK(cudaStreamSynchronize(st));
          std::vector<__nv_bfloat16> hy((size_t)M * N);
          std::vector<float> hr((size_t)M * N);
          CK(cudaMemcpy(hy.data(), y, hy.size() * 2, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(hr.data(), yref, hr.size() * 4, cudaMemcpyDeviceToHost));
          double num = 0, den = 0;
          for (size_t i = 0; i < hr.size(); ++i) {
            num = std::max(num, (double)std::fabs(__bfloat162float(hy[i]) - hr[i]));
            den = std::max(den, (double)std::fabs(hr[i]));
          }
          err = (float)(num / den);
        }
        const float g = tm.graph_us(launch), f = tm.flush_us(launch);
        printf("  %s M=%2d diag=%3d: graph %6.1f us (%5.0f GB/s, %4.2fx floor) | flush %6.1f us (%4.2fx floor)", fmt.c_str(),
               M, d, g, bytes / g / 1e3, g / f_graph, f, f / f_flush);
        if (err >= 0) printf(" | max err / max|y| %.2e%s", err, err < 1e-2 ? "" : "  <-- WRONG");
        printf("\n");
        fflush(stdout);
      }
      unsetenv("LORA_OPS_DECODE_DIAG");
    }
    for (int c = 0; c < copies; ++c) {
      CK(cudaFree(w[c]));
      if (qabs[c]) CK(cudaFree(qabs[c]));
    }
  }
  return 0;
}
