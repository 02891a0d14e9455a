"""DDP the way users launch it (issue 12, defects 1 and 2): the CLI with ``strategy: ddp``, and a
task mix that stays the one-process mix when two ranks share it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from test_cli import MAIN_CONFIG, tiny_overrides
from unified_vlm.datamodules.unified_datamodule import TaskMixSampler, UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_fit_and_test_from_the_cli_with_a_logger(tmp_path, tiny_vq_dir):
    """Rank 0 used to wait forever in a broadcast (``trainer.log_dir``) that only it reached."""
    tiny = tiny_overrides(tmp_path, tiny_vq_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "unified_vlm", "fit", "--config", str(MAIN_CONFIG), "--config", str(tiny),
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"DDP fit from the CLI did not finish in 240 s (hang):\n{(err.stderr or b'')[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    scores = json.loads((run / "test_scores.json").read_text())
    assert scores["summary"]["all_turns"]["count"] > 0
    # Each test question is scored once: the 3 test watches' records do not split evenly over 2
    # ranks, and Lightning's padded sampler used to score the first record twice.
    asked = [(r["record_id"], r["turn"]) for r in scores["results"]]
    assert len(asked) == len(set(asked)) == scores["summary"]["all_turns"]["count"]


def test_ranks_take_their_slice_of_the_one_process_batches():
    tasks = ["vqa", "caption", "generation"] * 30
    lengths = [(7 * i) % 23 for i in range(len(tasks))]
    kwargs = dict(proportions={"vqa": 0.6, "caption": 0.2, "generation": 0.2}, chunk=8, seed=3, lengths=lengths, length_pool=2)
    one = list(TaskMixSampler(tasks, batch_size=8, **kwargs))
    ranks = [list(TaskMixSampler(tasks, batch_size=4, num_replicas=2, rank=r, **kwargs)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # every rank makes the same number of steps
    for g in range(len(one) // 8):
        assert ranks[0][4 * g:4 * g + 4] + ranks[1][4 * g:4 * g + 4] == one[8 * g:8 * g + 8]
        if g < len(one) // 8 - 3:  # the last runs hold each task's remainder and may mix
            for mine in (ranks[0][4 * g:4 * g + 4], ranks[1][4 * g:4 * g + 4]):
                assert len({tasks[i] for i in mine}) == 1
    # Lightning leaves a DistributedSampler alone instead of wrapping (and reshuffling) it.
    assert isinstance(TaskMixSampler(tasks, batch_size=4, num_replicas=2, rank=1), DistributedSampler)


class RecordBatches(L.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "ids": batch["ids"], "tasks": batch["tasks"]}) + "\n")


def test_two_processes_train_on_the_one_process_batches(tiny_model_kwargs, tmp_path):
    data = dict(image_size=16, num_train_watches=12, num_val_watches=2, global_batch_size=4, num_workers=0,
                group_by_task=True, proportions={"vqa": 0.5, "caption": 0.25, "generation": 0.25})
    torch.manual_seed(0)
    model = UnifiedVLM(**tiny_model_kwargs)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[RecordBatches(tmp_path)],
    )
    trainer.fit(model, datamodule=UnifiedDataModule(**data))
    seen = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]

    single = UnifiedDataModule(collator=model.collator, **data)
    single.setup("fit")
    dataset = single.datasets["train"]
    order = list(single._sampler(dataset))
    ids = [dataset.records.record(i)["id"] for i in order]
    for step in range(3):
        assert len(seen[0][step]["ids"]) == len(seen[1][step]["ids"]) == 2
        assert seen[0][step]["ids"] + seen[1][step]["ids"] == ids[4 * step:4 * step + 4]
        assert len(set(seen[0][step]["tasks"])) == len(set(seen[1][step]["tasks"])) == 1
