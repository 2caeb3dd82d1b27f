// The engine's CPU operators (library gpt_service_cpu; built and loaded by cpu_kernels.py):
//
// decode: attention over the paged KV cache, read in place. Each row (a decoding sequence: one query token)
//   attends to its first `lengths[row]` cached tokens, found through its block table in a pool laid out
//   [kv_heads, blocks, block_size, head_dim]. One task per (row, kv head), over PyTorch's thread pool: the query
//   heads that share the kv head are scored against each key block (widened to float32 once), softmaxed in
//   float32, and summed over the value blocks.
// rms_norm, add_rms_norm_: Llama's RMSNorm (x * rsqrt(mean(x^2) + eps) in float32, rounded, times the weight),
//   the second after adding a residual in place: one pass over the rows instead of eight operators.
// rotary_: the rotary embedding of the query and key heads in place (x * cos + rotate_half(x) * sin).
// decode_layers: every decoder layer of a decode step (one token per row, each with its LoRA adapter if any) in
//   one call, with the operators above, oneDNN's products over the weights laid out for it, and the keys and
//   values stored at their slots: FastDecoder.forward's loop without a return to Python, and so to the GIL,
//   between operators.
//
// Each is the maths of the models' own eager code in float32, rounded once to the tensors' dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(at::Half x) { return static_cast<float>(x); }

// A block's rows are contiguous, but blocks lie anywhere in the pool: fetching the next one while this one is
// read hides the memory latency that the hardware's prefetcher cannot guess.
template <typename T>
inline void prefetch(const T* start, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

// Calls visit(t, n) for each block of a row's first `length` tokens in turn, its n tokens (from the t-th)
// widened to float32 into `buffer` first, and the next block prefetched.
template <typename T, typename Visit>
inline void for_each_block(const T* base, const int64_t* table, int64_t length, int64_t block_size, int64_t dim,
                           float* buffer, Visit visit) {
  for (int64_t t = 0, b = 0; t < length; t += block_size, ++b) {
    const int64_t n = std::min(block_size, length - t);
    const T* rows = base + table[b] * block_size * dim;
    if (t + n < length) prefetch(base + table[b + 1] * block_size * dim, block_size * dim);
    for (int64_t i = 0; i < n * dim; ++i) buffer[i] = widen(rows[i]);
    visit(t, n);
  }
}

template <typename T, int64_t DIM>
void decode(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* lengths, T* out,
            int64_t rows, int64_t heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_dim,
            int64_t width, float scaling) {
  const int64_t group = heads / kv_heads, dim = DIM ? DIM : head_dim;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), buffer(block_size * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kv_heads, head = item % kv_heads, length = lengths[row];
      const int64_t* table = tables + row * width;
      const T* k_base = keys + head * num_blocks * block_size * dim;
      const T* v_base = values + head * num_blocks * block_size * dim;
      const T* q_row = q + (row * heads + head * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) query[i] = widen(q_row[i]) * scaling;
      scores.resize(group * length);
      // Keys: each block's rows dotted with every query head that shares them.
      for_each_block(k_base, table, length, block_size, dim, buffer.data(), [&](int64_t t, int64_t n) {
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          for (int64_t j = 0; j < n; ++j) {
            const float* kj = buffer.data() + j * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qg[d] * kj[d];
            scores[g * length + t + j] = s;
          }
        }
      });
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * length;
        const float top = *std::max_element(sg, sg + length);
        float sum = 0.f;
        for (int64_t t = 0; t < length; ++t) sum += (sg[t] = std::exp(sg[t] - top));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < length; ++t) sg[t] *= inv;
      }
      // Values: each block's rows summed into every query head's output, weighted by its probabilities.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_block(v_base, table, length, block_size, dim, buffer.data(), [&](int64_t t, int64_t n) {
        for (int64_t g = 0; g < group; ++g) {
          float* ag = acc.data() + g * dim;
          for (int64_t j = 0; j < n; ++j) {
            const float p = scores[g * length + t + j];
            const float* vj = buffer.data() + j * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ag[d] += p * vj[d];
          }
        }
      });
      T* o = out + (row * heads + head * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& tables,
                        const at::Tensor& lengths, double scaling) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && keys.sizes() == values.sizes(), "q [rows, heads, dim], pools [kv_heads, blocks, block_size, dim]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(), "one dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "int64 tables and lengths");
  auto qc = q.contiguous(), tc = tables.contiguous(), lc = lengths.contiguous();
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "contiguous pools");
  auto out = at::empty_like(qc);
  const int64_t rows = qc.size(0), heads = qc.size(1), dim = qc.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    auto run = dim == 64 ? decode<scalar_t, 64> : dim == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(qc.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), tc.data_ptr<int64_t>(),
        lc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), rows, heads, keys.size(0), keys.size(1), keys.size(2), dim,
        tc.size(1), static_cast<float>(scaling));
  });
  return out;
}

template <typename T>
void normalize_rows(T* x, const T* residual, const T* weight, T* out, int64_t rows, int64_t width, int64_t stride,
                    float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(width);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * stride;
      float squares = 0.f;
      for (int64_t i = 0; i < width; ++i) {
        if (residual != nullptr) xr[i] = static_cast<T>(widen(xr[i]) + widen(residual[r * width + i]));
        h[i] = widen(xr[i]);
        squares += h[i] * h[i];
      }
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      T* o = out + r * width;
      for (int64_t i = 0; i < width; ++i) o[i] = static_cast<T>(widen(weight[i]) * widen(static_cast<T>(h[i] * scale)));
    }
  });
}

at::Tensor norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "x [rows, width] with contiguous rows, weight [width]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "weight: contiguous, x's dtype");
  at::Tensor delta;
  if (residual.has_value()) {
    delta = residual->contiguous();
    TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(), "residual: x's shape and dtype");
  }
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    normalize_rows<scalar_t>(x.data_ptr<scalar_t>(), delta.defined() ? delta.data_ptr<scalar_t>() : nullptr,
                             weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0),
                             static_cast<float>(eps));
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return norm(x, c10::nullopt, weight, eps); }

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  return norm(x, residual, weight, eps);
}

template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim, int64_t stride) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + t * stride + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = widen(v[i]), b = widen(v[i + half]);
          v[i] = static_cast<T>(a * widen(c[i]) - b * widen(s[i]));
          v[i + half] = static_cast<T>(b * widen(c[i + half]) + a * widen(s[i + half]));
        }
      }
    }
  });
}

at::Tensor& rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "x [tokens, heads, head_dim] with contiguous heads of an even size");
  auto c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.numel() == x.size(0) * x.size(2) && s.numel() == c.numel(), "cos and sin: [tokens, head_dim]");
  TORCH_CHECK(c.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(), "cos and sin: x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    rotate<scalar_t>(x.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), x.size(0), x.size(1),
                     x.size(2), x.stride(0));
  });
  return x;
}

// Store each token's keys (or values), [tokens, kv_heads, dim] with contiguous heads, at its slot of one layer's
// pool, [kv_heads, blocks * block_size, dim].
void store(const at::Tensor& rows, at::Tensor& pool, const int64_t* slots) {
  const int64_t tokens = rows.size(0), kv_heads = rows.size(1), bytes = rows.size(2) * rows.element_size();
  const int64_t pool_tokens = pool.size(1) * pool.size(2);
  TORCH_CHECK(pool.is_contiguous() && pool.scalar_type() == rows.scalar_type() && pool.size(3) == rows.size(2),
              "a contiguous pool of the keys' dtype and head size");
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(pool.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < pool_tokens, "slot ", slots[t], " is outside the pool's ", pool_tokens);
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(dst + (h * pool_tokens + slots[t]) * bytes, src + (t * rows.stride(0) + h * rows.stride(1)) *
                  rows.element_size(), bytes);
  }
}

// x times a weight laid out by torch.ops.mkldnn._reorder_linear_weight, plus the bias: oneDNN's product.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, weight, bias, "none", c10::List<c10::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

using Optionals = c10::List<c10::optional<at::Tensor>>;

// The LoRA adapters of a step's rows, as FastDecoder's Group applies them: per product, the A, B and scaling
// stacks of the adapters used (none where the product has no LoRA); the rows of each adapter gathered and padded
// to `width`, the real ones among them (`slots`, none: all) and their rows in the batch.
struct Adapters {
  const Optionals &a, &b, &scaling;
  const c10::optional<at::Tensor> &gather, &slots, &rows;
  int64_t width;
};

// Product `i` of the layers (weights laid out for oneDNN) for x, plus its LoRA rows' updates.
at::Tensor project(const at::Tensor& x, int64_t i, at::TensorList weights, const Optionals& biases,
                   const Adapters& lora) {
  at::Tensor out = packed_linear(x, weights[i], biases.get(i));
  const c10::optional<at::Tensor> a = lora.a.get(i);
  if (!a.has_value() || !lora.gather.has_value()) return out;
  at::Tensor picked = x.index_select(0, *lora.gather).to(a->scalar_type()).view({a->size(0), lora.width, -1});
  at::Tensor delta = at::bmm(at::bmm(picked, *a) * *lora.scaling.get(i), *lora.b.get(i)).view({-1, out.size(1)});
  if (lora.slots.has_value()) delta = delta.index_select(0, *lora.slots);
  return out.index_add_(0, *lora.rows, delta.to(out.scalar_type()));
}

// weights and biases: per layer, the q/k/v, o, gate/up and down products; norms and eps: per layer, the input and
// post-attention norms; lora_*: see Adapters. Returns `hidden` (the embeddings, [rows, width]) updated in place by
// every layer.
at::Tensor decode_layers(at::Tensor hidden, at::TensorList weights, const Optionals& biases, at::TensorList norms,
                         at::ArrayRef<double> eps, const at::Tensor& cos, const at::Tensor& sin, at::TensorList keys,
                         at::TensorList values, const at::Tensor& slots, const at::Tensor& tables,
                         const at::Tensor& lengths, double scaling, int64_t heads, int64_t kv_heads,
                         const Optionals& lora_a, const Optionals& lora_b, const Optionals& lora_scaling,
                         const c10::optional<at::Tensor>& lora_gather, const c10::optional<at::Tensor>& lora_slots,
                         const c10::optional<at::Tensor>& lora_rows, int64_t lora_width) {
  const int64_t layers = keys.size(), rows = hidden.size(0), dim = keys[0].size(3);
  TORCH_CHECK(weights.size() == 4 * layers && biases.size() == 4 * layers && norms.size() == 2 * layers &&
              eps.size() == 2 * layers && values.size() == layers, "four products and two norms a layer");
  TORCH_CHECK(lora_a.size() == 4 * layers && lora_b.size() == 4 * layers && lora_scaling.size() == 4 * layers &&
              (!lora_gather.has_value() || lora_rows.has_value()), "LoRA stacks for each product, rows with a gather");
  const Adapters lora{lora_a, lora_b, lora_scaling, lora_gather, lora_slots, lora_rows, lora_width};
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && slots.scalar_type() == at::kLong &&
              slots.is_contiguous() && slots.numel() == rows, "hidden [rows, width], a slot per row");
  const auto c = cos.reshape({rows, -1}), s = sin.reshape({rows, -1});
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::Tensor x = norm(hidden, c10::nullopt, norms[0], eps[0]);
  for (int64_t i = 0; i < layers; ++i) {
    at::Tensor qkv = project(x, 4 * i, weights, biases, lora);
    at::Tensor rotated = qkv.narrow(1, 0, (heads + kv_heads) * dim).view({rows, heads + kv_heads, dim});
    rotary_(rotated, c, s);
    at::Tensor pool_keys = keys[i], pool_values = values[i];
    store(qkv.narrow(1, heads * dim, kv_heads * dim).view({rows, kv_heads, dim}), pool_keys, slot);
    store(qkv.narrow(1, (heads + kv_heads) * dim, kv_heads * dim).view({rows, kv_heads, dim}), pool_values, slot);
    at::Tensor q = qkv.narrow(1, 0, heads * dim).view({rows, heads, dim});
    at::Tensor attended = paged_decode(q, pool_keys, pool_values, tables, lengths, scaling).view({rows, -1});
    x = norm(hidden, project(attended, 4 * i + 1, weights, biases, lora), norms[2 * i + 1], eps[2 * i + 1]);
    at::Tensor gate_up = project(x, 4 * i + 2, weights, biases, lora);
    const int64_t half = gate_up.size(1) / 2;
    at::Tensor mlp = project(at::silu(gate_up.narrow(1, 0, half)) * gate_up.narrow(1, half, half), 4 * i + 3, weights,
                             biases, lora);
    if (i + 1 < layers) {
      x = norm(hidden, mlp, norms[2 * i + 2], eps[2 * i + 2]);
    } else {
      hidden.add_(mlp);
    }
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY(gpt_service_cpu, m) {
  m.def("decode(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor lengths, float scaling) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm_));
  m.def("decode_layers(Tensor(a!) hidden, Tensor[] weights, Tensor?[] biases, Tensor[] norms, float[] eps, Tensor cos, "
        "Tensor sin, Tensor(b!)[] keys, Tensor(c!)[] values, Tensor slots, Tensor tables, Tensor lengths, float scaling, "
        "int heads, int kv_heads, Tensor?[] lora_a, Tensor?[] lora_b, Tensor?[] lora_scaling, Tensor? lora_gather, "
        "Tensor? lora_slots, Tensor? lora_rows, int lora_width) -> Tensor(a!)");
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(rotary_));
  m.impl("decode_layers", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(decode_layers));  // its weights are MkldnnCPU
}
