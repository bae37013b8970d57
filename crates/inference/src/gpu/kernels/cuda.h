// Preamble for NVIDIA GPUs, compiled with NVRTC: one warp is one 32-lane group.
#define POD_WARP 32

typedef signed char pod_i8;
typedef unsigned char pod_u8;
typedef short pod_i16;
typedef unsigned short pod_u16;
typedef int pod_i32;
typedef unsigned int pod_u32;
typedef unsigned long long pod_u64;

static __device__ __forceinline__ float pod_shfl_xor(float v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask, 32);
}
static __device__ __forceinline__ int pod_shfl_xor(int v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask, 32);
}

// Sum of the four signed byte products of a and b, plus c (sm_61 and later).
static __device__ __forceinline__ int pod_dot4(int a, int b, int c) {
    return __dp4a(a, b, c);
}

#define POD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
