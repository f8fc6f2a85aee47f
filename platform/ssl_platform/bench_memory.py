"""``sslp bench train --memory``: the peak memory and speed of one training step at global
batch G with k = 1 and with k accumulated micro-batches (``train.grad_accum_mode``), on CPU.

Exact accumulation (GradCache, ``train.grad_cache``) should hold the activations of one
micro-batch, about 1/k of the k = 1 step's, for the price of a second forward of every
micro-batch. Each figure comes from a fresh Python process (torch's CPU allocator has no peak
statistics and tracemalloc does not see it): the process builds the preset's method and
optimizer and one synthetic batch of the preset's shapes, takes a step on a tiny batch (so
gradients and optimizer state exist), then measures the growth of its peak resident set over
one step of G samples (``ru_maxrss`` minus the resident set just before), and times a few more.

    sslp bench train --memory                      # clip-digit-captions and simclr-digits, k = 8
    sslp bench train --memory --preset simclr-digits --accum 4 train.batch_size=512
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

MEMORY_PRESETS = ("clip-digit-captions", "simclr-digits")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _synthetic_batch(cfg, method, rows: int) -> dict:
    """One batch of ``rows`` samples in the shapes the method's data kind eats (content does not
    matter for memory or speed)."""
    import torch

    from ssl_platform.methods import method_spec

    spec = method_spec(cfg.method.name)
    g = torch.Generator().manual_seed(0)
    side, channels = cfg.data.image_size, getattr(method, "in_channels", 3)
    if spec.data_kind == "image-caption":
        return {"image": torch.randn(rows, channels, side, side, generator=g),
                "text": torch.randint(1, 1000, (rows, method.context_length), generator=g)}
    if spec.data_kind == "image":
        return {key: torch.randn(rows, channels, side, side, generator=g) for key in spec.batch_keys}
    raise SystemExit(f"sslp bench train --memory measures image and image-caption presets; {cfg.name} trains "
                     f"on {spec.data_kind}")


def measure(preset: str, accum: int, mode: str, steps: int, overrides: list[str]) -> dict:
    """In this process: peak memory growth (bytes) of one step and seconds per step."""
    from ssl_platform import methods
    from ssl_platform.config import load_config
    from ssl_platform.train.grad_cache import accumulate_exact
    from ssl_platform.train.loop import accumulate_gradients
    from ssl_platform.train.optim import build_optimizer

    cfg = methods.validate(load_config(preset, [*overrides, f"train.grad_accum_steps={accum}",
                                                f"train.grad_accum_mode={mode}", "scaling.num_workers=1"]))
    method = methods.build(cfg, **methods.expected_derived(cfg)).train()
    t = cfg.train
    optimizer = build_optimizer(method, t.optimizer, t.effective_lr()[0], t.weight_decay, t.adam_beta2)
    exact = mode == "exact" and accum > 1 and methods.method_spec(cfg.method.name).accumulation == "gradcache"

    def step(batch: dict) -> None:
        micro = [{k: v.chunk(accum)[i] for k, v in batch.items()} for i in range(accum)]
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as in a run after its first step
        if exact:
            accumulate_exact(method, method, micro)
        else:
            accumulate_gradients(method, micro)
        optimizer.step()

    step(_synthetic_batch(cfg, method, 2 * accum))  # gradients, optimizer state, allocator warm
    batch = _synthetic_batch(cfg, method, cfg.train.batch_size)
    before = _rss_bytes()
    step(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB on Linux
    tic = time.perf_counter()
    for _ in range(steps):
        step(batch)
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    return {"peak_step_bytes": max(peak, 0), "step_s": (time.perf_counter() - tic) / steps, "param_bytes": params,
            "batch_size": cfg.train.batch_size, "exact": exact}


def measure_in_subprocess(preset: str, accum: int, mode: str, steps: int, overrides: list[str]) -> dict:
    args = [sys.executable, "-m", "ssl_platform.bench_memory", preset, str(accum), mode, str(steps), *overrides]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {preset} with k={accum} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory_bench(presets: list[str], accum: int, mode: str, steps: int, overrides: list[str]) -> list[dict]:
    rows = []
    for preset in presets:
        one = measure_in_subprocess(preset, 1, mode, steps, overrides)
        many = measure_in_subprocess(preset, accum, mode, steps, overrides)
        rows.append({"preset": preset, "batch_size": one["batch_size"], "accum": accum, "mode": mode,
                     "exact": many["exact"], "param_mb": one["param_bytes"] / 2**20,
                     "peak_mb_k1": one["peak_step_bytes"] / 2**20, "peak_mb_k": many["peak_step_bytes"] / 2**20,
                     "step_s_k1": one["step_s"], "step_s_k": many["step_s"],
                     "throughput_ratio": one["step_s"] / many["step_s"]})
    return rows


def format_memory_bench(rows: list[dict]) -> str:
    lines = [("peak memory of one training step (growth of the process's peak RSS over the step; CPU, fp32) "
              "and speed, k = 1 against k accumulated micro-batches")]
    for r in rows:
        how = "exact, GradCache" if r["exact"] else r["mode"]
        lines.append(f"  {r['preset']:<22} G={r['batch_size']:<5} k=1 {r['peak_mb_k1']:>7.1f} MiB "
                     f"{r['step_s_k1']:.3f} s"
                     f" | k={r['accum']} ({how}) {r['peak_mb_k']:>7.1f} MiB {r['step_s_k']:.3f} s"
                     f" | memory {r['peak_mb_k'] / max(r['peak_mb_k1'], 1e-9):.2f}x, throughput "
                     f"{r['throughput_ratio']:.2f}x (parameters {r['param_mb']:.1f} MiB)")
    return "\n".join(lines)


if __name__ == "__main__":  # one measurement, in a fresh process (measure_in_subprocess)
    preset, accum, mode, steps, *overrides = sys.argv[1:]
    print(json.dumps(measure(preset, int(accum), mode, int(steps), overrides)))
