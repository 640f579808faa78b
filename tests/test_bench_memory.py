"""bench/memory.py at tiny size: the same compile-only path as its SD1.5 and SDXL rows."""

import json
import os
import shutil
import sys

import pytest

from tests.bench_runner import REPO, run_bench


def test_tiny_run_writes_xla_breakdown(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_bench(["bench/memory.py", "--model", "tiny", "--out", str(out)], timeout=600)
    result = json.loads(out.read_text())
    assert result["meta"]["versions"]["jax"]
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["devices"] == 8 and row["attention"] == "chunked"
    assert "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED" in row["xla_flags"]
    x = row["xla_bytes_per_device"]
    assert x["argument"] > 0 and x["temp"] > 0
    assert x["peak"] == x["argument"] + x["output"] - x["alias"] + x["temp"]
    # the buffer-assignment dump, read as for SDXL, gives memory_analysis()'s figures
    assert row["memory_source"] == "xla" and x["dump_agrees"] is True
    # the values live at the peak of XLA's schedule: at most what its buffer assignment holds
    assert 0 < x["live_at_peak"] <= x["peak"]
    assert "| tiny (" in proc.stdout


_DUMP = """BufferAssignment:
allocation 0: size 1000, parameter 0, shape |f32[250]| at ShapeIndex {}, maybe-live-out:
 value: <1 p0 @0> (size=1000,offset=0): f32[250]{0}
allocation 1: size 40, parameter 1, shape |f32[10]| at ShapeIndex {}:
allocation 2: size 8, maybe-live-out:
allocation 3: size 16, output shape is |(f32[250], f32[2])|, maybe-live-out:
allocation 4: size 4, constant:
allocation 5: size 64, thread-local:
allocation 6: size 5000, preallocated-temp:
"""


def test_buffer_assignment_dump_is_read_when_the_executable_takes_too_long(monkeypatch):
    """compile_cpu on a stand-in whose compile writes XLA's dump and then does not return:
    the figures come from the dump (by hand: arguments 1000 + 40, temp 5000, unaliased output
    8 + 16), and the stalled compile is handed to main() to end the process."""
    import threading

    sys.path.insert(0, REPO)
    from bench import memory

    release = threading.Event()

    class StalledLowered:
        def compile(self, compiler_options):
            folder = compiler_options["xla_dump_to"]
            with open(
                os.path.join(folder, "m.cpu_after_optimizations-buffer-assignment.txt"), "w"
            ) as f:
                f.write(_DUMP)
            with open(os.path.join(folder, "m.cpu_after_optimizations-live-range.txt"), "w") as f:
                f.write(_LIVE_RANGE)
            release.wait(60)  # the executable's graph, taking its time

    monkeypatch.setattr(memory, "DUMP_GRACE_S", 0.3)
    monkeypatch.setattr(memory, "ABANDONED_COMPILES", [])
    try:
        xla_bytes, timing = memory.compile_cpu(StalledLowered(), poll_s=0.05)
    finally:
        release.set()
    assert xla_bytes == {
        "argument": 1040,
        "unaliased_output": 24,
        "temp": 5000,
        "peak": 6064,
        "live_at_peak": 5123,  # XLA prints it with spaces between the thousands
    }
    assert timing["memory_source"].startswith("buffer-assignment dump")
    ((thread, folder),) = memory.ABANDONED_COMPILES
    thread.join(10)
    shutil.rmtree(folder)


_LIVE_RANGE = """HloLiveRange (max 12):
  Live ranges at 7 (peak):
    fusion.1{}: 5000 bytes (cumulative: 5000 bytes)
    p0{}: 123 bytes (cumulative: 5123 bytes)
  Stack trace breakdown for peak usage: 5 123 bytes
"""


def test_bad_flags_are_one_line_errors():
    import subprocess

    for args, culprit in ((["--devices", "0"], "--devices 0"), (["--batch", "-8"], "--batch -8")):
        proc = subprocess.run(
            [sys.executable, "bench/memory.py", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and culprit in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_replan_sets_todays_plan_beside_the_recorded_xla_figures(tmp_path, capsys):
    """--replan: the plan columns of a recorded row are recomputed, its XLA figures kept."""
    from bdpo_jax import memory_plan
    from bench import memory

    settings = dict(
        model="sd15",
        target="gpu-h100",
        mesh=[1, 1],
        global_batch=2,
        grad_accum=1,
        latent_size=16,
        optimizer="adamw",
        compute_dtype="bfloat16",
        remat=True,
        matched_forward=False,
    )
    xla = {"argument": 1, "output": 0, "alias": 0, "temp": 2, "peak": 2**34}
    path = tmp_path / "memory_gpu.json"
    stale = {"total": 1, "params": 1, "ref_params": 0, "opt_state": 0}
    row = {**settings, "xla_bytes_per_device": xla, "plan_bytes_per_device": stale}
    row["compile_seconds"] = 1.0
    path.write_text(json.dumps({"meta": {"argv": ["then"]}, "rows": [row]}))
    memory.replan(str(path))
    result = json.loads(path.read_text())
    (new,) = result["rows"]
    same = dict(mesh_shape=(1, 1), global_batch=2, grad_accum=1, latent_size=16)
    plan = memory_plan.memory_plan("sd15", matched_forward=False, **same)["bytes_per_device"]
    assert new["plan_bytes_per_device"] == plan
    assert new["xla_bytes_per_device"] == xla
    assert new["plan_over_xla_peak"] == plan["total"] / 2**34
    assert result["meta"]["argv"] == ["then"] and "replanned" in result["meta"]
    assert "| sd15 h100 ([1, 1], 2/1) |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="--replan .*bad.json: not a bench/memory.py JSON"):
        memory.replan(str(tmp_path / "bad.json"))


def test_default_flags_keep_what_the_caller_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    sys.path.insert(0, REPO)
    from bench import memory

    flags = memory.with_default_flags("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
    assert flags.count("--xla_cpu_scheduler_type") == 1 and "TYPE_DEFAULT" in flags
    assert "--xla_force_host_platform_device_count=8" in flags
    plan = {"params": 1, "ref_params": 1, "opt_state": 2, "total": 10}
    row = memory.with_plan({"xla_bytes_per_device": {"peak": 20}}, plan)
    assert row["plan_temp_bytes_per_device"] == 6 and row["plan_over_xla_peak"] == 0.5


def _gpu_target():
    sys.path.insert(0, REPO)
    from bench import gpu_target

    return gpu_target


def test_gpu_specs_parse_and_name_their_gpu():
    gpu_target = _gpu_target()
    for target, (name, gib) in {
        "gpu-h100": ("NVIDIA H100 80GB HBM3", 79.1),
        "gpu-h200": ("NVIDIA H200 141GB HBM3e", 141.0),
    }.items():
        with open(gpu_target.spec_path(target)) as f:
            spec = gpu_target.parse_spec(f.read())
        assert spec["name"] == name and spec["compute_capability"] == 9.0
        assert abs(spec["device_memory_bytes"] / 2**30 - gib) < 0.1
    with pytest.raises(ValueError, match="cpu"):
        gpu_target.spec_path("gpu-a100")


def test_gpu_spec_errors_name_the_missing_field():
    gpu_target = _gpu_target()
    fields = {
        "device_memory_size": "device_memory_size: 10",
        "platform_name": 'platform_name: "CUDA"',
        "device_description_str": 'device_description_str: "X"',
        "cuda_compute_capability": "cuda_compute_capability { major: 8 }",
    }
    memory, capability, platform, name = fields.values()
    ok = f"gpu_device_info {{ {memory} {capability} }}\n{platform}\n{name}  # a comment: major: 1\n"
    assert gpu_target.parse_spec(ok)["compute_capability"] == 8.0
    for field, text in fields.items():
        with pytest.raises(ValueError, match=field):
            gpu_target.parse_spec(ok.replace(text, ""))
    with pytest.raises(ValueError, match="ROCM"):
        gpu_target.parse_spec(ok.replace('"CUDA"', '"ROCM"'))


def test_topology_string_is_slices_hosts_gpus():
    gpu_target = _gpu_target()
    assert gpu_target.topology_string(8) == "1x1x8"
    assert gpu_target.topology_string(16) == "1x2x8"
    assert gpu_target.topology_string(4) == "1x1x4"
    with pytest.raises(ValueError, match="whole hosts"):
        gpu_target.topology_string(12)


def test_gpu_auto_attention_is_cudnn_for_self_attention_on_hopper():
    sys.path.insert(0, REPO)
    from bdpo_jax.models import presets, unet_config
    from bench import memory

    for name in ("sd15", "sdxl"):
        spec = unet_config.unet_spec(presets.complete_config(presets.real_unet_config(name)))
        assert memory.gpu_auto_attention(spec, "bfloat16", 9.0, 77) == "self cudnn, cross xla"
        assert memory.gpu_auto_attention(spec, "float32", 9.0, 78) == "self xla, cross xla"
    sd15 = unet_config.unet_spec(presets.complete_config(presets.real_unet_config("sd15")))
    # SD1.5's head dim 160 (1280 channels, 8 heads) takes the XLA path before Hopper
    assert memory.gpu_auto_attention(sd15, "bfloat16", 8.0, 77) == "self cudnn+xla, cross xla"


@pytest.mark.skipif(
    not _gpu_target().plugin_available(),
    reason="no CUDA PJRT plugin (jax-cuda12-plugin[with-cuda]): the GPU target is not compiled",
)
def test_tiny_compiles_for_h100_without_a_gpu(tmp_path):
    out = tmp_path / "memory_gpu.json"
    run_bench(
        ["bench/memory.py", "--model", "tiny", "--target", "gpu-h100", "--out", str(out)],
        timeout=900,
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["target"] == "gpu-h100" and row["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert (
        "CPU_SCHEDULER" not in row["xla_flags"]
        and "triton_gemm=false" in row["xla_flags"]
        and row["xla_bytes_per_device"]["temp"] > 0
    )
    x = row["xla_bytes_per_device"]
    assert 0 < x["live_at_peak"] <= x["peak"]  # from XLA:GPU's dump, as on CPU
    assert row["xla_flops_per_device"] * 8 == row["xla_flops_per_step"] > 0


@pytest.mark.skipif(
    not _gpu_target().plugin_available(),
    reason="no CUDA PJRT plugin (jax-cuda12-plugin[with-cuda]): the GPU target is not compiled",
)
def test_sdxl_family_fsdp_with_cudnn_attention_compiles_for_h100(tmp_path):
    """configs/sdxl.py's FSDP mesh (1, 8) with cuDNN attention: without
    models.attention.split_over_mesh on q, k, v and the output, jax's partitioning of the cuDNN
    call got the kernels' heads split (IndivisibleError: 4 heads over 8 devices)."""
    out = tmp_path / "memory_gpu.json"
    run_bench(
        [
            "bench/memory.py",
            *("--model", "tiny-sdxl", "--target", "gpu-h100", "--attention", "cudnn"),
            *("--out", str(out)),
        ],
        timeout=900,
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mesh"] == [1, 8] and row["attention"] == "cudnn"
    assert row["compute_dtype"] == "bfloat16" and row["xla_bytes_per_device"]["temp"] > 0
