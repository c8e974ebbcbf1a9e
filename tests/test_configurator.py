import os

import pytest

from configurator import apply
from helpers import ROOT

def defaults():
    return {
        "learning_rate": 1e-5,
        "max_iters": 0,
        "compile": False,
        "obj_1": "sft",
        "adam_betas": (0.9, 0.95),
        "lambd": 0.5,
    }

def test_int_accepted_for_float():
    c = defaults()
    apply(["--learning_rate=1"], c)
    assert c["learning_rate"] == 1.0 and isinstance(c["learning_rate"], float)

def test_bool_true_false_any_case():
    c = defaults()
    apply(["--compile=True"], c)
    assert c["compile"] is True
    apply(["--compile=false"], c)
    assert c["compile"] is False

def test_value_with_equals_splits_on_first():
    c = defaults()
    apply(["--obj_1=a=b,c"], c)
    assert c["obj_1"] == "a=b,c"

def test_str_key_takes_text_as_is():
    c = defaults()
    apply(["--obj_1=123"], c)
    assert c["obj_1"] == "123"

def test_tuple_key():
    c = defaults()
    apply(["--adam_betas=(0.8,0.9)"], c)
    assert c["adam_betas"] == (0.8, 0.9)

def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'lamda' \(did you mean 'lambd'\?\)"):
        apply(["--lamda=0.3"], defaults())

def test_wrong_type_names_key_and_types():
    with pytest.raises(ValueError, match=r"'max_iters' expects int.*got float 0.5"):
        apply(["--max_iters=0.5"], defaults())
    with pytest.raises(ValueError, match=r"'compile'.*bool"):
        apply(["--compile=yes"], defaults())

def test_config_file_then_override_later_wins(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("_steps = 10\nmax_iters = _steps * 3\nlambd = 1\nobj_1 = 'dpo'\n")
    c = defaults()
    changed = apply([str(f), "--max_iters=7"], c)
    assert c["max_iters"] == 7 and c["lambd"] == 1.0 and c["obj_1"] == "dpo"
    assert set(changed) == {"max_iters", "lambd", "obj_1"}

def test_config_file_unknown_name_is_error(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("learning_rat = 3e-4\n")
    with pytest.raises(
        ValueError, match=r"cfg.py: unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        apply([str(f)], defaults())

def test_config_file_wrong_type(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("compile = 'yes'\n")
    with pytest.raises(ValueError, match=r"cfg.py: config key 'compile' expects bool"):
        apply([str(f)], defaults())

def test_missing_file_and_malformed_arg():
    with pytest.raises(ValueError, match="not found"):
        apply(["nope.py"], defaults())
    with pytest.raises(ValueError, match="expected --key=value"):
        apply(["--compile"], defaults())

def test_prints_only_on_rank0(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    apply(["--max_iters=3"], defaults())
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    apply(["--max_iters=3"], defaults())
    assert "max_iters = 3" in capsys.readouterr().out

@pytest.mark.parametrize("script", ["train.py", "generate.py", "sweep.py"])
def test_help_prints_the_usage(script):
    """--help (or -h) prints the command's docstring and exits 0, before anything is checked or loaded."""
    import ast
    import subprocess
    import sys
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read()))
    for flag in ("--help", "-h"):
        p = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == doc.strip(), (p.returncode, p.stdout[:200], p.stderr[-500:])
