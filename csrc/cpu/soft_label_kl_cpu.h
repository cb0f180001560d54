// Types shared by the files of the soft-label KL CPU kernel: the problem description, the data-error
// bits, the per-ISA kernel table and one top-k row's state.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "common/label_modes.h"

namespace lpqld::slkl_cpu {

// Data problems found by the kernel (bits), reported after the parallel region
// in a fixed order, whatever the thread that saw them first.
enum DataError : uint32_t {
  kErrIndex = 1,
  kErrDuplicate = 2,
  kErrValues = 4,
  kErrScale = 8,
  kErrOffset = 16,
  kErrFill = 32
};

struct Problem {
  int64_t B, C, k, mode;
  double T, t_s, grad_scale;
  const void* values;
  int64_t values_row_bytes;
  at::ScalarType vdt;
  const void* indices;
  int64_t indices_row_bytes;
  at::ScalarType idt;
  const float* fill;
  const float* scale;
  const float* offset;
};

// The float kernels compiled for three instruction sets, chosen at load time
// (soft_label_kl_variants.cpp). The top-k modes run a whole row inside one variant
// (topk_row), so that the k loops and the per-row steps are compiled for its vector
// width and nothing is called through a pointer per step.
template <typename acc_t>
struct TopkRow;
struct FloatKernels {
  const char* isa;
  void (*stats)(const float*, int64_t, float, float&, float&);
  double (*dense)(const float*, const float*, int64_t, float, float, float, float, float, float, float, float*, bool&);
  void (*half_to_float)(const uint16_t*, int64_t, float*);
  uint32_t (*topk_row)(TopkRow<float>&);
};
std::atomic<const FloatKernels*>& active_kernels();

// Per-thread scratch of the top-k rows; the k-long arrays are padded to kPadK lanes,
// the pads hold zeros so that the double-vector loops over them add nothing.
constexpr int64_t kPadK = 16;
template <typename acc_t>
struct TopkScratch {
  std::vector<int32_t> ik;
  std::vector<acc_t> xk, gk, bm, fa;
  std::vector<double> pk, lpk, zk, tk, bs, bd, fd;
  TopkScratch(int64_t k, int64_t nblk) {
    const size_t kp = static_cast<size_t>((k + kPadK - 1) / kPadK * kPadK);
    ik.assign(kp, 0);
    xk.assign(kp, acc_t(0));
    gk.assign(kp, acc_t(0));
    pk.assign(kp, 0.0);
    lpk.assign(kp, 0.0);
    zk.assign(kp, 0.0);
    tk.assign(kp, 0.0);
    bm.assign(static_cast<size_t>(nblk), acc_t(0));
    fa.assign(static_cast<size_t>(nblk), acc_t(0));
    bs.assign(static_cast<size_t>(nblk), 0.0);
    bd.assign(static_cast<size_t>(nblk), 0.0);
    fd.assign(static_cast<size_t>(nblk), 0.0);
  }
};

// One row of a top-k mode: its inputs, its scratch, and the results (loss, or the first
// out-of-range class id).
template <typename acc_t>
struct TopkRow {
  const Problem* P;
  int64_t b;
  const acc_t* z;
  acc_t* g;
  float row_scale, row_offset;
  TopkScratch<acc_t>* S;
  double loss;
  int64_t bad_index;
};

}  // namespace lpqld::slkl_cpu
