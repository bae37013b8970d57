// Preamble for AMD GPUs, compiled with hiprtc. Wave width is 64 on GCN and CDNA (gfx906 and
// its successors) and 32 on RDNA; shuffles stay inside 32-lane groups either way.
#if defined(__GFX10__) || defined(__GFX11__) || defined(__GFX12__)
#define POD_WARP 32
#else
#define POD_WARP 64
#endif

typedef signed char pod_i8;
typedef unsigned char pod_u8;
typedef short pod_i16;
typedef unsigned short pod_u16;
typedef int pod_i32;
typedef unsigned int pod_u32;
typedef unsigned long long pod_u64;

static __device__ __forceinline__ float pod_shfl_xor(float v, int mask) {
    return __shfl_xor(v, mask, 32);
}
static __device__ __forceinline__ int pod_shfl_xor(int v, int mask) {
    return __shfl_xor(v, mask, 32);
}

// Sum of the four signed byte products of a and b, plus c: one instruction where the target
// has it (gfx906 is the first GCN chip with dot4), byte by byte elsewhere.
static __device__ __forceinline__ int pod_dot4(int a, int b, int c) {
#if defined(__gfx906__) || defined(__gfx908__) || defined(__gfx90a__) || defined(__gfx940__) \
    || defined(__gfx941__) || defined(__gfx942__) || defined(__gfx1030__)
    return __builtin_amdgcn_sdot4(a, b, c, false);
#else
    for (int i = 0; i < 32; i += 8) {
        c += (int)(signed char)(a >> i) * (int)(signed char)(b >> i);
    }
    return c;
#endif
}

#define POD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
