"""distributed: `flexi train` on several processes, data parallel (DDP semantics) or with the frozen base sharded (FSDP).

    torchrun --nproc-per-node 8 -m flexicli train -m ckpt --skip-target 8 --batch-size 32
    accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m flexicli train -m ckpt --skip-target 8

The launcher sets WORLD_SIZE/RANK/LOCAL_RANK; `init()` reads them and starts the process group once (nccl on CUDA,
gloo on CPU). With one process and no launcher everything here is a no-op, so `train()` has a single code path.

Data parallel: each optimiser step's global batch (`batch_size` rows per micro-batch, picked by `batch_indices`) is cut
into `world_size` contiguous equal shards, rank r takes shard r. Each rank's loss is a mean over its own tokens, so the
mean of the ranks' gradients is the gradient one process computes on the whole batch; the same holds for the
skipped-layers measurement the budget threshold reads, which is averaged too, so every rank holds the same threshold.

Why an all-reduce of the flattened trainable gradients and not `DistributedDataParallel`: DDP's reducer fires from hooks
armed by `DDP.forward`, but a training step calls the decoder (twice: teacher and student) and the output head directly,
never `model.forward`, so a DDP wrapper would never sync. The trainable parameters (routers and adapters) are a few MB,
so one all-reduce per optimiser step after the last micro-batch costs nothing next to the forward passes; the result is
DDP's (mean of the ranks' gradients), reduced in float32. Like DDP at construction, `prepare()` broadcasts the trainable
parameters from rank 0 so that every rank starts from the same weights.

FSDP (`ACCELERATE_USE_FSDP=true`, which `accelerate launch` sets from an FSDP config, or `FLEXI_FSDP=1` with torchrun):
the frozen base is sharded with torch's FSDP2 `fully_shard`, whose all-gathers fire from hooks on each sharded module's
own call, so they work however the decoder is reached:
  - each routed layer's attention and MLP (FlexiLayer calls them one by one, never the layer's forward),
  - each unrouted decoder layer as a whole,
  - the decoder itself (the remaining norms), as the root.
Replicated, not sharded: routers and adapters (trained; their gradients go through the same all-reduce as above), the
input embeddings and the output head (`objectives.logits_fn` calls the head outside the decoder's forward, and
SmolLM2-like models tie it to the embeddings). For Llama-3-8B that is 2 x 1 GB per GPU; the ~14 GB of layers are split.
Every rank runs the same held-out evaluation (all ranks see the same rows: a sharded module's all-gather is a
collective, and a no-grad routed layer skips its MLP call when no token runs it, so ranks on different data could
disagree on which collectives to join). Rank 0 alone writes metrics and checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.errors import BadInput


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    fsdp: bool = False
    device: str | None = None  # where this rank computes; None: wherever the model already is

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group is running (several processes, or FSDP even on one)."""
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def load_device(self) -> str | None:
        """Where to load the base: on CPU under FSDP (sharding then moves each rank's shard to its GPU)."""
        return "cpu" if self.fsdp else self.device

    # ---- data ---------------------------------------------------------------------------------------------------
    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise BadInput(f"--batch-size {batch_size} does not split evenly over {self.world_size} processes",
                           f"use a multiple of {self.world_size} (the batch size is the global batch)")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global micro-batch."""
        return shard_rows(batch, self.rank, self.world_size)

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. fills the self-generated data cache), the others after it (reading the
        cache). Under FSDP every rank must take part in each forward pass, so all run the body together."""
        if not self.grouped or self.fsdp:
            yield
            return
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # ---- gradients and metrics ----------------------------------------------------------------------------------
    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every rank's gradients by their mean over ranks: one all-reduce of the flattened grads."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of a few numbers (equal shards: the mean over the global batch)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.on_cuda else "cpu")
        torch.distributed.all_reduce(t)
        return (t / self.world_size).tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's equal-shaped tensor, concatenated (the budget threshold is a quantile of the global batch)."""
        if self.world_size == 1:
            return t
        x = t.to(self.device) if self.on_cuda else t.cpu()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def global_stats(self, stats: list[dict]) -> list[dict]:
        """train_step's per-micro-batch numbers (loss, agreement, skipped layers) averaged over ranks."""
        keys = ("loss", "agree", "skipped")
        if self.world_size == 1:
            return stats
        flat = self.mean([s[k] for s in stats for k in keys])
        return [{**s, **dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)]))} for i, s in enumerate(stats)]

    # ---- writing ------------------------------------------------------------------------------------------------
    @property
    def on_cuda(self) -> bool:
        return bool(self.device) and str(self.device).startswith("cuda")

    def barrier(self) -> None:
        if self.grouped:
            if self.on_cuda:
                torch.distributed.barrier(device_ids=[torch.device(self.device).index or 0])
            else:
                torch.distributed.barrier()

    def on_main(self, fn, *args, **kwargs) -> None:
        """Run `fn` on rank 0 only (writing a checkpoint); every rank leaves once it is done."""
        if self.is_main:
            fn(*args, **kwargs)
        self.barrier()


_CURRENT: DistContext | None = None


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = batch.shape[0]
    if n % world_size:
        raise BadInput(f"a batch of {n} rows does not split evenly over {world_size} processes")
    per = n // world_size
    return batch[rank * per:(rank + 1) * per]


def init(device: str | None = None) -> DistContext:
    """Read the launcher's environment and start the process group (once). `device`: the user's --device; under a
    launcher with CUDA each rank takes cuda:LOCAL_RANK unless the user asked for cpu."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or os.environ.get("FLEXI_FSDP") == "1"
    if "WORLD_SIZE" not in os.environ:
        if fsdp:
            raise BadInput("FSDP needs a launcher that starts the processes",
                           "run under accelerate launch or torchrun (see recipes/accelerate/)")
        _CURRENT = DistContext(device=device)
        return _CURRENT
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    ctx = DistContext(world_size=world, rank=rank, fsdp=fsdp, device=device)
    if (world > 1 or fsdp) and not ctx.grouped:
        kw = {"device_id": torch.device(device)} if cuda else {}
        torch.distributed.init_process_group("nccl" if cuda else "gloo", **kw)
        atexit.register(_shutdown)
    _CURRENT = ctx
    return ctx


def current() -> DistContext:
    """The context `init()` made; started from the environment on first use (train() called from a script)."""
    return _CURRENT if _CURRENT is not None else init()


def _shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- preparing the model ----------------------------------------------------------------------------------------
def prepare(fm, ctx: DistContext) -> None:
    """Move the model to this rank's device (sharding the frozen base under FSDP) and give every rank rank 0's
    trainable weights. A no-op for one process without FSDP."""
    if ctx.fsdp:
        shard_base(fm, ctx)
    elif ctx.device is not None and ctx.world_size > 1:
        fm.model.to(ctx.device)
    if ctx.world_size > 1:
        with torch.no_grad():
            for p in fm.trainable_parameters():
                torch.distributed.broadcast(p.data, src=0)


def shard_base(fm, ctx: DistContext) -> None:
    """FSDP2 over the frozen base (see the module docstring for what is sharded and why)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..core.families import LayerParts
    from ..core.routed_layer import FlexiLayer
    from ..core.flexi_model import submodule
    from ..core.flexi_model import decoder_of

    model, parts = fm.model, LayerParts.from_dict(fm.config.parts)
    # the inference fast path calls the attention's projections directly, around the module hooks that all-gather
    # their shards: held-out evaluation during sharded training takes the reference path
    fm.state.fast_path = False
    device = torch.device(ctx.device or "cpu")
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for layer in submodule(model, parts.layers):
        if isinstance(layer, FlexiLayer):
            for name in (parts.attn, parts.mlp):
                fully_shard(getattr(layer.base_layer, name), mesh=mesh)
        else:
            fully_shard(layer, mesh=mesh)
    replicated = set(fm.trainable_parameters())
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        if mod is not None:
            replicated.update(mod.parameters())
    fully_shard(decoder_of(model), mesh=mesh, ignored_params=replicated)
    # fully_shard moved what it manages to the mesh's device; the replicated parameters follow by hand (`.data`, so
    # tied weights stay one Parameter), and so do buffers outside the decoder, if any.
    with torch.no_grad():
        for p in replicated:
            p.data = p.data.to(device)
        for mod in model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != device:
                    mod._buffers[name] = buf.to(device)
