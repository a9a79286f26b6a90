/* The README's embedding example, built and run by ctest so that it keeps working. */
#include <stdio.h>
#include <kasmina/alloc.h>
#include <kasmina/backend.h>
#include <kasmina/errors.h>
#include <kasmina/ops.h>

int main(void)
{
    ksm_backend *cpu;
    ksm_cpu_backend_new(1, &cpu);                      /* or ksm_cuda_backend_load(...) */
    ksm_device *dev = ksm_backend_device(cpu, 0);
    ksm_allocator *al;
    ksm_allocator_new(dev, NULL, &al);
    ksm_stream *s;
    ksm_stream_new(dev, &s);

    float host_x[6] = {-2, -1, 0, 1, 2, 3}, host_y[6];
    int64_t shape[] = {2, 3};
    ksm_tensor x, y;
    void *px, *py;
    ksm_alloc_malloc(al, sizeof host_x, s, &px);       /* stream-ordered, cached */
    ksm_alloc_malloc(al, sizeof host_y, s, &py);
    ksm_tensor_init(&x, dev, px, KSM_DTYPE_F32, 2, shape);
    ksm_tensor_init(&y, dev, py, KSM_DTYPE_F32, 2, shape);

    ksm_stream_memcpy_async(s, px, host_x, sizeof host_x, KSM_COPY_H2D);
    int rc = ksm_op_gelu(s, &y, &x);                   /* validated, then enqueued */
    if (rc != 0) fprintf(stderr, "gelu: %s\n", ksm_strerror(rc));
    ksm_stream_memcpy_async(s, host_y, py, sizeof host_y, KSM_COPY_D2H);
    rc = ksm_stream_synchronize(s);                    /* the stream's sticky error, if any */
    printf("gelu(3) = %f (%s)\n", host_y[5], ksm_err_name(rc));

    ksm_alloc_free(al, px);
    ksm_alloc_free(al, py);
    struct ksm_mem_stats st;
    ksm_alloc_get_stats(al, &st);
    printf("reserved %lld bytes, %llu cache hits\n",
           (long long)st.pool[KSM_POOL_ALL].reserved_bytes.current,
           (unsigned long long)st.cache_hits);
    ksm_stream_free(s);
    ksm_allocator_destroy(al);
    ksm_backend_free(cpu);
    return 0;
}
