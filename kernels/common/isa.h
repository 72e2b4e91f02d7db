// The instruction set a translation unit is compiled for, and the vector
// width that follows from it. setup.py builds every kernel twice: for a
// generic x86-64 (mmssm._ext, SSE2: 16-byte vectors) and with -mavx2 -mfma
// (mmssm._ext_avx2, defines MMSSM_ISA_AVX2: 32-byte vectors); mmssm/ops/ext.py
// loads one of them at run time. Everything in namespace mmssm sits in an
// inline namespace named after the build, so that the inline functions and
// templates of the two builds never share a symbol (no ODR mixing when both
// are loaded, as the tests do).
#pragma once

#if defined(MMSSM_ISA_AVX2)
#define MMSSM_ISA isa_avx2
#define MMSSM_VEC_BYTES 32
#else
#define MMSSM_ISA isa_generic
#define MMSSM_VEC_BYTES 16
#endif
