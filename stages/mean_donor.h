// mean_donor: the mean donor (donor kind "mean", docs/donors.md). Its keys, values and head outputs at a
// position are the mean over the run's prompts of the clean pass's, at the positions of the same group:
// the same token type, example index and offset inside the span (0 = the span's first token). A group
// takes the mean over the prompts that have it (a span of 3 tokens in some prompts, 2 in others: offset 2
// averages the prompts with 3). Every position of a prompt has a type, so every position has a group.
//
// Sums are float64, added prompt by prompt in prompt order and position order, over the stage's chunks of
// MEAN_CHUNK prompts (fixed: not the batch size); chunks are added in chunk order. The table is therefore
// the same bytes for any batch size, rank count or resume. Pure computation on caches; the mean stage
// (stages/mean_stage.c) stores the chunks' sums.
#ifndef EP_MEAN_DONOR_H
#define EP_MEAN_DONOR_H

#include <stdint.h>

#include "stages/patch.h"

#define MEAN_CHUNK 64

typedef struct {
    int32_t type, index, offset;
} mean_key;

// Sums per group: keys in first-seen order; k, v [n_keys][n_layers][kv_dim], z [n_keys][n_layers][z_dim].
typedef struct {
    int n_layers, kv_dim, z_dim;
    int n_keys, cap;
    mean_key *keys;
    int32_t *count;  // prompts that have the group
    double *k, *v, *z;
} mean_sums;

struct mean_table {
    int n_layers, kv_dim, z_dim;
    int n_keys;
    mean_key *keys;  // sorted by (type, index, offset)
    float *k, *v, *z;  // [n_keys][n_layers][dim]: the means
};

void mean_sums_init(mean_sums *s, int n_layers, int kv_dim, int z_dim);
void mean_sums_free(mean_sums *s);
// The group of every position of sequence s (offset: from the start of its run of equal type and index).
void mean_keys_of(const prompt_batch *pb, int s, mean_key *keys);
// Adds the batch's clean cache (sequence order, then positions): every layer's rows at every position.
int mean_sums_add(mean_sums *s, const kv_cache *clean, const prompt_batch *pb, ep_error *err);
// Adds another chunk's sums (its groups in its order).
void mean_sums_merge(mean_sums *into, const mean_sums *from);
// The means, groups sorted.
void mean_table_from_sums(const mean_sums *s, mean_table *t);
void mean_table_free(mean_table *t);
// Donor cache for the batch from the table: every position's group's means (backend memory as ops; the
// cache is initialised here, with head outputs). A group the table lacks is an error (prompts not of this
// run).
int mean_table_fill(const mean_table *t, const model_config *c, const kernel_ops *ops, const prompt_batch *pb,
                    kv_cache *donor, ep_error *err);

#endif
