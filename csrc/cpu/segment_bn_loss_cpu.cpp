// CPU kernels of lpqld::segment_bn_loss_fwd / _bwd (schemas in csrc/segment_bn_loss.cpp).
//
// Forward, one pass over x from memory, no per-row buffer:
//   tasks (segment, 16 channels) in parallel; each walks the segment's rows
//   (counting sort by segment id) and reduces rows (n, c0..c0+15) to their exact
//   mean and M2 with the row-moment kernels classwise_moments uses
//   (row_moments.h: per-ISA, a two-pass around each L1-resident chunk's mean,
//   short rows a vector of rows at a time), then merges them into the float64
//   state of (s, c) with Chan's formula, so large means do not cancel. Then per
//   segment the variance and the loss.
// The backward is in segment_bn_loss_bwd_cpu.cpp, the per-ISA loops in segment_bn_kernels.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/row_moments.h"
#include "cpu/segment_bn_loss_cpu.h"

namespace lpqld::sbl_cpu {

// Channels-last forward: per-(sample, channel) exact mean / M2 of the [L, nc] tile p (row stride ldc), the
// channels in SIMD lanes. Sums of x - shift[c] in float (double for float64 x) over at most kNlcFold rows,
// then folded into double; the first sweep shifts by `guess` (else the tile's first row) and a second sweep
// by the first sweep's mean runs when that shift was far from the mean of any channel.
constexpr int64_t kNlcFold = 16;  // rows per float partial sum

template <typename scalar_t>
void nlc_tile_moments(const scalar_t* p, int64_t ldc, int64_t L, int64_t nc, const double* guess, double* mean,
                      double* m2) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t shift[kNlcBlock];
  double s1[kNlcBlock], s2[kNlcBlock];
  for (int64_t c = 0; c < nc; ++c) shift[c] = guess ? static_cast<acc_t>(guess[c]) : static_cast<acc_t>(p[c]);
  const double inv_l = 1.0 / static_cast<double>(L);
  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int64_t c = 0; c < nc; ++c) s1[c] = s2[c] = 0.0;
    bool summed = false;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (nc == 64) {
        nlc_moments64_f32(p, ldc, L, kNlcFold, shift, s1, s2);
        summed = true;
      }
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (nc == 64) {
        nlc_moments64_bf16(reinterpret_cast<const uint16_t*>(p), ldc, L, kNlcFold, shift, s1, s2);
        summed = true;
      }
    }
    for (int64_t l0 = 0; !summed && l0 < L; l0 += kNlcFold) {
      acc_t a1[kNlcBlock] = {}, a2[kNlcBlock] = {};
      const int64_t l1 = std::min(L, l0 + kNlcFold);
      if constexpr (std::is_same_v<scalar_t, float>) {
        nlc_sums_f32(p + l0 * ldc, ldc, l1 - l0, nc, shift, a1, a2);
      } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        nlc_sums_bf16(reinterpret_cast<const uint16_t*>(p) + l0 * ldc, ldc, l1 - l0, nc, shift, a1, a2);
      } else {
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* row = p + l * ldc;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        s1[c] += static_cast<double>(a1[c]);
        s2[c] += static_cast<double>(a2[c]);
      }
    }
    bool again = false;
    for (int64_t c = 0; c < nc; ++c) {
      const double d1 = s1[c] * inv_l;
      mean[c] = static_cast<double>(shift[c]) + d1;
      m2[c] = std::max(s2[c] - s1[c] * d1, 0.0);
      again = again || d1 * d1 > 2.0 * m2[c] * inv_l;  // shift beyond ~1.5 std of the mean
    }
    if (sweep == 1 || !again) break;
    for (int64_t c = 0; c < nc; ++c) shift[c] = static_cast<acc_t>(mean[c]);
  }
}

template void nlc_tile_moments<float>(const float*, int64_t, int64_t, int64_t, const double*, double*, double*);
template void nlc_tile_moments<double>(const double*, int64_t, int64_t, int64_t, const double*, double*, double*);
template void nlc_tile_moments<at::Half>(const at::Half*, int64_t, int64_t, int64_t, const double*, double*,
                                         double*);
template void nlc_tile_moments<at::BFloat16>(const at::BFloat16*, int64_t, int64_t, int64_t, const double*, double*,
                                             double*);

Layout check_common(const Tensor& x, const Tensor& seg, const Tensor& tm, const Tensor& tv) {
  TORCH_CHECK(x.dim() == 3, "segment_bn_loss: x must be [N, C, L], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || is_channels_last_ncl(x),
              "segment_bn_loss: x must be contiguous [N, C, L] or channels-last (strides (C*L, 1, C))");
  return check_segment_bn_loss_args(x, seg, tm, tv);
}

// Counting sort of the rows by segment: offsets [S + 1], order [N]; checks the range.
void sort_by_segment(const int64_t* seg, int64_t N, int64_t S, std::vector<int64_t>& offsets,
                     std::vector<int64_t>& order) {
  offsets.assign(S + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = seg[n];
    TORCH_CHECK_INDEX(s >= 0 && s < S, "segment_bn_loss: segment_ids holds ", s, " outside [0, ", S, ")");
    ++offsets[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) offsets[s + 1] += offsets[s];
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  order.resize(N);
  for (int64_t n = 0; n < N; ++n) order[fill[seg[n]]++] = n;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> segment_bn_loss_fwd_cpu(const Tensor& x, const Tensor& segment_ids,
                                                                    const Tensor& target_mean,
                                                                    const Tensor& target_var) {
  const Layout d = check_common(x, segment_ids, target_mean, target_var);
  const int64_t N = d.N, C = d.C, L = d.L, S = d.S;
  const auto f64 = x.options().dtype(at::kDouble);
  Tensor loss = at::zeros({S}, f64);
  Tensor mean = at::zeros({S, C}, f64);
  Tensor var = at::zeros({S, C}, f64);
  Tensor count = at::zeros({S}, x.options().dtype(at::kLong));

  std::vector<int64_t> offsets, order;
  sort_by_segment(segment_ids.data_ptr<int64_t>(), N, S, offsets, order);
  int64_t* cnt = count.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) cnt[s] = offsets[s + 1] - offsets[s];
  if (N == 0) return {loss, mean, var, count};

  // 1. moments: tasks = (segment, block of kChannelBlock channels); a task walks the
  //    segment's rows, reduces each row (n, c) to (mean, M2) while it is in cache and
  //    merges it into the running float64 state of (s, c) with Chan's formula (all
  //    rows hold L elements, so row i of the segment merges with weight 1 / (i + 1)).
  //    No per-row buffer: x is read once, the state is the output.
  double* pm = mean.data_ptr<double>();
  double* pv = var.data_ptr<double>();
  const int64_t n_cb = (C + kChannelBlock - 1) / kChannelBlock;
  const double dl = static_cast<double>(L);
  const int64_t work_per_task = std::max<int64_t>(1, (N / S) * std::min(C, kChannelBlock) * L);
  const bool nlc = is_channels_last_ncl(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_bn_loss_fwd_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    if (nlc) {
      const int64_t n_blk = (C + kNlcBlock - 1) / kNlcBlock;
      const int64_t work = std::max<int64_t>(1, (N / S) * std::min(C, kNlcBlock) * L);
      at::parallel_for(0, S * n_blk, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
        double rm[kNlcBlock], r2[kNlcBlock];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t s = t / n_blk;
          const int64_t c0 = (t % n_blk) * kNlcBlock, nc = std::min(C, c0 + kNlcBlock) - c0;
          double* ms = pm + s * C + c0;
          double* vs = pv + s * C + c0;  // M2 until finalised below
          for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
            const double i = static_cast<double>(j - offsets[s]);
            const double w_new = 1.0 / (i + 1.0), w_cross = dl * i * w_new;
            // Shifted by the segment's running mean once there is one: closer to this sample's mean than its
            // first row usually is, which saves the second sweep.
            nlc_tile_moments<scalar_t>(px + order[j] * C * L + c0, C, L, nc, j > offsets[s] ? ms : nullptr, rm, r2);
            for (int64_t c = 0; c < nc; ++c) {  // Chan's merge, as below
              const double delta = rm[c] - ms[c];
              ms[c] += delta * w_new;
              vs[c] += r2[c] + delta * delta * w_cross;
            }
          }
        }
      });
      return;
    }
    at::parallel_for(0, S * n_cb, std::max<int64_t>(1, 32768 / work_per_task), [&](int64_t begin, int64_t end) {
      double rm[kChannelBlock], r2[kChannelBlock];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / n_cb;
        const int64_t c0 = (t % n_cb) * kChannelBlock, nc = std::min(C, c0 + kChannelBlock) - c0;
        double* ms = pm + s * C + c0;
        double* vs = pv + s * C + c0;  // M2 until finalised below
        for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
          const double i = static_cast<double>(j - offsets[s]);  // rows merged so far
          const double w_new = 1.0 / (i + 1.0), w_cross = dl * i * w_new;
          // the nc rows (order[j], c0 + c): exact per-row mean and M2, short rows a vector of rows at a time
          rowk::rows<scalar_t>(px + (order[j] * C + c0) * L, L, 0, nc, rm, r2);
          for (int64_t c = 0; c < nc; ++c) {
            const double delta = rm[c] - ms[c];
            ms[c] += delta * w_new;
            vs[c] += r2[c] + delta * delta * w_cross;
          }
        }
      }
    });
  });

  // 2. per segment: variance and loss
  const double* ptm = target_mean.const_data_ptr<double>();
  const double* ptv = target_var.const_data_ptr<double>();
  double* pl = loss.data_ptr<double>();
  at::parallel_for(0, S, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (cnt[s] == 0) continue;
      const double inv_n = 1.0 / (static_cast<double>(cnt[s]) * dl);
      double sm = 0.0, sv = 0.0;
      for (int64_t c = s * C; c < (s + 1) * C; ++c) {
        pv[c] *= inv_n;
        const double em = ptm[c] - pm[c];
        const double ev = ptv[c] - pv[c];
        sm += em * em;
        sv += ev * ev;
      }
      pl[s] = std::sqrt(sm) + std::sqrt(sv);
    }
  });
  return {loss, mean, var, count};
}

Tensor segment_bn_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids,
                               const Tensor& target_mean, const Tensor& target_var, const Tensor& mean,
                               const Tensor& var, const Tensor& count) {
  return bwd_impl(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count, nullptr);
}

}  // namespace lpqld::sbl_cpu

TORCH_LIBRARY_IMPL(lpqld, CPU, m) {
  m.impl("segment_bn_loss_fwd", &lpqld::sbl_cpu::segment_bn_loss_fwd_cpu);
  m.impl("segment_bn_loss_bwd", &lpqld::sbl_cpu::segment_bn_loss_bwd_cpu);
}
