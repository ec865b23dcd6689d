// A small persistent thread pool for the decode-path kernels, used instead of at::parallel_for.
//
// Why: at::parallel_for is an OpenMP parallel region, and libgomp starts one cheaply only from the process's
// main thread. From any other thread (the server's engine loop runs in one) each region cost ~45 us more here
// (measured on a 2-core AMD EPYC: a 1536x576 q4_1 matvec took 30 us from the main thread, 75 us from another),
// and a decode step of SmolLM2 opens ~150 of them. Here the workers stay alive, spin briefly between regions
// (a step's kernels come microseconds apart), then sleep on a condition variable.
//
// One region at a time: a caller that finds the pool busy (another thread's kernel, or a kernel called from
// inside a pool task) runs its range alone instead of waiting.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

thread_local bool t_in_pool_task = false;

// How long an idle worker spins (in pause instructions) before it sleeps. Long (~0.3 ms on the 2-core EPYC)
// in decode-only steps: the C++ layer loop's kernels come back to back and steps follow each other closely, and
// waking a sleeping worker costs more than a decode step's matvec. Short in steps with prefill: between kernels
// called from Python, ATen's own OpenMP threads run (attention, norms, activations) and a spinning worker takes
// their core (measured in one process, the two alternated: a 512-token prefill of SmolLM2 took 383-401 ms with
// the long spin everywhere, 300-304 ms switched this way; single-stream decode 149-150 and 170-172 tok/s).
constexpr int kLongSpin = 20000, kShortSpin = 2000;
std::atomic<int> g_spin{kShortSpin};

// Lives for the whole process (see pool()): its workers are never stopped.
class Pool {
 public:
  // fn(begin, end) over [0, n) in `parts` contiguous shares, the caller taking share 0.
  void run(int64_t n, int parts, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || t_in_pool_task || parts <= 1) {
      fn(0, n);
      return;
    }
    grow(parts - 1);
    job_ = &fn;
    n_ = n;
    parts_ = parts;
    // Every worker takes part in every region (those past `parts` with nothing to do), so none can lag a
    // region behind and mistake the next region's job for its own.
    remaining_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    share(0);
    while (remaining_.load(std::memory_order_acquire) != 0) _mm_pause();
    job_ = nullptr;
  }

 private:
  void share(int part) {
    const int64_t chunk = (n_ + parts_ - 1) / parts_;
    const int64_t b = std::min<int64_t>(n_, part * chunk), e = std::min<int64_t>(n_, b + chunk);
    if (b < e) {
      t_in_pool_task = true;
      (*job_)(b, e);
      t_in_pool_task = false;
    }
  }

  void grow(int workers) {
    while (static_cast<int>(workers_.size()) < workers) {
      const int id = static_cast<int>(workers_.size()) + 1;
      // The generation before this region's: a worker that starts late still takes part in it.
      const uint64_t before = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, id, before] { loop(id, before); });
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      // Spin a little (the next kernel of a step comes soon), then sleep.
      uint64_t g = seen;
      const int spin = g_spin.load(std::memory_order_relaxed);
      for (int i = 0; i < spin && (g = generation_.load(std::memory_order_acquire)) == seen; ++i) _mm_pause();
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return (g = generation_.load(std::memory_order_acquire)) != seen; });
      }
      seen = g;
      if (id < parts_) share(id);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 1;
};

Pool& pool() {
  static Pool* p = new Pool();   // never destroyed: its workers would outlive the static destruction order
  return *p;
}

}  // namespace

void tokenyard_pool_spin_long(bool on) { g_spin.store(on ? kLongSpin : kShortSpin, std::memory_order_relaxed); }

// [begin, end) split over at::get_num_threads() threads in contiguous shares of at least `grain` items.
void tokenyard_parallel_for(int64_t begin, int64_t end, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t by_grain = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int parts = static_cast<int>(std::min<int64_t>(at::get_num_threads(), by_grain));
  pool().run(n, parts, [&](int64_t b, int64_t e) { fn(begin + b, begin + e); });
}
