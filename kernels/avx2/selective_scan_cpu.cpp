// ../selective_scan/selective_scan_cpu.cpp compiled for AVX2 + FMA (mmssm._ext_avx2,
// setup.py), as its own source file so that its object file is not the
// generic build's.
#define MMSSM_ISA_AVX2 1
#include "../selective_scan/selective_scan_cpu.cpp"
