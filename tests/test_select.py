"""method=select end to end: the selector finds the corrupted rows of the shipped noisy toy set
(known only to the evaluation file), keeps original ids, and is exact across ranks and resume."""
import json

import pytest

from functools import partial

import helpers
from helpers import ROOT, read_jsonl

run_train = partial(helpers.run_train, base=[])

SELECT = ["config/demo_select.py"]

def clean_fraction(out, ratio=0.7):
    labels = {r["id"]: r["corrupted"] for r in read_jsonl(f"{ROOT}/data/toy_noisy_labels.jsonl")}
    rows = sorted(read_jsonl(out / "selector.jsonl"), key=lambda r: -r["logit"])
    kept = rows[: round(ratio * len(rows))]
    clean_w = [r["weight"] for r in rows if not labels[r["id"]]]
    bad_w = [r["weight"] for r in rows if labels[r["id"]]]
    return sum(not labels[r["id"]] for r in kept) / len(kept), sum(clean_w) / len(clean_w), sum(bad_w) / len(bad_w)

def test_selector_finds_the_corrupted_rows(tmp_path):
    run_train(tmp_path / "sel", *SELECT)
    frac, clean_w, bad_w = clean_fraction(tmp_path / "sel")
    assert frac >= 0.9 and clean_w > bad_w
    # the exported rows are the top 70% by logit, original fields unchanged
    noisy = read_jsonl(f"{ROOT}/data/toy_noisy.jsonl")
    top = sorted(read_jsonl(tmp_path / "sel" / "selector.jsonl"), key=lambda r: -r["logit"])[:700]
    assert read_jsonl(tmp_path / "sel" / "selected.jsonl") == [noisy[i] for i in sorted(r["id"] for r in top)]
    weights = [r["weight"] for r in read_jsonl(tmp_path / "sel" / "selector.jsonl")]
    assert abs(sum(weights) / len(weights) - 1.0) < 1e-5  # softmax: N * softmax(omega) averages 1
    # baseline: selection switched off (uniform weights) keeps the corruption rate
    run_train(tmp_path / "off", *SELECT, "--selector_learning_rate=0", "--max_epochs=1")
    frac_off, w_clean, w_bad = clean_fraction(tmp_path / "off")
    assert abs(frac_off - 0.7) < 0.05 and w_clean == w_bad == 1.0

def test_ids_are_original_rows_and_sigmoid_weights(tmp_path):
    rows = read_jsonl(f"{ROOT}/data/toy_noisy.jsonl")[:40]
    for i in (3, 7, 30):
        rows[i]["input"] = "long " * 20  # the prompt alone exceeds max_len: dropped
    with open(tmp_path / "noisy.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run_train(tmp_path / "out", *SELECT, f"--dataset_2={tmp_path / 'noisy.jsonl'}", "--selector_activation=sigmoid",
              "--max_epochs=1", "--train_batch_size=8", "--micro_train_batch_size=8", "--selector_learning_rate=0.5")
    sel = read_jsonl(tmp_path / "out" / "selector.jsonl")
    assert [r["id"] for r in sel] == [i for i in range(40) if i not in (3, 7, 30)]
    assert all(0 < r["weight"] < 2 for r in sel) and len({round(r["weight"], 6) for r in sel}) > 1
    kept = read_jsonl(tmp_path / "out" / "selected.jsonl")
    assert (
        len(kept) == round(0.7 * 37)
        and all(r in rows for r in kept)
        and not any(r["input"].startswith("long") for r in kept)
    )

def selector_logits(out):
    return {r["id"]: r["logit"] for r in read_jsonl(out / "selector.jsonl")}

def test_two_processes_give_the_same_logits(tmp_path):
    args = [*SELECT, "--max_samples_1=64", "--max_samples_2=96", "--train_batch_size=16", "--micro_train_batch_size=4",
            "--max_epochs=2", "--dtype=float64"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, nproc=2)
    a, b = selector_logits(tmp_path / "one"), selector_logits(tmp_path / "two")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-6
    assert max(a.values()) - min(a.values()) > 0.1  # the logits moved

@pytest.mark.parametrize("algorithm", ["memory", "penalty"])
def test_resume_mid_epoch_gives_the_same_logits(tmp_path, algorithm):
    """also for the penalty algorithm, whose theta-hat and its optimizer live in the checkpoint."""
    import shutil
    # 96 rows / 16 per step = 6 steps per epoch; checkpoint at step 4 is mid-epoch
    args = [*SELECT, "--max_samples_1=64", "--max_samples_2=96", "--train_batch_size=16", "--micro_train_batch_size=8",
            "--max_epochs=2", "--save_interval=4", "--keep_last=5", f"--selector_algorithm={algorithm}"]
    run_train(tmp_path / "straight", *args)
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    for d in ("iter_0000008", "iter_0000012"):
        shutil.rmtree(tmp_path / "cut" / "ckpt" / d)
    (tmp_path / "cut" / "selector.jsonl").unlink()
    run_train(tmp_path / "cut", *args, "--resume=True")
    assert selector_logits(tmp_path / "straight") == selector_logits(tmp_path / "cut")
