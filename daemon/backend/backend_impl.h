/*
 * Backend implementation interface (the vtables behind backend.h).
 *
 * Only backend.c calls through these vtables; it checks arguments and supplies the defaults of
 * optional slots. Each backend fills one static const table per object. This header is also
 * compiled as C++ by the CUDA plugin: keep it C++-clean.
 *
 * The CUDA plugin exports one symbol, KSM_BACKEND_PLUGIN_ENTRY, of type ksm_backend_plugin_fn.
 */
#pragma once

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "nn/op.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_BACKEND_API_VERSION 1

struct ksm_backend_i {
    void (*free)(ksm_backend *b); /* synchronize and free all devices */
};

struct ksm_backend {
    const struct ksm_backend_i *iface;
    void *ctx;
    int api_version;
    char name[16];
    int n_devices;
    ksm_device **devices;
};

struct ksm_device_i {
    int (*malloc)(ksm_device *d, size_t size, void **out);
    void (*free)(ksm_device *d, void *ptr);
    int (*mem_info)(ksm_device *d, size_t *free_bytes, size_t *total_bytes);
    int (*synchronize)(ksm_device *d);
    int (*stream_new)(ksm_device *d, ksm_stream **out);
    int (*event_new)(ksm_device *d, ksm_event **out);
    /* (optional) 0 if the op can run here, KSM_EUNSUPPORTED otherwise; NULL = all ops */
    int (*supports_op)(ksm_device *d, const struct ksm_op *op);
};

struct ksm_device {
    const struct ksm_device_i *iface;
    void *ctx;
    ksm_backend *backend;
    enum ksm_device_kind kind;
    int index;
    bool is_host;
    char name[32];
};

struct ksm_stream_i {
    void (*free)(ksm_stream *s); /* wait for queued work first */
    int (*synchronize)(ksm_stream *s);
    int (*query)(ksm_stream *s);
    int (*memcpy_async)(ksm_stream *s, void *dst, const void *src, size_t n,
                        enum ksm_copy_kind kind);
    int (*memset_async)(ksm_stream *s, void *dst, int value, size_t n);
    int (*host_fn)(ksm_stream *s, ksm_host_fn fn, void *arg);
    int (*launch)(ksm_stream *s, const struct ksm_op *op);
    int (*wait_event)(ksm_stream *s, ksm_event *ev);
};

struct ksm_stream {
    const struct ksm_stream_i *iface;
    void *ctx;
    ksm_device *dev;
    uint64_t id;
};

struct ksm_event_i {
    void (*free)(ksm_event *ev);
    int (*record)(ksm_event *ev, ksm_stream *s);
    int (*query)(ksm_event *ev);
    int (*synchronize)(ksm_event *ev);
};

struct ksm_event {
    const struct ksm_event_i *iface;
    void *ctx;
    ksm_device *dev;
};

/* Services the host gives a plugin (a plugin links none of libkasmina). */
struct ksm_host_api {
    int api_version;
    void (*log_write)(enum ksm_log_level level, const char *module, const char *msg);
    enum ksm_log_level (*log_get_level)(void);
    uint64_t (*next_stream_id)(void);
};

/* Entry point of a backend plugin. Probes devices; returns 0 with *out, or KSM_ENODEVICE /
 * KSM_EDEVICE with one sentence in errbuf. Must not abort. */
typedef int (*ksm_backend_plugin_fn)(const struct ksm_host_api *host, ksm_backend **out,
                                     char *errbuf, size_t errlen);
#define KSM_BACKEND_PLUGIN_ENTRY "ksm_backend_plugin_init"

/* A process-unique, increasing stream id (backends call it when creating a stream). */
uint64_t ksm_backend_next_stream_id(void);

#ifdef __cplusplus
}
#endif
