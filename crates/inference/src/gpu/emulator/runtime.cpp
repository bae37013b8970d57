// The emulator's runtime, appended after the kernels: runs every lane of a block as a fiber
// (ucontext) on the calling thread, switching lanes only at barriers, and blocks one after
// another. Lanes waiting at a barrier resume when every lane still running in their scope
// (the block for __syncthreads, the hardware warp of POD_WARP lanes for shuffles) has
// arrived; if no lane can run and some have not finished, the launch fails instead of
// hanging (a barrier that only some lanes reach).
#include <cstddef>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

pod_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace pod_emu {

enum State { READY, AT_BLOCK, AT_WARP, DONE };

struct Lane {
    ucontext_t ctx;
    State state;
    std::vector<char> stack;
};

constexpr std::size_t STACK_BYTES = 64 * 1024;
constexpr unsigned MAX_THREADS = 1024;

static ucontext_t scheduler;
static std::vector<Lane> lanes;
static std::vector<std::uint64_t> exchange;
static std::vector<std::max_align_t> dynamic_shared;
static std::function<void()> body;
static unsigned current;

static void wait(State s) {
    lanes[current].state = s;
    swapcontext(&lanes[current].ctx, &scheduler);
}

static void entry() {
    body();
    lanes[current].state = DONE;
}

static void set_thread(unsigned l) {
    threadIdx.x = l % blockDim.x;
    threadIdx.y = l / blockDim.x % blockDim.y;
    threadIdx.z = l / (blockDim.x * blockDim.y);
}

// Runs one block of n lanes to completion: 0, or 1 when the lanes deadlock.
static int run_block(unsigned n) {
    for (unsigned l = 0; l < n; ++l) {
        Lane& lane = lanes[l];
        getcontext(&lane.ctx);
        lane.ctx.uc_stack.ss_sp = lane.stack.data();
        lane.ctx.uc_stack.ss_size = lane.stack.size();
        lane.ctx.uc_link = &scheduler;
        makecontext(&lane.ctx, entry, 0);
        lane.state = READY;
    }
    for (;;) {
        for (unsigned l = 0; l < n; ++l) {
            if (lanes[l].state == READY) {
                current = l;
                set_thread(l);
                swapcontext(&scheduler, &lanes[l].ctx);
            }
        }
        unsigned done = 0, at_block = 0;
        for (unsigned l = 0; l < n; ++l) {
            done += lanes[l].state == DONE;
            at_block += lanes[l].state == AT_BLOCK;
        }
        if (done == n) {
            return 0;
        }
        bool released = false;
        if (at_block + done == n) {
            for (unsigned l = 0; l < n; ++l) {
                if (lanes[l].state == AT_BLOCK) {
                    lanes[l].state = READY;
                }
            }
            released = true;
        }
        for (unsigned w = 0; w < n; w += POD_WARP) {
            const unsigned end = w + POD_WARP < n ? w + POD_WARP : n;
            unsigned waiting = 0, finished = 0;
            for (unsigned l = w; l < end; ++l) {
                waiting += lanes[l].state == AT_WARP;
                finished += lanes[l].state == DONE;
            }
            if (waiting > 0 && waiting + finished == end - w) {
                for (unsigned l = w; l < end; ++l) {
                    if (lanes[l].state == AT_WARP) {
                        lanes[l].state = READY;
                    }
                }
                released = true;
            }
        }
        if (!released) {
            return 1;
        }
    }
}

template <typename T> static T shuffle_xor(T v, int mask) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    exchange[current] = bits;
    wait(AT_WARP);
    const unsigned from = current ^ (unsigned)mask;
    bits = from < exchange.size() ? exchange[from] : bits;
    // A second barrier, so that no lane overwrites its slot before every lane has read.
    wait(AT_WARP);
    T out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

template <typename T> constexpr char kind() {
    if constexpr (std::is_pointer_v<T>) {
        return 'p';
    } else if constexpr (std::is_same_v<T, int>) {
        return 'i';
    } else if constexpr (std::is_same_v<T, float>) {
        return 'f';
    } else {
        return '?';
    }
}

template <typename... P> const char* signature(void (*)(P...)) {
    static const char sig[] = {kind<P>()..., '\0'};
    return sig;
}

template <typename... P, std::size_t... I>
static void call(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<P*>(args[I])...);
}

// dims: grid x, y, z, block x, y, z. args[i] points to the value of parameter i. Returns 0,
// 1 when a block's lanes deadlock, 2 for dimensions no GPU accepts.
template <typename... P>
int launch(void (*k)(P...), const unsigned* dims, unsigned shared_bytes, void** args) {
    gridDim = {dims[0], dims[1], dims[2]};
    blockDim = {dims[3], dims[4], dims[5]};
    const unsigned long long n = (unsigned long long)dims[3] * dims[4] * dims[5];
    if (n == 0 || n > MAX_THREADS || dims[0] == 0 || dims[1] == 0 || dims[2] == 0) {
        return 2;
    }
    if (lanes.size() < n) {
        lanes.resize(n);
        for (Lane& lane : lanes) {
            lane.stack.resize(STACK_BYTES);
        }
    }
    exchange.assign(n, 0);
    dynamic_shared.assign(shared_bytes / sizeof(std::max_align_t) + 1, std::max_align_t{});
    body = [&] { call(k, args, std::index_sequence_for<P...>{}); };
    for (unsigned z = 0; z < dims[2]; ++z) {
        for (unsigned y = 0; y < dims[1]; ++y) {
            for (unsigned x = 0; x < dims[0]; ++x) {
                blockIdx = {x, y, z};
                if (run_block((unsigned)n) != 0) {
                    return 1;
                }
            }
        }
    }
    return 0;
}

} // namespace pod_emu

void __syncthreads() {
    pod_emu::wait(pod_emu::AT_BLOCK);
}
float pod_shfl_xor(float v, int mask) {
    return pod_emu::shuffle_xor(v, mask);
}
int pod_shfl_xor(int v, int mask) {
    return pod_emu::shuffle_xor(v, mask);
}
void* pod_dynamic_shared() {
    return pod_emu::dynamic_shared.data();
}
extern "C" unsigned pod_emu_warp() {
    return POD_WARP;
}

// Generated after this: for each kernel NAME, pod_signature_NAME() (one letter per
// parameter: p pointer, i int, f float) and pod_launch_NAME(dims, shared_bytes, args).
