"""Test set-up: every Triton kernel runs under the interpreter on CPU tensors (there is no GPU here)."""

import os

# Must be set before triton is imported anywhere: triton.jit reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _restore_lang_after_device_calls() -> None:
    """Work around triton 3.8's interpreter leaking its patches of triton.language.

    ``InterpretedFunction.__call__`` (a @triton.jit helper called from an interpreted kernel) patches
    triton.language's builtins and never restores them, so a later ``triton.compile`` in the same process (the
    compile report tests) fails with "'ir.value' object has no attribute 'dtype'". Restoring the helper's
    patch scope on return is what the kernel-level launch already does; nesting stays correct because the
    helper's scope records the kernel's own patches as the values to restore.
    """
    from triton.runtime import interpreter

    def call(self, *args, **kwargs):
        scope = interpreter._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e
        finally:
            scope.restore()

    interpreter.InterpretedFunction.__call__ = call


_restore_lang_after_device_calls()
