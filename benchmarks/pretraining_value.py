"""Does pretraining help? Fine-tune the quick start's architecture on CCF sentiment from three starts, same budget.

    python benchmarks/pretraining_value.py --quickstart-out quickstart_out      # after bash launch/quickstart.sh

Starts (the same 2-layer x 128 model, block_sparse, 512 positions):
- ``random``: random initialisation (BERT's, seeded);
- ``quickstart``: the quick start's exported model (``QUICKSTART_OUT/model``);
- ``long``: a longer CPU pretraining with the quick start's recipe (``--long-steps``, same shards, same config),
  run here with the ``deepspeed`` launcher (2 CPU processes) and exported.

Each start is fine-tuned with ``launch/finetune.py`` under the ``deepspeed`` launcher with the same budget
(``--max-len``, ``--epochs``, ``--lr``, batch, class weights) for every ``--seeds``; the TF-IDF baseline
(``launch/baseline.py``) runs once. The table gives dev and test macro-F1 as mean +- standard deviation over the
seeds. Everything lands in ``--work``; a rerun skips what is finished (a fine-tuning with its ``summary.json``,
a pretraining run at its last step) and continues a killed pretraining run with ``--resume``. Never run by the
tests.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], log: Path) -> None:
    print("$ " + " ".join(command), flush=True)
    started = time.time()
    with open(log, "a", encoding="utf-8") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}) after {time.time() - started:.0f} s; see {log}")
    print(f"  done in {time.time() - started:.0f} s (log {log})", flush=True)


def long_pretraining(args, quickstart: Path, work: Path) -> Path:
    """The quick start's command with more steps, resumable; returns the exported model."""
    run_dir, model_dir = work / "long_run", work / "long_model"
    if (model_dir / "config.json").is_file():
        return model_dir
    qs_args = json.loads((quickstart / "run" / "args.json").read_text())
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
               "--deepspeed_config", qs_args["deepspeed_config"], "--data", qs_args["data"],
               "--output-dir", str(run_dir), "--model-config", qs_args["model_config"],
               "--max-steps", str(args.long_steps), "--masking", qs_args["masking"],
               "--output-bias-init", qs_args.get("output_bias_init", "zero"), "--save-interval", "200",
               "--keep-checkpoints", "1", "--eval-interval", "500", "--eval-sequences", "64",
               "--final-eval-sequences", "all", "--eval-batch-size", "16", "--log-interval", "100",
               "--seed", str(qs_args["seed"]), "--resume"]
    if qs_args.get("mask_prob") is not None:
        command += ["--mask-prob", str(qs_args["mask_prob"])]
    if qs_args.get("mask_unit"):
        command += ["--mask-unit", qs_args["mask_unit"]]
    command += ["--embedding-init", qs_args.get("embedding_init") or "normal",
                "--output-vocab", qs_args.get("output_vocab") or "all"]
    run(command, work / "long_run.log")
    run([sys.executable, "launch/export.py", "--from", str(run_dir), "--to", str(model_dir)], work / "long_run.log")
    return model_dir


def random_model(quickstart: Path, work: Path, seed: int) -> Path:
    import torch

    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.tokenization import load_tokenizer

    out = work / "random_model"
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        config = LongformerZhConfig.from_json_file(str(quickstart / "model" / "config.json"))
        LongformerZhForMaskedLM(config).save_pretrained(out)
        load_tokenizer().save_pretrained(out)
    return out


# The fine-tuning settings the README's table was measured with; a run with other settings gets its own folder
# (named by what differs), so variants sit beside the table's runs and a rerun never mixes them.
FINETUNE_DEFAULTS = {"max_len": 128, "epochs": 2, "lr": 1e-3, "class_weight": "balanced"}


def finetune_variant(args) -> str:
    return "".join(f"-{key}={getattr(args, key)}" for key, value in FINETUNE_DEFAULTS.items()
                   if getattr(args, key) != value)


def finetune(args, start: str, model: Path, seed: int, work: Path) -> dict:
    return finetune_ccf(model, work / "finetune" / f"{start}{finetune_variant(args)}-seed{seed}", seed=seed,
                        max_len=args.max_len, epochs=args.epochs, lr=args.lr, class_weight=args.class_weight)


def finetune_ccf(model: Path, out: Path, *, seed: int, max_len: int, epochs: int, lr: float, class_weight: str,
                 eval_batch_size: int = 32) -> dict:
    """CCF sentiment fine-tuned from ``model`` into ``out`` (skipped when its summary.json exists; a killed run
    continues with --resume); its summary."""
    if not (out / "summary.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (out / "checkpoints" / "latest").is_file() else []
        run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/finetune.py",
             "--deepspeed_config", "ds_configs/cpu.json", "--model", str(model), "--task", "ccf-sentiment",
             "--output-dir", str(out), "--max-len", str(max_len), "--truncation", "head+tail",
             "--epochs", str(epochs), "--batch-size", "16", "--micro-batch-size", "4",
             "--eval-batch-size", str(eval_batch_size), "--lr", str(lr), "--class-weight", class_weight,
             "--seed", str(seed), "--log-every", "100", *resume], out / "finetune.log")
    return json.loads((out / "summary.json").read_text())


def tfidf(work: Path) -> dict:
    out = work / "tfidf"
    if not (out / "summary.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "launch/baseline.py", "--task", "ccf-sentiment", "--output-dir", str(out)],
            out / "baseline.log")
    return json.loads((out / "summary.json").read_text())


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart-out", type=Path, default=REPO / "quickstart_out")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks_out" / "pretraining_value")
    p.add_argument("--long-steps", type=int, default=4000, help="steps of the longer pretraining")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-len", type=int, default=FINETUNE_DEFAULTS["max_len"])
    p.add_argument("--epochs", type=int, default=FINETUNE_DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"])
    p.add_argument("--class-weight", choices=("balanced", "none"), default=FINETUNE_DEFAULTS["class_weight"])
    p.add_argument("--starts", nargs="+", default=["random", "quickstart", "long"])
    args = p.parse_args(argv)
    quickstart = args.quickstart_out.resolve()
    if not (quickstart / "model" / "config.json").is_file():
        raise SystemExit(f"{quickstart}/model is missing: run bash launch/quickstart.sh first (or --quickstart-out)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    models = {"quickstart": quickstart / "model"}
    if "random" in args.starts:
        models["random"] = random_model(quickstart, work, seed=1234)
    if "long" in args.starts:
        models["long"] = long_pretraining(args, quickstart, work)
    results = {start: [finetune(args, start, models[start], seed, work) for seed in args.seeds]
               for start in args.starts}
    baseline = tfidf(work)

    def val_bpc(start):
        run_dir = {"quickstart": quickstart / "run", "long": work / "long_run"}.get(start)
        if run_dir is None:
            return "-"
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
        return f"{lines[-1]['val_bpc']:.2f} (step {lines[-1]['step']})"

    rows = ["| start | validation BPC | dev macro-F1 | test macro-F1 | test accuracy | per-seed test macro-F1 |",
            "| --- | --- | --- | --- | --- | --- |"]
    for start, summaries in results.items():
        dev = [s["metrics"]["dev"]["macro_f1"] for s in summaries]
        test = [s["metrics"]["test"]["macro_f1"] for s in summaries]
        accuracy = [s["metrics"]["test"]["accuracy"] for s in summaries]
        rows.append(f"| {start} | {val_bpc(start)} | {spread(dev)} | {spread(test)} | {spread(accuracy)} | "
                    f"{', '.join(f'{t:.4f}' for t in test)} |")
    m = baseline["metrics"]
    rows.append(f"| TF-IDF char 1-3-grams + LR | - | {m['dev']['macro_f1']:.4f} | {m['test']['macro_f1']:.4f} | "
                f"{m['test']['accuracy']:.4f} | - |")
    table = "\n".join(rows)
    settings = (f"fine-tuning: launch/finetune.py, deepspeed --num_gpus 2, ds_configs/cpu.json, max-len {args.max_len} "
                f"head+tail, {args.epochs} epochs, batch 16, lr {args.lr}, class weight {args.class_weight}, seeds "
                f"{args.seeds}; long pretraining {args.long_steps} steps")
    print(table)
    print(settings)
    variant = finetune_variant(args)
    (work / f"table{variant}.md").write_text(table + "\n\n" + settings + "\n")
    (work / f"results{variant}.json").write_text(json.dumps({"settings": vars(args) | {"work": str(work),
                                                                           "quickstart_out": str(quickstart)},
                                                   "results": results, "tfidf": baseline}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
