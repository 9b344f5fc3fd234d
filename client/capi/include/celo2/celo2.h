/* The celo2 C ABI: the sharded Celo2 optimizer for trainers in any language.
 *
 * Shape of the interface (after NCCL's nccl.h): opaque handles, every call returns a
 * celo2_status_t, the message of the last failure on this thread is celo2_last_error(),
 * arguments are checked in one place (argcheck.cc) before the engine sees them, and only the
 * celo2_* symbols below are exported (celo2.map, version node CELO2_1).
 *
 *   celo2_options_t* o;  celo2_options_create(&o);
 *   celo2_options_set(o, "schedule", "cosine:lr=1e-3,warmup=100,total=10000,final=0.1");
 *   celo2_options_set(o, "control_address", "127.0.0.1:0");          (optional)
 *   celo2_t* opt;  celo2_create(o, &opt);  celo2_options_destroy(o);  (collective)
 *   celo2_add_tensor(opt, "layers.0.w", 2, shape, CELO2_FLOAT32, w, dw);  (each tensor)
 *   for (...) { ...backward...; celo2_step(opt, loss, &report); }
 *   celo2_save(opt, "ckpt/optimizer.state");  celo2_destroy(opt);
 *
 * Every rank makes the same calls in the same order; create, step, save, load, set and
 * gather_params are collective. Parameters are updated in place; gradients are read at each
 * step; both pointers must stay valid while the handle lives. Thread safety: one handle is
 * used by one thread at a time.
 */
#ifndef CELO2_CELO2_H_
#define CELO2_CELO2_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CELO2_ABI_VERSION 1

/* Exported from libcelo2.so (built with hidden visibility; celo2.map names the same set). */
#if defined(__GNUC__)
#define CELO2_API __attribute__((visibility("default")))
#else
#define CELO2_API
#endif

typedef enum celo2_status {
  CELO2_OK = 0,
  CELO2_ERR_INVALID_ARGUMENT = 1, /* null pointer, bad name/shape/dtype, bad option text */
  CELO2_ERR_STATE = 2,            /* not allowed now (add_tensor after the first step) */
  CELO2_ERR_FORMAT = 3,           /* a weights or checkpoint file failed validation */
  CELO2_ERR_IO = 4,               /* a file could not be read or written */
  CELO2_ERR_COMM = 5,             /* a collective failed (dead peer, MPI error) */
  CELO2_ERR_NONFINITE = 6,        /* non-finite gradients under nan_policy=error */
  CELO2_ERR_UNSUPPORTED = 7,      /* not in this build (e.g. no gRPC control plane) */
  CELO2_ERR_INTERNAL = 8,         /* a bug: please report it with the message */
  CELO2_ERR_BUFFER_TOO_SMALL = 9  /* a string did not fit; *needed holds the size */
} celo2_status_t;

typedef enum celo2_dtype { CELO2_FLOAT32 = 0, CELO2_BFLOAT16 = 1, CELO2_FLOAT16 = 2 } celo2_dtype_t;

typedef struct celo2_options celo2_options_t; /* opaque */
typedef struct celo2_handle celo2_t;          /* opaque: one optimizer on this rank */

/* Fixed for ABI version 1 (new fields come with a new struct and function). */
typedef struct celo2_step_report {
  int64_t step;          /* updates applied so far */
  double lr;             /* base learning rate of this step */
  int32_t skipped;       /* 1: non-finite gradients, step skipped everywhere */
  int64_t nonfinite;     /* non-finite gradient entries seen */
  double update_rms[3];  /* per label: celo2, adamw, frozen */
  double grad_norm[3];
  double seconds;        /* wall time of this call on this rank */
} celo2_step_report_t;

typedef struct celo2_info {
  int64_t step, skipped;
  double lr;
  int32_t rank, world_size;
  int64_t num_tensors, total_elements;
  int64_t local_lo, local_hi; /* this rank's slice of the flat index space */
} celo2_info_t;

CELO2_API const char* celo2_status_name(celo2_status_t status); /* "CELO2_ERR_FORMAT" */
/* The message of the last failing call on this thread ("" if none). Valid until the next
 * celo2 call on this thread. */
CELO2_API const char* celo2_last_error(void);
CELO2_API celo2_status_t celo2_version(int* major, int* minor, int* patch, int* abi);

/* Options as text (the same forms the tools, the Python package and the control plane take):
 *   variant          celo2 | celo2-base                         (celo2)
 *   theta            path of a published-layout theta.state     (the project's default)
 *   schedule         constant:lr=1e-3 | cosine:lr=..,warmup=..,total=..,final=.. | ...
 *   rules            "re:embed => adamw; ndim<=1 => adamw; * => celo2"   (seed default)
 *   weight_decay, mult_1d, adam_b1, adam_b2, adam_eps            numbers
 *   nan_policy       skip | error | zero                          (skip)
 *   grads            local | reduced | sharded                    (local)
 *   gather_params    1 | 0                                        (1)
 *   overlap_grad_reduce 1 | 0: reduce gradient buckets during backward, as
 *                    celo2_grad_ready marks tensors (MPI)          (0)
 *   communicator     auto | local | mpi                           (auto)
 *   control_address, control_token, control_token_file, control_weights_root,
 *   control_checkpoint_dir                                        (control plane off)
 * Unknown keys and malformed numbers fail here; texts are parsed at celo2_create. */
CELO2_API celo2_status_t celo2_options_create(celo2_options_t** out);
CELO2_API celo2_status_t celo2_options_set(celo2_options_t* options, const char* key, const char* value);
CELO2_API celo2_status_t celo2_options_destroy(celo2_options_t* options);

CELO2_API celo2_status_t celo2_create(const celo2_options_t* options, celo2_t** out);
CELO2_API celo2_status_t celo2_destroy(celo2_t* opt);

/* shape: ndim (0..8) non-negative sizes. dtype is the parameters' (float32, bfloat16 or
 * float16); gradients are float32. For bfloat16/float16 the engine keeps float32 masters of
 * its slice, writes round(master) into params after each step, and re-seeds a master where
 * params was written between steps. Names are unique, non-empty, NUL-terminated. */
CELO2_API celo2_status_t celo2_add_tensor(celo2_t* opt, const char* name, int32_t ndim, const int64_t* shape,
                                celo2_dtype_t dtype, void* params, const void* grads);

/* loss: this step's loss for the control plane's metrics (NaN: unknown). report may be NULL. */
CELO2_API celo2_status_t celo2_step(celo2_t* opt, double loss, celo2_step_report_t* report);
/* The same with an explicit base learning rate instead of the schedule's. */
CELO2_API celo2_status_t celo2_step_with_lr(celo2_t* opt, double lr, double loss, celo2_step_report_t* report);

CELO2_API celo2_status_t celo2_save(celo2_t* opt, const char* path);
CELO2_API celo2_status_t celo2_load(celo2_t* opt, const char* path);

/* Runtime changes, same keys as the options: schedule, rules, theta, weight_decay, mult_1d. */
CELO2_API celo2_status_t celo2_set(celo2_t* opt, const char* key, const char* value);

/* A tensor's param group (torch semantics): its learning rate is the step's times lr_scale
 * (>= 0); weight_decay >= 0 replaces the recipe's for it, NaN keeps the recipe's. Same
 * calls on every rank; takes effect at the next step. */
CELO2_API celo2_status_t celo2_set_tensor_group(celo2_t* opt, const char* name, double lr_scale,
                                                double weight_decay);

/* overlap_grad_reduce=1: the named tensor's gradient is final for this step (after the last
 * micro-batch's backward); every gradient bucket whose tensors are all final is reduced on the
 * engine's communication thread while backward goes on, in the same order on every rank.
 * Tensors never marked are reduced at celo2_step. Marking a tensor twice in one step fails. */
CELO2_API celo2_status_t celo2_grad_ready(celo2_t* opt, const char* name);

/* gather_params=0: all-gather every rank's updated slice into the parameters. */
CELO2_API celo2_status_t celo2_gather_params(celo2_t* opt);

CELO2_API celo2_status_t celo2_get_info(celo2_t* opt, celo2_info_t* info);
/* Strings: written NUL-terminated into buf (len bytes); *needed (may be NULL) gets the size
 * including the NUL. A short buffer gives CELO2_ERR_BUFFER_TOO_SMALL and writes nothing. */
CELO2_API celo2_status_t celo2_status_json(celo2_t* opt, char* buf, size_t len, size_t* needed);
CELO2_API celo2_status_t celo2_routing_table(celo2_t* opt, char* buf, size_t len, size_t* needed);
/* host:port of the control plane on rank 0 once started (after the first step, or
 * celo2_start_control); "" elsewhere. */
CELO2_API celo2_status_t celo2_control_address(celo2_t* opt, char* buf, size_t len, size_t* needed);
CELO2_API celo2_status_t celo2_start_control(celo2_t* opt);

#ifdef __cplusplus
}
#endif

#endif /* CELO2_CELO2_H_ */
