// Metal Shading Language shim for running MLX-generated `mx.fast.metal_kernel`
// sources on a CPU with g++ (see tests/emulator/__init__.py for the list of
// what this emulation cannot catch).
//
// Execution model: one threadgroup at a time; every thread of the threadgroup
// is a cooperative fiber.  A fiber runs until it reaches a synchronisation
// point (threadgroup_barrier, simdgroup_barrier or a simd_* collective); the
// scheduler then runs the next fiber.  A simd collective completes once every
// still-running lane of the simdgroup has reached one (they must all be the
// same collective), a threadgroup barrier once every thread of the threadgroup
// has reached it.  Anything else (a thread that exits while others wait at a
// barrier, lanes waiting at different collectives, a deadlock) aborts the run
// with exit status 2.  `threadgroup` arrays are poisoned (0xFF bytes, i.e. NaN
// for floating types) before every threadgroup.
#pragma once

// ---- standard headers first: the address-space macros below would break them
// (kept small: parsing the C++ standard library dominates the compile time)
#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

// ---------------------------------------------------------------------------
// Scalar types
// ---------------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;  // IEEE binary16, conversions round to nearest even

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet
      return uint16_t((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
  }
  bfloat(float f) : bits(from_float(f)) {}
  bfloat(double f) : bits(from_float(float(f))) {}
  bfloat(int f) : bits(from_float(float(f))) {}
  bfloat(uint f) : bits(from_float(float(f))) {}
  bfloat(half f) : bits(from_float(float(f))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  bfloat operator-() const {
    bfloat r;
    r.bits = bits ^ 0x8000u;
    return r;
  }
#define EMU_BF_OP(op)                                   \
  bfloat& operator op##=(bfloat o) {                    \
    *this = bfloat(float(*this) op float(o));           \
    return *this;                                       \
  }
  EMU_BF_OP(+)
  EMU_BF_OP(-)
  EMU_BF_OP(*)
  EMU_BF_OP(/)
#undef EMU_BF_OP
};
#define EMU_BF_BIN(op)                                                     \
  inline bfloat operator op(bfloat a, bfloat b) {                          \
    return bfloat(float(a) op float(b));                                   \
  }                                                                        \
  inline float operator op(bfloat a, float b) { return float(a) op b; }   \
  inline float operator op(float a, bfloat b) { return a op float(b); }
EMU_BF_BIN(+)
EMU_BF_BIN(-)
EMU_BF_BIN(*)
EMU_BF_BIN(/)
#undef EMU_BF_BIN
#define EMU_BF_CMP(op)                                                         \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); } \
  inline bool operator op(bfloat a, float b) { return float(a) op b; }         \
  inline bool operator op(float a, bfloat b) { return a op float(b); }
EMU_BF_CMP(<)
EMU_BF_CMP(>)
EMU_BF_CMP(<=)
EMU_BF_CMP(>=)
EMU_BF_CMP(==)
EMU_BF_CMP(!=)
#undef EMU_BF_CMP

typedef half float16_t;
typedef bfloat bfloat16_t;

// ---------------------------------------------------------------------------
// Vector types (vec<T, N>, float4, half2, uint3, ...)
// ---------------------------------------------------------------------------
namespace emu_detail {
template <typename T, int N>
struct vec_storage;
template <typename T>
struct vec_storage<T, 2> {
  T x, y;
};
template <typename T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  T x, y, z;
};
template <typename T>
struct vec_storage<T, 4> {
  T x, y, z, w;
};
}  // namespace emu_detail

template <typename T, int N>
struct vec : emu_detail::vec_storage<T, N> {
  vec() = default;
  vec(T s) {
    for (int i = 0; i < N; i++) (*this)[i] = s;
  }
  template <typename... A, typename = std::enable_if_t<sizeof...(A) == N && (N > 1)>>
  vec(A... a) {
    T v[N] = {T(a)...};
    for (int i = 0; i < N; i++) (*this)[i] = v[i];
  }
  template <typename U>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; i++) (*this)[i] = T(o[i]);
  }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
  vec operator-() const {
    vec r;
    for (int i = 0; i < N; i++) r[i] = -(*this)[i];
    return r;
  }
#define EMU_VEC_CASSIGN(op)                                   \
  vec& operator op##=(const vec& o) {                         \
    for (int i = 0; i < N; i++) (*this)[i] op## = o[i];       \
    return *this;                                             \
  }
  EMU_VEC_CASSIGN(+)
  EMU_VEC_CASSIGN(-)
  EMU_VEC_CASSIGN(*)
  EMU_VEC_CASSIGN(/)
#undef EMU_VEC_CASSIGN
};
#define EMU_VEC_BIN(op)                                                   \
  template <typename T, int N>                                            \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {         \
    vec<T, N> r;                                                          \
    for (int i = 0; i < N; i++) r[i] = a[i] op b[i];                      \
    return r;                                                             \
  }                                                                       \
  template <typename T, int N, typename S,                                \
            typename = std::enable_if_t<std::is_arithmetic<S>::value>>    \
  vec<T, N> operator op(const vec<T, N>& a, S b) {                        \
    return a op vec<T, N>(T(b));                                          \
  }                                                                       \
  template <typename T, int N, typename S,                                \
            typename = std::enable_if_t<std::is_arithmetic<S>::value>>    \
  vec<T, N> operator op(S a, const vec<T, N>& b) {                        \
    return vec<T, N>(T(a)) op b;                                          \
  }
EMU_VEC_BIN(+)
EMU_VEC_BIN(-)
EMU_VEC_BIN(*)
EMU_VEC_BIN(/)
#undef EMU_VEC_BIN

#define EMU_VEC_TYPES(T, name)  \
  typedef vec<T, 2> name##2;    \
  typedef vec<T, 3> name##3;    \
  typedef vec<T, 4> name##4;    \
  typedef vec<T, 2> packed_##name##2; \
  typedef vec<T, 4> packed_##name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(bool, bool)
#undef EMU_VEC_TYPES

// ---------------------------------------------------------------------------
// Runtime: fibers, scheduler, guarded buffers
// ---------------------------------------------------------------------------
namespace emu {

struct ThreadAttrs {
  uint dispatch_quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint thread_index_in_quadgroup;
  uint thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

enum State { RUNNABLE = 0, WAIT_BAR = 1, WAIT_SIMD = 2, DONE = 3 };
constexpr int kSimdWidth = 32;
constexpr int kSlot = 64;  // bytes per lane for simd collective payloads
constexpr size_t kStack = 256 * 1024;

struct Fiber;
// resolver(lanes, active): lanes[l] is lane l of the simdgroup (nullptr past a
// partial simdgroup), active[l] whether it takes part.
typedef void (*Resolver)(Fiber** lanes, const bool* active);

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
  State state = DONE;
  ThreadAttrs a;
  Resolver resolver = nullptr;
  int arg = 0;
  alignas(16) unsigned char in[kSlot];
  alignas(16) unsigned char out[kSlot];
};

constexpr int kMaxThreads = 1024;
constexpr int kMaxRegions = 64;

struct Runtime {
  Fiber* fibers = nullptr;  // kMaxThreads, allocated on first launch
  int n = 0;
  Fiber* cur = nullptr;
  jmp_buf sched;
  void (*body)(void* ctx, const ThreadAttrs&) = nullptr;
  void* body_ctx = nullptr;
  void* tg_ptr[kMaxRegions];
  size_t tg_size[kMaxRegions];
  int n_regions = 0;
  int order = 0;  // 0 forward, 1 reverse, 2 random permutation per pass
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  long long syncs = 0;
};
inline Runtime R;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATOR ERROR: %s", what);
  if (R.cur) {
    const ThreadAttrs& a = R.cur->a;
    std::fprintf(stderr, " (thread_position_in_grid=%u,%u,%u)",
                 a.thread_position_in_grid.x, a.thread_position_in_grid.y,
                 a.thread_position_in_grid.z);
  }
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(2);
}

// Called from a fiber: give control back to the scheduler.
inline void yield_to_scheduler() {
  Fiber* f = R.cur;
  if (!f) fail("synchronisation point outside a kernel thread");
  R.syncs++;
  if (!_setjmp(f->jb)) {
    _longjmp(R.sched, 1);
  }
}

inline uint64_t next_random() {  // xorshift64*
  R.rng ^= R.rng >> 12;
  R.rng ^= R.rng << 25;
  R.rng ^= R.rng >> 27;
  return R.rng * 2685821657736338717ull;
}

inline void fiber_entry() {
  Fiber* f = R.cur;
  R.body(R.body_ctx, f->a);
  f->state = DONE;
  _longjmp(R.sched, 1);
}

// Register a `threadgroup` array (the source rewriter turns every
// `threadgroup T name[N];` into a static array plus this call).
inline void tg_register(void* p, size_t n) {
  for (int i = 0; i < R.n_regions; i++)
    if (R.tg_ptr[i] == p) return;
  if (R.n_regions == kMaxRegions) fail("too many threadgroup arrays");
  R.tg_ptr[R.n_regions] = p;
  R.tg_size[R.n_regions++] = n;
  std::memset(p, 0xFF, n);  // poison before first use
}

inline void run_fiber(Fiber& f) {
  R.cur = &f;
  if (!_setjmp(R.sched)) {
    if (!f.started) {
      f.started = true;
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack;
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, (void (*)())fiber_entry, 0);
      setcontext(&f.uc);
    } else {
      _longjmp(f.jb, 1);
    }
  }
  R.cur = nullptr;
}

inline void run_threadgroup(const uint3& tgpos, const uint3& grid,
                            const uint3& dispatch_tg) {
  uint3 tgs;  // actual (possibly partial, at the grid edge) threadgroup size
  for (int d = 0; d < 3; d++) {
    uint left = grid[d] - tgpos[d] * dispatch_tg[d];
    tgs[d] = left < dispatch_tg[d] ? left : dispatch_tg[d];
  }
  const int n = int(tgs.x * tgs.y * tgs.z);
  const int dn = int(dispatch_tg.x * dispatch_tg.y * dispatch_tg.z);
  if (!R.fibers) R.fibers = new Fiber[kMaxThreads];
  for (int i = 0; i < n; i++)
    if (!R.fibers[i].stack) R.fibers[i].stack = (char*)std::malloc(kStack);
  R.n = n;
  for (int i = 0; i < R.n_regions; i++) std::memset(R.tg_ptr[i], 0xFF, R.tg_size[i]);
  for (int i = 0; i < n; i++) {
    Fiber& f = R.fibers[i];
    f.started = false;
    f.state = RUNNABLE;
    f.resolver = nullptr;
    ThreadAttrs& a = f.a;
    uint3 lp(uint(i % tgs.x), uint((i / tgs.x) % tgs.y), uint(i / (tgs.x * tgs.y)));
    a.thread_position_in_threadgroup = lp;
    a.threadgroup_position_in_grid = tgpos;
    for (int d = 0; d < 3; d++) {
      a.thread_position_in_grid[d] = tgpos[d] * dispatch_tg[d] + lp[d];
      a.threadgroups_per_grid[d] = (grid[d] + dispatch_tg[d] - 1) / dispatch_tg[d];
    }
    a.threads_per_grid = grid;
    a.grid_size = grid;
    a.grid_origin = uint3(0u, 0u, 0u);
    a.threads_per_threadgroup = tgs;
    a.dispatch_threads_per_threadgroup = dispatch_tg;
    a.thread_index_in_threadgroup = uint(i);
    a.thread_index_in_simdgroup = uint(i % kSimdWidth);
    a.simdgroup_index_in_threadgroup = uint(i / kSimdWidth);
    a.simdgroups_per_threadgroup = uint((n + kSimdWidth - 1) / kSimdWidth);
    a.dispatch_simdgroups_per_threadgroup = uint((dn + kSimdWidth - 1) / kSimdWidth);
    a.thread_execution_width = kSimdWidth;
    a.threads_per_simdgroup = kSimdWidth;
    a.thread_index_in_quadgroup = uint(i % 4);
    a.quadgroup_index_in_threadgroup = uint(i / 4);
    a.quadgroups_per_threadgroup = uint((n + 3) / 4);
    a.dispatch_quadgroups_per_threadgroup = uint((dn + 3) / 4);
  }
  static int perm[kMaxThreads];
  const int nsg = (n + kSimdWidth - 1) / kSimdWidth;
  while (true) {
    for (int i = 0; i < n; i++) perm[i] = (R.order == 1) ? n - 1 - i : i;
    if (R.order == 2) {
      for (int i = n - 1; i > 0; i--) {
        int j = int(next_random() % uint64_t(i + 1));
        int t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
      }
    }
    for (int k = 0; k < n; k++)
      if (R.fibers[perm[k]].state == RUNNABLE) run_fiber(R.fibers[perm[k]]);
    int done = 0, bar = 0;
    for (int i = 0; i < n; i++) {
      done += R.fibers[i].state == DONE;
      bar += R.fibers[i].state == WAIT_BAR;
    }
    if (done == n) break;
    // simd collectives
    bool progressed = false;
    for (int s = 0; s < nsg; s++) {
      Fiber* lanes[kSimdWidth] = {};
      bool active[kSimdWidth] = {};
      int waiting = 0, running = 0;
      Resolver r = nullptr;
      for (int l = 0; l < kSimdWidth; l++) {
        int i = s * kSimdWidth + l;
        if (i >= n) break;
        Fiber& f = R.fibers[i];
        lanes[l] = &f;
        if (f.state == DONE) continue;
        running++;
        active[l] = true;
        if (f.state == WAIT_SIMD) {
          waiting++;
          if (r && f.resolver != r) {
            R.cur = &f;
            fail("lanes of one simdgroup wait at different simd collectives "
                 "(divergent control flow)");
          }
          r = f.resolver;
        }
      }
      if (waiting > 0 && waiting == running) {
        r(lanes, active);
        for (int l = 0; l < kSimdWidth; l++)
          if (active[l]) lanes[l]->state = RUNNABLE;
        progressed = true;
      }
    }
    if (progressed) continue;
    if (bar > 0 && bar + done == n) {
      if (done > 0)
        fail("threadgroup_barrier reached while other threads of the "
             "threadgroup have exited");
      for (int i = 0; i < n; i++) R.fibers[i].state = RUNNABLE;
      continue;
    }
    fail("deadlock: threads wait at a threadgroup barrier while others of "
         "their simdgroup wait at a simd collective (divergent barrier or "
         "collective)");
  }
}

template <typename F>
inline void launch(uint3 grid, uint3 tg, F& body) {
  for (int d = 0; d < 3; d++) {
    if (grid[d] == 0) return;
    if (tg[d] > grid[d]) tg[d] = grid[d];  // as MLX's CustomKernel::eval_gpu
    if (tg[d] == 0) fail("threadgroup size 0");
  }
  if (tg.x * tg.y * tg.z > uint(kMaxThreads)) fail("threadgroup larger than 1024 threads");
  R.body = [](void* ctx, const ThreadAttrs& a) { (*(F*)ctx)(a); };
  R.body_ctx = (void*)&body;
  uint3 ntg;
  for (int d = 0; d < 3; d++) ntg[d] = (grid[d] + tg[d] - 1) / tg[d];
  for (uint z = 0; z < ntg.z; z++)
    for (uint y = 0; y < ntg.y; y++)
      for (uint x = 0; x < ntg.x; x++) run_threadgroup(uint3(x, y, z), grid, tg);
}

// ---- simd collectives ------------------------------------------------------
template <typename T, typename O = T>
inline O collective(T v, Resolver r, int arg = 0) {
  static_assert(sizeof(T) <= kSlot && sizeof(O) <= kSlot, "collective payload too large");
  static_assert(std::is_trivially_copyable<T>::value, "payload not trivially copyable");
  Fiber* f = R.cur;
  if (!f) fail("simd collective outside a kernel thread");
  std::memcpy(f->in, &v, sizeof(T));
  f->resolver = r;
  f->arg = arg;
  f->state = WAIT_SIMD;
  yield_to_scheduler();
  O out;
  std::memcpy((void*)&out, f->out, sizeof(O));
  return out;
}

template <typename T>
inline T load_in(Fiber* f) {
  T v;
  std::memcpy(&v, f->in, sizeof(T));
  return v;
}
template <typename T>
inline void store_out(Fiber* f, const T& v) {
  std::memcpy(f->out, &v, sizeof(T));
}
template <typename T>
inline T poison() {
  T v;
  std::memset((void*)&v, 0xFF, sizeof(T));
  return v;
}

enum Op { SUM, PRODUCT, MAX, MIN, AND, OR, XOR };
template <typename T, int OP>
inline T combine(T a, T b) {
  if constexpr (OP == SUM) return a + b;
  if constexpr (OP == PRODUCT) return a * b;
  if constexpr (OP == MAX) return a > b ? a : b;
  if constexpr (OP == MIN) return a < b ? a : b;
  if constexpr (OP == AND) return a & b;
  if constexpr (OP == OR) return a | b;
  if constexpr (OP == XOR) return a ^ b;
}

// Reduction over the active lanes, lane order.
template <typename T, int OP>
void resolve_reduce(Fiber** lanes, const bool* active) {
  bool first = true;
  T acc{};
  for (int l = 0; l < kSimdWidth; l++) {
    if (!active[l]) continue;
    T v = load_in<T>(lanes[l]);
    acc = first ? v : combine<T, OP>(acc, v);
    first = false;
  }
  for (int l = 0; l < kSimdWidth; l++)
    if (active[l]) store_out(lanes[l], acc);
}

template <typename T, int OP, bool INCLUSIVE>
void resolve_scan(Fiber** lanes, const bool* active) {
  bool first = true;
  T acc{};
  for (int l = 0; l < kSimdWidth; l++) {
    if (!active[l]) continue;
    T v = load_in<T>(lanes[l]);
    T incl = first ? v : combine<T, OP>(acc, v);
    // exclusive scan of the first active lane: identity (0 for sum, 1 for product)
    T excl = first ? T(OP == PRODUCT ? 1 : 0) : acc;
    store_out(lanes[l], INCLUSIVE ? incl : excl);
    acc = incl;
    first = false;
  }
}

// mode: 0 shuffle(idx), 1 down(delta), 2 up(delta), 3 xor(mask), 4 broadcast
template <typename T, int MODE>
void resolve_shuffle(Fiber** lanes, const bool* active) {
  for (int l = 0; l < kSimdWidth; l++) {
    if (!active[l]) continue;
    int a = lanes[l]->arg;
    int src;
    if constexpr (MODE == 0 || MODE == 4) src = a;
    else if constexpr (MODE == 1) src = l + a;
    else if constexpr (MODE == 2) src = l - a;
    else src = l ^ a;
    T v;
    if ((MODE == 1 && src >= kSimdWidth) || (MODE == 2 && src < 0)) {
      v = load_in<T>(lanes[l]);  // shuffle_up/down: edge lanes keep their value
    } else if (src < 0 || src >= kSimdWidth || !active[src]) {
      v = poison<T>();  // reading an inactive lane: undefined
    } else {
      v = load_in<T>(lanes[src]);
    }
    store_out(lanes[l], v);
  }
}

struct Vote {
  uint64_t votes, active;
};
inline void resolve_ballot(Fiber** lanes, const bool* active) {
  Vote v{0, 0};
  for (int l = 0; l < kSimdWidth; l++) {
    if (!active[l]) continue;
    v.active |= (uint64_t(1) << l);
    if (load_in<bool>(lanes[l])) v.votes |= (uint64_t(1) << l);
  }
  for (int l = 0; l < kSimdWidth; l++)
    if (active[l]) store_out(lanes[l], v);
}

template <typename T>
void resolve_broadcast_first(Fiber** lanes, const bool* active) {
  int first = -1;
  for (int l = 0; l < kSimdWidth; l++)
    if (active[l]) {
      first = l;
      break;
    }
  T v = load_in<T>(lanes[first]);
  for (int l = 0; l < kSimdWidth; l++)
    if (active[l]) store_out(lanes[l], v);
}

inline void resolve_nothing(Fiber**, const bool*) {}

// ---- guarded buffers ---------------------------------------------------------
// Each buffer sits right before (align_end) or right after (!align_end) an
// inaccessible page, so out-of-bounds accesses past the end (or before the
// start) fault.  The slack on the other side (up to a page) is filled with a
// canary that canary_intact() checks after the run, which catches
// out-of-bounds writes there.
constexpr unsigned char kCanary = 0x5A;
struct Guarded {
  char* page = nullptr;  // first accessible byte
  size_t span = 0;       // accessible bytes
  char* p = nullptr;     // the buffer
  size_t n = 0;
};
inline Guarded guarded_alloc(size_t n, bool align_end) {
  const size_t pg = size_t(sysconf(_SC_PAGESIZE));
  size_t body = ((n + pg - 1) / pg) * pg;
  if (body == 0) body = pg;
  size_t total = body + 2 * pg;
  char* base = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) fail("mmap failed");
  mprotect(base, pg, PROT_NONE);
  mprotect(base + pg + body, pg, PROT_NONE);
  Guarded g;
  g.page = base + pg;
  g.span = body;
  g.p = align_end ? base + pg + body - n : base + pg;
  g.n = n;
  std::memset(g.page, kCanary, body);
  return g;
}
inline bool canary_intact(const Guarded& g) {
  for (char* q = g.page; q < g.page + g.span; q++) {
    if (q == g.p) q += g.n;
    if (q < g.page + g.span && (unsigned char)*q != kCanary) return false;
  }
  return true;
}

inline void segv_handler(int sig, siginfo_t* si, void*) {
  char buf[256];
  int len;
  if (R.cur) {
    const ThreadAttrs& a = R.cur->a;
    len = std::snprintf(buf, sizeof(buf),
                        "EMULATOR ERROR: invalid memory access (signal %d) at %p "
                        "by thread_position_in_grid=%u,%u,%u\n",
                        sig, si->si_addr, a.thread_position_in_grid.x,
                        a.thread_position_in_grid.y, a.thread_position_in_grid.z);
  } else {
    len = std::snprintf(buf, sizeof(buf),
                        "EMULATOR ERROR: invalid memory access (signal %d) at %p\n",
                        sig, si->si_addr);
  }
  if (write(2, buf, size_t(len)) < 0) {
  }
  _exit(3);
}

inline void install_segv_handler() {
  static char altstack[1 << 16];
  stack_t ss;
  ss.ss_sp = altstack;
  ss.ss_size = sizeof(altstack);
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
}

}  // namespace emu

// ---------------------------------------------------------------------------
// The `metal` namespace
// ---------------------------------------------------------------------------
namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags) {
  emu::Fiber* f = emu::R.cur;
  if (!f) emu::fail("threadgroup_barrier outside a kernel thread");
  f->state = emu::WAIT_BAR;
  emu::yield_to_scheduler();
}
inline void simdgroup_barrier(mem_flags) {
  emu::collective<int>(0, emu::resolve_nothing);
}

template <typename T, typename U>
inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  std::memcpy((void*)&t, (const void*)&u, sizeof(T));
  return t;
}

// ---- math ----------------------------------------------------------------
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return as_type<half>(uint16_t(as_type<uint16_t>(x) & 0x7fffu)); }
inline bfloat abs(bfloat x) {
  bfloat r;
  r.bits = x.bits & 0x7fffu;
  return r;
}
inline int abs(int x) { return x < 0 ? -x : x; }
inline short abs(short x) { return x < 0 ? short(-x) : x; }
inline uint abs(uint x) { return x; }
inline float fabs(float x) { return __builtin_fabsf(x); }
template <typename T, int N>
inline vec<T, N> abs(vec<T, N> v) {
  for (int i = 0; i < N; i++) v[i] = abs(v[i]);
  return v;
}

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
template <typename T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
inline T select(T a, T b, bool c) { return c ? b : a; }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float log2(float x) { return __builtin_log2f(x); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float ceil(float x) { return __builtin_ceilf(x); }
inline float round(float x) { return __builtin_roundf(x); }
inline float trunc(float x) { return __builtin_truncf(x); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline float precise_divide(float a, float b) { return a / b; }

inline uint popcount(uint x) { return uint(__builtin_popcount(x)); }
inline int popcount(int x) { return __builtin_popcount(uint(x)); }
inline ulong popcount(ulong x) { return ulong(__builtin_popcountl(x)); }
inline uint clz(uint x) { return x ? uint(__builtin_clz(x)) : 32u; }
inline uint ctz(uint x) { return x ? uint(__builtin_ctz(x)) : 32u; }

template <typename T>
struct numeric_limits : std::numeric_limits<T> {};

// ---- simd-group functions -----------------------------------------------
struct simd_vote {
  typedef ulong vote_t;
  vote_t v, active_lanes;
  explicit simd_vote(vote_t x = 0, vote_t act = ~vote_t(0)) : v(x), active_lanes(act) {}
  explicit operator vote_t() const { return v; }
  bool all() const { return v == active_lanes; }
  bool any() const { return v != 0; }
};

template <typename T>
inline T simd_sum(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::SUM>); }
template <typename T>
inline T simd_product(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::PRODUCT>); }
template <typename T>
inline T simd_max(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::MAX>); }
template <typename T>
inline T simd_min(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::MIN>); }
template <typename T>
inline T simd_and(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::AND>); }
template <typename T>
inline T simd_or(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::OR>); }
template <typename T>
inline T simd_xor(T v) { return emu::collective(v, emu::resolve_reduce<T, emu::XOR>); }
template <typename T>
inline T simd_prefix_exclusive_sum(T v) {
  return emu::collective(v, emu::resolve_scan<T, emu::SUM, false>);
}
template <typename T>
inline T simd_prefix_inclusive_sum(T v) {
  return emu::collective(v, emu::resolve_scan<T, emu::SUM, true>);
}
template <typename T>
inline T simd_prefix_exclusive_product(T v) {
  return emu::collective(v, emu::resolve_scan<T, emu::PRODUCT, false>);
}
template <typename T>
inline T simd_prefix_inclusive_product(T v) {
  return emu::collective(v, emu::resolve_scan<T, emu::PRODUCT, true>);
}
template <typename T>
inline T simd_shuffle(T v, ushort lane) {
  return emu::collective(v, emu::resolve_shuffle<T, 0>, int(lane));
}
template <typename T>
inline T simd_shuffle_down(T v, ushort delta) {
  return emu::collective(v, emu::resolve_shuffle<T, 1>, int(delta));
}
template <typename T>
inline T simd_shuffle_up(T v, ushort delta) {
  return emu::collective(v, emu::resolve_shuffle<T, 2>, int(delta));
}
template <typename T>
inline T simd_shuffle_xor(T v, ushort mask) {
  return emu::collective(v, emu::resolve_shuffle<T, 3>, int(mask));
}
template <typename T>
inline T simd_broadcast(T v, ushort lane) {
  return emu::collective(v, emu::resolve_shuffle<T, 4>, int(lane));
}
template <typename T>
inline T simd_broadcast_first(T v) {
  return emu::collective(v, emu::resolve_broadcast_first<T>);
}
inline simd_vote simd_ballot(bool b) {
  emu::Vote v = emu::collective<bool, emu::Vote>(b, emu::resolve_ballot);
  return simd_vote(v.votes, v.active);
}
inline bool simd_any(bool b) { return emu::collective<int>(int(b), emu::resolve_reduce<int, emu::OR>) != 0; }
inline bool simd_all(bool b) { return emu::collective<int>(int(b), emu::resolve_reduce<int, emu::AND>) != 0; }

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------------------
// Address-space qualifiers and kernel-only keywords
// ---------------------------------------------------------------------------
#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline
