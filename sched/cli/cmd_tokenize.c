// edgepatch tokenize-text: encodes text with a tokenizer directory and prints ids and pieces, or
// decodes a list of ids. Special tokens (BOS from the post-processor) are added on encode, and kept on
// decode, only with --special.
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
    "\n"
    "Encodes TEXT with DIR/tokenizer.json (or tokenizer.json.gz) and prints the ids and their pieces;\n"
    "--decode turns ids back into text. --special adds the post-processor's special tokens (BOS) when\n"
    "encoding and keeps special tokens when decoding. --json prints {\"ids\": [...], \"pieces\": [...]}\n"
    "(or {\"text\": ...} for --decode).\n";

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

int cmd_tokenize_text(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage_text, stdout);
        return 0;
    }
    const char *dir = NULL, *text = NULL, *decode = NULL;
    int special = 0, as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            if (i + 2 != argc) {
                fprintf(stderr, "edgepatch tokenize-text: exactly one TEXT argument goes after -- (try --help)\n");
                return 2;
            }
            text = argv[i + 1];
            break;
        } else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--decode") && i + 1 < argc) {
            decode = argv[++i];
        } else if (!strcmp(argv[i], "--special")) {
            special = 1;
        } else if (!strcmp(argv[i], "--json")) {
            as_json = 1;
        } else {
            fprintf(stderr, "edgepatch tokenize-text: unexpected argument '%s' (try --help)\n", argv[i]);
            return 2;
        }
    }
    if (!dir || (!text == !decode)) {
        fprintf(stderr, "edgepatch tokenize-text: need --tokenizer DIR and either -- TEXT or --decode IDS (try --help)\n");
        return 2;
    }
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
