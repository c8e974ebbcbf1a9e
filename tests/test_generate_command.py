"""Nothing silently wrong in generate.py: the run's own held-out rows (streaming included), the
run's base rebuilt exactly from a checkpoint, a merged final/ given its own adapter again, --out
never replacing an input or a run's file unasked, and one line naming the key, file or row for
bad input (prompts files, --stop, an adapter of another shape, train.py's reward_model)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import decoding
import generate as G
from helpers import ROOT, refused, run_train
from model import byte_tokenizer

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """a LoRA run on a fresh base (seed 7) reading toy_sft.jsonl as a stream: it holds out the
    first round(0.1 x 40) = 4 rows; its greedy answers to them are in eval_gen/."""
    out = tmp_path_factory.mktemp("stream") / "run"
    run_train(out, "--obj_2=", "--streaming=True", "--eval_split_1=", "--max_samples_1=40", "--eval_frac=0.1",
              "--lora_rank=4", "--lora_alpha=8", "--learning_rate=3e-2", "--max_iters=3", "--seed=7",
              "--eval_gen_interval=0", "--eval_gen_samples=0", "--eval_gen_max_new_tokens=6")
    return out

def gen(*args):
    return G.main(["--temperature=0", "--dtype=float32", "--device=cpu", *args])

def cli(*args):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)

# the run's held-out rows, streaming included
def test_objective_of_a_streaming_run_is_its_held_out_rows(run):
    with open(os.path.join(ROOT, "data", "toy_sft.jsonl")) as f:
        head = [json.loads(l) for l in f][:4]  # a stream holds out its first rows
    got = gen(f"--out_dir={run}", "--objective=1", "--max_new_tokens=6")
    assert [r["input"] for r in got] == [r["input"] for r in head]
    # and they are the prompts the run itself judged at its end, with the same greedy answers
    (last,) = sorted(glob.glob(str(run / "eval_gen" / "iter_*_1.jsonl")))[-1:]
    with open(last) as f:
        judged = {g["prompt"]: g["output"] for g in map(json.loads, f)}
    assert judged == {f"User: {r['input']}\nAssistant: ": r["output"] for r in got}

# the run's base, rebuilt exactly
def test_ckpt_of_a_lora_run_on_a_fresh_base_is_its_final_model(run):
    torch.manual_seed(123)  # whatever the caller's random state, the run's seed builds the base
    state = torch.get_rng_state()
    from_ckpt, tok, path = G.load_model(out_dir=str(run), ckpt="latest")
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's random state is left as it was
    final, _, _ = G.load_model(out_dir=str(run))
    a, b = from_ckpt.state_dict(), final.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    ids = torch.tensor([list(b"User: red fox\nAssistant: ")])
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt(ids), final(ids), atol=1e-5, rtol=0)
    args = [f"--out_dir={run}", "--prompt=red fox", "--max_new_tokens=8"]
    assert gen(*args, "--ckpt=latest")[0]["output"] == gen(*args)[0]["output"]

def test_a_merged_final_given_its_own_adapter_is_refused(run, tmp_path):
    final, adapter = run / "final", run / "final" / "adapter"
    shutil.copytree(adapter, tmp_path / "copy")  # the same adapter elsewhere: detected by content
    for args in ([f"--pretrain={final}", f"--adapter={adapter}"],
                 [f"--pretrain={final}", f"--adapter={tmp_path / 'copy'}"],
                 [f"--out_dir={run}", f"--adapter={adapter}"]):
        with pytest.raises(ValueError, match=r"adapter: .* is already merged into .*final"):
            gen(*args, "--prompt=red fox")

# --out never replaces an input or a run's file unasked
def test_out_refuses_inputs_run_files_and_existing_files(run, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "red fox"}\n')
    keep = {p: p.read_bytes() for p in (prompts, run / "metrics.jsonl", run / "config.json")}
    nowhere = "--pretrain=/no/such/model"  # each is refused before a model is looked for
    with pytest.raises(ValueError, match=r"out: .*in.jsonl is the prompts file .*--overwrite=True"):
        gen(nowhere, f"--prompts={prompts}", f"--out={prompts}")
    for name in ("metrics.jsonl", "config.json"):
        with pytest.raises(ValueError, match=rf"out: .*{name} is a file of the run .*--overwrite=True"):
            gen(f"--out_dir={run}", "--prompt=red fox", f"--out={run / name}")
    other = tmp_path / "old.jsonl"
    other.write_text("old\n")
    with pytest.raises(ValueError, match=r"out: .*old.jsonl exists; pass --overwrite=True"):
        gen(nowhere, "--prompt=red fox", f"--out={other}")
    with pytest.raises(ValueError, match=r"out: .* is a directory"):
        gen(nowhere, "--prompt=red fox", f"--out={tmp_path}")
    assert all(p.read_bytes() == b for p, b in keep.items()) and other.read_text() == "old\n"
    got = gen(f"--out_dir={run}", "--prompt=red fox", "--max_new_tokens=3", f"--out={other}", "--overwrite=True")
    assert [json.loads(l) for l in other.read_text().splitlines()] == got
    assert not [f for f in os.listdir(tmp_path) if f.startswith("old.jsonl.")]  # written beside, then renamed
    new = tmp_path / "sub" / "new.jsonl"  # a new file needs no overwrite
    assert gen(f"--out_dir={run}", "--prompt=red fox", "--max_new_tokens=3", f"--out={new}") == got

def test_cli_errors_are_one_line(tmp_path):
    refused(cli("--pretrain=/no/such/model", "--prompt=x", "--max_new_tokens=0"), "max_new_tokens", "> 0")
    refused(cli("--pretrain=/no/such/model", "--prompt=x", f"--out={tmp_path}"), "out", "is a directory")
    with pytest.raises(ValueError, match="top_p must be in"):
        gen("--prompt=x", "--top_p=0")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        gen("--prompt=x", "--batch_size=0")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        gen("--prompt=x", "--num_samples=0")

# --stop: a string, or a JSON list of strings
def test_stop_is_a_string_unless_it_is_a_json_list_of_strings():
    tok = byte_tokenizer()
    assert decoding.parse_stop(tok, "[/INST]") == ["[/INST]"]
    assert decoding.parse_stop(tok, '["###", "\\nUser:"]') == ["###", "\nUser:"]
    assert decoding.parse_stop(tok, '["a", 1]') == ['["a", 1]']
    assert decoding.parse_stop(tok, "[1, 2]") == ["[1, 2]"]

# prompts files: the file and line of what is wrong
def test_prompts_files_errors_name_the_file_and_line(run, tmp_path):
    def bad(name, content, *words):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError) as e:
            gen(f"--pretrain={run / 'final'}", f"--prompts={p}")
        for w in (str(p), *words):
            assert w in str(e.value), (w, str(e.value))
    bad("malformed.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n', "line 3", "malformed JSON")
    bad("strings.json", b'["red fox", "owl"]', "item 1", "expected a JSON object", "str")
    bad("strings.jsonl", b'{"prompt": "a"}\n["red fox", "owl"]\n', "line 2", "expected a JSON object", "list")
    bad("dict.json", b'{\n  "data": [{"prompt": "a"}]\n}\n', "line 1", "none of the keys", "data")
    bad("latin1.jsonl", '{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"), "line 2", "not UTF-8")
    bad("empty.jsonl", b"\n\n", "no prompt rows")
    bad("empty_prompt.jsonl", b'{"prompt": "a"}\n\n{"prompt": " "}\n', "line 3", "empty prompt")
    with pytest.raises(ValueError, match="no_such.jsonl: no such file"):
        gen(f"--pretrain={run / 'final'}", f"--prompts={tmp_path / 'no_such.jsonl'}")
    p = tmp_path / "one.json"  # one row, pretty-printed, is one row
    p.write_text('{\n  "prompt": "red fox"\n}\n')
    assert [r["prompt"] for r in gen(f"--pretrain={run / 'final'}", f"--prompts={p}", "--max_new_tokens=2")] == [
        "red fox"
    ]

# an adapter of another shape: the file, the tensor and both shapes
def test_adapter_of_another_shape_names_file_tensor_and_shapes(tmp_path):
    from lora import inject, load_adapter, save_adapter
    from model import GPT, Config
    def tiny(n_embd):
        torch.manual_seed(0)
        return GPT(Config(vocab_size=258, n_layer=1, n_head=4, n_kv_head=2, n_embd=n_embd, head_dim=8,
                          intermediate_size=64, max_position_embeddings=32, norm_eps=1e-5))
    m = tiny(32)
    inject(m, 4, 8, 0.0, "q_proj")
    save_adapter(m, str(tmp_path / "ad"))
    f = str(tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"{f}: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                         r"lora_A\.weight has shape \(4, 32\), .* \(4, 48\)"):
        load_adapter(tiny(48), str(tmp_path / "ad"))
    wider = tiny(32)
    inject(wider, 8, 8, 0.0, "q_proj")  # adapters of another rank already in place
    with pytest.raises(ValueError, match=rf"{f}: .*q_proj\.lora_A\.weight has shape \(4, 32\), .* \(8, 32\)"):
        load_adapter(wider, str(tmp_path / "ad"))

# train.py's reward_model: checked before anything loads; a late failure still leaves the summary
def test_reward_model_that_cannot_exist_is_refused_before_loading(tmp_path):
    p = run_train(
        tmp_path / "a", "--obj_2=", "--max_iters=1", "--eval_gen_interval=0", "--reward_model=/nope", check=False
    )
    refused(p, "reward_model", "/nope")
    p = run_train(tmp_path / "b", "--obj_2=", "--max_iters=1", "--eval_gen_interval=0", "--reward_model=no-org/no-rm",
                  check=False)  # a hub id offline, not in the cache
    refused(p, "reward_model", "no-org/no-rm")
    assert not os.path.exists(tmp_path / "a" / "final") and not os.path.exists(tmp_path / "b" / "final")

def test_reward_model_failing_at_the_end_still_writes_the_summary(tmp_path):
    import transformers
    rm = tmp_path / "rm"  # a config that checks out, but no weights to load
    transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=1).save_pretrained(rm)
    out = tmp_path / "run"
    p = run_train(out, "--obj_2=", "--max_iters=2", "--eval_gen_interval=0", f"--reward_model={rm}", check=False)
    assert p.returncode != 0 and "eval_gen" in p.stderr, p.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iters"] == 2 and "eval_loss_1" in summary and str(rm) in summary["eval_gen_error"]
    assert os.path.exists(out / "final" / "config.json")

def test_objective_beyond_the_run_and_two_prompt_sources_are_refused():
    """--objective=3 of a two-objective run names the run's objective count (it used to report a
    missing 'input' key); --objective beside --prompt or --prompts is refused (one source of prompts)."""
    run_cfg = {"obj_1": "sft", "obj_2": "dpo", "dataset_1": "data/toy_sft.jsonl", "dataset_2": "data/toy_pref.jsonl",
               "eval_frac": 0.05}
    with pytest.raises(ValueError, match=r"--objective=3, but the run trained 2 objective\(s\) \(1 to 2\)"):
        G.held_out_rows(run_cfg, 3)
    rows, _ = G.held_out_rows(run_cfg, 2)  # its own objectives still read their held-out rows
    assert rows and all("prompt" in r for r in rows)
    for kw in (dict(prompt="red fox", objective=1), dict(prompts="p.jsonl", objective=2), dict(prompt="a", prompts="b")):
        with pytest.raises(ValueError, match="give one source of prompts"):
            G.read_prompt_rows(run_cfg=run_cfg, **kw)
