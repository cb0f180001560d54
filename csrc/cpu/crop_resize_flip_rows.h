// The row kernels of the crop_resize_flip CPU forward, shared between crop_resize_flip_cpu.cpp (which
// runs them) and crop_resize_flip_rows.cpp (their per-ISA variants and the selection among them).
#pragma once

#include <cstdint>
#include <atomic>

namespace lpqld::crf_cpu {

// ----------------------------------------------------------------------------- float rows, SIMD
// The forward of float32/uint8 input with unit column stride (every replay and
// recover call) runs on three row kernels: uint8 -> float conversion of the
// crop window, the horizontal pass as two gathers from that row, and the
// vertical blend. The portable build leaves the gathers scalar, so each kernel
// is also compiled for AVX2 and AVX-512 and picked at load time. The vector
// code multiplies and adds separately (no FMA), exactly like the scalar code
// built with portable flags, so every variant returns the same bits.

// The column plan of one sample for the horizontal pass: absolute tap indices
// (i0, i1), weights, and for the AVX-512 kernels a window per 16 outputs.
struct ColumnPlan {
  const int32_t* i0;
  const int32_t* i1;
  const float* w0;
  const float* w1;
  const int32_t* lo;    // [ow / 16] first source column of each 16-output window; -1: none (gather)
  const int32_t* span;  // [ow / 16] columns the window reads (<= 32)
  const int32_t* r0;    // [ow] i0 - lo of its window (permute indices)
  const int32_t* r1;
};

struct RowKernels {
  const char* isa;
  bool windows;  // whether hpass uses ColumnPlan::lo / r0 / r1 (built only then)
  void (*u8_to_float)(const uint8_t*, int64_t, float*);
  void (*hpass)(const float*, const ColumnPlan&, int64_t, float*);
  // uint8 rows straight into the horizontal pass (no converted row); null: u8_to_float + hpass.
  void (*hpass_u8)(const uint8_t*, const ColumnPlan&, int64_t, float*);
  void (*vblend)(const float*, const float*, float, float, int64_t, float*);
};

// The active variant: the best the CPU supports, or the one _crop_resize_flip_cpu_isa selected.
std::atomic<const RowKernels*>& active_row_kernels();

}  // namespace lpqld::crf_cpu
