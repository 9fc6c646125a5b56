// See thread_pool.h.
#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CHESS_MLX_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define CHESS_MLX_PAUSE() asm volatile("yield" ::: "memory")
#else
#define CHESS_MLX_PAUSE() ((void)0)
#endif

namespace chess_mlx::pool {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return fallback;
  }
  char* end = nullptr;
  long r = std::strtol(v, &end, 10);
  return (end != v) ? static_cast<int>(r) : fallback;
}

int default_num_threads() {
  int n = env_int("CHESS_MLX_NUM_THREADS", 0);
  if (n > 0) {
    return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    n = CPU_COUNT(&set);
  }
#endif
  if (n <= 0) {
    n = static_cast<int>(std::thread::hardware_concurrency());
  }
  return n > 0 ? n : 1;
}

// Tasks ("chunks") are claimed dynamically from a shared counter by the
// caller and by whichever workers are awake. The caller therefore never waits
// for a worker that the OS has not scheduled (common when cores are
// oversubscribed); it only waits for chunks that a worker has already
// started. The claim counter is packed with the job generation into one
// 64-bit atomic, so a late worker can never claim a chunk of a newer job
// with stale job fields (its compare-exchange fails instead).
class Pool {
 public:
  static constexpr uint32_t kClosed = 0xFFFFFFFFu;

  Pool(int nthreads, int spin_us) : spin_us_(spin_us < 0 ? 0 : spin_us) {
    // Workers start from generation 0: a job may be posted before a new
    // thread gets to read the counter, and it must not be missed.
    for (int i = 1; i < nthreads; ++i) {
      workers_.emplace_back([this] { worker_loop(0); });
    }
  }

  ~Pool() {
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
  }

  int size() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Caller must hold the global pool mutex.
  void run(int ntasks, TaskFn fn, void* ctx) {
    const uint32_t g = generation_.load(std::memory_order_relaxed) + 1;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    ntasks_.store(ntasks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(pack(g, 0), std::memory_order_release);
    generation_.store(g, std::memory_order_release);
    generation_.notify_all(); // no syscall unless a worker is blocked

    // Work alongside the workers until every chunk is claimed.
    while (claim_and_run(g)) {
    }
    // Wait for chunks that workers have started.
    int spins = 0;
    while (done_.load(std::memory_order_acquire) != ntasks) {
      if (++spins < 256) {
        CHESS_MLX_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
    // Close the job so that stale claims fail before the fields are reused.
    state_.store(pack(g, kClosed), std::memory_order_release);
  }

 private:
  static uint64_t pack(uint32_t g, uint32_t next) {
    return (static_cast<uint64_t>(g) << 32) | next;
  }

  // Claim one chunk of job g and run it; false if none is left (or the job
  // is no longer g).
  bool claim_and_run(uint32_t g) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(s >> 32) != g) {
        return false;
      }
      const uint32_t next = static_cast<uint32_t>(s);
      const int ntasks = ntasks_.load(std::memory_order_relaxed);
      if (next == kClosed || next >= static_cast<uint32_t>(ntasks)) {
        return false;
      }
      if (state_.compare_exchange_weak(
              s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        // The job cannot finish (and its fields cannot change) before this
        // chunk is counted as done, so the fields read here belong to g.
        fn_.load(std::memory_order_relaxed)(
            ctx_.load(std::memory_order_relaxed), static_cast<int>(next),
            ntasks_.load(std::memory_order_relaxed));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }

  void worker_loop(uint32_t seen) {
    for (;;) {
      const uint32_t g = wait_for_change(seen);
      seen = g;
      if (stop_.load(std::memory_order_acquire)) {
        return;
      }
      while (claim_and_run(g)) {
      }
    }
  }

  uint32_t wait_for_change(uint32_t seen) {
    using clock = std::chrono::steady_clock;
    uint32_t g = generation_.load(std::memory_order_acquire);
    if (g != seen) {
      return g;
    }
    if (spin_us_ > 0) {
      auto deadline = clock::now() + std::chrono::microseconds(spin_us_);
      for (int i = 1;; ++i) {
        CHESS_MLX_PAUSE();
        g = generation_.load(std::memory_order_acquire);
        if (g != seen) {
          return g;
        }
        if ((i & 63) == 0 && clock::now() > deadline) {
          break;
        }
      }
    }
    for (;;) {
      generation_.wait(seen, std::memory_order_acquire);
      g = generation_.load(std::memory_order_acquire);
      if (g != seen) {
        return g;
      }
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<uint64_t> state_{pack(0, kClosed)};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> ntasks_{0};
  int spin_us_;
};

std::mutex& pool_mutex() {
  static auto* m = new std::mutex();
  return *m;
}

// Deliberately leaked: joining threads from static destructors at interpreter
// shutdown is fragile, and the OS reclaims them at exit anyway.
Pool* g_pool = nullptr;
int g_requested = 0; // 0 = default
std::atomic<int> g_size{0}; // size of g_pool, 0 if not created yet

#if defined(__linux__)
void after_fork_in_child() {
  // Worker threads do not survive fork(); forget (leak) the old pool and the
  // possibly-held mutex, a fresh pool is created on first use in the child.
  g_pool = nullptr;
  g_size.store(0);
  new (&pool_mutex()) std::mutex();
}
#endif

// Caller holds pool_mutex().
Pool& get_locked() {
  if (g_pool == nullptr) {
#if defined(__linux__)
    static bool registered = [] {
      pthread_atfork(nullptr, nullptr, &after_fork_in_child);
      return true;
    }();
    (void)registered;
#endif
    int n = g_requested > 0 ? g_requested : default_num_threads();
    g_pool = new Pool(n, env_int("CHESS_MLX_SPIN_US", 50));
    g_size.store(g_pool->size(), std::memory_order_release);
  }
  return *g_pool;
}

} // namespace

void run(int ntasks, TaskFn fn, void* ctx) {
  if (ntasks <= 0) {
    return;
  }
  if (ntasks > 1) {
    std::unique_lock<std::mutex> lock(pool_mutex(), std::try_to_lock);
    if (lock.owns_lock()) {
      Pool& p = get_locked();
      if (p.size() > 1) {
        p.run(ntasks, fn, ctx);
        return;
      }
    }
  }
  for (int t = 0; t < ntasks; ++t) {
    fn(ctx, t, ntasks);
  }
}

int num_threads() {
  int n = g_size.load(std::memory_order_acquire);
  if (n > 0) {
    return n;
  }
  std::lock_guard<std::mutex> lock(pool_mutex());
  return get_locked().size();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex());
  g_requested = n > 0 ? n : 0;
  delete g_pool;
  g_pool = nullptr;
  g_size.store(0, std::memory_order_release);
}

} // namespace chess_mlx::pool
