/* io/persist_files: file helpers of the state directory and the spec file (persist_impl.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/journal.h"
#include "io/persist_impl.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/safetensors.h"
#include "kasmina/text.h"

/* Paths are bounded (the state directory at 3000 bytes, ids at 64) and every buffer has room for
 * them; messages may be cut, which is harmless. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* ---- files ---- */

/* A file operation's failure in words: the C library's sentence for an errno that has no KSM_E*
 * name (EFBIG, EDQUOT, EROFS, ...: "unknown error" would hide what happened), else
 * ksm_strerror's. */
const char *ksm_persist__io_reason(int rc)
{
    return rc < 0 && strcmp(ksm_err_name(rc), "KSM_EUNKNOWN") == 0 ? strerror(-rc)
                                                                   : ksm_strerror(rc);
}

/* The code a failed write of state answers: the disk-full class (no space, a quota, a file size
 * limit) is a resource running out, KSM_ENOSPC (RESOURCE_EXHAUSTED); anything else KSM_EIO. */
int ksm_persist__write_failure(int rc)
{
    return rc == -ENOSPC || rc == -EDQUOT || rc == -EFBIG ? KSM_ENOSPC : KSM_EIO;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *q = buf;
    while (len > 0) {
        ssize_t w = write(fd, q, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (w == 0) return KSM_EIO;
        q += w;
        len -= (size_t)w;
    }
    return 0;
}

int ksm_persist__fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = fsync(fd) != 0 ? -errno : 0;
    if (rc == KSM_EINVAL) rc = 0; /* a file system that cannot fsync a directory */
    close(fd);
    return rc;
}

/* Creates path with buf, fsynced (no rename: the caller commits the directory). Whatever was at
 * path (a temporary file a crash left, or a link planted there) is unlinked first, never written
 * through. */
int ksm_persist__write_file(const char *path, const void *buf, size_t len)
{
    if (unlink(path) != 0 && errno != ENOENT) return -errno;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    int rc = write_all(fd, buf, len);
    if (rc == 0 && fsync(fd) != 0) rc = -errno;
    close(fd);
    return rc;
}

/* dir/name replaced atomically: dir/.name.tmp, fsync, rename, fsync dir. */
int ksm_persist__replace_file(const char *dir, const char *name, const void *buf, size_t len)
{
    char tmp[4200], dst[4200];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    int rc = ksm_persist__write_file(tmp, buf, len);
    if (rc == 0 && rename(tmp, dst) != 0) rc = -errno;
    if (rc == 0) rc = ksm_persist__fsync_dir(dir);
    if (rc != 0) unlink(tmp);
    return rc;
}

/* The whole of the regular file open at fd (anything else, e.g. a FIFO planted in its place, is
 * KSM_EFORMAT rather than a read that never ends). */
int ksm_persist__read_fd(int fd, uint8_t **out, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    if (!S_ISREG(st.st_mode)) return KSM_EFORMAT;
    size_t n = (size_t)st.st_size, done = 0;
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL) return KSM_ENOMEM;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int rc = -errno;
            free(buf);
            return rc;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *out = buf;
    *len = done;
    return 0;
}

/* Why a read_fd / read_file_at failed, in words. */
const char *ksm_persist__read_reason(int rc)
{
    if (rc == -ELOOP) return "it is a symbolic link, which kasminad never follows in its state";
    if (rc == KSM_EFORMAT) return "it is not a regular file";
    return ksm_persist__io_reason(rc);
}

/* dfd/name, never through a symbolic link (-ELOOP) nor blocking on a FIFO. */
int ksm_persist__read_file_at(int dfd, const char *name, uint8_t **out, size_t *len)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = ksm_persist__read_fd(fd, out, len);
    close(fd);
    return rc;
}

/* Removes dfd/name, a flat directory of kasminad's (a model directory left by an interrupted
 * create or delete), without following any link: a symbolic link or other non-directory at name
 * is unlinked itself, never its target; inside, entries are unlinked (unlinkat never follows a
 * link) and a subdirectory, which kasminad never makes, is left alone with a warning. shown is
 * the path of dfd, for messages. */
void ksm_persist__remove_dir_at(int dfd, const char *name, const char *shown)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return;
    if (!S_ISDIR(st.st_mode)) {
        KSM_LOGW("persist", "%s/%s is %s, not a directory: unlinking it (never what it points to)",
                 shown, name, S_ISLNK(st.st_mode) ? "a symbolic link" : "a file");
        unlinkat(dfd, name, 0);
        return;
    }
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        if (fd >= 0) close(fd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        struct stat es;
        if (fstatat(fd, de->d_name, &es, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(es.st_mode)) {
            KSM_LOGW("persist", "leaving %s/%s/%s: a directory kasminad did not make", shown, name,
                     de->d_name);
            continue;
        }
        unlinkat(fd, de->d_name, 0);
    }
    closedir(d);
    unlinkat(dfd, name, AT_REMOVEDIR);
}

/* The model's directory (<id>.d), never through a symbolic link. -errno on failure. */
int ksm_persist__open_model_dir(const ksm_persist *p, const char *id)
{
    char name[KSM_ID_MAX + 3];
    snprintf(name, sizeof name, "%s.d", id);
    int fd = openat(p->models_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    return fd >= 0 ? fd : -errno;
}

int ksm_persist__mkdir_p(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = buf + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST) return -errno;
        *s = '/';
    }
    if (mkdir(buf, 0700) != 0 && errno != EEXIST) return -errno;
    return 0;
}

void ksm_persist__model_dir(const ksm_persist *p, const char *id, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s.d", p->models, id);
}

/* ---- the spec file ---- */

char *ksm_persist__spec_json(ksm_model *m, const struct ksm_model_spec *spec, uint64_t seq)
{
    struct ksm_model_info *info = malloc(sizeof *info);
    if (info == NULL || ksm_model_get_info(m, info) != 0) {
        free(info);
        return NULL;
    }
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)spec->init_seed);
    json_t *slots = json_array();
    for (int i = 0; i < info->n_slots; i++)
        json_array_append_new(slots, json_string(info->slots[i].slot_id));
    json_t *o = json_pack(
        "{s:i, s:s, s:I, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:I, s:I, s:I, s:I, s:I, s:I, "
        "s:f}, s:o, s:s, s:b, s:I}",
        "version", 1, "model_id", info->model_id, "seq", (json_int_t)seq, "topology",
        ksm_topology_name(info->topology), "cnn", "num_classes", (json_int_t)info->cnn.num_classes,
        "n_blocks", (json_int_t)info->cnn.n_blocks, "base_channels",
        (json_int_t)info->cnn.base_channels, "pool_layers", (json_int_t)info->cnn.pool_layers,
        "kernel_size", (json_int_t)info->cnn.kernel_size, "in_channels",
        (json_int_t)info->cnn.in_channels, "transformer", "vocab_size",
        (json_int_t)info->transformer.vocab_size, "n_embd", (json_int_t)info->transformer.n_embd,
        "n_head", (json_int_t)info->transformer.n_head, "n_layer",
        (json_int_t)info->transformer.n_layer, "block_size",
        (json_int_t)info->transformer.block_size, "num_segments",
        (json_int_t)info->transformer.num_segments, "dropout", info->transformer.dropout, "slots",
        slots, "init_seed", seed, "permissive_gates", info->permissive_gates, "auto_forward_gates",
        (json_int_t)info->auto_forward_gates);
    free(info);
    if (o == NULL) return NULL;
    char *s = json_dumps(o, JSON_INDENT(1));
    json_decref(o);
    return s;
}

/* The model directory dfd's spec.json (path: its path, for messages). */
int ksm_persist__spec_parse(int dfd, const char *path, struct saved_spec *ss, char *err,
                            size_t errlen)
{
    uint8_t *text = NULL;
    size_t len = 0;
    int rc = ksm_persist__read_file_at(dfd, "spec.json", &text, &len);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "cannot read %s: %s", path, ksm_persist__read_reason(rc));
        return rc;
    }
    json_error_t je;
    json_t *o = json_loadb((const char *)text, len, 0, &je);
    free(text);
    if (o == NULL) {
        ksm_errf(err, errlen, 0, "%s is not valid JSON: %s (line %d)", path, je.text, je.line);
        return KSM_EFORMAT;
    }
    memset(ss, 0, sizeof *ss);
    const char *id = NULL, *topo = NULL, *seed = NULL;
    json_int_t ver = 0, seq = 0, c[6] = {0}, t[6] = {0}, afg = 0;
    double dropout = -1.0; /* absent (a spec written before it was recorded): the default */
    int perm = 0;
    json_t *slots = NULL;
    rc = json_unpack_ex(
        o, &je, JSON_STRICT,
        "{s:I, s:s, s:I, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:I, s:I, s:I, s:I, s:I, s:I, "
        "s?F}, s:o, s:s, s:b, s:I}",
        "version", &ver, "model_id", &id, "seq", &seq, "topology", &topo, "cnn", "num_classes",
        &c[0], "n_blocks", &c[1], "base_channels", &c[2], "pool_layers", &c[3], "kernel_size",
        &c[4], "in_channels", &c[5], "transformer", "vocab_size", &t[0], "n_embd", &t[1], "n_head",
        &t[2], "n_layer", &t[3], "block_size", &t[4], "num_segments", &t[5], "dropout", &dropout,
        "slots", &slots, "init_seed", &seed, "permissive_gates", &perm, "auto_forward_gates", &afg);
    if (rc != 0 || ver != 1 || !json_is_array(slots) || json_array_size(slots) > KSM_MAX_SLOTS ||
        strlen(id) > KSM_ID_MAX) {
        ksm_errf(err, errlen, 0, "%s is not a kasmina model spec (version 1): %s", path,
                 rc ? je.text : "bad value");
        json_decref(o);
        return KSM_EFORMAT;
    }
    snprintf(ss->id, sizeof ss->id, "%s", id);
    ss->seq = (uint64_t)seq;
    ss->spec.topology = !strcmp(topo, "transformer") ? KSM_TOPOLOGY_TRANSFORMER : KSM_TOPOLOGY_CNN;
    ss->spec.cnn = (struct ksm_cnn_spec){(uint32_t)c[0], (uint32_t)c[1], (uint32_t)c[2],
                                         (int32_t)c[3],  (uint32_t)c[4], (uint32_t)c[5]};
    ss->spec.pool_layers_set = true;
    ss->spec.transformer = (struct ksm_transformer_spec){.vocab_size = (uint32_t)t[0],
                                                         .n_embd = (uint32_t)t[1],
                                                         .n_head = (uint32_t)t[2],
                                                         .n_layer = (uint32_t)t[3],
                                                         .block_size = (uint32_t)t[4],
                                                         .num_segments = (uint32_t)t[5],
                                                         .dropout = dropout,
                                                         .dropout_set = dropout >= 0.0};
    for (size_t i = 0; i < json_array_size(slots); i++) {
        const char *s = json_string_value(json_array_get(slots, i));
        snprintf(ss->slots[i], sizeof ss->slots[i], "%s", s ? s : "");
        ss->slot_ptrs[i] = ss->slots[i];
    }
    ss->spec.slots = ss->slot_ptrs;
    ss->spec.n_slots = (int)json_array_size(slots);
    ss->spec.dtype = KSM_DTYPE_F32;
    ss->spec.init_seed = strtoull(seed, NULL, 10);
    ss->spec.permissive_gates = perm != 0;
    ss->spec.auto_forward_gates = (unsigned)afg;
    json_decref(o);
    return 0;
}
