// Persistent worker pool for the CPU sparse GEMV kernels.
//
// Decode-time GEMVs take tens to hundreds of microseconds, so creating
// threads per call (or going through a std::function/std::future queue like
// mlx/threadpool.h) is too expensive. This pool keeps N-1 workers alive for
// the whole process; the calling thread (MLX's CPU stream thread) takes part
// in every job and never waits for a worker the OS has not scheduled yet
// (tasks are claimed dynamically). After a job, workers spin for a short
// while (back-to-back decode GEMVs then start without a futex wake-up) and
// then block on a C++20 atomic wait, so an idle process does not burn CPU.
//
// Thread count: env CHESS_MLX_NUM_THREADS, else the number of CPUs in this
// process's affinity mask. Spin time: env CHESS_MLX_SPIN_US (default 50).
#pragma once

namespace chess_mlx::pool {

using TaskFn = void (*)(void* ctx, int task, int ntasks);

// Run fn(ctx, t, ntasks) for every t in [0, ntasks) and return when all are
// done. The caller and the awake workers claim tasks dynamically, so tasks
// may run on any thread in any order; use a few more tasks than threads for
// load balance. If another thread is already using the pool (two CPU streams
// at once), every task runs on the caller instead.
void run(int ntasks, TaskFn fn, void* ctx);

// Threads used by run(), including the caller. Creates the pool lazily.
int num_threads();

// Replace the pool by one with n threads (n >= 1; n <= 0 restores the
// default). Waits for a running job to finish first.
void set_num_threads(int n);

} // namespace chess_mlx::pool
