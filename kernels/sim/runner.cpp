// The launcher of the CPU shim (shim.h), compiled into each kernel library: a launch of a grid of
// blocks (both 3-D, x fastest) runs one OS thread per thread of a block; each sets its threadIdx
// and walks the blocks in order, calling `body(ctx)` (which calls the kernel) once per block, with
// a barrier after each block so that no thread starts block b+1 while another still works on
// block b (whose __shared__ memory, static and dynamic, is the same storage). Each warp of the
// block gets its own barrier and shuffle buffer (shim.h's warp section).
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {
// The launch's dynamic shared memory: zeroed, 64-byte aligned, at least 64 bytes.
struct shim_smem {
    unsigned char* p;
    explicit shim_smem(unsigned bytes) {
        const size_t n = ((size_t)bytes + 63) / 64 * 64 + 64;
        p = (unsigned char*)std::aligned_alloc(64, n);
        std::memset(p, 0, n);
        shim_dynamic_shared = p;
    }
    ~shim_smem() {
        shim_dynamic_shared = nullptr;
        std::free(p);
    }
};

void shim_set_dims(const unsigned* d) {
    gridDim = shim_dim3{d[0], d[1], d[2]};
    blockDim = shim_dim3{d[3], d[4], d[5]};
}

shim_dim3 shim_unflatten(unsigned long long i, const shim_dim3& e) {
    shim_dim3 r;
    r.x = (unsigned)(i % e.x);
    r.y = (unsigned)((i / e.x) % e.y);
    r.z = (unsigned)(i / ((unsigned long long)e.x * e.y));
    return r;
}
} // namespace

// d = {grid.x, grid.y, grid.z, block.x, block.y, block.z}; `shared_bytes` of dynamic shared memory.
namespace {
// The state of a launch with barriers, shared by shim_launch3 and shim_launch3_fibers: the
// dimensions, the dynamic shared memory, the block's barrier and one barrier and exchange buffer
// per warp (shim.h's warp section; a partial last warp has one too, which its shuffles refuse to
// use), published in shim.h's globals for the launch and cleared after it.
struct shim_block_launch {
    unsigned long long blocks;
    unsigned threads;
    shim_smem smem;
    shim_barrier bar;
    std::unique_ptr<shim_warp[]> warps;
    shim_block_launch(const unsigned* d, unsigned shared_bytes)
        : blocks((unsigned long long)d[0] * d[1] * d[2]), threads(d[3] * d[4] * d[5]), smem(shared_bytes), bar(threads), warps(new shim_warp[(threads + 31) / 32]) {
        shim_set_dims(d);
        shim_block_barrier = &bar;
        shim_warps = warps.get();
        shim_block_threads = threads;
    }
    ~shim_block_launch() {
        shim_block_barrier = nullptr;
        shim_warps = nullptr;
        shim_block_threads = 0;
    }
};
} // namespace

extern "C" void shim_launch3(const unsigned* d, unsigned shared_bytes, void (*body)(void*), void* ctx) {
    shim_block_launch l(d, shared_bytes);
    const unsigned long long blocks = l.blocks;
    shim_barrier& bar = l.bar;
    std::vector<std::thread> pool;
    pool.reserve((size_t)l.threads);
    for (unsigned t = 0; t < l.threads; ++t) {
        pool.emplace_back([=, &bar] {
            threadIdx = shim_unflatten(t, blockDim);
            for (unsigned long long b = 0; b < blocks; ++b) {
                blockIdx = shim_unflatten(b, gridDim);
                body(ctx);
                bar.wait();
            }
        });
    }
    for (auto& th : pool) th.join();
}

// shim_launch3's semantics with the block's threads as fibers of the calling OS thread (shim.h's
// shim_fibers): each block's fibers start fresh, run until they wait at a barrier or end, and are
// resumed round-robin; a fiber that ends waits at the block's barrier first, as shim_launch3's
// threads do after each block. Blocks run one after another. Much cheaper than shim_launch3 where
// barriers are many (warp shuffles, block reductions): no OS thread sleeps or wakes.
namespace {
void shim_fiber_entry() {
    shim_fibers* f = shim_fiber_sched;
    f->body(f->arg);
    shim_block_barrier->wait();
    f->done[f->cur] = 1;
    // returning resumes uc_link, the scheduler
}
} // namespace

extern "C" void shim_launch3_fibers(const unsigned* d, unsigned shared_bytes, void (*body)(void*), void* ctx) {
    shim_block_launch l(d, shared_bytes);
    const unsigned long long blocks = l.blocks;
    const unsigned threads = l.threads;
    // stacks are allocated, not touched: only the pages a kernel's locals use get committed
    const size_t stack = 256 * 1024;
    std::unique_ptr<unsigned char[]> stacks(new unsigned char[stack * threads]);
    std::vector<ucontext_t> ctxs(threads);
    std::vector<unsigned> phase(threads);
    std::vector<char> done(threads);
    shim_fibers f;
    f.ctx = ctxs.data();
    f.done = done.data();
    f.body = body;
    f.arg = ctx;
    shim_fiber_sched = &f;
    for (unsigned long long b = 0; b < blocks; ++b) {
        blockIdx = shim_unflatten(b, gridDim);
        for (unsigned t = 0; t < threads; ++t) {
            getcontext(&ctxs[t]);
            ctxs[t].uc_stack.ss_sp = stacks.get() + (size_t)t * stack;
            ctxs[t].uc_stack.ss_size = stack;
            ctxs[t].uc_link = &f.sched;
            makecontext(&ctxs[t], shim_fiber_entry, 0);
            phase[t] = 0;
            done[t] = 0;
        }
        unsigned left = threads;
        while (left > 0) {
            for (unsigned t = 0; t < threads; ++t) {
                if (done[t]) continue;
                threadIdx = shim_unflatten(t, blockDim);
                shim_shuffle_phase = phase[t];
                f.cur = t;
                // back here when the fiber waits at a barrier (shim_fiber_yield) or ends (uc_link)
                swapcontext(&f.sched, &ctxs[t]);
                phase[t] = shim_shuffle_phase;
                if (done[t]) --left;
            }
        }
    }
    shim_fiber_sched = nullptr;
}

extern "C" void shim_launch_fibers(int grid, int block, void (*body)(void*), void* ctx) {
    const unsigned d[6] = {(unsigned)grid, 1, 1, (unsigned)block, 1, 1};
    shim_launch3_fibers(d, 0, body, ctx);
}

extern "C" void shim_launch(int grid, int block, void (*body)(void*), void* ctx) {
    const unsigned d[6] = {(unsigned)grid, 1, 1, (unsigned)block, 1, 1};
    shim_launch3(d, 0, body, ctx);
}

// For kernels without __syncthreads or __shared__ memory: no barrier is needed, so a few worker
// threads share out the blocks and each runs a block's threads one after another (one worker
// when the launch asks for dynamic shared memory, which the blocks would otherwise share).
extern "C" void shim_launch3_serial(const unsigned* d, unsigned shared_bytes, void (*body)(void*), void* ctx) {
    shim_set_dims(d);
    const unsigned long long blocks = (unsigned long long)d[0] * d[1] * d[2];
    const unsigned threads = d[3] * d[4] * d[5];
    shim_smem smem(shared_bytes);
    const int workers = shared_bytes > 0 ? 1 : (blocks < 4 ? (blocks < 1 ? 1 : (int)blocks) : 4);
    std::vector<std::thread> pool;
    pool.reserve((size_t)workers);
    for (int w = 0; w < workers; ++w) {
        pool.emplace_back([=] {
            for (unsigned long long b = (unsigned long long)w; b < blocks; b += (unsigned long long)workers) {
                blockIdx = shim_unflatten(b, gridDim);
                for (unsigned t = 0; t < threads; ++t) {
                    threadIdx = shim_unflatten(t, blockDim);
                    body(ctx);
                }
            }
        });
    }
    for (auto& th : pool) th.join();
}

extern "C" void shim_launch_serial(int grid, int block, void (*body)(void*), void* ctx) {
    const unsigned d[6] = {(unsigned)grid, 1, 1, (unsigned)block, 1, 1};
    shim_launch3_serial(d, 0, body, ctx);
}
