// Decoders of the stored soft labels of one row: the k values as the accumulation type (fp16 through the
// active SIMD variant, int8 dequantised) and the k class ids as int32 with their range check.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "cpu/simd_float.h"
#include "cpu/soft_label_kl_cpu.h"

namespace lpqld::slkl_cpu {

// The k stored values of a row as acc_t: int8 dequantised as v * scale + offset
// (in float, like the reference's float32 dequantisation), fp16 by the SIMD
// converter; one type switch per row, not per value.
template <typename acc_t>
void decode_values(const void* row, int64_t k, at::ScalarType dt, float scale, float offset, acc_t* out) {
  switch (dt) {
    case at::kHalf:
      if constexpr (std::is_same_v<acc_t, float>) {
        active_kernels().load(std::memory_order_relaxed)->half_to_float(static_cast<const uint16_t*>(row), k, out);
      } else {
        const at::Half* h = static_cast<const at::Half*>(row);
        for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(static_cast<float>(h[i]));
      }
      return;
    case at::kFloat: {
      const float* f = static_cast<const float*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(f[i]);
      return;
    }
    case at::kDouble: {
      const double* f = static_cast<const double*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(f[i]);
      return;
    }
    case at::kBFloat16: {
      const at::BFloat16* f = static_cast<const at::BFloat16*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(static_cast<float>(f[i]));
      return;
    }
    case at::kChar: {
      const int8_t* q = static_cast<const int8_t*>(row);
      if constexpr (std::is_same_v<acc_t, double>) {
        for (int64_t i = 0; i < k; ++i)
          out[i] = static_cast<double>(q[i]) * static_cast<double>(scale) + static_cast<double>(offset);
      } else {
        for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(q[i]) * scale + offset;
      }
      return;
    }
    default:
      for (int64_t i = 0; i < k; ++i) out[i] = acc_t(0);
  }
}

// The k class ids of a row as int32 (C < 2^31 is checked up front); false if one is
// outside [0, C), with the first such id in bad.
template <typename I>
LPQLD_INLINE bool decode_indices32_as(const I* __restrict row, int64_t k, int64_t C, int32_t* __restrict out,
                                      int64_t& bad) {
  uint64_t oob = 0;  // negative ids wrap to huge values as unsigned
  for (int64_t i = 0; i < k; ++i) {
    const int64_t v = static_cast<int64_t>(row[i]);
    oob |= static_cast<uint64_t>(static_cast<uint64_t>(v) >= static_cast<uint64_t>(C));
    out[i] = static_cast<int32_t>(v);
  }
  if (oob == 0) return true;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t v = static_cast<int64_t>(row[i]);
    if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(C)) {
      bad = v;
      break;
    }
  }
  return false;
}
LPQLD_INLINE bool decode_indices32(const void* row, int64_t k, at::ScalarType dt, int64_t C, int32_t* out,
                                   int64_t& bad) {
  switch (dt) {
    case at::kLong: return decode_indices32_as(static_cast<const int64_t*>(row), k, C, out, bad);
    case at::kInt: return decode_indices32_as(static_cast<const int32_t*>(row), k, C, out, bad);
    case at::kShort: return decode_indices32_as(static_cast<const int16_t*>(row), k, C, out, bad);
    case at::kByte: return decode_indices32_as(static_cast<const uint8_t*>(row), k, C, out, bad);
    default: bad = -1; return false;
  }
}

}  // namespace lpqld::slkl_cpu
