// When the CPU kernels may open an OpenMP parallel region.
//
// GNU OpenMP (libgomp) keeps a pool of worker threads once a parallel region has run. fork()
// copies only the calling thread, so in the child the pool describes threads that do not
// exist and the next parallel region waits for them forever. The kernels therefore run
// without a parallel region in a child forked after the parent's worker threads started:
// the same pieces summed in the same order, so the results are bitwise those of the parent,
// on one thread. A child forked before any parallel region ran still uses threads.
#pragma once

namespace emdpo {
namespace cpu {

// Whether a kernel that would like to run in parallel (`wanted`) may do so. Call it right
// before the region: a true answer records that worker threads now exist.
bool use_threads(bool wanted);

// True in a process forked after OpenMP worker threads had started (kernels run serially).
bool forked_after_threads();

// The threads a kernel's parallel region uses: 1 in such a forked child.
int num_threads();

}  // namespace cpu
}  // namespace emdpo
