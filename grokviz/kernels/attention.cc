// Fused CPU attention forward for grokviz (issue 17), called from JAX through the XLA FFI.
//
// Masked grouped-query attention with the logit multiplier, an optional soft cap cap*tanh(x/cap), per-head sinks
// and a boolean `allowed` mask [b, t, S] (padding, causality, sliding windows and a KV-cache buffer all arrive
// through it). One pass over key tiles with an online softmax (running max and sum per query row); key tiles
// whose mask tile is entirely false are skipped, so tiles above the causal diagonal or outside a sliding window
// cost nothing. Work is split over (batch, kv head, query block) tasks claimed from an atomic counter by the
// calling thread and XLA's intra-op thread pool.
//
// Layouts (all fp32, row-major):
//   q       [b, kv, g, t, d]   queries grouped by their kv head
//   k, v    [b, S, kv, d]      keys and values (S >= t with a KV cache)
//   allowed [b, t, S] (PRED)   key j is visible to query i
//   valid   [S] (PRED)         key is not bucket padding (a row with no allowed key is uniform over these)
//   sinks   [kv * g]           sink logits (read only when has_sinks)
//   o       [b, t, kv, g, d]   the output
//   pattern [b, kv * g, t, S]  the normalised weights (the "_pattern" target only)
//   maps    [n, b, kv * g, t, S], slot [] (S32)  the "_into" target: the weights are written into maps[slot] of a
//           buffer aliased to its output (a run's stacked per-layer maps), which it returns; every element of that
//           slot is written, the other slots are left as they are
//
// A row with no allowed key is what the reference gives it: without sinks uniform over the valid keys (its
// output the mean of their values), with sinks 0. Masked keys weigh exactly 0, as exp(-1e30 - m) does.
// The pattern target runs the same arithmetic for the output (so the output is bit for bit the same with and
// without the pattern); it writes exp(s - m_running) once per tile and rescales each row once at the end.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// GCC/Clang vector extensions: one register of kV floats (AVX-512: 16, AVX: 8, else 4)
// Register blocks: kRB query rows x kJV key vectors of scores in Q.K^T, kRB rows x kDV head-dim vectors of
// output in P.V (each loaded key or value vector serves kRB rows). Chosen by measurement on an AVX-512 EPYC
// (8 x 2 x 2 beat 4 x 4 x 4, 6 x 4 x 2, 12 x 2 x 2, 16 x 1 x 1 by 5-30 %); AVX2 has 16 registers, so 4 rows.
#if defined(__AVX512F__)
constexpr int kV = 16;
constexpr int kRB = 8;
#elif defined(__AVX__)
constexpr int kV = 8;
constexpr int kRB = 4;
#else
constexpr int kV = 4;
constexpr int kRB = 4;
#endif
constexpr int kJV = 2;
constexpr int kDV = 2;
constexpr int kJC = kV * kJV;  // keys per register block
typedef float vf __attribute__((vector_size(kV * 4)));
typedef int32_t vi __attribute__((vector_size(kV * 4)));

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) {  // a broadcast (vf{} + x would add 0 to x first: -0.0 + 0 is not -0.0)
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#else
  return vf{x, x, x, x};
#endif
}

inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < kV; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < kV; ++i) m = std::max(m, v[i]); return m; }

// exp for x <= ~88: Cody-Waite reduction x = n ln2 + r (n rounded to nearest with the 1.5 * 2^23 trick) and the
// Cephes expf polynomial on r (|r| <= ln2 / 2), about 1 ulp; 0 below -87.3 (where expf turns denormal) and for
// -inf. Branch free.
inline vf vexp(vf x) {
  const vf xc = vmin(x, splat(88.0f));
  const vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const vf z = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const vi ni = __builtin_convertvector(vmax(n, splat(-126.0f)), vi);
  const vf scale = (vf)((ni + 127) << 23);
  return x < -87.3f ? splat(0.0f) : p * scale;
}

// tanh as a rational minimax form p(x) / q(x), p odd of degree 13 and q even of degree 6 in x clamped to [-9, 9],
// and x itself for |x| < 4e-4. The coefficients are those of Eigen's fast float tanh, which XLA's CPU backend also
// emits for tanh (xla/service/llvm_ir/math_ops.cc), so the reference form's soft cap is the same function: one
// division and 11 multiply-adds, where exp-based forms cost an exp, a reciprocal and a select of two branches
// (measured: the soft cap took half of the kernel's time at 1x1024 on AVX2 with those).
inline vf vtanh(vf x) {
  const vf c = vmin(vmax(x, splat(-9.0f)), splat(9.0f));
  const vf s = c * c;
  vf p = splat(-2.76076847742355e-16f);
  p = p * s + 2.00018790482477e-13f;
  p = p * s - 8.60467152213735e-11f;
  p = p * s + 5.12229709037114e-08f;
  p = p * s + 1.48572235717979e-05f;
  p = p * s + 6.37261928875436e-04f;
  p = p * s + 4.89352455891786e-03f;
  vf q = splat(1.19825839466702e-06f);
  q = q * s + 1.18534705686654e-04f;
  q = q * s + 2.26843463243900e-03f;
  q = q * s + 4.89352518554385e-03f;
  const vf a = x < 0.0f ? -x : x;
  return a < 4e-4f ? x : (c * p) / q;
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const bool* allowed;
  const bool* valid;
  const float* sinks;
  float* o;
  float* pattern;  // null: no pattern
  int64_t b, kv, g, t, S, d;
  float mult, cap;
  bool has_sinks;
  int64_t tq, tk;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One (batch, kv head, query block) task: every query head of the group over every key tile.
template <int D>
void run_task(const Problem& P, int64_t bi, int64_t hi, int64_t qb, std::vector<float>& scratch) {
  const int64_t d = D > 0 ? D : P.d;
  const int64_t g = P.g, S = P.S, TK = P.tk;
  const int64_t q0 = qb * P.tq, nq = std::min(P.tq, P.t - q0);
  const int64_t R = nq * g;  // rows: r = qi * g + gi
  const int64_t n_tiles = (S + TK - 1) / TK;
  const int64_t TKp = (TK + kJC - 1) / kJC * kJC;
  // scratch: K^T tile [d][TKp], scores [kRB][TKp], m, l [R], acc [R][d], m per (row, tile) for the pattern
  const size_t need = d * TKp + (kRB + 1) * TKp + 2 * R + R * d + (P.pattern ? R * n_tiles : 0) + nq;
  if (scratch.size() < need) scratch.resize(need);
  float* kt = scratch.data();
  float* sc = kt + d * TKp;
  float* bias = sc + kRB * TKp;  // the mask row of one query as 0 / -inf
  float* m = bias + TKp;
  float* l = m + R;
  float* acc = l + R;
  float* mt = acc + R * d;
  float* any = mt + (P.pattern ? R * n_tiles : 0);  // per query: 1 if some key is allowed
  for (int64_t r = 0; r < R; ++r) {
    m[r] = P.has_sinks ? P.sinks[hi * g + r % g] : kNegInf;
    l[r] = 0.0f;
  }
  std::fill(acc, acc + R * d, 0.0f);
  std::fill(any, any + nq, 0.0f);
  if (P.pattern) std::fill(mt, mt + R * n_tiles, std::numeric_limits<float>::quiet_NaN());  // NaN: not visited

  const int64_t kstride = P.kv * d;  // between consecutive keys in k, v
  const float* kbase = P.k + (bi * S * P.kv + hi) * d;
  const float* vbase = P.v + (bi * S * P.kv + hi) * d;
  const bool* abase = P.allowed + (bi * P.t + q0) * S;

  for (int64_t jt = 0; jt < n_tiles; ++jt) {
    const int64_t j0 = jt * TK, nk = std::min(TK, S - j0);
    // skip a tile whose mask is entirely false
    bool tile_any = false;
    for (int64_t qi = 0; qi < nq && !tile_any; ++qi) {
      const uint8_t* a = reinterpret_cast<const uint8_t*>(abase + qi * S + j0);
      uint8_t acc_or = 0;
      for (int64_t j = 0; j < nk; ++j) acc_or |= a[j];
      tile_any = acc_or != 0;
    }
    if (!tile_any) continue;
    // K^T tile, zero padded to TKp keys
    for (int64_t dd = 0; dd < d; ++dd) {
      float* row = kt + dd * TKp;
      for (int64_t j = 0; j < nk; ++j) row[j] = kbase[(j0 + j) * kstride + dd];
      for (int64_t j = nk; j < TKp; ++j) row[j] = 0.0f;
    }
    for (int64_t r0 = 0; r0 < R; r0 += kRB) {
      const int rb = static_cast<int>(std::min<int64_t>(kRB, R - r0));
      const float* qrow[kRB];
      for (int i = 0; i < kRB; ++i) {
        const int64_t r = r0 + std::min(i, rb - 1);
        const int64_t qi = r / g, gi = r % g;
        qrow[i] = P.q + (((bi * P.kv + hi) * g + gi) * P.t + q0 + qi) * d;
      }
      // scores = Q K^T for kRB rows, kJC keys at a time in registers (rank-1 updates over the head dim)
      for (int64_t jc = 0; jc < TKp; jc += kJC) {
        vf acc_s[kRB][kJV];
        for (int i = 0; i < kRB; ++i)
          for (int c = 0; c < kJV; ++c) acc_s[i][c] = splat(0.0f);
        for (int64_t dd = 0; dd < d; ++dd) {
          const float* kr = kt + dd * TKp + jc;
          vf kv[kJV];
          for (int c = 0; c < kJV; ++c) kv[c] = vload(kr + c * kV);
          for (int i = 0; i < kRB; ++i) {
            const vf qv = splat(qrow[i][dd]);
            for (int c = 0; c < kJV; ++c) acc_s[i][c] += qv * kv[c];
          }
        }
        for (int i = 0; i < kRB; ++i)
          for (int c = 0; c < kJV; ++c) vstore(sc + i * TKp + jc + c * kV, acc_s[i][c]);
      }
      const float mult = P.mult, cap = P.cap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
      for (int i = 0; i < rb; ++i) {
        const int64_t r = r0 + i, qi = r / g;
        const uint8_t* a = reinterpret_cast<const uint8_t*>(abase + qi * S + j0);
        float* x = sc + i * TKp;
        if (i == 0 || (r - 1) / g != qi) {  // the mask row as 0 / -inf (and -inf past the tile), once per query
          for (int64_t j = 0; j < nk; ++j) bias[j] = a[j] ? 0.0f : kNegInf;
          for (int64_t j = nk; j < TKp; ++j) bias[j] = kNegInf;
        }
        vf vmx = splat(kNegInf);
        for (int64_t j = 0; j < TKp; j += kV) {
          vf y = vload(x + j) * mult;
          if (cap > 0.0f) y = cap * vtanh(y * inv_cap);  // the reference: cap * tanh(x / cap)
          y += vload(bias + j);
          vstore(x + j, y);
          vmx = vmax(vmx, y);
        }
        const float mx = hmax(vmx);
        const float m_new = std::max(m[r], mx);
        float* pat = P.pattern ? P.pattern + (((bi * P.kv + hi) * g + r % g) * P.t + q0 + qi) * S + j0 : nullptr;
        if (m_new == kNegInf) {  // nothing allowed for this row so far: weight 0 everywhere
          std::fill(x, x + TKp, 0.0f);
          if (pat) std::fill(pat, pat + nk, 0.0f);
          continue;
        }
        if (mx != kNegInf) any[qi] = 1.0f;
        const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
        vf vsum = splat(0.0f);
        const vf vm = splat(m_new);
        for (int64_t j = 0; j < TKp; j += kV) {
          const vf e = vexp(vload(x + j) - vm);
          vstore(x + j, e);
          vsum += e;
        }
        m[r] = m_new;
        l[r] = l[r] * alpha + hsum(vsum);
        if (pat) {
          std::memcpy(pat, x, nk * sizeof(float));
          mt[r * n_tiles + jt] = m_new;
        }
        float* ar = acc + r * d;
        if (alpha != 1.0f)
          for (int64_t dd = 0; dd < d; ++dd) ar[dd] *= alpha;
      }
      // acc += P V for the block's rows: accumulators in registers, one value row read for kRB query rows
      if (d % kV == 0) {
        for (int64_t dc = 0; dc < d; dc += kDV * kV) {
          const int nv = static_cast<int>(std::min<int64_t>(kDV, (d - dc) / kV));
          vf av[kRB][kDV];
          for (int i = 0; i < kRB; ++i)
            for (int c = 0; c < kDV; ++c) av[i][c] = (i < rb && c < nv) ? vload(acc + (r0 + i) * d + dc + c * kV)
                                                                         : splat(0.0f);
          for (int64_t j = 0; j < nk; ++j) {
            const float* vr = vbase + (j0 + j) * kstride + dc;
            vf vv[kDV];
            for (int c = 0; c < kDV; ++c) vv[c] = c < nv ? vload(vr + c * kV) : splat(0.0f);
            for (int i = 0; i < kRB; ++i) {
              const vf pj = splat(sc[i * TKp + j]);
              for (int c = 0; c < kDV; ++c) av[i][c] += pj * vv[c];
            }
          }
          for (int i = 0; i < rb; ++i)
            for (int c = 0; c < nv; ++c) vstore(acc + (r0 + i) * d + dc + c * kV, av[i][c]);
        }
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const float* vr = vbase + (j0 + j) * kstride;
          for (int i = 0; i < rb; ++i) {
            const float p = sc[i * TKp + j];
            float* ar = acc + (r0 + i) * d;
            for (int64_t dd = 0; dd < d; ++dd) ar[dd] += p * vr[dd];
          }
        }
      }
    }
  }

  // normalise; rows with no allowed key get the reference's answer
  int64_t n_valid = 0;
  for (int64_t j = 0; j < S; ++j) n_valid += P.valid[j] ? 1 : 0;
  std::vector<float> vmean;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t qi = r / g, gi = r % g;
    float* orow = P.o + (((bi * P.t + q0 + qi) * P.kv + hi) * g + gi) * d;
    float* prow = P.pattern ? P.pattern + (((bi * P.kv + hi) * g + gi) * P.t + q0 + qi) * S : nullptr;
    const bool empty = any[qi] == 0.0f;
    if (empty && !P.has_sinks) {
      if (vmean.empty()) {
        vmean.assign(d, 0.0f);
        for (int64_t j = 0; j < S; ++j)
          if (P.valid[j])
            for (int64_t dd = 0; dd < d; ++dd) vmean[dd] += vbase[j * kstride + dd];
        for (int64_t dd = 0; dd < d; ++dd) vmean[dd] /= static_cast<float>(n_valid);
      }
      std::memcpy(orow, vmean.data(), d * sizeof(float));
      if (prow) {
        const float u = 1.0f / static_cast<float>(n_valid);
        for (int64_t j = 0; j < S; ++j) prow[j] = P.valid[j] ? u : 0.0f;
      }
      continue;
    }
    const float total = l[r] + (P.has_sinks ? std::exp(P.sinks[hi * g + gi] - m[r]) : 0.0f);
    const float* ar = acc + r * d;
    for (int64_t dd = 0; dd < d; ++dd) orow[dd] = ar[dd] / total;
    if (prow) {
      for (int64_t jt = 0; jt < n_tiles; ++jt) {
        const int64_t j0 = jt * TK, nk = std::min(TK, S - j0);
        const float mj = mt[r * n_tiles + jt];
        float* pt = prow + j0;
        if (std::isnan(mj) || mj == kNegInf) {
          if (std::isnan(mj)) std::fill(pt, pt + nk, 0.0f);  // skipped tile (a row-skipped one holds zeros)
          continue;
        }
        const float scale = std::exp(mj - m[r]) / total;
        for (int64_t j = 0; j < nk; ++j) pt[j] = pt[j] * scale;
      }
    }
  }
}

using TaskFn = void (*)(const Problem&, int64_t, int64_t, int64_t, std::vector<float>&);

TaskFn pick(int64_t d) {
  switch (d) {
    case 32: return run_task<32>;
    case 64: return run_task<64>;
    case 128: return run_task<128>;
    default: return run_task<0>;
  }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
};

// Run every task: the calling thread and up to (threads - 1) pool helpers claim tasks from one counter (the
// caller alone finishes them if no helper runs, so this never waits on a busy pool); largest tasks first.
void run_all(const Problem& P, ffi::ThreadPool* pool) {
  const int64_t nqb = (P.t + P.tq - 1) / P.tq;
  auto shared = std::make_shared<Shared>();
  shared->n = P.b * P.kv * nqb;
  const TaskFn fn = pick(P.d);
  auto work = [P, nqb, fn](Shared& s) {
    std::vector<float> scratch;
    for (;;) {
      const int64_t i = s.next.fetch_add(1);
      if (i >= s.n) return;
      const int64_t per = P.b * P.kv;
      const int64_t qb = nqb - 1 - i / per, rest = i % per;  // later query blocks see more keys: first
      fn(P, rest / P.kv, rest % P.kv, qb, scratch);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = pool ? std::min<int64_t>(pool->num_threads(), shared->n) - 1 : 0;
  for (int64_t h = 0; h < helpers; ++h) pool->Schedule([shared, work]() { work(*shared); });
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->n) std::this_thread::yield();
}

ffi::Error check_dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                      const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::PRED>& allowed,
                      const ffi::Buffer<ffi::PRED>& valid, const ffi::Buffer<ffi::F32>& sinks, int64_t tq,
                      int64_t tk) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ad = allowed.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4 || ad.size() != 3 || valid.dimensions().size() != 1 ||
      sinks.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("grokviz attention: expected q [b,kv,g,t,d], k, v [b,S,kv,d], "
                                       "allowed [b,t,S], valid [S], sinks [kv*g]");
  const int64_t b = qd[0], kvh = qd[1], g = qd[2], t = qd[3], d = qd[4], S = kd[1];
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("grokviz attention: k and v differ in shape");
  if (kd[0] != b || kd[2] != kvh || kd[3] != d || ad[0] != b || ad[1] != t || ad[2] != S ||
      valid.dimensions()[0] != S || sinks.dimensions()[0] != kvh * g)
    return ffi::Error::InvalidArgument("grokviz attention: inconsistent shapes");
  if (tq < 1 || tk < 1) return ffi::Error::InvalidArgument("grokviz attention: tiles must be positive");
  return ffi::Error::Success();
}

Problem make_problem(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                     const ffi::Buffer<ffi::PRED>& allowed, const ffi::Buffer<ffi::PRED>& valid,
                     const ffi::Buffer<ffi::F32>& sinks, float* o, float* pattern, float mult, float cap,
                     int64_t has_sinks, int64_t tq, int64_t tk) {
  auto qd = q.dimensions();
  Problem P{q.typed_data(), k.typed_data(), v.typed_data(), allowed.typed_data(), valid.typed_data(),
            sinks.typed_data(), o, pattern, qd[0], qd[1], qd[2], qd[3], k.dimensions()[1], qd[4], mult, cap,
            has_sinks != 0, std::min(tq, qd[3]), std::min(tk, k.dimensions()[1])};
  return P;
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::PRED> valid,
                         ffi::Buffer<ffi::F32> sinks, ffi::ResultBuffer<ffi::F32> o, float mult, float cap,
                         int64_t has_sinks, int64_t tq, int64_t tk) {
  ffi::Error err = check_dims(q, k, v, allowed, valid, sinks, tq, tk);
  if (!err.success()) return err;
  Problem P = make_problem(q, k, v, allowed, valid, sinks, o->typed_data(), nullptr, mult, cap, has_sinks, tq, tk);
  run_all(P, &pool);
  return ffi::Error::Success();
}

ffi::Error AttentionPatternImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed,
                                ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> sinks,
                                ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> pattern, float mult,
                                float cap, int64_t has_sinks, int64_t tq, int64_t tk) {
  ffi::Error err = check_dims(q, k, v, allowed, valid, sinks, tq, tk);
  if (!err.success()) return err;
  Problem P = make_problem(q, k, v, allowed, valid, sinks, o->typed_data(), pattern->typed_data(), mult, cap,
                           has_sinks, tq, tk);
  run_all(P, &pool);
  return ffi::Error::Success();
}

ffi::Error AttentionIntoImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::PRED> valid,
                             ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::F32> maps, ffi::Buffer<ffi::S32> slot,
                             ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> maps_out, float mult,
                             float cap, int64_t has_sinks, int64_t tq, int64_t tk) {
  ffi::Error err = check_dims(q, k, v, allowed, valid, sinks, tq, tk);
  if (!err.success()) return err;
  auto qd = q.dimensions(), md = maps.dimensions();
  const int64_t S = k.dimensions()[1];
  if (md.size() != 5 || md[1] != qd[0] || md[2] != qd[1] * qd[2] || md[3] != qd[3] || md[4] != S ||
      slot.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("grokviz attention: maps must be [n, b, heads, t, S] and slot a scalar");
  const int64_t n = md[0], at = slot.typed_data()[0];
  if (at < 0 || at >= n) return ffi::Error::InvalidArgument("grokviz attention: slot outside the maps buffer");
  float* out = maps_out->typed_data();
  const int64_t per = md[1] * md[2] * md[3] * md[4];
  if (out != maps.typed_data()) std::memcpy(out, maps.typed_data(), static_cast<size_t>(n * per) * sizeof(float));
  Problem P = make_problem(q, k, v, allowed, valid, sinks, o->typed_data(), out + at * per, mult, cap, has_sinks,
                           tq, tk);
  run_all(P, &pool);
  return ffi::Error::Success();
}

ffi::Error UninitImpl(ffi::ResultBuffer<ffi::F32>) { return ffi::Error::Success(); }

// The bindings every attention target shares: the thread pool and q, k, v, allowed, valid, sinks in front, the
// attributes last (the "_into" target's extra inputs and the results go between, in the handlers' order).
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

template <typename B>
auto WithAttrs(B b) {
  return std::move(b)  // the binder's methods take it as an rvalue
      .template Attr<float>("mult")
      .template Attr<float>("cap")
      .template Attr<int64_t>("has_sinks")
      .template Attr<int64_t>("tq")
      .template Attr<int64_t>("tk");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokvizAttention, AttentionImpl, WithAttrs(BindInputs().Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokvizAttentionPattern, AttentionPatternImpl,
                              WithAttrs(BindInputs().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokvizAttentionInto, AttentionIntoImpl,
                              WithAttrs(BindInputs()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::S32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokvizUninit, UninitImpl, ffi::Ffi::Bind().Ret<ffi::Buffer<ffi::F32>>());
