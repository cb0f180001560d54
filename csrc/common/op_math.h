// Compute and output types of the kernels, shared by the CPU and the CUDA sources (plain templates: nvcc
// compiles this header too).
#pragma once

#include <cstdint>

namespace lpqld {

// The type a kernel computes in for a storage type: float for float, half, bfloat16 and uint8 input,
// double for double (the float64 paths serve gradcheck).
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// The output type of an image op for a storage type: uint8 images give float output (on the 0..255 scale).
template <typename T>
struct OutType {
  using type = T;
};
template <>
struct OutType<uint8_t> {
  using type = float;
};

}  // namespace lpqld
