// Per-instruction-set entry points of the CPU record loops (cpu/listwise_records.h), one
// overload per element type. Each returns the first record with non-finite rewards, or
// INT64_MAX.
#pragma once
#include <cstdint>

namespace emdpo {
namespace cpu {

#define EMDPO_DECLARE_RECORD_LOOP(ISA, T)                                                     \
  int64_t records_loglik_##ISA(const T* p, int64_t M, int64_t K, const T* ref,                \
                                const int64_t* o, const int64_t* nr, int64_t lo, int64_t hi,  \
                                T beta, T* out, int64_t stride);                              \
  int64_t records_loglik_grad_##ISA(const T* p, const T* ref, const int64_t* o,               \
                                     const int64_t* nr, const T* w, T scale, int64_t lo,      \
                                     int64_t hi, T beta, T* g, T* ll);

EMDPO_DECLARE_RECORD_LOOP(baseline, float)
EMDPO_DECLARE_RECORD_LOOP(baseline, double)
#if defined(EMDPO_X86_DISPATCH)
EMDPO_DECLARE_RECORD_LOOP(avx2, float)
EMDPO_DECLARE_RECORD_LOOP(avx2, double)
EMDPO_DECLARE_RECORD_LOOP(avx512, float)
EMDPO_DECLARE_RECORD_LOOP(avx512, double)
#endif
#undef EMDPO_DECLARE_RECORD_LOOP

}  // namespace cpu
}  // namespace emdpo
