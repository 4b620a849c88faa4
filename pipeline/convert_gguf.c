#include "convert_gguf.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/gguf.h"
#include "pipeline/model.h"
#include "pipeline/safetensors.h"

// Closes f after flushing it to disk; returns -1 with the path named on any failure.
static int close_synced(FILE *f, const char *path, ep_error *err) {
    int ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    int saved = errno;
    ok = (fclose(f) == 0) && ok;
    if (!ok) return ep_fail(err, "%s: cannot write: %s", path, strerror(saved ? saved : errno));
    return 0;
}

// Removes the temporary folder's files (only plain files are ever written there) and the folder.
static void remove_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[4200];
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    closedir(d);
    rmdir(dir);
}

static int token_id(const gguf_file *g, const char *key, int64_t vocab, int64_t *id, ep_error *err) {
    if (gguf_get_int(g, key, 0, -1, id, err)) return -1;
    if (*id < -1 || *id >= vocab)
        return ep_fail(err, "%s: metadata '%s': id %lld outside the vocabulary of %lld", g->path, key, (long long)*id,
                       (long long)vocab);
    return 0;
}

static int write_config(const gguf_file *g, const gguf_llama_hparams *hp, int tied, const char *path, ep_error *err) {
    int64_t bos, eos;
    if (token_id(g, "tokenizer.ggml.bos_token_id", hp->vocab_size, &bos, err) ||
        token_id(g, "tokenizer.ggml.eos_token_id", hp->vocab_size, &eos, err))
        return -1;
    json_t *c = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", "LlamaForCausalLM"));
    json_object_set_new(c, "model_type", json_string("llama"));
    json_object_set_new(c, "vocab_size", json_integer(hp->vocab_size));
    json_object_set_new(c, "hidden_size", json_integer(hp->hidden));
    json_object_set_new(c, "intermediate_size", json_integer(hp->intermediate));
    json_object_set_new(c, "num_hidden_layers", json_integer(hp->n_layers));
    json_object_set_new(c, "num_attention_heads", json_integer(hp->n_heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(hp->n_kv_heads));
    json_object_set_new(c, "head_dim", json_integer(hp->hidden / hp->n_heads));
    json_object_set_new(c, "max_position_embeddings", json_integer(hp->context_length));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    // GGUF stores eps and theta as f32; the f32 value is what both HF and edgepatch compute with.
    json_object_set_new(c, "rms_norm_eps", json_real(hp->rms_eps));
    json_object_set_new(c, "rope_theta", json_real(hp->rope_theta));
    json_object_set_new(c, "rope_scaling", json_null());
    json_object_set_new(c, "attention_bias", json_false());
    json_object_set_new(c, "mlp_bias", json_false());
    json_object_set_new(c, "tie_word_embeddings", json_boolean(tied));
    json_object_set_new(c, "bos_token_id", bos >= 0 ? json_integer(bos) : json_null());
    json_object_set_new(c, "eos_token_id", eos >= 0 ? json_integer(eos) : json_null());
    json_object_set_new(c, "torch_dtype", json_string("float32"));
    json_object_set_new(c, "converted_from", json_string("gguf (edgepatch convert-gguf)"));
    char *text = json_dumps(c, JSON_INDENT(2) | JSON_REAL_PRECISION(9));
    json_decref(c);
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(text);
        return ep_fail(err, "%s: cannot create: %s", path, strerror(errno));
    }
    int ok = fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    free(text);
    if (!ok) {
        fclose(f);
        return ep_fail(err, "%s: cannot write: %s", path, strerror(errno));
    }
    return close_synced(f, path, err);
}

static int write_weights(const gguf_file *g, const gguf_llama_hparams *hp, const char *path, convert_gguf_stats *stats,
                         ep_error *err) {
    int n = g->n_tensors;
    st_write_entry *entries = ep_calloc((size_t)n, sizeof(st_write_entry));
    char (*names)[128] = ep_calloc((size_t)n, sizeof *names);
    int rc = 0;
    int64_t largest = 1;
    // Names and shapes first: the header precedes the data.
    for (int i = 0; i < n && !rc; i++) {
        const gguf_tensor *t = &g->tensors[i];
        int heads;
        if (gguf_llama_hf_name(t->name, hp, names[i], sizeof names[i], &heads, err)) {
            rc = ep_wrap(err, "%s", g->path);
            break;
        }
        if (!gguf_type_supported(t->type)) {
            const char *tn = gguf_type_name(t->type);
            rc = ep_fail(err, "%s: tensor '%s': ggml type %s is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                         g->path, t->name, tn ? tn : "?");
            break;
        }
        entries[i].name = names[i];
        entries[i].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) entries[i].shape[d] = t->ne[t->ndim - 1 - d];
        if (t->numel > largest) largest = t->numel;
        const char *tn = gguf_type_name(t->type);
        if (!strstr(stats->types, tn) && strlen(stats->types) + strlen(tn) + 2 < sizeof stats->types)
            snprintf(stats->types + strlen(stats->types), sizeof stats->types - strlen(stats->types), "%s%s",
                     stats->types[0] ? " " : "", tn);
        stats->n_params += t->numel;
    }
    FILE *f = NULL;
    if (!rc && !(f = fopen(path, "wb"))) rc = ep_fail(err, "%s: cannot create: %s", path, strerror(errno));
    if (!rc) rc = safetensors_write_header(f, path, entries, n, err);
    float *buf = rc ? NULL : ep_malloc(sizeof(float) * (size_t)largest);
    for (int i = 0; i < n && !rc; i++) {
        const gguf_tensor *t = &g->tensors[i];
        char hf[128];
        int64_t shape[GGUF_MAX_DIMS];
        int ndim;
        rc = gguf_read_hf_tensor(g, t, hp, hf, sizeof hf, shape, &ndim, buf, err);
        if (!rc && fwrite(buf, sizeof(float), (size_t)t->numel, f) != (size_t)t->numel)
            rc = ep_fail(err, "%s: cannot write tensor '%s': %s", path, hf, strerror(errno));
        stats->n_tensors++;
    }
    free(buf);
    if (f) {
        if (!rc) stats->bytes_written = ftell(f);
        if (rc) fclose(f);
        else rc = close_synced(f, path, err);
    }
    free(entries);
    free(names);
    return rc;
}

int convert_gguf(const char *gguf_path, const char *out_dir, convert_gguf_stats *stats, ep_error *err) {
    memset(stats, 0, sizeof *stats);
    struct stat sb;
    if (stat(out_dir, &sb) == 0)
        return ep_fail(err, "%s: already exists; convert-gguf never overwrites a folder (remove it first)", out_dir);
    gguf_file g;
    gguf_llama_hparams hp;
    if (gguf_open_file(gguf_path, &g, err)) return -1;
    if (gguf_llama_hparams_read(&g, &hp, err)) {
        gguf_close(&g);
        return -1;
    }
    char tmp[4096], path[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld", out_dir, (long)getpid());
    remove_tmp(tmp);  // a leftover of a killed run with the same pid
    if (mkdir(tmp, 0755) != 0) {
        int e = errno;
        gguf_close(&g);
        return ep_fail(err, "%s: cannot create: %s", tmp, strerror(e));
    }
    int tied = gguf_find_tensor(&g, "output.weight") == NULL;
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    int rc = write_weights(&g, &hp, path, stats, err);
    snprintf(path, sizeof path, "%s/config.json", tmp);
    if (!rc) rc = write_config(&g, &hp, tied, path, err);
    gguf_close(&g);
    // The written folder must load as a model (every tensor present with the shape config.json implies)
    // before it gets its final name.
    if (!rc) {
        model m;
        if (model_load(tmp, &m, err)) rc = ep_wrap(err, "converted folder does not load");
        else model_free(&m);
    }
    if (!rc) {
        DIR *d = opendir(tmp);
        if (d) {
            fsync(dirfd(d));
            closedir(d);
        }
        if (rename(tmp, out_dir) != 0) rc = ep_fail(err, "%s: cannot rename to %s: %s", tmp, out_dir, strerror(errno));
    }
    if (rc) remove_tmp(tmp);
    return rc;
}
