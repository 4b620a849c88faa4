#!/usr/bin/env bash
# The command line's conventions (docs/cli.md): getopt_long forms (--opt=value, --opt value, short
# forms and clusters, unique prefixes, options after positionals, -- ends options, POSIXLY_CORRECT
# changes nothing); refused forms are one line and exit status 2; every command line of README.md and
# docs/*.md still parses (tools/doc_command_lines.py extracts them; `edgepatch --parse-only` parses
# without running); and every --json output parses and agrees with an independent source: tasks with
# the task files, memory of a model folder with its config.json given as a file, forward with its own
# logits' log-softmax, run with the config and model_logs.json, report with report.txt, scores and show
# with model_logs.json and prompts.h5 (h5dump). Uses the tiny fixture model; about 10 s.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
py=${EP_SYSTEM_PYTHON:-/usr/bin/python3}

parses() {  # parses ARGS...: `edgepatch --parse-only ARGS` accepts them
  local out
  out=$("$bin" --parse-only "$@" 2>&1)
  [ $? = 0 ] && [ "$out" = "edgepatch $1: arguments ok" ] && ok || bad "--parse-only $*: $out"
}

# ---- getopt_long forms ------------------------------------------------------------------------------
for form in "--until patch" "--until=patch" "-u patch" "-upatch" "--unt=patch" "--until patch --fresh --json" "-fju patch"; do
  # shellcheck disable=SC2086
  parses run configs/default.json $form
  # shellcheck disable=SC2086
  parses run $form configs/default.json
done
parses run -- configs/default.json
parses scores runs/x -r 0 -j
parses scores --round=3 runs/x
parses show -p 2 runs/x --json
parses memory docs/model_configs/gemma-2-2b.json --tp=1,2 -b 4x100 --targets=2 --donors 0 --gpu-gib=40.5 -j
parses forward -m models/x -i 1,2,3 -k 3 -g 2 -j
parses forward --model=models/x --text=hello --top=3
parses tasks -t models/x -j
parses check configs/default.json -j
parses report runs/x --json
parses convert-gguf x.gguf out -j
POSIXLY_CORRECT=1 parses run configs/default.json --until patch
expect_error 2 "unknown option '--frobnicate'" run configs/default.json --frobnicate
expect_error 2 "unknown option '-x'" run -x configs/default.json
expect_error 2 "option '--until' needs a value" run configs/default.json --until
expect_error 2 "option '--fresh' takes no value" run configs/default.json --fresh=yes
expect_error 2 "unknown stage 'bogus'" run configs/default.json --until=bogus
expect_error 2 "unexpected argument 'two.json'" run one.json two.json
expect_error 2 "need CONFIG" run --until patch
expect_error 2 "ambiguous option '--t'" memory docs/model_configs/gemma-2-2b.json --t 2
expect_error 2 "--round: expected an integer" scores runs/x --round=x
expect_error 2 "--prompt: expected an integer" show runs/x -p -1
expect_error 2 "--top: expected an integer" forward -m x -i 1 --top 1e3
expect_error 2 "unknown option '--bogus'" --bogus tasks
expect_error 2 "unknown command" nosuchcommand
parses sweep plan x --json
parses sweep submit x --dry-run
parses tokenize-text -t x -- "some text"
expect_error 2 "--dry-run is for submit" sweep plan x --dry-run
expect_error 2 "need --tokenizer DIR" tokenize-text -- "some text"
# After --, a name that starts with '-' is a positional: the file it names is looked for.
expect_error 1 "./-weird.json" check -- ./-weird.json
"$bin" run --help | grep -q -- "-u, --until STAGE" && ok || bad "run --help lists -u"
"$bin" help show | grep -q -- "-p, --prompt I" && ok || bad "help show"
[ "$("$bin" -V)" = "$("$bin" --version)" ] && ok || bad "-V"

# ---- every command line of the docs still parses -----------------------------------------------------
"$py" tools/doc_command_lines.py README.md docs/*.md > "$tmp/lines" || bad "doc_command_lines.py failed"
[ "$(wc -l < "$tmp/lines")" -ge 25 ] && ok || bad "only $(wc -l < "$tmp/lines") command lines found in the docs"
grep -qP '\t--until\tpatch' "$tmp/lines" && ok || bad "README's --until patch was not extracted"
while IFS=$'\t' read -r -a fields; do
  where=${fields[0]} args=("${fields[@]:1}")
  "$bin" --parse-only "${args[@]}" > /dev/null 2> "$tmp/doc.err"; rc=$?
  # A mention in prose ("edgepatch report prints ...") may lack its positionals: that refusal is fine,
  # a refused option is not.
  if [ $rc = 0 ] || { [ $rc = 2 ] && grep -q "need " "$tmp/doc.err"; }; then ok
  else bad "$where: edgepatch ${args[*]} -> status $rc: $(head -1 "$tmp/doc.err")"; fi
done < "$tmp/lines"

# ---- tasks --json: the task files' pair counts, shots, donor kinds ---------------------------------------
"$bin" tasks --json > "$tmp/tasks.json" && ok || bad "tasks --json failed"
"$py" - "$tmp/tasks.json" <<'PY' && ok || bad "tasks --json differs from the task files"
import glob, json, os, sys
got = {t["name"]: t for t in json.load(open(sys.argv[1]))["tasks"]}
wrong = []
files = sorted(glob.glob("datasets/tasks/*.json"))
for path in files:
    spec = json.load(open(path))
    here = os.path.dirname(path)
    items = [p for p in json.load(open(os.path.join(here, spec["pairs"]))) if "suspect" not in p]
    x, y = spec.get("input", "input"), spec.get("output", "output")
    amb = spec.get("ambiguous_pairs")
    pairs = [p for p in items if p[x] != p[y]] if amb else items
    n_amb = len([p for p in json.load(open(os.path.join(here, amb))) if "suspect" not in p and p[x] == p[y]]) if amb else 0
    t = got.get(spec["name"])
    want = {"title": spec["title"], "pairs": len(pairs), "ambiguous": n_amb, "shots": spec.get("n_shots", 10),
            "donor_kinds": spec["donor_kinds"]}
    if t is None or any(t[k] != v for k, v in want.items()):
        wrong.append("%s: %s, want %s" % (path, t, want))
if len(got) != len(files): wrong.append("%d tasks listed, %d files" % (len(got), len(files)))
print("\n".join(wrong), file=sys.stderr)
sys.exit(1 if wrong else 0)
PY
"$bin" tasks -t tests/fixtures/models/gemma2-tiny -j > "$tmp/tasks-tk.json" && "$bin" tasks --tokenizer=tests/fixtures/models/gemma2-tiny > "$tmp/tasks-tk.txt" &&
  "$py" - "$tmp/tasks-tk.json" "$tmp/tasks-tk.txt" <<'PY' && ok || bad "tasks --tokenizer: JSON and table differ"
import json, sys
tasks = json.load(open(sys.argv[1]))["tasks"]
rows = {l.split()[0]: l for l in open(sys.argv[2]).read().splitlines()[1:]}
for t in tasks:
    k = t["kept"]
    assert k["pairs_total"] == t["pairs"], t
    assert k["pairs_kept"] + sum(k["dropped"].values()) == k["pairs_total"] + k["ambiguous_total"] - k["ambiguous_kept"], t
    assert "%d of %d" % (k["pairs_kept"], k["pairs_total"]) in rows[t["name"]], (t, rows[t["name"]])
PY

# ---- memory: a model folder gives the numbers of its config.json ----------------------------------------
m=tests/fixtures/models/gemma2-tiny
"$bin" memory "$m" --json > "$tmp/mem-dir.json" && "$bin" memory "$m/config.json" -j > "$tmp/mem-file.json" &&
  "$bin" memory "$m/" -j > "$tmp/mem-slash.json" && ok || bad "memory of a model folder failed"
"$py" - "$tmp/mem-dir.json" "$tmp/mem-file.json" "$tmp/mem-slash.json" <<'PY' && ok || bad "memory: the folder's numbers differ from its config.json's"
import json, sys
d, f, s = (json.load(open(p)) for p in sys.argv[1:])
assert len(d) == 4 and [r["config"] for r in d] == ["gemma2-tiny"] * 4 and [r["config"] for r in f] == ["config.json"] * 4, (d, f)
for a, b, c in zip(d, f, s):
    a, b, c = dict(a), dict(b), dict(c)
    a.pop("config"), b.pop("config"), c.pop("config")
    assert a == b == c, (a, b)
PY
expect_error 1 "config.json" memory "$tmp"

# ---- forward --json: top tokens are the log-softmax of its own logits ------------------------------------
"$bin" forward -m "$m" -i 2,5,9 -k 3 -g 2 -j > "$tmp/fwd.json" && ok || bad "forward -j failed"
"$py" - "$tmp/fwd.json" "$m/config.json" <<'PY' && ok || bad "forward --json top is not its logits' log-softmax"
import json, math, sys
o, cfg = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
l = o["logits"]
assert o["ids"] == [2, 5, 9] and len(l) == cfg["vocab_size"] and len(o["top"]) == 3 and len(o["generated"]) <= 2, o["ids"]
mx = max(l); lse = mx + math.log(sum(math.exp(v - mx) for v in l))
order = sorted(range(len(l)), key=lambda i: (-l[i], i))[:3]
assert [t["id"] for t in o["top"]] == order, (o["top"], order)
assert all(abs(t["logprob"] - (l[t["id"]] - lse)) < 1e-5 for t in o["top"]), o["top"]
PY

# ---- run --json, report --json, scores --json, show --json on a tiny pruning run -------------------------
sed -e "s#runs/prune-tiny#$tmp/pt#" -e 's#"n_prompts": 16#"n_prompts": 12#' configs/prune-tiny.json > "$tmp/pt.json"
timeout 300 "$bin" run "$tmp/pt.json" --json > "$tmp/run1.json" 2> "$tmp/run1.err" && ok || bad "run --json: $(tail -2 "$tmp/run1.err")"
timeout 300 "$bin" run -j "$tmp/pt.json" > "$tmp/run2.json" 2> /dev/null && ok || bad "run --json (again) failed"
"$py" - "$tmp/run1.json" "$tmp/run2.json" "$tmp/pt.json" <<'PY' && ok || bad "run --json summary differs from the config and model_logs.json"
import json, math, os, sys
first, again, cfg = (json.load(open(p)) for p in sys.argv[1:])  # json.load: stdout holds the summary alone
out = cfg["output_path"]
logs = json.load(open(os.path.join(out, "model_logs.json")))
items = math.ceil(cfg["n_prompts"] / cfg["batch_size"])
rounds = cfg["prune_rounds"]["heads"] + cfg["prune_rounds"]["edges"]
for s, computed in ((first, True), (again, False)):
    assert s["status"] == "done" and s["exit_status"] == 0 and s["error"] is None and s["output_path"] == out, s
    st = {x["name"]: x for x in s["stages"]}
    assert list(st) == ["tokenize", "cache", "patch", "score", "prune", "fv"], st
    want = "computed" if computed else "up to date"
    assert all(x["state"] == want for n, x in st.items() if n != "fv"), st
    assert st["fv"] == {"name": "fv", "state": "not reached"}, st  # no function_vectors block: the stage has nothing to do
    assert st["cache"]["items"] == items == st["patch"]["items"] and st["score"]["items"] == 1, st
    assert st["prune"]["items"] == rounds - 1, st
    assert st["cache"]["computed"] == (items if computed else 0) and st["prune"]["computed"] == (rounds - 1 if computed else 0), st
    r = s["results"]
    for k in ("task", "n_prompts", "full_model_accuracy", "accuracy", "mean_logit_diff", "faithfulness_logit_diff"):
        assert r[k] == logs[k], (k, r[k], logs[k])
    assert r["task"] == cfg["task"] and r["n_prompts"] == cfg["n_prompts"], r
    assert [x["kept"] for x in r["rounds"]] == [x["kept"] for x in logs["prune"]] and len(r["rounds"]) == rounds, r["rounds"]
    c = json.load(open(os.path.join(out, "circuit.json")))
    assert r["circuit"]["n_head_units"] == c["n_head_units"] and r["circuit"]["round"] == rounds - 1, r["circuit"]
PY
grep -q "^prune: round 0" "$tmp/run1.err" && ok || bad "run --json: the stages' lines are not on stderr"
sed "s#$tmp/pt#$tmp/pt2#" "$tmp/pt.json" > "$tmp/pt2.json"
timeout 300 "$bin" run "$tmp/pt2.json" --until=patch --json 2> /dev/null | "$py" -c '
import json, sys
s = json.load(sys.stdin)
st = {x["name"]: x["state"] for x in s["stages"]}
assert s["until"] == "patch" and st == {"tokenize": "computed", "cache": "computed", "patch": "computed",
       "score": "not requested", "prune": "not requested", "fv": "not requested"} and s["results"]["rounds"] == [] and s["results"]["circuit"] is None, s
' && ok || bad "run --until=patch --json"
"$bin" run "$tmp/missing.json" --json > "$tmp/run-bad.json" 2> /dev/null; rc=$?
[ $rc = 1 ] && "$py" -c '
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "failed" and s["exit_status"] == 1 and "missing.json" in s["error"] and s["results"] is None, s
' "$tmp/run-bad.json" && ok || bad "run --json of a missing config: status $rc, $(cat "$tmp/run-bad.json")"

"$bin" report "$tmp/pt" --json > "$tmp/report.json" 2> "$tmp/report.err" && ok || bad "report --json failed"
"$py" - "$tmp/report.json" "$tmp/pt/report.txt" "$tmp/run1.json" <<'PY' && ok || bad "report --json differs from report.txt"
import json, sys
o, txt, run = json.load(open(sys.argv[1])), open(sys.argv[2]).read().splitlines(), json.load(open(sys.argv[3]))
r = o["results"]
assert o["report"].endswith("/report.txt") and r == run["results"], (o, run["results"])
full = next(l for l in txt if l.startswith("full model")).split()
assert abs(float(full[2]) - r["full_model_accuracy"]) < 5e-4 and abs(float(full[4]) - r["full_model_mean_logit_diff"]) < 5e-4, full
rows = [l.split() for l in txt if l[:1].isdigit()]
assert [int(x[0]) for x in rows] == [x["round"] for x in r["rounds"]] and [int(x[4]) for x in rows] == [x["kept"] for x in r["rounds"]], rows
assert all(abs(float(x[5]) - y["faithfulness_logit_diff"]) < 5e-4 for x, y in zip(rows, r["rounds"])), rows
PY
grep -q "^full model" "$tmp/report.err" && ok || bad "report --json: the table is not on stderr"

"$bin" scores "$tmp/pt" -r 1 -j > "$tmp/scores.json" && "$py" - "$tmp/scores.json" "$tmp/pt/model_logs.json" <<'PY' && ok || bad "scores -r 1 -j differs from model_logs.json"
import json, sys
s, logs = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
p = logs["prune"][1]
assert s["round"] == 1 and len(s["units"]) == p["units"] and len(s["kept"]) == p["kept"] and s["kind"] == p["kind"], (s["round"], p)
PY
"$bin" show "$tmp/pt" -p 1 -j > "$tmp/show.json" &&
  h5dump -y -w 0 -d tokens "$tmp/pt/prompts.h5" > "$tmp/tokens.txt" && h5dump -y -w 0 -d lengths "$tmp/pt/prompts.h5" > "$tmp/lengths.txt" &&
  "$py" - "$tmp/show.json" "$tmp/tokens.txt" "$tmp/lengths.txt" <<'PY' && ok || bad "show -p 1 -j differs from prompts.h5"
import json, re, sys
s = json.load(open(sys.argv[1]))
def data(path):  # h5dump's DATA block, one row per line (-w 0)
    text = open(path).read()
    body = text[text.index("DATA {") + 6:text.rindex("}")]
    return [[int(v) for v in re.findall(r"-?\d+", line)] for line in body.strip().splitlines() if re.search(r"\d", line)]
tokens, lengths = data(sys.argv[2]), sum(data(sys.argv[3]), [])
n = lengths[1]
assert s["tokens"] == tokens[1][:n] and len(s["types"]) == n and "metrics" in s, (s["tokens"], tokens[1][:n])
PY

finish cli_args
