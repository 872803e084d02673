#include "cpu/threads.h"

#include <atomic>

#ifdef EMDPO_HAVE_OPENMP
#include <omp.h>
#include <pthread.h>
#endif

namespace emdpo {
namespace cpu {
namespace {

std::atomic<bool> g_threads_started{false};  // this process has run a parallel region
std::atomic<bool> g_forked{false};           // ... or descends by fork() from one that had

#ifdef EMDPO_HAVE_OPENMP
void on_fork_child() {
  if (g_threads_started.load(std::memory_order_relaxed))
    g_forked.store(true, std::memory_order_relaxed);
}

// Registered when the module loads; the handler runs in every child of fork().
const int kAtforkRegistered = pthread_atfork(nullptr, nullptr, &on_fork_child);
#endif

}  // namespace

bool use_threads(bool wanted) {
#ifdef EMDPO_HAVE_OPENMP
  if (!wanted || g_forked.load(std::memory_order_relaxed)) return false;
  g_threads_started.store(true, std::memory_order_relaxed);
  return true;
#else
  (void)wanted;
  return false;
#endif
}

bool forked_after_threads() { return g_forked.load(std::memory_order_relaxed); }

int num_threads() {
#ifdef EMDPO_HAVE_OPENMP
  return forked_after_threads() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace emdpo
