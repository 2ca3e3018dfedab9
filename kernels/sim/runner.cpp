// The launcher of the CPU shim (shim.h), compiled into each kernel library: a launch of `grid`
// blocks of `block` threads runs `block` OS threads; each sets its threadIdx and walks the blocks
// in order, calling `body(ctx)` (which calls the kernel) once per block, with a barrier after each
// block so that no thread starts block b+1 while another still works on block b (whose __shared__
// memory is the same static storage).
#include <thread>
#include <vector>

extern "C" void shim_launch(int grid, int block, void (*body)(void*), void* ctx) {
    gridDim.x = (unsigned)grid;
    blockDim.x = (unsigned)block;
    shim_barrier bar((unsigned)block);
    shim_block_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve((size_t)block);
    for (int t = 0; t < block; ++t) {
        threads.emplace_back([=, &bar] {
            threadIdx.x = (unsigned)t;
            for (int b = 0; b < grid; ++b) {
                blockIdx.x = (unsigned)b;
                body(ctx);
                bar.wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    shim_block_barrier = nullptr;
}

// For kernels without __syncthreads or __shared__ memory: no barrier is needed, so a few worker
// threads share out the blocks and each runs a block's threads one after another.
extern "C" void shim_launch_serial(int grid, int block, void (*body)(void*), void* ctx) {
    gridDim.x = (unsigned)grid;
    blockDim.x = (unsigned)block;
    const int workers = grid < 4 ? (grid < 1 ? 1 : grid) : 4;
    std::vector<std::thread> threads;
    threads.reserve((size_t)workers);
    for (int w = 0; w < workers; ++w) {
        threads.emplace_back([=] {
            for (int b = w; b < grid; b += workers) {
                blockIdx.x = (unsigned)b;
                for (int t = 0; t < block; ++t) {
                    threadIdx.x = (unsigned)t;
                    body(ctx);
                }
            }
        });
    }
    for (auto& th : threads) th.join();
}
