/* common/results: freeing the host buffers of the engine's result types (kasmina.h). The client
 * library returns the same types, so these live with the code both share, not in the engine. */
#include <stdlib.h>
#include <string.h>

#include "kasmina/kasmina.h"

void ksm_host_tensor_free(ksm_tensor *t)
{
    if (t) {
        free(t->data);
        t->data = NULL;
    }
}

void ksm_evaluate_result_free(struct ksm_evaluate_result *r)
{
    if (r == NULL) return;
    for (size_t i = 0; r->results != NULL && i < r->n; i++) free(r->results[i].logits.data);
    free(r->results);
    r->results = NULL;
    r->n = 0;
    free(r->shapley);
    r->shapley = NULL;
    r->n_shapley = 0;
    free(r->interactions);
    r->interactions = NULL;
    r->n_interactions = 0;
}

void ksm_load_result_free(struct ksm_load_result *r)
{
    if (r == NULL) return;
    for (size_t i = 0; i < r->n_loaded; i++) free(r->loaded[i]);
    for (size_t i = 0; i < r->n_missing; i++) free(r->missing[i]);
    for (size_t i = 0; i < r->n_unexpected; i++) free(r->unexpected[i]);
    free(r->loaded);
    free(r->missing);
    free(r->unexpected);
    memset(r, 0, sizeof *r);
}
