#include "cpu/listwise_cpu.h"

namespace emdpo {
namespace cpu {

// offsets must start at 0, end at `total`, and grow by at least `min_gap` each step
// (2 for record offsets: every list holds two responses or more; 0 for annotator offsets,
// which may describe annotators with no records). Returns the first index that breaks this.
int64_t first_bad_offset(const int64_t* offsets, int64_t n, int64_t total, int64_t min_gap) {
  if (n == 0) return 0;
  if (offsets[0] != 0) return 0;
  for (int64_t i = 1; i < n; ++i) {
    // offsets[i-1] is in [0, total] here and offsets[i] may be any int64: the difference is
    // taken only once offsets[i] is known to lie in [offsets[i-1], total], where it cannot
    // overflow (nor can offsets[i-1] + min_gap, which is never formed).
    if (offsets[i] > total || offsets[i] < offsets[i - 1] ||
        offsets[i] - offsets[i - 1] < min_gap)
      return i;
  }
  if (offsets[n - 1] != total) return n - 1;
  return -1;
}

int64_t first_bad_n_ranked(const int64_t* n_ranked, const int64_t* offsets, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const int64_t m = offsets[i + 1] - offsets[i];
    if (n_ranked[i] < 1 || n_ranked[i] > m - 1) return i;
  }
  return -1;
}

}  // namespace cpu
}  // namespace emdpo
