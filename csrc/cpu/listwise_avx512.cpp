// The CPU record loops compiled for AVX512 (-mavx512f, set in CMakeLists.txt): 16 float lanes.
// Everything inlined here lives in its own namespace (EMDPO_ISA_NS), so none of it can be
// linked into code that runs on machines without AVX512.
#define EMDPO_ISA_NS avx512
// GCC 12 warns about its own AVX-512 min/max intrinsics (_mm512_undefined_ps, a known false
// positive of -Wmaybe-uninitialized).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/listwise_isa.h"
#include "cpu/listwise_records.h"

EMDPO_DEFINE_RECORD_LOOPS(avx512, 16, 8)
