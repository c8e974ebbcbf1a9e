"""train.py as users run it: real commands on a tiny model, numbers compared between runs that
must agree exactly (batch splits, world sizes, resume) and against the methods' definitions."""
import json

import pytest
import torch
import transformers

from helpers import metrics, resume_after_cut, run_train

def losses(out):
    return [(l["iter"], l["obj"], l["loss"]) for l in metrics(out)]

def assert_same_losses(a, b, tol=1e-5):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        assert abs(x[2] - y[2]) <= tol, (x, y)

# Runs that must agree exactly compare in float64. In float32 they agree to ~1e-6 for a step, but
# Adam amplifies rounding: its first update is sign(g), and at init the DPO gradient of the
# chosen/rejected shared prefix cancels to rounding noise, so noise-signed +-lr updates follow.
EXACT = ["--dtype=float64"]

def test_accumulation_is_exact(tmp_path):
    """micro-batch 4 x accumulation 1 == micro-batch 1 x accumulation 4 (global per-token and
    per-pair normalization), step for step."""
    args = ["--method=alright", "--train_batch_size=4", "--max_iters=6", *EXACT]
    run_train(tmp_path / "a", *args, "--micro_train_batch_size=4")
    run_train(tmp_path / "b", *args, "--micro_train_batch_size=1")
    assert_same_losses(losses(tmp_path / "a"), losses(tmp_path / "b"))
    assert {o for _, o, _ in losses(tmp_path / "a")} == {1, 2}

DDP_ALRIGHT = ["--method=alright", "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=4", *EXACT]
DDP_MAXRIGHT = ["--method=maxright", "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=4",
                "--opt_estimate_iters=2", "--maxright_interval=2", *EXACT]

@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """the one-process runs the zero stages compare against, each run once for the module."""
    done = {}
    def get(args):
        key = tuple(args)
        if key not in done:
            done[key] = tmp_path_factory.mktemp("single")
            run_train(done[key], *args)
        return done[key]
    return get

@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_processes_equal_one(tmp_path, zero_stage, single_runs):
    """torchrun with 2 ranks (gloo) gives the single-process losses, for every zero stage."""
    args = DDP_ALRIGHT
    single = single_runs(args)
    run_train(tmp_path / "ddp", *args, f"--zero_stage={zero_stage}", nproc=2)
    assert_same_losses(losses(single), losses(tmp_path / "ddp"))
    ev1, ev2 = metrics(single, "eval")[-1], metrics(tmp_path / "ddp", "eval")[-1]
    assert abs(ev1["eval_loss_1"] - ev2["eval_loss_1"]) <= 1e-5 and abs(ev1["eval_loss_2"] - ev2["eval_loss_2"]) <= 1e-5

@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_maxright_two_processes_equal_one(tmp_path, zero_stage, single_runs):
    """maxright with f* estimated (the weights and the optimizer state, a shard of it under zero 1,
    are saved and restored around the single-objective runs): 2 ranks give the 1-process f*, choices and losses."""
    args = DDP_MAXRIGHT
    single = single_runs(args)
    run_train(tmp_path / "ddp", *args, f"--zero_stage={zero_stage}", nproc=2)
    assert_same_losses(losses(single), losses(tmp_path / "ddp"))
    for a, b in zip(metrics(single), metrics(tmp_path / "ddp")):
        assert abs(a["s_1"] - b["s_1"]) <= 1e-5 and abs(a["s_2"] - b["s_2"]) <= 1e-5

@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("bfloat16", 2e-2)])
def test_kd_sft_lora_fsdp_checkpointing_two_processes_equal_one(tmp_path, dtype, tol):
    """the KD + SFT recipe's set-up at toy size: LoRA (the teacher is the policy with its adapters
    off), gradient checkpointing, FSDP2 full sharding on 2 ranks against 1 process; exact in float64,
    within bf16 rounding (2e-2 on losses ~5) under bf16 autocast."""
    args = ["--obj_1=kd", "--obj_2=sft", "--dataset_2=data/toy_sft.jsonl", "--eval_split_2=data/toy_sft_eval.jsonl",
            "--method=alright", "--lora_rank=4", "--target_modules=q_proj,v_proj", "--gradient_checkpointing=True",
            "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=4", "--learning_rate=3e-2",
            f"--dtype={dtype}"]
    run_train(tmp_path / "single", *args)
    run_train(tmp_path / "fsdp", *args, "--zero_stage=3", nproc=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert_same_losses(a, b, tol)
    assert {o for _, o, _ in a} == {1, 2} and a[-1][2] != a[0][2]  # both objectives drawn, the weights moved

def test_frozen_teacher_and_reference_sharded_at_zero_3(tmp_path):
    """zero_stage=3 shards the frozen KD teacher / DPO reference (a checkpoint of its own) like the
    policy: 2 ranks give the 1-process losses (float64), and the run says the model was sharded."""
    base = ["--model_n_layer=2", "--model_n_embd=32", "--model_n_head=4", "--model_n_kv_head=2",
            "--model_intermediate_size=64", "--max_len_1=40", "--max_len_2=40", "--eval_iters=1", "--eval_interval=0"]
    run_train(tmp_path / "teacher", *base, "--dataset_1=data/toy_sft.jsonl", "--max_samples_1=16",
              "--max_iters=2", "--learning_rate=3e-2", "--train_batch_size=8", "--micro_train_batch_size=8", base=[])
    teacher = str(tmp_path / "teacher" / "final")
    args = ["--obj_1=kd", f"--ref_model={teacher}", "--method=alright", "--train_batch_size=4",
            "--micro_train_batch_size=2", "--max_iters=4", *EXACT]
    run_train(tmp_path / "single", *args)
    p = run_train(tmp_path / "fsdp", *args, "--zero_stage=3", nproc=2)
    assert "1 frozen reference / teacher model(s) sharded across 2 ranks" in p.stdout + p.stderr
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert_same_losses(a, b)
    assert {o for _, o, _ in a} == {1, 2}

def test_methods_pick_objectives_as_defined(tmp_path):
    common = ["--train_batch_size=4", "--micro_train_batch_size=4"]
    # alright: objective 1 on a fraction of steps close to lambd (binomial sd 0.03 at 240 steps)
    run_train(
        tmp_path / "alright", *common, "--method=alright", "--lambd=0.3", "--max_iters=240", "--learning_rate=1e-4"
    )
    objs = [l["obj"] for l in metrics(tmp_path / "alright")]
    assert len(objs) == 240 and abs(objs.count(1) / 240 - 0.3) < 0.1
    # sequential: objective 1 for round(lambd * T) steps, then objective 2
    run_train(tmp_path / "seq", *common, "--method=sequential", "--lambd=0.25", "--max_iters=8")
    assert [l["obj"] for l in metrics(tmp_path / "seq")] == [1, 1, 2, 2, 2, 2, 2, 2]
    # mix: both every step, loss = lambd f_1 + (1 - lambd) f_2
    run_train(tmp_path / "mix", *common, "--method=mix", "--lambd=0.7", "--max_iters=3")
    for l in metrics(tmp_path / "mix"):
        assert l["obj"] == 0 and abs(l["loss"] - (0.7 * l["loss_1"] + 0.3 * l["loss_2"])) < 1e-6
    # maxright: the objective with the larger weighted gap s_i = w_i (f_i - f_i*), ties to 1;
    # the chosen one's s is refreshed with its pre-update loss, the other kept, all re-evaluated every k
    run_train(tmp_path / "max", *common, "--method=maxright", "--lambd=0.5", "--max_iters=12", "--maxright_interval=5",
              "--obj_opt_1=5.0", "--obj_opt_2=0.1")
    lines = metrics(tmp_path / "max")
    for prev, l in zip([None] + lines, lines):
        assert l["obj"] == (1 if l["s_1"] >= l["s_2"] else 2)
        if prev is not None and (l["iter"] - 1) % 5 != 0:
            j = prev["obj"]
            w = 0.5
            assert abs(l[f"s_{j}"] - w * (prev["loss"] - (5.0 if j == 1 else 0.1))) < 1e-6
            assert l[f"s_{3 - j}"] == prev[f"s_{3 - j}"]
    assert {l["obj"] for l in lines} == {1, 2}

@pytest.mark.parametrize("method", ["alright", "maxright"])
def test_resume_continues_exactly(tmp_path, method):
    """2N steps straight == N steps, stop, resume, N steps: same losses and final weights. The
    datasets' epochs (36 and 44 rows, batch 8) end in the middle of steps."""
    from safetensors.torch import load_file
    args = [f"--method={method}", "--max_samples_1=36", "--max_samples_2=44", "--train_batch_size=8",
            "--micro_train_batch_size=4", "--max_iters=10", "--save_interval=5", "--keep_last=5",
            "--opt_estimate_iters=2", "--maxright_interval=3", "--eval_interval=5"]
    straight = tmp_path / "straight"
    run_train(straight, *args)
    cut = tmp_path / "cut"
    resume_after_cut(straight, cut, args, "iter_0000010")
    assert_same_losses(losses(straight), losses(cut), tol=0.0)
    assert metrics(straight, "eval") == [
        dict(l, elapsed_s=l2["elapsed_s"]) for l, l2 in zip(metrics(cut, "eval"), metrics(straight, "eval"))
    ]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_final_export_loads_in_transformers_and_peft(tmp_path):
    import peft
    from model import byte_tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    run_train(out, f"--pretrain={tmp_path / 'base'}", "--lora_rank=4", "--lora_alpha=8",
              "--target_modules=q_proj,v_proj", "--gradient_checkpointing=True",
              "--method=alright", "--train_batch_size=4", "--micro_train_batch_size=4", "--max_iters=5")
    ids = torch.randint(0, 258, (2, 11))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "final").float().eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
        got, want = merged(ids).logits, adapted(ids).logits
    assert (got - want).abs().max() <= 1e-4
    assert (got - base_logits).abs().max() > 1e-3  # training moved the model
    from model import GPT
    with torch.no_grad():
        assert (GPT.from_pretrained(str(out / "final"))(ids) - got).abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert tok.encode("hi", add_special_tokens=False) == [104, 105]

@pytest.mark.parametrize("method", ["sequential", "mix", "alright", "maxright"])
def test_toy_run_reduces_both_eval_losses(tmp_path, method):
    run_train(tmp_path, f"--method={method}", "--max_samples_1=400", "--max_samples_2=400", "--train_batch_size=16",
              "--micro_train_batch_size=16", "--max_iters=40", "--eval_iters=4", "--opt_estimate_iters=10")
    ev = metrics(tmp_path, "eval")
    assert ev[-1]["eval_loss_1"] < ev[0]["eval_loss_1"] - 0.5
    assert ev[-1]["eval_loss_2"] < ev[0]["eval_loss_2"] - 0.01
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iters"] == 40 and summary["counts"]["1"] + summary["counts"]["2"] >= 40

def test_sequential_forgets_objective_1(tmp_path):
    """Sequential reduces objective 1 in its phase and objective 2 in its phase, and the DPO phase
    raises the SFT loss again (the toy's DPO rejects exactly the SFT answer): the forgetting the
    joint methods avoid."""
    run_train(tmp_path, "--method=sequential", "--max_samples_1=400", "--max_samples_2=400", "--train_batch_size=16",
              "--micro_train_batch_size=16", "--max_iters=40", "--eval_iters=4", "--eval_interval=20")
    start, switch, end = metrics(tmp_path, "eval")
    assert switch["iter"] == 20 and [l["obj"] for l in metrics(tmp_path)] == [1] * 20 + [2] * 20
    assert switch["eval_loss_1"] < start["eval_loss_1"] - 0.5
    assert end["eval_loss_2"] < switch["eval_loss_2"] - 0.1
    assert end["eval_loss_1"] > switch["eval_loss_1"] + 0.5

def test_packing_gives_the_same_losses(tmp_path):
    """SFT with documents packed into rows (segment-masked attention, positions restarting per
    document) trains exactly like padded rows: losses are per token over the global batch."""
    args = ["--obj_2=", "--train_batch_size=8", "--micro_train_batch_size=8", "--max_iters=4", "--max_len_1=96", *EXACT]
    run_train(tmp_path / "padded", *args)
    run_train(tmp_path / "packed", *args, "--packing=True")
    assert_same_losses(losses(tmp_path / "padded"), losses(tmp_path / "packed"), tol=1e-10)
    assert metrics(tmp_path / "packed")[-1]["tokens"] == metrics(tmp_path / "padded")[-1]["tokens"]
