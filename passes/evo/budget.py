"""The plan-time budget check: can the selected units average the request exactly?"""

from __future__ import annotations

from surgery.passapi import Problem

from .search import Infeasible, initial_state


class BudgetProblem(Problem):
    code = "E0330"


def check_budget(targets, values: list[float], target: float, unit: str) -> BudgetProblem | None:
    sizes = [m.weight.numel() for m in targets.values()]
    try:
        initial_state(sizes, values, target, noun="layers")
    except Infeasible as e:
        return BudgetProblem(f"infeasible budget {target:g}{unit}: {e}",
                             hint="add levels between the ones given, or change the average")
    return None
