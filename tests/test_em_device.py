"""The EM engine keeps a torch family's E-step outputs on the policies' device: the same fit
as the host path (NumPy responsibilities, Numba record weights), only K-sized values to the
host per iteration, dropped types handled there, checkpoints unchanged."""

import os

import numpy as np
import pytest
from conftest import DEVICES

import emdpo_core as ec
from emdpo_core.em import _responsibilities

torch = pytest.importorskip("torch", reason="the torch policy family needs torch")


# Tiny models: one torch thread (see conftest.single_torch_thread).
pytestmark = [pytest.mark.filterwarnings("ignore::emdpo_core.ConvergenceWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


class HostPolicies(ec.TorchPolicies):
    """TorchPolicies whose log-probabilities reach the engine as NumPy arrays: the engine's
    host path (NumPy E-step outputs, Numba record weights handed to the family as NumPy)."""

    tensor_weights = False

    def logps(self, data):
        lp = super().logps(data)
        return lp._replace(policy=lp.policy.cpu().numpy(), ref=lp.ref.cpu().numpy())


def population(seed, H=60, records=4, K=2, weighted=None):
    """A synthetic population; ``weighted``: "records" gives rows repeated within their
    annotator (c_i != 1), "annotators" rows that are each their own annotator, repeated
    (v_h != 1)."""
    from emdpo_core.datasets import make_population

    pop = make_population(K, n_annotators=H, records_per_annotator=records, n_prompts=15,
                          n_responses=5, n_features=4, reward_scale=2.5, random_state=seed)
    if weighted is not None:
        d = pop.data
        rng = np.random.default_rng(seed)
        pop.data = ec.PreferenceData(
            d.offsets, d.inputs, ref_logps=d.ref_logps, n_ranked=d.n_ranked,
            annotator=d.annotator if weighted == "records" else None, features=d.features,
            sample_weight=rng.integers(1, 4, d.n_records))
    return pop


def family(pop, cls=ec.TorchPolicies, device="cpu", **kw):
    params = dict(beta=pop.beta, optimizer="lbfgs", lr=1.0, steps=1, init_steps=2)
    params.update(kw)
    return cls(pop.policy_module().to(device), **params)


def thetas(model):
    return np.stack([m.theta.detach().cpu().numpy() for m in model.family_.modules])


def assert_same_fit(a, b, **tol):
    check = np.testing.assert_allclose if tol else np.testing.assert_array_equal
    for name in ("lower_bounds_", "weights_", "responsibilities_"):
        check(getattr(a, name), getattr(b, name), err_msg=name, **tol)
    check(thetas(a), thetas(b), err_msg="theta", **tol)
    assert a.dropped_components_ == b.dropped_components_
    assert a.n_iter_ == b.n_iter_


# ----------------------------------------------------------------------------------------
# The routines, NumPy against torch


@pytest.mark.parametrize("device", DEVICES)
def test_record_weights_type_totals_and_kept_types_match_the_host(device):
    rng = np.random.default_rng(3)
    H, K = 40, 4
    counts = rng.integers(0, 5, H)                  # annotators with no records too
    ao = np.concatenate([[0], np.cumsum(counts)])
    N = int(ao[-1])
    resp = rng.dirichlet(np.ones(K), size=H)
    resp[5] = [0.0, 0.0, 0.3, 0.7]                  # wholly of types that get dropped
    c, v = rng.uniform(0.5, 3.0, N), rng.uniform(0.5, 3.0, H)

    class Layout:
        annotator_offsets, record_weight, annotator_weight = ao, c, v
        offsets, n_ranked = np.arange(N + 1) * 2, np.ones(N, dtype=np.int64)
        n_annotators, unit_record_weight, unit_annotator_weight = H, False, False

    arrays = _responsibilities.GroupedArrays(Layout)
    host = arrays.record_weights(resp)
    on_device = arrays.record_weights(torch.as_tensor(resp, device=device))
    assert on_device.device.type == device and on_device.dtype == torch.float64
    # The same products c_i v_{a_i} g_{a_i k}: bit for bit.
    np.testing.assert_array_equal(on_device.cpu().numpy(), host)
    assert host.shape == (K, N)

    # Sums in another order: equal to float64 rounding of H terms.
    np.testing.assert_allclose(
        _responsibilities.type_totals(torch.as_tensor(resp, device=device), v),
        _responsibilities.type_totals(resp, v), rtol=1e-13)

    keep, fill = np.array([0, 1]), np.array([0.25, 0.75])
    want = _responsibilities.keep_types(resp.copy(), keep, fill)
    got = _responsibilities.keep_types(torch.as_tensor(resp, device=device), keep, fill)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(want[5], fill)
    np.testing.assert_allclose(want.sum(axis=1), 1.0, rtol=1e-15)


# ----------------------------------------------------------------------------------------
# Whole fits: the device path against the host path


@pytest.mark.parametrize("weighted", [None, "records", "annotators"])
def test_device_path_fits_exactly_like_the_host_path_on_cpu_tensors(weighted):
    pop = population(1, weighted=weighted)
    g = pop.data.grouped()
    assert (g.unit_record_weight, g.unit_annotator_weight) == (
        weighted != "records", weighted != "annotators")
    kw = dict(max_iter=6, tol=0.0, n_init=2, random_state=4)
    device = ec.EMDPO(2, family(pop), **kw).fit(pop.data)
    host = ec.EMDPO(2, family(pop, HostPolicies), **kw).fit(pop.data)
    assert device.n_iter_ == 6
    assert_same_fit(device, host)
    np.testing.assert_array_equal(device.predict_proba(pop.data), host.predict_proba(pop.data))
    np.testing.assert_array_equal(device.score_samples(pop.data), host.score_samples(pop.data))


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_on_each_device_matches_the_host_path(device):
    pop = population(2)
    kw = dict(max_iter=5, tol=0.0, random_state=0)
    fit = ec.EMDPO(2, family(pop, device=device), **kw).fit(pop.data)
    host = ec.EMDPO(2, family(pop, HostPolicies), **kw).fit(pop.data)
    assert fit.family_.device.type == device
    assert isinstance(fit.responsibilities_, np.ndarray)
    if device == "cpu":
        assert_same_fit(fit, host)
    else:
        # The same float64 math with the kernel's and the optimizer's reductions in another
        # order on the GPU (the CPU-vs-CUDA bound of tests/test_emdpo.py).
        assert_same_fit(fit, host, rtol=1e-6, atol=1e-8)


def collapsing_start(pop, K=3):
    """Initial responsibilities: the planted types in columns 0 and 1, a third type sharing
    0.3 of everyone; it loses its annotators to the planted types and collapses."""
    H = pop.data.grouped().n_annotators
    types = pop.annotator_types
    r = np.full((H, K), 0.05)
    r[np.arange(H), types] = 0.65
    r[:, 2] = 0.3
    return r


@pytest.mark.parametrize("device", DEVICES)
def test_a_type_collapsing_during_the_iteration_is_dropped_on_the_device(device):
    pop = population(5, H=80)
    kw = dict(max_iter=6, tol=0.0, random_state=0, init_params=collapsing_start(pop),
              min_weight=0.2)
    with pytest.warns(ec.CollapsedComponentWarning):
        fit = ec.EMDPO(3, family(pop, device=device), **kw).fit(pop.data)
    with pytest.warns(ec.CollapsedComponentWarning):
        host = ec.EMDPO(3, family(pop, HostPolicies), **kw).fit(pop.data)
    # Dropped inside the iteration (not at the start), where resp lives on the device.
    assert fit.dropped_components_ and fit.dropped_components_[0][0] >= 1
    assert fit.n_components_ == 2 and fit.responsibilities_.shape[1] == 2
    # After the drop, the type totals are sums in another order (float64 rounding, carried
    # through the remaining iterations); on a GPU also the kernels' and the optimizer's
    # reductions (the CPU-vs-CUDA bound of test_device_path_on_each_device_...).
    tol = dict(rtol=1e-9, atol=1e-12) if device == "cpu" else dict(rtol=1e-6, atol=1e-8)
    assert_same_fit(fit, host, **tol)


# ----------------------------------------------------------------------------------------
# What crosses to the host


class HostCopies:
    """Records every tensor -> host conversion made from the EM package (em/). On the CPU the
    ops layer's are left out: its CPU kernels run on zero-copy NumPy views of CPU tensors. On
    a GPU they count: e.g. checking index arrays that are not the same tensors every
    iteration would copy them back each time."""

    def __init__(self, monkeypatch, device):
        self.calls = []
        em_dir = os.path.dirname(_responsibilities.__file__) + os.sep
        ops_dir = os.path.join(os.path.dirname(em_dir.rstrip(os.sep)), "ops") + os.sep
        skip_ops = device == "cpu"
        import sys

        for name in ("numpy", "cpu", "tolist", "item"):
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, _name=name, **kw):
                f, files = sys._getframe(1), []
                while f is not None:
                    files.append(f.f_code.co_filename)
                    f = f.f_back
                if any(x.startswith(em_dir) for x in files) and \
                        not (skip_ops and any(x.startswith(ops_dir) for x in files)):
                    self.calls.append((_name, tuple(t.shape)))
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)

    def large(self, size):
        """The conversions of ``size`` values or more; x.cpu().numpy() counts once."""
        out = []
        for i, (name, shape) in enumerate(self.calls):
            if name == "numpy" and i and self.calls[i - 1] == ("cpu", shape):
                continue
            if int(np.prod(shape)) >= size:
                out.append((name, shape))
        return out


@pytest.mark.parametrize("device", DEVICES)
def test_only_k_sized_values_reach_the_host_per_iteration(device, monkeypatch):
    pop = population(6, H=50)
    g = pop.data.grouped()
    H, N, K = g.n_annotators, g.n_records, 2
    weights_seen = []

    class Watched(ec.TorchPolicies):
        def m_step(self, data, weights):
            weights_seen.append((type(weights), getattr(weights, "device", None),
                                 tuple(weights.shape)))
            super().m_step(data, weights)

    large = {}
    for n_iter in (2, 6):
        weights_seen.clear()
        with monkeypatch.context() as m:
            copies = HostCopies(m, device)
            fit = ec.EMDPO(K, family(pop, Watched, device=device), max_iter=n_iter, tol=0.0,
                           random_state=0).fit(pop.data)
        assert fit.n_iter_ == n_iter
        # O(H) or O(N) values (K values and the kernel's status flags are O(1)).
        large[n_iter] = copies.large(min(H, N))
        assert copies.calls, "the recorder saw no conversion at all"
        # Every M-step got the (K, N) weights as a tensor on the policies' device.
        assert len(weights_seen) == n_iter
        for typ, dev, shape in weights_seen:
            assert issubclass(typ, torch.Tensor) and dev.type == device and shape == (K, N)
    # Nothing of the data's size per iteration: 6 iterations convert what 2 do (the fitted
    # responsibilities once at the end).
    assert large[6] == large[2]
    assert sum(shape in ((K, N), (N, K)) for _, shape in large[6]) == 0
    assert sum(shape == (H, K) for _, shape in large[6]) == 1


def test_tabular_family_keeps_the_host_path():
    truth = ec.PlackettLuceMixture.from_parameters([[2.0, 1, 0, -1], [-1.0, 0, 1, 2]],
                                                   [0.5, 0.5])
    data, _ = truth.sample(100, random_state=0)
    fit = ec.PlackettLuceMixture(2, max_iter=5, random_state=0).fit(data)
    assert isinstance(fit.responsibilities_, np.ndarray)
    assert not getattr(fit.family_, "tensor_weights", False)


def test_checkpoint_of_a_device_run_resumes_to_the_same_fit(tmp_path):
    pop = population(7)
    path = tmp_path / "ck.npz"
    kw = dict(max_iter=6, tol=0.0, random_state=3)
    full = ec.EMDPO(2, family(pop), **kw).fit(pop.data)

    def stop(info):
        if info["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ec.EMDPO(2, family(pop), checkpoint=path, checkpoint_every=1, **kw).fit(
            pop.data, callback=stop)
    with np.load(path) as f:
        assert f["run/resp"].dtype == np.float64 and f["run/resp"].shape[1] == 2
    resumed = ec.EMDPO.load(path, policies=family(pop)).fit(pop.data)
    assert_same_fit(resumed, full)
