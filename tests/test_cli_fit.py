"""`emdpo fit`: PrefLib and JSONL input, printed table, JSON and model output, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from emdpo_core import PlackettLuceMixture
from emdpo_core.cli import main

# The fast subset run against an installed wheel (`pytest -m smoke`, .ci/wheel_smoke.sh).
pytestmark = pytest.mark.smoke


def _planted_soc(path, seed=0, n_voters=400):
    """A PrefLib .soc file drawn from two opposed types over 6 named alternatives."""
    truth = PlackettLuceMixture.from_parameters(
        [[2.0, 1.2, 0.4, -0.4, -1.2, -2.0], [-2.0, -1.2, -0.4, 0.4, 1.2, 2.0]], [0.6, 0.4])
    data, _ = truth.sample(n_voters, random_state=seed)
    orders = {}
    for i in range(data.n_records):
        key = tuple(data.items[data.offsets[i]:data.offsets[i + 1]] + 1)
        orders[key] = orders.get(key, 0) + 1
    names = ["Ann", "Ben", "Cat", "Dan", "Eve", "Fay"]
    lines = ["# FILE NAME: planted.soc", "# DATA TYPE: soc", "# NUMBER ALTERNATIVES: 6",
             f"# NUMBER VOTERS: {n_voters}", f"# NUMBER UNIQUE ORDERS: {len(orders)}"]
    lines += [f"# ALTERNATIVE NAME {i + 1}: {nm}" for i, nm in enumerate(names)]
    lines += [f"{c}: {','.join(map(str, k))}" for k, c in sorted(orders.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fit_preflib_prints_the_table_and_writes_json(tmp_path, capsys):
    soc = _planted_soc(tmp_path / "planted.soc")
    out = tmp_path / "out"
    assert main(["fit", str(soc), "--types", "2", "--restarts", "2", "--output", str(out),
                 "--seed", "1", "--max-iter", "300"]) == 0
    text = capsys.readouterr().out
    assert "BIC" in text and "log-likelihood" in text
    assert "Ann > Ben > Cat" in text and "Fay > Eve > Dan" in text
    report = json.loads((out / "fit.json").read_text())
    fit = report["fit"]
    assert fit["n_components"] == 2 and report["n_rankings"] == 400
    weights = [t["weight"] for t in fit["types"]]
    assert weights == sorted(weights, reverse=True)
    np.testing.assert_allclose(sum(weights), 1.0)
    assert abs(weights[0] - 0.6) < 0.08        # 400 voters: sd of a weight about 0.025
    assert fit["types"][0]["top_items"][0] == "Ann"
    assert np.isfinite(fit["bic"]) and fit["bic"] > -2 * fit["loglik"]
    model = PlackettLuceMixture.load(out / "model.npz")
    np.testing.assert_allclose(model.loglik_, fit["loglik"])
    assert model.item_names_[0] == "Ann"


def test_fit_jsonl_with_a_range_of_types_selects_by_bic(tmp_path, capsys):
    truth = PlackettLuceMixture.from_parameters(
        [[2.0, 1.0, 0.0, -1.0, -2.0], [-2.0, -1.0, 0.0, 1.0, 2.0]], [0.5, 0.5])
    data, _ = truth.sample(200, records_per_annotator=2, candidate_size=4, random_state=3)
    rows = []
    for i in range(data.n_records):
        ranked, rest = data.record(i)
        rows.append(json.dumps({"annotator": f"u{data.annotator[i]}",
                                "ranking": [f"item{j}" for j in ranked],
                                "items": [f"item{j}" for j in ranked + rest]}))
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["fit", str(p), "--types", "1-3", "--restarts", "1", "--output",
                 str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "lowest BIC: K = 2" in text
    report = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert [r["n_components"] for r in report["selection"]["rows"]] == [1, 2, 3]
    assert report["n_annotators"] == 200


def test_fit_reports_identifiability_warnings(tmp_path, capsys):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps({"ranking": r}) for r in [[0, 1], [1, 2], [2, 0]] * 20),
                 encoding="utf-8")
    assert main(["fit", str(p), "--types", "2", "--restarts", "1", "--max-iter", "20"]) == 0
    assert "binary comparisons cannot identify" in capsys.readouterr().out


@pytest.mark.parametrize("name, text, match", [
    ("tie.toc", "# NUMBER ALTERNATIVES: 3\n1: 1,{2,3}\n", "tie {2,3}"),
    ("bad.jsonl", "{oops\n", "not valid JSON"),
    ("data.csv", "a,b\n", "cannot tell the format"),
])
def test_fit_input_errors_exit_1_with_one_line(tmp_path, capsys, name, text, match):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    assert main(["fit", str(p), "--types", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("emdpo fit: error:") and match in err and "Traceback" not in err


def test_missing_file_and_usage_errors(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "none.soc"), "--types", "2"]) == 1
    assert "no such file" in capsys.readouterr().err
    for argv in (["fit", "x.soc"], ["fit", "x.soc", "--types", "0"],
                 ["fit", "x.soc", "--types", "a"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_module_entry_point(tmp_path):
    soc = _planted_soc(tmp_path / "p.soc", n_voters=60)
    r = subprocess.run([sys.executable, "-m", "emdpo_core.cli", "fit", str(soc), "--types", "1",
                        "--restarts", "1"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 type(s), log-likelihood" in r.stdout
