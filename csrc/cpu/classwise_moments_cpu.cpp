// CPU kernel of lpqld::classwise_moments_accumulate_.
//
// Phase 1 (parallel over the N*C rows): each row of L values is reduced to
// (mean, M2) in double. The row is processed in chunks of kChunk elements
// that stay in L1; 16-bit inputs are converted to float into a stack buffer
// once; two passes over each chunk (sum, then shifted sum and sum of squares
// around the chunk mean: the corrected two-pass estimate, robust to large
// means) with independent vector accumulators; chunks are Chan-merged in
// double. Rows of at most kShortRow values are done W (vector width) rows at
// a time so that their horizontal sums share one transposing reduction.
// x is read once from DRAM. The hot loops use GCC vector extensions
// and are compiled for AVX-512, AVX2 and baseline x86-64, each with the
// vector width of its registers (64, 32, 16 bytes: a wider generic vector is
// kept in memory, not registers) and one version picked at first use;
// elsewhere they stay portable.
// Phase 2: a serial O(N) walk gives every sample the count of its class
// before it, as Chan weights, and updates count; then threads own blocks of
// channels and each walks the samples in order, Chan-merging row stats into
// mean/m2 of the sample's class (no races: a thread owns its channels in
// every class row). L == 1 skips phase 1: phase 2 merges the values directly.
// The row kernels (phase 1) are in row_moments.{h,cpp}, shared with segment_bn_loss. A channels-last x
// (a channels_last activation viewed as [N, C, L], strides (C * L, 1, C)) is read in place: phase 1 reduces
// tiles of [L, <= 64 channels], channels in SIMD lanes (segment_bn_loss's nlc_tile_moments), instead of the
// transposing copy a contiguous view would need.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/row_moments.h"
#include "cpu/segment_bn_loss_cpu.h"  // nlc_tile_moments: the channels-last tile moments

namespace lpqld {
namespace {

constexpr int64_t kPhase1Grain = 1 << 15;  // elements per parallel task, at least
constexpr int64_t kChannelBlock = 8;       // 8 doubles = one cache line of mean/m2

template <typename scalar_t>
void accumulate_impl(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count, const at::Tensor& mean,
                     const at::Tensor& m2) {
  using Tr = rowk::Traits<rowk::InOf<scalar_t>::value, 16>;  // S and scalar() only: any width
  const int64_t n = x.size(0), c = x.size(1), length = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  double* cnt = count.mutable_data_ptr<double>();
  double* mp = mean.mutable_data_ptr<double>();
  double* m2p = m2.mutable_data_ptr<double>();

  // Phase 1: row stats (skipped for L == 1, where a row is its own mean).
  std::vector<double> row_mean, row_m2;
  if (length > 1 && c > 0) {
    const int64_t rows = n * c;
    row_mean.resize(rows);
    row_m2.resize(rows);
    double* rm = row_mean.data();
    double* rm2 = row_m2.data();
    if (is_channels_last_ncl(x)) {  // a channels-last activation, read in place: tiles of [L, <= 64 channels]
      const int64_t nb = (c + sbl_cpu::kNlcBlock - 1) / sbl_cpu::kNlcBlock;
      const int64_t grain = std::max<int64_t>(1, kPhase1Grain / (length * std::min(c, sbl_cpu::kNlcBlock)));
      at::parallel_for(0, n * nb, grain, [&](int64_t t0, int64_t t1) {
        double guess[sbl_cpu::kNlcBlock];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / nb, c0 = (t % nb) * sbl_cpu::kNlcBlock;
          const int64_t nc = std::min(c, c0 + sbl_cpu::kNlcBlock) - c0;
          const scalar_t* tile = xp + i * c * length + c0;
          // The shift: the mean of up to 16 positions spread over the map. The tile's first row alone is one
          // draw, beyond 1.5 std of the mean for some of 64 channels nearly always, which costs a second sweep.
          const int64_t probes = std::min<int64_t>(16, length);
          for (int64_t j = 0; j < nc; ++j) guess[j] = 0.0;
          for (int64_t q = 0; q < probes; ++q) {
            const scalar_t* row = tile + (q * length / probes) * c;
            for (int64_t j = 0; j < nc; ++j) guess[j] += static_cast<double>(row[j]);
          }
          for (int64_t j = 0; j < nc; ++j) guess[j] /= static_cast<double>(probes);
          sbl_cpu::nlc_tile_moments<scalar_t>(tile, c, length, nc, guess, rm + i * c + c0, rm2 + i * c + c0);
        }
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kPhase1Grain / length);
      at::parallel_for(0, rows, grain,
                       [&](int64_t r0, int64_t r1) { rowk::rows<scalar_t>(xp, length, r0, r1, rm, rm2); });
    }
  }

  // Phase 2a: class count before each sample, as Chan weights; update count.
  std::vector<double> w_b(n), w_ab(n);
  const double nb = static_cast<double>(length);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t kk = lab[i];
    const double na = cnt[kk];
    const double tot = na + nb;
    w_b[i] = nb / tot;        // weight of the new row in the mean
    w_ab[i] = na * nb / tot;  // weight of delta^2 in m2
    cnt[kk] = tot;
  }
  if (c == 0) return;

  // Phase 2b: threads own blocks of channels and walk the samples in order.
  const int64_t blocks = (c + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n * kChannelBlock));
  const double* wb = w_b.data();
  const double* wab = w_ab.data();
  if (length == 1) {
    using S = typename Tr::S;
    const S* xs = reinterpret_cast<const S*>(xp);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kChannelBlock, c1 = std::min(c, b1 * kChannelBlock);
      for (int64_t i = 0; i < n; ++i) {
        double* __restrict__ mrow = mp + lab[i] * c;
        double* __restrict__ m2row = m2p + lab[i] * c;
        const S* __restrict__ xrow = xs + i * c;
        const double a = wb[i], ab = wab[i];
        for (int64_t j = c0; j < c1; ++j) {
          const double delta = static_cast<double>(Tr::scalar(xrow + j)) - mrow[j];
          mrow[j] += delta * a;
          m2row[j] += delta * delta * ab;
        }
      }
    });
  } else {
    const double* rm = row_mean.data();
    const double* rm2 = row_m2.data();
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kChannelBlock, c1 = std::min(c, b1 * kChannelBlock);
      for (int64_t i = 0; i < n; ++i) {
        double* __restrict__ mrow = mp + lab[i] * c;
        double* __restrict__ m2row = m2p + lab[i] * c;
        const double* __restrict__ rmi = rm + i * c;
        const double* __restrict__ rm2i = rm2 + i * c;
        const double a = wb[i], ab = wab[i];
        for (int64_t j = c0; j < c1; ++j) {
          const double delta = rmi[j] - mrow[j];
          mrow[j] += delta * a;
          m2row[j] += rm2i[j] + delta * delta * ab;
        }
      }
    });
  }
}

void classwise_moments_accumulate_cpu(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count,
                                      const at::Tensor& mean, const at::Tensor& m2) {
  check_classwise_moments_args(x, labels, count, mean, m2, /*channels_last=*/true);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "classwise_moments_accumulate_ (CPU): x must be a CPU tensor, got ",
                    x.device());
  const int64_t n = x.size(0), k = count.size(0);
  if (n == 0 || x.size(2) == 0) return;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(lab[i] >= 0 && lab[i] < k, "classwise_moments_accumulate_: labels holds class id ", lab[i],
                      " outside [0, ", k, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "classwise_moments_accumulate_cpu",
                                  [&] { accumulate_impl<scalar_t>(x, labels, count, mean, m2); });
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_IMPL(lpqld, CPU, m) {
  m.impl("classwise_moments_accumulate_", &lpqld::classwise_moments_accumulate_cpu);
}
