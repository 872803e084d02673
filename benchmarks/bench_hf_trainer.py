"""EMDPOTrainer per EM iteration: where the time goes, and the library's own share.

Trains EMDPOTrainer (K LoRA types) on a planted ranked population and splits the wall time
of each EM iteration into

  m_step      optimizer steps of one M-step (forward of every type, loss, backward, step)
  e_step      the no-grad pass of every slot under every type plus the E-step kernel
  ref_cache   the one-time reference pass and k-means start (reported once, before EM)

and, inside them, the model's forward (timed by hooks on the transformer), backward
(``accelerator.backward``), the optimizer step, the collator (tokenization of training
batches), and **library overhead**: the time spent in the trainer's own code paths (the
M-step objective and the E-step) minus the model forwards inside them, i.e. adapter
switching, slot/weight lookups, the compiled loss and E-step kernels, host transfers. The
target is library overhead <= 2% of the iteration. On CUDA every timed region ends with a
synchronisation (so the attribution is exact; it slows the run slightly).

Configurations: ``tiny`` (2 layers, hidden 64) and ``large`` (12 layers, hidden 512, 8 heads,
vocabulary 8192), Llama architecture, random weights, a local word-level tokenizer (no
download). Rows are appended to benchmarks/results/bench_hf_trainer.csv.

    python benchmarks/bench_hf_trainer.py                     # both configs on CPU (minutes)
    python benchmarks/bench_hf_trainer.py --configs tiny
    python benchmarks/bench_hf_trainer.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import append_rows, base_row  # noqa: E402

DEFAULT_OUTPUT = os.path.join(HERE, "results", "bench_hf_trainer.csv")

CONFIGS = {
    # name: (layers, hidden, heads, kv heads, intermediate, vocabulary words,
    #        annotators, rankings per annotator, batch size, EM iterations)
    "tiny": (2, 64, 4, 2, 128, 120, 32, 6, 16, 3),
    "large": (12, 512, 8, 4, 1376, 8192, 16, 4, 16, 2),
}


def build(name, device, dtype):
    import tokenizers
    import torch
    import transformers

    layers, hidden, heads, kv, inter, n_words, *_ = CONFIGS[name]
    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(n_words)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                               eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False))
    return model.to(device=device, dtype=dtype), tok


def planted_rows(n_annotators, per_annotator, seed=0):
    rng = np.random.default_rng(seed)
    rows, types = [], []
    for h in range(n_annotators):
        t = h % 2
        types.append(t)
        for _ in range(per_annotator):
            counts = rng.permutation(4)[:3]
            responses = []
            for c in counts:
                n_words = int(rng.integers(6, 12))
                a = [f"w{rng.integers(10)}" for _ in range(c * n_words // 3)]
                b = [f"w{10 + rng.integers(10)}" for _ in range(n_words - len(a))]
                responses.append(" ".join(rng.permutation(a + b)))
            order = np.argsort(-counts if t == 0 else counts)
            prompt = " ".join(f"w{i}" for i in rng.integers(20, 100, size=int(rng.integers(4, 12))))
            rows.append({"prompt": prompt, "responses": [responses[j] for j in order],
                         "annotator": f"u{h:03d}"})
    return rows, np.array(types)


class Clock:
    """Accumulates seconds per (phase, what); phases nest (the innermost gets the time)."""

    def __init__(self, sync):
        self.sync = sync
        self.phase = ["other"]
        self.totals = {}
        self.marks = []

    def add(self, what, seconds):
        key = (self.phase[-1], what)
        self.totals[key] = self.totals.get(key, 0.0) + seconds

    @contextmanager
    def region(self, what, phase=None):
        self.sync()
        if phase:
            self.phase.append(phase)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(what, time.perf_counter() - t0)
            if phase:
                self.phase.pop()

    def wrap(self, obj, attr, what, phase=None):
        fn = getattr(obj, attr)

        def wrapped(*a, **kw):
            with self.region(what, phase):
                return fn(*a, **kw)
        wrapped.__wrapped__ = fn
        setattr(obj, attr, wrapped)


def run(name, device, dtype_name, out_rows):
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from emdpo_core.datasets import adjusted_rand_index
    from emdpo_core.hf import EMDPOConfig, EMDPOTrainer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    *_, n_annot, per, bs, iters = CONFIGS[name]
    model, tok = build(name, device, dtype)
    rows, truth = planted_rows(n_annot, per)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = Clock(sync)
    out_dir = tempfile.mkdtemp(prefix="bench-hf-")
    args = EMDPOConfig(out_dir, n_types=2, beta=1.0, em_iterations=iters, learning_rate=5e-3,
                       per_device_train_batch_size=bs, per_device_eval_batch_size=2 * bs,
                       save_strategy="no", report_to=[], logging_strategy="no",
                       disable_tqdm=True, seed=0, use_cpu=device == "cpu",
                       bf16=dtype_name == "bf16", dataloader_pin_memory=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    trainer = EMDPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                           peft_config=lora)
    transformer = trainer.model.base_model.model.model     # the Llama decoder stack + head
    lm = trainer.model.base_model.model

    starts = {}

    def pre(mod, a):
        sync()
        starts[id(mod)] = time.perf_counter()

    def post(mod, a, o):
        sync()
        clock.add("forward", time.perf_counter() - starts.pop(id(mod)))

    lm.register_forward_pre_hook(pre)
    lm.register_forward_hook(post)
    del transformer

    import emdpo_core.hf.trainer as trainer_module

    clock.wrap(trainer_module, "sequence_logps", "seq_logps")
    clock.wrap(trainer, "_initialize_em", "wall", phase="ref_cache")
    clock.wrap(trainer, "_e_step", "wall", phase="e_step")
    clock.wrap(trainer, "_m_step_objective", "objective")
    clock.wrap(trainer.accelerator, "backward", "backward")
    collator = trainer.data_collator

    def timed_collator(batch_rows):
        with clock.region("collate"):
            return collator(batch_rows)
    # (The no-grad passes collate once, at the reference pass, and reuse the batches.)
    trainer.data_collator = timed_collator

    class StepTimes(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            sync()
            clock.add("optimizer", time.perf_counter() - self.t)

    trainer.add_callback(StepTimes())
    t0 = time.perf_counter()
    with clock.region("wall", phase="train"):
        trainer.train()
    total = time.perf_counter() - t0
    T = clock.totals

    def g(phase, what):
        return T.get((phase, what), 0.0)

    # The M-step phase is "train" minus the E-steps and the reference pass (which ran inside
    # train()); forwards inside the objective were attributed to "train".
    e_wall, e_fwd = g("e_step", "wall"), g("e_step", "forward")
    ref_wall = g("ref_cache", "wall")
    m_wall = g("train", "wall") - e_wall - ref_wall
    m_fwd, m_obj = g("train", "forward"), g("train", "objective")
    bwd, opt, col = g("train", "backward"), g("train", "optimizer"), g("train", "collate")
    # sequence_logps = the model's forward + the log-softmax gather of the response tokens
    # (the "head"); the library's own work is what its callers do around it.
    e_seq, m_seq = g("e_step", "seq_logps"), g("train", "seq_logps")
    head = (e_seq - e_fwd) + (m_seq - m_fwd)
    lib = (e_wall - e_seq) + (m_obj - m_seq)
    trainer_module.sequence_logps = trainer_module.sequence_logps.__wrapped__
    n_e = len(trainer.em_history_)
    per_iter = (m_wall + e_wall) / iters
    ari = adjusted_rand_index(truth, trainer.predict_types())
    print(f"\n[{name}] {device} {dtype_name}: {len(rows)} rows, K=2, {iters} EM iterations, "
          f"{n_e} E-steps, ARI {ari:.2f}, total {total:.1f} s")
    print(f"  reference caching + k-means start (once): {ref_wall:8.3f} s "
          f"(forward {g('ref_cache', 'forward'):.3f} s)")
    print(f"  per EM iteration:                         {per_iter:8.3f} s")
    print(f"    M-step  {m_wall / iters:8.3f} s  forward {m_fwd / iters:.3f}  backward "
          f"{bwd / iters:.3f}  optimizer {opt / iters:.3f}  collate {col / iters:.3f}")
    print(f"    E-step  {e_wall / iters:8.3f} s  forward {e_fwd / iters:.3f}  "
          f"(E-steps: {n_e}, the last after the final M-step)")
    print(f"    log-softmax gather of response tokens (sequence_logps minus the forward): "
          f"{head / iters:.4f} s")
    print(f"    library overhead {lib / iters:8.4f} s = {100 * lib / (m_wall + e_wall):.2f}% of "
          f"the iteration (target <= 2%); with collation (padding) "
          f"{100 * (lib + col) / (m_wall + e_wall):.2f}%")
    row = base_row(device)
    row.update(config=name, dtype=dtype_name, rows=len(rows), K=2, em_iterations=iters,
               ari=round(ari, 3), ref_cache_s=round(ref_wall, 4),
               iteration_s=round(per_iter, 4), m_step_s=round(m_wall / iters, 4),
               e_step_s=round(e_wall / iters, 4), forward_s=round((m_fwd + e_fwd) / iters, 4),
               backward_s=round(bwd / iters, 4), optimizer_s=round(opt / iters, 4),
               collate_s=round(col / iters, 4), logps_head_s=round(head / iters, 4),
               library_s=round(lib / iters, 5),
               library_pct=round(100 * lib / (m_wall + e_wall), 3),
               load_avg=round(os.getloadavg()[0], 2))
    out_rows.append(row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,large")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in a.configs.split(","):
        run(name, a.device, a.dtype, rows)
    append_rows(__import__("pathlib").Path(a.output), rows)
    print(f"\nrows appended to {a.output}")


if __name__ == "__main__":
    main()
