"""What one model family declares: `Family` (its pipeline, layer presets, token rule, builders, bench shapes and sweep
presets) and the small records it is made of. Plain data and names: importing this module imports neither torch nor
any other goca_scfg module, so the CLI, the registry and segment/goca.py can all read it.

Code is named as "module:attribute" and imported only when asked for (`Family.pipeline_class`, `resolve`), which
keeps the registry free of import cycles and of torch, and keeps `goca_scfg.testing` out of the library's imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..layout import ModelLayout

DEFAULT_SCALES = (2.0, 3.0, 5.0, 7.5, 10.0)  # algorithm.md §3.2: the paper's guidance scales


def resolve(target: str) -> Any:
    """The object a "module:attribute" name points at (imported now)."""
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"{target!r} is not a 'module:attribute' name")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class GoCAPreset:
    """The authors' GoCA layers for one published architecture (algorithm.md §8), or a rule's choice for a model
    they did not configure (§8.4): cross blocks (None: all), the dense block whose attn2 query is the similarity's
    reference, the propagation blocks and order, the segmentation grid's factor (None: the propagation blocks' grid),
    the branch whose global token gives the foreground ("uncond": the uncond map of token 0, SD; "cond": the cond
    `</s>` map put into the uncond half, PixArt-Sigma) and the name `GoCALayers.describe` reports. Joint-attention
    presets (§8.5) also fix the head aggregation (`head`: the authors' Flux config averages heads) and take the
    reference from the dense block's attention output (`reference="output"`) instead of its query."""

    cross: tuple[str, ...] | None
    dense: str
    self_blocks: tuple[str, ...]
    order: int
    grid_factor: int | None = None
    foreground: Literal["uncond", "cond"] = "uncond"
    name: str = "preset"
    head: Literal["dot", "average"] | None = None
    reference: Literal["query", "output"] = "query"


# A preset applies to a denoiser whose layout the matcher accepts (it reads `ModelLayout`, never the weights).
PresetMatch = Callable[["ModelLayout"], bool]


@dataclass(frozen=True)
class BenchShapes:
    """What bench/ runs for a family by default (`--arch NAME`): the timed cases ("SIZE[xW]bBATCH" list), the sizes
    step_flops counts, the steps and dtype of a timed call, the methods it can run (None: the bench's default list),
    and extra keywords of every benchmark call."""

    cases: str
    flops_sizes: str
    steps: int = 50
    dtype: str = "fp16"
    methods: tuple[str, ...] | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepPreset:
    """A named evaluation protocol of eval/sweep.py on this family's model: `settings` are `GenerationSettings`
    fields besides the model (steps, height, …), then the default methods, guidance scales and seeds."""

    name: str
    methods: tuple[str, ...]
    scales: tuple[float, ...] = DEFAULT_SCALES
    seeds: tuple[int, ...] = (42,)
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """Everything goca-scfg knows about one model family, in one place.

    name: the `--arch` of bench/ and the registry key; title: for messages and docs; model_id: the default hub id;
    extends: the diffusers pipeline classes (`model_index.json` `_class_name`) our pipeline replaces; pipeline:
    "module:Class" of our pipeline (`exports` are the names of that module the package exports; default the class
    and its `…Output`); denoiser: the component name of the UNet or transformer; goca_presets: (matcher, preset)
    pairs for the architectures the authors configured (UNets they did not configure take the SD v1.5 rules,
    transformers the PixArt-Sigma rule: segment/goca.py, algorithm.md §8.2, §8.4); token_rule: "module:function"
    building `PromptTokens` as `rule(tokenizer, prompts, num_images_per_prompt, **options)`; tiny_models: offline
    model name → "module:function(seed, scheduler, torch_dtype)" returning a ready pipeline; tiny_components /
    random_components: "module:function" building the random component dict (tiny; the real architecture);
    bench: `BenchShapes`; sweep_presets: `SweepPreset`s; region_tokenizer: the pipeline component whose tokens name
    the regions (`token_rule`'s tokenizer; Flux: its T5 `tokenizer_2`) and token_options the rule's defaults that
    differ from its own (Flux's `max_sequence_length`, 512); scale_keyword: the `__call__` keyword of
    S-CFG's w (Flux: `true_cfg_scale`); negative_prompt_required: CFG runs only with a negative prompt (Flux), so the
    tools pass an empty one per prompt.
    """

    name: str
    title: str
    model_id: str
    extends: tuple[str, ...]
    pipeline: str
    denoiser: Literal["unet", "transformer"]
    token_rule: str
    tiny_models: Mapping[str, str]
    tiny_components: str
    random_components: str
    bench: BenchShapes
    sweep_presets: tuple[SweepPreset, ...] = ()
    goca_presets: tuple[tuple[PresetMatch, GoCAPreset], ...] = ()
    exports: tuple[str, ...] | None = None
    region_tokenizer: str = "tokenizer"
    token_options: Mapping[str, Any] = field(default_factory=dict)
    scale_keyword: str = "guidance_scale"
    negative_prompt_required: bool = False

    @property
    def pipeline_module(self) -> str:
        return self.pipeline.partition(":")[0]

    @property
    def pipeline_name(self) -> str:
        return self.pipeline.partition(":")[2]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The `_class_name`s that load as this family: the diffusers classes it extends and our own class."""
        return (*self.extends, self.pipeline_name)

    @property
    def public_names(self) -> tuple[str, ...]:
        """The names `goca_scfg` exports from the pipeline module."""
        return self.exports or (self.pipeline_name, f"{self.pipeline_name}Output")

    def pipeline_class(self) -> type:
        """Our SCFG pipeline class (imports the pipeline module, and with it torch and diffusers)."""
        return resolve(self.pipeline)

    def tokens(self, tokenizer, prompts: list[str], num_images_per_prompt: int = 1, **options):
        """The family's `PromptTokens` of `prompts` (which positions are `<sos>`, caption, padding; §2.5)."""
        return resolve(self.token_rule)(tokenizer, prompts, num_images_per_prompt, **{**self.token_options, **options})

    def guidance_kwargs(self, scale: float, prompts: int, negative_prompt: str | None = None) -> dict[str, Any]:
        """The `__call__` keywords that set CFG's w for `prompts` prompts: `scale_keyword`, and where CFG needs a
        negative prompt (Flux's true CFG) the given one or "" for each prompt (one string for a list of prompts
        fails in `FluxPipeline`)."""
        kwargs: dict[str, Any] = {self.scale_keyword: scale}
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        if self.negative_prompt_required:
            kwargs["negative_prompt"] = [negative_prompt or ""] * prompts
        return kwargs

    def build_tiny_components(self, **kwargs) -> dict[str, Any]:
        """The tiny random component dict (goca_scfg.testing; seconds on a CPU)."""
        return resolve(self.tiny_components)(**kwargs)

    def build_random_components(self, **kwargs) -> dict[str, Any]:
        """The real architecture's component dict with random weights, offline (for benchmarks)."""
        return resolve(self.random_components)(**kwargs)
