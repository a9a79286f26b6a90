/*
 * io/persist's registry under concurrency: ksm_persist_lock looks a model up under the registry
 * lock (is there a committed directory?) while DeleteModel's two halves flip that state under the
 * model's own lock (delete_begin renames <id>.d away, delete_end(false) renames it back, as when
 * the engine refuses the delete). Readers lock the model and an absent id from three threads, one
 * thread deletes and un-deletes 200 times. Under ThreadSanitizer any unordered access to that
 * state is a report (exit 66); in every build the model directory must end where it began.
 *     tsan_persist
 */
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/persist.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "tsan_check.h"

#define READERS 3
#define ROUNDS  200

static ksm_persist *persist;
static atomic_int done;

static void *deleter(void *arg)
{
    (void)arg;
    char err[256];
    for (int i = 0; i < ROUNDS; i++) {
        ksm_persist_model *pm;
        CHECK_OK(ksm_persist_lock(persist, "p", &pm));
        int rc = ksm_persist_delete_begin(pm, err, sizeof err);
        CHECK(rc == 0, "delete_begin: %s", err);
        ksm_persist_delete_end(pm, false); /* the engine refused: the directory comes back */
        ksm_persist_unlock(pm);
    }
    atomic_store(&done, 1);
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    while (!atomic_load(&done)) {
        ksm_persist_model *pm;
        CHECK_OK(ksm_persist_lock(persist, "p", &pm));
        ksm_persist_unlock(pm);
        CHECK_OK(ksm_persist_lock(persist, "absent", &pm));
        ksm_persist_unlock(pm);
    }
    return NULL;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

int main(void)
{
    ksm_log_set_level(KSM_LOG_WARN);
    char dir[] = "/tmp/tsan_persist.XXXXXX", err[512] = "";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    struct ksm_engine_config ec = {.cpu_devices = 1};
    ksm_engine *engine;
    CHECK_OK(ksm_engine_new(&ec, &engine, err, sizeof err));
    struct ksm_persist_config pc = {.dir = dir};
    int rc = ksm_persist_open(&pc, &persist, err, sizeof err);
    CHECK(rc == 0, "open: %s", err);
    CHECK_OK(ksm_persist_restore(persist, engine, NULL, err, sizeof err));
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .cnn = {.base_channels = 4, .num_classes = 5},
                                  .init_seed = 1};
    ksm_model *m;
    ksm_persist_create_begin(persist);
    CHECK_OK(ksm_engine_model_create(engine, "p", &spec, &m, err, sizeof err));
    rc = ksm_persist_created(persist, m, &spec, err, sizeof err);
    ksm_persist_create_end(persist);
    CHECK(rc == 0, "created: %s", err);

    pthread_t th[READERS + 1];
    for (int i = 0; i < READERS; i++) CHECK_OK(pthread_create(&th[i], NULL, reader, NULL));
    CHECK_OK(pthread_create(&th[READERS], NULL, deleter, NULL));
    for (int i = 0; i <= READERS; i++) CHECK_OK(pthread_join(th[i], NULL));

    char path[600];
    struct stat st;
    snprintf(path, sizeof path, "%s/models/p.d/journal", dir);
    CHECK(stat(path, &st) == 0, "%s is back after %d refused deletions", path, ROUNDS);
    snprintf(path, sizeof path, "%s/models/.p.del", dir);
    CHECK(stat(path, &st) != 0, "%s is gone", path);
    ksm_model_unref(m);
    CHECK_OK(ksm_engine_model_delete(engine, "p", NULL));
    ksm_persist_close(persist);
    ksm_engine_free(engine);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("tsan_persist: %d refused deletions against %d lookup threads ok\n", ROUNDS, READERS);
    return 0;
}
