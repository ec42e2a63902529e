"""Concept recipes: what to shield and how, as a TOML file (`adapters/<name>.toml`).

    name = "circle"
    [target]
    templates = ["a {colour} circle", "a photo of a {colour} circle"]
    vars = { colour = ["red", "green"] }      # templates × vars → the concept's prompts
    paraphrases = ["a picture showing a red circle"]   # never trained on; `eval` measures them
    [anchors]                                  # neighbouring concepts that must stay intact
    prompts = ["a red square", "a green star"]

Every key is also a CLI flag of `dt-lora train`, named `--<section>-<key>` (`--train-steps 300`).
Every error is one line that names where the bad value came from (the recipe file, or the flag that
overrode it), the key, and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import string
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from dt_lora.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


TARGET_SCALE_MIN = 0.5  # train.target_scale_min's default, and "auto"'s for a shield that is not text-local


class RecipeError(UserError, ValueError):
    """A recipe file or override is invalid; the message names the file (or the flag) and the key."""


# `name` becomes a file name (`<name>.safetensors`, the cache folder `<name>-<key>`): a plain slug,
# so that `../x` or `/tmp/x` cannot write outside the folder it is meant for
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class PromptSet:
    prompts: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    vars: dict[str, list[str]] = field(default_factory=dict)
    images: int = 128

    def expand(self) -> list[str]:
        """The literal prompts plus every template filled with every combination of its vars."""
        out = list(self.prompts)
        for template in self.templates:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
            values = [self.vars[name] for name in names]
            out += [template.format(**dict(zip(names, combo))) for combo in itertools.product(*values)]
        return list(dict.fromkeys(out))

    def expanded_count(self) -> int:
        """How many prompts `expand` makes at most (before duplicates go), without making them. For templates
        that `Recipe.validate` has checked (each field names a variable)."""
        count = len(self.prompts)
        for template in self.templates:
            names = dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name)
            count += math.prod(len(self.vars[name]) for name in names)
        return count


@dataclass
class TargetSet(PromptSet):
    paraphrases: list[str] = field(default_factory=list)
    image_folder: str = ""  # the user's own images of the concept instead of generated ones


@dataclass
class ScrambleConfig:
    grid: int = 4
    space: str = "pixel"  # "pixel": scramble decoded images; "latent": scramble VAE latents
    flips: bool = False


# The layers a text-local shield may adapt: the cross-attention projections, which see only the text's
# states, and SDXL's added embedding, which sees only the pooled text embedding and the size ids.
POOLED_TARGET = "add_embedding.linear_1"
TEXT_LOCAL_TARGETS = ("attn2.to_k", "attn2.to_v", POOLED_TARGET)


@dataclass
class LoraConfig:
    # Text-local shields by default (locality.py): lora_A is fixed to the `rank` directions of the
    # text embedding that the target's prompts use and retained prompts do not, and only lora_B
    # trains, on the layers that see nothing but the text (cross-attention to_k / to_v). Such a
    # shield leaves every prompt without its concept as the base draws it, so shields stack (toy
    # world: six stacked keep everything else at 1.00 × base; the earlier free rank-8 LoRA on every
    # attention projection, `text_local = false`, fell apart past two: research/).
    rank: int = 2
    alpha: float = 2.0
    targets: list[str] = field(default_factory=lambda: ["attn2.to_k", "attn2.to_v"])
    text_local: bool = True


@dataclass
class TrainConfig:
    steps: int = 450
    learning_rate: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    preservation: str = "distill"  # "distill" | "denoise" | "none"
    preservation_weight: float = 1.0
    # share of anchor samples distilled with the empty prompt instead of their own. Off by default:
    # pinning the unconditional branch to the base while the conditional one moves lets guidance
    # amplify the difference (measured on the toy world's "red": worst other colour 0.60 at 0.25,
    # 1.00 at 0; see research/)
    unconditional_share: float = 0.0
    # Anchors are distilled with the adapter at a random strength s ∈ [1, 1 + jitter] instead of 1.
    # Distillation at strength 1 only pins the UNet's output with this one adapter; a shield can then
    # keep the anchors by changes that cancel each other inside the network, and a second shield
    # stacked on it breaks the cancellation (toy world, circle + red stacked: other concepts fell to
    # 0.69 × base). Requiring the anchors to hold along a whole segment of strengths removes that:
    # 0.94 × base stacked, each shield alone unchanged (research/). 2 (not 1) since the target
    # range was widened (below): it keeps six stacked at ≥ 0.97 × base with the target trained to 0.5.
    anchor_scale_jitter: float = 2.0
    # The target is degenerated with the adapter at a random strength s ∈ [target_scale_min, 1]. A
    # text-local shield responds to how strongly a prompt moves the concept's text directions, and a
    # paraphrase, or an attack's words around the prompt, move them less than the recipe's own
    # templates (the attack halves the circle's response); training at a weaker strength too makes the
    # shield hold there. Lower holds more, but disturbs other concepts unless the anchors are kept over
    # a wider range too: 0.5 with jitter 1 kept six stacked at only 0.90 × base; 0.5 with jitter 2 keeps
    # them at ≥ 0.97 and halves the attack's success on red and on the circle stacked with red, against
    # 0.75 with jitter 1 (attack seed 5, never used to choose: 6 of 36 prompts broken against 12).
    # "auto" (None): per concept, down to the strength where the target's prompts still answer with
    # 6 × the retained prompts' rms (locality.py; toy world: circle 0.21, red 0.49). It holds the circle
    # stacked with red against the attack (0.00 at two seeds, against 0.33), but four or more such
    # shields stacked keep other concepts at only 0.93–0.96 × base (2 images a prompt); an option
    # (research/).
    target_scale_min: float | None = TARGET_SCALE_MIN
    # Adversarial training (AdvUnlearn-style, in rounds; adversarial.py): after training, attack the
    # shield (`dt-lora attack`'s discrete attack on `adversarial_prompts` target prompts), add the
    # prompts found to the target prompts, and train again; `adversarial_rounds` times. 0: off.
    adversarial_rounds: int = 0
    adversarial_prompts: int = 10
    # Each target image is also trained with `prompt_contexts` copies of its prompt in a random context:
    # 1–6 words of the tokenizer's vocabulary (none of the concept's) before it, or after it. Attack
    # prompts are exactly that (free tokens before the prompt); so are phrasings nobody listed. With a
    # text-local shield, the directions are computed on these prompts too (locality.py). 0: off. Toy
    # world, attack seeds never used to decide: 5 of 48 attacked prompts broken against 12 at 0, but
    # the soft attack breaks more and the circle stacked with red stays at 0.50 (research/).
    prompt_contexts: int = 0
    # SDXL only: each target image is also trained under its prompt given to one text encoder alone (the
    # other gets the empty prompt), once for each encoder, as `pipeline(prompt=…, prompt_2=…)` and
    # ComfyUI's text_l/text_g allow; a text-local shield's directions are computed on these inputs too,
    # and on the anchors'. Toy SDXL: the circle given to CLIP-L alone, 0.29 → 0.06 of images; red given
    # to OpenCLIP-G alone stays at 0.35 (base 0.36, the empty prompt 0.21), so it is off (research/).
    split_encoders: bool = False
    optimizer: str = "adamw8bit"  # "adamw8bit" | "adamw"
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    sample_every: int = 0  # write a grid of target/anchor samples every N steps (0: never)


@dataclass
class GuardConfig:
    # A context guard (guard.py): a text-encoder LoRA trained on text alone, before the UNet, that keeps
    # the concept's text response whatever words come before its prompt. The attack's free tokens lower
    # that response and the concept comes back; with the guard the toy world's red and circle + red held
    # every attacked prompt (0 of 12 at two attack seeds, against 2–6 of 12 without) and kept every
    # phrasing group within the locality bar (research/guard-preservation.md). It costs a text-encoder part in the
    # adapter file and several minutes of training on a CPU. Off by default.
    enabled: bool = False
    # recipes (shipped names or .toml files) of the shields this one may be stacked with: the guard keeps
    # their gates too, so stacked guards do not raise what the other shields respond to
    stacked_with: list[str] = field(default_factory=list)
    rounds: int = 3  # adversarial rounds: each adds one found context per target prompt
    # optimiser steps per round (and before the first). 200, even with a decayed rate and a stronger gate,
    # kept the attack out but moved what six stacked shields draw for two-shape prompts ("A faster guard")
    steps: int = 600
    rank: int = 8
    learning_rate: float = 3e-3
    keep_weight: float = 40.0  # other prompts keep their text-encoder output (at 10, more two-shape prompts tipped)
    gate_weight: float = 40.0  # other prompts keep their response along the shields' directions
    batch: int = 32  # target prompts in context per step (twice as many retained prompts)
    free_tokens: int = 8  # the attack's default
    attack_steps: int = 32
    seed: int = 0
    composed: int = 512  # retained prompts that join 2-3 anchors: prompts naming several objects


@dataclass
class SamplingConfig:
    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 64


@dataclass
class Recipe:
    name: str
    base: str = "toy"
    # the image side (px) the recipe's settings were chosen for (its grid's tile size assumes it); 0: not
    # stated. Images are always drawn at the base model's own size; on another size, train warns.
    resolution: int = 0
    target: TargetSet = field(default_factory=TargetSet)
    anchors: PromptSet = field(default_factory=lambda: PromptSet(images=96))
    scramble: ScrambleConfig = field(default_factory=ScrambleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def target_prompts(self) -> list[str]:
        return self.target.expand()

    @property
    def anchor_prompts(self) -> list[str]:
        return self.anchors.expand()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *keys: str) -> str:
        """Hash of the named sections (all when none named): what a cache built from them depends on."""
        data = self.to_dict()
        chosen = {k: data[k] for k in (keys or tuple(data))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self, source: str, overridden: Iterable[str] = ()) -> None:
        """Check every setting before any work. `source` is the recipe file; `overridden` are the dotted
        keys that overrides set, so that their errors name the flag instead of the file."""
        origins = _Origins(source, frozenset(overridden))

        def fail(key: str, problem: str) -> None:
            raise origins.error(key, problem)

        if not self.name:
            fail("name", "must not be empty")
        if not SAFE_NAME.fullmatch(self.name) or len(self.name) > 200:
            fail("name", f"{self.name!r} is not a safe file name: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit")
        for key, value, may_be_auto in _number_fields(self):
            problem = NUMBER_BOUNDS[key].problem(value, may_be_auto)
            if problem:
                fail(key, problem)
        for section in ("target", "anchors"):
            prompt_set: PromptSet = getattr(self, section)
            for index, template in enumerate(prompt_set.templates):
                problem = _template_problem(template, prompt_set.vars, f"{section}.vars")
                if problem:
                    fail(f"{section}.templates[{index}]", problem)
            count = prompt_set.expanded_count()
            if count > MAX_PROMPTS:
                fail(f"{section}.templates", f"expand to {count:,} prompts (templates × vars); at most {MAX_PROMPTS:,}")
        if not self.target_prompts and not self.target.image_folder:
            fail("target", "give prompts, templates, or an image_folder")
        if self.scramble.space not in ("pixel", "latent"):
            fail("scramble.space", f"must be 'pixel' or 'latent', got {self.scramble.space!r}")
        if not self.lora.targets:
            fail("lora.targets", "must name at least one module")
        if self.lora.text_local and any(t not in TEXT_LOCAL_TARGETS for t in self.lora.targets):
            fail("lora.targets", f"lora.text_local needs attn2.to_k / attn2.to_v (and, on SDXL, {POOLED_TARGET}) "
                                 f"only, got {self.lora.targets}")
        if self.train.preservation not in ("distill", "denoise", "none"):
            fail("train.preservation", f"must be 'distill', 'denoise' or 'none', got {self.train.preservation!r}")
        if self.train.preservation != "none" and not self.anchor_prompts:
            fail("anchors", f"train.preservation = {self.train.preservation!r} needs anchor prompts")
        if self.train.adversarial_rounds and not self.target_prompts:
            fail("train.adversarial_rounds", "adversarial training attacks the target prompts; add target.prompts")
        if self.train.split_encoders and not self.target_prompts:
            fail("train.split_encoders", "gives the target prompts to one text encoder; add target.prompts or templates")
        if self.train.prompt_contexts and not self.target_prompts:
            fail("train.prompt_contexts", "puts the target prompts in contexts; add target.prompts or templates")
        if self.train.optimizer not in ("adamw8bit", "adamw"):
            fail("train.optimizer", f"must be 'adamw8bit' or 'adamw', got {self.train.optimizer!r}")
        if self.train.mixed_precision not in ("no", "fp16", "bf16"):
            fail("train.mixed_precision", f"must be 'no', 'fp16' or 'bf16', got {self.train.mixed_precision!r}")
        if self.guard.enabled and not self.target_prompts:
            fail("guard.enabled", "a guard keeps the target prompts' text response; add target.prompts or templates")
        if self.name in self.guard.stacked_with:
            fail("guard.stacked_with", f"names the recipe itself ({self.name}); name the other shields' recipes")

    def resolution_warning(self, image_side: int, family: str) -> str | None:
        """A warning when the recipe was written for another image size than the base draws (an SD 1.x
        recipe's 512 px on SDXL's 1024 px): its grid then cuts tiles of another size."""
        if not self.resolution or self.resolution == image_side:
            return None
        grid = self.scramble.grid
        return (f"recipe {self.name!r} was written for {self.resolution} px images (resolution), and this {family} "
                f"base draws {image_side} px: scramble.grid {grid} cuts {image_side // grid} px tiles instead of "
                f"{self.resolution // grid} px. Check scramble.grid for this base, then set resolution = {image_side}")

    def validate_image_size(self, image_side: int, latent_side: int) -> None:
        """The checks that need the base model: the scramble grid must tile its images exactly.

        Run once the base is loaded and before any generation, so that a bad grid fails at once.
        """
        what, side = ("images", image_side) if self.scramble.space == "pixel" else ("latents", latent_side)
        if side % self.scramble.grid:
            divisors = [d for d in range(NUMBER_BOUNDS["scramble.grid"].low, side + 1) if side % d == 0]
            raise RecipeError(
                f"recipe {self.name!r}: scramble.grid: {self.scramble.grid} does not divide the base model's "
                f"{side}x{side} {what} (scramble.space = {self.scramble.space!r}); use one of {divisors}")


def override_flag(dotted: str) -> str:
    """The `dt-lora train` flag that overrides the recipe key `dotted` (`train.steps` -> `--train-steps`)."""
    return "--" + dotted.replace(".", "-").replace("_", "-")


@dataclass(frozen=True)
class _Origins:
    """Where each key's value came from, for the error messages: the recipe file, or the flag of an
    override (a user who typed `--train-steps abc` must not be sent to look for a mistake in the file)."""

    file: str  # the recipe file, or "<command line>" when there is none
    overridden: frozenset[str] = frozenset()  # dotted keys that overrides set

    def of(self, key: str) -> str:
        """The flag that set `key` (or the list or table it is an item of), else the file."""
        for dotted in self.overridden:
            if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
                return override_flag(dotted)
        return self.file

    def error(self, key: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.of(key)}: {key}: {problem}")


def _format_number(number: float) -> str:
    """As the command line's own checks write numbers (cli.py): 10,000,000; 2**63 - 1; 0.001."""
    if isinstance(number, int):
        if number >= 2**31 and (number + 1).bit_count() == 1:
            return f"2**{(number + 1).bit_length() - 1} - 1"
        return f"{number:,}"
    return repr(number)


@dataclass(frozen=True)
class Bound:
    """The values a numeric recipe key may take: low to high (None: no upper bound), both included
    unless `low_open`; `multiple_of` for sizes that must divide evenly; `zero` names what 0 means where
    0 is allowed below `low` (resolution 0: not stated); `why` is said with the error."""

    low: int | float
    high: int | float | None
    low_open: bool = False
    multiple_of: int = 1
    zero: str = ""
    why: str = ""

    def describe(self) -> str:
        low = _format_number(self.low)
        if self.high is None:
            text = f"more than {low}" if self.low_open else f"at least {low}"
        elif self.low_open:
            text = f"more than {low} and at most {_format_number(self.high)}"
        else:
            text = f"from {low} to {_format_number(self.high)}"
        if self.multiple_of > 1:
            text = f"a multiple of {self.multiple_of} {text}"
        if self.zero:
            text = f"0 ({self.zero}) or {text}"
        return text

    def problem(self, value: int | float, may_be_auto: bool = False) -> str | None:
        """What is wrong with `value`, or None. NaN fails every comparison, so finiteness comes first."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        allowed = ((value > self.low if self.low_open else value >= self.low)
                   and (self.high is None or value <= self.high)
                   and (self.multiple_of == 1 or value % self.multiple_of == 0))
        if allowed or (self.zero and value == 0):
            return None
        auto = '"auto" or ' if may_be_auto else ""
        why = f" ({self.why})" if self.why else ""
        return f"must be {auto}{self.describe()}{why}, got {_format_number(value)}"


# Upper bounds are far above any sane run: they catch typos (an extra zero or three) before hours of work,
# and the sizes that would overflow something (a seed, the sampler's noise levels, CLIP's context). The
# command line's own flags (cli.py: -n, --steps, --seed) use the same limits where they mean the same.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_IMAGES = 100_000  # as the command line's -n: days of drawing on a GPU already
# the rank of one LoRA matrix; text-local shields are also held to the base's text width once it is
# loaded (locality.py), free LoRAs to the width of the layers they adapt (peft)
MAX_RANK = 1024
MAX_WEIGHT = 10_000
MAX_ROUNDS = 100
# one prompt set's prompts, templates × vars expanded: each is encoded (and drawn) at least once a run,
# and the expansion itself must not exhaust memory
MAX_PROMPTS = 100_000

# One entry per int or float field of Recipe (a test checks that none is missing).
NUMBER_BOUNDS: dict[str, Bound] = {
    "resolution": Bound(8, 16_384, multiple_of=8, zero="not stated",
                        why="the VAE halves the image side three times"),
    "target.images": Bound(1, MAX_IMAGES),
    "anchors.images": Bound(1, MAX_IMAGES),
    "scramble.grid": Bound(2, 1024, why="a 1x1 grid has one tile, which cannot move"),
    "lora.rank": Bound(1, MAX_RANK),
    "lora.alpha": Bound(0, MAX_WEIGHT, low_open=True),
    "train.steps": Bound(1, MAX_STEPS),
    # no upper bound: a rate too high for the data diverges, and training stops saying so (TrainingDiverged)
    "train.learning_rate": Bound(0, None, low_open=True),
    "train.batch_size": Bound(1, MAX_BATCH),
    # the batch seeds are (seed * 1_000_003 + step) * 64 + process (train.py): they must fit 64 bits
    "train.seed": Bound(0, 2**32 - 1),
    "train.preservation_weight": Bound(0, MAX_WEIGHT),
    "train.unconditional_share": Bound(0, 1),
    "train.anchor_scale_jitter": Bound(0, 100),
    "train.target_scale_min": Bound(0, 1, low_open=True),
    "train.adversarial_rounds": Bound(0, MAX_ROUNDS),
    "train.adversarial_prompts": Bound(1, MAX_PROMPTS),
    "train.prompt_contexts": Bound(0, 1000),
    "train.checkpoint_every": Bound(1, MAX_STEPS),
    "train.sample_every": Bound(0, MAX_STEPS),  # 0: never
    "guard.rounds": Bound(0, MAX_ROUNDS),
    "guard.steps": Bound(1, MAX_STEPS),
    "guard.rank": Bound(1, MAX_RANK),
    "guard.learning_rate": Bound(0, None, low_open=True),
    "guard.keep_weight": Bound(0, MAX_WEIGHT),
    "guard.gate_weight": Bound(0, MAX_WEIGHT),
    "guard.batch": Bound(1, MAX_BATCH),
    "guard.free_tokens": Bound(1, 75, why="CLIP reads 77 tokens, two of them its start and end"),
    "guard.attack_steps": Bound(1, MAX_STEPS),
    "guard.seed": Bound(0, 2**63 - 1),  # torch's generators take seeds up to 64 bits
    "guard.composed": Bound(0, MAX_PROMPTS),
    "sampling.steps": Bound(1, 1000, why="the samplers have 1000 noise levels"),
    "sampling.guidance": Bound(0, 100),
    "sampling.batch_size": Bound(1, MAX_BATCH),
}


def _number_fields(node, prefix: str = ""):
    """(dotted key, value, may be "auto") of every int and float field of the recipe, sections
    included; a float that is "auto" (None) has nothing to check and is left out."""
    hints = get_type_hints(type(node))
    for f in fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        annotation = hints[f.name]
        may_be_auto = get_origin(annotation) is types.UnionType and type(None) in get_args(annotation)
        if may_be_auto:
            (annotation,) = (a for a in get_args(annotation) if a is not type(None))
        if dataclasses.is_dataclass(annotation):
            yield from _number_fields(value, f"{key}.")
        elif annotation in (int, float) and value is not None:
            yield key, value, may_be_auto


def _template_problem(template: str, variables: dict[str, list[str]], vars_key: str) -> str | None:
    """What keeps `template` from expanding with `variables`, or None. Checked with the parser that
    `str.format` uses, field by field, so that `expand` cannot fail later."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # a lone "{" or "}", or a field cut short ("{colour!}")
        return f"{template!r} has a stray brace or a broken field ({error}); write {{{{ or }}}} for a literal brace"
    for _, name, spec, conversion in parsed:
        if name is None:  # literal text only
            continue
        if name == "" or name.isdigit():
            return (f"{template!r} has a positional field {{{name}}}; name one of {vars_key} instead, "
                    f"like {{{next(iter(variables), 'colour')}}}")
        if any(c in name for c in ".[]"):
            return f"{template!r} has the field {{{name}}}; a field is a variable's bare name, without '.' or '[]'"
        if conversion is not None or spec:
            field_text = name + (f"!{conversion}" if conversion is not None else "") + (f":{spec}" if spec else "")
            return f"{template!r} has the field {{{field_text}}}; write {{{name}}} (no conversion or format spec)"
        if name not in variables:
            return f"{template!r} uses {{{name}}} but {vars_key} has no {name!r}"
        if not variables[name]:
            return f"{template!r} uses {{{name}}} but {vars_key}.{name} is empty"
    return None


def _coerce(value: Any, annotation: Any, key: str, origins: _Origins) -> Any:
    """Check a TOML (or CLI string) value against the field's type, converting where lossless."""
    origin = get_origin(annotation)
    if origin is types.UnionType and type(None) in get_args(annotation):  # a setting that may be "auto"
        if value is None or value == "auto":  # TOML has no null: "auto" stands for it
            return None
        (inner,) = (a for a in get_args(annotation) if a is not type(None))
        try:
            return _coerce(value, inner, key, origins)
        except RecipeError:
            raise origins.error(key, f"expected \"auto\" or a {inner.__name__}, got {value!r}") from None
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise origins.error(key, f"expected a table, got {type(value).__name__}")
        return _build(annotation, value, key, origins)
    if origin is list:
        (item,) = get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise origins.error(key, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        _, item = get_args(annotation)
        if not isinstance(value, dict):
            raise origins.error(key, f"expected a table, got {value!r}")
        return {k: _coerce(v, item, f"{key}.{k}", origins) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise origins.error(key, f"expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            raise origins.error(key, f"expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), float(10**400)
            raise origins.error(key, f"expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and number != value:
            raise origins.error(key, f"expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise origins.error(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {annotation}")  # a bug in this module, not the input


def _build(cls, table: dict[str, Any], prefix: str, origins: _Origins):
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise origins.error(where, f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name in table:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(table[f.name], hints[f.name], where, origins)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise origins.error(prefix or "recipe", str(error)) from None


def override_keys() -> list[tuple[str, Any]]:
    """Every settable key as (dotted name, type): what `dt-lora train` turns into flags."""
    out: list[tuple[str, Any]] = []
    for f in fields(Recipe):
        annotation = get_type_hints(Recipe)[f.name]
        if dataclasses.is_dataclass(annotation):
            out += [(f"{f.name}.{sub.name}", get_type_hints(annotation)[sub.name]) for sub in fields(annotation)]
        else:
            out.append((f.name, annotation))
    return out


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file (or start from defaults when `path` is None) and apply dotted overrides
    (`{"train.steps": "50"}`, the values of `dt-lora train`'s flags). An error in a value from the file
    names the file and the key; one in an override names its flag (`--train-steps`) and the key."""
    table: dict[str, Any] = {}
    source = str(path) if path is not None else "<command line>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise RecipeError(f"{path}: not valid TOML: {error}") from None
    overrides = overrides or {}
    file_origins = _Origins(source)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = table
        for depth, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):  # the file set `train = 5` and a flag sets train.steps
                raise file_origins.error(".".join(sections[:depth + 1]), f"expected a table, got {node!r}")
        node[key] = value
    if "name" not in table:
        hint = "; give a RECIPE file or --name" if path is None else ""
        raise RecipeError(f"{source}: name: missing (the concept's name{hint})")
    recipe = _build(Recipe, table, "", _Origins(source, frozenset(overrides)))
    recipe.validate(source, overrides)
    return recipe
