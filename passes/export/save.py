"""`save "PATH"`: the transformed model as a directory surgery can load (surgery/emit.py).

An output pass like `export`: it runs after every transformation and expectation, reads any state
and changes none. Its manifest (script, input hashes, plan, step reports) is built by
``emit.manifest`` from the run's provenance, which the runner hands over in ``ctx.extras``.
"""

from __future__ import annotations

from pydantic import Field

from surgery.passapi import (Granularity, ModelPass, OutputPath, PassParams, PassResult,
                             RunContext, State, StepReport)
from surgery.registry import register

class SaveParams(PassParams):
    path: OutputPath = Field(description="output directory (written atomically)")


@register
class Save(ModelPass):
    verb = "save"
    method = "surgery"
    summary = "write the model, its tokenizer and a surgery.json manifest (surgery.load reads it)"
    is_default = True
    is_output = True
    statement_fields = frozenset({"path"})
    granularity = Granularity.TENSOR  # tensors are written one by one, in sorted order
    Params = SaveParams
    accepts = frozenset(State)

    def apply(self, ctx: RunContext, modules) -> PassResult:
        from surgery import emit

        prov = ctx.extras.get(emit.PROVENANCE)
        manifest = emit.manifest(prov) if prov is not None else {}
        tokenizer = prov.tokenizer if prov is not None else None
        with ctx.progress.task(f"saving {self.params.path}"):
            emit.save(ctx.model, self.params.path, manifest, tokenizer=tokenizer,
                      dtypes=ctx.extras.get(emit.STORED_DTYPES),
                      max_shard_bytes=ctx.extras.get(emit.MAX_SHARD))
        n = sum(p.numel() for p in ctx.model.parameters())
        return self.result(ctx, StepReport(modules=len(modules), parameters=n,
                                           metrics={"path": str(self.params.path)}))
