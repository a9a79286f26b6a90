/* The engine: devices, allocators and the model registry (kasmina.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/text.h"
#include "kasmina/model_impl.h"

static int add_devices(ksm_engine *e, ksm_backend *b, size_t cap)
{
    for (int i = 0; i < ksm_backend_device_count(b); i++) {
        if (e->n_devices == (int)(sizeof e->devices / sizeof e->devices[0])) return KSM_ELIMIT;
        ksm_device *d = ksm_backend_device(b, i);
        struct ksm_alloc_config ac = {.memory_cap = cap};
        int rc = ksm_allocator_new(d, &ac, &e->allocators[e->n_devices]);
        if (rc < 0) return rc;
        e->devices[e->n_devices++] = d;
    }
    return 0;
}

int ksm_engine_new(const struct ksm_engine_config *cfg, ksm_engine **out, char *err, size_t errlen)
{
    struct ksm_engine_config c = {0};
    if (cfg) c = *cfg;
    if (c.cpu_devices == 0) c.cpu_devices = 1;
    if (c.cpu_devices < 1 || c.cpu_devices > 16) {
        ksm_errf(err, errlen, 0, "cpu_devices must be in [1, 16], got %d", c.cpu_devices);
        return KSM_EINVAL;
    }
    ksm_engine *e = calloc(1, sizeof *e);
    if (e == NULL) return KSM_ENOMEM;
    pthread_mutex_init(&e->lock, NULL);
    e->max_models = c.max_models ? c.max_models : 1024;
    e->max_seeds_per_model = c.max_seeds_per_model;
    int rc;
    if (c.enable_cuda) {
        char why[256] = "";
        rc = ksm_cuda_backend_load(c.cuda_plugin, &e->cuda, why, sizeof why);
        if (rc < 0) {
            KSM_LOGW("engine", "CUDA backend unavailable (%s): %s; using the CPU backend",
                     ksm_err_name(rc), why);
            e->cuda = NULL;
        } else {
            KSM_LOGI("engine", "CUDA backend loaded: %d device(s)",
                     ksm_backend_device_count(e->cuda));
        }
    }
    rc = ksm_cpu_backend_new(c.cpu_devices, &e->cpu);
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "the CPU backend failed to start: %s",
                 rc == KSM_ENOPLUGIN ? "OpenBLAS could not be loaded (the log says why)"
                                     : ksm_strerror(rc));
        goto fail;
    }
    if (c.backend && (rc = add_devices(e, c.backend, c.memory_cap)) < 0) goto fail_dev;
    if (e->cuda && (rc = add_devices(e, e->cuda, c.memory_cap)) < 0) goto fail_dev;
    if ((rc = add_devices(e, e->cpu, c.memory_cap)) < 0) goto fail_dev;
    e->default_device = e->devices[0];
    if (c.default_device && *c.default_device) {
        e->default_device = ksm_engine_find_device(e, c.default_device);
        if (e->default_device == NULL) {
            ksm_errf(err, errlen, 0, "default_device \"%s\" does not exist", c.default_device);
            rc = KSM_ENODEVICE;
            goto fail;
        }
    }
    *out = e;
    return 0;
fail_dev:
    ksm_errf(err, errlen, 0, "device setup failed: %s", ksm_strerror(rc));
fail:
    ksm_engine_free(e);
    return rc;
}

void ksm_engine_free(ksm_engine *e)
{
    if (e == NULL) return;
    pthread_mutex_lock(&e->lock);
    ksm_model **models = e->models;
    size_t n = e->n_models;
    e->models = NULL;
    e->n_models = e->cap_models = 0;
    pthread_mutex_unlock(&e->lock);
    for (size_t i = 0; i < n; i++) {
        models[i]->deleted = true;
        ksm_model_unref(models[i]);
    }
    free(models);
    for (int i = 0; i < e->n_devices; i++) ksm_allocator_destroy(e->allocators[i]);
    ksm_backend_free(e->cpu);
    ksm_backend_free(e->cuda);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

int ksm_engine_health(ksm_engine *e, char *why, size_t whylen)
{
    if (!atomic_load(&e->failed)) return 0;
    pthread_mutex_lock(&e->lock);
    ksm_errf(why, whylen, 0, "%s", e->failed_why);
    pthread_mutex_unlock(&e->lock);
    return KSM_EDEVICE;
}

void ksm_engine_mark_failed(ksm_engine *e, const char *why)
{
    pthread_mutex_lock(&e->lock);
    if (!atomic_load(&e->failed)) {
        snprintf(e->failed_why, sizeof e->failed_why, "%s", why ? why : "device failure");
        atomic_store(&e->failed, true);
        KSM_LOGE("engine", "device failure: %s", e->failed_why);
    }
    pthread_mutex_unlock(&e->lock);
}

int ksm_engine_device_count(const ksm_engine *e) { return e->n_devices; }

ksm_device *ksm_engine_device(const ksm_engine *e, int i)
{
    return i >= 0 && i < e->n_devices ? e->devices[i] : NULL;
}

ksm_device *ksm_engine_find_device(const ksm_engine *e, const char *name)
{
    if (name == NULL) return NULL;
    for (int i = 0; i < e->n_devices; i++)
        if (strcmp(ksm_device_name(e->devices[i]), name) == 0) return e->devices[i];
    return NULL;
}

ksm_device *ksm_engine_default_device(const ksm_engine *e) { return e->default_device; }

ksm_allocator *ksm_engine_allocator(const ksm_engine *e, const ksm_device *d)
{
    for (int i = 0; i < e->n_devices; i++)
        if (e->devices[i] == d) return e->allocators[i];
    return NULL;
}

void ksm_engine_set_event_sink(ksm_engine *e, ksm_lifecycle_cb cb, void *ud)
{
    pthread_mutex_lock(&e->lock);
    e->event_cb = cb;
    e->event_ud = ud;
    pthread_mutex_unlock(&e->lock);
}

static const char *bp_lists[3][16];
static int bp_counts[3];
static pthread_once_t bp_once = PTHREAD_ONCE_INIT;

static void bp_init(void)
{
    for (int t = KSM_TOPOLOGY_CNN; t <= KSM_TOPOLOGY_TRANSFORMER; t++) {
        int k;
        const struct ksm_blueprint *const *l = ksm_blueprint_list((enum ksm_topology)t, &k);
        for (int i = 0; i < k && i < 16; i++) bp_lists[t][i] = l[i]->name;
        bp_counts[t] = k < 16 ? k : 16;
    }
}

int ksm_engine_blueprints(enum ksm_topology t, const char *const **names, int *n)
{
    if (t != KSM_TOPOLOGY_CNN && t != KSM_TOPOLOGY_TRANSFORMER) return KSM_EINVAL;
    pthread_once(&bp_once, bp_init);
    *names = bp_lists[t];
    *n = bp_counts[t];
    return 0;
}

static ksm_model *find_locked(ksm_engine *e, const char *id)
{
    for (size_t i = 0; i < e->n_models; i++)
        if (strcmp(e->models[i]->id, id) == 0) return e->models[i];
    return NULL;
}

int ksm_engine_model_create(ksm_engine *e, const char *id, const struct ksm_model_spec *spec,
                            ksm_model **out, char *err, size_t errlen)
{
    char auto_id[KSM_ID_MAX + 1];
    if (id != NULL && *id != '\0' && !ksm_id_valid(id, KSM_ID_MAX, NULL)) {
        ksm_errf(err, errlen, 0, "model_id must match [A-Za-z0-9_][A-Za-z0-9._-]{0,63}");
        return KSM_EINVAL;
    }
    if (spec == NULL) {
        ksm_errf(err, errlen, 0, "a model spec is required");
        return KSM_EINVAL;
    }
    pthread_mutex_lock(&e->lock);
    if (id == NULL || *id == '\0') {
        do
            snprintf(auto_id, sizeof auto_id, "model-%llu",
                     (unsigned long long)++e->next_model_number);
        while (find_locked(e, auto_id) != NULL);
        id = auto_id;
    }
    int rc = 0;
    if (find_locked(e, id) != NULL) {
        ksm_errf(err, errlen, 0, "model_id \"%s\" is already taken", id);
        rc = KSM_EEXIST;
    } else if (e->n_models >= e->max_models) {
        ksm_errf(err, errlen, 0, "the engine already holds max_models = %u models", e->max_models);
        rc = KSM_EMAXMODELS;
    }
    pthread_mutex_unlock(&e->lock);
    if (rc < 0) return rc;

    /* Build outside the registry lock (materialisation takes time), then insert. */
    ksm_model *m;
    rc = ksm_model_new_internal(e, id, spec, &m, err, errlen);
    if (rc < 0) return rc;
    pthread_mutex_lock(&e->lock);
    if (find_locked(e, id) != NULL) {
        ksm_errf(err, errlen, 0, "model_id \"%s\" is already taken", id);
        rc = KSM_EEXIST;
    } else if (e->n_models >= e->max_models) {
        ksm_errf(err, errlen, 0, "the engine already holds max_models = %u models", e->max_models);
        rc = KSM_EMAXMODELS;
    } else if (e->n_models == e->cap_models) {
        size_t cap = e->cap_models ? 2 * e->cap_models : 8;
        ksm_model **v = realloc(e->models, cap * sizeof *v);
        if (v == NULL)
            rc = KSM_ENOMEM;
        else {
            e->models = v;
            e->cap_models = cap;
        }
    }
    if (rc == 0) {
        e->models[e->n_models++] = m;
        ksm_model_ref(m);
    }
    pthread_mutex_unlock(&e->lock);
    if (rc < 0) {
        ksm_model_unref(m);
        return rc;
    }
    if (out)
        *out = m;
    else
        ksm_model_unref(m);
    return 0;
}

int ksm_engine_model_get(ksm_engine *e, const char *id, ksm_model **out)
{
    if (id == NULL) return KSM_ENOMODEL;
    pthread_mutex_lock(&e->lock);
    ksm_model *m = find_locked(e, id);
    if (m) ksm_model_ref(m);
    pthread_mutex_unlock(&e->lock);
    if (m == NULL) return KSM_ENOMODEL;
    *out = m;
    return 0;
}

int ksm_engine_model_delete(ksm_engine *e, const char *id, uint64_t *freed_bytes)
{
    if (id == NULL) return KSM_ENOMODEL;
    pthread_mutex_lock(&e->lock);
    ksm_model *m = NULL;
    for (size_t i = 0; i < e->n_models; i++) {
        if (strcmp(e->models[i]->id, id) == 0) {
            m = e->models[i];
            memmove(&e->models[i], &e->models[i + 1], (e->n_models - i - 1) * sizeof *e->models);
            e->n_models--;
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (m == NULL) return KSM_ENOMODEL;
    if (freed_bytes) {
        struct ksm_model_info info;
        ksm_model_get_info(m, &info);
        *freed_bytes = info.resident_bytes;
    }
    pthread_mutex_lock(&m->lock);
    m->deleted = true;
    pthread_mutex_unlock(&m->lock);
    ksm_model_unref(m);
    return 0;
}

int ksm_engine_model_list(ksm_engine *e, ksm_model ***out, size_t *n)
{
    pthread_mutex_lock(&e->lock);
    ksm_model **v = malloc((e->n_models ? e->n_models : 1) * sizeof *v);
    if (v == NULL) {
        pthread_mutex_unlock(&e->lock);
        return KSM_ENOMEM;
    }
    for (size_t i = 0; i < e->n_models; i++) {
        v[i] = e->models[i];
        ksm_model_ref(v[i]);
    }
    *n = e->n_models;
    pthread_mutex_unlock(&e->lock);
    *out = v;
    return 0;
}
