"""Chaos test (docs/reliability.md): seeded random schedules of kills and corruptions against `edgepatch
run`, each ending in a folder byte-identical to an undisturbed run's.

A schedule picks a layout (an unlaunched process; mpirun -np 1, 2 or 4; a tensor_parallel 2 group on 2
ranks) and runs the same small config (tiny Gemma-2 fixture: tokenize, cache, patch with four ablations,
an attribution head round and an edge round, the report with both figures) again and again. Each
attempt is disturbed once: after a random delay (from 0, MPI start, to past the end of an undisturbed
run, the report) one signal (KILL, TERM or USR1) goes to every rank, to one rank or to mpirun. Between
attempts, at random, one file of the run folder is corrupted: a byte flipped or the file truncated.
Then a last undisturbed run, which must exit 0 and leave every file byte-identical to the reference
run's (made once per layout kind before the schedules), with no temporary left.

Every attempt must end by itself: a stop request (TERM, USR1) in exit status 0 or 75, a KILL in any
status; an attempt still running HANG_S seconds after its signal is a hang and fails the test (its
processes are killed). Prints one line per attempt and, at the end, the table of kill points by stage
and signal, exit statuses, hangs and corruptions (the stage is read from the run's own output: the
last stage banner printed before the signal).

    python3 tests/chaos.py BIN [--points N] [--seed S] [--long] [--work DIR] [--table FILE]

--long: 1000 kill points (default 30). Environment: CHAOS_HANG_S (default 90).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "USR1": signal.SIGUSR1}
# Layouts: name, ranks (0: no mpirun), tensor_parallel.
LAYOUTS = [("alone", 0, 1), ("np1", 1, 1), ("np2", 2, 1), ("np4", 4, 1), ("tp2", 2, 2)]
STAGES = ["start", "tokenize", "cache", "patch", "round 0", "round 1", "report", "after"]


def config(path, out, tp):
    c = {
        "task": "person_sport", "model_name": "gemma2_prune_heads_in_circuits",
        "model_path": os.path.abspath("tests/fixtures/models/gemma2-tiny"), "output_path": out,
        "n_prompts": 8, "batch_size": 2, "seed": 3, "n_shots": 3, "max_new_tokens": 3,
        "affect_whom": [["x", "y"]],
        "ablations": [
            {"name": "y->last L0-1", "group": "y->last", "band": "0-1",
             "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [0, 1]}]},
            {"name": "y->last L2-3", "group": "y->last", "band": "2-3",
             "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [2, 3]}]},
            {"name": "x->last L0-1", "group": "x->last", "band": "0-1",
             "rules": [{"sender": ["x"], "receiver": ["last"], "relation": "any", "layers": [0, 1]}]},
            {"name": "x->last L2-3", "group": "x->last", "band": "2-3",
             "rules": [{"sender": ["x"], "receiver": ["last"], "relation": "any", "layers": [2, 3]}]}],
        "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3,
        "tensor_parallel": tp,
    }
    with open(path, "w") as f:
        json.dump(c, f)


def env():
    e = dict(os.environ)
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    # MPI's plugins leak where LSan cannot name them (tests/cli_mpi.sh); a KILL leaks by definition.
    e["ASAN_OPTIONS"] = (e.get("ASAN_OPTIONS", "") + ":detect_leaks=0").lstrip(":")
    # A rank left waiting in MPI_Init or MPI_Finalize for one killed outright ends well inside the hang
    # limit (sched/watchdog.h; the default, 600 s, is for clusters).
    e.setdefault("EDGEPATCH_MPI_TIMEOUT", "20")
    return e


def command(bin_, cfg, ranks):
    run = [bin_, "run", cfg]
    return run if ranks == 0 else ["mpirun", "-np", str(ranks)] + run


def is_core(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "edgepatch-core"
    except OSError:
        return False


def start_time(pid):
    """The start time of process pid (field 22 of /proc/PID/stat), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def children(pid):
    """Pids of the direct children of pid (the ranks of an mpirun) that run edgepatch-core.

    Not the front (sched/cli/launch.c) in the tenth of a millisecond before it blocks the stop signals and
    executes the core: a signal there finds the default action, as it would for any program between its
    exec and its first instructions (docs/distribution.md), so the test does not aim there."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            if is_core(k):
                out.append(k)
        except OSError:
            pass
    return out


def stage_of(text):
    """The stage a run was in, from what it had printed (stdout is line-buffered): the last banner."""
    stage = "start"  # MPI start, the config, the tokenize stage
    for line in text.splitlines():
        if line.startswith(("tokenize:", "cache:")):
            stage = "cache"
        elif line.startswith("patch:"):
            stage = "patch"
        elif line.startswith("prune: round 0"):
            stage = "round 1"
        elif line.startswith(("prune: round 1", "prune: final", "report (")):
            stage = "report"
        elif line.startswith("prune:") and stage == "patch":
            stage = "round 0"
    return stage


def run_folder_files(d):
    out = []
    for root, _, files in os.walk(d):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), d))
    return sorted(out)


def same_folder(ref, got):
    a, b = run_folder_files(ref), run_folder_files(got)
    why = []
    if a != b:
        why.append("files: only in reference %s, only in run %s" % (sorted(set(a) - set(b)), sorted(set(b) - set(a))))
    for f in set(a) & set(b):
        with open(os.path.join(ref, f), "rb") as x, open(os.path.join(got, f), "rb") as y:
            if x.read() != y.read():
                why.append("differs: " + f)
    return why


def corrupt(rng, d):
    files = [f for f in run_folder_files(d)]
    if not files:
        return None
    f = rng.choice(files)
    p = os.path.join(d, f)
    if not os.path.exists(p):
        return None
    size = os.path.getsize(p)
    if size == 0:
        return None
    if rng.random() < 0.5:
        off = rng.randrange(size)
        with open(p, "r+b") as h:
            h.seek(off)
            b = h.read(1)
            h.seek(off)
            h.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        return f"flip {f}@{off}"
    n = rng.randrange(size)
    os.truncate(p, n)
    return f"truncate {f} {size}->{n}"


class Attempt:
    def __init__(self, cmd, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.t0 = time.monotonic()
        # Its own session: the kill of a hung attempt reaches every process it started, and nothing
        # of ours.
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()

    def note_ranks(self):
        """Remembers the ranks running now (pid and start time, so that a reused pid is never taken
        for one)."""
        self.ranks = getattr(self, "ranks", set())
        for pid in children(self.p.pid):
            st = start_time(pid)
            if st is not None:
                self.ranks.add((pid, st))

    def reap(self):
        """Ends the ranks an attempt left running (orphaned by a killed mpirun), as the end of a Slurm
        job does, so that the next attempt never races with them."""
        for pid, st in getattr(self, "ranks", ()):
            if start_time(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid, st in getattr(self, "ranks", ()):
            for _ in range(500):
                if start_time(pid) != st:
                    break
                time.sleep(0.01)

    def output(self):
        self.log.close()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


def reference(bin_, work, kind, ranks, tp):
    cfg = os.path.join(work, f"ref-{kind}.json")
    out = os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    config(cfg, out, tp)
    a = Attempt(command(bin_, cfg, ranks), os.path.join(work, f"ref-{kind}.log"))
    t = time.monotonic()
    rc = a.wait(600)
    if rc != 0:
        a.kill_all() if rc is None else None
        sys.exit(f"chaos: the undisturbed {kind} run failed (status {rc}): {a.output()[-2000:]}")
    a.output()
    dur = time.monotonic() - t
    ref = os.path.join(work, f"ref-{kind}")
    shutil.rmtree(ref, ignore_errors=True)
    os.rename(out, ref)
    return ref, dur


def write_table(path, table, statuses, corruptions, failures, done, n_schedules, seed, final):
    """The table of kill points by stage and signal, and the summary: printed at the end, and written
    to path (when given) after every schedule, so a long run stopped early still leaves its figures."""
    lines = ["| stage at the signal | " + " | ".join(list(SIGNALS) + ["none (finished first)"]) + " |",
             "|---|" + "---|" * (len(SIGNALS) + 1)]
    for st in STAGES:
        row = [table.get((st, s), 0) for s in list(SIGNALS) + ["none (finished first)"]]
        if any(row):
            lines.append(f"| {st} | " + " | ".join(map(str, row)) + " |")
    summary = (f"{done} kill points in {n_schedules} schedules (seed {seed}); exit statuses: "
               + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + f"; corruptions: {corruptions}; "
               + f"hangs: {statuses.get('hang', 0)}; failures: {len(failures)}")
    if final:
        print("\n".join(lines))
        print(summary)
    if path:
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n\n" + summary + "\n" + "".join("\nFAIL " + x for x in failures) + "\n")
        os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--points", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--table", default=None, help="write the table (markdown) here too")
    args = ap.parse_args()
    points = args.points or (1000 if args.long else 30)
    hang_s = float(os.environ.get("CHAOS_HANG_S", "90"))
    bin_ = os.path.abspath(args.bin)
    work = args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ep-chaos-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)

    # References: the whole model (any rank count gives the same bytes) and the tensor_parallel 2 group.
    refs = {}
    durs = {}
    # Every layout runs once undisturbed: its duration spreads the kill moments over its stages, and its
    # files must be the reference's already.
    refs["whole"], durs["alone"] = reference(bin_, work, "whole", 0, 1)
    refs["tp2"], durs["tp2"] = reference(bin_, work, "tp2", 2, 2)
    for name, ranks, tp in LAYOUTS:
        if name in durs:
            continue
        folder, durs[name] = reference(bin_, work, name, ranks, tp)
        same = same_folder(refs["whole"], folder)
        if same:
            sys.exit(f"chaos: an undisturbed {name} run differs from the unlaunched one: " + "; ".join(same[:5]))
    print("chaos: references made (undisturbed runs: " + ", ".join(f"{k} {v:.1f} s" for k, v in durs.items())
          + f"); {points} kill points, seed {args.seed}", flush=True)

    table = {}  # (stage, signal) -> count
    statuses = {}
    failures = []
    corruptions = 0
    n_schedules = 0
    done = 0
    attempts = 0
    while done < points:
        n_schedules += 1
        name, ranks, tp = rng.choice(LAYOUTS)
        kind = "tp2" if tp == 2 else "whole"
        out = os.path.join(work, "run")
        shutil.rmtree(out, ignore_errors=True)
        cfg = os.path.join(work, f"{name}.json")
        config(cfg, out, tp)
        dur = durs[name]
        for k in range(rng.randint(2, 6)):
            if done >= points:
                break
            sig_name = rng.choice(list(SIGNALS))
            target = "process" if ranks == 0 else rng.choice(["all ranks", "one rank", "mpirun"])
            # A fifth of the kills land in the first 0.4 s (MPI start), the rest anywhere up to just past
            # the end of an undisturbed run (the report).
            delay = rng.uniform(0, 0.4) if rng.random() < 0.2 else rng.uniform(0, 1.15 * dur)
            attempts += 1
            log = os.path.join(work, f"attempt-{attempts:04d}.log")
            a = Attempt(command(bin_, cfg, ranks), log)
            rc = a.wait(delay)
            sent = False
            if rc is None:
                if target == "mpirun":
                    # Once mpirun has started every rank: it forwards SIGUSR1 to the process it forked
                    # even before that process has executed edgepatch, and there the signal kills it (the
                    # exec window of children(), on mpirun's side; docs/distribution.md).
                    for _ in range(200):
                        if len(children(a.p.pid)) == ranks or a.p.poll() is not None:
                            break
                        time.sleep(0.01)
                    pids = [a.p.pid]
                elif target == "process":
                    pids = [a.p.pid]
                    for _ in range(200):  # past the front (children() says why)
                        if is_core(a.p.pid) or a.p.poll() is not None:
                            break
                        time.sleep(0.001)
                else:
                    # The ranks may not be started yet: "all ranks" waits for every one of them (a kill of
                    # the ranks started so far is a kill of some ranks, which can leave the others
                    # waiting in MPI_Init for a rank that is gone: docs/reliability.md, "What is left").
                    want = ranks if target == "all ranks" else 1
                    pids = children(a.p.pid)
                    for _ in range(200):
                        if len(pids) >= want or a.p.poll() is not None:
                            break
                        time.sleep(0.01)
                        pids = children(a.p.pid)
                    if target == "one rank" and pids:
                        pids = [rng.choice(pids)]
                a.log.flush()
                a.note_ranks()
                stage_at = stage_of(open(log, errors="replace").read())
                for pid in pids:
                    try:
                        os.kill(pid, SIGNALS[sig_name])
                        sent = True
                    except ProcessLookupError:
                        pass
                rc = a.wait(hang_s)
            if rc is not None:
                a.reap()
            text = a.output() if rc is not None else None
            stage = stage_at if sent else "after"
            if rc is None:
                a.kill_all()
                failures.append(f"attempt {attempts}: {name}, {sig_name} to {target} at {delay:.2f} s ({stage}): HANG (no exit {hang_s:.0f} s after the signal)")
                status = "hang"
            else:
                rc = 128 - rc if rc < 0 else rc  # killed: as a shell reports it
                status = str(rc)
                # Open MPI's mpirun takes SIGTERM as "terminate the job": it passes SIGTERM on to the
                # ranks (which stop gracefully) but exits 1 itself, and SIGTERM cannot be forwarded
                # as a plain signal (docs/distribution.md). So that case is checked like a KILL: no
                # hang, and the folder made whole by the next run.
                graceful = not sent or (sig_name != "KILL" and not (sig_name == "TERM" and target == "mpirun"))
                if graceful and rc not in (0, 75):
                    failures.append(f"attempt {attempts}: {name}, {sig_name} to {target} at {delay:.2f} s ({stage}): exit status {rc}: {text[-600:]}")
            statuses[status] = statuses.get(status, 0) + 1
            key = (stage, sig_name if sent else "none (finished first)")
            table[key] = table.get(key, 0) + 1
            what = None
            if rng.random() < 0.5:
                what = corrupt(rng, out)
                corruptions += what is not None
            finished_first = rc == 0 and not sent
            print(f"  {attempts:4d} {name:5s} {sig_name:4s} -> {target:9s} at {delay:5.2f} s ({stage:8s}): status {status}" + (f"; then {what}" if what else ""), flush=True)
            done += sent  # a kill point is a signal delivered to a running attempt
            if finished_first and what is None:
                break  # the folder is complete: later kills would only land in its checks and the report
        # The undisturbed last run: exit 0 and the reference's bytes.
        a = Attempt(command(bin_, cfg, ranks), os.path.join(work, f"final-{n_schedules}.log"))
        rc = a.wait(600)
        text = a.output() if rc is not None else ""
        if rc is None:
            a.kill_all()
            failures.append(f"schedule {n_schedules} ({name}): the final run hung")
        elif rc != 0:
            failures.append(f"schedule {n_schedules} ({name}): the final run exited {rc}: {text[-800:]}")
        else:
            why = same_folder(refs[kind], out)
            if why:
                failures.append(f"schedule {n_schedules} ({name}): the final folder is not the reference's: " + "; ".join(why[:6]))
        print(f"  schedule {n_schedules} ({name}) final run: status {rc}" + (" (files identical)" if rc == 0 and not same_folder(refs[kind], out) else ""), flush=True)
        write_table(args.table, table, statuses, corruptions, failures, done, n_schedules, args.seed, False)
    write_table(args.table, table, statuses, corruptions, failures, done, n_schedules, args.seed, True)
    for f in failures:
        print("FAIL " + f)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
