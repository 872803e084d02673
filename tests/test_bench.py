"""`emdpo bench` and the baselines it measures against.

The baselines are checked against the float64 reference (a wrong baseline makes every
speed-up meaningless); the command is run at tiny sizes and its CSV checked. No timing is
asserted (speed targets live in benchmarks, not in unit tests).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CUDA_SKIP_REASON, SUBPROCESS_CWD, TOL, random_layout, random_logps

import emdpo_core as ec
from emdpo_core.bench import numpy_baseline as nb
from emdpo_core.ops import _reference as ref
from emdpo_core import bench
from emdpo_core.cli import main

PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_bench.py"


def _annotator_offsets(rng, N, H):
    cuts = np.sort(rng.choice(np.arange(1, N), H - 1, replace=False))
    return np.concatenate([[0], cuts, [N]]).astype(np.int64)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------
# Baselines against the reference


@pytest.mark.smoke
@pytest.mark.parametrize("partial", [False, True])
def test_python_loop_e_step_matches_reference(rng, partial):
    offsets, n_ranked = random_layout(rng, 60, max_len=9, partial=partial)
    p, r = random_logps(rng, 3, offsets[-1])
    aoff = _annotator_offsets(rng, 60, 7)
    log_w = np.log(rng.dirichlet(np.ones(3)))
    resp, ll = nb.e_step_python_loop(p, r, offsets, aoff, log_w, beta=0.7, n_ranked=n_ranked)
    want = ref.e_step(p, r, offsets, aoff, log_w, beta=0.7, n_ranked=n_ranked)
    np.testing.assert_allclose(resp, want[0], **TOL[np.float64])
    np.testing.assert_allclose(ll, want[1], **TOL[np.float64])


@pytest.mark.parametrize("kind", ["reward", "kl"])
def test_numpy_regret_matrix_matches_reference(rng, kind):
    K, S = 5, 400
    so = np.concatenate([[0], np.sort(rng.choice(np.arange(1, S), K - 1, replace=False)),
                         [S]])
    lp = rng.normal(-40.0, 3.0, size=(K, S))
    r = rng.normal(-40.0, 3.0, size=S)
    np.testing.assert_allclose(nb.regret_matrix(lp, r, so, beta=0.3, kind=kind),
                               ref.regret_matrix(lp, r, so, beta=0.3, kind=kind),
                               **TOL[np.float64])


def test_numpy_regret_matrix_rejects_a_policy_without_samples():
    with pytest.raises(ValueError, match="source_offsets"):
        nb.regret_matrix(np.zeros((2, 3)), np.zeros(3), [0, 3, 3], beta=1.0)


def test_numpy_em_e_step_matches_the_estimator(rng):
    truth = ec.PlackettLuceMixture.from_parameters(rng.normal(size=(3, 8)), [0.5, 0.3, 0.2])
    data, _ = truth.sample(50, records_per_annotator=3, candidate_size=4,
                           random_state=int(rng.integers(1 << 30)))
    with pytest.warns(ec.ConvergenceWarning):   # 2 iterations: any fitted parameters do
        model = ec.PlackettLuceMixture(3, max_iter=2, random_state=0).fit(data)
    g = data.grouped()
    log_w = np.log(model.weights_)
    resp, loglik, _ = model._e_step(g, log_w)
    theta = model.family_.log_worths
    resp_np, ll_np = nb.em_e_step(theta, g.items.reshape(g.n_records, 4), g.n_ranked,
                                  g.annotator_offsets, log_w)
    np.testing.assert_allclose(resp_np, resp, **TOL[np.float64])
    np.testing.assert_allclose(ll_np, loglik, **TOL[np.float64])


try:
    import torch as _torch
except ImportError:
    _torch = None


@pytest.mark.skipif(_torch is None, reason="torch is not installed")
class TestTorchBaseline:
    torch = _torch

    @pytest.fixture(autouse=True)
    def _tb(self):
        from emdpo_core.bench import torch_baseline as _torch_baseline
        self.tb = _torch_baseline

    def test_e_step_matches_reference_on_ragged_partial_lists(self, rng):
        torch = self.torch
        offsets, n_ranked = random_layout(rng, 40, max_len=10)
        p, r = random_logps(rng, 3, offsets[-1])
        aoff = _annotator_offsets(rng, 40, 6)
        log_w = np.log(rng.dirichlet(np.ones(3)))
        layout = self.tb.PaddedLayout(torch.from_numpy(offsets), torch.from_numpy(n_ranked))
        rec_ann = torch.repeat_interleave(torch.arange(6), torch.from_numpy(np.diff(aoff)))
        g, ll, S = self.tb.e_step(torch.from_numpy(p), torch.from_numpy(r), layout, rec_ann, 6,
                                  torch.from_numpy(log_w), 0.8)
        want = ref.e_step(p, r, offsets, aoff, log_w, beta=0.8, n_ranked=n_ranked)
        np.testing.assert_allclose(g.numpy(), want[0], **TOL[np.float64])
        np.testing.assert_allclose(ll, want[1], **TOL[np.float64])

    def test_loss_and_grad_match_reference_without_nan_on_ragged_lists(self, rng):
        # Lists of different lengths pad; the gradient must stay finite (no -inf padding).
        torch = self.torch
        offsets, n_ranked = random_layout(rng, 30, max_len=12)
        p, r = random_logps(rng, 2, offsets[-1])
        w = rng.uniform(0.0, 2.0, size=(2, 30))
        layout = self.tb.PaddedLayout(torch.from_numpy(offsets), torch.from_numpy(n_ranked))
        loss, grad = self.tb.loss_and_grad(torch.from_numpy(p), torch.from_numpy(r), layout,
                                           torch.from_numpy(w), 0.6)
        assert torch.isfinite(grad).all()
        for k in range(2):
            lk, gk = ref.listwise_dpo_loss_and_grad(p[k], r, offsets, w[k], beta=0.6,
                                                    n_ranked=n_ranked)
            np.testing.assert_allclose(grad[k].numpy(), gk, **TOL[np.float64])
        total = sum(ref.listwise_dpo_loss_and_grad(p[k], r, offsets, w[k], beta=0.6,
                                                   n_ranked=n_ranked)[0] for k in range(2))
        np.testing.assert_allclose(float(loss), total, **TOL[np.float64])

    @pytest.mark.parametrize("kind", ["reward", "kl"])
    def test_regret_matrix_matches_reference(self, rng, kind):
        torch = self.torch
        K, S = 4, 300
        so = np.array([0, 50, 51, 200, 300])
        lp = rng.normal(-40.0, 3.0, size=(K, S))
        r = rng.normal(-40.0, 3.0, size=S)
        got = self.tb.regret_matrix(torch.from_numpy(lp), torch.from_numpy(r),
                                    torch.from_numpy(so), beta=2.0, kind=kind)
        np.testing.assert_allclose(got.numpy(), ref.regret_matrix(lp, r, so, beta=2.0,
                                                                  kind=kind),
                                   **TOL[np.float64])


# ----------------------------------------------------------------------------------------
# The command


def _run_bench(tmp_path, only, *extra):
    out = tmp_path / "bench.csv"
    code = main(["bench", "--quick", "--n", "2000", "--repeats", "3", "--only", only,
                 "--output", str(out), *extra])
    assert code == 0
    return out, _read(out)


@pytest.mark.smoke
def test_bench_writes_rows_with_machine_versions_and_ratios(tmp_path, capsys):
    out, rows = _run_bench(tmp_path, "e_step,loss_grad,e_step_loop,regret,mmra")
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == bench.FIELDS
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and f"rows appended to {out}" in printed
    info = ec.build_info()
    cases = {r["case"] for r in rows}
    assert {"e_step", "loss_grad", "e_step_loop", "regret_reward", "regret_kl"} <= cases
    for r in rows:
        assert r["cpu_isa"] == info["cpu_isa"] and r["emdpo_core"] == ec.__version__
        assert r["commit"] and r["device"] == "cpu" and r["run_id"] == rows[0]["run_id"]
        if r["impl"] == "skipped":
            continue
        p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= p50 <= p80
    by = {(r["case"], r["impl"], r["K"]): r for r in rows}
    # The speed-up is the baseline's p50 over ours (written with 3 significant digits: up to
    # 5e-3 relative rounding; the times with 4).
    for (case, impl, K), r in by.items():
        if r["speedup_p50"]:
            base = by[(case, r["baseline"], K)]
            np.testing.assert_allclose(float(r["speedup_p50"]),
                                       float(base["p50_ms"]) / float(r["p50_ms"]), rtol=6e-3)
    e = by[("e_step", "emdpo", "8")]
    assert int(e["N"]) == 2000 and int(e["bytes_moved"]) > 2000 * 4 * 9 * 4
    np.testing.assert_allclose(float(e["ns_per_record_type"]),
                               float(e["p50_ms"]) * 1e6 / (2000 * 8), rtol=2e-3)
    np.testing.assert_allclose(float(e["bandwidth_fraction"]),
                               float(e["GB_per_s"]) / float(e["copy_GB_per_s"]), rtol=5e-3)
    assert by[("e_step_loop", "python_loop", "8")]["note"]


def test_bench_appends_and_covers_em_fit_and_scaling(tmp_path):
    out, first = _run_bench(tmp_path, "em_fit,scaling_n")
    _, both = _run_bench(tmp_path, "e_step")
    assert both[:len(first)] == first
    assert len(both) == len(first) + (1 if _torch is None else 2)   # emdpo (+ torch)
    assert len({r["run_id"] for r in both}) == 2
    fit = [r for r in first if r["case"] == "em_fit"]
    assert {r["impl"] for r in fit} == {"emdpo", "emdpo_mm", "numpy_em"}
    scaling = [r for r in first if r["table"] == "N"]
    assert sorted({int(r["N"]) for r in scaling}) == list(bench.Sizes(**bench.QUICK).scale_N)
    assert {r["case"] for r in scaling} == {"e_step", "loss_grad"}


def test_bench_without_torch_skips_the_torch_baselines_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.harness, "import_torch", lambda: None)
    _, rows = _run_bench(tmp_path, "e_step,loss_grad")
    assert {r["impl"] for r in rows} == {"emdpo", "emdpo_kernel"}
    assert all("torch not installed" in r["note"] for r in rows)
    assert all(r["speedup_p50"] == "" for r in rows)


def test_bench_without_cvxpy_skips_mmra_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)   # makes `import cvxpy` fail
    _, rows = _run_bench(tmp_path, "mmra")
    assert len(rows) == 1 and rows[0]["impl"] == "skipped"
    assert "cvxpy not installed" in rows[0]["note"] and rows[0]["p50_ms"] == ""


def test_bench_rejects_unknown_cases(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "e_step,nope"])
    assert e.value.code == 2
    assert "unknown case 'nope'" in capsys.readouterr().err


def test_bench_refuses_a_csv_with_other_columns(tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    assert main(["bench", "--quick", "--only", "e_step", "--output", str(out)]) == 1
    assert "exists with other columns" in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"


def test_bench_cuda_without_a_device_says_why(tmp_path, capsys):
    pytest.importorskip("torch")
    if CUDA_SKIP_REASON is None:
        pytest.skip("a CUDA device and a CUDA build are present: nothing to refuse")
    assert main(["bench", "--device", "cuda", "--output", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and not (tmp_path / "x.csv").exists()


@pytest.mark.skipif(not PLOT_SCRIPT.exists(), reason="benchmarks/ is not part of the wheel")
def test_plot_script_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = _run_bench(tmp_path, "e_step,regret,scaling_n")
    res = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(out), "--outdir",
                          str(tmp_path / "png")], cwd=SUBPROCESS_CWD, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    for name in ("bench_speedups.png", "bench_scaling.png"):
        png = tmp_path / "png" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not BENCH_DIR.exists(), reason="benchmarks/ is not part of the wheel")
def test_benchmark_scripts_import_no_private_module_of_the_package():
    """The scripts share the package's harness, baselines and routines through public
    modules (emdpo_core.bench.*), so a refactoring inside the package cannot break them."""
    import ast

    # The one exception: the GPU script times the bare compiled launches (no Python
    # validation, preallocated outputs) next to the public functions, and only the compiled
    # module _core has those.
    allowed = {("device_kernels.py", "emdpo_core._core")}
    bad = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if (parts[0] == "emdpo_core" and any(p.startswith("_") for p in parts[1:])
                        and (path.name, name) not in allowed):
                    bad.append(f"{path.name}:{node.lineno} {name}")
    assert bad == []
