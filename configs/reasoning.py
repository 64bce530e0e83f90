"""Stage 0 — building the SFT reasoning data with a teacher and a judge (spec §5).

    export TATAR_TEACHER_API_KEY=...   # only if the endpoint wants one; never put keys in flags
    python scripts/build_reasoning.py --config=configs/reasoning.py:iqa \\
        --config.input=/data/koniq/train.jsonl --config.score_range="(0, 100)" \\
        --config.out_dir=/data/sft/iqa \\
        --config.teacher.base_url=http://localhost:8000/v1 \\
        --config.teacher.model=Qwen/Qwen3-VL-32B-Instruct \\
        --config.judge.base_url=http://judge:8000/v1 \\
        --config.judge.model=Qwen/Qwen3-VL-235B-A22B-Instruct

Presets (``:arg``): ``iqa`` (default) and ``iaa`` only set ``task``; every value below is the
spec's, whatever the task. Endpoints and model names are flags; API keys are read from the
environment variables *named* by ``teacher.api_key_env`` / ``judge.api_key_env`` and are never
written anywhere.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common
from tatar_jax.reasoning import judge as J
from tatar_jax.reasoning import prompts as P

PRESETS = ("iqa", "iaa")
END_OF_TEXT = "<|endoftext|>"  # Qwen's end-of-text; DeepSeek-R1 distills end with their own EOS


def client_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.concurrency = 8  # rows in flight (reference judge: 10 threads)
    c.timeout_s = 120.0  # connect / per-read socket timeout of one request
    c.max_retries = 5  # retries after the first attempt (429, 5xx, 408, timeouts, resets)
    c.backoff_base_s = 1.0  # delay_k = min(max, base * 2**k) * U(1 - jitter, 1)
    c.backoff_max_s = 60.0
    c.jitter = 0.5
    c.retry_seed = -1  # -1 = OS entropy (tests pin it)
    return c


def endpoint_config(api_key_env: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base_url = ""  # e.g. http://localhost:8000/v1 (vLLM's OpenAI-compatible server)
    c.model = ""  # the served model name
    c.api_key_env = api_key_env  # NAME of the environment variable holding the key ("" = none)
    # JSON object merged into every request body, e.g. '{"top_k": 20}' or
    # '{"chat_template_kwargs": {"enable_thinking": false}}' for vLLM.
    c.extra_body = "{}"
    return c


def _teacher_task(
    system: str,
    user: str,
    *,
    temperature: float,
    top_p: float,
    max_tokens: int,
    send_image: bool,
    max_sentences: int,
    max_words: int,
) -> ml_collections.ConfigDict:
    """The fields every task's teacher request has (a reply stops at </answer> or EOS) and its
    rationale filters (tatar_jax.reasoning.postprocess): cut to ``max_sentences`` sentences,
    then ``max_words`` words (0 = no cut); the rejections are the spec's for both tasks."""
    c = ml_collections.ConfigDict()
    c.system_prompt = system
    c.user_prompt = user
    c.temperature = temperature
    c.top_p = top_p
    c.max_tokens = max_tokens
    c.stop = ("</answer>", END_OF_TEXT)
    c.send_image = send_image
    c.max_sentences = max_sentences
    c.max_words = max_words
    c.min_words = 0  # a minimum is not enforced (reference); > 0 rejects shorter rationales
    c.reject_score_in_think = True  # the score written inside the think -> reject
    c.reject_changed_score = True  # the teacher's <answer> differs from the given score -> reject
    # Which complete <think> block is the rationale: "first" (spec). R1 distills print their own
    # <think> monologue first unless the server splits it off (vLLM --reasoning-parser
    # deepseek_r1); then "last" picks the narrative.
    c.think_block = "first"
    return c


def iqa_config() -> ml_collections.ConfigDict:
    """Spec §5.1: Qwen3-VL-32B, T 0.3, top_p 0.8, 140 tokens, stop </answer> + EOS."""
    c = _teacher_task(
        P.IQA_TEACHER_SYSTEM, P.IQA_TEACHER_USER,
        temperature=0.3, top_p=0.8, max_tokens=140, send_image=True,
        max_sentences=2, max_words=50,  # the first 2 sentences, then the first 50 words
    )  # fmt: skip
    c.prompt_min_words = 30  # the prompt asks for 30-50 words (the minimum is not enforced)
    return c


def iaa_config() -> ml_collections.ConfigDict:
    """Spec §5.2: DeepSeek-R1-Distill-Qwen-32B, text only, T 0.2, top_p 0.9, 500 tokens."""
    # send_image False: the reference's IAA teacher never sees the image.
    c = _teacher_task(
        P.IAA_TEACHER_SYSTEM, P.IAA_TEACHER_USER,
        temperature=0.2, top_p=0.9, max_tokens=500, send_image=False,
        max_sentences=0, max_words=0,  # no cut
    )  # fmt: skip
    c.attribute_order = P.IAA_ATTRIBUTE_ORDER
    c.target_words = 100  # "about 100 words" (asked, not enforced)
    c.low_score = "3.0"  # "below 3.0 is clearly low" (the 0-10 ArtiMuse scale)
    c.require_attributes = True  # rows without attribute texts are rejected before the call
    return c


def rules_config() -> ml_collections.ConfigDict:
    """Spec §5.3 hard rules (B9 fixed: see tatar_jax/reasoning/judge.py)."""
    c = ml_collections.ConfigDict()
    c.score_range = (1.0, 100.0)  # gt and answer, on the record's own scale (drops ArtiMuse < 1)
    c.check_image_exists = True
    c.min_aspects = 5  # IAA keyword coverage
    c.keywords = ml_collections.ConfigDict({k: v for k, v in J.DEFAULT_KEYWORDS.items()})
    c.causal_connectives = J.DEFAULT_CAUSAL_CONNECTIVES
    return c


def judge_config() -> ml_collections.ConfigDict:
    """Spec §5.3: Qwen3-VL-235B, temperature 0, sees the image, strict JSON, keep rules."""
    c = endpoint_config("TATAR_JUDGE_API_KEY")
    c.enabled = True
    c.temperature = 0.0
    c.top_p = 1.0
    c.max_tokens = 1024
    c.send_image = True
    c.attribute_max_chars = 1200  # each attribute text shown to the IAA judge
    c.require_keep_decision = True  # keep only when decision == "keep" ...
    c.iqa = ml_collections.ConfigDict()
    c.iqa.system_prompt = P.IQA_JUDGE_SYSTEM
    c.iqa.user_prompt = P.IQA_JUDGE_USER
    # ... and every listed score > its threshold
    c.iqa.keep_rules = ml_collections.ConfigDict(J.DEFAULT_KEEP_RULES["iqa"])
    c.iaa = ml_collections.ConfigDict()
    c.iaa.system_prompt = P.IAA_JUDGE_SYSTEM
    c.iaa.user_prompt = P.IAA_JUDGE_USER
    c.iaa.keep_rules = ml_collections.ConfigDict(J.DEFAULT_KEEP_RULES["iaa"])
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    task = common.parse_preset(arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.task = task
    # The dataset (tatar_jax.data.manifest / datasets): either a built-in declaration ...
    c.dataset = ""  # e.g. "koniq-train", "artimuse-train" (tatar_jax.data.datasets.BUILTINS)
    c.data_root = ""  # root of the built-in manifests
    # ... or a manifest with its declared native score range (required then).
    c.input = ""  # JSON list or JSONL of {"image", "gt_score", ...}; overrides a built-in's path
    c.dataset_name = ""  # "" = the manifest's file name
    c.score_range = config_dict.placeholder(tuple)  # (lo, hi); None = the built-in's
    c.label_field = ""  # "" = the built-in's, else "gt_score"
    c.image_root = ""  # relative image paths resolve here ("" = the manifest's folder)
    c.allow_absolute_images = False  # image entries stay inside image_root unless True
    c.sampling = "all"  # "all" | "first:N" | "random:N" | "P%" (the reference shipped "first:5")
    c.on_bad_row = "error"  # bad manifest row: "error" stops; "skip" lists it in rejected.jsonl
    c.attributes = ""  # optional ArtiMuse annotation conversations (JSON/JSONL) to merge (IAA)
    # Score the teacher explains and the target's answer: "native" = the manifest's value (the
    # reference); "100" = its 0-100 value by the declared range, 2 decimals.
    c.score_scale = "native"
    c.out_dir = ""  # sft.jsonl, rejected.jsonl, failed.jsonl, summary.json, journal.jsonl
    c.restart = False  # discard an existing journal in out_dir
    c.retry_failed = True  # re-running retries rows whose calls failed
    c.fsync = True  # fsync every journal line (crash-safe resume)
    c.progress = True
    c.seed = 0
    c.send_seed = False  # send seed = seed + row with each teacher request (vLLM honours it)
    # judge-only mode (teacher.kind = "none"): the row's target is read from the first of these
    c.target_fields = ("target", "reversal_thinking", "cot_reasoning")

    c.teacher = endpoint_config("TATAR_TEACHER_API_KEY")
    c.teacher.kind = "openai"  # "openai" | "jax" (our model; checkpoint below) | "none"
    c.teacher.checkpoint = ""  # kind = "jax": a Hugging Face Qwen2.5-VL directory
    c.client = client_config()
    c.iqa = iqa_config()
    c.iaa = iaa_config()
    c.rules = rules_config()
    c.judge = judge_config()
    return c
