"""The `surgery` command: check, plan, apply, passes.

Exit codes: 0 success, 2 user error (diagnostics printed), 1 internal error (a bug: traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from surgery.diagnostics import SurgeryError

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from surgery import __version__

    p = argparse.ArgumentParser(prog="surgery", description="Declarative model surgery for PyTorch")
    p.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def script_cmd(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("file", help="the .surg script")
        sp.add_argument("--model", help="override the script's model (zoo:NAME or hf:DIR)")
        sp.add_argument("--format", choices=["text", "json"], default="text")
        sp.add_argument("--trust-pickle", action="store_true",
                        help="allow loading pickle (.bin/.pt) weights")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="allow running Python code shipped with a checkpoint (auto_map)")
        return sp

    script_cmd("check", "static checks (and binding on the model's skeleton when it is known)")
    script_cmd("plan", "show what every statement will touch, on a weightless skeleton")
    ap = script_cmd("apply", "run the script")
    ap.add_argument("-o", "--output", help="save the result here (overrides the script's save)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="calibrate with N processes on torch.distributed (launches torchrun)")
    # big models (docs/scale.md)
    ap.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                    help="out-of-core, block by block (auto: when the model does not fit)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (blocks are onloaded there)")
    ap.add_argument("--dtype", help="float dtype of the output (default: the checkpoint's)")
    ap.add_argument("--max-memory", help="host memory budget, e.g. 6GB")
    ap.add_argument("--max-device-memory", help="device memory budget, e.g. 40GB")
    ap.add_argument("--max-shard-size", help="largest output shard (default 5GB)")
    ap.add_argument("--spill-activations", metavar="DIR",
                    help="keep calibration activations on disk under DIR, not in memory "
                         "(streamed runs do so by themselves when only that fits --max-memory)")
    ep = sub.add_parser("explain", help="explain a diagnostic code, e.g. `surgery explain E0500`")
    ep.add_argument("code", help="a code such as E0500")
    pp = sub.add_parser("passes", help="list registered passes and their parameters")
    pp.add_argument("--schema", action="store_true", help="print the JSON schema of every pass")
    return p


def _load_program(path: str):
    from surgery.api import Program
    from surgery.scriptfile import read_script

    return Program(read_script(path), str(path))


def _fmt_bytes(n: int) -> str:
    """Binary units, named as such (a `--max-memory 6GB` is 10^9 bytes, 5.6 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _print_plan(plan, console) -> None:
    from rich.table import Table

    t = Table(title=f"plan for {plan.subject_source}"
                    f"{' (skeleton, no weights loaded)' if plan.skeleton else ''}")
    for col in ("line", "statement", "modules", "examples", "parameters", "memory"):
        t.add_column(col, overflow="fold")
    for row in plan.rows:
        examples = ", ".join(row.modules[:2]) + (" ..." if len(row.modules) > 2 else "")
        t.add_row(str(row.line), row.text, str(len(row.modules)), examples,
                  _fmt_count(row.parameters), _fmt_bytes(row.memory_bytes))
    console.print(t)


def cmd_check(args, console) -> int:
    prog = _load_program(args.file)
    checked = prog.check()
    bound = None
    if args.model or checked.subject is not None:
        bound = prog.plan(args.model, trust_remote_code=args.trust_remote_code)
    if args.format == "json":
        print(json.dumps({"ok": True, "diagnostics": [],
                          "bound": bound.to_json() if bound else None}, indent=2))
    else:
        what = f"; bound to {bound.subject_source} skeleton" if bound else ""
        console.print(f"[green]ok[/green]: {args.file}: {len(prog.ast.statements)} statements{what}")
    return EXIT_OK


def cmd_plan(args, console) -> int:
    prog = _load_program(args.file)
    plan = prog.plan(args.model, trust_remote_code=args.trust_remote_code)
    est = _estimate(plan)
    spilled = _estimate(plan, spill=True) if est is not None else None
    if spilled is not None and spilled.host_streamed >= est.host_streamed:
        spilled = None  # no calibration activations to spill
    if args.format == "json":
        mem = est.to_json() | ({"host_streamed_spilled_bytes": spilled.host_streamed}
                               if spilled else {}) if est else None
        print(json.dumps(plan.to_json() | ({"memory": mem} if mem else {}), indent=2))
    else:
        _print_plan(plan, console)
        if est is not None:
            console.print(f"estimated peak host memory: {_fmt_bytes(est.host_in_memory)} in "
                          f"memory, {_fmt_bytes(est.host_streamed)} streamed (--stream on; "
                          f"largest unit {_fmt_bytes(est.min_unit)} in fp32)")
        if spilled is not None:
            console.print(f"with calibration activations spilled to disk: "
                          f"{_fmt_bytes(spilled.host_streamed)} streamed (chosen by itself when "
                          f"only that fits --max-memory, next to the output; or "
                          f"--spill-activations DIR)")
    return EXIT_OK


def _estimate(plan, spill: bool = False):
    """The memory estimate for a plan bound to a safetensors checkpoint, else None."""
    import torch

    from surgery.executor.entry import plan_estimate
    from surgery.models import local_dir

    d = local_dir(plan.subject_source)
    if d is None or not list(d.glob("*.safetensors")):
        return None
    return plan_estimate(plan, d, torch.device("cpu"), spill=spill)


def cmd_apply(args, console) -> int:
    from surgery import distributed
    from surgery.progress import LogProgress, Progress, RichProgress

    if args.nproc is not None and distributed.world_from_env() <= 1:
        return _launch(args)
    group = distributed.init_from_env(args.device)
    prog = _load_program(args.file)
    if args.quiet or args.format == "json" or not distributed.is_writer():
        progress = Progress()
    else:
        progress = RichProgress() if sys.stderr.isatty() else LogProgress()
    result = prog.apply(args.model, seed=args.seed, output=args.output, progress=progress,
                        trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code,
                        device=args.device, dtype=args.dtype, stream=args.stream,
                        max_memory=args.max_memory, max_device_memory=args.max_device_memory,
                        max_shard_size=args.max_shard_size,
                        spill_activations=args.spill_activations)
    rep = result.report
    if not distributed.is_writer():
        return EXIT_OK  # rank 0 reports
    if group is not None and args.format != "json":
        console.print(f"calibrated with {group.world} processes ({group.backend})")
    if args.format == "json":
        print(json.dumps(rep.to_json(), indent=2, default=str))
        return EXIT_OK
    for s in rep.steps:
        metrics = ", ".join(f"{k}={_show(v)}" for k, v in s.report.metrics.items())
        console.print(f"[bold]line {s.line}[/bold] {s.statement}: {s.report.modules} modules, "
                      f"{_fmt_count(s.report.parameters)} parameters, {s.seconds:.1f}s"
                      + (f"; {metrics}" if metrics else ""))
        for note in s.report.notes:
            console.print(f"    note: {note}")
    for e in rep.expectations:
        orig = f" (original {e.original:.4f}, change {100 * (e.value / e.original - 1):+.2f}%)" \
            if e.original else ""
        console.print(f"[bold]line {e.line}[/bold] {e.statement}: value {e.value:.4f}, bound "
                      f"{e.bound:.4f}{orig} [green]passed[/green]")
    for out in rep.outputs:
        console.print(f"wrote {out}")
    _print_resources(rep, console)
    return EXIT_OK


def _launch(args) -> int:
    """`apply --nproc N`: this same command under torchrun (torch.distributed.run), N processes."""
    import subprocess

    from surgery.diagnostics import Code, error

    if args.nproc < 1:
        raise error(Code.E0911, f"--nproc must be at least 1 (got {args.nproc})")
    argv = sys.argv[1:] if _argv is None else _argv
    rest, skip = [], False
    for a in argv:  # the command again, without --nproc (the ranks must not launch again)
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "surgery", *rest]
    rc = subprocess.call(cmd)
    if rc != 0:  # the ranks printed their own errors above
        raise error(Code.E0910, f"the {args.nproc}-process run failed (torchrun exit {rc}); no "
                    "output was written", help="the first error above names the rank that failed")
    return EXIT_OK


_argv: list[str] | None = None  # main()'s argv, for _launch


def _print_resources(rep, console) -> None:
    """Measured peak memory next to the plan's estimate (streamed runs)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = rep.streamed
    if s is None:
        console.print(f"peak memory: {_fmt_bytes(peak)} resident (in memory)")
        return
    est = s["estimate"]["host_streamed_bytes"]
    dev = f", device {_fmt_bytes(s['peak_device_bytes'])}" if "peak_device_bytes" in s else ""
    console.print(f"streamed {s['units']} units ({s['blocks']} blocks) in {s['seconds']:.1f}s; "
                  f"peak memory: {_fmt_bytes(peak)} resident{dev} (estimated "
                  f"{_fmt_bytes(est)})")
    if s.get("spilled_activations_to"):
        console.print(f"calibration activations were spilled to disk under "
                      f"{s['spilled_activations_to']} (removed)")


def _show(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def params_schema(pass_cls) -> dict:
    """JSON schema of a pass's parameters; fields of types JSON Schema cannot express (such as
    tensors or callables) are described by their Python type instead of failing."""
    from pydantic.json_schema import GenerateJsonSchema

    class Lenient(GenerateJsonSchema):
        def handle_invalid_for_json_schema(self, schema, error_info):
            return {"description": f"Python value ({error_info})"}

    schema = pass_cls.Params.model_json_schema(schema_generator=Lenient)
    schema["description"] = pass_cls.summary or schema.get("description", "")
    return schema


def cmd_passes(args, console) -> int:
    from surgery import registry

    passes = registry.all_passes()
    if args.schema:
        print(json.dumps({f"{p.verb}/{p.method}": params_schema(p) for p in passes}, indent=2))
        return EXIT_OK
    from rich.table import Table

    t = Table(title="registered passes")
    for col in ("verb", "method", "parameters", "summary"):
        t.add_column(col, overflow="fold")
    for p in passes:
        fields = []
        for name, f in p.Params.model_fields.items():
            default = "" if f.is_required() else f"={f.default!r}"
            fields.append(f"{name}{default}")
        t.add_row(p.verb, p.method + (" (default)" if p.is_default else ""), ", ".join(fields),
                  p.summary)
    console.print(t)
    return EXIT_OK


def cmd_explain(args, console) -> int:
    from surgery.diagnostics import CODES, did_you_mean, explanation

    text = explanation(args.code)
    if text is None:
        hint = did_you_mean(args.code.upper(), CODES) or "codes look like E0500; `surgery explain` " \
            "knows " + ", ".join(sorted(CODES))
        print(f"error: no diagnostic code `{args.code}`; {hint}", file=sys.stderr)
        return EXIT_USER
    print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    global _argv
    _argv = argv
    args = _parser().parse_args(argv)
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, soft_wrap=True)
    handler = {"check": cmd_check, "plan": cmd_plan, "apply": cmd_apply,
               "passes": cmd_passes, "explain": cmd_explain}[args.command]
    from surgery import atomic, interrupts

    try:
        with interrupts.handled():
            return handler(args, console)
    except SurgeryError as e:
        if getattr(args, "format", "text") == "json":
            print(json.dumps({"ok": False, "diagnostics": [d.to_json() for d in e.diagnostics]},
                             indent=2))
        else:
            err.print(e.render(), markup=False, highlight=False)
        return EXIT_USER
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into interrupts.Terminated
        err.print(interrupts.describe(e), markup=False, highlight=False)
        return interrupts.exit_code(e)
    except Exception:  # a bug in surgery, not a user mistake
        err.print("internal error (this is a bug in surgery; please report it):", markup=False)
        err.print(traceback.format_exc(), markup=False, highlight=False)
        return EXIT_INTERNAL
    finally:
        atomic.release_all()  # output locks (their .lock files go with them)
        from surgery import distributed

        distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
