"""EMDPOTrainer on tiny random causal LMs: planted types, M-step normalisation, checkpoints,
one copy of the base, aggregation by generation.

The planted population: words w0..w9 are "A" words, w10..w19 "B" words. Every response has
three words; its feature is its number of A words c in 0..3. Annotators of type 0 rank
responses by decreasing c, annotators of type 1 by increasing c (opposed preferences over
an observable feature). Each annotator ranks 6 triples with distinct c.
"""

from __future__ import annotations

import importlib.util
import zlib

import numpy as np
import pytest

from hf_utils import require_hf

require_hf()
pytest.importorskip("peft")

import torch  # noqa: E402

from hf_utils import tiny_model, tiny_tokenizer  # noqa: E402

from emdpo_core.datasets import adjusted_rand_index  # noqa: E402

A_WORDS = [f"w{i}" for i in range(10)]
B_WORDS = [f"w{i}" for i in range(10, 20)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Tiny models: one torch thread (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def planted_rows(rng, n_annotators, rankings_per_annotator, *, prefix="a"):
    """Ranked rows of the planted population and the true type of each annotator (sorted
    annotator ids, so types[h] goes with trainer.annotator_ids_[h])."""
    rows, types = [], []

    def response(n_a):
        words = list(rng.choice(A_WORDS, n_a)) + list(rng.choice(B_WORDS, 3 - n_a))
        rng.shuffle(words)
        return " " + " ".join(words)

    for h in range(n_annotators):
        t = h % 2
        types.append(t)
        for _ in range(rankings_per_annotator):
            counts = rng.choice(4, 3, replace=False)
            responses = [response(int(c)) for c in counts]
            order = np.argsort(-counts if t == 0 else counts, kind="stable")
            prompt = " ".join(f"w{i}" for i in rng.integers(20, 120, 3))
            rows.append({"prompt": prompt, "responses": [responses[j] for j in order],
                         "annotator": f"{prefix}{h:03d}"})
    return rows, np.array(types)


def lora_config(r=8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, lora_dropout=0.0)


def make_trainer(tmp_path, rows, *, n_types=2, eval_rows=None, full=False, **overrides):
    from emdpo_core.hf import EMDPOConfig, EMDPOTrainer

    kw = dict(n_types=n_types, beta=1.0, em_iterations=4, learning_rate=1e-2,
              per_device_train_batch_size=16, per_device_eval_batch_size=64,
              save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
              logging_strategy="no", full_parameter_types=full)
    kw.update(overrides)
    args = EMDPOConfig(str(tmp_path), **kw)
    return EMDPOTrainer(model=tiny_model(seed=0), args=args, train_dataset=rows,
                        eval_dataset=eval_rows, processing_class=tiny_tokenizer(),
                        peft_config=None if full else lora_config())


def pairwise_order_accuracy(trainer, rows, k):
    """Fraction of ranked pairs of ``rows`` that type k's implicit reward orders right."""
    metrics = trainer.evaluate(rows, metric_key_prefix="held")
    return metrics[f"held_type{k}_accuracy"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(_seed("planted"))
    rows, types = planted_rows(rng, 24, 6)
    held_rng = np.random.default_rng(_seed("held-out"))
    held = {t: [r for r, tt in zip(*_held(held_rng)) if tt == t] for t in (0, 1)}
    em = make_trainer(tmp_path_factory.mktemp("em"), rows)
    em.train()
    single = make_trainer(tmp_path_factory.mktemp("single"), rows, n_types=1)
    single.train()
    return rows, types, held, em, single


def _held(rng):
    rows, types = planted_rows(rng, 8, 5, prefix="h")
    row_types = np.repeat(types, 5)
    return rows, row_types


def test_planted_types_are_recovered(planted):
    rows, types, held, em, single = planted
    assert em.responsibilities_.shape == (24, 2)
    assert em.annotator_ids_ == sorted(f"a{h:03d}" for h in range(24))
    assert np.allclose(em.responsibilities_.sum(1), 1.0)
    assert adjusted_rand_index(types, em.predict_types()) >= 0.9
    assert em.weights_.shape == (2,) and abs(em.weights_.sum() - 1) < 1e-9
    # The observed-data log-likelihood rises over the EM iterations.
    assert em.loglik_history_[-1] > em.loglik_history_[0]
    assert len(em.loglik_history_) == 4
    # Every type's adapter was trained (LoRA B starts at zero).
    for k in range(2):
        b = [p for n, p in em.model.named_parameters() if f"lora_B.type_{k}." in n]
        assert b and all(float(p.detach().abs().sum()) > 0 for p in b)


def test_types_order_their_annotators_better_than_single_dpo(planted):
    rows, types, held, em, single = planted
    labels = em.predict_types()
    for t in (0, 1):
        k = int(np.bincount(labels[types == t], minlength=2).argmax())   # type t's adapter
        own = pairwise_order_accuracy(em, held[t], k)
        base = pairwise_order_accuracy(single, held[t], 0)
        assert own > base + 0.1, (t, own, base)
        assert own > 0.7, (t, own)


def test_eval_metrics_per_type(planted):
    rows, types, held, em, single = planted
    m = em.evaluate(held[0] + held[1])
    for k in range(2):
        assert 0.0 <= m[f"eval_type{k}_accuracy"] <= 1.0
        assert np.isfinite(m[f"eval_type{k}_margin"])
        assert abs(m[f"eval_weight_{k}"] - em.weights_[k]) < 1e-12
    assert np.isfinite(m["eval_loglik"]) and m["eval_loglik"] < 0


def test_micro_batches_add_up_to_the_full_m_step(tmp_path):
    rng = np.random.default_rng(_seed("micro"))
    rows, _ = planted_rows(rng, 6, 3)
    tr = make_trainer(tmp_path, rows, init="random")
    tr._initialize_em()
    params = [p for p in tr.model.parameters() if p.requires_grad]
    rows_idx = [dict(r, row_index=i) for i, r in enumerate(rows)]

    def grads(chunks):
        for p in params:
            p.grad = None
        total = 0.0
        for chunk in chunks:
            batch = tr._prepare_inputs(tr.data_collator(chunk))
            loss = tr._m_step_objective(tr.model, batch)
            loss.backward()
            total += float(loss)
        return total, [p.grad.clone() for p in params]

    full_loss, full = grads([rows_idx])
    parts_loss, parts = grads([rows_idx[i:i + 5] for i in range(0, len(rows_idx), 5)])
    # float32 forward passes of different batch shapes: ~1e-6 relative differences.
    assert abs(full_loss - parts_loss) <= 1e-5 * abs(full_loss)
    for a, b in zip(full, parts):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The full-data objective is sum_k weighted mean of -ll: with K types each term is a
    # weighted average, so its value lies between K * min(-ll) and K * max(-ll).
    assert full_loss > 0


def test_k1_loss_is_the_mean_dpo_loss(tmp_path):
    """With one type every weight is 1/N: compute_loss on a full batch is the mean listwise
    DPO loss, which for pairs is TRL's sigmoid DPO loss."""
    import torch.nn.functional as F

    rng = np.random.default_rng(_seed("k1"))
    rows = [{"prompt": f"w{20 + i}", "responses": [" w1 w2", " w11 w12"],
             "annotator": f"a{i}"} for i in range(4)]
    rows += [{"prompt": f"w{40 + i}", "responses": [" w3", " w13 w14"],
              "annotator": f"a{i}"} for i in range(4)]
    rng.shuffle(rows)
    tr = make_trainer(tmp_path, rows, n_types=1, per_device_train_batch_size=8)
    tr._initialize_em()
    batch = tr._prepare_inputs(tr.data_collator([dict(r, row_index=i)
                                                 for i, r in enumerate(rows)]))
    loss = tr.compute_loss(tr.model, batch)
    from emdpo_core.hf import sequence_logps

    with torch.no_grad(), tr.model.disable_adapter():
        ref = sequence_logps(tr.model, batch)
    tr.model.set_adapter("type_0")
    pol = sequence_logps(tr.model, batch)
    margin = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    expected = -F.logsigmoid(1.0 * margin).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_one_copy_of_the_base(tmp_path):
    rng = np.random.default_rng(_seed("one-copy"))
    rows, _ = planted_rows(rng, 4, 2)
    base = tiny_model(seed=0)
    n_base = sum(p.numel() for p in base.parameters())
    tr = make_trainer(tmp_path, rows, n_types=3)
    model = tr.model
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in base_params) == n_base
    assert len({p.data_ptr() for p in base_params}) == len(base_params)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora) and not any(p.requires_grad for p in base_params)
    per_type = {k: sum(p.numel() for n, p in model.named_parameters() if f".type_{k}." in n)
                for k in range(3)}
    assert len(set(per_type.values())) == 1 and sum(per_type.values()) == sum(
        p.numel() for p in lora)
    # The trainer's optimizer trains all K adapters.
    opt = tr.create_optimizer()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in lora}


def test_resume_mid_m_step_gives_the_same_result(tmp_path):
    rng = np.random.default_rng(_seed("resume"))
    rows, _ = planted_rows(rng, 6, 4)
    common = dict(em_iterations=2, e_step_every=3, per_device_train_batch_size=4,
                  save_strategy="steps", save_steps=1, reinit_types=True)
    a = make_trainer(tmp_path / "a", rows, **common)
    a.train()
    # Stopped after step 4: in the middle of the second M-step (steps 4..6), after the
    # E-step and re-initialisation of step 3.
    b = make_trainer(tmp_path / "b", rows, **common)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    np.testing.assert_allclose(b.responsibilities_, a.responsibilities_, rtol=0, atol=1e-12)
    assert b.loglik_history_ == pytest.approx(a.loglik_history_, rel=1e-12)
    sa, sb = a._types.state_dict(), b._types.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=0, atol=0)


def test_damaged_state_is_refused(tmp_path):
    rng = np.random.default_rng(_seed("damaged"))
    rows, _ = planted_rows(rng, 4, 2)
    tr = make_trainer(tmp_path, rows, em_iterations=1)
    tr.train()
    tr.save_em_state(str(tmp_path / "state"))
    tr.load_em_state(str(tmp_path / "state"))                      # round trip
    path = tmp_path / "state" / "emdpo_state.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="emdpo_state.npz"):
        tr.load_em_state(str(tmp_path / "state"))
    tr.save_em_state(str(tmp_path / "state"))
    tpath = tmp_path / "state" / "emdpo_types.safetensors"
    blob = bytearray(tpath.read_bytes())
    blob[-1] ^= 0xFF
    tpath.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        tr.load_em_state(str(tmp_path / "state"))
    other, _ = planted_rows(rng, 5, 2)
    tr2 = make_trainer(tmp_path / "other", other, em_iterations=1)
    tr.save_em_state(str(tmp_path / "state"))
    with pytest.raises(ValueError, match="another training set"):
        tr2.load_em_state(str(tmp_path / "state"))


def test_full_parameter_types(tmp_path):
    rng = np.random.default_rng(_seed("full"))
    rows, types = planted_rows(rng, 8, 4)
    tr = make_trainer(tmp_path, rows, full=True, em_iterations=2, learning_rate=1e-3)
    ref_before = [p.detach().clone() for p in tr.model.reference_model.parameters()]
    tr.train()
    assert tr.responsibilities_.shape == (8, 2)
    for before, p in zip(ref_before, tr.model.reference_model.parameters()):
        assert torch.equal(before, p)                                # the reference is frozen
    moved = [not torch.equal(a, b) for a, b in zip(tr.model.types[0].parameters(),
                                                    tr.model.reference_model.parameters())]
    assert any(moved)
    if importlib.util.find_spec("cvxpy") is None:
        return
    from emdpo_core.hf import MixtureLM, sequence_logps

    mix = tr.aggregate([rows[0]["prompt"], rows[1]["prompt"]], n_samples=2, max_new_tokens=3)
    mix.save(str(tmp_path / "full-policy"))
    loaded = MixtureLM.load(str(tmp_path / "full-policy"), tiny_model(seed=0), tiny_tokenizer())
    np.testing.assert_array_equal(loaded.weights, mix.weights)
    batch = tr.data_collator([dict(rows[0], row_index=0)])
    with torch.no_grad():
        for j in range(2):
            torch.testing.assert_close(sequence_logps(loaded._types.model.types[j], batch),
                                       sequence_logps(tr.model.types[j], batch))


def test_bad_arguments(tmp_path):
    from emdpo_core.hf import EMDPOConfig, EMDPOTrainer

    rng = np.random.default_rng(_seed("bad"))
    rows, _ = planted_rows(rng, 3, 2)
    with pytest.raises(ValueError, match="n_types"):
        EMDPOConfig(str(tmp_path), n_types=0)
    with pytest.raises(ValueError, match="beta"):
        EMDPOConfig(str(tmp_path), beta=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        EMDPOConfig(str(tmp_path), max_steps=10)
    with pytest.raises(ValueError, match="init"):
        EMDPOConfig(str(tmp_path), init="spectral")
    args = EMDPOConfig(str(tmp_path), n_types=2, report_to=[])
    with pytest.raises(ValueError, match="peft_config"):
        EMDPOTrainer(model=tiny_model(), args=args, train_dataset=rows,
                     processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="exceeds the number of annotators"):
        EMDPOTrainer(model=tiny_model(), args=EMDPOConfig(str(tmp_path), n_types=5,
                                                          report_to=[]),
                     train_dataset=rows, processing_class=tiny_tokenizer(),
                     peft_config=lora_config())
    with pytest.raises(ValueError, match="init_responsibilities"):
        EMDPOTrainer(model=tiny_model(), args=args, train_dataset=rows,
                     processing_class=tiny_tokenizer(), peft_config=lora_config(),
                     init_responsibilities=np.ones((2, 2)))
    bad = [dict(rows[0], responses=["only one"])]
    with pytest.raises(ValueError, match="row 0"):
        EMDPOTrainer(model=tiny_model(), args=args, train_dataset=bad,
                     processing_class=tiny_tokenizer(), peft_config=lora_config())


def test_aggregate_by_generation_and_serving(planted, tmp_path):
    pytest.importorskip("cvxpy")
    from emdpo_core.hf import MixtureLM

    rows, types, held, em, single = planted
    prompts = [r["prompt"] for r in rows[:4]]
    mix = em.aggregate(prompts, n_samples=3, max_new_tokens=4, random_state=0)
    assert mix.weights.shape == (2,) and abs(mix.weights.sum() - 1) < 1e-9
    assert np.all(mix.weights >= 0)
    R = mix.regret_matrix
    assert R.shape == (2, 2) and np.allclose(np.diag(R), 0.0)      # reward regret: A_kk - A_kk
    assert mix.max_regret == pytest.approx(float(np.max(R @ mix.weights)), abs=1e-6)
    again = em.aggregate(prompts, n_samples=3, max_new_tokens=4, random_state=0)
    np.testing.assert_allclose(again.regret_matrix, R, rtol=0, atol=1e-12)   # seeded sampling
    answer = mix.generate(prompts[0], max_new_tokens=3)
    assert isinstance(answer, str) and mix.last_type in (0, 1)

    # Save, load onto a fresh base, and answer with the same adapters.
    mix.save(str(tmp_path / "policy"))
    loaded = MixtureLM.load(str(tmp_path / "policy"), tiny_model(seed=0), tiny_tokenizer(),
                            random_state=0)
    np.testing.assert_array_equal(loaded.weights, mix.weights)
    from emdpo_core.hf import sequence_logps

    batch = em.data_collator([dict(rows[0], row_index=0)])
    for j in range(2):
        a = sequence_logps(em._types.module_for(j, em.model), batch)
        b = sequence_logps(loaded._types.module_for(j, loaded._types.model), batch)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    em._types.make_trainable()
    assert isinstance(loaded.generate(prompts[1], max_new_tokens=3), str)
    # A damaged file is refused, naming it.
    target = next(p for p in (tmp_path / "policy").rglob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:-3])
    with pytest.raises(ValueError, match="checksum mismatch"):
        MixtureLM.load(str(tmp_path / "policy"), tiny_model(seed=0), tiny_tokenizer())
    (tmp_path / "policy" / "mixture.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged manifest"):
        MixtureLM.load(str(tmp_path / "policy"), tiny_model(seed=0), tiny_tokenizer())


def test_fast_adapter_switch_matches_peft_set_adapter(planted):
    from emdpo_core.hf import sequence_logps

    rows, types, held, em, single = planted
    batch = em.data_collator([dict(r, row_index=i) for i, r in enumerate(rows[:6])])
    with torch.no_grad():
        for k in (1, 0, 1):
            fast = sequence_logps(em._types.module_for(k, em.model), batch)
            em.model.set_adapter(f"type_{k}")
            torch.testing.assert_close(fast, sequence_logps(em.model, batch), rtol=0, atol=0)
            assert em.model.active_adapter == f"type_{k}"
    em._types.make_trainable()


def test_prefix_sharing_is_the_default_where_the_model_supports_it(tmp_path):
    """The trainer's own passes encode each prompt once per ranked list by default on a
    model that supports it (a Llama), say so in ``layout_``, and give the same reference
    log-probabilities as the padded layout."""
    from emdpo_core.hf import EMDPOConfig

    rng = np.random.default_rng(_seed("prefix-default"))
    rows, _ = planted_rows(rng, 4, 2)
    auto = make_trainer(tmp_path / "auto", rows)
    padded = make_trainer(tmp_path / "padded", rows, prefix_sharing=False)
    assert auto.layout_ == "prefix_shared"
    assert padded.layout_ == "padded"
    lp_auto = auto._pass_logps(auto.train_dataset, auto._layout, "train", reference=True)
    lp_padded = padded._pass_logps(padded.train_dataset, padded._layout, "train",
                                   reference=True)
    # float32 forward passes of the same model over differently packed sequences: the
    # tolerance of the prefix-sharing parity tests (tests/test_hf_prefix_sharing.py).
    torch.testing.assert_close(lp_auto, lp_padded, rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError, match="prefix_sharing"):
        EMDPOConfig(str(tmp_path), prefix_sharing="yes")
