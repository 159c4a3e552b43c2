"""Run configuration: TOML read into one dataclass per section, strictly.

An unknown or misplaced key, a wrong type or a bad value is a `ConfigError` that names the file,
the line, the key, and the nearest valid key. `--set section.key=value` overrides a key (the value
is read as TOML, or taken as a string). `resolved_toml` writes the config back out as it was run.

Sections: [model], [lora], [data], [train], [run]; a command adds its own ([dpo], [grpo], [kto], [reward]).
"""

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration mistake, with where it is and what to do about it."""


def choice(default, *options, doc=""):
    """A string field restricted to `options`."""
    return field(default=default, metadata={"choices": options, "doc": doc})


def doc(default, text, **kw):
    if isinstance(default, (list, dict)):  # a fresh copy for each config
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


@dataclass
class ModelConfig:
    path: str = doc("builtin:tiny-llama", "local folder, hub id or .gguf file of a causal LM; builtin:tiny-llama needs no download")
    adapter: str = doc("", "an existing PEFT adapter folder to start from")
    finetune: str = choice("lora", "lora", "full", doc="train LoRA adapters, or every weight")
    load_in_4bit: bool = doc(True, "QLoRA: the frozen base in bitsandbytes 4-bit")
    bnb_4bit_quant_type: str = choice("nf4", "nf4", "fp4")
    bnb_4bit_use_double_quant: bool = doc(True, "quantize the quantization constants too")
    cache_4bit: bool = doc(True, "QLoRA: save the quantized base of a local folder once ($FASTTUNE_CACHE/4bit) "
                           "and load that copy in later runs")
    compute_dtype: str = choice("auto", "auto", "bf16", "fp16", "fp32", doc="auto: bf16 where supported, else fp32")
    chat_template: str = doc("", "a Jinja chat template (inline, or a path to a file) replacing the tokenizer's")
    trust_remote_code: bool = doc(False, "run the model folder's own Python code (models not in transformers)")


@dataclass
class LoraSection:
    r: int = doc(16, "rank")
    alpha: int = doc(32, "scaling numerator (alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = doc(0.0, "dropout on the adapter input")
    target_modules: Any = doc("all-linear", '"all-linear" or a list of module names')
    rslora: bool = doc(False, "rank-stabilized scaling")


@dataclass
class DataConfig:
    train: str = doc("", "JSON/JSONL, Parquet, CSV or Arrow file, datasets folder, or hub id (org/name) of examples")
    eval: str = doc("", "optional held-out file, same format")
    format: str = choice("auto", "auto", "alpaca", "sharegpt", "messages")
    columns: dict = doc({}, 'map the format\'s field names onto your columns, e.g. {instruction = "question", output = "answer"}')
    split: str = doc("train", "split of a hub dataset or a datasets folder")
    subset: str = doc("", "subset (configuration) of a hub dataset")
    roles: dict = doc({}, 'map other role names onto system/user/assistant, e.g. {narrator = "assistant"}')
    trainable_roles: list = doc([], "extra role names whose turns are trained")
    max_seq_len: int = doc(1024, "tokens per example")
    overlong: str = choice("truncate", "error", "drop", "truncate", doc="what happens to longer examples (always counted)")
    packing: bool = doc(True, "pack examples into rows of micro_batch_size tokens (needs varlen attention)")
    prefix_sharing: bool = doc(True, "run a prefix that several sequences share once: a DPO pair's or a GRPO "
                               "group's prompt, a system prompt common to the examples of a packed SFT row "
                               "(exact; needs varlen attention)")
    train_on: str = choice("assistant", "assistant", "last_assistant", "all", doc="which turns are trained")
    multi_turn: str = choice("full", "full", "split", doc="train all turns of a conversation in one example as "
                             "rendered together, or one example per turn as generation renders it")


@dataclass
class TrainConfig:
    learning_rate: float = doc(2e-4, "peak learning rate")
    lr_scheduler: str = choice("cosine", "cosine", "linear", "constant")
    warmup_steps: int = doc(10, "linear warmup steps")
    epochs: float = doc(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = doc(0, "optimizer steps; 0: from epochs")
    micro_batch_size: int = doc(2048, "tokens per row when packing, else sequences per micro-batch")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = doc(False, "recompute activations in the backward")
    optimizer: str = choice("adamw", "adamw", "adamw_8bit", "paged_adamw_8bit")
    weight_decay: float = doc(0.0, "decoupled weight decay")
    max_grad_norm: float = doc(1.0, "clip the global grad norm; 0: off")
    seed: int = doc(42, "seed of weights init (builtin), data order and dropout")
    parallel: str = choice("auto", "auto", "ddp", "fsdp", doc="under torchrun: DDP (each rank a whole model) or "
                           "FSDP2 (sharded); auto: DDP for (Q)LoRA, FSDP2 for full fine-tuning")


@dataclass
class RunConfig:
    output_dir: str = doc("runs/sft", "where the config, metrics, checkpoints and loss.png go")
    log_every: int = doc(1, "steps between metrics lines")
    eval_every: int = doc(0, "steps between evaluations; 0: at the end only (if an eval file is given)")
    save_every: int = doc(50, "steps between checkpoints; the last step is always saved")
    save_every_minutes: float = doc(0.0, "also save when this many minutes passed since the last checkpoint; 0: off")
    keep: int = doc(2, "checkpoints kept")
    resume: str = doc("auto", '"auto" (the last complete checkpoint), "never", or a checkpoint folder')
    report_to: list = doc([], '"tensorboard" and/or "wandb": where metrics go besides metrics.jsonl')


@dataclass
class SFTTrainConfig(TrainConfig):
    loss: str = choice("nll", "nll", "dft", doc="sft only. nll: cross-entropy; dft: each token's loss × its detached "
                       'probability (Dynamic Fine-Tuning, TRL\'s loss_type="dft")')
    class_weights: dict = doc({}, 'sft only. A weight per target token (keys as the tokenizer spells its tokens), '
                              'the others 1, e.g. {"!" = 2.0}; the mean divides by the summed weights (torch\'s '
                              "cross_entropy `weight`)")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


from fasttune.kernels.dpo import LOSS_TYPES as DPO_LOSS_TYPES  # noqa: E402 - light import
from fasttune.kernels.preference import LOSS_TYPES as REFERENCE_FREE_LOSS_TYPES  # noqa: E402 - light import


@dataclass
class PrefDataConfig:
    train: str = doc("", "JSON/JSONL, Parquet, CSV or Arrow file, datasets folder, or hub id of preference pairs")
    eval: str = doc("", "optional held-out pairs, same format")
    format: str = choice("auto", "auto", "prompt_chosen_rejected", "sharegpt", "openai")
    columns: dict = doc({}, 'map the format\'s field names onto your columns, e.g. {instruction = "question", output = "answer"}')
    split: str = doc("train", "split of a hub dataset or a datasets folder")
    subset: str = doc("", "subset (configuration) of a hub dataset")
    roles: dict = doc({}, "map other role names onto system/user/assistant")
    overlong: str = choice("truncate", "error", "drop", "truncate",
                           doc="pairs over dpo.max_len or dpo.max_prompt_len (always counted)")
    prefix_sharing: bool = doc(True, "dpo: run each pair's prompt once for both responses (exact; needs varlen "
                               "attention); reward models do not share yet")


@dataclass
class DPOSection:
    beta: float = doc(0.1, "strength of the KL regularization towards the reference; orpo: λ, the weight of the "
                           "odds-ratio term; simpo/cpo: the scale of the log-prob margin")
    loss_type: str = choice("sigmoid", *DPO_LOSS_TYPES, *REFERENCE_FREE_LOSS_TYPES,
                            doc="orpo, simpo, cpo: reference-free (no reference forward); see docs/preference-losses.md")
    label_smoothing: float = doc(0.0, "conservative DPO (sigmoid, robust, exo_pair; also simpo, cpo)")
    simpo_gamma: float = doc(0.5, "simpo: the target reward margin γ")
    cpo_alpha: float = doc(1.0, "simpo, cpo: weight of the NLL term on the chosen responses (0: off)")
    average_log_prob: bool = doc(False, "average the log-probs over each response's tokens instead of summing")
    max_prompt_len: int = doc(512, "prompt tokens kept (the oldest are cut when truncating)")
    max_len: int = doc(1024, "prompt + response tokens")
    sft_weight: float = doc(0.0, "weight of an SFT (NLL) term on the chosen responses, as in RPO")
    reference: str = choice("live", "live", "precompute",
                            doc="live: the base with the adapter off (or the starting adapter); precompute: once, cached")


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/dpo"))
    dpo: DPOSection = field(default_factory=DPOSection)


from fasttune.advantages import ESTIMATORS, NEEDS_GROUP  # noqa: E402 - light imports
from fasttune.kernels.grpo import IMPORTANCE_LEVELS, LOSS_TYPES as GRPO_LOSS_TYPES  # noqa: E402
from fasttune.kernels.kto import LOSS_TYPES as KTO_LOSS_TYPES  # noqa: E402 - light import


@dataclass
class KTODataConfig:
    train: str = doc("", "unpaired completions (prompt/completion/label), or preference pairs with kto.from_pairs: "
                         "JSON/JSONL, Parquet, CSV or Arrow file, datasets folder, or hub id")
    eval: str = doc("", "optional held-out data, same format")
    format: str = choice("auto", "auto", "kto", "prompt_chosen_rejected", "sharegpt", "openai")
    columns: dict = doc({}, 'map the format\'s field names onto your columns, e.g. {completion = "answer"}')
    split: str = doc("train", "split of a hub dataset or a datasets folder")
    subset: str = doc("", "subset (configuration) of a hub dataset")
    roles: dict = doc({}, "map other role names onto system/user/assistant")
    overlong: str = choice("truncate", "error", "drop", "truncate",
                           doc="completions over kto.max_len or kto.max_prompt_len (always counted)")


@dataclass
class KTOSection:
    beta: float = doc(0.1, "strength of the KL regularization towards the reference")
    loss_type: str = choice("kto", *KTO_LOSS_TYPES, doc="kto: against the batch KL estimate; apo_zero_unpaired: "
                            "no KL term")
    desirable_weight: float = doc(1.0, "weight of the desirable completions' losses")
    undesirable_weight: float = doc(1.0, "weight of the undesirable completions' losses")
    from_pairs: bool = doc(False, "read preference pairs as chosen = desirable, rejected = undesirable")
    max_prompt_len: int = doc(512, "prompt tokens kept (the oldest are cut when truncating)")
    max_len: int = doc(1024, "prompt + completion tokens")


@dataclass
class KTOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: KTODataConfig = field(default_factory=KTODataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/kto"))
    kto: KTOSection = field(default_factory=KTOSection)


@dataclass
class RewardSection:
    max_prompt_len: int = doc(512, "prompt tokens kept (the oldest are cut when truncating)")
    max_len: int = doc(1024, "prompt + response tokens")
    center_rewards_coefficient: float = doc(0.0, "weight of mean((r_chosen + r_rejected)²), which keeps rewards "
                                            "centred on 0 (TRL's center_rewards_coefficient); 0: off")


@dataclass
class RewardConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/reward"))
    reward: RewardSection = field(default_factory=RewardSection)




@dataclass
class PromptDataConfig:
    train: str = doc("", 'prompts ("prompt": a string or messages) and answer columns: JSON/JSONL, Parquet, CSV, '
                         "Arrow, datasets folder or hub id")
    eval: str = doc("", "optional held-out prompts, same format: mean rewards every run.eval_every steps")
    columns: dict = doc({}, 'map the format\'s field names onto your columns, e.g. {instruction = "question", output = "answer"}')
    split: str = doc("train", "split of a hub dataset or a datasets folder")
    subset: str = doc("", "subset (configuration) of a hub dataset")
    roles: dict = doc({}, "map other role names onto system/user/assistant")
    prefix_sharing: bool = doc(True, "grpo: run each prompt once for its group's completions in the reference "
                               "and training forwards (exact; needs varlen attention); ppo does not share yet")


@dataclass
class GRPOSection:
    num_generations: int = doc(4, "completions sampled for each prompt (a group)")
    prompts_per_step: int = doc(2, "prompts per micro-batch; a micro-batch holds prompts_per_step × num_generations")
    max_prompt_len: int = doc(256, "prompt tokens kept (the oldest are cut)")
    max_completion_len: int = doc(64, "new tokens per completion at most")
    temperature: float = doc(1.0, "sampling temperature (the loss uses the same)")
    top_p: float = doc(1.0, "nucleus sampling")
    loss_type: str = choice("dapo", *GRPO_LOSS_TYPES, doc="the policy loss and how it is summed over "
                            "tokens (docs/rl-estimators.md); cispo: the clipped, detached ratio times the log-prob")
    advantage: str = choice("grpo", *ESTIMATORS, doc="estimator: group mean baseline, leave-one-out, or REINFORCE++ "
                            "(per-token returns with the KL in the reward, whitened over the batch)")
    importance_sampling_level: str = choice("token", *IMPORTANCE_LEVELS, doc="one ratio per token, or per "
                                            "sequence (GSPO: the geometric mean of its token ratios)")
    beta: float = doc(0.0, "weight of the KL to the reference (the base with the adapter off): in the loss, or for "
                           "reinforce++ in the reward")
    epsilon_low: float = doc(0.2, "lower clip of the ratio: 1 - epsilon_low")
    epsilon_high: float = doc(0.2, "upper clip of the ratio: 1 + epsilon_high (cispo: the cap itself; 5.0 advised)")
    scale_rewards: str = choice("group", "group", "batch", "none", doc="divide advantages by the std of the group's "
                                "or the batch's rewards, or not (rloo: batch = TRL RLOO's normalize_advantages; "
                                "reinforce++: none keeps only the mean subtraction)")
    mask_truncated_completions: bool = doc(False, "completions that hit max_completion_len get no loss")
    num_iterations: int = doc(1, "optimizer steps on each batch of samples (uses their old log-probs)")
    reward_funcs: list = doc(["math_answer"], 'built-in (math_answer, format, digit_ratio) or "file.py:function" / "module:function"')
    reward_models: list = doc([], "reward-model run folders (fasttune reward) scoring the completions, after reward_funcs")
    reward_weights: list = doc([], "one weight per reward function, then per reward model (default: all 1)")
    rollout_weights: str = choice("auto", "auto", "merged", "live",
                                  doc="sample from a merged dense copy of the policy (refreshed each step) or from the "
                                      "live (4-bit) model; auto: merged when the copy fits in half the free memory")
    generation: str = choice("auto", "auto", "dynamic", "static", "continuous",
                             doc="transformers' generate with a dynamic or static (compiled on CUDA) KV cache, or its "
                                 "continuous batching; auto: the measured fastest for the device and batch size")


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/grpo"))
    grpo: GRPOSection = field(default_factory=GRPOSection)


@dataclass
class PPOSection:
    num_generations: int = doc(1, "completions sampled for each prompt")
    prompts_per_step: int = doc(4, "prompts per micro-batch; a micro-batch holds prompts_per_step × num_generations")
    max_prompt_len: int = doc(256, "prompt tokens kept (the oldest are cut)")
    max_completion_len: int = doc(64, "new tokens per completion at most")
    temperature: float = doc(0.7, "sampling temperature (the loss uses the same)")
    top_p: float = doc(1.0, "nucleus sampling")
    kl_coef: float = doc(0.05, "β: the per-token reward is -β·KL_t, plus the sequence reward at the last token")
    kl_estimator: str = choice("k1", "k1", "k3", doc="k1: log π - log π_ref; k3: (r - 1) - log r with r = π_ref / π")
    gamma: float = doc(1.0, "discount of GAE")
    lam: float = doc(0.95, "λ of GAE")
    cliprange: float = doc(0.2, "the policy ratio is clipped to [1 - cliprange, 1 + cliprange]")
    cliprange_value: float = doc(0.2, "the value prediction is clipped to within this of the rollout's value")
    vf_coef: float = doc(0.1, "weight of the value loss beside the policy loss")
    whiten_rewards: bool = doc(False, "scale the per-token rewards by their std over the batch before GAE")
    ppo_epochs: int = doc(4, "optimizer steps on each batch of rollouts (uses their old log-probs and values)")
    reward_funcs: list = doc([], 'reward functions: built-in (math_answer, format, digit_ratio) or "file.py:function"')
    reward_models: list = doc([], "reward-model run folders (fasttune reward) scoring the completions, after reward_funcs")
    reward_weights: list = doc([], "one weight per reward function, then per reward model (default: all 1)")
    rollout_weights: str = choice("auto", "auto", "merged", "live", doc="as grpo.rollout_weights")
    generation: str = choice("auto", "auto", "dynamic", "static", "continuous", doc="as grpo.generation")


@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/ppo"))
    ppo: PPOSection = field(default_factory=PPOSection)


# --------------------------------------------------------------------------------------------


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """1-based line of `key =` inside `[section]` (or of the section header) in TOML text."""
    current = None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[([^\[\]]+)\]", s)
        if m:
            current = m.group(1).strip()
            if key is None and current == section:
                return i
            continue
        if key is not None and current == section and re.match(rf"^{re.escape(key)}\s*=", s):
            return i
    return None


def _sections(schema) -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else get_type_hints(schema)[f.name] for f in dataclasses.fields(schema)}


def _check_type(value, hint, where):
    origin = get_origin(hint) or hint
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict, str, int, float, bool):
        if isinstance(value, bool) and origin is not bool:
            raise ConfigError(f"{where} must be {origin.__name__}, got a boolean ({value!r})")
        if not isinstance(value, origin):
            raise ConfigError(f"{where} must be {origin.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _suggest(name, options):
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(options))}"


def parse_config(data: dict, schema=SFTConfig, text: str = "", source: str = "config"):
    """Build `schema` from a parsed TOML dict, strictly."""

    def where(section, key=None):
        line = _line_of(text, section, key)
        loc = f"{source}:{line}" if line else source
        return f"{loc}: [{section}]" + (f" {key}" if key else "")

    sections = _sections(schema)
    all_keys = {k: s for s, cls in sections.items() for k in (f.name for f in dataclasses.fields(cls))}
    built = {}
    for name, value in data.items():
        if name not in sections:
            if name in all_keys:  # a key written at the top level
                raise ConfigError(f"{source}:{_line_of(text, None, name) or '?'}: {name!r} belongs in "
                                  f"[{all_keys[name]}]; move it there")
            raise ConfigError(f"{source}: unknown section [{name}]" + _suggest(name, sections))
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys")
        cls = sections[name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in hints:
                if key in all_keys and all_keys[key] != name:
                    raise ConfigError(f"{where(name, key)} is not a [{name}] key: it belongs in [{all_keys[key]}]")
                raise ConfigError(f"{where(name, key)} is not a known key" + _suggest(key, hints))
            v = _check_type(v, hints[key], where(name, key))
            options = next(f for f in dataclasses.fields(cls) if f.name == key).metadata.get("choices")
            if options and v not in options:
                raise ConfigError(f"{where(name, key)} = {v!r} is not one of {', '.join(map(repr, options))}"
                                  + _suggest(str(v), options).replace("valid:", "choose from"))
            kwargs[key] = v
        built[name] = cls(**kwargs)
    cfg = schema(**built)
    _validate(cfg, where)
    return cfg


def _validate(cfg, where):
    """Value checks a type cannot express."""
    for name in getattr(getattr(cfg, "run", None), "report_to", []):
        if name not in ("tensorboard", "wandb"):
            raise ConfigError(f"{where('run', 'report_to')}: unknown {name!r}; use \"tensorboard\" and/or \"wandb\"")
    positive = [("train", "micro_batch_size"), ("train", "grad_accum"), ("data", "max_seq_len"), ("lora", "r"),
                ("run", "keep"), ("run", "log_every"), ("dpo", "max_len"), ("dpo", "max_prompt_len"),
                ("grpo", "num_generations"), ("grpo", "prompts_per_step"), ("grpo", "max_prompt_len"),
                ("grpo", "max_completion_len"), ("grpo", "num_iterations"), ("kto", "max_len"), ("kto", "max_prompt_len"),
                ("reward", "max_len"), ("reward", "max_prompt_len"), ("ppo", "num_generations"), ("ppo", "prompts_per_step"),
                ("ppo", "max_prompt_len"), ("ppo", "max_completion_len"), ("ppo", "ppo_epochs")]
    for section, key in positive:
        obj = getattr(cfg, section, None)
        if obj is not None and hasattr(obj, key) and getattr(obj, key) < 1:
            raise ConfigError(f"{where(section, key)} must be >= 1, got {getattr(obj, key)}")
    for section, key in [("train", "learning_rate"), ("train", "max_grad_norm"), ("train", "weight_decay"),
                         ("lora", "dropout"), ("train", "warmup_steps"), ("train", "max_steps"), ("dpo", "beta"),
                         ("run", "save_every_minutes"),
                ("dpo", "sft_weight"), ("dpo", "cpo_alpha"), ("grpo", "beta"), ("grpo", "temperature"), ("grpo", "epsilon_low"),
                ("grpo", "epsilon_high"), ("kto", "beta"), ("kto", "desirable_weight"), ("kto", "undesirable_weight"),
                ("reward", "center_rewards_coefficient"), ("ppo", "kl_coef"), ("ppo", "temperature"), ("ppo", "gamma"),
                ("ppo", "lam"), ("ppo", "cliprange"), ("ppo", "cliprange_value"), ("ppo", "vf_coef")]:
        obj = getattr(cfg, section, None)
        if obj is not None and hasattr(obj, key) and getattr(obj, key) < 0:
            raise ConfigError(f"{where(section, key)} must be >= 0, got {getattr(obj, key)}")
    g = getattr(cfg, "grpo", None)
    if g is not None and g.advantage in NEEDS_GROUP and g.num_generations < 2:
        raise ConfigError(f"{where('grpo', 'num_generations')} = {g.num_generations} with grpo.advantage = "
                          f"{g.advantage!r}: its baseline comes from the other completions of the same prompt, so it "
                          f"needs grpo.num_generations >= 2 (or use grpo.advantage = \"reinforce++\")")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a parsed TOML dict (value read as TOML, else a string)."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data.setdefault(section, {})[key] = value
    return data


def load_config(path, overrides=None, schema=None):
    """Read a config; without `schema`, the command whose own section it has (fasttune/tasks.py) picks it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data = apply_overrides(data, overrides)
    if schema is None:
        from .tasks import for_sections

        schema = for_sections(data).load("schema")
    return parse_config(data, schema, text, str(path))


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def resolved_toml(cfg) -> str:
    """The config as TOML, every key written out (what `output_dir/config.toml` holds)."""
    out = []
    for section in dataclasses.fields(cfg):
        out.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            out.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section.name), f.name))}")
        out.append("")
    return "\n".join(out)


def reference_markdown(schema=SFTConfig, sections=None) -> str:
    """The configuration reference (the README's tables), from the dataclasses' own docs."""
    out = []
    for section in dataclasses.fields(schema):
        if sections is not None and section.name not in sections:
            continue
        cls = _sections(schema)[section.name]
        out += [f"**[{section.name}]**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            meaning = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                meaning = (meaning + "; " if meaning else "") + "one of " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
            out.append(f"| `{f.name}` | `{_toml_value(default)}` | {meaning} |")
        out.append("")
    return "\n".join(out)


REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def reference_document() -> str:
    """Everything docs/configuration.md holds between its markers: the sections every command shares
    (as `fasttune sft` has them), then each other command's own sections (fasttune/tasks.py)."""
    from .tasks import TASKS

    parts = ["### Every command: [model], [lora], [train], [run]; and `fasttune sft`'s [data]\n\n" + reference_markdown()]
    for name, spec in TASKS.items():
        schema = spec.load("schema")
        own = [f.name for f in dataclasses.fields(schema) if _sections(schema)[f.name] is not _sections(SFTConfig).get(f.name)]
        if own:
            parts.append(f"### `fasttune {name}`: " + ", ".join(f"[{s}]" for s in own) + "\n\n" + reference_markdown(schema, own))
    return "\n".join(parts)


if __name__ == "__main__":  # python -m fasttune.config [--write]: print the reference, or rewrite docs/configuration.md
    import sys

    from fasttune.config import REFERENCE, reference_document  # the module, not this __main__ copy of it

    if "--write" in sys.argv:
        text = REFERENCE.read_text()
        start, end = text.index("<!-- config:start -->"), text.index("<!-- config:end -->")
        REFERENCE.write_text(text[:start] + "<!-- config:start -->\n" + reference_document() + "\n" + text[end:])
        print(f"wrote {REFERENCE}")
    else:
        print(reference_document())
