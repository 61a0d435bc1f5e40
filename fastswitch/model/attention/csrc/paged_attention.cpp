// Paged attention on the CPU, reading FastSwitch's block-major KV pool in place through the block table.
//
// One op per layer: write the batch's new K/V at their slots, then attend every sequence's queries
// (one for a decode, many for a prefill chunk, causal inside the chunk) to its whole context, with an
// online softmax in fp32 whatever the storage dtype. Work items are (sequence, KV heads, query tile,
// context split): the query heads of a GQA group, and for a decode every KV head of the sequence,
// share each block read (a block's rows for all heads are adjacent). Items run heaviest first
// on torch's threads; a long context is split when there are too few items to keep every thread
// busy, and the splits' partial softmaxes are merged. The vector width is the machine's: the module
// is compiled on first use with -march=native, so AVX-512 or AVX2 code is what this CPU runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int MAX_TILE_QUERIES = 64;   // query vectors (rows x heads of a group) sharing one K/V read
constexpr int MIN_SPLIT_TOKENS = 256;  // a context split shorter than this costs more to merge than it saves
constexpr int WIDE_QUERIES = 8;        // from this many query vectors, scores come from a transposed K block
constexpr int PREFETCH_BLOCKS = 8;     // how far ahead in the block table the rows are asked for

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Reduction of the lanes (sum or max), halving the vector each step.
template <typename Op>
inline float reduce(vf v, Op op) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
#if defined(__AVX512F__)
  const v8 h = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  v4 x = op(__builtin_shufflevector(h, h, 0, 1, 2, 3), __builtin_shufflevector(h, h, 4, 5, 6, 7));
#elif defined(__AVX2__)
  v4 x = op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  v4 x = v;
#endif
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1));
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2));
  return x[0];
}
inline float hsum(vf v) { return reduce(v, [](auto a, auto b) { return a + b; }); }
inline float hmax(vf v) { return reduce(v, [](auto a, auto b) { return a > b ? a : b; }); }

// W dot products' partial vectors to one vector of their sums, in order: each step folds two vectors of n
// keys (segments of L lanes) into one of 2n keys (segments of L / 2), adding each segment's two halves.
constexpr int fold_lane(int L, int t, bool high) {
  const int half = W / 2, seg = L / 2, u = t % half;
  return (t >= half ? W : 0) + u / seg * L + u % seg + (high ? seg : 0);
}
template <int L, size_t... t>
inline vf fold(vf a, vf b, std::index_sequence<t...>) {
  return __builtin_shufflevector(a, b, fold_lane(L, t, false)...) +
         __builtin_shufflevector(a, b, fold_lane(L, t, true)...);
}
template <int L = W>
inline vf sums_of(vf* p) {  // overwrites p
  for (int i = 0; i < L / 2; ++i) p[i] = fold<L>(p[2 * i], p[2 * i + 1], std::make_index_sequence<W>{});
  if constexpr (L > 2) return sums_of<L / 2>(p);
  else return p[0];
}

// exp(x) for x <= 0 (Cephes' polynomial, about 2 ulp); -inf gives exactly 0.
inline vf vexp(vf x) {
  const vi dead = x < splat(-87.3f);
  x = dead ? splat(-87.3f) : x;
  const vf n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi), vf);
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return dead ? vf{} : p * scale;
}

// Into L2: blocks ahead are many, L1's miss buffers few. GCC drops a loop of __builtin_prefetch as free
// of side effects; an asm statement it must keep.
inline void prefetch(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

inline float exp_scalar(float x) { return x == NEG_INF ? 0.f : std::exp(x); }

// Storage dtypes to and from fp32.
inline void to_float(float* dst, const float* src, int n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(float* dst, const at::BFloat16* src, int n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  for (int i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(s[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof bits);
  }
}
inline void to_float(float* dst, const at::Half* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void from_float(T* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

struct Item {
  int seq, head, heads;       // KV heads [head, head + heads): a block's rows for all of them are adjacent
  int row0, rows;             // rows [row0, row0 + rows) of the sequence's query chunk
  int key_begin, key_end;     // context tokens this item attends (key_begin is block-aligned)
  int part;                   // -1: writes the output; else its slot among the partial results
  int64_t cost;
};

// Per-thread buffers, fp32, each row padded to DP (head_dim rounded up to the vector width).
struct Scratch {
  std::vector<float> q, acc, scores, kbuf, vbuf, kt, row_max, row_sum;
  std::vector<int> pos;
  Scratch(int DP, int BSP) :
      q(MAX_TILE_QUERIES * DP), acc(MAX_TILE_QUERIES * DP), scores(MAX_TILE_QUERIES * BSP), kbuf(BSP * DP),
      vbuf(BSP * DP), kt(DP * BSP), row_max(MAX_TILE_QUERIES), row_sum(MAX_TILE_QUERIES), pos(MAX_TILE_QUERIES) {}
};

template <typename T>
struct PagedAttention {
  const T *q, *k_cache, *v_cache;
  T* out;
  int64_t q_tok, q_head, o_tok, o_head, c_block, c_tok, c_head, table_stride;
  const int32_t *table, *qsl, *lens;
  int group, D, DP, bs, BSP;
  float scale;

  int query_len(int seq) const { return qsl[seq + 1] - qsl[seq]; }

  // Query vector m of an item: KV head by KV head, then row by row, then the heads of the GQA group.
  std::pair<int, int> row_and_head(const Item& it, int m) const {
    const int per_kv_head = it.rows * group;
    return {it.row0 + m % per_kv_head / group, (it.head + m / per_kv_head) * group + m % group};
  }

  // Loads the item's queries (pre-scaled) and their positions.
  int load_queries(const Item& it, Scratch& s) const {
    const int first_pos = lens[it.seq] - query_len(it.seq);
    const int M = it.heads * it.rows * group;
    for (int m = 0; m < M; ++m) {
      const auto [row, head] = row_and_head(it, m);
      float* dst = &s.q[m * DP];
      to_float(dst, q + (qsl[it.seq] + row) * q_tok + head * q_head, D);
      std::fill(dst + D, dst + DP, 0.f);
      for (int d = 0; d < D; ++d) dst[d] *= scale;
      s.pos[m] = first_pos + row;
      s.row_max[m] = NEG_INF;
      s.row_sum[m] = 0.f;
    }
    std::fill(s.acc.begin(), s.acc.begin() + M * DP, 0.f);
    return M;
  }

  // The next block is elsewhere in the pool: ask for its rows now, so they arrive while this one is computed.
  void prefetch_block(const T* base, int n, int heads) const {
    const int bytes = int(((heads - 1) * c_head + D) * sizeof(T));
    for (int j = 0; j < n; ++j)
      for (int byte = 0; byte < bytes; byte += 64)
        prefetch(reinterpret_cast<const char*>(base + j * c_tok) + byte);
  }

  void load_block(const T* base, int n, float* dst) const {
    for (int j = 0; j < n; ++j) {
      to_float(dst + j * DP, base + j * c_tok, D);
      std::fill(dst + j * DP + D, dst + (j + 1) * DP, 0.f);
    }
    std::fill(dst + n * DP, dst + BSP * DP, 0.f);
  }

  // Calls f(std::integral_constant<int, DP / W>) for the row widths kept in registers, else f(<0>): loops
  // over a compile-time number of vectors let the compiler keep a row in registers.
  template <typename F>
  void with_row_vectors(F f) const {
    switch (DP / W) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 3: return f(std::integral_constant<int, 3>{});
      case 4: return f(std::integral_constant<int, 4>{});
      case 5: return f(std::integral_constant<int, 5>{});
      case 6: return f(std::integral_constant<int, 6>{});
      case 8: return f(std::integral_constant<int, 8>{});
      default: return f(std::integral_constant<int, 0>{});
    }
  }

  // scores[m][j] = q_m . k_j: q_m in registers, W keys' partial vectors folded together (decode).
  template <int C>
  void scores_by_dot(Scratch& s, int m0, int M) const {
    const int chunks = C ? C : DP / W;
    vf partial[W], q[C ? C : 1];
    for (int m = m0; m < m0 + M; ++m) {
      const float* qm = &s.q[m * DP];
      if constexpr (C > 0)
        for (int c = 0; c < C; ++c) q[c] = load(qm + c * W);
      for (int j0 = 0; j0 < BSP; j0 += W) {
        for (int j = 0; j < W; ++j) {
          const float* kj = &s.kbuf[(j0 + j) * DP];
          vf sum{};
          for (int c = 0; c < chunks; ++c) sum += (C > 0 ? q[c] : load(qm + c * W)) * load(kj + c * W);
          partial[j] = sum;
        }
        store(&s.scores[m * BSP + j0], sums_of(partial));
      }
    }
  }

  // scores[m][:] = sum_d q_m[d] * kt[d][:]: vectors along the keys, four query vectors per K load (prefill).
  void scores_by_transpose(Scratch& s, int m0, int M) const {
    for (int j = 0; j < BSP; ++j)
      for (int d = 0; d < DP; ++d) s.kt[d * BSP + j] = s.kbuf[j * DP + d];
    for (int c = 0; c < BSP; c += W) {
      int m = m0;
      for (; m + 4 <= m0 + M; m += 4) {
        const float *q0 = &s.q[m * DP], *q1 = q0 + DP, *q2 = q1 + DP, *q3 = q2 + DP;
        vf s0{}, s1{}, s2{}, s3{};
        for (int d = 0; d < DP; ++d) {
          const vf k = load(&s.kt[d * BSP + c]);
          s0 += q0[d] * k;
          s1 += q1[d] * k;
          s2 += q2[d] * k;
          s3 += q3[d] * k;
        }
        store(&s.scores[m * BSP + c], s0);
        store(&s.scores[(m + 1) * BSP + c], s1);
        store(&s.scores[(m + 2) * BSP + c], s2);
        store(&s.scores[(m + 3) * BSP + c], s3);
      }
      for (; m < m0 + M; ++m) {
        const float* qm = &s.q[m * DP];
        vf s0{}, s1{};
        for (int d = 0; d < DP; d += 2) {
          s0 += qm[d] * load(&s.kt[d * BSP + c]);
          s1 += qm[d + 1] * load(&s.kt[(d + 1) * BSP + c]);
        }
        store(&s.scores[m * BSP + c], s0 + s1);
      }
    }
  }

  // Online softmax over one block's scores, then acc = acc * correction + p . V.
  void accumulate(Scratch& s, int m0, int M, int block_start, int n) const {
    for (int m = m0; m < m0 + M; ++m) {
      const int valid = std::min(n, s.pos[m] - block_start + 1);
      if (valid <= 0) continue;
      float* sc = &s.scores[m * BSP];
      std::fill(sc + valid, sc + BSP, NEG_INF);
      vf top = load(sc);
      for (int c = W; c < BSP; c += W) top = top > load(sc + c) ? top : load(sc + c);
      const float new_max = std::max(s.row_max[m], hmax(top));
      const float correction = exp_scalar(s.row_max[m] - new_max);
      vf sum{};
      for (int c = 0; c < BSP; c += W) {
        const vf p = vexp(load(sc + c) - new_max);
        store(sc + c, p);
        sum += p;
      }
      s.row_sum[m] = s.row_sum[m] * correction + hsum(sum);
      s.row_max[m] = new_max;
      float* acc = &s.acc[m * DP];
      with_row_vectors([&](auto C) { this->template add_values<C()>(acc, correction, sc, s.vbuf.data(), valid); });
    }
  }

  // acc = acc * correction + sum_j p[j] * V[j], acc in registers across the rows j.
  template <int C>
  void add_values(float* acc, float correction, const float* p, const float* v, int n) const {
    if constexpr (C == 0) {
      for (int c = 0; c < DP; c += W) {
        vf a = load(acc + c) * correction;
        for (int j = 0; j < n; ++j) a += p[j] * load(v + j * DP + c);
        store(acc + c, a);
      }
    } else {
      vf a[C];
      for (int c = 0; c < C; ++c) a[c] = load(acc + c * W) * correction;
      for (int j = 0; j < n; ++j)
        for (int c = 0; c < C; ++c) a[c] += p[j] * load(v + j * DP + c * W);
      for (int c = 0; c < C; ++c) store(acc + c * W, a[c]);
    }
  }

  void run(const Item& it, Scratch& s, float* partials) const {
    const int M = load_queries(it, s), per_kv_head = it.rows * group;
    const int32_t* blocks = table + it.seq * table_stride;
    const int64_t head_offset = int64_t(it.head) * c_head;
    auto prefetch_ahead = [&](int start) {
      if (start >= it.key_end) return;
      const int64_t at = blocks[start / bs] * c_block + head_offset;
      prefetch_block(k_cache + at, std::min(bs, it.key_end - start), it.heads);
      prefetch_block(v_cache + at, std::min(bs, it.key_end - start), it.heads);
    };
    for (int ahead = 0; ahead < PREFETCH_BLOCKS; ++ahead) prefetch_ahead(it.key_begin + ahead * bs);
    for (int start = it.key_begin; start < it.key_end; start += bs) {
      const int n = std::min(bs, it.key_end - start);
      const int64_t block = blocks[start / bs];
      prefetch_ahead(start + PREFETCH_BLOCKS * bs);
      for (int h = 0; h < it.heads; ++h) {
        const int64_t at = block * c_block + head_offset + h * c_head;
        load_block(k_cache + at, n, s.kbuf.data());
        load_block(v_cache + at, n, s.vbuf.data());
        if (per_kv_head >= WIDE_QUERIES) scores_by_transpose(s, h * per_kv_head, per_kv_head);
        else with_row_vectors([&](auto C) { this->template scores_by_dot<C()>(s, h * per_kv_head, per_kv_head); });
        accumulate(s, h * per_kv_head, per_kv_head, start, n);
      }
    }
    if (it.part < 0) {
      for (int m = 0; m < M; ++m) write_row(it, m, &s.acc[m * DP], 1.f / s.row_sum[m]);
      return;
    }
    float* dst = partials + int64_t(it.part) * MAX_TILE_QUERIES * (DP + 2);
    for (int m = 0; m < M; ++m) {  // each row: [max, sum, acc[DP]]
      float* row = dst + m * (DP + 2);
      row[0] = s.row_max[m];
      row[1] = s.row_sum[m];
      std::memcpy(row + 2, &s.acc[m * DP], DP * sizeof(float));
    }
  }

  void write_row(const Item& it, int m, const float* acc, float inv_sum) const {
    const auto [row, head] = row_and_head(it, m);
    float tmp[1024];
    for (int d = 0; d < D; ++d) tmp[d] = acc[d] * inv_sum;
    from_float(out + (qsl[it.seq] + row) * o_tok + head * o_head, tmp, D);
  }

  // Combines the partial softmaxes of an item's `parts` consecutive context splits.
  void merge(const Item& it, int parts, const float* partials, std::vector<float>& acc) const {
    const int M = it.heads * it.rows * group;
    const int64_t part_size = int64_t(MAX_TILE_QUERIES) * (DP + 2);
    const float* first = partials + int64_t(it.part) * part_size;
    for (int m = 0; m < M; ++m) {
      float top = NEG_INF, total = 0.f;
      for (int p = 0; p < parts; ++p) top = std::max(top, first[p * part_size + m * (DP + 2)]);
      std::fill(acc.begin(), acc.begin() + DP, 0.f);
      for (int p = 0; p < parts; ++p) {
        const float* row = first + p * part_size + m * (DP + 2);
        const float w = exp_scalar(row[0] - top);
        total += row[1] * w;
        for (int d = 0; d < DP; ++d) acc[d] += row[2 + d] * w;
      }
      write_row(it, m, acc.data(), 1.f / total);
    }
  }
};

// (sequence, KV heads, query tile) items; contexts split along blocks when items are too few for the threads.
std::vector<Item> plan(const int32_t* qsl, const int32_t* lens, int batch, int kv_heads, int group, int bs,
                       int threads, std::vector<std::pair<Item, int>>& merges) {
  const int tile_rows = std::max(1, MAX_TILE_QUERIES / group);
  std::vector<Item> base;
  for (int b = 0; b < batch; ++b) {
    const int q_len = qsl[b + 1] - qsl[b], first_pos = lens[b] - q_len;
    for (int row0 = 0; row0 < q_len; row0 += tile_rows) {
      const int rows = std::min(tile_rows, q_len - row0), key_end = first_pos + row0 + rows;
      const int heads = std::max(1, std::min(kv_heads, MAX_TILE_QUERIES / (rows * group)));
      for (int h = 0; h < kv_heads; h += heads) {
        const int n = std::min(heads, kv_heads - h);
        base.push_back({b, h, n, row0, rows, 0, key_end, -1, int64_t(n) * rows * key_end});
      }
    }
  }
  const int want = 4 * threads;
  if (base.size() >= size_t(want)) return base;
  std::vector<Item> items;
  int next_part = 0;
  const int ways = (want + int(base.size()) - 1) / int(base.size());
  for (const Item& it : base) {
    const int splits = std::min(ways, std::max(1, it.key_end / MIN_SPLIT_TOKENS));
    if (splits == 1) {
      items.push_back(it);
      continue;
    }
    const int blocks = (it.key_end + bs - 1) / bs, per = (blocks + splits - 1) / splits;
    Item whole = it;
    whole.part = next_part;
    int parts = 0;
    for (int first = 0; first < blocks; first += per, ++parts) {
      Item piece = it;
      piece.key_begin = first * bs;
      piece.key_end = std::min(it.key_end, (first + per) * bs);
      piece.part = next_part++;
      piece.cost = int64_t(piece.heads) * piece.rows * (piece.key_end - piece.key_begin);
      items.push_back(piece);
    }
    merges.emplace_back(whole, parts);
  }
  return items;
}

template <typename T>
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int bs = k_cache.size(1), heads = k.size(1), D = k.size(2);
  T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  for (int64_t t = 0; t < k.size(0); ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t at_cache = (slot / bs) * k_cache.stride(0) + (slot % bs) * k_cache.stride(1);
    for (int h = 0; h < heads; ++h) {
      std::memcpy(kc + at_cache + h * k_cache.stride(2), kp + t * k.stride(0) + h * k.stride(1), D * sizeof(T));
      std::memcpy(vc + at_cache + h * v_cache.stride(2), vp + t * v.stride(0) + h * v.stride(1), D * sizeof(T));
    }
  }
}

template <typename T>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_table, const at::Tensor& qsl, const at::Tensor& lens, double scale) {
  const int batch = lens.size(0), kv_heads = k_cache.size(2), D = q.size(2), bs = k_cache.size(1);
  const int group = q.size(1) / kv_heads;
  PagedAttention<T> pa{q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), out.data_ptr<T>(),
                       q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                       k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
                       block_table.data_ptr<int32_t>(), qsl.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                       group, D, round_up(D, W), bs, round_up(bs, W), float(scale)};
  const int threads = at::get_num_threads();
  std::vector<std::pair<Item, int>> merges;
  std::vector<Item> items = plan(pa.qsl, pa.lens, batch, kv_heads, group, bs, threads, merges);
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  int parts = 0;
  for (const auto& [it, n] : merges) parts += n;
  std::vector<float> partials(int64_t(parts) * MAX_TILE_QUERIES * (pa.DP + 2));
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch s(pa.DP, pa.BSP);
    for (size_t i; (i = next.fetch_add(1)) < items.size();) pa.run(items[i], s, partials.data());
  });
  if (merges.empty()) return;
  at::parallel_for(0, merges.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(pa.DP);
    for (int64_t i = begin; i < end; ++i) pa.merge(merges[i].first, merges[i].second, partials.data(), acc);
  });
}

void check(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
           const at::Tensor& block_table, const at::Tensor& qsl, const at::Tensor& lens) {
  for (const auto* t : {&out, &q, &k, &v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() >= 3 && t->stride(-1) == 1, "paged_attention: CPU tensors with a "
                "contiguous last dimension expected");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "paged_attention: q, k, v, out and the caches need one dtype");
  }
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: caches [num_blocks, block_size, kv_heads, head_dim] with equal strides expected");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(2) <= 1024 && q.size(1) % k_cache.size(2) == 0 &&
              q.size(1) / k_cache.size(2) <= MAX_TILE_QUERIES, "paged_attention: head_dim or GQA group not supported");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.size(0) == k.size(0), "paged_attention: slot_mapping int64 [T] expected");
  for (const auto* t : {&block_table, &qsl, &lens})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->stride(-1) == 1, "paged_attention: int32 metadata expected");
  TORCH_CHECK(qsl.size(0) == lens.size(0) + 1 && block_table.size(0) >= lens.size(0),
              "paged_attention: query_start_loc [B+1], seq_lens [B], block_table [B, max_blocks] expected");
}

void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     double scale) {
  check(out, q, k, v, k_cache, v_cache, slot_mapping, block_table, query_start_loc, seq_lens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      write_kv<scalar_t>(k_cache, v_cache, k, v, slot_mapping);
      attend<scalar_t>(out, q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale);
    } else {
      TORCH_CHECK(false, "paged_attention: float64 is not supported");
    }
  });
}

}  // namespace

TORCH_LIBRARY(fastswitch, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor slot_mapping, Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale) -> ()");
  m.impl("paged_attention", c10::DispatchKey::CPU, &paged_attention);
}
