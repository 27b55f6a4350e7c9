"""One-file outputs (issue 24 §3): `-o NAME.safetensors` writes one file, atomically, with the
recipe and the merge's summary in its header, for diffusion tools that load one file.
Inputs are Stable Diffusion-style single-file checkpoints written with the official
safetensors library: UNet, text encoder and VAE tensors in one file, F16 with F32 parts
and an int64 `position_ids`; no config.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import reference as ref
from test_cli_habits import cli

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."


def sd_checkpoint(path, seed: int, base: dict | None = None) -> dict:
    """A tiny SD1.x-layout checkpoint: a fine-tune of `base` when given."""
    rng = np.random.default_rng(seed)
    shapes = {
        UNET + "input_blocks.0.0.weight": ((32, 4, 3, 3), np.float16),
        UNET + "input_blocks.1.1.proj_in.weight": ((32, 32), np.float16),
        UNET + "middle_block.1.transformer_blocks.0.attn1.to_q.weight": ((32, 32), np.float16),
        UNET + "output_blocks.0.0.out_layers.3.weight": ((32, 32), np.float16),
        UNET + "out.2.bias": ((4,), np.float16),
        TEXT + "encoder.layers.0.self_attn.q_proj.weight": ((24, 24), np.float16),
        TEXT + "embeddings.token_embedding.weight": ((50, 24), np.float16),
        VAE + "decoder.conv_out.weight": ((3, 8, 3, 3), np.float32),
        VAE + "encoder.norm_out.weight": ((8,), np.float32),
    }
    tensors = {}
    for name, (shape, dtype) in shapes.items():
        value = rng.normal(0, 0.02, shape)
        tensors[name] = (value if base is None else base[name].astype(np.float64) + value * 0.1).astype(dtype)
    tensors[TEXT + "embeddings.position_ids"] = np.arange(16, dtype=np.int64).reshape(1, 16)
    save_file(tensors, str(path))
    return tensors


@pytest.fixture
def sd(tmp_path):
    base = sd_checkpoint(tmp_path / "sd-base.safetensors", 1)
    sd_checkpoint(tmp_path / "sd-anime.safetensors", 2, base)
    sd_checkpoint(tmp_path / "sd-photo.safetensors", 3, base)
    return tmp_path


MERGE = ("ties", "sd-base.safetensors", "sd-anime.safetensors", "sd-photo.safetensors", "-d", "0.4")


def test_a_one_file_merge_is_one_file_with_recipe_and_summary_in_its_header(sd):
    proc = cli(*MERGE, "-o", "merged.safetensors", cwd=sd)
    assert proc.returncode == 0, proc.stderr
    out = sd / "merged.safetensors"
    assert out.is_file() and not list(sd.glob(".merged*"))  # no staging left, no directory
    merged = load_file(str(out))
    base, a, b = (load_file(str(sd / f"sd-{n}.safetensors")) for n in ("base", "anime", "photo"))
    assert set(merged) == set(base)
    for name, value in base.items():
        assert merged[name].dtype == value.dtype, name  # F16 stays F16, F32 stays F32
        if value.dtype == np.int64:
            np.testing.assert_array_equal(merged[name], value)
            continue
        want = ref.ties(value.astype(np.float32), [a[name].astype(np.float32), b[name].astype(np.float32)],
                        [1.0, 1.0], [0.4, 0.4]).astype(value.dtype)
        np.testing.assert_array_equal(merged[name].view(np.uint8), want.view(np.uint8), err_msg=name)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["merge_method"] == "ties"
    assert "merge_method: ties" in meta["npmerge_recipe"] and "sd-anime.safetensors" in meta["npmerge_recipe"]
    summary = json.loads(meta["merge_summary"])
    assert summary["method"] == "ties" and [m["name"] for m in summary["models"]] == ["sd-anime.safetensors",
                                                                                       "sd-photo.safetensors"]
    assert 0 < summary["totals"]["models"][0]["kept"] <= 0.41
    assert "tensors" not in summary and "files" not in summary  # the per-tensor tables stay out of the header


def test_one_file_is_byte_identical_across_threads_and_budgets_and_verifiable(sd):
    assert cli(*MERGE, "-o", "one.safetensors", "--threads", "1", "-q", cwd=sd).returncode == 0
    assert cli(*MERGE, "-o", "two.safetensors", "--max-memory", "6MiB", "-q", cwd=sd).returncode == 0
    assert (sd / "one.safetensors").read_bytes() == (sd / "two.safetensors").read_bytes()
    proc = cli("verify", "one.safetensors", cwd=sd)
    assert proc.returncode == 0 and "header valid" in proc.stdout
    proc = cli("verify", "one.safetensors", "--recompute", cwd=sd)
    assert proc.returncode == 0, proc.stderr
    assert "match a re-run of the recipe in its header" in proc.stdout
    data = bytearray((sd / "one.safetensors").read_bytes())
    data[-1] ^= 1
    (sd / "one.safetensors").write_bytes(bytes(data))
    proc = cli("verify", "one.safetensors", "--recompute", cwd=sd)
    assert proc.returncode == 6 and "one.safetensors: differs from the re-run's" in proc.stderr
    proc = cli("verify", "sd-base.safetensors", cwd=sd)  # a checkpoint npmerge did not write
    assert proc.returncode == 3 and "is not a one-file npmerge output" in proc.stderr


def test_one_file_output_refusals(sd):
    (sd / "taken.safetensors").mkdir()
    proc = cli(*MERGE, "-o", "taken.safetensors", "--force", cwd=sd)
    assert proc.returncode == 2 and "is an existing directory" in proc.stderr
    (sd / "old.safetensors").write_bytes(b"keep me")
    proc = cli(*MERGE, "-o", "old.safetensors", cwd=sd)
    assert proc.returncode == 2 and "output file exists" in proc.stderr and "--force" in proc.stderr
    assert (sd / "old.safetensors").read_bytes() == b"keep me"
    proc = cli(*MERGE, "-o", "small.safetensors", "--shard-size", "10KB", cwd=sd)
    assert proc.returncode == 2 and "above the limit of 10,000" in proc.stderr and "--shard-size" in proc.stderr
    assert not (sd / "small.safetensors").exists()
    proc = cli(*MERGE, "-o", "old.safetensors", "--force", "-q", cwd=sd)  # replaced atomically
    assert proc.returncode == 0 and len(load_file(str(sd / "old.safetensors"))) == 10
    proc = cli(*MERGE, "-o", "plan.safetensors", "--dry-run", cwd=sd)
    assert proc.returncode == 0 and "one .safetensors file" in proc.stdout and not (sd / "plan.safetensors").exists()
    assert sorted(p.name for p in sd.iterdir()) == ["old.safetensors", "sd-anime.safetensors", "sd-base.safetensors",
                                                    "sd-photo.safetensors", "taken.safetensors"]


def test_a_killed_one_file_merge_leaves_no_file_and_resumes_to_the_same_bytes(sd):
    from safety_helpers import start, wait_for

    args = [str(sd / a) if a.endswith(".safetensors") else a for a in MERGE]  # the recipe as the killed run had it
    assert cli(*args, "-o", "whole.safetensors", "-q", cwd=sd).returncode == 0
    proc = start(*args, "-o", sd / "cut.safetensors", slow=0.05)
    staging = sd / ".cut.safetensors.npmerge-partial"
    wait_for(lambda: any(staging.glob("*.tmp")), proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    assert not (sd / "cut.safetensors").exists() and staging.is_dir()
    proc = cli(*args, "-o", sd / "cut.safetensors", cwd=sd)  # a plain rerun is refused, the staging named
    assert proc.returncode == 5 and "--resume" in proc.stderr
    proc = cli(*args, "-o", sd / "cut.safetensors", "--resume", "-q", cwd=sd)
    assert proc.returncode == 0, proc.stderr
    assert (sd / "cut.safetensors").read_bytes() == (sd / "whole.safetensors").read_bytes()


def test_the_readme_block_weighted_recipe_runs_on_a_diffusion_checkpoint(sd):
    """README "Diffusion checkpoints": its recipe, on the SD-layout files, into one file."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Diffusion checkpoints")[1].split("\n## ")[0]
    recipe = re.findall(r"```yaml\n(.*?)```", section, re.S)[0]
    recipe = recipe.replace("sd15-base", "sd-base").replace("anime.safetensors", "sd-anime.safetensors")
    (sd / "blocks.yml").write_text(recipe)
    proc = cli("run", "blocks.yml", "-o", "blocks.safetensors", "-q", cwd=sd)
    assert proc.returncode == 0, proc.stderr
    base, ft = (load_file(str(sd / f"sd-{n}.safetensors")) for n in ("base", "anime"))
    merged = load_file(str(sd / "blocks.safetensors"))
    for name, w in ((UNET + "input_blocks.1.1.proj_in.weight", 0.3),
                    (UNET + "output_blocks.0.0.out_layers.3.weight", 0.7),
                    (UNET + "middle_block.1.transformer_blocks.0.attn1.to_q.weight", 0.5)):
        want = ref.task_arithmetic(base[name].astype(np.float32), [ft[name].astype(np.float32)], [w])
        np.testing.assert_array_equal(merged[name], want.astype(np.float16), err_msg=name)
