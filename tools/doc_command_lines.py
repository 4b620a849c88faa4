#!/usr/bin/env python3
"""Prints every `edgepatch COMMAND ...` line of the given Markdown files as a concrete command line, one
per line: the file, then the arguments after "edgepatch", separated by tabs (for tests/cli_args.sh).

A line is taken from code blocks (indented or fenced) and from inline `code` spans. The placeholders the
docs use (CONFIG, RUN, STAGE, ...) become concrete values; [optional] parts are kept (their first
alternative), (a | b) choices take the first, and a comment (# ...) or a trailing backslash ends it.
"""
import re
import shlex
import sys

COMMANDS = {"run", "check", "forward", "tokenize-text", "tasks", "show", "convert-gguf", "scores", "memory", "report",
            "sweep"}
VALUES = {  # placeholder -> concrete value (whole words only)
    "CONFIG|SWEEP": "configs/default.json", "CONFIG.json|MODEL_DIR": "docs/model_configs/gemma-2-2b.json",
    "CONFIG.json": "docs/model_configs/gemma-2-2b.json", "CONFIG": "configs/default.json", "$CONFIG": "configs/default.json",
    "SWEEP": "configs/sweeps/full.json", "RUN": "runs/x", "STAGE": "patch", "R": "0", "I": "0", "K": "5", "N": "4",
    "T": "hello", "TEXT": "hello", "DIR": "models/smollm2-135m-instruct", "FILE.gguf": "x.gguf", "OUTDIR": "out",
    "F": "datasets/words/american-english-small",
    "LIST": "1,2", "G": "80", "SxL": "8x200", "plan|submit|status": "plan", "MODEL_DIR": "models/smollm2-135m-instruct",
}


def spans(text):
    fenced = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            yield line.strip()
        for m in re.finditer(r"`([^`]+)`", line):
            yield m.group(1)


def concrete(cmdline):
    s = re.split(r"#|;", cmdline, 1)[0].rstrip().rstrip("\\").strip()
    s = re.sub(r"\s{2,}\S.*$", "", s) if "  " in s else s  # usage tables: two spaces, then a description
    s = re.sub(r"\(([^()|]*)\|[^()]*\)", r"\1", s)  # (a | b): a
    s = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0], s)  # [-u|--until STAGE]: -u STAGE
    s = re.sub(r"(?<=\s)-(\w)\|--[\w-]+", r"-\1", s)  # -p|--prompt I: -p I
    s = s.replace(",...", "").replace("...", "")
    try:
        words = shlex.split(s)
    except ValueError:
        return None
    # A description after one space: two plain words in a row ("--dry-run write them, ...") are prose.
    for i in range(1, len(words) - 1):
        if re.fullmatch(r"[a-z]+", words[i]) and re.fullmatch(r"[a-z]+,?", words[i + 1]):
            words = words[:i]
            break
    words = [w.split("|")[0] if "|" in w and not w.startswith("-") else w for w in words]  # plan|submit: plan
    return [VALUES.get(w, w) for w in words]


def main():
    seen = set()
    for path in sys.argv[1:]:
        for span in spans(open(path, encoding="utf-8").read()):
            for m in re.finditer(r"(?:^|[\s/])edgepatch\s+([a-z-]+)(?=\s|$)(.*)", span):
                if m.group(1) not in COMMANDS:
                    continue
                args = concrete(m.group(1) + m.group(2))
                if args and tuple(args) not in seen:
                    seen.add(tuple(args))
                    print("\t".join([path] + args))


main()
