"""Delta-rule kernels. Models call `delta_rule` (refine/kernels/dispatch.py), which picks the kernel."""

from refine.kernels.chunk import chunk_delta_rule
from refine.kernels.dispatch import delta_rule
from refine.kernels.naive import naive_delta_rule
from refine.kernels.recurrent import delta_rule_step, recurrent_delta_rule

__all__ = ["chunk_delta_rule", "delta_rule", "delta_rule_step", "naive_delta_rule", "recurrent_delta_rule"]
