"""The MoE benchmark says, per row, which of the issue's targets its figures meet."""

from xpar.bench import moe


def _m(cap, ds, bound):
    return {"xpar_capacity": cap, "xpar_dropless": cap, "deepspeed": ds, "bound": bound}


def test_each_target_is_judged_on_its_row():
    quiet = [(moe.ROWS[0], _m(1.05, 1.3, 1.0)), (moe.ROWS[3], _m(1.3, 1.4, 1.0))]
    busy = [(moe.ROWS[0], _m(1.6, 2.0, 1.0)), (moe.ROWS[3], _m(1.4, 2.0, 1.0))]
    lines = moe._verdicts(quiet, busy).splitlines()
    assert lines[1].count("NOT met") == 1 and "contended xpar/bound 1.60x (NOT met" in lines[1]
    # the fine-grained row has its own bound target (1.25x): 1.30x misses it
    assert "xpar/bound 1.30x (NOT met, target <= 1.25x)" in lines[2]
    assert "DS/xpar 1.08x (NOT met" in lines[2] and "contended xpar/bound 1.40x (met" in lines[2]
