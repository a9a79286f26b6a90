/*
 * kasminactl internals: value parsers (args.c) and output formatting (out.c). Neither needs a
 * server, so tests/rpc unit-tests them. Every parser returns 0 or KSM_EINVAL and then writes one
 * sentence naming the option to err (errlen bytes).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "kasmina/client.h"
#include "kasmina/kasmina.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- Exit codes (kasminactl --help documents them) ----

enum ctl_exit {
    CTL_EXIT_OK = 0,
    CTL_EXIT_OTHER = 1,
    CTL_EXIT_USAGE = 2,
    CTL_EXIT_INVALID = 3,
    CTL_EXIT_NOT_FOUND = 4,
    CTL_EXIT_PRECONDITION = 5,
    CTL_EXIT_UNAVAILABLE = 6,
    CTL_EXIT_EXHAUSTED = 7,
    CTL_EXIT_AUTH = 8,
    CTL_EXIT_GATE_FAILED = 9, /* advance: the call succeeded, the gate did not pass */
};

/* The exit code of a failed call from its gRPC status (grpc_status_code values). */
int ctl_exit_code(int grpc_status);

// ---- Value parsers ----

int ctl_parse_u32(const char *opt, const char *s, uint32_t *out, char *err, size_t errlen);
int ctl_parse_u64(const char *opt, const char *s, uint64_t *out, char *err, size_t errlen);
/* A finite double (NaN and infinities are rejected). */
int ctl_parse_double(const char *opt, const char *s, double *out, char *err, size_t errlen);
/* true/false, yes/no, on/off, 1/0. */
int ctl_parse_bool(const char *opt, const char *s, bool *out, char *err, size_t errlen);
/* Stage names ("TRAINING", "training", "STAGE_TRAINING") or numbers; "next" = UNKNOWN. */
int ctl_parse_stage(const char *opt, const char *s, enum ksm_stage *out, char *err, size_t errlen);
/* linear | cosine | sigmoid. */
int ctl_parse_curve(const char *opt, const char *s, enum ksm_alpha_curve *out, char *err,
                    size_t errlen);
/* add | multiply | gate. */
int ctl_parse_algorithm(const char *opt, const char *s, enum ksm_alpha_algorithm *out, char *err,
                        size_t errlen);
/* f32 | f16 | bf16 | i64 | i32 (any case). */
int ctl_parse_dtype(const char *opt, const char *s, enum ksm_dtype *out, char *err, size_t errlen);
/* A comma list of gates "G1,G2,G3" as the bit set of struct ksm_model_spec. */
int ctl_parse_gates(const char *opt, const char *s, unsigned *out, char *err, size_t errlen);
/* A comma list of floats "0.5,1,0" into a malloc'd array. */
int ctl_parse_floats(const char *opt, const char *s, float **out, size_t *n, char *err,
                     size_t errlen);

/* An alpha config "NAME:SLOT=A,SLOT=A" (or "NAME" alone: no slot forced). The strings are
 * malloc'd: ctl_alpha_config_free. */
int ctl_parse_alpha_config(const char *opt, const char *s, struct ksm_alpha_config *out, char *err,
                           size_t errlen);
void ctl_alpha_config_free(struct ksm_alpha_config *c);

/* "SLOT=a,b,c": one override of a fused forward (malloc'd: ctl_alpha_override_free). */
int ctl_parse_override(const char *opt, const char *s, struct ksm_alpha_override *out, char *err,
                       size_t errlen);
void ctl_alpha_override_free(struct ksm_alpha_override *o);

/* "FILE[:TENSOR]": splits a tensor reference; *file malloc'd, *tensor points into it or NULL. */
int ctl_parse_tensor_ref(const char *opt, const char *s, char **file, const char **tensor,
                         char *err, size_t errlen);

/* --socket PATH / --addr ADDR / KASMINA_ADDR / the default socket into a gRPC target. socket
 * and addr may be NULL; addr without a scheme and with a '/' is a unix socket path. */
const char *ctl_resolve_target(const char *socket, const char *addr, char *buf, size_t len);

// ---- Tables ----

/* A table of strings printed with aligned columns: a header row, then rows. Numeric columns
 * (set with ctl_table_right) are right-aligned. */
struct ctl_table;
struct ctl_table *ctl_table_new(int ncols, const char *const *headers);
void ctl_table_right(struct ctl_table *t, int col);
/* Adds a row; cells are printf'd one per call of ctl_table_cell in column order. */
void ctl_table_row(struct ctl_table *t);
void ctl_table_cell(struct ctl_table *t, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void ctl_table_print(const struct ctl_table *t, FILE *f);
void ctl_table_free(struct ctl_table *t);

// ---- Rendering of engine structs ----

/* JSON objects (new references) with the proto's field names. */
json_t *ctl_json_slot_report(const struct ksm_slot_report *r);
json_t *ctl_json_gate(const struct ksm_gate_result *g);
json_t *ctl_json_model(const struct ksm_model_info *m);
json_t *ctl_json_event(uint64_t sequence, const struct ksm_lifecycle_event *e);
json_t *ctl_json_mem_stats(const struct ksm_mem_stats *s);
json_t *ctl_json_cache_counters(const char *model_id, const struct ksm_cache_counters *c);
/* {"dtype","shape","data"} (data as numbers; F16/BF16 decoded to float). */
json_t *ctl_json_tensor(const ksm_tensor *t);
/* Prints j (indented, sorted keys) and a newline, then drops the reference. */
void ctl_json_print(json_t *j, FILE *f);

/* Tables of slot reports (one row per slot) and models. */
void ctl_print_slot_reports(const struct ksm_slot_report *r, size_t n, FILE *f);
void ctl_print_models(const struct ksm_model_info *m, size_t n, FILE *f);
void ctl_print_gate(const struct ksm_gate_result *g, FILE *f);
/* One line per check, "<indent>+ name: detail" (passed) or "<indent>- name: detail" (failed). */
void ctl_print_gate_checks(const struct ksm_gate_result *g, const char *indent, FILE *f);
/* One line per event: "SEQ TIME TYPE model/slot seed from->to alpha ...", and for
 * SEED_GATE_EVALUATED one indented line per check (ctl_print_gate_checks). */
void ctl_print_event(uint64_t sequence, const struct ksm_lifecycle_event *e, FILE *f);
/* The results of calls, as JSON objects with json, else as tables and lines (what each
 * subcommand prints). */
void ctl_show_slot_report(bool json, const struct ksm_slot_report *r, FILE *f);
/* {"slots": [...]} or the table. */
void ctl_show_slot_reports(bool json, const struct ksm_slot_report *r, size_t n, FILE *f);
/* Prune, SchedulePrune, SetAlphaTarget: accepted (false: nothing to do) and the slot. */
void ctl_show_accepted(bool json, bool accepted, const struct ksm_slot_report *r, FILE *f);
/* AdvanceStage: the gate and the slot. */
void ctl_show_advance(bool json, const struct ksm_gate_result *g, const struct ksm_slot_report *r,
                      FILE *f);
/* One event: a compact JSON line, or ctl_print_event. */
void ctl_show_event(bool json, uint64_t sequence, const struct ksm_lifecycle_event *e, FILE *f);
/* One model with its slots. */
void ctl_show_model(bool json, const struct ksm_model_info *m, FILE *f);
/* {"models": [...]} or the table. */
void ctl_show_models(bool json, const struct ksm_model_info *m, size_t n, FILE *f);
/* GetServerInfo; target is the address used. */
void ctl_show_server_info(bool json, const struct ksm_client_server_info *s, const char *target,
                          FILE *f);
void ctl_show_load_result(bool json, const char *model_id, const struct ksm_load_result *r,
                          FILE *f);
/* output_file: where the output tensor was written (NULL: it is shown, row by row). */
void ctl_show_forward(bool json, const struct ksm_forward_result *r, const char *output_file,
                      FILE *f);
void ctl_show_evaluate(bool json, const struct ksm_evaluate_result *r, FILE *f);
void ctl_show_train_step(bool json, uint32_t epoch, const struct ksm_train_result *r, FILE *f);
/* Checkpoint's reply: one line per model (MODEL, CHECKPOINT_STEP), or {"checkpoint_step": {..}}. */
void ctl_show_checkpoint(bool json, const struct ksm_client_checkpoint *v, size_t n, FILE *f);
void ctl_show_training(bool json, const char *model_id, const struct ksm_training_config *c,
                       uint64_t train_step, FILE *f);
/* Per device, then per model when any device reports models. */
void ctl_show_memory(bool json, const struct ksm_client_memory_stats *s, FILE *f);
void ctl_show_caches(bool json, const struct ksm_client_cache_counters *v, size_t n, FILE *f);

/* Human-readable byte count: "1.5 MiB". */
const char *ctl_bytes(uint64_t n, char *buf, size_t len);
/* Element i of a host tensor as a double (F16/BF16 decoded). */
double ctl_tensor_get(const ksm_tensor *t, int64_t i);

#ifdef __cplusplus
}
#endif
