// Decode attention straight over the paged KV cache, one query token per sequence (aiinfra serve, CPU).
//
// The torch path gathers each sequence's blocks into a contiguous copy and runs SDPA on it: every key and value is
// read, written and read again. This reads each of them once, from its block, in place: for each sequence it scores
// every query head against every key of the context (query head h reads KV head h / group), takes the softmax in
// fp32, and accumulates the values in fp32. Same layout as serve/runner.py's cache:
//   q, out       (seqs, q_heads, head_dim)                contiguous
//   k/v cache    (blocks, block_size, kv_heads, head_dim)  contiguous
//   block_tables (seqs, table_width) int32; lengths (seqs) int32: the context of each sequence, this token included
// Element type: fp32 (dtype 0) or bf16 (dtype 1, stored as its upper 16 bits of an fp32). Built by kernels/__init__.py
// with -O3 -march=native; no torch headers, so it compiles in about a second and is called through ctypes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {
    uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

inline void store(float* p, int64_t i, float value) { p[i] = value; }

inline void store(uint16_t* p, int64_t i, float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        p[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even, as torch's fp32 -> bf16 conversion
    p[i] = static_cast<uint16_t>(bits >> 16);
}

// One sequence, every head: each key (and value) row holds all KV heads side by side, so walking the context
// token by token reads the cache sequentially, block after block, once.
template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables, const int32_t* lengths,
            T* out, int64_t seq, int64_t q_row_index, int64_t q_stride, int64_t out_stride, int64_t q_heads,
            int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t table_width, float scale,
            std::vector<float>& scores, std::vector<float>& query, std::vector<float>& acc) {
    const int64_t group = q_heads / kv_heads;
    const int64_t length = lengths[seq];
    const int32_t* table = block_tables + seq * table_width;
    const int64_t token_stride = kv_heads * head_dim;
    scores.resize(static_cast<size_t>(q_heads * length));
    query.resize(static_cast<size_t>(q_heads * head_dim));
    acc.assign(static_cast<size_t>(q_heads * head_dim), 0.0f);
    const T* q_row = q + q_row_index * q_stride;
    for (int64_t i = 0; i < q_heads * head_dim; ++i) query[i] = load(q_row, i) * scale;
    // Scores: one pass over the keys; query head h reads KV head h / group.
    for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        const T* key = k_cache + slot * token_stride;
        for (int64_t h = 0; h < q_heads; ++h) {
            const float* qh = query.data() + h * head_dim;
            const T* kh = key + (h / group) * head_dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * load(kh, d);
            scores[h * length + t] = dot;
        }
    }
    // Softmax per query head, in fp32.
    for (int64_t h = 0; h < q_heads; ++h) {
        float* row = scores.data() + h * length;
        const float peak = *std::max_element(row, row + length);
        float total = 0.0f;
        for (int64_t t = 0; t < length; ++t) {
            row[t] = std::exp(row[t] - peak);
            total += row[t];
        }
        const float inverse = 1.0f / total;
        for (int64_t t = 0; t < length; ++t) row[t] *= inverse;
    }
    // Values: one pass, each row added into every query head with that head's weight.
    for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        const T* value = v_cache + slot * token_stride;
        for (int64_t h = 0; h < q_heads; ++h) {
            const float weight = scores[h * length + t];
            const T* vh = value + (h / group) * head_dim;
            float* a = acc.data() + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) a[d] += weight * load(vh, d);
        }
    }
    T* out_row = out + q_row_index * out_stride;
    for (int64_t i = 0; i < q_heads * head_dim; ++i) store(out_row, i, acc[i]);
}

template <typename T>
void run(const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,
         const int32_t* lengths, const int32_t* rows, int64_t q_stride, int64_t out_stride, void* out,
         int64_t seqs, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
         int64_t table_width, float scale, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1 && seqs > 1)
    {
        std::vector<float> scores, query, acc;  // per thread, reused across its sequences
#pragma omp for schedule(dynamic, 1)
        for (int64_t seq = 0; seq < seqs; ++seq) {
            attend(static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
                   block_tables, lengths, static_cast<T*>(out), seq, rows ? rows[seq] : seq, q_stride, out_stride,
                   q_heads, kv_heads, head_dim, block_size, table_width, scale, scores, query, acc);
        }
    }
}

}  // namespace

// rows (may be null: row i for sequence i): the row of q and out that each sequence's token occupies; q_stride and
// out_stride: elements from one row to the next (heads are head_dim apart within a row, head_dim is contiguous).
extern "C" int aiinfra_paged_decode_attention(
    const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables, const int32_t* lengths,
    const int32_t* rows, void* out, int64_t seqs, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
    int64_t block_size, int64_t table_width, int64_t q_stride, int64_t out_stride, float scale, int dtype,
    int threads) {
    if (kv_heads <= 0 || q_heads % kv_heads != 0 || head_dim <= 0 || block_size <= 0) return 1;
    if (dtype == 0) {
        run<float>(q, k_cache, v_cache, block_tables, lengths, rows, q_stride, out_stride, out, seqs, q_heads,
                   kv_heads, head_dim, block_size, table_width, scale, threads);
    } else if (dtype == 1) {
        run<uint16_t>(q, k_cache, v_cache, block_tables, lengths, rows, q_stride, out_stride, out, seqs, q_heads,
                      kv_heads, head_dim, block_size, table_width, scale, threads);
    } else {
        return 2;
    }
    return 0;
}
