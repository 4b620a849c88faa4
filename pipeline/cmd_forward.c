// edgepatch forward: placeholder until the model runtime lands (this file is replaced in issue 2).
#include <stdio.h>

#include "pipeline/cli.h"

int cmd_forward(int argc, char **argv) {
    fprintf(stderr, "edgepatch forward: not available yet\n");
    return 2;
}
