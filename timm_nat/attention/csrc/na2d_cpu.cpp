// Fused 2-D neighborhood attention with relative positional bias on CPU, forward and backward.
//
// Legacy NATTEN (<= 0.17) semantics, as timm_nat/attention/windows.py states them: each axis is
// split into dilation groups; in a group of length n the window of sub-position p starts at
// clamp(p - K/2, 0, n - K); the bias of a neighbour is rpb[K - 1 + (key - query) / dilation].
// Every query touches only its own kh*kw keys. Layout [batch, height, width, heads, head_dim],
// any strides with a contiguous head_dim. Computation in float (or double), vectorised over
// head_dim and over the window with ATen's Vectorized, parallel over (batch, row).
//
// Backward: probabilities are recomputed from the saved logsumexp; the query pass computes dq
// and drpb (per-thread partial tables) and stores p and dlogits ([.., kh*kw], linear in the
// map); the key pass gathers dk and dv over each key's inverse neighbourhood (the queries whose
// windows hold it), so every thread writes disjoint rows: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// Window of every position of one axis, and its inverse (for each key, the queries that see it).
struct AxisWindows {
  int64_t kernel, dilation;
  std::vector<int64_t> first_key;   // [length]: first key position of the query's window
  std::vector<int64_t> first_bias;  // [length]: rpb index of that key along this axis
  std::vector<int64_t> inverse_begin;  // [length + 1]: CSR offsets into inverse_query/_slot
  std::vector<int64_t> inverse_query, inverse_slot;  // query position, and the key's slot in its window

  AxisWindows(int64_t length, int64_t kernel_, int64_t dilation_) : kernel(kernel_), dilation(dilation_) {
    first_key.resize(length);
    first_bias.resize(length);
    std::vector<int64_t> count(length, 0);
    for (int64_t pos = 0; pos < length; ++pos) {
      const int64_t group = pos % dilation, sub = pos / dilation;
      const int64_t sub_length = (length - group + dilation - 1) / dilation;
      const int64_t start = std::min(std::max<int64_t>(sub - kernel / 2, 0), sub_length - kernel);
      first_key[pos] = group + dilation * start;
      first_bias[pos] = start - sub + kernel - 1;
      for (int64_t slot = 0; slot < kernel; ++slot) ++count[first_key[pos] + dilation * slot];
    }
    inverse_begin.assign(length + 1, 0);
    for (int64_t pos = 0; pos < length; ++pos) inverse_begin[pos + 1] = inverse_begin[pos] + count[pos];
    inverse_query.resize(inverse_begin[length]);
    inverse_slot.resize(inverse_begin[length]);
    std::vector<int64_t> fill(inverse_begin.begin(), inverse_begin.end() - 1);
    for (int64_t pos = 0; pos < length; ++pos) {
      for (int64_t slot = 0; slot < kernel; ++slot) {
        const int64_t at = fill[first_key[pos] + dilation * slot]++;
        inverse_query[at] = pos;
        inverse_slot[at] = slot;
      }
    }
  }
};

// Element strides of a [B, H, W, heads, D] tensor (D contiguous).
struct Strided {
  int64_t b, h, w, n;
  explicit Strided(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), w(t.stride(2)), n(t.stride(3)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t wi, int64_t ni) const { return bi * b + hi * h + wi * w + ni * n; }
};

// Horizontal sum / max of a vector through vec_reduce_all, which every torch >= 2.11 has
// (Vectorized::reduce_add / reduce_max are newer). maximum propagates NaN, as the softmax needs.
template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline T dot_n(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  if (d < n) acc = at::vec::fmadd(Vec::loadu(a + d, n - d), Vec::loadu(b + d, n - d), acc);
  return hsum(acc);
}

// One head_dim vector. NV > 0: head_dim == NV * Vec::size(), held in registers (the common
// head_dim 32 is NV = 2 on AVX-512); NV == 0: any head_dim, in a buffer.
template <typename T, int NV>
struct HeadVec {
  using Vec = Vectorized<T>;
  Vec r[NV];
  explicit HeadVec(int64_t) {}
  void zero() { for (int e = 0; e < NV; ++e) r[e] = Vec(T(0)); }
  void load(const T* x, T alpha) { for (int e = 0; e < NV; ++e) r[e] = Vec::loadu(x + e * Vec::size()) * Vec(alpha); }
  T dot(const T* x) const {
    Vec acc = r[0] * Vec::loadu(x);
    for (int e = 1; e < NV; ++e) acc = at::vec::fmadd(r[e], Vec::loadu(x + e * Vec::size()), acc);
    return hsum(acc);
  }
  void axpy(T alpha, const T* x) {  // this += alpha * x
    const Vec a(alpha);
    for (int e = 0; e < NV; ++e) r[e] = at::vec::fmadd(a, Vec::loadu(x + e * Vec::size()), r[e]);
  }
  void store(T* y, T alpha) const { for (int e = 0; e < NV; ++e) (r[e] * Vec(alpha)).store(y + e * Vec::size()); }
};

template <typename T>
struct HeadVec<T, 0> {
  using Vec = Vectorized<T>;
  std::vector<T> r;
  explicit HeadVec(int64_t dim) : r(dim) {}
  void zero() { std::fill(r.begin(), r.end(), T(0)); }
  void load(const T* x, T alpha) { for (size_t d = 0; d < r.size(); ++d) r[d] = x[d] * alpha; }
  T dot(const T* x) const { return dot_n(r.data(), x, static_cast<int64_t>(r.size())); }
  void axpy(T alpha, const T* x) {
    const Vec a(alpha);
    const int64_t n = r.size();
    T* y = r.data();
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(a, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
    if (d < n) at::vec::fmadd(a, Vec::loadu(x + d, n - d), Vec::loadu(y + d, n - d)).store(y + d, n - d);
  }
  void store(T* y, T alpha) const { for (size_t d = 0; d < r.size(); ++d) y[d] = r[d] * alpha; }
};

// Lanes the padded window is rounded to: every loop over it steps by Vectorized<T>::size() and
// must end exactly at padded_window.
constexpr int64_t kWindowLanes = 16;
static_assert(kWindowLanes >= Vectorized<float>::size() && kWindowLanes % Vectorized<float>::size() == 0,
              "the padded window must be a whole number of float vectors");
static_assert(kWindowLanes >= Vectorized<double>::size() && kWindowLanes % Vectorized<double>::size() == 0,
              "the padded window must be a whole number of double vectors");

// Everything one call needs about the problem.
struct Problem {
  int64_t batch, height, width, heads, dim, kh, kw, window, padded_window, bias_h, bias_w;
  AxisWindows rows, cols;
  Problem(const at::Tensor& q, at::IntArrayRef kernel, at::IntArrayRef dilation)
      : batch(q.size(0)), height(q.size(1)), width(q.size(2)), heads(q.size(3)), dim(q.size(4)),
        kh(kernel[0]), kw(kernel[1]), window(kernel[0] * kernel[1]),
        padded_window((kernel[0] * kernel[1] + kWindowLanes - 1) / kWindowLanes * kWindowLanes),
        bias_h(2 * kernel[0] - 1), bias_w(2 * kernel[1] - 1),
        rows(q.size(1), kernel[0], dilation[0]), cols(q.size(2), kernel[1], dilation[1]) {}
  // Flat index of query (b, i, j, head) in [B, H, W, heads] (the logsumexp's layout).
  int64_t query_index(int64_t b, int64_t i, int64_t j, int64_t head) const {
    return ((b * height + i) * width + j) * heads + head;
  }
};

// logits[slot] = (scale * q) . k[slot] + rpb[slot] for the window of query (b, i, j, head).
template <typename T, int NV>
inline void window_logits(const Problem& p, const HeadVec<T, NV>& scaled_q, const T* key, const Strided& ks,
                          const T* rpb, int64_t b, int64_t i, int64_t j, int64_t head, T* logits) {
  const int64_t r0 = p.rows.first_key[i], c0 = p.cols.first_key[j];
  const int64_t row_step = p.rows.dilation * ks.h, col_step = p.cols.dilation * ks.w;
  const T* bias = rpb ? rpb + (head * p.bias_h + p.rows.first_bias[i]) * p.bias_w + p.cols.first_bias[j] : nullptr;
  const T* key_row = key + ks.at(b, r0, c0, head);
  for (int64_t ti = 0; ti < p.kh; ++ti, key_row += row_step) {
    for (int64_t tj = 0; tj < p.kw; ++tj) {
      const T s = scaled_q.dot(key_row + tj * col_step);
      logits[ti * p.kw + tj] = bias ? s + bias[ti * p.bias_w + tj] : s;
    }
  }
}

// probs = exp(logits - shift) over the padded window (padding holds -inf, so exp gives 0); returns the sum.
template <typename T>
inline T exp_shifted(const T* logits, T shift, T* probs, int64_t padded) {
  using Vec = Vectorized<T>;
  Vec total(T(0));
  const Vec s(shift);
  for (int64_t t = 0; t < padded; t += Vec::size()) {
    Vec e = (Vec::loadu(logits + t) - s).exp();
    e.store(probs + t);
    total = total + e;
  }
  return hsum(total);
}

template <typename T>
inline T max_of(const T* x, int64_t padded) {
  using Vec = Vectorized<T>;
  Vec m(-std::numeric_limits<T>::infinity());
  for (int64_t t = 0; t < padded; t += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + t));  // NaN propagates
  return hmax(m);
}

template <typename T, int NV>
void forward_kernel(const Problem& p, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const T* rpb, T scale, at::Tensor& out, at::Tensor& lse) {
  const Strided qs(query), ks(key), vs(value), os(out);
  const T* q = query.const_data_ptr<T>();
  const T* k = key.const_data_ptr<T>();
  const T* v = value.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  T* l = lse.mutable_data_ptr<T>();
  const int64_t row_step = p.rows.dilation * vs.h, col_step = p.cols.dilation * vs.w;
  at::parallel_for(0, p.batch * p.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> logits(p.padded_window, -std::numeric_limits<T>::infinity()), probs(p.padded_window);
    HeadVec<T, NV> scaled_q(p.dim), acc(p.dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.height, i = row % p.height;
      for (int64_t j = 0; j < p.width; ++j) {
        for (int64_t head = 0; head < p.heads; ++head) {
          scaled_q.load(q + qs.at(b, i, j, head), scale);
          window_logits(p, scaled_q, k, ks, rpb, b, i, j, head, logits.data());
          const T shift = max_of(logits.data(), p.padded_window);
          const T total = exp_shifted(logits.data(), shift, probs.data(), p.padded_window);
          acc.zero();
          const T* value_row = v + vs.at(b, p.rows.first_key[i], p.cols.first_key[j], head);
          for (int64_t ti = 0; ti < p.kh; ++ti, value_row += row_step)
            for (int64_t tj = 0; tj < p.kw; ++tj) acc.axpy(probs[ti * p.kw + tj], value_row + tj * col_step);
          acc.store(o + os.at(b, i, j, head), T(1) / total);
          l[p.query_index(b, i, j, head)] = shift + std::log(total);
        }
      }
    }
  });
}

template <typename T, int NV>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, const T* rpb, T scale,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& drpb) {
  const Strided gs(grad_out), qs(query), ks(key), vs(value), os(out), dqs(dq), dks(dk), dvs(dv);
  const T* g = grad_out.const_data_ptr<T>();
  const T* q = query.const_data_ptr<T>();
  const T* k = key.const_data_ptr<T>();
  const T* v = value.const_data_ptr<T>();
  const T* o = out.const_data_ptr<T>();
  const T* l = lse.const_data_ptr<T>();
  const int64_t pairs = p.batch * p.height * p.width * p.heads * p.window;
  // [B, H, W, heads, kh*kw]; tensors, so that allocation tracking (the profiler) sees them
  at::Tensor probs_tensor = at::empty({pairs}, query.options()), dlogits_tensor = at::empty({pairs}, query.options());
  T* probs_all = probs_tensor.mutable_data_ptr<T>();
  T* dlogits_all = dlogits_tensor.mutable_data_ptr<T>();
  const bool with_bias_grad = drpb.numel() > 0;
  const int64_t bias_numel = p.heads * p.bias_h * p.bias_w;
  // One drpb partial table per chunk of rows (chunks, not threads, own them: no races however
  // the pool maps chunks to threads), summed in chunk order: deterministic.
  const int64_t rows_total = p.batch * p.height;
  const int64_t chunks = std::min<int64_t>(std::max(at::get_num_threads(), 1), rows_total);
  const int64_t rows_per_chunk = (rows_total + chunks - 1) / chunks;
  std::vector<T> bias_partial(with_bias_grad ? chunks * bias_numel : 0, T(0));
  const int64_t key_row_step = p.rows.dilation * ks.h, key_col_step = p.cols.dilation * ks.w;
  const int64_t value_row_step = p.rows.dilation * vs.h, value_col_step = p.cols.dilation * vs.w;

  // Query pass: dq, drpb, and the window's p and dlogits for the key pass.
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<T> logits(p.padded_window, -std::numeric_limits<T>::infinity()), probs(p.padded_window);
    HeadVec<T, NV> scaled_q(p.dim), grad(p.dim), dq_acc(p.dim);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      T* chunk_bias = with_bias_grad ? bias_partial.data() + chunk * bias_numel : nullptr;
      const int64_t begin = chunk * rows_per_chunk, end = std::min(rows_total, begin + rows_per_chunk);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / p.height, i = row % p.height;
        for (int64_t j = 0; j < p.width; ++j) {
          for (int64_t head = 0; head < p.heads; ++head) {
            const int64_t query_index = p.query_index(b, i, j, head);
            scaled_q.load(q + qs.at(b, i, j, head), scale);
            window_logits(p, scaled_q, k, ks, rpb, b, i, j, head, logits.data());
            exp_shifted(logits.data(), l[query_index], probs.data(), p.padded_window);
            grad.load(g + gs.at(b, i, j, head), T(1));
            const T delta = grad.dot(o + os.at(b, i, j, head));
            dq_acc.zero();
            T* p_out = probs_all + query_index * p.window;
            T* ds_out = dlogits_all + query_index * p.window;
            T* bias = chunk_bias ? chunk_bias + (head * p.bias_h + p.rows.first_bias[i]) * p.bias_w +
                                       p.cols.first_bias[j] : nullptr;
            const T* key_row = k + ks.at(b, p.rows.first_key[i], p.cols.first_key[j], head);
            const T* value_row = v + vs.at(b, p.rows.first_key[i], p.cols.first_key[j], head);
            for (int64_t ti = 0; ti < p.kh; ++ti, key_row += key_row_step, value_row += value_row_step) {
              for (int64_t tj = 0; tj < p.kw; ++tj) {
                const int64_t slot = ti * p.kw + tj;
                const T prob = probs[slot];
                const T ds = prob * (grad.dot(value_row + tj * value_col_step) - delta);
                dq_acc.axpy(ds, key_row + tj * key_col_step);
                p_out[slot] = prob;
                ds_out[slot] = ds;
                if (bias) bias[ti * p.bias_w + tj] += ds;
              }
            }
            dq_acc.store(dq.mutable_data_ptr<T>() + dqs.at(b, i, j, head), scale);
          }
        }
      }
    }
  });

  // Key pass: every key gathers from the queries whose windows hold it.
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    HeadVec<T, NV> dk_acc(p.dim), dv_acc(p.dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.height, r = row % p.height;
      for (int64_t c = 0; c < p.width; ++c) {
        for (int64_t head = 0; head < p.heads; ++head) {
          dk_acc.zero();
          dv_acc.zero();
          for (int64_t a = p.rows.inverse_begin[r]; a < p.rows.inverse_begin[r + 1]; ++a) {
            const int64_t i = p.rows.inverse_query[a], ti = p.rows.inverse_slot[a];
            for (int64_t e = p.cols.inverse_begin[c]; e < p.cols.inverse_begin[c + 1]; ++e) {
              const int64_t j = p.cols.inverse_query[e], tj = p.cols.inverse_slot[e];
              const int64_t pair = p.query_index(b, i, j, head) * p.window + ti * p.kw + tj;
              dv_acc.axpy(probs_all[pair], g + gs.at(b, i, j, head));
              dk_acc.axpy(dlogits_all[pair], q + qs.at(b, i, j, head));
            }
          }
          dk_acc.store(dk.mutable_data_ptr<T>() + dks.at(b, r, c, head), scale);
          dv_acc.store(dv.mutable_data_ptr<T>() + dvs.at(b, r, c, head), T(1));
        }
      }
    }
  });

  if (with_bias_grad) {
    T* out_bias = drpb.mutable_data_ptr<T>();
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t e = 0; e < bias_numel; ++e) out_bias[e] += bias_partial[chunk * bias_numel + e];
  }
}

// Calls fn.template operator()<NV>() with head_dim in registers where it fits (float: 1, 2 or 4
// vectors), else the any-head_dim path.
template <typename T, typename Fn>
void with_head_vectors(int64_t dim, Fn&& fn) {
  constexpr int64_t lanes = Vectorized<T>::size();
  if constexpr (std::is_same_v<T, float>) {
    if (dim == lanes) return fn.template operator()<1>();
    if (dim == 2 * lanes) return fn.template operator()<2>();
    if (dim == 4 * lanes) return fn.template operator()<4>();
  }
  fn.template operator()<0>();
}

at::Tensor head_dim_contiguous(const at::Tensor& t) { return t.stride(4) == 1 ? t : t.contiguous(); }

// The ops are public (torch.ops.timm_nat_na2d.*): every argument is checked here, before any
// pointer is read, so that no call can read or write out of bounds.
void check_map(const char* name, const at::Tensor& t, const at::Tensor& query) {
  TORCH_CHECK(t.defined(), "timm_nat_na2d: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "timm_nat_na2d: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), "timm_nat_na2d: ", name, " must have query's dtype ",
              query.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == query.sizes(), "timm_nat_na2d: ", name, " must have query's shape ", query.sizes(),
              ", got ", t.sizes());
}

void check(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
           const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel, at::IntArrayRef dilation) {
  TORCH_CHECK(query.defined() && query.dim() == 5, "timm_nat_na2d: query must be [B, H, W, heads, D], got ",
              query.defined() ? query.sizes() : at::IntArrayRef{});
  TORCH_CHECK(query.device().is_cpu(), "timm_nat_na2d: query must be on the CPU, got ", query.device());
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "timm_nat_na2d: query must be float32 or float64, got ", query.scalar_type());
  check_map("key", key, query);
  check_map("value", value, query);
  TORCH_CHECK(kernel.size() == 2, "timm_nat_na2d: kernel_size must have 2 entries, got ", kernel);
  TORCH_CHECK(dilation.size() == 2, "timm_nat_na2d: dilation must have 2 entries, got ", dilation);
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t size = query.size(1 + axis);
    TORCH_CHECK(kernel[axis] >= 1, "timm_nat_na2d: kernel_size must be >= 1, got ", kernel);
    TORCH_CHECK(dilation[axis] >= 1, "timm_nat_na2d: dilation must be >= 1, got ", dilation);
    // kernel * dilation <= size, written so that the product cannot overflow
    TORCH_CHECK(kernel[axis] <= size / dilation[axis], "timm_nat_na2d: ", axis == 0 ? "height " : "width ", size,
                " is smaller than kernel_size * dilation (kernel_size ", kernel, ", dilation ", dilation, ")");
  }
  if (rpb.has_value()) {
    const at::Tensor& table = *rpb;
    const std::vector<int64_t> expected{query.size(3), 2 * kernel[0] - 1, 2 * kernel[1] - 1};
    TORCH_CHECK(table.defined() && table.sizes() == at::IntArrayRef(expected),
                "timm_nat_na2d: rpb must be [heads, 2*kh-1, 2*kw-1] = ", at::IntArrayRef(expected), ", got ",
                table.defined() ? table.sizes() : at::IntArrayRef{});
    TORCH_CHECK(table.device().is_cpu(), "timm_nat_na2d: rpb must be on the CPU, got ", table.device());
    TORCH_CHECK(table.scalar_type() == query.scalar_type(), "timm_nat_na2d: rpb must have query's dtype ",
                query.scalar_type(), ", got ", table.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> na2d_forward(const at::Tensor& query_, const at::Tensor& key_,
                                                const at::Tensor& value_, const std::optional<at::Tensor>& rpb_,
                                                at::IntArrayRef kernel, at::IntArrayRef dilation, double scale) {
  check(query_, key_, value_, rpb_, kernel, dilation);
  const at::Tensor query = head_dim_contiguous(query_), key = head_dim_contiguous(key_),
                   value = head_dim_contiguous(value_);
  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse = at::empty(query.sizes().slice(0, 4), query.options());
  if (query.numel() == 0) return {out, lse};
  const Problem problem(query, kernel, dilation);
  const at::Tensor rpb = rpb_.has_value() ? rpb_->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "na2d_cpu_forward", [&] {
    with_head_vectors<scalar_t>(problem.dim, [&]<int NV>() {
      forward_kernel<scalar_t, NV>(problem, query, key, value,
                                   rpb.defined() ? rpb.const_data_ptr<scalar_t>() : nullptr,
                                   static_cast<scalar_t>(scale), out, lse);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_backward(
    const at::Tensor& grad_out_, const at::Tensor& query_, const at::Tensor& key_, const at::Tensor& value_,
    const at::Tensor& out_, const at::Tensor& lse, const std::optional<at::Tensor>& rpb_, at::IntArrayRef kernel,
    at::IntArrayRef dilation, double scale, bool rpb_grad) {
  check(query_, key_, value_, rpb_, kernel, dilation);
  check_map("grad_out", grad_out_, query_);
  check_map("out", out_, query_);
  TORCH_CHECK(lse.defined() && lse.sizes() == query_.sizes().slice(0, 4),
              "timm_nat_na2d: lse must be [B, H, W, heads] = ", query_.sizes().slice(0, 4), ", got ",
              lse.defined() ? lse.sizes() : at::IntArrayRef{});
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == query_.scalar_type(),
              "timm_nat_na2d: lse must be a CPU tensor of query's dtype ", query_.scalar_type(), ", got ",
              lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.is_contiguous(), "timm_nat_na2d: lse must be contiguous, got strides ", lse.strides());
  const at::Tensor query = head_dim_contiguous(query_), key = head_dim_contiguous(key_),
                   value = head_dim_contiguous(value_), out = head_dim_contiguous(out_),
                   grad_out = head_dim_contiguous(grad_out_);
  at::Tensor dq = at::empty(query.sizes(), query.options());
  at::Tensor dk = at::empty(query.sizes(), query.options());
  at::Tensor dv = at::empty(query.sizes(), query.options());
  const at::Tensor rpb = rpb_.has_value() ? rpb_->contiguous() : at::Tensor();
  at::Tensor drpb = rpb.defined() && rpb_grad ? at::zeros(rpb.sizes(), rpb.options())
                                             : at::empty({0}, query.options());  // size 0: not asked for
  if (query.numel() == 0) return {dq, dk, dv, drpb};
  const Problem problem(query, kernel, dilation);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "na2d_cpu_backward", [&] {
    with_head_vectors<scalar_t>(problem.dim, [&]<int NV>() {
      backward_kernel<scalar_t, NV>(problem, grad_out, query, key, value, out, lse,
                                    rpb.defined() ? rpb.const_data_ptr<scalar_t>() : nullptr,
                                    static_cast<scalar_t>(scale), dq, dk, dv, drpb);
    });
  });
  return {dq, dk, dv, drpb};
}

}  // namespace

// The schemas are defined once, in Python (timm_nat/attention/cpu_fused.py _SCHEMAS, next to the
// fake kernels); the dispatcher checks these implementations' signatures against them.
TORCH_LIBRARY_IMPL(timm_nat_na2d, CPU, m) {
  m.impl("forward", &na2d_forward);
  m.impl("backward", &na2d_backward);
}
