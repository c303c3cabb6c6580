"""The exit-status contract of a training run under the real ``deepspeed`` launcher, run again and again (issue 26).

Run by hand, never by the tests::

    python benchmarks/exit_statuses.py --runs 20            # every path 20 times
    python benchmarks/exit_statuses.py --runs 3 --paths pretrain-nan finetune-nan

launch/pretrain.py and launch/finetune.py promise: 0 done, 2 bad input or config, 3 the loss stayed non-finite
(--max-nonfinite-steps), 4 another process of the run stopped. Each failure path is run ``--runs`` times with
2 processes on a tiny model (tiny shards built without Ray, as the tests' ``shard_folder`` fixture does; a tiny
random classifier and a 3-class jsonl task for fine-tuning), one thread per process, each run on its own
``--master_port``. Faults are injected as the tests do (``LFZH_FAULT``, lfzh_ds/training/trainer.py):

    pretrain-config     train_batch_size 6 on 2 processes x micro-batch 2: refused before the processes start -> 2
    pretrain-shard      a corrupt shard: rank 0's checksum check, broadcast, every process stops after init -> 2
    pretrain-nan        the loss NaN from step 1, --max-nonfinite-steps 1 -> 3
    pretrain-peer       two "nodes" of one process each (--no_ssh --node_rank); rank 0 (node 0) SIGKILLs itself at
                        step 2: node 1's launcher, whose process survived, must exit 4
    finetune-config     --max-len 512 on a model of 256 positions: every process stops after init -> 2
    finetune-nan        the loss NaN from step 1, --max-nonfinite-steps 1 -> 3
    finetune-peer       as pretrain-peer -> 4
    pretrain-peer-1node (not in the default set) one launcher, 2 processes, rank 0 SIGKILLed: the launcher ends
                        with the status of the first failed process it polls (once a second): the killed one
                        (-9, exit 247) or the survivor (4)

A run counts as right when the launcher's status is the expected one and the path's message is in its output.
Prints one line per run (``-v``) and a table: statuses seen per path, messages found, aborts
("terminate called" in the output), seconds per run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 128, "attention_window": 32, "sparse_block_size": 16}
DS_CONFIG = {
    "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 1000,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                      "warmup_num_steps": 2, "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2},
}
RUN_TIMEOUT_S = 300
SURVIVOR_TIMEOUT_S = 120  # from the start of a two-node run to the survivor's exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ inputs

def build_shards(folder: Path, shards: dict, seq_len: int = 64) -> Path:
    """A dataset folder in the real shard format without Ray (tests/conftest.py's ``shard_folder``): documents of
    random real token ids in words of 2, packed and statically masked by the data service's ``build_shard``."""
    import numpy as np

    from data_service.pack import build_shard
    from lfzh_ds.constants import FIRST_REAL_TOKEN_ID, SCHEMA_VERSION, VOCAB_MD5, VOCAB_SIZE
    from lfzh_ds.shards import MANIFEST_NAME, shard_name

    folder.mkdir(parents=True)
    config = {"seq_len": seq_len, "dupe_factor": 2, "mask_prob": 0.15, "max_predictions": 20,
              "wwm_max_word_len": None, "seed": 0}
    rng = np.random.default_rng(1234)
    splits = {}
    for split in ("train", "validation"):
        entries = []
        for index, doc_lengths in enumerate(shards[split]):
            ids = rng.integers(FIRST_REAL_TOKEN_ID, VOCAB_SIZE, size=int(sum(doc_lengths))).astype(np.uint16)
            starts = np.concatenate([(np.arange(d) % 2 == 0) for d in doc_lengths]).astype(np.uint8)
            data, stats = build_shard(split, index, ids, starts, np.asarray(doc_lengths, np.int64), config)
            (folder / shard_name(split, index)).write_bytes(data)
            entries.append({"file": shard_name(split, index), "rows": stats["rows"], "tokens": stats["tokens"],
                            "documents": len(doc_lengths), "sha256": stats["sha256"]})
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries)}
    (folder / MANIFEST_NAME).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "vocab_md5": VOCAB_MD5,
                                                    "config": config, "splits": splits}))
    return folder


def build_inputs(root: Path) -> dict:
    import torch

    from lfzh_ds.configuration import LongformerZhConfig
    from lfzh_ds.modeling import LongformerZhForMaskedLM
    from lfzh_ds.shards import shard_name

    shards = build_shards(root / "shards", {"train": [[40] * 24], "validation": [[40] * 2]})
    corrupt = build_shards(root / "corrupt", {"train": [[40] * 24], "validation": [[40] * 2]})
    shard = corrupt / shard_name("train", 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the checksum in the manifest no longer matches
    shard.write_bytes(bytes(data))
    (root / "tiny.json").write_text(json.dumps(TINY_MODEL))
    (root / "ds.json").write_text(json.dumps(DS_CONFIG))
    (root / "ds_bad.json").write_text(json.dumps({**DS_CONFIG, "train_batch_size": 6}))  # 6 % (2 x 2) != 0
    hostfile = root / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh starts nothing remote

    torch.manual_seed(0)  # fine-tuning: a tiny random masked LM (a new classification head) and a 3-class task
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                attention_window=32, max_position_embeddings=256)
    LongformerZhForMaskedLM(config).save_pretrained(root / "model")
    rows = [{"text": f"{word}。" * 20, "label": label}
            for word, label in [("天气晴朗", "晴"), ("大雨倾盆", "雨"), ("大雪纷飞", "雪")] * 8]
    for split, part in (("train", rows), ("dev", rows[:6])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                             encoding="utf-8")
    return {"root": root, "shards": shards, "corrupt": corrupt, "hostfile": hostfile}


# ------------------------------------------------------------------------------------------------ commands

def pretrain_args(inputs: dict, run_dir: Path, *, data=None, ds="ds.json", steps=4) -> list[str]:
    root = inputs["root"]
    return ["launch/pretrain.py", "--deepspeed_config", str(root / ds), "--data", str(data or inputs["shards"]),
            "--output-dir", str(run_dir), "--model-config", str(root / "tiny.json"), "--max-steps", str(steps),
            "--save-interval", "1000", "--eval-interval", "0", "--log-interval", "1"]


def finetune_args(inputs: dict, run_dir: Path, *, max_len=64) -> list[str]:
    root = inputs["root"]
    return ["launch/finetune.py", "--deepspeed_config", "ds_configs/cpu.json", "--model", str(root / "model"),
            "--task", "jsonl", "--no-dedup", "--train", str(root / "train.jsonl"), "--dev", str(root / "dev.jsonl"),
            "--output-dir", str(run_dir), "--max-len", str(max_len), "--epochs", "1", "--batch-size", "4",
            "--micro-batch-size", "1", "--lr", "1e-3", "--log-every", "1"]


# name: (command builder (inputs, run_dir) -> script args, LFZH_FAULT, expected status, text in the output, nodes)
PATHS = {
    "pretrain-config": (lambda i, d: pretrain_args(i, d, ds="ds_bad.json"), None, 2,
                        "train_batch_size=6 does not divide by train_micro_batch_size_per_gpu=2 x 2 processes", 1),
    "pretrain-shard": (lambda i, d: pretrain_args(i, d, data=i["corrupt"]), None, 2,
                       "error: --data {corrupt}: ", 1),
    "pretrain-nan": (lambda i, d: [*pretrain_args(i, d), "--max-nonfinite-steps", "1"], "nan_from_step=1", 3,
                     "error: the loss was not finite for 1 consecutive steps (steps 1-1); stopping", 1),
    "pretrain-peer": (pretrain_args, "kill_at_step=2", 4,
                      "error: rank 1 lost contact with another process of the run (", 2),
    "finetune-config": (lambda i, d: finetune_args(i, d, max_len=512), None, 2,
                        "finetune.py: error: --max-len 512 exceeds the model's 256 positions", 1),
    "finetune-nan": (lambda i, d: [*finetune_args(i, d), "--max-nonfinite-steps", "1"], "nan_from_step=1", 3,
                     "finetune.py: error: the loss was not finite for 1 consecutive steps (steps 1-1); stopping", 1),
    "finetune-peer": (finetune_args, "kill_at_step=2", 4,
                      "finetune.py: error: rank 1 lost contact with another process of the run (", 2),
    "pretrain-peer-1node": (pretrain_args, "kill_at_step=2", 4,
                            "error: rank 1 lost contact with another process of the run (", 1),
}
DEFAULT_PATHS = [name for name in PATHS if name != "pretrain-peer-1node"]


def environment(fault: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("LFZH_FAULT", None)
    if fault:
        env["LFZH_FAULT"] = fault
    return env


def run_once(name: str, inputs: dict, run_dir: Path) -> tuple[int | None, str, float]:
    """One run of a path: (the launcher's status (node 1's on two nodes; None: timed out), output, seconds)."""
    build, fault, _, _, nodes = PATHS[name]
    script = build(inputs, run_dir)
    env = environment(fault)
    port = str(free_port())
    started = time.monotonic()
    if nodes == 1:
        command = ["deepspeed", "--num_gpus", "2", "--master_port", port, *script]
        try:
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=RUN_TIMEOUT_S, start_new_session=True)
            return result.returncode, result.stdout + result.stderr, time.monotonic() - started
        except subprocess.TimeoutExpired as err:
            return None, str(err.stdout or "") + str(err.stderr or ""), time.monotonic() - started
    # Two "nodes" of one process each: rank 0 (node 0) kills itself; node 1's launcher reports its survivor.
    logs = [run_dir.parent / f"{run_dir.name}.node{rank}.log" for rank in (0, 1)]
    procs = []
    for rank in (0, 1):
        command = ["deepspeed", "--hostfile", str(inputs["hostfile"]), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", port, *script]
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
    try:
        status = procs[1].wait(timeout=SURVIVOR_TIMEOUT_S)
        procs[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
        status = procs[1].poll()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - started
    output = logs[1].read_text(errors="replace") + f"\n[node 0 launcher exit {procs[0].returncode}]\n"
    return status, output, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs per path (default 20)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=DEFAULT_PATHS)
    parser.add_argument("--workdir", type=Path, help="keep the inputs and the runs' folders and logs here")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per run")
    args = parser.parse_args(argv)
    import torch

    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}; OMP_NUM_THREADS=1 per process; "
          f"{args.runs} run(s) per path", flush=True)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="exit_statuses_"))
    inputs = build_inputs(root / "inputs")
    (root / "runs").mkdir(exist_ok=True)
    results: dict[str, list] = {}
    for name in args.paths:
        _, _, expected, text, _ = PATHS[name]
        text = text.format(corrupt=inputs["corrupt"])
        results[name] = []
        for i in range(args.runs):
            run_dir = root / "runs" / f"{name}-{i}"
            status, output, seconds = run_once(name, inputs, run_dir)
            found, aborted = text in output, "terminate called" in output
            results[name].append((status, found, aborted, seconds))
            (root / "runs" / f"{name}-{i}.log").write_text(output)
            if args.verbose or status != expected or not found:
                print(f"  {name} #{i + 1}: exit {status}{'' if found else ', message missing'}"
                      f"{', abort in output' if aborted else ''} ({seconds:.1f} s)", flush=True)
        right = sum(status == expected and found for status, found, _, _ in results[name])
        print(f"{name}: {right}/{args.runs} right", flush=True)

    print("\n| path | expected | right | statuses seen | message found | 'terminate called' | s per run |")
    print("|---|---|---|---|---|---|---|")
    all_right = True
    for name, rows in results.items():
        expected = PATHS[name][2]
        seen = Counter(status for status, *_ in rows)
        right = sum(status == expected and found for status, found, _, _ in rows)
        all_right &= right == len(rows) or name == "pretrain-peer-1node"
        statuses = ", ".join(f"{n}x exit {s}" for s, n in sorted(seen.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        print(f"| {name} | {expected} | {right}/{len(rows)} | {statuses} | {sum(r[1] for r in rows)}/{len(rows)} | "
              f"{sum(r[2] for r in rows)} | {sum(r[3] for r in rows) / len(rows):.1f} |")
    print(f"\nlogs: {root / 'runs'}")
    return 0 if all_right else 1


if __name__ == "__main__":
    sys.exit(main())
