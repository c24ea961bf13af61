// exp(x) for x <= 0, shared by the C++ kernels in this folder (attention_cpu.cc, onednn_cpu.cc;
// every use: scores minus their row max or log-sum-exp), by
// 2^(x log2 e) = 2^i * 2^f, |f| <= 1/2, with a degree-5 minimax polynomial for 2^f (relative
// error 8e-8, 2.3e-7 evaluated in float32; the rounding of x log2 e dominates: relative error
// < 2e-6 in all, tests/test_attention.py compares with jax's exp-based softmax). Below -87 it
// returns ~1e-38 instead of 0, which no softmax row notices (its maximum term is 1).
// Scalar code that gcc vectorizes (attention_cpu.cc adds ExpVec for whole vectors): glibc's vector expf needs
// -ffast-math, whose crtfastmath would set flush-to-zero for the whole process.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fwi_cpu {

constexpr float kExpC[6] = {1.000000071421379e+00f, 6.931469674306392e-01f, 2.402212080642298e-01f,
                            5.550713264911371e-02f, 9.675485466422372e-03f, 1.327630783339667e-03f};
inline float Exp(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;
  const float i = std::nearbyint(t);
  const float f = t - i;
  float p = kExpC[5];
  for (int c = 4; c >= 0; --c) p = p * f + kExpC[c];
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(i) * (1 << 23);  // multiply by 2^i through the exponent field
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

}  // namespace fwi_cpu
