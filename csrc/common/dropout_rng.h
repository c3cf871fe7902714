// Counter-based dropout RNG shared by the CPU and CUDA kernels.
//
// Why counter-based: the ring computes the (query block, key block) pairs of one
// attention matrix on different ranks, in different orders and tile shapes. A mask that
// is a pure function of (seed, batch, head, global query position, global key position)
// is identical however the matrix is cut, so a sharded run drops exactly the elements a
// single-device run drops, and backward regenerates the mask instead of storing it.
//
// Generator: Philox-4x32-10 (Salmon et al., SC'11, the generator behind cuRAND and
// torch's CUDA RNG). One call yields four 32-bit words; key position kpos uses word
// (kpos & 3) of the call whose counter holds kpos >> 2, so four neighbouring keys share
// one call. Counter = {kpos >> 2, qpos, head, batch}, key = the 64-bit seed. Positions are
// taken modulo 2^32 (masks repeat only beyond 4G tokens).
//
// An element is kept iff word >= threshold, threshold = floor(p * 2^32): probability of
// a drop is p to within 2^-32. Integer-only, so CPU and CUDA agree bit for bit.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RA_HOST_DEVICE inline
#endif

namespace ring_attn {

struct Philox4 {
  uint32_t w[4];
};

RA_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32 with 10 rounds; constants from Random123.
RA_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c0, hi0, lo0);
    mulhilo32(M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0; k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words for keys (kpos & ~3) .. (kpos | 3) of one query row.
RA_HOST_DEVICE Philox4 dropout_words(uint64_t seed, uint32_t batch, uint32_t head,
                                     int64_t qpos, int64_t kpos) {
  return philox4x32_10(static_cast<uint32_t>(static_cast<uint64_t>(kpos) >> 2),
                       static_cast<uint32_t>(qpos), head, batch,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// True when element (qpos, kpos) of (batch, head) survives dropout.
RA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t batch, uint32_t head, int64_t qpos,
                                 int64_t kpos, uint32_t threshold) {
  const Philox4 r = dropout_words(seed, batch, head, qpos, kpos);
  return r.w[static_cast<uint64_t>(kpos) & 3u] >= threshold;
}

// floor(p * 2^32) for p in [0, 1); computed on the host once per call.
inline uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 0u;
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

}  // namespace ring_attn
