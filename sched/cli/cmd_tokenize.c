// edgepatch tokenize-text: encodes text with a tokenizer directory and prints ids and pieces, decodes a
// list of ids, or encodes every line of a file (--file) with one tokenizer load. Special tokens (BOS from
// the post-processor) are added on encode, and kept on decode, only with --special.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/error.h"
#include "pipeline/tokenizer.h"

static const char usage_text[] =
    "usage: edgepatch tokenize-text --tokenizer DIR [--special] [--json] -- TEXT\n"
    "       edgepatch tokenize-text --tokenizer DIR [--special] [--json] --decode 1,2,3\n"
    "       edgepatch tokenize-text --tokenizer DIR [--special] [--jsonl] [--pieces] --file F\n"
    "\n"
    "Encodes TEXT with DIR/tokenizer.json (or tokenizer.json.gz) and prints the ids and their pieces;\n"
    "--decode turns ids back into text. --special adds the post-processor's special tokens (BOS) when\n"
    "encoding and keeps special tokens when decoding. --json prints {\"ids\": [...], \"pieces\": [...]}\n"
    "(or {\"text\": ...} for --decode).\n"
    "\n"
    "--file F encodes every line of F (- for stdin) with one tokenizer load and prints one JSON line per\n"
    "input line, in order: {\"ids\": [...]}, plus \"pieces\" with --pieces. A line is the bytes before its\n"
    "newline (a CR before it stays part of the text). With --jsonl each line is instead one JSON value: a\n"
    "string, or an object whose string field \"text\" is the text (other fields are ignored); use it for\n"
    "texts that hold newlines. The whole input is checked before anything is printed. Options also take\n"
    "the --opt=value form.\n";

static void print_quoted(const char *s) {  // a piece as a JSON string, so spaces and newlines show
    json_t *j = json_string(s);
    char *q = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
    fputs(q ? q : "\"?\"", stdout);
    free(q);
    json_decref(j);
}

static int fail(const char *msg) {
    fprintf(stderr, "edgepatch tokenize-text: %s\n", msg);
    return 1;
}

// ---- --file

typedef struct {
    char *text;  // owned copy (JSONL) or a pointer into the input buffer (plain)
    size_t len;
    int owned;
    int *ids;
    int n_ids;
} input_line;

typedef struct {
    input_line *v;
    size_t n, cap;
} line_list;

static void lines_free(line_list *l) {
    for (size_t i = 0; i < l->n; i++) {
        if (l->v[i].owned) free(l->v[i].text);
        free(l->v[i].ids);
    }
    free(l->v);
}

// Reads all of path ("-": stdin) into a fresh NUL-terminated buffer.
static char *read_input(const char *path, const char *shown, size_t *len, ep_error *err) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) {
        ep_fail(err, "%s: cannot open", shown);
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *data = ep_malloc(cap);
    for (;;) {
        if (n + 1 >= cap) data = ep_realloc(data, cap *= 2);
        size_t got = fread(data + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    if (f != stdin) fclose(f);
    if (bad) {
        free(data);
        ep_fail(err, "%s: read error", shown);
        return NULL;
    }
    data[n] = 0;
    *len = n;
    return data;
}

// The text of one JSONL line: a JSON string, or an object with a string "text".
static int jsonl_text(const char *line, size_t len, const char *shown, size_t line_no, input_line *out, ep_error *err) {
    if (strspn(line, " \t\r") >= len)  // so that output line N is always input line N's
        return ep_fail(err, "%s:%zu: an empty line (with --jsonl every line is one JSON value)", shown, line_no);
    json_error_t je;
    json_t *v = json_loadb(line, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (!v) return ep_fail(err, "%s:%zu: malformed JSON at column %d: %s", shown, line_no, je.column, je.text);
    json_t *s = json_is_object(v) ? json_object_get(v, "text") : v;
    if (!json_is_string(s)) {
        json_decref(v);
        return ep_fail(err, "%s:%zu: expected a JSON string or an object with a string \"text\" field", shown, line_no);
    }
    out->len = json_string_length(s);
    out->text = ep_malloc(out->len + 1);
    memcpy(out->text, json_string_value(s), out->len + 1);
    out->owned = 1;
    json_decref(v);
    return 0;
}

// Splits data into lines (the last one may lack its newline) and, for JSONL, reads each line's text.
static int split_lines(char *data, size_t len, int jsonl, const char *shown, line_list *out, ep_error *err) {
    size_t pos = 0, line_no = 0;
    while (pos < len) {
        char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - data) : len;
        line_no++;
        if (out->n == out->cap) {
            out->cap = out->cap ? out->cap * 2 : 256;
            out->v = ep_realloc(out->v, sizeof *out->v * out->cap);
        }
        input_line *l = &out->v[out->n];
        memset(l, 0, sizeof *l);
        if (jsonl) {
            if (jsonl_text(data + pos, end - pos, shown, line_no, l, err)) return -1;
        } else {
            l->text = data + pos;
            l->len = end - pos;
        }
        out->n++;
        pos = end + 1;
    }
    return 0;
}

static void print_json_string(const char *s) {
    json_t *j = json_string(s);
    char *q = j ? json_dumps(j, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    fputs(q ? q : "null", stdout);
    free(q);
    json_decref(j);
}

static int encode_file(const char *dir, const char *path, int jsonl, int special, int pieces) {
    const char *shown = strcmp(path, "-") ? path : "stdin";
    ep_error err = {{0}};
    size_t len = 0;
    char *data = read_input(path, shown, &len, &err);
    if (!data) return fail(err.msg);
    line_list lines = {0};
    tokenizer *tok = NULL;
    int rc = 0;
    // Input first (cheap and the likeliest mistake), then one load, then every encode, and only then output:
    // bad input prints nothing.
    if (split_lines(data, len, jsonl, shown, &lines, &err) || tokenizer_load(dir, &tok, &err)) {
        rc = fail(err.msg);
        goto done;
    }
    for (size_t i = 0; i < lines.n; i++) {
        input_line *l = &lines.v[i];
        if (tokenizer_encode(tok, l->text, l->len, special, &l->ids, &l->n_ids, &err)) {
            char msg[sizeof err.msg + 64];
            snprintf(msg, sizeof msg, "%s:%zu: %s", shown, i + 1, err.msg);
            rc = fail(msg);
            goto done;
        }
    }
    for (size_t i = 0; i < lines.n; i++) {
        const input_line *l = &lines.v[i];
        fputs("{\"ids\":[", stdout);
        for (int k = 0; k < l->n_ids; k++) printf(k ? ",%d" : "%d", l->ids[k]);
        putchar(']');
        if (pieces) {
            fputs(",\"pieces\":[", stdout);
            for (int k = 0; k < l->n_ids; k++) {
                if (k) putchar(',');
                print_json_string(tokenizer_piece(tok, l->ids[k]));
            }
            putchar(']');
        }
        fputs("}\n", stdout);
    }
    if (fflush(stdout)) rc = fail("stdout: write error");
done:
    tokenizer_free(tok);
    lines_free(&lines);
    free(data);
    return rc;
}

// ---- one text or one id list

static int encode_or_decode(const char *dir, const char *text, const char *decode, int special, int as_json) {
    ep_error err = {{0}};
    int *ids = NULL, n = 0;
    if (decode) {
        char msg[256];
        if (cli_parse_int_list(decode, &ids, &n, msg, sizeof msg)) {
            fprintf(stderr, "edgepatch tokenize-text: --decode: %s\n", msg);
            return 2;
        }
    }
    tokenizer *tok;
    if (tokenizer_load(dir, &tok, &err)) {
        free(ids);
        return fail(err.msg);
    }
    int rc = 0;
    if (decode) {
        char *out;
        size_t out_len;
        if (tokenizer_decode(tok, ids, n, !special, &out, &out_len, &err)) {
            rc = fail(err.msg);
        } else {
            if (as_json) {
                json_t *j = json_pack("{s:s%}", "text", out, out_len);
                char *s = j ? json_dumps(j, JSON_ENSURE_ASCII) : NULL;
                printf("%s\n", s ? s : "{}");
                free(s);
                json_decref(j);
            } else {
                fwrite(out, 1, out_len, stdout);
                putchar('\n');
            }
            free(out);
        }
    } else if (tokenizer_encode(tok, text, strlen(text), special, &ids, &n, &err)) {
        rc = fail(err.msg);
    } else if (as_json) {
        json_t *j = json_object(), *jids = json_array(), *jp = json_array();
        for (int i = 0; i < n; i++) {
            json_array_append_new(jids, json_integer(ids[i]));
            json_array_append_new(jp, json_string(tokenizer_piece(tok, ids[i])));
        }
        json_object_set_new(j, "ids", jids);
        json_object_set_new(j, "pieces", jp);
        char *s = json_dumps(j, JSON_COMPACT);
        printf("%s\n", s);
        free(s);
        json_decref(j);
    } else {
        printf("ids:");
        for (int i = 0; i < n; i++) printf("%s%d", i ? "," : " ", ids[i]);
        printf("\npieces:");
        for (int i = 0; i < n; i++) {
            putchar(' ');
            print_quoted(tokenizer_piece(tok, ids[i]));
        }
        printf("\n");
    }
    free(ids);
    tokenizer_free(tok);
    return rc;
}

int cmd_tokenize_text(int argc, char **argv) {
    enum { OPT_DECODE = CLI_LONG_ONLY, OPT_SPECIAL, OPT_FILE, OPT_JSONL, OPT_PIECES };
    static const struct option options[] = {
        {"tokenizer", required_argument, NULL, 't'},
        {"decode", required_argument, NULL, OPT_DECODE},
        {"special", no_argument, NULL, OPT_SPECIAL},
        {"json", no_argument, NULL, 'j'},
        {"file", required_argument, NULL, OPT_FILE},
        {"jsonl", no_argument, NULL, OPT_JSONL},
        {"pieces", no_argument, NULL, OPT_PIECES},
        CLI_HELP_OPTION,
        {0},
    };
    const char *dir = NULL, *text = NULL, *decode = NULL, *file = NULL;
    int special = 0, as_json = 0, jsonl = 0, pieces = 0;
    cli_args a;
    cli_args_init(&a, "tokenize-text", usage_text, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
        case 't': dir = a.value; break;
        case OPT_DECODE: decode = a.value; break;
        case OPT_SPECIAL: special = 1; break;
        case 'j': as_json = 1; break;
        case OPT_FILE: file = a.value; break;
        case OPT_JSONL: jsonl = 1; break;
        case OPT_PIECES: pieces = 1; break;
        default: return cli_args_exit(&a, c);
        }
    if (a.n_positional > 1) return cli_usage_error(&a, "exactly one TEXT argument goes after --");
    if (a.n_positional == 1) text = a.positional[0];
    if (!dir || (!!text + !!decode + !!file) != 1)
        return cli_usage_error(&a, "need --tokenizer DIR and either -- TEXT, --decode IDS or --file F");
    if ((jsonl || pieces) && !file) return cli_usage_error(&a, "--jsonl and --pieces go with --file");
    if (cli_parse_only()) return cli_args_done(&a);
    cli_args_free(&a);  // the values point into argv
    if (file) return encode_file(dir, file, jsonl, special, pieces);
    return encode_or_decode(dir, text, decode, special, as_json);
}
