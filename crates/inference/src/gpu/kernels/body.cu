// pod's GPU kernels, in the common subset of CUDA and HIP. A platform preamble comes first
// (POD_WARP, pod_shfl_xor, pod_dot4, POD_DYNAMIC_SHARED, the pod_* integer types).
//
// Conventions every kernel keeps:
// - Block sizes are multiples of 32, at most 1024. Reductions work in 32-lane groups (shuffles
//   with width 32) and combine the groups through shared memory, so a wave64 GPU and a
//   wave32 GPU run the same arithmetic in the same order and give bit-identical results.
// - Activation rows quantised for the integer-dot products use the layouts below; weights
//   stay in GGUF's block layouts, read with 16-bit loads (GGUF blocks are only 2-aligned).
// - Every kernel is extern "C" so that runtimes find it by its plain name.

// 32 activations as d * qs[i]: f32 d, f32 s = d * sum(qs), 32 signed bytes. 40 bytes.
#define POD_Q8_BYTES 40
// 256 activations as d * qs[i]: f32 d, 256 signed bytes, sixteen i16 sums of runs of 16.
#define POD_Q8K_BYTES 292

static __device__ __forceinline__ float pod_half_to_float(pod_u16 h) {
    const pod_u32 sign = (pod_u32)(h & 0x8000u) << 16;
    const pod_u32 exp = (h >> 10) & 0x1fu;
    pod_u32 man = h & 0x3ffu;
    pod_u32 bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal: shift the mantissa up until its leading one becomes the implicit bit.
        pod_u32 e = 113u;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            --e;
        }
        bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
    union {
        pod_u32 u;
        float f;
    } v;
    v.u = bits;
    return v.f;
}

static __device__ __forceinline__ float pod_f16_at(const pod_u8* p) {
    return pod_half_to_float((pod_u16)(p[0] | (p[1] << 8)));
}

// Four bytes at a 2-aligned address, little-endian.
static __device__ __forceinline__ int pod_load_b2(const pod_u8* p) {
    const pod_u16* h = (const pod_u16*)p;
    return (int)((pod_u32)h[0] | ((pod_u32)h[1] << 16));
}

// Four bytes at a 4-aligned address.
static __device__ __forceinline__ int pod_load_b4(const pod_u8* p) {
    return *(const int*)p;
}

static __device__ __forceinline__ float pod_group_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) {
        v += pod_shfl_xor(v, m);
    }
    return v;
}

static __device__ __forceinline__ float pod_group_max(float v) {
    for (int m = 16; m > 0; m >>= 1) {
        v = fmaxf(v, pod_shfl_xor(v, m));
    }
    return v;
}

static __device__ __forceinline__ int pod_group_isum(int v) {
    for (int m = 16; m > 0; m >>= 1) {
        v += pod_shfl_xor(v, m);
    }
    return v;
}

// The sum of v over the block, in every thread. `scratch` is 32 floats of shared memory;
// every thread adds the group sums in the same order, so all agree bit for bit.
static __device__ float pod_block_sum(float v, float* scratch) {
    v = pod_group_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) {
        scratch[threadIdx.x / 32] = v;
    }
    __syncthreads();
    float s = 0.0f;
    for (unsigned g = 0; g < blockDim.x / 32; ++g) {
        s += scratch[g];
    }
    return s;
}

static __device__ float pod_block_max(float v, float* scratch) {
    v = pod_group_max(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) {
        scratch[threadIdx.x / 32] = v;
    }
    __syncthreads();
    float s = scratch[0];
    for (unsigned g = 1; g < blockDim.x / 32; ++g) {
        s = fmaxf(s, scratch[g]);
    }
    return s;
}

// ---------------------------------------------------------------------------------------
// Weight formats. A row's dot product with a quantised activation row is a sum of items, one
// per run of 32 values: `load(w, i)` unpacks the row's i-th run into a pod_run, `dot(r, x, i)`
// is that run's contribution against activation row x (integer dot products, then the f32
// scaling), and `item(w, x, i)` is the two together. The tiled kernels load a run once and
// dot it with several activation rows; `dot` computes the same expression either way, so a
// row's result has the same bits whichever kernel computed it. `value(w, k)` dequantises
// value k of a row, as QuantFormat::dequantize_row does.

// One run of 32 weights, unpacked: q[k] holds the four integers that multiply activation
// bytes 4k..4k + 3 of the run, then the run's scales (which ones a format uses is its own).
struct pod_run {
    int q[8];
    // Scale; Q4_1's and Q5_1's offset, the K-quants' offset scale.
    float d, m;
    // Sub-block scale and min (Q4_K, Q5_K); Q6_K's two sixteen-value scales.
    int sc[2];
    int mn;
};

// The integer dot of a 32-value run with its 32-value activation block.
static __device__ __forceinline__ int pod_dot_q8(const pod_run& r, const pod_u8* y) {
    int s = 0;
    for (int k = 0; k < 8; ++k) {
        s = pod_dot4(r.q[k], pod_load_b4(y + 8 + 4 * k), s);
    }
    return s;
}

struct pod_q4_0 {
    enum { VALUES = 32, BYTES = 18, SUPER = 0 };
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const pod_u8* b = w + i * BYTES;
        pod_run r;
        r.d = pod_f16_at(b);
        for (int k = 0; k < 4; ++k) {
            const pod_u32 v = (pod_u32)pod_load_b2(b + 2 + 4 * k);
            r.q[k] = (int)(v & 0x0f0f0f0fu);
            r.q[k + 4] = (int)((v >> 4) & 0x0f0f0f0fu);
        }
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const pod_u8* y = x + i * POD_Q8_BYTES;
        const int s = pod_dot_q8(r, y);
        const float yd = *(const float*)y;
        const float ys = *(const float*)(y + 4);
        return (r.d * yd) * (float)s + (-8.0f * r.d) * ys;
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 32) * BYTES;
        const int j = k % 32;
        const int q = j < 16 ? (b[2 + j] & 0x0f) : (b[2 + j - 16] >> 4);
        return pod_f16_at(b) * (float)(q - 8);
    }
};

struct pod_q4_1 {
    enum { VALUES = 32, BYTES = 20, SUPER = 0 };
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const pod_u8* b = w + i * BYTES;
        pod_run r;
        r.d = pod_f16_at(b);
        r.m = pod_f16_at(b + 2);
        for (int k = 0; k < 4; ++k) {
            const pod_u32 v = (pod_u32)pod_load_b2(b + 4 + 4 * k);
            r.q[k] = (int)(v & 0x0f0f0f0fu);
            r.q[k + 4] = (int)((v >> 4) & 0x0f0f0f0fu);
        }
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const pod_u8* y = x + i * POD_Q8_BYTES;
        const int s = pod_dot_q8(r, y);
        const float yd = *(const float*)y;
        const float ys = *(const float*)(y + 4);
        return (r.d * yd) * (float)s + r.m * ys;
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 32) * BYTES;
        const int j = k % 32;
        const int q = j < 16 ? (b[4 + j] & 0x0f) : (b[4 + j - 16] >> 4);
        return pod_f16_at(b) * (float)q + pod_f16_at(b + 2);
    }
};

struct pod_q5_0 {
    enum { VALUES = 32, BYTES = 22, SUPER = 0 };
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const pod_u8* b = w + i * BYTES;
        const pod_u32 qh = (pod_u32)pod_load_b2(b + 2);
        pod_run r;
        r.d = pod_f16_at(b);
        for (int k = 0; k < 4; ++k) {
            const pod_u32 v = (pod_u32)pod_load_b2(b + 6 + 4 * k);
            pod_u32 lo = v & 0x0f0f0f0fu;
            pod_u32 hi = (v >> 4) & 0x0f0f0f0fu;
            for (int j = 0; j < 4; ++j) {
                lo |= ((qh >> (4 * k + j)) & 1u) << (8 * j + 4);
                hi |= ((qh >> (4 * k + j + 16)) & 1u) << (8 * j + 4);
            }
            r.q[k] = (int)lo;
            r.q[k + 4] = (int)hi;
        }
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const pod_u8* y = x + i * POD_Q8_BYTES;
        const int s = pod_dot_q8(r, y);
        const float yd = *(const float*)y;
        const float ys = *(const float*)(y + 4);
        return (r.d * yd) * (float)s + (-16.0f * r.d) * ys;
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 32) * BYTES;
        const int j = k % 32;
        const pod_u32 qh = (pod_u32)pod_load_b2(b + 2);
        const int q = (j < 16 ? (b[6 + j] & 0x0f) : (b[6 + j - 16] >> 4)) | (int)(((qh >> j) & 1u) << 4);
        return pod_f16_at(b) * (float)(q - 16);
    }
};

struct pod_q5_1 {
    enum { VALUES = 32, BYTES = 24, SUPER = 0 };
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const pod_u8* b = w + i * BYTES;
        const pod_u32 qh = (pod_u32)pod_load_b2(b + 4);
        pod_run r;
        r.d = pod_f16_at(b);
        r.m = pod_f16_at(b + 2);
        for (int k = 0; k < 4; ++k) {
            const pod_u32 v = (pod_u32)pod_load_b2(b + 8 + 4 * k);
            pod_u32 lo = v & 0x0f0f0f0fu;
            pod_u32 hi = (v >> 4) & 0x0f0f0f0fu;
            for (int j = 0; j < 4; ++j) {
                lo |= ((qh >> (4 * k + j)) & 1u) << (8 * j + 4);
                hi |= ((qh >> (4 * k + j + 16)) & 1u) << (8 * j + 4);
            }
            r.q[k] = (int)lo;
            r.q[k + 4] = (int)hi;
        }
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const pod_u8* y = x + i * POD_Q8_BYTES;
        const int s = pod_dot_q8(r, y);
        const float yd = *(const float*)y;
        const float ys = *(const float*)(y + 4);
        return (r.d * yd) * (float)s + r.m * ys;
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 32) * BYTES;
        const int j = k % 32;
        const pod_u32 qh = (pod_u32)pod_load_b2(b + 4);
        const int q = (j < 16 ? (b[8 + j] & 0x0f) : (b[8 + j - 16] >> 4)) | (int)(((qh >> j) & 1u) << 4);
        return pod_f16_at(b) * (float)q + pod_f16_at(b + 2);
    }
};

struct pod_q8_0 {
    enum { VALUES = 32, BYTES = 34, SUPER = 0 };
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const pod_u8* b = w + i * BYTES;
        pod_run r;
        r.d = pod_f16_at(b);
        for (int k = 0; k < 8; ++k) {
            r.q[k] = pod_load_b2(b + 2 + 4 * k);
        }
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const pod_u8* y = x + i * POD_Q8_BYTES;
        const int s = pod_dot_q8(r, y);
        return (r.d * *(const float*)y) * (float)s;
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 32) * BYTES;
        return pod_f16_at(b) * (float)(pod_i8)b[2 + k % 32];
    }
};

// Q4_K's 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes p.
static __device__ __forceinline__ void pod_q4k_scale_min(const pod_u8* p, int s, int* sc, int* mn) {
    if (s < 4) {
        *sc = p[s] & 63;
        *mn = p[s + 4] & 63;
    } else {
        *sc = (p[s + 4] & 0x0f) | ((p[s - 4] >> 6) << 4);
        *mn = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
    }
}

// The integer dot of run i (sub-block i % 8 of a super-block) with its 32 activation bytes.
static __device__ __forceinline__ int pod_dot_q8k(const pod_run& r, const pod_u8* y, int s) {
    int isum = 0;
    for (int k = 0; k < 8; ++k) {
        isum = pod_dot4(r.q[k], pod_load_b4(y + 4 + 32 * s + 4 * k), isum);
    }
    return isum;
}

// Q4_K's and Q5_K's contribution of sub-block s: scale times the integer dot, less min times
// the activations' sum.
static __device__ __forceinline__ float pod_dot_kmin(const pod_run& r, const pod_u8* y, int s) {
    const int isum = pod_dot_q8k(r, y, s);
    const pod_i16* bsums = (const pod_i16*)(y + 260);
    const int ysum = bsums[2 * s] + bsums[2 * s + 1];
    const float yd = *(const float*)y;
    return yd * (r.d * (float)(r.sc[0] * isum) - r.m * (float)(r.mn * ysum));
}

struct pod_q4_k {
    enum { VALUES = 256, BYTES = 144, SUPER = 1 };
    // Item i is sub-block i % 8 of super-block i / 8.
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const int s = i % 8;
        const pod_u8* b = w + (i / 8) * BYTES;
        const pod_u8* q = b + 16 + 32 * (s / 2);
        const int shift = 4 * (s % 2);
        pod_run r;
        for (int k = 0; k < 8; ++k) {
            r.q[k] = (int)(((pod_u32)pod_load_b2(q + 4 * k) >> shift) & 0x0f0f0f0fu);
        }
        pod_q4k_scale_min(b + 4, s, &r.sc[0], &r.mn);
        r.d = pod_f16_at(b);
        r.m = pod_f16_at(b + 2);
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        return pod_dot_kmin(r, x + (i / 8) * POD_Q8K_BYTES, i % 8);
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 256) * BYTES;
        const int s = (k % 256) / 32;
        const int q = (b[16 + 32 * (s / 2) + k % 32] >> (4 * (s % 2))) & 0x0f;
        int sc, mn;
        pod_q4k_scale_min(b + 4, s, &sc, &mn);
        const float ds = pod_f16_at(b) * (float)sc;
        const float ms = pod_f16_at(b + 2) * (float)mn;
        return ds * (float)q - ms;
    }
};

struct pod_q5_k {
    enum { VALUES = 256, BYTES = 176, SUPER = 1 };
    // As Q4_K, with the fifth bit of value l of sub-block s at bit s of qh[l].
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const int s = i % 8;
        const pod_u8* b = w + (i / 8) * BYTES;
        const pod_u8* q = b + 48 + 32 * (s / 2);
        const int shift = 4 * (s % 2);
        pod_run r;
        for (int k = 0; k < 8; ++k) {
            const pod_u32 lo = ((pod_u32)pod_load_b2(q + 4 * k) >> shift) & 0x0f0f0f0fu;
            const pod_u32 hi = (((pod_u32)pod_load_b2(b + 16 + 4 * k) >> s) & 0x01010101u) << 4;
            r.q[k] = (int)(lo | hi);
        }
        pod_q4k_scale_min(b + 4, s, &r.sc[0], &r.mn);
        r.d = pod_f16_at(b);
        r.m = pod_f16_at(b + 2);
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        return pod_dot_kmin(r, x + (i / 8) * POD_Q8K_BYTES, i % 8);
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 256) * BYTES;
        const int s = (k % 256) / 32;
        const int l = k % 32;
        const int q = ((b[48 + 32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0f) | (((b[16 + l] >> s) & 1) << 4);
        int sc, mn;
        pod_q4k_scale_min(b + 4, s, &sc, &mn);
        const float ds = pod_f16_at(b) * (float)sc;
        const float ms = pod_f16_at(b + 2) * (float)mn;
        return ds * (float)q - ms;
    }
};

struct pod_q6_k {
    enum { VALUES = 256, BYTES = 210, SUPER = 1 };
    // Item i is values 32 * (i % 8) .. + 32 of super-block i / 8: sixteen-value groups
    // 2 * (i % 8) and 2 * (i % 8) + 1.
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const int s = i % 8;
        const int half = s / 4;
        const int c = s % 4;
        const pod_u8* b = w + (i / 8) * BYTES;
        const pod_u8* ql = b + 64 * half + 32 * (c & 1);
        const pod_u8* qh = b + 128 + 32 * half;
        pod_run r;
        for (int k = 0; k < 8; ++k) {
            const pod_u32 lo = ((pod_u32)pod_load_b2(ql + 4 * k) >> (4 * (c >> 1))) & 0x0f0f0f0fu;
            const pod_u32 hi = (((pod_u32)pod_load_b2(qh + 4 * k) >> (2 * c)) & 0x03030303u) << 4;
            r.q[k] = (int)(lo | hi);
        }
        r.sc[0] = (int)(pod_i8)b[192 + 2 * s];
        r.sc[1] = (int)(pod_i8)b[192 + 2 * s + 1];
        r.d = pod_f16_at(b + 208);
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const int s = i % 8;
        const pod_u8* y = x + (i / 8) * POD_Q8K_BYTES;
        int isum[2] = {0, 0};
        for (int k = 0; k < 8; ++k) {
            isum[k / 4] = pod_dot4(r.q[k], pod_load_b4(y + 4 + 32 * s + 4 * k), isum[k / 4]);
        }
        const pod_i16* bsums = (const pod_i16*)(y + 260);
        int sumi = 0;
        for (int h = 0; h < 2; ++h) {
            sumi += r.sc[h] * (isum[h] - 32 * bsums[2 * s + h]);
        }
        return *(const float*)y * (r.d * (float)sumi);
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 256) * BYTES;
        const int i = k % 256;
        const int half = i / 128;
        const int c = (i % 128) / 32;
        const int l = i % 32;
        const int lo = (b[64 * half + 32 * (c & 1) + l] >> (4 * (c >> 1))) & 0x0f;
        const int hi = (b[128 + 32 * half + l] >> (2 * c)) & 0x03;
        const float scale = (float)(pod_i8)b[192 + i / 16];
        return pod_f16_at(b + 208) * scale * (float)((lo | (hi << 4)) - 32);
    }
};

// The integer dots of run s of a super-block with its activation bytes, one per half of 16
// values (the K-quants with a scale per 16: Q2_K, Q3_K).
static __device__ __forceinline__ void pod_dot_q8k_halves(const pod_run& r, const pod_u8* y, int s,
                                                          int* isum) {
    isum[0] = 0;
    isum[1] = 0;
    for (int k = 0; k < 8; ++k) {
        isum[k / 4] = pod_dot4(r.q[k], pod_load_b4(y + 4 + 32 * s + 4 * k), isum[k / 4]);
    }
}

struct pod_q2_k {
    enum { VALUES = 256, BYTES = 84, SUPER = 1 };
    // Item i is values 32 * (i % 8) .. + 32 of super-block i / 8: value 32 * s + l at bits
    // 2 * (s % 4) of byte 32 * (s / 4) + l of qs (byte 16 on). sc holds the two sixteen-value
    // groups' packed bytes (scale in the low nibble, min in the high).
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const int s = i % 8;
        const pod_u8* b = w + (i / 8) * BYTES;
        const pod_u8* q = b + 16 + 32 * (s / 4);
        const int shift = 2 * (s % 4);
        pod_run r;
        for (int k = 0; k < 8; ++k) {
            r.q[k] = (int)(((pod_u32)pod_load_b2(q + 4 * k) >> shift) & 0x03030303u);
        }
        r.sc[0] = b[2 * s];
        r.sc[1] = b[2 * s + 1];
        r.mn = 0;
        r.d = pod_f16_at(b + 80);
        r.m = pod_f16_at(b + 82);
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const int s = i % 8;
        const pod_u8* y = x + (i / 8) * POD_Q8K_BYTES;
        int isum[2];
        pod_dot_q8k_halves(r, y, s, isum);
        const pod_i16* bsums = (const pod_i16*)(y + 260);
        int sumi = 0;
        int summ = 0;
        for (int h = 0; h < 2; ++h) {
            sumi += (r.sc[h] & 0x0f) * isum[h];
            summ += (r.sc[h] >> 4) * bsums[2 * s + h];
        }
        const float yd = *(const float*)y;
        return yd * (r.d * (float)sumi - r.m * (float)summ);
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 256) * BYTES;
        const int i = k % 256;
        const int s = i / 32;
        const int q = (b[16 + 32 * (s / 4) + i % 32] >> (2 * (s % 4))) & 3;
        const int g = b[i / 16];
        const float ds = pod_f16_at(b + 80) * (float)(g & 0x0f);
        const float ms = pod_f16_at(b + 82) * (float)(g >> 4);
        return ds * (float)q - ms;
    }
};

// Q3_K's signed scale of sixteen-value group g (0..15) from the 12 packed bytes p: the low
// nibble from byte g % 8 (low nibble for g < 8), the top two bits from bits 2 * (g / 4) of
// byte 8 + g % 4, stored with an offset of 32.
static __device__ __forceinline__ int pod_q3k_scale(const pod_u8* p, int g) {
    const int low = g < 8 ? (p[g] & 0x0f) : (p[g - 8] >> 4);
    const int high = (p[8 + g % 4] >> (2 * (g / 4))) & 3;
    return (low | (high << 4)) - 32;
}

struct pod_q3_k {
    enum { VALUES = 256, BYTES = 110, SUPER = 1 };
    // Item i is values 32 * (i % 8) .. + 32 of super-block i / 8: the low two bits as Q2_K's
    // (qs from byte 32), the third from bit s of high-bit byte l (bytes 0..31), the stored
    // value plus 4.
    static __device__ __forceinline__ pod_run load(const pod_u8* w, int i) {
        const int s = i % 8;
        const pod_u8* b = w + (i / 8) * BYTES;
        const pod_u8* q = b + 32 + 32 * (s / 4);
        const int shift = 2 * (s % 4);
        pod_run r;
        for (int k = 0; k < 8; ++k) {
            const pod_u32 lo = ((pod_u32)pod_load_b2(q + 4 * k) >> shift) & 0x03030303u;
            const pod_u32 hi = (((pod_u32)pod_load_b2(b + 4 * k) >> s) & 0x01010101u) << 2;
            r.q[k] = (int)(lo | hi);
        }
        r.sc[0] = pod_q3k_scale(b + 96, 2 * s);
        r.sc[1] = pod_q3k_scale(b + 96, 2 * s + 1);
        r.mn = 0;
        r.d = pod_f16_at(b + 108);
        r.m = 0.0f;
        return r;
    }
    static __device__ __forceinline__ float dot(const pod_run& r, const pod_u8* x, int i) {
        const int s = i % 8;
        const pod_u8* y = x + (i / 8) * POD_Q8K_BYTES;
        int isum[2];
        pod_dot_q8k_halves(r, y, s, isum);
        const pod_i16* bsums = (const pod_i16*)(y + 260);
        int sumi = 0;
        for (int h = 0; h < 2; ++h) {
            sumi += r.sc[h] * (isum[h] - 4 * bsums[2 * s + h]);
        }
        return *(const float*)y * (r.d * (float)sumi);
    }
    static __device__ __forceinline__ float item(const pod_u8* w, const pod_u8* x, int i) {
        return dot(load(w, i), x, i);
    }
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        const pod_u8* b = w + (k / 256) * BYTES;
        const int i = k % 256;
        const int s = i / 32;
        const int l = i % 32;
        const int q = ((b[32 + 32 * (s / 4) + l] >> (2 * (s % 4))) & 3) | (((b[l] >> s) & 1) << 2);
        const float ds = pod_f16_at(b + 108) * (float)pod_q3k_scale(b + 96, i / 16);
        return ds * ((float)q - 4.0f);
    }
};

// ---------------------------------------------------------------------------------------
// Matrix times quantised activation rows: y[t * rows + r] = W[r] . x[t] for t < batch. One
// block per weight row (blockIdx.x), its threads striding over the row's 32-value runs.
//
// matvec_* loops over the activation rows and unpacks every weight run once per row: meant
// for a single row. matmul_* (the tiled kernels) take a tile of POD_TILE activation rows per
// block (grid y = ceil(batch / POD_TILE)), unpack each run once and dot it with every row of
// the tile, in POD_TILE accumulators. Each output is the same sum in the same order either
// way (thread k adds items k, k + blockDim.x, ... of its row, then one block sum), so a row's
// result has the same bits from either kernel, alone or in any batch. POD_TILE is defined
// ahead of this source by the host (kernels.rs's MATMUL_TILE).

template <typename F>
static __device__ void pod_matvec(const pod_u8* w, const pod_u8* x, float* y, int rows, int cols,
                                  int batch) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const int items = cols / 32;
    const int blocks = cols / F::VALUES;
    const pod_u8* wr = w + (pod_u64)row * (pod_u64)(blocks * F::BYTES);
    const int x_row = F::SUPER ? cols / 256 * POD_Q8K_BYTES : cols / 32 * POD_Q8_BYTES;
    for (int t = 0; t < batch; ++t) {
        const pod_u8* xr = x + (pod_u64)t * (pod_u64)x_row;
        float acc = 0.0f;
        for (int i = threadIdx.x; i < items; i += blockDim.x) {
            acc += F::item(wr, xr, i);
        }
        acc = pod_block_sum(acc, scratch);
        if (threadIdx.x == 0) {
            y[(pod_u64)t * rows + row] = acc;
        }
    }
}

template <typename F>
static __device__ void pod_matmul(const pod_u8* w, const pod_u8* x, float* y, int rows, int cols,
                                  int batch) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int t0 = blockIdx.y * POD_TILE;
    // The same for every thread of the block, so no barrier below is left half-reached.
    if (row >= rows || t0 >= batch) {
        return;
    }
    const int tile = batch - t0 < POD_TILE ? batch - t0 : POD_TILE;
    const int items = cols / 32;
    const int blocks = cols / F::VALUES;
    const pod_u8* wr = w + (pod_u64)row * (pod_u64)(blocks * F::BYTES);
    const pod_u64 x_row = F::SUPER ? cols / 256 * POD_Q8K_BYTES : cols / 32 * POD_Q8_BYTES;
    const pod_u8* xt = x + (pod_u64)t0 * x_row;
    float acc[POD_TILE];
    for (int j = 0; j < POD_TILE; ++j) {
        acc[j] = 0.0f;
    }
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
        const pod_run r = F::load(wr, i);
        for (int j = 0; j < POD_TILE; ++j) {
            if (j < tile) {
                acc[j] += F::dot(r, xt + (pod_u64)j * x_row, i);
            }
        }
    }
    for (int j = 0; j < tile; ++j) {
        const float s = pod_block_sum(acc[j], scratch);
        if (threadIdx.x == 0) {
            y[(pod_u64)(t0 + j) * rows + row] = s;
        }
    }
}

#define POD_MATVEC(name, F)                                                                   \
    extern "C" __global__ void name(const pod_u8* w, const pod_u8* x, float* y, int rows,    \
                                    int cols, int batch) {                                   \
        pod_matvec<F>(w, x, y, rows, cols, batch);                                            \
    }
POD_MATVEC(matvec_q4_0, pod_q4_0)
POD_MATVEC(matvec_q4_1, pod_q4_1)
POD_MATVEC(matvec_q5_0, pod_q5_0)
POD_MATVEC(matvec_q5_1, pod_q5_1)
POD_MATVEC(matvec_q8_0, pod_q8_0)
POD_MATVEC(matvec_q2_k, pod_q2_k)
POD_MATVEC(matvec_q3_k, pod_q3_k)
POD_MATVEC(matvec_q4_k, pod_q4_k)
POD_MATVEC(matvec_q5_k, pod_q5_k)
POD_MATVEC(matvec_q6_k, pod_q6_k)

#define POD_MATMUL(name, F)                                                                   \
    extern "C" __global__ void name(const pod_u8* w, const pod_u8* x, float* y, int rows,    \
                                    int cols, int batch) {                                   \
        pod_matmul<F>(w, x, y, rows, cols, batch);                                            \
    }
POD_MATMUL(matmul_q4_0, pod_q4_0)
POD_MATMUL(matmul_q4_1, pod_q4_1)
POD_MATMUL(matmul_q5_0, pod_q5_0)
POD_MATMUL(matmul_q5_1, pod_q5_1)
POD_MATMUL(matmul_q8_0, pod_q8_0)
POD_MATMUL(matmul_q2_k, pod_q2_k)
POD_MATMUL(matmul_q3_k, pod_q3_k)
POD_MATMUL(matmul_q4_k, pod_q4_k)
POD_MATMUL(matmul_q5_k, pod_q5_k)
POD_MATMUL(matmul_q6_k, pod_q6_k)

// Unquantised weights times f32 activation rows, same shape and output as pod_matvec, and
// tiled the same way.
struct pod_f32 {
    enum { SIZE = 4 };
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        return ((const float*)w)[k];
    }
};

struct pod_f16 {
    enum { SIZE = 2 };
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        return pod_half_to_float(((const pod_u16*)w)[k]);
    }
};

// bfloat16: the top half of an f32.
struct pod_bf16 {
    enum { SIZE = 2 };
    static __device__ __forceinline__ float value(const pod_u8* w, int k) {
        union {
            pod_u32 u;
            float f;
        } v;
        v.u = (pod_u32)((const pod_u16*)w)[k] << 16;
        return v.f;
    }
};

template <typename F>
static __device__ void pod_matvec_float(const pod_u8* w, const float* x, float* y, int rows,
                                        int cols, int batch) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const pod_u8* wr = w + (pod_u64)row * cols * F::SIZE;
    for (int t = 0; t < batch; ++t) {
        const float* xr = x + (pod_u64)t * cols;
        float acc = 0.0f;
        for (int k = threadIdx.x; k < cols; k += blockDim.x) {
            acc += F::value(wr, k) * xr[k];
        }
        acc = pod_block_sum(acc, scratch);
        if (threadIdx.x == 0) {
            y[(pod_u64)t * rows + row] = acc;
        }
    }
}

template <typename F>
static __device__ void pod_matmul_float(const pod_u8* w, const float* x, float* y, int rows,
                                        int cols, int batch) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const int t0 = blockIdx.y * POD_TILE;
    if (row >= rows || t0 >= batch) {
        return;
    }
    const int tile = batch - t0 < POD_TILE ? batch - t0 : POD_TILE;
    const pod_u8* wr = w + (pod_u64)row * cols * F::SIZE;
    const float* xt = x + (pod_u64)t0 * cols;
    float acc[POD_TILE];
    for (int j = 0; j < POD_TILE; ++j) {
        acc[j] = 0.0f;
    }
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        const float v = F::value(wr, k);
        for (int j = 0; j < POD_TILE; ++j) {
            if (j < tile) {
                acc[j] += v * xt[(pod_u64)j * cols + k];
            }
        }
    }
    for (int j = 0; j < tile; ++j) {
        const float s = pod_block_sum(acc[j], scratch);
        if (threadIdx.x == 0) {
            y[(pod_u64)(t0 + j) * rows + row] = s;
        }
    }
}

extern "C" __global__ void matvec_f32(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                      int batch) {
    pod_matvec_float<pod_f32>(w, x, y, rows, cols, batch);
}

extern "C" __global__ void matvec_f16(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                      int batch) {
    pod_matvec_float<pod_f16>(w, x, y, rows, cols, batch);
}

extern "C" __global__ void matvec_bf16(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                       int batch) {
    pod_matvec_float<pod_bf16>(w, x, y, rows, cols, batch);
}

extern "C" __global__ void matmul_f32(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                      int batch) {
    pod_matmul_float<pod_f32>(w, x, y, rows, cols, batch);
}

extern "C" __global__ void matmul_f16(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                      int batch) {
    pod_matmul_float<pod_f16>(w, x, y, rows, cols, batch);
}

extern "C" __global__ void matmul_bf16(const pod_u8* w, const float* x, float* y, int rows, int cols,
                                       int batch) {
    pod_matmul_float<pod_bf16>(w, x, y, rows, cols, batch);
}

// ---------------------------------------------------------------------------------------
// Mixtures of experts (Qwen 3 MoE): routing, the chosen experts' products, their weighted sum.
//
// A layer's experts are stacked as GGUF stores them: expert e's `rows` rows start at row
// e * rows of w. moe_route writes each row's chosen experts (rank order) and weights;
// matvec_ids_* multiplies each (row, rank) pair by its expert's rows only, so no expert a
// row did not choose is read and the host never sees the routing; moe_combine adds a row's
// expert outputs in rank order. Every output is computed by one thread or one block in an
// order fixed by the shapes, so a row's result is the same bits alone or in any batch.
//
// Speed is reasoned, not measured: one block per (pair, weight row) reads an expert's row
// once per pair that chose it, where a tiled kernel grouping the pairs by expert would read
// it once per pass. Prompt throughput against llama.cpp's grouped products, and whether
// grouping pays at decode batch sizes, must be measured on a GPU.

// llama.cpp's floor on the sum of the chosen probabilities (the smallest normal f16).
#define POD_MIN_WEIGHT_SUM 6.1035156e-5f

static __device__ __forceinline__ float pod_bits_float(pod_u32 u) {
    union {
        pod_u32 u;
        float f;
    } v;
    v.u = u;
    return v.f;
}

// f32's total order (Rust's f32::total_cmp) as an unsigned key: a larger key, a larger value.
static __device__ __forceinline__ pod_u32 pod_total_key(float f) {
    union {
        float f;
        pod_u32 u;
    } v;
    v.f = f;
    return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

// Row r's `used` best experts by the softmax of its `experts` router scores, in rank order
// (probability descending, ties to the lower index, in f32's total order), each with its
// probability renormalised over the chosen ones and times `scale`, as the CPU decoder routes.
// One thread per row; a probability is recomputed where needed, the same bits each time.
// Every index written is below `experts`, whatever the scores (NaN included).
extern "C" __global__ void moe_route(const float* logits, int* chosen, float* weights,
                                     int experts, int used, float scale, int rows) {
    const pod_u64 r = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= (pod_u64)rows) {
        return;
    }
    const float* l = logits + r * experts;
    int* c = chosen + r * used;
    float* w = weights + r * used;
    float mx = pod_bits_float(0xff800000u);
    for (int e = 0; e < experts; ++e) {
        mx = fmaxf(mx, l[e]);
    }
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) {
        sum += expf(l[e] - mx);
    }
    int prev = -1;
    pod_u32 prev_key = 0;
    float total = 0.0f;
    for (int j = 0; j < used; ++j) {
        // The best expert ranked after the previous pick.
        int best = -1;
        pod_u32 best_key = 0;
        float best_p = 0.0f;
        for (int e = 0; e < experts; ++e) {
            const float p = expf(l[e] - mx) / sum;
            const pod_u32 key = pod_total_key(p);
            const bool after = prev < 0 || key < prev_key || (key == prev_key && e > prev);
            if (after && (best < 0 || key > best_key)) {
                best = e;
                best_key = key;
                best_p = p;
            }
        }
        c[j] = best;
        w[j] = best_p;
        total += best_p;
        prev = best;
        prev_key = best_key;
    }
    total = fmaxf(total, POD_MIN_WEIGHT_SUM);
    for (int j = 0; j < used; ++j) {
        w[j] = w[j] / total * scale;
    }
}

// y[p * rows + row] = row `row` of expert ids[p] . activation row p / x_div, for pair p =
// blockIdx.x and row = blockIdx.y: gate and up read each row's activations once per chosen
// expert (x_div = used), down each pair's own (x_div = 1). Each output is one block's sum in
// the order of pod_matvec's, so it has the bits the plain kernels give that expert's matrix.
// An expert index outside 0..experts writes NaN and reads nothing.
template <typename F>
static __device__ void pod_matvec_ids(const pod_u8* w, const pod_u8* x, float* y, const int* ids,
                                      int rows, int cols, int experts, int x_div) {
    __shared__ float scratch[32];
    const int p = blockIdx.x;
    const int row = blockIdx.y;
    const int e = ids[p];
    // The same for every thread of the block, so no barrier below is left half-reached.
    if (e < 0 || e >= experts) {
        if (threadIdx.x == 0) {
            y[(pod_u64)p * rows + row] = pod_bits_float(0x7fc00000u);
        }
        return;
    }
    const int items = cols / 32;
    const pod_u64 row_bytes = (pod_u64)(cols / F::VALUES) * F::BYTES;
    const pod_u8* wr = w + ((pod_u64)e * rows + row) * row_bytes;
    const pod_u64 x_row = F::SUPER ? cols / 256 * POD_Q8K_BYTES : cols / 32 * POD_Q8_BYTES;
    const pod_u8* xr = x + (pod_u64)(p / x_div) * x_row;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
        acc += F::item(wr, xr, i);
    }
    acc = pod_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        y[(pod_u64)p * rows + row] = acc;
    }
}

// As pod_matvec_ids, for unquantised weights and f32 activation rows.
template <typename F>
static __device__ void pod_matvec_ids_float(const pod_u8* w, const float* x, float* y,
                                            const int* ids, int rows, int cols, int experts,
                                            int x_div) {
    __shared__ float scratch[32];
    const int p = blockIdx.x;
    const int row = blockIdx.y;
    const int e = ids[p];
    if (e < 0 || e >= experts) {
        if (threadIdx.x == 0) {
            y[(pod_u64)p * rows + row] = pod_bits_float(0x7fc00000u);
        }
        return;
    }
    const pod_u8* wr = w + ((pod_u64)e * rows + row) * cols * F::SIZE;
    const float* xr = x + (pod_u64)(p / x_div) * cols;
    float acc = 0.0f;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        acc += F::value(wr, k) * xr[k];
    }
    acc = pod_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        y[(pod_u64)p * rows + row] = acc;
    }
}

#define POD_MATVEC_IDS(name, F)                                                               \
    extern "C" __global__ void name(const pod_u8* w, const pod_u8* x, float* y, const int* ids,\
                                    int rows, int cols, int experts, int x_div) {            \
        pod_matvec_ids<F>(w, x, y, ids, rows, cols, experts, x_div);                          \
    }
POD_MATVEC_IDS(matvec_ids_q4_0, pod_q4_0)
POD_MATVEC_IDS(matvec_ids_q4_1, pod_q4_1)
POD_MATVEC_IDS(matvec_ids_q5_0, pod_q5_0)
POD_MATVEC_IDS(matvec_ids_q5_1, pod_q5_1)
POD_MATVEC_IDS(matvec_ids_q8_0, pod_q8_0)
POD_MATVEC_IDS(matvec_ids_q2_k, pod_q2_k)
POD_MATVEC_IDS(matvec_ids_q3_k, pod_q3_k)
POD_MATVEC_IDS(matvec_ids_q4_k, pod_q4_k)
POD_MATVEC_IDS(matvec_ids_q5_k, pod_q5_k)
POD_MATVEC_IDS(matvec_ids_q6_k, pod_q6_k)

#define POD_MATVEC_IDS_FLOAT(name, F)                                                         \
    extern "C" __global__ void name(const pod_u8* w, const float* x, float* y, const int* ids,\
                                    int rows, int cols, int experts, int x_div) {            \
        pod_matvec_ids_float<F>(w, x, y, ids, rows, cols, experts, x_div);                    \
    }
POD_MATVEC_IDS_FLOAT(matvec_ids_f32, pod_f32)
POD_MATVEC_IDS_FLOAT(matvec_ids_f16, pod_f16)
POD_MATVEC_IDS_FLOAT(matvec_ids_bf16, pod_bf16)

// out row r = sum over ranks j of weights[r * used + j] * y row r * used + j (`cols` values
// each), in rank order; n = rows * cols values in all, one thread each.
extern "C" __global__ void moe_combine(const float* y, const float* weights, float* out, int cols,
                                       int used, int n) {
    const pod_u64 i = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (pod_u64)n) {
        return;
    }
    const pod_u64 r = i / cols;
    const pod_u64 c = i % cols;
    const float* wr = weights + r * used;
    const float* yr = y + r * used * cols + c;
    float acc = wr[0] * yr[0];
    for (int j = 1; j < used; ++j) {
        acc += wr[j] * yr[(pod_u64)j * cols];
    }
    out[i] = acc;
}

// Embedding lookup: out row r = dequantised table row ids[r], times scale (Gemma scales its
// embeddings; 1 elsewhere, which changes nothing). One block per output row. embed_f32 with
// the hidden states as its table gathers rows, such as each sequence's last.
template <typename F>
static __device__ void pod_embed(const pod_u8* table, const int* ids, float* out, int cols,
                                 float scale) {
    const pod_u8* row = table + (pod_u64)ids[blockIdx.x] * (pod_u64)(cols / F::VALUES * F::BYTES);
    float* o = out + (pod_u64)blockIdx.x * cols;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        o[k] = F::value(row, k) * scale;
    }
}

#define POD_EMBED(name, F)                                                                    \
    extern "C" __global__ void name(const pod_u8* table, const int* ids, float* out, int cols, \
                                    float scale) {                                            \
        pod_embed<F>(table, ids, out, cols, scale);                                           \
    }
POD_EMBED(embed_q4_0, pod_q4_0)
POD_EMBED(embed_q4_1, pod_q4_1)
POD_EMBED(embed_q5_0, pod_q5_0)
POD_EMBED(embed_q5_1, pod_q5_1)
POD_EMBED(embed_q8_0, pod_q8_0)
POD_EMBED(embed_q2_k, pod_q2_k)
POD_EMBED(embed_q3_k, pod_q3_k)
POD_EMBED(embed_q4_k, pod_q4_k)
POD_EMBED(embed_q5_k, pod_q5_k)
POD_EMBED(embed_q6_k, pod_q6_k)

template <typename F>
static __device__ void pod_embed_float(const pod_u8* table, const int* ids, float* out, int cols,
                                       float scale) {
    const pod_u8* row = table + (pod_u64)ids[blockIdx.x] * cols * F::SIZE;
    float* o = out + (pod_u64)blockIdx.x * cols;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        o[k] = F::value(row, k) * scale;
    }
}

extern "C" __global__ void embed_f32(const pod_u8* table, const int* ids, float* out, int cols,
                                     float scale) {
    pod_embed_float<pod_f32>(table, ids, out, cols, scale);
}

extern "C" __global__ void embed_f16(const pod_u8* table, const int* ids, float* out, int cols,
                                     float scale) {
    pod_embed_float<pod_f16>(table, ids, out, cols, scale);
}

extern "C" __global__ void embed_bf16(const pod_u8* table, const int* ids, float* out, int cols,
                                      float scale) {
    pod_embed_float<pod_bf16>(table, ids, out, cols, scale);
}

// ---------------------------------------------------------------------------------------
// Activation quantisation, as the CPU path does it: the largest magnitude maps to +-127,
// values rounded half to even.

static __device__ __forceinline__ int pod_quantize(float v, float id) {
    const float q = rintf(v * id);
    // The CPU's `as i8` saturates; only rounding can push past 127.
    return (int)fminf(fmaxf(q, -128.0f), 127.0f);
}

// One 32-lane group per 32-value block; launch with blockDim.x a multiple of 32 and at
// least `blocks` groups in all.
extern "C" __global__ void quantize_q8(const float* x, pod_u8* out, int blocks) {
    const pod_u64 gid = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const pod_u64 blk = gid / 32;
    const int lane = (int)(gid % 32);
    const bool live = blk < (pod_u64)blocks;
    const float v = live ? x[blk * 32 + lane] : 0.0f;
    const float d = pod_group_max(fabsf(v)) / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    const int q = pod_quantize(v, id);
    const int sum = pod_group_isum(q);
    if (live) {
        pod_u8* o = out + blk * POD_Q8_BYTES;
        o[8 + lane] = (pod_u8)(pod_i8)q;
        if (lane == 0) {
            *(float*)o = d;
            *(float*)(o + 4) = d * (float)sum;
        }
    }
}

// One 32-lane group per 256-value super-block, eight values per lane.
extern "C" __global__ void quantize_q8k(const float* x, pod_u8* out, int blocks) {
    const pod_u64 gid = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const pod_u64 blk = gid / 32;
    const int lane = (int)(gid % 32);
    const bool live = blk < (pod_u64)blocks;
    float v[8];
    float amax = 0.0f;
    for (int k = 0; k < 8; ++k) {
        v[k] = live ? x[blk * 256 + 8 * lane + k] : 0.0f;
        amax = fmaxf(amax, fabsf(v[k]));
    }
    const float d = pod_group_max(amax) / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    pod_u8* o = out + blk * POD_Q8K_BYTES;
    int sum = 0;
    for (int k = 0; k < 8; ++k) {
        const int q = pod_quantize(v[k], id);
        sum += q;
        if (live) {
            o[4 + 8 * lane + k] = (pod_u8)(pod_i8)q;
        }
    }
    // Lanes 2g and 2g + 1 hold the two halves of run g.
    sum += pod_shfl_xor(sum, 1);
    if (live) {
        if (lane % 2 == 0) {
            *(pod_i16*)(o + 260 + lane) = (pod_i16)sum;
        }
        if (lane == 0) {
            *(float*)o = d;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Element-wise and row-wise operations.

// y row = x row * w / rms(x row); one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (pod_u64)blockIdx.x * cols;
    float* yr = y + (pod_u64)blockIdx.x * cols;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        ss += xr[k] * xr[k];
    }
    ss = pod_block_sum(ss, scratch);
    const float scale = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        yr[k] = xr[k] * scale * w[k];
    }
}

// Rotary position embedding of each row's heads at that row's position pos[blockIdx.x], from
// tables cos/sin [positions, head_dim / 2]. neox != 0 pairs value i with i + head_dim / 2
// (Gemma 3), otherwise 2i with 2i + 1 (llama). One block per row.
extern "C" __global__ void rope(float* x, const int* pos, const float* cos_t, const float* sin_t,
                                int width, int head_dim, int neox) {
    const int half = head_dim / 2;
    float* xr = x + (pod_u64)blockIdx.x * width;
    const float* c = cos_t + (pod_u64)pos[blockIdx.x] * half;
    const float* s = sin_t + (pod_u64)pos[blockIdx.x] * half;
    for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
        const int i = p % half;
        float* h = xr + (p / half) * head_dim;
        const int a = neox ? i : 2 * i;
        const int b = neox ? i + half : 2 * i + 1;
        const float x0 = h[a];
        const float x1 = h[b];
        h[a] = x0 * c[i] - x1 * s[i];
        h[b] = x0 * s[i] + x1 * c[i];
    }
}

extern "C" __global__ void add(float* x, const float* y, int n) {
    const pod_u64 i = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (pod_u64)n) {
        x[i] += y[i];
    }
}

// x[i] += b[i % cols]: a bias of `cols` values added to every row of x (n values in all).
extern "C" __global__ void add_bias(float* x, const float* b, int cols, int n) {
    const pod_u64 i = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (pod_u64)n) {
        x[i] += b[i % (pod_u64)cols];
    }
}

// gate = silu(gate) * up.
extern "C" __global__ void silu_mul(float* gate, const float* up, int n) {
    const pod_u64 i = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (pod_u64)n) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// gate = gelu(gate) * up, GELU's tanh approximation.
extern "C" __global__ void gelu_mul(float* gate, const float* up, int n) {
    const pod_u64 i = (pod_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (pod_u64)n) {
        const float g = gate[i];
        const float y = 0.7978846f * g * (1.0f + 0.044715f * g * g);
        const float t = 1.0f - 2.0f / (expf(2.0f * y) + 1.0f);
        gate[i] = 0.5f * g * (1.0f + t) * up[i];
    }
}

// Appends each row's keys and values (rows of width kv_w) to its sequence's cache, at
// position pos[r] of the cache that starts at position base[r]. One block per row.
extern "C" __global__ void kv_append(const float* k, const float* v, float* k_cache,
                                     float* v_cache, const int* base, const int* pos, int kv_w) {
    const int r = blockIdx.x;
    const pod_u64 at = ((pod_u64)base[r] + pos[r]) * kv_w;
    for (int i = threadIdx.x; i < kv_w; i += blockDim.x) {
        k_cache[at + i] = k[(pod_u64)r * kv_w + i];
        v_cache[at + i] = v[(pod_u64)r * kv_w + i];
    }
}

// ---------------------------------------------------------------------------------------
// Attention of query rows against their sequences' cached keys and values: decode (one row
// per sequence) and prompt chunks (consecutive positions of one sequence, causal) alike.
// Row r's sequence cache starts at position row base[r] of k and v ([positions, n_kv_head *
// head_dim]); the row attends to its positions first..pos[r] (first = pos[r] + 1 - window
// when window > 0). Grid (rows, n_head); dynamic shared memory holds head_dim f32s.
//
// Shared memory does not grow with the context: scores are computed three times rather than
// kept, once for their maximum, once for the softmax denominator, and once, in chunks of
// POD_ATTENTION_CHUNK positions (defined ahead of this source by the host), for the weights
// of the values. Each thread takes the same positions in the same order in every pass, and
// the weighted sum runs over the positions in order, so a row's output is the same bits
// whatever else its pass holds, and the same bits as when every score sat in shared memory
// (a chunk a multiple of the block size). The cost is two more reads of the keys.

static __device__ __forceinline__ float pod_score(const float* qh, const float* kj, int head_dim,
                                                  float scale) {
    float s = 0.0f;
    for (int d = 0; d < head_dim; ++d) {
        s += qh[d] * kj[d];
    }
    return s * scale;
}

extern "C" __global__ void attention(const float* q, const float* k, const float* v, float* out,
                                     const int* base, const int* pos, int n_head, int n_kv_head,
                                     int head_dim, int window, float scale) {
    __shared__ float scratch[32];
    __shared__ float weights[POD_ATTENTION_CHUNK];
    POD_DYNAMIC_SHARED(float, acc);
    const int r = blockIdx.x;
    const int head = blockIdx.y;
    const int p = pos[r];
    const int first = window > 0 && p + 1 > window ? p + 1 - window : 0;
    const int n = p + 1 - first;
    const int kv_w = n_kv_head * head_dim;
    const int off = head / (n_head / n_kv_head) * head_dim;
    const float* qh = q + ((pod_u64)r * n_head + head) * head_dim;
    const float* ks = k + ((pod_u64)base[r] + first) * kv_w + off;
    const float* vs = v + ((pod_u64)base[r] + first) * kv_w + off;
    float mx = -3.4028235e38f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        mx = fmaxf(mx, pod_score(qh, ks + (pod_u64)j * kv_w, head_dim, scale));
    }
    mx = pod_block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        sum += expf(pod_score(qh, ks + (pod_u64)j * kv_w, head_dim, scale) - mx);
    }
    sum = pod_block_sum(sum, scratch);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        acc[d] = 0.0f;
    }
    for (int c0 = 0; c0 < n; c0 += POD_ATTENTION_CHUNK) {
        const int cn = n - c0 < POD_ATTENTION_CHUNK ? n - c0 : POD_ATTENTION_CHUNK;
        for (int j = threadIdx.x; j < cn; j += blockDim.x) {
            const pod_u64 at = (pod_u64)(c0 + j) * kv_w;
            weights[j] = expf(pod_score(qh, ks + at, head_dim, scale) - mx);
        }
        __syncthreads();
        const float* vc = vs + (pod_u64)c0 * kv_w;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = acc[d];
            for (int j = 0; j < cn; ++j) {
                a += weights[j] / sum * vc[(pod_u64)j * kv_w + d];
            }
            acc[d] = a;
        }
        // The next chunk overwrites the weights.
        __syncthreads();
    }
    float* o = out + ((pod_u64)r * n_head + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        o[d] = acc[d];
    }
}
