/*
 * kasminad config: kasminad's options, one table row each (name, type, range, default, doc).
 *
 * Sources, later ones winning: the defaults, the config file (--config FILE or KASMINA_CONFIG;
 * lines "name value", '#' comments, repeatable options repeat), the environment (KASMINA_<NAME>,
 * dashes as underscores), then the command line (--name value, --flag). A bad value fails
 * start-up with one line naming the option, where it came from and its range.
 * deploy/kasminad.conf documents every option.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_CFG_MAX_LISTEN 8

struct ksm_config {
    char *config_file;
    char *listen[KSM_CFG_MAX_LISTEN];
    size_t n_listen;
    bool allow_remote_tcp;
    char *state_dir;
    bool no_persist;
    int journal_records;
    size_t journal_bytes;
    bool strict_restore;
    int checkpoint_interval;
    char *metrics_listen;
    int cpu_devices;
    bool no_cuda;
    size_t memory_cap;
    char *fault_injection; /* tests only */
    char *log_level;
    char *log_file;
    char *log_format; /* "text" | "json" */
    size_t max_message_bytes;
    double drain_timeout;
    int workers;
    int max_concurrent_calls;
    size_t event_ring;
    size_t subscriber_buffer;
    bool demo;
    /* security */
    char *socket_group;
    char *tls_cert, *tls_key, *tls_client_ca;
    char *token_file;
    /* limits */
    int max_batch_rows, max_sequence_length, max_models, max_seeds_per_model;
    int max_queued_per_stream;
    size_t max_reply_bytes;
    size_t max_weights_bytes;
    bool allow_compressed_requests, metrics_allow_remote;
};

/* Fills *c. Returns 0, 1 when --help or --version was printed (exit 0), or KSM_EINVAL after
 * printing one line to stderr (exit 2). On a non-zero return *c holds nothing to free. */
int ksm_config_load(struct ksm_config *c, int argc, char **argv, const char *version);
void ksm_config_fini(struct ksm_config *c);
/* The --help text, generated from the table. */
void ksm_config_usage(FILE *f);

#ifdef __cplusplus
}
#endif
