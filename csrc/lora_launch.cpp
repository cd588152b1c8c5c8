// The eager launch path of the fused LoRA layer: forward and backward each cross from Python into C++ once.
//
//   y  = x @ W^T + s * dropout(x) @ A^T @ B^T (+ bias)          x (M, K), W (N, K) dense or NF4, A (r, K), B (N, r)
//
// The kernels are the Triton kernels of lora_ops/triton_kernels (compiled by Triton's JIT, autotuned there). What
// lives here is everything the Python launchers do per call once a kernel is compiled: checks, output allocation,
// argument lists, grids, and the launch itself (cuLaunchKernel on the compiled function handle, ~2 us instead of
// Triton's Python launcher at ~10-30 us), plus a torch::autograd::Function so the whole fwd+bwd needs no Python.
//
// Plans. A call's plan key holds what selects kernels and configs (device, dtype, M bucket, N, K, r, NF4 layout,
// bias, dropout, gradients asked for, the launcher settings of the environment). A plan holds, per kernel, the
// compiled variants registered from Python (lora_ops/_launch.py): function handle, launch resources, and the
// Triton specialisation of every argument (pointer alignment, integer width, == 1, % 16). A call builds its launch
// list, matches every argument against a verified variant, and launches; anything unmatched is a miss. On a miss
// the Python launchers run the call (compiling and tuning as needed) while recording their launches; the records
// become variants, and they are only used after this file's own launch list for that same call (a dry run) equals
// the recorded one argument by argument. So this file mirrors triton_kernels/lora.py (lora_forward, lora_backward,
// _W, _Dropout, _lora_gemm, _tma_gemm, _splits) and nf4_dequant.py (_launch), and a mismatch can only ever send a
// plan back to Python, never launch a kernel with arguments Python would not have given it.
//
// Built into lora_ops._C with LORA_OPS_LAUNCH_CUDA defined. Without it (a CPU build for the tests) only the dry
// run exists: it checks the mirrored argument lists against the Triton interpreter's records.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef LORA_OPS_LAUNCH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#endif

namespace py = pybind11;

namespace lora_launch {

// ------------------------------------------------------------------------------------------------ kernels

enum Kernel : int { K_DQ = 0, K_S, K_FWD, K_DX, K_TMA, K_DS, K_DB, K_DA, K_FIN, K_WS, NUM_KERNELS };
// The names of triton_kernels/lora_tuning.py (_Kernel.name) and nf4_dequant.py: records and launch counts use them.
const char* const kKernelNames[NUM_KERNELS] = {"nf4_dequant", "lora_s",      "lora_fwd",    "lora_bwd_dx",
                                               "lora_gemm_tma", "lora_bwd_ds", "lora_bwd_db", "lora_bwd_da",
                                               "lora_bwd_finish", "lora_gemm_ws"};

int kernel_id(const std::string& name) {
  for (int i = 0; i < NUM_KERNELS; ++i)
    if (name == kKernelNames[i]) return i;
  TORCH_CHECK(false, "lora_ops launch: unknown kernel name '", name, "'");
}

constexpr int64_t kBaseMmFwd = 1, kBaseMmDx = 2;  // lora.py _BASE_MM_FWD, _BASE_MM_DX: bits of Settings::base_mm

// Settings the Python launchers read from module constants; lora_ops/_launch.py sends them (again on a change).
struct Settings {
  int64_t max_stride = 1 << 22;   // lora_kernels.py MAX_STRIDE
  int64_t min_dot = 16;           // MIN_DOT
  int64_t max_block_r = 64;       // MAX_BLOCK_R
  int64_t dequant_min_m = 64;     // NF4_DEQUANT_MIN_M
  int64_t tma_min_m = 2048;       // _TMA_MIN_M
  int64_t tma_min_nk = 1 << 22;   // _TMA_MIN_NK
  int64_t tma_min_mnk = int64_t{1} << 35;  // _TMA_MIN_MNK
  int64_t tma_small_m = 128;      // lora_tuning.py _TMA_CONFIGS: the first M of the large tile
  int64_t nested_blocksize = 256; // nf4.NESTED_BLOCKSIZE
  int64_t dq_bytes_per_program = 2048;  // nf4_dequant.BYTES_PER_PROGRAM
  int64_t split_unit = 256;             // lora.py _SPLIT_UNIT
  int64_t split_unit_interp = 64;       // _SPLIT_UNIT_INTERP
  int64_t max_inner_splits = 16;        // _MAX_INNER_SPLITS
  int64_t split_max_m = 1024;           // _SPLIT_MAX_M
  int64_t split_sum_max_m = 2048;       // _SPLIT_SUM_MAX_M
  int64_t ds_splits = 4;                // _DS_SPLITS
  int64_t atomic_db_max_m = int64_t{1} << 40;  // _ATOMIC_DB_MAX_M
  int64_t nf4_chunk_bytes = 32 << 20;   // NF4_CHUNK_BYTES
  int64_t nf4_chunk_min_m = 4096;       // NF4_CHUNK_MIN_M
  int64_t dequant_on_cpu = 0;           // _DEQUANT_ON_CPU (the interpreter tests' dry runs)
  int64_t finish_kernel = 0;            // _FINISH_KERNEL
  int64_t base_mm = 0;                  // _BASE_MM: bit 1 the forward GEMM, bit 2 the dX GEMM
  int64_t presum = 1;                   // _PRESUM
  int64_t ds_members = 0;               // _DS_MEMBERS
  int64_t side_da = 1;                  // _SIDE_DA
  int64_t side_dq = 1;                  // _SIDE_DQ
  int64_t ws = 1;                       // _WS
  int64_t ws_block_m = 128;             // lora_tuning.py WS_CONFIG
  int64_t ws_block_n = 256;
  std::vector<int64_t> blocksizes;      // nf4.VALID_BLOCKSIZES
};
Settings g_settings;

// --------------------------------------------------------------------------------------------- arguments

// One kernel argument as a Python launcher passes it: a tensor's address, an int, a float, or a TMA descriptor
// (index into the launch's descriptor table).
struct Arg {
  char t;  // 'P' pointer, 'I' int, 'F' float, 'T' descriptor
  int64_t i;
  double f;
};

struct Desc {  // triton.tools.tensor_descriptor.TensorDescriptor(base, shape, strides, block_shape), 2-D
  uint64_t ptr;
  int64_t shape[2];
  int64_t strides[2];
  int64_t block[2];
};

constexpr int kMaxArgs = 48;

// Triton's specialisation of one argument: the code of its type in the compiled signature ('P' pointer, 'i' i32,
// 'l' i64, 'u' u64, 'f' fp32, 'c' the int 1 folded into a constexpr, 'T' TMA descriptor), whether it is divisible
// by 16 (pointers: 16-byte aligned), and whether the kernel specialises it at all (do_not_specialize).
struct ArgSpec {
  char code;
  bool div16;
  bool specialize;
};

struct Variant {
  std::vector<ArgSpec> spec;
  uint64_t function = 0;  // CUfunction of the compiled kernel on the plan's device
  int num_warps = 4;
  int shared = 0;
  int64_t block_m = 0, block_n = 0, block_k = 0, nb = 0;  // the config's tiles (grids, descriptors)
  std::vector<std::array<int64_t, 5>> tma;                  // per descriptor: swizzle, elem_size, elem_type, box0, box1
  bool verified = false;
};

struct Launch {
  int kernel;
  int64_t grid[3];
  int nargs = 0;
  Arg args[kMaxArgs];
  int ndesc = 0;
  Desc descs[8];  // the TMA GEMM: a, w, out, then a group's further dY members (or a again); the Gluon GEMM: a,
                  // w, out, L, Rt, then those members
  const Variant* variant = nullptr;
  int64_t want_config = 0;   // which config a variant must have: the TMA tile (0 small, 1 large), dequantize NB
  bool trans_w = false;      // the TMA GEMM: forward (W^T) or dX (W)
  int64_t gemm_n = 0;        // the pointer GEMMs: their output's column count (a chunk's, when W is chunked)
  int64_t elems[3] = {0, 0, 0};  // the finish kernel: its three jobs' element counts (its grid)
  at::Tensor sum_parts, sum_out;  // S / dS slices the launch wrote, summed and rounded into sum_out right after it
  at::Tensor mm_out, mm_a, mm_b;  // lora.py _BASE_MM: mm_out.addmm_(mm_a, mm_b) right after the launch
  // lora.py _SIDE_DA / _SIDE_DQ: the TMA GEMM on the fewest programs that keep its waves (narrow); the second
  // stream forked from the current one before this launch (fork: it waits for what came before, not for this
  // launch), this launch on the second stream (on_side), the current stream waiting for the second before this
  // launch (join). Order at one launch: join, fork, launch.
  bool narrow = false, fork = false, on_side = false, join = false;

  void ptr(const at::Tensor& t) { ptr_raw(reinterpret_cast<uintptr_t>(t.data_ptr())); }
  void ptr_raw(uint64_t p) { args[nargs++] = Arg{'P', static_cast<int64_t>(p), 0.0}; }
  void i(int64_t v) { args[nargs++] = Arg{'I', v, 0.0}; }
  void f(double v) { args[nargs++] = Arg{'F', 0, v}; }
  void desc(const at::Tensor& t, int64_t b0, int64_t b1) {
    Desc& d = descs[ndesc];
    d.ptr = reinterpret_cast<uintptr_t>(t.data_ptr());
    d.shape[0] = t.size(0);
    d.shape[1] = t.size(1);
    d.strides[0] = t.stride(0);
    d.strides[1] = t.stride(1);
    d.block[0] = b0;
    d.block[1] = b1;
    args[nargs++] = Arg{'T', ndesc++, 0.0};
  }
};

char int_code(int64_t v) { return (v >= INT32_MIN && v <= INT32_MAX) ? 'i' : 'l'; }

bool arg_matches(const Arg& a, const ArgSpec& s) {
  switch (a.t) {
    case 'P':
      return s.code == 'P' && s.div16 == (a.i % 16 == 0);
    case 'I':
      if (!s.specialize) return s.code == int_code(a.i);
      if (a.i == 1) return s.code == 'c';
      return s.code == int_code(a.i) && s.div16 == (a.i % 16 == 0);
    case 'F':
      return s.code == 'f';
    case 'T':
      return s.code == 'T';
  }
  return false;
}

bool variant_matches(const Launch& l, const Variant& v, bool any) {
  if ((!v.verified && !any) || static_cast<int>(v.spec.size()) != l.nargs) return false;
  for (int i = 0; i < l.nargs; ++i)
    if (!arg_matches(l.args[i], v.spec[i])) return false;
  return true;
}

// ------------------------------------------------------------------------------------------------- plans

struct PlanKey {
  std::array<int64_t, 10> v{};
  bool operator==(const PlanKey& o) const { return v == o.v; }
};
// FNV-1a over 64-bit words: the plan and TMA descriptor caches' keys.
size_t fnv_hash(const int64_t* v, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<uint64_t>(v[i]);
    h *= 1099511628211ull;
  }
  return static_cast<size_t>(h);
}
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const { return fnv_hash(k.v.data(), k.v.size()); }
};

struct Plan {
  std::vector<Variant> variants[NUM_KERNELS];
  bool disabled = false;  // its launch list once differed from Python's: this key stays on the Python launchers
};

std::mutex g_mutex;  // plans are read on autograd's device threads and written from Python
std::vector<Plan> g_plans;
std::unordered_map<PlanKey, int64_t, PlanKeyHash> g_plan_index;
int64_t g_launches[NUM_KERNELS] = {};

// Where the host time of the launch path goes (launch_timing(True); launch_stats()["host_ns"]): nanoseconds per
// phase of run(), summed over its calls. build: the plan lookup, allocations and the launch list; resolve: matching
// the list against the plan's variants; encode: TMA descriptors (cuTensorMapEncodeTiled); launch: the driver's
// launches and the atomic buffer's memset; after: the tensor ops after the launches (slice sums, casts, split
// sums). Read and written under g_mutex, which run() holds throughout.
enum Phase : int { PH_BUILD = 0, PH_RESOLVE, PH_ENCODE, PH_LAUNCH, PH_AFTER, NUM_PHASES };
const char* const kPhaseNames[NUM_PHASES] = {"build", "resolve", "encode", "launch", "after"};
struct HostTiming {
  bool on = false;
  int64_t calls = 0;
  int64_t ns[NUM_PHASES] = {};
};
HostTiming g_timing;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Adds the time since `t` to `phase` and moves `t` to now (no-op while timing is off).
void lap(Phase phase, int64_t& t) {
  if (!g_timing.on) return;
  const int64_t n = now_ns();
  g_timing.ns[phase] += n - t;
  t = n;
}
// lora_ops._launch._fallback(phase, plan, *args): the Python launchers + registration. Never destroyed: a Python
// object must not be released after the interpreter has finalized.
py::object* g_fallback = new py::object();

int64_t plan_id(const PlanKey& key) {
  auto it = g_plan_index.find(key);
  if (it != g_plan_index.end()) return it->second;
  int64_t id = static_cast<int64_t>(g_plans.size());
  g_plans.emplace_back();
  g_plan_index.emplace(key, id);
  return id;
}

// ------------------------------------------------------------------------------------------ environment

enum Tma : int64_t { TMA_OFF = 0, TMA_ON = 1, TMA_AUTO = 2, TMA_BAD = 3 };

bool env_flag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return v == nullptr ? dflt : false;
  return !(v[0] == '0' && v[1] == '\0');
}

int64_t tma_mode() {
  const char* v = std::getenv("LORA_OPS_TMA");
  if (v == nullptr) return TMA_AUTO;
  std::string s(v);
  s.erase(0, s.find_first_not_of(" \t"));
  s.erase(s.find_last_not_of(" \t") + 1);
  std::transform(s.begin(), s.end(), s.begin(), ::tolower);
  if (s.empty() || s == "auto") return TMA_AUTO;
  if (s == "0") return TMA_OFF;
  if (s == "1") return TMA_ON;
  return TMA_BAD;  // the Python launcher raises its message for it
}

int64_t settings_bits() {
  int64_t mode = tma_mode();
  int64_t flatten = env_flag("LORA_OPS_TMA_FLATTEN", false) ? 1 : 0;
  int64_t tune = env_flag("LORA_OPS_TRITON_AUTOTUNE", true) ? 1 : 0;
  return mode | (flatten << 2) | (tune << 3);
}

bool launch_path_enabled() {
  const char* v = std::getenv("LORA_OPS_LAUNCH");
  return v == nullptr || std::strcmp(v, "python") != 0;
}

// --------------------------------------------------------------------------------------------- devices

struct DeviceTensors {
  at::Tensor scratch;   // lora.py _scratch(device): stands in for pointers a constexpr switch leaves unread
  at::Tensor codebook;  // nf4_dequant._codebook(device): the 16 fp32 NF4 values
  int sms = 0;
  int major = 0;
};
// Key: device index, -1 for the CPU (interpreter dry runs). Never destroyed: CUDA tensors must not be freed after
// the CUDA allocator has shut down at exit.
std::unordered_map<int, DeviceTensors>& g_devices = *new std::unordered_map<int, DeviceTensors>();

int dev_key(const at::Tensor& t) { return t.is_cuda() ? t.get_device() : -1; }

const DeviceTensors* device_tensors(int dev) {
  auto it = g_devices.find(dev);
  return it == g_devices.end() ? nullptr : &it->second;
}

// ------------------------------------------------------------------------------------------------- calls

// The validated inputs of one forward or backward, in the layout of lora_ops::lora_fwd / lora_bwd.
struct Call {
  at::Tensor x, w, absmax, nested_absmax, nested_code, offset, A, B, bias, seed;
  at::Tensor dy, s;  // backward only
  int64_t blocksize = 0;
  double scaling = 1.0, p = 0.0;
  int64_t m = 0, k = 0, n = 0, r = 0;
  bool nf4 = false, nested = false;
  bool drop() const { return p > 0.0 && seed.defined(); }  // dropout on (the launchers' _Dropout)
  bool ok = false;    // passed check_call
  bool need_dx = false, need_dA = false, need_dB = false, need_dbias = false;
  // Leave dB in its fp32 atomic buffer (BwdOut::db_acc, dB undefined) for the caller to cast in blocks: the
  // stacked group's dB_i are diagonal blocks of it.
  bool db_in_blocks = false;
  // A projection group's B (lora.py _Group): B = B_rows (n, rb) = cat(B_i) standing for block_diag(B_i) (n, r);
  // `groups` the members' out_features (empty: an ordinary B). check_call sets rb and the member boundaries nb.
  std::vector<int64_t> groups;
  int64_t rb = 0, nb[3] = {0, 0, 0};
  // Backward of a group: dY as the members' own (M, N_i) tensors (lora.py _segments_ok; dy is then dys[0]), or
  // empty: dy is the concatenated (M, N).
  std::vector<at::Tensor> dys;
  int dev = -1;
  const DeviceTensors* dt = nullptr;
};

constexpr int64_t kMaxGroup = 4;  // lora.py MAX_GROUP: the kernels take at most three member boundaries

// The kernels' group arguments (rb, nb1, nb2, nb3) of a launch whose output columns start at column n0 of the
// call's (lora.py _Group.shifted); zeros without a group (`on` false: the dX GEMM, whose Rt is A).
void group_args(Launch& l, const Call& c, bool on, int64_t n0 = 0) {
  on = on && !c.groups.empty();
  l.i(on ? c.rb : 0);
  for (int i = 0; i < 3; ++i) l.i(on ? c.nb[i] - n0 : 0);
}

// lora.py _more: the kernels' three further member pointers (dy2_ptr.. / a2_ptr..): members 2..4 and the first
// again where there are fewer, or scratch without segments.
void seg_ptrs(Launch& l, const Call& c, bool segs) {
  for (int i = 1; i < 4; ++i) {
    if (!segs)
      l.ptr(c.dt->scratch);
    else
      l.ptr(c.dys[i < static_cast<int>(c.dys.size()) ? i : 0]);
  }
}

int64_t next_pow2(int64_t n) {
  if (n <= 1) return 1;
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t block_r_of(int64_t r) {
  return std::min(std::max(g_settings.min_dot, next_pow2(r)), g_settings.max_block_r);
}
bool float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

bool strides_ok(const at::Tensor& t) {
  for (int64_t st : t.strides())
    if (st >= g_settings.max_stride || st < 0) return false;
  return true;
}

bool same(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() && t.layout() == at::kStrided && t.device() == x.device() && t.scalar_type() == x.scalar_type()
         && strides_ok(t);
}

// Checks everything the Python launchers check, and everything this file assumes. False means "not this path":
// the caller falls back to Python, which raises the precise error for bad input or handles the rare layout.
bool check_call(Call& c, bool backward) {
  const at::Tensor& x = c.x;
  if (!x.defined() || x.layout() != at::kStrided || x.dim() != 2 || !float_dtype(x.scalar_type()) || !strides_ok(x))
    return false;
  c.m = x.size(0);
  c.k = x.size(1);
  if (!c.A.defined() || !c.B.defined() || c.A.dim() != 2 || c.B.dim() != 2) return false;
  c.r = c.A.size(0);
  c.n = c.B.size(0);
  if (c.m == 0 || c.k == 0 || c.n == 0 || c.r < 1) return false;
  if (c.k >= g_settings.max_stride || c.n >= g_settings.max_stride) return false;
  if (!c.groups.empty()) {  // lora.py _group
    const int64_t g = static_cast<int64_t>(c.groups.size());
    if (g < 2 || g > kMaxGroup || c.r % g != 0) return false;
    int64_t total = 0;
    for (int64_t i = 0; i < g; ++i) {
      if (c.groups[i] < 1) return false;
      total += c.groups[i];
      if (i < 3) c.nb[i] = total;
    }
    if (total != c.n) return false;
    for (int64_t i = g - 1; i < 3; ++i) c.nb[i] = c.n;
    c.rb = c.r / g;
  }
  const int64_t b_cols = c.groups.empty() ? c.r : c.rb;
  if (!same(c.A, x) || !same(c.B, x) || c.A.size(1) != c.k || c.B.size(1) != b_cols) return false;
  if (c.bias.defined() && (!same(c.bias, x) || c.bias.dim() != 1 || c.bias.size(0) != c.n)) return false;
  if (!std::isfinite(c.scaling) || !(c.p >= 0.0 && c.p < 1.0)) return false;
  if (c.seed.defined()
      && (c.seed.numel() != 1 || c.seed.scalar_type() != at::kLong || c.seed.device() != x.device()))
    return false;
  c.nf4 = c.absmax.defined();
  if (c.nf4) {
    const int64_t nel = c.n * c.k;
    if (!c.w.defined() || !c.w.is_contiguous() || c.w.device() != x.device()) return false;
    if (c.w.numel() * static_cast<int64_t>(c.w.element_size()) != (nel + 1) / 2) return false;
    const auto& bs = g_settings.blocksizes;
    if (std::find(bs.begin(), bs.end(), c.blocksize) == bs.end()) return false;
    const int64_t nblocks = cdiv(nel, c.blocksize);
    if (c.absmax.numel() != nblocks || !c.absmax.is_contiguous() || c.absmax.device() != x.device()) return false;
    c.nested = c.nested_absmax.defined();
    if (c.nested != c.nested_code.defined() || c.nested != c.offset.defined()) return false;
    if (c.nested) {
      if (c.absmax.scalar_type() != at::kByte) return false;
      for (const at::Tensor* t : {&c.nested_absmax, &c.nested_code, &c.offset})
        if (t->scalar_type() != at::kFloat || !t->is_contiguous() || t->device() != x.device()) return false;
      // offset: one, or one per nested block (a projection group's stacked weight; the kernels' NESTED_OFFSETS)
      if (c.nested_absmax.numel() != cdiv(nblocks, g_settings.nested_blocksize) || c.nested_code.numel() != 256
          || (c.offset.numel() != 1 && c.offset.numel() != c.nested_absmax.numel()))
        return false;
    } else if (c.absmax.scalar_type() != at::kFloat) {
      return false;
    }
  } else {
    if (!same(c.w, x) || c.w.dim() != 2 || c.w.size(0) != c.n || c.w.size(1) != c.k) return false;
  }
  if (backward && !c.dys.empty()) {  // lora.py _segments_ok
    if (c.groups.size() != c.dys.size() || (g_settings.base_mm & kBaseMmDx)) return false;
    const int64_t unit = x.is_cuda() ? g_settings.split_unit : g_settings.split_unit_interp;
    for (size_t i = 0; i < c.dys.size(); ++i) {
      const at::Tensor& d = c.dys[i];
      if (!same(d, x) || d.dim() != 2 || d.size(0) != c.m || d.size(1) != c.groups[i] || c.groups[i] % unit != 0
          || !d.is_contiguous() || reinterpret_cast<uintptr_t>(d.data_ptr()) % 16 != 0)
        return false;
    }
    c.dy = c.dys[0];
  } else if (backward) {
    if (!same(c.dy, x) || c.dy.dim() != 2 || c.dy.size(0) != c.m || c.dy.size(1) != c.n) return false;
    if (!same(c.s, x) || c.s.dim() != 2 || c.s.size(0) != c.m || c.s.size(1) != c.r) return false;
  }
  c.dev = dev_key(x);
  c.dt = device_tensors(c.dev);
  c.ok = c.dt != nullptr;
  return c.ok;
}

PlanKey make_key(const Call& c, bool backward, bool deterministic) {
  PlanKey key;
  int64_t flags = (c.nf4 ? 1 : 0) | (c.nested ? 2 : 0) | (c.bias.defined() ? 4 : 0) | (c.drop() ? 8 : 0)
                  | (c.m >= g_settings.dequant_min_m ? 16 : 0) | (c.m >= g_settings.tma_small_m ? 32 : 0)
                  | (c.m >= g_settings.tma_min_m ? 64 : 0) | (c.m >= g_settings.nf4_chunk_min_m ? 4096 : 0)
                  | (c.m <= g_settings.split_sum_max_m ? 8192 : 0)
                  | (c.m * c.n * c.k >= g_settings.tma_min_mnk ? 16384 : 0)
                  | (static_cast<int64_t>(c.groups.size()) << 15) | (c.dys.empty() ? 0 : 1 << 18)
                  | (c.nested && c.offset.numel() > 1 ? 1 << 19 : 0);
  if (backward)
    flags |= (c.need_dx ? 128 : 0) | (c.need_dA ? 256 : 0) | (c.need_dB ? 512 : 0) | (c.need_dbias ? 1024 : 0)
             | (deterministic ? 2048 : 0);
  key.v = {backward ? 1 : 0, c.dev, static_cast<int64_t>(c.x.scalar_type()), next_pow2(c.m), c.n, c.k, c.r,
           c.blocksize, flags, settings_bits()};
  return key;
}

// ------------------------------------------------------------------------------------------ launch lists

// What one forward or backward does, in order: kernel launches plus the few tensor ops between them.
struct Work {
  std::vector<Launch> launches;
  std::vector<at::Tensor> keep;  // temporaries the launches read or write (dequantized W, fp32 buffers)
  // A Launch is ~1.6 KB: room for a whole unchunked list up front, so the list is not copied as it grows.
  Work() { launches.reserve(8); }
};

struct Dropout {
  bool on;
  uint64_t seed_ptr;
  int64_t threshold;
  double scale;
};

Dropout make_dropout(const Call& c, bool on) {
  if (on && c.drop())
    return Dropout{true, reinterpret_cast<uintptr_t>(c.seed.data_ptr()),
                   std::min<int64_t>(static_cast<int64_t>(c.p * 2147483648.0), 2147483647), 1.0 / (1.0 - c.p)};
  return Dropout{false, reinterpret_cast<uintptr_t>(c.dt->scratch.data_ptr()), 0, 1.0};
}

// The frozen weight as the GEMMs take it (lora.py _W): dense (N, K), or NF4 bytes decoded in the K-loop, or NF4
// dequantized into a temporary (from dequant_min_m rows on CUDA): whole, or chunk by chunk past nf4_chunk_bytes
// (`chunks`: ranges of W's rows for the forward, columns for dX; `block` makes one).
struct WArgs {
  bool nf4_inloop = false;
  at::Tensor dense;  // the dense weight or the temporary
  uint64_t ptrs[6];
  int64_t strides[2];
  std::vector<std::pair<int64_t, int64_t>> chunks;
  bool rows = true;     // chunks along W's rows (else columns)
  at::Tensor workspace; // one chunk's temporary, reused by every chunk (launches run in stream order)
  at::Tensor workspace2;  // lora.py _chunk_gemms under _SIDE_DQ: the next chunk's, dequantized beside a GEMM
  int whole_dq = -1;    // the launch that dequantizes the whole weight (an index into work.launches), if any
};

uint64_t addr_of(const at::Tensor& t) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }

// t.narrow(dim, start, len) as one as_strided call: narrow dispatches narrow, slice and as_strided, three ops of
// host time per view on the GPU machine's host (~6 us there), and a group takes ten or more views per fwd+bwd.
at::Tensor narrow_view(const at::Tensor& t, int64_t dim, int64_t start, int64_t len) {
  if (dim < 0) dim += t.dim();
  TORCH_CHECK(dim >= 0 && dim < t.dim() && start >= 0 && len >= 0 && start + len <= t.size(dim),
              "lora_ops launch: view [", start, ", ", start + len, ") of dim ", dim, " out of ", t.sizes());
  at::DimVector sizes(t.sizes());  // no heap allocation on the per-call path
  sizes[dim] = len;
  return t.as_strided(sizes, t.strides(), t.storage_offset() + start * t.stride(dim));
}

// The 2-D tensors ts stacked along their rows. A view, with no copy and no launch, when they already lie one after
// another in one storage, as a projection group packs its members' adapters (lora_ops/grouped.py); else at::cat.
at::Tensor stack_rows(const std::vector<at::Tensor>& ts) {
  const at::Tensor& t0 = ts[0];
  if (t0.dim() != 2 || t0.numel() == 0 || !t0.is_contiguous()) return at::cat(ts, 0);
  int64_t rows = t0.size(0);
  const char* end = static_cast<const char*>(t0.data_ptr()) + t0.nbytes();
  for (size_t i = 1; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    if (t.dim() != 2 || t.numel() == 0 || t.size(1) != t0.size(1) || t.scalar_type() != t0.scalar_type()
        || !t.is_contiguous() || !t.storage().is_alias_of(t0.storage())
        || static_cast<const char*>(t.data_ptr()) != end)
      return at::cat(ts, 0);
    rows += t.size(0);
    end += t.nbytes();
  }
  return t0.as_strided({rows, t0.size(1)}, {t0.size(1), 1}, t0.storage_offset());
}

// nf4_dequant._launch: W[r0:r1, c0:c1] into `out` (contiguous), one program per NB whole quantization blocks.
void dequant(const Call& c, Work& work, const at::Tensor& out, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t half_bs = c.blocksize / 2;
  int64_t nb = std::max<int64_t>(1, g_settings.dq_bytes_per_program / half_bs);
  const int64_t n = (r1 - r0) * (c1 - c0);
  int64_t win, row_blocks, col0_blocks, n_blocks, n_bytes, out_blocks;
  if (c0 != 0 || c1 != c.k) {
    win = (c1 - c0) / c.blocksize;
    row_blocks = c.k / c.blocksize;
    col0_blocks = c0 / c.blocksize;
    nb = std::gcd(nb, win);
    n_blocks = cdiv(c.n * c.k, c.blocksize);
    n_bytes = (c.n * c.k + 1) / 2;
    out_blocks = c.n * win;
  } else {
    col0_blocks = r0 * c.k / c.blocksize;
    out_blocks = cdiv(n, c.blocksize);
    win = row_blocks = std::max<int64_t>(1, out_blocks);
    n_blocks = col0_blocks + out_blocks;
    n_bytes = (r1 * c.k + 1) / 2;
  }
  Launch l;
  l.kernel = K_DQ;
  l.ptr(c.w);
  l.ptr(c.absmax);
  const at::Tensor& na = c.nested ? c.nested_absmax : c.absmax;
  const at::Tensor& nc = c.nested ? c.nested_code : c.absmax;
  const at::Tensor& of = c.nested ? c.offset : c.absmax;
  l.ptr(na);
  l.ptr(nc);
  l.ptr(of);
  l.ptr(c.dt->codebook);
  l.ptr(out);
  l.i(n);
  l.i(n_bytes);
  l.i(n_blocks);
  l.i(n / (2 * nb * half_bs));
  l.i(win);
  l.i(row_blocks);
  l.i(col0_blocks);
  l.grid[0] = cdiv(out_blocks, nb);
  l.grid[1] = l.grid[2] = 1;
  l.want_config = nb;
  work.launches.push_back(l);
}

// lora.py _nf4_chunks: ranges of W's rows (or columns) whose dense copies stay within nf4_chunk_bytes.
std::vector<std::pair<int64_t, int64_t>> nf4_chunks(const Call& c, bool rows) {
  std::vector<std::pair<int64_t, int64_t>> out;
  const int64_t elt = c.x.element_size();
  if (c.n * c.k * elt <= g_settings.nf4_chunk_bytes) return out;
  int64_t unit, extent, line;
  if (rows) {
    unit = std::lcm<int64_t>(8, c.blocksize / std::gcd(c.k, c.blocksize));
    extent = c.n;
    line = c.k;
  } else {
    if (c.k % c.blocksize) return out;
    unit = std::lcm<int64_t>(8, c.blocksize);
    extent = c.k;
    line = c.n;
  }
  const int64_t most = std::max(unit, g_settings.nf4_chunk_bytes / (line * elt) / unit * unit);
  const int64_t size = cdiv(cdiv(extent, cdiv(extent, most)), unit) * unit;
  if (size >= extent) return out;
  for (int64_t lo = 0; lo < extent; lo += size) out.emplace_back(lo, std::min(lo + size, extent));
  return out;
}

void set_dense(const Call& c, WArgs& w, const at::Tensor& dense) {
  const uint64_t scratch = addr_of(c.dt->scratch);
  w.dense = dense;
  w.ptrs[0] = addr_of(dense);
  for (int i = 1; i < 6; ++i) w.ptrs[i] = scratch;
  w.strides[0] = dense.stride(0);
  w.strides[1] = dense.stride(1);
}

WArgs weight_args(const Call& c, Work& work, bool rows) {
  WArgs w;
  const uint64_t scratch = addr_of(c.dt->scratch);
  if (c.nf4 && c.m >= g_settings.dequant_min_m && (c.x.is_cuda() || g_settings.dequant_on_cpu)) {
    if (c.m >= g_settings.nf4_chunk_min_m) w.chunks = nf4_chunks(c, rows);
    w.rows = rows;
    if (!w.chunks.empty()) {
      int64_t most = 0;
      for (const auto& ch : w.chunks) most = std::max(most, ch.second - ch.first);
      w.workspace = at::empty({most * (rows ? c.k : c.n)}, c.x.options());
      work.keep.push_back(w.workspace);
      if (g_settings.side_dq && w.chunks.size() > 1 && c.x.is_cuda()) {
        w.workspace2 = at::empty({most * (rows ? c.k : c.n)}, c.x.options());
        work.keep.push_back(w.workspace2);
      }
      return w;
    }
    at::Tensor out = at::empty({c.n, c.k}, c.x.options());
    w.whole_dq = static_cast<int>(work.launches.size());
    dequant(c, work, out, 0, c.n, 0, c.k);
    work.keep.push_back(out);
    set_dense(c, w, out);
  } else if (c.nf4) {
    w.nf4_inloop = true;
    w.ptrs[0] = addr_of(c.w);
    w.ptrs[1] = addr_of(c.absmax);
    w.ptrs[2] = c.nested ? addr_of(c.nested_absmax) : scratch;
    w.ptrs[3] = c.nested ? addr_of(c.nested_code) : scratch;
    w.ptrs[4] = c.nested ? addr_of(c.offset) : scratch;
    w.ptrs[5] = addr_of(c.dt->codebook);
    w.strides[0] = w.strides[1] = 0;
  } else {
    set_dense(c, w, c.w);
  }
  return w;
}

// _W.block: chunk (lo, hi) dequantized into the workspace, as its own dense WArgs.
WArgs weight_block(const Call& c, Work& work, const WArgs& w, int64_t lo, int64_t hi, bool second = false) {
  WArgs b;
  const int64_t r = w.rows ? hi - lo : c.n, cols = w.rows ? c.k : hi - lo;
  at::Tensor out = narrow_view(second ? w.workspace2 : w.workspace, 0, 0, r * cols).view({r, cols});
  if (w.rows)
    dequant(c, work, out, lo, hi, 0, c.k);
  else
    dequant(c, work, out, 0, c.n, lo, hi);
  set_dense(c, b, out);
  return b;
}

// lora.py _chunk_gemms: each chunk dequantized, then its GEMM (gemm_of pushes it). With workspace2 (_SIDE_DQ) the
// next chunk is dequantized on the side stream, into the other workspace, beside a TMA GEMM narrowed to the
// fewest programs that keep its waves; the GEMM after it joins the side stream first.
template <typename F>
void chunk_gemms(const Call& c, Work& work, const WArgs& w, F gemm_of) {
  const bool pipe = w.workspace2.defined();
  bool beside = false;  // this chunk's dequantization goes on the side stream
  for (size_t i = 0; i < w.chunks.size(); ++i) {
    const auto [lo, hi] = w.chunks[i];
    const WArgs wc = weight_block(c, work, w, lo, hi, pipe && i % 2 == 1);
    if (beside) work.launches.back().on_side = true;
    gemm_of(wc, lo, hi);
    Launch& g = work.launches.back();
    g.join = beside;
    beside = pipe && (g.kernel == K_TMA || g.kernel == K_WS) && i + 1 < w.chunks.size();
    g.fork = g.narrow = beside;
  }
}

// lora.py _tma_operand: TMA's rules for a 2-D operand.
bool tma_operand(const at::Tensor& t) {
  return t.dim() == 2 && t.element_size() == 2 && t.stride(1) == 1
         && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * 2) % 16 == 0 && t.size(0) > 0
         && t.size(1) > 0;
}

// nk: the layer's N*K for the auto rule (-1: out's N times a's K).
bool tma_usable(const Call& c, const at::Tensor& a, const at::Tensor& w, const at::Tensor& out, int64_t nk = -1) {
  const int64_t mode = tma_mode();
  if (mode == TMA_OFF) return false;
  if (nk < 0) nk = out.size(1) * a.size(1);
  if (mode == TMA_AUTO && (out.size(0) < g_settings.tma_min_m || nk < g_settings.tma_min_nk
                           || out.size(0) * nk < g_settings.tma_min_mnk))
    return false;
  if (c.x.is_cuda() && c.dt->major < 9) return false;
  return tma_operand(a) && tma_operand(w) && tma_operand(out);
}

// lora.py _use_tma: whether out = a @ op(W) runs on the TMA GEMM; a chunk decides by the layer's nk = N*K.
bool use_tma(const Call& c, const at::Tensor& a, const WArgs& w, const at::Tensor& out, int64_t nk = -1) {
  return !w.nf4_inloop && w.chunks.empty() && out.size(1) > 0 && tma_usable(c, a, w.dense, out, nk);
}

// lora.py _ws_usable: whether a TMA GEMM runs on the Gluon kernel instead (group_n0: the chunk's first column).
bool ws_usable(const Call& c, const at::Tensor& out, const at::Tensor& lt, const at::Tensor& rt,
               const at::Tensor* l_out, bool trans_w, const Dropout& drop, int64_t group_n0) {
  if (!g_settings.ws || drop.on || l_out != nullptr || !c.x.is_cuda() || c.dt->major != 9
      || out.size(0) < g_settings.ws_block_m || lt.scalar_type() != out.scalar_type()
      || rt.scalar_type() != out.scalar_type() || !tma_operand(lt) || !tma_operand(rt))
    return false;
  if (trans_w && !c.groups.empty()) {
    for (int i = 0; i < 3; ++i) {
      const int64_t nb = c.nb[i] - group_n0;
      if (nb > 0 && nb < out.size(1) && nb % g_settings.ws_block_n) return false;
    }
  }
  return true;
}

// lora.py _lora_gemm: out (M, N') = dropout(scaling * L @ Rt) (+ bias) + a @ op(W); the forward (trans_w) or dX.
// l: L (M, r), or (splits, M, r) fp32 partials the kernel sums; l_out (optional) receives the rounded L.
// drop_ld / drop_c0: x's column count and the window's first column when out is a column window of dX.
void gemm(const Call& c, Work& work, int pointer_kernel, const at::Tensor& a, const WArgs& w, const at::Tensor& out,
          const at::Tensor& lt, const at::Tensor& rt, int64_t stride_rr, int64_t stride_rn, const at::Tensor* bias,
          const Dropout& drop, double scaling, bool trans_w, int64_t m_bucket, bool tma, const at::Tensor* l_out,
          int64_t drop_ld = -1, int64_t drop_c0 = 0, int64_t group_n0 = 0, bool segs = false, bool base_mm = false) {
  // The forward's Rt is B (a group's B_rows, group_args); the dX GEMM's is A. segs (dX): a is c.dys[0], and the
  // kernel reads every member's dY (lora.py _lora_gemm segs). base_mm (lora.py _base_mm): the pointer kernel
  // with an empty K-loop, then out.addmm_(a, op(W)).
  const int64_t m = out.size(0), n = out.size(1);
  // The K of the GEMM: sum N_i for dX on segments, none with base_mm.
  const int64_t inner = base_mm ? 0 : segs ? c.n : a.size(1);
  if (drop_ld < 0) drop_ld = n;
  const at::Tensor& scratch = c.dt->scratch;
  const at::Tensor& b = bias != nullptr ? *bias : scratch;
  Launch l;
  const bool sliced = lt.dim() == 3;
  const at::Tensor& lo = l_out != nullptr ? *l_out : scratch;
  if (tma) {
    // lora.py _tma_gemm: one persistent program per SM; the descriptors' tiles are the variant's config. Where
    // ws_usable, its Gluon twin (lora.py _ws_gemm), which reads L and Rt through descriptors too and takes no
    // dropout.
    const bool ws = ws_usable(c, out, lt, rt, l_out, trans_w, drop, group_n0);
    l.kernel = ws ? K_WS : K_TMA;
    l.trans_w = trans_w;
    if (!ws) l.want_config = m >= g_settings.tma_small_m ? 1 : 0;  // which of _TMA_CONFIGS (checked against it)
    l.grid[1] = l.grid[2] = 1;
    l.grid[0] = -1;  // set from the variant's tiles
    l.desc(a, 0, 0);
    l.desc(w.dense, 0, 0);
    l.desc(out, 0, 0);
    if (ws) {
      l.desc(lt, 0, 0);
      l.desc(rt, 0, 0);
      l.ptr(b);
      l.i(b.stride(0));
      l.i(m);
      l.i(n);
      l.i(inner);
      l.f(scaling);
    } else {
      l.ptr(lt);
      l.ptr(rt);
      l.ptr(b);
      l.ptr_raw(drop.seed_ptr);
      l.ptr(lo);
      l.i(sliced ? lt.stride(0) : 0);
      l.i(lt.stride(-2));
      l.i(lt.stride(-1));
      l.i(stride_rr);
      l.i(stride_rn);
      l.i(b.stride(0));
      l.i(l_out != nullptr ? lo.stride(0) : 0);
      l.i(l_out != nullptr ? lo.stride(1) : 0);
      l.i(m);
      l.i(n);
      l.i(inner);
      l.i(sliced ? lt.size(0) : 1);
      l.f(scaling);
      l.i(drop.threshold);
      l.f(drop.scale);
      l.i(drop_ld);
      l.i(drop_c0);
    }
    group_args(l, c, trans_w || segs, group_n0);
    for (int i = 1; i < 4; ++i) l.desc(segs && i < static_cast<int>(c.dys.size()) ? c.dys[i] : a, 0, 0);  // _more
    work.launches.push_back(l);
    return;
  }
  l.kernel = pointer_kernel;
  l.gemm_n = n;
  l.grid[0] = -1;  // cdiv(m, BLOCK_M) * cdiv(n, BLOCK_N) of the variant's config
  l.grid[1] = l.grid[2] = 1;
  l.ptr(a);
  for (int i = 0; i < 6; ++i) l.ptr_raw(w.ptrs[i]);
  l.ptr(lt);
  l.ptr(rt);
  l.ptr(b);
  l.ptr_raw(drop.seed_ptr);
  l.ptr(out);
  l.ptr(lo);
  l.i(a.stride(0));
  l.i(a.stride(1));
  l.i(w.strides[0]);
  l.i(w.strides[1]);
  l.i(sliced ? lt.stride(0) : 0);
  l.i(lt.stride(-2));
  l.i(lt.stride(-1));
  l.i(stride_rr);
  l.i(stride_rn);
  l.i(b.stride(0));
  l.i(out.stride(0));
  l.i(out.stride(1));
  l.i(l_out != nullptr ? lo.stride(0) : 0);
  l.i(l_out != nullptr ? lo.stride(1) : 0);
  l.i(m);
  l.i(n);
  l.i(inner);
  l.i(c.r);
  l.i(sliced ? lt.size(0) : 1);
  l.f(scaling);
  l.i(drop.threshold);
  l.f(drop.scale);
  l.i(drop_ld);
  l.i(drop_c0);
  l.i(m_bucket);
  group_args(l, c, trans_w || segs, group_n0);
  seg_ptrs(l, c, segs);
  if (base_mm) {
    l.mm_out = out;
    l.mm_a = a;
    l.mm_b = trans_w ? w.dense.t() : w.dense;
  }
  work.launches.push_back(l);
}

// lora.py _base_mm: the base product from torch's matmul, for a dense weight in one piece.
bool base_mm_ok(const WArgs& w, bool forward) {
  return (g_settings.base_mm & (forward ? kBaseMmFwd : kBaseMmDx)) && !w.nf4_inloop && w.chunks.empty()
      && w.dense.defined();
}

// lora.py _splits: M splits of a reduction over M with `tiles` programs per split.
std::pair<int64_t, int64_t> splits_of(const Call& c, int64_t tiles) {
  int64_t splits;
  if (!c.x.is_cuda()) {
    splits = std::max<int64_t>(1, std::min<int64_t>(2, cdiv(c.m, 32)));
  } else {
    const int64_t want = cdiv(2 * static_cast<int64_t>(c.dt->sms), std::max<int64_t>(tiles, 1));
    splits = std::max<int64_t>(1, std::min(want, cdiv(c.m, 128)));
  }
  return {splits, cdiv(c.m, splits)};
}

at::Tensor split_partials(int64_t splits, at::IntArrayRef shape, const at::TensorOptions& opts) {
  std::vector<int64_t> full{splits};
  full.insert(full.end(), shape.begin(), shape.end());
  return at::empty(full, splits == 1 ? opts : opts.dtype(at::kFloat));
}

// lora.py _inner_splits: (splits, columns per split) of the S (over K) or dS (over N) pass.
// max_m: the largest M that splits on CUDA (-1: split_max_m).
// lora.py _unit_slices: up to `want` slices of `cols` in whole `unit`s, as even as they come: (splits, per split).
std::pair<int64_t, int64_t> unit_slices(int64_t cols, int64_t want, int64_t unit) {
  want = std::max<int64_t>(1, std::min(want, cols / unit));
  if (want == 1) return {1, cols};
  const int64_t per = cdiv(cdiv(cols, want), unit) * unit;
  return {cdiv(cols, per), per};
}

std::pair<int64_t, int64_t> inner_splits_of(const Call& c, int64_t cols, int64_t r_chunks, int64_t max_m = -1) {
  int64_t unit, want;
  if (!c.x.is_cuda()) {
    unit = g_settings.split_unit_interp;
    want = 2;
  } else if (c.m > (max_m < 0 ? g_settings.split_max_m : max_m)) {
    return {1, cols};
  } else {
    unit = g_settings.split_unit;
    want = cdiv(2 * static_cast<int64_t>(c.dt->sms), std::max<int64_t>(1, cdiv(c.m, 64) * r_chunks));
  }
  return unit_slices(cols, std::min(want, g_settings.max_inner_splits), unit);
}

// lora.py _slices: the S (cols = K) or dS (cols = N) pass's slices; `gemm_sums`: the one GEMM reading them sums fp32
// slices itself (`tma`: the TMA GEMM, which splits up to split_sum_max_m rows like the sum); otherwise, up to
// split_sum_max_m rows, sum_slices sums them right after the pass (`summed`).
struct Slices {
  int64_t splits, cols;
  bool summed;
};

Slices slices_of(const Call& c, int64_t cols, int64_t r_chunks, bool gemm_sums, bool tma) {
  if (gemm_sums && !tma) {
    const auto [splits, per] = inner_splits_of(c, cols, r_chunks);
    return {splits, per, false};
  }
  if (c.m <= g_settings.split_sum_max_m) {
    const auto [splits, per] = inner_splits_of(c, cols, r_chunks, g_settings.split_sum_max_m);
    return {splits, per, splits > 1 && !gemm_sums};
  }
  return {1, cols, false};
}

// lora.py _ds_slices: the dS pass's slices; above split_sum_max_m rows, before the TMA dX GEMM or NF4 chunks, ds_splits
// slices of N (whole split units), summed as in slices_of.
Slices ds_slices_of(const Call& c, int64_t n, int64_t r_chunks, bool gemm_sums, bool tma) {
  if (c.m <= g_settings.split_sum_max_m || (gemm_sums && !tma) || g_settings.ds_splits == 1)
    return slices_of(c, n, r_chunks, gemm_sums, tma);
  const auto [splits, per] =
      unit_slices(n, g_settings.ds_splits, c.x.is_cuda() ? g_settings.split_unit : g_settings.split_unit_interp);
  return {splits, per, splits > 1 && !gemm_sums};
}

// One job of the finish kernel (lora.py _Finish): dst = src's `splits` slices `stride` apart summed in fp32, rounded.
struct FinishJob {
  at::Tensor src, dst;
  int64_t n, splits, stride;
};

// The finish kernel's launch for up to three jobs; an absent job repeats the first one's tensors with 0 elements.
Launch finish_of(const std::vector<FinishJob>& jobs) {
  Launch l;
  l.kernel = K_FIN;
  l.grid[0] = -1;  // the jobs' cdiv(n, BLOCK_N), summed
  l.grid[1] = l.grid[2] = 1;
  for (int j = 0; j < 3; ++j) {
    const FinishJob& job = j < static_cast<int>(jobs.size()) ? jobs[j] : jobs[0];
    l.ptr(job.src);
    l.ptr(job.dst);
  }
  for (int j = 0; j < 3; ++j) {
    const bool real = j < static_cast<int>(jobs.size());
    l.elems[j] = real ? jobs[j].n : 0;
    l.i(l.elems[j]);
    l.i(real ? jobs[j].splits : 1);
    l.i(real ? jobs[j].stride : 0);
  }
  return l;
}

// lora.py _sum_into: `out` = the fp32 slices `parts` the last launch wrote, summed and rounded right after it: by
// one finish launch, or by torch after that launch (after_launch) without the finish kernel.
void sum_slices(Work& work, const at::Tensor& parts, const at::Tensor& out) {
  if (!g_settings.finish_kernel) {
    work.launches.back().sum_parts = parts;
    work.launches.back().sum_out = out;
    return;
  }
  work.launches.push_back(finish_of({{parts, out, out.numel(), parts.size(0), parts.stride(0)}}));
}

// ------------------------------------------------------------------------------------------------- forward

struct FwdOut {
  at::Tensor y, s;
};

// lora.py _W under _SIDE_DQ: the whole-weight dequantization on the second stream, beside the S / dS pass that
// follows it; the GEMM just pushed (work.launches.back()) joins it (_W.join).
void dequant_beside(const Call& c, Work& work, const WArgs& w) {
  if (!(g_settings.side_dq && w.whole_dq >= 0 && c.x.is_cuda() && c.n > 0 && c.k > 0)) return;
  work.launches[w.whole_dq].on_side = work.launches[w.whole_dq].fork = true;
  work.launches.back().join = true;
}

FwdOut build_forward(const Call& c, Work& work) {
  WArgs w = weight_args(c, work, true);
  const Dropout drop = make_dropout(c, true);
  FwdOut o;
  o.y = at::empty({c.m, c.n}, c.x.options());
  o.s = at::empty({c.m, c.r}, c.x.options());
  const int64_t block_r = block_r_of(c.r);
  const int64_t r_chunks = cdiv(c.r, block_r);
  const int64_t m_bucket = next_pow2(c.m);
  const bool base_mm = base_mm_ok(w, true);
  const bool tma = !base_mm && use_tma(c, c.x, w, o.y);
  // S in K slices: summed right after the pass before a TMA GEMM (presum), else by the one forward GEMM, which
  // stores S rounded (see slices_of).
  // Under base_mm the GEMM's tiles read nothing but the slices: they split as before the TMA GEMM.
  const auto [splits, cols, summed] =
      slices_of(c, c.k, r_chunks, !(c.n == 0 || !w.chunks.empty() || (g_settings.presum && tma)), tma || base_mm);
  at::Tensor s_part = splits == 1 ? o.s : at::empty({splits, c.m, c.r}, c.x.options().dtype(at::kFloat));
  if (splits > 1) work.keep.push_back(s_part);
  Launch l;  // lora.py lora_forward: S = dropout(x) @ A^T
  l.kernel = K_S;
  l.grid[0] = -1;  // cdiv(m, BLOCK_M)
  l.grid[1] = r_chunks;
  l.grid[2] = splits;
  l.ptr(c.x);
  l.ptr(c.A);
  l.ptr_raw(drop.seed_ptr);
  l.ptr(s_part);
  l.i(c.x.stride(0));
  l.i(c.x.stride(1));
  l.i(c.A.stride(0));
  l.i(c.A.stride(1));
  l.i(splits > 1 ? s_part.stride(0) : 0);
  l.i(s_part.stride(-2));
  l.i(s_part.stride(-1));
  l.i(c.m);
  l.i(c.k);
  l.i(c.r);
  l.i(cols);
  l.i(drop.threshold);
  l.f(drop.scale);
  l.i(m_bucket);
  work.launches.push_back(l);
  if (summed) sum_slices(work, s_part, o.s);
  const Dropout off = make_dropout(c, false);
  if (!w.chunks.empty()) {
    // y's columns n0:n1 from W's rows n0:n1.
    chunk_gemms(c, work, w, [&](const WArgs& wc, int64_t n0, int64_t n1) {
      const at::Tensor yc = narrow_view(o.y, 1, n0, n1 - n0);
      const at::Tensor bc = narrow_view(c.B, 0, n0, n1 - n0);
      const at::Tensor biasc = c.bias.defined() ? narrow_view(c.bias, 0, n0, n1 - n0) : at::Tensor();
      gemm(c, work, K_FWD, c.x, wc, yc, o.s, bc, bc.stride(1), bc.stride(0), c.bias.defined() ? &biasc : nullptr,
           off, c.scaling, true, m_bucket, use_tma(c, c.x, wc, yc, c.n * c.k), nullptr, -1, 0, n0);
    });
  } else if (c.n > 0) {
    const bool gemm_sums = splits > 1 && !summed;
    gemm(c, work, K_FWD, c.x, w, o.y, gemm_sums ? s_part : o.s, c.B, c.B.stride(1), c.B.stride(0),
         c.bias.defined() ? &c.bias : nullptr, off, c.scaling, true, m_bucket, tma, gemm_sums ? &o.s : nullptr, -1, 0,
         0, false, base_mm);
    dequant_beside(c, work, w);
  }
  return o;
}

// ------------------------------------------------------------------------------------------------ backward

// The tensor ops between the backward's launches (casts and split sums), run after its launches.
struct BwdOut {
  at::Tensor dx, dA, dB, dbias;
  at::Tensor acc, db_acc, dbias_acc;  // fp32 atomic targets (one zeroed buffer)
  at::Tensor db_parts, dbias_parts, da_parts;
  bool fused_db = false, fused_dbias = false;
};

// lora.py _Finish with _FINISH_KERNEL: the gradients that come out of fp32 buffers (dB, dbias, dA, in that order)
// allocated here and summed / rounded by one finish launch after the others (finish_backward leaves them be).
void finish_launch(const Call& c, BwdOut& o, Work& work) {
  const at::ScalarType dt = c.x.scalar_type();
  const auto opts = c.x.options();
  std::vector<FinishJob> jobs;
  auto sum = [&](const at::Tensor& parts, at::IntArrayRef shape, at::Tensor& out) {
    if (parts.size(0) == 1) return;
    out = at::empty(shape, opts);
    jobs.push_back({parts, out, out.numel(), parts.size(0), parts.stride(0)});
  };
  auto cast = [&](const at::Tensor& acc, at::IntArrayRef shape, bool copy, at::Tensor& out) {
    if (dt == at::kFloat && !copy) return;
    out = at::empty(shape, opts);
    jobs.push_back({acc, out, out.numel(), 1, 0});
  };
  const int64_t rb = c.groups.empty() ? c.r : c.rb;
  if (o.fused_db) cast(o.db_acc, {c.n, rb}, false, o.dB);
  if (o.fused_dbias) cast(o.dbias_acc, {c.n}, true, o.dbias);
  if (o.db_parts.defined()) sum(o.db_parts, {c.n, rb}, o.dB);
  if (o.dbias_parts.defined()) sum(o.dbias_parts, {c.n}, o.dbias);
  if (o.da_parts.defined()) sum(o.da_parts, {c.r, c.k}, o.dA);
  if (!jobs.empty()) work.launches.push_back(finish_of(jobs));
}

BwdOut build_backward(const Call& c, Work& work, bool deterministic) {
  BwdOut o;
  const auto opts = c.x.options();
  const Dropout drop = make_dropout(c, true);
  if (c.need_dx) o.dx = at::empty({c.m, c.k}, opts);
  const bool need_ds = c.need_dx || c.need_dA;
  WArgs w;
  if (c.need_dx) w = weight_args(c, work, false);
  const int64_t block_r = block_r_of(c.r);
  const int64_t r_chunks = cdiv(c.r, block_r);
  const int64_t m_bucket = next_pow2(c.m);
  const bool atomics = need_ds && !deterministic && c.m <= g_settings.atomic_db_max_m;
  o.fused_db = atomics && c.need_dB;
  o.fused_dbias = atomics && c.need_dbias;
  const int64_t rb = c.groups.empty() ? c.r : c.rb;  // dB's columns (lora.py: B_rows' rb for a group)
  const at::Tensor& scratch = c.dt->scratch;
  const bool segs = !c.dys.empty();
  const bool base_mm = c.need_dx && base_mm_ok(w, false);
  const bool tma_dx = c.need_dx && !base_mm && use_tma(c, c.dy, w, o.dx, segs ? c.n * c.k : -1);
  // dS in N slices: summed first before a TMA dX GEMM (presum), else fp32 partials the one dX GEMM sums (it stores
  // dS rounded for the dA kernel); see slices_of.
  const bool dx_sums = c.need_dx && c.k > 0 && w.chunks.empty() && !(g_settings.presum && tma_dx);
  // lora.py _DS_MEMBERS: with B_rows, the dS pass's programs per member (MEMBER_R), its slices counted as one chunk's.
  const bool members = !c.groups.empty() && g_settings.ds_members;
  const auto [splits_ds, cols_ds, ds_summed] =
      ds_slices_of(c, c.n, members ? 1 : r_chunks, dx_sums, tma_dx || base_mm);
  at::Tensor ds, ds_part;
  if (need_ds) {
    ds = at::empty({c.m, c.r}, opts);
    ds_part = splits_ds == 1 ? ds : at::empty({splits_ds, c.m, c.r}, opts.dtype(at::kFloat));
    if (splits_ds > 1) work.keep.push_back(ds_part);
    if (o.fused_db || o.fused_dbias) {
      const int64_t size = (o.fused_db ? c.n * rb : 0) + (o.fused_dbias ? c.n : 0);
      o.acc = at::empty({size}, opts.dtype(at::kFloat));  // zeroed before the launches
      work.keep.push_back(o.acc);
      if (o.fused_db) o.db_acc = narrow_view(o.acc, 0, 0, c.n * rb).view({c.n, rb});
      if (o.fused_dbias) o.dbias_acc = narrow_view(o.acc, 0, o.fused_db ? c.n * rb : 0, c.n);
    }
    Launch l;
    l.kernel = K_DS;
    l.grid[0] = -1;  // cdiv(m, BLOCK_M)
    l.grid[1] = members ? c.r / c.rb : r_chunks;
    l.grid[2] = splits_ds;
    l.ptr(c.dy);
    l.ptr(c.B);
    l.ptr(c.s);
    l.ptr(ds_part);
    l.ptr(o.fused_db ? o.db_acc : scratch);
    l.ptr(o.fused_dbias ? o.dbias_acc : scratch);
    l.i(c.dy.stride(0));
    l.i(c.dy.stride(1));
    l.i(c.B.stride(0));
    l.i(c.B.stride(1));
    l.i(c.s.stride(0));
    l.i(c.s.stride(1));
    l.i(splits_ds > 1 ? ds_part.stride(0) : 0);
    l.i(ds_part.stride(-2));
    l.i(ds_part.stride(-1));
    l.i(c.m);
    l.i(c.n);
    l.i(c.r);
    l.i(cols_ds);
    l.f(c.scaling);
    l.i(m_bucket);
    group_args(l, c, true);
    seg_ptrs(l, c, segs);
    work.launches.push_back(l);
    if (ds_summed) sum_slices(work, ds_part, ds);
  }
  const bool do_db = c.need_dB && !o.fused_db;
  const bool do_dbias = c.need_dbias && !o.fused_dbias;
  if (do_db || do_dbias) {
    auto [splits, rows] = splits_of(c, cdiv(c.n, 64) * r_chunks);
    at::Tensor db_out = do_db ? split_partials(splits, {c.n, rb}, opts) : scratch.view({1, 1, 16});
    at::Tensor dbias_out = do_dbias ? split_partials(splits, {c.n}, opts) : scratch.view({1, 16});
    if (do_db) o.db_parts = db_out;
    if (do_dbias) o.dbias_parts = dbias_out;
    Launch l;
    l.kernel = K_DB;
    l.grid[0] = -1;  // cdiv(n, BLOCK_N)
    l.grid[1] = r_chunks;
    l.grid[2] = splits;
    l.ptr(c.dy);
    l.ptr(c.s);
    l.ptr(db_out);
    l.ptr(dbias_out);
    l.i(c.dy.stride(0));
    l.i(c.dy.stride(1));
    l.i(c.s.stride(0));
    l.i(c.s.stride(1));
    l.i(splits > 1 ? db_out.stride(0) : 0);
    l.i(db_out.stride(1));
    l.i(db_out.stride(2));
    l.i(splits > 1 ? dbias_out.stride(0) : 0);
    l.i(dbias_out.stride(1));
    l.i(c.m);
    l.i(c.n);
    l.i(c.r);
    l.i(rows);
    l.f(c.scaling);
    l.i(m_bucket);
    group_args(l, c, true);
    seg_ptrs(l, c, segs);
    work.launches.push_back(l);
  }
  if (c.need_dx && c.k > 0 && !w.chunks.empty()) {
    // dX's columns k0:k1 from W's columns k0:k1.
    chunk_gemms(c, work, w, [&](const WArgs& wc, int64_t k0, int64_t k1) {
      const at::Tensor dxc = narrow_view(o.dx, 1, k0, k1 - k0);
      const at::Tensor ac = narrow_view(c.A, 1, k0, k1 - k0);
      gemm(c, work, K_DX, c.dy, wc, dxc, ds, ac, ac.stride(0), ac.stride(1), nullptr, drop, 1.0, false, m_bucket,
           use_tma(c, c.dy, wc, dxc, c.n * c.k), nullptr, c.k, k0, 0, segs);
    });
  }
  // lora.py _SIDE_DA: dA on the second stream beside the dX GEMM, when that GEMM does not write the dS dA reads.
  const bool side = g_settings.side_da && tma_dx && c.need_dA && c.k > 0 && w.chunks.empty()
                    && (splits_ds == 1 || ds_summed) && c.x.is_cuda();
  if (c.need_dx && c.k > 0 && w.chunks.empty()) {
    const bool dx_parts = splits_ds > 1 && !ds_summed;
    gemm(c, work, K_DX, c.dy, w, o.dx, dx_parts ? ds_part : ds, c.A, c.A.stride(0), c.A.stride(1), nullptr, drop,
         1.0, false, m_bucket, tma_dx, dx_parts && c.need_dA ? &ds : nullptr, -1, 0, 0, segs, base_mm);
    work.launches.back().narrow = work.launches.back().fork = side;
    dequant_beside(c, work, w);
  }
  if (c.need_dA) {
    auto [splits, rows] = splits_of(c, cdiv(c.k, 64) * r_chunks);
    at::Tensor da_out = split_partials(splits, {c.r, c.k}, opts);
    o.da_parts = da_out;
    Launch l;
    l.kernel = K_DA;
    l.grid[0] = -1;  // cdiv(k, BLOCK_K)
    l.grid[1] = r_chunks;
    l.grid[2] = splits;
    l.ptr(c.x);
    l.ptr(ds);
    l.ptr_raw(drop.seed_ptr);
    l.ptr(da_out);
    l.i(c.x.stride(0));
    l.i(c.x.stride(1));
    l.i(ds.stride(0));
    l.i(ds.stride(1));
    l.i(splits > 1 ? da_out.stride(0) : 0);
    l.i(da_out.stride(1));
    l.i(da_out.stride(2));
    l.i(c.m);
    l.i(c.k);
    l.i(c.r);
    l.i(rows);
    l.i(drop.threshold);
    l.f(drop.scale);
    l.i(m_bucket);
    l.on_side = side;
    work.launches.push_back(l);
  }
  work.keep.push_back(ds);
  const size_t before_finish = work.launches.size();
  if (g_settings.finish_kernel) finish_launch(c, o, work);
  if (side && work.launches.size() > before_finish) work.launches.back().join = true;
  return o;
}

at::Tensor split_sum(const at::Tensor& parts, at::ScalarType dtype) {
  return parts.size(0) == 1 ? parts.select(0, 0) : parts.sum(0).to(dtype);
}

// The gradients finish_launch did not take (all of them without the finish kernel). With it, a group's dB comes
// back whole (db_in_blocks or not), as the Python launchers give it.
void finish_backward(const Call& c, BwdOut& o) {
  const at::ScalarType dt = c.x.scalar_type();
  if (!o.dB.defined() && o.fused_db && !c.db_in_blocks) o.dB = dt == at::kFloat ? o.db_acc : o.db_acc.to(dt);
  // A copy in fp32: dB is a view of the same buffer, and the op's outputs may not alias each other.
  if (!o.dbias.defined() && o.fused_dbias) o.dbias = dt == at::kFloat ? o.dbias_acc.clone() : o.dbias_acc.to(dt);
  if (!o.dB.defined() && o.db_parts.defined()) o.dB = split_sum(o.db_parts, dt);
  if (!o.dbias.defined() && o.dbias_parts.defined()) o.dbias = split_sum(o.dbias_parts, dt);
  if (!o.dA.defined() && o.da_parts.defined()) o.dA = split_sum(o.da_parts, dt);
}

// ---------------------------------------------------------------------------------- matching and launching

// Fills in each launch's variant and its config-dependent grid; false on the first launch without a match.
bool resolve(const Plan& plan, const Call& c, Work& work, bool any = false) {
  for (Launch& l : work.launches) {
    const Variant* found = nullptr;
    for (const Variant& v : plan.variants[l.kernel]) {
      if (l.kernel == K_TMA && (v.block_m >= g_settings.tma_small_m ? 1 : 0) != l.want_config) continue;
      if (l.kernel == K_DQ && v.nb != l.want_config) continue;
      if (variant_matches(l, v, any)) {
        found = &v;
        break;
      }
    }
    if (found == nullptr) return false;
    l.variant = found;
    const int64_t m = c.m;
    switch (l.kernel) {
      case K_S:
      case K_DS:
        l.grid[0] = cdiv(m, found->block_m);
        break;
      case K_FWD:
      case K_DX:
        l.grid[0] = cdiv(m, found->block_m) * cdiv(l.gemm_n, found->block_n);
        break;
      case K_DB:
        l.grid[0] = cdiv(c.n, found->block_n);
        break;
      case K_DA:
        l.grid[0] = cdiv(c.k, found->block_k);
        break;
      case K_FIN:
        l.grid[0] = cdiv(l.elems[0], found->block_n) + cdiv(l.elems[1], found->block_n)
                    + cdiv(l.elems[2], found->block_n);
        break;
      case K_TMA:
      case K_WS: {
        // The descriptors' tiles: a and a group's further dY members [BM, BK], W [BN, BK] (forward) or [BK, BN]
        // (dX), out [BM, BN]; the Gluon kernel's L (descriptor 3) like a, its Rt (4) like W.
        const int64_t bm = found->block_m, bn = found->block_n, bk = found->block_k;
        for (int i = 0; i < l.ndesc; ++i) {
          const bool like_w = i == 1 || (l.kernel == K_WS && i == 4);
          l.descs[i].block[0] = i == 2 ? bm : like_w ? (l.trans_w ? bn : bk) : bm;
          l.descs[i].block[1] = i == 2 ? bn : like_w ? (l.trans_w ? bk : bn) : bk;
        }
        const int64_t tiles = cdiv(l.descs[2].shape[0], bm) * cdiv(l.descs[2].shape[1], bn);
        const int64_t sms = c.x.is_cuda() ? c.dt->sms : 4;
        l.grid[0] = std::max<int64_t>(1, std::min(sms, tiles));
        if (l.narrow) l.grid[0] = cdiv(tiles, cdiv(tiles, l.grid[0]));  // lora.py _fewest_programs
        break;
      }
      default:
        break;
    }
  }
  return true;
}

// The tensor ops right after a launch, in stream order: its S / dS slices summed and rounded (lora.py
// s.copy_(s_part.sum(0))), its base product added (lora.py _BASE_MM: c.addmm_(a, op(W))).
void after_launch(const Launch& l) {
  if (l.sum_parts.defined()) l.sum_out.copy_(l.sum_parts.sum(0));
  if (l.mm_out.defined()) l.mm_out.addmm_(l.mm_a, l.mm_b);
}

#ifdef LORA_OPS_LAUNCH_CUDA

struct Driver {
  using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                CUstream, void**, void**);
  using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  using ErrorFn = CUresult (*)(CUresult, const char**);
  LaunchFn launch = nullptr;
  EncodeFn encode = nullptr;
  ErrorFn error = nullptr;
};

const Driver& driver() {
  // The driver API through libcuda.so.1, as Triton's own launcher loads it (no link-time dependency on libcuda).
  static Driver d = [] {
    Driver out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(lib != nullptr, "lora_ops launch: cannot open libcuda.so.1 (", dlerror(), ")");
    out.launch = reinterpret_cast<Driver::LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    out.encode = reinterpret_cast<Driver::EncodeFn>(dlsym(lib, "cuTensorMapEncodeTiled"));
    out.error = reinterpret_cast<Driver::ErrorFn>(dlsym(lib, "cuGetErrorString"));
    TORCH_CHECK(out.launch != nullptr && out.error != nullptr, "lora_ops launch: libcuda.so.1 lacks cuLaunchKernel");
    return out;
  }();
  return d;
}

void check_cu(CUresult res, const char* what, const Launch& l) {
  if (res == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().error(res, &msg);
  TORCH_CHECK(false, "lora_ops launch: ", what, " failed for kernel ", kKernelNames[l.kernel], ": ",
              msg ? msg : "unknown CUDA error");
}

// Encoded TMA descriptors by their encode arguments (LORA_OPS_TMA_CACHE=0 turns the cache off).
// cuTensorMapEncodeTiled is a pure function of those arguments (address, dims, strides, box, element type,
// swizzle; the rest fixed here), so a hit is byte for byte the map a fresh encode would give; a training loop
// meets the same few hundred addresses step after step (the caching allocator hands them out again).
struct MapKey {
  uint64_t ptr;
  int64_t shape0, shape1, stride0;
  std::array<int64_t, 5> meta;  // Variant::tma: swizzle, elem_size, elem_type, box0, box1
  bool operator==(const MapKey& o) const {
    return ptr == o.ptr && shape0 == o.shape0 && shape1 == o.shape1 && stride0 == o.stride0 && meta == o.meta;
  }
};
struct MapKeyHash {
  size_t operator()(const MapKey& k) const {
    const int64_t v[9] = {static_cast<int64_t>(k.ptr), k.shape0, k.shape1, k.stride0, k.meta[0], k.meta[1],
                          k.meta[2], k.meta[3], k.meta[4]};
    return fnv_hash(v, 9);
  }
};
constexpr size_t kMaxMaps = 8192;  // ~1.5 MB; cleared whole when full
using MapCache = std::unordered_map<MapKey, CUtensorMap, MapKeyHash>;
MapCache& g_maps = *new MapCache();  // never destroyed, as g_devices
int64_t g_map_hits = 0, g_map_misses = 0;

void launch_one(const Launch& l, CUstream stream, bool map_cache) {
  if (l.grid[0] * l.grid[1] * l.grid[2] == 0) return;
  const Variant& v = *l.variant;
  alignas(64) CUtensorMap maps[8];
  int map_desc[8];  // which of l.descs each map encodes: a descriptor repeated in one launch is encoded once
  uint64_t words[kMaxArgs * 3];  // scalar storage, one 8-byte word per scalar (ints and floats fit)
  void* params[kMaxArgs * 3 + 2];
  int np = 0, nw = 0;
  int ntma = 0;
  for (int i = 0; i < l.nargs; ++i) {
    const Arg& a = l.args[i];
    const char code = v.spec[i].code;
    if (code == 'c') continue;
    uint64_t* word = &words[nw++];
    switch (code) {
      case 'P':
      case 'l':
      case 'u':
        *word = static_cast<uint64_t>(a.i);
        params[np++] = word;
        break;
      case 'i': {
        int32_t x = static_cast<int32_t>(a.i);
        std::memcpy(word, &x, sizeof(x));
        params[np++] = word;
        break;
      }
      case 'f': {
        float x = static_cast<float>(a.f);
        std::memcpy(word, &x, sizeof(x));
        params[np++] = word;
        break;
      }
      case 'T': {
        const Desc& d = l.descs[a.i];
        const auto& meta = v.tma[ntma];
        int same = -1;
        for (int j = 0; j < ntma && same < 0; ++j) {
          const Desc& e = l.descs[map_desc[j]];
          if (e.ptr == d.ptr && e.shape[0] == d.shape[0] && e.shape[1] == d.shape[1] && e.strides[0] == d.strides[0]
              && e.strides[1] == d.strides[1] && v.tma[j] == meta)
            same = j;
        }
        map_desc[ntma] = a.i;
        const MapKey key{d.ptr, d.shape[0], d.shape[1], d.strides[0], meta};
        auto hit = map_cache && same < 0 ? g_maps.find(key) : g_maps.end();
        if (same >= 0) {
          maps[ntma] = maps[same];
        } else if (hit != g_maps.end()) {
          maps[ntma] = hit->second;
          ++g_map_hits;
        } else {
          int64_t t = g_timing.on ? now_ns() : 0;
          TORCH_CHECK(driver().encode != nullptr, "lora_ops launch: libcuda.so.1 lacks cuTensorMapEncodeTiled");
          const int64_t esize = meta[1];
          cuuint64_t dims[2] = {static_cast<cuuint64_t>(d.shape[1]), static_cast<cuuint64_t>(d.shape[0])};
          cuuint64_t gstrides[1] = {static_cast<cuuint64_t>(d.strides[0] * esize)};
          cuuint32_t box[2] = {static_cast<cuuint32_t>(meta[4]), static_cast<cuuint32_t>(meta[3])};
          cuuint32_t estrides[2] = {1, 1};
          check_cu(driver().encode(&maps[ntma], static_cast<CUtensorMapDataType>(meta[2]), 2,
                                   reinterpret_cast<void*>(d.ptr), dims, gstrides, box, estrides,
                                   CU_TENSOR_MAP_INTERLEAVE_NONE, static_cast<CUtensorMapSwizzle>(meta[0]),
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                   "cuTensorMapEncodeTiled", l);
          if (map_cache) {
            if (g_maps.size() >= kMaxMaps) g_maps.clear();
            g_maps.emplace(key, maps[ntma]);
            ++g_map_misses;
          }
          lap(PH_ENCODE, t);
        }
        params[np++] = &maps[ntma++];
        --nw;
        for (int j = 0; j < 2; ++j) {
          int32_t sh = static_cast<int32_t>(d.shape[j]);
          uint64_t* sw = &words[nw++];
          std::memcpy(sw, &sh, sizeof(sh));
          params[np++] = sw;
        }
        for (int j = 0; j < 2; ++j) {
          uint64_t* sw = &words[nw++];
          *sw = static_cast<uint64_t>(d.strides[j]);
          params[np++] = sw;
        }
        break;
      }
    }
  }
  uint64_t global_scratch = 0, profile_scratch = 0;
  params[np++] = &global_scratch;
  params[np++] = &profile_scratch;
  int64_t t = g_timing.on ? now_ns() : 0;
  check_cu(driver().launch(reinterpret_cast<CUfunction>(v.function), static_cast<unsigned>(l.grid[0]),
                           static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]),
                           static_cast<unsigned>(32 * v.num_warps), 1, 1, static_cast<unsigned>(v.shared), stream,
                           params, nullptr),
           "cuLaunchKernel", l);
  lap(PH_LAUNCH, t);
}

// lora.py _side_stream: one second stream per device, and the two events that fork it from the current stream
// and join it back (made once, without timing).
struct Side {
  c10::cuda::CUDAStream stream;
  cudaEvent_t fork, join;
};
Side& side_of(int dev) {
  static std::unordered_map<int, Side>& sides = *new std::unordered_map<int, Side>();
  auto it = sides.find(dev);
  if (it == sides.end()) {
    Side s{c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(dev)), nullptr, nullptr};
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming));
    it = sides.emplace(dev, s).first;
  }
  return it->second;
}

void run_launches(const Call& c, Work& work, const at::Tensor& zero_first) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(c.dev);
  int64_t t = g_timing.on ? now_ns() : 0;
  if (zero_first.defined())
    C10_CUDA_CHECK(cudaMemsetAsync(zero_first.data_ptr(), 0, zero_first.nbytes(), stream.stream()));
  lap(PH_LAUNCH, t);
  const bool map_cache = env_flag("LORA_OPS_TMA_CACHE", true);
  Side* side = nullptr;
  bool pending = false;  // work on the side stream the current stream has not waited for yet
  auto join = [&]() {
    C10_CUDA_CHECK(cudaEventRecord(side->join, side->stream.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), side->join, 0));
    pending = false;
  };
  for (const Launch& l : work.launches) {
    if (l.join && pending) join();
    if (l.fork) {
      // The side stream starts after everything enqueued before this launch, not after this launch.
      if (side == nullptr) side = &side_of(c.dev);
      C10_CUDA_CHECK(cudaEventRecord(side->fork, stream.stream()));
      C10_CUDA_CHECK(cudaStreamWaitEvent(side->stream.stream(), side->fork, 0));
    }
    if (l.on_side) {
      TORCH_CHECK(side != nullptr, "lora_ops launch: a side-stream launch without a fork before it");
      launch_one(l, side->stream.stream(), map_cache);
      pending = true;
      // The tensor ops after a launch run on the current stream: they must see it.
      if (l.sum_parts.defined() || l.mm_out.defined()) join();
    } else {
      launch_one(l, stream.stream(), map_cache);
    }
    ++g_launches[l.kernel];
    if (l.sum_parts.defined() || l.mm_out.defined()) {
      t = g_timing.on ? now_ns() : 0;
      after_launch(l);
      lap(PH_AFTER, t);
    }
  }
  if (pending) join();  // nothing the call returns may still be written on the side stream
}

#else

// The CPU test build launches nothing. With LORA_OPS_LAUNCH_NOOP=1 it still runs everything around the launches
// (the zeroed buffer, the slice sums), so a call's whole host path minus the driver's launches can be timed on a
// CPU (scripts/host_group_cpu.py); the outputs are then uninitialized.
void run_launches(const Call&, Work& work, const at::Tensor& zero_first) {
  TORCH_CHECK(env_flag("LORA_OPS_LAUNCH_NOOP", false), "lora_ops launch: this build has no CUDA (dry runs only)");
  int64_t t = g_timing.on ? now_ns() : 0;
  if (zero_first.defined()) zero_first.zero_();
  lap(PH_LAUNCH, t);
  for (const Launch& l : work.launches) after_launch(l);
  lap(PH_AFTER, t);
}

#endif

// ---------------------------------------------------------------------------------------------- running

constexpr int64_t UNSUPPORTED = -1;

// Runs one forward (`bwd` null) or backward, or with `dry` only builds its launch list (tiles resolved against any
// registered variant, verified or not, so the list can be compared with Python's records). Returns true with the
// outputs set, or false with `status` = the plan id to register on a miss, or UNSUPPORTED.
bool run(const Call& c, bool dry, FwdOut* fwd, BwdOut* bwd, Work& work, int64_t& status) {
  status = UNSUPPORTED;
  if (!c.ok || !launch_path_enabled() || (tma_mode() == TMA_BAD)) return false;
#ifndef LORA_OPS_LAUNCH_CUDA
  // Nothing can launch here: the Python launchers (the interpreter) run the call, unless run_launches only times.
  const bool noop = env_flag("LORA_OPS_LAUNCH_NOOP", false);
  if (!dry && !noop) return false;
#else
  const bool noop = false;
#endif
  const bool det = bwd != nullptr && at::globalContext().deterministicAlgorithms();
  const PlanKey key = make_key(c, bwd != nullptr, det);
#ifdef LORA_OPS_LAUNCH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (c.x.is_cuda()) guard.emplace(c.x.device());
#endif
  std::lock_guard<std::mutex> lock(g_mutex);
  int64_t t = g_timing.on && !dry ? now_ns() : 0;
  const int64_t id = plan_id(key);
  const Plan& plan = g_plans[id];
  if (plan.disabled && !dry) return false;
  if (bwd != nullptr)
    *bwd = build_backward(c, work, det);
  else
    *fwd = build_forward(c, work);
  status = id;
  if (dry) {
    resolve(plan, c, work, true);
    return true;
  }
  lap(PH_BUILD, t);
  if (!resolve(plan, c, work, noop) && !noop) return false;
  lap(PH_RESOLVE, t);
  g_timing.calls += g_timing.on ? 1 : 0;
  run_launches(c, work, bwd != nullptr ? bwd->acc : at::Tensor());
  t = g_timing.on ? now_ns() : 0;
  if (bwd != nullptr) finish_backward(c, *bwd);
  lap(PH_AFTER, t);
  return true;
}

// ----------------------------------------------------------------------------------- Python-facing calls

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

Call make_call(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
               const std::optional<at::Tensor>& offset, int64_t blocksize, const at::Tensor& A, const at::Tensor& B,
               double scaling, const std::optional<at::Tensor>& bias, double p,
               const std::optional<at::Tensor>& seed) {
  Call c;
  c.x = x;
  c.w = w;
  c.absmax = opt(absmax);
  c.nested_absmax = opt(nested_absmax);
  c.nested_code = opt(nested_code);
  c.offset = opt(offset);
  c.blocksize = blocksize;
  c.A = A;
  c.B = B;
  c.scaling = scaling;
  c.bias = opt(bias);
  c.p = p;
  c.seed = opt(seed);
  return c;
}

py::object describe(const Work& work) {
  // The dry run's launch list for lora_ops/_launch.py to compare with the Python launchers' records.
  py::list out;
  for (const Launch& l : work.launches) {
    py::list args;
    for (int i = 0; i < l.nargs; ++i) {
      const Arg& a = l.args[i];
      switch (a.t) {
        case 'P':
          args.append(py::make_tuple("P", static_cast<uint64_t>(a.i)));
          break;
        case 'I':
          args.append(py::int_(a.i));
          break;
        case 'F':
          args.append(py::float_(a.f));
          break;
        case 'T': {
          const Desc& d = l.descs[a.i];
          args.append(py::make_tuple("T", d.ptr, d.shape[0], d.shape[1], d.strides[0], d.strides[1], d.block[0],
                                     d.block[1]));
          break;
        }
      }
    }
    out.append(py::make_tuple(kKernelNames[l.kernel], py::make_tuple(l.grid[0], l.grid[1], l.grid[2]), args));
  }
  return out;
}

// fwd(x, ..., groups, dry) -> (y, s) | plan id (int >= 0: a miss, register) | -1 (not this path). groups: a projection
// group's out_features with B its B_rows (Call::groups), or empty. dry: the launch list.
py::object fwd_entry(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, int64_t blocksize, const at::Tensor& A,
                     const at::Tensor& B, double scaling, const std::optional<at::Tensor>& bias, double p,
                     const std::optional<at::Tensor>& seed, const std::vector<int64_t>& groups, bool dry) {
  Call c = make_call(x, w, absmax, nested_absmax, nested_code, offset, blocksize, A, B, scaling, bias, p, seed);
  c.groups = groups;
  if (!check_call(c, false)) return py::int_(UNSUPPORTED);
  FwdOut o;
  Work work;
  int64_t status;
  if (!run(c, dry, &o, nullptr, work, status)) return py::int_(status);
  if (dry) return py::make_tuple(status, describe(work));  // grids are -1 where no registered variant matched
  return py::make_tuple(o.y, o.s);
}

py::object bwd_entry(const py::object& dy, const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                     int64_t blocksize, const at::Tensor& A, const at::Tensor& B, const at::Tensor& s, double scaling,
                     double p, const std::optional<at::Tensor>& seed, bool need_dx, bool need_dA, bool need_dB,
                     bool need_dbias, const std::vector<int64_t>& groups, bool dry) {
  Call c = make_call(x, w, absmax, nested_absmax, nested_code, offset, blocksize, A, B, scaling, std::nullopt, p,
                     seed);
  c.groups = groups;
  // dy: the concatenated (M, N) tensor, or a group's members' dY_i (Call::dys)
  if (py::isinstance<py::list>(dy) || py::isinstance<py::tuple>(dy))
    c.dys = dy.cast<std::vector<at::Tensor>>();
  else
    c.dy = dy.cast<at::Tensor>();
  c.s = s;
  c.need_dx = need_dx;
  c.need_dA = need_dA;
  c.need_dB = need_dB;
  c.need_dbias = need_dbias;
  if (!(need_dx || need_dA || need_dB || need_dbias) || !check_call(c, true)) return py::int_(UNSUPPORTED);
  BwdOut o;
  Work work;
  int64_t status;
  if (!run(c, dry, nullptr, &o, work, status)) return py::int_(status);
  if (dry) return py::make_tuple(status, describe(work));
  return py::make_tuple(o.dx, o.dA, o.dB, o.dbias);
}

// ------------------------------------------------------------------------------------------- registration

void add_variants(int64_t id, const py::list& records) {
  // records: [(kernel name, [(code, div16, specialize), ...], function, num_warps, shared,
  //            (BLOCK_M, BLOCK_N, BLOCK_K, NB), [(swizzle, elem_size, elem_type, box0, box1), ...]), ...]
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()), "lora_ops launch: no plan ", id);
  Plan& plan = g_plans[id];
  for (const py::handle& h : records) {
    const py::tuple rec = h.cast<py::tuple>();
    Variant v;
    const int kernel = kernel_id(rec[0].cast<std::string>());
    for (const py::handle& s : rec[1].cast<py::list>()) {
      const py::tuple t = s.cast<py::tuple>();
      const std::string code = t[0].cast<std::string>();
      TORCH_CHECK(code.size() == 1 && std::string("PilufcT").find(code[0]) != std::string::npos,
                  "lora_ops launch: bad argument code '", code, "'");
      v.spec.push_back(ArgSpec{code[0], t[1].cast<bool>(), t[2].cast<bool>()});
    }
    TORCH_CHECK(static_cast<int>(v.spec.size()) <= kMaxArgs, "lora_ops launch: too many arguments");
    v.function = rec[2].cast<uint64_t>();
    v.num_warps = rec[3].cast<int>();
    v.shared = rec[4].cast<int>();
    const py::tuple blocks = rec[5].cast<py::tuple>();
    v.block_m = blocks[0].cast<int64_t>();
    v.block_n = blocks[1].cast<int64_t>();
    v.block_k = blocks[2].cast<int64_t>();
    v.nb = blocks[3].cast<int64_t>();
    for (const py::handle& m : rec[6].cast<py::list>()) {
      const py::tuple t = m.cast<py::tuple>();
      v.tma.push_back({t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(), t[3].cast<int64_t>(),
                       t[4].cast<int64_t>()});
    }
    auto& list = plan.variants[kernel];
    bool dup = false;
    for (const Variant& o : list) {
      bool eq = o.function == v.function && o.spec.size() == v.spec.size() && o.block_m == v.block_m
                && o.block_n == v.block_n && o.block_k == v.block_k && o.nb == v.nb;
      for (size_t i = 0; eq && i < v.spec.size(); ++i)
        eq = o.spec[i].code == v.spec[i].code && o.spec[i].div16 == v.spec[i].div16;
      dup = dup || eq;
    }
    if (!dup) list.push_back(std::move(v));
  }
}

// After the dry-run comparison: verified variants are used from now on; a failed comparison sends the plan
// back to the Python launchers for good (and drops its unverified variants).
void set_verified(int64_t id, bool ok) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_plans.size()), "lora_ops launch: no plan ", id);
  Plan& plan = g_plans[id];
  for (auto& list : plan.variants) {
    if (ok) {
      for (Variant& v : list) v.verified = true;
    } else {
      list.erase(std::remove_if(list.begin(), list.end(), [](const Variant& v) { return !v.verified; }), list.end());
    }
  }
  if (!ok) plan.disabled = true;
}

void clear_plans() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans.clear();
  g_plan_index.clear();
}

py::dict stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  py::dict launches;
  for (int i = 0; i < NUM_KERNELS; ++i) launches[py::str(kKernelNames[i])] = g_launches[i];
  int64_t disabled = 0, variants = 0;
  for (const Plan& p : g_plans) {
    disabled += p.disabled ? 1 : 0;
    for (const auto& list : p.variants) variants += static_cast<int64_t>(list.size());
  }
  py::dict host;
  for (int i = 0; i < NUM_PHASES; ++i) host[py::str(kPhaseNames[i])] = g_timing.ns[i];
  py::dict out;
  out["launches"] = launches;
  out["host_ns"] = host;
  out["timed_calls"] = g_timing.calls;
#ifdef LORA_OPS_LAUNCH_CUDA
  out["tma_cache"] = py::make_tuple(g_map_hits, g_map_misses);
#endif
  out["plans"] = static_cast<int64_t>(g_plans.size());
  out["disabled"] = disabled;
  out["variants"] = variants;
  return out;
}

// Turns the per-phase host timer on or off and zeroes it.
void set_timing(bool on) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_timing = HostTiming();
  g_timing.on = on;
}

void configure(const py::dict& s) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto get = [&](const char* name, int64_t& dst) {
    if (s.contains(name)) dst = s[name].cast<int64_t>();
  };
  get("max_stride", g_settings.max_stride);
  get("min_dot", g_settings.min_dot);
  get("max_block_r", g_settings.max_block_r);
  get("dequant_min_m", g_settings.dequant_min_m);
  get("tma_min_m", g_settings.tma_min_m);
  get("tma_min_nk", g_settings.tma_min_nk);
  get("tma_min_mnk", g_settings.tma_min_mnk);
  get("tma_small_m", g_settings.tma_small_m);
  get("nested_blocksize", g_settings.nested_blocksize);
  get("dq_bytes_per_program", g_settings.dq_bytes_per_program);
  get("split_unit", g_settings.split_unit);
  get("split_unit_interp", g_settings.split_unit_interp);
  get("max_inner_splits", g_settings.max_inner_splits);
  get("split_max_m", g_settings.split_max_m);
  get("split_sum_max_m", g_settings.split_sum_max_m);
  get("ds_splits", g_settings.ds_splits);
  get("atomic_db_max_m", g_settings.atomic_db_max_m);
  get("nf4_chunk_bytes", g_settings.nf4_chunk_bytes);
  get("nf4_chunk_min_m", g_settings.nf4_chunk_min_m);
  get("dequant_on_cpu", g_settings.dequant_on_cpu);
  get("finish_kernel", g_settings.finish_kernel);
  get("base_mm", g_settings.base_mm);
  get("presum", g_settings.presum);
  get("ds_members", g_settings.ds_members);
  get("side_da", g_settings.side_da);
  get("side_dq", g_settings.side_dq);
  get("ws", g_settings.ws);
  get("ws_block_m", g_settings.ws_block_m);
  get("ws_block_n", g_settings.ws_block_n);
  if (s.contains("blocksizes")) g_settings.blocksizes = s["blocksizes"].cast<std::vector<int64_t>>();
}

void set_device(int dev, const at::Tensor& scratch, const at::Tensor& codebook, int sms, int major) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceTensors& d = g_devices[dev];
  d.scratch = scratch;
  d.codebook = codebook;
  d.sms = sms;
  d.major = major;
}

void set_fallback(py::object fn) { *g_fallback = std::move(fn); }

// A copy of `values` on device `dev` in memory of its own (cudaMalloc, never freed), outside PyTorch's caching
// allocator: the per-device tensors every launch reads (scratch, codebook) must not come from a CUDA-graph
// memory pool, which is where they would land if first made inside torch.compile's cudagraph warm-up.
at::Tensor persistent(int dev, const at::Tensor& values) {
#ifdef LORA_OPS_LAUNCH_CUDA
  if (dev >= 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
    const at::Tensor host = values.contiguous().cpu();
    void* ptr = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&ptr, host.nbytes()));
    C10_CUDA_CHECK(cudaMemcpy(ptr, host.data_ptr(), host.nbytes(), cudaMemcpyHostToDevice));
    return at::from_blob(ptr, host.sizes(), host.options().device(at::Device(at::kCUDA, dev)));
  }
#endif
  return values.clone();
}

// ---------------------------------------------------------------------------------------------- autograd

// Runs one forward; a miss or an unsupported call goes to the Python launchers (which register what they ran).
FwdOut forward_or_fallback(const Call& c) {
  FwdOut o;
  Work work;
  int64_t status;
  if (run(c, false, &o, nullptr, work, status)) return o;
  py::gil_scoped_acquire gil;
  py::tuple res = (*g_fallback)(0, status, c.x, c.w, c.absmax, c.nested_absmax, c.nested_code, c.offset, c.blocksize,
                             c.A, c.B, c.scaling, c.bias, c.p, c.seed, c.groups);
  o.y = res[0].cast<at::Tensor>();
  o.s = res[1].cast<at::Tensor>();
  return o;
}

BwdOut backward_or_fallback(const Call& c) {
  BwdOut o;
  Work work;
  int64_t status;
  if (run(c, false, nullptr, &o, work, status)) return o;
  py::gil_scoped_acquire gil;
  const py::object dy = c.dys.empty() ? py::cast(c.dy) : py::cast(c.dys);
  py::tuple res = (*g_fallback)(1, status, dy, c.x, c.w, c.absmax, c.nested_absmax, c.nested_code, c.offset,
                             c.blocksize, c.A, c.B, c.s, c.scaling, c.p, c.seed, c.need_dx, c.need_dA, c.need_dB,
                             c.need_dbias, c.groups);
  auto get = [&](int i) {
    py::object t = res[i];
    return t.is_none() ? at::Tensor() : t.cast<at::Tensor>();
  };
  o.dx = get(0);
  o.dA = get(1);
  o.dB = get(2);
  o.dbias = get(3);
  return o;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What a backward needs of its forward's call: x (flattened), the weight's tensors, A, B, S and the seed as saved
// tensors (no dequantized W and no dropout mask survive between forward and backward: the backward regenerates
// the mask from the seed), blocksize, scaling and p as saved data. x_sizes: x's shape before flattening.
// extra: further tensors to save after those ten (get_saved_variables()[10...]).
void save_call(AutogradContext* ctx, const Call& c, const at::Tensor& s, const at::Tensor& x,
               const std::vector<at::Tensor>& extra = {}) {
  variable_list saved{c.x, c.w, c.absmax, c.nested_absmax, c.nested_code, c.offset, c.A, c.B, s, c.seed};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["blocksize"] = c.blocksize;
  ctx->saved_data["scaling"] = c.scaling;
  ctx->saved_data["p"] = c.p;
  ctx->saved_data["x_sizes"] = x.sizes().vec();
}

// The call save_call kept, for the backward (dy and the need_* flags still to be set); extra (optional) receives
// save_call's extra tensors. The saved tensors are unpacked once: non-reentrant checkpointing allows no second time.
Call saved_call(AutogradContext* ctx, std::vector<at::Tensor>* extra = nullptr) {
  const auto saved = ctx->get_saved_variables();
  if (extra != nullptr) extra->assign(saved.begin() + 10, saved.end());
  Call c;
  c.x = saved[0];
  c.w = saved[1];
  c.absmax = saved[2];
  c.nested_absmax = saved[3];
  c.nested_code = saved[4];
  c.offset = saved[5];
  c.A = saved[6];
  c.B = saved[7];
  c.s = saved[8];
  c.seed = saved[9];
  c.blocksize = ctx->saved_data["blocksize"].toInt();
  c.scaling = ctx->saved_data["scaling"].toDouble();
  c.p = ctx->saved_data["p"].toDouble();
  return c;
}

// lora_ops::lora_fwd with its autograd, in C++. The forward takes the op's arguments in the op's order; backward
// returns one gradient slot per argument (x 0, lora_A 7, lora_B 8, bias 10). needs_input_grad counts only the
// tensor arguments that are present, so their edge indices are worked out in forward. What is saved: save_call.
struct LoRAFunction : public torch::autograd::Function<LoRAFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                            int64_t blocksize, const at::Tensor& A, const at::Tensor& B, double scaling,
                            const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& seed) {
    const int64_t k = x.size(-1);
    Call c = make_call(x.dim() == 2 ? x : x.reshape({-1, k}), w, absmax, nested_absmax, nested_code, offset,
                       blocksize, A, B, scaling, bias, p, seed);
    check_call(c, false);
    FwdOut o = forward_or_fallback(c);
    save_call(ctx, c, o.s, x);
    int64_t edge = 2;  // x, w
    for (const auto* t : {&absmax, &nested_absmax, &nested_code, &offset}) edge += (t->has_value() && (*t)->defined());
    ctx->saved_data["edge_A"] = edge;
    ctx->saved_data["edge_bias"] = bias.has_value() && bias->defined() ? edge + 2 : int64_t(-1);
    const int64_t n = B.size(0);
    if (x.dim() == 2) return o.y;
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = n;
    return o.y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t edge_A = ctx->saved_data["edge_A"].toInt();
    const int64_t edge_bias = ctx->saved_data["edge_bias"].toInt();
    Call c = saved_call(ctx);
    c.need_dx = ctx->needs_input_grad(0);
    c.need_dA = ctx->needs_input_grad(edge_A);
    c.need_dB = ctx->needs_input_grad(edge_A + 1);
    c.need_dbias = edge_bias >= 0 && ctx->needs_input_grad(edge_bias);
    variable_list out(13);
    if (!(c.need_dx || c.need_dA || c.need_dB || c.need_dbias)) return out;
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    at::Tensor dy = grads[0];
    if (dy.dim() != 2) dy = dy.reshape({-1, dy.size(-1)});
    c.dy = dy.contiguous();
    check_call(c, true);
    BwdOut o = backward_or_fallback(c);
    if (c.need_dx) out[0] = x_sizes.size() == 2 ? o.dx : o.dx.view(x_sizes);
    if (c.need_dA) out[7] = o.dA;
    if (c.need_dB) out[8] = o.dB;
    if (c.need_dbias) out[10] = o.dbias;
    return out;
  }
};

// lora_linear's eager entry: y (..., N) with autograd, or None when the general path must take the call (bad
// input, for its error message; the decode path; a layout this file does not cover). The dropout seed is drawn
// here, after the checks, from the default generator of x's device, exactly as lora_linear draws it.
py::object linear_call(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                       const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                       const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t w_rows, int64_t w_cols,
                       const at::Tensor& A, const at::Tensor& B, double scaling, const std::optional<at::Tensor>& bias,
                       double p, int64_t decode_max_m, bool any_device) {
  if (!launch_path_enabled() || !(x.is_cuda() || any_device) || x.dim() < 2 || x.layout() != at::kStrided)
    return py::none();
  if (x.dim() > 2 && !x.is_contiguous()) return py::none();
  const int64_t k = x.size(-1);
  if (k == 0) return py::none();
  const int64_t m = x.numel() / k;
  const bool grad = at::GradMode::is_enabled()
                    && (x.requires_grad() || A.requires_grad() || B.requires_grad()
                        || (bias.has_value() && bias->requires_grad()));
  if (!grad && p == 0.0 && m >= 1 && m <= decode_max_m && A.dim() == 2 && A.size(0) <= 128) return py::none();
  Call c = make_call(x.dim() == 2 ? x : x.view({-1, k}), w, absmax, nested_absmax, nested_code, offset, blocksize,
                     A, B, scaling, bias, p, std::nullopt);
  if (!check_call(c, false)) return py::none();
  if (c.nf4 && (w_rows != c.n || w_cols != c.k)) return py::none();
  if (!c.nf4 && w.requires_grad()) return py::none();  // a trainable base: the general path says why not
  std::optional<at::Tensor> seed;
  if (p > 0.0)
    seed = at::randint(0, int64_t(1) << 62, {}, at::TensorOptions().device(x.device()).dtype(at::kLong));
  return py::cast(LoRAFunction::apply(x, w, absmax, nested_absmax, nested_code, offset, blocksize, A, B, scaling, bias,
                                      p, seed));
}

py::object linear_entry(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t w_rows, int64_t w_cols,
                        const at::Tensor& A, const at::Tensor& B, double scaling,
                        const std::optional<at::Tensor>& bias, double p, int64_t decode_max_m) {
  return linear_call(x, w, absmax, nested_absmax, nested_code, offset, blocksize, w_rows, w_cols, A, B, scaling, bias,
                     p, decode_max_m, false);
}


// ------------------------------------------------------------------------------------------ grouped projections

// What a group call prepared before its autograd Function (no autograd). Passed to GroupFunction::apply as one
// non-tensor argument.
struct GroupArgs {
  // stacked: the single op's call on the stacked adapters, x 2-D, W_cat (sum N_i, K), A_cat (sum r_i, K),
  // B_bd (sum N_i, sum r_i); checked. Otherwise the members' shared fields only (x, W_cat, the NF4 state, bias
  // (sum N_i), p, seed), each member bringing its own A_i, B_i and s_i.
  Call c;
  std::vector<int64_t> n, r;     // the members' out_features and ranks
  std::vector<double> scalings;  // s_i
  bool one_scaling = true;       // every s_i equal: B_bd holds B_i and c.scaling = s; else s_i * B_i and 1
  bool fwd_members = false, bwd_members = false;  // members_way of each direction, decided once per call
  // Stacked with B as B_rows = cat(B_i) (sum N_i, r) that the kernels read as block_diag(B_i) (Call::groups): equal
  // ranks and scalings, at most kMaxGroup members. Otherwise B_bd is made.
  bool rows = false;
  bool stacked() const { return !(fwd_members && bwd_members); }
};

// Whether a B_rows group's stacked backward hands the kernels the members' dY_i instead of cat(dy_i)
// (Call::dys; LORA_OPS_GROUP_DY=cat for cat(dY_i)). docs/GROUPED.md has the H200 A/B.
bool segments_way() {
  const char* v = std::getenv("LORA_OPS_GROUP_DY");
  return v == nullptr || std::strcmp(v, "cat") != 0;
}

// Whether a stacked group takes B as B_rows (GroupArgs::rows) where the members allow it; LORA_OPS_GROUP_B=blockdiag
// for block_diag(B_i). docs/GROUPED.md has the H200 A/B.
bool rows_way(const std::vector<int64_t>& r, bool one_scaling) {
  const char* v = std::getenv("LORA_OPS_GROUP_B");
  if (v != nullptr && std::strcmp(v, "blockdiag") == 0) return false;
  return one_scaling && static_cast<int64_t>(r.size()) <= kMaxGroup
         && std::all_of(r.begin(), r.end(), [&](int64_t v) { return v == r[0]; });
}

// Per member, forward (env LORA_OPS_GROUP_FWD) or backward (LORA_OPS_GROUP_BWD), when summing the members' dX moves
// fewer elements than concatenating their dY would (3 (g - 1) M K against 2 M sum N_i): the MLP's gate/up, not
// q/k/v. Forward and backward follow one rule, so that the per-member outputs (contiguous) come back as the
// per-member dY the per-member backward reads. A double-quantized absmax cannot be cut per member (its nested
// blocks straddle them). The variable set to concat / members forces one way (for A/B measurements).
bool members_way(bool nested, int64_t g, int64_t k, int64_t sum_n, const char* env) {
  if (nested) return false;
  const char* v = std::getenv(env);
  if (v != nullptr && std::strcmp(v, "concat") == 0) return false;
  if (v != nullptr && std::strcmp(v, "members") == 0) return true;
  return 3 * (g - 1) * k < 2 * sum_n;
}

// Member i's call: its rows of W_cat (NF4: its byte and absmax ranges) and its part of the bias; as adapters either
// its slices of the stacked A_cat / B_bd (As null) or its own A_i, B_i and s_i; S: its columns of c.s (when set)
// or Ss[i]. x, seed, p, blocksize and the need_* flags are the group's.
std::vector<Call> member_calls(const Call& c, const std::vector<int64_t>& n, const std::vector<int64_t>& r,
                               const std::vector<at::Tensor>* As = nullptr, const std::vector<at::Tensor>* Bs = nullptr,
                               const std::vector<double>* scalings = nullptr,
                               const std::vector<at::Tensor>* Ss = nullptr) {
  std::vector<Call> calls;
  int64_t n0 = 0, r0 = 0, byte0 = 0, block0 = 0;
  for (size_t i = 0; i < n.size(); ++i) {
    Call ci = c;
    ci.groups.clear();
    ci.dys.clear();
    if (c.absmax.defined()) {
      // Every member but the last ends on a block boundary (grouped.py's eligibility), so its bytes and absmax
      // are contiguous ranges of the stacked ones.
      const int64_t nel = n[i] * c.x.size(1);
      const int64_t blocks = cdiv(nel, c.blocksize);
      ci.w = narrow_view(c.w, 0, byte0, (nel + 1) / 2);
      ci.absmax = narrow_view(c.absmax, 0, block0, blocks);
      byte0 += (nel + 1) / 2;
      block0 += blocks;
    } else {
      ci.w = narrow_view(c.w, 0, n0, n[i]);
    }
    if (As != nullptr) {
      ci.A = (*As)[i];
      ci.B = (*Bs)[i];
      ci.scaling = (*scalings)[i];
    } else {
      ci.A = narrow_view(c.A, 0, r0, r[i]);
      ci.B = narrow_view(c.B, 0, n0, n[i]);
      if (c.groups.empty()) ci.B = narrow_view(ci.B, 1, r0, r[i]);
    }
    if (c.bias.defined()) ci.bias = narrow_view(c.bias, 0, n0, n[i]);
    if (Ss != nullptr) ci.s = (*Ss)[i];
    else if (c.s.defined()) ci.s = narrow_view(c.s, 1, r0, r[i]);
    calls.push_back(ci);
    n0 += n[i];
    r0 += r[i];
  }
  return calls;
}

// lora_ops/grouped.py's group as one C++ autograd Function: members i = 1..g read one x and share one stacked base.
// Forward, one of two ways (members_way decides):
//   y_cat = lora_fwd(x, W_cat, A_cat, B_bd, scaling)   A_cat = cat(A_i)   B_bd = block_diag(c_i * B_i)
//   y_i = y_cat[..., N_i] (views)          c_i = 1 and scaling = s when all s_i are equal, else c_i = s_i, scaling 1
// or y_i = lora_fwd(x, W_i, ...) per member (member_calls), each output a contiguous tensor of its own.
// With equal ranks and scalings (GroupArgs::rows) B_bd is never made: the stacked calls take B_rows = cat(B_i)
// with the members' sizes (Call::groups), which the kernels read as B_bd, and dB_rows comes back as (sum N_i, r),
// dB_i its row ranges.
// Backward, one of two ways (members_way decides): on the concatenated dY = cat(dy_i) (zeros for an unused output),
// one lora_bwd, dA_i = rows r_i of dA_cat and dB_i = c_i * dB_bd[N_i, r_i], the values autograd gives through the
// Python group's cat / block_diag / split; or per member (backward_per_member), dX summed.
// When both run per member (args.stacked() false), nothing is stacked: each member's call takes its own A_i, B_i and
// s_i, the single layer's call on its rows of W_cat.
// Variable inputs (edges): x 0, A_i 1 + i, B_i 1 + g + i, bias 1 + 2g; backward slots: x 0, A_i 1 + i,
// B_i 1 + g + i, bias 1 + 2g, args 2 + 2g. Saved: save_call's tensors, then (unstacked) A_i, B_i, S_i.
struct GroupFunction : public torch::autograd::Function<GroupFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList As, at::TensorList Bs,
                               const std::optional<at::Tensor>& bias, const GroupArgs& args) {
    (void)bias;  // the prepared call holds the (concatenated) bias: the argument is here for its autograd edge
    const Call& c = args.c;
    std::vector<int64_t> sizes = x.sizes().vec();
    variable_list out;
    at::Tensor s;
    std::vector<at::Tensor> own_a, own_b, own_s;
    if (args.fwd_members) {
      // Each member's own forward: y_i comes out as a contiguous (M, N_i) tensor, which the elementwise ops that
      // read it (SiLU(gate) * up, RoPE) take on their vectorized kernels.
      std::vector<Call> calls;
      if (args.stacked()) {
        calls = member_calls(c, args.n, args.r);
      } else {
        own_a = As.vec();
        own_b = Bs.vec();
        calls = member_calls(c, args.n, args.r, &own_a, &own_b, &args.scalings);
      }
      for (Call& ci : calls) {
        check_call(ci, false);
        FwdOut o = forward_or_fallback(ci);
        sizes.back() = ci.B.size(0);
        out.push_back(x.dim() == 2 ? o.y : o.y.view(sizes));
        own_s.push_back(o.s);
      }
      if (args.stacked()) s = at::cat(own_s, 1);  // S for the stacked backward
    } else {
      FwdOut o = forward_or_fallback(c);
      s = o.s;
      sizes.back() = c.n;
      const at::Tensor y = x.dim() == 2 ? o.y : o.y.view(sizes);
      int64_t off = 0;
      for (int64_t ni : args.n) {
        out.push_back(narrow_view(y, -1, off, ni));
        off += ni;
      }
    }
    std::vector<at::Tensor> extra;  // unstacked: A_i, B_i, S_i
    for (const auto* list : {&own_a, &own_b, &own_s})
      if (!args.stacked()) extra.insert(extra.end(), list->begin(), list->end());
    // A_cat / B_rows as a view of packed adapters (stack_rows) shares only the first member's version counter:
    // saving the members too makes the backward's unpacking catch an in-place change of any of them, as the
    // single layer's does, where a copy would have kept the forward's values.
    if (args.stacked()) {
      if (c.A.is_alias_of(As[0])) extra.insert(extra.end(), As.begin(), As.end());
      if (args.rows && c.B.is_alias_of(Bs[0])) extra.insert(extra.end(), Bs.begin(), Bs.end());
    }
    save_call(ctx, c, s, x, extra);
    ctx->saved_data["n"] = args.n;
    ctx->saved_data["r"] = args.r;
    ctx->saved_data["scalings"] = args.scalings;
    ctx->saved_data["one_scaling"] = args.one_scaling;
    ctx->saved_data["stacked"] = args.stacked();
    ctx->saved_data["rows"] = args.rows;
    ctx->saved_data["bwd_members"] = args.bwd_members;
    ctx->saved_data["has_bias"] = c.bias.defined();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> n = ctx->saved_data["n"].toIntVector();
    const std::vector<int64_t> r = ctx->saved_data["r"].toIntVector();
    const std::vector<double> scalings = ctx->saved_data["scalings"].toDoubleVector();
    const bool one_scaling = ctx->saved_data["one_scaling"].toBool();
    const bool stacked = ctx->saved_data["stacked"].toBool();
    const bool bwd_members = ctx->saved_data["bwd_members"].toBool();
    const bool rows = ctx->saved_data["rows"].toBool();
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const int64_t g = static_cast<int64_t>(n.size());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::vector<at::Tensor> extra;
    Call c = saved_call(ctx, &extra);
    if (rows) c.groups = n;
    c.need_dx = ctx->needs_input_grad(0);
    for (int64_t i = 0; i < g; ++i) {
      c.need_dA = c.need_dA || ctx->needs_input_grad(1 + i);
      c.need_dB = c.need_dB || ctx->needs_input_grad(1 + g + i);
    }
    c.need_dbias = has_bias && ctx->needs_input_grad(1 + 2 * g);
    variable_list out(2 * g + 3);
    if (!(c.need_dx || c.need_dA || c.need_dB || c.need_dbias)) return out;
    const int64_t m = c.x.size(0);
    std::vector<at::Tensor> dys;
    for (int64_t i = 0; i < g; ++i) {
      const at::Tensor& d = grads[i];
      dys.push_back(d.defined() ? d.reshape({m, n[i]}) : at::zeros({m, n[i]}, c.x.options()));
    }
    if (!stacked) {
      // The members' own A_i, B_i, S_i (save_call's extra tensors); dB_i comes out scaled by s_i.
      const std::vector<at::Tensor> own_a(extra.begin(), extra.begin() + g);
      const std::vector<at::Tensor> own_b(extra.begin() + g, extra.begin() + 2 * g);
      const std::vector<at::Tensor> own_s(extra.begin() + 2 * g, extra.begin() + 3 * g);
      backward_per_member(ctx, member_calls(c, n, r, &own_a, &own_b, &scalings, &own_s), dys, {}, out);
    } else if (bwd_members) {
      backward_per_member(ctx, member_calls(c, n, r), dys, one_scaling ? std::vector<double>{} : scalings, out);
    } else {
      c.db_in_blocks = !rows;  // B_rows' gradient is one (sum N_i, r) tensor: one cast, dB_i its row ranges
      if (rows && segments_way()) c.dys = dys;  // the kernels read the members' dY_i where check_call allows it
      if (c.dys.empty() || !check_call(c, true)) {
        c.dys.clear();
        c.dy = at::cat(dys, 1);
        check_call(c, true);
      }
      BwdOut o = backward_or_fallback(c);
      if (c.need_dx) out[0] = o.dx;
      // dB_i straight from the fp32 atomic buffer when the launches left dB there (db_in_blocks; the Python
      // launchers hand back dB_bd cast): each diagonal block cast on its own is a contiguous (N_i, r_i) gradient
      // that AccumulateGrad keeps as it is, where a view of the cast dB_bd would be copied again (g strided
      // copies). The values are those of the whole cast.
      const bool blocks = !o.dB.defined() && o.db_acc.defined();
      const at::Tensor& db_all = blocks ? o.db_acc : o.dB;
      const at::ScalarType dt = c.x.scalar_type();
      int64_t n0 = 0, r0 = 0;
      for (int64_t i = 0; i < g; ++i) {
        if (ctx->needs_input_grad(1 + i)) out[1 + i] = narrow_view(o.dA, 0, r0, r[i]);
        if (ctx->needs_input_grad(1 + g + i)) {
          at::Tensor db = narrow_view(db_all, 0, n0, n[i]);
          if (!rows) db = narrow_view(db, 1, r0, r[i]);
          if (blocks) db = db.to(dt);
          // A block of the finished dB_bd is a strided view: AccumulateGrad would copy it anyway, and the
          // hooks on lora_B should see the (N_i, r_i) gradient the ungrouped layer hands over.
          else if (!rows && one_scaling) db = db.contiguous();
          out[1 + g + i] = one_scaling ? db : db * scalings[i];
        }
        n0 += n[i];
        r0 += r[i];
      }
      if (c.need_dbias) out[1 + 2 * g] = o.dbias;
    }
    if (c.need_dx && x_sizes.size() != 2) out[0] = out[0].view(x_sizes);
    return out;
  }

  // One backward per member on its own dY (no concatenated dY), each on its call (member_calls), with dX summed
  // over the members: the single layer's backward g times, minus the forward. scale: empty, or c_i to multiply
  // each dB_i by (B_bd holding c_i * B_i).
  static void backward_per_member(AutogradContext* ctx, std::vector<Call> calls, const std::vector<at::Tensor>& dys,
                                  const std::vector<double>& scale, variable_list& out) {
    const int64_t g = static_cast<int64_t>(calls.size());
    std::vector<at::Tensor> dbias;
    for (int64_t i = 0; i < g; ++i) {
      Call& ci = calls[i];
      ci.dy = dys[i].contiguous();
      ci.need_dA = ctx->needs_input_grad(1 + i);
      ci.need_dB = ctx->needs_input_grad(1 + g + i);
      if (ci.need_dx || ci.need_dA || ci.need_dB || ci.need_dbias) {
        check_call(ci, true);
        BwdOut o = backward_or_fallback(ci);
        if (ci.need_dx) out[0] = out[0].defined() ? out[0].add_(o.dx) : o.dx;
        if (ci.need_dA) out[1 + i] = o.dA;
        if (ci.need_dB) out[1 + g + i] = scale.empty() ? o.dB : o.dB * scale[i];
        if (ci.need_dbias) dbias.push_back(o.dbias);
      }
    }
    if (!dbias.empty()) out[1 + 2 * g] = at::cat(dbias, 0);
  }
};

// The group's eager entry (lora_ops/_launch.py group): the members' outputs (a tuple, with autograd), or None when
// the general path must take the call (the same cases as linear_call, and members this file cannot stack).
// bias: the members' biases already concatenated (sum N_i,), or None.
py::object group_call(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                      const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t w_rows, int64_t w_cols,
                      const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                      const std::vector<double>& scalings, const std::optional<at::Tensor>& bias, double p,
                      int64_t decode_max_m, bool any_device) {
  if (!launch_path_enabled() || !(x.is_cuda() || any_device) || x.dim() < 2 || x.layout() != at::kStrided)
    return py::none();
  if (x.dim() > 2 && !x.is_contiguous()) return py::none();
  const size_t g = As.size();
  if (g == 0 || Bs.size() != g || scalings.size() != g) return py::none();
  const int64_t k = x.size(-1);
  if (k == 0) return py::none();
  GroupArgs args;
  bool grad = at::GradMode::is_enabled() && (x.requires_grad() || (bias.has_value() && bias->requires_grad()));
  int64_t r_sum = 0;
  for (size_t i = 0; i < g; ++i) {
    const at::Tensor& a = As[i];
    const at::Tensor& b = Bs[i];
    if (!same(a, x) || !same(b, x) || a.dim() != 2 || b.dim() != 2 || a.size(1) != k || b.size(1) != a.size(0)
        || !std::isfinite(scalings[i]))
      return py::none();
    grad = grad || (at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad()));
    args.n.push_back(b.size(0));
    args.r.push_back(a.size(0));
    r_sum += a.size(0);
  }
  const int64_t m = x.numel() / k;
  if (!grad && p == 0.0 && m >= 1 && m <= decode_max_m && r_sum <= 128) return py::none();
  args.scalings = scalings;
  args.one_scaling = std::all_of(scalings.begin(), scalings.end(), [&](double v) { return v == scalings[0]; });
  const int64_t sum_n = std::accumulate(args.n.begin(), args.n.end(), int64_t{0});
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  args.fwd_members = members_way(nested, g, k, sum_n, "LORA_OPS_GROUP_FWD");
  args.bwd_members = members_way(nested, g, k, sum_n, "LORA_OPS_GROUP_BWD");
  at::Tensor a_cat, b_bd;
  args.rows = args.stacked() && rows_way(args.r, args.one_scaling);
  if (args.stacked()) {
    at::NoGradGuard no_grad;  // GroupFunction's backward gives each member's A_i and B_i its gradient
    a_cat = stack_rows(As);
    if (args.rows) {
      b_bd = stack_rows(Bs);  // B_rows: the kernels read it as block_diag(B_i)
    } else if (args.one_scaling) {
      b_bd = at::block_diag(Bs);
    } else {
      std::vector<at::Tensor> scaled;
      for (size_t i = 0; i < g; ++i) scaled.push_back(Bs[i] * scalings[i]);
      b_bd = at::block_diag(scaled);
    }
  } else {
    // Nothing stacked: the members bring their own adapters (member_calls). The group's call keeps A_1 and a
    // (sum N_i, r_1) stand-in for B that allocates nothing, so that check_call checks x, W_cat, the NF4 state and
    // the bias against sum N_i.
    a_cat = As[0];
    b_bd = at::empty({1, 1}, x.options()).expand({sum_n, As[0].size(0)});
  }
  args.c = make_call(x.dim() == 2 ? x : x.view({-1, k}), w, absmax, nested_absmax, nested_code, offset, blocksize,
                     a_cat, b_bd, args.one_scaling ? scalings[0] : 1.0, bias, p, std::nullopt);
  Call& c = args.c;
  if (args.rows) c.groups = args.n;
  if (!check_call(c, false)) return py::none();
  if (c.nf4 && (w_rows != c.n || w_cols != c.k)) return py::none();
  if (!c.nf4 && w.requires_grad()) return py::none();
  if (p > 0.0)  // drawn only once the call is taken: a refused call leaves the generator to the Python path
    c.seed = at::randint(0, int64_t(1) << 62, {}, at::TensorOptions().device(x.device()).dtype(at::kLong));
  const variable_list ys = GroupFunction::apply(x, at::TensorList(As), at::TensorList(Bs), bias, args);
  py::tuple out(g);
  for (size_t i = 0; i < g; ++i) out[i] = py::cast(ys[i]);
  return out;
}

py::object group_entry(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& absmax,
                       const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                       const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t w_rows, int64_t w_cols,
                       const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                       const std::vector<double>& scalings, const std::optional<at::Tensor>& bias, double p,
                       int64_t decode_max_m) {
  return group_call(x, w, absmax, nested_absmax, nested_code, offset, blocksize, w_rows, w_cols, As, Bs, scalings,
                    bias, p, decode_max_m, false);
}

}  // namespace lora_launch

// Called from bindings.cpp's module init (and from the CPU test module's).
void lora_ops_register_launch(py::module_& m) {
  using namespace lora_launch;
  m.def("launch_fwd", &fwd_entry, "forward launch (or plan id on a miss, -1 unsupported); dry: the launch list");
  m.def("launch_bwd", &bwd_entry, "backward launch (or plan id on a miss, -1 unsupported); dry: the launch list");
  m.def("launch_linear", &linear_entry, "lora_linear's eager entry: y with autograd, or None");
  m.def("launch_group", &group_entry, "a projection group's eager entry: the members' outputs, or None");
  m.def("launch_add_variants", &add_variants);
  m.def("launch_set_verified", &set_verified);
  m.def("launch_clear", &clear_plans);
  m.def("launch_stats", &stats);
  m.def("launch_timing", &set_timing, "zero the per-phase host timer and turn it on or off (launch_stats host_ns)");
  m.def("launch_configure", &configure);
  m.def("launch_set_device", &set_device);
  m.def("launch_set_fallback", &set_fallback);
  m.def("launch_persistent", &persistent);
#ifdef LORA_OPS_LAUNCH_CUDA
  m.attr("launch_has_cuda") = true;
#else
  m.attr("launch_has_cuda") = false;
  // The CPU test build's launch_linear, with any_device: the same autograd Function on CPU tensors, every call run
  // by the fallback (the Python launchers under Triton's interpreter), so the C++ autograd (saved tensors, edges,
  // needs_input_grad, reshapes) is tested without a GPU.
  m.def("launch_linear_call", &linear_call, "launch_linear, with decode_max_m and any_device (test build only)");
  m.def("launch_group_call", &group_call, "launch_group, with any_device (test build only)");
#endif
}
