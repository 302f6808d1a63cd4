// normlab's native CPU operators: schemas, the CPU implementations (checks, outputs, weights, threads),
// the autograd nodes and the choice of ISA build. The kernels themselves are in kernels.h.
//
// Layout as in torchvision's csrc/ops: forward and backward are both dispatcher ops; the Autograd kernel of a
// forward op records a node whose apply() calls the backward op, so an eager call never enters Python. Fake
// implementations for torch.compile are registered in Python (normlab/kernels/cpu/__init__.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <string>
#include <vector>

#include "ops.h"
#include "table.h"

namespace normlab::cpu {
namespace {

using torch::autograd::variable_list;

// ---- the ISA build in use -----------------------------------------------------------------------------
std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> out;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) out.push_back(&kernels_avx512bf16());
  if (avx512) out.push_back(&kernels_avx512());
  if (avx2) out.push_back(&kernels_avx2());
#endif
  return out;  // best first
}

const KernelTable* find_table(const std::string& isa) {
  for (const KernelTable* t : supported_tables())
    if (isa == t->isa) return t;
  return nullptr;
}

// The best build this CPU runs, unless NORMLAB_CPU_ISA names another one it runs.
const KernelTable* initial_table() {
  const char* env = std::getenv("NORMLAB_CPU_ISA");
  if (env && *env) {
    if (const KernelTable* t = find_table(env)) return t;
  }
  auto all = supported_tables();
  return all.empty() ? nullptr : all.front();
}

const KernelTable*& current_table() {
  static const KernelTable* table = initial_table();
  return table;
}

const KernelTable& kernels() {
  const KernelTable* t = current_table();
  TORCH_CHECK(t, "normlab's cpu kernels need a CPU with AVX2, FMA and F16C");
  return *t;
}

std::string cpu_isa() { return current_table() ? current_table()->isa : ""; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const KernelTable* t : supported_tables()) out.emplace_back(t->isa);
  return out;
}

std::string set_cpu_isa(c10::string_view isa) {
  const KernelTable* t = find_table(std::string(isa));
  TORCH_CHECK(t, "this CPU does not run the '", isa, "' build of normlab's kernels; it runs: ", c10::Join(", ", cpu_isas()));
  std::string before = cpu_isa();
  current_table() = t;
  return before;
}

// ---- shared helpers -------------------------------------------------------------------------------------
constexpr int64_t GRAIN = 32768;  // elements per task below which a call stays on the calling thread
constexpr int64_t CHUNK = 64;  // rows per weight-gradient partial: fixed, whatever the thread count

Dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: TORCH_CHECK(false, "normlab cpu kernels take float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_rows(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, " must have a non-empty last dimension, got shape ", x.sizes());
  dtype_of(x);
}

void check_param(const OptTensor& p, const char* name, int64_t n) {
  if (!p) return;
  TORCH_CHECK(p->device().is_cpu() && p->numel() == n, name, " must be a CPU tensor of ", n, " elements, got ",
              p->numel(), " on ", p->device());
  dtype_of(*p);
}

// Statistics are per row: the input's shape without its last dimension.
Tensor stats_like(const Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
}

// The last-level cache of CPU 0, from sysfs (cpuid, behind sysconf, overstates it on some VMs); 32 MB
// where it does not say.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
      int64_t size = 0;
      char unit = 0;
      if (!(file >> size)) continue;
      file >> unit;
      largest = std::max(largest, size << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0));
    }
    return largest > 0 ? largest : int64_t{32} << 20;
  }();
  return bytes;
}

// Outputs go out with non-temporal stores when the call's input and output together exceed the last-level cache:
// the call itself would evict the output before anything read it, and ordinary stores read every line first.
bool stream_outputs(size_t out_bytes, size_t in_bytes) {
  return static_cast<int64_t>(out_bytes + in_bytes) > last_level_cache_bytes();
}

// n ones, kept per thread (the weight of a norm without one).
const float* ones(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.assign(n, 1.f);
  return buffer.data();
}

// p (a contiguous vector) widened to fp32 after rounding to `via` (bf16 or fp16; Undefined: no rounding), element by
// element with c10's round to nearest even: no dispatcher call, which costs a tiny call as much as its rows.
template <typename Src>
Tensor widen(const Tensor& p, at::ScalarType via) {
  Tensor out = at::detail::empty_cpu({p.numel()}, at::kFloat, false, at::MemoryFormat::Contiguous);
  const Src* src = p.const_data_ptr<Src>();
  float* dst = out.data_ptr<float>();
  const int64_t n = p.numel();
  if (via == at::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(c10::BFloat16(static_cast<float>(src[j])));
  } else if (via == at::kHalf) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(c10::Half(static_cast<float>(src[j])));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
  return out;
}

// g in `dtype`: g itself when it has it; an fp32 vector narrowed to bf16/fp16 element by element with c10's round to
// nearest even (the bits of a cast, without its dispatcher call); anything else, or a gradient that is itself
// differentiated (double backward), cast.
Tensor cast(const Tensor& g, at::ScalarType dtype) {
  if (!g.defined() || g.scalar_type() == dtype) return g;
  if (g.scalar_type() != at::kFloat || g.dim() != 1 || !g.is_contiguous() || g.requires_grad() ||
      (dtype != at::kBFloat16 && dtype != at::kHalf))
    return g.to(dtype);
  Tensor out = at::detail::empty_cpu({g.numel()}, dtype, false, at::MemoryFormat::Contiguous);
  const float* src = g.const_data_ptr<float>();
  const int64_t n = g.numel();
  if (dtype == at::kBFloat16) {
    auto* dst = out.data_ptr<c10::BFloat16>();
    for (int64_t j = 0; j < n; ++j) dst[j] = c10::BFloat16(src[j]);
  } else {
    auto* dst = out.data_ptr<c10::Half>();
    for (int64_t j = 0; j < n; ++j) dst[j] = c10::Half(src[j]);
  }
  return out;
}

// A parameter as n contiguous fp32 values, rounded first to `via` where given (no copy, and no op, for a contiguous
// fp32 vector that needs no rounding).
Tensor as_fp32(const Tensor& p, at::ScalarType via = at::ScalarType::Undefined) {
  if (via == p.scalar_type()) via = at::ScalarType::Undefined;  // already in that precision
  const bool vector = p.dim() == 1 && p.is_contiguous();
  if (vector && p.scalar_type() == at::kFloat && via == at::ScalarType::Undefined) return p;
  if (vector) {
    switch (p.scalar_type()) {
      case at::kFloat: return widen<float>(p, via);
      case at::kBFloat16: return widen<c10::BFloat16>(p, via);
      case at::kHalf: return widen<c10::Half>(p, via);
      default: break;
    }
  }
  const Tensor rounded = via == at::ScalarType::Undefined ? p : p.to(via);
  return rounded.to(at::kFloat).contiguous().view(-1);
}

template <typename F>
void for_rows(int64_t rows, int64_t n, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, GRAIN / n), f);
}

// Runs `partial(begin, end, slot)` for every chunk of CHUNK rows, then `fold(slot)` for the chunks one after another
// in chunk order, whichever thread computed them: results folded this way are the same bits for any thread count.
// Workers take chunks in increasing order, one at a time, one slot each (as torch's per-thread buffers): chunk c
// reuses the slot of chunk c − slots, folded by then, since a worker takes a chunk only after folding its last.
template <typename Partial, typename Fold>
void run_chunks_in_order(int64_t rows, int64_t slots, const Partial& partial, const Fold& fold) {
  const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
  std::atomic<int64_t> next{0}, folded{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t slot = c % slots;
      partial(c * CHUNK, std::min(rows, (c + 1) * CHUNK), slot);
      while (folded.load(std::memory_order_acquire) != c) std::this_thread::yield();
      fold(slot);
      folded.store(c + 1, std::memory_order_release);
    }
  };
  if (slots == 1) worker(0, 1);
  else at::parallel_for(0, slots, 1, worker);
}

// Worker slots for a call: one when it stays on the calling thread, else one per thread (at most one per chunk).
int64_t worker_slots(int64_t rows, int64_t n) {
  const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
  if (rows * n < GRAIN || at::get_num_threads() == 1 || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
}

// dst[j] += src[j]
void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] + src[j];
}

// ---- RMSNorm / LayerNorm forward --------------------------------------------------------------------------
Mode rms_mode(c10::string_view casting, at::ScalarType norm_dtype) {
  if (norm_dtype == at::kFloat || casting == "gemma") return Mode::rms_fp32;
  if (casting == "llama") return Mode::rms_llama;
  TORCH_CHECK(casting == "none", "unknown casting mode '", casting, "'; expected llama, gemma or none");
  return Mode::rms_none;
}

// `offset + w` exactly as the reference forms it, as fp32 values: gemma (and fp32 sums) `w.float() + offset`,
// llama `w.to(dtype) + offset`, none `(w + offset).to(dtype)`.
Tensor rms_weight(const OptTensor& weight, double offset, Mode mode, at::ScalarType norm_dtype) {
  if (!weight) return Tensor();
  const Tensor& w = *weight;
  switch (mode) {
    case Mode::rms_llama: return offset != 0 ? as_fp32(w.to(norm_dtype) + offset) : as_fp32(w, norm_dtype);
    case Mode::rms_none: return offset != 0 ? as_fp32((w + offset).to(norm_dtype)) : as_fp32(w, norm_dtype);
    default: return offset != 0 ? as_fp32(w.to(at::kFloat) + offset) : as_fp32(w);
  }
}

struct FwdOut {
  Tensor y, s, mean, rstd;
};

// y (and s) into `y_out` / `s_out` when given, else new tensors.
FwdOut norm_forward(const Tensor& input, const OptTensor& residual, const Tensor& w32, const Tensor& b32,
                    double eps, int64_t k, Mode mode, at::ScalarType sum_dtype, const OptTensor& y_out) {
  const Tensor x = input.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  FwdOut out;
  out.y = y_out ? *y_out : at::empty_like(x, at::MemoryFormat::Contiguous);
  out.rstd = stats_like(x);
  if (mode == Mode::layer) out.mean = stats_like(x);
  Tensor r;
  NormFwdArgs a{};
  if (residual) {
    r = residual->contiguous();
    out.s = at::empty_like(x, x.options().dtype(sum_dtype), at::MemoryFormat::Contiguous);
    a.r = r.const_data_ptr();
    a.s = out.s.data_ptr();
    a.r_t = dtype_of(r);
    a.s_t = dtype_of(out.s);
  } else {
    a.r_t = a.s_t = dtype_of(x);
  }
  a.x = x.const_data_ptr();
  a.y = out.y.data_ptr();
  a.w = w32.defined() ? w32.const_data_ptr<float>() : ones(n);
  a.b = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  a.mean = out.mean.defined() ? out.mean.data_ptr<float>() : nullptr;
  a.rstd = out.rstd.data_ptr<float>();
  a.n = n;
  a.k = k;
  a.eps = static_cast<float>(eps);
  a.x_t = dtype_of(x);
  a.mode = mode;
  a.stream = stream_outputs(out.y.nbytes(), x.nbytes());
  const KernelTable& table = kernels();
  for_rows(rows, n, [&](int64_t begin, int64_t end) { table.norm_fwd(a, begin, end); });
  return out;
}

void check_k(int64_t k, int64_t n) { TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "], got ", k); }

void check_residual(const Tensor& x, const Tensor& r, at::ScalarType sum_dtype) {
  check_rows(r, "residual");
  TORCH_CHECK(r.sizes() == x.sizes(), "residual must have the input's shape ", x.sizes(), ", got ", r.sizes());
  TORCH_CHECK(r.scalar_type() == x.scalar_type() || r.scalar_type() == sum_dtype,
              "the residual's dtype must be the input's or residual_dtype, got ", r.scalar_type());
  TORCH_CHECK(sum_dtype == at::kFloat || sum_dtype == at::kBFloat16 || sum_dtype == at::kHalf,
              "residual_dtype must be float32, bfloat16 or float16, got ", sum_dtype);
}

std::tuple<Tensor, Tensor> rms_norm_cpu(const Tensor& input, const OptTensor& weight, double eps,
                                        c10::string_view casting, double offset, int64_t k, const OptTensor& bias) {
  check_rows(input, "input");
  check_param(weight, "weight", input.size(-1));
  check_param(bias, "bias", input.size(-1));
  check_k(k, input.size(-1));
  const Mode mode = rms_mode(casting, input.scalar_type());
  auto out = norm_forward(input, std::nullopt, rms_weight(weight, offset, mode, input.scalar_type()),
                          bias ? as_fp32(*bias) : Tensor(), eps, k, mode, input.scalar_type(), std::nullopt);
  return {out.y, out.rstd};
}

Tensor rms_norm_into_cpu(const Tensor& input, const OptTensor& weight, double eps, c10::string_view casting,
                         double offset, int64_t k, Tensor& out) {
  check_rows(input, "input");
  check_param(weight, "weight", input.size(-1));
  check_k(k, input.size(-1));
  TORCH_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor of the input's shape and dtype");
  const Mode mode = rms_mode(casting, input.scalar_type());
  return norm_forward(input, std::nullopt, rms_weight(weight, offset, mode, input.scalar_type()), Tensor(), eps, k,
                      mode, input.scalar_type(), out).rstd;
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_cpu(const Tensor& input, const Tensor& residual,
                                                    const OptTensor& weight, double eps, c10::string_view casting,
                                                    double offset, int64_t k, at::ScalarType residual_dtype) {
  check_rows(input, "input");
  check_residual(input, residual, residual_dtype);
  check_param(weight, "weight", input.size(-1));
  check_k(k, input.size(-1));
  const Mode mode = rms_mode(casting, residual_dtype);
  auto out = norm_forward(input, residual, rms_weight(weight, offset, mode, residual_dtype), Tensor(), eps, k, mode,
                          residual_dtype, std::nullopt);
  return {out.y, out.s, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                  double eps) {
  check_rows(input, "input");
  check_param(weight, "weight", input.size(-1));
  check_param(bias, "bias", input.size(-1));
  const int64_t n = input.size(-1);
  auto out = norm_forward(input, std::nullopt, weight ? as_fp32(*weight) : Tensor(), bias ? as_fp32(*bias) : Tensor(),
                          eps, n, Mode::layer, input.scalar_type(), std::nullopt);
  return {out.y, out.mean, out.rstd};
}

std::tuple<Tensor, Tensor> layer_norm_into_cpu(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                               double eps, Tensor& out) {
  check_rows(input, "input");
  check_param(weight, "weight", input.size(-1));
  check_param(bias, "bias", input.size(-1));
  TORCH_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor of the input's shape and dtype");
  auto res = norm_forward(input, std::nullopt, weight ? as_fp32(*weight) : Tensor(), bias ? as_fp32(*bias) : Tensor(),
                          eps, input.size(-1), Mode::layer, input.scalar_type(), out);
  return {res.mean, res.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_cpu(const Tensor& input, const Tensor& residual,
                                                              const OptTensor& weight, const OptTensor& bias,
                                                              double eps, at::ScalarType residual_dtype) {
  check_rows(input, "input");
  check_residual(input, residual, residual_dtype);
  check_param(weight, "weight", input.size(-1));
  check_param(bias, "bias", input.size(-1));
  auto out = norm_forward(input, residual, weight ? as_fp32(*weight) : Tensor(), bias ? as_fp32(*bias) : Tensor(), eps,
                          input.size(-1), Mode::layer, residual_dtype, std::nullopt);
  return {out.y, out.s, out.mean, out.rstd};
}

// ---- RMSNorm / LayerNorm backward -------------------------------------------------------------------------
// (dx, dw_fp32, db_fp32); dw/db are empty when not wanted.
std::tuple<Tensor, Tensor, Tensor> norm_backward(const Tensor& grad, const Tensor& input, const Tensor& w32,
                                                 const Tensor& mean, const Tensor& rstd, int64_t k,
                                                 const OptTensor& grad_sum, bool layer, bool want_dw, bool want_db) {
  check_rows(input, "input");
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(),
              "grad must have the input's shape and dtype");
  const Tensor x = input.contiguous(), dy = grad.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat, "rstd must hold one fp32 value per row");
  const Tensor rs = rstd.contiguous(), mu = layer ? mean.contiguous() : Tensor();
  Tensor ds;
  if (grad_sum) {
    TORCH_CHECK(grad_sum->sizes() == x.sizes(), "grad_sum must have the input's shape");
    ds = grad_sum->to(x.scalar_type()).contiguous();
  }
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t slots = worker_slots(rows, n);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor pw = want_dw ? at::empty({slots, n}, f32) : Tensor(), pb = want_db ? at::empty({slots, n}, f32) : Tensor();
  Tensor dw = pw.defined() ? at::zeros({n}, f32) : Tensor(), db = pb.defined() ? at::zeros({n}, f32) : Tensor();
  NormBwdArgs a{};
  a.dy = dy.const_data_ptr();
  a.x = x.const_data_ptr();
  a.dsum = ds.defined() ? ds.const_data_ptr() : nullptr;
  a.dx = dx.data_ptr();
  a.w = w32.defined() ? w32.const_data_ptr<float>() : ones(n);
  a.mean = layer ? mu.const_data_ptr<float>() : nullptr;
  a.rstd = rs.const_data_ptr<float>();
  a.n = n;
  a.k = k;
  a.t = dtype_of(x);
  a.layer = layer;
  a.stream = !ds.defined() && stream_outputs(dx.nbytes(), x.nbytes() + dy.nbytes());
  const KernelTable& table = kernels();
  float *pw0 = pw.defined() ? pw.data_ptr<float>() : nullptr, *pb0 = pb.defined() ? pb.data_ptr<float>() : nullptr;
  run_chunks_in_order(rows, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    NormBwdArgs part = a;
    part.pw = pw0 ? pw0 + slot * n : nullptr;
    part.pb = pb0 ? pb0 + slot * n : nullptr;
    if (part.pw) std::fill(part.pw, part.pw + n, 0.f);
    if (part.pb) std::fill(part.pb, part.pb + n, 0.f);
    table.norm_bwd(part, begin, end);
  }, [&](int64_t slot) {
    if (pw0) add_into(dw.data_ptr<float>(), pw0 + slot * n, n);
    if (pb0) add_into(db.data_ptr<float>(), pb0 + slot * n, n);
  });
  return {dx, dw, db};
}

// The backward's fp32 `offset + w` is the one-rounding forward's.
Tensor bwd_weight(const OptTensor& weight, double offset) { return rms_weight(weight, offset, Mode::rms_fp32, at::kFloat); }

// A wanted gradient in the parameter's dtype; an empty tensor when not wanted (the schemas return tensors).
Tensor in_dtype(const Tensor& g, const OptTensor& like) {
  return g.defined() && like ? cast(g, like->scalar_type()) : at::empty({0}, at::kFloat);
}

// The autograd side: an empty gradient is no gradient.
Tensor grad_or_none(const Tensor& g) { return g.defined() && g.numel() ? g : Tensor(); }

std::tuple<Tensor, Tensor, Tensor> rms_norm_backward_cpu(const Tensor& grad, const Tensor& input,
                                                         const OptTensor& weight, const Tensor& rstd, double offset,
                                                         int64_t k, const OptTensor& grad_sum, bool weight_grad,
                                                         bool bias_grad) {
  check_param(weight, "weight", input.size(-1));
  check_k(k, input.size(-1));
  auto [dx, dw, db] = norm_backward(grad, input, bwd_weight(weight, offset), Tensor(), rstd, k, grad_sum, false,
                                    weight_grad && weight.has_value(), bias_grad);
  return {dx, in_dtype(dw, weight), db.defined() ? db : at::empty({0}, at::kFloat)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(const Tensor& grad, const Tensor& input,
                                                           const OptTensor& weight, const Tensor& mean,
                                                           const Tensor& rstd, const OptTensor& grad_sum,
                                                           bool weight_grad, bool bias_grad) {
  check_param(weight, "weight", input.size(-1));
  TORCH_CHECK(mean.numel() == rstd.numel() && mean.scalar_type() == at::kFloat, "mean must hold one fp32 value per row");
  auto [dx, dw, db] = norm_backward(grad, input, bwd_weight(weight, 0.0), mean, rstd, input.size(-1), grad_sum, true,
                                    weight_grad && weight.has_value(), bias_grad);
  return {dx, in_dtype(dw, weight), db.defined() ? db : at::empty({0}, at::kFloat)};
}

// ---- DyT ---------------------------------------------------------------------------------------------------
float alpha_value(const Tensor& alpha) {
  TORCH_CHECK(alpha.numel() == 1 && alpha.device().is_cpu(), "alpha must be a one-element CPU tensor");
  return alpha.to(at::kFloat).item<float>();
}

// y, and with `keep_tanh` tanh(αx) in fp32 for the backward (else an undefined tensor).
std::tuple<Tensor, Tensor> dyt_impl(const Tensor& input, const Tensor& alpha, const OptTensor& weight,
                                    const OptTensor& bias, bool keep_tanh) {
  check_rows(input, "input");
  const int64_t n = input.size(-1);
  check_param(weight, "weight", n);
  check_param(bias, "bias", n);
  const Tensor x = input.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor t = keep_tanh ? at::empty_like(x, x.options().dtype(at::kFloat), at::MemoryFormat::Contiguous) : Tensor();
  const Tensor w = weight ? as_fp32(*weight) : Tensor(), b = bias ? as_fp32(*bias) : Tensor();
  DytFwdArgs a{x.const_data_ptr(), y.data_ptr(), keep_tanh ? t.data_ptr<float>() : nullptr,
               w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
               alpha_value(alpha), n, dtype_of(x)};
  const KernelTable& table = kernels();
  for_rows(x.numel() / n, n, [&](int64_t begin, int64_t end) { table.dyt_fwd(a, begin, end); });
  return {y, t};
}

Tensor dyt_cpu(const Tensor& input, const Tensor& alpha, const OptTensor& weight, const OptTensor& bias) {
  return std::get<0>(dyt_impl(input, alpha, weight, bias, false));
}

std::tuple<Tensor, Tensor> dyt_forward_cpu(const Tensor& input, const Tensor& alpha, const OptTensor& weight,
                                           const OptTensor& bias) {
  return dyt_impl(input, alpha, weight, bias, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dyt_backward_cpu(const Tensor& grad, const Tensor& input,
                                                            const Tensor& alpha, const OptTensor& weight,
                                                            bool weight_grad, bool bias_grad, const OptTensor& tanh) {
  check_rows(input, "input");
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(),
              "grad must have the input's shape and dtype");
  TORCH_CHECK(!tanh || (tanh->sizes() == input.sizes() && tanh->scalar_type() == at::kFloat && tanh->is_cpu()),
              "tanh must be the forward's fp32 tanh(alpha * input), of the input's shape");
  const Tensor t = tanh ? tanh->contiguous() : Tensor();
  const int64_t n = input.size(-1), rows = input.numel() / n;
  check_param(weight, "weight", n);
  const Tensor x = input.contiguous(), dy = grad.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const Tensor w = weight ? as_fp32(*weight) : Tensor();
  const int64_t slots = worker_slots(rows, n);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor pw = weight_grad ? at::empty({slots, n}, f32) : Tensor(), pb = bias_grad ? at::empty({slots, n}, f32) : Tensor();
  std::vector<float> pa(slots);
  Tensor dw = weight_grad ? at::zeros({n}, f32) : at::empty({0}, f32), db = bias_grad ? at::zeros({n}, f32) : at::empty({0}, f32);
  float dalpha_sum = 0.f;
  DytBwdArgs a{dy.const_data_ptr(), x.const_data_ptr(), t.defined() ? t.const_data_ptr<float>() : nullptr,
               dx.data_ptr(), w.defined() ? w.const_data_ptr<float>() : nullptr,
               alpha_value(alpha), nullptr, nullptr, nullptr, n, dtype_of(x)};
  const KernelTable& table = kernels();
  float *pw0 = pw.defined() ? pw.data_ptr<float>() : nullptr, *pb0 = pb.defined() ? pb.data_ptr<float>() : nullptr;
  run_chunks_in_order(rows, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    DytBwdArgs part = a;
    part.pw = pw0 ? pw0 + slot * n : nullptr;
    part.pb = pb0 ? pb0 + slot * n : nullptr;
    part.palpha = &pa[slot];
    if (part.pw) std::fill(part.pw, part.pw + n, 0.f);
    if (part.pb) std::fill(part.pb, part.pb + n, 0.f);
    pa[slot] = 0.f;
    table.dyt_bwd(part, begin, end);
  }, [&](int64_t slot) {
    if (pw0) add_into(dw.data_ptr<float>(), pw0 + slot * n, n);
    if (pb0) add_into(db.data_ptr<float>(), pb0 + slot * n, n);
    dalpha_sum = dalpha_sum + pa[slot];
  });
  const Tensor dalpha = at::full(alpha.sizes(), dalpha_sum, f32).to(alpha.scalar_type());
  if (weight_grad && weight) dw = dw.to(weight->scalar_type());
  return {dx, dalpha, dw, db};
}

// ---- double backward: the differentiable formulas, recomputing the statistics from x ------------------------
Tensor row_mean(const Tensor& t) { return t.mean(-1, true); }

std::tuple<Tensor, Tensor> rms_norm_backward_composite(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                       double offset, int64_t k, double eps) {
  const Tensor xf = x.to(at::kFloat), dyf = dy.to(at::kFloat);
  const int64_t n = x.size(-1);
  const Tensor r = at::rsqrt(row_mean(xf.narrow(-1, 0, k).square()) + eps);
  const Tensor xhat = xf * r;
  const Tensor g = weight ? dyf * (weight->to(at::kFloat) + offset) : dyf;
  const Tensor proj = (g * xhat).sum(-1, true) / static_cast<double>(k);
  Tensor dx = r * g;
  if (k == n) dx = dx - r * xhat * proj;
  else dx = at::cat({dx.narrow(-1, 0, k) - r * xhat.narrow(-1, 0, k) * proj, dx.narrow(-1, k, n - k)}, -1);
  Tensor dw;
  if (weight) dw = at::where(dyf == 0, at::zeros({}, dyf.options()), dyf * xhat).reshape({-1, n}).sum(0).to(weight->scalar_type());
  return {dx.to(x.scalar_type()), dw};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_composite(const Tensor& dy, const Tensor& x,
                                                                 const OptTensor& weight, bool bias, double eps) {
  const Tensor xf = x.to(at::kFloat), dyf = dy.to(at::kFloat);
  const int64_t n = x.size(-1);
  Tensor d = xf - row_mean(xf);
  d = d - row_mean(d);
  const Tensor r = at::rsqrt(row_mean(d.square()) + eps);
  const Tensor xhat = d * r;
  const Tensor g = weight ? dyf * weight->to(at::kFloat) : dyf;
  const Tensor dx = r * (g - row_mean(g) - xhat * row_mean(g * xhat));
  Tensor dw, db;
  if (weight) dw = at::where(dyf == 0, at::zeros({}, dyf.options()), dyf * xhat).reshape({-1, n}).sum(0).to(weight->scalar_type());
  if (bias) db = dyf.reshape({-1, n}).sum(0);
  return {dx.to(x.scalar_type()), dw, db};
}

// ---- autograd -------------------------------------------------------------------------------------------------
// One autograd node per differentiable call, recorded as torch's own ops record theirs: the saved tensors and
// options as typed fields (no context map), the next edges collected once, the backward op called from apply().
// A call that needs no gradient records nothing.
template <class Saved>
class OpNode final : public torch::autograd::Node {
 public:
  using Node::Node;
  Saved saved;
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return saved.backward(*this, grads);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved.release();
  }
  std::string name() const override { return Saved::name; }
};

template <class Saved>
using NodePtr = c10::intrusive_ptr<OpNode<Saved>>;

// The node of a call whose inputs are `inputs` (its next edges, in the order of its gradients), or none when grad
// mode is off or no input requires grad. Forward-mode AD has no formula here: a dual input is refused.
template <class Saved, class... Inputs>
NodePtr<Saved> node_for(const char* op, const Inputs&... inputs) {
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(inputs) || ...), "normlab::", op,
              " has no forward-mode AD formula; use the reference backend for torch.func.jvp or forward_ad");
  if (!torch::autograd::compute_requires_grad(inputs...)) return {};
  return c10::make_intrusive<OpNode<Saved>>(torch::autograd::collect_next_edges(inputs...));
}

// The forward op itself, below the Autograd kernel.
template <typename F>
auto below_autograd(F&& forward) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return forward();
}

using torch::autograd::SavedVariable;
OptTensor saved_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
SavedVariable save(const OptTensor& t) { return t ? SavedVariable(*t, false) : SavedVariable(); }

struct RmsNormSaved {
  static constexpr const char* name = "normlab::RmsNormBackward";
  SavedVariable input, weight, rstd;
  double eps = 0, offset = 0;
  int64_t k = 0;
  bool has_bias = false;
  at::ScalarType bias_dtype = at::kFloat;
  void release() {
    input.reset_data();
    weight.reset_data();
    rstd.reset_data();
  }
  variable_list backward(const torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(has_bias ? 3 : 2);
    const Tensor x = input.unpack();
    const OptTensor w = saved_opt(weight.unpack());
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // double backward: the differentiable formula
      std::tie(dx, dw) = rms_norm_backward_composite(dy, x, w, offset, k, eps);
      if (has_bias) db = dy.to(at::kFloat).reshape({-1, x.size(-1)}).sum(0);
    } else {
      std::tie(dx, dw, db) =
          NORMLAB_OP("rms_norm_backward", RmsBwdSig)
              .call(dy, x, w, rstd.unpack(), offset, k, std::nullopt, node.task_should_compute_output(1),
                    has_bias && node.task_should_compute_output(2));
    }
    if (!has_bias) return {dx, grad_or_none(dw)};  // a node without a bias has no edge for one
    return {dx, grad_or_none(dw), cast(grad_or_none(db), bias_dtype)};
  }
};

struct AddRmsNormSaved {
  static constexpr const char* name = "normlab::AddRmsNormBackward";
  SavedVariable sum, weight, rstd;  // sum: an output of the node
  double eps = 0, offset = 0;
  int64_t k = 0;
  at::ScalarType x_dtype = at::kFloat, r_dtype = at::kFloat;
  void release() {
    sum.reset_data();
    weight.reset_data();
    rstd.reset_data();
  }
  variable_list backward(torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor &dy = grads[0], &dsum = grads[1];
    if (!dy.defined()) {  // only s was used: its gradient passes through the add
      if (!dsum.defined()) return {Tensor(), Tensor(), Tensor()};
      return {cast(dsum, x_dtype), cast(dsum, r_dtype), Tensor()};
    }
    const Tensor s = sum.unpack(node.getptr());
    const OptTensor w = saved_opt(weight.unpack());
    Tensor ds, dw;
    if (at::GradMode::is_enabled()) {
      std::tie(ds, dw) = rms_norm_backward_composite(cast(dy, s.scalar_type()), s, w, offset, k, eps);
      if (dsum.defined()) ds = ds + cast(dsum, s.scalar_type());
    } else {
      std::tie(ds, dw, std::ignore) = NORMLAB_OP("rms_norm_backward", RmsBwdSig)
                                          .call(cast(dy, s.scalar_type()), s, w, rstd.unpack(), offset, k,
                                                saved_opt(dsum), node.task_should_compute_output(2), false);
    }
    return {cast(ds, x_dtype), cast(ds, r_dtype), grad_or_none(dw)};
  }
};

struct LayerNormSaved {
  static constexpr const char* name = "normlab::LayerNormBackward";
  SavedVariable input, weight, mean, rstd;
  double eps = 0;
  bool has_bias = false;
  at::ScalarType bias_dtype = at::kFloat;
  void release() {
    input.reset_data();
    weight.reset_data();
    mean.reset_data();
    rstd.reset_data();
  }
  variable_list backward(const torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(has_bias ? 3 : 2);
    const Tensor x = input.unpack();
    const OptTensor w = saved_opt(weight.unpack());
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = layer_norm_backward_composite(dy, x, w, has_bias, eps);
    } else {
      std::tie(dx, dw, db) = NORMLAB_OP("layer_norm_backward", LnBwdSig)
                                 .call(dy, x, w, mean.unpack(), rstd.unpack(), std::nullopt,
                                       node.task_should_compute_output(1), node.task_should_compute_output(2));
    }
    return {dx, grad_or_none(dw), cast(grad_or_none(db), bias_dtype)};
  }
};

struct AddLayerNormSaved {
  static constexpr const char* name = "normlab::AddLayerNormBackward";
  SavedVariable sum, weight, mean, rstd;  // sum: an output of the node
  double eps = 0;
  bool has_bias = false;
  at::ScalarType bias_dtype = at::kFloat, x_dtype = at::kFloat, r_dtype = at::kFloat;
  void release() {
    sum.reset_data();
    weight.reset_data();
    mean.reset_data();
    rstd.reset_data();
  }
  variable_list backward(torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor &dy = grads[0], &dsum = grads[1];
    if (!dy.defined()) {
      if (!dsum.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
      return {cast(dsum, x_dtype), cast(dsum, r_dtype), Tensor(), Tensor()};
    }
    const Tensor s = sum.unpack(node.getptr());
    const OptTensor w = saved_opt(weight.unpack());
    Tensor ds, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(ds, dw, db) = layer_norm_backward_composite(cast(dy, s.scalar_type()), s, w, has_bias, eps);
      if (dsum.defined()) ds = ds + cast(dsum, s.scalar_type());
    } else {
      std::tie(ds, dw, db) = NORMLAB_OP("layer_norm_backward", LnBwdSig)
                                 .call(cast(dy, s.scalar_type()), s, w, mean.unpack(), rstd.unpack(), saved_opt(dsum),
                                       node.task_should_compute_output(2), node.task_should_compute_output(3));
    }
    return {cast(ds, x_dtype), cast(ds, r_dtype), grad_or_none(dw), cast(grad_or_none(db), bias_dtype)};
  }
};

struct DytSaved {
  static constexpr const char* name = "normlab::DytBackward";
  SavedVariable input, alpha, weight, tanh;  // tanh: the forward's fp32 tanh(αx), so the backward has none to compute
  bool has_bias = false;
  at::ScalarType bias_dtype = at::kFloat;
  void release() {
    input.reset_data();
    alpha.reset_data();
    weight.reset_data();
    tanh.reset_data();
  }
  variable_list backward(const torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const Tensor x = input.unpack(), a = alpha.unpack();
    const OptTensor w = saved_opt(weight.unpack());
    if (at::GradMode::is_enabled()) {  // double backward: the differentiable formula
      const Tensor xf = x.to(at::kFloat), dyf = dy.to(at::kFloat), af = a.to(at::kFloat).reshape({});
      const Tensor t = at::tanh(af * xf);
      const Tensor g = w ? dyf * w->to(at::kFloat) : dyf;
      const Tensor dt = g * (1 - t * t);
      const Tensor zero = at::zeros({}, dyf.options());
      const int64_t n = x.size(-1);
      Tensor dw = w ? at::where(dyf == 0, zero, dyf * t).reshape({-1, n}).sum(0).to(w->scalar_type()) : Tensor();
      Tensor db = has_bias ? dyf.reshape({-1, n}).sum(0).to(bias_dtype) : Tensor();
      return {(dt * af).to(x.scalar_type()), at::where(dyf == 0, zero, dt * xf).sum().reshape(a.sizes()).to(a.scalar_type()),
              dw, db};
    }
    auto [dx, dalpha, dw, db] =
        NORMLAB_OP("dyt_backward", DytBwdSig)
            .call(dy, x, a, w, w.has_value() && node.task_should_compute_output(2),
                  has_bias && node.task_should_compute_output(3), saved_opt(tanh.unpack()));
    return {dx, dalpha, grad_or_none(dw), cast(grad_or_none(db), bias_dtype)};
  }
};

std::tuple<Tensor, Tensor> rms_norm_autograd(const Tensor& input, const OptTensor& weight, double eps,
                                             c10::string_view casting, double offset, int64_t k,
                                             const OptTensor& bias) {
  auto node = bias ? node_for<RmsNormSaved>("rms_norm", input, weight, bias)
                   : node_for<RmsNormSaved>("rms_norm", input, weight);
  auto [y, rstd] = below_autograd([&] {
    return NORMLAB_OP("rms_norm", RmsFwdSig).call(input, weight, eps, casting, offset, k, bias);
  });
  if (node) {
    torch::autograd::set_history(y, node);
    auto& s = node->saved;
    s.input = SavedVariable(input, false);
    s.weight = save(weight);
    s.rstd = SavedVariable(rstd, false);
    s.eps = eps, s.offset = offset, s.k = k;
    s.has_bias = bias.has_value();
    if (bias) s.bias_dtype = bias->scalar_type();
  }
  return {y, rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_autograd(const Tensor& input, const Tensor& residual,
                                                         const OptTensor& weight, double eps, c10::string_view casting,
                                                         double offset, int64_t k, at::ScalarType residual_dtype) {
  auto node = node_for<AddRmsNormSaved>("add_rms_norm", input, residual, weight);
  auto [y, sum, rstd] = below_autograd([&] {
    return NORMLAB_OP("add_rms_norm", AddRmsSig).call(input, residual, weight, eps, casting, offset, k, residual_dtype);
  });
  if (node) {
    torch::autograd::set_history(y, node);
    torch::autograd::set_history(sum, node);
    auto& s = node->saved;
    s.sum = SavedVariable(sum, true);
    s.weight = save(weight);
    s.rstd = SavedVariable(rstd, false);
    s.eps = eps, s.offset = offset, s.k = k;
    s.x_dtype = input.scalar_type(), s.r_dtype = residual.scalar_type();
  }
  return {y, sum, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& input, const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
  auto node = node_for<LayerNormSaved>("layer_norm", input, weight, bias);
  auto [y, mean, rstd] = below_autograd([&] {
    return NORMLAB_OP("layer_norm", LnFwdSig).call(input, weight, bias, eps);
  });
  if (node) {
    torch::autograd::set_history(y, node);
    auto& s = node->saved;
    s.input = SavedVariable(input, false);
    s.weight = save(weight);
    s.mean = SavedVariable(mean, false);
    s.rstd = SavedVariable(rstd, false);
    s.eps = eps;
    s.has_bias = bias.has_value();
    if (bias) s.bias_dtype = bias->scalar_type();
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_autograd(const Tensor& input, const Tensor& residual,
                                                                   const OptTensor& weight, const OptTensor& bias,
                                                                   double eps, at::ScalarType residual_dtype) {
  auto node = node_for<AddLayerNormSaved>("add_layer_norm", input, residual, weight, bias);
  auto [y, sum, mean, rstd] = below_autograd([&] {
    return NORMLAB_OP("add_layer_norm", AddLnSig).call(input, residual, weight, bias, eps, residual_dtype);
  });
  if (node) {
    torch::autograd::set_history(y, node);
    torch::autograd::set_history(sum, node);
    auto& s = node->saved;
    s.sum = SavedVariable(sum, true);
    s.weight = save(weight);
    s.mean = SavedVariable(mean, false);
    s.rstd = SavedVariable(rstd, false);
    s.eps = eps;
    s.has_bias = bias.has_value();
    if (bias) s.bias_dtype = bias->scalar_type();
    s.x_dtype = input.scalar_type(), s.r_dtype = residual.scalar_type();
  }
  return {y, sum, mean, rstd};
}

Tensor dyt_autograd(const Tensor& input, const Tensor& alpha, const OptTensor& weight, const OptTensor& bias) {
  auto node = node_for<DytSaved>("dyt", input, alpha, weight, bias);
  if (!node) return below_autograd([&] { return NORMLAB_OP("dyt", DytFwdSig).call(input, alpha, weight, bias); });
  auto [y, t] = below_autograd([&] { return NORMLAB_OP("dyt_forward", DytTrainSig).call(input, alpha, weight, bias); });
  {
    torch::autograd::set_history(y, node);
    auto& s = node->saved;
    s.input = SavedVariable(input, false);
    s.tanh = SavedVariable(t, false);
    s.alpha = SavedVariable(alpha, false);
    s.weight = save(weight);
    s.has_bias = bias.has_value();
    if (bias) s.bias_dtype = bias->scalar_type();
  }
  return y;
}

// ---- Gated RMSNorm ---------------------------------------------------------------------------------------------
// Rows of n elements in groups of `group_size`; rstd holds one fp32 value per row and group, shape (..., groups).
void check_gated(const Tensor& input, const OptTensor& gate, const OptTensor& weight, int64_t group_size) {
  check_rows(input, "input");
  const int64_t n = input.size(-1);
  TORCH_CHECK(group_size >= 1 && n % group_size == 0, "group_size must be a positive divisor of ", n, ", got ",
              group_size);
  if (gate) {
    TORCH_CHECK(gate->sizes() == input.sizes() && gate->scalar_type() == input.scalar_type() && gate->device().is_cpu(),
                "gate must be a CPU tensor of the input's shape ", input.sizes(), " and dtype, got ", gate->sizes(),
                " ", gate->scalar_type());
  }
  check_param(weight, "weight", n);
}

Tensor gated_stats_like(const Tensor& x, int64_t groups) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(groups);
  return at::empty(shape, x.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor> gated_rms_norm_cpu(const Tensor& input, const OptTensor& gate, const OptTensor& weight,
                                              double eps, int64_t group_size, bool norm_before_gate,
                                              c10::string_view casting, double offset) {
  check_gated(input, gate, weight, group_size);
  TORCH_CHECK(casting == "llama" || casting == "gemma", "unknown casting mode '", casting,
              "'; expected llama or gemma");
  const Tensor x = input.contiguous();
  const Tensor z = gate ? gate->contiguous() : Tensor();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const Mode mode = rms_mode(casting, x.scalar_type());
  const Tensor w32 = rms_weight(weight, offset, mode, x.scalar_type());
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous), rstd = gated_stats_like(x, n / group_size);
  GatedFwdArgs a{};
  a.x = x.const_data_ptr();
  a.z = z.defined() ? z.const_data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.w = w32.defined() ? w32.const_data_ptr<float>() : ones(n);
  a.rstd = rstd.data_ptr<float>();
  a.n = n;
  a.group = group_size;
  a.eps = static_cast<float>(eps);
  a.t = dtype_of(x);
  a.before = norm_before_gate;
  a.llama = mode == Mode::rms_llama;
  const KernelTable& table = kernels();
  for_rows(rows, n, [&](int64_t begin, int64_t end) { table.gated_fwd(a, begin, end); });
  return {y, rstd};
}

// (dx, dz, dw); dz is an empty placeholder without a gate, dw without weight_grad (the schema returns tensors).
std::tuple<Tensor, Tensor, Tensor> gated_rms_norm_backward_cpu(const Tensor& grad, const Tensor& input,
                                                               const OptTensor& gate, const OptTensor& weight,
                                                               const Tensor& rstd, int64_t group_size,
                                                               bool norm_before_gate, double offset, bool weight_grad) {
  check_gated(input, gate, weight, group_size);
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(),
              "grad must have the input's shape and dtype");
  const Tensor x = input.contiguous(), dy = grad.contiguous(), z = gate ? gate->contiguous() : Tensor();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(rstd.numel() == rows * (n / group_size) && rstd.scalar_type() == at::kFloat,
              "rstd must hold one fp32 value per row and group");
  const Tensor rs = rstd.contiguous(), w32 = bwd_weight(weight, offset);
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor dz = z.defined() ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const bool want_dw = weight_grad && weight.has_value();
  const int64_t slots = worker_slots(rows, n);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor pw = at::empty({slots, n}, f32), dw = at::zeros({n}, f32);
  GatedBwdArgs a{};
  a.dy = dy.const_data_ptr();
  a.x = x.const_data_ptr();
  a.z = z.defined() ? z.const_data_ptr() : nullptr;
  a.dx = dx.data_ptr();
  a.dz = z.defined() ? dz.data_ptr() : nullptr;
  a.w = w32.defined() ? w32.const_data_ptr<float>() : ones(n);
  a.rstd = rs.const_data_ptr<float>();
  a.n = n;
  a.group = group_size;
  a.t = dtype_of(x);
  a.before = norm_before_gate;
  const KernelTable& table = kernels();
  float* pw0 = pw.data_ptr<float>();
  run_chunks_in_order(rows, slots, [&](int64_t begin, int64_t end, int64_t slot) {
    GatedBwdArgs part = a;
    part.pw = pw0 + slot * n;
    std::fill(part.pw, part.pw + n, 0.f);
    table.gated_bwd(part, begin, end);
  }, [&](int64_t slot) {
    if (want_dw) add_into(dw.data_ptr<float>(), pw0 + slot * n, n);
  });
  return {dx, dz, want_dw ? in_dtype(dw, weight) : at::empty({0}, f32)};
}

// The differentiable formula (double backward), recomputing rstd from x and the gate.
std::tuple<Tensor, Tensor, Tensor> gated_rms_norm_backward_composite(const Tensor& dy, const Tensor& x,
                                                                     const OptTensor& gate, const OptTensor& weight,
                                                                     double eps, int64_t group_size,
                                                                     bool norm_before_gate, double offset) {
  const Tensor xf = x.to(at::kFloat), dyf = dy.to(at::kFloat);
  const int64_t n = x.size(-1), groups = n / group_size;
  Tensor s, slope;
  if (gate) {
    const Tensor zf = gate->to(at::kFloat), sig = at::sigmoid(zf);
    s = at::silu(zf);
    slope = sig * (1 + zf * (1 - sig));
  }
  const Tensor h = gate && !norm_before_gate ? xf * s : xf;
  const Tensor hg = h.reshape({-1, groups, group_size});
  const Tensor r = at::rsqrt(hg.square().mean(-1, true) + eps);
  const Tensor xhat_g = hg * r;
  const Tensor w = weight ? weight->to(at::kFloat) + offset : Tensor();
  const Tensor u = gate && norm_before_gate ? dyf * s : dyf;
  const Tensor g = (w.defined() ? u * w : u).reshape({-1, groups, group_size});
  const Tensor proj = (g * xhat_g).sum(-1, true) / static_cast<double>(group_size);
  const Tensor dh = (r * (g - xhat_g * proj)).reshape(x.sizes());
  const Tensor xhat = xhat_g.reshape(x.sizes());
  Tensor dx = dh, dz;
  if (gate && !norm_before_gate) {
    dx = dh * s;
    dz = dh * xf * slope;
  } else if (gate) {
    dz = dyf * (w.defined() ? xhat * w : xhat) * slope;
  }
  Tensor dw;
  if (weight) {
    dw = at::where(dyf == 0, at::zeros({}, dyf.options()), u * xhat).reshape({-1, n}).sum(0).to(weight->scalar_type());
  }
  return {dx.to(x.scalar_type()), cast(dz, gate->scalar_type()), dw};
}

using GatedFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double, int64_t, bool,
                                               c10::string_view, double);
using GatedBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                       const Tensor&, int64_t, bool, double, bool);

struct GatedRmsNormSaved {
  static constexpr const char* name = "normlab::GatedRmsNormBackward";
  SavedVariable input, gate, weight, rstd;
  double eps = 0, offset = 0;
  int64_t group_size = 0;
  bool before = false;
  void release() {
    input.reset_data();
    gate.reset_data();
    weight.reset_data();
    rstd.reset_data();
  }
  variable_list backward(const torch::autograd::Node& node, const variable_list& grads) const {
    const Tensor& dy = grads[0];
    const Tensor none;
    if (!dy.defined()) return {none, none, none};
    const Tensor x = input.unpack();
    const OptTensor z = saved_opt(gate.unpack()), w = saved_opt(weight.unpack());
    const bool dw_wanted = w.has_value() && node.task_should_compute_output(2);
    Tensor dx, dz, dw;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dz, dw) = gated_rms_norm_backward_composite(dy, x, z, w, eps, group_size, before, offset);
    } else {
      std::tie(dx, dz, dw) = NORMLAB_OP("gated_rms_norm_backward", GatedBwdSig)
                                 .call(dy, x, z, w, rstd.unpack(), group_size, before, offset, dw_wanted);
    }
    // which gradients exist follows from the saved inputs, not from sizes (symbolic under torch.compile)
    return {dx, z ? dz : none, dw_wanted ? dw : none};
  }
};

std::tuple<Tensor, Tensor> gated_rms_norm_autograd(const Tensor& input, const OptTensor& gate, const OptTensor& weight,
                                                   double eps, int64_t group_size, bool norm_before_gate,
                                                   c10::string_view casting, double offset) {
  auto node = node_for<GatedRmsNormSaved>("gated_rms_norm", input, gate, weight);
  auto [y, rstd] = below_autograd([&] {
    return NORMLAB_OP("gated_rms_norm", GatedFwdSig)
        .call(input, gate, weight, eps, group_size, norm_before_gate, casting, offset);
  });
  if (node) {
    torch::autograd::set_history(y, node);
    auto& s = node->saved;
    s.input = SavedVariable(input, false);
    s.gate = save(gate);
    s.weight = save(weight);
    s.rstd = SavedVariable(rstd, false);
    s.eps = eps, s.offset = offset, s.group_size = group_size, s.before = norm_before_gate;
  }
  return {y, rstd};
}

}  // namespace

TORCH_LIBRARY(normlab, m) {
  m.def("rms_norm(Tensor input, Tensor? weight, float eps, str casting, float offset, int k, Tensor? bias=None) "
        "-> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor input, Tensor? weight, Tensor rstd, float offset, int k, "
        "Tensor? grad_sum, bool weight_grad, bool bias_grad=False) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_into(Tensor input, Tensor? weight, float eps, str casting, float offset, int k, Tensor(a!) out) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor residual, Tensor? weight, float eps, str casting, float offset, int k, "
        "ScalarType residual_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, Tensor? grad_sum, "
        "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_into(Tensor input, Tensor? weight, Tensor? bias, float eps, Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("add_layer_norm(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "ScalarType residual_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dyt(Tensor input, Tensor alpha, Tensor? weight, Tensor? bias) -> Tensor");
  m.def("dyt_forward(Tensor input, Tensor alpha, Tensor? weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("dyt_backward(Tensor grad, Tensor input, Tensor alpha, Tensor? weight, bool weight_grad, bool bias_grad, "
        "Tensor? tanh=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_rms_norm(Tensor input, Tensor? gate, Tensor? weight, float eps, int group_size, bool norm_before_gate, "
        "str casting, float offset) -> (Tensor, Tensor)");
  m.def("gated_rms_norm_backward(Tensor grad, Tensor input, Tensor? gate, Tensor? weight, Tensor rstd, int group_size, "
        "bool norm_before_gate, float offset, bool weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("set_cpu_isa(str isa) -> str", &set_cpu_isa);
}

TORCH_LIBRARY_IMPL(normlab, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("rms_norm_into", &rms_norm_into_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("layer_norm_into", &layer_norm_into_cpu);
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("dyt", &dyt_cpu);
  m.impl("dyt_forward", &dyt_forward_cpu);
  m.impl("dyt_backward", &dyt_backward_cpu);
  m.impl("gated_rms_norm", &gated_rms_norm_cpu);
  m.impl("gated_rms_norm_backward", &gated_rms_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(normlab, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
  m.impl("dyt", &dyt_autograd);
  m.impl("gated_rms_norm", &gated_rms_norm_autograd);
}

}  // namespace normlab::cpu
