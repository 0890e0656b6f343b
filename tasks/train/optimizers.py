"""The training optimizer: AdamW on every parameter, or Muon on the blocks' matrices and AdamW on
the rest (``TrainConfig.optimizer``).

AdamW (the default) decays the matrices (embeddings and projections) only: decaying norm gains pulls
them towards zero for no benefit. It is fused on CUDA (one kernel for all parameters).

Muon (torch's own :class:`torch.optim.Muon`) takes the 2-D weights inside the transformer blocks:
the attention's ``qkv_proj``/``o_proj`` and the MLP's ``gate_up_proj``/``down_proj``. Its update is
the Nesterov momentum of the gradient, orthogonalised by five Newton–Schulz iterations (in
bfloat16), so every direction of a matrix moves by about as much. Embeddings, the output head (tied
or not), the norm gains and any bias stay on AdamW, split as modded-nanogpt and nanochat split them:
an embedding row is a lookup, not a linear map, and torch's Muon refuses anything not 2-D.

Muon's learning rate is its own, ``muon_lr``: torch scales it per matrix by
``sqrt(max(1, rows / cols))`` (``adjust_lr_fn="original"``, Keller Jordan's reference), the same
rule nanochat's Muon applies, so nanochat's and the reference's 0.02 carries over. Muon's matrices
get no weight decay, as in both; ``weight_decay`` stays AdamW's. One schedule moves both: the two
optimizers sit behind one :class:`CombinedOptimizer`, a :class:`torch.optim.Optimizer` whose
``param_groups`` are theirs (the same dicts), so the trainer's ``LambdaLR`` scales every group of
both from its own peak, and whose ``state_dict`` holds both in one optimizer's format, so a
checkpoint resumes both exactly.

The model's fused projections (``qkv_proj`` holds the query, key and value maps; ``gate_up_proj``
the gate and up maps) are orthogonalised as one matrix each; the Muon reference found separate
Q, K and V slightly better, which would need the model split (the optimizer sees parameters).
Sharded (DTensor) parameters work too: DTensor gathers a matrix for the iterations, on every rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from llmflow.tasks.train.train_config import TrainConfig

# Where the transformer blocks sit in a Decoder (llmflow.models.decoder): Muon's matrices are there.
BLOCKS = "model.layers"
MUON_MOMENTUM = 0.95  # torch's default, the reference's and nanochat's


def split_parameters(
    model: torch.nn.Module,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters of a Decoder: the 2-D weights inside the transformer
    blocks; everything else (embeddings, output head, norm gains, any bias). Each parameter is in
    exactly one list, once (a tied head is the embedding, counted once)."""
    blocks = {id(p) for p in model.get_submodule(BLOCKS).parameters()}
    muon: list[torch.nn.Parameter] = []
    adamw: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (muon if id(p) in blocks and p.ndim == 2 else adamw).append(p)
    return muon, adamw


def _adamw(
    params: Iterable[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with decoupled decay on matrices only; fused on CUDA."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=1e-8,
        fused=device.type == "cuda",
    )


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The run's optimizer, as ``config.optimizer`` says: a plain AdamW (``adamw``, whose
    checkpoints are AdamW's own state dict), or a :class:`CombinedOptimizer` of AdamW (groups 0
    and 1: decayed matrices, undecayed vectors) and Muon (group 2: the blocks' matrices)."""
    if config.optimizer == "adamw":
        return _adamw((p for p in model.parameters() if p.requires_grad), config, device)
    matrices, rest = split_parameters(model)
    muon = torch.optim.Muon(
        matrices,
        lr=config.muon_lr,
        weight_decay=0.0,
        momentum=MUON_MOMENTUM,
        nesterov=True,
        adjust_lr_fn="original",
    )
    return CombinedOptimizer({"adamw": _adamw(rest, config, device), "muon": muon})


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, behind one :class:`torch.optim.Optimizer`.

    ``param_groups`` is the parts' groups in order, the very same dicts, so an LR scheduler that
    sets ``group["lr"]`` sets the part's; ``step`` and ``zero_grad`` run every part; ``state``
    is a merged, read-only view of the parts' state. ``state_dict`` is in one optimizer's format
    over all those groups, so checkpoints (plain or DCP's) hold and restore it as any optimizer's;
    ``load_state_dict`` hands each part its share. Optimizer hooks registered on the combination
    are not run by its ``state_dict``/``load_state_dict`` (the parts' own are).
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        if not parts:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.parts = parts
        # checks the groups as any optimizer does (a parameter in two of them is an error) and
        # sets up the hooks that LR schedulers and profilers expect; no defaults of its own
        super().__init__(self._groups(), {})

    def _groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        """Every part's per-parameter state (a merged copy of the mapping; the tensors are
        the parts')."""
        merged: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        for part in self.parts.values():
            merged.update(part.state)
        return merged

    @state.setter
    def state(self, value: defaultdict[torch.Tensor, Any]) -> None:
        # Optimizer.__init__ assigns an empty state; the state lives in the parts
        if value:
            raise AttributeError("CombinedOptimizer.state is read-only: it is the parts' state")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One optimizer's state dict over all the groups: ``param_groups`` in order, parameters
        numbered across them and ``state`` keyed by those numbers, as
        :meth:`torch.optim.Optimizer.state_dict` makes it (so ``torch.distributed.checkpoint``'s
        ``get_state_dict``/``set_optimizer_state_dict`` read and write it as any optimizer's)."""
        groups: list[dict[str, Any]] = []
        state: dict[int, Any] = {}
        offset = 0
        for part in self.parts.values():
            saved = part.state_dict()  # its parameters numbered from 0 in its group order
            for group in saved["param_groups"]:
                groups.append({**group, "params": [offset + i for i in group["params"]]})
            state.update({offset + i: value for i, value in saved["state"].items()})
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each part its groups (by position) and their parameters' state back; a state
        dict of another shape (another optimizer setting) is refused, naming both."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        sizes = [len(g["params"]) for part in self.parts.values() for g in part.param_groups]
        if [len(g["params"]) for g in groups] != sizes:
            raise ValueError(
                f"the optimizer state has groups of {[len(g['params']) for g in groups]}"
                f" parameters, this run's optimizer ({' + '.join(self.parts)}) groups of {sizes}:"
                " was it saved with another optimizer setting or model?"
            )
        for part in self.parts.values():
            own, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            ids = [i for group in own for i in group["params"]]
            local = {global_id: n for n, global_id in enumerate(ids)}
            part.load_state_dict(
                {
                    "state": {local[i]: state[i] for i in ids if i in state},
                    "param_groups": [{**g, "params": [local[i] for i in g["params"]]} for g in own],
                }
            )
        self.param_groups = self._groups()  # loading replaced the parts' group dicts
