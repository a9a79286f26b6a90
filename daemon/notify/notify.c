/*
 * notify: sd_notify(3) wrappers; see notify.h. The environment is kept (unset_environment = 0)
 * because kasminad sends more than one message over its lifetime.
 */
#include "notify/notify.h"

#include <stdio.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"

#ifdef KSM_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>

static void notify_send(const char *msg)
{
    int rc = sd_notify(0, msg);
    if (rc < 0) KSM_LOGW("notify", "sd_notify(\"%s\") failed: %s", msg, ksm_strerror(rc));
}

bool ksm_notify_supported(void) { return true; }

void ksm_notify_ready(const char *status)
{
    char msg[512];
    snprintf(msg, sizeof msg, "READY=1\nSTATUS=%s", status != NULL ? status : "ready");
    notify_send(msg);
}

void ksm_notify_stopping(void) { notify_send("STOPPING=1\nSTATUS=draining calls in flight"); }

void ksm_notify_watchdog(void) { notify_send("WATCHDOG=1"); }

uint64_t ksm_notify_watchdog_usec(void)
{
    uint64_t usec = 0;
    return sd_watchdog_enabled(0, &usec) > 0 ? usec : 0;
}

#else

bool ksm_notify_supported(void) { return false; }
void ksm_notify_ready(const char *status) { (void)status; }
void ksm_notify_stopping(void) {}
void ksm_notify_watchdog(void) {}
uint64_t ksm_notify_watchdog_usec(void) { return 0; }

#endif
