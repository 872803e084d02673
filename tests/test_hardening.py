"""Hard to break: files (atomic saves, what a model file may carry, validation on load),
refits on other item sets, inputs whose cost would grow with an id rather than with the data,
the command line's errors, truncated PrefLib files, and messages that name the argument and
the real value."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import emdpo_core as ec
from emdpo_core import PlackettLuceMixture, RankingData
from emdpo_core.cli import main

from conftest import SUBPROCESS_CWD, random_layout, random_logps


def _planted(seed=0, n=120, n_items=6):
    lw = np.linspace(2.0, -1.0, n_items)
    truth = PlackettLuceMixture.from_parameters(np.stack([lw, -lw]), [0.6, 0.4])
    data, _ = truth.sample(n, candidate_size=4, n_ranked=3, random_state=seed)
    return data


@pytest.fixture(scope="module")
def fitted():
    data = _planted()
    return PlackettLuceMixture(2, random_state=0, max_iter=50).fit(data), data


def _rewrite(src, dst, *, meta=None, drop=(), **arrays):
    """Copy a saved model, editing its JSON header (meta: dict -> dict, or raw bytes) and
    replacing or dropping arrays."""
    with np.load(src, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    if meta is not None:
        if callable(meta):
            header = meta(json.loads(entries["__meta__"].tobytes().decode("utf-8")))
            meta = json.dumps(header).encode("utf-8")
        entries["__meta__"] = np.frombuffer(meta, dtype=np.uint8)
    for k in drop:
        del entries[k]
    entries.update(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **entries)
    return dst


# ----------------------------------------------------------------------------------------
# Refitting on data with fewer items (the MM step indexed the data's arrays by the model's
# items)


def test_warm_start_on_fewer_items_is_refused_by_name():
    data = _planted()
    model = PlackettLuceMixture(2, random_state=0, warm_start=True, max_iter=20).fit(data)
    small = RankingData.from_rankings([[0, 1, 2], [2, 1, 0], [1, 0, 2]] * 5)
    with pytest.raises(ValueError, match=r"n_items=3.*6 items"):
        model.fit(small)


def test_warm_start_on_the_same_items_padded_with_n_items_works():
    data = _planted()
    model = PlackettLuceMixture(2, random_state=0, warm_start=True, max_iter=20).fit(data)
    small = RankingData.from_rankings([[0, 1, 2], [2, 1, 0], [1, 0, 2]] * 5, n_items=6)
    model.fit(small)
    assert np.all(np.isfinite(model.log_worths_)) and model.log_worths_.shape == (2, 6)


# ----------------------------------------------------------------------------------------
# Model files: what a header may carry, validation on load


def test_a_model_file_cannot_set_the_checkpoint_path(tmp_path, fitted):
    model, data = fitted
    model.save(tmp_path / "m.npz")
    target = tmp_path / "victim.npz"

    def evil(h):
        h["params"]["checkpoint"] = str(target)
        return h

    _rewrite(tmp_path / "m.npz", tmp_path / "evil.npz", meta=evil)
    with pytest.raises(ValueError, match=r"evil\.npz.*checkpoint"):
        PlackettLuceMixture.load(tmp_path / "evil.npz")
    assert not target.exists()


def test_a_saved_model_does_not_store_its_checkpoint_path(tmp_path):
    data = _planted()
    ck = tmp_path / "ck.npz"
    PlackettLuceMixture(2, random_state=0, max_iter=5, checkpoint=ck).fit(data)
    again = PlackettLuceMixture.load(ck)
    assert again.checkpoint is None
    # a loaded checkpoint resumes writing only where the caller says
    assert PlackettLuceMixture.load(ck, checkpoint=tmp_path / "c2.npz").checkpoint is not None


def test_unknown_header_parameters_are_refused(tmp_path, fitted):
    model, _ = fitted
    model.save(tmp_path / "m.npz")

    def extra(h):
        h["params"]["evil"] = 1
        return h

    _rewrite(tmp_path / "m.npz", tmp_path / "x.npz", meta=extra)
    with pytest.raises(ValueError, match=r"x\.npz.*evil"):
        PlackettLuceMixture.load(tmp_path / "x.npz")


BAD_FILES = [
    # (arrays to replace, arrays to drop, header edit, words the message must contain)
    (dict(weights=np.array([-0.5, 1.5])), (), None, "weights"),
    (dict(weights=np.array([0.5, 0.6])), (), None, "weights"),
    (dict(weights=np.array([np.nan, 1.0])), (), None, "weights"),
    (dict(weights=np.array([0.2, 0.3, 0.5])), (), None, "weights"),
    (dict(weights=np.array([[0.5, 0.5]])), (), None, "weights"),
    ({"family/log_worths": np.zeros(6)}, (), None, "log_worths"),
    ({"family/log_worths": np.full((2, 6), np.nan)}, (), None, "log_worths"),
    ({"family/log_worths": np.zeros((2, 6), dtype=np.int64)}, (), None, "log_worths"),
    ({}, ("weights",), None, "weights"),
    ({}, ("family/log_worths",), None, "log_worths"),
    (dict(responsibilities=np.full((120, 3), 1 / 3)), (), None, "responsibilities"),
    (dict(responsibilities=np.full((120, 2), 0.7)), (), None, "responsibilities"),
    ({}, (), b"{not json", "header"),
    ({}, (), b"\xff\xfe", "header"),
    ({}, (), b"[1, 2]", "header"),
    ({}, (), lambda h: {k: v for k, v in h.items() if k != "params"}, "params"),
    ({}, (), lambda h: {k: v for k, v in h.items() if k != "status"}, "status"),
    ({}, (), lambda h: {**h, "fitted": {**h["fitted"], "n_iter_": "many"}}, "n_iter_"),
    ({}, (), lambda h: {**h, "params": {**h["params"], "n_components": "two"}},
     "n_components"),
]


@pytest.mark.parametrize("arrays, drop, meta, field", BAD_FILES)
def test_load_refuses_a_damaged_file_naming_file_and_field(tmp_path, fitted, arrays, drop,
                                                          meta, field):
    model, _ = fitted
    model.save(tmp_path / "m.npz")
    bad = _rewrite(tmp_path / "m.npz", tmp_path / "bad.npz", meta=meta, drop=drop, **arrays)
    with pytest.raises(ValueError) as e:
        PlackettLuceMixture.load(bad)
    msg = str(e.value)
    assert "bad.npz" in msg and field in msg, msg


def test_load_of_a_good_file_still_round_trips(tmp_path, fitted):
    model, data = fitted
    model.save(tmp_path / "m.npz")
    again = PlackettLuceMixture.load(tmp_path / "m.npz")
    assert np.array_equal(again.predict_proba(data), model.predict_proba(data))


# ----------------------------------------------------------------------------------------
# Atomic writes: concurrent saves, failed saves


def test_concurrent_saves_to_one_path_never_collide(tmp_path, fitted):
    model, data = fitted
    path = tmp_path / "m.npz"
    errors = []
    seen = []

    def writer():
        try:
            for _ in range(5):
                model.save(path)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def reader():
        for _ in range(20):
            if path.exists():
                try:
                    seen.append(PlackettLuceMixture.load(path).weights_.shape)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)] + \
        [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(s == (2,) for s in seen)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_a_failed_save_leaves_no_stray_file(tmp_path, fitted):
    model, _ = fitted
    target = tmp_path / "taken"
    target.mkdir()                       # a folder where the file should go: rename fails
    with pytest.raises(OSError):
        model.save(target)
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(target) == []


def test_one_atomic_write_helper(tmp_path):
    from emdpo_core._io import atomic_write

    path = tmp_path / "a.txt"
    with atomic_write(path, "w") as f:
        f.write("one")
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("two")
            raise RuntimeError("stop")
    assert path.read_text() == "one"                 # the old content survives a failure
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_fit_output_is_written_atomically(tmp_path, monkeypatch):
    """`emdpo fit --output` writes fit.json through the helper: a failure midway leaves the
    previous fit.json whole."""
    import emdpo_core._io as io_mod

    src = tmp_path / "x.jsonl"
    src.write_text('{"ranking": [0, 1, 2]}\n{"ranking": [2, 1, 0]}\n{"ranking": [1, 0, 2]}\n')
    out = tmp_path / "out"
    assert main(["fit", str(src), "--types", "1", "--restarts", "1", "--output", str(out)]) == 0
    before = (out / "fit.json").read_text()
    real = io_mod.os.replace
    calls = []

    def failing_replace(a, b):
        calls.append(b)
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "replace", failing_replace)
    assert main(["fit", str(src), "--types", "1", "--restarts", "1", "--output", str(out)]) == 1
    monkeypatch.setattr(io_mod.os, "replace", real)
    assert calls, "fit.json was not written through emdpo_core._io"
    assert (out / "fit.json").read_text() == before
    assert sorted(os.listdir(out)) == ["fit.json", "model.npz"]


# ----------------------------------------------------------------------------------------
# Cost bounded by the data, not by an id


def test_a_fit_over_a_huge_item_id_is_refused_quickly():
    """RankingData keeps sparse ids (it needs no array of size n_items), but tabular policies
    hold a worth per item id: the fit refuses ids far beyond the data instead of allocating
    (K, 10**12) worths."""
    for data in (RankingData.from_rankings([[0, 10 ** 12], [1, 0]] * 3),
                 RankingData(np.array([0, 2 ** 40, 1, 0]), [0, 2, 4])):
        with pytest.raises(ValueError, match=rf"items.*{data.n_items - 1}"):
            PlackettLuceMixture(1, max_iter=3).fit(data)
    # ids up to a margin beyond the data are fine
    PlackettLuceMixture(1, max_iter=3).fit(RankingData.from_rankings([[0, 1000], [1, 0]] * 3))


def test_a_huge_annotator_id_is_refused_not_a_memory_error():
    with pytest.raises(ValueError, match=r"annotator_ids.*1099511627776"):
        ec.group_by_annotator(np.array([0, 2 ** 40]))


def test_jsonl_huge_item_id_is_refused_by_the_fit(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"ranking": [0, 1]}\n{"ranking": [0, 1000000000000]}\n')
    data = RankingData.from_jsonl(p)
    with pytest.raises(ValueError, match=r"items.*1000000000000"):
        PlackettLuceMixture(1, max_iter=3).fit(data)


def _run_limited(code, timeout=60, mem_gb=3):
    """Run Python code in a child with an address-space limit and a timeout (what main did
    with these inputs: allocate terabytes or loop for hours)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_gb << 30, mem_gb << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=SUBPROCESS_CWD)


def test_preflib_header_claiming_1e12_alternatives_is_refused(tmp_path):
    p = tmp_path / "x.soi"
    p.write_text("# NUMBER ALTERNATIVES: 1000000000000\n1: 1,2,3\n1: 2,1,3\n")
    r = _run_limited(f"import emdpo_core as ec; ec.RankingData.from_preflib({str(p)!r})")
    assert "ValueError" in r.stderr and "1000000000000" in r.stderr, r.stderr[-2000:]
    assert "MemoryError" not in r.stderr


def test_error_messages_echo_at_most_a_readable_length(tmp_path):
    junk = "x" * 1_000_000
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"ranking": [0, 1], junk: 1}) + "\n")
    with pytest.raises(ValueError) as e:
        RankingData.from_jsonl(p)
    assert len(str(e.value)) < 500
    p = tmp_path / "x.soi"
    p.write_text(f"# NUMBER ALTERNATIVES: 3\n1: {{1,2{junk}\n")
    with pytest.raises(ValueError) as e:
        RankingData.from_preflib(p)
    assert len(str(e.value)) < 500
    with pytest.raises(ValueError) as e:
        RankingData.from_rankings([["a", "b"], ["b", junk + "1", junk + "1"]])
    assert len(str(e.value)) < 500


# ----------------------------------------------------------------------------------------
# emdpo fit / bench: one line, exit 1 or 2, never a traceback

GOOD = '{"ranking": [0, 1, 2]}\n{"ranking": [2, 1, 0]}\n{"ranking": [1, 0, 2]}\n'

CLI_CASES = [
    # (name, file content, extra arguments, what the one-line message must match)
    ("id beyond int64", '{"ranking": [0, 99999999999999999999999]}\n' + GOOD, [],
     r"x\.jsonl:1:"),
    ("id 1e12", '{"ranking": [0, 1000000000000]}\n' + GOOD, [], r"items.*1000000000000"),
    ("400-digit weight", '{"ranking": [0, 1, 2], "weight": 1' + "0" * 400 + '}\n' + GOOD, [],
     r"x\.jsonl:1:.*weight"),
    ("deep JSON", "[" * 100_000 + "]" * 100_000 + "\n" + GOOD, [], r"x\.jsonl:1:"),
    ("overflowing weights", '{"ranking": [0, 1, 2], "weight": 1e308}\n' * 2 + GOOD, [],
     r"weight"),
    ("unprintable names", '{"ranking": ["\\ud800", "b", "c"]}\n{"ranking": ["c", "b", '
     '"\\ud800"]}\n{"ranking": ["b", "c", "\\ud800"]}\n', [], r"x\.jsonl:1:"),
    ("negative --top", GOOD, ["--top", "-3"], r"--top"),
    ("invalid UTF-8", GOOD.encode() + b'{"ranking": [0, \xff 1]}\n', [],
     r"x\.jsonl:4:.*UTF-8"),
]


@pytest.mark.parametrize("name, content, extra, match", CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])
def test_fit_ends_bad_input_with_one_line(tmp_path, capsys, name, content, extra, match):
    p = tmp_path / "x.jsonl"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        rc = main(["fit", str(p), "--types", "1", "--restarts", "1", *extra])
    except SystemExit as e:           # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc in (1, 2), (rc, err[-500:])
    assert len(err.splitlines()) == 1 and len(err) < 500, err[-1000:]
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_preflib_count_beyond_int64_is_an_error(tmp_path, capsys):
    p = tmp_path / "x.soi"
    p.write_text("# NUMBER ALTERNATIVES: 3\n99999999999999999999999: 1,2,3\n1: 2,1,3\n")
    assert main(["fit", str(p), "--types", "1", "--restarts", "1"]) == 1
    err = capsys.readouterr().err
    assert "99999999999999999999999" in err and len(err.strip().splitlines()) == 1


def test_fit_types_range_of_a_billion_fails_at_once(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(GOOD)
    r = _run_limited("import sys; from emdpo_core.cli import main; "
                     f"sys.exit(main(['fit', {str(p)!r}, '--types', '1-1000000000']))")
    assert r.returncode in (1, 2), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr
    assert "--types" in r.stderr


def test_bench_output_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["bench", "--quick", "--only", "regret", "--output",
               str(blocker / "sub" / "b.csv")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "copy bandwidth" not in captured.out     # nothing was measured
    assert "--output" in captured.err and len(captured.err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------
# Truncated PrefLib files


def test_truncated_preflib_file_warns_with_the_counts(tmp_path):
    p = tmp_path / "x.soc"
    p.write_text("# NUMBER ALTERNATIVES: 3\n# NUMBER VOTERS: 10\n# NUMBER UNIQUE ORDERS: 4\n"
                 "3: 1,2,3\n2: 2,1,3\n")
    with pytest.warns(UserWarning, match=r"(?s)(10 voters.*5)|(4 unique orders.*2)"):
        RankingData.from_preflib(p)


def test_truncated_old_format_preflib_file_warns(tmp_path):
    p = tmp_path / "x.soc"
    p.write_text("3\n1,A\n2,B\n3,C\n10,10,4\n3,1,2,3\n2,2,1,3\n")
    with pytest.warns(UserWarning, match=r"10"):
        RankingData.from_preflib(p)


def test_a_complete_preflib_file_does_not_warn(tmp_path):
    p = tmp_path / "x.soc"
    p.write_text("# NUMBER ALTERNATIVES: 3\n# NUMBER VOTERS: 5\n# NUMBER UNIQUE ORDERS: 2\n"
                 "3: 1,2,3\n2: 2,1,3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankingData.from_preflib(p)


# ----------------------------------------------------------------------------------------
# Messages that name the argument and the real value


def _small_estep_inputs():
    rng = np.random.default_rng(0)
    return rng.normal(-40, 3, size=(2, 9)), np.zeros(9), np.array([0, 3, 5, 9])


@pytest.mark.parametrize("lw", [["a", "b"], None, "ab", {"a": 1}])
def test_log_weights_of_the_wrong_kind_name_the_argument(lw):
    p, ref, off = _small_estep_inputs()
    with pytest.raises(TypeError, match="log_weights"):
        ec.e_step(p, ref, off, [0, 3], lw, beta=0.1)


def test_float_offsets_beyond_int64_report_the_real_value():
    p, ref, _ = _small_estep_inputs()
    with pytest.raises(ValueError) as e:
        ec.listwise_loglik(p, ref, np.array([0.0, 3.0, 5.0, 1e19]), beta=0.1)
    assert "offsets" in str(e.value) and "1e+19" in str(e.value)
    assert "-9223372036854775808" not in str(e.value)


def test_unsigned_ids_beyond_int64_report_the_real_value():
    with pytest.raises(ValueError) as e:
        ec.group_by_annotator(np.array([0, 2 ** 64 - 1], dtype=np.uint64))
    assert "18446744073709551615" in str(e.value) and "annotator_ids" in str(e.value)
    p, ref, _ = _small_estep_inputs()
    with pytest.raises(ValueError) as e:
        ec.listwise_loglik(p, ref, np.array([0, 3, 5, 2 ** 64 - 1], dtype=np.uint64), beta=0.1)
    assert "18446744073709551615" in str(e.value) and "offsets" in str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".soc"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, suffix):
    p = tmp_path / f"x{suffix}"
    if suffix == ".jsonl":
        p.write_bytes(GOOD.encode() + b'{"ranking": [0, 1, "\xff"]}\n')
        line = 4
    else:
        p.write_bytes(b"# NUMBER ALTERNATIVES: 3\n# ALTERNATIVE NAME 1: \xff\n1: 1,2,3\n")
        line = 2
    with pytest.raises(ValueError, match=rf"x{suffix}:{line}:.*UTF-8"):
        RankingData.from_jsonl(p) if suffix == ".jsonl" else RankingData.from_preflib(p)


def test_nan_in_mixture_responsibilities_names_record_and_type():
    torch = pytest.importorskip("torch")
    import emdpo_core.torch as et

    p = torch.randn(2, 9, dtype=torch.float64)
    ref = torch.zeros(9, dtype=torch.float64)
    resp = torch.full((3, 2), 0.5, dtype=torch.float64)
    resp[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"responsibilities.*\(2, 0\)"):
        et.mixture_dpo_loss(p, ref, torch.tensor([0, 3, 5, 9]), resp, beta=0.1)


def test_uint8_offsets_with_reduction_none_work_end_to_end():
    torch = pytest.importorskip("torch")
    import emdpo_core.torch as et

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(9, dtype=torch.float64, generator=gen)
    ref = torch.randn(9, dtype=torch.float64, generator=gen)
    grads = []
    for dtype in (torch.int64, torch.uint8):
        x = p.clone().requires_grad_(True)
        loss = et.listwise_dpo_loss(x, ref, torch.tensor([0, 3, 5, 9], dtype=dtype), beta=0.1,
                                    reduction="none")
        loss.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_sparse_inputs_are_refused_by_name():
    torch = pytest.importorskip("torch")
    p = torch.randn(2, 9, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"policy_logps.*sparse"):
        ec.listwise_loglik(p.to_sparse(), torch.zeros(9, dtype=torch.float64),
                           torch.tensor([0, 3, 5, 9]), beta=0.1)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match=r"policy_logps.*sparse"):
        ec.listwise_loglik(scipy_sparse.csr_matrix(p.numpy()), np.zeros(9),
                           np.array([0, 3, 5, 9]), beta=0.1)


def test_a_huge_alpha_gives_finite_weights_or_names_alpha():
    data = _planted(n=40)
    try:
        m = PlackettLuceMixture(2, alpha=1e308, random_state=0, max_iter=5).fit(data)
    except ValueError as e:
        assert "alpha" in str(e)
    else:
        # a Dirichlet prior that strong pins the weights at uniform
        np.testing.assert_allclose(m.weights_, [0.5, 0.5], rtol=1e-12)


def test_emdpo_without_a_family_says_so():
    pytest.importorskip("torch")
    from emdpo_core.datasets import make_population

    pop = make_population(2, n_annotators=10, records_per_annotator=2, n_prompts=5,
                          random_state=0)
    with pytest.raises((TypeError, ValueError), match=r"policies.*None"):
        ec.EMDPO(2, None).fit(pop.data)


def test_aggregate_with_no_contexts_says_so():
    torch = pytest.importorskip("torch")
    from emdpo_core.datasets import make_population

    pop = make_population(2, n_annotators=20, records_per_annotator=2, n_prompts=5,
                          random_state=0)
    fam = ec.TorchPolicies(pop.policy_module(), beta=pop.beta, optimizer="lbfgs", steps=1,
                           init_steps=1)
    m = ec.EMDPO(2, fam, max_iter=2, random_state=0).fit(pop.data)
    with pytest.raises(ValueError, match="contexts"):
        m.aggregate({"prompt": torch.zeros(0, dtype=torch.long)}, solver="hedge")


def test_hedge_survives_huge_regrets():
    R = np.array([[0.0, 1e308], [1e308, 0.0]])
    res = ec.mmra(R, solver="hedge")
    assert np.all(np.isfinite(res.weights)) and np.isfinite(res.max_regret)
    np.testing.assert_allclose(res.weights, [0.5, 0.5], atol=1e-3)


# ----------------------------------------------------------------------------------------
# Threads (docs/guarantees.md): concurrent calls on shared inputs equal a serial call bitwise


def test_kernels_called_from_many_threads_match_a_serial_call():
    rng = np.random.default_rng(12)
    N, K = 5000, 3                        # > 2048 records: the kernels' parallel path
    off, _ = random_layout(rng, N, 2, 5, partial=False)
    p, ref = random_logps(rng, K, int(off[-1]), center=-30, scale=2)
    ao = np.concatenate([[0], np.sort(rng.choice(np.arange(1, N), 400, replace=False)), [N]])
    lw = np.log(np.full(K, 1.0 / K))

    def call():
        r = ec.e_step(p, ref, off, ao, lw, beta=0.7)
        loss, grad = ec.listwise_dpo_loss_and_grad(p[0], ref, off, beta=0.7)
        return r.responsibilities.tobytes(), r.loglik, loss, grad.tobytes()

    serial = call()
    results = [None] * 8

    def worker(i):
        results[i] = [call() for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == serial for rs in results for r in rs)
