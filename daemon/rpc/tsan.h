/*
 * rpc/tsan: happens-before annotations for ThreadSanitizer at the hand-offs through gRPC.
 *
 * The server's completion-queue tags (struct rpc_tag, inside a call's state) are given to gRPC
 * by one thread (a worker, the event hub, the CQ thread itself) and handed back by
 * grpc_completion_queue_next on the CQ thread. gRPC orders that hand-off inside Debian's libgrpc
 * and abseil, which are not built with ThreadSanitizer, so TSan sees no ordering between what
 * the first thread wrote and what the CQ thread reads (or frees). KSM_TSAN_RELEASE(tag) after
 * the giving thread's last access to the call's state, just before the gRPC call that takes the
 * tag, and KSM_TSAN_ACQUIRE(tag) right after the completion queue returns it state that edge.
 * (The client needs none: it plucks each tag on the thread that started the batch.) Both are
 * no-ops unless the build is ThreadSanitizer's (KASMINA_SANITIZE=thread).
 */
#pragma once

#if defined(__SANITIZE_THREAD__)
#define KSM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KSM_TSAN 1
#endif
#endif

#ifdef KSM_TSAN
#include <sanitizer/tsan_interface.h>
#define KSM_TSAN_RELEASE(tag) __tsan_release((void *)(tag))
#define KSM_TSAN_ACQUIRE(tag) __tsan_acquire((void *)(tag))
#else
#define KSM_TSAN_RELEASE(tag) ((void)(tag))
#define KSM_TSAN_ACQUIRE(tag) ((void)(tag))
#endif
