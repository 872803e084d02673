"""The compiled loss inside TRL's DPOTrainer: parity with TRL's sigmoid loss (value and
parameter gradients), TRL's metrics kept, per-row weights honoured, unsupported settings
refused."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from hf_utils import require_hf

require_hf()
pytest.importorskip("peft")
pytest.importorskip("trl")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_utils import tiny_model, tiny_tokenizer  # noqa: E402

BETA = 0.5


# Tiny models: one torch thread (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair_rows(rng, n, weights=None):
    def text(k):
        return " ".join(f"w{int(i)}" for i in rng.integers(0, 120, size=k))

    rows = []
    for i in range(n):
        row = {"prompt": text(3), "chosen": " " + text(int(rng.integers(1, 4))),
               "rejected": " " + text(int(rng.integers(1, 4)))}
        if weights is not None:
            row["weight"] = float(weights[i])
        rows.append(row)
    import datasets

    return datasets.Dataset.from_list(rows)


def make(cls, tmp_path, ds, **kw):
    from peft import LoraConfig
    from trl import DPOConfig

    settings = dict(beta=BETA, per_device_train_batch_size=len(ds), report_to=[],
                    save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True,
                    bf16=False, gradient_checkpointing=False)
    settings.update(kw)
    args = DPOConfig(str(tmp_path), **settings)
    model = tiny_model(seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      lora_dropout=0.0, init_lora_weights=False)   # random B: policy != ref
    torch.manual_seed(1)
    return cls(model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer(),
               peft_config=lora)


def loss_and_grads(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    return loss.detach(), grads, batch


def manual_pair_losses(trainer, batch):
    """-log sigmoid(beta * margin) per pair from an independent forward (full logits)."""
    model = trainer.model
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def logps():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (lp * comp[:, 1:]).sum(1)

    with torch.no_grad():
        pol = logps()
        with model.disable_adapter():
            ref = logps()
    c, r = (pol - ref).chunk(2)
    return -F.logsigmoid(BETA * (c - r))


def test_loss_and_gradients_match_trl(tmp_path):
    from trl import DPOTrainer as TRLDPOTrainer

    from emdpo_core.hf.trl import DPOTrainer

    ds = pair_rows(np.random.default_rng(zlib.crc32(b"parity")), 6)
    theirs = make(TRLDPOTrainer, tmp_path / "trl", ds)
    ours = make(DPOTrainer, tmp_path / "ours", ds)
    l_t, g_t, batch = loss_and_grads(theirs)
    l_o, g_o, _ = loss_and_grads(ours)
    # Same float32 forward; the loss differs only in how the sigmoid is evaluated (~1e-7).
    torch.testing.assert_close(l_o, l_t, rtol=1e-6, atol=1e-7)
    assert g_o.keys() == g_t.keys() and len(g_o) > 0
    for n in g_t:
        torch.testing.assert_close(g_o[n], g_t[n], rtol=1e-5, atol=1e-7)
    # Both equal the textbook formula from an independent float64 forward.
    expected = manual_pair_losses(ours, batch).mean()
    assert abs(float(l_o) - float(expected)) < 1e-5
    # TRL's own metrics are still logged.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert ours._metrics["train"][key], key


def test_weight_column_is_honoured(tmp_path):
    from emdpo_core.hf.trl import DPOTrainer

    rng = np.random.default_rng(zlib.crc32(b"weights"))
    w = np.array([0.0, 2.0, 0.5, 1.0, 3.0, 0.25])
    ds = pair_rows(rng, 6, weights=w)
    tr = make(DPOTrainer, tmp_path, ds)
    loss, _, batch = loss_and_grads(tr)
    assert "weight" in batch
    per_pair = manual_pair_losses(tr, batch)
    expected = (torch.as_tensor(batch["weight"], dtype=torch.float64) * per_pair).mean()
    assert abs(float(loss) - float(expected)) < 1e-5
    # Each pair carries its own row's weight (the sampler shuffles the rows).
    tok = tiny_tokenizer()
    weight_of = {row["prompt"]: row["weight"] for row in ds}
    for i in range(len(w)):
        keep = (batch["completion_mask"][i] == 0) & (batch["attention_mask"][i] == 1)
        prompt = tok.decode(batch["input_ids"][i][keep], skip_special_tokens=True)
        assert float(batch["weight"][i]) == weight_of[prompt]
    assert tr._metrics["train"]["weights/mean"][-1] == pytest.approx(w.mean(), rel=1e-6)


def test_trains_and_logs_trl_metrics(tmp_path):
    from emdpo_core.hf.trl import DPOTrainer

    rng = np.random.default_rng(zlib.crc32(b"train"))
    tr = make(DPOTrainer, tmp_path, pair_rows(rng, 4, weights=[1.0, 0.5, 2.0, 1.0]),
              max_steps=2, logging_steps=1, logging_strategy="steps")
    tr.train()
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key in ("rewards/accuracies", "rewards/margins", "weights/mean", "logps/chosen"):
        assert key in logged[0], key


def test_bad_weights_and_settings_are_refused(tmp_path):
    from emdpo_core.hf.trl import DPOTrainer

    rng = np.random.default_rng(zlib.crc32(b"bad"))
    with pytest.raises(ValueError, match="row 2 has weight=-1.0"):
        make(DPOTrainer, tmp_path, pair_rows(rng, 4, weights=[1, 1, -1, 1]))
    with pytest.raises(ValueError, match="row 1 has weight=nan"):
        make(DPOTrainer, tmp_path, pair_rows(rng, 4, weights=[1, float("nan"), 1, 1]))
    with pytest.raises(ValueError, match="no such column"):
        from peft import LoraConfig
        from trl import DPOConfig

        DPOTrainer(model=tiny_model(), args=DPOConfig(str(tmp_path), report_to=[], bf16=False),
                   train_dataset=pair_rows(rng, 4), processing_class=tiny_tokenizer(),
                   peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
                   weight_column="importance")
    with pytest.raises(ValueError, match="loss_type"):
        make(DPOTrainer, tmp_path, pair_rows(rng, 4), loss_type=["ipo"])
