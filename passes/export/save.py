"""`save "PATH"`: the result as a Hugging Face directory with its surgery.json manifest."""

from __future__ import annotations

from surgery.passapi import ModelPass, PassParams, RunContext, State, StepReport
from surgery.registry import register


class SaveParams(PassParams):
    path: str


@register
class Save(ModelPass):
    verb = "save"
    method = "surgery"
    statement_fields = frozenset({"path"})
    summary = "write the result as a Hugging Face directory plus surgery.json"
    Params = SaveParams
    is_default = True
    accepts = frozenset(State)  # saving reads any state and changes none

    def apply(self, ctx: RunContext, modules) -> StepReport:
        # The runner writes the directory once every expectation has passed (surgery/emit.py).
        return StepReport()
