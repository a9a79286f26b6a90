/*
 * notify: service-manager notifications for kasminad (systemd Type=notify, sd_notify(3)).
 *
 * Built against libsystemd when pkg-config finds it (KSM_HAVE_SYSTEMD); otherwise every call is
 * a no-op, so the daemon builds and runs the same without it. Without NOTIFY_SOCKET in the
 * environment (not started by systemd) the calls do nothing either.
 *
 *   ksm_notify_ready     READY=1 + STATUS=, once the listeners accept calls and models are
 *                        restored
 *   ksm_notify_stopping  STOPPING=1 at drain start (SIGTERM/SIGINT)
 *   ksm_notify_watchdog  WATCHDOG=1, from a loop timer at half of ksm_notify_watchdog_usec()
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* True when kasminad was built with libsystemd. */
bool ksm_notify_supported(void);
void ksm_notify_ready(const char *status);
void ksm_notify_stopping(void);
void ksm_notify_watchdog(void);
/* The watchdog interval the service manager asked for (WATCHDOG_USEC, honouring WATCHDOG_PID),
 * in microseconds; 0 when no watchdog is wanted or libsystemd is absent. */
uint64_t ksm_notify_watchdog_usec(void);

#ifdef __cplusplus
}
#endif
