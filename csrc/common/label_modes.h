// Codes of the soft-label modes: the `mode` argument of lpqld::soft_label_kl / soft_label_kl_fwd, shared by
// the schema's checks and the CPU and CUDA kernels. The table itself is lpqld_fast/ops/label_modes.py;
// tests/test_label_modes.py checks that this enum and the Triton kernel's constants match it.
#pragma once

namespace lpqld {

// Each enumerator's comment is the mode's name in the Python table.
enum LabelMode : int {
  kDense = 0,  // dense
  kMR = 1,     // mr
  kMRS = 2,    // mrs
  kMS = 3,     // ms
  kTopK = 4,   // topk_norenorm
};
inline constexpr int kNumLabelModes = 5;
inline constexpr const char* kLabelModeNames = "dense, mr, mrs, ms, topk_norenorm";  // in code order

}  // namespace lpqld
