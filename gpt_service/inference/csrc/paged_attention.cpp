// Decode attention over the paged KV cache, read in place: gpt_service_paged::decode (see attention_kernel.py).
//
// Each row (a decoding sequence: one query token) attends to its first `lengths[row]` cached tokens, found
// through its block table in a pool laid out [kv_heads, blocks, block_size, head_dim]. One task per (row, kv
// head), over PyTorch's thread pool: the query heads that share the kv head are scored against each key block
// (widened to float32 once), softmaxed in float32, and summed over the value blocks. Same maths as the
// models' eager attention (scores, softmax and sums in float32); the output in the query's dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

template <typename T, int64_t DIM>
void decode(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* lengths, T* out,
            int64_t rows, int64_t heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_dim,
            int64_t width, float scaling) {
  const int64_t group = heads / kv_heads, dim = DIM ? DIM : head_dim;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), block_buf(block_size * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kv_heads, head = item % kv_heads, length = lengths[row];
      const int64_t* table = tables + row * width;
      const T* k_base = keys + head * num_blocks * block_size * dim;
      const T* v_base = values + head * num_blocks * block_size * dim;
      const T* q_row = q + (row * heads + head * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) query[i] = widen(q_row[i]) * scaling;
      scores.resize(group * length);
      // Keys, block by block: each block's rows widened to float once, then dotted with every query head.
      for (int64_t t = 0, b = 0; t < length; ++b) {
        const int64_t n = std::min(block_size, length - t);
        const T* k = k_base + table[b] * block_size * dim;
        if (t + n < length) prefetch(k_base + table[b + 1] * block_size * dim, block_size * dim);
        for (int64_t i = 0; i < n * dim; ++i) block_buf[i] = widen(k[i]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          float* sg = scores.data() + g * length + t;
          for (int64_t j = 0; j < n; ++j) {
            const float* kj = block_buf.data() + j * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qg[d] * kj[d];
            sg[j] = s;
          }
        }
        t += n;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * length;
        const float top = *std::max_element(sg, sg + length);
        float sum = 0.f;
        for (int64_t t = 0; t < length; ++t) sum += (sg[t] = std::exp(sg[t] - top));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < length; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0, b = 0; t < length; ++b) {
        const int64_t n = std::min(block_size, length - t);
        const T* v = v_base + table[b] * block_size * dim;
        if (t + n < length) prefetch(v_base + table[b + 1] * block_size * dim, block_size * dim);
        for (int64_t i = 0; i < n * dim; ++i) block_buf[i] = widen(v[i]);
        for (int64_t g = 0; g < group; ++g) {
          const float* pg = scores.data() + g * length + t;
          float* ag = acc.data() + g * dim;
          for (int64_t j = 0; j < n; ++j) {
            const float p = pg[j];
            const float* vj = block_buf.data() + j * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ag[d] += p * vj[d];
          }
        }
        t += n;
      }
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

}  // namespace

TORCH_LIBRARY(gpt_service_paged, m) {
  m.def("decode(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor lengths, float scaling) -> Tensor");
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
