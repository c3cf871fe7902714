// The CPU instruction-set path of the kernels, decided once per process (isa.cpp).
// Free of torch headers, so csrc/ring_attn.cpp can expose it as torch.ops.ring_attn._cpu_isa.
//
// Runtime paths, each a superset of the one before:
//   avx2         AVX2 + FMA + F16C: the build's baseline (setup.py), every x86-64 server
//                of the last decade; float32 products on gemm_avx2.cpp, row operations on
//                at::vec (AVX2), bfloat16 through float32 tiles.
//   avx512       AVX-512 F/BW/VL/DQ: gemm_avx512.cpp and rowops_avx512.cpp.
//   avx512_bf16  + AVX512-BF16: bfloat16 products on vdpbf16ps (gemm_bf16_avx512.cpp).
// cpu_isa() takes the highest path that both the CPU (cpuid) and torch (at::
// get_cpu_capability(), which checks OS support and honours ATEN_CPU_CAPABILITY) allow,
// lowered by RING_ATTN_CPU_ISA=avx2|avx512|avx512_bf16 so every path can be tested and
// benchmarked on one machine. A value that is unknown or above what the machine supports
// raises ValueError naming the variable, the value and the supported values (at the first
// CPU attention call). AMX (bf16 tiles, Sapphire Rapids and later) is detected and
// reported (cpu_has_amx) but has no kernel: such CPUs run avx512_bf16.
#pragma once

#include <string>
#include <vector>

namespace ring_attn::cpu {

enum class Isa : int { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// The path the kernels take (decided at the first call; throws on a bad RING_ATTN_CPU_ISA).
Isa cpu_isa();
const char* isa_name(Isa isa);
// The paths this machine can run, lowest first (what RING_ATTN_CPU_ISA may name).
std::vector<std::string> supported_isas();
// AMX-BF16 reported by cpuid (no kernel uses it).
bool cpu_has_amx();

}  // namespace ring_attn::cpu
