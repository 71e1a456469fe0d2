// MoE experts on the CPU: the grouped GEMMs of mmkernels.ops.experts over each expert's contiguous
// rows of the routing's expert-ordered view, forward and backward (the vectorised-torch fallback:
// ops.experts._cpu_forward / _cpu_backward).
//
// Registered as mmkernels_cpu::{experts_forward, experts_backward}; loaded by mmkernels/_cpp.py.
//
// Work split: the experts are shared among the threads (one at::parallel_for over the threads,
// each taking the next expert, largest first, from an atomic counter), and every GEMM of an expert
// runs on its thread's core through ATen's BLAS (inside a parallel region ATen and the BLAS run
// single-threaded). Each thread gathers its expert's token rows into its own buffer (rows x H,
// sized for the widest expert: a few hundred KB that stay in the core's L2 for the GEMM that reads
// them), applies the activation and the routing weight in place, and writes its expert's output
// rows to their rows of one (rows, H) buffer. Rows of different experts belong to the same token,
// so the combine over a token's k choices is a second pass, parallel over tokens, in the order
// j = 0 .. k-1 (deterministic, race-free, no atomics). The outputs over 1 MB, the rows buffer and
// the scratch come from the tensor pool of pool.h (recycled, not fresh pages each call).
//
// Shapes: x (T, H), weights (T, k), gate_up (E, 2I, H), down (E, H, I), b1 (E, 2I), b2 (E, H),
// all of one dtype, float32 or float64 (the Python side casts float16 storage), or bfloat16 with
// float32 weights: the GEMMs then run in bfloat16 (float accumulation, bfloat16 results: h, each
// row's output and d h, as the Triton path stores them; each expert's weight gradient one GEMM,
// rounded once), the routing weight multiplies in float, its gradient and the combines sum in
// float; sorted_slots /
// slot_rows (T·k,) int32, offsets (E+1,) int32 as in mmkernels.ops.routing.Routing. Row r of the
// view (r < offsets[E]) is slot sorted_slots[r], token sorted_slots[r] / k.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pool.h"

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mmkernels {
namespace {

// The gated activations by code: the code is the activation's index in
// mmkernels.ops.experts.ACTIVATIONS ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"), as the
// Triton kernels take it.
enum class Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSwigluOai = 4 };

struct Spec {
  Act act;
  bool interleaved;
  double alpha, limit;  // swiglu_oai only
};

Spec make_spec(int64_t activation, bool interleaved, double alpha, double limit) {
  TORCH_CHECK(activation >= 0 && activation <= static_cast<int64_t>(Act::kSwigluOai),
              "experts: unknown activation code ", activation);
  return {static_cast<Act>(activation), interleaved, alpha, limit};
}

// (gate, up) views of rows of the first GEMM's output (m, 2I).
std::pair<at::Tensor, at::Tensor> split(const at::Tensor& h, bool interleaved) {
  const int64_t n = h.size(1) / 2;
  if (interleaved) return {h.slice(1, 0, h.size(1), 2), h.slice(1, 1, h.size(1), 2)};
  return {h.narrow(1, 0, n), h.narrow(1, n, n)};
}

// out = act(gate) · up, in place into out (m, I); tmp: scratch of out's shape.
void gated_into(const at::Tensor& gate, const at::Tensor& up, const Spec& s, at::Tensor& out, at::Tensor& tmp) {
  switch (s.act) {
    case Act::kSilu: at::silu_out(out, gate); break;
    case Act::kGelu: at::gelu_out(out, gate, "none"); break;
    case Act::kGeluTanh: at::gelu_out(out, gate, "tanh"); break;
    case Act::kRelu: at::relu_out(out, gate); break;
    case Act::kSwigluOai: {  // (clamp(up, ±limit) + 1) · g·σ(α g), g = min(gate, limit)
      at::clamp_max_out(tmp, gate, s.limit);                  // g
      at::sigmoid_out(out, tmp * s.alpha).mul_(tmp);          // g·σ(α g)
      at::clamp_out(tmp, up, -s.limit, s.limit).add_(1.0);   // clamp(up) + 1
      out.mul_(tmp);
      return;
    }
  }
  out.mul_(up);
}

// (d gate, d up) of gated(gate, up) for the incoming da, written into the views dgate / dup of
// the rows dh; tmp: scratch of da's shape.
void gated_backward_into(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& da, const Spec& s,
                         at::Tensor dgate, at::Tensor dup, at::Tensor& tmp) {
  switch (s.act) {
    case Act::kSilu:
      at::silu_backward_out(dgate, at::mul_out(tmp, da, up), gate);
      at::mul_out(dup, da, at::silu_out(tmp, gate));
      return;
    case Act::kGelu:
    case Act::kGeluTanh: {
      const char* approx = s.act == Act::kGelu ? "none" : "tanh";
      at::gelu_backward_out(dgate, at::mul_out(tmp, da, up), gate, approx);
      at::mul_out(dup, da, at::gelu_out(tmp, gate, approx));
      return;
    }
    case Act::kRelu:
      at::threshold_backward_out(dgate, at::mul_out(tmp, da, up), gate, 0);
      at::mul_out(dup, da, at::relu_out(tmp, gate));
      return;
    case Act::kSwigluOai: {
      const at::Tensor g = gate.clamp_max(s.limit);
      const at::Tensor sg = at::sigmoid(g * s.alpha);
      const at::Tensor u1 = up.clamp(-s.limit, s.limit) + 1.0;
      // d/dgate of g·σ(αg), zero where the clamp holds gate at the limit
      const at::Tensor dglu = (sg + g * s.alpha * sg * (1.0 - sg)) * gate.le(s.limit).to(gate.scalar_type());
      at::mul_out(dgate, da * u1, dglu);
      at::mul_out(dup, da * (g * sg), at::logical_and(up.ge(-s.limit), up.le(s.limit)).to(up.scalar_type()));
      return;
    }
  }
}

// dst[i, :] = src[rows[i], :] for i < m (src rows contiguous, dst contiguous).
template <typename T>
void gather_rows(const T* src, int64_t src_stride, const int64_t* rows, int64_t m, int64_t H, T* dst) {
  for (int64_t i = 0; i < m; ++i) std::copy_n(src + rows[i] * src_stride, H, dst + i * H);
}

// out[t, :] = Σ_j rows[slot_rows[t·k + j], :] over the kept slots (row < kept), j in order, summed
// in Acc (bfloat16 rows: float, rounded once into out).
template <typename T, typename Acc = T>
void combine(const at::Tensor& rows_t, const at::Tensor& slot_rows, int64_t k, int64_t kept, at::Tensor& out) {
  const int64_t T_ = out.size(0), H = out.size(1);
  const T* y = rows_t.data_ptr<T>();
  const int32_t* sr = slot_rows.data_ptr<int32_t>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
    std::vector<Acc> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = sr[t * k + j];
        if (r >= kept) continue;
        const T* yr = y + r * H;
        for (int64_t c = 0; c < H; ++c) acc[c] += static_cast<Acc>(yr[c]);
      }
      std::copy(acc.begin(), acc.end(), o + t * H);
    }
  });
}

// The expert-ordered view as host data: per-expert bounds, token and slot of each kept row, and
// the experts largest first (the order the threads take them in).
struct Rows {
  std::vector<int64_t> bounds, token, slot, order;
  int64_t kept = 0, widest = 0;
};

Rows make_rows(const at::Tensor& sorted_slots, const at::Tensor& slot_rows, const at::Tensor& offsets, int64_t k,
               int64_t T) {
  TORCH_CHECK(sorted_slots.scalar_type() == at::kInt && slot_rows.scalar_type() == at::kInt &&
                  offsets.scalar_type() == at::kInt,
              "experts: sorted_slots, slot_rows and offsets must be int32");
  TORCH_CHECK(sorted_slots.is_contiguous() && slot_rows.is_contiguous() && offsets.is_contiguous(),
              "experts: routing tensors must be contiguous");
  TORCH_CHECK(slot_rows.numel() == T * k && offsets.numel() >= 2, "experts: routing tensors of the wrong size");
  Rows r;
  const int64_t E = offsets.numel() - 1;
  const int32_t* off = offsets.data_ptr<int32_t>();
  r.bounds.assign(off, off + E + 1);
  TORCH_CHECK(r.bounds[0] == 0, "experts: offsets[0] must be 0");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(r.bounds[e] <= r.bounds[e + 1], "experts: offsets must be non-decreasing");
  const int32_t* sr = slot_rows.data_ptr<int32_t>();
  for (int64_t s = 0; s < T * k; ++s)  // the combine reads each kept slot's row
    TORCH_CHECK(sr[s] >= 0 && sr[s] < T * k, "experts: slot_rows entry ", sr[s], " out of range");
  r.kept = r.bounds[E];
  TORCH_CHECK(r.kept >= 0 && r.kept <= sorted_slots.numel(), "experts: offsets[E] out of range");
  const int32_t* ss = sorted_slots.data_ptr<int32_t>();
  r.token.resize(r.kept);
  r.slot.resize(r.kept);
  for (int64_t i = 0; i < r.kept; ++i) {
    TORCH_CHECK(ss[i] >= 0 && ss[i] < T * k, "experts: sorted_slots entry ", ss[i], " out of range");
    r.slot[i] = ss[i];
    r.token[i] = ss[i] / k;
  }
  r.order.resize(E);
  std::iota(r.order.begin(), r.order.end(), 0);
  std::stable_sort(r.order.begin(), r.order.end(), [&](int64_t a, int64_t b) {
    return r.bounds[a + 1] - r.bounds[a] > r.bounds[b + 1] - r.bounds[b];
  });
  for (int64_t e = 0; e < E; ++e) r.widest = std::max(r.widest, r.bounds[e + 1] - r.bounds[e]);
  return r;
}

// Runs body(e, tid) for every expert, the experts shared among the threads largest first.
template <typename F>
void for_each_expert(const Rows& rows, F&& body) {
  std::atomic<int64_t> next{0};
  const int64_t E = static_cast<int64_t>(rows.order.size());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tid = t0; tid < t1; ++tid) {
      for (int64_t i = next.fetch_add(1); i < E; i = next.fetch_add(1)) body(rows.order[i], tid);
    }
  });
}

std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}

// `n` elements rounded up to whole 64-byte lines. Scratch regions start on a line, so that a region
// has the same alignment in every thread's scratch: MKL's GEMM kernels take different paths for
// different alignments, and an expert runs on whichever thread takes it first — with regions at
// odd offsets, an expert's results differed in the last bits from one call to the next.
inline int64_t whole_lines(int64_t n, int64_t elem_size) {
  const int64_t per_line = 64 / elem_size;
  return (n + per_line - 1) / per_line * per_line;
}

// Carves (m, cols) views out of one thread's scratch, each region sized for the widest expert and
// starting on a 64-byte line.
struct Carve {
  at::Tensor buf;
  int64_t m, m_max, o = 0;
  at::Tensor operator()(int64_t cols) {
    at::Tensor v = buf.narrow(0, o, m * cols).view({m, cols});
    o += whole_lines(m_max * cols, buf.element_size());
    return v;
  }
  // Elements of one thread's scratch for regions of these widths, in order.
  static int64_t size(int64_t m_max, std::initializer_list<int64_t> widths, int64_t elem_size) {
    int64_t n = 0;
    for (int64_t cols : widths) n += whole_lines(m_max * cols, elem_size);
    return n;
  }
};

// x, gate_up, down and the biases of one dtype — float32, float64, or bfloat16 with float32
// weights — the weights otherwise of x's dtype too.
void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate_up, const at::Tensor& down,
                  const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2, int64_t k) {
  const bool half = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || half,
              "experts: the C++ path computes in float32 / float64 (or from bfloat16 storage), got ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == (half ? at::kFloat : x.scalar_type()),
              half ? "experts: bfloat16 x takes float32 weights" : "experts: every tensor must have x's dtype");
  for (const at::Tensor* t : {&w, &gate_up, &down}) {
    if (t != &w) TORCH_CHECK(t->scalar_type() == x.scalar_type(), "experts: every tensor must have x's dtype");
    TORCH_CHECK(t->device().is_cpu(), "experts: CPU tensors only");
  }
  for (const auto* t : {&b1, &b2}) {
    if (t->has_value()) TORCH_CHECK((*t)->scalar_type() == x.scalar_type(), "experts: biases must have x's dtype");
  }
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3, "experts: bad ranks");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == k, "experts: weights must be (T, k)");
  TORCH_CHECK(gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && down.size(2) * 2 == gate_up.size(1),
              "experts: gate_up (E, 2I, H) and down (E, H, I) do not match x (T, H)");
}

// An expert's rows a .. a+m: src's token rows gathered into dst (m, H) and the rows' routing
// weights into we (m) — the first step of the forward and of the backward.
template <typename scalar_t, typename weight_t = scalar_t>
void load_rows(const Rows& rows, int64_t a, int64_t m, const at::Tensor& src, const at::Tensor& w_flat,
               at::Tensor& dst, at::Tensor& we) {
  gather_rows<scalar_t>(src.data_ptr<scalar_t>(), src.size(1), rows.token.data() + a, m, src.size(1),
                        dst.data_ptr<scalar_t>());
  weight_t* wp = we.data_ptr<weight_t>();
  const weight_t* ws = w_flat.data_ptr<weight_t>();
  for (int64_t i = 0; i < m; ++i) wp[i] = ws[rows.slot[a + i]];
}

}  // namespace

// (out (T, H), h (T·k, 2I), the kept rows written): h is the first GEMM's output with b1, saved for the backward (the
// activation is recomputed from it there: one elementwise pass instead of kept x I more floats).
std::tuple<at::Tensor, at::Tensor> experts_forward(
    const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in, const at::Tensor& down_in,
    const std::optional<at::Tensor>& b1_in, const std::optional<at::Tensor>& b2_in, const at::Tensor& sorted_slots,
    const at::Tensor& slot_rows, const at::Tensor& offsets, int64_t k, int64_t activation,
    bool interleaved, double alpha, double limit) {
  check_inputs(x_in, weights_in, gate_up_in, down_in, b1_in, b2_in, k);
  // detached views: the worker threads run with grad mode on (it is thread-local)
  const at::Tensor weights = weights_in.detach(), gate_up = gate_up_in.detach(), down = down_in.detach();
  const auto b1 = detached(b1_in), b2 = detached(b2_in);
  const Spec spec = make_spec(activation, interleaved, alpha, limit);
  const at::Tensor x = x_in.detach().contiguous();
  const int64_t T = x.size(0), H = x.size(1), I2 = gate_up.size(1), I = I2 / 2;
  const Rows rows = make_rows(sorted_slots, slot_rows, offsets, k, T);
  const int64_t n = rows.kept, m_max = rows.widest;
  const at::Tensor w = weights.reshape({-1}).contiguous();  // per slot
  auto opt = x.options();
  // T·k rows (the kept n written): the shape is known without reading the routing
  at::Tensor h = pooled_empty({T * k, I2}, opt), out = pooled_empty({T, H}, opt);
  const int64_t nt = at::get_num_threads();
  // per thread: x rows (m, H), act (m, I), w·act (m, I), and the rows' weights (m) in the weights'
  // dtype (bfloat16 x: float32, a region of its own)
  const bool half = x.scalar_type() == at::kBFloat16;
  const int64_t esz = x.element_size(), per = Carve::size(m_max, {H, I, I}, esz) + (half ? 0 : Carve::size(m_max, {1}, esz));
  const int64_t base = whole_lines(n * H, esz);
  at::Tensor ws = pooled_empty({base + nt * per}, opt);
  at::Tensor wws = half ? pooled_empty({nt * whole_lines(m_max, 4)}, w.options()) : at::Tensor();
  at::Tensor y = ws.narrow(0, 0, n * H).view({n, H});  // each kept row's weighted expert output

  const auto run = [&](auto storage, auto weight) {
    using scalar_t = decltype(storage);
    using weight_t = decltype(weight);
    for_each_expert(rows, [&](int64_t e, int64_t tid) {
      const int64_t a = rows.bounds[e], m = rows.bounds[e + 1] - a;
      if (m == 0) return;
      Carve take{ws.narrow(0, base + tid * per, per), m, m_max};
      at::Tensor xe = take(H), ae = take(I), aw = take(I);
      at::Tensor we = half ? wws.narrow(0, tid * whole_lines(m_max, 4), m) : take(1).view({m});
      load_rows<scalar_t, weight_t>(rows, a, m, x, w, xe, we);
      at::Tensor he = h.narrow(0, a, m), ye = y.narrow(0, a, m);
      if (b1.has_value()) at::addmm_out(he, (*b1)[e].unsqueeze(0), xe, gate_up[e].t());
      else at::mm_out(he, xe, gate_up[e].t());
      auto [gate, up] = split(he, spec.interleaved);
      gated_into(gate, up, spec, ae, aw);
      // w·(act·downᵀ + b2) = (w·act)·downᵀ + w·b2: the weight scales the narrower operand
      at::mul_out(aw, ae, we.unsqueeze(1));
      at::mm_out(ye, aw, down[e].t());
      if (b2.has_value()) ye.addcmul_(we.unsqueeze(1), (*b2)[e].unsqueeze(0));
    });
  };
  if (half) {
    run(at::BFloat16(), float());
    combine<at::BFloat16, float>(y, slot_rows, k, n, out);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "experts_forward", [&] {
      run(scalar_t(), scalar_t());
      combine<scalar_t>(y, slot_rows, k, n, out);
    });
  }
  return {out, h};
}

// (dx, d gate_up, d down, d b1, d b2, d weights); need: bit i set = compute the i-th of them (the
// rest come back undefined: None in Python; d b1 / d b2 also without the bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& dout_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const std::optional<at::Tensor>& b1_in, const std::optional<at::Tensor>& b2_in,
    const at::Tensor& sorted_slots, const at::Tensor& slot_rows, const at::Tensor& offsets, const at::Tensor& h_in,
    int64_t k, int64_t activation, bool interleaved, double alpha, double limit, int64_t need) {
  check_inputs(x_in, weights_in, gate_up_in, down_in, b1_in, b2_in, k);
  const at::Tensor weights = weights_in.detach(), gate_up = gate_up_in.detach(), down = down_in.detach();
  const at::Tensor h = h_in.detach();
  const auto b1 = detached(b1_in), b2 = detached(b2_in);
  TORCH_CHECK(dout_in.scalar_type() == x_in.scalar_type() && h.scalar_type() == x_in.scalar_type(),
              "experts_backward: dout and h must have x's dtype");
  const Spec spec = make_spec(activation, interleaved, alpha, limit);
  const at::Tensor x = x_in.detach().contiguous(), dout = dout_in.detach().contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), I2 = gate_up.size(1), I = I2 / 2;
  const Rows rows = make_rows(sorted_slots, slot_rows, offsets, k, T);
  const int64_t n = rows.kept, m_max = rows.widest;
  TORCH_CHECK(h.size(0) >= n && h.size(1) == I2, "experts_backward: h does not match the routing");
  auto flag = [&](int bit) { return ((need >> bit) & 1) != 0; };
  const bool ndx = flag(0), ngu = flag(1), nd = flag(2), nb1 = flag(3) && b1.has_value(),
             nb2 = flag(4) && b2.has_value(), nw = flag(5);
  const at::Tensor w = weights.reshape({-1}).contiguous();
  auto opt = x.options();
  const bool half = x.scalar_type() == at::kBFloat16;  // bfloat16 storage, the weights float32
  at::Tensor dgu = ngu ? pooled_empty(gate_up.sizes(), opt) : at::Tensor();
  at::Tensor dd = nd ? pooled_empty(down.sizes(), opt) : at::Tensor();
  at::Tensor db1 = nb1 ? at::empty({E, I2}, opt) : at::Tensor();
  at::Tensor db2 = nb2 ? at::empty({E, H}, opt) : at::Tensor();
  at::Tensor dw_rows = nw ? at::empty({n}, w.options()) : at::Tensor();
  const bool need_dh = ndx || ngu || nb1;
  const int64_t nt = at::get_num_threads();
  // per thread: dout rows (m, H), x rows (m, H), d h (m, 2I), act, g, scratch (m, I), and the rows'
  // weights (m) in the weights' dtype (bfloat16 storage: float32, a region of its own)
  const int64_t esz = x.element_size();
  const int64_t per = Carve::size(m_max, {H, H, I2, I, I, I}, esz) + (half ? 0 : Carve::size(m_max, {1}, esz));
  const int64_t nrows = ndx ? n * H : 0, base = whole_lines(nrows, esz);
  at::Tensor ws = pooled_empty({base + nt * per}, opt);
  at::Tensor wws = half ? pooled_empty({nt * whole_lines(m_max, 4)}, w.options()) : at::Tensor();
  at::Tensor dx_rows = ws.narrow(0, 0, nrows).view({ndx ? n : 0, H});  // each kept row's dx

  const auto run = [&](auto storage, auto weight) {
    using scalar_t = decltype(storage);
    using weight_t = decltype(weight);
    for_each_expert(rows, [&](int64_t e, int64_t tid) {
      const int64_t a = rows.bounds[e], m = rows.bounds[e + 1] - a;
      if (m == 0) {  // no rows: zero weight gradients
        for (at::Tensor* t : {&dgu, &dd, &db1, &db2})
          if (t->defined()) (*t)[e].zero_();
        return;
      }
      Carve take{ws.narrow(0, base + tid * per, per), m, m_max};
      at::Tensor dye = take(H), xe = take(H), dh = take(I2), ae = take(I), g = take(I), tmp = take(I);
      at::Tensor we = half ? wws.narrow(0, tid * whole_lines(m_max, 4), m) : take(1).view({m});
      load_rows<scalar_t, weight_t>(rows, a, m, dout, w, dye, we);
      auto [gate, up] = split(h.narrow(0, a, m), spec.interleaved);
      gated_into(gate, up, spec, ae, tmp);  // the forward's activation, recomputed
      const at::Tensor we1 = we.unsqueeze(1);
      if (nd) { at::Tensor o = dd[e]; at::mm_out(o, dye.t(), at::mul_out(tmp, ae, we1)); }
      if (nb2) {
        at::Tensor o = db2[e];
        if (half) o.copy_(at::mv(dye.t().to(at::kFloat), we));  // Σ_rows w·dout in float
        else at::mv_out(o, dye.t(), we);
      }
      if (!(need_dh || nw)) return;
      at::mm_out(g, dye, down[e]);  // d act before the weight: dout_rows · down_e
      if (nw) {
        at::Tensor dwe = dw_rows.narrow(0, a, m);
        if (half) at::sum_out(dwe, g.to(at::kFloat).mul_(ae.to(at::kFloat)), at::IntArrayRef{1});
        else at::sum_out(dwe, at::mul_out(tmp, g, ae), at::IntArrayRef{1});
        if (b2.has_value()) dwe.add_(at::mv(dye, (*b2)[e]));
      }
      if (!need_dh) return;
      g.mul_(we1);
      auto [dgate, dup] = split(dh, spec.interleaved);
      gated_backward_into(gate, up, g, spec, dgate, dup, tmp);
      if (ngu) {
        gather_rows<scalar_t>(x.data_ptr<scalar_t>(), H, rows.token.data() + a, m, H, xe.data_ptr<scalar_t>());
        at::Tensor o = dgu[e];
        at::mm_out(o, dh.t(), xe);
      }
      if (nb1) { at::Tensor o = db1[e]; at::sum_out(o, dh, at::IntArrayRef{0}); }
      if (ndx) { at::Tensor o = dx_rows.narrow(0, a, m); at::mm_out(o, dh, gate_up[e]); }
    });
  };
  if (half) {
    run(at::BFloat16(), float());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "experts_backward", [&] { run(scalar_t(), scalar_t()); });
  }
  at::Tensor dx, dweights;
  if (ndx) {
    dx = pooled_empty({T, H}, opt);
    if (half) {
      combine<at::BFloat16, float>(dx_rows, slot_rows, k, n, dx);
    } else {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "experts_combine", [&] { combine<scalar_t>(dx_rows, slot_rows, k, n, dx); });
    }
  }
  if (nw) {  // the kept rows' gradients at their slots; dropped slots get zero
    dweights = at::zeros({T * k}, w.options());
    dweights.index_copy_(0, at::from_blob(const_cast<int64_t*>(rows.slot.data()), {n}, at::kLong), dw_rows);
    dweights = dweights.view({T, k});
  }
  return {dx, dgu, dd, db1, db2, dweights};
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def(
      "experts_forward(Tensor x, Tensor weights, Tensor gate_up, Tensor down, Tensor? b1, Tensor? b2, "
      "Tensor sorted_slots, Tensor slot_rows, Tensor offsets, int k, int activation, bool interleaved, "
      "float alpha, float limit) -> (Tensor, Tensor)");
  m.def(
      "experts_backward(Tensor dout, Tensor x, Tensor weights, Tensor gate_up, Tensor down, Tensor? b1, "
      "Tensor? b2, Tensor sorted_slots, Tensor slot_rows, Tensor offsets, Tensor h, int k, "
      "int activation, bool interleaved, float alpha, float limit, int need) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("experts_forward", &mmkernels::experts_forward);
  m.impl("experts_backward", &mmkernels::experts_backward);
}
