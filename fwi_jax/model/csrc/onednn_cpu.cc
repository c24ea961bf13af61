// Dense layers for XLA:CPU through oneDNN's matmul primitive, called from JAX through the XLA FFI
// (fwi_jax/model/onednn.py builds and registers it).
//
// Why: XLA:CPU runs a float32 dot on YNNPACK at about half the CPU's float32 peak, and has no
// path to the AMX tile units or, for most shapes, the AVX-512 bfloat16 dot products; oneDNN picks
// its kernel for the CPU it runs on (AMX, AVX-512 BF16, AVX-512, AVX2) and reaches about 90 % of
// the float32 peak and several times that in bfloat16 on AMX. Nothing here is a kernel of ours:
// this file only describes the operands to oneDNN. oneDNN's primitive cache keeps the compiled
// kernel of each shape, so a call after the first costs a cache lookup.
//
// The dense layer's product y (..., N) = x (..., K) @ w (K, N), x's leading axes merged into M. float32 or bfloat16 operands (the same dtype), float32 or bfloat16 result;
// oneDNN accumulates in float32. oneDNN runs on its own OpenMP threads (the library's build).
//
// Attention's forward pass, for model.attention=onednn (the backward pass is attention_cpu.cc's):
// q, k, v, out (..., N, H, D) float32 or bfloat16, lse (..., H, N) float32, scale 1/sqrt(D),
// non-causal; RoPE tables sin, cos (M, D) float32 rotate the last M tokens of q and k first
// (M = 0: none; CopyHead). One OpenMP task per head: its K, Q, V rows are copied into dense (N, D) buffers
// (oneDNN picks AMX kernels for dense operands only), then per block of `block` queries two
// oneDNN products, single-threaded inside the parallel loop (oneDNN detects it): the scores
// transposed, S^T = K Q_b^T (N, block) float32, then P^T = exp(scale (S^T - m)) with each
// column's max m, rounded to the operands' dtype, and O_b = P V / colsum;
// lse = scale m + log(colsum). With bfloat16 operands both products run on the AMX tiles or the
// AVX-512 bfloat16 dot products where the CPU has them.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "exp_poly.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

ffi::Error DataType(ffi::DataType t, const char* what, dnnl::memory::data_type* out) {
  if (t == ffi::DataType::F32) {
    *out = dnnl::memory::data_type::f32;
  } else if (t == ffi::DataType::BF16) {
    *out = dnnl::memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument(std::string("oneDNN dense: ") + what +
                                       " must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

dnnl::matmul::primitive_desc Describe(int64_t m, int64_t k, int64_t n, dnnl::memory::data_type in,
                                      dnnl::memory::data_type out) {
  using tag = dnnl::memory::format_tag;
  const dnnl::memory::desc x({m, k}, in, tag::ab), w({k, n}, in, tag::ab), y({m, n}, out, tag::ab);
  return dnnl::matmul::primitive_desc(Engine(), x, w, y);
}

template <typename Dims>
int64_t Rows(const Dims& dims) {  // the product of all axes but the last
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

// Creating a primitive descriptor runs oneDNN's kernel selection (~1 ms); a model calls the same
// few shapes thousands of times, so each shape's primitive is made once per process.
template <typename Key, typename Value, typename Make>
const Value& Cached(const Key& key, const Make& make) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Value>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Value>(make());
  return *slot;
}

struct DenseProduct {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul primitive;
};

ffi::Error Dense(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() < 1 || wd.size() != 2)
    return ffi::Error::InvalidArgument("oneDNN dense: x needs rank >= 1, w rank 2");
  if (x.element_type() != w.element_type())
    return ffi::Error::InvalidArgument("oneDNN dense: x and w differ in dtype");
  const int64_t k = xd[xd.size() - 1], m = Rows(xd), n = wd[1];
  if (wd[0] != k) return ffi::Error::InvalidArgument("oneDNN dense: x and w differ in K");
  if (y->element_count() != m * n)
    return ffi::Error::InvalidArgument("oneDNN dense: the result's shape is not (..., N)");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(y->untyped_data(), 0, y->size_bytes());
    return ffi::Error::Success();
  }
  dnnl::memory::data_type in, out;
  if (auto e = DataType(x.element_type(), "x and w", &in); e.failure()) return e;
  if (auto e = DataType(y->element_type(), "the result", &out); e.failure()) return e;
  try {
    const auto& product = Cached<std::tuple<int64_t, int64_t, int64_t, int, int>, DenseProduct>(
        {m, k, n, static_cast<int>(in), static_cast<int>(out)}, [&] {
          auto pd = Describe(m, k, n, in, out);
          return DenseProduct{pd, dnnl::matmul(pd)};
        });
    dnnl::memory xm(product.pd.src_desc(), Engine(), x.untyped_data());
    dnnl::memory wm(product.pd.weights_desc(), Engine(), w.untyped_data());
    dnnl::memory ym(product.pd.dst_desc(), Engine(), y->untyped_data());
    dnnl::stream stream(Engine());
    product.primitive.execute(stream,
                              {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN dense: ") + e.what());
  }
  return ffi::Error::Success();
}

uint16_t ToBf16(float x) {  // round to nearest even (no NaNs here)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The products of one block of `rows` queries (the last block may have fewer: its own pair), on
// one head's dense copies (N, D) of K, Q, V: S^T = K Q_b^T (N, rows) and O_b = P V (rows, D),
// with P read from its transpose P^T (N, rows). oneDNN runs both on AMX where the CPU has it (the
// score product with keys as rows: with the N keys as columns and D = 64 it picks no AMX kernel).
// Each thread passes its own scratchpad: the library's shared one is not safe for primitives that
// run concurrently on several threads.
struct BlockProducts {
  dnnl::matmul scores, values;
  dnnl::memory::desc k, qt, st, p, v, o, scratch_s, scratch_v;
  BlockProducts(int64_t rows, int64_t n, int64_t d, dnnl::memory::data_type t) {
    using dt = dnnl::memory::data_type;
    k = dnnl::memory::desc({n, d}, t, {d, 1});
    qt = dnnl::memory::desc({d, rows}, t, {1, d});  // Q_b^T read in place from Q_b's rows
    st = dnnl::memory::desc({n, rows}, dt::f32, {rows, 1});
    p = dnnl::memory::desc({rows, n}, t, {1, rows});  // P read in place from P^T
    v = dnnl::memory::desc({n, d}, t, {d, 1});
    o = dnnl::memory::desc({rows, d}, dt::f32, {d, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::matmul::primitive_desc spd(Engine(), k, qt, st, attr), vpd(Engine(), p, v, o, attr);
    scores = dnnl::matmul(spd);
    values = dnnl::matmul(vpd);
    scratch_s = spd.scratchpad_desc();
    scratch_v = vpd.scratchpad_desc();
  }
  size_t scratch_bytes() const { return std::max(scratch_s.get_size(), scratch_v.get_size()); }
};

// Copies head h's (N, D) rows, `ld` elements apart in (N, H, D), into a dense (N, D) buffer. With
// RoPE tables sin, cos (M, D) (M > 0) the last M rows are rotated on the way, pair by pair,
// (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) in float32 and rounded back, as
// fwi_jax/model/rope.py's apply_rope computes.
template <typename T>
float Load(const T* p, int64_t j) {
  if constexpr (std::is_same_v<T, float>) {
    return p[j];
  } else {
    const uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
}

template <typename T>
void Store(T* p, int64_t j, float x) {
  if constexpr (std::is_same_v<T, float>) {
    p[j] = x;
  } else {
    p[j] = ToBf16(x);
  }
}

template <typename T>
void CopyHead(const T* src, T* dst, int64_t n, int64_t d, int64_t ld, const float* sin,
              const float* cos, int64_t m) {
  const int64_t prefix = n - m;
  for (int64_t i = 0; i < n; ++i) {
    const T* x = src + i * ld;
    T* y = dst + i * d;
    if (i < prefix) {
      std::memcpy(y, x, d * sizeof(T));
      continue;
    }
    const float* s = sin + (i - prefix) * d;
    const float* c = cos + (i - prefix) * d;
    for (int64_t j = 0; j < d; j += 2) {
      const float x0 = Load(x, j), x1 = Load(x, j + 1);
      Store(y, j, x0 * c[j] - x1 * s[j]);
      Store(y, j + 1, x1 * c[j + 1] + x0 * s[j + 1]);
    }
  }
}

void CopyHead(bool bf16, const char* src, char* dst, int64_t n, int64_t d, int64_t ld,
              const float* sin, const float* cos, int64_t m) {
  if (bf16) {
    CopyHead(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), n, d, ld,
             sin, cos, m);
  } else {
    CopyHead(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), n, d, ld, sin,
             cos, m);
  }
}

ffi::Error AttentionForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cos,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                            int64_t block) {
  const auto dims = q.dimensions();
  if (dims.size() < 3)
    return ffi::Error::InvalidArgument("oneDNN attention: q needs rank >= 3 (..., N, H, D)");
  const int64_t n = dims[dims.size() - 3], heads = dims[dims.size() - 2], d = dims[dims.size() - 1];
  const int64_t batch = n * heads * d ? q.element_count() / (n * heads * d) : 0;
  const auto t = q.element_type();
  if (k.element_type() != t || v.element_type() != t || out->element_type() != t ||
      k.element_count() != q.element_count() || v.element_count() != q.element_count() ||
      out->element_count() != q.element_count() || lse->element_count() != batch * heads * n)
    return ffi::Error::InvalidArgument("oneDNN attention: q, k, v, out, lse do not match");
  dnnl::memory::data_type dt;
  if (auto e = DataType(t, "q, k, v", &dt); e.failure()) return e;
  if (block < 1) return ffi::Error::InvalidArgument("oneDNN attention: block must be >= 1");
  const int64_t m = d ? sin.element_count() / d : 0;  // rotated tokens
  if (sin.element_count() != m * d || cos.element_count() != m * d || m > n)
    return ffi::Error::InvalidArgument("oneDNN attention: sin, cos must be (M <= N, D)");
  if (batch == 0 || n == 0) return ffi::Error::Success();
  const bool bf16 = t == ffi::DataType::BF16;
  const size_t esize = bf16 ? 2 : 4;
  const int64_t ld = heads * d, rows = std::min(block, n), tail = n % rows;
  const int64_t blocks = (n + rows - 1) / rows;
  // Tasks: heads, or heads x chunks of query blocks where there are fewer heads than 4 per thread
  // (each chunk copies its head's K and V again, N x D each: small beside its products).
  const int64_t threads = omp_get_max_threads();
  const int64_t chunks = std::min(blocks, std::max<int64_t>(1, 4 * threads / (batch * heads)));
  const int64_t per_chunk = (blocks + chunks - 1) / chunks, tasks = batch * heads * chunks;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const auto* qp = static_cast<const char*>(q.untyped_data());
  const auto* kp = static_cast<const char*>(k.untyped_data());
  const auto* vp = static_cast<const char*>(v.untyped_data());
  auto* op = static_cast<char*>(out->untyped_data());
  float* lp = lse->typed_data();
  try {
    using BlockKey = std::tuple<int64_t, int64_t, int64_t, int>;
    const auto& full = Cached<BlockKey, BlockProducts>(
        {rows, n, d, static_cast<int>(dt)}, [&] { return BlockProducts(rows, n, d, dt); });
    const auto& last = Cached<BlockKey, BlockProducts>(
        {tail ? tail : rows, n, d, static_cast<int>(dt)},
        [&] { return BlockProducts(tail ? tail : rows, n, d, dt); });
    std::string failure;
#pragma omp parallel
    {
      std::vector<char> kh(n * d * esize), qh(n * d * esize), vh(n * d * esize);
      std::vector<float> st(n * rows), o(rows * d), mx(rows), sum(rows);
      std::vector<char> pt(n * rows * esize);
      std::vector<char> scratch(std::max(full.scratch_bytes(), last.scratch_bytes()) + 1);
      dnnl::stream stream(Engine());
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t bh = task / chunks, b = bh / heads, h = bh % heads, chunk = task % chunks;
        const int64_t head = (b * n * ld + h * d) * esize;  // byte offset of the head's row 0
        const float *sp = sin.typed_data(), *cp = cos.typed_data();
        CopyHead(bf16, kp + head, kh.data(), n, d, ld, sp, cp, m);
        CopyHead(bf16, qp + head, qh.data(), n, d, ld, sp, cp, m);  // (the chunk's rows are read)
        CopyHead(bf16, vp + head, vh.data(), n, d, ld, sp, cp, 0);
        try {
          dnnl::memory km(full.k, Engine(), kh.data()), vm(full.v, Engine(), vh.data());
          for (int64_t blk = chunk * per_chunk; blk < std::min(blocks, (chunk + 1) * per_chunk); ++blk) {
            const int64_t row0 = blk * rows, r = std::min(rows, n - row0);
            const BlockProducts& pr = r == rows ? full : last;
            dnnl::memory qm(pr.qt, Engine(), qh.data() + row0 * d * esize);
            dnnl::memory sm(pr.st, Engine(), st.data());
            dnnl::memory ss(pr.scratch_s, Engine(), scratch.data());
            pr.scores.execute(stream, {{DNNL_ARG_SRC, km},
                                       {DNNL_ARG_WEIGHTS, qm},
                                       {DNNL_ARG_DST, sm},
                                       {DNNL_ARG_SCRATCHPAD, ss}});
            stream.wait();
            // softmax down the columns of S^T (one column per query), vectorised along its rows
            std::copy(st.begin(), st.begin() + r, mx.begin());
            for (int64_t j = 1; j < n; ++j) {
              const float* row = st.data() + j * r;
#pragma omp simd
              for (int64_t i = 0; i < r; ++i) mx[i] = std::max(mx[i], row[i]);
            }
            for (int64_t i = 0; i < r; ++i) {
              mx[i] *= scale;
              sum[i] = 0.0f;
            }
            for (int64_t j = 0; j < n; ++j) {
              float* row = st.data() + j * r;
              if (bf16) {  // P^T rounded to bfloat16 as it is made; the float32 tile is not written
                auto* prow = reinterpret_cast<uint16_t*>(pt.data()) + j * r;
#pragma omp simd
                for (int64_t i = 0; i < r; ++i) {
                  const float e = fwi_cpu::Exp(row[i] * scale - mx[i]);
                  sum[i] += e;
                  prow[i] = ToBf16(e);
                }
              } else {
#pragma omp simd
                for (int64_t i = 0; i < r; ++i) {
                  const float e = fwi_cpu::Exp(row[i] * scale - mx[i]);
                  sum[i] += e;
                  row[i] = e;
                }
              }
            }
            void* p = bf16 ? static_cast<void*>(pt.data()) : static_cast<void*>(st.data());
            dnnl::memory pm(pr.p, Engine(), p), om(pr.o, Engine(), o.data());
            dnnl::memory sv(pr.scratch_v, Engine(), scratch.data());
            pr.values.execute(stream, {{DNNL_ARG_SRC, pm},
                                       {DNNL_ARG_WEIGHTS, vm},
                                       {DNNL_ARG_DST, om},
                                       {DNNL_ARG_SCRATCHPAD, sv}});
            stream.wait();
            for (int64_t i = 0; i < r; ++i) {
              const float inv = 1.0f / sum[i];
              const float* orow = o.data() + i * d;
              char* dst = op + head + (row0 + i) * ld * esize;
              if (bf16) {
                auto* drow = reinterpret_cast<uint16_t*>(dst);
                for (int64_t j = 0; j < d; ++j) drow[j] = ToBf16(orow[j] * inv);
              } else {
                auto* drow = reinterpret_cast<float*>(dst);
                for (int64_t j = 0; j < d; ++j) drow[j] = orow[j] * inv;
              }
              lp[bh * n + row0 + i] = mx[i] + std::log(sum[i]);
            }
          }
        } catch (const dnnl::error& e) {
#pragma omp critical
          failure = e.what();
        }
      }
    }
    if (!failure.empty()) return ffi::Error::Internal("oneDNN attention: " + failure);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN attention: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FwiOnednnAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FwiDense, Dense,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // w
                                  .Ret<ffi::AnyBuffer>());  // y

// The implementation oneDNN picks on this CPU for a (256 x 256) @ (256 x 256) product of `bf16`
// (else float32) operands, e.g. "brg:avx512_core_amx", written into `out` (NUL-terminated);
// returns 0, or -1 where oneDNN has none. fwi_jax/model/onednn.py reports it and decides
// whether bfloat16 runs natively (a "ref" implementation is oneDNN's slow reference code).
extern "C" int FwiDenseImplementation(int bf16, char* out, int size) {
  const auto t = bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  try {
    const std::string info = Describe(256, 256, 256, t, t).impl_info_str();
    std::strncpy(out, info.c_str(), size - 1);
    out[size - 1] = '\0';
    return 0;
  } catch (const dnnl::error&) {
    return -1;
  }
}
