"""The training-step benchmark (``python -m perf.training``): smoke pipeline, networks and check.

The smoke run goes in a subprocess and writes under pytest's tmp_path only. The in-process tests
build the smoke networks and show that the check catches a wrong conversion or a model that
never reaches the kernels.
"""

import pytest
import torch
from _perf_cli import PNG_MAGIC, read_csv, repo_outputs, run_perf

import triton_instnorm
from conftest import DEVICE
from perf import networks, schema, training
from perf.networks import NETWORKS

pytestmark = pytest.mark.perf

HAS_GPU = torch.cuda.is_available()
NORMS = (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("matplotlib")  # the plot
    out = tmp_path_factory.mktemp("training_smoke")
    before = repo_outputs()
    # Eager only, GPU or not: test_smoke_torch_compile_one_network covers compile.
    proc = run_perf("training", "--smoke", "--out", str(out), "--modes", "eager", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert repo_outputs() == before, "the smoke run must not touch perf/results/ or plots/"
    return (out, proc, *read_csv(out))


def test_smoke_rows_every_network_checked(smoke_run):
    out, proc, columns, rows = smoke_run
    assert columns == schema.TRAINING_COLUMNS
    keys = {(r["network"], r["variant"], r["mode"]) for r in rows}
    assert keys == {(n, v, "eager") for n in NETWORKS for v in schema.VARIANTS}
    for r in rows:
        assert r["device"] and r["torch"] and r["triton"] and r["date"].endswith("Z")
        assert float(r["ms_per_step"]) > 0 and float(r["loss"]) > 0
        if r["variant"] == "pytorch":
            assert r["check"] == "reference" and r["instnorm_launches"] == "0"
            assert not r["speedup_vs_pytorch"]
        else:
            assert r["check"] == "ok", r
            assert int(r["instnorm_launches"]) > 0 and float(r["speedup_vs_pytorch"]) > 0
            assert float(r["loss_rel_err"]) <= training.TOLERANCES[0]
            assert float(r["grad_rel_err"]) <= training.TOLERANCES[1]
    by_net = {r["network"]: r for r in rows}
    assert by_net["unet3d"]["dtype"] == "bfloat16 autocast"
    assert by_net["unet3d_channels_last"]["memory_format"] == "channels_last_3d"
    assert by_net["cyclegan_b4"]["batch"] == "2" and by_net["cyclegan_b1"]["batch"] == "1"


def test_smoke_outputs(smoke_run):
    out, proc, _, _ = smoke_run
    text = next(out.glob("*.md")).read_text()
    assert "| network | batch x input |" in text and "| adain |" in text
    (png,) = (out / "plots").glob("*_models.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    assert "check ok" in proc.stderr  # the progress lines


@pytest.mark.slow
def test_smoke_torch_compile_one_network(tmp_path):
    """torch.compile of the whole AdaIN task, both variants (CPU: a minute or two of inductor)."""
    pytest.importorskip("matplotlib")  # the plot
    proc = run_perf("training", "--smoke", "--networks", "adain", "--modes", "compile",
                    "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_csv(tmp_path)[1]
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, "compile") for v in schema.VARIANTS}
    (ours,) = [r for r in rows if r["variant"] == "triton_instnorm"]
    assert ours["check"] == "ok" and int(ours["instnorm_launches"]) > 0


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the plain command measures")
def test_without_gpu_says_so_and_redraws(smoke_run, tmp_path):
    out = smoke_run[0]
    proc = run_perf("training", "--out", str(out), "--plots", str(tmp_path / "redrawn"),
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "No CUDA GPU" in proc.stdout
    assert len(list((tmp_path / "redrawn").glob("*_models.png"))) == 1
    proc = run_perf("training", "--out", str(tmp_path / "empty"), "--plots", str(tmp_path / "none"),
                    timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1
    assert "no CSV" in proc.stdout and not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- networks

@pytest.mark.parametrize("name, norms", [("style_transfer", 15), ("cyclegan_b1", 23),
                                         ("unet3d", 14)])
def test_conversion_swaps_every_instance_norm(name, norms):
    net = NETWORKS[name]
    task = getattr(networks, net.task)(**net.smoke_kwargs)
    assert sum(isinstance(m, NORMS) for m in task.modules()) == norms
    affine = net.name != "cyclegan_b1"
    assert all(m.affine == affine for m in task.modules() if isinstance(m, NORMS))
    networks.to_triton(task)
    ours = [m for m in task.modules() if type(m).__module__.startswith("triton_instnorm")]
    assert len(ours) == norms


def test_eager_adain_matches_triton_adain():
    torch.manual_seed(0)
    content = torch.randn(2, 5, 6, 7, device=DEVICE) * 3 + 1
    style = torch.randn(2, 5, 6, 7, device=DEVICE) * 0.5 - 2
    want = triton_instnorm.adain(content, style, eps=networks.EPS)
    torch.testing.assert_close(networks.eager_adain(content, style), want, rtol=1e-5, atol=1e-5)
    layer = networks.to_triton(networks.AdaINStyleTransfer(width=2)).adain
    assert layer.fn is triton_instnorm.adain
    torch.testing.assert_close(layer(content, style), want)


# --------------------------------------------------------------------------- the check can fail

def test_check_catches_a_wrong_conversion(monkeypatch):
    convert = networks.to_triton

    def wrong_eps(task):
        convert(task)
        for m in task.modules():
            if isinstance(m, NORMS):
                m.eps = 0.5  # not what PyTorch's layer uses
        return task

    monkeypatch.setattr(networks, "to_triton", wrong_eps)
    checked = training.check_network(NETWORKS["style_transfer"], torch.device(DEVICE), smoke=True)
    assert checked["check"].startswith("FAIL: ") and "grad rel. error" in checked["check"]


def test_check_catches_a_model_that_never_launches_the_kernels(monkeypatch):
    monkeypatch.setattr(networks, "to_triton", lambda task: task)  # still PyTorch's AdaIN
    args = training.parse_args(["--smoke", "--warmup", "1", "--steps", "1"])
    rows = training.run_network(NETWORKS["adain"], ["eager"], args, torch.device(DEVICE), {})
    ours = [r for r in rows if r["variant"] == "triton_instnorm"]
    assert [r["check"] for r in ours] == ["FAIL: no triton_instnorm kernel launched"]


def test_grad_error_ignores_only_gradients_that_are_zero_in_exact_arithmetic():
    want = {"w": torch.ones(10), "bias_before_norm": torch.full((3,), 1e-9)}
    got = {"w": torch.ones(10), "bias_before_norm": torch.full((3,), -1e-9)}
    assert training.grad_error(got, want) == 0
    got["w"] = torch.ones(10) * 1.01
    assert training.grad_error(got, want) == pytest.approx(0.01, rel=1e-4)
    checked = training.compare((1.0, want), (1.0 + 2e-4, got))
    assert checked["check"] == ("FAIL: loss rel. error 2.00e-04 > 0.0001; "
                                "grad rel. error 1.00e-02 > 0.001")
