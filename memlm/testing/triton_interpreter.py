"""Running flash-linear-attention 0.6's Triton kernels under ``TRITON_INTERPRET=1`` on CPU.

Two interpreter limits are lifted, before fla's kernels are first launched (the interpreter
rewrites a kernel at its first launch): autotuning keeps one config (benchmarking needs a GPU),
and ``for i in range(...)`` binds ``i`` as a Triton tensor, as compiled Triton does, so fla's
``i_t.to(tl.int64)`` works.
"""

from __future__ import annotations

import ast


def _tensor_loop_index(self, node):
    """AST rewrite of a ``for`` over ``range``: the loop index becomes a Triton tensor."""
    node = self.generic_visit(node)
    it = node.iter
    func = it.func if isinstance(it, ast.Call) else None
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name == "range" and isinstance(node.target, ast.Name):
        to_tensor = ast.Attribute(ast.Name("interpreter_semantic", ast.Load()), "to_tensor", ast.Load())
        value = ast.Call(to_tensor, [ast.Name(node.target.id, ast.Load()), ast.Constant(False)], [])
        node.body.insert(0, ast.Assign([ast.Name(node.target.id, ast.Store())], value))
    return node


def interpret_fla() -> None:
    """Lift both limits (idempotent)."""
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    if not getattr(Autotuner, "_one_config", False):
        prune = Autotuner.prune_configs
        Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
        Autotuner._one_config = True
        interpreter.ASTTransformer.visit_For = _tensor_loop_index
