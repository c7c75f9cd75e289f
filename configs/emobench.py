"""EmoLLM on EmoBench: `--config configs/emobench.py[:variant]`, variants `tiny` (default), `vicuna7b`,
`qwen05b`, `llama3_8b`, `mid`.

`tiny` is the CPU job: mini-EmoBench is generated into `<workdir>/data` when `data.root` is empty, a
word-level tokenizer is trained on it, and a tiny ViT + MVP + LLaMA learns it in two stages. `vicuna7b` is the
paper-scale LLaVA-1.5 recipe (CLIP ViT-L/14-336, Vicuna-7B-v1.5); `qwen05b` is llava-interleave-qwen-0.5b's
shape (SigLIP-so400m/14-384, 26 layers, + the Qwen2-architecture 0.5B chat model, Qwen1.5-0.5B-Chat), the
small base researchers fine-tune on one GPU; `llama3_8b` is llava-llama-3-8b's (CLIP ViT-L/14-336 +
LLaMA-3-8B-Instruct). These need `--config.data.root` and `--config.init.*`.
`mid` is a benchmark shape (the perf-baseline "big" decoder behind the tiny vision tower).
Every key is overridable: `--config.stages.emotional.steps=400 --config.mesh.fsdp=8`.
Each block starts from its section's defaults (`StageConfig.defaults(...)`, defined beside the code that
reads it) and sets what differs; `emollm_jax.run_config.validate_config` refuses inconsistent settings before
any work is done.
"""

from __future__ import annotations

import ml_collections

from data_pipeline.records import EMOTION_TASKS, OBJECTIVE_TASKS
from emollm_jax.configuration import ConfigError
from emollm_jax.data import DataConfig
from emollm_jax.emoprompt import EmoPromptConfig
from emollm_jax.evaluate import EvalConfig
from emollm_jax.experiment import AUDIO_TOKEN_ID, InitConfig
from emollm_jax.lora import LoRAConfig
from emollm_jax.models.audio_projectors import PoolMLPConfig
from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.emollm import NO_AUDIO
from emollm_jax.models.llama import Llama3Config, LlamaConfig, Qwen2Config
from emollm_jax.models.projectors import MVPConfig
from emollm_jax.models.siglip import SiglipConfig
from emollm_jax.models.whisper import WhisperConfig
from emollm_jax.optim import StageConfig
from emollm_jax.plan import PlanConfig
from emollm_jax.sharding import DEFAULT_RULES, MeshConfig
from emollm_jax.train import TrainConfig

VARIANTS = ("tiny", "vicuna7b", "qwen05b", "llama3_8b", "mid")

# Logical parameter axis -> mesh axis (None = replicated): FSDP shards the model width, tensor parallelism
# shards heads / MLP / vocab, `data` only replicates weights. The table is emollm_jax.sharding.DEFAULT_RULES;
# override it whole, e.g. --config.sharding_rules="(('embed', None), ('mlp', 'tensor'), ...)".
SHARDING_RULES = DEFAULT_RULES


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = "tiny"
    c.seed = 0
    # Keys given as overrides (--config.a.b=v), recorded by configuration.apply_overrides: a pretrained
    # checkpoint's own config (config.init.*) fills the model blocks except these (emollm_jax.init_config).
    c.overrides = ()

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
    # Sound: an audio tower kind (`whisper`, whisper-base's shape by default) or "none"; the audio projector
    # pools each window to a fixed number of tokens. `--config.model.audio.kind=whisper` turns it on.
    c.model.audio = WhisperConfig.block()
    c.model.audio.kind = NO_AUDIO
    c.model.audio_projector = PoolMLPConfig.block()
    # Written at <audio> positions when the tokenizer has no <audio> token: a placeholder outside the
    # vocabulary, as LLaVA's -200 for images (the model replaces it before any embedding lookup).
    c.model.audio_token_id = AUDIO_TOKEN_ID

    c.data = DataConfig.defaults(template="vicuna_v1")
    c.emoprompt = EmoPromptConfig.defaults()
    c.init = InitConfig.defaults()
    c.lora = LoRAConfig.defaults()
    c.mesh = MeshConfig.defaults()
    c.sharding_rules = SHARDING_RULES

    c.stage_order = ("objective", "emotional")
    c.stages = ml_collections.ConfigDict()

    c.train = TrainConfig.defaults()
    c.eval = EvalConfig.defaults()
    c.plan = PlanConfig.defaults()
    return c


def _tiny() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "tiny"
    # Vision is random-initialised here (no pretrained CLIP on CPU), so stage 2 trains it too: a frozen random
    # tower would cap accuracy on cue-reading tasks.
    # Stage 1 aligns the projector to a frozen random decoder: kept short, it cannot teach much here.
    c.stages.objective = StageConfig.defaults(
        name="objective", tasks=OBJECTIVE_TASKS, trainable=("projector",), lr=1e-3, steps=30, batch_size=16)
    # Stage 2 trains on the six EmoBench tasks only: hate/humor/sarcasm need the image cue first and then the
    # caption's rarer flip, which took more samples per task than a mixture with caption/vqa gave in 700;
    # 1100 steps reached a mean of 0.91 or 0.80 depending on float rounding (training from random towers is
    # chaotic at that length). With the voice records (3000 stage-2 records, not 2400) 1600 steps left the
    # loss at ~0.2 and the mean at 0.78; 2400 steps (12.8 epochs) fit the training set (loss ~0.001): 0.993.
    c.stages.emotional = StageConfig.defaults(
        name="emotional", tasks=EMOTION_TASKS, trainable=("vision", "audio", "projector", "llm"), lr=2e-3,
        steps=2400, batch_size=16, weight_decay=0.01, warmup_ratio=0.05)
    # A Whisper tower as small as the ViT: 16 mel bins over 2 s windows (mini-EmoBench's utterances), 100
    # positions, one layer; the audio projector averages them into 10 tokens (0.2 s each). Trained from
    # random like the vision tower.
    c.model.audio = WhisperConfig.block(num_mel_bins=16, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, max_source_positions=100)
    c.model.audio_projector = PoolMLPConfig.block(tokens_per_window=10, pooling="mean")
    # Plain-sum MVP without the CLS "global" perspective: from random towers the gated/global variant learned
    # the image cues more slowly (teacher-forced EmoBench mean 0.37 vs 0.52 after 250 stage-2 steps).
    c.model.projector.update(perspectives=("token", "relation", "multilevel"), fusion="sum")
    # mini-EmoBench prompts are mostly 58..115 tokens (a 4-frame video is 64 visual tokens): nearly every
    # batch pads to 128; a rare longer record (other generator sizes) gets the 160 bucket and one more
    # compile.
    c.data.max_len = 160
    c.data.seq_buckets = (128, 160)
    return c


def _clip_l336(c: ml_collections.ConfigDict) -> None:
    """CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5 and llava-llama-3 (penultimate layer, patches)."""
    c.model.vision.update(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_layers=24, num_heads=16, dtype="bfloat16", remat=True)


def _pretrained_recipe(c: ml_collections.ConfigDict) -> None:
    """LLaVA's two-stage recipe at scale: projector alignment (lr 1e-3, batch 256), then projector + LLM
    (lr 2e-5, batch 128), one epoch each, FSDP over every device, bf16 compute with fp32 master weights;
    evaluation and prediction in bf16 weights."""
    c.data.max_len = 2048
    c.data.num_frames = 8
    c.data.num_workers = 8
    c.stages.objective = StageConfig.defaults(
        name="objective", tasks=OBJECTIVE_TASKS, trainable=("projector",), lr=1e-3, epochs=1.0,
        batch_size=256)
    c.stages.emotional = StageConfig.defaults(
        name="emotional", tasks=EMOTION_TASKS, trainable=("projector", "llm"), lr=2e-5, epochs=1.0,
        batch_size=128)
    c.mesh.update(data=1, fsdp=-1)
    c.train.update(log_every=10, checkpoint_every=1000, max_to_keep=3, loss_chunk=512)
    c.plan.device_memory_gb = 80.0
    c.eval.dtype = "bfloat16"  # the compute dtype training used, in half the weights' memory


def _vicuna7b() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "vicuna7b"
    # Both stacks scanned: one compiled layer each (fast compiles on a pod; `--mode=plan` plans the real
    # program). Attention stays `auto`: cuDNN's fused kernel on GPUs, blockwise elsewhere at 2048 tokens.
    c.model.vision.update(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_layers=24, num_heads=16, dtype="bfloat16", remat=True, scan_layers=True)
    c.model.projector.levels = (-2, -6, -10)
    c.model.text.update(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                        dtype="bfloat16", remat=True, scan_layers=True)
    c.model.video_pooling = "mean"  # 8 frames x 576 tokens would not fit 2048 tokens
    # Vicuna's tokenizer has no <image> token: as original LLaVA does, mark image positions with an id
    # outside the vocabulary (never embedded). A llava-hf tokenizer has one (id 32000) and it wins; its
    # checkpoint has 32064 embedding rows, which config.init.hf / init.llm read from its own config.
    c.model.image_token_id = -200
    _pretrained_recipe(c)
    # `--mode=plan` on 8 devices (fsdp 8): the LLaVA-1.5 stage-2 batch in one micro-batch needs ~65 GiB per
    # device with blockwise attention (~79 GiB with plain attention's [B, H, T, T] probabilities, which
    # took two micro-batches). The loss is computed in chunks of 512 positions.
    c.stages.emotional.grad_accum = 1
    return c


def _qwen05b() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "qwen05b"
    # llava-interleave-qwen-0.5b: SigLIP-so400m/14-384 without its last layer and head (26 layers), every one
    # of its 729 tokens of the last layer ("full": SigLIP has no class token to drop).
    c.model.vision = SiglipConfig.block(
        image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
        use_head=False, dtype="bfloat16", remat=True)
    c.model.vision_feature_layer = -1
    c.model.vision_feature_select = "full"
    # no class token: MVP's global perspective pools the patches; its levels step back from the last layer
    c.model.projector.update(levels=(-1, -5, -9), global_pool="mean")
    # Qwen1.5-0.5B-Chat (the Qwen2 architecture) as llava-interleave-qwen-0.5b ships it: 152000 embedding
    # rows with <image> = 151646, tied embeddings, q/k/v biases, rope_theta 1e6.
    c.model.text = Qwen2Config.block(
        vocab_size=152000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
        num_kv_heads=16, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=True, dtype="bfloat16", remat=True)
    c.model.image_token_id = 151646
    c.model.video_pooling = "mean"  # 8 frames x 729 tokens would not fit 2048 tokens
    c.data.template = "chatml"  # LLaVA's conv_qwen
    _pretrained_recipe(c)
    # `--mode=plan`, stage 2: 8 devices fit the whole batch (~36 GiB each); one 80 GB GPU needs
    # --config.stages.emotional.grad_accum=8 (~49 GiB).
    return c


def _llama3_8b() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "llama3_8b"
    _clip_l336(c)  # llava-llama-3-8b: the LLaVA-1.5 tower and feature layer
    c.model.projector.levels = (-2, -6, -10)
    # Meta-Llama-3-8B-Instruct: 128256 words (llava-llama-3-8b's checkpoint has 128320 rows: pass
    # --config.model.text.vocab_size=128320 with it), GQA 32:8, rope_theta 500000, 8k context.
    c.model.text = Llama3Config.block(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        dtype="bfloat16", remat=True)
    c.model.image_token_id = -200  # Meta's tokenizer has no <image>: LLaVA's out-of-vocab placeholder
    c.model.video_pooling = "mean"
    c.data.template = "llama3"  # LLaVA-NeXT's llava_llama_3
    _pretrained_recipe(c)
    # `--mode=plan` on 8 devices (fsdp 8): the whole stage-2 batch needs ~76 GiB per device, two micro-batches
    # ~52 GiB. Full fine-tuning does not fit one 80 GB GPU (fp32 master weights and Adam alone are 122 GiB).
    c.stages.emotional.grad_accum = 2
    return c


def _mid() -> ml_collections.ConfigDict:
    c = _base()
    c.variant = "mid"
    c.model.text.update(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                        num_kv_heads=8, max_position_embeddings=2048)
    c.data.max_len = 256
    c.stages.objective = StageConfig.defaults(
        name="objective", tasks=OBJECTIVE_TASKS, trainable=("projector",), lr=1e-3, steps=20, batch_size=8)
    c.stages.emotional = StageConfig.defaults(
        name="emotional", tasks=EMOTION_TASKS, trainable=("vision", "projector", "llm"), lr=2e-4, steps=20,
        batch_size=8)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` is the variant after the colon in `--config configs/emobench.py:variant`."""
    variant = (arg or "tiny").strip()
    builders = {"tiny": _tiny, "vicuna7b": _vicuna7b, "qwen05b": _qwen05b, "llama3_8b": _llama3_8b,
                "mid": _mid}
    if variant not in builders:
        raise ConfigError(f"configs/emobench.py: unknown variant {variant!r}; expected one of {VARIANTS}")
    return builders[variant]()
