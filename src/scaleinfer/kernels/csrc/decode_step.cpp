// The decoder layers of a Llama-family decode step in one call: the same kernels, in the same order and
// on the same tensors, as runner/decode_program.py's DecodePlan (which runs them from Python), so the results
// are bit-identical to it and to the modules' forward (tested). At batch-1 decode of a 135M model the
// Python between the ~300 kernel calls of a step (module attribute lookups, views, method dispatch)
// costs as much as a third of the step; here it is gone.
//
// Each linear is a spec filled from Python by its quantization method (`decode_spec`): one or more parts,
// each a kernel over a band of the output columns, then the linear's bias:
//   dense  at::linear(x, w)                    (torch's own F.linear)
//   f32    f32_linear(x, w) up to `group` rows, at::linear beyond (layers/linear.py: DenseLinearMethod)
//   int8   int8_linear(x, q, scale)
//   int4   int4_linear(x, q, scale, min, group)
//   w4a8   int4_a8_linear(x, q, scale, min)
//   w8a8-g32  int8_a8_linear(x, q, scale)      (block-32 int8 weights x int8 activations: auto's 6/8-bit tensors)
// A linear of several parts (quantization/mixed.py: RowSplit, e.g. int4 q/k and int8 v of a fused QKV)
// runs each part into a workspace buffer and copies it into its columns. A linear of one dense / f32 part
// passes its bias to the kernel, as F.linear does (so the results stay bit-identical to the modules').
// Python only calls run() for row counts every spec takes (its max_rows).
//
// Every intermediate of a step (normed input, QKV, attention output, O, gate/up, SiLU product, down) is
// written into buffers the program keeps per row count (a Workspace), so a step allocates no tensors;
// the activations' int8 copies (w4a8) are thread-local buffers too (a8_common.h: quantize_rows).
//
// Under tensor parallelism (distributed/sharding.py) o and down are row-parallel: their outputs are
// partial sums, all-reduced across the ranks right after the matmul (set_all_reduce): by the shared-memory
// communicator directly (shm_comm.cpp), or by a Python callable (e.g. gloo) for any other.
#include "kernels.h"
#include "shm_comm.h"

#include <map>
#include <string>
#include <vector>

namespace {

enum class Kind { dense, f32, int8, int4, w4a8, a8int8 };

struct Part {
  Kind kind;
  torch::Tensor a, b, c;  // dense: weight; int8 / w8a8-g32: q, scale; int4 / w4a8: q, scale, min
  int64_t group;
};

struct LinearSpec {
  std::vector<Part> parts;  // side by side along the output columns
  c10::optional<torch::Tensor> bias;
};

// What Python passes per part: (kind, tensors, group); per linear: (parts, bias).
using PartArg = std::tuple<std::string, std::vector<torch::Tensor>, int64_t>;
using LinearArg = std::tuple<std::vector<PartArg>, c10::optional<torch::Tensor>>;

struct LayerSpec {
  torch::Tensor w_in, w_post, k_cache, v_cache;
  OptTensor k_scale, v_scale, k_chan, v_chan;  // an int8 KV cache's scales (cpu_ops.cpp: kv_write)
  LinearSpec qkv, o, gate_up, down;
  double scale;
  int64_t view;  // which of run()'s attention views (one per attention pattern) this layer reads
};

Part make_part(const PartArg& arg) {
  const auto& [kind, t, group] = arg;
  Part p;
  p.kind = kind == "dense" ? Kind::dense : kind == "f32" ? Kind::f32 : kind == "int8" ? Kind::int8
           : kind == "int4" ? Kind::int4
           : kind == "w4a8" ? Kind::w4a8 : kind == "w8a8-g32" ? Kind::a8int8 : throw std::invalid_argument("unknown linear kind " + kind);
  const size_t need = p.kind == Kind::dense || p.kind == Kind::f32 ? 1
                      : p.kind == Kind::int8 || p.kind == Kind::a8int8 ? 2 : 3;
  TORCH_CHECK(t.size() == need, kind, " takes ", need, " tensors, got ", t.size());
  p.a = t[0];
  if (need > 1) p.b = t[1];
  if (need > 2) p.c = t[2];
  p.group = group;
  return p;
}

LinearSpec make_spec(const LinearArg& arg) {
  LinearSpec s;
  for (const PartArg& part : std::get<0>(arg)) s.parts.push_back(make_part(part));
  TORCH_CHECK(!s.parts.empty(), "a linear needs at least one part");
  s.bias = std::get<1>(arg);
  return s;
}

int64_t out_features(const Part& p) { return p.a.size(0); }  // weight [N, K] or packed q [N, K / 2]

int64_t out_features(const LinearSpec& s) {
  int64_t n = 0;
  for (const Part& p : s.parts) n += out_features(p);
  return n;
}

// y = the part's kernel on x (+ bias), written into `out` ([rows of x, out_features] contiguous).
void apply_part(const Part& p, const torch::Tensor& x, torch::Tensor& out, const c10::optional<torch::Tensor>& bias) {
  switch (p.kind) {
    case Kind::dense:
      at::linear_out(out, x, p.a, bias);
      return;
    case Kind::f32:
      if (x.size(0) <= p.group) {
        f32_linear(x.contiguous(), p.a, bias, out);
      } else {
        at::linear_out(out, x, p.a, bias);
      }
      return;
    case Kind::int8:
      int8_linear(x.contiguous(), p.a, p.b, out);
      break;
    case Kind::int4:
      int4_linear(x.contiguous(), p.a, p.b, p.c, p.group, out);
      break;
    case Kind::w4a8:
      int4_a8_linear(x.contiguous(), p.a, p.b, p.c, out);
      break;
    case Kind::a8int8:
      int8_a8_linear(x.contiguous(), p.a, p.b, out);
      break;
  }
  if (bias.has_value() && bias->defined()) out += *bias;
}

// Buffers for the parts of split linears, by width (parts run one after another: one buffer per width).
using PartBuffers = std::map<int64_t, torch::Tensor>;

// y = the spec's linear of x, written into `out` ([rows of x, out_features] contiguous).
torch::Tensor apply(const LinearSpec& s, const torch::Tensor& x, torch::Tensor& out, PartBuffers& buffers) {
  if (s.parts.size() == 1) {
    apply_part(s.parts.front(), x, out, s.bias);
    return out;
  }
  int64_t col = 0;
  for (const Part& p : s.parts) {
    const int64_t n = out_features(p);
    auto it = buffers.find(n);
    if (it == buffers.end()) it = buffers.emplace(n, torch::empty({x.size(0), n}, out.options())).first;
    apply_part(p, x, it->second, c10::nullopt);
    out.slice(1, col, col + n).copy_(it->second);
    col += n;
  }
  if (s.bias.has_value() && s.bias->defined()) out += *s.bias;
  return out;
}

// The buffers of one step at a given row count.
struct Workspace {
  torch::Tensor normed, qkv, attn, o, gate_up, act, down;
  PartBuffers parts;
};

}  // namespace

class DecodeProgram {
 public:
  DecodeProgram(int64_t h, int64_t h_kv, int64_t d, double eps) : h_(h), h_kv_(h_kv), d_(d), eps_(eps) {}

  // One decoder layer; each linear is ([(kind, tensors, group), ...], bias). The KV cache is float32,
  // float16, bfloat16 or int8 (then with its scales, as kv_write takes them).
  void add_layer(torch::Tensor w_in, torch::Tensor w_post, torch::Tensor k_cache, torch::Tensor v_cache,
                 double scale, int64_t view, const LinearArg& qkv, const LinearArg& o, const LinearArg& gate_up,
                 const LinearArg& down, OptTensor k_scale, OptTensor v_scale, OptTensor k_chan, OptTensor v_chan) {
    LayerSpec l;
    l.k_scale = k_scale;
    l.v_scale = v_scale;
    l.k_chan = k_chan;
    l.v_chan = v_chan;
    l.w_in = w_in;
    l.w_post = w_post;
    l.k_cache = k_cache;
    l.v_cache = v_cache;
    l.scale = scale;
    l.view = view;
    l.qkv = make_spec(qkv);
    l.o = make_spec(o);
    l.gate_up = make_spec(gate_up);
    l.down = make_spec(down);
    layers_.push_back(std::move(l));
  }

  // After o and down of every layer, all-reduce their output in place with `comm`: a ShmComm (called
  // directly) or a callable taking the tensor; None: no reduction (a single rank).
  void set_all_reduce(pybind11::object comm) {
    shm_ = nullptr;
    reduce_ = pybind11::none();
    if (comm.is_none()) return;
    if (pybind11::isinstance<ShmComm>(comm)) {
      shm_ = comm.cast<ShmComm*>();
    }
    reduce_ = comm;  // keeps the communicator alive while the program uses it
  }

  // x [n, H] embeddings; cos / sin [n, D]; per attention view: slot_mapping [n], decode_slots [n, W],
  // decode_lens [n]. Returns (x, residual) after the last layer (the final norm is the head's).
  // The returned x is a buffer of the program: valid until the next run() with as many rows.
  std::vector<torch::Tensor> run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                                 std::vector<torch::Tensor> slot_mappings, std::vector<torch::Tensor> decode_slots,
                                 std::vector<torch::Tensor> decode_lens) {
    const int64_t n = x.size(0), h = h_, hk = h_kv_, d = d_;
    TORCH_CHECK(!layers_.empty(), "the program has no layers");
    Workspace& ws = workspace(n, x);
    c10::optional<torch::Tensor> residual;
    for (const LayerSpec& l : layers_) {
      TORCH_CHECK(l.view < static_cast<int64_t>(slot_mappings.size()), "missing attention view ", l.view);
      residual = add_rms_norm(x, residual, l.w_in, eps_, ws.normed)[1];
      torch::Tensor qkv = apply(l.qkv, ws.normed, ws.qkv, ws.parts);
      rotary_(qkv.slice(1, 0, (h + hk) * d).view({n, h + hk, d}), cos, sin);
      kv_write(l.k_cache, l.v_cache, slot_mappings[l.view], qkv.slice(1, h * d, (h + hk) * d).view({n, hk, d}),
               qkv.slice(1, (h + hk) * d).view({n, hk, d}), l.k_scale, l.v_scale, l.k_chan, l.v_chan);
      paged_decode_attention(ws.attn, qkv.slice(1, 0, h * d).view({n, h, d}), l.k_cache, l.v_cache,
                             decode_slots[l.view], decode_lens[l.view], l.scale, l.k_scale, l.v_scale, l.k_chan,
                             l.v_chan);
      apply(l.o, ws.attn.view({n, h * d}), ws.o, ws.parts);
      all_reduce(ws.o);
      residual = add_rms_norm(ws.o, residual, l.w_post, eps_, ws.normed)[1];
      silu_and_mul(apply(l.gate_up, ws.normed, ws.gate_up, ws.parts), ws.act);
      x = apply(l.down, ws.act, ws.down, ws.parts);
      all_reduce(x);
    }
    return {x, *residual};
  }

 private:
  void all_reduce(torch::Tensor& t) {
    if (shm_ != nullptr) {
      shm_->all_reduce_raw(t.data_ptr<float>(), t.numel());
    } else if (!reduce_.is_none()) {
      reduce_(t);
    }
  }

  Workspace& workspace(int64_t n, const torch::Tensor& like) {
    auto it = workspaces_.find(n);
    if (it != workspaces_.end()) return it->second;
    const LayerSpec& l = layers_.front();  // every layer of a Llama-family model has the same shapes
    auto buf = [&](int64_t cols) { return torch::empty({n, cols}, like.options()); };
    Workspace ws{buf(like.size(1)), buf(out_features(l.qkv)), torch::empty({n, h_, d_}, like.options()),
                 buf(out_features(l.o)), buf(out_features(l.gate_up)), buf(out_features(l.gate_up) / 2),
                 buf(out_features(l.down)), {}};
    return workspaces_.emplace(n, std::move(ws)).first->second;
  }

  int64_t h_, h_kv_, d_;
  double eps_;
  std::vector<LayerSpec> layers_;
  std::map<int64_t, Workspace> workspaces_;
  ShmComm* shm_ = nullptr;
  pybind11::object reduce_ = pybind11::none();  // by row count (decode batches of 1 .. max_rows requests)
};

void register_decode_step(pybind11::module& m) {
  pybind11::class_<DecodeProgram>(m, "DecodeProgram", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodeProgram::add_layer, pybind11::arg("w_in"), pybind11::arg("w_post"),
           pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("scale"), pybind11::arg("view"),
           pybind11::arg("qkv"), pybind11::arg("o"), pybind11::arg("gate_up"), pybind11::arg("down"),
           pybind11::arg("k_scale") = pybind11::none(), pybind11::arg("v_scale") = pybind11::none(),
           pybind11::arg("k_chan") = pybind11::none(), pybind11::arg("v_chan") = pybind11::none())
      .def("set_all_reduce", &DecodeProgram::set_all_reduce, pybind11::arg("comm"))
      .def("run", &DecodeProgram::run);
}
