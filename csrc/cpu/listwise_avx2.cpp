// The CPU record loops compiled for AVX2 (-mavx2, set in CMakeLists.txt): 8 float lanes.
// Everything inlined here lives in its own namespace (EMDPO_ISA_NS), so none of it can be
// linked into code that runs on machines without AVX2.
#define EMDPO_ISA_NS avx2
#include "cpu/listwise_isa.h"
#include "cpu/listwise_records.h"

EMDPO_DEFINE_RECORD_LOOPS(avx2, 8, 4)
