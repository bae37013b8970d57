// Preamble for the CPU emulator, compiled by the host C++ compiler with -DPOD_WARP=32 or 64.
// Every lane of a block is a fiber on one host thread; the runtime appended after the kernels
// switches between them at barriers. Blocks run one after another, so a `static` array is a
// block's shared memory: no two blocks are ever live at once.
#include <cmath>
#include <cstdint>

#ifndef POD_WARP
#error "POD_WARP must be defined (32 or 64)"
#endif

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

typedef std::int8_t pod_i8;
typedef std::uint8_t pod_u8;
typedef std::int16_t pod_i16;
typedef std::uint16_t pod_u16;
typedef std::int32_t pod_i32;
typedef std::uint32_t pod_u32;
typedef std::uint64_t pod_u64;

struct pod_dim3 {
    unsigned x, y, z;
};
// The running lane's indices; the runtime sets them before resuming a lane, and every
// barrier is an opaque call, so no compiled kernel keeps a stale copy across a switch.
extern pod_dim3 threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();
float pod_shfl_xor(float v, int mask);
int pod_shfl_xor(int v, int mask);
void* pod_dynamic_shared();

static inline int pod_dot4(int a, int b, int c) {
    for (int i = 0; i < 32; i += 8) {
        c += (int)(signed char)(a >> i) * (int)(signed char)(b >> i);
    }
    return c;
}

#define POD_DYNAMIC_SHARED(type, name) type* name = (type*)pod_dynamic_shared()
