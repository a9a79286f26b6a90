/* The error table of include/kasmina/errors.h. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kasmina/errors.h"

int ksm_errf(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

const char *ksm_strerror(int err)
{
    switch (err) {
    case 0: return "success";
#define KSM_XX_STR(name, val, msg)                                                                 \
    case KSM_##name: return msg;
        KSM_ERRNO_MAP(KSM_XX_STR)
#undef KSM_XX_STR
    default: return "unknown error";
    }
}

const char *ksm_err_name(int err)
{
    switch (err) {
    case 0: return "KSM_OK";
#define KSM_XX_NAME(name, val, msg)                                                                \
    case KSM_##name: return "KSM_" #name;
        KSM_ERRNO_MAP(KSM_XX_NAME)
#undef KSM_XX_NAME
    default: return "KSM_EUNKNOWN";
    }
}

int ksm_err_from_name(const char *name, int *err)
{
    if (name == NULL || err == NULL) return KSM_EINVAL;
    if (strcmp(name, "KSM_OK") == 0) {
        *err = 0;
        return 0;
    }
#define KSM_XX_PARSE(n, val, msg)                                                                  \
    if (strcmp(name, "KSM_" #n) == 0) {                                                            \
        *err = KSM_##n;                                                                            \
        return 0;                                                                                  \
    }
    KSM_ERRNO_MAP(KSM_XX_PARSE)
#undef KSM_XX_PARSE
    return KSM_EINVAL;
}
