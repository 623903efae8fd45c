"""The CLI: exit codes, JSON output, pass listing."""

import json

import pytest

from surgery.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_reports_errors_with_exit_2(tmp_path, capsys):
    f = tmp_path / "bad.surg"
    f.write_text("quantise x to int8\n")
    code, out, err = run(capsys, "check", str(f))
    assert code == 2
    assert "error[E0101]" in err and f"{f}:1:1" in err and "Traceback" not in err


def test_check_json(tmp_path, capsys):
    f = tmp_path / "bad.surg"
    f.write_text("quantise x to int8\nprune y tto 2:4\n")
    code, out, err = run(capsys, "check", str(f), "--format", "json")
    assert code == 2
    j = json.loads(out)
    assert [d["code"] for d in j["diagnostics"]] == ["E0101", "E0100"]


def test_missing_script(capsys):
    code, out, err = run(capsys, "plan", "does-not-exist.surg")
    assert code == 2 and "E0602" in err


def test_plan_on_skeleton(tmp_path, capsys):
    f = tmp_path / "q.surg"
    f.write_text('model base = "zoo:smollm2-135m"\nquantize type(Linear) - modules("lm_head") to int8\n')
    code, out, err = run(capsys, "plan", str(f), "--format", "json")
    assert code == 0
    j = json.loads(out)
    assert j["skeleton"] is True and len(j["steps"][0]["modules"]) == 210


def test_check_binds_on_skeleton(tmp_path, capsys):
    f = tmp_path / "q.surg"
    f.write_text('model base = "zoo:smollm2-135m"\nquantize type(Linear) to int4 using rtn(group=128)\n')
    code, out, err = run(capsys, "check", str(f))
    assert code == 2 and "E0402" in err


def test_apply_with_model_override(tiny_hf_dir, tmp_path, capsys):
    f = tmp_path / "q.surg"
    f.write_text('quantize type(Linear) - modules("lm_head") to int8\n')
    code, out, err = run(capsys, "apply", str(f), "--model", f"hf:{tiny_hf_dir}",
                         "-o", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    assert (tmp_path / "out" / "surgery.json").exists()


def test_expectations_pass_and_fail(tiny_hf_dir, tmp_path, capsys):
    head = (f'model base = "hf:{tiny_hf_dir}"\ndata calib = corpus("pydoc", samples=4, seqlen=32, '
            'eval_windows=4)\nquantize type(Linear) - modules("lm_head") to int8\n')
    ok = tmp_path / "ok.surg"
    ok.write_text(head + "expect perplexity(calib) <= 1.05 * original\nexpect cosine(calib) >= 0.99\n"
                  f'save "{tmp_path / "ok"}"\n')
    code, out, err = run(capsys, "apply", str(ok), "--quiet")
    assert code == 0, err
    assert "passed" in out and (tmp_path / "ok").exists()
    bad = tmp_path / "bad.surg"
    bad.write_text(head + "expect max_abs_diff(calib) <= 1e-9\n" f'save "{tmp_path / "bad"}"\n')
    code, out, err = run(capsys, "apply", str(bad), "--quiet")
    assert code == 2 and "E0800" in err and "bad.surg:4:1" in err
    assert not (tmp_path / "bad").exists()


def test_passes_listing(capsys):
    code, out, err = run(capsys, "passes")
    assert code == 0 and "quantize" in out and "rtn" in out
    code, out, err = run(capsys, "passes", "--schema")
    schema = json.loads(out)
    assert "quantize/rtn" in schema and "properties" in schema["quantize/rtn"]


def test_internal_error_exit_1(monkeypatch, tmp_path, capsys):
    import surgery.cli as cli

    f = tmp_path / "q.surg"
    f.write_text("quantize type(Linear) to int8\n")
    monkeypatch.setattr(cli, "cmd_check", lambda args, console: 1 / 0)
    code, out, err = run(capsys, "check", str(f))
    assert code == 1 and "internal error" in err
