/*
 * GEMM throughput of the CPU backend: ksm_op_gemm on a stream (OpenBLAS underneath), each
 * iteration synchronized, as torch.matmul is synchronous. Prints the OpenBLAS kernels, then
 * one line per size:
 *     info openblas_core=SkylakeX
 *     gemm n=1024 median_ms=14.21 gflops=151.1
 * Usage: bench_gemm [reps] [sizes...]   (defaults: 7 reps; 256 512 1024 2048)
 */
#include <stdio.h>
#include <stdlib.h>

#include "bench_common.h"
#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    int default_sizes[] = {256, 512, 1024, 2048};
    int nsizes = argc > 2 ? argc - 2 : 4;
    if (reps < 1) reps = 1;

    ksm_backend *cpu;
    CHECK(ksm_cpu_backend_new(1, &cpu));
    printf("info openblas_core=%s\n", ksm_cpu_backend_blas_core()); /* for run.sh */
    ksm_device *dev = ksm_backend_device(cpu, 0);
    ksm_allocator *al;
    CHECK(ksm_allocator_new(dev, NULL, &al));
    ksm_stream *s;
    CHECK(ksm_stream_new(dev, &s));

    for (int si = 0; si < nsizes; si++) {
        int n = argc > 2 ? atoi(argv[2 + si]) : default_sizes[si];
        size_t bytes = (size_t)n * n * sizeof(float);
        void *pa, *pb, *pc;
        CHECK(ksm_alloc_malloc(al, bytes, s, &pa));
        CHECK(ksm_alloc_malloc(al, bytes, s, &pb));
        CHECK(ksm_alloc_malloc(al, bytes, s, &pc));
        float *host = malloc(bytes);
        bench_fill(host, (size_t)n * n, 1);
        CHECK(ksm_stream_memcpy_async(s, pa, host, bytes, KSM_COPY_H2D));
        CHECK(ksm_stream_memcpy_async(s, pb, host, bytes, KSM_COPY_H2D));
        CHECK(ksm_stream_synchronize(s));
        ksm_tensor A, B, C;
        int64_t shape[] = {n, n};
        ksm_tensor_init(&A, dev, pa, KSM_DTYPE_F32, 2, shape);
        ksm_tensor_init(&B, dev, pb, KSM_DTYPE_F32, 2, shape);
        ksm_tensor_init(&C, dev, pc, KSM_DTYPE_F32, 2, shape);

        /* Warm up, then enough inner iterations for ~50 ms per sample. */
        CHECK(ksm_op_gemm(s, &C, &A, &B, false, false, 1.0f, 0.0f));
        CHECK(ksm_stream_synchronize(s));
        double t0 = bench_now();
        CHECK(ksm_op_gemm(s, &C, &A, &B, false, false, 1.0f, 0.0f));
        CHECK(ksm_stream_synchronize(s));
        double one = bench_now() - t0;
        int inner = one > 0.05 ? 1 : (int)(0.05 / (one > 1e-6 ? one : 1e-6)) + 1;

        double *ms = calloc((size_t)reps, sizeof *ms);
        for (int r = 0; r < reps; r++) {
            t0 = bench_now();
            for (int i = 0; i < inner; i++) {
                CHECK(ksm_op_gemm(s, &C, &A, &B, false, false, 1.0f, 0.0f));
                CHECK(ksm_stream_synchronize(s));
            }
            ms[r] = (bench_now() - t0) * 1e3 / inner;
        }
        double med = bench_median(ms, reps);
        printf("gemm n=%d median_ms=%.3f gflops=%.1f\n", n, med,
               2.0 * n * (double)n * n / (med * 1e-3) / 1e9);
        fflush(stdout);
        free(ms);
        free(host);
        ksm_alloc_free(al, pa);
        ksm_alloc_free(al, pb);
        ksm_alloc_free(al, pc);
    }
    ksm_stream_free(s);
    ksm_allocator_destroy(al);
    ksm_backend_free(cpu);
    return 0;
}
