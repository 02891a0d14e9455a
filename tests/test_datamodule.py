"""The mixing DataModule: task filters, proportions, batch-size derivation, file-backed data, DDP."""
from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch

from unified_vlm.datamodules.collate import ConversationCollator
from unified_vlm.datamodules.materialize import materialize
from unified_vlm.datamodules.unified_datamodule import MODES, UnifiedDataModule
from unified_vlm.models.unified import UnifiedVLM


@pytest.fixture(scope="module")
def collator():
    from unified_vlm.models.builders import build_text_tokenizer

    return ConversationCollator(build_text_tokenizer("builtin"), num_understanding_tokens=4, num_generation_tokens=16)


def make(collator, **kwargs):
    defaults = dict(image_size=16, num_train_watches=30, num_val_watches=2, num_test_watches=3, global_batch_size=6, num_workers=0)
    defaults.update(kwargs)
    dm = UnifiedDataModule(collator=collator, **defaults)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_keeps_only_its_tasks(collator, mode):
    dm = make(collator, mode=mode)
    tasks = Counter(t for batch in dm.train_dataloader() for t in batch["tasks"])
    assert set(tasks) == set(MODES[mode])
    assert sum(tasks.values()) == 30 * len(MODES[mode])


def test_proportions_reweight_the_mix(collator):
    dm = make(collator, num_train_watches=200, proportions={"generation": 0.6, "vqa": 0.2, "caption": 0.2})
    tasks = Counter(t for batch in dm.train_dataloader() for t in batch["tasks"])
    total = sum(tasks.values())
    assert abs(tasks["generation"] / total - 0.6) < 0.06
    assert abs(tasks["vqa"] / total - 0.2) < 0.06


def test_bad_mode_and_proportions_are_refused(collator):
    with pytest.raises(ValueError, match="data.mode"):
        UnifiedDataModule(mode="both", collator=collator)
    with pytest.raises(ValueError, match="excludes"):
        UnifiedDataModule(mode="understanding", proportions={"generation": 1.0}, collator=collator)
    with pytest.raises(ValueError, match="non-negative"):
        UnifiedDataModule(proportions={"vqa": -1.0}, collator=collator)


def test_micro_batch_is_global_over_world_and_accumulation(collator):
    dm = make(collator, global_batch_size=32)
    assert dm.micro_batch_size() == 32

    class FakeTrainer:
        world_size, accumulate_grad_batches = 2, 4

    dm.trainer = FakeTrainer()
    assert dm.micro_batch_size() == 4
    FakeTrainer.world_size = 3
    with pytest.raises(ValueError, match="not divisible"):
        dm.micro_batch_size()


def test_records_file_gives_the_same_batches_as_streaming(collator, tmp_path):
    materialize(tmp_path / "train", split="train", num_watches=4, image_size=16, progress=False)
    streamed = make(collator, num_train_watches=4)
    from_file = make(collator, train_records=str(tmp_path / "train" / "train.jsonl"))
    a = next(iter(torch.utils.data.DataLoader(streamed.datasets["train"], batch_size=12, collate_fn=collator)))
    b = next(iter(torch.utils.data.DataLoader(from_file.datasets["train"], batch_size=12, collate_fn=collator)))
    for key in ("input_ids", "labels", "attention_mask", "und_pixel_values", "gen_pixel_values"):
        assert torch.equal(a[key], b[key]), key


def test_test_split_holds_vqa_generation_and_caption_records(collator):
    dm = UnifiedDataModule(collator=collator, image_size=16, num_test_watches=3, eval_batch_size=4, num_workers=0)
    dm.setup("test")
    records = [r for batch in dm.test_dataloader() for r in batch]
    assert Counter(r["task"] for r in records) == {"generation": 3, "vqa": 3, "caption": 3}
    assert records[0]["image"].shape == (3, 16, 16)




def test_test_mode_scores_every_task_of_a_model_trained_on_one(collator):
    """Stage 2 of the transfer test trains on generation only and is scored on VQA (docs/paper.md 5.4)."""
    dm = UnifiedDataModule(collator=collator, mode="generation", test_mode="mixed", image_size=16, num_test_watches=3,
                           eval_batch_size=4, num_workers=0)
    dm.setup("test")
    assert Counter(dm.datasets["test"].tasks()) == {"generation": 3, "vqa": 3, "caption": 3}
    dm = UnifiedDataModule(collator=collator, mode="generation", image_size=16, num_test_watches=3, num_workers=0)
    dm.setup("test")
    assert Counter(dm.datasets["test"].tasks()) == {"generation": 3}  # default: the training mode's tasks
    with pytest.raises(ValueError, match="data.test_mode"):
        UnifiedDataModule(collator=collator, test_mode="everything")

def test_test_records_are_sharded_over_ranks_without_repeats(collator):
    """Under DDP every test record goes to exactly one rank, also when the split is uneven
    (Lightning's own sampler pads by repeating records, which were then scored twice)."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    dm = UnifiedDataModule(collator=collator, image_size=16, num_test_watches=3, eval_batch_size=4, num_workers=0)
    dm.setup("test")
    size = len(dm.datasets["test"])
    assert size % 2 == 1  # uneven: the case Lightning pads
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        sampler = dm.test_dataloader().sampler
        assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it instead of wrapping its own
        shards.append(list(sampler))
    assert sorted(shards[0] + shards[1]) == list(range(size))
    dm.trainer = None
    assert not isinstance(dm.test_dataloader().sampler, DistributedSampler)  # one process: the plain order

def test_ddp_two_processes_fit(tiny_model_kwargs, tmp_path):
    """The distributed path (gloo, fork) runs: DistributedSampler wrapping, loss sync, unused-head guard."""
    torch.manual_seed(0)
    model = UnifiedVLM(**tiny_model_kwargs)
    dm = UnifiedDataModule(image_size=16, num_train_watches=8, num_val_watches=2, global_batch_size=4, num_workers=0, mode="understanding")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=2, limit_val_batches=1, val_check_interval=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit(model, datamodule=dm)
    # The forked workers trained; the launcher hands their final weights back to this process.
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no parameter changed after a 2-process fit"
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_group_by_task_gives_one_task_batches_and_covers_every_record(collator):
    dm = make(collator, num_train_watches=20, group_by_task=True)
    batches = list(dm.train_dataloader())
    assert all(len(set(b["tasks"])) == 1 for b in batches[:-3])  # 20 per task = 3 full runs of 6 + a remainder
    assert len(batches) == 10
    ids = [i for b in batches for i in b["ids"]]
    assert len(ids) == len(set(ids)) == 60
    dm.train_dataloader().sampler.set_epoch(1)
    again = [i for b in dm.train_dataloader() for i in b["ids"]]
    assert sorted(again) == sorted(ids)


def test_length_pool_sorts_neighbouring_batches_by_length_and_keeps_every_record(collator):
    plain = make(collator, num_train_watches=60, group_by_task=True, proportions={"vqa": 1.0, "caption": 1.0, "generation": 1.0})
    grouped = make(collator, num_train_watches=60, group_by_task=True, proportions={"vqa": 1.0, "caption": 1.0, "generation": 1.0}, length_pool=5)
    dataset = grouped.datasets["train"]
    lengths = dataset.text_lengths()
    assert len(lengths) == 180
    assert all(lengths[i] == sum(len(t["value"]) for t in dataset[i]["conversations"]) for i in (0, 1, 2, 100))
    order_plain = list(plain.train_dataloader().sampler)
    order_grouped = list(grouped.train_dataloader().sampler)
    assert sorted(order_plain) == sorted(order_grouped)  # the same draw, only regrouped

    def padded(order):  # what a batch costs: its longest record times its size
        return sum(max(lengths[i] for i in order[k:k + 6]) * len(order[k:k + 6]) for k in range(0, len(order), 6))

    assert padded(order_grouped) < padded(order_plain)
    tasks = grouped.datasets["train"].tasks()
    assert all(len({tasks[i] for i in order_grouped[k:k + 6]}) == 1 for k in range(0, 150, 6))
    assert order_grouped == list(grouped.train_dataloader().sampler)  # deterministic for an epoch


def test_length_pool_is_validated():
    from unified_vlm.datamodules.unified_datamodule import TaskMixSampler

    with pytest.raises(ValueError, match="length_pool"):
        TaskMixSampler(["vqa"] * 4, chunk=2, lengths=[1, 2, 3, 4], length_pool=0)
    with pytest.raises(ValueError, match="lengths"):
        TaskMixSampler(["vqa"] * 4, chunk=2, lengths=[1, 2], length_pool=2)
