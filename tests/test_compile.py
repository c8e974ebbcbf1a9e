"""--compile=True (torch.compile of each block, inductor on CPU) trains exactly like eager: SFT and
DPO steps on batches of different padded lengths, the reference forward and evaluation under
no_grad."""

from helpers import metrics, run_train

def test_compiled_blocks_train_like_eager(tmp_path):
    # float64, as the other exactness tests: in float32, Adam amplifies the fused kernels' reordered
    # sums (1e-7) to 1e-5 by step 3
    args = ["--method=alright", "--train_batch_size=4", "--micro_train_batch_size=2", "--max_iters=4", "--eval_iters=1",
            "--dtype=float64"]
    run_train(tmp_path / "eager", *args)
    run_train(tmp_path / "compiled", *args, "--compile=True")
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [l["obj"] for l in eager] == [l["obj"] for l in compiled] and {l["obj"] for l in eager} == {1, 2}
    for a, b in zip(eager + metrics(tmp_path / "eager", "eval"), compiled + metrics(tmp_path / "compiled", "eval")):
        for k in ("loss", "eval_loss_1", "eval_loss_2"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-9, (k, a, b)
