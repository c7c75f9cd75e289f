"""EmoLLM on EmoBench: `--config configs/emobench.py[:variant]`, variants `tiny` (default), `vicuna7b`, `mid`.

`tiny` is the CPU job: mini-EmoBench is generated into `<workdir>/data` when `data.root` is empty, a
word-level tokenizer is trained on it, and a tiny ViT + MVP + LLaMA learns it in two stages. `vicuna7b` is the
paper-scale LLaVA-1.5 recipe (CLIP ViT-L/14-336, Vicuna-7B-v1.5); it needs `--config.data.root` and
`--config.init.*`.
`mid` is a benchmark shape (the perf-baseline "big" decoder behind the tiny vision tower).
Every key is overridable: `--config.stages.emotional.steps=400 --config.mesh.fsdp=8`.
`validate_config` refuses inconsistent settings before any work is done.
"""

from __future__ import annotations

import ml_collections

from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.llama import LlamaConfig
from emollm_jax.models.projectors import MVPConfig
from emollm_jax.sharding import DEFAULT_RULES, MESH_AXES

VARIANTS = ("tiny", "vicuna7b", "mid")
TASKS_EMOTIONAL = ("emo_c", "emo_o", "intent", "hate", "humor", "sarcasm")
TASKS_OBJECTIVE = ("caption", "vqa")
STAGE_GROUPS = ("vision", "projector", "llm", "lora")
PROJECTOR_KINDS = ("mlp2x_gelu", "linear", "mvp")
TEMPLATES = ("vicuna_v1", "llama2", "chatml")
DTYPES = ("float32", "bfloat16", "float16")

# Logical parameter axis -> mesh axis (None = replicated): FSDP shards the model width, tensor parallelism
# shards heads / MLP / vocab, `data` only replicates weights. The table is emollm_jax.sharding.DEFAULT_RULES;
# override it whole, e.g. --config.sharding_rules="(('embed', None), ('mlp', 'tensor'), ...)".
SHARDING_RULES = DEFAULT_RULES


def _stage(name: str, tasks: tuple[str, ...], trainable: tuple[str, ...], lr: float, steps: int,
           batch_size: int, **kw) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict(dict(
        name=name,
        tasks=tasks,            # data mixture: records whose task is listed
        trainable=trainable,    # parameter groups updated in this stage; others frozen (no optimizer state)
        lr=lr,
        schedule="cosine",      # cosine | constant
        warmup_ratio=0.03,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        grad_clip=1.0,
        grad_accum=1,
        steps=steps,            # > 0 wins over epochs
        epochs=0.0,
        batch_size=batch_size,  # global batch (all processes)
    ))
    stage.update(kw)
    return stage


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = "tiny"
    c.seed = 0

    # Each part block names a registered kind (emollm_jax.models.parts) and that kind's fields.
    c.model = ml_collections.ConfigDict()
    c.model.vision = CLIPConfig.block(image_size=64, patch_size=16, hidden_size=64, intermediate_size=256,
                                      num_layers=2, num_heads=4)
    c.model.projector = MVPConfig.block(levels=(-1, -2, -3))
    c.model.text = LlamaConfig.block(
        vocab_size=0,  # 0: taken from the tokenizer
        hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
        max_position_embeddings=1024)
    c.model.image_token_id = -1  # -1: the tokenizer's <image> id; else the id used when it has none
    c.model.vision_feature_layer = -2
    c.model.vision_feature_select = "patch"
    c.model.video_pooling = "concat"

    c.data = ml_collections.ConfigDict(dict(
        root="",             # EmoBench root with train/test record files; empty: generate mini-EmoBench
        tokenizer="",        # HF tokenizer dir or tokenizer.json; empty: train the tiny word-level tokenizer
        template="vicuna_v1",
        max_len=256,         # longest training sequence (visual tokens included)
        seq_buckets=(),      # padded lengths, one compile each; empty: (max_len,)
        num_frames=4,        # frames sampled per video
        train_split="train",
        eval_split="test",
        num_workers=0,       # grain worker processes (0: in-process)
        shuffle_buffer=0,
        mini_train_per_task=0,  # mini-EmoBench train records per task; 0 = the generator's default
        mini_test_per_task=0,   # mini-EmoBench test records per task; 0 = the generator's default
        mini_video_files=False,
    ))
    c.emoprompt = ml_collections.ConfigDict(dict(bank="", num_exemplars=0, strategy="fixed", per_task=16))

    c.init = ml_collections.ConfigDict(dict(
        hf="",               # an HF LLaVA/EmoLLM dir, or the conversion CLI's orbax output (whole model)
        llm="",              # HF decoder dir (Vicuna / LLaMA)
        vision="",           # HF CLIP vision dir
        params="",           # orbax params-only checkpoint of the whole EmoLLM
    ))
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=("q_proj", "v_proj")))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = SHARDING_RULES

    c.stage_order = ("objective", "emotional")
    c.stages = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict(dict(
        log_every=10,
        checkpoint_every=200,
        max_to_keep=2,
        loss_chunk=32,       # cross-entropy over the vocab in chunks of this many positions (0: all at once);
                             # chunks where no row is supervised are skipped (answer-only loss: most are)
        profile_steps=0,     # trace this many steps after the first one into <workdir>/profile (0: off)
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_new_tokens=8, max_examples=0, control_split="",
                                            synonyms=""))
    c.plan = ml_collections.ConfigDict(dict(device_memory_gb=16.0, num_devices=8, shallow_layers=0))
    return c


def _tiny() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "tiny"
    # Vision is random-initialised here (no pretrained CLIP on CPU), so stage 2 trains it too: a frozen random
    # tower would cap accuracy on cue-reading tasks.
    # Stage 1 aligns the projector to a frozen random decoder: kept short, it cannot teach much here.
    c.stages.objective = _stage("objective", TASKS_OBJECTIVE, ("projector",), 1e-3, steps=30, batch_size=16)
    # Stage 2 trains on the six EmoBench tasks only: hate/humor/sarcasm need the image cue first and then the
    # caption's rarer flip, which took more samples per task than a mixture with caption/vqa gave in 700;
    # 1100 steps reached a mean of 0.91 or 0.80 depending on float rounding (training from random towers is
    # chaotic at that length); 1600 steps fit the training set (loss ~0.02) and read the captions' flips:
    # mean 0.95.
    c.stages.emotional = _stage(
        "emotional", TASKS_EMOTIONAL, ("vision", "projector", "llm"), 2e-3, steps=1600,
        batch_size=16, weight_decay=0.01, warmup_ratio=0.05)
    # Plain-sum MVP without the CLS "global" perspective: from random towers the gated/global variant learned
    # the image cues more slowly (teacher-forced EmoBench mean 0.37 vs 0.52 after 250 stage-2 steps).
    c.model.projector.update(perspectives=("token", "relation", "multilevel"), fusion="sum")
    # mini-EmoBench prompts are mostly 58..115 tokens (a 4-frame video is 64 visual tokens): nearly every
    # batch pads to 128; a rare longer record (other generator sizes) gets the 160 bucket and one more
    # compile.
    c.data.max_len = 160
    c.data.seq_buckets = (128, 160)
    return c


def _vicuna7b() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "vicuna7b"
    c.model.vision.update(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_layers=24, num_heads=16, dtype="bfloat16", remat=True)
    c.model.projector.levels = (-2, -6, -10)
    c.model.text.update(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                        dtype="bfloat16", remat=True)
    c.model.video_pooling = "mean"  # 8 frames x 576 tokens would not fit 2048 tokens
    # Vicuna's tokenizer has no <image> token: as original LLaVA does, mark image positions with an id
    # outside the vocabulary (never embedded). A llava-hf tokenizer has one (id 32000) and it wins; its
    # checkpoint has 32064 embedding rows: pass --config.model.text.vocab_size=32064 with it.
    c.model.image_token_id = -200
    c.data.max_len = 2048
    c.data.num_frames = 8
    c.data.num_workers = 8
    c.stages.objective = _stage("objective", TASKS_OBJECTIVE, ("projector",), 1e-3, steps=0, batch_size=256,
                                epochs=1.0)
    c.stages.emotional = _stage("emotional", TASKS_EMOTIONAL, ("projector", "llm"), 2e-5, steps=0,
                                batch_size=128, epochs=1.0)
    c.mesh.update(data=1, fsdp=-1)
    # `--mode=plan` on 8 devices (fsdp 8): without accumulation the LLaVA-1.5 stage-2 batch needs ~79 GiB per
    # device; two micro-batches bring it to ~50 GiB. The loss is computed in chunks of 512 positions.
    c.stages.emotional.grad_accum = 2
    c.train.update(log_every=10, checkpoint_every=1000, max_to_keep=3, loss_chunk=512)
    c.plan.device_memory_gb = 80.0
    return c


def _mid() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "mid"
    c.model.text.update(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                        num_kv_heads=8, max_position_embeddings=2048)
    c.data.max_len = 256
    c.stages.objective = _stage("objective", TASKS_OBJECTIVE, ("projector",), 1e-3, steps=20, batch_size=8)
    c.stages.emotional = _stage("emotional", TASKS_EMOTIONAL, ("vision", "projector", "llm"), 2e-4, steps=20,
                                batch_size=8)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` is the variant after the colon in `--config configs/emobench.py:variant`."""
    variant = (arg or "tiny").strip()
    builders = {"tiny": _tiny, "vicuna7b": _vicuna7b, "mid": _mid}
    if variant not in builders:
        raise ValueError(f"configs/emobench.py: unknown variant {variant!r}; expected one of {VARIANTS}")
    return builders[variant]()


def _fail(key: str, message: str) -> None:
    raise ValueError(f"config.{key}: {message}")


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the one allowed -1 axis and checks the product equals the device count."""
    extra = set(config.mesh.keys()) - set(MESH_AXES)
    if extra:
        _fail(f"mesh.{sorted(extra)[0]}", f"unknown mesh axis; expected {MESH_AXES}")
    sizes = {a: int(config.mesh.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    for a, s in sizes.items():
        if s == 0 or s < -1:
            _fail(f"mesh.{a}", f"size {s} must be a positive integer or -1")
    if len(free) > 1:
        _fail(f"mesh.{free[1]}", f"only one axis may be -1 (also {free[0]})")
    fixed = 1
    for s in sizes.values():
        if s != -1:
            fixed *= s
    if free:
        if num_devices % fixed:
            _fail(f"mesh.{free[0]}", f"fixed axes multiply to {fixed}: not a divisor of {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        _fail("mesh", f"axes {sizes} multiply to {fixed}, but there are {num_devices} devices")
    return sizes


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Refuses nonsense before any work; returns the resolved mesh shape. Errors name the offending key."""
    if config.variant not in VARIANTS:
        _fail("variant", f"unknown variant {config.variant!r}; expected {VARIANTS}")
    mesh = _check_mesh(config, num_devices)
    dp = mesh["data"] * mesh["fsdp"]

    m = config.model
    if m.projector.kind not in PROJECTOR_KINDS:
        _fail("model.projector.kind", f"unknown projector {m.projector.kind!r}; expected {PROJECTOR_KINDS}")
    if m.projector.kind == "mvp":
        if not m.projector.perspectives:
            _fail("model.projector.perspectives", "MVP needs at least one perspective")
        if not 0.0 <= m.projector.tau <= 1.0 and "relation" in m.projector.perspectives:
            _fail("model.projector.tau", f"cosine threshold {m.projector.tau} is outside [0, 1]")
        for lvl in m.projector.levels:
            if not -m.vision.num_layers - 1 <= lvl <= m.vision.num_layers:
                _fail("model.projector.levels", f"level {lvl} is outside the {m.vision.num_layers}-layer ViT")
    if not -m.vision.num_layers - 1 <= m.vision_feature_layer <= m.vision.num_layers:
        _fail("model.vision_feature_layer",
              f"{m.vision_feature_layer} is outside the {m.vision.num_layers}-layer tower")
    if m.vision.image_size % m.vision.patch_size:
        _fail("model.vision.image_size", f"{m.vision.image_size} is not a multiple of patch_size "
              f"{m.vision.patch_size}")
    for tower in ("vision", "text"):
        for key in ("dtype", "param_dtype"):
            if m[tower][key] not in DTYPES:
                _fail(f"model.{tower}.{key}", f"unknown dtype {m[tower][key]!r}; expected {DTYPES}")
    if m.text.num_heads % m.text.num_kv_heads:
        _fail("model.text.num_kv_heads", f"{m.text.num_kv_heads} must divide num_heads={m.text.num_heads}")
    if m.text.hidden_size % m.text.num_heads:
        _fail("model.text.num_heads", f"{m.text.num_heads} does not divide hidden_size {m.text.hidden_size}")
    if m.video_pooling not in ("concat", "mean"):
        _fail("model.video_pooling", f"unknown pooling {m.video_pooling!r}; expected concat or mean")
    if m.vision_feature_select not in ("patch", "full"):
        _fail("model.vision_feature_select", f"unknown {m.vision_feature_select!r}; expected patch or full")

    if config.data.template not in TEMPLATES:
        _fail("data.template", f"unknown chat template {config.data.template!r}; expected {TEMPLATES}")
    if config.data.max_len <= 0:
        _fail("data.max_len", f"{config.data.max_len} must be positive")
    if config.variant == "vicuna7b":
        if not config.data.root:
            _fail("data.root", "vicuna7b trains on a real EmoBench copy: pass --config.data.root=<dir>")
        if not config.data.tokenizer and not (config.init.hf or config.init.llm):
            _fail("data.tokenizer", "vicuna7b needs the Vicuna tokenizer: pass --config.data.tokenizer or "
                  "--config.init.llm")
        if not (config.init.hf or config.init.params or (config.init.llm and config.init.vision)):
            _fail("init.llm", "vicuna7b needs weights: --config.init.llm and --config.init.vision (HF dirs), "
                  "or --config.init.hf / --config.init.params")

    if not config.stage_order:
        _fail("stage_order", "no stages to run")
    for name in config.stage_order:
        if name not in config.stages:
            _fail("stage_order", f"stage {name!r} is not in config.stages {sorted(config.stages.keys())}")
        s = config.stages[name]
        key = f"stages.{name}"
        for group in s.trainable:
            if group not in STAGE_GROUPS:
                _fail(f"{key}.trainable", f"unknown parameter group {group!r}; expected {STAGE_GROUPS}")
        if not s.trainable:
            _fail(f"{key}.trainable", "no trainable group")
        if "lora" in s.trainable and config.lora.rank <= 0:
            _fail(f"{key}.trainable", "'lora' is trainable but config.lora.rank is 0")
        for task in s.tasks:
            if task not in TASKS_EMOTIONAL + TASKS_OBJECTIVE:
                _fail(f"{key}.tasks", f"unknown task {task!r}")
        if not s.tasks:
            _fail(f"{key}.tasks", "empty data mixture")
        if s.steps <= 0 and s.epochs <= 0:
            _fail(f"{key}.steps", "set steps > 0 or epochs > 0")
        if s.batch_size <= 0 or s.batch_size % dp:
            _fail(f"{key}.batch_size", f"global batch {s.batch_size} is not divisible by the data-parallel "
                  f"size {dp} (mesh data x fsdp)")
        if s.grad_accum < 1 or s.batch_size % (dp * s.grad_accum):
            _fail(f"{key}.grad_accum", f"{s.grad_accum} does not split the per-shard batch of {s.batch_size}")
        if s.schedule not in ("cosine", "constant"):
            _fail(f"{key}.schedule", f"unknown schedule {s.schedule!r}; expected cosine or constant")
        if not s.lr > 0:
            _fail(f"{key}.lr", f"learning rate {s.lr} must be positive")
        if not 0.0 <= s.warmup_ratio < 1.0:
            _fail(f"{key}.warmup_ratio", f"{s.warmup_ratio} must be in [0, 1)")
    if config.train.checkpoint_every <= 0:
        _fail("train.checkpoint_every", "must be positive")
    if config.train.log_every <= 0:
        _fail("train.log_every", "must be positive")
    return mesh
