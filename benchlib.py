"""
What bench.py and bench_online.py share: the state every case starts from (device, precision,
initial weights, teacher, random batches: build_start), the same weights as a transformers model
for the peers, a word-level tokenizer that maps texts back to the same ids, TRL config keywords
across its versions, and the machine's description and the tables and JSON a bench writes.
"""
import json as json_lib
import os
import tempfile
import time
from types import SimpleNamespace

import torch

import runtime
from losses import IGNORE_INDEX
from model import GPT, Config

def random_pairs(n, seq_len, prompt_len, vocab_size, generator):
    """n preference pairs [(prompt, chosen, rejected)] of token id lists: a prompt of prompt_len
    ids, then responses that fill the row to seq_len and end with eos = vocab_size - 1. Ordinary
    ids stay below vocab_size - 2 (vocab_size - 2 is the pad id of word_tokenizer)."""
    prompts = torch.randint(vocab_size - 2, (n, prompt_len), generator=generator)
    responses = torch.randint(vocab_size - 2, (2, n, seq_len - prompt_len), generator=generator)
    responses[..., -1] = vocab_size - 1
    return [(prompts[i].tolist(), responses[0, i].tolist(), responses[1, i].tolist()) for i in range(n)]

def make_batch(rows, prompt_lens, ids, device="cpu"):
    """rows of equal length -> the batch dict of data.py's collators, plus completion_mask (1 on
    response tokens) for the transformers side. labels[b, t] is the token predicted at position t."""
    x = torch.tensor(rows)  # (N, T)
    N, T = x.shape
    labels = torch.full_like(x, IGNORE_INDEX)
    completion_mask = torch.zeros_like(x)
    for b, p in enumerate(prompt_lens):
        labels[b, p - 1:T - 1] = x[b, p:]
        completion_mask[b, p:] = 1
    return {"input_ids": x.to(device), "labels": labels.to(device), "completion_mask": completion_mask.to(device),
            "attention_mask": torch.ones_like(x).to(device), "position_ids": torch.arange(T).expand(N, T).to(device),
            "ids": list(ids)}

def sft_batch(pairs, ids, device="cpu"):
    """prompt + chosen response of each pair, one row each."""
    return make_batch([p + c for p, c, _ in pairs], [len(p) for p, _, _ in pairs], ids, device)

def dpo_batch(pairs, ids, device="cpu"):
    """B pairs as 2B rows, the B chosen first then the B rejected (data.collate_dpo's layout)."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    return make_batch(rows, [len(p) for p, _, _ in pairs] * 2, ids, device)

def hf_checkpoint(gpt, d):
    """writes gpt as a transformers checkpoint into d, its special ids those of word_tokenizer."""
    gpt.save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
        hf = json_lib.load(f)
    V = hf["vocab_size"]
    for k, v in (("pad_token_id", V - 2), ("eos_token_id", V - 1)):  # word_tokenizer's ids
        if isinstance(hf.get(k), int) and hf[k] >= V:
            hf[k] = v
    with open(os.path.join(d, "config.json"), "w") as f:
        json_lib.dump(hf, f)
    return d

def hf_from_pretrained(path, dtype):
    """AutoModelForCausalLM in dtype across transformers versions (`dtype` since 4.56, `torch_dtype` before)."""
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.disable_progress_bar()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(path, **{key: dtype})

def to_hf(gpt, dtype=torch.float32):
    """a transformers model with gpt's weights (through the HF checkpoint layout)."""
    with tempfile.TemporaryDirectory() as d:
        return hf_from_pretrained(hf_checkpoint(gpt, d), dtype)

def hf_model(S, dtype):
    """the transformers model the peers train: the checkpoint itself, or the random init's weights
    (written once per process: at 1B parameters a checkpoint takes seconds to write)."""
    if not S.cfg["pretrain"] and getattr(S, "hf_dir", None) is None:
        S._hf_tmp = tempfile.TemporaryDirectory()
        S.hf_dir = hf_checkpoint(S.base, S._hf_tmp.name)
    return hf_from_pretrained(S.cfg["pretrain"] or S.hf_dir, dtype)

def word_tokenizer(vocab_size):
    """a transformers tokenizer whose text 't17 t4 <eos>' is ids [17, 4, vocab_size - 1]: any id
    sequence goes through TRL's text pipeline unchanged (pad = vocab_size - 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<pad>": vocab_size - 2, "<eos>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")

def trl_config_kwargs(config_class, kw):
    """kw for TRL's config across its and transformers' versions: renamed keys mapped to the
    installed names, keys it does not know dropped (each said once)."""
    import dataclasses
    known = {f.name for f in dataclasses.fields(config_class)}
    renames = {
        "eval_strategy": "evaluation_strategy",
        "use_cpu": "no_cuda",
        "activation_checkpointing": "gradient_checkpointing",
    }
    out = {}
    for k, v in kw.items():
        if k in known:
            out[k] = v
        elif renames.get(k) in known:
            out[renames[k]] = v
        else:
            print(f"compare: {config_class.__name__} has no {k!r}; left at its default")
    return out

def machine():
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info

def loadavg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

def write_json(path, obj):
    with open(path, "w") as f:
        json_lib.dump(obj, f, indent=2)
    print(f"wrote {path}")

def default_device(device):
    """'' -> cuda:0 when a GPU is there, else cpu; 'cuda' -> cuda:0 (set_device needs an index)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "cuda:0" if device == "cuda" else device

def build_start(cfg):
    """the state every case starts from: config, device and precision (runtime.py, as train.py),
    initial weights, teacher, batches."""
    W = runtime.init(default_device(cfg["device"]))
    dtype, ptdtype, master_dtype, autocast = runtime.precision(cfg["dtype"], W.device_type)
    S = SimpleNamespace(cfg=dict(cfg, device=W.device, device_type=W.device_type, dtype=dtype), device=W.device,
                        device_type=W.device_type, ptdtype=ptdtype, master_dtype=master_dtype, autocast=autocast,
                        sync=torch.cuda.synchronize if W.device_type == "cuda" else (lambda: None))
    torch.manual_seed(cfg["seed"])
    if cfg["pretrain"]:
        S.base = GPT.from_pretrained(cfg["pretrain"], dtype=ptdtype if cfg["lora_rank"] else master_dtype, device="cpu")
        S.teacher = S.base  # the teacher: a frozen copy of the same checkpoint
    else:
        mc = Config(vocab_size=cfg["model_vocab_size"], n_layer=cfg["model_n_layer"], n_head=cfg["model_n_head"],
                    n_kv_head=cfg["model_n_kv_head"], n_embd=cfg["model_n_embd"],
                    head_dim=cfg["model_n_embd"] // cfg["model_n_head"],
                    intermediate_size=cfg["model_intermediate_size"],
                    max_position_embeddings=max(2048, cfg["seq_len"]), norm_eps=1e-5)
        S.base = GPT(mc).to(master_dtype)
        S.teacher = GPT(mc).to(master_dtype)  # another random init
    V, B, T, P = S.base.config.vocab_size, cfg["batch_size"], cfg["seq_len"], cfg["prompt_len"]
    assert 1 <= P < T, "prompt_len must lie in [1, seq_len)"
    n_batches = 4  # cycled through; the content does not change the cost
    S.pairs = random_pairs(B * max(n_batches, cfg["warmup_iters"] + cfg["iters"]), T, P, V,
                           torch.Generator().manual_seed(cfg["seed"]))
    # on the CPU, as train.py's loaders give them: the step moves them to the device (the peers get
    # theirs on the device already)
    S.sft_batches = [sft_batch(S.pairs[i * B:(i + 1) * B], range(i * B, (i + 1) * B)) for i in range(n_batches)]
    S.dpo_batches = [dpo_batch(S.pairs[i * B:(i + 1) * B], range(i * B, (i + 1) * B)) for i in range(n_batches)]
    on_device = lambda b: {k: v.to(S.device) if torch.is_tensor(v) else v for k, v in b.items()}
    S.sft_batches_dev, S.dpo_batches_dev = [on_device(b) for b in S.sft_batches], [on_device(b) for b in S.dpo_batches]
    return S

def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
