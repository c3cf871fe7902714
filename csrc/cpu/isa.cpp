// cpu_isa(): the one decision of which instruction-set path the CPU kernels take
// (cpu_isa.h).
#include "cpu/isa.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <cpuid.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace ring_attn::cpu {
namespace {

constexpr const char* kVar = "RING_ATTN_CPU_ISA";

// The highest path the hardware and torch allow.
Isa machine_isa() {
  // torch's own runtime choice: AVX512 only when cpuinfo reports avx512f/bw/vl/dq with OS
  // support for the zmm state, and ATEN_CPU_CAPABILITY can lower it.
  if (at::get_cpu_capability() != "AVX512") return Isa::kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
}

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

Isa decide() {
  const Isa top = machine_isa();
  const char* raw = std::getenv(kVar);
  std::string want = raw ? raw : "";
  std::transform(want.begin(), want.end(), want.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (want.empty() || want == "auto") return top;
  for (int i = 0; i <= static_cast<int>(Isa::kAvx512Bf16); ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (want != isa_name(isa)) continue;
    TORCH_CHECK_VALUE(isa <= top, kVar, "=", raw, " is not supported on this machine, which ",
                      "supports: ", joined(supported_isas()), " (from cpuid and torch's CPU ",
                      "capability ", at::get_cpu_capability(), ", which ATEN_CPU_CAPABILITY ",
                      "can lower)");
    return isa;
  }
  TORCH_CHECK_VALUE(false, kVar, "=", raw, " is not a CPU kernel path; expected one of auto, ",
                    "avx2, avx512, avx512_bf16 (this machine supports: ",
                    joined(supported_isas()), ")",
                    want == "amx" ? "; AMX has no kernel, AMX CPUs run avx512_bf16" : "");
  return top;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "?";
}

Isa cpu_isa() {
  // A throwing initialiser leaves the static uninitialised, so every call reports the
  // same error rather than a later one silently picking a path.
  static const Isa isa = decide();
  return isa;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(machine_isa()); ++i) out.push_back(isa_name(static_cast<Isa>(i)));
  return out;
}

bool cpu_has_amx() {
  // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16 (Intel SDM vol. 2A, table 3-8).
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22) & 1u;
}

}  // namespace ring_attn::cpu
