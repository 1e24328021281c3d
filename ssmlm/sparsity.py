"""Sparse projections: N:M, block and unstructured magnitude masks on a model's nn.Linear weights, computed once
or grown gradually during training (the cubic schedule of Zhu & Gupta 2017), with the savings they buy.

    ssmlm-train model=mamba sparsity=nm_2_4        # 2:4 along the input dim (NVIDIA's sparse tensor cores)
    ssmlm-train model=mamba sparsity=block         # 8x8 blocks, half of them kept
    ssmlm-train model=mamba sparsity=magnitude     # unstructured, pruned gradually to density 0.5

Each targeted ``nn.Linear`` gets a bool buffer ``weight_mask`` beside its weight (:func:`attach_masks`), so masks
are saved in checkpoints and ``LMModule.load_from_checkpoint`` rebuilds them. The :class:`Sparsify` callback keeps
the masked weights exactly zero: it masks the gradients before each optimizer step (gradient clipping and the
optimizer see the kept weights only) and the weights after it, and recomputes the masks from the weights'
magnitudes at the steps the schedule names. Its own state (the step of the last mask update) is checkpointed
too, so a resumed run continues the schedule exactly.

Weights are masked, not stored sparse: training costs what the dense model costs. The FLOPs of
:func:`sparsity_report` are what a sparse kernel could skip (``scripts/bench_sparsity.py`` times one for 2:4).
Hand-written rather than Lightning's ``ModelPruning``, which prunes at epoch ends (runs here count steps) and
saves checkpoints with its masks folded into the weights, so a resumed run could not continue its schedule.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ssmlm.errors import ConfigError

PATTERNS = ("none", "nm", "block", "unstructured")
SCHEDULES = ("one_shot", "gradual")
MASK = "weight_mask"
# ``targets: null``: every nn.Linear weight inside the residual blocks (``blocks.<i>.`` in most families,
# ``backbone.layers.<i>.`` in Mamba), so never the embedding, the head or the diagonal SSM's input projection,
# except Mamba's dt_proj: a rank-ceil(d_model/16) factor, too thin to prune (its in-dim is the rank).
IN_A_BLOCK = re.compile(r"^(blocks|backbone\.layers)\.\d+\.")
THIN_FACTOR = re.compile(r"\.dt_proj\.")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """The ``sparsity`` config node (conf/sparsity/), checked. ``start``/``end``: an int is an optimizer step,
    a float in [0, 1] a fraction of the run's optimizer steps."""

    pattern: str = "none"
    targets: tuple[str, ...] | None = None  # regexes (re.search) over parameter names; None = the default above
    exclude: tuple[str, ...] = ()
    n: int = 2  # nm: keep n of every m consecutive weights along the input dim
    m: int = 4
    block: tuple[int, int] = (8, 8)  # block: (rows = output features, columns = input features)
    density: float | None = None  # block / unstructured: the fraction of targeted weights kept at the end
    schedule: str = "one_shot"  # one_shot: masks computed at `start`; gradual: from `start` to `end`
    start: int | float = 0
    end: int | float = 1.0
    every: int = 10  # gradual: steps between mask updates

    @classmethod
    def from_dict(cls, node: Mapping | None) -> SparsityConfig:
        if not node or node.get("pattern", "none") == "none":
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - fields)
        if unknown:
            raise ConfigError(f"sparsity: unknown key(s) {', '.join(unknown)}; "
                              f"the keys are {', '.join(sorted(fields))}")
        values = dict(node)
        for key in ("targets", "exclude"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        if values.get("targets") is not None:
            values["targets"] = tuple(values["targets"])
        values["exclude"] = tuple(values.get("exclude") or ())
        values["block"] = tuple(int(b) for b in values.get("block", cls.block))
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if self.pattern not in PATTERNS:
            raise ConfigError(f"sparsity.pattern={self.pattern!r}: use one of {', '.join(PATTERNS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"sparsity.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        for key in ("targets", "exclude"):
            for regex in getattr(self, key) or ():
                try:
                    re.compile(regex)
                except re.error as e:
                    raise ConfigError(f"sparsity.{key}: {regex!r} is not a regular expression ({e})") from e
        if self.targets is not None and not self.targets:
            raise ConfigError("sparsity.targets=[] selects nothing: list regexes, or null for the default")
        if self.pattern == "nm":
            if not 0 < self.n < self.m:
                raise ConfigError(f"sparsity.n={self.n}, sparsity.m={self.m}: need 0 < n < m (e.g. 2:4)")
            if self.density is not None:
                raise ConfigError(f"sparsity.density={self.density}: N:M keeps n/m = {self.n}/{self.m} of the "
                                  f"weights; leave density null")
            if self.schedule == "gradual":
                raise ConfigError("sparsity.schedule=gradual: an N:M mask has one density, n/m; use one_shot "
                                  "(or pattern block / unstructured for a gradual schedule)")
        else:
            if self.density is None or not 0 < self.density < 1:
                raise ConfigError(f"sparsity.density={self.density}: the fraction of weights kept, in (0, 1)")
        if self.pattern == "block" and (len(self.block) != 2 or min(self.block) < 1):
            raise ConfigError(f"sparsity.block={list(self.block)}: two positive sizes (rows, columns)")
        for key in ("start", "end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0
                                               or isinstance(value, float) and 0 <= value <= 1):
                raise ConfigError(f"sparsity.{key}={value!r}: an optimizer step (int >= 0) or a fraction of the "
                                  f"run's steps (float in [0, 1])")
        if self.schedule == "gradual" and self.every < 1:
            raise ConfigError(f"sparsity.every={self.every}: at least 1 step between mask updates")

    @property
    def enabled(self) -> bool:
        return self.pattern != "none"

    @property
    def final_density(self) -> float:
        return self.n / self.m if self.pattern == "nm" else float(self.density if self.enabled else 1.0)

    def selects(self, name: str) -> bool:
        if self.targets is None:
            hit = IN_A_BLOCK.search(name) is not None and THIN_FACTOR.search(name) is None
        else:
            hit = any(re.search(regex, name) for regex in self.targets)
        return hit and not any(re.search(regex, name) for regex in self.exclude)


# --- masks ---------------------------------------------------------------------------------------------------
def _keep_largest(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the round(density * numel) largest entries of ``scores``."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[scores.flatten().topk(round(density * scores.numel())).indices] = True
    return keep.view_as(scores)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` largest magnitudes of every ``m`` consecutive weights along the input (last) dim."""
    rows, cols = weight.shape
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def block_mask(scores: torch.Tensor, density: float, block: tuple[int, int]) -> torch.Tensor:
    """Keeps the ``density`` fraction of (rows x cols) blocks with the largest mean score; edge blocks may be cut
    short by the matrix's shape (their mean is over the entries they have)."""
    br, bc = block
    rows, cols = scores.shape
    pad = (0, -cols % bc, 0, -rows % br)
    grid = (math.ceil(rows / br), br, math.ceil(cols / bc), bc)
    totals = F.pad(scores, pad).reshape(grid).sum((1, 3))
    counts = F.pad(torch.ones_like(scores), pad).reshape(grid).sum((1, 3))
    keep = _keep_largest(totals / counts, density)
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]


def new_mask(weight: torch.Tensor, mask: torch.Tensor, config: SparsityConfig, density: float) -> torch.Tensor:
    """The mask of ``weight`` at ``density``, by magnitude. Weights already masked score below any kept one, so
    a gradual schedule only ever removes weights."""
    if config.pattern == "nm":
        return nm_mask(weight, config.n, config.m)
    scores = weight.detach().abs().float().masked_fill(~mask, -1.0)
    if config.pattern == "block":
        return block_mask(scores, density, config.block)
    return _keep_largest(scores, density)


def attach_masks(model: nn.Module, node: Mapping | SparsityConfig | None) -> list[str]:
    """Registers an all-True ``weight_mask`` buffer on every targeted nn.Linear of ``model`` (nothing when the
    config is dense) and returns the targeted weights' names. Checks the shapes the pattern needs."""
    config = node if isinstance(node, SparsityConfig) else SparsityConfig.from_dict(node)
    if not config.enabled:
        return []
    linears = {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = [name for name in linears if config.selects(name)]
    if not chosen:
        wanted = "the default (nn.Linear weights inside the blocks)" if config.targets is None else list(config.targets)
        raise ConfigError(f"sparsity.targets={wanted} (exclude={list(config.exclude)}) match no nn.Linear weight "
                          f"of {type(model).__name__}; its nn.Linear weights are: {', '.join(linears)}")
    for name in chosen:
        module = linears[name]
        if config.pattern == "nm" and module.in_features % config.m:
            raise ConfigError(f"sparsity: {name} has {module.in_features} input features, not a multiple of "
                              f"sparsity.m={config.m}; leave it out with sparsity.exclude or pick another m")
        module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
    return chosen


def masked_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and getattr(module, MASK, None) is not None:
            yield name, module


@torch.no_grad()
def update_masks(model: nn.Module, config: SparsityConfig, density: float) -> None:
    for _, module in masked_linears(model):
        getattr(module, MASK).copy_(new_mask(module.weight, getattr(module, MASK), config, density))


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for _, module in masked_linears(model):
        module.weight.mul_(getattr(module, MASK))


# --- schedule ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
    """When masks are (re)computed and at which density, in optimizer steps.

    one-shot: once, at ``start``, to the final density. Gradual (Zhu & Gupta 2017): at ``start``, every ``every``
    steps after it and at ``end``, to density ``final + (1 - final) * (1 - (t - start) / (end - start))^3``:
    fast pruning while the network has many redundant weights, slow near the end. Dense before ``start``.
    """

    final: float
    start: int
    end: int
    every: int
    gradual: bool

    @classmethod
    def of(cls, config: SparsityConfig, total_steps: float) -> Schedule:
        def step(key: str) -> int:
            value = getattr(config, key)
            if isinstance(value, int):
                return value
            if not math.isfinite(total_steps):
                raise ConfigError(f"sparsity.{key}={value} is a fraction of the run, whose length is unknown "
                                  f"(trainer.max_steps and max_epochs unset): give an optimizer step")
            return round(value * total_steps)

        start, end = step("start"), step("end")
        gradual = config.schedule == "gradual"
        if gradual and end <= start:
            raise ConfigError(f"sparsity: the gradual schedule ends (step {end}) before it starts (step {start}); "
                              f"set sparsity.start < sparsity.end")
        return cls(config.final_density, start, end, config.every, gradual)

    def last_update(self, step: int) -> int | None:
        """The latest step <= ``step`` at which masks are computed; None while still dense."""
        if step < self.start:
            return None
        if not self.gradual:
            return self.start
        if step >= self.end:
            return self.end
        return self.start + (step - self.start) // self.every * self.every

    def density(self, step: int) -> float:
        """The density of the masks the model holds at ``step``."""
        update = self.last_update(step)
        if update is None:
            return 1.0
        if not self.gradual:
            return self.final
        remaining = 1 - (update - self.start) / (self.end - self.start)
        return self.final + (1 - self.final) * remaining ** 3


# --- report --------------------------------------------------------------------------------------------------
def sparsity_report(model: nn.Module) -> dict[str, float | int]:
    """Parameters kept and matmul FLOPs per token, dense and with the masks (exact counts).

    Every nn.Linear of these models is applied once per token, costing 2 * in * out FLOPs (multiply-add) dense and
    2 * (kept weights) sparse. FLOPs outside nn.Linear (scans, convolutions, attention scores) are not counted:
    sparsity leaves them unchanged.
    """
    target_params = target_kept = dense_flops = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            dense_flops += 2 * module.weight.numel()
    masked = [module for _, module in masked_linears(model)]
    for module in masked:
        mask = getattr(module, MASK)
        target_params += mask.numel()
        target_kept += int(mask.sum())
    pruned = target_params - target_kept
    model_params = sum(p.numel() for p in model.parameters())
    return {
        "target_weights": len(masked),
        "target_params": target_params,
        "target_nonzero": target_kept,
        "target_density": target_kept / target_params if target_params else 1.0,
        "model_params": model_params,
        "model_nonzero": model_params - pruned,
        "matmul_flops_per_token_dense": dense_flops,
        "matmul_flops_per_token": dense_flops - 2 * pruned,
        "matmul_flops_saved": 2 * pruned / dense_flops if dense_flops else 0.0,
    }


# --- training ------------------------------------------------------------------------------------------------
class Sparsify(L.Callback):
    """Keeps the model's masked weights at zero and updates the masks on schedule (see the module docstring).

    Runs before the checkpoint callbacks (Lightning orders those last), so a checkpoint of step t holds the masks
    and weights of step t.
    """

    def __init__(self, config: Mapping | SparsityConfig):
        self.config = config if isinstance(config, SparsityConfig) else SparsityConfig.from_dict(config)
        self.schedule: Schedule | None = None
        self.updated_at = -1  # the step whose masks the model holds; -1: none computed yet

    def state_dict(self) -> dict:
        return {"updated_at": self.updated_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updated_at = int(state_dict["updated_at"])

    def on_train_start(self, trainer, pl_module):
        if not any(True for _ in masked_linears(pl_module.model)):
            raise RuntimeError("Sparsify needs a model with masks: build the LMModule with the sparsity config")
        self.schedule = Schedule.of(self.config, trainer.estimated_stepping_batches)
        self._sync(trainer, pl_module)
        report = sparsity_report(pl_module.model)
        plan = {"final_density": self.config.final_density, "start_step": self.schedule.start,
                "end_step": self.schedule.end if self.schedule.gradual else self.schedule.start}
        for logger in trainer.loggers:
            logger.log_hyperparams({f"sparsity/{k}": v for k, v in {**plan, **report}.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for _, module in masked_linears(pl_module.model):
            if module.weight.grad is not None:
                module.weight.grad.mul_(getattr(module, MASK))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(trainer, pl_module)

    def _sync(self, trainer, pl_module) -> None:
        """Computes the masks due at this step (also ones a resumed run has not computed yet), then masks the
        weights."""
        model = pl_module.model
        due = self.schedule.last_update(trainer.global_step)
        updated = due is not None and due > self.updated_at
        if updated:
            update_masks(model, self.config, self.schedule.density(due))
            self.updated_at = due
        apply_masks(model)
        if updated:
            report = sparsity_report(model)
            metrics = {"sparsity/density": report["target_density"],
                       "sparsity/model_nonzero": report["model_nonzero"],
                       "sparsity/matmul_flops_per_token": report["matmul_flops_per_token"]}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def callbacks_for(node: Mapping | None) -> list[Sparsify]:
    """The callbacks a run with this ``sparsity`` config needs: none when dense."""
    config = SparsityConfig.from_dict(node)
    return [Sparsify(config)] if config.enabled else []
