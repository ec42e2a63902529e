"""Training checkpoints: the LoRA weights and the optimizer's state of one run, and the run they belong to.

A checkpoint (safetensors: the tensors; JSON metadata: the step, the scalars and the run's identity) is
written every `train.checkpoint_every` steps and on Ctrl-C, and read back by the same command. It is
refused, and left as it is, when it belongs to another run (changed recipe, base or data) or is damaged,
and only usable weights are ever written (`unusable_tensor`): every checkpoint can be resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dt_lora.errors import RuntimeFailure, UserError
from dt_lora.io import atomic_write, remove_if_empty
from dt_lora.recipe import Recipe
from dt_lora.shield.losses import ADAPTER_NAME

# The largest LoRA weight a usable adapter has: adapters are applied in half precision, where a larger
# one is inf, and trained LoRA weights are of order 1. A larger one comes from a diverged run.
WEIGHT_LIMIT = float(torch.finfo(torch.float16).max)


class TrainingDiverged(RuntimeFailure):
    """The loss or the LoRA weights blew up (NaN/inf, or beyond `WEIGHT_LIMIT`); nothing diverged is kept."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is damaged or belongs to another run; it is left as it is and nothing is trained."""


def unusable_tensor(tensors: dict[str, torch.Tensor], limit: float = math.inf) -> str | None:
    """The first of `tensors` (name -> tensor) with a NaN, an inf or a value beyond ±`limit`, described
    ("name is nan"), or None when all are usable. One device sync for all of them: it runs every step."""
    floating = [(name, tensor) for name, tensor in tensors.items() if tensor.is_floating_point() and tensor.numel()]
    if not floating:
        return None
    device = floating[0][1].device
    peaks = torch.stack([tensor.detach().abs().amax().float().to(device) for _, tensor in floating]).tolist()
    for (name, _), peak in zip(floating, peaks):
        if not math.isfinite(peak):
            return f"{name} is {peak:.3g}"
        if peak > limit:
            return f"{name} is {peak:.3g}, beyond ±{limit:.4g}"
    return None


CHECKPOINT = "checkpoint.safetensors"
# recipe keys that change neither the data nor what is trained: a run may resume with them changed
RESUMABLE_CHANGES = ("train.checkpoint_every", "train.sample_every", "train.gradient_checkpointing", "resolution")


def run_identity(recipe: Recipe, base_fingerprint: str, data: str, processes: int = 1) -> dict:
    """What a checkpoint belongs to: the recipe's training settings, the base UNet, the cached data, and
    the number of processes when there are several (each step's batches depend on it)."""
    # the guard trains apart from the UNet, before it (guard.py), and is kept on an identity of its own
    settings = {key: value for key, value in _flatten(recipe.to_dict())
                if key not in RESUMABLE_CHANGES and not key.startswith("guard.")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    identity = {"recipe_hash": digest, "recipe": settings, "base_fingerprint": base_fingerprint, "data": data}
    if processes > 1:  # absent for one process, so that existing checkpoints keep their identity
        identity["processes"] = processes
    return identity


def _flatten(table: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in table.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@dataclass
class ResumeState:
    step: int  # 0..train.steps; train.steps: trained to the end, the adapter is still to be written
    lora_state: dict[str, torch.Tensor]
    optimizer_state: dict
    loss: float = math.nan  # the loss of the last step before the checkpoint (NaN: none recorded)


@dataclass
class Checkpoint:
    """The checkpoint of one run in `folder`: LoRA weights and optimizer state as safetensors, with
    the step, the scalars and the run's identity (`run_identity`) as JSON metadata.

    `read` refuses a checkpoint of another run (changed recipe, base or data) instead of mixing the
    two, and a damaged one with one line naming the file; either way the file is left untouched.
    `write` refuses weights that are not usable (`unusable_tensor`): every checkpoint can be resumed.
    """

    folder: Path
    identity: dict = field(repr=False)

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def steps(self) -> int:
        """The run's train.steps: a checkpoint's step is 0..steps."""
        return self.identity["recipe"]["train.steps"]

    def write(self, step: int, lora_state: dict, optimizer, loss: float) -> None:
        from safetensors.torch import save

        tensors = {f"lora.{k}": v.detach().float().cpu().contiguous() for k, v in lora_state.items()}
        state = optimizer.state_dict()
        scalars: dict = {}

        def flatten(prefix: str, value, scalar_node: dict, key: str) -> None:
            # optimizer state nests (bitsandbytes keeps a dict per parameter): tensors go to the
            # safetensors payload under a path key, everything else into the JSON metadata
            if isinstance(value, dict):
                node = scalar_node.setdefault(key, {})
                for k, v in value.items():
                    flatten(f"{prefix}/{k}", v, node, k)
            elif torch.is_tensor(value):
                tensors[f"optim.{prefix}"] = value.detach().cpu().contiguous()
            else:
                scalar_node[key] = value

        for index, param_state in state["state"].items():
            flatten(str(index), param_state, scalars, str(index))
        blown = _unusable_state(tensors)
        if blown:
            raise TrainingDiverged(f"{self.path}: not written, {blown}")
        # hyper-parameters may be 0-d tensors (e.g. a tensor lr); JSON keeps their values
        groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in state["param_groups"]]
        meta = {"step": step, "loss": loss if math.isfinite(loss) else None, "scalars": scalars,
                "param_groups": groups, "identity": self.identity}
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as f:
            f.write(save(tensors, metadata={"dt_lora_checkpoint": json.dumps(meta)}))

    def read(self) -> ResumeState | None:
        """The state to resume from, or None when there is no checkpoint."""
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = json.loads(f.metadata()["dt_lora_checkpoint"])
                self._check_identity(meta.get("identity"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            step, loss, scalars, groups = meta["step"], meta.get("loss"), meta["scalars"], meta["param_groups"]
            # JSON that parses is not yet a state to resume: the types and ranges are what `write` writes
            if type(step) is not int or not 0 <= step <= self.steps:
                raise self._damaged(f"step {step!r} is not one of 0..{self.steps}, the run's train.steps")
            if loss is not None and not (type(loss) in (int, float) and (math.isnan(loss) or 0 <= loss < math.inf)):
                raise self._damaged(f"loss {loss!r} is not a number >= 0")  # NaN: older dt-lora's "no step yet"
            if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
                raise self._damaged("'scalars' is not a table of per-parameter tables")
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise self._damaged("'param_groups' is not a list of tables")
            if not _finite_numbers(scalars) or not _finite_numbers(groups):
                raise self._damaged("the optimizer's settings hold NaN or inf")
            blown = _unusable_state(tensors)
            if blown:
                raise self._damaged(blown)
            lora_state = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
            optim_state: dict = {int(k): v for k, v in scalars.items()}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    index, *path = key[len("optim."):].split("/")
                    node = optim_state.setdefault(int(index), {})
                    for part in path[:-1]:
                        node = node.setdefault(part, {})
                    node[path[-1]] = value
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError) as error:
            if isinstance(error, CheckpointError):
                raise
            problem = (str(error).splitlines() or [type(error).__name__])[0]
            raise self._damaged(problem) from None
        return ResumeState(step, lora_state, {"state": optim_state, "param_groups": groups},
                           math.nan if loss is None else float(loss))

    def restore(self, state: ResumeState, unet, optimizer) -> None:
        """Load `state` into the UNet's adapter and the optimizer; a mismatch is a damaged checkpoint."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        expected = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).keys()
        if state.lora_state.keys() != expected:  # peft would load a partial state silently
            missing = sorted(set(expected) - state.lora_state.keys())[:1] or sorted(state.lora_state.keys() - expected)[:1]
            raise self._damaged(f"LoRA weights do not match the adapter, e.g. {missing[0]!r}")
        try:
            set_peft_model_state_dict(unet, state.lora_state, adapter_name=ADAPTER_NAME)
            optimizer.load_state_dict(state.optimizer_state)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise self._damaged((str(error).splitlines() or [type(error).__name__])[0]) from None

    def remove(self) -> None:
        """After success or a divergence: the checkpoint, and the folder when nothing else (samples, the
        guard) is in it."""
        self.path.unlink(missing_ok=True)
        remove_if_empty(self.folder)

    @property
    def _start_over(self) -> str:
        return f"to start over, delete {self.folder} (or pass another --out)"

    def _damaged(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: damaged checkpoint ({problem}); {self._start_over}")

    def _check_identity(self, saved: dict | None) -> None:
        if saved == self.identity:
            return
        if not isinstance(saved, dict) or "recipe" not in saved:
            why = "it records no recipe (written by an older dt-lora)"
        elif saved.get("base_fingerprint") != self.identity["base_fingerprint"]:
            why = (f"it was trained on another base model (UNet fingerprint {saved.get('base_fingerprint')}, "
                   f"this one {self.identity['base_fingerprint']})")
        elif saved["recipe"] != self.identity["recipe"]:
            old, new = saved["recipe"], self.identity["recipe"]
            changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
            shown = ", ".join(_describe_change(key, old.get(key), new.get(key)) for key in changed[:4])
            why = f"the recipe changed ({shown}{', …' if len(changed) > 4 else ''})"
        elif saved.get("processes", 1) != self.identity.get("processes", 1):
            why = (f"it was trained with {saved.get('processes', 1)} process(es) and this run has "
                   f"{self.identity.get('processes', 1)}; each step's batches depend on the number of processes, "
                   "so a resumed run would not replay the interrupted one")
        else:
            why = "its training data changed (the target images or the generation precision)"
        raise CheckpointError(f"{self.folder} holds a checkpoint of another run: {why}. It is not resumed: "
                              f"{self._start_over}, or run again as it was started (recipe, base, processes)")


def _unusable_state(tensors: dict[str, torch.Tensor]) -> str | None:
    """What makes a checkpoint's tensors unusable, or None: LoRA weights ("lora.…") must be finite and within
    `WEIGHT_LIMIT`, the optimizer's state ("optim.…") finite (Adam's squared gradients may be large)."""
    return (unusable_tensor({k: v for k, v in tensors.items() if k.startswith("lora.")}, WEIGHT_LIMIT)
            or unusable_tensor({k: v for k, v in tensors.items() if k.startswith("optim.")}))


def _finite_numbers(value) -> bool:
    """Whether every number in `value` (JSON: nested tables and lists) is finite."""
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _describe_change(key: str, old, new) -> str:
    if len(repr(old)) + len(repr(new)) > 60:
        return key
    return f"{key} {old!r} -> {new!r}"
