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


# --- LoRA runs: --lora (a diffusers LoRA folder) and --merge (the merged UNet) ------------------

LORA_RANK, LORA_ALPHA = 4, 8.0  # alpha != rank: the scale 2 must reach diffusers


@pytest.fixture(scope="module")
def lora_setup(setup):
    """A LoRA run's workdir on the tiny pipeline's UNet (its pretrained base), with trained-like
    adapters (B != 0), and that UNet's output with the adapters merged, from the JAX model."""
    from bdpo_jax import lora

    root, base, _ = setup
    model, base_params = load_unet(str(base), subfolder="unet")
    spec = lora.LoraSpec(LORA_RANK, LORA_ALPHA, lora.ATTENTION_TARGETS)
    adapters = lora.init_adapters(jax.random.key(5), base_params, spec, jnp.float32)
    adapters = _perturb(jax.tree.map(np.asarray, adapters), 7)  # B = 0 would hide mistakes
    work = root / "lora_work"
    write_trainer_workdir(work, model, {3: adapters}, adapters)
    run_config = {
        "seed": 0,
        "model": {"pretrained": str(base), "subfolder": "unet", "unet_config": ""},
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(spec.targets)},
    }
    (work / "config.json").write_text(json.dumps(run_config))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    text = rng.standard_normal((2, 5, 32)).astype(np.float32)
    merged = lora.merge(base_params, adapters, spec.scale)
    want = np.asarray(model.apply({"params": merged}, x, t, text))
    plain = np.asarray(model.apply({"params": base_params}, x, t, text))
    assert np.abs(want - plain).max() > 1e-2  # the adapters matter
    return root, base, work, adapters, (x, t, text), want


def _torch_unet_out(unet, inputs):
    x, t, text = (torch.from_numpy(np.asarray(a)) for a in inputs)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text).sample.numpy()


def test_lora_folder_has_peft_names_and_loads_into_diffusers_with_the_same_output(lora_setup):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from bdpo_jax import lora

    root, base, work, adapters, inputs, want = lora_setup
    out = root / "out_lora"
    assert export.main(["--workdir", str(work), "--lora", "--out", str(out)]) == 0
    file = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "np") as f:
        keys, metadata = set(f.keys()), f.metadata()
    # the names peft gives the same adapters on diffusers' UNet, with diffusers' "unet." prefix
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(lora.ATTENTION_TARGETS))
    )
    assert keys == {f"unet.{k}" for k in get_peft_model_state_dict(unet)}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    packed = json.loads(metadata["lora_adapter_metadata"])
    assert (packed["unet.r"], packed["unet.lora_alpha"]) == (LORA_RANK, 8)

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(out)
    got = _torch_unet_out(pipe.unet, inputs)
    err = float(np.abs(got - want).max())
    print(f"--lora: diffusers load_lora_weights vs JAX base+adapters: max abs diff {err:.2e}")
    assert err <= 1e-4
    info = json.loads((out / export.EXPORT_INFO_NAME).read_text())
    assert (info["step"], info["lora_rank"], info["lora_alpha"]) == (3, LORA_RANK, LORA_ALPHA)


def test_merge_writes_the_merged_unet(lora_setup):
    root, base, work, _, inputs, want = lora_setup
    out = root / "out_merged"
    export.export(work, out, merge=True)
    unet = UNet2DConditionModel.from_pretrained(out)
    got = _torch_unet_out(unet, inputs)
    err = float(np.abs(got - want).max())
    print(f"--merge: diffusers merged UNet vs JAX base+adapters: max abs diff {err:.2e}")
    assert err <= 1e-4
    out_pipe = root / "out_merged_pipeline"  # with --base: the pipeline holding the merged UNet
    export.export(work, out_pipe, merge=True, base=str(base))
    assert (out_pipe / "model_index.json").is_file()
    np.testing.assert_array_equal(
        _unet_state(out_pipe / "unet")["conv_in.weight"], _unet_state(out)["conv_in.weight"]
    )


def test_lora_export_errors(setup, lora_setup, tmp_path):
    root, base, work, _, _, _ = lora_setup
    with pytest.raises(
        export.ExportError, match=r"LoRA run \(config.lora.rank=4\).*--lora.*--merge"
    ):
        export.export(work, tmp_path / "o")
    with pytest.raises(export.ExportError, match="--lora: .* is not a LoRA run"):
        export.export(root / "work", tmp_path / "o", lora_folder=True)
    with pytest.raises(export.ExportError, match="--base: a --lora folder"):
        export.export(work, tmp_path / "o", lora_folder=True, base=str(base))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--workdir", str(work), "--lora", "--merge", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()
