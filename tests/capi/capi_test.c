/* The C ABI from C: options, create, register, step, save/load round trip, status strings,
 * and the error paths (status codes and messages). Run on 1 rank and under mpirun -np 2
 * (then both ranks must reach the same parameters as the single-process run printed by
 * rank 0: the test prints a checksum that CTest compares across runs by regex). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "celo2/celo2.h"

static int failures = 0;
#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      fprintf(stderr, "%s:%d: EXPECT(%s) failed; last error: %s\n", __FILE__, __LINE__, \
              #cond, celo2_last_error());                                         \
      ++failures;                                                                 \
    }                                                                             \
  } while (0)
#define EXPECT_OK(call) EXPECT((call) == CELO2_OK)

enum { R = 6, C = 10, B = 7 };
static float w[R * C], dw[R * C], b[B], db[B];
/* A bfloat16 copy of w (raw bits) with w's gradients, and a float32 twin it must follow. */
static uint16_t h[R * C];
static float hf[R * C];
static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t x) {
  const uint32_t u = (uint32_t)x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void fill_grads(int step, int rank, int world) {
  /* Every rank passes the mean gradient (grads=reduced), the same on all ranks. */
  (void)rank;
  (void)world;
  for (int i = 0; i < R * C; ++i) dw[i] = (float)sin(0.37 * i + step);
  for (int i = 0; i < B; ++i) db[i] = (float)cos(0.11 * i - step);
}

int main(int argc, char** argv) {
  const char* ckpt = argc > 1 ? argv[1] : "capi_test.state";
  int major = -1, abi = -1;
  EXPECT_OK(celo2_version(&major, NULL, NULL, &abi));
  EXPECT(abi == CELO2_ABI_VERSION);

  /* Errors: status, name and message. */
  EXPECT(celo2_options_create(NULL) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(celo2_last_error(), "out is NULL") != NULL);
  celo2_options_t* o = NULL;
  EXPECT_OK(celo2_options_create(&o));
  EXPECT(celo2_options_set(o, "warp_speed", "9") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(celo2_last_error(), "unknown option 'warp_speed'") != NULL);
  EXPECT(celo2_options_set(o, "weight_decay", "lots") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_options_set(o, "overlap_grad_reduce", "maybe") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strcmp(celo2_status_name(CELO2_ERR_FORMAT), "CELO2_ERR_FORMAT") == 0);
  celo2_t* bad = NULL;
  EXPECT_OK(celo2_options_set(o, "schedule", "cosine:lr=1e-3,warmup=-1"));
  EXPECT(celo2_create(o, &bad) == CELO2_ERR_INVALID_ARGUMENT && bad == NULL);
  EXPECT(strstr(celo2_last_error(), "schedule") != NULL);
  EXPECT_OK(celo2_options_set(o, "schedule", "constant:lr=1e-3"));
  EXPECT_OK(celo2_options_set(o, "theta", "/nonexistent/theta.state"));
  EXPECT(celo2_create(o, &bad) == CELO2_ERR_IO);
  EXPECT_OK(celo2_options_set(o, "theta", ""));

  EXPECT_OK(celo2_options_set(o, "schedule", "cosine:lr=1e-2,warmup=2,total=10,final=0.1"));
  EXPECT_OK(celo2_options_set(o, "weight_decay", "0.01"));
  EXPECT_OK(celo2_options_set(o, "grads", "reduced"));
  celo2_t* opt = NULL;
  EXPECT_OK(celo2_create(o, &opt));
  EXPECT_OK(celo2_options_destroy(o));
  if (!opt) return 1;

  for (int i = 0; i < R * C; ++i) w[i] = (float)(0.01 * ((i * 7919) % 101) - 0.5);
  for (int i = 0; i < B; ++i) b[i] = 0.1f * (float)i;
  const int64_t ws[2] = {R, C}, bs[1] = {B}, neg[1] = {-3};
  EXPECT(celo2_add_tensor(opt, NULL, 2, ws, CELO2_FLOAT32, w, dw) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_add_tensor(opt, "x", 1, neg, CELO2_FLOAT32, b, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_add_tensor(opt, "x", 9, ws, CELO2_FLOAT32, b, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_add_tensor(opt, "x", 1, bs, (celo2_dtype_t)7, b, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_add_tensor(opt, "x", 1, bs, CELO2_BFLOAT16, (char*)h + 1, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_add_tensor(opt, "x", 1, bs, CELO2_FLOAT32, NULL, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT_OK(celo2_add_tensor(opt, "layer.w", 2, ws, CELO2_FLOAT32, w, dw));
  EXPECT(celo2_add_tensor(opt, "layer.w", 1, bs, CELO2_FLOAT32, b, db) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(celo2_last_error(), "duplicate") != NULL);
  EXPECT_OK(celo2_add_tensor(opt, "layer.b", 1, bs, CELO2_FLOAT32, b, db));
  for (int i = 0; i < R * C; ++i) {
    h[i] = to_bf16(0.5f * w[i] + 0.01f);
    hf[i] = from_bf16(h[i]);
  }
  uint16_t h0[R * C];
  memcpy(h0, h, sizeof h);
  EXPECT_OK(celo2_add_tensor(opt, "half.w", 2, ws, CELO2_BFLOAT16, h, dw));
  EXPECT_OK(celo2_add_tensor(opt, "twin.w", 2, ws, CELO2_FLOAT32, hf, dw));
  /* Param groups: the bias frozen by a zero lr scale, no decay on it. */
  EXPECT(celo2_set_tensor_group(opt, "layer.b", -1.0, NAN) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_set_tensor_group(opt, "nope", 1.0, NAN) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT_OK(celo2_set_tensor_group(opt, "layer.b", 0.0, 0.0));
  float b0[B];
  memcpy(b0, b, sizeof b);

  celo2_info_t info;
  EXPECT_OK(celo2_get_info(opt, &info));
  const int rank = info.rank, world = info.world_size;
  celo2_step_report_t rep;
  for (int t = 0; t < 4; ++t) {
    fill_grads(t, rank, world);
    EXPECT_OK(celo2_step(opt, 1.0 / (t + 1), &rep));
  }
  EXPECT(rep.step == 4 && rep.skipped == 0 && rep.update_rms[0] > 0);
  EXPECT(memcmp(b, b0, sizeof b) == 0); /* lr scale 0: unchanged */
  {
    /* The bf16 tensor holds round(its master), which follows the float32 twin. */
    int same = 0, moved = 0;
    for (int i = 0; i < R * C; ++i) {
      same += h[i] == to_bf16(hf[i]);
      moved += h[i] != h0[i];
    }
    EXPECT(same >= R * C - 1);
    EXPECT(moved > R * C / 2);
  }
  EXPECT_OK(celo2_set_tensor_group(opt, "layer.b", 1.0, NAN));
  EXPECT(celo2_add_tensor(opt, "late", 1, bs, CELO2_FLOAT32, b, db) == CELO2_ERR_STATE);

  /* Save at 4, run to 8, reload at 4, run to 8 again: the same parameters. */
  EXPECT_OK(celo2_save(opt, ckpt));
  float w4[R * C], b4[B];
  memcpy(w4, w, sizeof w);
  memcpy(b4, b, sizeof b);
  for (int t = 4; t < 8; ++t) {
    fill_grads(t, rank, world);
    EXPECT_OK(celo2_step(opt, NAN, NULL));
  }
  float w8[R * C];
  memcpy(w8, w, sizeof w);
  memcpy(w, w4, sizeof w);
  memcpy(b, b4, sizeof b);
  EXPECT_OK(celo2_load(opt, ckpt));
  for (int t = 4; t < 8; ++t) {
    fill_grads(t, rank, world);
    EXPECT_OK(celo2_step(opt, NAN, NULL));
  }
  EXPECT(memcmp(w, w8, sizeof w) == 0);
  /* A file that cannot be read is an I/O error, not a format error (issue 14 D6). */
  EXPECT(celo2_load(opt, "/nonexistent/x.state") == CELO2_ERR_IO);
  EXPECT(celo2_load(opt, "/tmp") == CELO2_ERR_IO);
  EXPECT(celo2_save(opt, "/nonexistent-dir/x.state") == CELO2_ERR_IO);

  /* Strings: size query, short buffer, the real call. */
  size_t need = 0;
  EXPECT(celo2_status_json(opt, NULL, 0, &need) == CELO2_ERR_BUFFER_TOO_SMALL && need > 10);
  char* js = malloc(need);
  EXPECT_OK(celo2_status_json(opt, js, need, NULL));
  EXPECT(strstr(js, "\"step\":8") != NULL);
  free(js);
  char table[4096];
  EXPECT_OK(celo2_routing_table(opt, table, sizeof table, NULL));
  EXPECT(strstr(table, "layer.w") != NULL);
  EXPECT(celo2_set(opt, "schedule", "nonsense") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_set(opt, "variant", "celo2") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT_OK(celo2_set(opt, "mult_1d", "10"));
  EXPECT(celo2_step(NULL, 0, NULL) == CELO2_ERR_INVALID_ARGUMENT);
  /* overlap_grad_reduce's call: names are checked (with grads=reduced it reduces nothing). */
  EXPECT_OK(celo2_grad_ready(opt, "layer.w"));
  EXPECT(celo2_grad_ready(opt, "nope") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(celo2_last_error(), "nope") != NULL);
  EXPECT(celo2_grad_ready(NULL, "layer.w") == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(celo2_grad_ready(opt, NULL) == CELO2_ERR_INVALID_ARGUMENT);
  /* A negative or non-finite learning rate is refused and changes nothing (it would move the
     parameters uphill). */
  EXPECT(celo2_step_with_lr(opt, -1.0, NAN, NULL) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT(strstr(celo2_last_error(), "negative") != NULL);
  EXPECT(celo2_step_with_lr(opt, INFINITY, NAN, NULL) == CELO2_ERR_INVALID_ARGUMENT);
  EXPECT_OK(celo2_set(opt, "max_grad_norm", "1.5"));
  EXPECT(celo2_set(opt, "max_grad_norm", "-1") == CELO2_ERR_INVALID_ARGUMENT);

  double sum = 0;
  for (int i = 0; i < R * C; ++i) sum += w[i];
  for (int i = 0; i < B; ++i) sum += b[i];
  if (rank == 0) printf("capi_test world %d checksum %.9f failures %d\n", world, sum, failures);
  EXPECT_OK(celo2_destroy(opt));
  return failures ? 1 : 0;
}
