// edgepatch tokenize-text: placeholder until the tokenizer module lands (issue 3).
#include <stdio.h>

#include "pipeline/cli.h"

int cmd_tokenize_text(int argc, char **argv) {
    fprintf(stderr, "edgepatch tokenize-text: the tokenizer is not available in this version yet\n");
    return 2;
}
