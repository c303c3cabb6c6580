"""The preprocess command as a user runs it: killed with SIGKILL and rerun, and on a 2-node Ray cluster.

The reference is an uninterrupted run of ``launch/preprocess.py`` with one worker on its own local
Ray; an interrupted-then-resumed run and a run on a ``ray.cluster_utils.Cluster`` with two nodes
(one CPU each) must produce the same bytes. The workers read their byte ranges and write their results
themselves (shared storage: every node runs on this machine), except in the cluster run that sends
them the data (``shared_storage=False``, the way for nodes that do not see the files). Near dedup and the quality filters are on (the defaults),
and the corpus holds near-copies that they remove.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster
from test_data_service_quality import near_copies

from data_service.config import PipelineConfig
from data_service.corpora import write_inews_corpus
from data_service.pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--seq-len", "128", "--rows-per-shard", "20", "--dupe-factor", "2", "--mask-prob", "0.15",
        "--max-predictions", "20", "--val-fraction", "0.1", "--seed", "3"]


def preprocess_command(corpus, output, *extra):
    return [sys.executable, str(REPO / "launch" / "preprocess.py"), "--input", str(corpus), "--output", str(output),
            *ARGS, *extra]


def output_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    full = write_inews_corpus(folder / "full", split="train")[0]
    path = folder / "news.jsonl"
    lines = full.read_text(encoding="utf-8").splitlines()[:150]
    path.write_text("\n".join(lines + near_copies(lines)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "data"
    done = subprocess.run(preprocess_command(corpus, out, "--num-workers", "1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # progress on stderr (documents, characters, tokens per second), the summary table on stdout
    progress = [line for line in done.stderr.splitlines() if line.startswith("[preprocess]")]
    assert progress and re.search(r"docs +[\d,]+ \([\d,]+/s\) +chars +[\d,]+ \([\d,]+/s\) +tokens", progress[-1])
    assert re.search(r"^train +\d+ +[\d,]+ +[\d,]+ +[\d,]+$", done.stdout, re.M), done.stdout
    assert "rejected" in done.stdout and "[preprocess]" not in done.stdout
    assert "near_duplicate 2" in done.stdout and re.search(r"^near_dedup +[\d,]+ +[\d,]+", done.stdout, re.M)
    return out


def kill_when(command, ready, timeout=120):
    """Start the command, SIGKILL it as soon as ``ready()`` holds; then clear its orphaned Ray processes."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:  # Ray's agents outlive a SIGKILLed driver; they are in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_at_any_stage_then_rerun_gives_the_bytes_of_an_uninterrupted_run(corpus, reference, tmp_path):
    out = tmp_path / "data"
    command = preprocess_command(corpus, out, "--num-workers", "2", "--chunk-mb", "0.02")
    # 1. killed while segmenting: some chunk results stored, no shard yet
    kill_when(command, lambda: any((out / "_work" / "chunks").glob("*.arrow")))
    assert not (out / "manifest.json").exists()
    # 2. rerun, killed while writing shards
    kill_when(command, lambda: len(list(out.glob("train-*.arrow"))) >= 3)
    assert not (out / "manifest.json").exists()
    written_before = {p.name for p in out.glob("train-*.arrow")}
    # 3. rerun to the end: stored chunks and shards are reused, the rest is redone
    done = subprocess.run(command + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "workers read and wrote shared storage" in done.stdout
    reused = re.search(r"(\d+) chunks processed, (\d+) reused; (\d+) shards written, (\d+) kept", done.stdout)
    assert reused, done.stdout
    assert int(reused.group(2)) > 0 and int(reused.group(4)) >= len(written_before) - 2
    assert output_files(out) == output_files(reference)
    assert not (out / "_work").exists()
    # 4. a rerun of a finished job only verifies
    again = subprocess.run(command + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete, verified" in again.stdout


@pytest.mark.parametrize("shared_storage", [None, False], ids=["shared-storage-auto", "data-sent"])
def test_a_two_node_cluster_gives_the_bytes_of_one_local_worker(corpus, reference, tmp_path, shared_storage):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert len(cluster.list_all_nodes()) == 2
        result = run(PipelineConfig(inputs=(str(corpus),), output=str(tmp_path / "data"), seq_len=128,
                                    rows_per_shard=20, dupe_factor=2, mask_prob=0.15, max_predictions=20,
                                    val_fraction=0.1, seed=3, ray_address=cluster.address, num_workers=2,
                                    chunk_bytes=32 << 10, progress=False, shared_storage=shared_storage))
        assert result.chunks_processed > 2
        assert result.shared_storage is (shared_storage is None)  # auto: both nodes run on this machine
        assert result.max_in_flight == 2  # --num-workers caps the tasks in flight on a cluster too
    finally:
        cluster.shutdown()
    assert output_files(tmp_path / "data") == output_files(reference)
