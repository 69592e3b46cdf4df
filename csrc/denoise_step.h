#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "denoise_layout.h"

namespace xjfast {

struct DenoiseArgs {
  const void* x_t;
  const void* model_out;
  const float* coef;     // [B, 4]: a, m, keep, noise
  void* x0;
  void* x_next;          // nullptr: no re-noising
  int dtype;             // DType of x_t, model_out and the outputs
  bool tokens;
  DenoiseGeometry geometry;
  uint64_t frame_index, seed;
  const int64_t* frame_index_ptr;  // non-null: the frame index is read here on the device (a CUDA
                                   // graph replays the step with the index advanced in memory)
};

void denoise_step(const DenoiseArgs& args, cudaStream_t stream);

}  // namespace xjfast
