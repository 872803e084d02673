"""Prefix sharing: summed response log-probabilities of ranked lists with the prompt encoded
once per list (one packed sequence, 4D attention mask, restarted position ids) against the
padded path (one prompt + response sequence per slot), measured in the same run.

Workload: B lists of m responses; every prompt has ratio * R tokens and every response R
tokens (random token ids, no tokenizer). A random Llama-like model built from a config.
Modes: `fwd_bwd` (sequence_logps(...).sum().backward(), an M-step pass) and `fwd`
(no_grad, the reference caching and E-step passes).

Throughput counts pair tokens: sum over slots of (prompt + response) tokens, the tokens the
padded path would process without padding; both paths get the same count, so the ratio of
their tokens/s is the speed-up. Correctness is checked before timing (shared vs padded
log-probabilities, float32 tolerance). Each round times padded then shared once
(interleaved, so load on a shared machine hits both alike); `speedup_paired` is the median
of the per-round ratios.

Rows are appended to benchmarks/results/bench_prefix_sharing.csv.

    python benchmarks/bench_prefix_sharing.py                  # CPU, small config (~3 min on 2 cores)
    python benchmarks/bench_prefix_sharing.py --quick          # m = 2, 4 and ratio 1, 4 only
    python benchmarks/bench_prefix_sharing.py --device cuda    # bf16, a larger config
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, append_rows, device_name, git_commit  # noqa: E402

import emdpo_core  # noqa: E402
from emdpo_core.hf import RankedListCollator, sequence_logps, supports_prefix_sharing  # noqa: E402

OUTPUT = RESULTS / "bench_prefix_sharing.csv"

CONFIGS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small": (256, 4, 4, 2, 688, 4096),      # CPU
    "medium": (1024, 8, 16, 4, 2816, 32000),  # GPU
}


class _Tok:
    """The collator only needs pad and eos ids when rows are pre-tokenized."""
    pad_token_id = 0
    eos_token_id = 1


def build_model(config: str, device: str, dtype, attn: str):
    import transformers

    hidden, layers, heads, kv, inter, vocab = CONFIGS[config]
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, vocab_size=vocab,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    return model.eval(), vocab


def make_rows(rng, B, m, P, R, vocab):
    return [{"prompt_ids": rng.integers(2, vocab, size=P).tolist(),
             "response_ids": [rng.integers(2, vocab, size=R).tolist() for _ in range(m)]}
            for _ in range(B)]


def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def load_avg() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS),
                    help="model size (default: small on CPU, medium on CUDA)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--lists", type=int, default=None, help="B, lists per batch (4 CPU, 16 CUDA)")
    ap.add_argument("--response-len", type=int, default=None, help="R (32 CPU, 128 CUDA)")
    ap.add_argument("--m", default="2,3,4,5")
    ap.add_argument("--ratios", default="1,4,8", help="prompt:response length ratios")
    ap.add_argument("--modes", default="fwd_bwd,fwd")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (5 CPU, 20 CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (CPU default 1: on a shared, oversubscribed machine "
                         "two spinning OpenMP threads mostly measure the scheduler)")
    ap.add_argument("--quick", action="store_true", help="m = 2, 4; ratios 1, 4; fewer rounds")
    ap.add_argument("--output", default=str(OUTPUT))
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    config = args.config or ("medium" if cuda else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    B = args.lists or (16 if cuda else 4)
    R = args.response_len or (128 if cuda else 32)
    repeats = args.repeats or (20 if cuda else 5)
    ms = [int(x) for x in args.m.split(",")]
    ratios = [int(x) for x in args.ratios.split(",")]
    if args.quick:
        ms, ratios, repeats = [2, 4], [1, 4], max(3, repeats // 2)
    modes = args.modes.split(",")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)

    model, vocab = build_model(config, args.device, dtype, args.attn)
    assert supports_prefix_sharing(model)
    padded_c = RankedListCollator(_Tok())
    shared_c = RankedListCollator(_Tok(), prefix_sharing=True)
    rng = np.random.default_rng(0)
    import transformers

    base = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device, "device_name": device_name(args.device),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "emdpo_version": emdpo_core.__version__, "git_commit": git_commit(),
            "config": config,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "attn": args.attn, "dtype": str(dtype).replace("torch.", "")}
    base["threads"] = torch.get_num_threads()
    print(f"{base['device_name']}, {config} Llama ({base['params_m']}M params, {args.attn}, "
          f"{base['dtype']}), B={B}, R={R}, {repeats} rounds, load {load_avg()}", flush=True)
    print(f"{'mode':8} {'m':>2} {'P:R':>4} {'padded tok/s':>13} {'shared tok/s':>13} "
          f"{'speedup':>8} {'(cpu time)':>10}", flush=True)
    rows = []
    for mode in modes:
        for m in ms:
            for ratio in ratios:
                P = ratio * R
                data = make_rows(rng, B, m, P, R, vocab)
                bp = to_device(padded_c(data), args.device)
                bs = to_device(shared_c(data), args.device)
                with torch.no_grad():
                    a, b = sequence_logps(model, bp), sequence_logps(model, bs)
                # bf16: both paths round activations to 8 mantissa bits differently; sums of
                # R ~ 128 log-probs agree to ~1% there. float32: ~1e-5 relative.
                tol = 1e-3 if dtype == torch.float32 else 3e-2
                err = float(((a.float() - b.float()).abs() / a.float().abs().clamp_min(1)).max())
                if not err <= tol:
                    raise SystemExit(f"shared and padded log-probs differ: {err:.2e} > {tol}")

                def run(batch):
                    if mode == "fwd":
                        with torch.no_grad():
                            sequence_logps(model, batch)
                    else:
                        model.zero_grad(set_to_none=True)
                        sequence_logps(model, batch).sum().backward()

                times = {"padded": [], "prefix_shared": []}
                cpu = {"padded": [], "prefix_shared": []}
                for _ in range(1):                                  # warm-up
                    run(bp), run(bs)
                sync(args.device)
                for _ in range(repeats):
                    for name, batch in (("padded", bp), ("prefix_shared", bs)):
                        t0, c0 = time.perf_counter(), time.process_time()
                        run(batch)
                        sync(args.device)
                        times[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
                pair_tokens = B * m * (P + R)
                p50 = {k: float(np.median(v)) for k, v in times.items()}
                paired = float(np.median(np.array(times["padded"])
                                         / np.array(times["prefix_shared"])))
                # CPU time of this process: less sensitive to other jobs on a shared machine.
                paired_cpu = float(np.median(np.array(cpu["padded"])
                                             / np.array(cpu["prefix_shared"])))
                tokens = {"padded": int(bp["attention_mask"].sum()),
                          "prefix_shared": int((bs["segment_ids"] >= 0).sum())}
                for name, t in times.items():
                    p20, p50_, p80 = np.percentile(t, [20, 50, 80])
                    rows.append({**base, "mode": mode, "lists": B, "m": m, "prompt_len": P,
                                 "response_len": R, "ratio": f"{ratio}:1", "layout": name,
                                 "tokens_processed": tokens[name], "pair_tokens": pair_tokens,
                                 "repeats": repeats, "p20_ms": round(p20 * 1e3, 3),
                                 "p50_ms": round(p50_ * 1e3, 3), "p80_ms": round(p80 * 1e3, 3),
                                 "tokens_per_s": round(pair_tokens / p50_, 1),
                                 "speedup_p50": (round(p50["padded"] / p50_, 3)
                                                 if name == "prefix_shared" else ""),
                                 "speedup_paired": (round(paired, 3)
                                                    if name == "prefix_shared" else ""),
                                 "cpu_p50_ms": round(float(np.median(cpu[name])) * 1e3, 3),
                                 "speedup_cpu_paired": (round(paired_cpu, 3)
                                                        if name == "prefix_shared" else ""),
                                 "max_rel_diff": f"{err:.1e}", "load_avg": load_avg()})
                print(f"{mode:8} {m:>2} {ratio:>2}:1 {pair_tokens / p50['padded']:>13.0f} "
                      f"{pair_tokens / p50['prefix_shared']:>13.0f} {paired:>7.2f}x "
                      f"{paired_cpu:>9.2f}x",
                      flush=True)
    append_rows(Path(args.output), rows)
    print(f"appended {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
