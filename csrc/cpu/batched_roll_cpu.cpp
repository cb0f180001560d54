// CPU kernel of lpqld::batched_roll (schema and autograd in csrc/batched_roll.cpp).
//
// A roll moves whole rows: output row y of plane (n, c) is source row (y - dy) mod H, rotated by dx, so
// each output row is two memcpy's of bytes (dtype-blind). Replaces one torch.gather with an expanded
// int64 index (an index load per element, scalar). Rows run in parallel; the output is contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Python's a % m for m > 0 (never negative), without overflow for any int64 a.
inline int64_t floor_mod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

at::Tensor batched_roll_cpu(const at::Tensor& x_in, const at::Tensor& shifts_in) {
  TORCH_CHECK(x_in.dim() == 4, "batched_roll: x must be [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "batched_roll (CPU): x must be a CPU tensor");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(shifts_in.dim() == 2 && shifts_in.size(0) == N && shifts_in.size(1) == 2,
              "batched_roll: shifts must be [N, 2] = [", N, ", 2] (dy, dx per sample), got ", shifts_in.sizes());
  TORCH_CHECK(shifts_in.device().is_cpu(), "batched_roll (CPU): shifts must be a CPU tensor");
  TORCH_CHECK(shifts_in.scalar_type() == at::kLong, "batched_roll: shifts must be int64, got ",
              shifts_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({N, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  const at::Tensor shifts = shifts_in.contiguous();
  const int64_t* sh = shifts.const_data_ptr<int64_t>();
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t row_bytes = W * esize;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t rows = N * C * H;
  // ~32 KiB of output per task: small planes still give both threads work, big ones no per-row overhead.
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / H, y = r - plane * H, n = plane / C;
      const int64_t dy = floor_mod(sh[2 * n], H), dx = floor_mod(sh[2 * n + 1], W);
      const int64_t sy = y >= dy ? y - dy : y - dy + H;
      const char* s = src + (plane * H + sy) * row_bytes;
      char* d = dst + r * row_bytes;
      // out[x'] = s[(x' - dx) mod W]: the last dx source columns first, then the others.
      const int64_t tail = dx * esize;
      std::memcpy(d, s + row_bytes - tail, static_cast<size_t>(tail));
      std::memcpy(d + tail, s, static_cast<size_t>(row_bytes - tail));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lpqld, CPU, m) { m.impl("batched_roll", &batched_roll_cpu); }
