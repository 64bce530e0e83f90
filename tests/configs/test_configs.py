"""Configs load through absl ``config_flags`` (presets + command-line overrides) and carry the
spec's constants (spec §6.3, §7.2-7.4)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

STAGES = ("sft", "grpo")


def _parse(repo_root, argv):
    fv = flags.FlagValues()
    argv = ["prog", *argv]
    # Override flags are discovered from the argument list, as absl does from sys.argv.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", ["", ":default", ":tiny", ":reference"])
def test_presets_load(repo_root, stage, preset):
    c = _parse(repo_root, [f"--config={repo_root}/configs/{stage}.py{preset}"])
    assert c.stage == stage
    assert c.seed == 42
    assert c.preset == (preset[1:] or "default")
    assert c.data.min_pixels == 3136 and c.data.max_pixels == 1572864
    assert c.optimizer.b1 == 0.9 and c.optimizer.b2 == 0.999 and c.optimizer.eps == 1e-8
    assert c.optimizer.max_grad_norm == 1.0 and c.optimizer.weight_decay == 0.0
    assert c.model.param_dtype == "float32"
    assert c.model.dtype == ("bfloat16" if preset == ":reference" else "float32")
    if preset != ":reference":
        # The embedded default and tests need no weights and no data files.
        assert not c.model.hf_dir and not c.model.init_checkpoint and c.model.preset
        assert c.data.train == ("synthetic",)
        assert c.total_steps > 0


def test_reference_values(repo_root):
    g = _parse(repo_root, [f"--config={repo_root}/configs/grpo.py:reference"])
    assert g.grpo.num_generations == 8 and g.grpo.prompts_per_step == 16
    assert g.grpo.beta == 0.001 and g.grpo.epsilon == 0.2 and g.grpo.epsilon_high is None
    assert g.grpo.num_iterations == 1 and g.grpo.temperature == 1.0
    assert g.grpo.top_k == 50 and g.grpo.top_p == 1.0 and g.grpo.max_new_tokens == 256
    assert g.grpo.advantage_eps == 1e-4 and g.grpo.advantage_std_ddof == 1
    assert g.grpo.loss_aggregation == "seq_mean_token_mean" and g.grpo.advantage == "grpo"
    assert g.optimizer.learning_rate == 1e-6 and g.optimizer.schedule == "linear"
    assert g.optimizer.warmup_steps == 0 and g.optimizer.end_lr_factor == 0.0
    assert g.data.num_epochs == 3 and g.checkpoint.every_steps == 100
    assert g.model.init_step == 120
    # 16 prompts x 8 = 128 completions per optimizer step, in grad_accum micro-batches.
    assert g.grpo.mini_batch_size * g.optimizer.grad_accum_steps == 128
    s = _parse(repo_root, [f"--config={repo_root}/configs/sft.py:reference"])
    assert s.optimizer.learning_rate == 2e-5 and s.sft.global_batch_size == 128
    assert s.optimizer.grad_accum_steps == 2 and s.data.num_epochs == 2
    assert s.checkpoint.every_steps == 40 and s.data.p_iqa == 0.5
    assert s.data.p_drop_think.iqa == 0.0 and s.data.p_drop_think.iaa == 0.0  # spec D1


def test_overrides(repo_root):
    c = _parse(
        repo_root,
        [
            f"--config={repo_root}/configs/grpo.py:reference",
            "--config.optimizer.learning_rate=5e-7",
            "--config.grpo.epsilon_high=0.28",
            "--config.mesh.shape.fsdp=8",
            "--config.data.train=('koniq_train',)",
            "--config.data.sources.koniq_train.manifest=/data/koniq.jsonl",
            "--config.model.freeze_vision=true",
            "--config.data.sources.user_iaa.manifest=/data/mine.jsonl",
        ],
    )
    assert c.optimizer.learning_rate == 5e-7
    assert c.grpo.epsilon_high == 0.28
    assert c.mesh.shape.fsdp == 8
    assert c.data.train == ("koniq_train",)
    assert c.data.sources.koniq_train.manifest == "/data/koniq.jsonl"
    assert c.model.freeze_vision is True
    assert c.data.sources.user_iaa.manifest == "/data/mine.jsonl"


def test_grpo_warmup_block_follows_the_grpo_fields(repo_root):
    """The embedded default's SFT warm-up is a config block: WARMUP_STEPS of configs/sft.py's
    default preset with the GRPO run's model, seed, image size and evaluation, including
    command-line overrides of those GRPO fields."""
    c = _parse(
        repo_root,
        [
            f"--config={repo_root}/configs/grpo.py",
            "--config.seed=3",
            "--config.model.preset=small",
            "--config.eval.max_new_tokens=7",
            "--config.data.synthetic.image_size=64",
            "--config.warmup.optimizer.learning_rate=0.05",
        ],
    )
    w = c.warmup
    from configs import grpo as grpo_config

    assert grpo_config.WARMUP_STEPS == 200
    assert w.stage == "sft" and w.total_steps == 200 and w.sft.global_batch_size == 8
    assert (w.seed, w.model.preset, w.eval.max_new_tokens) == (3, "small", 7)
    assert w.data.synthetic.image_size == 64 and w.eval.at_end and not w.eval.at_start
    # the warm-up's override leaves the GRPO run's own learning rate (the default preset's) alone
    grpo_lr = grpo_config.get_config("default").optimizer.learning_rate
    assert w.optimizer.learning_rate == 0.05 and c.optimizer.learning_rate == grpo_lr != 0.05
    assert w.model.dtype == "float32" and w.model.logprob_chunk_size == 128
    for preset in (":tiny", ":reference"):
        assert (
            _parse(repo_root, [f"--config={repo_root}/configs/grpo.py{preset}"]).warmup.total_steps
            == 0
        )


@pytest.mark.parametrize("preset", ["default", "tiny", "reference"])
def test_grpo_warmup_block_is_the_sft_preset_with_the_grpo_run_fields(preset):
    """config.warmup = configs/sft.py's same preset, with the GRPO run's model, mesh, seed, image
    size, tokenizer, held-out evaluation and progress bar, evaluated at its end."""
    from configs import grpo, sft

    g = grpo.get_config(preset)
    want = sft.get_config(preset)
    want.total_steps = grpo.WARMUP_STEPS if preset == "default" else 0
    want.seed = g.seed
    want.model = g.model.to_dict()
    want.mesh = g.mesh.to_dict()
    want.data.synthetic.image_size = g.data.synthetic.image_size
    want.data.tokenizer_dir = g.data.tokenizer_dir
    for name in ("datasets", "max_examples", "max_new_tokens", "batch_size"):
        want.eval[name] = g.eval[name]
    want.eval.at_start, want.eval.at_end = False, True  # no evaluation of the random model
    want.logging.progress = g.logging.progress
    assert g.warmup.to_dict() == want.to_dict()
    assert "sft_warmup_steps" not in g
    # Setting a shared GRPO field in Python reaches the warm-up too.
    g.seed, g.data.tokenizer_dir, g.eval.batch_size, g.logging.progress = 3, "/tok", 5, False
    w = g.warmup
    assert (w.seed, w.data.tokenizer_dir, w.eval.batch_size, w.logging.progress) == (
        3, "/tok", 5, False
    )  # fmt: skip


def test_configs_package_imports_without_jax():
    """Config files are light: no config loads JAX; of tatar_jax they load only the pure-Python
    modules that hold names they share with the code (reward names, prompt texts)."""
    code = (
        "import sys; from configs import grpo, sft, eval, rewards;"
        "print('jax' in sys.modules);"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('tatar_jax'))));"
        "from configs import reasoning; print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    jax_before, modules, jax_after = out.stdout.split("\n")[:3]
    assert (jax_before, jax_after) == ("False", "False")
    assert modules.split(",") == ["tatar_jax", "tatar_jax.rewards", "tatar_jax.rewards.names"]


def test_unknown_field_and_preset_are_errors(repo_root):
    with pytest.raises((flags.Error, KeyError, AttributeError), match="lr"):
        _parse(repo_root, [f"--config={repo_root}/configs/sft.py", "--config.optimizer.lr=1"])
    with pytest.raises(flags.IllegalFlagValueError, match="unknown preset"):
        _parse(repo_root, [f"--config={repo_root}/configs/sft.py:nope"])


def test_override_in_subprocess_from_other_cwd(repo_root, tmp_path):
    """As a script run from elsewhere sees it: the config files import ``from configs import
    common``, and ``configs`` is a package (installed by ``pip install -e .``; here on
    ``PYTHONPATH``, tests/conftest.py), no ``sys.path`` edit."""
    script = tmp_path / "show.py"
    script.write_text(
        "from absl import app\n"
        "from ml_collections import config_flags\n"
        "C = config_flags.DEFINE_config_file('config')\n"
        "def main(_):\n"
        "    print('LR', C.value.optimizer.learning_rate, C.value.stage)\n"
        "app.run(main)\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            f"--config={repo_root}/configs/grpo.py",
            "--config.optimizer.learning_rate=1e-6",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "LR 1e-06 grpo" in out.stdout


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", ["", ":tiny", ":reference"])
def test_fields_fit_the_modules_that_read_them(repo_root, stage, preset):
    """Dataset declarations build DatasetSpecs, the model preset exists, batches divide."""
    datasets = pytest.importorskip("tatar_jax.data.datasets")
    manifest = pytest.importorskip("tatar_jax.data.manifest")
    model_config = pytest.importorskip("tatar_jax.models.qwen2_5_vl.config")
    c = _parse(repo_root, [f"--config={repo_root}/configs/{stage}.py{preset}"])
    for name, src in c.data.sources.items():
        if src.builtin:
            spec = datasets.get(src.builtin, "/data", sampling=src.sampling)
            assert (spec.task, spec.score_range) == (src.task, src.score_range), name
            assert spec.label_field == src.label_field, name
        else:
            manifest.DatasetSpec(
                name=name,
                task=src.task,
                manifest="/data/x.jsonl",
                score_range=src.score_range,
                sampling=src.sampling,
                label_field=src.label_field,
                image_field=src.image_field,
                target_field=src.target_field or None,
            )
    for name in c.data.train:
        assert name == "synthetic" or name in c.data.sources, name
    if c.model.preset:
        model_config.preset(c.model.preset)
    if stage == "sft":
        assert c.sft.global_batch_size % c.optimizer.grad_accum_steps == 0
    else:
        completions = c.grpo.prompts_per_step * c.grpo.num_generations
        assert completions % c.optimizer.grad_accum_steps == 0


def test_grpo_names_are_accepted_by_tatar_jax_grpo(repo_root):
    grpo = pytest.importorskip("tatar_jax.grpo")
    import jax.numpy as jnp

    for preset in ("", ":reference"):
        g = _parse(repo_root, [f"--config={repo_root}/configs/grpo.py{preset}"]).grpo
        n = g.num_generations
        adv = grpo.group_advantages(
            jnp.arange(2.0 * n), n, g.advantage, g.advantage_eps, ddof=g.advantage_std_ddof
        )
        logps = jnp.zeros((2 * n, 3))
        # The config -> loss keywords mapping the trainer uses (train/stages.py).
        loss = grpo.LossConfig.from_config(g)
        grpo.grpo_loss(logps, logps, logps, adv, jnp.ones((2 * n, 3)), **loss.loss_kwargs())


@pytest.mark.parametrize("preset", [":lora_1gpu", ":lora_1gpu_3b"])
def test_one_gpu_lora_presets_parse_and_validate(repo_root, preset):
    from tatar_jax.train import stages, validate

    c = _parse(repo_root, [f"--config={repo_root}/configs/grpo.py{preset}"])
    validate.check_config(c)  # raises on any problem
    assert c.preset == preset[1:] and c.stage == "grpo"
    # the reference GRPO shape on one device, LoRA over a bf16 base, 16 micro-batches
    assert c.grpo.prompts_per_step == 16 and c.grpo.num_generations == 8
    assert c.grpo.max_new_tokens == 256 and c.grpo.beta == 0.001
    assert c.mesh.num_devices == 1 and c.model.param_dtype == "bfloat16"
    assert c.model.dtype == "bfloat16" and c.model.remat
    assert c.model.lora.rank == 16 and c.model.lora.alpha == 32.0
    assert stages.num_micro(c, 16 * 8) == 16
    assert c.offload.mode == "never"
    bad = _parse(
        repo_root, [f"--config={repo_root}/configs/grpo.py{preset}", "--config.offload.mode=often"]
    )
    with pytest.raises(ValueError, match="--config.offload.mode: 'often'"):
        validate.check_config(bad)


def test_configs_is_an_installed_package(repo_root):
    """``pip install -e .`` installs ``configs`` beside every ``tatar_jax`` package (pyproject's
    package list, as setuptools reads it): the scripts import both without ``sys.path`` edits."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(repo_root), include=find["packages"]["find"]["include"]))
    on_disk = {
        ".".join(p.parent.relative_to(repo_root).parts)
        for top in ("tatar_jax", "configs")
        for p in (repo_root / top).rglob("__init__.py")
    }
    assert "configs" in found and "tatar_jax.train" in found
    assert found == on_disk


def test_pixel_budget_is_the_image_modules():
    """The configs' pixel budget (spec §3) is the one the image code defaults to: configs stay free
    of the image code's imports, so this test ties the two copies."""
    from configs import common
    from configs import eval as eval_config
    from tatar_jax.data import image

    assert (common.MIN_PIXELS, common.MAX_PIXELS) == (image.MIN_PIXELS, image.MAX_PIXELS)
    c = eval_config.get_config()
    assert (c.eval.min_pixels, c.eval.max_pixels) == (image.MIN_PIXELS, image.MAX_PIXELS)
