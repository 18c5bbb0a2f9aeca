"""Sparse training under DDP, for tests/test_train.py.

Run alone it trains on the whole global batch; under `python -m torch.distributed.run
--nproc_per_node=N` each of the N gloo (CPU) processes takes its 1/N slice and DDP averages the
k-sized gradients. Either way rank 0 writes the trained diff to OUT.

    python tests/ddp_worker.py MODEL_DIR OUT.sft [--steps S]
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from sftdiff.train import attach, detach, train_steps

GLOBAL_BATCH = 8
SEQ_LEN = 12
K_PER_TENSOR = 40


def fixed_mask(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same random 40 positions per matrix on every rank (seeded)."""
    gen = torch.Generator().manual_seed(123)
    return {name: torch.randperm(p.numel(), generator=gen)[:K_PER_TENSOR].sort().values
            for name, p in model.named_parameters() if p.dim() == 2}


def global_batches(vocab_size: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=gen) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:  # a bounded timeout: a lost peer fails the run instead of hanging it
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    attach(model, fixed_mask(model))
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    share = GLOBAL_BATCH // world  # every rank holds the same number of tokens, so mean of means = mean
    local = [ids[rank * share:(rank + 1) * share] for ids in global_batches(model.config.vocab_size, args.steps)]
    train_steps(trained, [{"input_ids": ids, "labels": ids} for ids in local], args.steps, lr=1e-2)
    if rank == 0:
        detach(model).save(args.out, overwrite=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
