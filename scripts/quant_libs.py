"""
The 4-bit library choice (BENCHMARKS.md, "4-bit frozen weights"): torchao's NF4Tensor (quant.py)
against bitsandbytes' NF4, on one frozen linear layer of shape out x in with a rank-16 LoRA adapter
beside it, float32 compute, on this machine:

    python scripts/quant_libs.py                     # needs torchao and bitsandbytes (pip install bitsandbytes)
    python scripts/quant_libs.py --shape=576,1536 --tokens=2048

Per case (fp32 = the plain frozen nn.Linear; each library with and without double quantization):
bits a weight; quantization error (the largest |w - dequantized w| over the block's absmax, and
the RMS error over the weights' RMS); seconds to quantize; forward + backward time (the input's
gradient through the frozen weight, the adapter's gradients; median of `iters` after 2 warm-up
steps); whether the forward equals x @ dequantized(w).T bit for bit, and the input gradient's
largest difference from the one through the dequantized weight; peak memory of forward + backward
(the peak RSS, VmHWM reset through /proc/self/clear_refs once the layer and the input exist, above
the RSS then; a fresh process per case).
"""
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

shape = "2048,5632"   # out,in of the frozen weight (TinyLlama-1.1B's down_proj)
tokens = 1024         # rows of the input
rank = 16             # the LoRA adapter's
iters = 5
threads = 1           # torch threads (the timing's; 1 keeps two shared cores' noise out)
cases = "fp32,torchao,torchao_nodq,bnb,bnb_nodq"
case = ""             # set by the script itself: one case in a fresh process (its peak memory)
seed = 0

def _kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

def build(name, w):
    """(forward(x) -> y through the frozen weight, dequantized weight, bytes stored, seconds to quantize)"""
    t0 = time.perf_counter()
    if name == "fp32":
        return (lambda x: F.linear(x, w)), w, w.nbytes, 0.0
    if name.startswith("torchao"):
        import quant
        q = quant.to_nf4(w, double_quant=not name.endswith("nodq"))
        dt = time.perf_counter() - t0
        n = sum(getattr(q, a).nbytes for a in ("quantized_data", "quantized_scalers", "quantization_factor"))
        return (lambda x: F.linear(x, q)), q.get_original_weight(), n, dt
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    packed, st = BF.quantize_4bit(w, blocksize=64, compress_statistics=not name.endswith("nodq"), quant_type="nf4")
    dt = time.perf_counter() - t0
    n = packed.nbytes + st.absmax.nbytes + (st.state2.absmax.nbytes + st.state2.code.nbytes if st.nested else 0)
    return (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=st)), BF.dequantize_4bit(packed, st), n, dt

def run_case(name, cfg):
    torch.set_num_threads(cfg["threads"])
    out_f, in_f = (int(v) for v in cfg["shape"].split(","))
    g = torch.Generator().manual_seed(cfg["seed"])
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(cfg["tokens"], in_f, generator=g)
    A = (torch.randn(cfg["rank"], in_f, generator=g) * 0.01).requires_grad_()
    B = (torch.randn(out_f, cfg["rank"], generator=g) * 0.01).requires_grad_()
    fwd, deq, nbytes, q_s = build(name, w)

    def step():
        xs = x.clone().requires_grad_()
        y = fwd(xs) + F.linear(F.linear(xs, A), B) * 2.0
        y.square().mean().backward()
        return xs.grad
    # peak memory first, on the first step, after the allocator gave back what it keeps free (the
    # quantization's temporaries): later steps reuse memory it kept
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _kib("VmRSS")
    step()
    peak = (_kib("VmHWM") - base) / 1024
    blocks = (w - deq).reshape(-1, 64).abs().amax(1) / w.reshape(-1, 64).abs().amax(1)
    res = {"case": name, "bits_per_weight": 8 * nbytes / w.numel(), "quantize_s": q_s, "peak_mib": peak,
           "max_err_over_absmax": blocks.max().item(),
           "rms_err_over_rms": ((w - deq).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()}
    with torch.no_grad():
        y = fwd(x)
    res["forward_exact"] = bool(torch.equal(y, F.linear(x, deq)))
    res["forward_max_diff"] = (y - F.linear(x, deq)).abs().max().item()
    xg = x.clone().requires_grad_()
    fwd(xg).sum().backward()
    xd = x.clone().requires_grad_()
    F.linear(xd, deq).sum().backward()
    res["input_grad_max_diff"] = (xg.grad - xd.grad).abs().max().item()
    for _ in range(2):
        step()
    times = []
    for _ in range(cfg["iters"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    res["fwd_bwd_s"] = statistics.median(times)
    return res

def main(cfg):
    names = [c for c in cfg["cases"].split(",") if c]
    if cfg["case"]:
        print("RESULT " + json.dumps(run_case(cfg["case"], cfg)))
        return
    rows = []
    for c in names:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--case={c}"],
                           capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{c}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
            continue
        rows.append(json.loads(line[7:]))
    base = next((r["fwd_bwd_s"] for r in rows if r["case"] == "fp32"), None)
    print(f"{cfg['shape']} weight, {cfg['tokens']} tokens, LoRA r{cfg['rank']}, float32, {cfg['threads']} thread(s), "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    head = ["case", "bits/w", "max err/absmax", "rms err/rms", "quantize s", "fwd+bwd ms", "vs fp32", "peak MiB",
            "fwd exact", "fwd diff", "grad_x diff"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["case"], f"{r['bits_per_weight']:.2f}", f"{r['max_err_over_absmax']:.4f}",
                          f"{r['rms_err_over_rms']:.4f}", f"{r['quantize_s']:.2f}", f"{1e3 * r['fwd_bwd_s']:.0f}",
                          f"{r['fwd_bwd_s'] / base:.2f}x" if base else "-", f"{r['peak_mib']:.0f}",
                          str(r["forward_exact"]), f"{r['forward_max_diff']:.1e}", f"{r['input_grad_max_diff']:.1e}"]))

if __name__ == "__main__":
    import configurator
    cfg = {k: globals()[k] for k in ("shape", "tokens", "rank", "iters", "threads", "cases", "case", "seed")}
    configurator.apply(sys.argv[1:], cfg, verbose=False)
    main(cfg)
