// Which at::vec implementation the CPU kernels compile against (the runtime choice of
// path is cpu_isa(), cpu_isa.h). Included first by every csrc/cpu source, before any ATen
// header.
//
// Outside ATen's own build no CPU_CAPABILITY macro is set, and at::vec::Vectorized falls
// back to its portable scalar loops. The baseline objects are built with -mavx2 -mfma
// (setup.py), so they take ATen's AVX2 implementation. (The *_avx512.cpp sources use raw
// intrinsics under a target pragma and no at::vec; were one to define RING_ATTN_AVX512
// first, it would get at::vec::AVX512, a distinct inline namespace, so no AVX-512 copy of
// a Vectorized function could replace the AVX2 one at link time.)
#pragma once

#if defined(RING_ATTN_AVX512)
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#else
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include "cpu/cpu_isa.h"
