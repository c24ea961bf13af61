// Fused attention for XLA:CPU, forward and backward, called from JAX through the XLA FFI
// (fwi_jax/model/fused_attention.py builds and registers it).
//
// Why by hand: XLA:CPU cannot fuse a matmul, the softmax and the next matmul into one kernel, so
// the pure-JAX tilings (attention.py) write every score tile to memory between separate kernels,
// and a BLAS library packs (copies) each tile before it multiplies it (perf: 15 % of the time in
// OpenBLAS's packing routines with this file's first, sgemm-based version). Here one thread's
// tile of scores is produced, turned into probabilities and consumed by register-blocked
// micro-kernels that read it where it lies, while it is in L2; the tasks run on XLA's intra-op
// thread pool.
//
// Layout: q, k, v, out, dq, dk, dv are float32 (..., N, H, D) (jax.nn.dot_product_attention's
// layout; leading axes are merged into one batch axis B); lse is float32 (..., H, N), the
// log-sum-exp of each row of scaled scores. Scale 1/sqrt(D). Non-causal, no mask. D must be a
// multiple of kVec (16 floats with AVX-512, 8 otherwise); every EVA02 size has D = 64.
//
// Per block of `rows` queries of one head:
// forward (tile T: rows x N, row stride Problem::ldt): T = exp(scale Q_b K^T - m) with m a
//            running row maximum (kLazyMax), written by the score product's epilogue with the
//            row sums; O_b = T V / rowsum; lse_b = m + log(rowsum).
// backward (per chunk c of kKeyChunk keys, tile T: rows x chunk): T = exp(scale Q_b K_c^T - lse_b);
//            dV_c += T^T dO_b; T = T * (dO_b V_c^T - delta_b) with delta_b = rowsum(dO_b * O_b);
//            dQ_b += scale T K_c; dK_c += scale T^T Q_b.
// Three product shapes, all one micro-kernel (C[i, j..] += A(i, p) * B[p, j..]) with different
// strides for A: "Q K^T" (A = Q_b, B = K^T, transposed once per task into (D, ldt)), "T V"
// (A = T, B = V) and "T^T dO" (A = T read down its columns, B = dO_b).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "exp_poly.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Calls fn(t) for every t in [0, n_tasks) on XLA's intra-op pool plus the calling thread, and
// returns when all are done. Helpers that the pool starts late find no task left and touch only
// the shared counters (held by shared_ptr), never fn or the caller's stack.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n_tasks, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const Fn* fn_ptr = &fn;
  auto work = [state, n_tasks, fn_ptr]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < n_tasks;) {
      (*fn_ptr)(t);
      if (state->done.fetch_add(1) + 1 == n_tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  // The calling thread works too, so num_threads - 1 helpers keep num_threads threads busy.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n_tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_tasks; });
}

struct Shape {
  int64_t batch, n, heads, dim;
  int64_t ld() const { return heads * dim; }  // row stride of one head's (N, D) matrix
  int64_t bh() const { return batch * heads; }
  // Offset of head `bh`'s row 0 in a (B, N, H, D) array.
  int64_t head_offset(int64_t bh) const { return (bh / heads) * n * heads * dim + (bh % heads) * dim; }
};

ffi::Error GetShape(const ffi::Buffer<ffi::F32>& q, Shape* s) {
  auto dims = q.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("fused attention expects q of rank >= 3 (..., tokens, heads, head_dim)");
  *s = Shape{1, dims[dims.size() - 3], dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 3 < dims.size(); ++i) s->batch *= dims[i];
  return ffi::Error::Success();
}

ffi::Error CheckSame(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& other, const char* name) {
  if (other.element_count() != q.element_count())
    return ffi::Error::InvalidArgument(std::string("fused attention: ") + name + " has another shape than q");
  return ffi::Error::Success();
}

// Exp (exp_poly.h): the scalar exponential both kernels share; ExpVec below for whole vectors.
using fwi_cpu::Exp;
using fwi_cpu::kExpC;

#if defined(__AVX512F__)
constexpr int kVec = 16;  // floats per vector register
constexpr int kNV = 4;    // vectors per micro-tile row at most: 6 x 4 accumulators (24 of 32 registers)
#else
constexpr int kVec = 8;
constexpr int kNV = 2;    // 6 x 2 of AVX2's 16 registers
#endif
constexpr int kNR = kNV * kVec;  // widest micro-tile: the score products' column step
constexpr int kMR = 6;           // micro-tile rows
typedef float Vec __attribute__((vector_size(kVec * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec Splat(float x) {  // a broadcast (Vec{} + x would add 0.f, an instruction of its own)
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#elif defined(__AVX__)
  return _mm256_set1_ps(x);
#else
  Vec v;
  for (int l = 0; l < kVec; ++l) v[l] = x;
  return v;
#endif
}

// Exp of every lane. With AVX-512 the 2^i step is one vscalefps (no integer round trip).
inline Vec ExpVec(Vec x) {
#if defined(__AVX512F__)
  x = x > Splat(-87.0f) ? x : Splat(-87.0f);
  const Vec t = x * 1.44269504088896341f;
  const Vec i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = t - i;
  Vec p = Splat(kExpC[5]);
  for (int c = 4; c >= 0; --c) p = p * f + kExpC[c];
  return _mm512_scalef_ps(p, i);
#else
  for (int l = 0; l < kVec; ++l) x[l] = Exp(x[l]);
  return x;
#endif
}

// A(i, p) = data[i * rs + p * cs].
struct Strided {
  const float* data;
  int64_t rs, cs;
};

// acc[MR x NV vectors] = sum_p A(i, p) B[p, 0..NV * kVec), then epi(i, j0, acc row) for each row.
template <int MR, int NV, typename Epi>
__attribute__((noinline)) void Micro(int64_t k, Strided a, const float* b, int64_t ldb, int64_t i0, int64_t j0, const Epi& epi) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec{};
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + p * ldb + v * kVec);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec av = Splat(a.data[i * a.rs + p * a.cs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    epi(i0 + i, j0, acc[i]);
}

// C[m x n] = A[m x k] B[k x n] handed to epi(i, j, C[i, j..j + NV * kVec) as NV vectors); B
// row-major with row stride ldb, n a multiple of NV * kVec. Column panels outer (a k x NV * kVec
// panel of B stays in L1).
template <int NV = kNV, typename Epi>
void Product(int64_t m, int64_t n, int64_t k, Strided a, const float* b, int64_t ldb, const Epi& epi) {
  for (int64_t j0 = 0; j0 < n; j0 += NV * kVec) {
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const Strided ai{a.data + i0 * a.rs, a.rs, a.cs};
      const float* bj = b + j0;
      switch (std::min<int64_t>(kMR, m - i0)) {
        case 6: Micro<6, NV>(k, ai, bj, ldb, i0, j0, epi); break;
        case 5: Micro<5, NV>(k, ai, bj, ldb, i0, j0, epi); break;
        case 4: Micro<4, NV>(k, ai, bj, ldb, i0, j0, epi); break;
        case 3: Micro<3, NV>(k, ai, bj, ldb, i0, j0, epi); break;
        case 2: Micro<2, NV>(k, ai, bj, ldb, i0, j0, epi); break;
        default: Micro<1, NV>(k, ai, bj, ldb, i0, j0, epi); break;
      }
    }
  }
}
static_assert(kMR == 6, "Product's switch covers 1..6 rows");
constexpr int64_t kKB = 128;  // rows of B per step of ProductLongK (a 32 KiB panel)
constexpr int64_t kKC = 128;  // rows of a score tile per "T^T X" product (measured, backward blocks of 256: 64 and 256 slower)

// A row epilogue for Product<NV> from f(i, j, vector of C[i, j..j+kVec)).
template <int NV = kNV, typename F>
auto EachVector(const F& f) {
  return [&f](int64_t i, int64_t j0, const Vec* c) {
    for (int v = 0; v < NV; ++v) f(i, j0 + v * kVec, c[v]);
  };
}

// acc[m x n] = A[m x k] B[k x n] (or acc += A B when `accumulate`) for a long k (A = a score
// tile, B = V or K): kKB rows of B at a time, so that a kKB x NV * kVec panel of B is read from L1
// by every row of A rather than streamed from L2 once per micro-tile.
template <int NV>
void AccumulateLongK(int64_t m, int64_t n, int64_t k, Strided a, const float* b, int64_t ldb, float* acc, bool accumulate) {
  for (int64_t p0 = 0; p0 < k; p0 += kKB) {
    const bool first = p0 == 0 && !accumulate;
    Product<NV>(m, n, std::min(kKB, k - p0), Strided{a.data + p0 * a.cs, a.rs, a.cs}, b + p0 * ldb, ldb,
            EachVector<NV>([&](int64_t i, int64_t j, Vec x) {
              float* c = acc + i * n + j;
              Store(c, first ? x : Load(c) + x);
            }));
  }
}

// C[m x n] = A[m x k] B[k x n] for a long k through `acc` (m x n floats, AccumulateLongK), then
// epi(i, j, C vector) for each vector (a per-vector epilogue, as `EachVector` makes for Product).
template <int NV, typename Epi>
void ProductLongK(int64_t m, int64_t n, int64_t k, Strided a, const float* b, int64_t ldb, float* acc, const Epi& epi) {
  AccumulateLongK<NV>(m, n, k, a, b, ldb, acc, false);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; j += kVec) epi(i, j, Load(acc + i * n + j));
}

// One thread's working memory, reused across calls: buffer `which` of at least n floats.
enum Buffer { kKt, kVt, kTile, kAcc, kKRows, kVRows, kQRows, kGRows, kDk, kDv, kBuffers };
float* Scratch(Buffer which, size_t n) {
  thread_local std::vector<float> buffers[kBuffers];
  if (buffers[which].size() < n) buffers[which].resize(n);
  return buffers[which].data();
}

// (N, D) rows at stride ld <-> contiguous (N, D). A head's rows lie 256 B apart in 768 B (tiny's
// 3 heads): copied together, the products stream them without the other heads' lines that the
// hardware prefetcher would drag into L2 beside them.
void Gather(const float* x, int64_t n, int64_t dim, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(out + j * dim, x + j * ld, dim * sizeof(float));
}
void Scatter(const float* x, int64_t n, int64_t dim, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(out + j * ld, x + j * dim, dim * sizeof(float));
}

// (N, D) rows at stride ld -> (D, np) row-major, columns N..np zero (the score products compute
// them, rounded up to a whole micro-tile; nothing reads them).
void Transpose(const float* x, int64_t n, int64_t dim, int64_t ld, int64_t np, float* xt) {
  for (int64_t d = 0; d < dim; ++d) std::fill(xt + d * np + n, xt + (d + 1) * np, 0.f);
  constexpr int64_t kB = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kB)
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t j = j0; j < std::min(n, j0 + kB); ++j) xt[d * np + j] = x[j * ld + d];
}

struct Problem {
  Shape s;
  int64_t rows_max, n_blocks;
  int64_t cols;  // N rounded up to kNR: the width the score products compute
  int64_t ldt;   // row stride of score tiles and of K^T, V^T: cols, plus kVec where that makes it an
                 // even number of 64-byte lines (an odd count spreads a column over all L1 sets)
  float scale;
};

// Row stride for rows of `cols` floats: cols, plus kVec where that makes an odd number of lines.
inline int64_t TileStride(int64_t cols) { return cols + ((cols * sizeof(float) / 64) % 2 == 0 ? kVec : 0); }

// The problem of attention shape `s` in query blocks of at most `block` rows (also the
// single-thread harness's entry, scripts/bench_fused_kernel.py).
ffi::Error MakeProblem(const Shape& s, int64_t block, Problem* pr) {
  if (s.dim % kVec != 0)
    return ffi::Error::InvalidArgument("fused attention: head_dim " + std::to_string(s.dim) +
                                       " is not a multiple of " + std::to_string(kVec));
  if (block < 1) return ffi::Error::InvalidArgument("fused attention: block must be >= 1");
  pr->s = s;
  pr->n_blocks = (s.n + block - 1) / block;
  pr->rows_max = (s.n + pr->n_blocks - 1) / pr->n_blocks;  // balanced blocks
  pr->cols = (s.n + kNR - 1) / kNR * kNR;
  pr->ldt = TileStride(pr->cols);
  pr->scale = 1.0f / std::sqrt(static_cast<float>(s.dim));
  return ffi::Error::Success();
}

ffi::Error Prepare(const ffi::Buffer<ffi::F32>& q, int64_t block, Problem* pr) {
  Shape s;
  if (auto err = GetShape(q, &s); err.failure()) return err;
  return MakeProblem(s, block, pr);
}

// The forward's probabilities are exp(s - m) with m a running row maximum that is raised only when
// a score exceeds it by more than kLazyMax: the exp and the row sums then happen in the score
// product's epilogue, with no pass over the tile for the maxima. Entries stay <= e^kLazyMax (row
// sums <= N e^8, far from float32 overflow); raising m rescales the row's earlier entries (rare:
// a later panel of keys must outscore the first by more than 8).
constexpr float kLazyMax = 8.0f;

inline bool AnyGreater(Vec x, float bound) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(x, Splat(bound), _CMP_GT_OQ) != 0;
#else
  for (int l = 0; l < kVec; ++l)
    if (x[l] > bound) return true;
  return false;
#endif
}

// Query blocks [blk_begin, blk_end) of head bh: out and lse rows (the forward pass). NV: vectors
// per micro-tile row in the products whose width is D (DimVectors).
template <int NV>
void ForwardHead(const Problem& pr, int64_t bh, int64_t blk_begin, int64_t blk_end, const float* qp,
                 const float* kp, const float* vp, float* op, float* lp) {
  const Shape& s = pr.s;
  const int64_t ld = s.ld(), n = s.n, np = pr.ldt, dim = s.dim, off = s.head_offset(bh);
  const float scale = pr.scale;
  float* kt = Scratch(kKt, dim * np);
  float* tile = Scratch(kTile, pr.rows_max * np);
  float* v_rows = Scratch(kVRows, n * dim);
  Transpose(kp + off, n, dim, ld, np, kt);
  Gather(vp + off, n, dim, ld, v_rows);
  // -inf on the padding columns n..cols of the last micro-tile column (added to its scores)
  Vec pad[kNV];
  for (int v = 0; v < kNV; ++v)
    for (int l = 0; l < kVec; ++l) pad[v][l] = (pr.cols - kNR) + v * kVec + l < n ? 0.f : -INFINITY;
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t i0 = blk * pr.rows_max, rows = std::min(pr.rows_max, n - i0);
    if (rows <= 0) break;
    float mx[rows], inv[rows];
    Vec sum[rows];
    for (int64_t i = 0; i < rows; ++i) mx[i] = -INFINITY, sum[i] = Vec{};
    // T = exp(scale Q_b K^T - mx), row sums, panel by panel (Product walks each row's panels in order)
    Product(rows, pr.cols, dim, Strided{qp + off + i0 * ld, ld, 1}, kt, np, [&](int64_t i, int64_t j0, const Vec* c) {
      Vec x[kNV];
      for (int v = 0; v < kNV; ++v) x[v] = c[v] * scale;
      if (j0 + kNR > n)
        for (int v = 0; v < kNV; ++v) x[v] += pad[v];
      Vec top = x[0];
      for (int v = 1; v < kNV; ++v) top = top > x[v] ? top : x[v];
      if (AnyGreater(top, mx[i] + kLazyMax)) {  // raise the row's m to this panel's maximum
        float m = top[0];
        for (int l = 1; l < kVec; ++l) m = m > top[l] ? m : top[l];
        if (j0 > 0) {
          const float f = Exp(mx[i] - m);
          float* row = tile + i * np;
          for (int64_t j = 0; j < j0; j += kVec) Store(row + j, Load(row + j) * f);
          sum[i] *= f;
        }
        mx[i] = m;
      }
      const Vec m = Splat(mx[i]);
      for (int v = 0; v < kNV; ++v) {
        const Vec e = ExpVec(x[v] - m);
        Store(tile + i * np + j0 + v * kVec, e);
        sum[i] += e;
      }
    });
    for (int64_t i = 0; i < rows; ++i) {
      float l = 0.f;
      for (int v = 0; v < kVec; ++v) l += sum[i][v];
      inv[i] = 1.f / l;
    }
    float* o = op + off + i0 * ld;
    ProductLongK<NV>(rows, dim, n, Strided{tile, np, 1}, v_rows, dim, Scratch(kAcc, rows * dim),
                     [&](int64_t i, int64_t j, Vec c) { Store(o + i * ld + j, c * inv[i]); });
    for (int64_t i = 0; i < rows; ++i) lp[bh * n + i0 + i] = mx[i] - std::log(inv[i]);
  }
}

#ifndef FWI_KEY_CHUNK
#define FWI_KEY_CHUNK 256
#endif
// Keys per step of the backward pass (a multiple of kNR). Each step's score tile (rows x chunk)
// and its slices of K^T, V^T, K rows, dK and dV (chunk x D each) stay in L2 across its five products.
constexpr int64_t kKeyChunk = FWI_KEY_CHUNK;
static_assert(kKeyChunk % kNR == 0, "key chunks are whole micro-tile columns");

// The backward pass over query blocks [blk_begin, blk_end) of head bh: their dq rows, and their
// contributions to the head's dK, dV into dk_h, dv_h (contiguous (N, D), overwritten). Each block
// walks the keys in chunks of kKeyChunk (P from the saved log-sum-exp needs no whole row).
template <int NV>
void BackwardHead(const Problem& pr, int64_t bh, int64_t blk_begin, int64_t blk_end, const float* qp,
                  const float* kp, const float* vp, const float* op, const float* lp, const float* gp,
                  float* dqp, float* dk_h, float* dv_h) {
  const Shape& s = pr.s;
  const int64_t ld = s.ld(), n = s.n, np = pr.ldt, dim = s.dim, off = s.head_offset(bh);
  const int64_t chunk = std::min(kKeyChunk, pr.cols);
  const int64_t ldc = TileStride(chunk);
  const float scale = pr.scale;
  float* kt = Scratch(kKt, dim * np);
  float* vt = Scratch(kVt, dim * np);
  float* tile = Scratch(kTile, pr.rows_max * ldc);
  float* dq_acc = Scratch(kAcc, pr.rows_max * dim);
  float *k_rows = Scratch(kKRows, n * dim), *q_rows = Scratch(kQRows, n * dim), *g_rows = Scratch(kGRows, n * dim);
  Transpose(kp + off, n, dim, ld, np, kt);
  Transpose(vp + off, n, dim, ld, np, vt);
  Gather(kp + off, n, dim, ld, k_rows);
  Gather(qp + off, n, dim, ld, q_rows);
  Gather(gp + off, n, dim, ld, g_rows);
  std::fill(dk_h, dk_h + n * dim, 0.f);
  std::fill(dv_h, dv_h + n * dim, 0.f);
  for (int64_t i0 = blk_begin * pr.rows_max; i0 < std::min(n, blk_end * pr.rows_max); i0 += pr.rows_max) {
    const int64_t rows = std::min(pr.rows_max, n - i0);
    const float *q_b = q_rows + i0 * dim, *g_b = g_rows + i0 * dim, *o_b = op + off + i0 * ld;
    const float* lse_b = lp + bh * n + i0;
    float delta[rows];
    for (int64_t i = 0; i < rows; ++i) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc += g_b[i * dim + d] * o_b[i * ld + d];
      delta[i] = acc;
    }
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      // keys [c0, c0 + keys); the score products compute `width` columns (whole micro-tiles)
      const int64_t width = std::min(chunk, pr.cols - c0), keys = std::min(chunk, n - c0);
      float *dk_c = dk_h + c0 * dim, *dv_c = dv_h + c0 * dim;
      // T = P = exp(scale Q_b K_c^T - lse)
      Product(rows, width, dim, Strided{q_b, dim, 1}, kt + c0, np, EachVector([&](int64_t i, int64_t j, Vec c) {
        Store(tile + i * ldc + j, ExpVec(c * scale - lse_b[i]));
      }));
      // dV_c += P^T dO_b, kKC rows of P at a time (a kKC x D block of dO_b stays in L1)
      for (int64_t p0 = 0; p0 < rows; p0 += kKC)
        Product<NV>(keys, dim, std::min(kKC, rows - p0), Strided{tile + p0 * ldc, 1, ldc}, g_b + p0 * dim, dim,
                    EachVector<NV>([&](int64_t j, int64_t c, Vec x) { Store(dv_c + j * dim + c, Load(dv_c + j * dim + c) + x); }));
      // T = dS = P * (dO_b V_c^T - delta)
      Product(rows, width, dim, Strided{g_b, dim, 1}, vt + c0, np, EachVector([&](int64_t i, int64_t j, Vec c) {
        float* t = tile + i * ldc + j;
        Store(t, Load(t) * (c - delta[i]));
      }));
      // dQ_b (+)= dS K_c (scaled when written out)
      AccumulateLongK<NV>(rows, dim, keys, Strided{tile, ldc, 1}, k_rows + c0 * dim, dim, dq_acc, c0 > 0);
      // dK_c += scale dS^T Q_b, in kKC-row steps like dV
      for (int64_t p0 = 0; p0 < rows; p0 += kKC)
        Product<NV>(keys, dim, std::min(kKC, rows - p0), Strided{tile + p0 * ldc, 1, ldc}, q_b + p0 * dim, dim,
                    EachVector<NV>([&](int64_t j, int64_t c, Vec x) { Store(dk_c + j * dim + c, Load(dk_c + j * dim + c) + x * scale); }));
    }
    float* dq_b = dqp + off + i0 * ld;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < dim; c += kVec) Store(dq_b + i * ld + c, Load(dq_acc + i * dim + c) * scale);
  }
}

// Calls f(std::integral_constant<int, NV>) with NV the most vectors (<= kNV) per micro-tile row
// that divide head_dim (Prepare checked that kVec does).
template <typename F>
void WithDimVectors(int64_t dim, const F& f) {
  if (kNV >= 4 && dim % (4 * kVec) == 0) return f(std::integral_constant<int, (kNV >= 4 ? 4 : 1)>{});
  if (kNV >= 3 && dim % (3 * kVec) == 0) return f(std::integral_constant<int, (kNV >= 3 ? 3 : 1)>{});
  if (kNV >= 2 && dim % (2 * kVec) == 0) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// Tasks: (head, chunk of query blocks). Heads are cut into chunks only when there are fewer
// than 2 x threads of them (tiny's post-split layers: 3 heads on 2 threads would leave one thread
// idle for a third of the call).
struct Tasks {
  int64_t heads, chunks, per_chunk, n_blocks;
  int64_t count() const { return heads * chunks; }
  int64_t head(int64_t t) const { return t / chunks; }
  int64_t begin(int64_t t) const { return (t % chunks) * per_chunk; }
  int64_t end(int64_t t) const { return std::min(n_blocks, begin(t) + per_chunk); }
};

Tasks SplitTasks(const Problem& pr, ffi::ThreadPool& pool) {
  const int64_t heads = pr.s.bh(), workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min(pr.n_blocks, std::max<int64_t>(1, (2 * workers + heads - 1) / heads));
  return Tasks{heads, chunks, (pr.n_blocks + chunks - 1) / chunks, pr.n_blocks};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, int64_t block) {
  Problem pr;
  if (auto err = Prepare(q, block, &pr); err.failure()) return err;
  for (auto err : {CheckSame(q, k, "k"), CheckSame(q, v, "v")})
    if (err.failure()) return err;
  const Tasks tasks = SplitTasks(pr, pool);
  WithDimVectors(pr.s.dim, [&](auto nv) {
    ParallelFor(pool, tasks.count(), [&](int64_t t) {
      ForwardHead<decltype(nv)::value>(pr, tasks.head(t), tasks.begin(t), tasks.end(t), q.typed_data(),
                                       k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data());
    });
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t block) {
  Problem pr;
  if (auto err = Prepare(q, block, &pr); err.failure()) return err;
  for (auto err : {CheckSame(q, k, "k"), CheckSame(q, v, "v"), CheckSame(q, out, "out"), CheckSame(q, d_out, "d_out")})
    if (err.failure()) return err;
  if (lse.element_count() != static_cast<size_t>(pr.s.bh() * pr.s.n))
    return ffi::Error::InvalidArgument("fused attention: lse must hold (..., heads, tokens) floats");
  // A head cut into chunks sums its chunks' dK, dV partials afterwards.
  const Shape& s = pr.s;
  const Tasks tasks = SplitTasks(pr, pool);
  const int64_t heads = tasks.heads, chunks = tasks.chunks, nd = s.n * s.dim;
  std::vector<float> partials(chunks > 1 ? 2 * tasks.count() * nd : 0);  // [dk | dv][task] (N, D)
  WithDimVectors(s.dim, [&](auto nv) {
    ParallelFor(pool, tasks.count(), [&](int64_t t) {
      const int64_t bh = tasks.head(t);
      float* dk_h = chunks > 1 ? partials.data() + t * nd : Scratch(kDk, nd);
      float* dv_h = chunks > 1 ? partials.data() + (tasks.count() + t) * nd : Scratch(kDv, nd);
      BackwardHead<decltype(nv)::value>(pr, bh, tasks.begin(t), tasks.end(t), q.typed_data(), k.typed_data(),
                                        v.typed_data(), out.typed_data(), lse.typed_data(), d_out.typed_data(),
                                        dq->typed_data(), dk_h, dv_h);
      if (chunks == 1) {
        Scatter(dk_h, s.n, s.dim, s.ld(), dk->typed_data() + s.head_offset(bh));
        Scatter(dv_h, s.n, s.dim, s.ld(), dv->typed_data() + s.head_offset(bh));
      }
    });
  });
  if (chunks > 1) {
    ParallelFor(pool, 2 * heads, [&](int64_t t) {  // (dk or dv, head): sum the chunks, scatter
      const int64_t which = t / heads, bh = t % heads;
      float* sum = partials.data() + (which * heads * chunks + bh * chunks) * nd;
      for (int64_t c = 1; c < chunks; ++c) {
        const float* part = sum + c * nd;
        for (int64_t i = 0; i < nd; ++i) sum[i] += part[i];
      }
      Scatter(sum, s.n, s.dim, s.ld(), (which ? dv : dk)->typed_data() + s.head_offset(bh));
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FwiAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FwiAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int64_t>("block"));
