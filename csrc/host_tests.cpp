// Host build of the shared __host__ __device__ code, driven by tests/test_csrc_host.py:
//   philox C0 C1 C2 C3 K0 K1      -> the four Philox words (hex)
//   normal SEED FRAME N           -> the first N Gaussians of a latent frame
//   e4m3                          -> reads floats (one per line) from stdin, prints e4m3 bytes
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "e4m3.cuh"
#include "philox.cuh"

int main(int argc, char** argv) {
  if (argc == 8 && !strcmp(argv[1], "philox")) {
    uint32_t v[6];
    for (int i = 0; i < 6; ++i) v[i] = static_cast<uint32_t>(strtoul(argv[2 + i], nullptr, 0));
    const xjfast::Philox4 w = xjfast::philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5]);
    printf("%08x %08x %08x %08x\n", w.x[0], w.x[1], w.x[2], w.x[3]);
    return 0;
  }
  if (argc == 5 && !strcmp(argv[1], "normal")) {
    const uint64_t seed = strtoull(argv[2], nullptr, 0), frame = strtoull(argv[3], nullptr, 0);
    const long n = strtol(argv[4], nullptr, 0);
    for (long g = 0; 4 * g < n; ++g) {
      float out[4];
      xjfast::philox_normal4(static_cast<uint64_t>(g), frame, seed, out);
      for (int j = 0; j < 4 && 4 * g + j < n; ++j) printf("%.9g\n", out[j]);
    }
    return 0;
  }
  if (argc == 2 && !strcmp(argv[1], "e4m3")) {
    float x;
    while (scanf("%f", &x) == 1) {
      const uint8_t b = xjfast::float_to_e4m3(x);
      printf("%u %.9g\n", b, xjfast::e4m3_to_float(b));
    }
    return 0;
  }
  fprintf(stderr, "usage: host_tests philox C0 C1 C2 C3 K0 K1 | normal SEED FRAME N | e4m3 < floats\n");
  return 2;
}
