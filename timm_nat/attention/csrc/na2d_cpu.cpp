// Fused 2-D neighborhood attention with relative positional bias on CPU, forward and backward.
//
// Legacy NATTEN (<= 0.17) semantics, as timm_nat/attention/windows.py states them: each axis is
// split into dilation groups; in a group of length n the window of sub-position p starts at
// clamp(p - K/2, 0, n - K); the bias of a neighbour is rpb[K - 1 + (key - query) / dilation].
// Every query touches only its own kh*kw keys. Layout [batch, height, width, heads, head_dim],
// any strides with a contiguous head_dim. float32, float64, bfloat16 and float16 are loaded and
// stored as they are; arithmetic is in float (double for float64), vectorised over head_dim and
// over the window with ATen's Vectorized, parallel over (batch, row). The logsumexp, the bias
// table and its gradient are in that accumulation type.
//
// Dot products: a window's keys are taken Vectorized::size() at a time, each dot product left as
// a vector of partial sums, and the group reduced at once by a transpose-and-add tree.
// (Visiting columns in dilation-group order, so that consecutive dilated queries share keys, was
// slower: the clamped windows of a group's queries all have their own bias window.)
//
// Backward: probabilities are recomputed from the saved logsumexp, and the softmax's
// delta = sum_slot p * (grad . v) is summed in the accumulation type (it needs no output, and
// bf16 outputs would round it). Work is split into (image, row dilation group, band of rows)
// tasks; a task walks its key rows in order, first computing each query row its next key row
// needs (dq, drpb into a per-task partial table, and the (p, dlogits) pairs of every slot, kept in
// a ring of the last few query rows), then gathering that key row's dk and dv over each key's
// inverse neighbourhood (the queries whose windows hold it) from the ring. Every output element
// has one owner: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::vec::Vectorized;

// The per-query and per-key steps are compiled as functions of their own: inlined into the loops
// of the whole pass, GCC kept their accumulators on the stack (a store and a load per step).
#if defined(_MSC_VER)
#define NA2D_NOINLINE __declspec(noinline)
#define NA2D_INLINE __forceinline
#else
#define NA2D_NOINLINE __attribute__((noinline))
#define NA2D_INLINE inline __attribute__((always_inline))
#endif

template <typename T>
using acc_t = at::opmath_type<T>;  // float for float, bfloat16 and float16; double for double

// Window of every position of one axis, and its inverse (for each key, the queries that see it).
struct AxisWindows {
  int64_t kernel, dilation;
  std::vector<int64_t> first_key;   // [length]: first key position of the query's window
  std::vector<int64_t> first_bias;  // [length]: rpb index of that key along this axis, in [0, kernel)
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

// Loads and stores between a tensor's dtype T and vectors of its accumulation type: bfloat16 and
// float16 are widened on load and rounded (to nearest even) on store.
template <typename T>
inline Vectorized<acc_t<T>> load_wide(const T* x) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return Vectorized<T>::loadu(x);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float<T>(x, out);
    return out;
  }
}

template <typename T>
inline Vectorized<acc_t<T>> load_wide(const T* x, int64_t count) {  // the first count elements, zeros after
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    return Vectorized<T>::loadu(x, count);
  } else {
    __at_align__ A buffer[Vectorized<A>::size()] = {};
    for (int64_t e = 0; e < count; ++e) buffer[e] = static_cast<A>(x[e]);
    return Vectorized<A>::loadu(buffer);
  }
}

template <typename T>
inline void store_narrow(T* y, const Vectorized<acc_t<T>>& v, int64_t count = Vectorized<acc_t<T>>::size()) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(y, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(y, count);
  }
}

// Horizontal sum / max of a vector through vec_reduce_all, which every torch >= 2.11 has
// (Vectorized::reduce_add / reduce_max are newer). maximum propagates NaN, as the softmax needs.
template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>(
      [](const Vectorized<A>& a, const Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
}

// Lane s of the result is the sum of the lanes of partial[s], for s < Vectorized<A>::size(): one
// transpose-and-add tree (about 3 instructions a vector for float) instead of a horizontal sum each.
template <typename A>
NA2D_INLINE Vectorized<A> sum_lanes(const Vectorized<A>* partial) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    __m512 pairs[8], quads[4];
    for (int s = 0; s < 8; ++s) {  // per 128-bit block: (a0+a2, b0+b2, a1+a3, b1+b3) of vectors a, b
      const __m512 a = partial[2 * s], b = partial[2 * s + 1];
      pairs[s] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int s = 0; s < 4; ++s) {  // per 128-bit block: that block's sums of 4 consecutive vectors
      const __m512d a = _mm512_castps_pd(pairs[2 * s]), b = _mm512_castps_pd(pairs[2 * s + 1]);
      quads[s] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),   // blocks (0, 2) + (1, 3)
                                     _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
    const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                      _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xdd));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    __m256 pairs[4], quads[2];
    for (int s = 0; s < 4; ++s) {
      const __m256 a = partial[2 * s], b = partial[2 * s + 1];
      pairs[s] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    }
    for (int s = 0; s < 2; ++s) {
      const __m256d a = _mm256_castps_pd(pairs[2 * s]), b = _mm256_castps_pd(pairs[2 * s + 1]);
      quads[s] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20), _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
  }
#endif
  __at_align__ A sums[Vectorized<A>::size()];
  for (int64_t s = 0; s < Vectorized<A>::size(); ++s) sums[s] = hsum(partial[s]);
  return Vectorized<A>::loadu(sums);
}

// Calls f(std::integral_constant<int, e>{}) for e = 0 .. N-1: the indices are constants before any
// optimisation pass, so that arrays of vectors indexed by them stay in registers (GCC's SRA gives up
// on loops it has not unrolled yet, and the accumulators went through the stack every iteration).
template <int N, typename F>
inline void unrolled(F&& f) {
  [&]<int... e>(std::integer_sequence<int, e...>) { (f(std::integral_constant<int, e>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// One head_dim vector in the accumulation type A. NV > 0: head_dim == NV * Vec::size(), held in
// registers (the common head_dim 32 is NV = 2 on AVX-512); NV == 0: any head_dim, in a buffer.
template <typename A, int NV>
struct HeadVec {
  using Vec = Vectorized<A>;
  Vec r[NV];
  explicit HeadVec(int64_t) {}
  void zero() { unrolled<NV>([&](auto e) { r[e] = Vec(A(0)); }); }
  template <typename T>
  void load(const T* x, A alpha) { unrolled<NV>([&](auto e) { r[e] = load_wide(x + e * Vec::size()) * Vec(alpha); }); }
  template <typename T>
  Vec partial_dot(const T* x) const {  // its lanes sum to this . x
    Vec acc = r[0] * load_wide(x);
    unrolled<NV - 1>([&](auto e) { acc = at::vec::fmadd(r[e + 1], load_wide(x + (e + 1) * Vec::size()), acc); });
    return acc;
  }
  template <typename T>
  void axpy(A alpha, const T* x) {  // this += alpha * x
    const Vec a(alpha);
    unrolled<NV>([&](auto e) { r[e] = at::vec::fmadd(a, load_wide(x + e * Vec::size()), r[e]); });
  }
  template <typename T>
  void store(T* y, A alpha) const {
    unrolled<NV>([&](auto e) { store_narrow(y + e * Vec::size(), r[e] * Vec(alpha)); });
  }
};

template <typename A>
struct HeadVec<A, 0> {
  using Vec = Vectorized<A>;
  c10::SmallVector<A, 128> r;  // on the stack up to head_dim 128
  explicit HeadVec(int64_t dim) : r(dim) {}
  void zero() { std::fill(r.begin(), r.end(), A(0)); }
  template <typename T>
  void load(const T* x, A alpha) { for (size_t d = 0; d < r.size(); ++d) r[d] = static_cast<A>(x[d]) * alpha; }
  template <typename T>
  Vec partial_dot(const T* x) const {
    const int64_t n = r.size();
    Vec acc(A(0));
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size()) acc = at::vec::fmadd(Vec::loadu(r.data() + d), load_wide(x + d), acc);
    if (d < n) acc = at::vec::fmadd(Vec::loadu(r.data() + d, n - d), load_wide(x + d, n - d), acc);
    return acc;
  }
  template <typename T>
  void axpy(A alpha, const T* x) {
    const Vec a(alpha);
    const int64_t n = r.size();
    A* y = r.data();
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(a, load_wide(x + d), Vec::loadu(y + d)).store(y + d);
    if (d < n) at::vec::fmadd(a, load_wide(x + d, n - d), Vec::loadu(y + d, n - d)).store(y + d, n - d);
  }
  template <typename T>
  void store(T* y, A alpha) const { for (size_t d = 0; d < r.size(); ++d) y[d] = static_cast<T>(r[d] * alpha); }
};

// Lanes the padded window is rounded to: every loop over it steps by Vectorized<A>::size() and
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
  // Element offset of every window slot from the window's first key, in a tensor of strides s.
  std::vector<int64_t> slot_offsets(const Strided& s) const {
    std::vector<int64_t> offsets(window);
    for (int64_t ti = 0; ti < kh; ++ti)
      for (int64_t tj = 0; tj < kw; ++tj) offsets[ti * kw + tj] = ti * rows.dilation * s.h + tj * cols.dilation * s.w;
    return offsets;
  }
};

// The bias of every slot of a query's window, [padded_window] with -inf in the padding (zeros
// without rpb), rebuilt per head only when the window's place in the table changes (all interior
// queries share one).
template <typename A>
class WindowBias {
 public:
  WindowBias(const Problem& p, const A* rpb)
      : p_(p), rpb_(rpb), windows_(p.heads * p.padded_window), built_for_(p.heads, -1) {}
  const A* get(int64_t head, int64_t i, int64_t j) {
    const int64_t row0 = p_.rows.first_bias[i], col0 = p_.cols.first_bias[j];
    A* w = windows_.data() + head * p_.padded_window;
    const int64_t place = rpb_ ? row0 * p_.kw + col0 : 0;
    if (built_for_[head] != place) {
      const A* table = rpb_ ? rpb_ + (head * p_.bias_h + row0) * p_.bias_w + col0 : nullptr;
      for (int64_t ti = 0; ti < p_.kh; ++ti)
        for (int64_t tj = 0; tj < p_.kw; ++tj) w[ti * p_.kw + tj] = table ? table[ti * p_.bias_w + tj] : A(0);
      std::fill(w + p_.window, w + p_.padded_window, -std::numeric_limits<A>::infinity());
      built_for_[head] = place;
    }
    return w;
  }

 private:
  const Problem& p_;
  const A* rpb_;
  std::vector<A> windows_;
  std::vector<int64_t> built_for_;
};

// Lane s: the dot product of head with window slot first + s, zero past the window. The slots'
// partial sums stay in registers (the unrolled indices are constants) and are reduced at once.
template <typename A, int NV, typename T>
NA2D_INLINE Vectorized<A> window_dots(const Problem& p, int64_t first, const HeadVec<A, NV>& head,
                                      const T* window_start, const int64_t* slot_offset) {
  using Vec = Vectorized<A>;
  constexpr int64_t lanes = Vec::size();
  Vec partial[lanes];
  if (first + lanes <= p.window) {
    unrolled<lanes>([&](auto s) { partial[s] = head.partial_dot(window_start + slot_offset[first + s]); });
  } else {  // the window's last slots
    const int64_t count = p.window - first;
    unrolled<lanes>([&](auto s) {
      partial[s] = s < count ? head.partial_dot(window_start + slot_offset[first + s]) : Vec(A(0));
    });
  }
  return sum_lanes(partial);
}

// probs = exp(logits - shift) over the padded window (padding holds -inf, so exp gives 0); returns the sum.
template <typename A>
inline A exp_shifted(const A* logits, A shift, A* probs, int64_t padded) {
  using Vec = Vectorized<A>;
  Vec total(A(0));
  const Vec s(shift);
  for (int64_t t = 0; t < padded; t += Vec::size()) {
    Vec e = (Vec::loadu(logits + t) - s).exp();
    e.store(probs + t);
    total = total + e;
  }
  return hsum(total);
}

template <typename A>
inline A max_of(const A* x, int64_t padded) {
  using Vec = Vectorized<A>;
  Vec m(-std::numeric_limits<A>::infinity());
  for (int64_t t = 0; t < padded; t += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + t));  // NaN propagates
  return hmax(m);
}

// One call's tensors, as pointers and strides, and the window's slot offsets in each.
template <typename T>
struct Maps {
  using A = acc_t<T>;
  const Problem& p;
  const T *q, *k, *v;
  Strided qs, ks, vs;
  std::vector<int64_t> key_slots, value_slots;
  A scale;
  Maps(const Problem& p_, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, A scale_)
      : p(p_), q(query.const_data_ptr<T>()), k(key.const_data_ptr<T>()), v(value.const_data_ptr<T>()),
        qs(query), ks(key), vs(value), key_slots(p_.slot_offsets(ks)), value_slots(p_.slot_offsets(vs)),
        scale(scale_) {}
  const T* key_window(int64_t b, int64_t i, int64_t j, int64_t head) const {
    return k + ks.at(b, p.rows.first_key[i], p.cols.first_key[j], head);
  }
  const T* value_window(int64_t b, int64_t i, int64_t j, int64_t head) const {
    return v + vs.at(b, p.rows.first_key[i], p.cols.first_key[j], head);
  }
};

// Output and logsumexp of query (b, i, j, head); logits and probs: [padded_window] scratch.
template <typename T, int NV>
NA2D_NOINLINE void forward_query(const Maps<T>& m, int64_t b, int64_t i, int64_t j, int64_t head,
                                 const acc_t<T>* bias, acc_t<T>* logits, acc_t<T>* probs, T* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  const Problem& p = m.p;
  HeadVec<A, NV> scaled_q(p.dim), acc(p.dim);
  scaled_q.load(m.q + m.qs.at(b, i, j, head), m.scale);
  const T* key_window = m.key_window(b, i, j, head);
  for (int64_t first = 0; first < p.padded_window; first += Vec::size()) {
    (window_dots(p, first, scaled_q, key_window, m.key_slots.data()) + Vec::loadu(bias + first)).store(logits + first);
  }
  const A shift = max_of(logits, p.padded_window);
  const A total = exp_shifted(logits, shift, probs, p.padded_window);
  acc.zero();
  const T* value_window = m.value_window(b, i, j, head);
  for (int64_t slot = 0; slot < p.window; ++slot) acc.axpy(probs[slot], value_window + m.value_slots[slot]);
  acc.store(out, A(1) / total);
  *lse = shift + std::log(total);
}

template <typename T, int NV>
void forward_kernel(const Problem& p, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const acc_t<T>* rpb, acc_t<T> scale, at::Tensor& out, at::Tensor& lse) {
  using A = acc_t<T>;
  const Maps<T> m(p, query, key, value, scale);
  const Strided os(out);
  T* o = out.mutable_data_ptr<T>();
  A* l = lse.mutable_data_ptr<A>();
  at::parallel_for(0, p.batch * p.height, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> logits(p.padded_window), probs(p.padded_window);
    WindowBias<A> window_bias(p, rpb);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.height, i = row % p.height;
      for (int64_t j = 0; j < p.width; ++j)
        for (int64_t head = 0; head < p.heads; ++head)
          forward_query<T, NV>(m, b, i, j, head, window_bias.get(head, i, j), logits.data(), probs.data(),
                               o + os.at(b, i, j, head), l + p.query_index(b, i, j, head));
    }
  });
}

// The backward's tensors beyond Maps: grad_out, the logsumexp and the gradients.
template <typename T>
struct BackwardMaps : Maps<T> {
  using A = acc_t<T>;
  const T* g;
  const A* lse;
  Strided gs, dqs, dks, dvs;
  T *dq, *dk, *dv;
  // per inverse entry of each axis: grad_out / query offsets, and the slot's place in a pair row
  std::vector<int64_t> row_g, row_q, row_slot, col_pair, col_g, col_q;
  BackwardMaps(const Problem& p_, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
               const at::Tensor& value, const at::Tensor& lse_, A scale_, at::Tensor& dq_, at::Tensor& dk_,
               at::Tensor& dv_)
      : Maps<T>(p_, query, key, value, scale_), g(grad_out.const_data_ptr<T>()), lse(lse_.const_data_ptr<A>()),
        gs(grad_out), dqs(dq_), dks(dk_), dvs(dv_), dq(dq_.mutable_data_ptr<T>()), dk(dk_.mutable_data_ptr<T>()),
        dv(dv_.mutable_data_ptr<T>()) {
    for (size_t a = 0; a < p_.rows.inverse_query.size(); ++a) {
      const int64_t i = p_.rows.inverse_query[a];
      row_g.push_back(i * gs.h);
      row_q.push_back(i * this->qs.h);
      row_slot.push_back(p_.rows.inverse_slot[a] * p_.kw);
    }
    const int64_t pair_col = p_.heads * 2 * p_.padded_window;
    for (size_t e = 0; e < p_.cols.inverse_query.size(); ++e) {
      const int64_t j = p_.cols.inverse_query[e];
      col_pair.push_back(j * pair_col + p_.cols.inverse_slot[e]);
      col_g.push_back(j * gs.w);
      col_q.push_back(j * this->qs.w);
    }
  }
};

// The (p, dlogits) pairs of the query rows a band of key rows reads, [ring rows][W][heads][2][padded
// window] (p, then dlogits, each as the query pass's vectors left them):
// query rows of one dilation group are computed in order into a ring of as many rows as any key
// row's inverse neighbourhood spans, and each key row is gathered as soon as its last query row is
// there. Under a MB at NAT's stage 1, so it stays in cache, where one pair table for the whole batch
// (kh*kw*8 bytes per query and head) went through memory and its fresh pages' faults.
template <typename A>
struct PairRing {
  int64_t rows, row_size;  // row_size: entries per query row
  std::vector<A> storage;
};

// Group-row (position / dilation) of the first and last query that sees key position pos.
inline int64_t first_viewer(const AxisWindows& axis, int64_t pos) {
  return axis.inverse_query[axis.inverse_begin[pos]] / axis.dilation;
}
inline int64_t last_viewer(const AxisWindows& axis, int64_t pos) {
  return axis.inverse_query[axis.inverse_begin[pos + 1] - 1] / axis.dilation;
}

// dq of query (b, i, j, head) (when owned), its window's dlogits added to bias_grad (if any), and
// its p and dlogits stored at pair_out and pair_out + padded_window. scratch: padded_window.
template <typename T, int NV>
NA2D_NOINLINE void backward_query(const BackwardMaps<T>& m, int64_t b, int64_t i, int64_t j, int64_t head,
                                  const acc_t<T>* bias, acc_t<T>* bias_grad, acc_t<T>* pair_out, bool owned,
                                  acc_t<T>* scratch) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  const Problem& p = m.p;
  A* probs = pair_out;
  A* dlogits = pair_out + p.padded_window;
  A* grad_dots = scratch;
  HeadVec<A, NV> scaled_q(p.dim), grad(p.dim), dq_acc(p.dim);
  scaled_q.load(m.q + m.qs.at(b, i, j, head), m.scale);
  grad.load(m.g + m.gs.at(b, i, j, head), A(1));
  const T* key_window = m.key_window(b, i, j, head);
  const T* value_window = m.value_window(b, i, j, head);
  const Vec query_lse(m.lse[p.query_index(b, i, j, head)]);
  Vec delta_acc(A(0));
  for (int64_t first = 0; first < p.padded_window; first += Vec::size()) {
    const Vec logit = window_dots(p, first, scaled_q, key_window, m.key_slots.data()) + Vec::loadu(bias + first);
    const Vec prob = (logit - query_lse).exp();  // 0 in the padding
    const Vec grad_dot = window_dots(p, first, grad, value_window, m.value_slots.data());
    prob.store(probs + first);
    grad_dot.store(grad_dots + first);
    delta_acc = at::vec::fmadd(prob, grad_dot, delta_acc);
  }
  const Vec delta(hsum(delta_acc));  // grad . out, from the probabilities in A
  for (int64_t first = 0; first < p.padded_window; first += Vec::size())
    (Vec::loadu(probs + first) * (Vec::loadu(grad_dots + first) - delta)).store(dlogits + first);
  if (!owned) return;  // a halo row: only its pairs were wanted
  dq_acc.zero();
  for (int64_t slot = 0; slot < p.window; ++slot) dq_acc.axpy(dlogits[slot], key_window + m.key_slots[slot]);
  if (bias_grad) {
    for (int64_t ti = 0; ti < p.kh; ++ti)
      for (int64_t tj = 0; tj < p.kw; ++tj) bias_grad[ti * p.bias_w + tj] += dlogits[ti * p.kw + tj];
  }
  dq_acc.store(m.dq + m.dqs.at(b, i, j, head), m.scale);
}

// dk and dv of key (b, r, c, head), gathered over the queries whose windows hold it; their pairs
// are in the ring.
template <typename T, int NV>
NA2D_NOINLINE void backward_key(const BackwardMaps<T>& m, const PairRing<acc_t<T>>& ring, int64_t b, int64_t r,
                                int64_t c, int64_t head) {
  using A = acc_t<T>;
  const Problem& p = m.p;
  HeadVec<A, NV> dk_acc(p.dim), dv_acc(p.dim);
  dk_acc.zero();
  dv_acc.zero();
  const A* pair_base = ring.storage.data() + head * 2 * p.padded_window;
  const T* g_base = m.g + b * m.gs.b + head * m.gs.n;
  const T* q_base = m.q + b * m.qs.b + head * m.qs.n;
  const int64_t col_begin = p.cols.inverse_begin[c], col_end = p.cols.inverse_begin[c + 1];
  for (int64_t a = p.rows.inverse_begin[r]; a < p.rows.inverse_begin[r + 1]; ++a) {
    const int64_t ring_row = (p.rows.inverse_query[a] / p.rows.dilation) % ring.rows;
    const A* pair_row = pair_base + ring_row * ring.row_size + m.row_slot[a];
    const T* g_row = g_base + m.row_g[a];
    const T* q_row = q_base + m.row_q[a];
    for (int64_t e = col_begin; e < col_end; ++e) {
      const A* pair = pair_row + m.col_pair[e];
      dv_acc.axpy(pair[0], g_row + m.col_g[e]);
      dk_acc.axpy(pair[p.padded_window], q_row + m.col_q[e]);
    }
  }
  dk_acc.store(m.dk + m.dks.at(b, r, c, head), m.scale);
  dv_acc.store(m.dv + m.dvs.at(b, r, c, head), A(1));
}

// One task of the backward: image b, row dilation group `group`, key group-rows [band_begin,
// band_end). It owns those rows' dq, dk, dv and adds its queries' dlogits to bias_partial; query
// rows just outside the band (the halo) are recomputed for their pairs only.
template <typename T, int NV>
void backward_band(const BackwardMaps<T>& m, WindowBias<acc_t<T>>& window_bias, PairRing<acc_t<T>>& ring,
                   acc_t<T>* scratch, acc_t<T>* bias_partial, int64_t b, int64_t group, int64_t band_begin,
                   int64_t band_end) {
  using A = acc_t<T>;
  const Problem& p = m.p;
  const int64_t d = p.rows.dilation;
  int64_t next_query = first_viewer(p.rows, group + d * band_begin);
  for (int64_t t = band_begin; t < band_end; ++t) {
    const int64_t r = group + d * t;
    for (const int64_t last = last_viewer(p.rows, r); next_query <= last; ++next_query) {
      const int64_t i = group + d * next_query;
      const bool owned = next_query >= band_begin && next_query < band_end;
      A* pair_row = ring.storage.data() + (next_query % ring.rows) * ring.row_size;
      for (int64_t j = 0; j < p.width; ++j) {
        for (int64_t head = 0; head < p.heads; ++head) {
          A* bias_grad = bias_partial && owned ? bias_partial + (head * p.bias_h + p.rows.first_bias[i]) * p.bias_w +
                                                     p.cols.first_bias[j] : nullptr;
          backward_query<T, NV>(m, b, i, j, head, window_bias.get(head, i, j), bias_grad,
                                pair_row + (j * p.heads + head) * 2 * p.padded_window, owned, scratch);
        }
      }
    }
    for (int64_t c = 0; c < p.width; ++c)
      for (int64_t head = 0; head < p.heads; ++head) backward_key<T, NV>(m, ring, b, r, c, head);
  }
}

template <typename T, int NV>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& lse, const acc_t<T>* rpb, acc_t<T> scale,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& drpb) {
  using A = acc_t<T>;
  const BackwardMaps<T> m(p, grad_out, query, key, value, lse, scale, dq, dk, dv);
  const int64_t d = p.rows.dilation, height_groups = std::min(d, p.height);
  int64_t ring_rows = 1;  // the most group-rows any key row's viewers span
  for (int64_t r = 0; r < p.height; ++r)
    ring_rows = std::max(ring_rows, last_viewer(p.rows, r) - first_viewer(p.rows, r) + 1);
  // Tasks: (image, row group, band). Bands split a group only where images x groups give fewer
  // tasks than threads; each band recomputes up to kernel - 1 halo rows, so bands stay >= kernel rows.
  const int64_t group_rows = (p.height + d - 1) / d;  // of the longest group
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t wanted = (threads + p.batch * height_groups - 1) / (p.batch * height_groups);
  const int64_t bands = std::max<int64_t>(1, std::min(wanted, group_rows / p.kh));
  const int64_t tasks = p.batch * height_groups * bands;
  const bool with_bias_grad = drpb.numel() > 0;
  const int64_t bias_numel = p.heads * p.bias_h * p.bias_w;
  // one drpb partial table per task (tasks, not threads, own them: no races however the pool maps
  // tasks to threads), summed in task order: deterministic
  std::vector<A> bias_partial(with_bias_grad ? tasks * bias_numel : 0, A(0));
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> scratch(p.padded_window);
    WindowBias<A> window_bias(p, rpb);
    PairRing<A> ring{ring_rows, p.width * p.heads * 2 * p.padded_window, {}};
    ring.storage.resize(ring.rows * ring.row_size);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / (height_groups * bands), group = task / bands % height_groups, band = task % bands;
      const int64_t rows = (p.height - group + d - 1) / d;  // group-rows of this group
      const int64_t band_begin = rows * band / bands, band_end = rows * (band + 1) / bands;
      backward_band<T, NV>(m, window_bias, ring, scratch.data(),
                           with_bias_grad ? bias_partial.data() + task * bias_numel : nullptr, b, group, band_begin,
                           band_end);
    }
  });
  if (with_bias_grad) {
    A* out_bias = drpb.mutable_data_ptr<A>();
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t e = 0; e < bias_numel; ++e) out_bias[e] += bias_partial[task * bias_numel + e];
  }
}

// Calls fn.template operator()<NV>() with head_dim in registers where it fits (float
// accumulation: 1, 2 or 4 vectors), else the any-head_dim path.
template <typename A, typename Fn>
void with_head_vectors(int64_t dim, Fn&& fn) {
  constexpr int64_t lanes = Vectorized<A>::size();
  if constexpr (std::is_same_v<A, float>) {
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
  const at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "timm_nat_na2d: query must be float32, float64, bfloat16 or float16, got ", dtype);
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
    // float32 too: under autocast the parameter stays float32 while q, k, v are bfloat16
    TORCH_CHECK(table.scalar_type() == dtype || table.scalar_type() == at::kFloat,
                "timm_nat_na2d: rpb must be float32 or have query's dtype ", dtype, ", got ", table.scalar_type());
  }
}

// The bias table in the accumulation type of query's dtype (a copy only where it has another dtype).
at::Tensor bias_table(const std::optional<at::Tensor>& rpb, at::ScalarType accumulation) {
  return rpb.has_value() ? rpb->to(accumulation).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> na2d_forward(const at::Tensor& query_, const at::Tensor& key_,
                                                const at::Tensor& value_, const std::optional<at::Tensor>& rpb_,
                                                at::IntArrayRef kernel, at::IntArrayRef dilation, double scale) {
  check(query_, key_, value_, rpb_, kernel, dilation);
  const at::Tensor query = head_dim_contiguous(query_), key = head_dim_contiguous(key_),
                   value = head_dim_contiguous(value_);
  const at::ScalarType accumulation = at::toOpMathType(query.scalar_type());
  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse = at::empty(query.sizes().slice(0, 4), query.options().dtype(accumulation));
  if (query.numel() == 0) return {out, lse};
  const Problem problem(query, kernel, dilation);
  const at::Tensor rpb = bias_table(rpb_, accumulation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "na2d_cpu_forward", [&] {
    using A = acc_t<scalar_t>;
    with_head_vectors<A>(problem.dim, [&]<int NV>() {
      forward_kernel<scalar_t, NV>(problem, query, key, value, rpb.defined() ? rpb.const_data_ptr<A>() : nullptr,
                                   static_cast<A>(scale), out, lse);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_backward(
    const at::Tensor& grad_out_, const at::Tensor& query_, const at::Tensor& key_, const at::Tensor& value_,
    const at::Tensor& lse, const std::optional<at::Tensor>& rpb_, at::IntArrayRef kernel, at::IntArrayRef dilation,
    double scale, bool rpb_grad) {
  check(query_, key_, value_, rpb_, kernel, dilation);
  check_map("grad_out", grad_out_, query_);
  const at::ScalarType accumulation = at::toOpMathType(query_.scalar_type());
  TORCH_CHECK(lse.defined() && lse.sizes() == query_.sizes().slice(0, 4),
              "timm_nat_na2d: lse must be [B, H, W, heads] = ", query_.sizes().slice(0, 4), ", got ",
              lse.defined() ? lse.sizes() : at::IntArrayRef{});
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == accumulation,
              "timm_nat_na2d: lse must be a CPU tensor of query's accumulation dtype ", accumulation, ", got ",
              lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.is_contiguous(), "timm_nat_na2d: lse must be contiguous, got strides ", lse.strides());
  const at::Tensor query = head_dim_contiguous(query_), key = head_dim_contiguous(key_),
                   value = head_dim_contiguous(value_), grad_out = head_dim_contiguous(grad_out_);
  at::Tensor dq = at::empty(query.sizes(), query.options());
  at::Tensor dk = at::empty(query.sizes(), query.options());
  at::Tensor dv = at::empty(query.sizes(), query.options());
  const at::Tensor rpb = bias_table(rpb_, accumulation);
  // summed in the accumulation type, returned in rpb's dtype; size 0: not asked for
  at::Tensor drpb = rpb.defined() && rpb_grad ? at::zeros(rpb.sizes(), rpb.options()) : at::empty({0}, query.options());
  if (query.numel() > 0) {
    const Problem problem(query, kernel, dilation);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "na2d_cpu_backward", [&] {
      using A = acc_t<scalar_t>;
      with_head_vectors<A>(problem.dim, [&]<int NV>() {
        backward_kernel<scalar_t, NV>(problem, grad_out, query, key, value, lse,
                                      rpb.defined() ? rpb.const_data_ptr<A>() : nullptr, static_cast<A>(scale), dq,
                                      dk, dv, drpb);
      });
    });
  }
  if (drpb.numel() > 0) drpb = drpb.to(rpb_->scalar_type());
  return {dq, dk, dv, drpb};
}

}  // namespace

// The schemas are defined once, in Python (timm_nat/attention/cpu_fused.py _SCHEMAS, next to the
// fake kernels); the dispatcher checks these implementations' signatures against them.
TORCH_LIBRARY_IMPL(timm_nat_na2d, CPU, m) {
  m.impl("forward", &na2d_forward);
  m.impl("backward", &na2d_backward);
}
