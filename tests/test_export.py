"""python -m bdpo_jax.export: trainer checkpoint -> diffusers UNet folder / full pipeline."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

from bdpo_jax import export
from bdpo_jax.models import load_unet
from bdpo_jax.models.unet import config_to_dict
from bdpo_jax.models.weights import params_to_torch_state

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.tiny_pipeline import build_tiny_sd_pipeline  # noqa: E402  (imports torch)

DiffusionPipeline, UNet2DConditionModel = (
    diffusers.DiffusionPipeline,
    diffusers.UNet2DConditionModel,
)


def _perturb(params, seed):
    """Params as after a few training steps (numpy: fast, no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32), params
    )


def write_trainer_workdir(workdir, model, params_by_step, ref_params):
    """A workdir laid out as bdpo_jax.train writes it (see bdpo_jax/checkpointing.py)."""
    workdir.mkdir(parents=True)
    (workdir / "unet_config.json").write_text(json.dumps(config_to_dict(model.config)))
    (workdir / "config.json").write_text(json.dumps({"seed": 0}))
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    for step, params in params_by_step.items():
        state = {
            "step": jnp.int32(step),
            "params": params,
            "ref_params": ref_params,
            "opt_state": optax.adamw(1e-4).init(params),
            "rng": jax.random.key_data(jax.random.key(step)),
        }
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"seed": 0})
            ),
        )
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_sd_pipeline(root / "base")
    model, base_params = load_unet(str(base), subfolder="unet")
    params = {2: _perturb(base_params, 2), 4: _perturb(base_params, 4)}
    write_trainer_workdir(root / "work", model, params, base_params)
    return root, base, params


def _unet_state(folder):
    unet = UNet2DConditionModel.from_pretrained(folder)
    return {k: v.detach().float().numpy() for k, v in unet.state_dict().items()}


def test_pipeline_export_loads_runs_and_holds_the_checkpoint(setup):
    root, base, params = setup
    out = root / "out_pipeline"
    assert (
        export.main(["--workdir", str(root / "work"), "--base", str(base), "--out", str(out)]) == 0
    )
    info = json.loads((out / export.EXPORT_INFO_NAME).read_text())
    assert (info["step"], info["dtype"]) == (4, "fp32")  # latest step by default

    # the new UNet holds the step-4 params (diffusers reads them back), other parts are copied
    want = params_to_torch_state(params[4])
    got = _unet_state(out / "unet")
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / part).exists()

    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_step_dtype_and_unet_only_export(setup):
    root, _, params = setup
    out = root / "out_unet_fp16"
    export.export(root / "work", out, step=2, dtype="fp16")
    assert not (out / "model_index.json").exists()
    file = out / "diffusion_pytorch_model.safetensors"
    with safe_open(str(file), "np") as f:
        name = "conv_in.weight"
        tensor = f.get_tensor(name)
    assert tensor.dtype == np.float16
    want = params_to_torch_state(params[2])[name].astype(np.float16)
    np.testing.assert_array_equal(tensor, want)

    out_bf16 = root / "out_unet_bf16"
    export.export(root / "work", out_bf16, step=4, dtype="bf16")
    with safe_open(str(out_bf16 / "diffusion_pytorch_model.safetensors"), "pt") as f:
        tensor = f.get_tensor(name)
    assert tensor.dtype == torch.bfloat16
    want = torch.from_numpy(params_to_torch_state(params[4])[name]).to(torch.bfloat16)
    assert torch.equal(tensor, want)


def test_refuses_to_overwrite_without_force(setup, capsys):
    root, base, _ = setup
    out = root / "out_force"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--workdir", str(root / "work"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        export.main(args)
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert export.main([*args, "--force", "--step", "2"]) == 0
    assert not (out / "keep.txt").exists()
    assert json.loads((out / export.EXPORT_INFO_NAME).read_text())["step"] == 2


def test_failed_verification_leaves_nothing(setup, monkeypatch):
    root, _, _ = setup
    import bdpo_jax.models as models  # export looks save_unet up there at call time

    original = models.save_unet

    def corrupting_save(model, params, out_dir, **kw):
        params = jax.tree.map(lambda x: x, params)
        params["conv_in"]["bias"] = params["conv_in"]["bias"] + 1.0
        return original(model, params, out_dir, **kw)

    monkeypatch.setattr(models, "save_unet", corrupting_save)
    out = root / "out_corrupt"
    with pytest.raises(export.ExportError, match="conv_in"):
        export.export(root / "work", out)
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out_corrupt")]


def test_clear_errors(setup, tmp_path):
    root, base, _ = setup
    with pytest.raises(export.ExportError, match="no unet_config.json"):
        export.export(tmp_path, tmp_path / "o")
    (tmp_path / "unet_config.json").write_text((root / "work" / "unet_config.json").read_text())
    with pytest.raises(export.ExportError, match="no checkpoints/"):
        export.export(tmp_path, tmp_path / "o")
    with pytest.raises(export.ExportError, match=r"--step 3: .*available: \[2, 4\]"):
        export.export(root / "work", tmp_path / "o", step=3)
    with pytest.raises(export.ExportError, match="--dtype fp8"):
        export.export(root / "work", tmp_path / "o", dtype="fp8")
    # a base pipeline whose UNet cannot take this checkpoint's (text width differs)
    config = json.loads((base / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 64
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    (other / "unet").mkdir()
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError, match="cross_attention_dim"):
        export.export(root / "work", tmp_path / "o", base=str(other))
    assert not (tmp_path / "o").exists()


def test_cli_user_errors_are_one_line_and_exit_2(setup, tmp_path, capsys):
    root, _, _ = setup
    work = str(root / "work")
    (tmp_path / "taken").mkdir()
    cases = {
        "--workdir": ["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        "no checkpoints/": ["--workdir", str(tmp_path), "--out", str(tmp_path / "o")],
        "--step 3": ["--workdir", work, "--step", "3", "--out", str(tmp_path / "o")],
        "--step: invalid int": ["--workdir", work, "--step", "x", "--out", str(tmp_path / "o")],
        "--force": ["--workdir", work, "--out", str(tmp_path / "taken")],
        "--dtype": ["--workdir", work, "--dtype", "fp8", "--out", str(tmp_path / "o")],
    }
    (tmp_path / "unet_config.json").write_text((root / "work" / "unet_config.json").read_text())
    for culprit, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            export.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, culprit
        assert err.count("\n") == 1 and culprit in err, err
        assert err.startswith(f"{export.PROG}: error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # the real command line: one line, no traceback; --debug shows it
    command = [sys.executable, "-m", "bdpo_jax.export", *cases["--workdir"]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(export.ExportError, match="no such folder"):  # --debug: the traceback
        export.main([*cases["--workdir"], "--debug"])
