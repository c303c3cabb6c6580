"""Which route gives the quick start a 4,096-position model? Three routes at an equal token budget, side by side.

    python benchmarks/quickstart_routes.py --work runs/routes            # about 35 min on 2 idle cores

Every route trains the quick start's model and recipe (launch/quickstart_model.json, ds_configs/quickstart_cpu.json,
the same masking, starts and seed) on the same real news for the quick start's budget of 550 steps x 8 x 512 tokens
(2.25M tokens), and ends with a 4,096-position model:

- ``512+lengthen``: today's quick start (550 steps at 512 tokens), then lengthened (``launch/convert.py --max-pos
  4096``, position rows tiled) with no training at 4,096;
- ``4096``: 4,096-token sequences from the start (``ds_configs/quickstart_cpu_4096.json``: 2 x 4,096 tokens a step,
  275 steps);
- ``512+lengthen+4096xQ``: the upstream's route: the 512 phase to step 550 - 2Q (the same run's checkpoint),
  lengthened, then Q steps at 4,096 tokens (``--init-from`` the lengthened model, ``--start-step``: the learning
  rate schedule goes on from there);

and scores every final model on the same held-out data: validation BPC on the 4,096-token validation split (all of
it), the 512-token one (all of it), 300 blanks from the dev news (top-1/top-5) and the by-position blanks on long
held-out inputs. The table (``WORK/table.md``) gives each route's pretraining wall and CPU seconds (all processes)
beside the scores. Finished stages are skipped on a rerun. Never run by the tests.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.pretraining_value import free_port  # noqa: E402

STEPS = 550  # the quick start's budget, in steps of 8 x 512 tokens
RECIPE = ["--masking", "dynamic", "--mask-prob", "0.3", "--mask-unit", "mixed", "--output-vocab", "training",
          "--eval-batch-size", "8", "--log-interval", "25", "--seed", "42"]
FROM_SCRATCH = ["--output-bias-init", "unigram", "--embedding-init", "cooccurrence"]


def run(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall seconds and the CPU seconds of it and every process it waited for."""
    print("$ " + " ".join(command), flush=True)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "a", encoding="utf-8") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}) after {wall:.0f} s; see {log}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"  done in {wall:.0f} s ({cpu:.0f} CPU s; log {log})", flush=True)
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def stage(work: Path, name: str, make) -> dict:
    """``make()``'s result, computed once: kept in WORK/NAME.json."""
    done = work / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = make()
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def pretrain(run_dir: Path, data: Path, config: str, max_steps: int, model: list[str], log: Path,
             extra: list[str] = ()) -> dict:
    return run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                "--deepspeed_config", config, "--data", str(data), "--output-dir", str(run_dir), *model,
                "--max-steps", str(max_steps), "--save-interval", "25", "--keep-checkpoints", "0",
                "--eval-interval", "0", *RECIPE, *extra], log)


def lengthen(source: Path, target: Path, log: Path) -> dict:
    return run([sys.executable, "launch/convert.py", "--from", str(source), "--to", str(target), "--max-pos", "4096"],
               log)


def scores(model: Path, work: Path, log: Path) -> dict:
    """Every held-out score of one model, from the evaluation commands' JSON output."""
    out = {}
    for name, data in (("val_bpc_4096", work / "shards4096"), ("val_bpc_512", work / "shards512")):
        text = subprocess.run([sys.executable, "launch/evaluate.py", "bpc", "--model", str(model), "--data", str(data),
                               "--batch-size", "8", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
        out[name] = json.loads(text.stdout.strip().splitlines()[-1])["bpc"]
    cloze = subprocess.run([sys.executable, "launch/evaluate.py", "cloze", "--model", str(model), "--blanks",
                            str(work / "cloze_blanks.jsonl"), "--json"], cwd=REPO, capture_output=True, text=True,
                           check=True)
    out["cloze"] = json.loads(cloze.stdout.strip().splitlines()[-1])
    by_position = subprocess.run([sys.executable, "launch/evaluate.py", "by-position", "--model", str(model),
                                  "--corpus", *map(str, sorted((work / "heldout").glob("*.jsonl"))), "--json"],
                                 cwd=REPO, capture_output=True, text=True, check=True)
    out["by_position"] = json.loads(by_position.stdout.strip().splitlines()[-1])
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"model": str(model), **out}, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--long-steps", type=int, nargs="*", default=[25, 50],
                   help="Q of the routes 512+lengthen+4096xQ (default 25 50)")
    p.add_argument("--stages", nargs="*", default=["train", "score"], choices=("train", "score"))
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    py = sys.executable

    def corpus():
        from data_service.corpora import write_inews_corpus
        for split, folder in (("train", "corpus"), ("dev", "heldout")):
            write_inews_corpus(work / folder, split=split)
        return {}

    stage(work, "corpus", corpus)
    prepared = {}
    for seq_len, max_predictions in ((512, 80), (4096, 640)):
        prepared[seq_len] = stage(work, f"shards{seq_len}", lambda: run(
            [py, "launch/preprocess.py", "--input", *map(str, sorted((work / "corpus").glob("*.jsonl"))),
             "--output", str(work / f"shards{seq_len}"), "--seq-len", str(seq_len), "--mask-prob", "0.10",
             "--max-predictions", str(max_predictions), "--dupe-factor", "1", "--val-fraction", "0.3", "--seed", "0",
             "--quiet"], log))
    model_config = str(REPO / "launch" / "quickstart_model.json")
    long_config = work / "quickstart_model_4096.json"
    long_config.write_text(json.dumps({**json.loads(Path(model_config).read_text()),
                                       "max_position_embeddings": 4096}, indent=2))
    routes = {}
    if "train" in args.stages:
        base = stage(work, "route_512", lambda: pretrain(
            work / "run512", work / "shards512", "ds_configs/quickstart_cpu.json", STEPS,
            ["--model-config", model_config, *FROM_SCRATCH], log))
        routes["4096"] = {**stage(work, "route_4096", lambda: pretrain(
            work / "run4096", work / "shards4096", "ds_configs/quickstart_cpu_4096.json", STEPS // 2,
            ["--model-config", str(long_config), *FROM_SCRATCH], log)), "model": str(work / "run4096")}
        stage(work, "lengthen_512", lambda: lengthen(work / "run512", work / "model512_long", log))
        routes["512+lengthen"] = {**base, "model": str(work / "model512_long")}
        for q in args.long_steps:
            first = STEPS - 2 * q
            tag = work / "run512" / "checkpoints" / f"step_{first}"
            grown = work / f"model512_step{first}_long"
            length = stage(work, f"lengthen_{first}", lambda: lengthen(tag, grown, log))
            second = stage(work, f"route_512_4096x{q}", lambda: pretrain(
                work / f"run512_4096x{q}", work / "shards4096", "ds_configs/quickstart_cpu_4096.json", first + q,
                ["--init-from", str(grown), "--start-step", str(first)], log))
            # the 512 phase's share of the base run, measured on it, plus the lengthening and the 4,096 phase
            share = first / STEPS
            routes[f"512+lengthen+4096x{q}"] = {
                "wall_seconds": round(share * base["wall_seconds"] + length["wall_seconds"] + second["wall_seconds"], 1),
                "cpu_seconds": round(share * base["cpu_seconds"] + length["cpu_seconds"] + second["cpu_seconds"], 1),
                "model": str(work / f"run512_4096x{q}")}
        (work / "routes.json").write_text(json.dumps(routes, indent=2) + "\n")
    if "score" in args.stages:
        routes = json.loads((work / "routes.json").read_text())
        if not (work / "cloze_blanks.jsonl").is_file():
            subprocess.run([py, "launch/evaluate.py", "cloze", "--model", routes["512+lengthen"]["model"],
                            "--corpus", *map(str, sorted((work / "heldout").glob("*.jsonl"))), "--num-blanks", "300",
                            "--seed", "0", "--save-blanks", str(work / "cloze_blanks.jsonl")], cwd=REPO, check=True,
                           capture_output=True)
        rows = ["| route | pretraining wall s | CPU s | val BPC (4,096 split) | val BPC (512 split) | blanks top-1 | "
                "top-5 | by position top-5 (bands) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, route in routes.items():
            s = stage(work, "scores_" + name.replace("+", "_"), lambda: scores(Path(route["model"]), work, log))
            bands = ", ".join(f"{b['band']} {b['top5']:.3f}" for b in s["by_position"]["bands"])
            rows.append(f"| {name} | {route['wall_seconds']:.0f} | {route['cpu_seconds']:.0f} | {s['val_bpc_4096']:.3f} | "
                        f"{s['val_bpc_512']:.3f} | {s['cloze']['top1']:.3f} | {s['cloze']['top5']:.3f} | {bands} |")
        (work / "table.md").write_text("\n".join(rows) + "\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
